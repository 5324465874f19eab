// Baton dashboard: one page, no build step, no dependencies. It calls the
// same JSON API as the CLI with the operator's token (kept in this tab's
// sessionStorage), so the API's checks are the page's checks. Every value
// from the fleet reaches the page as text (textContent), never as HTML.
'use strict';

const S = {
  token: sessionStorage.getItem('baton-token') || '',
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

// Reads a server-sent event stream with the token (EventSource cannot send
// one). `on(kind, data)` gets each event. Reconnects after a dropped feed.
function follow(path, on, state) {
  const ctl = new AbortController();
  S.live.push(ctl);
  const dot = state || { set() {} };
  (async () => {
    let delay = 1000;
    while (!ctl.signal.aborted) {
      try {
        const r = await request(path, { signal: ctl.signal });
        dot.set(true);
        delay = 1000;
        const reader = r.body.getReader();
        const text = new TextDecoder();
        let buf = '';
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += text.decode(value, { stream: true });
          let cut;
          while ((cut = buf.indexOf('\n\n')) >= 0) {
            const block = buf.slice(0, cut);
            buf = buf.slice(cut + 2);
            let kind = 'message';
            const data = [];
            for (const line of block.split('\n')) {
              if (line.startsWith('event: ')) kind = line.slice(7);
              else if (line.startsWith('data: ')) data.push(line.slice(6));
            }
            if (data.length) on(kind, data.join('\n'));
          }
        }
      } catch (e) {
        if (ctl.signal.aborted) return;
        if (e instanceof Unauthorized) { login(e.message); return; }
      }
      dot.set(false);
      await new Promise((ok) => setTimeout(ok, delay));
      delay = Math.min(delay * 2, 30000);
    }
  })();
  return ctl;
}

