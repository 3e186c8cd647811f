// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

//go:build unix

package pipe

import "syscall"

// descriptorLimit returns the process's soft limit on open descriptors, or
// 0 if it has none worth counting against.
func descriptorLimit() int64 {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil || rl.Cur > 1<<40 {
		return 0
	}
	return int64(rl.Cur)
}

// readFD reads from a socket's descriptor without blocking.
func readFD(fd uintptr, p []byte) (int, error) {
	for {
		n, err := syscall.Read(int(fd), p)
		if err != syscall.EINTR {
			return n, err
		}
	}
}

// rawSupported: on unix, sockets can be read and spliced by descriptor.
const rawSupported = true
