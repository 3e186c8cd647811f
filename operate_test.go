// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
)

// The operator's side through a real Caddy: states set through the admin
// API, their effect on new connections and on the ones already flowing,
// what /godist/upstreams, the metrics and the logs say of them. Clients
// connect from loopback addresses of their own (127.0.x.y) to a handler
// hashing by ip, so that each test knows every client's key, and so where
// it must land.

// lineEcho answers each line with the backend's name, a space and the
// line.
func lineEcho(b *backend, c net.Conn) {
	r := bufio.NewReader(c)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		if _, err := io.WriteString(c, b.name+" "+line); err != nil {
			return
		}
	}
}

// lineClient is a client connection to a lineEcho backend through godist.
type lineClient struct {
	key  string // its IP: what hash_key ip hashes it by
	conn *net.TCPConn
	r    *bufio.Reader
	sent int
}

// dialFrom connects to addr from the loopback address ip.
func dialFrom(t *testing.T, ip, addr string) *lineClient {
	t.Helper()
	d := net.Dialer{Timeout: testTimeout, LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}}
	conn, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dialling %s from %s: %v", addr, ip, err)
	}
	_ = conn.SetDeadline(time.Now().Add(testTimeout))
	c := &lineClient{key: ip, conn: conn.(*net.TCPConn), r: bufio.NewReader(conn)}
	t.Cleanup(c.close)
	return c
}

// close closes the connection with a reset, so that it leaves no socket
// in TIME_WAIT on its address: one on 127.0.x.y would keep the port from
// a listener on all addresses that a later test binds for a minute.
func (c *lineClient) close() {
	_ = c.conn.SetLinger(0)
	_ = c.conn.Close()
}

// talk sends a line and returns the name of the backend that echoed it,
// or why it could not: the line must come back byte for byte.
func (c *lineClient) talk() (string, error) {
	c.sent++
	line := fmt.Sprintf("line %d from %s\n", c.sent, c.key)
	if _, err := io.WriteString(c.conn, line); err != nil {
		return "", err
	}
	reply, err := c.r.ReadString('\n')
	if err != nil {
		return "", err
	}
	name, echoed, _ := strings.Cut(reply, " ")
	if echoed != line {
		return "", fmt.Errorf("sent %q, got back %q", line, echoed)
	}
	return name, nil
}

// landsOn connects from ip and returns the backend that answers.
func landsOn(t *testing.T, ip, addr string) string {
	t.Helper()
	c := dialFrom(t, ip, addr)
	defer c.close()
	name, err := c.talk()
	if err != nil {
		t.Fatalf("a connection from %s: %v", ip, err)
	}
	return name
}

// loopbackIP returns the i-th client address the tests use.
func loopbackIP(i int) string {
	return fmt.Sprintf("127.0.%d.%d", 1+i/250, 1+i%250)
}

// keysBy returns n client addresses whose key picker picks want for, and
// n whose key it does not, from the first 5,000 loopback addresses.
func keysBy(t *testing.T, p *Picker, want, n int) (preferring, others []string) {
	t.Helper()
	for i := 0; i < 5000 && (len(preferring) < n || len(others) < n); i++ {
		ip := loopbackIP(i)
		if p.Pick(ip, nil) == want {
			if len(preferring) < n {
				preferring = append(preferring, ip)
			}
		} else if len(others) < n {
			others = append(others, ip)
		}
	}
	if len(preferring) < n || len(others) < n {
		t.Fatalf("found %d keys preferring upstream %d and %d others, want %d of each", len(preferring), want, len(others), n)
	}
	return preferring, others
}

// setState posts a state and returns the answer, which must be a 200.
func (c *testCaddy) setState(t *testing.T, body string) opStateAnswer {
	t.Helper()
	a := c.adminCall(t, http.MethodPost, "/godist/upstreams/state", []byte(body))
	if a.status != http.StatusOK {
		t.Fatalf("POST /godist/upstreams/state %s: %d %s", body, a.status, a.body)
	}
	var ans opStateAnswer
	if err := json.Unmarshal(a.body, &ans); err != nil {
		t.Fatalf("decoding %s: %v", a.body, err)
	}
	return ans
}

// upstreamNamed returns the status of the upstream dialled at dial in the
// only handler running.
func (c *testCaddy) upstreamNamed(t *testing.T, dial string) (handlerStatus, upstreamStatus) {
	t.Helper()
	hs := c.upstreams(t, "")
	if len(hs) != 1 {
		t.Fatalf("%d handlers running, want 1", len(hs))
	}
	for _, u := range hs[0].Upstreams {
		if u.Dial == dial {
			return hs[0], u
		}
	}
	t.Fatalf("no upstream %s in %+v", dial, hs[0].Upstreams)
	return handlerStatus{}, upstreamStatus{}
}

// operatedPool starts three lineEcho backends, b0 to b2, and a Caddy
// with one godist handler named "pool" over them, hashing by ip, with
// opts besides, its logs captured under the test's name.
func operatedPool(t *testing.T, opts map[string]any) (*testCaddy, []*backend, *Picker) {
	t.Helper()
	backends, addrs := startBackends(t, 3, lineEcho)
	h := map[string]any{"upstreams": upstreamsJSON(addrs...), "hash_key": "ip", "name": "pool"}
	maps.Copy(h, opts)
	c := startCaddyConfig(t, caddyConfig{LogLevel: "INFO", Logs: startCapture(t.Name()), Routes: []map[string]any{godistRoute(h)}})
	ups := make([]PickerUpstream, len(addrs))
	for i, a := range addrs {
		ups[i] = PickerUpstream{Dial: a, Weight: 1}
	}
	return c, backends, NewPicker(ups)
}

