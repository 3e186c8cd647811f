// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package main

import (
	"strings"
	"testing"
)

// Samples of the scenarios, as the tests record them.

func sniSamples(upMB, downMB, cpuGB, conns, cpuConnUS float64, rssPlain, rssSNI int64, n int) []sample {
	return []sample{
		bulk("sni-up", upMB, cpuGB), bulk("sni-down", downMB, cpuGB),
		{Test: "sni-connrate", Seconds: 1, Conns: int64(conns), ProxyCPU: cpuConnUS * conns / 1e6, LoadCPU: 0.9},
		{Test: tlsIdleTest, IdleConns: n, RSSBase: 1 << 20, RSS: 1<<20 + int64(n)*rssPlain, FDsBase: 10, FDs: 10 + 2*n},
		{Test: sniIdleTest, IdleConns: n, RSSBase: 1 << 20, RSS: 1<<20 + int64(n)*rssSNI, FDsBase: 10, FDs: 10 + 2*n + 1},
	}
}

func slowSamples(extraPlain, extraSNI int) []sample {
	return []sample{
		{Test: slowTest, IdleConns: slowConns, Seconds: 0.5, RSSBase: 1 << 20, RSS: 1<<20 + slowConns*4096,
			FDsBase: 10, FDs: 10 + 2*slowConns + extraPlain, FDsGrew: map[string]int{"socket": 2 * slowConns, "eventpoll": extraPlain}},
		{Test: sniSlowTest, IdleConns: slowConns, Seconds: 0.7, RSSBase: 1 << 20, RSS: 1<<20 + slowConns*8192,
			FDsBase: 10, FDs: 10 + 2*slowConns + extraSNI, FDsGrew: map[string]int{"socket": 2 * slowConns, "pipe": extraSNI}},
	}
}

func udpSample(flows int, heapPerFlow int64, goProxy bool) sample {
	s := sample{Test: udpTest, Flows: flows, RSSBase: 1 << 20, RSS: 1<<20 + int64(flows)*20000, FDsBase: 10, FDs: 10 + flows}
	if goProxy {
		s.Go = &goStats{HeapAlloc: 4 << 20, StackInuse: 1 << 20, Goroutines: 30}
		s.GoLoaded = &goStats{HeapAlloc: 4<<20 + int64(flows)*heapPerFlow, StackInuse: 1<<20 + int64(flows)*8192, Goroutines: 30 + 2*flows}
	}
	return s
}

func TestScenarioFigures(t *testing.T) {
	samples := append(sniSamples(400, 600, 0.5, 1000, 300, 9000, 25000, 500), slowSamples(1, 74)...)
	samples = append(samples, udpSample(500, 40000, true))
	pr := result("godist", samples...)
	want := map[string]float64{
		"sni_up": 400, "sni_down": 600, "cpu_sni_up": 0.5, "cpu_sni_down": 0.5, "sni_conns": 1000, "cpu_sni_conn": 300,
		"load_core_sni_conns": 0.9,
		"rss_tls_idle":        9000, "rss_sni_idle": 25000, "fds_tls_idle": 2, "fds_sni_idle": 2.002,
		"fds_slow": 2.02, "fds_sni_slow": 3.48, "extra_fds_slow": 1, "extra_fds_sni_slow": 74,
		"rss_slow": 4096, "rss_sni_slow": 8192, "secs_slow": 0.5, "secs_sni_slow": 0.7,
		"udp_heap": 40000, "udp_stack": 8192, "udp_goroutines": 2, "udp_rss": 20000, "udp_fds": 1,
	}
	for k, w := range want {
		if got, ok := pr.fig(k); !ok || !near(got, w) {
			t.Errorf("%s = %v (%v), want %v", k, got, ok, w)
		}
	}
	// a proxy that is not a Go program has no heap figures, but the rest
	nginx := result("nginx", udpSample(500, 0, false))
	if _, ok := nginx.fig("udp_heap"); ok {
		t.Error("nginx has a heap figure")
	}
	if got, ok := nginx.fig("udp_fds"); !ok || got != 1 {
		t.Errorf("nginx udp_fds = %v (%v), want 1", got, ok)
	}
	// direct has throughput and conns/s on the SNI tests, no proxy costs
	direct := result("direct", sniSamples(700, 700, 0, 800, 0, 0, 0, 500)...)
	if _, ok := direct.fig("sni_up"); !ok {
		t.Error("direct has no sni_up")
	}
	for _, k := range []string{"cpu_sni_up", "cpu_sni_conn", "rss_sni_idle"} {
		if _, ok := direct.fig(k); ok {
			t.Errorf("direct has a %s figure", k)
		}
	}
}

