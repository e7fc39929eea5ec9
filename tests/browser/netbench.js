// Real-network measurements in Chromium (printed, written to target/browser/netbench.json and
// target/browser/netbench.md; never asserted beyond "it worked"):
//  1. join time: page `connect()` → first decoded remote video frame (getStats polled every
//     20 ms) for a viewer joining a room with one publisher, JOINS times (default 10) each
//       - over UDP (host candidates),
//       - over ICE-TCP (UDP to Plaza's media ports dropped by iptables, publisher included),
//       - over TURN (coturn, both relay only: iceTransportPolicy 'relay');
//     the selected candidate pair of every join is checked to be the one the mode means.
//  2. session resume, RESUMES times (default 10) each:
//       - `ws`: one participant's WebSocket is reset (iptables REJECT --reject-with tcp-reset
//         on the address it reached the server at), the rule is removed as soon as its client
//         noticed; media is left alone;
//       - `outage`: its WebSocket and its media (UDP of both its peer connections) are cut
//         for OUTAGE_MS (default 3000) — a network that goes away and comes back;
//     measured: network back → `reconnected` (resumed), → its first media packet again
//     (inbound-rtp packetsReceived grows, sampled every 50 ms), → the other participant's
//     first packet from it again; and what the other participant saw: its longest video
//     freeze (no new decoded frame) and frames decoded across the fault, and any leave, join
//     or track change.
// Every wait is bounded. Run through scripts/browser-tests.sh --netbench-only (or --bench) in
// the loopback-only namespace; it needs iptables and coturn like ice_tcp/turn.test.js.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { loadavg } from 'node:os';
import {
  ARTIFACTS,
  startServer,
  startTurnServer,
  launchParticipant,
  waitFor,
  percentile,
  joinWithClient,
  firstDecodedFrameAt,
  blockUdpToPlaza,
  iptablesRules,
  loopbackOnly,
} from './harness.js';

const JOINS = Number(process.env.JOINS ?? 10);
const RESUMES = Number(process.env.RESUMES ?? 10);
const OUTAGE_MS = Number(process.env.OUTAGE_MS ?? 3000);
const SECRET = 'plaza-netbench-turn-secret-51c0e2';
// Own ports, away from the tests' servers.
const PORT = 7920;
const UDP_PORT = 7922;
const TURN_PORT = 7930;
const TURN_UDP_PORT = 7932;
const RESUME_PORT = 7940;
const RESUME_UDP_PORT = 7942;
// The participant whose network fails reaches the server at this address (the server binds
// 0.0.0.0), so that a rule on it touches nobody else's connection.
const FAULTY_ADDR = '127.0.0.3';

if (!loopbackOnly()) throw new Error('run in a loopback-only network namespace (scripts/browser-tests.sh --netbench-only): this changes iptables rules');

const fmt = (xs) => xs.map((x) => (Number.isFinite(x) ? x.toFixed(0) : String(x))).join(', ');
const stat = (xs) => {
  const v = xs.filter(Number.isFinite);
  return { n: v.length, p50: percentile(v, 0.5), p99: percentile(v, 0.99), max: Math.max(...v), min: Math.min(...v) };
};
const results = { chromium: null, load_average_before: loadavg(), joins: {}, resume: {}, notes: [] };
const open = new Set();

async function participant(label) {
  const p = await launchParticipant(label);
  open.add(p);
  results.chromium ??= p.browser.version();
  return p;
}

async function close(...ps) {
  for (const p of ps) {
    open.delete(p);
    await p.close();
  }
}

const selectedPairs = (p) => p.page.evaluate(() => window.__client.getSelectedCandidatePairs());

/**
 * A publisher joins a fresh room, then a viewer joins JOINS times (leaving before each
 * rejoin, a fresh page load each time): connect() → first decoded frame. `check(pair)` says
 * what the viewer's selected subscriber pair must be.
 */
