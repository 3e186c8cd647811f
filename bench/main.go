// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

// Command bench is caddy-godist's load benchmark: it runs godist in a Caddy
// of its own, next to caddy-l4's proxy handler, HAProxy and nginx when they
// are installed, and a direct connection, all against the same loopback
// backends and by the method of shared/PEERS.md, and writes a Markdown
// table of the figures, their ratios and issue 4's goals; then the figures
// and goals of three scenarios: a TLS passthrough route chosen by SNI,
// descriptors after slow readers, idle UDP flows.
//
// Run it from the repository's root:
//
//	go run ./bench            # the full run, 30 to 40 minutes
//	go run ./bench -quick     # a smoke test, about a minute
//
// See bench/README.md for what each test does and how to read the table.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"time"
)

// options are the command-line flags.
type options struct {
	duration   time.Duration
	warmup     time.Duration
	repeats    int
	idleConns  int
	udpFlows   int
	peers      map[string]bool
	tests      map[string]bool
	quick      bool
	lean       bool // quick without -peers: the scenarios run against godist alone (and caddy-l4 for UDP)
	outDir     string
	name       string // of the result files, without extension
	caddyBin   string
	pprofDir   string
	checkGoals bool
	skewFactor float64       // c of the skewed-load scenario, for godist and HAProxy
	maxOther   float64       // repeat a test when other processes used more of a pinned CPU than this
	retries    int           // at most this many times
	quietWait  time.Duration // before each timed test, wait at most this long for other processes to calm down
}

// pinning says which CPU the load tool and the proxies run on.
type pinning struct {
	enabled           bool
	loadCPU, proxyCPU int // -1 when not pinned
	note              string
}

func main() { os.Exit(run()) }

