// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"bytes"
	"crypto/sha256"
	"embed"
	"encoding/hex"
	"encoding/json"
	"errors"
	"mime"
	"net/http"
	"path"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func init() {
	caddy.RegisterModule(StatusPage{})
	httpcaddyfile.RegisterHandlerDirective("godist_status", parseStatusCaddyfile)
	// Beside Caddy's own metrics handler, which it resembles: a read-only
	// view that answers the request itself. Directives such as basic_auth
	// and forward_auth come earlier in Caddy's order, so they guard it.
	httpcaddyfile.RegisterDirectiveOrder("godist_status", httpcaddyfile.After, "metrics")
}

// StatusPage is an HTTP handler that serves a live page of every godist
// handler in the process: each upstream's state and why, its connections,
// counts and share of the key space, a chart of active connections, a
// lookup of where a client goes, and a tool that works out what a change
// of upstreams would move. The page, its style and its script are
// embedded: it loads nothing from elsewhere, so it works in an air-gapped
// network.
//
// It answers under the path it is mounted at, relative to it, so it can be
// placed anywhere on a site: the page at `<mount>/`, its JSON at
// `<mount>/api/upstreams`, `<mount>/api/pick` and `<mount>/api/plan`
// (the same answers as the admin API's `/godist/upstreams`,
// `/godist/pick` and `/godist/plan`, with the same limits), its files at
// `<mount>/status.js`, `<mount>/status.css` and `<mount>/favicon.svg`.
// A request for the mount point without its trailing slash is redirected
// to it, so that the page's relative links resolve.
//
// It is read-only: nothing it serves changes any state (a plan is a
// computation). Put it behind the site's own `basic_auth` or
// `forward_auth`: the page shows upstream addresses and traffic.
//
// It has no options.
type StatusPage struct{}

// CaddyModule returns the Caddy module information.
func (StatusPage) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.godist_status",
		New: func() caddy.Module { return new(StatusPage) },
	}
}

// statusFiles are the page and what it loads, embedded.
//
//go:embed status
var statusFiles embed.FS

// statusAsset is an embedded file as the status page serves it.
type statusAsset struct {
	body        []byte
	contentType string
	etag        string // strong, from the content: a new build revalidates
}

// statusAssets are the files the page is made of, by the name they are
// served under; index.html is the page itself.
var statusAssets = loadStatusAssets("index.html", "status.js", "status.css", "favicon.svg")

func loadStatusAssets(names ...string) map[string]statusAsset {
	assets := make(map[string]statusAsset, len(names))
	for _, name := range names {
		b, err := statusFiles.ReadFile("status/" + name)
		if err != nil {
			panic("godist status page: embedded file missing: " + err.Error())
		}
		sum := sha256.Sum256(b)
		// Named here, not looked up: the system's MIME table may lack
		// these or name no charset.
		var ct string
		switch path.Ext(name) {
		case ".html":
			ct = "text/html; charset=utf-8"
		case ".js":
			ct = "text/javascript; charset=utf-8"
		case ".css":
			ct = "text/css; charset=utf-8"
		case ".svg":
			ct = "image/svg+xml"
		default:
			panic("godist status page: no content type for " + name)
		}
		assets[name] = statusAsset{body: b, contentType: ct, etag: `"` + hex.EncodeToString(sum[:8]) + `"`}
	}
	return assets
}

// statusPageCSP is the page's Content-Security-Policy: its script, style
// and data come from where the page does, nothing is inlined or framed.
const statusPageCSP = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; " +
	"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

// statusAPI is one JSON route of the status page: the admin endpoint of
// the same name, with its method and query checks.
type statusAPI struct {
	name  string // after <mount>/api/
	serve caddy.AdminHandlerFunc
}

// statusAPIs are the page's JSON routes. They call the admin API's own
// endpoints, so that they answer the same, with the same limits and the
// same one plan at a time, in the admin server and here together.
var statusAPIs = []statusAPI{
	{"upstreams", upstreamsEndpoint},
	{"pick", pickEndpoint},
	{"plan", planEndpoint},
}

