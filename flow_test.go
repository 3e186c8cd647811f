// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

//go:build linux

package godist

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
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