func parseFlags(args []string) (options, error) {
	var opt options
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.DurationVar(&opt.duration, "duration", 5*time.Second, "measured `time` of each timed test")
	fs.DurationVar(&opt.warmup, "warmup", 500*time.Millisecond, "warm-up `time` before each measurement")
	fs.IntVar(&opt.repeats, "repeats", 3, "times each test runs; the tables show medians")
	fs.IntVar(&opt.idleConns, "idle", 4000, "idle connections held by the idle test, and by the sni-idle test on each route")
	fs.IntVar(&opt.udpFlows, "udp-flows", 2000, "UDP flows held by the udp-idle test")
	peers := fs.String("peers", "all", "comma-separated peers to run, of "+strings.Join(peerIDs, ",")+" (direct always runs)")
	tests := fs.String("tests", "all", "comma-separated tests to run, of "+strings.Join(allTests(), ",")+", or sni for every sni-* test")
	fs.BoolVar(&opt.quick, "quick", false, "smoke test: 1s runs, 250ms warm-up, 1 repeat, 500 idle connections, 500 UDP flows, the scenarios against godist alone unless -peers is given; writes quick.md, not latest.md")
	fs.StringVar(&opt.outDir, "out", "", "`directory` for the result files (default bench/results in the repository)")
	fs.StringVar(&opt.caddyBin, "caddy", "", "a Caddy `binary` with this module to use instead of building bench/caddy")
	fs.StringVar(&opt.pprofDir, "pprof", "", "save CPU profiles of Caddy during the first repeat of each timed test, and heap and goroutine profiles with the idle connections open, into `directory`; profiling costs the proxy some CPU")
	fs.Float64Var(&opt.maxOther, "max-other", 0.10, "run a timed test again when other processes used more than this `fraction` of either pinned CPU during it (the machine may be shared)")
	fs.IntVar(&opt.retries, "retries", 2, "times a test may run again because of other load; the last run counts either way")
	fs.DurationVar(&opt.quietWait, "quiet-wait", 30*time.Second, "before each timed test, wait at most this `long` until other processes use no more than -max-other of either pinned CPU (0: do not wait)")
	fs.Float64Var(&opt.skewFactor, "skew-factor", 1.25, "the balance `factor` c of the skew scenario: godist's balance_factor, HAProxy's hash-balance-factor (×100); above 1, in hundredths")
	fs.BoolVar(&opt.checkGoals, "check-goals", false, "exit with status 3 when a measured goal is not met")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: go run ./bench [flags]\n\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return opt, err
	}
	if fs.NArg() > 0 {
		return opt, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	opt.name = "latest"
	if opt.quick {
		opt.name = "quick"
		if !set["duration"] {
			opt.duration = time.Second
		}
		if !set["warmup"] {
			opt.warmup = 250 * time.Millisecond
		}
		if !set["repeats"] {
			opt.repeats = 1
		}
		if !set["idle"] {
			opt.idleConns = 500
		}
		if !set["udp-flows"] {
			opt.udpFlows = 500
		}
		if !set["retries"] {
			opt.retries = 0
		}
		if !set["quiet-wait"] {
			opt.quietWait = 0
		}
		opt.lean = !set["peers"]
	}
	var err error
	if opt.peers, err = parseList(*peers, peerIDs); err != nil {
		return opt, fmt.Errorf("-peers: %w", err)
	}
	opt.peers["direct"] = true // the ratios are to it
	if opt.tests, err = parseList(expandAliases(*tests, testAliases), allTests()); err != nil {
		return opt, fmt.Errorf("-tests: %w", err)
	}
	switch {
	case opt.duration < 100*time.Millisecond:
		return opt, fmt.Errorf("-duration %s: must be at least 100ms", opt.duration)
	case opt.warmup < 0:
		return opt, fmt.Errorf("-warmup %s: must not be negative", opt.warmup)
	case opt.repeats < 1 || opt.repeats > 100:
		return opt, fmt.Errorf("-repeats %d: must be 1 to 100", opt.repeats)
	case opt.idleConns < 1:
		return opt, fmt.Errorf("-idle %d: must be at least 1", opt.idleConns)
	case opt.udpFlows < 1:
		return opt, fmt.Errorf("-udp-flows %d: must be at least 1", opt.udpFlows)
	case opt.retries < 0 || opt.retries > 10:
		return opt, fmt.Errorf("-retries %d: must be 0 to 10", opt.retries)
	case !(opt.skewFactor > 1 && opt.skewFactor <= 10):
		return opt, fmt.Errorf("-skew-factor %g: must be above 1 and at most 10", opt.skewFactor)
	case math.Abs(opt.skewFactor*100-math.Round(opt.skewFactor*100)) > 1e-6:
		return opt, fmt.Errorf("-skew-factor %g: must be in hundredths, as HAProxy's hash-balance-factor takes a percentage", opt.skewFactor)
	}
	return opt, nil
}

// allTests are the names -tests takes, besides aliases.
func allTests() []string {
	return append(append(slices.Clone(timedTests), freshTests...), skewTest)
}

// expandAliases replaces each alias in a comma-separated list by the names
// it stands for.
func expandAliases(s string, aliases map[string][]string) string {
	items := strings.Split(s, ",")
	out := make([]string, 0, len(items))
	for _, item := range items {
		if names, ok := aliases[strings.TrimSpace(item)]; ok {
			out = append(out, names...)
			continue
		}
		out = append(out, item)
	}
	return strings.Join(out, ",")
}

// parseList parses "all" or a comma-separated subset of known.
func parseList(s string, known []string) (map[string]bool, error) {
	m := map[string]bool{}
	if s == "all" {
		for _, k := range known {
			m[k] = true
		}
		return m, nil
	}
	for item := range strings.SplitSeq(s, ",") {
		item = strings.TrimSpace(item)
		if item == "" {
			continue
		}
		found := false
		for _, k := range known {
			found = found || k == item
		}
		if !found {
			return nil, fmt.Errorf("unknown %q (known: %s)", item, strings.Join(known, ","))
		}
		m[item] = true
	}
	return m, nil
}

