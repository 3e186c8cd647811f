// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package main

import (
	"fmt"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"
)

// machine describes where a run took place.
type machine struct {
	CPU        string  `json:"cpu"`
	Cores      int     `json:"cores"`
	MemoryGiB  float64 `json:"memory_gib"`
	Kernel     string  `json:"kernel"`
	OS         string  `json:"os"`
	Go         string  `json:"go"`
	Date       string  `json:"date"`
	FDLimit    uint64  `json:"fd_limit"`
	LoadAvg    string  `json:"load_avg_start"`
	LoadAvgEnd string  `json:"load_avg_end"`
}

func describeMachine(fdLimit uint64) machine {
	m := machine{
		Cores:   runtime.NumCPU(),
		Go:      runtime.Version(),
		Date:    time.Now().UTC().Format("2006-01-02 15:04 UTC"),
		FDLimit: fdLimit,
		LoadAvg: loadAvg(),
		CPU:     "unknown",
		Kernel:  "unknown",
		OS:      "unknown",
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.SplitSeq(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPU = strings.TrimSpace(v)
				break
			}
		}
	}
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		if kb, ok := parseStatusKB(b, "MemTotal"); ok {
			m.MemoryGiB = float64(kb) / (1 << 20)
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/etc/os-release"); err == nil {
		for line := range strings.SplitSeq(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "PRETTY_NAME="); ok {
				if u, err := strconv.Unquote(v); err == nil {
					v = u
				}
				m.OS = v
			}
		}
	}
	return m
}

// loadAvg returns the 1, 5 and 15 minute load averages.
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// detailColumns show how busy the two cores were (a core near 1.00 is what
// limited the test) and what a ping-pong message cost the proxy.
var detailColumns = []column{
	{"proxy cores (up8 / down8 / conns / ping-pong)", []string{"proxy_core_up8", "proxy_core_down8", "proxy_core_conns", "proxy_core_rt"}, fmt2},
	{"load-tool cores (up8 / down8 / conns / ping-pong)", []string{"load_core_up8", "load_core_down8", "load_core_conns", "load_core_rt"}, fmt2},
	{"ping-pong round trips/s", []string{"rt"}, fmtInt},
	{"proxy CPU µs per round trip", []string{"cpu_rt"}, fmt2},
}

func renderMarkdown(rep *report) string {
	var b strings.Builder
	m := rep.Machine
	fmt.Fprintf(&b, "# caddy-godist load benchmark\n\n")
	fmt.Fprintf(&b, "Command, from the repository's root: `%s`\n\n", rep.Command)
	fmt.Fprintf(&b, "Machine: %s, %d cores, %.0f GiB, %s, Linux %s, %s, descriptor limit %d; %s. "+
		"Load average %s at the start, %s at the end (the machine may be shared: other processes may have run).\n\n",
		m.CPU, m.Cores, m.MemoryGiB, m.OS, m.Kernel, m.Go, m.FDLimit, m.Date, m.LoadAvg, m.LoadAvgEnd)
	me := rep.Method
	fmt.Fprintf(&b, "Method (shared/PEERS.md): %s.", me.Pinning)
	if ran(rep.Peers, timedTests) {
		fmt.Fprintf(&b, " Each timed test ran %s after a %s warm-up, %d time(s); figures are medians, "+
			"ratios are to direct measured in the same run.", me.Duration, me.Warmup, me.Repeats)
	}
	if ran(rep.Peers, []string{idleTest}) {
		fmt.Fprintf(&b, " Idle test: %d connections, each after one echoed byte, on a freshly started proxy, its baseline subtracted.", me.IdleConns)
	}
	if ran(rep.Peers, []string{tlsIdleTest, sniIdleTest}) {
		fmt.Fprintf(&b, " TLS idle tests: %d connections on each route.", me.IdleConns)
	}
	if ran(rep.Peers, []string{udpTest}) {
		fmt.Fprintf(&b, " UDP test: %d flows.", me.UDPFlows)
	}
	if slices.ContainsFunc(rep.Peers, func(pr *peerResult) bool { return len(pr.Samples) > 0 }) {
		b.WriteString(" CPU is utime+stime of the proxy's processes over the window.")
	}
	if me.Quick {
		b.WriteString(" **Quick mode: a smoke test, not figures to compare.**")
	}
	b.WriteString("\n\n")

	var skipped []string
	for _, pr := range rep.Peers {
		if pr.Skipped != "" {
			skipped = append(skipped, fmt.Sprintf("- %s: %s", pr.Label, pr.Skipped))
		}
	}
	if len(skipped) > 0 {
		b.WriteString("Not measured:\n" + strings.Join(skipped, "\n") + "\n\n")
	}

	if ran(rep.Peers, issue4Tests) {
		b.WriteString(issue4Sections(rep))
	}
	b.WriteString(scenarioSections(rep))
	var skewGoals []goal
	for _, g := range rep.Goals {
		if g.Section == sectionSkew {
			skewGoals = append(skewGoals, g)
		}
	}
	b.WriteString(skewSection(rep.Skew, skewGoals))

	notes := runNotes(rep)
	if len(notes) > 0 {
		b.WriteString("\n## Notes\n\n- " + strings.Join(notes, "\n- ") + "\n")
	}
	return b.String()
}

