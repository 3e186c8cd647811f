// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"path"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// This file keeps the operator states of upstreams: drain, maint and
// weight overrides, set through the admin API, kept in Caddy's configured
// storage so that they survive reloads and restarts, and shared by every
// Caddy instance that uses the same storage.
//
// A state belongs to a handler name (see handlername.go) and an upstream
// dial address. The storage holds one record per exception, under
//
//	godist/state/<handler name>/<escaped dial address>.json
//
// and nothing for an upstream that is ready at its full weight: the
// storage lists exactly what an operator changed. The storage is the truth:
// every instance polls it, and what it holds is what every instance does.

// opState is what an operator asked of an upstream.
type opState uint8

const (
	// opReady: normal; the upstream takes new connections.
	opReady opState = iota
	// opDrain: no new connections (their keys go to their next choice);
	// the connections open to it keep flowing, until the drain's deadline
	// if it has one.
	opDrain
	// opMaint: no new connections, no health checks counted against it,
	// and its open connections closed unless the operator kept them.
	opMaint
)

var opStateNames = [...]string{opReady: "ready", opDrain: "drain", opMaint: "maint"}

func (s opState) String() string {
	if int(s) < len(opStateNames) {
		return opStateNames[s]
	}
	return "opState(" + strconv.Itoa(int(s)) + ")"
}

// parseOpState returns the state a name stands for.
func parseOpState(name string) (opState, bool) {
	i := slices.Index(opStateNames[:], name)
	return opState(max(i, 0)), i >= 0
}

// MarshalText implements encoding.TextMarshaler.
func (s opState) MarshalText() ([]byte, error) {
	if int(s) >= len(opStateNames) {
		return nil, fmt.Errorf("no operator state %d", s)
	}
	return []byte(s.String()), nil
}

// UnmarshalText implements encoding.TextUnmarshaler.
func (s *opState) UnmarshalText(b []byte) error {
	v, ok := parseOpState(string(b))
	if !ok {
		return fmt.Errorf("state %q: must be ready, drain or maint", b)
	}
	*s = v
	return nil
}

// Bounds and defaults of the operator states.
const (
	// The weight factor an operator may set, as a multiple of the
	// upstream's configured weight. Below 1% an upstream takes so few keys
	// that drain says it better; above 100× one upstream takes nearly every
	// key of a pool of any size, which weight in the config says better.
	minOpWeight = 0.01
	maxOpWeight = 100

	// The longest drain deadline: a drain meant to last longer is a
	// maintenance.
	maxDrainDeadline = 7 * 24 * time.Hour

	// The longest reason an operator may give, in bytes.
	maxOpReason = 256

	// How often each instance reads the states from the storage, unless
	// the handler's state_poll_interval says otherwise, and the shortest
	// interval it may say.
	defaultStatePollInterval = 2 * time.Second
	minStatePollInterval     = 100 * time.Millisecond

	// The most records of one handler name that a poll reads: far more
	// than the upstreams a handler has, so that a storage filled by
	// mistake costs each poll a bounded amount of work. The records past
	// it (in key order) are ignored, and that is logged.
	maxOpRecords = 10_000

	// The largest record a poll loads; a record is about 300 bytes.
	maxOpRecordSize = 4 << 10

	// How long one poll, or one write with its lock, may take in all, and
	// how long the first load of a store may hold up a config's
	// provisioning.
	opStorageTimeout = 10 * time.Second
	opStartTimeout   = 5 * time.Second

	// Every opFullRefresh-th poll loads every record, whatever its modified
	// time and size say, and a record modified within opMtimeSlack of a poll
	// is always loaded: a storage whose modified times are coarse (one or
	// two seconds on some file systems) could otherwise hide a change that
	// kept the record's size.
	opFullRefresh = 30
	opMtimeSlack  = 2 * time.Second

	// How long stopping a store waits for a poll in flight.
	opStopWait = 5 * time.Second

	// While the storage fails, a failed poll is logged at most this often
	// (the first of an outage always is), and records that cannot be used
	// at most opBadRecordLogs times a minute, each once when it is new and
	// again at each poll that reads every record.
	opFailLogEvery  = time.Minute
	opBadRecordLogs = 10
)

