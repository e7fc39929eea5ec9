// A client's address changes mid-session: its Chromium runs in a network namespace of its
// own, joined to the test namespace by a veth pair, and the test moves it from 10.20.0.2 to
// 10.20.0.3 while it publishes and receives. Its peer connections lose their path and its
// WebSocket dies silently; plaza-client notices (ICE `disconnected`), finds the WebSocket dead
// (an unanswered ping), resumes the session on a new one and restarts ICE on both
// connections. Asserted: the same participant (no leave, no join, no new track for the other
// one), media both ways and chat again, the server counted the restarts. The gap the other
// participant saw is printed.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchParticipant, joinViaUrl, waitFor, remoteStats, waitForMediaFrom, loopbackOnly, moverNamespace } from './harness.js';

// Its own ports, so that it never meets another test file's server.
const PORT = 7960;
const UDP_PORT = 7962;
const HOST_IP = '10.20.0.1';

let server;
let net;
const open = new Set();

async function participant(label, opts = {}) {
  const p = await launchParticipant(label, opts);
  open.add(p);
  return p;
}

/** Frames decoded and audio packets received by `p` from `name` (0 when none). */
async function received(p, name) {
  const all = await remoteStats(p);
  const v = all.find((s) => s.name === name && s.kind === 'video');
  const a = all.find((s) => s.name === name && s.kind === 'audio');
  return { frames: v?.framesDecoded ?? 0, audio: a?.packetsReceived ?? 0, trackIds: all.filter((s) => s.name === name).map((s) => s.id).sort() };
}

before(async () => {
  if (!loopbackOnly()) throw new Error('run in a loopback-only network namespace (scripts/browser-tests.sh): this test creates network namespaces and links');
  net = moverNamespace({ hostIp: HOST_IP, first: '10.20.0.2' });
  server = await startServer({
    logName: 'plaza-ice-restart.log',
    port: PORT,
    udpPort: UDP_PORT,
    args: ['--bind', '0.0.0.0', '--udp-bind', '0.0.0.0', '--announce-ip', HOST_IP, '--tcp-port', 'off', '--workers', '1'],
  });
});

after(async () => {
  for (const p of open) await p.close();
  await server?.stop();
  net?.remove();
});

