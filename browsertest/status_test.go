// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

// Package browsertest drives the godist status page in a real, headless
// Chromium against a real Caddy: a module of its own, so that the main
// module's `go test ./...` needs no browser and its go.mod no DevTools
// client.
//
// Run it with Chromium installed (Debian's package chromium):
//
//	GODIST_CADDY=/path/to/caddy GODIST_SCREENSHOTS=/tmp/shots go test -count=1 .
//
// GODIST_CADDY is a Caddy built with godist (xcaddy, as .ci/e2e.sh does);
// without it the test builds one from ../bench/caddy. GODIST_SCREENSHOTS is
// where the screenshots go; without it, a temporary directory that the test
// names in its log. CHROMIUM overrides /usr/bin/chromium.
package browsertest

import (
	"bufio"
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/emulation"
	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/chromedp"
)

const (
	testTimeout = 3 * time.Minute // the whole test, browser included
	waitTimeout = 20 * time.Second
	user        = "ops"
	password    = "status-page-test"
)

func TestStatusPageInBrowser(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()
	caddyBin := caddyBinary(t)
	chromium := chromiumPath(t)
	shots := os.Getenv("GODIST_SCREENSHOTS")
	if shots == "" {
		shots = t.TempDir()
	}
	if err := os.MkdirAll(shots, 0o755); err != nil { //nolint:gosec // a directory the person running the test names
		t.Fatal(err)
	}

	// Three backends; the third is killed once Caddy runs.
	backends := make([]*backend, 3)
	dials := make([]string, 3)
	for i := range backends {
		backends[i] = startBackend(t, fmt.Sprintf("backend %d", i))
		dials[i] = backends[i].addr
	}
	cy := startCaddy(t, caddyBin, dials)
	backends[2].kill()

	// Connections that carry bytes and end, and connections that stay
	// open, so that the chart has lines to draw.
	for i := range 12 {
		cy.echo(t, 4096*(i+1))
	}
	for range 6 {
		cy.holdConnection(t)
	}

	// Chromium, as the machine notes ask: headless, no sandbox (root), no
	// background traffic out of a closed network, a new profile.
	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(chromium),
		chromedp.Headless,
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.NoDefaultBrowserCheck,
		chromedp.UserDataDir(t.TempDir()),
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.Flag("hide-scrollbars", true),
		chromedp.WindowSize(1280, 900),
	}
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(ctx, opts...)
	defer cancelAlloc()
	bctx, cancelBrowser := chromedp.NewContext(allocCtx)
	defer cancelBrowser()

	auth := "Basic " + basicAuth(user, password)
	if err := chromedp.Do(bctx,
		chromedp.Func(func(ctx context.Context, tg *chromedp.Target) error {
			if _, err := cdp.Call(ctx, tg, network.Enable, network.EnableParams{}); err != nil {
				return err
			}
			_, err := cdp.Call(ctx, tg, network.SetExtraHTTPHeaders, network.SetExtraHTTPHeadersParams{
				Headers: network.Headers{"Authorization": auth},
			})
			return err
		}),
		chromedp.Navigate(cy.site+"/godist/"),
	); err != nil {
		t.Fatalf("opening the page: %v", err)
	}

	t.Run("the three upstreams, the killed one down", func(t *testing.T) {
		waitFor(t, bctx, `document.querySelectorAll('tr[data-upstream]').length === 3`, "three upstream rows")
		waitFor(t, bctx, fmt.Sprintf(`(document.querySelector('tr[data-upstream=%q]') || {dataset: {}}).dataset.state === 'down'`, dials[2]),
			"the killed upstream shown down")
		for i, want := range []string{"up", "up", "down"} {
			got := eval[string](t, bctx, fmt.Sprintf(`document.querySelector('tr[data-upstream=%q] .badge').textContent`, dials[i]))
			if got != want {
				t.Errorf("upstream %s: badge %q, want %q", dials[i], got, want)
			}
		}
		why := eval[string](t, bctx, fmt.Sprintf(`document.querySelector('tr[data-upstream=%q] .why').textContent`, dials[2]))
		if !strings.Contains(why, "down by active checks") || !strings.Contains(why, "connection refused") {
			t.Errorf("the killed upstream's state says %q", why)
		}
		// the active connections the page shows are the admin API's
		var hs []struct {
			Upstreams []struct {
				Dial   string `json:"dial"`
				Active int    `json:"active_connections"`
			} `json:"upstreams"`
		}
		cy.adminJSON(t, http.MethodGet, "/godist/upstreams", nil, &hs)
		for _, u := range hs[0].Upstreams {
			waitFor(t, bctx, fmt.Sprintf(`document.querySelector('tr[data-upstream=%q] .u-active').textContent === %q`, u.Dial, strconv.Itoa(u.Active)),
				fmt.Sprintf("%s showing %d active connections", u.Dial, u.Active))
		}
	})

	t.Run("every control has a label", func(t *testing.T) {
		unlabelled := eval[[]string](t, bctx, `[...document.querySelectorAll('input')].filter(i => !i.labels.length || !i.labels[0].textContent.trim()).map(i => i.className)
			.concat([...document.querySelectorAll('button')].filter(b => !(b.getAttribute('aria-label') || b.textContent.trim())).map(b => b.className))`)
		if len(unlabelled) > 0 {
			t.Errorf("controls without a label: %v", unlabelled)
		}
	})

	t.Run("the chart updates", func(t *testing.T) {
		before := eval[int](t, bctx, `Number(document.querySelector('svg.chart').dataset.samples)`)
		for range 4 {
			cy.holdConnection(t)
			time.Sleep(time.Second) // a step in the chart per poll or so
		}
		waitFor(t, bctx, fmt.Sprintf(`Number(document.querySelector('svg.chart').dataset.samples) >= %d`, before+2), "two more samples in the chart")
		waitFor(t, bctx, `document.querySelectorAll('svg.chart polyline').length >= 2`, "a line per live upstream")
		// the legend follows the last sample: 10 connections on the two live upstreams
		waitFor(t, bctx, `[...document.querySelectorAll('.legend strong')].reduce((s, e) => s + Number(e.textContent), 0) === 10`,
			"the legend counting the 10 connections")
	})

	t.Run("the lookup box, by keyboard alone", func(t *testing.T) {
		// Tab reaches the skip link first, Enter follows it into the
		// handlers, a Tab or two (the upstream table is a stop of its own
		// when it scrolls sideways) reach the lookup box, typing and Enter
		// ask. Every stop shows where the focus is.
		press := func(keys string) {
			t.Helper()
			if err := chromedp.Do(bctx, chromedp.KeyEvent(keys)); err != nil {
				t.Fatal(err)
			}
		}
		focused := func() string { return eval[string](t, bctx, `document.activeElement.outerHTML.slice(0, 100)`) }
		outlined := func() {
			t.Helper()
			visible := eval[bool](t, bctx, `(() => { const e = document.activeElement, r = e.getBoundingClientRect(), cs = getComputedStyle(e);
				return r.height > 0 && cs.outlineStyle !== 'none' && parseFloat(cs.outlineWidth) >= 2; })()`)
			if !visible {
				t.Errorf("the focus is on %s, with no visible outline", focused())
			}
		}
		press("\t")
		if !eval[bool](t, bctx, `document.activeElement.matches('a.skip') && document.activeElement.getBoundingClientRect().top >= 0`) {
			t.Fatalf("the first Tab focuses %s, want the skip link, on screen", focused())
		}
		outlined()
		press("\r")
		if !eval[bool](t, bctx, `document.activeElement.matches('main#handlers')`) {
			t.Fatalf("the skip link leads to %s, want main#handlers", focused())
		}
		for tabs := 1; ; tabs++ {
			press("\t")
			outlined()
			if eval[bool](t, bctx, `document.activeElement.matches('input.i-lookup')`) {
				break
			}
			if tabs == 3 {
				t.Fatalf("3 Tabs after the skip link, the focus is on %s, not the lookup box", focused())
			}
			t.Logf("a Tab stop before the lookup box: %s", focused())
		}
		if err := chromedp.Do(bctx, chromedp.KeyEvent("127.0.0.1:5555\r")); err != nil {
			t.Fatal(err)
		}
		waitFor(t, bctx, `document.querySelectorAll('.lookup-out li').length === 3`, "the key's order of three upstreams")
		var picks []struct {
			Upstream string `json:"upstream"`
		}
		cy.adminJSON(t, http.MethodGet, "/godist/pick?ip=127.0.0.1&port=5555", nil, &picks)
		if got := eval[string](t, bctx, `document.querySelector('.lookup-out').dataset.upstream`); got != picks[0].Upstream {
			t.Errorf("the page sends 127.0.0.1:5555 to %s, the admin API to %s", got, picks[0].Upstream)
		}
		if got := eval[string](t, bctx, fmt.Sprintf(`document.querySelector('.lookup-out li[data-dial=%q] .mark').textContent`, dials[2])); !strings.HasPrefix(got, "skipped: down") {
			t.Errorf("the killed upstream in the lookup: %q", got)
		}
	})

	t.Run("a drained upstream shown drained, with the operator's reason", func(t *testing.T) {
		body := fmt.Sprintf(`{"upstream": %q, "state": "drain", "reason": "upgrade to 2.0"}`, dials[1])
		if status, b := cy.admin(t, http.MethodPost, "/godist/upstreams/state", []byte(body)); status != http.StatusOK {
			t.Fatalf("POST /godist/upstreams/state: %d %s", status, b)
		}
		row := fmt.Sprintf(`document.querySelector('tr[data-upstream=%q]')`, dials[1])
		waitFor(t, bctx, row+`.dataset.state === 'drain'`, "the drained upstream shown as drain")
		if got := eval[string](t, bctx, row+`.querySelector('.badge').className`); !strings.Contains(got, "drain") {
			t.Errorf("the drained upstream's badge has classes %q, want drain's colour", got)
		}
		why := eval[string](t, bctx, row+`.querySelector('.why').textContent`)
		if !strings.Contains(why, "drained by an operator: upgrade to 2.0") || !strings.Contains(why, " remain") {
			t.Errorf("the drained upstream's state says %q", why)
		}
		if status, b := cy.admin(t, http.MethodPost, "/godist/upstreams/state", []byte(fmt.Sprintf(`{"upstream": %q, "state": "ready"}`, dials[1]))); status != http.StatusOK {
			t.Fatalf("POST /godist/upstreams/state: %d %s", status, b)
		}
		waitFor(t, bctx, row+`.dataset.state === 'up'`, "the upstream back up once ready")
	})

	t.Run("the plan tool gives POST /godist/plan's moved share", func(t *testing.T) {
		// Remove the killed upstream, add a new one of weight 2, and
		// weigh the first 3.
		added := "127.0.0.1:9"
		if err := chromedp.Do(bctx,
			chromedp.Click(chromedp.CSS(fmt.Sprintf(`.plan-list button[aria-label="Remove %s"]`, dials[2]))),
			chromedp.Click(chromedp.CSS(".plan-add")),
			chromedp.SendKeys(chromedp.CSS(".plan-list tbody tr:last-child .p-dial"), added),
		); err != nil {
			t.Fatal(err)
		}
		setInput(t, bctx, ".plan-list tbody tr:last-child .p-weight", "2")
		setInput(t, bctx, ".plan-list tbody tr:first-child .p-weight", "3")
		if err := chromedp.Do(bctx, chromedp.Click(chromedp.CSS(".plan-form button.primary"))); err != nil {
			t.Fatal(err)
		}
		waitFor(t, bctx, `document.querySelector('.plan-out').dataset.movedShare !== undefined`, "the plan's answer")
		shown := eval[string](t, bctx, `document.querySelector('.plan-out').dataset.movedShare`)

		var plan struct {
			KeySpace struct {
				MovedShare float64 `json:"moved_share"`
				Upstreams  []struct {
					Dial   string `json:"dial"`
					Change string `json:"change"`
				} `json:"upstreams"`
			} `json:"key_space"`
		}
		cy.adminJSON(t, http.MethodPost, "/godist/plan", map[string]any{"handler": 0, "upstreams": []map[string]any{
			{"dial": dials[0], "weight": 3}, {"dial": dials[1], "weight": 1}, {"dial": added, "weight": 2},
		}}, &plan)
		if got, err := strconv.ParseFloat(shown, 64); err != nil || got != plan.KeySpace.MovedShare {
			t.Errorf("the page's plan moves %q of the keys, POST /godist/plan %v", shown, plan.KeySpace.MovedShare)
		}
		rows := eval[[]string](t, bctx, `[...document.querySelectorAll('.plan-shares tbody tr')].map(r => r.dataset.dial + ' ' + r.querySelector('.badge').textContent)`)
		want := make([]string, len(plan.KeySpace.Upstreams))
		for i, u := range plan.KeySpace.Upstreams {
			want[i] = u.Dial + " " + u.Change
		}
		if strings.Join(rows, "\n") != strings.Join(want, "\n") {
			t.Errorf("the page's plan shows\n%s\nPOST /godist/plan\n%s", strings.Join(rows, "\n"), strings.Join(want, "\n"))
		}
		t.Logf("moved share %s: the page and POST /godist/plan agree", shown)
	})

	t.Run("screenshots", func(t *testing.T) {
		shoot := func(name string, width, height int64, mobile bool, scheme string) {
			t.Helper()
			err := chromedp.Do(bctx,
				chromedp.Func(func(ctx context.Context, tg *chromedp.Target) error {
					_, err := cdp.Call(ctx, tg, emulation.SetEmulatedMedia, emulation.SetEmulatedMediaParams{
						Features: []*emulation.MediaFeature{{Name: "prefers-color-scheme", Value: scheme}},
					})
					return err
				}),
				chromedp.EmulateViewport(width, height, func(p *emulation.SetDeviceMetricsOverrideParams, tp *emulation.SetTouchEmulationEnabledParams) {
					if mobile {
						p.Mobile = true
						p.DeviceScaleFactor = 2
						tp.Enabled = true
					}
				}),
			)
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			// one poll at the new size, so the chart is drawn to it
			n := eval[int](t, bctx, `Number(document.querySelector('svg.chart').dataset.samples)`)
			waitFor(t, bctx, fmt.Sprintf(`Number(document.querySelector('svg.chart').dataset.samples) > %d`, n), "a poll at the new size")
			png, err := chromedp.Run(bctx, chromedp.FullScreenshot(100))
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			file := filepath.Join(shots, name)
			if err := os.WriteFile(file, png, 0o644); err != nil { //nolint:gosec // in the directory the person running the test names
				t.Fatal(err)
			}
			t.Logf("screenshot: %s", file)
		}
		shoot("status-page.png", 1280, 900, false, "light")
		shoot("status-page-dark.png", 1280, 900, false, "dark")
		shoot("status-page-phone.png", 390, 844, true, "light")
		shoot("status-page-phone-dark.png", 390, 844, true, "dark")
	})

	t.Run("an upstream named like markup stays text", func(t *testing.T) {
		hostile := `<img src=x onerror=window.__pwned=1>:80`
		server := map[string]any{"listen": []string{freeAddr(t)}, "routes": []any{map[string]any{
			"handle": []any{map[string]any{"handler": "godist", "upstreams": []any{map[string]any{"dial": hostile}}}},
		}}}
		body, _ := json.Marshal(server)
		if status, answer := cy.admin(t, http.MethodPut, "/config/apps/layer4/servers/hostile", body); status != http.StatusOK {
			t.Fatalf("adding a server: %d %s", status, answer)
		}
		waitFor(t, bctx, fmt.Sprintf(`[...document.querySelectorAll('tr[data-upstream]')].some(r => r.dataset.upstream === %q)`, hostile),
			"the new handler's upstream on the page")
		shown := eval[string](t, bctx, fmt.Sprintf(`[...document.querySelectorAll('.u-dial')].find(e => e.textContent === %q).textContent`, hostile))
		injected := eval[int](t, bctx, `document.querySelectorAll('img').length + document.querySelectorAll('main script').length`)
		pwned := eval[bool](t, bctx, `window.__pwned !== undefined`)
		if shown != hostile || injected != 0 || pwned {
			t.Errorf("shown %q, %d elements injected, script ran: %v", shown, injected, pwned)
		}
	})
}

