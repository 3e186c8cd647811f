// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

//go:build linux

package pipe

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"
)

// The reactor holds the sockets of parked flows: an epoll instance of its
// own, watched through Go's poller like any socket, so that it needs no
// thread of its own either. Each parked socket is registered one-shot
// under an id of its own; when it has bytes (or an EOF or error) the
// reactor hands the flow registered under that id to a worker, and the
// flow registers again, under a new id, the next time it parks.
//
// Rules:
//   - The table of parked flows, the epoll set and a flow's passage to
//     flowParked change together, under mu (arm). A wake-up looks the id up
//     under mu, so it sees a registration either whole or not at all.
//   - Ids are never reused, and never a descriptor number: they start at
//     firstID, above every descriptor. A wake-up whose id is not in the
//     table (the flow was ended by an abort, or the event is left over
//     from a closed socket) is dropped.
//   - The reactor runs while it is needed: from the first arm after it was
//     stopped, until nothing holds the engine (Acquire) and no flow is
//     parked. Stopping closes the epoll instance, which ends its loop.
//   - If creating the instance fails, arms fail (their flows stay in Go's
//     poller for good) and no new attempt is made for reactorRetry. If the
//     loop fails, every parked flow is handed back to a worker, so none is
//     stranded, and the failure is logged.
const reactorSupported = true

// reactorRetry is how long after a failure the reactor is not tried again.
const reactorRetry = 30 * time.Second

// reactorSyscalls are the system calls the reactor makes, replaceable
// as a whole so that tests can make them fail while the engine runs.
type reactorSyscalls struct {
	epollCreate func(flags int) (int, error)
	epollCtl    func(epfd, op, fd int, event *syscall.EpollEvent) error
	epollWait   func(epfd int, events []syscall.EpollEvent, msec int) (int, error)
	setNonblock func(fd int, nonblocking bool) error
}

var realSyscalls = reactorSyscalls{
	epollCreate: syscall.EpollCreate1,
	epollCtl:    syscall.EpollCtl,
	epollWait:   syscall.EpollWait,
	setNonblock: syscall.SetNonblock,
}

var sys atomic.Pointer[reactorSyscalls]

// firstID is the first registration's id: 2^32, above every descriptor
// number (an int32), so that no id is ever a descriptor's number.
// Registrations were once keyed by descriptor; an event carrying a bare
// descriptor number can never reach a flow.
const firstID = 1 << 32

func init() { sys.Store(&realSyscalls) }

type reactor struct {
	mu      sync.Mutex
	users   int              // holders of the engine (Acquire)
	inst    *epollInstance   // nil while stopped
	epochs  uint64           // instances made so far; an instance's epoch is its number
	ids     uint64           // registrations made so far; a registration's id is firstID + its number
	parked  map[uint64]*flow // parked flows by registration id
	downAt  time.Time        // when creating an instance last failed
	downErr error            // and why, until an instance is made again
	retry   time.Duration    // how long after a failure not to try again: reactorRetry, shorter in tests
}

// epollInstance is one epoll set and its loop.
type epollInstance struct {
	fd    int
	file  *os.File // the fd, registered with Go's poller
	epoch uint64
}

// registration is a flow's place in the reactor: owner only, like the
// flow's other fields.
type registration struct {
	id    uint64 // its current or last registration's id; 0 if never armed
	epoch uint64 // the instance its socket was added to; 0 if none
}

var theReactor = reactor{parked: make(map[uint64]*flow), retry: reactorRetry}

// errReactorDown is why a flow cannot park while the reactor is failing.
var errReactorDown = errors.New("the reactor is unavailable")

// arm registers a parking flow's socket and moves the flow to flowParked,
// together, or reports why it could not.
func (r *reactor) arm(f *flow) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.inst == nil {
		if err := r.startLocked(); err != nil {
			return err
		}
	}
	in := r.inst
	r.ids++
	id := firstID + r.ids
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN | syscall.EPOLLRDHUP | syscall.EPOLLONESHOT}
	setEventID(&ev, id)
	var err error
	if f.reg.epoch == in.epoch {
		// Added before and disarmed by its last wake-up: arm it again.
		if err = sys.Load().epollCtl(in.fd, syscall.EPOLL_CTL_MOD, f.fd, &ev); err == syscall.ENOENT {
			f.reg.epoch = 0
		}
	}
	if f.reg.epoch != in.epoch {
		err = sys.Load().epollCtl(in.fd, syscall.EPOLL_CTL_ADD, f.fd, &ev)
	}
	if err != nil {
		return fmt.Errorf("adding the socket to the reactor's epoll set: %w", err)
	}
	f.reg = registration{id: id, epoch: in.epoch}
	r.parked[id] = f
	f.state.Store(flowParked)
	return nil
}

// forget takes an ending flow's socket out of the reactor, before the
// socket can be closed and its descriptor reused.
func (r *reactor) forget(f *flow) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.parked[f.reg.id] == f {
		delete(r.parked, f.reg.id)
	}
	if in := r.inst; in != nil && f.reg.epoch == in.epoch {
		_ = sys.Load().epollCtl(in.fd, syscall.EPOLL_CTL_DEL, f.fd, nil)
	}
	f.reg = registration{}
	r.stopIfUnusedLocked()
}

