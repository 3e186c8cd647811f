// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// The DNS sources, shaped after Caddy's `dynamic a` and `dynamic srv`
// upstreams of its HTTP reverse proxy (same JSON fields, same Caddyfile),
// so that what a Caddy user wrote there works here. Where they differ:
// Caddy looks up lazily on a request's path and drops SRV priority and
// weight; these look up in the background on their refresh interval and
// keep them, as tier and weight.

func init() {
	caddy.RegisterModule(AUpstreams{})
	caddy.RegisterModule(SRVUpstreams{})
}

// Defaults of the DNS sources.
const (
	defaultRefresh = time.Minute

	// maxConcurrentTargets bounds the SRV targets resolved at once.
	maxConcurrentTargets = 8
)

// AUpstreams finds upstreams by looking a name up in DNS: each A and AAAA
// record is an upstream `ip:port` of weight 1, in tier 0. The lookup runs
// in the background every refresh interval; a failed or empty lookup
// keeps the last good set.
type AUpstreams struct {
	// The domain name to look up. Caddy's global placeholders
	// (`{env.NAMESPACE}`) are replaced once, when the config loads.
	//
	// Default: none; required.
	Name string `json:"name,omitempty"`

	// The port of the upstreams, 1-65535 (a string, as in Caddy). Global
	// placeholders are replaced when the config loads.
	//
	// Default: none; required.
	Port string `json:"port,omitempty"`

	// How often to look the name up again. Zero or unset means the
	// default; each lookup may take at most this long (and never more
	// than 10s).
	//
	// Default: 1m.
	Refresh caddy.Duration `json:"refresh,omitempty"`

	// The DNS resolvers to ask. Unset means the system's resolver.
	//
	// Default: the system's resolver.
	Resolver *UpstreamResolver `json:"resolver,omitempty"`

	// With Resolver, how long to wait for a connection to a resolver (a
	// TCP one, or one named by host name). Zero means only the lookup's
	// own bound applies.
	//
	// Default: 0.
	DialTimeout caddy.Duration `json:"dial_timeout,omitempty"`

	// With Resolver, how long to wait before trying the other address
	// family of a resolver named by a host name that has both (RFC 6555
	// Fast Fallback). Zero means Go's 300ms; negative disables it.
	//
	// Default: 0 (300ms).
	FallbackDelay caddy.Duration `json:"dial_fallback_delay,omitempty"`

	// The record types to look up: `ipv4` for A, `ipv6` for AAAA. If
	// neither is true, both are looked up.
	//
	// Default: both.
	Versions *IPVersions `json:"versions,omitempty"`

	port     string // Port, checked and normalised
	families []string
	resolver *net.Resolver
	watcher  *sourceWatcher
}

// IPVersions chooses the address families a lookup asks for. A family is
// looked up if it is true, or if it is unset and the other is not true.
type IPVersions struct {
	// Look up A records (IPv4).
	//
	// Default: unset.
	IPv4 *bool `json:"ipv4,omitempty"`

	// Look up AAAA records (IPv6).
	//
	// Default: unset.
	IPv6 *bool `json:"ipv6,omitempty"`
}

// networks returns the Go networks to look up, "ip4" and/or "ip6".
func (v *IPVersions) networks() []string {
	if v == nil {
		return []string{"ip4", "ip6"}
	}
	on := func(this, other *bool) bool {
		return (this != nil && *this) || (this == nil && (other == nil || !*other))
	}
	var out []string
	if on(v.IPv4, v.IPv6) {
		out = append(out, "ip4")
	}
	if on(v.IPv6, v.IPv4) {
		out = append(out, "ip6")
	}
	return out
}

// lookupAddrs looks up the addresses of host for each of families ("ip4",
// "ip6"), one query type at a time, so that a failed AAAA query fails the
// lookup instead of quietly dropping the IPv6 upstreams. A family the name
// has no records of adds no address; if no family has any, the answer is
// the not-found error, which isNotFound tells.
func lookupAddrs(ctx context.Context, r *net.Resolver, host string, families []string) ([]netip.Addr, error) {
	var out []netip.Addr
	var notFound error
	for _, family := range families {
		addrs, err := r.LookupNetIP(ctx, family, host)
		if err != nil {
			if isNotFound(err) {
				notFound = err
				continue
			}
			return nil, lookupError(r, err)
		}
		for _, a := range addrs {
			out = append(out, a.Unmap())
		}
	}
	if len(out) == 0 && notFound != nil {
		return nil, lookupError(r, notFound)
	}
	return out, nil
}

