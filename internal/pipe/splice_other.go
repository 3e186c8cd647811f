// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

//go:build !linux

package pipe

// Elsewhere than Linux there is no splice(2): bytes always go through the
// small-message buffer, taken once the socket is readable.
const spliceSupported = false

type kernelPipe struct{}

func (*kernelPipe) close() {}

type pipePool struct{}

var pipes pipePool

func (pipePool) put(*kernelPipe) {}
func (pipePool) drain()          {}

func (c *socketCopy) spliceChunk() (int, error) { return 0, errSpliceUnavailable }
func (c *socketCopy) pipeRead(uintptr) bool     { return true }
func (c *socketCopy) pipeWrite(uintptr) bool    { return true }

// MaxPipeBytes is the most a flow holds in a kernel pipe: none here.
const MaxPipeBytes = 0
