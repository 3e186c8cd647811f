// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// The status page's tests run Caddy in the test process with a godist
// layer4 server and an HTTP site that mounts the page twice, as a
// Caddyfile user would: under handle_path /godist/* and under
// route /status*. They check its routes, that its JSON is the admin API's,
// its limits, and that nothing an upstream is called can become markup.
// The page in a real browser is tested by browsertest/.

// statusCaddyfile is the site the tests run: admin on admin (off if
// empty), godist on l4 over dials, the page on site.
func statusCaddyfile(admin, l4, site string, dials []string) string {
	quoted := make([]string, len(dials))
	for i, d := range dials {
		quoted[i] = strconv.Quote(d)
	}
	if admin == "" {
		admin = "off"
	}
	return fmt.Sprintf(`{
	admin %s
	persist_config off
	log {
		output discard
	}
	layer4 {
		%s {
			route {
				godist %s
			}
		}
	}
}

http://%s {
	bind 127.0.0.1
	handle_path /godist/* {
		godist_status
	}
	route /status* {
		godist_status
	}
}
`, admin, l4, strings.Join(quoted, " "), site)
}

// startStatusCaddy loads statusCaddyfile into Caddy in this process and
// returns Caddy, with its listen address the layer4 server's, and the
// site's URL.
func startStatusCaddy(t *testing.T, dials ...string) (*testCaddy, string) {
	t.Helper()
	return startStatusCaddyAdmin(t, freeAddr(t), dials...)
}

// startStatusCaddyAdmin is startStatusCaddy with the admin endpoint on
// admin, or off if it is empty.
func startStatusCaddyAdmin(t *testing.T, admin string, dials ...string) (*testCaddy, string) {
	t.Helper()
	l4, site := freeAddr(t), freeAddr(t)
	cfg, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(statusCaddyfile(admin, l4, site, dials)), nil)
	if err != nil {
		t.Fatalf("adapting the status page's Caddyfile: %v", err)
	}
	if len(warnings) > 0 {
		t.Fatalf("adapting the status page's Caddyfile: %v", warnings)
	}
	if err := caddy.Load(cfg, true); err != nil {
		t.Fatalf("loading config into Caddy: %v", err)
	}
	t.Cleanup(func() { stopCaddy(t) })
	return &testCaddy{t: t, admin: admin, listen: l4}, "http://" + site
}

// siteAnswer is a whole answer of the site.
type siteAnswer struct {
	status int
	header http.Header
	body   []byte
}

