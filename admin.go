// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
)

func init() {
	caddy.RegisterModule(adminAPI{})
}

// adminAPI adds godist's endpoints to Caddy's admin API, wherever its
// admin listener is (localhost:2019 unless the config says otherwise):
//
//   - GET /godist/upstreams: every godist handler of the running config,
//     with each upstream's health, connections and counts.
//   - GET /godist/pick?key=K, or ?ip=A&port=P: the upstream a key goes to
//     now in each handler, and the order of preference behind it.
//   - GET /godist/fingerprint: each handler's fingerprint and what it
//     digests, to compare Caddy instances.
//   - POST /godist/plan: what replacing a handler's static upstreams would
//     move.
//   - POST /godist/upstreams/state: set an upstream's operator state
//     (ready, drain, maint, a weight factor) for a handler name, in
//     Caddy's storage, where every instance sharing it picks it up
//     (docs/operate.md).
//
// Every GET endpoint and the plan take handler=<index> to ask one handler
// only; the state is set by handler name, in its body. Only the state
// changes anything, and no endpoint costs more than about a second of one
// core (see maxPlanUpstreams and the limits beside it). Errors are
// answered as Caddy's admin API answers them, {"error": "..."} with a 4xx
// status, or 503 when the storage fails.
type adminAPI struct{}

// CaddyModule returns the Caddy module information.
func (adminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.godist",
		New: func() caddy.Module { return new(adminAPI) },
	}
}

// What one request may ask of the endpoints. The work a request makes
// grows with what it sends (a key, a proposed list) and with the running
// config's upstreams; these keep the first bounded, and a plan samples
// fewer keys for long lists (see planKeyScores), so that no request costs
// more than about a second of one core.
const (
	// maxPlanBody bounds the body of POST /godist/plan.
	maxPlanBody = 1 << 20

	// maxPlanUpstreams bounds the proposed upstreams of one plan: far
	// more than a handler is given in practice (each new connection
	// scores its key against every upstream). A plan of that many samples
	// planKeyScores / (20,000 + the current upstreams) keys, about 600.
	maxPlanUpstreams = 20_000

	// maxConcurrentPlans is how many plans are worked out at once; the
	// rest are refused with 429, so that a flood of plans takes one core
	// at most.
	maxConcurrentPlans = 1

	// maxPickKey bounds the key GET /godist/pick takes, in bytes: longer
	// than any client address, DNS name or header value that a hash key
	// is made of (common HTTP servers cap a header line at 8 KiB).
	// Caddy's admin server itself refuses a request line and headers of
	// more than 64 KiB, with 431.
	maxPickKey = 8 << 10
)

// planSlots holds a token for each plan being worked out, in every admin
// server of the process. servePlan alone uses it: it puts a token in
// without waiting before it works out a plan, and takes it out when the
// answer is written or the plan stopped; finding no room, it refuses the
// plan.
var planSlots = make(chan struct{}, maxConcurrentPlans)

// The endpoints the status page serves too (statusAPIs), each with its
// method and query checks, written once for both.
var (
	upstreamsEndpoint = adminEndpoint(http.MethodGet, []string{"handler"}, serveUpstreams)
	pickEndpoint      = adminEndpoint(http.MethodGet, []string{"handler", "key", "ip", "port"}, servePick)
	planEndpoint      = adminEndpoint(http.MethodPost, []string{"handler"}, servePlan)
)

// Routes returns the godist endpoints.
func (adminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{
		{Pattern: "/godist/upstreams", Handler: upstreamsEndpoint},
		{Pattern: "/godist/pick", Handler: pickEndpoint},
		{Pattern: "/godist/fingerprint", Handler: adminEndpoint(http.MethodGet, []string{"handler"}, serveFingerprint)},
		{Pattern: "/godist/plan", Handler: planEndpoint},
		{Pattern: "/godist/upstreams/state", Handler: adminEndpoint(http.MethodPost, nil, serveOpState)},
		{Pattern: "/godist/", Handler: caddy.AdminHandlerFunc(serveUnknown)},
	}
}

