// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"encoding/json"
	"fmt"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/miekg/dns"

	"github.com/mholt/caddy-l4/layer4"
)

func init() {
	caddy.RegisterModule(sourceProbe{})
}

// sourceProbe is a layer4 handler, for tests only, that loads a dynamic
// upstream source the way the godist handler is to (the same field, tags
// and Caddyfile subdirective), watches it for as long as its config runs,
// and tells the test what it delivers. It closes every connection.
type sourceProbe struct {
	Name                string          `json:"name"`
	DynamicUpstreamsRaw json.RawMessage `json:"dynamic_upstreams,omitempty" caddy:"namespace=layer4.handlers.godist.upstreams inline_key=source"`
}

// probeRun is one provisioned probe's watch.
type probeRun struct {
	source  UpstreamSource
	updates chan []DiscoveredUpstream
	done    chan struct{} // closed when Watch has returned
}

var (
	probesMu sync.Mutex
	probes   = map[string][]*probeRun{} // by probe name, oldest first
)

func (sourceProbe) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.handlers.godist_test_source_probe",
		New: func() caddy.Module { return new(sourceProbe) },
	}
}

func (p *sourceProbe) Provision(ctx caddy.Context) error {
	mod, err := ctx.LoadModule(p, "DynamicUpstreamsRaw")
	if err != nil {
		return fmt.Errorf("dynamic_upstreams: %w", err)
	}
	run := &probeRun{source: mod.(UpstreamSource), updates: make(chan []DiscoveredUpstream, 100), done: make(chan struct{})}
	probesMu.Lock()
	probes[p.Name] = append(probes[p.Name], run)
	probesMu.Unlock()
	go func() {
		defer close(run.done)
		run.source.Watch(ctx, func(set []DiscoveredUpstream) { run.updates <- set })
	}()
	return nil
}

func (*sourceProbe) Handle(*layer4.Connection, layer4.Handler) error { return nil }

// UnmarshalCaddyfile: `godist_test_source_probe <name> { dynamic <source> ... }`.
func (p *sourceProbe) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next()
	if !d.NextArg() {
		return d.ArgErr()
	}
	p.Name = d.Val()
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		if d.Val() != "dynamic" {
			return d.Errf("unrecognized subdirective '%s'", d.Val())
		}
		if !d.NextArg() {
			return d.ArgErr()
		}
		raw, err := unmarshalSource(d)
		if err != nil {
			return err
		}
		p.DynamicUpstreamsRaw = raw
	}
	return nil
}

// probeRuns returns the runs of the probe named name so far.
func probeRuns(name string) []*probeRun {
	probesMu.Lock()
	defer probesMu.Unlock()
	return append([]*probeRun(nil), probes[name]...)
}