// logf prints progress to stderr; the report goes to stdout.
func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, format+"\n", args...)
}

func run() int {
	opt, err := parseFlags(os.Args[1:])
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		logf("bench: %v", err)
		return 2
	}
	// Children are stopped on every way out: return, SIGINT, SIGTERM.
	defer stopAllChildren()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	go func() {
		<-sigs
		logf("bench: interrupted, stopping (again to stop at once)")
		cancel()
		<-sigs
		stopAllChildren()
		os.Exit(130)
	}()

	rep, err := bench(ctx, opt)
	if err != nil {
		logf("bench: %v", err)
		if ctx.Err() != nil {
			return 130
		}
		return 1
	}
	failed := 0
	for _, pr := range rep.Peers {
		for _, s := range pr.Samples {
			if s.Failed != "" {
				failed++
			}
		}
	}
	if rep.Skew != nil {
		if rep.Skew.Failed != "" {
			failed++
		}
		for _, row := range rep.Skew.Rows {
			if row.Failed != "" {
				failed++
			}
		}
	}
	if failed > 0 {
		logf("bench: %d tests failed; see the notes of the report", failed)
		return 1
	}
	if opt.checkGoals {
		for _, g := range rep.Goals {
			if g.Status == "not met" {
				return 3
			}
		}
	}
	return 0
}

// report is everything a run writes, raw figures included.
type report struct {
	Command  string        `json:"command"`
	Machine  machine       `json:"machine"`
	Method   method        `json:"method"`
	Peers    []*peerResult `json:"peers"`
	Goals    []goal        `json:"goals"`
	Skew     *skewResult   `json:"skew,omitempty"`
	Warnings []string      `json:"warnings,omitempty"`
}

type method struct {
	Duration  string  `json:"duration"`
	Warmup    string  `json:"warmup"`
	Repeats   int     `json:"repeats"`
	IdleConns int     `json:"idle_conns"`
	UDPFlows  int     `json:"udp_flows"`
	Pinning   string  `json:"pinning"`
	MaxOther  float64 `json:"max_other"`
	QuietWait string  `json:"quiet_wait"`
	Retries   int     `json:"retries"`
	Quick     bool    `json:"quick,omitempty"`
	Lean      bool    `json:"lean,omitempty"` // the scenarios ran against godist alone (and caddy-l4 for UDP)
}

