// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// Every network test here binds 127.0.0.1 only, on ports the kernel picks,
// and bounds every wait with a deadline.

const testTimeout = 20 * time.Second

// freeAddr returns a loopback address with a port that was free a moment
// ago, for configs that must name their listen address up front.
func freeAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("finding a free port: %v", err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// caddyConfig is a Caddy JSON config with an admin endpoint on a free
// loopback port and one layer4 server.
type caddyConfig struct {
	AdminAddr string
	Listen    string
	Network   string           // "tcp" (default), "udp", or a network such as "godist-tcp"
	Routes    []map[string]any // layer4 routes

	ServerIdleTimeout string // the layer4 server's idle_timeout, for UDP flows

	Logs     map[string]any // more logs beside the default one
	LogLevel string         // the default log's level; DEBUG if empty

	// Storage is the folder of Caddy's storage, where operator states are
	// kept: a folder of the test's own (startCaddyConfig), never the
	// user's Caddy data.
	Storage string
	// StorageModule, if set, is the storage's whole config instead.
	StorageModule map[string]any
}

// testLogWriter is where Caddy's logs go in tests: nowhere, unless
// GODIST_TEST_LOG is set, when they go to stderr.
func testLogWriter() map[string]any {
	if os.Getenv("GODIST_TEST_LOG") != "" {
		return map[string]any{"output": "stderr"}
	}
	return map[string]any{"output": "discard"}
}

func (c caddyConfig) JSON(t testing.TB) []byte {
	t.Helper()
	listen := c.Listen
	if c.Network != "" && c.Network != "tcp" {
		listen = c.Network + "/" + listen
	}
	cfg := map[string]any{
		"admin":   map[string]any{"listen": c.AdminAddr, "config": map[string]any{"persist": false}},
		"logging": map[string]any{"logs": c.logs()},
		"apps": map[string]any{"layer4": map[string]any{"servers": map[string]any{
			"test": c.server(listen),
		}}},
	}
	switch {
	case c.StorageModule != nil:
		cfg["storage"] = c.StorageModule
	case c.Storage != "":
		cfg["storage"] = map[string]any{"module": "file_system", "root": c.Storage}
	}
	b, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// godistRoute returns a route that hands every connection to a godist
// handler with the given options.
func godistRoute(opts map[string]any) map[string]any {
	h := map[string]any{"handler": "godist"}
	maps.Copy(h, opts)
	return map[string]any{"handle": []any{h}}
}

func upstreamsJSON(addrs ...string) []map[string]any {
	ups := make([]map[string]any, len(addrs))
	for i, a := range addrs {
		ups[i] = map[string]any{"dial": a}
	}
	return ups
}

func (c caddyConfig) logs() map[string]any {
	level := c.LogLevel
	if level == "" {
		level = "DEBUG"
	}
	logs := map[string]any{"default": map[string]any{"writer": testLogWriter(), "level": level}}
	maps.Copy(logs, c.Logs)
	return logs
}

func (c caddyConfig) server(listen string) map[string]any {
	srv := map[string]any{"listen": []string{listen}, "routes": c.Routes}
	if c.ServerIdleTimeout != "" {
		srv["idle_timeout"] = c.ServerIdleTimeout
	}
	return srv
}

// testCaddy is Caddy running in the test process.
type testCaddy struct {
	t      testing.TB
	admin  string
	listen string
	cfg    caddyConfig // what was loaded; load changes only its routes
}

// startCaddy loads a config with one godist route into Caddy in this
// process, and stops Caddy when the test ends.
func startCaddy(t testing.TB, opts map[string]any) *testCaddy {
	t.Helper()
	return startCaddyRoutes(t, "tcp", []map[string]any{godistRoute(opts)})
}

func startCaddyRoutes(t testing.TB, network string, routes []map[string]any) *testCaddy {
	t.Helper()
	return startCaddyConfig(t, caddyConfig{Network: network, Routes: routes})
}

// startCaddyConfig loads cfg, with the admin endpoint and listener on free
// loopback ports (the listener on cfg.Listen if set), into Caddy in this
// process.
func startCaddyConfig(t testing.TB, cfg caddyConfig) *testCaddy {
	t.Helper()
	cfg.AdminAddr = freeAddr(t)
	if cfg.Storage == "" {
		cfg.Storage = t.TempDir()
	}
	switch {
	case cfg.Listen != "":
	case cfg.Network == "udp":
		cfg.Listen = freeUDPAddr(t)
	default:
		cfg.Listen = freeAddr(t)
	}
	c := &testCaddy{t: t, admin: cfg.AdminAddr, listen: cfg.Listen, cfg: cfg}
	if err := caddy.Load(cfg.JSON(t), true); err != nil {
		t.Fatalf("loading config into Caddy: %v", err)
	}
	t.Cleanup(func() { stopCaddy(t) })
	return c
}

// freeUDPAddr returns a loopback UDP address that was free a moment ago.
func freeUDPAddr(t testing.TB) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("finding a free UDP port: %v", err)
	}
	defer pc.Close()
	return pc.LocalAddr().String()
}

