// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package pipe

import (
	"sync"
)

// The ways of moving bytes other than from a plain stream socket (for
// which see sockcopy.go). Each holds a buffer only while it has bytes in
// hand, except copyBuffered, whose source gives no way to wait without one.

// copyDatagrams relays datagrams from a datagram socket one by one, keeping
// their boundaries: the readiness callback takes a buffer once the socket
// is readable, receives one datagram whole, and the buffer goes back once
// it is written on. An empty datagram is relayed as one.
func (f *flow) copyDatagrams() error {
	c := &f.socket
	for {
		c.n, c.err = 0, nil
		err := c.src.Read(c.on(opReadDatagram))
		if err == nil {
			err = c.err
		}
		if err != nil {
			c.release()
			return err
		}
		_, err = f.dst.Write((*c.buf)[:c.n])
		moved := c.n
		c.release()
		if err != nil {
			return err
		}
		f.moved(moved)
	}
}

// datagramRead is the readiness callback of copyDatagrams: one whole
// datagram into a buffer of the largest size UDP allows.
func (c *socketCopy) datagramRead(fd uintptr) bool {
	return c.readPooled(&datagramBuffers, fd)
}

// copyWaitFirst copies from a ReadWaiter: it waits for bytes holding no
// buffer, then reads what there is into a pooled one and writes it on. A
// datagram source gives one whole datagram per read.
func (f *flow) copyWaitFirst() error {
	w := f.src.(ReadWaiter)
	pool := f.bufferPool()
	for {
		if err := w.WaitRead(); err != nil {
			return err
		}
		buf := pool.Get().(*[]byte)
		n, err := f.src.Read(*buf)
		if n > 0 || (err == nil && !IsStream(f.src)) {
			if _, werr := f.dst.Write((*buf)[:n]); werr != nil {
				pool.Put(buf)
				return werr
			}
			f.moved(n)
		}
		pool.Put(buf)
		if err != nil {
			return err
		}
	}
}

// copyBuffered copies from a connection that offers no way to wait without
// a buffer (a TLS connection, a wrapper with buffered bytes): it holds its
// buffer while it waits.
func (f *flow) copyBuffered() error {
	pool := f.bufferPool()
	buf := pool.Get().(*[]byte)
	defer pool.Put(buf)
	for {
		n, err := f.src.Read(*buf)
		if n > 0 {
			if _, werr := f.dst.Write((*buf)[:n]); werr != nil {
				return werr
			}
			f.moved(n)
		}
		if err != nil {
			return err
		}
	}
}

// bufferPool returns the pool of buffers that suit the flow's source: one
// whole datagram of the largest size UDP allows, or a 32 KiB stream chunk.
func (f *flow) bufferPool() *sync.Pool {
	if IsStream(f.src) && IsStream(f.dst) {
		return &streamBuffers
	}
	return &datagramBuffers
}

// streamBufferSize is the buffer of a stream that is not a plain socket:
// 32 KiB moves bulk data in few system calls.
const streamBufferSize = 32 << 10

var streamBuffers = sync.Pool{New: func() any {
	b := make([]byte, streamBufferSize)
	return &b
}}

// datagramBuffers hold one whole datagram of the largest size UDP allows.
var datagramBuffers = sync.Pool{New: func() any {
	b := make([]byte, 64<<10)
	return &b
}}
