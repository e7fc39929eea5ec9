// Two Plaza nodes in a cluster (a real redis-server as the control plane) and plaza-client in
// Chromium. A join sent to the node that does not host the room is answered `redirect`: the
// client follows it and both participants meet on the room's node. Then the room's node is
// killed (SIGKILL): the clients, whose entry URL is the surviving node, come back on their
// own — the resume on the dead node fails, the rejoin goes through the entry, is sent to the
// dead node while its registry record lives (≤ 3 s), then the room is placed again on the
// live node — and decode each other's video again. The time from the kill to that is printed.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, startRedis, participants, waitFor } from './harness.js';

// Its own ports, so that it never meets another test file's server.
const REDIS_PORT = 7979;
const A = { id: 'ND_a', port: 7970, udpPort: 7972 };
const B = { id: 'ND_b', port: 7980, udpPort: 7982 };
const wsUrl = (n) => `ws://127.0.0.1:${n.port}/rtc`;
// How long the clients may take to come back after their node died: the registry record's
// TTL (3 s) plus the reconnect backoff step that follows it (4 s) and a few seconds of media.
const BACK_WITHIN = 20_000;

let redis;
const nodes = {};
const ps = participants();

/** The live nodes as node `n` lists them (`GET /api/nodes`, with a `roomList` token). */
async function listNodes(n) {
  const t = await (await fetch(`${n.url}/dev/token?room=any&grants=list`)).json();
  const r = await fetch(`${n.url}/api/nodes`, { headers: { Authorization: `Bearer ${t.token}` } });
  if (!r.ok) throw new Error(`GET /api/nodes on ${n.url}: ${r.status}`);
  return (await r.json()).nodes;
}

function startNode(n) {
  return startServer({
    logName: `plaza-cluster-${n.id}.log`,
    port: n.port,
    udpPort: n.udpPort,
    args: ['--redis', redis.url, '--node-id', n.id, '--workers', '1', '--tcp-port', 'off'],
  });
}

/**
 * A plaza-client in `p`'s page (loaded from node A) under `key` (window.__clients[key]),
 * joining `room` as `name` and publishing camera + microphone. Its events that matter here
 * are recorded with their wall-clock time (window.__events[key]). Returns what the join
 * looked like: {entryUrl, nodeUrl, nodeId, redirects, participantId, redirected (events)}.
 */
function joinClient(p, key, { room, name, options = {} }) {
  return p.page.evaluate(
    async ({ key, room, name, options }) => {
      const { PlazaClient } = await import('/plaza-client.js');
      window.__clients ??= {};
      window.__events ??= {};
      const c = new PlazaClient({ room, name, ...options });
      window.__clients[key] = c;
      const events = (window.__events[key] = []);
      for (const type of ['redirected', 'connectionstatechange', 'disconnected', 'reconnecting', 'reconnected', 'joined']) {
        c.on(type, (d) => events.push({ type, at: Date.now(), ...JSON.parse(JSON.stringify({ ...d, participants: undefined })) }));
      }
      c.on('error', (e) => events.push({ type: 'error', at: Date.now(), code: e.code, message: e.message }));
      await c.connect();
      await c.publish({ video: true, audio: true });
      return {
        entryUrl: c.entryUrl,
        nodeUrl: c.nodeUrl,
        nodeId: c.nodeId,
        redirects: c.redirects,
        participantId: c.participantId,
        redirected: events.filter((e) => e.type === 'redirected'),
      };
    },
    { key, room, name, options },
  );
}

/** Frames client `key` in `p` decoded from `name`'s video so far (0 when it receives none). */
function framesFrom(p, key, name) {
  return p.page.evaluate(
    async ({ key, name }) => {
      const c = window.__clients[key];
      for (const [id, rt] of c.remoteTracks) {
        if (rt.kind !== 'video' || c.participants.get(rt.participantId)?.name !== name) continue;
        const s = await c.getTrackStats(id);
        return s?.framesDecoded ?? 0;
      }
      return 0;
    },
    { key, name },
  );
}

