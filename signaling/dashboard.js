// Plaza operator dashboard: follows GET /dashboard/events (Server-Sent Events; see
// DASHBOARD.md). The first event is a `snapshot` (the whole view), then `delta` events carry
// only what was added (`set`), changed (`set`) or removed (`removed`, by key); the page
// updates the DOM nodes of those entities only. Each track has a small chart of its bitrate
// and its publisher's uplink loss over the last minutes, drawn from the values the stream
// gave (nothing but this server is ever asked for anything).
'use strict';

const TOKEN_KEY = 'plaza-dashboard-token';
const HISTORY_POINTS = 300; // one a second: five minutes
const CHART_W = 240;
const CHART_H = 44;

const $ = (id) => document.getElementById(id);

// The view, as the stream described it: kind → key → entity.
const view = { server: {}, rooms: new Map(), participants: new Map(), tracks: new Map(), subscriptions: new Map() };
// DOM nodes by entity key.
const nodes = { rooms: new Map(), participants: new Map(), tracks: new Map(), subscriptions: new Map() };
// Chart history by track key: [{bps, loss}] (oldest first).
const chartHistory = new Map();
// For tests and curious operators: what arrived.
const stats = { snapshots: 0, deltas: 0, bytes: 0, lastSeq: null, loadId: Math.random().toString(36).slice(2) };
window.plazaDashboard = { view, stats };

const keyOf = (k) => `${k.room}\u0000${k.id}`;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function setText(node, text) {
  const t = String(text);
  if (node.textContent !== t) node.textContent = t;
}

function fmtBps(bps) {
  if (bps === null || bps === undefined) return '–';
  if (bps >= 1e6) return `${(bps / 1e6).toFixed(bps >= 1e7 ? 0 : 1)} Mb/s`;
  if (bps >= 1e3) return `${(bps / 1e3).toFixed(bps >= 1e4 ? 0 : 1)} kb/s`;
  return `${bps} b/s`;
}

function fmtLoss(permille) {
  return permille === null || permille === undefined ? '–' : `${(permille / 10).toFixed(1)} %`;
}

function fmtTime(unix) {
  return new Date(unix * 1000).toLocaleTimeString();
}

function showMessage(text) {
  const m = $('message');
  m.textContent = text || '';
  m.hidden = !text;
}

function setStatus(state, text) {
  const s = $('status');
  s.dataset.state = state;
  setText(s, text);
}

// ------------------------------------------------------------------------- rooms

function roomNode(room) {
  let n = nodes.rooms.get(room);
  if (n) return n;
  const section = el('section', 'room');
  section.dataset.room = room;
  const h = el('h2', null, room);
  const meta = el('small');
  h.append(meta);
  const list = el('div', 'participants');
  section.append(h, list);
  // Rooms in name order.
  const after = [...nodes.rooms.keys()].filter((r) => r > room).sort()[0];
  $('rooms').insertBefore(section, after ? nodes.rooms.get(after).section : null);
  n = { section, meta, list };
  nodes.rooms.set(room, n);
  $('no-rooms').hidden = true;
  return n;
}

function setRoom(r) {
  const n = roomNode(r.room);
  setText(n.meta, `open since ${fmtTime(r.created_at)}`);
}

function removeRoom(k) {
  const n = nodes.rooms.get(k.room);
  if (n) n.section.remove();
  nodes.rooms.delete(k.room);
  $('no-rooms').hidden = nodes.rooms.size > 0;
}

// ------------------------------------------------------------------ participants

function participantNode(k) {
  const key = keyOf(k);
  let n = nodes.participants.get(key);
  if (n) return n;
  const div = el('div', 'participant');
  div.dataset.participant = k.id;
  const head = el('div', 'head');
  const f = {
    name: el('span', 'name'),
    identity: el('span', 'meta'),
    state: el('span', 'state'),
    quality: el('span', 'quality'),
    bwe: el('span', 'num'),
    loss: el('span', 'num'),
    joined: el('span', 'meta'),
  };
  head.append(f.name, f.identity, f.state, f.quality, f.bwe, f.loss, f.joined);
  const tracks = el('ul', 'tracks');
  const subs = el('ul', 'subs');
  div.append(head, tracks, subs);
  roomNode(k.room).list.append(div);
  n = { div, f, tracks, subs };
  nodes.participants.set(key, n);
  return n;
}

