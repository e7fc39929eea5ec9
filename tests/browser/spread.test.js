// A room spread over two core shards, with browsers on both: the server runs two workers and
// spreads every room from its second participant (`--workers 2 --room-spread-above 1`), so
// the first participant of a room joins shard 0, the second shard 1 and the third shard 0.
// A Firefox host publishes simulcast on shard 0; a quality=high Chromium viewer on shard 1
// gets the host's packets over the pipe between the shards, a quality=low one on shard 0 gets
// them directly. Each decodes its layer, the host decodes the viewers, chat crosses the
// shards both ways, and the host's leave reaches the other shard. `/stats` shows where the
// participants are and that packets crossed.
// Run with scripts/browser-tests.sh (loopback-only network namespace, server started here).
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import {
  ARTIFACTS,
  startServer,
  participants,
  joinViaUrl,
  waitFor,
  waitForMediaFrom,
  gridNames,
  decodedWidth,
  loopbackOnly,
  sendChat,
  waitForChat,
} from './harness.js';

let server;
const people = participants();

async function stats() {
  const r = await fetch(`${server.url}/stats`);
  assert.equal(r.status, 200);
  return r.json();
}

before(async () => {
  if (!loopbackOnly()) console.warn('warning: not in a loopback-only network namespace (run scripts/browser-tests.sh)');
  server = await startServer({ logName: 'plaza-spread.log', args: ['--workers', '2', '--room-spread-above', '1'] });
});

after(async () => {
  await people.closeAll();
  await server?.stop();
});

describe('a room spread over two shards', { timeout: 300_000 }, () => {
  it('Firefox publishes simulcast on one shard; Chromium viewers on both decode their layers, chat crosses, the leave reaches them', async () => {
    const [fox, high, low] = await Promise.all([people.launchFirefox('firefox'), people.launch('chromium-high'), people.launch('chromium-low')]);
    const room = `spread-${Date.now()}`;
    const start = await stats();
    assert.equal(start.shards.length, 2, 'two core shards');
    // One at a time: the order decides the shards (0, 1, 0).
    await joinViaUrl(fox, server.url, room, 'fox');
    await waitFor(async () => (await gridNames(fox)).length === 0 && (await stats()).shards[0].participants === 1, {
      what: 'the host on shard 0',
    });
    await joinViaUrl(high, server.url, room, 'high', '&quality=high');
    await waitFor(async () => (await stats()).shards[1].participants === 1, { what: 'the quality=high viewer on shard 1' });
    await joinViaUrl(low, server.url, room, 'low', '&quality=low');
    const placed = await waitFor(
      async () => {
        const s = await stats();
        return s.shards[0].participants === 2 && s.shards[1].participants === 1 ? s : null;
      },
      { what: 'two participants on shard 0 and one on shard 1' },
    );
    assert.equal(placed.participants, 3);

    await Promise.all([waitForMediaFrom(high, 'fox'), waitForMediaFrom(low, 'fox'), waitForMediaFrom(fox, 'high'), waitForMediaFrom(fox, 'low')]);
    let widths = {};
    await waitFor(
      async () => {
        widths = { high: await decodedWidth(high, 'fox'), low: await decodedWidth(low, 'fox') };
        return widths.low === 320 && widths.high > 320;
      },
      { timeout: 45_000, what: 'the shard-1 viewer to decode a layer wider than 320 and the shard-0 viewer the 320 wide one' },
    ).catch((e) => {
      throw new Error(`${e.message}; decoded widths ${JSON.stringify(widths)}`);
    });
    assert.deepEqual((await gridNames(high)).sort(), ['fox', 'low']);
    assert.deepEqual((await gridNames(fox)).sort(), ['high', 'low']);

    // Chat: from shard 0 to shard 1, and back.
    await sendChat(fox, 'hello across the shards ✓');
    await Promise.all([waitForChat(high, 'fox', 'hello across the shards ✓'), waitForChat(low, 'fox', 'hello across the shards ✓')]);
    await sendChat(high, 'and back ✓');
    await Promise.all([waitForChat(fox, 'high', 'and back ✓'), waitForChat(low, 'high', 'and back ✓')]);

    // Packets crossed between the shards, and each shard sent media of its own.
    const during = await stats();
    const piped = during.rtp_packets_piped - start.rtp_packets_piped;
    const forwarded = during.shards.map((s, i) => s.rtp_packets_forwarded - start.shards[i].rtp_packets_forwarded);
    console.log(`# ${piped} RTP packets handed between the shards; forwarded per shard: ${forwarded.join(' / ')}; decoded widths ${JSON.stringify(widths)}`);
    assert.ok(piped > 100, `RTP packets handed between the shards: ${piped}`);
    assert.ok(forwarded.every((n) => n > 100), `each shard forwarded RTP: ${forwarded}`);
    assert.equal(during.pipe_msgs_dropped, 0, 'nothing dropped on the pipe');
    await high.page.screenshot({ path: join(ARTIFACTS, 'spread-shard1-viewer.png') });

    // The host leaves (its page goes away): the viewer on the other shard sees it go.
    await fox.page.goto('about:blank');
    await waitFor(async () => (await gridNames(high)).length === 1, { timeout: 15_000, what: "the host's tile to leave the shard-1 viewer's grid" });
    assert.deepEqual(await gridNames(high), ['low']);
    await waitFor(async () => (await stats()).shards[0].participants === 1, { what: 'the host to leave shard 0' });
  });
});
