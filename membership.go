// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"cmp"
	"fmt"
	"slices"
	"strconv"
)

// This file holds a handler's membership: the upstreams it balances over
// at one moment, static and discovered, grouped in tiers, and how a key
// ranks them.
//
// The rules, for whoever changes the membership (dynamic_handler.go):
//   - A membership is immutable once newMembership has built it, and so is
//     every *upstream in its pool (the counters behind u.state are shared
//     atomics, not part of the upstream).
//   - The handler holds the current one in an atomic pointer. A change
//     builds a whole new membership and swaps it in, under the handler's
//     memberMu, so that changes happen one at a time.
//   - A connection loads the pointer once and uses that membership for its
//     whole dial (choice, failover, the debug line): it never sees half a
//     change. A connection that loaded the old membership just before a
//     swap may still dial an upstream that has just left; it holds its
//     own reference to the upstream's state (upstream.reserve), so that is
//     safe, and the next connection uses the new set.

// Tier numbers. A tier serves only when no lower tier has a usable
// upstream. SRV priorities (0-65535) are tiers as they are; a static
// upstream takes `tier <n>`, or `backup`, the last tier of all.
const (
	// BackupTier is the tier of a static upstream marked `backup` in the
	// Caddyfile: above every SRV priority, so that it serves only when no
	// other upstream, static or discovered, is usable.
	BackupTier = 65536

	maxTier = BackupTier
)

// sourceStatic is the source of an upstream listed in the config.
const sourceStatic = "static"

// membership is the upstreams a handler balances over at one moment: its
// static upstreams and the last good set of its dynamic source, if any,
// grouped in tiers. See the rules at the top of this file.
type membership struct {
	// pool holds the static upstreams in config order, then the
	// discovered ones sorted by dial address. An upstream's index in pool
	// is what the dial path, the session and the admin API know it by.
	pool []*upstream

	// tiers holds the tiers that have upstreams, lowest number first.
	tiers []tier

	fingerprint string // the first 16 hex digits of digested's SHA-256
	digested    string // fingerprintText of the pool

	// weights holds each upstream's effective weight, what its tier's
	// picker ranks it by: its configured weight times the operator's
	// factor and its slow start ramp (operate.go); nil when every
	// upstream has its configured weight. The fingerprint digests the
	// configured weights, never these.
	weights []float64
	// ramps holds the slow start ramp of each upstream, by pool index;
	// nil when none ramps.
	ramps []ramp
}

// tier is the upstreams of one tier number, and the picker that ranks
// them for a key.
type tier struct {
	number  int
	members []int   // indexes into the membership's pool, in pool order
	picker  *Picker // over members, in the same order
}

// newMembership groups pool by tier and builds each tier's picker, over
// the configured weights. The dial addresses in pool must be distinct.
func newMembership(hashKey string, pool []*upstream) *membership {
	return newWeightedMembership(hashKey, pool, nil, nil)
}

// newWeightedMembership is newMembership with each tier's picker over
// the effective weights given by pool index (nil: the configured ones),
// and the ramps behind them, for inspection.
func newWeightedMembership(hashKey string, pool []*upstream, weights []float64, ramps []ramp) *membership {
	m := &membership{pool: pool, weights: weights, ramps: ramps}
	for i, u := range pool {
		j, found := slices.BinarySearchFunc(m.tiers, u.tier, func(t tier, n int) int { return cmp.Compare(t.number, n) })
		if !found {
			m.tiers = slices.Insert(m.tiers, j, tier{number: u.tier})
		}
		m.tiers[j].members = append(m.tiers[j].members, i)
	}
	for k := range m.tiers {
		t := &m.tiers[k]
		if weights != nil {
			dials, ws := make([]string, len(t.members)), make([]float64, len(t.members))
			for j, i := range t.members {
				dials[j], ws[j] = pool[i].dial, weights[i]
			}
			t.picker = newWeightedPicker(dials, ws)
			continue
		}
		ups := make([]PickerUpstream, len(t.members))
		for j, i := range t.members {
			ups[j] = PickerUpstream{Dial: pool[i].dial, Weight: pool[i].weight}
		}
		t.picker = NewPicker(ups)
	}
	m.digested = fingerprintText(hashKey, m.upstreamList())
	m.fingerprint = digest16(m.digested)
	return m
}

