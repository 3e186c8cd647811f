// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

// Package pipe is godist's engine: it moves bytes between two connections,
// both ways, until both directions are done or it is aborted. It knows
// nothing of Caddy, upstreams or hashing: its user (godist's session) hands
// it two connections and an Events to report to, and waits in Run.
//
// A Pipe is two flows (flow.go), one per direction, each run by a pooled
// worker goroutine. How a flow moves bytes depends on what it reads from:
//
//   - a plain stream socket (*net.TCPConn, *net.UnixConn): by descriptor,
//     through a 16 KiB buffer for small messages and socket to kernel pipe to
//     socket by splice(2) for bulk (sockcopy.go, splice_linux.go), holding
//     neither while it waits; a flow idle for 25-50 ms parks its socket in
//     the reactor and gives its goroutine back (reactor_linux.go,
//     sweeper.go);
//   - a datagram socket: one datagram at a time, through a buffer taken once
//     the socket is readable (datagram.go);
//   - a connection that can wait for bytes without taking them (a ReadWaiter,
//     such as caddy-l4's per-client UDP connection): a buffer taken once it
//     has some;
//   - anything else (TLS, a wrapper holding buffered bytes): through a
//     buffer held while it waits.
//
// Ownership: the user owns both connections and closes them after Run
// returns; the engine never closes either. An abort (Abort, an error in
// one direction, the idle timeout) sets deadlines in the past, which wakes
// a flow waiting in Go's poller, and ends a parked flow directly.
//
// Process-wide parts (the reactor, the sweeper, the worker pool) start when
// first needed and end when no longer needed: the worker pool shrinks to
// nothing a few seconds after a burst, the sweeper stops when no flow can
// park, and the reactor stops once nothing holds the engine (Acquire) and
// no flow is parked.
package pipe

