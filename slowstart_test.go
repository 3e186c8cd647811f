// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"fmt"
	"math"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

func TestSlowStartFactor(t *testing.T) {
	since := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	const ramp = time.Minute
	tests := []struct {
		name       string
		since      time.Time
		at         time.Duration // after since
		ramp       time.Duration
		wantFactor float64
		wantNext   time.Duration // after since; -1 for none
	}{
		{"no slow start", since, 0, 0, 1, -1},
		{"never became usable", time.Time{}, 0, ramp, 1, -1},
		{"the moment it became usable", since, 0, ramp, 0.1, ramp / 20},
		{"within the first step", since, ramp/20 - 1, ramp, 0.1, ramp / 20},
		{"the second step", since, ramp / 20, ramp, 0.1 + 0.9/20, 2 * ramp / 20},
		{"half way", since, ramp / 2, ramp, 0.55, 11 * ramp / 20},
		{"the last step", since, ramp - 1, ramp, 0.1 + 0.9*19/20, ramp},
		{"done", since, ramp, ramp, 1, -1},
		{"long done", since, 10 * ramp, ramp, 1, -1},
		{"the clock went back", since, -time.Second, ramp, 0.1, ramp / 20},
		{"a 1s ramp has 10 steps", since, 500 * time.Millisecond, time.Second, 0.55, 600 * time.Millisecond},
		{"a 50ms ramp has one", since, 10 * time.Millisecond, 50 * time.Millisecond, 0.1, 50 * time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, next := slowStartFactor(tt.since, since.Add(tt.at), tt.ramp)
			if math.Abs(f-tt.wantFactor) > 1e-12 {
				t.Errorf("factor %g, want %g", f, tt.wantFactor)
			}
			switch {
			case tt.wantNext < 0 && !next.IsZero():
				t.Errorf("next %s, want none", next.Sub(since))
			case tt.wantNext >= 0 && !next.Equal(since.Add(tt.wantNext)):
				t.Errorf("next %s after since, want %s", next.Sub(since), tt.wantNext)
			}
		})
	}
}

// rampFactors walks a ramp from its start, step by step, as a handler's
// timer would, and returns each factor: the floor first, 1 last.
func rampFactors(t *testing.T, ramp time.Duration) []float64 {
	t.Helper()
	since := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	var out []float64
	for now := since; ; {
		f, next := slowStartFactor(since, now, ramp)
		out = append(out, f)
		if next.IsZero() {
			return out
		}
		if !next.After(now) || len(out) > 100 {
			t.Fatalf("the ramp does not move on at %s: next %s", now.Sub(since), next.Sub(since))
		}
		now = next
	}
}

// testKeys returns n client keys, ip:port as godist hashes them.
func testKeys(n int) []string {
	keys := make([]string, n)
	for i := range keys {
		keys[i] = fmt.Sprintf("198.51.%d.%d:%d", i/250%250, i%250, 20000+i%40000)
	}
	return keys
}