func TestCheckScenarioGoals(t *testing.T) {
	tests := []struct {
		name    string
		results []*peerResult
		want    map[string]string // goal text → status
		details map[string]string // goal text → detail, where it matters
	}{
		{
			name: "godist with a matcher's cost, pipes kept after slow readers, a heavy UDP flow",
			results: []*peerResult{
				result("direct", sniSamples(700, 700, 0, 800, 0, 0, 0, 500)...),
				result("godist", append(append(sniSamples(400, 600, 0.5, 1000, 300, 9000, 25000, 500), slowSamples(3, 74)...),
					udpSample(500, 138000, true))...),
				result("caddy-l4", udpSample(500, 47000, true)),
				result("haproxy-splice", sniSamples(500, 500, 0.6, 1000, 200, 3400, 3500, 500)...),
			},
			want: map[string]string{
				"SNI route: RSS per idle conn ≤ 1.15× godist's plain route (TLS)": "not met", // 25000 > 10350
				"SNI route: fds per idle conn ≤ 2":                                "met",     // one descriptor beyond: the process's
				"SNI route: CPU per GB up ≤ HAProxy splice forced on it":          "met",     // 0.5 ≤ 0.6
				"after slow readers, plain route: fds per idle conn ≤ 2":          "met",     // 3 ≤ fdSlack
				"after slow readers, SNI route: fds per idle conn ≤ 2":            "not met", // 74: a pool
				"UDP: heap per live flow ≤ 1/2 caddy-l4's":                        "not met", // 138000 > 23500
			},
			details: map[string]string{
				"SNI route: RSS per idle conn ≤ 1.15× godist's plain route (TLS)": "25000 B ≤ 10350 B (-142%)",
				"after slow readers, SNI route: fds per idle conn ≤ 2": "3.48 ≤ 2: +74 beyond two descriptors per connection " +
					"over 50 connections (up to 4 allowed for the process)",
			},
		},
		{
			name: "all met",
			results: []*peerResult{
				result("godist", append(append(sniSamples(400, 600, 0.2, 1000, 300, 9000, 9500, 500), slowSamples(0, 1)...),
					udpSample(500, 10000, true))...),
				result("caddy-l4", udpSample(500, 47000, true)),
				result("haproxy-splice", sniSamples(500, 500, 0.3, 1000, 200, 3400, 3500, 500)...),
			},
			want: map[string]string{
				"SNI route: RSS per idle conn ≤ 1.15× godist's plain route (TLS)": "met",
				"SNI route: CPU per GB down ≤ HAProxy splice forced on it":        "met",
				"after slow readers, SNI route: fds per idle conn ≤ 2":            "met",
				"UDP: heap per live flow ≤ 1/2 caddy-l4's":                        "met",
			},
		},
		{
			name: "peers missing",
			results: []*peerResult{
				result("godist", sniSamples(400, 600, 0.2, 1000, 300, 9000, 9500, 500)...),
				{ID: "haproxy-splice", Label: "HAProxy", Skipped: "haproxy not installed"},
			},
			want: map[string]string{
				"SNI route: RSS per idle conn ≤ 1.15× godist's plain route (TLS)": "met",
				"SNI route: CPU per GB up ≤ HAProxy splice forced on it":          "not measured",
				"after slow readers, plain route: fds per idle conn ≤ 2":          "not measured",
				"UDP: heap per live flow ≤ 1/2 caddy-l4's":                        "not measured",
			},
			details: map[string]string{
				"SNI route: CPU per GB up ≤ HAProxy splice forced on it": "haproxy-splice not measured",
				"after slow readers, plain route: fds per idle conn ≤ 2": "godist not measured",
				"UDP: heap per live flow ≤ 1/2 caddy-l4's":               "godist not measured",
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			goals := checkScenarioGoals(tt.results)
			if len(goals) != 7 {
				t.Fatalf("%d goals, want 7", len(goals))
			}
			status, detail := map[string]string{}, map[string]string{}
			for _, g := range goals {
				if g.Section == "" {
					t.Errorf("goal %q has no section", g.Text)
				}
				status[g.Text], detail[g.Text] = g.Status, g.Detail
			}
			for text, w := range tt.want {
				if status[text] != w {
					t.Errorf("%s: %s (%s), want %s", text, status[text], detail[text], w)
				}
			}
			for text, w := range tt.details {
				if detail[text] != w {
					t.Errorf("%s: detail %q, want %q", text, detail[text], w)
				}
			}
		})
	}
}

