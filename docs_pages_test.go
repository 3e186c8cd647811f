// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"encoding/json"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"unicode"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// The README and the pages of docs/ are checked as a whole here. Their
// convention (docs/README.md, "Conventions"): a ```caddyfile block is a
// complete Caddyfile, and the fenced block right after it is ```json, the
// whole config `caddy adapt` prints for it; syntax blocks are plain ```.

// docFiles lists the README and every page of docs/.
func docFiles(t *testing.T) []string {
	t.Helper()
	pages, err := filepath.Glob("docs/*.md")
	if err != nil || len(pages) == 0 {
		t.Fatalf("no docs pages found: %v", err)
	}
	return append([]string{"README.md"}, pages...)
}

// fence is one fenced code block of a Markdown file.
type fence struct {
	lang string
	body string
	line int // the line of its opening fence, from 1
}

// fences returns the fenced code blocks of doc, in order.
func fences(t *testing.T, file, doc string) []fence {
	t.Helper()
	var out []fence
	lines := strings.Split(doc, "\n")
	for i := 0; i < len(lines); i++ {
		if !strings.HasPrefix(lines[i], "```") {
			continue
		}
		f := fence{lang: strings.TrimSpace(lines[i][3:]), line: i + 1}
		var body []string
		for i++; i < len(lines) && !strings.HasPrefix(lines[i], "```"); i++ {
			body = append(body, lines[i])
		}
		if i == len(lines) {
			t.Fatalf("%s:%d: a code block that is never closed", file, f.line)
		}
		f.body = strings.Join(body, "\n") + "\n"
		out = append(out, f)
	}
	return out
}

// TestDocsCaddyfileExamples adapts every Caddyfile example of the README
// and of docs/, as `caddy adapt` does: it must adapt without warnings to
// exactly the JSON in the block after it, and that config must load into
// Caddy as `caddy validate` loads it, with its storage in a folder of the
// test's own, its logs discarded and its DNS sources asking a test
// resolver. (TestDynamicAndTierExamples runs the DNS and tier examples.)
func TestDocsCaddyfileExamples(t *testing.T) {
	dns := startTestDNS(t)
	examples := 0
	for _, file := range docFiles(t) {
		raw, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		blocks := fences(t, file, string(raw))
		for i, b := range blocks {
			if b.lang != "caddyfile" {
				continue
			}
			examples++
			t.Run(fmt.Sprintf("%s:%d", file, b.line), func(t *testing.T) {
				if i+1 == len(blocks) || blocks[i+1].lang != "json" {
					t.Fatalf("%s:%d: a Caddyfile example must be followed by its JSON in a ```json block (a syntax block is a plain ``` block)", file, b.line)
				}
				adapted, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(b.body), map[string]any{"filename": file})
				if err != nil {
					t.Fatalf("%s:%d: adapting: %v", file, b.line, err)
				}
				for _, w := range warnings {
					t.Errorf("%s:%d: adapting: warning: %s", file, b.line, w)
				}
				assertJSONEqual(t, adapted, blocks[i+1].body)
				if err := caddy.Validate(mustConfig(t, sandboxed(t, adapted, dns.addr))); err != nil {
					t.Fatalf("%s:%d: validating: %v", file, b.line, err)
				}
			})
		}
	}
	if examples < 20 {
		t.Errorf("found %d Caddyfile examples in the README and docs/; want at least 20", examples)
	}
}