func bench(ctx context.Context, opt options) (*report, error) {
	root, err := moduleRoot()
	if err != nil {
		return nil, err
	}
	if opt.outDir == "" {
		opt.outDir = filepath.Join(root, "bench", "results")
	}
	tmp, err := os.MkdirTemp("", "godist-bench-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)

	limit, err := raiseFileLimit()
	if err != nil {
		return nil, fmt.Errorf("raising the descriptor limit: %w", err)
	}
	// Client and backend side of each idle connection, plus room.
	if need := uint64(2*opt.idleConns + 500); limit < need {
		return nil, fmt.Errorf("descriptor limit %d is too low for %d idle connections (needs %d): lower -idle", limit, opt.idleConns, need)
	}
	// A socket for each UDP flow here, and one in the proxy.
	if need := uint64(opt.udpFlows + 500); limit < need {
		return nil, fmt.Errorf("descriptor limit %d is too low for %d UDP flows (needs %d): lower -udp-flows", limit, opt.udpFlows, need)
	}

	rep := &report{Command: commandLine(), Machine: describeMachine(limit)}

	needCaddy := opt.peers["godist"] || opt.peers["godist3"] || opt.peers["caddy-l4"]
	caddyBin := opt.caddyBin
	if needCaddy && caddyBin == "" {
		// Before pinning: the build may use every core.
		caddyBin = filepath.Join(tmp, "caddy-godist")
		logf("building Caddy with godist (go build ./bench/caddy)...")
		cmd := exec.CommandContext(ctx, "go", "build", "-o", caddyBin, "./bench/caddy")
		cmd.Dir = root
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			return nil, fmt.Errorf("building Caddy: %w", err)
		}
	}

	pin := setupPinning()
	logf("%s", pin.note)
	rep.Method = method{
		Duration: opt.duration.String(), Warmup: opt.warmup.String(), Repeats: opt.repeats,
		IdleConns: opt.idleConns, UDPFlows: opt.udpFlows, Pinning: pin.note, MaxOther: opt.maxOther, QuietWait: opt.quietWait.String(), Retries: opt.retries, Quick: opt.quick, Lean: opt.lean,
	}

	bs, err := startBackends()
	if err != nil {
		return nil, err
	}
	defer bs.stop()

	peers, servers, err := setupPeers(opt.peers, bs, caddyBin, tmp)
	if err != nil {
		return nil, err
	}
	results := make([]*peerResult, len(peers))
	for i, p := range peers {
		results[i] = &peerResult{ID: p.ID, Label: p.Label, Skipped: p.skip}
		if p.skip != "" {
			logf("skipping %s: %s", p.Label, p.skip)
		}
	}
	if !slices.ContainsFunc(allTests(), func(t string) bool { return t != skewTest && opt.tests[t] }) {
		servers = nil // the skew scenario starts proxies of its own
	}
	for _, srv := range servers {
		if err := srv.start(pin); err != nil {
			return nil, err
		}
		defer srv.stop()
		logf("started %s, pid %d, on CPUs %s", srv.name, srv.pid(), allowedCPUs(srv.pid()))
	}

	r := &runner{opt: opt, pin: pin, bs: bs, ksoftirqd: findKsoftirqd()}
	record := func(i, repeat int, test string, s sample, err error) {
		s.Test, s.Repeat = test, repeat+1
		if err != nil {
			s.Failed = err.Error()
			logf("  %-24s %-8s FAILED: %v", peers[i].Label, test, err)
		} else {
			logf("  %-24s %-8s %s", peers[i].Label, test, brief(s))
		}
		results[i].Samples = append(results[i].Samples, s)
	}
	profile := func(p *peer, repeat int, what string) string {
		if opt.pprofDir == "" || repeat > 0 || p.srv == nil || p.srv.admin == "" {
			return ""
		}
		return filepath.Join(opt.pprofDir, p.ID+"-"+what)
	}

	// The idle tests first, each on a freshly started proxy: memory that a
	// Go process freed earlier, or that another peer in the same Caddy
	// freed, would otherwise be reused and hide the cost. Repeats
	// outermost, as for the timed tests.
	dirty := map[*server]bool{} // holding UDP flows that outlive their test
	for repeat := range opt.repeats {
		for _, test := range freshTests {
			if !opt.tests[test] {
				continue
			}
			logf("%s, repeat %d/%d", freshTitles[test], repeat+1, opt.repeats)
			for i, p := range peers {
				if p.skip != "" || p.srv == nil || !r.runs(p, test) || ctx.Err() != nil {
					continue
				}
				for _, run := range r.freshRuns(ctx, p, test, func(what string) string { return profile(p, repeat, what) }) {
					if err := p.srv.restart(pin); err != nil {
						record(i, repeat, run.test, sample{}, err)
						continue
					}
					delete(dirty, p.srv)
					s, err := run.run()
					record(i, repeat, run.test, s, err)
					if test == udpTest {
						dirty[p.srv] = true
					}
				}
			}
		}
	}
	for srv := range dirty {
		if err := srv.restart(pin); err != nil {
			return nil, fmt.Errorf("restarting %s after the UDP flows: %w", srv.name, err)
		}
	}

	// The timed tests, repeats outermost, so that a burst of other load on
	// the shared machine spoils one repeat of several peers rather than
	// every repeat of one.
	for repeat := range opt.repeats {
		logf("timed tests, repeat %d/%d", repeat+1, opt.repeats)
		for i, p := range peers {
			if p.skip != "" {
				continue
			}
			for _, test := range timedTests {
				if !opt.tests[test] || !r.runs(p, test) || ctx.Err() != nil {
					continue
				}
				if p.srv != nil && !p.srv.alive() {
					logf("  %s had exited (%v); restarting it\n%s", p.srv.name, p.srv.child.err, tail(p.srv.logPath, 10))
					rep.Warnings = append(rep.Warnings, fmt.Sprintf("%s exited during the run and was restarted", p.srv.name))
					if err := p.srv.restart(pin); err != nil {
						record(i, repeat, test, sample{}, err)
						continue
					}
				}
				if opt.quietWait > 0 {
					if other := r.waitQuiet(ctx, p, opt.quietWait); other > opt.maxOther {
						logf("  other processes still use %.0f%% of a pinned CPU after %s: going on", 100*other, opt.quietWait)
					}
				}
				s, err := r.runTimed(ctx, p, test, profile(p, repeat, test+".cpu.pprof"))
				for retry := 1; err == nil && retry <= opt.retries && ctx.Err() == nil; retry++ {
					name, other := busiestOther(s)
					if other <= opt.maxOther {
						break
					}
					logf("  %-24s %-8s other processes used %.0f%% of the %s CPU: again (%d/%d)",
						p.Label, test, 100*other, name, retry, opt.retries)
					if opt.quietWait > 0 {
						r.waitQuiet(ctx, p, opt.quietWait)
					} else {
						_ = sleep(ctx, 2*time.Second)
					}
					s, err = r.runTimed(ctx, p, test, "")
					s.Retries = retry
				}
				if _, other := busiestOther(s); other > spoiledOther {
					s.Spoiled = true
				}
				record(i, repeat, test, s, err)
			}
		}
	}
	if opt.tests[skewTest] && ctx.Err() == nil {
		logf("skewed load: bounded-load hashing against HAProxy")
		rep.Skew = runSkew(ctx, opt, pin, caddyBin, tmp)
	}
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}

	rep.Machine.LoadAvgEnd = loadAvg()
	for _, pr := range results {
		pr.computeFigures()
	}
	rep.Peers = results
	rep.Goals = append(checkGoals(results), checkScenarioGoals(results)...)
	rep.Goals = append(rep.Goals, checkSkewGoals(rep.Skew)...)
	md := renderMarkdown(rep)
	fmt.Print(md)
	if err := writeResults(opt, rep, md); err != nil {
		return rep, err
	}
	return rep, nil
}

