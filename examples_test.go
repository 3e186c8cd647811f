// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/modules/standard" // the HTTP backends of the demo
)

// TestExamples adapts every example config as `caddy adapt --validate`
// does, so that an example can never rot: it must be formatted, adapt
// without warnings, and provision.
func TestExamples(t *testing.T) {
	files, err := filepath.Glob("examples/*Caddyfile")
	if err != nil || len(files) == 0 {
		t.Fatalf("no examples found: %v", err)
	}
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			adapted := adaptCaddyfile(t, file)
			if err := caddy.Validate(mustConfig(t, adapted)); err != nil {
				t.Fatalf("validating %s: %v", file, err)
			}
		})
	}
}

func adaptCaddyfile(t *testing.T, file string) []byte {
	t.Helper()
	body, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	out, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt(body, map[string]any{"filename": file})
	if err != nil {
		t.Fatalf("adapting %s: %v", file, err)
	}
	for _, w := range warnings {
		t.Errorf("adapting %s: warning: %s", file, w)
	}
	return out
}

func mustConfig(t *testing.T, adapted []byte) *caddy.Config {
	t.Helper()
	cfg := new(caddy.Config)
	if err := caddy.StrictUnmarshalJSON(adapted, cfg); err != nil {
		t.Fatalf("decoding adapted config: %v", err)
	}
	return cfg
}

// stripComments drops leading comment lines.
func stripComments(s string) string {
	var kept []string
	for _, line := range strings.SplitAfter(s, "\n") {
		if !strings.HasPrefix(line, "#") {
			kept = append(kept, line)
		}
	}
	return strings.Join(kept, "")
}

// TestReadmeOptionReference keeps the README's option reference complete:
// every JSON field of the handler's config is in it.
func TestReadmeOptionReference(t *testing.T) {
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	ref := section(t, string(readme), "## Option reference")
	fields := jsonFields(reflect.TypeFor[Handler](), "")
	fields = append(fields, jsonFields(reflect.TypeFor[Upstream](), "upstreams[].")...)
	fields = append(fields, jsonFields(reflect.TypeFor[ActiveHealthChecks](), "health_checks.active.")...)
	fields = append(fields, jsonFields(reflect.TypeFor[PassiveHealthChecks](), "health_checks.passive.")...)
	for _, f := range fields {
		if f == "health_checks" || f == "upstreams" {
			continue // their fields are listed one by one
		}
		if !strings.Contains(ref, "`"+f+"`") {
			t.Errorf("the README's option reference does not list JSON field %q", f)
		}
	}
}

// TestReadmeSyntax keeps the README's syntax block and UnmarshalCaddyfile's
// doc comment in step: the README's "## Syntax" section holds the comment's
// syntax block, exactly.
func TestReadmeSyntax(t *testing.T) {
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	source, err := os.ReadFile("caddyfile.go")
	if err != nil {
		t.Fatal(err)
	}
	// the block: the doc comment's tab-indented lines, and the empty
	// comment lines between them
	doc := regexp.MustCompile(`// UnmarshalCaddyfile sets up the handler from Caddyfile tokens\. Syntax:\n//\n((?://\t.*\n|//\n)*?//\t\}\n)`).FindSubmatch(source)
	if doc == nil {
		t.Fatal("UnmarshalCaddyfile's doc comment has no syntax block")
	}
	var syntax []string
	for line := range strings.SplitSeq(strings.TrimSuffix(string(doc[1]), "\n"), "\n") {
		syntax = append(syntax, strings.TrimPrefix(strings.TrimPrefix(line, "//"), "\t"))
	}
	block := "```\n" + strings.Join(syntax, "\n") + "\n```"
	if !strings.Contains(section(t, string(readme), "## Syntax"), block) {
		t.Errorf("the README's syntax block differs from UnmarshalCaddyfile's; it should read:\n%s", block)
	}
}

// jsonFields lists the JSON names of t's exported fields, with prefix.
func jsonFields(t reflect.Type, prefix string) []string {
	var out []string
	for field := range t.Fields() {
		tag := field.Tag.Get("json")
		name, _, _ := strings.Cut(tag, ",")
		if name == "" || name == "-" {
			continue
		}
		out = append(out, prefix+name)
	}
	return out
}
