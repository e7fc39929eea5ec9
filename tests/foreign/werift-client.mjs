// A Plaza participant built on werift (pure TypeScript WebRTC), talking the signaling protocol of
// signaling/README.md itself.
//
//   node werift-client.mjs --url ws://H:P/rtc --room R --name N --token JWT [--publish] [--expect-from NAME]
//                          [--peer NAME] [--until-signal] [--media-only] [--timeout S]
//
// Every participant answers the server's subscribe offers and says hello on the `chat` data
// channel. With --publish it also publishes Opus + VP8 (assets/ clips, RTP packetised here) on
// a publisher PC whose offer carries no a=msid (werift's default when a track is added without a
// stream). With --expect-from NAME it checks what it receives from NAME: one audio track whose
// packets carry the Opus payload type and are small, one video track whose packets carry the VP8
// payload type and include a keyframe, and NAME's chat (not with --media-only, for a publisher
// that says nothing); then it sends `done` on chat and leaves.
// A publisher leaves when --peer sends `done` (with --until-signal: at SIGTERM, passing if its
// tracks were published and --peer's chat arrived). Prints `RESULT {json}` and exits 0 on success,
// 1 on failure or timeout.
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import WebSocket from 'ws';
import { RTCPeerConnection, MediaStreamTrack, RtpPacket, RtpHeader } from 'werift';
import { readIvf, readOggOpus, packetiseVp8, isVp8KeyframeStart } from './media.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const ASSETS = join(here, '..', '..', 'assets');

const args = { timeout: 25 };
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i];
  const key = a.replace(/^--/, '').replace(/-/g, '_');
  if (a === '--publish') args.publish = true;
  else if (a === '--until-signal') args.until_signal = true;
  else if (a === '--media-only') args.media_only = true;
  else args[key] = process.argv[++i];
}
for (const k of ['url', 'room', 'name', 'token']) if (!args[k]) throw new Error(`--${k} is required`);

const t0 = Date.now();
const log = (...m) => console.error(`[werift ${args.name} +${((Date.now() - t0) / 1000).toFixed(2)}s]`, ...m);
const result = { client: 'werift', name: args.name, errors: [], tracks: {}, chat_from: [], own_tracks: [] };
let finished = false;

function finish(ok, why) {
  if (finished) return;
  finished = true;
  result.ok = ok;
  result.reason = why;
  log(ok ? 'PASS' : 'FAIL', why);
  console.log('RESULT ' + JSON.stringify(result));
  try {
    ws.send(JSON.stringify({ type: 'leave' }));
  } catch {}
  setTimeout(() => process.exit(ok ? 0 : 1), 200);
}
setTimeout(() => finish(false, `timed out after ${args.timeout} s: ${JSON.stringify(progress())}`), Number(args.timeout) * 1000);

const ws = new WebSocket(args.url);
const send = (m) => ws.send(JSON.stringify(m));
const names = new Map(); // participant id -> name
let myId = null;

// ---- subscriber PC: answer every offer, receive tracks and data channels ----
const sub = new RTCPeerConnection({});
const mids = new Map(); // mid -> {kind, codecs: Map<pt, name>, msid}
let chat = null;
let offerChain = Promise.resolve();

function parseSdp(sdp) {
  const out = new Map();
  let cur = null;
  for (const line of sdp.split(/\r?\n/)) {
    if (line.startsWith('m=')) {
      cur = { kind: line.slice(2).split(' ')[0], codecs: new Map(), msid: null, mid: null };
    } else if (cur && line.startsWith('a=mid:')) {
      cur.mid = line.slice(6).trim();
      out.set(cur.mid, cur);
    } else if (cur && line.startsWith('a=rtpmap:')) {
      const [pt, enc] = line.slice(9).split(' ');
      cur.codecs.set(Number(pt), enc.split('/')[0].toLowerCase());
    } else if (cur && line.startsWith('a=msid:')) {
      cur.msid = line.slice(7).trim().split(' ');
    }
  }
  return out;
}