function liveDot() {
  const el = h('span', { class: 'live off', title: 'live updates' }, '● live');
  el.set = (on) => { el.className = on ? 'live' : 'live off'; };
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

function setParams(params) {
  const { parts } = parseHash();
  const q = params.toString();
  history.replaceState(null, '', '#/' + parts.map(enc).join('/') + (q ? '?' + q : ''));
}

async function route() {
  S.live.splice(0).forEach((c) => c.abort());
  S.timers.splice(0).forEach((t) => clearInterval(t));
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
  const form = h('form', {
    onsubmit: (ev) => {
      ev.preventDefault();
      S.token = input.value.trim();
      sessionStorage.setItem('baton-token', S.token);
      route();
    },
  },
  h('label', { for: 'token' }, 'API token'), input,
  h('button', { class: 'primary', type: 'submit', id: 'login' }, 'Log in'),
  h('p', { class: 'muted' }, 'Make one with ', h('code', {}, 'baton apitoken create'),
    '. A read-only token shows a read-only dashboard; a tenant\'s token shows its tenant.'));
  show(h('div', { class: 'login card' }, h('h1', {}, 'Log in to Baton'), why ? h('p', { class: 'error' }, why) : null, form));
  input.focus();
}

document.getElementById('logout').addEventListener('click', () => {
  sessionStorage.removeItem('baton-token');
  S.token = '';
  S.who = null;
  location.hash = '#/';
  login(null);
});
window.addEventListener('hashchange', route);
route();

// ---------- overview ----------

async function overview(params) {
  let group = params.get('group') || '';
  let o = await api('/api/v1/overview' + (group ? '?group=' + enc(group) : ''));
  // Sites are what fleets are usually counted by.
  if (!group && o.label_keys.includes('site')) {
    group = 'site';
    o = await api('/api/v1/overview?group=site');
  }
  const card = (label, n, cls, href) =>
    h('a', { class: 'card', href }, h('div', { class: 'n ' + cls }, n), h('div', { class: 'muted' }, label));
  const pick = h('select', {
    id: 'group',
    onchange: (ev) => {
      const p = new URLSearchParams();
      if (ev.target.value) p.set('group', ev.target.value);
      location.hash = '#/' + (p.toString() ? '?' + p : '');
    },
  }, h('option', { value: '' }, 'group by label…'), o.label_keys.map((k) => h('option', { value: k, selected: k === group }, k)));
  const counts = (m) => h('div', { class: 'scroll' }, h('table', {},
    Object.entries(m).sort((a, b) => b[1] - a[1]).map(([k, n]) => h('tr', {}, h('td', {}, k || '(none)'), h('td', {}, n)))));
  const groups = group ? h('div', { class: 'scroll' }, h('table', { id: 'groups' },
    h('tr', {}, h('th', {}, group), h('th', {}, 'online'), h('th', {}, 'stale'), h('th', {}, 'offline')),
    Object.entries(o.groups).map(([v, c]) => h('tr', {},
      h('td', {}, h('a', { href: '#/devices?label=' + enc(group + '=' + v) }, v || '(none)')),
      h('td', {}, c.online), h('td', {}, c.stale), h('td', {}, c.offline))))) : null;
  const a = o.attention;
  const attention = [];
  for (const d of a.silent) {
    attention.push(h('li', {}, badge(d.status), ' device ', h('a', { href: '#/devices/' + enc(d.id) }, d.id),
      ' — last heard ', ago(d.last_seen_ms)));
  }
  if (a.silent_total > a.silent.length) {
    attention.push(h('li', {}, h('a', { href: '#/devices?sort=status' }, (a.silent_total - a.silent.length) + ' more silent devices')));
  }
  for (const w of a.failing) {
    attention.push(h('li', {}, badge('Failed'), ' workload ', h('a', { href: '#/workloads/' + enc(w.workload) }, w.workload),
      ' on ' + w.devices.length + ' device(s): ', w.reason));
  }
  for (const r of a.stopped_rollouts) {
    attention.push(h('li', {}, badge(r.state), ' rollout of ', h('a', { href: '#/workloads/' + enc(r.workload) }, r.workload),
      ' to revision ' + r.to, r.reason ? ': ' + r.reason : ''));
  }
  show(
    h('h1', {}, 'Fleet'),
    h('div', { class: 'cards', id: 'status-cards' },
      card('devices', o.devices, '', '#/devices'),
      card('online', o.status.online, 's-online', '#/devices?status=online'),
      card('stale', o.status.stale, 's-stale', '#/devices?status=stale'),
      card('offline', o.status.offline, 's-offline', '#/devices?status=offline')),
    h('h2', {}, 'Needs attention'),
    attention.length ? h('ul', { class: 'feed', id: 'attention' }, attention) : h('p', { class: 'muted', id: 'attention' }, 'Nothing: every device is online and every workload healthy.'),
    h('div', { class: 'toolbar' }, h('h2', {}, 'By label'), pick),
    groups,
    h('div', { class: 'grid2' },
      h('div', {}, h('h2', {}, 'Agent versions'), counts(o.agent_versions)),
      h('div', {}, h('h2', {}, 'Architectures'), counts(o.arches))),
  );
}

// ---------- devices ----------

async function devices(params) {
  const search = h('input', { type: 'search', id: 'search', placeholder: 'Search id, label, version…', value: params.get('q') || '' });
  const status = h('select', { id: 'status' }, ['', 'online', 'stale', 'offline'].map((s) =>
    h('option', { value: s, selected: s === (params.get('status') || '') }, s || 'any status')));
  const holder = h('div', {});
  show(h('h1', {}, 'Devices'), h('div', { class: 'toolbar' }, search, status), holder);
  const load = async () => {
    const q = new URLSearchParams();
    for (const k of ['q', 'status', 'label', 'sort', 'desc']) if (params.get(k)) q.set(k, params.get(k));
    const page = Number(params.get('page') || 0);
    q.set('offset', page * PAGE);
    q.set('limit', PAGE);
    const r = await request('/api/v1/devices?' + q);
    const total = Number(r.headers.get('x-total-count') || 0);
    const list = await r.json();
    const sort = params.get('sort') || 'id';
    const desc = params.get('desc') === 'true';
    const th = (key, label, cls) => h('th', {
      class: 'sortable' + (sort === key ? ' sorted' + (desc ? ' desc' : '') : '') + (cls ? ' ' + cls : ''),
      onclick: () => {
        params.set('desc', sort === key && !desc ? 'true' : 'false');
        params.set('sort', key);
        params.delete('page');
        setParams(params);
        load();
      },
    }, label);
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
    const go = (p) => { params.set('page', p); setParams(params); load(); };
    const first = total ? page * PAGE + 1 : 0;
    fill(holder,
      h('div', { class: 'scroll' }, table),
      h('div', { class: 'pager' },
        h('button', { disabled: page === 0, onclick: () => go(page - 1) }, '‹ Previous'),
        h('span', { id: 'count', class: 'muted' }, first + '–' + (page * PAGE + list.length) + ' of ' + total),
        h('button', { disabled: (page + 1) * PAGE >= total, onclick: () => go(page + 1) }, 'Next ›')));
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
      load().catch((e) => holder.replaceChildren(failure(e)));
    }, 200);
  };
  search.addEventListener('input', refilter);
  status.addEventListener('change', refilter);
  await load();
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
  return h('div', { class: 'card' }, h('div', { class: 'muted' }, label + ': ', h('strong', {}, last)), box);
}

