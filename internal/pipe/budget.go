// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package pipe

import (
	"errors"
	"sync/atomic"
	"time"
)

// Descriptors is the process's descriptor budget: what godist's
// connections and the engine's kernel pipes may hold, as HAProxy derives
// its maxconn from the descriptor limit. Running out is worse than
// refusing a connection: caddy-l4 (v0.1.2) stops accepting on a listener
// for good when an accept fails with EMFILE, and every failed dial would
// look like a dead upstream. So once godist holds all but a reserve of the
// process's descriptors, its user closes new connections at once, and the
// engine copies through buffers instead of taking pipes; the reserve is
// left for accepting, matching and everything else in Caddy.
//
// Who counts what: the user acquires two descriptors for each connection
// it pipes (its client and upstream sockets) before dialling, and releases
// them when the connection is closed; the pipe pool acquires two for each
// kernel pipe it opens and releases them when it closes it. A parked or
// idle flow holds no pipe, so an idle connection holds exactly its two.
var Descriptors Budget

// Budget counts descriptors against the process's limit. The zero value
// is ready to use.
type Budget struct {
	inUse       atomic.Int64 // descriptors counted now
	limit       atomic.Int64 // the most that may be counted; 0 when unknown
	refreshedAt atomic.Int64 // unix nanoseconds of the last read of the limit
}

// budgetRefresh is how often the descriptor limit is read again, so that a
// limit raised or lowered at run time (prlimit) takes effect.
const budgetRefresh = time.Second

// errNoDescriptors is why a pipe could not be had: the budget is spent.
var errNoDescriptors = errors.New("descriptor budget spent")

// Acquire counts n descriptors, or reports that the budget cannot spare
// them (then nothing is counted).
func (b *Budget) Acquire(n int64) bool {
	limit := b.Limit()
	if in := b.inUse.Add(n); limit > 0 && in > limit {
		b.inUse.Add(-n)
		return false
	}
	return true
}

// Release gives back n descriptors that Acquire counted.
func (b *Budget) Release(n int64) {
	b.inUse.Add(-n)
}

// InUse returns the descriptors counted now.
func (b *Budget) InUse() int64 { return b.inUse.Load() }

// Limit returns the budget, reading the process's descriptor limit at most
// once per budgetRefresh: the limit less a reserve of a twentieth of it,
// at least 64. 0 means no budget could be worked out (no limit).
func (b *Budget) Limit() int64 {
	now := time.Now().UnixNano()
	last := b.refreshedAt.Load()
	if now-last < int64(budgetRefresh) || !b.refreshedAt.CompareAndSwap(last, now) {
		return b.limit.Load()
	}
	nofile := descriptorLimit()
	if nofile <= 0 {
		b.limit.Store(0)
		return 0
	}
	b.limit.Store(max(nofile-descriptorReserve(nofile), 2))
	return b.limit.Load()
}

// Refresh makes the next Limit read the process's limit again, at once:
// for a limit just changed.
func (b *Budget) Refresh() { b.refreshedAt.Store(0) }

// descriptorReserve is how many descriptors are kept out of the budget: a
// twentieth of the limit, at least 64.
func descriptorReserve(limit int64) int64 {
	return max(64, limit/20)
}
