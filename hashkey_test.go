// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"net"
	"strings"
	"testing"
)

func mustParseAddr(t testing.TB, s string) net.Addr {
	t.Helper()
	a, err := net.ResolveTCPAddr("tcp", s)
	if err != nil {
		t.Fatalf("parse %q: %v", s, err)
	}
	return a
}

func TestAddrKey(t *testing.T) {
	tests := []struct {
		name       string
		addr       net.Addr
		ipPort, ip string
	}{
		{name: "ipv4", addr: &net.TCPAddr{IP: net.IPv4(1, 2, 3, 4), Port: 5678}, ipPort: "1.2.3.4:5678", ip: "1.2.3.4"},
		{name: "ipv6", addr: &net.TCPAddr{IP: net.ParseIP("2001:db8::1"), Port: 5678}, ipPort: "[2001:db8::1]:5678", ip: "2001:db8::1"},
		{name: "ipv4-mapped ipv6", addr: &net.TCPAddr{IP: net.ParseIP("::ffff:1.2.3.4"), Port: 9}, ipPort: "1.2.3.4:9", ip: "1.2.3.4"},
		{name: "ipv6 zone", addr: &net.TCPAddr{IP: net.ParseIP("fe80::1"), Port: 80, Zone: "eth0"}, ipPort: "[fe80::1%eth0]:80", ip: "fe80::1%eth0"},
		{name: "udp", addr: &net.UDPAddr{IP: net.IPv4(10, 0, 0, 1), Port: 53}, ipPort: "10.0.0.1:53", ip: "10.0.0.1"},
		{name: "unix", addr: &net.UnixAddr{Name: "/run/x.sock", Net: "unix"}, ipPort: "/run/x.sock", ip: "/run/x.sock"},
		{name: "nil", addr: nil, ipPort: "", ip: ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := addrKey(tt.addr, true); got != tt.ipPort {
				t.Errorf("ip_port key = %q, want %q", got, tt.ipPort)
			}
			if got := addrKey(tt.addr, false); got != tt.ip {
				t.Errorf("ip key = %q, want %q", got, tt.ip)
			}
		})
	}
}

func TestParseHashKey(t *testing.T) {
	tests := []struct {
		in      string
		want    hashKeyKind
		wantErr string
	}{
		{in: "", want: keyIPPort},
		{in: "ip_port", want: keyIPPort},
		{in: "ip", want: keyIP},
		{in: "{l4.tls.server_name}", want: keyTemplate},
		{in: "sni-{l4.tls.server_name}-x", want: keyTemplate},
		{in: "ipport", wantErr: `hash_key "ipport": must be ip_port, ip, or a string with a {placeholder}`},
		{in: "{unclosed", wantErr: `hash_key "{unclosed"`},
		{in: "IP", wantErr: `hash_key "IP"`},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			got, err := parseHashKey(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want one containing %q", err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("parseHashKey(%q) = %v, %v; want %v", tt.in, got, err, tt.want)
			}
		})
	}
}