// TestOperatorStates sets each state on one upstream, b1, of three, and
// checks its effect on new connections (each key that preferred b1 goes
// to its next choice, or, for a weight factor, where the weighted hash
// sends it; no other key moves) and on the connections open to b1 (they
// flow on, or are closed, as the state says), what /godist/upstreams, the
// metrics and the log say, and that ready undoes it.
func TestOperatorStates(t *testing.T) {
	tests := []struct {
		name  string
		body  string // %s is b1's address
		state opState

		// where a new connection with key goes, given the picker over the
		// three and the addresses; nil: its first choice other than b1
		newGoes func(p *Picker, dials []string, key string) int

		closed      closeReason // why the connections open to b1 are closed; closeNone: they flow
		remaining   bool        // /godist/upstreams counts the ones left
		weightAfter float64     // b1's effective weight
	}{
		{name: "drain", body: `{"upstream": %q, "state": "drain", "reason": "upgrade"}`, state: opDrain, remaining: true, weightAfter: 1},
		{name: "drain with a deadline", body: `{"upstream": %q, "state": "drain", "deadline": "1500ms"}`, state: opDrain,
			closed: closeDrainDeadline, remaining: true, weightAfter: 1},
		{name: "maint", body: `{"upstream": %q, "state": "maint"}`, state: opMaint, closed: closeMaint, remaining: true, weightAfter: 1},
		{name: "maint keeping connections", body: `{"upstream": %q, "state": "maint", "keep_connections": true}`, state: opMaint,
			remaining: true, weightAfter: 1},
		{name: "a weight factor", body: `{"upstream": %q, "state": "ready", "weight": 0.25}`, state: opReady,
			newGoes: func(_ *Picker, dials []string, key string) int {
				return newWeightedPicker(dials, []float64{1, 0.25, 1}).Pick(key, nil)
			},
			weightAfter: 0.25},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, backends, picker := operatedPool(t, nil)
			dials := []string{backends[0].addr, backends[1].addr, backends[2].addr}
			x := backends[1]
			preferring, others := keysBy(t, picker, 1, 8)
			before := c.upstreams(t, "")[0]

			open := make([]*lineClient, len(preferring))
			for i, ip := range preferring {
				open[i] = dialFrom(t, ip, c.listen)
				if name, err := open[i].talk(); err != nil || name != "b1" {
					t.Fatalf("before the change, %s: %q, %v; want b1", ip, name, err)
				}
			}

			ans := c.setState(t, fmt.Sprintf(tc.body, x.addr))
			if ans.Handler != "pool" || ans.Upstream != x.addr || ans.Previous.State != opReady || ans.State.State != tc.state || len(ans.Warnings) != 0 {
				t.Fatalf("answer %+v", ans)
			}

			// new connections: only b1's keys move, and only away from it
			for _, key := range slices.Concat(preferring, others) {
				want := picker.Pick(key, func(i int) bool { return i != 1 })
				if tc.newGoes != nil {
					want = tc.newGoes(picker, dials, key)
				}
				if got := landsOn(t, key, c.listen); got != backends[want].name {
					t.Errorf("a new connection from %s went to %s, want %s", key, got, backends[want].name)
				}
			}

			// the connections open to b1
			if tc.closed == closeNone {
				for _, cl := range open {
					if name, err := cl.talk(); err != nil || name != "b1" {
						t.Errorf("a connection open to b1 from %s: %q, %v; want it flowing", cl.key, name, err)
					}
				}
			} else {
				if tc.closed == closeDrainDeadline {
					cl := open[0]
					if name, err := cl.talk(); (err != nil || name != "b1") && time.Now().Before(ans.State.Deadline) {
						t.Errorf("before the drain's deadline, %s: %q, %v; want it flowing", cl.key, name, err)
					}
				}
				for _, cl := range open {
					// godist closes it: the client reads the end of it
					_ = cl.conn.SetReadDeadline(time.Now().Add(max(time.Until(ans.State.Deadline), 0) + testTimeout))
					if b, err := cl.r.ReadByte(); !errors.Is(err, io.EOF) && !isReset(err) {
						t.Errorf("a connection open to b1 from %s, after %s: read %q, %v; want it closed", cl.key, tc.name, b, err)
					}
				}
			}

			hs, u := c.upstreamNamed(t, x.addr)
			if hs.Name != "pool" || hs.Fingerprint != before.Fingerprint || hs.OperatorState == opDigestNone {
				t.Errorf("handler: name %q, fingerprint %s (was %s), operator state %s", hs.Name, hs.Fingerprint, before.Fingerprint, hs.OperatorState)
			}
			if u.Operator == nil || u.Operator.State != tc.state || u.EffectiveWeight != tc.weightAfter {
				t.Fatalf("b1 in /godist/upstreams: operator %+v, effective weight %g", u.Operator, u.EffectiveWeight)
			}
			wantClosed := closedTotals{}
			switch tc.closed {
			case closeMaint:
				wantClosed.Maint = uint64(len(open))
			case closeDrainDeadline:
				wantClosed.DrainDeadline = uint64(len(open))
			case closeNone, closeOnDown, closeReasons:
			}
			eventually(t, testTimeout, "the connections left to b1 counted", func() error {
				_, u := c.upstreamNamed(t, x.addr)
				wantLeft := len(open)
				if tc.closed != closeNone {
					wantLeft = 0
				}
				switch {
				case !tc.remaining && u.Operator.RemainingConnections != nil:
					return fmt.Errorf("remaining connections shown: %d", *u.Operator.RemainingConnections)
				case tc.remaining && (u.Operator.RemainingConnections == nil || *u.Operator.RemainingConnections != wantLeft):
					return fmt.Errorf("remaining connections %v, want %d", u.Operator.RemainingConnections, wantLeft)
				case u.Totals.Closed != wantClosed:
					return fmt.Errorf("closed %+v, want %+v", u.Totals.Closed, wantClosed)
				}
				return nil
			})
			scraped := c.scrape(t)
			for why := closeMaint; why < closeReasons; why++ {
				series := fmt.Sprintf(`%s_upstream_closed_connections_total{reason=%q,upstream=%q}`, metricsNamespace, why.String(), x.addr)
				want := 0.0
				if why == tc.closed {
					want = float64(len(open))
				}
				if got, ok := scraped[series]; !ok || got != want {
					t.Errorf("%s = %g (reported: %v), want %g", series, got, ok, want)
				}
			}
			info := fmt.Sprintf(`%s_handler_info{fingerprint=%q,name="pool",operator_state=%q}`, metricsNamespace, before.Fingerprint, hs.OperatorState)
			if scraped[info] != 1 {
				t.Errorf("no series %s", info)
			}

			var changed []logLine
			for _, l := range capturedLines(t, t.Name()) {
				if l["msg"] == "operator state changed" {
					changed = append(changed, l)
				}
			}
			if len(changed) != 1 || changed[0]["level"] != "info" || changed[0]["old_state"] != "ready" || changed[0]["new_state"] != tc.state.String() ||
				changed[0]["upstream"] != x.addr || changed[0]["handler_name"] != "pool" || changed[0]["source"] != "local" {
				t.Errorf("log lines of the change: %v", changed)
			}

			// ready again: b1's keys come back
			back := c.setState(t, fmt.Sprintf(`{"upstream": %q, "state": "ready"}`, x.addr))
			if back.Previous.State != tc.state || back.State.State != opReady {
				t.Errorf("answer to ready: %+v", back)
			}
			for _, key := range preferring {
				if got := landsOn(t, key, c.listen); got != "b1" {
					t.Errorf("after ready, a new connection from %s went to %s, want b1", key, got)
				}
			}
			if _, u := c.upstreamNamed(t, x.addr); u.Operator != nil || u.EffectiveWeight != 1 {
				t.Errorf("after ready: operator %+v, effective weight %g", u.Operator, u.EffectiveWeight)
			}
		})
	}
}

