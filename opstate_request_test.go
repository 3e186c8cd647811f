// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

func TestParseOpStateRequest(t *testing.T) {
	tests := []struct {
		name string
		body string
		want opStateRequest
	}{
		{"drain", `{"upstream": "10.0.0.2:5432", "state": "drain"}`,
			opStateRequest{Upstream: "10.0.0.2:5432", State: opDrain}},
		{"drain with a deadline", `{"handler": "db", "upstream": "10.0.0.2:5432", "state": "drain", "deadline": "1m30s"}`,
			opStateRequest{Handler: "db", Upstream: "10.0.0.2:5432", State: opDrain, Deadline: 90 * time.Second}},
		{"deadline in days", `{"upstream": "10.0.0.2:5432", "state": "drain", "deadline": "1d"}`,
			opStateRequest{Upstream: "10.0.0.2:5432", State: opDrain, Deadline: 24 * time.Hour}},
		{"maint", `{"upstream": "[::1]:5432", "state": "maint"}`,
			opStateRequest{Upstream: "[::1]:5432", State: opMaint}},
		{"maint keeping connections", `{"upstream": "unix//run/pg.sock", "state": "maint", "keep_connections": true}`,
			opStateRequest{Upstream: "unix//run/pg.sock", State: opMaint, KeepConnections: true}},
		{"a canary's weight", `{"upstream": "10.0.0.3:5432", "state": "ready", "weight": 0.5, "reason": "canary 16.2"}`,
			opStateRequest{Upstream: "10.0.0.3:5432", State: opReady, Weight: 0.5, Reason: "canary 16.2"}},
		{"weight 1 is no override", `{"upstream": "10.0.0.3:5432", "state": "ready", "weight": 1}`,
			opStateRequest{Upstream: "10.0.0.3:5432", State: opReady}},
		{"the bounds of weight", `{"upstream": "10.0.0.3:5432", "state": "ready", "weight": 100}`,
			opStateRequest{Upstream: "10.0.0.3:5432", State: opReady, Weight: 100}},
		{"null is left out", `{"upstream": "10.0.0.3:5432", "state": "ready", "weight": null, "handler": null}`,
			opStateRequest{Upstream: "10.0.0.3:5432", State: opReady}},
		{"field names in any case, as in Caddy's JSON", `{"Upstream": "10.0.0.3:5432", "STATE": "drain"}`,
			opStateRequest{Upstream: "10.0.0.3:5432", State: opDrain}},
		{"white space around", " \n{\"upstream\": \"udp/10.0.0.3:53\", \"state\": \"ready\"}\n\n",
			opStateRequest{Upstream: "udp/10.0.0.3:53", State: opReady}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := parseOpStateRequest(strings.NewReader(tt.body))
			if err != nil {
				t.Fatalf("error: %v", err)
			}
			if got != tt.want {
				t.Errorf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestParseOpStateRequestErrors(t *testing.T) {
	const up = `"upstream": "10.0.0.2:5432", `
	tests := []struct {
		name   string
		body   string
		status int
		msg    string
	}{
		{"empty", ``, 400, `request body: empty: want {"upstream": "host:port", "state": "drain"}`},
		{"only white space", " \n ", 400, `request body: empty: want {"upstream": "host:port", "state": "drain"}`},
		{"too large", `{"reason": "` + strings.Repeat("x", maxOpStateBody) + `"}`, 413, "request body: larger than 8192 bytes"},
		{"not JSON", `state=drain`, 400, "request body: not valid JSON: invalid character 's' looking for beginning of value"},
		{"cut short", `{"upstream": "10.0.0.2:5432"`, 400, "request body: not valid JSON: unexpected EOF"},
		{"an array", `[{"state": "drain"}]`, 400, "request body: must be a JSON object, not a JSON array"},
		{"a string", `"drain"`, 400, "request body: must be a JSON object, not a JSON string"},
		{"two objects", `{` + up + `"state": "drain"} {}`, 400, "request body: more after the JSON object"},
		{"unknown field", `{` + up + `"state": "drain", "timeout": "30s"}`, 400,
			`request body: unknown field "timeout": the fields are handler, upstream, state, deadline, keep_connections, weight and reason`},
		{"missing upstream", `{"state": "drain"}`, 400, "upstream: required: the upstream's dial address, as the handler lists it"},
		{"empty upstream", `{"upstream": "", "state": "drain"}`, 400, "upstream: required: the upstream's dial address, as the handler lists it"},
		{"upstream without a port", `{"upstream": "10.0.0.2", "state": "drain"}`, 400, `upstream "10.0.0.2": invalid dial address: missing port`},
		{"upstream a port range", `{"upstream": "10.0.0.2:5432-5433", "state": "drain"}`, 400,
			`upstream "10.0.0.2:5432-5433": invalid dial address: a port range is not an upstream; list each port`},
		{"upstream a number", `{"upstream": 5432, "state": "drain"}`, 400, "upstream: must be a JSON string, not a JSON number"},
		{"missing state", `{` + up[:len(up)-2] + `}`, 400, "state: required: ready, drain or maint"},
		{"null state", `{` + up + `"state": null}`, 400, "state: required: ready, drain or maint"},
		{"bad state", `{` + up + `"state": "drained"}`, 400, `state "drained": must be ready, drain or maint`},
		{"state in capitals", `{` + up + `"state": "DRAIN"}`, 400, `state "DRAIN": must be ready, drain or maint`},
		{"state a bool", `{` + up + `"state": true}`, 400, "state: must be a JSON string, not a JSON bool"},
		{"empty handler", `{"handler": "", ` + up + `"state": "drain"}`, 400,
			"handler: empty: give a handler's name, or leave it out when one name is running"},
		{"bad handler", `{"handler": "db primary", ` + up + `"state": "drain"}`, 400,
			`name "db primary": ' ' at byte 2: only letters, digits, '-', '_' and '.' may be used`},
		{"handler an index", `{"handler": 0, ` + up + `"state": "drain"}`, 400, "handler: must be a JSON string, not a JSON number"},
		{"deadline on maint", `{` + up + `"state": "maint", "deadline": "30s"}`, 400, "deadline: only with state drain, not maint"},
		{"deadline on ready", `{` + up + `"state": "ready", "deadline": "30s"}`, 400, "deadline: only with state drain, not ready"},
		{"deadline not a duration", `{` + up + `"state": "drain", "deadline": "soon"}`, 400,
			`deadline "soon": not a duration such as "30s" or "10m"`},
		{"deadline without a unit", `{` + up + `"state": "drain", "deadline": "30"}`, 400,
			`deadline "30": not a duration such as "30s" or "10m"`},
		{"deadline a number", `{` + up + `"state": "drain", "deadline": 30}`, 400,
			`deadline: must be a JSON string such as "30s", not a JSON number`},
		{"deadline zero", `{` + up + `"state": "drain", "deadline": "0s"}`, 400,
			`deadline "0s": must be positive; leave it out to let the connections end by themselves`},
		{"deadline negative", `{` + up + `"state": "drain", "deadline": "-5m"}`, 400,
			`deadline "-5m": must be positive; leave it out to let the connections end by themselves`},
		{"deadline too far", `{` + up + `"state": "drain", "deadline": "8d"}`, 400, `deadline "8d": at most 168h0m0s; a longer drain is a maint`},
		{"keep_connections on drain", `{` + up + `"state": "drain", "keep_connections": true}`, 400,
			"keep_connections: only with state maint, not drain"},
		{"keep_connections false on ready", `{` + up + `"state": "ready", "keep_connections": false}`, 400,
			"keep_connections: only with state maint, not ready"},
		{"keep_connections a string", `{` + up + `"state": "maint", "keep_connections": "yes"}`, 400,
			"keep_connections: must be true or false, not a JSON string"},
		{"weight on drain", `{` + up + `"state": "drain", "weight": 0.5}`, 400,
			"weight: only with state ready, not drain: a drain upstream takes no new connections"},
		{"weight zero", `{` + up + `"state": "ready", "weight": 0}`, 400,
			"weight 0: must be from 0.01 to 100, a factor of the upstream's configured weight"},
		{"weight negative", `{` + up + `"state": "ready", "weight": -1}`, 400,
			"weight -1: must be from 0.01 to 100, a factor of the upstream's configured weight"},
		{"weight too small", `{` + up + `"state": "ready", "weight": 0.001}`, 400,
			"weight 0.001: must be from 0.01 to 100, a factor of the upstream's configured weight"},
		{"weight too large", `{` + up + `"state": "ready", "weight": 101}`, 400,
			"weight 101: must be from 0.01 to 100, a factor of the upstream's configured weight"},
		{"weight out of a float's range", `{` + up + `"state": "ready", "weight": 1e999}`, 400,
			"weight: must be a JSON number, not a JSON number 1e999"},
		{"weight as a string", `{` + up + `"state": "ready", "weight": "0.5x"}`, 400,
			"weight: must be a JSON number, not a JSON string"},
		{"reason too long", `{` + up + `"state": "drain", "reason": "` + strings.Repeat("x", maxOpReason+1) + `"}`, 400,
			"reason: 257 bytes: at most 256"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parseOpStateRequest(strings.NewReader(tt.body))
			var apiErr caddy.APIError
			if !errors.As(err, &apiErr) {
				t.Fatalf("error %v: want a caddy.APIError", err)
			}
			if apiErr.HTTPStatus != tt.status || apiErr.Err.Error() != tt.msg {
				t.Errorf("got %d %q\nwant %d %q", apiErr.HTTPStatus, apiErr.Err, tt.status, tt.msg)
			}
		})
	}
}

func TestResolveOpHandler(t *testing.T) {
	tests := []struct {
		name   string
		asked  string
		names  []string
		want   string
		status int
		msg    string
	}{
		{"left out, one name", "", []string{"default"}, "default", 0, ""},
		{"left out, one name twice", "", []string{"db", "db"}, "db", 0, ""},
		{"given and running", "db", []string{"cache", "db"}, "db", 0, ""},
		{"left out, two names", "", []string{"db", "cache", "db"}, "", 400,
			`handler: required when godist handlers of several names run: the names running are "cache", "db"`},
		{"given, not running", "dbb", []string{"db", "cache"}, "", 404,
			`handler "dbb": no godist handler of that name is running: the names running are "cache", "db"`},
		{"none running", "", nil, "", 404, "no godist handler is running"},
		{"given, none running", "db", nil, "", 404, "no godist handler is running"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req := opStateRequest{Handler: tt.asked, Upstream: "10.0.0.1:5432"}
			err := resolveOpHandler(&req, tt.names)
			if tt.status == 0 {
				if err != nil || req.Handler != tt.want {
					t.Fatalf("got %q, %v; want %q", req.Handler, err, tt.want)
				}
				return
			}
			var apiErr caddy.APIError
			if !errors.As(err, &apiErr) || apiErr.HTTPStatus != tt.status || apiErr.Err.Error() != tt.msg {
				t.Errorf("got %v\nwant %d %q", err, tt.status, tt.msg)
			}
		})
	}
}

func TestUnknownUpstreamWarning(t *testing.T) {
	req := opStateRequest{Handler: "db", Upstream: "10.0.0.9:5432", State: opDrain}
	if w := unknownUpstreamWarning(req, []string{"10.0.0.1:5432", "10.0.0.9:5432"}); w != "" {
		t.Errorf("a listed upstream got a warning: %s", w)
	}
	w := unknownUpstreamWarning(req, []string{"10.0.0.1:5432"})
	want := `upstream "10.0.0.9:5432" is not among the upstreams of handler "db" now: the state is kept, and applies if it appears (a DNS-discovered address, say); check the address if you meant one that is listed`
	if w != want {
		t.Errorf("warning %q\nwant %q", w, want)
	}
}

func TestOpStateRequestRecord(t *testing.T) {
	now := time.Date(2026, 5, 1, 12, 0, 0, 0, time.FixedZone("CEST", 2*3600))
	req := opStateRequest{Handler: "db", Upstream: "10.0.0.2:5432", State: opDrain, Deadline: time.Minute, Reason: "upgrade"}
	rec := req.record("db", now)
	want := opRecord{Handler: "db", Upstream: "10.0.0.2:5432", State: opDrain, Reason: "upgrade",
		SetAt: now.UTC(), Deadline: now.Add(time.Minute).UTC()}
	if !rec.sameAs(want) || rec.SetAt.Location() != time.UTC {
		t.Errorf("record %+v, want %+v", rec, want)
	}
	if rec := (opStateRequest{Upstream: "a:1", State: opReady}).record("db", now); !rec.isDefault() {
		t.Errorf("ready without a weight is not the default: %+v", rec)
	}
	if rec := (opStateRequest{Upstream: "a:1", State: opReady, Weight: 0.5}).record("db", now); rec.isDefault() || rec.weightFactor() != 0.5 {
		t.Errorf("ready with a weight: %+v", rec)
	}
}

// TestOpStateAnswerJSON pins the JSON of an answer, as docs/operate.md
// shows it: the record's fields, with those that do not apply left out.
func TestOpStateAnswerJSON(t *testing.T) {
	setAt := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	answer := opStateAnswer{
		Handler:  "db",
		Upstream: "10.0.0.9:5432",
		Previous: readyRecord("db", "10.0.0.9:5432"),
		State: opRecord{Handler: "db", Upstream: "10.0.0.9:5432", State: opDrain, Deadline: setAt.Add(30 * time.Second),
			Reason: "upgrade", SetAt: setAt, SetByHost: "lb-1", SetByPID: 4242, Version: 1777636800000},
		Warnings: []string{unknownUpstreamWarning(opStateRequest{Handler: "db", Upstream: "10.0.0.9:5432"}, nil)},
	}
	b, err := json.Marshal(answer)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"handler":"db","upstream":"10.0.0.9:5432",` +
		`"previous":{"handler":"db","upstream":"10.0.0.9:5432","state":"ready"},` +
		`"state":{"handler":"db","upstream":"10.0.0.9:5432","state":"drain","deadline":"2026-05-01T12:00:30Z","reason":"upgrade",` +
		`"set_at":"2026-05-01T12:00:00Z","set_by_host":"lb-1","set_by_pid":4242,"version":1777636800000},` +
		`"warnings":["upstream \"10.0.0.9:5432\" is not among the upstreams of handler \"db\" now: the state is kept, and applies if it appears (a DNS-discovered address, say); check the address if you meant one that is listed"]}`
	if string(b) != want {
		t.Errorf("answer\n%s\nwant\n%s", b, want)
	}
}
