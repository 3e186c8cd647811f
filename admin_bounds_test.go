// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"syscall"
	"testing"
	"time"
)

// These tests send the admin API what once kept a core busy for half a
// minute, through a real Caddy on loopback: a plan of 10,000 upstreams, a
// client that gives up on one, plans at once, and oversized input.

// proposedUpstreams returns a plan's body of n upstreams: the dials given,
// then made-up ones; the first made-up one of weight 2 when weighted, for
// the dearer scores.
func proposedUpstreams(t *testing.T, n int, weighted bool, dials ...string) []byte {
	t.Helper()
	ups := make([]map[string]any, n)
	for i := range ups {
		ups[i] = map[string]any{"dial": fmt.Sprintf("10.%d.%d.%d:5432", i>>16&0xff, i>>8&0xff, i&0xff)}
		if i < len(dials) {
			ups[i]["dial"] = dials[i]
		}
	}
	if weighted {
		ups[len(dials)]["weight"] = 2
	}
	b, err := json.Marshal(map[string]any{"upstreams": ups})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// postPlan sends a plan's body with ctx and returns the status and body of
// the answer, or the error of a request that got none.
func (c *testCaddy) postPlan(ctx context.Context, body []byte) (int, []byte, http.Header, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://"+c.admin+"/godist/plan", bytes.NewReader(body))
	if err != nil {
		return 0, nil, nil, err
	}
	client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := client.Do(req)
	if err != nil {
		return 0, nil, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, resp.Header, err
}

// TestAdminPlanTenThousand plans 10,000 upstreams, which once took half a
// minute of a core, and checks that it is answered promptly with a scaled
// sample whose stated margin covers what rendezvous hashing moves.
func TestAdminPlanTenThousand(t *testing.T) {
	current := []string{freeAddr(t), freeAddr(t), freeAddr(t)}
	c := startCaddy(t, map[string]any{"upstreams": upstreamsJSON(current...)})

	// Generous: a plan costs about a second of a core at most (this one
	// 0.4 s), and took 27 s before it was bounded.
	const generous = 15 * time.Second * raceSlowdown
	ctx, cancel := context.WithTimeout(context.Background(), generous)
	defer cancel()
	status, body, _, err := c.postPlan(ctx, proposedUpstreams(t, 10_000, false, current...))
	if err != nil {
		t.Fatalf("a plan of 10,000 upstreams not answered within %s: %v", generous, err)
	}
	if status != http.StatusOK {
		t.Fatalf("%d %s", status, body)
	}
	var got struct {
		KeySpace struct {
			Estimate    string            `json:"estimate"`
			SampledKeys int               `json:"sampled_keys"`
			MovedKeys   int               `json:"moved_keys"`
			MovedShare  float64           `json:"moved_share"`
			Margin      *float64          `json:"moved_share_margin"`
			Upstreams   []json.RawMessage `json:"upstreams"`
		} `json:"key_space"`
	}
	if err := json.Unmarshal(body, &got); err != nil {
		t.Fatalf("decoding %.300s: %v", body, err)
	}
	ks := got.KeySpace
	if ks.SampledKeys <= 0 || ks.SampledKeys >= 100_000 || !strings.Contains(ks.Estimate, fmt.Sprintf("from %d ", ks.SampledKeys)) {
		t.Errorf("sampled %d keys (%q): want a scaled sample, fewer than 100000, stated", ks.SampledKeys, ks.Estimate)
	}
	if ks.Margin == nil || *ks.Margin <= 0 || *ks.Margin > 0.05 {
		t.Fatalf("moved_share_margin %v: want a stated margin of a few percentage points at most", ks.Margin)
	}
	// 3 upstreams kept, 9,997 added: rendezvous hashing moves 9997/10000
	if want := 9997.0 / 10000; ks.MovedShare < want-*ks.Margin || ks.MovedShare > want+*ks.Margin {
		t.Errorf("moved %v ± %v, want %v within the margin", ks.MovedShare, *ks.Margin, want)
	}
	if len(ks.Upstreams) != 10_000 {
		t.Errorf("%d upstreams in the answer, want 10000", len(ks.Upstreams))
	}
}

// cpuTime returns the CPU time this process has used.
func cpuTime(t *testing.T) time.Duration {
	t.Helper()
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		t.Fatalf("getrusage: %v", err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// TestAdminPlanClientGone sends a plan of 10,000 upstreams, whose client
// gives up after 100 ms, and checks that the plan stops: the process,
// with Caddy in it, uses a small part of one core in the second after,
// where a plan working on would keep one busy; and Caddy says why it
// stopped.
func TestAdminPlanClientGone(t *testing.T) {
	name := t.Name()
	capturedMu.Lock()
	delete(captured, name) // from an earlier run of this test (-count)
	capturedMu.Unlock()
	current := []string{freeAddr(t), freeAddr(t), freeAddr(t)}
	c := startCaddyConfig(t, caddyConfig{
		// the admin API logs to the default log only
		Logs: map[string]any{"default": map[string]any{
			"writer":  map[string]any{"output": "godist_test_capture", "name": name},
			"encoder": map[string]any{"format": "json"},
			"level":   "DEBUG",
		}},
		Routes: []map[string]any{godistRoute(map[string]any{"upstreams": upstreamsJSON(current...)})},
	})
	// weighted: the dearest scores, about a second of work
	body := proposedUpstreams(t, 10_000, true, current...)

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if status, b, _, err := c.postPlan(ctx, body); err == nil {
		t.Fatalf("answered within 100ms, before the client gave up: %d %.300s", status, b)
	}
	time.Sleep(200 * time.Millisecond) // for the plan to notice

	const window = time.Second
	start, startCPU := time.Now(), cpuTime(t)
	time.Sleep(window)
	used, elapsed := cpuTime(t)-startCPU, time.Since(start)
	t.Logf("CPU used in the %s after the client left: %s", elapsed.Round(time.Millisecond), used)
	if used > elapsed/4 {
		t.Errorf("the process used %s of CPU in the %s after the client left: the plan went on", used, elapsed.Round(time.Millisecond))
	}

	// the plan saw its client go, and said so
	eventually(t, 5*time.Second, "the stopped plan logged", func() error {
		for _, l := range capturedAdminErrors(t, name) {
			if l["error"] == "plan: stopped before it was done: context canceled" && l["status_code"] == 503.0 {
				return nil
			}
		}
		return fmt.Errorf("no 'plan: stopped' request error among %v", capturedAdminErrors(t, name))
	})
}

// capturedAdminErrors returns the admin API's request errors logged so
// far into the capture named name.
func capturedAdminErrors(t *testing.T, name string) []logLine {
	t.Helper()
	capturedMu.Lock()
	defer capturedMu.Unlock()
	var out []logLine
	if b := captured[name]; b != nil {
		sc := bufio.NewScanner(bytes.NewReader(b.Bytes()))
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			var l logLine
			if json.Unmarshal(sc.Bytes(), &l) == nil && l["logger"] == "admin.api" && l["msg"] == "request error" {
				out = append(out, l)
			}
		}
	}
	return out
}

// TestAdminPlanOneAtATime sends a plan while a plan of maxPlanUpstreams is
// being worked out, and checks that it is refused with 429, saying why,
// and that plans are answered again once the slot is free.
func TestAdminPlanOneAtATime(t *testing.T) {
	current := []string{freeAddr(t), freeAddr(t), freeAddr(t)}
	c := startCaddy(t, map[string]any{"upstreams": upstreamsJSON(current...)})
	small := proposedUpstreams(t, 4, false, current...)

	type answer struct {
		status int
		body   []byte
		err    error
	}
	big := make(chan answer, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), testTimeout*raceSlowdown)
		defer cancel()
		// weighted: the dearest scores, most of a second of work
		status, body, _, err := c.postPlan(ctx, proposedUpstreams(t, maxPlanUpstreams, true, current...))
		big <- answer{status, body, err}
	}()
	eventually(t, 10*time.Second, "the big plan being worked out", func() error {
		if n := len(planSlots); n != maxConcurrentPlans {
			return fmt.Errorf("%d plans being worked out", n)
		}
		return nil
	})

	status, body, header, err := c.postPlan(context.Background(), small)
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("another plan is being worked out: /godist/plan works out %d at a time; retry in a second", maxConcurrentPlans)
	if got := apiErrorMessage(t, adminAnswer{status: status, header: header, body: body}); status != http.StatusTooManyRequests || got != want {
		t.Errorf("a plan beside another: %d %q, want 429 %q", status, got, want)
	}
	if got := header.Get("Retry-After"); got != "1" {
		t.Errorf("Retry-After: %q, want 1", got)
	}

	if a := <-big; a.err != nil || a.status != http.StatusOK {
		t.Fatalf("the big plan: %d %.300s %v", a.status, a.body, a.err)
	}
	if status, body, _, err := c.postPlan(context.Background(), small); err != nil || status != http.StatusOK {
		t.Fatalf("a plan after the big one: %d %.300s %v", status, body, err)
	}
	if n := len(planSlots); n != 0 {
		t.Errorf("%d plans being worked out after every answer", n)
	}
}

// TestAdminPickHugeKey sends a key of a megabyte, more than Caddy's admin
// server reads of a request line and its headers: the server refuses it
// with 431 before godist sees it, and goes on answering.
func TestAdminPickHugeKey(t *testing.T) {
	c := startCaddy(t, map[string]any{"upstreams": upstreamsJSON(freeAddr(t))})
	conn, err := net.DialTimeout("tcp", c.admin, testTimeout)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(testTimeout))
	// The server stops reading at its limit and answers; write from a
	// goroutine, so that the answer is read while the rest is refused.
	go func() {
		_, _ = io.WriteString(conn, "GET /godist/pick?key="+strings.Repeat("k", 1<<20)+" HTTP/1.1\r\nHost: "+c.admin+"\r\n\r\n")
	}()
	line, err := bufio.NewReader(conn).ReadString('\n')
	if f := strings.Fields(line); err != nil || len(f) < 2 || !strings.HasPrefix(f[0], "HTTP/") || f[1] != "431" {
		t.Fatalf("a key of a megabyte: %q, %v; want a 431", line, err)
	}
	if got := c.pick(t, "key=k"); len(got) != 1 {
		t.Fatalf("pick after the huge key: %+v", got)
	}
}