// spoiledOther is the share of a pinned CPU that other processes may take
// during a test before its figures are left out of the medians (as long as
// another repeat of the test is not spoiled).
const spoiledOther = 0.5

// busiestOther returns the pinned CPU on which other processes used the
// most during the sample, and how much.
func busiestOther(s sample) (string, float64) {
	name, most := "", 0.0
	for n, v := range s.Other {
		if v > most {
			name, most = n, v
		}
	}
	return name, most
}

// brief is a progress line for one sample.
func brief(s sample) string {
	var b strings.Builder
	switch {
	case s.Bytes > 0 && s.IdleConns == 0:
		v, _ := mbps(s)
		fmt.Fprintf(&b, "%6.0f MB/s", v)
	case s.Conns > 0:
		fmt.Fprintf(&b, "%6.0f conns/s", float64(s.Conns)/s.Seconds)
	case s.RoundTrips > 0:
		fmt.Fprintf(&b, "p50 %.0f µs, p99 %.0f µs", s.P50us, s.P99us)
	case s.IdleConns > 0:
		fmt.Fprintf(&b, "%d conns: RSS %+.0f B/conn, fds %+.2f/conn", s.IdleConns,
			float64(s.RSS-s.RSSBase)/float64(s.IdleConns), float64(s.FDs-s.FDsBase)/float64(s.IdleConns))
		if s.Downloaded > 0 {
			fmt.Fprintf(&b, " (after %.1f MiB each in %.1fs)", float64(s.Downloaded)/(1<<20), s.Seconds)
		}
	case s.Flows > 0:
		fmt.Fprintf(&b, "%d UDP flows: RSS %+.0f B/flow, fds %+.2f/flow", s.Flows,
			float64(s.RSS-s.RSSBase)/float64(s.Flows), float64(s.FDs-s.FDsBase)/float64(s.Flows))
		if s.Go != nil && s.GoLoaded != nil {
			fmt.Fprintf(&b, ", heap %+.0f B/flow, stack %+.0f B/flow, goroutines %+.2f/flow",
				float64(s.GoLoaded.HeapAlloc-s.Go.HeapAlloc)/float64(s.Flows),
				float64(s.GoLoaded.StackInuse-s.Go.StackInuse)/float64(s.Flows),
				float64(s.GoLoaded.Goroutines-s.Go.Goroutines)/float64(s.Flows))
		}
	}
	if s.Seconds > 0 && s.IdleConns == 0 && s.Flows == 0 {
		fmt.Fprintf(&b, "  proxy %.2f cores, load %.2f", s.ProxyCPU/s.Seconds, s.LoadCPU/s.Seconds)
	}
	if name, other := busiestOther(s); other > 0.02 {
		fmt.Fprintf(&b, "  (others %.0f%% of %s CPU)", 100*other, name)
	}
	if s.Errors > 0 {
		fmt.Fprintf(&b, "  %d errors, first: %s", s.Errors, s.Error)
	}
	return b.String()
}

