// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"math"
	"math/bits"
	"slices"

	"github.com/cespare/xxhash/v2"
)

// HashVersion names the scoring function below. It is part of the
// fingerprint operators compare across Caddy instances: if the way a
// key is scored ever changes, this changes with it.
const HashVersion = "hrw-xxhash64-v1"

// Picker ranks upstreams for a key by weighted rendezvous hashing, also
// called highest-random-weight hashing
// (https://en.wikipedia.org/wiki/Rendezvous_hashing, weighted form from
// Schindelhauer and Schomaker, "Weighted Distributed Hash Tables", 2005).
//
// Every upstream gets a score for a key; the key goes to the upstream with
// the highest score, and the rest of the upstreams, highest score first,
// are the key's failover order. Consequences:
//
//   - Adding or removing an upstream moves only the keys that must move:
//     those the new upstream now wins, or those the removed one had won.
//   - Skipping an unusable upstream moves only its own keys, each to its
//     own next choice, so they spread over the others instead of piling
//     onto one neighbour.
//   - The score depends only on the dial address, the weight and the key,
//     never on a per-process seed, so every process with the same upstream
//     list agrees on every key without sharing state.
//
// An upstream's raw score is the 64-bit xxhash of its dial address followed
// by the key: exactly what Caddy's HTTP reverse_proxy hashes for its
// ip_hash, uri_hash, header and cookie policies. With equal weights the
// raw scores are compared directly, so a pool behind both an HTTP route and
// a layer-4 route sends a key to the same upstream from either. With
// unequal weights the score is w / -ln(h / 2^64), which gives each upstream
// a share of the key space proportional to its weight while keeping the
// properties above.
//
// A Picker is immutable after NewPicker and safe for concurrent use. Scoring
// a key allocates nothing.
type Picker struct {
	nodes []pickerNode
	// uniform is true when every weight is equal: then ranking by the raw
	// hash is the same as ranking by the weighted score, exact and cheaper.
	uniform bool
}

type pickerNode struct {
	// seeded holds the xxhash state after the dial address has been
	// written, so scoring a key hashes only the key's bytes.
	seeded    xxhash.Digest
	weight    float64
	intWeight uint64 // the same, for the integer arithmetic of bounded loads
}

// PickerUpstream is what the picker needs to know of an upstream.
type PickerUpstream struct {
	Dial   string
	Weight int
}

// NewPicker returns a picker over the upstreams, in the given order. A
// weight below 1 counts as 1.
func NewPicker(upstreams []PickerUpstream) *Picker {
	p := &Picker{nodes: make([]pickerNode, len(upstreams)), uniform: true}
	for i, u := range upstreams {
		w := max(u.Weight, 1)
		p.nodes[i].seeded.Reset()
		_, _ = p.nodes[i].seeded.WriteString(u.Dial)
		p.nodes[i].weight = float64(w)
		p.nodes[i].intWeight = uint64(w)
		if i > 0 && p.nodes[i].weight != p.nodes[0].weight {
			p.uniform = false
		}
	}
	return p
}

// Len returns the number of upstreams.
func (p *Picker) Len() int { return len(p.nodes) }

// score is an upstream's standing for one key: higher wins. hash breaks
// ties in weighted, which floating point can produce, so that with equal
// weights the order is exactly the order of the raw hashes.
type score struct {
	weighted float64
	hash     uint64
}

func (s score) beats(o score) bool {
	if s.weighted != o.weighted {
		return s.weighted > o.weighted
	}
	return s.hash > o.hash
}

func (p *Picker) score(i int, key string) score {
	d := p.nodes[i].seeded
	_, _ = d.WriteString(key)
	h := d.Sum64()
	if p.uniform {
		return score{hash: h}
	}
	return score{weighted: p.nodes[i].weight / negLogUnit(h), hash: h}
}

// negLogUnit returns -ln(h / 2^64), computed without losing the precision
// that matters: for h in the upper half, where h / 2^64 rounds towards 1
// in a float64, it works from the distance to 1 instead.
func negLogUnit(h uint64) float64 {
	const two64 = 1 << 64
	if h >= 1<<63 {
		// 1 - h/2^64 == (^h + 1) / 2^64
		return -math.Log1p(-(float64(^h) + 1) / two64)
	}
	if h == 0 {
		return math.Inf(1) // the lowest possible score, w / +Inf == 0
	}
	return -math.Log(float64(h) / two64)
}