/** Wait until client `key` in `p` decodes `name`'s video, and 10 more frames after that. */
async function waitForVideo(p, key, name, timeout = 25_000) {
  const first = await waitFor(async () => (await framesFrom(p, key, name)) || null, { timeout, what: `${p.label}/${key} to decode ${name}'s video` });
  await waitFor(async () => (await framesFrom(p, key, name)) >= first + 10, { timeout: 10_000, what: `${p.label}/${key}: ${name}'s video to keep flowing` });
}

/**
 * From now on, record in the page when client `key` is connected again in a session other
 * than `oldId` (window.__back[key].connected) and when it first decodes a frame of `name`'s
 * video in it (…decoded); both Date.now(). Polls every 20 ms.
 */
function watchComeback(p, key, name, oldId) {
  return p.page.evaluate(
    ({ key, name, oldId }) => {
      window.__back ??= {};
      const back = (window.__back[key] = { connected: null, decoded: null });
      const c = window.__clients[key];
      const poll = setInterval(async () => {
        if (c.participantId === oldId) return;
        if (!back.connected && c.state === 'connected') back.connected = Date.now();
        for (const [id, rt] of c.remoteTracks) {
          if (rt.kind !== 'video' || c.participants.get(rt.participantId)?.name !== name) continue;
          const s = await c.getTrackStats(id);
          if (s?.framesDecoded > 0 && back.connected && !back.decoded) {
            back.decoded = Date.now();
            clearInterval(poll);
          }
        }
      }, 20);
    },
    { key, name, oldId },
  );
}

function clientState(p, key) {
  return p.page.evaluate((key) => {
    const c = window.__clients[key];
    return { state: c.state, nodeUrl: c.nodeUrl, nodeId: c.nodeId, redirects: c.redirects, participantId: c.participantId, back: window.__back?.[key] ?? null };
  }, key);
}

before(async () => {
  redis = await startRedis({ port: REDIS_PORT, logName: 'redis-cluster.log' });
  nodes.a = { ...A, ...(await startNode(A)) };
  nodes.b = { ...B, ...(await startNode(B)) };
  for (const n of [nodes.a, nodes.b]) {
    await waitFor(async () => (await listNodes(n)).map((x) => x.id).join() === 'ND_a,ND_b', { timeout: 10_000, what: `${n.id} to list both nodes` });
  }
});

after(async () => {
  await ps.closeAll();
  await nodes.a?.stop();
  await nodes.b?.stop();
  await redis?.stop();
});

