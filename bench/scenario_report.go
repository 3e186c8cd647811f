// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package main

import (
	"cmp"
	"fmt"
	"maps"
	"slices"
	"strings"
)

// The figures, tables and goals of the scenarios beyond issue 4: the TLS
// passthrough route chosen by SNI, descriptors after slow readers, idle
// UDP flows. Nothing here measures or starts anything.

// goGrew is what one of Go's figures grew by; only a Go proxy has them.
func goGrew(f func(g *goStats) int64) func(s sample) (int64, bool) {
	return func(s sample) (int64, bool) {
		if s.Go == nil || s.GoLoaded == nil {
			return 0, false
		}
		return f(s.GoLoaded) - f(s.Go), true
	}
}

// extraFDs are the descriptors the proxy holds beyond two per connection
// (its client's socket and its backend's): a count, not a ratio, since a
// pool of a fixed size is what it usually is.
func extraFDs(s sample) (float64, bool) {
	return float64(s.FDs - s.FDsBase - 2*s.IdleConns), s.FDs > 0 && s.IdleConns > 0
}

var scenarioMetrics = []metric{
	{"sni_up", "sni-up", mbps, false},
	{"sni_down", "sni-down", mbps, false},
	{"cpu_sni_up", "sni-up", cpuPerGB, true},
	{"cpu_sni_down", "sni-down", cpuPerGB, true},
	{"sni_conns", "sni-connrate", connsPerSec, false},
	{"cpu_sni_conn", "sni-connrate", cpuPerConn, true},
	{"proxy_core_sni_conns", "sni-connrate", proxyCores, true},
	{"load_core_sni_conns", "sni-connrate", loadCores, false},
	{"rss_tls_idle", tlsIdleTest, perIdle(rssGrew), true},
	{"fds_tls_idle", tlsIdleTest, perIdle(fdsGrew), true},
	{"rss_sni_idle", sniIdleTest, perIdle(rssGrew), true},
	{"fds_sni_idle", sniIdleTest, perIdle(fdsGrew), true},
	{"fds_slow", slowTest, perIdle(fdsGrew), true},
	{"fds_sni_slow", sniSlowTest, perIdle(fdsGrew), true},
	{"extra_fds_slow", slowTest, extraFDs, true},
	{"extra_fds_sni_slow", sniSlowTest, extraFDs, true},
	{"rss_slow", slowTest, perIdle(rssGrew), true},
	{"rss_sni_slow", sniSlowTest, perIdle(rssGrew), true},
	{"secs_slow", slowTest, seconds, true},
	{"secs_sni_slow", sniSlowTest, seconds, true},
	{"udp_heap", udpTest, perIdle(goGrew(func(g *goStats) int64 { return g.HeapAlloc })), true},
	{"udp_stack", udpTest, perIdle(goGrew(func(g *goStats) int64 { return g.StackInuse })), true},
	{"udp_goroutines", udpTest, perIdle(goGrew(func(g *goStats) int64 { return int64(g.Goroutines) })), true},
	{"udp_rss", udpTest, perIdle(rssGrew), true},
	{"udp_fds", udpTest, perIdle(fdsGrew), true},
}

func fmt1(v float64) string { return fmt.Sprintf("%.1f", v) }
func fmtSigned(v float64) string {
	return fmt.Sprintf("%+.0f", v)
}

// scenario is one of the report's sections for the scenarios: its tests
// (those of its samples), its columns and what it says above its table.
type scenario struct {
	title string
	tests []string
	intro string
	cols  []column
	// more are columns after cols that are not medians: what one sample
	// saw, say.
	more []moreColumn
}

type moreColumn struct {
	title string
	cell  func(pr *peerResult) string
}

