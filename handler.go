// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"errors"
	"fmt"
	"net"
	"sync/atomic"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/mholt/caddy-l4/layer4"

	"github.com/bcca9c24/caddy-godist/internal/pipe"
)

// Handle picks an upstream for the connection by its hash key, dials it,
// failing over along the key's order of preference, and pipes bytes both
// ways until both sides are done. It never returns an error for caddy-l4
// to log: it logs what went wrong itself, rate-limited.
//
// A plain TCP client (the usual case, with or without matchers) is handed
// off: its socket is duplicated, the engine pipes the duplicate, and
// Handle returns at once, so that caddy-l4's goroutine, its stack and its
// per-connection state are given back while the connection lives on; an
// idle connection then holds its two sockets and the session, nothing
// more. Any other client (UDP, TLS terminated by caddy-l4, a decoded PROXY
// header) stays with this goroutine, which waits until the session ends,
// since caddy-l4 closes the connection when Handle returns.
func (h *Handler) Handle(down *layer4.Connection, _ layer4.Handler) error {
	if !h.admit(down) {
		return nil
	}
	// One allocation holds the session, the dial's outcome and the pipe.
	s := &session{h: h, down: down, client: down.RemoteAddr(), start: time.Now()}
	s.connect()
	if s.up == nil {
		h.leave()
		return nil
	}
	if s.detach() {
		s.run()
		return nil
	}
	s.waiting.Add(1)
	s.run()
	s.waiting.Wait()
	return nil
}

// admit checks the limits a new connection must be within, and counts it
// in. It logs (rate-limited) and counts a connection it turns away.
func (h *Handler) admit(down *layer4.Connection) bool {
	if h.MaxConnections > 0 {
		if n := h.active.Add(1); n > int64(h.MaxConnections) {
			h.active.Add(-1)
			h.rejected.Add(1)
			rejectedOverLimit.Add(1)
			h.failLog.log(h.logger, "connection over max_connections closed",
				zap.String("client", down.RemoteAddr().String()),
				zap.Int("max_connections", h.MaxConnections))
			return false
		}
	}
	if !pipe.Descriptors.Acquire(descriptorsPerConn) {
		if h.MaxConnections > 0 {
			h.active.Add(-1)
		}
		h.rejectedFD.Add(1)
		rejectedOverDescriptors.Add(1)
		h.failLog.log(h.logger, "connection closed: godist's connections hold all the file descriptors the process can spare",
			zap.String("client", down.RemoteAddr().String()),
			zap.Int64("descriptor_budget", pipe.Descriptors.Limit()))
		return false
	}
	return true
}

// leave counts a connection that admit let in out again.
func (h *Handler) leave() {
	pipe.Descriptors.Release(descriptorsPerConn)
	if h.MaxConnections > 0 {
		h.active.Add(-1)
	}
}

// connect makes the connection's hash key, dials its upstream, failing
// over as needed, and starts the upstream connection with the PROXY
// protocol header if one is configured. It sets s.key, s.dial, and s.up
// and s.upstream, which stay nil if no upstream could be had (logged).
//
// The dialling runs on a pooled worker: Go's dial path is deep, and run on
// the connection's own goroutine it would leave that goroutine, which then
// waits for the connection's lifetime, with a stack twice the size; a
// fresh goroutine would grow (copy) its stack for every connection.
func (s *session) connect() {
	s.dialled.Add(1)
	dialWorkers.Submit(s)
	s.dialled.Wait()
}

// establish does connect's work, on a dialling worker.
func (s *session) establish() {
	defer s.dialled.Done()
	h, down, d := s.h, s.down, &s.dial
	key := h.hashKey.of(down)
	s.key = key
	d.members = h.members.Load() // one membership for the whole dial
	h.dialUpstream(down, key, d)
	if d.passedOver {
		h.countFailovers(key, d)
	}
	if d.conn == nil {
		noUpstream.Add(1)
		h.failLog.log(h.logger, "no upstream available: connection closed",
			zap.String("client", down.RemoteAddr().String()),
			zap.String("key", key),
			zap.Int("attempts", d.attempts),
			zap.Error(d.err))
		return
	}
	if h.ppVersion > 0 {
		headed, err := sendProxyHeader(d.conn, h.ppVersion, down)
		if err != nil {
			h.failLog.log(h.logger, "connection closed", zap.String("upstream", d.upstream.dial), zap.Error(err))
			_ = d.conn.Close()
			d.upstream.release()
			return
		}
		d.conn = headed
	}
	s.up, s.upstream = d.conn, d.upstream
	if d.overflowFrom != nil && d.overflowFrom != d.upstream {
		d.overflowFrom.state.overflows.Add(1)
	}
	if err := s.forwardPrefetched(); err != nil {
		h.failLog.log(h.logger, "connection closed: sending the client's first bytes",
			zap.String("upstream", d.upstream.dial), zap.String("client", down.RemoteAddr().String()), zap.Error(err))
		_ = d.conn.Close()
		d.upstream.release()
		s.up, s.upstream = nil, nil
		return
	}
	d.upstream.state.total.Add(1)
}