// ---- the browser ---------------------------------------------------------

// waitFor waits until the expression is true in the page, or fails the
// test after waitTimeout.
func waitFor(t *testing.T, ctx context.Context, expr, what string) {
	t.Helper()
	wctx, cancel := context.WithTimeout(ctx, waitTimeout)
	defer cancel()
	if _, err := chromedp.Run(wctx, chromedp.Poll[bool](expr, chromedp.WithPollingInterval(100*time.Millisecond), chromedp.WithPollingTimeout(waitTimeout))); err != nil {
		t.Fatalf("waiting for %s (%s): %v", what, expr, err)
	}
}

// eval evaluates the expression in the page.
func eval[T any](t *testing.T, ctx context.Context, expr string) T {
	t.Helper()
	v, err := chromedp.Run(ctx, chromedp.Evaluate[T](expr))
	if err != nil {
		t.Fatalf("evaluating %s: %v", expr, err)
	}
	return v
}

// setInput replaces an input's value as typing would: the value, then an
// input event.
func setInput(t *testing.T, ctx context.Context, sel, value string) {
	t.Helper()
	ok := eval[bool](t, ctx, fmt.Sprintf(`(() => { const e = document.querySelector(%q); if (!e) return false;
		e.focus(); e.value = %q; e.dispatchEvent(new Event('input', {bubbles: true})); return true; })()`, sel, value))
	if !ok {
		t.Fatalf("no input %s", sel)
	}
}