var scenarios = []scenario{
	{
		title: "TLS passthrough chosen by SNI",
		tests: []string{"sni-up", "sni-down", "sni-connrate", tlsIdleTest, sniIdleTest},
		intro: "One listener, four routes, each chosen by the server name of the ClientHello: caddy-l4's `tls` matcher with `sni` " +
			"before godist or caddy-l4's `proxy`, HAProxy's `req.ssl_sni` after `tcp-request inspect-delay`, nginx's `ssl_preread` " +
			"and a `map`. The backends terminate TLS 1.3 (a self-signed ECDSA certificate made at start, verified by the clients); " +
			"the proxies pass the ciphertext through. Throughput: one connection each way, 256 KiB writes, plaintext bytes counted " +
			"(the ciphertext is 0.14% more). Conns/s: 16 workers, each a full TLS handshake (no resumption), a 64 B echo and a " +
			"close_notify per connection. Idle: `-idle` TLS connections, each after one echoed record, on a freshly started proxy, " +
			"first through a plain route to the same backend (no matcher), then through the SNI route; the baseline subtracted.",
		cols: []column{
			{"up / down MB/s", []string{"sni_up", "sni_down"}, fmtInt},
			{"CPU-s per GB (up/down)", []string{"cpu_sni_up", "cpu_sni_down"}, fmt2},
			{"TLS conns/s", []string{"sni_conns"}, fmtInt},
			{"CPU µs per conn", []string{"cpu_sni_conn"}, fmtInt},
			{"cores, proxy / load tool (conns)", []string{"proxy_core_sni_conns", "load_core_sni_conns"}, fmt2},
			{"RSS per idle conn (plain / SNI route)", []string{"rss_tls_idle", "rss_sni_idle"}, fmtBytes},
			{"fds per idle conn (plain / SNI route)", []string{"fds_tls_idle", "fds_sni_idle"}, fmt2},
		},
	},
	{
		title: "Descriptors after slow readers",
		tests: []string{slowTest, sniSlowTest},
		intro: fmt.Sprintf("%d connections, each downloading %d MiB from a backend that then keeps the connection open and "+
			"quiet, read %d KiB at a time with a %s pause between reads, far slower than the backend writes, so that bytes pile up "+
			"in the proxy; then idle for twice the settle time. Plain TCP on the plain route, TLS through the SNI route, each on "+
			"a freshly started proxy. Descriptors beyond 2 per connection are a count for all %d connections: a pool of pipes, say.",
			slowConns, holdBytes>>20, slowChunk>>10, slowPause, slowConns),
		cols: []column{
			{"fds per idle conn (plain / SNI route)", []string{"fds_slow", "fds_sni_slow"}, fmt2},
			{"fds beyond 2 per conn (plain / SNI route)", []string{"extra_fds_slow", "extra_fds_sni_slow"}, fmtSigned},
			{"RSS per idle conn (plain / SNI route)", []string{"rss_slow", "rss_sni_slow"}, fmtBytes},
			{"download s (plain / SNI route)", []string{"secs_slow", "secs_sni_slow"}, fmt1},
		},
		more: []moreColumn{{"descriptors grown by kind, last repeat (plain; SNI route)", func(pr *peerResult) string {
			return fdsGrewCell(pr, slowTest) + "; " + fdsGrewCell(pr, sniSlowTest)
		}}},
	},
	{
		title: "UDP idle flows",
		tests: []string{udpTest},
		intro: "`-udp-flows` UDP clients, each a socket of its own, send one 64 B datagram through the proxy's UDP listener to " +
			"an echo backend, get it back, and stay silent within the flow timeout (" + udpFlowTimeout + ": the layer4 server's " +
			"`idle_timeout`, nginx's `proxy_timeout`). On a freshly started proxy, the baseline subtracted. Heap is the live heap " +
			"(`HeapAlloc`) after two forced collections (Caddy's `/debug/pprof/heap?gc=1`), stack the goroutine stacks " +
			"(`StackInuse`), both from `/debug/vars`; a Go proxy only.",
		cols: []column{
			{"heap per flow", []string{"udp_heap"}, fmtBytes},
			{"goroutine stack per flow", []string{"udp_stack"}, fmtBytes},
			{"goroutines per flow", []string{"udp_goroutines"}, fmt2},
			{"RSS per flow", []string{"udp_rss"}, fmtBytes},
			{"fds per flow", []string{"udp_fds"}, fmt2},
		},
	},
}

// ran reports whether any peer has a sample of one of the tests.
func ran(results []*peerResult, tests []string) bool {
	for _, pr := range results {
		for _, s := range pr.Samples {
			if slices.Contains(tests, s.Test) {
				return true
			}
		}
	}
	return false
}