function setParticipant(p) {
  const n = participantNode(p);
  setText(n.f.name, p.name || p.id);
  setText(n.f.identity, `${p.identity ?? ''} ${p.id}${p.hidden ? ' (hidden)' : ''}`.trim());
  n.f.state.dataset.state = p.state;
  setText(n.f.state, p.state);
  n.f.quality.dataset.quality = p.quality ?? '';
  setText(n.f.quality, p.quality ? `${p.quality} (${p.score ?? '–'})` : 'quality –');
  setText(n.f.bwe, `downlink est. ${fmtBps(p.available_bps)}`);
  setText(n.f.loss, `loss ↓ ${fmtLoss(p.downlink_loss_permille)} ↑ ${fmtLoss(p.uplink_loss_permille)}`);
  setText(n.f.joined, `joined ${fmtTime(p.joined_at)}`);
  // An active speaker (the room's `speakers`): highlighted, with a label for screen readers.
  n.div.classList.toggle('speaking', !!p.speaking);
  n.f.name.title = p.speaking ? 'speaking' : '';
}

function removeParticipant(k) {
  const key = keyOf(k);
  const n = nodes.participants.get(key);
  if (n) n.div.remove();
  nodes.participants.delete(key);
}

// ------------------------------------------------------------------------ tracks

function trackNode(t) {
  const key = keyOf(t);
  let n = nodes.tracks.get(key);
  if (n) return n;
  const li = el('li', 'track');
  li.dataset.track = t.id;
  const title = el('span');
  const layers = el('span', 'layers num');
  const canvas = el('canvas');
  canvas.width = CHART_W;
  canvas.height = CHART_H;
  const legend = el('span', 'legend');
  legend.append(el('span', 'bps', 'bitrate'), ' / ', el('span', 'loss', 'uplink loss'), ', last 5 min');
  li.append(title, layers, canvas, legend);
  n = { li, title, layers, canvas, parent: null };
  nodes.tracks.set(key, n);
  return n;
}

function setTrack(t) {
  const n = trackNode(t);
  const owner = participantNode({ room: t.room, id: t.participant_id });
  if (n.parent !== owner.tracks) {
    owner.tracks.append(n.li);
    n.parent = owner.tracks;
  }
  setText(n.title, `${t.kind} ${t.mime_type}${t.muted ? ' (muted)' : ''} ${t.id}`);
  setText(n.layers, t.layers.map((l) => {
    const name = l.rid || 'single';
    const size = l.width ? ` ${l.width}×${l.height}` : '';
    return `${name}${size}: ${l.active ? fmtBps(l.bitrate_bps) : 'inactive'}`;
  }).join(' · '));
}

function removeTrack(k) {
  const key = keyOf(k);
  const n = nodes.tracks.get(key);
  if (n) n.li.remove();
  nodes.tracks.delete(key);
  chartHistory.delete(key);
}

// ----------------------------------------------------------------- subscriptions

function setSubscription(s) {
  const key = keyOf(s);
  let n = nodes.subscriptions.get(key);
  if (!n) {
    const li = el('li', 'sub');
    li.dataset.subscription = s.id;
    n = { li, parent: null };
    nodes.subscriptions.set(key, n);
  }
  const owner = participantNode({ room: s.room, id: s.subscriber });
  if (n.parent !== owner.subs) {
    owner.subs.append(n.li);
    n.parent = owner.subs;
  }
  const t = view.tracks.get(keyOf({ room: s.room, id: s.track }));
  const from = t ? view.participants.get(keyOf({ room: s.room, id: t.participant_id })) : null;
  const what = t ? `${t.kind} of ${from?.name ?? t.participant_id}` : s.track;
  let layer = '';
  if (s.paused) layer = ' — paused';
  else if (s.layer || s.target) {
    layer = ` — layer ${s.layer ?? '–'}${s.target && s.target !== s.layer ? ` → ${s.target}` : ''}`;
  }
  n.li.replaceChildren('receives ', el('b', null, what), layer);
}