async function joinSeries(mode, base, { forceRelay = false, check }) {
  const room = `netbench-${mode}-${Date.now()}`;
  const pub = await participant(`${mode}-publisher`);
  const viewer = await participant(`${mode}-viewer`);
  try {
    await joinWithClient(pub, base, { room, name: 'publisher', forceRelay, publish: true });
    await waitFor(async () => (await selectedPairs(pub)).publisher, { timeout: 20_000, what: `${mode}: the publisher to connect` });
    const ms = [];
    let pair = null;
    for (let i = 0; i < JOINS; i++) {
      await viewer.page.evaluate(() => window.__client?.leave()).catch(() => {});
      const info = await joinWithClient(viewer, base, { room, name: `viewer-${i}`, forceRelay });
      const at = await firstDecodedFrameAt(viewer, { timeout: 20_000 });
      if (at === null) throw new Error(`${mode} join ${i + 1}: no decoded video within 20 s`);
      pair = (await selectedPairs(viewer)).subscriber;
      const why = check(pair);
      if (why) throw new Error(`${mode} join ${i + 1}: ${why}: ${JSON.stringify(pair)}`);
      ms.push(at - info.t0);
    }
    const s = stat(ms);
    results.joins[mode] = { ms, ...s, pair };
    console.log(`join (${mode}) connect() → first decoded frame, ${ms.length} joins (ms): ${fmt(ms)}; p50 ${s.p50.toFixed(0)}, p99 ${s.p99.toFixed(0)}`);
  } finally {
    await close(pub, viewer);
  }
}

// ---- resume ----

/**
 * In-page recorder for window.__client: events (disconnected, reconnected, participant and
 * track changes) with page times in window.__events, and every 50 ms the receive counters of
 * every remote track in window.__samples ({t, tracks: {trackId: {participantId, kind,
 * packetsReceived, framesDecoded}}}).
 */
function record(p) {
  return p.page.evaluate(() => {
    const c = window.__client;
    window.__events = [];
    for (const t of ['disconnected', 'reconnecting', 'reconnected', 'participantleft', 'participantjoined', 'trackadded', 'trackremoved']) {
      c.on(t, (d) => window.__events.push({ t, at: performance.now(), resumed: d?.resumed, who: d?.participantId ?? d?.participant?.id ?? null }));
    }
    window.__samples = [];
    setInterval(async () => {
      const tracks = {};
      for (const [id, rt] of c.remoteTracks) {
        if (!rt.receiver) continue;
        let inbound = null;
        (await rt.receiver.getStats()).forEach((s) => {
          if (s.type === 'inbound-rtp') inbound = s;
        });
        if (inbound) tracks[id] = { participantId: rt.participantId, kind: rt.kind, packetsReceived: inbound.packetsReceived ?? 0, framesDecoded: inbound.framesDecoded ?? 0 };
      }
      window.__samples.push({ t: performance.now(), tracks });
      if (window.__samples.length > 6000) window.__samples.splice(0, 1000);
    }, 50);
  });
}

const pageNow = (p) => p.page.evaluate(() => performance.now());
const eventsSince = (p, t) => p.page.evaluate((t) => window.__events.filter((e) => e.at >= t), t);
const samplesSince = (p, t) => p.page.evaluate((t) => window.__samples.filter((s) => s.t >= t), t);

/** Sum of `field` over the remote tracks of `kind` (from participant `from`, if given) in a sample. */
const total = (sample, kind, field, from = null) =>
  Object.values(sample.tracks)
    .filter((x) => x.kind === kind && (from === null || x.participantId === from))
    .reduce((a, x) => a + x[field], 0);

/** First sample at or after `t` in which the counter grew over the previous sample's. */
function firstGrowthAfter(samples, t, kind, field, from = null) {
  for (let i = 1; i < samples.length; i++) {
    if (samples[i].t < t) continue;
    if (total(samples[i], kind, field, from) > total(samples[i - 1], kind, field, from)) return samples[i].t;
  }
  return null;
}