// isNotFound tells an answer that the name or its records do not exist
// (NXDOMAIN, or NOERROR with no records) from a failure to get an answer.
func isNotFound(err error) bool {
	dnsErr := (*net.DNSError)(nil)
	return errors.As(err, &dnsErr) && dnsErr.IsNotFound
}

// lookupError drops the server from a DNS error of a resolver of ours:
// Go names the server of resolv.conf it meant to ask, not the one it was
// dialled to. The logs and the admin API name the configured resolvers.
// Go's resolver may hand one error to several lookups at once, so the
// error is copied, not changed.
func lookupError(r *net.Resolver, err error) error {
	if dnsErr, ok := err.(*net.DNSError); ok && r != net.DefaultResolver && dnsErr.Server != "" {
		cp := *dnsErr
		cp.Server = ""
		return &cp
	}
	return err
}

// CaddyModule returns the Caddy module information.
func (AUpstreams) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  upstreamSourceNamespace + ".a",
		New: func() caddy.Module { return new(AUpstreams) },
	}
}

// Provision replaces global placeholders, fills in defaults and builds
// the resolver.
func (au *AUpstreams) Provision(ctx caddy.Context) error {
	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		return fmt.Errorf("registering metrics: %w", err)
	}
	repl := caddy.NewReplacer()
	au.Name = repl.ReplaceAll(au.Name, "")
	au.Port = repl.ReplaceAll(au.Port, "")
	if au.Refresh == 0 {
		au.Refresh = caddy.Duration(defaultRefresh)
	}
	// An empty port is left for Validate to name; the source's name
	// needs a number.
	port, err := parseSourcePort(au.Port)
	if err != nil && au.Port != "" {
		return err
	}
	au.port = strconv.Itoa(port)
	au.families = au.Versions.networks()
	if au.resolver, err = newResolver(au.Resolver, au.DialTimeout, au.FallbackDelay, time.Duration(au.Refresh)); err != nil {
		return err
	}
	au.watcher, err = newSourceWatcher(au.sourceName(), time.Duration(au.Refresh), 0, au.lookup, ctx.Logger(),
		zap.Strings("resolvers", resolverList(au.Resolver)))
	return err
}

// Validate checks the configuration without changing it.
func (au *AUpstreams) Validate() error {
	if au.Name == "" {
		return errors.New("name: required: the domain name to look up")
	}
	if au.Port == "" {
		return errors.New("port: required: the port of the upstreams")
	}
	if _, err := parseSourcePort(au.Port); err != nil {
		return err
	}
	if err := validateLookupTimes(au.Refresh, au.DialTimeout, 0); err != nil {
		return err
	}
	if au.Resolver != nil {
		if _, err := au.Resolver.parse(); err != nil {
			return err
		}
	}
	if len(au.Versions.networks()) == 0 {
		return errors.New("versions: ipv4 and ipv6 are both false: there is nothing to look up")
	}
	return nil
}

// Cleanup releases the source's shared status.
func (au *AUpstreams) Cleanup() error {
	if au.watcher != nil {
		au.watcher.release()
	}
	return nil
}

// Watch implements UpstreamSource.
func (au *AUpstreams) Watch(ctx context.Context, update func([]DiscoveredUpstream)) {
	au.watcher.run(ctx, update, nil)
}

func (au *AUpstreams) watchRounds(ctx context.Context, update func([]DiscoveredUpstream), attempted func()) {
	au.watcher.run(ctx, update, attempted)
}

// Status implements UpstreamSource.
func (au *AUpstreams) Status() []SourceStatus {
	return []SourceStatus{au.watcher.state.status(au.watcher.name)}
}

// sourceName names the lookup in logs, metrics and the admin API.
func (au *AUpstreams) sourceName() string {
	return "a:" + net.JoinHostPort(au.Name, au.port)
}

