// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"os"
	"strconv"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// TestStatusPageDocs keeps docs/status-page.md honest: each Caddyfile
// example adapts to the JSON beside it, and provisions.
func TestStatusPageDocs(t *testing.T) {
	doc, err := os.ReadFile("docs/status-page.md")
	if err != nil {
		t.Fatal(err)
	}
	examples := section(t, string(doc), "## Examples")
	caddyfiles, jsons := fencedBlocks(examples, "caddyfile"), fencedBlocks(examples, "json")
	if len(caddyfiles) == 0 || len(caddyfiles) != len(jsons) {
		t.Fatalf("%d Caddyfile examples and %d JSON; want pairs", len(caddyfiles), len(jsons))
	}
	for i, cf := range caddyfiles {
		t.Run(strconv.Itoa(i+1), func(t *testing.T) {
			out, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cf), nil)
			if err != nil {
				t.Fatalf("adapting example %d: %v", i+1, err)
			}
			if len(warnings) > 0 {
				t.Errorf("adapting example %d: %v", i+1, warnings)
			}
			assertJSONEqual(t, out, jsons[i])
			if err := caddy.Validate(mustConfig(t, out)); err != nil {
				t.Fatalf("validating example %d: %v", i+1, err)
			}
		})
	}
}
