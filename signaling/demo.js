// Plaza demo page: join a room, see everyone, chat. Uses only plaza-client.js.
//
// URL parameters: room, name (both: join at once), quality=low|medium|high (caps every remote
// video and, unless adaptive=1, turns off size-based selection so the cap is what you get),
// publish=0 (watch and chat only: no camera or microphone), codec=h264 (publish H.264 instead of
// VP8).
//
// The chat is the room timeline: every line (messages, our own once the server acknowledged
// them, joins and leaves) sits in `seq` order with the server's time, so every page shows the
// same order. The buzzer ("who pressed first") is built on it: the press with the lowest seq wins.
import { PlazaClient } from './plaza-client.js';

const $ = (sel) => document.querySelector(sel);
const params = new URLSearchParams(location.search);
const QUALITY_LABEL = { low: 'low', medium: 'medium', high: 'high' };

// Exposed for tests and for poking at from the console.
const demo = (window.plaza = {
  client: null,
  times: { joinClick: null, joined: null, firstFrame: null },
  tiles: new Map(),
  names: new Map(), // participant id → display name (also of those who left)
  buzzer: { round: 1, rounds: new Map() }, // round → presses [{seq, ts, from, name, mine}] by seq
});

let statsTimer = null;
let lastBytes = new Map(); // participant id → {bytes, t}

// ---- small UI helpers ----

function showMessage(text, kind = 'error') {
  $('#message-text').textContent = text;
  $('#message').className = `message ${kind === 'error' ? '' : kind}`.trim();
  $('#message').hidden = false;
}
$('#message-close').onclick = () => ($('#message').hidden = true);

function setStatus(state, text) {
  $('#status').dataset.state = state;
  $('#status').textContent = text ?? state;
}

/** The server's time `ts` (µs since the Unix epoch) as HH:MM:SS.mmm (local time zone). */
function fmtTime(ts) {
  const d = new Date(ts / 1000);
  const two = (n) => String(n).padStart(2, '0');
  return `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}.${String(d.getMilliseconds()).padStart(3, '0')}`;
}

/**
 * A line of the chat log. Lines with a timeline `seq` are kept in `seq` order (a replayed or
 * late-acknowledged one slots in where it belongs); our own messages wait at the end
 * (`pending`, keyed by `sseq`) until the server's acknowledgement gives them their place.
 */
function chatLine({ from, text, mine = false, system = false, seq = null, ts = null, sseq = null }) {
  const li = document.createElement('li');
  if (system) li.className = 'system';
  if (mine) li.className = 'mine';
  if (from) {
    const b = document.createElement('span');
    b.className = 'from';
    b.textContent = from;
    li.append(b);
  }
  const t = document.createElement('span');
  t.className = 'text';
  t.textContent = text;
  li.append(t);
  if (ts !== null) {
    const time = document.createElement('time');
    time.dateTime = new Date(ts / 1000).toISOString();
    time.textContent = fmtTime(ts);
    time.title = `server time; seq ${seq}`;
    li.append(time);
    li.dataset.ts = ts;
  }
  const log = $('#chat-log');
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 8;
  let before = null;
  if (seq !== null) {
    li.dataset.seq = seq;
    before = [...log.children].find((x) => (x.dataset.seq !== undefined && Number(x.dataset.seq) > seq) || x.classList.contains('pending')) ?? null;
  } else if (sseq !== null) {
    li.classList.add('pending');
    li.dataset.sseq = sseq;
  }
  log.insertBefore(li, before);
  if (atBottom || mine) log.scrollTop = log.scrollHeight;
  return li;
}

const nameOf = (id) => (id === demo.client?.participantId ? `${demo.client.name}` : demo.client?.participants.get(id)?.name ?? demo.names.get(id) ?? id);

/** One entry of the room timeline: a chat line, a join/leave line, or a buzzer press. */
function onTimeline(e) {
  if (e.event) {
    const d = e.data ?? {};
    if (e.event === 'participant_joined' && d.participant) {
      demo.names.set(d.participant.id, d.participant.name);
      const self = d.participant.id === demo.client.participantId;
      chatLine({ text: self ? 'you joined' : `${d.participant.name} joined`, system: true, seq: e.seq, ts: e.ts });
    } else if (e.event === 'participant_left') {
      chatLine({ text: `${nameOf(d.participant_id)} left`, system: true, seq: e.seq, ts: e.ts });
    }
    return;
  }
  if (e.mine) $(`#chat-log li.pending[data-sseq="${e.sseq}"]`)?.remove();
  const text = e.binary ? '[binary message]' : e.text;
  if (!e.binary && onBuzzerMessage(e)) return;
  chatLine({ from: e.mine ? 'you' : nameOf(e.from), text, mine: e.mine, seq: e.seq, ts: e.ts });
}

