// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"fmt"
	"slices"
	"testing"
)

// describedPool makes upstreams with no state, as a plan does.
func describedPool(ups ...Upstream) []*upstream {
	out := make([]*upstream, len(ups))
	for i, u := range ups {
		out[i] = &upstream{dial: u.Dial, weight: max(u.Weight, 1), tier: u.Tier, source: sourceStatic}
	}
	return out
}

// TestMembershipWithoutTiersIsToday checks that a static list without
// tiers picks, orders and fingerprints exactly as the handler did before
// memberships: the same Picker over the same list, and the pinned
// fingerprints the end-to-end check greps for.
func TestMembershipWithoutTiersIsToday(t *testing.T) {
	for _, tc := range []struct {
		hashKey string
		ups     []Upstream
		want    string
	}{
		{"", []Upstream{{Dial: "localhost:4000"}, {Dial: "localhost:4001"}, {Dial: "localhost:4002"}}, "a81d3cd816205018"},
		{"ip", []Upstream{{Dial: "localhost:4000"}, {Dial: "localhost:4001", Weight: 2}, {Dial: "localhost:4002"}}, "e94dcbb853807efc"},
	} {
		m := newMembership(tc.hashKey, describedPool(tc.ups...))
		if m.fingerprint != tc.want {
			t.Errorf("fingerprint %s, want %s (%q)", m.fingerprint, tc.want, m.digested)
		}
		var pu []PickerUpstream
		for _, u := range tc.ups {
			pu = append(pu, PickerUpstream{Dial: u.Dial, Weight: max(u.Weight, 1)})
		}
		p := NewPicker(pu)
		for i := range 2000 {
			key := testKey(i)
			if got, want := m.tiers[0].pick(key, func(int) bool { return true }), p.Pick(key, nil); got != want {
				t.Fatalf("key %s: membership picks %d, the picker %d", key, got, want)
			}
			if got, want := m.order(key, nil), p.Order(key, nil); !slices.Equal(got, want) {
				t.Fatalf("key %s: membership order %v, the picker's %v", key, got, want)
			}
		}
	}
}

// TestMembershipTiers checks the order across tiers: the lowest tier's
// rendezvous order, then the next tier's, each tier ranked by its own
// picker only, whatever the order the pool lists them in.
func TestMembershipTiers(t *testing.T) {
	m := newMembership("", describedPool(
		Upstream{Dial: "10.0.0.9:1", Tier: BackupTier},
		Upstream{Dial: "10.0.0.1:1"},
		Upstream{Dial: "10.0.0.5:1", Tier: 10},
		Upstream{Dial: "10.0.0.2:1", Weight: 3},
		Upstream{Dial: "10.0.0.6:1", Tier: 10},
		Upstream{Dial: "10.0.0.3:1"},
	))
	if got := []int{m.tiers[0].number, m.tiers[1].number, m.tiers[2].number}; len(m.tiers) != 3 || !slices.Equal(got, []int{0, 10, BackupTier}) {
		t.Fatalf("tiers %v", got)
	}
	tier0 := NewPicker([]PickerUpstream{{Dial: "10.0.0.1:1", Weight: 1}, {Dial: "10.0.0.2:1", Weight: 3}, {Dial: "10.0.0.3:1", Weight: 1}})
	tier10 := NewPicker([]PickerUpstream{{Dial: "10.0.0.5:1", Weight: 1}, {Dial: "10.0.0.6:1", Weight: 1}})
	dialsOf := func(idx []int) []string {
		var out []string
		for _, i := range idx {
			out = append(out, m.pool[i].dial)
		}
		return out
	}
	for i := range 1000 {
		key := testKey(i)
		var want []string
		for _, j := range tier0.Order(key, nil) {
			want = append(want, []string{"10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"}[j])
		}
		for _, j := range tier10.Order(key, nil) {
			want = append(want, []string{"10.0.0.5:1", "10.0.0.6:1"}[j])
		}
		want = append(want, "10.0.0.9:1")
		if got := dialsOf(m.order(key, nil)); !slices.Equal(got, want) {
			t.Fatalf("key %s: order %v, want %v", key, got, want)
		}
		// a tier's pick skips what ok refuses, in the tier's own order
		first := m.index(want[3])
		if got := m.tiers[1].pick(key, func(i int) bool { return i != first }); m.pool[got].dial != want[4] {
			t.Fatalf("key %s: tier 10 without %s picks %s, want %s", key, want[3], m.pool[got].dial, want[4])
		}
	}
	if got := m.tiers[2].pick("k", func(int) bool { return false }); got != -1 {
		t.Errorf("a tier with nothing usable picks %d", got)
	}
	hash := m.hashTier()
	if len(hash) != 3 || hash[1] != (PickerUpstream{Dial: "10.0.0.2:1", Weight: 3}) {
		t.Errorf("the lowest tier for the key space: %v", hash)
	}
}