// siteCall sends one request to the site, following no redirect.
func siteCall(t *testing.T, method, url string, header http.Header, body []byte) siteAnswer {
	t.Helper()
	req, err := http.NewRequest(method, url, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	maps.Copy(req.Header, header)
	client := &http.Client{
		Timeout:       testTimeout,
		Transport:     &http.Transport{DisableKeepAlives: true},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading the answer: %v", method, url, err)
	}
	return siteAnswer{status: resp.StatusCode, header: resp.Header, body: b}
}

func TestStatusPageRoutes(t *testing.T) {
	_, addrs := startBackends(t, 2, whoami)
	_, site := startStatusCaddy(t, addrs...)
	page := statusAssets["index.html"]

	tests := []struct {
		name     string
		method   string
		path     string
		header   http.Header
		status   int
		want     map[string]string // headers the answer must have
		bodyHas  string
		bodyIs   []byte
		noHeader string // a header the answer must not have
	}{
		{name: "page under handle_path", path: "/godist/", status: 200, bodyIs: page.body, want: map[string]string{
			"Content-Type": "text/html; charset=utf-8", "Content-Security-Policy": statusPageCSP,
			"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache", "ETag": page.etag,
		}},
		{name: "page under route", path: "/status/", status: 200, bodyIs: page.body},
		{name: "HEAD of the page", method: http.MethodHead, path: "/godist/", status: 200, want: map[string]string{"Content-Length": strconv.Itoa(len(page.body))}},
		{name: "script", path: "/godist/status.js", status: 200, bodyIs: statusAssets["status.js"].body,
			want: map[string]string{"Content-Type": "text/javascript; charset=utf-8"}, noHeader: "Content-Security-Policy"},
		{name: "style under route", path: "/status/status.css", status: 200, bodyIs: statusAssets["status.css"].body,
			want: map[string]string{"Content-Type": "text/css; charset=utf-8"}},
		{name: "icon", path: "/godist/favicon.svg", status: 200, want: map[string]string{"Content-Type": "image/svg+xml"}},
		{name: "unchanged script revalidated", path: "/godist/status.js", header: http.Header{"If-None-Match": {statusAssets["status.js"].etag}}, status: 304},
		{name: "mount point without its slash", path: "/status", status: 308, want: map[string]string{"Location": "/status/"}},
		{name: "its query kept", path: "/status?x=1", status: 308, want: map[string]string{"Location": "/status/?x=1"}},
		{name: "index.html named", path: "/godist/index.html", status: 308, want: map[string]string{"Location": "/godist/"}},
		{name: "no such file", path: "/godist/secret.txt", status: 404},
		{name: "not a GET", method: http.MethodPost, path: "/godist/", status: 405, want: map[string]string{"Allow": "GET, HEAD"}},
		{name: "JSON under handle_path", path: "/godist/api/upstreams", status: 200, bodyHas: `"hash_key":"ip_port"`,
			want: map[string]string{"Content-Type": "application/json", "Cache-Control": "no-store"}},
		{name: "JSON under route", path: "/status/api/upstreams?handler=0", status: 200, bodyHas: `"handler":0`},
		{name: "no such endpoint", path: "/godist/api/config", status: 404,
			bodyHas: `{"error":"no status page endpoint api/config: there are api/upstreams, api/pick and api/plan"}`},
		{name: "unknown parameter", path: "/godist/api/upstreams?verbose=1", status: 400,
			bodyHas: `unknown query parameter \"verbose\": /godist/api/upstreams takes handler`},
		{name: "no handler of that index", path: "/godist/api/upstreams?handler=7", status: 404,
			bodyHas: `handler 7: no such godist handler: 1 godist handler is running (handler 0)`},
		{name: "write refused", method: http.MethodDelete, path: "/godist/api/upstreams", status: 405, want: map[string]string{"Allow": "GET"}},
		{name: "plan by GET", path: "/godist/api/plan", status: 405, want: map[string]string{"Allow": "POST"}},
		{name: "pick", path: "/godist/api/pick?ip=127.0.0.1&port=5555", status: 200, bodyHas: `"key":"127.0.0.1:5555"`},
		{name: "pick without a port", path: "/godist/api/pick?ip=127.0.0.1", status: 400,
			bodyHas: `handler 0 hashes by ip_port: give port= with ip=`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			method := tt.method
			if method == "" {
				method = http.MethodGet
			}
			a := siteCall(t, method, site+tt.path, tt.header, nil)
			if a.status != tt.status {
				t.Fatalf("%s %s: status %d, want %d: %s", method, tt.path, a.status, tt.status, a.body)
			}
			for k, v := range tt.want {
				if got := a.header.Get(k); got != v {
					t.Errorf("%s: %q, want %q", k, got, v)
				}
			}
			if tt.noHeader != "" && a.header.Get(tt.noHeader) != "" {
				t.Errorf("%s set on %s", tt.noHeader, tt.path)
			}
			if tt.bodyHas != "" && !bytes.Contains(a.body, []byte(tt.bodyHas)) {
				t.Errorf("body lacks %s:\n%s", tt.bodyHas, a.body)
			}
			if tt.bodyIs != nil && !bytes.Equal(a.body, tt.bodyIs) {
				t.Errorf("body is not the embedded file: %d bytes, want %d", len(a.body), len(tt.bodyIs))
			}
		})
	}
}

