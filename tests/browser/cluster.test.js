// Two Plaza nodes in a cluster (a real redis-server as the control plane) and plaza-client in
// Chromium (alice) and Firefox (bob). A join sent to the node that does not host the room is answered `redirect`: the
// client follows it and both participants meet on the room's node. Then the room's node is
// killed (SIGKILL): the clients, whose entry URL is the surviving node, come back on their
// own — the resume on the dead node fails, the rejoin goes through the entry, is sent to the
// dead node while its registry record lives (≤ 3 s), then the room is placed again on the
// live node — and decode each other's video again. The time from the kill to that is printed.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, startRedis, participants, launchFirefoxParticipant, waitFor, devToken, waitForClientVideo } from './harness.js';
import { PlazaClient, MAX_REDIRECTS, redirectUrl } from '../../signaling/plaza-client.js';

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
let firefox = null;

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
  if (firefox && process.env.SHOW_BROWSER_LOGS) console.log(firefox.logs.join('\n'));
  await firefox?.close();
  await nodes.a?.stop();
  await nodes.b?.stop();
  await redis?.stop();
});

describe('cluster', { timeout: 180_000 }, () => {
  it('follows a redirect to the room’s node, and comes back through its entry after that node is killed', async () => {
    const alice = await ps.launch('alice');
    const bob = (firefox = await launchFirefoxParticipant('bob'));
    // Both pages come from A; every client names its entry URL and gets its token from the
    // test (tokens work on every node; the page's own origin may be the node that dies).
    await alice.page.goto(`${nodes.a.url}/`);
    await bob.page.goto(`${nodes.a.url}/`);
    const entry = async (n, room, name) => ({ url: wsUrl(n), token: await devToken(n.url, room, name) });
    const other = (n) => (n === nodes.a ? nodes.b : nodes.a);

    // 1. Alice joins through A. Both nodes are idle, so the room goes to either (A unless
    //    B's CPU was lower in whole percent): call it H, the other O. Bob knocks on O and is
    //    sent to H.
    const meetA = await joinClient(alice, 'meet', { room: 'meet', name: 'alice', options: await entry(nodes.a, 'meet', 'alice') });
    const h = [nodes.a, nodes.b].find((n) => wsUrl(n) === meetA.nodeUrl);
    assert.ok(h, `alice joined on a node of the cluster: ${meetA.nodeUrl}`);
    const o = other(h);
    assert.equal(meetA.redirects, h === nodes.a ? 0 : 1);
    assert.equal(meetA.redirected.length, meetA.redirects);
    const meetB = await joinClient(bob, 'meet', { room: 'meet', name: 'bob', options: await entry(o, 'meet', 'bob') });
    assert.equal(meetB.entryUrl, wsUrl(o));
    assert.equal(meetB.nodeUrl, wsUrl(h), `bob joined on ${h.id}`);
    assert.equal(meetB.nodeId, h.id);
    assert.equal(meetB.redirects, 1);
    assert.equal(meetB.redirected.length, 1);
    assert.deepEqual(
      { nodeId: meetB.redirected[0].nodeId, address: meetB.redirected[0].address, url: meetB.redirected[0].url, from: meetB.redirected[0].from },
      { nodeId: h.id, address: `127.0.0.1:${h.port}`, url: wsUrl(h), from: wsUrl(o) },
    );
    await Promise.all([waitForClientVideo(alice, 'bob', { key: 'meet' }), waitForClientVideo(bob, 'alice', { key: 'meet' })]);
    // They stay in the room (H's load: two participants) but stop sending media.
    for (const p of [alice, bob]) await p.page.evaluate(() => window.__clients.meet.stopLocalMedia());

    // 2. A new room goes to the least-loaded node, O, although both join through H (their
    //    entry). Wait until H's record in the registry carries its load.
    await waitFor(async () => (await listNodes(h)).find((n) => n.id === h.id)?.load.participants === 2, {
      timeout: 10_000,
      what: `${h.id}'s load (2 participants) in the registry`,
    });
    const liveA = await joinClient(alice, 'live', { room: 'live', name: 'alice', options: await entry(h, 'live', 'alice') });
    const liveB = await joinClient(bob, 'live', { room: 'live', name: 'bob', options: await entry(h, 'live', 'bob') });
    for (const j of [liveA, liveB]) {
      assert.equal(j.entryUrl, wsUrl(h));
      assert.equal(j.nodeUrl, wsUrl(o), `the new room is on ${o.id}`);
      assert.equal(j.nodeId, o.id);
      assert.equal(j.redirects, 1);
    }
    await Promise.all([waitForClientVideo(alice, 'bob', { key: 'live' }), waitForClientVideo(bob, 'alice', { key: 'live' })]);

    // 3. O dies. Both clients come back by themselves, on H, and see each other again.
    await watchComeback(alice, 'live', 'bob', liveA.participantId);
    await watchComeback(bob, 'live', 'alice', liveB.participantId);
    const killedAt = Date.now();
    await o.kill();
    for (const [p, j] of [
      [alice, liveA],
      [bob, liveB],
    ]) {
      const s = await waitFor(
        async () => {
          const s = await clientState(p, 'live');
          return s.back?.decoded && s.state === 'connected' ? s : null;
        },
        { timeout: BACK_WITHIN, interval: 50, what: `${p.label} back on ${h.id} decoding video` },
      ).catch(async (e) => {
        const events = await p.page.evaluate(() => window.__events.live);
        throw new Error(`${e.message}\n${p.label}'s events: ${JSON.stringify(events)}`);
      });
      assert.notEqual(s.participantId, j.participantId, 'a new session (the room was placed again)');
      assert.equal(s.nodeUrl, wsUrl(h), `${p.label} is on ${h.id}`);
      assert.equal(s.redirects, 0, `the rejoin through ${h.id} joined there`);
    }
    await Promise.all([waitForClientVideo(alice, 'bob', { key: 'live' }), waitForClientVideo(bob, 'alice', { key: 'live' })]);
    const lines = [];
    for (const p of [alice, bob]) {
      const s = await clientState(p, 'live');
      const events = await p.page.evaluate(() => window.__events.live);
      const dropped = events.find((e) => e.type === 'disconnected' && e.at >= killedAt);
      const attempts = events.filter((e) => e.type === 'reconnecting' && e.at >= killedAt).length;
      const redirectsToDead = events.filter((e) => e.type === 'redirected' && e.at >= killedAt && e.nodeId === o.id).length;
      lines.push(
        `${p.label}: socket closed +${dropped ? dropped.at - killedAt : '?'} ms, connected +${s.back.connected - killedAt} ms, ` +
          `video decoded +${s.back.decoded - killedAt} ms (${attempts} reconnect attempts, ${redirectsToDead} redirects to the dead node)`,
      );
    }
    console.log(`room 'meet' on ${h.id}, 'live' on ${o.id}; ${o.id} killed →\n  ${lines.join('\n  ')}`);
    // The room on H was not disturbed.
    for (const p of [alice, bob]) assert.equal((await clientState(p, 'meet')).state, 'connected');
  });
});