async function device(id) {
  const [d, samples, evs] = await Promise.all([
    api('/api/v1/devices/' + enc(id)),
    api('/api/v1/devices/' + enc(id) + '/samples'),
    api('/api/v1/events?limit=20&subject=' + enc(id)),
  ]);
  const inv = d.inventory || {};
  const hb = d.heartbeat || {};
  const kv = (pairs) => h('dl', { class: 'kv' }, pairs.filter(([, v]) => v !== undefined && v !== '' && v !== null)
    .map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
  const labels = h('div', { class: 'chips', id: 'labels' }, Object.entries(d.labels).map(([k, v]) =>
    h('span', { class: 'chip' }, k + '=' + v,
      isAdmin() && k in d.operator_labels
        ? h('button', { title: 'remove', onclick: () => relabel({ remove: [k] }) }, '×') : null)));
  const relabel = async (change) => {
    try {
      await post('/api/v1/devices/' + enc(id) + '/labels', change, 'PATCH');
      route();
    } catch (e) { labels.after(failure(e)); }
  };
  const add = isAdmin() ? h('form', {
    class: 'toolbar', id: 'add-label',
    onsubmit: (ev) => {
      ev.preventDefault();
      const [k, ...v] = ev.target.elements.label.value.split('=');
      relabel({ set: { [k.trim()]: v.join('=').trim() } });
    },
  }, h('input', { name: 'label', placeholder: 'key=value', required: true, pattern: '[^=]+=.*' }), h('button', { type: 'submit' }, 'Set label')) : null;
  const log = h('div', { id: 'log-panel' });
  const workloads = (d.report && d.report.workloads) || [];
  const wtable = h('table', { id: 'device-workloads' },
    h('tr', {}, h('th', {}, 'Workload'), h('th', {}, 'Rev'), h('th', {}, 'Phase'), h('th', {}, 'Health'), h('th', {}, 'Restarts'),
      h('th', {}, 'Last error'), h('th', {}, '')),
    workloads.map((w) => h('tr', {},
      h('td', {}, h('a', { href: '#/workloads/' + enc(w.name) }, w.name)),
      h('td', {}, w.revision), h('td', {}, badge(w.phase)), h('td', {}, badge(w.health)), h('td', {}, w.restarts),
      h('td', { class: 'wrap' }, w.last_error || ''),
      h('td', {}, h('button', { 'data-logs': w.name, onclick: () => tail(id, w.name, log) }, 'Logs')))));
  const feed = h('ul', { class: 'feed', id: 'device-events' }, newestFirst(evs).map(eventRow));
  const dot = liveDot();
  show(
    h('h1', {}, id, badge(d.status), d.tenant && !S.who.tenant ? h('span', { class: 'chip' }, 'tenant ' + d.tenant) : null),
    d.refusal ? h('p', { class: 'error' }, 'Refused its desired document ' + ago(d.refusal.at_ms) + ': ' + d.refusal.reason) : null,
    h('div', { class: 'grid2' },
      h('div', { class: 'card' }, kv([
        ['Agent', d.agent_version], ['Architecture', inv.arch + (inv.arch_variant ? ' ' + inv.arch_variant : '')],
        ['OS', inv.os], ['Kernel', inv.kernel], ['Hostname', inv.hostname], ['CPUs', inv.cpus],
        ['Memory', inv.memory_bytes ? bytes(inv.memory_bytes) : undefined], ['Disk', inv.disk_bytes ? bytes(inv.disk_bytes) : undefined],
        ['Free disk', hb.disk_free_mib !== undefined ? bytes(hb.disk_free_mib * 1048576) : undefined],
        ['Temperature', hb.temp_milli_c ? (hb.temp_milli_c / 1000).toFixed(1) + ' °C' : undefined],
        ['Addresses', (inv.addresses || []).join(', ')], ['Uptime', hb.uptime_s ? Math.round(hb.uptime_s / 3600) + ' h' : undefined],
        ['Clock offset', d.clock_offset_ms !== null && d.clock_offset_ms !== undefined ? d.clock_offset_ms + ' ms' : undefined],
        ['First seen', when(d.first_seen_ms)], ['Last seen', ago(d.last_seen_ms)],
      ])),
      h('div', {}, h('h2', {}, 'Labels'), labels, add)),
    h('h2', {}, 'Last hour'),
    h('div', { class: 'grid2', id: 'charts' },
      chart(samples, (s) => s.load1_centi / 100, 'Load (1 min)', inv.cpus || 1, (v) => v.toFixed(2)),
      chart(samples, (s) => s.mem_used_kib * 1024, 'Memory used', samples.length ? samples[0].mem_total_kib * 1024 : 0, bytes)),
    h('h2', {}, 'Workloads'),
    workloads.length ? h('div', { class: 'scroll' }, wtable) : h('p', { class: 'muted' }, 'No workloads reported.'),
    log,
    h('h2', {}, 'Recent events ', dot),
    feed,
  );
  follow('/api/v1/events/stream?subject=' + enc(id), (kind, data) => {
    if (kind === 'event') feed.prepend(eventRow(JSON.parse(data)));
  }, dot);
}

// Tails and follows a workload's log on a device, in the page.
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

function rolloutPanel(name, r) {
  if (!r) return h('p', { class: 'muted' }, 'No rollout yet.');
  const c = r.counts;
  const pct = (n) => (c.devices ? (100 * n / c.devices) : 0) + '%';
  const bar = h('div', { class: 'bar', title: 'ready / in progress / failed of ' + c.devices },
    h('span', { class: 'ready' }), h('span', { class: 'pending' }), h('span', { class: 'failed' }));
  bar.children[0].style.width = pct(c.ready);
  bar.children[1].style.width = pct(Math.max(0, c.released - c.ready - c.failed));
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
    if (r.state === 'progressing' || r.state === 'paused') actions.push(act('abort', 'Abort', 'danger', `Abort the rollout of ${name}? Every device goes back to revision ${r.from}.`));
    actions.push(act('undo', 'Undo', 'danger', `Undo ${name}: apply the revision before ${r.to} again as a new revision?`));
  }
  return h('div', { class: 'card', id: 'rollout', 'data-state': r.state, 'data-wave': r.wave },
    h('div', { class: 'toolbar' }, badge(r.state), h('strong', {}, 'revision ' + r.from + ' → ' + r.to),
      h('span', { id: 'wave' }, 'wave ' + r.wave + ' of ' + r.waves), h('span', { class: 'muted' }, 'started ' + ago(r.started_ms))),
    bar,
    h('div', { class: 'legend', id: 'counts' },
      h('span', {}, c.ready + ' ready'), h('span', {}, c.released + ' released'), h('span', {}, c.pending + ' pending'),
      h('span', {}, c.failed + ' failed'), h('span', {}, c.devices + ' devices')),
    r.reason ? h('p', {}, r.reason) : null,
    r.waiting ? h('p', { class: 'muted' }, 'Waiting: ' + r.waiting) : null,
    r.failed.length ? h('ul', {}, r.failed.map(([d, why]) => h('li', {}, h('a', { href: '#/devices/' + enc(d) }, d), ': ' + why))) : null,
    (r.held || []).length ? h('ul', {}, r.held.map(([d, why]) => h('li', {}, h('a', { href: '#/devices/' + enc(d) }, d), ' holds it: ' + why))) : null,
    actions.length ? h('div', { class: 'toolbar' }, actions) : null);
}

