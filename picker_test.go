// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"fmt"
	"math"
	"net/http"
	"net/netip"
	"slices"
	"testing"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
	"github.com/cespare/xxhash/v2"
)

func equalPool(n int) []PickerUpstream {
	ups := make([]PickerUpstream, n)
	for i := range ups {
		ups[i] = PickerUpstream{Dial: fmt.Sprintf("10.0.0.%d:5432", i+1), Weight: 1}
	}
	return ups
}

// testKey is the i-th of a fixed, reproducible set of client keys.
func testKey(i int) string {
	return fmt.Sprintf("192.0.%d.%d:%d", (i>>8)&0xff, i&0xff, 1024+i%50000)
}

// TestPickerPinnedMappings pins known key -> upstream mappings, so that a
// change to the hashing, which would remap every client of every user on
// upgrade, cannot pass unnoticed.
func TestPickerPinnedMappings(t *testing.T) {
	p := NewPicker([]PickerUpstream{
		{Dial: "localhost:4000", Weight: 1},
		{Dial: "localhost:4001", Weight: 1},
		{Dial: "localhost:4002", Weight: 1},
	})
	weighted := NewPicker([]PickerUpstream{
		{Dial: "localhost:4000", Weight: 1},
		{Dial: "localhost:4001", Weight: 2},
		{Dial: "localhost:4002", Weight: 5},
	})
	tests := []struct {
		key         string
		want, wantW int
		wantOrder   []int
		wantOrderW  []int
	}{
		{key: "127.0.0.1:40000", want: 0, wantW: 1, wantOrder: []int{0, 1, 2}, wantOrderW: []int{1, 2, 0}},
		{key: "127.0.0.1", want: 0, wantW: 0, wantOrder: []int{0, 1, 2}, wantOrderW: []int{0, 2, 1}},
		{key: "[2001:db8::1]:5678", want: 2, wantW: 2, wantOrder: []int{2, 0, 1}, wantOrderW: []int{2, 1, 0}},
		{key: "example.com", want: 1, wantW: 1, wantOrder: []int{1, 2, 0}, wantOrderW: []int{1, 2, 0}},
	}
	for _, tt := range tests {
		t.Run(tt.key, func(t *testing.T) {
			if got := p.Pick(tt.key, nil); got != tt.want {
				t.Errorf("Pick(%q) = %d, want %d", tt.key, got, tt.want)
			}
			if got := p.Order(tt.key, nil); !slices.Equal(got, tt.wantOrder) {
				t.Errorf("Order(%q) = %v, want %v", tt.key, got, tt.wantOrder)
			}
			if got := weighted.Pick(tt.key, nil); got != tt.wantW {
				t.Errorf("weighted Pick(%q) = %d, want %d", tt.key, got, tt.wantW)
			}
			if got := weighted.Order(tt.key, nil); !slices.Equal(got, tt.wantOrderW) {
				t.Errorf("weighted Order(%q) = %v, want %v", tt.key, got, tt.wantOrderW)
			}
		})
	}
}

// TestPickerAgreesWithCaddyIPHash checks that, with equal weights and the
// `ip` key, a client goes to the upstream that Caddy's own HTTP
// reverse_proxy `lb_policy ip_hash` picks from the same list.
func TestPickerAgreesWithCaddyIPHash(t *testing.T) {
	for _, n := range []int{1, 2, 3, 7, 20} {
		t.Run(fmt.Sprintf("%d upstreams", n), func(t *testing.T) {
			ups := equalPool(n)
			ups[0].Dial = "localhost:4000" // hostnames and IPv6 literals too
			if n > 1 {
				ups[1].Dial = "[2001:db8::10]:80"
			}
			p := NewPicker(ups)
			var pool reverseproxy.UpstreamPool
			for _, u := range ups {
				pool = append(pool, &reverseproxy.Upstream{Dial: u.Dial})
			}
			policy := reverseproxy.IPHashSelection{}
			for i := range 2000 {
				remote := testKey(i)
				if i%3 == 0 {
					// as Go's HTTP server prints a client's address
					ip := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 15: byte(i), 14: byte(i >> 8)})
					remote = netip.AddrPortFrom(ip, uint16(1024+i)).String()
				}
				req := &http.Request{RemoteAddr: remote}
				chosen := policy.Select(pool, req, nil)
				if chosen == nil {
					t.Fatalf("caddy ip_hash chose nothing for %s", remote)
				}
				key := addrKey(mustParseAddr(t, remote), false)
				got := p.Pick(key, nil)
				if ups[got].Dial != chosen.Dial {
					t.Fatalf("client %s: godist picks %s, caddy ip_hash picks %s", remote, ups[got].Dial, chosen.Dial)
				}
			}
		})
	}
}