// lookup looks the name up once.
func (au *AUpstreams) lookup(ctx context.Context) ([]DiscoveredUpstream, error) {
	addrs, err := lookupAddrs(ctx, au.resolver, au.Name, au.families)
	if err != nil {
		return nil, err
	}
	name := au.watcher.name
	set := make([]DiscoveredUpstream, 0, len(addrs))
	for _, a := range addrs {
		set = append(set, DiscoveredUpstream{Dial: net.JoinHostPort(a.String(), au.port), Weight: 1, Source: name})
	}
	return mergeDuplicates(set), nil
}

// SRVUpstreams finds upstreams by an SRV lookup: each record's target is
// resolved (A and AAAA) through the same resolvers, and each of its
// addresses with the record's port is an upstream `ip:port`. The record's
// priority is the upstream's tier (the lowest serves first), its weight
// the upstream's weight. The lookups run in the background every refresh
// interval; a failed or empty lookup keeps the last good set.
//
// Upstreams are dialled and hashed by address, never by the target's
// name: a connection never waits for a lookup, a target known only to the
// configured resolver (Consul's `*.node.consul`) is still reachable, and
// an upstream's health and counts follow the address that is dialled.
//
// An SRV weight of 0 (RFC 2782: "a very small chance of being selected")
// becomes weight 1, the smallest share godist gives. A target that
// resolves to several addresses gives each one the record's weight; two
// records that come to the same address add their weights (the lowest
// priority of the two wins). A record whose target is "." (RFC 2782: no
// service) adds nothing. A target that no longer exists is left out; any
// other failure to resolve a target fails the whole lookup.
type SRVUpstreams struct {
	// The service label, without its underscore: `postgres` for
	// `_postgres._tcp.<name>`. Given with Proto, or not at all.
	//
	// Default: none.
	Service string `json:"service,omitempty"`

	// The protocol label, without its underscore: `tcp` or `udp`. Given
	// with Service, or not at all.
	//
	// Default: none.
	Proto string `json:"proto,omitempty"`

	// The domain name; or, with Service and Proto empty, the whole SRV
	// name to look up (`_postgres._tcp.db.ns.svc.cluster.local`). Global
	// placeholders are replaced when the config loads, here and in
	// Service and Proto.
	//
	// Default: none; required.
	Name string `json:"name,omitempty"`

	// How often to look the records up again. Zero or unset means the
	// default; each lookup may take at most this long (and never more
	// than 10s).
	//
	// Default: 1m.
	Refresh caddy.Duration `json:"refresh,omitempty"`

	// How long to keep serving the last good set once lookups start
	// failing. When it has passed with every lookup failing, the source
	// withdraws its upstreams (the handler serves as if the source had
	// never answered) until a lookup succeeds again. 0 keeps the last
	// good set for as long as lookups fail.
	//
	// Default: 0 (keep it).
	GracePeriod caddy.Duration `json:"grace_period,omitempty"`

	// The DNS resolvers to ask, for the SRV records and their targets.
	// Unset means the system's resolver.
	//
	// Default: the system's resolver.
	Resolver *UpstreamResolver `json:"resolver,omitempty"`

	// With Resolver, how long to wait for a connection to a resolver.
	// Zero means only the lookup's own bound applies.
	//
	// Default: 0.
	DialTimeout caddy.Duration `json:"dial_timeout,omitempty"`

	// With Resolver, the RFC 6555 Fast Fallback delay for a resolver
	// named by a host name. Zero means Go's 300ms; negative disables it.
	//
	// Default: 0 (300ms).
	FallbackDelay caddy.Duration `json:"dial_fallback_delay,omitempty"`

	// The network to dial the upstreams with, written in front of each
	// dial address (`tcp4/10.0.0.7:5432`): tcp, tcp4, tcp6, udp, udp4 or
	// udp6. One ending in 4 or 6 also resolves the targets to that family
	// only. Empty dials with the listener's network, both families.
	//
	// Default: empty.
	DialNetwork string `json:"dial_network,omitempty"`

	families []string
	resolver *net.Resolver
	watcher  *sourceWatcher
}

