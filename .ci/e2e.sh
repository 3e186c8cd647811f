#!/usr/bin/env bash
# End-to-end check of what a user does: build Caddy with this module through
# xcaddy, list its modules, adapt and run the example, push a JSON config
# through the admin API, and send traffic through it. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d)
mkdir -p "$work/bin" "$work/home"
caddy="$work/bin/caddy"
admin=127.0.0.1:2019
cleanup() {
	"$caddy" stop --address "$admin" >/dev/null 2>&1 || true
	[ -n "${caddy_pid:-}" ] && kill "$caddy_pid" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

fail() { echo "FAIL: $*" >&2; [ -f "$work/caddy.log" ] && tail -30 "$work/caddy.log" >&2; exit 1; }

echo "--- xcaddy build"
go run github.com/caddyserver/xcaddy/cmd/xcaddy@v0.4.5 build v2.11.9 \
	--with github.com/bcca9c24/caddy-godist@v0.0.0=. --output "$caddy"

echo "--- list-modules"
# Into a file, not a pipe: under pipefail, grep -q ending first would fail
# the step by SIGPIPE whenever Caddy is still writing.
"$caddy" list-modules > "$work/modules.txt" || fail "caddy list-modules"
for module in layer4.handlers.godist layer4.proxy.selection_policies.godist admin.api.godist http.handlers.godist_status; do
	grep -qx "$module" "$work/modules.txt" || fail "$module not in list-modules"
done

echo "--- caddy adapt --adapter godist on an unchanged godist.conf"
"$caddy" adapt --adapter godist --config examples/godist.conf > "$work/godist.json" || fail "adapting examples/godist.conf"
grep -q '"handler":"godist"' "$work/godist.json" || fail "adapted godist.conf has no godist handler"

echo "--- adapt and validate the example"
"$caddy" adapt --config examples/Caddyfile --validate > "$work/example.json" || fail "adapting examples/Caddyfile"
grep -q '"handler":"godist"' "$work/example.json" || fail "adapted example has no godist handler"

echo "--- a bad Caddyfile is refused with its line"
printf '{\n\tlayer4 {\n\t\t127.0.0.1:9 {\n\t\t\troute {\n\t\t\t\tgodist 127.0.0.1:1 {\n\t\t\t\t\tweight 2\n\t\t\t\t}\n\t\t\t}\n\t\t}\n\t}\n}\n' > "$work/bad.Caddyfile"
if out=$("$caddy" adapt --config "$work/bad.Caddyfile" 2>&1); then fail "bad Caddyfile adapted"; fi
grep -q "unrecognized subdirective 'weight', at .*bad.Caddyfile:6" <<<"$out" || fail "unexpected error for a bad Caddyfile: $out"

echo "--- run the example"
HOME="$work/home" XDG_CONFIG_HOME="$work/home" XDG_DATA_HOME="$work/home" "$caddy" run --config examples/Caddyfile > "$work/caddy.log" 2>&1 &
caddy_pid=$!
for _ in $(seq 1 100); do
	curl -fsS -m 1 "http://$admin/config/" >/dev/null 2>&1 && break
	sleep 0.1
done
seen=""
for _ in $(seq 1 30); do
	reply=$(curl -fsS -m 5 http://127.0.0.1:8080/) || fail "curl through godist"
	case "$reply" in
		"backend 400"[012]" answered") seen="$seen ${reply:8:4}" ;;
		*) fail "unexpected reply through godist: $reply" ;;
	esac
done
distinct=$(echo $seen | tr ' ' '\n' | sort -u | wc -l)
[ "$distinct" -eq 3 ] || fail "30 connections reached only $distinct backends:$seen"
echo "30 connections spread over $distinct backends"

echo "--- push a JSON config through the admin API"
cat > "$work/server.json" <<JSON
{"listen": ["127.0.0.1:8081"], "routes": [{"handle": [{"handler": "godist", "hash_key": "ip",
  "upstreams": [{"dial": "localhost:4000"}, {"dial": "localhost:4001", "weight": 2}, {"dial": "localhost:4002"}]}]}]}
