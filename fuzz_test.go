// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"encoding/json"
	"net"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"go.uber.org/zap"

	"github.com/mholt/caddy-l4/layer4"
)

// FuzzCaddyfile feeds arbitrary text to the godist directive's parser. It
// must never panic, and whatever it accepts must survive the trip through
// JSON unchanged and pass every check that loading the config runs: a
// Caddyfile that `caddy adapt` accepts does not then fail on `caddy run`.
func FuzzCaddyfile(f *testing.F) {
	for _, seed := range []string{
		"godist localhost:4000 localhost:4001",
		"godist {\n to 127.0.0.1:1 [::1]:2\n hash_key ip\n}",
		"godist {\n upstream unix//run/x.sock {\n  weight 3\n  max_connections 9\n }\n}",
		"godist 127.0.0.1:1 {\n hash_key {l4.tls.server_name}\n dial_timeout 1s\n idle_timeout 1h\n max_connections 5\n}",
		"godist 127.0.0.1:1 {\n health_interval 5s\n health_timeout 1s\n health_port 9\n health_rise 2\n health_fall 3\n}",
		"godist 127.0.0.1:1 {\n health_send \"PING\\r\\n\"\n health_expect +PONG\n fail_duration 0\n max_fails 2\n}",
		"godist udp/127.0.0.1:53 {\n proxy_protocol v2\n}",
		"godist 127.0.0.1:1 {\n health_expect \\x4",
		"godist {\n}",
		"godist 127.0.0.1:1 { weight 2 }",
		"godist 127.0.0.1:1 {\n upstream 127.0.0.1:2 {\n  tier 3\n }\n upstream 127.0.0.1:3 {\n  backup\n }\n}",
		"godist {\n dynamic srv _pg._tcp.db.internal {\n  refresh 5s\n  resolvers 127.0.0.1:8600\n  grace_period 1m\n }\n}",
		"godist {\n dynamic multi {\n  a db.internal 5432 {\n   versions ipv4\n  }\n  srv db.service.consul\n }\n}",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, input string) {
		// not NewTestDispenser: it exits the process on a lexing error
		tokens, err := caddyfile.Tokenize([]byte(input), "Caddyfile")
		if err != nil {
			return // the lexer's, not the directive's, to refuse
		}
		h := new(Handler)
		if err := h.UnmarshalCaddyfile(caddyfile.NewDispenser(tokens)); err != nil {
			if err.Error() == "" {
				t.Fatal("an error without a message")
			}
			return
		}
		b, err := json.Marshal(h)
		if err != nil {
			t.Fatalf("accepted %q, but it does not encode: %v", input, err)
		}
		var back Handler
		if err := json.Unmarshal(b, &back); err != nil {
			t.Fatalf("accepted %q, but its JSON %s does not decode: %v", input, b, err)
		}
		if !reflect.DeepEqual(h, &back) {
			t.Fatalf("accepted %q, but JSON changed it:\n%#v\n%#v", input, h, &back)
		}
		if err := back.Validate(); err != nil {
			t.Fatalf("the Caddyfile parser accepted %q, but loading it would fail: %v", input, err)
		}
	})
}

// FuzzHashKey feeds arbitrary client addresses and hash_key strings to the
// key handling. Keys must never be empty, must read back as the address
// they came from, must not tell an IPv4-mapped address from its IPv4 form,
// and every key must find an upstream.
func FuzzHashKey(f *testing.F) {
	f.Add([]byte{1, 2, 3, 4}, uint16(5678), "", "ip_port")
	f.Add([]byte{0x20, 0x01, 0x0d, 0xb8, 15: 1}, uint16(443), "", "ip")
	f.Add([]byte{10: 0xff, 11: 0xff, 192, 0, 2, 1}, uint16(9), "", "{l4.conn.remote_addr}")
	f.Add([]byte{0xfe, 0x80, 15: 1}, uint16(80), "eth0", "sni-{l4.tls.server_name}")
	f.Add([]byte{}, uint16(0), "", "{")

	picker := NewPicker([]PickerUpstream{{Dial: "10.0.0.1:1"}, {Dial: "10.0.0.2:1", Weight: 3}, {Dial: "unix//x"}})

	// a real connection, for the placeholder keys
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		f.Fatal(err)
	}
	defer client.Close()
	server, err := ln.Accept()
	if err != nil {
		f.Fatal(err)
	}
	defer server.Close()
	cx := layer4.WrapConnection(server, nil, zap.NewNop())

	f.Fuzz(func(t *testing.T, ip []byte, port uint16, zone, hashKey string) {
		addr, ok := netip.AddrFromSlice(ip)
		if ok {
			if addr.Is6() && !addr.Is4In6() {
				addr = addr.WithZone(zone)
			}
			ap := netip.AddrPortFrom(addr, port)
			tcp := net.TCPAddrFromAddrPort(ap)
			withPort, withoutPort := addrKey(tcp, true), addrKey(tcp, false)
			want := netip.AddrPortFrom(ap.Addr().Unmap(), port)
			if got, err := netip.ParseAddrPort(withPort); err != nil || got != want {
				t.Fatalf("ip_port key %q of %s reads back as %v, %v; want %v", withPort, ap, got, err, want)
			}
			if withoutPort != want.Addr().String() {
				t.Fatalf("ip key of %s = %q, want %q", ap, withoutPort, want.Addr())
			}
			if ap.Addr().Is4In6() {
				plain := net.TCPAddrFromAddrPort(want)
				if addrKey(plain, true) != withPort {
					t.Fatalf("%s and its IPv4 form hash differently", ap)
				}
			}
			if picker.Pick(withPort, nil) < 0 || len(picker.Order(withoutPort, nil)) != picker.Len() {
				t.Fatalf("no upstream for key %q", withPort)
			}
		}

		k, err := newHashKey(hashKey)
		if err != nil {
			if !strings.Contains(err.Error(), "hash_key") {
				t.Fatalf("error %q does not name hash_key", err)
			}
			return
		}
		if key := k.of(cx); key == "" {
			t.Fatalf("hash_key %q made an empty key", hashKey)
		}
	})
}
