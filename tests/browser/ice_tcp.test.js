// ICE over TCP in Chromium and Firefox: with UDP to Plaza's media ports dropped (iptables,
// inside the loopback-only network namespace of scripts/browser-tests.sh), a publisher and a
// viewer still join over Plaza's passive TCP candidates, the viewer decodes video, and
// getStats() shows TCP on the selected candidate pairs. Join → first decoded frame is measured
// over UDP (before the block) and over TCP, and both are printed. Then a Firefox host and a
// Chromium viewer do the same over TCP, both ways (Firefox's own ICE-TCP and framing).
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer,
  launchParticipant,
  launchFirefoxParticipant,
  joinViaUrl,
  waitFor,
  remoteStats,
  waitForMediaFrom,
  loopbackOnly,
  blockUdpToPlaza,
  selectedCandidatePairs,
} from './harness.js';

// Its own ports (UDP and TCP 7902, 7903, …), so that it never meets another test file's server.
const PORT = 7900;
const UDP_PORT = 7902;

let server;
let block = null;
const open = new Set();

function blockUdp() {
  block = blockUdpToPlaza(UDP_PORT);
}

function unblockUdp() {
  block?.remove();
  block = null;
}

/** Records every RTCPeerConnection the page makes in window.__pcs (an init script). */
function trackPeerConnections() {
  const Real = window.RTCPeerConnection;
  window.__pcs = [];
  window.RTCPeerConnection = class extends Real {
    constructor(...args) {
      super(...args);
      window.__pcs.push(this);
    }
  };
}

/** The selected candidate pair of each open peer connection of the page: local and remote protocol. */
function selectedPairs(p) {
  return p.page.evaluate(async () => {
    const out = [];
    for (const pc of window.__pcs) {
      if (pc.connectionState !== 'connected') continue;
      const stats = await pc.getStats();
      let pairId = null;
      stats.forEach((s) => {
        if (s.type === 'transport' && s.selectedCandidatePairId) pairId = s.selectedCandidatePairId;
      });
      const pair = pairId ? stats.get(pairId) : null;
      const local = pair ? stats.get(pair.localCandidateId) : null;
      const remote = pair ? stats.get(pair.remoteCandidateId) : null;
      out.push({
        sends: pc.getSenders().some((s) => s.track),
        local: local?.protocol ?? null,
        localTcpType: local?.tcpType ?? null,
        remote: remote?.protocol ?? null,
        remotePort: remote?.port ?? null,
      });
    }
    return out;
  });
}

async function participant(label) {
  const p = await launchParticipant(label);
  open.add(p);
  await p.page.addInitScript(trackPeerConnections);
  return p;
}

async function closeAll() {
  for (const p of open) {
    if (process.env.SHOW_BROWSER_LOGS) console.log(p.logs.join('\n'));
    await p.close();
  }
  open.clear();
}

/**
 * A publisher joins `room` and publishes; then a viewer joins and the time from its join to
 * its first decoded frame of the publisher's video is measured (polled every 20 ms).
 */
async function joinAndMeasure(room) {
  const pub = await participant(`${room}-pub`);
  await joinViaUrl(pub, server.url, room, 'pub');
  await waitFor(() => pub.page.evaluate(() => window.__pcs.some((pc) => pc.connectionState === 'connected' && pc.getSenders().some((s) => s.track))), {
    timeout: 25_000,
    what: 'the publisher to connect',
  });
  const viewer = await participant(`${room}-viewer`);
  const started = Date.now();
  await joinViaUrl(viewer, server.url, room, 'viewer');
  await waitFor(
    async () => (await remoteStats(viewer)).some((s) => s.name === 'pub' && s.kind === 'video' && s.framesDecoded > 0),
    { timeout: 25_000, interval: 20, what: 'the viewer to decode the publisher\'s video' },
  );
  return { pub, viewer, ms: Date.now() - started };
}

before(async () => {
  if (!loopbackOnly()) throw new Error('run in a loopback-only network namespace (scripts/browser-tests.sh): this test changes iptables rules');
  server = await startServer({ logName: 'plaza-ice-tcp.log', port: PORT, udpPort: UDP_PORT, args: ['--tcp-port', String(UDP_PORT)] });
});