// CaddyModule returns the Caddy module information.
func (SRVUpstreams) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  upstreamSourceNamespace + ".srv",
		New: func() caddy.Module { return new(SRVUpstreams) },
	}
}

// Provision replaces global placeholders, fills in defaults and builds
// the resolver.
func (su *SRVUpstreams) Provision(ctx caddy.Context) error {
	if err := registerMetrics(ctx.GetMetricsRegistry()); err != nil {
		return fmt.Errorf("registering metrics: %w", err)
	}
	repl := caddy.NewReplacer()
	su.Service = repl.ReplaceAll(su.Service, "")
	su.Proto = repl.ReplaceAll(su.Proto, "")
	su.Name = repl.ReplaceAll(su.Name, "")
	if su.Refresh == 0 {
		su.Refresh = caddy.Duration(defaultRefresh)
	}
	su.families = []string{"ip4", "ip6"}
	switch {
	case strings.HasSuffix(su.DialNetwork, "4"):
		su.families = []string{"ip4"}
	case strings.HasSuffix(su.DialNetwork, "6"):
		su.families = []string{"ip6"}
	}
	var err error
	if su.resolver, err = newResolver(su.Resolver, su.DialTimeout, su.FallbackDelay, time.Duration(su.Refresh)); err != nil {
		return err
	}
	su.watcher, err = newSourceWatcher(su.sourceName(), time.Duration(su.Refresh), time.Duration(su.GracePeriod), su.lookup,
		ctx.Logger(), zap.Strings("resolvers", resolverList(su.Resolver)))
	return err
}

// Validate checks the configuration without changing it.
func (su *SRVUpstreams) Validate() error {
	if su.Name == "" {
		return errors.New("name: required: the SRV name, or the domain after service and proto")
	}
	if (su.Service == "") != (su.Proto == "") {
		return fmt.Errorf("service %q, proto %q: give both or neither", su.Service, su.Proto)
	}
	for _, l := range []struct{ field, label string }{{"service", su.Service}, {"proto", su.Proto}} {
		if strings.HasPrefix(l.label, "_") || strings.Contains(l.label, ".") {
			return fmt.Errorf("%s %q: must be one label, without its underscore", l.field, l.label)
		}
	}
	if err := validateLookupTimes(su.Refresh, su.DialTimeout, su.GracePeriod); err != nil {
		return err
	}
	if su.Resolver != nil {
		if _, err := su.Resolver.parse(); err != nil {
			return err
		}
	}
	return checkDialNetwork(su.DialNetwork)
}

// checkDialNetwork checks an SRV source's dial_network.
func checkDialNetwork(network string) error {
	switch network {
	case "", "tcp", "tcp4", "tcp6", "udp", "udp4", "udp6":
		return nil
	}
	return fmt.Errorf("dial_network %q: must be tcp, tcp4, tcp6, udp, udp4 or udp6", network)
}

// Cleanup releases the source's shared status.
func (su *SRVUpstreams) Cleanup() error {
	if su.watcher != nil {
		su.watcher.release()
	}
	return nil
}

// Watch implements UpstreamSource.
func (su *SRVUpstreams) Watch(ctx context.Context, update func([]DiscoveredUpstream)) {
	su.watcher.run(ctx, update, nil)
}

func (su *SRVUpstreams) watchRounds(ctx context.Context, update func([]DiscoveredUpstream), attempted func()) {
	su.watcher.run(ctx, update, attempted)
}

// Status implements UpstreamSource.
func (su *SRVUpstreams) Status() []SourceStatus {
	return []SourceStatus{su.watcher.state.status(su.watcher.name)}
}

// srvName is the name looked up, as RFC 2782 writes it.
func (su *SRVUpstreams) srvName() string {
	if su.Service == "" {
		return su.Name
	}
	return "_" + su.Service + "._" + su.Proto + "." + su.Name
}

// sourceName names the lookup in logs, metrics and the admin API.
func (su *SRVUpstreams) sourceName() string {
	return "srv:" + su.srvName()
}

