// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// views is what each part of godist says of one upstream: routing (where
// a connection that prefers it lands), the admin API's upstreams and pick
// endpoints, and the metrics.
type views struct {
	routedTo    string
	adminStatus string
	pickUsable  bool
	metric      float64
}

func (c *testCaddy) viewsOf(t *testing.T, dial string) views {
	t.Helper()
	var v views
	conn := c.dial(t)
	defer conn.Close()
	name, err := askName(conn)
	if err != nil {
		t.Fatal(err)
	}
	v.routedTo = name
	for _, u := range c.upstreams(t, "")[0].Upstreams {
		if u.Dial == dial {
			v.adminStatus = u.Health.Status
		}
	}
	for _, ch := range c.pick(t, "ip=127.0.0.1")[0].Order {
		if ch.Dial == dial {
			v.pickUsable = ch.Usable
		}
	}
	v.metric = c.scrape(t)[fmt.Sprintf("%s_upstream_healthy{upstream=%q}", metricsNamespace, dial)]
	return v
}

// TestOneHealthTruth is defect 7 of the engine issue: routing, the admin
// API and the metrics each decided "is this upstream up?" themselves, and
// after a reload that dropped active checks the state they kept disagreed:
// routing treated the upstream as up while the metric still said down.
// Here active checks take the upstream a client prefers down, and a
// reload without active checks brings it back, for all of them at once.
func TestOneHealthTruth(t *testing.T) {
	checkNoLeaks(t)
	alpha := startBackend(t, "alpha", "", whoami)
	beta := startBackend(t, "beta", "", whoami)
	preferred, other := alpha, beta
	if NewPicker([]PickerUpstream{{Dial: alpha.addr}, {Dial: beta.addr}}).Pick("127.0.0.1", nil) == 1 {
		preferred, other = beta, alpha
	}
	handler := func(active bool) []map[string]any {
		hc := map[string]any{"passive": map[string]any{"fail_duration": "0s"}}
		if active {
			// The check asks each backend its name and wants the other's:
			// it fails on the preferred one only.
			hc["active"] = map[string]any{"interval": "100ms", "send": "who?\n", "expect": other.name}
		}
		return []map[string]any{godistRoute(map[string]any{
			"upstreams": upstreamsJSON(alpha.addr, beta.addr), "hash_key": "ip", "health_checks": hc,
		})}
	}
	c := startCaddyRoutes(t, "tcp", handler(true))

	down := views{routedTo: other.name, adminStatus: "down", pickUsable: false, metric: 0}
	eventually(t, 5*time.Second, "every view says the preferred upstream is down", func() error {
		if v := c.viewsOf(t, preferred.addr); v != down {
			return fmt.Errorf("%+v, want %+v", v, down)
		}
		return nil
	})

	if status, body := c.load(handler(false)); status != 200 {
		t.Fatalf("reload without active checks: %d %s", status, body)
	}
	up := views{routedTo: preferred.name, adminStatus: "up", pickUsable: true, metric: 1}
	eventually(t, 5*time.Second, "every view says it is up once no config checks it", func() error {
		if v := c.viewsOf(t, preferred.addr); v != up {
			return fmt.Errorf("%+v, want %+v", v, up)
		}
		return nil
	})
	if st := stateOf(t, preferred.addr); st.activeDown.Load() || st.activeCheckers.Load() != 0 {
		t.Errorf("the dropped checks' verdict survived the reload: down %v, %d checkers", st.activeDown.Load(), st.activeCheckers.Load())
	}
}

