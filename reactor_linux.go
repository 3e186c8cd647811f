// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

//go:build linux

package godist

import (
	"os"
	"sync"
	"sync/atomic"
	"syscall"
)

// The reactor holds the sockets of parked flows: one epoll instance of its
// own, watched through Go's poller like any socket, so that it needs no
// thread of its own either. Each parked socket is registered one-shot:
// when it has bytes (or an EOF or error) the reactor hands its flow to a
// worker, and the flow registers again the next time it parks.

const reactorSupported = true

type reactor struct {
	once    sync.Once
	err     error
	epfd    int
	started atomic.Bool // the loop runs

	mu    sync.Mutex
	flows map[int32]*flow // parked flows by socket descriptor
}

var theReactor reactor

func (r *reactor) start() {
	r.flows = make(map[int32]*flow)
	r.epfd, r.err = syscall.EpollCreate1(syscall.EPOLL_CLOEXEC)
	if r.err != nil {
		return
	}
	if r.err = syscall.SetNonblock(r.epfd, true); r.err != nil {
		return
	}
	f := os.NewFile(uintptr(r.epfd), "godist reactor")
	rc, err := f.SyscallConn()
	if err != nil {
		r.err = err
		return
	}
	r.started.Store(true)
	go r.loop(rc)
}

// arm registers a parking flow's socket.
func (r *reactor) arm(f *flow) error {
	r.once.Do(r.start)
	if r.err != nil {
		return r.err
	}
	fd := int32(f.fd)
	r.mu.Lock()
	r.flows[fd] = f
	r.mu.Unlock()
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN | syscall.EPOLLRDHUP | syscall.EPOLLONESHOT, Fd: fd}
	err := syscall.EpollCtl(r.epfd, syscall.EPOLL_CTL_MOD, f.fd, &ev)
	if err == syscall.ENOENT {
		err = syscall.EpollCtl(r.epfd, syscall.EPOLL_CTL_ADD, f.fd, &ev)
	}
	if err != nil {
		r.mu.Lock()
		delete(r.flows, fd)
		r.mu.Unlock()
	}
	return err
}

// forget takes an ending flow's socket out of the reactor, before the
// socket is closed and its descriptor can be reused.
func (r *reactor) forget(f *flow) {
	_ = syscall.EpollCtl(r.epfd, syscall.EPOLL_CTL_DEL, f.fd, nil)
	r.mu.Lock()
	if r.flows[int32(f.fd)] == f {
		delete(r.flows, int32(f.fd))
	}
	r.mu.Unlock()
}

// loop hands flows whose sockets woke to workers. It waits in Go's poller
// for the epoll descriptor to be readable, then takes what it holds
// without blocking. It runs for the life of the process, holding one
// parked goroutine, once any flow has parked.
func (r *reactor) loop(rc syscall.RawConn) {
	events := make([]syscall.EpollEvent, 128)
	woken := make([]*flow, 0, len(events))
	for {
		err := rc.Read(func(uintptr) bool {
			for {
				n, err := syscall.EpollWait(r.epfd, events, 0)
				if err == syscall.EINTR {
					continue
				}
				if n <= 0 {
					return false // nothing waiting: wait for the next wake-up
				}
				woken = woken[:0]
				r.mu.Lock()
				for _, ev := range events[:n] {
					if f := r.flows[ev.Fd]; f != nil {
						woken = append(woken, f)
					}
				}
				r.mu.Unlock()
				for _, f := range woken {
					f.resume()
				}
				if n < len(events) {
					return false
				}
			}
		})
		if err != nil {
			return
		}
	}
}

// running reports whether the reactor's loop runs and holds its epoll
// descriptor.
func (r *reactor) running() bool {
	return r.started.Load()
}

// socketFD returns the descriptor of a socket.
func socketFD(rc syscall.RawConn) int {
	fd := -1
	_ = rc.Control(func(s uintptr) { fd = int(s) })
	return fd
}
