// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"fmt"
	"math"
	"math/big"
	"math/rand/v2"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
)

// refCap is an independent reading of the cap that bounded loads set:
// ⌈c × (total + 1) × w / W⌉ in exact rational arithmetic, with c as the
// user writes it.
func refCap(t testing.TB, factor string, total int64, w, usableWeight int) int64 {
	t.Helper()
	c, ok := new(big.Rat).SetString(factor)
	if !ok {
		t.Fatalf("bad factor %q", factor)
	}
	x := new(big.Rat).Mul(c, big.NewRat(max(total, 0)+1, 1))
	x.Mul(x, big.NewRat(int64(w), int64(usableWeight)))
	q, r := new(big.Int).QuoRem(x.Num(), x.Denom(), new(big.Int))
	if r.Sign() > 0 {
		q.Add(q, big.NewInt(1))
	}
	return q.Int64()
}

func parseFactor(t testing.TB, s string) float64 {
	t.Helper()
	var f float64
	if _, err := fmt.Sscan(s, &f); err != nil {
		t.Fatalf("bad factor %q: %v", s, err)
	}
	return f
}

// refBounded is PickBounded's contract read directly: the key's first
// usable choice, and the first usable upstream in Order(key) that is
// under its refCap (the first choice when none is).
func refBounded(t testing.TB, p *Picker, weights []int, key string, usable []bool, load []int64, total int64, factor string) (chosen, first int) {
	t.Helper()
	usableWeight := 0
	for i, ok := range usable {
		if ok {
			usableWeight += weights[i]
		}
	}
	first = -1
	for _, i := range p.Order(key, nil) {
		if !usable[i] {
			continue
		}
		if first < 0 {
			first = i
		}
		if load[i] < refCap(t, factor, total, weights[i], usableWeight) {
			return i, first
		}
	}
	return first, first
}

// TestBoundedCaps pins caps: the worked example of docs/balance-factor.md,
// weights, an unusable upstream's share spread over the others, a product
// that floating point would round the wrong way, and no cap when off.
func TestBoundedCaps(t *testing.T) {
	tests := []struct {
		name    string
		weights []int
		down    []int // unusable upstreams
		total   int64
		factor  float64
		want    []int64
	}{
		{name: "4 equal, 99 active, c=1.25", weights: []int{1, 1, 1, 1}, total: 99, factor: 1.25, want: []int64{32, 32, 32, 32}},
		{name: "4 equal, 0 active", weights: []int{1, 1, 1, 1}, total: 0, factor: 1.25, want: []int64{1, 1, 1, 1}},
		{name: "4 equal, one down", weights: []int{1, 1, 1, 1}, down: []int{2}, total: 99, factor: 1.25, want: []int64{42, 42, -1, 42}},
		{name: "weights 1:2:5", weights: []int{1, 2, 5}, total: 79, factor: 1.25, want: []int64{13, 25, 63}},
		{name: "weights 1:2:5, the 5 down", weights: []int{1, 2, 5}, down: []int{2}, total: 79, factor: 1.25, want: []int64{34, 67, -1}},
		{name: "1.1 × 10 is 11", weights: []int{1}, total: 9, factor: 1.1, want: []int64{11}},
		{name: "1.1 × 40 / 4 is 11", weights: []int{1, 1, 1, 1}, total: 39, factor: 1.1, want: []int64{11, 11, 11, 11}},
		{name: "thousandths round", weights: []int{1}, total: 999, factor: 1.2345, want: []int64{1235}},
		{name: "negative total counts as 0", weights: []int{1, 1}, total: -5, factor: 2, want: []int64{1, 1}},
		{name: "off", weights: []int{1, 1}, total: 10, factor: 0, want: []int64{-1, -1}},
		{name: "NaN is off", weights: []int{1, 1}, total: 10, factor: math.NaN(), want: []int64{-1, -1}},
		{name: "huge", weights: []int{1, 1000}, total: math.MaxInt64 / 2, factor: 1e6, want: []int64{math.MaxInt64, math.MaxInt64}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ups := equalPool(len(tt.weights))
			for i, w := range tt.weights {
				ups[i].Weight = w
			}
			p := NewPicker(ups)
			got := p.Caps(nil, func(i int) bool { return !slices.Contains(tt.down, i) }, tt.total, tt.factor)
			if !slices.Equal(got, tt.want) {
				t.Errorf("caps = %v, want %v", got, tt.want)
			}
		})
	}
}

