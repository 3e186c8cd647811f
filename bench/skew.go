// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// The skewed-load scenario (issue 12): consistent hashing with bounded
// loads under a hot key. Many client IPs on loopback (127.1.x.y: Linux
// routes all of 127/8 to lo, so a socket binds to any of them without
// configuration) open long-lived connections through a proxy that hashes
// by source IP to the backends of this file; one IP alone makes a large
// share of them. The proxies: godist with `hash_key ip`, with and without
// `balance_factor`; HAProxy with `balance source` and `hash-type
// consistent`, with and without `hash-balance-factor` at the same factor.
// Each runs in a process of its own, started for the scenario and stopped
// after it.
//
// Each backend tells a client which backend it is (one byte, its index)
// and counts its open connections; the load tool samples those counts
// through the run. A key's first choice is what a connection from it
// reaches on the idle proxy (probed one key at a time, each connection
// ended on both sides before the next), which no cap can change: every
// load is 0 then. Then a second phase with one more backend: the keys
// whose probe reaches another backend are the keys moved.

const skewTest = "skew"

// skewParams are the scenario's settings: the mix, the arrivals and
// departures, the windows.
type skewParams struct {
	Keys        int          `json:"keys"`      // client IPs
	HotShare    float64      `json:"hot_share"` // of the arrivals, from the first IP alone
	ZipfS       float64      `json:"zipf_s"`    // exponent of the Zipf law over the other IPs
	Backends    int          `json:"backends"`  // in the first phase; the second has one more
	Factor      float64      `json:"factor"`    // c, for godist and HAProxy (×100)
	Rate        float64      `json:"rate"`      // arrivals per second
	MeanLife    jsonDuration `json:"mean_life"` // of a connection, exponential, cut at 5×
	Warmup      jsonDuration `json:"warmup"`    // before sampling: the active count ramps up
	Measure     jsonDuration `json:"measure"`   // the sampled window
	SampleEvery jsonDuration `json:"sample_every"`
	Seed        uint64       `json:"seed"` // of the arrivals, the same for every proxy
}

// jsonDuration is a duration written as text ("1.5s") in the JSON report.
type jsonDuration time.Duration

func (d jsonDuration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }
func (d jsonDuration) String() string               { return time.Duration(d).String() }

// skewSeed is the seed of every run's arrivals: pinned, so that runs and
// proxies see the same keys at the same moments for the same time.
const skewSeed = 2018

// newSkewParams returns the scenario's settings for a run: 1000 keys, 400
// active connections on average (400 arrivals/s, 1 s each), sampled over
// twice -duration after a warm-up of three lifetimes; in quick mode 128
// keys and 200 connections (1000/s, 200 ms each) over 1 s.
func newSkewParams(opt options) skewParams {
	p := skewParams{
		Keys: 1000, HotShare: 0.3, ZipfS: 1, Backends: 4, Factor: opt.skewFactor,
		Rate: 400, MeanLife: jsonDuration(time.Second), Warmup: jsonDuration(3 * time.Second),
		Measure: jsonDuration(2 * opt.duration), SampleEvery: jsonDuration(10 * time.Millisecond), Seed: skewSeed,
	}
	if opt.quick {
		p.Keys, p.Rate = 128, 1000
		p.MeanLife, p.Warmup, p.Measure = jsonDuration(200*time.Millisecond), jsonDuration(600*time.Millisecond), jsonDuration(opt.duration)
	}
	return p
}

// skewKeyIP is the source address of key i: 127.1.0.1, 127.1.0.2, ...
func skewKeyIP(i int) netip.Addr {
	n := i + 1
	return netip.AddrFrom4([4]byte{127, 1, byte(n >> 8), byte(n)})
}

// arrival is one connection of the load: when it opens, from which key,
// for how long.
type arrival struct {
	at, life time.Duration
	key      int
}

// skewSchedule draws the arrivals of a run: Poisson arrivals at p.Rate
// until the end of the measured window, keys from the skewed mix,
// exponential lifetimes cut at five times their mean. The seed is pinned.
func skewSchedule(p skewParams) []arrival {
	rng := rand.New(rand.NewPCG(p.Seed, 12))
	cdf := skewCDF(p.Keys, p.ZipfS, p.HotShare)
	end := time.Duration(p.Warmup + p.Measure)
	var out []arrival
	t := time.Duration(0)
	for range maxLoopCount {
		t += time.Duration(rng.ExpFloat64() / p.Rate * float64(time.Second))
		if t >= end {
			break
		}
		life := time.Duration(min(rng.ExpFloat64(), 5) * float64(p.MeanLife))
		out = append(out, arrival{at: t, life: life, key: drawKey(rng, cdf)})
	}
	return out
}

