// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/miekg/dns"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// The sources are tested against testDNS, a real DNS server on loopback
// in the test process (dnsserver_test.go), whose records each test
// changes as it goes. A source's refresh interval is short here (tens of
// milliseconds); every wait is bounded by testTimeout.

// loadSource provisions and validates a source from its JSON, as Caddy
// does for a handler's guest module, and cleans it up when the test ends.
// Its logs go to logs, if not nil.
func loadSource(t *testing.T, id, raw string, logs *zap.Logger) UpstreamSource {
	t.Helper()
	src, err := tryLoadSource(t, id, raw)
	if err != nil {
		t.Fatalf("loading %s %s: %v", id, raw, err)
	}
	if logs == nil {
		logs = zap.NewNop()
	}
	setSourceLogger(src, logs)
	return src
}

func tryLoadSource(t *testing.T, id, raw string) (UpstreamSource, error) {
	t.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	mod, err := ctx.LoadModuleByID(upstreamSourceNamespace+"."+id, json.RawMessage(raw))
	if err != nil {
		return nil, err
	}
	return mod.(UpstreamSource), nil
}

// setSourceLogger points a source's logs (and its sources', for multi) at
// logger, instead of the development logger Caddy gives a context without
// a config.
func setSourceLogger(src UpstreamSource, logger *zap.Logger) {
	switch s := src.(type) {
	case *AUpstreams:
		s.watcher.logger = logger
	case *SRVUpstreams:
		s.watcher.logger = logger
	case *MultiUpstreams:
		for _, child := range s.sources {
			setSourceLogger(child, logger)
		}
	}
}

// watching is a source being watched by a test.
type watching struct {
	t       *testing.T
	src     UpstreamSource
	updates chan []DiscoveredUpstream
	cancel  context.CancelFunc
	done    chan struct{}
}

// watch runs src.Watch on a goroutine of its own until the test ends or
// stop is called.
func watch(t *testing.T, src UpstreamSource) *watching {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	w := &watching{t: t, src: src, updates: make(chan []DiscoveredUpstream, 100), cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(w.done)
		src.Watch(ctx, func(set []DiscoveredUpstream) { w.updates <- set })
	}()
	t.Cleanup(w.stop)
	return w
}

// stop cancels the watch and waits for Watch to return.
func (w *watching) stop() {
	w.t.Helper()
	w.cancel()
	select {
	case <-w.done:
	case <-time.After(testTimeout):
		w.t.Fatal("Watch did not return after its context was cancelled")
	}
}

// next waits for the next set delivered.
func (w *watching) next() []DiscoveredUpstream {
	w.t.Helper()
	select {
	case set := <-w.updates:
		return set
	case <-time.After(testTimeout):
		w.t.Fatalf("no set delivered within %s; status %+v", testTimeout, w.src.Status())
		return nil
	}
}

// expect waits for the next set delivered and checks it.
func (w *watching) expect(want ...DiscoveredUpstream) {
	w.t.Helper()
	got := w.next()
	if !slices.Equal(got, want) && (len(got) != 0 || len(want) != 0) {
		w.t.Fatalf("delivered\n %v\nwant\n %v", got, want)
	}
}

// expectNone checks that nothing was delivered so far. The sources call
// update before a lookup ends, so once a test has seen a lookup's end in
// Status, anything that lookup delivered is already in the channel.
func (w *watching) expectNone() {
	w.t.Helper()
	select {
	case set := <-w.updates:
		w.t.Fatalf("delivered %v; want nothing", set)
	default:
	}
}

// waitStatus waits until the source's first status satisfies ok.
func (w *watching) waitStatus(what string, ok func(SourceStatus) bool) SourceStatus {
	w.t.Helper()
	var st SourceStatus
	eventually(w.t, testTimeout, what, func() error {
		st = w.src.Status()[0]
		if !ok(st) {
			return fmt.Errorf("status %+v", st)
		}
		return nil
	})
	return st
}

// waitFailures waits until the source has counted n more failures than it
// had in before, and returns its status then.
func (w *watching) waitFailures(before SourceStatus, n uint64) SourceStatus {
	w.t.Helper()
	return w.waitStatus(fmt.Sprintf("%d more failed lookups", n), func(st SourceStatus) bool {
		return st.Failures >= before.Failures+n
	})
}

// waitSuccess waits for a successful lookup after the status before.
func (w *watching) waitSuccess(before SourceStatus) SourceStatus {
	w.t.Helper()
	return w.waitStatus("a successful lookup", func(st SourceStatus) bool {
		return st.LastSuccess.After(before.LastSuccess) && st.ConsecutiveFailures == 0
	})
}

func up(dial string, weight, tier int, source string) DiscoveredUpstream {
	return DiscoveredUpstream{Dial: dial, Weight: weight, Tier: tier, Source: source}
}

