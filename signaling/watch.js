// Plaza WHEP player (/watch): plays a room with one HTTP request (WHEP, draft-ietf-wish-whep),
// no WebSocket and no Plaza client code: a recvonly offer POSTed to /whep/{room}, the answer
// applied, the video played. See WHEP.md.
//
// URL parameters: room (required), participant (play that participant, its id or identity,
// instead of the room's host), track (that track only, by server track id), token (a token
// with the subscribe grant; in development mode one is fetched from /dev/token),
// quality=low|medium|high (the video layer to ask for; default automatic).

const $ = (sel) => document.querySelector(sel);
const params = new URLSearchParams(location.search);
const LAYER_REL = 'urn:ietf:params:whep:ext:core:layer';
/** How long to wait for ICE gathering before sending the offer (the server is ICE-lite: the
 *  offer needs no candidates, they only help). */
const GATHER_MAX_MS = 1000;
/** ICE `disconnected`/`failed` this long → ICE restart. */
const RESTART_AFTER_MS = 2000;
/** An ICE restart that has not connected after this long → a new session (re-POST). */
const RESTART_TIMEOUT_MS = 10_000;
/** Seconds without a new frame (or audio packet) after which the page says it is waiting. */
const STALL_TICKS = 3;
/** Longest wait before posting again after a failure, in ms. */
const MAX_BACKOFF_MS = 15_000;

const video = $('#video');
const room = params.get('room')?.trim() || null;
const participant = params.get('participant')?.trim() || null;
const trackId = params.get('track')?.trim() || null;
const QUALITIES = ['low', 'medium', 'high'];

/** State for tests and for poking at from the console. */
const watch = (window.watch = {
  /** idle | connecting | waiting | playing | reconnecting | error | ended */
  state: 'idle',
  statusText: '',
  error: null,
  frameWidth: 0,
  frameHeight: 0,
  framesDecoded: 0,
  fps: 0,
  audioPacketsReceived: 0,
  /** The session URL (the POST's `Location`), null when there is none. */
  session: null,
  etag: null,
  layerUrl: null,
  iceServers: [],
  /** The layer asked for: low | medium | high, or null (automatic). */
  quality: QUALITIES.includes(params.get('quality')) ? params.get('quality') : null,
  /** Status of the last layer POST (204 when the server took it). */
  layerStatus: null,
  /** performance.now() of the latest session's start (offer, gathering), its POST, its answer,
   *  ICE connected, the first decoded frame. */
  times: { start: null, post: null, answer: null, connected: null, firstFrame: null },
  posts: 0,
  iceRestarts: 0,
  /** The last state changes and connection events: [{t: performance.now(), what}]. */
  events: [],
  pc: null,
  /** Restart ICE now (as after a network change). */
  restartIce: () => restartIce('asked'),
  /** End the session (as leaving the page does). */
  stop: () => stop(),
});

let token = params.get('token') || null;
let devToken = false;
let gen = 0; // bumped by every new session attempt: stale callbacks check it
let iceTimer = null;
let restartTimer = null;
let retryTimer = null;
let restarting = false;
let failures = 0;
let last = { t: 0, frames: 0, audio: 0 };
let stall = 0;

// ---- UI ----

const STATUS_TEXT = {
  idle: 'not playing',
  connecting: 'connecting…',
  waiting: 'waiting for the host…',
  playing: 'playing',
  reconnecting: 'reconnecting…',
  error: 'error',
  ended: 'ended',
};

function note(what) {
  watch.events.push({ t: Math.round(performance.now()), what });
  if (watch.events.length > 50) watch.events.shift();
}

function setState(state, text = STATUS_TEXT[state] ?? state) {
  if (state !== watch.state) note(`state ${state}`);
  watch.state = state;
  watch.statusText = text;
  video.dataset.state = state;
  $('#status').dataset.state = state;
  $('#status').textContent = text;
  $('#overlay').textContent = text;
  $('#overlay').hidden = state === 'playing';
}

function showMessage(text, kind = 'error') {
  $('#message-text').textContent = text;
  $('#message').className = `message ${kind === 'error' ? '' : kind}`.trim();
  $('#message').hidden = false;
}
$('#message-close').onclick = () => ($('#message').hidden = true);

function fail(text) {
  watch.error = text;
  setState('error', `error: ${text}`);
  showMessage(text);
}

