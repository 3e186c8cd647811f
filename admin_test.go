// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// The admin API tests run Caddy in the test process with its admin
// listener on a free loopback port (and once on the default address), send
// real traffic through godist, and check every answer against the Picker
// and against where the traffic went.

// adminAnswer is a whole answer of the admin endpoint.
type adminAnswer struct {
	status int
	header http.Header
	body   []byte
}

// adminCall sends one request to the admin endpoint.
func (c *testCaddy) adminCall(t *testing.T, method, path string, body []byte) adminAnswer {
	t.Helper()
	req, err := http.NewRequest(method, "http://"+c.admin+path, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	client := &http.Client{Timeout: testTimeout, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading the answer: %v", method, path, err)
	}
	return adminAnswer{status: resp.StatusCode, header: resp.Header, body: b}
}

// adminJSON sends a request, wants a 200 with a JSON body, and decodes it
// into out. A non-nil in is sent as the JSON body.
func (c *testCaddy) adminJSON(t *testing.T, method, path string, in, out any) {
	t.Helper()
	var body []byte
	if in != nil {
		var err error
		if body, err = json.Marshal(in); err != nil {
			t.Fatal(err)
		}
	}
	a := c.adminCall(t, method, path, body)
	if a.status != http.StatusOK {
		t.Fatalf("%s %s: %d %s", method, path, a.status, a.body)
	}
	if ct := a.header.Get("Content-Type"); ct != "application/json" {
		t.Fatalf("%s %s: Content-Type %q", method, path, ct)
	}
	dec := json.NewDecoder(bytes.NewReader(a.body))
	dec.DisallowUnknownFields() // the test's types must know every field
	if err := dec.Decode(out); err != nil {
		t.Fatalf("%s %s: decoding %s: %v", method, path, a.body, err)
	}
}

func (c *testCaddy) upstreams(t *testing.T, query string) []handlerStatus {
	t.Helper()
	var out []handlerStatus
	c.adminJSON(t, http.MethodGet, "/godist/upstreams"+query, nil, &out)
	return out
}

func (c *testCaddy) pick(t *testing.T, query string) []pickStatus {
	t.Helper()
	var out []pickStatus
	c.adminJSON(t, http.MethodGet, "/godist/pick?"+query, nil, &out)
	return out
}

func (c *testCaddy) fingerprints(t *testing.T, query string) []fingerprintStatus {
	t.Helper()
	var out []fingerprintStatus
	c.adminJSON(t, http.MethodGet, "/godist/fingerprint"+query, nil, &out)
	return out
}

// startCaddyServers loads a config with one layer4 server per handler,
// each listening on its own free loopback port, with the admin endpoint
// on admin (Caddy's default when empty). It returns Caddy, with its
// listen address the first server's (if any), and every server's address
// in the handlers' order.
func startCaddyServers(t *testing.T, admin string, handlers ...map[string]any) (*testCaddy, []string) {
	t.Helper()
	servers := map[string]any{}
	listens := make([]string, len(handlers))
	for i, h := range handlers {
		listens[i] = freeAddr(t)
		servers[fmt.Sprintf("s%d", i)] = map[string]any{"listen": []string{listens[i]}, "routes": []any{godistRoute(h)}}
	}
	adminCfg := map[string]any{"config": map[string]any{"persist": false}}
	if admin != "" {
		adminCfg["listen"] = admin
	}
	cfg, err := json.Marshal(map[string]any{
		"admin": adminCfg,
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{
			"writer": testLogWriter(), "level": "DEBUG",
		}}},
		"apps": map[string]any{"layer4": map[string]any{"servers": servers}},
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := caddy.Load(cfg, true); err != nil {
		t.Fatalf("loading config into Caddy: %v", err)
	}
	t.Cleanup(func() { stopCaddy(t) })
	if admin == "" {
		admin = caddy.DefaultAdminListen
	}
	c := &testCaddy{t: t, admin: admin}
	if len(listens) > 0 {
		c.listen = listens[0]
	}
	return c, listens
}

// dialTo connects to one of Caddy's listeners.
func dialTo(t *testing.T, addr string) *net.TCPConn {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, testTimeout)
	if err != nil {
		t.Fatalf("dialling %s: %v", addr, err)
	}
	_ = conn.SetDeadline(time.Now().Add(testTimeout))
	return conn.(*net.TCPConn)
}

// handlerIndexOf finds the index the admin API gives the handler with the
// fingerprint fp: servers are provisioned in no fixed order.
func (c *testCaddy) handlerIndexOf(t *testing.T, fp string) int {
	t.Helper()
	for _, f := range c.fingerprints(t, "") {
		if f.Fingerprint == fp {
			return f.Handler
		}
	}
	t.Fatalf("no handler with fingerprint %s", fp)
	return -1
}

// handlerPicker returns the picker a handler over ups builds, and its
// upstreams' dial addresses.
func handlerPicker(ups []map[string]any) (*Picker, []string) {
	pus := make([]PickerUpstream, len(ups))
	dials := make([]string, len(ups))
	for i, u := range ups {
		w, _ := u["weight"].(int)
		pus[i] = PickerUpstream{Dial: u["dial"].(string), Weight: w}
		dials[i] = pus[i].Dial
	}
	return NewPicker(pus), dials
}

