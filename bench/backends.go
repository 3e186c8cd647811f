// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package main

import (
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// The backends run in the load process, on its core, as plain read and
// write loops over buffers they reuse. Not io.Copy: between two sockets it
// would splice, and to io.Discard it reads 8 KiB at a time; the bulk tests
// want large reads and writes, the same for every peer.

// bulkSize is the size of every write of the throughput tests, and of the
// buffers that read them.
const bulkSize = 256 << 10

// bulkData is what the throughput tests send: shared and never written
// after start, so every writer may use it at once.
var bulkData = make([]byte, bulkSize)

// bulkBuffers are the read buffers of bulk readers, reused across
// connections.
var bulkBuffers = sync.Pool{New: func() any {
	b := make([]byte, bulkSize)
	return &b
}}

// echoBuffers are the buffers of the echo backend: its clients send 64
// bytes or fewer at a time.
var echoBuffers = sync.Pool{New: func() any {
	b := make([]byte, 2048)
	return &b
}}

// backendKind says what a backend does with a connection.
type backendKind string

const (
	kindEcho   backendKind = "echo"   // sends back what it reads
	kindSink   backendKind = "sink"   // reads and counts, sends nothing
	kindSource backendKind = "source" // sends bulkData until the client goes
	kindHold   backendKind = "hold"   // sends holdBytes, then reads until the client goes

	// The same over TLS ("tls-" and the plain kind): each connection's
	// handshake first, then the same loop over the TLS connection.
	kindTLSEcho   backendKind = "tls-echo"
	kindTLSSink   backendKind = "tls-sink"
	kindTLSSource backendKind = "tls-source"
	kindTLSHold   backendKind = "tls-hold"
)

// holdBytes is what a hold backend sends on each connection before it goes
// quiet, leaving the connection open: the slow readers' download.
const holdBytes = 4 << 20

// backend is one kind of server listening on one or more loopback ports.
type backend struct {
	kind  backendKind
	tls   *tls.Config // TLS kinds: each connection's handshake first
	lns   []net.Listener
	addrs []string

	received atomic.Int64 // bytes a sink read
	active   atomic.Int64 // connections open now

	mu    sync.Mutex
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

// startBackend listens on n free loopback ports; with tlsConfig, it
// speaks TLS on them.
func startBackend(kind backendKind, n int, tlsConfig *tls.Config) (*backend, error) {
	b := &backend{kind: kind, tls: tlsConfig, conns: make(map[net.Conn]struct{})}
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.stop()
			return nil, fmt.Errorf("%s backend: %w", kind, err)
		}
		b.lns = append(b.lns, ln)
		b.addrs = append(b.addrs, ln.Addr().String())
		b.wg.Go(func() { b.serve(ln) })
	}
	return b, nil
}

func (b *backend) serve(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of descriptors, say: back off rather than spin.
			time.Sleep(10 * time.Millisecond)
			continue
		}
		b.mu.Lock()
		b.conns[c] = struct{}{}
		b.mu.Unlock()
		b.active.Add(1)
		b.wg.Go(func() {
			defer b.forget(c) // closes the socket, not the TLS session: no close_notify to wait on
			conn := c
			if b.tls != nil {
				tc := tls.Server(c, b.tls)
				_ = c.SetDeadline(time.Now().Add(opTimeout))
				if err := tc.Handshake(); err != nil {
					return
				}
				_ = c.SetDeadline(time.Time{})
				conn = tc
			}
			switch b.kind {
			case kindEcho, kindTLSEcho:
				serveEcho(conn)
			case kindSink, kindTLSSink:
				b.serveSink(conn)
			case kindSource, kindTLSSource:
				serveSource(conn)
			case kindHold, kindTLSHold:
				serveHold(conn)
			}
		})
	}
}

func (b *backend) forget(c net.Conn) {
	_ = c.Close()
	b.mu.Lock()
	delete(b.conns, c)
	b.mu.Unlock()
	b.active.Add(-1)
}