func TestSourceA(t *testing.T) {
	s := startTestDNS(t)
	const name = "db.godist.test"
	src := "a:db.godist.test:5432"
	s.setA(name, "10.0.0.2", "10.0.0.1")
	s.setAAAA(name, "2001:db8::1")
	w := watch(t, loadSource(t, "a", fmt.Sprintf(`{"name":%q,"port":"5432","refresh":"100ms","resolver":{"addresses":[%q]}}`, name, s.addr), nil))

	w.expect(up("10.0.0.1:5432", 1, 0, src), up("10.0.0.2:5432", 1, 0, src), up("[2001:db8::1]:5432", 1, 0, src))
	st := w.src.Status()[0]
	if st.Source != src || st.Records != 3 || st.LastSuccess.IsZero() || st.Failures != 0 || st.LastError != "" {
		t.Fatalf("status after the first lookup: %+v", st)
	}

	// A record added, then one removed: each new set once.
	s.setA(name, "10.0.0.1", "10.0.0.2", "10.0.0.3")
	w.expect(up("10.0.0.1:5432", 1, 0, src), up("10.0.0.2:5432", 1, 0, src), up("10.0.0.3:5432", 1, 0, src), up("[2001:db8::1]:5432", 1, 0, src))
	s.setA(name, "10.0.0.3", "10.0.0.2")
	s.setAAAA(name)
	w.expect(up("10.0.0.2:5432", 1, 0, src), up("10.0.0.3:5432", 1, 0, src))

	// Failures deliver nothing and are counted; each kind says why.
	failures := []struct {
		name      string
		break_    func()
		mend      func()
		wantError string
	}{
		{"SERVFAIL", func() { s.setRcode(name, dns.RcodeServerFailure) }, func() { s.setRcode(name, dns.RcodeSuccess) }, "server misbehaving"},
		{"no answer", func() { s.setDrop(name, true) }, func() { s.setDrop(name, false) }, "timeout"},
		{"NXDOMAIN", func() { s.remove(name) }, func() { s.setA(name, "10.0.0.2", "10.0.0.3") }, "no such host"},
		{"empty answer", func() { s.setA(name) }, func() { s.setA(name, "10.0.0.2", "10.0.0.3") }, "no such host"},
		{"AAAA fails, A answers", func() { s.setAAAA(name, "2001:db8::1"); s.setDrop(name, false); s.setRcode(name, 0) }, nil, ""},
	}
	for _, f := range failures[:4] {
		t.Run(f.name, func(t *testing.T) {
			before := w.src.Status()[0]
			f.break_()
			st := w.waitFailures(before, 2)
			w.expectNone()
			if st.ConsecutiveFailures < 2 || st.Records != 2 || !strings.Contains(st.LastError, f.wantError) || !strings.Contains(st.LastError, name) {
				t.Fatalf("status while failing: %+v; want 2 records kept and an error with %q", st, f.wantError)
			}
			if strings.Contains(st.LastError, " on ") {
				t.Errorf("the error names a server from resolv.conf, not the resolver asked: %s", st.LastError)
			}
			// The same records again: a success, but no new set.
			f.mend()
			w.waitSuccess(st)
			w.expectNone()
		})
	}
	// A failed AAAA query fails the whole lookup rather than dropping the
	// IPv6 upstreams from the set.
	s.setAAAA(name, "2001:db8::1")
	w.expect(up("10.0.0.2:5432", 1, 0, src), up("10.0.0.3:5432", 1, 0, src), up("[2001:db8::1]:5432", 1, 0, src))
	before := w.src.Status()[0]
	s.setRcode(name, dns.RcodeServerFailure)
	s.setA(name, "10.0.0.2", "10.0.0.3") // A would still answer, were the rcode per type
	w.waitFailures(before, 2)
	w.expectNone()
}

func TestSourceAVersions(t *testing.T) {
	s := startTestDNS(t)
	s.setA("v.godist.test", "10.0.0.1")
	s.setAAAA("v.godist.test", "2001:db8::1")
	tests := []struct {
		versions string
		want     string
		asked    uint16 // the type never asked
	}{
		{`{"ipv4":true}`, "10.0.0.1:80", dns.TypeAAAA},
		{`{"ipv6":true}`, "[2001:db8::1]:80", dns.TypeA},
		{`{"ipv4":false}`, "[2001:db8::1]:80", dns.TypeA},
	}
	for _, tt := range tests {
		t.Run(tt.versions, func(t *testing.T) {
			s := startTestDNS(t)
			s.setA("v.godist.test", "10.0.0.1")
			s.setAAAA("v.godist.test", "2001:db8::1")
			w := watch(t, loadSource(t, "a", fmt.Sprintf(`{"name":"v.godist.test","port":"80","versions":%s,"resolver":{"addresses":[%q]}}`, tt.versions, s.addr), nil))
			w.expect(up(tt.want, 1, 0, "a:v.godist.test:80"))
			if n := len(s.asked("v.godist.test", tt.asked)); n != 0 {
				t.Errorf("asked for %s %d times", dns.TypeToString[tt.asked], n)
			}
		})
	}
}