/** Longest time (ms) in `samples` without the counter growing. */
function longestStall(samples, kind, field, from = null) {
  let longest = 0;
  let since = samples[0]?.t ?? 0;
  for (let i = 1; i < samples.length; i++) {
    if (total(samples[i], kind, field, from) > total(samples[i - 1], kind, field, from)) {
      longest = Math.max(longest, samples[i].t - since);
      since = samples[i].t;
    }
  }
  return Math.max(longest, (samples.at(-1)?.t ?? since) - since);
}

/** Local UDP ports of both of `p`'s peer connections. */
async function mediaPorts(p) {
  const pairs = await selectedPairs(p);
  return [pairs.publisher?.local?.port, pairs.subscriber?.local?.port].filter((x) => x > 0);
}

async function resumeSeries(server) {
  const room = `netbench-resume-${Date.now()}`;
  const dave = await participant('resume-dave');
  const erin = await participant('resume-erin');
  try {
    // erin's client sends nothing on its socket during a fault (no pings within a run).
    const erinInfo = await joinWithClient(erin, server.url, { room, name: 'erin', publish: true, options: { reconnect: true, pingInterval: 600_000 } });
    const daveInfo = await joinWithClient(dave, `http://${FAULTY_ADDR}:${new URL(server.url).port}`, { room, name: 'dave', publish: true, options: { reconnect: true } });
    const daveId = daveInfo.participantId;
    const erinId = erinInfo.participantId;
    for (const p of [dave, erin]) await record(p);
    const flowing = async (p, from) => {
      const a = await p.page.evaluate(() => window.__samples.at(-1));
      return a && total(a, 'video', 'framesDecoded', from) > 0 && total(a, 'audio', 'packetsReceived', from) > 0;
    };
    await waitFor(async () => (await flowing(dave, erinId)) && (await flowing(erin, daveId)), { timeout: 30_000, what: 'media both ways' });
    await new Promise((r) => setTimeout(r, 2_000));
    for (const mode of ['ws', 'outage']) {
      const runs = [];
      for (let i = 0; i < RESUMES; i++) {
        const [dStart, eStart] = [await pageNow(dave), await pageNow(erin)];
        const wsRule = iptablesRules([['INPUT', '-p', 'tcp', '-d', FAULTY_ADDR, '--dport', new URL(server.url).port, '-j', 'REJECT', '--reject-with', 'tcp-reset']]);
        let media = null;
        let restoredDave;
        let restoredErin;
        try {
          if (mode === 'outage') {
            const ports = await mediaPorts(dave);
            if (ports.length !== 2) throw new Error(`dave's media ports: ${ports}`);
            media = iptablesRules(ports.flatMap((port) => [['OUTPUT', '-p', 'udp', '--sport', String(port), '-j', 'DROP'], ['OUTPUT', '-p', 'udp', '--dport', String(port), '-j', 'DROP']]));
          }
          // The next thing dave sends on its socket meets the reset.
          await dave.page.evaluate(() => window.__client._sendOn(window.__client._sess, { type: 'ping' }));
          await waitFor(async () => (await eventsSince(dave, dStart)).some((e) => e.t === 'disconnected'), { timeout: 15_000, what: 'dave to notice the reset' });
          if (mode === 'outage') await new Promise((r) => setTimeout(r, OUTAGE_MS));
        } finally {
          media?.remove();
          wsRule.remove();
          [restoredDave, restoredErin] = [await pageNow(dave), await pageNow(erin)];
        }
        await waitFor(async () => (await eventsSince(dave, restoredDave)).some((e) => e.t === 'reconnected'), { timeout: 20_000, what: `dave to reconnect (${mode} run ${i + 1})` });
        // Media after the fault: wait up to 10 s for both directions.
        await waitFor(
          async () => {
            const [d, e] = [await samplesSince(dave, restoredDave), await samplesSince(erin, restoredErin)];
            return firstGrowthAfter(d, restoredDave, 'audio', 'packetsReceived') !== null && firstGrowthAfter(e, restoredErin, 'audio', 'packetsReceived', daveId) !== null;
          },
          { timeout: 10_000, what: `media both ways after the fault (${mode} run ${i + 1})` },
        );
        await new Promise((r) => setTimeout(r, 1_000));
        const dEv = await eventsSince(dave, dStart);
        const eEv = await eventsSince(erin, eStart);
        const reconnected = dEv.find((e) => e.t === 'reconnected' && e.at >= restoredDave);
        const cut = dEv.find((e) => e.t === 'disconnected');
        const [dS, eS] = [await samplesSince(dave, dStart - 1000), await samplesSince(erin, eStart - 1000)];
        const eFault = eS.filter((s) => s.t >= restoredErin - (restoredDave - cut.at) - 500 && s.t <= restoredErin + 2000);
        const run = {
          resumed: reconnected.resumed === true,
          same_participant: (await dave.page.evaluate(() => window.__client.participantId)) === daveId,
          noticed_to_restored_ms: restoredDave - cut.at,
          restored_to_reconnected_ms: reconnected.at - restoredDave,
          restored_to_first_packet_ms: firstGrowthAfter(dS, restoredDave, 'audio', 'packetsReceived') - restoredDave,
          restored_to_first_packet_at_other_ms: firstGrowthAfter(eS, restoredErin, 'audio', 'packetsReceived', daveId) - restoredErin,
          own_longest_audio_stall_ms: longestStall(dS.filter((s) => s.t <= reconnected.at + 2000), 'audio', 'packetsReceived'),
          other_longest_video_freeze_ms: longestStall(eFault, 'video', 'framesDecoded', daveId),
          other_frames_decoded_across_fault: total(eFault.at(-1), 'video', 'framesDecoded', daveId) - total(eFault[0], 'video', 'framesDecoded', daveId),
          other_fault_window_ms: eFault.at(-1).t - eFault[0].t,
          other_events: eEv.filter((e) => e.t !== 'reconnecting').map((e) => e.t),
          own_events: dEv.map((e) => e.t),
          own_pairs_after: Object.fromEntries(Object.entries(await selectedPairs(dave)).map(([k, v]) => [k, v && `${v.local.protocol}:${v.local.port}`])),
        };
        runs.push(run);
        console.log(`resume (${mode}) run ${i + 1}: ${JSON.stringify(run)}`);
        if (!run.resumed || !run.same_participant) results.notes.push(`resume (${mode}) run ${i + 1} did not resume the session: ${JSON.stringify(run)}`);
        await new Promise((r) => setTimeout(r, 1_000));
      }
      const col = (k) => runs.map((r) => r[k]);
      const summary = {
        runs,
        resumed: runs.filter((r) => r.resumed && r.same_participant).length,
        restored_to_reconnected: stat(col('restored_to_reconnected_ms')),
        restored_to_first_packet: stat(col('restored_to_first_packet_ms')),
        restored_to_first_packet_at_other: stat(col('restored_to_first_packet_at_other_ms')),
        own_longest_audio_stall: stat(col('own_longest_audio_stall_ms')),
        other_longest_video_freeze: stat(col('other_longest_video_freeze_ms')),
        other_events: [...new Set(runs.flatMap((r) => r.other_events))],
      };
      results.resume[mode] = summary;
      const line = (k) => `p50 ${summary[k].p50.toFixed(0)}, p99 ${summary[k].p99.toFixed(0)} ms`;
      console.log(
        `resume (${mode}) over ${runs.length} runs, ${summary.resumed} resumed: network back → reconnected ${line('restored_to_reconnected')}; ` +
          `→ first media packet ${line('restored_to_first_packet')}; → other's first packet ${line('restored_to_first_packet_at_other')}; ` +
          `other's longest video freeze ${line('other_longest_video_freeze')}; other's events: ${summary.other_events.join(', ') || 'none'}`,
      );
    }
  } finally {
    await close(dave, erin);
  }
}

