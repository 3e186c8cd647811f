// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"testing"
)

// dnsmasqDir is one dnsmasq run by .ci/dnsmasq.sh, the script the
// end-to-end check uses, so that this test checks the script as well.
type dnsmasqDir struct {
	t   *testing.T
	dir string
}

// call runs one of the script's functions for the directory, with stdin,
// and returns what it printed.
func (d dnsmasqDir) call(fn, stdin string, args ...string) string {
	d.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "bash", append([]string{"-c", `. "$0" && "$@"`, ".ci/dnsmasq.sh", fn, d.dir}, args...)...)
	cmd.Stdin = strings.NewReader(stdin)
	out, err := cmd.Output()
	if err != nil {
		stderr := ""
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = string(ee.Stderr)
		}
		d.t.Fatalf("%s: %v\n%s", fn, err, stderr)
	}
	return strings.TrimSpace(string(out))
}

// TestSourcesWithDnsmasq follows a real DNS server, Debian's dnsmasq, as
// its records change: A records by rewriting its hosts file and SIGHUP,
// SRV records by a restart (SIGHUP does not re-read them).
func TestSourcesWithDnsmasq(t *testing.T) {
	if _, err := exec.LookPath("dnsmasq"); err != nil {
		t.Skip("dnsmasq is not installed, so the sources are not checked against it here: apt-get install dnsmasq-base (.ci/run installs it)")
	}
	d := dnsmasqDir{t: t, dir: t.TempDir()}
	d.call("dnsmasq_set_hosts", "10.0.0.1 db.godist.test\n10.0.0.11 pg1.godist.test\n10.0.0.12 pg2.godist.test\n")
	d.call("dnsmasq_set_srv", "_pg._tcp.godist.test,pg1.godist.test,5432,1,10\n_pg._tcp.godist.test,pg2.godist.test,5433,2,0\n")
	resolver := "127.0.0.1:" + d.call("dnsmasq_start", "")
	t.Cleanup(func() { d.call("dnsmasq_stop", "") })

	a := watch(t, loadSource(t, "a", fmt.Sprintf(`{"name":"db.godist.test","port":"5432","refresh":"50ms","resolver":{"addresses":[%q]}}`, resolver), nil))
	srv := watch(t, loadSource(t, "srv", fmt.Sprintf(`{"service":"pg","proto":"tcp","name":"godist.test","refresh":"50ms","resolver":{"addresses":[%q]}}`, resolver), nil))
	const aName, srvName = "a:db.godist.test:5432", "srv:_pg._tcp.godist.test"
	a.expect(up("10.0.0.1:5432", 1, 0, aName))
	srv.expect(up("10.0.0.11:5432", 10, 1, srvName), up("10.0.0.12:5433", 1, 2, srvName))

	// The hosts file rewritten: SIGHUP, and both sources follow.
	d.call("dnsmasq_set_hosts", "10.0.0.2 db.godist.test\n10.0.0.3 db.godist.test\n10.0.0.21 pg1.godist.test\n10.0.0.12 pg2.godist.test\n")
	a.expect(up("10.0.0.2:5432", 1, 0, aName), up("10.0.0.3:5432", 1, 0, aName))
	srv.expect(up("10.0.0.12:5433", 1, 2, srvName), up("10.0.0.21:5432", 10, 1, srvName))

	// SRV records re-weighted and re-prioritised: a restart on the same
	// port. The lookups that fail meanwhile keep the last good sets.
	d.call("dnsmasq_set_srv", "_pg._tcp.godist.test,pg1.godist.test,5432,1,10\n_pg._tcp.godist.test,pg2.godist.test,5433,1,30\n")
	srv.expect(up("10.0.0.12:5433", 30, 1, srvName), up("10.0.0.21:5432", 10, 1, srvName))
	a.waitSuccess(a.src.Status()[0])
	a.expectNone()

	// A name removed from the hosts file: NXDOMAIN, the last good set stays.
	before := a.src.Status()[0]
	d.call("dnsmasq_set_hosts", "10.0.0.21 pg1.godist.test\n10.0.0.12 pg2.godist.test\n")
	st := a.waitFailures(before, 2)
	a.expectNone()
	if st.Records != 2 || !strings.Contains(st.LastError, "no such host") {
		t.Errorf("status of the a source after its name went: %+v", st)
	}
}