func TestSourceSRV(t *testing.T) {
	s := startTestDNS(t)
	const name = "_pg._tcp.godist.test"
	src := "srv:_pg._tcp.godist.test"
	s.setA("db1.godist.test", "10.0.0.1")
	s.setA("db2.godist.test", "10.0.0.2")
	s.setA("db3.godist.test", "10.0.0.3")
	s.setAAAA("db3.godist.test", "2001:db8::3")
	s.setSRV(name,
		testSRV{target: "db1.godist.test", port: 5432, priority: 10, weight: 60},
		testSRV{target: "db2.godist.test", port: 5432, priority: 10, weight: 0},
		testSRV{target: "db3.godist.test", port: 6432, priority: 20, weight: 5},
	)
	// The Caddy way: service, proto and name apart.
	w := watch(t, loadSource(t, "srv", fmt.Sprintf(`{"service":"pg","proto":"tcp","name":"godist.test","refresh":"30ms","resolver":{"addresses":[%q]}}`, s.addr), nil))
	// Weight 0 becomes 1; priority is the tier; each address of a target
	// is an upstream with the record's weight.
	w.expect(up("10.0.0.1:5432", 60, 10, src), up("10.0.0.2:5432", 1, 10, src),
		up("10.0.0.3:6432", 5, 20, src), up("[2001:db8::3]:6432", 5, 20, src))

	steps := []struct {
		name   string
		change func()
		want   []DiscoveredUpstream
	}{
		{"re-weighted", func() {
			s.setSRV(name,
				testSRV{target: "db1.godist.test", port: 5432, priority: 10, weight: 30},
				testSRV{target: "db2.godist.test", port: 5432, priority: 10, weight: 30},
				testSRV{target: "db3.godist.test", port: 6432, priority: 20, weight: 5})
		}, []DiscoveredUpstream{up("10.0.0.1:5432", 30, 10, src), up("10.0.0.2:5432", 30, 10, src),
			up("10.0.0.3:6432", 5, 20, src), up("[2001:db8::3]:6432", 5, 20, src)}},
		{"re-prioritised", func() {
			s.setSRV(name,
				testSRV{target: "db1.godist.test", port: 5432, priority: 20, weight: 30},
				testSRV{target: "db2.godist.test", port: 5432, priority: 10, weight: 30},
				testSRV{target: "db3.godist.test", port: 6432, priority: 10, weight: 5})
		}, []DiscoveredUpstream{up("10.0.0.1:5432", 30, 20, src), up("10.0.0.2:5432", 30, 10, src),
			up("10.0.0.3:6432", 5, 10, src), up("[2001:db8::3]:6432", 5, 10, src)}},
		{"record removed, a target's address changed", func() {
			s.setA("db2.godist.test", "10.0.0.22")
			s.setSRV(name,
				testSRV{target: "db2.godist.test", port: 5432, priority: 10, weight: 30},
				testSRV{target: "db3.godist.test", port: 6432, priority: 10, weight: 5})
		}, []DiscoveredUpstream{up("10.0.0.22:5432", 30, 10, src), up("10.0.0.3:6432", 5, 10, src), up("[2001:db8::3]:6432", 5, 10, src)}},
		{"a target gone is left out, a '.' target adds nothing", func() {
			s.setSRV(name,
				testSRV{target: "db2.godist.test", port: 5432, priority: 10, weight: 30},
				testSRV{target: "gone.godist.test", port: 5432, priority: 10, weight: 30},
				testSRV{target: ".", port: 5432, priority: 10, weight: 30})
		}, []DiscoveredUpstream{up("10.0.0.22:5432", 30, 10, src)}},
		{"two records for one address add their weights at the lower priority", func() {
			s.setA("alias.godist.test", "10.0.0.22")
			s.setSRV(name,
				testSRV{target: "db2.godist.test", port: 5432, priority: 10, weight: 30},
				testSRV{target: "alias.godist.test", port: 5432, priority: 10, weight: 12},
				testSRV{target: "alias.godist.test", port: 5432, priority: 30, weight: 99},
				testSRV{target: "db1.godist.test", port: 5432, priority: 5, weight: 1})
		}, []DiscoveredUpstream{up("10.0.0.1:5432", 1, 5, src), up("10.0.0.22:5432", 42, 10, src)}},
	}
	for _, step := range steps {
		t.Run(step.name, func(t *testing.T) {
			step.change()
			w.expect(step.want...)
		})
	}

	failures := []struct {
		name      string
		break_    func()
		mend      func()
		wantError string
	}{
		{"SRV SERVFAIL", func() { s.setRcode(name, dns.RcodeServerFailure) }, func() { s.setRcode(name, dns.RcodeSuccess) }, "server misbehaving"},
		{"SRV no answer", func() { s.setDrop(name, true) }, func() { s.setDrop(name, false) }, "timeout"},
		{"SRV NXDOMAIN", func() { s.setRcode(name, dns.RcodeNameError) }, func() { s.setRcode(name, dns.RcodeSuccess) }, "no such host"},
		{"a target SERVFAIL", func() { s.setRcode("db1.godist.test", dns.RcodeServerFailure) },
			func() { s.setRcode("db1.godist.test", dns.RcodeSuccess) }, "resolving target db1.godist.test."},
		{"every target gone", func() { s.remove("db1.godist.test"); s.remove("db2.godist.test"); s.remove("alias.godist.test") },
			func() {
				s.setA("db1.godist.test", "10.0.0.1")
				s.setA("db2.godist.test", "10.0.0.22")
				s.setA("alias.godist.test", "10.0.0.22")
			},
			"the lookup found no upstreams"},
	}
	for _, f := range failures {
		t.Run(f.name, func(t *testing.T) {
			before := w.src.Status()[0]
			f.break_()
			st := w.waitFailures(before, 2)
			w.expectNone()
			if st.Records != 2 || !strings.Contains(st.LastError, f.wantError) {
				t.Fatalf("status while failing: %+v; want 2 records kept and an error with %q", st, f.wantError)
			}
			f.mend()
			w.waitSuccess(st)
			w.expectNone()
		})
	}
}

