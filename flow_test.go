// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

//go:build linux

package godist

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/bcca9c24/caddy-godist/internal/pipe"
)

// parkedFlows counts the flows whose sockets the reactor holds now.
func parkedFlows() int {
	return pipe.ReadStats().Parked
}

// TestIdleFlowsPark checks that the flows of idle connections park in the
// reactor and give their goroutines back, and that parked connections
// carry on unharmed: bytes either way, a half-close, an EOF from the
// upstream, an abort by the idle timeout.
func TestIdleFlowsPark(t *testing.T) {
	checkNoLeaks(t)
	be := startBackend(t, "digest", "", digestAfterEOF)
	echoBe := startBackend(t, "echo", "", echo)
	c := startCaddy(t, map[string]any{"upstreams": upstreamsJSON(echoBe.addr)})

	const n = 50
	conns := make([]*net.TCPConn, n)
	for i := range conns {
		conns[i] = c.dial(t)
		if got, err := exchange(conns[i], []byte("hello")); err != nil || string(got) != "hello" {
			t.Fatalf("connection %d: %q, %v", i, got, err)
		}
	}
	goroutinesBusy := ownGoroutines()
	eventually(t, 5*time.Second, "the idle connections' flows parked", func() error {
		if p := parkedFlows(); p != 2*n {
			return fmt.Errorf("%d flows parked, want %d", p, 2*n)
		}
		return nil
	})
	// each connection gave back two goroutines
	if freed := goroutinesBusy - ownGoroutines(); freed < 2*n-4 {
		t.Errorf("parking freed %d goroutines, want about %d", freed, 2*n)
	}

	// parked connections carry on: every byte, both ways, in order
	for i, conn := range conns {
		payload := randomBytes(uint64(i), 100_000+i)
		got, err := exchange(conn, payload)
		if err != nil || !bytes.Equal(got, payload) {
			t.Fatalf("connection %d after parking: %d of %d bytes, %v", i, len(got), len(payload), err)
		}
	}
	// and a half-close from a parked connection still gets its reply
	eventually(t, 5*time.Second, "parked again", func() error {
		if p := parkedFlows(); p != 2*n {
			return fmt.Errorf("%d flows parked, want %d", p, 2*n)
		}
		return nil
	})
	for i, conn := range conns[:10] {
		_ = conn.CloseWrite()
		if rest, err := io.ReadAll(conn); err != nil || len(rest) != 0 {
			t.Fatalf("connection %d: after half-closing a parked connection: %q, %v", i, rest, err)
		}
	}
	for _, conn := range conns {
		conn.Close()
	}
	eventually(t, 5*time.Second, "the closed connections' flows forgotten", func() error {
		if p := parkedFlows(); p != 0 {
			return fmt.Errorf("%d flows still parked", p)
		}
		return nil
	})

	t.Run("request after parking, reply after EOF", func(t *testing.T) {
		c := startCaddy(t, map[string]any{"upstreams": upstreamsJSON(be.addr)})
		conn := c.dial(t)
		eventually(t, 5*time.Second, "parked", func() error {
			if p := parkedFlows(); p < 2 {
				return fmt.Errorf("%d flows parked", p)
			}
			return nil
		})
		payload := randomBytes(77, 300_000)
		got, err := roundTrip(conn, payload)
		if want := fmt.Sprintf("%x %d\n", sha256.Sum256(payload), len(payload)); err != nil || string(got) != want {
			t.Fatalf("reply = %q, %v; want %q", got, err, want)
		}
	})

	t.Run("idle timeout ends a parked connection", func(t *testing.T) {
		c := startCaddy(t, map[string]any{"upstreams": upstreamsJSON(echoBe.addr), "idle_timeout": "1500ms"})
		conn := c.dial(t)
		if _, err := exchange(conn, []byte("x")); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		eventually(t, 5*time.Second, "parked", func() error {
			if p := parkedFlows(); p < 2 {
				return fmt.Errorf("%d flows parked", p)
			}
			return nil
		})
		if n, err := conn.Read(make([]byte, 1)); n != 0 || err == nil {
			t.Fatalf("read %d, %v: want the connection closed by the idle timeout", n, err)
		}
		if took := time.Since(start); took > 5*time.Second {
			t.Fatalf("the idle timeout took %s to end a parked connection", took)
		}
		eventually(t, 5*time.Second, "forgotten", func() error {
			if p := parkedFlows(); p != 0 {
				return fmt.Errorf("%d flows still parked", p)
			}
			return nil
		})
	})
}

// startTLSEchoBackend serves TLS on a loopback port with a throwaway
// certificate and echoes what it decrypts until the client's EOF.
func startTLSEchoBackend(t *testing.T) string {
	t.Helper()
	certSrc := httptest.NewUnstartedServer(nil)
	certSrc.StartTLS()
	cert := certSrc.TLS.Certificates[0]
	certSrc.Close()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().String()
}