import (
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// Direction names one direction of a pipe.
type Direction uint8

const (
	// Upward is from the client to the upstream.
	Upward Direction = iota
	// Downward is from the upstream to the client.
	Downward
)

func (d Direction) String() string {
	if d == Upward {
		return "upward"
	}
	return "downward"
}

// Errors a flow can end with besides the fault of a connection.
var (
	// ErrAborted ends a flow that stopped because the pipe was aborted, not
	// because of a fault of its own.
	ErrAborted = errors.New("pipe aborted")

	// ErrIdle is the cause of an abort by the idle timeout.
	ErrIdle = errors.New("idle timeout")

	// ErrNoHalfClose is the cause of an abort after one direction ended at
	// its source's EOF but its destination cannot be half-closed (a
	// datagram flow, say): the pipe ends as a whole.
	ErrNoHalfClose = errors.New("the other side cannot be half-closed: ending both directions")
)

// End is one end of a pipe.
type End struct {
	// Conn is what this end's bytes are read from. Read deadlines set on it
	// must wake a read, as they do on every net.Conn of the standard
	// library.
	Conn net.Conn

	// Writer is where the bytes for this end are written, if it is not
	// Conn: the socket under a wrapper of Conn that passes writes through
	// unchanged. Optional.
	Writer net.Conn
}

func (e End) writer() net.Conn {
	if e.Writer != nil {
		return e.Writer
	}
	return e.Conn
}

// ReadWaiter is a connection that can wait until it has bytes to read,
// without taking them, so that a flow reading it needs no buffer while it
// waits. WaitRead returns nil when a Read would not block, and otherwise
// what that Read would return (an EOF, a deadline error).
type ReadWaiter interface {
	WaitRead() error
}

// Options are a pipe's settings.
type Options struct {
	// IdleTimeout aborts the pipe with ErrIdle once no byte has moved
	// either way for this long. Zero means never.
	IdleTimeout time.Duration
}

// Events is what a pipe reports to its user. Its methods are called on
// the engine's goroutines; they must be quick, must not block, and must
// not call into the pipe except Abort.
type Events interface {
	// FlowEnded is called once for each direction, as it ends, with the
	// bytes it moved. err is nil when it ended at its source's EOF (the
	// half-close has been passed on), ErrAborted when the pipe was aborted
	// under it, and otherwise the fault that ended it, which aborts the
	// pipe.
	FlowEnded(d Direction, n int64, err error)
}

// Pipe pipes bytes between a client and an upstream connection. Its zero
// value is ready for Init; it is used once.
type Pipe struct {
	events Events
	opts   Options
	client End
	server End
	up     flow // Upward: client to upstream
	down   flow // Downward: upstream to client

	// live counts the flows not yet ended; the one that ends last calls
	// onDone (Start), or releases Run's wait.
	live    atomic.Int32
	onDone  func()
	waiting sync.WaitGroup

	// aborted is nil until the pipe is aborted, then the record of why:
	// set once, by compare-and-swap, so Cause needs no lock.
	aborted atomic.Pointer[abortRecord]
	eofs    atomic.Int32 // flows that ended at their source's EOF

	lastActive atomic.Int64 // unix nanoseconds of the last byte moved, when IdleTimeout > 0
	idleTimer  *time.Timer
}

type abortRecord struct{ cause error }

// Init prepares p to pipe between client and upstream. It does not start
// anything.
func (p *Pipe) Init(client, upstream End, opts Options, events Events) {
	p.events, p.opts, p.client, p.server = events, opts, client, upstream
	p.up.init(p, Upward, client.Conn, upstream.writer())
	p.down.init(p, Downward, upstream.Conn, client.writer())
}

// Run pipes bytes both ways and returns when both directions have ended.
func (p *Pipe) Run() {
	p.waiting.Add(1)
	p.start(nil)
	p.waiting.Wait()
}

// Start pipes bytes both ways without waiting: done is called, once, when
// both directions have ended, on the goroutine of the flow that ended
// last. The connections must stay open until then; done is where its user
// closes them.
func (p *Pipe) Start(done func()) {
	p.start(done)
}

func (p *Pipe) start(done func()) {
	p.onDone = done
	if p.opts.IdleTimeout > 0 {
		p.touch()
		p.idleTimer = time.AfterFunc(p.opts.IdleTimeout, p.checkIdle)
	}
	p.live.Store(2)
	flowWorkers.Submit(&p.up)
	flowWorkers.Submit(&p.down)
}

// finished runs when the last flow has ended.
func (p *Pipe) finished() {
	if p.idleTimer != nil {
		p.idleTimer.Stop()
	}
	if p.onDone != nil {
		p.onDone()
		return
	}
	p.waiting.Done()
}

// Abort ends both directions as soon as they can notice: a flow waiting on
// its socket wakes, a parked flow ends at once. The first cause is kept;
// later aborts do nothing. It may be called from any goroutine, at any
// time, also after Run has returned.
func (p *Pipe) Abort(cause error) {
	if !p.aborted.CompareAndSwap(nil, &abortRecord{cause: cause}) {
		return
	}
	// The record is stored before the deadlines are set and before any
	// parked flow is looked at: a flow that clears a deadline while parking
	// looks at the record afterwards (see flow.park).
	past := time.Unix(1, 0)
	p.wake(p.client, past)
	p.wake(p.server, past)
	p.up.cancelParked()
	p.down.cancelParked()
}

// wake sets the deadlines of one end to t: a read of Conn and a write to
// Writer return at once. A datagram end gets a read deadline only: the
// per-client connection of a shared UDP socket passes write deadlines on
// to the socket that all clients share.
func (p *Pipe) wake(e End, t time.Time) {
	_ = e.Conn.SetReadDeadline(t)
	if w := e.writer(); IsStream(w) {
		_ = w.SetWriteDeadline(t)
	}
}

// Cause returns why the pipe was aborted, or nil if it was not, or not
// with a cause.
func (p *Pipe) Cause() error {
	if r := p.aborted.Load(); r != nil {
		return r.cause
	}
	return nil
}

func (p *Pipe) isAborted() bool { return p.aborted.Load() != nil }

// flowEnded passes on how a flow ended, from the flow's owner: on its
// source's EOF the half-close goes to the other side, whose own direction
// keeps flowing; an error aborts the whole pipe.
func (p *Pipe) flowEnded(f *flow, err error) {
	defer func() {
		if p.live.Add(-1) == 0 {
			p.finished()
		}
	}()
	p.events.FlowEnded(f.dir, f.n, err)
	if err != nil {
		p.Abort(err)
		return
	}
	if p.eofs.Add(1) == 2 {
		// The other direction is over too: both connections are about to
		// be closed, which sends this FIN anyway.
		return
	}
	if cw, ok := f.dst.(closeWriter); ok && IsStream(f.dst) && cw.CloseWrite() == nil {
		return
	}
	// A datagram flow, or a connection that cannot half-close: nothing more
	// can be passed on, so end the other direction too.
	p.Abort(ErrNoHalfClose)
}

// closeWriter is a connection that can shut down its writing half, sending
// FIN while still reading: *net.TCPConn, *net.UnixConn, *tls.Conn.
type closeWriter interface {
	CloseWrite() error
}

// touch records that bytes moved, for the idle timeout.
func (p *Pipe) touch() {
	if p.opts.IdleTimeout > 0 {
		p.lastActive.Store(time.Now().UnixNano())
	}
}

// checkIdle runs when the idle timer fires: it aborts the pipe if nothing
// moved for the whole timeout, or sets the timer for the rest.
func (p *Pipe) checkIdle() {
	idleFor := time.Duration(time.Now().UnixNano() - p.lastActive.Load())
	if idleFor >= p.opts.IdleTimeout {
		p.Abort(ErrIdle)
		return
	}
	p.idleTimer.Reset(p.opts.IdleTimeout - idleFor)
}

// copyErr turns what a copy ended with into what its flow reports: nil at
// EOF, ErrAborted for the consequences of an abort, else the error itself.
func (p *Pipe) copyErr(err error) error {
	if err == nil || errors.Is(err, io.EOF) {
		return nil
	}
	if p.isAborted() && (errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, net.ErrClosed) || errors.Is(err, os.ErrClosed)) {
		return ErrAborted
	}
	return err
}

// IsStream reports whether c carries a byte stream rather than datagrams.
// It asks the kernel nothing for the engine's own sockets (DialTCP's,
// DetachSocket's), whose LocalAddr would.
func IsStream(c net.Conn) bool {
	if _, ok := c.(*socketConn); ok {
		return true // the engine's own sockets are TCP
	}
	switch c.LocalAddr().Network() {
	case "udp", "udp4", "udp6", "unixgram", "ip", "ip4", "ip6":
		return false
	}
	return true
}
