// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"

	"github.com/mholt/caddy-l4/layer4"
)

func init() {
	caddyconfig.RegisterAdapter("godist", Adapter{})
}

// AdapterServerName is the name of the layer4 server that Adapter makes,
// as it appears in the admin API's paths:
// /config/apps/layer4/servers/godist/...
const AdapterServerName = "godist"

// Adapter lets Caddy run an unchanged godist.conf, the config file of
// godist (2013):
//
//	caddy run --adapter godist --config godist.conf
//
// A godist.conf is a JSON object with the address to listen on and the
// servers to balance over:
//
//	{"Host": "localhost:8080", "Servers": ["localhost:4000", "localhost:4001"]}
//
// It becomes one layer4 server, named "godist", listening on Host, with one
// route whose only handler is godist with Servers as its upstreams, in
// order, each of weight 1, and the default hash key, ip_port, which is
// godist's own. Everything else (admin endpoint, logs) is Caddy's default.
//
// Keys match as they did in godist, which read the file with Go's
// encoding/json: regardless of case, so "host" and "HOST" are Host. A key
// that is neither Host nor Servers is ignored with a warning, as godist
// ignored it silently; a key given twice warns too, and the last one
// counts, as in godist. Everything godist would have failed on later (an
// empty server list, an address it could not dial or listen on) is an
// error here, naming the key, its line, and what is wrong.
type Adapter struct{}

// godistConf is what a godist.conf holds.
type godistConf struct {
	Host    string
	Servers []string
}

// Adapt converts a godist.conf in body to Caddy JSON. The option
// "filename" names the file in errors and warnings; it defaults to
// godist.conf.
func (Adapter) Adapt(body []byte, options map[string]any) ([]byte, []caddyconfig.Warning, error) {
	filename, _ := options["filename"].(string)
	if filename == "" {
		filename = "godist.conf"
	}
	p := &confParser{file: filename, body: body}
	conf, err := p.parse()
	if err != nil {
		return nil, p.warnings, err
	}

	upstreams := make([]*Upstream, len(conf.Servers))
	for i, s := range conf.Servers {
		upstreams[i] = &Upstream{Dial: s}
	}
	handler := caddyconfig.JSONModuleObject(&Handler{Upstreams: upstreams}, "handler", "godist", &p.warnings)
	app := &layer4.App{Servers: map[string]*layer4.Server{
		AdapterServerName: {
			Listen: []string{conf.Host},
			Routes: layer4.RouteList{{HandlersRaw: []json.RawMessage{handler}}},
		},
	}}
	cfg := &caddy.Config{AppsRaw: caddy.ModuleMap{"layer4": caddyconfig.JSON(app, &p.warnings)}}
	out, err := json.Marshal(cfg)
	return out, p.warnings, err
}

// The keys of a godist.conf, as godist's Go struct named them.
const (
	confHost    = "Host"
	confServers = "Servers"
)

// confExample is how a godist.conf looks, for error messages.
const confExample = `{"Host": "localhost:8080", "Servers": ["localhost:4000", "localhost:4001"]}`

// confParser reads a godist.conf, keeping the line of each key so that
// errors and warnings can point at it.
type confParser struct {
	file     string
	body     []byte
	warnings []caddyconfig.Warning
}

// confValue is one key of the top-level object and its value.
type confValue struct {
	key   string // as written in the file
	line  int
	start int64 // offset of the value in the file
	raw   json.RawMessage
}

func (p *confParser) parse() (godistConf, error) {
	var conf godistConf
	if len(bytes.TrimSpace(p.body)) == 0 {
		return conf, fmt.Errorf("%s: empty; a godist.conf looks like %s", p.file, confExample)
	}
	// Check the whole file first, so that the walk below meets no syntax
	// error and a syntax error gets its exact position.
	if err := json.Unmarshal(p.body, new(json.RawMessage)); err != nil {
		if syntaxErr, ok := errors.AsType[*json.SyntaxError](err); ok {
			return conf, fmt.Errorf("%s: invalid JSON: %v", p.position(syntaxErr.Offset-1), err)
		}
		return conf, fmt.Errorf("%s: invalid JSON: %v", p.file, err)
	}

	dec := json.NewDecoder(bytes.NewReader(p.body))
	if tok, _ := dec.Token(); tok != json.Delim('{') {
		return conf, fmt.Errorf("%s: must be a JSON object like %s", p.file, confExample)
	}
	var host, servers *confValue
	for dec.More() {
		tok, _ := dec.Token()
		keyEnd := dec.InputOffset()
		v := &confValue{key: tok.(string), line: p.line(keyEnd), start: keyEnd + p.skipSeparators(keyEnd)}
		_ = dec.Decode(&v.raw)
		switch {
		case strings.EqualFold(v.key, confHost):
			p.warnIfRepeated(host, v)
			host = v
		case strings.EqualFold(v.key, confServers):
			p.warnIfRepeated(servers, v)
			servers = v
		default:
			p.warnings = append(p.warnings, caddyconfig.Warning{
				File:      p.file,
				Line:      v.line,
				Directive: v.key,
				Message:   fmt.Sprintf("unknown key %q, ignored: a godist.conf has only %s and %s", v.key, confHost, confServers),
			})
		}
	}

	var err error
	if conf.Host, err = p.host(host); err != nil {
		return conf, err
	}
	if conf.Servers, err = p.servers(servers); err != nil {
		return conf, err
	}
	return conf, nil
}

