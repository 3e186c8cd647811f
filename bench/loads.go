// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// The load tests. Each timed test connects, runs for the warm-up, takes a
// snapshot (bytes or operations so far, the proxy's CPU time, this
// process's), runs for the measured duration, takes another and stops:
// figures come from the difference, over the time that really passed
// between the snapshots. Every loop stops on a flag set at the end of its
// test and on a count far above what the test can reach; every socket
// operation that could wait forever has a deadline or is ended by closing
// its connection.

// Sizes and counts of the tests, as PEERS.md measured them.
const (
	connRateWorkers = 16 // each does connect, 64 B echo, close in a loop
	pingPongConns   = 16 // persistent connections, one 64-byte message in flight on each
	messageSize     = 64
	opTimeout       = 5 * time.Second // any single connect, write or read
	maxLoopCount    = 1 << 30         // a bound no test reaches: loops end on time
)

// test names, in the order they run and appear: issue 4's, then the SNI
// scenario's.
var timedTests = []string{"up1", "up8", "down1", "down8", "connrate", "pingpong", "sni-up", "sni-down", "sni-connrate"}

const idleTest = "idle"

// dest is where a test's clients connect: a route of a peer, plain or with
// a TLS session through it.
type dest struct {
	addr string
	tls  *tls.Config // nil: plain TCP
}

func plainDest(addr string) dest { return dest{addr: addr} }

// sniDest is the SNI route of a peer to one TLS backend: the client names
// the backend in its ClientHello. Direct has no route: it connects to the
// backend itself, with the same name.
func (r *runner) sniDest(p *peer, k backendKind) dest {
	addr := p.sniFront
	if addr == "" {
		addr = r.bs.of(k).addrs[0]
	}
	return dest{addr: addr, tls: r.bs.tls.client(sniNames[k])}
}

// dial connects, with the TLS handshake done when d is a TLS route.
func (d dest) dial(dialer *net.Dialer) (net.Conn, error) {
	c, err := dialer.Dial("tcp", d.addr)
	if err != nil || d.tls == nil {
		return c, err
	}
	tc := tls.Client(c, d.tls)
	_ = c.SetDeadline(time.Now().Add(opTimeout))
	if err := tc.Handshake(); err != nil {
		_ = c.Close()
		return nil, fmt.Errorf("tls handshake with %s: %w", d.tls.ServerName, err)
	}
	_ = c.SetDeadline(time.Time{})
	return tc, nil
}

// sample is one run of one test against one peer: the raw figures.
type sample struct {
	Test       string             `json:"test"`
	Repeat     int                `json:"repeat"`
	Seconds    float64            `json:"seconds,omitempty"` // the measured window
	Bytes      int64              `json:"bytes,omitempty"`
	Conns      int64              `json:"conns,omitempty"`
	RoundTrips int64              `json:"round_trips,omitempty"`
	ProxyCPU   float64            `json:"proxy_cpu_s,omitempty"` // utime+stime of the proxy's processes in the window
	LoadCPU    float64            `json:"load_cpu_s,omitempty"`  // of this process, which runs the backends too
	CPUBusy    map[string]float64 `json:"cpu_busy,omitempty"`    // fraction of each pinned CPU busy, everything counted
	Other      map[string]float64 `json:"other,omitempty"`       // fraction of each pinned CPU that other processes used
	Retries    int                `json:"retries,omitempty"`     // times the test was run again because of other load
	Spoiled    bool               `json:"spoiled,omitempty"`     // other load took over half a pinned CPU even so
	P50us      float64            `json:"p50_us,omitempty"`
	P99us      float64            `json:"p99_us,omitempty"`
	IdleConns  int                `json:"idle_conns,omitempty"`
	RSSBase    int64              `json:"rss_base,omitempty"`
	RSS        int64              `json:"rss,omitempty"`
	FDsBase    int                `json:"fds_base,omitempty"`
	FDs        int                `json:"fds,omitempty"`
	Flows      int                `json:"flows,omitempty"`      // UDP flows held
	FDsGrew    map[string]int     `json:"fds_grew,omitempty"`   // slow readers: what the proxy's descriptors grew by, by kind (socket, pipe, ...)
	Downloaded int64              `json:"downloaded,omitempty"` // bytes each slow reader read before going idle
	Go         *goStats           `json:"go_base,omitempty"`    // Go's figures of a Go proxy before the load (after a forced GC)
	GoLoaded   *goStats           `json:"go_loaded,omitempty"`  // and with the load on
	Errors     int64              `json:"errors,omitempty"`
	Error      string             `json:"error,omitempty"`  // the first error of an operation, if any
	Failed     string             `json:"failed,omitempty"` // why the test gave no figure, if it did not
}

