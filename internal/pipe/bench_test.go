// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package pipe

import (
	"errors"
	"net"
	"testing"
	"time"
)

// Benchmarks of the engine's ways of moving bytes. They measure; they
// assert nothing about time:
//
//	go test -run XXX -bench . -benchmem ./internal/pipe
//	go test -run XXX -bench Stream/splice -cpuprofile cpu.out ./internal/pipe

// benchChunk is what one iteration moves: 1 MiB, written 256 KiB at a
// time as the load benchmark does.
const (
	benchChunk = 1 << 20
	benchWrite = 256 << 10
)

// wrappedConn hides the socket under it, as an unknown wrapper (a TLS or
// metrics wrapper, say) does: the engine must go through its Read or Write.
type wrappedConn struct{ net.Conn }

// BenchmarkStream moves bulk bytes through a pipe, upward, in each of the
// engine's ways for a stream: socket to socket (which turns to splice once
// reads fill the small buffer), a buffer taken once the socket is readable
// when only the destination is wrapped, and a held buffer when the source
// is wrapped.
func BenchmarkStream(b *testing.B) {
	for _, bc := range []struct {
		name             string
		wrapSrc, wrapDst bool
	}{
		{name: "splice"},
		{name: "readable", wrapDst: true},
		{name: "buffered", wrapSrc: true},
	} {
		b.Run(bc.name, func(b *testing.B) {
			writer, srcConn := tcpPair(b)
			dstConn, reader := tcpPair(b)
			defer func() {
				for _, c := range []*net.TCPConn{writer, srcConn, dstConn, reader} {
					c.Close()
				}
			}()
			var src, dst net.Conn = srcConn, dstConn
			if bc.wrapSrc {
				src = wrappedConn{srcConn}
			}
			if bc.wrapDst {
				dst = wrappedConn{dstConn}
			}
			p, ev := new(Pipe), &upwardDone{done: make(chan struct{})}
			p.Init(End{Conn: src}, End{Conn: dst}, Options{}, ev)
			errc := make(chan error, 1)
			counts := make(chan int64, 1)
			b.SetBytes(benchChunk)
			b.ReportAllocs()
			b.ResetTimer()

			go writeChunks(writer, b.N, errc)
			go discardAll(reader, counts)
			done := make(chan struct{})
			go func() { p.Run(); close(done) }()
			<-ev.done
			b.StopTimer()
			_ = dstConn.CloseWrite() // where the pipe could not pass the EOF on (a wrapped destination)
			got := <-counts
			reader.Close() // ends the downward direction
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				b.Fatal("the pipe did not end")
			}
			if werr := <-errc; werr != nil {
				b.Fatalf("writer: %v", werr)
			}
			n, err := ev.n, ev.err
			if want := int64(b.N) * benchChunk; n != want || got != want || err != nil {
				b.Fatalf("moved %d bytes (%v), reader got %d, want %d", n, err, got, want)
			}
		})
	}
}

// upwardDone is an Events that signals the end of the upward direction.
type upwardDone struct {
	n    int64
	err  error
	done chan struct{}
}

func (u *upwardDone) FlowEnded(d Direction, n int64, err error) {
	if d == Upward {
		u.n, u.err = n, err
		close(u.done)
	}
}

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
			if !errors.Is(err, net.ErrClosed) {
				counts <- total
			}
			return
		}
	}
}
