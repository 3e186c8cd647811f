// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"encoding/json"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"

	"github.com/mholt/caddy-l4/layer4"
)

func init() {
	caddy.RegisterModule(&opStateProbe{})
}

// opStateProbe is a layer4 handler, for these tests only, that acquires
// the operator state store of its name from the config's storage, as the
// godist handler does once it is wired to it.
type opStateProbe struct {
	Name string `json:"name,omitempty"`
}

// probedStore is the store the last provisioned probe acquired.
var probedStore atomic.Pointer[opStore]

func (*opStateProbe) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "layer4.handlers.godist_test_opstate_probe",
		New: func() caddy.Module { return new(opStateProbe) },
	}
}

func (p *opStateProbe) Provision(ctx caddy.Context) error {
	s, err := acquireOpStore(ctx, ctx.Storage(), handlerName(p.Name), testPollInterval)
	if err != nil {
		return err
	}
	probedStore.Store(s)
	return nil
}

func (*opStateProbe) Handle(cx *layer4.Connection, _ layer4.Handler) error {
	return cx.Close()
}

// probeConfig is a Caddy config whose storage is the file system at root,
// with one probe named name.
func probeConfig(t *testing.T, admin, listen, root, name string) []byte {
	t.Helper()
	cfg := map[string]any{
		"admin":   map[string]any{"listen": admin, "config": map[string]any{"persist": false}},
		"logging": map[string]any{"logs": map[string]any{"default": map[string]any{"writer": testLogWriter(), "level": "INFO"}}},
		"storage": map[string]any{"module": "file_system", "root": root},
		"apps": map[string]any{"layer4": map[string]any{"servers": map[string]any{"probe": map[string]any{
			"listen": []string{listen},
			"routes": []any{map[string]any{"handle": []any{map[string]any{"handler": "godist_test_opstate_probe", "name": name}}}},
		}}}},
	}
	b, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestOpStoreInCaddy runs the store in a real Caddy with the storage
// global option: it reads the configured folder, a reload hands the same
// store to the new config with its states in force, another storage gets
// a store of its own, and the store stops with the last config using it.
func TestOpStoreInCaddy(t *testing.T) {
	root, otherRoot := t.TempDir(), t.TempDir()
	admin, listen := freeAddr(t), freeAddr(t)
	if err := caddy.Load(probeConfig(t, admin, listen, root, "db"), true); err != nil {
		t.Fatalf("loading: %v", err)
	}
	t.Cleanup(func() { stopCaddy(t) })
	first := probedStore.Load()
	if fs, ok := first.current().stor.(*certmagic.FileStorage); !ok || fs.Path != root {
		t.Fatalf("the store uses %#v, want the configured folder %s", first.current().stor, root)
	}

	// another instance on the same folder drains an upstream
	other, _ := newTestOpStore(t, "db", &certmagic.FileStorage{Path: root})
	mustSet(t, other, `{"upstream": "10.0.0.1:5432", "state": "drain"}`)
	waitState(t, first, "10.0.0.1:5432", opDrain, 5*time.Second)

	// a reload: the same store, the drain in force without a poll
	if err := caddy.Load(probeConfig(t, admin, listen, root, "db"), true); err != nil {
		t.Fatalf("reloading: %v", err)
	}
	if again := probedStore.Load(); again != first {
		t.Fatal("a reload with the same storage and name made a new store")
	}
	if r, _ := first.snapshot().lookup("db", "10.0.0.1:5432"); r.State != opDrain {
		t.Errorf("after a reload: %s, want drain", r.State)
	}
	select {
	case <-first.done:
		t.Fatal("the store stopped with the old config, though the new one uses it")
	case <-time.After(3 * testPollInterval):
	}

	// another storage: another store, without the first folder's states;
	// the first store ends with the config that used it
	if err := caddy.Load(probeConfig(t, admin, listen, otherRoot, "db"), true); err != nil {
		t.Fatalf("reloading: %v", err)
	}
	moved := probedStore.Load()
	if moved == first {
		t.Fatal("two storages share a store")
	}
	if n := moved.snapshot().len(); n != 0 {
		t.Errorf("a store of an empty storage has %d states", n)
	}
	select {
	case <-first.done:
	case <-time.After(10 * time.Second):
		t.Fatal("the store of a storage no config uses still polls")
	}
}
