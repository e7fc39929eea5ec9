// H.264 simulcast through Plaza in headless Chromium: a publisher that prefers H.264
// (`?codec=h264`: the client's `videoCodec` option puts it first with setCodecPreferences)
// sends three simulcast layers; a viewer capped to `low` decodes the 320 wide layer, then,
// switched to `high`, the widest layer sent, decoding all along (the switch waits for an
// IDR of the new layer, which carries or is given its SPS/PPS). The inbound codec must be
// H.264 on both sides: a Chromium that cannot encode H.264 fails this test (never skipped).
// Run with scripts/browser-tests.sh (loopback-only network namespace, server started here).
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchParticipant, joinViaUrl, waitFor, remoteStats, loopbackOnly } from './harness.js';

let server;
const open = new Set();

async function participant(label) {
  const p = await launchParticipant(label);
  open.add(p);
  return p;
}

before(async () => {
  if (!loopbackOnly()) console.warn('warning: not in a loopback-only network namespace (run scripts/browser-tests.sh)');
  server = await startServer({ logName: 'plaza-h264.log' });
});

after(async () => {
  for (const p of open) {
    if (process.env.SHOW_BROWSER_LOGS) console.log(p.logs.join('\n'));
    await p.close();
  }
  await server?.stop();
});

/**
 * The fmtp line of the H.264 format a page's publisher connection sends (`pub`) or its
 * subscriber connection receives (`sub`), from getStats.
 */
function h264Fmtp(p, which) {
  return p.page.evaluate(async (which) => {
    const pc = window.plaza.client._sess?.[which];
    if (!pc) return null;
    const report = await pc.getStats();
    const type = which === 'pub' ? 'outbound-rtp' : 'inbound-rtp';
    for (const s of report.values()) {
      const c = s.type === type && s.kind === 'video' ? report.get(s.codecId) : null;
      if (c?.mimeType === 'video/H264') return c.sdpFmtpLine ?? '';
    }
    return null;
  }, which);
}

/** profile_idc and constraint flags of an fmtp line's profile-level-id (the level aside). */
const profileOf = (fmtp) => /profile-level-id=([0-9a-f]{4})/i.exec(fmtp ?? '')?.[1]?.toLowerCase() ?? null;

/** The layer the server last said the viewer gets (`layer_changed`) for the publisher's video. */
function layerOf(p, name) {
  return p.page.evaluate((name) => {
    const c = window.plaza.client;
    for (const rt of c.remoteTracks.values()) {
      if (rt.kind === 'video' && c.participants.get(rt.participantId)?.name === name) return rt.layer ?? null;
    }
    return null;
  }, name);
}

/** The viewer's stats of the publisher's video (from the client's getTrackStats). */
async function videoFrom(p, name) {
  return (await remoteStats(p)).find((s) => s.name === name && s.kind === 'video') ?? null;
}

