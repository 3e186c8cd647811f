// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"fmt"
	"math"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// The handler with a dynamic source, tested against testDNS, a real DNS
// server on loopback in the test process, and real backends: the records
// change while connections flow, and the tests check where keys go.

// testHandler returns the one godist handler running.
func testHandler(t *testing.T) *Handler {
	t.Helper()
	hs := liveHandlers.list()
	if len(hs) != 1 {
		t.Fatalf("%d godist handlers running, want 1", len(hs))
	}
	return hs[0]
}

// membersOf describes a membership as sorted "dial weight tier" lines.
func membersOf(m *membership) []string {
	out := make([]string, len(m.pool))
	for i, u := range m.pool {
		out[i] = fmt.Sprintf("%s %d %d", u.dial, u.weight, u.tier)
	}
	slices.Sort(out)
	return out
}

// waitMembers waits until the running handler's membership is want
// ("dial weight tier" lines, any order), and returns it.
func waitMembers(t *testing.T, want ...string) *membership {
	t.Helper()
	slices.Sort(want)
	var m *membership
	eventually(t, testTimeout, "the membership to follow DNS", func() error {
		m = testHandler(t).members.Load()
		if got := membersOf(m); !slices.Equal(got, want) {
			return fmt.Errorf("members %v, want %v", got, want)
		}
		return nil
	})
	return m
}

// movedKeys is the number of sampled keys for the moved shares: the 95%
// margin of a share near 1/4 is 0.6 percentage points.
const movedKeys = 20_000

// hashPicks returns the upstream each sampled key goes to by the hash
// alone, every upstream up: the first of its order.
func hashPicks(m *membership) []string {
	out := make([]string, movedKeys)
	for k := range out {
		key := testKey(k)
		out[k] = m.pool[m.tiers[0].pick(key, func(int) bool { return true })].dial
	}
	return out
}

// srvBackends is a set of whoami backends on 127.0.0.1 that SRV records
// point at through one target name.
type srvBackends struct {
	backends []*backend
	byDial   map[string]string // dial address -> backend name
}

func startSRVBackends(t *testing.T, n int) *srvBackends {
	t.Helper()
	bs, addrs := startBackends(t, n, whoami)
	sb := &srvBackends{backends: bs, byDial: map[string]string{}}
	for i, a := range addrs {
		sb.byDial[a] = bs[i].name
	}
	return sb
}

// record returns an SRV record for backend i through the target
// be.godist.test (127.0.0.1).
func (sb *srvBackends) record(i int, priority, weight uint16) testSRV {
	return testSRV{target: "be.godist.test", port: portOf(sb.backends[i].addr), priority: priority, weight: weight}
}

// portOf returns the port of a loopback ip:port.
func portOf(addr string) uint16 {
	return netip.MustParseAddrPort(addr).Port()
}

// connectAndCheck makes n connections and checks that each lands on
// want(key), its key being its local ip:port (hash_key ip_port).
func (sb *srvBackends) connectAndCheck(t *testing.T, c *testCaddy, n int, want func(key string) string) {
	t.Helper()
	for range n {
		conn := c.dial(t)
		key := conn.LocalAddr().String()
		name, err := askName(conn)
		conn.Close()
		if err != nil {
			t.Fatalf("connection %s: %v", key, err)
		}
		if w := sb.byDial[want(key)]; name != w {
			t.Fatalf("connection %s landed on %s, want %s (%s)", key, name, w, want(key))
		}
	}
}

// flow keeps making connections through c on a goroutine of its own until
// stopped, and counts those that got no answer.
type flow struct {
	stopCh  chan struct{}
	done    chan struct{}
	ok      atomic.Int64
	failed  atomic.Int64
	lastErr atomic.Value
}

func startFlow(t *testing.T, c *testCaddy) *flow {
	t.Helper()
	f := &flow{stopCh: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(f.done)
		for {
			select {
			case <-f.stopCh:
				return
			default:
			}
			conn, err := net.DialTimeout("tcp", c.listen, testTimeout)
			if err == nil {
				_ = conn.SetDeadline(time.Now().Add(testTimeout))
				_, err = askName(conn)
				conn.Close()
			}
			if err != nil {
				f.failed.Add(1)
				f.lastErr.Store(err.Error())
			} else {
				f.ok.Add(1)
			}
			time.Sleep(2 * time.Millisecond)
		}
	}()
	t.Cleanup(func() { f.stop() })
	return f
}

