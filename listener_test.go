// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// acceptError is err as Go's net package returns it from a failed accept.
func acceptError(err error) error {
	return &net.OpError{Op: "accept", Net: "tcp", Err: os.NewSyscallError("accept4", err)}
}

func TestAcceptRetryIndex(t *testing.T) {
	tests := []struct {
		name string
		err  error
		want string // the metric label; "" for an error returned at once
	}{
		{"too many open files", acceptError(syscall.EMFILE), "EMFILE"},
		{"file table full", acceptError(syscall.ENFILE), "ENFILE"},
		{"no buffer space", acceptError(syscall.ENOBUFS), "ENOBUFS"},
		{"out of memory", acceptError(syscall.ENOMEM), "ENOMEM"},
		{"client gave up", acceptError(syscall.ECONNABORTED), "ECONNABORTED"},
		{"bare errno", syscall.EMFILE, "EMFILE"},
		{"closed listener", &net.OpError{Op: "accept", Net: "tcp", Err: net.ErrClosed}, ""},
		{"invalid socket", acceptError(syscall.EINVAL), ""},
		{"connection reset", acceptError(syscall.ECONNRESET), ""},
		{"deadline", &net.OpError{Op: "accept", Net: "tcp", Err: os.ErrDeadlineExceeded}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := ""
			if i := acceptRetryIndex(tt.err); i >= 0 {
				got = acceptRetryErrors[i].name
			}
			if got != tt.want {
				t.Errorf("acceptRetryIndex(%v) is %q, want %q", tt.err, got, tt.want)
			}
		})
	}
}

// faultyListener is a real loopback listener whose Accept first fails
// with each of errs in turn, as the kernel would under the fault, and then
// accepts; with repeat, the last error repeats for ever. Once closed, it
// answers as a closed socket does.
type faultyListener struct {
	net.Listener
	errs    []error
	repeat  bool
	accepts atomic.Int64 // calls of Accept
	closed  atomic.Bool
}

func (f *faultyListener) Close() error {
	f.closed.Store(true)
	return f.Listener.Close()
}

func (f *faultyListener) Accept() (net.Conn, error) {
	n := int(f.accepts.Add(1)) - 1
	switch {
	case f.closed.Load():
	case n < len(f.errs):
		return nil, f.errs[n]
	case f.repeat && len(f.errs) > 0:
		return nil, f.errs[len(f.errs)-1]
	}
	return f.Listener.Accept()
}

// newFaultyRetryListener wraps a faultyListener on a free loopback port
// in a retryListener with a 1ms backoff and an observed logger.
func newFaultyRetryListener(t *testing.T, repeat bool, errs ...error) (*retryListener, *faultyListener, *observer.ObservedLogs) {
	t.Helper()
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &faultyListener{Listener: inner, errs: errs, repeat: repeat}
	l := newRetryListener(f, "godist-tcp")
	l.minDelay, l.maxDelay = time.Millisecond, time.Millisecond
	core, logs := observer.New(zapcore.ErrorLevel)
	l.logger = zap.New(core)
	t.Cleanup(func() { _ = l.Close() })
	return l, f, logs
}

func acceptRetryCounts() map[string]uint64 {
	m := make(map[string]uint64, len(acceptRetryErrors))
	for i, e := range acceptRetryErrors {
		m[e.name] = acceptRetries[i].Load()
	}
	return m
}

