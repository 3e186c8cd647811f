// Copyright 2026 The caddy-godist Authors
// SPDX-License-Identifier: Apache-2.0

// The godist status page. It polls api/upstreams (the admin API's
// /godist/upstreams, served by the page's own handler) and draws what it
// says; api/pick answers the lookup box and api/plan the plan tool. Every
// piece of data goes into the DOM as text (textContent, attributes), never
// as markup, so a dial address cannot inject anything.
//
// It shows what it knows how to show, and every other field it is given as
// "name: value": fields that later versions add (a tier, a source, an
// operator's state and reason) appear without a change here.
'use strict';

(function () {
	const POLL_MS = 2000;
	const HISTORY_MS = 5 * 60 * 1000; // the chart's window
	const COLORS = 8; // classes c0..c7 in status.css

	const main = document.getElementById('handlers');
	const live = document.getElementById('live');
	const none = document.getElementById('none');
	const cards = new Map(); // handler key -> card state
	let clockSkew = 0; // server clock minus ours, from the Date header

	// ---- small helpers -------------------------------------------------

	function el(tag, cls, text) {
		const e = document.createElement(tag);
		if (cls) e.className = cls;
		if (text !== undefined && text !== null) e.textContent = String(text);
		return e;
	}
	function svgEl(tag, attrs) {
		const e = document.createElementNS('http://www.w3.org/2000/svg', tag);
		for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
		return e;
	}
	function clone(id) {
		return document.getElementById(id).content.firstElementChild.cloneNode(true);
	}
	function q(root, sel) { return root.querySelector(sel); }
	function clear(e) { while (e.firstChild) e.removeChild(e.firstChild); }

	const intFmt = new Intl.NumberFormat('en');
	function int(n) { return typeof n === 'number' ? intFmt.format(n) : '–'; }
	function pct(x, digits) {
		if (typeof x !== 'number' || !isFinite(x)) return '–';
		return (x * 100).toFixed(digits === undefined ? 1 : digits) + '%';
	}
	function bytes(n) {
		if (typeof n !== 'number') return '–';
		const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
		let i = 0;
		while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
		return (i === 0 ? String(n) : n.toFixed(n < 10 ? 1 : 0)) + ' ' + units[i];
	}
	function ago(iso) {
		const t = Date.parse(iso);
		if (isNaN(t)) return String(iso);
		const s = Math.round((Date.now() + clockSkew - t) / 1000);
		if (s < 0) return 'in ' + dur(-s);
		if (s < 1) return 'just now';
		return dur(s) + ' ago';
	}
	function dur(s) {
		if (s < 60) return s + ' s';
		if (s < 3600) return Math.floor(s / 60) + ' min' + (s % 60 ? ' ' + (s % 60) + ' s' : '');
		if (s < 86400) return Math.floor(s / 3600) + ' h ' + Math.floor((s % 3600) / 60) + ' min';
		return Math.floor(s / 86400) + ' d ' + Math.floor((s % 86400) / 3600) + ' h';
	}
	function timeEl(iso) {
		const t = el('time', null, ago(iso));
		t.dateTime = String(iso);
		t.title = String(iso);
		return t;
	}
	// forTime says how long a state has held: "for 3 min 2 s".
	function forTime(iso) {
		const t = el('time', null, 'for ' + dur(Math.max(0, Math.round((Date.now() + clockSkew - Date.parse(iso)) / 1000))));
		t.dateTime = String(iso);
		t.title = 'since ' + String(iso);
		return t;
	}
	// heldFor says how much longer failed dials hold an upstream down.
	function heldFor(iso) {
		const s = Math.round((Date.parse(iso) - Date.now() - clockSkew) / 1000);
		return s > 0 ? 'failed dials hold it down ' + dur(s) + ' more' : 'failed dials held it down until ' + iso;
	}
	const isoRe = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d/;
	function words(s) { return String(s).replace(/_/g, ' '); }
	function ordinal(n) {
		const s = ['th', 'st', 'nd', 'rd'], v = n % 100;
		return n + (s[(v - 20) % 10] || s[v] || s[0]);
	}

	// The fields this page draws itself; any other scalar field is shown
	// as a chip "name: value".
	const KNOWN = {
		handler: new Set(['handler', 'name', 'fingerprint', 'hash_key', 'connections', 'max_connections',
			'rejected_over_max_connections', 'rejected_over_descriptors', 'active_checks', 'fail_duration',
			'max_fails', 'upstreams']),
		upstream: new Set(['dial', 'weight', 'max_connections', 'health', 'active_connections', 'full', 'totals',
			'usable', 'why', 'reason', 'effective_weight', 'operator', 'slow_start']),
		health: new Set(['status', 'down_by', 'since', 'down_until', 'recent_failures', 'last_failed_dial',
			'last_check', 'last_check_error', 'why', 'reason']),
		totals: new Set(['connections', 'dial_failures', 'failovers', 'sent_bytes', 'received_bytes']),
	};
	function extras(obj, known, prefix, out) {
		if (!obj || typeof obj !== 'object') return out;
		for (const [k, v] of Object.entries(obj)) {
			if (known.has(k) || v === null || v === undefined || v === '') continue;
			const name = prefix + words(k);
			if (Array.isArray(v)) {
				if (v.length && v.every(x => typeof x !== 'object')) out.push([name, v.join(', ')]);
			} else if (typeof v === 'object') {
				extras(v, new Set(), name + ' ', out);
			} else {
				out.push([name, v]);
			}
		}
		return out;
	}
	function fillChips(ul, pairs) {
		clear(ul);
		for (const [k, v] of pairs) {
			const li = el('li', 'chip');
			li.append(el('span', 'k', k + ':'), ' ');
			if (typeof v === 'string' && isoRe.test(v)) li.append(timeEl(v));
			else li.append(el('span', 'v', typeof v === 'boolean' ? (v ? 'yes' : 'no') : v));
			ul.append(li);
		}
		ul.hidden = pairs.length === 0;
	}

	// ---- what the data means -------------------------------------------

	// usable says whether new connections may go to u: the handler's own
	// answer when it gives one, else its health and room.
	function usable(u) {
		if (typeof u.usable === 'boolean') return u.usable;
		return status(u) === 'up' && !u.full;
	}
	// status is the upstream's state: an operator's drain or maint first,
	// then its health.
	function status(u) {
		const op = u.operator || {};
		if (op.state === 'drain' || op.state === 'maint') return op.state;
		const h = u.health || {};
		return String(h.status || u.state || 'unknown');
	}
	// why says in words what the state comes from.
	function why(u) {
		const h = u.health || {};
		const parts = [];
		for (const o of [h, u]) {
			for (const k of ['why', 'reason']) if (o[k] && typeof o[k] !== 'object') parts.push(String(o[k]));
		}
		const op = u.operator;
		if (op && (op.state === 'drain' || op.state === 'maint')) {
			let s = (op.state === 'drain' ? 'drained' : 'in maintenance') + ' by an operator';
			if (op.reason) s += ': ' + op.reason;
			parts.push(s);
			if (typeof op.remaining_connections === 'number') {
				parts.push(int(op.remaining_connections) + ' connection' + (op.remaining_connections === 1 ? '' : 's') + ' remain');
			}
			if (op.deadline) parts.push('the rest closed at ' + op.deadline);
		}
		if (u.slow_start && typeof u.slow_start.factor === 'number') {
			parts.push('slow start: ' + pct(u.slow_start.factor, 0) + ' of its weight, all of it at ' + u.slow_start.until);
		}
		if (Array.isArray(h.down_by) && h.down_by.length) {
			parts.push('down by ' + h.down_by.map(words).join(' and '));
		}
		if (u.full) parts.push('at max_connections (' + int(u.max_connections) + ')');
		if (h.last_check_error) parts.push('last check: ' + h.last_check_error);
		if (h.recent_failures) parts.push(int(h.recent_failures) + ' recent failed dial' + (h.recent_failures === 1 ? '' : 's'));
		return parts;
	}
	const STATE_CLASS = { up: 'up', down: 'down', drain: 'drain', draining: 'drain', maint: 'maint', maintenance: 'maint' };

	// shares returns each upstream's share of the key space by weight (all
	// up) and now (only the usable ones take keys). Rendezvous hashing
	// gives each upstream a share in proportion to its weight, and the keys
	// of an unusable one spread over the others in proportion to theirs.
	// With tiers, the lowest tier with a usable upstream takes every key.
	function shares(ups) {
		const tier = u => (typeof u.tier === 'number' ? u.tier : 0);
		const weight = u => Math.max(1, Number(u.weight) || 1);
		// what the picker weighs it by now: with an operator's factor, or
		// during a slow start ramp
		const weightNow = u => (Number(u.effective_weight) > 0 ? Number(u.effective_weight) : weight(u));
		function among(pred, w) {
			const set = ups.filter(pred);
			if (!set.length) return null;
			const low = Math.min(...set.map(tier));
			const total = set.filter(u => tier(u) === low).reduce((s, u) => s + w(u), 0);
			return ups.map(u => (pred(u) && tier(u) === low ? w(u) / total : 0));
		}
		const byWeight = among(() => true, weight) || ups.map(() => 0);
		let now = among(usable, weightNow);
		const fallback = now === null;
		const held = u => u.operator && (u.operator.state === 'drain' || u.operator.state === 'maint');
		if (fallback) now = among(u => !u.full && !held(u), weightNow) || ups.map(() => 0);
		return { byWeight, now, fallback };
	}

	// ---- polling ---------------------------------------------------------

	async function poll() {
		try {
			const res = await fetch('api/upstreams', { cache: 'no-store', headers: { Accept: 'application/json' } });
			const body = await res.json().catch(() => null);
			if (!res.ok) throw new Error((body && body.error) || ('HTTP ' + res.status));
			const date = Date.parse(res.headers.get('Date') || '');
			if (!isNaN(date)) {
				const skew = date - Date.now();
				clockSkew = Math.abs(skew) > 2000 ? skew : 0;
			}
			render(Array.isArray(body) ? body : []);
			setLive('ok', 'Live · updated ' + new Date().toLocaleTimeString('en-GB'));
		} catch (err) {
			setLive('error', 'Cannot read api/upstreams: ' + err.message + ' · retrying every ' + POLL_MS / 1000 + ' s');
		}
		setTimeout(poll, POLL_MS);
	}
	function setLive(state, text) {
		live.dataset.state = state;
		live.textContent = text;
	}

	function handlerKey(h) { return h.handler + ' ' + h.fingerprint; }

	function render(handlers) {
		none.hidden = handlers.length > 0;
		const seen = new Set();
		for (const h of handlers) {
			const key = handlerKey(h);
			seen.add(key);
			let card = cards.get(key);
			if (!card) {
				card = newCard(h);
				cards.set(key, card);
			}
			main.append(card.root); // keeps the handlers' order
			updateCard(card, h);
		}
		for (const [key, card] of cards) {
			if (!seen.has(key)) { card.root.remove(); cards.delete(key); }
		}
	}

	// ---- a handler's card ------------------------------------------------

	function newCard(h) {
		const root = clone('t-handler');
		const id = 'h' + h.handler + '-' + String(h.fingerprint).replace(/[^0-9a-zA-Z]/g, '');
		const title = q(root, '.h-title');
		title.id = id + '-title';
		root.setAttribute('aria-labelledby', title.id);
		root.dataset.handler = String(h.handler);
		root.dataset.fingerprint = String(h.fingerprint);
		const card = {
			root, id, h, history: { times: [], series: new Map() }, colors: new Map(), samples: 0,
		};
		setupLookup(card);
		setupPlan(card);
		return card;
	}

	// colorOf gives each dial address a color for as long as the card
	// lives, so a line keeps its color when the list changes.
	function colorOf(card, dial) {
		if (!card.colors.has(dial)) card.colors.set(dial, 'c' + (card.colors.size % COLORS));
		return card.colors.get(dial);
	}

	function updateCard(card, h) {
		card.h = h;
		const r = card.root;
		const ups = Array.isArray(h.upstreams) ? h.upstreams : [];
		for (const u of ups) colorOf(card, u.dial);
		q(r, '.h-title').textContent = h.name ? String(h.name) : 'Handler ' + h.handler;
		q(r, '.f-fingerprint').textContent = h.fingerprint;
		q(r, '.f-hashkey').textContent = h.hash_key;
		q(r, '.f-conns').textContent = int(h.connections) + (h.max_connections ? ' of at most ' + int(h.max_connections) : '');
		const sum = k => ups.reduce((s, u) => s + ((u.totals && u.totals[k]) || 0), 0);
		q(r, '.f-total').textContent = int(sum('connections'));
		q(r, '.f-bytes').textContent = bytes(sum('sent_bytes')) + ' / ' + bytes(sum('received_bytes'));
		const rej = (h.rejected_over_max_connections || 0) + (h.rejected_over_descriptors || 0);
		const rejEl = q(r, '.f-rejected');
		rejEl.textContent = int(rej);
		rejEl.title = int(h.rejected_over_max_connections) + ' over max_connections, ' +
			int(h.rejected_over_descriptors) + ' for want of file descriptors';
		const checks = [];
		checks.push(h.active_checks ? 'active' : 'no active');
		checks.push(h.fail_duration && h.fail_duration !== '0s'
			? 'passive: ' + int(h.max_fails) + ' failed dial' + (h.max_fails === 1 ? '' : 's') + ' in ' + h.fail_duration
			: 'no passive');
		q(r, '.f-checks').textContent = checks.join('; ');
		fillChips(q(r, '.h-extras'), extras(h, KNOWN.handler, '', []));

		const sh = shares(ups);
		const tbody = q(r, 'table.upstreams tbody');
		const rows = ups.map((u, i) => upstreamRow(card, u, sh.byWeight[i], sh.now[i]));
		tbody.replaceChildren(...rows);
		q(r, '.share-note').textContent = sh.fallback
			? 'No upstream is usable: the handler tries the unhealthy ones too, in each key\'s order.'
			: 'Key share: where new connections go now, by the hash and which upstreams are usable; in brackets, the share by weight when all are up.';

		record(card, ups);
		drawChart(card, ups);
		// The plan's list follows the running one until someone edits it,
		// and never while a field of it has the focus.
		const sig = JSON.stringify(ups.map(u => [u.dial, u.weight]));
		if (!card.planTouched && sig !== card.planSig && !q(r, '.plan-form').contains(document.activeElement)) {
			card.planSig = sig;
			resetPlan(card);
		}
	}

	function upstreamRow(card, u, byWeight, now) {
		const tr = clone('t-upstream');
		const st = status(u);
		tr.dataset.upstream = String(u.dial);
		tr.dataset.state = st;
		tr.dataset.usable = String(usable(u));
		q(tr, '.swatch').classList.add(colorOf(card, u.dial));
		q(tr, '.u-dial').textContent = u.dial;
		const ex = extras(u, KNOWN.upstream, '', []);
		extras(u.health, KNOWN.health, '', ex);
		extras(u.totals, KNOWN.totals, '', ex);
		fillChips(q(tr, '.u-extras'), ex);

		const badge = q(tr, '.badge');
		badge.textContent = st + (st === 'up' && u.full ? ', full' : '');
		badge.classList.add(STATE_CLASS[st] || 'other');
		if (st === 'up' && !usable(u)) badge.classList.add('warn');
		const whyEl = q(tr, '.why');
		const h = u.health || {};
		if (h.since) whyEl.append(forTime(h.since));
		const parts = why(u);
		if (h.down_until) parts.push(heldFor(h.down_until));
		if (parts.length) whyEl.append((whyEl.firstChild ? ' · ' : '') + parts.join('; '));

		const wEl = q(tr, '.u-weight');
		wEl.textContent = int(u.weight);
		if (u.operator && typeof u.operator.weight === 'number') wEl.textContent += ' × ' + u.operator.weight;
		if (typeof u.effective_weight === 'number' && Math.abs(u.effective_weight - u.weight) > 1e-9 && usable(u)) {
			wEl.title = 'weighed ' + u.effective_weight.toFixed(2) + ' now';
		}
		const fill = q(tr, '.fill');
		fill.style.width = (Math.max(0, Math.min(1, now)) * 100).toFixed(2) + '%';
		fill.classList.add(colorOf(card, u.dial));
		q(tr, '.share-text').textContent = Math.abs(now - byWeight) < 1e-9 ? pct(now) : pct(now) + ' (' + pct(byWeight) + ')';
		q(tr, '.u-share').title = 'now ' + pct(now, 2) + ', by weight ' + pct(byWeight, 2);
		q(tr, '.u-active').textContent = int(u.active_connections) + (u.max_connections ? ' / ' + int(u.max_connections) : '');
		const t = u.totals || {};
		q(tr, '.u-total').textContent = int(t.connections);
		const fails = q(tr, '.u-fails');
		fails.textContent = int(t.dial_failures);
		if (t.failovers) fails.title = int(t.failovers) + ' failovers away from it';
		q(tr, '.u-bytes').textContent = bytes(t.sent_bytes) + ' / ' + bytes(t.received_bytes);
		const check = q(tr, '.u-check');
		if (h.last_check) check.append(timeEl(h.last_check));
		else check.textContent = '–';
		return tr;
	}

	// ---- the chart -------------------------------------------------------

	function record(card, ups) {
		const hist = card.history;
		const now = Date.now();
		hist.times.push(now);
		for (const u of ups) {
			if (!hist.series.has(u.dial)) hist.series.set(u.dial, new Array(hist.times.length - 1).fill(null));
		}
		for (const [dial, s] of hist.series) {
			const u = ups.find(x => x.dial === dial);
			s.push(u ? Number(u.active_connections) || 0 : null);
		}
		while (hist.times.length && hist.times[0] < now - HISTORY_MS) {
			hist.times.shift();
			for (const s of hist.series.values()) s.shift();
		}
		for (const [dial, s] of hist.series) {
			if (s.every(v => v === null)) hist.series.delete(dial);
		}
		card.samples++;
	}

	function drawChart(card, ups) {
		const svg = q(card.root, '.chart');
		const W = Math.max(200, Math.round(svg.clientWidth || 480));
		const H = 150;
		const padL = 34, padR = 8, padT = 8, padB = 20;
		svg.setAttribute('viewBox', '0 0 ' + W + ' ' + H);
		svg.setAttribute('height', String(H));
		clear(svg);
		const hist = card.history;
		const now = hist.times[hist.times.length - 1] || Date.now();
		// the window grows with the history, from a minute to HISTORY_MS
		const span = Math.min(HISTORY_MS, Math.max(60000, now - (hist.times[0] || now)));
		let max = 1;
		for (const s of hist.series.values()) for (const v of s) if (v !== null && v > max) max = v;
		max = niceMax(max);
		const x = t => padL + (W - padL - padR) * (1 - (now - t) / span);
		const y = v => padT + (H - padT - padB) * (1 - v / max);
		for (const v of [0, max / 2, max]) {
			svg.append(svgEl('line', { x1: padL, x2: W - padR, y1: y(v), y2: y(v), class: 'grid' }));
			const label = svgEl('text', { x: padL - 6, y: y(v) + 4, class: 'axis', 'text-anchor': 'end' });
			label.textContent = Number.isInteger(v) ? String(v) : v.toFixed(1);
			svg.append(label);
		}
		for (const [lbl, anchor, xpos] of [[dur(Math.round(span / 1000)) + ' ago', 'start', padL], ['now', 'end', W - padR]]) {
			const t = svgEl('text', { x: xpos, y: H - 5, class: 'axis', 'text-anchor': anchor });
			t.textContent = lbl;
			svg.append(t);
		}
		for (const [dial, s] of hist.series) {
			let pts = [];
			const flush = () => {
				if (pts.length === 1) pts.push([pts[0][0] + 0.01, pts[0][1]]);
				if (pts.length) {
					svg.append(svgEl('polyline', { points: pts.map(p => p.join(',')).join(' '), class: 'line ' + colorOf(card, dial) }));
				}
				pts = [];
			};
			s.forEach((v, i) => {
				if (v === null) { flush(); return; }
				pts.push([x(hist.times[i]).toFixed(1), y(v).toFixed(1)]);
			});
			flush();
		}
		svg.dataset.samples = String(card.samples);
		const summary = ups.map(u => u.dial + ' ' + int(u.active_connections)).join(', ');
		svg.setAttribute('aria-label', 'Active connections over the last ' + dur(Math.round(span / 1000)) + '; now: ' + (summary || 'no upstreams'));

		const legend = q(card.root, '.legend');
		clear(legend);
		for (const u of ups) {
			const li = el('li');
			const sw = el('span', 'swatch ' + colorOf(card, u.dial));
			sw.setAttribute('aria-hidden', 'true');
			li.append(sw, el('span', 'mono', u.dial), ' ', el('strong', null, int(u.active_connections)));
			legend.append(li);
		}
	}
	function niceMax(v) {
		const p = Math.pow(10, Math.floor(Math.log10(v)));
		for (const m of [1, 2, 5, 10]) if (v <= m * p) return m * p;
		return 10 * p;
	}

	// ---- the lookup box --------------------------------------------------

	function setupLookup(card) {
		const r = card.root;
		const input = q(r, '.i-lookup');
		input.id = card.id + '-lookup';
		const label = q(r, '.l-lookup');
		label.htmlFor = input.id;
		label.textContent = 'A client address (IP or IP:port) or a key';
		input.placeholder = '203.0.113.7:51234';
		q(r, '.lookup-form').addEventListener('submit', ev => {
			ev.preventDefault();
			lookup(card, input.value.trim());
		});
	}

	// clientAddr reads an IP address or IP:port, or returns null.
	function clientAddr(s) {
		let m = /^\[([0-9a-fA-F:.]+)\]:(\d+)$/.exec(s) || /^(\d{1,3}(?:\.\d{1,3}){3}):(\d+)$/.exec(s);
		if (m) return { ip: m[1], port: m[2] };
		if (/^\d{1,3}(?:\.\d{1,3}){3}$/.test(s) || /^[0-9a-fA-F]*:[0-9a-fA-F:.]*:[0-9a-fA-F:.]*$/.test(s)) return { ip: s };
		m = /^\[([0-9a-fA-F:.]+)\]$/.exec(s);
		return m ? { ip: m[1] } : null;
	}

	async function lookup(card, text) {
		const out = q(card.root, '.lookup-out');
		clear(out);
		if (!text) { out.append(el('p', 'error', 'Type an IP address, IP:port or a key.')); return; }
		const params = new URLSearchParams({ handler: String(card.h.handler) });
		const hk = card.h.hash_key;
		const addr = (hk === 'ip' || hk === 'ip_port') ? clientAddr(text) : null;
		if (addr) {
			params.set('ip', addr.ip);
			if (addr.port) params.set('port', addr.port);
		} else {
			params.set('key', text);
		}
		let body;
		try {
			const res = await fetch('api/pick?' + params, { cache: 'no-store' });
			body = await res.json().catch(() => null);
			if (!res.ok) throw new Error((body && body.error) || ('HTTP ' + res.status));
		} catch (err) {
			out.append(el('p', 'error', err.message));
			return;
		}
		const p = Array.isArray(body) ? body[0] : body;
		out.dataset.upstream = p.upstream || '';
		const head = el('p', 'lookup-head');
		head.append('Key ', el('code', null, p.key), ' goes to ');
		if (p.upstream) {
			head.append(el('code', null, p.upstream), ', its ' + ordinal(p.rank) + ' choice.');
		} else {
			head.append('no upstream: every one is at max_connections.');
		}
		out.append(head);
		if (p.fallback) out.append(el('p', 'warn-text', 'No upstream is usable: the handler tries the unhealthy ones too.'));
		const ol = el('ol', 'order');
		for (const c of p.order || []) {
			const li = el('li', c.usable ? 'usable' : 'unusable');
			li.dataset.dial = String(c.dial);
			if (c.dial === p.upstream) li.classList.add('chosen');
			const sw = el('span', 'swatch ' + colorOf(card, c.dial));
			sw.setAttribute('aria-hidden', 'true');
			li.append(sw, el('span', 'mono', c.dial), ' ');
			li.append(el('span', 'mark', c.usable ? 'usable' : 'skipped: ' + (c.why_not || 'not usable')));
			if (c.dial === p.upstream) li.append(' ', el('strong', null, '← goes here'));
			ol.append(li);
		}
		out.append(ol);
	}

	// ---- the plan tool ---------------------------------------------------

	function setupPlan(card) {
		const r = card.root;
		const form = q(r, '.plan-form');
		card.planRows = 0;
		q(r, '.plan-add').addEventListener('click', () => {
			card.planTouched = true;
			const row = addPlanRow(card, '', 1);
			q(row, '.p-dial').focus();
		});
		q(r, '.plan-reset').addEventListener('click', () => {
			card.planTouched = false;
			card.planSig = JSON.stringify((card.h.upstreams || []).map(u => [u.dial, u.weight]));
			resetPlan(card);
			clear(q(r, '.plan-out'));
		});
		form.addEventListener('input', () => { card.planTouched = true; });
		form.addEventListener('submit', ev => {
			ev.preventDefault();
			plan(card);
		});
	}

	function resetPlan(card) {
		const tbody = q(card.root, '.plan-list tbody');
		clear(tbody);
		for (const u of card.h.upstreams || []) addPlanRow(card, u.dial, u.weight);
	}

	function addPlanRow(card, dial, weight) {
		const tbody = q(card.root, '.plan-list tbody');
		const row = clone('t-plan-row');
		const n = ++card.planRows;
		const d = q(row, '.p-dial'), w = q(row, '.p-weight');
		d.id = card.id + '-pd' + n;
		w.id = card.id + '-pw' + n;
		d.value = dial;
		w.value = String(weight || 1);
		const ld = q(row, '.l-dial'), lw = q(row, '.l-weight');
		ld.htmlFor = d.id;
		lw.htmlFor = w.id;
		const name = () => d.value || 'new upstream';
		ld.textContent = 'Dial address';
		lw.textContent = 'Weight of ' + name();
		const rm = q(row, '.p-remove');
		rm.setAttribute('aria-label', 'Remove ' + name());
		d.addEventListener('input', () => {
			lw.textContent = 'Weight of ' + name();
			rm.setAttribute('aria-label', 'Remove ' + name());
		});
		rm.addEventListener('click', () => {
			card.planTouched = true;
			const next = row.nextElementSibling || row.previousElementSibling;
			row.remove();
			(next ? q(next, '.p-remove') : q(card.root, '.plan-add')).focus();
		});
		tbody.append(row);
		return row;
	}

	async function plan(card) {
		const r = card.root;
		const out = q(r, '.plan-out');
		clear(out);
		delete out.dataset.movedShare;
		const upstreams = [];
		for (const row of q(r, '.plan-list tbody').rows) {
			const dial = q(row, '.p-dial').value.trim();
			const weight = Number(q(row, '.p-weight').value);
			if (!dial) continue;
			const u = { dial };
			if (Number.isFinite(weight) && weight !== 0) u.weight = weight;
			upstreams.push(u);
		}
		out.append(el('p', 'muted', 'Working it out…'));
		let res;
		try {
			const resp = await fetch('api/plan', {
				method: 'POST',
				cache: 'no-store',
				headers: { 'Content-Type': 'application/json' },
				body: JSON.stringify({ handler: card.h.handler, upstreams }),
			});
			res = await resp.json().catch(() => null);
			if (!resp.ok) throw new Error((res && res.error) || ('HTTP ' + resp.status));
		} catch (err) {
			clear(out);
			out.append(el('p', 'error', err.message));
			return;
		}
		clear(out);
		const ks = res.key_space || {};
		out.dataset.movedShare = String(ks.moved_share);
		if (res.fingerprint !== card.h.fingerprint) {
			out.append(el('p', 'warn-text', 'The running config changed since this list was made: the answer is for the new one.'));
		}
		const big = el('p', 'moved');
		big.append(el('strong', 'moved-share', pct(ks.moved_share)), ' of the keys would move');
		if (ks.moved_share_margin) big.append(el('span', 'muted', ' (± ' + pct(ks.moved_share_margin, 2) + ')'));
		out.append(big);
		const lc = res.live_connections || {};
		const facts = el('ul', 'plan-facts');
		facts.append(el('li', null, 'Estimated ' + String(ks.estimate || '') + '.'));
		facts.append(el('li', null, int(lc.total) + ' connection' + (lc.total === 1 ? '' : 's') + ' flowing now: ' +
			int(lc.would_move) + (lc.would_move_margin ? ' (± ' + int(lc.would_move_margin) + ')' : '') +
			' would have their key go elsewhere, ' + int(lc.on_removed_upstreams) + ' of them on removed upstreams. Flowing connections finish where they are.'));
		const fp = el('li', null, 'New fingerprint ');
		fp.append(el('code', null, res.new_fingerprint), ' (now ', el('code', null, res.fingerprint), ').');
		facts.append(fp);
		out.append(facts);

		const table = el('table', 'plan-shares');
		table.append(el('caption', null, 'Each upstream\'s share of the keys, before and after'));
		const thead = el('thead');
		const hr = el('tr');
		for (const t of ['Upstream', 'Change', 'Before', 'After']) {
			const th = el('th', null, t);
			th.scope = 'col';
			hr.append(th);
		}
		thead.append(hr);
		table.append(thead);
		const tb = el('tbody');
		for (const s of ks.upstreams || []) {
			const tr = el('tr');
			tr.dataset.dial = String(s.dial);
			const th = el('th');
			th.scope = 'row';
			const sw = el('span', 'swatch ' + colorOf(card, s.dial));
			sw.setAttribute('aria-hidden', 'true');
			th.append(sw, el('span', 'mono', s.dial));
			tr.append(th);
			const change = el('td', 'change');
			change.append(el('span', 'badge ' + s.change, s.change));
			change.dataset.label = 'Change';
			tr.append(change);
			for (const [v, cls, label] of [[s.before, 'before', 'Before'], [s.after, 'after', 'After']]) {
				const td = el('td', 'u-share ' + cls);
				td.dataset.label = label;
				const bar = el('span', 'bar');
				bar.setAttribute('aria-hidden', 'true');
				const fill = el('span', 'fill ' + colorOf(card, s.dial));
				fill.style.width = (Math.max(0, Math.min(1, Number(v) || 0)) * 100).toFixed(2) + '%';
				bar.append(fill);
				td.append(bar, el('span', 'share-text', pct(v)));
				tr.append(td);
			}
			tb.append(tr);
		}
		table.append(tb);
		out.append(table);
	}

	poll();
})();
