// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// This file holds what every source of dynamic upstreams shares: the
// interface a handler watches them through, the loop that refreshes one
// source in the background, the state each source keeps for the admin API
// and the metrics, and the multi source that combines several. The DNS
// sources themselves (a, srv) are in dynamic_dns.go.

func init() {
	caddy.RegisterModule(MultiUpstreams{})
}

// upstreamSourceNamespace is the Caddy module namespace of the sources:
// `dynamic <name>` in a Caddyfile loads upstreamSourceNamespace+"."+name.
const upstreamSourceNamespace = "layer4.handlers.godist.upstreams"

// DiscoveredUpstream is one upstream a source found.
type DiscoveredUpstream struct {
	// What godist dials and hashes: `ip:port`, `[ipv6]:port`, or with a
	// network in front (`tcp4/ip:port`) when the source was told to dial
	// one. Never a host name: a connection never waits for a lookup.
	Dial string

	// The upstream's share of keys, at least 1.
	Weight int

	// Which tier the upstream serves in: the lowest tier that has an
	// upstream up serves; the higher ones are backups. 0 for A/AAAA
	// lookups; the SRV priority for SRV lookups.
	Tier int

	// The name of the lookup that found it, as in SourceStatus.Source
	// (`a:db.internal:5432`, `srv:_pg._tcp.db.internal`).
	Source string
}

// UpstreamSource is a guest module that finds upstreams in the background.
//
// Rules, for a handler using one:
//   - Watch is called after the source is provisioned, on a goroutine of
//     the caller's own (it blocks), normally once per handler with the
//     config's context. It looks the upstreams up at once, then every
//     refresh interval, until ctx is done, and returns only then.
//   - update is called with each good set that differs from the last one
//     it delivered, sorted by Dial, never concurrently with itself and
//     never after Watch has returned. The slice is the callee's to keep.
//     update should return quickly: the next lookup waits for it.
//   - A failed or empty lookup delivers nothing: the last good set stays.
//     The only empty set update ever sees withdraws a set delivered
//     before, when a source with a grace_period has failed for longer
//     than that (the caller then serves as if it had no good set yet).
//   - Status may be called from any goroutine at any time after Provision.
type UpstreamSource interface {
	// Watch looks the upstreams up now and then every refresh interval
	// until ctx is done, and calls update with each good set that differs
	// from the last one delivered. Watch returns when ctx is done; update
	// is never called after.
	Watch(ctx context.Context, update func([]DiscoveredUpstream))

	// Status reports each lookup's last success, failures, record count
	// and last error: one entry for a or srv, one per lookup for multi.
	Status() []SourceStatus
}

// SourceStatus is what is known of one lookup, for the admin API.
type SourceStatus struct {
	// The lookup's name: `a:<name>:<port>` or `srv:<name>`.
	Source string `json:"source"`

	// When the last lookup that found upstreams ended; zero if none has.
	LastSuccess time.Time `json:"last_success,omitzero"`

	// When the last failed or empty lookup ended; zero if none has.
	LastFailure time.Time `json:"last_failure,omitzero"`

	// Failed or empty lookups since the last success.
	ConsecutiveFailures int `json:"consecutive_failures"`

	// Failed or empty lookups since the source was first provisioned
	// (across config reloads).
	Failures uint64 `json:"failures_total"`

	// The upstreams the source serves now: those of its last good set, or
	// 0 before its first success or once a grace_period has withdrawn them.
	Records int `json:"records"`

	// Why the last failed lookup failed; empty after a success.
	LastError string `json:"last_error,omitempty"`
}

// sourceStates holds the status of every lookup in use, keyed by its
// name, so that its counters run on across config reloads like the
// upstreams' (see upstreamStates), and so that a lookup configured twice
// (in two handlers) has one metrics series, as Prometheus requires. Each
// provisioned a or srv source holds one reference.
var sourceStates = caddy.NewUsagePool()

// sourceState is the status of one lookup. It changes once per lookup and
// is read per scrape or admin request, so one mutex guards it all.
type sourceState struct {
	mu          sync.Mutex
	lastSuccess time.Time
	lastFailure time.Time
	consecutive int
	failures    uint64
	records     int
	lastError   string
}

// Destruct implements caddy.Destructor; there is nothing to release.
func (*sourceState) Destruct() error { return nil }

func loadSourceState(name string) (*sourceState, error) {
	st, _, err := sourceStates.LoadOrNew(name, func() (caddy.Destructor, error) {
		return new(sourceState), nil
	})
	if err != nil {
		return nil, err
	}
	return st.(*sourceState), nil
}