func TestParseMemstats(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    goStats
		wantErr string
	}{
		{
			name: "expvar",
			in:   `{"cmdline":["caddy","run"],"memstats":{"Alloc":5,"HeapAlloc":4194304,"HeapInuse":5242880,"StackInuse":1048576,"NumGC":3}}`,
			want: goStats{HeapAlloc: 4 << 20, HeapInuse: 5 << 20, StackInuse: 1 << 20},
		},
		{name: "no memstats", in: `{"cmdline":["caddy"]}`, wantErr: "/debug/vars: no memstats"},
		{name: "not JSON", in: `<html>`, wantErr: "/debug/vars: invalid character"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseMemstats([]byte(tt.in))
			if tt.wantErr != "" {
				if err == nil || !strings.HasPrefix(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("parseMemstats = %+v, %v; want %+v", got, err, tt.want)
			}
		})
	}
}

func TestParseGoroutineTotal(t *testing.T) {
	tests := []struct {
		in      string
		want    int
		wantErr string
	}{
		{in: "goroutine profile: total 1503\n1000 @ 0x1 0x2\n#\t0x1\truntime.gopark+0x1\n", want: 1503},
		{in: "goroutine 1 [running]:\nmain.main()\n", wantErr: `/debug/pprof/goroutine: first line "goroutine 1 [running]:"`},
		{in: "goroutine profile: total many\n", wantErr: "/debug/pprof/goroutine: total: "},
	}
	for _, tt := range tests {
		got, err := parseGoroutineTotal([]byte(tt.in))
		if tt.wantErr != "" {
			if err == nil || !strings.HasPrefix(err.Error(), tt.wantErr) {
				t.Errorf("%q: error = %v, want %q", tt.in, err, tt.wantErr)
			}
			continue
		}
		if err != nil || got != tt.want {
			t.Errorf("%q: %d, %v; want %d", tt.in, got, err, tt.want)
		}
	}
}

func TestFDKind(t *testing.T) {
	for target, want := range map[string]string{
		"socket:[123456]":        "socket",
		"pipe:[98765]":           "pipe",
		"anon_inode:[eventpoll]": "eventpoll",
		"anon_inode:[eventfd]":   "eventfd",
		"anon_inode:inotify":     "inotify",
		"/dev/null":              "file",
		"/tmp/a:[b]":             "file",
	} {
		if got := fdKind(target); got != want {
			t.Errorf("fdKind(%q) = %q, want %q", target, got, want)
		}
	}
}

func TestFDsGrewCell(t *testing.T) {
	pr := result("godist", slowSamples(1, 74)...)
	if got, want := fdsGrewCell(pr, sniSlowTest), "socket +100, pipe +74"; got != want {
		t.Errorf("SNI route = %q, want %q", got, want)
	}
	if got, want := fdsGrewCell(pr, slowTest), "socket +100, eventpoll +1"; got != want {
		t.Errorf("plain route = %q, want %q", got, want)
	}
	if got := fdsGrewCell(pr, udpTest); got != "–" {
		t.Errorf("no sample = %q, want –", got)
	}
}