// Pick returns the index of the upstream that key goes to among those for
// which usable returns true, or -1 if there is none. A nil usable accepts
// every upstream. Equal standings go to the earlier upstream in the list,
// as Caddy's own rendezvous hashing does.
func (p *Picker) Pick(key string, usable func(i int) bool) int {
	best := -1
	var bestScore score
	for i := range p.nodes {
		if usable != nil && !usable(i) {
			continue
		}
		s := p.score(i, key)
		if best < 0 || s.beats(bestScore) {
			best, bestScore = i, s
		}
	}
	return best
}

// Order appends the indexes of all upstreams to dst, in key's order of
// preference (the first is what Pick(key, nil) returns), and returns the
// extended slice. It allocates scratch space for the scores, so it serves
// inspection and planning; the per-connection path uses Pick.
func (p *Picker) Order(key string, dst []int) []int {
	start := len(dst)
	scores := make([]score, len(p.nodes))
	for i := range p.nodes {
		scores[i] = p.score(i, key)
		dst = append(dst, i)
	}
	slices.SortStableFunc(dst[start:], func(a, b int) int {
		switch {
		case scores[a].beats(scores[b]):
			return -1
		case scores[b].beats(scores[a]):
			return 1
		}
		return 0
	})
	return dst
}

// Consistent hashing with bounded loads
// (Mirrokni, Thorup and Zadimoghaddam, "Consistent Hashing with Bounded
// Loads", SODA 2018, https://arxiv.org/abs/1608.01350), on top of the
// rendezvous order above.
//
// Every usable upstream i gets a cap: c × (total + 1) × w(i) / W, rounded
// up, where c is the balance factor, total the connections active now (the
// caller's count: one handler's), w(i) the upstream's weight and W the sum
// of the weights of the usable upstreams. A new connection goes to the
// first upstream in its key's order of preference whose load is under its
// cap. While every upstream is under its cap the picks are exactly Pick's;
// the connections of a hot key that overflow go each to the key's next
// choice under cap, and since every key has its own random order (unlike a
// ring, where they would all go to the one next server), the overflow of
// one upstream spreads over all the others.
//
// W counts the usable upstreams only. An unusable upstream (down, at its
// max_connections, not in the serving tier) has no cap and takes nothing,
// and its share of the load is spread over the others in proportion to
// their weights. Were its weight left in W, the caps of the usable ones
// would add up to less than c × (total + 1): with c = 1.25 and one of four
// equal upstreams down, to 0.94 × (total + 1), so that as load grew every
// usable upstream would end up over its cap, and the cap would stop
// meaning anything. Counting the usable ones only, the caps add up to at
// least c × (total + 1) > total, so as long as the loads of the usable
// upstreams add up to no more than total and c ≥ 1, one of them is always
// under its cap.
//
// c counts to three decimal places (it is rounded to thousandths, as
// HAProxy's hash-balance-factor counts in hundredths), so that a cap is
// computed in integers and is exact: ⌈1.1 × 10⌉ is 11, not the 12 that
// floating point would give.

// boundedTop is how many of a key's best-scoring usable upstreams the first
// pass of PickBounded keeps, in order. Only when all of them are over their
// caps does it take a second pass over the upstreams.
const boundedTop = 4

// ranked is an upstream and its score for one key.
type ranked struct {
	i int
	s score
}

// before reports whether a comes before b in the key's order: the higher
// score first, the earlier upstream on a tie, as Pick and Order have it.
func (a ranked) before(b ranked) bool {
	if a.s.beats(b.s) {
		return true
	}
	return !b.s.beats(a.s) && a.i < b.i
}

