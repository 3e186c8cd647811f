// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"fmt"
	"math"
	"sync"
	"sync/atomic"
)

// This file applies bounded loads (balance_factor) to a handler: the
// counts the caps are made of, and the pick that respects them. The
// algorithm itself is the picker's (Picker.PickBounded, picker.go).
//
// The counts are the handler's own, kept in two places:
//   - handlerLoads.total: the connections this handler has open or is
//     dialling now, over all its upstreams;
//   - upstream.load: those of them on one upstream.
//
// Both move together, in upstream.reserve and upstream.release, for every
// connection, whether or not a balance factor is set. They differ from an
// upstream's shared count (upstreamState.active, what max_connections and
// the metrics count), which adds up every handler and config that names
// the dial address: a handler caps only its own connections, as HAProxy's
// backend caps its own servers' counts.
//
// With a balance factor, picking an upstream and counting the connection
// on it happen together under handlerLoads.mu, so that two connections
// arriving at once cannot both take an upstream's last place under its
// cap. The dial itself happens outside the lock.

// handlerLoads is a handler's connection counts for bounded loads.
type handlerLoads struct {
	mu    sync.Mutex   // held from a bounded pick to the reserve of its choice
	total atomic.Int64 // connections open or being dialled, over all upstreams
}

// validateBalanceFactor checks a balance_factor value: 0 (off), or a finite
// number above 1.
func validateBalanceFactor(c float64) error {
	if c == 0 {
		return nil
	}
	if math.IsNaN(c) || math.IsInf(c, 0) || c <= 1 {
		return fmt.Errorf("balance_factor %v: must be above 1 (1.25 lets no upstream hold more than a quarter above its share), or 0 for off", c)
	}
	return nil
}

// adopt makes u count its connections into this handler's loads; every
// upstream a handler dials is adopted once, when it joins the handler.
func (h *Handler) adopt(u *upstream) *upstream {
	u.load = new(atomic.Int64)
	u.handlerTotal = &h.loads.total
	return u
}

// pickBounded is the dial path's pick in a tier when a balance factor is
// set: the key's first upstream under its cap among those ok accepts,
// reserved (counted) before the lock is let go, and the key's first choice
// among them, for the overflow count. It returns -1 for chosen when there
// is none or none could be reserved; full marks upstreams found at
// max_connections.
func (h *Handler) pickBounded(m *membership, t *tier, key string, ok func(i int) bool, full *bitset) (chosen, first int) {
	h.loads.mu.Lock()
	defer h.loads.mu.Unlock()
	for {
		j, f := t.picker.PickBounded(key,
			func(j int) bool { return ok(t.members[j]) },
			func(j int) int64 { return m.pool[t.members[j]].load.Load() },
			h.loads.total.Load(), h.BalanceFactor)
		if j < 0 {
			return -1, -1
		}
		i := t.members[j]
		if m.pool[i].reserve() {
			return i, t.members[f]
		}
		full.set(i) // at max_connections: ok turns it away from now on
	}
}