// skewBackend answers each connection with its index, one byte, then
// reads until the client goes, counting the connections open.
type skewBackend struct {
	index  byte
	ln     net.Listener
	addr   string
	active atomic.Int64

	mu    sync.Mutex
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

// skewPort is the port of every skew backend, each on an address of its
// own (127.2.0.1, 127.2.0.2, ...). Fixed, unlike every other port of the
// benchmark: godist hashes the dial address, so with fixed addresses each
// key has the same first choice in every run on every machine, and the
// figures, which depend on where the hot keys land, can be compared
// across runs. HAProxy's ring depends on the servers' ids alone.
const skewPort = 7207

// startSkewBackends listens on 127.2.0.1:skewPort and on, or on free
// ports where those are taken (fixed reports whether all were free).
func startSkewBackends(n int) (bs []*skewBackend, fixed bool, err error) {
	fixed = true
	for i := range n {
		ln, err := net.Listen("tcp", netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 2, 0, byte(i + 1)}), skewPort).String())
		if err != nil {
			fixed = false
			ln, err = net.Listen("tcp", "127.0.0.1:0")
		}
		if err != nil {
			stopSkewBackends(bs)
			return nil, false, fmt.Errorf("skew backend: %w", err)
		}
		b := &skewBackend{index: byte(i), ln: ln, addr: ln.Addr().String(), conns: map[net.Conn]struct{}{}}
		b.wg.Go(b.serve)
		bs = append(bs, b)
	}
	return bs, fixed, nil
}

func (b *skewBackend) serve() {
	for {
		c, err := b.ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			time.Sleep(10 * time.Millisecond) // out of descriptors, say
			continue
		}
		b.active.Add(1)
		b.mu.Lock()
		b.conns[c] = struct{}{}
		b.mu.Unlock()
		b.wg.Go(func() {
			defer func() {
				_ = c.Close()
				b.mu.Lock()
				delete(b.conns, c)
				b.mu.Unlock()
				b.active.Add(-1)
			}()
			if _, err := c.Write([]byte{b.index}); err != nil {
				return
			}
			_, _ = io.Copy(io.Discard, c) // nothing comes: it ends at EOF
		})
	}
}

// stopSkewBackends closes the listeners and every connection, and waits
// for the goroutines, at most 5 s.
func stopSkewBackends(bs []*skewBackend) {
	for _, b := range bs {
		_ = b.ln.Close()
		b.mu.Lock()
		for c := range b.conns {
			_ = c.Close()
		}
		b.mu.Unlock()
	}
	for _, b := range bs {
		done := make(chan struct{})
		go func() { b.wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(5 * time.Second):
		}
	}
}

// waitSkewIdle waits until no backend holds a connection, up to timeout,
// and reports whether none does.
func waitSkewIdle(bs []*skewBackend, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for {
		n := int64(0)
		for _, b := range bs {
			n += b.active.Load()
		}
		if n == 0 {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(time.Millisecond)
	}
}

// ipBindAddressNoPort is Linux's IP_BIND_ADDRESS_NO_PORT: a socket bound
// to an address with port 0 gets its port at connect, chosen for the
// four-tuple, so that one source IP can make many connections.
const ipBindAddressNoPort = 24

// skewDialer dials from the key's address.
func skewDialer(ip netip.Addr) *net.Dialer {
	return &net.Dialer{
		Timeout:   opTimeout,
		LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(ip, 0)),
		Control: func(_, _ string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.IPPROTO_IP, ipBindAddressNoPort, 1)
			})
			return errors.Join(err, serr)
		},
	}
}

// skewConnect connects from the key's address through the proxy and
// returns the connection and the backend it reached.
func skewConnect(front string, ip netip.Addr) (net.Conn, int, error) {
	c, err := skewDialer(ip).Dial("tcp", front)
	if err != nil {
		return nil, -1, err
	}
	var b [1]byte
	_ = c.SetReadDeadline(time.Now().Add(opTimeout))
	if _, err := io.ReadFull(c, b[:]); err != nil {
		_ = c.Close()
		return nil, -1, fmt.Errorf("from %s: no backend answered: %w", ip, err)
	}
	_ = c.SetReadDeadline(time.Time{})
	return c, int(b[0]), nil
}

