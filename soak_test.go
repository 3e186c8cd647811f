// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

//go:build linux

package godist

import (
	"bytes"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

var soakDuration = flag.Duration("soak", 3*time.Second,
	"how long TestSoak runs; CI runs 30s, run longer with e.g. -soak 10m")

// soakUpstream is a backend that can be stopped and started again on the
// same address, and remembers which streams it was serving when stopped:
// those are cut by the fault, not lost by godist.
type soakUpstream struct {
	t    *testing.T
	name string
	addr string

	mu     sync.Mutex
	be     *backend
	active map[string]bool // IDs of streams being served now
	seen   map[string]bool // IDs of every stream it received
	cut    map[string]bool // IDs of streams it was serving when stopped
	stops  [][2]time.Time  // when each stop began and ended
}

func newSoakUpstream(t *testing.T, name string) *soakUpstream {
	u := &soakUpstream{t: t, name: name, active: map[string]bool{}, seen: map[string]bool{}, cut: map[string]bool{}}
	u.start("")
	u.addr = u.be.addr
	return u
}

func (u *soakUpstream) start(addr string) {
	be := startBackend(u.t, u.name, addr, func(_ *backend, c net.Conn) {
		id := make([]byte, 16)
		if _, err := io.ReadFull(c, id); err != nil {
			return
		}
		u.mu.Lock()
		u.active[string(id)], u.seen[string(id)] = true, true
		u.mu.Unlock()
		defer func() {
			u.mu.Lock()
			delete(u.active, string(id))
			u.mu.Unlock()
		}()
		if _, err := c.Write(id); err != nil {
			return
		}
		echo(nil, c)
	})
	u.mu.Lock()
	u.be = be
	u.mu.Unlock()
}

func (u *soakUpstream) stop() {
	u.mu.Lock()
	for id := range u.active {
		u.cut[id] = true
	}
	// recorded as begun before anything closes, so that a client failing
	// while the stop is under way sees it; the end is filled in after
	u.stops = append(u.stops, [2]time.Time{time.Now()})
	i := len(u.stops) - 1
	be := u.be
	u.mu.Unlock()
	be.stop()
	u.mu.Lock()
	u.stops[i][1] = time.Now()
	u.mu.Unlock()
}

// explains says whether the stream id reached this upstream, whether it
// was cut by the upstream's stop, and whether a stop of the upstream
// overlapped the time from start to end (which cuts a connection it had
// accepted but not yet read the ID of).
func (u *soakUpstream) explains(id string, start, end time.Time) (seen, cut, stopped bool) {
	u.mu.Lock()
	defer u.mu.Unlock()
	for _, stop := range u.stops {
		ended := stop[1]
		if ended.IsZero() {
			ended = time.Now() // still under way
		}
		if !stop[0].After(end) && !ended.Before(start) {
			stopped = true
		}
	}
	return u.seen[id], u.cut[id], stopped
}

// TestSoak runs many concurrent clients through Caddy for -soak while
// upstreams flap and the config is reloaded, then reports what was served
// and what failed and why. A failure is allowed only where a fault caused
// it: a stream cut because its upstream was stopped under it, or a
// connection the kernel reset on a listener closing for a reload before
// Caddy accepted it. Every byte that came back is checked.
func TestSoak(t *testing.T) {
	checkNoLeaks(t)
	stable := newSoakUpstream(t, "stable")
	flappers := []*soakUpstream{newSoakUpstream(t, "f1"), newSoakUpstream(t, "f2"), newSoakUpstream(t, "f3")}
	all := append([]*soakUpstream{stable}, flappers...)
	addrsOf := func(ups ...*soakUpstream) []string {
		var out []string
		for _, u := range ups {
			out = append(out, u.addr)
		}
		return out
	}
	config := func(ups ...*soakUpstream) map[string]any {
		return map[string]any{
			"upstreams":    upstreamsJSON(addrsOf(ups...)...),
			"dial_timeout": "1s",
			"health_checks": map[string]any{
				"active":  map[string]any{"interval": "100ms", "timeout": "500ms"},
				"passive": map[string]any{"fail_duration": "2s"},
			},
		}
	}
	c := startCaddy(t, config(all...))

	deadline := time.Now().Add(*soakDuration)
	stop := make(chan struct{})
	var background sync.WaitGroup

	// flapping: stop one flapper at a time, start it again a little later
	var flaps atomic.Int64
	background.Go(func() {
		r := rand.New(rand.NewPCG(1, 2))
		for {
			select {
			case <-stop:
				return
			case <-time.After(time.Duration(300+r.IntN(500)) * time.Millisecond):
			}
			u := flappers[r.IntN(len(flappers))]
			u.stop()
			select {
			case <-stop:
			case <-time.After(time.Duration(100+r.IntN(400)) * time.Millisecond):
			}
			u.start(u.addr)
			flaps.Add(1)
		}
	})

	// reloading: alternate upstream lists, all with the stable upstream
	var reloads atomic.Int64
	reloadErrs := make(chan string, 1)
	background.Go(func() {
		lists := [][]*soakUpstream{all, {stable, flappers[0], flappers[1]}, {stable, flappers[2]}, all}
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			case <-time.After(time.Second):
			}
			if status, body := c.load([]map[string]any{godistRoute(config(lists[i%len(lists)]...))}); status != 200 {
				select {
				case reloadErrs <- fmt.Sprintf("reload: %d %s", status, body):
				default:
				}
				return
			}
			reloads.Add(1)
		}
	})

	// sampling the process's resources
	var peakGoroutines, peakFDs, peakHeap atomic.Int64
	background.Go(func() {
		for {
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			storeMax(&peakGoroutines, int64(runtime.NumGoroutine()))
			storeMax(&peakFDs, int64(openFDs(t)))
			storeMax(&peakHeap, int64(ms.HeapInuse))
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
		}
	})

	// the clients
	var served, bytesVerified atomic.Int64
	var failMu sync.Mutex
	failures := map[string]int{}
	var unexplained []string
	fail := func(reason, detail string, ok bool) {
		failMu.Lock()
		defer failMu.Unlock()
		failures[reason]++
		if !ok {
			unexplained = append(unexplained, detail)
		}
	}
	var clients sync.WaitGroup
	for w := range 16 {
		clients.Go(func() {
			r := rand.New(rand.NewPCG(uint64(w), 99))
			for i := 0; time.Now().Before(deadline); i++ {
				payload := randomBytes(uint64(w)<<32|uint64(i), 16+r.IntN(512<<10))
				id := string(payload[:16])
				start := time.Now()
				var local string
				got, err := func() ([]byte, error) {
					conn, err := net.DialTimeout("tcp", c.listen, testTimeout)
					if err != nil {
						return nil, err
					}
					defer conn.Close()
					local = conn.LocalAddr().String()
					_ = conn.SetDeadline(time.Now().Add(testTimeout))
					return roundTrip(conn.(*net.TCPConn), payload)
				}()
				if err == nil && bytes.Equal(got, payload) {
					served.Add(1)
					bytesVerified.Add(int64(len(payload)))
					continue
				}
				end := time.Now()
				if len(got) > len(payload) || !bytes.Equal(got, payload[:len(got)]) {
					fail("corrupted", fmt.Sprintf("stream %x: %d of %d bytes, differing", id, len(got), len(payload)), false)
					continue
				}
				// cut: the upstream it reached was stopped while it flowed;
				// or it reached none, and one was stopped meanwhile (which
				// cuts a connection accepted before its ID was read)
				var reached, cut, stopped bool
				for _, u := range all {
					s, k, st := u.explains(id, start, end)
					reached, stopped = reached || s, stopped || st
					cut = cut || k || (s && st)
				}
				switch {
				case cut || (!reached && stopped):
					fail("cut: its upstream was stopped under it", "", true)
				case !reached && len(got) == 0 && isReset(err):
					fail("reset by the kernel on a listener closed for a reload", "", true)
				default:
					var where []string
					for _, u := range all {
						if s, _, _ := u.explains(id, start, end); s {
							where = append(where, u.name+" "+u.addr)
						}
					}
					fail("lost", fmt.Sprintf("stream %x from %s (reached %v) %s..%s: %d of %d bytes back: %v",
						id, local, where, start.Format("05.000000"), end.Format("05.000000"), len(got), len(payload), err), false)
				}
			}
		})
	}
	clients.Wait()
	close(stop)
	background.Wait()

	var reasons []string
	for reason, n := range failures {
		reasons = append(reasons, fmt.Sprintf("%d %s", n, reason))
	}
	sort.Strings(reasons)
	for _, u := range all {
		var stops []string
		for _, stop := range u.stops {
			stops = append(stops, stop[0].Format("05.000000")+".."+stop[1].Format("05.000000"))
		}
		t.Logf("%s at %s was stopped %d times: %s", u.name, u.addr, len(u.stops), strings.Join(stops, " "))
	}
	t.Logf("soak for %s: %d connections served, %d MB verified byte for byte; %d flaps, %d reloads; failed: %s; "+
		"peaks: %d goroutines, %d descriptors, %d MB heap",
		*soakDuration, served.Load(), bytesVerified.Load()>>20, flaps.Load(), reloads.Load(),
		orNone(strings.Join(reasons, ", ")), peakGoroutines.Load(), peakFDs.Load(), peakHeap.Load()>>20)

	select {
	case msg := <-reloadErrs:
		t.Error(msg)
	default:
	}
	for _, u := range unexplained {
		t.Error(u)
	}
	if served.Load() == 0 {
		t.Fatal("nothing was served")
	}
}

func storeMax(v *atomic.Int64, n int64) {
	for {
		old := v.Load()
		if n <= old || v.CompareAndSwap(old, n) {
			return
		}
	}
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}
