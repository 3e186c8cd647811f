// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"fmt"
	"slices"
	"testing"
)

// TestTiers kills the primaries one by one and brings one back, with real
// backends, and checks at each step that every connection lands where the
// tiers say: on its first choice among the primaries still up, in the
// primaries' rendezvous order; once none is up, on the backups by the
// backups' own order; and back on a primary as soon as one recovers. It
// runs twice: with no health checks, so that each connection finds the
// dead primaries by failed dials and fails over dial by dial, and with
// active checks, so that dead primaries are skipped without a dial and
// the admin API says which tier serves.
func TestTiers(t *testing.T) {
	for _, tc := range []struct {
		name   string
		health map[string]any
	}{
		{"failed dials", map[string]any{"passive": map[string]any{"fail_duration": "0s"}}},
		{"active checks", map[string]any{"active": map[string]any{"interval": "50ms"}, "passive": map[string]any{"fail_duration": "0s"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			checkNoLeaks(t)
			primaries, pAddrs := startBackends(t, 3, whoami)
			backups, bAddrs := startBackends(t, 2, whoami)
			for i, b := range backups {
				b.name = fmt.Sprintf("k%d", i)
			}
			names := map[string]string{}
			ups := upstreamsJSON(pAddrs...)
			for i, a := range pAddrs {
				names[a] = primaries[i].name
			}
			for i, a := range bAddrs {
				ups = append(ups, map[string]any{"dial": a, "tier": BackupTier})
				names[a] = backups[i].name
			}
			c := startCaddy(t, map[string]any{"upstreams": ups, "health_checks": tc.health})
			primaryOrder, _ := handlerPicker(upstreamsJSON(pAddrs...))
			backupOrder, _ := handlerPicker(upstreamsJSON(bAddrs...))

			// expect says where a key goes with the primaries in up.
			expect := func(key string, up []bool) string {
				for _, i := range primaryOrder.Order(key, nil) {
					if up[i] {
						return pAddrs[i]
					}
				}
				return bAddrs[backupOrder.Pick(key, nil)]
			}
			check := func(up []bool) {
				t.Helper()
				if tc.health["active"] != nil {
					wantTier := 0
					if !slices.Contains(up, true) {
						wantTier = BackupTier
					}
					eventually(t, testTimeout, "the active checks to see the primaries", func() error {
						hs := c.upstreams(t, "")[0]
						if hs.ServingTier == nil || *hs.ServingTier != wantTier {
							return fmt.Errorf("serving tier %v, want %d", hs.ServingTier, wantTier)
						}
						for i, u := range hs.Upstreams[:3] {
							if (u.Health.Status == "up") != up[i] {
								return fmt.Errorf("%s is %s", u.Dial, u.Health.Status)
							}
						}
						return nil
					})
				}
				seen := map[string]int{}
				for range 40 {
					conn := c.dial(t)
					key := conn.LocalAddr().String()
					name, err := askName(conn)
					conn.Close()
					if err != nil {
						t.Fatalf("connection %s: %v", key, err)
					}
					if want := names[expect(key, up)]; name != want {
						t.Fatalf("with primaries up %v, connection %s landed on %s, want %s", up, key, name, want)
					}
					seen[name]++
				}
				t.Logf("primaries up %v: 40 connections landed %v", up, seen)
			}

			up := []bool{true, true, true}
			check(up)
			for i := range primaries {
				primaries[i].stop()
				up[i] = false
				check(up)
			}

			// /godist/pick shows the tiers in the key's order and which
			// serves (without health checks, it cannot know that the
			// primaries are dead until a dial fails).
			p := c.pick(t, "key=k")[0]
			if len(p.Order) != 5 || p.Order[0].Tier != 0 || p.Order[2].Tier != 0 || p.Order[3].Tier != BackupTier || p.Order[4].Tier != BackupTier {
				t.Errorf("pick: the order should be the primaries', then the backups': %+v", p.Order)
			}
			if tc.health["active"] != nil && (p.ServingTier == nil || *p.ServingTier != BackupTier || p.Order[0].Usable || deref(p.Upstream) != expect("k", up)) {
				t.Errorf("pick with the primaries down: serving tier %v, upstream %s, order %+v", p.ServingTier, deref(p.Upstream), p.Order)
			}

			// One primary recovers on its address: its tier serves again,
			// so every key comes back to it.
			primaries[1] = startBackend(t, primaries[1].name, pAddrs[1], whoami)
			up[1] = true
			check(up)
			if tc.health["active"] != nil {
				p := c.pick(t, "key=k")[0]
				for _, o := range p.Order {
					if o.Tier == BackupTier && (o.Usable || o.WhyNot != "standby: tier 0 serves") {
						t.Errorf("a backup while a primary is up: %+v", o)
					}
				}
			}
		})
	}
}