// weight returns the effective weight of upstream i: what its tier's
// picker ranks it by.
func (m *membership) weight(i int) float64 {
	if m.weights == nil {
		return float64(m.pool[i].weight)
	}
	return m.weights[i]
}

// upstreamList returns the pool as the config would list it: what the
// fingerprint digests.
func (m *membership) upstreamList() []*Upstream {
	out := make([]*Upstream, len(m.pool))
	for i, u := range m.pool {
		out[i] = &Upstream{Dial: u.dial, Weight: u.weight, Tier: u.tier}
	}
	return out
}

// pick returns the pool index of the upstream that key goes to among the
// upstreams of tier t that ok accepts (ok takes pool indexes), or -1 if
// there is none. It allocates nothing.
func (t *tier) pick(key string, ok func(i int) bool) int {
	j := t.picker.Pick(key, func(j int) bool { return ok(t.members[j]) })
	if j < 0 {
		return -1
	}
	return t.members[j]
}

// order appends the pool indexes of every upstream to dst in key's order
// of preference over the whole membership: the lowest tier's rendezvous
// order, then the next tier's, and so on. It allocates, as Picker.Order
// does: it serves inspection and the failover counts, not the choice.
func (m *membership) order(key string, dst []int) []int {
	var scratch []int
	for k := range m.tiers {
		t := &m.tiers[k]
		scratch = t.picker.Order(key, scratch[:0])
		for _, j := range scratch {
			dst = append(dst, t.members[j])
		}
	}
	return dst
}

// hashTier returns the upstreams of the lowest tier: where every key goes
// by the hash alone, as if every upstream were up. What a change of
// membership moves is measured over these (keySpaceMoves).
func (m *membership) hashTier() []PickerUpstream {
	if len(m.tiers) == 0 {
		return nil
	}
	t := &m.tiers[0]
	out := make([]PickerUpstream, len(t.members))
	for j, i := range t.members {
		out[j] = PickerUpstream{Dial: m.pool[i].dial, Weight: m.pool[i].weight}
	}
	return out
}

// index returns the pool index of the upstream dialled at dial, or -1.
func (m *membership) index(dial string) int {
	return slices.IndexFunc(m.pool, func(u *upstream) bool { return u.dial == dial })
}

// memberChange is what changed between two memberships, for the log.
type memberChange struct {
	added, removed, reweighted, retiered []string
}

func (c memberChange) empty() bool {
	return len(c.added) == 0 && len(c.removed) == 0 && len(c.reweighted) == 0 && len(c.retiered) == 0
}

// diffMemberships says what changed from before to after, each list
// sorted: the dial addresses added and removed, and for those kept, a
// change of weight ("10.0.0.2:5432: weight 10 -> 30") or of tier.
func diffMemberships(before, after *membership) memberChange {
	var c memberChange
	old := make(map[string]*upstream, len(before.pool))
	for _, u := range before.pool {
		old[u.dial] = u
	}
	for _, u := range after.pool {
		was, ok := old[u.dial]
		delete(old, u.dial)
		switch {
		case !ok:
			c.added = append(c.added, u.dial)
			continue
		case was.weight != u.weight:
			c.reweighted = append(c.reweighted, fmt.Sprintf("%s: weight %d -> %d", u.dial, was.weight, u.weight))
		}
		if was.tier != u.tier {
			c.retiered = append(c.retiered, fmt.Sprintf("%s: tier %d -> %d", u.dial, was.tier, u.tier))
		}
	}
	for dial := range old {
		c.removed = append(c.removed, dial)
	}
	for _, list := range [][]string{c.added, c.removed, c.reweighted, c.retiered} {
		slices.Sort(list)
	}
	return c
}

// tierLabel is how the logs and the admin API's descriptions name a tier.
func tierLabel(n int) string {
	if n == BackupTier {
		return "backup tier (" + strconv.Itoa(n) + ")"
	}
	return "tier " + strconv.Itoa(n)
}