func (p *confParser) warnIfRepeated(prev, v *confValue) {
	if prev == nil {
		return
	}
	p.warnings = append(p.warnings, caddyconfig.Warning{
		File:      p.file,
		Line:      v.line,
		Directive: v.key,
		Message:   fmt.Sprintf("%q repeats %q of line %d; the last one counts, as in godist", v.key, prev.key, prev.line),
	})
}

// host checks the value of Host: a TCP address with one port.
func (p *confParser) host(v *confValue) (string, error) {
	if v == nil {
		return "", fmt.Errorf("%s: %s: missing; name the address to listen on, like %s", p.file, confHost, confExample)
	}
	var host string
	if err := stringValue(v.raw, &host); err != nil {
		return "", fmt.Errorf("%s: %s: %v", p.position(v.start), v.key, err)
	}
	if host == "" {
		return "", fmt.Errorf("%s: %s: empty; name the address to listen on, like \"localhost:8080\" or \":8080\"", p.position(v.start), v.key)
	}
	if err := checkListenAddress(host); err != nil {
		return "", fmt.Errorf("%s: %s %q: %v", p.position(v.start), v.key, host, err)
	}
	return host, nil
}

// checkListenAddress accepts what godist could listen on: a TCP address
// with one port, in Caddy's network address syntax.
func checkListenAddress(host string) error {
	na, err := caddy.ParseNetworkAddressWithDefaults(host, "", 0)
	if err != nil {
		return fmt.Errorf("invalid listen address: %v", err)
	}
	switch na.Network {
	case "", "tcp", "tcp4", "tcp6":
	default:
		return fmt.Errorf("invalid listen address: network %q: godist listens on TCP (tcp, tcp4 or tcp6)", na.Network)
	}
	if na.StartPort == 0 {
		if strings.Contains(na.Host, ":") {
			return errors.New("invalid listen address: missing port (an IPv6 address goes in brackets: \"[::1]:8080\")")
		}
		return errors.New("invalid listen address: missing port")
	}
	if na.PortRangeSize() != 1 {
		return errors.New("invalid listen address: a port range; godist listens on one port")
	}
	return nil
}

// servers checks the value of Servers: a list of at least one dial
// address, each valid for the godist handler and listed once.
func (p *confParser) servers(v *confValue) ([]string, error) {
	if v == nil {
		return nil, fmt.Errorf("%s: %s: missing; list the servers to balance over, like %s", p.file, confServers, confExample)
	}
	if v.raw[0] != '[' {
		return nil, fmt.Errorf("%s: %s: must be a list of strings, not %s", p.position(v.start), v.key, jsonKind(v.raw))
	}
	dec := json.NewDecoder(bytes.NewReader(v.raw))
	_, _ = dec.Token() // [
	var servers []string
	seen := make(map[string]int)
	for i := 0; dec.More(); i++ {
		prevEnd := v.start + dec.InputOffset()
		at := p.position(prevEnd + p.skipSeparators(prevEnd))
		var raw json.RawMessage
		_ = dec.Decode(&raw)
		var s string
		if err := stringValue(raw, &s); err != nil {
			return nil, fmt.Errorf("%s: %s[%d]: %v", at, v.key, i, err)
		}
		if _, _, err := parseDial(s); err != nil {
			return nil, fmt.Errorf("%s: %s[%d] %q: %v", at, v.key, i, s, err)
		}
		if j, dup := seen[s]; dup {
			return nil, fmt.Errorf("%s: %s[%d] %q: listed twice (also %s[%d])", at, v.key, i, s, v.key, j)
		}
		seen[s] = i
		servers = append(servers, s)
	}
	if len(servers) == 0 {
		return nil, fmt.Errorf("%s: %s: empty; list at least one server, like %s", p.position(v.start), v.key, confExample)
	}
	return servers, nil
}

// stringValue decodes a JSON string, and says what the value is if it is
// not one.
func stringValue(raw json.RawMessage, dst *string) error {
	if raw[0] != '"' {
		return fmt.Errorf("must be a string, not %s", jsonKind(raw))
	}
	return json.Unmarshal(raw, dst)
}

// jsonKind names the kind of a valid JSON value.
func jsonKind(raw json.RawMessage) string {
	switch raw[0] {
	case '{':
		return "an object"
	case '[':
		return "a list"
	case '"':
		return "a string"
	case 't', 'f':
		return "a boolean"
	case 'n':
		return "null"
	}
	return "a number"
}

// skipSeparators counts the white space, colons and commas at off: what
// lies between the end of one token and the start of the next value.
func (p *confParser) skipSeparators(off int64) int64 {
	n := int64(0)
	for off+n < int64(len(p.body)) && strings.IndexByte(" \t\r\n:,", p.body[off+n]) >= 0 {
		n++
	}
	return n
}

// line returns the 1-based line of the byte at off.
func (p *confParser) line(off int64) int {
	off = min(max(off, 0), int64(len(p.body)))
	return 1 + bytes.Count(p.body[:off], []byte{'\n'})
}

// position returns "file:line:column" for the byte at off; the column
// counts bytes from 1.
func (p *confParser) position(off int64) string {
	off = min(max(off, 0), int64(len(p.body)))
	lineStart := int64(bytes.LastIndexByte(p.body[:off], '\n') + 1)
	return fmt.Sprintf("%s:%d:%d", p.file, p.line(off), off-lineStart+1)
}

// Interface guard
var _ caddyconfig.Adapter = Adapter{}
