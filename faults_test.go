// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

//go:build linux

package godist

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/bcca9c24/caddy-godist/internal/pipe"
)

// These tests inject faults into a real Caddy with real loopback backends
// and check what a user cares about: no corrupted byte, no connection lost
// while an upstream was available, and every goroutine and descriptor
// given back at the end.

// openFDs counts the descriptors this process has open.
func openFDs(t testing.TB) int {
	t.Helper()
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Skipf("cannot count open descriptors here: %v", err)
	}
	return len(entries)
}

// checkNoLeaks records the goroutines and descriptors open now, and when
// the test ends, after everything it started has stopped, waits for both
// to come back to that baseline. Call it first, so that its check runs
// last.
func checkNoLeaks(t *testing.T) {
	t.Helper()
	pipe.DrainPipes()
	goroutines, fds := ownGoroutines(), ownFDs(t)
	t.Cleanup(func() {
		eventually(t, 10*time.Second, "goroutines and descriptors back to their baseline", func() error {
			pipe.DrainPipes() // pipes kept for reuse are not leaks
			g, f := ownGoroutines(), ownFDs(t)
			if g > goroutines || f > fds {
				return fmt.Errorf("%d goroutines (baseline %d), %d descriptors (baseline %d), leaving out pooled workers and the reactor\n%s\n%s",
					g, goroutines, f, fds, goroutineDump(), fdDump())
			}
			return nil
		})
	})
}

// ownGoroutines counts the goroutines, leaving out the engine's shared
// ones, which end by themselves a few seconds after they are last needed
// (TestGoroutinesBackToBaseline checks that): idle pooled workers and the
// reactor's loop.
func ownGoroutines() int {
	st := pipe.ReadStats()
	n := runtime.NumGoroutine() - st.IdleWorkers - dialWorkers.Idle()
	if st.ReactorRunning {
		n--
	}
	return n
}

// ownFDs counts the open descriptors, leaving out the reactor's.
func ownFDs(t testing.TB) int {
	n := openFDs(t)
	if pipe.ReadStats().ReactorRunning {
		n--
	}
	return n
}

func goroutineDump() string {
	buf := make([]byte, 1<<20)
	return string(buf[:runtime.Stack(buf, true)])
}

func fdDump() string {
	entries, _ := os.ReadDir("/proc/self/fd")
	var out []string
	for _, e := range entries {
		target, _ := os.Readlink("/proc/self/fd/" + e.Name())
		out = append(out, e.Name()+" -> "+target)
	}
	return strings.Join(out, "\n")
}