// TestValidateStandsAlone is defect 8: Validate could not check a config
// by itself, because Provision parsed hash_key and proxy_protocol, and the
// plan endpoint and the fuzzer each re-implemented the checks. Validate
// now checks a config as written, with its zero values as defaults.
func TestValidateStandsAlone(t *testing.T) {
	ok := []*Upstream{{Dial: "127.0.0.1:1"}, {Dial: "127.0.0.1:2", Weight: 3}}
	for _, tc := range []struct {
		name string
		h    *Handler
		want string // "" for valid
	}{
		{"defaults", &Handler{Upstreams: ok}, ""},
		{"no upstreams", &Handler{}, "upstreams: at least one upstream is required, or a dynamic_upstreams source"},
		{"a dynamic source only", &Handler{DynamicUpstreamsRaw: []byte(`{"source":"a","name":"db.internal","port":"5432"}`)}, ""},
		{"negative tier", &Handler{Upstreams: []*Upstream{{Dial: "127.0.0.1:1", Tier: -1}}}, "upstream 0 (127.0.0.1:1): tier -1: must be from 0 to 65536 (backup)"},
		{"tier past backup", &Handler{Upstreams: []*Upstream{{Dial: "127.0.0.1:1", Tier: BackupTier + 1}}}, "upstream 0 (127.0.0.1:1): tier 65537: must be from 0 to 65536 (backup)"},
		{"backup", &Handler{Upstreams: []*Upstream{{Dial: "127.0.0.1:1"}, {Dial: "127.0.0.1:2", Tier: BackupTier}}}, ""},
		{"missing upstream", &Handler{Upstreams: []*Upstream{nil}}, "upstream 0: missing"},
		{"bad dial", &Handler{Upstreams: []*Upstream{{Dial: "127.0.0.1"}}}, "upstream 0 (127.0.0.1): invalid dial address: missing port"},
		{"bad network", &Handler{Upstreams: []*Upstream{{Dial: "sctp/127.0.0.1:1"}}}, `network "sctp": must be tcp`},
		{"negative weight", &Handler{Upstreams: []*Upstream{{Dial: "127.0.0.1:1", Weight: -1}}}, "upstream 0 (127.0.0.1:1): weight -1: must be at least 1"},
		{"duplicate", &Handler{Upstreams: []*Upstream{{Dial: "127.0.0.1:1"}, {Dial: "127.0.0.1:1"}}}, "upstream 1 (127.0.0.1:1): the same dial address as upstream 0"},
		{"hash key typo", &Handler{Upstreams: ok, HashKey: "ipport"}, `hash_key "ipport": must be ip_port, ip, or a string with a {placeholder}`},
		{"proxy protocol", &Handler{Upstreams: ok, ProxyProtocol: "v3"}, `proxy_protocol "v3": must be v1 or v2`},
		{"idle timeout", &Handler{Upstreams: ok, IdleTimeout: -1}, "idle_timeout -1ns: must not be negative"},
		{"active defaults", &Handler{Upstreams: ok, HealthChecks: &HealthChecks{Active: &ActiveHealthChecks{}}}, ""},
		{"health port", &Handler{Upstreams: ok, HealthChecks: &HealthChecks{Active: &ActiveHealthChecks{Port: 70000}}}, "health_checks.active.port 70000: must be a port number, 1-65535"},
		{"max fails", &Handler{Upstreams: ok, HealthChecks: &HealthChecks{Passive: &PassiveHealthChecks{MaxFails: -2}}}, "health_checks.passive.max_fails -2: must be at least 1"},
		{"name", &Handler{Upstreams: ok, Name: "db primary"}, `name "db primary": ' ' at byte 2: only letters, digits, '-', '_' and '.' may be used`},
		{"slow start", &Handler{Upstreams: ok, SlowStart: -1}, "slow_start -1ns: must not be negative"},
		{"slow start too long", &Handler{Upstreams: ok, SlowStart: caddy.Duration(25 * time.Hour)}, "slow_start 25h0m0s: at most 24h0m0s"},
		{"on_down word", &Handler{Upstreams: ok, OnDown: "shutdown"}, `on_down "shutdown": must be keep or close`},
		{"on_down close without active checks", &Handler{Upstreams: ok, OnDown: "close"},
			"on_down close: needs active health checks (health_checks.active, or a health_* option in the Caddyfile): only they mark an upstream down for it"},
		{"on_down close", &Handler{Upstreams: ok, OnDown: "close", HealthChecks: &HealthChecks{Active: &ActiveHealthChecks{}}}, ""},
		{"state poll interval", &Handler{Upstreams: ok, StatePollInterval: caddy.Duration(10 * time.Millisecond)},
			"state_poll_interval 10ms: at least 100ms (each poll lists the handler's states in the storage)"},
		{"operator options", &Handler{Upstreams: ok, Name: "db", SlowStart: caddy.Duration(time.Minute), StatePollInterval: caddy.Duration(time.Second)}, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.h.Validate()
			switch {
			case tc.want == "" && err != nil:
				t.Fatalf("want valid, got %v", err)
			case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
				t.Fatalf("got %v, want an error containing %q", err, tc.want)
			}
			// The plan endpoint asks the same question of an upstream list.
			if len(tc.h.Upstreams) > 0 && tc.h.HashKey == "" && tc.h.ProxyProtocol == "" && tc.h.IdleTimeout == 0 && tc.h.HealthChecks == nil && tc.h.DynamicUpstreamsRaw == nil &&
				tc.h.Name == "" && tc.h.SlowStart == 0 && tc.h.OnDown == "" && tc.h.StatePollInterval == 0 {
				if perr := validateProposed(tc.h.Upstreams, nil); !errors.Is(perr, nil) != (err != nil) || (err != nil && perr.Error() != err.Error()) {
					t.Fatalf("the plan endpoint says %v where Validate says %v", perr, err)
				}
			}
		})
	}
}
