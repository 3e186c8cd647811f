// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
)

func TestModuleRegistered(t *testing.T) {
	mod, err := caddy.GetModule("layer4.handlers.godist")
	if err != nil {
		t.Fatalf("layer4.handlers.godist is not registered: %v", err)
	}
	if _, ok := mod.New().(*Handler); !ok {
		t.Fatalf("layer4.handlers.godist makes a %T", mod.New())
	}
	// The whole layer4 app comes with this module.
	for _, id := range []string{"layer4", "layer4.matchers.tls", "layer4.matchers.http", "layer4.handlers.proxy_protocol", "layer4.handlers.proxy"} {
		if _, err := caddy.GetModule(id); err != nil {
			t.Errorf("%s is not registered alongside godist: %v", id, err)
		}
	}
}

// TestUnmarshalCaddyfile adapts each option of the godist directive and
// compares the result with the JSON it must produce.
func TestUnmarshalCaddyfile(t *testing.T) {
	tests := []struct {
		name  string
		input string
		want  string
	}{
		{
			name:  "same-line upstreams, a godist.conf",
			input: `godist localhost:4000 localhost:4001 localhost:4002`,
			want:  `{"upstreams":[{"dial":"localhost:4000"},{"dial":"localhost:4001"},{"dial":"localhost:4002"}]}`,
		},
		{
			name: "every option",
			input: `godist 10.0.0.1:5432 {
				to 10.0.0.2:5432 [2001:db8::3]:5432
				upstream unix//run/db.sock {
					weight 3
				}
				upstream tcp/10.0.0.4:5432
				hash_key ip
				dial_timeout 500ms
				idle_timeout 1h
			}`,
			want: `{"upstreams":[{"dial":"10.0.0.1:5432"},{"dial":"10.0.0.2:5432"},{"dial":"[2001:db8::3]:5432"},
				{"dial":"unix//run/db.sock","weight":3},{"dial":"tcp/10.0.0.4:5432"}],
				"hash_key":"ip","dial_timeout":500000000,"idle_timeout":3600000000000}`,
		},
		{
			name: "placeholder key",
			input: `godist { 
				to 127.0.0.1:443 
				hash_key {l4.tls.server_name}
			}`,
			want: `{"upstreams":[{"dial":"127.0.0.1:443"}],"hash_key":"{l4.tls.server_name}"}`,
		},
		{
			name: "health checks and limits",
			input: `godist 127.0.0.1:6379 {
				upstream 127.0.0.1:6380 {
					weight 2
					max_connections 100
				}
				max_connections 1000
				health_interval 5s
				health_timeout 1s
				health_port 9000
				health_rise 2
				health_fall 3
				health_send "PING\r\n"
				health_expect +PONG
				fail_duration 30s
				max_fails 2
			}`,
			want: `{"upstreams":[{"dial":"127.0.0.1:6379"},{"dial":"127.0.0.1:6380","weight":2,"max_connections":100}],
				"max_connections":1000,
				"health_checks":{
					"active":{"interval":5000000000,"timeout":1000000000,"port":9000,"rise":2,"fall":3,"send":"PING\r\n","expect":"+PONG"},
					"passive":{"fail_duration":30000000000,"max_fails":2}}}`,
		},
		{
			name:  "passive checks off",
			input: "godist 127.0.0.1:1 {\n fail_duration 0\n}",
			want:  `{"upstreams":[{"dial":"127.0.0.1:1"}],"health_checks":{"passive":{"fail_duration":0}}}`,
		},
		{
			name:  "a banner check with escapes",
			input: "godist 127.0.0.1:22 {\n health_expect SSH-2.0\\x2d\n}",
			want:  `{"upstreams":[{"dial":"127.0.0.1:22"}],"health_checks":{"active":{"expect":"SSH-2.0-"}}}`,
		},
		{
			name: "tiers",
			input: `godist 10.0.0.1:5432 {
				upstream 10.0.0.2:5432 {
					tier 1
				}
				upstream 10.0.0.3:5432 {
					backup
					weight 2
				}
			}`,
			want: `{"upstreams":[{"dial":"10.0.0.1:5432"},{"dial":"10.0.0.2:5432","tier":1},{"dial":"10.0.0.3:5432","weight":2,"tier":65536}]}`,
		},
		{
			name: "a dynamic source and no static upstream",
			input: `godist {
				dynamic srv _pg._tcp.db.internal {
					refresh 5s
					resolvers 127.0.0.1:8600
				}
				hash_key ip
			}`,
			want: `{"dynamic_upstreams":{"source":"srv","name":"_pg._tcp.db.internal","refresh":5000000000,"resolver":{"addresses":["127.0.0.1:8600"]}},"hash_key":"ip"}`,
		},
		{
			name: "a dynamic source beside a static backup",
			input: `godist {
				upstream 10.0.9.1:5432 {
					backup
				}
				dynamic a db.internal 5432
			}`,
			want: `{"upstreams":[{"dial":"10.0.9.1:5432","tier":65536}],"dynamic_upstreams":{"source":"a","name":"db.internal","port":"5432"}}`,
		},
		{
			name: "operating a fleet",
			input: `godist 10.0.0.1:5432 10.0.0.2:5432 {
				name db-primary.eu
				slow_start 30s
				on_down close
				state_poll_interval 500ms
				health_interval 2s
			}`,
			want: `{"upstreams":[{"dial":"10.0.0.1:5432"},{"dial":"10.0.0.2:5432"}],"name":"db-primary.eu",
				"slow_start":30000000000,"on_down":"close","state_poll_interval":500000000,
				"health_checks":{"active":{"interval":2000000000}}}`,
		},
		{
			name:  "on_down keep",
			input: "godist 127.0.0.1:1 {\n on_down keep\n}",
			want:  `{"upstreams":[{"dial":"127.0.0.1:1"}],"on_down":"keep"}`,
		},
		{
			name:  "durations in days",
			input: "godist 127.0.0.1:1 {\n idle_timeout 1d\n}",
			want:  `{"upstreams":[{"dial":"127.0.0.1:1"}],"idle_timeout":86400000000000}`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := new(Handler)
			if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tt.input)); err != nil {
				t.Fatalf("unexpected error: %v", err)
			}
			assertJSONEqual(t, caddyconfig.JSON(h, nil), tt.want)
		})
	}
}

