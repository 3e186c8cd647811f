// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"go.uber.org/zap"

	"github.com/mholt/caddy-l4/layer4"
	"github.com/mholt/caddy-l4/modules/l4proxy"
)

func TestSelectionPolicyRegistered(t *testing.T) {
	mod, err := caddy.GetModule("layer4.proxy.selection_policies.godist")
	if err != nil {
		t.Fatalf("layer4.proxy.selection_policies.godist is not registered: %v", err)
	}
	if _, ok := mod.New().(l4proxy.Selector); !ok {
		t.Fatalf("layer4.proxy.selection_policies.godist makes a %T, not an l4proxy.Selector", mod.New())
	}
}

func TestSelectionPolicyUnmarshalCaddyfile(t *testing.T) {
	tests := []struct {
		name    string
		input   string
		want    string
		wantErr string
	}{
		{name: "default key", input: "godist", want: `{}`},
		{name: "ip", input: "godist ip", want: `{"hash_key":"ip"}`},
		{name: "ip_port", input: "godist ip_port", want: `{"hash_key":"ip_port"}`},
		{name: "placeholder", input: "godist {l4.tls.server_name}", want: `{"hash_key":"{l4.tls.server_name}"}`},
		{name: "two keys", input: "godist ip ip_port", wantErr: "wrong argument count or unexpected line ending after 'godist', at Testfile:1"},
		{name: "bad key", input: "godist source", wantErr: `lb_policy godist: hash_key "source": must be ip_port, ip, or a string with a {placeholder}, at Testfile:1`},
		{name: "a block", input: "godist ip {\n\thash_key ip\n}", wantErr: "lb_policy godist: unrecognized subdirective 'hash_key', at Testfile:2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := new(SelectionPolicy)
			err := s.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tt.input))
			if tt.wantErr != "" {
				if err == nil || err.Error() != tt.wantErr {
					t.Fatalf("error = %v\nwant %s", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("unexpected error: %v", err)
			}
			assertJSONEqual(t, caddyconfig.JSON(s, nil), tt.want)
		})
	}
}

// TestSelectionPolicyInProxyCaddyfile adapts caddy-l4's proxy with
// lb_policy godist through Caddy's Caddyfile adapter, as `caddy adapt`
// does.
func TestSelectionPolicyInProxyCaddyfile(t *testing.T) {
	caddyfileFor := func(policy string) string {
		return `{
	layer4 {
		:5432 {
			route {
				proxy 10.0.0.1:5432 {
					upstream 10.0.0.2:5432 {
						weight 2
					}
					lb_policy ` + policy + `
					lb_try_duration 5s
				}
			}
		}
	}
}
`
	}
	out, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfileFor("godist ip")), nil)
	if err != nil {
		t.Fatalf("adapting: %v", err)
	}
	if len(warnings) > 0 {
		t.Errorf("warnings: %v", warnings)
	}
	assertJSONEqual(t, out, `{"apps":{"layer4":{"servers":{"srv0":{"listen":[":5432"],"routes":[{"handle":[{
		"handler":"proxy",
		"upstreams":[{"dial":["10.0.0.1:5432"]},{"dial":["10.0.0.2:5432"],"weight":2}],
		"load_balancing":{"selection":{"policy":"godist","hash_key":"ip"},"try_duration":5000000000}
	}]}]}}}}}`)
	if err := caddy.Validate(mustConfig(t, out)); err != nil {
		t.Fatalf("validating: %v", err)
	}

	_, _, err = caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfileFor("godist ipport")), nil)
	want := `parsing caddyfile tokens for 'layer4': lb_policy godist: hash_key "ipport": must be ip_port, ip, or a string with a {placeholder}, at Caddyfile:9`
	if err == nil || err.Error() != want {
		t.Fatalf("adapting a bad key: %v\nwant %s", err, want)
	}
}

func TestSelectionPolicyBadJSON(t *testing.T) {
	s := &SelectionPolicy{HashKey: "client"}
	err := s.Provision(caddy.Context{})
	if want := `hash_key "client": must be ip_port, ip, or a string with a {placeholder}`; err == nil || err.Error() != want {
		t.Fatalf("provisioning: %v\nwant %s", err, want)
	}
}

