// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net/netip"
)

// This file works out what a change of a handler's upstream list would
// do, before anyone makes it: which share of the keys would move, which
// flowing connections sit on upstreams that would go or whose keys would
// go elsewhere, and the new fingerprint. It changes nothing.
//
// Its cost is bounded whatever the lists: scoring one key against one
// upstream is the unit of work, and a plan makes at most planKeyScores
// of them for the key space and planLiveScores for the flowing
// connections, sampling fewer keys and connections when the lists are
// long, and it stops as soon as its context is done.

// planSampleKeys is how many keys a plan hashes to estimate the share of
// the key space that moves, when planKeyScores allows: the margin of an
// estimated share p is 1.96·sqrt(p(1-p)/n), 0.27 percentage points for a
// quarter of the keys.
const planSampleKeys = 100_000

// planMinSampleKeys is the fewest keys a plan samples, whatever the
// lists' length: a margin of at most 4.4 percentage points. A plan
// samples that few only beyond 24,000 upstreams in the two lists
// together, which maxPlanUpstreams leaves to a running config of more
// than 4,000.
const planMinSampleKeys = 500

// planKeyScores bounds the score evaluations (one key against one
// upstream) that estimating the key space may take: each sampled key is
// scored against every upstream of both lists, so the sample is
// planKeyScores / (upstreams before + after) keys, between
// planMinSampleKeys and planSampleKeys. BenchmarkKeySpaceMoves measured
// a score at 26 to 36 ns with equal weights and 60 to 72 ns with unequal
// ones (a logarithm more) on the 2-core AMD EPYC this was written on, so
// this is 0.3 to 0.9 s of one core. Lists of up to 120 upstreams together
// get the whole sample; 1,000 and 1,000 get 6,000 keys, 10,000 and 3 get
// 1,199.
const planKeyScores = 12_000_000

// planLiveScores bounds the score evaluations that checking the flowing
// connections may take: each connection on a kept upstream is scored
// against every proposed upstream, and beyond planLiveScores / (proposed
// upstreams) of them an evenly spaced sample of that many is: all of
// 20,000 connections up to 100 proposed upstreams. At most 0.15 s of one
// core.
const planLiveScores = 2_000_000

// planCheckScores is how many score evaluations a plan makes between two
// looks at its context: 2 to 5 ms of work, so a plan stops within
// milliseconds of its client going away.
const planCheckScores = 1 << 16

// planSampleSeed fixes the sample, so that a plan gives the same answer
// every time and in every process; a smaller sample is the start of the
// same sequence.
const planSampleSeed = 0x676f64697374 // "godist"

// planResult is what POST /godist/plan answers.
type planResult struct {
	Handler        int            `json:"handler"`
	Fingerprint    string         `json:"fingerprint"`     // now
	NewFingerprint string         `json:"new_fingerprint"` // with the proposed upstreams
	KeySpace       keySpaceChange `json:"key_space"`
	Connections    liveChange     `json:"live_connections"`
}

// keySpaceChange is how the keys would move, estimated over a sample.
type keySpaceChange struct {
	Estimate    string  `json:"estimate"`
	SampledKeys int     `json:"sampled_keys"`
	MovedKeys   int     `json:"moved_keys"`
	MovedShare  float64 `json:"moved_share"`

	// MovedShareMargin is the 95% margin of MovedShare as an estimate of
	// the share of all keys that move: the true share lies within
	// MovedShare ± MovedShareMargin, by the normal approximation
	// 1.96·sqrt(p(1-p)/n) for the sampled share p of n sampled keys.
	// When no sampled key moves, or every one does, it is 3/n instead (the
	// "rule of three"), and when both lists hold the same upstreams with
	// the same weights, so that no key can move, it is 0. Rounded up to six
	// decimal places.
	MovedShareMargin float64 `json:"moved_share_margin"`

	// Every upstream of either list: the current ones in their order,
	// then the added ones in theirs.
	Upstreams []shareChange `json:"upstreams"`
}

// shareChange is an upstream's share of the sampled keys now and after
// the change, by the hash alone, as if every upstream were up.
type shareChange struct {
	Dial   string  `json:"dial"`
	Change string  `json:"change"` // "kept", "reweighted", "added" or "removed"
	Before float64 `json:"before"`
	After  float64 `json:"after"`
}

// liveChange is what the change would mean for the connections flowing
// through the handler now. They would not move: a flowing connection
// finishes on its upstream, even one the new list drops. A connection
// "would move" when its key would go to another upstream than the one it
// is on, so the next connection with the same key (the same client, with
// hash_key ip) lands elsewhere.
type liveChange struct {
	Total              int `json:"total"`
	OnRemovedUpstreams int `json:"on_removed_upstreams"`
	WouldMove          int `json:"would_move"` // including those on removed upstreams

	// KeysScored is how many connections on kept upstreams had their key
	// scored against the proposed list: all of them, unless there are
	// more than planLiveScores / (proposed upstreams), when an evenly
	// spaced sample of that many is, and WouldMove is an estimate.
	KeysScored int `json:"keys_scored"`

	// WouldMoveMargin is the 95% margin of WouldMove, in connections, when
	// it is estimated from a sample (computed as MovedShareMargin is); 0
	// when every connection's key was scored.
	WouldMoveMargin int `json:"would_move_margin"`
}

