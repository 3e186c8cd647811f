// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

package godist

// An intrusive doubly linked list: the links live in the elements, so that
// adding and removing one, which the connection path does, allocates
// nothing. It does no locking: each list is guarded by its owner's lock.

// links are an element's place in one list.
type links[T any] struct {
	prev, next *T
	listed     bool
}

// linked is a pointer to an element that has links for a list.
type linked[T any] interface {
	*T
	links() *links[T]
}

type intrusiveList[T any, P linked[T]] struct {
	head *T
	n    int
}

// push puts e at the front, unless it is listed already.
func (l *intrusiveList[T, P]) push(e P) {
	el := e.links()
	if el.listed {
		return
	}
	el.prev, el.next, el.listed = nil, l.head, true
	if l.head != nil {
		P(l.head).links().prev = (*T)(e)
	}
	l.head = (*T)(e)
	l.n++
}

// remove takes e out, if it is listed.
func (l *intrusiveList[T, P]) remove(e P) {
	el := e.links()
	if !el.listed {
		return
	}
	if el.prev != nil {
		P(el.prev).links().next = el.next
	} else {
		l.head = el.next
	}
	if el.next != nil {
		P(el.next).links().prev = el.prev
	}
	*el = links[T]{}
	l.n--
}

// each calls f for every element, front to back.
func (l *intrusiveList[T, P]) each(f func(P)) {
	for e := l.head; e != nil; e = P(e).links().next {
		f(P(e))
	}
}
