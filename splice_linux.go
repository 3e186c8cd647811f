// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

//go:build linux

package godist

import (
	"errors"
	"sync"
	"syscall"
)

// Zero-copy piping on Linux: bytes move socket -> kernel pipe -> socket by
// splice(2) and never enter user space.
//
// Go's own splice (io.Copy between two *net.TCPConn) takes a pipe before it
// waits for the source to become readable and holds it while the connection
// is idle: two more descriptors per direction for the life of every quiet
// connection, which runs a process out of descriptors at a few thousand
// connections. Here the pipe is taken only inside the readiness callback,
// once the socket is readable, and put back as soon as a splice finds the
// socket empty, so an idle connection holds its two sockets and nothing
// else. A pipe stays taken only while bytes sit in it waiting for a slow
// receiver, which bounds what one connection buffers to the pipe's size.

const (
	// pipeSize is the capacity asked of each pipe, and the most one splice
	// moves. Larger pipes mean fewer system calls per byte in bulk; the
	// kernel only commits pages for bytes actually in flight.
	pipeSize = 1 << 20

	// maxIdlePipes bounds the pool of pipes kept for reuse. Only
	// connections in the middle of moving bytes hold one, so a few serve
	// many connections; more would hold descriptors for nothing.
	maxIdlePipes = 32
)

// errSpliceUnavailable means no pipe could be made, or the sockets do not
// support splice; nothing was lost, and copying can go on through a buffer.
var errSpliceUnavailable = errors.New("splice unavailable")

type kernelPipe struct {
	r, w int // read and write ends
}

type pipePool struct {
	mu   sync.Mutex
	free []*kernelPipe
}

var pipes pipePool

func (pp *pipePool) get() (*kernelPipe, error) {
	pp.mu.Lock()
	if n := len(pp.free); n > 0 {
		p := pp.free[n-1]
		pp.free = pp.free[:n-1]
		pp.mu.Unlock()
		return p, nil
	}
	pp.mu.Unlock()

	var fds [2]int
	if err := syscall.Pipe2(fds[:], syscall.O_CLOEXEC|syscall.O_NONBLOCK); err != nil {
		return nil, err
	}
	// Best effort: a smaller pipe (the limit in /proc/sys/fs/pipe-max-size,
	// or a user over pipe-user-pages-soft) only means more system calls.
	_, _, errno := syscall.Syscall(syscall.SYS_FCNTL, uintptr(fds[0]), syscall.F_SETPIPE_SZ, pipeSize)
	_ = errno
	return &kernelPipe{r: fds[0], w: fds[1]}, nil
}

// put returns an empty pipe for reuse.
func (pp *pipePool) put(p *kernelPipe) {
	pp.mu.Lock()
	if len(pp.free) < maxIdlePipes {
		pp.free = append(pp.free, p)
		pp.mu.Unlock()
		return
	}
	pp.mu.Unlock()
	p.close()
}

func (p *kernelPipe) close() {
	_ = syscall.Close(p.r)
	_ = syscall.Close(p.w)
}

// spliceNonblock moves up to n bytes from in to out without blocking,
// retrying on EINTR.
func spliceNonblock(in, out, n int) (int, error) {
	for {
		m, err := syscall.Splice(in, nil, out, nil, n, spliceFlags)
		if err != syscall.EINTR {
			return int(m), err
		}
	}
}

const spliceFlags = 0x1 | 0x2 // SPLICE_F_MOVE | SPLICE_F_NONBLOCK

// spliceStream copies from src to dst through a kernel pipe until src's
// EOF (a nil error) or an error. It returns errSpliceUnavailable, having
// moved nothing since the last successful write, if no pipe can be had or
// the sockets refuse splice: the caller goes on another way.
func spliceStream(dst, src syscall.RawConn, s *session) (total int64, err error) {
	var p *kernelPipe
	inPipe := 0 // bytes read into p and not yet written out
	defer func() {
		if p == nil {
			return
		}
		if inPipe > 0 {
			p.close() // bytes no one will read; never reuse such a pipe
		} else {
			pipes.put(p)
		}
	}()

	for {
		var n int
		var serr error
		err := src.Read(func(fd uintptr) bool {
			if p == nil {
				if p, serr = pipes.get(); serr != nil {
					serr = errSpliceUnavailable
					return true
				}
			}
			n, serr = spliceNonblock(int(fd), p.w, pipeSize)
			if serr == syscall.EAGAIN {
				// The socket is empty: give the pipe back before waiting.
				pipes.put(p)
				p = nil
				return false
			}
			return true
		})
		if err != nil {
			return total, err
		}
		if serr != nil {
			if serr == syscall.EINVAL && total == 0 {
				serr = errSpliceUnavailable
			}
			return total, serr
		}
		if n == 0 {
			return total, nil // EOF
		}
		inPipe = n

		for inPipe > 0 {
			var m int
			var werr error
			err := dst.Write(func(fd uintptr) bool {
				m, werr = spliceNonblock(p.r, int(fd), inPipe)
				return werr != syscall.EAGAIN
			})
			if err == nil {
				err = werr
			}
			if err != nil {
				return total, err
			}
			inPipe -= m
			total += int64(m)
		}
		s.touch()
	}
}

// drain closes the pipes kept for reuse, giving their descriptors back.
func (pp *pipePool) drain() {
	pp.mu.Lock()
	free := pp.free
	pp.free = nil
	pp.mu.Unlock()
	for _, p := range free {
		p.close()
	}
}