// adminEndpoint wraps an endpoint with what all of them check first: the
// method, and that the query holds only the parameters it takes, each
// once.
func adminEndpoint(method string, params []string, serve func(http.ResponseWriter, *http.Request, url.Values) error) caddy.AdminHandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) error {
		if r.Method != method {
			w.Header().Set("Allow", method)
			return apiErrorf(http.StatusMethodNotAllowed, "method %s not allowed on %s: use %s", r.Method, r.URL.Path, method)
		}
		q, err := url.ParseQuery(r.URL.RawQuery)
		if err != nil {
			return apiErrorf(http.StatusBadRequest, "query: %v", err)
		}
		for _, name := range slices.Sorted(maps.Keys(q)) {
			if !slices.Contains(params, name) {
				takes := strings.Join(params, ", ")
				if takes == "" {
					takes = "none: its request is in its body"
				}
				return apiErrorf(http.StatusBadRequest, "unknown query parameter %q: %s takes %s", name, r.URL.Path, takes)
			}
			if n := len(q[name]); n > 1 {
				return apiErrorf(http.StatusBadRequest, "query parameter %q given %d times", name, n)
			}
		}
		return serve(w, r, q)
	}
}

func serveUnknown(_ http.ResponseWriter, r *http.Request) error {
	return apiErrorf(http.StatusNotFound, "no godist endpoint %s: there are /godist/upstreams, /godist/pick, /godist/fingerprint, /godist/plan and /godist/upstreams/state", r.URL.Path)
}

func serveUpstreams(w http.ResponseWriter, _ *http.Request, q url.Values) error {
	handlers, err := selectHandlers(q)
	if err != nil {
		return err
	}
	now := time.Now()
	out := make([]handlerStatus, len(handlers))
	for i, ih := range handlers {
		out[i] = ih.h.status(ih.index, now)
	}
	return writeJSON(w, out)
}

func serveFingerprint(w http.ResponseWriter, _ *http.Request, q url.Values) error {
	handlers, err := selectHandlers(q)
	if err != nil {
		return err
	}
	out := make([]fingerprintStatus, len(handlers))
	for i, ih := range handlers {
		out[i] = ih.h.fingerprintStatus(ih.index)
	}
	return writeJSON(w, out)
}

func servePick(w http.ResponseWriter, _ *http.Request, q url.Values) error {
	kr, err := parseKeyRequest(q)
	if err != nil {
		return err
	}
	handlers, err := selectHandlers(q)
	if err != nil {
		return err
	}
	now := time.Now()
	out := make([]pickStatus, len(handlers))
	for i, ih := range handlers {
		key, err := kr.keyFor(ih.h, ih.index)
		if err != nil {
			return err
		}
		out[i] = ih.h.pick(ih.index, key, now)
	}
	return writeJSON(w, out)
}

// serveOpState sets an upstream's operator state: it checks the request,
// writes the state to the storage of the handler name's store, applies it
// to the running handlers of the name before it answers (the other
// instances read it at their next poll), and answers with the state
// before and after.
func serveOpState(w http.ResponseWriter, r *http.Request, _ url.Values) error {
	req, err := parseOpStateRequest(r.Body)
	if err != nil {
		return err
	}
	all := liveHandlers.list()
	names := make([]string, len(all))
	for i, h := range all {
		names[i] = h.name
	}
	if err := resolveOpHandler(&req, names); err != nil {
		return err
	}
	var named []*Handler
	var known []string
	for _, h := range all {
		if h.name == req.Handler {
			named = append(named, h)
			known = append(known, dialsOf(h.members.Load().pool)...)
		}
	}
	// Handlers of one name share one store per storage; the newest holds
	// the storage the config chose.
	store := named[len(named)-1].opStore
	before, after, err := store.set(r.Context(), req)
	if err != nil {
		return apiErrorf(http.StatusServiceUnavailable, "%v", err)
	}
	for _, h := range named {
		h.refresh()
	}
	ans := opStateAnswer{Handler: req.Handler, Upstream: req.Upstream, Previous: before, State: after}
	if w := unknownUpstreamWarning(req, known); w != "" {
		ans.Warnings = append(ans.Warnings, w)
	}
	return writeJSON(w, ans)
}

