// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

// Package godist is a caddy-l4 connection handler that hashes each client
// to one of a list of upstreams and pipes its bytes both ways: godist, the
// 2013 Go TCP load balancer, rebuilt as a Caddy module with consistent,
// weighted hashing, failover and correct half-close.
package godist

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	// The whole layer4 app, with its matchers and handlers, so that a Caddy
	// built with only this module can route to it.
	_ "github.com/mholt/caddy-l4"
	"github.com/mholt/caddy-l4/layer4"

	"github.com/bcca9c24/caddy-godist/internal/pipe"
)

func init() {
	caddy.RegisterModule(&Handler{})
}

// Default values of the handler's options.
const (
	defaultDialTimeout = 3 * time.Second
)

// Handler hashes each incoming connection to one upstream and pipes bytes
// both ways until both sides are done. The hash is consistent (adding or
// removing an upstream moves only the keys that must move), weighted, and
// the same in every process with the same upstream list, so several Caddy
// instances agree on where a client goes without sharing state. If the
// chosen upstream cannot be dialled, the connection fails over to the next
// upstream in its key's order of preference.
type Handler struct {
	// The upstreams to balance over: at least one, unless dynamic_upstreams
	// finds them. Each is a Caddy network address (`host:port`,
	// `[::1]:port`, `tcp/host:port`, `udp/host:port`, `unix//path`), an
	// optional weight and an optional tier. An address without a network
	// uses the network of the listener the connection came in on: tcp for
	// TCP listeners, udp for UDP listeners.
	//
	// Default: none.
	Upstreams []*Upstream `json:"upstreams,omitempty"`

	// A source that finds more upstreams in DNS, in the background: an
	// object naming its module in `source`, `a` (A/AAAA records), `srv`
	// (SRV records) or `multi` (several sources), with that module's
	// options (docs/dynamic-upstreams.md). Its upstreams join the static
	// ones; a connection hashes over the last good set the source found,
	// never waiting for a lookup, and a failed lookup keeps that set. An
	// address found that is also a static upstream is the static one.
	//
	// Default: none (the static upstreams only).
	DynamicUpstreamsRaw json.RawMessage `json:"dynamic_upstreams,omitempty" caddy:"namespace=layer4.handlers.godist.upstreams inline_key=source"`

	// What a connection is hashed by:
	//
	//   - `ip_port`: the client's IP address and port, godist's key. Every new
	//     connection is spread on its own; a client's connections do not
	//     stick together.
	//   - `ip`: the client's IP address. All connections of a client go to
	//     the same upstream (source-IP affinity), which per-client state on
	//     the upstream (a database session, say) wants.
	//   - any other string must hold Caddy placeholders, evaluated per
	//     connection; for example `{l4.tls.server_name}` after caddy-l4's
	//     `tls` matcher in the same route. If a placeholder in it is unknown
	//     or empty for a connection (a client that sent no server name), that
	//     connection is hashed by `ip_port` instead.
	//
	// An IPv4-mapped IPv6 client address counts as its IPv4 form.
	//
	// Default: `ip_port`.
	HashKey string `json:"hash_key,omitempty"`

	// Bounded loads (consistent hashing with bounded loads, as HAProxy's
	// hash-balance-factor): no usable upstream of the serving tier takes a
	// new connection once it holds ⌈c × (this handler's connections + 1) ×
	// its weight share⌉; the connection goes to the first upstream in its
	// key's order that is under its cap instead (an overflow pick). c is a
	// number above 1, counted to three decimal places; 1.25 lets no
	// upstream hold more than a quarter above its share. The counts are
	// this handler's own: see docs/balance-factor.md.
	//
	// Default: 0 (off: every key goes to its first choice).
	BalanceFactor float64 `json:"balance_factor,omitempty"`

	// How long to wait for one upstream to accept a connection before
	// failing over to the next. A zero or unset value means the default.
	//
	// Default: 3s.
	DialTimeout caddy.Duration `json:"dial_timeout,omitempty"`

	// How long a connection may go without a byte moving in either
	// direction before it is closed. Zero means never.
	//
	// Default: 0 (no idle timeout).
	IdleTimeout caddy.Duration `json:"idle_timeout,omitempty"`

	// Health checks: which upstreams are up. Passive checks are on by
	// default; active checks are off unless configured.
	HealthChecks *HealthChecks `json:"health_checks,omitempty"`

	// Send the PROXY protocol header to each upstream, so that it sees the
	// client's address instead of Caddy's: `v1` (text) or `v2` (binary).
	// The header carries the client's source and the address it connected
	// to; after caddy-l4's `proxy_protocol` handler in the same route, the
	// addresses that handler decoded. A UDP flow needs `v2`, which is sent
	// in front of every datagram. Health checks never send it.
	//
	// Default: none.
	ProxyProtocol string `json:"proxy_protocol,omitempty"`

	// The most connections this handler pipes at once. A connection over
	// the limit is closed as soon as it arrives, counted, and logged (at a
	// limited rate). Connections still flowing from a previous config are
	// not counted against the new one, as with HAProxy's and nginx's
	// reloads. 0 means no limit.
	//
	// Default: 0.
	MaxConnections int `json:"max_connections,omitempty"`

	// The handler's name: what its operator states (drain, maint and
	// weight overrides, set through POST /godist/upstreams/state; see
	// docs/operate.md) are kept under in Caddy's storage, and what the
	// admin API and the info metric call it. 1 to 64 letters, digits, '-',
	// '_' and '.', starting with a letter or a digit. Handlers of one name
	// share their operator states: across routes, config reloads, and
	// every Caddy instance that uses the same storage. A name does not
	// change when the upstreams, routes or listeners do; unnamed handlers
	// all share the default one, as they share an upstream's health.
	//
	// Default: `default`.
	Name string `json:"name,omitempty"`

	// How long an upstream that becomes usable takes to reach its full
	// weight: one added (found by dynamic_upstreams, or by a config
	// reload), one back up after health checks or failed dials took it
	// down, or one back from an operator's drain or maint. Its weight
	// ramps from 10% of its full weight to all of it, in steps; keys move
	// only toward it meanwhile, never between two others. Nothing ramps
	// when Caddy starts. 0 turns the ramp off; at most 24h.
	//
	// Default: 0 (no ramp).
	SlowStart caddy.Duration `json:"slow_start,omitempty"`

	// What happens to the connections open to an upstream when the active
	// health checks mark it down: `keep` lets them flow until they fail by
	// themselves; `close` closes them, so that their clients reconnect to
	// their next choice. Failed dials never close connections. `close`
	// needs active health checks.
	//
	// Default: `keep`.
	OnDown string `json:"on_down,omitempty"`

	// How often this instance reads the operator states of its name from
	// Caddy's storage (the `storage` global option): a state set through
	// another Caddy instance that uses the same storage applies here
	// within this interval. At least 100ms; zero or unset means the
	// default.
	//
	// Default: 2s.
	StatePollInterval caddy.Duration `json:"state_poll_interval,omitempty"`

	ctx       caddy.Context
	logger    *zap.Logger
	failLog   *logLimiter // error lines on the per-connection path
	hashKey   hashKey
	dialer    net.Dialer
	passive   bool // whether failed dials count against upstreams
	ppVersion byte // PROXY protocol version to send, 0 for none

	// The operator's side (operate.go): the handler's name, the store of
	// its operator states, whether on_down closes connections, and the
	// record of when its upstreams joined, for slow start.
	name        string
	opStore     *opStore
	closeOnDown bool
	book        *memberBook
	nudge       signal // wakes the operator goroutine (operate)

	// members is the membership every connection hashes over: see the
	// rules in membership.go. Never nil once Provision has returned.
	members atomic.Pointer[membership]
	loads   handlerLoads   // this handler's connection counts, for balance_factor
	static  []*upstream    // provisioned Upstreams, in the same order
	source  UpstreamSource // the loaded dynamic_upstreams, or nil
	lastSet *lastGoodSet   // the source's last good set, for the config after this one

	// memberMu orders the changes of membership (setDiscovered) and
	// Cleanup; the fields below it are guarded by it.
	memberMu sync.Mutex
	checkers map[string]*checker // by dial address; nil for a UDP upstream not checked
	started  bool                // Provision has logged the first membership
	closed   bool                // Cleanup has run: change nothing more

	// runCtx ends when the config is unloaded or Cleanup runs; every
	// goroutine of the handler (the source's watch, the check loops) ends
	// with it, and is counted in goroutines, which Cleanup waits for.
	runCtx     context.Context
	stop       context.CancelFunc
	goroutines sync.WaitGroup

	engine    *pipe.Lease // holds the engine while this handler may pipe
	cleanedUp atomic.Bool
	sessions  sessionList // connections flowing through this handler now

	active     atomic.Int64  // connections piped by this handler now
	rejected   atomic.Uint64 // connections closed over max_connections
	rejectedFD atomic.Uint64 // connections closed over the descriptor budget
}