// addrConn is a connection that only has addresses.
type addrConn struct {
	net.Conn
	local, remote net.Addr
}

func (c addrConn) LocalAddr() net.Addr  { return c.local }
func (c addrConn) RemoteAddr() net.Addr { return c.remote }

// testConn returns a caddy-l4 connection from client, a host:port.
func testConn(t testing.TB, client string) *layer4.Connection {
	t.Helper()
	return layer4.WrapConnection(addrConn{
		local:  mustParseAddr(t, "192.0.2.1:5432"),
		remote: mustParseAddr(t, client),
	}, nil, zap.NewNop())
}

func provisionedPolicy(t testing.TB, hashKey string) *SelectionPolicy {
	t.Helper()
	s := &SelectionPolicy{HashKey: hashKey}
	if err := s.Provision(caddy.Context{}); err != nil {
		t.Fatal(err)
	}
	return s
}

// testPool returns unprovisioned upstreams: caddy-l4 counts them all as
// available.
func testPool(dials ...string) l4proxy.UpstreamPool {
	pool := make(l4proxy.UpstreamPool, len(dials))
	for i, d := range dials {
		pool[i] = &l4proxy.Upstream{Dial: strings.Split(d, " ")}
	}
	return pool
}

// pickerOf is the picker the godist handler would build for the same
// upstreams: what the policy must agree with.
func pickerOf(pool l4proxy.UpstreamPool) *Picker {
	ups := make([]PickerUpstream, len(pool))
	for i, u := range pool {
		ups[i] = PickerUpstream{Dial: strings.Join(u.Dial, ","), Weight: u.Weight}
	}
	return NewPicker(ups)
}

func indexOf(pool l4proxy.UpstreamPool, u *l4proxy.Upstream) int {
	for i := range pool {
		if pool[i] == u {
			return i
		}
	}
	return -1
}

// TestSelectionPolicySelect checks that the policy picks what the godist
// handler's picker picks for the same key, and that each Select for one
// connection after the first moves down the key's order of preference.
func TestSelectionPolicySelect(t *testing.T) {
	weighted := testPool("10.0.0.1:5432", "10.0.0.2:5432", "10.0.0.3:5432", "10.0.0.4:5432")
	weighted[1].Weight = 3
	tests := []struct {
		name    string
		pool    l4proxy.UpstreamPool
		hashKey string
		client  string
		key     string
		vars    map[string]any
	}{
		{name: "ip_port", pool: testPool("10.0.0.1:5432", "10.0.0.2:5432", "10.0.0.3:5432"), client: "203.0.113.7:40000", key: "203.0.113.7:40000"},
		{name: "ip", pool: testPool("10.0.0.1:5432", "10.0.0.2:5432", "10.0.0.3:5432"), hashKey: "ip", client: "203.0.113.7:40000", key: "203.0.113.7"},
		{name: "ip of an ipv4-mapped client", pool: testPool("10.0.0.1:5432", "10.0.0.2:5432", "10.0.0.3:5432"), hashKey: "ip", client: "[::ffff:203.0.113.7]:40000", key: "203.0.113.7"},
		{name: "placeholder", pool: testPool("10.0.0.1:5432", "10.0.0.2:5432", "10.0.0.3:5432"), hashKey: "tenant-{l4.vars.tenant}", client: "203.0.113.7:40000", key: "tenant-acme", vars: map[string]any{"tenant": "acme"}},
		{name: "empty placeholder falls back to ip_port", pool: testPool("10.0.0.1:5432", "10.0.0.2:5432", "10.0.0.3:5432"), hashKey: "{l4.vars.tenant}", client: "203.0.113.7:40000", key: "203.0.113.7:40000"},
		{name: "weights", pool: weighted, client: "198.51.100.9:1234", key: "198.51.100.9:1234"},
		{name: "an upstream of two peers is hashed as a,b", pool: testPool("10.0.0.1:5432 10.0.0.11:5432", "10.0.0.2:5432", "10.0.0.3:5432"), hashKey: "ip", client: "198.51.100.9:1234", key: "198.51.100.9"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := provisionedPolicy(t, tt.hashKey)
			order := pickerOf(tt.pool).Order(tt.key, nil)
			cx := testConn(t, tt.client)
			for k, v := range tt.vars {
				cx.SetVar(k, v)
			}
			// the key's whole order, then round again
			for attempt := range 2*len(tt.pool) + 1 {
				got := indexOf(tt.pool, s.Select(tt.pool, cx))
				if want := order[attempt%len(tt.pool)]; got != want {
					t.Fatalf("select %d: upstream %d, want %d (order %v for key %q)", attempt+1, got, want, order, tt.key)
				}
			}
			// a new connection with the same key starts from the top
			cx2 := testConn(t, tt.client)
			for k, v := range tt.vars {
				cx2.SetVar(k, v)
			}
			if got := indexOf(tt.pool, s.Select(tt.pool, cx2)); got != order[0] {
				t.Fatalf("a new connection got upstream %d, want %d", got, order[0])
			}
		})
	}
}

