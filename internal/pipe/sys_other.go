// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

//go:build !unix

package pipe

import "errors"

// descriptorLimit: there is no descriptor limit to budget against here.
func descriptorLimit() int64 { return 0 }

// readFD is never called where rawSupported is false.
func readFD(uintptr, []byte) (int, error) {
	return 0, errors.New("reading a raw socket is not supported on this platform")
}

// rawSupported: elsewhere, bytes always go through the net.Conn.
const rawSupported = false
