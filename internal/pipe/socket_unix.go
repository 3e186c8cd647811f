// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

//go:build unix

package pipe

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"sync/atomic"
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
	f     *os.File
	rc    syscall.RawConn
	laddr net.Addr // nil for a dialled socket until LocalAddr asks the kernel
	raddr net.Addr

	asked atomic.Pointer[net.TCPAddr] // the local address LocalAddr learnt
}

func (c *socketConn) Read(b []byte) (int, error)         { return c.f.Read(b) }
func (c *socketConn) Write(b []byte) (int, error)        { return c.f.Write(b) }
func (c *socketConn) Close() error                       { return c.f.Close() }
func (c *socketConn) RemoteAddr() net.Addr               { return c.raddr }
func (c *socketConn) SetDeadline(t time.Time) error      { return c.f.SetDeadline(t) }
func (c *socketConn) SetReadDeadline(t time.Time) error  { return c.f.SetReadDeadline(t) }
func (c *socketConn) SetWriteDeadline(t time.Time) error { return c.f.SetWriteDeadline(t) }

// LocalAddr returns the socket's own address; for a socket DialTCP made,
// it asks the kernel the first time.
func (c *socketConn) LocalAddr() net.Addr {
	if c.laddr != nil {
		return c.laddr
	}
	if a := c.asked.Load(); a != nil {
		return a
	}
	a := &net.TCPAddr{}
	_ = c.rc.Control(func(fd uintptr) {
		if sa, err := syscall.Getsockname(int(fd)); err == nil {
			switch sa := sa.(type) {
			case *syscall.SockaddrInet4:
				a = &net.TCPAddr{IP: sa.Addr[:], Port: sa.Port}
			case *syscall.SockaddrInet6:
				a = &net.TCPAddr{IP: sa.Addr[:], Port: sa.Port}
			}
		}
	})
	c.asked.Store(a)
	return a
}

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

// DialTCP connects to addr over TCP and returns the connection as a
// socket the engine reads and splices by descriptor. It is a non-blocking
// connect on Go's poller, and does what a proxy needs of net.Dialer's TCP
// dial and nothing more: addr is an address already (no resolver), the
// only timer is the connect's own deadline (no context), and neither end's
// address is asked of the kernel (LocalAddr asks, the first time it is
// called). Like every TCP connection Go makes, it sets TCP_NODELAY; unlike
// net.Dialer's default, it sets no keepalive.
func DialTCP(addr netip.AddrPort, timeout time.Duration) (net.Conn, error) {
	raddr := net.TCPAddrFromAddrPort(addr)
	fail := func(call string, err error) (net.Conn, error) {
		return nil, &net.OpError{Op: "dial", Net: "tcp", Addr: raddr, Err: os.NewSyscallError(call, err)}
	}
	ip := addr.Addr().Unmap()
	family, sa := syscall.AF_INET6, syscall.Sockaddr(&syscall.SockaddrInet6{Port: int(addr.Port()), Addr: ip.As16()})
	if ip.Is4() {
		family, sa = syscall.AF_INET, &syscall.SockaddrInet4{Port: int(addr.Port()), Addr: ip.As4()}
	}
	fd, err := syscall.Socket(family, syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, syscall.IPPROTO_TCP)
	if err != nil {
		return fail("socket", err)
	}
	if err := syscall.SetsockoptInt(fd, syscall.IPPROTO_TCP, syscall.TCP_NODELAY, 1); err != nil {
		_ = syscall.Close(fd)
		return fail("setsockopt", err)
	}
	inProgress := false
	switch err := syscall.Connect(fd, sa); err {
	case nil:
	case syscall.EINPROGRESS, syscall.EALREADY, syscall.EINTR:
		inProgress = true
	default:
		_ = syscall.Close(fd)
		return fail("connect", err)
	}
	f := os.NewFile(uintptr(fd), "tcp socket")
	rc, err := f.SyscallConn()
	if err != nil {
		_ = f.Close()
		return nil, err
	}
	if inProgress {
		if err := waitConnected(f, rc, timeout); err != nil {
			_ = f.Close()
			return nil, &net.OpError{Op: "dial", Net: "tcp", Addr: raddr, Err: err}
		}
	}
	return &socketConn{f: f, rc: rc, raddr: raddr}, nil
}

// waitConnected waits, in Go's poller, for a non-blocking connect to end,
// and returns why it failed, or nil. Writability signals the end; SO_ERROR
// says how it ended.
func waitConnected(f *os.File, rc syscall.RawConn, timeout time.Duration) error {
	if timeout > 0 {
		if err := f.SetWriteDeadline(time.Now().Add(timeout)); err != nil {
			return err
		}
	}
	var soErr error
	err := rc.Write(func(fd uintptr) bool {
		v, gerr := syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_ERROR)
		switch {
		case gerr != nil:
			soErr = os.NewSyscallError("getsockopt", gerr)
		case v == 0:
			// No error yet is not connected yet: the first call comes
			// before any wait, while the connect may still be under way.
			// Connected means it has a peer, as net's own connect checks.
			if _, perr := syscall.Getpeername(int(fd)); perr == syscall.ENOTCONN {
				return false // not yet: wait on
			}
			soErr = nil
		default:
			errno := syscall.Errno(v)
			if errno == syscall.EINPROGRESS || errno == syscall.EALREADY || errno == syscall.EINTR {
				return false // not yet: wait on
			}
			soErr = os.NewSyscallError("connect", errno)
		}
		return true
	})
	if err != nil {
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return &timeoutError{}
		}
		return err
	}
	if soErr != nil {
		return soErr
	}
	if timeout > 0 {
		return f.SetWriteDeadline(time.Time{})
	}
	return nil
}

// timeoutError is a dial that took longer than its timeout, as net's own
// ("i/o timeout"), a net.Error whose Timeout is true.
type timeoutError struct{}

func (*timeoutError) Error() string   { return "i/o timeout" }
func (*timeoutError) Timeout() bool   { return true }
func (*timeoutError) Temporary() bool { return true }
func (*timeoutError) Is(err error) bool {
	return err == os.ErrDeadlineExceeded
}

// DialTCPSupported says whether DialTCP works here.
const DialTCPSupported = true
