// WHIP ingest (RFC 9725) from a foreign client: a Chromium page on another origin publishes
// its fake camera and microphone with plain fetch() — no Plaza client code, CORS preflight
// and all — as three simulcast layers, and a Plaza subscriber page (the demo, subscribe-only)
// decodes the video and receives the audio. Then an ICE restart over PATCH (the viewer keeps
// decoding), a trickle PATCH with the session's ETag, and DELETE: the publisher leaves the
// viewer's grid.
// Run with scripts/browser-tests.sh (loopback-only network namespace, server started here).
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { startServer, launchParticipant, joinViaUrl, waitFor, waitForMediaFrom, gridNames, loopbackOnly, decodedWidth } from './harness.js';

let server;
let origin; // the publisher page's own origin (another port: every WHIP request is cross-origin)
const open = new Set();

async function participant(label, opts) {
  const p = await launchParticipant(label, opts);
  open.add(p);
  return p;
}

before(async () => {
  if (!loopbackOnly()) console.warn('warning: not in a loopback-only network namespace (run scripts/browser-tests.sh)');
  server = await startServer({ logName: 'plaza-whip.log' });
  origin = createServer((req, res) => {
    res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8' });
    res.end('<!doctype html><title>WHIP publisher</title><p>a page that knows nothing of Plaza</p>');
  });
  await new Promise((resolve, reject) => {
    origin.once('error', reject);
    origin.listen(0, '127.0.0.1', resolve);
  });
});

after(async () => {
  for (const p of open) {
    if (process.env.SHOW_BROWSER_LOGS) console.log(p.logs.join('\n'));
    await p.close();
  }
  await new Promise((r) => (origin ? origin.close(r) : r()));
  await server?.stop();
});

/** In the page: getUserMedia, a sendonly offer (video as three RIDs), POST it, apply the answer. */
async function whipPublish({ endpoint, token }) {
  const t0 = performance.now();
  const stream = await navigator.mediaDevices.getUserMedia({ audio: true, video: { width: 1280, height: 720 } });
  const pc = new RTCPeerConnection();
  pc.addTransceiver(stream.getAudioTracks()[0], { direction: 'sendonly', streams: [stream] });
  pc.addTransceiver(stream.getVideoTracks()[0], {
    direction: 'sendonly',
    streams: [stream],
    sendEncodings: [
      { rid: 'q', scaleResolutionDownBy: 4, maxBitrate: 150_000 },
      { rid: 'h', scaleResolutionDownBy: 2, maxBitrate: 500_000 },
      { rid: 'f', maxBitrate: 1_500_000 },
    ],
  });
  const candidates = [];
  pc.onicecandidate = (e) => e.candidate && candidates.push(e.candidate);
  await pc.setLocalDescription(await pc.createOffer());
  const res = await fetch(endpoint, {
    method: 'POST',
    headers: { 'Content-Type': 'application/sdp', Authorization: `Bearer ${token}` },
    body: pc.localDescription.sdp,
  });
  const answer = await res.text();
  if (res.status !== 201) return { status: res.status, body: answer };
  const location = new URL(res.headers.get('Location'), endpoint).href;
  await pc.setRemoteDescription({ type: 'answer', sdp: answer });
  window.whip = { pc, location, etag: res.headers.get('ETag'), token, candidates };
  await new Promise((resolve, reject) => {
    const check = () => {
      if (pc.connectionState === 'connected') resolve();
      if (pc.connectionState === 'failed') reject(new Error('connection failed'));
    };
    pc.onconnectionstatechange = check;
    check();
    setTimeout(() => reject(new Error(`not connected in 15 s (${pc.connectionState})`)), 15_000);
  });
  return {
    status: res.status,
    location,
    etag: window.whip.etag,
    contentType: res.headers.get('Content-Type'),
    answerHasCandidates: answer.includes('a=candidate:'),
    simulcast: pc.localDescription.sdp.includes('a=simulcast:send'),
    connectMs: performance.now() - t0,
  };
}

