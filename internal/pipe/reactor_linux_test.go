// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

//go:build linux

package pipe

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// The rules of the flow state machine (flow.go) and the reactor
// (reactor_linux.go), each with a test that injects the fault it guards
// against. The tests share the process-wide engine, so none runs in
// parallel, and each leaves the engine as it found it.

// openFDs counts this process's open descriptors.
func openFDs(t testing.TB) int {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(entries) - 1 // ReadDir's own
}

// inject replaces the reactor's system calls for the test: change is
// given a copy of the real ones to alter.
func inject(t *testing.T, change func(*reactorSyscalls)) {
	t.Helper()
	fake := realSyscalls
	change(&fake)
	sys.Store(&fake)
	t.Cleanup(func() { sys.Store(&realSyscalls) })
}

// setRetry shortens the reactor's wait after a failure, and forgets any
// failure when the test ends.
func setRetry(t *testing.T, d time.Duration) {
	theReactor.mu.Lock()
	theReactor.retry = d
	theReactor.mu.Unlock()
	t.Cleanup(func() {
		theReactor.mu.Lock()
		theReactor.retry, theReactor.downErr = reactorRetry, nil
		theReactor.mu.Unlock()
	})
}

// hookParking runs hook as each flow parks, until the test ends.
func hookParking(t *testing.T, hook func(*flow)) {
	testHookParking.Store(&hook)
	t.Cleanup(func() { testHookParking.Store(nil) })
}

// observeLogs makes the engine log to an observer for the test.
func observeLogs(t *testing.T) *observer.ObservedLogs {
	core, logs := observer.New(zap.DebugLevel)
	lease := Acquire(zap.New(core))
	t.Cleanup(func() {
		lease.Release()
		loggerMu.Lock()
		engineLogger = zap.NewNop()
		loggerMu.Unlock()
	})
	return logs
}

// settle waits until the engine holds nothing: no parked flow, no
// reactor, no sweeper, no pooled pipe, no worker.
func settle(t *testing.T) {
	t.Helper()
	DrainPipes()
	eventually(t, 10*time.Second, "the engine back to nothing", func() error {
		if s := ReadStats(); s.Parked != 0 || s.ReactorRunning || s.SweeperRunning || s.Pipes != 0 || s.Workers != 0 {
			return fmt.Errorf("%+v", s)
		}
		return nil
	})
}

// waitParked waits until n flows are parked.
func waitParked(t *testing.T, n int) {
	t.Helper()
	eventually(t, 5*time.Second, fmt.Sprintf("%d flows parked", n), func() error {
		if p := ReadStats().Parked; p != n {
			return fmt.Errorf("%d parked", p)
		}
		return nil
	})
}

// echoBackend answers everything the backend end reads, until EOF.
func echoBackend(c *net.TCPConn) {
	go func() {
		buf := make([]byte, 64<<10)
		for {
			n, err := c.Read(buf)
			if n > 0 {
				if _, werr := c.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				_ = c.CloseWrite()
				return
			}
		}
	}()
}

// echoPipes starts n pipes to echo backends, each after one round trip of
// first.
func echoPipes(t *testing.T, n int, first string) []*piped {
	t.Helper()
	xs := make([]*piped, n)
	for i := range xs {
		xs[i] = startPipe(t, Options{})
		echoBackend(xs[i].backend)
		if err := roundTrip(xs[i], []byte(first)); err != nil {
			t.Fatal(err)
		}
	}
	return xs
}

// roundTrip sends payload from the app end and reads it back echoed.
func roundTrip(x *piped, payload []byte) error {
	errc := make(chan error, 1)
	go func() {
		_, err := x.app.Write(payload)
		errc <- err
	}()
	got := make([]byte, len(payload))
	_ = x.app.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(x.app, got); err != nil {
		return err
	}
	if err := <-errc; err != nil {
		return err
	}
	if !bytes.Equal(got, payload) {
		return errors.New("echoed bytes differ")
	}
	return nil
}

