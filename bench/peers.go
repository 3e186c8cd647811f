// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"
)

// installHint is how to get the peers that are not Go programs.
const installHint = "bench/install-peers.sh (apt-get install -y haproxy nginx libnginx-mod-stream)"

// peer is one way of getting bytes from the load tool to the backends: a
// proxy, or none (direct).
type peer struct {
	ID    string // its name in -peers
	Label string // its row in the tables
	srv   *server
	front map[backendKind]string // where the load tool connects for each backend kind
	skip  string                 // why it is not measured, if it is not

	// The scenarios' routes, on the peers that run them (scenarioPeers):
	// front also holds a plain route to the hold and to the TLS echo
	// backend.
	sniFront string // one listener that picks a TLS backend by server name; direct has none
	udpFront string // a UDP listener to the UDP echo backend; empty without UDP
}

// scenarioPeers are the peers the SNI, slow-reader and UDP scenarios run
// on; godist's three-upstream config would only repeat godist's figures.
var scenarioPeers = map[string]bool{"direct": true, "godist": true, "caddy-l4": true, "haproxy-splice": true, "haproxy": true, "nginx": true}

// scenarioKinds are the backends the scenarios reach by a plain route: the
// slow readers' downloads, and the TLS echo (TLS idle connections, with no
// matcher in the way).
var scenarioKinds = []backendKind{kindHold, kindTLSEcho}

// unsupported says why the peer does not run a test, or "" if it does.
func (p *peer) unsupported(test string) string { return unsupportedBy(p.ID, test) }

// unsupportedBy says why the peer of that ID does not run a test, or "" if
// it does.
func unsupportedBy(id, test string) string {
	switch {
	case !isScenarioTest(test):
		return ""
	case !scenarioPeers[id]:
		return "not run: it would repeat godist's figures"
	case test == udpTest && strings.HasPrefix(id, "haproxy"):
		return "HAProxy proxies no UDP"
	}
	return ""
}

// server is a proxy process; one Caddy serves several peers.
type server struct {
	name    string
	argv    []string
	env     []string
	dir     string // its temp dir: config, logs, pid files
	logPath string
	admin   string   // Caddy's admin address, for pprof
	ports   []string // addresses it listens on, waited for at start
	child   *child
}