// ---- the buzzer: who pressed first? ----
//
// A press is the chat message {"buzz":true,"round":N}; "new round" is {"buzzround":N}. The
// room's timeline orders them: in each round the press with the lowest seq wins, on every page.

/** Handle a buzzer message on the timeline; false when `e` is an ordinary chat message. */
function onBuzzerMessage(e) {
  let m;
  try {
    m = JSON.parse(e.text);
  } catch {
    return false;
  }
  if (!m || typeof m !== 'object') return false;
  const b = demo.buzzer;
  if (Number.isInteger(m.buzzround)) {
    if (m.buzzround > b.round) b.round = m.buzzround;
  } else if (m.buzz === true && Number.isInteger(m.round)) {
    if (!b.rounds.has(m.round)) b.rounds.set(m.round, []);
    const presses = b.rounds.get(m.round);
    const from = e.mine ? demo.client.participantId : e.from;
    const prev = presses.findIndex((x) => x.from === from);
    if (prev >= 0 && presses[prev].seq < e.seq) return true; // only a participant's first press counts
    if (prev >= 0) presses.splice(prev, 1);
    presses.push({ seq: e.seq, ts: e.ts, from, name: e.mine ? 'you' : nameOf(e.from), mine: e.mine });
    presses.sort((x, y) => x.seq - y.seq);
    if (m.round > b.round) b.round = m.round;
  } else {
    return false;
  }
  renderBuzzer();
  return true;
}

function renderBuzzer() {
  const b = demo.buzzer;
  const presses = b.rounds.get(b.round) ?? [];
  $('#buzz-round').textContent = `round ${b.round}`;
  const me = demo.client?.participantId;
  $('#buzz').disabled = !demo.client?.channelOpen('chat') || presses.some((p) => p.from === me) || b.pendingRound === b.round;
  const list = $('#buzz-presses');
  list.replaceChildren(
    ...presses.map((p, i) => {
      const li = document.createElement('li');
      li.dataset.seq = p.seq;
      li.dataset.from = p.from;
      if (i === 0) li.className = 'winner';
      const gap = i === 0 ? 'first' : `+${((p.ts - presses[0].ts) / 1000).toFixed(1)} ms`;
      li.textContent = `${p.name} · ${fmtTime(p.ts)} · ${gap}`;
      return li;
    }),
  );
  const w = presses[0];
  $('#buzz-winner').textContent = w ? `${w.name} ${w.mine ? 'win' : 'wins'} round ${b.round}` : 'nobody has pressed yet';
  $('#buzz-winner').dataset.winner = w?.from ?? '';
  // Earlier rounds, newest first: who won and by how much.
  const past = [...b.rounds.keys()].filter((r) => r < b.round).sort((x, y) => y - x);
  $('#buzz-past').replaceChildren(
    ...past.map((r) => {
      const [first, second] = b.rounds.get(r);
      const li = document.createElement('li');
      li.dataset.round = r;
      li.dataset.winner = first.from;
      li.textContent = `round ${r}: ${first.name}${second ? `, ${((second.ts - first.ts) / 1000).toFixed(1)} ms ahead` : ''}`;
      return li;
    }),
  );
}

$('#buzz').onclick = () => {
  const b = demo.buzzer;
  try {
    b.pendingRound = b.round;
    demo.client.sendChat(JSON.stringify({ buzz: true, round: b.round }));
  } catch (err) {
    b.pendingRound = null;
    showMessage(`Buzz not sent: ${err.message}`);
  }
  renderBuzzer();
};

$('#buzz-new').onclick = () => {
  try {
    demo.client.sendChat(JSON.stringify({ buzzround: demo.buzzer.round + 1 }));
  } catch (err) {
    showMessage(`New round not started: ${err.message}`);
  }
};

function tileFor(id, name, local = false) {
  let tile = demo.tiles.get(id);
  if (tile) return tile;
  tile = $('#tile-template').content.firstElementChild.cloneNode(true);
  tile.dataset.participantId = id;
  tile.querySelector('.name').textContent = local ? `${name} (you)` : name;
  if (local) tile.classList.add('local');
  demo.tiles.set(id, tile);
  if (local) $('#grid').prepend(tile);
  else $('#grid').append(tile);
  markSpeaking(tile, id, demo.client?.speakers ?? []);
  return tile;
}

