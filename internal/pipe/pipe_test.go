// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package pipe

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"runtime"
	"sync"
	"testing"
	"time"
)

// The tests drive a pipe between two real loopback connections:
//
//	app ──tcp── clientSide ═[pipe]═ upstreamSide ──tcp── backend
//
// app plays the client and backend the upstream; the pipe gets the two
// sockets in the middle, as godist's session hands them over.

// recorder is an Events that records how each direction ended.
type recorder struct {
	mu    sync.Mutex
	n     [2]int64
	err   [2]error
	ended [2]bool
	order []Direction
}

func (r *recorder) FlowEnded(d Direction, n int64, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.ended[d] {
		panic(fmt.Sprintf("%s ended twice", d))
	}
	r.n[d], r.err[d], r.ended[d] = n, err, true
	r.order = append(r.order, d)
}

func (r *recorder) result(d Direction) (int64, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.n[d], r.err[d]
}

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t testing.TB) (dialed, accepted *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	type res struct {
		c   net.Conn
		err error
	}
	ch := make(chan res, 1)
	go func() {
		c, err := ln.Accept()
		ch <- res{c, err}
	}()
	d, err := net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-ch:
		if r.err != nil {
			t.Fatal(r.err)
		}
		return d.(*net.TCPConn), r.c.(*net.TCPConn)
	case <-time.After(5 * time.Second):
		t.Fatal("accept timed out")
	}
	return nil, nil
}

// piped is a running pipe and the two outer ends of its connections.
type piped struct {
	p            *Pipe
	ev           *recorder
	app, backend *net.TCPConn
	clientSide   net.Conn // a *net.TCPConn, or a socket on a chosen descriptor
	upstream     *net.TCPConn
	done         chan struct{}
}

// startPipe runs a pipe between two fresh loopback connections. The test
// closes what it returns through cleanup.
func startPipe(t testing.TB, opts Options) *piped {
	t.Helper()
	app, clientSide := tcpPair(t)
	return startPipeOn(t, opts, app, clientSide)
}

// startPipeOn is startPipe with the client's connection given: app is the
// client, clientSide the socket the pipe reads it from.
func startPipeOn(t testing.TB, opts Options, app *net.TCPConn, clientSide net.Conn) *piped {
	t.Helper()
	upstream, backend := tcpPair(t)
	x := &piped{p: new(Pipe), ev: new(recorder), app: app, backend: backend,
		clientSide: clientSide, upstream: upstream, done: make(chan struct{})}
	x.p.Init(End{Conn: clientSide}, End{Conn: upstream}, opts, x.ev)
	go func() {
		x.p.Run()
		// As godist's session does: the user closes both after Run.
		clientSide.Close()
		upstream.Close()
		close(x.done)
	}()
	t.Cleanup(func() {
		app.Close()
		backend.Close()
		x.p.Abort(errors.New("test over"))
		x.wait(t, 10*time.Second)
	})
	return x
}

// wait waits for Run to return.
func (x *piped) wait(t testing.TB, timeout time.Duration) {
	t.Helper()
	select {
	case <-x.done:
	case <-time.After(timeout):
		t.Fatalf("the pipe did not end within %s; stacks:\n%s", timeout, stacks())
	}
}

func (x *piped) ended() bool {
	select {
	case <-x.done:
		return true
	default:
		return false
	}
}

func stacks() string {
	buf := make([]byte, 1<<20)
	return string(buf[:runtime.Stack(buf, true)])
}

// eventually polls cond every 10 ms until it returns nil, or fails the
// test with its last error after timeout.
func eventually(t testing.TB, timeout time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s: %v", what, timeout, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func randomBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// sendAndClose writes b to c, then half-closes it, in the background.
func sendAndClose(c *net.TCPConn, b []byte) <-chan error {
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(b)
		if cerr := c.CloseWrite(); err == nil {
			err = cerr
		}
		errc <- err
	}()
	return errc
}