// TestUnmarshalCaddyfileErrors checks that each kind of bad input is an
// error that names the problem and the line.
func TestUnmarshalCaddyfileErrors(t *testing.T) {
	tests := []struct {
		name    string
		input   string
		wantErr string
	}{
		{name: "no upstreams", input: "godist", wantErr: "godist: no upstreams: list at least one, on the same line, with 'to', or with 'upstream', or give a 'dynamic' source, at Testfile:1"},
		{name: "no upstreams in block", input: "godist {\n hash_key ip\n}", wantErr: "godist: no upstreams"},
		{name: "unknown subdirective", input: "godist 127.0.0.1:1 {\n lb_policy first\n}", wantErr: "unrecognized subdirective 'lb_policy', at Testfile:2"},
		{name: "to without args", input: "godist {\n to\n}", wantErr: "wrong argument count or unexpected line ending after 'to', at Testfile:2"},
		{name: "bad address", input: "godist localhost:http", wantErr: `upstream "localhost:http": invalid dial address`},
		{name: "address without port", input: "godist {\n to localhost\n}", wantErr: `upstream "localhost": invalid dial address: missing port, at Testfile:2`},
		{name: "port range", input: "godist 127.0.0.1:4000-4002", wantErr: "a port range is not an upstream"},
		{name: "bad network", input: "godist quic/127.0.0.1:1", wantErr: `network "quic"`},
		{name: "same upstream twice", input: "godist 127.0.0.1:1 {\n to 127.0.0.1:1\n}", wantErr: `upstream "127.0.0.1:1": listed twice, at Testfile:2`},
		{name: "weight zero", input: "godist {\n upstream 127.0.0.1:1 {\n  weight 0\n }\n}", wantErr: `weight: "0": must be a whole number of at least 1, at Testfile:3`},
		{name: "weight not a number", input: "godist {\n upstream 127.0.0.1:1 {\n  weight heavy\n }\n}", wantErr: `weight: "heavy": must be a whole number of at least 1`},
		{name: "weight twice", input: "godist {\n upstream 127.0.0.1:1 {\n  weight 2\n  weight 3\n }\n}", wantErr: "weight already specified, at Testfile:4"},
		{name: "unknown upstream option", input: "godist {\n upstream 127.0.0.1:1 {\n  max_conns 2\n }\n}", wantErr: "upstream 127.0.0.1:1: unrecognized subdirective 'max_conns', at Testfile:3"},
		{name: "upstream without address", input: "godist {\n upstream\n}", wantErr: "wrong argument count"},
		{name: "upstream with two addresses", input: "godist {\n upstream 127.0.0.1:1 127.0.0.1:2\n}", wantErr: "wrong argument count"},
		{name: "bad duration", input: "godist 127.0.0.1:1 {\n dial_timeout soon\n}", wantErr: `dial_timeout: invalid duration "soon"`},
		{name: "negative duration", input: "godist 127.0.0.1:1 {\n idle_timeout -5s\n}", wantErr: "idle_timeout: -5s: must not be negative, at Testfile:2"},
		{name: "duration twice", input: "godist 127.0.0.1:1 {\n dial_timeout 1s\n dial_timeout 2s\n}", wantErr: "dial_timeout already specified, at Testfile:3"},
		{name: "missing duration", input: "godist 127.0.0.1:1 {\n dial_timeout\n}", wantErr: "wrong argument count or unexpected line ending after 'dial_timeout'"},
		{name: "extra argument", input: "godist 127.0.0.1:1 {\n hash_key ip port\n}", wantErr: "wrong argument count or unexpected line ending after 'hash_key'"},
		{name: "bad hash_key", input: "godist 127.0.0.1:1 {\n hash_key source\n}", wantErr: `hash_key "source": must be ip_port, ip, or a string with a {placeholder}, at Testfile:2`},
		{name: "health_port out of range", input: "godist 127.0.0.1:1 {\n health_port 70000\n}", wantErr: `health_port: "70000": must be a port number, 1-65535, at Testfile:2`},
		{name: "health_rise zero", input: "godist 127.0.0.1:1 {\n health_rise 0\n}", wantErr: `health_rise: "0": must be a whole number of at least 1`},
		{name: "bad escape", input: "godist 127.0.0.1:1 {\n health_send PING\\q\n}", wantErr: `health_send: "PING\\q": unknown escape \q at 4, at Testfile:2`},
		{name: "short hex escape", input: "godist 127.0.0.1:1 {\n health_expect \\x4\n}", wantErr: `health_expect: "\\x4": \x at 0 needs two hex digits`},
		{name: "max_fails twice", input: "godist 127.0.0.1:1 {\n max_fails 1\n max_fails 2\n}", wantErr: "max_fails already specified, at Testfile:3"},
		{name: "negative fail_duration", input: "godist 127.0.0.1:1 {\n fail_duration -1s\n}", wantErr: "fail_duration: -1s: must not be negative"},
		{name: "max_connections zero", input: "godist 127.0.0.1:1 {\n max_connections 0\n}", wantErr: `max_connections: "0": must be a whole number of at least 1`},
		{name: "upstream max_connections twice", input: "godist {\n upstream 127.0.0.1:1 {\n  max_connections 1\n  max_connections 2\n }\n}", wantErr: "max_connections already specified, at Testfile:4"},
		{name: "tier out of range", input: "godist {\n upstream 127.0.0.1:1 {\n  tier 65537\n }\n}", wantErr: `tier: "65537": must be a whole number from 0 to 65536, at Testfile:3`},
		{name: "negative tier", input: "godist {\n upstream 127.0.0.1:1 {\n  tier -1\n }\n}", wantErr: `tier: "-1": must be a whole number from 0 to 65536`},
		{name: "tier and backup", input: "godist {\n upstream 127.0.0.1:1 {\n  tier 2\n  backup\n }\n}", wantErr: "upstream 127.0.0.1:1: backup: give tier or backup, not both, at Testfile:4"},
		{name: "backup and tier", input: "godist {\n upstream 127.0.0.1:1 {\n  backup\n  tier 2\n }\n}", wantErr: "upstream 127.0.0.1:1: tier: give tier or backup, not both, at Testfile:4"},
		{name: "backup with an argument", input: "godist {\n upstream 127.0.0.1:1 {\n  backup yes\n }\n}", wantErr: "wrong argument count or unexpected line ending after 'yes', at Testfile:3"},
		{name: "backup twice", input: "godist {\n upstream 127.0.0.1:1 {\n  backup\n  weight 2\n  backup\n }\n}", wantErr: "backup already specified, at Testfile:5"},
		{name: "dynamic without a source", input: "godist {\n dynamic\n}", wantErr: "wrong argument count or unexpected line ending after 'dynamic', at Testfile:2"},
		{name: "dynamic twice", input: "godist {\n dynamic a db.internal 5432\n dynamic srv _pg._tcp.db.internal\n}", wantErr: "dynamic already specified, at Testfile:3"},
		{name: "unknown source", input: "godist {\n dynamic consul db\n}", wantErr: "unrecognized upstream source 'consul': there are a, multi, srv, at Testfile:2"},
		{name: "a source's own error", input: "godist {\n dynamic a db.internal\n}", wantErr: "port: required: give the upstreams' port after the name or with 'port'"},
		{name: "bad name", input: "godist 127.0.0.1:1 {\n name db/primary\n}", wantErr: `name "db/primary": '/' at byte 2: only letters, digits, '-', '_' and '.' may be used, at Testfile:2`},
		{name: "name twice", input: "godist 127.0.0.1:1 {\n name a\n name b\n}", wantErr: "name already specified, at Testfile:3"},
		{name: "name without an argument", input: "godist 127.0.0.1:1 {\n name\n}", wantErr: "wrong argument count or unexpected line ending after 'name', at Testfile:2"},
		{name: "slow_start too long", input: "godist 127.0.0.1:1 {\n slow_start 2d\n}", wantErr: "slow_start 48h0m0s: at most 24h0m0s, at Testfile:2"},
		{name: "slow_start not a duration", input: "godist 127.0.0.1:1 {\n slow_start gently\n}", wantErr: `slow_start: invalid duration "gently"`},
		{name: "on_down word", input: "godist 127.0.0.1:1 {\n on_down shutdown-sessions\n}", wantErr: `on_down "shutdown-sessions": must be keep or close, at Testfile:2`},
		{name: "state_poll_interval too short", input: "godist 127.0.0.1:1 {\n state_poll_interval 10ms\n}", wantErr: "state_poll_interval 10ms: at least 100ms (each poll lists the handler's states in the storage), at Testfile:2"},
		{name: "block on a plain option", input: "godist 127.0.0.1:1 {\n hash_key ip {\n  x\n }\n}", wantErr: "hash_key: does not take a block"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := new(Handler).UnmarshalCaddyfile(caddyfile.NewTestDispenser(tt.input))
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error = %v\nwant one containing %q", err, tt.wantErr)
			}
		})
	}
}

