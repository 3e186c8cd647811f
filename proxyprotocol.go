// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"fmt"
	"net"
	"sync"

	"github.com/pires/go-proxyproto"

	"github.com/mholt/caddy-l4/layer4"
)

// parseProxyProtocol checks a proxy_protocol value and returns its version
// number, 0 for none.
func parseProxyProtocol(s string) (byte, error) {
	switch s {
	case "":
		return 0, nil
	case "v1":
		return 1, nil
	case "v2":
		return 2, nil
	}
	return 0, fmt.Errorf("proxy_protocol %q: must be v1 or v2", s)
}

// proxyHeader returns the PROXY protocol header that tells the upstream
// who the client is: its source and the address it connected to. After
// caddy-l4's proxy_protocol handler, those are the addresses it decoded,
// which the connection reports as its own.
func proxyHeader(version byte, down *layer4.Connection) ([]byte, error) {
	header := proxyproto.HeaderProxyFromAddrs(version, down.RemoteAddr(), down.LocalAddr())
	b, err := header.Format()
	if err != nil {
		return nil, fmt.Errorf("proxy_protocol v%d for %s -> %s: %w", version, down.RemoteAddr(), down.LocalAddr(), err)
	}
	return b, nil
}

// sendProxyHeader starts the upstream connection with the PROXY protocol
// header of the given version for the client down. On a stream it is
// written once, before any byte of the client's; a datagram flow carries it
// in front of every datagram, as the protocol asks, so the returned
// connection adds it to each write.
func sendProxyHeader(up net.Conn, version byte, down *layer4.Connection) (net.Conn, error) {
	header, err := proxyHeader(version, down)
	if err != nil {
		return nil, err
	}
	if isStream(up) {
		if _, err := up.Write(header); err != nil {
			return nil, fmt.Errorf("sending the PROXY protocol header: %w", err)
		}
		return up, nil
	}
	return &headedDatagramConn{Conn: up, header: header}, nil
}

// headedDatagramConn writes the PROXY protocol header in front of each
// datagram, in one write so that the datagram stays whole.
type headedDatagramConn struct {
	net.Conn
	header []byte
}

var headedBuffers = sync.Pool{New: func() any {
	b := make([]byte, 0, 64<<10+256)
	return &b
}}

func (c *headedDatagramConn) Write(p []byte) (int, error) {
	bp := headedBuffers.Get().(*[]byte)
	defer headedBuffers.Put(bp)
	b := append(append((*bp)[:0], c.header...), p...)
	*bp = b[:0]
	if _, err := c.Conn.Write(b); err != nil {
		return 0, err
	}
	return len(p), nil
}