// upstreamList turns test upstreams into the handler's type.
func upstreamList(ups []map[string]any) []*Upstream {
	out := make([]*Upstream, len(ups))
	for i, u := range ups {
		w, _ := u["weight"].(int)
		out[i] = &Upstream{Dial: u["dial"].(string), Weight: max(w, 1)}
	}
	return out
}

// checkOrder checks a pick answer's order against the picker's, and that
// its upstream is the first usable one in that order.
func checkOrder(t *testing.T, got pickStatus, picker *Picker, dials []string) {
	t.Helper()
	want := picker.Order(got.Key, nil)
	if len(got.Order) != len(want) {
		t.Fatalf("key %q: order of %d upstreams, want %d", got.Key, len(got.Order), len(want))
	}
	firstUsable := -1
	for r, i := range want {
		o := got.Order[r]
		if o.Dial != dials[i] || o.Rank != r+1 {
			t.Fatalf("key %q: order[%d] = %s rank %d, the picker says %s rank %d", got.Key, r, o.Dial, o.Rank, dials[i], r+1)
		}
		if o.Usable != (o.WhyNot == "") {
			t.Errorf("key %q: %s usable %v, why_not %q", got.Key, o.Dial, o.Usable, o.WhyNot)
		}
		if o.Usable && firstUsable < 0 {
			firstUsable = r
		}
	}
	if firstUsable >= 0 {
		if got.Upstream == nil || *got.Upstream != got.Order[firstUsable].Dial || got.Rank != firstUsable+1 || got.Fallback {
			t.Fatalf("key %q: picked %v rank %d (fallback %v), want the first usable, %s rank %d",
				got.Key, deref(got.Upstream), got.Rank, got.Fallback, got.Order[firstUsable].Dial, firstUsable+1)
		}
	}
}

func deref(s *string) string {
	if s == nil {
		return "<null>"
	}
	return *s
}

// keyPreferring returns a key whose first choice is upstream i.
func keyPreferring(t *testing.T, picker *Picker, i int) string {
	t.Helper()
	for n := range 1000 {
		if key := fmt.Sprintf("key-%d", n); picker.Pick(key, nil) == i {
			return key
		}
	}
	t.Fatalf("no key among 1000 prefers upstream %d", i)
	return ""
}

