// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// upstream is a provisioned Upstream: its parsed address and its state.
type upstream struct {
	dial string // as configured; what it hashes and is known by

	// network is empty when the address named none; the connection's own
	// network (tcp or udp) is used then.
	network string
	address string // host:port, or a socket path

	// addrPort is address as an IP address and port, when it is one (not
	// a host name or a socket path): such an upstream is dialled over TCP
	// without a resolver (see Handler.dial).
	addrPort netip.AddrPort

	weight   int
	maxConns int    // 0: no limit
	tier     int    // the lowest tier with a usable upstream serves
	source   string // "static", or the name of the lookup that found it

	// op is the operator's state of the upstream for the handler whose
	// membership holds it (operate.go): a change of state swaps in a copy.
	op opState

	stateKey any // dial address boxed once, the key in upstreamStates
	state    *upstreamState

	// This handler's own counts, for bounded loads (balance.go): its
	// connections to this upstream, and to all its upstreams. Both are set
	// by Handler.adopt and shared by the copies a membership change makes.
	load         *atomic.Int64
	handlerTotal *atomic.Int64
}

// upstreamStates holds the state of every upstream in use, keyed by dial
// address, so that health, failure counts and active connection counts
// outlive a config reload: a new config that names the same upstream picks
// up where the old one left off. Each config that names an upstream holds
// one reference, and so does each connection flowing to it, so the state
// of an upstream removed from the config lives on until its last
// connection ends, and comes back intact if it is re-added meanwhile.
var upstreamStates = caddy.NewUsagePool()

// upstreamState is what is known of an upstream across configs and
// handlers. Its counters are atomics: every connection reads and writes
// them. The zero value is an upstream that is up.
type upstreamState struct {
	active       atomic.Int64  // connections open or being dialled now
	total        atomic.Uint64 // connections piped since the state was made
	dialFailures atomic.Uint64 // failed dials since the state was made
	failovers    atomic.Uint64 // connections that preferred it but went elsewhere
	overflows    atomic.Uint64 // of those, the ones sent elsewhere because it was at its balance_factor cap
	bytesTo      atomic.Uint64 // bytes sent to it, counted as each connection ends
	bytesFrom    atomic.Uint64 // bytes received from it, likewise

	// Passive checks: the upstream is down until downUntil (unix
	// nanoseconds; 0 when up), set when max_fails of the failed dials in
	// failTimes fall within fail_duration.
	downUntil atomic.Int64
	failMu    sync.Mutex
	failTimes []int64 // unix nanoseconds of the latest failed dials, oldest first

	// Active checks: activeDown is their verdict, meaningful only while
	// activeCheckers (the configs whose checks of it run now) is above
	// zero; when the last of them is unloaded its verdict and counts are
	// forgotten, so that a reload that drops active checks leaves nothing
	// behind (checkerStopped).
	activeDown     atomic.Bool
	activeCheckers atomic.Int32

	// When the active checks last brought it back up, and when failed
	// dials last stopped holding it down (unix nanoseconds; 0 if never):
	// where a slow start ramp begins.
	activeUpAt  atomic.Int64
	passiveUpAt atomic.Int64

	// Connections godist closed, by closeReason (operate.go).
	closed [closeReasons]atomic.Uint64

	mu        sync.Mutex
	passes    int       // consecutive passed active checks
	fails     int       // consecutive failed active checks
	since     time.Time // when the active state last changed
	lastCheck time.Time
	lastError string // why the last active check failed
}

// maxFailTimes bounds the failed dials remembered per upstream: enough for
// any sensible max_fails.
const maxFailTimes = 64

// recordDialFailure counts a failed dial at now for the passive checks and
// reports whether that took the upstream down.
func (st *upstreamState) recordDialFailure(now int64, window time.Duration, maxFails int) (wentDown bool) {
	st.failMu.Lock()
	defer st.failMu.Unlock()
	kept := st.failTimes[:0]
	for _, t := range st.failTimes {
		if now-t < int64(window) {
			kept = append(kept, t)
		}
	}
	if len(kept) == maxFailTimes {
		kept = append(kept[:0], kept[1:]...)
	}
	st.failTimes = append(kept, now)
	if len(st.failTimes) < maxFails {
		return false
	}
	wasUp := st.downUntil.Load() <= now
	st.downUntil.Store(now + int64(window))
	return wasUp
}

// recentFailures counts the failed dials within window before now.
func (st *upstreamState) recentFailures(now int64, window time.Duration) int {
	st.failMu.Lock()
	defer st.failMu.Unlock()
	n := 0
	for _, t := range st.failTimes {
		if now-t < int64(window) {
			n++
		}
	}
	return n
}

// clearFailures forgets the failed dials, when an active check has just
// connected, and reports whether the passive checks had it down.
func (st *upstreamState) clearFailures(now int64) (wasDown bool) {
	st.failMu.Lock()
	defer st.failMu.Unlock()
	st.failTimes = st.failTimes[:0]
	wasDown = st.downUntil.Swap(0) > now
	if wasDown {
		st.passiveUpAt.Store(now)
	}
	return wasDown
}

