#!/usr/bin/env bash
# Two Caddy instances sharing one storage folder act as one: a drain posted
# to one instance's admin API stops new connections to that upstream through
# both within the poll interval (the time it took is measured and printed),
# and survives a restart of both. Loopback only; fixed ports 2020-2021,
# 8180-8181 and 4100-4102 (the rest of e2e.sh uses 2019, 8080-8084, 8091
# and 4000-4003, and dnsmasq a port from 20000 up).
#
# Run it on its own with the Caddy to test:
#
#	CADDY=/path/to/caddy .ci/opstate-e2e.sh
#
# (without CADDY it builds one with xcaddy), or source it and call
# opstate_e2e /path/to/caddy, as e2e.sh does with the binary it built.
#
# It reads the operator state of each upstream in GET /godist/upstreams
# (its "operator" record, with "state":"drain", as docs/operate.md shows
# it).

# The processes it started and its folder, for opstate_cleanup.
opstate_work="" opstate_backends_pid="" opstate_a_pid="" opstate_b_pid=""

opstate_cleanup() {
	local pid
	for pid in "$opstate_a_pid" "$opstate_b_pid" "$opstate_backends_pid"; do
		if [ -n "$pid" ]; then
			kill "$pid" 2>/dev/null || true
			wait "$pid" 2>/dev/null || true
		fi
	done
	opstate_a_pid="" opstate_b_pid="" opstate_backends_pid=""
	[ -n "$opstate_work" ] && rm -rf "$opstate_work"
	opstate_work=""
	return 0
}