// TestSlowStartRampMovesKeysOnlyToIt ramps one upstream of five with the
// real picker: at each step its share of keys rises, and every key that
// moves, moves to it; no key moves between two others. At the end every
// key is where the picker of the configured weights sends it.
func TestSlowStartRampMovesKeysOnlyToIt(t *testing.T) {
	dials := []string{"10.0.1.1:5432", "10.0.1.2:5432", "10.0.1.3:5432", "10.0.1.4:5432", "10.0.1.5:5432"}
	for _, configured := range [][]int{{1, 1, 1, 1, 1}, {2, 1, 3, 1, 1}} {
		t.Run(fmt.Sprint(configured), func(t *testing.T) {
			const ramping = 2
			keys := testKeys(20_000)
			factors := rampFactors(t, time.Minute)
			if len(factors) != slowStartSteps+1 || factors[0] != slowStartFloor || factors[len(factors)-1] != 1 {
				t.Fatalf("ramp factors %v: want %d steps from %g to 1", factors, slowStartSteps, slowStartFloor)
			}
			total := 0
			for _, w := range configured {
				total += w
			}
			var prev []int
			prevShare, firstShare := -1.0, 0.0
			for step, f := range factors {
				weights := make([]float64, len(dials))
				for i, w := range configured {
					weights[i] = float64(w)
				}
				weights[ramping] *= f
				p := newWeightedPicker(dials, weights)
				picks := make([]int, len(keys))
				on := 0
				for k, key := range keys {
					picks[k] = p.Pick(key, nil)
					if picks[k] == ramping {
						on++
					}
				}
				share := float64(on) / float64(len(keys))
				if share <= prevShare {
					t.Errorf("step %d (factor %.3f): share %.4f, not above the step before's %.4f", step, f, share, prevShare)
				}
				w := weights[ramping]
				if expected := w / (float64(total-configured[ramping]) + w); math.Abs(share-expected) > 0.015 {
					t.Errorf("step %d (factor %.3f): share %.4f, want about %.4f", step, f, share, expected)
				}
				for k := range picks {
					if prev != nil && picks[k] != prev[k] && picks[k] != ramping {
						t.Fatalf("step %d: key %s moved from %s to %s, neither the upstream ramping up",
							step, keys[k], dials[prev[k]], dials[picks[k]])
					}
				}
				if step == 0 {
					firstShare = share
				}
				prev, prevShare = picks, share
			}
			// the end of the ramp is the configured weights, exactly
			full := make([]PickerUpstream, len(dials))
			for i, d := range dials {
				full[i] = PickerUpstream{Dial: d, Weight: configured[i]}
			}
			configuredPicker := NewPicker(full)
			for k, key := range keys {
				if want := configuredPicker.Pick(key, nil); prev[k] != want {
					t.Fatalf("after the ramp %s goes to %s, the configured picker sends it to %s", key, dials[prev[k]], dials[want])
				}
			}
			t.Logf("share of the upstream ramping up, from %.4f to %.4f in %d steps", firstShare, prevShare, len(factors)-1)
		})
	}
}

// TestOperatorWeightMovesKeysOnlyAway lowers one upstream's weight by an
// operator's factor, as for a canary: keys leave it, each to its own next
// choice, and no other key moves.
func TestOperatorWeightMovesKeysOnlyAway(t *testing.T) {
	dials := []string{"10.0.1.1:5432", "10.0.1.2:5432", "10.0.1.3:5432", "10.0.1.4:5432"}
	keys := testKeys(20_000)
	canary := opRecord{State: opReady, Weight: 0.5}
	weights := make([]float64, len(dials))
	for i := range dials {
		rec := readyRecord("db", dials[i])
		if i == 0 {
			rec = canary
		}
		weights[i], _ = effectiveWeight(1, rec, time.Time{}, time.Now(), 0)
	}
	before := NewPicker([]PickerUpstream{{Dial: dials[0]}, {Dial: dials[1]}, {Dial: dials[2]}, {Dial: dials[3]}})
	after := newWeightedPicker(dials, weights)
	moved, on := 0, 0
	for _, key := range keys {
		b, a := before.Pick(key, nil), after.Pick(key, nil)
		if a != b {
			moved++
			if b != 0 {
				t.Fatalf("key %s moved from %s to %s: only the canary's keys may move", key, dials[b], dials[a])
			}
		}
		if a == 0 {
			on++
		}
	}
	if share, want := float64(on)/float64(len(keys)), 0.5/3.5; math.Abs(share-want) > 0.015 {
		t.Errorf("the canary at 0.5× has %.4f of the keys, want about %.4f", share, want)
	}
	if moved == 0 {
		t.Error("a weight of 0.5× moved no key")
	}
}