// opRecord is the operator state of one upstream of one handler name: what
// the storage holds as JSON, and what the admin API shows.
type opRecord struct {
	Handler  string  `json:"handler"`
	Upstream string  `json:"upstream"`
	State    opState `json:"state"`

	// Weight multiplies the upstream's configured weight while it is
	// ready; 0 means no override (a factor of 1).
	Weight float64 `json:"weight,omitempty"`

	// Deadline, for a drain: when the connections still open to the
	// upstream are closed. Absolute, so that every instance closes them at
	// the same moment and a restart does not start the wait over. Zero
	// means they may flow until they end.
	Deadline time.Time `json:"deadline,omitzero"`

	// KeepConnections, for a maint: leave the connections open to it
	// flowing instead of closing them.
	KeepConnections bool `json:"keep_connections,omitempty"`

	Reason string `json:"reason,omitempty"` // the operator's words, if any

	// Who set it and when: the host name and process of the Caddy
	// instance whose admin API took the change.
	SetAt     time.Time `json:"set_at,omitzero"`
	SetByHost string    `json:"set_by_host,omitempty"`
	SetByPID  int       `json:"set_by_pid,omitempty"`

	// Version orders the writes of one record: each write, made under
	// the storage's lock for the record, takes a version above the one
	// before it and at least the time in Unix milliseconds, so that a
	// record deleted (made ready) and set again still moves forward.
	Version uint64 `json:"version,omitempty"`
}

// readyRecord is the state of an upstream no operator changed.
func readyRecord(handler, upstream string) opRecord {
	return opRecord{Handler: handler, Upstream: upstream, State: opReady}
}

// isDefault reports whether r is ready at the full weight: what no record
// in the storage means.
func (r opRecord) isDefault() bool {
	return r.State == opReady && r.Weight == 0
}

// weightFactor returns what the upstream's configured weight is multiplied
// by while it is ready.
func (r opRecord) weightFactor() float64 {
	if r.Weight == 0 {
		return 1
	}
	return r.Weight
}

// takesNew reports whether the upstream may be offered new connections.
func (r opRecord) takesNew() bool {
	return r.State == opReady
}

// closesOpen reports whether the connections open to the upstream are to
// be closed at now: in maint unless kept, and in a drain past its deadline.
func (r opRecord) closesOpen(now time.Time) bool {
	switch r.State {
	case opMaint:
		return !r.KeepConnections
	case opDrain:
		return !r.Deadline.IsZero() && !now.Before(r.Deadline)
	case opReady:
	}
	return false
}

// sameAs reports whether r and o hold the same state, set by the same
// write.
func (r opRecord) sameAs(o opRecord) bool {
	return r.Handler == o.Handler && r.Upstream == o.Upstream && r.State == o.State &&
		r.Weight == o.Weight && r.Deadline.Equal(o.Deadline) && r.KeepConnections == o.KeepConnections &&
		r.Reason == o.Reason && r.SetAt.Equal(o.SetAt) && r.SetByHost == o.SetByHost &&
		r.SetByPID == o.SetByPID && r.Version == o.Version
}

// logFields describes r for a log line, each field prefixed.
func (r opRecord) logFields(prefix string) []zap.Field {
	fields := []zap.Field{zap.Stringer(prefix+"state", r.State), zap.Float64(prefix+"weight", r.weightFactor())}
	if !r.Deadline.IsZero() {
		fields = append(fields, zap.Time(prefix+"deadline", r.Deadline))
	}
	if r.State == opMaint {
		fields = append(fields, zap.Bool(prefix+"keep_connections", r.KeepConnections))
	}
	return fields
}

// check tells whether r, loaded from key, is a record that key may hold.
func (r opRecord) check(handler, key string) error {
	switch {
	case r.Handler != handler:
		return fmt.Errorf("handler %q: the record is kept under handler %q", r.Handler, handler)
	case opStateKey(handler, r.Upstream) != key:
		return fmt.Errorf("upstream %q: the record of that upstream is kept under %s", r.Upstream, opStateKey(handler, r.Upstream))
	case int(r.State) >= len(opStateNames):
		return fmt.Errorf("state %d: unknown", r.State)
	case r.Weight != 0 && (r.Weight < minOpWeight || r.Weight > maxOpWeight):
		return fmt.Errorf("weight %g: must be from %g to %g", r.Weight, float64(minOpWeight), float64(maxOpWeight))
	}
	return nil
}

