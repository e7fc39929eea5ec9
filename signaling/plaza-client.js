// Plaza browser client: a plain ES module, no dependencies, no bundler.
//
//   import { PlazaClient } from '/plaza-client.js';
//   const client = new PlazaClient({ room: 'demo', name: 'alice' });
//   client.on('trackadded', ({ trackId, track }) => { /* attach it */ });
//   await client.connect();
//   await client.publish({ video: true, audio: true });
//
// The wire protocol is described in signaling/README.md (src/signal.rs is authoritative);
// this client's API in signaling/CLIENT.md.

/** Protocol version this client speaks (`join.protocol`). */
export const PROTOCOL_VERSION = 1;

/** Simulcast layers published for camera video: RID, downscale factor, bitrate cap (bps). */
export const SIMULCAST_LAYERS = Object.freeze([
  Object.freeze({ rid: 'q', quality: 'low', scaleResolutionDownBy: 4, maxBitrate: 150_000 }),
  Object.freeze({ rid: 'h', quality: 'medium', scaleResolutionDownBy: 2, maxBitrate: 500_000 }),
  Object.freeze({ rid: 'f', quality: 'high', scaleResolutionDownBy: 1, maxBitrate: 1_500_000 }),
]);

/** The most cluster `redirect`s one join follows (a fourth is the error `too_many_redirects`). */
export const MAX_REDIRECTS = 3;

/**
 * Where a client told to go to `address` (`host:port`, a cluster `redirect`) connects: `url`
 * with its host and port replaced, scheme, path and query kept. `null` when `url` has no
 * `scheme://`.
 */
export function redirectUrl(url, address) {
  const i = url.indexOf('://');
  if (i < 0 || !address) return null;
  const rest = url.slice(i + 3);
  const j = rest.search(/[/?]/);
  return `${url.slice(0, i)}://${address}${j < 0 ? '' : rest.slice(j)}`;
}

/** Quality names accepted by `setQuality` (`null` = no cap). */
export const QUALITIES = Object.freeze(['low', 'medium', 'high']);

const DEFAULTS = {
  url: null, // default: ws(s)://<page host>/rtc
  room: null,
  name: null,
  // Access token (a JWT): a string, or a function ({ room, name }) => string | Promise<string>
  // called for every (re)join. Default: fetched from the server's development endpoint
  // (`tokenUrl`), which only a server without API keys (development mode) has.
  token: undefined,
  tokenUrl: null, // default: http(s)://<host of url>/dev/token
  autoSubscribe: true,
  // Room timeline (README.md §7 "Room timeline"): receive the room's events (joins, leaves,
  // tracks) on the `chat` channel, ordered with the chat messages (`join.timeline_events`).
  timelineEvents: true,
  // Ask the server to acknowledge every chat message sent, so the client learns its `seq`/`ts`
  // and puts its own messages on the timeline (`timeline` events with `mine: true`).
  chatAcks: true,
  ackTimeout: 10_000, // ms an acknowledgement may take before `sendChat(…, {ack: true})` rejects
  historyTimeout: 10_000, // ms for a `history()` reply and its replayed messages
  historyAfterResume: true, // after a resume, ask for the chat said since the last `seq` seen
  timelineLimit: 1000, // entries kept in `client.timeline` (the oldest go first)
  adaptiveStream: true, // report rendered video sizes (track_settings width/height)
  defaultQuality: null, // cap for every remote video: 'low' | 'medium' | 'high' | null
  // Video codec put first in the published video's codec preferences: 'video/VP8' or
  // 'video/H264' (README.md "Codecs"); the server answers with the first one it supports.
  videoCodec: 'video/VP8',
  reconnect: true,
  reconnectDelays: [250, 500, 1000, 2000, 4000, 8000], // ms; the last one repeats
  maxReconnectAttempts: 20,
  connectTimeout: 10_000, // ms for WebSocket open + `joined`
  pingInterval: 10_000, // ms between signaling pings
  pingTimeout: 25_000, // ms without any server message before the socket is considered dead
  iceRestartDelay: 500, // ms a connection may stay ICE 'disconnected' before its ICE restarts
  iceRestartTimeout: 15_000, // ms an ICE restart of a failed connection may take before rejoining
  socketProbeTimeout: 1000, // ms a ping may go unanswered before an ICE restart resumes on a new socket
  clockSyncBurst: 5, // pings sent right after `joined` (and a resume) for the server-clock estimate
  clockSyncInterval: 100, // ms between the pings of that burst
  sizeDebounce: 250, // ms between a video element's resize and the track_settings it causes
  // Simulcast layers keep their sizes under CPU or bandwidth pressure (the frame rate drops
  // instead, and the server switches layers), so a layer's size stays what the server expects.
  degradationPreference: 'maintain-resolution',
  // Relay only (`iceTransportPolicy: 'relay'`): media goes through the TURN server the
  // server's `joined` names, never directly (strict firewalls, tests of the relay path).
  forceRelay: false,
  // Merged into both RTCPeerConnection configurations; its `iceServers` are added after the
  // ones the server sends in `joined.ice_servers` (STUN, TURN with time-limited credentials).
  rtcConfiguration: {},
  WebSocket: null, // injectable for tests; default globalThis.WebSocket
};

/** An error with a machine-readable `code` (server codes, or client ones listed in CLIENT.md). */
export class PlazaError extends Error {
  constructor(code, message, extra = {}) {
    super(message);
    this.name = 'PlazaError';
    this.code = code;
    Object.assign(this, extra);
  }
}