// TestPickBoundedOffIsPick checks that without a factor the picks are
// exactly today's: Pick's, for every key, weights and usable set.
func TestPickBoundedOffIsPick(t *testing.T) {
	ups := equalPool(7)
	ups[2].Weight, ups[5].Weight = 3, 2
	for _, weighted := range []bool{false, true} {
		pool := equalPool(7)
		if weighted {
			pool = ups
		}
		p := NewPicker(pool)
		for _, factor := range []float64{0, -1.5, math.NaN(), math.Inf(1)} {
			t.Run(fmt.Sprintf("weighted=%v/factor=%v", weighted, factor), func(t *testing.T) {
				huge := func(int) int64 { return 1 << 40 } // every upstream far over any cap
				for k := range 20_000 {
					key := testKey(k)
					usable := func(i int) bool { return (i+k)%5 != 0 }
					want := p.Pick(key, usable)
					chosen, first := p.PickBounded(key, usable, huge, 3, factor)
					if chosen != want || first != want {
						t.Fatalf("key %s: PickBounded = (%d, %d), Pick = %d", key, chosen, first, want)
					}
				}
			})
		}
	}
}

// TestPickBoundedUnderCapIsPick checks that while every upstream is under
// its cap the picks are Pick's: affinity costs nothing until a cap is
// reached.
func TestPickBoundedUnderCapIsPick(t *testing.T) {
	ups := equalPool(5)
	ups[1].Weight = 4
	p := NewPicker(ups)
	tests := []struct {
		name  string
		load  []int64
		total int64
	}{
		{name: "idle", load: []int64{0, 0, 0, 0, 0}, total: 0},
		{name: "balanced", load: []int64{10, 40, 10, 10, 10}, total: 80},
		// caps at 80 active, c=1.25: ⌈100 × w / 8⌉ = 13 and 50
		{name: "each one below its cap", load: []int64{12, 49, 12, 12, 12}, total: 80},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for k := range 20_000 {
				key := testKey(k)
				want := p.Pick(key, nil)
				chosen, first := p.PickBounded(key, nil, func(i int) int64 { return tt.load[i] }, tt.total, 1.25)
				if chosen != want || first != want {
					t.Fatalf("key %s: PickBounded = (%d, %d), Pick = %d", key, chosen, first, want)
				}
			}
		})
	}
}

// TestPickBoundedPinned pins bounded picks for one key whose order of
// preference is known (TestPickerPinnedMappings): 0, then 1, then 2 with
// equal weights; 0, then 2, then 1 with weights 1, 2, 5.
func TestPickBoundedPinned(t *testing.T) {
	ups := []PickerUpstream{{Dial: "localhost:4000"}, {Dial: "localhost:4001"}, {Dial: "localhost:4002"}}
	equal := NewPicker(ups)
	weighted := NewPicker([]PickerUpstream{{Dial: "localhost:4000", Weight: 1}, {Dial: "localhost:4001", Weight: 2}, {Dial: "localhost:4002", Weight: 5}})
	const key = "127.0.0.1"
	tests := []struct {
		name              string
		p                 *Picker
		load              []int64
		down              int // an unusable upstream, or -1
		total             int64
		chosen, wantFirst int
	}{
		{name: "idle: first choice", p: equal, load: []int64{0, 0, 0}, down: -1, total: 0, chosen: 0, wantFirst: 0},
		// cap ⌈1.25 × 6 / 3⌉ = 3: the first choice holds 5
		{name: "first over cap: second choice", p: equal, load: []int64{5, 0, 0}, down: -1, total: 5, chosen: 1, wantFirst: 0},
		// cap ⌈1.25 × 10 / 3⌉ = 5
		{name: "first at cap, second under", p: equal, load: []int64{5, 4, 0}, down: -1, total: 9, chosen: 1, wantFirst: 0},
		// cap ⌈1.25 × 12 / 3⌉ = 5
		{name: "first two at cap: third choice", p: equal, load: []int64{6, 5, 0}, down: -1, total: 11, chosen: 2, wantFirst: 0},
		// 0 unusable, W = 2: cap ⌈1.25 × 12 / 2⌉ = 8
		{name: "first unusable, second under the wider cap", p: equal, load: []int64{0, 5, 6}, down: 0, total: 11, chosen: 1, wantFirst: 1},
		// weighted order 0, 2, 1; caps ⌈1.25 × 20 × w / 8⌉ = 4, 7, 16 (3.13, 6.25, 15.63)
		{name: "weighted: weight-1 first choice full, weight-5 second", p: weighted, load: []int64{4, 0, 15}, down: -1, total: 19, chosen: 2, wantFirst: 0},
		// caps ⌈1.25 × 23 × w / 8⌉ = 4, 8, 18 (3.59, 7.19, 17.97)
		{name: "weighted: weight-5 at cap too, weight-2 third", p: weighted, load: []int64{4, 0, 18}, down: -1, total: 22, chosen: 1, wantFirst: 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			chosen, first := tt.p.PickBounded(key, func(i int) bool { return i != tt.down },
				func(i int) int64 { return tt.load[i] }, tt.total, 1.25)
			if chosen != tt.chosen || first != tt.wantFirst {
				t.Errorf("PickBounded = (%d, %d), want (%d, %d)", chosen, first, tt.chosen, tt.wantFirst)
			}
		})
	}
}

