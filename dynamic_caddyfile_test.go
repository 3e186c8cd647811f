// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"
)

// adaptDynamic parses `dynamic <source> ...` as a handler's `dynamic`
// subdirective does: moves to the source's name, and hands the rest to
// unmarshalSource.
func adaptDynamic(input string) ([]byte, error) {
	d := caddyfile.NewTestDispenser(input)
	d.Next() // "dynamic"
	if !d.NextArg() {
		return nil, d.ArgErr()
	}
	return unmarshalSource(d)
}

// TestSourceCaddyfile adapts each form of the sources' Caddyfile and
// compares the result with the JSON it must produce.
func TestSourceCaddyfile(t *testing.T) {
	tests := []struct {
		name, input, want string
	}{
		{
			name:  "a, name and port on the line",
			input: `dynamic a db.internal 5432`,
			want:  `{"source":"a","name":"db.internal","port":"5432"}`,
		},
		{
			name: "a, every option",
			input: `dynamic a {
				name db.internal
				port 5432
				refresh 30s
				resolvers 10.0.0.53 tcp/10.0.0.54:5353
				dial_timeout 2s
				dial_fallback_delay -1s
				versions ipv4 ipv6
			}`,
			want: `{"source":"a","name":"db.internal","port":"5432","refresh":30000000000,
				"resolver":{"addresses":["10.0.0.53","tcp/10.0.0.54:5353"]},"dial_timeout":2000000000,
				"dial_fallback_delay":-1000000000,"versions":{"ipv4":true,"ipv6":true}}`,
		},
		{
			name:  "a, placeholders kept for the config's load",
			input: `dynamic a {env.DB_HOST} {env.DB_PORT}`,
			want:  `{"source":"a","name":"{env.DB_HOST}","port":"{env.DB_PORT}"}`,
		},
		{
			name:  "srv, the whole name on the line",
			input: "dynamic srv _postgres._tcp.db.ns.svc.cluster.local {\n refresh 10s\n}",
			want:  `{"source":"srv","name":"_postgres._tcp.db.ns.svc.cluster.local","refresh":10000000000}`,
		},
		{
			name: "srv, every option",
			input: `dynamic srv {
				service postgres
				proto tcp
				name db.service.consul
				refresh 5s
				resolvers 127.0.0.1:8600
				dial_timeout 1s
				dial_fallback_delay 100ms
				grace_period 1m
				dial_network tcp4
			}`,
			want: `{"source":"srv","service":"postgres","proto":"tcp","name":"db.service.consul","refresh":5000000000,
				"grace_period":60000000000,"resolver":{"addresses":["127.0.0.1:8600"]},"dial_timeout":1000000000,
				"dial_fallback_delay":100000000,"dial_network":"tcp4"}`,
		},
		{
			name: "multi, nested",
			input: `dynamic multi {
				a primary.db.internal 5432
				srv _pg._tcp.backup.internal {
					resolvers 10.0.0.53
				}
				multi {
					a other.internal 6432
				}
			}`,
			want: `{"source":"multi","sources":[
				{"source":"a","name":"primary.db.internal","port":"5432"},
				{"source":"srv","name":"_pg._tcp.backup.internal","resolver":{"addresses":["10.0.0.53"]}},
				{"source":"multi","sources":[{"source":"a","name":"other.internal","port":"6432"}]}]}`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := adaptDynamic(tt.input)
			if err != nil {
				t.Fatal(err)
			}
			assertJSONEqual(t, got, tt.want)
		})
	}
}