// planRequest is the body of POST /godist/plan.
type planRequest struct {
	// The handler's index; may be left out when only one is running.
	Handler *int `json:"handler"`
	// The proposed upstream list, as the handler's `upstreams`.
	Upstreams []*Upstream `json:"upstreams"`
}

func servePlan(w http.ResponseWriter, r *http.Request, q url.Values) error {
	var req planRequest
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxPlanBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		var tooLarge *http.MaxBytesError
		var wrongType *json.UnmarshalTypeError
		switch {
		case errors.As(err, &tooLarge):
			return apiErrorf(http.StatusRequestEntityTooLarge, "request body: larger than %d bytes", maxPlanBody)
		case errors.As(err, &wrongType) && wrongType.Field != "":
			// json's own message names Go types; say it in the body's terms
			return apiErrorf(http.StatusBadRequest, "request body: %s: cannot be a JSON %s", wrongType.Field, wrongType.Value)
		case errors.Is(err, io.EOF):
			return apiErrorf(http.StatusBadRequest, `request body: empty: want {"upstreams": [{"dial": "host:port"}, ...]}`)
		}
		return apiErrorf(http.StatusBadRequest, "request body: %v", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return apiErrorf(http.StatusBadRequest, "request body: more after the JSON object")
	}

	all := liveHandlers.list()
	index, err := planHandler(q, req.Handler, len(all))
	if err != nil {
		return err
	}
	if n := len(req.Upstreams); n > maxPlanUpstreams {
		return apiErrorf(http.StatusRequestEntityTooLarge, "upstreams: %d proposed: a plan takes at most %d", n, maxPlanUpstreams)
	}
	if err := validateProposed(req.Upstreams, all[index].source); err != nil {
		return apiErrorf(http.StatusBadRequest, "%v", err)
	}

	// Only the work itself takes a slot: a client slow to send its body
	// holds none.
	select {
	case planSlots <- struct{}{}:
		defer func() { <-planSlots }()
	default:
		w.Header().Set("Retry-After", "1")
		return apiErrorf(http.StatusTooManyRequests, "another plan is being worked out: /godist/plan works out %d at a time; retry in a second", maxConcurrentPlans)
	}
	// The plan stops when its client goes away or the admin server stops.
	res, err := all[index].plan(r.Context(), index, req.Upstreams)
	switch {
	case errors.Is(err, errNothingToPlanFrom), errors.Is(err, errNothingToPlanTo):
		return apiErrorf(http.StatusConflict, "plan: handler %d: %v", index, err)
	case err != nil:
		return apiErrorf(http.StatusServiceUnavailable, "plan: stopped before it was done: %v", err)
	}
	return writeJSON(w, res)
}

// planHandler returns the index of the handler a plan is for: named in the
// query or the body (alike if in both), or the only one running.
func planHandler(q url.Values, inBody *int, n int) (int, error) {
	switch {
	case q.Has("handler"):
		i, err := handlerIndex(q.Get("handler"), n)
		if err == nil && inBody != nil && *inBody != i {
			err = apiErrorf(http.StatusBadRequest, "handler: %d in the query but %d in the body", i, *inBody)
		}
		return i, err
	case inBody != nil:
		return handlerIndex(strconv.Itoa(*inBody), n)
	case n == 1:
		return 0, nil
	case n == 0:
		return 0, apiErrorf(http.StatusNotFound, "no godist handler is running")
	}
	return 0, apiErrorf(http.StatusBadRequest, "handler: required when %s", runningHandlers(n))
}

// indexedHandler is a running handler and its index in provisioning order.
type indexedHandler struct {
	index int
	h     *Handler
}

// selectHandlers returns the running handlers, or only the one that the
// handler parameter names.
func selectHandlers(q url.Values) ([]indexedHandler, error) {
	all := liveHandlers.list()
	if q.Has("handler") {
		i, err := handlerIndex(q.Get("handler"), len(all))
		if err != nil {
			return nil, err
		}
		return []indexedHandler{{index: i, h: all[i]}}, nil
	}
	out := make([]indexedHandler, len(all))
	for i, h := range all {
		out[i] = indexedHandler{index: i, h: h}
	}
	return out, nil
}