// Upstream is one backend of the pool.
type Upstream struct {
	// The network address to dial. It is also what the upstream's hash
	// score is made of, so it is hashed exactly as written: the same list
	// written the same way maps keys the same way everywhere.
	Dial string `json:"dial"`

	// The upstream's share of keys relative to the others: an upstream of
	// weight 2 gets about twice the keys of one of weight 1. Must be at
	// least 1; zero or unset means the default.
	//
	// Default: 1.
	Weight int `json:"weight,omitempty"`

	// The most connections open to this upstream at once, counted over
	// every godist handler and config that names it. A full upstream is
	// skipped for new connections like an unhealthy one: its keys go to
	// their next choice until it has room again. 0 means no limit.
	//
	// Default: 0.
	MaxConnections int `json:"max_connections,omitempty"`

	// The upstream's tier, 0-65536: a connection hashes over the lowest
	// tier that has a usable upstream (up and not full); the higher tiers
	// are backups, and a key whose tier has none usable goes to the next
	// tier by that tier's own order. Discovered upstreams are in tier 0
	// (A/AAAA) or in their SRV priority's tier, so the tiers of static and
	// discovered upstreams compare. `backup` in the Caddyfile is tier
	// 65536, the last: it serves only when no other upstream is usable.
	//
	// Default: 0.
	Tier int `json:"tier,omitempty"`
}

