// TURN: clients that can only reach a relay still connect. A real coturn (`turnserver`, TURN
// REST API credentials: use-auth-secret + static-auth-secret) listens on 127.0.0.2:3478 and
// Plaza hands out credentials for it in `joined.ice_servers` (--turn-url, PLAZA_TURN_SECRET).
// Chromium pages join with `forceRelay` (iceTransportPolicy 'relay'), publish and receive;
// the selected ICE candidate pairs are relay ones and coturn logged the allocations. Also
// measures join → first decoded frame over TURN and directly.
// Run with scripts/browser-tests.sh (loopback-only network namespace).
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import {
  startServer,
  startTurnServer,
  launchParticipant,
  waitFor,
  loopbackOnly,
  percentile,
  joinWithClient as joinWith,
  firstDecodedFrameAt,
} from './harness.js';

const SECRET = 'plaza-browser-test-turn-secret-7f3a9c';
// Not the other tests' ports: this server has TURN configured.
const PORT = 7890;
const UDP_PORT = 7892;
// Joins per mode in the join-time measurement (alternating relay and direct).
const TRIALS = 5;

let turn;
let server;
const open = new Set();

async function participant(label) {
  const p = await launchParticipant(label);
  open.add(p);
  return p;
}

async function close(p) {
  open.delete(p);
  await p.close();
}

const joinWithClient = (p, opts) => joinWith(p, server.url, opts);

/** Video frames decoded from the first remote video track. */
function framesDecoded(p) {
  return p.page.evaluate(async () => {
    const c = window.__client;
    for (const [id, rt] of c.remoteTracks) {
      if (rt.kind === 'video') return (await c.getTrackStats(id))?.framesDecoded ?? 0;
    }
    return 0;
  });
}

function selectedPairs(p) {
  return p.page.evaluate(() => window.__client.getSelectedCandidatePairs());
}

before(async () => {
  if (!loopbackOnly()) console.warn('warning: not in a loopback-only network namespace (run scripts/browser-tests.sh)');
  turn = await startTurnServer({ secret: SECRET, ip: '127.0.0.2', port: 3478 });
  server = await startServer({
    logName: 'plaza-turn.log',
    port: PORT,
    udpPort: UDP_PORT,
    // ICE-TCP off: a client whose UDP is blocked would otherwise connect over it (a TCP host
    // candidate outranks a relayed one) and never need coturn; ice_tcp.test.js covers that.
    args: ['--workers', '1', '--tcp-port', 'off', ...turn.urls.flatMap((u) => ['--turn-url', u])],
    env: { PLAZA_TURN_SECRET: SECRET },
  });
});

after(async () => {
  for (const p of open) {
    if (process.env.SHOW_BROWSER_LOGS) console.log(p.logs.join('\n'));
    await p.close();
  }
  await server?.stop();
  await turn?.stop();
});

