// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"errors"
	"sync/atomic"
	"syscall"
	"time"
)

// The descriptor budget keeps the process from running out of file
// descriptors because of godist's connections, as HAProxy derives its
// maxconn from the descriptor limit. Running out is worse than refusing a
// connection: caddy-l4 (v0.1.2) stops accepting on a listener for good
// when an accept fails with EMFILE, and every failed dial would look like
// a dead upstream. So once godist's connections hold all but a reserve of
// the process's descriptors, new connections are closed at once, which
// frees their descriptor and keeps the reserve for accepting, matching and
// everything else in Caddy.

// descriptorsPerConn is what one piped connection holds: its client socket
// and its upstream socket. A kernel pipe is taken only while bytes move,
// and the reserve covers those.
const descriptorsPerConn = 2

// budgetRefresh is how often the descriptor limit is read again, so that a
// limit raised or lowered at run time (prlimit) takes effect.
const budgetRefresh = time.Second

type descriptorBudget struct {
	inUse       atomic.Int64 // descriptors held by godist's connections
	limit       atomic.Int64 // descriptors godist's connections may hold
	refreshedAt atomic.Int64 // unix nanoseconds of the last read of the limit
}

var fdBudget descriptorBudget

// acquire takes the descriptors of one connection from the budget, or
// reports that there are none to spare.
func (b *descriptorBudget) acquire() bool {
	limit := b.currentLimit()
	if n := b.inUse.Add(descriptorsPerConn); limit > 0 && n > limit {
		b.inUse.Add(-descriptorsPerConn)
		return false
	}
	return true
}

// release gives back what acquire took.
func (b *descriptorBudget) release() {
	b.inUse.Add(-descriptorsPerConn)
}

// currentLimit returns the budget, reading the process's descriptor limit
// at most once per budgetRefresh. 0 means no budget could be worked out.
func (b *descriptorBudget) currentLimit() int64 {
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
	b.limit.Store(max(nofile-descriptorReserve(nofile), descriptorsPerConn))
	return b.limit.Load()
}

// descriptorReserve is how many descriptors are kept out of godist's
// budget: a twentieth of the limit, at least 64.
func descriptorReserve(limit int64) int64 {
	return max(64, limit/20)
}

// isLocalResourceError reports whether err means this process or machine
// ran short of something (descriptors, buffers, ports), which says nothing
// about the health of the upstream being dialled.
func isLocalResourceError(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM) ||
		errors.Is(err, syscall.EADDRNOTAVAIL)
}