func (st *sourceState) recordSuccess(now time.Time, records int) (failedBefore int) {
	st.mu.Lock()
	defer st.mu.Unlock()
	failedBefore = st.consecutive
	st.lastSuccess = now
	st.consecutive = 0
	st.records = records
	st.lastError = ""
	return failedBefore
}

func (st *sourceState) recordFailure(now time.Time, err error) (consecutive int) {
	st.mu.Lock()
	defer st.mu.Unlock()
	st.lastFailure = now
	st.consecutive++
	st.failures++
	st.lastError = err.Error()
	return st.consecutive
}

func (st *sourceState) setRecords(n int) {
	st.mu.Lock()
	st.records = n
	st.mu.Unlock()
}

func (st *sourceState) status(name string) SourceStatus {
	st.mu.Lock()
	defer st.mu.Unlock()
	return SourceStatus{
		Source:              name,
		LastSuccess:         st.lastSuccess,
		LastFailure:         st.lastFailure,
		ConsecutiveFailures: st.consecutive,
		Failures:            st.failures,
		Records:             st.records,
		LastError:           st.lastError,
	}
}

// errNoUpstreams is the failure of a lookup that answered with nothing.
var errNoUpstreams = errors.New("the lookup found no upstreams")

// maxLookupTimeout bounds one lookup, whatever the refresh interval:
// enough for the Go resolver's second attempt after a lost packet (it
// waits 5s for the first, as resolv.conf's default timeout says).
const maxLookupTimeout = 10 * time.Second

// lookupTimeout is how long one lookup may take: the refresh interval, but
// never more than maxLookupTimeout.
func lookupTimeout(refresh time.Duration) time.Duration {
	return min(refresh, maxLookupTimeout)
}

// sourceWatcher runs the lookups of one a or srv source. It holds only
// what Provision set; the state of a Watch lives in its own goroutine.
type sourceWatcher struct {
	name    string
	refresh time.Duration
	grace   time.Duration // 0: keep the last good set for ever
	lookup  func(ctx context.Context) ([]DiscoveredUpstream, error)
	fields  []zap.Field // what the log lines say of the lookup

	state    *sourceState
	logger   *zap.Logger
	warnLog  *logLimiter // warnings of the lookup itself, at most one a minute
	released sync.Once
}

// sourceLogInterval bounds a source's log lines about failed lookups to
// one per interval (each saying how many it suppressed): a dead resolver
// must not flood the log, however short the refresh interval.
const sourceLogInterval = time.Minute

func newSourceWatcher(name string, refresh, grace time.Duration, lookup func(context.Context) ([]DiscoveredUpstream, error),
	logger *zap.Logger, fields ...zap.Field,
) (*sourceWatcher, error) {
	st, err := loadSourceState(name)
	if err != nil {
		return nil, err
	}
	return &sourceWatcher{
		name:    name,
		refresh: refresh,
		grace:   grace,
		lookup:  lookup,
		fields:  slices.Clip(append([]zap.Field{zap.String("source", name)}, fields...)), // each append copies
		state:   st,
		logger:  logger,
		warnLog: newSourceLogLimiter(),
	}, nil
}

// newSourceLogLimiter lets one line a sourceLogInterval through.
func newSourceLogLimiter() *logLimiter {
	return &logLimiter{interval: sourceLogInterval, burst: 1}
}

// release drops the source's reference to its shared state, once however
// often Caddy calls Cleanup. Status still reads the state afterwards.
func (w *sourceWatcher) release() {
	w.released.Do(func() { _, _ = sourceStates.Delete(w.name) })
}