// TestOperatorHoldsEveryPass: a drained or maintained upstream takes no
// new connection even when it is the only one left: its tier's keys go to
// the next tier (the backup), and with every upstream held a connection is
// refused, counted and logged, with the reason in words.
func TestOperatorHoldsEveryPass(t *testing.T) {
	backends, addrs := startBackends(t, 3, lineEcho)
	c := startCaddyConfig(t, caddyConfig{LogLevel: "INFO", Logs: startCapture(t.Name()), Routes: []map[string]any{godistRoute(map[string]any{
		"upstreams": []map[string]any{{"dial": addrs[0]}, {"dial": addrs[1]}, {"dial": addrs[2], "tier": BackupTier}},
		"hash_key":  "ip",
	})}})
	for _, dial := range addrs[:2] {
		c.setState(t, fmt.Sprintf(`{"upstream": %q, "state": "drain"}`, dial))
	}
	hs := c.upstreams(t, "")[0]
	if hs.ServingTier == nil || *hs.ServingTier != BackupTier {
		t.Errorf("serving tier %v with tier 0 drained, want the backup tier", hs.ServingTier)
	}
	for i := range 10 {
		if got := landsOn(t, loopbackIP(i), c.listen); got != backends[2].name {
			t.Errorf("with tier 0 drained, a connection went to %s, want the backup", got)
		}
	}

	// the last one in maintenance: nothing to dial
	c.setState(t, fmt.Sprintf(`{"upstream": %q, "state": "maint"}`, addrs[2]))
	refusedBefore := noUpstream.Load()
	cl := dialFrom(t, loopbackIP(0), c.listen)
	if _, err := cl.talk(); !errors.Is(err, io.EOF) && !isReset(err) {
		t.Fatalf("with every upstream held, a connection: %v; want it closed", err)
	}
	if n := noUpstream.Load() - refusedBefore; n != 1 {
		t.Errorf("%d connections counted as finding no upstream, want 1", n)
	}
	pick := c.pick(t, "key=127.0.1.1")[0]
	if pick.Upstream != nil {
		t.Errorf("/godist/pick sends the key to %s with every upstream held", *pick.Upstream)
	}
	for _, o := range pick.Order {
		if o.Usable || (o.WhyNot != "drained by an operator" && o.WhyNot != "in maintenance, set by an operator; standby: tier 0 serves" && o.WhyNot != "in maintenance, set by an operator") {
			t.Errorf("/godist/pick: %+v", o)
		}
	}
	eventually(t, testTimeout, "the refusal logged", func() error {
		for _, l := range capturedLines(t, t.Name()) {
			if l["msg"] == "no upstream available: connection closed" {
				if e, _ := l["error"].(string); e != errAllHeld.Error() {
					return fmt.Errorf("logged with error %q, want %q", e, errAllHeld)
				}
				return nil
			}
		}
		return errors.New("no line")
	})
}