// TestFaultUpstreamKilledAndRestarted kills an upstream while clients keep
// connecting, then restarts it: its keys move to their next choices while
// it is down, no client connection fails because another upstream is
// always up, and its keys come back once the health checks pass again.
func TestFaultUpstreamKilledAndRestarted(t *testing.T) {
	checkNoLeaks(t)
	backends, addrs := startBackends(t, 3, whoami)
	c := startCaddy(t, map[string]any{
		"upstreams": upstreamsJSON(addrs...),
		"health_checks": map[string]any{"active": map[string]any{
			"interval": "50ms", "timeout": "500ms", "rise": 2, "fall": 1,
		}},
	})
	picker := NewPicker([]PickerUpstream{{Dial: addrs[0]}, {Dial: addrs[1]}, {Dial: addrs[2]}})
	const victim = 1

	// connect asks a fresh connection where it landed, and checks that it
	// is the key's first choice among the upstreams in up.
	connect := func(up func(i int) bool) (landed int, wasFirst bool, err error) {
		conn, err := net.DialTimeout("tcp", c.listen, testTimeout)
		if err != nil {
			return -1, false, err
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(testTimeout))
		name, err := askName(conn)
		if err != nil {
			return -1, false, fmt.Errorf("connection from %s lost: %w", conn.LocalAddr(), err)
		}
		if _, err := fmt.Sscanf(name, "b%d", &landed); err != nil {
			return -1, false, fmt.Errorf("unexpected backend name %q", name)
		}
		want := picker.Pick(addrKey(conn.LocalAddr(), true), up)
		return landed, landed == want, nil
	}
	all := func(int) bool { return true }
	withoutVictim := func(i int) bool { return i != victim }

	for range 30 {
		if _, first, err := connect(all); err != nil || !first {
			t.Fatalf("before the fault: first choice %v, %v", first, err)
		}
	}

	backends[victim].stop()
	// Until the health checks notice, passive checks and failover carry the
	// victim's keys; every connection must still succeed.
	movedAway := 0
	for i := range 200 {
		landed, first, err := connect(withoutVictim)
		if err != nil {
			t.Fatalf("connection %d with upstream %d down: %v", i, victim, err)
		}
		if landed == victim {
			t.Fatalf("connection %d landed on the stopped upstream", i)
		}
		if !first {
			t.Fatalf("connection %d landed on b%d, not its first choice among the live upstreams", i, landed)
		}
		movedAway++
	}

	startBackend(t, "b1", addrs[victim], whoami)
	// Once the checks pass twice (rise 2), its keys come back.
	eventually(t, 5*time.Second, "the restarted upstream's keys come back", func() error {
		for range 20 {
			landed, first, err := connect(all)
			if err != nil {
				return fmt.Errorf("%w (a connection failed while the upstream came back)", err)
			}
			if !first {
				return fmt.Errorf("a key that prefers b%d still lands on b%d", victim, landed)
			}
		}
		return nil
	})
	if movedAway == 0 {
		t.Fatal("no connection was made while the upstream was down")
	}
}

// TestFaultAllDownThenOneBack checks that with every upstream down a
// connection is closed promptly, Caddy keeps serving, and the first
// upstream to come back takes connections at once, before any health
// check has had time to pass: no upstream healthy means try them all.
func TestFaultAllDownThenOneBack(t *testing.T) {
	checkNoLeaks(t)
	backends, addrs := startBackends(t, 3, whoami)
	c := startCaddy(t, map[string]any{
		"upstreams": upstreamsJSON(addrs...),
		// checks far apart: recovery must not wait for them
		"health_checks": map[string]any{"active": map[string]any{"interval": "1h"}},
	})
	for _, be := range backends {
		be.stop()
	}
	for range 10 {
		conn := c.dial(t)
		start := time.Now()
		_, _ = io.WriteString(conn, "who?\n")
		if n, err := conn.Read(make([]byte, 1)); n != 0 || err == nil {
			t.Fatalf("with every upstream down: read %d, %v; want the connection closed", n, err)
		}
		if took := time.Since(start); took > 5*time.Second {
			t.Fatalf("closing took %s", took)
		}
		conn.Close()
	}
	startBackend(t, "b2", addrs[2], whoami)
	for range 10 {
		conn := c.dial(t)
		name, err := askName(conn)
		conn.Close()
		if err != nil || name != "b2" {
			t.Fatalf("after b2 came back: %q, %v", name, err)
		}
	}
}

// TestFaultUpstreamAcceptsButNeverAnswers uses an upstream whose dial
// succeeds but which never says a word: health_expect fails on it, it is
// marked down, and its keys go elsewhere.
func TestFaultUpstreamAcceptsButNeverAnswers(t *testing.T) {
	checkNoLeaks(t)
	banner := func(b *backend, c net.Conn) {
		_, _ = io.WriteString(c, "+OK "+b.name+"\n")
		whoami(b, c)
	}
	good := startBackend(t, "good", "", banner)
	mute := startBackend(t, "mute", "", func(_ *backend, c net.Conn) {
		_, _ = io.Copy(io.Discard, c) // accepts, reads, never answers
	})
	c := startCaddy(t, map[string]any{
		"upstreams": upstreamsJSON(good.addr, mute.addr),
		"health_checks": map[string]any{"active": map[string]any{
			"interval": "50ms", "timeout": "200ms", "expect": "+OK",
		}},
	})
	// ip_port spreads the keys: about half prefer the mute upstream, and
	// would hang there without the checks.
	eventually(t, 5*time.Second, "every connection on the upstream that answers", func() error {
		for range 20 {
			conn := c.dial(t)
			_ = conn.SetDeadline(time.Now().Add(time.Second))
			line := make([]byte, 64)
			n, err := conn.Read(line)
			conn.Close()
			if err != nil || !bytes.HasPrefix(line[:n], []byte("+OK good")) {
				return fmt.Errorf("got %q, %v", line[:n], err)
			}
		}
		return nil
	})
}

