// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// The stores here keep their states in a real certmagic.FileStorage, in a
// folder of the test's own; two stores on one folder are two Caddy
// instances sharing a storage.

// testPollInterval is the poll interval of the stores in these tests.
const testPollInterval = 100 * time.Millisecond

// Storage operations that faultyStorage can make fail.
const (
	failList uint32 = 1 << iota
	failStat
	failLoad
	failStore
	failDelete
	failLock
)

var errStorageDown = errors.New("storage unreachable (injected)")

// faultyStorage is a FileStorage whose operations fail on demand, and that
// counts its listings (one per poll).
type faultyStorage struct {
	*certmagic.FileStorage
	fail  atomic.Uint32 // the operations that fail now
	lists atomic.Int64
}

func (f *faultyStorage) failing(op uint32) bool { return f.fail.Load()&op != 0 }

func (f *faultyStorage) List(ctx context.Context, prefix string, recursive bool) ([]string, error) {
	f.lists.Add(1)
	if f.failing(failList) {
		return nil, errStorageDown
	}
	return f.FileStorage.List(ctx, prefix, recursive)
}

func (f *faultyStorage) Stat(ctx context.Context, key string) (certmagic.KeyInfo, error) {
	if f.failing(failStat) {
		return certmagic.KeyInfo{}, errStorageDown
	}
	return f.FileStorage.Stat(ctx, key)
}

func (f *faultyStorage) Load(ctx context.Context, key string) ([]byte, error) {
	if f.failing(failLoad) {
		return nil, errStorageDown
	}
	return f.FileStorage.Load(ctx, key)
}

func (f *faultyStorage) Store(ctx context.Context, key string, value []byte) error {
	if f.failing(failStore) {
		return errStorageDown
	}
	return f.FileStorage.Store(ctx, key, value)
}

func (f *faultyStorage) Delete(ctx context.Context, key string) error {
	if f.failing(failDelete) {
		return errStorageDown
	}
	return f.FileStorage.Delete(ctx, key)
}

func (f *faultyStorage) Lock(ctx context.Context, name string) error {
	if f.failing(failLock) {
		return errStorageDown
	}
	return f.FileStorage.Lock(ctx, name)
}

// newTestOpStore starts a store of handler name's states in stor, polling
// every testPollInterval, and stops it when the test ends. Its log lines
// at info and above are returned.
func newTestOpStore(t *testing.T, name string, stor certmagic.Storage) (*opStore, *observer.ObservedLogs) {
	t.Helper()
	core, logs := observer.New(zapcore.InfoLevel)
	s := newOpStore(name, &opHolder{stor: stor, logger: zap.New(core), interval: testPollInterval})
	s.start()
	t.Cleanup(s.stop)
	return s, logs
}

// opReq returns the checked request a body makes, for handler name.
func opReq(t *testing.T, name, body string) opStateRequest {
	t.Helper()
	req, err := parseOpStateRequest(strings.NewReader(body))
	if err != nil {
		t.Fatalf("request %s: %v", body, err)
	}
	req.Handler = name
	return req
}

// mustSet sets a state through s and returns the record in force after.
func mustSet(t *testing.T, s *opStore, body string) opRecord {
	t.Helper()
	_, after, err := s.set(t.Context(), opReq(t, s.name, body))
	if err != nil {
		t.Fatalf("setting %s: %v", body, err)
	}
	return after
}

