// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

//go:build !linux

package godist

import (
	"errors"
	"syscall"
)

// Without a reactor, a flow waits for its socket in Go's poller for as
// long as the connection lives, on its goroutine.
const reactorSupported = false

type reactor struct{}

var theReactor reactor

func (reactor) arm(*flow) error { return errors.New("no reactor on this platform") }
func (reactor) forget(*flow)    {}

func socketFD(syscall.RawConn) int { return -1 }
