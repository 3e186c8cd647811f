// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// scrape reads the admin endpoint's /metrics and returns the value of each
// godist series, keyed like `name{label="value"}`.
func (c *testCaddy) scrape(t *testing.T) map[string]float64 {
	t.Helper()
	status, body := c.adminRequest(http.MethodGet, "/metrics", "", nil)
	if status != http.StatusOK {
		t.Fatalf("GET /metrics: %d %s", status, body)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("parsing /metrics: %v", err)
	}
	out := map[string]float64{}
	for name, fam := range families {
		if !strings.HasPrefix(name, metricsNamespace) {
			continue
		}
		for _, m := range fam.GetMetric() {
			var labels []string
			for _, l := range m.GetLabel() {
				labels = append(labels, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
			}
			key := name
			if len(labels) > 0 {
				key += "{" + strings.Join(labels, ",") + "}"
			}
			switch {
			case m.GetCounter() != nil:
				out[key] = m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				out[key] = m.GetGauge().GetValue()
			}
		}
	}
	return out
}

// TestMetrics sends known traffic through Caddy and checks the godist
// series on the admin endpoint's /metrics against it.
func TestMetrics(t *testing.T) {
	be := startBackend(t, "echo", "", echo)
	dead := freeAddr(t) // refuses: every key that prefers it fails over
	c := startCaddy(t, map[string]any{
		"upstreams":       upstreamsJSON(be.addr, dead),
		"max_connections": 2,
		// passive checks off, so that every connection preferring the dead
		// upstream tries it: the failures and failovers are countable
		"health_checks": map[string]any{"passive": map[string]any{"fail_duration": 0}},
	})
	picker := NewPicker([]PickerUpstream{{Dial: be.addr}, {Dial: dead}})

	const conns = 20
	var sent, preferredDead int
	for i := range conns {
		conn := c.dial(t)
		if picker.Pick(addrKey(conn.LocalAddr(), true), nil) == 1 {
			preferredDead++
		}
		payload := randomBytes(uint64(i), 1000+i)
		got, err := roundTrip(conn, payload)
		if err != nil || len(got) != len(payload) {
			t.Fatalf("connection %d: %d bytes back, %v", i, len(got), err)
		}
		sent += len(payload)
		conn.Close()
		// the handler lets go of a connection a moment after the client;
		// with max_connections 2 the next one must wait for that
		eventually(t, 5*time.Second, "the connection counted down", func() error {
			if n := stateOf(t, be.addr).active.Load(); n != 0 {
				return fmt.Errorf("%d active", n)
			}
			return nil
		})
	}
	eventually(t, 5*time.Second, "the finished connections counted down", func() error {
		if n := c.scrape(t)[fmt.Sprintf("%s_upstream_active_connections{upstream=%q}", metricsNamespace, be.addr)]; n != 0 {
			return fmt.Errorf("%v active", n)
		}
		return nil
	})
	// two held open, and one over max_connections
	held := []*net.TCPConn{c.dial(t), c.dial(t)}
	for _, h := range held {
		if picker.Pick(addrKey(h.LocalAddr(), true), nil) == 1 {
			preferredDead++
		}
		if _, err := exchange(h, []byte("x")); err != nil {
			t.Fatal(err)
		}
	}
	over := c.dial(t)
	if n, err := over.Read(make([]byte, 1)); n != 0 || err == nil {
		t.Fatalf("a connection over max_connections: read %d, %v", n, err)
	}
	over.Close()
	for _, h := range held {
		h.Close()
	}

	up := fmt.Sprintf("{upstream=%q}", be.addr)
	deadLabel := fmt.Sprintf("{upstream=%q}", dead)
	want := map[string]float64{
		metricsNamespace + "_upstream_connections_total" + up:          conns + 2,
		metricsNamespace + "_upstream_sent_bytes_total" + up:           float64(sent + 2),
		metricsNamespace + "_upstream_received_bytes_total" + up:       float64(sent + 2),
		metricsNamespace + "_upstream_active_connections" + up:         0,
		metricsNamespace + "_upstream_healthy" + up:                    1,
		metricsNamespace + "_upstream_dial_failures_total" + deadLabel: float64(preferredDead),
		metricsNamespace + "_upstream_failovers_total" + deadLabel:     float64(preferredDead),
		metricsNamespace + "_upstream_connections_total" + deadLabel:   0,
	}
	eventually(t, 5*time.Second, "metrics matching the traffic", func() error {
		got := c.scrape(t)
		for k, v := range want {
			if got[k] != v {
				return fmt.Errorf("%s = %v, want %v (all: %v)", k, got[k], v, got)
			}
		}
		if r := got[metricsNamespace+`_rejected_connections_total{limit="max_connections"}`]; r < 1 {
			return fmt.Errorf("no rejected connection counted: %v", got)
		}
		return nil
	})
	if preferredDead == 0 {
		t.Fatal("no connection preferred the dead upstream: the failover counts prove nothing")
	}
}
