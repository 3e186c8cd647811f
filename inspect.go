// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"fmt"
	"slices"
	"time"
)

// This file reads what the running handlers know and would do, for the
// admin API, without changing any of it: no counter moves, no expired
// failure is cleared, nothing is logged. Each view is built from one
// reading of the clock, so its parts agree with each other.

// handlerStatus is a handler and the state of its upstreams, as
// GET /godist/upstreams shows them.
type handlerStatus struct {
	// Handler is the handler's index in provisioning order: what the
	// handler= parameter takes. It is stable only while the same config
	// runs; Fingerprint names what the handler does.
	Handler     int    `json:"handler"`
	Name        string `json:"name"` // what its operator states are kept under
	Fingerprint string `json:"fingerprint"`
	HashKey     string `json:"hash_key"`

	// The digest of the operator states in force for its name, as the
	// info metric reports it: "none" without any.
	OperatorState string `json:"operator_state"`

	Connections    int    `json:"connections"`     // flowing through this handler now
	MaxConnections int    `json:"max_connections"` // 0: no limit
	RejectedOver   uint64 `json:"rejected_over_max_connections"`
	RejectedFD     uint64 `json:"rejected_over_descriptors"`

	ActiveChecks bool   `json:"active_checks"` // whether this handler runs active checks
	FailDuration string `json:"fail_duration"` // "0s" when passive checks are off
	MaxFails     int    `json:"max_fails"`

	// The tier that serves new connections: the lowest with a usable
	// upstream; null when none has one.
	ServingTier *int `json:"serving_tier"`

	// balance_factor, when set, and the connections this handler has open
	// or is dialling now over all its upstreams: what its caps count.
	BalanceFactor      float64 `json:"balance_factor,omitempty"`
	HandlerConnections int64   `json:"handler_connections"`

	// Each lookup of the handler's dynamic_upstreams, if it has any: its
	// last success, failures and records.
	Sources []SourceStatus `json:"sources,omitempty"`

	Upstreams []upstreamStatus `json:"upstreams"`
}

// upstreamStatus is one upstream of a handler. Its health is the
// handler's view; its counts are per dial address, shared by every
// handler and config that names the upstream, as the metrics are.
type upstreamStatus struct {
	Dial   string `json:"dial"`
	Weight int    `json:"weight"`
	Tier   int    `json:"tier"`

	// "static", or the name of the lookup that found it
	// (`srv:_pg._tcp.db.internal`).
	Source string `json:"source"`
	// For a discovered upstream, when its lookup last succeeded: the set
	// it belongs to is at least that fresh.
	LastRefresh *time.Time `json:"last_refresh,omitempty"`

	MaxConnections    int            `json:"max_connections"` // 0: no limit
	Health            healthStatus   `json:"health"`
	ActiveConnections int64          `json:"active_connections"` // open or being dialled, over all handlers
	Full              bool           `json:"full"`               // at max_connections: skipped for new connections
	Totals            upstreamTotals `json:"totals"`

	// This handler's own connections to it, open or being dialled (what
	// balance_factor counts), and, with a balance factor, its cap now:
	// absent for an upstream that takes no new connection (unusable, or
	// not in the serving tier).
	HandlerConnections int64  `json:"handler_connections"`
	Cap                *int64 `json:"cap,omitempty"`

	// What its tier's picker weighs it by now: weight times the
	// operator's factor and its slow start ramp. With slow_start, an
	// upstream down, drained or in maintenance has the weight its ramp
	// will start from.
	EffectiveWeight float64 `json:"effective_weight"`
	// Its slow start ramp, while it ramps.
	SlowStart *rampStatus `json:"slow_start,omitempty"`
	// The state an operator set for it, under the handler's name; absent
	// when it is ready at its full weight.
	Operator *operatorStatus `json:"operator,omitempty"`
}

// rampStatus is an upstream's slow start ramp.
type rampStatus struct {
	Since  time.Time `json:"since"`  // when it became usable
	Until  time.Time `json:"until"`  // when it has its full weight
	Factor float64   `json:"factor"` // the fraction of its weight it has now
}

// operatorStatus is an upstream's operator record, with the connections
// that a drain, or a maint, leaves open to it.
type operatorStatus struct {
	opRecord

	// The connections this handler, and the configs of its name before
	// it, still have open to the upstream; for drain and maint only.
	RemainingConnections *int `json:"remaining_connections,omitempty"`
}