// TestIdleFlowsParkAndWake checks that idle flows park and give their
// goroutines back, and that parked pipes carry on: bytes both ways, then a
// half-close from a parked connection.
func TestIdleFlowsParkAndWake(t *testing.T) {
	settle(t)
	lease := Acquire(nil)
	defer lease.Release()
	const n = 20
	xs := echoPipes(t, n, "hello")
	waitParked(t, 2*n)
	if s := ReadStats(); !s.ReactorRunning {
		t.Fatalf("flows parked but no reactor runs: %+v", s)
	}
	for i, x := range xs {
		if err := roundTrip(x, randomBytes(uint64(i), 200_000+i)); err != nil {
			t.Fatalf("pipe %d after parking: %v", i, err)
		}
	}
	waitParked(t, 2*n)
	for i, x := range xs {
		_ = x.app.CloseWrite()
		if rest, err := io.ReadAll(x.app); err != nil || len(rest) != 0 {
			t.Fatalf("pipe %d: half-closing a parked pipe: %q, %v", i, rest, err)
		}
		x.wait(t, 5*time.Second)
	}
	lease.Release()
	settle(t)
}

// TestParkedFlowHoldsNothing is defect 1: a flow that parked after a slow
// write kept its copy callback and its kernel pipe (the call that gave
// them back sat inside a comment), two descriptors per idle connection
// that nothing counted. Here bulk goes to a client that reads slowly, so
// the flow's writes block long enough for the sweeper to ask it to park;
// once everything is read and the pipes idle, every parked flow must hold
// no buffer, no pipe and no callback, and the process no descriptor but
// the sockets.
func TestParkedFlowHoldsNothing(t *testing.T) {
	settle(t)
	lease := Acquire(nil)
	defer lease.Release()
	before := openFDs(t)
	const n, size = 8, 4 << 20
	xs := make([]*piped, n)
	for i := range xs {
		xs[i] = startPipe(t, Options{})
		_ = xs[i].app.SetReadBuffer(16 << 10)
		_ = xs[i].clientSide.(*net.TCPConn).SetWriteBuffer(16 << 10)
	}
	var wg sync.WaitGroup
	for i, x := range xs {
		payload := randomBytes(uint64(i), size)
		go func() { _, _ = x.backend.Write(payload) }()
		wg.Go(func() {
			// A slow reader: 32 KiB every 2 ms, so the flow's writes block.
			got := make([]byte, 0, size)
			buf := make([]byte, 32<<10)
			_ = x.app.SetReadDeadline(time.Now().Add(60 * time.Second))
			for len(got) < size {
				m, err := x.app.Read(buf)
				got = append(got, buf[:m]...)
				if err != nil {
					t.Errorf("pipe %d: %v after %d bytes", i, err, len(got))
					return
				}
				time.Sleep(2 * time.Millisecond)
			}
			if sha256.Sum256(got) != sha256.Sum256(payload) {
				t.Errorf("pipe %d: the download is corrupt", i)
			}
		})
	}
	wg.Wait()
	waitParked(t, 2*n)
	theReactor.mu.Lock()
	for _, f := range theReactor.parked {
		if c := &f.socket; c.pipe != nil || c.buf != nil || c.callback != nil {
			t.Errorf("a parked %s flow holds pipe %v, buffer %v, callback %v", f.dir, c.pipe != nil, c.buf != nil, c.callback != nil)
		}
	}
	theReactor.mu.Unlock()
	// The pool gives its idle pipes back within a second or two.
	eventually(t, 5*time.Second, "no kernel pipe open", func() error {
		if p := ReadStats().Pipes; p != 0 {
			return fmt.Errorf("%d pipes open", p)
		}
		return nil
	})
	// Four sockets per pipe in this process (both ends of both
	// connections), the reactor's epoll set, and nothing else.
	if got, want := openFDs(t)-before, 4*n+1; got != want {
		t.Errorf("%d descriptors more than before, want %d (the sockets and the reactor)", got, want)
	}
}

