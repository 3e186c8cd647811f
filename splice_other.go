// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

//go:build !linux

package godist

import (
	"errors"
	"syscall"
)

// errSpliceUnavailable: splice(2) is Linux's; elsewhere bytes go through a
// buffer taken once the socket is readable.
var errSpliceUnavailable = errors.New("splice unavailable")

func spliceStream(_, _ syscall.RawConn, _ *session) (int64, error) {
	return 0, errSpliceUnavailable
}

type pipePool struct{}

var pipes pipePool

func (pipePool) drain() {}