// CaddyModule returns the Caddy module information.
func (*Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.handlers.godist",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision loads the dynamic upstream source, fills in the defaults,
// checks the result with Validate before it starts anything, then builds
// the first membership and starts the health checks and the source's
// watch.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.ctx = ctx
	h.logger = ctx.Logger()
	h.failLog = newLogLimiter()
	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		return fmt.Errorf("registering metrics: %w", err)
	}
	if len(h.DynamicUpstreamsRaw) > 0 {
		key := sourceKey(h.DynamicUpstreamsRaw) // before LoadModule drops the JSON
		mod, err := ctx.LoadModule(h, "DynamicUpstreamsRaw")
		if err != nil {
			return fmt.Errorf("dynamic_upstreams: %w", err)
		}
		src, ok := mod.(UpstreamSource)
		if !ok {
			return fmt.Errorf("dynamic_upstreams: %T is not an upstream source", mod)
		}
		h.source = src
		if h.lastSet, err = loadLastGoodSet(key); err != nil {
			return fmt.Errorf("dynamic_upstreams: %w", err)
		}
	}

	if h.DialTimeout == 0 {
		h.DialTimeout = caddy.Duration(defaultDialTimeout)
	}
	for _, u := range h.Upstreams {
		if u != nil && u.Weight == 0 {
			u.Weight = 1
		}
	}
	if h.HealthChecks == nil {
		h.HealthChecks = new(HealthChecks)
	}
	h.HealthChecks.provision()
	h.passive = h.HealthChecks.passiveEnabled()
	// Caddy validates after provisioning, but the health checks start
	// below, and must not start with values they cannot run with.
	if err := h.Validate(); err != nil {
		return err
	}

	h.hashKey, _ = newHashKey(h.HashKey)                 // checked by Validate
	h.ppVersion, _ = parseProxyProtocol(h.ProxyProtocol) // likewise
	h.closeOnDown, _ = parseOnDown(h.OnDown)             // likewise
	h.name = handlerName(h.Name)
	// The states the storage holds are read before the first membership
	// is built, so that a restarted Caddy starts with every drain in force.
	store, err := acquireOpStore(ctx, ctx.Storage(), h.name, time.Duration(h.StatePollInterval))
	if err != nil {
		return err
	}
	h.opStore = store
	h.book = acquireMemberBook(ctx, h.name)
	for i, u := range h.Upstreams {
		pu, err := newUpstream(u)
		if err != nil {
			// Caddy calls Cleanup after a failed Provision: it releases
			// the upstreams already taken.
			return fmt.Errorf("upstream %d (%s): %w", i, u.Dial, err)
		}
		h.static = append(h.static, h.adopt(pu))
	}
	// No TCP keepalive on upstream connections, as HAProxy, nginx and
	// Envoy do by default: it costs four system calls per connection, and
	// idle_timeout is the way to bound idle connections.
	h.dialer = net.Dialer{Timeout: time.Duration(h.DialTimeout), KeepAlive: -1}

	// From here on, nothing fails: the first membership is the static
	// upstreams and the last good set of the config this one replaces,
	// if it had the same source, so that a reload serves on at once.
	h.runCtx, h.stop = context.WithCancel(ctx)
	h.checkers = make(map[string]*checker)
	var seed []DiscoveredUpstream
	if h.lastSet != nil {
		seed = h.lastSet.load()
	}
	h.memberMu.Lock()
	h.installLocked(seed)
	h.memberMu.Unlock()
	h.engine = pipe.Acquire(h.logger)
	liveHandlers.add(h)
	if h.source != nil {
		h.watchSource(seed != nil)
	}

	h.memberMu.Lock()
	h.started = true
	m := h.members.Load()
	h.memberMu.Unlock()
	h.goroutines.Go(h.operate)
	fields := []zap.Field{
		zap.String("fingerprint", m.fingerprint),
		zap.String("hash_key", h.hashKey.kind.String()),
		zap.Int("upstreams", len(m.pool)),
	}
	if h.source != nil {
		fields = append(fields, zap.Int("discovered", len(m.pool)-len(h.static)))
	}
	h.logger.Info("godist handler provisioned", fields...)
	return nil
}