/** The tile key (`local` for ourselves) of each speaker → its rank (0: the loudest). */
const speakerRanks = (speakers) => new Map(speakers.map((s, i) => [s.local ? 'local' : s.participantId, i]));

/** Ring the tile of participant `id` (tile key) if it is among `speakers` (`client.speakers`). */
function markSpeaking(tile, id, speakers) {
  const rank = speakerRanks(speakers).get(id);
  tile.classList.toggle('speaking', rank !== undefined);
  if (rank === undefined) delete tile.dataset.speakerRank;
  else tile.dataset.speakerRank = String(rank);
}

function removeTile(id) {
  const tile = demo.tiles.get(id);
  if (!tile) return;
  tile.querySelectorAll('video, audio').forEach((el) => demo.client?.detach(el));
  tile.remove();
  demo.tiles.delete(id);
  lastBytes.delete(id);
}

/** Connection quality as a small bar icon and a word. */
const QUALITY_BARS = { excellent: '▂▄▆', good: '▂▄', poor: '▂', lost: '✕' };
const QUALITY_COLOR = { excellent: '', good: '', poor: 'var(--danger)', lost: 'var(--danger)' };

function setQuality(tile, quality, score) {
  if (!tile) return;
  const el = tile.querySelector('.quality');
  if (!quality) {
    el.textContent = '';
    delete tile.dataset.quality;
    return;
  }
  el.textContent = `${QUALITY_BARS[quality] ?? ''} ${quality}`;
  el.title = `connection quality: ${quality}${score == null ? '' : ` (score ${score})`}`;
  el.style.color = QUALITY_COLOR[quality] ?? '';
  tile.dataset.quality = quality;
}

function setBadges(tile, { cam, mic }) {
  const parts = [];
  if (cam) parts.push('camera off');
  if (mic) parts.push('muted');
  tile.querySelector('.badges').textContent = parts.join(' · ');
  tile.classList.toggle('camera-off', !!cam);
}

// ---- joining ----

async function join(room, name) {
  const quality = params.get('quality') || null;
  const adaptive = quality ? params.get('adaptive') === '1' : params.get('adaptive') !== '0';
  $('#message').hidden = true;
  $('#join').disabled = true;
  demo.times = { joinClick: performance.now(), joined: null, subscriberConnected: null, firstTrack: null, firstFrame: null };

  // `?grants=subscribe` (development mode): join with a token of only those grants, e.g. a viewer.
  const grants = params.get('grants');
  const tokenUrl = grants ? `/dev/token?grants=${encodeURIComponent(grants)}` : null;
  const videoCodec = params.get('codec')?.toLowerCase() === 'h264' ? 'video/H264' : 'video/VP8';
  const client = new PlazaClient({ room, name, defaultQuality: quality, adaptiveStream: adaptive, tokenUrl, videoCodec });
  const publish = params.get('publish') !== '0';
  demo.client = client;
  wire(client);
  $('#quality').value = quality ?? '';

  // Camera and signaling in parallel: whichever is slower decides the join time.
  const media = !publish
    ? Promise.resolve(null)
    : navigator.mediaDevices
      ? navigator.mediaDevices.getUserMedia({ video: { width: 1280, height: 720 }, audio: true }).catch((e) => e)
      : Promise.resolve(new Error('this page needs a secure context (https or localhost) for the camera'));

  setStatus('connecting', 'connecting…');
  try {
    await client.connect();
  } catch (err) {
    media.then((m) => m instanceof MediaStream && m.getTracks().forEach((t) => t.stop()));
    demo.client = null;
    $('#join').disabled = false;
    setStatus('disconnected', 'not connected');
    showMessage(
      err.code === 'unreachable' || err.code === 'timeout'
        ? `Cannot reach the Plaza server at ${client.options.url}. Is it running? (${err.message})`
        : `Could not join: ${err.message}`,
    );
    return;
  }
  demo.times.joined = performance.now();
  $('#join-form').hidden = true;
  $('#call').hidden = false;
  $('#room-title').textContent = `room ${client.room}`;
  const url = new URL(location.href);
  url.searchParams.set('room', room);
  url.searchParams.set('name', name);
  history.replaceState(null, '', url);

  showGoLive(client.room);
  renderBuzzer();
  // What was said before we came (and the buzzer's rounds): the room's recent timeline.
  if (timelineServer(client)) client.history(0).catch((err) => console.warn('plaza: no chat history', err.code, err.message));

  const local = tileFor('local', name, true);
  const stream = await media;
  if (stream instanceof MediaStream) {
    local.querySelector('video').srcObject = stream;
    try {
      await client.publish({ stream });
    } catch (err) {
      showMessage(`Could not publish camera and microphone: ${err.message}`);
    }
  } else if (stream === null) {
    local.querySelector('.stats').textContent = 'not publishing';
    $('#toggle-camera').disabled = true;
    $('#toggle-mic').disabled = true;
  } else {
    const why = stream?.name === 'NotAllowedError' ? 'access was refused' : stream?.name === 'NotFoundError' ? 'no camera or microphone was found' : stream?.message;
    showMessage(`Camera and microphone unavailable (${why}). You joined as a viewer: you can still watch and chat.`);
    local.querySelector('.stats').textContent = 'not publishing';
    $('#toggle-camera').disabled = true;
    $('#toggle-mic').disabled = true;
  }
  statsTimer = setInterval(updateStats, 1000);
}

