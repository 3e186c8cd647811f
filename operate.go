// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"context"
	"errors"
	"slices"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

// This file is the operator's side of a handler: it applies the operator
// states of the handler's name (opstate.go) and slow start (slowstart.go)
// to its membership, and closes connections when a maint, a drain's
// deadline or on_down says so.
//
// Who does what, and in what order:
//
//   - The membership (membership.go) carries what routing needs: each
//     upstream's operator state (upstream.op; a change swaps in a copy of
//     the upstream) and each one's effective weight, in its tier's picker.
//     A connection reads them with the membership it loads, and pays
//     nothing more for them. buildLocked makes them, under h.memberMu,
//     whenever a membership is built: by installLocked (Provision, a new
//     set from the dynamic source) and by refresh.
//   - refresh runs on the handler's operator goroutine (operate), which
//     wakes when the store publishes new states, with slow_start when the
//     health of an upstream changes anywhere in the process
//     (healthChanges), when the membership gains upstreams (nudge), and at the
//     next moment something changes by itself: a ramp's next step, a
//     drain's deadline, the end of a passive down. It also runs on the
//     admin request that set a state, before the answer, so that the
//     instance that took a change applies it at once.
//   - A session is closed at most once: close wins a compare-and-swap on
//     its closedBy. The sessions to close are collected under their list's
//     lock and aborted outside it, since an abort may end a session on the
//     spot, and its finish takes that lock. A session is listed only once
//     its pipe is initialised, and then looks at the states itself
//     (closeIfHeld), so that a maint published while it was dialled closes
//     it too: either the sweep finds it listed, or it finds the new
//     snapshot.
//   - Connections outlive their config. A handler that Cleanup unloaded
//     while connections still flow through it stays in retiredHandlers
//     until the last of them ends, so that a maint, a drain's deadline or
//     an on_down close reaches them too.

// closeReason says why godist closed a connection that was flowing.
type closeReason uint32

const (
	closeNone          closeReason = iota
	closeMaint                     // an operator put its upstream in maintenance
	closeDrainDeadline             // its upstream's drain reached its deadline
	closeOnDown                    // on_down close: the active checks marked its upstream down

	closeReasons // how many there are
)

// closeReasonNames are the reasons as the metrics, the admin API and the
// logs name them.
var closeReasonNames = [closeReasons]string{"", "maint", "drain_deadline", "on_down"}

// closeCauses are what a closed session's pipe is aborted with, which its
// debug line shows.
var closeCauses = [closeReasons]error{
	nil,
	errors.New("closed by godist: an operator put the upstream in maintenance"),
	errors.New("closed by godist: the upstream's drain reached its deadline"),
	errors.New("closed by godist: the active health checks marked the upstream down (on_down close)"),
}

func (r closeReason) String() string { return closeReasonNames[r] }

// close closes the session for why, unless godist closed it already, and
// counts it against its upstream. It reports whether it did.
func (s *session) close(why closeReason) bool {
	if !s.closedBy.CompareAndSwap(uint32(closeNone), uint32(why)) {
		return false
	}
	s.upstream.state.closed[why].Add(1)
	s.pipe.Abort(closeCauses[why])
	return true
}

// closeIfHeld closes a session just listed if the operator's state of its
// upstream, as published now, closes the connections open to it: a maint
// or a drain past its deadline published while the session was dialled,
// which the sweep, finding it unlisted, missed. It costs the connection
// path an atomic load when no operator state is set.
func (h *Handler) closeIfHeld(s *session) {
	snap := h.opStore.snapshot()
	if snap.len() == 0 {
		return
	}
	if r, ok := snap.records[s.upstream.dial]; ok {
		if why := heldCloseReason(r, time.Now()); why != closeNone {
			s.close(why)
		}
	}
}

// heldCloseReason returns why the connections open to an upstream with
// record r are to be closed at now, closeNone if they are not.
func heldCloseReason(r opRecord, now time.Time) closeReason {
	if !r.closesOpen(now) {
		return closeNone
	}
	if r.State == opMaint {
		return closeMaint
	}
	return closeDrainDeadline
}