// connectionEnded counts what the connection moved, once, as it ends, and
// writes its debug line with the decision behind it.
func (h *Handler) connectionEnded(s *session) {
	u, d := s.upstream, &s.dial
	u.state.bytesTo.Add(uint64(s.toUpstream))
	u.state.bytesFrom.Add(uint64(s.toClient))
	if s.toClient == 0 && errors.Is(s.downErr, syscall.ECONNREFUSED) {
		// A UDP "dial" always succeeds; a refusal shows only when the
		// first datagram bounces. It counts as the failed dial it is, so
		// the client's retry goes to the key's next choice.
		h.countDialFailure(u)
	}
	if ce := h.logger.Check(zap.DebugLevel, "connection closed"); ce != nil {
		ce.Write(
			zap.String("client", s.client.String()),
			zap.String("key", s.key),
			zap.String("upstream", u.dial),
			zap.Int("rank", d.members.rank(s.key, d.index)),
			zap.Strings("skipped", h.describeSkipped(d)),
			zap.Int("attempts", d.attempts),
			zap.Int64("bytes_to_upstream", s.toUpstream),
			zap.Int64("bytes_to_client", s.toClient),
			zap.Bool("handed_off", s.detached != nil),
			zap.Bool("overflow", d.overflowFrom != nil && d.overflowFrom != u),
			zap.String("first_choice", overflowFromDial(d, u)),
			zap.Duration("duration", time.Since(s.start)),
			zap.Stringer("first_eof", side(s.firstEOF.Load())),
			zap.NamedError("abort", s.pipe.Cause()),
		)
	}
}

// dial connects to u for a connection that arrived on a listener of
// network listenerNet. An upstream at an IP address is dialled over TCP by
// the engine's own non-blocking connect (pipe.DialTCP): no resolver and
// no context per dial, as net.Dialer has. Anything else (a host
// name, UDP, a unix socket) goes through net.Dialer.
func (h *Handler) dial(u *upstream, listenerNet string) (net.Conn, error) {
	network := u.dialNetwork(listenerNet)
	if u.addrPort.IsValid() && pipe.DialTCPSupported {
		ip := u.addrPort.Addr().Unmap()
		if network == "tcp" || (network == "tcp4" && ip.Is4()) || (network == "tcp6" && ip.Is6()) {
			return pipe.DialTCP(u.addrPort, time.Duration(h.DialTimeout))
		}
	}
	return h.dialer.Dial(network, u.address)
}

// overflowFromDial names the key's first choice when balance_factor sent
// the connection elsewhere, for the debug line; "" otherwise.
func overflowFromDial(d *dialOutcome, got *upstream) string {
	if d.overflowFrom == nil || d.overflowFrom == got {
		return ""
	}
	return d.overflowFrom.dial
}

// descriptorsPerConn is what one piped connection holds: its client
// socket and its upstream socket.
const descriptorsPerConn = 2

// isLocalResourceError reports whether err means this process or machine
// ran short of something (descriptors, buffers, ports), which says nothing
// about the health of the upstream being dialled.
func isLocalResourceError(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM) ||
		errors.Is(err, syscall.EADDRNOTAVAIL)
}

// Process-wide counts of connections that godist closed unpiped, for the
// metrics; they outlive config reloads, as counters must.
var (
	rejectedOverLimit       atomic.Uint64 // over a handler's max_connections
	rejectedOverDescriptors atomic.Uint64 // over the descriptor budget
	noUpstream              atomic.Uint64 // no upstream answered
)

// dialOutcome is the result of dialUpstream, with the decisions behind it.
type dialOutcome struct {
	members  *membership // what the connection was hashed over
	upstream *upstream   // reserved: release it when the connection ends
	index    int         // of upstream, in members.pool
	conn     net.Conn
	attempts int
	err      error // why no upstream answered, when conn is nil

	// Why upstreams were passed over; each bitset holds 128 upstreams
	// without an allocation, and grows beyond that.
	unhealthy, full, failed bitset
	small                   [3][2]uint64
	passedOver              bool // any upstream was skipped or failed

	// overflowFrom is the key's first choice when balance_factor sent the
	// connection elsewhere because that upstream was at its cap.
	overflowFrom *upstream
}

