// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package main

import (
	"fmt"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"
)

// Every process the benchmark starts is a child in a process group of its
// own (nginx's worker joins its master's), registered here, so that one
// call ends them all: at the end of a run, on SIGINT or SIGTERM, and on a
// fatal error. Pdeathsig ends a child whose parent dies without cleaning
// up, a kill -9 say.

// child is a process the benchmark started.
type child struct {
	name string
	cmd  *exec.Cmd
	done chan struct{} // closed when the process has been waited for
	err  error         // its exit status, once done is closed
}

var children struct {
	mu  sync.Mutex
	set map[*child]struct{}
}

// startChild starts argv with its output appended to logPath, pinned to
// cpu when cpu >= 0 (and pinned back to back afterwards).
func startChild(name string, argv, env []string, dir, logPath string, cpu, back int) (*child, error) {
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer logf.Close() // the child has its own copy

	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Dir = dir
	cmd.Env = env
	cmd.Stdout = logf
	cmd.Stderr = logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}

	start := cmd.Start
	if cpu >= 0 {
		start = func() error { return withThreadOnCPU(cpu, back, cmd.Start) }
	}
	if err := start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", name, err)
	}
	c := &child{name: name, cmd: cmd, done: make(chan struct{})}
	go func() {
		c.err = cmd.Wait()
		close(c.done)
	}()
	children.mu.Lock()
	if children.set == nil {
		children.set = make(map[*child]struct{})
	}
	children.set[c] = struct{}{}
	children.mu.Unlock()
	return c, nil
}

func (c *child) pid() int { return c.cmd.Process.Pid }

// exited reports whether the process has ended.
func (c *child) exited() bool {
	select {
	case <-c.done:
		return true
	default:
		return false
	}
}

// stop ends the child's process group: SIGTERM, then SIGKILL after 3 s.
func (c *child) stop() {
	pgid := c.pid()
	_ = syscall.Kill(-pgid, syscall.SIGTERM)
	select {
	case <-c.done:
	case <-time.After(3 * time.Second):
	}
	// The group may outlive its leader (a worker whose master is gone).
	_ = syscall.Kill(-pgid, syscall.SIGKILL)
	select {
	case <-c.done:
	case <-time.After(3 * time.Second):
	}
	children.mu.Lock()
	delete(children.set, c)
	children.mu.Unlock()
}

// stopAllChildren stops every child still registered.
func stopAllChildren() {
	children.mu.Lock()
	list := make([]*child, 0, len(children.set))
	for c := range children.set {
		list = append(list, c)
	}
	children.mu.Unlock()
	var wg sync.WaitGroup
	for _, c := range list {
		wg.Go(c.stop)
	}
	wg.Wait()
}