// waitState waits until s has state for dial, and returns how long that
// took.
func waitState(t *testing.T, s *opStore, dial string, state opState, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		if r, _ := s.snapshot().lookup(s.name, dial); r.State == state {
			return time.Since(start)
		}
		if time.Since(start) > within {
			r, _ := s.snapshot().lookup(s.name, dial)
			t.Fatalf("%s: still %s after %s, want %s", dial, r.State, within, state)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestEscapeKeySegment(t *testing.T) {
	tests := []struct{ in, want string }{
		{"default", "default"},
		{"db-primary_1.eu", "db-primary_1.eu"},
		{"10.0.0.1:5432", "10.0.0.1%3A5432"},
		{"[::1]:5432", "%5B%3A%3A1%5D%3A5432"},
		{"tcp/db.internal:5432", "tcp%2Fdb.internal%3A5432"},
		{"unix//run/pg/.s.PGSQL.5432", "unix%2F%2Frun%2Fpg%2F.s.PGSQL.5432"},
		{"..", "%2E."},
		{".hidden", "%2Ehidden"},
		{"a%b c", "a%25b%20c"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			if got := escapeKeySegment(tt.in); got != tt.want {
				t.Errorf("escapeKeySegment(%q) = %q, want %q", tt.in, got, tt.want)
			}
		})
	}
	if got, want := opStateKey("db", "10.0.0.1:5432"), "godist/state/db/10.0.0.1%3A5432.json"; got != want {
		t.Errorf("opStateKey = %q, want %q", got, want)
	}
	// distinct addresses never share a key
	keys := map[string]string{}
	for _, dial := range []string{"a:1", "a%3A1", "A:1", "tcp/a:1", "udp/a:1", "a.:1", "a_:1"} {
		k := opStateKey("default", dial)
		if other, dup := keys[k]; dup {
			t.Errorf("%q and %q share the key %s", dial, other, k)
		}
		keys[k] = dial
	}
}

func TestOpRecordClosesOpen(t *testing.T) {
	now := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	tests := []struct {
		name string
		rec  opRecord
		want bool
	}{
		{"ready", opRecord{State: opReady}, false},
		{"ready with a weight", opRecord{State: opReady, Weight: 0.5}, false},
		{"drain without deadline", opRecord{State: opDrain}, false},
		{"drain before its deadline", opRecord{State: opDrain, Deadline: now.Add(time.Second)}, false},
		{"drain at its deadline", opRecord{State: opDrain, Deadline: now}, true},
		{"drain past its deadline", opRecord{State: opDrain, Deadline: now.Add(-time.Second)}, true},
		{"maint", opRecord{State: opMaint}, true},
		{"maint keeping connections", opRecord{State: opMaint, KeepConnections: true}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.rec.closesOpen(now); got != tt.want {
				t.Errorf("closesOpen = %v, want %v", got, tt.want)
			}
			if got, want := tt.rec.takesNew(), tt.rec.State == opReady; got != want {
				t.Errorf("takesNew = %v, want %v", got, want)
			}
		})
	}
}

func TestOpDigest(t *testing.T) {
	drainA := opRecord{Upstream: "a:1", State: opDrain}
	if got := opDigest(nil); got != opDigestNone {
		t.Errorf("no records: %q, want %q", got, opDigestNone)
	}
	base := opDigest(map[string]opRecord{"a:1": drainA, "b:1": {Upstream: "b:1", Weight: 0.5}})
	if len(base) != 16 {
		t.Fatalf("digest %q: want 16 hex digits", base)
	}
	same := map[string]opRecord{
		"b:1": {Upstream: "b:1", Weight: 0.5, Reason: "canary", SetByHost: "other", Version: 9},
		"a:1": {Upstream: "a:1", State: opDrain, Deadline: time.Now()},
	}
	if got := opDigest(same); got != base {
		t.Errorf("reasons, deadlines and authors changed the digest: %s, want %s", got, base)
	}
	for name, records := range map[string]map[string]opRecord{
		"another state":  {"a:1": {Upstream: "a:1", State: opMaint}, "b:1": {Upstream: "b:1", Weight: 0.5}},
		"another weight": {"a:1": drainA, "b:1": {Upstream: "b:1", Weight: 0.25}},
		"one fewer":      {"a:1": drainA},
	} {
		if got := opDigest(records); got == base {
			t.Errorf("%s: same digest %s", name, got)
		}
	}
}

// TestOpStoreSharedStorage is two instances on one storage folder: a state
// set through one is in force there at once, and in the other within its
// poll interval; setting it back to ready deletes the record.
func TestOpStoreSharedStorage(t *testing.T) {
	dir := t.TempDir()
	a, aLogs := newTestOpStore(t, "db", &certmagic.FileStorage{Path: dir})
	b, bLogs := newTestOpStore(t, "db", &certmagic.FileStorage{Path: dir})
	const dial = "10.0.0.2:5432"

	after := mustSet(t, a, `{"upstream": "10.0.0.2:5432", "state": "drain", "deadline": "30s", "reason": "upgrade"}`)
	if r, _ := a.snapshot().lookup("db", dial); !r.sameAs(after) {
		t.Fatalf("the instance that set the drain has %+v, want %+v at once", r, after)
	}
	took := waitState(t, b, dial, opDrain, 2*testPollInterval+5*time.Second)
	t.Logf("the drain reached the other instance in %s (poll interval %s)", took, testPollInterval)
	if r, _ := b.snapshot().lookup("db", dial); !r.sameAs(after) {
		t.Errorf("the other instance has %+v, want %+v", r, after)
	}
	if got := after.Deadline.Sub(after.SetAt); got != 30*time.Second {
		t.Errorf("deadline %s after it was set, want 30s", got)
	}
	if after.SetByHost == "" || after.SetByPID != os.Getpid() || after.Version == 0 {
		t.Errorf("record without its author or version: %+v", after)
	}

	// each instance logs the change once, at info, with old and new states
	for name, logs := range map[string]*observer.ObservedLogs{"a": aLogs, "b": bLogs} {
		lines := logs.FilterMessage("operator state changed").All()
		if len(lines) != 1 {
			t.Fatalf("instance %s logged %d changes, want 1: %v", name, len(lines), lines)
		}
		fields := lines[0].ContextMap()
		if fields["old_state"] != "ready" || fields["new_state"] != "drain" || fields["upstream"] != dial || fields["reason"] != "upgrade" {
			t.Errorf("instance %s logged %v", name, fields)
		}
	}

	mustSet(t, b, `{"upstream": "10.0.0.2:5432", "state": "ready"}`)
	waitState(t, a, dial, opReady, 2*testPollInterval+5*time.Second)
	if _, err := os.Stat(filepath.Join(dir, "godist", "state", "db", "10.0.0.2%3A5432.json")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("a ready upstream at full weight still has a record: %v", err)
	}
	if n := a.snapshot().len(); n != 0 {
		t.Errorf("%d records in force, want none", n)
	}
}