function showLayer() {
  const el = $('#layer');
  const asked = watch.quality ? ` · asked: ${watch.quality}` : ' · auto';
  el.textContent = watch.frameWidth ? `${watch.frameWidth}×${watch.frameHeight} · ${Math.round(watch.fps)} fps${asked}` : `no video yet${asked}`;
  video.dataset.frameWidth = String(watch.frameWidth);
  video.dataset.frameHeight = String(watch.frameHeight);
  video.dataset.framesDecoded = String(watch.framesDecoded);
  video.dataset.fps = String(Math.round(watch.fps));
}

// ---- SDP helpers ----

/** `Link` header → [{url, rel, params}] (RFC 8288; enough for WHIP/WHEP links). */
function parseLinks(header, base) {
  const out = [];
  if (!header) return out;
  for (const m of header.matchAll(/<([^>]*)>([^<]*)/g)) {
    const params = {};
    for (const p of m[2].matchAll(/;\s*([^\s=;,]+)\s*(?:=\s*(?:"([^"]*)"|([^;,\s]*)))?/g)) params[p[1].toLowerCase()] = p[2] ?? p[3] ?? '';
    let url = m[1];
    try {
      if (!/^(stun|stuns|turn|turns):/i.test(url)) url = new URL(url, base).href;
    } catch {}
    out.push({ url, rel: params.rel ?? '', params });
  }
  return out;
}

/** The ICE servers of `rel="ice-server"` links, as RTCIceServer entries. */
function iceServersFrom(links) {
  return links
    .filter((l) => l.rel === 'ice-server')
    .map((l) => (l.params.username ? { urls: l.url, username: l.params.username, credential: l.params.credential ?? '' } : { urls: l.url }));
}

/** Resolve when ICE gathering is complete, or after `ms` (whichever comes first). */
function gathered(pc, ms) {
  if (pc.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      pc.removeEventListener('icegatheringstatechange', check);
      resolve();
    };
    const check = () => pc.iceGatheringState === 'complete' && done();
    const timer = setTimeout(done, ms);
    pc.addEventListener('icegatheringstatechange', check);
  });
}

/** SDP → {session: lines, media: [lines]} (split at every `m=` line). */
function sections(sdp) {
  const lines = sdp.split(/\r?\n/).filter(Boolean);
  const out = { session: [], media: [] };
  for (const l of lines) {
    if (l.startsWith('m=')) out.media.push([l]);
    else if (out.media.length) out.media.at(-1).push(l);
    else out.session.push(l);
  }
  return out;
}

/**
 * The trickle-ice-sdpfrag (RFC 8840) of an ICE restart offer: its new credentials, then each
 * m-line with its mid; the candidates (at most 64) under the first one (everything is bundled).
 */
function restartFragment(offer, complete) {
  const { session, media } = sections(offer);
  const all = [...session, ...media.flat()];
  const ufrag = all.find((l) => l.startsWith('a=ice-ufrag:'));
  const pwd = all.find((l) => l.startsWith('a=ice-pwd:'));
  const out = [ufrag, pwd];
  media.forEach((m, i) => {
    out.push(m[0]);
    const mid = m.find((l) => l.startsWith('a=mid:'));
    if (mid) out.push(mid);
    if (i === 0) {
      out.push(...m.filter((l) => l.startsWith('a=candidate:')).slice(0, 64));
      if (complete) out.push('a=end-of-candidates');
    }
  });
  return `${out.join('\r\n')}\r\n`;
}

/**
 * The answer to set after an ICE restart (RFC 9725): the session's answer with the server's
 * new credentials and candidates from its fragment.
 */
function restartedAnswer(oldAnswer, frag) {
  const fl = frag.split(/\r?\n/);
  const ufrag = fl.find((l) => l.startsWith('a=ice-ufrag:'));
  const pwd = fl.find((l) => l.startsWith('a=ice-pwd:'));
  if (!ufrag || !pwd) throw new Error('the server\'s ICE restart fragment has no credentials');
  const candidates = fl.filter((l) => l.startsWith('a=candidate:'));
  const out = [];
  for (const l of oldAnswer.split(/\r?\n/).filter(Boolean)) {
    if (l.startsWith('a=candidate:') || l === 'a=end-of-candidates') continue;
    if (l.startsWith('a=ice-ufrag:')) out.push(ufrag);
    else if (l.startsWith('a=ice-pwd:')) out.push(pwd);
    else out.push(l);
    if (l.startsWith('a=mid:')) out.push(...candidates, 'a=end-of-candidates');
  }
  return `${out.join('\r\n')}\r\n`;
}