// start runs the server pinned to the proxy CPU and waits until it accepts
// connections on every port.
func (s *server) start(pin pinning) error {
	c, err := startChild(s.name, s.argv, s.env, s.dir, s.logPath, pin.proxyCPU, pin.loadCPU)
	if err != nil {
		return err
	}
	s.child = c
	deadline := time.Now().Add(20 * time.Second)
	for _, addr := range s.ports {
		for {
			if c.exited() {
				return fmt.Errorf("%s exited at start: %v\n%s", s.name, c.err, tail(s.logPath, 20))
			}
			conn, err := net.DialTimeout("tcp", addr, time.Second)
			if err == nil {
				_ = conn.Close()
				break
			}
			if time.Now().After(deadline) {
				s.stop()
				return fmt.Errorf("%s: not listening on %s after 20s: %v\n%s", s.name, addr, err, tail(s.logPath, 20))
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return nil
}

func (s *server) stop() {
	if s.child != nil {
		s.child.stop()
		s.child = nil
	}
}

func (s *server) restart(pin pinning) error {
	s.stop()
	return s.start(pin)
}

func (s *server) alive() bool { return s.child != nil && !s.child.exited() }

func (s *server) pid() int { return s.child.pid() }

// tail returns the last n lines of a file, for error messages.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	return tailString(string(b), n)
}

// tailString returns the last n lines of s.
func tailString(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// handedOut holds every port freePort and freeUDPPort returned in this run.
// A port is free only until something binds it, and the kernel may hand the
// same one to two bind(":0") calls made a moment apart: two listeners of
// one Caddy on one address then share it, and a test's connections land on
// both routes at random (a failure seen once in a full run: TLS handshakes
// reaching a sink, an upload reaching a source).
var handedOut = struct {
	sync.Mutex
	ports map[string]bool
}{ports: map[string]bool{}}

// uniquePort asks pick for an address until it returns one not handed out
// before in this run, at most 100 times.
func uniquePort(pick func() (string, error)) (string, error) {
	handedOut.Lock()
	defer handedOut.Unlock()
	for range 100 {
		addr, err := pick()
		if err != nil {
			return "", err
		}
		_, port, _ := net.SplitHostPort(addr)
		if !handedOut.ports[port] {
			handedOut.ports[port] = true
			return addr, nil
		}
	}
	return "", fmt.Errorf("no loopback port free that was not handed out before, after 100 tries")
}

// freePort returns a loopback address whose port was free a moment ago and
// was not handed out before in this run.
func freePort() (string, error) {
	return uniquePort(func() (string, error) {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return "", err
		}
		defer ln.Close()
		return ln.Addr().String(), nil
	})
}

// freeUDPPort returns a loopback UDP address whose port was free a moment
// ago and was not handed out before in this run.
func freeUDPPort() (string, error) {
	return uniquePort(func() (string, error) {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			return "", err
		}
		defer pc.Close()
		return pc.LocalAddr().String(), nil
	})
}

// frontPorts picks a listen address for each backend kind, and for the
// scenarios' routes when the peer runs them.
func frontPorts(p *peer, udp bool) (map[backendKind]string, error) {
	kinds := backendKinds
	if scenarioPeers[p.ID] {
		kinds = append(slices.Clone(backendKinds), scenarioKinds...)
	}
	m := make(map[backendKind]string)
	for _, k := range kinds {
		a, err := freePort()
		if err != nil {
			return nil, err
		}
		m[k] = a
	}
	if !scenarioPeers[p.ID] {
		return m, nil
	}
	var err error
	if p.sniFront, err = freePort(); err != nil {
		return nil, err
	}
	if udp {
		if p.udpFront, err = freeUDPPort(); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// udpFlowTimeout is how long the proxies keep a silent UDP flow: longer
// than the UDP test holds its flows (caddy-l4's default is 30s).
const udpFlowTimeout = "5m"

var backendKinds = []backendKind{kindEcho, kindSink, kindSource}

// peerIDs are the peers in the order of the tables.
var peerIDs = []string{"direct", "godist", "godist3", "caddy-l4", "haproxy-splice", "haproxy", "nginx"}

// setupPeers builds the peers asked for, writing each server's config into
// a directory of its own under tmp. Peers whose program is missing come
// back with skip set.
func setupPeers(want map[string]bool, bs *backends, caddyBin, tmp string) ([]*peer, []*server, error) {
	var peers []*peer
	var servers []*server

	direct := &peer{ID: "direct", Label: "direct", front: map[backendKind]string{}}
	for _, k := range append(slices.Clone(backendKinds), scenarioKinds...) {
		direct.front[k] = bs.of(k).addrs[0]
	}
	peers = append(peers, direct)

	// One Caddy for godist, godist3 and caddy-l4, as a user would run them.
	var caddyPeers []*peer
	l4 := caddyL4Version(caddyBin)
	for _, p := range []*peer{
		{ID: "godist", Label: "godist"},
		{ID: "godist3", Label: "godist, 3 upstreams"},
		{ID: "caddy-l4", Label: "caddy-l4 `proxy` " + l4},
	} {
		if want[p.ID] {
			caddyPeers = append(caddyPeers, p)
		}
	}
	if len(caddyPeers) > 0 {
		srv, err := caddyServer(caddyPeers, bs, caddyBin, filepath.Join(tmp, "caddy"))
		if err != nil {
			return nil, nil, err
		}
		servers = append(servers, srv)
		peers = append(peers, caddyPeers...)
	}

	haproxyVer, haproxyErr := haproxyVersion()
	if haproxyErr != nil {
		haproxyVer = "2.6" // the version PEERS.md measured
	}
	for _, splice := range []bool{true, false} {
		p := &peer{ID: "haproxy", Label: "HAProxy " + haproxyVer + " default"}
		if splice {
			p.ID, p.Label = "haproxy-splice", "HAProxy "+haproxyVer+" splice forced"
		}
		if !want[p.ID] {
			continue
		}
		peers = append(peers, p)
		if haproxyErr != nil {
			p.skip = haproxyErr.Error()
			continue
		}
		srv, err := haproxyServer(p, bs, filepath.Join(tmp, p.ID), splice)
		if err != nil {
			return nil, nil, err
		}
		servers = append(servers, srv)
	}

	if want["nginx"] {
		nginxBin, ver, loadModule, err := findNginx()
		p := &peer{ID: "nginx", Label: "nginx " + ver + " stream"}
		peers = append(peers, p)
		if err != nil {
			p.Label = "nginx 1.22 stream" // the version PEERS.md measured
			p.skip = err.Error()
		} else {
			srv, err := nginxServer(p, bs, nginxBin, loadModule, filepath.Join(tmp, "nginx"))
			if err != nil {
				return nil, nil, err
			}
			servers = append(servers, srv)
		}
	}
	return peers, servers, nil
}

// proxyEnv is the environment of the proxies: this one's, with a home of
// their own, and one Go P for Caddy.
func proxyEnv(dir string) []string {
	environ := os.Environ()
	env := make([]string, 0, 4+len(environ))
	env = append(env, "HOME="+dir, "XDG_CONFIG_HOME="+dir, "XDG_DATA_HOME="+dir, "GOMAXPROCS=1")
	for _, kv := range environ {
		switch strings.SplitN(kv, "=", 2)[0] {
		case "HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "GOMAXPROCS", "GODEBUG", "GOGC", "GOMEMLIMIT":
			continue
		}
		env = append(env, kv)
	}
	return env
}

// caddyServer writes the config of one Caddy that serves every Caddy peer,
// each on its own three ports, admin on a free loopback port.
func caddyServer(peers []*peer, bs *backends, bin, dir string) (*server, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	admin, err := freePort()
	if err != nil {
		return nil, err
	}
	srv := &server{name: "caddy", dir: dir, logPath: filepath.Join(dir, "caddy.log"), admin: admin, env: proxyEnv(dir)}
	servers := map[string]any{}
	for _, p := range peers {
		if p.front, err = frontPorts(p, true); err != nil {
			return nil, err
		}
		p.srv = srv
		// handler proxies to one address; network is caddy-l4's prefix
		// ("udp/"), which godist takes from its listener.
		handler := func(addr, network string) map[string]any {
			if p.ID == "caddy-l4" {
				return map[string]any{"handler": "proxy", "upstreams": []any{map[string]any{"dial": []string{network + addr}}}}
			}
			return map[string]any{"handler": "godist", "upstreams": []any{map[string]any{"dial": addr}}}
		}
		route := func(h map[string]any) map[string]any { return map[string]any{"handle": []any{h}} }
		for k, front := range p.front {
			var h map[string]any
			switch p.ID {
			case "godist3":
				ups := make([]any, 0, len(bs.of(k).addrs))
				for _, a := range bs.of(k).addrs {
					ups = append(ups, map[string]any{"dial": a})
				}
				h = map[string]any{"handler": "godist", "upstreams": ups}
			default:
				h = handler(bs.of(k).addrs[0], "")
			}
			servers[p.ID+"-"+string(k)] = map[string]any{"listen": []string{front}, "routes": []any{route(h)}}
			srv.ports = append(srv.ports, front)
		}
		if p.sniFront != "" {
			// A route per server name, as a user writes them: caddy-l4's
			// tls matcher reads the ClientHello, the first route whose
			// sni matches proxies the connection.
			routes := make([]any, 0, len(tlsKinds))
			for _, k := range tlsKinds {
				r := route(handler(bs.of(k).addrs[0], ""))
				r["match"] = []any{map[string]any{"tls": map[string]any{"sni": []string{sniNames[k]}}}}
				routes = append(routes, r)
			}
			servers[p.ID+"-sni"] = map[string]any{"listen": []string{p.sniFront}, "routes": routes}
			srv.ports = append(srv.ports, p.sniFront)
		}
		if p.udpFront != "" {
			servers[p.ID+"-udp"] = map[string]any{
				"listen":       []string{"udp/" + p.udpFront},
				"idle_timeout": udpFlowTimeout,
				"routes":       []any{route(handler(bs.udpEcho.addr, "udp/"))},
			}
		}
	}
	cfg := map[string]any{
		"admin": map[string]any{"listen": admin, "config": map[string]any{"persist": false}},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{
			"writer": map[string]any{"output": "stderr"}, "level": "WARN",
		}}},
		"apps": map[string]any{"layer4": map[string]any{"servers": servers}},
	}
	b, err := json.MarshalIndent(cfg, "", "\t")
	if err != nil {
		return nil, err
	}
	path := filepath.Join(dir, "caddy.json")
	if err := os.WriteFile(path, b, 0o644); err != nil {
		return nil, err
	}
	srv.argv = []string{bin, "run", "--config", path}
	return srv, nil
}

// caddyL4Version returns the caddy-l4 version built into the Caddy binary.
func caddyL4Version(bin string) string {
	out, err := exec.Command(bin, "build-info").Output()
	if err != nil {
		return ""
	}
	for line := range strings.SplitSeq(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) >= 3 && f[0] == "dep" && f[1] == "github.com/mholt/caddy-l4" {
			return f[2]
		}
	}
	return ""
}