function markdown() {
  const r = results;
  const row = (name, s) => `| ${name} | ${s.n} | ${s.p50.toFixed(0)} | ${s.p99.toFixed(0)} | ${s.min.toFixed(0)} | ${s.max.toFixed(0)} |`;
  const out = [];
  out.push(`Chromium ${r.chromium}; load average before ${r.load_average_before.map((x) => x.toFixed(2)).join(' ')}, after ${r.load_average_after.map((x) => x.toFixed(2)).join(' ')}.`, '');
  out.push('### Join: `connect()` → first decoded remote video frame (ms)', '', '| path | joins | p50 | p99 | min | max |', '|---|---|---|---|---|---|');
  for (const [mode, s] of Object.entries(r.joins)) out.push(row(mode, s));
  out.push('');
  for (const [mode, s] of Object.entries(r.resume)) {
    out.push(`### Resume (${mode}): ${s.resumed}/${s.runs.length} runs resumed the same session`, '', '| from the network back to … (ms) | runs | p50 | p99 | min | max |', '|---|---|---|---|---|---|');
    out.push(row('`reconnected` (resumed)', s.restored_to_reconnected));
    out.push(row('its first media packet', s.restored_to_first_packet));
    out.push(row("the other's first packet from it", s.restored_to_first_packet_at_other));
    out.push(row('its longest audio stall (whole fault)', s.own_longest_audio_stall));
    out.push(row("the other's longest video freeze", s.other_longest_video_freeze));
    out.push('', `Frames the other decoded from it across the fault, per run: ${s.runs.map((x) => `${x.other_frames_decoded_across_fault} in ${(x.other_fault_window_ms / 1000).toFixed(1)} s`).join(', ')}.`);
    out.push(`Events the other saw: ${s.other_events.join(', ') || 'none'}.`, '');
  }
  if (r.notes.length) out.push('Notes:', '', ...r.notes.map((n) => `- ${n}`), '');
  return out.join('\n');
}