// TestCaddyfileAdapt runs a whole Caddyfile through Caddy's adapter, as
// `caddy adapt` does, and checks the layer4 app it produces.
func TestCaddyfileAdapt(t *testing.T) {
	input := `{
	layer4 {
		127.0.0.1:8080 {
			route {
				godist localhost:4000 localhost:4001 {
					hash_key ip
				}
			}
		}
	}
}
`
	adapter := caddyconfig.GetAdapter("caddyfile")
	out, warnings, err := adapter.Adapt([]byte(input), nil)
	if err != nil {
		t.Fatalf("adapting: %v", err)
	}
	if len(warnings) > 0 {
		t.Errorf("warnings: %v", warnings)
	}
	var cfg struct {
		Apps struct {
			Layer4 json.RawMessage `json:"layer4"`
		} `json:"apps"`
	}
	if err := json.Unmarshal(out, &cfg); err != nil {
		t.Fatal(err)
	}
	assertJSONEqual(t, cfg.Apps.Layer4, `{"servers":{"srv0":{"listen":["127.0.0.1:8080"],"routes":[{"handle":[
		{"handler":"godist","upstreams":[{"dial":"localhost:4000"},{"dial":"localhost:4001"}],"hash_key":"ip"}]}]}}}`)

	bad := strings.Replace(input, "hash_key ip", "hash_key ip\n\t\t\t\t\thash_key ip_port", 1)
	if _, _, err := adapter.Adapt([]byte(bad), nil); err == nil || !strings.Contains(err.Error(), "hash_key already specified, at Caddyfile:7") {
		t.Fatalf("adapting a duplicate option: %v", err)
	}
}

func assertJSONEqual(t testing.TB, got []byte, want string) {
	t.Helper()
	var g, w any
	if err := json.Unmarshal(got, &g); err != nil {
		t.Fatalf("got invalid JSON %s: %v", got, err)
	}
	if err := json.Unmarshal([]byte(want), &w); err != nil {
		t.Fatalf("want invalid JSON %s: %v", want, err)
	}
	if !reflect.DeepEqual(g, w) {
		t.Fatalf("JSON differs\n got: %s\nwant: %s", got, want)
	}
}
