// A subscriber on a lossy, slow link: 10 % random loss and 100 ms delay on its UDP flow, both
// directions (the media and RTCP the server sends it, and the RTCP — NACKs, TWCC feedback,
// receiver reports — and STUN consent it sends back), while a Chromium publisher sends
// simulcast video (320 / 640 / 1280 wide) and audio from the fake devices. Asserts that
//  (a) audio keeps arriving every second with bounded gaps and bounded concealment,
//  (b) video drops below the top layer within IMPAIR_DROP_MS and keeps being decoded (a frame
//      in every 2 s: the server repairs the losses of the layer it sends, and asks the
//      publisher for a keyframe when it gives up on one; Chromium itself would ask only after
//      ~3 s without a decodable frame),
//  (c) after the impairment is lifted, video is back on the top layer within RECOVER_MS,
// and prints the times and ratios (the impaired samples go to ARTIFACTS/lossy-samples.json).
// The impairment is tests/browser/impair.py behind iptables NFQUEUE rules matching the
// subscriber connection's local UDP port (harness.js impairUdp), inside the loopback-only
// network namespace of scripts/browser-tests.sh.
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  startServer,
  participants,
  joinViaUrl,
  waitFor,
  requireLoopbackOnly,
  selectedCandidatePairs,
  whileImpaired,
  pageNow,
  samplesSince as allSamplesSince,
  percentile,
  ARTIFACTS,
} from './harness.js';

// Its own ports, so that it never meets another test file's server.
const PORT = 7910;
const UDP_PORT = 7912;
const LOSS = 0.1;
const DELAY_MS = 100;
// How long the link stays impaired at most, and at least after video has dropped a layer.
const IMPAIR_MAX_MS = 40_000;
const IMPAIRED_AFTER_DROP_MS = 10_000;
// Bounds, with margin over what six runs on a 2-core machine measured: video left the top
// layer 0.5–1.5 s after the impairment began and was back on it 15.3–17.4 s after it was lifted;
// under the impairment audio arrived at 41–52 packets/s (of 50), its longest gap was ≤ 110 ms
// (the 100 ms sampling), and 8.7–11.6 % of its samples were concealed (Opus is forwarded without
// NACK: every lost packet is concealed). Stopped audio would be ~100 % concealed.
const IMPAIR_DROP_MS = 15_000;
const RECOVER_MS = 40_000;
const MAX_AUDIO_GAP_MS = 1_000;
const MAX_CONCEALED_RATIO = 0.25;

let server;
const browsers = participants();
const participant = (label) => browsers.launch(label);

before(async () => {
  requireLoopbackOnly();
  // No ICE-TCP: the subscriber must stay on its (impaired) UDP path.
  server = await startServer({ logName: 'plaza-lossy.log', port: PORT, udpPort: UDP_PORT, args: ['--tcp-port', 'off'] });
});

after(async () => {
  await browsers.closeAll();
  await server?.stop();
});

/**
 * Join as a receive-only client (no camera, no adaptive stream: the requested layer is the
 * top one), play every remote track in a media element, and sample the receive stats every
 * 100 ms into window.__samples: {t (page ms), audio: {packetsReceived, packetsLost,
 * totalSamplesReceived, concealedSamples, silentConcealedSamples}, video: {framesDecoded,
 * frameWidth, packetsReceived, packetsLost, nackCount, pliCount, keyFramesDecoded,
 * framesReceived, framesDropped, freezeCount}, rtt (s, ICE round trip of the subscriber
 * connection), layer (last layer_changed rid)}.
 */