// TestPickBoundedProperty checks, over random pools, weights, usable sets,
// loads, totals and factors (a pinned seed: the cases are the same on
// every run), that the chosen upstream is the first usable one under its
// cap in the key's order, and first the first usable one. It counts the
// picks that went past the first pass's boundedTop candidates, and those
// that found nothing under cap, so that every path is known to be taken.
func TestPickBoundedProperty(t *testing.T) {
	rng := rand.New(rand.NewPCG(12, 2018))
	factors := []string{"1", "1.05", "1.1", "1.25", "1.5", "2", "3.333"}
	var deep, none, overflow int
	const cases = 20_000
	for c := range cases {
		n := 1 + rng.IntN(24)
		ups := equalPool(n)
		weights := make([]int, n)
		for i := range ups {
			weights[i] = 1
			if c%2 == 1 {
				weights[i] = 1 + rng.IntN(5)
			}
			ups[i].Weight = weights[i]
		}
		p := NewPicker(ups)
		usable := make([]bool, n)
		load := make([]int64, n)
		var sum int64
		for i := range n {
			usable[i] = rng.IntN(5) > 0
			load[i] = int64(rng.IntN(30))
			if usable[i] {
				sum += load[i]
			}
		}
		total := sum + int64(rng.IntN(10))
		if rng.IntN(20) == 0 {
			total = sum / 3 // counts read at different moments: maybe nothing under cap
		}
		factor := factors[rng.IntN(len(factors))]
		key := testKey(rng.IntN(1 << 20))
		wantChosen, wantFirst := refBounded(t, p, weights, key, usable, load, total, factor)
		chosen, first := p.PickBounded(key, func(i int) bool { return usable[i] }, func(i int) int64 {
			if !usable[i] {
				t.Fatalf("load(%d) asked of an unusable upstream", i)
			}
			return load[i]
		}, total, parseFactor(t, factor))
		if chosen != wantChosen || first != wantFirst {
			t.Fatalf("case %d: %d upstreams, weights %v, usable %v, load %v, total %d, c %s, key %s: PickBounded = (%d, %d), want (%d, %d)",
				c, n, weights, usable, load, total, factor, key, chosen, first, wantChosen, wantFirst)
		}
		if chosen != first {
			overflow++
		}
		if chosen >= 0 {
			var usableOrder []int
			for _, i := range p.Order(key, nil) {
				if usable[i] {
					usableOrder = append(usableOrder, i)
				}
			}
			if slices.Index(usableOrder, chosen) >= boundedTop {
				deep++
			}
			if chosen == first && load[first] >= refCap(t, factor, total, weights[first], sumWeights(weights, usable)) {
				none++
			}
		}
	}
	t.Logf("%d cases: %d overflow picks, %d beyond the first %d candidates, %d with none under cap", cases, overflow, deep, boundedTop, none)
	if overflow < cases/10 || deep < 100 || none < 20 {
		t.Errorf("the cases do not exercise every path: %d overflow, %d deep, %d none under cap", overflow, deep, none)
	}
}

