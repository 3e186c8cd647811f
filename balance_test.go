// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"fmt"
	"math"
	"math/rand/v2"
	"net"
	"strings"
	"testing"
	"time"
)

// dialFrom connects to Caddy from the loopback address ip (any of
// 127.0.0.0/8 is a local address on Linux), so that under hash_key ip each
// source address is a key of its own.
func (c *testCaddy) dialFrom(t *testing.T, ip string) *net.TCPConn {
	t.Helper()
	d := net.Dialer{Timeout: testTimeout, LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}}
	conn, err := d.Dial("tcp", c.listen)
	if err != nil {
		t.Fatalf("dialling Caddy from %s: %v", ip, err)
	}
	_ = conn.SetDeadline(time.Now().Add(testTimeout))
	return conn.(*net.TCPConn)
}

// skewedSources returns n source addresses for connections: one hot
// address makes hot of them, the rest are spread Zipf-like over many
// others. Seeded: the same every run.
func skewedSources(n int, hot float64) []string {
	r := rand.New(rand.NewPCG(12, 34))
	z := rand.NewZipf(r, 1.2, 1, 200)
	out := make([]string, n)
	for i := range out {
		if r.Float64() < hot {
			out[i] = "127.9.0.1"
			continue
		}
		k := z.Uint64() + 2
		out[i] = fmt.Sprintf("127.9.%d.%d", k/250, k%250+1)
	}
	return out
}

// loads returns this handler's connections to each upstream, by dial
// address, and its caps, from /godist/upstreams.
func (c *testCaddy) loads(t *testing.T) (load map[string]int64, caps map[string]int64, total int64) {
	t.Helper()
	hs := c.upstreams(t, "")[0]
	load, caps = map[string]int64{}, map[string]int64{}
	for _, u := range hs.Upstreams {
		load[u.Dial] = u.HandlerConnections
		if u.Cap != nil {
			caps[u.Dial] = *u.Cap
		}
	}
	return load, caps, hs.HandlerConnections
}

// TestBalanceFactorCapsLoads opens a skewed mix of long-lived connections
// (one client address makes 40% of them) under hash_key ip, with and
// without balance_factor. Without it the hot key's upstream takes far more
// than its share; with 1.25 no upstream ever holds more than its cap,
// ⌈1.25 × connections × weight share⌉, after any arrival, the overflow is
// counted against the hot key's first choice, and every connection still
// flows.
func TestBalanceFactorCapsLoads(t *testing.T) {
	checkNoLeaks(t)
	backends, addrs := startBackends(t, 4, echo)
	_ = backends
	const n, factor = 120, 1.25
	sources := skewedSources(n, 0.4)
	weights := []int{1, 1, 2, 1}
	ups := upstreamsJSON(addrs...)
	for i, w := range weights {
		ups[i]["weight"] = w
	}

	run := func(t *testing.T, bf float64) (maxOverShare float64, overflows float64) {
		opts := map[string]any{"upstreams": ups, "hash_key": "ip"}
		if bf > 0 {
			opts["balance_factor"] = bf
		}
		c := startCaddy(t, opts)
		conns := make([]*net.TCPConn, 0, n)
		defer func() {
			for _, conn := range conns {
				conn.Close()
			}
		}()
		weightOf := map[string]int{}
		for i, a := range addrs {
			weightOf[a] = weights[i]
		}
		for i, src := range sources {
			conn := c.dialFrom(t, src)
			conns = append(conns, conn)
			if got, err := exchange(conn, []byte("hi")); err != nil || string(got) != "hi" {
				t.Fatalf("connection %d from %s: %q, %v", i, src, got, err)
			}
			load, caps, total := c.loads(t)
			if total != int64(i+1) {
				t.Fatalf("after %d connections the handler counts %d", i+1, total)
			}
			for dial, l := range load {
				share := float64(weightOf[dial]) / 5
				if total >= 40 { // below, one connection is a large part of a share
					maxOverShare = math.Max(maxOverShare, float64(l)/(float64(total)*share))
				}
				if bf > 0 {
					limit := int64(math.Ceil(bf * float64(total) * share))
					if l > limit {
						t.Fatalf("after %d connections %s holds %d, over its cap of %d", total, dial, l, limit)
					}
					if caps[dial] == 0 {
						t.Fatalf("%s has no cap in /godist/upstreams", dial)
					}
				}
			}
		}
		for _, conn := range conns {
			if got, err := exchange(conn, []byte("still")); err != nil || string(got) != "still" {
				t.Fatalf("a connection placed under the cap: %q, %v", got, err)
			}
		}
		for key, v := range c.scrape(t) {
			if strings.HasPrefix(key, metricsNamespace+"_upstream_overflow_picks_total") {
				overflows += v
			}
		}
		return maxOverShare, overflows
	}

	t.Run("without", func(t *testing.T) {
		worst, overflows := run(t, 0)
		if worst < 1.6 {
			t.Fatalf("without a factor the fullest upstream held %.2f× its share: the mix is not skewed enough to test anything", worst)
		}
		if overflows != 0 {
			t.Fatalf("%v overflow picks without a factor", overflows)
		}
	})
	t.Run("with 1.25", func(t *testing.T) {
		worst, overflows := run(t, factor)
		if overflows == 0 {
			t.Fatal("no overflow pick counted, though the hot key's upstream was capped")
		}
		t.Logf("fullest upstream at %.2f× its share, %v overflow picks", worst, overflows)
	})
}