/** Smallest event emitter: `on` returns a function that removes the handler. */
class Emitter {
  #handlers = new Map();
  on(type, fn) {
    if (!this.#handlers.has(type)) this.#handlers.set(type, new Set());
    this.#handlers.get(type).add(fn);
    return () => this.off(type, fn);
  }
  off(type, fn) {
    this.#handlers.get(type)?.delete(fn);
  }
  once(type, fn) {
    const off = this.on(type, (e) => {
      off();
      fn(e);
    });
    return off;
  }
  emit(type, detail) {
    for (const fn of [...(this.#handlers.get(type) ?? [])]) {
      try {
        fn(detail);
      } catch (err) {
        console.error(`plaza: '${type}' handler threw`, err);
      }
    }
    if (type !== '*') {
      for (const fn of [...(this.#handlers.get('*') ?? [])]) {
        try {
          fn({ type, detail });
        } catch (err) {
          console.error('plaza: wildcard handler threw', err);
        }
      }
    }
  }
}

// ---- SDP helpers (only what the client needs) ------------------------------------------

/** Media sections of an SDP: [{mid, kind, port, direction, msid: {streamId, trackId}|null}] */
export function parseMediaSections(sdp) {
  const out = [];
  const parts = sdp.split(/\r?\nm=/).slice(1);
  for (const part of parts) {
    const lines = part.split(/\r?\n/);
    const [kind, port] = lines[0].split(' ');
    const sec = { kind, port: Number(port), mid: null, direction: 'sendrecv', msid: null };
    for (const line of lines) {
      if (line.startsWith('a=mid:')) sec.mid = line.slice(6).trim();
      else if (line.startsWith('a=msid:')) {
        const [streamId, trackId] = line.slice(7).trim().split(/\s+/);
        sec.msid = { streamId, trackId: trackId ?? null };
      } else if (/^a=(sendrecv|sendonly|recvonly|inactive)$/.test(line)) {
        sec.direction = line.slice(2);
      }
    }
    out.push(sec);
  }
  return out;
}

function encodeEnvelope(header, payload) {
  const head = JSON.stringify(header ?? {}) + '\n';
  if (typeof payload === 'string') return head + payload;
  const body =
    payload instanceof ArrayBuffer
      ? new Uint8Array(payload)
      : new Uint8Array(payload.buffer, payload.byteOffset, payload.byteLength);
  const h = new TextEncoder().encode(head);
  const msg = new Uint8Array(h.length + body.length);
  msg.set(h);
  msg.set(body, h.length);
  return msg;
}

/**
 * A received data-channel message: `{header, binary, text, data}` (`text` for text messages,
 * `data` the payload as a string or a Uint8Array), or null when it has no `\n`. Throws when
 * the header is not JSON.
 */
export function decodeEnvelope(data) {
  if (typeof data === 'string') {
    const nl = data.indexOf('\n');
    if (nl < 0) return null;
    const text = data.slice(nl + 1);
    return { header: JSON.parse(data.slice(0, nl) || '{}') ?? {}, text, data: text, binary: false };
  }
  const bytes = data instanceof Uint8Array ? data : new Uint8Array(data);
  const nl = bytes.indexOf(0x0a);
  if (nl < 0) return null;
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(0, nl)) || '{}') ?? {};
  return { header, text: null, data: bytes.slice(nl + 1), binary: true };
}

/**
 * The entries of an input tick batch (the payload after its `{"from":"server","tick":K,…}`
 * header): 4-byte big-endian length + that many bytes, each a relayed message
 * (`{"from":…,"seq":…,"ts":…}` `\n` payload; `"text":true` when it was sent as text, its
 * payload then decoded as UTF-8). Returns [{header, binary, text, data}]; throws on a
 * truncated batch.
 */
export function decodeTickBatch(payload) {
  const bytes = payload instanceof Uint8Array ? payload : new Uint8Array(payload);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const out = [];
  let off = 0;
  while (off < bytes.length) {
    if (off + 4 > bytes.length) throw new Error(`tick batch: ${bytes.length - off} stray bytes at ${off}`);
    const len = view.getUint32(off);
    off += 4;
    if (off + len > bytes.length) throw new Error(`tick batch: entry of ${len} bytes at ${off} runs past the end (${bytes.length})`);
    const env = decodeEnvelope(bytes.subarray(off, off + len));
    off += len;
    if (!env) throw new Error('tick batch: an entry without a header');
    if (env.header.text === true) {
      env.text = new TextDecoder().decode(env.data);
      env.data = env.text;
      env.binary = false;
    }
    out.push(env);
  }
  return out;
}

/** Where `seq` goes in `list` (sorted by `seq`, ascending): the index after every lower one. */
function seqIndex(list, seq) {
  let lo = 0;
  let hi = list.length;
  if (hi && list[hi - 1].seq < seq) return hi; // the usual case: newest last
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if (list[mid].seq < seq) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const CLOCK_SAMPLES = 8; // pongs the clock estimate picks its best from (the standard min-filter)

// ---- the client -------------------------------------------------------------------------

/**
 * One participant in one Plaza room. See signaling/CLIENT.md for the full API.
 *
 * State: 'idle' → 'connecting' → 'connected' ⇄ 'reconnecting' → 'disconnected' | 'failed'.
 */
export class PlazaClient extends Emitter {
  constructor(options = {}) {
    super();
    this.options = { ...DEFAULTS, ...options };
    if (!this.options.url) {
      const loc = globalThis.location;
      this.options.url = loc ? `${loc.protocol === 'https:' ? 'wss' : 'ws'}://${loc.host}/rtc` : 'ws://127.0.0.1:7880/rtc';
    }
    /** 'idle' | 'connecting' | 'connected' | 'reconnecting' | 'disconnected' | 'failed' */
    this.state = 'idle';
    /** The URL the application gave (`url`): every join and rejoin starts there. */
    this.entryUrl = this.options.url;
    /** The WebSocket URL of the node the current session lives on (the entry, or where a
     * cluster `redirect` sent the join); `resume` goes there. null before the first join. */
    this.nodeUrl = null;
    /** The id of that node when a `redirect` named it, else null. */
    this.nodeId = null;
    /** How many `redirect`s the last join followed. */
    this.redirects = 0;
    /** This participant's id in the current session (changes on rejoin). */
    this.participantId = null;
    this.room = this.options.room;
    this.name = this.options.name;
    /** The server's `joined` message of the current session. */
    this.joinInfo = null;
    /** Other participants: id → {id, name, tracks: Map<trackId, TrackInfo>, quality, qualityScore} */
    this.participants = new Map();
    /** This participant's connection quality as the server rates it:
     * 'excellent' | 'good' | 'poor' | 'lost', or null before the first rating. */
    this.connectionQuality = null;
    this._qualities = new Map(); // participant id → {quality, score} (may arrive before the participant)
    /** Who speaks in the room now, loudest first (the server's `speakers`):
     * [{participantId, level, local, participant}], empty when nobody does. */
    this.speakers = [];
    /** The server-clock estimate: {offset, rtt, samples} (ms; offset = server − local wall
     * clock, of the recent ping with the smallest round trip), or null before the first pong. */
    this.clock = null;
    /** Remote tracks being received: server track id → RemoteTrack (see CLIENT.md). */
    this.remoteTracks = new Map();
    /** The published local stream (camera + mic), or null. */
    this.localStream = null;
    this.cameraEnabled = true;
    this.microphoneEnabled = true;
    /** The room timeline seen in this session, sorted by `seq`: chat messages (others', and
     * our own once acknowledged) and room events; at most `timelineLimit` entries. */
    this.timeline = [];
    /** The room's input tick rate (`joined.input_tick_hz`; 0: inputs are relayed one by one). */
    this.inputTickHz = 0;
    this._sseq = { chat: 0, input: 0 }; // last `sseq` sent per channel (grows for the client's life)

    this._sess = null; // the current session (one WebSocket + two PCs)
    this._leaving = false;
    this._publishSpec = null; // what to (re)publish
    this._settings = new Map(); // trackId → {quality, width, height} wanted by the app
    this._sent = new Map(); // trackId → last track_settings sent (JSON)
    this._elements = new Map(); // trackId → Set<HTMLMediaElement>
    this._sizeTimers = new Map();
    this._ownTrackIds = new Map(); // local (client) track id → server track id
    this._reconnectAttempt = 0;
    this._reconnectTimer = null;
    this._resizeObserver =
      typeof ResizeObserver === 'function' ? new ResizeObserver((entries) => this._onResize(entries)) : null;
    /** ICE restarts started so far, per connection. */
    this.iceRestarts = { publisher: 0, subscriber: 0 };
    // A network change (new interface or address) is a reason to restart ICE at once rather
    // than after the old path times out.
    const onNetworkChange = () => this.restartIce('both', 'network changed');
    globalThis.addEventListener?.('online', onNetworkChange);
    globalThis.navigator?.connection?.addEventListener?.('change', onNetworkChange);
  }

  // ---- lifecycle ----

  /**
   * Connect to the server and join the room. Resolves with the `joined` message; rejects with a
   * PlazaError (`unreachable`, `timeout`, or a server error code such as `invalid_field`).
   * `room`/`name` may be given here or in the constructor.
   */
  async connect({ room, name, token } = {}) {
    if (room !== undefined) this.room = room;
    if (name !== undefined) this.name = name;
    if (token !== undefined) this.options.token = token;
    if (!this.room || !this.name) throw new PlazaError('invalid_field', 'room and name are required');
    if (this._sess) throw new PlazaError('invalid_state', 'already connected');
    this._leaving = false;
    this._setState('connecting');
    try {
      const joined = await this._openSession();
      this._setState('connected');
      return joined;
    } catch (err) {
      this._setState('disconnected');
      throw err;
    }
  }

  /** Leave the room for good (no reconnect). Local media keeps running; see `stopLocalMedia`. */
  /**
   * Now on the server's wall clock: ms since the Unix epoch (fractional), the local wall clock
   * (`performance.timeOrigin + performance.now()`) plus the estimated offset (none before the
   * first pong).
   */
  serverNow() {
    return performance.timeOrigin + performance.now() + (this.clock?.offset ?? 0);
  }

  leave() {
    this._leaving = true;
    clearTimeout(this._reconnectTimer);
    const sess = this._sess;
    if (sess) {
      this._sendOn(sess, { type: 'leave' });
      this._closeSession(sess, 'left');
    }
    this._setState('disconnected');
  }

  /** Stop the camera and microphone tracks this client captured. */
  stopLocalMedia() {
    this.localStream?.getTracks().forEach((t) => t.stop());
  }

  // ---- publishing ----

  /**
   * Publish camera and/or microphone. `video`/`audio`: true, false, or getUserMedia constraints;
   * or pass an existing `stream`. Video is sent as three simulcast layers (SIMULCAST_LAYERS)
   * unless `simulcast: false`. Resolves with the local MediaStream once the server answered.
   * Rejects with the getUserMedia error (e.g. NotAllowedError) when capture fails.
   */
  async publish({ video = true, audio = true, stream = null, simulcast = true } = {}) {
    if (!stream) {
      const constraints = {
        video: video === true ? { width: { ideal: 1280 }, height: { ideal: 720 }, frameRate: { ideal: 30 } } : video,
        audio: audio === true ? { echoCancellation: true, noiseSuppression: true } : audio,
      };
      stream = await navigator.mediaDevices.getUserMedia(constraints);
    }
    this.localStream = stream;
    this._publishSpec = { stream, simulcast };
    const v = stream.getVideoTracks()[0];
    const a = stream.getAudioTracks()[0];
    if (v) v.enabled = this.cameraEnabled;
    if (a) a.enabled = this.microphoneEnabled;
    this.emit('localstream', { stream });
    if (this._sess?.joined) await this._publishOn(this._sess);
    return stream;
  }

  /** Turn the camera on or off: `track.enabled` locally and `mute` on the server. */
  setCameraEnabled(enabled) {
    this.cameraEnabled = !!enabled;
    return this._setLocalEnabled('video', this.cameraEnabled);
  }

  /** Turn the microphone on or off: `track.enabled` locally and `mute` on the server. */
  setMicrophoneEnabled(enabled) {
    this.microphoneEnabled = !!enabled;
    return this._setLocalEnabled('audio', this.microphoneEnabled);
  }

  /** Server track id of one of this client's published tracks ('audio'/'video'), when known. */
  ownTrackId(kind) {
    const t = kind === 'video' ? this.localStream?.getVideoTracks()[0] : this.localStream?.getAudioTracks()[0];
    return t ? this._ownTrackIds.get(t.id) ?? null : null;
  }

  // ---- data channels ----

  /**
   * Send on the reliable `chat` channel. `data`: string, ArrayBuffer or typed array. `to`: ids.
   * Every message carries the next `sseq`. With `ack: true`, returns a Promise of the server's
   * acknowledgement `{sseq, seq, ts, tick, dup}` (rejected after `ackTimeout` ms or when the
   * channel or session closes); otherwise returns the message's `sseq`.
   */
  sendChat(data, { to, ack = false } = {}) {
    return this._sendData('chat', data, to, ack);
  }

  /** Send on the unordered, unreliable `input` channel (same options and result as sendChat). */
  sendInput(data, { to, ack = false } = {}) {
    return this._sendData('input', data, to, ack);
  }

  /**
   * Replay the room's recent chat timeline after `since` (a `seq`; 0: everything the room
   * keeps). Resolves, once the WebSocket reply and every replayed message have arrived, with
   * the reply `{since, oldest, latest, replayed, complete}` plus `messages`: the replayed
   * timeline entries in `seq` order, each with `replay: true` and `duplicate: true` when this
   * client had it already (those are not delivered again as `chat`/`timeline` events).
   */
  history(since = 0) {
    const sess = this._sess;
    if (!sess?.joined || sess.closed) return Promise.reject(new PlazaError('invalid_state', 'history: not joined'));
    if (!Number.isSafeInteger(since) || since < 0) return Promise.reject(new PlazaError('invalid_field', `history: bad since ${since}`));
    return this._history(sess, since, false);
  }

  /** The highest chat `seq` this session has seen (0: none yet). */
  get lastSeq() {
    return this._sess?.tl.lastSeq ?? 0;
  }

  /** Whether the data channel `label` ('chat' | 'input') is open. */
  channelOpen(label) {
    return this._sess?.channels[label]?.readyState === 'open';
  }

  // ---- receiving ----

  /**
   * Render a remote track into a media element (sets srcObject, plays). For video, the element's
   * rendered size is reported to the server (adaptive stream) while it stays attached.
   * Returns the element. Safe to call again after a track was replaced.
   */
  attach(trackId, element) {
    const rt = this.remoteTracks.get(trackId);
    if (!rt) throw new PlazaError('not_found', `no remote track ${trackId}`);
    element.srcObject = new MediaStream([rt.track]);
    element.autoplay = true;
    element.playsInline = true;
    element.dataset.plazaTrack = trackId;
    const p = element.play?.();
    p?.catch?.((err) => this.emit('autoplayblocked', { trackId, element, error: err }));
    if (!this._elements.has(trackId)) this._elements.set(trackId, new Set());
    this._elements.get(trackId).add(element);
    if (rt.kind === 'video' && this.options.adaptiveStream && this._resizeObserver) {
      this._resizeObserver.observe(element);
      this._scheduleSize(trackId);
    }
    return element;
  }

  /** Stop rendering into `element` (and stop reporting its size). */
  detach(element) {
    const trackId = element.dataset.plazaTrack;
    this._resizeObserver?.unobserve(element);
    element.srcObject = null;
    delete element.dataset.plazaTrack;
    const set = this._elements.get(trackId);
    if (set) {
      set.delete(element);
      if (!set.size) this._elements.delete(trackId);
      else this._scheduleSize(trackId);
    }
  }

  /**
   * Cap the quality received for a remote video track: 'low' | 'medium' | 'high', or null for
   * no cap. Kept across renegotiations; sent as `track_settings`.
   */
  setQuality(trackId, quality) {
    if (quality !== null && !QUALITIES.includes(quality)) throw new PlazaError('invalid_field', `bad quality ${quality}`);
    const s = this._settingsOf(trackId);
    s.quality = quality;
    s.qualitySet = true;
    this._sendSettings(trackId);
  }

  /** Cap every remote video (present and future) unless a per-track cap was set. */
  setDefaultQuality(quality) {
    if (quality !== null && !QUALITIES.includes(quality)) throw new PlazaError('invalid_field', `bad quality ${quality}`);
    this.options.defaultQuality = quality;
    for (const [id, rt] of this.remoteTracks) if (rt.kind === 'video') this._sendSettings(id);
  }

  /** Turn size reporting on or off (off: the server picks by quality cap and bandwidth only). */
  setAdaptiveStream(enabled) {
    this.options.adaptiveStream = !!enabled;
    for (const [id, els] of this._elements) {
      for (const el of els) {
        if (enabled) this._resizeObserver?.observe(el);
        else this._resizeObserver?.unobserve(el);
      }
      if (enabled) this._scheduleSize(id);
    }
  }

  /** Room admins: remove a participant of the room (it is told `reason`). */
  removeParticipant(participantId, reason = undefined) {
    this._send({ type: 'remove_participant', participant_id: participantId, reason });
  }

  /** Room admins: mute (or unmute) a participant's chat. */
  muteChat(participantId, muted = true) {
    this._send({ type: 'mute_chat', participant_id: participantId, muted: !!muted });
  }

  /** Room admins: mute (or unmute) another participant's track. */
  muteTrack(trackId, muted = true) {
    this._send({ type: 'mute', track_id: trackId, muted: !!muted });
  }

  /** Subscribe to / unsubscribe from tracks (needed with `autoSubscribe: false`). */
  subscribe(trackIds, subscribe = true) {
    this._send({ type: 'subscribe', track_ids: [...trackIds], subscribe });
  }

  // ---- stats ----

  /** Raw reports of both peer connections: {publisher, subscriber} (RTCStatsReport or null). */
  async getStats() {
    const s = this._sess;
    return {
      publisher: s?.pub ? await s.pub.getStats() : null,
      subscriber: s?.sub ? await s.sub.getStats() : null,
    };
  }

  /**
   * Receive stats of one remote track: {kind, codec (e.g. 'video/H264'), bytesReceived,
   * packetsReceived, packetsLost, framesDecoded, freezeCount, frameWidth, frameHeight,
   * framesPerSecond, totalSamplesReceived, jitter, roundTripTime (s, of the subscriber
   * connection), timestamp (ms)} or null.
   */
  async getTrackStats(trackId) {
    const rt = this.remoteTracks.get(trackId);
    if (!rt?.receiver) return null;
    const report = await rt.receiver.getStats();
    let inbound = null;
    let pair = null;
    report.forEach((s) => {
      if (s.type === 'inbound-rtp') inbound = s;
      if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') pair = s;
    });
    if (!inbound) return null;
    return {
      kind: rt.kind,
      codec: report.get(inbound.codecId)?.mimeType ?? null,
      bytesReceived: inbound.bytesReceived ?? 0,
      packetsReceived: inbound.packetsReceived ?? 0,
      packetsLost: inbound.packetsLost ?? 0,
      framesDecoded: inbound.framesDecoded ?? 0,
      freezeCount: inbound.freezeCount ?? 0,
      frameWidth: inbound.frameWidth ?? 0,
      frameHeight: inbound.frameHeight ?? 0,
      framesPerSecond: inbound.framesPerSecond ?? 0,
      totalSamplesReceived: inbound.totalSamplesReceived ?? 0,
      jitter: inbound.jitter ?? 0,
      roundTripTime: pair?.currentRoundTripTime ?? null,
      timestamp: inbound.timestamp,
    };
  }

  /**
   * The ICE candidate pair each peer connection uses: `{publisher, subscriber}`, each `null`
   * (no connection, or not connected yet) or `{local, remote}` with `{candidateType ('host' |
   * 'srflx' | 'prflx' | 'relay'), protocol, relayProtocol, address, port}` for each side.
   * `local.candidateType === 'relay'` means media goes through the TURN server.
   */
  async getSelectedCandidatePairs() {
    const pick = async (pc) => {
      if (!pc) return null;
      const report = await pc.getStats();
      let pairId = null;
      report.forEach((s) => {
        if (s.type === 'transport' && s.selectedCandidatePairId) pairId = s.selectedCandidatePairId;
      });
      let pair = pairId ? report.get(pairId) : null;
      if (!pair) {
        report.forEach((s) => {
          if (!pair && s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') pair = s;
        });
      }
      if (!pair) return null;
      const side = (id) => {
        const c = report.get(id);
        return c
          ? { candidateType: c.candidateType, protocol: c.protocol, relayProtocol: c.relayProtocol ?? null, address: c.address ?? c.ip ?? null, port: c.port }
          : null;
      };
      return { local: side(pair.localCandidateId), remote: side(pair.remoteCandidateId) };
    };
    return { publisher: await pick(this._sess?.pub), subscriber: await pick(this._sess?.sub) };
  }

  /** Send stats of the published layers: [{kind, codec, rid, active, frameWidth, frameHeight, framesPerSecond, bytesSent, qualityLimitationReason}]. */
  async getPublishStats() {
    const pc = this._sess?.pub;
    if (!pc) return [];
    const report = await pc.getStats();
    const out = [];
    report.forEach((s) => {
      if (s.type === 'outbound-rtp') {
        out.push({
          kind: s.kind,
          codec: report.get(s.codecId)?.mimeType ?? null,
          rid: s.rid ?? null,
          active: s.active,
          frameWidth: s.frameWidth ?? 0,
          frameHeight: s.frameHeight ?? 0,
          framesPerSecond: s.framesPerSecond ?? 0,
          bytesSent: s.bytesSent ?? 0,
          qualityLimitationReason: s.qualityLimitationReason,
          targetBitrate: s.targetBitrate,
        });
      }
    });
    return out;
  }

  // =====================================================================================
  // internals

  _setState(state, detail = {}) {
    if (this.state === state) return;
    const previous = this.state;
    this.state = state;
    this.emit('connectionstatechange', { state, previous, ...detail });
  }

  _error(code, message, extra = {}) {
    const err = new PlazaError(code, message, extra);
    this.emit('error', err);
    return err;
  }

  /**
   * The token for the next join: the `token` option (a string, or a function called for every
   * join), else one fetched from the development endpoint. The identity the endpoint picked is
   * kept, so a rejoin is the same participant.
   */
  async _token() {
    const t = this.options.token;
    if (typeof t === 'function') return await t({ room: this.room, name: this.name });
    if (t !== undefined && t !== null) return t;
    const url = new URL(
      this.options.tokenUrl ?? this.options.url.replace(/^ws/, 'http').replace(/\/rtc(\?.*)?$/, '/dev/token'),
      globalThis.location?.href,
    );
    url.searchParams.set('room', this.room);
    url.searchParams.set('name', this.name);
    if (this._devIdentity) url.searchParams.set('identity', this._devIdentity);
    let res;
    try {
      res = await fetch(url, { cache: 'no-store' });
    } catch (e) {
      throw this._error('unreachable', `cannot fetch a development token from ${url.origin}${url.pathname}: ${e.message}`);
    }
    if (!res.ok) {
      throw this._error(
        'token_missing',
        `no access token: pass the \`token\` option (the development token endpoint answered ${res.status}; it is off when the server has API keys)`,
      );
    }
    const body = await res.json();
    this._devIdentity = body.identity;
    return body.token;
  }

  /**
   * Get a token, open a WebSocket to the entry URL, send `join`, resolve on `joined`. A
   * cluster node that does not host the room answers `redirect`: the same `join` (same token)
   * goes to the node it names, at most MAX_REDIRECTS times.
   */
  async _openSession() {
    const token = await this._token();
    let url = this.options.url;
    let nodeId = null;
    for (let redirects = 0; ; redirects++) {
      const { joined, redirect } = await this._openSocket(token, url, nodeId, redirects);
      if (joined) return joined;
      if (this._leaving) throw new PlazaError('unavailable', 'left while joining');
      if (redirects >= MAX_REDIRECTS) {
        throw this._error('too_many_redirects', `join of room ${this.room} redirected more than ${MAX_REDIRECTS} times (last to ${redirect.node_id} at ${redirect.address})`);
      }
      const next = redirectUrl(url, redirect.address);
      if (!next) throw this._error('invalid_redirect', `cannot redirect ${url} to ${JSON.stringify(redirect.address)}`);
      this.emit('redirected', { room: redirect.room, nodeId: redirect.node_id, address: redirect.address, url: next, from: url });
      url = next;
      nodeId = redirect.node_id ?? null;
    }
  }

  /**
   * Open a WebSocket to `url`, send `join`; resolve with `{joined}` on `joined`, or with
   * `{redirect}` (the `redirect` message; the socket is closed) when the room lives on another
   * node. The session object owns everything.
   */
  _openSocket(token, url, nodeId = null, redirects = 0) {
    const WS = this.options.WebSocket ?? globalThis.WebSocket;
    const sess = {
      ws: null,
      sub: null,
      pub: null,
      joined: false,
      channels: {},
      pendingSubOffer: null,
      subBusy: false,
      subAnswered: false,
      pubOffered: false,
      pubCandidates: [],
      subCandidates: [],
      pubAnswerWaiter: null,
      pubQueue: Promise.resolve(),
      inbox: Promise.resolve(),
      lastMessage: performance.now(),
      pingTimer: null,
      closed: false,
      mids: new Map(), // mid → server track id (subscriber transceivers currently receiving)
      endReason: null,
      received: 0, // server messages received in this participant's session (`joined` is 1)
      resumeToken: null,
      resumeUntil: 0, // performance.now() deadline of the server's grace period
      clockSamples: [], // recent pongs: {offset, rtt} (ms), oldest first
      wsDown: false, // the WebSocket dropped; the peer connections live on, waiting for a resume
      outbox: [], // messages sent while the WebSocket was down
      acks: { chat: new Map(), input: new Map() }, // sseq → awaited acknowledgement
      tl: { seen: new Set(), lastSeq: 0, duplicates: 0 }, // chat seqs delivered in this session
      historyReqs: [], // history() requests in the order sent
    };
    this._sess = sess;
    return new Promise((resolve, reject) => {
      let settled = false;
      const fail = (err) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        this._closeSession(sess, err.message);
        reject(err);
      };
      const timer = setTimeout(
        () => fail(this._error('timeout', `no answer from ${url} within ${this.options.connectTimeout} ms`)),
        this.options.connectTimeout,
      );
      let ws;
      try {
        ws = new WS(url);
      } catch (e) {
        fail(this._error('unreachable', `cannot open ${url}: ${e.message}`));
        return;
      }
      sess.ws = ws;
      ws.binaryType = 'arraybuffer';
      ws.onopen = () => {
        const join = {
          type: 'join',
          room: this.room,
          name: this.name,
          protocol: PROTOCOL_VERSION,
          auto_subscribe: this.options.autoSubscribe,
          timeline_events: !!this.options.timelineEvents,
        };
        if (token) join.token = token;
        this._sendOn(sess, join);
      };
      ws.onerror = () => {
        if (!sess.joined) fail(this._error('unreachable', `cannot reach the Plaza server at ${url}`));
      };
      ws.onclose = (ev) => {
        if (!sess.joined) {
          fail(this._error('unreachable', `connection to ${url} closed before joining (code ${ev.code}${ev.reason ? `: ${ev.reason}` : ''})`));
          return;
        }
        this._onSocketClosed(sess, ev);
      };
      ws.onmessage = (ev) => {
        const msg = this._received(sess, ev);
        if (!msg) return;
        if (!sess.joined) {
          if (msg.type === 'joined') {
            sess.received = 1;
            settled = true;
            clearTimeout(timer);
            this.nodeUrl = url;
            this.nodeId = msg.node_id ?? nodeId;
            this.redirects = redirects;
            this._onJoined(sess, msg).then(
              () => resolve({ joined: msg }),
              (e) => reject(e),
            );
          } else if (msg.type === 'redirect') {
            // The room lives on another node of the cluster (the server closes this socket).
            settled = true;
            clearTimeout(timer);
            this._closeSession(sess, 'redirected');
            resolve({ redirect: msg });
          } else if (msg.type === 'error') {
            fail(this._error(msg.code, msg.message, { request: msg.request }));
          } else if (msg.type === 'leave') {
            fail(this._error('unavailable', `server refused: ${msg.reason}`));
          }
          return;
        }
        this._dispatch(sess, msg);
      };
    });
  }

  /**
   * The configuration of a session's peer connections: `max-bundle`, the ICE servers of its
   * `joined` (TURN credentials are per session) followed by `rtcConfiguration.iceServers`,
   * the rest of `rtcConfiguration`, and `iceTransportPolicy: 'relay'` with `forceRelay`.
   */
  /**
   * Fresh STUN/TURN servers (the reply to `ice_restart`): both peer connections use them from
   * now on, and the next TURN refresh is scheduled from their expiry.
   */
  _useIceServers(sess, iceServers) {
    sess.iceServers = iceServers;
    const config = this._pcConfig({ ice_servers: iceServers });
    for (const pc of [sess.pub, sess.sub]) {
      try {
        pc?.setConfiguration({ ...pc.getConfiguration(), iceServers: config.iceServers });
      } catch (e) {
        this._error('internal', `could not use the new ICE servers: ${e.message}`);
      }
    }
    this._scheduleTurnRefresh(sess);
    this.emit('iceservers', { iceServers });
    const w = sess.iceServersWaiter;
    sess.iceServersWaiter = null;
    w?.();
  }

  /**
   * TURN credentials expire (`<expiry unix s>:<id>` is their username): a minute before they
   * do, restart ICE on both connections, which fetches fresh ones and re-allocates the relay.
   */
  _scheduleTurnRefresh(sess) {
    clearTimeout(sess.turnRefresh);
    const servers = sess.iceServers ?? sess.joinedMsg?.ice_servers ?? [];
    const expiries = servers.map((x) => Number(String(x.username ?? '').split(':')[0])).filter((n) => n > 0);
    if (!expiries.length) return;
    const inMs = Math.min(...expiries) * 1000 - Date.now() - 60_000;
    // setTimeout holds at most ~24.8 days; a refresh is never due sooner than in 10 s.
    sess.turnRefresh = setTimeout(() => {
      if (!sess.closed) this.restartIce('both', 'TURN credentials expire');
    }, Math.min(Math.max(inMs, 10_000), 2 ** 31 - 1));
  }

  _pcConfig(joined) {
    const own = this.options.rtcConfiguration ?? {};
    const iceServers = [...(joined?.ice_servers ?? []), ...(own.iceServers ?? [])];
    const config = { bundlePolicy: 'max-bundle', ...own, iceServers };
    if (this.options.forceRelay) config.iceTransportPolicy = 'relay';
    return config;
  }

  /** The server message in a WebSocket event (`null` when closed, or not JSON: reported). */
  _received(sess, ev) {
    if (sess.closed) return null;
    const at = performance.now();
    sess.lastMessage = at;
    let msg;
    try {
      msg = JSON.parse(ev.data);
    } catch {
      this._error('malformed_message', 'server sent a message that is not JSON');
      return null;
    }
    // Timed on arrival, not after the messages queued before it have been handled.
    if (msg?.type === 'pong') this._clockSample(sess, msg, at);
    return msg;
  }

  /**
   * One NTP-style sample from a `pong` that arrived at `at` (performance.now()): the ping left
   * at `msg.ts` (every ping carries its performance.now()), the server made the pong at
   * `msg.server_time` (µs since the Unix epoch). Offset = server time − the local wall clock
   * half-way through the round trip; the estimate is the offset of the recent sample with the
   * smallest round trip (its error is at most that round trip's half). A pong without
   * `server_time` (an older server) is not a sample.
   */
  _clockSample(sess, msg, at) {
    if (typeof msg.ts !== 'number' || typeof msg.server_time !== 'number') return;
    const rtt = at - msg.ts;
    if (!(rtt >= 0) || rtt > this.options.pingTimeout) return;
    const offset = msg.server_time / 1000 - (performance.timeOrigin + (msg.ts + at) / 2);
    const samples = sess.clockSamples;
    samples.push({ offset, rtt });
    if (samples.length > CLOCK_SAMPLES) samples.shift();
    let best = samples[0];
    for (const s of samples) if (s.rtt < best.rtt) best = s;
    const prev = this.clock;
    this.clock = { offset: best.offset, rtt: best.rtt, samples: samples.length };
    if (!prev || prev.offset !== best.offset || prev.rtt !== best.rtt) this.emit('clock', { ...this.clock });
  }

  /** A few pings in quick succession, so the clock estimate is good soon after a (re)connect. */
  _clockBurst(sess) {
    for (let i = 0; i < this.options.clockSyncBurst; i++) {
      setTimeout(() => {
        if (!sess.closed && !sess.wsDown && this._sess === sess) this._sendOn(sess, { type: 'ping', ts: performance.now() });
      }, i * this.options.clockSyncInterval);
    }
  }

  /** A message of the joined session: counted (for `resume`), then handled in order. */
  _dispatch(sess, msg) {
    sess.received++;
    // One message at a time, in order: an offer being answered must not be overtaken by
    // the participant_left that follows it.
    sess.inbox = sess.inbox
      .then(() => (sess.closed ? undefined : this._onMessage(sess, msg)))
      .catch((e) => this._error('internal', `handling ${msg.type}: ${e.message}`, { cause: e }));
  }

  async _onJoined(sess, msg) {
    sess.joined = true;
    sess.resumeToken = msg.resume_token ?? null;
    sess.resumeGrace = msg.resume_grace_ms ?? 0;
    sess.joinedMsg = msg;
    this.joinInfo = msg;
    this.participantId = msg.participant_id;
    this.room = msg.room;
    this.inputTickHz = msg.input_tick_hz ?? 0;
    this.timeline = []; // a new participant: its own timeline (the room may have restarted)
    this._reconnectAttempt = 0;
    this._ownTrackIds.clear();
    // The subscriber PC exists from the join on (the first subscribe_offer follows).
    const sub = new RTCPeerConnection(this._pcConfig(msg));
    sess.sub = sub;
    sub.onicecandidate = (e) => this._onLocalCandidate(sess, 'subscriber', e.candidate);
    sub.ondatachannel = (e) => this._onDataChannel(sess, e.channel);
    sub.onconnectionstatechange = () => this._onPcState(sess, 'subscriber', sub.connectionState);
    sub.oniceconnectionstatechange = () => this._onIceState(sess, 'subscriber', sub.iceConnectionState);
    sess.pingTimer = setInterval(() => this._keepAlive(sess), this.options.pingInterval);
    this._clockBurst(sess);
    this._scheduleTurnRefresh(sess);
    const fresh = new Map();
    this.connectionQuality = null;
    this._qualities = new Map();
    this.speakers = [];
    for (const p of msg.participants) {
      fresh.set(p.id, this._participantEntry(p));
    }
    this.participants = fresh;
    this.emit('joined', { participantId: msg.participant_id, room: msg.room, participants: [...fresh.values()], serverVersion: msg.server_version });
    for (const p of fresh.values()) this.emit('participantjoined', { participant: p });
    if (this._publishSpec) {
      // A rejoin republishes; failing to do so leaves a joined (receiving) session, not none.
      await this._publishOn(sess).catch((e) => this._error(e.code ?? 'internal', `republishing failed: ${e.message}`));
    }
  }

  /** A participant entry (see `participants`) from the server's ParticipantInfo. */
  _participantEntry(p) {
    const q = this._qualities.get(p.id);
    return { id: p.id, name: p.name, tracks: new Map(p.tracks.map((t) => [t.id, t])), quality: q?.quality ?? null, qualityScore: q?.score ?? null };
  }

  /** One update of a `connection_quality` message. */
  _onQuality(u) {
    const score = typeof u.score === 'number' ? u.score : null;
    const local = u.participant_id === this.participantId;
    if (local) {
      this.connectionQuality = u.quality;
    } else {
      this._qualities.set(u.participant_id, { quality: u.quality, score });
      const p = this.participants.get(u.participant_id);
      if (p) {
        p.quality = u.quality;
        p.qualityScore = score;
      }
    }
    this.emit('connectionquality', {
      participantId: u.participant_id,
      quality: u.quality,
      score,
      local,
      participant: local ? null : this.participants.get(u.participant_id) ?? null,
    });
  }

  async _onMessage(sess, msg) {
    switch (msg.type) {
      case 'subscribe_offer':
        sess.pendingSubOffer = msg.sdp;
        await this._answerSubscribeOffers(sess);
        break;
      case 'publish_answer': {
        const w = sess.pubAnswerWaiter;
        sess.pubAnswerWaiter = null;
        if (w) w.resolve(msg.sdp);
        break;
      }
      case 'trickle': {
        const pc = msg.target === 'publisher' ? sess.pub : sess.sub;
        if (pc) await pc.addIceCandidate(msg.candidate.candidate ? msg.candidate : null).catch(() => {});
        break;
      }
      case 'participant_joined': {
        const entry = this._participantEntry(msg.participant);
        this.participants.set(entry.id, entry);
        this.emit('participantjoined', { participant: entry });
        break;
      }
      case 'participant_left': {
        const p = this.participants.get(msg.participant_id);
        for (const [id, rt] of this.remoteTracks) if (rt.participantId === msg.participant_id) this._removeRemote(sess, id, 'participant_left');
        this.participants.delete(msg.participant_id);
        this._qualities.delete(msg.participant_id);
        this.emit('participantleft', { participantId: msg.participant_id, participant: p ?? null });
        break;
      }
      case 'connection_quality':
        for (const u of msg.updates ?? []) this._onQuality(u);
        break;
      case 'speakers':
        this.speakers = (msg.speakers ?? []).map((s) => {
          const local = s.participant_id === this.participantId;
          return { participantId: s.participant_id, level: s.level, local, participant: local ? null : this.participants.get(s.participant_id) ?? null };
        });
        this.emit('speakers', { speakers: this.speakers });
        break;
      case 'track_published': {
        const t = msg.track;
        if (t.participant_id === this.participantId) {
          this._learnOwnTrack(t);
          break;
        }
        this.participants.get(t.participant_id)?.tracks.set(t.id, t);
        const rt = this.remoteTracks.get(t.id);
        if (rt) rt.info = t;
        this.emit('trackpublished', { track: t });
        break;
      }
      case 'track_unpublished': {
        this.participants.get(msg.participant_id)?.tracks.delete(msg.track_id);
        this._removeRemote(sess, msg.track_id, 'unpublished');
        this.emit('trackunpublished', { trackId: msg.track_id, participantId: msg.participant_id });
        break;
      }
      case 'track_muted': {
        if (msg.participant_id === this.participantId) {
          this.emit('localtrackmuted', { trackId: msg.track_id, muted: msg.muted, byAdmin: !!msg.by_admin });
          break;
        }
        const info = this.participants.get(msg.participant_id)?.tracks.get(msg.track_id);
        if (info) info.muted = msg.muted;
        const rt = this.remoteTracks.get(msg.track_id);
        if (rt) rt.muted = msg.muted;
        this.emit('trackmuted', { trackId: msg.track_id, participantId: msg.participant_id, muted: msg.muted, byAdmin: !!msg.by_admin });
        break;
      }
      case 'permissions_changed':
        this.permissions = msg.permissions;
        this.emit('permissionschanged', { permissions: msg.permissions });
        break;
      case 'layer_changed': {
        const rt = this.remoteTracks.get(msg.track_id);
        const layer = { quality: msg.quality, rid: msg.rid, width: msg.width ?? null, height: msg.height ?? null };
        if (rt) rt.layer = layer;
        this.emit('layerchanged', { trackId: msg.track_id, participantId: rt?.participantId ?? null, ...layer });
        break;
      }
      case 'publisher_layers':
        await this._applyPublisherLayers(sess, msg.track_id, msg.active, msg.paused);
        break;
      case 'pong':
        if (typeof msg.ts === 'number') this.emit('pong', { rtt: performance.now() - msg.ts });
        break;
      case 'ice_servers':
        this._useIceServers(sess, msg.ice_servers);
        break;
      case 'history':
        this._onHistoryReply(sess, msg);
        break;
      case 'error': {
        const w = sess.pubAnswerWaiter;
        if (w && msg.request === 'publish_offer') {
          sess.pubAnswerWaiter = null;
          w.reject(new PlazaError(msg.code, msg.message, { request: msg.request }));
        }
        if (msg.request === 'chat' || msg.request === 'input') {
          this.emit('dataerror', { channel: msg.request, code: msg.code, message: msg.message });
        }
        if (msg.request === 'history') {
          const req = sess.historyReqs.find((r) => !r.reply);
          if (req) {
            this._endHistory(sess, req);
            req.reject(new PlazaError(msg.code, msg.message, { request: msg.request }));
          }
        }
        this._error(msg.code, msg.message, { request: msg.request });
        break;
      }
      case 'leave':
        sess.endReason = msg.reason;
        break;
      default:
        break; // unknown messages are ignored (forward compatibility)
    }
  }

  // ---- subscriber connection ----

  async _answerSubscribeOffers(sess) {
    if (sess.subBusy) return; // the running loop picks up the newest offer
    sess.subBusy = true;
    try {
      while (sess.pendingSubOffer && !sess.closed) {
        const sdp = sess.pendingSubOffer;
        sess.pendingSubOffer = null;
        await sess.sub.setRemoteDescription({ type: 'offer', sdp });
        const answer = await sess.sub.createAnswer();
        await sess.sub.setLocalDescription(answer);
        if (sess.closed) return;
        this._sendOn(sess, { type: 'subscribe_answer', sdp: sess.sub.localDescription.sdp });
        if (!sess.subAnswered) {
          sess.subAnswered = true;
          for (const c of sess.subCandidates) this._sendOn(sess, { type: 'trickle', target: 'subscriber', candidate: c });
          sess.subCandidates = [];
        }
        this._reconcileRemoteTracks(sess);
      }
    } catch (e) {
      this._error('invalid_sdp', `could not answer the server's offer: ${e.message}`, { cause: e });
    } finally {
      sess.subBusy = false;
    }
  }

  /**
   * After each subscribe offer: which transceivers receive which server track now. The remote
   * offer's `a=msid:<publisher id> <track id>` of each m-section is the mapping (portable; the
   * browser's MediaStreamTrack.id need not equal it).
   */
  _reconcileRemoteTracks(sess) {
    const sections = parseMediaSections(sess.sub.remoteDescription.sdp);
    const now = new Map();
    for (const sec of sections) {
      if (sec.kind !== 'audio' && sec.kind !== 'video') continue;
      if (sec.port === 0 || !sec.msid?.trackId) continue;
      if (sec.direction !== 'sendonly' && sec.direction !== 'sendrecv') continue;
      now.set(sec.mid, { trackId: sec.msid.trackId, participantId: sec.msid.streamId, kind: sec.kind });
    }
    // removals first (a reused m-section may carry a new track)
    for (const [mid, trackId] of sess.mids) {
      if (now.get(mid)?.trackId !== trackId) {
        sess.mids.delete(mid);
        this._removeRemote(sess, trackId, 'renegotiated');
      }
    }
    const transceivers = sess.sub.getTransceivers();
    for (const [mid, m] of now) {
      if (sess.mids.get(mid) === m.trackId) continue;
      const tr = transceivers.find((t) => t.mid === mid);
      if (!tr) continue;
      sess.mids.set(mid, m.trackId);
      const info = this.participants.get(m.participantId)?.tracks.get(m.trackId) ?? null;
      const rt = {
        trackId: m.trackId,
        participantId: m.participantId,
        kind: m.kind,
        track: tr.receiver.track,
        receiver: tr.receiver,
        mid,
        info,
        muted: info?.muted ?? false,
        layer: null,
      };
      this.remoteTracks.set(m.trackId, rt);
      this.emit('trackadded', { ...rt, participant: this.participants.get(m.participantId) ?? null });
      if (rt.kind === 'video') this._sendSettings(m.trackId, true);
    }
  }

  _removeRemote(sess, trackId, reason) {
    const rt = this.remoteTracks.get(trackId);
    if (!rt) return;
    this.remoteTracks.delete(trackId);
    if (sess) for (const [mid, id] of sess.mids) if (id === trackId) sess.mids.delete(mid);
    for (const el of this._elements.get(trackId) ?? []) this._resizeObserver?.unobserve(el);
    this._elements.delete(trackId);
    this._sent.delete(trackId);
    clearTimeout(this._sizeTimers.get(trackId));
    this._sizeTimers.delete(trackId);
    this.emit('trackremoved', { trackId, participantId: rt.participantId, kind: rt.kind, track: rt.track, reason });
  }

  _onDataChannel(sess, ch) {
    ch.binaryType = 'arraybuffer';
    sess.channels[ch.label] = ch;
    ch.onopen = () => this.emit('channelopen', { label: ch.label });
    ch.onclose = () => {
      if (sess.acks[ch.label]) this._dropAcks(sess, ch.label, 'the channel closed');
      this.emit('channelclose', { label: ch.label });
    };
    ch.onmessage = (ev) => {
      if (sess.closed) return;
      let env;
      try {
        env = decodeEnvelope(ev.data);
      } catch {
        env = null;
      }
      if (!env || typeof env.header !== 'object') {
        this._error('malformed_message', `unframed message on '${ch.label}'`);
        return;
      }
      this._onData(sess, ch.label, env);
    };
    if (ch.readyState === 'open') this.emit('channelopen', { label: ch.label });
  }

  _sendData(label, data, to, ack) {
    const sess = this._sess;
    const ch = sess?.channels[label];
    if (!ch || ch.readyState !== 'open') throw new PlazaError('invalid_state', `the '${label}' channel is not open`);
    const sseq = ++this._sseq[label];
    const header = { sseq };
    if (to && to.length) header.to = [...to];
    // Chat is acknowledged anyway (option chatAcks), so our own messages get onto the timeline.
    const acked = ack || (label === 'chat' && this.options.chatAcks);
    if (acked) header.ack = true;
    ch.send(encodeEnvelope(header, data));
    if (!acked) return sseq;
    const pending = { label, sseq, data, to: header.to ?? null, waiter: null, timer: null };
    const result = ack ? new Promise((resolve, reject) => (pending.waiter = { resolve, reject })) : null;
    pending.timer = setTimeout(() => {
      sess.acks[label].delete(sseq);
      pending.waiter?.reject(new PlazaError('timeout', `no acknowledgement of ${label} message ${sseq} within ${this.options.ackTimeout} ms`));
    }, this.options.ackTimeout);
    sess.acks[label].set(sseq, pending);
    return result ?? sseq;
  }

  /** Reject the acknowledgements still awaited on `label` (or every channel). */
  _dropAcks(sess, label, reason) {
    for (const l of label ? [label] : Object.keys(sess.acks)) {
      for (const p of sess.acks[l].values()) {
        clearTimeout(p.timer);
        p.waiter?.reject(new PlazaError('unavailable', `no acknowledgement of ${l} message ${p.sseq}: ${reason}`));
      }
      sess.acks[l].clear();
    }
  }

  /** A received data-channel message (envelope decoded). */
  _onData(sess, label, env) {
    const h = env.header;
    if (typeof h.ack === 'number' && h.from === undefined) {
      this._onAck(sess, label, h);
      return;
    }
    if (label === 'input' && h.from === 'server' && typeof h.tick === 'number' && env.binary) {
      this._onTick(sess, h, env.data);
      return;
    }
    const detail = this._dataDetail(h, env);
    if (label === 'chat') this._onChat(sess, detail);
    else if (label === 'input') this.emit('input', detail);
    else this.emit('datachannelmessage', { label, ...detail });
  }

  /** What a `chat`/`input` event carries for one relayed message. */
  _dataDetail(h, env) {
    const from = h.from ?? null;
    const num = (v) => (typeof v === 'number' ? v : null);
    return {
      from,
      participant: this.participants.get(from) ?? null,
      binary: env.binary,
      text: env.binary ? null : env.text,
      data: env.data,
      header: h,
      seq: num(h.seq),
      ts: num(h.ts),
      sseq: num(h.sseq),
      replay: h.replay === true,
      event: typeof h.event === 'string' ? h.event : null,
      tick: null,
      mine: from !== null && from === this.participantId,
    };
  }

  /** A timeline entry (see `timeline`) of a chat message or room event. */
  _entry(d, extra = {}) {
    return {
      seq: d.seq,
      ts: d.ts,
      from: d.from,
      participant: d.participant,
      event: d.event,
      text: d.text,
      binary: d.binary,
      data: d.data,
      sseq: d.sseq,
      replay: d.replay,
      mine: d.from !== null && d.from === this.participantId,
      ...extra,
    };
  }

  /** Note `seq` as delivered; false when it was already. */
  _firstSight(sess, seq) {
    const tl = sess.tl;
    if (tl.seen.has(seq)) return false;
    tl.seen.add(seq);
    if (tl.seen.size > 8192) tl.seen.delete(tl.seen.values().next().value);
    if (seq > tl.lastSeq) tl.lastSeq = seq;
    return true;
  }

  _addToTimeline(entry) {
    const list = this.timeline;
    list.splice(seqIndex(list, entry.seq), 0, entry);
    if (list.length > this.options.timelineLimit) list.splice(0, list.length - this.options.timelineLimit);
    this.emit('timeline', entry);
  }

  _onChat(sess, d) {
    const sequenced = typeof d.seq === 'number';
    const fresh = !sequenced || this._firstSight(sess, d.seq);
    let entry = null;
    if (d.event && d.from === 'server') {
      let data = null;
      try {
        data = JSON.parse(d.text ?? 'null');
      } catch {
        this._error('malformed_message', `room event ${d.event} (seq ${d.seq}) is not JSON`);
      }
      entry = this._entry(d, { data });
    } else if (sequenced) {
      entry = this._entry(d);
    }
    if (d.replay && entry) this._historyMessage(sess, { ...entry, duplicate: !fresh });
    if (!fresh) {
      sess.tl.duplicates++;
      return;
    }
    if (!d.event || d.from !== 'server') this.emit('chat', d);
    if (entry) this._addToTimeline(entry);
  }

  /** The server acknowledged one of our messages: `{ack: sseq, seq, ts, tick?, dup?}`. */
  _onAck(sess, label, h) {
    const pending = sess.acks[label]?.get(h.ack);
    if (!pending) return;
    sess.acks[label].delete(h.ack);
    clearTimeout(pending.timer);
    const num = (v) => (typeof v === 'number' ? v : null);
    const result = { sseq: h.ack, seq: num(h.seq), ts: num(h.ts), tick: num(h.tick), dup: h.dup === true };
    pending.waiter?.resolve(result);
    // Our own chat message, on the timeline where everyone else sees it.
    if (label === 'chat' && !result.dup && result.seq !== null && this._firstSight(sess, result.seq)) {
      const text = typeof pending.data === 'string' ? pending.data : null;
      const binary = text === null;
      const data = binary ? (pending.data instanceof ArrayBuffer ? new Uint8Array(pending.data) : pending.data) : text;
      this._addToTimeline({
        seq: result.seq,
        ts: result.ts,
        from: this.participantId,
        participant: null,
        event: null,
        text,
        binary,
        data,
        sseq: h.ack,
        replay: false,
        mine: true,
        to: pending.to,
      });
    }
  }

  /** An input tick batch: a `tick` event with every input, an `input` event for each other's. */
  _onTick(sess, h, payload) {
    let envs;
    try {
      envs = decodeTickBatch(payload);
    } catch (e) {
      this._error('malformed_message', `input tick ${h.tick}: ${e.message}`);
      return;
    }
    const inputs = envs.map((env) => {
      const d = this._dataDetail(env.header, env);
      d.tick = h.tick;
      return d;
    });
    this.emit('tick', { tick: h.tick, ts: typeof h.ts === 'number' ? h.ts : null, count: inputs.length, inputs });
    for (const d of inputs) if (!d.mine) this.emit('input', d);
  }

  /** Send `history` and wait for its reply and replayed messages (see `history`). */
  _history(sess, since, auto) {
    return new Promise((resolve, reject) => {
      const req = { since, auto, reply: null, messages: [], resolve, reject, timer: null };
      req.timer = setTimeout(() => {
        this._endHistory(sess, req);
        reject(new PlazaError('timeout', `history since ${since}: ${req.reply ? `${req.messages.length} of ${req.reply.replayed} messages` : 'no reply'} within ${this.options.historyTimeout} ms`));
      }, this.options.historyTimeout);
      sess.historyReqs.push(req);
      this._sendOn(sess, { type: 'history', since });
    });
  }

  _endHistory(sess, req) {
    clearTimeout(req.timer);
    const i = sess.historyReqs.indexOf(req);
    if (i >= 0) sess.historyReqs.splice(i, 1);
  }

  _historyDone(sess, req) {
    if (!req.reply || req.messages.length < req.reply.replayed) return;
    this._endHistory(sess, req);
    req.messages.sort((a, b) => a.seq - b.seq);
    const { type, ...reply } = req.reply;
    const detail = { ...reply, messages: req.messages, auto: req.auto };
    this.emit('history', detail);
    req.resolve(detail);
  }

  /** The `history` reply on the WebSocket: for the oldest request still without one. */
  _onHistoryReply(sess, msg) {
    const req = sess.historyReqs.find((r) => !r.reply);
    if (!req) return;
    req.reply = msg;
    this._historyDone(sess, req);
  }

  /** A replayed message on `chat`: for the oldest request still waiting for messages. */
  _historyMessage(sess, entry) {
    const req = sess.historyReqs.find((r) => !r.reply || r.messages.length < r.reply.replayed);
    if (!req) return;
    req.messages.push(entry);
    this._historyDone(sess, req);
  }

  // ---- publisher connection ----

  /** Publish `_publishSpec` on `sess`; calls are serialized (one publish_offer at a time). */
  _publishOn(sess) {
    const run = sess.pubQueue.then(() => (sess.closed ? undefined : this._publishNow(sess)));
    sess.pubQueue = run.catch(() => {});
    return run;
  }

  async _publishNow(sess) {
    const { stream, simulcast } = this._publishSpec;
    if (sess.pub) {
      // Already publishing: swap in the new stream's tracks (no renegotiation needed).
      for (const sender of sess.pub.getSenders()) {
        const kind = sender.track?.kind ?? null;
        const next = kind === 'video' ? stream.getVideoTracks()[0] : kind === 'audio' ? stream.getAudioTracks()[0] : null;
        if (next && sender.track !== next) await sender.replaceTrack(next);
      }
      return;
    }
    const pc = new RTCPeerConnection(this._pcConfig(sess.iceServers ? { ice_servers: sess.iceServers } : sess.joinedMsg));
    sess.pub = pc;
    pc.onicecandidate = (e) => this._onLocalCandidate(sess, 'publisher', e.candidate);
    pc.onconnectionstatechange = () => this._onPcState(sess, 'publisher', pc.connectionState);
    pc.oniceconnectionstatechange = () => this._onIceState(sess, 'publisher', pc.iceConnectionState);
    const audio = stream.getAudioTracks()[0];
    const video = stream.getVideoTracks()[0];
    if (audio) pc.addTransceiver(audio, { direction: 'sendonly', streams: [stream] });
    if (video) {
      const init = { direction: 'sendonly', streams: [stream] };
      if (simulcast) {
        init.sendEncodings = SIMULCAST_LAYERS.map(({ rid, scaleResolutionDownBy, maxBitrate }) => ({
          rid,
          scaleResolutionDownBy,
          maxBitrate,
        }));
      }
      const tr = pc.addTransceiver(video, init);
      preferCodec(tr, this.options.videoCodec ?? 'video/VP8');
    }
    await this._renegotiatePublisher(sess);
  }

  async _renegotiatePublisher(sess, { restart = false } = {}) {
    const pc = sess.pub;
    if (restart) pc.restartIce(); // the next offer carries new ICE credentials
    const offer = await pc.createOffer();
    await pc.setLocalDescription(offer);
    if (sess.closed) return;
    const answerSdp = await new Promise((resolve, reject) => {
      sess.pubAnswerWaiter = { resolve, reject };
      this._sendOn(sess, { type: 'publish_offer', sdp: pc.localDescription.sdp });
      if (!sess.pubOffered) {
        sess.pubOffered = true;
        for (const c of sess.pubCandidates) this._sendOn(sess, { type: 'trickle', target: 'publisher', candidate: c });
        sess.pubCandidates = [];
      }
    });
    if (sess.closed) return;
    await pc.setRemoteDescription({ type: 'answer', sdp: answerSdp });
    const pref = this.options.degradationPreference;
    for (const sender of pc.getSenders()) {
      if (!pref || sender.track?.kind !== 'video') continue;
      const params = sender.getParameters();
      if (params.degradationPreference === pref) continue;
      params.degradationPreference = pref;
      await sender.setParameters(params).catch(() => {}); // optional: not every browser has it
    }
    // A pending mute from before the server knew the tracks is applied when their ids arrive.
    if (!restart) this.emit('published', { stream: this._publishSpec.stream });
  }

  // Only the encodings the server names in `paused` are paused: a layer the server has not
  // received yet (not in `active` either) stays on, so it can still be discovered.
  async _applyPublisherLayers(sess, trackId, active, paused) {
    const sender = this._senderForServerTrack(sess, trackId);
    let applied = false;
    const params = sender?.getParameters();
    if (params?.encodings?.length) {
      let changed = false;
      for (const enc of params.encodings) {
        if (!enc.rid) continue;
        const want = Array.isArray(paused) ? !paused.includes(enc.rid) : active.includes(enc.rid);
        if (enc.active !== want) {
          enc.active = want;
          changed = true;
        }
      }
      applied = true;
      if (changed) await sender.setParameters(params).catch((e) => ((applied = false), this._error('internal', `setParameters: ${e.message}`)));
    }
    this.emit('publisherlayers', { trackId, active: [...active], applied });
  }

  /** The publisher RTCRtpSender that carries server track `trackId`. */
  _senderForServerTrack(sess, trackId) {
    if (!sess.pub) return null;
    const senders = sess.pub.getSenders().filter((s) => s.track);
    for (const [clientId, serverId] of this._ownTrackIds) {
      if (serverId === trackId) return senders.find((s) => s.track.id === clientId) ?? null;
    }
    // The server does not (yet) tell a publisher its own track ids; with one simulcast video
    // sender there is no ambiguity.
    const simulcast = senders.filter((s) => s.track.kind === 'video' && s.getParameters().encodings?.length > 1);
    if (simulcast.length === 1) {
      this._ownTrackIds.set(simulcast[0].track.id, trackId);
      return simulcast[0];
    }
    return null;
  }

  _learnOwnTrack(info) {
    this._ownTrackIds.set(info.client_track_id, info.id);
    const local = this.localStream?.getTracks().find((t) => t.id === info.client_track_id);
    if (!local) return;
    const enabled = local.kind === 'video' ? this.cameraEnabled : this.microphoneEnabled;
    if (!enabled || info.muted) this._send({ type: 'mute', track_id: info.id, muted: !enabled });
  }

  _setLocalEnabled(kind, enabled) {
    const track = kind === 'video' ? this.localStream?.getVideoTracks()[0] : this.localStream?.getAudioTracks()[0];
    if (track) track.enabled = enabled;
    const serverId = track ? this._ownTrackIds.get(track.id) : null;
    if (serverId) this._send({ type: 'mute', track_id: serverId, muted: !enabled });
    this.emit('localmute', { kind, muted: !enabled, trackId: serverId ?? null });
    return serverId ?? null;
  }

  // ---- ICE, connection state, keep-alive ----

  _onLocalCandidate(sess, target, candidate) {
    if (sess.closed) return;
    const c = candidate ? candidate.toJSON() : { candidate: '' };
    if (c.candidate === undefined) c.candidate = '';
    const ready = target === 'publisher' ? sess.pubOffered : sess.subAnswered;
    if (!ready) {
      (target === 'publisher' ? sess.pubCandidates : sess.subCandidates).push(c);
      return;
    }
    this._sendOn(sess, { type: 'trickle', target, candidate: c });
  }

  _onPcState(sess, target, state) {
    if (sess.closed) return;
    this.emit('pcstatechange', { target, state });
    if (state === 'connected') {
      if (sess.iceGiveUp?.[target]) {
        clearTimeout(sess.iceGiveUp[target]);
        delete sess.iceGiveUp[target];
      }
      return;
    }
    if (state !== 'failed') return;
    // First try an ICE restart (the session, its tracks and DTLS are kept); start over with
    // a fresh session only if that does not bring the connection back in time.
    if (!sess.iceGiveUp?.[target]) {
      this._restartIceOn(sess, target, `${target} connection failed`);
      sess.iceGiveUp = { ...sess.iceGiveUp };
      sess.iceGiveUp[target] = setTimeout(() => {
        const pc = target === 'publisher' ? sess.pub : sess.sub;
        if (sess.closed || pc?.connectionState === 'connected') return;
        this._failSession(sess, `${target} connection failed (an ICE restart did not bring it back)`);
      }, this.options.iceRestartTimeout);
      return;
    }
    this._failSession(sess, `${target} connection failed`);
  }

  _failSession(sess, reason) {
    if (sess.closed) return;
    this._error('transport_failed', reason);
    this._closeSession(sess, reason);
    this._scheduleReconnect(reason);
  }

  /** ICE state of one connection: one that stays 'disconnected' gets an ICE restart. */
  _onIceState(sess, target, state) {
    if (sess.closed) return;
    this.emit('icestatechange', { target, state });
    sess.iceTimers ??= {};
    clearTimeout(sess.iceTimers[target]);
    if (state === 'connected' || state === 'completed' || state === 'failed') {
      // A restart is over: it worked, or a failed connection may try another.
      if (sess.restarting) delete sess.restarting[target];
    } else if (state === 'disconnected') {
      sess.iceTimers[target] = setTimeout(() => {
        const pc = target === 'publisher' ? sess.pub : sess.sub;
        if (!sess.closed && pc?.iceConnectionState === 'disconnected') this._restartIceOn(sess, target, 'ICE disconnected');
      }, this.options.iceRestartDelay);
    }
  }

  /**
   * Restart ICE on the publisher and/or subscriber connection ('publisher' | 'subscriber' |
   * 'both'): new ICE credentials and candidates, same tracks, DTLS session and data channels,
   * no new join. The client does this by itself when a connection stays ICE 'disconnected'
   * for `iceRestartDelay` ms, when one fails, and when the browser reports a network change;
   * an application that knows better (e.g. it switched networks) may call it.
   */
  restartIce(target = 'both', reason = 'asked by the application') {
    const sess = this._sess;
    if (!sess || sess.closed) return;
    for (const t of target === 'both' ? ['publisher', 'subscriber'] : [target]) this._restartIceOn(sess, t, reason);
  }

  async _restartIceOn(sess, target, reason) {
    if (sess.closed) return;
    // What broke the path often broke the WebSocket too (a new address), and a socket that
    // died silently would swallow the restart: check it first, and resume on a new one if it
    // does not answer (what is sent meanwhile waits in the outbox). A dead socket means the
    // network changed under both connections: both restart.
    const alive = await this._socketAlive(sess);
    if (sess.closed) return;
    sess.restarting ??= {};
    for (const t of alive ? [target] : ['publisher', 'subscriber']) {
      // One restart at a time per connection: until it connects again (or fails).
      if (sess.restarting[t]) continue;
      if (t === 'publisher') {
        if (!sess.pub) continue;
        // Serialized with publishing: one publish_offer at a time. With STUN/TURN servers,
        // `ice_restart` fetches fresh TURN credentials first (the offer gathers with them).
        const fresh = sess.joinedMsg?.ice_servers?.length ? () => this._freshIceServers(sess) : () => undefined;
        const run = sess.pubQueue.then(async () => {
          await fresh();
          if (!sess.closed) await this._renegotiatePublisher(sess, { restart: true });
        });
        sess.pubQueue = run.catch(() => {});
      } else {
        if (!sess.sub?.remoteDescription) continue;
        // The server offers on this connection: it answers with a subscribe_offer that has
        // new credentials. (Queued while the WebSocket is down; sent when the session resumes.)
        this._sendOn(sess, { type: 'ice_restart', target: 'subscriber' });
      }
      sess.restarting[t] = true;
      this.iceRestarts[t]++;
      this.emit('icerestart', { target: t, reason: t === target ? reason : `${reason} (${target}); the WebSocket was dead too` });
    }
  }

  /** Ask for fresh ICE servers (`ice_restart` for the publisher) and wait for them (≤ 2 s). */
  _freshIceServers(sess) {
    return new Promise((resolve) => {
      const timer = setTimeout(() => {
        sess.iceServersWaiter = null;
        resolve();
      }, 2000);
      sess.iceServersWaiter = () => {
        clearTimeout(timer);
        resolve();
      };
      this._sendOn(sess, { type: 'ice_restart', target: 'publisher' });
    });
  }

  /**
   * Whether the session's WebSocket answers a ping within `socketProbeTimeout` ms. One that
   * does not is treated as dropped (the resume path takes over). Concurrent callers share one
   * probe.
   */
  _socketAlive(sess) {
    if (sess.closed || sess.wsDown) return Promise.resolve(false);
    if (sess.probe) return sess.probe;
    const sent = performance.now();
    this._sendOn(sess, { type: 'ping', ts: sent });
    sess.probe = new Promise((resolve) => {
      const check = setInterval(() => {
        if (sess.closed || sess.wsDown) {
          finish(false);
        } else if (sess.lastMessage >= sent) {
          finish(true);
        } else if (performance.now() - sent > this.options.socketProbeTimeout) {
          try {
            sess.ws.close(4000, 'no answer to a ping');
          } catch {}
          this._onSocketClosed(sess, { code: 4000, reason: 'no answer to a ping' });
          finish(false);
        }
      }, 50);
      const finish = (alive) => {
        clearInterval(check);
        sess.probe = null;
        resolve(alive);
      };
    });
    return sess.probe;
  }

  _keepAlive(sess) {
    if (sess.closed) return;
    if (performance.now() - sess.lastMessage > this.options.pingTimeout) {
      // Half-open socket: treat as dropped.
      try {
        sess.ws.close(4000, 'ping timeout');
      } catch {}
      this._onSocketClosed(sess, { code: 4000, reason: 'ping timeout' });
      return;
    }
    this._sendOn(sess, { type: 'ping', ts: performance.now() });
  }

  _onSocketClosed(sess, ev) {
    if (sess.closed || sess.wsDown) return;
    const reason = sess.endReason ?? ev.reason ?? `code ${ev.code}`;
    // A drop the server did not ask for: keep the peer connections (media flows on) and try
    // to resume the same session on a new socket within the server's grace period.
    if (!this._leaving && !sess.endReason && sess.resumeToken && this.options.reconnect) {
      sess.wsDown = true;
      sess.resumeUntil = performance.now() + sess.resumeGrace;
      clearInterval(sess.pingTimer);
      this.emit('disconnected', { reason, code: ev.code, resuming: true });
      this._scheduleReconnect(reason);
      return;
    }
    this._closeSession(sess, reason);
    if (this._leaving) return;
    this.emit('disconnected', { reason, code: ev.code });
    this._scheduleReconnect(reason);
  }

  /** Tear down a session: sockets, PCs, and every remote track and participant it knew. */
  _closeSession(sess, reason) {
    if (sess.closed) return;
    sess.closed = true;
    clearInterval(sess.pingTimer);
    clearTimeout(sess.turnRefresh);
    sess.pubAnswerWaiter?.reject(new PlazaError('unavailable', `session ended: ${reason}`));
    sess.pubAnswerWaiter = null;
    this._dropAcks(sess, null, `session ended: ${reason}`);
    for (const req of sess.historyReqs.splice(0)) {
      clearTimeout(req.timer);
      req.reject(new PlazaError('unavailable', `history: session ended: ${reason}`));
    }
    try {
      sess.ws?.close(1000);
    } catch {}
    sess.pub?.close();
    sess.sub?.close();
    if (this._sess === sess) this._sess = null;
    for (const id of [...this.remoteTracks.keys()]) this._removeRemote(null, id, 'disconnected');
    for (const [id, p] of this.participants) this.emit('participantleft', { participantId: id, participant: p, reason: 'disconnected' });
    this.participants = new Map();
    this._ownTrackIds.clear();
  }

  _scheduleReconnect(reason) {
    if (this._leaving || !this.options.reconnect) {
      this._setState('disconnected', { reason });
      return;
    }
    if (this._reconnectAttempt >= this.options.maxReconnectAttempts) {
      this._setState('failed', { reason });
      this._error('reconnect_failed', `gave up reconnecting after ${this._reconnectAttempt} attempts (${reason})`);
      return;
    }
    const delays = this.options.reconnectDelays;
    let delay = delays[Math.min(this._reconnectAttempt, delays.length - 1)];
    // A server that is shutting down asked us to go away: give it time before coming back.
    if (/shutting down/i.test(reason)) delay = Math.max(delay, 2000);
    this._reconnectAttempt++;
    this._setState('reconnecting', { reason, attempt: this._reconnectAttempt, delay });
    this.emit('reconnecting', { reason, attempt: this._reconnectAttempt, delay });
    clearTimeout(this._reconnectTimer);
    this._reconnectTimer = setTimeout(() => this._reconnect(), delay);
  }

  /**
   * Re-establish the session. Version 1 servers cannot resume a session (the participant is
   * removed when its socket closes), so this rejoins the same room under the same name with a
   * fresh session and republishes. A resume step (same participant id, ICE restart) slots in
   * before the rejoin once the protocol has one: see `_tryResume`.
   */
  async _reconnect() {
    if (this._leaving) return;
    try {
      if (await this._tryResume()) return;
      const joined = await this._openSession();
      this._setState('connected');
      this.emit('reconnected', { participantId: joined.participant_id, resumed: false });
    } catch (e) {
      this._scheduleReconnect(e.message);
    }
  }

  /**
   * Resume the dropped session on a new socket: `resume` with the token from `joined` and the
   * number of messages received; the server answers `resumed` and sends what we missed. The
   * peer connections, tracks and subscriptions are kept. Returns true when resumed; false
   * (after tearing the old session down) when there is nothing to resume or the server
   * refused, so the caller joins afresh.
   */
  async _tryResume() {
    const sess = this._sess;
    if (!sess || sess.closed || !sess.wsDown) return false;
    if (performance.now() > sess.resumeUntil) {
      this._closeSession(sess, 'resume grace period over');
      return false;
    }
    const WS = this.options.WebSocket ?? globalThis.WebSocket;
    // The session lives on its node (in a cluster, maybe not the entry).
    const url = this.nodeUrl ?? this.options.url;
    const result = await new Promise((resolve) => {
      let ws;
      const done = (ok, why) => {
        clearTimeout(timer);
        if (!ok) {
          try {
            ws?.close(1000);
          } catch {}
        }
        resolve({ ok, why, ws });
      };
      const timer = setTimeout(() => done(false, 'timeout'), this.options.connectTimeout);
      try {
        ws = new WS(url);
      } catch (e) {
        done(false, e.message);
        return;
      }
      ws.binaryType = 'arraybuffer';
      ws.onopen = () =>
        ws.send(JSON.stringify({ type: 'resume', participant_id: this.participantId, resume_token: sess.resumeToken, received: sess.received }));
      ws.onerror = () => done(false, 'unreachable');
      ws.onclose = (ev) => done(false, `closed (code ${ev.code})`);
      ws.onmessage = (ev) => {
        let msg;
        try {
          msg = JSON.parse(ev.data);
        } catch {
          done(false, 'malformed reply');
          return;
        }
        if (msg.type === 'resumed') done(true);
        else if (msg.type === 'error' && msg.code === 'resume_failed') done(false, `refused: ${msg.message}`);
        else if (msg.type === 'error') done(false, `error ${msg.code}: ${msg.message}`, true);
      };
    });
    if (!result.ok) {
      // Refused (or too late): start over. A socket that could not be opened is retried by
      // the caller's backoff while the grace period lasts.
      if (/refused/.test(result.why) || performance.now() > sess.resumeUntil) {
        this._closeSession(sess, `resume failed: ${result.why}`);
        return false;
      }
      // In a cluster the session's node may be gone (its rooms are placed again on a live
      // node): when the entry answers while the node does not, rejoin through the entry
      // rather than wait out the grace period. When neither answers, our own network is
      // down: keep trying to resume.
      if (url !== this.options.url && (await this._reachable(this.options.url))) {
        this._closeSession(sess, `resume failed: node ${this.nodeId ?? url} ${result.why}; rejoining through ${this.options.url}`);
        return false;
      }
      throw new Error(`resume: ${result.why}`);
    }
    const ws = result.ws;
    sess.ws = ws;
    sess.wsDown = false;
    sess.lastMessage = performance.now();
    ws.onerror = () => {};
    ws.onclose = (ev) => this._onSocketClosed(sess, ev);
    ws.onmessage = (ev) => {
      const msg = this._received(sess, ev);
      if (msg) this._dispatch(sess, msg);
    };
    sess.pingTimer = setInterval(() => this._keepAlive(sess), this.options.pingInterval);
    for (const m of sess.outbox.splice(0)) this._sendOn(sess, m);
    this._clockBurst(sess);
    // The data channels ran on, but ask anyway: whatever was said after the last chat seq
    // we saw is replayed, and what we already have is dropped by seq.
    if (this.options.historyAfterResume && sess.tl.lastSeq > 0) {
      this._history(sess, sess.tl.lastSeq, true).catch((e) => this._error(e.code ?? 'internal', `history after resume: ${e.message}`));
    }
    this._reconnectAttempt = 0;
    this._setState('connected');
    this.emit('reconnected', { participantId: this.participantId, resumed: true });
    return true;
  }

  /**
   * Whether a WebSocket to `url` opens within `connectTimeout` ms (at most 3 s); it is closed
   * at once, nothing is sent.
   */
  _reachable(url) {
    const WS = this.options.WebSocket ?? globalThis.WebSocket;
    return new Promise((resolve) => {
      let ws;
      const done = (ok) => {
        clearTimeout(timer);
        try {
          ws?.close(1000);
        } catch {}
        resolve(ok);
      };
      const timer = setTimeout(() => done(false), Math.min(this.options.connectTimeout, 3000));
      try {
        ws = new WS(url);
      } catch {
        done(false);
        return;
      }
      ws.onopen = () => done(true);
      ws.onerror = () => done(false);
      ws.onclose = () => done(false);
    });
  }

  // ---- adaptive stream / quality ----

  _settingsOf(trackId) {
    if (!this._settings.has(trackId)) this._settings.set(trackId, { quality: null, qualitySet: false, width: null, height: null });
    return this._settings.get(trackId);
  }

  _onResize(entries) {
    for (const e of entries) {
      const id = e.target.dataset.plazaTrack;
      if (id) this._scheduleSize(id);
    }
  }

  _scheduleSize(trackId) {
    if (this._sizeTimers.has(trackId)) return;
    this._sizeTimers.set(
      trackId,
      setTimeout(() => {
        this._sizeTimers.delete(trackId);
        this._measure(trackId);
      }, this.options.sizeDebounce),
    );
  }

  _measure(trackId) {
    if (!this.options.adaptiveStream) return;
    const dpr = globalThis.devicePixelRatio || 1;
    let w = 0;
    let h = 0;
    for (const el of this._elements.get(trackId) ?? []) {
      const r = el.getBoundingClientRect();
      w = Math.max(w, Math.round(r.width * dpr));
      h = Math.max(h, Math.round(r.height * dpr));
    }
    if (!w || !h) return; // hidden or detached: keep the last size
    const s = this._settingsOf(trackId);
    s.width = w;
    s.height = h;
    this._sendSettings(trackId);
  }

  /** Send `track_settings` when what the server should know changed (or `force`). */
  _sendSettings(trackId, force = false) {
    const rt = this.remoteTracks.get(trackId);
    if (!rt || rt.kind !== 'video') return;
    const s = this._settingsOf(trackId);
    const quality = s.qualitySet ? s.quality : this.options.defaultQuality;
    const msg = { type: 'track_settings', track_id: trackId, quality: quality ?? null };
    if (this.options.adaptiveStream && s.width && s.height) {
      msg.width = s.width;
      msg.height = s.height;
    }
    // Nothing to say yet: the server's default is "best available".
    if (force && msg.quality === null && msg.width === undefined) return;
    const key = JSON.stringify(msg);
    if (this._sent.get(trackId) === key) return;
    this._sent.set(trackId, key);
    this._send(msg);
  }

  // ---- sending ----

  _send(msg) {
    if (this._sess) this._sendOn(this._sess, msg);
  }

  _sendOn(sess, msg) {
    if (sess.wsDown) {
      // Sent once the session is resumed (bounded: the oldest go first).
      if (sess.outbox.length < 256) sess.outbox.push(msg);
      return;
    }
    if (sess.ws?.readyState === 1) sess.ws.send(JSON.stringify(msg));
  }
}

/** Put `mime` first in a transceiver's codec preferences (keeps the others, e.g. RTX). */
function preferCodec(transceiver, mime) {
  if (!transceiver.setCodecPreferences) return;
  const kind = transceiver.receiver.track.kind;
  for (const source of [globalThis.RTCRtpReceiver, globalThis.RTCRtpSender]) {
    const caps = source?.getCapabilities?.(kind);
    if (!caps) continue;
    const isIt = (c) => c.mimeType.toLowerCase() === mime.toLowerCase();
    if (!caps.codecs.some(isIt)) continue;
    try {
      transceiver.setCodecPreferences([...caps.codecs.filter(isIt), ...caps.codecs.filter((c) => !isIt(c))]);
      return;
    } catch {
      // try the other capability list; the browser's default order is fine otherwise
    }
  }
}

export default PlazaClient;
