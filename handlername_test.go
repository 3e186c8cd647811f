// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
)

func TestValidateHandlerName(t *testing.T) {
	tests := []struct {
		name string
		want string
	}{
		{"", ""},
		{"db", ""},
		{"db-primary_eu.1", ""},
		{"7", ""},
		{strings.Repeat("a", 64), ""},
		{strings.Repeat("a", 65), `name "` + strings.Repeat("a", 65) + `": 65 bytes: at most 64`},
		{"-db", `name "-db": must start with a letter or a digit`},
		{".db", `name ".db": must start with a letter or a digit`},
		{"db/primary", `name "db/primary": '/' at byte 2: only letters, digits, '-', '_' and '.' may be used`},
		{"db primary", `name "db primary": ' ' at byte 2: only letters, digits, '-', '_' and '.' may be used`},
		{"bäd", `name "bäd": a non-ASCII character at byte 1: only letters, digits, '-', '_' and '.' may be used`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := ""
			if err := validateHandlerName(tt.name); err != nil {
				got = err.Error()
			}
			if got != tt.want {
				t.Errorf("got %q, want %q", got, tt.want)
			}
		})
	}
	if got := handlerName(""); got != defaultHandlerName {
		t.Errorf("an unnamed handler is %q, want %q", got, defaultHandlerName)
	}
	if got := handlerName("db"); got != "db" {
		t.Errorf("a handler named db is %q", got)
	}
}

// TestCollectHandlerInfo checks that handlers alike make one info series,
// and handlers that differ one each.
func TestCollectHandlerInfo(t *testing.T) {
	drained := newOpStore("db", &opHolder{})
	drained.snap.Store(newOpSnapshot(map[string]opRecord{"10.0.0.1:5432": {Handler: "db", Upstream: "10.0.0.1:5432", State: opDrain}}))
	handler := func(name, fp string, store *opStore) *Handler {
		h := &Handler{name: name, opStore: store}
		if store == nil {
			h.opStore = newOpStore(name, &opHolder{})
		}
		h.members.Store(&membership{fingerprint: fp})
		return h
	}
	handlers := []*Handler{
		handler("default", "aaaa", nil), handler("default", "aaaa", nil), handler("default", "bbbb", nil),
		handler("db", "aaaa", nil), handler("db", "aaaa", drained),
	}
	digest := drained.snapshot().digest
	ch := make(chan prometheus.Metric, 10)
	collectHandlerInfo(ch, handlers)
	close(ch)
	var got []string
	for m := range ch {
		var pb dto.Metric
		if err := m.Write(&pb); err != nil {
			t.Fatal(err)
		}
		if v := pb.GetGauge().GetValue(); v != 1 {
			t.Errorf("value %g, want 1", v)
		}
		var labels []string
		for _, l := range pb.GetLabel() {
			labels = append(labels, l.GetName()+"="+l.GetValue())
		}
		got = append(got, strings.Join(labels, ","))
	}
	want := []string{
		"fingerprint=aaaa,name=default,operator_state=none",
		"fingerprint=bbbb,name=default,operator_state=none",
		"fingerprint=aaaa,name=db,operator_state=none",
		"fingerprint=aaaa,name=db,operator_state=" + digest,
	}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("series %v, want %v", got, want)
	}
}

// TestHandlerInfoMetric scrapes a real Caddy running three handlers, two
// of them alike: two info series, each with its handler's fingerprint.
func TestHandlerInfoMetric(t *testing.T) {
	_, addrs := startBackends(t, 3, echo)
	same := map[string]any{"upstreams": upstreamsJSON(addrs[0], addrs[1])}
	c := startCaddyRoutes(t, "tcp", []map[string]any{
		godistRoute(same), godistRoute(same),
		godistRoute(map[string]any{"upstreams": upstreamsJSON(addrs[0], addrs[1], addrs[2])}),
	})
	two := fingerprint("", []*Upstream{{Dial: addrs[0], Weight: 1}, {Dial: addrs[1], Weight: 1}})
	three := fingerprint("", []*Upstream{{Dial: addrs[0], Weight: 1}, {Dial: addrs[1], Weight: 1}, {Dial: addrs[2], Weight: 1}})
	var got []string
	for series, v := range c.scrape(t) {
		if strings.HasPrefix(series, metricsNamespace+"_handler_info{") {
			got = append(got, series)
			if v != 1 {
				t.Errorf("%s = %g, want 1", series, v)
			}
		}
	}
	slices.Sort(got)
	want := []string{
		metricsNamespace + `_handler_info{fingerprint="` + two + `",name="default",operator_state="none"}`,
		metricsNamespace + `_handler_info{fingerprint="` + three + `",name="default",operator_state="none"}`,
	}
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("info series\n%v\nwant\n%v", got, want)
	}
}
