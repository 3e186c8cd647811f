// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package workers

import (
	"runtime"
	"sync"
	"testing"
	"time"
)

// waitFor polls cond every 10 ms until it holds or timeout passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not within %s: %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestPoolRunsEveryTaskAndShrinks(t *testing.T) {
	base := runtime.NumGoroutine()
	var wg sync.WaitGroup
	var mu sync.Mutex
	ran := make(map[int]int)
	release := make(chan struct{})
	p := New(4, 200*time.Millisecond, func(i int) {
		<-release
		mu.Lock()
		ran[i]++
		mu.Unlock()
		wg.Done()
	})

	// A burst: 50 tasks that all block at once need 50 workers.
	const n = 50
	wg.Add(n)
	for i := range n {
		p.Submit(i)
	}
	if live := p.Live(); live != n {
		t.Fatalf("%d workers for %d blocked tasks, want %d", live, n, n)
	}
	close(release)
	wg.Wait()
	for i := range n {
		if ran[i] != 1 {
			t.Fatalf("task %d ran %d times", i, ran[i])
		}
	}
	// Only maxIdle stay waiting once the burst is over...
	waitFor(t, 2*time.Second, "all but maxIdle workers end", func() bool { return p.Live() <= 4 })
	// ...and they too end after idleTimeout without a task.
	waitFor(t, 2*time.Second, "idle workers end", func() bool { return p.Live() == 0 })
	waitFor(t, 2*time.Second, "goroutines back to the baseline", func() bool { return runtime.NumGoroutine() <= base })
}

func TestPoolReusesWaitingWorkers(t *testing.T) {
	done := make(chan int, 1)
	p := New(2, time.Minute, func(i int) { done <- i })
	for i := range 100 {
		p.Submit(i)
		if got := <-done; got != i {
			t.Fatalf("task %d ran as %d", i, got)
		}
		// the worker that ran it goes back to waiting
		waitFor(t, time.Second, "the worker waits again", func() bool { return p.Idle() == 1 })
	}
	if live := p.Live(); live != 1 {
		t.Fatalf("%d workers for 100 tasks in a row, want 1", live)
	}
}