// Validate checks the configuration without changing it: every check of a
// godist config is here, and nowhere else. It accepts a config as written
// (zero values mean their defaults) as well as a provisioned one, so
// Provision calls it before it starts anything, POST /godist/plan calls it
// on a proposed upstream list, and the tests and fuzzers call it directly.
func (h *Handler) Validate() error {
	if len(h.Upstreams) == 0 && len(h.DynamicUpstreamsRaw) == 0 && h.source == nil {
		return errors.New("upstreams: at least one upstream is required, or a dynamic_upstreams source")
	}
	if err := validateUpstreams(h.Upstreams); err != nil {
		return err
	}
	if _, err := parseHashKey(h.HashKey); err != nil {
		return err
	}
	if err := validateBalanceFactor(h.BalanceFactor); err != nil {
		return err
	}
	if _, err := parseProxyProtocol(h.ProxyProtocol); err != nil {
		return err
	}
	if h.DialTimeout < 0 {
		return fmt.Errorf("dial_timeout %s: must not be negative", time.Duration(h.DialTimeout))
	}
	if h.IdleTimeout < 0 {
		return fmt.Errorf("idle_timeout %s: must not be negative", time.Duration(h.IdleTimeout))
	}
	if h.MaxConnections < 0 {
		return fmt.Errorf("max_connections %d: must not be negative", h.MaxConnections)
	}
	if err := validateHandlerName(h.Name); err != nil {
		return err
	}
	if err := validateSlowStart(h.SlowStart); err != nil {
		return err
	}
	closes, err := parseOnDown(h.OnDown)
	if err != nil {
		return err
	}
	if closes && (h.HealthChecks == nil || h.HealthChecks.Active == nil) {
		return fmt.Errorf("on_down %s: needs active health checks (health_checks.active, or a health_* option in the Caddyfile): only they mark an upstream down for it", h.OnDown)
	}
	if err := validateStatePollInterval(h.StatePollInterval); err != nil {
		return err
	}
	if h.HealthChecks != nil {
		return h.HealthChecks.validate()
	}
	return nil
}

