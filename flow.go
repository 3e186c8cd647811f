// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"errors"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// A flow is one direction of a session: the bytes from one connection to
// the other. It runs on a pooled worker goroutine while it has bytes to
// move or waits on its socket in Go's poller, and, where the platform has
// a reactor (Linux), a flow whose socket has been idle for a moment parks
// it there and gives its goroutine back: an idle connection then holds no
// goroutine but its handler's. When the socket has bytes again, the
// reactor hands the flow to a worker, and it goes on where it left off.
//
// A flow is owned by exactly one party at a time, as its state says: the
// worker running it (flowRunning), the reactor (flowParked), or nobody
// once it has ended (flowDone). Ownership passes only by compare-and-swap,
// so a flow parked at the moment its session is aborted is ended exactly
// once, by whichever side wins.
type flow struct {
	s    *session
	from side // where the bytes come from: sideClient for the upward flow

	srcConn  net.Conn // read deadlines go here
	src      endpoint
	dst      endpoint
	copier   *socketCopy // &socket when src is a plain socket, else nil
	socket   socketCopy
	parkable bool // src is a socket the reactor can hold
	fd       int  // src's descriptor, taken when the flow first parks (owner only)

	state    atomic.Int32
	detach   atomic.Bool   // the sweeper asks it to park
	armed    bool          // registered with the reactor (owner only)
	lastTick atomic.Uint32 // the sweeper's tick when a byte last moved
	started  bool          // the prefetched bytes were forwarded (owner only)
	n        int64         // bytes moved (owner only)

	inList links[flow] // its place in activeFlows, guarded by its lock
}

func (f *flow) links() *links[flow] { return &f.inList }

const (
	flowRunning int32 = iota
	flowParked
	flowDone
)

func (f *flow) init(s *session, from side, srcConn net.Conn, src, dst endpoint) {
	f.s, f.from, f.srcConn, f.src, f.dst, f.fd = s, from, srcConn, src, dst, -1
	if src.raw != nil && isStream(src.conn) && isStream(dst.conn) {
		f.socket.init(dst, src.raw)
		f.copier = &f.socket
		f.parkable = reactorSupported
	}
	f.lastTick.Store(sweepTick.Load())
}

// run moves bytes until the flow ends or parks. It is what a worker runs.
func (f *flow) run() {
	if f.s.aborted.Load() {
		f.end(errAborted)
		return
	}
	activeFlows.add(f)
	if !f.started {
		f.started = true
		if f.from == sideClient {
			n, err := f.s.forwardPrefetched()
			f.n += n
			if err != nil {
				f.end(err)
				return
			}
		}
	}
	if f.copier == nil {
		n, err := copyStream(f.dst, f.src, f.s)
		f.n += n
		f.end(err)
		return
	}
	for {
		n, err := f.copier.next()
		if n > 0 {
			f.n += int64(n)
			f.touch()
		}
		if err == nil && n > 0 {
			continue
		}
		if err != nil && f.detachRequested(err) {
			if f.park() {
				return // the reactor has it now; this worker is free
			}
			if f.state.Load() != flowRunning {
				return // ended or taken over while parking
			}
			continue
		}
		f.end(f.s.wrapCopyErr(err))
		return
	}
}

// touch records that bytes moved, for the sweeper and the idle timeout.
func (f *flow) touch() {
	if t := sweepTick.Load(); f.lastTick.Load() != t {
		f.lastTick.Store(t)
	}
	f.s.touch()
}

// detachRequested reports whether err is the sweeper's wake-up rather than
// a fault or an abort.
func (f *flow) detachRequested(err error) bool {
	return f.detach.Load() && !f.s.aborted.Load() && errors.Is(err, os.ErrDeadlineExceeded)
}

// park hands the flow's socket to the reactor and reports whether it did;
// if it did not, the flow goes on waiting in Go's poller.
func (f *flow) park() bool {
	f.detach.Store(false)
	_ = f.srcConn.SetReadDeadline(time.Time{}) // clear the sweeper's wake-up	f.copier.release() // hold nothing while parked
	activeFlows.remove(f)
	if f.fd < 0 {
		f.fd = socketFD(f.src.raw)
	}
	// armed is set first: once the socket is armed the reactor may hand
	// the flow to another worker before arm even returns.
	f.armed = true
	f.state.Store(flowParked)
	if err := theReactor.arm(f); err != nil {
		if f.state.CompareAndSwap(flowParked, flowRunning) {
			f.armed = false
			activeFlows.add(f)
		}
		return false
	}
	// An abort that came while parking may have found the flow running
	// and set a deadline that the line above then cleared: look again.
	if f.s.aborted.Load() && f.state.CompareAndSwap(flowParked, flowRunning) {
		f.end(errAborted)
	}
	return true
}