JSON
curl -fsS -m 10 -X PUT -H 'Content-Type: application/json' --data-binary "@$work/server.json" \
	"http://$admin/config/apps/layer4/servers/e2e" || fail "PUT a layer4 server through the admin API"
first=$(curl -fsS -m 5 http://127.0.0.1:8081/) || fail "curl through the pushed config"
for _ in $(seq 1 10); do
	again=$(curl -fsS -m 5 http://127.0.0.1:8081/)
	[ "$again" = "$first" ] || fail "hash_key ip moved a client: '$first' then '$again'"
done
echo "hash_key ip kept 11 connections on one backend: $first"

echo "--- the godist admin API"
get() { curl -sS -m 5 -o "$work/api.out" -D "$work/api.hdr" -w '%{http_code}' "$@"; }
has() { grep -q -- "$1" "$work/api.out" || fail "$2: no '$1' in: $(cat "$work/api.out")"; }
code=$(get "http://$admin/godist/upstreams"); [ "$code" = 200 ] || fail "GET /godist/upstreams answered $code: $(cat "$work/api.out")"
has '"hash_key":"ip_port"' /godist/upstreams; has '"hash_key":"ip"' /godist/upstreams
for port in 4000 4001 4002; do
	has "\"dial\":\"localhost:$port\",\"weight\":[12],\"tier\":0,\"source\":\"static\",\"max_connections\":0,\"health\":{\"status\":\"up\"" /godist/upstreams
done
# counts are per upstream, shared by both handlers and kept over the reload: 30 connections on 8080, 11 on 8081
total=$(grep -o '"totals":{"connections":[0-9]*' "$work/api.out" | awk -F: 'NR <= 3 {s += $3} END {print s}')
[ "$total" = 41 ] || fail "/godist/upstreams counts $total connections, 41 were sent: $(cat "$work/api.out")"
code=$(get "http://$admin/godist/fingerprint"); [ "$code" = 200 ] || fail "GET /godist/fingerprint answered $code"
has '"fingerprint":"a81d3cd816205018","hash_version":"hrw-xxhash64-v1","hash_key":"ip_port"' /godist/fingerprint
has '"fingerprint":"e94dcbb853807efc","hash_version":"hrw-xxhash64-v1","hash_key":"ip"' /godist/fingerprint
handler=$(grep -o '"handler":[0-9]*,"fingerprint":"a81d3cd816205018"' "$work/api.out" | cut -d, -f1 | cut -d: -f2)
code=$(get "http://$admin/godist/pick?ip=127.0.0.1&port=5555"); [ "$code" = 200 ] || fail "GET /godist/pick answered $code: $(cat "$work/api.out")"
has '"hash_key":"ip_port","key":"127.0.0.1:5555","upstream":"localhost:400[012]"' /godist/pick
has "\"hash_key\":\"ip\",\"key\":\"127.0.0.1\",\"upstream\":\"localhost:${first:8:4}\"" /godist/pick
code=$(get "http://$admin/godist/pick?ip=127.0.0.1&port=99999"); [ "$code" = 400 ] || fail "a bad port on /godist/pick answered $code"
has 'must be a number from 1 to 65535' "/godist/pick with a bad port"
code=$(get -X POST -d '{"handler": '"$handler"', "upstreams": [{"dial": "localhost:4000"}, {"dial": "localhost:4001"}, {"dial": "localhost:4002"}, {"dial": "localhost:4003"}]}' "http://$admin/godist/plan")
[ "$code" = 200 ] || fail "POST /godist/plan answered $code: $(cat "$work/api.out")"
has '"moved_share":0\.2[3-7]' /godist/plan; has '"dial":"localhost:4003","change":"added","before":0,"after":0\.2' /godist/plan
code=$(get -X POST -d '{"upstreams": [{"dial": "localhost:4000"}]}' "http://$admin/godist/plan"); [ "$code" = 400 ] || fail "a plan naming no handler answered $code"
has 'handler: required when 2 godist handlers are running' "/godist/plan without a handler"
code=$(get -X DELETE "http://$admin/godist/upstreams")
[ "$code" = 405 ] && grep -qi '^allow: GET' "$work/api.hdr" || fail "DELETE /godist/upstreams answered $code"
echo "the godist admin API answers"

echo "--- metrics on the admin endpoint"
curl -fsS -m 5 "http://$admin/metrics" > "$work/metrics.out" || fail "GET /metrics"
grep -q '^caddy_layer4_godist_upstream_connections_total{upstream="localhost:4000"} [0-9]' "$work/metrics.out" || fail "no godist metrics: $(grep -m 10 godist "$work/metrics.out")"
grep -q '^caddy_layer4_godist_upstream_healthy{upstream="localhost:4001"} 1' "$work/metrics.out" || fail "no healthy gauge"
echo "godist metrics are on /metrics"

echo "--- a bad config through the admin API is refused and the old one keeps serving"
bad_handler='{"handler":"godist","upstreams":[{"dial":"localhost:4000","weight":-1}]}'
code=$(curl -sS -m 10 -o "$work/bad.out" -w '%{http_code}' -X POST -H 'Content-Type: application/json' \
	--data "{\"apps\":{\"layer4\":{\"servers\":{\"bad\":{\"listen\":[\"127.0.0.1:8082\"],\"routes\":[{\"handle\":[$bad_handler]}]}}}}}" \
	"http://$admin/load")
[ "$code" = 400 ] || fail "bad config on /load answered $code: $(cat "$work/bad.out")"
grep -q 'upstream 0 (localhost:4000): weight -1: must be at least 1' "$work/bad.out" || fail "bad config error: $(cat "$work/bad.out")"
# /config/ paths answer provisioning errors with a 500 (Caddy's choice), with the same message
code=$(curl -sS -m 10 -o "$work/bad.out" -w '%{http_code}' -X PUT -H 'Content-Type: application/json' \
	--data "{\"listen\":[\"127.0.0.1:8082\"],\"routes\":[{\"handle\":[$bad_handler]}]}" \
	"http://$admin/config/apps/layer4/servers/bad")
[ "$code" -ge 400 ] || fail "bad config on /config/ answered $code"
grep -q 'weight -1: must be at least 1' "$work/bad.out" || fail "bad config error: $(cat "$work/bad.out")"
for port in 8080 8081; do
	curl -fsS -m 5 "http://127.0.0.1:$port/" >/dev/null || fail "port $port stopped serving after a refused change"
done

echo "--- a burst past the descriptor limit: a godist-tcp listener keeps serving"
# A second Caddy with RLIMIT_NOFILE 256 in front of the example's backend,
# behind caddy-l4's http matcher; 400 clients connect at once and send
# nothing, so each holds its descriptor in the matcher (for up to its 3s
# matching timeout) and the process runs out: the accept fails. Then they
# leave, and 20 fresh clients must all be answered (docs/descriptors.md).
# On tcp/ caddy-l4's accept loop would have stopped for good.
printf '{\n\tadmin off\n\tlayer4 {\n\t\tgodist-tcp/127.0.0.1:8091 {\n\t\t\t@http http\n\t\t\troute @http {\n\t\t\t\tgodist localhost:4000\n\t\t\t}\n\t\t}\n\t}\n}\n' > "$work/burst.Caddyfile"
HOME="$work/home" XDG_CONFIG_HOME="$work/home" XDG_DATA_HOME="$work/home" \
	prlimit --nofile=256:256 "$caddy" run --config "$work/burst.Caddyfile" --adapter caddyfile > "$work/burst.log" 2>&1 &
burst_pid=$!
for _ in $(seq 1 100); do
	curl -fsS -m 1 http://127.0.0.1:8091/ >/dev/null 2>&1 && break
	sleep 0.1
done
held=()
for _ in $(seq 1 400); do
	exec {fd}<>/dev/tcp/127.0.0.1/8091 || break
	held+=("$fd")
done
sleep 1
for fd in "${held[@]}"; do exec {fd}>&-; done
sleep 2
answered=0
for _ in $(seq 1 20); do
	curl -fsS -m 5 http://127.0.0.1:8091/ >/dev/null 2>&1 && answered=$((answered + 1))
done
kill "$burst_pid" 2>/dev/null || true
wait "$burst_pid" 2>/dev/null || true
[ "$answered" -eq 20 ] || { tail -20 "$work/burst.log" >&2; fail "after a burst of ${#held[@]} clients past the descriptor limit, $answered of 20 fresh clients were answered"; }
grep -q '"msg":"accept failed; retrying"' "$work/burst.log" || fail "the burst of ${#held[@]} clients never reached the descriptor limit: the check proves nothing"
echo "a burst of ${#held[@]} clients past RLIMIT_NOFILE 256: $answered of 20 fresh clients answered afterwards"

echo "--- dynamic upstreams: a real DNS server (dnsmasq) changes its records, Caddy follows without a reload"
# shellcheck source=.ci/dnsmasq.sh
. .ci/dnsmasq.sh
dns="$work/dnsmasq"
mkdir -p "$dns"
trap 'dnsmasq_stop "$dns"; cleanup' EXIT
# A records by the hosts file (SIGHUP re-reads it); SRV records by
# --srv-host (a restart on the same port): _web._tcp points at the example's
# backends, 127.0.0.1:4000-4003, as port:priority:weight.
set_hosts() { printf '%s web.godist.test\n' 127.0.0.1 >"$work/hosts"; for ip in "$@"; do printf '%s db.godist.test\n' "$ip"; done >>"$work/hosts"; dnsmasq_set_hosts "$dns" <"$work/hosts"; }
set_srv() { local r p prio w; for r in "$@"; do IFS=: read -r p prio w <<<"$r"; echo "_web._tcp.godist.test,web.godist.test,$p,$prio,$w"; done >"$work/srv"; dnsmasq_set_srv "$dns" <"$work/srv"; }
set_hosts 127.0.0.1 127.0.0.2 127.0.0.3
set_srv 4000:0:10 4001:0:10 4002:0:10
dns_port=$(dnsmasq_start "$dns") || fail "starting dnsmasq"
echo "dnsmasq answers on 127.0.0.1:$dns_port"

# A fourth backend, and two handlers: SRV records on 8083, A records on 8084.
curl -fsS -m 10 -X PUT -H 'Content-Type: application/json' "http://$admin/config/apps/http/servers/e2e4003" \
	-d '{"listen": ["127.0.0.1:4003"], "routes": [{"handle": [{"handler": "static_response", "body": "backend 4003 answered\n"}]}]}' \
	|| fail "PUT a fourth backend"
resolver="\"resolver\": {\"addresses\": [\"127.0.0.1:$dns_port\"]}"
curl -fsS -m 10 -X PUT -H 'Content-Type: application/json' "http://$admin/config/apps/layer4/servers/dns_srv" \
	-d "{\"listen\": [\"127.0.0.1:8083\"], \"routes\": [{\"handle\": [{\"handler\": \"godist\",
	  \"dynamic_upstreams\": {\"source\": \"srv\", \"name\": \"_web._tcp.godist.test\", \"refresh\": \"200ms\", $resolver}}]}]}" \
	|| fail "PUT a server with SRV upstreams"
curl -fsS -m 10 -X PUT -H 'Content-Type: application/json' "http://$admin/config/apps/layer4/servers/dns_a" \
	-d "{\"listen\": [\"127.0.0.1:8084\"], \"routes\": [{\"handle\": [{\"handler\": \"godist\",
	  \"dynamic_upstreams\": {\"source\": \"a\", \"name\": \"db.godist.test\", \"port\": \"4000\", \"refresh\": \"200ms\",
	  \"versions\": {\"ipv4\": true}, $resolver}}]}]}" \
	|| fail "PUT a server with A upstreams"
provisioned=$(grep -c '"msg":"godist handler provisioned"' "$work/caddy.log")

# handler_of LOOKUP: the index of the handler whose source is LOOKUP.
handler_of() {
	curl -fsS -m 5 "http://$admin/godist/upstreams" > "$work/ups.json" || fail "GET /godist/upstreams"
	sed 's/},{"handler":/}\n{"handler":/g' "$work/ups.json" > "$work/ups.lines"
	grep -F "\"source\":\"$1\"" "$work/ups.lines" > "$work/ups.one" || fail "no handler looks up $1: $(cat "$work/ups.json")"
	grep -o '"handler":[0-9]*' "$work/ups.one" | cut -d: -f2
}
srv_h=$(handler_of srv:_web._tcp.godist.test)
a_h=$(handler_of a:db.godist.test:4000)
# members H: handler H's upstreams as sorted "dial weight tier" words.
members() {
	curl -fsS -m 5 "http://$admin/godist/upstreams?handler=$1" > "$work/members.json" || fail "GET /godist/upstreams?handler=$1"
	grep -o '"dial":"[^"]*","weight":[0-9]*,"tier":[0-9]*' "$work/members.json" > "$work/members.txt" || true
	sed 's/"dial":"\([^"]*\)","weight":\([0-9]*\),"tier":\([0-9]*\)/\1 \2 \3/' "$work/members.txt" | sort | tr '\n' ','
}
wait_members() { # H WANT: wait (10s at most) until handler H hashes over WANT
	local got
	for _ in $(seq 1 100); do
		got=$(members "$1")
		[ "$got" = "$2" ] && return 0
		sleep 0.1
	done
	fail "handler $1 hashes over '$got', want '$2'"
}
keys=300
picks() { # H FILE: where keys k1..k$keys go in handler H, one a line
	local i
	: >"$2"
	for i in $(seq 1 "$keys"); do
		curl -fsS -m 5 "http://$admin/godist/pick?handler=$1&key=k$i" > "$work/pick.json" || fail "GET /godist/pick"
		grep -o '"upstream":"[^"]*"' "$work/pick.json" | cut -d'"' -f4 >> "$2"
	done
}
changes=0
# change H LOOKUP NAME CHANGED IDEAL WANT CMD...: makes a change of records,
# waits for handler H to follow it, and checks the keys that moved: in
# /godist/pick over $keys keys, only keys to or from CHANGED, and about
# IDEAL of them; in the info line (100,000 keys), IDEAL within 0.01.
change() {
	local h=$1 lookup=$2 name=$3 changed=$4 ideal=$5 want=$6 before lines logged
	shift 6
	before=$(grep -cF "\"msg\":\"upstreams changed\",\"sources\":[\"$lookup\"" "$work/caddy.log" || true)
	picks "$h" "$work/before"
	"$@"
	wait_members "$h" "$want"
	picks "$h" "$work/after"
	for _ in $(seq 1 50); do
		grep -F "\"msg\":\"upstreams changed\",\"sources\":[\"$lookup\"" "$work/caddy.log" > "$work/changes" || true
		lines=$(wc -l <"$work/changes")
		[ "$lines" -gt "$before" ] && break
		sleep 0.1
	done
	[ "$lines" -eq $((before + 1)) ] || fail "$name: $((lines - before)) change lines, want 1"
	logged=$(awk 'END {print}' "$work/changes" | grep -o '"moved_share":[0-9.]*' | cut -d: -f2)
	paste -d' ' "$work/before" "$work/after" | awk -v c="$changed" -v ideal="$ideal" -v logged="$logged" -v name="$name" -v keys="$keys" '
		$1 != $2 { moved++; if ($1 != c && $2 != c) bad++ }
		END {
			share = moved / keys
			printf "%-40s moved %.4f (info line, 100000 keys)  %.4f (/godist/pick, %d keys)  ideal %.4f\n", name, logged, share, keys, ideal
			if (bad > 0) { printf "FAIL: %d keys moved between upstreams other than %s\n", bad, c; exit 1 }
			d = logged - ideal; if (d < 0) d = -d; if (d > 0.01) { print "FAIL: the logged share is off the ideal"; exit 1 }
			d = share - ideal; if (d < 0) d = -d; if (d > 0.1) { print "FAIL: the sampled share is off the ideal"; exit 1 }
		}' || fail "$name: the keys did not move as rendezvous hashing requires"
	changes=$((changes + 1))
}
# traffic: N connections through PORT, each answered by one of the backends in WANT
traffic() {
	local reply i
	for i in $(seq 1 "$2"); do
		reply=$(curl -fsS -m 5 "http://127.0.0.1:$1/") || fail "curl through 127.0.0.1:$1"
		case " $3 " in *" ${reply:8:4} "*) ;; *) fail "a connection through $1 reached '$reply', not one of $3" ;; esac
	done
}
s=127.0.0.1
wait_members "$srv_h" "$s:4000 10 0,$s:4001 10 0,$s:4002 10 0,"
traffic 8083 10 "4000 4001 4002"
wait_members "$a_h" "$s:4000 1 0,127.0.0.2:4000 1 0,127.0.0.3:4000 1 0,"
echo "SRV records (handler $srv_h) and A records (handler $a_h) found"
change "$srv_h" srv:_web._tcp.godist.test "SRV: add one of 3" "$s:4003" 0.25 \
	"$s:4000 10 0,$s:4001 10 0,$s:4002 10 0,$s:4003 10 0," set_srv 4000:0:10 4001:0:10 4002:0:10 4003:0:10