// run is Watch, with attempted (if not nil) called once, after the first
// lookup has ended and delivered whatever it found, for multi. Every
// variable of one run is local to it, so two runs of one source do not
// disturb each other.
func (w *sourceWatcher) run(ctx context.Context, update func([]DiscoveredUpstream), attempted func()) {
	var (
		last       []DiscoveredUpstream // the set delivered last; nil before the first and after a withdrawal
		graceTimer *time.Timer          // running while lookups fail and a set is served
		graceC     <-chan time.Time
		failLog    = newSourceLogLimiter() // failed lookups; renewed at each recovery, so a new failure is always told
	)
	stopGrace := func() {
		if graceTimer != nil {
			graceTimer.Stop()
			graceTimer, graceC = nil, nil
		}
	}
	defer stopGrace()

	round := func() {
		lctx, cancel := context.WithTimeout(ctx, lookupTimeout(w.refresh))
		set, err := w.lookup(lctx)
		cancel()
		if ctx.Err() != nil {
			return // the config is going: neither count nor deliver
		}
		if err == nil && len(set) == 0 {
			err = errNoUpstreams
		}
		now := time.Now()
		if err != nil {
			n := w.state.recordFailure(now, err)
			if last != nil && w.grace > 0 && graceTimer == nil {
				graceTimer = time.NewTimer(w.grace)
				graceC = graceTimer.C
			}
			w.logFailure(failLog, err, n, last != nil)
			return
		}
		stopGrace()
		if failed := w.state.recordSuccess(now, len(set)); failed > 0 {
			failLog = newSourceLogLimiter()
			w.logger.Info("upstream lookup recovered", append(w.fields, zap.Int("failed_lookups", failed), zap.Int("upstreams", len(set)))...)
		}
		if slices.Equal(set, last) {
			return
		}
		if ce := w.logger.Check(zapcore.DebugLevel, "upstream lookup found a new set"); ce != nil {
			ce.Write(append(w.fields, zap.Strings("upstreams", dials(set)), zap.Strings("before", dials(last)))...)
		}
		last = set
		update(slices.Clone(set))
	}

	round()
	if attempted != nil {
		attempted()
	}
	ticker := time.NewTicker(w.refresh)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
			round()
		case <-graceC:
			graceTimer, graceC = nil, nil
			w.logger.Error("withdrawing a source's upstreams: its lookups have failed for longer than grace_period",
				append(w.fields, zap.Duration("grace_period", w.grace), zap.Strings("withdrawn", dials(last)))...)
			last = nil
			w.state.setRecords(0)
			update(nil)
		}
	}
}

// logFailure logs a failed lookup, at a limited rate: at warn while a good
// set is still served, at error when the source serves nothing.
func (w *sourceWatcher) logFailure(limiter *logLimiter, err error, consecutive int, serving bool) {
	level, msg := zapcore.ErrorLevel, "upstream lookup failed; the source serves no upstreams"
	if serving {
		level, msg = zapcore.WarnLevel, "upstream lookup failed; keeping the last good set"
	}
	limiter.logAt(w.logger, level, msg, append(w.fields, zap.Int("consecutive_failures", consecutive), zap.Error(err))...)
}

// dials lists the dial addresses of a set, for the logs.
func dials(set []DiscoveredUpstream) []string {
	out := make([]string, len(set))
	for i, u := range set {
		out[i] = u.Dial
	}
	return out
}

// sortByDial sorts a set by dial address, then tier, weight and source,
// so that equal sets are equal slices.
func sortByDial(set []DiscoveredUpstream) {
	slices.SortFunc(set, func(a, b DiscoveredUpstream) int {
		return cmp.Or(cmp.Compare(a.Dial, b.Dial), cmp.Compare(a.Tier, b.Tier),
			cmp.Compare(a.Weight, b.Weight), cmp.Compare(a.Source, b.Source))
	})
}

// roundReporter is implemented by the sources of this package, so that
// multi can tell when each of its sources has finished its first lookup,
// failed or not, and deliver the first union once rather than growing it
// source by source at start-up.
type roundReporter interface {
	watchRounds(ctx context.Context, update func([]DiscoveredUpstream), attempted func())
}

// foreignFirstWait is how long multi waits for the first set of a source
// from another package, which cannot say that its first lookup failed.
const foreignFirstWait = maxLookupTimeout

// MultiUpstreams combines the upstreams of several sources: it serves the
// union of their last good sets, and each source refreshes on its own
// interval. A source that fails keeps its own last good set in the union,
// as it would alone. If two sources find the same dial address, the first
// source listed that found it decides its weight and tier.
//
// The first set is delivered once every source has finished its first
// lookup, so that a handler does not start on part of the union.
type MultiUpstreams struct {
	// The sources to combine, each an object naming its module in
	// `source` (`a`, `srv`, or another `multi`), at least one.
	//
	// Default: none.
	SourcesRaw []json.RawMessage `json:"sources,omitempty" caddy:"namespace=layer4.handlers.godist.upstreams inline_key=source"`

	sources []UpstreamSource
}

// CaddyModule returns the Caddy module information.
func (MultiUpstreams) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  upstreamSourceNamespace + ".multi",
		New: func() caddy.Module { return new(MultiUpstreams) },
	}
}