func init() {
	caddy.RegisterModule(faultyStorageModule{})
}

// faultyStorageModule is a Caddy storage, for these tests only: a
// faultyStorage on the file system, one per name, whose faults a test
// turns on and off (faultyStorageNamed).
type faultyStorageModule struct {
	Name string `json:"name"`
	Root string `json:"root"`
}

func (faultyStorageModule) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "caddy.storage.godist_test_faulty",
		New: func() caddy.Module { return new(faultyStorageModule) },
	}
}

// CertMagicStorage implements caddy.StorageConverter.
func (m faultyStorageModule) CertMagicStorage() (certmagic.Storage, error) {
	return faultyStorageNamed(m.Name, m.Root), nil
}

var faultyStorages sync.Map // name -> *faultyStorage

// faultyStorageNamed returns the faulty storage of a name, made on root
// the first time.
func faultyStorageNamed(name, root string) *faultyStorage {
	v, _ := faultyStorages.LoadOrStore(name, &faultyStorage{FileStorage: &certmagic.FileStorage{Path: root}})
	return v.(*faultyStorage)
}

// TestOperatorStateRequestErrors sends every kind of bad request to POST
// /godist/upstreams/state of a real Caddy running handlers of two names:
// each is answered with its status and a message naming the field, and
// changes nothing. A storage that fails answers 503 naming the step.
func TestOperatorStateRequestErrors(t *testing.T) {
	_, addrs := startBackends(t, 2, lineEcho)
	faulty := faultyStorageNamed(t.Name(), t.TempDir())
	faulty.fail.Store(0)
	c := startCaddyConfig(t, caddyConfig{
		StorageModule: map[string]any{"module": "godist_test_faulty", "name": t.Name(), "root": faulty.Path},
		Routes: []map[string]any{
			godistRoute(map[string]any{"upstreams": upstreamsJSON(addrs[0]), "name": "db"}),
			godistRoute(map[string]any{"upstreams": upstreamsJSON(addrs[1]), "name": "cache"}),
		},
	})
	up := addrs[0]
	tests := []struct {
		name   string
		method string
		query  string
		body   string
		fail   uint32 // storage operations that fail
		status int
		want   string // the whole error message
	}{
		{"GET", http.MethodGet, "", "", 0, 405, "method GET not allowed on /godist/upstreams/state: use POST"},
		{"a query parameter", http.MethodPost, "?handler=0", `{"handler": "db", "upstream": "` + up + `", "state": "drain"}`, 0, 400,
			`unknown query parameter "handler": /godist/upstreams/state takes none: its request is in its body`},
		{"no body", http.MethodPost, "", "", 0, 400, `request body: empty: want {"upstream": "host:port", "state": "drain"}`},
		{"a body too large", http.MethodPost, "", `{"reason": "` + strings.Repeat("x", maxOpStateBody) + `"}`, 0, 413, "request body: larger than 8192 bytes"},
		{"not JSON", http.MethodPost, "", `upstream=` + up, 0, 400, "request body: not valid JSON: invalid character 'u' looking for beginning of value"},
		{"an array", http.MethodPost, "", `[]`, 0, 400, "request body: must be a JSON object, not a JSON array"},
		{"two objects", http.MethodPost, "", `{"handler": "db", "upstream": "` + up + `", "state": "drain"} {}`, 0, 400, "request body: more after the JSON object"},
		{"an unknown field", http.MethodPost, "", `{"handler": "db", "upstream": "` + up + `", "state": "drain", "timeout": "1m"}`, 0, 400,
			`request body: unknown field "timeout": the fields are handler, upstream, state, deadline, keep_connections, weight and reason`},
		{"a field of the wrong type", http.MethodPost, "", `{"handler": "db", "upstream": "` + up + `", "state": "ready", "weight": "half"}`, 0, 400,
			"weight: must be a JSON number, not a JSON string"},
		{"no upstream", http.MethodPost, "", `{"handler": "db", "state": "drain"}`, 0, 400, "upstream: required: the upstream's dial address, as the handler lists it"},
		{"an address without a port", http.MethodPost, "", `{"handler": "db", "upstream": "127.0.0.1", "state": "drain"}`, 0, 400,
			`upstream "127.0.0.1": invalid dial address: missing port`},
		{"no state", http.MethodPost, "", `{"handler": "db", "upstream": "` + up + `"}`, 0, 400, "state: required: ready, drain or maint"},
		{"another state", http.MethodPost, "", `{"handler": "db", "upstream": "` + up + `", "state": "drained"}`, 0, 400, `state "drained": must be ready, drain or maint`},
		{"a deadline on maint", http.MethodPost, "", `{"handler": "db", "upstream": "` + up + `", "state": "maint", "deadline": "1m"}`, 0, 400,
			"deadline: only with state drain, not maint"},
		{"a deadline that is not a duration", http.MethodPost, "", `{"handler": "db", "upstream": "` + up + `", "state": "drain", "deadline": "soon"}`, 0, 400,
			`deadline "soon": not a duration such as "30s" or "10m"`},
		{"a zero deadline", http.MethodPost, "", `{"handler": "db", "upstream": "` + up + `", "state": "drain", "deadline": "0s"}`, 0, 400,
			`deadline "0s": must be positive; leave it out to let the connections end by themselves`},
		{"a deadline too far", http.MethodPost, "", `{"handler": "db", "upstream": "` + up + `", "state": "drain", "deadline": "8d"}`, 0, 400,
			`deadline "8d": at most 168h0m0s; a longer drain is a maint`},
		{"keep_connections on drain", http.MethodPost, "", `{"handler": "db", "upstream": "` + up + `", "state": "drain", "keep_connections": true}`, 0, 400,
			"keep_connections: only with state maint, not drain"},
		{"a weight on drain", http.MethodPost, "", `{"handler": "db", "upstream": "` + up + `", "state": "drain", "weight": 0.5}`, 0, 400,
			"weight: only with state ready, not drain: a drain upstream takes no new connections"},
		{"a weight of 0", http.MethodPost, "", `{"handler": "db", "upstream": "` + up + `", "state": "ready", "weight": 0}`, 0, 400,
			"weight 0: must be from 0.01 to 100, a factor of the upstream's configured weight"},
		{"a weight too large", http.MethodPost, "", `{"handler": "db", "upstream": "` + up + `", "state": "ready", "weight": 1000}`, 0, 400,
			"weight 1000: must be from 0.01 to 100, a factor of the upstream's configured weight"},
		{"a reason too long", http.MethodPost, "", `{"handler": "db", "upstream": "` + up + `", "state": "drain", "reason": "` + strings.Repeat("r", 300) + `"}`, 0, 400,
			"reason: 300 bytes: at most 256"},
		{"a bad handler name", http.MethodPost, "", `{"handler": "db primary", "upstream": "` + up + `", "state": "drain"}`, 0, 400,
			`name "db primary": ' ' at byte 2: only letters, digits, '-', '_' and '.' may be used`},
		{"an empty handler name", http.MethodPost, "", `{"handler": "", "upstream": "` + up + `", "state": "drain"}`, 0, 400,
			"handler: empty: give a handler's name, or leave it out when one name is running"},
		{"no handler, two names running", http.MethodPost, "", `{"upstream": "` + up + `", "state": "drain"}`, 0, 400,
			`handler: required when godist handlers of several names run: the names running are "cache", "db"`},
		{"a handler not running", http.MethodPost, "", `{"handler": "dbb", "upstream": "` + up + `", "state": "drain"}`, 0, 404,
			`handler "dbb": no godist handler of that name is running: the names running are "cache", "db"`},
		{"the storage's lock fails", http.MethodPost, "", `{"handler": "db", "upstream": "` + up + `", "state": "drain"}`, failLock, 503,
			"storage: locking godist_state_db_127.0.0.1%3A" + up[len("127.0.0.1:"):] + ": " + errStorageDown.Error()},
		{"the storage's write fails", http.MethodPost, "", `{"handler": "db", "upstream": "` + up + `", "state": "drain"}`, failStore, 503,
			"storage: writing godist/state/db/127.0.0.1%3A" + up[len("127.0.0.1:"):] + ".json: " + errStorageDown.Error()},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			faulty.fail.Store(tc.fail)
			defer faulty.fail.Store(0)
			a := c.adminCall(t, tc.method, "/godist/upstreams/state"+tc.query, []byte(tc.body))
			if a.status != tc.status || apiErrorMessage(t, a) != tc.want {
				t.Fatalf("%d %s\nwant %d %q", a.status, a.body, tc.status, tc.want)
			}
		})
	}
	for _, hs := range c.upstreams(t, "") {
		for _, u := range hs.Upstreams {
			if u.Operator != nil {
				t.Errorf("a bad request changed %s of %s: %+v", u.Dial, hs.Name, u.Operator)
			}
		}
	}
	if keys, err := faulty.List(t.Context(), "godist/state", true); len(keys) != 0 {
		t.Errorf("a bad request left records in the storage: %v, %v", keys, err)
	}

	// an address no handler of the name lists: kept, with a warning
	ans := c.setState(t, `{"handler": "cache", "upstream": "127.0.0.1:9", "state": "drain"}`)
	if len(ans.Warnings) != 1 || !strings.Contains(ans.Warnings[0], `upstream "127.0.0.1:9" is not among the upstreams of handler "cache" now`) {
		t.Errorf("warnings %q", ans.Warnings)
	}
}

