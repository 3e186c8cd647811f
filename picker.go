// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"math"
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
	seeded xxhash.Digest
	weight float64
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