describe('WHIP from a browser with plain fetch()', { timeout: 180_000 }, () => {
  const room = `whip-${Date.now()}`;
  let viewer;
  let publisher;
  let token;

  it('a simulcast WHIP publish is decoded by a Plaza subscriber page', async () => {
    viewer = await participant('viewer');
    await joinViaUrl(viewer, server.url, room, 'viewer', '&grants=subscribe');
    const tr = await fetch(`${server.url}/dev/token?room=${encodeURIComponent(room)}&identity=chromium-whip&name=chromium-whip&grants=publish`);
    assert.equal(tr.status, 200);
    token = (await tr.json()).token;

    publisher = await participant('whip-publisher');
    await publisher.page.goto(`http://127.0.0.1:${origin.address().port}/`);
    const endpoint = `${server.url}/whip/${encodeURIComponent(room)}`;
    const r = await publisher.page.evaluate(whipPublish, { endpoint, token });
    assert.equal(r.status, 201, `POST: ${JSON.stringify(r)}`);
    assert.equal(r.contentType, 'application/sdp');
    assert.ok(r.location.startsWith(`${server.url}/whip/${encodeURIComponent(room)}/sessions/`), r.location);
    assert.match(r.etag, /^".+"$/);
    assert.ok(r.answerHasCandidates, 'the answer carries the server candidates');
    assert.ok(r.simulcast, 'Chromium offered simulcast');
    console.log(`# WHIP POST → connected in ${Math.round(r.connectMs)} ms (getUserMedia included)`);

    const media = await waitForMediaFrom(viewer, 'chromium-whip');
    assert.ok(media.v.frameWidth > 0);
    console.log(`# viewer decodes the WHIP video at ${media.v.frameWidth}x${media.v.frameHeight}`);
    assert.deepEqual(await gridNames(viewer), ['chromium-whip']);
    // The video track is a simulcast track with Chromium's three layers.
    const layers = await viewer.page.evaluate(() => {
      for (const p of window.plaza.client.participants.values()) {
        if (p.name !== 'chromium-whip') continue;
        for (const t of p.tracks.values()) if (t.kind === 'video') return [...(t.layers ?? [])].sort();
      }
      return null;
    });
    assert.deepEqual(layers, ['f', 'h', 'q']);

    // Each WebSocket subscriber gets the layer it asks for: a second one with quality=low
    // decodes the 320 wide layer while the first (no cap; the demo sizes its request to its
    // tile, so 640 or 1280) decodes a wider one at the same time.
    const low = await participant('viewer-low');
    await joinViaUrl(low, server.url, room, 'viewer-low', '&grants=subscribe&quality=low');
    await waitForMediaFrom(low, 'chromium-whip');
    await waitFor(async () => ((await decodedWidth(low, 'chromium-whip')) === 320 ? true : null), {
      timeout: 15_000,
      what: 'the quality=low subscriber to decode the 320 wide layer',
    });
    const top = await waitFor(
      async () => {
        const w = await decodedWidth(viewer, 'chromium-whip');
        return w > 320 ? w : null;
      },
      { timeout: 20_000, what: 'the uncapped subscriber to decode a layer wider than 320' },
    );
    assert.equal(await decodedWidth(low, 'chromium-whip'), 320, 'still on the low layer');
    console.log(`# WHIP simulcast: the quality=low subscriber decodes 320 wide, the uncapped one ${top}`);
    await low.close();
    open.delete(low);
  });

  it('an ICE restart over PATCH: Chromium gets the server\'s new credentials and the viewer keeps decoding', async () => {
    const r = await publisher.page.evaluate(async () => {
      const w = window.whip;
      const { pc } = w;
      const oldAnswer = pc.remoteDescription.sdp;
      pc.restartIce();
      await pc.setLocalDescription(await pc.createOffer());
      const offer = pc.localDescription.sdp;
      const ufrag = offer.match(/a=ice-ufrag:(\S+)/)[1];
      const pwd = offer.match(/a=ice-pwd:(\S+)/)[1];
      const mid = pc.getTransceivers()[0].mid;
      const res = await fetch(w.location, {
        method: 'PATCH',
        headers: { 'Content-Type': 'application/trickle-ice-sdpfrag', 'If-Match': '*', Authorization: `Bearer ${w.token}` },
        body: `a=ice-ufrag:${ufrag}\r\na=ice-pwd:${pwd}\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:${mid}\r\n`,
      });
      const frag = await res.text();
      if (res.status !== 200) return { status: res.status, frag };
      const newUfrag = frag.match(/a=ice-ufrag:(\S+)/)[1];
      const newPwd = frag.match(/a=ice-pwd:(\S+)/)[1];
      // The answer as before, with the server's new credentials and candidates (RFC 9725, ICE restarts).
      const candidates = frag.split(/\r?\n/).filter((l) => l.startsWith('a=candidate:'));
      const sdp = oldAnswer
        .split('\r\n')
        .filter((l) => !l.startsWith('a=candidate:') && l !== 'a=end-of-candidates')
        .map((l) => (l.startsWith('a=ice-ufrag:') ? `a=ice-ufrag:${newUfrag}` : l.startsWith('a=ice-pwd:') ? `a=ice-pwd:${newPwd}` : l))
        .join('\r\n');
      await pc.setRemoteDescription({ type: 'answer', sdp });
      for (const c of candidates) await pc.addIceCandidate({ candidate: c.slice(2), sdpMid: mid });
      const oldEtag = w.etag;
      w.etag = res.headers.get('ETag');
      return { status: res.status, changed: w.etag !== oldEtag, oldUfrag: oldAnswer.match(/a=ice-ufrag:(\S+)/)[1], newUfrag };
    });
    assert.equal(r.status, 200, JSON.stringify(r));
    assert.ok(r.changed, 'a new ETag');
    assert.notEqual(r.newUfrag, r.oldUfrag, 'new server credentials');
    await waitFor(() => publisher.page.evaluate(() => ['connected', 'completed'].includes(window.whip.pc.iceConnectionState) && window.whip.pc.connectionState === 'connected'), {
      timeout: 15_000,
      what: 'Chromium\'s ICE to connect again after the restart',
    });
    const media = await waitForMediaFrom(viewer, 'chromium-whip');
    assert.ok(media.v.frameWidth > 0);
    const m = await fetch(`${server.url}/stats`).then((x) => x.json());
    assert.equal(m.ice_restarts, 1, 'the server restarted ICE once');
  });

  it('trickle PATCH with the ETag is taken, a stale one is refused, DELETE ends the session', async () => {
    const r = await publisher.page.evaluate(async () => {
      const { location, etag, token, pc } = window.whip;
      const offer = pc.localDescription.sdp;
      const ufrag = offer.match(/a=ice-ufrag:(\S+)/)[1];
      const pwd = offer.match(/a=ice-pwd:(\S+)/)[1];
      const mid = pc.getTransceivers()[0].mid;
      const cand = window.whip.candidates[0]?.candidate ?? 'candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host';
      const frag = `a=ice-ufrag:${ufrag}\r\na=ice-pwd:${pwd}\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:${mid}\r\na=${cand}\r\na=end-of-candidates\r\n`;
      const patch = (ifMatch) =>
        fetch(location, {
          method: 'PATCH',
          headers: { 'Content-Type': 'application/trickle-ice-sdpfrag', 'If-Match': ifMatch, Authorization: `Bearer ${token}` },
          body: frag,
        }).then((x) => x.status);
      const ok = await patch(etag);
      const stale = await patch('"stale"');
      const del = await fetch(location, { method: 'DELETE', headers: { Authorization: `Bearer ${token}` } }).then((x) => x.status);
      const again = await fetch(location, { method: 'DELETE' }).then((x) => x.status);
      pc.close();
      return { ok, stale, del, again };
    });
    assert.deepEqual(r, { ok: 204, stale: 412, del: 200, again: 404 });
    await waitFor(async () => (await gridNames(viewer)).length === 0, { timeout: 10_000, what: 'the WHIP publisher to leave the viewer\'s grid' });
  });
});
