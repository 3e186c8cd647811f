// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package pipe

import (
	"errors"
	"net"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/bcca9c24/caddy-godist/internal/ilist"
)

// A flow is one direction of a pipe: the bytes from one connection to the
// other. It runs on a pooled worker goroutine while it moves bytes or
// waits on its socket in Go's poller. Where the platform has a reactor
// (Linux), a flow that reads a plain stream socket and has been idle for a
// moment parks the socket there and gives its goroutine back; when the
// socket has bytes (or an EOF or error) again, the reactor hands the flow
// to a worker and it goes on where it left off.
//
// # States
//
// A flow is owned by exactly one party at a time, as its state says. Only
// the owner touches the fields marked "owner only"; ownership passes only
// by the transitions below.
//
//	flowRunning  owned by the worker running it: copying, or waiting in
//	             Go's poller.
//	flowParking  owned by the same worker while it hands the socket to the
//	             reactor.
//	flowParked   owned by nobody: the socket waits in the reactor's epoll
//	             set under a registration that names the flow.
//	flowDone     ended; nothing may touch it again.
//
// The transitions, and who makes each:
//
//	running -> parking  the owner (a store: nobody else changes a running
//	                    flow's state), when the sweeper asked it to park
//	                    and its read woke with the sweeper's deadline.
//	parking -> parked   the owner, inside reactor.arm, under the reactor's
//	                    lock and together with adding the registration to
//	                    the reactor's table: a wake-up never finds one
//	                    without the other.
//	parking -> running  the owner, when arm failed: the flow stays in Go's
//	                    poller and is never asked to park again.
//	parked -> running   a compare-and-swap; whoever wins owns the flow:
//	                    - the reactor, when the registration woke, or when
//	                      the reactor failed: it hands the flow to a worker;
//	                    - Abort (cancelParked), which ends the flow at once;
//	                    - the worker that parked it, if it then sees an
//	                      abort that the compare-and-swap of Abort missed;
//	                      it ends the flow.
//	running -> done     the owner, once (end). The pipe counts the flow as
//	                    over, and its user may close the connections.
//
// # Races, and why each is safe
//
//   - An abort while a flow runs: the past deadlines wake its read or write,
//     it sees the abort and ends.
//   - An abort while a flow parks: Abort's compare-and-swap from parked
//     fails, and the worker clearing the sweeper's deadline may clear
//     Abort's too. Abort stores its record before it sets deadlines and
//     tries the compare-and-swap; the worker stores parked (or running,
//     after a failed arm) before it looks for the record. Go's atomics are
//     sequentially consistent, so at least one of the two sees the other,
//     and the flow ends either way (TestAbortRacesPark).
//   - A descriptor reused: a flow's socket is closed only after the flow is
//     done (the user closes the connections after Run returns), and a
//     parking flow belongs to its worker, so no socket can be closed, and
//     its descriptor reused, while it is being registered. Whoever ends a
//     flow removes its registration first. Every registration carries an id
//     of its own, never reused, in its epoll event, and a wake-up reaches
//     only the flow registered under that id: an event left over from an
//     earlier registration, of this flow or of a closed socket that had the
//     same descriptor, finds no flow and is dropped (TestReusedDescriptor).
//   - The sweeper's deadline landing after the flow began to park: the flow
//     finds it at its next read after a wake-up and parks again, clearing
//     it; this ends, since the sweeper asks only running flows.
type flow struct {
	p   *Pipe
	dir Direction
	src net.Conn // read from; its read deadlines wake a waiting flow
	dst net.Conn // written to

	kind     copyKind
	socket   socketCopy // for copySocket
	parkable bool       // owner only: the sweeper may ask it to park
	fd       int        // owner only: src's descriptor, taken when it first parks
	reg      registration
	n        int64 // owner only: bytes moved

	state    atomic.Int32
	detach   atomic.Bool   // the sweeper asks it to park
	lastTick atomic.Uint32 // the sweeper's tick when a byte last moved

	inList ilist.Links[flow] // its place in the sweeper's list, under the sweeper's lock
}

// Links implements ilist.Element.
func (f *flow) Links() *ilist.Links[flow] { return &f.inList }

// Flow states: see the type's doc.
const (
	flowRunning int32 = iota
	flowParking
	flowParked
	flowDone
)

// copyKind is how a flow moves its bytes, decided by what it reads.
type copyKind uint8

const (
	copySocket    copyKind = iota // a plain stream socket, by descriptor (sockcopy.go)
	copyDatagrams                 // a datagram socket, by descriptor (datagram.go)
	copyWaitFirst                 // a ReadWaiter: wait, then read into a buffer
	copyBuffered                  // anything else, through a buffer held while waiting
)

func (f *flow) init(p *Pipe, dir Direction, src, dst net.Conn) {
	f.p, f.dir, f.src, f.dst, f.fd = p, dir, src, dst, -1
	stream := IsStream(src) && IsStream(dst)
	_, waits := src.(ReadWaiter)
	switch raw := rawConn(src); {
	case raw != nil && stream:
		f.kind = copySocket
		f.socket.init(dst, rawConn(dst), raw)
		f.parkable = reactorSupported
	case raw != nil && !IsStream(src):
		f.kind = copyDatagrams
		f.socket.init(dst, nil, raw)
	case waits:
		f.kind = copyWaitFirst
	default:
		f.kind = copyBuffered
	}
	f.lastTick.Store(sweepTick.Load())
}