// TestOpStoreRestart sets states, stops both instances, and starts two
// new ones on the same folder: each has every state as soon as it starts,
// before any poll interval has passed.
func TestOpStoreRestart(t *testing.T) {
	dir := t.TempDir()
	a, _ := newTestOpStore(t, "db", &certmagic.FileStorage{Path: dir})
	var want []opRecord
	for _, body := range []string{
		`{"upstream": "10.0.0.1:5432", "state": "drain", "deadline": "1h"}`,
		`{"upstream": "10.0.0.2:5432", "state": "maint", "keep_connections": true}`,
		`{"upstream": "10.0.0.3:5432", "state": "ready", "weight": 0.5}`,
		`{"upstream": "[::1]:5432", "state": "drain"}`,
	} {
		want = append(want, mustSet(t, a, body))
	}
	// another name in the same storage is kept apart
	other, _ := newTestOpStore(t, "cache", &certmagic.FileStorage{Path: dir})
	mustSet(t, other, `{"upstream": "10.0.0.1:5432", "state": "maint"}`)
	a.stop()
	other.stop()

	for i := range 2 {
		s := newOpStore("db", &opHolder{stor: &certmagic.FileStorage{Path: dir}, logger: zap.NewNop(), interval: time.Hour})
		s.start()
		t.Cleanup(s.stop)
		snap := s.snapshot()
		if snap.len() != len(want) {
			t.Fatalf("instance %d: %d states after a restart, want %d: %+v", i, snap.len(), len(want), snap.list())
		}
		for _, w := range want {
			if got, _ := snap.lookup("db", w.Upstream); !got.sameAs(w) {
				t.Errorf("instance %d: %s is %+v after a restart, want %+v", i, w.Upstream, got, w)
			}
		}
	}
}