// sessionHolders returns every handler that may have sessions flowing:
// the live ones and the retired ones.
func sessionHolders() []*Handler {
	return append(liveHandlers.list(), retiredHandlers.list()...)
}

// closeSessions closes, for why, the sessions to the upstream dialled at
// dial of every handler, live or retired, that match accepts, logs how
// many it closed, and returns that.
func closeSessions(logger *zap.Logger, dial string, why closeReason, match func(*Handler) bool) int {
	var victims []*session
	for _, h := range sessionHolders() {
		if match(h) {
			victims = h.sessions.appendTo(victims, dial)
		}
	}
	n := 0
	for _, s := range victims {
		if s.close(why) {
			n++
		}
	}
	if n > 0 {
		logger.Info("connections closed", zap.String("upstream", dial), zap.Stringer("reason", why), zap.Int("closed", n))
	}
	return n
}

// remainingTo counts the connections to the upstream dialled at dial that
// the handlers of h's name still have open: h's, and those of the configs
// before it, retired.
func (h *Handler) remainingTo(dial string) int {
	n := h.sessions.countTo(dial)
	for _, r := range retiredHandlers.list() {
		if r.name == h.name {
			n += r.sessions.countTo(dial)
		}
	}
	return n
}

// inMaintenance reports whether an operator has the upstream dialled at
// dial in maintenance for h's name.
func (h *Handler) inMaintenance(dial string) bool {
	snap := h.opStore.snapshot()
	if snap.len() == 0 {
		return false
	}
	r, ok := snap.records[dial]
	return ok && r.State == opMaint
}

// ramp is an upstream's slow start ramp as a membership was built with
// it: begun at since, over at until, at factor of its weight.
type ramp struct {
	since, until time.Time
	factor       float64
}

// buildLocked makes the membership of pool (a slice of its own, which it
// may change) for the operator states of snap and the slow start ramps at
// now: each upstream's op, a copy of the upstream where it changes, and
// the effective weights. It returns, besides, when the membership would
// change by itself next (a ramp's step, a passive down's end), zero if
// never. The caller holds h.memberMu.
func (h *Handler) buildLocked(pool []*upstream, snap *opSnapshot, now time.Time) (*membership, time.Time) {
	records := snap.len() > 0
	for i, u := range pool {
		state := opReady
		if records {
			r, _ := snap.lookup(h.name, u.dial)
			state = r.State
		}
		if u.op != state {
			c := *u
			c.op = state
			pool[i] = &c
		}
	}
	if !records && h.SlowStart == 0 {
		return newMembership(h.HashKey, pool), time.Time{}
	}

	weights := make([]float64, len(pool))
	var ramps []ramp
	var next time.Time
	rampsOn := h.SlowStart > 0
	nanos := now.UnixNano()
	reweighted := false
	for i, u := range pool {
		r, _ := snap.lookup(h.name, u.dial)
		since := time.Time{}
		if rampsOn {
			why := h.usability(u, &nanos)
			if why&(downReasons|operatorReasons) != 0 {
				// Not usable: its weight does not matter now, and is the
				// ramp's first step, so that it takes no more than that
				// from the moment it is usable, before its ramp is built.
				weights[i] = float64(u.weight) * r.weightFactor() * slowStartFloor
				reweighted = true
				if until := u.state.downUntil.Load(); why&downByFailedDials != 0 && until > nanos {
					next = earliest(next, time.Unix(0, until))
				}
				continue
			}
			since = h.rampSince(u, snap)
		}
		w, step := effectiveWeight(u.weight, r, since, now, time.Duration(h.SlowStart))
		weights[i] = w
		if w != float64(u.weight) {
			reweighted = true
		}
		if !step.IsZero() {
			if ramps == nil {
				ramps = make([]ramp, len(pool))
			}
			f, _ := slowStartFactor(since, now, time.Duration(h.SlowStart))
			ramps[i] = ramp{since: since, until: since.Add(time.Duration(h.SlowStart)), factor: f}
			next = earliest(next, step)
		}
	}
	if !reweighted {
		weights = nil
	}
	return newWeightedMembership(h.HashKey, pool, weights, ramps), next
}