// serveEcho sends back what it reads until EOF or an error.
func serveEcho(c net.Conn) {
	buf := echoBuffers.Get().(*[]byte)
	defer echoBuffers.Put(buf)
	for {
		n, err := c.Read(*buf)
		if n > 0 {
			if _, werr := c.Write((*buf)[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// serveSink reads until EOF or an error, counting what it reads.
func (b *backend) serveSink(c net.Conn) {
	buf := bulkBuffers.Get().(*[]byte)
	defer bulkBuffers.Put(buf)
	for {
		n, err := c.Read(*buf)
		if n > 0 {
			b.received.Add(int64(n))
		}
		if err != nil {
			return
		}
	}
}

// serveSource writes bulkData until a write fails: the client went away.
func serveSource(c net.Conn) {
	for {
		if _, err := c.Write(bulkData); err != nil {
			return
		}
	}
}

// serveHold writes holdBytes, then reads until the client goes: a download
// after which the connection stays open and quiet.
func serveHold(c net.Conn) {
	for sent := 0; sent < holdBytes; {
		n, err := c.Write(bulkData[:min(len(bulkData), holdBytes-sent)])
		sent += n
		if err != nil {
			return
		}
	}
	_, _ = io.Copy(io.Discard, c) // nothing comes: it ends at EOF
}

// drain waits until every connection has ended, up to timeout, then
// closes those left. It returns how many had to be closed.
func (b *backend) drain(timeout time.Duration) int {
	deadline := time.Now().Add(timeout)
	for b.active.Load() > 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	b.mu.Lock()
	left := len(b.conns)
	for c := range b.conns {
		_ = c.Close()
	}
	b.mu.Unlock()
	return left
}

// stop closes the listeners and every connection, and waits for the
// goroutines, at most 5 s.
func (b *backend) stop() {
	for _, ln := range b.lns {
		_ = ln.Close()
	}
	b.drain(0)
	done := make(chan struct{})
	go func() { b.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
	}
}

// backends are the three kinds of the issue 4 tests, each on three ports:
// one for every peer, all three for godist's three-upstream config; and
// those of the SNI, slow-reader and UDP scenarios, one port each.
type backends struct {
	echo, sink, source *backend
	hold               *backend
	tlsEcho, tlsSink   *backend
	tlsSource, tlsHold *backend
	udpEcho            *udpEcho
	tls                *tlsConfigs
}

func startBackends() (*backends, error) {
	bs := &backends{}
	var err error
	if bs.tls, err = newTLSConfigs(); err != nil {
		return nil, err
	}
	for _, spec := range []struct {
		b    **backend
		kind backendKind
		n    int
	}{
		{&bs.echo, kindEcho, 3}, {&bs.sink, kindSink, 3}, {&bs.source, kindSource, 3}, {&bs.hold, kindHold, 1},
		{&bs.tlsEcho, kindTLSEcho, 1}, {&bs.tlsSink, kindTLSSink, 1}, {&bs.tlsSource, kindTLSSource, 1}, {&bs.tlsHold, kindTLSHold, 1},
	} {
		var tlsConfig *tls.Config
		if strings.HasPrefix(string(spec.kind), "tls-") {
			tlsConfig = bs.tls.server
		}
		if *spec.b, err = startBackend(spec.kind, spec.n, tlsConfig); err != nil {
			bs.stop()
			return nil, err
		}
	}
	if bs.udpEcho, err = startUDPEcho(); err != nil {
		bs.stop()
		return nil, err
	}
	return bs, nil
}

func (bs *backends) of(k backendKind) *backend {
	switch k {
	case kindEcho:
		return bs.echo
	case kindSink:
		return bs.sink
	case kindSource:
		return bs.source
	case kindHold:
		return bs.hold
	case kindTLSEcho:
		return bs.tlsEcho
	case kindTLSSink:
		return bs.tlsSink
	case kindTLSSource:
		return bs.tlsSource
	case kindTLSHold:
		return bs.tlsHold
	}
	return nil
}

func (bs *backends) all() []*backend {
	return []*backend{bs.echo, bs.sink, bs.source, bs.hold, bs.tlsEcho, bs.tlsSink, bs.tlsSource, bs.tlsHold}
}

// drain waits for every backend connection of a test to end.
func (bs *backends) drain(timeout time.Duration) int {
	left := 0
	for _, b := range bs.all() {
		left += b.drain(timeout)
	}
	return left
}

func (bs *backends) stop() {
	for _, b := range bs.all() {
		if b != nil {
			b.stop()
		}
	}
	if bs.udpEcho != nil {
		bs.udpEcho.stop()
	}
}

// udpEcho sends every datagram back to where it came from, on one socket.
type udpEcho struct {
	pc   net.PacketConn
	addr string
	done chan struct{}
}

func startUDPEcho() (*udpEcho, error) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("udp echo backend: %w", err)
	}
	u := &udpEcho{pc: pc, addr: pc.LocalAddr().String(), done: make(chan struct{})}
	go u.serve()
	return u, nil
}

func (u *udpEcho) serve() {
	defer close(u.done)
	buf := make([]byte, 64<<10)
	for {
		n, from, err := u.pc.ReadFrom(buf)
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			continue // an ICMP error of an earlier reply, say
		}
		_, _ = u.pc.WriteTo(buf[:n], from)
	}
}

// stop closes the socket and waits for the loop, at most 5 s.
func (u *udpEcho) stop() {
	_ = u.pc.Close()
	select {
	case <-u.done:
	case <-time.After(5 * time.Second):
	}
}