// runner runs tests with the options of one benchmark run.
type runner struct {
	opt options
	pin pinning
	bs  *backends

	hist [pingPongConns][]uint32 // ping-pong histograms, reused

	ksoftirqd map[int]int // CPU → pid of its ksoftirqd thread
}

// snapshot is the state at one end of a measured window.
type snapshot struct {
	at       time.Time
	proxyCPU float64
	loadCPU  float64
	cpus     map[int]cpuTimes
	softirq  map[int]float64 // CPU time of each CPU's ksoftirqd thread
}

func (r *runner) snap(p *peer) (snapshot, error) {
	s := snapshot{at: time.Now(), loadCPU: selfCPU(), cpus: readCPUTimes(), softirq: map[int]float64{}}
	for cpu, pid := range r.ksoftirqd {
		if st, err := readProcStat(pid); err == nil {
			s.softirq[cpu] = float64(st.utime+st.stime) / clockTicks
		}
	}
	if p.srv != nil {
		var err error
		if s.proxyCPU, err = treeCPU(p.srv.pid()); err != nil {
			return s, err
		}
	}
	return s, nil
}

// window fills the sample's time and CPU figures from two snapshots.
func (r *runner) window(p *peer, s *sample, a, b snapshot) {
	s.Seconds = b.at.Sub(a.at).Seconds()
	s.ProxyCPU = b.proxyCPU - a.proxyCPU
	s.LoadCPU = b.loadCPU - a.loadCPU
	if !r.pin.enabled {
		return
	}
	// What processes used on each pinned CPU, less what ours used, is what
	// other processes used: the machine may be shared.
	s.CPUBusy = map[string]float64{}
	s.Other = map[string]float64{}
	for name, cpu := range map[string]int{"load": r.pin.loadCPU, "proxy": r.pin.proxyCPU} {
		ta, tb := a.cpus[cpu], b.cpus[cpu]
		if tb.total <= ta.total || name == "proxy" && p.srv == nil {
			continue // direct leaves the proxy's CPU idle, free for others
		}
		total := float64(tb.total - ta.total)
		s.CPUBusy[name] = float64(tb.busy-ta.busy) / total
		ours := s.LoadCPU
		if name == "proxy" {
			ours = s.ProxyCPU
		}
		// ksoftirqd works for whoever sends on that CPU: loopback packets
		// our processes sent, mostly.
		ours += b.softirq[cpu] - a.softirq[cpu]
		s.Other[name] = max(0, float64(tb.task-ta.task)/total-ours/s.Seconds)
	}
}

// sleep waits for d or until ctx is done.
func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// waitQuiet waits, up to limit, for a moment when other processes use no
// more than the -max-other share of either pinned CPU, sampled over 500 ms
// with the load idle, and returns what they used in the last sample.
func (r *runner) waitQuiet(ctx context.Context, p *peer, limit time.Duration) float64 {
	if !r.pin.enabled {
		return 0
	}
	deadline := time.Now().Add(limit)
	for {
		a, err := r.snap(p)
		if err != nil {
			return 0
		}
		if sleep(ctx, 500*time.Millisecond) != nil {
			return 0
		}
		b, err := r.snap(p)
		if err != nil {
			return 0
		}
		var s sample
		r.window(p, &s, a, b)
		_, other := busiestOther(s)
		if other <= r.opt.maxOther || time.Now().After(deadline) {
			return other
		}
	}
}

// measure runs the warm-up and the window of a timed test whose load is
// already running, and returns the count read by counter over the window.
func (r *runner) measure(ctx context.Context, p *peer, s *sample, counter func() int64, onStart func()) (int64, error) {
	if err := sleep(ctx, r.opt.warmup); err != nil {
		return 0, err
	}
	a, err := r.snap(p)
	if err != nil {
		return 0, err
	}
	ca := counter()
	if onStart != nil {
		onStart()
	}
	if err := sleep(ctx, r.opt.duration); err != nil {
		return 0, err
	}
	b, err := r.snap(p)
	if err != nil {
		return 0, err
	}
	cb := counter()
	r.window(p, s, a, b)
	return cb - ca, nil
}