// skewProbe returns the backend each key reaches on the idle proxy: one
// connection at a time, each half-closed and read to its end (the proxy
// has then closed both sides) and the backends idle again before the
// next, so that no count but 0 is ever seen by a cap.
func skewProbe(ctx context.Context, front string, keys int, bs []*skewBackend) ([]int, error) {
	homes := make([]int, keys)
	for k := range keys {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		c, b, err := skewConnect(front, skewKeyIP(k))
		if err != nil {
			return nil, fmt.Errorf("probe: %w", err)
		}
		homes[k] = b
		_ = c.(*net.TCPConn).CloseWrite()
		_ = c.SetReadDeadline(time.Now().Add(opTimeout))
		_, _ = io.Copy(io.Discard, c)
		_ = c.Close()
		if !waitSkewIdle(bs, 2*time.Second) {
			return nil, errors.New("probe: a backend connection still open 2s after its client closed")
		}
		time.Sleep(time.Millisecond) // and the proxy's own count with it
	}
	return homes, nil
}

// skewLoadResult is what one run of the arrivals saw.
type skewLoadResult struct {
	samples    [][]int64 // active connections per backend, every SampleEvery through the measured window
	backend    []int     // per arrival: the backend it reached, -1 if it failed
	errors     int
	firstError string
}

// runSkewLoad plays the arrivals through the proxy at front: each opens
// at its time from its key's address, learns its backend, stays open for
// its life and closes. The backends' counts are sampled through the
// measured window. Every wait is bounded: a connection's operations by
// opTimeout, the whole by the schedule's end plus the longest life plus
// 10 s.
func runSkewLoad(ctx context.Context, front string, sched []arrival, bs []*skewBackend, p skewParams) skewLoadResult {
	res := skewLoadResult{backend: make([]int, len(sched))}
	var errs errorRecorder
	var wg sync.WaitGroup
	stop := make(chan struct{})
	start := time.Now()

	// The sampler.
	sampled := make(chan [][]int64, 1)
	go func() {
		var out [][]int64
		first := start.Add(time.Duration(p.Warmup))
		end := first.Add(time.Duration(p.Measure))
		if sleep(ctx, time.Until(first)) != nil {
			sampled <- out
			return
		}
		tick := time.NewTicker(time.Duration(p.SampleEvery))
		defer tick.Stop()
		for now := time.Now(); now.Before(end); now = time.Now() {
			row := make([]int64, len(bs))
			for i, b := range bs {
				row[i] = b.active.Load()
			}
			out = append(out, row)
			select {
			case <-tick.C:
			case <-ctx.Done():
				sampled <- out
				return
			}
		}
		sampled <- out
	}()

	longest := time.Duration(0)
	for j, a := range sched {
		longest = max(longest, a.life)
		if sleep(ctx, time.Until(start.Add(a.at))) != nil {
			for k := j; k < len(sched); k++ {
				res.backend[k] = -1
			}
			break
		}
		wg.Go(func() {
			c, b, err := skewConnect(front, skewKeyIP(a.key))
			res.backend[j] = b
			if err != nil {
				errs.record(err)
				return
			}
			defer c.Close()
			t := time.NewTimer(time.Until(start.Add(a.at + a.life)))
			defer t.Stop()
			select {
			case <-t.C:
			case <-stop:
			case <-ctx.Done():
			}
		})
	}
	limit := longest + 10*time.Second
	if !waitGroup(&wg, limit) {
		close(stop)
		errs.record(fmt.Errorf("connections still open %s after the last arrival", limit))
		waitGroup(&wg, 5*time.Second)
	}
	res.samples = <-sampled
	res.errors, res.firstError = int(errs.n.Load()), errs.first
	if !waitSkewIdle(bs, 10*time.Second) {
		res.errors++
		if res.firstError == "" {
			res.firstError = "backend connections still open 10s after the last client closed"
		}
	}
	return res
}

// skewProxy is one of the scenario's proxy configurations.
type skewProxy struct {
	id, label string
	factor    float64 // 0: none
	haproxy   bool
}