// fdsGrewCell lists what the proxy's descriptors grew by, by kind, in the
// last sample of a test: "socket +100, pipe +74".
func fdsGrewCell(pr *peerResult, test string) string {
	var grew map[string]int
	for _, s := range pr.Samples {
		if s.Test == test && s.Failed == "" && s.FDs > 0 {
			grew = s.FDsGrew
		}
	}
	if len(grew) == 0 {
		return "–"
	}
	// sockets first, the connections' own, then the rest by name
	rank := func(k string) int {
		if k == "socket" {
			return 0
		}
		return 1
	}
	kinds := slices.SortedFunc(maps.Keys(grew), func(a, b string) int {
		return cmp.Or(cmp.Compare(rank(a), rank(b)), cmp.Compare(a, b))
	})
	parts := make([]string, len(kinds))
	for i, k := range kinds {
		parts[i] = fmt.Sprintf("%s %+d", k, grew[k])
	}
	return strings.Join(parts, ", ")
}

// scenarioTable is a table of cols and more with a row for each peer with
// a figure in it, each figure written by show.
func scenarioTable(results []*peerResult, cols []column, more []moreColumn, show func(column, stat) string) string {
	var b strings.Builder
	titles := make([]string, 0, len(cols)+len(more))
	for _, c := range cols {
		titles = append(titles, c.title)
	}
	for _, m := range more {
		titles = append(titles, m.title)
	}
	tableHeader(&b, titles)
	for _, pr := range results {
		if pr.Skipped != "" {
			continue
		}
		cells := make([]string, 0, len(titles))
		some := false
		for _, c := range cols {
			cells = append(cells, cell(pr, c, func(st stat) string { return show(c, st) }))
			some = some || cells[len(cells)-1] != "–"
		}
		if !some {
			continue
		}
		for _, m := range more {
			cells = append(cells, m.cell(pr))
		}
		fmt.Fprintf(&b, "| %s | %s |\n", pr.Label, strings.Join(cells, " | "))
	}
	return b.String()
}

// scenarioSections renders the section of each scenario that ran, and
// their goals.
func scenarioSections(rep *report) string {
	var b strings.Builder
	some := false
	for _, sc := range scenarios {
		if !ran(rep.Peers, sc.tests) {
			continue
		}
		some = true
		fmt.Fprintf(&b, "\n## %s\n\n%s\n\n", sc.title, sc.intro)
		b.WriteString(scenarioTable(rep.Peers, sc.cols, sc.more, func(c column, st stat) string { return c.fmt(st.Median) }))
		var left []string
		for _, pr := range rep.Peers {
			if pr.Skipped != "" {
				continue
			}
			for _, t := range sc.tests {
				if why := unsupportedBy(pr.ID, t); why != "" && scenarioPeers[pr.ID] {
					left = append(left, fmt.Sprintf("%s: %s", pr.Label, why))
					break
				}
			}
		}
		if len(left) > 0 {
			b.WriteString("\nNot run: " + strings.Join(left, "; ") + ".\n")
		}
		if rep.Method.Lean {
			b.WriteString("\nQuick mode without `-peers`: godist alone (and caddy-l4's `proxy` for UDP), to try every path.\n")
		}
		if rep.Method.Repeats > 1 {
			fmt.Fprintf(&b, "\nSpread (min–max over %d repeats):\n\n", rep.Method.Repeats)
			b.WriteString(scenarioTable(rep.Peers, sc.cols, nil, func(c column, st stat) string {
				return strings.TrimSuffix(c.fmt(st.Min), " B") + "–" + c.fmt(st.Max)
			}))
		}
	}
	if !some {
		return ""
	}
	var goals []goal
	for _, g := range rep.Goals {
		if g.Section != "" && g.Section != sectionSkew {
			goals = append(goals, g)
		}
	}
	if len(goals) > 0 {
		b.WriteString("\n## Goals (SNI passthrough, slow readers, UDP flows)\n\n" +
			"Godist's medians in this run, against its own plain route or the other peers'; differences under 15% are noise (PEERS.md).\n\n")
		b.WriteString(goalsSection(goals))
	}
	return b.String()
}