// TestFaultClientNeverReads has an upstream send without end to a client
// that never reads: what the handler holds for it stays bounded, the
// upstream is pushed back instead, and the idle timeout ends it all.
func TestFaultClientNeverReads(t *testing.T) {
	checkNoLeaks(t)
	var sent atomic.Int64
	sourceDone := make(chan struct{})
	source := startBackend(t, "source", "", func(_ *backend, c net.Conn) {
		defer close(sourceDone)
		chunk := make([]byte, 64<<10)
		for {
			n, err := c.Write(chunk)
			sent.Add(int64(n))
			if err != nil {
				return
			}
		}
	})
	const idle = 700 * time.Millisecond
	c := startCaddy(t, map[string]any{"upstreams": upstreamsJSON(source.addr), "idle_timeout": idle.String()})

	var before runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	conn := c.dial(t)
	_ = conn.SetReadBuffer(64 << 10)

	// Let the upstream fill every buffer on the way.
	var stalled int64
	eventually(t, 10*time.Second, "the upstream pushed back", func() error {
		a := sent.Load()
		time.Sleep(150 * time.Millisecond)
		if b := sent.Load(); b != a || b == 0 {
			return fmt.Errorf("still sending: %d bytes", b)
		}
		stalled = sent.Load()
		return nil
	})
	var during runtime.MemStats
	runtime.ReadMemStats(&during)
	// What may sit in between is the kernel's: the proxy's receive buffer
	// on the upstream side, two send buffers, the client's small receive
	// buffer, and one pipe; nothing piles up in user space.
	bound := sysctlMax(t, "net/ipv4/tcp_rmem") + 2*sysctlMax(t, "net/ipv4/tcp_wmem") + pipe.MaxPipeBytes + 1<<20
	if stalled > bound {
		t.Errorf("the upstream could send %d MB to a client that reads nothing, more than the kernel's buffers (%d MB) hold",
			stalled>>20, bound>>20)
	}
	if grew := int64(during.HeapInuse) - int64(before.HeapInuse); grew > 8<<20 {
		t.Errorf("the heap grew by %d MB while a client read nothing", grew>>20)
	}
	// nothing moves, so the idle timeout ends the connection
	select {
	case <-sourceDone:
	case <-time.After(10 * idle):
		t.Fatal("the stalled connection was never closed")
	}
	conn.Close()
}

// sysctlMax reads the largest of the numbers in /proc/sys/<name>.
func sysctlMax(t *testing.T, name string) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/sys/" + name)
	if err != nil {
		t.Skipf("cannot read %s: %v", name, err)
	}
	var largest int64
	for f := range strings.FieldsSeq(string(b)) {
		n, err := strconv.ParseInt(f, 10, 64)
		if err != nil {
			t.Fatalf("%s: %q", name, b)
		}
		largest = max(largest, n)
	}
	return largest
}