// decodeOpRecord reads a record that key holds. Fields it does not know
// are ignored, so that a later version may add some.
func decodeOpRecord(b []byte, handler, key string) (opRecord, error) {
	var r opRecord
	if err := json.Unmarshal(b, &r); err != nil {
		return r, fmt.Errorf("decoding: %w", err)
	}
	return r, r.check(handler, key)
}

// opStatePrefix is the storage folder of a handler name's records.
func opStatePrefix(handler string) string {
	return path.Join("godist", "state", escapeKeySegment(handler))
}

// opStateKey is the storage key of an upstream's record.
func opStateKey(handler, upstream string) string {
	return path.Join(opStatePrefix(handler), escapeKeySegment(upstream)+".json")
}

// opLockName is the storage lock taken to write an upstream's record.
// A storage may simplify lock names (the file system's lowercases them and
// drops the '%' of escapes): two records sharing a lock only wait for each
// other.
func opLockName(handler, upstream string) string {
	return "godist_state_" + escapeKeySegment(handler) + "_" + escapeKeySegment(upstream)
}

// escapeKeySegment makes s one segment of a storage key that every storage
// takes, a file name on any file system included: letters, digits, '-',
// '.' and '_' stay, every other byte becomes %XX (so "10.0.0.1:5432"
// becomes "10.0.0.1%3A5432", and a unix socket's slashes cannot make
// folders). A leading '.' is escaped too, so that no segment is "." or
// "..", or hidden.
func escapeKeySegment(s string) string {
	const hexDigits = "0123456789ABCDEF"
	var b strings.Builder
	b.Grow(len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		if 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_' || c == '.' && i > 0 {
			b.WriteByte(c)
			continue
		}
		b.WriteByte('%')
		b.WriteByte(hexDigits[c>>4])
		b.WriteByte(hexDigits[c&15])
	}
	return b.String()
}

// opSnapshot is the operator states of one handler name at one moment. It
// is immutable once published: the routing path reads it through
// opStore.snapshot without a lock.
type opSnapshot struct {
	records map[string]opRecord // by dial address; ready at full weight is absent
	digest  string              // what the info metric reports; opDigestNone when empty

	// superseded is closed when a newer snapshot is published, so that a
	// watcher can wait for the next change.
	superseded chan struct{}

	// returned holds when each upstream came back from drain or maint to
	// ready, as this process saw it, within the longest slow start: where
	// its ramp begins. Carried from snapshot to snapshot by the store.
	returned map[string]time.Time
}

// opDigestNone is the digest of a snapshot without records.
const opDigestNone = "none"

func newOpSnapshot(records map[string]opRecord) *opSnapshot {
	return &opSnapshot{records: records, digest: opDigest(records), superseded: make(chan struct{})}
}

// lookup returns the state of the upstream dialled at dial, and whether an
// operator changed it; ready at full weight if not.
func (s *opSnapshot) lookup(handler, dial string) (opRecord, bool) {
	if r, ok := s.records[dial]; ok {
		return r, true
	}
	return readyRecord(handler, dial), false
}

// returnedAt returns when the upstream dialled at dial came back from
// drain or maint, zero if it did not within the longest slow start.
func (s *opSnapshot) returnedAt(dial string) time.Time {
	return s.returned[dial]
}

// carryReturns returns the returned times of the snapshot that follows
// old after changes at now: old's, but for those older than the longest
// slow start, and now for each upstream that changes from taking no new
// connections to taking them.
func carryReturns(old *opSnapshot, changes []opChange, now time.Time) map[string]time.Time {
	var out map[string]time.Time
	for dial, t := range old.returned {
		if now.Sub(t) < maxSlowStart {
			if out == nil {
				out = make(map[string]time.Time)
			}
			out[dial] = t
		}
	}
	for _, c := range changes {
		if !c.Old.takesNew() && c.New.takesNew() {
			if out == nil {
				out = make(map[string]time.Time)
			}
			out[c.New.Upstream] = now
		}
	}
	return out
}

// len returns the number of upstreams whose state an operator changed.
func (s *opSnapshot) len() int { return len(s.records) }

