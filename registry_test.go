// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"crypto/sha256"
	"encoding/hex"
	"strconv"
	"testing"
)

// TestFingerprint pins the fingerprints of the example configs, which
// operators compare across Caddy instances and the end-to-end check
// greps for, and checks what changes them and what does not.
func TestFingerprint(t *testing.T) {
	ups := func(weights ...int) []*Upstream {
		out := make([]*Upstream, len(weights))
		for i, w := range weights {
			out[i] = &Upstream{Dial: "localhost:400" + strconv.Itoa(i), Weight: w}
		}
		return out
	}
	examples := ups(1, 1, 1)
	tests := []struct {
		name      string
		hashKey   string
		upstreams []*Upstream
		want      string // a pinned value; "" pins none
		same      bool   // whether it equals examples/Caddyfile's handler's
	}{
		{"examples/Caddyfile", "", examples, "a81d3cd816205018", true},
		{"the e2e's JSON server", "ip", ups(1, 2, 1), "e94dcbb853807efc", false},
		{"hash_key spelled out", "ip_port", examples, "", true},
		{"weight 0 counts as 1", "", ups(0, 0, 0), "", true},
		{"another order", "", []*Upstream{examples[2], examples[0], examples[1]}, "", true},
		{"another weight", "", ups(1, 1, 2), "", false},
		{"another hash key", "ip", examples, "", false},
		{"one upstream fewer", "", examples[:2], "", false},
		{"the same address written otherwise", "", []*Upstream{{Dial: "127.0.0.1:4000"}, examples[1], examples[2]}, "", false},
		{"tier 0 spelled out", "", []*Upstream{examples[0], examples[1], {Dial: "localhost:4002", Tier: 0}}, "", true},
		{"a backup", "", []*Upstream{examples[0], examples[1], {Dial: "localhost:4002", Tier: BackupTier}}, "977629ac51a0427f", false},
		{"another tier", "", []*Upstream{examples[0], examples[1], {Dial: "localhost:4002", Tier: 1}}, "", false},
	}
	base := fingerprint("", examples)
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := fingerprint(tt.hashKey, tt.upstreams)
			if tt.want != "" && got != tt.want {
				t.Errorf("fingerprint %s, want %s", got, tt.want)
			}
			if (got == base) != tt.same {
				t.Errorf("fingerprint %s, examples/Caddyfile's %s: want the same: %v", got, base, tt.same)
			}
			sum := sha256.Sum256([]byte(fingerprintText(tt.hashKey, tt.upstreams)))
			if hex.EncodeToString(sum[:])[:16] != got {
				t.Errorf("fingerprint %s is not the SHA-256 of %q", got, fingerprintText(tt.hashKey, tt.upstreams))
			}
		})
	}
}
