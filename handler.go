// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"errors"
	"fmt"
	"net"
	"time"

	"go.uber.org/zap"

	"github.com/mholt/caddy-l4/layer4"
)

// Handle picks an upstream for the connection by its hash key, dials it,
// failing over along the key's order of preference, and pipes bytes both
// ways until both sides are done. It never returns an error for caddy-l4
// to log: it logs what went wrong itself, rate-limited.
func (h *Handler) Handle(down *layer4.Connection, _ layer4.Handler) error {
	start := time.Now()
	key := h.connKey(down)

	u, up, attempts, err := h.dialUpstream(down, key)
	if err != nil {
		h.failLog.log(h.logger, "no upstream available",
			zap.String("client", down.RemoteAddr().String()),
			zap.String("key", key),
			zap.Int("attempts", attempts),
			zap.Error(err))
		return nil
	}
	defer func() { _ = up.Close() }()
	u.acquireConn()
	defer u.releaseConn()

	s := &session{down: down, up: up, idleTimeout: time.Duration(h.IdleTimeout)}
	s.run()

	if ce := h.logger.Check(zap.DebugLevel, "connection closed"); ce != nil {
		ce.Write(
			zap.String("client", down.RemoteAddr().String()),
			zap.String("key", key),
			zap.String("upstream", u.dial),
			zap.Int("attempts", attempts),
			zap.Int64("bytes_to_upstream", s.toUpstream),
			zap.Int64("bytes_to_client", s.toClient),
			zap.Duration("duration", time.Since(start)),
			zap.Stringer("first_eof", side(s.firstEOF.Load())),
			zap.NamedError("abort", s.cause),
		)
	}
	return nil
}

// connKey returns the string the connection is hashed by.
func (h *Handler) connKey(down *layer4.Connection) string {
	switch h.keyKind {
	case keyIPPort:
	case keyIP:
		return addrKey(down.RemoteAddr(), false)
	case keyTemplate:
		// An unknown or empty placeholder means this connection lacks what
		// the key is made of (no TLS server name, say): fall back to godist's
		// key rather than send all such clients to one upstream.
		if key, err := down.Replacer().ReplaceOrErr(h.HashKey, true, true); err == nil && key != "" {
			return key
		}
	}
	return addrKey(down.RemoteAddr(), true)
}

// dialUpstream dials the upstream that key prefers and, if that fails, the
// next ones in key's order of preference, each bounded by dial_timeout,
// until one answers or every one has been tried.
func (h *Handler) dialUpstream(down *layer4.Connection, key string) (*upstream, net.Conn, int, error) {
	listenerNet := down.LocalAddr().Network()
	var small [2]uint64 // room for 128 upstreams without an allocation
	tried := bitset(small[:])
	if len(h.pool) > 128 {
		tried = make(bitset, (len(h.pool)+63)/64)
	}
	var errs []error
	attempts := 0
	for {
		i := h.picker.Pick(key, func(i int) bool { return !tried.has(i) })
		if i < 0 {
			return nil, nil, attempts, errors.Join(errs...)
		}
		tried.set(i)
		attempts++
		u := h.pool[i]
		conn, err := h.dialer.Dial(u.dialNetwork(listenerNet), u.address)
		if err == nil {
			return u, conn, attempts, nil
		}
		h.failLog.log(h.logger, "dial upstream",
			zap.String("upstream", u.dial),
			zap.String("client", down.RemoteAddr().String()),
			zap.Error(err))
		errs = append(errs, fmt.Errorf("upstream %s: %w", u.dial, err))
	}
}

// bitset marks upstreams by index.
type bitset []uint64

func (b bitset) has(i int) bool { return b[i/64]&(1<<(i%64)) != 0 }
func (b bitset) set(i int)      { b[i/64] |= 1 << (i % 64) }
