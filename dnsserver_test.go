// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"context"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// testDNS is a real DNS server in the test process, answering over UDP
// and TCP on one loopback port, whose records a test changes while it
// runs. A name it does not know is NXDOMAIN; a known name without records
// of the type asked is an empty answer (NOERROR, no data). A UDP answer
// too big for the client is truncated, as a real server does, so that the
// client retries over TCP.
type testDNS struct {
	addr string // 127.0.0.1:port, for UDP and TCP

	mu      sync.Mutex
	names   map[string]*testDNSName // by lower-case name with its final dot
	queries []testDNSQuery
	servers []*dns.Server
}

// testDNSName is what the server holds for one name.
type testDNSName struct {
	a, aaaa []string
	srv     []testSRV
	rcode   int  // if not 0 (NOERROR), the answer's code instead of records
	drop    bool // answer nothing: the client waits and times out
}

// testSRV is one SRV record.
type testSRV struct {
	target                 string
	port, priority, weight uint16
}

// testDNSQuery is one question the server was asked.
type testDNSQuery struct {
	name  string
	qtype uint16
	net   string // "udp" or "tcp"
	at    time.Time
}

// startTestDNS starts a DNS server on a free loopback port, for UDP and
// TCP, and stops it when the test ends.
func startTestDNS(t testing.TB) *testDNS {
	t.Helper()
	s := &testDNS{names: make(map[string]*testDNSName)}
	var pc net.PacketConn
	var ln net.Listener
	for attempt := 0; ; attempt++ {
		var err error
		if pc, err = net.ListenPacket("udp", "127.0.0.1:0"); err != nil {
			t.Fatalf("test DNS server: %v", err)
		}
		if ln, err = net.Listen("tcp", pc.LocalAddr().String()); err == nil {
			break
		}
		pc.Close()
		if attempt == 20 {
			t.Fatalf("test DNS server: no port free for both UDP and TCP: %v", err)
		}
	}
	s.addr = pc.LocalAddr().String()
	handler := dns.HandlerFunc(s.serve)
	s.servers = []*dns.Server{{PacketConn: pc, Handler: handler}, {Listener: ln, Handler: handler}}
	for _, srv := range s.servers {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		go func() { _ = srv.ActivateAndServe() }()
		select {
		case <-started:
		case <-time.After(testTimeout):
			t.Fatal("test DNS server did not start")
		}
	}
	t.Cleanup(s.stop)
	return s
}

func (s *testDNS) stop() {
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	for _, srv := range s.servers {
		_ = srv.ShutdownContext(ctx)
	}
}

func fqdn(name string) string { return strings.ToLower(dns.Fqdn(name)) }

// entry returns the records of name, making them.
func (s *testDNS) entry(name string) *testDNSName {
	n := s.names[fqdn(name)]
	if n == nil {
		n = new(testDNSName)
		s.names[fqdn(name)] = n
	}
	return n
}

// setA replaces the A records of name; with no addresses, the name exists
// with none (an empty answer).
func (s *testDNS) setA(name string, ips ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.entry(name).a = ips
}

// setAAAA replaces the AAAA records of name.
func (s *testDNS) setAAAA(name string, ips ...string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.entry(name).aaaa = ips
}

// setSRV replaces the SRV records of name.
func (s *testDNS) setSRV(name string, records ...testSRV) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.entry(name).srv = records
}

// setRcode makes every answer for name carry rcode (dns.RcodeServerFailure,
// dns.RcodeNameError) and no records; dns.RcodeSuccess undoes it.
func (s *testDNS) setRcode(name string, rcode int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.entry(name).rcode = rcode
}

// setDrop makes the server answer nothing for name, or answer again.
func (s *testDNS) setDrop(name string, drop bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.entry(name).drop = drop
}

// remove forgets name: it is NXDOMAIN from now on.
func (s *testDNS) remove(name string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.names, fqdn(name))
}

// asked returns the questions for name of type qtype so far.
func (s *testDNS) asked(name string, qtype uint16) []testDNSQuery {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []testDNSQuery
	for _, q := range s.queries {
		if q.name == fqdn(name) && q.qtype == qtype {
			out = append(out, q)
		}
	}
	return out
}

func (s *testDNS) serve(w dns.ResponseWriter, r *dns.Msg) {
	if len(r.Question) != 1 {
		m := new(dns.Msg)
		m.SetRcode(r, dns.RcodeFormatError)
		_ = w.WriteMsg(m)
		return
	}
	q := r.Question[0]
	network := "tcp"
	if _, ok := w.RemoteAddr().(*net.UDPAddr); ok {
		network = "udp"
	}

	s.mu.Lock()
	s.queries = append(s.queries, testDNSQuery{name: strings.ToLower(q.Name), qtype: q.Qtype, net: network, at: time.Now()})
	n, known := s.names[strings.ToLower(q.Name)]
	var rrs []dns.RR
	rcode, drop := dns.RcodeNameError, false
	if known {
		rcode, drop = n.rcode, n.drop
		rrs = n.records(q)
	}
	s.mu.Unlock()

	if drop {
		return
	}
	m := new(dns.Msg)
	m.SetReply(r)
	m.Authoritative = true
	m.Rcode = rcode
	if rcode == dns.RcodeSuccess {
		m.Answer = rrs
	}
	if network == "udp" {
		size := dns.MinMsgSize
		if opt := r.IsEdns0(); opt != nil {
			size = int(opt.UDPSize())
		}
		m.Truncate(size)
	}
	_ = w.WriteMsg(m)
}