var versionRe = regexp.MustCompile(`\d+\.\d+(\.\d+)?`)

// haproxyVersion returns HAProxy's version, or why it cannot be used.
func haproxyVersion() (string, error) {
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		return "", fmt.Errorf("haproxy not installed: %s", installHint)
	}
	out, err := exec.Command(bin, "-v").Output()
	if err != nil {
		return "", fmt.Errorf("haproxy -v: %w", err)
	}
	v := versionRe.FindString(string(out))
	if i := strings.LastIndexByte(v, '.'); strings.Count(v, ".") == 2 {
		v = v[:i] // 2.6.12 → 2.6, as in PEERS.md
	}
	return v, nil
}

// haproxyServer writes a one-thread HAProxy config with a frontend per
// backend kind. maxconn leaves room within a 20000-descriptor limit for
// two sockets per connection and, when splicing, 1000 pipes.
func haproxyServer(p *peer, bs *backends, dir string, splice bool) (*server, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	bin, _ := exec.LookPath("haproxy")
	srv := &server{name: p.ID, dir: dir, logPath: filepath.Join(dir, "haproxy.log"), env: proxyEnv(dir)}
	var b strings.Builder
	b.WriteString("global\n\tnbthread 1\n\tmaxconn 8000\n")
	if splice {
		b.WriteString("\tmaxpipes 1000\n")
	}
	b.WriteString("\ndefaults\n\tmode tcp\n\ttimeout connect 5s\n\ttimeout client 1h\n\ttimeout server 1h\n")
	if splice {
		b.WriteString("\toption splice-request\n\toption splice-response\n")
	}
	var err error
	if p.front, err = frontPorts(p, false); err != nil {
		return nil, err
	}
	p.srv = srv
	for _, k := range append(slices.Clone(backendKinds), scenarioKinds...) {
		fmt.Fprintf(&b, "\nlisten %s\n\tbind %s\n\tserver %s %s\n", k, p.front[k], k, bs.of(k).addrs[0])
		srv.ports = append(srv.ports, p.front[k])
	}
	// The SNI route: wait for the ClientHello, then pick the backend by
	// the name in it.
	fmt.Fprintf(&b, "\nfrontend sni\n\tbind %s\n\ttcp-request inspect-delay 5s\n\ttcp-request content accept if { req.ssl_hello_type 1 }\n", p.sniFront)
	for _, k := range tlsKinds {
		fmt.Fprintf(&b, "\tuse_backend sni-%s if { req.ssl_sni -i %s }\n", k, sniNames[k])
	}
	for _, k := range tlsKinds {
		fmt.Fprintf(&b, "\nbackend sni-%s\n\tserver %s %s\n", k, k, bs.of(k).addrs[0])
	}
	srv.ports = append(srv.ports, p.sniFront)
	path := filepath.Join(dir, "haproxy.cfg")
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		return nil, err
	}
	srv.argv = []string{bin, "-f", path, "-db"}
	return srv, nil
}