// TestSelectionPolicyPinned pins where known keys go, so that a change to
// what is hashed (the dial string, the key) cannot pass unnoticed.
func TestSelectionPolicyPinned(t *testing.T) {
	pool := testPool("10.0.0.1:5432", "10.0.0.2:5432", "10.0.0.3:5432")
	pool[2].Weight = 2
	s := provisionedPolicy(t, "ip")
	for client, want := range map[string]string{
		"192.0.2.1:1":  "10.0.0.3:5432",
		"192.0.2.2:1":  "10.0.0.3:5432",
		"192.0.2.3:1":  "10.0.0.1:5432",
		"192.0.2.4:1":  "10.0.0.2:5432",
		"192.0.2.5:1":  "10.0.0.2:5432",
		"192.0.2.6:1":  "10.0.0.3:5432",
		"192.0.2.7:1":  "10.0.0.1:5432",
		"192.0.2.8:1":  "10.0.0.2:5432",
		"192.0.2.9:1":  "10.0.0.3:5432",
		"192.0.2.10:1": "10.0.0.3:5432",
	} {
		if got := s.Select(pool, testConn(t, client)).String(); got != want {
			t.Errorf("client %s: %s, want %s", client, got, want)
		}
	}
}

// TestSelectionPolicyCache checks that the picker is built once for a pool
// and rebuilt for another, and that concurrent Selects are safe.
func TestSelectionPolicyCache(t *testing.T) {
	s := provisionedPolicy(t, "")
	a := testPool("10.0.0.1:80", "10.0.0.2:80")
	b := testPool("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80")

	_ = s.Select(a, testConn(t, "192.0.2.1:1"))
	first := s.cache.Load()
	_ = s.Select(a, testConn(t, "192.0.2.2:1"))
	if s.cache.Load() != first {
		t.Fatal("the picker was rebuilt for the same pool")
	}
	if u := s.Select(b, testConn(t, "192.0.2.3:1")); indexOf(b, u) != pickerOf(b).Pick("192.0.2.3:1", nil) {
		t.Fatalf("after a pool change: %v", u)
	}
	if s.cache.Load() == first {
		t.Fatal("the picker was not rebuilt for another pool")
	}

	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			pool := a
			if g%2 == 1 {
				pool = b
			}
			for i := range 200 {
				client := fmt.Sprintf("192.0.2.%d:%d", g, 1000+i)
				if u := s.Select(pool, testConn(t, client)); indexOf(pool, u) != pickerOf(pool).Pick(client, nil) {
					t.Errorf("client %s: %v", client, u)
					return
				}
			}
		})
	}
	wg.Wait()
}