// TestOpStoreStorageFailure cuts one instance off its storage, listing,
// stat or load failing in turn, while another changes a state: the one cut
// off keeps the state it knew, logs the outage once however many polls
// fail, fails a write without changing its state, and catches up once the
// storage answers again.
func TestOpStoreStorageFailure(t *testing.T) {
	dir := t.TempDir()
	a, _ := newTestOpStore(t, "db", &certmagic.FileStorage{Path: dir})
	faulty := &faultyStorage{FileStorage: &certmagic.FileStorage{Path: dir}}
	b, logs := newTestOpStore(t, "db", faulty)
	const dial = "10.0.0.2:5432"
	const failed = "operator states: reading the storage failed; the last known states stay in force"

	mustSet(t, a, `{"upstream": "10.0.0.2:5432", "state": "drain"}`)
	waitState(t, b, dial, opDrain, 2*testPollInterval+5*time.Second)

	outages := []uint32{failList, failStat, failLoad}
	for _, fail := range outages {
		faulty.fail.Store(fail)
		polls := faulty.lists.Load()
		mustSet(t, a, `{"upstream": "10.0.0.2:5432", "state": "maint"}`)
		eventually(t, 10*time.Second, "five failed polls", func() error {
			if n := faulty.lists.Load() - polls; n < 5 {
				return fmt.Errorf("%d polls", n)
			}
			return nil
		})
		if r, _ := b.snapshot().lookup("db", dial); r.State != opDrain {
			t.Errorf("fail %b: the instance cut off has %s, want the drain it knew", fail, r.State)
		}

		// a write through the instance cut off fails and changes nothing
		faulty.fail.Store(fail | failLock)
		before := b.snapshot()
		_, _, err := b.set(t.Context(), opReq(t, "db", `{"upstream": "10.0.0.9:5432", "state": "maint"}`))
		if want := "storage: locking godist_state_db_10.0.0.9%3A5432: " + errStorageDown.Error(); err == nil || err.Error() != want {
			t.Errorf("fail %b: a write without storage: %v, want %s", fail, err, want)
		}
		if b.snapshot() != before {
			t.Errorf("fail %b: a failed write changed the states in force", fail)
		}

		faulty.fail.Store(0)
		waitState(t, b, dial, opMaint, 2*testPollInterval+5*time.Second)
		mustSet(t, a, `{"upstream": "10.0.0.2:5432", "state": "drain"}`)
		waitState(t, b, dial, opDrain, 2*testPollInterval+5*time.Second)
	}

	// one line when each outage begins (not one per failed poll), and one
	// when it ends
	lines := logs.FilterMessage(failed).All()
	if len(lines) != len(outages) {
		t.Errorf("%d failure lines for %d outages of 5 or more failed polls each, want %d", len(lines), len(outages), len(outages))
	}
	for _, e := range lines {
		if got := e.ContextMap()["error"].(string); !strings.Contains(got, errStorageDown.Error()) {
			t.Errorf("failure line without the storage's error: %s", got)
		}
		if e.ContextMap()["states_kept"] != int64(1) {
			t.Errorf("failure line: %v states kept, want 1", e.ContextMap()["states_kept"])
		}
	}
	if n := logs.FilterMessage("operator states: the storage answers again").Len(); n != len(outages) {
		t.Errorf("%d recovery lines, want %d", n, len(outages))
	}
}

// TestOpStoreWriteFailure fails each step of a write: the write fails
// naming the step, and the state in force does not change.
func TestOpStoreWriteFailure(t *testing.T) {
	dir := t.TempDir()
	faulty := &faultyStorage{FileStorage: &certmagic.FileStorage{Path: dir}}
	s, _ := newTestOpStore(t, "db", faulty)
	mustSet(t, s, `{"upstream": "10.0.0.1:5432", "state": "drain"}`)
	tests := []struct {
		fail uint32
		body string
		want string
	}{
		{failLock, `{"upstream": "10.0.0.1:5432", "state": "maint"}`, "storage: locking godist_state_db_10.0.0.1%3A5432: "},
		{failLoad, `{"upstream": "10.0.0.1:5432", "state": "maint"}`, "storage: reading godist/state/db/10.0.0.1%3A5432.json: "},
		{failStore, `{"upstream": "10.0.0.1:5432", "state": "maint"}`, "storage: writing godist/state/db/10.0.0.1%3A5432.json: "},
		{failDelete, `{"upstream": "10.0.0.1:5432", "state": "ready"}`, "storage: deleting godist/state/db/10.0.0.1%3A5432.json: "},
	}
	for _, tt := range tests {
		t.Run(tt.want, func(t *testing.T) {
			faulty.fail.Store(tt.fail)
			defer faulty.fail.Store(0)
			before := s.snapshot()
			_, _, err := s.set(t.Context(), opReq(t, "db", tt.body))
			if err == nil || err.Error() != tt.want+errStorageDown.Error() {
				t.Fatalf("error %v, want %q", err, tt.want+errStorageDown.Error())
			}
			if s.snapshot() != before {
				t.Errorf("a failed write changed the states in force")
			}
		})
	}
	// the lock was released after each failure: a write now succeeds at once
	start := time.Now()
	mustSet(t, s, `{"upstream": "10.0.0.1:5432", "state": "maint"}`)
	if took := time.Since(start); took > 900*time.Millisecond {
		t.Errorf("a write after failed ones took %s: a lock left behind?", took)
	}
}