sub.ontrack = ({ track, transceiver }) => {
  const mid = transceiver.mid;
  const m = mids.get(mid);
  const key = `mid${mid}`;
  const st = (result.tracks[key] = {
    mid,
    kind: m?.kind ?? track.kind,
    from: m?.msid ? names.get(m.msid[0]) ?? m.msid[0] : null,
    track_id: m?.msid?.[1] ?? null,
    packets: 0,
    bytes: 0,
    max_payload: 0,
    pts: {},
    codecs: [],
    keyframes: 0,
  });
  log('ontrack mid', mid, 'kind', st.kind, 'from', st.from);
  track.onReceiveRtp.subscribe((rtp) => {
    st.packets++;
    st.bytes += rtp.payload.length;
    st.max_payload = Math.max(st.max_payload, rtp.payload.length);
    const pt = rtp.header.payloadType;
    st.pts[pt] = (st.pts[pt] ?? 0) + 1;
    const codec = mids.get(mid)?.codecs.get(pt) ?? `pt${pt}`;
    if (!st.codecs.includes(codec)) st.codecs.push(codec);
    if (codec === 'vp8' && isVp8KeyframeStart(rtp.payload)) st.keyframes++;
    check();
  });
};

sub.ondatachannel = ({ channel }) => {
  log('data channel', channel.label);
  if (channel.label !== 'chat') return;
  chat = channel;
  channel.onMessage.subscribe((data) => {
    const text = Buffer.isBuffer(data) ? data.toString('utf8') : data;
    const nl = text.indexOf('\n');
    const from = names.get(JSON.parse(text.slice(0, nl)).from) ?? '?';
    const body = text.slice(nl + 1);
    if (!result.chat_from.includes(`${from}:${body}`)) result.chat_from.push(`${from}:${body}`);
    check();
  });
};
setInterval(() => {
  if (chat && chat.readyState === 'open') chat.send(`{}\nhello from ${args.name}`);
}, 400);

sub.connectionStateChange.subscribe((s) => {
  log('subscriber PC', s);
  if (s === 'failed') finish(false, 'subscriber PC failed');
});

async function answer(sdp) {
  for (const [mid, m] of parseSdp(sdp)) mids.set(mid, m);
  await sub.setRemoteDescription({ type: 'offer', sdp });
  const ans = await sub.createAnswer();
  await sub.setLocalDescription(ans);
  send({ type: 'subscribe_answer', sdp: sub.localDescription.sdp });
}

// ---- publisher PC ----
let pub = null;
async function publish() {
  pub = new RTCPeerConnection({});
  const audio = new MediaStreamTrack({ kind: 'audio' });
  const video = new MediaStreamTrack({ kind: 'video' });
  pub.addTransceiver(audio, { direction: 'sendonly' });
  const vt = pub.addTransceiver(video, { direction: 'sendonly' });
  const offer = await pub.createOffer();
  await pub.setLocalDescription(offer);
  const sdp = pub.localDescription.sdp;
  result.offer_has_msid = /\r?\na=msid:/.test(sdp);
  result.offer_has_ssrc = /\r?\na=ssrc:/.test(sdp);
  log('publish offer: a=msid', result.offer_has_msid, 'a=ssrc', result.offer_has_ssrc);
  send({ type: 'publish_offer', sdp });
  pub.connectionStateChange.subscribe((s) => {
    log('publisher PC', s);
    if (s === 'failed') finish(false, 'publisher PC failed');
    if (s === 'connected') startMedia(audio, video, vt.sender);
  });
}

function startMedia(audio, video, videoSender) {
  const { frames, fps } = readIvf(join(ASSETS, 'video_320x240_vp8.ivf'));
  const opus = readOggOpus(join(ASSETS, 'audio_sine_opus.ogg'));
  let vi = 0;
  let vseq = 0;
  let vts = 0;
  let pic = 0;
  videoSender.onPictureLossIndication.subscribe(() => {
    result.plis = (result.plis ?? 0) + 1;
    vi = 0; // restart at the first frame, a keyframe
  });
  setInterval(() => {
    const f = frames[vi];
    vi = (vi + 1) % frames.length;
    const pkts = packetiseVp8(f.data, pic);
    pic = (pic + 1) & 0x7fff;
    pkts.forEach((payload, i) => {
      const header = new RtpHeader({ payloadType: 96, sequenceNumber: vseq, timestamp: vts, marker: i === pkts.length - 1 });
      vseq = (vseq + 1) & 0xffff;
      video.writeRtp(new RtpPacket(header, payload));
    });
    vts = (vts + Math.round(90000 / fps)) >>> 0;
  }, 1000 / fps);
  let ai = 0;
  let aseq = 0;
  let ats = 0;
  setInterval(() => {
    const header = new RtpHeader({ payloadType: 111, sequenceNumber: aseq, timestamp: ats, marker: false });
    audio.writeRtp(new RtpPacket(header, opus[ai]));
    ai = (ai + 1) % opus.length;
    aseq = (aseq + 1) & 0xffff;
    ats = (ats + 960) >>> 0;
  }, 20);
}