// TestSelectionPolicyAllocations checks that a connection's first Select
// allocates nothing beyond making its key.
func TestSelectionPolicyAllocations(t *testing.T) {
	pool := testPool("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80")
	pool[0].Weight = 2
	s := provisionedPolicy(t, "")
	cx := testConn(t, "192.0.2.1:1")
	_ = s.Select(pool, cx) // builds the picker, adds the var
	keyAllocs := testing.AllocsPerRun(100, func() { _ = s.keys.of(cx) })
	allocs := testing.AllocsPerRun(100, func() {
		cx.SetVar(s.varKey, nil) // a first Select each time
		_ = s.Select(pool, cx)
	})
	if allocs > keyAllocs {
		t.Fatalf("Select: %.1f allocations, making the key alone: %.1f", allocs, keyAllocs)
	}
}

func BenchmarkSelectionPolicySelect(b *testing.B) {
	for _, n := range []int{3, 16} {
		pool := make(l4proxy.UpstreamPool, n)
		for i := range pool {
			pool[i] = &l4proxy.Upstream{Dial: []string{fmt.Sprintf("10.0.0.%d:5432", i+1)}}
		}
		b.Run(fmt.Sprintf("upstreams=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			s := provisionedPolicy(b, "ip")
			cx := testConn(b, "192.0.2.1:1")
			for b.Loop() {
				cx.SetVar(s.varKey, nil)
				_ = s.Select(pool, cx)
			}
		})
	}
}

// proxyRoute returns a route to caddy-l4's proxy handler over upstreams
// with lb_policy godist.
func proxyRoute(hashKey string, upstreams []map[string]any, opts map[string]any) map[string]any {
	h := map[string]any{"handler": "proxy", "upstreams": upstreams}
	lb := map[string]any{"selection": map[string]any{"policy": "godist", "hash_key": hashKey}}
	for k, v := range opts {
		switch k {
		case "try_duration", "try_interval":
			lb[k] = v
		default:
			h[k] = v
		}
	}
	h["load_balancing"] = lb
	return map[string]any{"handle": []any{h}}
}

func proxyUpstreams(addrs ...string) []map[string]any {
	ups := make([]map[string]any, len(addrs))
	for i, a := range addrs {
		ups[i] = map[string]any{"dial": []string{a}}
	}
	return ups
}

// TestSelectionPolicyInCaddy proxies real connections through caddy-l4's
// proxy with lb_policy godist and checks that each lands where the picker
// says.
func TestSelectionPolicyInCaddy(t *testing.T) {
	_, addrs := startBackends(t, 3, whoami)
	picker := NewPicker([]PickerUpstream{{Dial: addrs[0]}, {Dial: addrs[1]}, {Dial: addrs[2]}})

	for _, hashKey := range []string{"ip_port", "ip"} {
		t.Run(hashKey, func(t *testing.T) {
			c := startCaddyRoutes(t, "tcp", []map[string]any{proxyRoute(hashKey, proxyUpstreams(addrs...), nil)})
			seen := map[string]int{}
			for range 40 {
				conn := c.dial(t)
				name, err := askName(conn)
				key := addrKey(conn.LocalAddr(), hashKey == "ip_port")
				conn.Close()
				if err != nil {
					t.Fatalf("asking the backend's name: %v", err)
				}
				if want := fmt.Sprintf("b%d", picker.Pick(key, nil)); name != want {
					t.Fatalf("key %q landed on %s, the picker says %s", key, name, want)
				}
				seen[name]++
			}
			if hashKey == "ip" && len(seen) != 1 {
				t.Fatalf("hash key ip spread one client over %v", seen)
			}
			if hashKey == "ip_port" && len(seen) != 3 {
				t.Fatalf("hash key ip_port sent 40 connections to only %v", seen)
			}
		})
	}

	t.Run("weights", func(t *testing.T) {
		ups := proxyUpstreams(addrs...)
		ups[1]["weight"] = 5
		weighted := NewPicker([]PickerUpstream{{Dial: addrs[0]}, {Dial: addrs[1], Weight: 5}, {Dial: addrs[2]}})
		c := startCaddyRoutes(t, "tcp", []map[string]any{proxyRoute("ip_port", ups, nil)})
		moved := 0
		for range 60 {
			conn := c.dial(t)
			name, err := askName(conn)
			key := addrKey(conn.LocalAddr(), true)
			conn.Close()
			if err != nil {
				t.Fatalf("asking the backend's name: %v", err)
			}
			want := weighted.Pick(key, nil)
			if name != fmt.Sprintf("b%d", want) {
				t.Fatalf("key %q landed on %s, the weighted picker says b%d", key, name, want)
			}
			if picker.Pick(key, nil) != want {
				moved++
			}
		}
		// About 38% of keys move to the heavier upstream; none moving
		// would mean this test could not tell weights from no weights.
		if moved == 0 {
			t.Fatal("no connection went where the weight, and only the weight, sent it")
		}
	})
}

