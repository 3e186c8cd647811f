// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"errors"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// The metrics are read at scrape time from the counters godist keeps
// anyway (per upstream in its shared state, and process-wide for the
// connections it closes unpiped and the accepts its godist-tcp listeners
// retried), so they cost the piping path nothing:
// bytes are added once per connection as it ends, never per read.
//
// Per-upstream series are labelled by dial address. Health, failures and
// counts are shared by every handler that names an upstream, so each
// upstream has one series whatever the number of handlers, and its
// counters run on across config reloads.

const metricsNamespace = "caddy_layer4_godist"

var (
	descConnections = prometheus.NewDesc(metricsNamespace+"_upstream_connections_total",
		"Connections piped to an upstream.", []string{"upstream"}, nil)
	descActive = prometheus.NewDesc(metricsNamespace+"_upstream_active_connections",
		"Connections open (or being dialled) to an upstream now.", []string{"upstream"}, nil)
	descDialFailures = prometheus.NewDesc(metricsNamespace+"_upstream_dial_failures_total",
		"Dials to an upstream that failed or timed out.", []string{"upstream"}, nil)
	descFailovers = prometheus.NewDesc(metricsNamespace+"_upstream_failovers_total",
		"Connections whose key preferred an upstream but that went elsewhere, because it was down, full or did not answer.",
		[]string{"upstream"}, nil)
	descOverflows = prometheus.NewDesc(metricsNamespace+"_upstream_overflow_picks_total",
		"Connections whose key's first choice was an upstream at its balance_factor cap, and that went to the key's next choice under its cap instead.",
		[]string{"upstream"}, nil)
	descBytesTo = prometheus.NewDesc(metricsNamespace+"_upstream_sent_bytes_total",
		"Bytes sent to an upstream, counted when each connection ends.", []string{"upstream"}, nil)
	descBytesFrom = prometheus.NewDesc(metricsNamespace+"_upstream_received_bytes_total",
		"Bytes received from an upstream, counted when each connection ends.", []string{"upstream"}, nil)
	descHealthy = prometheus.NewDesc(metricsNamespace+"_upstream_healthy",
		"Whether an upstream is up (1) or down (0) by the active checks and the recent failed dials.", []string{"upstream"}, nil)
	descClosed = prometheus.NewDesc(metricsNamespace+"_upstream_closed_connections_total",
		"Connections to an upstream that godist closed while they flowed: reason maint (an operator put it in maintenance), drain_deadline (its drain reached its deadline) or on_down (on_down close, when the active checks marked it down).",
		[]string{"upstream", "reason"}, nil)
	descRejected = prometheus.NewDesc(metricsNamespace+"_rejected_connections_total",
		"Connections closed on arrival over a limit: a handler's max_connections, or the file descriptors the process can spare.",
		[]string{"limit"}, nil)
	descNoUpstream = prometheus.NewDesc(metricsNamespace+"_no_upstream_connections_total",
		"Connections closed because no upstream answered, or none could be dialled (every one at max_connections, drained or in maintenance).", nil, nil)
	descAcceptErrors = prometheus.NewDesc(metricsNamespace+"_accept_errors_total",
		"Accepts on a godist-tcp listener that failed for want of a local resource and were retried after a backoff.",
		[]string{"error"}, nil)

	// The dynamic upstream sources, one series per lookup name
	// (`a:db.internal:5432`, `srv:_pg._tcp.db.internal`), read from
	// sourceStates.
	descSourceLastSuccess = prometheus.NewDesc(metricsNamespace+"_source_last_success_timestamp_seconds",
		"When an upstream lookup last found upstreams, in seconds since the Unix epoch; 0 if it never has.", []string{"source"}, nil)
	descSourceFailures = prometheus.NewDesc(metricsNamespace+"_source_failures_total",
		"Upstream lookups that failed or found nothing (the last good set stays).", []string{"source"}, nil)
	descSourceRecords = prometheus.NewDesc(metricsNamespace+"_source_records",
		"Upstreams an upstream lookup serves now: those of its last good set.", []string{"source"}, nil)

	// One series of value 1 per running handler: its name, the fingerprint
	// of its config, and the digest of its name's operator states
	// ("none" without any). Two instances that send every key to the same
	// upstream report the same three labels; see docs/operate.md for the
	// alert on instances that disagree.
	descHandlerInfo = prometheus.NewDesc(metricsNamespace+"_handler_info",
		"A running godist handler: its name, its config's fingerprint and the digest of its operator states; always 1.",
		[]string{"name", "fingerprint", "operator_state"}, nil)
)

