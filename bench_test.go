// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

import (
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"
)

// Benchmarks of the whole path through Caddy (the engine's own copy loop
// is benchmarked in internal/pipe). They measure; they assert nothing
// about time. The load benchmark in bench/ compares godist with other
// proxies in processes of their own; these are for profiling and for
// comparing two versions of this package:
//
//	go test -run XXX -bench . -benchmem
//	go test -run XXX -bench CaddyBulk -cpuprofile cpu.out

// benchChunk is what one benchmark iteration moves: 1 MiB, written 256 KiB
// at a time as the load benchmark does.
const (
	benchChunk = 1 << 20
	benchWrite = 256 << 10
)

// writeChunks writes n chunks of benchChunk bytes to c, then half-closes.
func writeChunks(c *net.TCPConn, n int, errc chan<- error) {
	buf := make([]byte, benchWrite)
	var err error
	for i := 0; i < n*(benchChunk/benchWrite) && err == nil; i++ {
		_, err = c.Write(buf)
	}
	if err == nil {
		err = c.CloseWrite()
	}
	errc <- err
}

// discardAll reads c until EOF and reports how many bytes came.
func discardAll(c net.Conn, counts chan<- int64) {
	buf := make([]byte, benchWrite)
	var total int64
	for {
		n, err := c.Read(buf)
		total += int64(n)
		if err != nil {
			counts <- total
			return
		}
	}
}

// startBenchCaddy runs Caddy in this process with one godist route and
// logs at WARN: the tests' configs log at DEBUG, and godist's per-connection
// debug line would be part of what is measured.
func startBenchCaddy(b *testing.B, upstream string) *testCaddy {
	b.Helper()
	return startCaddyConfig(b, caddyConfig{LogLevel: "WARN", Routes: []map[string]any{
		godistRoute(map[string]any{"upstreams": upstreamsJSON(upstream)}),
	}})
}

// BenchmarkCaddyConnect measures one whole connection through Caddy and
// godist: connect, 64 bytes to an echo backend and back, close. Allocations
// are the whole process's: client, Caddy and backend.
func BenchmarkCaddyConnect(b *testing.B) {
	be := startBackend(b, "echo", "", echo)
	c := startBenchCaddy(b, be.addr)
	msg := make([]byte, 64)
	reply := make([]byte, 64)
	b.ReportAllocs()
	for b.Loop() {
		conn := c.dial(b)
		if _, err := conn.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(conn, reply); err != nil {
			b.Fatal(err)
		}
		conn.Close()
	}
}

// sinkCount reads until EOF and sends the byte count on the channel the
// benchmark gave it.
func sinkCount(counts chan<- int64) func(*backend, net.Conn) {
	return func(_ *backend, c net.Conn) {
		discardAll(c, counts)
	}
}

// sourceN reads an 8-byte count and sends that many bytes, then closes.
func sourceN(_ *backend, c net.Conn) {
	var req [8]byte
	if _, err := io.ReadFull(c, req[:]); err != nil {
		return
	}
	buf := make([]byte, benchWrite)
	for left := int64(binary.BigEndian.Uint64(req[:])); left > 0; {
		n, err := c.Write(buf[:min(left, int64(len(buf)))])
		if err != nil {
			return
		}
		left -= int64(n)
	}
}

// BenchmarkCaddyBulk moves bytes over one connection through Caddy and
// godist, client to backend (up) and backend to client (down).
func BenchmarkCaddyBulk(b *testing.B) {
	b.Run("up", func(b *testing.B) {
		counts := make(chan int64, 1)
		be := startBackend(b, "sink", "", sinkCount(counts))
		tc := startBenchCaddy(b, be.addr)
		b.SetBytes(benchChunk)
		b.ReportAllocs()
		b.ResetTimer()
		c := tc.dial(b)
		defer c.Close()
		errc := make(chan error, 1)
		go writeChunks(c, b.N, errc)
		var got int64
		select {
		case got = <-counts:
		case <-time.After(testTimeout):
			b.Fatal("the sink never saw EOF")
		}
		b.StopTimer()
		if err := <-errc; err != nil {
			b.Fatalf("writer: %v", err)
		}
		if want := int64(b.N) * benchChunk; got != want {
			b.Fatalf("sink got %d bytes, want %d", got, want)
		}
	})
	b.Run("down", func(b *testing.B) {
		be := startBackend(b, "source", "", sourceN)
		tc := startBenchCaddy(b, be.addr)
		b.SetBytes(benchChunk)
		b.ReportAllocs()
		b.ResetTimer()
		c := tc.dial(b)
		defer c.Close()
		var req [8]byte
		want := int64(b.N) * benchChunk
		binary.BigEndian.PutUint64(req[:], uint64(want))
		if _, err := c.Write(req[:]); err != nil {
			b.Fatal(err)
		}
		counts := make(chan int64, 1)
		discardAll(c, counts)
		b.StopTimer()
		if got := <-counts; got != want {
			b.Fatalf("client got %d bytes, want %d", got, want)
		}
	})
}