// nginxModule is where Debian's libnginx-mod-stream puts the stream module.
const nginxModule = "/usr/lib/nginx/modules/ngx_stream_module.so"

// findNginx returns nginx's path and version, and whether its stream
// module must be loaded, or why it cannot be used.
func findNginx() (bin, version string, loadModule bool, err error) {
	bin, err = exec.LookPath("nginx")
	if err != nil {
		if _, serr := os.Stat("/usr/sbin/nginx"); serr != nil {
			return "", "", false, fmt.Errorf("nginx not installed: %s", installHint)
		}
		bin = "/usr/sbin/nginx"
	}
	out, verr := exec.Command(bin, "-V").CombinedOutput() // nginx writes it to stderr
	if verr != nil {
		return "", "", false, fmt.Errorf("nginx -V: %w", verr)
	}
	version = versionRe.FindString(string(out))
	if i := strings.LastIndexByte(version, '.'); strings.Count(version, ".") == 2 {
		version = version[:i]
	}
	if _, serr := os.Stat(nginxModule); serr == nil {
		return bin, version, true, nil
	}
	if strings.Contains(string(out), "--with-stream ") || strings.HasSuffix(strings.TrimSpace(string(out)), "--with-stream") {
		return bin, version, false, nil
	}
	return "", version, false, errors.New("nginx has no stream module: apt-get install -y libnginx-mod-stream")
}