// TestFaultDescriptorsRunOut lowers the process's descriptor limit until
// nothing more can be opened: new connections are closed cleanly, an open
// connection keeps flowing (without splice's pipes, through a buffer), no
// upstream is marked down for it, and Caddy serves again once descriptors
// free up.
func TestFaultDescriptorsRunOut(t *testing.T) {
	checkNoLeaks(t)
	be := startBackend(t, "echo", "", echo)
	other := startBackend(t, "other", "", echo)
	c := startCaddy(t, map[string]any{"upstreams": upstreamsJSON(be.addr, other.addr)})

	open := c.dial(t) // connected before the limit drops
	if got, err := exchange(open, []byte("before")); err != nil || string(got) != "before" {
		t.Fatalf("before: %q, %v", got, err)
	}

	var saved syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &saved); err != nil {
		t.Fatal(err)
	}
	restore := func() {
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &saved); err != nil {
			t.Fatalf("restoring the descriptor limit: %v", err)
		}
		pipe.Descriptors.Refresh()
	}
	t.Cleanup(restore)

	setLimit := func(n int) {
		t.Helper()
		lowered := saved
		lowered.Cur = uint64(n)
		if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lowered); err != nil {
			t.Fatal(err)
		}
		pipe.Descriptors.Refresh() // read the new limit now, not in a second
	}

	// Not one descriptor to spare: an open connection keeps flowing,
	// though splice cannot get a pipe.
	pipe.DrainPipes()
	inUse := openFDs(t) - 1 // the listing counts its own descriptor
	setLimit(inUse)
	payload := randomBytes(5, 1<<20)
	if got, err := exchange(open, payload); err != nil || !bytes.Equal(got, payload) {
		t.Fatalf("the open connection with no descriptors to spare: %d of %d bytes, %v", len(got), len(payload), err)
	}

	// Room to accept, but not to pipe: new connections are closed at once,
	// not left hanging.
	setLimit(inUse + 8)
	for range 3 {
		conn, err := net.DialTimeout("tcp", c.listen, testTimeout)
		if err != nil {
			t.Fatalf("dialling Caddy: %v", err)
		}
		_ = conn.SetDeadline(time.Now().Add(testTimeout))
		start := time.Now()
		_, _ = conn.Write([]byte("x"))
		if n, err := conn.Read(make([]byte, 1)); n != 0 || err == nil {
			t.Fatalf("a new connection with no descriptors to spare: read %d, %v", n, err)
		}
		if took := time.Since(start); took > 5*time.Second {
			t.Fatalf("closing it took %s", took)
		}
		conn.Close()
	}

	restore()
	for range 10 {
		got, err := roundTrip(c.dial(t), []byte("after"))
		if err != nil || string(got) != "after" {
			t.Fatalf("after descriptors freed up: %q, %v", got, err)
		}
	}
	// no upstream was blamed for the local shortage
	for _, addr := range []string{be.addr, other.addr} {
		if n := stateOf(t, addr).recentFailures(time.Now().UnixNano(), time.Minute); n != 0 {
			t.Errorf("upstream %s has %d recent failures from a local descriptor shortage", addr, n)
		}
	}
	open.Close()
}