// collector reports godist's metrics to a Prometheus registry.
type collector struct{}

// registerMetrics adds godist's collector to a config's metrics registry.
// Every godist handler, godist-tcp listener and DNS source of a config
// calls it; the first registers.
func registerMetrics(reg *prometheus.Registry) error {
	if reg == nil {
		return nil
	}
	err := reg.Register(collector{})
	if are := (prometheus.AlreadyRegisteredError{}); errors.As(err, &are) {
		return nil
	}
	return err
}

// Describe implements prometheus.Collector.
func (collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descConnections, descActive, descDialFailures, descFailovers, descOverflows,
		descBytesTo, descBytesFrom, descHealthy, descClosed, descRejected, descNoUpstream, descAcceptErrors,
		descSourceLastSuccess, descSourceFailures, descSourceRecords, descHandlerInfo} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (collector) Collect(ch chan<- prometheus.Metric) {
	now := time.Now().UnixNano()
	upstreamStates.Range(func(key, value any) bool {
		dial, ok1 := key.(string)
		st, ok2 := value.(*upstreamState)
		if !ok1 || !ok2 {
			return true
		}
		counter := func(d *prometheus.Desc, v uint64) {
			ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), dial)
		}
		counter(descConnections, st.total.Load())
		counter(descDialFailures, st.dialFailures.Load())
		counter(descFailovers, st.failovers.Load())
		counter(descOverflows, st.overflows.Load())
		counter(descBytesTo, st.bytesTo.Load())
		counter(descBytesFrom, st.bytesFrom.Load())
		ch <- prometheus.MustNewConstMetric(descActive, prometheus.GaugeValue, float64(st.active.Load()), dial)
		healthy := 1.0
		if active, passive := st.down(&now); active || passive {
			healthy = 0
		}
		ch <- prometheus.MustNewConstMetric(descHealthy, prometheus.GaugeValue, healthy, dial)
		for why := closeMaint; why < closeReasons; why++ {
			ch <- prometheus.MustNewConstMetric(descClosed, prometheus.CounterValue, float64(st.closed[why].Load()), dial, why.String())
		}
		return true
	})
	ch <- prometheus.MustNewConstMetric(descRejected, prometheus.CounterValue, float64(rejectedOverLimit.Load()), "max_connections")
	ch <- prometheus.MustNewConstMetric(descRejected, prometheus.CounterValue, float64(rejectedOverDescriptors.Load()), "descriptors")
	ch <- prometheus.MustNewConstMetric(descNoUpstream, prometheus.CounterValue, float64(noUpstream.Load()))
	for i, e := range acceptRetryErrors {
		ch <- prometheus.MustNewConstMetric(descAcceptErrors, prometheus.CounterValue, float64(acceptRetries[i].Load()), e.name)
	}
	collectSources(ch)
	collectHandlerInfo(ch, liveHandlers.list())
}

// collectHandlerInfo reports the info series of the running handlers,
// once per distinct set of labels: handlers of one name and config (two
// routes to one pool, or the old and new config during a reload) make one
// series.
func collectHandlerInfo(ch chan<- prometheus.Metric, handlers []*Handler) {
	seen := make(map[handlerInfo]bool, len(handlers))
	for _, h := range handlers {
		info := h.info()
		if seen[info] {
			continue
		}
		seen[info] = true
		ch <- prometheus.MustNewConstMetric(descHandlerInfo, prometheus.GaugeValue, 1, info.name, info.fingerprint, info.operatorState)
	}
}

// collectSources reports each upstream lookup in use.
func collectSources(ch chan<- prometheus.Metric) {
	sourceStates.Range(func(key, value any) bool {
		name, ok1 := key.(string)
		st, ok2 := value.(*sourceState)
		if !ok1 || !ok2 {
			return true
		}
		s := st.status(name)
		lastSuccess := 0.0
		if !s.LastSuccess.IsZero() {
			lastSuccess = float64(s.LastSuccess.UnixNano()) / 1e9
		}
		ch <- prometheus.MustNewConstMetric(descSourceLastSuccess, prometheus.GaugeValue, lastSuccess, name)
		ch <- prometheus.MustNewConstMetric(descSourceFailures, prometheus.CounterValue, float64(s.Failures), name)
		ch <- prometheus.MustNewConstMetric(descSourceRecords, prometheus.GaugeValue, float64(s.Records), name)
		return true
	})
}

// Interface guard
var _ prometheus.Collector = collector{}
