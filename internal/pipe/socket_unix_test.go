// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

//go:build unix

package pipe

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestDialTCP checks the engine's own dial: a connection that moves bytes
// both ways and half-closes, learns its local address when asked, and
// fails as net.Dialer's would. (A connect that times out cannot be made on
// loopback: a full accept queue still lets the client's handshake
// complete. The timeout is the poller's write deadline; the fault tests
// through Caddy cover an upstream that accepts and never answers.)
func TestDialTCP(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	addr := netip.MustParseAddrPort(ln.Addr().String())
	c, err := DialTCP(addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	peer := <-accepted
	defer peer.Close()
	if got, want := c.LocalAddr().String(), peer.RemoteAddr().String(); got != want {
		t.Errorf("LocalAddr %s, the peer sees %s", got, want)
	}
	if got := c.RemoteAddr().String(); got != addr.String() {
		t.Errorf("RemoteAddr %s, want %s", got, addr)
	}
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	if err := c.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(peer)
	if err != nil || string(got) != "ping" {
		t.Fatalf("the peer read %q, %v; want ping then EOF", got, err)
	}
	if _, err := peer.Write([]byte("pong")); err != nil {
		t.Fatal(err)
	}
	peer.Close()
	got, err = io.ReadAll(c)
	if err != nil || string(got) != "pong" {
		t.Fatalf("read %q, %v; want pong then EOF", got, err)
	}

	t.Run("refused", func(t *testing.T) {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		dead := netip.MustParseAddrPort(l.Addr().String())
		l.Close()
		_, err = DialTCP(dead, time.Second)
		if !errors.Is(err, syscall.ECONNREFUSED) || !strings.Contains(err.Error(), "dial tcp "+dead.String()+": connect: connection refused") {
			t.Fatalf("dialling a closed port: %v", err)
		}
	})

	// A listener whose accept queue is full drops new SYNs: the connect
	// stays under way until the timeout. A dial must not report it
	// connected at once (the first look comes before any wait).
	t.Run("timeout", func(t *testing.T) {
		fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer syscall.Close(fd)
		if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
			t.Fatal(err)
		}
		if err := syscall.Listen(fd, 0); err != nil { // a queue of one
			t.Fatal(err)
		}
		sa, err := syscall.Getsockname(fd)
		if err != nil {
			t.Fatal(err)
		}
		full := netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), uint16(sa.(*syscall.SockaddrInet4).Port))
		for range 2 { // fill the queue; the second may hang until its timeout
			if c, err := net.DialTimeout("tcp", full.String(), 200*time.Millisecond); err == nil {
				defer c.Close()
			}
		}
		c, err := DialTCP(full, 300*time.Millisecond)
		if err == nil {
			c.Close()
			t.Fatal("dialling a listener whose queue is full: connected at once; want a timeout")
		}
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() || !strings.Contains(err.Error(), "dial tcp "+full.String()+": i/o timeout") {
			t.Fatalf("dialling a listener whose queue is full: %v; want a dial timeout", err)
		}
	})
}