// rampSince returns when u last became usable for h, as this process saw
// it: added to the handler's name (a source found it, a reload added it),
// back from drain or maint, or back up by the checks h runs; zero if none
// of these happened since the name's first config started.
func (h *Handler) rampSince(u *upstream, snap *opSnapshot) time.Time {
	since := later(h.book.addedAt(u.dial), snap.returnedAt(u.dial))
	if h.HealthChecks.Active != nil {
		since = later(since, unixTime(u.state.activeUpAt.Load()))
	}
	if h.passive {
		since = later(since, unixTime(u.state.passiveUpAt.Load()))
	}
	return since
}

// sameRouting reports whether b routes every key exactly as a does: the
// same upstreams, operator states and effective weights.
func sameRouting(a, b *membership) bool {
	return slices.Equal(a.pool, b.pool) && slices.Equal(a.weights, b.weights) && slices.Equal(a.ramps, b.ramps)
}

// refresh applies the operator states in force and the ramps as of now to
// the handler's membership, and closes the connections that the states
// close (in every handler of the name, retired ones included). It returns
// when it must run again by itself, zero if only a change can make it.
func (h *Handler) refresh() time.Time {
	now := time.Now()
	snap := h.opStore.snapshot()
	h.memberMu.Lock()
	if h.closed {
		h.memberMu.Unlock()
		return time.Time{}
	}
	cur := h.members.Load()
	nanos := now.UnixNano()
	for _, u := range cur.pool {
		if h.passive {
			h.noticeRecovery(u, nanos) // a passive down that ended: its ramp begins at its end
		}
	}
	m, next := h.buildLocked(slices.Clone(cur.pool), snap, now)
	if !sameRouting(cur, m) {
		h.members.Store(m)
	}
	h.memberMu.Unlock()

	for _, r := range snap.list() {
		if why := heldCloseReason(r, now); why != closeNone {
			name := h.name
			closeSessions(h.logger, r.Upstream, why, func(o *Handler) bool { return o.name == name })
		}
	}
	return earliest(next, snap.nextDeadline(now))
}

// operate is the handler's operator goroutine: it refreshes the membership
// whenever the operator states change, or, with slow_start, an upstream's
// health, and when a ramp or a deadline says so, until the handler's runCtx
// ends.
func (h *Handler) operate() {
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	for {
		// All are taken before the refresh, so that a change during it
		// wakes the next wait. Health matters to the membership only for
		// the ramps.
		snap := h.opStore.snapshot()
		var health <-chan struct{}
		if h.SlowStart > 0 {
			health = healthChanges.wait()
		}
		nudge := h.nudge.wait()
		next := h.refresh()
		var wake <-chan time.Time
		if !next.IsZero() {
			timer.Reset(max(time.Until(next), 0))
			wake = timer.C
		}
		select {
		case <-h.runCtx.Done():
			return
		case <-snap.changed():
		case <-health:
		case <-nudge:
		case <-wake:
		}
		timer.Stop()
	}
}

// earliest returns the earlier of two moments, zero meaning never.
func earliest(a, b time.Time) time.Time {
	switch {
	case a.IsZero():
		return b
	case b.IsZero() || a.Before(b):
		return a
	}
	return b
}

// later returns the later of two moments, zero meaning never.
func later(a, b time.Time) time.Time {
	if b.After(a) {
		return b
	}
	return a
}

// unixTime turns unix nanoseconds into a time, 0 into the zero time.
func unixTime(nanos int64) time.Time {
	if nanos == 0 {
		return time.Time{}
	}
	return time.Unix(0, nanos)
}

// nothingToDial says why a connection found no upstream it could dial:
// every one held by an operator, at max_connections, or some of each.
func nothingToDial(m *membership) error {
	held := 0
	for _, u := range m.pool {
		if u.op != opReady {
			held++
		}
	}
	switch held {
	case 0:
		return errAllFull
	case len(m.pool):
		return errAllHeld
	}
	return errHeldOrFull
}

var (
	errAllHeld    = errors.New("every upstream is drained or in maintenance, by an operator")
	errHeldOrFull = errors.New("every upstream is drained or in maintenance by an operator, or at max_connections")
)