// TestNewWeightedPicker checks that fractional weights rank keys exactly
// as NewPicker does for the same whole weights, and that a weight that is
// not a positive finite number makes an upstream the last choice.
func TestNewWeightedPicker(t *testing.T) {
	dials := []string{"a:1", "b:1", "c:1"}
	keys := testKeys(5000)
	for _, ws := range [][]int{{1, 1, 1}, {1, 3, 2}, {5, 5, 5}} {
		ints := NewPicker([]PickerUpstream{{Dial: dials[0], Weight: ws[0]}, {Dial: dials[1], Weight: ws[1]}, {Dial: dials[2], Weight: ws[2]}})
		floats := newWeightedPicker(dials, []float64{float64(ws[0]), float64(ws[1]), float64(ws[2])})
		for _, key := range keys {
			a, b := ints.Order(key, nil), floats.Order(key, nil)
			if fmt.Sprint(a) != fmt.Sprint(b) {
				t.Fatalf("weights %v, key %s: NewPicker orders %v, newWeightedPicker %v", ws, key, a, b)
			}
		}
	}
	for _, bad := range []float64{0, -1, math.NaN(), math.Inf(1)} {
		p := newWeightedPicker(dials, []float64{1, bad, 1})
		for _, key := range keys[:500] {
			if p.Pick(key, nil) == 1 {
				t.Fatalf("weight %g: upstream won key %s", bad, key)
			}
		}
	}
}

func TestEffectiveWeight(t *testing.T) {
	since := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	tests := []struct {
		name       string
		configured int
		rec        opRecord
		at         time.Duration
		want       float64
	}{
		{"configured", 3, opRecord{}, 0, 3},
		{"configured unset", 0, opRecord{}, 0, 1},
		{"an operator's factor", 4, opRecord{Weight: 0.5}, 0, 2},
		{"a ramp's start", 2, opRecord{}, time.Nanosecond, 0.2},
		{"a ramp and a factor", 2, opRecord{Weight: 0.5}, 30 * time.Second, 0.55},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s, ramp := time.Time{}, time.Duration(0)
			if tt.at > 0 {
				s, ramp = since, time.Minute
			}
			got, _ := effectiveWeight(tt.configured, tt.rec, s, since.Add(tt.at), ramp)
			if math.Abs(got-tt.want) > 1e-12 {
				t.Errorf("weight %g, want %g", got, tt.want)
			}
		})
	}
}

func TestOperateOptionChecks(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want string
	}{
		{"slow_start unset", validateSlowStart(0), ""},
		{"slow_start 30s", validateSlowStart(caddy.Duration(30 * time.Second)), ""},
		{"slow_start negative", validateSlowStart(caddy.Duration(-time.Second)), "slow_start -1s: must not be negative"},
		{"slow_start too long", validateSlowStart(caddy.Duration(25 * time.Hour)), "slow_start 25h0m0s: at most 24h0m0s"},
		{"state_poll_interval unset", validateStatePollInterval(0), ""},
		{"state_poll_interval 100ms", validateStatePollInterval(caddy.Duration(100 * time.Millisecond)), ""},
		{"state_poll_interval negative", validateStatePollInterval(caddy.Duration(-time.Second)), "state_poll_interval -1s: must not be negative"},
		{"state_poll_interval too short", validateStatePollInterval(caddy.Duration(10 * time.Millisecond)),
			"state_poll_interval 10ms: at least 100ms (each poll lists the handler's states in the storage)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := ""
			if tt.err != nil {
				got = tt.err.Error()
			}
			if got != tt.want {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
	for in, want := range map[string]bool{"": false, "keep": false, "close": true} {
		if closes, err := parseOnDown(in); err != nil || closes != want {
			t.Errorf("on_down %q: %v, %v; want %v", in, closes, err, want)
		}
	}
	if _, err := parseOnDown("shutdown"); err == nil || err.Error() != `on_down "shutdown": must be keep or close` {
		t.Errorf("on_down shutdown: %v", err)
	}
}