async function joinSampling(p, room) {
  await p.page.goto(`${server.url}/`);
  await p.page.evaluate(async (room) => {
    const { PlazaClient } = await import('/plaza-client.js');
    const c = new PlazaClient({ room, name: 'subscriber', adaptiveStream: false, reconnect: false });
    window.__client = c;
    window.__samples = [];
    window.__layers = [];
    c.on('trackadded', ({ trackId, kind }) => {
      const el = document.createElement(kind === 'video' ? 'video' : 'audio');
      el.muted = false;
      document.body.append(el);
      c.attach(trackId, el);
    });
    c.on('layerchanged', (l) => window.__layers.push({ t: performance.now(), rid: l.rid, width: l.width }));
    await c.connect();
    const pick = (report) => {
      let inbound = null;
      let rtt = null;
      report.forEach((s) => {
        if (s.type === 'inbound-rtp') inbound = s;
        if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') rtt = s.currentRoundTripTime ?? null;
      });
      return inbound && { ...inbound, rtt };
    };
    setInterval(async () => {
      const sample = { t: performance.now(), audio: null, video: null, rtt: null, layer: window.__layers.at(-1)?.rid ?? null };
      for (const rt of c.remoteTracks.values()) {
        if (!rt.receiver) continue;
        const s = pick(await rt.receiver.getStats());
        if (!s) continue;
        sample.rtt = s.rtt ?? sample.rtt;
        if (rt.kind === 'audio') {
          sample.audio = {
            packetsReceived: s.packetsReceived ?? 0,
            packetsLost: s.packetsLost ?? 0,
            totalSamplesReceived: s.totalSamplesReceived ?? 0,
            concealedSamples: s.concealedSamples ?? 0,
            silentConcealedSamples: s.silentConcealedSamples ?? 0,
          };
        } else {
          sample.video = {
            framesDecoded: s.framesDecoded ?? 0,
            frameWidth: s.frameWidth ?? 0,
            packetsReceived: s.packetsReceived ?? 0,
            packetsLost: s.packetsLost ?? 0,
            nackCount: s.nackCount ?? 0,
            pliCount: s.pliCount ?? 0,
            keyFramesDecoded: s.keyFramesDecoded ?? 0,
            framesReceived: s.framesReceived ?? 0,
            framesDropped: s.framesDropped ?? 0,
            freezeCount: s.freezeCount ?? 0,
          };
        }
      }
      window.__samples.push(sample);
    }, 100);
  }, room);
}

const samplesSince = async (p, t) => (await allSamplesSince(p, t)).filter((s) => s.audio && s.video);
const lastSample = (p) => p.page.evaluate(() => window.__samples.filter((s) => s.audio && s.video).at(-1) ?? null);

/** Audio over `samples`: packets per whole second, the longest time without a new packet, concealment. */
function audioSummary(samples) {
  const first = samples[0];
  const last = samples.at(-1);
  let longestGap = 0;
  let since = first.t;
  let prev = first.audio.packetsReceived;
  const perSecond = [];
  let secStart = first;
  for (const s of samples) {
    if (s.audio.packetsReceived > prev) {
      longestGap = Math.max(longestGap, s.t - since);
      since = s.t;
      prev = s.audio.packetsReceived;
    }
    if (s.t - secStart.t >= 1000) {
      perSecond.push(s.audio.packetsReceived - secStart.audio.packetsReceived);
      secStart = s;
    }
  }
  longestGap = Math.max(longestGap, last.t - since);
  const samplesReceived = last.audio.totalSamplesReceived - first.audio.totalSamplesReceived;
  const concealed = last.audio.concealedSamples - first.audio.concealedSamples;
  const lost = last.audio.packetsLost - first.audio.packetsLost;
  const received = last.audio.packetsReceived - first.audio.packetsReceived;
  return {
    seconds: (last.t - first.t) / 1000,
    perSecond,
    minPerSecond: Math.min(...perSecond),
    longestGap,
    samplesReceived,
    concealedRatio: samplesReceived > 0 ? concealed / samplesReceived : 1,
    lossRatio: received + lost > 0 ? lost / (received + lost) : 0,
  };
}

function videoSummary(samples) {
  const first = samples[0];
  const last = samples.at(-1);
  const seconds = (last.t - first.t) / 1000;
  return {
    seconds,
    fps: (last.video.framesDecoded - first.video.framesDecoded) / seconds,
    widths: [...new Set(samples.map((s) => s.video.frameWidth))],
    nacks: last.video.nackCount - first.video.nackCount,
    plis: last.video.pliCount - first.video.pliCount,
    keyframes: last.video.keyFramesDecoded - first.video.keyFramesDecoded,
    lossRatio:
      (last.video.packetsLost - first.video.packetsLost) /
      Math.max(1, last.video.packetsLost - first.video.packetsLost + last.video.packetsReceived - first.video.packetsReceived),
  };
}

const fmtAudio = (a) =>
  `audio ${a.seconds.toFixed(1)} s: packets/s min ${a.minPerSecond} (${a.perSecond.join(' ')}), longest gap ${a.longestGap.toFixed(0)} ms, ` +
  `packetsLost ${(a.lossRatio * 100).toFixed(1)} %, concealed ${(a.concealedRatio * 100).toFixed(1)} % of ${a.samplesReceived} samples`;
const fmtVideo = (v) => `video ${v.fps.toFixed(1)} fps decoded, widths ${v.widths.join('/')}, ${v.nacks} NACKs sent, ${v.plis} PLIs sent, ${v.keyframes} keyframes decoded, packetsLost ${(v.lossRatio * 100).toFixed(1)} %`;