// sandboxed returns the config adapted, with its storage in a folder of
// the test's own, every log but the default one writing nowhere, and every
// DNS source asking dnsAddr, so that validating it touches nothing outside
// the test. (Validating makes the default log Caddy's default logger, as
// every caddy.Validate does: left as it is, it writes to stderr.)
func sandboxed(t *testing.T, adapted []byte, dnsAddr string) []byte {
	t.Helper()
	var cfg map[string]any
	if err := json.Unmarshal(adapted, &cfg); err != nil {
		t.Fatal(err)
	}
	cfg["storage"] = map[string]any{"module": "file_system", "root": t.TempDir()}
	if logging, ok := cfg["logging"].(map[string]any); ok {
		if logs, ok := logging["logs"].(map[string]any); ok {
			for name, l := range logs {
				if name != "default" {
					l.(map[string]any)["writer"] = map[string]any{"output": "discard"}
				}
			}
		}
	}
	askTestDNS(cfg, dnsAddr)
	b, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestDocsExampleFiles keeps the examples folder and the docs in step:
// each of these files is shown, comments left out, as a Caddyfile example
// of its page (whose JSON TestDocsCaddyfileExamples checks).
func TestDocsExampleFiles(t *testing.T) {
	for _, tc := range []struct {
		name, page, section, file string
	}{
		{"the README's example", "README.md", "## Example", "examples/postgres.Caddyfile"},
		{"TLS passthrough", "docs/hashing.md", "## Examples", "examples/tls-passthrough.Caddyfile"},
		{"the godist-tcp listener", "docs/descriptors.md", "## The `godist-tcp` network", "examples/descriptors.Caddyfile"},
		{"PROXY protocol", "docs/proxy-protocol.md", "## Examples", "examples/proxy-protocol.Caddyfile"},
		{"DNS over UDP and TCP", "docs/udp.md", "## Examples", "examples/dns.Caddyfile"},
		{"lb_policy godist", "docs/lb-policy.md", "## Examples", "examples/lb_policy.Caddyfile"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			raw, err := os.ReadFile(tc.page)
			if err != nil {
				t.Fatal(err)
			}
			example, err := os.ReadFile(tc.file)
			if err != nil {
				t.Fatal(err)
			}
			sec := section(t, string(raw), tc.section)
			if !slices.Contains(fencedBlocks(sec, "caddyfile"), stripComments(string(example))) {
				t.Errorf("%s, %q: no Caddyfile example is %s (comments left out):\n%s", tc.page, tc.section, tc.file, stripComments(string(example)))
			}
		})
	}
}