// TestReactorCreateFails is defect 2: a failure to create the reactor was
// kept for ever by a sync.Once, and every idle flow then cycled, asked to
// park every 25 ms and failing each time. Now a flow that cannot park is
// never asked again, the failure is logged once, and the reactor is tried
// again after reactorRetry.
func TestReactorCreateFails(t *testing.T) {
	settle(t)
	logs := observeLogs(t)
	var creates atomic.Int32
	inject(t, func(s *reactorSyscalls) {
		s.epollCreate = func(int) (int, error) { creates.Add(1); return -1, syscall.EMFILE }
	})
	const retry = time.Second
	setRetry(t, retry)
	refusalsBefore := ReadStats().ParkRefusals

	const n = 5
	xs := echoPipes(t, n, "hi")
	// Every flow asks once, is refused, and waits in Go's poller.
	eventually(t, 5*time.Second, "every flow refused once", func() error {
		if r := ReadStats().ParkRefusals - refusalsBefore; r != 2*n {
			return fmt.Errorf("%d refusals", r)
		}
		return nil
	})
	time.Sleep(300 * time.Millisecond) // a dozen sweeps
	if r := ReadStats().ParkRefusals - refusalsBefore; r != 2*n {
		t.Errorf("%d refusals after a dozen sweeps, want %d: refused flows are asked again", r, 2*n)
	}
	if c := creates.Load(); c != 1 {
		t.Errorf("the reactor was created %d times within reactorRetry, want 1", c)
	}
	if got := logs.FilterMessageSnippet("cannot park idle connections").Len(); got != 1 {
		t.Errorf("the failure was logged %d times, want once", got)
	}
	for i, x := range xs {
		if err := roundTrip(x, randomBytes(uint64(i), 100_000)); err != nil {
			t.Fatalf("pipe %d in Go's poller: %v", i, err)
		}
	}

	// Once creating works again and the retry time has passed, new flows park.
	sys.Store(&realSyscalls)
	time.Sleep(retry)
	y := startPipe(t, Options{})
	echoBackend(y.backend)
	if err := roundTrip(y, []byte("hi")); err != nil {
		t.Fatal(err)
	}
	waitParked(t, 2)
	if got := logs.FilterMessage("parking idle connections works again"); got.Len() != 1 {
		t.Errorf("the recovery was logged %d times, want once: %v", got.Len(), got.All())
	}
}

// TestArmFails is defect 2's per-socket form: EPOLL_CTL_ADD failing (ENOSPC
// at fs.epoll.max_user_watches) for some sockets. Those flows stay in Go's
// poller for good; the others park; bytes flow for all.
func TestArmFails(t *testing.T) {
	settle(t)
	lease := Acquire(nil)
	defer lease.Release()
	refusalsBefore := ReadStats().ParkRefusals
	var adds atomic.Int32
	inject(t, func(s *reactorSyscalls) {
		s.epollCtl = func(epfd, op, fd int, ev *syscall.EpollEvent) error {
			if op == syscall.EPOLL_CTL_ADD && adds.Add(1)%2 == 0 {
				return syscall.ENOSPC
			}
			return syscall.EpollCtl(epfd, op, fd, ev)
		}
	})

	const n = 6
	xs := echoPipes(t, n, "hi")
	waitParked(t, n) // every other flow
	time.Sleep(200 * time.Millisecond)
	if r := ReadStats().ParkRefusals - refusalsBefore; r != n {
		t.Errorf("%d refusals, want %d (one per refused flow, never asked again)", r, n)
	}
	for i, x := range xs {
		if err := roundTrip(x, randomBytes(uint64(i), 100_000)); err != nil {
			t.Fatalf("pipe %d: %v", i, err)
		}
	}
}

// TestAbortRacesPark is the race at the heart of defect 2: an abort whose
// past deadline landed before park cleared it, while the flow was neither
// running nor parked. The hook aborts the pipe at exactly that moment,
// with arm succeeding and with arm failing; the pipe must end either way.
// (Before, on arm failure nothing looked at the abort again, and the flow
// waited with no deadline until the peer spoke.)
func TestAbortRacesPark(t *testing.T) {
	for _, armFails := range []bool{false, true} {
		t.Run(fmt.Sprintf("arm fails %v", armFails), func(t *testing.T) {
			settle(t)
			lease := Acquire(nil)
			defer lease.Release()
			if armFails {
				inject(t, func(s *reactorSyscalls) {
					s.epollCtl = func(int, int, int, *syscall.EpollEvent) error { return syscall.ENOSPC }
				})
			}
			x := startPipe(t, Options{})
			cause := errors.New("aborted while parking")
			var once sync.Once
			hookParking(t, func(f *flow) {
				if f.p == x.p && f.dir == Upward {
					once.Do(func() { x.p.Abort(cause) })
				}
			})
			// No traffic at all: the sweeper asks both flows to park.
			x.wait(t, 5*time.Second)
			if x.p.Cause() != cause {
				t.Fatalf("cause %v", x.p.Cause())
			}
		})
	}
}