func sumWeights(weights []int, usable []bool) int {
	s := 0
	for i, w := range weights {
		if usable[i] {
			s += w
		}
	}
	return s
}

// zipfKeys returns the cumulative distribution of a skewed mix of k keys:
// key 0 alone makes share hot of the arrivals, the rest share the
// remainder as a Zipf law of exponent s (key i in proportion to 1/i^s).
func zipfKeys(k int, s, hot float64) []float64 {
	cdf := make([]float64, k)
	rest := 0.0
	for i := 1; i < k; i++ {
		rest += math.Pow(float64(i), -s)
	}
	acc := hot
	cdf[0] = acc
	for i := 1; i < k; i++ {
		acc += (1 - hot) * math.Pow(float64(i), -s) / rest
		cdf[i] = acc
	}
	cdf[k-1] = 1
	return cdf
}

func drawKey(rng *rand.Rand, cdf []float64) int {
	return min(sort.SearchFloat64s(cdf, rng.Float64()), len(cdf)-1)
}

// boundedSim runs connections through PickBounded: arrivals of keys drawn
// from a skewed mix, and departures of random active connections. It is
// the handler's bookkeeping with the sockets left out.
type boundedSim struct {
	t       *testing.T
	p       *Picker
	weights []int
	factor  string
	maxConn []int64 // per upstream, 0 for none: full upstreams are unusable
	down    []bool  // unusable, as if a health check failed
	load    []int64
	total   int64
	conns   []int // the upstream of each active connection
	keys    []string
	cdf     []float64
	rng     *rand.Rand

	overflow, arrivals int
}

func newBoundedSim(t *testing.T, weights []int, factor string, seed uint64) *boundedSim {
	ups := equalPool(len(weights))
	for i, w := range weights {
		ups[i].Weight = w
	}
	s := &boundedSim{
		t: t, p: NewPicker(ups), weights: weights, factor: factor,
		maxConn: make([]int64, len(weights)), down: make([]bool, len(weights)), load: make([]int64, len(weights)),
		cdf: zipfKeys(1000, 1.1, 0.3), rng: rand.New(rand.NewPCG(seed, 2018)),
	}
	for i := range 1000 {
		s.keys = append(s.keys, fmt.Sprintf("198.51.%d.%d", i/250, i%250))
	}
	return s
}

func (s *boundedSim) usable(i int) bool {
	return !s.down[i] && (s.maxConn[i] == 0 || s.load[i] < s.maxConn[i])
}

// arrive places one connection and checks it was placed under its cap.
func (s *boundedSim) arrive() {
	s.t.Helper()
	key := s.keys[drawKey(s.rng, s.cdf)]
	usable := make([]bool, len(s.load))
	for i := range usable {
		usable[i] = s.usable(i)
	}
	var f float64
	if s.factor != "" {
		f = parseFactor(s.t, s.factor)
	}
	chosen, first := s.p.PickBounded(key, s.usable, func(i int) int64 { return s.load[i] }, s.total, f)
	if chosen < 0 {
		s.t.Fatalf("no upstream for %s with loads %v", key, s.load)
	}
	if !usable[chosen] {
		s.t.Fatalf("%s went to unusable upstream %d (loads %v)", key, chosen, s.load)
	}
	if s.factor != "" {
		if c := refCap(s.t, s.factor, s.total, s.weights[chosen], sumWeights(s.weights, usable)); s.load[chosen] >= c {
			s.t.Fatalf("%s went to upstream %d with %d connections, at its cap %d (loads %v, total %d)",
				key, chosen, s.load[chosen], c, s.load, s.total)
		}
	}
	if chosen != first {
		s.overflow++
	}
	s.arrivals++
	s.load[chosen]++
	s.total++
	s.conns = append(s.conns, chosen)
}

// depart ends a random active connection.
func (s *boundedSim) depart() {
	j := s.rng.IntN(len(s.conns))
	i := s.conns[j]
	s.conns[j] = s.conns[len(s.conns)-1]
	s.conns = s.conns[:len(s.conns)-1]
	s.load[i]--
	s.total--
}

// overCap returns the upstream most over ⌈c × total × w / W⌉ (the cap
// with the connections active now), and by how much; 0 when none is.
func (s *boundedSim) overCap() (int, int64) {
	worst, by := -1, int64(0)
	for i, l := range s.load {
		if d := l - refCap(s.t, s.factor, s.total-1, s.weights[i], sumAll(s.weights)); d > by {
			worst, by = i, d
		}
	}
	return worst, by
}