// TestMatcherRoutesGetTheFastPath is defect 5 of the engine issue: a
// connection routed by a matcher kept a buffered goroutine-per-direction
// copy for life, because the engine chose how to read the client before
// the bytes the matchers prefetched were forwarded. Now they are forwarded
// first and the client's socket is read directly: a TLS passthrough
// connection chosen by SNI, and one chosen by the ssh matcher, park when
// idle and splice bulk, with every byte intact.
func TestMatcherRoutesGetTheFastPath(t *testing.T) {
	checkNoLeaks(t)
	tlsBackend := startTLSEchoBackend(t)
	echoBe := startBackend(t, "echo", "", echo)
	sniRoute := godistRoute(map[string]any{"upstreams": upstreamsJSON(tlsBackend)})
	sniRoute["match"] = []any{map[string]any{"tls": map[string]any{"sni": []string{"fast.example"}}}}
	sshRoute := godistRoute(map[string]any{"upstreams": upstreamsJSON(echoBe.addr)})
	sshRoute["match"] = []any{map[string]any{"ssh": map[string]any{}}}
	c := startCaddyRoutes(t, "tcp", []map[string]any{sniRoute, sshRoute})

	const n = 5
	tlsConns := make([]*tls.Conn, n)
	for i := range tlsConns {
		tc := tls.Client(c.dial(t), &tls.Config{ServerName: "fast.example", InsecureSkipVerify: true}) //nolint:gosec // a throwaway test certificate
		_ = tc.SetDeadline(time.Now().Add(20 * time.Second))
		if got, err := exchange(tc, []byte("hello")); err != nil || string(got) != "hello" {
			t.Fatalf("TLS connection %d: %q, %v", i, got, err)
		}
		tlsConns[i] = tc
	}
	sshConns := make([]*net.TCPConn, n)
	for i := range sshConns {
		conn := c.dial(t)
		banner := []byte("SSH-2.0-OpenSSH_9.6 godist-test\r\n")
		if got, err := exchange(conn, banner); err != nil || !bytes.Equal(got, banner) {
			t.Fatalf("ssh connection %d: %q, %v", i, got, err)
		}
		sshConns[i] = conn
	}
	eventually(t, 5*time.Second, "the matched connections' flows parked", func() error {
		if p := parkedFlows(); p != 4*n {
			return fmt.Errorf("%d flows parked, want %d", p, 4*n)
		}
		return nil
	})

	// Bulk through a parked, matched connection wakes it, and splices.
	splicesBefore := pipe.ReadStats().SpliceRuns
	for i, tc := range tlsConns {
		payload := randomBytes(uint64(i), 2<<20)
		errc := make(chan error, 1)
		go func() { _, err := tc.Write(payload); errc <- err }()
		got := make([]byte, len(payload))
		if _, err := io.ReadFull(tc, got); err != nil || sha256.Sum256(got) != sha256.Sum256(payload) {
			t.Fatalf("TLS connection %d: 2 MiB through a matched route: %v", i, err)
		}
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
	if runs := pipe.ReadStats().SpliceRuns - splicesBefore; runs == 0 {
		t.Errorf("no flow spliced while 2 MiB went each way through %d TLS connections routed by SNI", n)
	}
	for i, conn := range sshConns {
		payload := randomBytes(uint64(100+i), 1<<20)
		if got, err := exchange(conn, payload); err != nil || !bytes.Equal(got, payload) {
			t.Fatalf("ssh connection %d: 1 MiB: %v", i, err)
		}
	}
	for _, tc := range tlsConns {
		tc.Close()
	}
	for _, conn := range sshConns {
		conn.Close()
	}
}

// TestIdleConnectionsHoldNoGoroutine checks the handoff: a plain TCP
// client, with or without a matcher in front, is piped through a
// duplicate of its socket, and caddy-l4's goroutine returns, so that an
// idle connection holds no goroutine at all in Caddy (its flows are
// parked). Only the test's own echo backend keeps one per connection.
func TestIdleConnectionsHoldNoGoroutine(t *testing.T) {
	checkNoLeaks(t)
	echoBe := startBackend(t, "echo", "", echo)
	plain := godistRoute(map[string]any{"upstreams": upstreamsJSON(echoBe.addr)})
	sshRoute := godistRoute(map[string]any{"upstreams": upstreamsJSON(echoBe.addr)})
	sshRoute["match"] = []any{map[string]any{"ssh": map[string]any{}}}
	c := startCaddyRoutes(t, "tcp", []map[string]any{sshRoute, plain})
	time.Sleep(100 * time.Millisecond)
	base := ownGoroutines()

	const n = 40
	conns := make([]*net.TCPConn, 0, n)
	for i := range n {
		conn := c.dial(t)
		conns = append(conns, conn)
		msg := []byte("hello")
		if i%2 == 0 {
			msg = []byte("SSH-2.0-OpenSSH_9.6 godist-test\r\n")
		}
		if got, err := exchange(conn, msg); err != nil || !bytes.Equal(got, msg) {
			t.Fatalf("connection %d: %q, %v", i, got, err)
		}
	}
	eventually(t, 5*time.Second, "the idle connections parked", func() error {
		if p := parkedFlows(); p != 2*n {
			return fmt.Errorf("%d flows parked, want %d", p, 2*n)
		}
		return nil
	})
	// The echo backend holds one goroutine per connection; Caddy none.
	if grew := ownGoroutines() - base; grew > n+4 {
		t.Errorf("%d goroutines more for %d idle connections: Caddy keeps about %d per connection, want none",
			grew, n, (grew-n+n/2)/n)
	}
	for _, conn := range conns {
		if got, err := exchange(conn, []byte("still there")); err != nil || string(got) != "still there" {
			t.Fatalf("an idle handed-off connection: %q, %v", got, err)
		}
		conn.Close()
	}
}