// ServeHTTP serves the page, its files and its JSON, by the end of the
// request's path; see StatusPage.
func (StatusPage) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	dir, name := path.Split(r.URL.Path)
	orig := originalPath(r)
	asset, isAsset := statusAssets[name]
	switch {
	case strings.HasSuffix(dir, "/api/"):
		return serveStatusAPI(w, r, name)
	case name == "" && !strings.HasSuffix(orig, "/"):
		// Under a path prefix that a rewrite stripped (handle_path /godist*
		// and a request for /godist), the page must be reached with its
		// trailing slash, or its relative links miss it.
		return redirect(w, r, orig+"/")
	case name == "":
		asset = statusAssets["index.html"]
	case name == "index.html" && strings.HasSuffix(orig, "/index.html"):
		return redirect(w, r, strings.TrimSuffix(orig, "index.html"))
	case !isAsset && !strings.Contains(name, "."):
		// The mount point itself without its slash (route /status* and a
		// request for /status): the page is at the slash.
		return redirect(w, r, orig+"/")
	case !isAsset:
		return caddyhttp.Error(http.StatusNotFound, errors.New("godist status page: no file "+name))
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		return caddyhttp.Error(http.StatusMethodNotAllowed, errors.New("godist status page: method "+r.Method+" not allowed: use GET"))
	}
	hdr := w.Header()
	hdr.Set("Content-Type", asset.contentType)
	hdr.Set("ETag", asset.etag)
	hdr.Set("Cache-Control", "no-cache") // revalidate: a cheap 304 until Caddy is upgraded
	hdr.Set("X-Content-Type-Options", "nosniff")
	hdr.Set("Referrer-Policy", "no-referrer")
	if name == "" || name == "index.html" { // the latter only if a rewrite asked for it
		hdr.Set("Content-Security-Policy", statusPageCSP)
	}
	http.ServeContent(w, r, name, time.Time{}, bytes.NewReader(asset.body))
	return nil
}

// originalPath returns the request's path as the client sent it, before
// any rewrite.
func originalPath(r *http.Request) string {
	if orig, ok := r.Context().Value(caddyhttp.OriginalRequestCtxKey).(http.Request); ok {
		return orig.URL.Path
	}
	return r.URL.Path
}

// redirect sends the client to the path to on this site, its query kept.
func redirect(w http.ResponseWriter, r *http.Request, to string) error {
	to = "/" + strings.TrimLeft(to, "/") // never //host: a redirect stays on this site
	if r.URL.RawQuery != "" {
		to += "?" + r.URL.RawQuery
	}
	http.Redirect(w, r, to, http.StatusPermanentRedirect) //nolint:gosec // to is a path on this site: a leading // is stripped above
	return nil
}

// serveStatusAPI answers one of the page's JSON routes, or a JSON 404 for
// a name that is none of them. Errors are answered as the admin API
// answers them: the status and {"error": "..."}.
func serveStatusAPI(w http.ResponseWriter, r *http.Request, name string) error {
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	var err error
	switch i := statusAPIIndex(name); {
	case i < 0:
		err = apiErrorf(http.StatusNotFound, "no status page endpoint api/%s: there are api/upstreams, api/pick and api/plan", name)
	case r.Method == http.MethodPost && !isJSONContent(r.Header.Get("Content-Type")):
		// A plan is only a computation, but it costs up to a second of a
		// core: a page on another site must not be able to make the
		// browser of someone logged in here send them. A cross-site
		// request with a JSON body needs a CORS preflight, which this
		// handler never grants.
		err = apiErrorf(http.StatusUnsupportedMediaType, "request body: Content-Type must be application/json")
	default:
		// The endpoint names the path in its errors: the one the client
		// asked for, not what a handle_path left of it.
		asked := *r
		u := *r.URL
		u.Path = originalPath(r)
		asked.URL = &u
		err = statusAPIs[i].serve(w, &asked)
	}
	if err == nil {
		return nil
	}
	// As Caddy's admin server answers an error.
	var apiErr caddy.APIError
	if !errors.As(err, &apiErr) {
		apiErr = caddy.APIError{HTTPStatus: http.StatusInternalServerError, Err: err}
	}
	if apiErr.HTTPStatus == 0 {
		apiErr.HTTPStatus = http.StatusInternalServerError
	}
	if apiErr.Message == "" && apiErr.Err != nil {
		apiErr.Message = apiErr.Err.Error()
	}
	status := apiErr.HTTPStatus
	b, _ := json.Marshal(struct {
		Error string `json:"error"`
	}{apiErr.Message})
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	// A failed write means the client has gone: there is no one to tell.
	_, _ = w.Write(append(b, '\n'))
	return nil
}

func statusAPIIndex(name string) int {
	for i, api := range statusAPIs {
		if api.name == name {
			return i
		}
	}
	return -1
}

// isJSONContent reports whether a Content-Type header names JSON.
func isJSONContent(ct string) bool {
	mt, _, err := mime.ParseMediaType(ct)
	return err == nil && mt == "application/json"
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	godist_status
//
// It takes no arguments and no options.
func (*StatusPage) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		return d.Errf("unrecognized subdirective '%s'", d.Val())
	}
	return nil
}

func parseStatusCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	s := new(StatusPage)
	err := s.UnmarshalCaddyfile(h.Dispenser)
	return s, err
}

// Interface guards
var (
	_ caddy.Module                = (*StatusPage)(nil)
	_ caddyhttp.MiddlewareHandler = (*StatusPage)(nil)
	_ caddyfile.Unmarshaler       = (*StatusPage)(nil)
)
