// Redundant audio (RFC 2198 `audio/red`) with Chromium on both ends: a publisher page sends its
// fake microphone, a subscriber page receives it on a link that loses 10 % of what the server
// sends it (tests/browser/impair.py behind NFQUEUE rules on the subscriber connection's UDP
// port, harness.js impairUdp, the same loss sequence in both runs). Run twice: against a server
// that negotiates RED (the default) and one started with `--no-red`. Asserts that
//  (a) with RED, the publisher sends `audio/red` (the answer lists RED ahead of Opus; the
//      track is announced as `audio/red`), the subscriber receives `audio/red` (its inbound-rtp
//      codec), and its SDP carries Opus with `useinbandfec=1`;
//  (b) with `--no-red`, both legs are plain `audio/opus`;
//  (c) under the loss, the share of concealed samples with RED is well below that without
//      (each RED packet carries the previous frames, so a lost packet is rebuilt from the next).
// Prints both runs' concealment (the figures in bench/results/*-red-loss.md).
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startServer,
  participants,
  joinWithClient,
  waitFor,
  requireLoopbackOnly,
  selectedCandidatePairs,
  whileImpaired,
  pageNow,
  samplesSince,
} from './harness.js';

// Its own ports, so that it never meets another test file's server.
const RED_PORT = 7920;
const RED_UDP_PORT = 7922;
const OPUS_PORT = 7930;
const OPUS_UDP_PORT = 7932;
const LOSS = 0.1;
const DELAY_MS = 20;
// The same loss decisions, packet by packet, in both runs.
const SEED = 2198;
const IMPAIRED_MS = Number(process.env.RED_IMPAIRED_MS ?? 20_000);

const browsers = participants();
const participant = (label) => browsers.launch(label);
const servers = [];

before(async () => {
  requireLoopbackOnly();
});

after(async () => {
  await browsers.closeAll();
  for (const s of servers) await s.stop();
});

/**
 * In the subscriber page: play every remote audio track and sample its receive stats every
 * 100 ms into window.__samples ({t, codec, packetsReceived, packetsLost, totalSamplesReceived,
 * concealedSamples, silentConcealedSamples, concealmentEvents}).
 */
async function startSampling(p) {
  await p.page.evaluate(() => {
    const c = window.__client;
    window.__samples = [];
    c.on('trackadded', ({ trackId, kind }) => {
      if (kind !== 'audio') return;
      const el = document.createElement('audio');
      document.body.append(el);
      c.attach(trackId, el);
    });
    setInterval(async () => {
      for (const rt of c.remoteTracks.values()) {
        if (rt.kind !== 'audio' || !rt.receiver) continue;
        const report = await rt.receiver.getStats();
        let inbound = null;
        report.forEach((s) => {
          if (s.type === 'inbound-rtp') inbound = s;
        });
        if (!inbound) continue;
        const codec = inbound.codecId ? report.get(inbound.codecId)?.mimeType ?? null : null;
        window.__samples.push({
          t: performance.now(),
          codec,
          packetsReceived: inbound.packetsReceived ?? 0,
          packetsLost: inbound.packetsLost ?? 0,
          totalSamplesReceived: inbound.totalSamplesReceived ?? 0,
          concealedSamples: inbound.concealedSamples ?? 0,
          silentConcealedSamples: inbound.silentConcealedSamples ?? 0,
          concealmentEvents: inbound.concealmentEvents ?? 0,
        });
      }
    }, 100);
  });
}

function summary(samples) {
  const first = samples[0];
  const last = samples.at(-1);
  const received = last.totalSamplesReceived - first.totalSamplesReceived;
  const packets = last.packetsReceived - first.packetsReceived;
  const lost = last.packetsLost - first.packetsLost;
  const seconds = (last.t - first.t) / 1000;
  return {
    seconds,
    packets,
    lossRatio: packets + lost > 0 ? lost / (packets + lost) : 0,
    samplesReceived: received,
    concealedRatio: received > 0 ? (last.concealedSamples - first.concealedSamples) / received : 1,
    concealmentEventsPerMinute: ((last.concealmentEvents - first.concealmentEvents) / seconds) * 60,
  };
}

const fmt = (s) =>
  `${s.seconds.toFixed(1)} s, ${s.packets} packets, packetsLost ${(s.lossRatio * 100).toFixed(1)} %, ` +
  `concealed ${(s.concealedRatio * 100).toFixed(2)} % of ${s.samplesReceived} samples, ` +
  `${s.concealmentEventsPerMinute.toFixed(0)} concealment events/min`;

/**
 * One run: a server (with `args`), a publisher sending its microphone, a subscriber sampling;
 * a clean baseline, then IMPAIRED_MS under the loss. Returns the codecs and both summaries.
 */