function removeSubscription(k) {
  const key = keyOf(k);
  const n = nodes.subscriptions.get(key);
  if (n) n.li.remove();
  nodes.subscriptions.delete(key);
}

// ------------------------------------------------------------------------ server

function setServer(s) {
  view.server = s;
  setText($('server-cpu'), s.cpu_percent === null || s.cpu_percent === undefined ? '–' : `${s.cpu_percent} %`);
  setText($('server-pps'), s.forwarded_pps === null || s.forwarded_pps === undefined ? '–' : `${s.forwarded_pps} pkt/s`);
  setText($('server-rooms'), s.rooms);
  setText($('server-participants'), s.participants);
  setText($('server-shards'), s.shards);
}

// ------------------------------------------------------------------------- apply

const KINDS = [
  ['rooms', setRoom, removeRoom],
  ['participants', setParticipant, removeParticipant],
  ['tracks', setTrack, removeTrack],
  ['subscriptions', setSubscription, removeSubscription],
];

function clearAll() {
  for (const [kind, , remove] of [...KINDS].reverse()) {
    for (const e of [...view[kind].values()]) remove(e);
    view[kind].clear();
  }
}

function apply(delta) {
  if (delta.server) setServer(delta.server);
  // Removals innermost first, additions outermost first.
  for (const [kind, , remove] of [...KINDS].reverse()) {
    for (const k of delta[kind]?.removed ?? []) {
      view[kind].delete(keyOf(k));
      remove(k);
    }
  }
  for (const [kind, set] of KINDS) {
    for (const e of delta[kind]?.set ?? []) {
      view[kind].set(keyOf(e), e);
      set(e);
    }
  }
  // A participant renamed: the subscriptions naming it.
  if (delta.participants?.set?.length || delta.tracks?.set?.length) {
    for (const s of view.subscriptions.values()) setSubscription(s);
  }
}

// ------------------------------------------------------------------------ charts

function sampleCharts() {
  for (const [key, t] of view.tracks) {
    const bps = t.layers.reduce((sum, l) => sum + (l.active ? l.bitrate_bps : 0), 0);
    const owner = view.participants.get(keyOf({ room: t.room, id: t.participant_id }));
    const loss = owner?.uplink_loss_permille ?? 0;
    let h = chartHistory.get(key);
    if (!h) chartHistory.set(key, (h = []));
    h.push({ bps, loss });
    if (h.length > HISTORY_POINTS) h.shift();
    const n = nodes.tracks.get(key);
    if (n) draw(n.canvas, h);
  }
}

function draw(canvas, h) {
  const ctx = canvas.getContext('2d');
  ctx.clearRect(0, 0, CHART_W, CHART_H);
  const maxBps = Math.max(1, ...h.map((p) => p.bps));
  const maxLoss = Math.max(50, ...h.map((p) => p.loss));
  const x = (i) => CHART_W - (h.length - 1 - i) * (CHART_W / HISTORY_POINTS);
  const line = (color, y) => {
    ctx.strokeStyle = color;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    h.forEach((p, i) => (i ? ctx.lineTo(x(i), y(p)) : ctx.moveTo(x(i), y(p))));
    ctx.stroke();
  };
  line('#4f8cff', (p) => CHART_H - 2 - (p.bps / maxBps) * (CHART_H - 4));
  line('#e5484d', (p) => CHART_H - 2 - (p.loss / maxLoss) * (CHART_H - 4));
  ctx.fillStyle = '#9aa1ab';
  ctx.font = '10px system-ui, sans-serif';
  ctx.fillText(fmtBps(maxBps), 3, 11);
}

