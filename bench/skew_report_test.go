// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package main

import (
	"encoding/json"
	"math"
	"strings"
	"testing"
	"time"

	godist "github.com/bcca9c24/caddy-godist"
)

func TestLoadStats(t *testing.T) {
	samples := [][]int64{
		{0, 0, 0, 0},     // nothing open: left out
		{10, 10, 10, 10}, // max/avg 1, excess 10 − 12.5
		{20, 10, 5, 5},   // avg 10: 2.0, excess 20 − 12.5 = 7.5: over
		{14, 10, 8, 8},   // avg 10: 1.4, excess 1.5: over
		{13, 9, 9, 9},    // avg 10: 1.3, excess 0.5: within the one of rounding
	}
	st := loadStats(samples, 1.25)
	want := skewLoadStats{Samples: 4, WorstRatio: 2, MeanRatio: (1 + 2 + 1.4 + 1.3) / 4, Over: 2, WorstExcess: 7.5, MeanActive: 40,
		MeanLoads: []float64{57.0 / 4, 39.0 / 4, 32.0 / 4, 32.0 / 4}}
	if st.Samples != want.Samples || st.Over != want.Over || !near(st.WorstRatio, want.WorstRatio) || !near(st.MeanRatio, want.MeanRatio) ||
		!near(st.WorstExcess, want.WorstExcess) || !near(st.MeanActive, want.MeanActive) {
		t.Errorf("loadStats = %+v, want %+v", st, want)
	}
	for i := range want.MeanLoads {
		if !near(st.MeanLoads[i], want.MeanLoads[i]) {
			t.Errorf("mean load %d = %v, want %v", i, st.MeanLoads[i], want.MeanLoads[i])
		}
	}
	if empty := loadStats(nil, 1.25); empty.Samples != 0 || empty.WorstExcess != 0 {
		t.Errorf("no samples: %+v", empty)
	}
}

func TestAffinity(t *testing.T) {
	ms := time.Millisecond
	sched := []arrival{
		{at: 5 * ms, key: 0},  // in the warm-up: not counted
		{at: 10 * ms, key: 0}, // hot key, at home
		{at: 11 * ms, key: 0}, // hot key, elsewhere
		{at: 12 * ms, key: 1}, // elsewhere
		{at: 13 * ms, key: 2}, // at home
		{at: 14 * ms, key: 2}, // failed: not counted
	}
	backend := []int{3, 0, 1, 0, 2, -1}
	homes := []int{0, 1, 2}
	conns, lost, hotConns, hotLost := affinity(sched, backend, homes, jsonDuration(10*ms))
	if conns != 4 || lost != 2 || hotConns != 2 || hotLost != 1 {
		t.Errorf("affinity = %d, %d, %d, %d; want 4, 2, 2, 1", conns, lost, hotConns, hotLost)
	}
}