const SHOWN = 200;

async function workload(name) {
  const w = await api('/api/v1/workloads/' + enc(name));
  const panel = h('div', { id: 'rollout-panel' }, rolloutPanel(name, w.rollout));
  const devicesHolder = h('div', {});
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
    w.devices.length > SHOWN ? h('p', { class: 'muted' }, (w.devices.length - SHOWN) + ' more devices: see ', h('a', { href: '#/devices' }, 'Devices'), '.') : null);
  };
  const summary = h('div', {});
  const revisions = h('div', {});
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
  // The rollout is pushed at every change; the devices table follows it,
  // at most every two seconds.
  let lastFetch = 0, queued = false;
  const refresh = async () => {
    if (queued) return;
    queued = true;
    await new Promise((ok) => setTimeout(ok, Math.max(0, lastFetch + 2000 - Date.now())));
    queued = false;
    lastFetch = Date.now();
    try { render(await api('/api/v1/workloads/' + enc(name))); } catch (e) { /* the next change tries again */ }
  };
  follow('/api/v1/workloads/' + enc(name) + '/rollout/watch', (kind, data) => {
    if (kind === 'rollout') {
      panel.replaceChildren(rolloutPanel(name, JSON.parse(data)));
      refresh();
    } else if (kind === 'gone') {
      panel.replaceChildren(h('p', { class: 'error' }, JSON.parse(data)));
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
  const list = await api('/api/v1/events?limit=200');
  const feed = h('ul', { class: 'feed', id: 'events' });
  const shown = (e) => {
    const q = filter.value.toLowerCase();
    return !q || [e.name, e.kind, e.subject, e.message].some((s) => (s || '').toLowerCase().includes(q));
  };
  const all = newestFirst(list);
  const render = () => feed.replaceChildren(...all.filter(shown).slice(0, 500).map(eventRow));
  filter.addEventListener('input', () => {
    if (filter.value) params.set('q', filter.value); else params.delete('q');
    setParams(params);
    render();
  });
  const dot = liveDot();
  show(h('h1', {}, 'Events ', dot), h('div', { class: 'toolbar' }, filter), feed);
  render();
  follow('/api/v1/events/stream', (kind, data) => {
    if (kind !== 'event') return;
    const e = JSON.parse(data);
    all.unshift(e);
    if (all.length > 2000) all.pop();
    if (shown(e)) feed.prepend(eventRow(e));
  }, dot);
}
