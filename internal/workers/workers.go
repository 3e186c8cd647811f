// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

// Package workers runs tasks on goroutines kept for reuse, so that a task
// starts on a goroutine whose stack has already grown to what such tasks
// need, instead of growing (copying) a fresh one each time, and so that a
// burst of tasks does not leave a goroutine behind for each.
//
// The rules:
//   - Submit never blocks: it hands the task to a worker waiting for one, or
//     starts a new worker.
//   - A worker that finishes a task waits for the next one, unless MaxIdle
//     others are waiting already; then it ends.
//   - A worker that waits for IdleTimeout without a task ends. After a burst
//     the pool shrinks back to nothing within IdleTimeout of its last task.
package workers

import (
	"sync/atomic"
	"time"
)

// Pool runs tasks of type T with its run function.
type Pool[T any] struct {
	run         func(T)
	maxIdle     int32
	idleTimeout time.Duration

	work chan T       // unbuffered: a send succeeds only into a waiting worker
	idle atomic.Int32 // workers waiting for a task
	live atomic.Int32 // workers running or waiting
}

// New returns a pool that runs tasks with run, keeps at most maxIdle
// workers waiting, and ends a worker that waited idleTimeout.
func New[T any](maxIdle int, idleTimeout time.Duration, run func(T)) *Pool[T] {
	return &Pool[T]{run: run, maxIdle: int32(maxIdle), idleTimeout: idleTimeout, work: make(chan T)} //nolint:gosec // a small configured bound
}

// Submit runs task on a waiting worker, or on a new one if none waits.
func (p *Pool[T]) Submit(task T) {
	select {
	case p.work <- task:
	default:
		p.live.Add(1)
		go p.worker(task)
	}
}

// worker runs task, then the tasks handed to it, until it has waited
// idleTimeout for one or too many others wait.
func (p *Pool[T]) worker(task T) {
	defer p.live.Add(-1)
	var timer *time.Timer // made once, at the first wait
	for {
		p.run(task)
		if p.idle.Add(1) > p.maxIdle {
			p.idle.Add(-1)
			return
		}
		if timer == nil {
			timer = time.NewTimer(p.idleTimeout)
		} else {
			timer.Reset(p.idleTimeout) // Go 1.23+: no stale tick can be received after Reset
		}
		select {
		case task = <-p.work:
			p.idle.Add(-1)
		case <-timer.C:
			p.idle.Add(-1)
			return
		}
	}
}

// Live returns the number of workers running a task or waiting for one.
func (p *Pool[T]) Live() int { return int(p.live.Load()) }

// Idle returns the number of workers waiting for a task.
func (p *Pool[T]) Idle() int { return int(p.idle.Load()) }
