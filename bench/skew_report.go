// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package main

import (
	"fmt"
	"math"
	"math/rand/v2"
	"sort"
	"strings"
	"time"

	"github.com/cespare/xxhash/v2"
)

// The figures, table and goals of the skewed-load scenario (skew.go).
// Nothing here measures or starts anything.
//
// Definitions, as the report states them:
//   - max/avg: at one sample, the most active connections on one backend
//     over the mean over the backends.
//   - over c·avg + 1: samples at which the most loaded backend held more
//     than c times the mean plus one connection (the cap's rounding).
//   - affinity lost: the share of the connections opened in the measured
//     window that reached a backend other than their key's first choice,
//     the backend a connection from the key reaches on the idle proxy.
//   - keys moved: the share of keys whose first choice changed when a
//     backend was added, and the share of the connections those keys make.

// skewResult is the scenario's part of the report.
type skewResult struct {
	Params    skewParams `json:"params"`
	KeyShares []float64  `json:"-"` // of the arrivals, by key
	Arrivals  int        `json:"arrivals"`
	// FixedAddrs: the backends had their fixed addresses, so godist's
	// first choices are those of every other run.
	FixedAddrs bool       `json:"fixed_addrs"`
	Rows       []*skewRow `json:"rows"`
	Failed     string     `json:"failed,omitempty"` // why the scenario could not run at all
}

// skewRow is one proxy configuration's figures.
type skewRow struct {
	ID      string  `json:"id"`
	Label   string  `json:"label"`
	Factor  float64 `json:"factor,omitempty"`
	Skipped string  `json:"skipped,omitempty"`
	Failed  string  `json:"failed,omitempty"`

	Load          skewLoadStats `json:"load"`
	Conns         int           `json:"conns"`     // opened in the measured window
	Lost          int           `json:"lost"`      // of them, not on their key's first choice
	Least         float64       `json:"least"`     // the least share any cap of c could leave off, given where the keys' first choices are
	HotConns      int           `json:"hot_conns"` // of the hot key
	HotLost       int           `json:"hot_lost"`
	KeysMoved     float64       `json:"keys_moved"` // share of keys, adding a backend
	LoadMoved     float64       `json:"load_moved"` // share of the arrivals those keys make
	Errors        int           `json:"errors,omitempty"`
	FirstError    string        `json:"first_error,omitempty"`
	HashMismatch  int           `json:"hash_mismatch"`  // godist: first choices unlike rendezvous hashing's; -1 not checked
	ProbeMismatch int           `json:"probe_mismatch"` // with a factor: first choices unlike the sibling's without; -1 not checked
	Homes         []int         `json:"-"`
}

// skewLoadStats summarizes the samples of active connections per backend.
type skewLoadStats struct {
	Samples     int       `json:"samples"`
	WorstRatio  float64   `json:"worst_max_avg"`
	MeanRatio   float64   `json:"mean_max_avg"`
	Over        int       `json:"over"`         // samples with max > c·avg + 1
	WorstExcess float64   `json:"worst_excess"` // max − c·avg at the worst sample, in connections
	MeanActive  float64   `json:"mean_active"`  // over all backends
	MeanLoads   []float64 `json:"mean_loads"`   // per backend
}

// loadStats summarizes samples (active connections per backend) against
// the factor c. Samples with no connection at all are left out.
func loadStats(samples [][]int64, c float64) skewLoadStats {
	var st skewLoadStats
	st.WorstExcess = math.Inf(-1)
	var sumRatio, sumActive float64
	for _, row := range samples {
		var total, most int64
		for _, v := range row {
			total += v
			most = max(most, v)
		}
		if total == 0 {
			continue
		}
		if st.MeanLoads == nil {
			st.MeanLoads = make([]float64, len(row))
		}
		for i, v := range row {
			st.MeanLoads[i] += float64(v)
		}
		avg := float64(total) / float64(len(row))
		ratio := float64(most) / avg
		st.Samples++
		sumRatio += ratio
		sumActive += float64(total)
		st.WorstRatio = max(st.WorstRatio, ratio)
		excess := float64(most) - c*avg
		st.WorstExcess = max(st.WorstExcess, excess)
		if excess > 1+1e-9 {
			st.Over++
		}
	}
	if st.Samples == 0 {
		st.WorstExcess = 0
		return st
	}
	st.MeanRatio = sumRatio / float64(st.Samples)
	st.MeanActive = sumActive / float64(st.Samples)
	for i := range st.MeanLoads {
		st.MeanLoads[i] /= float64(st.Samples)
	}
	return st
}

