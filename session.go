// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"net"
	"reflect"
	"sync"
	"sync/atomic"
	"time"

	"github.com/pires/go-proxyproto"
	"go.uber.org/zap"

	"github.com/mholt/caddy-l4/layer4"

	"github.com/bcca9c24/caddy-godist/internal/ilist"
	"github.com/bcca9c24/caddy-godist/internal/pipe"
	"github.com/bcca9c24/caddy-godist/internal/workers"
)

// A session is one client connection piped to one upstream: the Caddy
// half of it. It chooses and dials the upstream (handler.go), sends what
// must reach the upstream before anything else (the PROXY protocol header,
// then the bytes caddy-l4's matchers read from the client), then hands the
// two connections to the engine (internal/pipe) and records what it
// reports.
//
// Ownership: Handle makes the session and dials; from the moment the pipe
// starts, the session belongs to the engine's goroutines, and the one that
// ends the pipe's last direction runs finish, which closes the upstream
// connection and, for a session handed off from caddy-l4's goroutine
// (detach), the duplicate of the client's socket. caddy-l4 closes its own
// client connection when Handle returns: at once after a handoff, or,
// for a client that cannot be handed off, after finish, which Handle waits
// for. The engine closes nothing.
type session struct {
	h      *Handler
	down   *layer4.Connection // caddy-l4's connection; nil once handed off
	client net.Addr           // the client's address
	start  time.Time
	up     net.Conn // the upstream connection, set by dial

	// detached is the duplicate of the client's socket that the engine
	// pipes when the session is handed off (detach); nil otherwise.
	detached net.Conn
	waiting  sync.WaitGroup // Handle waits on it when the session is not handed off

	key      string               // what the client was hashed by
	upstream *upstream            // where it went
	inList   ilist.Links[session] // its place in the handler's sessionList

	// closedBy is why godist closed the session (a closeReason), set once
	// by compare-and-swap from 0 (operate.go).
	closedBy atomic.Uint32

	dial    dialOutcome    // how the upstream was chosen
	dialled sync.WaitGroup // the dialling worker is through
	pipe    pipe.Pipe

	// prefetched is what was forwarded before the engine started: the
	// bytes caddy-l4 read from the client while matching routes.
	prefetched int64

	// Written by the engine's FlowEnded, read by finish once the pipe's
	// last direction has ended.
	toUpstream, toClient int64
	upErr, downErr       error
	firstEOF             atomic.Uint32 // the side whose EOF came first
}

// side names the end of a connection whose EOF came first, for the debug
// log.
type side uint8

const (
	sideNone side = iota
	sideClient
	sideUpstream
)

func (s side) String() string {
	switch s {
	case sideNone:
		return "none"
	case sideClient:
		return "client"
	case sideUpstream:
		return "upstream"
	}
	return "unknown"
}

// Links implements ilist.Element.
func (s *session) Links() *ilist.Links[session] { return &s.inList }

// FlowEnded implements pipe.Events.
func (s *session) FlowEnded(d pipe.Direction, n int64, err error) {
	from := sideClient
	if d == pipe.Upward {
		s.toUpstream, s.upErr = s.prefetched+n, err
	} else {
		s.toClient, s.downErr = n, err
		from = sideUpstream
	}
	if err == nil {
		s.firstEOF.CompareAndSwap(uint32(sideNone), uint32(from))
	}
}

// run starts piping bytes both ways; finish ends the session once both
// directions are done or it was aborted.
func (s *session) run() {
	client, upstream := s.ends()
	if s.detached != nil {
		s.down = nil // caddy-l4's state is given back when Handle returns
	}
	s.pipe.Init(client, upstream, pipe.Options{IdleTimeout: time.Duration(s.h.IdleTimeout)}, s)
	// Listed only once its pipe is ready to abort (operate.go closes
	// listed sessions); closed at once if an operator's maint reached its
	// upstream while it was dialled.
	s.h.sessions.add(s)
	s.h.closeIfHeld(s)
	s.pipe.Start(s.finish)
}

// finish ends the session, on the goroutine of the engine that ran its
// last direction: it counts and logs what the connection did and closes
// what the session owns, then lets Handle return if it waits.
func (s *session) finish() {
	h := s.h
	h.sessions.remove(s)
	if h.cleanedUp.Load() {
		retiredHandlers.leaveIfIdle(h)
	}
	h.connectionEnded(s)
	_ = s.up.Close()
	if s.detached != nil {
		_ = s.detached.Close()
	}
	s.upstream.release()
	h.leave()
	if s.detached == nil {
		s.waiting.Done()
	}
}

// detach hands the client's socket off from caddy-l4's goroutine (see
// Handle), if the client is a plain TCP socket whose prefetched bytes have
// all been forwarded, and reports whether it did. A failure (no descriptor
// to spare for the duplicate) only means the session stays with the
// goroutine.
func (s *session) detach() bool {
	if len(s.down.MatchingBytes()) != 0 {
		return false
	}
	tcp, ok := unwrapConnection(s.down).(*net.TCPConn)
	if !ok || innermost(s.down) != net.Conn(tcp) {
		return false
	}
	c, err := pipe.DetachSocket(tcp)
	if err != nil {
		if ce := s.h.logger.Check(zap.DebugLevel, "keeping the connection on its goroutine: its socket could not be duplicated"); ce != nil {
			ce.Write(zap.String("client", s.client.String()), zap.Error(err))
		}
		return false
	}
	s.detached = c
	return true
}

