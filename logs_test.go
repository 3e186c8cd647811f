// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

func init() {
	caddy.RegisterModule(logCapture{})
}

// logCapture is a Caddy log writer, for tests only, that keeps what Caddy
// logs in memory, so that a test can read the lines a real Caddy wrote
// through its own logging pipeline.
type logCapture struct {
	Name string `json:"name,omitempty"`
}

var (
	capturedMu sync.Mutex
	captured   = map[string]*bytes.Buffer{}
)

func (logCapture) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "caddy.logging.writers.godist_test_capture",
		New: func() caddy.Module { return new(logCapture) },
	}
}

func (w logCapture) String() string    { return "godist test capture " + w.Name }
func (w logCapture) WriterKey() string { return "godist_test_capture:" + w.Name }
func (w logCapture) OpenWriter() (io.WriteCloser, error) {
	return captureWriter{name: w.Name}, nil
}

type captureWriter struct{ name string }

func (c captureWriter) Write(p []byte) (int, error) {
	capturedMu.Lock()
	defer capturedMu.Unlock()
	b := captured[c.name]
	if b == nil {
		b = new(bytes.Buffer)
		captured[c.name] = b
	}
	return b.Write(p)
}

func (captureWriter) Close() error { return nil }

// logLine is one JSON log entry.
type logLine map[string]any

// capturedLines returns the godist handler's entries logged so far into the
// capture named name.
func capturedLines(t *testing.T, name string) []logLine {
	t.Helper()
	capturedMu.Lock()
	defer capturedMu.Unlock()
	var out []logLine
	b := captured[name]
	if b == nil {
		return nil
	}
	sc := bufio.NewScanner(bytes.NewReader(b.Bytes()))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var l logLine
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			t.Fatalf("a log line that is not JSON: %s", sc.Bytes())
		}
		if l["logger"] == "layer4.handlers.godist" {
			out = append(out, l)
		}
	}
	return out
}

// TestLogs checks that the handler logs what docs/metrics-and-logs.md
// says, at the level it says: the fingerprint at info when provisioned,
// one debug line per connection with the decision behind it, health
// changes at info, and failed dials at error, at most ten a second.
func TestLogs(t *testing.T) {
	be := startBackend(t, "echo", "", echo)
	// a dead upstream that 127.0.0.1 prefers, so that every connection
	// tries it first
	dead := deadAddrPreferred(t, "127.0.0.1", be.addr, freeAddr)
	name := t.Name()
	capturedMu.Lock()
	delete(captured, name) // from an earlier run of this test (-count)
	capturedMu.Unlock()
	c := startCaddyConfig(t, caddyConfig{
		Logs: map[string]any{"capture": map[string]any{
			"writer":  map[string]any{"output": "godist_test_capture", "name": name},
			"encoder": map[string]any{"format": "json"},
			"level":   "DEBUG",
		}},
		Routes: []map[string]any{godistRoute(map[string]any{
			"upstreams": upstreamsJSON(be.addr, dead),
			"hash_key":  "ip",
			// passive checks off, so that every connection dials the dead one
			"health_checks": map[string]any{"passive": map[string]any{"fail_duration": 0}},
		})},
	})

	const conns = 30
	for i := range conns {
		got, err := roundTrip(c.dial(t), []byte(fmt.Sprint(i)))
		if err != nil || string(got) != fmt.Sprint(i) {
			t.Fatalf("connection %d: %q, %v", i, got, err)
		}
	}

	var byMsg map[string][]logLine
	eventually(t, 5*time.Second, "every connection's line logged", func() error {
		byMsg = map[string][]logLine{}
		for _, l := range capturedLines(t, name) {
			byMsg[l["msg"].(string)] = append(byMsg[l["msg"].(string)], l)
		}
		if n := len(byMsg["connection closed"]); n != conns {
			return fmt.Errorf("%d 'connection closed' lines for %d connections", n, conns)
		}
		return nil
	})

	provisioned := byMsg["godist handler provisioned"]
	if len(provisioned) != 1 || provisioned[0]["level"] != "info" || provisioned[0]["fingerprint"] == "" {
		t.Errorf("provisioning logged %v, want one info line with the fingerprint", provisioned)
	}

	closed := byMsg["connection closed"][0]
	for field, want := range map[string]any{
		"level": "debug", "key": "127.0.0.1", "upstream": be.addr, "rank": 2.0, "attempts": 2.0,
		"bytes_to_upstream": 1.0, "bytes_to_client": 1.0, "first_eof": "client",
	} {
		if closed[field] != want {
			t.Errorf("connection line %s = %v, want %v (line: %v)", field, closed[field], want, closed)
		}
	}
	if skipped, _ := closed["skipped"].([]any); len(skipped) != 1 || skipped[0] != dead+": dial failed" {
		t.Errorf("connection line skipped = %v, want the dead upstream's failed dial", closed["skipped"])
	}

	// 30 failed dials within a second or so: at most ten lines a second
	failed := byMsg["dial upstream"]
	if len(failed) == 0 || len(failed) >= conns {
		t.Errorf("%d 'dial upstream' error lines for %d failed dials: want some, rate-limited", len(failed), conns)
	}
	for _, l := range failed {
		if l["level"] != "error" || l["upstream"] != dead {
			t.Errorf("failed dial logged as %v", l)
		}
	}

	// a health change at info: with active checks, the first finds the
	// dead one down
	if status, body := c.load([]map[string]any{godistRoute(map[string]any{
		"upstreams":     upstreamsJSON(be.addr, dead),
		"health_checks": map[string]any{"active": map[string]any{"interval": "1h"}},
	})}); status != 200 {
		t.Fatalf("reload: %d %s", status, body)
	}
	eventually(t, 5*time.Second, "the health change logged", func() error {
		var downs []logLine
		for _, l := range capturedLines(t, name) {
			if l["msg"] == "upstream down: health checks fail" {
				downs = append(downs, l)
			}
		}
		if len(downs) != 1 || downs[0]["level"] != "info" || downs[0]["upstream"] != dead {
			return fmt.Errorf("logged as %v, want one info line for %s", downs, dead)
		}
		return nil
	})
}