// records returns the records of n that answer q.
func (n *testDNSName) records(q dns.Question) []dns.RR {
	hdr := func(t uint16) dns.RR_Header {
		return dns.RR_Header{Name: q.Name, Rrtype: t, Class: dns.ClassINET, Ttl: 0}
	}
	var rrs []dns.RR
	switch q.Qtype {
	case dns.TypeA:
		for _, ip := range n.a {
			rrs = append(rrs, &dns.A{Hdr: hdr(dns.TypeA), A: net.ParseIP(ip)})
		}
	case dns.TypeAAAA:
		for _, ip := range n.aaaa {
			rrs = append(rrs, &dns.AAAA{Hdr: hdr(dns.TypeAAAA), AAAA: net.ParseIP(ip)})
		}
	case dns.TypeSRV:
		for _, r := range n.srv {
			rrs = append(rrs, &dns.SRV{Hdr: hdr(dns.TypeSRV), Priority: r.priority, Weight: r.weight, Port: r.port, Target: dns.Fqdn(r.target)})
		}
	}
	return rrs
}

// TestTestDNS checks the test server itself: each answer a test relies on.
func TestTestDNS(t *testing.T) {
	s := startTestDNS(t)
	s.setA("db.godist.test", "10.0.0.1", "10.0.0.2")
	s.setAAAA("db.godist.test", "2001:db8::1")
	s.setA("empty.godist.test")
	s.setRcode("broken.godist.test", dns.RcodeServerFailure)
	s.setDrop("silent.godist.test", true)
	s.setSRV("_pg._tcp.godist.test", testSRV{target: "db.godist.test", port: 5432, priority: 1, weight: 10})
	many := make([]string, 120)
	for i := range many {
		many[i] = fmt.Sprintf("10.1.%d.%d", i/250, i%250+1)
	}
	s.setA("many.godist.test", many...)

	ask := func(name string, qtype uint16, network string) (*dns.Msg, error) {
		c := &dns.Client{Net: network, Timeout: 300 * time.Millisecond}
		m := new(dns.Msg)
		m.SetQuestion(dns.Fqdn(name), qtype)
		in, _, err := c.Exchange(m, s.addr)
		return in, err
	}
	tests := []struct {
		name, qname string
		qtype       uint16
		network     string
		rcode       int
		answers     int
		truncated   bool
		timeout     bool
	}{
		{name: "A over UDP", qname: "db.godist.test", qtype: dns.TypeA, network: "udp", answers: 2},
		{name: "A over TCP", qname: "DB.godist.test", qtype: dns.TypeA, network: "tcp", answers: 2},
		{name: "AAAA", qname: "db.godist.test", qtype: dns.TypeAAAA, network: "udp", answers: 1},
		{name: "SRV", qname: "_pg._tcp.godist.test", qtype: dns.TypeSRV, network: "udp", answers: 1},
		{name: "no data", qname: "empty.godist.test", qtype: dns.TypeA, network: "udp"},
		{name: "no such name", qname: "nope.godist.test", qtype: dns.TypeA, network: "udp", rcode: dns.RcodeNameError},
		{name: "SERVFAIL", qname: "broken.godist.test", qtype: dns.TypeA, network: "udp", rcode: dns.RcodeServerFailure},
		{name: "no answer", qname: "silent.godist.test", qtype: dns.TypeA, network: "udp", timeout: true},
		{name: "truncated over UDP", qname: "many.godist.test", qtype: dns.TypeA, network: "udp", truncated: true},
		{name: "whole over TCP", qname: "many.godist.test", qtype: dns.TypeA, network: "tcp", answers: 120},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			in, err := ask(tt.qname, tt.qtype, tt.network)
			if tt.timeout {
				if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
					t.Fatalf("want a timeout, got %v %v", in, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if in.Rcode != tt.rcode || in.Truncated != tt.truncated || (!tt.truncated && len(in.Answer) != tt.answers) {
				t.Fatalf("rcode %s truncated %v answers %d; want %s %v %d",
					dns.RcodeToString[in.Rcode], in.Truncated, len(in.Answer), dns.RcodeToString[tt.rcode], tt.truncated, tt.answers)
			}
		})
	}
	if n := len(s.asked("db.godist.test", dns.TypeA)); n != 2 {
		t.Errorf("asked for db.godist.test A %d times; want 2", n)
	}
}
