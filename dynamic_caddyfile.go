// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"slices"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// The Caddyfile of the upstream sources is Caddy's `dynamic a`, `dynamic
// srv` and `dynamic multi`, option for option. Each UnmarshalCaddyfile
// starts at the source's name (`a`, `srv`, `multi`), as
// caddyfile.UnmarshalModule hands it over after `dynamic`.

// UnmarshalCaddyfile sets up the source from Caddyfile tokens. Syntax:
//
//	a [<name> [<port>]] {
//		name                <name>
//		port                <port>
//		refresh             <interval>
//		resolvers           <resolvers...>
//		dial_timeout        <duration>
//		dial_fallback_delay <duration>
//		versions            ipv4|ipv6
//	}
func (au *AUpstreams) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume the source's name
	p := newOptionParser(d)
	args := d.RemainingArgs()
	if len(args) > 2 {
		return d.ArgErr()
	}
	if len(args) > 0 {
		au.Name, p.seen["name"] = args[0], true
	}
	if len(args) > 1 {
		if err := checkCaddyfilePort(d, args[1]); err != nil {
			return err
		}
		au.Port, p.seen["port"] = args[1], true
	}

	err := sourceBlock(d, func(option string) error {
		switch option {
		case "name":
			return p.stringArg(&au.Name, func(string) error { return nil })
		case "port":
			return p.stringArg(&au.Port, func(s string) error { return checkCaddyfilePort(nil, s) })
		case "refresh":
			return p.durationArg(&au.Refresh)
		case "resolvers":
			return resolversArg(p, &au.Resolver)
		case "dial_timeout":
			return p.durationArg(&au.DialTimeout)
		case "dial_fallback_delay":
			return signedDurationArg(p, &au.FallbackDelay)
		case "versions":
			return versionsArg(p, &au.Versions)
		}
		return d.Errf("unrecognized subdirective '%s'", option)
	})
	if err != nil {
		return err
	}
	switch {
	case au.Name == "":
		return sourceErr(d, "name: required: give the domain name to look up on the same line or with 'name'")
	case au.Port == "":
		return sourceErr(d, "port: required: give the upstreams' port after the name or with 'port'")
	}
	return nil
}

// UnmarshalCaddyfile sets up the source from Caddyfile tokens. Syntax:
//
//	srv [<full_name>] {
//		service             <service>
//		proto               <proto>
//		name                <name>
//		refresh             <interval>
//		resolvers           <resolvers...>
//		dial_timeout        <duration>
//		dial_fallback_delay <duration>
//		grace_period        <duration>
//		dial_network        tcp|tcp4|tcp6|udp|udp4|udp6
//	}
func (su *SRVUpstreams) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume the source's name
	p := newOptionParser(d)
	args := d.RemainingArgs()
	if len(args) > 1 {
		return d.ArgErr()
	}
	if len(args) > 0 {
		su.Name, p.seen["name"] = args[0], true
	}

	err := sourceBlock(d, func(option string) error {
		switch option {
		case "service":
			return p.stringArg(&su.Service, func(string) error { return nil })
		case "proto":
			return p.stringArg(&su.Proto, func(string) error { return nil })
		case "name":
			return p.stringArg(&su.Name, func(string) error { return nil })
		case "refresh":
			return p.durationArg(&su.Refresh)
		case "resolvers":
			return resolversArg(p, &su.Resolver)
		case "dial_timeout":
			return p.durationArg(&su.DialTimeout)
		case "dial_fallback_delay":
			return signedDurationArg(p, &su.FallbackDelay)
		case "grace_period":
			return p.durationArg(&su.GracePeriod)
		case "dial_network":
			return p.stringArg(&su.DialNetwork, checkDialNetwork)
		}
		return d.Errf("unrecognized subdirective '%s'", option)
	})
	if err != nil {
		return err
	}
	if su.Name == "" {
		return sourceErr(d, "name: required: give the SRV name on the same line or with 'name'")
	}
	return nil
}

// UnmarshalCaddyfile sets up the source from Caddyfile tokens. Syntax:
//
//	multi {
//		<source> [<args...>] [{
//			...
//		}]
//		...
//	}
//
// Each line is a source as `dynamic` takes it: `a ...`, `srv ...`, or
// another `multi { ... }`.
func (mu *MultiUpstreams) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume the source's name
	if d.NextArg() {
		return d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		raw, err := unmarshalSource(d)
		if err != nil {
			return err
		}
		mu.SourcesRaw = append(mu.SourcesRaw, raw)
	}
	if len(mu.SourcesRaw) == 0 {
		return sourceErr(d, "multi: no sources: list at least one in its block")
	}
	return nil
}