// TestSourcesInCaddy runs sources inside a real Caddy, from a Caddyfile:
// adapted through the `dynamic` subdirective, provisioned as guest
// modules, watched for as long as the config runs, their metrics on the
// admin endpoint, and all of it gone when the config is.
func TestSourcesInCaddy(t *testing.T) {
	s := startTestDNS(t)
	s.setA("db.godist.test", "10.0.0.1")
	s.setA("db2.godist.test", "10.0.0.2")
	s.setSRV("_pg._tcp.godist.test", testSRV{target: "db2.godist.test", port: 6432, priority: 5, weight: 50})
	probesMu.Lock()
	delete(probes, "in_caddy") // runs of this test before (-count)
	probesMu.Unlock()
	baseline := runtime.NumGoroutine()

	caddyfileText := fmt.Sprintf(`{
	layer4 {
		127.0.0.1:0 {
			route {
				godist_test_source_probe in_caddy {
					dynamic multi {
						a db.godist.test 5432 {
							resolvers %[1]s
							refresh 100ms
							versions ipv4
						}
						srv _pg._tcp.godist.test {
							resolvers %[1]s
							refresh 100ms
						}
					}
				}
			}
		}
	}
}
`, s.addr)
	out, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfileText), nil)
	if err != nil || len(warnings) > 0 {
		t.Fatalf("adapting: %v %v", err, warnings)
	}
	var adapted struct {
		Apps struct {
			Layer4 struct {
				Servers map[string]struct {
					Routes []map[string]any `json:"routes"`
				} `json:"servers"`
			} `json:"layer4"`
		} `json:"apps"`
	}
	if err := json.Unmarshal(out, &adapted); err != nil {
		t.Fatal(err)
	}
	routes := adapted.Apps.Layer4.Servers["srv0"].Routes
	handler, _ := json.Marshal(routes[0]["handle"].([]any)[0])
	assertJSONEqual(t, handler, fmt.Sprintf(`{"handler":"godist_test_source_probe","name":"in_caddy","dynamic_upstreams":{"source":"multi","sources":[
		{"source":"a","name":"db.godist.test","port":"5432","refresh":100000000,"resolver":{"addresses":[%[1]q]},"versions":{"ipv4":true}},
		{"source":"srv","name":"_pg._tcp.godist.test","refresh":100000000,"resolver":{"addresses":[%[1]q]}}]}}`, s.addr))

	c := startCaddyConfig(t, caddyConfig{Routes: routes})
	runs := probeRuns("in_caddy")
	if len(runs) != 1 {
		t.Fatalf("%d probes provisioned", len(runs))
	}
	run := runs[0]
	w := &watching{t: t, src: run.source, updates: run.updates, done: run.done, cancel: func() {}}
	w.expect(up("10.0.0.1:5432", 1, 0, "a:db.godist.test:5432"), up("10.0.0.2:6432", 50, 5, "srv:_pg._tcp.godist.test"))
	s.setSRV("_pg._tcp.godist.test", testSRV{target: "db2.godist.test", port: 6432, priority: 1, weight: 10})
	w.expect(up("10.0.0.1:5432", 1, 0, "a:db.godist.test:5432"), up("10.0.0.2:6432", 10, 1, "srv:_pg._tcp.godist.test"))
	s.setRcode("db.godist.test", dns.RcodeServerFailure)
	failing := func() error {
		if st := run.source.Status()[0]; st.Failures < 2 {
			return fmt.Errorf("status %+v", st)
		}
		return nil
	}
	eventually(t, testTimeout, "failed lookups", failing)

	metrics := c.scrape(t)
	for series, want := range map[string]float64{
		`caddy_layer4_godist_source_records{source="a:db.godist.test:5432"}`:    1,
		`caddy_layer4_godist_source_records{source="srv:_pg._tcp.godist.test"}`: 1,
	} {
		if got, ok := metrics[series]; !ok || got != want {
			t.Errorf("%s = %v (present %v); want %v", series, got, ok, want)
		}
	}
	if _, ok := metrics[`caddy_layer4_godist_source_failures_total{source="srv:_pg._tcp.godist.test"}`]; !ok {
		t.Error("no failures_total series for the srv source")
	}
	if got := metrics[`caddy_layer4_godist_source_failures_total{source="a:db.godist.test:5432"}`]; got < 2 {
		t.Errorf("failures of the a source: %v; want at least 2", got)
	}
	if got := metrics[`caddy_layer4_godist_source_last_success_timestamp_seconds{source="a:db.godist.test:5432"}`]; time.Since(time.Unix(int64(got), 0)) > time.Minute {
		t.Errorf("last success of the a source: %v", got)
	}

	// Unloading the config ends the watch and releases the sources.
	stopCaddy(t)
	select {
	case <-run.done:
	case <-time.After(testTimeout):
		t.Fatal("Watch did not end when its config was unloaded")
	}
	sourceStates.Range(func(key, _ any) bool {
		if name := key.(string); name == "a:db.godist.test:5432" || name == "srv:_pg._tcp.godist.test" {
			t.Errorf("the state of %s outlived its config", name)
		}
		return true
	})
	eventually(t, 2*time.Second, "goroutines back to the baseline", func() error {
		if n := runtime.NumGoroutine(); n > baseline {
			return fmt.Errorf("%d goroutines, %d before", n, baseline)
		}
		return nil
	})
}
