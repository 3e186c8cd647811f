// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

//go:build !race

package godist

// raceSlowdown is 1 without the race detector (see race_test.go).
const raceSlowdown = 1
