// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"encoding/json"
	"os"
	"reflect"
	"regexp"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// TestDynamicUpstreamsDocs keeps docs/dynamic-upstreams.md honest: its
// syntax blocks are the UnmarshalCaddyfile doc comments', it names every
// JSON field of the sources, and each example's `dynamic` source alone
// adapts to its JSON's `dynamic_upstreams` (TestDynamicAndTierExamples
// adapts and runs each example whole).
func TestDynamicUpstreamsDocs(t *testing.T) {
	raw, err := os.ReadFile("docs/dynamic-upstreams.md")
	if err != nil {
		t.Fatal(err)
	}
	doc := string(raw)
	source, err := os.ReadFile("dynamic_caddyfile.go")
	if err != nil {
		t.Fatal(err)
	}
	syntaxes := regexp.MustCompile(`// UnmarshalCaddyfile sets up the source from Caddyfile tokens\. Syntax:\n//\n((?://\t.*\n|//\n)*?//\t\}\n)`).FindAllSubmatch(source, -1)
	if len(syntaxes) != 3 {
		t.Fatalf("found %d syntax blocks in dynamic_caddyfile.go; want 3", len(syntaxes))
	}
	for _, m := range syntaxes {
		var lines []string
		for line := range strings.SplitSeq(strings.TrimSuffix(string(m[1]), "\n"), "\n") {
			lines = append(lines, strings.TrimPrefix(strings.TrimPrefix(line, "//"), "\t"))
		}
		if block := "```\n" + strings.Join(lines, "\n") + "\n```"; !strings.Contains(doc, block) {
			t.Errorf("the docs lack the syntax block\n%s", block)
		}
	}

	options := section(t, doc, "### Options")
	var fields []string
	for _, typ := range []reflect.Type{reflect.TypeFor[AUpstreams](), reflect.TypeFor[SRVUpstreams](), reflect.TypeFor[MultiUpstreams]()} {
		fields = append(fields, jsonFields(typ, "")...)
	}
	fields = append(fields, jsonFields(reflect.TypeFor[UpstreamResolver](), "resolver.")...)
	fields = append(fields, jsonFields(reflect.TypeFor[IPVersions](), "versions.")...)
	for _, f := range fields {
		if f != "resolver" && f != "versions" && !strings.Contains(options, "`"+f+"`") {
			t.Errorf("the docs' options do not name JSON field %q", f)
		}
	}

	examples := section(t, doc, "## Examples")
	caddyfiles, jsons := fencedBlocks(examples, "caddyfile"), fencedBlocks(examples, "json")
	if len(caddyfiles) == 0 || len(caddyfiles) != len(jsons) {
		t.Fatalf("%d Caddyfile examples and %d JSON; want pairs", len(caddyfiles), len(jsons))
	}
	for i, cf := range caddyfiles {
		d := caddyfile.NewTestDispenser(cf)
		var got []byte
		for d.Next() {
			if d.Val() == "dynamic" && d.NextArg() {
				if got, err = unmarshalSource(d); err != nil {
					t.Fatalf("example %d: %v", i+1, err)
				}
				break
			}
		}
		var config any
		if err := json.Unmarshal([]byte(jsons[i]), &config); err != nil {
			t.Fatalf("example %d: its JSON: %v", i+1, err)
		}
		want, _ := json.Marshal(findKey(config, "dynamic_upstreams"))
		if got == nil || string(want) == "null" {
			t.Fatalf("example %d has no dynamic source in its Caddyfile or its JSON", i+1)
		}
		assertJSONEqual(t, got, string(want))
	}
}

// section returns doc's section under heading, up to the next heading of
// the same or a higher level.
func section(t *testing.T, doc, heading string) string {
	t.Helper()
	start := strings.Index(doc, "\n"+heading+"\n")
	if start < 0 {
		t.Fatalf("no %q section", heading)
	}
	s := doc[start+1+len(heading):]
	level := strings.Count(strings.Fields(heading)[0], "#")
	for i := 1; i <= level; i++ {
		if end := strings.Index(s, "\n"+strings.Repeat("#", i)+" "); end >= 0 {
			s = s[:end]
		}
	}
	return s
}

// findKey returns the first value under key in a decoded JSON value.
func findKey(v any, key string) any {
	switch v := v.(type) {
	case map[string]any:
		if found, ok := v[key]; ok {
			return found
		}
		for _, child := range v {
			if found := findKey(child, key); found != nil {
				return found
			}
		}
	case []any:
		for _, child := range v {
			if found := findKey(child, key); found != nil {
				return found
			}
		}
	}
	return nil
}