// validateProposed checks a proposed upstream list with the handler's own
// Validate, and fills in the default weight. source is the handler's
// dynamic upstream source, if it has one: then the list may be empty.
func validateProposed(ups []*Upstream, source UpstreamSource) error {
	if err := (&Handler{Upstreams: ups, source: source}).Validate(); err != nil {
		return err
	}
	for _, u := range ups {
		if u.Weight == 0 {
			u.Weight = 1
		}
	}
	return nil
}

// errNothingToPlanFrom is a plan's error when the handler has no
// upstreams now (a dynamic source that has found none, and no static
// ones): no key goes anywhere, so none can move.
var errNothingToPlanFrom = errors.New("the handler has no upstreams now: its dynamic source has found none, and it has no static ones")

// errNothingToPlanTo is a plan's error when the proposal leaves the
// handler no upstreams now: its dynamic source has found none.
var errNothingToPlanTo = errors.New("the proposal leaves the handler no upstreams now: its dynamic source has found none")

// plan works out what replacing the handler's static upstreams with
// proposed, a list that validateProposed accepted, would do, its
// discovered upstreams staying as they are now. Keys are compared over
// the lowest tier of each, where they go when every upstream is up. It
// returns ctx.Err() if ctx is done before it is, and errNothingToPlanFrom
// if the handler has no upstreams now.
func (h *Handler) plan(ctx context.Context, index int, proposed []*Upstream) (planResult, error) {
	m := h.members.Load()
	next := m.withStatic(h.HashKey, proposed, len(h.static))
	before, after := m.hashTier(), next.hashTier()
	switch {
	case len(before) == 0:
		return planResult{}, errNothingToPlanFrom
	case len(after) == 0:
		return planResult{}, errNothingToPlanTo
	}
	ks, err := keySpaceMoves(ctx, before, after, planKeyScores)
	if err != nil {
		return planResult{}, err
	}
	live, err := liveMoves(ctx, h.sessions.snapshot(), after, planLiveScores)
	if err != nil {
		return planResult{}, err
	}
	return planResult{
		Handler:        index,
		Fingerprint:    m.fingerprint,
		NewFingerprint: next.fingerprint,
		KeySpace:       ks,
		Connections:    live,
	}, nil
}

// withStatic returns the membership m would be with the static upstreams
// proposed in place of its first nStatic upstreams, for a plan: its
// upstreams are descriptions only, with no state, never to be dialled. A
// discovered upstream with the dial address of a proposed one is the
// proposed one, as it would be in the handler.
func (m *membership) withStatic(hashKey string, proposed []*Upstream, nStatic int) *membership {
	pool := make([]*upstream, 0, len(proposed)+len(m.pool)-nStatic)
	statics := make(map[string]bool, len(proposed))
	for _, u := range proposed {
		pool = append(pool, &upstream{dial: u.Dial, weight: max(u.Weight, 1), tier: u.Tier, source: sourceStatic})
		statics[u.Dial] = true
	}
	for _, u := range m.pool[nStatic:] {
		if !statics[u.dial] {
			pool = append(pool, u)
		}
	}
	return newMembership(hashKey, pool)
}

