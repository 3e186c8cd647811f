// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// The examples of dynamic upstreams and tiers, in docs/, are adapted and
// run: each Caddyfile must adapt to the JSON beside
// it, and each config, loaded into Caddy with its listener on a free
// loopback port and its DNS sources asking testDNS (the examples' own
// resolvers are not ours to ask), must hash over the upstreams its names
// give, and send connections where its tiers say.

// exampleExpect is what one example must do once running.
type exampleExpect struct {
	members []string // "dial weight tier", the whole membership
	serves  []int    // the example backends its connections may land on; none: send none
}

// exampleDNS is the DNS the examples look up, answered by testDNS, with
// the backends its SRV records point at.
type exampleDNS struct {
	s  *testDNS
	sb *srvBackends
}

func startExampleDNS(t *testing.T) exampleDNS {
	t.Helper()
	s := startTestDNS(t)
	sb := startSRVBackends(t, 6)
	s.setA("be.godist.test", "127.0.0.1")
	// Kubernetes: a headless service's SRV records (CoreDNS gives
	// priority 0, an equal weight) and its A records.
	s.setSRV("_postgres._tcp.db.prod.svc.cluster.local", sb.record(0, 0, 50), sb.record(1, 0, 50))
	s.setA("db.prod.svc.cluster.local", "127.0.0.2", "127.0.0.3")
	// Consul: priority 1, weight 1, targets only it resolves.
	s.setSRV("db.service.consul", sb.record(2, 1, 1))
	s.setSRV("_redis._tcp.service.consul", sb.record(3, 1, 1))
	s.setA("redis.legacy.internal", "127.0.0.4")
	// RFC 2782 priorities: 10 first, 20 after.
	s.setSRV("_postgres._tcp.db.internal", sb.record(4, 10, 1), sb.record(5, 20, 1))
	return exampleDNS{s: s, sb: sb}
}

// line is a membership line for example backend i.
func (e exampleDNS) line(i, weight, tier int) string {
	return fmt.Sprintf("%s %d %d", e.sb.backends[i].addr, weight, tier)
}

// TestDynamicAndTierExamples adapts and runs the examples of
// docs/dynamic-upstreams.md and of docs/tiers.md.
func TestDynamicAndTierExamples(t *testing.T) {
	t.Setenv("NAMESPACE", "prod") // the Kubernetes A example's {env.NAMESPACE}
	e := startExampleDNS(t)
	k8sSRV := exampleExpect{members: []string{e.line(0, 50, 0), e.line(1, 50, 0)}, serves: []int{0, 1}}
	consul := exampleExpect{members: []string{"10.0.9.1:5432 1 65536", e.line(2, 1, 1)}, serves: []int{2}}
	primariesAndBackup := exampleExpect{members: []string{"10.0.0.1:6379 1 0", "10.0.0.2:6379 1 0", "10.0.0.3:6379 1 0", "10.0.1.1:6379 1 65536"}}
	for _, tc := range []struct {
		file, section string
		want          []exampleExpect
	}{
		{"docs/dynamic-upstreams.md", "## Examples", []exampleExpect{
			k8sSRV,
			{members: []string{"127.0.0.2:5432 1 0", "127.0.0.3:5432 1 0"}},
			consul,
			{members: []string{e.line(3, 1, 1), "127.0.0.4:6379 1 0"}},
		}},
		{"docs/tiers.md", "## Examples", []exampleExpect{
			primariesAndBackup,
			{members: []string{"10.1.0.1:5432 1 0", "10.1.0.2:5432 1 0", "10.2.0.1:5432 1 1", "10.2.0.2:5432 1 1", "10.3.0.1:5432 1 65536"}},
			{members: []string{"10.0.9.1:5432 1 65536", e.line(4, 1, 10), e.line(5, 1, 20)}, serves: []int{4}},
		}},
	} {
		raw, err := os.ReadFile(tc.file)
		if err != nil {
			t.Fatal(err)
		}
		sec := section(t, string(raw), tc.section)
		caddyfiles, jsons := fencedBlocks(sec, "caddyfile"), fencedBlocks(sec, "json")
		if len(caddyfiles) != len(tc.want) || len(jsons) != len(tc.want) {
			t.Fatalf("%s, %s: %d Caddyfiles and %d JSON configs; this test knows %d examples", tc.file, tc.section, len(caddyfiles), len(jsons), len(tc.want))
		}
		for i, want := range tc.want {
			t.Run(fmt.Sprintf("%s %s %d", tc.file, tc.section[3:], i+1), func(t *testing.T) {
				adapted, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfiles[i]), nil)
				if err != nil || len(warnings) > 0 {
					t.Fatalf("adapting: %v %v", err, warnings)
				}
				assertJSONEqual(t, adapted, jsons[i])
				c := runExample(t, adapted, e.s.addr)
				slices.Sort(want.members)
				eventually(t, testTimeout, "the example's upstreams", func() error {
					if got := membersOf(testHandler(t).members.Load()); !slices.Equal(got, want.members) {
						return fmt.Errorf("members %v, want %v", got, want.members)
					}
					return nil
				})
				for range 5 * len(want.serves) {
					conn := c.dial(t)
					name, err := askName(conn)
					conn.Close()
					if err != nil || !slices.ContainsFunc(want.serves, func(b int) bool { return e.sb.backends[b].name == name }) {
						t.Fatalf("a connection through the example landed on %q (%v); want one of backends %v", name, err, want.serves)
					}
				}
				stopCaddy(t)
			})
		}
	}
}

// runExample loads an adapted example into Caddy in this process, its one
// layer4 server listening on a free loopback port instead of its own, and
// its DNS sources asking dnsAddr instead of the resolvers they name.
func runExample(t *testing.T, adapted []byte, dnsAddr string) *testCaddy {
	t.Helper()
	var cfg map[string]any
	if err := json.Unmarshal(adapted, &cfg); err != nil {
		t.Fatal(err)
	}
	servers := findKey(cfg, "servers").(map[string]any)
	if len(servers) != 1 {
		t.Fatalf("%d layer4 servers in the example; want 1", len(servers))
	}
	c := &testCaddy{t: t, admin: freeAddr(t), listen: freeAddr(t)}
	for _, srv := range servers {
		srv.(map[string]any)["listen"] = []string{c.listen}
	}
	askTestDNS(cfg, dnsAddr)
	cfg["admin"] = map[string]any{"listen": c.admin, "config": map[string]any{"persist": false}}
	cfg["logging"] = map[string]any{"logs": map[string]any{"default": map[string]any{"writer": testLogWriter(), "level": "DEBUG"}}}
	b, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := caddy.Load(b, true); err != nil {
		t.Fatalf("loading the example: %v", err)
	}
	t.Cleanup(func() { stopCaddy(t) })
	return c
}

// askTestDNS points every a and srv source in v at the resolver addr.
func askTestDNS(v any, addr string) {
	switch v := v.(type) {
	case map[string]any:
		if v["source"] == "a" || v["source"] == "srv" {
			v["resolver"] = map[string]any{"addresses": []string{addr}}
		}
		for _, child := range v {
			askTestDNS(child, addr)
		}
	case []any:
		for _, child := range v {
			askTestDNS(child, addr)
		}
	}
}