// TestMembershipPickAllocatesNothing: a pick within a tier, as the dial
// path makes it, allocates nothing, over 3, 16 or 100 upstreams in one
// tier or split between two.
func TestMembershipPickAllocatesNothing(t *testing.T) {
	for _, n := range []int{3, 16, 100} {
		for _, tiered := range []bool{false, true} {
			ups := make([]Upstream, n)
			for i := range ups {
				ups[i] = Upstream{Dial: fmt.Sprintf("10.0.%d.%d:5432", i/250, i%250+1)}
				if tiered && i%2 == 1 {
					ups[i].Tier = 1
				}
			}
			m := newMembership("", describedPool(ups...))
			key, skip := "203.0.113.9:51234", n/2
			failed := make(bitset, 2)
			allocs := testing.AllocsPerRun(100, func() {
				for k := range m.tiers {
					_ = m.tiers[k].pick(key, func(i int) bool { return i != skip && !failed.has(i) })
				}
			})
			if allocs != 0 {
				t.Errorf("%d upstreams, tiered %v: %.1f allocations per pick", n, tiered, allocs)
			}
		}
	}
}

// TestDiffMemberships checks what a change of membership is said to be.
func TestDiffMemberships(t *testing.T) {
	before := newMembership("", describedPool(
		Upstream{Dial: "10.0.0.1:1"}, Upstream{Dial: "10.0.0.2:1", Weight: 10}, Upstream{Dial: "10.0.0.3:1", Tier: 1}, Upstream{Dial: "10.0.0.4:1"}))
	after := newMembership("", describedPool(
		Upstream{Dial: "10.0.0.1:1"}, Upstream{Dial: "10.0.0.2:1", Weight: 30}, Upstream{Dial: "10.0.0.3:1"}, Upstream{Dial: "10.0.0.5:1"}))
	c := diffMemberships(before, after)
	want := memberChange{
		added:      []string{"10.0.0.5:1"},
		removed:    []string{"10.0.0.4:1"},
		reweighted: []string{"10.0.0.2:1: weight 10 -> 30"},
		retiered:   []string{"10.0.0.3:1: tier 1 -> 0"},
	}
	if fmt.Sprint(c) != fmt.Sprint(want) {
		t.Errorf("change %+v, want %+v", c, want)
	}
	if !diffMemberships(after, after).empty() {
		t.Error("a membership differs from itself")
	}
}

// BenchmarkMembershipPick is a pick as the dial path makes it: within the
// first tier, through the membership's index mapping, with the skip test
// the dial loop passes. Compare with BenchmarkPick, the bare picker.
func BenchmarkMembershipPick(b *testing.B) {
	for _, n := range []int{3, 16, 100} {
		for _, tiered := range []bool{false, true} {
			ups := make([]Upstream, n)
			for i := range ups {
				ups[i] = Upstream{Dial: fmt.Sprintf("10.0.%d.%d:5432", i/250, i%250+1)}
				if tiered && i%4 == 3 {
					ups[i].Tier = BackupTier
				}
			}
			m := newMembership("", describedPool(ups...))
			failed := make(bitset, 2)
			b.Run(fmt.Sprintf("upstreams=%d/backups=%v", n, tiered), func(b *testing.B) {
				b.ReportAllocs()
				key := "203.0.113.9:51234"
				for b.Loop() {
					_ = m.tiers[0].pick(key, func(i int) bool { return !failed.has(i) })
				}
			})
		}
	}
}