// issue4Tests are the tests of the issue 4 tables; a run without any (of
// the scenarios alone, say) leaves them out.
var issue4Tests = []string{"up1", "up8", "down1", "down8", "connrate", "pingpong", idleTest}

// issue4Sections are the tables of issue 4's tests and its goals.
func issue4Sections(rep *report) string {
	var b strings.Builder
	me := rep.Method
	b.WriteString("## Figures (medians)\n\n")
	b.WriteString(figuresTable(rep.Peers))
	fmt.Fprintf(&b, "\n## Spread (min–max over %d repeats)\n\n", me.Repeats)
	b.WriteString(spreadTable(rep.Peers))

	var direct, splice *peerResult
	for _, pr := range rep.Peers {
		switch {
		case pr.ID == "direct":
			direct = pr
		case pr.ID == "haproxy-splice" && pr.Skipped == "":
			splice = pr
		}
	}
	b.WriteString("\n## Ratios to direct\n\nEach figure divided by direct's: above 1 is faster than direct for throughput and conns/s, slower for latency.\n\n")
	b.WriteString(ratioTable(rep.Peers, direct, ratioColumns, false))
	if splice != nil {
		b.WriteString("\n## Proxy costs relative to HAProxy with splice forced\n\nEach figure divided by HAProxy (splice forced)'s: below 1 costs less.\n\n")
		b.WriteString(ratioTable(rep.Peers, splice, cpuRatioColumns, false)) // direct has no proxy costs
	}

	b.WriteString("\n## Goals (issue 4)\n\nGodist's medians against the other peers' in this run; differences under 15% are noise (PEERS.md).\n\n")
	b.WriteString(goalsSection(issue4Goals(rep.Goals)))

	b.WriteString("\n## Cores used, and what a small message costs\n\n" +
		"CPU time over the window divided by its length: a core near 1.00 limited the test. " +
		"Ping-pong round trips are 64 B each way; the proxy's CPU per round trip is its cost per small message pair.\n\n")
	titles := make([]string, len(detailColumns))
	for i, c := range detailColumns {
		titles[i] = c.title
	}
	tableHeader(&b, titles)
	for _, pr := range rep.Peers {
		if pr.Skipped != "" {
			continue
		}
		cells := make([]string, len(detailColumns))
		for i, c := range detailColumns {
			cells[i] = cell(pr, c, func(st stat) string { return c.fmt(st.Median) })
		}
		fmt.Fprintf(&b, "| %s | %s |\n", pr.Label, strings.Join(cells, " | "))
	}

	return b.String()
}

// issue4Goals are the goals of issue 4, without the scenarios'.
func issue4Goals(goals []goal) []goal {
	var out []goal
	for _, g := range goals {
		if g.Section == "" {
			out = append(out, g)
		}
	}
	return out
}

// runNotes lists what may have spoiled figures: failed tests, errors, other
// load on the proxy's core.
func runNotes(rep *report) []string {
	notes := append([]string(nil), rep.Warnings...)
	worstOther, worstWhere, retried := 0.0, "", 0
	for _, pr := range rep.Peers {
		for _, s := range pr.Samples {
			where := fmt.Sprintf("%s %s repeat %d", pr.Label, s.Test, s.Repeat)
			if s.Failed != "" {
				notes = append(notes, fmt.Sprintf("%s failed: %s", where, s.Failed))
			} else if s.Errors > 0 {
				notes = append(notes, fmt.Sprintf("%s: %d errors, the first: %s", where, s.Errors, s.Error))
			}
			if s.Retries > 0 {
				retried++
			}
			if s.Spoiled {
				notes = append(notes, fmt.Sprintf("%s: other processes took over %.0f%% of a pinned CPU even after %d re-runs; "+
					"left out of the medians unless every repeat was", where, 100*spoiledOther, s.Retries))
			}
			if name, other := busiestOther(s); other > worstOther {
				worstOther, worstWhere = other, fmt.Sprintf("the %s CPU, %s", name, where)
			}
		}
	}
	if worstWhere != "" {
		notes = append(notes, fmt.Sprintf("Other processes used at most %.0f%% of a pinned CPU during a counted test (%s).",
			100*worstOther, worstWhere))
	}
	if retried > 0 {
		notes = append(notes, fmt.Sprintf("%d tests ran again because other processes used more than %.0f%% of a pinned CPU.",
			retried, 100*rep.Method.MaxOther))
	}
	return notes
}
