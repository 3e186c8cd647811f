// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"reflect"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// adaptedConfig is what a godist.conf listening on host and balancing over
// servers must adapt to.
func adaptedConfig(host string, servers ...string) string {
	ups := make([]string, len(servers))
	for i, s := range servers {
		ups[i] = fmt.Sprintf(`{"dial":%q}`, s)
	}
	return fmt.Sprintf(`{"apps":{"layer4":{"servers":{"godist":{"listen":[%q],"routes":[{"handle":[
		{"handler":"godist","upstreams":[%s]}]}]}}}}}`, host, strings.Join(ups, ","))
}

func TestAdapter(t *testing.T) {
	tests := []struct {
		name     string
		input    string
		filename string
		want     string
		warnings []caddyconfig.Warning
	}{
		{
			name: "godist's own example",
			input: `{
    "Host": "localhost:8080",
    "Servers":
        ["localhost:4000",
         "localhost:4001",
         "localhost:4002"]
}
`,
			want: adaptedConfig("localhost:8080", "localhost:4000", "localhost:4001", "localhost:4002"),
		},
		{
			name:  "keys in any case, as encoding/json matched them",
			input: `{"host": ":8080", "SERVERS": ["10.0.0.1:80"]}`,
			want:  adaptedConfig(":8080", "10.0.0.1:80"),
		},
		{
			name:  "addresses in Caddy's syntax",
			input: `{"Host": "tcp6/[::1]:8080", "Servers": ["[2001:db8::1]:80", "tcp4/10.0.0.1:80", "unix//run/app.sock"]}`,
			want:  adaptedConfig("tcp6/[::1]:8080", "[2001:db8::1]:80", "tcp4/10.0.0.1:80", "unix//run/app.sock"),
		},
		{
			name:     "unknown keys warn",
			input:    "{\n\"Host\": \":8080\",\n\"Servers\": [\"10.0.0.1:80\"],\n\"Timeout\": 30,\n\"Verbose\": true\n}",
			filename: "/etc/godist.conf",
			want:     adaptedConfig(":8080", "10.0.0.1:80"),
			warnings: []caddyconfig.Warning{
				{File: "/etc/godist.conf", Line: 4, Directive: "Timeout", Message: `unknown key "Timeout", ignored: a godist.conf has only Host and Servers`},
				{File: "/etc/godist.conf", Line: 5, Directive: "Verbose", Message: `unknown key "Verbose", ignored: a godist.conf has only Host and Servers`},
			},
		},
		{
			name:  "the last of a repeated key counts",
			input: "{\"Host\": \":8080\",\n\"Servers\": [\"10.0.0.1:80\"],\n\"host\": \":9090\"}",
			want:  adaptedConfig(":9090", "10.0.0.1:80"),
			warnings: []caddyconfig.Warning{
				{File: "godist.conf", Line: 3, Directive: "host", Message: `"host" repeats "Host" of line 1; the last one counts, as in godist`},
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var opts map[string]any
			if tt.filename != "" {
				opts = map[string]any{"filename": tt.filename}
			}
			out, warnings, err := Adapter{}.Adapt([]byte(tt.input), opts)
			if err != nil {
				t.Fatalf("unexpected error: %v", err)
			}
			assertJSONEqual(t, out, tt.want)
			if !reflect.DeepEqual(warnings, tt.warnings) {
				t.Errorf("warnings:\n got %+v\nwant %+v", warnings, tt.warnings)
			}
		})
	}
}