/** Whether the server stamps the room timeline (its `joined` says `input_tick_hz`). */
const timelineServer = (client) => client.joinInfo?.input_tick_hz !== undefined;

function wire(client) {
  client.on('pcstatechange', ({ target, state }) => {
    if (target === 'subscriber' && state === 'connected' && demo.times.subscriberConnected === null) demo.times.subscriberConnected = performance.now();
  });
  client.on('connectionstatechange', ({ state, reason }) => {
    const text = { connecting: 'connecting…', connected: 'connected', reconnecting: 'reconnecting…', disconnected: 'disconnected', failed: 'connection lost' }[state];
    setStatus(state, text ?? state);
    if (state === 'failed') showMessage(`Lost the connection to the server and could not get it back (${reason}).`);
  });
  client.on('reconnecting', ({ attempt, reason }) => setStatus('reconnecting', `reconnecting (attempt ${attempt}: ${reason})…`));
  client.on('reconnected', ({ resumed }) => {
    $('#message').hidden = true;
    chatLine({ text: resumed ? 'reconnected (session resumed)' : 'reconnected (joined again)', system: true });
  });
  client.on('participantjoined', ({ participant }) => {
    const tile = tileFor(participant.id, participant.name);
    const tracks = [...participant.tracks.values()];
    tile._mute = { cam: tracks.some((t) => t.kind === 'video' && t.muted), mic: tracks.some((t) => t.kind === 'audio' && t.muted) };
    setBadges(tile, tile._mute);
    setQuality(tile, participant.quality, participant.qualityScore);
    demo.names.set(participant.id, participant.name);
    // A server without the room timeline: joins and leaves as they arrive on the WebSocket.
    if (client.state === 'connected' && !timelineServer(client)) chatLine({ text: `${participant.name} joined`, system: true });
  });
  client.on('participantleft', ({ participantId, participant, reason }) => {
    removeTile(participantId);
    if (participant && reason !== 'disconnected' && !timelineServer(client)) chatLine({ text: `${participant.name} left`, system: true });
  });
  client.on('trackadded', ({ trackId, participantId, kind, participant }) => {
    const tile = tileFor(participantId, participant?.name ?? participantId);
    if (kind === 'video') {
      if (demo.times.firstTrack === null) demo.times.firstTrack = performance.now();
      const video = tile.querySelector('video');
      client.attach(trackId, video);
      tile.dataset.videoTrack = trackId;
      tile.querySelector('.layer').textContent = '';
      watchFirstFrame(video);
    } else {
      let audio = tile.querySelector('audio');
      if (!audio) {
        audio = document.createElement('audio');
        tile.append(audio);
      }
      client.attach(trackId, audio);
      tile.dataset.audioTrack = trackId;
    }
  });
  client.on('trackremoved', ({ trackId, participantId, kind }) => {
    const tile = demo.tiles.get(participantId);
    if (!tile) return;
    const el = tile.querySelector(kind === 'video' ? 'video' : 'audio');
    if (el && el.dataset.plazaTrack === trackId) client.detach(el);
    delete tile.dataset[kind === 'video' ? 'videoTrack' : 'audioTrack'];
  });
  client.on('trackmuted', ({ participantId, trackId, muted }) => {
    const tile = demo.tiles.get(participantId);
    const p = client.participants.get(participantId);
    if (!tile || !p) return;
    const kindOf = (id) => p.tracks.get(id)?.kind ?? client.remoteTracks.get(id)?.kind;
    const state = tile._mute ?? (tile._mute = { cam: false, mic: false });
    if (kindOf(trackId) === 'video') state.cam = muted;
    else state.mic = muted;
    setBadges(tile, state);
  });
  client.on('speakers', ({ speakers }) => {
    for (const [id, tile] of demo.tiles) markSpeaking(tile, id, speakers);
  });
  client.on('connectionquality', ({ participantId, quality, score, local }) => {
    setQuality(demo.tiles.get(local ? 'local' : participantId), quality, score);
  });
  client.on('layerchanged', ({ participantId, quality, rid, width, height }) => {
    const tile = demo.tiles.get(participantId);
    if (!tile) return;
    const size = width && height ? ` ${width}×${height}` : '';
    tile.querySelector('.layer').textContent = `layer ${QUALITY_LABEL[quality] ?? quality}${rid ? ` (${rid})` : ''}${size}`;
    tile.dataset.layer = quality;
  });
  client.on('channelopen', ({ label }) => {
    if (label !== 'chat') return;
    $('#chat-input').disabled = false;
    $('#chat-send').disabled = false;
    $('#buzz-new').disabled = false;
    renderBuzzer();
  });
  client.on('channelclose', ({ label }) => {
    if (label !== 'chat') return;
    $('#chat-input').disabled = true;
    $('#chat-send').disabled = true;
    $('#buzz-new').disabled = true;
    renderBuzzer();
  });
  // Messages with a timeline seq come through 'timeline' (with ours and the room's events).
  client.on('chat', ({ participant, from, text, binary, seq }) => {
    if (seq === null) chatLine({ from: participant?.name ?? from, text: binary ? '[binary message]' : text });
  });
  client.on('timeline', onTimeline);
  client.on('dataerror', ({ message }) => showMessage(message));
  client.on('autoplayblocked', () => ($('#enable-sound').hidden = false));
  client.on('error', (err) => {
    // Connection problems are shown by the state handlers; the rest is worth a line.
    if (['unreachable', 'timeout', 'transport_failed'].includes(err.code)) return;
    if (err.request === 'chat' || err.request === 'input') return; // shown by 'dataerror'
    console.warn('plaza error', err.code, err.message);
  });
}