// errorRecorder counts errors and keeps the first one's text.
type errorRecorder struct {
	n     atomic.Int64
	once  sync.Once
	first string
}

func (e *errorRecorder) record(err error) {
	e.n.Add(1)
	e.once.Do(func() { e.first = err.Error() })
}

// dialAll opens n connections to d, or none.
func dialAll(d dest, n int) ([]net.Conn, error) {
	conns := make([]net.Conn, 0, n)
	dialer := net.Dialer{Timeout: opTimeout}
	for range n {
		c, err := d.dial(&dialer)
		if err != nil {
			closeAll(conns)
			return nil, err
		}
		conns = append(conns, c)
	}
	return conns, nil
}

func closeAll(conns []net.Conn) {
	for _, c := range conns {
		if c != nil {
			_ = c.Close()
		}
	}
}

// waitGroup waits for wg up to timeout, and reports whether it finished.
func waitGroup(wg *sync.WaitGroup, timeout time.Duration) bool {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
		return true
	case <-time.After(timeout):
		return false
	}
}

// finish closes a test's connections, waits for its goroutines and for the
// backends to see every connection end, so that nothing of one test runs
// into the next.
func (r *runner) finish(conns []net.Conn, wg *sync.WaitGroup) error {
	closeAll(conns)
	if !waitGroup(wg, 10*time.Second) {
		return fmt.Errorf("load goroutines still running 10s after the end")
	}
	if left := r.bs.drain(10 * time.Second); left > 0 {
		return fmt.Errorf("%d backend connections still open 10s after the end", left)
	}
	return nil
}

// throughput streams 256 KiB writes over n connections: up to the sink, or
// down from the source. Bytes are counted where they arrive. With sni, the
// connections are TLS sessions through the SNI route, and the bytes those
// of the plaintext (the ciphertext is 0.14% more: 22 bytes a 16 KiB record).
func (r *runner) throughput(ctx context.Context, p *peer, up bool, n int, sni bool) (sample, error) {
	var s sample
	sink, source := kindSink, kindSource
	if sni {
		sink, source = kindTLSSink, kindTLSSource
	}
	d := plainDest(p.front[source])
	switch {
	case up && sni:
		d = r.sniDest(p, sink)
	case up:
		d = plainDest(p.front[sink])
	case sni:
		d = r.sniDest(p, source)
	}
	conns, err := dialAll(d, n)
	if err != nil {
		return s, err
	}
	var received atomic.Int64
	var errs errorRecorder
	var wg sync.WaitGroup
	for _, c := range conns {
		if up {
			wg.Go(func() {
				for range maxLoopCount {
					if _, err := c.Write(bulkData); err != nil {
						return
					}
				}
			})
			continue
		}
		wg.Go(func() {
			buf := bulkBuffers.Get().(*[]byte)
			defer bulkBuffers.Put(buf)
			for range maxLoopCount {
				m, err := c.Read(*buf)
				received.Add(int64(m))
				if err != nil {
					if err == io.EOF {
						errs.record(fmt.Errorf("the proxy closed a bulk connection"))
					}
					return
				}
			}
		})
	}
	counter := received.Load
	if up {
		counter = r.bs.of(sink).received.Load
	}
	s.Bytes, err = r.measure(ctx, p, &s, counter, nil)
	ferr := r.finish(conns, &wg)
	s.Errors, s.Error = errs.n.Load(), errs.first
	if err == nil {
		err = ferr
	}
	if err == nil && s.Bytes == 0 {
		err = fmt.Errorf("no byte moved in %.1fs", s.Seconds)
	}
	return s, err
}

// connRate runs workers that each connect, echo 64 bytes and close, in a
// loop, and counts the connections completed. On a TLS route each
// connection is a full TLS handshake, the echo and a close_notify.
func (r *runner) connRate(ctx context.Context, p *peer, addr dest) (sample, error) {
	var s sample
	var stop atomic.Bool
	var done atomic.Int64
	var errs errorRecorder
	var wg sync.WaitGroup
	dialer := net.Dialer{Timeout: opTimeout}
	for range connRateWorkers {
		wg.Go(func() {
			msg := make([]byte, messageSize)
			reply := make([]byte, messageSize)
			for range maxLoopCount {
				if stop.Load() {
					return
				}
				if err := echoOnce(&dialer, addr, msg, reply); err != nil {
					errs.record(err)
					time.Sleep(10 * time.Millisecond) // do not spin on a refusing proxy
					continue
				}
				done.Add(1)
			}
		})
	}
	var err error
	s.Conns, err = r.measure(ctx, p, &s, done.Load, nil)
	stop.Store(true)
	ferr := r.finish(nil, &wg)
	s.Errors, s.Error = errs.n.Load(), errs.first
	if err == nil {
		err = ferr
	}
	if err == nil && s.Conns == 0 {
		err = fmt.Errorf("no connection completed in %.1fs: %s", s.Seconds, s.Error)
	}
	return s, err
}

