// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// The scenarios beyond issue 4's tests: a TLS passthrough route chosen by
// SNI (its timed tests are in loads.go, beside the plain ones), descriptors
// after slow readers, and idle UDP flows. Like the idle test, each of the
// tests here runs on a freshly started proxy and measures it against a
// baseline taken just before its load.

// Test names: those -tests takes, and those of the samples they record.
const (
	sniIdleTest  = "sni-idle"      // records tlsIdleTest and sniIdleTest samples
	tlsIdleTest  = "tls-idle"      // idle TLS connections on the plain route
	slowTest     = "slow-idle"     // records slowTest (plain route) and sniSlowTest samples
	sniSlowTest  = "sni-slow-idle" // slow readers on the SNI route
	udpTest      = "udp-idle"
	slowConns    = 50       // connections of the slow-reader test
	slowChunk    = 16 << 10 // what a slow reader reads at a time
	slowPause    = time.Millisecond
	slowDeadline = time.Minute // for all the downloads
	udpTries     = 3           // datagrams a UDP flow sends before its echo is given up
)

// freshTests run before the timed tests, each on a freshly started proxy,
// in this order.
var freshTests = []string{idleTest, sniIdleTest, slowTest, udpTest}

// freshTitles are the fresh tests' names in the progress output.
var freshTitles = map[string]string{
	idleTest:    "idle connections",
	sniIdleTest: "idle TLS connections, plain route and SNI route",
	slowTest:    "slow readers, plain route and SNI route",
	udpTest:     "idle UDP flows",
}

// testAliases name groups of tests for -tests.
var testAliases = map[string][]string{
	"sni": {"sni-up", "sni-down", "sni-connrate", sniIdleTest},
}

// isScenarioTest reports whether a test, or a sample's test, is one of the
// scenarios' rather than issue 4's.
func isScenarioTest(test string) bool {
	switch test {
	case tlsIdleTest, slowTest, udpTest:
		return true
	}
	return strings.HasPrefix(test, "sni-")
}

// leanPeers are the peers each scenario test runs against in quick mode
// without -peers: godist, and the peer its goal compares it with when that
// costs a second or so; a smoke test of every path, not figures.
var leanPeers = map[string]bool{"godist": true}

// runs reports whether the peer runs the test in this run.
func (r *runner) runs(p *peer, test string) bool {
	if p.unsupported(test) != "" {
		return false
	}
	if r.opt.lean && isScenarioTest(test) {
		return leanPeers[p.ID] || test == udpTest && p.ID == "caddy-l4"
	}
	return true
}

// freshRun is one run of a fresh test: the proxy restarts before each.
type freshRun struct {
	test string // of the sample
	run  func() (sample, error)
}

// freshRuns are the runs of a fresh test against a peer: the idle test
// and the UDP test one each, the SNI idle and the slow readers one on the
// plain route and one on the SNI route.
func (r *runner) freshRuns(ctx context.Context, p *peer, test string, profile func(string) string) []freshRun {
	switch test {
	case idleTest:
		return []freshRun{{idleTest, func() (sample, error) {
			return r.idle(ctx, p, plainDest(p.front[kindEcho]), r.opt.idleConns, time.Second, profile("idle.heap.pprof"))
		}}}
	case sniIdleTest:
		return []freshRun{
			{tlsIdleTest, func() (sample, error) {
				return r.idle(ctx, p, dest{addr: p.front[kindTLSEcho], tls: r.bs.tls.client(sniNames[kindTLSEcho])},
					r.opt.idleConns, r.settle(), profile("tls-idle.heap.pprof"))
			}},
			{sniIdleTest, func() (sample, error) {
				return r.idle(ctx, p, r.sniDest(p, kindTLSEcho), r.opt.idleConns, r.settle(), profile("sni-idle.heap.pprof"))
			}},
		}
	case slowTest:
		return []freshRun{
			{slowTest, func() (sample, error) { return r.slowReaders(ctx, p, plainDest(p.front[kindHold])) }},
			{sniSlowTest, func() (sample, error) { return r.slowReaders(ctx, p, r.sniDest(p, kindTLSHold)) }},
		}
	case udpTest:
		return []freshRun{{udpTest, func() (sample, error) { return r.udpFlows(ctx, p, r.opt.udpFlows) }}}
	}
	return nil
}

// settle is how long the fresh tests let a proxy be before each
// measurement: after its start, and once the load is in place (idle flows
// park 25 to 50 ms after their last byte). Shorter in quick mode.
func (r *runner) settle() time.Duration {
	if r.opt.quick {
		return 300 * time.Millisecond
	}
	return time.Second
}