// TestAdminUpstreamsAndPick sends traffic, fills one upstream to its
// max_connections and stops another until failed dials take it down, and
// checks that /godist/upstreams counts what was sent and shows both, and
// that /godist/pick skips both, as the handler did.
func TestAdminUpstreamsAndPick(t *testing.T) {
	backends, addrs := startBackends(t, 3, whoami)
	ups := upstreamsJSON(addrs...)
	ups[0]["max_connections"] = 1
	c := startCaddy(t, map[string]any{
		"upstreams":     ups,
		"health_checks": map[string]any{"passive": map[string]any{"fail_duration": "1m"}},
	})
	picker, dials := handlerPicker(ups)
	landed := make([]int, 3) // connections each backend answered

	// send asks one connection's backend its name and returns the key and
	// the backend's index.
	send := func(conn net.Conn) (key string, on int) {
		t.Helper()
		name, err := askName(conn)
		if err != nil {
			t.Fatalf("asking the backend's name: %v", err)
		}
		on = slices.IndexFunc(backends, func(b *backend) bool { return b.name == name })
		landed[on]++
		return addrKey(conn.LocalAddr(), true), on
	}

	// Fill upstream 0: hold a connection whose key prefers it.
	var held net.Conn
	for range 100 {
		conn := c.dial(t)
		key, on := send(conn)
		if want := picker.Pick(key, nil); on != want {
			t.Fatalf("key %q landed on b%d, the picker says b%d", key, on, want)
		}
		if on == 0 {
			held = conn
			break
		}
		conn.Close()
	}
	if held == nil {
		t.Fatal("no key among 100 preferred upstream 0")
	}
	defer held.Close()

	// Stop upstream 2 and send connections until one had to dial it.
	backends[2].stop()
	tried := false
	for n := 0; !tried; n++ {
		if n == 100 {
			t.Fatal("no key among 100 preferred upstream 2 to upstream 1")
		}
		conn := c.dial(t)
		key, on := send(conn)
		conn.Close()
		// 0 is full and 2 refuses: everything lands on 1
		if on != 1 {
			t.Fatalf("key %q landed on b%d with b0 full and b2 stopped", key, on)
		}
		order := picker.Order(key, nil)
		tried = slices.Index(order, 2) < slices.Index(order, 1)
	}

	t.Run("upstreams", func(t *testing.T) {
		var hs []handlerStatus
		eventually(t, 5*time.Second, "closed connections counted", func() error {
			hs = c.upstreams(t, "")
			if len(hs) != 1 {
				return fmt.Errorf("%d handlers, want 1", len(hs))
			}
			if hs[0].Connections != 1 {
				return fmt.Errorf("%d connections flowing, want the one held", hs[0].Connections)
			}
			for i, u := range hs[0].Upstreams[1:] {
				n := uint64(landed[i+1])
				// "who?\n" one way, "bN\n" the other
				if u.Totals.SentBytes != 5*n || u.Totals.ReceivedBytes != 3*n {
					return fmt.Errorf("%s: %d bytes sent and %d received, want %d and %d",
						u.Dial, u.Totals.SentBytes, u.Totals.ReceivedBytes, 5*n, 3*n)
				}
			}
			return nil
		})
		h := hs[0]
		if h.Handler != 0 || h.Fingerprint != fingerprint("", upstreamList(ups)) || h.HashKey != HashKeyIPPort {
			t.Errorf("handler %d, fingerprint %s, hash_key %s", h.Handler, h.Fingerprint, h.HashKey)
		}
		if h.FailDuration != "1m0s" || h.MaxFails != 1 || h.ActiveChecks {
			t.Errorf("fail_duration %s, max_fails %d, active checks %v", h.FailDuration, h.MaxFails, h.ActiveChecks)
		}
		for i, u := range h.Upstreams {
			if u.Dial != dials[i] || u.Weight != 1 {
				t.Errorf("upstream %d: %s weight %d, want %s weight 1", i, u.Dial, u.Weight, dials[i])
			}
			if u.Totals.Connections != uint64(landed[i]) {
				t.Errorf("%s: %d connections counted, %d landed there", u.Dial, u.Totals.Connections, landed[i])
			}
		}

		full := h.Upstreams[0]
		if full.Health.Status != "up" || full.ActiveConnections != 1 || !full.Full || full.MaxConnections != 1 {
			t.Errorf("the full upstream: %+v", full)
		}

		down := h.Upstreams[2]
		now := time.Now()
		switch {
		case down.Health.Status != "down" || !slices.Equal(down.Health.DownBy, []string{downByPassive}):
			t.Errorf("the stopped upstream: health %+v, want down by failed dials", down.Health)
		case down.Health.RecentFailures < 1 || uint64(down.Health.RecentFailures) != down.Totals.DialFailures:
			t.Errorf("the stopped upstream: %d recent failures, %d dial failures", down.Health.RecentFailures, down.Totals.DialFailures)
		case down.Totals.Failovers < 1:
			t.Errorf("the stopped upstream: no failover counted")
		case down.Health.Since == nil || down.Health.LastFailedDial == nil || down.Health.DownUntil == nil:
			t.Errorf("the stopped upstream: since, last failed dial or down until missing: %+v", down.Health)
		case down.Health.Since.After(now) || now.Sub(*down.Health.Since) > testTimeout:
			t.Errorf("the stopped upstream: down since %s, now %s", down.Health.Since, now)
		case down.Health.DownUntil.Sub(*down.Health.LastFailedDial) != time.Minute:
			t.Errorf("the stopped upstream: down until %s, last failed dial %s: want a minute apart", down.Health.DownUntil, down.Health.LastFailedDial)
		}
		if up := h.Upstreams[1]; up.Health.Status != "up" || up.Health.DownBy != nil || up.Full {
			t.Errorf("the live upstream: %+v", up)
		}
	})

	t.Run("pick", func(t *testing.T) {
		// a real connection: where it lands is what pick says
		conn := c.dial(t)
		defer conn.Close()
		_, on := send(conn)
		port := conn.LocalAddr().(*net.TCPAddr).Port
		got := c.pick(t, fmt.Sprintf("ip=127.0.0.1&port=%d", port))
		if len(got) != 1 || got[0].Key != fmt.Sprintf("127.0.0.1:%d", port) || deref(got[0].Upstream) != dials[on] {
			t.Fatalf("pick for the client at port %d: %+v; it landed on %s", port, got, dials[on])
		}
		checkOrder(t, got[0], picker, dials)

		tests := []struct {
			name      string
			prefers   int
			wantRank  int
			wantWhyNo map[int]string
		}{
			{"first choice usable", 1, 1, map[int]string{0: "at max_connections (1)", 2: "down by failed dials"}},
			{"first choice full", 0, 0, map[int]string{0: "at max_connections (1)", 2: "down by failed dials"}},
			{"first choice down", 2, 0, map[int]string{0: "at max_connections (1)", 2: "down by failed dials"}},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				key := keyPreferring(t, picker, tt.prefers)
				got := c.pick(t, "key="+url.QueryEscape(key))
				if len(got) != 1 {
					t.Fatalf("%d answers, want 1", len(got))
				}
				p := got[0]
				checkOrder(t, p, picker, dials)
				if deref(p.Upstream) != dials[1] {
					t.Errorf("key %q: picked %s, want %s, the only usable upstream", key, deref(p.Upstream), dials[1])
				}
				if tt.wantRank != 0 && p.Rank != tt.wantRank {
					t.Errorf("key %q: rank %d, want %d", key, p.Rank, tt.wantRank)
				}
				for _, o := range p.Order {
					if want := tt.wantWhyNo[slices.Index(dials, o.Dial)]; o.WhyNot != want {
						t.Errorf("key %q: %s why_not %q, want %q", key, o.Dial, o.WhyNot, want)
					}
				}
			})
		}
	})

	// the held connection still flows: nothing above changed anything
	if name, err := askName(held); err != nil || name != "b0" {
		t.Fatalf("the held connection: %q, %v", name, err)
	}
}