// TestPickerSpread checks that each upstream gets its weighted share of a
// large set of keys, within a few percent.
func TestPickerSpread(t *testing.T) {
	tests := []struct {
		name    string
		weights []int
	}{
		{name: "equal 3", weights: []int{1, 1, 1}},
		{name: "equal 10", weights: []int{1, 1, 1, 1, 1, 1, 1, 1, 1, 1}},
		{name: "1:2:5", weights: []int{1, 2, 5}},
		{name: "1:1:10:3", weights: []int{1, 1, 10, 3}},
	}
	const keys = 200_000
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ups := equalPool(len(tt.weights))
			total := 0
			for i, w := range tt.weights {
				ups[i].Weight = w
				total += w
			}
			p := NewPicker(ups)
			counts := make([]int, len(ups))
			for i := range keys {
				counts[p.Pick(testKey(i), nil)]++
			}
			for i, c := range counts {
				want := float64(keys) * float64(tt.weights[i]) / float64(total)
				if dev := math.Abs(float64(c)-want) / want; dev > 0.03 {
					t.Errorf("upstream %d (weight %d): %d keys, want %.0f ± 3%% (off by %.1f%%)",
						i, tt.weights[i], c, want, dev*100)
				}
			}
		})
	}
}

// TestPickerStability checks that adding or removing one upstream moves
// only the keys that must move: the added upstream's share, or the removed
// one's keys, and nothing else.
func TestPickerStability(t *testing.T) {
	const keys = 100_000
	for _, n := range []int{3, 5, 10} {
		t.Run(fmt.Sprintf("%d to %d", n, n+1), func(t *testing.T) {
			before := NewPicker(equalPool(n))
			after := NewPicker(equalPool(n + 1))
			moved := 0
			for i := range keys {
				a, b := before.Pick(testKey(i), nil), after.Pick(testKey(i), nil)
				if a != b {
					if b != n {
						t.Fatalf("key %s moved from %d to %d, not to the new upstream %d", testKey(i), a, b, n)
					}
					moved++
				}
			}
			ideal := 1 / float64(n+1)
			if got := float64(moved) / keys; math.Abs(got-ideal) > 0.02 {
				t.Errorf("adding one upstream moved %.2f%% of keys, ideal %.2f%%", got*100, ideal*100)
			}
		})
		t.Run(fmt.Sprintf("%d to %d", n+1, n), func(t *testing.T) {
			full := equalPool(n + 1)
			const removed = 1
			rest := slices.Delete(slices.Clone(full), removed, removed+1)
			before, after := NewPicker(full), NewPicker(rest)
			moved := 0
			for i := range keys {
				a, b := full[before.Pick(testKey(i), nil)].Dial, rest[after.Pick(testKey(i), nil)].Dial
				if a != b {
					if a != full[removed].Dial {
						t.Fatalf("key %s moved from %s to %s though %s stayed", testKey(i), a, b, a)
					}
					moved++
				}
			}
			ideal := 1 / float64(n+1)
			if got := float64(moved) / keys; math.Abs(got-ideal) > 0.02 {
				t.Errorf("removing one upstream moved %.2f%% of keys, ideal %.2f%%", got*100, ideal*100)
			}
		})
	}
}

// TestPickerSkipSpreads checks that when an upstream is unusable its keys
// go to each key's next choice, spread evenly over the others rather than
// piled onto one, and that no other key moves.
func TestPickerSkipSpreads(t *testing.T) {
	const n, keys, down = 5, 100_000, 2
	p := NewPicker(equalPool(n))
	moved := make([]int, n)
	for i := range keys {
		key := testKey(i)
		first := p.Pick(key, nil)
		got := p.Pick(key, func(i int) bool { return i != down })
		if first != down {
			if got != first {
				t.Fatalf("key %s moved from %d to %d though %d is up", key, first, got, first)
			}
			continue
		}
		if want := p.Order(key, nil)[1]; got != want {
			t.Fatalf("key %s went to %d, not to its second choice %d", key, got, want)
		}
		moved[got]++
	}
	total := 0
	for _, m := range moved {
		total += m
	}
	for i, m := range moved {
		if i == down {
			continue
		}
		want := float64(total) / (n - 1)
		if dev := math.Abs(float64(m)-want) / want; dev > 0.05 {
			t.Errorf("upstream %d took %d of the %d moved keys, want about %.0f", i, m, total, want)
		}
	}
}