describe('subscriber on a lossy link (10 % loss, 100 ms delay)', { timeout: 360_000 }, () => {
  it('keeps audio, drops video to a lower layer, and recovers the top layer once the link is clean', async () => {
    const room = `lossy-${Date.now()}`;
    const pub = await participant('lossy-publisher');
    await joinViaUrl(pub, server.url, room, 'publisher');
    const sub = await participant('lossy-subscriber');
    await joinSampling(sub, room);

    // The publisher's bandwidth estimate ramps up until it sends its top layer; the subscriber
    // (no cap, no rendered size) then receives it. The top layer is the widest one the
    // publisher sends: 1280 wide, unless Chromium's CPU adaptation holds it back on a busy
    // machine (then 640, still above the 320 wide bottom layer).
    const t0 = Date.now();
    const sentLayers = async () => {
      const all = await pub.page.evaluate(() => window.plaza.client.getPublishStats());
      return all.filter((l) => l.kind === 'video' && l.active !== false && (l.framesPerSecond ?? 0) > 0);
    };
    let topWidth = 0;
    let seen = '';
    await waitFor(
      async () => {
        const layers = await sentLayers();
        const widest = Math.max(0, ...layers.map((l) => l.frameWidth ?? 0));
        const w = (await lastSample(sub))?.video.frameWidth;
        // Still ramping up (limited by its bandwidth estimate): wait, for up to 30 s.
        const settled = !layers.some((l) => l.qualityLimitationReason === 'bandwidth') || Date.now() - t0 > 30_000;
        if (settled && widest >= 640 && w === widest) topWidth = widest;
        seen = `publisher sends ${layers.map((l) => `${l.rid}:${l.frameWidth}w/${l.qualityLimitationReason ?? '-'}`).join(' ')}, subscriber decodes ${w} wide`;
        return topWidth > 0;
      },
      { timeout: 60_000, interval: 250, what: 'the subscriber to decode the widest layer the publisher sends (at least 640 wide)' },
    ).catch((e) => {
      throw new Error(`${e.message}; last: ${seen}`);
    });
    const limits = (await sentLayers()).map((l) => `${l.rid}:${l.frameWidth}w/${l.qualityLimitationReason ?? '-'}`).join(' ');
    console.log(`# top layer (${topWidth} wide) after ${Date.now() - t0} ms; publisher sends ${limits}`);
    const pairs = await selectedCandidatePairs(sub);
    const port = pairs.subscriber?.local?.port;
    assert.equal(pairs.subscriber?.local?.protocol, 'udp', JSON.stringify(pairs));
    assert.ok(port > 0, JSON.stringify(pairs));

    // Baseline: 5 s on a clean link.
    const baseStart = await pageNow(sub);
    await new Promise((r) => setTimeout(r, 5_000));
    const base = await samplesSince(sub, baseStart);
    const baseAudio = audioSummary(base);
    console.log(`# clean link: ${fmtAudio(baseAudio)}; ${fmtVideo(videoSummary(base))}`);

    // Impair the subscriber connection's flow, both directions.
    let impStart;
    let dropAt = null;
    const {
      counters: [counters],
    } = await whileImpaired([port], { loss: LOSS, delayMs: DELAY_MS, uplink: true }, async () => {
      impStart = await pageNow(sub);
      const deadline = Date.now() + IMPAIR_MAX_MS;
      let dropSeenAt = null;
      while (Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 250));
        const s = await lastSample(sub);
        if (dropAt === null && s.video.frameWidth > 0 && s.video.frameWidth < topWidth) {
          dropAt = s.t;
          dropSeenAt = Date.now();
        }
        if (dropSeenAt !== null && Date.now() - dropSeenAt >= IMPAIRED_AFTER_DROP_MS) break;
      }
    });
    const liftAt = await pageNow(sub);
    const st = await fetch(`${server.url}/stats`).then((r) => r.json());
    console.log(
      `# server, so far: NACKed packets ${st.nack_requested}: ${st.nack_resent} resent, ${st.nack_refused} refused ` +
        `(too soon, too old, too often), ${st.nack_over_budget} over budget, ${st.nack_unrepairable} given up ` +
        `(a keyframe asked for each); ${st.keyframe_requests} keyframe requests`,
    );
    const imp = await samplesSince(sub, impStart);
    const impAudio = audioSummary(imp);
    console.log(
      `# impairment: downlink ${JSON.stringify(counters.downlink)}, uplink ${JSON.stringify(counters.uplink)} ` +
        `(${((counters.downlink.dropped / Math.max(1, counters.downlink.seen)) * 100).toFixed(1)} % / ` +
        `${((counters.uplink.dropped / Math.max(1, counters.uplink.seen)) * 100).toFixed(1)} % dropped)`,
    );
    console.log(`# impaired link: ${fmtAudio(impAudio)}; ${fmtVideo(videoSummary(imp))}`);
    const rtts = imp.map((s) => s.rtt).filter((x) => x !== null);
    const impRtt = percentile(rtts, 0.5);
    console.log(`# ICE round trip: clean ${(percentile(base.map((s) => s.rtt).filter((x) => x !== null), 0.5) * 1000).toFixed(0)} ms, impaired p50 ${(impRtt * 1000).toFixed(0)} ms`);
    console.log(`# video below the top layer ${dropAt === null ? 'never' : `${(dropAt - impStart).toFixed(0)} ms`} after the impairment began`);

    // The impairment was real: the impairer saw the flow and dropped about LOSS of it.
    assert.ok(counters.downlink.seen > 500, `downlink packets impaired: ${JSON.stringify(counters)}`);
    assert.ok(counters.uplink.seen > 50, `uplink packets impaired: ${JSON.stringify(counters)}`);
    const dropped = counters.downlink.dropped / counters.downlink.seen;
    assert.ok(impRtt >= (2 * DELAY_MS * 0.8) / 1000, `the subscriber's ICE round trip grew by the delay both ways: ${impRtt} s`);
    assert.ok(dropped > LOSS / 2 && dropped < LOSS * 2, `downlink drop ratio ${dropped}`);

    // (a) Audio keeps arriving: every second, no long gap, bounded concealment.
    assert.ok(impAudio.minPerSecond >= 20, `audio packets every second under loss: ${impAudio.perSecond.join(' ')}`);
    assert.ok(impAudio.longestGap <= MAX_AUDIO_GAP_MS, `longest audio gap ${impAudio.longestGap} ms`);
    assert.ok(impAudio.concealedRatio <= MAX_CONCEALED_RATIO, `concealed ${impAudio.concealedRatio}`);

    // (b) Video drops below the top layer in time and keeps being decoded.
    assert.ok(dropAt !== null, `video never dropped below ${topWidth} wide within ${IMPAIR_MAX_MS} ms`);
    assert.ok(dropAt - impStart <= IMPAIR_DROP_MS, `video dropped below the top layer only after ${dropAt - impStart} ms`);
    const afterDrop = imp.filter((s) => s.t >= dropAt);
    writeFileSync(
      join(ARTIFACTS, 'lossy-samples.json'),
      JSON.stringify({ impStart, dropAt, liftAt, layers: await sub.page.evaluate(() => window.__layers), samples: imp }),
    );
    const lowVideo = videoSummary(afterDrop);
    console.log(`# after the drop (still impaired): ${fmtVideo(lowVideo)}`);
    assert.ok(lowVideo.fps >= 5, `video keeps playing on the lower layer: ${lowVideo.fps} fps`);
    // A frame lost for good (a packet the server gave up repairing: its retransmissions lost
    // too, or too late) stalls the decoder until the next keyframe; the server asks the
    // publisher for one as soon as it gives up (nack_unrepairable), so no 2 s window (sliding by
    // 1 s) goes without a decoded frame. Stopped video fails every window.
    let longest = 0;
    for (let i = 0, last = afterDrop[0]; i < afterDrop.length; i++) {
      if (afterDrop[i].video.framesDecoded > last.video.framesDecoded) last = afterDrop[i];
      longest = Math.max(longest, afterDrop[i].t - last.t);
    }
    console.log(`# longest time without a decoded frame after the drop: ${Math.round(longest)} ms`);
    for (let i = 0; i + 20 < afterDrop.length; i += 10) {
      const [a, b] = [afterDrop[i].video, afterDrop[i + 20].video];
      const d = (k) => b[k] - a[k];
      assert.ok(
        b.framesDecoded > a.framesDecoded,
        `frames decoded in every 2 s after the drop (at ${i}): in that window ${d('framesReceived')} frames received, ` +
          `${d('packetsReceived')} packets received, ${d('packetsLost')} lost, ${d('nackCount')} NACKs, ${d('pliCount')} PLIs, ` +
          `${d('keyFramesDecoded')} keyframes decoded (samples in ${join(ARTIFACTS, 'lossy-samples.json')})`,
      );
    }

    // (c) Back on the top layer after the link is clean again.
    const back = await waitFor(
      async () => {
        const s = await lastSample(sub);
        return s.t > liftAt && s.video.frameWidth >= topWidth ? s : null;
      },
      { timeout: RECOVER_MS, interval: 100, what: `the top layer again within ${RECOVER_MS} ms of lifting the impairment` },
    );
    console.log(`# top layer again ${(back.t - liftAt).toFixed(0)} ms after the impairment was lifted`);
    const clean = await samplesSince(sub, liftAt);
    console.log(`# after lifting: ${fmtAudio(audioSummary(clean))}; ${fmtVideo(videoSummary(clean))}`);
    const layers = await sub.page.evaluate(() => window.__layers);
    console.log(`# layer_changed: ${layers.map((l) => `${l.rid}@${((l.t - impStart) / 1000).toFixed(1)}s`).join(' ')} (s from the impairment start)`);
  });
});
