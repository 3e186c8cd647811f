// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"unsafe"
)

// This file reads what the benchmark measures about processes from /proc,
// and sets CPU affinity. It is Linux-only, like the benchmark.

// clockTicks is USER_HZ, the unit of utime and stime in /proc/<pid>/stat.
// It is 100 on every Linux architecture Go supports.
const clockTicks = 100

// procStat is the part of /proc/<pid>/stat the benchmark uses.
type procStat struct {
	ppid         int
	utime, stime uint64 // in clock ticks
}

// parseProcStat parses the contents of /proc/<pid>/stat. The command name,
// the second field, is in parentheses and may hold spaces and parentheses
// itself, so fields are counted from the last ')'.
func parseProcStat(b []byte) (procStat, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return procStat{}, errors.New("no ')' in stat")
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(f) < 13 {
		return procStat{}, fmt.Errorf("stat has %d fields after the name", len(f))
	}
	var st procStat
	var err error
	if st.ppid, err = strconv.Atoi(f[1]); err != nil {
		return procStat{}, fmt.Errorf("ppid: %w", err)
	}
	if st.utime, err = strconv.ParseUint(f[11], 10, 64); err != nil {
		return procStat{}, fmt.Errorf("utime: %w", err)
	}
	if st.stime, err = strconv.ParseUint(f[12], 10, 64); err != nil {
		return procStat{}, fmt.Errorf("stime: %w", err)
	}
	return st, nil
}

func readProcStat(pid int) (procStat, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return procStat{}, err
	}
	return parseProcStat(b)
}

// processTree returns pid and all its descendants (nginx's worker, say).
func processTree(pid int) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return []int{pid}
	}
	children := make(map[int][]int)
	for _, e := range entries {
		p, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := readProcStat(p)
		if err != nil {
			continue // exited meanwhile
		}
		children[st.ppid] = append(children[st.ppid], p)
	}
	tree := []int{pid}
	for i := 0; i < len(tree) && i < 10000; i++ {
		tree = append(tree, children[tree[i]]...)
	}
	return tree
}

// treeCPU returns the CPU time, user plus system, that pid and its
// descendants have used, in seconds.
func treeCPU(pid int) (float64, error) {
	var ticks uint64
	for i, p := range processTree(pid) {
		st, err := readProcStat(p)
		if err != nil {
			if i == 0 {
				return 0, fmt.Errorf("process %d: %w", pid, err)
			}
			continue
		}
		ticks += st.utime + st.stime
	}
	return float64(ticks) / clockTicks, nil
}

// selfCPU returns the CPU time this process has used, in seconds.
func selfCPU() float64 {
	st, err := readProcStat(os.Getpid())
	if err != nil {
		return 0
	}
	return float64(st.utime+st.stime) / clockTicks
}

// parseStatusKB returns the value in kB of a "Key:   123 kB" line of
// /proc/<pid>/status.
func parseStatusKB(b []byte, key string) (int64, bool) {
	for line := range strings.SplitSeq(string(b), "\n") {
		rest, ok := strings.CutPrefix(line, key+":")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			return 0, false
		}
		v, err := strconv.ParseInt(f[0], 10, 64)
		return v, err == nil
	}
	return 0, false
}

// treeMemory returns the resident set size in bytes and the number of
// open descriptors of pid and its descendants.
func treeMemory(pid int) (rss int64, fds int, err error) {
	for i, p := range processTree(pid) {
		b, rerr := os.ReadFile(fmt.Sprintf("/proc/%d/status", p))
		if rerr != nil {
			if i == 0 {
				return 0, 0, fmt.Errorf("process %d: %w", pid, rerr)
			}
			continue
		}
		kb, _ := parseStatusKB(b, "VmRSS")
		rss += kb << 10
		entries, derr := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p))
		if derr == nil {
			fds += len(entries)
		}
	}
	return rss, fds, nil
}

// fdKinds counts the open descriptors of pid and its descendants by kind:
// what each links to in /proc/<pid>/fd, "socket", "pipe", an anon_inode's
// name ("eventpoll", "eventfd", ...), or "file".
func fdKinds(pid int) (map[string]int, error) {
	kinds := map[string]int{}
	for i, p := range processTree(pid) {
		dir := fmt.Sprintf("/proc/%d/fd", p)
		entries, err := os.ReadDir(dir)
		if err != nil {
			if i == 0 {
				return nil, fmt.Errorf("process %d: %w", pid, err)
			}
			continue
		}
		for _, e := range entries {
			target, err := os.Readlink(filepath.Join(dir, e.Name()))
			if err != nil {
				continue // closed meanwhile
			}
			kinds[fdKind(target)]++
		}
	}
	return kinds, nil
}

// fdKind names the kind of a descriptor from its link in /proc/<pid>/fd:
// "socket:[123]" → socket, "pipe:[123]" → pipe, "anon_inode:[eventpoll]"
// → eventpoll, "anon_inode:inotify" → inotify, a path → file.
func fdKind(target string) string {
	if name, ok := strings.CutPrefix(target, "anon_inode:"); ok {
		return strings.Trim(name, "[]")
	}
	if kind, _, ok := strings.Cut(target, ":["); ok && !strings.HasPrefix(target, "/") {
		return kind
	}
	return "file"
}