// TestMaintHealthChecksNotCounted: the active checks of an upstream in
// maintenance run, but what they find does not count: an upstream stopped
// for its maintenance is not taken down (no log line, no on_down), and
// once ready again the checks count at once.
func TestMaintHealthChecksNotCounted(t *testing.T) {
	backends, addrs := startBackends(t, 2, lineEcho)
	name := t.Name()
	capturedMu.Lock()
	delete(captured, name)
	capturedMu.Unlock()
	c := startCaddyConfig(t, caddyConfig{
		Logs: map[string]any{"capture": map[string]any{
			"writer": map[string]any{"output": "godist_test_capture", "name": name}, "encoder": map[string]any{"format": "json"}, "level": "DEBUG",
		}},
		Routes: []map[string]any{godistRoute(map[string]any{
			"upstreams":     upstreamsJSON(addrs...),
			"health_checks": map[string]any{"active": map[string]any{"interval": "50ms", "timeout": "1s"}},
		})},
	})
	x := backends[1]
	eventually(t, testTimeout, "b1 checked", func() error {
		if _, u := c.upstreamNamed(t, x.addr); u.Health.LastCheck == nil {
			return errors.New("no check yet")
		}
		return nil
	})
	c.setState(t, fmt.Sprintf(`{"upstream": %q, "state": "maint"}`, x.addr))
	_, u := c.upstreamNamed(t, x.addr)
	lastCounted := *u.Health.LastCheck
	x.stop() // its maintenance: nothing listens

	notCounted := func() int {
		n := 0
		for _, l := range capturedLines(t, name) {
			if l["msg"] == "health check not counted: the upstream is in maintenance" && l["upstream"] == x.addr && l["check_error"] != nil {
				n++
			}
		}
		return n
	}
	eventually(t, testTimeout, "failed checks of b1 left uncounted", func() error {
		if n := notCounted(); n < 3 {
			return fmt.Errorf("%d so far", n)
		}
		return nil
	})
	_, u = c.upstreamNamed(t, x.addr)
	if u.Health.Status != "up" || !u.Health.LastCheck.Equal(lastCounted) || u.Health.LastCheckError != "" {
		t.Fatalf("in maintenance, failed checks counted: %+v", u.Health)
	}
	for _, l := range capturedLines(t, name) {
		if l["msg"] == "upstream down: health checks fail" {
			t.Fatalf("logged in maintenance: %v", l)
		}
	}

	c.setState(t, fmt.Sprintf(`{"upstream": %q, "state": "ready"}`, x.addr))
	eventually(t, testTimeout, "b1 down by its checks once ready", func() error {
		if _, u := c.upstreamNamed(t, x.addr); u.Health.Status != "down" || !slices.Equal(u.Health.DownBy, []string{downByActive}) {
			return fmt.Errorf("health %+v", u.Health)
		}
		return nil
	})
}