describe('redirects without a browser (a fake WebSocket)', () => {
  it('redirect URLs keep the scheme, path and query', () => {
    assert.equal(redirectUrl('ws://127.0.0.1:7880/rtc', '10.0.0.2:7881'), 'ws://10.0.0.2:7881/rtc');
    assert.equal(redirectUrl('wss://plaza.example/rtc?x=1', 'n2:8443'), 'wss://n2:8443/rtc?x=1');
    assert.equal(redirectUrl('wss://host:443', 'n2:8443'), 'wss://n2:8443');
    assert.equal(redirectUrl('nohost', 'b:1'), null);
  });

  it('a join follows at most MAX_REDIRECTS redirects, then fails with too_many_redirects', async () => {
    const opened = [];
    // Every "node" answers the join with a redirect to the next one, then closes.
    class RedirectingSocket {
      constructor(url) {
        this.url = url;
        this.readyState = 0;
        opened.push(url);
        setTimeout(() => {
          this.readyState = 1;
          this.onopen?.();
        }, 0);
      }
      send(data) {
        const m = JSON.parse(data);
        if (m.type !== 'join') return;
        const n = opened.length;
        setTimeout(() => {
          this.onmessage?.({ data: JSON.stringify({ type: 'redirect', room: m.room, node_id: `ND_${n}`, address: `127.0.0.${n + 1}:${7000 + n}` }) });
          this.close(1000, 'redirected');
        }, 0);
      }
      close(code = 1000, reason = '') {
        if (this.readyState === 3) return;
        this.readyState = 3;
        setTimeout(() => this.onclose?.({ code, reason }), 0);
      }
    }
    const c = new PlazaClient({ url: 'ws://127.0.0.1:1/rtc', room: 'r', name: 'n', token: 't', WebSocket: RedirectingSocket, reconnect: false });
    const redirected = [];
    c.on('redirected', (e) => redirected.push(e));
    c.on('error', () => {});
    await assert.rejects(c.connect(), (e) => e.code === 'too_many_redirects');
    assert.equal(opened.length, MAX_REDIRECTS + 1, `sockets opened: ${opened}`);
    assert.deepEqual(
      redirected.map((e) => [e.from, e.nodeId, e.url]),
      [
        ['ws://127.0.0.1:1/rtc', 'ND_1', 'ws://127.0.0.2:7001/rtc'],
        ['ws://127.0.0.2:7001/rtc', 'ND_2', 'ws://127.0.0.3:7002/rtc'],
        ['ws://127.0.0.3:7002/rtc', 'ND_3', 'ws://127.0.0.4:7003/rtc'],
      ],
    );
    assert.equal(c.state, 'disconnected');
    assert.equal(c.nodeUrl, null, 'never joined');
    assert.equal(c.entryUrl, 'ws://127.0.0.1:1/rtc');
  });
});