// Provision loads the sources. Caddy cleans them up with the config.
func (mu *MultiUpstreams) Provision(ctx caddy.Context) error {
	if len(mu.SourcesRaw) == 0 {
		return nil // Validate says what is missing
	}
	mods, err := ctx.LoadModule(mu, "SourcesRaw")
	if err != nil {
		return fmt.Errorf("sources: %w", err)
	}
	for i, mod := range mods.([]any) {
		src, ok := mod.(UpstreamSource)
		if !ok {
			return fmt.Errorf("sources: source %d: %T is not an upstream source", i, mod)
		}
		mu.sources = append(mu.sources, src)
	}
	return nil
}

// Validate checks that there is a source. Caddy validated each source as
// it loaded it, and dropped SourcesRaw once loaded.
func (mu *MultiUpstreams) Validate() error {
	if len(mu.SourcesRaw) == 0 && len(mu.sources) == 0 {
		return errors.New("sources: at least one source is required")
	}
	return nil
}

// Watch implements UpstreamSource: it watches every source, each on a
// goroutine of its own, and delivers their union whenever it changes.
func (mu *MultiUpstreams) Watch(ctx context.Context, update func([]DiscoveredUpstream)) {
	mu.watchRounds(ctx, update, nil)
}

// watchRounds implements roundReporter. Its goroutines, one per source
// (and one more if a source is not of this package), all end before it
// returns. Every field below is guarded by mtx, and update is called with
// mtx held, which keeps its calls one at a time.
func (mu *MultiUpstreams) watchRounds(ctx context.Context, update func([]DiscoveredUpstream), attempted func()) {
	if len(mu.sources) == 0 {
		<-ctx.Done() // nothing to watch, but Watch still returns only now
		return
	}
	var (
		mtx     sync.Mutex
		sets    = make([][]DiscoveredUpstream, len(mu.sources)) // each source's last good set
		tried   = make([]bool, len(mu.sources))                 // whether each source has finished its first lookup
		pending = len(mu.sources)                               // sources whose first lookup has not ended
		ready   bool                                            // the first union may go out
		last    []DiscoveredUpstream                            // the union delivered last
	)
	deliver := func() {
		if ctx.Err() != nil {
			return
		}
		union := unionOf(sets)
		if len(union) == 0 && len(last) == 0 {
			return // an empty union only withdraws a set delivered before
		}
		if slices.Equal(union, last) {
			return
		}
		last = union
		update(slices.Clone(union))
	}
	markReady := func() {
		if !ready {
			ready = true
			deliver()
			if attempted != nil {
				attempted()
			}
		}
	}

	var wg sync.WaitGroup
	foreign := false
	for i, src := range mu.sources {
		childUpdate := func(set []DiscoveredUpstream) {
			mtx.Lock()
			defer mtx.Unlock()
			sets[i] = set
			if ready {
				deliver()
			}
		}
		childTried := func() {
			mtx.Lock()
			defer mtx.Unlock()
			if !tried[i] {
				tried[i] = true
				if pending--; pending == 0 {
					markReady()
				}
			}
		}
		if rr, ok := src.(roundReporter); ok {
			wg.Go(func() { rr.watchRounds(ctx, childUpdate, childTried) })
			continue
		}
		// A source of another package counts as tried once it has
		// delivered a set, or once foreignFirstWait has passed.
		foreign = true
		wg.Go(func() {
			src.Watch(ctx, func(set []DiscoveredUpstream) {
				childUpdate(set)
				childTried()
			})
		})
	}
	if foreign {
		wg.Go(func() {
			t := time.NewTimer(foreignFirstWait)
			defer t.Stop()
			select {
			case <-ctx.Done():
			case <-t.C:
				mtx.Lock()
				markReady()
				mtx.Unlock()
			}
		})
	}
	wg.Wait()
}

// Status implements UpstreamSource: the status of every source, in order.
func (mu *MultiUpstreams) Status() []SourceStatus {
	var out []SourceStatus
	for _, src := range mu.sources {
		out = append(out, src.Status()...)
	}
	return out
}

// unionOf merges the sets of several sources, sorted by dial address. The
// first set that holds a dial address decides its weight, tier and source.
func unionOf(sets [][]DiscoveredUpstream) []DiscoveredUpstream {
	seen := make(map[string]bool)
	var union []DiscoveredUpstream
	for _, set := range sets {
		for _, u := range set {
			if !seen[u.Dial] {
				seen[u.Dial] = true
				union = append(union, u)
			}
		}
	}
	sortByDial(union)
	return union
}

// Interface guards
var (
	_ caddy.Provisioner = (*MultiUpstreams)(nil)
	_ caddy.Validator   = (*MultiUpstreams)(nil)
	_ UpstreamSource    = (*MultiUpstreams)(nil)
	_ roundReporter     = (*MultiUpstreams)(nil)
)