// stop ends the flow and returns how many connections were answered and
// how many were not.
func (f *flow) stop() (ok, failed int64) {
	select {
	case <-f.stopCh:
	default:
		close(f.stopCh)
	}
	<-f.done
	return f.ok.Load(), f.failed.Load()
}

// changeLines returns the "upstreams changed" lines captured so far.
func changeLines(t *testing.T, capture string) []logLine {
	t.Helper()
	var out []logLine
	for _, l := range capturedLines(t, capture) {
		if l["msg"] == "upstreams changed" {
			out = append(out, l)
		}
	}
	return out
}

// startCapture returns the logs config that captures into name, emptied.
func startCapture(name string) map[string]any {
	capturedMu.Lock()
	delete(captured, name) // from an earlier run of the test (-count)
	capturedMu.Unlock()
	return map[string]any{"capture": map[string]any{
		"writer":  map[string]any{"output": "godist_test_capture", "name": name},
		"encoder": map[string]any{"format": "json"},
		"level":   "INFO",
	}}
}

// TestDynamicSRVMembership follows SRV records as they are added,
// removed, re-weighted and re-prioritised while connections flow, and
// checks after each change that only the keys rendezvous hashing must
// move have moved, by the share the change should move, that the info
// line says so too, and that connections land where the membership says.
func TestDynamicSRVMembership(t *testing.T) {
	s := startTestDNS(t)
	sb := startSRVBackends(t, 5)
	s.setA("be.godist.test", "127.0.0.1")
	const srvName = "_svc._tcp.godist.test"
	d := func(i int) string { return sb.backends[i].addr }
	s.setSRV(srvName, sb.record(0, 0, 10), sb.record(1, 0, 10), sb.record(2, 0, 10), sb.record(4, 10, 10))

	capture := t.Name()
	c := startCaddyConfig(t, caddyConfig{Logs: startCapture(capture), Routes: []map[string]any{godistRoute(map[string]any{
		"dynamic_upstreams": map[string]any{"source": "srv", "name": srvName, "refresh": "50ms",
			"resolver": map[string]any{"addresses": []string{s.addr}}},
	})}})
	m := waitMembers(t, d(0)+" 10 0", d(1)+" 10 0", d(2)+" 10 0", d(4)+" 10 10")
	f := startFlow(t, c)

	steps := []struct {
		name    string
		records []testSRV
		members []string
		ideal   float64
		// the upstream whose keys alone may move, to or from it
		changed int
	}{
		{"add one of 3", []testSRV{sb.record(0, 0, 10), sb.record(1, 0, 10), sb.record(2, 0, 10), sb.record(3, 0, 10), sb.record(4, 10, 10)},
			[]string{d(0) + " 10 0", d(1) + " 10 0", d(2) + " 10 0", d(3) + " 10 0", d(4) + " 10 10"}, 1.0 / 4, 3},
		{"remove one of 4", []testSRV{sb.record(0, 0, 10), sb.record(2, 0, 10), sb.record(3, 0, 10), sb.record(4, 10, 10)},
			[]string{d(0) + " 10 0", d(2) + " 10 0", d(3) + " 10 0", d(4) + " 10 10"}, 1.0 / 4, 1},
		// 10 -> 30 among 10 and 10: its share goes from 1/3 to 3/5
		{"re-weight one of 3", []testSRV{sb.record(0, 0, 30), sb.record(2, 0, 10), sb.record(3, 0, 10), sb.record(4, 10, 10)},
			[]string{d(0) + " 30 0", d(2) + " 10 0", d(3) + " 10 0", d(4) + " 10 10"}, 3.0/5 - 1.0/3, 0},
		// priority 0 -> 10: out of the serving tier, its share (1/5) moves
		{"re-prioritise one out of the serving tier", []testSRV{sb.record(0, 0, 30), sb.record(2, 10, 10), sb.record(3, 0, 10), sb.record(4, 10, 10)},
			[]string{d(0) + " 30 0", d(2) + " 10 10", d(3) + " 10 0", d(4) + " 10 10"}, 1.0 / 5, 2},
		// priority 10 -> 0: into the serving tier, it takes 10/50
		{"re-prioritise one into the serving tier", []testSRV{sb.record(0, 0, 30), sb.record(2, 10, 10), sb.record(3, 0, 10), sb.record(4, 0, 10)},
			[]string{d(0) + " 30 0", d(2) + " 10 10", d(3) + " 10 0", d(4) + " 10 0"}, 1.0 / 5, 4},
	}
	for i, st := range steps {
		t.Run(st.name, func(t *testing.T) {
			before := hashPicks(m)
			s.setSRV(srvName, st.records...)
			m = waitMembers(t, st.members...)
			after := hashPicks(m)
			moved := 0
			for k := range after {
				if before[k] == after[k] {
					continue
				}
				moved++
				if before[k] != d(st.changed) && after[k] != d(st.changed) {
					t.Fatalf("key %s moved from %s to %s: only keys to or from %s may move", testKey(k), before[k], after[k], d(st.changed))
				}
			}
			share := float64(moved) / movedKeys
			margin := 1.96 * math.Sqrt(st.ideal*(1-st.ideal)/movedKeys)
			if math.Abs(share-st.ideal) > 3*margin {
				t.Errorf("%.4f of the keys moved; ideal %.4f (±%.4f)", share, st.ideal, 3*margin)
			}

			var line logLine
			eventually(t, testTimeout, "the change logged", func() error {
				if lines := changeLines(t, capture); len(lines) > i {
					line = lines[i]
					return nil
				}
				return fmt.Errorf("%d change lines", len(changeLines(t, capture)))
			})
			logged, _ := line["moved_share"].(float64)
			if line["fingerprint"] != m.fingerprint || math.Abs(logged-st.ideal) > 0.01 {
				t.Errorf("logged %v; want moved_share about %.4f and fingerprint %s", line, st.ideal, m.fingerprint)
			}
			t.Logf("%s: moved %.4f of %d keys (logged %.4f of %v), ideal %.4f", st.name, share, movedKeys, logged, line["sampled_keys"], st.ideal)

			sb.connectAndCheck(t, c, 10, func(key string) string {
				return m.pool[m.tiers[0].pick(key, func(int) bool { return true })].dial
			})
		})
	}
	if ok, failed := f.stop(); failed > 0 || ok == 0 {
		t.Errorf("while the records changed, %d connections were answered and %d not (last: %v)", ok, failed, f.lastErr.Load())
	}
	lines := changeLines(t, capture)
	if len(lines) != len(steps) {
		t.Errorf("%d change lines for %d changes: %v", len(lines), len(steps), lines)
	}
	first := lines[0]
	if first["level"] != "info" || fmt.Sprint(first["sources"]) != "[srv:"+srvName+"]" ||
		fmt.Sprint(first["added"]) != fmt.Sprint([]any{d(3)}) || fmt.Sprint(first["removed"]) != "[]" {
		t.Errorf("the first change line: %v", first)
	}
	if got := fmt.Sprint(lines[2]["reweighted"]); got != fmt.Sprintf("[%s: weight 10 -> 30]", d(0)) {
		t.Errorf("the re-weight line says %s", got)
	}
	if got := fmt.Sprint(lines[3]["retiered"]); got != fmt.Sprintf("[%s: tier 0 -> 10]", d(2)) {
		t.Errorf("the re-prioritise line says %s", got)
	}

	// The admin API shows where each upstream came from, and when.
	hs := c.upstreams(t, "")[0]
	if hs.ServingTier == nil || *hs.ServingTier != 0 || len(hs.Sources) != 1 || hs.Sources[0].Source != "srv:"+srvName {
		t.Errorf("serving tier %v, sources %+v", hs.ServingTier, hs.Sources)
	}
	for _, u := range hs.Upstreams {
		if u.Source != "srv:"+srvName || u.LastRefresh == nil || time.Since(*u.LastRefresh) > testTimeout {
			t.Errorf("upstream %s: source %q, last refresh %v", u.Dial, u.Source, u.LastRefresh)
		}
	}
	fp := c.fingerprints(t, "")[0]
	if fp.Fingerprint != m.fingerprint || !strings.Contains(fp.Digested, fmt.Sprintf("%q 10 tier 10\n", d(2))) {
		t.Errorf("fingerprint %s (%q); the membership's is %s", fp.Fingerprint, fp.Digested, m.fingerprint)
	}
}

