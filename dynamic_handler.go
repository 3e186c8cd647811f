// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"bytes"
	"encoding/json"
	"slices"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

// This file wires a handler to its dynamic upstream source: it watches
// the source in the background, turns each good set it delivers into a
// new membership (membership.go), keeps the health checks in step with
// it, and logs each change with the share of keys it moved.
//
// Who does what:
//   - The source's watch runs on one goroutine of the handler (counted in
//     h.goroutines, ending with h.runCtx) and calls setDiscovered with
//     each set, one at a time.
//   - setDiscovered builds and swaps in the new membership under
//     h.memberMu, so that it and Cleanup never interleave, and never
//     blocks a connection: connections only load the membership pointer.
//   - Measuring the keys that moved (keySpaceMoves, bounded by
//     changeKeyScores) happens after the swap, on the watch goroutine,
//     outside the lock.

// firstSetWait bounds how long Provision waits for a source's first
// lookup, when no config before it left a last good set to start from:
// long enough for a resolver that answers, short enough that a dead one
// does not hold up the config (its static upstreams, if any, serve, and
// the set joins them whenever a lookup succeeds).
const firstSetWait = 2 * time.Second

// changeKeyScores bounds the score evaluations spent on measuring the
// keys a change of membership moved: the full 100,000-key sample up to
// 20 upstreams in the two lists together, and 0.1 s of one core or less.
const changeKeyScores = 2_000_000

// lastGoodSets holds the last good set of each source in use, keyed by
// the source's JSON config, so that a reloaded config with the same source
// starts from the set the config before it found instead of from nothing:
// connections keep flowing to the same upstreams through a reload, with
// their health, and no connection arrives to an empty membership while
// the first lookup runs. Each handler with a source holds one reference.
var lastGoodSets = caddy.NewUsagePool()

// lastGoodSet is the last set a source delivered to a handler.
type lastGoodSet struct {
	key string
	mu  sync.Mutex
	set []DiscoveredUpstream
}

// Destruct implements caddy.Destructor; there is nothing to release.
func (*lastGoodSet) Destruct() error { return nil }

func loadLastGoodSet(key string) (*lastGoodSet, error) {
	v, _, err := lastGoodSets.LoadOrNew(key, func() (caddy.Destructor, error) {
		return &lastGoodSet{key: key}, nil
	})
	if err != nil {
		return nil, err
	}
	return v.(*lastGoodSet), nil
}

func (s *lastGoodSet) load() []DiscoveredUpstream {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.set)
}

func (s *lastGoodSet) store(set []DiscoveredUpstream) {
	s.mu.Lock()
	s.set = slices.Clone(set)
	s.mu.Unlock()
}

func (s *lastGoodSet) release() { _, _ = lastGoodSets.Delete(s.key) }

// sourceKey is a source's JSON config with insignificant white space
// removed: what identifies it across configs.
func sourceKey(raw json.RawMessage) string {
	var b bytes.Buffer
	if err := json.Compact(&b, raw); err != nil {
		return string(raw) // Caddy will refuse it, with the reason
	}
	return b.String()
}

// watchSource starts the source's watch on a goroutine of the handler.
// Unless seeded (the membership already holds a last good set), it waits
// for the first lookup to end, firstSetWait at most, so that the config
// starts with the upstreams it finds.
func (h *Handler) watchSource(seeded bool) {
	first := make(chan struct{})
	var once sync.Once
	firstDone := func() { once.Do(func() { close(first) }) }
	h.goroutines.Go(func() {
		if rr, ok := h.source.(roundReporter); ok {
			rr.watchRounds(h.runCtx, h.setDiscovered, firstDone)
			return
		}
		// A source of another package tells only of sets it found.
		h.source.Watch(h.runCtx, func(set []DiscoveredUpstream) {
			h.setDiscovered(set)
			firstDone()
		})
	})
	if seeded {
		return
	}
	t := time.NewTimer(firstSetWait)
	defer t.Stop()
	select {
	case <-first:
	case <-t.C:
		h.logger.Warn("starting before the dynamic upstreams' first lookup ended: their upstreams join as soon as it does",
			zap.Duration("waited", firstSetWait), zap.Int("static_upstreams", len(h.static)))
	}
}

// setDiscovered makes set (sorted by dial address, as sources deliver
// them; nil when a source withdraws its set) the handler's discovered
// upstreams, and logs what changed. It is the source's update callback.
func (h *Handler) setDiscovered(set []DiscoveredUpstream) {
	h.memberMu.Lock()
	if h.closed {
		h.memberMu.Unlock()
		return
	}
	before := h.members.Load()
	after := h.installLocked(set)
	logIt := h.started
	h.memberMu.Unlock()
	h.lastSet.store(set)
	if !logIt {
		return // Provision logs the membership it starts with
	}
	if change := diffMemberships(before, after); !change.empty() {
		h.logChange(before, after, change)
	}
}

