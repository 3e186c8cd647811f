// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package pipe

import (
	"errors"
	"net"
	"sync"
	"syscall"
)

// Copying from a socket, the way that suits the traffic, as HAProxy's
// splice-auto does. Small messages (a request, a ping, a protocol's
// back-and-forth) go through a 16 KiB buffer: a read and a write are the
// cheapest way to move a few bytes. Once a read fills the buffer, the
// traffic is bulk, and bytes move socket to kernel pipe to socket by
// splice(2), never entering user space, until a splice finds less than a
// buffer's worth waiting; then it is back to the buffer.
//
// Either way nothing is held while the socket is idle: the buffer or the
// pipe is taken inside the readiness callback, once the socket has bytes,
// and given back as soon as a read finds it empty. A pipe stays taken only
// while bytes sit in it waiting for a slow receiver, and while the traffic
// stays bulk; a flow that parks gives everything back first (release).

// errSpliceUnavailable means no pipe could be made, or the sockets do not
// support splice; nothing was lost, and copying goes on through a buffer.
var errSpliceUnavailable = errors.New("splice unavailable")

// smallBufferSize is the buffer of the small-message mode, and the most a
// splice may move and still count as small.
const smallBufferSize = 16 << 10

var smallBuffers = sync.Pool{New: func() any {
	b := make([]byte, smallBufferSize)
	return &b
}}

// socketCopy copies one direction from a socket. Its one readiness
// callback dispatches on op; it is made when the copy starts moving bytes
// and dropped when its flow parks, so that reading allocates nothing and a
// parked flow holds no closure. Only its flow's owner uses it.
type socketCopy struct {
	dst    net.Conn        // written to in the buffer mode
	dstRaw syscall.RawConn // spliced to in the bulk mode; nil if dst is not a plain socket
	src    syscall.RawConn

	spliceOK bool // the destination is a socket too, and splice works
	splicing bool // the traffic is bulk now

	// Set by the callbacks.
	buf    *[]byte
	pipe   *kernelPipe
	n      int
	err    error
	inPipe int // bytes read into the pipe and not yet written out

	op       copyOp
	callback func(fd uintptr) bool // nil while parked
}

// copyOp is what the readiness callback does.
type copyOp uint8

const (
	opReadIntoBuffer copyOp = iota
	opReadIntoPipe
	opWriteFromPipe
	opReadDatagram
)

// ready is the readiness callback: it runs op on the socket fd.
func (c *socketCopy) ready(fd uintptr) bool {
	switch c.op {
	case opReadIntoBuffer:
		return c.bufferRead(fd)
	case opReadIntoPipe:
		return c.pipeRead(fd)
	case opWriteFromPipe:
		return c.pipeWrite(fd)
	case opReadDatagram:
		return c.datagramRead(fd)
	}
	return true // no such op: let the caller see nothing read
}

// on returns the callback for op.
func (c *socketCopy) on(op copyOp) func(fd uintptr) bool {
	if c.callback == nil {
		c.callback = c.ready
	}
	c.op = op
	return c.callback
}

// init prepares copying from the socket src to dst, whose socket is
// dstRaw if it is a plain stream socket (nil otherwise).
func (c *socketCopy) init(dst net.Conn, dstRaw, src syscall.RawConn) {
	*c = socketCopy{dst: dst, dstRaw: dstRaw, src: src, spliceOK: spliceSupported && dstRaw != nil}
}

// next waits until the socket is readable and moves what it has: a
// buffer's worth, or in bulk mode what one splice takes. It returns 0 bytes
// and no error at the socket's EOF.
func (c *socketCopy) next() (int, error) {
	for {
		if !c.splicing {
			return c.bufferChunk()
		}
		n, err := c.spliceChunk()
		if !errors.Is(err, errSpliceUnavailable) {
			return n, err
		}
		// No pipe could be had (descriptors ran out, say), or the sockets
		// refuse splice; nothing was lost: go on through the buffer, which
		// needs no descriptor, for the rest of this flow's life.
		c.splicing, c.spliceOK = false, false
		if c.pipe != nil {
			pipes.put(c.pipe) // empty: the failed splice moved nothing
			c.pipe = nil
		}
	}
}

// bufferChunk waits until the socket is readable, reads once into a
// buffer and writes that out.
func (c *socketCopy) bufferChunk() (int, error) {
	c.n, c.err = 0, nil
	err := c.src.Read(c.on(opReadIntoBuffer))
	if err == nil {
		err = c.err
	}
	n := c.n
	if err != nil || n <= 0 {
		return 0, err
	}
	full := n == len(*c.buf)
	_, err = c.dst.Write((*c.buf)[:n])
	smallBuffers.Put(c.buf)
	c.buf = nil
	if err != nil {
		return 0, err
	}
	if full && c.spliceOK {
		c.splicing = true
		spliceRuns.Add(1)
	}
	return n, nil
}

// bufferRead is the readiness callback of the buffer mode.
func (c *socketCopy) bufferRead(fd uintptr) bool {
	return c.readPooled(&smallBuffers, fd)
}

// readPooled reads the socket once into a buffer taken from pool, now
// that it may be readable, and gives the buffer back at once if it was
// not: nothing is held while the copy waits. It reports whether the wait
// is over (bytes, an EOF or an error).
func (c *socketCopy) readPooled(pool *sync.Pool, fd uintptr) bool {
	c.buf = pool.Get().(*[]byte)
	c.n, c.err = readFD(fd, *c.buf)
	if c.err == syscall.EAGAIN {
		pool.Put(c.buf)
		c.buf = nil
		return false
	}
	if c.n < 0 {
		c.n = 0
	}
	return true
}

// release gives back whatever the copy holds: when it ends, and when its
// flow parks (then the pipe is empty, and nothing is lost).
func (c *socketCopy) release() {
	if c.buf != nil {
		if len(*c.buf) == smallBufferSize {
			smallBuffers.Put(c.buf)
		} else {
			datagramBuffers.Put(c.buf)
		}
		c.buf = nil
	}
	if c.pipe != nil {
		if c.inPipe > 0 {
			c.pipe.close() // bytes no one will read: never reuse such a pipe
		} else {
			pipes.put(c.pipe)
		}
		c.pipe = nil
	}
	c.callback = nil
}
