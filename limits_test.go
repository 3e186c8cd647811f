// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

//go:build linux

package godist

import (
	"fmt"
	"io"
	"net"
	"testing"
	"time"
)

// TestMaxConnectionsHandler checks that a connection over the handler's
// max_connections is closed at once, and that room frees up as
// connections end.
func TestMaxConnectionsHandler(t *testing.T) {
	checkNoLeaks(t)
	be := startBackend(t, "echo", "", echo)
	c := startCaddy(t, map[string]any{"upstreams": upstreamsJSON(be.addr), "max_connections": 3})

	var open []net.Conn
	for i := range 3 {
		conn := c.dial(t)
		if got, err := exchange(conn, []byte("hi")); err != nil || string(got) != "hi" {
			t.Fatalf("connection %d of 3: %q, %v", i, got, err)
		}
		open = append(open, conn)
	}
	over := c.dial(t)
	start := time.Now()
	_, _ = over.Write([]byte("x"))
	if n, err := over.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Fatalf("the fourth connection: read %d, %v; want it closed", n, err)
	}
	if took := time.Since(start); took > 2*time.Second {
		t.Fatalf("closing the fourth connection took %s", took)
	}
	over.Close()

	open[0].Close()
	eventually(t, 5*time.Second, "room for a new connection once one ended", func() error {
		conn := c.dial(t)
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(time.Second))
		got, err := exchange(conn, []byte("again"))
		if err != nil || string(got) != "again" {
			return fmt.Errorf("%q, %v", got, err)
		}
		return nil
	})
	for _, conn := range open[1:] {
		conn.Close()
	}
}

// TestMaxConnectionsUpstream checks that a full upstream is skipped like an
// unhealthy one: its keys go to their next choice until it has room.
func TestMaxConnectionsUpstream(t *testing.T) {
	checkNoLeaks(t)
	backends, addrs := startBackends(t, 3, whoami)
	picker := NewPicker([]PickerUpstream{{Dial: addrs[0]}, {Dial: addrs[1]}, {Dial: addrs[2]}})
	order := picker.Order("127.0.0.1", nil)
	ups := upstreamsJSON(addrs...)
	ups[order[0]]["max_connections"] = 2
	c := startCaddy(t, map[string]any{"upstreams": ups, "hash_key": "ip"})

	var held []net.Conn
	for i := range 4 {
		conn := c.dial(t)
		name, err := askName(conn)
		if err != nil {
			t.Fatal(err)
		}
		want := backends[order[0]].name
		if i >= 2 {
			want = backends[order[1]].name // the first choice is full
		}
		if name != want {
			t.Fatalf("connection %d landed on %s, want %s", i, name, want)
		}
		held = append(held, conn)
	}
	held[0].Close()
	eventually(t, 5*time.Second, "the first choice takes connections again", func() error {
		conn := c.dial(t)
		defer conn.Close()
		name, err := askName(conn)
		if err != nil || name != backends[order[0]].name {
			return fmt.Errorf("landed on %q, %v", name, err)
		}
		return nil
	})
	for _, conn := range held[1:] {
		conn.Close()
	}
}

// TestStateSurvivesReload checks that a reload neither forgets a dead
// upstream nor miscounts the connections open to a live one.
func TestStateSurvivesReload(t *testing.T) {
	checkNoLeaks(t)
	live := startBackend(t, "live", "", whoami)
	// an address where nothing listens, which 127.0.0.1 prefers over live
	dead := deadAddrPreferred(t, "127.0.0.1", live.addr, freeAddr)
	routes := func(dialTimeout string) []map[string]any {
		return []map[string]any{godistRoute(map[string]any{
			"upstreams": upstreamsJSON(dead, live.addr), "hash_key": "ip", "dial_timeout": dialTimeout,
		})}
	}
	c := startCaddyRoutes(t, "tcp", routes("1s"))

	conn := c.dial(t)
	if name, err := askName(conn); err != nil || name != "live" {
		t.Fatalf("failover to the live upstream: %q, %v", name, err)
	}
	failuresBefore := stateOf(t, dead).dialFailures.Load()
	if failuresBefore == 0 {
		t.Fatal("the dead upstream was never tried: the test proves nothing")
	}
	if n := stateOf(t, live.addr).active.Load(); n != 1 {
		t.Fatalf("%d connections counted on the live upstream, want 1", n)
	}

	if status, body := c.load(routes("2s")); status != 200 {
		t.Fatalf("reload: %d %s", status, body)
	}
	// The reloaded config still knows the dead upstream is down: a new
	// connection goes straight to the live one, without dialling it again.
	conn2 := c.dial(t)
	if name, err := askName(conn2); err != nil || name != "live" {
		t.Fatalf("after the reload: %q, %v", name, err)
	}
	if after := stateOf(t, dead).dialFailures.Load(); after != failuresBefore {
		t.Fatalf("the reloaded config dialled the known-dead upstream again (%d failures, was %d)", after, failuresBefore)
	}
	if n := stateOf(t, live.addr).active.Load(); n != 2 {
		t.Fatalf("%d connections counted on the live upstream across the reload, want 2", n)
	}
	// and the connection from before the reload still flows
	if _, err := io.WriteString(conn, "who?\n"); err != nil {
		t.Fatal(err)
	}
	conn.Close()
	conn2.Close()
	eventually(t, 5*time.Second, "connections counted down as they end", func() error {
		if n := stateOf(t, live.addr).active.Load(); n != 0 {
			return fmt.Errorf("%d still counted", n)
		}
		return nil
	})
}
