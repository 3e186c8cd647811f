// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

//go:build linux

package pipe

import (
	"sync"
	"syscall"
	"time"
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

	// maxIdlePipes bounds the pool of empty pipes kept for reuse. Only
	// connections in the middle of moving bulk hold one, so a few serve
	// many connections; more would hold descriptors for nothing.
	maxIdlePipes = 16

	// pipeIdleTrim is how long the pool may go without handing out a pipe
	// before it closes the ones it keeps: after a burst of bulk traffic the
	// process goes back to holding no pipe at all.
	pipeIdleTrim = time.Second
)

// kernelPipe is a pipe's two descriptors. Each pipe holds two descriptors
// of the budget (budget.go) from pipe2 to close.
type kernelPipe struct {
	r, w int // read and write ends
}

// pipePool keeps empty pipes for reuse. Rules: a pipe in the pool is
// empty; a pipe with bytes no one will read is closed, never pooled; the
// pool trims itself (closes what it keeps) once it has handed out nothing
// for pipeIdleTrim, with a timer that runs only while it keeps pipes.
type pipePool struct {
	mu       sync.Mutex
	free     []*kernelPipe
	gets     uint64      // pipes handed out, ever
	trimGets uint64      // gets at the last trim check
	trimmer  *time.Timer // runs while free is not empty
}

var pipes pipePool

// get returns an empty pipe, from the pool or new. A new pipe needs two
// descriptors from the budget; without them it fails, and the copy goes
// on through a buffer.
func (pp *pipePool) get() (*kernelPipe, error) {
	pp.mu.Lock()
	pp.gets++
	if n := len(pp.free); n > 0 {
		p := pp.free[n-1]
		pp.free = pp.free[:n-1]
		pp.mu.Unlock()
		return p, nil
	}
	pp.mu.Unlock()

	if !Descriptors.Acquire(2) {
		return nil, errNoDescriptors
	}
	var fds [2]int
	if err := syscall.Pipe2(fds[:], syscall.O_CLOEXEC|syscall.O_NONBLOCK); err != nil {
		Descriptors.Release(2)
		return nil, err
	}
	openPipes.Add(1)
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
		if pp.trimmer == nil {
			pp.trimGets = pp.gets
			pp.trimmer = time.AfterFunc(pipeIdleTrim, pp.trim)
		}
		pp.mu.Unlock()
		return
	}
	pp.mu.Unlock()
	p.close()
}

// trim closes the pooled pipes if none was handed out since it last ran,
// and runs again later if it kept them.
func (pp *pipePool) trim() {
	pp.mu.Lock()
	var closing []*kernelPipe
	if pp.gets == pp.trimGets {
		closing, pp.free = pp.free, nil
	}
	pp.trimGets = pp.gets
	if len(pp.free) > 0 {
		pp.trimmer.Reset(pipeIdleTrim)
	} else {
		pp.trimmer = nil
	}
	pp.mu.Unlock()
	for _, p := range closing {
		p.close()
	}
}

// drain closes the pooled pipes at once.
func (pp *pipePool) drain() {
	pp.mu.Lock()
	free := pp.free
	pp.free = nil
	pp.mu.Unlock()
	for _, p := range free {
		p.close()
	}
}

// close closes both ends and gives their descriptors back to the budget.
func (p *kernelPipe) close() {
	_ = syscall.Close(p.r)
	_ = syscall.Close(p.w)
	openPipes.Add(-1)
	Descriptors.Release(2)
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

// spliceSupported: splice(2) moves bytes between sockets through a pipe.
const spliceSupported = true

// spliceChunk waits until the socket is readable, splices what it has into
// a pipe and from the pipe into the destination. It returns
// errSpliceUnavailable, having moved nothing, when no pipe can be had or
// the sockets refuse splice. A chunk smaller than the small-message buffer
// ends the bulk mode.
func (c *socketCopy) spliceChunk() (int, error) {
	c.n, c.err = 0, nil
	err := c.src.Read(c.on(opReadIntoPipe))
	if err == nil {
		err = c.err
	}
	if err != nil {
		return 0, err
	}
	n := c.n
	if n == 0 {
		return 0, nil // EOF
	}
	c.inPipe = n
	for c.inPipe > 0 {
		c.n, c.err = 0, nil
		err := c.dstRaw.Write(c.on(opWriteFromPipe))
		if err == nil {
			err = c.err
		}
		if err != nil {
			return n - c.inPipe, err
		}
		c.inPipe -= c.n
	}
	if n < smallBufferSize {
		c.splicing = false
		pipes.put(c.pipe) // empty; the buffer mode does not need it
		c.pipe = nil
	}
	return n, nil
}

// pipeRead is the readiness callback of the bulk mode: it takes a pipe if
// it has none, and splices the socket's bytes into it.
func (c *socketCopy) pipeRead(fd uintptr) bool {
	if c.pipe == nil {
		p, err := pipes.get()
		if err != nil {
			// No descriptor to spare, or none at all: nothing was read.
			c.err = errSpliceUnavailable
			return true
		}
		c.pipe = p
	}
	c.n, c.err = spliceNonblock(int(fd), c.pipe.w, pipeSize)
	switch c.err {
	case syscall.EAGAIN:
		// The socket is empty: give the pipe back before waiting.
		pipes.put(c.pipe)
		c.pipe = nil
		return false
	case syscall.EINVAL:
		c.err = errSpliceUnavailable // a socket that does not splice
	}
	return true
}

// pipeWrite is the writability callback of the bulk mode: it splices what
// the pipe holds into the destination socket.
func (c *socketCopy) pipeWrite(fd uintptr) bool {
	c.n, c.err = spliceNonblock(c.pipe.r, int(fd), c.inPipe)
	return c.err != syscall.EAGAIN
}

// MaxPipeBytes is the most a flow holds in a kernel pipe for a receiver
// that does not read.
const MaxPipeBytes = pipeSize