// Sections of the scenario goals.
const (
	sectionSNI  = "sni"
	sectionSlow = "slow readers"
	sectionUDP  = "udp"
)

// rssSNIFactor bounds godist's RSS per idle connection on the SNI route by
// its plain route's: the matcher in front may cost at most this much more.
const rssSNIFactor = 1.15

// fdSlack is how many descriptors beyond two per connection a proxy may
// open once for the whole process (a poller made on first use, say) and
// still meet a goal of two per connection.
const fdSlack = 4

// checkScenarioGoals checks godist's goals in the scenarios beyond issue 4.
func checkScenarioGoals(results []*peerResult) []goal {
	byID := map[string]*peerResult{}
	for _, pr := range results {
		if pr.Skipped == "" {
			byID[pr.ID] = pr
		}
	}
	fig := func(id, key string) (float64, bool) {
		if pr := byID[id]; pr != nil {
			return pr.fig(key)
		}
		return 0, false
	}
	var goals []goal
	// relative: godist's key against factor × the reference peer's refKey.
	relative := func(section, text, key, refID, refKey string, factor float64, atLeast bool, unit string) {
		g := goal{Section: section, Text: text}
		v, okV := fig("godist", key)
		ref, okR := fig(refID, refKey)
		switch {
		case !okV:
			g.Status, g.Detail = "not measured", "godist not measured"
		case !okR:
			g.Status, g.Detail = "not measured", refID+" not measured"
		default:
			judge(&g, v, ref*factor, atLeast, unit)
		}
		goals = append(goals, g)
	}
	// twoFDs: godist holds 2 descriptors per idle connection, fdSlack more
	// in all allowed.
	twoFDs := func(section, text, key, test string) {
		g := goal{Section: section, Text: text}
		v, ok := fig("godist", key)
		n := byID["godist"].held(test)
		if !ok || n == 0 {
			g.Status, g.Detail = "not measured", "godist not measured"
			goals = append(goals, g)
			return
		}
		g.Value, g.Bound, g.Margin = v, 2, (2-v)/2
		g.Status = "met"
		extra := (v - 2) * float64(n)
		if extra > fdSlack+0.5 {
			g.Status = "not met"
		}
		g.Detail = fmt.Sprintf("%.2f ≤ 2: %+.0f beyond two descriptors per connection over %d connections (up to %d allowed for the process)",
			v, extra, n, fdSlack)
		goals = append(goals, g)
	}
	relative(sectionSNI, fmt.Sprintf("SNI route: RSS per idle conn ≤ %.2f× godist's plain route (TLS)", rssSNIFactor),
		"rss_sni_idle", "godist", "rss_tls_idle", rssSNIFactor, false, "B")
	twoFDs(sectionSNI, "SNI route: fds per idle conn ≤ 2", "fds_sni_idle", sniIdleTest)
	relative(sectionSNI, "SNI route: CPU per GB up ≤ HAProxy splice forced on it", "cpu_sni_up", "haproxy-splice", "cpu_sni_up", 1, false, "CPU-s/GB")
	relative(sectionSNI, "SNI route: CPU per GB down ≤ HAProxy splice forced on it", "cpu_sni_down", "haproxy-splice", "cpu_sni_down", 1, false, "CPU-s/GB")
	twoFDs(sectionSlow, "after slow readers, plain route: fds per idle conn ≤ 2", "fds_slow", slowTest)
	twoFDs(sectionSlow, "after slow readers, SNI route: fds per idle conn ≤ 2", "fds_sni_slow", sniSlowTest)
	relative(sectionUDP, "UDP: heap per live flow ≤ 1/2 caddy-l4's", "udp_heap", "caddy-l4", "udp_heap", 0.5, false, "B")
	return goals
}

// held is how many connections or flows the peer's samples of a test held,
// or 0 without one.
func (pr *peerResult) held(test string) int {
	if pr == nil {
		return 0
	}
	for _, s := range pr.Samples {
		if s.Test == test && s.Failed == "" {
			return s.IdleConns + s.Flows
		}
	}
	return 0
}
