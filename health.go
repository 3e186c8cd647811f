// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

// Defaults of the health checks.
const (
	defaultHealthInterval = 10 * time.Second
	defaultHealthTimeout  = 2 * time.Second
	defaultFailDuration   = 10 * time.Second
)

// HealthChecks configures how the handler learns that an upstream is down,
// and that it is back. An upstream that is down is skipped: only the keys
// that hashed to it move, each to its own next choice, and they come back
// when it recovers. If no upstream is healthy, every upstream is still
// tried in the key's order before a connection is given up, because a
// health check can be wrong.
//
// Health is known per dial address and shared by every godist handler and
// config that names the upstream, so a config reload neither forgets a
// dead upstream nor starts over with its counts.
type HealthChecks struct {
	// Active checks probe each upstream in the background. Off unless set.
	Active *ActiveHealthChecks `json:"active,omitempty"`

	// Passive checks count failed dials. On by default, with the defaults
	// of PassiveHealthChecks; set fail_duration to 0 to turn them off.
	Passive *PassiveHealthChecks `json:"passive,omitempty"`
}

// ActiveHealthChecks probe every upstream on a timer, static and
// discovered alike, one background loop per upstream, which ends with the
// config that started it, or when a discovered upstream leaves its
// source's set. A check
// connects to the upstream; with `send` it then writes those bytes, and
// with `expect` the reply must start with those bytes. A check never
// delays a client's connection. For a UDP upstream a check sends `send`
// as one datagram and waits for a reply; without `send` UDP upstreams are
// not checked, since there is nothing to connect to.
type ActiveHealthChecks struct {
	// How often to check each upstream. The first check runs as soon as the
	// config is loaded.
	//
	// Default: 10s.
	Interval caddy.Duration `json:"interval,omitempty"`

	// How long one check may take, connecting and reading the reply, before
	// it counts as failed.
	//
	// Default: 2s.
	Timeout caddy.Duration `json:"timeout,omitempty"`

	// Check this port of the upstream's host instead of the port it is
	// dialled on, for a service with a separate health port. Ignored for
	// unix socket upstreams.
	//
	// Default: 0 (the upstream's own port).
	Port int `json:"port,omitempty"`

	// Consecutive successful checks that bring a down upstream back up.
	//
	// Default: 1.
	Rise int `json:"rise,omitempty"`

	// Consecutive failed checks that take an up upstream down.
	//
	// Default: 1.
	Fall int `json:"fall,omitempty"`

	// Bytes to write after connecting, for a service that must be asked
	// (`PING\r\n` to Redis, say). In the Caddyfile, `\r`, `\n`, `\t`, `\\`,
	// `\xHH` and `\0` are unescaped.
	//
	// Default: empty (send nothing).
	Send string `json:"send,omitempty"`

	// Bytes the upstream's reply must start with for the check to pass (a
	// banner such as `SSH-` or `220 `, or the answer to `send`). Unescaped
	// in the Caddyfile like `send`.
	//
	// Default: empty (a connection is enough).
	Expect string `json:"expect,omitempty"`
}

// PassiveHealthChecks count failed dials: max_fails failed or timed-out
// dials to an upstream within fail_duration take it down for fail_duration,
// as nginx's max_fails and fail_timeout do. They are on by default, so that
// an upstream that silently drops connection attempts costs one
// dial_timeout, not one per connection. With active checks on, an active
// check that passes brings the upstream back at once. A dial that fails for
// want of local resources (file descriptors, ports) does not count.
type PassiveHealthChecks struct {
	// How long a failed dial counts against its upstream. 0 turns passive
	// checks off.
	//
	// Default: 10s.
	FailDuration *caddy.Duration `json:"fail_duration,omitempty"`

	// How many failed dials within fail_duration take an upstream down.
	//
	// Default: 1.
	MaxFails int `json:"max_fails,omitempty"`
}

