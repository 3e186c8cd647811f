// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

// Package ilist is an intrusive doubly linked list: the links live in the
// elements, so that adding and removing one, which the connection path
// does for every connection, allocates nothing. It does no locking: each
// list is guarded by its owner's lock, and an element's links belong to
// the list it is in.
package ilist

// Links are an element's place in one list. The zero value is an element
// in no list.
type Links[T any] struct {
	prev, next *T
	listed     bool
}

// Element is a pointer to a type that has links for a list.
type Element[T any] interface {
	*T
	Links() *Links[T]
}

// List is a list of elements of type T, front to back. The zero value is
// an empty list.
type List[T any, P Element[T]] struct {
	head *T
	n    int
}

// Len returns the number of elements listed.
func (l *List[T, P]) Len() int { return l.n }

// Push puts e at the front, unless it is listed already.
func (l *List[T, P]) Push(e P) {
	el := e.Links()
	if el.listed {
		return
	}
	el.prev, el.next, el.listed = nil, l.head, true
	if l.head != nil {
		P(l.head).Links().prev = (*T)(e)
	}
	l.head = (*T)(e)
	l.n++
}

// Remove takes e out, if it is listed.
func (l *List[T, P]) Remove(e P) {
	el := e.Links()
	if !el.listed {
		return
	}
	if el.prev != nil {
		P(el.prev).Links().next = el.next
	} else {
		l.head = el.next
	}
	if el.next != nil {
		P(el.next).Links().prev = el.prev
	}
	*el = Links[T]{}
	l.n--
}

// Each calls f for every element, front to back. f must not change the
// list.
func (l *List[T, P]) Each(f func(P)) {
	for e := l.head; e != nil; e = P(e).Links().next {
		f(P(e))
	}
}