opstate_fail() {
	local f
	echo "FAIL: $*" >&2
	for f in "$opstate_work"/*.log; do
		[ -f "$f" ] && { echo "--- $f" >&2; tail -20 "$f" >&2; }
	done
	opstate_cleanup
	exit 1
}

opstate_e2e() {
	local caddy=$1 work i seen code t0 t1 propagated key_port p
	work=$(mktemp -d)
	opstate_work=$work
	local state="$work/state" # the storage both instances share
	mkdir -p "$state"
	local -A admin=([a]=127.0.0.1:2020 [b]=127.0.0.1:2021)
	local -A listen=([a]=127.0.0.1:8180 [b]=127.0.0.1:8181)
	local drained=127.0.0.1:4101
	local interval_ms=1000

	now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

	# three HTTP backends that say who they are, served by a Caddy of their own
	cat > "$work/backends.Caddyfile" <<-'CADDYFILE'
	{
		admin off
	}
	:4100 {
		bind 127.0.0.1
		respond "backend 4100 answered"
	}
	:4101 {
		bind 127.0.0.1
		respond "backend 4101 answered"
	}
	:4102 {
		bind 127.0.0.1
		respond "backend 4102 answered"
	}
	CADDYFILE

	# the two balancer instances: one config each, one storage folder for both
	for i in a b; do
		cat > "$work/$i.Caddyfile" <<-CADDYFILE
		{
			admin ${admin[$i]}
			storage file_system $state
			layer4 {
				${listen[$i]} {
					route {
						godist 127.0.0.1:4100 127.0.0.1:4101 127.0.0.1:4102 {
							name fleet
							state_poll_interval ${interval_ms}ms
						}
					}
				}
			}
		}
		CADDYFILE
	done

	start_instance() { # name
		local i=$1 pid
		mkdir -p "$work/home-$i"
		HOME="$work/home-$i" XDG_CONFIG_HOME="$work/home-$i" XDG_DATA_HOME="$work/home-$i" \
			"$caddy" run --config "$work/$i.Caddyfile" --adapter caddyfile >> "$work/$i.log" 2>&1 &
		pid=$!
		case $i in a) opstate_a_pid=$pid ;; b) opstate_b_pid=$pid ;; esac
		# up once its handler is listed: provisioned, with the states the
		# storage held read in (the listener opens a moment later)
		for _ in $(seq 1 100); do
			if curl -fsS -m 1 -o "$work/up-$i.json" "http://${admin[$i]}/godist/upstreams" 2>/dev/null &&
				grep -q '"upstreams":\[' "$work/up-$i.json"; then
				return 0
			fi
			kill -0 "$pid" 2>/dev/null || opstate_fail "instance $i exited at start"
			sleep 0.1
		done
		opstate_fail "instance $i: no godist handler on its admin API within 10s"
	}
	stop_instance() { # name
		local i=$1
		"$caddy" stop --address "${admin[$i]}" >/dev/null 2>&1 || opstate_fail "stopping instance $i"
		case $i in
			a) wait "$opstate_a_pid" 2>/dev/null || true; opstate_a_pid="" ;;
			b) wait "$opstate_b_pid" 2>/dev/null || true; opstate_b_pid="" ;;
		esac
	}
	# backends_seen <instance> <n>: the backends n new connections landed
	# on, into $seen (not through $(...): a failure must end the script,
	# not a subshell)
	backends_seen() {
		local i=$1 n=$2 reply
		seen=""
		for _ in $(seq 1 "$n"); do
			reply=$(curl -fsS -m 5 --retry 5 --retry-connrefused --retry-delay 1 "http://${listen[$i]}/") ||
				opstate_fail "curl through instance $i"
			case "$reply" in
				"backend 410"[012]" answered") seen="$seen ${reply:8:4}" ;;
				*) opstate_fail "unexpected reply through instance $i: $reply" ;;
			esac
		done
	}
	# routes_around <instance>: whether its /godist/pick sends the key
	# $key_port (a client 127.0.0.1:$key_port, whose first choice is the
	# upstream drained) elsewhere: what routing does, read from the same
	# membership the connections hash over
	routes_around() {
		curl -fsS -m 2 -o "$work/pick-$1.json" "http://${admin[$1]}/godist/pick?ip=127.0.0.1&port=$key_port" 2>/dev/null || return 1
		grep -q '"upstream":"127.0.0.1:410[02]"' "$work/pick-$1.json"
	}
	# shows_drain <instance>: whether its /godist/upstreams holds the drain
	shows_drain() {
		curl -fsS -m 2 -o "$work/upstreams-$1.json" "http://${admin[$1]}/godist/upstreams" 2>/dev/null || return 1
		grep -q "\"upstream\":\"$drained\",\"state\":\"drain\"" "$work/upstreams-$1.json"
	}

	echo "--- opstate: two instances sharing the storage folder $state"
	HOME="$work" "$caddy" run --config "$work/backends.Caddyfile" --adapter caddyfile > "$work/backends.log" 2>&1 &
	opstate_backends_pid=$!
	for _ in $(seq 1 100); do
		curl -fsS -m 1 -o /dev/null http://127.0.0.1:4102/ 2>/dev/null && break
		sleep 0.1
	done
	start_instance a
	start_instance b
	for i in a b; do
		backends_seen "$i" 30
		[[ "$seen" == *4101* ]] || opstate_fail "instance $i: 30 connections before the drain and none reached 4101:$seen"
	done

	# a client address whose first choice is the upstream to drain
	key_port=""
	for p in $(seq 1000 1200); do
		curl -fsS -m 2 -o "$work/pick.json" "http://${admin[a]}/godist/pick?ip=127.0.0.1&port=$p" || opstate_fail "GET /godist/pick"
		if grep -q "\"upstream\":\"$drained\",\"rank\":1" "$work/pick.json"; then key_port=$p; break; fi
	done
	[ -n "$key_port" ] || opstate_fail "none of 201 client addresses prefers $drained"
	for i in a b; do
		! routes_around "$i" || opstate_fail "instance $i sends 127.0.0.1:$key_port elsewhere before the drain: $(cat "$work/pick-$i.json")"
	done

	echo "--- opstate: a bad request names its field"
	code=$(curl -sS -m 5 -o "$work/bad.json" -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
		-d '{"handler": "fleet", "upstream": "'"$drained"'", "state": "drained"}' "http://${admin[a]}/godist/upstreams/state" || true)
	[ "$code" = 400 ] || opstate_fail "a bad state answered $code: $(cat "$work/bad.json")"
	grep -q 'state \\"drained\\": must be ready, drain or maint' "$work/bad.json" || opstate_fail "bad state: $(cat "$work/bad.json")"

	echo "--- opstate: drain $drained through instance a"
	t0=$(now_ms)
	code=$(curl -sS -m 15 -o "$work/drain.json" -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
		-d '{"handler": "fleet", "upstream": "'"$drained"'", "state": "drain", "reason": "e2e"}' "http://${admin[a]}/godist/upstreams/state" || true)
	t1=$(now_ms)
	[ "$code" = 200 ] || opstate_fail "POST /godist/upstreams/state answered $code: $(cat "$work/drain.json")"
	grep -q '"state":{"handler":"fleet","upstream":"'"$drained"'","state":"drain"' "$work/drain.json" || opstate_fail "drain answer: $(cat "$work/drain.json")"
	[ -f "$state/godist/state/fleet/127.0.0.1%3A4101.json" ] || opstate_fail "no record in the storage folder: $(find "$state" -type f)"
	shows_drain a || opstate_fail "instance a does not show the drain it took: $(cat "$work/upstreams-a.json")"

	routes_around a || opstate_fail "instance a still sends 127.0.0.1:$key_port to the drained upstream: $(cat "$work/pick-a.json")"

	# instance b: when does its routing send the key elsewhere? Polled
	# every 20ms, for at most five intervals
	propagated=""
	for _ in $(seq 1 $(( 5 * interval_ms / 20 ))); do
		if routes_around b; then propagated=$(now_ms); break; fi
		sleep 0.02
	done
	[ -n "$propagated" ] || opstate_fail "instance b still routes to the drained upstream $(( 5 * interval_ms ))ms after the drain: $(cat "$work/pick-b.json")"
	shows_drain b || opstate_fail "instance b routes around the drained upstream but does not show the drain: $(cat "$work/upstreams-b.json")"
	echo "the drain reached instance b's routing $(( propagated - t0 ))ms after it was posted to instance a (the POST took $(( t1 - t0 ))ms; state_poll_interval ${interval_ms}ms)"
	for i in a b; do
		backends_seen "$i" 30
		[[ "$seen" != *4101* ]] || opstate_fail "instance $i sent a new connection to the drained 4101:$seen"
	done
	echo "30 new connections through each instance, none to the drained upstream"

	echo "--- opstate: restart both instances"
	stop_instance a
	stop_instance b
	start_instance a
	start_instance b
	# no wait for a poll: the states are read as the config loads
	for i in a b; do
		shows_drain "$i" || opstate_fail "instance $i lost the drain over a restart: $(cat "$work/upstreams-$i.json")"
		backends_seen "$i" 30
		[[ "$seen" != *4101* ]] || opstate_fail "instance $i sent a new connection to the drained 4101 after a restart:$seen"
	done
	echo "after a restart of both, the drain holds on both"

	echo "--- opstate: ready again through instance b"
	code=$(curl -sS -m 15 -o "$work/ready.json" -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
		-d '{"handler": "fleet", "upstream": "'"$drained"'", "state": "ready"}' "http://${admin[b]}/godist/upstreams/state" || true)
	[ "$code" = 200 ] || opstate_fail "ready answered $code: $(cat "$work/ready.json")"
	[ ! -e "$state/godist/state/fleet/127.0.0.1%3A4101.json" ] || opstate_fail "a ready upstream still has a record"
	for _ in $(seq 1 $(( 5 * interval_ms / 20 ))); do
		shows_drain a || break
		sleep 0.02
	done
	shows_drain a && opstate_fail "instance a still shows the drain $(( 5 * interval_ms ))ms after ready"
	backends_seen a 30
	[[ "$seen" == *4101* ]] || opstate_fail "instance a: 30 connections after ready and none reached 4101:$seen"

	stop_instance a
	stop_instance b
	opstate_cleanup
	echo "operator state end-to-end check passed"
}

# Run directly: test $CADDY, or a Caddy built here with xcaddy.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
	set -euo pipefail
	cd "$(dirname "$0")/.."
	if [ -z "${CADDY:-}" ]; then
		build=$(mktemp -d)
		trap 'rm -rf "$build"' EXIT
		go run github.com/caddyserver/xcaddy/cmd/xcaddy@v0.4.5 build v2.11.9 \
			--with github.com/bcca9c24/caddy-godist@v0.0.0=. --output "$build/caddy"
		CADDY="$build/caddy"
	fi
	opstate_e2e "$CADDY"
fi