async function run(label, { port, udpPort, args }) {
  const server = await startServer({ logName: `plaza-red-${label}.log`, port, udpPort, args: ['--tcp-port', 'off', ...args] });
  servers.push(server);
  const room = `red-${label}-${Date.now()}`;
  const sub = await participant(`red-${label}-subscriber`);
  await joinWithClient(sub, server.url, { room, name: 'subscriber' });
  await startSampling(sub);
  const pub = await participant(`red-${label}-publisher`);
  await joinWithClient(pub, server.url, { room, name: 'publisher' });
  await pub.page.evaluate(() => window.__client.publish({ video: false, audio: true }));

  await waitFor(async () => (await sub.page.evaluate(() => window.__samples.at(-1)?.packetsReceived ?? 0)) > 100, {
    timeout: 30_000,
    what: `${label}: the subscriber to receive audio`,
  });
  // The subscriber connection's offer (the server's) and answer (Chromium's): RED is used where
  // both list it. Chromium's inbound-rtp stats name the decoder's codec (Opus, RED unwrapped);
  // the codec entries of its report are printed.
  const { sdp, answer, statsCodecs } = await sub.page.evaluate(async () => {
    const pc = window.__client._sess?.sub;
    const codecs = new Set();
    (await pc.getStats()).forEach((s) => {
      if (s.type === 'codec') codecs.add(s.mimeType);
    });
    return { sdp: pc?.remoteDescription?.sdp ?? '', answer: pc?.localDescription?.sdp ?? '', statsCodecs: [...codecs] };
  });
  // What the publisher sends, as the server announced the track: its codec is the one of the
  // first packet that reached the server (Chromium's outbound-rtp stats name the encoder's,
  // Opus, even when it wraps it in RED).
  const pubCodec = await sub.page.evaluate(() => [...window.__client.remoteTracks.values()].find((t) => t.kind === 'audio')?.info?.mime_type ?? null);
  const subCodec = await sub.page.evaluate(() => window.__samples.at(-1)?.codec ?? null);

  const pairs = await selectedCandidatePairs(sub);
  const localPort = pairs.subscriber?.local?.port;
  assert.equal(pairs.subscriber?.local?.protocol, 'udp', JSON.stringify(pairs));
  assert.ok(localPort > 0, JSON.stringify(pairs));

  const baseStart = await pageNow(sub);
  await new Promise((r) => setTimeout(r, 3_000));
  const clean = summary(await samplesSince(sub, baseStart));

  let impStart;
  const {
    counters: [counters],
  } = await whileImpaired([localPort], { loss: LOSS, delayMs: DELAY_MS, uplink: false, seed: SEED }, async () => {
    impStart = await pageNow(sub);
    await new Promise((r) => setTimeout(r, IMPAIRED_MS));
  });
  const impaired = summary(await samplesSince(sub, impStart));
  console.log(`# ${label}: publisher sends ${pubCodec}; subscriber's inbound-rtp codec ${subCodec}, codecs in its stats ${statsCodecs.join(' ')}`);
  console.log(`# ${label} clean: ${fmt(clean)}`);
  console.log(
    `# ${label} 10 % loss: ${fmt(impaired)} (impairer dropped ${counters.downlink.dropped} of ${counters.downlink.seen} datagrams)`,
  );
  const dropped = counters.downlink.dropped / Math.max(1, counters.downlink.seen);
  assert.ok(counters.downlink.seen > 500, `downlink packets impaired: ${JSON.stringify(counters)}`);
  assert.ok(dropped > LOSS / 2 && dropped < LOSS * 2, `downlink drop ratio ${dropped}`);
  return { pubCodec, subCodec, sdp, answer, clean, impaired };
}

describe('Opus RED against 10 % loss, with and without RED', { timeout: 240_000 }, () => {
  it('negotiates audio/red end to end and conceals far less under loss than plain Opus', async () => {
    const red = await run('red', { port: RED_PORT, udpPort: RED_UDP_PORT, args: [] });
    const opus = await run('opus', { port: OPUS_PORT, udpPort: OPUS_UDP_PORT, args: ['--no-red'] });

    // (a) RED on both legs; Opus in-band FEC announced to the subscriber.
    assert.equal(red.pubCodec?.toLowerCase(), 'audio/red', 'the publisher sends RED');
    for (const sdp of [red.sdp, red.answer]) {
      assert.match(sdp, /a=rtpmap:\d+ red\/48000\/2/, 'RED offered to and accepted by the subscriber');
      assert.match(sdp, /a=fmtp:111 [^\r\n]*useinbandfec=1/, 'Opus in-band FEC on the subscriber leg');
    }
    assert.equal(red.subCodec?.toLowerCase(), 'audio/opus', 'decoded as Opus');
    // (b) Without RED, plain Opus.
    assert.equal(opus.pubCodec?.toLowerCase(), 'audio/opus');
    assert.equal(opus.subCodec?.toLowerCase(), 'audio/opus');
    assert.doesNotMatch(opus.sdp, /red\/48000/);
    assert.doesNotMatch(opus.answer, /red\/48000/);

    // (c) The loss hurts plain Opus (every lost packet concealed) and RED hides most of it.
    console.log(
      `# concealed under 10 % loss: RED ${(red.impaired.concealedRatio * 100).toFixed(2)} %, ` +
        `Opus ${(opus.impaired.concealedRatio * 100).toFixed(2)} %; concealment events/min: RED ` +
        `${red.impaired.concealmentEventsPerMinute.toFixed(0)}, Opus ${opus.impaired.concealmentEventsPerMinute.toFixed(0)}`,
    );
    assert.ok(opus.impaired.concealedRatio > 0.04, `plain Opus conceals the lost packets: ${opus.impaired.concealedRatio}`);
    assert.ok(
      red.impaired.concealedRatio < opus.impaired.concealedRatio / 2,
      `RED conceals less than half of what plain Opus does: ${red.impaired.concealedRatio} vs ${opus.impaired.concealedRatio}`,
    );
  });
});