// TestBalanceFactorKeepsPicks checks that with every upstream under its
// cap (no load at all) the picks are exactly those without the option, and
// that /godist/pick shows the first choice an upstream at its cap
// overflows from.
func TestBalanceFactorKeepsPicks(t *testing.T) {
	checkNoLeaks(t)
	_, addrs := startBackends(t, 3, echo)
	c := startCaddy(t, map[string]any{"upstreams": upstreamsJSON(addrs...), "hash_key": "ip", "balance_factor": 1.5})
	picker := NewPicker([]PickerUpstream{{Dial: addrs[0]}, {Dial: addrs[1]}, {Dial: addrs[2]}})
	for i := range 200 {
		ip := fmt.Sprintf("10.%d.%d.%d", i%7, i/7, i%251)
		got := c.pick(t, "ip="+ip)[0]
		if want := addrs[picker.Pick(ip, nil)]; deref(got.Upstream) != want || got.FirstChoice != nil {
			t.Fatalf("key %s: %s (first choice %v), the hash says %s", ip, deref(got.Upstream), got.FirstChoice, want)
		}
	}

	// Two connections from one address: caps are ⌈1.5 × (n+1) / 3⌉, 1 for
	// the first connection and 1 again for the second, so the second
	// overflows to the key's next choice.
	hot := "127.9.9.9"
	first := addrs[picker.Pick(hot, nil)]
	a := c.dialFrom(t, hot)
	defer a.Close()
	if _, err := exchange(a, []byte("x")); err != nil {
		t.Fatal(err)
	}
	got := c.pick(t, "ip="+hot)[0]
	if got.FirstChoice == nil || *got.FirstChoice != first || deref(got.Upstream) == first {
		t.Fatalf("with its first choice at its cap, key %s goes to %s (first choice %v), want an overflow from %s",
			hot, deref(got.Upstream), got.FirstChoice, first)
	}
	for _, ch := range got.Order {
		if ch.Dial == first && (ch.Load == nil || *ch.Load != 1 || ch.Cap == nil || *ch.Cap != 1) {
			t.Fatalf("the first choice in /godist/pick: load %v cap %v, want 1 of 1", ch.Load, ch.Cap)
		}
	}
	b := c.dialFrom(t, hot)
	defer b.Close()
	if _, err := exchange(b, []byte("x")); err != nil {
		t.Fatal(err)
	}
	load, _, _ := c.loads(t)
	if load[first] != 1 || load[deref(got.Upstream)] != 1 {
		t.Fatalf("loads %v: the second connection did not go where /godist/pick said", load)
	}
}

// TestBalanceFactorUnusableTakesNothing: an upstream that is down or at
// its max_connections has no cap and takes no overflow; its share is
// spread over the usable ones.
func TestBalanceFactorUnusableTakesNothing(t *testing.T) {
	checkNoLeaks(t)
	backends, addrs := startBackends(t, 3, echo)
	backends[2].stop() // refuses: one failed dial takes it down
	ups := upstreamsJSON(addrs...)
	ups[1]["max_connections"] = 1
	c := startCaddy(t, map[string]any{"upstreams": ups, "hash_key": "ip", "balance_factor": 1.25,
		"health_checks": map[string]any{"passive": map[string]any{"fail_duration": "1m"}}})
	var conns []*net.TCPConn
	defer func() {
		for _, conn := range conns {
			conn.Close()
		}
	}()
	for i := range 12 {
		conn := c.dialFrom(t, fmt.Sprintf("127.8.0.%d", i+1))
		conns = append(conns, conn)
		if got, err := exchange(conn, []byte("hi")); err != nil || string(got) != "hi" {
			t.Fatalf("connection %d: %q, %v", i, got, err)
		}
	}
	load, caps, total := c.loads(t)
	if load[addrs[2]] != 0 || load[addrs[1]] != 1 || load[addrs[0]] != total-1 {
		t.Fatalf("loads %v over %d connections: the down upstream or the full one took more", load, total)
	}
	for _, dial := range []string{addrs[1], addrs[2]} {
		if cp, ok := caps[dial]; ok {
			t.Errorf("%s is unusable but has a cap of %d", dial, cp)
		}
	}
}
