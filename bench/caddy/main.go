// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

// Command caddy is Caddy with the standard modules, caddy-l4 and godist,
// built from this module so that the load benchmark can run the proxy in a
// process of its own without xcaddy.
package main

import (
	caddycmd "github.com/caddyserver/caddy/v2/cmd"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	_ "github.com/bcca9c24/caddy-godist"
)

func main() {
	caddycmd.Main()
}
