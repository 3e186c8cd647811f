// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// readmeSection returns the README section under heading, up to the next
// heading of the same level.
func readmeSection(t *testing.T, heading string) string {
	t.Helper()
	for _, file := range []string{"README.md"} {
		b, err := os.ReadFile(file)
		if err != nil {
			continue
		}
		s := string(b)
		start := strings.Index(s, "\n"+heading+"\n")
		if start < 0 && strings.HasPrefix(s, heading+"\n") {
			start = 0
		}
		if start < 0 {
			continue
		}
		s = s[start+1:]
		if end := strings.Index(s[len(heading):], "\n## "); end >= 0 {
			s = s[:len(heading)+end]
		}
		return s
	}
	t.Fatalf("no README has a %q section", heading)
	return ""
}

// fencedBlocks returns the contents of the section's code blocks of the
// given language.
func fencedBlocks(section, lang string) []string {
	matches := regexp.MustCompile("(?s)```"+lang+"\n(.*?)```").FindAllStringSubmatch(section, -1)
	blocks := make([]string, len(matches))
	for i, m := range matches {
		blocks[i] = m[1]
	}
	return blocks
}

// TestReadmeGodistConf keeps the README's adapter output honest: it is
// what examples/godist.conf adapts to.
func TestReadmeGodistConf(t *testing.T) {
	section := readmeSection(t, "### Running an unchanged godist.conf")
	blocks := fencedBlocks(section, "json")
	if len(blocks) != 1 {
		t.Fatalf("want one json block in the section, found %d", len(blocks))
	}
	body, err := os.ReadFile("examples/godist.conf")
	if err != nil {
		t.Fatal(err)
	}
	out, _, err := caddyconfig.GetAdapter("godist").Adapt(body, nil)
	if err != nil {
		t.Fatal(err)
	}
	assertJSONEqual(t, out, blocks[0])
}

// TestReadmeLBPolicy keeps the README's lb_policy example honest: its
// Caddyfile is examples/lb_policy.Caddyfile, and its JSON is what that
// adapts to.
func TestReadmeLBPolicy(t *testing.T) {
	section := readmeSection(t, "## Using the hash in caddy-l4's proxy (lb_policy godist)")
	caddyfiles, jsons := fencedBlocks(section, "caddyfile"), fencedBlocks(section, "json")
	if len(caddyfiles) != 1 || len(jsons) != 1 {
		t.Fatalf("want one caddyfile and one json block in the section, found %d and %d", len(caddyfiles), len(jsons))
	}
	example, err := os.ReadFile("examples/lb_policy.Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	if stripComments(string(example)) != caddyfiles[0] {
		t.Errorf("the README's lb_policy Caddyfile differs from examples/lb_policy.Caddyfile:\n%s", caddyfiles[0])
	}
	assertJSONEqual(t, adaptCaddyfile(t, "examples/lb_policy.Caddyfile"), jsons[0])
}
