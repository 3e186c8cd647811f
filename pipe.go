// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/pires/go-proxyproto"

	"github.com/mholt/caddy-l4/layer4"
)

// This file moves bytes between a client and its upstream.
//
// Ownership: the handler's goroutine owns the session. It runs the two
// directions, each a flow (flow.go), on pooled worker goroutines and waits
// for both; it never copies bytes itself, so its stack, which an idle
// connection keeps for its whole life, stays small. It closes the upstream
// connection; caddy-l4 closes the client connection when Handle returns.
// Nothing else closes either of them: an abort (an error in one direction,
// or the idle timeout) sets deadlines in the past, which wakes a flow
// waiting on its socket, and ends a flow parked in the reactor.
//
// While a connection is idle it holds its two sockets and its handler's
// goroutine, nothing more: every buffer or kernel pipe is taken only once a
// socket is readable, and given back before the next wait; and on Linux a
// flow idle for a moment parks its socket in the reactor and gives its
// goroutine back.

// side names the end of a connection.
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

// session is one client connection piped to one upstream.
type session struct {
	h    *Handler
	down *layer4.Connection
	up   net.Conn // the upstream connection, set by dial

	key      string         // what the client was hashed by
	upstream *upstream      // where it went
	inList   links[session] // its place in the handler's sessionList

	idleTimeout time.Duration
	lastActive  atomic.Int64 // unix nanoseconds of the last byte moved, when idleTimeout > 0
	idleTimer   *time.Timer

	aborted atomic.Bool
	cause   error // why the session was aborted; written once, before aborted is set

	dial             dialOutcome    // how the upstream was chosen
	dialled          sync.WaitGroup // the dialling worker is through
	upward, downward flow           // client to upstream, upstream to client
	flowsDone        sync.WaitGroup // both flows have ended

	// Written when a flow ends, read after both have.
	toUpstream, toClient int64
	upErr, downErr       error
	firstEOF             atomic.Uint32 // the side whose EOF came first
	finished             atomic.Int32  // flows that ended at their source's EOF
}

func (s *session) links() *links[session] { return &s.inList }

// errIdle is why a session ends when no byte moved for the idle timeout.
var errIdle = errors.New("idle timeout")

// run pipes bytes both ways until both directions are done or the session
// is aborted.
func (s *session) run() {
	if s.idleTimeout > 0 {
		s.touch()
		s.idleTimer = time.AfterFunc(s.idleTimeout, s.checkIdle)
	}

	downSocket := rawConn(innermost(s.down))
	upSocket := rawConn(innermost(s.up))
	s.upward.init(s, sideClient, s.down, s.readEndpoint(s.down, downSocket), s.writeEndpoint(s.up, upSocket))
	s.downward.init(s, sideUpstream, s.up, s.readEndpoint(s.up, upSocket), s.writeEndpoint(s.down, downSocket))

	s.flowsDone.Add(2)
	flowWorkers.submit(&s.upward)
	flowWorkers.submit(&s.downward)
	s.flowsDone.Wait()

	if s.idleTimer != nil {
		s.idleTimer.Stop()
	}
}

// flowEnded records how a flow ended and passes it on: on its source's EOF
// the half-close goes to the other side, whose opposite direction keeps
// flowing; an error aborts the whole session.
func (s *session) flowEnded(f *flow, err error) {
	if f.from == sideClient {
		s.toUpstream, s.upErr = f.n, err
	} else {
		s.toClient, s.downErr = f.n, err
	}
	defer s.flowsDone.Done()
	if err != nil {
		s.abort(err)
		return
	}
	s.firstEOF.CompareAndSwap(uint32(sideNone), uint32(f.from))
	if s.finished.Add(1) == 2 {
		// The other direction is over too: both connections are about to
		// be closed, which sends this FIN anyway.
		return
	}
	dst := f.dst.conn
	if cw, ok := innermost(dst).(closeWriter); ok && isStream(dst) {
		if cw.CloseWrite() == nil {
			return
		}
	}
	// A datagram flow, or a connection that cannot half-close: nothing more
	// can be passed on, so end the other direction too.
	s.abort(nil)
}

// abort wakes both directions so that they return. cause is nil when the
// session ends normally but cannot wait for the other direction.
func (s *session) abort(cause error) {
	if !s.aborted.CompareAndSwap(false, true) {
		return
	}
	s.cause = cause
	past := time.Unix(1, 0)
	_ = s.up.SetDeadline(past)
	_ = s.down.SetReadDeadline(past)
	if isStream(s.down) {
		// Not for a UDP client: caddy-l4's per-client packet connection
		// passes write deadlines on to the listener's shared socket.
		_ = s.down.SetWriteDeadline(past)
	}
	// A flow parked in the reactor waits on no deadline: end it here.
	s.upward.cancelParked()
	s.downward.cancelParked()
}

// closedByAbort reports whether err is the consequence of abort rather than
// a fault of its own.
func (s *session) closedByAbort(err error) bool {
	return s.aborted.Load() && (errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, net.ErrClosed))
}

// touch records that a byte moved, for the idle timeout (idle flows are
// tracked by their own, coarser clock).
func (s *session) touch() {
	if s.idleTimeout > 0 {
		s.lastActive.Store(time.Now().UnixNano())
	}
}

// checkIdle runs when the idle timer fires: it aborts the session if
// nothing moved for the whole timeout, or sets the timer for the rest.
func (s *session) checkIdle() {
	idleFor := time.Duration(time.Now().UnixNano() - s.lastActive.Load())
	if idleFor >= s.idleTimeout {
		s.abort(errIdle)
		return
	}
	s.idleTimer.Reset(s.idleTimeout - idleFor)
}