// TestOpStoreConcurrentWrites writes one upstream's state from two
// instances at once: the storage's lock orders the writes, every version
// is distinct, and both instances end with what the storage holds, the
// write of the highest version.
func TestOpStoreConcurrentWrites(t *testing.T) {
	dir := t.TempDir()
	a, _ := newTestOpStore(t, "db", &certmagic.FileStorage{Path: dir})
	b, _ := newTestOpStore(t, "db", &certmagic.FileStorage{Path: dir})
	const writes = 3 // a contended file lock is retried every second
	var mu sync.Mutex
	var all []opRecord
	var wg sync.WaitGroup
	for i, s := range []*opStore{a, b} {
		for j := range writes {
			wg.Go(func() {
				body := fmt.Sprintf(`{"upstream": "10.0.0.1:5432", "state": "ready", "weight": %g}`, float64(1+i*writes+j)/10)
				_, after, err := s.set(t.Context(), opReq(t, "db", body))
				if err != nil {
					t.Errorf("write %s: %v", body, err)
					return
				}
				mu.Lock()
				all = append(all, after)
				mu.Unlock()
			})
		}
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	versions := map[uint64]bool{}
	last := all[0]
	for _, r := range all {
		if versions[r.Version] {
			t.Errorf("version %d taken by two writes", r.Version)
		}
		versions[r.Version] = true
		if r.Version > last.Version {
			last = r
		}
	}
	stored, err := a.current().stor.Load(t.Context(), opStateKey("db", "10.0.0.1:5432"))
	if err != nil {
		t.Fatal(err)
	}
	var inStorage opRecord
	if err := json.Unmarshal(stored, &inStorage); err != nil {
		t.Fatal(err)
	}
	if !inStorage.sameAs(last) {
		t.Errorf("the storage holds %+v, want the highest version's write %+v", inStorage, last)
	}
	for name, s := range map[string]*opStore{"a": a, "b": b} {
		eventually(t, 5*time.Second, "instance "+name+" agrees with the storage", func() error {
			if r, _ := s.snapshot().lookup("db", "10.0.0.1:5432"); !r.sameAs(inStorage) {
				return fmt.Errorf("has %+v", r)
			}
			return nil
		})
	}
}

// TestOpStoreIgnoresBadRecords puts files in the state folder that are not
// records of its name: each is ignored and logged once, with what is wrong
// with it, and a record that goes bad keeps its last good state.
func TestOpStoreIgnoresBadRecords(t *testing.T) {
	dir := t.TempDir()
	core, logs := observer.New(zapcore.InfoLevel)
	s := newOpStore("db", &opHolder{stor: &certmagic.FileStorage{Path: dir}, logger: zap.New(core), interval: time.Hour})
	good := mustSet(t, s, `{"upstream": "10.0.0.1:5432", "state": "drain"}`)
	folder := filepath.Join(dir, "godist", "state", "db")
	write := func(name, content string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(folder, name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("10.0.0.2%3A5432.json", `{"handler": "db", "upstream": "10.0.0.2:5432", "state": "maint", "future_field": 1}`) // good
	write("10.0.0.3%3A5432.json", `not json`)
	write("10.0.0.4%3A5432.json", `{"handler": "cache", "upstream": "10.0.0.4:5432", "state": "maint"}`)
	write("10.0.0.5%3A5432.json", `{"handler": "db", "upstream": "10.0.0.6:5432", "state": "maint"}`)
	write("10.0.0.7%3A5432.json", `{"handler": "db", "upstream": "10.0.0.7:5432", "state": "maint", "weight": 1000}`)
	write("10.0.0.8%3A5432.json", `{"handler": "db", "upstream": "10.0.0.8:5432", "state": "drained"}`)
	write("10.0.0.9%3A5432.json", strings.Repeat(" ", maxOpRecordSize+1)+`{}`)
	write("123456789", `{"handler": "db", "upstream": "10.0.0.10:5432", "state": "maint"}`) // a write in progress
	if err := os.Mkdir(filepath.Join(folder, "sub.json"), 0o700); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if err := s.poll(t.Context()); err != nil {
			t.Fatalf("poll: %v", err)
		}
	}
	const ignored = "operator states: ignoring a record that cannot be used; the last good one stays"
	wantErrors := map[string]string{
		"godist/state/db/10.0.0.3%3A5432.json": "decoding: invalid character",
		"godist/state/db/10.0.0.4%3A5432.json": `handler "cache": the record is kept under handler "db"`,
		"godist/state/db/10.0.0.5%3A5432.json": `upstream "10.0.0.6:5432": the record of that upstream is kept under godist/state/db/10.0.0.6%3A5432.json`,
		"godist/state/db/10.0.0.7%3A5432.json": "weight 1000: must be from 0.01 to 100",
		"godist/state/db/10.0.0.8%3A5432.json": `decoding: state "drained": must be ready, drain or maint`,
	}
	// written just now, they are read by every poll within opMtimeSlack,
	// and logged only once
	got := map[string]string{}
	for _, e := range logs.FilterMessage(ignored).All() {
		key := e.ContextMap()["storage_key"].(string)
		if _, dup := got[key]; dup {
			t.Errorf("%s logged twice", key)
		}
		got[key] = e.ContextMap()["error"].(string)
	}
	for key, want := range wantErrors {
		if !strings.Contains(got[key], want) {
			t.Errorf("%s: logged %q, want %q", key, got[key], want)
		}
	}
	if len(got) != len(wantErrors) {
		t.Errorf("logged %d bad records, want %d: %v", len(got), len(wantErrors), got)
	}
	if n := logs.FilterMessage("operator states: ignoring a record larger than a record can be").Len(); n != 1 {
		t.Errorf("the oversized record logged %d times, want 1", n)
	}

	write("10.0.0.1%3A5432.json", `{"handler": "db", "upstream": "10.0.0.1:5432", "state": "paused"}`)
	if err := s.poll(t.Context()); err != nil {
		t.Fatalf("poll: %v", err)
	}
	snap := s.snapshot()
	if snap.len() != 2 {
		t.Errorf("%d states in force, want the 2 good ones: %+v", snap.len(), snap.list())
	}
	if r, _ := snap.lookup("db", "10.0.0.1:5432"); !r.sameAs(good) {
		t.Errorf("the record that went bad: %+v, want its last good state %+v", r, good)
	}
	if r, _ := snap.lookup("db", "10.0.0.2:5432"); r.State != opMaint {
		t.Errorf("a good record written by hand, with a field of a later version: %s, want maint", r.State)
	}
}

// TestOpStoreCoarseModifiedTime rewrites a record with one of the same
// size and modified time, as a file system with coarse times can show: the
// change is still read, by the poll that reads every record.
func TestOpStoreCoarseModifiedTime(t *testing.T) {
	dir := t.TempDir()
	s := newOpStore("db", &opHolder{stor: &certmagic.FileStorage{Path: dir}, logger: zap.NewNop(), interval: time.Hour})
	file := filepath.Join(dir, "godist", "state", "db", "10.0.0.1%3A5432.json")
	old := time.Now().Add(-time.Hour)
	write := func(state string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(file), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(file, []byte(`{"handler": "db", "upstream": "10.0.0.1:5432", "state": "`+state+`"}`), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(file, old, old); err != nil {
			t.Fatal(err)
		}
	}
	write("drain")
	if err := s.poll(t.Context()); err != nil {
		t.Fatal(err)
	}
	write("maint") // same size, same modified time
	polls := 0
	for ; polls <= opFullRefresh; polls++ {
		if r, _ := s.snapshot().lookup("db", "10.0.0.1:5432"); r.State == opMaint {
			break
		}
		if err := s.poll(t.Context()); err != nil {
			t.Fatal(err)
		}
	}
	if r, _ := s.snapshot().lookup("db", "10.0.0.1:5432"); r.State != opMaint {
		t.Fatalf("after %d polls the record is %s, want maint", polls, r.State)
	}
	if polls < 2 {
		t.Errorf("the unchanged-looking record was read back after %d polls: Stat skips nothing?", polls)
	}
}

// blockingListStorage lists, then waits for release before it answers
// with what it listed: a poll whose listing is older than a local write.
type blockingListStorage struct {
	*certmagic.FileStorage
	block   atomic.Bool
	listed  chan struct{}
	release chan struct{}
}

func (b *blockingListStorage) List(ctx context.Context, prefix string, recursive bool) ([]string, error) {
	keys, err := b.FileStorage.List(ctx, prefix, recursive)
	if b.block.Load() {
		b.listed <- struct{}{}
		<-b.release
	}
	return keys, err
}

// TestOpStoreLocalWriteRacesPoll makes a poll list the storage, then lets
// a local write through before the poll publishes: the write stays in
// force, though the poll's listing predates it.
func TestOpStoreLocalWriteRacesPoll(t *testing.T) {
	stor := &blockingListStorage{FileStorage: &certmagic.FileStorage{Path: t.TempDir()}, listed: make(chan struct{}), release: make(chan struct{})}
	s := newOpStore("db", &opHolder{stor: stor, logger: zap.NewNop(), interval: time.Hour})
	stor.block.Store(true)
	done := make(chan error, 1)
	go func() { done <- s.poll(context.Background()) }()
	<-stor.listed
	stor.block.Store(false)
	mustSet(t, s, `{"upstream": "10.0.0.1:5432", "state": "drain"}`)
	close(stor.release)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if r, _ := s.snapshot().lookup("db", "10.0.0.1:5432"); r.State != opDrain {
		t.Fatalf("a poll that listed before a local write undid it: %s", r.State)
	}
	// the next poll reads the write back, and forgets it was local
	if err := s.poll(t.Context()); err != nil {
		t.Fatal(err)
	}
	if r, _ := s.snapshot().lookup("db", "10.0.0.1:5432"); r.State != opDrain {
		t.Errorf("after the next poll: %s", r.State)
	}
	if n := len(s.writes); n != 0 {
		t.Errorf("%d local writes still pending after a poll read them back", n)
	}
}

// TestOpSnapshotChanged checks that each published snapshot says when it
// is replaced, and that the deadline helper finds the next drain to close.
func TestOpSnapshotChanged(t *testing.T) {
	s := newOpStore("db", &opHolder{stor: &certmagic.FileStorage{Path: t.TempDir()}, logger: zap.NewNop(), interval: time.Hour})
	first := s.snapshot()
	select {
	case <-first.changed():
		t.Fatal("the first snapshot is already replaced")
	default:
	}
	rec := mustSet(t, s, `{"upstream": "10.0.0.1:5432", "state": "drain", "deadline": "10m"}`)
	mustSet(t, s, `{"upstream": "10.0.0.2:5432", "state": "drain", "deadline": "1m"}`)
	select {
	case <-first.changed():
	default:
		t.Fatal("a write did not replace the snapshot")
	}
	now := rec.SetAt
	got := s.snapshot().nextDeadline(now)
	if want := s.snapshot().records["10.0.0.2:5432"].Deadline; !got.Equal(want) {
		t.Errorf("next deadline %s, want %s", got, want)
	}
	if got := s.snapshot().nextDeadline(now.Add(time.Hour)); !got.IsZero() {
		t.Errorf("next deadline after every deadline: %s, want none", got)
	}
}

// TestAcquireOpStore acquires one name's store for two configs, as a
// reload does: they share it, it polls no more often than one would, it
// outlives the first config, and its goroutine ends with the second.
func TestAcquireOpStore(t *testing.T) {
	baseline := runtime.NumGoroutine()
	dir := t.TempDir()
	stor := &faultyStorage{FileStorage: &certmagic.FileStorage{Path: dir}}
	ctx1, cancel1 := caddy.NewContext(caddy.Context{Context: context.Background()})
	ctx2, cancel2 := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel1()
	defer cancel2()

	s1, err := acquireOpStore(ctx1, stor, "db", testPollInterval)
	if err != nil {
		t.Fatal(err)
	}
	s2, err := acquireOpStore(ctx2, stor, "db", testPollInterval)
	if err != nil {
		t.Fatal(err)
	}
	if s1 != s2 {
		t.Fatal("two configs with the same storage and name got two stores")
	}

	// two holders, one poller: over a second, no more polls than one
	// poller makes (fewer on a busy machine, never more)
	lists := stor.lists.Load()
	time.Sleep(time.Second)
	if n, most := stor.lists.Load()-lists, int64(time.Second/testPollInterval+1); n > most {
		t.Errorf("%d listings in a second by one store polling every %s for two configs: want at most %d", n, testPollInterval, most)
	}
	other, err := acquireOpStore(ctx2, stor, "cache", testPollInterval)
	if err != nil {
		t.Fatal(err)
	}
	if other == s1 {
		t.Fatal("two names share a store")
	}

	// the first config goes: the store lives on, and keeps reading
	cancel1()
	a, _ := newTestOpStore(t, "db", &certmagic.FileStorage{Path: dir})
	mustSet(t, a, `{"upstream": "10.0.0.1:5432", "state": "drain"}`)
	waitState(t, s2, "10.0.0.1:5432", opDrain, 5*time.Second)
	a.stop()

	// the second goes: the store stops, and every goroutine with it
	cancel2()
	for _, s := range []*opStore{s2, other} {
		select {
		case <-s.done:
		case <-time.After(10 * time.Second):
			t.Fatal("a store still polls after its last config ended")
		}
	}
	lists = stor.lists.Load()
	time.Sleep(3 * testPollInterval)
	if n := stor.lists.Load() - lists; n != 0 {
		t.Errorf("%d listings after the last config ended", n)
	}
	// a's write took a file lock, whose keeper ends within 5s of its unlock
	eventually(t, 15*time.Second, "goroutines back to their number before", func() error {
		if n := runtime.NumGoroutine(); n > baseline {
			return fmt.Errorf("%d goroutines, %d before", n, baseline)
		}
		return nil
	})
	// acquired again, the store starts over from the storage
	ctx3, cancel3 := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel3()
	s3, err := acquireOpStore(ctx3, stor, "db", testPollInterval)
	if err != nil {
		t.Fatal(err)
	}
	if s3 == s2 {
		t.Fatal("a store came back after its last config ended")
	}
	if r, _ := s3.snapshot().lookup("db", "10.0.0.1:5432"); r.State != opDrain {
		t.Errorf("a new store: %s, want the drain the storage holds", r.State)
	}
}

func TestStorageIdentity(t *testing.T) {
	a := storageIdentity(&certmagic.FileStorage{Path: "/var/lib/caddy"})
	if b := storageIdentity(&certmagic.FileStorage{Path: "/var/lib/caddy"}); a != b {
		t.Error("two file storages of one folder have different identities")
	}
	if b := storageIdentity(&certmagic.FileStorage{Path: "/srv/caddy"}); a == b {
		t.Error("two folders have one identity")
	}
	if b := storageIdentity(&faultyStorage{FileStorage: &certmagic.FileStorage{Path: "/var/lib/caddy"}}); a == b {
		t.Error("two storage types have one identity")
	}
	// a storage without a description is told by its configuration
	type remote struct {
		certmagic.Storage `json:"-"`
		Address           string `json:"address"`
		Password          string `json:"password"`
	}
	r1 := storageIdentity(&remote{Address: "redis:6379", Password: "s3cret"})
	if r2 := storageIdentity(&remote{Address: "redis:6379", Password: "s3cret"}); r1 != r2 {
		t.Error("two equal configurations have different identities")
	}
	if r2 := storageIdentity(&remote{Address: "redis2:6379"}); r1 == r2 {
		t.Error("two configurations have one identity")
	}
	if strings.Contains(r1, "s3cret") {
		t.Error("the identity holds the storage's password")
	}
}

// TestOpStoreStartWithoutStorage starts an instance whose storage does not
// answer: it starts with every upstream ready, says so once, and picks up
// the states when the storage answers.
func TestOpStoreStartWithoutStorage(t *testing.T) {
	dir := t.TempDir()
	a, _ := newTestOpStore(t, "db", &certmagic.FileStorage{Path: dir})
	mustSet(t, a, `{"upstream": "10.0.0.1:5432", "state": "drain"}`)
	faulty := &faultyStorage{FileStorage: &certmagic.FileStorage{Path: dir}}
	faulty.fail.Store(failList)
	b, logs := newTestOpStore(t, "db", faulty)
	if n := b.snapshot().len(); n != 0 {
		t.Fatalf("%d states read from a storage that does not answer", n)
	}
	eventually(t, 10*time.Second, "five failed polls", func() error {
		if n := faulty.lists.Load(); n < 6 {
			return fmt.Errorf("%d polls", n)
		}
		return nil
	})
	if n := logs.FilterMessage("operator states: the storage did not answer the first read; every upstream of this handler name is ready until it does").Len(); n != 1 {
		t.Errorf("%d lines on the failed first read, want 1", n)
	}
	if n := logs.FilterMessage("operator states: reading the storage failed; the last known states stay in force").Len(); n != 0 {
		t.Errorf("%d more lines for the same outage, want none within a minute", n)
	}
	faulty.fail.Store(0)
	waitState(t, b, "10.0.0.1:5432", opDrain, 2*testPollInterval+5*time.Second)
	eventually(t, 5*time.Second, "the recovery logged", func() error {
		if logs.FilterMessage("operator states: the storage answers again").Len() != 1 {
			return errors.New("not yet")
		}
		return nil
	})
}

// TestOpStoreSetAnswersWhatStorageHeld sets a state through an instance
// that has not yet read the storage's latest: the answer's previous state
// is the storage's, which the write followed; the log says what changed
// here.
func TestOpStoreSetAnswersWhatStorageHeld(t *testing.T) {
	dir := t.TempDir()
	a, _ := newTestOpStore(t, "db", &certmagic.FileStorage{Path: dir})
	core, logs := observer.New(zapcore.InfoLevel)
	b := newOpStore("db", &opHolder{stor: &certmagic.FileStorage{Path: dir}, logger: zap.New(core), interval: time.Hour})
	drained := mustSet(t, a, `{"upstream": "10.0.0.1:5432", "state": "drain"}`)
	before, after, err := b.set(t.Context(), opReq(t, "db", `{"upstream": "10.0.0.1:5432", "state": "maint"}`))
	if err != nil {
		t.Fatal(err)
	}
	if !before.sameAs(drained) {
		t.Errorf("previous %+v, want the drain the storage held %+v", before, drained)
	}
	if after.Version <= drained.Version {
		t.Errorf("version %d after %d", after.Version, drained.Version)
	}
	lines := logs.FilterMessage("operator state changed").All()
	if len(lines) != 1 || lines[0].ContextMap()["old_state"] != "ready" || lines[0].ContextMap()["new_state"] != "maint" {
		t.Errorf("logged %v, want one change here from ready to maint", lines)
	}
}