// cpuTimes is one CPU's line of /proc/stat, in clock ticks.
type cpuTimes struct {
	task  uint64 // user, nice and system: time charged to processes
	busy  uint64 // task plus interrupts and steal
	total uint64
}

// readCPUTimes returns the busy and total ticks of each CPU.
func readCPUTimes() map[int]cpuTimes {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return nil
	}
	out := make(map[int]cpuTimes)
	for line := range strings.SplitSeq(string(b), "\n") {
		if !strings.HasPrefix(line, "cpu") || strings.HasPrefix(line, "cpu ") {
			continue
		}
		f := strings.Fields(line)
		n, err := strconv.Atoi(strings.TrimPrefix(f[0], "cpu"))
		if err != nil {
			continue
		}
		var t cpuTimes
		for i, s := range f[1:] {
			v, _ := strconv.ParseUint(s, 10, 64)
			if i >= 7 {
				break // guest time is already counted in user time
			}
			t.total += v
			if i != 3 && i != 4 { // idle, iowait
				t.busy += v
			}
			if i <= 2 {
				t.task += v
			}
		}
		out[n] = t
	}
	return out
}

// cpuSet is a CPU affinity mask of up to 1024 CPUs, as the kernel takes it.
type cpuSet [1024 / 64]uint64

func (s *cpuSet) set(cpu int)      { s[cpu/64] |= 1 << (cpu % 64) }
func (s *cpuSet) has(cpu int) bool { return s[cpu/64]&(1<<(cpu%64)) != 0 }

// getAffinity returns the CPUs the calling thread may run on.
func getAffinity() ([]int, error) {
	var s cpuSet
	_, _, errno := syscall.RawSyscall(syscall.SYS_SCHED_GETAFFINITY, 0, unsafe.Sizeof(s), uintptr(unsafe.Pointer(&s)))
	if errno != 0 {
		return nil, errno
	}
	var cpus []int
	for c := range len(s) * 64 {
		if s.has(c) {
			cpus = append(cpus, c)
		}
	}
	return cpus, nil
}

// setThreadAffinity pins the thread tid (0: the calling thread) to cpu.
func setThreadAffinity(tid, cpu int) error {
	var s cpuSet
	s.set(cpu)
	_, _, errno := syscall.RawSyscall(syscall.SYS_SCHED_SETAFFINITY, uintptr(tid), unsafe.Sizeof(s), uintptr(unsafe.Pointer(&s)))
	if errno != 0 {
		return errno
	}
	return nil
}

// pinSelf pins every thread of this process to cpu. Threads started later
// inherit the mask of the thread that starts them, which is pinned too.
func pinSelf(cpu int) error {
	// Twice: a thread may start while the first pass runs.
	for range 2 {
		tasks, err := os.ReadDir("/proc/self/task")
		if err != nil {
			return err
		}
		for _, t := range tasks {
			tid, err := strconv.Atoi(t.Name())
			if err != nil {
				continue
			}
			if err := setThreadAffinity(tid, cpu); err != nil && !errors.Is(err, syscall.ESRCH) {
				return fmt.Errorf("thread %d: %w", tid, err)
			}
		}
	}
	return nil
}

// withThreadOnCPU runs f on an OS thread pinned to cpu, and then pins the
// thread back to back. A process that f starts inherits cpu: this is how
// the proxies are pinned, with no taskset needed.
func withThreadOnCPU(cpu, back int, f func() error) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := setThreadAffinity(0, cpu); err != nil {
		return fmt.Errorf("pinning to CPU %d: %w", cpu, err)
	}
	ferr := f()
	if err := setThreadAffinity(0, back); err != nil {
		return errors.Join(ferr, fmt.Errorf("pinning back to CPU %d: %w", back, err))
	}
	return ferr
}

// allowedCPUs returns the Cpus_allowed_list of a process, for the record.
func allowedCPUs(pid int) string {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "status"))
	if err != nil {
		return "?"
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "Cpus_allowed_list:"); ok {
			return strings.TrimSpace(rest)
		}
	}
	return "?"
}

// raiseFileLimit sets the soft limit on open descriptors to the hard one.
// Setting it explicitly, rather than relying on the Go runtime's own raise,
// makes the proxies started from here inherit it too.
func raiseFileLimit() (uint64, error) {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, err
	}
	lim.Cur = lim.Max
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0, err
	}
	return lim.Cur, nil
}

// findKsoftirqd returns the pid of each CPU's ksoftirqd/N kernel thread,
// which runs softirq work (network receive, among others) deferred from
// the processes on CPU N.
func findKsoftirqd() map[int]int {
	out := map[int]int{}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return out
	}
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "comm"))
		if err != nil {
			continue
		}
		if n, ok := strings.CutPrefix(strings.TrimSpace(string(b)), "ksoftirqd/"); ok {
			if cpu, err := strconv.Atoi(n); err == nil {
				out[cpu] = pid
			}
		}
	}
	return out
}