// run moves bytes until the flow ends or parks. It is what a worker runs,
// for a new flow and for a flow the reactor woke.
func (f *flow) run() {
	if f.p.isAborted() {
		f.end(ErrAborted)
		return
	}
	var err error
	switch f.kind {
	case copySocket:
		f.runSocket()
		return
	case copyDatagrams:
		err = f.copyDatagrams()
	case copyWaitFirst:
		err = f.copyWaitFirst()
	case copyBuffered:
		err = f.copyBuffered()
	}
	f.end(f.p.copyErr(err))
}

// runSocket copies from a plain stream socket, parking it when asked.
func (f *flow) runSocket() {
	if f.parkable {
		sweeper.add(f)
	}
	for {
		n, err := f.socket.next()
		if n > 0 {
			f.moved(n)
		}
		if err == nil && n > 0 {
			continue
		}
		if err != nil && f.detachRequested(err) {
			switch f.park() {
			case parkedOK, parkEnded:
				return // the reactor has it now, or it is over
			case parkRefused:
				continue // it waits in Go's poller from now on
			}
		}
		f.end(f.p.copyErr(err))
		return
	}
}

// moved counts n bytes moved, for the flow, the sweeper and the idle
// timeout.
func (f *flow) moved(n int) {
	f.n += int64(n)
	if t := sweepTick.Load(); f.lastTick.Load() != t {
		f.lastTick.Store(t)
	}
	f.p.touch()
}

// detachRequested reports whether err is the sweeper's wake-up rather than
// a fault or an abort.
func (f *flow) detachRequested(err error) bool {
	return f.detach.Load() && !f.p.isAborted() && errors.Is(err, os.ErrDeadlineExceeded)
}

// parkOutcome is what became of a flow that tried to park.
type parkOutcome uint8

const (
	parkedOK    parkOutcome = iota // the reactor holds it: the worker must let go
	parkRefused                    // it could not park, and waits in Go's poller from now on
	parkEnded                      // it was ended (an abort came while it parked)
)

// park hands the flow's socket to the reactor. The flow holds no buffer,
// pipe or callback while parked.
func (f *flow) park() parkOutcome {
	f.detach.Store(false)
	f.state.Store(flowParking)
	if hook := testHookParking.Load(); hook != nil {
		(*hook)(f)
	}
	_ = f.src.SetReadDeadline(time.Time{}) // clear the sweeper's wake-up
	f.socket.release()
	sweeper.remove(f)
	if !f.parkable {
		// Asked before it was found unable to park: it stays in Go's poller.
		return f.stayRunning()
	}
	if f.fd < 0 {
		f.fd = socketFD(f.socket.src)
	}
	if err := theReactor.arm(f); err != nil {
		f.parkable = false
		parkRefusedOnce(err)
		return f.stayRunning()
	}
	// Parked: the flow is no longer this goroutine's, unless it wins it
	// back. An abort that came while it was parking may have found it not
	// yet parked, and its deadline may have been cleared above.
	if f.p.isAborted() && f.state.CompareAndSwap(flowParked, flowRunning) {
		f.end(ErrAborted)
		return parkEnded
	}
	return parkedOK
}

// stayRunning takes a flow that did not park back to running, in Go's
// poller. An abort may have come while it was parking, and its deadline
// may have been cleared: it looks for one after the store, as park does.
func (f *flow) stayRunning() parkOutcome {
	f.state.Store(flowRunning)
	if f.p.isAborted() {
		f.end(ErrAborted)
		return parkEnded
	}
	return parkRefused
}

// resume is the reactor's: the parked socket has bytes (or news). If it
// wins the flow, a worker runs it.
func (f *flow) resume() {
	if f.state.CompareAndSwap(flowParked, flowRunning) {
		flowWorkers.Submit(f)
	}
}

// cancelParked ends the flow if it is parked, for an abort.
func (f *flow) cancelParked() {
	if f.state.CompareAndSwap(flowParked, flowRunning) {
		f.end(ErrAborted)
	}
}

// end finishes the flow, once, from its owner: it leaves the sweeper and
// the reactor before the connections can be closed, gives back what it
// holds, and reports.
func (f *flow) end(err error) {
	if f.kind == copySocket {
		sweeper.remove(f)
		if f.reg.id != 0 {
			theReactor.forget(f)
		}
		f.socket.release()
	}
	f.state.Store(flowDone)
	f.p.flowEnded(f, err)
}

// requestDetach asks a flow waiting in Go's poller to park: its read wakes
// with a deadline error, which the flow takes as the request. The sweeper
// calls it.
func (f *flow) requestDetach() {
	if f.state.Load() != flowRunning || f.detach.Load() {
		return
	}
	f.detach.Store(true)
	_ = f.src.SetReadDeadline(time.Unix(1, 0))
}

// testHookParking, when set by a test, runs as a flow parks, right after
// its state became flowParking, before the sweeper's deadline is cleared.
var testHookParking atomic.Pointer[func(*flow)]

// rawConn returns the socket under a connection the engine may read or
// write by descriptor: TCP, unix stream, and UDP sockets, and sockets
// detached by DetachSocket. It returns nil for anything else (TLS,
// wrappers, unixgram).
func rawConn(c net.Conn) syscall.RawConn {
	if !rawSupported {
		return nil
	}
	var sc syscall.Conn
	switch conn := c.(type) {
	case *socketConn:
		return conn.rc
	case *net.TCPConn:
		sc = conn
	case *net.UDPConn:
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