// signal wakes every goroutine waiting on it when something happened. It
// allocates only when someone waits.
type signal struct {
	mu sync.Mutex
	ch chan struct{}
}

// wait returns a channel closed at the next notify.
func (s *signal) wait() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ch == nil {
		s.ch = make(chan struct{})
	}
	return s.ch
}

// notify wakes every waiter.
func (s *signal) notify() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.ch != nil {
		close(s.ch)
		s.ch = nil
	}
}

// healthChanges is notified whenever an upstream goes down or comes back
// up, by active checks or failed dials, so that the operator goroutines
// rebuild ramps and weights at once.
var healthChanges signal

// memberBooks holds a memberBook per handler name, for the life of the
// configs using the name, so that a reload hands it to the next config.
var memberBooks = caddy.NewUsagePool()

// memberBook records, for the handlers of one name, which upstreams they
// have and since when: what slow start calls added. Each handler holds
// each upstream of its membership once; an upstream no handler of the
// name holds any more is forgotten, and comes back as added.
type memberBook struct {
	// config is the Done channel of the config that made the book: the
	// upstreams its handlers start with are not added, they are there
	// from the start. A book made by a later config (every handler of the
	// name was unloaded in between) starts afresh in the same way.
	config <-chan struct{}

	mu      sync.Mutex
	members map[string]*bookEntry
}

type bookEntry struct {
	holders int
	added   time.Time // zero: there from the start
}

// Destruct implements caddy.Destructor; there is nothing to release.
func (*memberBook) Destruct() error { return nil }

// acquireMemberBook returns the book of handler name, held until ctx (the
// config's) is done.
func acquireMemberBook(ctx caddy.Context, name string) *memberBook {
	v, _, _ := memberBooks.LoadOrNew(name, func() (caddy.Destructor, error) {
		return &memberBook{config: ctx.Done(), members: make(map[string]*bookEntry)}, nil
	})
	context.AfterFunc(ctx, func() { _, _ = memberBooks.Delete(name) })
	return v.(*memberBook)
}

// join records that a handler holds the upstreams at dials since now;
// initial says it is the start: those new to the book are not added.
func (b *memberBook) join(dials []string, now time.Time, initial bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, d := range dials {
		e := b.members[d]
		if e == nil {
			e = new(bookEntry)
			if !initial {
				e.added = now
			}
			b.members[d] = e
		}
		e.holders++
	}
}

// leave records that a handler no longer holds the upstreams at dials.
func (b *memberBook) leave(dials []string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, d := range dials {
		if e := b.members[d]; e != nil {
			if e.holders--; e.holders <= 0 {
				delete(b.members, d)
			}
		}
	}
}

// addedAt returns when the upstream at dial was added, zero if it was
// there from the start.
func (b *memberBook) addedAt(dial string) time.Time {
	b.mu.Lock()
	defer b.mu.Unlock()
	if e := b.members[dial]; e != nil {
		return e.added
	}
	return time.Time{}
}

// dialsOf returns the dial addresses of upstreams.
func dialsOf(ups []*upstream) []string {
	out := make([]string, len(ups))
	for i, u := range ups {
		out[i] = u.dial
	}
	return out
}

// retiredRegistry holds the handlers that Cleanup unloaded while
// connections still flowed through them, until the last of those ends.
// Its lock is taken before a handler's session list lock, never after.
type retiredRegistry struct {
	mu       sync.Mutex
	handlers []*Handler
}

var retiredHandlers retiredRegistry

// retire keeps h, unloaded, while it has connections. Cleanup calls it
// after it set h.cleanedUp, so that a session ending meanwhile either is
// counted here or finds h retired (leaveIfIdle).
func (r *retiredRegistry) retire(h *Handler) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if h.sessions.len() > 0 {
		r.handlers = append(r.handlers, h)
	}
}

// leaveIfIdle forgets h once its last connection has ended.
func (r *retiredRegistry) leaveIfIdle(h *Handler) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if h.sessions.len() == 0 {
		if i := slices.Index(r.handlers, h); i >= 0 {
			r.handlers = slices.Delete(r.handlers, i, i+1)
		}
	}
}

func (r *retiredRegistry) list() []*Handler {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.handlers)
}