// resume is the reactor's: the parked socket has bytes (or news).
func (f *flow) resume() {
	if f.state.CompareAndSwap(flowParked, flowRunning) {
		flowWorkers.submit(f)
	}
}

// cancelParked ends the flow if it is parked, for an abort.
func (f *flow) cancelParked() {
	if f.state.CompareAndSwap(flowParked, flowRunning) {
		f.end(errAborted)
	}
}

// end finishes the flow, once, from its owner.
func (f *flow) end(err error) {
	activeFlows.remove(f)
	if f.armed {
		theReactor.forget(f) // before the session can close the socket
		f.armed = false
	}
	if f.copier != nil {
		f.copier.release()
	}
	f.state.Store(flowDone)
	f.s.flowEnded(f, err)
}

// requestDetach asks a flow idle in Go's poller to park: its read wakes
// with a deadline error, which the flow takes as the request.
func (f *flow) requestDetach() {
	if !f.parkable || f.state.Load() != flowRunning || f.detach.Load() {
		return
	}
	f.detach.Store(true)
	_ = f.srcConn.SetReadDeadline(time.Unix(1, 0))
}

// The sweeper parks flows idle for a moment: every sweepInterval it looks
// at the flows that can park and are not parked, and asks those that moved
// nothing for parkAfterTicks ticks (25 to 50 ms) to park. Parked flows are
// not looked at, so a process with many idle connections costs the sweeper
// nothing. It runs while such flows exist, and stops when the last one
// parks or ends.
const (
	sweepInterval  = 25 * time.Millisecond
	parkAfterTicks = 2
)

// sweepTick counts the sweeper's rounds: a clock coarse enough that
// reading it costs a flow nothing on every chunk.
var sweepTick atomic.Uint32

// flowRegistry lists the flows that could park and are running, across
// handlers and configs, for the sweeper: an intrusive list, so that adding
// and removing a flow allocates nothing.
type flowRegistry struct {
	mu       sync.Mutex
	list     intrusiveList[flow, *flow]
	sweeping bool
}

var activeFlows flowRegistry

// add lists f; its owner calls it when f starts or resumes.
func (r *flowRegistry) add(f *flow) {
	if !f.parkable {
		return
	}
	r.mu.Lock()
	r.list.push(f)
	if !r.sweeping {
		r.sweeping = true
		go r.sweep()
	}
	r.mu.Unlock()
}

// remove unlists f; its owner calls it when f parks or ends.
func (r *flowRegistry) remove(f *flow) {
	if !f.parkable {
		return
	}
	r.mu.Lock()
	r.list.remove(f)
	r.mu.Unlock()
}

// sweep is the sweeper's loop. It ends when no flow is listed.
func (r *flowRegistry) sweep() {
	ticker := time.NewTicker(sweepInterval)
	defer ticker.Stop()
	var idle []*flow
	for range ticker.C {
		tick := sweepTick.Add(1)
		r.mu.Lock()
		if r.list.n == 0 {
			r.sweeping = false
			r.mu.Unlock()
			return
		}
		idle = idle[:0]
		r.list.each(func(f *flow) {
			if tick-f.lastTick.Load() >= parkAfterTicks {
				idle = append(idle, f)
			}
		})
		r.mu.Unlock()
		for _, f := range idle {
			f.requestDetach()
		}
	}
}

// workerPool runs flows on goroutines that are kept for reuse, so that a
// new flow starts on a goroutine whose stack has already grown to what a
// flow needs, instead of growing (copying) a fresh one.
type workerPool[T any] struct {
	work    chan T
	idle    atomic.Int32
	maxIdle int32
	run     func(T)
}

func newWorkerPool[T any](maxIdle int32, run func(T)) *workerPool[T] {
	return &workerPool[T]{work: make(chan T), maxIdle: maxIdle, run: run}
}

// submit runs task on an idle worker, or on a new one if none is idle.
func (p *workerPool[T]) submit(task T) {
	select {
	case p.work <- task:
	default:
		go p.worker(task)
	}
}

// worker runs tasks, waiting for the next while fewer than maxIdle others
// wait, and ends otherwise.
func (p *workerPool[T]) worker(task T) {
	for {
		p.run(task)
		if p.idle.Add(1) > p.maxIdle {
			p.idle.Add(-1)
			return
		}
		task = <-p.work
		p.idle.Add(-1)
	}
}

// The worker pools: flows, and dials (whose workers grow deeper stacks,
// which flows should not inherit). Set in init: a flow's run hands flows
// to the pool in turn.
var (
	flowWorkers *workerPool[*flow]
	dialWorkers *workerPool[*session]
)

func init() {
	flowWorkers = newWorkerPool(64, (*flow).run)
	dialWorkers = newWorkerPool(16, (*session).establish)
}
