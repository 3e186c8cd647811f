// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// This file reads and checks the body of POST /godist/upstreams/state,
// which sets an upstream's operator state, without touching anything:
// every way the body can be wrong is answered here, with the field it is
// about.

// maxOpStateBody bounds the body of POST /godist/upstreams/state: a
// request is a few hundred bytes.
const maxOpStateBody = 8 << 10

// opStateRequest is a checked request to set an upstream's operator state.
type opStateRequest struct {
	// Handler is the handler name asked for; empty when the request left
	// it out (resolveOpHandler fills it in).
	Handler  string
	Upstream string
	State    opState

	Deadline        time.Duration // drain only; 0: none
	KeepConnections bool          // maint only
	Weight          float64       // ready only; 0: none (a factor of 1)
	Reason          string
}

// opStateBody is the JSON of the request, each field a pointer so that a
// field left out (or null) can be told from one given.
type opStateBody struct {
	Handler         *string  `json:"handler"`
	Upstream        *string  `json:"upstream"`
	State           *string  `json:"state"`
	Deadline        *string  `json:"deadline"`
	KeepConnections *bool    `json:"keep_connections"`
	Weight          *float64 `json:"weight"`
	Reason          *string  `json:"reason"`
}

// opStateFields lists the body's fields, for the error about an unknown one.
const opStateFields = "handler, upstream, state, deadline, keep_connections, weight and reason"

// parseOpStateRequest reads and checks a request body. Every error is a
// caddy.APIError with a 4xx status whose message starts with the field it
// is about ("request body" when it is about the body as a whole).
func parseOpStateRequest(body io.Reader) (opStateRequest, error) {
	var req opStateRequest
	raw, err := io.ReadAll(io.LimitReader(body, maxOpStateBody+1))
	if err != nil {
		return req, apiErrorf(http.StatusBadRequest, "request body: reading: %v", err)
	}
	if len(raw) > maxOpStateBody {
		return req, apiErrorf(http.StatusRequestEntityTooLarge, "request body: larger than %d bytes", maxOpStateBody)
	}
	if len(bytes.TrimSpace(raw)) == 0 {
		return req, apiErrorf(http.StatusBadRequest, `request body: empty: want {"upstream": "host:port", "state": "drain"}`)
	}

	var b opStateBody
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&b); err != nil {
		return req, bodyDecodeError(err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return req, apiErrorf(http.StatusBadRequest, "request body: more after the JSON object")
	}

	if b.Handler != nil {
		if *b.Handler == "" {
			return req, apiErrorf(http.StatusBadRequest, "handler: empty: give a handler's name, or leave it out when one name is running")
		}
		if err := validateHandlerName(*b.Handler); err != nil {
			return req, apiErrorf(http.StatusBadRequest, "%v", err)
		}
		req.Handler = *b.Handler
	}

	if b.Upstream == nil || *b.Upstream == "" {
		return req, apiErrorf(http.StatusBadRequest, "upstream: required: the upstream's dial address, as the handler lists it")
	}
	if _, _, err := parseDial(*b.Upstream); err != nil {
		return req, apiErrorf(http.StatusBadRequest, "upstream %q: %v", *b.Upstream, err)
	}
	req.Upstream = *b.Upstream

	if b.State == nil {
		return req, apiErrorf(http.StatusBadRequest, "state: required: ready, drain or maint")
	}
	state, ok := parseOpState(*b.State)
	if !ok {
		return req, apiErrorf(http.StatusBadRequest, "state %q: must be ready, drain or maint", *b.State)
	}
	req.State = state

	if b.Deadline != nil {
		if state != opDrain {
			return req, apiErrorf(http.StatusBadRequest, "deadline: only with state drain, not %s", state)
		}
		d, err := caddy.ParseDuration(*b.Deadline)
		switch {
		case err != nil:
			return req, apiErrorf(http.StatusBadRequest, "deadline %q: not a duration such as \"30s\" or \"10m\"", *b.Deadline)
		case d <= 0:
			return req, apiErrorf(http.StatusBadRequest, "deadline %q: must be positive; leave it out to let the connections end by themselves", *b.Deadline)
		case d > maxDrainDeadline:
			return req, apiErrorf(http.StatusBadRequest, "deadline %q: at most %s; a longer drain is a maint", *b.Deadline, maxDrainDeadline)
		}
		req.Deadline = d
	}

	if b.KeepConnections != nil {
		if state != opMaint {
			return req, apiErrorf(http.StatusBadRequest, "keep_connections: only with state maint, not %s", state)
		}
		req.KeepConnections = *b.KeepConnections
	}

	if b.Weight != nil {
		w := *b.Weight
		if state != opReady {
			return req, apiErrorf(http.StatusBadRequest, "weight: only with state ready, not %s: a %s upstream takes no new connections", state, state)
		}
		if !(w >= minOpWeight && w <= maxOpWeight) {
			return req, apiErrorf(http.StatusBadRequest, "weight %g: must be from %g to %g, a factor of the upstream's configured weight", w, float64(minOpWeight), float64(maxOpWeight))
		}
		if w != 1 {
			req.Weight = w // 1 is the configured weight: no override
		}
	}

	if b.Reason != nil {
		if n := len(*b.Reason); n > maxOpReason {
			return req, apiErrorf(http.StatusBadRequest, "reason: %d bytes: at most %d", n, maxOpReason)
		}
		req.Reason = *b.Reason
	}
	return req, nil
}