func TestSourceCaddyfileErrors(t *testing.T) {
	tests := []struct {
		name, input, wantErr string
	}{
		{"negative refresh", "dynamic a db 1 {\n refresh -1s\n}", "refresh: -1s: must not be negative, at Testfile:2"},
		{"bad refresh", "dynamic a db 1 {\n refresh often\n}", `refresh: invalid duration "often"`},
		{"unknown subdirective", "dynamic a db 1 {\n ttl 5s\n}", "unrecognized subdirective 'ttl', at Testfile:2"},
		{"no name", "dynamic a", "name: required: give the domain name to look up on the same line or with 'name', at Testfile:1"},
		{"no port", "dynamic a {\n name db\n}", "port: required: give the upstreams' port after the name or with 'port', at Testfile:1"},
		{"bad port", "dynamic a db http", `port "http": must be a port number, 1-65535, at Testfile:1`},
		{"bad port in block", "dynamic a db {\n port 0\n}", `port "0": must be a port number, 1-65535, at Testfile:2`},
		{"too many arguments", "dynamic a db 1 2", "wrong argument count or unexpected line ending after '2', at Testfile:1"},
		{"name twice", "dynamic a db 1 {\n name other\n}", "name already specified, at Testfile:2"},
		{"port twice", "dynamic a db 1 {\n port 2\n}", "port already specified, at Testfile:2"},
		{"option twice", "dynamic a db 1 {\n refresh 1m\n refresh 2m\n}", "refresh already specified, at Testfile:3"},
		{"bad version", "dynamic a db 1 {\n versions ipv5\n}", `versions: "ipv5": must be ipv4 or ipv6, at Testfile:2`},
		{"no versions", "dynamic a db 1 {\n versions\n}", "wrong argument count or unexpected line ending after 'versions'"},
		{"no resolvers", "dynamic a db 1 {\n resolvers\n}", "wrong argument count or unexpected line ending after 'resolvers', at Testfile:2"},
		{"bad resolver", "dynamic a db 1 {\n resolvers quic/10.0.0.53\n}", `resolvers: address "quic/10.0.0.53": network "quic": must be udp, udp4, udp6, tcp, tcp4 or tcp6, at Testfile:2`},
		{"bad fallback delay", "dynamic a db 1 {\n dial_fallback_delay soon\n}", `dial_fallback_delay: invalid duration "soon"`},
		{"negative dial_timeout", "dynamic a db 1 {\n dial_timeout -1s\n}", "dial_timeout: -1s: must not be negative"},
		{"block on an option", "dynamic a db 1 {\n refresh 1m {\n  x\n }\n}", "refresh: does not take a block"},
		{"srv, two names", "dynamic srv a b", "wrong argument count"},
		{"srv, no name", "dynamic srv {\n service pg\n proto tcp\n}", "name: required: give the SRV name on the same line or with 'name', at Testfile:1"},
		{"srv, negative grace_period", "dynamic srv x {\n grace_period -1s\n}", "grace_period: -1s: must not be negative, at Testfile:2"},
		{"srv, bad dial_network", "dynamic srv x {\n dial_network sctp\n}", `dial_network "sctp": must be tcp, tcp4, tcp6, udp, udp4 or udp6, at Testfile:2`},
		{"srv, unknown subdirective", "dynamic srv x {\n weight 3\n}", "unrecognized subdirective 'weight', at Testfile:2"},
		{"srv, versions is a's", "dynamic srv x {\n versions ipv4\n}", "unrecognized subdirective 'versions'"},
		{"multi, empty", "dynamic multi", "multi: no sources: list at least one in its block, at Testfile:1"},
		{"multi, an argument", "dynamic multi extra {\n a x 1\n}", "wrong argument count"},
		{"multi, unknown source", "dynamic multi {\n dns x\n}", "unrecognized upstream source 'dns': there are a, multi, srv, at Testfile:2"},
		{"multi, a bad source", "dynamic multi {\n a x\n}", "port: required"},
		{"multi, a source's bad option", "dynamic multi {\n srv x {\n  refresh -2s\n }\n}", "refresh: -2s: must not be negative, at Testfile:3"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := adaptDynamic(tt.input)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error = %v\nwant one containing %q", err, tt.wantErr)
			}
		})
	}
}

