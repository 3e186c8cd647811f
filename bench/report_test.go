// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package main

import (
	"os"
	"strings"
	"testing"
	"time"
)

// These tests cover what the benchmark computes and parses; running the
// benchmark itself is `go run ./bench -quick`.

func TestParseProcStat(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    procStat
		wantErr string
	}{
		{
			name: "plain",
			in:   "1234 (caddy) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 100 1000 200",
			want: procStat{ppid: 1, utime: 250, stime: 75},
		},
		{
			name: "a name with spaces and parentheses",
			in:   "77 (nginx: worker (x)) S 76 76 76 0 -1 4194624 5 0 0 0 12 34 0 0 20 0 1 0 9 9 9",
			want: procStat{ppid: 76, utime: 12, stime: 34},
		},
		{name: "no name", in: "1 caddy S", wantErr: "no ')' in stat"},
		{name: "cut short", in: "1 (caddy) S 1 2 3", wantErr: "stat has 4 fields after the name"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseProcStat([]byte(tt.in))
			if tt.wantErr != "" {
				if err == nil || err.Error() != tt.wantErr {
					t.Fatalf("error = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("parseProcStat = %+v, %v; want %+v", got, err, tt.want)
			}
		})
	}
}

func TestParseStatusKB(t *testing.T) {
	status := "Name:\tcaddy\nVmPeak:\t  900000 kB\nVmRSS:\t   41236 kB\nThreads:\t7\n"
	if v, ok := parseStatusKB([]byte(status), "VmRSS"); !ok || v != 41236 {
		t.Fatalf("VmRSS = %d, %v; want 41236", v, ok)
	}
	if _, ok := parseStatusKB([]byte(status), "VmSwap"); ok {
		t.Fatal("found VmSwap, which is not there")
	}
}

func TestSelfMeasures(t *testing.T) {
	// This process's own figures: read, positive, and the tree holds it.
	if tree := processTree(os.Getpid()); len(tree) == 0 || tree[0] != os.Getpid() {
		t.Fatalf("processTree = %v", tree)
	}
	rss, fds, err := treeMemory(os.Getpid())
	if err != nil || rss <= 0 || fds <= 0 {
		t.Fatalf("treeMemory = %d bytes, %d fds, %v", rss, fds, err)
	}
	if _, err := treeCPU(os.Getpid()); err != nil {
		t.Fatalf("treeCPU: %v", err)
	}
	if cpus := readCPUTimes(); len(cpus) == 0 {
		t.Fatal("readCPUTimes found no CPU")
	}
}

func TestPercentile(t *testing.T) {
	hist := make([]uint64, 10)
	hist[2] = 50 // 50 samples of 2 µs
	hist[5] = 49 // 49 of 5 µs
	hist[9] = 1  // one of 9 µs
	tests := []struct {
		q    float64
		want float64
	}{{0, 2}, {0.5, 5}, {0.98, 5}, {0.99, 9}, {1, 9}}
	for _, tt := range tests {
		if got := percentile(hist, 100, tt.q); got != tt.want {
			t.Errorf("percentile(%v) = %v, want %v", tt.q, got, tt.want)
		}
	}
}

func TestSummarize(t *testing.T) {
	tests := []struct {
		name string
		in   []float64
		want stat
	}{
		{"none", nil, stat{}},
		{"odd", []float64{3, 1, 2}, stat{Median: 2, Min: 1, Max: 3, N: 3}},
		{"even", []float64{4, 1, 2, 3}, stat{Median: 2.5, Min: 1, Max: 4, N: 4}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := summarize(tt.in); got != tt.want {
				t.Fatalf("summarize(%v) = %+v, want %+v", tt.in, got, tt.want)
			}
		})
	}
}