// TestDocsGodistConf keeps the godist.conf page's adapter output honest: it
// is what examples/godist.conf adapts to.
func TestDocsGodistConf(t *testing.T) {
	raw, err := os.ReadFile("docs/godist-conf.md")
	if err != nil {
		t.Fatal(err)
	}
	blocks := fencedBlocks(section(t, string(raw), "## Running an unchanged godist.conf"), "json")
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

// TestDocsPages keeps the pages in one shape, caddy-l4's: a title, then a
// summary; and every page is linked from the docs index and the README.
func TestDocsPages(t *testing.T) {
	index, err := os.ReadFile("docs/README.md")
	if err != nil {
		t.Fatal(err)
	}
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, file := range docFiles(t)[1:] {
		if file == "docs/README.md" {
			continue
		}
		t.Run(file, func(t *testing.T) {
			raw, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			doc := string(raw)
			if !regexp.MustCompile(`\A---\ntitle: .+\n---\n\n# .+\n\n## Summary\n`).MatchString(doc) {
				t.Errorf("%s should open with its front matter title, its # title and a ## Summary", file)
			}
			name := filepath.Base(file)
			if !strings.Contains(string(index), "]("+name+")") {
				t.Errorf("docs/README.md does not link %s", name)
			}
			if !strings.Contains(string(readme), "](docs/"+name+")") {
				t.Errorf("README.md does not link docs/%s", name)
			}
		})
	}
}

// TestDocsLinks checks every relative link of the README and of docs/: the
// file it names exists, and so does the heading its #anchor names, as
// GitHub makes anchors from headings.
func TestDocsLinks(t *testing.T) {
	anchors := map[string]map[string]bool{} // Markdown file -> its anchors
	anchorsOf := func(file string) map[string]bool {
		if a, ok := anchors[file]; ok {
			return a
		}
		raw, err := os.ReadFile(file) //nolint:gosec // a page of this repository that a doc links to
		if err != nil {
			t.Fatal(err)
		}
		a := map[string]bool{}
		for _, h := range headings(string(raw)) {
			slug := githubSlug(h)
			for n := 1; a[slug]; n++ {
				slug = fmt.Sprintf("%s-%d", githubSlug(h), n)
			}
			a[slug] = true
		}
		anchors[file] = a
		return a
	}
	link := regexp.MustCompile(`\]\(([^)\s]+)\)`)
	for _, file := range docFiles(t) {
		raw, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		for n, line := range proseLines(string(raw)) {
			for _, m := range link.FindAllStringSubmatch(line, -1) {
				target := m[1]
				if strings.Contains(target, "://") || strings.HasPrefix(target, "mailto:") {
					continue
				}
				where, anchor, _ := strings.Cut(target, "#")
				resolved := file
				if where != "" {
					resolved = path.Join(path.Dir(file), where)
					if _, err := os.Stat(resolved); err != nil { //nolint:gosec // a path in this repository, from its own docs
						t.Errorf("%s:%d: link %q: no file %s", file, n+1, target, resolved)
						continue
					}
				}
				if anchor != "" && strings.HasSuffix(resolved, ".md") && !anchorsOf(resolved)[anchor] {
					t.Errorf("%s:%d: link %q: %s has no heading with anchor #%s", file, n+1, target, resolved, anchor)
				}
			}
		}
	}
}

// proseLines returns doc's lines with those of code blocks and inline
// code spans blanked, so that line numbers hold.
func proseLines(doc string) []string {
	lines := strings.Split(doc, "\n")
	inCode := false
	code := regexp.MustCompile("`[^`]*`")
	for i, l := range lines {
		switch {
		case strings.HasPrefix(l, "```"):
			inCode = !inCode
			lines[i] = ""
		case inCode:
			lines[i] = ""
		default:
			lines[i] = code.ReplaceAllString(l, "")
		}
	}
	return lines
}

// headings returns the text of doc's headings, outside code blocks.
func headings(doc string) []string {
	var out []string
	inCode := false
	for l := range strings.SplitSeq(doc, "\n") {
		if strings.HasPrefix(l, "```") {
			inCode = !inCode
			continue
		}
		if inCode || !strings.HasPrefix(l, "#") {
			continue
		}
		if text, ok := strings.CutPrefix(strings.TrimLeft(l, "#"), " "); ok {
			out = append(out, text)
		}
	}
	return out
}

// githubSlug is the anchor GitHub gives a heading: lower case, spaces to
// hyphens, and every character other than a letter, a digit, a hyphen or
// an underscore left out.
func githubSlug(heading string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(heading) {
		switch {
		case r == ' ':
			b.WriteRune('-')
		case r == '-' || r == '_' || unicode.IsLetter(r) || unicode.IsDigit(r):
			b.WriteRune(r)
		}
	}
	return b.String()
}

// TestGithubSlug pins the anchors of headings the docs link to.
func TestGithubSlug(t *testing.T) {
	for _, tc := range []struct{ heading, want string }{
		{"Example", "example"},
		{"`GET /godist/fingerprint`", "get-godistfingerprint"},
		{"The endpoint: `POST /godist/upstreams/state`", "the-endpoint-post-godistupstreamsstate"},
		{"`on_down`", "on_down"},
		{"Using the hash in caddy-l4's proxy (lb_policy godist)", "using-the-hash-in-caddy-l4s-proxy-lb_policy-godist"},
		{"The skewed load (issue 12)", "the-skewed-load-issue-12"},
	} {
		if got := githubSlug(tc.heading); got != tc.want {
			t.Errorf("githubSlug(%q) = %q, want %q", tc.heading, got, tc.want)
		}
	}
}

// TestMetricsDocs keeps the metrics table complete: every metric the
// module exports is in docs/metrics-and-logs.md's.
func TestMetricsDocs(t *testing.T) {
	source, err := os.ReadFile("metrics.go")
	if err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile("docs/metrics-and-logs.md")
	if err != nil {
		t.Fatal(err)
	}
	table := section(t, string(raw), "## Metrics")
	names := regexp.MustCompile(`metricsNamespace\+"(_[a-z_]+)"`).FindAllStringSubmatch(string(source), -1)
	if len(names) < 10 {
		t.Fatalf("found %d metrics in metrics.go; the pattern no longer matches", len(names))
	}
	for _, m := range names {
		if name := "caddy_layer4_godist" + m[1]; !strings.Contains(table, "| `"+name+"` |") {
			t.Errorf("docs/metrics-and-logs.md's table does not list %s", name)
		}
	}
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