// TestRetryListener checks what Accept does with each kind of failure: a
// shortage is waited out, counted and logged, and the connection queued
// meanwhile is accepted; anything else is returned at once, uncounted.
func TestRetryListener(t *testing.T) {
	tests := []struct {
		name    string
		errs    []error
		retried map[string]uint64 // the counts it adds
		wantErr error             // nil: Accept returns the queued connection
	}{
		{
			name:    "descriptors run out, then free up",
			errs:    []error{acceptError(syscall.EMFILE), acceptError(syscall.EMFILE), acceptError(syscall.ENFILE)},
			retried: map[string]uint64{"EMFILE": 2, "ENFILE": 1},
		},
		{
			name:    "kernel memory short",
			errs:    []error{acceptError(syscall.ENOBUFS), acceptError(syscall.ENOMEM)},
			retried: map[string]uint64{"ENOBUFS": 1, "ENOMEM": 1},
		},
		{
			name:    "an error that is not a shortage",
			errs:    []error{acceptError(syscall.EINVAL)},
			wantErr: syscall.EINVAL,
		},
		{
			name:    "a shortage, then an error that is not",
			errs:    []error{acceptError(syscall.EMFILE), acceptError(syscall.EINVAL)},
			retried: map[string]uint64{"EMFILE": 1},
			wantErr: syscall.EINVAL,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l, f, logs := newFaultyRetryListener(t, false, tt.errs...)
			// a client waiting in the queue while Accept fails
			client, err := net.DialTimeout("tcp", l.Addr().String(), testTimeout)
			if err != nil {
				t.Fatal(err)
			}
			defer client.Close()

			before := acceptRetryCounts()
			conn, err := l.Accept()
			after := acceptRetryCounts()

			if tt.wantErr != nil {
				if !errors.Is(err, tt.wantErr) || conn != nil {
					t.Fatalf("Accept returned %v, %v; want the error %v", conn, err, tt.wantErr)
				}
			} else {
				if err != nil {
					t.Fatalf("Accept: %v", err)
				}
				if conn.RemoteAddr().String() != client.LocalAddr().String() {
					t.Errorf("accepted %s, want the queued client %s", conn.RemoteAddr(), client.LocalAddr())
				}
				conn.Close()
			}
			var total uint64
			for _, e := range acceptRetryErrors {
				if d := after[e.name] - before[e.name]; d != tt.retried[e.name] {
					t.Errorf("%s counted %d more times, want %d", e.name, d, tt.retried[e.name])
				}
				total += tt.retried[e.name]
			}
			if want := int64(len(tt.errs)) + 1; tt.wantErr == nil && f.accepts.Load() != want {
				t.Errorf("the socket's Accept was called %d times, want %d", f.accepts.Load(), want)
			}
			// one error line a second per listener: the first retry is logged
			lines := logs.FilterMessage("accept failed; retrying").All()
			if total > 0 && len(lines) != 1 {
				t.Fatalf("%d error lines for %d retries in well under a second, want 1: %v", len(lines), total, lines)
			}
			if total == 0 && len(lines) != 0 {
				t.Errorf("an error line without a retry: %v", lines)
			}
			if total > 0 {
				fields := lines[0].ContextMap()
				if fields["network"] != "godist-tcp" || fields["address"] != l.Addr().String() || fields["retry_in"] != time.Millisecond {
					t.Errorf("the error line's fields: %v", fields)
				}
			}
		})
	}
}

// TestRetryListenerCloseWakesBackoff closes a listener while its Accept
// waits out an hour's backoff: Accept returns net.ErrClosed at once, and
// does not try the socket again.
func TestRetryListenerCloseWakesBackoff(t *testing.T) {
	l, f, _ := newFaultyRetryListener(t, true, acceptError(syscall.EMFILE))
	l.minDelay, l.maxDelay = time.Hour, time.Hour

	type result struct {
		conn net.Conn
		err  error
	}
	done := make(chan result, 1)
	go func() {
		conn, err := l.Accept()
		done <- result{conn, err}
	}()
	eventually(t, testTimeout, "a failed accept", func() error {
		if f.accepts.Load() == 0 {
			return fmt.Errorf("Accept not called yet")
		}
		return nil
	})
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-done:
		if r.conn != nil || !errors.Is(r.err, net.ErrClosed) {
			t.Fatalf("Accept after Close returned %v, %v; want net.ErrClosed", r.conn, r.err)
		}
	case <-time.After(testTimeout):
		t.Fatal("Accept still waiting out its backoff after the listener was closed")
	}
	if n := f.accepts.Load(); n != 1 {
		t.Errorf("the socket's Accept was called %d times, want once: not again after Close", n)
	}
	if err := l.Close(); !errors.Is(err, net.ErrClosed) {
		t.Errorf("a second Close: %v, want net.ErrClosed", err)
	}
}