// TestSourceCaddyfileAsCaddy: what a Caddy user wrote for the HTTP
// reverse proxy's `dynamic` adapts to the same JSON here.
func TestSourceCaddyfileAsCaddy(t *testing.T) {
	inputs := []string{
		`dynamic a db.internal 5432`,
		`dynamic a {
			name db.internal
			port 5432
			refresh 30s
			resolvers 10.0.0.53 10.0.0.54:5353
			dial_timeout 2s
			dial_fallback_delay -1s
			versions ipv6
		}`,
		`dynamic srv _postgres._tcp.db.ns.svc.cluster.local`,
		`dynamic srv {
			service postgres
			proto tcp
			name db.service.consul
			refresh 5s
			resolvers 127.0.0.1:8600
			dial_timeout 1s
			dial_fallback_delay 100ms
			grace_period 1m
		}`,
		`dynamic multi {
			a primary.db.internal 5432
			srv _pg._tcp.backup.internal {
				resolvers 10.0.0.53
			}
		}`,
	}
	for _, input := range inputs {
		t.Run(strings.Fields(input)[1], func(t *testing.T) {
			ours, err := adaptDynamic(input)
			if err != nil {
				t.Fatal(err)
			}
			d := caddyfile.NewTestDispenser(input)
			d.Next()
			d.NextArg()
			name := d.Val()
			unm, err := caddyfile.UnmarshalModule(d, "http.reverse_proxy.upstreams."+name)
			if err != nil {
				t.Fatalf("Caddy's %s: %v", name, err)
			}
			theirs := caddyconfig.JSONModuleObject(unm, "source", name, nil)
			assertJSONEqual(t, ours, string(theirs))
		})
	}
}

// TestSourceJSONAsCaddy: the JSON of Caddy's a, srv and multi upstream
// sources, every field set, loads into ours as it is.
func TestSourceJSONAsCaddy(t *testing.T) {
	on := true
	resolver := &reverseproxy.UpstreamResolver{Addresses: []string{"10.0.0.53", "tcp/10.0.0.54:53"}}
	tests := []struct {
		id    string
		caddy any
		ours  any
	}{
		{"a", &reverseproxy.AUpstreams{
			Name: "db.internal", Port: "5432", Refresh: caddy.Duration(30e9), Resolver: resolver,
			DialTimeout: caddy.Duration(2e9), FallbackDelay: caddy.Duration(-1), Versions: &reverseproxy.IPVersions{IPv4: &on},
		}, new(AUpstreams)},
		{"srv", &reverseproxy.SRVUpstreams{
			Service: "postgres", Proto: "tcp", Name: "db.service.consul", Refresh: caddy.Duration(5e9),
			GracePeriod: caddy.Duration(60e9), Resolver: resolver, DialTimeout: caddy.Duration(1e9),
			FallbackDelay: caddy.Duration(1e8), DialNetwork: "tcp4",
		}, new(SRVUpstreams)},
		{"multi", &reverseproxy.MultiUpstreams{SourcesRaw: []json.RawMessage{
			json.RawMessage(`{"source":"a","name":"db.internal","port":"5432"}`),
			json.RawMessage(`{"source":"srv","name":"_pg._tcp.db.internal"}`),
		}}, new(MultiUpstreams)},
	}
	for _, tt := range tests {
		t.Run(tt.id, func(t *testing.T) {
			theirs, err := json.Marshal(tt.caddy)
			if err != nil {
				t.Fatal(err)
			}
			if err := caddy.StrictUnmarshalJSON(theirs, tt.ours); err != nil {
				t.Fatalf("Caddy's JSON %s does not load into ours: %v", theirs, err)
			}
			back, err := json.Marshal(tt.ours)
			if err != nil {
				t.Fatal(err)
			}
			assertJSONEqual(t, back, string(theirs))
			if _, err := tryLoadSource(t, tt.id, string(theirs)); err != nil {
				t.Errorf("Caddy's JSON %s does not provision: %v", theirs, err)
			}
		})
	}
}