func sumAll(weights []int) int {
	s := 0
	for _, w := range weights {
		s += w
	}
	return s
}

// TestBoundedCapInvariantSkewed runs a skewed mix (one key makes 30% of
// the arrivals, the rest a Zipf law over 999 keys) through the picks:
// a ramp of arrivals to 500 active connections, then churn (each
// departure of a random connection followed by an arrival). No upstream
// ever holds more than its cap ⌈c × active × w / W⌉: the cap with the
// connections active now, so checked after every arrival; a departure
// lowers it for a moment. The same sequence without a factor puts the
// hot key's upstream far above it, so the mix does test the cap.
func TestBoundedCapInvariantSkewed(t *testing.T) {
	tests := []struct {
		name    string
		weights []int
		factor  string
	}{
		{name: "5 equal, c=1.25", weights: []int{1, 1, 1, 1, 1}, factor: "1.25"},
		{name: "5 equal, c=1.1", weights: []int{1, 1, 1, 1, 1}, factor: "1.1"},
		// the hot key's first choice is the upstream of weight 2
		{name: "weights 1:1:4:2, c=1.25", weights: []int{1, 1, 4, 2}, factor: "1.25"},
		{name: "16 equal, c=1.5", weights: slices.Repeat([]int{1}, 16), factor: "1.5"},
	}
	const active, churn = 500, 20_000
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := newBoundedSim(t, tt.weights, tt.factor, 7)
			check := func(step string) {
				t.Helper()
				if i, by := s.overCap(); by > 0 {
					t.Fatalf("%s: upstream %d is %d over its cap (loads %v, %d active)", step, i, by, s.load, s.total)
				}
			}
			for k := range active {
				s.arrive()
				check(fmt.Sprintf("arrival %d", k))
			}
			for k := range churn {
				s.depart()
				s.arrive()
				check(fmt.Sprintf("churn %d", k))
			}
			share := float64(s.overflow) / float64(s.arrivals)
			t.Logf("overflow picks: %.1f%% of %d; final loads %v", 100*share, s.arrivals, s.load)
			if share == 0 {
				t.Errorf("no overflow pick: the mix did not reach a cap")
			}

			// The same arrivals and departures without a factor.
			off := newBoundedSim(t, tt.weights, "", 7)
			worst := 0.0
			for range active {
				off.arrive()
			}
			for range churn {
				off.depart()
				off.arrive()
				for i, l := range off.load {
					worst = max(worst, float64(l)/(float64(active)*float64(tt.weights[i])/float64(sumAll(tt.weights))))
				}
			}
			c := parseFactor(t, tt.factor)
			if worst < c+0.2 {
				t.Errorf("without a factor the most loaded upstream reached only %.2f × its share: the mix is not skewed enough to test a cap of %s", worst, tt.factor)
			}
			t.Logf("without a factor: most loaded upstream at %.2f × its share", worst)
		})
	}
}

// TestBoundedMaxConnectionsAndHealth runs the skewed mix with one upstream
// limited by max_connections (unusable while full) and one down from the
// start: the down one takes nothing, the limited one never goes past its
// limit nor takes a connection while full, and the others stay under caps
// computed over the usable upstreams' weights.
func TestBoundedMaxConnectionsAndHealth(t *testing.T) {
	s := newBoundedSim(t, []int{1, 1, 1, 1, 1}, "1.25", 11)
	s.maxConn[1] = 40
	const down = 3
	s.down[down] = true
	for range 400 {
		s.arrive()
	}
	for range 10_000 {
		s.depart()
		s.arrive()
		if s.load[down] != 0 {
			t.Fatalf("the down upstream holds %d connections", s.load[down])
		}
		if s.load[1] > 40 {
			t.Fatalf("upstream 1 holds %d connections, over its max_connections 40", s.load[1])
		}
	}
	if s.load[1] != 40 {
		t.Errorf("upstream 1 holds %d connections: the mix never filled it to its max_connections", s.load[1])
	}
	t.Logf("loads %v, overflow %d of %d", s.load, s.overflow, s.arrivals)
}