// skewServer writes the proxy's config for the given backends and returns
// it, not started; a proxy that cannot take the config comes back with
// why, and no server.
func skewServer(ctx context.Context, px skewProxy, caddyBin, dir string, backends []string) (srv *server, front, unsupported string, err error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, "", "", err
	}
	if front, err = freePort(); err != nil {
		return nil, "", "", err
	}
	if px.haproxy {
		bin, _ := exec.LookPath("haproxy")
		srv = &server{name: px.id, dir: dir, logPath: filepath.Join(dir, "haproxy.log"), env: proxyEnv(dir), ports: []string{front}}
		path := filepath.Join(dir, "haproxy.cfg")
		if err := os.WriteFile(path, []byte(skewHAProxyConfig(front, backends, px.factor)), 0o644); err != nil {
			return nil, "", "", err
		}
		srv.argv = []string{bin, "-f", path, "-db"}
		return srv, front, "", nil
	}
	b, err := json.MarshalIndent(skewCaddyConfig(front, backends, px.factor), "", "\t")
	if err != nil {
		return nil, "", "", err
	}
	path := filepath.Join(dir, "caddy.json")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		return nil, "", "", err
	}
	// A Caddy that does not know balance_factor yet rejects the config:
	// ask it first, so that the row says so instead of failing.
	cmd := exec.CommandContext(ctx, caddyBin, "validate", "--config", path)
	cmd.Env, cmd.Dir = proxyEnv(dir), dir
	if out, verr := cmd.CombinedOutput(); verr != nil {
		if px.factor > 0 && strings.Contains(string(out), "balance_factor") {
			return nil, "", "not yet supported: this Caddy rejects `balance_factor` (" + rejection(string(out)) + ")", nil
		}
		return nil, "", "", fmt.Errorf("caddy validate: %w\n%s", verr, tailString(string(out), 10))
	}
	srv = &server{name: px.id, dir: dir, logPath: filepath.Join(dir, "caddy.log"), env: proxyEnv(dir), ports: []string{front}}
	srv.argv = []string{caddyBin, "run", "--config", path}
	return srv, front, "", nil
}

// skewHAProxyConfig is HAProxy's config for the scenario: one thread, a
// listen section that hashes the source address onto its consistent-hash
// ring, and the bounded-load factor in percent when there is one.
func skewHAProxyConfig(front string, backends []string, factor float64) string {
	var b strings.Builder
	b.WriteString("global\n\tnbthread 1\n\tmaxconn 8000\n")
	b.WriteString("\ndefaults\n\tmode tcp\n\ttimeout connect 5s\n\ttimeout client 1h\n\ttimeout server 1h\n")
	fmt.Fprintf(&b, "\nlisten skew\n\tbind %s\n\tbalance source\n\thash-type consistent\n", front)
	if factor > 0 {
		fmt.Fprintf(&b, "\thash-balance-factor %d\n", haproxyPercent(factor))
	}
	for i, a := range backends {
		fmt.Fprintf(&b, "\tserver b%d %s\n", i, a)
	}
	return b.String()
}

// haproxyPercent is the factor as HAProxy takes it: an integer percentage.
func haproxyPercent(factor float64) int { return int(math.Round(factor * 100)) }

// skewCaddyConfig is godist's config for the scenario: one listener, one
// godist handler hashing by client IP over the backends, with
// balance_factor when there is one. No admin endpoint.
func skewCaddyConfig(front string, backends []string, factor float64) map[string]any {
	ups := make([]any, len(backends))
	for i, a := range backends {
		ups[i] = map[string]any{"dial": a}
	}
	h := map[string]any{"handler": "godist", "hash_key": "ip", "upstreams": ups}
	if factor > 0 {
		h["balance_factor"] = factor
	}
	return map[string]any{
		"admin": map[string]any{"disabled": true, "config": map[string]any{"persist": false}},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{
			"writer": map[string]any{"output": "stderr"}, "level": "WARN",
		}}},
		"apps": map[string]any{"layer4": map[string]any{"servers": map[string]any{
			"skew": map[string]any{"listen": []string{front}, "routes": []any{map[string]any{"handle": []any{h}}}},
		}}},
	}
}

