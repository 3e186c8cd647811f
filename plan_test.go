// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"testing"
	"time"
)

// upstreamRange returns the upstreams from to from+n-1 of equalPool.
func upstreamRange(from, n int) []PickerUpstream {
	return equalPool(from + n)[from:]
}

// reversed returns a reversed copy of ups.
func reversed(ups []PickerUpstream) []PickerUpstream {
	out := slices.Clone(ups)
	slices.Reverse(out)
	return out
}

// TestKeySpaceMoves checks the sample keySpaceMoves takes for a budget,
// and that the margin it states holds: the share it estimates lies within
// that margin of what rendezvous hashing must move, and a scaled sample's
// estimate within it of the whole sample's.
func TestKeySpaceMoves(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name          string
		before, after []PickerUpstream
		budget        int
		wantKeys      int
		wantMoved     float64 // the share rendezvous hashing moves
		wantMargin    string  // "wald", "rule of three" or "none"
	}{
		{"add one to three", upstreamRange(0, 3), upstreamRange(0, 4), planKeyScores, planSampleKeys, 0.25, "wald"},
		{"remove two of eight", upstreamRange(0, 8), upstreamRange(2, 6), planKeyScores, planSampleKeys, 0.25, "wald"},
		{"remove two of eight, scaled", upstreamRange(0, 8), upstreamRange(2, 6), 14 * 2000, 2000, 0.25, "wald"},
		{"remove two of eight, tiny budget", upstreamRange(0, 8), upstreamRange(2, 6), 1, planMinSampleKeys, 0.25, "wald"},
		{"reweight one of ten", upstreamRange(0, 10),
			append([]PickerUpstream{{Dial: equalPool(1)[0].Dial, Weight: 2}}, upstreamRange(1, 9)...), 20 * 3000, 3000, 2.0/11 - 1.0/10, "wald"},
		{"a thousand proposed", upstreamRange(0, 3), upstreamRange(0, 1000), 1003 * 1500, 1500, 997.0 / 1000, "any"},
		{"all replaced", upstreamRange(0, 4), upstreamRange(4, 4), planKeyScores, planSampleKeys, 1, "rule of three"},
		{"same list in another order", upstreamRange(0, 8), reversed(upstreamRange(0, 8)), planKeyScores, planSampleKeys, 0, "none"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ks, err := keySpaceMoves(ctx, tt.before, tt.after, tt.budget)
			if err != nil {
				t.Fatal(err)
			}
			n := ks.SampledKeys
			if n != tt.wantKeys || ks.MovedShare != float64(ks.MovedKeys)/float64(n) {
				t.Fatalf("sampled %d keys, moved %d, share %v; want %d keys", n, ks.MovedKeys, ks.MovedShare, tt.wantKeys)
			}
			wantEstimate := fmt.Sprintf("from %d synthetic ip:port keys, the same every time", n)
			if n < planSampleKeys {
				wantEstimate += fmt.Sprintf(" (fewer than %d, to bound the cost of scoring each against %d upstreams)", planSampleKeys, len(tt.before)+len(tt.after))
			}
			if ks.Estimate != wantEstimate {
				t.Errorf("estimate %q, want %q", ks.Estimate, wantEstimate)
			}
			p, m := ks.MovedShare, ks.MovedShareMargin
			switch tt.wantMargin {
			case "wald":
				if want := 1.96 * math.Sqrt(p*(1-p)/float64(n)); m < want || m > want+1e-6 {
					t.Errorf("margin %v, want 1.96·sqrt(p(1-p)/n) = %v, rounded up", m, want)
				}
			case "rule of three":
				if want := 3 / float64(n); m < want || m > want+1e-6 {
					t.Errorf("margin %v, want 3/n = %v, rounded up", m, want)
				}
			case "none":
				if m != 0 || ks.MovedKeys != 0 {
					t.Errorf("margin %v and %d keys moved for an unchanged list", m, ks.MovedKeys)
				}
			}
			if math.Abs(p-tt.wantMoved) > m {
				t.Errorf("moved %v ± %v, but rendezvous hashing moves %v", p, m, tt.wantMoved)
			}
			if n < planSampleKeys && len(tt.before)+len(tt.after) <= 20 {
				// the margin is the scaled sample's: the whole one agrees
				whole, err := keySpaceMoves(ctx, tt.before, tt.after, math.MaxInt)
				if err != nil {
					t.Fatal(err)
				}
				if math.Abs(p-whole.MovedShare) > m {
					t.Errorf("moved %v ± %v from %d keys, but %v from %d", p, m, n, whole.MovedShare, whole.SampledKeys)
				}
				if !strings.HasPrefix(whole.Estimate, "from 100000 ") {
					t.Errorf("the whole sample's estimate: %q", whole.Estimate)
				}
			}
			var before, after float64
			for _, u := range ks.Upstreams {
				before += u.Before
				after += u.After
			}
			if math.Abs(before-1) > 1e-9 || math.Abs(after-1) > 1e-9 {
				t.Errorf("shares add up to %v before and %v after", before, after)
			}
		})
	}
}