// list returns the records, by dial address.
func (s *opSnapshot) list() []opRecord {
	out := slices.Collect(maps.Values(s.records))
	slices.SortFunc(out, func(a, b opRecord) int { return strings.Compare(a.Upstream, b.Upstream) })
	return out
}

// changed returns a channel closed when a newer snapshot replaces s.
func (s *opSnapshot) changed() <-chan struct{} { return s.superseded }

// nextDeadline returns the earliest drain deadline after now, zero if none:
// when the handler must next close connections that a drain left open.
func (s *opSnapshot) nextDeadline(now time.Time) time.Time {
	var next time.Time
	for _, r := range s.records {
		if r.State == opDrain && r.Deadline.After(now) && (next.IsZero() || r.Deadline.Before(next)) {
			next = r.Deadline
		}
	}
	return next
}

// opDigest digests what of the records decides where a new connection
// goes (each upstream's state and weight factor), so that instances whose
// operator states disagree can be told apart on a dashboard. Deadlines,
// reasons and who set what do not count.
func opDigest(records map[string]opRecord) string {
	if len(records) == 0 {
		return opDigestNone
	}
	lines := make([]string, 0, len(records))
	for dial, r := range records {
		lines = append(lines, strconv.Quote(dial)+" "+r.State.String()+" "+strconv.FormatFloat(r.weightFactor(), 'g', -1, 64))
	}
	slices.Sort(lines)
	return digest16(strings.Join(lines, "\n") + "\n")
}

// opChange is an upstream's state before and after a change.
type opChange struct {
	Old, New opRecord
}

// diffOpSnapshots returns the upstreams whose record differs between two
// sets of records, by dial address.
func diffOpSnapshots(handler string, before, after map[string]opRecord) []opChange {
	var out []opChange
	for dial, a := range after {
		b, ok := before[dial]
		if !ok {
			b = readyRecord(handler, dial)
		}
		if !ok || !a.sameAs(b) {
			out = append(out, opChange{Old: b, New: a})
		}
	}
	for dial, b := range before {
		if _, ok := after[dial]; !ok {
			out = append(out, opChange{Old: b, New: readyRecord(handler, dial)})
		}
	}
	slices.SortFunc(out, func(a, b opChange) int { return strings.Compare(a.New.Upstream, b.New.Upstream) })
	return out
}

// opStore keeps the operator states of one handler name in one storage,
// for every handler of that name in this process, across config reloads.
//
// Who does what, and in what order:
//
//   - snap is the published snapshot. It is replaced (never changed) under
//     mu, by the poller and by local writes, and read anywhere without a
//     lock. Each replacement closes the old snapshot's superseded channel.
//   - The poller is one goroutine (run), started by start and ended by
//     stop; pollMu keeps a poll called directly (the first, in start, and
//     tests) from overlapping it. It reads the storage without holding mu,
//     then publishes under mu what it read. seen is its own.
//   - A local write (set) holds writeMu from start to end, so that this
//     process's writes reach the storage in the order they are applied; it
//     takes the storage's lock for the record, writes, and only then, under
//     mu, applies the record to a new snapshot and notes the write's
//     generation in writes. A poll that began before a local write was
//     applied (its generation is below the write's) keeps the local record
//     for that upstream instead of what it read, which may predate the
//     write; the next poll reads the write back.
//   - Lock order: writeMu, then mu. mu is never held across storage I/O.
//   - holders are the configs using the store (newest last); the newest
//     decides the storage, logger and interval (holdersMu).
type opStore struct {
	name   string
	prefix string
	host   string
	pid    int

	snap atomic.Pointer[opSnapshot]

	holdersMu sync.Mutex
	holders   []*opHolder
	last      *opHolder // the newest holder, kept when the last one leaves

	writeMu sync.Mutex
	pollMu  sync.Mutex

	mu          sync.Mutex
	gen         uint64            // generation of the last local write
	writes      map[string]uint64 // dial -> generation of its last local write not yet read back
	lastVersion map[string]uint64 // dial -> highest version known, deleted records too
	failing     bool
	failSince   time.Time
	failedPolls int
	failLogged  time.Time // when a failed poll was last logged

	seen  map[string]opSeen // storage key -> what the last poll found (poller only)
	polls uint64            // polls made (poller only)

	errLog *logLimiter // records that cannot be used: a few lines a minute at most

	cancel context.CancelFunc
	done   chan struct{}
}