// rejection is the gist of why Caddy rejected a config, for a one-line
// reason: from the JSON decoder's message on (`json: unknown field
// "balance_factor"`) when there is one, else the last line that holds an
// error, at most 200 bytes of it.
func rejection(out string) string {
	if i := strings.Index(out, "json: "); i >= 0 {
		line, _, _ := strings.Cut(out[i:], "\n")
		line = strings.TrimSuffix(strings.TrimSpace(line), `"}`) // the end of a JSON log line
		line = strings.ReplaceAll(line, `\"`, `"`)
		return truncate(line, 200)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	for _, line := range slices.Backward(lines) {
		if strings.Contains(strings.ToLower(line), "error") {
			return truncate(strings.TrimSpace(line), 200)
		}
	}
	return truncate(strings.TrimSpace(lines[len(lines)-1]), 200)
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// skewProxies are the configurations the run measures, in the table's
// order: godist's with -peers godist, HAProxy's with -peers haproxy or
// haproxy-splice (the scenario does not splice).
func skewProxies(opt options) []skewProxy {
	var out []skewProxy
	c := opt.skewFactor
	if opt.peers["godist"] {
		out = append(out,
			skewProxy{id: "godist", label: "godist, `hash_key ip`"},
			skewProxy{id: "godist-bf", label: fmt.Sprintf("godist, `hash_key ip`, `balance_factor %g`", c), factor: c})
	}
	if opt.peers["haproxy"] || opt.peers["haproxy-splice"] {
		ver, _ := haproxyVersion()
		if ver == "" {
			ver = "2.6"
		}
		out = append(out,
			skewProxy{id: "haproxy", label: "HAProxy " + ver + " `balance source`, `hash-type consistent`", haproxy: true},
			skewProxy{id: "haproxy-bf", label: fmt.Sprintf("HAProxy %s, the same, `hash-balance-factor %d`", ver, haproxyPercent(c)), factor: c, haproxy: true})
	}
	return out
}

// runSkew runs the scenario against every configuration: for each, a
// first phase with p.Backends backends (the keys probed, then the load),
// a second with one more (the keys probed again).
func runSkew(ctx context.Context, opt options, pin pinning, caddyBin, tmp string) *skewResult {
	p := newSkewParams(opt)
	res := &skewResult{Params: p}
	bs, fixed, err := startSkewBackends(p.Backends + 1)
	if err != nil {
		res.Failed = err.Error()
		return res
	}
	res.FixedAddrs = fixed
	defer stopSkewBackends(bs)
	addrs := make([]string, len(bs))
	for i, b := range bs {
		addrs[i] = b.addr
	}
	res.KeyShares = keyShares(skewCDF(p.Keys, p.ZipfS, p.HotShare))
	sched := skewSchedule(p)
	res.Arrivals = len(sched)
	_, haproxyErr := haproxyVersion()

	for _, px := range skewProxies(opt) {
		if ctx.Err() != nil {
			break
		}
		row := &skewRow{ID: px.id, Label: px.label, Factor: px.factor, HashMismatch: -1, ProbeMismatch: -1}
		res.Rows = append(res.Rows, row)
		if px.haproxy && haproxyErr != nil {
			row.Skipped = haproxyErr.Error()
			logf("  skew %-10s skipped: %s", px.id, row.Skipped)
			continue
		}
		var homes [2][]int
		for phase, n := range []int{p.Backends, p.Backends + 1} {
			srv, front, unsupported, err := skewServer(ctx, px, caddyBin, filepath.Join(tmp, fmt.Sprintf("skew-%s-%d", px.id, n)), addrs[:n])
			if err == nil && unsupported != "" {
				row.Skipped = unsupported
				break
			}
			if err == nil {
				err = srv.start(pin)
			}
			if err != nil {
				row.Failed = err.Error()
				break
			}
			homes[phase], err = skewProbe(ctx, front, p.Keys, bs[:n])
			if err == nil && phase == 0 {
				logf("  skew %-10s %d keys probed; load: %d arrivals over %s", px.id, p.Keys, len(sched), time.Duration(p.Warmup+p.Measure))
				load := runSkewLoad(ctx, front, sched, bs[:n], p)
				row.fill(p, sched, load, homes[0])
			}
			srv.stop()
			if err != nil {
				row.Failed = err.Error()
				break
			}
		}
		switch {
		case row.Skipped != "":
			logf("  skew %-10s skipped: %s", px.id, row.Skipped)
			continue
		case row.Failed != "":
			logf("  skew %-10s FAILED: %s", px.id, row.Failed)
			continue
		}
		row.Homes = homes[0]
		row.Least = leastLost(homes[0], res.KeyShares, p.Backends, p.Factor)
		row.KeysMoved, row.LoadMoved = keysMoved(homes[0], homes[1], res.KeyShares)
		if !px.haproxy {
			row.HashMismatch = countMismatch(homes[0], rendezvousHomes(addrs[:p.Backends], p.Keys))
		}
		logf("  skew %-10s %s", px.id, row.brief())
	}
	// A proxy with a factor against its sibling without: on the idle proxy
	// no cap binds, so the first choices must be the same.
	for _, row := range res.Rows {
		if sib := res.row(siblingOf(row.ID)); sib != nil && row.Homes != nil && sib.Homes != nil {
			row.ProbeMismatch = countMismatch(row.Homes, sib.Homes)
		}
	}
	return res
}

// siblingOf is the id of the same proxy without a factor, or "".
func siblingOf(id string) string {
	s, ok := strings.CutSuffix(id, "-bf")
	if !ok {
		return ""
	}
	return s
}
