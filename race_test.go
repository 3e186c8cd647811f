// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

//go:build race

package godist

// raceSlowdown is how many times longer CPU-bound work takes under the
// race detector, for the few tests that bound a wait by what the work
// costs: hashing runs about 25 times slower under it.
const raceSlowdown = 30
