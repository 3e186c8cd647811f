// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

//go:build unix

package pipe

import (
	"net"
	"os"
	"syscall"
	"time"
)

// DetachSocket returns a connection to the same socket as c that stays
// open when c is closed: a duplicate of c's descriptor, registered with
// Go's poller. Its caller owns it and closes it.
//
// It lets a connection outlive the goroutine that accepted it: caddy-l4
// closes a connection when its handler returns, so a handler that hands
// the duplicate to a pipe (Start) can return at once, and an idle
// connection then holds no goroutine, and none of the memory of the
// accepting goroutine's stack or of caddy-l4's per-connection state. It
// costs three system calls (dup, the non-blocking check and the poller's
// registration), and one close more at the end.
//
// c must not hold bytes of its own: it is a plain socket, read through
// nothing but itself.
func DetachSocket(c *net.TCPConn) (net.Conn, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	dup, dupErr := -1, error(nil)
	if err := rc.Control(func(fd uintptr) {
		dup, dupErr = dupCloexec(int(fd))
	}); err != nil {
		return nil, err
	}
	if dupErr != nil {
		return nil, os.NewSyscallError("fcntl F_DUPFD_CLOEXEC", dupErr)
	}
	f := os.NewFile(uintptr(dup), "tcp socket")
	frc, err := f.SyscallConn()
	if err != nil {
		_ = f.Close()
		return nil, err
	}
	return &socketConn{f: f, rc: frc, laddr: c.LocalAddr(), raddr: c.RemoteAddr()}, nil
}

// dupCloexec duplicates fd, close-on-exec.
func dupCloexec(fd int) (int, error) {
	for {
		r, _, errno := syscall.Syscall(syscall.SYS_FCNTL, uintptr(fd), syscall.F_DUPFD_CLOEXEC, 0)
		if errno == syscall.EINTR {
			continue
		}
		if errno != 0 {
			return -1, errno
		}
		return int(r), nil
	}
}

// socketConn is a stream socket held by an *os.File, as a net.Conn. The
// engine reads and splices it by descriptor like a *net.TCPConn.
type socketConn struct {
	f            *os.File
	rc           syscall.RawConn
	laddr, raddr net.Addr
}

func (c *socketConn) Read(b []byte) (int, error)         { return c.f.Read(b) }
func (c *socketConn) Write(b []byte) (int, error)        { return c.f.Write(b) }
func (c *socketConn) Close() error                       { return c.f.Close() }
func (c *socketConn) LocalAddr() net.Addr                { return c.laddr }
func (c *socketConn) RemoteAddr() net.Addr               { return c.raddr }
func (c *socketConn) SetDeadline(t time.Time) error      { return c.f.SetDeadline(t) }
func (c *socketConn) SetReadDeadline(t time.Time) error  { return c.f.SetReadDeadline(t) }
func (c *socketConn) SetWriteDeadline(t time.Time) error { return c.f.SetWriteDeadline(t) }

// SyscallConn implements syscall.Conn.
func (c *socketConn) SyscallConn() (syscall.RawConn, error) { return c.rc, nil }

// CloseWrite shuts down the writing half, sending FIN.
func (c *socketConn) CloseWrite() error {
	var err error
	if cerr := c.rc.Control(func(fd uintptr) {
		err = syscall.Shutdown(int(fd), syscall.SHUT_WR)
	}); cerr != nil {
		return cerr
	}
	if err != nil {
		return os.NewSyscallError("shutdown", err)
	}
	return nil
}