// ---- checks ----
function mediaFrom(name) {
  const ts = Object.values(result.tracks).filter((t) => t.from === name);
  return { audio: ts.filter((t) => t.kind === 'audio'), video: ts.filter((t) => t.kind === 'video') };
}
function mediaOk() {
  if (!args.expect_from) return true;
  const { audio, video } = mediaFrom(args.expect_from);
  // A foreign payload type in a track, or video-sized packets in the audio track (VP8 forwarded
  // under the Opus payload type), is a failure at once.
  for (const a of audio) {
    if (a.codecs.some((c) => c !== 'opus') || (a.packets >= 50 && a.bytes / a.packets >= 300)) {
      finish(false, `audio track carries something else than Opus: ${JSON.stringify(a)}`);
    }
  }
  for (const v of video) {
    if (v.codecs.some((c) => c !== 'vp8')) finish(false, `video track carries something else than VP8: ${JSON.stringify(v)}`);
  }
  if (audio.length !== 1 || video.length !== 1) return false;
  const [a] = audio;
  const [v] = video;
  return a.packets >= 50 && v.packets >= 30 && v.keyframes >= 1;
}
const chatFrom = (name, body) => result.chat_from.some((c) => (body ? c === `${name}:${body}` : c.startsWith(`${name}:`)));
function progress() {
  return { tracks: result.tracks, chat_from: result.chat_from, own_tracks: result.own_tracks, errors: result.errors };
}
let doneSent = false;
function check() {
  if (finished) return;
  if (args.expect_from) {
    if (mediaOk() && (args.media_only || chatFrom(args.expect_from)) && !doneSent) {
      doneSent = true;
      if (chat) chat.send(`{}\ndone`);
      setTimeout(() => finish(true, `media and chat from ${args.expect_from}`), 300);
    }
  } else if (args.publish) {
    if (args.until_signal) return;
    if (result.own_tracks.length >= 2 && (!args.peer || chatFrom(args.peer, 'done'))) finish(true, `published ${result.own_tracks.join(', ')}; ${args.peer ?? 'nobody'} said done`);
  } else if (args.peer && chatFrom(args.peer)) {
    finish(true, `chat from ${args.peer}`);
  }
}

// --until-signal: a publisher serving a peer that says nothing (the webrtc-rs load tester) runs
// until SIGTERM, then passes if its tracks were published and the peer's chat arrived.
process.on('SIGTERM', () => {
  const ok = args.publish && result.own_tracks.length >= 2 && (!args.peer || chatFrom(args.peer));
  finish(ok, `stopped by SIGTERM: ${JSON.stringify(progress())}`);
});

ws.on('open', () => send({ type: 'join', room: args.room, name: args.name, token: args.token, protocol: 1 }));
ws.on('close', (code, reason) => {
  if (!finished) finish(false, `WebSocket closed: ${code} ${reason}`);
});
ws.on('error', (e) => finish(false, `WebSocket error: ${e.message}`));
ws.on('message', (raw) => {
  const msg = JSON.parse(raw.toString());
  switch (msg.type) {
    case 'joined':
      myId = msg.participant_id;
      result.participant_id = myId;
      names.set(myId, args.name);
      for (const p of msg.participants) names.set(p.id, p.name);
      log('joined as', myId);
      if (args.publish) publish().catch((e) => finish(false, `publish: ${e.stack}`));
      break;
    case 'participant_joined':
      names.set(msg.participant.id, msg.participant.name);
      break;
    case 'subscribe_offer':
      offerChain = offerChain.then(() => answer(msg.sdp)).catch((e) => finish(false, `answering subscribe_offer: ${e.stack}`));
      break;
    case 'publish_answer':
      pub.setRemoteDescription({ type: 'answer', sdp: msg.sdp }).catch((e) => finish(false, `publish_answer: ${e.stack}`));
      break;
    case 'track_published':
      log('track_published', JSON.stringify(msg.track));
      if (msg.track.participant_id === myId) result.own_tracks.push(`${msg.track.kind}:${msg.track.mime_type}`);
      check();
      break;
    case 'error':
      log('server error', JSON.stringify(msg));
      result.errors.push(msg);
      break;
    case 'leave':
      finish(false, `removed by the server: ${msg.reason}`);
      break;
    default:
      break;
  }
});
