// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package pipe

import (
	"sync"
	"sync/atomic"
	"time"

	"github.com/bcca9c24/caddy-godist/internal/ilist"
)

// The sweeper parks flows idle for a moment: every sweepInterval it looks
// at the flows that can park and run in Go's poller, and asks those that
// moved nothing for parkAfterTicks ticks (25 to 50 ms) to park. Parked
// flows are not listed, so a process with many idle connections costs the
// sweeper nothing. Its goroutine runs while any flow is listed and ends
// when the last one parks or ends; the next flow listed starts it again.
const (
	sweepInterval  = 25 * time.Millisecond
	parkAfterTicks = 2
)

// sweepTick counts the sweeper's rounds: a clock coarse enough that
// reading it costs a flow nothing on every chunk.
var sweepTick atomic.Uint32

// flowSweeper lists the flows that could park and are running, across
// pipes, for the sweeper. A flow's owner adds it when it starts or
// resumes and removes it when it parks or ends.
type flowSweeper struct {
	mu       sync.Mutex
	list     ilist.List[flow, *flow]
	sweeping bool // its goroutine runs
}

var sweeper flowSweeper

func (s *flowSweeper) add(f *flow) {
	s.mu.Lock()
	s.list.Push(f)
	if !s.sweeping {
		s.sweeping = true
		go s.sweep()
	}
	s.mu.Unlock()
}

func (s *flowSweeper) remove(f *flow) {
	s.mu.Lock()
	s.list.Remove(f)
	s.mu.Unlock()
}

// running reports whether the sweeper's goroutine runs.
func (s *flowSweeper) running() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.sweeping
}

// sweep is the sweeper's loop. It ends when no flow is listed.
func (s *flowSweeper) sweep() {
	ticker := time.NewTicker(sweepInterval)
	defer ticker.Stop()
	var idle []*flow
	for range ticker.C {
		tick := sweepTick.Add(1)
		s.mu.Lock()
		if s.list.Len() == 0 {
			s.sweeping = false
			s.mu.Unlock()
			return
		}
		idle = idle[:0]
		s.list.Each(func(f *flow) {
			if tick-f.lastTick.Load() >= parkAfterTicks {
				idle = append(idle, f)
			}
		})
		s.mu.Unlock()
		for _, f := range idle {
			f.requestDetach()
		}
		clear(idle) // hold no flow until the next round
	}
}