func TestKeysMovedAndLeastLost(t *testing.T) {
	shares := []float64{0.5, 0.2, 0.2, 0.1}
	keys, load := keysMoved([]int{0, 1, 2, 3}, []int{0, 4, 2, 4}, shares)
	if !near(keys, 0.5) || !near(load, 0.3) {
		t.Errorf("keysMoved = %v, %v; want 0.5, 0.3", keys, load)
	}
	if k, l := keysMoved(nil, nil, nil); k != 0 || l != 0 {
		t.Errorf("keysMoved of nothing = %v, %v", k, l)
	}
	tests := []struct {
		name  string
		homes []int
		want  float64
	}{
		// c/n = 0.3125: backend 0 holds 0.5, 0.1875 over
		{name: "one hot backend", homes: []int{0, 1, 2, 3}, want: 0.1875},
		// 0.7 on backend 0: 0.3875 over
		{name: "two keys on one", homes: []int{0, 0, 2, 3}, want: 0.3875},
		// 0.5 and 0.4 (the 0.2s together, and the 0.1): 0.1875 + 0.0875
		{name: "two over", homes: []int{0, 1, 1, 2}, want: 0.1875 + 0.0875},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := leastLost(tt.homes, shares, 4, 1.25); !near(got, tt.want) {
				t.Errorf("leastLost = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestSkewMix(t *testing.T) {
	cdf := skewCDF(1000, 1, 0.3)
	shares := keyShares(cdf)
	sum := 0.0
	for i, s := range shares {
		if s <= 0 {
			t.Fatalf("key %d has share %v", i, s)
		}
		sum += s
	}
	if !near(sum, 1) || !near(shares[0], 0.3) || !near(cdf[len(cdf)-1], 1) {
		t.Errorf("shares sum to %v, hot key %v, cdf ends at %v", sum, shares[0], cdf[len(cdf)-1])
	}
	// Zipf of exponent 1 over the rest: key i in proportion to 1/i
	if r := shares[1] / shares[4]; math.Abs(r-4) > 1e-9 {
		t.Errorf("share of key 1 / key 4 = %v, want 4", r)
	}
	if one := skewCDF(1, 1, 0.3); len(one) != 1 || one[0] != 1 {
		t.Errorf("one key: %v", one)
	}
}

func TestSkewSchedule(t *testing.T) {
	p := skewParams{Keys: 100, HotShare: 0.3, ZipfS: 1, Rate: 1000, MeanLife: jsonDuration(100 * time.Millisecond),
		Warmup: jsonDuration(time.Second), Measure: jsonDuration(9 * time.Second), Seed: skewSeed}
	a, b := skewSchedule(p), skewSchedule(p)
	if len(a) != len(b) {
		t.Fatalf("two schedules of one seed: %d and %d arrivals", len(a), len(b))
	}
	for i := range a {
		if a[i] != b[i] {
			t.Fatalf("arrival %d: %+v and %+v", i, a[i], b[i])
		}
	}
	// 10 s at 1000/s; Poisson: within 5 standard deviations (√10000)
	if n := len(a); math.Abs(float64(n)-10000) > 500 {
		t.Errorf("%d arrivals, want about 10000", n)
	}
	hot, prev := 0, time.Duration(0)
	for _, x := range a {
		switch {
		case x.at < prev || x.at >= 10*time.Second:
			t.Fatalf("arrival at %s after %s, or past the end", x.at, prev)
		case x.life < 0 || x.life > 500*time.Millisecond:
			t.Fatalf("life %s beyond 5× the mean", x.life)
		case x.key < 0 || x.key >= p.Keys:
			t.Fatalf("key %d", x.key)
		}
		prev = x.at
		if x.key == 0 {
			hot++
		}
	}
	if s := float64(hot) / float64(len(a)); math.Abs(s-0.3) > 0.02 {
		t.Errorf("the hot key made %.3f of the arrivals, want 0.3", s)
	}
}

// TestRendezvousHomes checks the benchmark's own reading of godist's
// hashing against godist's picker, under `hash_key ip`.
func TestRendezvousHomes(t *testing.T) {
	dials := []string{"127.2.0.1:7207", "127.2.0.2:7207", "127.2.0.3:7207", "127.2.0.4:7207"}
	ups := make([]godist.PickerUpstream, len(dials))
	for i, d := range dials {
		ups[i] = godist.PickerUpstream{Dial: d, Weight: 1}
	}
	p := godist.NewPicker(ups)
	homes := rendezvousHomes(dials, 1000)
	count := make([]int, len(dials))
	for k, h := range homes {
		if want := p.Pick(skewKeyIP(k).String(), nil); h != want {
			t.Fatalf("key %s: %d, godist picks %d", skewKeyIP(k), h, want)
		}
		count[h]++
	}
	for i, c := range count {
		if c < 200 || c > 300 {
			t.Errorf("backend %d is the first choice of %d of 1000 keys", i, c)
		}
	}
}

func TestSkewKeyIP(t *testing.T) {
	for k, want := range map[int]string{0: "127.1.0.1", 254: "127.1.0.255", 255: "127.1.1.0", 999: "127.1.3.232"} {
		if got := skewKeyIP(k).String(); got != want {
			t.Errorf("key %d: %s, want %s", k, got, want)
		}
	}
}

func TestSkewConfigs(t *testing.T) {
	backends := []string{"127.2.0.1:7207", "127.2.0.2:7207"}
	cfg := skewHAProxyConfig("127.0.0.1:9000", backends, 1.25)
	for _, want := range []string{"\tbind 127.0.0.1:9000\n", "\tbalance source\n", "\thash-type consistent\n",
		"\thash-balance-factor 125\n", "\tserver b0 127.2.0.1:7207\n", "\tserver b1 127.2.0.2:7207\n"} {
		if !strings.Contains(cfg, want) {
			t.Errorf("HAProxy config lacks %q:\n%s", want, cfg)
		}
	}
	if cfg := skewHAProxyConfig("127.0.0.1:9000", backends, 0); strings.Contains(cfg, "hash-balance-factor") {
		t.Errorf("HAProxy config without a factor has one:\n%s", cfg)
	}
	for _, tt := range []struct {
		factor float64
		want   string
	}{
		{0, `{"handler":"godist","hash_key":"ip","upstreams":[{"dial":"127.2.0.1:7207"},{"dial":"127.2.0.2:7207"}]}`},
		{1.25, `{"balance_factor":1.25,"handler":"godist","hash_key":"ip","upstreams":[{"dial":"127.2.0.1:7207"},{"dial":"127.2.0.2:7207"}]}`},
	} {
		cfg := skewCaddyConfig("127.0.0.1:9000", backends, tt.factor)
		h := cfg["apps"].(map[string]any)["layer4"].(map[string]any)["servers"].(map[string]any)["skew"].(map[string]any)["routes"].([]any)[0].(map[string]any)["handle"].([]any)[0]
		got, err := json.Marshal(h)
		if err != nil {
			t.Fatal(err)
		}
		if string(got) != tt.want {
			t.Errorf("factor %v: handler %s, want %s", tt.factor, got, tt.want)
		}
	}
	if got := haproxyPercent(1.1); got != 110 {
		t.Errorf("haproxyPercent(1.1) = %d", got)
	}
}

func TestRejection(t *testing.T) {
	tests := []struct{ out, want string }{
		{out: `{"level":"info","msg":"using config from file"}` + "\n" +
			`Error: loading layer4 app module: provision layer4: server 'skew': route 0: position 0: loading module 'godist': decoding module config: layer4.handlers.godist: json: unknown field "balance_factor"` + "\n",
			want: `json: unknown field "balance_factor"`},
		{out: `{"level":"error","msg":"decoding module config: layer4.handlers.godist: json: unknown field \"balance_factor\""}`,
			want: `json: unknown field "balance_factor"`},
		{out: "starting\nError: balance_factor 0.5: must be above 1\n", want: "Error: balance_factor 0.5: must be above 1"},
	}
	for _, tt := range tests {
		if got := rejection(tt.out); got != tt.want {
			t.Errorf("rejection(%q) = %q, want %q", tt.out, got, tt.want)
		}
	}
}

// skewRows builds a result from rows: lost and conns, and samples over.
func skewFixture(godistLost, gbfLost, hbfLost, over int, gbfSkipped string) *skewResult {
	row := func(id string, lost, over int) *skewRow {
		return &skewRow{ID: id, Label: id, Conns: 1000, Lost: lost, HashMismatch: -1, ProbeMismatch: 0,
			Load: skewLoadStats{Samples: 100, Over: over, WorstRatio: 1.3, MeanRatio: 1.2}, Homes: make([]int, 10)}
	}
	gd := row("godist", godistLost, 100)
	gd.HashMismatch = 0
	gbf := row("godist-bf", gbfLost, over)
	gbf.Skipped = gbfSkipped
	return &skewResult{Params: skewParams{Factor: 1.25, Backends: 4}, FixedAddrs: true,
		Rows: []*skewRow{gd, gbf, row("haproxy", 0, 100), row("haproxy-bf", hbfLost, 10)}}
}

func TestCheckSkewGoals(t *testing.T) {
	tests := []struct {
		name string
		r    *skewResult
		want []string // status of each goal
	}{
		{name: "all met", r: skewFixture(0, 150, 240, 0, ""), want: []string{"met", "met", "met"}},
		{name: "over at a sample", r: skewFixture(0, 150, 240, 3, ""), want: []string{"not met", "met", "met"}},
		{name: "more affinity lost than HAProxy", r: skewFixture(0, 250, 240, 0, ""), want: []string{"met", "not met", "met"}},
		{name: "without a factor some moved", r: skewFixture(1, 150, 240, 0, ""), want: []string{"met", "met", "not met"}},
		{name: "factor not supported yet", r: skewFixture(0, 0, 240, 0, "not yet supported"), want: []string{"not measured", "not measured", "met"}},
		{name: "not run", r: nil, want: nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			goals := checkSkewGoals(tt.r)
			if len(goals) != len(tt.want) {
				t.Fatalf("%d goals, want %d", len(goals), len(tt.want))
			}
			for i, g := range goals {
				if g.Status != tt.want[i] || g.Section != sectionSkew {
					t.Errorf("goal %q: %s (%s), want %s", g.Text, g.Status, g.Detail, tt.want[i])
				}
			}
		})
	}
}

func TestRenderSkew(t *testing.T) {
	r := skewFixture(0, 150, 240, 0, "not yet supported: this Caddy rejects `balance_factor`")
	r.Rows[3].ProbeMismatch = 2
	md := skewSection(r, checkSkewGoals(r))
	for _, want := range []string{
		"## Skewed load: consistent hashing with bounded loads",
		"| godist | 1.30 | 1.20 | 100 of 100 (+0.0) | 0.0% |",
		"| haproxy-bf | 1.30 | 1.20 | 10 of 100 (+0.0) | 24.0% |",
		"- godist-bf: not yet supported: this Caddy rejects `balance_factor`",
		"godist: every key's first choice is rendezvous hashing's",
		"haproxy-bf: 2 keys' first choices differ from the same proxy's without a factor",
		"fixed addresses (127.2.0.1:7207 on)",
		"1 met, 0 not met, 2 not measured.",
	} {
		if !strings.Contains(md, want) {
			t.Errorf("the section lacks %q:\n%s", want, md)
		}
	}
	if strings.Contains(md, "| godist-bf |") {
		t.Errorf("a skipped row has a line in the table:\n%s", md)
	}
	if got := skewSection(&skewResult{Failed: "no backend"}, nil); !strings.Contains(got, "could not run: no backend") {
		t.Errorf("a failed scenario: %q", got)
	}
	if skewSection(nil, nil) != "" {
		t.Error("a scenario that did not run has a section")
	}
}

// TestRenderMarkdownSkewOnly checks a report of the skew scenario alone:
// its section and goals, and no word of timed tests that did not run.
func TestRenderMarkdownSkewOnly(t *testing.T) {
	rep := &report{
		Command: "go run ./bench -tests skew",
		Method:  method{Duration: "5s", Warmup: "500ms", Repeats: 3, Pinning: "pinned"},
		Peers:   []*peerResult{{ID: "direct", Label: "direct"}},
		Skew:    skewFixture(0, 150, 240, 0, ""),
	}
	rep.Goals = append(checkGoals(rep.Peers), checkSkewGoals(rep.Skew)...)
	md := renderMarkdown(rep)
	for _, want := range []string{"Method (shared/PEERS.md): pinned.", "## Skewed load", "3 met, 0 not met, 0 not measured."} {
		if !strings.Contains(md, want) {
			t.Errorf("markdown lacks %q:\n%s", want, md)
		}
	}
	for _, unwanted := range []string{"Each timed test ran", "## Goals (issue 4)", "## Goals (SNI passthrough"} {
		if strings.Contains(md, unwanted) {
			t.Errorf("markdown has %q:\n%s", unwanted, md)
		}
	}
}