// TestAdminPickFallback takes every upstream down and checks that pick
// then answers what the handler does: the key's first choice with room,
// health ignored.
func TestAdminPickFallback(t *testing.T) {
	ups := upstreamsJSON(freeAddr(t), freeAddr(t))
	c := startCaddy(t, map[string]any{"upstreams": ups})
	picker, dials := handlerPicker(ups)
	conn := c.dial(t)
	if _, err := askName(conn); err == nil {
		t.Fatal("a connection with every upstream refusing was answered")
	}
	conn.Close()
	eventually(t, 5*time.Second, "both upstreams down", func() error {
		for _, u := range c.upstreams(t, "")[0].Upstreams {
			if u.Health.Status != "down" {
				return fmt.Errorf("%s is %s", u.Dial, u.Health.Status)
			}
		}
		return nil
	})
	p := c.pick(t, "key=k")[0]
	checkOrder(t, p, picker, dials)
	if !p.Fallback || p.Rank != 1 || deref(p.Upstream) != dials[picker.Pick("k", nil)] {
		t.Fatalf("with every upstream down: %+v, want the first choice as a fallback", p)
	}
}

// TestAdminHandlers runs three godist handlers in one config, one per
// layer4 server, each with its own hash key, and checks that every
// endpoint tells them apart, that handler= selects one, and that pick makes
// each handler's key as the handler does.
func TestAdminHandlers(t *testing.T) {
	_, addrs := startBackends(t, 5, whoami)
	upsIPPort, upsIP, upsSNI := upstreamsJSON(addrs[0], addrs[1]), upstreamsJSON(addrs[2], addrs[3]), upstreamsJSON(addrs[4], addrs[0])
	upsIP[1]["weight"] = 3
	const sni = "{l4.tls.server_name}"
	c, listens := startCaddyServers(t, freeAddr(t),
		map[string]any{"upstreams": upsIPPort},
		map[string]any{"upstreams": upsIP, "hash_key": "ip"},
		map[string]any{"upstreams": upsSNI, "hash_key": sni},
	)
	type handler struct {
		ups     []map[string]any
		hashKey string
		listen  string
		index   int
		picker  *Picker
		dials   []string
	}
	hs := []*handler{
		{ups: upsIPPort, hashKey: HashKeyIPPort, listen: listens[0]},
		{ups: upsIP, hashKey: HashKeyIP, listen: listens[1]},
		{ups: upsSNI, hashKey: sni, listen: listens[2]},
	}
	seen := map[int]bool{}
	for _, h := range hs {
		h.index = c.handlerIndexOf(t, fingerprint(h.hashKey, upstreamList(h.ups)))
		h.picker, h.dials = handlerPicker(h.ups)
		seen[h.index] = true
	}
	if len(seen) != 3 {
		t.Fatalf("three handlers share indexes: %v", seen)
	}

	t.Run("upstreams", func(t *testing.T) {
		// one connection through each server, held open
		for _, h := range hs {
			conn := dialTo(t, h.listen)
			defer conn.Close()
			if _, err := askName(conn); err != nil {
				t.Fatal(err)
			}
		}
		all := c.upstreams(t, "")
		if len(all) != 3 {
			t.Fatalf("%d handlers, want 3", len(all))
		}
		for _, h := range hs {
			one := c.upstreams(t, "?handler="+strconv.Itoa(h.index))
			if len(one) != 1 || one[0].Handler != h.index || one[0].HashKey != h.hashKey || one[0].Connections != 1 {
				t.Fatalf("handler=%d: %+v", h.index, one)
			}
			for i, u := range one[0].Upstreams {
				if u.Dial != h.dials[i] || u.Weight != upstreamList(h.ups)[i].Weight {
					t.Errorf("handler %d upstream %d: %s weight %d", h.index, i, u.Dial, u.Weight)
				}
			}
			if !jsonEqual(t, one[0], all[h.index]) {
				t.Errorf("handler=%d answers %+v, the full list has %+v", h.index, one[0], all[h.index])
			}
		}
	})

	t.Run("fingerprint", func(t *testing.T) {
		for _, h := range hs {
			f := c.fingerprints(t, "?handler="+strconv.Itoa(h.index))
			if len(f) != 1 {
				t.Fatalf("%d answers, want 1", len(f))
			}
			sum := sha256.Sum256([]byte(f[0].Digested))
			if f[0].Fingerprint != hex.EncodeToString(sum[:])[:16] || f[0].HashVersion != HashVersion || f[0].HashKey != h.hashKey {
				t.Errorf("handler %d: %+v", h.index, f[0])
			}
			if !strings.HasPrefix(f[0].Digested, HashVersion+"\n"+strconv.Quote(h.hashKey)+"\n") {
				t.Errorf("handler %d digests %q", h.index, f[0].Digested)
			}
		}
	})

	t.Run("pick", func(t *testing.T) {
		tests := []struct {
			name    string
			handler int // index into hs; -1 for all
			query   string
			wantKey []string // per handler asked, in hs order
			wantErr string   // with %d for the handler's index
		}{
			{"ip_port from ip and port", 0, "ip=192.0.2.7&port=5000", []string{"192.0.2.7:5000"}, ""},
			{"ip_port from an IPv4-mapped ip", 0, "ip=::ffff:192.0.2.7&port=5000", []string{"192.0.2.7:5000"}, ""},
			{"ip_port from an IPv6 ip", 0, "ip=2001:db8::1&port=443", []string{"[2001:db8::1]:443"}, ""},
			{"ip from ip and port", 1, "ip=192.0.2.7&port=5000", []string{"192.0.2.7"}, ""},
			{"ip from an IPv4-mapped ip", 1, "ip=::ffff:192.0.2.7", []string{"192.0.2.7"}, ""},
			{"placeholder from key", 2, "key=example.com", []string{"example.com"}, ""},
			{"every handler from key", -1, "key=example.com", []string{"example.com", "example.com", "example.com"}, ""},
			{"ip_port without port", 0, "ip=192.0.2.7", nil, "handler %d hashes by ip_port: give port= with ip=, or ask handler= another"},
			{"placeholder from ip and port", 2, "ip=192.0.2.7&port=5000", nil,
				`handler %d hashes by "{l4.tls.server_name}", whose placeholders ip= and port= cannot evaluate: give key= (and handler=%[1]d to ask it alone)`},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				query, asked := tt.query, hs
				if tt.handler >= 0 {
					query += "&handler=" + strconv.Itoa(hs[tt.handler].index)
					asked = hs[tt.handler : tt.handler+1]
				}
				if tt.wantErr != "" {
					a := c.adminCall(t, http.MethodGet, "/godist/pick?"+query, nil)
					want := fmt.Sprintf(tt.wantErr, hs[tt.handler].index)
					if got := apiErrorMessage(t, a); a.status != http.StatusBadRequest || got != want {
						t.Fatalf("%d %q, want 400 %q", a.status, got, want)
					}
					return
				}
				got := c.pick(t, query)
				if len(got) != len(asked) {
					t.Fatalf("%d answers, want %d", len(got), len(asked))
				}
				for _, p := range got {
					i := slices.IndexFunc(asked, func(h *handler) bool { return h.index == p.Handler })
					if i < 0 {
						t.Fatalf("an answer for handler %d, not asked", p.Handler)
					}
					if p.Key != tt.wantKey[i] || p.HashKey != asked[i].hashKey {
						t.Errorf("handler %d: key %q (hash_key %s), want %q", p.Handler, p.Key, p.HashKey, tt.wantKey[i])
					}
					checkOrder(t, p, asked[i].picker, asked[i].dials)
				}
			})
		}
	})

	t.Run("plan needs a handler", func(t *testing.T) {
		a := c.adminCall(t, http.MethodPost, "/godist/plan", []byte(`{"upstreams": [{"dial": "127.0.0.1:1"}]}`))
		want := "handler: required when 3 godist handlers are running (handlers 0 to 2)"
		if got := apiErrorMessage(t, a); a.status != http.StatusBadRequest || got != want {
			t.Fatalf("%d %q, want 400 %q", a.status, got, want)
		}
	})
}