// chromiumPath returns the Chromium to drive: $CHROMIUM, or Debian's.
func chromiumPath(t *testing.T) string {
	t.Helper()
	path := os.Getenv("CHROMIUM")
	if path == "" {
		path = "/usr/bin/chromium"
	}
	if _, err := os.Stat(path); err != nil { //nolint:gosec // the Chromium the person running the test names
		t.Fatalf("no Chromium at %s (apt-get install chromium, or set CHROMIUM): %v", path, err)
	}
	return path
}

// ---- Caddy -----------------------------------------------------------------

// caddyBinary returns $GODIST_CADDY, or a Caddy built from ../bench/caddy.
func caddyBinary(t *testing.T) string {
	t.Helper()
	if path := os.Getenv("GODIST_CADDY"); path != "" {
		return path
	}
	out := filepath.Join(t.TempDir(), "caddy")
	cmd := exec.Command("go", "build", "-o", out, "./bench/caddy")
	cmd.Dir = ".."
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building Caddy from ../bench/caddy: %v\n%s", err, b)
	}
	return out
}

// runningCaddy is a Caddy process serving the demo.
type runningCaddy struct {
	adminAddr string
	l4        string // the godist listener
	site      string // the status page's site, http://host:port
	mu        sync.Mutex
	held      []net.Conn
}

