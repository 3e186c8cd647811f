// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"fmt"
	"sync/atomic"

	"github.com/caddyserver/caddy/v2"
)

// upstream is a provisioned Upstream: its parsed address and its state.
type upstream struct {
	dial string // as configured; what it hashes and is known by

	// network is empty when the address named none; the connection's own
	// network (tcp or udp) is used then.
	network string
	address string // host:port, or a socket path

	weight int

	stateKey any // dial address boxed once, the key in upstreamStates
	state    *upstreamState
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
// handlers. Its fields are atomics: every connection reads and writes them.
type upstreamState struct {
	active atomic.Int64  // connections open now
	total  atomic.Uint64 // connections piped since the state was made
}

// Destruct implements caddy.Destructor; there is nothing to release.
func (*upstreamState) Destruct() error { return nil }

func newUpstream(u *Upstream) (*upstream, error) {
	network, address, err := parseDial(u.Dial)
	if err != nil {
		return nil, err
	}
	key := any(u.Dial)
	st, _, err := upstreamStates.LoadOrNew(key, func() (caddy.Destructor, error) {
		return new(upstreamState), nil
	})
	if err != nil {
		return nil, err
	}
	return &upstream{
		dial:     u.Dial,
		network:  network,
		address:  address,
		weight:   u.Weight,
		stateKey: key,
		state:    st.(*upstreamState),
	}, nil
}

// release drops the config's reference to the upstream's shared state.
func (u *upstream) release() {
	_, _ = upstreamStates.Delete(u.stateKey)
}

// acquireConn counts a new connection to the upstream, and holds the
// upstream's shared state for as long as the connection lives.
func (u *upstream) acquireConn() {
	upstreamStates.LoadOrStore(u.stateKey, u.state)
	u.state.active.Add(1)
	u.state.total.Add(1)
}

// releaseConn undoes acquireConn when a connection ends.
func (u *upstream) releaseConn() {
	u.state.active.Add(-1)
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