// jsonEqual reports whether two values encode to the same JSON.
func jsonEqual(t *testing.T, a, b any) bool {
	t.Helper()
	ja, err1 := json.Marshal(a)
	jb, err2 := json.Marshal(b)
	if err1 != nil || err2 != nil {
		t.Fatal(err1, err2)
	}
	return bytes.Equal(ja, jb)
}

// apiErrorMessage returns the message of an admin API error answer, and
// checks that it is one: JSON, {"error": "..."}.
func apiErrorMessage(t *testing.T, a adminAnswer) string {
	t.Helper()
	if ct := a.header.Get("Content-Type"); ct != "application/json" {
		t.Errorf("error answer with Content-Type %q: %s", ct, a.body)
	}
	var e struct {
		Error string `json:"error"`
	}
	if err := json.Unmarshal(a.body, &e); err != nil || e.Error == "" {
		t.Errorf("error answer %q: not {\"error\": \"...\"}: %v", a.body, err)
	}
	return e.Error
}

// TestAdminPlan holds connections open through a handler of three
// upstreams, plans changes to it and to a handler of four, and checks each
// plan's moved share against what rendezvous hashing moves, its counts of
// live connections against the connections held, and its fingerprint;
// and that planning changed nothing.
func TestAdminPlan(t *testing.T) {
	backends, addrs := startBackends(t, 3, whoami)
	ups3 := upstreamsJSON(addrs...)
	ups4 := upstreamsJSON(freeAddr(t), freeAddr(t), freeAddr(t), freeAddr(t))
	c, listens := startCaddyServers(t, freeAddr(t), map[string]any{"upstreams": ups3}, map[string]any{"upstreams": ups4})
	index3 := c.handlerIndexOf(t, fingerprint("", upstreamList(ups3)))
	index4 := c.handlerIndexOf(t, fingerprint("", upstreamList(ups4)))
	before := c.fingerprints(t, "")

	// Hold connections through the handler of three, and note where each is.
	type live struct {
		key      string
		upstream string
	}
	var held []live
	for range 24 {
		conn := dialTo(t, listens[0])
		defer conn.Close()
		name, err := askName(conn)
		if err != nil {
			t.Fatal(err)
		}
		on := slices.IndexFunc(backends, func(b *backend) bool { return b.name == name })
		held = append(held, live{key: addrKey(conn.LocalAddr(), true), upstream: addrs[on]})
	}

	// the plan that removes one removes the one holding the most of them
	onUpstream := map[string]int{}
	for _, l := range held {
		onUpstream[l.upstream]++
	}
	removed := slices.MaxFunc(addrs, func(a, b string) int { return onUpstream[a] - onUpstream[b] })
	added := freeAddr(t)
	with := func(ups []map[string]any, edit func([]*Upstream) []*Upstream) []*Upstream {
		return edit(upstreamList(ups))
	}
	tests := []struct {
		name      string
		index     int
		current   []map[string]any
		proposed  []*Upstream
		wantMoved float64
		tolerance float64
		changes   map[string]string // dial -> change, for those not "kept"
	}{
		{"add one to three", index3, ups3,
			with(ups3, func(u []*Upstream) []*Upstream { return append(u, &Upstream{Dial: added, Weight: 1}) }),
			0.25, 0.02, map[string]string{added: "added"}},
		{"remove one of three", index3, ups3,
			with(ups3, func(u []*Upstream) []*Upstream {
				return slices.DeleteFunc(u, func(u *Upstream) bool { return u.Dial == removed })
			}),
			1.0 / 3, 0.02, map[string]string{removed: "removed"}},
		{"remove one of four", index4, ups4,
			with(ups4, func(u []*Upstream) []*Upstream { return u[1:] }),
			0.25, 0.02, map[string]string{ups4[0]["dial"].(string): "removed"}},
		{"double one weight of three", index3, ups3,
			with(ups3, func(u []*Upstream) []*Upstream { u[0].Weight = 2; return u }),
			1.0/2 - 1.0/3, 0.02, map[string]string{addrs[0]: "reweighted"}},
		{"same list in another order", index3, ups3,
			with(ups3, func(u []*Upstream) []*Upstream { slices.Reverse(u); return u }),
			0, 0, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var got planResult
			c.adminJSON(t, http.MethodPost, "/godist/plan", map[string]any{"handler": tt.index, "upstreams": tt.proposed}, &got)
			if got.Handler != tt.index || got.Fingerprint != fingerprint("", upstreamList(tt.current)) {
				t.Errorf("handler %d, fingerprint %s", got.Handler, got.Fingerprint)
			}
			if want := fingerprint("", tt.proposed); got.NewFingerprint != want {
				t.Errorf("new fingerprint %s, want %s", got.NewFingerprint, want)
			}
			ks := got.KeySpace
			if ks.SampledKeys != planSampleKeys || math.Abs(ks.MovedShare-tt.wantMoved) > tt.tolerance ||
				ks.MovedShare != float64(ks.MovedKeys)/planSampleKeys || !strings.Contains(ks.Estimate, "100000") {
				t.Errorf("moved %v of %d keys (%d; %q), want %v ± %v", ks.MovedShare, ks.SampledKeys, ks.MovedKeys, ks.Estimate, tt.wantMoved, tt.tolerance)
			}
			var sumBefore, sumAfter float64
			for _, u := range ks.Upstreams {
				sumBefore += u.Before
				sumAfter += u.After
				want := tt.changes[u.Dial]
				if want == "" {
					want = "kept"
				}
				if u.Change != want {
					t.Errorf("%s: %s, want %s", u.Dial, u.Change, want)
				}
			}
			if math.Abs(sumBefore-1) > 1e-9 || math.Abs(sumAfter-1) > 1e-9 {
				t.Errorf("shares add up to %v before and %v after: %+v", sumBefore, sumAfter, ks.Upstreams)
			}

			var want liveChange
			if tt.index == index3 {
				pus := make([]PickerUpstream, len(tt.proposed))
				for i, u := range tt.proposed {
					pus[i] = PickerUpstream{Dial: u.Dial, Weight: u.Weight}
				}
				after := NewPicker(pus)
				for _, l := range held {
					want.Total++
					if !slices.ContainsFunc(tt.proposed, func(u *Upstream) bool { return u.Dial == l.upstream }) {
						want.OnRemovedUpstreams++
					}
					if tt.proposed[after.Pick(l.key, nil)].Dial != l.upstream {
						want.WouldMove++
					}
				}
				// a few: every key on a kept upstream is scored
				want.KeysScored = want.Total - want.OnRemovedUpstreams
			}
			if got.Connections != want {
				t.Errorf("live connections %+v, want %+v", got.Connections, want)
			}
		})
	}

	// planning changed nothing
	if after := c.fingerprints(t, ""); !jsonEqual(t, before, after) {
		t.Errorf("fingerprints before planning %+v, after %+v", before, after)
	}
	if hs := c.upstreams(t, "?handler="+strconv.Itoa(index3)); hs[0].Connections != len(held) {
		t.Errorf("%d connections flowing after planning, want %d", hs[0].Connections, len(held))
	}
}

