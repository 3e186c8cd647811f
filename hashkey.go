// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/mholt/caddy-l4/layer4"
)

// The two built-in values of hash_key. Anything else must be a string with
// at least one Caddy placeholder in it.
const (
	HashKeyIPPort = "ip_port"
	HashKeyIP     = "ip"
)

// hashKeyKind says how a connection's hash key is made.
type hashKeyKind uint8

const (
	keyIPPort   hashKeyKind = iota // the client's address with its port, godist's key
	keyIP                          // the client's address without the port
	keyTemplate                    // a string with placeholders, per connection
)

func (k hashKeyKind) String() string {
	switch k {
	case keyIPPort:
		return HashKeyIPPort
	case keyIP:
		return HashKeyIP
	case keyTemplate:
		return "placeholder"
	}
	return "unknown"
}

// hashKey makes connections' hash keys, for the handler and for the
// selection policy alike.
type hashKey struct {
	kind     hashKeyKind
	template string // the hash_key with placeholders, for keyTemplate
}

// newHashKey checks a hash_key value and returns what makes its keys.
func newHashKey(s string) (hashKey, error) {
	kind, err := parseHashKey(s)
	return hashKey{kind: kind, template: s}, err
}

// of returns the string a connection is hashed by.
func (k hashKey) of(cx *layer4.Connection) string {
	switch k.kind {
	case keyIPPort:
	case keyIP:
		return addrKey(cx.RemoteAddr(), false)
	case keyTemplate:
		// An unknown or empty placeholder means this connection lacks what
		// the key is made of (no TLS server name, say): fall back to godist's
		// key rather than send all such clients to one upstream.
		if key, err := cx.Replacer().ReplaceOrErr(k.template, true, true); err == nil && key != "" {
			return key
		}
	}
	return addrKey(cx.RemoteAddr(), true)
}

// parseHashKey checks a hash_key value and says what kind it is. The empty
// string is the default, ip_port.
func parseHashKey(s string) (hashKeyKind, error) {
	switch s {
	case "", HashKeyIPPort:
		return keyIPPort, nil
	case HashKeyIP:
		return keyIP, nil
	}
	// A string without a placeholder would send every connection to one
	// upstream; that is far more often a typo ("ipport") than a wish.
	open := strings.IndexByte(s, '{')
	if open < 0 || !strings.Contains(s[open:], "}") {
		return 0, fmt.Errorf("hash_key %q: must be %s, %s, or a string with a {placeholder}", s, HashKeyIPPort, HashKeyIP)
	}
	return keyTemplate, nil
}

// addrKey returns the hash key of a client address: for ip_port the address
// as Go prints it ("1.2.3.4:5678", "[2001:db8::1]:5678"), for ip the same
// without the port. An IPv4-mapped IPv6 address counts as its IPv4 form, so
// a client hashes alike on an IPv4 and on a dual-stack listener. An address
// that is not IP (a unix socket peer, say) is used as it prints.
func addrKey(addr net.Addr, withPort bool) string {
	ap, ok := addrPort(addr)
	if !ok {
		if addr == nil {
			return ""
		}
		return addr.String()
	}
	ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	if withPort {
		return ap.String()
	}
	return ap.Addr().String()
}

// addrPort extracts an IP address and port from the address types Go's
// network stack and caddy-l4 hand out, falling back to parsing its text.
func addrPort(addr net.Addr) (netip.AddrPort, bool) {
	switch a := addr.(type) {
	case *net.TCPAddr:
		ap := a.AddrPort()
		return ap, ap.Addr().IsValid()
	case *net.UDPAddr:
		ap := a.AddrPort()
		return ap, ap.Addr().IsValid()
	case nil:
		return netip.AddrPort{}, false
	}
	ap, err := netip.ParseAddrPort(addr.String())
	return ap, err == nil
}