// TestPickBoundedAllocatesNothing covers the three paths: the first
// choice under its cap, a later one of the first pass's candidates, and
// the second pass.
func TestPickBoundedAllocatesNothing(t *testing.T) {
	for _, n := range []int{3, 16, 100} {
		p := NewPicker(equalPool(n))
		key := "203.0.113.9"
		order := p.Order(key, nil)
		for _, over := range []int{0, 1, min(boundedTop+1, n-1)} {
			load := make([]int64, n)
			for _, i := range order[:over] {
				load[i] = 1000
			}
			chosen, _ := p.PickBounded(key, nil, func(i int) int64 { return load[i] }, 1000, 1.25)
			if chosen != order[over] {
				t.Fatalf("%d upstreams, %d over cap: chose %d, want %d", n, over, chosen, order[over])
			}
			allocs := testing.AllocsPerRun(100, func() {
				_, _ = p.PickBounded(key, func(i int) bool { return true }, func(i int) int64 { return load[i] }, 1000, 1.25)
			})
			if allocs != 0 {
				t.Errorf("%d upstreams, %d over cap: %.1f allocations per pick", n, over, allocs)
			}
		}
	}
}

// BenchmarkPickBounded measures a bounded pick when the key's first choice
// is under its cap (one pass, as Pick), when it is over and the second is
// under (still one pass), and when the first boundedTop are over (two
// passes).
func BenchmarkPickBounded(b *testing.B) {
	for _, n := range []int{4, 16, 100} {
		for _, weighted := range []bool{false, true} {
			ups := equalPool(n)
			if weighted {
				ups[0].Weight = 2
			}
			p := NewPicker(ups)
			key := "203.0.113.9"
			order := p.Order(key, nil)
			for _, over := range []int{0, 1, boundedTop} {
				if over >= n {
					continue
				}
				load := make([]int64, n)
				for _, i := range order[:over] {
					load[i] = 1000
				}
				b.Run(fmt.Sprintf("upstreams=%d/weighted=%v/over=%d", n, weighted, over), func(b *testing.B) {
					b.ReportAllocs()
					for b.Loop() {
						_, _ = p.PickBounded(key, func(int) bool { return true }, func(i int) int64 { return load[i] }, 1000, 1.25)
					}
				})
			}
		}
	}
}

// TestBalanceFactorDocCaps keeps the table of caps in
// docs/balance-factor.md true: each row's caps are what Picker.Caps
// gives for its weights, usable set, connections and factor. The worked
// example's prose uses the same figures.
func TestBalanceFactorDocCaps(t *testing.T) {
	raw, err := os.ReadFile("docs/balance-factor.md")
	if err != nil {
		t.Fatal(err)
	}
	table := section(t, string(raw), "### The caps in numbers")
	rows := 0
	for line := range strings.SplitSeq(table, "\n") {
		cells := strings.Split(strings.Trim(line, "| "), " | ")
		if len(cells) != 4 || cells[0] == "weights" || strings.HasPrefix(cells[0], "---") {
			continue
		}
		rows++
		t.Run(strings.Join(cells[:3], " "), func(t *testing.T) {
			var ups []PickerUpstream
			var usable []bool
			for i, w := range strings.Split(cells[0], ", ") {
				ups = append(ups, PickerUpstream{Dial: fmt.Sprintf("10.0.0.%d:5432", i+1), Weight: 1})
				usable = append(usable, w != "-")
				if w != "-" {
					n, err := strconv.Atoi(w)
					if err != nil {
						t.Fatalf("weight %q: %v", w, err)
					}
					ups[i].Weight = n
				}
			}
			conns, err := strconv.ParseInt(cells[1], 10, 64)
			if err != nil {
				t.Fatalf("connections %q: %v", cells[1], err)
			}
			caps := NewPicker(ups).Caps(nil, func(i int) bool { return usable[i] }, conns-1, parseFactor(t, cells[2]))
			got := make([]string, len(caps))
			for i, c := range caps {
				got[i] = "-"
				if c >= 0 {
					got[i] = strconv.FormatInt(c, 10)
				}
			}
			if g := strings.Join(got, ", "); g != cells[3] {
				t.Errorf("caps %s, the docs say %s", g, cells[3])
			}
		})
	}
	if rows < 5 {
		t.Errorf("found %d rows in the table of caps", rows)
	}
}