func TestSourceSRVFullNameAndNetwork(t *testing.T) {
	s := startTestDNS(t)
	s.setA("db.godist.test", "10.0.0.1")
	s.setAAAA("db.godist.test", "2001:db8::1")
	s.setSRV("_pg._udp.godist.test", testSRV{target: "db.godist.test", port: 5432, priority: 1, weight: 1})
	w := watch(t, loadSource(t, "srv", fmt.Sprintf(`{"name":"_pg._udp.godist.test","dial_network":"udp4","resolver":{"addresses":[%q]}}`, s.addr), nil))
	w.expect(up("udp4/10.0.0.1:5432", 1, 1, "srv:_pg._udp.godist.test"))
	if n := len(s.asked("db.godist.test", dns.TypeAAAA)); n != 0 {
		t.Errorf("dial_network udp4 asked for AAAA %d times", n)
	}
	if st := w.src.Status()[0]; st.Source != "srv:_pg._udp.godist.test" || st.Records != 1 {
		t.Errorf("status %+v", st)
	}
}

func TestSourceSRVGracePeriod(t *testing.T) {
	s := startTestDNS(t)
	const name = "_pg._tcp.godist.test"
	s.setA("db.godist.test", "10.0.0.1")
	s.setSRV(name, testSRV{target: "db.godist.test", port: 5432, priority: 1, weight: 1})
	w := watch(t, loadSource(t, "srv", fmt.Sprintf(`{"name":%q,"refresh":"20ms","grace_period":"500ms","resolver":{"addresses":[%q]}}`, name, s.addr), nil))
	want := up("10.0.0.1:5432", 1, 1, "srv:"+name)
	w.expect(want)

	s.setRcode(name, dns.RcodeServerFailure)
	failedAt := time.Now()
	w.expect() // withdrawn: an empty set
	if waited := time.Since(failedAt); waited < 500*time.Millisecond {
		t.Errorf("withdrawn %s after the lookups started failing; grace_period is 500ms", waited)
	}
	if st := w.src.Status()[0]; st.Records != 0 || st.ConsecutiveFailures == 0 {
		t.Errorf("status after the withdrawal: %+v", st)
	}
	// Failures go on; nothing more is delivered until a lookup succeeds.
	w.waitFailures(w.src.Status()[0], 2)
	w.expectNone()
	s.setRcode(name, dns.RcodeSuccess)
	w.expect(want)

	// A failure shorter than grace_period withdraws nothing.
	before := w.src.Status()[0]
	s.setRcode(name, dns.RcodeServerFailure)
	w.waitFailures(before, 2)
	s.setRcode(name, dns.RcodeSuccess)
	w.waitSuccess(w.src.Status()[0])
	w.expectNone()
}

// TestSourceTruncatedAnswer: an answer too big for UDP is asked again over
// TCP, as Go's resolver does, through the configured resolver's TCP port.
func TestSourceTruncatedAnswer(t *testing.T) {
	s := startTestDNS(t)
	var ips, want []string
	for i := range 150 {
		ip := fmt.Sprintf("10.1.%d.%d", i/200, i%200+1)
		ips = append(ips, ip)
		want = append(want, ip+":443")
	}
	slices.Sort(want)
	s.setA("many.godist.test", ips...)
	w := watch(t, loadSource(t, "a", fmt.Sprintf(`{"name":"many.godist.test","port":"443","versions":{"ipv4":true},"resolver":{"addresses":[%q]}}`, s.addr), nil))
	if got := dials(w.next()); !slices.Equal(got, want) {
		t.Fatalf("got %d upstreams, want %d: %v", len(got), len(want), got)
	}
	var nets []string
	for _, q := range s.asked("many.godist.test", dns.TypeA) {
		nets = append(nets, q.net)
	}
	if !slices.Contains(nets, "tcp") {
		t.Errorf("asked over %v; want a retry over tcp", nets)
	}
}