// ---- the session ----

function endpoint() {
  let path = `/whep/${encodeURIComponent(room)}`;
  if (participant) path += `/${encodeURIComponent(participant)}`;
  const url = new URL(path, location.href);
  if (trackId) url.searchParams.set('track', trackId);
  return url.href;
}

async function getToken() {
  if (token) return token;
  const res = await fetch(`/dev/token?room=${encodeURIComponent(room)}&grants=subscribe&name=viewer`);
  if (res.status === 404) throw Object.assign(new Error('this server needs an access token: add ?token=… (a token with the subscribe grant for this room) to the URL'), { fatal: true });
  if (!res.ok) throw new Error(`could not get a development token: ${res.status} ${await res.text()}`);
  token = (await res.json()).token;
  devToken = true;
  return token;
}

class HttpError extends Error {
  constructor(status, body, retryAfter) {
    super(`${status}: ${body.trim() || 'no reason given'}`);
    this.status = status;
    this.body = body.trim();
    this.retryAfter = retryAfter;
  }
}

function clearTimers() {
  for (const t of [iceTimer, restartTimer, retryTimer]) clearTimeout(t);
  iceTimer = restartTimer = retryTimer = null;
}

/** Close the peer connection and DELETE the session (in the background; keepalive on unload). */
function teardown({ unloading = false } = {}) {
  clearTimers();
  if (watch.session) {
    fetch(watch.session, { method: 'DELETE', keepalive: unloading }).catch(() => {});
    watch.session = null;
  }
  watch.etag = null;
  watch.layerUrl = null;
  watch.pc?.close();
  watch.pc = null;
}

function stop() {
  gen++;
  teardown({ unloading: true });
  setState('ended');
}

/** POST a new session (closing any previous one) and apply its answer. */
async function connect(reason = null) {
  const my = ++gen;
  teardown();
  setState(reason ? 'reconnecting' : 'connecting', reason ? `reconnecting (${reason})…` : STATUS_TEXT.connecting);
  let pc = null;
  const start = performance.now();
  try {
    const bearer = await getToken();
    if (my !== gen) return;
    pc = new RTCPeerConnection({ iceServers: watch.iceServers, bundlePolicy: 'max-bundle' });
    watch.pc = pc;
    pc.addTransceiver('audio', { direction: 'recvonly' });
    pc.addTransceiver('video', { direction: 'recvonly' });
    const stream = new MediaStream();
    pc.ontrack = (e) => {
      stream.addTrack(e.track);
      if (video.srcObject !== stream) video.srcObject = stream;
      video.play().catch(() => {});
    };
    pc.oniceconnectionstatechange = () => my === gen && onIceState(pc);
    pc.onconnectionstatechange = () => my === gen && pc.connectionState === 'failed' && onIceState(pc);
    watchFirstFrame(my);
    await pc.setLocalDescription(await pc.createOffer());
    await gathered(pc, GATHER_MAX_MS);
    if (my !== gen) return;
    watch.times = { start, post: performance.now(), answer: null, connected: null, firstFrame: null };
    Object.assign(watch, { frameWidth: 0, frameHeight: 0, framesDecoded: 0, fps: 0, audioPacketsReceived: 0 });
    last = { t: performance.now(), frames: 0, audio: 0 };
    stall = 0;
    watch.posts++;
    const res = await fetch(endpoint(), {
      method: 'POST',
      headers: { 'Content-Type': 'application/sdp', Authorization: `Bearer ${bearer}` },
      body: pc.localDescription.sdp,
    });
    const body = await res.text();
    const location = res.headers.get('Location');
    if (my !== gen) {
      if (res.status === 201 && location) fetch(new URL(location, res.url), { method: 'DELETE' }).catch(() => {});
      return;
    }
    if (res.status !== 201) throw new HttpError(res.status, body, Number(res.headers.get('Retry-After')) || null);
    if (!location) throw new Error('the server\'s answer has no Location');
    watch.session = new URL(location, res.url).href;
    watch.etag = res.headers.get('ETag');
    const links = parseLinks(res.headers.get('Link'), res.url);
    watch.layerUrl = links.find((l) => l.rel === LAYER_REL)?.url ?? null;
    watch.iceServers = iceServersFrom(links);
    if (watch.iceServers.length) {
      // For an ICE restart later (and the next session); a browser that cannot change them now
      // still has them for the next session.
      try {
        pc.setConfiguration({ ...pc.getConfiguration(), iceServers: watch.iceServers });
      } catch (e) {
        console.warn('ICE servers not applied to this connection:', e.message);
      }
    }
    await pc.setRemoteDescription({ type: 'answer', sdp: body });
    watch.times.answer = performance.now();
    $('#quality').disabled = !watch.layerUrl;
    $('#quality').title = watch.layerUrl ? '' : 'the server offers no layer selection';
    if (watch.quality && watch.layerUrl) await postLayer(watch.quality);
    failures = 0;
    $('#message').hidden = true;
  } catch (err) {
    if (my !== gen) return;
    teardown(); // DELETEs the session if the answer could not be applied
    onConnectError(err);
  }
}