// healthStatus says whether a handler offers new connections to an
// upstream, and why not.
type healthStatus struct {
	Status string `json:"status"` // "up" or "down"

	// What took it down: "active_checks" (this handler's checks failed
	// health_fall times in a row) and "failed_dials" (max_fails failed
	// dials within fail_duration).
	DownBy []string `json:"down_by,omitempty"`

	// When it went down, or came back by an active check. Failed dials
	// are remembered only within fail_duration of each other, so for a
	// streak of them this is the earliest failed dial still remembered
	// that took it down. Absent when not known: an upstream that never
	// changed state, or one whose failed dials simply expired.
	Since *time.Time `json:"since,omitempty"`

	// When the failed dials stop keeping it down, unless more fail.
	DownUntil *time.Time `json:"down_until,omitempty"`

	RecentFailures int        `json:"recent_failures"` // failed dials within this handler's fail_duration
	LastFailedDial *time.Time `json:"last_failed_dial,omitempty"`
	LastCheck      *time.Time `json:"last_check,omitempty"`
	LastCheckError string     `json:"last_check_error,omitempty"`
}

// upstreamTotals are the upstream's counters since its state was made.
type upstreamTotals struct {
	Connections   uint64 `json:"connections"`
	DialFailures  uint64 `json:"dial_failures"`
	Failovers     uint64 `json:"failovers"`
	OverflowPicks uint64 `json:"overflow_picks"` // connections it was the first choice of but that balance_factor sent on
	SentBytes     uint64 `json:"sent_bytes"`
	ReceivedBytes uint64 `json:"received_bytes"`

	// Connections godist closed while they flowed, by why; absent while
	// there are none.
	Closed closedTotals `json:"closed_connections,omitzero"`
}

// closedTotals counts the connections to an upstream that godist closed.
type closedTotals struct {
	Maint         uint64 `json:"maint"`          // an operator put it in maintenance
	DrainDeadline uint64 `json:"drain_deadline"` // its drain reached its deadline
	OnDown        uint64 `json:"on_down"`        // on_down close, when the active checks marked it down
}

// Values of healthStatus.DownBy.
const (
	downByActive  = "active_checks"
	downByPassive = "failed_dials"
)

// status returns the handler's state and its upstreams', as of now.
func (h *Handler) status(index int, now time.Time) handlerStatus {
	m := h.members.Load()
	nanos := now.UnixNano()
	snap := h.opStore.snapshot()
	hs := handlerStatus{
		Handler:        index,
		Name:           h.name,
		Fingerprint:    m.fingerprint,
		HashKey:        h.hashKeyName(),
		OperatorState:  snap.digest,
		Connections:    h.sessions.len(),
		MaxConnections: h.MaxConnections,
		RejectedOver:   h.rejected.Load(),
		RejectedFD:     h.rejectedFD.Load(),
		ActiveChecks:   h.HealthChecks.Active != nil,
		FailDuration:   h.failWindow().String(),
		MaxFails:       h.HealthChecks.Passive.MaxFails,
		Upstreams:      make([]upstreamStatus, len(m.pool)),

		BalanceFactor:      h.BalanceFactor,
		HandlerConnections: h.loads.total.Load(),
	}
	serving := h.servingTier(m, &nanos)
	if serving >= 0 {
		hs.ServingTier = &m.tiers[serving].number
	}
	caps := h.caps(m, serving, &nanos)
	refreshed := make(map[string]*time.Time)
	if h.source != nil {
		hs.Sources = h.source.Status()
		for _, st := range hs.Sources {
			refreshed[st.Source] = timeOrNil(st.LastSuccess)
		}
	}
	for i, u := range m.pool {
		st := u.state
		hs.Upstreams[i] = upstreamStatus{
			Dial:              u.dial,
			Weight:            u.weight,
			Tier:              u.tier,
			Source:            u.source,
			LastRefresh:       refreshed[u.source],
			MaxConnections:    u.maxConns,
			Health:            h.healthStatus(u, now),
			ActiveConnections: st.active.Load(),
			Full:              u.full(),
			Totals: upstreamTotals{
				Connections:   st.total.Load(),
				DialFailures:  st.dialFailures.Load(),
				Failovers:     st.failovers.Load(),
				OverflowPicks: st.overflows.Load(),
				SentBytes:     st.bytesTo.Load(),
				ReceivedBytes: st.bytesFrom.Load(),
				Closed: closedTotals{
					Maint:         st.closed[closeMaint].Load(),
					DrainDeadline: st.closed[closeDrainDeadline].Load(),
					OnDown:        st.closed[closeOnDown].Load(),
				},
			},
			HandlerConnections: u.load.Load(),
			Cap:                caps[i],
			EffectiveWeight:    m.weight(i),
		}
		if m.ramps != nil && m.ramps[i].factor > 0 {
			r := m.ramps[i]
			hs.Upstreams[i].SlowStart = &rampStatus{Since: r.since.UTC(), Until: r.until.UTC(), Factor: r.factor}
		}
		if r, ok := snap.lookup(h.name, u.dial); ok {
			op := &operatorStatus{opRecord: r}
			if !r.takesNew() {
				n := h.remainingTo(u.dial)
				op.RemainingConnections = &n
			}
			hs.Upstreams[i].Operator = op
		}
	}
	return hs
}

