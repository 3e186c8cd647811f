// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// TestPipeBytesIntact sends random binary data of awkward sizes through
// Caddy to an echo backend and checks that every byte comes back, in
// order, with a checksum.
func TestPipeBytesIntact(t *testing.T) {
	be := startBackend(t, "echo", "", echo)
	c := startCaddy(t, map[string]any{"upstreams": upstreamsJSON(be.addr)})

	sizes := []int{0, 1, 2047, 2048, 2049, 65536, 1<<20 + 3, 16 << 20}
	for _, size := range sizes {
		t.Run(fmt.Sprintf("%d bytes", size), func(t *testing.T) {
			payload := randomBytes(uint64(size), size)
			got, err := roundTrip(c.dial(t), payload)
			if err != nil {
				t.Fatalf("round trip: %v", err)
			}
			if len(got) != size || sha256.Sum256(got) != sha256.Sum256(payload) {
				t.Fatalf("got %d bytes back (sha256 %x), sent %d (sha256 %x)",
					len(got), sha256.Sum256(got), size, sha256.Sum256(payload))
			}
		})
	}

	t.Run("32 concurrent clients", func(t *testing.T) {
		var wg sync.WaitGroup
		errs := make(chan error, 32)
		for i := range 32 {
			wg.Go(func() {
				payload := randomBytes(uint64(1000+i), 256<<10+i)
				conn, err := net.DialTimeout("tcp", c.listen, testTimeout)
				if err != nil {
					errs <- err
					return
				}
				_ = conn.SetDeadline(time.Now().Add(testTimeout))
				got, err := roundTrip(conn.(*net.TCPConn), payload)
				if err == nil && !bytes.Equal(got, payload) {
					err = fmt.Errorf("client %d: %d bytes back, %d sent, checksums differ", i, len(got), len(payload))
				}
				if err != nil {
					errs <- err
				}
			})
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Error(err)
		}
	})
}

// TestHalfClose checks that a client that half-closes after its request
// still gets the whole reply: the server answers only after it sees EOF.
func TestHalfClose(t *testing.T) {
	be := startBackend(t, "digest", "", digestAfterEOF)
	c := startCaddy(t, map[string]any{"upstreams": upstreamsJSON(be.addr)})

	payload := randomBytes(7, 300_000)
	got, err := roundTrip(c.dial(t), payload)
	if err != nil {
		t.Fatalf("round trip: %v", err)
	}
	want := fmt.Sprintf("%x %d\n", sha256.Sum256(payload), len(payload))
	if string(got) != want {
		t.Fatalf("reply after half-close = %q, want %q", got, want)
	}
}

// TestHalfCloseFromServer checks the other direction: the server finishes
// first, and the client can still send to it afterwards.
func TestHalfCloseFromServer(t *testing.T) {
	be := startBackend(t, "hello-then-digest", "", func(_ *backend, c net.Conn) {
		_, _ = io.WriteString(c, "hello\n")
		_ = c.(*net.TCPConn).CloseWrite()
		h := sha256.New()
		n, _ := io.Copy(h, c)
		// the write half is closed: report through the test instead
		serverSaw <- fmt.Sprintf("%x %d", h.Sum(nil), n)
	})
	c := startCaddy(t, map[string]any{"upstreams": upstreamsJSON(be.addr)})

	conn := c.dial(t)
	greeting, err := io.ReadAll(conn) // until the server's FIN
	if err != nil || string(greeting) != "hello\n" {
		t.Fatalf("greeting = %q, %v", greeting, err)
	}
	payload := randomBytes(9, 100_000)
	if _, err := conn.Write(payload); err != nil {
		t.Fatalf("writing after the server's FIN: %v", err)
	}
	_ = conn.CloseWrite()
	select {
	case got := <-serverSaw:
		if want := fmt.Sprintf("%x %d", sha256.Sum256(payload), len(payload)); got != want {
			t.Fatalf("server got %s, want %s", got, want)
		}
	case <-time.After(testTimeout):
		t.Fatal("server never saw the client's bytes and EOF")
	}
}

var serverSaw = make(chan string, 1)

// TestServerSpeaksFirst checks a protocol whose server sends a banner
// before the client says anything (SMTP, SSH, MySQL).
func TestServerSpeaksFirst(t *testing.T) {
	be := startBackend(t, "banner", "", func(_ *backend, c net.Conn) {
		_, _ = io.WriteString(c, "220 ready\r\n")
		echo(nil, c)
	})
	c := startCaddy(t, map[string]any{"upstreams": upstreamsJSON(be.addr)})

	conn := c.dial(t)
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil || line != "220 ready\r\n" {
		t.Fatalf("banner = %q, %v", line, err)
	}
}