// installLocked builds the membership of the static upstreams and the
// discovered set, swaps it in, starts and stops check loops to match, and
// releases the upstreams that left. The caller holds h.memberMu.
//
// An upstream that stays, with the same weight and tier, is the same
// *upstream in the new membership; one whose weight or tier changed is a
// copy sharing its state (buildLocked copies one whose operator state
// changed, too); a new one takes a reference to the shared state
// of its dial address (so an address seen before, in this config or the
// one before, comes back with its health and counts), and one that left
// gives its reference back (its state lives on while a connection to it
// does).
func (h *Handler) installLocked(set []DiscoveredUpstream) *membership {
	current := h.members.Load()
	had := make(map[string]*upstream)
	if current != nil {
		for _, u := range current.pool[len(h.static):] {
			had[u.dial] = u
		}
	}
	pool := slices.Clip(slices.Clone(h.static))
	statics := make(map[string]bool, len(h.static))
	for _, u := range h.static {
		statics[u.dial] = true
	}
	var shadowed []string
	for _, d := range set {
		switch u, ok := had[d.Dial]; {
		case statics[d.Dial]:
			shadowed = append(shadowed, d.Dial)
		case ok:
			delete(had, d.Dial)
			if u.weight != max(d.Weight, 1) || u.tier != d.Tier || u.source != d.Source {
				moved := *u
				moved.weight, moved.tier, moved.source = max(d.Weight, 1), d.Tier, d.Source
				u = &moved
			}
			pool = append(pool, u)
		default:
			u, err := newDiscoveredUpstream(d)
			if err != nil {
				h.logger.Error("leaving out a discovered upstream", zap.String("upstream", d.Dial),
					zap.String("source", d.Source), zap.Error(err))
				continue
			}
			pool = append(pool, h.adopt(u))
		}
	}
	if len(shadowed) > 0 {
		if ce := h.logger.Check(zap.DebugLevel, "discovered upstreams that are static upstreams: the static ones count"); ce != nil {
			ce.Write(zap.Strings("upstreams", shadowed))
		}
	}
	h.noteMembersLocked(current, pool)
	m, _ := h.buildLocked(pool, h.opStore.snapshot(), time.Now())
	h.members.Store(m)
	h.syncCheckersLocked(m)
	for _, u := range had {
		u.releaseConfig()
	}
	return m
}

// noteMembersLocked records in the name's book the upstreams that join and
// leave with the change from before (nil at Provision) to pool, and wakes
// the operator goroutine for their ramps. The upstreams a handler starts
// with are added only if a config of its name ran before this one. The
// caller holds h.memberMu.
func (h *Handler) noteMembersLocked(before *membership, pool []*upstream) {
	now := time.Now()
	if before == nil {
		h.book.join(dialsOf(pool), now, h.book.config == h.ctx.Done())
		return
	}
	was := make(map[string]bool, len(before.pool))
	for _, u := range before.pool {
		was[u.dial] = true
	}
	var joined []string
	for _, u := range pool {
		if !was[u.dial] {
			joined = append(joined, u.dial)
		}
		delete(was, u.dial)
	}
	h.book.join(joined, now, false)
	left := make([]string, 0, len(was))
	for dial := range was {
		left = append(left, dial)
	}
	h.book.leave(left)
	if len(joined) > 0 && h.SlowStart > 0 {
		h.nudge.notify() // their ramps' next steps
	}
}

// logChange logs a change of membership at info: the lookups behind it,
// what changed, and the share of keys that moved, as POST /godist/plan would have estimated it:
// over the lowest tier of each, by the hash alone, as if every upstream
// were up. When either side has no upstream, every key moves.
func (h *Handler) logChange(before, after *membership, c memberChange) {
	statuses := h.source.Status()
	lookups := make([]string, len(statuses))
	for i, st := range statuses {
		lookups[i] = st.Source
	}
	fields := []zap.Field{
		zap.Strings("sources", lookups),
		zap.Strings("added", c.added),
		zap.Strings("removed", c.removed),
		zap.Strings("reweighted", c.reweighted),
		zap.Strings("retiered", c.retiered),
		zap.Int("upstreams", len(after.pool)),
		zap.Int("tiers", len(after.tiers)),
		zap.String("fingerprint", after.fingerprint),
		zap.String("previous_fingerprint", before.fingerprint),
	}
	b, a := before.hashTier(), after.hashTier()
	if len(b) == 0 || len(a) == 0 {
		fields = append(fields, zap.Float64("moved_share", 1))
	} else {
		ks, err := keySpaceMoves(h.runCtx, b, a, changeKeyScores)
		if err != nil {
			return // the config is being unloaded
		}
		fields = append(fields, zap.Float64("moved_share", ks.MovedShare),
			zap.Float64("moved_share_margin", ks.MovedShareMargin), zap.Int("sampled_keys", ks.SampledKeys))
	}
	h.logger.Info("upstreams changed", fields...)
}