/** Record when the first remote video frame is shown (for the join-latency measurement). */
function watchFirstFrame(video) {
  const mark = () => {
    if (demo.times.firstFrame === null) demo.times.firstFrame = performance.now();
  };
  if (video.requestVideoFrameCallback) video.requestVideoFrameCallback(mark);
  else video.addEventListener('loadeddata', mark, { once: true });
}

// ---- go live: WHIP ingest and the WHEP player for this room ----

function showGoLive(room) {
  const enc = encodeURIComponent(room);
  $('#whip-url').textContent = new URL(`/whip/${enc}`, location.href).href;
  $('#token-command').textContent = `plaza token --room ${/^[\w.-]+$/.test(room) ? room : JSON.stringify(room)} --identity obs-1 --name OBS --grants publish`;
  $('#whip-token').textContent = '';
  const watchUrl = new URL(`/watch?room=${enc}`, location.href).href;
  $('#watch-link').href = watchUrl;
  $('#watch-link').textContent = watchUrl;
}

$('#mint-token').onclick = async () => {
  const room = demo.client?.room;
  if (!room) return;
  const out = $('#whip-token');
  const identity = `obs-${Math.random().toString(36).slice(2, 8)}`;
  try {
    const res = await fetch(`/dev/token?room=${encodeURIComponent(room)}&identity=${identity}&name=OBS&grants=publish`);
    if (res.status === 404) out.textContent = 'not a development server: mint one with the command above';
    else if (!res.ok) out.textContent = `could not mint a token: ${res.status} ${await res.text()}`;
    else out.textContent = (await res.json()).token;
  } catch (err) {
    out.textContent = `could not mint a token: ${err.message}`;
  }
};

// ---- stats overlay ----

function fmtRate(bps) {
  return bps >= 1e6 ? `${(bps / 1e6).toFixed(2)} Mb/s` : `${Math.round(bps / 1e3)} kb/s`;
}