// TestAbortStorm aborts many pipes at random moments while their flows
// park and wake, so that aborts land in every state: every pipe must end,
// nothing may stay parked, and the race detector must stay quiet.
func TestAbortStorm(t *testing.T) {
	settle(t)
	lease := Acquire(nil)
	const n = 60
	xs := make([]*piped, n)
	for i := range xs {
		xs[i] = startPipe(t, Options{})
		echoBackend(xs[i].backend)
	}
	var wg sync.WaitGroup
	for i, x := range xs {
		wg.Go(func() {
			for j := range 1 + i%4 {
				if err := roundTrip(x, []byte("ping")); err != nil {
					return // aborted under it
				}
				time.Sleep(time.Duration(10*(i%7+j)) * time.Millisecond)
			}
			x.p.Abort(errors.New("storm"))
		})
	}
	wg.Wait()
	for _, x := range xs {
		x.wait(t, 5*time.Second)
	}
	lease.Release()
	settle(t)
}

// TestReusedDescriptor is defect 3: parked flows were keyed by descriptor
// number, so a worker slow to record its flow could overwrite the entry of
// a new connection that got the same descriptor, which then never woke.
// Now a parking flow belongs to its worker: an abort cannot end it, so its
// socket cannot be closed and its descriptor reused, until it is parked
// and taken back. Here an abort lands while a flow is held mid-park; the
// pipe must not end before the flow lets go, and a new connection that
// gets the old descriptor must park and wake normally.
func TestReusedDescriptor(t *testing.T) {
	settle(t)
	lease := Acquire(nil)
	defer lease.Release()

	x := startPipe(t, Options{})
	oldFD := socketFD(rawConn(x.clientSide))
	hold, holding := make(chan struct{}), make(chan struct{})
	var once sync.Once
	hookParking(t, func(f *flow) {
		if f.p == x.p && f.dir == Upward {
			once.Do(func() {
				close(holding)
				<-hold
			})
		}
	})
	<-holding // the upward flow is parking, and held there
	x.p.Abort(errors.New("aborted mid-park"))
	time.Sleep(100 * time.Millisecond)
	if x.ended() {
		t.Fatal("the pipe ended while a flow was still parking: its socket could be closed and reused under it")
	}
	// The next connection, made while the old socket is open, so that it
	// cannot take the old descriptor itself.
	app, accepted := tcpPair(t)
	close(hold)
	x.wait(t, 5*time.Second)
	testHookParking.Store(nil)

	// The old socket is closed. The next connection's socket goes on its
	// descriptor: the kernel would hand it the lowest free one, often
	// this, but the test's own listeners and dials take descriptors too,
	// so the test puts it there itself.
	y := startPipeOn(t, Options{}, app, onDescriptor(t, accepted, oldFD))
	if fd := socketFD(rawConn(y.clientSide)); fd != oldFD {
		t.Fatalf("the new connection's socket is on descriptor %d, not the old %d", fd, oldFD)
	}
	echoBackend(y.backend)
	if err := roundTrip(y, []byte("first")); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "the new pipe's flows parked", func() error {
		theReactor.mu.Lock()
		defer theReactor.mu.Unlock()
		for _, f := range theReactor.parked {
			if f.p == y.p && f.dir == Upward {
				return nil
			}
		}
		return errors.New("not parked")
	})
	if err := roundTrip(y, randomBytes(9, 50_000)); err != nil {
		t.Fatalf("the pipe on the reused descriptor did not wake: %v", err)
	}
}

// onDescriptor moves c's socket to descriptor fd, which must be free, and
// returns it as the engine's own socket type (DetachSocket's), which keeps
// its descriptor: net.FileConn would duplicate it onto another.
func onDescriptor(t *testing.T, c *net.TCPConn, fd int) net.Conn {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	got, dupErr := -1, error(nil)
	if err := rc.Control(func(from uintptr) {
		r, _, errno := syscall.Syscall(syscall.SYS_FCNTL, from, syscall.F_DUPFD_CLOEXEC, uintptr(fd))
		got = int(r)
		if errno != 0 {
			dupErr = errno
		}
	}); err != nil {
		t.Fatal(err)
	}
	if dupErr != nil {
		t.Fatalf("fcntl F_DUPFD_CLOEXEC: %v", dupErr)
	}
	if got != fd {
		syscall.Close(got)
		t.Fatalf("descriptor %d is not free: the duplicate went to %d", fd, got)
	}
	laddr, raddr := c.LocalAddr(), c.RemoteAddr()
	c.Close()
	f := os.NewFile(uintptr(got), "tcp socket")
	frc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		t.Fatal(err)
	}
	return &socketConn{f: f, rc: frc, laddr: laddr, raddr: raddr}
}

