// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

// caddy-l4's accept loop (v0.1.2, layer4/server.go, Server.serve) returns
// on the first accept error that is not a timeout and never accepts on
// that listener again: the port stays bound, the kernel goes on completing
// handshakes into its queue, and nothing answers them. A burst of clients
// past the process's descriptor limit is enough (accept4: too many open
// files), and the only trace is a debug line. godist's descriptor budget
// cannot prevent it: it acts on connections caddy-l4 has already accepted.
//
// So this file registers Caddy networks whose listeners do what Go's
// net/http server does instead: an accept that fails for want of a local
// resource waits (5ms, doubling up to 1s) and tries again, and the
// connections waiting in the kernel's queue are served as soon as
// descriptors free up. A layer4 server gets one by listening on
// godist-tcp/<host>:<port> (or godist-tcp4/, godist-tcp6/) instead of
// tcp/. Underneath is Caddy's own TCP listener, made by Caddy for the
// matching tcp address, so SO_REUSEPORT, port ranges and overlapping
// listeners across config reloads behave exactly as with tcp/.

// retryNetworks maps each network godist registers to the network of the
// listener it wraps.
var retryNetworks = map[string]string{
	"godist-tcp":  "tcp",
	"godist-tcp4": "tcp4",
	"godist-tcp6": "tcp6",
}

func init() {
	for name := range retryNetworks {
		caddy.RegisterNetwork(name, listenRetrying)
	}
}

// The backoff between failed accepts, as net/http's Server.Serve: the
// first wait is acceptRetryMin, each further one twice the last, at most
// acceptRetryMax. An accept that succeeds starts over.
const (
	acceptRetryMin = 5 * time.Millisecond
	acceptRetryMax = time.Second
)

// listenRetrying is the caddy.ListenerFunc of the godist-tcp networks: it
// has Caddy listen on the wrapped network and the same host and port, and
// wraps the listener in a retryListener.
func listenRetrying(ctx context.Context, network, host, portRange string, portOffset uint, cfg net.ListenConfig) (any, error) {
	inner, ok := retryNetworks[network]
	if !ok {
		return nil, fmt.Errorf("network %q: not a godist network", network)
	}
	addr, err := caddy.ParseNetworkAddress(caddy.JoinNetworkAddress(inner, host, portRange))
	if err != nil {
		return nil, fmt.Errorf("%s address %q: %w", network, net.JoinHostPort(host, portRange), err)
	}
	lnAny, err := addr.Listen(ctx, portOffset, cfg)
	if err != nil {
		return nil, err
	}
	ln, ok := lnAny.(net.Listener)
	if !ok {
		if c, ok := lnAny.(interface{ Close() error }); ok {
			_ = c.Close()
		}
		return nil, fmt.Errorf("%s: Caddy returned a %T for %s, not a stream listener", network, lnAny, addr)
	}
	// The accept errors are godist's metrics too, whether or not a godist
	// handler is in the config.
	if cctx, ok := ctx.(caddy.Context); ok {
		if err := registerMetrics(cctx.GetMetricsRegistry()); err != nil {
			_ = ln.Close()
			return nil, fmt.Errorf("%s: registering metrics: %w", network, err)
		}
	}
	return newRetryListener(ln, network), nil
}

// retryListener is a net.Listener whose Accept waits and tries again when
// the process or the machine is short of a resource, instead of returning
// an error that would end caddy-l4's accept loop.
//
// Accept may be called from any number of goroutines (caddy-l4 calls it
// from one); each keeps its own backoff. Close may be called at any time
// and more than once: it wakes every Accept waiting out a backoff, which
// then returns net.ErrClosed at once, as the closed socket would.
type retryListener struct {
	net.Listener
	network string // as the user wrote it, for the logs

	minDelay, maxDelay time.Duration // the backoff: acceptRetryMin, acceptRetryMax
	logger             *zap.Logger

	closed    chan struct{} // closed by the first Close
	closeOnce sync.Once
	log       *logLimiter // one error line a second per listener
}

func newRetryListener(ln net.Listener, network string) *retryListener {
	return &retryListener{
		Listener: ln,
		network:  network,
		minDelay: acceptRetryMin,
		maxDelay: acceptRetryMax,
		logger:   caddy.Log().Named(listenerLoggerName),
		closed:   make(chan struct{}),
		log:      &logLimiter{interval: time.Second, burst: 1},
	}
}

// Accept returns the next connection. An accept that fails with one of
// acceptRetryErrors is counted, logged (at error, rate-limited) and tried
// again after a backoff; any other error is returned. A Close during the
// backoff ends it: Accept returns net.ErrClosed without trying again.
func (l *retryListener) Accept() (net.Conn, error) {
	var delay time.Duration
	for {
		conn, err := l.Listener.Accept()
		if err == nil {
			return conn, nil
		}
		i := acceptRetryIndex(err)
		if i < 0 {
			return nil, err
		}
		acceptRetries[i].Add(1)
		delay = min(max(2*delay, l.minDelay), l.maxDelay)
		l.log.log(l.logger, "accept failed; retrying",
			zap.String("network", l.network),
			zap.String("address", l.Addr().String()),
			zap.Duration("retry_in", delay),
			zap.Error(err))
		t := time.NewTimer(delay)
		select {
		case <-t.C:
		case <-l.closed:
			t.Stop()
			return nil, &net.OpError{Op: "accept", Net: l.Addr().Network(), Addr: l.Addr(), Err: net.ErrClosed}
		}
	}
}

// Close closes the listener and wakes any Accept waiting to retry.
func (l *retryListener) Close() error {
	l.closeOnce.Do(func() { close(l.closed) })
	return l.Listener.Close()
}

// listenerLoggerName is the logger of the godist-tcp listeners' lines,
// under Caddy's default logger of the config that made the listener.
const listenerLoggerName = "layer4.godist.listener"

// acceptRetryErrors are the accept errors worth waiting out, with their
// names as strace and the C headers spell them, which label the metric:
// the process or machine is short of descriptors (EMFILE, ENFILE) or of
// kernel memory (ENOBUFS, ENOMEM), or a client gave up before it was
// accepted (ECONNABORTED; Go's poller already retries that one on Linux).
var acceptRetryErrors = [...]struct {
	errno syscall.Errno
	name  string
}{
	{syscall.EMFILE, "EMFILE"},
	{syscall.ENFILE, "ENFILE"},
	{syscall.ENOBUFS, "ENOBUFS"},
	{syscall.ENOMEM, "ENOMEM"},
	{syscall.ECONNABORTED, "ECONNABORTED"},
}

// acceptRetries counts the failed accepts that were retried, per error in
// acceptRetryErrors, over every godist-tcp listener of the process.
var acceptRetries [len(acceptRetryErrors)]atomic.Uint64

// acceptRetryIndex returns the index of err in acceptRetryErrors, or -1
// if err is not worth waiting out.
func acceptRetryIndex(err error) int {
	for i, e := range acceptRetryErrors {
		if errors.Is(err, e.errno) {
			return i
		}
	}
	return -1
}

// Interface guard
var _ net.Listener = (*retryListener)(nil)