traffic 8083 10 "4000 4001 4002 4003"
change "$srv_h" srv:_web._tcp.godist.test "SRV: remove one of 4" "$s:4001" 0.25 \
	"$s:4000 10 0,$s:4002 10 0,$s:4003 10 0," set_srv 4000:0:10 4002:0:10 4003:0:10
change "$srv_h" srv:_web._tcp.godist.test "SRV: re-weight one of 3 (10 to 30)" "$s:4000" 0.2667 \
	"$s:4000 30 0,$s:4002 10 0,$s:4003 10 0," set_srv 4000:0:30 4002:0:10 4003:0:10
change "$srv_h" srv:_web._tcp.godist.test "SRV: re-prioritise one (0 to 1)" "$s:4002" 0.2 \
	"$s:4000 30 0,$s:4002 10 1,$s:4003 10 0," set_srv 4000:0:30 4002:1:10 4003:0:10
traffic 8083 10 "4000 4003"
change "$a_h" a:db.godist.test:4000 "A: add one of 3" "127.0.0.4:4000" 0.25 \
	"$s:4000 1 0,127.0.0.2:4000 1 0,127.0.0.3:4000 1 0,127.0.0.4:4000 1 0," set_hosts 127.0.0.1 127.0.0.2 127.0.0.3 127.0.0.4
