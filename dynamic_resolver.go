// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// UpstreamResolver lists the DNS resolvers a source asks.
type UpstreamResolver struct {
	// The resolvers' network addresses (`10.0.0.53`, `127.0.0.1:8600`,
	// `tcp/10.0.0.53:53`, `[::1]:53`). The port defaults to 53. With no
	// network, queries go over UDP and fall back to TCP for a truncated
	// answer, as usual; `tcp/` sends every query over TCP. The resolver
	// that answered last is asked first; one that does not answer within
	// half the lookup's time, cannot be reached, or answers SERVFAIL or
	// REFUSED hands over to the next in the list. A host name is resolved
	// by the system when dialled.
	//
	// Default: none; at least one is required.
	Addresses []string `json:"addresses,omitempty"`
}

// resolverAddr is a parsed resolver address.
type resolverAddr struct {
	forceTCP bool
	family   string // "", "4" or "6", from the network's suffix
	address  string // host:port
}

func (r *UpstreamResolver) parse() ([]resolverAddr, error) {
	if r == nil || len(r.Addresses) == 0 {
		return nil, errors.New("resolver: addresses: at least one address is required")
	}
	out := make([]resolverAddr, 0, len(r.Addresses))
	for _, a := range r.Addresses {
		na, err := caddy.ParseNetworkAddressWithDefaults(a, "", 53)
		if err != nil {
			return nil, fmt.Errorf("resolver: address %q: %v", a, err)
		}
		if na.PortRangeSize() != 1 {
			return nil, fmt.Errorf("resolver: address %q: must have one port", a)
		}
		if na.Host == "" {
			return nil, fmt.Errorf("resolver: address %q: missing host", a)
		}
		ra := resolverAddr{address: na.JoinHostPort(0)}
		switch na.Network {
		case "", "udp":
		case "udp4", "udp6":
			ra.family = na.Network[3:]
		case "tcp":
			ra.forceTCP = true
		case "tcp4", "tcp6":
			ra.forceTCP, ra.family = true, na.Network[3:]
		default:
			return nil, fmt.Errorf("resolver: address %q: network %q: must be udp, udp4, udp6, tcp, tcp4 or tcp6", a, na.Network)
		}
		out = append(out, ra)
	}
	return out, nil
}

// newResolver returns a Go resolver that asks the configured resolvers
// (see resolverPool), or the system's resolver if there are none. refresh
// is the source's refresh interval, which bounds its lookups.
func newResolver(r *UpstreamResolver, dialTimeout, fallbackDelay caddy.Duration, refresh time.Duration) (*net.Resolver, error) {
	if r == nil {
		return net.DefaultResolver, nil
	}
	addrs, err := r.parse()
	if err != nil {
		return nil, err
	}
	pool := &resolverPool{
		addrs:   addrs,
		dialer:  net.Dialer{Timeout: time.Duration(dialTimeout), FallbackDelay: time.Duration(fallbackDelay)},
		attempt: lookupTimeout(refresh) / 2,
	}
	return &net.Resolver{PreferGo: true, Dial: pool.dial}, nil
}

// resolverPool is the configured resolvers of one source. Go's resolver
// makes each query up to twice (resolv.conf's attempts) and calls dial for
// every try; dial answers with the resolver now preferred. A try that
// fails (no connection, an error or no answer within attempt, SERVFAIL,
// REFUSED) moves the preference on to the next resolver in the list, so
// that Go's retry, and the queries after it, go there. A resolver that
// answers stays preferred.
//
// current only grows, by compare-and-swap from the index a failed try
// used, so that tries failing together on one resolver move on once.
type resolverPool struct {
	addrs   []resolverAddr
	dialer  net.Dialer
	attempt time.Duration // the longest one try waits for an answer
	current atomic.Uint64 // the preferred resolver is addrs[current % len]
}