// keySpaceMoves estimates how replacing the upstreams before with those
// after would move the keys: the share of keys whose upstream changes,
// and each upstream's share before and after, by the hash alone, as if
// every upstream were up. The dial addresses of each list must be
// distinct, as Validate requires.
//
// It samples synthetic ip:port keys, the same ones every time, and scores
// each against every upstream of both lists; budget bounds those score
// evaluations, so the sample is budget / (len(before) + len(after)) keys,
// at least planMinSampleKeys and at most planSampleKeys. It looks at
// ctx every planCheckScores evaluations and returns ctx.Err() once ctx is
// done. It needs no handler: whatever proposes a change of upstreams can
// ask what it moves.
func keySpaceMoves(ctx context.Context, before, after []PickerUpstream, budget int) (keySpaceChange, error) {
	switch {
	case len(before) == 0:
		return keySpaceChange{}, errors.New("key space: no upstreams before the change")
	case len(after) == 0:
		return keySpaceChange{}, errors.New("key space: no upstreams after the change")
	}
	perKey := len(before) + len(after)
	n := min(planSampleKeys, max(planMinSampleKeys, budget/perKey))
	checkEvery := max(1, planCheckScores/perKey) // keys between looks at ctx

	bp, ap := NewPicker(before), NewPicker(after)
	beforeCount := make([]int, len(before))
	afterCount := make([]int, len(after))
	moved := 0
	r := rand.New(rand.NewPCG(planSampleSeed, planSampleSeed)) //nolint:gosec // a fixed, reproducible sample, not a secret
	buf := make([]byte, 0, len("255.255.255.255:65535"))
	for k := range n {
		if k%checkEvery == 0 {
			if err := ctx.Err(); err != nil {
				return keySpaceChange{}, err
			}
		}
		v := r.Uint32()
		ip := netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
		buf = netip.AddrPortFrom(ip, uint16(1024+r.IntN(65536-1024))).AppendTo(buf[:0])
		key := string(buf)
		b, a := bp.Pick(key, nil), ap.Pick(key, nil)
		beforeCount[b]++
		afterCount[a]++
		if before[b].Dial != after[a].Dial {
			moved++
		}
	}

	share := func(count int) float64 { return float64(count) / float64(n) }
	ks := keySpaceChange{
		Estimate:    fmt.Sprintf("from %d synthetic ip:port keys, the same every time", n),
		SampledKeys: n,
		MovedKeys:   moved,
		MovedShare:  share(moved),
	}
	if n < planSampleKeys {
		ks.Estimate += fmt.Sprintf(" (fewer than %d, to bound the cost of scoring each against %d upstreams)", planSampleKeys, perKey)
	}
	afterIndex := make(map[string]int, len(after))
	for j, u := range after {
		afterIndex[u.Dial] = j
	}
	current := make(map[string]bool, len(before))
	same := len(before) == len(after)
	for i, u := range before {
		current[u.Dial] = true
		sc := shareChange{Dial: u.Dial, Change: "removed", Before: share(beforeCount[i])}
		if j, ok := afterIndex[u.Dial]; ok {
			sc.After = share(afterCount[j])
			sc.Change = "kept"
			if max(after[j].Weight, 1) != max(u.Weight, 1) {
				sc.Change = "reweighted"
			}
		}
		same = same && sc.Change == "kept"
		ks.Upstreams = append(ks.Upstreams, sc)
	}
	for j, u := range after {
		if !current[u.Dial] {
			ks.Upstreams = append(ks.Upstreams, shareChange{Dial: u.Dial, Change: "added", After: share(afterCount[j])})
		}
	}
	if !same {
		ks.MovedShareMargin = shareMargin(moved, n)
	}
	return ks, nil
}

// shareMargin is the 95% margin of a share estimated as x of n samples:
// 1.96·sqrt(p(1-p)/n) by the normal approximation, or, where that says
// nothing because x is 0 or n, 3/n by the rule of three; rounded up to
// six decimal places, which is all it means.
func shareMargin(x, n int) float64 {
	m := 3 / float64(n)
	if x != 0 && x != n {
		p := float64(x) / float64(n)
		m = 1.96 * math.Sqrt(p*(1-p)/float64(n))
	}
	return math.Ceil(m*1e6) / 1e6
}

// liveMoves works out which of the flowing connections sessions would
// have their key go elsewhere with the upstreams after. A connection on
// an upstream that after drops would; one on a kept upstream would when
// its key's first choice in after is another upstream, which takes
// scoring its key against every upstream of after. budget bounds those
// score evaluations: beyond budget / len(after) connections on kept
// upstreams, an evenly spaced sample of that many is scored, and the
// count of those that would move is an estimate. It returns ctx.Err() once
// ctx is done.
func liveMoves(ctx context.Context, sessions []liveSession, after []PickerUpstream, budget int) (liveChange, error) {
	live := liveChange{Total: len(sessions)}
	kept := make(map[string]bool, len(after))
	for _, u := range after {
		kept[u.Dial] = true
	}
	var onKept []liveSession
	for _, s := range sessions {
		if kept[s.upstream] {
			onKept = append(onKept, s)
		} else {
			live.OnRemovedUpstreams++
		}
	}
	live.WouldMove = live.OnRemovedUpstreams
	if len(onKept) == 0 {
		return live, nil
	}

	ap := NewPicker(after)
	m := min(len(onKept), max(1, budget/len(after)))
	checkEvery := max(1, planCheckScores/len(after))
	moved := 0
	for k := range m {
		if k%checkEvery == 0 {
			if err := ctx.Err(); err != nil {
				return liveChange{}, err
			}
		}
		s := onKept[int64(k)*int64(len(onKept))/int64(m)] // every one when m == len(onKept)
		if after[ap.Pick(s.key, nil)].Dial != s.upstream {
			moved++
		}
	}
	live.KeysScored = m
	if m == len(onKept) {
		live.WouldMove += moved
		return live, nil
	}
	scale := float64(len(onKept)) / float64(m)
	live.WouldMove += int(math.Round(float64(moved) * scale))
	live.WouldMoveMargin = int(math.Ceil(shareMargin(moved, m) * float64(len(onKept))))
	return live, nil
}