describe('address change', { timeout: 150_000 }, () => {
  it('a client that moves to a new address restarts ICE and stays the same participant', async () => {
    const room = `move-${Date.now()}`;
    const mover = await participant('mover', {
      executablePath: net.executablePath,
      // Its page is not on localhost: let it use the (fake) camera over plain http.
      extraArgs: [`--unsafely-treat-insecure-origin-as-secure=http://${HOST_IP}:${PORT}`],
    });
    const stayer = await participant('stayer');
    await joinViaUrl(mover, `http://${HOST_IP}:${PORT}`, room, 'mover');
    await joinViaUrl(stayer, `http://127.0.0.1:${PORT}`, room, 'stayer');
    await Promise.all([waitForMediaFrom(mover, 'stayer'), waitForMediaFrom(stayer, 'mover')]);
    for (const p of [mover, stayer]) {
      await p.page.evaluate(() => {
        window.__events = [];
        for (const t of ['icerestart', 'disconnected', 'reconnected', 'pcstatechange', 'icestatechange', 'participantleft', 'participantjoined', 'trackunpublished', 'chat']) {
          window.plaza.client.on(t, (d) => window.__events.push({ t, at: performance.now(), target: d?.target, state: d?.state, reason: d?.reason, resumed: d?.resumed, text: d?.text }));
        }
      });
    }
    const moverId = await mover.page.evaluate(() => window.plaza.client.participantId);
    const before = await received(stayer, 'mover');

    // Watch what the stayer gets from the mover, every 100 ms, across the move.
    const samples = [];
    let watching = true;
    const watch = (async () => {
      while (watching) {
        samples.push({ at: Date.now(), ...(await received(stayer, 'mover').catch(() => ({ frames: NaN, audio: NaN }))) });
        await new Promise((r) => setTimeout(r, 100));
      }
    })();

    const movedAt = Date.now();
    const movedAtPage = await mover.page.evaluate(() => performance.now());
    net.moveTo('10.20.0.3');

    // Both connections restart ICE (after the WebSocket is found dead and resumed).
    await waitFor(
      () => mover.page.evaluate(() => window.plaza.client.iceRestarts.publisher > 0 && window.plaza.client.iceRestarts.subscriber > 0),
      { timeout: 40_000, what: 'the mover to restart ICE on both connections' },
    );
    // Media flows again both ways: more frames and audio than before the move.
    await waitFor(
      async () => {
        const now = await received(stayer, 'mover');
        return now.frames > before.frames + 30 && now.audio > before.audio + 50;
      },
      { timeout: 30_000, what: "the stayer to receive the mover's media again" },
    );
    const back = Date.now();
    await waitForMediaFrom(mover, 'stayer');
    watching = false;
    await watch;

    // The gap: the longest time the stayer's decoded-frame count from the mover stood still,
    // and when frames came again after it.
    let gap = 0;
    let framesAgain = null;
    for (let i = 1, still = samples[0]?.at; i < samples.length; i++) {
      if (samples[i].frames > samples[i - 1].frames) {
        if (samples[i].at - still > gap) {
          gap = samples[i].at - still;
          framesAgain = samples[i].at;
        }
        still = samples[i].at;
      }
    }
    const events = await mover.page.evaluate(() => window.__events);
    const restartAt = events.find((e) => e.t === 'icerestart')?.at - movedAtPage;
    console.log(`# address change: restart ${Math.round(restartAt)} ms after the move; frames from the mover again ${framesAgain - movedAt} ms after the move (${Math.round(framesAgain - movedAt - restartAt)} ms after the restart began; sampled every 100 ms); longest freeze the other participant saw: ${gap} ms; all media back ${back - movedAt} ms after the move; mover events (ms after the move): ${events.map((e) => `${Math.round(e.at - movedAtPage)} ${e.t}${e.target ? ` ${e.target}` : ''}${e.state ? ` ${e.state}` : ''}${e.resumed !== undefined ? ` resumed=${e.resumed}` : ''}`).join(', ')}`);

    assert.ok(framesAgain - movedAt - restartAt < 5_000, `frames again within 5 s of the restart (${framesAgain - movedAt - restartAt} ms)`);

    // The same participant, resumed; the stayer saw no leave, no join, no new track.
    assert.equal(await mover.page.evaluate(() => window.plaza.client.participantId), moverId);
    const reconnected = events.filter((e) => e.t === 'reconnected');
    assert.ok(reconnected.every((e) => e.resumed === true), JSON.stringify(events));
    const stayerEvents = await stayer.page.evaluate(() => window.__events);
    assert.deepEqual(stayerEvents.filter((e) => ['participantleft', 'participantjoined', 'trackunpublished'].includes(e.t)), [], JSON.stringify(stayerEvents));
    assert.deepEqual((await received(stayer, 'mover')).trackIds, before.trackIds, 'the same tracks');

    // Data channels (SCTP on the restarted subscriber connection) work both ways.
    await stayer.page.evaluate(() => window.plaza.client.sendChat('to the mover'));
    await waitFor(() => mover.page.evaluate(() => window.__events.some((e) => e.t === 'chat' && e.text === 'to the mover')), { timeout: 15_000, what: 'chat to reach the mover' });
    await mover.page.evaluate(() => window.plaza.client.sendChat('from the new address'));
    await waitFor(() => stayer.page.evaluate(() => window.__events.some((e) => e.t === 'chat' && e.text === 'from the new address')), { timeout: 15_000, what: 'chat from the mover' });

    const stats = await (await fetch(`http://127.0.0.1:${PORT}/stats`)).json();
    assert.ok(stats.ice_restarts >= 2, `the server restarted ICE (ice_restarts = ${stats.ice_restarts})`);
  });
});