// readAllDigest reads c to EOF and returns the SHA-256 and count.
func readAllDigest(c net.Conn, timeout time.Duration) ([32]byte, int64, error) {
	_ = c.SetReadDeadline(time.Now().Add(timeout))
	h := sha256.New()
	n, err := io.Copy(h, c)
	var sum [32]byte
	copy(sum[:], h.Sum(nil))
	return sum, n, err
}

// TestBytesIntact sends random payloads both ways at once, each followed
// by a half-close, and checks every byte arrives in order, at sizes around
// the buffer and splice thresholds.
func TestBytesIntact(t *testing.T) {
	for _, size := range []int{0, 1, 2047, 16 << 10, 16<<10 + 1, 1 << 20, 8<<20 + 3} {
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			x := startPipe(t, Options{})
			upPayload, downPayload := randomBytes(1, size), randomBytes(2, size/2+7)
			upErr := sendAndClose(x.app, upPayload)
			downErr := sendAndClose(x.backend, downPayload)
			type got struct {
				sum [32]byte
				n   int64
				err error
			}
			atBackend := make(chan got, 1)
			go func() {
				s, n, err := readAllDigest(x.backend, 20*time.Second)
				atBackend <- got{s, n, err}
			}()
			sum, n, err := readAllDigest(x.app, 20*time.Second)
			if err != nil || n != int64(len(downPayload)) || sum != sha256.Sum256(downPayload) {
				t.Fatalf("downward: %d of %d bytes, digest ok %v, %v", n, len(downPayload), sum == sha256.Sum256(downPayload), err)
			}
			b := <-atBackend
			if b.err != nil || b.n != int64(len(upPayload)) || b.sum != sha256.Sum256(upPayload) {
				t.Fatalf("upward: %d of %d bytes, digest ok %v, %v", b.n, len(upPayload), b.sum == sha256.Sum256(upPayload), b.err)
			}
			for _, e := range []error{<-upErr, <-downErr} {
				if e != nil {
					t.Fatal(e)
				}
			}
			x.wait(t, 5*time.Second)
			for d, want := range []int{len(upPayload), len(downPayload)} {
				if n, err := x.ev.result(Direction(d)); n != int64(want) || err != nil {
					t.Errorf("%s reported %d bytes, %v; want %d, nil", Direction(d), n, err, want)
				}
			}
			if c := x.p.Cause(); c != nil {
				t.Errorf("a pipe that ended at both EOFs was aborted: %v", c)
			}
		})
	}
}

// TestHalfClose checks that one side's EOF reaches the other while the
// other direction keeps flowing: the client sends, half-closes, and still
// gets the whole reply.
func TestHalfClose(t *testing.T) {
	x := startPipe(t, Options{})
	if _, err := x.app.Write([]byte("request")); err != nil {
		t.Fatal(err)
	}
	_ = x.app.CloseWrite()
	req, err := io.ReadAll(io.LimitReader(x.backend, 100))
	if err != nil || string(req) != "request" {
		t.Fatalf("the backend read %q, %v; want the request then EOF", req, err)
	}
	reply := randomBytes(3, 300_000)
	errc := sendAndClose(x.backend, reply)
	sum, n, err := readAllDigest(x.app, 10*time.Second)
	if err != nil || n != int64(len(reply)) || sum != sha256.Sum256(reply) {
		t.Fatalf("the reply after a half-close: %d of %d bytes, %v", n, len(reply), err)
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	x.wait(t, 5*time.Second)
	if x.ev.order[0] != Upward {
		t.Errorf("directions ended in order %v, want upward first", x.ev.order)
	}
}

// TestAbortEndsBothDirections checks that Abort wakes both directions
// wherever they wait, that the first cause is kept, and that the flows
// report ErrAborted rather than a deadline error.
func TestAbortEndsBothDirections(t *testing.T) {
	x := startPipe(t, Options{})
	if _, err := x.app.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 1)
	if _, err := io.ReadFull(x.backend, buf); err != nil {
		t.Fatal(err)
	}
	first := errors.New("first")
	x.p.Abort(first)
	x.p.Abort(errors.New("second"))
	x.wait(t, 5*time.Second)
	if c := x.p.Cause(); c != first {
		t.Errorf("cause %v, want the first", c)
	}
	for _, d := range []Direction{Upward, Downward} {
		if _, err := x.ev.result(d); !errors.Is(err, ErrAborted) {
			t.Errorf("%s ended with %v, want ErrAborted", d, err)
		}
	}
}

