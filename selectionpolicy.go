// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"slices"
	"strconv"
	"sync/atomic"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"

	"github.com/mholt/caddy-l4/layer4"
	"github.com/mholt/caddy-l4/modules/l4proxy"
)

func init() {
	caddy.RegisterModule(&SelectionPolicy{})
}

// SelectionPolicy gives caddy-l4's proxy handler godist's hashing: each
// connection goes to the upstream that the godist handler would pick for
// it, by the same weighted rendezvous hash (see Picker) of the same key.
// A proxy with this policy and a godist handler over the same upstream
// list, written the same way, send a key to the same upstream.
//
// An upstream is hashed by its dial addresses as written, joined by commas
// (what caddy-l4 prints for it), and weighted by its `weight`.
//
// Upstreams that caddy-l4 counts as unavailable (marked down by its active
// or passive health checks, or at their `max_connections`) are left out,
// and their keys go to each key's next choice. A refused dial with no
// health check to notice it is another matter: caddy-l4 only asks the
// policy again for the same connection if `lb_try_duration` is set. Then
// the policy gives that connection its key's next choice not yet tried, so
// failover follows the key's order of preference as in the godist handler;
// once every upstream has been tried it starts again from the first.
// Without `lb_try_duration`, the connection is closed.
type SelectionPolicy struct {
	// What a connection is hashed by, exactly as the godist handler's
	// `hash_key`: `ip_port` (the client's address and port), `ip` (the
	// client's address: all of a client's connections go to one upstream),
	// or a string with placeholders, evaluated per connection, that falls
	// back to `ip_port` when a placeholder in it is unknown or empty.
	//
	// Default: `ip_port`.
	HashKey string `json:"hash_key,omitempty"`

	// keys makes the connection keys, as the godist handler does.
	keys hashKey

	// varKey names the per-connection state of this policy instance in
	// the connection's vars: which upstreams it has been given.
	varKey string

	// cache is the picker of the last pool Select saw. caddy-l4 hands each
	// policy instance the same provisioned pool on every call, so this is
	// built once per config; a different pool only costs a rebuild.
	cache atomic.Pointer[poolPicker]
}

// policyInstances numbers provisioned policies, to give each its own var.
var policyInstances atomic.Uint64

// CaddyModule returns the Caddy module information.
func (*SelectionPolicy) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.proxy.selection_policies.godist",
		New: func() caddy.Module { return new(SelectionPolicy) },
	}
}

// Provision checks the hash key and sets up what makes connection keys.
func (s *SelectionPolicy) Provision(caddy.Context) error {
	keys, err := newHashKey(s.HashKey)
	if err != nil {
		return err
	}
	s.keys = keys
	s.varKey = "godist.lb_policy." + strconv.FormatUint(policyInstances.Add(1), 10)
	return nil
}

// Select returns the available upstream that ranks highest for the
// connection's key, among those not already given to this connection, or
// nil if no upstream is available.
func (s *SelectionPolicy) Select(pool l4proxy.UpstreamPool, cx *layer4.Connection) *l4proxy.Upstream {
	if len(pool) == 0 {
		return nil
	}
	pp := s.pickerFor(pool)
	key := s.keys.of(cx)

	// On a connection's first Select, the common case, nothing was tried
	// and tried stays nil. Only a retry makes a set.
	var tried bitset
	switch prev := cx.GetVar(s.varKey).(type) {
	case int: // caddy-l4 retries: its dial of upstream prev failed
		if prev < len(pool) {
			tried = make(bitset, (len(pool)+63)/64)
			tried.set(prev)
			cx.SetVar(s.varKey, tried)
		}
	case bitset: // a later retry
		if len(prev)*64 >= len(pool) {
			tried = prev
		}
	}

	usable := func(i int) bool { return (tried == nil || !tried.has(i)) && available(pool, i) }
	i := pp.picker.Pick(key, usable)
	if i < 0 && tried != nil {
		// Every available upstream has had its turn; one that failed may
		// be back, so go round the key's order again.
		clear(tried)
		i = pp.picker.Pick(key, usable)
	}
	if i < 0 {
		return nil
	}
	if tried != nil {
		tried.set(i)
	} else {
		cx.SetVar(s.varKey, pp.indexes[i])
	}
	return pool[i]
}

// available reports whether caddy-l4 counts pool[i] as available: healthy
// by its health checks and below its max_connections. caddy-l4's own test
// for that, Upstream.available, is unexported, but its `first` policy
// returns the first available upstream of the pool it is given: asked
// about a pool of one, it is the same test. pool[i:i+1] shares the pool's
// array, so asking allocates nothing.
func available(pool l4proxy.UpstreamPool, i int) bool {
	return firstAvailable.Select(pool[i:i+1], nil) != nil
}

var firstAvailable l4proxy.FirstSelection

// poolPicker is the picker of one upstream pool.
type poolPicker struct {
	pool    l4proxy.UpstreamPool // the upstreams it was built for
	picker  *Picker
	indexes []any // 0, 1, ... boxed once, so that storing one in a var allocates nothing
}

func newPoolPicker(pool l4proxy.UpstreamPool) *poolPicker {
	pp := &poolPicker{pool: slices.Clone(pool), indexes: make([]any, len(pool))}
	ups := make([]PickerUpstream, len(pool))
	for i, u := range pool {
		ups[i] = PickerUpstream{Dial: u.String(), Weight: u.Weight}
		pp.indexes[i] = i
	}
	pp.picker = NewPicker(ups)
	return pp
}

// pickerFor returns the picker for pool, building it if the cached one was
// built for other upstreams. Pools are compared by the identity of their
// upstreams, in order, which are fixed once provisioned.
func (s *SelectionPolicy) pickerFor(pool l4proxy.UpstreamPool) *poolPicker {
	if pp := s.cache.Load(); pp != nil && slices.Equal(pp.pool, pool) {
		return pp
	}
	pp := newPoolPicker(pool)
	s.cache.Store(pp)
	return pp
}

// UnmarshalCaddyfile sets up the policy from the tokens of caddy-l4's
// proxy option lb_policy. Syntax:
//
//	lb_policy godist [ip_port|ip|<placeholder string>]
//
// The argument is the hash key; without one, ip_port.
func (s *SelectionPolicy) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume policy name
	if d.CountRemainingArgs() > 1 {
		return d.ArgErr()
	}
	if d.NextArg() {
		if _, err := parseHashKey(d.Val()); err != nil {
			return d.Errf("lb_policy godist: %v", err)
		}
		s.HashKey = d.Val()
	}
	if d.NextBlock(d.Nesting()) {
		return d.Errf("lb_policy godist: unrecognized subdirective '%s'", d.Val())
	}
	return nil
}

// Interface guards
var (
	_ caddy.Module          = (*SelectionPolicy)(nil)
	_ caddy.Provisioner     = (*SelectionPolicy)(nil)
	_ l4proxy.Selector      = (*SelectionPolicy)(nil)
	_ caddyfile.Unmarshaler = (*SelectionPolicy)(nil)
)