// TestDynamicLookupFailures breaks the DNS in every way a lookup can fail
// while connections flow: the last good set keeps serving, no connection
// waits on a lookup, and before the first good set the static upstream
// serves.
func TestDynamicLookupFailures(t *testing.T) {
	checkNoLeaks(t)
	s := startTestDNS(t)
	sb := startSRVBackends(t, 3)
	standby := sb.backends[2].addr
	s.setA("be.godist.test", "127.0.0.1")
	const srvName = "_svc._tcp.godist.test"
	// The first lookups go unanswered: the config starts without a set.
	s.setSRV(srvName, sb.record(0, 0, 1), sb.record(1, 0, 1))
	s.setDrop(srvName, true)

	c := startCaddy(t, map[string]any{
		"upstreams": []map[string]any{{"dial": standby, "tier": BackupTier}},
		"dynamic_upstreams": map[string]any{"source": "srv", "name": srvName, "refresh": "1s",
			"resolver": map[string]any{"addresses": []string{s.addr}}},
	})
	// Before the first good set, the static upstream serves.
	sb.connectAndCheck(t, c, 5, func(string) string { return standby })
	if st := c.upstreams(t, "")[0].Sources[0]; st.Records != 0 || !st.LastSuccess.IsZero() {
		t.Fatalf("a lookup succeeded while the server dropped every query: %+v", st)
	}
	s.setDrop(srvName, false)
	m := waitMembers(t, sb.backends[0].addr+" 1 0", sb.backends[1].addr+" 1 0", standby+" 1 65536")
	served := func(key string) string { return m.pool[m.tiers[0].pick(key, func(int) bool { return true })].dial }
	sb.connectAndCheck(t, c, 5, served)

	f := startFlow(t, c)
	sourceStatus := func() SourceStatus { return c.upstreams(t, "")[0].Sources[0] }
	for _, tc := range []struct {
		name   string
		break_ func()
		mend   func()
		error  string
	}{
		{"SERVFAIL", func() { s.setRcode(srvName, dns.RcodeServerFailure) }, func() { s.setRcode(srvName, dns.RcodeSuccess) }, "server misbehaving"},
		{"NXDOMAIN", func() { s.setRcode(srvName, dns.RcodeNameError) }, func() { s.setRcode(srvName, dns.RcodeSuccess) }, "no such host"},
		{"no records", func() { s.setSRV(srvName) }, func() { s.setSRV(srvName, sb.record(0, 0, 1), sb.record(1, 0, 1)) }, "no such host"},
		{"the target's address fails", func() { s.setRcode("be.godist.test", dns.RcodeServerFailure) }, func() { s.setRcode("be.godist.test", dns.RcodeSuccess) }, "resolving target"},
		{"no answer", func() { s.setDrop(srvName, true) }, func() { s.setDrop(srvName, false) }, "timeout"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := sourceStatus()
			asked := len(s.asked(srvName, dns.TypeSRV))
			tc.break_()
			if tc.name == "no answer" {
				// No connection waits on a lookup: once the server has
				// been asked and not answered, connections go on being
				// answered, all of them before the lookup gives up.
				eventually(t, testTimeout, "a query after the drop", func() error {
					if n := len(s.asked(srvName, dns.TypeSRV)); n <= asked {
						return fmt.Errorf("%d queries", n)
					}
					return nil
				})
				sb.connectAndCheck(t, c, 10, served)
				if st := sourceStatus(); st.Failures != before.Failures {
					t.Errorf("the lookup ended (%+v) before 10 connections were answered: they cannot be shown not to wait", st)
				}
			}
			eventually(t, testTimeout, "a failed lookup", func() error {
				if st := sourceStatus(); st.Failures < before.Failures+1 || !strings.Contains(st.LastError, tc.error) {
					return fmt.Errorf("status %+v, want a failure with %q", st, tc.error)
				}
				return nil
			})
			if got := testHandler(t).members.Load(); got != m {
				t.Fatalf("the membership changed while lookups failed: %v", membersOf(got))
			}
			sb.connectAndCheck(t, c, 5, served)
			tc.mend()
			eventually(t, testTimeout, "a good lookup again", func() error {
				if st := sourceStatus(); st.ConsecutiveFailures != 0 || !st.LastSuccess.After(before.LastSuccess) {
					return fmt.Errorf("status %+v", st)
				}
				return nil
			})
		})
	}
	if ok, failed := f.stop(); failed > 0 || ok == 0 {
		t.Errorf("while lookups failed, %d connections were answered and %d not (last: %v)", ok, failed, f.lastErr.Load())
	}
	if got := testHandler(t).members.Load(); got != m {
		t.Errorf("the same records after the failures gave another membership: %v", membersOf(got))
	}

	// The config is unloaded while a lookup waits for an answer: the
	// watch ends with it (checkNoLeaks), the lookup abandoned.
	asked := len(s.asked(srvName, dns.TypeSRV))
	s.setDrop(srvName, true)
	eventually(t, testTimeout, "a query after the drop", func() error {
		if n := len(s.asked(srvName, dns.TypeSRV)); n <= asked {
			return fmt.Errorf("%d queries", n)
		}
		return nil
	})
	stopCaddy(t)
}