// TestStaleEventsDropped delivers real wake-ups for a registration that
// is in no table, as a leftover registration of a closed socket would
// deliver them, with the low half of its id equal to a parked flow's
// descriptor (what the old table was keyed by): they must reach no flow,
// and the parked flows and the reactor must carry on.
func TestStaleEventsDropped(t *testing.T) {
	settle(t)
	lease := Acquire(nil)
	defer lease.Release()
	x := startPipe(t, Options{})
	echoBackend(x.backend)
	if err := roundTrip(x, []byte("hi")); err != nil {
		t.Fatal(err)
	}
	waitParked(t, 2)

	// A socket of the test's own, registered directly under a stale id:
	// the descriptor number of a parked flow's socket, what a table keyed
	// by descriptor would find that flow under.
	a, b := tcpPair(t)
	defer a.Close()
	defer b.Close()
	theReactor.mu.Lock()
	in := theReactor.inst
	stale := uint64(socketFD(rawConn(x.clientSide)))
	if in == nil {
		theReactor.mu.Unlock()
		t.Fatal("no reactor")
	}
	if f, taken := theReactor.parked[stale]; taken {
		theReactor.mu.Unlock()
		t.Fatalf("a parked flow (%s) is registered under its socket's descriptor number, %d", f.dir, stale)
	}
	var parked []*flow
	for _, f := range theReactor.parked {
		parked = append(parked, f)
	}
	ev := syscall.EpollEvent{Events: syscall.EPOLLIN}
	setEventID(&ev, stale)
	err := syscall.EpollCtl(in.fd, syscall.EPOLL_CTL_ADD, socketFD(rawConn(a)), &ev)
	theReactor.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = syscall.EpollCtl(in.fd, syscall.EPOLL_CTL_DEL, socketFD(rawConn(a)), nil) }()
	if _, err := b.Write([]byte("stale")); err != nil { // level-triggered: it fires on every wait
		t.Fatal(err)
	}
	// A flow a stale wake-up reached would run, find nothing to read and
	// park again some 25 ms later: watch that none leaves flowParked.
	for deadline := time.Now().Add(100 * time.Millisecond); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		for _, f := range parked {
			if st := f.state.Load(); st != flowParked {
				t.Fatalf("the %s flow left flowParked (state %d) after stale wake-ups", f.dir, st)
			}
		}
	}
	if p := ReadStats().Parked; p != 2 {
		t.Fatalf("%d flows parked after stale wake-ups, want 2", p)
	}
	if err := roundTrip(x, []byte("still fine")); err != nil {
		t.Fatal(err)
	}
}

// TestReactorLoopFails: if the reactor's wait fails, no parked flow may be
// stranded: each goes back to a worker, in Go's poller, the failure is
// logged at error, and the reactor is made again after reactorRetry.
func TestReactorLoopFails(t *testing.T) {
	settle(t)
	logs := observeLogs(t)
	const retry = 300 * time.Millisecond
	setRetry(t, retry)
	const n = 5
	xs := echoPipes(t, n, "hi")
	waitParked(t, 2*n)
	var failed atomic.Bool
	inject(t, func(s *reactorSyscalls) {
		s.epollWait = func(epfd int, events []syscall.EpollEvent, msec int) (int, error) {
			if failed.CompareAndSwap(false, true) {
				return -1, syscall.EBADF
			}
			return syscall.EpollWait(epfd, events, msec)
		}
	})
	// Wake the loop: one pipe speaks.
	if err := roundTrip(xs[0], []byte("wake")); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "the failure logged", func() error {
		if logs.FilterMessageSnippet("reactor of parked connections failed").Len() != 1 {
			return errors.New("not logged")
		}
		return nil
	})
	// Every pipe still answers: none was stranded.
	for i, x := range xs {
		if err := roundTrip(x, randomBytes(uint64(i), 10_000)); err != nil {
			t.Fatalf("pipe %d after the reactor failed: %v", i, err)
		}
	}
	// After the retry time, parking works again.
	time.Sleep(retry)
	y := startPipe(t, Options{})
	echoBackend(y.backend)
	if err := roundTrip(y, []byte("hi")); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "a new flow parked", func() error {
		if ReadStats().Parked == 0 {
			return errors.New("none parked")
		}
		return nil
	})
}