// fill sets the row's figures from one run of the load and the keys'
// first choices.
func (row *skewRow) fill(p skewParams, sched []arrival, load skewLoadResult, homes []int) {
	row.Load = loadStats(load.samples, p.Factor)
	row.Conns, row.Lost, row.HotConns, row.HotLost = affinity(sched, load.backend, homes, p.Warmup)
	row.Errors, row.FirstError = load.errors, load.firstError
}

// affinity counts the connections opened from warmup on that reached a
// backend, those not on their key's first choice, and the same for the
// hot key (key 0).
func affinity(sched []arrival, backend, homes []int, warmup jsonDuration) (conns, lost, hotConns, hotLost int) {
	for j, a := range sched {
		if a.at < time.Duration(warmup) || backend[j] < 0 {
			continue
		}
		off := backend[j] != homes[a.key]
		conns++
		if off {
			lost++
		}
		if a.key == 0 {
			hotConns++
			if off {
				hotLost++
			}
		}
	}
	return conns, lost, hotConns, hotLost
}

// leastLost is the least share of the connections that must go elsewhere
// than their key's first choice for no backend to hold more than c times
// the average, given the first choices (homes) and each key's share of the
// arrivals: what the backends' shares exceed c/n by, summed. A connection
// that overflows onto a backend that then overflows in turn costs more.
func leastLost(homes []int, shares []float64, n int, c float64) float64 {
	per := make([]float64, n)
	for k, h := range homes {
		if h >= 0 && h < n {
			per[h] += shares[k]
		}
	}
	least := 0.0
	for _, s := range per {
		least += max(0, s-c/float64(n))
	}
	return least
}

// keysMoved returns the share of keys whose first choice differs between
// before and after, and the share of the arrivals those keys make.
func keysMoved(before, after []int, shares []float64) (keys, load float64) {
	if len(before) == 0 {
		return 0, 0
	}
	moved := 0
	for k := range before {
		if before[k] != after[k] {
			moved++
			load += shares[k]
		}
	}
	return float64(moved) / float64(len(before)), load
}

func countMismatch(a, b []int) int {
	n := 0
	for i := range a {
		if a[i] != b[i] {
			n++
		}
	}
	return n
}

// rendezvousHomes computes godist's first choice for each key under
// `hash_key ip` with equal weights, independently of godist's code: the
// highest xxhash64 of the upstream's dial address followed by the key's
// IP, the earlier upstream on a tie.
func rendezvousHomes(dials []string, keys int) []int {
	homes := make([]int, keys)
	for k := range keys {
		ip := skewKeyIP(k).String()
		best, bestScore := -1, uint64(0)
		for i, d := range dials {
			if s := xxhash.Sum64String(d + ip); best < 0 || s > bestScore {
				best, bestScore = i, s
			}
		}
		homes[k] = best
	}
	return homes
}

// skewCDF is the cumulative distribution of the skewed mix over k keys:
// key 0 alone makes share hot of the arrivals, the others share the rest
// as a Zipf law of exponent s (key i in proportion to 1/i^s).
func skewCDF(k int, s, hot float64) []float64 {
	cdf := make([]float64, k)
	if k == 1 {
		cdf[0] = 1
		return cdf
	}
	rest := 0.0
	for i := 1; i < k; i++ {
		rest += math.Pow(float64(i), -s)
	}
	acc := hot
	cdf[0] = acc
	for i := 1; i < k; i++ {
		acc += (1 - hot) * math.Pow(float64(i), -s) / rest
		cdf[i] = acc
	}
	cdf[k-1] = 1
	return cdf
}

// keyShares turns a cumulative distribution into each key's share.
func keyShares(cdf []float64) []float64 {
	out := make([]float64, len(cdf))
	prev := 0.0
	for i, c := range cdf {
		out[i] = c - prev
		prev = c
	}
	return out
}

func drawKey(rng *rand.Rand, cdf []float64) int {
	return min(sort.SearchFloat64s(cdf, rng.Float64()), len(cdf)-1)
}

func (r *skewResult) row(id string) *skewRow {
	for _, row := range r.Rows {
		if row.ID == id {
			return row
		}
	}
	return nil
}

func share(n, of int) float64 {
	if of == 0 {
		return 0
	}
	return float64(n) / float64(of)
}