// unmarshalSource reads the source whose name is the current token, and
// its arguments and block, into its JSON with its name in `source`: what
// a handler's `dynamic` does, and what multi does for each line.
func unmarshalSource(d *caddyfile.Dispenser) ([]byte, error) {
	name := d.Val()
	id := upstreamSourceNamespace + "." + name
	if _, err := caddy.GetModule(id); err != nil {
		modules := caddy.GetModules(upstreamSourceNamespace)
		known := make([]string, 0, len(modules))
		for _, info := range modules {
			known = append(known, info.ID.Name())
		}
		slices.Sort(known)
		return nil, d.Errf("unrecognized upstream source '%s': there are %s", name, strings.Join(known, ", "))
	}
	unm, err := caddyfile.UnmarshalModule(d, id)
	if err != nil {
		return nil, err
	}
	if _, ok := unm.(UpstreamSource); !ok {
		return nil, d.Errf("module %s (%T) is not an upstream source", id, unm)
	}
	return caddyconfig.JSONModuleObject(unm, "source", name, nil), nil
}

// sourceBlock runs option for each line of the source's block. An option
// that takes no block must not have one.
func sourceBlock(d *caddyfile.Dispenser, option func(string) error) error {
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		if err := option(name); err != nil {
			return err
		}
		if d.NextBlock(nesting + 1) {
			return d.Errf("%s: does not take a block", name)
		}
	}
	return nil
}

// sourceErr reports a problem with the source as a whole, at its first
// line.
func sourceErr(d *caddyfile.Dispenser, msg string) error {
	d.Reset()
	d.Next()
	return d.Err(msg)
}

// checkCaddyfilePort checks a port given in a Caddyfile, unless it is a
// placeholder, which is replaced when the config loads. With d, the error
// says where.
func checkCaddyfilePort(d *caddyfile.Dispenser, s string) error {
	if strings.Contains(s, "{") {
		return nil
	}
	_, err := parseSourcePort(s)
	if err != nil && d != nil {
		return d.WrapErr(err)
	}
	return err
}

// resolversArg reads `resolvers <addresses...>`, each checked.
func resolversArg(p *optionParser, dst **UpstreamResolver) error {
	if err := p.once(); err != nil {
		return err
	}
	addrs := p.d.RemainingArgs()
	if len(addrs) == 0 {
		return p.d.ArgErr()
	}
	r := &UpstreamResolver{Addresses: addrs}
	if _, err := r.parse(); err != nil {
		return p.d.Errf("resolvers: %v", strings.TrimPrefix(err.Error(), "resolver: "))
	}
	*dst = r
	return nil
}

// signedDurationArg reads one duration, which may be negative.
func signedDurationArg(p *optionParser, dst *caddy.Duration) error {
	name := p.d.Val()
	if err := p.oneArg(); err != nil {
		return err
	}
	dur, err := caddy.ParseDuration(p.d.Val())
	if err != nil {
		return p.d.Errf("%s: invalid duration %q: %v", name, p.d.Val(), err)
	}
	*dst = caddy.Duration(dur)
	return nil
}

// versionsArg reads `versions ipv4|ipv6...`.
func versionsArg(p *optionParser, dst **IPVersions) error {
	if err := p.once(); err != nil {
		return err
	}
	args := p.d.RemainingArgs()
	if len(args) == 0 {
		return p.d.ArgErr()
	}
	v := new(IPVersions)
	on := true
	for _, arg := range args {
		switch arg {
		case "ipv4":
			v.IPv4 = &on
		case "ipv6":
			v.IPv6 = &on
		default:
			return p.d.Errf("versions: %q: must be ipv4 or ipv6", arg)
		}
	}
	*dst = v
	return nil
}

// Interface guards
var (
	_ caddyfile.Unmarshaler = (*AUpstreams)(nil)
	_ caddyfile.Unmarshaler = (*SRVUpstreams)(nil)
	_ caddyfile.Unmarshaler = (*MultiUpstreams)(nil)
)
