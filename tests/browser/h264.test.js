// H.264 simulcast through Plaza in headless Chromium: a publisher that prefers H.264
// (`?codec=h264`: the client's `videoCodec` option puts it first with setCodecPreferences)
// sends three simulcast layers; a viewer capped to `low` decodes the 320 wide layer, then,
// switched to `high`, the widest layer sent, decoding all along (the switch waits for an
// IDR of the new layer, which carries or is given its SPS/PPS). The inbound codec must be
// H.264 on both sides: a Chromium that cannot encode H.264 fails this test (never skipped).
// Then the same with a publisher whose keyframes lose their SPS/PPS (an encoded transform
// strips them): the viewer decodes only because the server sends the layer's cached ones
// ahead of each IDR it starts a layer with.
// Run with scripts/browser-tests.sh (loopback-only network namespace, server started here).
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
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
  // The core's trace lines name each H.264 IDR and each time cached parameter sets are sent;
  // a server of its own (never PLAZA_URL's), to read them from its log.
  const level = `${process.env.PLAZA_LOG_LEVEL ?? 'info'},plaza::sfu::core=trace`;
  process.env.PLAZA_LOG_LEVEL = level;
  server = await startServer({ logName: 'plaza-h264.log', env: { PLAZA_LOG_LEVEL: level } });
});

/** Lines of the server's log that match `re`. */
function serverLog(re) {
  return readFileSync(server.logPath, 'utf8')
    .split('\n')
    .filter((l) => re.test(l));
}

/**
 * Page init script of a publisher whose encoder output loses its SPS and PPS once
 * `window.__h264.strip` is set: every peer connection gets encoded insertable streams, and
 * the video sender's keyframes (Annex B) are rewritten without their NAL units of types 7 and
 * 8, so the server must supply the parameter sets it cached from earlier keyframes.
 */
function stripParameterSets() {
  const stats = { strip: false, keyframes: 0, stripped: 0 };
  window.__h264 = stats;
  const Native = window.RTCPeerConnection;
  const pass = (streams, transform) =>
    streams.readable.pipeThrough(new TransformStream({ transform })).pipeTo(streams.writable).catch(() => {});
  const unchanged = (frame, ctl) => ctl.enqueue(frame);
  /** Annex B NAL units of `buf` as [start, end) byte ranges (start after the start code). */
  const units = (b) => {
    const starts = [];
    for (let i = 0; i + 2 < b.length; i++) {
      if (b[i] === 0 && b[i + 1] === 0 && b[i + 2] === 1) {
        starts.push(i + 3);
        i += 2;
      }
    }
    return starts.map((s, k) => {
      let end = k + 1 < starts.length ? starts[k + 1] - 3 : b.length;
      while (end > s && b[end - 1] === 0 && k + 1 < starts.length) end--; // 4-byte start code
      return [s, end];
    });
  };
  const strip = (frame, ctl) => {
    if (frame.type === 'key') {
      stats.keyframes++;
      if (stats.strip) {
        const b = new Uint8Array(frame.data);
        const kept = units(b).filter(([s]) => ![7, 8].includes(b[s] & 0x1f));
        const out = new Uint8Array(kept.reduce((n, [s, e]) => n + 4 + e - s, 0));
        let o = 0;
        for (const [s, e] of kept) {
          out.set([0, 0, 0, 1], o);
          out.set(b.subarray(s, e), o + 4);
          o += 4 + e - s;
        }
        if (out.length < b.length) stats.stripped++;
        frame.data = out.buffer;
      }
    }
    ctl.enqueue(frame);
  };
  window.RTCPeerConnection = function (config = {}) {
    const pc = new Native({ ...config, encodedInsertableStreams: true });
    const addTransceiver = pc.addTransceiver.bind(pc);
    pc.addTransceiver = (what, init) => {
      const tr = addTransceiver(what, init);
      const kind = typeof what === 'string' ? what : what.kind;
      pass(tr.sender.createEncodedStreams(), kind === 'video' ? strip : unchanged);
      return tr;
    };
    pc.addEventListener('track', (e) => pass(e.receiver.createEncodedStreams(), unchanged));
    return pc;
  };
  window.RTCPeerConnection.prototype = Native.prototype;
}

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

/**
 * A viewer of `room` capped to low decodes the 320 wide H.264 layer of `publisher`'s video in
 * the same profile it is sent, then switches to high (the demo's quality menu) and decodes the
 * widest layer sent without a freeze. Returns the viewer's last stats.
 */
async function lowThenHigh(pub, room, label) {
  const layers = async () => (await pub.page.evaluate(() => window.plaza.client.getPublishStats())).filter((l) => l.kind === 'video');
  const describeSent = async () =>
    (await layers()).map((l) => `${l.rid}:${l.codec},${l.active ? '' : 'paused,'}${l.frameWidth}w,${l.qualityLimitationReason}`).join(' ');
  const viewer = await participant(label);
  await joinViaUrl(viewer, server.url, room, label, '&quality=low&publish=0');
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
    `# ${label}: H.264 low→high: ${high.frameWidth} wide ${switchMs} ms after the request; ` +
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
  return after;
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

  it('a viewer capped to low gets the 320 wide layer, then switches to high without a freeze', () =>
    lowThenHigh(pub, room, 'viewer'));

  after(async () => {
    if (pub) {
      open.delete(pub);
      await pub.close();
    }
  });
});

describe('H.264 keyframes without SPS/PPS get the cached ones from the server', { timeout: 240_000 }, () => {
  const room = `h264-strip-${Date.now()}`;
  let pub;

  before(async () => {
    pub = await participant('publisher-strip');
    await pub.page.addInitScript(stripParameterSets);
    await joinViaUrl(pub, server.url, room, 'publisher', '&codec=h264');
    // Every layer's first keyframes (with SPS/PPS) reach the server, then the encoder's
    // output loses them.
    await waitFor(
      async () => {
        const v = (await pub.page.evaluate(() => window.plaza.client.getPublishStats())).filter((l) => l.kind === 'video');
        return v.length === 3 && v.every((l) => l.frameWidth > 0 && l.codec === 'video/H264');
      },
      { timeout: 20_000, what: 'the publisher to send three H.264 layers' },
    );
    await pub.page.evaluate(() => (window.__h264.strip = true));
  });

  it('a viewer still starts at low and switches to high', async () => {
    const before = serverLog(/H\.264 parameter sets sent ahead of an IDR/).length;
    await lowThenHigh(pub, room, 'viewer-strip');
    const stats = await pub.page.evaluate(() => ({ ...window.__h264 }));
    const sentAhead = serverLog(/H\.264 parameter sets sent ahead of an IDR/).length - before;
    console.log(`# publisher keyframes ${stats.keyframes}, stripped of SPS/PPS ${stats.stripped}; server sent cached ones ${sentAhead} times`);
    assert.ok(stats.stripped > 0, 'keyframes went out without SPS/PPS');
    assert.ok(sentAhead >= 2, `the server sent cached SPS/PPS at the start and at the switch (${sentAhead} times)`);
  });

  after(async () => {
    if (pub) {
      open.delete(pub);
      await pub.close();
    }
  });
});