// handlerIndex checks a handler index against the n handlers running.
func handlerIndex(s string, n int) (int, error) {
	i, err := strconv.Atoi(s)
	if err != nil || i < 0 {
		return 0, apiErrorf(http.StatusBadRequest, "handler %q: must be a handler's index, a whole number from 0", s)
	}
	if i >= n {
		return 0, apiErrorf(http.StatusNotFound, "handler %d: no such godist handler: %s", i, runningHandlers(n))
	}
	return i, nil
}

// runningHandlers says how many handlers are running, and their indexes.
func runningHandlers(n int) string {
	switch n {
	case 0:
		return "no godist handler is running"
	case 1:
		return "1 godist handler is running (handler 0)"
	}
	return fmt.Sprintf("%d godist handlers are running (handlers 0 to %d)", n, n-1)
}

// keyRequest is the key GET /godist/pick asks about: a key as given, or a
// client address to make each handler's key of.
type keyRequest struct {
	key     string
	hasKey  bool
	ip      netip.Addr
	port    uint16
	hasPort bool
}

func parseKeyRequest(q url.Values) (keyRequest, error) {
	var kr keyRequest
	switch {
	case q.Has("key") && (q.Has("ip") || q.Has("port")):
		return kr, apiErrorf(http.StatusBadRequest, "give key=, or ip= with port=, not both")
	case q.Has("key"):
		kr.key, kr.hasKey = q.Get("key"), true
		if kr.key == "" {
			return kr, apiErrorf(http.StatusBadRequest, "key: empty")
		}
		if len(kr.key) > maxPickKey {
			return kr, apiErrorf(http.StatusRequestURITooLong, "key: %d bytes: longer than the %d bytes /godist/pick takes", len(kr.key), maxPickKey)
		}
		return kr, nil
	case !q.Has("ip"):
		if q.Has("port") {
			return kr, apiErrorf(http.StatusBadRequest, "port= needs ip=")
		}
		return kr, apiErrorf(http.StatusBadRequest, "missing key=, or ip= with port=")
	}
	ip, err := netip.ParseAddr(q.Get("ip"))
	if err != nil {
		return kr, apiErrorf(http.StatusBadRequest, "ip %q: not an IP address", q.Get("ip"))
	}
	kr.ip = ip
	if q.Has("port") {
		p, err := strconv.ParseUint(q.Get("port"), 10, 16)
		if err != nil || p == 0 {
			return kr, apiErrorf(http.StatusBadRequest, "port %q: must be a number from 1 to 65535", q.Get("port"))
		}
		kr.port, kr.hasPort = uint16(p), true
	}
	return kr, nil
}

// keyFor returns the key that handler h would hash a connection by: the
// given key, or one made of the client address exactly as h makes it.
func (kr keyRequest) keyFor(h *Handler, index int) (string, error) {
	if kr.hasKey {
		return kr.key, nil
	}
	client := net.TCPAddrFromAddrPort(netip.AddrPortFrom(kr.ip, kr.port))
	switch h.hashKey.kind {
	case keyIP:
		return addrKey(client, false), nil
	case keyIPPort:
		if !kr.hasPort {
			return "", apiErrorf(http.StatusBadRequest, "handler %d hashes by ip_port: give port= with ip=, or ask handler= another", index)
		}
		return addrKey(client, true), nil
	case keyTemplate:
	}
	return "", apiErrorf(http.StatusBadRequest,
		"handler %d hashes by %q, whose placeholders ip= and port= cannot evaluate: give key= (and handler=%d to ask it alone)",
		index, h.HashKey, index)
}

// writeJSON answers with v as JSON.
func writeJSON(w http.ResponseWriter, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return apiErrorf(http.StatusInternalServerError, "encoding the answer: %v", err)
	}
	w.Header().Set("Content-Type", "application/json")
	// A failed write means the client has gone: there is no one to tell.
	_, _ = w.Write(append(b, '\n'))
	return nil
}

// apiErrorf returns an error that Caddy's admin server answers with the
// status and {"error": "<message>"}.
func apiErrorf(status int, format string, args ...any) error {
	return caddy.APIError{HTTPStatus: status, Err: fmt.Errorf(format, args...)}
}

// Interface guards
var (
	_ caddy.Module      = adminAPI{}
	_ caddy.AdminRouter = adminAPI{}
)