// TestStatusPageJSONIsTheAdminAPIs checks that the page's JSON routes
// answer exactly what the admin API does, after real traffic.
func TestStatusPageJSONIsTheAdminAPIs(t *testing.T) {
	_, addrs := startBackends(t, 3, whoami)
	c, site := startStatusCaddy(t, addrs...)
	for range 6 {
		conn := c.dial(t)
		if _, err := askName(conn); err != nil {
			t.Fatalf("through godist: %v", err)
		}
		conn.Close()
	}
	// the connections' counts settle as each one ends
	eventually(t, testTimeout, "six connections counted", func() error {
		var hs []handlerStatus
		if err := json.Unmarshal(siteCall(t, http.MethodGet, site+"/godist/api/upstreams", nil, nil).body, &hs); err != nil {
			return err
		}
		var n uint64
		for _, u := range hs[0].Upstreams {
			n += u.Totals.Connections
			if u.ActiveConnections != 0 {
				return fmt.Errorf("%s: %d active", u.Dial, u.ActiveConnections)
			}
		}
		if n != 6 {
			return fmt.Errorf("%d connections counted", n)
		}
		return nil
	})

	proposal := fmt.Sprintf(`{"upstreams": [{"dial": %q}, {"dial": %q, "weight": 3}, {"dial": "127.0.0.1:9"}]}`, addrs[0], addrs[1])
	json := http.Header{"Content-Type": {"application/json"}}
	tests := []struct {
		name, method, page, admin, body string
	}{
		{"upstreams", http.MethodGet, "/godist/api/upstreams", "/godist/upstreams", ""},
		{"upstreams of one handler", http.MethodGet, "/status/api/upstreams?handler=0", "/godist/upstreams?handler=0", ""},
		{"pick by address", http.MethodGet, "/godist/api/pick?ip=192.0.2.7&port=4242", "/godist/pick?ip=192.0.2.7&port=4242", ""},
		{"pick by key", http.MethodGet, "/godist/api/pick?key=tenant-42", "/godist/pick?key=tenant-42", ""},
		{"plan", http.MethodPost, "/godist/api/plan", "/godist/plan", proposal},
		{"a plan's error", http.MethodPost, "/godist/api/plan", "/godist/plan", `{"upstreams": [{"dial": "127.0.0.1:9", "weight": -2}]}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fromPage := siteCall(t, tt.method, site+tt.page, json, []byte(tt.body))
			fromAdmin := c.adminCall(t, tt.method, tt.admin, []byte(tt.body))
			if fromPage.status != fromAdmin.status || !bytes.Equal(fromPage.body, fromAdmin.body) {
				t.Fatalf("the page answers %d %s\nthe admin API %d %s", fromPage.status, fromPage.body, fromAdmin.status, fromAdmin.body)
			}
		})
	}
}

// TestStatusPageWithoutAdmin checks that the page's JSON needs no admin
// endpoint: it is served by the handler.
func TestStatusPageWithoutAdmin(t *testing.T) {
	_, addrs := startBackends(t, 2, whoami)
	_, site := startStatusCaddyAdmin(t, "", addrs...)
	a := siteCall(t, http.MethodGet, site+"/godist/api/upstreams", nil, nil)
	var hs []handlerStatus
	if err := json.Unmarshal(a.body, &hs); a.status != http.StatusOK || err != nil {
		t.Fatalf("%d %s: %v", a.status, a.body, err)
	}
	if len(hs) != 1 || len(hs[0].Upstreams) != 2 || hs[0].Upstreams[0].Dial != addrs[0] || hs[0].Upstreams[1].Dial != addrs[1] {
		t.Fatalf("api/upstreams with the admin endpoint off: %s", a.body)
	}
	a = siteCall(t, http.MethodPost, site+"/godist/api/plan", http.Header{"Content-Type": {"application/json"}}, []byte(fmt.Sprintf(`{"upstreams": [{"dial": %q}]}`, addrs[0])))
	if a.status != http.StatusOK || !bytes.Contains(a.body, fmt.Appendf(nil, `{"dial":%q,"change":"removed"`, addrs[1])) {
		t.Fatalf("api/plan with the admin endpoint off: %d %s", a.status, a.body)
	}
}

// TestStatusPagePlanBounds checks that a plan asked of the page is bounded
// as the admin API's is, by the same limits and the same slot.
func TestStatusPagePlanBounds(t *testing.T) {
	_, addrs := startBackends(t, 2, whoami)
	c, site := startStatusCaddy(t, addrs...)
	jsonType := http.Header{"Content-Type": {"application/json; charset=utf-8"}}
	small := []byte(fmt.Sprintf(`{"upstreams": [{"dial": %q}]}`, addrs[0]))

	t.Run("a body that is not declared JSON", func(t *testing.T) {
		for _, ct := range []string{"", "text/plain", "application/x-www-form-urlencoded"} {
			a := siteCall(t, http.MethodPost, site+"/godist/api/plan", http.Header{"Content-Type": {ct}}, small)
			if a.status != http.StatusUnsupportedMediaType || !bytes.Contains(a.body, []byte("Content-Type must be application/json")) {
				t.Errorf("Content-Type %q: %d %s", ct, a.status, a.body)
			}
		}
	})
	t.Run("a body over the limit", func(t *testing.T) {
		big := append([]byte(`{"upstreams": [`), bytes.Repeat([]byte(`{"dial": "127.0.0.1:9"},`), maxPlanBody/20)...)
		a := siteCall(t, http.MethodPost, site+"/godist/api/plan", jsonType, big)
		if a.status != http.StatusRequestEntityTooLarge || !bytes.Contains(a.body, []byte("larger than 1048576 bytes")) {
			t.Errorf("%d %s", a.status, a.body)
		}
	})
	t.Run("a bad proposal names its field", func(t *testing.T) {
		a := siteCall(t, http.MethodPost, site+"/godist/api/plan", jsonType, []byte(`{"upstreams": [{"dial": "127.0.0.1:9", "weight": -2}]}`))
		if a.status != http.StatusBadRequest || !bytes.Contains(a.body, []byte("upstream 0 (127.0.0.1:9): weight -2: must be at least 1")) {
			t.Errorf("%d %s", a.status, a.body)
		}
	})
	t.Run("one plan at a time, with the admin API's", func(t *testing.T) {
		planSlots <- struct{}{} // a plan being worked out, as far as both know
		fromPage := siteCall(t, http.MethodPost, site+"/godist/api/plan", jsonType, small)
		fromAdmin := c.adminCall(t, http.MethodPost, "/godist/plan", small)
		<-planSlots
		for who, a := range map[string]siteAnswer{"page": fromPage, "admin": {fromAdmin.status, fromAdmin.header, fromAdmin.body}} {
			if a.status != http.StatusTooManyRequests || a.header.Get("Retry-After") != "1" {
				t.Errorf("%s: %d, Retry-After %q: %s", who, a.status, a.header.Get("Retry-After"), a.body)
			}
		}
		if a := siteCall(t, http.MethodPost, site+"/godist/api/plan", jsonType, small); a.status != http.StatusOK {
			t.Errorf("once the slot is free: %d %s", a.status, a.body)
		}
		if n := len(planSlots); n != 0 {
			t.Errorf("%d plan slots held after the plans answered", n)
		}
	})
}

// TestStatusPageEscapes checks that no upstream address or key becomes
// markup: the page is static, its JSON escapes <, > and &, and its script
// puts data in the DOM only as text.
func TestStatusPageEscapes(t *testing.T) {
	hostile := []string{`<img src=x onerror=window.__pwned=1>:80`, `"><svg onload=window.__pwned=2>:80`}
	_, site := startStatusCaddy(t, hostile...)

	page := siteCall(t, http.MethodGet, site+"/godist/", nil, nil)
	for _, h := range hostile {
		if bytes.Contains(page.body, []byte(h)) {
			t.Errorf("the page holds the upstream address %s", h)
		}
	}
	for _, path := range []string{"/godist/api/upstreams", "/godist/api/pick?key=%3Cscript%3Ealert(1)%3C%2Fscript%3E"} {
		a := siteCall(t, http.MethodGet, site+path, nil, nil)
		if a.status != http.StatusOK {
			t.Fatalf("%s: %d %s", path, a.status, a.body)
		}
		if bytes.ContainsAny(a.body, "<>") {
			t.Errorf("%s: < or > unescaped in the JSON: %s", path, a.body)
		}
		if !bytes.Contains(a.body, []byte(`\u003cimg src=x onerror=window.__pwned=1\u003e:80`)) {
			t.Errorf("%s: the address is not in the JSON as escaped text: %s", path, a.body)
		}
		if got := a.header.Get("X-Content-Type-Options"); got != "nosniff" {
			t.Errorf("%s: X-Content-Type-Options %q", path, got)
		}
	}

	// The page's own files: no inline script or style for the CSP to
	// refuse, and no way from data to markup in the script.
	html := string(statusAssets["index.html"].body)
	for _, m := range regexp.MustCompile(`<script[^>]*>`).FindAllString(html, -1) {
		if !strings.Contains(m, ` src="`) {
			t.Errorf("inline script in the page: %s", m)
		}
	}
	if regexp.MustCompile(`<style|\sstyle=|\son[a-z]+=|javascript:`).MatchString(html) {
		t.Error("the page has an inline style or event handler")
	}
	js := string(statusAssets["status.js"].body)
	if m := regexp.MustCompile(`innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function|setAttribute\('(on|style|href)`).FindString(js); m != "" {
		t.Errorf("the script uses %s", m)
	}
	for name := range statusAssets {
		if b := statusAssets[name].body; regexp.MustCompile(`(?i)(src|href)="?(https?:)?//|url\((https?:)?//|@import`).Match(b) {
			t.Errorf("%s loads something from elsewhere", name)
		}
	}
}

func TestStatusCaddyfile(t *testing.T) {
	tests := []struct {
		name, input, wantErr string
	}{
		{name: "plain", input: "godist_status"},
		{name: "an argument", input: "godist_status /status", wantErr: "wrong argument count or unexpected line ending after '/status', at Testfile:1"},
		{name: "an option", input: "godist_status {\n\trefresh 5s\n}", wantErr: "unrecognized subdirective 'refresh', at Testfile:2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := new(StatusPage).UnmarshalCaddyfile(caddyfile.NewTestDispenser(tt.input))
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("unexpected error: %v", err)
			case tt.wantErr != "" && (err == nil || err.Error() != tt.wantErr):
				t.Fatalf("error %v, want %q", err, tt.wantErr)
			}
		})
	}
}