// startCaddy runs Caddy with godist over dials (active checks every
// 500ms) and the status page behind basic_auth, and stops it when the test
// ends.
func startCaddy(t *testing.T, bin string, dials []string) *runningCaddy {
	t.Helper()
	dir := t.TempDir()
	hash, err := exec.Command(bin, "hash-password", "--plaintext", password).Output()
	if err != nil {
		t.Fatalf("caddy hash-password: %v", err)
	}
	cy := &runningCaddy{adminAddr: freeAddr(t), l4: freeAddr(t)}
	siteAddr := freeAddr(t)
	cy.site = "http://" + siteAddr
	caddyfile := fmt.Sprintf(`{
	admin %s
	persist_config off
	layer4 {
		%s {
			route {
				godist %s {
					health_interval 500ms
					health_timeout 400ms
				}
			}
		}
	}
}

http://%s {
	bind 127.0.0.1
	handle_path /godist/* {
		basic_auth {
			%s %s
		}
		godist_status
	}
}
`, cy.adminAddr, cy.l4, strings.Join(dials, " "), siteAddr, user, strings.TrimSpace(string(hash)))
	file := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(file, []byte(caddyfile), 0o644); err != nil {
		t.Fatal(err)
	}
	log, err := os.Create(filepath.Join(dir, "caddy.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "run", "--config", file)
	cmd.Env = append(os.Environ(), "HOME="+dir, "XDG_CONFIG_HOME="+dir, "XDG_DATA_HOME="+dir)
	cmd.Stdout, cmd.Stderr = log, log
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting Caddy: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() {
		cy.mu.Lock()
		for _, c := range cy.held {
			c.Close()
		}
		cy.mu.Unlock()
		_ = cmd.Process.Signal(os.Interrupt)
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Caddy's exit after SIGINT: %v", err)
			}
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			t.Errorf("Caddy did not stop within 10s of SIGINT; killed: %v", <-done)
		}
		if t.Failed() {
			b, _ := os.ReadFile(log.Name())
			t.Logf("Caddy's log:\n%s", b)
		}
		log.Close()
	})
	deadline := time.Now().Add(waitTimeout)
	for {
		resp, err := http.Get("http://" + cy.adminAddr + "/config/")
		if err == nil {
			resp.Body.Close()
			break
		}
		select {
		case err := <-done:
			b, _ := os.ReadFile(log.Name())
			t.Fatalf("Caddy exited: %v\n%s", err, b)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("Caddy's admin endpoint not up after %s: %v", waitTimeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return cy
}

// holdConnection opens a connection through godist, waits for the
// backend's greeting, and keeps it open until the test ends.
func (cy *runningCaddy) holdConnection(t *testing.T) {
	t.Helper()
	c, err := net.DialTimeout("tcp", cy.l4, waitTimeout)
	if err != nil {
		t.Fatalf("dialling godist: %v", err)
	}
	_ = c.SetReadDeadline(time.Now().Add(waitTimeout))
	if _, err := bufio.NewReader(c).ReadString('\n'); err != nil {
		c.Close()
		t.Fatalf("no greeting through godist: %v", err)
	}
	cy.mu.Lock()
	cy.held = append(cy.held, c)
	cy.mu.Unlock()
}

// echo sends n bytes through godist and wants them back.
func (cy *runningCaddy) echo(t *testing.T, n int) {
	t.Helper()
	c, err := net.DialTimeout("tcp", cy.l4, waitTimeout)
	if err != nil {
		t.Fatalf("dialling godist: %v", err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(waitTimeout))
	r := bufio.NewReader(c)
	if _, err := r.ReadString('\n'); err != nil {
		t.Fatalf("no greeting through godist: %v", err)
	}
	sent := bytes.Repeat([]byte("godist"), n/6+1)[:n]
	errc := make(chan error, 1)
	go func() { _, err := c.Write(sent); errc <- err }()
	got := make([]byte, n)
	_, rerr := io.ReadFull(r, got)
	if err := errors.Join(<-errc, rerr); err != nil || !bytes.Equal(got, sent) {
		t.Fatalf("echo of %d bytes through godist: %v", n, err)
	}
}

// admin sends one request to Caddy's admin endpoint.
func (cy *runningCaddy) admin(t *testing.T, method, path string, body []byte) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(method, "http://"+cy.adminAddr+path, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	client := &http.Client{Timeout: waitTimeout}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	return resp.StatusCode, b
}

// adminJSON sends in as JSON (if not nil), wants a 200, and decodes the
// answer into out.
func (cy *runningCaddy) adminJSON(t *testing.T, method, path string, in, out any) {
	t.Helper()
	var body []byte
	if in != nil {
		var err error
		if body, err = json.Marshal(in); err != nil {
			t.Fatal(err)
		}
	}
	status, b := cy.admin(t, method, path, body)
	if status != http.StatusOK {
		t.Fatalf("%s %s: %d %s", method, path, status, b)
	}
	if err := json.Unmarshal(b, out); err != nil {
		t.Fatalf("%s %s: decoding %s: %v", method, path, b, err)
	}
}

// ---- backends ----------------------------------------------------------------

// backend greets each connection with its name, then echoes what it
// reads until the client closes it or the backend is killed.
type backend struct {
	name  string
	addr  string
	ln    net.Listener
	mu    sync.Mutex
	conns map[net.Conn]bool
	wg    sync.WaitGroup
}

func startBackend(t *testing.T, name string) *backend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &backend{name: name, addr: ln.Addr().String(), ln: ln, conns: map[net.Conn]bool{}}
	b.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			b.mu.Lock()
			b.conns[c] = true
			b.mu.Unlock()
			b.wg.Go(func() {
				defer func() {
					b.mu.Lock()
					delete(b.conns, c)
					b.mu.Unlock()
					c.Close()
				}()
				if _, err := io.WriteString(c, b.name+"\n"); err != nil {
					return
				}
				_, _ = io.Copy(c, c) // echo, until the client or kill closes it
			})
		}
	})
	t.Cleanup(b.kill)
	return b
}

// kill closes the listener and every connection, and waits for them: the
// address then refuses connections. It may be called more than once.
func (b *backend) kill() {
	b.ln.Close()
	b.mu.Lock()
	for c := range b.conns {
		c.Close()
	}
	b.mu.Unlock()
	b.wg.Wait()
}

// freeAddr returns a loopback address whose port was free a moment ago.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func basicAuth(user, password string) string {
	return base64.StdEncoding.EncodeToString([]byte(user + ":" + password))
}