// TestOperatorStateKeptOverReloadAndRestart: connections of a config that
// a reload replaced are counted by a drain and closed by a maint, as the
// new config's are; and the state, kept in the storage, is in force the
// moment a restarted Caddy loads its config.
func TestOperatorStateKeptOverReloadAndRestart(t *testing.T) {
	backends, addrs := startBackends(t, 3, lineEcho)
	storage := t.TempDir()
	route := func(dialTimeout string) []map[string]any {
		return []map[string]any{godistRoute(map[string]any{
			"upstreams": upstreamsJSON(addrs...), "hash_key": "ip", "name": "pool", "dial_timeout": dialTimeout,
		})}
	}
	c := startCaddyConfig(t, caddyConfig{Storage: storage, Routes: route("3s")})
	picker := NewPicker([]PickerUpstream{{Dial: addrs[0], Weight: 1}, {Dial: addrs[1], Weight: 1}, {Dial: addrs[2], Weight: 1}})
	preferring, _ := keysBy(t, picker, 1, 5)
	open := make([]*lineClient, len(preferring))
	for i, ip := range preferring {
		open[i] = dialFrom(t, ip, c.listen)
		if name, err := open[i].talk(); err != nil || name != "b1" {
			t.Fatalf("%s: %q, %v; want b1", ip, name, err)
		}
	}

	// a reload: the open connections stay with the old config's handler
	if status, body := c.load(route("2s")); status != http.StatusOK {
		t.Fatalf("reloading: %d %s", status, body)
	}
	c.setState(t, fmt.Sprintf(`{"upstream": %q, "state": "drain"}`, backends[1].addr))
	if _, u := c.upstreamNamed(t, backends[1].addr); u.Operator.RemainingConnections == nil || *u.Operator.RemainingConnections != len(open) {
		t.Errorf("draining after a reload: %v connections remain, want the %d of the config before", u.Operator.RemainingConnections, len(open))
	}
	for _, cl := range open {
		if name, err := cl.talk(); err != nil || name != "b1" {
			t.Errorf("drained, a connection of the config before: %q, %v; want it flowing", name, err)
		}
	}
	c.setState(t, fmt.Sprintf(`{"upstream": %q, "state": "maint"}`, backends[1].addr))
	for _, cl := range open {
		if b, err := cl.r.ReadByte(); !errors.Is(err, io.EOF) && !isReset(err) {
			t.Errorf("in maintenance, a connection of the config before: read %q, %v; want it closed", b, err)
		}
	}

	// a restart: a new Caddy on the same storage
	stopCaddy(t)
	c = startCaddyConfig(t, caddyConfig{Storage: storage, Routes: route("3s")})
	if _, u := c.upstreamNamed(t, backends[1].addr); u.Operator == nil || u.Operator.State != opMaint {
		t.Fatalf("after a restart, b1's operator state: %+v; want maint", u.Operator)
	}
	for _, ip := range preferring {
		if got := landsOn(t, ip, c.listen); got == "b1" {
			t.Errorf("after a restart, a new connection from %s went to b1, in maintenance", ip)
		}
	}
}

