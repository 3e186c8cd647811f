# shellcheck shell=bash
# Shell functions to run Debian's dnsmasq as a small DNS server on a
# loopback port, with A/AAAA and SRV records a test changes while it runs.
# Source this file; each function takes the state directory DIR, which holds
# everything of one server:
#
#   DIR/hosts    A and AAAA records, in /etc/hosts format ("10.0.0.1 db.test")
#   DIR/srv      SRV records, one per line: name,target,port,priority,weight
#   DIR/port     the port dnsmasq answers on (UDP and TCP), on 127.0.0.1
#   DIR/pid      dnsmasq's pid while it runs
#   DIR/log      what dnsmasq logs
#
#   dnsmasq_start DIR [PORT]    start (on a free port if none is given)
#   dnsmasq_set_hosts DIR       replace the A/AAAA records with stdin
#   dnsmasq_set_srv DIR         replace the SRV records with stdin
#   dnsmasq_stop DIR            stop
#
# What dnsmasq re-reads on SIGHUP, from its manual: "/etc/hosts and
# /etc/ethers and any file given by --dhcp-hostsfile, --dhcp-hostsdir,
# --dhcp-optsfile, --dhcp-optsdir, --addn-hosts or --hostsdir ... SIGHUP
# does NOT re-read the configuration file." SRV records exist only as
# --srv-host options, so an --addn-hosts file changes under SIGHUP, but
# SRV records change only by a restart (on the same port): dnsmasq_set_srv
# restarts. While it restarts, queries are refused for a moment, which a
# client must ride out as any failed lookup.
#
# Needs dnsmasq (Debian's dnsmasq-base: the binary alone, no service).
# Every wait is bounded.

# dnsmasq_start DIR [PORT]: starts dnsmasq for DIR on 127.0.0.1:PORT, or on
# a free port, and returns once it answers (dnsmasq forks only after it has
# bound its sockets) or fails. Prints the port.
dnsmasq_start() {
	local dir=$1 port=${2:-} tries
	command -v dnsmasq >/dev/null || { echo "dnsmasq_start: dnsmasq is not installed (apt-get install dnsmasq-base)" >&2; return 1; }
	mkdir -p "$dir"
	touch "$dir/hosts" "$dir/srv" "$dir/log"
	local args=() line
	while IFS= read -r line; do
		[ -n "$line" ] && args+=("--srv-host=$line")
	done <"$dir/srv"
	for tries in $(seq 1 20); do
		[ -n "$port" ] || port=$((20000 + RANDOM % 40000))
		# --local: names under .test that are not in the files are
		# NXDOMAIN, not forwarded anywhere (there is nowhere: --no-resolv).
		if dnsmasq \
			--no-resolv --no-hosts --no-poll --local=/test/ \
			--addn-hosts="$dir/hosts" "${args[@]}" \
			--listen-address=127.0.0.1 --bind-interfaces --port="$port" \
			--user="$(id -un)" --group="$(id -gn)" \
			--pid-file="$dir/pid" --log-facility="$dir/log" --log-queries \
			--cache-size=0 --local-ttl=0 \
			2>>"$dir/log"; then
			echo "$port" >"$dir/port"
			echo "$port"
			return 0
		fi
		# A port given (a restart) must stay; a random one may be taken.
		[ -n "${2:-}" ] && { echo "dnsmasq_start: cannot start on port $port (see $dir/log)" >&2; return 1; }
		port=
	done
	echo "dnsmasq_start: no free port after $tries tries (see $dir/log)" >&2
	return 1
}

# dnsmasq_stop DIR: stops DIR's dnsmasq and waits (5s at most) for it to go.
dnsmasq_stop() {
	local dir=$1 pid i
	[ -f "$dir/pid" ] || return 0
	pid=$(cat "$dir/pid")
	kill "$pid" 2>/dev/null || { rm -f "$dir/pid"; return 0; }
	for i in $(seq 1 50); do
		kill -0 "$pid" 2>/dev/null || { rm -f "$dir/pid"; return 0; }
		sleep 0.1
	done
	kill -9 "$pid" 2>/dev/null
	rm -f "$dir/pid"
}

# dnsmasq_set_hosts DIR: replaces the A/AAAA records with stdin's lines
# ("IP NAME..."), sends SIGHUP, and waits (5s at most) until dnsmasq has
# read the file again.
dnsmasq_set_hosts() {
	local dir=$1 before i
	cat >"$dir/hosts.new" && mv "$dir/hosts.new" "$dir/hosts"
	[ -f "$dir/pid" ] || return 0
	before=$(grep -cF "read $dir/hosts" "$dir/log")
	kill -HUP "$(cat "$dir/pid")"
	for i in $(seq 1 50); do
		[ "$(grep -cF "read $dir/hosts" "$dir/log")" -gt "$before" ] && return 0
		sleep 0.1
	done
	echo "dnsmasq_set_hosts: dnsmasq did not re-read $dir/hosts (see $dir/log)" >&2
	return 1
}

# dnsmasq_set_srv DIR: replaces the SRV records with stdin's lines
# ("name,target,port,priority,weight"), and restarts dnsmasq on its port if
# it runs: SIGHUP does not re-read SRV records.
dnsmasq_set_srv() {
	local dir=$1
	cat >"$dir/srv.new" && mv "$dir/srv.new" "$dir/srv"
	[ -f "$dir/pid" ] || return 0
	dnsmasq_stop "$dir"
	dnsmasq_start "$dir" "$(cat "$dir/port")" >/dev/null
}