// TestPrefetchedBytesGoFirst puts a caddy-l4 matcher in front of the
// handler, so caddy-l4 has read the start of the stream before godist
// runs, and checks that those bytes reach the upstream first and intact.
func TestPrefetchedBytesGoFirst(t *testing.T) {
	be := startBackend(t, "digest", "", digestAfterEOF)
	route := godistRoute(map[string]any{"upstreams": upstreamsJSON(be.addr)})
	route["match"] = []any{map[string]any{"http": []any{map[string]any{"path": []string{"/upload"}}}}}
	c := startCaddyRoutes(t, "tcp", []map[string]any{route})

	body := randomBytes(11, 40_000)
	request := append([]byte(fmt.Sprintf("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n", len(body))), body...)
	got, err := roundTrip(c.dial(t), request)
	if err != nil {
		t.Fatalf("round trip: %v", err)
	}
	if want := fmt.Sprintf("%x %d\n", sha256.Sum256(request), len(request)); string(got) != want {
		t.Fatalf("upstream saw %q, want %q", got, want)
	}
}

// TestHashKeyAffinity checks where connections land with each hash key:
// `ip` keeps all of a client's connections on one upstream, `ip_port`
// spreads them, each as the picker says.
func TestHashKeyAffinity(t *testing.T) {
	_, addrs := startBackends(t, 3, whoami)
	picker := NewPicker([]PickerUpstream{{Dial: addrs[0]}, {Dial: addrs[1]}, {Dial: addrs[2]}})

	for _, hashKey := range []string{"ip", "ip_port"} {
		t.Run(hashKey, func(t *testing.T) {
			c := startCaddy(t, map[string]any{"upstreams": upstreamsJSON(addrs...), "hash_key": hashKey})
			seen := map[string]int{}
			for range 60 {
				conn := c.dial(t)
				name, err := askName(conn)
				if err != nil {
					t.Fatalf("asking the backend's name: %v", err)
				}
				key := addrKey(conn.LocalAddr(), hashKey == "ip_port")
				if want := fmt.Sprintf("b%d", picker.Pick(key, nil)); name != want {
					t.Fatalf("client %s (key %q) landed on %s, the picker says %s", conn.LocalAddr(), key, name, want)
				}
				seen[name]++
				conn.Close()
			}
			if hashKey == "ip" && len(seen) != 1 {
				t.Fatalf("hash_key ip spread one client over %v", seen)
			}
			if hashKey == "ip_port" && len(seen) != 3 {
				t.Fatalf("hash_key ip_port sent 60 connections to only %v", seen)
			}
		})
	}
}

// TestFailover stops the upstream a client prefers and checks that its
// connections go to its next choice, that all of them still succeed, and
// that a connection with every upstream down is closed at once while Caddy
// keeps serving and recovers when an upstream comes back.
func TestFailover(t *testing.T) {
	backends, addrs := startBackends(t, 3, whoami)
	c := startCaddy(t, map[string]any{
		"upstreams": upstreamsJSON(addrs...), "hash_key": "ip", "dial_timeout": "1s",
	})
	picker := NewPicker([]PickerUpstream{{Dial: addrs[0]}, {Dial: addrs[1]}, {Dial: addrs[2]}})
	order := picker.Order("127.0.0.1", nil)

	ask := func() (string, error) {
		conn := c.dial(t)
		defer conn.Close()
		return askName(conn)
	}
	if name, err := ask(); err != nil || name != backends[order[0]].name {
		t.Fatalf("with all up: %q, %v; want %s", name, err, backends[order[0]].name)
	}

	t.Run("first choice down", func(t *testing.T) {
		backends[order[0]].stop()
		for range 20 {
			name, err := ask()
			if err != nil || name != backends[order[1]].name {
				t.Fatalf("got %q, %v; want the second choice %s", name, err, backends[order[1]].name)
			}
		}
	})

	t.Run("all down", func(t *testing.T) {
		for _, be := range backends {
			be.stop()
		}
		conn := c.dial(t)
		start := time.Now()
		_, _ = io.WriteString(conn, "who?\n")
		n, err := conn.Read(make([]byte, 1))
		if n != 0 || err == nil {
			t.Fatalf("read %d bytes, %v: want the connection closed", n, err)
		}
		if took := time.Since(start); took > 5*time.Second {
			t.Errorf("closing a connection with all upstreams refusing took %s", took)
		}
		conn.Close()
	})

	t.Run("recovers", func(t *testing.T) {
		back := startBackend(t, "back", addrs[order[2]], whoami)
		name, err := ask()
		if err != nil || name != back.name {
			t.Fatalf("after an upstream came back: %q, %v", name, err)
		}
	})
}