// opHolder is a config that uses a store: its storage, logger and poll
// interval.
type opHolder struct {
	stor     certmagic.Storage
	logger   *zap.Logger
	interval time.Duration
}

// opSeen is what a poll found under a storage key.
type opSeen struct {
	modified time.Time
	size     int64
	rec      opRecord
	ok       bool // rec is a valid record; false for one that was not
}

// newOpStore returns a store of the states of handler name in the
// holder's storage. It reads nothing until start.
func newOpStore(name string, h *opHolder) *opStore {
	host, pid := instanceIdentity()
	s := &opStore{
		name:        name,
		prefix:      opStatePrefix(name),
		host:        host,
		pid:         pid,
		holders:     []*opHolder{h},
		last:        h,
		writes:      make(map[string]uint64),
		lastVersion: make(map[string]uint64),
		seen:        make(map[string]opSeen),
		errLog:      &logLimiter{interval: time.Minute, burst: opBadRecordLogs},
		done:        make(chan struct{}),
	}
	s.snap.Store(newOpSnapshot(nil))
	return s
}

// instanceIdentity returns this process's host name and process ID, which
// records name as who set them.
var instanceIdentity = sync.OnceValues(func() (string, int) {
	host, err := os.Hostname()
	if err != nil {
		host = "unknown"
	}
	return host, os.Getpid()
})

// start loads the records once, so that a config starts with the states
// the storage holds (a drained upstream stays drained across a restart),
// then polls the storage in the background until stop.
func (s *opStore) start() {
	ctx, cancel := context.WithCancel(context.Background())
	s.cancel = cancel
	first, cancelFirst := context.WithTimeout(ctx, opStartTimeout)
	if err := s.poll(first); err != nil {
		s.current().logger.Error("operator states: the storage did not answer the first read; every upstream of this handler name is ready until it does",
			zap.String("handler_name", s.name), zap.String("storage_key", s.prefix), zap.Error(err))
		// the outage began: its end is logged, its next failures are not
		now := time.Now()
		s.mu.Lock()
		s.failing, s.failSince, s.failedPolls, s.failLogged = true, now, 1, now
		s.mu.Unlock()
	}
	cancelFirst()
	go s.run(ctx)
}

// stop ends the poller, waiting for a poll in flight for a bounded time:
// a storage that ignores its context can keep that one poll going a while
// longer, but nothing more starts.
func (s *opStore) stop() {
	if s.cancel == nil {
		return
	}
	s.cancel()
	select {
	case <-s.done:
	case <-time.After(opStopWait):
	}
}

// Destruct implements caddy.Destructor: the last config using the store is
// gone.
func (s *opStore) Destruct() error {
	s.stop()
	return nil
}

// run polls the storage every interval until ctx is done.
func (s *opStore) run(ctx context.Context) {
	defer close(s.done)
	for {
		t := time.NewTimer(s.current().interval)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		pctx, cancel := context.WithTimeout(ctx, opStorageTimeout)
		err := s.poll(pctx)
		cancel()
		if ctx.Err() != nil {
			return // stopped mid-poll: nothing failed
		}
		s.noteOutcome(err)
	}
}

// current returns the holder whose storage, logger and interval the store
// uses: the newest config using it.
func (s *opStore) current() *opHolder {
	s.holdersMu.Lock()
	defer s.holdersMu.Unlock()
	if n := len(s.holders); n > 0 {
		return s.holders[n-1]
	}
	return s.last
}

func (s *opStore) addHolder(h *opHolder) {
	s.holdersMu.Lock()
	defer s.holdersMu.Unlock()
	s.holders = append(s.holders, h)
	s.last = h
}

func (s *opStore) removeHolder(h *opHolder) {
	s.holdersMu.Lock()
	defer s.holdersMu.Unlock()
	if i := slices.Index(s.holders, h); i >= 0 {
		s.holders = slices.Delete(s.holders, i, i+1)
	}
	if n := len(s.holders); n > 0 {
		s.last = s.holders[n-1]
	}
}

// snapshot returns the states now in force. It takes no lock.
func (s *opStore) snapshot() *opSnapshot {
	return s.snap.Load()
}