// forwardPrefetched sends the bytes that caddy-l4 read from the client
// while matching routes, which must reach the upstream before anything
// read from the socket after them.
func (s *session) forwardPrefetched() (int64, error) {
	if len(s.down.MatchingBytes()) == 0 {
		return 0, nil
	}
	buf := getBuffer()
	defer putBuffer(buf)
	var total int64
	for len(s.down.MatchingBytes()) > 0 {
		// Reading from the connection, not the slice, consumes the bytes.
		n, err := s.down.Read(*buf)
		if n > 0 {
			if _, werr := s.up.Write((*buf)[:n]); werr != nil {
				return total, werr
			}
			total += int64(n)
			s.touch()
		}
		if err != nil {
			return total, err
		}
	}
	return total, nil
}

// endpoint is one end of a direction of copying.
type endpoint struct {
	conn net.Conn        // read or write through this when raw is nil
	raw  syscall.RawConn // the socket itself, when bytes may bypass conn
}

// readEndpoint returns where to read a connection's bytes from; socket is
// the raw socket under it. The socket may be read directly only if no
// wrapper above it holds buffered bytes: a layer4.Connection right on the
// socket, whose prefetched bytes were forwarded, holds none; a TLS or
// PROXY-protocol wrapper may.
func (s *session) readEndpoint(c net.Conn, socket syscall.RawConn) endpoint {
	switch conn := c.(type) {
	case *layer4.Connection:
		if len(conn.MatchingBytes()) == 0 && conn.Conn == innermost(conn) {
			return endpoint{conn: c, raw: socket}
		}
		return endpoint{conn: c}
	case *net.TCPConn, *net.UnixConn:
		return endpoint{conn: c, raw: socket}
	}
	return endpoint{conn: c}
}

// writeEndpoint returns where to write a connection's bytes to: wrappers
// that pass writes through unchanged are skipped.
func (s *session) writeEndpoint(c net.Conn, socket syscall.RawConn) endpoint {
	return endpoint{conn: innermost(c), raw: socket}
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

// rawConn returns the socket of a TCP or unix stream connection, or nil for
// anything else (TLS, datagrams, unknown wrappers).
func rawConn(c net.Conn) syscall.RawConn {
	if !rawSupported {
		return nil
	}
	var sc syscall.Conn
	switch conn := c.(type) {
	case *net.TCPConn:
		sc = conn
	case *net.UnixConn:
		if conn.LocalAddr().Network() != "unix" {
			return nil // unixgram and unixpacket keep message boundaries
		}
		sc = conn
	default:
		return nil
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil
	}
	return rc
}

// isStream reports whether c carries a byte stream rather than datagrams.
func isStream(c net.Conn) bool {
	switch innermost(c).LocalAddr().Network() {
	case "udp", "udp4", "udp6", "unixgram", "ip", "ip4", "ip6":
		return false
	}
	return true
}

// closeWriter is a connection that can shut down its writing half, sending
// FIN while still reading: *net.TCPConn, *net.UnixConn, *tls.Conn.
type closeWriter interface {
	CloseWrite() error
}

// copyStream copies from src to dst until src's EOF (a nil error) or an
// error, for a flow whose source is not a plain socket: a TLS or PROXY
// protocol wrapper through a buffer, datagrams one by one.
func copyStream(dst, src endpoint, s *session) (int64, error) {
	if !isStream(src.conn) || !isStream(dst.conn) {
		n, err := copyDatagrams(dst.conn, src.conn, s)
		return n, s.wrapCopyErr(err)
	}
	n, err := copyBuffered(dst.conn, src.conn, s)
	return n, s.wrapCopyErr(err)
}

// wrapCopyErr turns the errors that mean "the session was aborted" into
// nil, so only genuine faults are reported, and EOF into nil.
func (s *session) wrapCopyErr(err error) error {
	if err == nil || errors.Is(err, io.EOF) {
		return nil
	}
	if s.closedByAbort(err) {
		return errAborted
	}
	return err
}

// errAborted is what a direction returns when it stopped because the
// session was aborted, not because of its own fault.
var errAborted = errors.New("session aborted")

// copyBuffered copies from a connection that is not a plain socket (a TLS
// or PROXY-protocol wrapper); it holds its buffer while it waits.
func copyBuffered(dst net.Conn, src net.Conn, s *session) (int64, error) {
	buf := getBuffer()
	defer putBuffer(buf)
	return copyThrough(dst, src, *buf, s)
}

// copyDatagrams relays datagrams one by one, keeping their boundaries: each
// read returns one whole datagram, which one write sends on.
func copyDatagrams(dst net.Conn, src net.Conn, s *session) (int64, error) {
	buf := datagramBuffers.Get().(*[]byte)
	defer datagramBuffers.Put(buf)
	return copyThrough(dst, src, *buf, s)
}

// copyThrough copies from src to dst through buf until an error or EOF.
func copyThrough(dst net.Conn, src net.Conn, buf []byte, s *session) (int64, error) {
	var total int64
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return total, werr
			}
			total += int64(n)
			s.touch()
		}
		if err != nil {
			return total, err
		}
	}
}

// copyBufferSize is the size of the buffers of connections that are not
// plain sockets (TLS, PROXY protocol wrappers), which hold theirs while they
// wait: 32 KiB moves bulk data in few system calls.
const copyBufferSize = 32 << 10

var copyBuffers = sync.Pool{New: func() any {
	b := make([]byte, copyBufferSize)
	return &b
}}

// datagramBuffers hold one whole datagram of the largest size UDP allows.
var datagramBuffers = sync.Pool{New: func() any {
	b := make([]byte, 64<<10)
	return &b
}}

// getBuffer returns a pooled copy buffer.
func getBuffer() *[]byte {
	return copyBuffers.Get().(*[]byte)
}

func putBuffer(b *[]byte) {
	copyBuffers.Put(b)
}
