// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package ilist

import (
	"slices"
	"testing"
)

type item struct {
	v  int
	in Links[item]
}

func (i *item) Links() *Links[item] { return &i.in }

func contents(l *List[item, *item]) []int {
	var out []int
	l.Each(func(i *item) { out = append(out, i.v) })
	return out
}

func TestList(t *testing.T) {
	var l List[item, *item]
	items := make([]*item, 5)
	for i := range items {
		items[i] = &item{v: i}
		l.Push(items[i])
	}
	l.Push(items[2]) // already listed: no change
	if got, want := contents(&l), []int{4, 3, 2, 1, 0}; !slices.Equal(got, want) || l.Len() != 5 {
		t.Fatalf("after pushes: %v (len %d), want %v", got, l.Len(), want)
	}
	for _, i := range []int{2, 4, 0, 2} { // middle, front, back, and one not listed
		l.Remove(items[i])
	}
	if got, want := contents(&l), []int{3, 1}; !slices.Equal(got, want) || l.Len() != 2 {
		t.Fatalf("after removes: %v (len %d), want %v", got, l.Len(), want)
	}
	l.Push(items[4])
	if got, want := contents(&l), []int{4, 3, 1}; !slices.Equal(got, want) {
		t.Fatalf("a removed element pushed again: %v, want %v", got, want)
	}
}

func TestListAllocatesNothing(t *testing.T) {
	var l List[item, *item]
	it := &item{}
	if n := testing.AllocsPerRun(100, func() { l.Push(it); l.Remove(it) }); n != 0 {
		t.Fatalf("push and remove allocate %v times", n)
	}
}