// PickBounded returns the upstream a new connection with key goes to under
// bounded loads, and the key's first choice among the usable upstreams,
// or -1 for both if none is usable. The connection was an overflow pick
// when chosen != first. It is consistent hashing with bounded loads
// (Mirrokni, Thorup and Zadimoghaddam, https://arxiv.org/abs/1608.01350)
// over the rendezvous order; the comment before boundedTop says how the
// caps are made and why W counts the usable upstreams only.
//
// usable is as for Pick (nil accepts every upstream). load(i) is the
// number of connections on upstream i now, and total the connections
// active now over all upstreams; load is called for usable upstreams only.
// factor is the balance factor c, above 1; a factor that is 0, negative,
// NaN or infinite means no cap, and PickBounded returns what Pick returns.
// If every usable upstream is over its cap, which cannot happen when the
// loads of the usable upstreams add up to at most total and factor is at
// least 1, the connection goes to the key's first choice.
//
// usable may be called twice for an upstream, in a second pass that runs
// only when the key's boundedTop best usable upstreams are all over their
// caps; it should give the same answer both times (an answer that changes
// in between costs one pick its exact caps, nothing more).
//
// It allocates nothing. Its cost is Pick's, plus a second pass in the
// rare case above.
func (p *Picker) PickBounded(key string, usable func(i int) bool, load func(i int) int64, total int64, factor float64) (chosen, first int) {
	milli, ok := factorMilli(factor)
	if !ok {
		i := p.Pick(key, usable)
		return i, i
	}
	// First pass: the sum of the usable weights, and the boundedTop best
	// usable upstreams in order, by insertion.
	var top [boundedTop]ranked
	kept := 0
	var usableWeight uint64
	for i := range p.nodes {
		if usable != nil && !usable(i) {
			continue
		}
		usableWeight += p.nodes[i].intWeight
		r := ranked{i: i, s: p.score(i, key)}
		if kept == len(top) && !r.before(top[len(top)-1]) {
			continue
		}
		j := min(kept, len(top)-1)
		for j > 0 && r.before(top[j-1]) {
			top[j] = top[j-1]
			j--
		}
		top[j] = r
		if kept < len(top) {
			kept++
		}
	}
	if kept == 0 {
		return -1, -1
	}
	first = top[0].i
	under := func(i int) bool {
		return load(i) < boundedCap(milli, total, p.nodes[i].intWeight, usableWeight)
	}
	for _, r := range top[:kept] {
		if under(r.i) {
			return r.i, first
		}
	}
	if kept < len(top) {
		return first, first // every usable upstream is over its cap
	}
	// Second pass: the best usable upstream under its cap among those after
	// the ones already looked at.
	last := top[kept-1]
	best := ranked{i: -1}
	for i := range p.nodes {
		if usable != nil && !usable(i) {
			continue
		}
		r := ranked{i: i, s: p.score(i, key)}
		if !last.before(r) || (best.i >= 0 && !r.before(best)) {
			continue
		}
		if under(i) {
			best = r
		}
	}
	if best.i < 0 {
		return first, first
	}
	return best.i, first
}

// Caps appends to dst, for each upstream in order, its cap under bounded
// loads with total connections active and the balance factor given (as
// for PickBounded), or -1 where there is none: for an unusable upstream, and
// for every upstream when factor means no cap. It serves inspection; it
// allocates only to grow dst.
func (p *Picker) Caps(dst []int64, usable func(i int) bool, total int64, factor float64) []int64 {
	milli, ok := factorMilli(factor)
	var usableWeight uint64
	if ok {
		for i := range p.nodes {
			if usable == nil || usable(i) {
				usableWeight += p.nodes[i].intWeight
			}
		}
	}
	for i := range p.nodes {
		c := int64(-1)
		if ok && (usable == nil || usable(i)) {
			c = boundedCap(milli, total, p.nodes[i].intWeight, usableWeight)
		}
		dst = append(dst, c)
	}
	return dst
}

// maxFactorMilli bounds the balance factor at a million, where a cap no
// longer caps anything, so that the integer arithmetic of boundedCap has
// room.
const maxFactorMilli = 1_000_000_000

// factorMilli returns the balance factor in thousandths, rounded, and
// whether it caps anything at all.
func factorMilli(factor float64) (uint64, bool) {
	if !(factor > 0) || math.IsInf(factor, 1) {
		return 0, false
	}
	m := math.Round(factor * 1000)
	if m < 1 {
		m = 1
	}
	return uint64(min(m, maxFactorMilli)), true
}

// boundedCap returns ⌈milli/1000 × (total + 1) × w / usableWeight⌉, in
// integers while the product fits in 64 bits, in floating point beyond (at
// caps so far beyond any real load that rounding cannot matter). A total
// below zero counts as zero.
func boundedCap(milli uint64, total int64, w, usableWeight uint64) int64 {
	n := uint64(max(total, 0)) + 1
	hi1, a := bits.Mul64(milli, n)
	hi2, num := bits.Mul64(a, w)
	hi3, den := bits.Mul64(1000, usableWeight)
	if hi1 == 0 && hi2 == 0 && hi3 == 0 && den > 0 {
		q := num / den
		if num%den != 0 {
			q++
		}
		if q <= math.MaxInt64 {
			return int64(q)
		}
		return math.MaxInt64
	}
	c := math.Ceil(float64(milli) / 1000 * float64(n) * float64(w) / float64(usableWeight))
	if c >= math.MaxInt64 {
		return math.MaxInt64
	}
	return int64(c)
}