change "$a_h" a:db.godist.test:4000 "A: remove one of 4" "127.0.0.2:4000" 0.25 \
	"$s:4000 1 0,127.0.0.3:4000 1 0,127.0.0.4:4000 1 0," set_hosts 127.0.0.1 127.0.0.3 127.0.0.4
[ "$(grep -c '"msg":"godist handler provisioned"' "$work/caddy.log")" = "$provisioned" ] || fail "the config was reloaded while DNS changed"
code=$(get "http://$admin/godist/fingerprint?handler=$srv_h"); [ "$code" = 200 ] || fail "GET /godist/fingerprint answered $code"
has '"digested":"hrw-xxhash64-v1\\n\\"ip_port\\"\\n\\"127.0.0.1:4000\\" 30\\n\\"127.0.0.1:4002\\" 10 tier 1\\n\\"127.0.0.1:4003\\" 10\\n"' "/godist/fingerprint of the SRV handler"
echo "$changes changes of DNS records followed without a reload, each moving only the keys it must"

echo "--- stop"
"$caddy" stop --address "$admin" || fail "caddy stop"
wait "$caddy_pid" || true
caddy_pid=""

echo "--- operator states: two instances sharing one storage folder"
# shellcheck source=.ci/opstate-e2e.sh
. .ci/opstate-e2e.sh
trap 'opstate_cleanup; dnsmasq_stop "$dns"; cleanup' EXIT
opstate_e2e "$caddy"

echo "--- the status page in headless Chromium"
# The same binary, three backends with one killed, the page behind
# basic_auth; the screenshots stay for people to look at.
shots="${GODIST_SCREENSHOTS:-$(mktemp -d /tmp/godist-status-page.XXXXXX)}"
GODIST_CADDY="$caddy" GODIST_SCREENSHOTS="$shots" timeout 5m \
	go test -C browsertest -count=1 -run '^TestStatusPageInBrowser$' -v . || fail "the status page in a browser"
echo "screenshots of the status page: $shots"
echo "end-to-end check passed"