// provision fills in the defaults of whatever is configured.
func (hc *HealthChecks) provision() {
	if a := hc.Active; a != nil {
		if a.Interval == 0 {
			a.Interval = caddy.Duration(defaultHealthInterval)
		}
		if a.Timeout == 0 {
			a.Timeout = caddy.Duration(defaultHealthTimeout)
		}
		if a.Rise == 0 {
			a.Rise = 1
		}
		if a.Fall == 0 {
			a.Fall = 1
		}
	}
	if hc.Passive == nil {
		hc.Passive = new(PassiveHealthChecks)
	}
	if hc.Passive.FailDuration == nil {
		d := caddy.Duration(defaultFailDuration)
		hc.Passive.FailDuration = &d
	}
	if hc.Passive.MaxFails == 0 {
		hc.Passive.MaxFails = 1
	}
}

// validate checks the health check settings; zero values mean their
// defaults.
func (hc *HealthChecks) validate() error {
	if a := hc.Active; a != nil {
		if a.Interval < 0 {
			return fmt.Errorf("health_checks.active.interval %s: must be positive", time.Duration(a.Interval))
		}
		if a.Timeout < 0 {
			return fmt.Errorf("health_checks.active.timeout %s: must be positive", time.Duration(a.Timeout))
		}
		if a.Port < 0 || a.Port > 65535 {
			return fmt.Errorf("health_checks.active.port %d: must be a port number, 1-65535", a.Port)
		}
		if a.Rise < 0 {
			return fmt.Errorf("health_checks.active.rise %d: must be at least 1", a.Rise)
		}
		if a.Fall < 0 {
			return fmt.Errorf("health_checks.active.fall %d: must be at least 1", a.Fall)
		}
	}
	if p := hc.Passive; p != nil {
		if p.FailDuration != nil && *p.FailDuration < 0 {
			return fmt.Errorf("health_checks.passive.fail_duration %s: must not be negative", time.Duration(*p.FailDuration))
		}
		if p.MaxFails < 0 {
			return fmt.Errorf("health_checks.passive.max_fails %d: must be at least 1", p.MaxFails)
		}
	}
	return nil
}

// passiveEnabled reports whether failed dials count against upstreams.
func (hc *HealthChecks) passiveEnabled() bool {
	return hc.Passive != nil && hc.Passive.FailDuration != nil && *hc.Passive.FailDuration > 0
}

// noticeRecovery clears the failed dials that held u down once they have
// expired, and logs it, once: the routing path calls it when it finds u
// usable with failed dials still on record.
func (h *Handler) noticeRecovery(u *upstream, now int64) {
	until := u.state.downUntil.Load()
	if until != 0 && now >= until && u.state.downUntil.CompareAndSwap(until, 0) {
		u.state.passiveUpAt.Store(until) // it was back from then on
		healthChanges.notify()
		h.logger.Info("upstream back: the failed dials are older than fail_duration", zap.String("upstream", u.dial))
	}
}

// countDialFailure records a failed dial for the passive checks: it counts
// against the upstream for fail_duration.
func (h *Handler) countDialFailure(u *upstream) {
	u.state.dialFailures.Add(1)
	if !h.passive {
		return
	}
	p := h.HealthChecks.Passive
	window := time.Duration(*p.FailDuration)
	if u.state.recordDialFailure(time.Now().UnixNano(), window, p.MaxFails) {
		healthChanges.notify()
		h.logger.Info("upstream down: dials failing",
			zap.String("upstream", u.dial),
			zap.Int("max_fails", p.MaxFails),
			zap.Duration("for", window))
	}
}

// checker is the active check loop of one upstream in one handler. It
// runs from the moment the upstream joins the handler's membership (when
// the handler is provisioned, or when its source finds the upstream)
// until the upstream leaves it or the config is unloaded, whichever comes
// first; so no check loop outlives its config.
//
// Its states: running, then stopped, once. The handler starts and stops
// checkers under its memberMu (syncCheckersLocked, Cleanup). stop sets
// stopped first, so that a check still in flight is not counted after it
// (recordActiveCheck reads the flag under the state's lock), then ends
// the loop, then tells the state that one checker fewer runs.
type checker struct {
	u       *upstream
	cancel  context.CancelFunc
	stopped atomic.Bool
}

