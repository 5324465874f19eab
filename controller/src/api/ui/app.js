// Baton dashboard: one page, no build step, no dependencies. It calls the
// same JSON API as the CLI with the operator's token (kept in this tab's
// sessionStorage), so the API's checks are the page's checks. Every value
// from the fleet reaches the page as text (textContent), never as HTML.
'use strict';

const S = {
  token: sessionStorage.getItem('baton-token') || localStorage.getItem('baton-token') || '',
  who: null,
  // Live feeds and log follows of the page shown; aborted when it changes.
  live: [],
  timers: [],
};
const PAGE = 50;

// ---------- small helpers ----------

function h(tag, attrs, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const kid of kids.flat(Infinity)) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}

function svg(tag, attrs) {
  const el = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
}

const main = () => document.getElementById('main');
// Replaces an element's children; null and false stand for nothing.
function fill(el, ...nodes) { el.replaceChildren(...nodes.flat(Infinity).filter((n) => n !== null && n !== undefined && n !== false)); }
function show(...nodes) { fill(main(), ...nodes); }
function badge(text) { return h('span', { class: 'badge s-' + text }, text); }
function ago(ms) {
  if (!ms) return '—';
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 60) return s + ' s ago';
  if (s < 3600) return Math.floor(s / 60) + ' min ago';
  if (s < 86400) return Math.floor(s / 3600) + ' h ago';
  return Math.floor(s / 86400) + ' d ago';
}
function when(ms) {
  return new Date(ms).toLocaleString([], { month: 'short', day: 'numeric', hour: '2-digit', minute: '2-digit', second: '2-digit' });
}
// The API lists events oldest first; feeds show the newest on top.
const newestFirst = (list) => list.slice().sort((a, b) => b.at_ms - a.at_ms);
function bytes(n) {
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + ' ' + u[i];
}
const isAdmin = () => S.who && S.who.role === 'admin';
const enc = encodeURIComponent;
function failure(e) { return h('p', { class: 'error' }, String(e.message || e)); }

// ---------- the API ----------

class Unauthorized extends Error {}

function headers(extra) {
  const hd = Object.assign({}, extra || {});
  if (S.token) hd.Authorization = 'Bearer ' + S.token;
  return hd;
}

async function request(path, opts) {
  const r = await fetch(path, Object.assign({}, opts, { headers: headers(opts && opts.headers) }));
  if (r.status === 401) {
    const body = await r.json().catch(() => ({}));
    throw new Unauthorized(body.error || 'the token was refused');
  }
  if (!r.ok) {
    const body = await r.json().catch(() => ({}));
    throw new Error(body.error || ('HTTP ' + r.status));
  }
  return r;
}

async function api(path, opts) { return (await request(path, opts)).json(); }

function post(path, body, method) {
  return api(path, {
    method: method || 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body || {}),
  });
}

// Calls `tick()` now and every `ms` while the page is shown and the tab
// visible. Polling, not a held stream: a browser allows six connections to
// a host, and a stream per open tab would use them up; a short request
// also survives proxies and flaky links. `dot` says whether it keeps up.
function poll(ms, tick, dot) {
  const mark = dot || { set() {} };
  let busy = false;
  const run = async () => {
    if (busy || document.hidden) return;
    busy = true;
    try {
      await tick();
      mark.set(true);
    } catch (e) {
      if (e instanceof Unauthorized) { login(e.message); return; }
      mark.set(false, e.message || String(e));
    } finally {
      busy = false;
    }
  };
  S.timers.push(setInterval(run, ms));
  return run();
}

// Events newer than those already shown, newest first (the API lists the
// last `limit`, oldest first). Identity is the whole event.
function fresh(list, seen) {
  const out = [];
  for (const e of newestFirst(list)) {
    const key = e.at_ms + '|' + e.name + '|' + e.subject + '|' + e.message;
    if (seen.has(key)) continue;
    seen.add(key);
    out.push(e);
  }
  return out;
}

function liveDot() {
  const el = h('span', { class: 'live', title: 'updated every few seconds' }, '● live');
  el.set = (on, why) => {
    el.className = on ? 'live' : 'live off';
    el.textContent = on ? '● live' : '● not updating — retrying';
    el.title = on ? 'updated every few seconds' : (why || 'the controller does not answer');
  };
  return el;
}

function confirmAction(text) {
  const d = document.getElementById('confirm');
  document.getElementById('confirm-text').textContent = text;
  return new Promise((ok) => {
    d.addEventListener('close', () => ok(d.returnValue === 'ok'), { once: true });
    d.returnValue = '';
    d.showModal();
  });
}

// ---------- routing ----------