// TestPickerDeterministic checks that two pickers built independently
// from the same list, in one process or (by the pinned mappings) in many,
// agree on every key.
func TestPickerDeterministic(t *testing.T) {
	ups := equalPool(16)
	ups[3].Weight = 4
	a, b := NewPicker(ups), NewPicker(slices.Clone(ups))
	for i := range 50_000 {
		if x, y := a.Pick(testKey(i), nil), b.Pick(testKey(i), nil); x != y {
			t.Fatalf("key %s: %d and %d", testKey(i), x, y)
		}
	}
}

func TestPickerOrderIsFullAndStartsWithPick(t *testing.T) {
	ups := equalPool(9)
	ups[4].Weight = 3
	p := NewPicker(ups)
	for i := range 1000 {
		key := testKey(i)
		order := p.Order(key, nil)
		if len(order) != 9 || order[0] != p.Pick(key, nil) {
			t.Fatalf("Order(%s) = %v, Pick = %d", key, order, p.Pick(key, nil))
		}
		sorted := slices.Sorted(slices.Values(order))
		for j, v := range sorted {
			if v != j {
				t.Fatalf("Order(%s) = %v is not a permutation", key, order)
			}
		}
		// each next choice is what Pick says once the earlier ones are out
		for k := 1; k < len(order); k++ {
			out := order[:k]
			if got := p.Pick(key, func(i int) bool { return !slices.Contains(out, i) }); got != order[k] {
				t.Fatalf("Order(%s) = %v, but without %v Pick gives %d", key, order, out, got)
			}
		}
	}
}

func TestPickerAllocatesNothing(t *testing.T) {
	for _, n := range []int{3, 16, 100} {
		for _, weighted := range []bool{false, true} {
			ups := equalPool(n)
			if weighted {
				ups[0].Weight = 3
			}
			p := NewPicker(ups)
			key := "203.0.113.9:51234"
			skip := n / 2
			allocs := testing.AllocsPerRun(100, func() {
				_ = p.Pick(key, func(i int) bool { return i != skip })
			})
			if allocs != 0 {
				t.Errorf("%d upstreams, weighted %v: %.1f allocations per pick", n, weighted, allocs)
			}
		}
	}
}

// TestPickerMatchesReference checks weighted picks against a direct,
// independent reading of the formula the doc comment gives: the highest
// weight / -ln(xxhash64(dial + key) / 2^64).
func TestPickerMatchesReference(t *testing.T) {
	ups := equalPool(6)
	for i := range ups {
		ups[i].Weight = 1 + i%3
	}
	p := NewPicker(ups)
	for i := range 20_000 {
		key := testKey(i)
		best, bestScore := -1, -1.0
		for j, u := range ups {
			h := xxhash.Sum64String(u.Dial + key)
			s := float64(u.Weight) / -math.Log(float64(h)/(1<<64))
			if s > bestScore {
				best, bestScore = j, s
			}
		}
		if got := p.Pick(key, nil); got != best {
			t.Fatalf("key %s: Pick = %d, reference = %d", key, got, best)
		}
	}
}

func TestNegLogUnit(t *testing.T) {
	if got := negLogUnit(0); !math.IsInf(got, 1) {
		t.Errorf("negLogUnit(0) = %v, want +Inf", got)
	}
	// strictly decreasing across the switch between the two formulas, and
	// near 1, where a plain float64 quotient would round to ln(1) == 0
	prev := math.Inf(1)
	for _, h := range []uint64{1, 1 << 32, 1 << 62, 1<<63 - 1<<20, 1 << 63, 1<<63 + 1<<20, 3 << 62, math.MaxUint64 - 1<<20, math.MaxUint64} {
		got := negLogUnit(h)
		if !(got < prev) || got <= 0 {
			t.Errorf("negLogUnit(%d) = %v, not below %v and above 0", h, got, prev)
		}
		prev = got
	}
}

func BenchmarkPick(b *testing.B) {
	for _, n := range []int{3, 16, 100} {
		for _, weighted := range []bool{false, true} {
			ups := equalPool(n)
			if weighted {
				ups[0].Weight = 2
			}
			p := NewPicker(ups)
			name := fmt.Sprintf("upstreams=%d/weighted=%v", n, weighted)
			b.Run(name, func(b *testing.B) {
				b.ReportAllocs()
				key := "203.0.113.9:51234"
				for b.Loop() {
					_ = p.Pick(key, func(int) bool { return true })
				}
			})
		}
	}
}