// setupPinning pins this process to the first CPU it may use and picks the
// second for the proxies, with one Go P here as in the proxies.
func setupPinning() pinning {
	runtime.GOMAXPROCS(1)
	none := pinning{loadCPU: -1, proxyCPU: -1}
	cpus, err := getAffinity()
	if err != nil || len(cpus) < 2 {
		none.note = fmt.Sprintf("no pinning: %d CPU available (it needs 2); load tool, backends and proxy share it, GOMAXPROCS=1", len(cpus))
		return none
	}
	if err := pinSelf(cpus[0]); err != nil {
		none.note = fmt.Sprintf("no pinning: pinning the load tool failed: %v", err)
		return none
	}
	return pinning{
		enabled: true, loadCPU: cpus[0], proxyCPU: cpus[1],
		note: fmt.Sprintf("proxy pinned to CPU %d, load tool and backends to CPU %d (GOMAXPROCS=1 in both Go programs, HAProxy one thread, nginx one worker)",
			cpus[1], cpus[0]),
	}
}

// moduleRoot returns the directory of the caddy-godist module.
func moduleRoot() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", errors.New("not inside the caddy-godist module: run from the repository, as go run ./bench")
	}
	return filepath.Dir(gomod), nil
}

// commandLine is how this run was started, as a user would type it.
func commandLine() string {
	args := make([]string, 0, len(os.Args))
	for _, a := range os.Args[1:] {
		if strings.ContainsAny(a, " \t'\"$") {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		args = append(args, a)
	}
	return strings.TrimSpace("go run ./bench " + strings.Join(args, " "))
}

// writeResults writes NAME.md and NAME.json into the output directory.
func writeResults(opt options, rep *report, md string) error {
	if err := os.MkdirAll(opt.outDir, 0o755); err != nil {
		return err
	}
	js, err := json.MarshalIndent(rep, "", "  ")
	if err != nil {
		return err
	}
	mdPath := filepath.Join(opt.outDir, opt.name+".md")
	if err := os.WriteFile(mdPath, []byte(md), 0o644); err != nil {
		return err
	}
	jsPath := filepath.Join(opt.outDir, opt.name+".json")
	if err := os.WriteFile(jsPath, append(js, '\n'), 0o644); err != nil {
		return err
	}
	logf("wrote %s and %s", mdPath, jsPath)
	return nil
}