// caps returns each pool upstream's balance_factor cap now, as the dial
// path would work it out for a new connection: for the usable upstreams
// of the serving tier, nil for the others and when no balance factor is
// set.
func (h *Handler) caps(m *membership, serving int, now *int64) []*int64 {
	out := make([]*int64, len(m.pool))
	if h.BalanceFactor <= 0 || serving < 0 {
		return out
	}
	t := &m.tiers[serving]
	usable := func(j int) bool { return h.usability(m.pool[t.members[j]], now) == 0 }
	for j, c := range t.picker.Caps(make([]int64, 0, len(t.members)), usable, h.loads.total.Load(), h.BalanceFactor) {
		if c >= 0 {
			out[t.members[j]] = &c
		}
	}
	return out
}

// hashKeyName returns the handler's hash_key with its default filled in.
func (h *Handler) hashKeyName() string {
	if h.HashKey == "" {
		return HashKeyIPPort
	}
	return h.HashKey
}

// failWindow returns the passive checks' fail_duration, 0 when they are
// off.
func (h *Handler) failWindow() time.Duration {
	if !h.passive {
		return 0
	}
	return time.Duration(*h.HealthChecks.Passive.FailDuration)
}

// healthStatus returns u's health as this handler sees it at now.
func (h *Handler) healthStatus(u *upstream, now time.Time) healthStatus {
	st := u.state
	nanos := now.UnixNano()
	why := h.usability(u, &nanos)
	activeDown, passiveDown := why&downByActiveChecks != 0, why&downByFailedDials != 0
	activeSince, lastCheck, lastError := st.activeCheckState()
	failed := st.failedDialTimes()

	hs := healthStatus{
		Status:         "up",
		RecentFailures: st.recentFailures(now.UnixNano(), h.failWindow()),
		LastCheck:      timeOrNil(lastCheck),
		LastCheckError: lastError,
	}
	if len(failed) > 0 {
		hs.LastFailedDial = timeOrNil(time.Unix(0, failed[len(failed)-1]))
	}
	var since time.Time
	if activeDown {
		hs.DownBy = append(hs.DownBy, downByActive)
		since = activeSince
	}
	if passiveDown {
		hs.DownBy = append(hs.DownBy, downByPassive)
		hs.DownUntil = timeOrNil(time.Unix(0, st.downUntil.Load()))
		// The max_fails-th of the remembered failed dials, oldest first,
		// is the one that took it down: they all fall within one
		// fail_duration, since older ones are dropped as each is recorded.
		if len(failed) > 0 {
			t := time.Unix(0, failed[min(h.HealthChecks.Passive.MaxFails, len(failed))-1])
			if since.IsZero() || t.Before(since) {
				since = t
			}
		}
	}
	if activeDown || passiveDown {
		hs.Status = "down"
	} else if h.HealthChecks.Active != nil {
		since = activeSince // when the checks last brought it back, if ever
	}
	hs.Since = timeOrNil(since)
	return hs
}

// failedDialTimes returns the failed dials the state remembers, oldest
// first, in unix nanoseconds.
func (st *upstreamState) failedDialTimes() []int64 {
	st.failMu.Lock()
	defer st.failMu.Unlock()
	return slices.Clone(st.failTimes)
}

// activeCheckState returns when the active checks last changed the
// state, when the last check ran, and why it failed if it did.
func (st *upstreamState) activeCheckState() (since, lastCheck time.Time, lastError string) {
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.since, st.lastCheck, st.lastError
}

func timeOrNil(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	t = t.UTC()
	return &t
}

// pickStatus is where a key goes now in one handler, and the order of
// preference behind it, as GET /godist/pick shows them.
type pickStatus struct {
	Handler     int    `json:"handler"`
	Fingerprint string `json:"fingerprint"`
	HashKey     string `json:"hash_key"`
	Key         string `json:"key"`

	// The upstream a new connection with this key would be dialled at
	// first, and its rank in Order; null when every upstream is at
	// max_connections, drained or in maintenance.
	Upstream *string `json:"upstream"`
	Rank     int     `json:"rank,omitempty"`

	// Fallback is true when no upstream is usable: the handler then tries
	// the unhealthy ones too, in the same order, and Upstream is the first
	// of them with room; never one drained or in maintenance.
	Fallback bool `json:"fallback"`

	// The tier that serves: the lowest with a usable upstream; null when
	// none has one (Fallback).
	ServingTier *int `json:"serving_tier"`

	// With balance_factor, when the key's first choice is at its cap now:
	// that upstream, which Upstream overflows from.
	FirstChoice *string `json:"first_choice,omitempty"`

	// The key's order of preference: the lowest tier's upstreams in the
	// key's rendezvous order, then the next tier's, and so on.
	Order []pickChoice `json:"order"`
}