// dialUpstream dials the upstream that key prefers among the usable ones
// (healthy, with room for a connection) of the lowest tier that has any,
// and, if that fails, the next ones in key's order of preference: the rest
// of that tier's usable upstreams in their rendezvous order, then the
// next tier's, each dial bounded by dial_timeout. When no usable upstream
// of any tier answers, it goes on to the unhealthy ones in the same order,
// tier by tier, since a health check can be wrong. An upstream at
// max_connections is never dialled. It dials the upstreams of d.members.
func (h *Handler) dialUpstream(down *layer4.Connection, key string, d *dialOutcome) {
	m := d.members
	n := len(m.pool)
	d.unhealthy, d.full, d.failed = newBitset(d.small[0][:], n), newBitset(d.small[1][:], n), newBitset(d.small[2][:], n)
	listenerNet := down.LocalAddr().Network()
	var errs []error
	var now int64 // read from the clock only if failed dials are on record
	for _, healthyOnly := range [...]bool{true, false} {
		for k := range m.tiers {
			t := &m.tiers[k]
			for {
				ok := func(i int) bool {
					if d.failed.has(i) || d.full.has(i) {
						return false
					}
					why := h.usability(m.pool[i], &now)
					if why&operatorReasons != 0 {
						return false // in every pass: see operatorReasons
					}
					if healthyOnly && why&downReasons != 0 {
						d.unhealthy.set(i)
						d.passedOver = true
						return false
					}
					return true
				}
				var i int
				if healthyOnly && h.BalanceFactor > 0 {
					// Picked and reserved together, under the loads' lock.
					var first int
					if i, first = h.pickBounded(m, t, key, ok, &d.full); i < 0 {
						break
					}
					if i != first {
						d.overflowFrom, d.passedOver = m.pool[first], true
					}
				} else {
					if i = t.pick(key, ok); i < 0 {
						break
					}
					if !m.pool[i].reserve() {
						d.full.set(i)
						d.passedOver = true
						continue
					}
				}
				u := m.pool[i]
				if now != 0 {
					h.noticeRecovery(u, now)
				}
				d.attempts++
				conn, err := h.dial(u, listenerNet)
				if err == nil {
					d.upstream, d.index, d.conn = u, i, conn
					return
				}
				u.release()
				d.failed.set(i)
				d.passedOver = true
				if !isLocalResourceError(err) {
					h.countDialFailure(u)
				}
				h.failLog.log(h.logger, "dial upstream",
					zap.String("upstream", u.dial),
					zap.String("client", down.RemoteAddr().String()),
					zap.Error(err))
				errs = append(errs, fmt.Errorf("upstream %s: %w", u.dial, err))
			}
		}
	}
	switch {
	case n == 0:
		errs = append(errs, errEmptyPool)
	case d.attempts == 0:
		errs = append(errs, nothingToDial(m))
	}
	d.err = errors.Join(errs...)
}

var (
	errAllFull   = errors.New("every upstream is at max_connections")
	errEmptyPool = errors.New("no upstreams: the dynamic source has found none yet, and no static upstream is configured")
)

// countFailovers counts a failover away from each upstream that the key
// prefers to the one the connection got (or every upstream, if it got
// none) and that was passed over: down, full, or failing to answer.
func (h *Handler) countFailovers(key string, d *dialOutcome) {
	var buf [16]int
	m := d.members
	for _, i := range m.order(key, buf[:0]) {
		if d.conn != nil && i == d.index {
			return
		}
		if d.failed.has(i) || d.full.has(i) || d.unhealthy.has(i) {
			m.pool[i].state.failovers.Add(1)
		}
	}
}

// rank returns the place of upstream i in key's order of preference over
// the membership, 1 for its first choice.
func (m *membership) rank(key string, i int) int {
	var buf [16]int
	for r, j := range m.order(key, buf[:0]) {
		if j == i {
			return r + 1
		}
	}
	return 0
}

// describeSkipped lists the upstreams passed over for a connection, and
// why, for its debug log line.
func (h *Handler) describeSkipped(d *dialOutcome) []string {
	var out []string
	for i, u := range d.members.pool {
		switch {
		case d.failed.has(i):
			out = append(out, u.dial+": dial failed")
		case d.full.has(i):
			out = append(out, u.dial+": at max_connections")
		case d.unhealthy.has(i) && i != d.index:
			out = append(out, u.dial+": unhealthy")
		case u.op != opReady:
			out = append(out, u.dial+": "+u.op.String()+", set by an operator")
		}
	}
	return out
}

// bitset marks upstreams by index.
type bitset []uint64

// newBitset returns a bitset for n upstreams, in small if it fits.
func newBitset(small []uint64, n int) bitset {
	if words := (n + 63) / 64; words > len(small) {
		return make(bitset, words)
	}
	return small
}

func (b bitset) has(i int) bool { return b[i/64]&(1<<(i%64)) != 0 }
func (b bitset) set(i int)      { b[i/64] |= 1 << (i % 64) }
