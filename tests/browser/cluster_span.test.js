// A room that spans two Plaza nodes on two addresses (`--cluster-span-above 1`, a real
// redis-server as the control plane), with plaza-client in Chromium (alice, through node A)
// and Firefox (bob, through node B). Bob is not redirected: B extends the room, the two nodes carry each other's
// tracks once over the encrypted node link, and each browser decodes the other's video; chat
// crosses both ways, sequenced by the room's node (A). Then B goes away: alice sees bob leave
// and stays connected.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, startRedis, participants, launchFirefoxParticipant, waitFor, devToken, waitForClientVideo } from './harness.js';

// Its own ports, so that it never meets another test file's server.
const REDIS_PORT = 7949;
// Two hosts: node B serves HTTP, media and its node link on another address than A.
const A = { id: 'ND_a', host: '127.0.0.1', port: 7944, udpPort: 7946 };
const B = { id: 'ND_b', host: '127.0.0.3', port: 7954, udpPort: 7956 };
const wsUrl = (n) => `ws://${n.host}:${n.port}/rtc`;

let redis;
const nodes = {};
const ps = participants();
let firefox = null;

async function clusterStats(n) {
  const r = await fetch(`${n.url}/stats`);
  return (await r.json()).cluster;
}

function startNode(n) {
  return startServer({
    logName: `plaza-span-${n.id}.log`,
    port: n.port,
    udpPort: n.udpPort,
    host: n.host,
    args: ['--redis', redis.url, '--node-id', n.id, '--workers', '1', '--tcp-port', 'off', '--cluster-span-above', '1'],
  });
}

/** A plaza-client in `p`'s page joining `room` through `n`, publishing camera + microphone;
 *  chat messages it receives are kept in window.__chat. */
function joinClient(p, n, room, name, token) {
  return p.page.evaluate(
    async ({ url, room, name, token }) => {
      const { PlazaClient } = await import('/plaza-client.js');
      const c = new PlazaClient({ url, room, name, token });
      window.__client = c;
      window.__chat = [];
      window.__left = [];
      c.on('chat', (d) => window.__chat.push(typeof d.data === 'string' ? d.data : new TextDecoder().decode(d.data)));
      c.on('participantleft', (d) => window.__left.push(d.participantId ?? d.participant_id ?? d.id));
      await c.connect();
      await c.publish({ video: true, audio: true });
      return { nodeUrl: c.nodeUrl, nodeId: c.nodeId, redirects: c.redirects, participantId: c.participantId };
    },
    { url: wsUrl(n), room, name, token },
  );
}

before(async () => {
  redis = await startRedis({ port: REDIS_PORT, logName: 'redis-span.log' });
  nodes.a = { ...A, ...(await startNode(A)) };
  nodes.b = { ...B, ...(await startNode(B)) };
  for (const n of [nodes.a, nodes.b]) {
    await waitFor(async () => (await clusterStats(n)).link_peers_up === 1, { timeout: 10_000, what: `${n.id}'s node link to the other node` });
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

describe('a room spanning two nodes', { timeout: 150_000 }, () => {
  it('carries video and chat between a browser on each node, and survives one node leaving', async () => {
    const alice = await ps.launch('alice');
    const bob = (firefox = await launchFirefoxParticipant('bob'));
    await alice.page.goto(`${nodes.a.url}/`);
    await bob.page.goto(`${nodes.b.url}/`);

    // The room starts on A (both nodes are idle: either could be chosen): its lease is written
    // first, as A's; A renews it once the room is open there.
    assert.equal(await redis.command('SET', 'plaza:room:span', 'ND_a', 'PX', '10000'), '+OK');
    const a = await joinClient(alice, nodes.a, 'span', 'alice', await devToken(nodes.a.url, 'span', 'alice'));
    assert.equal(a.nodeUrl, wsUrl(nodes.a));
    const b = await joinClient(bob, nodes.b, 'span', 'bob', await devToken(nodes.b.url, 'span', 'bob'));
    assert.equal(b.redirects, 0, 'bob is served by B, not redirected');
    assert.equal(b.nodeUrl, wsUrl(nodes.b));
    assert.equal(b.nodeId, 'ND_b');
    assert.equal((await clusterStats(nodes.b)).extended_joins, 1);

    // Each browser decodes the other's video, across the node link.
    await Promise.all([waitForClientVideo(alice, 'bob', { more: 30, moreTimeout: 15_000 }), waitForClientVideo(bob, 'alice', { more: 30, moreTimeout: 15_000 })]);

    // Chat both ways, sequenced on A (the room's node).
    await bob.page.evaluate(() => window.__client.sendChat('hello from B'));
    await alice.page.evaluate(() => window.__client.sendChat('hello from A'));
    await waitFor(async () => (await alice.page.evaluate(() => window.__chat)).includes('hello from B') || null, { timeout: 10_000, what: 'alice to get bob’s chat' });
    await waitFor(async () => (await bob.page.evaluate(() => window.__chat)).includes('hello from A') || null, { timeout: 10_000, what: 'bob to get alice’s chat' });

    // B stops: alice sees bob leave (B's shard said goodbye, or A's link found B gone) and
    // stays connected to A.
    await nodes.b.stop();
    await waitFor(async () => ((await alice.page.evaluate(() => [...window.__client.participants.values()].map((p) => p.name))).includes('bob') ? null : true), {
      timeout: 15_000,
      what: 'alice to see bob leave with his node',
    });
    assert.equal(await alice.page.evaluate(() => window.__client.state), 'connected');
  });
});
