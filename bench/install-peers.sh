#!/usr/bin/env bash
# Installs the load benchmark's non-Go peers from Debian: HAProxy and nginx
# with its stream module. Idempotent: installs only what is missing. Needs
# root (or sudo). The packages' own services are kept from starting: the
# benchmark runs its own instances, and a system nginx on port 80 or a
# system HAProxy would only be one more process on a shared machine.
set -euo pipefail

pkgs=(haproxy nginx libnginx-mod-stream)
missing=()
for p in "${pkgs[@]}"; do
	status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
	[[ $status == *"install ok installed"* ]] || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
	echo "already installed: ${pkgs[*]}"
	exit 0
fi

sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo

# policy-rc.d exit 101 tells Debian's maintainer scripts not to start
# services; remove it afterwards only if this script put it there.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
	trap '$sudo rm -f "$policy"' EXIT
	printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
	$sudo chmod +x "$policy"
fi

export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "installed: ${missing[*]}"
haproxy -v | sed -n 1p # not head: it would end haproxy by SIGPIPE, and pipefail the script
nginx -v
