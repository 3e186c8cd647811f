// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"fmt"
	"math"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// This file works out an upstream's effective weight: its configured
// weight, times the operator's weight factor (opstate.go), times its slow
// start ramp. All of it is pure: the handler calls it when it builds its
// picker, and again at the time it returns for the next step of a ramp.
//
// Rendezvous hashing makes a ramp safe: raising one upstream's weight
// raises only its own score for each key, so a key can only move to it,
// never between two others, and it takes a share of keys that rises with
// its weight. Lowering a weight (an operator's factor below 1) moves keys
// only away from it, each to its own next choice.

// Slow start's shape. HAProxy ramps linearly from (nearly) zero, and
// updates the weight at each health check; Envoy ramps from a floor,
// MinWeightPercent, 10% by default. A floor of 10% gives a recovered
// upstream a trickle of keys at once, so that a failure shows in its
// health before its full share arrives, and the steps bound how often the
// picker is rebuilt during a ramp.
const (
	// slowStartFloor is the fraction of its weight an upstream starts its
	// ramp at.
	slowStartFloor = 0.1

	// slowStartSteps is how many times the weight rises during a ramp,
	// unless the steps would come closer than slowStartMinStep: a ramp of
	// 1s rises in 10 steps, one of 100ms or less in one.
	slowStartSteps   = 20
	slowStartMinStep = 100 * time.Millisecond

	// maxSlowStart bounds the slow_start option.
	maxSlowStart = 24 * time.Hour

	// capWeightScale is what a fractional weight is multiplied by for the
	// integer arithmetic of the bounded-load caps.
	capWeightScale = 1000
)

// slowStartFactor returns the fraction of its full weight an upstream has
// at now, if it became usable (was added, came back up, or left drain or
// maint) at since and ramps over ramp: from slowStartFloor at since up to
// 1 at since+ramp, linearly, in steps. next is when the fraction rises
// again, zero once the ramp is over. A zero since or ramp means no ramp.
// A clock that went back before since counts as the ramp's start.
func slowStartFactor(since, now time.Time, ramp time.Duration) (factor float64, next time.Time) {
	if ramp <= 0 || since.IsZero() {
		return 1, time.Time{}
	}
	elapsed := now.Sub(since)
	if elapsed >= ramp {
		return 1, time.Time{}
	}
	steps := int64(slowStartSteps)
	if n := int64(ramp / slowStartMinStep); n < steps {
		steps = max(n, 1)
	}
	k := int64(0)
	if elapsed > 0 {
		k = int64(elapsed) / (int64(ramp) / steps) // ramp <= maxSlowStart: no overflow
		k = min(k, steps-1)
	}
	factor = slowStartFloor + (1-slowStartFloor)*float64(k)/float64(steps)
	next = since.Add(time.Duration((k + 1) * (int64(ramp) / steps)))
	if k+1 == steps {
		next = since.Add(ramp)
	}
	return factor, next
}

// effectiveWeight returns the weight an upstream of configured weight
// has in the picker at now: times the operator's weight factor while it is
// ready, times its slow start fraction (see slowStartFactor). next is when
// it changes again, zero if it does not by itself.
func effectiveWeight(configured int, rec opRecord, since, now time.Time, ramp time.Duration) (w float64, next time.Time) {
	factor, next := slowStartFactor(since, now, ramp)
	return float64(max(configured, 1)) * rec.weightFactor() * factor, next
}

// validateSlowStart checks the slow_start option.
func validateSlowStart(d caddy.Duration) error {
	switch {
	case d < 0:
		return fmt.Errorf("slow_start %s: must not be negative", time.Duration(d))
	case time.Duration(d) > maxSlowStart:
		return fmt.Errorf("slow_start %s: at most %s", time.Duration(d), maxSlowStart)
	}
	return nil
}

// Values of the on_down option: what happens to the connections open to
// an upstream when the active checks mark it down.
const (
	onDownKeep  = "keep"  // they flow on until they fail by themselves
	onDownClose = "close" // they are closed, so that clients reconnect to their next choice
)

// parseOnDown checks the on_down option and reports whether it closes
// connections; empty means the default, keep.
func parseOnDown(s string) (closes bool, err error) {
	switch s {
	case "", onDownKeep:
		return false, nil
	case onDownClose:
		return true, nil
	}
	return false, fmt.Errorf("on_down %q: must be %s or %s", s, onDownKeep, onDownClose)
}

// validateStatePollInterval checks the state_poll_interval option; zero
// means the default.
func validateStatePollInterval(d caddy.Duration) error {
	switch {
	case d < 0:
		return fmt.Errorf("state_poll_interval %s: must not be negative", time.Duration(d))
	case d > 0 && time.Duration(d) < minStatePollInterval:
		return fmt.Errorf("state_poll_interval %s: at least %s (each poll lists the handler's states in the storage)", time.Duration(d), minStatePollInterval)
	}
	return nil
}

// newWeightedPicker returns a picker over the upstreams dialled at dials,
// in that order, with the given weights, which may be fractional (a slow
// start ramp, an operator's factor). It ranks every key exactly as
// NewPicker does when the weights are whole numbers. A weight that is not
// a positive, finite number counts as the smallest positive one: the
// upstream keeps its place in the list but wins almost no key.
//
// The bounded-load caps (PickBounded) count weights in integers: each
// weight counts there in thousandths, rounded, at least 1, so that a cap
// is the one NewPicker's integer weights give when the weights are whole
// numbers (every weight is scaled alike), and follows a ramp or a factor
// to a thousandth otherwise.
func newWeightedPicker(dials []string, weights []float64) *Picker {
	p := &Picker{nodes: make([]pickerNode, len(dials)), uniform: true}
	for i, dial := range dials {
		w := weights[i]
		if !(w > 0) || math.IsInf(w, 1) {
			w = math.SmallestNonzeroFloat64
		}
		p.nodes[i].seeded.Reset()
		_, _ = p.nodes[i].seeded.WriteString(dial)
		p.nodes[i].weight = w
		p.nodes[i].intWeight = uint64(min(max(math.Round(w*capWeightScale), 1), 1<<53))
		if i > 0 && w != p.nodes[0].weight {
			p.uniform = false
		}
	}
	return p
}