// TestSlowStartRamp takes one upstream of four down and back up while
// slow_start ramps it over a few seconds, and sends a round of new
// connections, one from each of 200 clients, again and again through the
// ramp: its share of them rises round after round, up to its full share
// once the ramp is over, and no client ever goes to any upstream but it or
// the one it goes to when it is down: keys move only toward it.
func TestSlowStartRamp(t *testing.T) {
	const (
		clients = 200
		ramp    = 4 * time.Second
	)
	backends, addrs := startBackends(t, 4, lineEcho)
	c := startCaddyConfig(t, caddyConfig{LogLevel: "INFO", Routes: []map[string]any{godistRoute(map[string]any{
		"upstreams": upstreamsJSON(addrs...), "hash_key": "ip", "slow_start": ramp.String(),
		"health_checks": map[string]any{"active": map[string]any{"interval": "50ms", "timeout": "1s"}},
	})}})
	r := backends[3]
	ups := make([]PickerUpstream, len(addrs))
	for i, a := range addrs {
		ups[i] = PickerUpstream{Dial: a, Weight: 1}
	}
	picker := NewPicker(ups)
	keys := make([]string, clients)
	without := make(map[string]string, clients) // where each key goes while r is down
	full := 0                                   // keys r has at its full weight
	for i := range keys {
		keys[i] = loopbackIP(i)
		without[keys[i]] = backends[picker.Pick(keys[i], func(j int) bool { return j != 3 })].name
		if picker.Pick(keys[i], nil) == 3 {
			full++
		}
	}
	if _, u := c.upstreamNamed(t, r.addr); u.SlowStart != nil || u.EffectiveWeight != 1 {
		t.Fatalf("at Caddy's start, b3 ramps: %+v, weight %g", u.SlowStart, u.EffectiveWeight)
	}

	r.stop()
	eventually(t, testTimeout, "b3 down", func() error {
		if _, u := c.upstreamNamed(t, r.addr); u.Health.Status != "down" {
			return errors.New("still up")
		}
		return nil
	})
	r = startBackend(t, "b3", r.addr, lineEcho)
	var until time.Time
	eventually(t, testTimeout, "b3 back up, ramping", func() error {
		_, u := c.upstreamNamed(t, r.addr)
		if u.Health.Status != "up" || u.SlowStart == nil {
			return fmt.Errorf("health %s, slow start %+v", u.Health.Status, u.SlowStart)
		}
		if u.SlowStart.Factor < slowStartFloor || u.SlowStart.Factor >= 1 || u.EffectiveWeight != u.SlowStart.Factor {
			return fmt.Errorf("slow start %+v, effective weight %g", u.SlowStart, u.EffectiveWeight)
		}
		until = u.SlowStart.Until
		return nil
	})

	// rounds until one starts after the ramp is over
	round := func() map[string]string {
		got := make(map[string]string, clients)
		var mu sync.Mutex
		var wg sync.WaitGroup
		work := make(chan string)
		for range 8 {
			wg.Go(func() {
				for key := range work {
					name := landsOn(t, key, c.listen)
					mu.Lock()
					got[key] = name
					mu.Unlock()
				}
			})
		}
		for _, key := range keys {
			work <- key
		}
		close(work)
		wg.Wait()
		return got
	}
	var shares []int
	onR := map[string]bool{}
	for last := false; !last; {
		if len(shares) > 500 {
			t.Fatal("500 rounds and the ramp is not over")
		}
		if len(shares) > 0 {
			time.Sleep(50 * time.Millisecond) // a few rounds a ramp step
		}
		last = time.Now().After(until)
		n := 0
		for key, name := range round() {
			switch {
			case name == "b3":
				onR[key] = true
				n++
			case name != without[key]:
				t.Fatalf("during the ramp, %s went to %s: only b3 or %s are where its key may go", key, name, without[key])
			case onR[key]:
				t.Fatalf("during the ramp, %s went back from b3 to %s", key, name)
			}
		}
		shares = append(shares, n)
	}
	t.Logf("b3's share of %d new connections per round, through a %s ramp: %v (full share: %d)", clients, ramp, shares, full)
	if shares[len(shares)-1] != full {
		t.Errorf("after the ramp, b3 took %d of %d keys, want its full share, %d", shares[len(shares)-1], clients, full)
	}
	between := 0
	for _, n := range shares {
		if n > shares[0] && n < full {
			between++
		}
	}
	if shares[0] >= full || between == 0 {
		t.Errorf("b3's share did not rise through the ramp: %v", shares)
	}
	if _, u := c.upstreamNamed(t, r.addr); u.SlowStart != nil || u.EffectiveWeight != 1 {
		t.Errorf("after the ramp: slow start %+v, effective weight %g", u.SlowStart, u.EffectiveWeight)
	}
}

// TestSlowStartWhen: what ramps and what does not. Nothing at Caddy's
// start; an upstream back from drain or maint; one a reload adds, while
// the ones it keeps go on at full weight.
func TestSlowStartWhen(t *testing.T) {
	_, addrs := startBackends(t, 3, lineEcho)
	route := func(n int) []map[string]any {
		return []map[string]any{godistRoute(map[string]any{"upstreams": upstreamsJSON(addrs[:n]...), "name": "pool", "slow_start": "1h"})}
	}
	c := startCaddyConfig(t, caddyConfig{Routes: route(2)})
	ramping := func() []string {
		var out []string
		for _, u := range c.upstreams(t, "")[0].Upstreams {
			if u.SlowStart != nil {
				out = append(out, u.Dial)
			}
		}
		return out
	}
	if got := ramping(); len(got) != 0 {
		t.Fatalf("ramping at Caddy's start: %v", got)
	}
	for _, state := range []string{"drain", "maint"} {
		c.setState(t, fmt.Sprintf(`{"upstream": %q, "state": %q}`, addrs[0], state))
		c.setState(t, fmt.Sprintf(`{"upstream": %q, "state": "ready"}`, addrs[0]))
		_, u := c.upstreamNamed(t, addrs[0])
		if u.SlowStart == nil || u.SlowStart.Factor != slowStartFloor || u.EffectiveWeight != slowStartFloor || u.SlowStart.Until.Sub(u.SlowStart.Since) != time.Hour {
			t.Errorf("back from %s: slow start %+v, effective weight %g", state, u.SlowStart, u.EffectiveWeight)
		}
		if got := ramping(); !slices.Equal(got, addrs[:1]) {
			t.Errorf("back from %s, ramping: %v", state, got)
		}
	}
	if status, body := c.load(route(3)); status != http.StatusOK {
		t.Fatalf("reloading: %d %s", status, body)
	}
	if got := ramping(); !slices.Equal(got, []string{addrs[0], addrs[2]}) {
		t.Errorf("after a reload that added %s, ramping: %v; want it, and %s still", addrs[2], got, addrs[0])
	}
}

