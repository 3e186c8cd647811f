// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"bufio"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"testing"

	"github.com/pires/go-proxyproto"
)

// startPROXYBackend is a backend behind a PROXY-protocol-parsing listener,
// as nginx with `proxy_protocol` or HAProxy with `accept-proxy` would be:
// it answers each connection with the addresses the header gave it, then
// echoes.
func startPROXYBackend(t *testing.T, name string) *backend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	pln := &proxyproto.Listener{Listener: ln, ConnPolicy: func(proxyproto.ConnPolicyOptions) (proxyproto.Policy, error) {
		return proxyproto.REQUIRE, nil
	}}
	return serveBackend(t, name, pln, func(b *backend, c net.Conn) {
		pc := c.(*proxyproto.Conn)
		h := pc.ProxyHeader()
		if h == nil {
			fmt.Fprintf(c, "no header\n")
			return
		}
		fmt.Fprintf(c, "%s v%d %s %s\n", b.name, h.Version, c.RemoteAddr(), c.LocalAddr())
		echo(b, c)
	})
}

// TestProxyProtocol checks that each version of the header tells the
// upstream the client's real address, and that the stream after it is
// intact.
func TestProxyProtocol(t *testing.T) {
	for _, version := range []string{"v1", "v2"} {
		t.Run(version, func(t *testing.T) {
			be := startPROXYBackend(t, "pp")
			c := startCaddy(t, map[string]any{"upstreams": upstreamsJSON(be.addr), "proxy_protocol": version})
			conn := c.dial(t)
			r := bufio.NewReader(conn)
			line, err := r.ReadString('\n')
			if err != nil {
				t.Fatalf("reading what the upstream saw: %v", err)
			}
			want := fmt.Sprintf("pp %s %s %s\n", version, conn.LocalAddr(), c.listen)
			if line != want {
				t.Fatalf("the upstream saw %q, want %q", line, want)
			}
			payload := randomBytes(3, 200_000)
			go func() { _, _ = conn.Write(payload); _ = conn.CloseWrite() }()
			got, err := io.ReadAll(r)
			if err != nil || sha256.Sum256(got) != sha256.Sum256(payload) {
				t.Fatalf("the stream after the header: %d of %d bytes, %v", len(got), len(payload), err)
			}
		})
	}
}

// TestProxyProtocolRelayed puts caddy-l4's proxy_protocol handler in front:
// the address it decodes from the client's own header is the client's,
// for the header godist sends and for the ip_port hash key alike.
func TestProxyProtocolRelayed(t *testing.T) {
	var backends []*backend
	var addrs []string
	for i := range 3 {
		be := startPROXYBackend(t, fmt.Sprintf("b%d", i))
		backends = append(backends, be)
		addrs = append(addrs, be.addr)
	}
	picker := NewPicker([]PickerUpstream{{Dial: addrs[0]}, {Dial: addrs[1]}, {Dial: addrs[2]}})
	route := map[string]any{"handle": []any{
		map[string]any{"handler": "proxy_protocol", "allow": []string{"127.0.0.0/8"}},
		map[string]any{"handler": "godist", "upstreams": upstreamsJSON(addrs...), "proxy_protocol": "v2"},
	}}
	c := startCaddyRoutes(t, "tcp", []map[string]any{route})

	for i := range 12 {
		client := fmt.Sprintf("203.0.113.%d:%d", 7+i, 40000+i)
		conn := c.dial(t)
		fmt.Fprintf(conn, "PROXY TCP4 %s 198.51.100.1 %s 443\r\n", strings.Split(client, ":")[0], strings.Split(client, ":")[1])
		line, err := bufio.NewReader(conn).ReadString('\n')
		conn.Close()
		if err != nil {
			t.Fatalf("client %s: %v", client, err)
		}
		want := fmt.Sprintf("%s v2 %s 198.51.100.1:443\n", backends[picker.Pick(client, nil)].name, client)
		if line != want {
			t.Fatalf("client %s: the upstream saw %q, want %q", client, line, want)
		}
	}
}

// TestProxyProtocolNotInHealthChecks checks that active health checks
// never send the header: what they send is all the upstream gets.
func TestProxyProtocolNotInHealthChecks(t *testing.T) {
	var mu sync.Mutex
	var firstBytes []string
	be := startBackend(t, "recorder", "", func(_ *backend, c net.Conn) {
		buf := make([]byte, 5)
		n, _ := io.ReadFull(c, buf)
		mu.Lock()
		firstBytes = append(firstBytes, string(buf[:n]))
		mu.Unlock()
	})
	startCaddy(t, map[string]any{
		"upstreams":      upstreamsJSON(be.addr),
		"proxy_protocol": "v1",
		"health_checks":  map[string]any{"active": map[string]any{"interval": "20ms", "send": "ping\n"}},
	})
	eventually(t, testTimeout, "a few health checks", func() error {
		mu.Lock()
		defer mu.Unlock()
		if len(firstBytes) < 3 {
			return fmt.Errorf("%d checks so far", len(firstBytes))
		}
		for _, b := range firstBytes {
			if b != "ping\n" {
				return fmt.Errorf("a health check began with %q", b)
			}
		}
		return nil
	})
}