// TestFaultReloadsWhileStreaming reloads the config every 200ms, changing
// the upstream list, while clients stream data through and new clients
// keep connecting: every stream that reached an upstream finishes intact.
//
// On Linux, Caddy binds each config's listener anew with SO_REUSEPORT and
// closes the old one, and the kernel resets the connections still queued
// on the old socket, before Caddy has accepted them (unless
// net.ipv4.tcp_migrate_req=1 hands them to the new socket). Those never
// reach this handler; they are told apart here by the stream's ID, which
// the upstream records, and counted rather than failed.
func TestFaultReloadsWhileStreaming(t *testing.T) {
	checkNoLeaks(t)
	var seenMu sync.Mutex
	seen := map[string]bool{}
	recordingEcho := func(_ *backend, c net.Conn) {
		id := make([]byte, 16)
		if _, err := io.ReadFull(c, id); err != nil {
			return
		}
		seenMu.Lock()
		seen[string(id)] = true
		seenMu.Unlock()
		if _, err := c.Write(id); err != nil {
			return
		}
		echo(nil, c)
	}
	_, addrs := startBackends(t, 3, recordingEcho)
	c := startCaddy(t, map[string]any{"upstreams": upstreamsJSON(addrs...)})

	stop := make(chan struct{})
	var reloads atomic.Int64
	var reloadErr atomic.Value
	reloaderDone := make(chan struct{})
	go func() {
		defer close(reloaderDone)
		configs := [][]string{addrs, addrs[:2], addrs[1:], {addrs[2], addrs[0]}}
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(200 * time.Millisecond):
			}
			status, body := c.load([]map[string]any{godistRoute(map[string]any{
				"upstreams":     upstreamsJSON(configs[i%len(configs)]...),
				"health_checks": map[string]any{"active": map[string]any{"interval": "100ms"}},
			})})
			if status != 200 {
				reloadErr.Store(fmt.Sprintf("reload %d: %d %s", i, status, body))
				return
			}
			reloads.Add(1)
		}
	}()

	var wg sync.WaitGroup
	var attempts, completed, listenerResets atomic.Int64
	errs := make(chan error, 1024)
	deadline := time.Now().Add(2500 * time.Millisecond)
	for w := range 8 {
		wg.Go(func() {
			for i := 0; time.Now().Before(deadline); i++ {
				attempts.Add(1)
				payload := randomBytes(uint64(w*100_000+i), 64<<10+i*7919%(256<<10))
				id := payload[:16]
				got, err := func() ([]byte, error) {
					conn, err := net.DialTimeout("tcp", c.listen, testTimeout)
					if err != nil {
						return nil, err
					}
					defer conn.Close()
					_ = conn.SetDeadline(time.Now().Add(testTimeout))
					return roundTrip(conn.(*net.TCPConn), payload)
				}()
				if err == nil && bytes.Equal(got, payload) {
					completed.Add(1)
					continue
				}
				seenMu.Lock()
				reachedUpstream := seen[string(id)]
				seenMu.Unlock()
				if !reachedUpstream && len(got) == 0 && isReset(err) {
					listenerResets.Add(1)
					continue
				}
				errs <- fmt.Errorf("worker %d stream %d (reached an upstream: %v): %d of %d bytes back intact: %v",
					w, i, reachedUpstream, len(got), len(payload), err)
			}
		})
	}
	wg.Wait()
	close(stop)
	<-reloaderDone
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if msg := reloadErr.Load(); msg != nil {
		t.Fatal(msg)
	}
	t.Logf("%d reloads; %d of %d streams completed intact; %d reset by the kernel on a closing listener before Caddy accepted them",
		reloads.Load(), completed.Load(), attempts.Load(), listenerResets.Load())
	if reloads.Load() < 5 {
		t.Fatalf("only %d reloads happened while streaming", reloads.Load())
	}
	if r := listenerResets.Load(); r*20 > attempts.Load() {
		t.Fatalf("%d of %d connections reset on reloads: far more than a listener's queue holds", r, attempts.Load())
	}
}

func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EPIPE)
}

// TestGoroutinesBackToBaseline is defect 6 of the engine issue: the worker
// pools kept 64 flow and 16 dial workers for ever after a burst, and the
// sweeper and the reactor's loop never ended. After a burst of
// connections, once they are closed, goroutines come back to within a few
// of where they were, counting everything: idle workers end after a few
// seconds, the sweeper with the last flow it watched, the reactor with the
// last parked flow and the last handler holding it.
func TestGoroutinesBackToBaseline(t *testing.T) {
	be := startBackend(t, "echo", "", echo)
	c := startCaddy(t, map[string]any{"upstreams": upstreamsJSON(be.addr)})
	// Workers left by earlier tests (idle, or running UDP flows until
	// their server's idle timeout) only end during this test, so they can
	// only lower the count against this baseline.
	base := runtime.NumGoroutine()

	const n = 200
	var wg sync.WaitGroup
	conns := make(chan *net.TCPConn, n)
	for range n {
		wg.Go(func() {
			conn := c.dial(t)
			if _, err := exchange(conn, []byte("burst")); err != nil {
				t.Error(err)
			}
			conns <- conn
		})
	}
	wg.Wait()
	close(conns)
	peak := runtime.NumGoroutine()
	for conn := range conns {
		conn.Close()
	}
	eventually(t, 15*time.Second, "goroutines back to the baseline", func() error {
		if g := runtime.NumGoroutine(); g > base+2 {
			return fmt.Errorf("%d goroutines, %d before the burst (%d at its peak), %+v, %d dial workers",
				g, base, peak, pipe.ReadStats(), dialWorkers.Live())
		}
		return nil
	})
}
