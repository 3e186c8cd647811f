// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"fmt"
	"math"
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	godist [<upstreams...>] {
//		to <upstreams...>
//		upstream <address> {
//			weight <n>
//			max_connections <n>
//			tier <n>
//			backup
//		}
//		dynamic a|srv|multi ...
//		hash_key ip_port|ip|<placeholder string>
//		balance_factor <c>
//		dial_timeout <duration>
//		idle_timeout <duration>
//		max_connections <n>
//		proxy_protocol v1|v2
//
//		name <name>
//		slow_start <duration>
//		on_down keep|close
//		state_poll_interval <duration>
//
//		health_interval <duration>
//		health_timeout <duration>
//		health_port <port>
//		health_rise <n>
//		health_fall <n>
//		health_send <string>
//		health_expect <string>
//		fail_duration <duration>
//		max_fails <n>
//	}
//
// The same-line upstreams, `to` and `upstream` all add to one list; an
// upstream given by `to` or on the same line has weight 1 and tier 0.
// `backup` is tier 65536, the last. `dynamic` takes one upstream source,
// as Caddy's HTTP reverse proxy does (docs/dynamic-upstreams.md); with it,
// static upstreams are optional. The same-line form `godist
// localhost:4000 localhost:4001 localhost:4002` is the whole of a
// godist.conf.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume directive name

	p := newOptionParser(d)
	for d.NextArg() {
		if err := p.addUpstream(h, d.Val()); err != nil {
			return err
		}
	}

	for nesting := d.Nesting(); d.NextBlock(nesting); {
		option := d.Val()
		var err error
		switch option {
		case "to":
			if d.CountRemainingArgs() == 0 {
				return d.ArgErr()
			}
			for d.NextArg() {
				if err = p.addUpstream(h, d.Val()); err != nil {
					return err
				}
			}
		case "upstream":
			err = p.upstreamBlock(h)
		case "dynamic":
			err = p.dynamicSource(h)
		case "balance_factor":
			err = p.floatArg(&h.BalanceFactor, validateBalanceFactor)
		case "hash_key":
			err = p.stringArg(&h.HashKey, func(s string) error { _, err := parseHashKey(s); return err })
		case "dial_timeout":
			err = p.durationArg(&h.DialTimeout)
		case "idle_timeout":
			err = p.durationArg(&h.IdleTimeout)
		case "max_connections":
			err = p.positiveIntArg(&h.MaxConnections)
		case "proxy_protocol":
			err = p.stringArg(&h.ProxyProtocol, func(s string) error { _, err := parseProxyProtocol(s); return err })
		case "name":
			err = p.stringArg(&h.Name, validateHandlerName)
		case "slow_start":
			if err = p.durationArg(&h.SlowStart); err == nil {
				err = p.check(validateSlowStart(h.SlowStart))
			}
		case "on_down":
			err = p.stringArg(&h.OnDown, func(s string) error { _, err := parseOnDown(s); return err })
		case "state_poll_interval":
			if err = p.durationArg(&h.StatePollInterval); err == nil {
				err = p.check(validateStatePollInterval(h.StatePollInterval))
			}
		case "health_interval":
			err = p.durationArg(&h.activeChecks().Interval)
		case "health_timeout":
			err = p.durationArg(&h.activeChecks().Timeout)
		case "health_port":
			err = p.portArg(&h.activeChecks().Port)
		case "health_rise":
			err = p.positiveIntArg(&h.activeChecks().Rise)
		case "health_fall":
			err = p.positiveIntArg(&h.activeChecks().Fall)
		case "health_send":
			err = p.probeArg(&h.activeChecks().Send)
		case "health_expect":
			err = p.probeArg(&h.activeChecks().Expect)
		case "fail_duration":
			passive := h.passiveChecks()
			passive.FailDuration = new(caddy.Duration)
			err = p.durationArg(passive.FailDuration)
		case "max_fails":
			err = p.positiveIntArg(&h.passiveChecks().MaxFails)
		default:
			return d.Errf("unrecognized subdirective '%s'", option)
		}
		if err != nil {
			return err
		}
		if option != "upstream" && option != "dynamic" && d.NextBlock(nesting+1) {
			return d.Errf("%s: does not take a block", option)
		}
	}

	if len(h.Upstreams) == 0 && h.DynamicUpstreamsRaw == nil {
		d.Reset()
		d.Next()
		return d.Err("godist: no upstreams: list at least one, on the same line, with 'to', or with 'upstream', or give a 'dynamic' source")
	}
	return nil
}

// dynamicSource parses `dynamic <source> [<args...>] [{ ... }]`, the
// source's own syntax after its name.
func (p *optionParser) dynamicSource(h *Handler) error {
	if err := p.once(); err != nil {
		return err
	}
	if !p.d.NextArg() {
		return p.d.ArgErr()
	}
	raw, err := unmarshalSource(p.d)
	if err != nil {
		return err
	}
	h.DynamicUpstreamsRaw = raw
	return nil
}

// optionParser parses the options of one godist block, so that each kind
// of argument is checked the same way everywhere and no option can be
// given twice.
type optionParser struct {
	d     *caddyfile.Dispenser
	seen  map[string]bool // options given so far
	dials map[string]bool // upstream addresses given so far
}

func newOptionParser(d *caddyfile.Dispenser) *optionParser {
	return &optionParser{d: d, seen: make(map[string]bool), dials: make(map[string]bool)}
}

// once fails if the current option was given before in the same block.
func (p *optionParser) once() error {
	name := p.d.Val()
	if p.seen[name] {
		return p.d.Errf("%s already specified", name)
	}
	p.seen[name] = true
	return nil
}