// TestGodistTCPNetwork runs a layer4 server on each godist network in
// Caddy: it serves, a config reload binds the same port again while the
// old listener is still open (Caddy's SO_REUSEPORT listeners underneath),
// and stopping Caddy frees the port.
func TestGodistTCPNetwork(t *testing.T) {
	tests := []struct {
		network string
		host    string
	}{
		{"godist-tcp", "127.0.0.1"},
		{"godist-tcp4", "127.0.0.1"},
		{"godist-tcp6", "::1"},
	}
	for _, tt := range tests {
		t.Run(tt.network, func(t *testing.T) {
			ln, err := net.Listen("tcp", net.JoinHostPort(tt.host, "0"))
			if err != nil {
				t.Skipf("no loopback %s here: %v", tt.host, err)
			}
			listen := ln.Addr().String()
			ln.Close()
			be := startBackend(t, "echo", "", echo)
			other := startBackend(t, "other", "", echo)

			c := startCaddyConfig(t, caddyConfig{
				Network: tt.network,
				Listen:  listen,
				Routes:  []map[string]any{godistRoute(map[string]any{"upstreams": upstreamsJSON(be.addr)})},
			})
			roundTripOK := func(what string) {
				t.Helper()
				payload := randomBytes(7, 64<<10)
				got, err := roundTrip(c.dial(t), payload)
				if err != nil || string(got) != string(payload) {
					t.Fatalf("%s: %d of %d bytes back, %v", what, len(got), len(payload), err)
				}
			}
			roundTripOK("first config")
			if status, body := c.load([]map[string]any{godistRoute(map[string]any{"upstreams": upstreamsJSON(other.addr)})}); status != 200 {
				t.Fatalf("reloading: %d %s", status, body)
			}
			roundTripOK("after a reload")
			if n := other.accepted.Load(); n != 1 {
				t.Errorf("the reloaded config's upstream accepted %d connections, want 1", n)
			}
			stopCaddy(t)
			eventually(t, testTimeout, "the port freed", func() error {
				ln, err := net.Listen("tcp", listen)
				if err != nil {
					return err
				}
				return ln.Close()
			})
		})
	}
}

// TestGodistTCPPortRange listens on a range of two ports, as Caddy does
// for a server address like godist-tcp/127.0.0.1:5000-5001: one retrying
// listener per port.
func TestGodistTCPPortRange(t *testing.T) {
	var first int
	for range 50 {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := ln.Addr().(*net.TCPAddr).Port
		ln.Close()
		if next, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port+1)); err == nil {
			next.Close()
			first = port
			break
		}
	}
	if first == 0 {
		t.Skip("found no two free ports in a row")
	}
	addr, err := caddy.ParseNetworkAddress(fmt.Sprintf("godist-tcp/127.0.0.1:%d-%d", first, first+1))
	if err != nil {
		t.Fatal(err)
	}
	lns, err := addr.ListenAll(context.Background(), net.ListenConfig{})
	if err != nil {
		t.Fatalf("listening on %s: %v", addr, err)
	}
	if len(lns) != 2 {
		t.Fatalf("%d listeners for two ports", len(lns))
	}
	for i, lnAny := range lns {
		ln, ok := lnAny.(*retryListener)
		if !ok {
			t.Fatalf("listener %d is a %T, not a retrying listener", i, lnAny)
		}
		if got, want := ln.Addr().String(), fmt.Sprintf("127.0.0.1:%d", first+i); got != want {
			t.Errorf("listener %d on %s, want %s", i, got, want)
		}
		if err := ln.Close(); err != nil {
			t.Errorf("closing listener %d: %v", i, err)
		}
	}
}
