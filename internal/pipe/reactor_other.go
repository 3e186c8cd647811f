// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

//go:build !linux

package pipe

import (
	"errors"
	"syscall"
)

// Without a reactor, a flow waits for its socket in Go's poller for as
// long as the connection lives, on its goroutine.
const reactorSupported = false

type reactor struct{}

type registration struct{ id uint64 }

var theReactor reactor

func (reactor) arm(*flow) error                    { return errors.New("no reactor on this platform") }
func (reactor) forget(*flow)                       {}
func (reactor) acquire()                           {}
func (reactor) release()                           {}
func (reactor) status() (parked int, running bool) { return 0, false }

func socketFD(syscall.RawConn) int { return -1 }