// bodyDecodeError says what is wrong with a body that does not decode, in
// the body's terms rather than Go's.
func bodyDecodeError(err error) error {
	var syntax *json.SyntaxError
	var wrongType *json.UnmarshalTypeError
	switch {
	case errors.As(err, &wrongType) && wrongType.Field == "":
		return apiErrorf(http.StatusBadRequest, "request body: must be a JSON object, not a JSON %s", wrongType.Value)
	case errors.As(err, &wrongType):
		want := "a JSON string"
		switch wrongType.Field {
		case "keep_connections":
			want = "true or false"
		case "weight":
			want = "a JSON number"
		case "deadline":
			want = `a JSON string such as "30s"`
		}
		return apiErrorf(http.StatusBadRequest, "%s: must be %s, not a JSON %s", wrongType.Field, want, wrongType.Value)
	case errors.As(err, &syntax), errors.Is(err, io.ErrUnexpectedEOF):
		return apiErrorf(http.StatusBadRequest, "request body: not valid JSON: %v", err)
	}
	if name, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
		return apiErrorf(http.StatusBadRequest, "request body: unknown field %s: the fields are %s", name, opStateFields)
	}
	return apiErrorf(http.StatusBadRequest, "request body: %v", err)
}

// record returns the record the request sets, for handler name at now.
func (r opStateRequest) record(handler string, now time.Time) opRecord {
	rec := opRecord{
		Handler:         handler,
		Upstream:        r.Upstream,
		State:           r.State,
		Weight:          r.Weight,
		KeepConnections: r.KeepConnections,
		Reason:          r.Reason,
		SetAt:           now.UTC(),
	}
	if r.Deadline > 0 {
		rec.Deadline = now.Add(r.Deadline).UTC()
	}
	return rec
}

// resolveOpHandler fills in the handler name of a request that left it
// out, when the running handlers all have one name, and checks that a
// name given is running: a state set for a name no handler has would
// change nothing, most likely by a typing mistake. names are the running
// handlers' names, in any order, repeats allowed.
func resolveOpHandler(req *opStateRequest, names []string) error {
	distinct := slices.Compact(slices.Sorted(slices.Values(names)))
	switch {
	case req.Handler != "" && slices.Contains(distinct, req.Handler):
		return nil
	case len(distinct) == 0:
		return apiErrorf(http.StatusNotFound, "no godist handler is running")
	case req.Handler != "":
		return apiErrorf(http.StatusNotFound, "handler %q: no godist handler of that name is running: %s", req.Handler, runningNames(distinct))
	case len(distinct) > 1:
		return apiErrorf(http.StatusBadRequest, "handler: required when godist handlers of several names run: %s", runningNames(distinct))
	}
	req.Handler = distinct[0]
	return nil
}

// runningNames lists the handler names running.
func runningNames(distinct []string) string {
	quoted := make([]string, len(distinct))
	for i, n := range distinct {
		quoted[i] = fmt.Sprintf("%q", n)
	}
	return "the names running are " + strings.Join(quoted, ", ")
}

// unknownUpstreamWarning returns the warning for a state set on an upstream
// that no handler of the name has now, "" if one has it. Such a state is
// kept all the same: with upstreams discovered through DNS, an operator may
// drain an address before it appears, so that it never takes a connection.
func unknownUpstreamWarning(req opStateRequest, known []string) string {
	if slices.Contains(known, req.Upstream) {
		return ""
	}
	return fmt.Sprintf("upstream %q is not among the upstreams of handler %q now: the state is kept, and applies if it appears (a DNS-discovered address, say); check the address if you meant one that is listed",
		req.Upstream, req.Handler)
}

// opStateAnswer is the answer of POST /godist/upstreams/state: the
// upstream's state before and after, and what the operator should know.
type opStateAnswer struct {
	Handler  string   `json:"handler"`
	Upstream string   `json:"upstream"`
	Previous opRecord `json:"previous"`
	State    opRecord `json:"state"`
	Warnings []string `json:"warnings,omitempty"`
}