// poll reads the handler name's records from the storage and publishes
// them. A record it cannot read keeps its last known state; a listing that
// fails keeps them all. It returns what failed.
func (s *opStore) poll(ctx context.Context) error {
	s.pollMu.Lock()
	defer s.pollMu.Unlock()
	h := s.current()
	s.mu.Lock()
	startGen := s.gen
	s.mu.Unlock()
	full := s.polls%opFullRefresh == 0
	s.polls++

	keys, err := h.stor.List(ctx, s.prefix, false)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("listing %s: %w", s.prefix, err)
	}
	keys = slices.DeleteFunc(keys, func(k string) bool {
		base := path.Base(k)
		// a write in progress shows as a temporary file beside the record
		return !strings.HasSuffix(base, ".json") || strings.HasPrefix(base, ".")
	})
	slices.Sort(keys)
	if len(keys) > maxOpRecords {
		s.errLog.logAt(h.logger, zapcore.WarnLevel, "operator states: more records than a poll reads; ignoring the rest",
			zap.String("handler_name", s.name), zap.Int("records", len(keys)), zap.Int("read", maxOpRecords))
		keys = keys[:maxOpRecords]
	}

	now := time.Now()
	next := make(map[string]opSeen, len(keys))
	var errs []error
	for _, key := range keys {
		prev, had := s.seen[key]
		keep := func(err error) {
			errs = append(errs, err)
			if had {
				next[key] = prev
			}
		}
		if err := ctx.Err(); err != nil {
			keep(err)
			continue
		}
		info, err := h.stor.Stat(ctx, key)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			continue // deleted since the listing
		case err != nil:
			keep(fmt.Errorf("stat %s: %w", key, err))
			continue
		case !info.IsTerminal:
			continue
		}
		unchanged := had && !full && !info.Modified.IsZero() &&
			info.Size == prev.size && info.Modified.Equal(prev.modified) && now.Sub(info.Modified) > opMtimeSlack
		if unchanged {
			next[key] = prev
			continue
		}
		// a record that cannot be used is logged when it is new, and again
		// by the polls that read every record, not by every poll
		fresh := !had || full || info.Size != prev.size || !info.Modified.Equal(prev.modified)
		if info.Size > maxOpRecordSize {
			if fresh {
				s.errLog.logAt(h.logger, zapcore.ErrorLevel, "operator states: ignoring a record larger than a record can be",
					zap.String("handler_name", s.name), zap.String("storage_key", key), zap.Int64("size", info.Size))
			}
			next[key] = opSeen{modified: info.Modified, size: info.Size}
			continue
		}
		b, err := h.stor.Load(ctx, key)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			continue
		case err != nil:
			keep(fmt.Errorf("loading %s: %w", key, err))
			continue
		}
		rec, err := decodeOpRecord(b, s.name, key)
		if err != nil {
			// Not a record this version can use (edited by hand, say):
			// the last good one stays, as for a storage error.
			if fresh {
				s.errLog.logAt(h.logger, zapcore.ErrorLevel, "operator states: ignoring a record that cannot be used; the last good one stays",
					zap.String("handler_name", s.name), zap.String("storage_key", key), zap.Error(err))
			}
			if had && prev.ok {
				next[key] = opSeen{modified: info.Modified, size: info.Size, rec: prev.rec, ok: true}
			} else {
				next[key] = opSeen{modified: info.Modified, size: info.Size}
			}
			continue
		}
		next[key] = opSeen{modified: info.Modified, size: info.Size, rec: rec, ok: true}
	}
	s.seen = next

	records := make(map[string]opRecord, len(next))
	for _, seen := range next {
		if seen.ok {
			records[seen.rec.Upstream] = seen.rec
		}
	}
	s.publish(h, records, startGen)
	return errors.Join(errs...)
}