describe('cluster', { timeout: 180_000 }, () => {
  it('follows a redirect to the room’s node, and comes back through its entry after that node is killed', async () => {
    const alice = await ps.launch('alice');
    const bob = await ps.launch('bob');
    await alice.page.goto(`${nodes.a.url}/`);
    await bob.page.goto(`${nodes.a.url}/`);

    // 1. Both nodes idle: the room stays where its first join arrives (A). Bob knocks on B
    //    (his entry URL) and is sent to A.
    const meetA = await joinClient(alice, 'meet', { room: 'meet', name: 'alice' });
    assert.equal(meetA.nodeUrl, wsUrl(nodes.a));
    assert.equal(meetA.redirects, 0);
    assert.deepEqual(meetA.redirected, []);
    const meetB = await joinClient(bob, 'meet', { room: 'meet', name: 'bob', options: { url: wsUrl(nodes.b), tokenUrl: '/dev/token' } });
    assert.equal(meetB.entryUrl, wsUrl(nodes.b));
    assert.equal(meetB.nodeUrl, wsUrl(nodes.a), 'bob joined on A');
    assert.equal(meetB.nodeId, 'ND_a');
    assert.equal(meetB.redirects, 1);
    assert.equal(meetB.redirected.length, 1);
    assert.deepEqual(
      { nodeId: meetB.redirected[0].nodeId, address: meetB.redirected[0].address, url: meetB.redirected[0].url, from: meetB.redirected[0].from },
      { nodeId: 'ND_a', address: `127.0.0.1:${nodes.a.port}`, url: wsUrl(nodes.a), from: wsUrl(nodes.b) },
    );
    await Promise.all([waitForVideo(alice, 'meet', 'bob'), waitForVideo(bob, 'meet', 'alice')]);
    // They stay in the room (A's load: two participants) but stop sending media.
    for (const p of [alice, bob]) await p.page.evaluate(() => window.__clients.meet.stopLocalMedia());

    // 2. A new room goes to the least-loaded node, B, although both join through A (their
    //    entry). Wait until A's record in Redis carries its load.
    await waitFor(async () => (await listNodes(nodes.a)).find((n) => n.id === 'ND_a')?.load.participants === 2, {
      timeout: 10_000,
      what: "A's load (2 participants) in the registry",
    });
    const liveA = await joinClient(alice, 'live', { room: 'live', name: 'alice' });
    const liveB = await joinClient(bob, 'live', { room: 'live', name: 'bob' });
    for (const j of [liveA, liveB]) {
      assert.equal(j.entryUrl, wsUrl(nodes.a));
      assert.equal(j.nodeUrl, wsUrl(nodes.b), 'the new room is on B');
      assert.equal(j.nodeId, 'ND_b');
      assert.equal(j.redirects, 1);
    }
    await Promise.all([waitForVideo(alice, 'live', 'bob'), waitForVideo(bob, 'live', 'alice')]);

    // 3. B dies. Both clients come back by themselves, on A, and see each other again.
    await watchComeback(alice, 'live', 'bob', liveA.participantId);
    await watchComeback(bob, 'live', 'alice', liveB.participantId);
    const killedAt = Date.now();
    await nodes.b.kill();
    for (const [p, j] of [
      [alice, liveA],
      [bob, liveB],
    ]) {
      const s = await waitFor(
        async () => {
          const s = await clientState(p, 'live');
          return s.back?.decoded && s.state === 'connected' ? s : null;
        },
        { timeout: BACK_WITHIN, interval: 50, what: `${p.label} back on A decoding video` },
      ).catch(async (e) => {
        const events = await p.page.evaluate(() => window.__events.live);
        throw new Error(`${e.message}\n${p.label}'s events: ${JSON.stringify(events)}`);
      });
      assert.notEqual(s.participantId, j.participantId, 'a new session (the room was placed again)');
      assert.equal(s.nodeUrl, wsUrl(nodes.a), `${p.label} is on A`);
      assert.equal(s.redirects, 0, 'the rejoin through A joined there');
    }
    await Promise.all([waitForVideo(alice, 'live', 'bob'), waitForVideo(bob, 'live', 'alice')]);
    const lines = [];
    for (const p of [alice, bob]) {
      const s = await clientState(p, 'live');
      const events = await p.page.evaluate(() => window.__events.live);
      const dropped = events.find((e) => e.type === 'disconnected' && e.at >= killedAt);
      const attempts = events.filter((e) => e.type === 'reconnecting' && e.at >= killedAt).length;
      const redirectsToDead = events.filter((e) => e.type === 'redirected' && e.at >= killedAt && e.nodeId === 'ND_b').length;
      lines.push(
        `${p.label}: socket closed +${dropped ? dropped.at - killedAt : '?'} ms, connected +${s.back.connected - killedAt} ms, ` +
          `video decoded +${s.back.decoded - killedAt} ms (${attempts} reconnect attempts, ${redirectsToDead} redirects to the dead node)`,
      );
    }
    console.log(`node B killed →\n  ${lines.join('\n  ')}`);
    // The room on A was not disturbed.
    for (const p of [alice, bob]) assert.equal((await clientState(p, 'meet')).state, 'connected');
  });
});