// echoOnce connects, sends msg, reads as many bytes back and closes.
func echoOnce(d *net.Dialer, addr dest, msg, reply []byte) error {
	c, err := addr.dial(d)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(opTimeout)); err != nil {
		return err
	}
	if _, err := c.Write(msg); err != nil {
		return err
	}
	_, err = io.ReadFull(c, reply)
	return err
}

// histBuckets is the ping-pong histogram's size: 1 µs buckets up to 100 ms,
// and one for everything slower.
const histBuckets = 100_001

// pingPong keeps one 64-byte message in flight on each of 16 persistent
// connections and records each round trip's time.
func (r *runner) pingPong(ctx context.Context, p *peer) (sample, error) {
	var s sample
	conns, err := dialAll(plainDest(p.front[kindEcho]), pingPongConns)
	if err != nil {
		return s, err
	}
	const (
		warming = iota
		measuring
		stopping
	)
	var phase atomic.Int32
	var errs errorRecorder
	var wg sync.WaitGroup
	for i, c := range conns {
		if r.hist[i] == nil {
			r.hist[i] = make([]uint32, histBuckets)
		}
		h := r.hist[i]
		clear(h)
		wg.Go(func() {
			msg := make([]byte, messageSize)
			reply := make([]byte, messageSize)
			for range maxLoopCount {
				ph := phase.Load()
				if ph == stopping {
					return
				}
				t0 := time.Now()
				if _, err := c.Write(msg); err != nil {
					errs.record(err)
					return
				}
				if _, err := io.ReadFull(c, reply); err != nil {
					if phase.Load() != stopping {
						errs.record(err)
					}
					return
				}
				if ph == measuring {
					us := int(time.Since(t0) / time.Microsecond)
					h[min(us, histBuckets-1)]++
				}
			}
		})
	}
	count := func() int64 { return 0 }
	_, err = r.measure(ctx, p, &s, count, func() { phase.Store(measuring) })
	phase.Store(stopping)
	ferr := r.finish(conns, &wg)
	if ferr != nil {
		// the goroutines may still write the histograms: leave them
		return s, ferr
	}
	s.Errors, s.Error = errs.n.Load(), errs.first
	if err != nil {
		return s, err
	}
	var merged [histBuckets]uint64
	for i := range conns {
		for b, n := range r.hist[i] {
			merged[b] += uint64(n)
			s.RoundTrips += int64(n)
		}
	}
	if s.RoundTrips == 0 {
		return s, fmt.Errorf("no round trip in %.1fs: %s", s.Seconds, s.Error)
	}
	s.P50us = percentile(merged[:], s.RoundTrips, 0.50)
	s.P99us = percentile(merged[:], s.RoundTrips, 0.99)
	return s, nil
}

// percentile returns the bucket (in µs) below which a fraction q of the
// n samples of hist fall.
func percentile(hist []uint64, n int64, q float64) float64 {
	rank := uint64(q * float64(n))
	if rank >= uint64(n) {
		rank = uint64(n) - 1
	}
	var seen uint64
	for b, c := range hist {
		seen += c
		if seen > rank {
			return float64(b)
		}
	}
	return float64(len(hist) - 1)
}

