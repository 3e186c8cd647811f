// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"encoding/json"
	"fmt"
	"os"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// TestOperateDocs keeps the fleet examples of docs/operate.md and of the
// README honest: each Caddyfile adapts to the JSON beside it, and the
// config validates, with its storage in a folder of the test's own.
func TestOperateDocs(t *testing.T) {
	for _, tc := range []struct{ file, section string }{
		{"docs/operate.md", "## Running a fleet"},
		{"README.md", "## Operating a fleet"},
	} {
		raw, err := os.ReadFile(tc.file)
		if err != nil {
			t.Fatal(err)
		}
		sec := section(t, string(raw), tc.section)
		caddyfiles, jsons := fencedBlocks(sec, "caddyfile"), fencedBlocks(sec, "json")
		if len(caddyfiles) == 0 || len(caddyfiles) != len(jsons) {
			t.Fatalf("%s, %s: %d Caddyfiles and %d JSON configs; want pairs", tc.file, tc.section, len(caddyfiles), len(jsons))
		}
		for i, cf := range caddyfiles {
			t.Run(fmt.Sprintf("%s %d", tc.file, i+1), func(t *testing.T) {
				adapted, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cf), nil)
				if err != nil || len(warnings) > 0 {
					t.Fatalf("adapting: %v %v", err, warnings)
				}
				assertJSONEqual(t, adapted, jsons[i])
				var cfg map[string]any
				if err := json.Unmarshal(adapted, &cfg); err != nil {
					t.Fatal(err)
				}
				cfg["storage"] = map[string]any{"module": "file_system", "root": t.TempDir()}
				b, err := json.Marshal(cfg)
				if err != nil {
					t.Fatal(err)
				}
				if err := caddy.Validate(mustConfig(t, b)); err != nil {
					t.Fatalf("validating: %v", err)
				}
			})
		}
	}
}