// TestIdleTimeout checks that a pipe with no byte moving for IdleTimeout
// ends with ErrIdle, and that traffic keeps a pipe alive past it.
func TestIdleTimeout(t *testing.T) {
	x := startPipe(t, Options{IdleTimeout: 300 * time.Millisecond})
	start := time.Now()
	for range 6 { // 600 ms of traffic, a byte every 100 ms
		if _, err := x.app.Write([]byte("k")); err != nil {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if x.ended() {
		t.Fatal("the pipe ended while bytes moved")
	}
	x.wait(t, 5*time.Second)
	if !errors.Is(x.p.Cause(), ErrIdle) {
		t.Fatalf("cause %v, want ErrIdle", x.p.Cause())
	}
	if took := time.Since(start); took < 700*time.Millisecond {
		t.Errorf("ended after %s: before the last byte's idle timeout", took)
	}
}

// TestCauseRace ends many pipes by the idle timeout just as their peers
// close, so that the idle timer's abort races the flows' own ending. Run
// under the race detector, it catches a cause written without
// synchronisation (defect: session.cause was written after aborted was
// set, and read by the handler while the timer wrote it).
func TestCauseRace(t *testing.T) {
	const n = 40
	xs := make([]*piped, n)
	for i := range xs {
		xs[i] = startPipe(t, Options{IdleTimeout: 20 * time.Millisecond})
	}
	time.Sleep(15 * time.Millisecond)
	for _, x := range xs {
		x.app.Close()
		x.backend.Close()
	}
	for _, x := range xs {
		x.wait(t, 5*time.Second)
		if c := x.p.Cause(); c != nil && !errors.Is(c, ErrIdle) && !errors.Is(c, ErrNoHalfClose) && !isConnErr(c) {
			t.Errorf("cause %v", c)
		}
	}
}

// isConnErr reports whether err is a connection reset or broken pipe, which
// a closed peer may give.
func isConnErr(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) || errors.Is(err, os.ErrDeadlineExceeded)
}

// TestDatagrams relays datagrams both ways between two connected UDP
// sockets, keeping their boundaries, including an empty one.
func TestDatagrams(t *testing.T) {
	udp := func() *net.UDPConn {
		c, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	app, backend := udp(), udp()
	connect := func(peer *net.UDPConn) *net.UDPConn {
		c, err := net.DialUDP("udp", nil, peer.LocalAddr().(*net.UDPAddr))
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	clientSide, upstream := connect(app), connect(backend)
	p, ev := new(Pipe), new(recorder)
	p.Init(End{Conn: clientSide}, End{Conn: upstream}, Options{}, ev)
	done := make(chan struct{})
	go func() { p.Run(); close(done) }()
	defer func() {
		p.Abort(errors.New("test over"))
		<-done
		clientSide.Close()
		upstream.Close()
	}()

	buf := make([]byte, 70000)
	for _, size := range []int{0, 1, 1472, 9000, 60000} {
		payload := randomBytes(uint64(size), size)
		if _, err := app.WriteTo(payload, clientSide.LocalAddr()); err != nil {
			t.Fatal(err)
		}
		_ = backend.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, from, err := backend.ReadFrom(buf)
		if err != nil || !bytes.Equal(buf[:n], payload) {
			t.Fatalf("upward %d-byte datagram: got %d bytes, %v", size, n, err)
		}
		if _, err := backend.WriteTo(payload, from); err != nil {
			t.Fatal(err)
		}
		_ = app.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, _, err = app.ReadFrom(buf)
		if err != nil || !bytes.Equal(buf[:n], payload) {
			t.Fatalf("downward %d-byte datagram: got %d bytes, %v", size, n, err)
		}
	}
}