// stop ends the checker. It is called once, under the handler's memberMu.
func (c *checker) stop() {
	c.stopped.Store(true)
	c.cancel()
	c.u.state.checkerStopped()
}

// syncCheckersLocked starts a check loop for each upstream of m that has
// none, and stops those of upstreams that are no longer in m. The caller
// holds h.memberMu. A loop's first check runs at once; its later ones are
// spread over the interval by the upstream's place in the pool, rather
// than probing every upstream at the same instant.
func (h *Handler) syncCheckersLocked(m *membership) {
	a := h.HealthChecks.Active
	if a == nil {
		return
	}
	keep := make(map[string]bool, len(m.pool))
	for i, u := range m.pool {
		keep[u.dial] = true
		if _, known := h.checkers[u.dial]; known {
			continue
		}
		if isUDP(u.network) && a.Send == "" {
			h.logger.Warn("not health-checking a UDP upstream: there is nothing to connect to without health_send",
				zap.String("upstream", u.dial))
			h.checkers[u.dial] = nil // known, not checked
			continue
		}
		offset := time.Duration(a.Interval) * time.Duration(i) / time.Duration(len(m.pool))
		ctx, cancel := context.WithCancel(h.runCtx)
		c := &checker{u: u, cancel: cancel}
		u.state.checkerStarted()
		h.checkers[u.dial] = c
		h.goroutines.Go(func() { h.checkLoop(ctx, c, offset) })
	}
	for dial, c := range h.checkers {
		if !keep[dial] {
			if c != nil {
				c.stop()
			}
			delete(h.checkers, dial)
		}
	}
}

// checkLoop checks c's upstream right away, then every interval, until
// ctx is done.
func (h *Handler) checkLoop(ctx context.Context, c *checker, offset time.Duration) {
	a := h.HealthChecks.Active
	h.checkAndRecord(ctx, c)
	wait := time.NewTimer(offset)
	defer wait.Stop()
	select {
	case <-ctx.Done():
		return
	case <-wait.C:
	}
	ticker := time.NewTicker(time.Duration(a.Interval))
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
			h.checkAndRecord(ctx, c)
		}
	}
}

// checkAndRecord runs one check and counts it, unless ctx ended meanwhile:
// a check cut short by its config's unloading says nothing of the
// upstream, and must not count against it in the config that replaces
// this one, which may still be checking it (the stopped flag is set only
// later, by Cleanup).
func (h *Handler) checkAndRecord(ctx context.Context, c *checker) {
	err := h.checkOnce(ctx, c.u)
	if ctx.Err() != nil {
		return
	}
	if h.inMaintenance(c.u.dial) {
		// An operator took it out for work on it: what the checks find
		// meanwhile does not count, up or down. The first check after
		// the maintenance counts again.
		if ce := h.logger.Check(zap.DebugLevel, "health check not counted: the upstream is in maintenance"); ce != nil {
			ce.Write(zap.String("upstream", c.u.dial), zap.NamedError("check_error", err))
		}
		return
	}
	h.recordCheck(c, err)
}