// TestAdapterErrors checks that each kind of bad godist.conf is an error
// that names the file, the place and the problem.
func TestAdapterErrors(t *testing.T) {
	const servers = `"Servers": ["10.0.0.1:80"]`
	tests := []struct {
		name    string
		input   string
		wantErr string
	}{
		{name: "empty file", input: " \n", wantErr: `godist.conf: empty; a godist.conf looks like {"Host": "localhost:8080", "Servers": ["localhost:4000", "localhost:4001"]}`},
		{name: "trailing comma", input: "{\n  \"Host\": \":8080\",\n}", wantErr: `godist.conf:3:1: invalid JSON: invalid character '}' looking for beginning of object key string`},
		{name: "missing colon", input: `{"Host" ":8080"}`, wantErr: `godist.conf:1:9: invalid JSON: invalid character '"' after object key`},
		{name: "cut short", input: "{\"Host\": \":8080\",\n" + servers, wantErr: `godist.conf:2:26: invalid JSON: unexpected end of JSON input`},
		{name: "not an object", input: `[":8080"]`, wantErr: `godist.conf: must be a JSON object like {"Host": "localhost:8080", "Servers": ["localhost:4000", "localhost:4001"]}`},
		{name: "Host missing", input: "{" + servers + "}", wantErr: `godist.conf: Host: missing; name the address to listen on, like {"Host": "localhost:8080", "Servers": ["localhost:4000", "localhost:4001"]}`},
		{name: "Host empty", input: `{"Host": "", ` + servers + "}", wantErr: `godist.conf:1:10: Host: empty; name the address to listen on, like "localhost:8080" or ":8080"`},
		{name: "Host not a string", input: `{"Host": 8080, ` + servers + "}", wantErr: `godist.conf:1:10: Host: must be a string, not a number`},
		{name: "Host null", input: `{"host": null, ` + servers + "}", wantErr: `godist.conf:1:10: host: must be a string, not null`},
		{name: "Host without port", input: `{"Host": "localhost", ` + servers + "}", wantErr: `godist.conf:1:10: Host "localhost": invalid listen address: missing port`},
		{name: "Host IPv6 without brackets", input: `{"Host": "::1:8080", ` + servers + "}", wantErr: `godist.conf:1:10: Host "::1:8080": invalid listen address: missing port (an IPv6 address goes in brackets: "[::1]:8080")`},
		{name: "Host port by name", input: `{"Host": "localhost:http", ` + servers + "}", wantErr: `godist.conf:1:10: Host "localhost:http": invalid listen address: invalid start port: strconv.ParseUint: parsing "http": invalid syntax`},
		{name: "Host port range", input: `{"Host": ":8080-8081", ` + servers + "}", wantErr: `godist.conf:1:10: Host ":8080-8081": invalid listen address: a port range; godist listens on one port`},
		{name: "Host on UDP", input: `{"Host": "udp/:53", ` + servers + "}", wantErr: `godist.conf:1:10: Host "udp/:53": invalid listen address: network "udp": godist listens on TCP (tcp, tcp4 or tcp6)`},
		{name: "Servers missing", input: `{"Host": ":8080"}`, wantErr: `godist.conf: Servers: missing; list the servers to balance over, like {"Host": "localhost:8080", "Servers": ["localhost:4000", "localhost:4001"]}`},
		{name: "Servers empty", input: "{\"Host\": \":8080\",\n \"Servers\": []}", wantErr: `godist.conf:2:13: Servers: empty; list at least one server, like {"Host": "localhost:8080", "Servers": ["localhost:4000", "localhost:4001"]}`},
		{name: "Servers a string", input: `{"Host": ":8080", "Servers": "10.0.0.1:80"}`, wantErr: `godist.conf:1:30: Servers: must be a list of strings, not a string`},
		{name: "a server not a string", input: "{\"Host\": \":8080\", \"Servers\": [\n  \"10.0.0.1:80\",\n  80\n]}", wantErr: `godist.conf:3:3: Servers[1]: must be a string, not a number`},
		{name: "a server without port", input: "{\"Host\": \":8080\", \"Servers\": [\n  \"10.0.0.1:80\",\n  \"10.0.0.2\"\n]}", wantErr: `godist.conf:3:3: Servers[1] "10.0.0.2": invalid dial address: missing port`},
		{name: "a server on a port range", input: `{"Host": ":8080", "Servers": ["10.0.0.1:80-81"]}`, wantErr: `godist.conf:1:31: Servers[0] "10.0.0.1:80-81": invalid dial address: a port range is not an upstream; list each port`},
		{name: "a server on an unknown network", input: `{"Host": ":8080", "Servers": ["quic/10.0.0.1:80"]}`, wantErr: `godist.conf:1:31: Servers[0] "quic/10.0.0.1:80": invalid dial address: network "quic": must be tcp, tcp4, tcp6, udp, udp4, udp6 or unix`},
		{name: "a server twice", input: "{\"Host\": \":8080\", \"Servers\": [\"10.0.0.1:80\", \"10.0.0.2:80\",\n \"10.0.0.1:80\"]}", wantErr: `godist.conf:2:2: Servers[2] "10.0.0.1:80": listed twice (also Servers[0])`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, _, err := Adapter{}.Adapt([]byte(tt.input), nil)
			if err == nil {
				t.Fatalf("adapted to %s; want error %q", out, tt.wantErr)
			}
			if err.Error() != tt.wantErr {
				t.Fatalf("error:\n got %s\nwant %s", err, tt.wantErr)
			}
		})
	}
}