// dial implements net.Resolver's Dial. Go asks for "udp", or for "tcp"
// after a truncated answer, and frames its query by the kind of
// connection it gets back: a net.PacketConn gets datagrams.
func (p *resolverPool) dial(ctx context.Context, network, _ string) (net.Conn, error) {
	i := p.current.Load()
	ra := p.addrs[i%uint64(len(p.addrs))]
	if ra.forceTCP {
		network = "tcp"
	}
	c, err := p.dialer.DialContext(ctx, network+ra.family, ra.address)
	if err != nil {
		if !errors.Is(ctx.Err(), context.Canceled) {
			p.failed(i)
		}
		return nil, err
	}
	// Go's resolver returns as soon as the lookup is cancelled, but its
	// try would wait on for an answer until its deadline: closing the
	// connection then ends it, so that no goroutine outlives a Watch. A
	// try that runs out of time ends by its own deadline, as a timeout.
	stop := context.AfterFunc(ctx, func() {
		if errors.Is(ctx.Err(), context.Canceled) {
			_ = c.Close()
		}
	})
	w := resolverWatch{pool: p, index: i, ctx: ctx, stop: stop}
	if udp, ok := c.(*net.UDPConn); ok {
		w.flagsAt = 3
		return &resolverPacketConn{UDPConn: udp, watch: w}, nil
	}
	w.flagsAt = 5
	return &resolverStreamConn{Conn: c, watch: w}, nil
}

// failed moves the preference on from the resolver at index i, unless
// another try has already.
func (p *resolverPool) failed(i uint64) {
	p.current.CompareAndSwap(i, i+1)
}

// resolverWatch watches one try's reads for a failure. flagsAt is where
// the byte holding RCODE is in the bytes read: 3 in a datagram, 5 in a
// stream (after the 2-byte length).
type resolverWatch struct {
	pool    *resolverPool
	index   uint64
	ctx     context.Context // the try's: cancelled, the failure is not the resolver's
	stop    func() bool     // stops the close on ctx's end
	flagsAt int
	read    int // bytes of the stream read so far
}

// Response codes that send the next try to another resolver.
const (
	rcodeServerFailure = 2
	rcodeRefused       = 5
)

func (w *resolverWatch) saw(b []byte, n int, err error, datagram bool) {
	if err != nil {
		if !errors.Is(w.ctx.Err(), context.Canceled) {
			w.pool.failed(w.index)
		}
		return
	}
	if datagram {
		w.read = 0 // each datagram is a whole message
	}
	if at := w.flagsAt - w.read; at >= 0 && at < n {
		if rcode := b[at] & 0x0f; rcode == rcodeServerFailure || rcode == rcodeRefused {
			w.pool.failed(w.index)
		}
	}
	w.read += n
}

// resolverPacketConn is a UDP try: a net.PacketConn, as Go's resolver
// requires to send datagrams.
type resolverPacketConn struct {
	*net.UDPConn
	watch resolverWatch
}

func (c *resolverPacketConn) Read(b []byte) (int, error) {
	n, err := c.UDPConn.Read(b)
	c.watch.saw(b, n, err, true)
	return n, err
}

// SetDeadline lets a try wait no longer than the pool's attempt.
func (c *resolverPacketConn) SetDeadline(t time.Time) error {
	return c.UDPConn.SetDeadline(capDeadline(t, c.watch.pool.attempt))
}

func (c *resolverPacketConn) Close() error {
	c.watch.stop()
	return c.UDPConn.Close()
}

// resolverStreamConn is a TCP try.
type resolverStreamConn struct {
	net.Conn
	watch resolverWatch
}

func (c *resolverStreamConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.watch.saw(b, n, err, false)
	return n, err
}

// SetDeadline lets a try wait no longer than the pool's attempt.
func (c *resolverStreamConn) SetDeadline(t time.Time) error {
	return c.Conn.SetDeadline(capDeadline(t, c.watch.pool.attempt))
}

func (c *resolverStreamConn) Close() error {
	c.watch.stop()
	return c.Conn.Close()
}

func capDeadline(t time.Time, attempt time.Duration) time.Time {
	if limit := time.Now().Add(attempt); attempt > 0 && (t.IsZero() || t.After(limit)) {
		return limit
	}
	return t
}

// Interface guards: Go's resolver tells UDP from TCP by these.
var (
	_ net.PacketConn = (*resolverPacketConn)(nil)
	_ net.Conn       = (*resolverStreamConn)(nil)
)