// TestSourceResolvers: a resolver that fails hands the query over to the
// next in the list within the same lookup, and the one that answered is
// asked first from then on.
func TestSourceResolvers(t *testing.T) {
	const name = "db.godist.test"
	tests := []struct {
		name string
		dead func(t *testing.T) string // the failing resolver's address
		tcp  bool
	}{
		{name: "no answer over UDP", dead: func(t *testing.T) string {
			s := startTestDNS(t)
			s.setDrop(name, true)
			return s.addr
		}},
		{name: "no answer over TCP", tcp: true, dead: func(t *testing.T) string {
			s := startTestDNS(t)
			s.setDrop(name, true)
			return s.addr
		}},
		{name: "SERVFAIL", dead: func(t *testing.T) string {
			s := startTestDNS(t)
			s.setRcode(name, dns.RcodeServerFailure)
			return s.addr
		}},
		{name: "REFUSED", tcp: true, dead: func(t *testing.T) string {
			s := startTestDNS(t)
			s.setRcode(name, dns.RcodeRefused)
			return s.addr
		}},
		{name: "nothing listening", dead: func(t *testing.T) string { return freeUDPAddr(t) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			live := startTestDNS(t)
			live.setA(name, "10.0.0.1")
			dead, liveAddr := tt.dead(t), live.addr
			if tt.tcp {
				dead, liveAddr = "tcp/"+dead, "tcp/"+liveAddr
			}
			// Refresh 1s: a try waits at most 500ms for an answer, and
			// the lookup as a whole 1s.
			w := watch(t, loadSource(t, "a", fmt.Sprintf(`{"name":%q,"port":"1","refresh":"1s","versions":{"ipv4":true},
				"resolver":{"addresses":[%q,%q]}}`, name, dead, liveAddr), nil))
			w.expect(up("10.0.0.1:1", 1, 0, "a:db.godist.test:1"))
			st := w.src.Status()[0]
			if st.Failures != 0 {
				t.Errorf("the first lookup failed; it should have asked the second resolver: %+v", st)
			}
			asked := len(live.asked(name, dns.TypeA))
			w.waitSuccess(st)
			if n := len(live.asked(name, dns.TypeA)); n != asked+1 {
				t.Errorf("the second lookup asked the live resolver %d times; want once, first", n-asked)
			}
			for _, q := range live.asked(name, dns.TypeA) {
				if want := map[bool]string{true: "tcp", false: "udp"}[tt.tcp]; q.net != want {
					t.Errorf("asked over %s; want %s", q.net, want)
				}
			}
		})
	}
}

// TestSourceRefresh: a source looks up once at start, then once per
// refresh interval, never more often.
func TestSourceRefresh(t *testing.T) {
	s := startTestDNS(t)
	s.setA("db.godist.test", "10.0.0.1")
	const refresh = 150 * time.Millisecond
	w := watch(t, loadSource(t, "a", fmt.Sprintf(`{"name":"db.godist.test","port":"1","refresh":%q,"versions":{"ipv4":true},"resolver":{"addresses":[%q]}}`,
		refresh.String(), s.addr), nil))
	w.next()
	eventually(t, testTimeout, "five lookups", func() error {
		if n := len(s.asked("db.godist.test", dns.TypeA)); n < 5 {
			return fmt.Errorf("%d lookups", n)
		}
		return nil
	})
	w.stop()
	// The lookups after the first come on the ticks of the refresh
	// interval, whatever the delay of any one of them: over the span from
	// the first to the last, at most one more than the ticks it holds.
	queries := s.asked("db.godist.test", dns.TypeA)
	span := queries[len(queries)-1].at.Sub(queries[0].at)
	if after, most := len(queries)-1, int(span/refresh)+1; after > most {
		t.Errorf("%d lookups after the first within %s; refresh %s allows %d", after, span, refresh, most)
	}
	w.expectNone() // the set never changed
}

// TestSourceWatchEnds: Watch returns as soon as its context is done, even
// with a lookup in flight, and leaves no goroutine behind.
func TestSourceWatchEnds(t *testing.T) {
	s := startTestDNS(t)
	s.setA("db.godist.test", "10.0.0.1")
	s.setSRV("_pg._tcp.godist.test", testSRV{target: "db.godist.test", port: 5432, priority: 1, weight: 1})
	s.setDrop("silent.godist.test", true)
	baseline := runtime.NumGoroutine()

	// Refresh 10s: the lookup of silent.godist.test hangs for as long.
	a := loadSource(t, "a", fmt.Sprintf(`{"name":"db.godist.test","port":"1","refresh":"10s","resolver":{"addresses":[%q]}}`, s.addr), nil)
	multi := loadSource(t, "multi", fmt.Sprintf(`{"sources":[
		{"source":"srv","name":"_pg._tcp.godist.test","refresh":"10s","resolver":{"addresses":[%q]}},
		{"source":"a","name":"silent.godist.test","port":"1","refresh":"10s","resolver":{"addresses":[%q]}}]}`, s.addr, s.addr), nil)
	wa, wm := watch(t, a), watch(t, multi)
	wa.next()
	eventually(t, testTimeout, "the silent lookup asked", func() error {
		if len(s.asked("silent.godist.test", dns.TypeA)) == 0 {
			return fmt.Errorf("not yet")
		}
		return nil
	})
	start := time.Now()
	wa.stop()
	wm.stop()
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("Watch took %s to return; the hanging lookup was not cancelled", took)
	}
	wm.expectNone() // cancelled before the union's first delivery
	// Well within the 5s a hanging try would wait for its deadline.
	eventually(t, 2*time.Second, "goroutines back to the baseline", func() error {
		if n := runtime.NumGoroutine(); n > baseline {
			return fmt.Errorf("%d goroutines, %d before", n, baseline)
		}
		return nil
	})
}

