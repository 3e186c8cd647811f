// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"fmt"
)

// This file names handlers. A handler's name is what its operator states
// (opstate.go) are kept under, and what the info metric reports, so it
// must stay the same when the config around it changes: when upstreams
// are added or removed, when a DNS lookup finds others, when the handler
// moves to another route or listener, when another handler is added
// before it.

// defaultHandlerName is the name of every handler that is not given one.
// Unnamed handlers thus share the operator state of a dial address, as
// every handler already shares its health and counts: draining
// 10.0.0.5:5432 drains it wherever an unnamed handler lists it. Handlers
// whose pools share an address but must be operated apart take names.
//
// The handler cannot see its listener or route (a caddy-l4 handler is
// given neither), and its index or fingerprint change with the config, so
// nothing of the config can make a stable name on its own.
const defaultHandlerName = "default"

// maxHandlerNameLen bounds a handler name, in bytes.
const maxHandlerNameLen = 64

// handlerName returns the name of a handler configured with name, the
// default if none.
func handlerName(configured string) string {
	if configured == "" {
		return defaultHandlerName
	}
	return configured
}

// validateHandlerName checks a handler's name option: empty (the default),
// or 1 to 64 letters, digits, '-', '_' and '.', starting with a letter or
// a digit. The name is part of a storage key and a metric label, and is
// typed into admin requests: it is kept to what needs no escaping in any
// of them.
func validateHandlerName(name string) error {
	if name == "" {
		return nil
	}
	if len(name) > maxHandlerNameLen {
		return fmt.Errorf("name %q: %d bytes: at most %d", name, len(name), maxHandlerNameLen)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		alnum := 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9'
		if i == 0 && !alnum {
			return fmt.Errorf("name %q: must start with a letter or a digit", name)
		}
		if c >= 0x80 {
			return fmt.Errorf("name %q: a non-ASCII character at byte %d: only letters, digits, '-', '_' and '.' may be used", name, i)
		}
		if !alnum && c != '-' && c != '_' && c != '.' {
			return fmt.Errorf("name %q: %q at byte %d: only letters, digits, '-', '_' and '.' may be used", name, rune(c), i)
		}
	}
	return nil
}

// handlerInfo is what the info metric reports of a running handler: its
// name, the fingerprint of its config, and the digest of the operator
// states in force for its name (opDigestNone when there are none).
type handlerInfo struct {
	name, fingerprint, operatorState string
}

// info returns what the info metric reports of h.
func (h *Handler) info() handlerInfo {
	return handlerInfo{name: h.name, fingerprint: h.members.Load().fingerprint, operatorState: h.opStore.snapshot().digest}
}