// stopCaddy stops the running config and the admin server with it (a
// plain caddy.Stop leaves the admin endpoint of a config loaded through
// /load running).
func stopCaddy(t testing.TB) {
	t.Helper()
	if err := caddy.Load([]byte(`{"admin":{"disabled":true,"config":{"persist":false}}}`), true); err != nil {
		t.Errorf("stopping Caddy: %v", err)
	}
	if err := caddy.Stop(); err != nil {
		t.Errorf("stopping Caddy: %v", err)
	}
}

// load POSTs a full config to the admin API's /load and returns the status
// and body of the answer.
func (c *testCaddy) load(routes []map[string]any) (int, string) {
	c.t.Helper()
	cfg := c.cfg
	cfg.Routes = routes
	return c.adminRequest(http.MethodPost, "/load", "application/json", cfg.JSON(c.t))
}

func (c *testCaddy) adminRequest(method, path, contentType string, body []byte) (int, string) {
	c.t.Helper()
	req, err := http.NewRequest(method, "http://"+c.admin+path, bytes.NewReader(body))
	if err != nil {
		c.t.Fatal(err)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	// No keep-alive: a /load with an admin section restarts the admin
	// server, on a new SO_REUSEPORT socket, and the kernel resets what
	// waits in the old one's queue as it closes; such a request was never
	// seen, so it is sent again.
	client := &http.Client{Timeout: testTimeout, Transport: &http.Transport{DisableKeepAlives: true}}
	var resp *http.Response
	for attempt := 0; ; attempt++ {
		req.Body = io.NopCloser(bytes.NewReader(body))
		var err error
		resp, err = client.Do(req)
		if err == nil {
			break
		}
		if attempt == 5 || !errors.Is(err, syscall.ECONNRESET) {
			c.t.Fatalf("%s %s: %v", method, path, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	// Caddy answers errors as {"error": "..."}: return the message itself
	var apiErr struct {
		Error string `json:"error"`
	}
	if resp.StatusCode >= 400 && json.Unmarshal(b, &apiErr) == nil && apiErr.Error != "" {
		return resp.StatusCode, apiErr.Error
	}
	return resp.StatusCode, string(b)
}

// dial connects to the Caddy listener.
func (c *testCaddy) dial(t testing.TB) *net.TCPConn {
	t.Helper()
	conn, err := net.DialTimeout("tcp", c.listen, testTimeout)
	if err != nil {
		t.Fatalf("dialling Caddy at %s: %v", c.listen, err)
	}
	_ = conn.SetDeadline(time.Now().Add(testTimeout))
	return conn.(*net.TCPConn)
}

// backend is a TCP server on loopback that the tests proxy to.
type backend struct {
	name     string
	ln       net.Listener
	addr     string
	accepted atomic.Int64
	handle   func(b *backend, c net.Conn)

	mu    sync.Mutex
	conns map[net.Conn]bool
	wg    sync.WaitGroup
}

// startBackend listens on a free loopback port, or on addr if it is not
// empty, and serves every connection with handle.
func startBackend(t testing.TB, name, addr string, handle func(b *backend, c net.Conn)) *backend {
	t.Helper()
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	var ln net.Listener
	var err error
	// a port just freed may take a moment to be listenable again
	for deadline := time.Now().Add(5 * time.Second); ; {
		ln, err = net.Listen("tcp", addr)
		if err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("backend %s: listen: %v", name, err)
	}
	return serveBackend(t, name, ln, handle)
}

// serveBackend serves every connection accepted by ln with handle.
func serveBackend(t testing.TB, name string, ln net.Listener, handle func(b *backend, c net.Conn)) *backend {
	t.Helper()
	b := &backend{name: name, ln: ln, addr: ln.Addr().String(), handle: handle, conns: make(map[net.Conn]bool)}
	b.wg.Add(1)
	go b.serve()
	t.Cleanup(b.stop)
	return b
}

func (b *backend) serve() {
	defer b.wg.Done()
	for {
		c, err := b.ln.Accept()
		if err != nil {
			return
		}
		b.accepted.Add(1)
		b.mu.Lock()
		b.conns[c] = true
		b.mu.Unlock()
		b.wg.Go(func() {
			defer func() {
				b.mu.Lock()
				delete(b.conns, c)
				b.mu.Unlock()
				c.Close()
			}()
			_ = c.SetDeadline(time.Now().Add(testTimeout))
			b.handle(b, c)
		})
	}
}

// stop closes the listener and every open connection, and waits for the
// backend's goroutines. It may be called more than once.
func (b *backend) stop() {
	b.ln.Close()
	b.mu.Lock()
	for c := range b.conns {
		c.Close()
	}
	b.mu.Unlock()
	b.wg.Wait()
}

// startBackends starts n backends named b0, b1, ... and returns them with
// their addresses.
func startBackends(t testing.TB, n int, handle func(b *backend, c net.Conn)) ([]*backend, []string) {
	t.Helper()
	backends := make([]*backend, n)
	addrs := make([]string, n)
	for i := range n {
		backends[i] = startBackend(t, fmt.Sprintf("b%d", i), "", handle)
		addrs[i] = backends[i].addr
	}
	return backends, addrs
}

// echo copies everything back and passes a half-close on.
func echo(_ *backend, c net.Conn) {
	_, _ = io.Copy(c, c)
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
	}
	// wait for the other side to close, so the reply is not cut short
	_, _ = io.Copy(io.Discard, c)
}

// whoami answers each line with the backend's name, until EOF.
func whoami(b *backend, c net.Conn) {
	r := bufio.NewReader(c)
	for {
		if _, err := r.ReadString('\n'); err != nil {
			return
		}
		if _, err := io.WriteString(c, b.name+"\n"); err != nil {
			return
		}
	}
}

// digestAfterEOF reads everything until the client half-closes, then
// answers with the SHA-256 of what it read and the byte count, and closes:
// a request/response server that needs the client's FIN to answer.
func digestAfterEOF(_ *backend, c net.Conn) {
	h := sha256.New()
	n, err := io.Copy(h, c)
	if err != nil {
		return
	}
	fmt.Fprintf(c, "%x %d\n", h.Sum(nil), n)
}

// randomBytes returns n reproducible pseudo-random bytes.
func randomBytes(seed uint64, n int) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := 0; i < n; i += 8 {
		v := r.Uint64()
		for j := 0; j < 8 && i+j < n; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	return b
}

// roundTrip sends payload, half-closes, and returns everything read back
// until EOF.
func roundTrip(conn *net.TCPConn, payload []byte) ([]byte, error) {
	errc := make(chan error, 1)
	go func() {
		_, err := conn.Write(payload)
		if err == nil {
			err = conn.CloseWrite()
		}
		errc <- err
	}()
	got, rerr := io.ReadAll(conn)
	werr := <-errc
	return got, errors.Join(werr, rerr)
}

// askName sends one line and reads the answering backend's name.
func askName(conn net.Conn) (string, error) {
	if _, err := io.WriteString(conn, "who?\n"); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	return strings.TrimSpace(line), err
}

// eventually retries check until it succeeds or the timeout passes.
func eventually(t testing.TB, timeout time.Duration, what string, check func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := check()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still failing after %s: %v", what, timeout, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stateOf returns the shared state of the upstream dialled at addr.
func stateOf(t testing.TB, addr string) *upstreamState {
	t.Helper()
	var found *upstreamState
	upstreamStates.Range(func(key, value any) bool {
		if key == addr {
			found = value.(*upstreamState)
			return false
		}
		return true
	})
	if found == nil {
		t.Fatalf("no state for upstream %s", addr)
	}
	return found
}

// exchange writes p and reads back as many bytes.
func exchange(conn net.Conn, p []byte) ([]byte, error) {
	errc := make(chan error, 1)
	go func() {
		_, err := conn.Write(p)
		errc <- err
	}()
	got := make([]byte, len(p))
	_, rerr := io.ReadFull(conn, got)
	return got, errors.Join(<-errc, rerr)
}

// deadAddrPreferred returns an address where nothing listens (from free,
// freeAddr or freeUDPAddr) that key prefers to live in a two-upstream
// list, so that a test can be sure a connection tries it first.
func deadAddrPreferred(t testing.TB, key, live string, free func(testing.TB) string) string {
	t.Helper()
	seen := map[string]bool{}
	for range 200 {
		candidate := free(t)
		if seen[candidate] {
			// the kernel hands out a port just freed again: ask for others
			candidate = fmt.Sprintf("127.0.0.1:%d", 20000+len(seen)*97%40000)
		}
		seen[candidate] = true
		if NewPicker([]PickerUpstream{{Dial: live}, {Dial: candidate}}).Pick(key, nil) == 1 && nothingListens(candidate) {
			return candidate
		}
	}
	t.Fatalf("found no address that %s prefers to %s", key, live)
	return ""
}

// nothingListens reports whether a TCP connection to addr is refused.
func nothingListens(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return true
	}
	c.Close()
	return false
}