// slowReaders opens slowConns connections to a hold backend through d;
// each reads the backend's holdBytes 16 KiB at a time with a pause of 1 ms
// between reads, far slower than the backend writes, so that the proxy's
// writes to the client block and bytes pile up in it; then the connections
// stay open and quiet. It measures the proxy's descriptors and RSS after
// twice the settle time (2 s), against a baseline taken before.
func (r *runner) slowReaders(ctx context.Context, p *peer, d dest) (sample, error) {
	s := sample{IdleConns: slowConns}
	pid := p.srv.pid()
	if err := sleep(ctx, r.settle()); err != nil {
		return s, err
	}
	var err error
	if s.RSSBase, s.FDsBase, err = treeMemory(pid); err != nil {
		return s, err
	}
	fdsBefore, err := fdKinds(pid)
	if err != nil {
		return s, err
	}
	conns, err := dialAll(d, slowConns)
	if err != nil {
		return s, fmt.Errorf("connecting: %w", err)
	}
	// Afterwards the proxy may keep what is not the connections' (a pool
	// of pipes): wait for the connections' two sockets each to go.
	defer func() { r.closeIdle(conns, pid, max(s.FDsBase, s.FDs-2*slowConns)) }()
	t0 := time.Now()
	var read atomic.Int64
	var errs errorRecorder
	var wg sync.WaitGroup
	for _, c := range conns {
		wg.Go(func() {
			_ = c.SetReadDeadline(t0.Add(slowDeadline))
			defer func() { _ = c.SetReadDeadline(time.Time{}) }()
			buf := make([]byte, slowChunk)
			for got := 0; got < holdBytes; {
				n, err := c.Read(buf[:min(slowChunk, holdBytes-got)])
				got += n
				read.Add(int64(n))
				if err != nil {
					errs.record(fmt.Errorf("after %d bytes: %w", got, err))
					return
				}
				if ctx.Err() != nil {
					return
				}
				time.Sleep(slowPause)
			}
		})
	}
	if !waitGroup(&wg, slowDeadline+opTimeout) {
		return s, fmt.Errorf("slow readers still reading after %s", slowDeadline+opTimeout)
	}
	s.Seconds = time.Since(t0).Seconds()
	s.Downloaded = read.Load() / slowConns
	if errs.n.Load() > 0 {
		s.Errors, s.Error = errs.n.Load(), errs.first
		return s, fmt.Errorf("slow readers: %s", errs.first)
	}
	if err := ctx.Err(); err != nil {
		return s, err
	}
	if err := sleep(ctx, 2*r.settle()); err != nil {
		return s, err
	}
	if s.RSS, s.FDs, err = treeMemory(pid); err != nil {
		return s, err
	}
	fdsAfter, err := fdKinds(pid)
	if err != nil {
		return s, err
	}
	s.FDsGrew = map[string]int{}
	for k, n := range fdsAfter {
		if d := n - fdsBefore[k]; d != 0 {
			s.FDsGrew[k] = d
		}
	}
	for k, n := range fdsBefore {
		if _, ok := fdsAfter[k]; !ok && n != 0 {
			s.FDsGrew[k] = -n
		}
	}
	return s, nil
}

// closeIdle closes a fresh test's connections, waits for the backends to
// see them end and for the proxy to close its side: down to a few more
// descriptors than fdsBase.
func (r *runner) closeIdle(conns []net.Conn, pid, fdsBase int) {
	closeAll(conns)
	r.bs.drain(10 * time.Second)
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); {
		if _, fds, err := treeMemory(pid); err != nil || fds <= fdsBase+16 {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// udpFlows opens n UDP flows through the proxy, each a socket of its own
// (so a source port of its own) that sends one 64-byte datagram, gets it
// back, and then stays silent but open, within the proxy's flow timeout
// (udpFlowTimeout). It measures the proxy's RSS and descriptors, and for a
// Caddy its live heap, goroutine stacks and goroutines after a forced GC,
// each against a baseline taken before. The flows outlive the test in the
// proxy: the caller restarts it before any other test.
func (r *runner) udpFlows(ctx context.Context, p *peer, n int) (sample, error) {
	s := sample{Flows: n}
	pid := p.srv.pid()
	if err := sleep(ctx, r.settle()); err != nil {
		return s, err
	}
	var err error
	if s.RSSBase, s.FDsBase, err = treeMemory(pid); err != nil {
		return s, err
	}
	if p.srv.admin != "" {
		if s.Go, err = readGoStats(ctx, p.srv.admin); err != nil {
			return s, err
		}
	}
	front, err := net.ResolveUDPAddr("udp", p.udpFront)
	if err != nil {
		return s, err
	}
	t0 := time.Now()
	conns := make([]*net.UDPConn, n)
	defer func() {
		for _, c := range conns {
			if c != nil {
				_ = c.Close()
			}
		}
	}()
	var next atomic.Int64
	var errs errorRecorder
	var wg sync.WaitGroup
	for range connRateWorkers {
		wg.Go(func() {
			msg := make([]byte, messageSize)
			reply := make([]byte, 2*messageSize)
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil || errs.n.Load() > 0 {
					return
				}
				c, err := net.DialUDP("udp", nil, front)
				if err != nil {
					errs.record(err)
					return
				}
				conns[i] = c
				if err := udpEcho1(c, msg, reply); err != nil {
					errs.record(fmt.Errorf("flow %d: %w", i, err))
					return
				}
			}
		})
	}
	if !waitGroup(&wg, time.Minute) {
		return s, fmt.Errorf("opening %d UDP flows took over a minute", n)
	}
	s.Seconds = time.Since(t0).Seconds()
	if errs.n.Load() > 0 {
		s.Errors, s.Error = errs.n.Load(), errs.first
		return s, fmt.Errorf("opening UDP flows: %s", errs.first)
	}
	if err := sleep(ctx, r.settle()); err != nil {
		return s, err
	}
	if s.RSS, s.FDs, err = treeMemory(pid); err != nil {
		return s, err
	}
	if p.srv.admin != "" {
		if s.GoLoaded, err = readGoStats(ctx, p.srv.admin); err != nil {
			return s, err
		}
	}
	return s, nil
}

// udpEcho1 sends msg on a connected UDP socket and waits for it to come
// back, sending it again (udpTries times in all) if it does not within a
// second: a datagram may be lost.
func udpEcho1(c *net.UDPConn, msg, reply []byte) error {
	var err error
	for range udpTries {
		if _, err = c.Write(msg); err != nil {
			return err
		}
		_ = c.SetReadDeadline(time.Now().Add(time.Second))
		var n int
		n, err = c.Read(reply)
		if err == nil {
			if n != len(msg) {
				return fmt.Errorf("echo of %d bytes came back as %d", len(msg), n)
			}
			return nil
		}
		var ne net.Error
		if !errors.As(err, &ne) || !ne.Timeout() {
			return err
		}
	}
	return fmt.Errorf("no echo after %d datagrams: %w", udpTries, err)
}

// goStats are the Go runtime's figures of a Caddy, read through its admin
// endpoint after a forced garbage collection.
type goStats struct {
	HeapAlloc  int64 `json:"heap_alloc"`  // bytes of live heap objects
	HeapInuse  int64 `json:"heap_inuse"`  // bytes of in-use heap spans
	StackInuse int64 `json:"stack_inuse"` // bytes of goroutine stacks
	Goroutines int   `json:"goroutines"`
}

// statsClient asks the admin endpoint with a connection per request: a
// kept-alive one would be a descriptor and a goroutine more in the proxy
// for the next measurement.
var statsClient = &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: time.Minute}