// idle opens n connections to d through the proxy, each after one echoed
// byte (on a TLS route, one record each way), and measures the proxy's RSS
// and descriptors against a baseline taken before, each after settle. The
// proxy should be freshly started: memory a Go process freed earlier would
// otherwise be reused, and hide the cost.
func (r *runner) idle(ctx context.Context, p *peer, d dest, n int, settle time.Duration, heapProfile string) (sample, error) {
	s := sample{IdleConns: n}
	pid := p.srv.pid()
	if err := sleep(ctx, settle); err != nil { // let the start settle
		return s, err
	}
	var err error
	if s.RSSBase, s.FDsBase, err = treeMemory(pid); err != nil {
		return s, err
	}
	// With -pprof, Go's memory statistics before and with the connections
	// open tell stacks from heap.
	profiling := heapProfile != "" && p.srv.admin != ""
	base := strings.TrimSuffix(heapProfile, "heap.pprof")
	if profiling {
		if err := fetchDebug(ctx, p.srv.admin, "vars", base+"vars-before.json"); err != nil {
			logf("  /debug/vars: %v", err)
		}
	}
	t0 := time.Now()
	conns := make([]net.Conn, n)
	var next atomic.Int64
	var errs errorRecorder
	var wg sync.WaitGroup
	dialer := net.Dialer{Timeout: opTimeout}
	for range connRateWorkers {
		wg.Go(func() {
			b := make([]byte, 1)
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil || errs.n.Load() > 0 {
					return
				}
				c, err := d.dial(&dialer)
				if err != nil {
					errs.record(err)
					return
				}
				conns[i] = c
				_ = c.SetDeadline(time.Now().Add(opTimeout))
				if _, err := c.Write(b); err != nil {
					errs.record(err)
					return
				}
				if _, err := io.ReadFull(c, b); err != nil {
					errs.record(fmt.Errorf("connection %d: %w", i, err))
					return
				}
				_ = c.SetDeadline(time.Time{})
			}
		})
	}
	if !waitGroup(&wg, time.Minute) {
		return s, fmt.Errorf("opening %d connections took over a minute", n) // the conns leak into the next test: give up
	}
	s.Seconds = time.Since(t0).Seconds()
	defer r.closeIdle(conns, pid, s.FDsBase)
	if errs.n.Load() > 0 {
		s.Errors, s.Error = errs.n.Load(), errs.first
		return s, fmt.Errorf("opening idle connections: %s", errs.first)
	}
	if err := sleep(ctx, settle); err != nil {
		return s, err
	}
	if s.RSS, s.FDs, err = treeMemory(pid); err != nil {
		return s, err
	}
	if profiling {
		for what, path := range map[string]string{
			"pprof/heap":              heapProfile,
			"pprof/goroutine?debug=1": base + "goroutine.txt",
			"vars":                    base + "vars-open.json",
		} {
			if err := fetchDebug(ctx, p.srv.admin, what, path); err != nil {
				logf("  /debug/%s: %v", what, err)
			}
		}
	}
	return s, nil
}

// fetchDebug saves one of Caddy's admin /debug/ endpoints to path.
func fetchDebug(ctx context.Context, admin, what, path string) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+admin+"/debug/"+what, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return fmt.Errorf("%s: %s: %s", what, resp.Status, strings.TrimSpace(string(b)))
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// runTimed runs one timed test, with a CPU profile of the proxy over the
// same window when cpuProfile is set (Caddy only).
func (r *runner) runTimed(ctx context.Context, p *peer, test, cpuProfile string) (sample, error) {
	var profErr chan error
	if cpuProfile != "" && p.srv != nil && p.srv.admin != "" {
		profErr = make(chan error, 1)
		go func() {
			// starts with the warm-up and lasts as long as the window
			secs := max(1, int(r.opt.duration.Seconds()))
			profErr <- fetchDebug(ctx, p.srv.admin, fmt.Sprintf("pprof/profile?seconds=%d", secs), cpuProfile)
		}()
	}
	var s sample
	var err error
	switch test {
	case "up1":
		s, err = r.throughput(ctx, p, true, 1, false)
	case "up8":
		s, err = r.throughput(ctx, p, true, 8, false)
	case "down1":
		s, err = r.throughput(ctx, p, false, 1, false)
	case "down8":
		s, err = r.throughput(ctx, p, false, 8, false)
	case "connrate":
		s, err = r.connRate(ctx, p, plainDest(p.front[kindEcho]))
	case "sni-up":
		s, err = r.throughput(ctx, p, true, 1, true)
	case "sni-down":
		s, err = r.throughput(ctx, p, false, 1, true)
	case "sni-connrate":
		s, err = r.connRate(ctx, p, r.sniDest(p, kindTLSEcho))
	case "pingpong":
		s, err = r.pingPong(ctx, p)
	default:
		err = fmt.Errorf("unknown test %q", test)
	}
	if profErr != nil {
		if perr := <-profErr; perr != nil {
			logf("  cpu profile: %v", perr)
		}
	}
	s.Test = test
	return s, err
}
