// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package main

import (
	"errors"
	"fmt"
	"net"
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
)

// backend is one kind of server listening on one or more loopback ports.
type backend struct {
	kind  backendKind
	lns   []net.Listener
	addrs []string

	received atomic.Int64 // bytes a sink read
	active   atomic.Int64 // connections open now

	mu    sync.Mutex
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

// startBackend listens on n free loopback ports.
func startBackend(kind backendKind, n int) (*backend, error) {
	b := &backend{kind: kind, conns: make(map[net.Conn]struct{})}
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
			defer b.forget(c)
			switch b.kind {
			case kindEcho:
				serveEcho(c)
			case kindSink:
				b.serveSink(c)
			case kindSource:
				serveSource(c)
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

// backends are the three kinds, each on three ports: one for every peer,
// all three for godist's three-upstream config.
type backends struct {
	echo, sink, source *backend
}

func startBackends() (*backends, error) {
	var bs backends
	var err error
	if bs.echo, err = startBackend(kindEcho, 3); err != nil {
		return nil, err
	}
	if bs.sink, err = startBackend(kindSink, 3); err != nil {
		bs.stop()
		return nil, err
	}
	if bs.source, err = startBackend(kindSource, 3); err != nil {
		bs.stop()
		return nil, err
	}
	return &bs, nil
}

func (bs *backends) of(k backendKind) *backend {
	switch k {
	case kindEcho:
		return bs.echo
	case kindSink:
		return bs.sink
	case kindSource:
		return bs.source
	}
	return nil
}

// drain waits for every backend connection of a test to end.
func (bs *backends) drain(timeout time.Duration) int {
	return bs.echo.drain(timeout) + bs.sink.drain(timeout) + bs.source.drain(timeout)
}

func (bs *backends) stop() {
	for _, b := range []*backend{bs.echo, bs.sink, bs.source} {
		if b != nil {
			b.stop()
		}
	}
}