// TestKeySpaceMovesStops checks that keySpaceMoves gives up with the
// context's error when the context is done, before or while it works.
func TestKeySpaceMovesStops(t *testing.T) {
	before, after := upstreamRange(0, 10_000), upstreamRange(0, 10_001)
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := keySpaceMoves(cancelled, before, after, math.MaxInt); !errors.Is(err, context.Canceled) {
		t.Errorf("with a cancelled context: %v, want %v", err, context.Canceled)
	}
	// 100,000 keys against 20,001 upstreams is a minute of work: only a
	// look at the context while it works ends it before the test's timeout
	soon, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := keySpaceMoves(soon, before, after, math.MaxInt); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("with a context done after 50ms: %v, want %v", err, context.DeadlineExceeded)
	}
	if _, err := liveMoves(cancelled, liveSessions(10, before[:3]), after, math.MaxInt); !errors.Is(err, context.Canceled) {
		t.Errorf("live connections with a cancelled context: %v, want %v", err, context.Canceled)
	}
}

// TestKeySpaceMovesEmpty checks that an empty list is an error, not a
// panic.
func TestKeySpaceMovesEmpty(t *testing.T) {
	ups := upstreamRange(0, 3)
	for _, tt := range []struct {
		name          string
		before, after []PickerUpstream
		wantErr       string
	}{
		{"none before", nil, ups, "key space: no upstreams before the change"},
		{"none after", ups, nil, "key space: no upstreams after the change"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := keySpaceMoves(context.Background(), tt.before, tt.after, planKeyScores); err == nil || err.Error() != tt.wantErr {
				t.Errorf("%v, want %q", err, tt.wantErr)
			}
		})
	}
}

// liveSessions returns n connections with test keys, each on the
// upstream of ups its key prefers.
func liveSessions(n int, ups []PickerUpstream) []liveSession {
	p := NewPicker(ups)
	out := make([]liveSession, n)
	for i := range out {
		key := testKey(i)
		out[i] = liveSession{key: key, upstream: ups[p.Pick(key, nil)].Dial}
	}
	return out
}

// TestLiveMoves checks the count of flowing connections a change would
// move: exact when every key can be scored, and an estimate within its
// stated margin when a sample is.
func TestLiveMoves(t *testing.T) {
	before := upstreamRange(0, 4)
	after := append(upstreamRange(1, 3), upstreamRange(10, 2)...) // one removed, two added
	sessions := liveSessions(3000, before)

	// what would move, every key scored by hand
	picker := NewPicker(after)
	want := liveChange{Total: len(sessions)}
	for _, s := range sessions {
		kept := slices.ContainsFunc(after, func(u PickerUpstream) bool { return u.Dial == s.upstream })
		if !kept {
			want.OnRemovedUpstreams++
		} else {
			want.KeysScored++
		}
		if after[picker.Pick(s.key, nil)].Dial != s.upstream {
			want.WouldMove++
		}
	}
	if want.OnRemovedUpstreams == 0 || want.WouldMove <= want.OnRemovedUpstreams {
		t.Fatalf("the test's change moves too little to test: %+v", want)
	}

	tests := []struct {
		name       string
		sessions   []liveSession
		budget     int
		wantScored int
		sampled    bool
	}{
		{"every key scored", sessions, planLiveScores, want.KeysScored, false},
		{"just enough budget", sessions, len(after) * want.KeysScored, want.KeysScored, false},
		{"a sample scored", sessions, len(after) * 400, 400, true},
		{"a budget below one key", sessions, 1, 1, true},
		{"no connections", nil, planLiveScores, 0, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := liveMoves(context.Background(), tt.sessions, after, tt.budget)
			if err != nil {
				t.Fatal(err)
			}
			switch {
			case tt.sessions == nil:
				if got != (liveChange{}) {
					t.Errorf("%+v, want nothing", got)
				}
			case !tt.sampled:
				if got != want {
					t.Errorf("%+v, want %+v", got, want)
				}
			default:
				if got.Total != want.Total || got.OnRemovedUpstreams != want.OnRemovedUpstreams || got.KeysScored != tt.wantScored {
					t.Errorf("%+v: want %d in total, %d on the removed upstream (both exact), %d scored", got, want.Total, want.OnRemovedUpstreams, tt.wantScored)
				}
				if got.WouldMoveMargin <= 0 || abs(got.WouldMove-want.WouldMove) > got.WouldMoveMargin {
					t.Errorf("would move %d ± %d, but %d do", got.WouldMove, got.WouldMoveMargin, want.WouldMove)
				}
			}
		})
	}
}

func abs(n int) int {
	if n < 0 {
		return -n
	}
	return n
}

// BenchmarkKeySpaceMoves measures what a plan's key-space estimate costs
// per score evaluation (one key against one upstream), the unit that
// planKeyScores budgets: ns/score is the time of one keySpaceMoves over
// the keys it sampled times the upstreams of both lists. Each samples the
// fewest keys, planMinSampleKeys, to keep a run short.
func BenchmarkKeySpaceMoves(b *testing.B) {
	for _, n := range []int{3, 100, 1000} {
		for _, weighted := range []bool{false, true} {
			before := equalPool(n)
			after := equalPool(n + 1) // one added
			if weighted {
				before[0].Weight = 2
				after[0].Weight = 2
			}
			b.Run(fmt.Sprintf("upstreams=%d/weighted=%v", n, weighted), func(b *testing.B) {
				b.ReportAllocs()
				var sampled int
				for b.Loop() {
					ks, err := keySpaceMoves(context.Background(), before, after, 1)
					if err != nil {
						b.Fatal(err)
					}
					sampled = ks.SampledKeys
				}
				scores := float64(b.N) * float64(sampled) * float64(len(before)+len(after))
				b.ReportMetric(float64(b.Elapsed().Nanoseconds())/scores, "ns/score")
				b.ReportMetric(float64(sampled), "keys")
			})
		}
	}
}