func TestMultiUpstreams(t *testing.T) {
	s := startTestDNS(t)
	s.setA("a1.godist.test", "10.0.0.1", "10.0.0.9")
	s.setA("db.godist.test", "10.0.0.2")
	s.setA("db9.godist.test", "10.0.0.9")
	s.setSRV("_pg._tcp.godist.test",
		testSRV{target: "db.godist.test", port: 5432, priority: 1, weight: 7},
		testSRV{target: "db9.godist.test", port: 5432, priority: 2, weight: 3})
	s.setDrop("slow.godist.test", true)
	resolver := fmt.Sprintf(`"resolver":{"addresses":[%q]}`, s.addr)
	multi := loadSource(t, "multi", fmt.Sprintf(`{"sources":[
		{"source":"a","name":"a1.godist.test","port":"5432","refresh":"30ms","versions":{"ipv4":true},%[1]s},
		{"source":"multi","sources":[
			{"source":"srv","name":"_pg._tcp.godist.test","refresh":"30ms",%[1]s},
			{"source":"a","name":"slow.godist.test","port":"5432","refresh":"300ms",%[1]s}]}]}`, resolver), nil)
	w := watch(t, multi)

	// The first union comes once every source has finished its first
	// lookup: the slow one's has timed out by then. 10.0.0.9:5432 is in
	// both a1 (first) and the srv source: the first listed decides.
	w.expect(up("10.0.0.1:5432", 1, 0, "a:a1.godist.test:5432"), up("10.0.0.2:5432", 7, 1, "srv:_pg._tcp.godist.test"),
		up("10.0.0.9:5432", 1, 0, "a:a1.godist.test:5432"))
	status := multi.Status()
	if len(status) != 3 || status[2].Source != "a:slow.godist.test:5432" || status[2].Failures == 0 {
		t.Fatalf("when the first union came, the slow source had not failed: %+v", status)
	}

	// A change in one source changes the union; a source that fails keeps its
	// part of it.
	s.setA("a1.godist.test", "10.0.0.1")
	w.expect(up("10.0.0.1:5432", 1, 0, "a:a1.godist.test:5432"), up("10.0.0.2:5432", 7, 1, "srv:_pg._tcp.godist.test"),
		up("10.0.0.9:5432", 3, 2, "srv:_pg._tcp.godist.test"))
	s.setDrop("slow.godist.test", false)
	s.setA("slow.godist.test", "10.0.0.5")
	w.expect(up("10.0.0.1:5432", 1, 0, "a:a1.godist.test:5432"), up("10.0.0.2:5432", 7, 1, "srv:_pg._tcp.godist.test"),
		up("10.0.0.5:5432", 1, 0, "a:slow.godist.test:5432"), up("10.0.0.9:5432", 3, 2, "srv:_pg._tcp.godist.test"))
	before := multi.Status()[0]
	s.setRcode("a1.godist.test", dns.RcodeServerFailure)
	w.waitFailures(before, 2)
	w.expectNone()
}

// TestMultiStartsWhole: when every source answers, the first union is
// whole, not grown source by source.
func TestMultiStartsWhole(t *testing.T) {
	s := startTestDNS(t)
	s.setA("one.godist.test", "10.0.0.1")
	s.setA("two.godist.test", "10.0.0.2")
	resolver := fmt.Sprintf(`"resolver":{"addresses":[%q]}`, s.addr)
	for range 5 {
		multi := loadSource(t, "multi", fmt.Sprintf(`{"sources":[
			{"source":"a","name":"one.godist.test","port":"1",%[1]s},
			{"source":"a","name":"two.godist.test","port":"1",%[1]s}]}`, resolver), nil)
		w := watch(t, multi)
		w.expect(up("10.0.0.1:1", 1, 0, "a:one.godist.test:1"), up("10.0.0.2:1", 1, 0, "a:two.godist.test:1"))
		w.stop()
	}
}

// foreignSource is an upstream source from another package: multi knows
// nothing of its rounds.
type foreignSource struct{ sets [][]DiscoveredUpstream }

func (f *foreignSource) Watch(ctx context.Context, update func([]DiscoveredUpstream)) {
	for _, set := range f.sets {
		update(set)
	}
	<-ctx.Done()
}

func (*foreignSource) Status() []SourceStatus { return []SourceStatus{{Source: "foreign"}} }

func TestMultiForeignSource(t *testing.T) {
	s := startTestDNS(t)
	s.setA("one.godist.test", "10.0.0.1")
	a := loadSource(t, "a", fmt.Sprintf(`{"name":"one.godist.test","port":"1","versions":{"ipv4":true},"resolver":{"addresses":[%q]}}`, s.addr), nil)
	foreign := &foreignSource{sets: [][]DiscoveredUpstream{{up("10.9.9.9:1", 2, 0, "foreign")}}}
	w := watch(t, &MultiUpstreams{sources: []UpstreamSource{foreign, a}})
	w.expect(up("10.0.0.1:1", 1, 0, "a:one.godist.test:1"), up("10.9.9.9:1", 2, 0, "foreign"))
	if st := (&MultiUpstreams{sources: []UpstreamSource{foreign, a}}).Status(); len(st) != 2 || st[0].Source != "foreign" {
		t.Errorf("status %+v", st)
	}
}