// publish makes records, read by a poll that began at local write
// generation startGen, the states in force, and logs what changed.
func (s *opStore) publish(h *opHolder, records map[string]opRecord, startGen uint64) {
	s.mu.Lock()
	old := s.snap.Load()
	for dial, g := range s.writes {
		if g <= startGen {
			delete(s.writes, dial) // the poll read it back
			continue
		}
		// written here after the poll began: what the poll read may be older
		if r, ok := old.records[dial]; ok {
			records[dial] = r
		} else {
			delete(records, dial)
		}
	}
	changes := diffOpSnapshots(s.name, old.records, records)
	if len(changes) > 0 {
		for _, c := range changes {
			s.lastVersion[c.New.Upstream] = max(s.lastVersion[c.New.Upstream], c.Old.Version, c.New.Version)
		}
		next := newOpSnapshot(records)
		next.returned = carryReturns(old, changes, time.Now())
		s.snap.Store(next)
		close(old.superseded)
	}
	s.mu.Unlock()
	for _, c := range changes {
		s.logChange(h.logger, "storage", c)
	}
}

// noteOutcome logs a poll's failure: the first of an outage, then once a
// minute while it lasts; and the first success after failures.
func (s *opStore) noteOutcome(err error) {
	h := s.current()
	now := time.Now()
	s.mu.Lock()
	wasFailing, since, failed := s.failing, s.failSince, s.failedPolls
	logFailure := false
	if err != nil {
		if !s.failing {
			s.failing, s.failSince = true, now
		}
		s.failedPolls++
		since, failed = s.failSince, s.failedPolls
		if !wasFailing || now.Sub(s.failLogged) >= opFailLogEvery {
			logFailure, s.failLogged = true, now
		}
	} else {
		s.failing, s.failedPolls = false, 0
	}
	kept := s.snap.Load().len()
	s.mu.Unlock()

	switch {
	case logFailure:
		h.logger.Error("operator states: reading the storage failed; the last known states stay in force",
			zap.String("handler_name", s.name), zap.Int("states_kept", kept),
			zap.Time("failing_since", since), zap.Int("failed_polls", failed), zap.Error(err))
	case err == nil && wasFailing:
		h.logger.Info("operator states: the storage answers again",
			zap.String("handler_name", s.name), zap.Duration("failed_for", now.Sub(since)), zap.Int("failed_polls", failed))
	}
}

// logChange logs one upstream's change of state, at info.
func (s *opStore) logChange(logger *zap.Logger, source string, c opChange) {
	fields := []zap.Field{
		zap.String("handler_name", s.name),
		zap.String("upstream", c.New.Upstream),
		zap.String("source", source),
	}
	fields = append(fields, c.Old.logFields("old_")...)
	fields = append(fields, c.New.logFields("new_")...)
	if c.New.Version != 0 {
		fields = append(fields, zap.Uint64("version", c.New.Version))
	}
	if c.New.SetByHost != "" {
		fields = append(fields, zap.String("set_by_host", c.New.SetByHost), zap.Int("set_by_pid", c.New.SetByPID))
	}
	if c.New.Reason != "" {
		fields = append(fields, zap.String("reason", c.New.Reason))
	}
	logger.Info("operator state changed", fields...)
}

