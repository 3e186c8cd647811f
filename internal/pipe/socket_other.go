// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

//go:build !unix

package pipe

import (
	"errors"
	"net"
	"net/netip"
	"syscall"
	"time"
)

// DetachSocket is not supported here: a connection stays with the
// goroutine that accepted it.
func DetachSocket(*net.TCPConn) (net.Conn, error) {
	return nil, errors.New("detaching a socket is not supported on this platform")
}

// socketConn is never made here.
type socketConn struct {
	net.Conn
	rc syscall.RawConn
}

// DialTCP is not supported here: its callers dial with net.Dialer.
func DialTCP(netip.AddrPort, time.Duration) (net.Conn, error) {
	return nil, errors.ErrUnsupported
}

// DialTCPSupported says whether DialTCP works here.
const DialTCPSupported = false