after(async () => {
  unblockUdp();
  await closeAll();
  await server?.stop();
});

describe('ICE-TCP when UDP is blocked', { timeout: 300_000 }, () => {
  let udpMs;

  it('over UDP (baseline): the selected pairs are UDP', async () => {
    const { pub, viewer, ms } = await joinAndMeasure(`udp-${Date.now()}`);
    udpMs = ms;
    for (const p of [pub, viewer]) {
      const pairs = await selectedPairs(p);
      assert.ok(pairs.length > 0, `${p.label} has a connected peer connection`);
      for (const pair of pairs) assert.equal(pair.local, 'udp', `${p.label}: ${JSON.stringify(pairs)}`);
    }
    await closeAll();
  });

  it('with UDP dropped: publisher and viewer connect over TCP and the viewer decodes video', async () => {
    blockUdp();
    const before = await (await fetch(`${server.url}/healthz`)).json();
    const { pub, viewer, ms } = await joinAndMeasure(`tcp-${Date.now()}`);
    await waitForMediaFrom(viewer, 'pub');
    for (const p of [pub, viewer]) {
      const pairs = await selectedPairs(p);
      assert.ok(pairs.length > 0, `${p.label} has a connected peer connection`);
      for (const pair of pairs) {
        assert.equal(pair.local, 'tcp', `${p.label}: ${JSON.stringify(pairs)}`);
        assert.equal(pair.remote, 'tcp', `${p.label}: ${JSON.stringify(pairs)}`);
      }
      console.log(`# ${p.label} selected pairs: ${JSON.stringify(pairs)}`);
    }
    const after = await (await fetch(`${server.url}/healthz`)).json();
    const tcp = after.ice_tcp;
    assert.ok(tcp.open >= 2, `the server holds the TCP connections: ${JSON.stringify(tcp)}`);
    assert.ok(tcp.frames_out - before.ice_tcp.frames_out > 100, `media went out over TCP: ${JSON.stringify(tcp)}`);
    console.log(`# join → first decoded frame: UDP ${udpMs} ms, TCP (UDP blocked) ${ms} ms`);
    console.log(`# server ice_tcp: ${JSON.stringify(tcp)}`);
    await closeAll();
  });

  it('with UDP dropped: a Firefox host and a Chromium viewer exchange media over TCP', async () => {
    if (!block) blockUdp();
    const room = `fox-tcp-${Date.now()}`;
    const before = await (await fetch(`${server.url}/healthz`)).json();
    const fox = await launchFirefoxParticipant(`${room}-fox`);
    open.add(fox);
    await joinViaUrl(fox, server.url, room, 'fox');
    const chrome = await participant(`${room}-chrome`);
    await joinViaUrl(chrome, server.url, room, 'chrome');
    // Both publish (the demo page publishes camera and microphone): each decodes the other.
    await Promise.all([waitForMediaFrom(chrome, 'fox'), waitForMediaFrom(fox, 'chrome')]);
    for (const p of [fox, chrome]) {
      const pairs = await selectedCandidatePairs(p);
      for (const side of ['publisher', 'subscriber']) {
        const pair = pairs[side];
        assert.ok(pair, `${p.label}: a selected ${side} pair: ${JSON.stringify(pairs)}`);
        assert.equal(pair.local.protocol, 'tcp', `${p.label} ${side}: ${JSON.stringify(pair)}`);
        assert.equal(pair.remote.protocol, 'tcp', `${p.label} ${side}: ${JSON.stringify(pair)}`);
      }
      console.log(`# ${p.label} selected pairs: ${JSON.stringify(pairs)}`);
    }
    const after = await (await fetch(`${server.url}/healthz`)).json();
    assert.ok(after.ice_tcp.open >= 4, `two TCP connections each: ${JSON.stringify(after.ice_tcp)}`);
    assert.ok(after.ice_tcp.frames_in - before.ice_tcp.frames_in > 100, `media came in over TCP: ${JSON.stringify(after.ice_tcp)}`);
    assert.ok(after.ice_tcp.frames_out - before.ice_tcp.frames_out > 100, `media went out over TCP: ${JSON.stringify(after.ice_tcp)}`);
  });
});