// streamTicks returns a backend handler that writes a numbered line every
// 10ms until the connection fails, or, once hang is closed, goes silent
// and holds the connection open, as a host that vanished would, until the
// other side closes it.
func streamTicks(hang <-chan struct{}) func(*backend, net.Conn) {
	return func(_ *backend, c net.Conn) {
		_ = c.SetDeadline(time.Time{})
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for i := 0; ; i++ {
			if _, err := fmt.Fprintf(c, "tick %d\n", i); err != nil {
				return
			}
			select {
			case <-tick.C:
			case <-hang:
				_, _ = io.Copy(io.Discard, c)
				return
			}
		}
	}
}

// readTicks reads n ticks in order, from where r is.
func readTicks(r *bufio.Reader, next *int, n int) error {
	for range n {
		line, err := r.ReadString('\n')
		if err != nil {
			return err
		}
		if want := fmt.Sprintf("tick %d\n", *next); line != want {
			return fmt.Errorf("read %q, want %q", line, want)
		}
		*next++
	}
	return nil
}

// TestOnDown: clients stream from two upstreams when one of them dies: it
// accepts no more connections (its listener is gone: its checks fail),
// and its open connections either go on streaming or, as from a host that
// vanished, go silent without closing. With on_down close, godist closes
// them as the checks mark it down, counts them, and the clients of the
// other upstream stream on; with keep, a stream that goes on flows on.
func TestOnDown(t *testing.T) {
	for _, tc := range []struct {
		onDown string
		hang   bool
	}{{onDownClose, false}, {onDownClose, true}, {onDownKeep, false}} {
		onDown := tc.onDown
		name := onDown
		if tc.hang {
			name += ", silent"
		}
		t.Run(name, func(t *testing.T) {
			hang := make(chan struct{})
			x := startBackend(t, "b0", "", streamTicks(hang))
			y := startBackend(t, "b1", "", streamTicks(nil))
			backends, addrs := []*backend{x, y}, []string{x.addr, y.addr}
			c := startCaddyConfig(t, caddyConfig{LogLevel: "INFO", Routes: []map[string]any{godistRoute(map[string]any{
				"upstreams": upstreamsJSON(addrs...), "hash_key": "ip", "on_down": onDown,
				"health_checks": map[string]any{"active": map[string]any{"interval": "50ms", "timeout": "1s"}},
			})}})
			picker := NewPicker([]PickerUpstream{{Dial: addrs[0], Weight: 1}, {Dial: addrs[1], Weight: 1}})
			toX, toY := keysBy(t, picker, 0, 4)
			type streamer struct {
				cl   *lineClient
				next int
			}
			start := func(keys []string) []*streamer {
				out := make([]*streamer, len(keys))
				for i, ip := range keys {
					out[i] = &streamer{cl: dialFrom(t, ip, c.listen)}
					if err := readTicks(out[i].cl.r, &out[i].next, 3); err != nil {
						t.Fatalf("streaming from %s: %v", ip, err)
					}
				}
				return out
			}
			onX, onY := start(toX), start(toY)

			backends[0].ln.Close() // it accepts no more: its checks fail
			if tc.hang {
				close(hang)
			}
			eventually(t, testTimeout, "b0 down", func() error {
				if _, u := c.upstreamNamed(t, addrs[0]); u.Health.Status != "down" {
					return errors.New("still up")
				}
				return nil
			})
			for _, s := range onX {
				if onDown == onDownKeep {
					// half a second more of it, and it goes on
					if err := readTicks(s.cl.r, &s.next, 50); err != nil {
						t.Errorf("on_down keep: a stream from b0 ended with %v after %d ticks; want it flowing", err, s.next)
					}
					continue
				}
				if err := readTicks(s.cl.r, &s.next, 1_000_000); !errors.Is(err, io.EOF) && !isReset(err) { // until it ends
					t.Errorf("on_down close: a stream from b0 ended with %v after %d ticks; want it closed", err, s.next)
				}
			}
			for _, s := range onY {
				_ = s.cl.conn.SetDeadline(time.Now().Add(testTimeout))
				if err := readTicks(s.cl.r, &s.next, 5); err != nil {
					t.Errorf("a stream from b1 after b0 went down: %v", err)
				}
			}
			want := closedTotals{}
			if onDown == onDownClose {
				want.OnDown = uint64(len(onX))
			}
			if _, u := c.upstreamNamed(t, addrs[0]); u.Totals.Closed != want {
				t.Errorf("closed connections of b0: %+v, want %+v", u.Totals.Closed, want)
			}
		})
	}
}
