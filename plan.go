// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
)

// This file works out what a change of a handler's upstream list would
// do, before anyone makes it: which share of the keys would move, which
// flowing connections sit on upstreams that would go or whose keys would
// go elsewhere, and the new fingerprint. It changes nothing.

// planSampleKeys is how many keys a plan hashes to estimate the share of
// the key space that moves. The standard error of an estimated share p is
// sqrt(p(1-p)/n): 0.14 percentage points for a quarter of the keys, and a
// plan takes some tens of milliseconds.
const planSampleKeys = 100_000

// planSampleSeed fixes the sample, so that a plan gives the same answer
// every time and in every process.
const planSampleSeed = 0x676f64697374 // "godist"

// planResult is what POST /godist/plan answers.
type planResult struct {
	Handler        int            `json:"handler"`
	Fingerprint    string         `json:"fingerprint"`     // now
	NewFingerprint string         `json:"new_fingerprint"` // with the proposed upstreams
	KeySpace       keySpaceChange `json:"key_space"`
	Connections    liveChange     `json:"live_connections"`
}

// keySpaceChange is how the keys would move, estimated over a sample.
type keySpaceChange struct {
	Estimate    string  `json:"estimate"`
	SampledKeys int     `json:"sampled_keys"`
	MovedKeys   int     `json:"moved_keys"`
	MovedShare  float64 `json:"moved_share"`

	// Every upstream of either list: the current ones in their order,
	// then the added ones in theirs.
	Upstreams []shareChange `json:"upstreams"`
}

// shareChange is an upstream's share of the sampled keys now and after
// the change, by the hash alone, as if every upstream were up.
type shareChange struct {
	Dial   string  `json:"dial"`
	Change string  `json:"change"` // "kept", "reweighted", "added" or "removed"
	Before float64 `json:"before"`
	After  float64 `json:"after"`
}

// liveChange is what the change would mean for the connections flowing
// through the handler now. They would not move: a flowing connection
// finishes on its upstream, even one the new list drops. A connection
// "would move" when its key would go to another upstream than the one it
// is on, so the next connection with the same key (the same client, with
// hash_key ip) lands elsewhere.
type liveChange struct {
	Total              int `json:"total"`
	OnRemovedUpstreams int `json:"on_removed_upstreams"`
	WouldMove          int `json:"would_move"` // including those on removed upstreams
}

// validateProposed checks a proposed upstream list as a handler's
// Provision and Validate would, and fills in the default weight.
func validateProposed(ups []*Upstream) error {
	for i, u := range ups {
		if u == nil {
			return fmt.Errorf("upstream %d: missing", i)
		}
		if u.Weight == 0 {
			u.Weight = 1
		}
		if _, _, err := parseDial(u.Dial); err != nil {
			return fmt.Errorf("upstream %d (%s): %w", i, u.Dial, err)
		}
	}
	return (&Handler{Upstreams: ups}).Validate()
}

// plan works out what replacing the handler's upstreams with proposed, a
// list that validateProposed accepted, would do.
func (h *Handler) plan(index int, proposed []*Upstream) planResult {
	before := h.picker
	afterUps := make([]PickerUpstream, len(proposed))
	afterIndex := make(map[string]int, len(proposed))
	for i, u := range proposed {
		afterUps[i] = PickerUpstream{Dial: u.Dial, Weight: u.Weight}
		afterIndex[u.Dial] = i
	}
	after := NewPicker(afterUps)

	// Sampled keys: count each upstream's keys in both lists, and those
	// whose upstream changes.
	beforeCount := make([]int, before.Len())
	afterCount := make([]int, after.Len())
	moved := 0
	r := rand.New(rand.NewPCG(planSampleSeed, planSampleSeed)) //nolint:gosec // a fixed, reproducible sample, not a secret
	buf := make([]byte, 0, len("255.255.255.255:65535"))
	for range planSampleKeys {
		v := r.Uint32()
		ip := netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
		buf = netip.AddrPortFrom(ip, uint16(1024+r.IntN(65536-1024))).AppendTo(buf[:0])
		key := string(buf)
		b, a := before.Pick(key, nil), after.Pick(key, nil)
		beforeCount[b]++
		afterCount[a]++
		if h.pool[b].dial != proposed[a].Dial {
			moved++
		}
	}

	ks := keySpaceChange{
		Estimate:    fmt.Sprintf("from %d synthetic ip:port keys, the same every time", planSampleKeys),
		SampledKeys: planSampleKeys,
		MovedKeys:   moved,
		MovedShare:  keyShare(moved),
	}
	current := make(map[string]bool, len(h.pool))
	for i, u := range h.pool {
		current[u.dial] = true
		sc := shareChange{Dial: u.dial, Change: "removed", Before: keyShare(beforeCount[i])}
		if j, ok := afterIndex[u.dial]; ok {
			sc.After = keyShare(afterCount[j])
			sc.Change = "kept"
			if proposed[j].Weight != u.weight {
				sc.Change = "reweighted"
			}
		}
		ks.Upstreams = append(ks.Upstreams, sc)
	}
	for j, u := range proposed {
		if !current[u.Dial] {
			ks.Upstreams = append(ks.Upstreams, shareChange{Dial: u.Dial, Change: "added", After: keyShare(afterCount[j])})
		}
	}

	var live liveChange
	for _, s := range h.sessions.snapshot() {
		live.Total++
		if _, kept := afterIndex[s.upstream]; !kept {
			live.OnRemovedUpstreams++
		}
		if proposed[after.Pick(s.key, nil)].Dial != s.upstream {
			live.WouldMove++
		}
	}

	return planResult{
		Handler:        index,
		Fingerprint:    h.fingerprint,
		NewFingerprint: fingerprint(h.HashKey, proposed),
		KeySpace:       ks,
		Connections:    live,
	}
}

// keyShare returns n sampled keys as a share of the sample.
func keyShare(n int) float64 {
	return float64(n) / planSampleKeys
}