// pickChoice is one upstream in a key's order of preference.
type pickChoice struct {
	Dial   string `json:"dial"`
	Tier   int    `json:"tier"`
	Rank   int    `json:"rank"` // 1 for the key's first choice
	Usable bool   `json:"usable"`
	WhyNot string `json:"why_not,omitempty"`

	// With balance_factor, for a usable upstream of the serving tier:
	// this handler's connections to it and its cap now.
	Load *int64 `json:"load,omitempty"`
	Cap  *int64 `json:"cap,omitempty"`
}

// pick returns where key goes now: the upstream the handler's dial loop
// would try first for it, skipping, as its first pass does, upstreams that
// are down or full and tiers above the serving one, and falling back to
// the unhealthy ones when none is usable.
func (h *Handler) pick(index int, key string, now time.Time) pickStatus {
	m := h.members.Load()
	n := len(m.pool)
	nanos := now.UnixNano()
	serving := h.servingTier(m, &nanos)
	servingNumber := -1
	ps := pickStatus{
		Handler:     index,
		Fingerprint: m.fingerprint,
		HashKey:     h.hashKeyName(),
		Key:         key,
		Fallback:    serving < 0,
		Order:       make([]pickChoice, 0, n),
	}
	if serving >= 0 {
		servingNumber = m.tiers[serving].number
		ps.ServingTier = &m.tiers[serving].number
	}
	// The dial loop's first pass takes the first usable upstream in the
	// key's order, or with balance_factor the first under its cap; with
	// none usable, its second takes the first with room.
	caps := h.caps(m, serving, &nanos)
	chosen, firstUsable, firstWithRoom := -1, -1, -1
	for r, i := range m.order(key, make([]int, 0, n)) {
		u := m.pool[i]
		why := h.usabilityIn(m, i, serving, &nanos)
		c := pickChoice{Dial: u.dial, Tier: u.tier, Rank: r + 1, Usable: why == 0, WhyNot: why.describe(u, servingNumber)}
		if why == 0 && firstUsable < 0 {
			firstUsable = r
		}
		if capNow := caps[i]; capNow != nil && why == 0 {
			load := u.load.Load()
			c.Load, c.Cap = &load, capNow
			if load >= *capNow {
				c.WhyNot = fmt.Sprintf("at its balance_factor cap (%d of %d)", load, *capNow)
			} else if chosen < 0 {
				chosen = r
			}
		} else if why == 0 && chosen < 0 {
			chosen = r
		}
		if why&(atMaxConnections|operatorReasons) == 0 && firstWithRoom < 0 {
			firstWithRoom = r
		}
		ps.Order = append(ps.Order, c)
	}
	if chosen < 0 {
		chosen = firstUsable // every usable one at its cap: the dial path's fallback is the first choice
	}
	if chosen < 0 {
		chosen = firstWithRoom
	}
	if chosen >= 0 {
		ps.Upstream, ps.Rank = &ps.Order[chosen].Dial, chosen+1
		if firstUsable >= 0 && firstUsable != chosen {
			ps.FirstChoice = &ps.Order[firstUsable].Dial
		}
	}
	return ps
}

// fingerprintStatus is a handler's fingerprint and what it digests, as
// GET /godist/fingerprint shows them.
type fingerprintStatus struct {
	Handler     int                `json:"handler"`
	Fingerprint string             `json:"fingerprint"`
	HashVersion string             `json:"hash_version"`
	HashKey     string             `json:"hash_key"`
	Upstreams   []weightedUpstream `json:"upstreams"`
	Digested    string             `json:"digested"` // the fingerprint is the first 16 hex digits of its SHA-256
}

// weightedUpstream is what a fingerprint knows of an upstream.
type weightedUpstream struct {
	Dial   string `json:"dial"`
	Weight int    `json:"weight"`
	Tier   int    `json:"tier,omitempty"`
}

// fingerprintStatus returns the handler's fingerprint and its parts: of
// its upstreams now, the discovered ones included.
func (h *Handler) fingerprintStatus(index int) fingerprintStatus {
	m := h.members.Load()
	ups := make([]weightedUpstream, len(m.pool))
	for i, u := range m.pool {
		ups[i] = weightedUpstream{Dial: u.dial, Weight: u.weight, Tier: u.tier}
	}
	return fingerprintStatus{
		Handler:     index,
		Fingerprint: m.fingerprint,
		HashVersion: HashVersion,
		HashKey:     h.hashKeyName(),
		Upstreams:   ups,
		Digested:    m.digested,
	}
}