// validateUpstreams checks an upstream list: each address, weight and
// limit, and that no address is listed twice.
func validateUpstreams(ups []*Upstream) error {
	seen := make(map[string]int, len(ups))
	for i, u := range ups {
		if u == nil {
			return fmt.Errorf("upstream %d: missing", i)
		}
		if _, _, err := parseDial(u.Dial); err != nil {
			return fmt.Errorf("upstream %d (%s): %w", i, u.Dial, err)
		}
		if u.Weight < 0 {
			return fmt.Errorf("upstream %d (%s): weight %d: must be at least 1", i, u.Dial, u.Weight)
		}
		if u.MaxConnections < 0 {
			return fmt.Errorf("upstream %d (%s): max_connections %d: must not be negative", i, u.Dial, u.MaxConnections)
		}
		if u.Tier < 0 || u.Tier > maxTier {
			return fmt.Errorf("upstream %d (%s): tier %d: must be from 0 to %d (backup)", i, u.Dial, u.Tier, maxTier)
		}
		if j, dup := seen[u.Dial]; dup {
			return fmt.Errorf("upstream %d (%s): the same dial address as upstream %d", i, u.Dial, j)
		}
		seen[u.Dial] = i
	}
	return nil
}

// Cleanup stops the handler's goroutines (the source's watch and the
// check loops), waits for them, and releases the upstreams' shared
// state. Connections still flowing keep their own reference to it and
// finish undisturbed.
// Cleanup may run more than once (after a failed Provision, say); only
// the first does anything.
func (h *Handler) Cleanup() error {
	if !h.cleanedUp.CompareAndSwap(false, true) {
		return nil
	}
	// Its connections flow on: a maint or an on_down close must still
	// reach them. Retired first, so that no sweep misses them meanwhile.
	retiredHandlers.retire(h)
	liveHandlers.remove(h)
	h.memberMu.Lock()
	h.closed = true
	for _, c := range h.checkers {
		if c != nil {
			c.stop()
		}
	}
	h.checkers = nil
	m := h.members.Load()
	h.memberMu.Unlock()
	if h.stop != nil {
		h.stop()
		if !waitGroupWithin(&h.goroutines, cleanupWait) {
			h.logger.Warn("godist handler unloaded before its background work ended", zap.Duration("waited", cleanupWait))
		}
	}
	if h.engine != nil {
		// Connections still flowing keep the engine's parts they use; the
		// reactor stops once none is parked and no handler holds it.
		h.engine.Release()
	}
	// The membership itself stays: a connection accepted by the old
	// config's listener just before it closed is still handled by this
	// handler.
	held := h.static // a Provision that failed built no membership
	if m != nil {
		held = m.pool
		h.book.leave(dialsOf(m.pool))
	}
	for _, u := range held {
		u.releaseConfig()
	}
	if h.lastSet != nil {
		h.lastSet.release()
	}
	return nil
}

// cleanupWait bounds how long Cleanup waits for the handler's goroutines:
// each ends within a moment of its context, since lookups, dials and
// health checks all follow it.
const cleanupWait = 5 * time.Second

// waitGroupWithin waits for wg, at most d, and reports whether it ended.
func waitGroupWithin(wg *sync.WaitGroup, d time.Duration) bool {
	done := make(chan struct{})
	go func() {
		wg.Wait()
		close(done)
	}()
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-done:
		return true
	case <-t.C:
		return false
	}
}

// Interface guards
var (
	_ caddy.Module       = (*Handler)(nil)
	_ caddy.Provisioner  = (*Handler)(nil)
	_ caddy.Validator    = (*Handler)(nil)
	_ caddy.CleanerUpper = (*Handler)(nil)
	_ layer4.NextHandler = (*Handler)(nil)
)