// TestAdminErrors sends each kind of bad request and checks its status
// and message, and that errors come as Caddy's admin API gives them.
func TestAdminErrors(t *testing.T) {
	_, addrs := startBackends(t, 1, whoami)
	c := startCaddy(t, map[string]any{"upstreams": upstreamsJSON(addrs[0])})
	big := append([]byte(`{"upstreams": [{"dial": "`), bytes.Repeat([]byte("a"), maxPlanBody)...)
	tooMany := proposedUpstreams(t, maxPlanUpstreams+1, false)
	longKey := func(n int) string { return "/godist/pick?key=" + strings.Repeat("k", n) }

	tests := []struct {
		name       string
		method     string
		path       string
		body       string
		wantStatus int
		wantErr    string
		wantAllow  string
	}{
		{"POST upstreams", "POST", "/godist/upstreams", "", 405, "method POST not allowed on /godist/upstreams: use GET", "GET"},
		{"DELETE pick", "DELETE", "/godist/pick?key=a", "", 405, "method DELETE not allowed on /godist/pick: use GET", "GET"},
		{"PUT fingerprint", "PUT", "/godist/fingerprint", "", 405, "method PUT not allowed on /godist/fingerprint: use GET", "GET"},
		{"GET plan", "GET", "/godist/plan", "", 405, "method GET not allowed on /godist/plan: use POST", "POST"},
		{"unknown endpoint", "GET", "/godist/picks", "", 404,
			"no godist endpoint /godist/picks: there are /godist/upstreams, /godist/pick, /godist/fingerprint, /godist/plan and /godist/upstreams/state", ""},
		{"unknown parameter", "GET", "/godist/upstreams?verbose=1", "", 400, `unknown query parameter "verbose": /godist/upstreams takes handler`, ""},
		{"unknown pick parameter", "GET", "/godist/pick?key=a&hash_key=ip", "", 400, `unknown query parameter "hash_key": /godist/pick takes handler, key, ip, port`, ""},
		{"parameter twice", "GET", "/godist/pick?key=a&key=b", "", 400, `query parameter "key" given 2 times`, ""},
		{"bad escape", "GET", "/godist/fingerprint?handler=%zz", "", 400, `query: invalid URL escape "%zz"`, ""},
		{"handler not a number", "GET", "/godist/upstreams?handler=first", "", 400, `handler "first": must be a handler's index, a whole number from 0`, ""},
		{"handler negative", "GET", "/godist/fingerprint?handler=-1", "", 400, `handler "-1": must be a handler's index, a whole number from 0`, ""},
		{"handler unknown", "GET", "/godist/upstreams?handler=1", "", 404, "handler 1: no such godist handler: 1 godist handler is running (handler 0)", ""},
		{"pick without key", "GET", "/godist/pick", "", 400, "missing key=, or ip= with port=", ""},
		{"pick empty key", "GET", "/godist/pick?key=", "", 400, "key: empty", ""},
		{"pick key and ip", "GET", "/godist/pick?key=a&ip=192.0.2.1", "", 400, "give key=, or ip= with port=, not both", ""},
		{"pick port alone", "GET", "/godist/pick?port=80", "", 400, "port= needs ip=", ""},
		{"pick bad ip", "GET", "/godist/pick?ip=192.0.2&port=80", "", 400, `ip "192.0.2": not an IP address`, ""},
		{"pick bracketed ip", "GET", "/godist/pick?ip=[::1]&port=80", "", 400, `ip "[::1]": not an IP address`, ""},
		{"pick port too big", "GET", "/godist/pick?ip=192.0.2.1&port=65536", "", 400, `port "65536": must be a number from 1 to 65535`, ""},
		{"pick port zero", "GET", "/godist/pick?ip=192.0.2.1&port=0", "", 400, `port "0": must be a number from 1 to 65535`, ""},
		{"pick port not a number", "GET", "/godist/pick?ip=192.0.2.1&port=http", "", 400, `port "http": must be a number from 1 to 65535`, ""},
		{"pick key too long", "GET", longKey(maxPickKey + 1), "", 414,
			fmt.Sprintf("key: %d bytes: longer than the %d bytes /godist/pick takes", maxPickKey+1, maxPickKey), ""},
		{"pick key of 60 KiB", "GET", longKey(60 << 10), "", 414,
			fmt.Sprintf("key: %d bytes: longer than the %d bytes /godist/pick takes", 60<<10, maxPickKey), ""},
		{"plan empty body", "POST", "/godist/plan", "", 400, `request body: empty: want {"upstreams": [{"dial": "host:port"}, ...]}`, ""},
		{"plan bad JSON", "POST", "/godist/plan", `{"upstreams": [`, 400, "request body: unexpected EOF", ""},
		{"plan unknown field", "POST", "/godist/plan", `{"upstreams": [{"dial": "127.0.0.1:1", "weigth": 2}]}`, 400, `request body: json: unknown field "weigth"`, ""},
		{"plan wrong type", "POST", "/godist/plan", `{"upstreams": [{"dial": "127.0.0.1:1", "weight": "2"}]}`, 400, "request body: upstreams.weight: cannot be a JSON string", ""},
		{"plan two values", "POST", "/godist/plan", `{"upstreams": [{"dial": "127.0.0.1:1"}]} {}`, 400, "request body: more after the JSON object", ""},
		{"plan too large", "POST", "/godist/plan", string(big), 413, fmt.Sprintf("request body: larger than %d bytes", maxPlanBody), ""},
		{"plan too many upstreams", "POST", "/godist/plan", string(tooMany), 413,
			fmt.Sprintf("upstreams: %d proposed: a plan takes at most %d", maxPlanUpstreams+1, maxPlanUpstreams), ""},
		{"plan no upstreams", "POST", "/godist/plan", `{"upstreams": []}`, 400, "upstreams: at least one upstream is required, or a dynamic_upstreams source", ""},
		{"plan null upstream", "POST", "/godist/plan", `{"upstreams": [null]}`, 400, "upstream 0: missing", ""},
		{"plan bad weight", "POST", "/godist/plan", `{"upstreams": [{"dial": "127.0.0.1:1", "weight": -1}]}`, 400,
			"upstream 0 (127.0.0.1:1): weight -1: must be at least 1", ""},
		{"plan bad max_connections", "POST", "/godist/plan", `{"upstreams": [{"dial": "127.0.0.1:1", "max_connections": -1}]}`, 400,
			"upstream 0 (127.0.0.1:1): max_connections -1: must not be negative", ""},
		{"plan duplicate", "POST", "/godist/plan", `{"upstreams": [{"dial": "127.0.0.1:1"}, {"dial": "127.0.0.1:1"}]}`, 400,
			"upstream 1 (127.0.0.1:1): the same dial address as upstream 0", ""},
		{"plan dial without port", "POST", "/godist/plan", `{"upstreams": [{"dial": "127.0.0.1"}]}`, 400,
			"upstream 0 (127.0.0.1): invalid dial address: missing port", ""},
		{"plan dial with a bad network", "POST", "/godist/plan", `{"upstreams": [{"dial": "sctp/127.0.0.1:1"}]}`, 400,
			`upstream 0 (sctp/127.0.0.1:1): invalid dial address: network "sctp": must be tcp, tcp4, tcp6, udp, udp4, udp6 or unix`, ""},
		{"plan unknown handler", "POST", "/godist/plan", `{"handler": 2, "upstreams": [{"dial": "127.0.0.1:1"}]}`, 404,
			"handler 2: no such godist handler: 1 godist handler is running (handler 0)", ""},
		{"plan handlers disagree", "POST", "/godist/plan?handler=0", `{"handler": 1, "upstreams": [{"dial": "127.0.0.1:1"}]}`, 400,
			"handler: 0 in the query but 1 in the body", ""},
		{"plan unknown parameter", "POST", "/godist/plan?dry_run=1", `{"upstreams": [{"dial": "127.0.0.1:1"}]}`, 400,
			`unknown query parameter "dry_run": /godist/plan takes handler`, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a := c.adminCall(t, tt.method, tt.path, []byte(tt.body))
			if got := apiErrorMessage(t, a); a.status != tt.wantStatus || got != tt.wantErr {
				t.Errorf("%d %q\nwant %d %q", a.status, got, tt.wantStatus, tt.wantErr)
			}
			if got := a.header.Get("Allow"); got != tt.wantAllow {
				t.Errorf("Allow: %q, want %q", got, tt.wantAllow)
			}
		})
	}

	// and a good plan needs no handler with one running, and no weight
	var got planResult
	c.adminJSON(t, http.MethodPost, "/godist/plan", map[string]any{"upstreams": []map[string]any{{"dial": addrs[0]}}}, &got)
	if got.Handler != 0 || got.KeySpace.MovedKeys != 0 || got.NewFingerprint != got.Fingerprint {
		t.Errorf("planning the same list: %+v", got)
	}
}