func pct(v float64) string { return fmt.Sprintf("%.1f%%", 100*v) }

// brief is the row's progress line.
func (row *skewRow) brief() string {
	s := fmt.Sprintf("max/avg worst %.2f, mean %.2f, %d of %d samples over c·avg+1; affinity lost %s (least possible %s, hot key %s); keys moved adding a backend %s",
		row.Load.WorstRatio, row.Load.MeanRatio, row.Load.Over, row.Load.Samples,
		pct(share(row.Lost, row.Conns)), pct(row.Least), pct(share(row.HotLost, row.HotConns)), pct(row.KeysMoved))
	if row.Errors > 0 {
		s += fmt.Sprintf("; %d errors, the first: %s", row.Errors, row.FirstError)
	}
	return s
}

// sectionSkew is the section of the skewed-load goals.
const sectionSkew = "skew"

// skewSection renders the scenario's section: what ran, the table, the
// checks of the method, the goals.
func skewSection(r *skewResult, goals []goal) string {
	if r == nil {
		return ""
	}
	var b strings.Builder
	p := r.Params
	b.WriteString("\n## Skewed load: consistent hashing with bounded loads\n\n")
	if r.Failed != "" {
		fmt.Fprintf(&b, "The scenario could not run: %s\n", r.Failed)
		return b.String()
	}
	hot := 0.0
	if len(r.KeyShares) > 0 {
		hot = r.KeyShares[0]
	}
	fmt.Fprintf(&b, "%d client IPs on loopback (127.1.0.1 on), each connection bound to its key's IP; one IP alone makes %s of "+
		"the connections, the others a Zipf law (exponent %g) over the rest. Arrivals: Poisson, %g/s, %d in all, the same sequence "+
		"(seed %d) for every proxy; each connection stays open for an exponential time of mean %s (cut at 5×), about %.0f open at once. "+
		"%d backends; each counts its open connections, sampled every %s over %s after a %s warm-up. "+
		"c = %g: godist's `balance_factor %g`, HAProxy's `hash-balance-factor %d`.\n\n",
		p.Keys, pct(hot), p.ZipfS, p.Rate, r.Arrivals, p.Seed, p.MeanLife, p.Rate*time.Duration(p.MeanLife).Seconds(),
		p.Backends, p.SampleEvery, p.Measure, p.Warmup, p.Factor, p.Factor, haproxyPercent(p.Factor))
	b.WriteString("A key's first choice is the backend its connection reaches on the idle proxy (one key at a time, every count 0: " +
		"no cap binds). Max/avg: at one sample, the most connections on one backend over the mean; over c·avg + 1: the samples " +
		"where the most loaded backend held more than c times the mean plus one connection of rounding, and the worst excess in " +
		"connections. Affinity lost: the share of the connections opened in the sampled window that are not on their key's first " +
		"choice; least possible: the least share that must leave for no backend to hold more than c times the average, given " +
		"where the keys' first choices are (what the backends' shares exceed c/n by, summed). Keys moved: the share of keys whose " +
		"first choice changed when a backend was added, and the share of the connections those keys make.")
	if r.FixedAddrs {
		fmt.Fprintf(&b, " The backends listen on fixed addresses (127.2.0.1:%d on), so godist's first choices, which hash the "+
			"dial address, are those of every run.\n\n", skewPort)
	} else {
		b.WriteString(" Some of the backends' fixed addresses were taken: they listen on free ports, so godist's first choices " +
			"differ from other runs'.\n\n")
	}
	tableHeader(&b, []string{"max/avg, worst sample", "max/avg, mean", "samples over c·avg + 1 (worst excess)", "affinity lost",
		"least possible", "hot key off its first choice",
		fmt.Sprintf("keys moved, %d → %d backends (keys / their connections)", p.Backends, p.Backends+1), "active, mean", "errors"})
	var skipped, checks []string
	for _, row := range r.Rows {
		switch {
		case row.Skipped != "":
			skipped = append(skipped, fmt.Sprintf("- %s: %s", row.Label, row.Skipped))
			continue
		case row.Failed != "":
			skipped = append(skipped, fmt.Sprintf("- %s: failed: %s", row.Label, row.Failed))
			continue
		}
		fmt.Fprintf(&b, "| %s | %.2f | %.2f | %d of %d (%+.1f) | %s | %s | %s | %s / %s | %.0f | %d |\n", row.Label,
			row.Load.WorstRatio, row.Load.MeanRatio, row.Load.Over, row.Load.Samples, row.Load.WorstExcess,
			pct(share(row.Lost, row.Conns)), pct(row.Least), pct(share(row.HotLost, row.HotConns)),
			pct(row.KeysMoved), pct(row.LoadMoved), row.Load.MeanActive, row.Errors)
		if row.HashMismatch >= 0 {
			if row.HashMismatch == 0 {
				checks = append(checks, fmt.Sprintf("%s: every key's first choice is rendezvous hashing's over xxhash64(dial address + IP), computed here.", row.Label))
			} else {
				checks = append(checks, fmt.Sprintf("%s: %d keys' first choices differ from rendezvous hashing's computed here.", row.Label, row.HashMismatch))
			}
		}
		if row.ProbeMismatch > 0 {
			checks = append(checks, fmt.Sprintf("%s: %d keys' first choices differ from the same proxy's without a factor.", row.Label, row.ProbeMismatch))
		}
	}
	if len(skipped) > 0 {
		b.WriteString("\nNot measured:\n" + strings.Join(skipped, "\n") + "\n")
	}
	if len(checks) > 0 {
		b.WriteString("\nChecks of the method:\n- " + strings.Join(checks, "\n- ") + "\n")
	}
	if len(goals) > 0 {
		b.WriteString("\n### Goals (skewed load, issue 12)\n\n")
		b.WriteString(goalsSection(goals))
	}
	return b.String()
}