// recordActiveCheck counts one active check and reports whether the
// upstream's state changed, and whether it is up now. A check whose config
// was unloaded (stopped is set) while it ran is not counted: counted is
// false.
func (st *upstreamState) recordActiveCheck(stopped *atomic.Bool, passed bool, rise, fall int, checkErr error) (changed, up, counted bool) {
	st.mu.Lock()
	defer st.mu.Unlock()
	if stopped.Load() {
		return false, false, false
	}
	now := time.Now()
	st.lastCheck = now
	down := st.activeDown.Load()
	if passed {
		st.passes++
		st.fails = 0
		st.lastError = ""
		if down && st.passes >= rise {
			st.activeDown.Store(false)
			st.since = now
			st.activeUpAt.Store(now.UnixNano())
			return true, true, true
		}
		return false, !down, true
	}
	st.fails++
	st.passes = 0
	if checkErr != nil {
		st.lastError = checkErr.Error()
	}
	if !down && st.fails >= fall {
		st.activeDown.Store(true)
		st.since = now
		return true, false, true
	}
	return false, !down, true
}

// checkerStarted counts one more config whose active checks of the
// upstream run.
func (st *upstreamState) checkerStarted() {
	st.activeCheckers.Add(1)
}

// checkerStopped counts a config whose checks of the upstream ended, once
// it is cleaned up (its stopped flag set first, so that none of its checks
// still running is counted after this). When it was the last, the checks'
// verdict and counts are forgotten.
func (st *upstreamState) checkerStopped() {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.activeCheckers.Add(-1) > 0 {
		return
	}
	st.activeDown.Store(false)
	st.passes, st.fails = 0, 0
	st.since, st.lastCheck, st.lastError = time.Time{}, time.Time{}, ""
}

// Destruct implements caddy.Destructor; there is nothing to release.
func (*upstreamState) Destruct() error { return nil }

// newUpstream provisions a static upstream, taking a reference to the
// shared state of its dial address for the config.
func newUpstream(u *Upstream) (*upstream, error) {
	pu, err := takeUpstream(u.Dial)
	if err != nil {
		return nil, err
	}
	pu.weight, pu.maxConns, pu.tier, pu.source = u.Weight, u.MaxConnections, u.Tier, sourceStatic
	return pu, nil
}

// newDiscoveredUpstream provisions an upstream a source found, taking a
// reference to the shared state of its dial address for the config.
func newDiscoveredUpstream(d DiscoveredUpstream) (*upstream, error) {
	pu, err := takeUpstream(d.Dial)
	if err != nil {
		return nil, err
	}
	pu.weight, pu.tier, pu.source = max(d.Weight, 1), d.Tier, d.Source
	return pu, nil
}

// takeUpstream parses dial and takes a reference to its shared state.
func takeUpstream(dial string) (*upstream, error) {
	network, address, err := parseDial(dial)
	if err != nil {
		return nil, err
	}
	key := any(dial)
	st, _, err := upstreamStates.LoadOrNew(key, func() (caddy.Destructor, error) {
		return new(upstreamState), nil
	})
	if err != nil {
		return nil, err
	}
	ap, _ := netip.ParseAddrPort(address)
	return &upstream{
		dial:     dial,
		network:  network,
		address:  address,
		addrPort: ap,
		stateKey: key,
		state:    st.(*upstreamState),
	}, nil
}

// releaseConfig drops the config's reference to the upstream's shared
// state.
func (u *upstream) releaseConfig() {
	_, _ = upstreamStates.Delete(u.stateKey)
}

// reserve counts a new connection to the upstream before it is dialled,
// unless the upstream is at max_connections, and holds the upstream's
// shared state for as long as the connection lives. Every successful
// reserve is undone by release.
func (u *upstream) reserve() bool {
	n := u.state.active.Add(1)
	if u.maxConns > 0 && n > int64(u.maxConns) {
		u.state.active.Add(-1)
		return false
	}
	if u.load != nil {
		u.load.Add(1)
		u.handlerTotal.Add(1)
	}
	upstreamStates.LoadOrStore(u.stateKey, u.state)
	return true
}

// release undoes reserve when a connection ends or its dial failed.
func (u *upstream) release() {
	u.state.active.Add(-1)
	if u.load != nil {
		u.load.Add(-1)
		u.handlerTotal.Add(-1)
	}
	_, _ = upstreamStates.Delete(u.stateKey)
}

// dialNetwork returns the network to dial the upstream with, for a
// connection that arrived on a listener of network listenerNet.
func (u *upstream) dialNetwork(listenerNet string) string {
	if u.network != "" {
		return u.network
	}
	if listenerNet == "udp" || listenerNet == "udp4" || listenerNet == "udp6" {
		return "udp"
	}
	return "tcp"
}

// parseDial checks a dial address and splits it into the network, if one
// was named, and the address to dial.
func parseDial(dial string) (network, address string, err error) {
	na, err := caddy.ParseNetworkAddressWithDefaults(dial, "", 0)
	if err != nil {
		return "", "", fmt.Errorf("invalid dial address: %v", err)
	}
	switch na.Network {
	case "", "tcp", "tcp4", "tcp6", "udp", "udp4", "udp6":
		if na.Host == "" {
			return "", "", fmt.Errorf("invalid dial address: missing host")
		}
		if na.StartPort == 0 {
			return "", "", fmt.Errorf("invalid dial address: missing port")
		}
		if na.PortRangeSize() != 1 {
			return "", "", fmt.Errorf("invalid dial address: a port range is not an upstream; list each port")
		}
		return na.Network, na.JoinHostPort(0), nil
	case "unix":
		if na.Host == "" {
			return "", "", fmt.Errorf("invalid dial address: missing socket path")
		}
		return na.Network, na.Host, nil
	default:
		return "", "", fmt.Errorf("invalid dial address: network %q: must be tcp, tcp4, tcp6, udp, udp4, udp6 or unix", na.Network)
	}
}