async function updateStats() {
  const client = demo.client;
  if (!client) return;
  for (const [id, tile] of demo.tiles) {
    const out = tile.querySelector('.stats');
    if (id === 'local') {
      const layers = await client.getPublishStats();
      const order = { q: 0, h: 1, f: 2 };
      const video = layers
        .filter((l) => l.kind === 'video' && (l.frameWidth || l.active === false))
        .sort((x, y) => (order[x.rid] ?? 9) - (order[y.rid] ?? 9));
      const line = (l) => (l.active === false ? `${l.rid} paused` : `${l.rid ?? 'video'} ${l.frameWidth}×${l.frameHeight} ${Math.round(l.framesPerSecond)} fps`);
      out.textContent = video.length ? video.map(line).join('\n') : layers.length ? 'starting…' : out.textContent;
      continue;
    }
    const v = tile.dataset.videoTrack ? await client.getTrackStats(tile.dataset.videoTrack) : null;
    const a = tile.dataset.audioTrack ? await client.getTrackStats(tile.dataset.audioTrack) : null;
    const bytes = (v?.bytesReceived ?? 0) + (a?.bytesReceived ?? 0);
    const t = v?.timestamp ?? a?.timestamp ?? performance.now();
    const prev = lastBytes.get(id);
    lastBytes.set(id, { bytes, t });
    const lines = [];
    if (!v && !a) {
      out.textContent = '';
      continue;
    }
    if (v) lines.push(`${v.frameWidth}×${v.frameHeight} ${Math.round(v.framesPerSecond)} fps`);
    if (prev && t > prev.t) lines.push(fmtRate(((bytes - prev.bytes) * 8 * 1000) / (t - prev.t)));
    const rtt = v?.roundTripTime ?? a?.roundTripTime;
    if (rtt != null) lines.push(`RTT ${Math.round(rtt * 1000)} ms`);
    out.textContent = lines.join('\n');
    if (v?.frameWidth && !tile.dataset.layer) tile.querySelector('.layer').textContent = `${v.frameWidth}×${v.frameHeight}`;
  }
}

// ---- controls ----

$('#join-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const room = $('#room').value.trim();
  const name = $('#name').value.trim();
  if (room && name) join(room, name);
});

$('#toggle-camera').onclick = () => {
  const on = !demo.client.cameraEnabled;
  demo.client.setCameraEnabled(on);
  $('#toggle-camera').textContent = on ? 'Camera on' : 'Camera off';
  $('#toggle-camera').setAttribute('aria-pressed', String(!on));
  setBadges(demo.tiles.get('local'), { cam: !on, mic: !demo.client.microphoneEnabled });
};

$('#toggle-mic').onclick = () => {
  const on = !demo.client.microphoneEnabled;
  demo.client.setMicrophoneEnabled(on);
  $('#toggle-mic').textContent = on ? 'Mic on' : 'Mic off';
  $('#toggle-mic').setAttribute('aria-pressed', String(!on));
  setBadges(demo.tiles.get('local'), { cam: !demo.client.cameraEnabled, mic: !on });
};

$('#quality').onchange = () => {
  const q = $('#quality').value || null;
  demo.client?.setDefaultQuality(q);
  demo.client?.setAdaptiveStream(!q || params.get('adaptive') === '1');
  const url = new URL(location.href);
  if (q) url.searchParams.set('quality', q);
  else url.searchParams.delete('quality');
  history.replaceState(null, '', url);
};

$('#enable-sound').onclick = () => {
  document.querySelectorAll('audio').forEach((a) => a.play().catch(() => {}));
  $('#enable-sound').hidden = true;
};

$('#chat-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const text = $('#chat-input').value;
  if (!text.trim() || !demo.client) return;
  try {
    const sseq = demo.client.sendChat(text);
    // Shown at once; the server's acknowledgement (a 'timeline' entry) moves it to its place.
    chatLine({ from: 'you', text, mine: true, sseq: timelineServer(demo.client) ? sseq : null });
    $('#chat-input').value = '';
  } catch (err) {
    showMessage(`Message not sent: ${err.message}`);
  }
});

$('#leave').onclick = () => {
  demo.client?.leave();
  demo.client?.stopLocalMedia();
  clearInterval(statsTimer);
  for (const id of [...demo.tiles.keys()]) removeTile(id);
  demo.client = null;
  demo.buzzer = { round: 1, rounds: new Map() };
  $('#chat-log').replaceChildren();
  renderBuzzer();
  $('#call').hidden = true;
  $('#join-form').hidden = false;
  $('#join').disabled = false;
  $('#room-title').textContent = '';
  setStatus('disconnected', 'left');
};

// ---- start ----

if (params.get('room')) $('#room').value = params.get('room');
if (params.get('name')) $('#name').value = params.get('name');
if (params.get('room') && params.get('name')) join(params.get('room').trim(), params.get('name').trim());
else $('#name').focus();