// TestDynamicHealthAcrossChanges checks that discovered upstreams get
// active checks that start as they appear and stop as they leave, that an
// address that stays keeps its health and counts across refreshes and a
// reload, and that no goroutine outlives the config.
func TestDynamicHealthAcrossChanges(t *testing.T) {
	checkNoLeaks(t)
	s := startTestDNS(t)
	sb := startSRVBackends(t, 3)
	dead := freeAddr(t) // nothing listens: its checks fail
	deadRecord := testSRV{target: "be.godist.test", port: portOf(dead), weight: 1}
	s.setA("be.godist.test", "127.0.0.1")
	const srvName = "_svc._tcp.godist.test"
	s.setSRV(srvName, sb.record(0, 0, 1), sb.record(1, 0, 1), deadRecord)
	d := func(i int) string { return sb.backends[i].addr }

	routes := []map[string]any{godistRoute(map[string]any{
		"dynamic_upstreams": map[string]any{"source": "srv", "name": srvName, "refresh": "50ms",
			"resolver": map[string]any{"addresses": []string{s.addr}}},
		"health_checks": map[string]any{"active": map[string]any{"interval": "50ms"}, "passive": map[string]any{"fail_duration": "0s"}},
	})}
	c := startCaddyRoutes(t, "tcp", routes)
	waitMembers(t, d(0)+" 1 0", d(1)+" 1 0", dead+" 1 0")
	statusOf := func(dial string) upstreamStatus {
		for _, u := range c.upstreams(t, "")[0].Upstreams {
			if u.Dial == dial {
				return u
			}
		}
		return upstreamStatus{}
	}
	eventually(t, testTimeout, "the dead upstream found down", func() error {
		if st := statusOf(dead); st.Health.Status != "down" {
			return fmt.Errorf("%+v", st.Health)
		}
		return nil
	})
	// A connection that prefers the dead one goes to its next choice.
	firstUp := func(key string) string {
		m := testHandler(t).members.Load()
		for _, i := range m.order(key, nil) {
			if m.pool[i].dial != dead {
				return m.pool[i].dial
			}
		}
		return ""
	}
	sb.connectAndCheck(t, c, 10, firstUp)
	deadState, liveState := stateOf(t, dead), stateOf(t, d(0))
	liveTotal := liveState.total.Load()

	// Another upstream appears: it is checked from now on; the others
	// keep their state, the dead one still down.
	s.setSRV(srvName, sb.record(0, 0, 1), sb.record(1, 0, 1), sb.record(2, 0, 1), deadRecord)
	waitMembers(t, d(0)+" 1 0", d(1)+" 1 0", d(2)+" 1 0", dead+" 1 0")
	if st := statusOf(dead); st.Health.Status != "down" || stateOf(t, dead) != deadState || deadState.activeCheckers.Load() != 1 {
		t.Fatalf("after a refresh, the dead upstream: %+v, state kept %v, %d checkers", st.Health, stateOf(t, dead) == deadState, deadState.activeCheckers.Load())
	}
	if stateOf(t, d(0)) != liveState || liveState.total.Load() != liveTotal {
		t.Fatalf("after a refresh, a live upstream lost its state or counts")
	}
	eventually(t, testTimeout, "the new upstream checked", func() error {
		if st := statusOf(d(2)); st.Health.LastCheck == nil {
			return fmt.Errorf("%+v", st.Health)
		}
		return nil
	})
	sb.connectAndCheck(t, c, 10, firstUp)

	// The dead one leaves: its checks stop, and with no connection to it,
	// its state goes.
	s.setSRV(srvName, sb.record(0, 0, 1), sb.record(1, 0, 1), sb.record(2, 0, 1))
	waitMembers(t, d(0)+" 1 0", d(1)+" 1 0", d(2)+" 1 0")
	if n := deadState.activeCheckers.Load(); n != 0 {
		t.Errorf("%d checkers of the upstream that left", n)
	}
	upstreamStates.Range(func(key, _ any) bool {
		if key == dead {
			t.Errorf("the state of the upstream that left is still held")
		}
		return true
	})

	// A reload with the same source starts from the last good set: the
	// new config hashes over it at once, with the same states.
	liveTotal = liveState.total.Load()
	if status, body := c.load(routes); status != 200 {
		t.Fatalf("reload: %d %s", status, body)
	}
	want := []string{d(0) + " 1 0", d(1) + " 1 0", d(2) + " 1 0"}
	slices.Sort(want)
	if got := membersOf(testHandler(t).members.Load()); !slices.Equal(got, want) {
		t.Fatalf("right after a reload, the membership is %v, want %v", got, want)
	}
	if stateOf(t, d(0)) != liveState || liveState.total.Load() != liveTotal {
		t.Fatalf("a reload lost a discovered upstream's state or counts")
	}
	sb.connectAndCheck(t, c, 10, firstUp)
	if n := liveState.activeCheckers.Load(); n != 1 {
		t.Errorf("after the reload, %d configs check a discovered upstream; want 1", n)
	}
	// checkNoLeaks: once the config is unloaded, its watch and check
	// loops have ended.
}