function onConnectError(err) {
  if (err instanceof HttpError) {
    if (err.status === 401 && devToken) {
      // A development token that expired: fetch a fresh one and try again.
      token = null;
      devToken = false;
      return retry('the token was refused', 0);
    }
    if (err.status === 429 || err.status === 503) {
      const ms = Math.min(MAX_BACKOFF_MS, (err.retryAfter ?? 5) * 1000);
      fail(`${err.message} (trying again in ${Math.round(ms / 1000)} s)`);
      retryTimer = setTimeout(() => connect('retry'), ms);
      return;
    }
    // Anything else is the request's fault and would fail again.
    return fail(err.message);
  }
  if (err.fatal) return fail(err.message);
  // The server could not be reached, or the browser refused something: back off, try again.
  const ms = Math.min(MAX_BACKOFF_MS, 1000 * 2 ** failures);
  failures++;
  fail(`${err.message} (trying again in ${Math.round(ms / 1000)} s)`);
  retryTimer = setTimeout(() => connect('retry'), ms);
}

function retry(reason, ms) {
  clearTimeout(retryTimer);
  retryTimer = setTimeout(() => connect(reason), ms);
}

function onIceState(pc) {
  const s = pc.connectionState === 'failed' ? 'failed' : pc.iceConnectionState;
  note(`ice ${pc.iceConnectionState}, connection ${pc.connectionState}`);
  if (s === 'connected' || s === 'completed') {
    clearTimeout(iceTimer);
    clearTimeout(restartTimer);
    iceTimer = restartTimer = null;
    if (watch.times.connected === null) watch.times.connected = performance.now();
    if (watch.state !== 'playing') setState(watch.framesDecoded > 0 ? 'playing' : 'waiting');
    return;
  }
  if ((s === 'disconnected' || s === 'failed') && !iceTimer && !restarting) {
    iceTimer = setTimeout(() => {
      iceTimer = null;
      const now = pc.connectionState === 'failed' ? 'failed' : pc.iceConnectionState;
      if (pc === watch.pc && (now === 'disconnected' || now === 'failed')) restartIce(`ICE ${now}`);
    }, RESTART_AFTER_MS);
  }
}

/** ICE restart over PATCH (RFC 9725): new credentials to the server, its new ones back. */
async function restartIce(reason) {
  const pc = watch.pc;
  const my = gen;
  if (!pc || !watch.session || restarting) return;
  restarting = true;
  setState('reconnecting', `reconnecting (${reason})…`);
  try {
    const oldAnswer = pc.currentRemoteDescription?.sdp ?? pc.remoteDescription.sdp;
    pc.restartIce();
    await pc.setLocalDescription(await pc.createOffer({ iceRestart: true }));
    await gathered(pc, GATHER_MAX_MS);
    if (my !== gen) return;
    const res = await fetch(watch.session, {
      method: 'PATCH',
      headers: { 'Content-Type': 'application/trickle-ice-sdpfrag', 'If-Match': '*' },
      body: restartFragment(pc.localDescription.sdp, pc.iceGatheringState === 'complete'),
    });
    const frag = await res.text();
    if (my !== gen) return;
    if (res.status !== 200) throw new HttpError(res.status, frag, null);
    watch.etag = res.headers.get('ETag') ?? watch.etag;
    await pc.setRemoteDescription({ type: 'answer', sdp: restartedAnswer(oldAnswer, frag) });
    watch.iceRestarts++;
    clearTimeout(restartTimer);
    restartTimer = setTimeout(() => {
      restartTimer = null;
      if (pc === watch.pc && !['connected', 'completed'].includes(pc.iceConnectionState)) connect('ICE restart did not connect');
    }, RESTART_TIMEOUT_MS);
    // Connected already (a restart asked for on a working path)?
    onIceState(pc);
  } catch (err) {
    // The session is gone (404), or the restart was refused: start a new one.
    if (my === gen) connect(`ICE restart failed: ${err.message}`);
  } finally {
    restarting = false;
  }
}