// nginxServer writes a one-worker nginx config with everything it writes
// (pid, logs) inside dir.
func nginxServer(p *peer, bs *backends, bin string, loadModule bool, dir string) (*server, error) {
	if err := os.MkdirAll(filepath.Join(dir, "logs"), 0o755); err != nil {
		return nil, err
	}
	srv := &server{name: "nginx", dir: dir, logPath: filepath.Join(dir, "nginx.out"), env: proxyEnv(dir)}
	var b strings.Builder
	if loadModule {
		fmt.Fprintf(&b, "load_module %s;\n", nginxModule)
	}
	fmt.Fprintf(&b, "worker_processes 1;\nworker_rlimit_nofile 20000;\npid %s;\nerror_log %s warn;\n",
		filepath.Join(dir, "nginx.pid"), filepath.Join(dir, "logs", "error.log"))
	b.WriteString("events {\n\tworker_connections 9000;\n}\nstream {\n")
	var err error
	if p.front, err = frontPorts(p, true); err != nil {
		return nil, err
	}
	p.srv = srv
	for _, k := range append(slices.Clone(backendKinds), scenarioKinds...) {
		fmt.Fprintf(&b, "\tserver {\n\t\tlisten %s;\n\t\tproxy_pass %s;\n\t}\n", p.front[k], bs.of(k).addrs[0])
		srv.ports = append(srv.ports, p.front[k])
	}
	// The SNI route: ssl_preread reads the ClientHello, a map picks the
	// backend by the name in it.
	b.WriteString("\tmap $ssl_preread_server_name $sni_backend {\n")
	for _, k := range tlsKinds {
		fmt.Fprintf(&b, "\t\t%s %s;\n", sniNames[k], bs.of(k).addrs[0])
	}
	b.WriteString("\t}\n")
	fmt.Fprintf(&b, "\tserver {\n\t\tlisten %s;\n\t\tssl_preread on;\n\t\tproxy_pass $sni_backend;\n\t}\n", p.sniFront)
	srv.ports = append(srv.ports, p.sniFront)
	// UDP: a session per client address, kept while datagrams come
	// within proxy_timeout.
	fmt.Fprintf(&b, "\tserver {\n\t\tlisten %s udp;\n\t\tproxy_pass %s;\n\t\tproxy_timeout %s;\n\t}\n",
		p.udpFront, bs.udpEcho.addr, udpFlowTimeout)
	b.WriteString("}\n")
	path := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
		return nil, err
	}
	srv.argv = []string{bin, "-p", dir, "-e", filepath.Join(dir, "logs", "error.log"), "-c", path, "-g", "daemon off;"}
	return srv, nil
}