// TestIdleTimeout checks that a connection with no bytes either way for
// idle_timeout is closed, and that one with bytes flowing in only one
// direction is not.
func TestIdleTimeout(t *testing.T) {
	be := startBackend(t, "echo", "", echo)
	const idle = 300 * time.Millisecond
	c := startCaddy(t, map[string]any{"upstreams": upstreamsJSON(be.addr), "idle_timeout": idle.String()})

	t.Run("idle is closed", func(t *testing.T) {
		conn := c.dial(t)
		start := time.Now()
		n, err := conn.Read(make([]byte, 1))
		if n != 0 || err == nil {
			t.Fatalf("read %d, %v: want the connection closed", n, err)
		}
		if took := time.Since(start); took < idle {
			t.Fatalf("closed after %s, before the idle timeout of %s", took, idle)
		}
	})

	t.Run("one-way traffic is not idle", func(t *testing.T) {
		sink := startBackend(t, "sink", "", func(_ *backend, c net.Conn) { _, _ = io.Copy(io.Discard, c) })
		c := startCaddy(t, map[string]any{"upstreams": upstreamsJSON(sink.addr), "idle_timeout": idle.String()})
		conn := c.dial(t)
		// write for three idle timeouts, never reading anything back
		for end := time.Now().Add(3 * idle); time.Now().Before(end); {
			if _, err := conn.Write([]byte("x")); err != nil {
				t.Fatalf("connection closed while bytes were flowing: %v", err)
			}
			time.Sleep(idle / 6)
		}
	})
}

// TestReloadKeepsStreams pushes a new config through the admin API while a
// long stream flows, and checks that the stream finishes intact.
func TestReloadKeepsStreams(t *testing.T) {
	be := startBackend(t, "echo", "", echo)
	other := startBackend(t, "other", "", echo)
	c := startCaddy(t, map[string]any{"upstreams": upstreamsJSON(be.addr)})

	conn := c.dial(t)
	payload := randomBytes(21, 8<<20)
	const chunk = 64 << 10
	received := make(chan []byte, 1)
	go func() {
		got, _ := io.ReadAll(conn)
		received <- got
	}()
	for i := 0; i < len(payload); i += chunk {
		if _, err := conn.Write(payload[i : i+chunk]); err != nil {
			t.Fatalf("write at %d: %v", i, err)
		}
		if i == 2*chunk {
			// the new config drops the stream's upstream altogether
			status, body := c.load([]map[string]any{godistRoute(map[string]any{"upstreams": upstreamsJSON(other.addr)})})
			if status != 200 {
				t.Fatalf("reload: %d %s", status, body)
			}
		}
		time.Sleep(time.Millisecond)
	}
	_ = conn.CloseWrite()
	got := <-received
	if !bytes.Equal(got, payload) {
		t.Fatalf("stream across a reload: %d bytes back of %d sent, checksums differ", len(got), len(payload))
	}
	// and new connections go to the new upstream
	if _, err := roundTrip(c.dial(t), []byte("x")); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "new connection on the new upstream", func() error {
		if other.accepted.Load() == 0 {
			return fmt.Errorf("the new upstream accepted nothing")
		}
		return nil
	})
}