// TestSetNonblockFailsLeaksNothing: the epoll descriptor leaked when
// making it non-blocking failed.
func TestSetNonblockFailsLeaksNothing(t *testing.T) {
	settle(t)
	before := openFDs(t)
	inject(t, func(s *reactorSyscalls) { s.setNonblock = func(int, bool) error { return syscall.EINVAL } })
	setRetry(t, reactorRetry)
	theReactor.mu.Lock()
	err := theReactor.startLocked()
	theReactor.mu.Unlock()
	if err == nil || !errors.Is(err, syscall.EINVAL) {
		t.Fatalf("startLocked: %v, want EINVAL", err)
	}
	if after := openFDs(t); after != before {
		t.Fatalf("%d descriptors after a failed start, %d before", after, before)
	}
}

// TestEngineReturnsToBaseline is defect 6: the worker pools kept their
// goroutines for ever after a burst, and the reactor's loop and the
// sweeper ran for the life of the process. After a burst of pipes, and
// once the last lease is released, goroutines return to the baseline.
func TestEngineReturnsToBaseline(t *testing.T) {
	settle(t)
	base := runtime.NumGoroutine()
	lease := Acquire(nil)
	const n = 100
	xs := echoPipes(t, n, "burst")
	for _, x := range xs {
		x.app.Close()
		x.backend.Close()
		x.wait(t, 5*time.Second)
	}
	lease.Release()
	settle(t)
	eventually(t, 10*time.Second, "goroutines back to the baseline", func() error {
		if g := runtime.NumGoroutine(); g > base {
			return fmt.Errorf("%d goroutines, %d before", g, base)
		}
		return nil
	})
}

// TestDetachedSocket pipes a socket duplicated by DetachSocket after the
// original is closed, as godist's session does once it hands a connection
// off from caddy-l4's goroutine: bytes both ways, a splice, parking, a
// half-close, and Start's done called once, after both directions.
func TestDetachedSocket(t *testing.T) {
	settle(t)
	lease := Acquire(nil)
	defer lease.Release()
	app, accepted := tcpPair(t)
	upstream, backend := tcpPair(t)
	defer app.Close()
	defer backend.Close()
	echoBackend(backend)

	clientSide, err := DetachSocket(accepted)
	if err != nil {
		t.Fatal(err)
	}
	accepted.Close() // what caddy-l4 does when the handler returns
	p, ev := new(Pipe), new(recorder)
	p.Init(End{Conn: clientSide}, End{Conn: upstream}, Options{}, ev)
	done := make(chan struct{})
	var calls atomic.Int32
	p.Start(func() {
		calls.Add(1)
		clientSide.Close()
		upstream.Close()
		close(done)
	})

	x := &piped{p: p, app: app, backend: backend}
	splices := ReadStats().SpliceRuns
	if err := roundTrip(x, randomBytes(1, 3<<20)); err != nil {
		t.Fatalf("3 MiB through the detached socket: %v", err)
	}
	if ReadStats().SpliceRuns == splices {
		t.Error("bulk through a detached socket did not splice")
	}
	waitParked(t, 2)
	if err := roundTrip(x, []byte("after parking")); err != nil {
		t.Fatal(err)
	}
	_ = app.CloseWrite()
	if rest, err := io.ReadAll(app); err != nil || len(rest) != 0 {
		t.Fatalf("half-close through the detached socket: %q, %v", rest, err)
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("done was not called")
	}
	if c := calls.Load(); c != 1 {
		t.Fatalf("done called %d times", c)
	}
	for _, d := range []Direction{Upward, Downward} {
		if _, err := ev.result(d); err != nil {
			t.Errorf("%s ended with %v, want its EOF", d, err)
		}
	}
}