// set writes an operator's request to the storage and, once the storage
// has it, makes it the state in force here; the other instances read it at
// their next poll. It returns the state before (as the storage held it)
// and after.
//
// If the storage fails, set fails and nothing changes here: a state held by
// one instance only would split the fleet, and would be undone by the
// first poll that reads the storage again. The error names the storage
// step that failed.
func (s *opStore) set(ctx context.Context, req opStateRequest) (before, after opRecord, err error) {
	s.writeMu.Lock()
	defer s.writeMu.Unlock()
	h := s.current()
	ctx, cancel := context.WithTimeout(ctx, opStorageTimeout)
	defer cancel()

	key := opStateKey(s.name, req.Upstream)
	lock := opLockName(s.name, req.Upstream)
	if err := h.stor.Lock(ctx, lock); err != nil {
		return before, after, fmt.Errorf("storage: locking %s: %w", lock, err)
	}
	defer func() {
		// the request's context may be done: unlock on a fresh one
		uctx, ucancel := context.WithTimeout(context.Background(), opStorageTimeout)
		defer ucancel()
		if uerr := h.stor.Unlock(uctx, lock); uerr != nil {
			h.logger.Error("operator states: unlocking the storage", zap.String("lock", lock), zap.Error(uerr))
		}
	}()

	// before is what the storage held, which the write is ordered after;
	// this instance may not have read it yet
	s.mu.Lock()
	prevVersion := s.lastVersion[req.Upstream]
	before, _ = s.snap.Load().lookup(s.name, req.Upstream)
	s.mu.Unlock()
	b, err := h.stor.Load(ctx, key)
	switch {
	case err == nil:
		if stored, derr := decodeOpRecord(b, s.name, key); derr == nil {
			prevVersion = max(prevVersion, stored.Version)
			before = stored
		}
	case errors.Is(err, fs.ErrNotExist):
		before = readyRecord(s.name, req.Upstream)
	default:
		return before, after, fmt.Errorf("storage: reading %s: %w", key, err)
	}

	now := time.Now()
	after = req.record(s.name, now)
	after.SetByHost, after.SetByPID = s.host, s.pid
	after.Version = max(prevVersion+1, uint64(max(now.UnixMilli(), 0)))
	if after.isDefault() {
		if err := h.stor.Delete(ctx, key); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return before, after, fmt.Errorf("storage: deleting %s: %w", key, err)
		}
	} else {
		b, err := json.Marshal(after)
		if err != nil {
			return before, after, fmt.Errorf("encoding the record: %w", err)
		}
		if err := h.stor.Store(ctx, key, b); err != nil {
			return before, after, fmt.Errorf("storage: writing %s: %w", key, err)
		}
	}

	s.mu.Lock()
	old := s.snap.Load()
	inForce, _ := old.lookup(s.name, req.Upstream)
	records := maps.Clone(old.records)
	if records == nil {
		records = make(map[string]opRecord)
	}
	if after.isDefault() {
		delete(records, req.Upstream)
	} else {
		records[req.Upstream] = after
	}
	s.gen++
	s.writes[req.Upstream] = s.gen
	s.lastVersion[req.Upstream] = after.Version
	next := newOpSnapshot(records)
	next.returned = carryReturns(old, []opChange{{Old: inForce, New: after}}, time.Now())
	s.snap.Store(next)
	close(old.superseded)
	s.mu.Unlock()

	s.logChange(h.logger, "local", opChange{Old: inForce, New: after})
	return before, after, nil
}

// opStores holds the stores in use, keyed by storage and handler name, so
// that the handlers of one name share one store, and a config reload hands
// it to the new config: its states are neither lost nor read twice as
// often. Each config holds one reference; the store stops polling when the
// last config using it is unloaded.
var opStores = caddy.NewUsagePool()

// acquireOpStore returns the store of the states of handler name in stor
// (the config's storage, ctx.Storage()), polled every interval. The
// config's reference is dropped when ctx is done: the store ends with the
// last config using it. The newest config using a store decides its
// storage (an equal one, or the store would not be shared), logger and
// interval; when it is unloaded, the next newest does.
func acquireOpStore(ctx caddy.Context, stor certmagic.Storage, name string, interval time.Duration) (*opStore, error) {
	if stor == nil {
		return nil, errors.New("operator states: no storage")
	}
	if interval <= 0 {
		interval = defaultStatePollInterval
	}
	key := storageIdentity(stor) + "\x00" + name
	h := &opHolder{stor: stor, logger: ctx.Logger(), interval: interval}
	v, loaded, err := opStores.LoadOrNew(key, func() (caddy.Destructor, error) {
		s := newOpStore(name, h)
		s.start()
		return s, nil
	})
	if err != nil {
		return nil, err
	}
	s := v.(*opStore)
	if loaded {
		s.addHolder(h)
	}
	context.AfterFunc(ctx, func() {
		s.removeHolder(h)
		_, _ = opStores.Delete(key)
	})
	return s, nil
}

// storageIdentity names a storage so that two configs configuring the same
// storage share their stores: the storage's own description when it has
// one (the file system's is its folder), else its type and exported
// configuration, else the value itself. It is digested, so that a
// storage's credentials never sit in a key.
func storageIdentity(stor certmagic.Storage) string {
	var id string
	switch v := stor.(type) {
	case fmt.Stringer:
		id = fmt.Sprintf("%T %s", stor, v.String())
	default:
		if b, err := json.Marshal(stor); err == nil {
			id = fmt.Sprintf("%T %s", stor, b)
		} else {
			id = fmt.Sprintf("%T %p", stor, stor)
		}
	}
	sum := sha256.Sum256([]byte(id))
	return hex.EncodeToString(sum[:])
}