// checkSkewGoals checks issue 12's goals on the scenario's rows.
func checkSkewGoals(r *skewResult) []goal {
	if r == nil {
		return nil
	}
	c := r.Params.Factor
	measured := func(row *skewRow) bool { return row != nil && row.Skipped == "" && row.Failed == "" }
	why := func(id string, row *skewRow) string {
		switch {
		case row == nil:
			return id + " not run"
		case row.Skipped != "":
			return id + ": " + row.Skipped
		case row.Failed != "":
			return id + " failed"
		}
		return ""
	}
	goals := make([]goal, 0, 3)
	gd, gbf, hbf := r.row("godist"), r.row("godist-bf"), r.row("haproxy-bf")

	g := goal{Section: sectionSkew, Text: fmt.Sprintf("godist with `balance_factor %g`: max/avg ≤ c at every sample (one connection of rounding allowed)", c)}
	if !measured(gbf) {
		g.Status, g.Detail = "not measured", why("godist-bf", gbf)
	} else {
		g.Value, g.Bound = gbf.Load.WorstRatio, c
		g.Status = "met"
		if gbf.Load.Over > 0 || gbf.Load.Samples == 0 {
			g.Status = "not met"
		}
		g.Detail = fmt.Sprintf("%d of %d samples over c·avg + 1; worst max/avg %.2f, worst max − c·avg %+.1f connections",
			gbf.Load.Over, gbf.Load.Samples, gbf.Load.WorstRatio, gbf.Load.WorstExcess)
	}
	goals = append(goals, g)

	g = goal{Section: sectionSkew, Text: "godist with `balance_factor`: affinity lost ≤ HAProxy's at the same factor"}
	switch {
	case !measured(gbf):
		g.Status, g.Detail = "not measured", why("godist-bf", gbf)
	case !measured(hbf):
		g.Status, g.Detail = "not measured", why("haproxy-bf", hbf)
	default:
		v, bound := share(gbf.Lost, gbf.Conns), share(hbf.Lost, hbf.Conns)
		if bound == 0 {
			g.Value, g.Status = v, "met"
			if v > 0 {
				g.Status = "not met"
			}
			g.Detail = fmt.Sprintf("%s ≤ %s", pct(v), pct(bound))
		} else {
			judge(&g, 100*v, 100*bound, false, "%")
		}
	}
	goals = append(goals, g)

	g = goal{Section: sectionSkew, Text: "godist without a factor: every connection on its key's first choice, rendezvous hashing's (the picks of today)"}
	if !measured(gd) {
		g.Status, g.Detail = "not measured", why("godist", gd)
	} else {
		g.Status = "met"
		if gd.Lost > 0 || gd.HashMismatch != 0 || gd.Conns == 0 {
			g.Status = "not met"
		}
		g.Detail = fmt.Sprintf("%d of %d connections off their first choice; %d of %d keys' first choices unlike rendezvous hashing's",
			gd.Lost, gd.Conns, gd.HashMismatch, len(gd.Homes))
	}
	goals = append(goals, g)
	return goals
}
