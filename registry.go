// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"crypto/sha256"
	"encoding/hex"
	"slices"
	"strconv"
	"strings"
	"sync"

	"github.com/bcca9c24/caddy-godist/internal/ilist"
)

// This file keeps track of what is running, for the admin API and the
// metrics: the godist handlers of the loaded configs, and the connections
// flowing through each.

// handlerRegistry lists the provisioned godist handlers, in the order they
// were provisioned. A handler joins in Provision and leaves in Cleanup, so
// during a reload both configs' handlers are listed for a moment.
type handlerRegistry struct {
	mu       sync.Mutex
	handlers []*Handler
}

var liveHandlers handlerRegistry

func (r *handlerRegistry) add(h *Handler) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.handlers = append(r.handlers, h)
}

func (r *handlerRegistry) remove(h *Handler) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if i := slices.Index(r.handlers, h); i >= 0 {
		r.handlers = slices.Delete(r.handlers, i, i+1)
	}
}

// list returns the handlers now registered.
func (r *handlerRegistry) list() []*Handler {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.handlers)
}

// sessionList holds the connections flowing through one handler, so that
// the admin API can tell which of them a change of upstreams would move.
// It is an intrusive doubly linked list: adding and removing a connection
// allocates nothing and takes one short lock.
type sessionList struct {
	mu   sync.Mutex
	list ilist.List[session, *session]
}

func (l *sessionList) add(s *session) {
	l.mu.Lock()
	l.list.Push(s)
	l.mu.Unlock()
}

func (l *sessionList) remove(s *session) {
	l.mu.Lock()
	l.list.Remove(s)
	l.mu.Unlock()
}

// len returns the number of connections flowing now.
func (l *sessionList) len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.list.Len()
}

// appendTo appends the connections flowing to the upstream dialled at dial
// to dst, for closing them (outside the lock: see operate.go).
func (l *sessionList) appendTo(dst []*session, dial string) []*session {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.list.Each(func(s *session) {
		if s.upstream.dial == dial {
			dst = append(dst, s)
		}
	})
	return dst
}

// countTo returns the number of connections flowing to the upstream
// dialled at dial.
func (l *sessionList) countTo(dial string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	l.list.Each(func(s *session) {
		if s.upstream.dial == dial {
			n++
		}
	})
	return n
}

// liveSession is what the admin API learns of a flowing connection.
type liveSession struct {
	key      string
	upstream string // dial address
}

// snapshot returns the flowing connections' keys and upstreams.
func (l *sessionList) snapshot() []liveSession {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := make([]liveSession, 0, l.list.Len())
	l.list.Each(func(s *session) {
		out = append(out, liveSession{key: s.key, upstream: s.upstream.dial})
	})
	return out
}

// fingerprint digests everything that decides where a key goes: the
// scoring function's version, the hash key, and each upstream's dial
// address, weight and tier. The order of the upstreams does not decide a pick,
// so it does not change the fingerprint either. Two Caddy instances with
// the same fingerprint send every key to the same upstream.
//
// It is the first 16 hex digits of the SHA-256 of fingerprintText, which
// the admin API shows so that anyone can recompute it.
func fingerprint(hashKey string, upstreams []*Upstream) string {
	return digest16(fingerprintText(hashKey, upstreams))
}

// digest16 is the first 16 hex digits of the SHA-256 of text: the
// fingerprints' and the operator states' digests.
func digest16(text string) string {
	sum := sha256.Sum256([]byte(text))
	return hex.EncodeToString(sum[:])[:16]
}

// fingerprintText is what fingerprint digests: HashVersion, the quoted
// hash key, then one line per upstream, its quoted dial address and its
// weight, and for an upstream of a tier other than 0, "tier" and the tier
// number, sorted; each line ends in a newline. A list without tiers
// digests as it did before tiers existed, so that its fingerprint stays.
func fingerprintText(hashKey string, upstreams []*Upstream) string {
	if hashKey == "" {
		hashKey = HashKeyIPPort
	}
	lines := make([]string, 0, len(upstreams))
	for _, u := range upstreams {
		if u == nil {
			continue
		}
		line := strconv.Quote(u.Dial) + " " + strconv.Itoa(max(u.Weight, 1))
		if u.Tier != 0 {
			line += " tier " + strconv.Itoa(u.Tier)
		}
		lines = append(lines, line)
	}
	slices.Sort(lines)
	var b strings.Builder
	b.WriteString(HashVersion + "\n" + strconv.Quote(hashKey) + "\n")
	for _, line := range lines {
		b.WriteString(line + "\n")
	}
	return b.String()
}