// startLocked makes a new epoll instance and starts its loop, unless
// making one failed less than reactorRetry ago.
func (r *reactor) startLocked() error {
	if r.downErr != nil && time.Since(r.downAt) < r.retry {
		return fmt.Errorf("%w since %s: %w", errReactorDown, r.downAt.Format(time.RFC3339), r.downErr)
	}
	in, rc, err := newEpollInstance()
	if err != nil {
		first := r.downErr == nil
		r.downAt, r.downErr = time.Now(), err
		if first {
			logger().Warn("cannot park idle connections: each idle connection keeps its goroutines until this works again",
				zap.Error(err), zap.Duration("retry_after", r.retry))
		}
		return fmt.Errorf("%w: %w", errReactorDown, err)
	}
	if r.downErr != nil {
		logger().Info("parking idle connections works again", zap.NamedError("after", r.downErr))
		r.downErr = nil
	}
	r.epochs++
	in.epoch = r.epochs
	r.inst = in
	go r.loop(in, rc)
	return nil
}

// newEpollInstance makes an epoll set registered with Go's poller. On
// failure it leaves nothing open.
func newEpollInstance() (*epollInstance, syscall.RawConn, error) {
	fd, err := sys.Load().epollCreate(syscall.EPOLL_CLOEXEC)
	if err != nil {
		return nil, nil, fmt.Errorf("epoll_create1: %w", err)
	}
	if err := sys.Load().setNonblock(fd, true); err != nil {
		_ = syscall.Close(fd)
		return nil, nil, fmt.Errorf("making the epoll descriptor non-blocking: %w", err)
	}
	file := os.NewFile(uintptr(fd), "godist reactor")
	rc, err := file.SyscallConn()
	if err != nil {
		_ = file.Close()
		return nil, nil, err
	}
	return &epollInstance{fd: fd, file: file}, rc, nil
}

// stopIfUnusedLocked stops the running instance if nothing holds the
// engine and no flow is parked. It only tells the loop, which closes the
// instance itself once its wait has returned: closing a file waits for
// its readers, and the loop may be waiting for mu.
func (r *reactor) stopIfUnusedLocked() {
	if r.inst == nil || r.users > 0 || len(r.parked) > 0 {
		return
	}
	in := r.inst
	r.inst = nil
	_ = in.file.SetReadDeadline(time.Unix(1, 0)) // wakes the loop's wait, which then sees it was stopped
}

// loop hands the flows whose sockets woke to workers. It waits in Go's
// poller for the epoll descriptor to be readable, then takes what it holds
// without blocking. It ends when its instance is closed (stopped) or
// fails.
func (r *reactor) loop(in *epollInstance, rc syscall.RawConn) {
	events := make([]syscall.EpollEvent, 128)
	woken := make([]*flow, 0, len(events))
	var waitErr error
	err := rc.Read(func(uintptr) bool {
		for {
			n, err := sys.Load().epollWait(in.fd, events, 0)
			if err == syscall.EINTR {
				continue
			}
			if err != nil {
				waitErr = err
				return true
			}
			if n <= 0 {
				return false // nothing waiting: wait for the next wake-up
			}
			woken = woken[:0]
			r.mu.Lock()
			for i := range events[:n] {
				id := eventID(&events[i])
				if f := r.parked[id]; f != nil {
					delete(r.parked, id)
					woken = append(woken, f)
				}
			}
			r.stopIfUnusedLocked()
			stopped := r.inst != in
			r.mu.Unlock()
			for _, f := range woken {
				f.resume()
			}
			clear(woken)
			if stopped {
				return true
			}
			if n < len(events) {
				return false
			}
		}
	})
	if err == nil {
		err = waitErr
	}
	r.ended(in, err)
}

// ended closes in after its loop ended. If in was not stopped, it failed:
// every flow parked in it goes back to a worker.
func (r *reactor) ended(in *epollInstance, err error) {
	r.mu.Lock()
	var stranded []*flow
	failed := r.inst == in
	if failed {
		r.inst = nil
		r.downAt, r.downErr = time.Now(), fmt.Errorf("waiting for parked sockets: %w", err)
		for id, f := range r.parked {
			stranded = append(stranded, f)
			delete(r.parked, id)
		}
	}
	retry := r.retry
	r.mu.Unlock()
	_ = in.file.Close() // its loop, the only reader, has returned
	if failed {
		logger().Error("the reactor of parked connections failed: they go back to waiting on their own goroutines",
			zap.Error(err), zap.Int("parked", len(stranded)), zap.Duration("retry_after", retry))
		for _, f := range stranded {
			f.resume()
		}
	}
}

// acquire and release count the engine's holders.
func (r *reactor) acquire() {
	r.mu.Lock()
	r.users++
	r.mu.Unlock()
}

func (r *reactor) release() {
	r.mu.Lock()
	r.users--
	r.stopIfUnusedLocked()
	r.mu.Unlock()
}

// status reports the number of parked flows and whether an instance runs.
func (r *reactor) status() (parked int, running bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.parked), r.inst != nil
}

// The 64 bits of an epoll event's data hold a registration id: the Fd and
// Pad fields of syscall.EpollEvent are its two halves.
func setEventID(ev *syscall.EpollEvent, id uint64) {
	ev.Fd, ev.Pad = int32(uint32(id)), int32(uint32(id>>32)) //nolint:gosec // bit-for-bit halves of the id
}

func eventID(ev *syscall.EpollEvent) uint64 {
	return uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
}

// socketFD returns the descriptor of a socket, or -1.
func socketFD(rc syscall.RawConn) int {
	fd := -1
	_ = rc.Control(func(s uintptr) { fd = int(s) })
	return fd
}