func TestSourceMetrics(t *testing.T) {
	s := startTestDNS(t)
	s.setA("metrics.godist.test", "10.0.0.1", "10.0.0.2")
	w := watch(t, loadSource(t, "a", fmt.Sprintf(`{"name":"metrics.godist.test","port":"1","refresh":"20ms","versions":{"ipv4":true},"resolver":{"addresses":[%q]}}`, s.addr), nil))
	w.next()
	s.setRcode("metrics.godist.test", dns.RcodeServerFailure)
	st := w.waitFailures(SourceStatus{}, 3)

	reg := prometheus.NewRegistry()
	if err := registerMetrics(reg); err != nil {
		t.Fatal(err)
	}
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, f := range families {
		for _, m := range f.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "source" && l.GetValue() == "a:metrics.godist.test:1" {
					got[f.GetName()] = m.GetGauge().GetValue() + m.GetCounter().GetValue()
				}
			}
		}
	}
	if got[metricsNamespace+"_source_records"] != 2 {
		t.Errorf("records %v; want 2", got[metricsNamespace+"_source_records"])
	}
	if f := got[metricsNamespace+"_source_failures_total"]; f < float64(st.Failures) {
		t.Errorf("failures_total %v; want at least %d", f, st.Failures)
	}
	if ts := got[metricsNamespace+"_source_last_success_timestamp_seconds"]; time.Since(time.Unix(int64(ts), 0)) > time.Minute {
		t.Errorf("last success %v", ts)
	}
}

// TestSourceStateShared: two sources of one name share one status (one
// series), which outlives either, and is gone with the last.
func TestSourceStateShared(t *testing.T) {
	s := startTestDNS(t)
	s.setA("shared.godist.test", "10.0.0.1")
	raw := fmt.Sprintf(`{"name":"shared.godist.test","port":"1","versions":{"ipv4":true},"resolver":{"addresses":[%q]}}`, s.addr)
	one, err := tryLoadSource(t, "a", raw)
	if err != nil {
		t.Fatal(err)
	}
	two, err := tryLoadSource(t, "a", raw)
	if err != nil {
		t.Fatal(err)
	}
	setSourceLogger(one, zap.NewNop())
	w := watch(t, one)
	w.next()
	if st := two.Status()[0]; st.Records != 1 {
		t.Errorf("the second source does not share the first's status: %+v", st)
	}
	held := func() (n int) {
		sourceStates.Range(func(key, _ any) bool {
			if key == "a:shared.godist.test:1" {
				n++
			}
			return true
		})
		return n
	}
	if held() != 1 {
		t.Fatal("no state for the source")
	}
	if err := one.(*AUpstreams).Cleanup(); err != nil {
		t.Fatal(err)
	}
	_ = one.(*AUpstreams).Cleanup() // a second Cleanup releases nothing more
	if held() != 1 {
		t.Fatal("the state went with the first source")
	}
	_ = two.(*AUpstreams).Cleanup()
	if held() != 0 {
		t.Fatal("the state outlived the last source")
	}
}

// TestSourceLogs: a failed lookup is logged at error while the source has
// no set, at warn once it has one, at most once a minute; a recovery is
// logged at info, and the next failure is logged again.
func TestSourceLogs(t *testing.T) {
	s := startTestDNS(t)
	s.setRcode("logs.godist.test", dns.RcodeServerFailure)
	core, logs := observer.New(zapcore.DebugLevel)
	w := watch(t, loadSource(t, "a", fmt.Sprintf(`{"name":"logs.godist.test","port":"1","refresh":"100ms","versions":{"ipv4":true},"resolver":{"addresses":[%q]}}`, s.addr), zap.New(core)))
	w.waitFailures(SourceStatus{}, 5)
	failed := logs.FilterMessageSnippet("upstream lookup failed").All()
	if len(failed) != 1 || failed[0].Level != zapcore.ErrorLevel {
		t.Fatalf("after 5 failures before any success: %d lines %v; want one at error", len(failed), failed)
	}
	fields := failed[0].ContextMap()
	if fields["source"] != "a:logs.godist.test:1" || !strings.Contains(fmt.Sprint(fields["error"]), "server misbehaving") ||
		fmt.Sprint(fields["resolvers"]) != fmt.Sprintf("[%s]", s.addr) {
		t.Errorf("fields %v", fields)
	}

	s.setRcode("logs.godist.test", dns.RcodeSuccess)
	s.setA("logs.godist.test", "10.0.0.1")
	w.next()
	if n := logs.FilterMessage("upstream lookup recovered").FilterField(zap.String("source", "a:logs.godist.test:1")).Len(); n != 1 {
		t.Errorf("%d recovery lines", n)
	}
	s.setRcode("logs.godist.test", dns.RcodeServerFailure)
	w.waitFailures(w.src.Status()[0], 5)
	warned := logs.FilterMessage("upstream lookup failed; keeping the last good set").All()
	if len(warned) != 1 || warned[0].Level != zapcore.WarnLevel {
		t.Errorf("after 5 failures with a good set: %v; want one line at warn", warned)
	}
}