// TestSelectionPolicyFailover stops the upstreams a client prefers, one
// after the other, and checks that with lb_try_duration its connections go
// down the key's order of preference, that without it they are closed,
// and that with active health checks a down upstream is skipped without
// any retry, and taken back once it is up.
func TestSelectionPolicyFailover(t *testing.T) {
	backends, addrs := startBackends(t, 4, whoami)
	picker := NewPicker([]PickerUpstream{{Dial: addrs[0]}, {Dial: addrs[1]}, {Dial: addrs[2]}, {Dial: addrs[3]}})
	order := picker.Order("127.0.0.1", nil)
	choice := func(rank int) string { return backends[order[rank]].name }

	retrying := startCaddyRoutes(t, "tcp", []map[string]any{proxyRoute("ip", proxyUpstreams(addrs...),
		map[string]any{"try_duration": "5s", "try_interval": "10ms"})})
	ask := func(t *testing.T, c *testCaddy) (string, error) {
		conn := c.dial(t)
		defer conn.Close()
		return askName(conn)
	}
	expect := func(t *testing.T, c *testCaddy, want string) {
		t.Helper()
		for range 5 {
			if name, err := ask(t, c); err != nil || name != want {
				t.Fatalf("got %q, %v; want %s", name, err, want)
			}
		}
	}

	expect(t, retrying, choice(0))
	t.Run("first choice down", func(t *testing.T) {
		backends[order[0]].stop()
		expect(t, retrying, choice(1))
	})
	t.Run("first two choices down", func(t *testing.T) {
		backends[order[1]].stop()
		expect(t, retrying, choice(2))
	})
	t.Run("no lb_try_duration", func(t *testing.T) {
		c := startCaddyRoutes(t, "tcp", []map[string]any{proxyRoute("ip", proxyUpstreams(addrs...), nil)})
		if name, err := ask(t, c); err == nil {
			t.Fatalf("answered by %s; want the connection closed", name)
		}
	})
	t.Run("passive health checks skip upstreams that refused", func(t *testing.T) {
		c := startCaddyRoutes(t, "tcp", []map[string]any{proxyRoute("ip", proxyUpstreams(addrs...), map[string]any{
			"health_checks": map[string]any{"passive": map[string]any{"fail_duration": "10s"}},
		})})
		// Without lb_try_duration, each refused dial closes its connection
		// but takes its upstream out, so the next connection goes to the
		// key's next choice.
		for i := range 2 {
			if name, err := ask(t, c); err == nil {
				t.Fatalf("connection %d answered by %s; want it closed", i+1, name)
			}
		}
		expect(t, c, choice(2))
	})
	t.Run("active health checks skip down upstreams", func(t *testing.T) {
		c := startCaddyRoutes(t, "tcp", []map[string]any{proxyRoute("ip", proxyUpstreams(addrs...), map[string]any{
			"health_checks": map[string]any{"active": map[string]any{"interval": "50ms", "timeout": "1s"}},
		})})
		// Without lb_try_duration, only a policy that skips the two
		// unhealthy choices gets an answer.
		answeredBy := func(want string) func() error {
			return func() error {
				name, err := ask(t, c)
				if err != nil {
					return err
				}
				if name != want {
					return fmt.Errorf("answered by %s, want %s", name, want)
				}
				return nil
			}
		}
		eventually(t, 5*time.Second, "the third choice answering", answeredBy(choice(2)))
		// When the first choice is back, the key returns to it.
		back := startBackend(t, "back", addrs[order[0]], whoami)
		eventually(t, 5*time.Second, "the first choice answering again", answeredBy(back.name))
	})
}