// lookup looks the SRV records up once, then resolves their targets
// concurrently (at most maxConcurrentTargets at a time).
func (su *SRVUpstreams) lookup(ctx context.Context) ([]DiscoveredUpstream, error) {
	_, records, err := su.resolver.LookupSRV(ctx, su.Service, su.Proto, su.Name)
	if err != nil {
		err = lookupError(su.resolver, err)
		// Go returns the valid records beside an error when some
		// records had invalid names; those alone are not a failure.
		if len(records) == 0 {
			return nil, err
		}
		su.watcher.warnLog.logAt(su.watcher.logger, zapcore.WarnLevel, "SRV records with invalid names left out",
			append(su.watcher.fields, zap.Error(err))...)
	}

	type target struct {
		name  string
		addrs []netip.Addr
		err   error
	}
	targets := make(map[string]*target)
	for _, rec := range records {
		if rec.Target != "." && targets[rec.Target] == nil {
			targets[rec.Target] = &target{name: rec.Target}
		}
	}
	var wg sync.WaitGroup
	sem := make(chan struct{}, maxConcurrentTargets)
	for _, t := range targets {
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			t.addrs, t.err = lookupAddrs(ctx, su.resolver, t.name, su.families)
			if isNotFound(t.err) {
				t.err = nil // a target gone since the SRV answer: left out
			}
		})
	}
	wg.Wait()

	name := su.watcher.name
	prefix := ""
	if su.DialNetwork != "" {
		prefix = su.DialNetwork + "/"
	}
	var set []DiscoveredUpstream
	for _, rec := range records {
		t := targets[rec.Target]
		if t == nil {
			continue
		}
		if t.err != nil {
			return nil, fmt.Errorf("resolving target %s: %w", t.name, t.err)
		}
		port := strconv.Itoa(int(rec.Port))
		for _, a := range t.addrs {
			set = append(set, DiscoveredUpstream{
				Dial:   prefix + net.JoinHostPort(a.String(), port),
				Weight: max(int(rec.Weight), 1),
				Tier:   int(rec.Priority),
				Source: name,
			})
		}
	}
	return mergeDuplicates(set), nil
}

// mergeDuplicates sorts a set by dial address and merges the entries of
// one address: the lowest tier wins, and the weights of that tier add up
// (two records for one address are one upstream with both shares).
func mergeDuplicates(set []DiscoveredUpstream) []DiscoveredUpstream {
	sortByDial(set) // by dial, then tier: a dial's lowest tier comes first
	out := set[:0]
	for _, u := range set {
		if n := len(out); n > 0 && out[n-1].Dial == u.Dial {
			if out[n-1].Tier == u.Tier {
				out[n-1].Weight += u.Weight
			}
			continue
		}
		out = append(out, u)
	}
	return out
}

// parseSourcePort checks a source's port.
func parseSourcePort(s string) (int, error) {
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 || n > 65535 {
		return 0, fmt.Errorf("port %q: must be a port number, 1-65535", s)
	}
	return n, nil
}

// validateLookupTimes checks the durations the DNS sources share.
func validateLookupTimes(refresh, dialTimeout, grace caddy.Duration) error {
	for _, d := range []struct {
		name  string
		value caddy.Duration
	}{{"refresh", refresh}, {"dial_timeout", dialTimeout}, {"grace_period", grace}} {
		if d.value < 0 {
			return fmt.Errorf("%s %s: must not be negative", d.name, time.Duration(d.value))
		}
	}
	return nil
}

// resolverList is what the logs say of the resolvers asked.
func resolverList(r *UpstreamResolver) []string {
	if r == nil {
		return []string{"system"}
	}
	return r.Addresses
}

// Interface guards
var (
	_ caddy.Provisioner  = (*AUpstreams)(nil)
	_ caddy.Validator    = (*AUpstreams)(nil)
	_ caddy.CleanerUpper = (*AUpstreams)(nil)
	_ UpstreamSource     = (*AUpstreams)(nil)
	_ roundReporter      = (*AUpstreams)(nil)
	_ caddy.Provisioner  = (*SRVUpstreams)(nil)
	_ caddy.Validator    = (*SRVUpstreams)(nil)
	_ caddy.CleanerUpper = (*SRVUpstreams)(nil)
	_ UpstreamSource     = (*SRVUpstreams)(nil)
	_ roundReporter      = (*SRVUpstreams)(nil)
)
