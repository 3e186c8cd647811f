// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"fmt"
	"strings"
	"time"
)

// This file is the one answer to "may a new connection go to this
// upstream, and if not, why?". Routing (handler.go), the admin API
// (inspect.go), the metrics (metrics.go) and the status page all ask it;
// none decides for itself.

// unusable is the set of reasons a handler would not offer a new
// connection to an upstream; none means it is usable.
type unusable uint8

const (
	// downByActive: this handler runs active checks, and they last found
	// the upstream down.
	downByActiveChecks unusable = 1 << iota
	// downByFailedDials: this handler counts failed dials, and max_fails of
	// them within fail_duration hold the upstream down.
	downByFailedDials
	// atMaxConnections: the upstream has max_connections open (counted
	// over every handler that names it).
	atMaxConnections
	// standby: the upstream is usable by itself, but a lower tier has a
	// usable upstream and serves (servingTier); a new connection goes to
	// it only if every usable upstream of the tiers below fails to answer.
	// Only usabilityIn says it: the dial path gets the same answer by
	// going through the tiers in order.
	standby
	// drainedByOperator: an operator drained it (POST
	// /godist/upstreams/state): its keys go to their next choice, and its
	// open connections flow on.
	drainedByOperator
	// inMaintenance: an operator put it in maintenance.
	inMaintenance
)

// downReasons is the part of the reasons that is about health, not room.
const downReasons = downByActiveChecks | downByFailedDials

// operatorReasons is the part that an operator set. Unlike health, which
// can be wrong, an operator's word holds in every pass of the dial: an
// upstream drained or in maintenance takes no new connection even when
// every other upstream is down.
const operatorReasons = drainedByOperator | inMaintenance

// usability says whether handler h would offer a new connection to u at
// *now (unix nanoseconds; if 0, the clock is read into it, only if it
// matters), and if not, why. It changes nothing.
func (h *Handler) usability(u *upstream, now *int64) unusable {
	var why unusable
	active, passive := u.state.down(now)
	if active && h.HealthChecks.Active != nil {
		why |= downByActiveChecks
	}
	if passive && h.passive {
		why |= downByFailedDials
	}
	if u.full() {
		why |= atMaxConnections
	}
	switch u.op {
	case opDrain:
		why |= drainedByOperator
	case opMaint:
		why |= inMaintenance
	case opReady:
	}
	return why
}

// servingTier returns the index, in m.tiers, of the tier that serves new
// connections at *now: the lowest that has a usable upstream; -1 when no
// tier has one (the dial path then tries the unhealthy ones, tier by
// tier). It changes nothing.
func (h *Handler) servingTier(m *membership, now *int64) int {
	for k := range m.tiers {
		for _, i := range m.tiers[k].members {
			if h.usability(m.pool[i], now) == 0 {
				return k
			}
		}
	}
	return -1
}

// usabilityIn is usability within membership m, whose serving tier is
// m.tiers[serving] (from servingTier): an upstream usable by itself in a
// tier above the serving one is standby.
func (h *Handler) usabilityIn(m *membership, i, serving int, now *int64) unusable {
	u := m.pool[i]
	why := h.usability(u, now)
	if why == 0 && serving >= 0 && u.tier > m.tiers[serving].number {
		why |= standby
	}
	return why
}

// down reports what holds the upstream down, whichever handler's view:
// the active checks of a config that still runs them, and failed dials
// within their fail_duration. now is read from the clock, into *now, only
// if failed dials are on record and it is 0.
func (st *upstreamState) down(now *int64) (active, passive bool) {
	active = st.activeCheckers.Load() > 0 && st.activeDown.Load()
	if until := st.downUntil.Load(); until != 0 {
		if *now == 0 {
			*now = time.Now().UnixNano()
		}
		passive = *now < until
	}
	return active, passive
}

// describe says why in words, for the admin API, the status page and the
// logs; "" when the upstream is usable. servingTier is the number of the
// tier that serves, for a standby upstream.
func (why unusable) describe(u *upstream, servingTier int) string {
	var parts []string
	switch {
	case why&downReasons == downReasons:
		parts = append(parts, "down by active checks and failed dials")
	case why&downByActiveChecks != 0:
		parts = append(parts, "down by active checks")
	case why&downByFailedDials != 0:
		parts = append(parts, "down by failed dials")
	}
	if why&atMaxConnections != 0 {
		parts = append(parts, fmt.Sprintf("at max_connections (%d)", u.maxConns))
	}
	if why&drainedByOperator != 0 {
		parts = append(parts, "drained by an operator")
	}
	if why&inMaintenance != 0 {
		parts = append(parts, "in maintenance, set by an operator")
	}
	if why&standby != 0 {
		parts = append(parts, "standby: "+tierLabel(servingTier)+" serves")
	}
	return strings.Join(parts, "; ")
}

// full reports whether u is at its max_connections, so that a new
// connection would not be offered to it (upstream.reserve is what holds
// the line, atomically, when one is dialled).
func (u *upstream) full() bool {
	return u.maxConns > 0 && u.state.active.Load() >= int64(u.maxConns)
}