// TestAdapterKeysMatchLikeGodist checks that the adapter recognises exactly
// the keys that godist's encoding/json.Unmarshal put in its Host and
// Servers fields.
func TestAdapterKeysMatchLikeGodist(t *testing.T) {
	for _, key := range []string{"Host", "host", "HOST", "hOsT", "Hoſt", "Host ", "Hosts", "Hòst", "servers", "SERVERS", "ſervers", "Server", "server_list"} {
		t.Run(key, func(t *testing.T) {
			var godist struct {
				Host    string
				Servers any
			}
			input := fmt.Sprintf(`{%q: "x"}`, key)
			if err := json.Unmarshal([]byte(input), &godist); err != nil {
				t.Fatal(err)
			}
			godistKnows := godist.Host != "" || godist.Servers != nil

			p := &confParser{file: "godist.conf", body: []byte(input)}
			_, _ = p.parse()
			weKnow := len(p.warnings) == 0
			if weKnow != godistKnows {
				t.Fatalf("key %q: godist matched it: %v; the adapter: %v", key, godistKnows, weKnow)
			}
		})
	}
}

// TestAdapterExample keeps examples/godist.conf adapting without warnings
// to a config that provisions.
func TestAdapterExample(t *testing.T) {
	body, err := os.ReadFile("examples/godist.conf")
	if err != nil {
		t.Fatal(err)
	}
	out, warnings, err := caddyconfig.GetAdapter("godist").Adapt(body, map[string]any{"filename": "examples/godist.conf"})
	if err != nil {
		t.Fatalf("adapting: %v", err)
	}
	if len(warnings) > 0 {
		t.Errorf("warnings: %v", warnings)
	}
	assertJSONEqual(t, out, adaptedConfig("localhost:8080", "localhost:4000", "localhost:4001", "localhost:4002"))
	if err := caddy.Validate(mustConfig(t, out)); err != nil {
		t.Fatalf("validating: %v", err)
	}
}

// TestAdapterRunsInCaddy adapts a godist.conf, runs the result in Caddy and
// sends traffic through it: every connection must land where godist's
// default key (ip_port) and the picker say, with its bytes intact.
func TestAdapterRunsInCaddy(t *testing.T) {
	backends, addrs := startBackends(t, 3, nameAndDigest)
	listen := freeAddr(t)
	conf, err := json.Marshal(map[string]any{"Host": listen, "Servers": addrs, "Timeout": 30})
	if err != nil {
		t.Fatal(err)
	}
	out, warnings, err := caddyconfig.GetAdapter("godist").Adapt(conf, nil)
	if err != nil {
		t.Fatalf("adapting %s: %v", conf, err)
	}
	if len(warnings) != 1 || warnings[0].Directive != "Timeout" {
		t.Fatalf("warnings: %v; want one for Timeout", warnings)
	}
	loadAdapted(t, out)

	picker := NewPicker([]PickerUpstream{{Dial: addrs[0]}, {Dial: addrs[1]}, {Dial: addrs[2]}})
	seen := map[string]int{}
	for i := range 30 {
		conn, err := net.DialTimeout("tcp", listen, testTimeout)
		if err != nil {
			t.Fatalf("dialling Caddy: %v", err)
		}
		tcp := conn.(*net.TCPConn)
		payload := randomBytes(uint64(i), 1+i*7919)
		reply, err := roundTrip(tcp, payload)
		conn.Close()
		if err != nil {
			t.Fatalf("connection %d: %v", i, err)
		}
		want := fmt.Sprintf("%s %x %d\n", backends[picker.Pick(tcp.LocalAddr().String(), nil)].name, sha256.Sum256(payload), len(payload))
		if string(reply) != want {
			t.Fatalf("connection %d from %s: got %q, want %q", i, tcp.LocalAddr(), reply, want)
		}
		seen[strings.Fields(want)[0]]++
	}
	if len(seen) != 3 {
		t.Errorf("30 connections reached only %v", seen)
	}
}

// loadAdapted runs an adapted config in Caddy in this process, with the
// admin endpoint moved to a free loopback port and nothing persisted, and
// stops Caddy when the test ends.
func loadAdapted(t *testing.T, adapted []byte) {
	t.Helper()
	var cfg map[string]any
	if err := json.Unmarshal(adapted, &cfg); err != nil {
		t.Fatal(err)
	}
	cfg["admin"] = map[string]any{"listen": freeAddr(t), "config": map[string]any{"persist": false}}
	cfg["logging"] = map[string]any{"logs": map[string]any{"default": map[string]any{"writer": testLogWriter(), "level": "DEBUG"}}}
	b, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := caddy.Load(b, true); err != nil {
		t.Fatalf("loading the adapted config: %v", err)
	}
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("stopping Caddy: %v", err)
		}
	})
}

// nameAndDigest reads until the client half-closes, then answers with the
// backend's name, the SHA-256 of what it read and the byte count.
func nameAndDigest(b *backend, c net.Conn) {
	h := sha256.New()
	n, err := io.Copy(h, c)
	if err != nil {
		return
	}
	fmt.Fprintf(c, "%s %x %d\n", b.name, h.Sum(nil), n)
}