// TestAdminDefaultAddress checks that the endpoints are on Caddy's admin
// listener at its default address when the config names none.
func TestAdminDefaultAddress(t *testing.T) {
	if _, err := caddy.GetModule("admin.api.godist"); err != nil {
		t.Fatalf("admin.api.godist not registered: %v", err)
	}
	ln, err := net.Listen("tcp", caddy.DefaultAdminListen)
	if err != nil {
		t.Skipf("Caddy's default admin address %s is taken: %v", caddy.DefaultAdminListen, err)
	}
	ln.Close()
	ups := upstreamsJSON(freeAddr(t))
	c, _ := startCaddyServers(t, "", map[string]any{"upstreams": ups})
	f := c.fingerprints(t, "")
	if len(f) != 1 || f[0].Fingerprint != fingerprint("", upstreamList(ups)) {
		t.Fatalf("GET http://%s/godist/fingerprint: %+v", caddy.DefaultAdminListen, f)
	}
}

// TestAdminNoHandlers checks the answers of a Caddy that runs no godist
// handler: empty lists, and no handler to plan for.
func TestAdminNoHandlers(t *testing.T) {
	c, _ := startCaddyServers(t, freeAddr(t))
	if got := c.upstreams(t, ""); got == nil || len(got) != 0 {
		t.Errorf("/godist/upstreams: %+v, want []", got)
	}
	if got := c.pick(t, "key=a"); got == nil || len(got) != 0 {
		t.Errorf("/godist/pick: %+v, want []", got)
	}
	a := c.adminCall(t, http.MethodPost, "/godist/plan", []byte(`{"upstreams": [{"dial": "127.0.0.1:1"}]}`))
	if got := apiErrorMessage(t, a); a.status != http.StatusNotFound || got != "no godist handler is running" {
		t.Errorf("/godist/plan: %d %q", a.status, got)
	}
	a = c.adminCall(t, http.MethodGet, "/godist/fingerprint?handler=0", nil)
	if got := apiErrorMessage(t, a); a.status != http.StatusNotFound || got != "handler 0: no such godist handler: no godist handler is running" {
		t.Errorf("/godist/fingerprint?handler=0: %d %q", a.status, got)
	}
}