let server;
let resumeServer;
let turnServerPlaza;
let turn;
let block = null;
try {
  server = await startServer({ logName: 'plaza-netbench.log', port: PORT, udpPort: UDP_PORT, args: ['--tcp-port', String(UDP_PORT)] });
  await joinSeries('udp', server.url, { check: (pair) => (pair?.local?.protocol === 'udp' && pair.local.candidateType === 'host' ? null : 'not host UDP') });
  block = blockUdpToPlaza(UDP_PORT);
  try {
    await joinSeries('ice-tcp', server.url, { check: (pair) => (pair?.local?.protocol === 'tcp' && pair.remote?.protocol === 'tcp' ? null : 'not TCP') });
  } finally {
    block.remove();
  }
  turn = await startTurnServer({ secret: SECRET, ip: '127.0.0.2', port: 3478, logName: 'coturn-netbench.log' });
  turnServerPlaza = await startServer({
    logName: 'plaza-netbench-turn.log',
    port: TURN_PORT,
    udpPort: TURN_UDP_PORT,
    args: ['--workers', '1', '--tcp-port', 'off', ...turn.urls.flatMap((u) => ['--turn-url', u])],
    env: { PLAZA_TURN_SECRET: SECRET },
  });
  await joinSeries('turn', turnServerPlaza.url, { forceRelay: true, check: (pair) => (pair?.local?.candidateType === 'relay' ? null : 'not relayed') });
  await turnServerPlaza.stop();
  await turn.stop();
  await server.stop();
  // No ICE-TCP here: an outage of the participant's UDP must not be bridged by a TCP pair
  // (that is the ICE-TCP fallback, measured above).
  resumeServer = await startServer({
    logName: 'plaza-netbench-resume.log',
    port: RESUME_PORT,
    udpPort: RESUME_UDP_PORT,
    args: ['--bind', '0.0.0.0', '--tcp-port', 'off'],
  });
  await resumeSeries(resumeServer);
} finally {
  for (const p of open) await p.close();
  await resumeServer?.stop();
  await turnServerPlaza?.stop();
  await turn?.stop();
  await server?.stop();
}
results.load_average_after = loadavg();
const md = markdown();
console.log(`\n${md}`);
writeFileSync(join(ARTIFACTS, 'netbench.json'), JSON.stringify(results, null, 2));
writeFileSync(join(ARTIFACTS, 'netbench.md'), md);
console.log(`written ${join(ARTIFACTS, 'netbench.json')} and netbench.md`);