// ------------------------------------------------------------------------ stream

async function devToken() {
  const res = await fetch(`/dev/token?room=dashboard&identity=dashboard-${stats.loadId}&name=Dashboard&grants=list&ttl=3600`);
  if (!res.ok) return null;
  return (await res.json()).token;
}

async function explainFailure(url) {
  try {
    const res = await fetch(url, { headers: { Accept: 'application/json' } });
    if (res.ok) return null;
    const body = await res.json().catch(() => ({}));
    return { status: res.status, message: body.message || `HTTP ${res.status}` };
  } catch (e) {
    return { status: 0, message: String(e) };
  }
}

let source = null;
// In a cluster: the node whose view is shown ('' for the node serving this page).
let watchedNode = '';

/**
 * In a cluster (`GET /api/nodes` answers), offer every live node: the stream of another node
 * is relayed by this one (`/dashboard/events?node=<id>`). One node: the picker stays hidden.
 */
async function loadNodes(token) {
  let list;
  try {
    const res = await fetch('/api/nodes', { headers: { Authorization: `Bearer ${token}` } });
    if (!res.ok) return;
    list = await res.json();
  } catch {
    return;
  }
  const select = $('node');
  select.replaceChildren();
  for (const n of list.nodes ?? []) {
    const option = document.createElement('option');
    option.value = n.id === list.self ? '' : n.id;
    option.textContent = `${n.id}${n.id === list.self ? ' (this one)' : ''} · ${n.address}`;
    select.append(option);
  }
  select.value = watchedNode;
  select.onchange = () => {
    watchedNode = select.value;
    clearAll();
    watch(token);
  };
  $('node-pick').hidden = false;
}

function watch(token) {
  if (source) source.close();
  const node = watchedNode ? `&node=${encodeURIComponent(watchedNode)}` : '';
  const url = `/dashboard/events?access_token=${encodeURIComponent(token)}${node}`;
  setStatus('connecting', 'connecting…');
  source = new EventSource(url);
  source.addEventListener('open', () => {
    setStatus('live', 'live');
    showMessage('');
  });
  source.addEventListener('snapshot', (ev) => {
    stats.snapshots += 1;
    stats.bytes += ev.data.length;
    const d = JSON.parse(ev.data);
    stats.lastSeq = d.seq;
    clearAll();
    apply(d);
  });
  source.addEventListener('delta', (ev) => {
    stats.deltas += 1;
    stats.bytes += ev.data.length;
    const d = JSON.parse(ev.data);
    stats.lastSeq = d.seq;
    apply(d);
  });
  source.addEventListener('error', async () => {
    if (source.readyState !== EventSource.CLOSED) {
      setStatus('connecting', 'reconnecting…');
      return;
    }
    setStatus('failed', 'not connected');
    const why = await explainFailure(url);
    if (why && (why.status === 401 || why.status === 403)) {
      sessionStorage.removeItem(TOKEN_KEY);
      $('token-form').hidden = false;
    }
    showMessage(why ? `The stream was refused: ${why.message}` : 'The stream ended.');
  });
}

async function start() {
  setInterval(sampleCharts, 1000);
  $('token-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const token = $('token').value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    $('token-form').hidden = true;
    watch(token);
    loadNodes(token);
  });
  const fromUrl = new URLSearchParams(location.search).get('token');
  if (fromUrl) {
    sessionStorage.setItem(TOKEN_KEY, fromUrl);
    // Keep the token out of the address bar (and of screenshots, history).
    window.history.replaceState(null, '', location.pathname);
  }
  const token = fromUrl || sessionStorage.getItem(TOKEN_KEY) || (await devToken().catch(() => null));
  if (token) {
    watch(token);
    loadNodes(token);
  } else {
    $('token-form').hidden = false;
    setStatus('failed', 'no token');
  }
}

start();