function parseHash() {
  const raw = location.hash.replace(/^#/, '') || '/';
  const [path, query] = raw.split('?');
  return { parts: path.split('/').filter(Boolean).map(decodeURIComponent), params: new URLSearchParams(query || '') };
}

// Writes the page's parameters into the address: `push` makes a new
// history entry (a page or a sort: Back returns to it), else the current
// one changes (typing in a search box).
function setParams(params, push) {
  const { parts } = parseHash();
  const q = params.toString();
  const url = '#/' + parts.map(enc).join('/') + (q ? '?' + q : '');
  if (push) history.pushState(null, '', url); else history.replaceState(null, '', url);
}

async function route() {
  S.live.splice(0).forEach((c) => c.abort());
  S.timers.splice(0).forEach((t) => clearInterval(t));
  document.getElementById('confirm').close();
  if (!S.who) {
    try {
      S.who = await api('/api/v1/whoami');
    } catch (e) {
      if (e instanceof Unauthorized) return login(S.token ? e.message : null);
      return show(failure(e));
    }
    document.getElementById('who').textContent =
      S.who.name + ' · ' + S.who.role + (S.who.tenant ? ' · tenant ' + S.who.tenant : '');
    document.getElementById('logout').hidden = !S.who.api_auth;
  }
  const { parts, params } = parseHash();
  const page = parts[0] || 'overview';
  document.querySelectorAll('#nav a').forEach((a) => a.classList.toggle('active', a.dataset.page === page));
  try {
    if (page === 'overview') await overview(params);
    else if (page === 'devices' && parts[1]) await device(parts[1]);
    else if (page === 'devices') await devices(params);
    else if (page === 'workloads' && parts[1]) await workload(parts[1]);
    else if (page === 'workloads') await workloads();
    else if (page === 'events') await events(params);
    else show(h('p', { class: 'error' }, 'No such page.'));
  } catch (e) {
    if (e instanceof Unauthorized) login(e.message);
    else show(failure(e));
  }
}

function login(why) {
  S.who = null;
  document.getElementById('who').textContent = '';
  const input = h('input', { type: 'password', id: 'token', placeholder: 'baton-api.…', autocomplete: 'off', required: true });
  const remember = h('input', { type: 'checkbox', id: 'remember' });
  const form = h('form', {
    onsubmit: (ev) => {
      ev.preventDefault();
      S.token = input.value.trim();
      sessionStorage.setItem('baton-token', S.token);
      // Remembered: every tab of this browser, until Log out.
      if (remember.checked) localStorage.setItem('baton-token', S.token);
      else localStorage.removeItem('baton-token');
      route();
    },
  },
  h('label', { for: 'token' }, 'API token'), input,
  h('label', {}, remember, ' Remember on this browser (all tabs, until Log out)'),
  h('button', { class: 'primary', type: 'submit', id: 'login' }, 'Log in'),
  h('p', { class: 'muted' }, 'Make one with ', h('code', {}, 'baton apitoken create'),
    '. A read-only token shows a read-only dashboard; a tenant\'s token shows its tenant.'));
  show(h('div', { class: 'login card' }, h('h1', {}, 'Log in to Baton'), why ? h('p', { class: 'error' }, why) : null, form));
  input.focus();
}

document.getElementById('logout').addEventListener('click', () => {
  sessionStorage.removeItem('baton-token');
  localStorage.removeItem('baton-token');
  S.token = '';
  S.who = null;
  // One render of the login form: through route(), which also stops the
  // page's polling; replaceState fires no hashchange (a second route()
  // would draw the form again under the operator's typing).
  history.replaceState(null, '', '#/');
  route();
});
window.addEventListener('hashchange', route);
route();

// ---------- overview ----------

async function overview(params) {
  let group = params.get('group') || '';
  const first = await api('/api/v1/overview' + (group ? '?group=' + enc(group) : ''));
  // Sites are what fleets are usually counted by.
  if (!group && first.label_keys.includes('site')) group = 'site';
  const pick = h('select', {
    id: 'group',
    onchange: (ev) => {
      const p = new URLSearchParams();
      if (ev.target.value) p.set('group', ev.target.value);
      location.hash = '#/' + (p.toString() ? '?' + p : '');
    },
  }, h('option', { value: '' }, 'group by label…'), first.label_keys.map((k) => h('option', { value: k, selected: k === group }, k)));
  const cards = h('div', { class: 'cards', id: 'status-cards' });
  const attention = h('div', {});
  const groups = h('div', {});
  const versions = h('div', {});
  const arches = h('div', {});
  const dot = liveDot();
  show(
    h('h1', {}, 'Fleet ', dot),
    cards,
    h('h2', {}, 'Needs attention'),
    attention,
    h('div', { class: 'toolbar' }, h('h2', {}, 'By label'), pick),
    groups,
    h('div', { class: 'grid2' },
      h('div', {}, h('h2', {}, 'Agent versions'), versions),
      h('div', {}, h('h2', {}, 'Architectures'), arches)),
  );
  const card = (label, n, cls, href) =>
    h('a', { class: 'card', href }, h('div', { class: 'n ' + cls }, n), h('div', { class: 'muted' }, label));
  const counts = (m) => h('div', { class: 'scroll' }, h('table', {},
    Object.entries(m).sort((a, b) => b[1] - a[1]).map(([k, n]) => h('tr', {}, h('td', {}, k || '(none)'), h('td', { class: 'num' }, n)))));
  const draw = (o) => {
    fill(cards,
      card('devices', o.devices, '', '#/devices'),
      card('online', o.status.online, 's-online', '#/devices?status=online'),
      card('stale', o.status.stale, 's-stale', '#/devices?status=stale'),
      card('offline', o.status.offline, 's-offline', '#/devices?status=offline'));
    const a = o.attention;
    const items = [];
    for (const w of a.failing) {
      items.push(h('li', {}, badge('Failed'), h('span', {}, 'workload ', h('a', { href: '#/workloads/' + enc(w.workload) }, w.workload),
        ' fails on ' + w.devices.length + ' device(s): ', w.reason)));
    }
    for (const r of a.stopped_rollouts) {
      items.push(h('li', {}, badge(r.state), h('span', {}, 'rollout of ', h('a', { href: '#/workloads/' + enc(r.workload) }, r.workload),
        ' to revision ' + r.to, r.reason ? ': ' + r.reason : '')));
    }
    for (const d of a.silent) {
      items.push(h('li', {}, badge(d.status), h('span', {}, 'device ', h('a', { href: '#/devices/' + enc(d.id) }, d.id),
        ' — last heard ', ago(d.last_seen_ms))));
    }
    if (a.silent_total > a.silent.length) {
      items.push(h('li', {}, h('span', {}), h('a', { href: '#/devices?sort=status' }, (a.silent_total - a.silent.length) + ' more silent devices')));
    }
    fill(attention, items.length ? h('ul', { class: 'attn', id: 'attention' }, items)
      : h('p', { class: 'muted', id: 'attention' }, 'Nothing: every device is online and every workload healthy.'));
    fill(groups, group ? h('div', { class: 'scroll' }, h('table', { id: 'groups' },
      h('tr', {}, h('th', {}, group), h('th', {}, 'online'), h('th', {}, 'stale'), h('th', {}, 'offline')),
      Object.entries(o.groups).map(([v, c]) => h('tr', {},
        h('td', {}, h('a', { href: '#/devices?label=' + enc(v ? group + '=' + v : group) }, v || '(none)')),
        h('td', { class: 'num' }, c.online), h('td', { class: 'num' }, c.stale), h('td', { class: 'num' }, c.offline))))) : null);
    fill(versions, counts(o.agent_versions));
    fill(arches, counts(o.arches));
  };
  if (group === (params.get('group') || '')) draw(first);
  await poll(5000, async () => draw(await api('/api/v1/overview' + (group ? '?group=' + enc(group) : ''))), dot);
}

// ---------- devices ----------

async function devices(params) {
  const search = h('input', { type: 'search', id: 'search', placeholder: 'Search id, label, version…', value: params.get('q') || '' });
  const status = h('select', { id: 'status' }, ['', 'online', 'stale', 'offline'].map((s) =>
    h('option', { value: s, selected: s === (params.get('status') || '') }, s || 'any status')));
  const label = params.get('label');
  const chip = label ? h('span', { class: 'chip', id: 'label-filter' }, 'label ' + label,
    h('button', { title: 'clear', onclick: () => { params.delete('label'); params.delete('page'); setParams(params, true); route(); } }, '×')) : null;
  const holder = h('div', {});
  const dot = liveDot();
  show(h('h1', {}, 'Devices ', dot), h('div', { class: 'toolbar' }, search, status, chip), holder);
  const load = async () => {
    const q = new URLSearchParams();
    for (const k of ['q', 'status', 'label', 'sort', 'desc']) if (params.get(k)) q.set(k, params.get(k));
    let page = Math.max(0, Math.floor(Number(params.get('page')) || 0));
    q.set('offset', page * PAGE);
    q.set('limit', PAGE);
    let r = await request('/api/v1/devices?' + q);
    const total = Number(r.headers.get('x-total-count') || 0);
    let list = await r.json();
    // Past the end (the fleet shrank, or a hand-written address): the last page.
    if (!list.length && total && page > 0) {
      page = Math.floor((total - 1) / PAGE);
      params.set('page', page);
      setParams(params);
      q.set('offset', page * PAGE);
      r = await request('/api/v1/devices?' + q);
      list = await r.json();
    }
    const sort = params.get('sort') || 'id';
    const desc = params.get('desc') === 'true';
    const th = (key, text, cls) => h('th', {
      class: 'sortable' + (sort === key ? ' sorted' + (desc ? ' desc' : '') : '') + (cls ? ' ' + cls : ''),
      onclick: () => {
        params.set('desc', sort === key && !desc ? 'true' : 'false');
        params.set('sort', key);
        params.delete('page');
        setParams(params, true);
        load().catch(shown);
      },
    }, text);
    const fleetWide = !S.who.tenant;
    const table = h('table', { id: 'devices' },
      h('tr', {}, th('id', 'Device'), th('status', 'Status'), fleetWide ? th('tenant', 'Tenant', 'hide-narrow') : null,
        th('agent_version', 'Agent', 'hide-narrow'), th('arch', 'Arch', 'hide-narrow'), h('th', { class: 'hide-narrow' }, 'Labels'),
        th('last_seen', 'Last seen')),
      list.map((d) => h('tr', { 'data-device': d.id },
        h('td', {}, h('a', { href: '#/devices/' + enc(d.id) }, d.id)),
        h('td', {}, badge(d.status)),
        fleetWide ? h('td', { class: 'hide-narrow' }, d.tenant) : null,
        h('td', { class: 'hide-narrow' }, d.agent_version),
        h('td', { class: 'hide-narrow' }, d.arch),
        h('td', { class: 'hide-narrow' }, h('div', { class: 'chips' }, Object.entries(d.labels).map(([k, v]) => h('span', { class: 'chip' }, k + '=' + v)))),
        h('td', {}, ago(d.last_seen_ms)))));
    const go = (p) => { params.set('page', p); setParams(params, true); load().catch(shown); };
    const first = total ? page * PAGE + 1 : 0;
    fill(holder,
      h('div', { class: 'scroll' }, table),
      total ? null : h('p', { class: 'muted', id: 'none' }, 'No device matches.'),
      h('div', { class: 'pager' },
        h('button', { disabled: page === 0, onclick: () => go(page - 1) }, '‹ Previous'),
        h('span', { id: 'count', class: 'muted' }, first + '–' + (page * PAGE + list.length) + ' of ' + total),
        h('button', { disabled: (page + 1) * PAGE >= total, onclick: () => go(page + 1) }, 'Next ›')));
  };
  // A refused query (a bad sort key in the address) is said under the
  // search box, which stays usable.
  const shown = (e) => {
    if (e instanceof Unauthorized) return login(e.message);
    fill(holder, failure(e));
  };
  let debounce;
  const refilter = () => {
    clearTimeout(debounce);
    debounce = setTimeout(() => {
      for (const [k, el] of [['q', search], ['status', status]]) {
        if (el.value) params.set(k, el.value); else params.delete(k);
      }
      params.delete('page');
      setParams(params);
      load().catch(shown);
    }, 200);
  };
  search.addEventListener('input', refilter);
  status.addEventListener('change', refilter);
  await poll(5000, () => load().catch((e) => { shown(e); throw e; }), dot);
}

function chart(samples, value, label, max, fmt) {
  const w = 600, hgt = 80;
  const box = svg('svg', { class: 'chart', viewBox: `0 0 ${w} ${hgt}`, role: 'img', 'aria-label': label });
  box.append(svg('line', { x1: 0, y1: hgt - 1, x2: w, y2: hgt - 1 }));
  const now = Date.now();
  const top = Math.max(max || 0, ...samples.map(value), 1e-9);
  const pts = samples.map((s) => {
    const x = Math.max(0, w - ((now - s.at_ms) / 3600000) * w);
    const y = hgt - 2 - (value(s) / top) * (hgt - 6);
    return x.toFixed(1) + ',' + y.toFixed(1);
  });
  box.append(svg('polyline', { points: pts.join(' ') }));
  for (const p of pts) {
    const [cx, cy] = p.split(',');
    box.append(svg('circle', { cx, cy, r: 2.5 }));
  }
  const last = samples.length ? fmt(value(samples[samples.length - 1])) : 'no samples yet';
  return h('div', { class: 'card' },
    h('div', { class: 'muted' }, label + ': ', h('strong', {}, last), h('span', { class: 'scale' }, ' (scale 0–' + fmt(top) + ')')),
    box,
    h('div', { class: 'axis' }, h('span', {}, '1 h ago'), h('span', {}, 'now')));
}

async function device(id) {
  const base = '/api/v1/devices/' + enc(id);
  const [d, samples, evs] = await Promise.all([api(base), api(base + '/samples'), api('/api/v1/events?limit=20&subject=' + enc(id))]);
  const title = h('h1', {});
  const refusal = h('div', {});
  const inventory = h('div', { class: 'card' });
  const labels = h('div', { class: 'chips', id: 'labels' });
  const labelError = h('div', {});
  const charts = h('div', { class: 'grid2', id: 'charts' });
  const wholder = h('div', {});
  const log = h('div', { id: 'log-panel' });
  const seen = new Set();
  const feed = h('ul', { class: 'feed', id: 'device-events' });
  const dot = liveDot();
  const relabel = async (change) => {
    try {
      drawDevice(await post(base + '/labels', change, 'PATCH'));
      fill(labelError);
    } catch (e) {
      if (e instanceof Unauthorized) return login(e.message);
      fill(labelError, failure(e));
    }
  };
  const add = isAdmin() ? h('form', {
    class: 'toolbar', id: 'add-label',
    onsubmit: (ev) => {
      ev.preventDefault();
      const [k, ...v] = ev.target.elements.label.value.split('=');
      relabel({ set: { [k.trim()]: v.join('=').trim() } }).then(() => { if (!labelError.childElementCount) ev.target.reset(); });
    },
  }, h('input', { name: 'label', placeholder: 'key=value', required: true, pattern: '[^=]+=.*' }), h('button', { type: 'submit' }, 'Set label')) : null;
  const kv = (pairs) => h('dl', { class: 'kv' }, pairs.filter(([, v]) => v !== undefined && v !== '' && v !== null)
    .map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
  let lastWorkloads = '';
  const drawDevice = (d) => {
    const inv = d.inventory || {};
    const hb = d.heartbeat || {};
    fill(title, id, ' ', badge(d.status), d.tenant && !S.who.tenant ? h('span', { class: 'chip' }, 'tenant ' + d.tenant) : null, ' ', dot);
    fill(refusal, d.refusal ? h('p', { class: 'error' }, 'Refused its desired document ' + ago(d.refusal.at_ms) + ': ' + d.refusal.reason) : null);
    fill(inventory, kv([
      ['Agent', d.agent_version], ['Architecture', inv.arch + (inv.arch_variant ? ' ' + inv.arch_variant : '')],
      ['OS', inv.os], ['Kernel', inv.kernel], ['Hostname', inv.hostname], ['CPUs', inv.cpus],
      ['Memory', inv.memory_bytes ? bytes(inv.memory_bytes) : undefined], ['Disk', inv.disk_bytes ? bytes(inv.disk_bytes) : undefined],
      ['Free disk', hb.disk_free_mib !== undefined ? bytes(hb.disk_free_mib * 1048576) : undefined],
      ['Temperature', hb.temp_milli_c ? (hb.temp_milli_c / 1000).toFixed(1) + ' °C' : undefined],
      ['Addresses', (inv.addresses || []).join(', ')], ['Uptime', hb.uptime_s ? Math.round(hb.uptime_s / 3600) + ' h' : undefined],
      ['Clock offset', d.clock_offset_ms !== null && d.clock_offset_ms !== undefined ? d.clock_offset_ms + ' ms' : undefined],
      ['First seen', when(d.first_seen_ms)], ['Last seen', ago(d.last_seen_ms)],
    ]));
    fill(labels, Object.entries(d.labels).map(([k, v]) => {
      const mine = k in d.operator_labels;
      return h('span', { class: 'chip', title: mine ? 'set by an operator' : "from the agent's config: change it there, or override it here" }, k + '=' + v,
        isAdmin() && mine ? h('button', { title: 'remove', onclick: () => relabel({ remove: [k] }) }, '×') : null);
    }));
    // Redrawn only when it changed: the Logs buttons stay under the pointer.
    const workloads = (d.report && d.report.workloads) || [];
    const key = JSON.stringify(workloads);
    if (key === lastWorkloads) return;
    lastWorkloads = key;
    fill(wholder, workloads.length ? h('div', { class: 'scroll' }, h('table', { id: 'device-workloads' },
      h('tr', {}, h('th', {}, 'Workload'), h('th', {}, 'Rev'), h('th', {}, 'Phase'), h('th', {}, 'Health'), h('th', {}, 'Restarts'),
        h('th', {}, 'Last error'), h('th', {}, '')),
      workloads.map((w) => h('tr', {},
        h('td', {}, h('a', { href: '#/workloads/' + enc(w.name) }, w.name)),
        h('td', {}, w.revision), h('td', {}, badge(w.phase)), h('td', {}, badge(w.health)), h('td', {}, w.restarts),
        h('td', { class: 'wrap' }, w.last_error || ''),
        h('td', {}, h('button', { 'data-logs': w.name, onclick: () => tail(id, w.name, log) }, 'Logs'))))))
      : h('p', { class: 'muted' }, 'No workloads reported.'));
  };
  const drawCharts = (samples, d) => {
    const inv = d.inventory || {};
    fill(charts,
      chart(samples, (s) => s.load1_centi / 100, 'Load (1 min)', inv.cpus || 1, (v) => v.toFixed(2)),
      chart(samples, (s) => s.mem_used_kib * 1024, 'Memory used', samples.length ? samples[0].mem_total_kib * 1024 : 0, bytes));
  };
  const drawEvents = (list) => { for (const e of fresh(list, seen).reverse()) feed.prepend(eventRow(e)); };
  drawDevice(d);
  drawCharts(samples, d);
  drawEvents(evs);
  show(title, refusal,
    h('div', { class: 'grid2' }, inventory, h('div', {}, h('h2', {}, 'Labels'), labels, labelError, add)),
    h('h2', {}, 'Last hour'), charts,
    h('h2', {}, 'Workloads'), wholder, log,
    h('h2', {}, 'Recent events'), feed);
  let ticks = 0;
  await poll(5000, async () => {
    const [d, evs] = await Promise.all([api(base), api('/api/v1/events?limit=20&subject=' + enc(id))]);
    drawDevice(d);
    drawEvents(evs);
    if (++ticks % 6 === 0) drawCharts(await api(base + '/samples'), d);
  }, dot);
}

function tail(id, workload, panel) {
  S.live.filter((c) => c.log).forEach((c) => c.abort());
  const ctl = new AbortController();
  ctl.log = true;
  S.live.push(ctl);
  const out = h('pre', { class: 'log', id: 'log' });
  panel.replaceChildren(h('div', { class: 'toolbar' }, h('h2', {}, 'Log of ' + workload),
    h('button', { onclick: () => { ctl.abort(); panel.replaceChildren(); } }, 'Close')), out);
  (async () => {
    try {
      const r = await request('/api/v1/devices/' + enc(id) + '/logs/' + enc(workload) + '?tail=100&follow=true', { signal: ctl.signal });
      const reader = r.body.getReader();
      const text = new TextDecoder();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        const stick = out.scrollTop + out.clientHeight >= out.scrollHeight - 4;
        out.append(text.decode(value, { stream: true }));
        // Keep the page light on a chatty container: the last 200 KiB.
        if (out.textContent.length > 200000) out.textContent = out.textContent.slice(-150000);
        if (stick) out.scrollTop = out.scrollHeight;
      }
      out.append('\n— the log ended —');
    } catch (e) {
      if (!ctl.signal.aborted) out.append('\n— ' + (e.message || e) + ' —');
    }
  })();
}

// ---------- workloads ----------

async function workloads() {
  const list = await api('/api/v1/workloads');
  const running = (w) => w.devices.filter((d) => d.reported && d.reported.phase === 'Running' && d.reported.revision === d.desired_revision).length;
  show(h('h1', {}, 'Workloads'),
    list.length ? h('div', { class: 'scroll' }, h('table', { id: 'workloads' },
      h('tr', {}, h('th', {}, 'Workload'), S.who.tenant ? null : h('th', { class: 'hide-narrow' }, 'Tenant'), h('th', {}, 'Revision'),
        h('th', { class: 'hide-narrow' }, 'Image'), h('th', {}, 'Running'), h('th', {}, 'Rollout')),
      list.map((w) => h('tr', { 'data-workload': w.name },
        h('td', {}, h('a', { href: '#/workloads/' + enc(w.name) }, w.name)),
        S.who.tenant ? null : h('td', { class: 'hide-narrow' }, w.tenant),
        h('td', {}, w.revision + (w.stable_revision !== w.revision ? ' (stable ' + w.stable_revision + ')' : '')),
        h('td', { class: 'hide-narrow' }, w.image),
        h('td', {}, running(w) + ' / ' + w.devices.length),
        h('td', {}, w.rollout ? badge(w.rollout.state) : '—')))))
      : h('p', { class: 'muted' }, 'No workloads. Apply one with ', h('code', {}, 'baton apply -f'), '.'));
}

function rolloutPanel(name, r, w) {
  if (!r) return h('p', { class: 'muted' }, 'No rollout yet.');
  const c = r.counts;
  const active = r.state === 'progressing' || r.state === 'paused';
  const pct = (n) => (c.devices ? (100 * n / c.devices) : 0) + '%';
  const bar = h('div', { class: 'bar', title: 'ready / in progress / failed of ' + c.devices },
    h('span', { class: 'ready' }), h('span', { class: 'pending' }), h('span', { class: 'failed' }));
  bar.children[0].style.width = pct(c.ready);
  // A stopped rollout has nothing in progress, whatever it left released.
  bar.children[1].style.width = active ? pct(Math.max(0, c.released - c.ready - c.failed)) : '0%';
  bar.children[2].style.width = pct(c.failed);
  const act = (action, label, cls, question) => h('button', {
    class: cls, 'data-action': action,
    onclick: async (ev) => {
      if (!await confirmAction(question)) return;
      ev.target.disabled = true;
      try { await post('/api/v1/workloads/' + enc(name) + '/rollout/' + action); } catch (e) { ev.target.after(failure(e)); }
    },
  }, label);
  const actions = [];
  if (isAdmin()) {
    if (r.state === 'progressing') actions.push(act('pause', 'Pause', '', `Pause the rollout of ${name}? Devices already released keep the new revision; no further wave is released.`));
    if (r.state === 'paused') actions.push(act('resume', 'Resume', 'primary', `Resume the rollout of ${name} to revision ${r.to}?`));
    if (active) actions.push(act('abort', 'Abort', 'danger', `Abort the rollout of ${name}? Every device goes back to revision ${r.from}.`));
    // Undo of a finished rollout: the revision before the stable one, again.
    const before = w && w.revisions.filter((x) => x.revision < w.stable_revision).pop();
    if (!active && before) actions.push(act('undo', 'Undo', 'danger', `Undo ${name}: apply revision ${before.revision}'s spec again, as a new revision rolled out like any other?`));
  }
  return h('div', { class: 'card', id: 'rollout', 'data-state': r.state, 'data-wave': r.wave },
    h('div', { class: 'toolbar' }, badge(r.state), h('strong', {}, 'revision ' + r.from + ' → ' + r.to),
      h('span', { id: 'wave' }, 'wave ' + r.wave + ' of ' + r.waves), h('span', { class: 'muted' }, 'started ' + ago(r.started_ms))),
    bar,
    h('div', { class: 'legend', id: 'counts' },
      h('span', {}, c.ready + ' ready'), h('span', {}, c.released + ' released'), active ? h('span', {}, c.pending + ' pending') : null,
      h('span', {}, c.failed + ' failed'), h('span', {}, c.devices + ' devices')),
    r.reason ? h('p', {}, r.reason) : null,
    r.waiting ? h('p', { class: 'muted' }, 'Waiting: ' + r.waiting) : null,
    r.failed.length ? h('ul', {}, r.failed.map(([d, why]) => h('li', {}, h('a', { href: '#/devices/' + enc(d) }, d), ': ' + why))) : null,
    (r.held || []).length ? h('ul', {}, r.held.map(([d, why]) => h('li', {}, h('a', { href: '#/devices/' + enc(d) }, d), ' holds it: ' + why))) : null,
    actions.length ? h('div', { class: 'toolbar' }, actions) : null);
}

const SHOWN = 200;

async function workload(name) {
  let w = await api('/api/v1/workloads/' + enc(name));
  const panel = h('div', { id: 'rollout-panel' });
  const devicesHolder = h('div', {});
  const summary = h('div', {});
  const revisions = h('div', {});
  const renderDevices = (w) => {
    const rows = w.devices.slice(0, SHOWN);
    fill(devicesHolder, h('div', { class: 'scroll' }, h('table', { id: 'workload-devices' },
      h('tr', {}, h('th', {}, 'Device'), h('th', {}, 'Status'), h('th', {}, 'Desired'), h('th', {}, 'Running'), h('th', {}, 'Phase'),
        h('th', {}, 'Health'), h('th', {}, 'Restarts'), h('th', {}, 'Note')),
      rows.map((d) => {
        const r = d.reported;
        return h('tr', {},
          h('td', {}, h('a', { href: '#/devices/' + enc(d.device) }, d.device)), h('td', {}, badge(d.device_status)),
          h('td', {}, d.desired_revision), h('td', {}, r ? r.revision : '—'), h('td', {}, r ? badge(r.phase) : '—'),
          h('td', {}, r ? badge(r.health) : '—'), h('td', {}, r ? r.restarts : '—'),
          h('td', { class: 'wrap' }, d.refused || (d.waiting ? 'holds the new revision back' : '') || (r && r.last_error) || ''));
      }))),
    w.devices.length ? null : h('p', { class: 'muted' }, 'No device is asked to run it.'),
    w.devices.length > SHOWN ? h('p', { class: 'muted' }, (w.devices.length - SHOWN) + ' more devices are not shown.') : null);
  };
  const render = (w) => {
    const p = w.placement;
    fill(summary, h('div', { class: 'card' }, h('dl', { class: 'kv' },
      h('dt', {}, 'Image'), h('dd', { id: 'image' }, w.image),
      h('dt', {}, 'Revision'), h('dd', {}, w.revision + ' (stable ' + w.stable_revision + ')'),
      h('dt', {}, 'Replicas'), h('dd', {}, w.replicas === null ? 'every matching device' : w.replicas + (w.unplaced ? ` (${w.unplaced} fit nowhere)` : '')),
      h('dt', {}, 'Placement'), h('dd', {}, Object.entries(p.selector).map(([k, v]) => k + '=' + v).join(', ') || 'any device',
        p.arch.length ? ' · arch ' + p.arch.join(', ') : '', p.spread_by ? ' · spread by ' + p.spread_by : ''))));
    fill(revisions, h('div', { class: 'scroll' }, h('table', { id: 'revisions' },
      h('tr', {}, h('th', {}, 'Revision'), h('th', {}, 'Image'), h('th', {}, 'Changes')),
      w.revisions.slice().reverse().map((r) => h('tr', {}, h('td', {}, r.revision),
        h('td', { class: 'wrap' }, r.image + (r.digest ? ' @ ' + r.digest.slice(0, 19) + '…' : '')),
        h('td', { class: 'wrap' }, r.changes.join(', ')))))));
    renderDevices(w);
  };
  render(w);
  let shown = JSON.stringify(w.rollout);
  fill(panel, rolloutPanel(name, w.rollout, w));
  const dot = liveDot();
  show(
    h('h1', {}, name, S.who.tenant ? null : h('span', { class: 'chip' }, 'tenant ' + w.tenant)),
    summary,
    h('h2', {}, 'Rollout ', dot),
    panel,
    h('h2', {}, 'Devices'),
    devicesHolder,
    h('h2', {}, 'Revisions'),
    revisions,
  );
  // The rollout every second (redrawn when it changed, so its buttons stay
  // put); the whole workload every five, and soon after the rollout moved.
  let ticks = 0;
  await poll(1000, async () => {
    let r = null;
    try {
      r = await api('/api/v1/workloads/' + enc(name) + '/rollout');
    } catch (e) {
      if (!/has had no rollout/.test(e.message)) throw e;
    }
    const now = JSON.stringify(r);
    const moved = now !== shown;
    if (moved || ++ticks % 5 === 0) {
      w = await api('/api/v1/workloads/' + enc(name));
      render(w);
    }
    if (moved) {
      shown = now;
      fill(panel, rolloutPanel(name, r, w));
    } else if (r) {
      const started = panel.querySelector('#rollout .muted');
      if (started) started.textContent = 'started ' + ago(r.started_ms);
    }
  }, dot);
}

// ---------- events ----------

function subjectLink(e) {
  if (e.kind === 'device' || e.kind === 'session' || e.kind === 'agent') return h('a', { href: '#/devices/' + enc(e.subject) }, e.subject);
  if (e.kind === 'workload' || e.kind === 'rollout' || e.kind === 'scale') return h('a', { href: '#/workloads/' + enc(e.subject) }, e.subject);
  return e.subject;
}

function eventRow(e) {
  return h('li', { 'data-name': e.name || e.kind },
    h('span', { class: 'when', title: when(e.at_ms) }, when(e.at_ms)),
    h('span', { class: 'name' }, e.name || e.kind),
    h('span', {}, subjectLink(e), ' ', e.message));
}

async function events(params) {
  const filter = h('input', { type: 'search', id: 'event-filter', placeholder: 'Filter: name, subject or text', value: params.get('q') || '' });
  const feed = h('ul', { class: 'feed', id: 'events' });
  const none = h('p', { class: 'muted', id: 'no-events', hidden: true }, 'No event matches.');
  const shown = (e) => {
    const q = filter.value.toLowerCase();
    return !q || [e.name, e.kind, e.subject, e.message].some((s) => (s || '').toLowerCase().includes(q));
  };
  const seen = new Set();
  const all = fresh(await api('/api/v1/events?limit=500'), seen);
  const render = () => {
    fill(feed, all.filter(shown).slice(0, 500).map(eventRow));
    none.hidden = feed.childElementCount > 0;
  };
  filter.addEventListener('input', () => {
    if (filter.value) params.set('q', filter.value); else params.delete('q');
    setParams(params);
    render();
  });
  const dot = liveDot();
  show(h('h1', {}, 'Events ', dot),
    h('div', { class: 'toolbar' }, filter, h('span', { class: 'muted' }, 'the last 500, and new ones as they happen')),
    none, feed);
  render();
  await poll(2000, async () => {
    const news = fresh(await api('/api/v1/events?limit=100'), seen);
    if (!news.length) return;
    all.unshift(...news);
    all.length = Math.min(all.length, 2000);
    render();
  }, dot);
}