/** POST the layer extension: {"quality": "low" | "medium" | "high" | null}. */
async function postLayer(quality) {
  if (!watch.layerUrl) return null;
  const res = await fetch(watch.layerUrl, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ quality }),
  });
  watch.layerStatus = res.status;
  if (res.status !== 204) showMessage(`The server did not change the layer: ${res.status} ${(await res.text()).trim()}`);
  return res.status;
}

/** Record when the session's first frame is shown (the join-time measurement). */
function watchFirstFrame(my) {
  const mark = () => {
    if (my !== gen || watch.times.firstFrame !== null || !watch.times.post) return;
    watch.times.firstFrame = performance.now();
    tick();
  };
  if (video.requestVideoFrameCallback) {
    const again = () => {
      if (my !== gen || watch.times.firstFrame !== null) return;
      if (watch.times.post) mark();
      else video.requestVideoFrameCallback(again);
    };
    video.requestVideoFrameCallback(again);
  } else {
    const onData = () => {
      if (my !== gen) return video.removeEventListener('loadeddata', onData);
      mark();
    };
    video.addEventListener('loadeddata', onData);
  }
}

// ---- stats: the layer received, playing or waiting ----

async function tick() {
  const pc = watch.pc;
  if (!pc) return;
  let v = null;
  let a = null;
  try {
    (await pc.getStats()).forEach((s) => {
      if (s.type !== 'inbound-rtp') return;
      if ((s.kind ?? s.mediaType) === 'video') v = s;
      else a = s;
    });
  } catch {
    return;
  }
  if (pc !== watch.pc) return;
  const now = performance.now();
  const frames = v?.framesDecoded ?? 0;
  const audio = a?.packetsReceived ?? 0;
  const dt = (now - last.t) / 1000;
  watch.frameWidth = v?.frameWidth ?? (frames ? video.videoWidth : 0);
  watch.frameHeight = v?.frameHeight ?? (frames ? video.videoHeight : 0);
  watch.fps = v?.framesPerSecond ?? (dt > 0 && frames >= last.frames ? (frames - last.frames) / dt : 0);
  const grew = frames > watch.framesDecoded || audio > watch.audioPacketsReceived;
  watch.framesDecoded = frames;
  watch.audioPacketsReceived = audio;
  if (dt >= 0.9) last = { t: now, frames, audio };
  if (grew) stall = 0;
  else stall++;
  const iceUp = ['connected', 'completed'].includes(pc.iceConnectionState);
  if (iceUp && !restarting) {
    // Audio often arrives a tick before the first decoded frame: the status says so, then
    // says `playing` once video decodes.
    const text = frames > 0 ? STATUS_TEXT.playing : 'playing (audio only)';
    if (grew && (watch.state !== 'playing' || watch.statusText !== text)) setState('playing', text);
    else if (!grew && stall >= STALL_TICKS && watch.state === 'playing') setState('waiting');
  }
  showLayer();
}

// ---- controls ----

$('#quality').value = watch.quality ?? '';
$('#quality').onchange = async () => {
  const q = $('#quality').value || null;
  watch.quality = q;
  const url = new URL(location.href);
  if (q) url.searchParams.set('quality', q);
  else url.searchParams.delete('quality');
  history.replaceState(null, '', url);
  showLayer();
  await postLayer(q);
};

$('#unmute').onclick = () => {
  video.muted = !video.muted;
  $('#unmute').textContent = video.muted ? 'Unmute' : 'Mute';
  video.play().catch(() => {});
};

addEventListener('pagehide', () => {
  if (watch.session) stop();
});

$('#room-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const r = $('#room').value.trim();
  if (r) location.search = `?room=${encodeURIComponent(r)}`;
});

// ---- start ----

if (!room) {
  $('#room-form').hidden = false;
  $('#room').focus();
} else if (!window.RTCPeerConnection) {
  $('#player').hidden = false;
  fail('this browser has no WebRTC (RTCPeerConnection)');
} else {
  $('#player').hidden = false;
  $('#room-title').textContent = `watching room ${room}${participant ? ` · ${participant}` : ''}`;
  document.title = `Plaza — ${room}`;
  $('#open-demo').href = `/?room=${encodeURIComponent(room)}`;
  showLayer();
  setInterval(tick, 1000);
  connect();
}
