// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package pipe

import (
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/bcca9c24/caddy-godist/internal/workers"
)

// The engine's process-wide parts: the pool of workers that run flows, the
// holders that keep the reactor running, and the logger for the engine's
// own troubles (a reactor that fails, a socket that cannot park), which no
// single pipe owns.

// workerIdleTimeout is how long a flow worker waits for a task before it
// ends; maxIdleWorkers bound how many wait.
const (
	workerIdleTimeout = 3 * time.Second
	maxIdleWorkers    = 64
)

// flowWorkers runs flows. It is set in init: a flow's run hands flows to
// the pool in turn.
var flowWorkers *workers.Pool[*flow]

func init() {
	flowWorkers = workers.New(maxIdleWorkers, workerIdleTimeout, (*flow).run)
}

// Lease is a holder's claim on the engine, for as long as it may start
// pipes: a config's handler takes one when it is provisioned and releases
// it when it is cleaned up. While no lease is held and no flow is parked,
// the reactor is stopped.
type Lease struct {
	released atomic.Bool
}

var (
	loggerMu     sync.Mutex
	engineLogger = zap.NewNop()
)

// Acquire takes a lease on the engine. The engine logs its own troubles
// to logger from now on (the last holder's logger wins).
func Acquire(l *zap.Logger) *Lease {
	if l != nil {
		loggerMu.Lock()
		engineLogger = l
		loggerMu.Unlock()
	}
	theReactor.acquire()
	return new(Lease)
}

// Release gives the lease back. Only the first call counts.
func (l *Lease) Release() {
	if l.released.CompareAndSwap(false, true) {
		theReactor.release()
	}
}

func logger() *zap.Logger {
	loggerMu.Lock()
	defer loggerMu.Unlock()
	return engineLogger
}

// parkRefusals counts the flows that could not park; the first is logged.
var parkRefusals atomic.Uint64

// parkRefusedOnce records that a flow could not park, and logs the first
// time it happens: the flow keeps its goroutine for the rest of its life.
func parkRefusedOnce(err error) {
	if parkRefusals.Add(1) == 1 {
		logger().Warn("an idle connection could not be parked: it keeps its goroutines, and so will others that cannot (counted, not logged again); "+
			"if the error is ENOSPC, raise fs.epoll.max_user_watches",
			zap.Error(err))
	}
}

// openPipes counts the kernel pipes open now, pooled or in use;
// spliceRuns the times a flow turned to splice, since the process started.
var (
	openPipes  atomic.Int64
	spliceRuns atomic.Uint64
)

// Stats is what the engine holds now, process-wide.
type Stats struct {
	Workers        int    // goroutines running flows or waiting for one
	IdleWorkers    int    // of those, the ones waiting
	Parked         int    // flows whose sockets wait in the reactor
	ReactorRunning bool   // an epoll instance and its loop exist
	SweeperRunning bool   // the sweeper's goroutine runs
	Pipes          int64  // kernel pipes open, pooled or in use
	ParkRefusals   uint64 // flows that could not park, since the process started
	SpliceRuns     uint64 // times a flow's traffic turned bulk and went to splice, since the process started
}

// ReadStats returns the engine's state now.
func ReadStats() Stats {
	parked, running := theReactor.status()
	return Stats{
		Workers:        flowWorkers.Live(),
		IdleWorkers:    flowWorkers.Idle(),
		Parked:         parked,
		ReactorRunning: running,
		SweeperRunning: sweeper.running(),
		Pipes:          openPipes.Load(),
		ParkRefusals:   parkRefusals.Load(),
		SpliceRuns:     spliceRuns.Load(),
	}
}

// DrainPipes closes the kernel pipes kept for reuse, at once.
func DrainPipes() { pipes.drain() }