// readGoStats forces two garbage collections (the second empties what
// sync.Pools kept through the first) through /debug/pprof/heap?gc=1, then
// reads the memory statistics of /debug/vars and the goroutine count of
// /debug/pprof/goroutine.
func readGoStats(ctx context.Context, admin string) (*goStats, error) {
	for range 2 {
		if _, err := readDebug(ctx, admin, "pprof/heap?gc=1"); err != nil {
			return nil, err
		}
	}
	vars, err := readDebug(ctx, admin, "vars")
	if err != nil {
		return nil, err
	}
	st, err := parseMemstats(vars)
	if err != nil {
		return nil, err
	}
	gr, err := readDebug(ctx, admin, "pprof/goroutine?debug=1")
	if err != nil {
		return nil, err
	}
	if st.Goroutines, err = parseGoroutineTotal(gr); err != nil {
		return nil, err
	}
	return &st, nil
}

// readDebug returns the body of one of Caddy's admin /debug/ endpoints.
func readDebug(ctx context.Context, admin, what string) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+admin+"/debug/"+what, nil)
	if err != nil {
		return nil, err
	}
	resp, err := statsClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, fmt.Errorf("/debug/%s: %w", what, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("/debug/%s: %s: %s", what, resp.Status, strings.TrimSpace(string(b[:min(len(b), 512)])))
	}
	return b, nil
}

// parseMemstats takes the memory figures from the JSON of /debug/vars
// (expvar's "memstats", runtime.MemStats).
func parseMemstats(b []byte) (goStats, error) {
	var v struct {
		Memstats *struct {
			HeapAlloc, HeapInuse, StackInuse int64
		} `json:"memstats"`
	}
	if err := json.Unmarshal(b, &v); err != nil {
		return goStats{}, fmt.Errorf("/debug/vars: %w", err)
	}
	if v.Memstats == nil || v.Memstats.HeapAlloc == 0 {
		return goStats{}, errors.New("/debug/vars: no memstats")
	}
	return goStats{HeapAlloc: v.Memstats.HeapAlloc, HeapInuse: v.Memstats.HeapInuse, StackInuse: v.Memstats.StackInuse}, nil
}

// parseGoroutineTotal reads N from the first line of a debug=1 goroutine
// profile, "goroutine profile: total N".
func parseGoroutineTotal(b []byte) (int, error) {
	line, _, _ := bytes.Cut(b, []byte("\n"))
	rest, ok := bytes.CutPrefix(bytes.TrimSpace(line), []byte("goroutine profile: total "))
	if !ok {
		return 0, fmt.Errorf("/debug/pprof/goroutine: first line %q", line)
	}
	n, err := strconv.Atoi(string(rest))
	if err != nil {
		return 0, fmt.Errorf("/debug/pprof/goroutine: total: %w", err)
	}
	return n, nil
}