// oneArg checks that the current option has exactly one argument and
// moves to it.
func (p *optionParser) oneArg() error {
	if err := p.once(); err != nil {
		return err
	}
	if p.d.CountRemainingArgs() != 1 {
		return p.d.ArgErr()
	}
	p.d.NextArg()
	return nil
}

// stringArg reads one string, which check must accept.
func (p *optionParser) stringArg(dst *string, check func(string) error) error {
	if err := p.oneArg(); err != nil {
		return err
	}
	if err := check(p.d.Val()); err != nil {
		return p.d.WrapErr(err)
	}
	*dst = p.d.Val()
	return nil
}

// check returns err, if any, with the place in the Caddyfile.
func (p *optionParser) check(err error) error {
	if err != nil {
		return p.d.WrapErr(err)
	}
	return nil
}

// durationArg reads one duration that must not be negative.
func (p *optionParser) durationArg(dst *caddy.Duration) error {
	name := p.d.Val()
	var dur caddy.Duration
	if err := signedDurationArg(p, &dur); err != nil {
		return err
	}
	if dur < 0 {
		return p.d.Errf("%s: %s: must not be negative", name, time.Duration(dur))
	}
	*dst = dur
	return nil
}

// floatArg reads one number, which check must accept.
func (p *optionParser) floatArg(dst *float64, check func(float64) error) error {
	name := p.d.Val()
	if err := p.oneArg(); err != nil {
		return err
	}
	f, err := strconv.ParseFloat(p.d.Val(), 64)
	if err != nil {
		return p.d.Errf("%s: %q: not a number", name, p.d.Val())
	}
	if err := check(f); err != nil {
		return p.d.WrapErr(err)
	}
	*dst = f
	return nil
}

// positiveIntArg reads one integer of at least 1.
func (p *optionParser) positiveIntArg(dst *int) error {
	return p.intArg(dst, 1, math.MaxInt, "a whole number of at least 1")
}

// portArg reads one port number.
func (p *optionParser) portArg(dst *int) error {
	return p.intArg(dst, 1, 65535, "a port number, 1-65535")
}

// intArg reads one integer from lowest to highest, described by what.
func (p *optionParser) intArg(dst *int, lowest, highest int, what string) error {
	name := p.d.Val()
	if err := p.oneArg(); err != nil {
		return err
	}
	n, err := strconv.Atoi(p.d.Val())
	if err != nil || n < lowest || n > highest {
		return p.d.Errf("%s: %q: must be %s", name, p.d.Val(), what)
	}
	*dst = n
	return nil
}

// probeArg reads one health check string, with its escapes unescaped.
func (p *optionParser) probeArg(dst *string) error {
	name := p.d.Val()
	if err := p.oneArg(); err != nil {
		return err
	}
	s, err := unescapeProbe(p.d.Val())
	if err != nil {
		return p.d.Errf("%s: %q: %v", name, p.d.Val(), err)
	}
	*dst = s
	return nil
}

// activeChecks returns the handler's active health check config, making
// it: any health_* option turns active checks on.
func (h *Handler) activeChecks() *ActiveHealthChecks {
	if h.HealthChecks == nil {
		h.HealthChecks = new(HealthChecks)
	}
	if h.HealthChecks.Active == nil {
		h.HealthChecks.Active = new(ActiveHealthChecks)
	}
	return h.HealthChecks.Active
}

// passiveChecks returns the handler's passive health check config, making
// it.
func (h *Handler) passiveChecks() *PassiveHealthChecks {
	if h.HealthChecks == nil {
		h.HealthChecks = new(HealthChecks)
	}
	if h.HealthChecks.Passive == nil {
		h.HealthChecks.Passive = new(PassiveHealthChecks)
	}
	return h.HealthChecks.Passive
}

// addUpstream checks a dial address and appends it to the handler's
// upstreams with the default weight.
func (p *optionParser) addUpstream(h *Handler, dial string) error {
	if _, _, err := parseDial(dial); err != nil {
		return p.d.Errf("upstream %q: %v", dial, err)
	}
	if p.dials[dial] {
		return p.d.Errf("upstream %q: listed twice", dial)
	}
	p.dials[dial] = true
	h.Upstreams = append(h.Upstreams, &Upstream{Dial: dial})
	return nil
}

// upstreamBlock parses `upstream <address> { ... }`.
func (p *optionParser) upstreamBlock(h *Handler) error {
	d := p.d
	if d.CountRemainingArgs() != 1 {
		return d.ArgErr()
	}
	d.NextArg()
	if err := p.addUpstream(h, d.Val()); err != nil {
		return err
	}
	u := h.Upstreams[len(h.Upstreams)-1]

	inner := &optionParser{d: d, seen: make(map[string]bool)}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		option := d.Val()
		var err error
		switch option {
		case "weight":
			err = inner.positiveIntArg(&u.Weight)
		case "max_connections":
			err = inner.positiveIntArg(&u.MaxConnections)
		case "tier":
			if inner.seen["backup"] {
				return d.Errf("upstream %s: tier: give tier or backup, not both", u.Dial)
			}
			err = inner.intArg(&u.Tier, 0, maxTier, fmt.Sprintf("a whole number from 0 to %d", maxTier))
		case "backup":
			if inner.seen["tier"] {
				return d.Errf("upstream %s: backup: give tier or backup, not both", u.Dial)
			}
			if err = inner.once(); err == nil && d.NextArg() {
				err = d.ArgErr()
			}
			u.Tier = BackupTier
		default:
			return d.Errf("upstream %s: unrecognized subdirective '%s'", u.Dial, option)
		}
		if err != nil {
			return err
		}
		if d.NextBlock(nesting + 1) {
			return d.Errf("%s: does not take a block", option)
		}
	}
	return nil
}

// Interface guard
var _ caddyfile.Unmarshaler = (*Handler)(nil)