describe('TURN relay (coturn)', { timeout: 300_000 }, () => {
  const room = `turn-${Date.now()}`;
  let pub;
  let pubInfo;

  it('joined carries TURN credentials for the participant', async () => {
    pub = await participant('turn-publisher');
    pubInfo = await joinWithClient(pub, { room, name: 'publisher', forceRelay: true, publish: true });
    const servers = pubInfo.iceServers;
    assert.ok(Array.isArray(servers) && servers.length === 1, JSON.stringify(servers));
    assert.deepEqual(servers[0].urls, turn.urls);
    const [expiry, who] = servers[0].username.split(':');
    assert.equal(who, pubInfo.participantId);
    const ttl = Number(expiry) - Date.now() / 1000;
    assert.ok(ttl > 86_000 && ttl <= 86_401, `credential valid for ${ttl} s`);
    assert.match(servers[0].credential, /^[A-Za-z0-9+/]{27}=$/);
  });

  it('coturn checks the credential: the one handed out gets a relay candidate, a tampered one none', async () => {
    const gather = (iceServers) =>
      pub.page.evaluate(async (iceServers) => {
        const pc = new RTCPeerConnection({ iceServers, iceTransportPolicy: 'relay' });
        const types = [];
        const done = new Promise((resolve) => {
          pc.onicecandidate = (e) => (e.candidate ? types.push(e.candidate.type) : resolve());
          setTimeout(resolve, 15_000);
        });
        pc.createDataChannel('probe');
        await pc.setLocalDescription(await pc.createOffer());
        await done;
        pc.close();
        return types;
      }, iceServers);
    const good = pubInfo.iceServers.map((s) => ({ ...s, urls: s.urls.filter((u) => u.endsWith('udp')) }));
    const c = good[0].credential;
    const tampered = [{ ...good[0], credential: `${c[0] === 'A' ? 'B' : 'A'}${c.slice(1)}` }];
    const [ok, refused] = await Promise.all([gather(good), gather(tampered)]);
    assert.ok(ok.includes('relay'), `the handed-out credential: ${JSON.stringify(ok)}`);
    assert.deepEqual(refused, [], 'a tampered credential gets no relay candidate');
    const user = good[0].username;
    assert.ok(
      turn.log().split('\n').some((l) => l.includes(`user <${user}>`) && /error 401/.test(l)),
      `coturn logged the refusal of ${user} (${turn.logPath})`,
    );
  });

  it('relay-only browsers publish and receive through coturn', async () => {
    const viewer = await participant('turn-viewer');
    const info = await joinWithClient(viewer, { room, name: 'viewer', forceRelay: true, publish: false });
    const at = await firstDecodedFrameAt(viewer);
    assert.ok(at !== null, 'the relay-only viewer decoded no video within 20 s');
    const first = await framesDecoded(viewer);
    await waitFor(async () => (await framesDecoded(viewer)) >= first + 10, {
      timeout: 10_000,
      what: 'video over the relay to keep flowing',
    });
    // Both ends of both paths are relayed: the publisher's publisher connection and the
    // viewer's subscriber connection use a local relay candidate towards Plaza's host one.
    const [pubPairs, viewPairs] = await Promise.all([selectedPairs(pub), selectedPairs(viewer)]);
    console.log(`# publisher sends via ${JSON.stringify(pubPairs.publisher)}`);
    console.log(`# viewer receives via ${JSON.stringify(viewPairs.subscriber)}`);
    for (const [what, pair] of [
      ['publisher (publish)', pubPairs.publisher],
      ['publisher (subscribe)', pubPairs.subscriber],
      ['viewer (subscribe)', viewPairs.subscriber],
    ]) {
      assert.ok(pair, `${what}: no selected candidate pair`);
      assert.equal(pair.local.candidateType, 'relay', `${what}: ${JSON.stringify(pair)}`);
      assert.equal(pair.local.address, '127.0.0.2', `${what}: relayed from coturn's relay address`);
      assert.equal(pair.remote.port, UDP_PORT, `${what}: to Plaza's media port`);
    }
    // coturn authenticated the REST API credentials and allocated relays for both.
    await waitFor(() => turn.allocations(pubInfo.participantId).length > 0 && turn.allocations(info.participantId).length > 0, {
      timeout: 5_000,
      what: `coturn to log allocations for ${pubInfo.participantId} and ${info.participantId} (see ${turn.logPath})`,
    });
    console.log(
      `# coturn allocations: publisher ${turn.allocations(pubInfo.participantId).length}, viewer ${turn.allocations(info.participantId).length}`,
    );
    await close(viewer);
  });

  it('an ICE restart over the relay fetches fresh TURN credentials and re-allocates', async () => {
    const viewer = await participant('turn-restarter');
    const info = await joinWithClient(viewer, { room, name: 'restarter', forceRelay: true, publish: false });
    assert.ok((await firstDecodedFrameAt(viewer)) !== null, 'the relay-only viewer decoded no video within 20 s');
    await waitFor(() => turn.allocations(info.participantId).length > 0, { timeout: 5_000, what: 'a first allocation' });
    const allocations = turn.allocations(info.participantId).length;
    await viewer.page.evaluate(() => {
      window.__fresh = [];
      window.__client.on('iceservers', (d) => window.__fresh.push(d.iceServers));
      window.__client.restartIce('both', 'test');
    });
    await waitFor(() => viewer.page.evaluate(() => window.__fresh.length >= 1 && window.__client.iceRestarts.subscriber > 0), {
      timeout: 10_000,
      what: "fresh ICE servers and the subscriber restart",
    });
    const fresh = await viewer.page.evaluate(() => window.__fresh[0]);
    assert.deepEqual(fresh[0].urls, turn.urls);
    assert.equal(fresh[0].username.split(':')[1], info.participantId);
    assert.ok(Number(fresh[0].username.split(':')[0]) >= Number(info.iceServers[0].username.split(':')[0]), 'not older than the join credentials');
    // The restarted connection gathers a new relay candidate with them, and media flows on
    // through the relay.
    await waitFor(() => turn.allocations(info.participantId).length > allocations, {
      timeout: 15_000,
      what: `coturn to allocate a new relay for the restarted connection (see ${turn.logPath})`,
    });
    const first = await framesDecoded(viewer);
    await waitFor(async () => (await framesDecoded(viewer)) >= first + 10, { timeout: 15_000, what: 'video over the relay after the restart' });
    const pairs = await selectedPairs(viewer);
    assert.equal(pairs.subscriber?.local.candidateType, 'relay', JSON.stringify(pairs));
    await close(viewer);
  });

  it('join → first decoded frame, over TURN and direct', async () => {
    const relayViewer = await participant('turn-relay-viewer');
    const directViewer = await participant('turn-direct-viewer');
    const times = { relay: [], direct: [] };
    for (let i = 0; i < TRIALS; i++) {
      for (const [mode, p] of [
        ['relay', relayViewer],
        ['direct', directViewer],
      ]) {
        const info = await joinWithClient(p, { room, name: `${mode}-${i}`, forceRelay: mode === 'relay', publish: false });
        const at = await firstDecodedFrameAt(p);
        assert.ok(at !== null, `${mode} viewer ${i}: no decoded video within 20 s`);
        const pair = (await selectedPairs(p)).subscriber;
        assert.equal(pair?.local.candidateType, mode === 'relay' ? 'relay' : 'host', `${mode} viewer ${i}: ${JSON.stringify(pair)}`);
        times[mode].push(at - info.t0);
      }
    }
    const fmt = (xs) => `p50 ${percentile(xs, 0.5).toFixed(0)} ms (${xs.map((x) => x.toFixed(0)).join(', ')})`;
    console.log(`# join → first decoded frame over TURN (relay only): ${fmt(times.relay)}`);
    console.log(`# join → first decoded frame direct (host UDP):      ${fmt(times.direct)}`);
    await Promise.all([close(relayViewer), close(directViewer)]);
  });

  it('with UDP to Plaza blocked, a client that is not forced to relay falls back to coturn', async () => {
    // Drop UDP from the browsers' address to Plaza's media port: only coturn (127.0.0.2,
    // a different source address) still reaches it.
    const rule = ['-p', 'udp', '-s', '127.0.0.1', '-d', '127.0.0.1', '--dport', String(UDP_PORT), '-j', 'DROP'];
    execFileSync('iptables', ['-I', 'INPUT', ...rule]);
    try {
      const blocked = await participant('turn-blocked');
      const info = await joinWithClient(blocked, { room, name: 'blocked', forceRelay: false, publish: true });
      const at = await firstDecodedFrameAt(blocked);
      assert.ok(at !== null, 'the blocked client decoded no video within 20 s');
      const pairs = await selectedPairs(blocked);
      console.log(`# with UDP blocked: subscribe via ${JSON.stringify(pairs.subscriber)}, join → first frame ${(at - info.t0).toFixed(0)} ms`);
      assert.equal(pairs.subscriber?.local.candidateType, 'relay', JSON.stringify(pairs.subscriber));
      // Its own video reaches the relay-only publisher too (publish path through coturn).
      const pubPair = await waitFor(async () => (await selectedPairs(blocked)).publisher, {
        timeout: 10_000,
        what: "the blocked client's publisher connection",
      });
      assert.equal(pubPair?.local.candidateType, 'relay', JSON.stringify(pubPair));
      await waitFor(
        () =>
          pub.page.evaluate(async (pid) => {
            const c = window.__client;
            for (const [id, rt] of c.remoteTracks) {
              if (rt.kind === 'video' && rt.participantId === pid && (await c.getTrackStats(id))?.framesDecoded > 0) return true;
            }
            return false;
          }, info.participantId),
        { timeout: 20_000, what: "the publisher to decode the blocked client's video" },
      );
      assert.ok(turn.allocations(info.participantId).length > 0, 'coturn allocated for the blocked client');
      // Without the relay it could not have connected: the counters show the rule dropped packets.
      const counters = execFileSync('iptables', ['-L', 'INPUT', '-v', '-n', '-x']).toString();
      const line = counters.split('\n').find((l) => l.includes(`dpt:${UDP_PORT}`));
      const dropped = Number(line?.trim().split(/\s+/)[0] ?? 0);
      console.log(`# iptables dropped ${dropped} direct UDP packets to Plaza`);
      assert.ok(dropped > 0, `the DROP rule matched nothing: ${line}`);
      await close(blocked);
    } finally {
      execFileSync('iptables', ['-D', 'INPUT', ...rule]);
    }
  });

  after(async () => pub && close(pub));
});