// checkOnce runs one active check of u and returns why it failed, or nil.
// It ends at once when ctx is done: its checker was stopped.
func (h *Handler) checkOnce(ctx context.Context, u *upstream) error {
	a := h.HealthChecks.Active
	network := u.dialNetwork("tcp")
	address := u.address
	if a.Port > 0 && network != "unix" {
		host, _, err := net.SplitHostPort(address)
		if err != nil {
			return err
		}
		address = net.JoinHostPort(host, strconv.Itoa(a.Port))
	}
	timeout := time.Duration(a.Timeout)
	dialer := net.Dialer{Timeout: timeout, KeepAlive: -1}
	conn, err := dialer.DialContext(ctx, network, address)
	if err != nil {
		return err
	}
	defer conn.Close()
	// A stopped checker does not wait for a slow reply.
	stopRead := context.AfterFunc(ctx, func() { _ = conn.Close() })
	defer stopRead()
	if err := conn.SetDeadline(time.Now().Add(timeout)); err != nil {
		return err
	}
	if a.Send != "" {
		if _, err := io.WriteString(conn, a.Send); err != nil {
			return fmt.Errorf("sending health_send: %w", err)
		}
	}
	if a.Expect == "" && !isUDP(network) {
		return nil
	}
	// For UDP any reply will do when nothing is expected: it proves the
	// service is there.
	want := max(len(a.Expect), 1)
	got := make([]byte, want)
	n, err := io.ReadAtLeast(conn, got, want)
	if isUDP(network) && n > 0 {
		err = nil
	}
	if err != nil {
		return fmt.Errorf("reading the reply: %w", err)
	}
	if !bytes.HasPrefix(got[:n], []byte(a.Expect)) {
		return fmt.Errorf("reply %q does not start with %q", got[:n], a.Expect)
	}
	return nil
}

// recordCheck counts a check's outcome against rise and fall, and logs a
// change of state.
func (h *Handler) recordCheck(c *checker, checkErr error) {
	a, u := h.HealthChecks.Active, c.u
	changed, up, counted := u.state.recordActiveCheck(&c.stopped, checkErr == nil, a.Rise, a.Fall, checkErr)
	if !counted {
		return // the checker was stopped while the check ran
	}
	if up && u.state.clearFailures(time.Now().UnixNano()) {
		// It just accepted a connection from the checker: the dials that
		// failed before no longer say anything.
		healthChanges.notify()
		h.logger.Info("upstream back: an active check passed since its dials failed", zap.String("upstream", u.dial))
	}
	if !changed {
		if checkErr != nil {
			if ce := h.logger.Check(zap.DebugLevel, "health check failed"); ce != nil {
				ce.Write(zap.String("upstream", u.dial), zap.Error(checkErr))
			}
		}
		return
	}
	healthChanges.notify()
	if up {
		h.logger.Info("upstream up: health checks pass", zap.String("upstream", u.dial), zap.Int("rise", a.Rise))
		return
	}
	h.logger.Info("upstream down: health checks fail", zap.String("upstream", u.dial), zap.Int("fall", a.Fall), zap.Error(checkErr))
	// on_down close: the verdict is the upstream's, shared by every
	// handler that names it, so the connections of every handler with
	// on_down close are closed, whichever handler's check took it down.
	closeSessions(h.logger, u.dial, closeOnDown, func(o *Handler) bool { return o.closeOnDown })
}

func isUDP(network string) bool {
	return network == "udp" || network == "udp4" || network == "udp6"
}

// unescapeProbe turns the escapes a Caddyfile token cannot otherwise hold
// into bytes: \r \n \t \\ \0 and \xHH.
func unescapeProbe(s string) (string, error) {
	var b []byte
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c != '\\' {
			b = append(b, c)
			continue
		}
		if i+1 == len(s) {
			return "", errors.New("ends in a lone backslash")
		}
		i++
		switch s[i] {
		case 'r':
			b = append(b, '\r')
		case 'n':
			b = append(b, '\n')
		case 't':
			b = append(b, '\t')
		case '\\':
			b = append(b, '\\')
		case '0':
			b = append(b, 0)
		case 'x':
			if i+2 >= len(s) {
				return "", fmt.Errorf("\\x at %d needs two hex digits", i-1)
			}
			v, err := strconv.ParseUint(s[i+1:i+3], 16, 8)
			if err != nil {
				return "", fmt.Errorf("\\x%s at %d: not two hex digits", s[i+1:i+3], i-1)
			}
			b = append(b, byte(v))
			i += 2
		default:
			return "", fmt.Errorf("unknown escape \\%c at %d", s[i], i-1)
		}
	}
	return string(b), nil
}
