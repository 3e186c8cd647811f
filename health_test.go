// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"context"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

// TestCutShortCheckNotCounted: an active check that its config's unloading
// cuts short (its context ends while it waits for the reply) is not
// counted against the upstream, whose state the config replacing it may
// share and still check; one that runs its course is.
func TestCutShortCheckNotCounted(t *testing.T) {
	slow := startBackend(t, "slow", "", func(_ *backend, c net.Conn) {
		time.Sleep(200 * time.Millisecond)
		_, _ = c.Write([]byte("OK\n"))
	})
	h := &Handler{logger: zap.NewNop(), HealthChecks: &HealthChecks{Active: &ActiveHealthChecks{
		Timeout: caddy.Duration(testTimeout), Expect: "OK", Rise: 1, Fall: 1,
	}}, opStore: newOpStore(defaultHandlerName, &opHolder{})}
	u, err := takeUpstream(slow.addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(u.releaseConfig)
	u.state.checkerStarted()
	t.Cleanup(u.state.checkerStopped)

	ctx, cancel := context.WithCancel(context.Background())
	c := &checker{u: u, cancel: cancel}
	done := make(chan struct{})
	go func() {
		defer close(done)
		h.checkAndRecord(ctx, c)
	}()
	eventually(t, testTimeout, "the check connected", func() error {
		if slow.accepted.Load() == 0 {
			return fmt.Errorf("not yet")
		}
		return nil
	})
	cancel()
	select {
	case <-done:
	case <-time.After(testTimeout):
		t.Fatal("a check went on after its context ended")
	}
	if since, last, lastErr := u.state.activeCheckState(); u.state.activeDown.Load() || !last.IsZero() || lastErr != "" || !since.IsZero() {
		t.Fatalf("a check cut short was counted: down %v, last check %v, error %q", u.state.activeDown.Load(), last, lastErr)
	}

	h.checkAndRecord(context.Background(), &checker{u: u, cancel: func() {}})
	if _, last, lastErr := u.state.activeCheckState(); last.IsZero() || lastErr != "" || u.state.activeDown.Load() {
		t.Fatalf("a check that ran its course: last check %v, error %q, down %v", last, lastErr, u.state.activeDown.Load())
	}
}