// TestDynamicPlan asks POST /godist/plan of a handler with discovered
// upstreams: a proposal replaces the static upstreams only, the
// discovered ones staying; one with no static upstream is a question too;
// and a handler with nothing to move from says so.
func TestDynamicPlan(t *testing.T) {
	s := startTestDNS(t)
	s.setA("db.godist.test", "127.0.0.2", "127.0.0.3", "127.0.0.4")
	source := map[string]any{"source": "a", "name": "db.godist.test", "port": "5432", "refresh": "50ms", "versions": map[string]any{"ipv4": true},
		"resolver": map[string]any{"addresses": []string{s.addr}}}
	c := startCaddy(t, map[string]any{"upstreams": upstreamsJSON("127.0.0.9:5432"), "dynamic_upstreams": source})
	m := waitMembers(t, "127.0.0.2:5432 1 0", "127.0.0.3:5432 1 0", "127.0.0.4:5432 1 0", "127.0.0.9:5432 1 0")

	var res planResult
	c.adminJSON(t, "POST", "/godist/plan", map[string]any{"upstreams": upstreamsJSON("127.0.0.9:5432", "127.0.0.10:5432")}, &res)
	want := newMembership("", describedPool(Upstream{Dial: "127.0.0.9:5432"}, Upstream{Dial: "127.0.0.10:5432"},
		Upstream{Dial: "127.0.0.2:5432"}, Upstream{Dial: "127.0.0.3:5432"}, Upstream{Dial: "127.0.0.4:5432"}))
	if res.Fingerprint != m.fingerprint || res.NewFingerprint != want.fingerprint || math.Abs(res.KeySpace.MovedShare-1.0/5) > 0.01 {
		t.Errorf("adding a static upstream beside 4: %+v; want the new fingerprint %s and 1/5 moved", res, want.fingerprint)
	}
	c.adminJSON(t, "POST", "/godist/plan", map[string]any{"upstreams": []any{}}, &res)
	if math.Abs(res.KeySpace.MovedShare-1.0/4) > 0.01 || len(res.KeySpace.Upstreams) != 4 {
		t.Errorf("dropping the static upstream: %+v; want 1/4 moved", res.KeySpace)
	}

	// A handler with no upstream yet has nothing to move.
	stopCaddy(t)
	s.setRcode("none.godist.test", dns.RcodeNameError)
	source["name"] = "none.godist.test"
	c = startCaddy(t, map[string]any{"dynamic_upstreams": source})
	a := c.adminCall(t, "POST", "/godist/plan", []byte(`{"upstreams": [{"dial": "127.0.0.9:5432"}]}`))
	if a.status != 409 || !strings.Contains(string(a.body), "the handler has no upstreams now: its dynamic source has found none") {
		t.Errorf("a plan for a handler without upstreams: %d %s", a.status, a.body)
	}
	p := c.pick(t, "key=k")[0]
	if p.Upstream != nil || !p.Fallback || p.ServingTier != nil || len(p.Order) != 0 {
		t.Errorf("pick on a handler without upstreams: %+v", p)
	}
	conn := c.dial(t)
	if _, err := askName(conn); err == nil {
		t.Error("a connection to a handler without upstreams was answered")
	}
	conn.Close()
}