describe('H.264 simulcast from Chromium', { timeout: 240_000 }, () => {
  const room = `h264-${Date.now()}`;
  let pub;
  const sent = () => pub.page.evaluate(() => window.plaza.client.getPublishStats());
  const layers = async () => (await sent()).filter((l) => l.kind === 'video');
  const describeSent = async () =>
    (await layers()).map((l) => `${l.rid}:${l.codec},${l.active ? '' : 'paused,'}${l.frameWidth}w,${l.qualityLimitationReason}`).join(' ');

  before(async () => {
    pub = await participant('publisher');
    await joinViaUrl(pub, server.url, room, 'publisher', '&codec=h264');
  });

  it('the publisher sends three H.264 layers', async () => {
    // Chromium without an H.264 encoder negotiates H.264 but sends no frames (or answers with
    // another codec): say so rather than time out on a missing width later.
    const got = await waitFor(
      async () => {
        const v = await layers();
        return v.length === 3 && v.every((l) => l.codec) && v.some((l) => l.frameWidth > 0) ? v : null;
      },
      { timeout: 20_000, what: 'the publisher to send three video layers' },
    ).catch(async (e) => {
      throw new Error(`${e.message}; publisher sends ${await describeSent()} (does this Chromium encode H.264?)`);
    });
    assert.deepEqual(
      got.map((l) => l.codec),
      ['video/H264', 'video/H264', 'video/H264'],
      `the publisher must send H.264 (it sends ${got.map((l) => l.codec).join(', ')})`,
    );
    assert.deepEqual(got.map((l) => l.rid).sort(), ['f', 'h', 'q']);
  });

  it('a viewer capped to low gets the 320 wide layer, then switches to high without a freeze', async () => {
    const viewer = await participant('viewer');
    await joinViaUrl(viewer, server.url, room, 'viewer', '&quality=low&publish=0');
    const low = await waitFor(
      async () => {
        const v = await videoFrom(viewer, 'publisher');
        return v?.framesDecoded > 10 && v.frameWidth === 320 ? v : null;
      },
      { timeout: 30_000, what: 'the viewer to decode the 320 wide layer' },
    ).catch(async (e) => {
      throw new Error(`${e.message}; viewer has ${JSON.stringify(await videoFrom(viewer, 'publisher'))}; publisher sends ${await describeSent()}`);
    });
    assert.equal(low.codec, 'video/H264', 'the viewer must receive H.264');
    // The same H.264 profile on both connections (packetization-mode 1).
    const [sentFmtp, recvFmtp] = [await h264Fmtp(pub, 'pub'), await h264Fmtp(viewer, 'sub')];
    console.log(`# publisher sends ${sentFmtp}; viewer receives ${recvFmtp}`);
    assert.match(sentFmtp, /packetization-mode=1/);
    assert.match(recvFmtp, /packetization-mode=1/);
    assert.equal(profileOf(recvFmtp), profileOf(sentFmtp), 'the viewer gets the profile the publisher sends');
    // The server read the layer's size from its SPS.
    const lowLayer = await waitFor(async () => (await layerOf(viewer, 'publisher'))?.width ?? null, {
      timeout: 5_000,
      what: 'layer_changed with a width',
    });
    assert.equal(lowLayer, 320, 'layer_changed carries the size read from the SPS');

    // The widest layer the publisher sends (1280, or 640 when Chromium leaves its top
    // encoding out on a busy machine).
    const widest = await waitFor(
      async () => {
        const w = Math.max(0, ...(await layers()).filter((l) => l.active !== false).map((l) => l.frameWidth ?? 0));
        return w > 320 ? w : null;
      },
      { timeout: 20_000, what: 'the publisher to send a layer wider than 320' },
    );

    // Switch to high (the demo's quality menu) and follow the decoded frames meanwhile.
    const before = await videoFrom(viewer, 'publisher');
    const t0 = Date.now();
    await viewer.page.selectOption('#quality', 'high');
    let last = before;
    let stalls = 0; // 200 ms polls in a row without a new decoded frame, at most
    let still = 0;
    const high = await waitFor(
      async () => {
        const v = await videoFrom(viewer, 'publisher');
        still = v.framesDecoded > last.framesDecoded ? 0 : still + 1;
        stalls = Math.max(stalls, still);
        last = v;
        return v.frameWidth >= widest && v.frameWidth > 320 ? v : null;
      },
      { timeout: 30_000, interval: 200, what: `the viewer to decode the ${widest} wide layer` },
    ).catch(async (e) => {
      throw new Error(`${e.message}; viewer has ${JSON.stringify(last)}; publisher sends ${await describeSent()}`);
    });
    const switchMs = Date.now() - t0;
    // and it keeps decoding the new layer
    const after = await waitFor(
      async () => {
        const v = await videoFrom(viewer, 'publisher');
        return v.framesDecoded >= high.framesDecoded + 30 && v.frameWidth === high.frameWidth ? v : null;
      },
      { timeout: 10_000, what: 'the viewer to keep decoding the high layer' },
    );
    console.log(
      `# H.264 low→high: ${high.frameWidth} wide ${switchMs} ms after the request; ` +
        `longest decode gap ${stalls * 200} ms; freezeCount ${before.freezeCount}→${after.freezeCount}; ` +
        `framesDecoded ${before.framesDecoded}→${after.framesDecoded}`,
    );
    assert.equal(after.codec, 'video/H264');
    const highLayer = await layerOf(viewer, 'publisher');
    assert.equal(highLayer?.width, high.frameWidth, `layer_changed names the high layer's size (${JSON.stringify(highLayer)})`);
    assert.ok(after.framesDecoded > before.framesDecoded, 'frames decoded grow');
    assert.ok(after.freezeCount - before.freezeCount <= 0, `no freeze across the switch (freezeCount ${before.freezeCount}→${after.freezeCount})`);
    assert.ok(stalls * 200 < 1000, `no decode gap of a second or more (longest ${stalls * 200} ms)`);
    open.delete(viewer);
    await viewer.close();
  });

  after(async () => {
    if (pub) {
      open.delete(pub);
      await pub.close();
    }
  });
});