func TestUnsupported(t *testing.T) {
	tests := []struct {
		id, test, want string
	}{
		{"haproxy", udpTest, "HAProxy proxies no UDP"},
		{"haproxy-splice", sniSlowTest, ""},
		{"nginx", udpTest, ""},
		{"godist3", "sni-up", "not run: it would repeat godist's figures"},
		{"godist3", "up1", ""},
		{"direct", "sni-connrate", ""},
	}
	for _, tt := range tests {
		if got := unsupportedBy(tt.id, tt.test); got != tt.want {
			t.Errorf("unsupportedBy(%s, %s) = %q, want %q", tt.id, tt.test, got, tt.want)
		}
	}
}

func TestRenderScenarios(t *testing.T) {
	rep := &report{
		Command: "go run ./bench -tests sni,slow-idle,udp-idle",
		Machine: machine{CPU: "Test CPU", Cores: 2},
		Method:  method{Duration: "5s", Warmup: "500ms", Repeats: 1, IdleConns: 500, UDPFlows: 500, Pinning: "pinned"},
		Peers: []*peerResult{
			result("direct", sniSamples(700, 700, 0, 800, 0, 0, 0, 500)...),
			result("godist", append(append(sniSamples(400, 600, 0.5, 1000, 300, 9000, 25000, 500), slowSamples(1, 74)...),
				udpSample(500, 138000, true))...),
			result("haproxy", append(sniSamples(500, 500, 0.6, 1000, 200, 3400, 3500, 500), slowSamples(0, 0)...)...),
			result("nginx", udpSample(500, 0, false)),
		},
	}
	rep.Goals = append(checkGoals(rep.Peers), checkScenarioGoals(rep.Peers)...)
	md := renderMarkdown(rep)
	for _, want := range []string{
		"UDP test: 500 flows.",
		"## TLS passthrough chosen by SNI",
		"| direct | 700 / 700 | – | 800 | – | – / 0.90 | – | – |",
		"| godist | 400 / 600 | 0.50/0.50 | 1000 | 300 | 0.30 / 0.90 | 9000 B / 25000 B | 2.00 / 2.00 |",
		"## Descriptors after slow readers",
		"| godist | 2.02 / 3.48 | +1 / +74 | 4096 B / 8192 B | 0.5 / 0.7 | socket +100, eventpoll +1; socket +100, pipe +74 |",
		"| haproxy | 2.00 / 2.00 | +0 / +0 |",
		"## UDP idle flows",
		"| godist | 138000 B | 8192 B | 2.00 | 20000 B | 1.00 |",
		"| nginx | – | – | – | 20000 B | 1.00 |",
		"Not run: haproxy: HAProxy proxies no UDP.",
		"## Goals (SNI passthrough, slow readers, UDP flows)",
		"- ❌ SNI route: RSS per idle conn ≤ 1.15× godist's plain route (TLS): **not met**: 25000 B ≤ 10350 B (-142%)",
		"- ❔ UDP: heap per live flow ≤ 1/2 caddy-l4's: **not measured**: caddy-l4 not measured",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
	// without a test of issue 4, none of its tables or goals
	for _, absent := range []string{"## Figures (medians)", "## Goals (issue 4)", "## Ratios to direct"} {
		if strings.Contains(md, absent) {
			t.Errorf("markdown has %q with no issue 4 test run", absent)
		}
	}
	// and a run of issue 4's tests alone has no scenario section
	rep4 := &report{Method: method{Repeats: 1}, Peers: []*peerResult{
		result("direct", peerSamples(4000, 0, 12000, 0, 300, 0)...),
		result("godist", peerSamples(2000, 0.2, 10000, 80, 500, 3000)...),
	}}
	rep4.Goals = append(checkGoals(rep4.Peers), checkScenarioGoals(rep4.Peers)...)
	md4 := renderMarkdown(rep4)
	if !strings.Contains(md4, "## Goals (issue 4)") || strings.Contains(md4, "SNI") || strings.Contains(md4, "UDP") {
		t.Errorf("issue 4 alone:\n%s", md4)
	}
}
