// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

//go:build !unix

package pipe

import (
	"errors"
	"net"
	"syscall"
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