func TestParseFlags(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		check   func(t *testing.T, o options)
		wantErr string
	}{
		{name: "defaults", args: nil, check: func(t *testing.T, o options) {
			if o.duration != 5*time.Second || o.warmup != 500*time.Millisecond || o.repeats != 3 || o.idleConns != 4000 || o.name != "latest" {
				t.Fatalf("defaults = %+v", o)
			}
			if len(o.peers) != len(peerIDs) {
				t.Fatalf("peers = %v, want all", o.peers)
			}
			if o.skewFactor != 1.25 || !o.tests[skewTest] {
				t.Fatalf("skew factor %v, skew test %v; want 1.25, on", o.skewFactor, o.tests[skewTest])
			}
		}},
		{name: "skew alone", args: []string{"-tests", "skew", "-skew-factor", "1.5"}, check: func(t *testing.T, o options) {
			if len(o.tests) != 1 || !o.tests[skewTest] || o.skewFactor != 1.5 {
				t.Fatalf("tests %v, skew factor %v", o.tests, o.skewFactor)
			}
		}},
		{name: "quick", args: []string{"-quick"}, check: func(t *testing.T, o options) {
			if o.duration != time.Second || o.repeats != 1 || o.idleConns != 500 || o.name != "quick" || o.retries != 0 || o.quietWait != 0 {
				t.Fatalf("quick = %+v", o)
			}
		}},
		{name: "quick keeps what is set", args: []string{"-quick", "-repeats", "2"}, check: func(t *testing.T, o options) {
			if o.repeats != 2 || o.duration != time.Second {
				t.Fatalf("quick -repeats 2 = %+v", o)
			}
		}},
		{name: "some peers, direct always", args: []string{"-peers", "godist,nginx"}, check: func(t *testing.T, o options) {
			if len(o.peers) != 3 || !o.peers["direct"] || !o.peers["godist"] || !o.peers["nginx"] {
				t.Fatalf("peers = %v", o.peers)
			}
		}},
		{name: "quick runs the scenarios lean", args: []string{"-quick"}, check: func(t *testing.T, o options) {
			if !o.lean || o.udpFlows != 500 {
				t.Fatalf("quick: lean %v, udp flows %d; want lean, 500", o.lean, o.udpFlows)
			}
		}},
		{name: "quick with peers is not lean", args: []string{"-quick", "-peers", "godist,haproxy"}, check: func(t *testing.T, o options) {
			if o.lean {
				t.Fatal("quick -peers is lean")
			}
		}},
		{name: "full run", args: []string{"-udp-flows", "100"}, check: func(t *testing.T, o options) {
			if o.lean || o.udpFlows != 100 || len(o.tests) != len(allTests()) {
				t.Fatalf("lean %v, udp flows %d, %d tests", o.lean, o.udpFlows, len(o.tests))
			}
		}},
		{name: "the sni alias", args: []string{"-tests", "sni,udp-idle"}, check: func(t *testing.T, o options) {
			want := []string{"sni-up", "sni-down", "sni-connrate", "sni-idle", "udp-idle"}
			for _, w := range want {
				if !o.tests[w] {
					t.Errorf("tests lack %s: %v", w, o.tests)
				}
			}
			if len(o.tests) != len(want) {
				t.Errorf("tests = %v, want %v", o.tests, want)
			}
		}},
		{name: "no UDP flow", args: []string{"-udp-flows", "0"}, wantErr: "-udp-flows 0: must be at least 1"},
		{name: "unknown peer", args: []string{"-peers", "envoy"}, wantErr: `-peers: unknown "envoy"`},
		{name: "unknown test", args: []string{"-tests", "up2"}, wantErr: `-tests: unknown "up2"`},
		{name: "short duration", args: []string{"-duration", "10ms"}, wantErr: "-duration 10ms: must be at least 100ms"},
		{name: "no repeats", args: []string{"-repeats", "0"}, wantErr: "-repeats 0: must be 1 to 100"},
		{name: "skew factor of 1", args: []string{"-skew-factor", "1"}, wantErr: "-skew-factor 1: must be above 1 and at most 10"},
		{name: "skew factor in thousandths", args: []string{"-skew-factor", "1.255"}, wantErr: "-skew-factor 1.255: must be in hundredths"},
		{name: "stray argument", args: []string{"now"}, wantErr: `unexpected argument "now"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			o, err := parseFlags(tt.args)
			if tt.wantErr != "" {
				if err == nil || !strings.HasPrefix(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want it to start with %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			tt.check(t, o)
		})
	}
}

// result builds a peer's result from one sample per test.
func result(id string, samples ...sample) *peerResult {
	pr := &peerResult{ID: id, Label: id, Samples: samples}
	pr.computeFigures()
	return pr
}

func bulk(test string, mbPerS, cpuPerGB float64) sample {
	bytes := int64(mbPerS * 1e6)
	return sample{Test: test, Seconds: 1, Bytes: bytes, ProxyCPU: cpuPerGB * float64(bytes) / 1e9}
}

func peerSamples(mb, cpuGB, conns, cpuConnUS, p99 float64, rssPerConn int64) []sample {
	return []sample{
		bulk("up1", mb, cpuGB), bulk("up8", mb, cpuGB), bulk("down1", mb, cpuGB), bulk("down8", mb, cpuGB),
		{Test: "connrate", Seconds: 1, Conns: int64(conns), ProxyCPU: cpuConnUS * conns / 1e6},
		{Test: "pingpong", Seconds: 1, RoundTrips: 100, P50us: p99 / 2, P99us: p99},
		{Test: "idle", IdleConns: 1000, RSSBase: 1 << 20, RSS: 1<<20 + 1000*rssPerConn, FDsBase: 10, FDs: 2010},
	}
}

func TestComputeFigures(t *testing.T) {
	pr := result("godist", peerSamples(2000, 0.25, 10000, 80, 500, 3000)...)
	want := map[string]float64{
		"up1": 2000, "down8": 2000, "cpu_up1": 0.25, "conns": 10000, "cpu_conn": 80,
		"p50": 250, "p99": 500, "rss_idle": 3000, "fds_idle": 2,
	}
	for k, w := range want {
		if got, ok := pr.fig(k); !ok || !near(got, w) {
			t.Errorf("%s = %v (%v), want %v", k, got, ok, w)
		}
	}
	// direct has no proxy, so no proxy costs, whatever its samples say
	direct := result("direct", peerSamples(4000, 0, 12000, 0, 300, 0)...)
	for _, k := range []string{"cpu_up1", "cpu_conn", "rss_idle", "fds_idle"} {
		if _, ok := direct.fig(k); ok {
			t.Errorf("direct has a %s figure", k)
		}
	}
	// a sample spoiled by other load counts only when every one is
	mixed := result("x",
		sample{Test: "up1", Seconds: 1, Bytes: 1e9},
		sample{Test: "up1", Seconds: 1, Bytes: 1e8, Spoiled: true},
		sample{Test: "down1", Seconds: 1, Bytes: 1e8, Spoiled: true})
	if st := mixed.Figures["up1"]; st.N != 1 || st.Median != 1000 {
		t.Errorf("up1 with one spoiled sample = %+v, want the clean one alone", st)
	}
	if st := mixed.Figures["down1"]; st.N != 1 || st.Median != 100 {
		t.Errorf("down1, all spoiled = %+v, want the spoiled one", st)
	}
	// a failed sample gives no figure
	failed := result("x", sample{Test: "up1", Seconds: 1, Bytes: 1e9, Failed: "proxy exited"})
	if _, ok := failed.fig("up1"); ok {
		t.Error("a failed sample gave a figure")
	}
}

func near(a, b float64) bool { return a-b < 1e-6*b+1e-9 && b-a < 1e-6*b+1e-9 }

func TestCheckGoals(t *testing.T) {
	results := []*peerResult{
		result("direct", peerSamples(4000, 0, 12000, 0, 300, 0)...),
		// godist: as fast as HAProxy, cheaper per GB, 80 µs per conn
		result("godist", peerSamples(2000, 0.20, 10000, 80, 500, 3000)...),
		result("caddy-l4", peerSamples(700, 1.2, 7000, 130, 700, 35000)...),
		result("haproxy-splice", peerSamples(2100, 0.25, 11000, 78, 550, 3400)...),
		{ID: "haproxy", Label: "HAProxy default", Skipped: "haproxy not installed"},
	}
	goals := checkGoals(results)
	status := map[string]string{}
	detail := map[string]string{}
	for _, g := range goals {
		status[g.Text], detail[g.Text] = g.Status, g.Detail
	}
	want := map[string]string{
		"throughput up1 ≥ HAProxy splice forced":         "not met", // 2000 < 2100
		"throughput up1 ≥ 3× caddy-l4":                   "not met", // 2000 < 2100
		"CPU per GB down8 ≤ HAProxy splice forced":       "met",
		"CPU per conn ≤ godist (2013), 95 µs (PEERS.md)": "met",
		"CPU per conn ≤ 0.75× caddy-l4":                  "met", // 80 ≤ 97.5
		"conns/s ≥ 1.3× caddy-l4":                        "met", // 10000 ≥ 9100
		"ping-pong p99 ≤ HAProxy splice forced":          "met", // 500 ≤ 550
		"ping-pong p99 ≤ HAProxy default":                "not measured",
		"fds per idle conn ≤ 2":                          "met",
		"RSS per idle conn ≤ 1/3 caddy-l4":               "met", // 3000 ≤ 11667
	}
	for text, w := range want {
		if status[text] != w {
			t.Errorf("%s: %s (%s), want %s", text, status[text], detail[text], w)
		}
	}
	if d := detail["throughput up1 ≥ HAProxy splice forced"]; d != "2000 MB/s ≥ 2100 MB/s (-5%), within noise" {
		t.Errorf("detail = %q", d)
	}
	if d := detail["ping-pong p99 ≤ HAProxy default"]; d != "haproxy not measured" {
		t.Errorf("detail of an absent peer = %q", d)
	}
	if len(goals) != 17 {
		t.Errorf("%d goals, want 17", len(goals))
	}
}

func TestRenderMarkdown(t *testing.T) {
	rep := &report{
		Command: "go run ./bench -quick",
		Machine: machine{CPU: "Test CPU", Cores: 2, Kernel: "6.1", Go: "go1.26.8"},
		Method:  method{Duration: "1s", Warmup: "250ms", Repeats: 1, IdleConns: 500, Pinning: "pinned", Quick: true},
		Peers: []*peerResult{
			result("direct", peerSamples(4000, 0, 12000, 0, 300, 0)...),
			result("godist", peerSamples(2000, 0.20, 10000, 80, 500, 3000)...),
			{ID: "nginx", Label: "nginx 1.22 stream", Skipped: "nginx not installed: " + installHint},
		},
	}
	rep.Goals = checkGoals(rep.Peers)
	md := renderMarkdown(rep)
	for _, want := range []string{
		"`go run ./bench -quick`",
		"Test CPU, 2 cores",
		"- nginx 1.22 stream: nginx not installed: bench/install-peers.sh",
		"| direct | 4000 / 4000 | 4000 / 4000 | – | 12000 | – | 150 / 300 | – | – |",
		"| godist | 2000 / 2000 | 2000 / 2000 | 0.20/0.20/0.20/0.20 | 10000 | 80 | 250 / 500 | 3000 B | 2.00 |",
		"| godist | 0.50 / 0.50 | 0.50 / 0.50 | 0.83 | 1.67 / 1.67 |",
		"**Quick mode",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
}