// TestLoadRejectsBadConfig checks that a bad config POSTed to /load is
// refused with a message naming the problem, and the running config keeps
// serving.
func TestLoadRejectsBadConfig(t *testing.T) {
	be := startBackend(t, "echo", "", echo)
	c := startCaddy(t, map[string]any{"upstreams": upstreamsJSON(be.addr)})

	tests := []struct {
		name    string
		opts    map[string]any
		wantErr string
	}{
		{name: "no upstreams", opts: map[string]any{}, wantErr: "upstreams: at least one upstream is required"},
		{name: "bad address", opts: map[string]any{"upstreams": upstreamsJSON("localhost:notaport")}, wantErr: `upstream 0 (localhost:notaport): invalid dial address`},
		{name: "negative weight", opts: map[string]any{"upstreams": []any{map[string]any{"dial": "127.0.0.1:1", "weight": -2}}}, wantErr: "upstream 0 (127.0.0.1:1): weight -2: must be at least 1"},
		{name: "bad hash_key", opts: map[string]any{"upstreams": upstreamsJSON("127.0.0.1:1"), "hash_key": "ipport"}, wantErr: `hash_key "ipport"`},
		{name: "unknown field", opts: map[string]any{"upstreams": upstreamsJSON("127.0.0.1:1"), "hashkey": "ip"}, wantErr: `unknown field "hashkey"`},
		{name: "zero health interval", opts: map[string]any{"upstreams": upstreamsJSON("127.0.0.1:1"), "health_checks": map[string]any{"active": map[string]any{"interval": "-1s"}}}, wantErr: "health_checks.active.interval -1s: must be positive"},
		{name: "health port", opts: map[string]any{"upstreams": upstreamsJSON("127.0.0.1:1"), "health_checks": map[string]any{"active": map[string]any{"port": 70000}}}, wantErr: "health_checks.active.port 70000: must be a port number"},
		{name: "max_fails", opts: map[string]any{"upstreams": upstreamsJSON("127.0.0.1:1"), "health_checks": map[string]any{"passive": map[string]any{"max_fails": -1}}}, wantErr: "health_checks.passive.max_fails -1: must be at least 1"},
		{name: "max_connections", opts: map[string]any{"upstreams": upstreamsJSON("127.0.0.1:1"), "max_connections": -5}, wantErr: "max_connections -5: must not be negative"},
		{name: "upstream max_connections", opts: map[string]any{"upstreams": []any{map[string]any{"dial": "127.0.0.1:1", "max_connections": -1}}}, wantErr: "upstream 0 (127.0.0.1:1): max_connections -1: must not be negative"},
		{name: "duplicate upstream", opts: map[string]any{"upstreams": upstreamsJSON("127.0.0.1:1", "127.0.0.1:1")}, wantErr: "the same dial address as upstream 0"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			status, body := c.load([]map[string]any{godistRoute(tt.opts)})
			if status < 400 || status >= 500 || !strings.Contains(body, tt.wantErr) {
				t.Fatalf("/load answered %d %s; want a 4xx naming %q", status, body, tt.wantErr)
			}
			got, err := roundTrip(c.dial(t), []byte("still serving"))
			if err != nil || string(got) != "still serving" {
				t.Fatalf("after a refused /load: %q, %v", got, err)
			}
		})
	}
}

// TestHashKeySNI balances TLS passthrough by the server name the client
// asks for: caddy-l4's tls matcher sets {l4.tls.server_name}, and every
// connection for one name lands on one backend, the one the picker names.
// A client that sends no server name is hashed by ip_port instead.
func TestHashKeySNI(t *testing.T) {
	addrs := make([]string, 0, 3)
	for i := range 3 {
		srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
			fmt.Fprintf(w, "b%d", i)
		}))
		srv.StartTLS()
		t.Cleanup(srv.Close)
		addrs = append(addrs, srv.Listener.Addr().String())
	}
	route := godistRoute(map[string]any{"upstreams": upstreamsJSON(addrs...), "hash_key": "{l4.tls.server_name}"})
	route["match"] = []any{map[string]any{"tls": map[string]any{}}}
	c := startCaddyRoutes(t, "tcp", []map[string]any{route})
	picker := NewPicker([]PickerUpstream{{Dial: addrs[0]}, {Dial: addrs[1]}, {Dial: addrs[2]}})

	get := func(serverName string) (backend string, clientAddr net.Addr) {
		t.Helper()
		conn := c.dial(t)
		defer conn.Close()
		tc := tls.Client(conn, &tls.Config{ServerName: serverName, InsecureSkipVerify: true}) //nolint:gosec // test backends have throwaway certificates
		if _, err := io.WriteString(tc, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"); err != nil {
			t.Fatalf("TLS through godist for %q: %v", serverName, err)
		}
		resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
		if err != nil {
			t.Fatalf("reading the reply for %q: %v", serverName, err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return string(body), conn.LocalAddr()
	}

	for _, name := range []string{"alpha.example", "beta.example", "gamma.example", "delta.example"} {
		want := fmt.Sprintf("b%d", picker.Pick(name, nil))
		for range 5 {
			if got, _ := get(name); got != want {
				t.Fatalf("server name %s landed on %s, the picker says %s", name, got, want)
			}
		}
	}
	for range 5 {
		got, client := get("") // no SNI: falls back to the client's ip:port
		if want := fmt.Sprintf("b%d", picker.Pick(addrKey(client, true), nil)); got != want {
			t.Fatalf("a client without SNI at %s landed on %s, its ip_port key says %s", client, got, want)
		}
	}
}