// TestSourceValidate: each bad value is refused when the config loads,
// naming its field.
func TestSourceValidate(t *testing.T) {
	tests := []struct {
		id, raw, wantErr string
	}{
		{"a", `{"port":"1"}`, "name: required"},
		{"a", `{"name":"x"}`, "port: required"},
		{"a", `{"name":"x","port":"http"}`, `port "http": must be a port number, 1-65535`},
		{"a", `{"name":"x","port":"70000"}`, `port "70000": must be a port number`},
		{"a", `{"name":"x","port":"1","refresh":"-1s"}`, "refresh -1s: must not be negative"},
		{"a", `{"name":"x","port":"1","dial_timeout":"-1s"}`, "dial_timeout -1s: must not be negative"},
		{"a", `{"name":"x","port":"1","versions":{"ipv4":false,"ipv6":false}}`, "versions: ipv4 and ipv6 are both false"},
		{"a", `{"name":"x","port":"1","resolver":{}}`, "resolver: addresses: at least one address is required"},
		{"a", `{"name":"x","port":"1","resolver":{"addresses":["quic/1.1.1.1"]}}`, `resolver: address "quic/1.1.1.1": network "quic"`},
		{"a", `{"name":"x","port":"1","resolver":{"addresses":["1.1.1.1:53-54"]}}`, `resolver: address "1.1.1.1:53-54": must have one port`},
		{"a", `{"name":"x","port":"1","refresh":"1m","grace_period":"1s"}`, `unknown field "grace_period"`},
		{"srv", `{"service":"pg","proto":"tcp"}`, "name: required"},
		{"srv", `{"service":"pg","name":"x"}`, `service "pg", proto "": give both or neither`},
		{"srv", `{"service":"_pg","proto":"tcp","name":"x"}`, `service "_pg": must be one label, without its underscore`},
		{"srv", `{"name":"x","grace_period":"-1s"}`, "grace_period -1s: must not be negative"},
		{"srv", `{"name":"x","dial_network":"sctp"}`, `dial_network "sctp": must be tcp, tcp4, tcp6, udp, udp4 or udp6`},
		{"multi", `{}`, "sources: at least one source is required"},
		{"multi", `{"sources":[{"source":"a","name":"x"}]}`, "port: required"},
		{"multi", `{"sources":[{"source":"nope"}]}`, "layer4.handlers.godist.upstreams.nope"},
	}
	for _, tt := range tests {
		t.Run(tt.id+" "+tt.raw, func(t *testing.T) {
			_, err := tryLoadSource(t, tt.id, tt.raw)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("error = %v\nwant one containing %q", err, tt.wantErr)
			}
		})
	}
}

// TestSourceDefaults: what Provision fills in, and global placeholders.
func TestSourceDefaults(t *testing.T) {
	t.Setenv("GODIST_TEST_DB", "db.godist.test")
	t.Setenv("GODIST_TEST_PORT", "05432")
	a := loadSource(t, "a", `{"name":"{env.GODIST_TEST_DB}","port":"{env.GODIST_TEST_PORT}","resolver":{"addresses":["127.0.0.1"]}}`, nil).(*AUpstreams)
	if a.Name != "db.godist.test" || a.port != "5432" || time.Duration(a.Refresh) != time.Minute || !slices.Equal(a.families, []string{"ip4", "ip6"}) {
		t.Errorf("provisioned a: name %q port %q refresh %s families %v", a.Name, a.port, time.Duration(a.Refresh), a.families)
	}
	if got := a.Status()[0].Source; got != "a:db.godist.test:5432" {
		t.Errorf("source name %q", got)
	}
	srv := loadSource(t, "srv", `{"service":"pg","proto":"tcp","name":"{env.GODIST_TEST_DB}"}`, nil).(*SRVUpstreams)
	if srv.srvName() != "_pg._tcp.db.godist.test" || time.Duration(srv.Refresh) != time.Minute || srv.resolver != net.DefaultResolver {
		t.Errorf("provisioned srv: %q refresh %s", srv.srvName(), time.Duration(srv.Refresh))
	}
}

func TestLookupTimeout(t *testing.T) {
	for _, tt := range []struct{ refresh, want time.Duration }{
		{time.Second, time.Second},
		{time.Minute, maxLookupTimeout},
		{50 * time.Millisecond, 50 * time.Millisecond},
	} {
		if got := lookupTimeout(tt.refresh); got != tt.want {
			t.Errorf("lookupTimeout(%s) = %s; want %s", tt.refresh, got, tt.want)
		}
	}
}

func TestMergeDuplicates(t *testing.T) {
	got := mergeDuplicates([]DiscoveredUpstream{
		up("10.0.0.2:1", 5, 2, "s"), up("10.0.0.1:1", 3, 1, "s"), up("10.0.0.2:1", 4, 1, "s"),
		up("10.0.0.2:1", 6, 1, "s"), up("10.0.0.1:1", 1, 1, "s"),
	})
	want := []DiscoveredUpstream{up("10.0.0.1:1", 4, 1, "s"), up("10.0.0.2:1", 10, 1, "s")}
	if !slices.Equal(got, want) {
		t.Errorf("got %v; want %v", got, want)
	}
}