// ends returns the two ends the engine pipes between. The client is read
// from the socket itself once caddy-l4's prefetched bytes are forwarded
// (forwardPrefetched), so that a connection routed by a matcher (tls,
// http, ssh, postgres, ...) splices and parks like any other; a wrapper
// that may hold buffered bytes of its own (TLS terminated by caddy-l4, a
// PROXY protocol header decoded by caddy-l4) is read through. Writes go to
// the innermost connection that passes them through unchanged.
func (s *session) ends() (client, upstream pipe.End) {
	upRead := s.up
	if hd, ok := upRead.(*headedDatagramConn); ok {
		upRead = hd.Conn // the header goes on writes only
	}
	upstream = pipe.End{Conn: upRead, Writer: s.up}
	if s.detached != nil {
		return pipe.End{Conn: s.detached}, upstream
	}
	clientRead := net.Conn(s.down)
	if len(s.down.MatchingBytes()) == 0 {
		clientRead = unwrapConnection(s.down)
	}
	if isPacketConn(clientRead) {
		clientRead = packetWaiter{clientRead}
	}
	return pipe.End{Conn: clientRead, Writer: innermost(s.down)}, upstream
}

// forwardPrefetched sends the bytes that caddy-l4 read from the client
// while matching routes, which must reach the upstream before anything
// read from the socket after them. Reading them from the connection, not
// the slice, consumes them, so that the client's socket can be read
// directly afterwards. It runs on the dialling worker.
func (s *session) forwardPrefetched() error {
	if len(s.down.MatchingBytes()) == 0 {
		return nil
	}
	buf := prefetchBuffers.Get().(*[]byte)
	defer prefetchBuffers.Put(buf)
	for len(s.down.MatchingBytes()) > 0 {
		n, err := s.down.Read(*buf)
		if n > 0 {
			if _, werr := s.up.Write((*buf)[:n]); werr != nil {
				return werr
			}
			s.prefetched += int64(n)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// prefetchBuffers hold what caddy-l4 prefetched at most in one read.
var prefetchBuffers = sync.Pool{New: func() any {
	b := make([]byte, layer4.MaxBufLen)
	return &b
}}

// unwrapConnection returns what a layer4.Connection wraps, through any
// further layer4.Connections: reading it is reading the connection, once
// its prefetched bytes are consumed.
func unwrapConnection(c net.Conn) net.Conn {
	for {
		cx, ok := c.(*layer4.Connection)
		if !ok || len(cx.MatchingBytes()) > 0 {
			return c
		}
		c = cx.Conn
	}
}

// innermost unwraps the connection wrappers that pass writes through
// unchanged (and keep no write buffer), down to the socket.
func innermost(c net.Conn) net.Conn {
	for {
		switch w := c.(type) {
		case *layer4.Connection:
			c = w.Conn
		case *proxyproto.Conn:
			c = w.Raw()
		default:
			return c
		}
	}
}

// isStream reports whether c carries a byte stream rather than datagrams.
func isStream(c net.Conn) bool {
	return pipe.IsStream(innermost(c))
}

// packetWaiter is a UDP client of caddy-l4 (its per-client packet
// connection, which all clients of a listener share a socket through) as
// a pipe.ReadWaiter, so that the engine holds no buffer while the client
// is silent. caddy-l4's packet connection, read with an empty buffer,
// waits for the client's next datagram, honouring its read deadline and
// the server's idle timeout, and keeps the datagram whole for the next
// read (layer4/server.go, packetConn.Read, in v0.1.2;
// TestUDPClientWaitsWithoutBuffer checks it).
type packetWaiter struct{ net.Conn }

// WaitRead implements pipe.ReadWaiter.
func (w packetWaiter) WaitRead() error {
	_, err := w.Read(nil)
	return err
}

// packetConnType is caddy-l4's per-client packet connection type, learnt
// from the first one seen: it is not exported.
var packetConnType atomic.Pointer[reflect.Type]

// isPacketConn reports whether c is caddy-l4's per-client UDP connection.
func isPacketConn(c net.Conn) bool {
	if _, ok := c.(*net.UDPConn); ok || isStream(c) {
		return false
	}
	if known := packetConnType.Load(); known != nil {
		return reflect.TypeOf(c) == *known
	}
	t := reflect.TypeOf(c)
	if t.String() != "*layer4.packetConn" {
		return false
	}
	packetConnType.Store(&t)
	return true
}

// dialWorkers run the dials. Go's dial path is deep: run on a
// connection's own goroutine, which then waits for the connection's
// lifetime, it would leave that goroutine with a stack twice the size,
// and a fresh goroutine would grow (copy) its stack for every connection.
var dialWorkers = workers.New(16, 3*time.Second, (*session).establish)
