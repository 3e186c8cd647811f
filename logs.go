// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"sync"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// logLimiter lets through at most burst lines per interval and counts the
// rest, so that a dead upstream under load cannot flood the log: the next
// line let through says how many were suppressed before it.
type logLimiter struct {
	interval time.Duration
	burst    int

	mu         sync.Mutex
	windowEnd  time.Time
	sent       int
	suppressed int
}

// Defaults for the error-level lines of a handler: ten lines a second.
const (
	logLimitInterval = time.Second
	logLimitBurst    = 10
)

func newLogLimiter() *logLimiter {
	return &logLimiter{interval: logLimitInterval, burst: logLimitBurst}
}

// log writes msg at error level, unless the limit for this interval is
// spent.
func (l *logLimiter) log(logger *zap.Logger, msg string, fields ...zap.Field) {
	l.logAt(logger, zapcore.ErrorLevel, msg, fields...)
}

// logAt writes msg at level, unless the limit for this interval is spent.
func (l *logLimiter) logAt(logger *zap.Logger, level zapcore.Level, msg string, fields ...zap.Field) {
	ce := logger.Check(level, msg)
	if ce == nil {
		return
	}
	suppressed, ok := l.allow(time.Now())
	if !ok {
		return
	}
	if suppressed > 0 {
		fields = append(fields, zap.Int("suppressed_since_last", suppressed))
	}
	ce.Write(fields...)
}

// allow reports whether a line may be written at now, and how many were
// suppressed since the last one that was.
func (l *logLimiter) allow(now time.Time) (suppressed int, ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.After(l.windowEnd) {
		l.windowEnd = now.Add(l.interval)
		l.sent = 0
	}
	if l.sent >= l.burst {
		l.suppressed++
		return 0, false
	}
	l.sent++
	suppressed, l.suppressed = l.suppressed, 0
	return suppressed, true
}
