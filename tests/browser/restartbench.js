// ICE restart after an address change, measured over repeated runs (printed, written to
// target/browser/restartbench.json; never asserted beyond "it worked"). A Chromium "mover" in a
// network namespace of its own (see harness.js moverNamespace) publishes to and receives from a
// Chromium "stayer"; each run moves it to the other of two addresses (10.20.0.2 ⇄ 10.20.0.3)
// and measures, from the move:
//   - when Chromium reports its ICE `disconnected` (its own detection of the dead path),
//   - when plaza-client starts the ICE restart (after its WebSocket probe found the socket dead
//     and resumed the session on a new one),
//   - when the stayer decodes a new frame from the mover again (sampled every 50 ms),
// so "restart → media" is what Plaza and the restart cost, and the rest is detection.
// RESTARTS runs (default 10), each bounded. Run with scripts/browser-tests.sh --netbench-only.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { loadavg } from 'node:os';
import { ARTIFACTS, startServer, launchParticipant, joinViaUrl, waitFor, waitForMediaFrom, percentile, loopbackOnly, moverNamespace } from './harness.js';

const RESTARTS = Number(process.env.RESTARTS ?? 10);
const PORT = 7970;
const UDP_PORT = 7972;
const HOST_IP = '10.20.0.1';
const ADDRS = ['10.20.0.2', '10.20.0.3'];

if (!loopbackOnly()) throw new Error('run in a loopback-only network namespace (scripts/browser-tests.sh --netbench-only): this creates namespaces and links');

const stat = (xs) => {
  const v = xs.filter(Number.isFinite);
  return { n: v.length, p50: percentile(v, 0.5), p99: percentile(v, 0.99), min: Math.min(...v), max: Math.max(...v) };
};

const net = moverNamespace({ hostIp: HOST_IP, first: ADDRS[0] });
const open = [];
let server;
const results = { load_average_before: loadavg(), runs: [] };
try {
  server = await startServer({
    logName: 'plaza-restartbench.log',
    port: PORT,
    udpPort: UDP_PORT,
    args: ['--bind', '0.0.0.0', '--udp-bind', '0.0.0.0', '--announce-ip', HOST_IP, '--tcp-port', 'off', '--workers', '1'],
  });
  const mover = await launchParticipant('mover', {
    executablePath: net.executablePath,
    extraArgs: [`--unsafely-treat-insecure-origin-as-secure=http://${HOST_IP}:${PORT}`],
  });
  open.push(mover);
  const stayer = await launchParticipant('stayer');
  open.push(stayer);
  results.chromium = mover.browser.version();
  const room = `restartbench-${Date.now()}`;
  await joinViaUrl(mover, `http://${HOST_IP}:${PORT}`, room, 'mover');
  await joinViaUrl(stayer, `http://127.0.0.1:${PORT}`, room, 'stayer');
  await Promise.all([waitForMediaFrom(mover, 'stayer'), waitForMediaFrom(stayer, 'mover')]);
  await mover.page.evaluate(() => {
    window.__events = [];
    for (const t of ['icestatechange', 'icerestart', 'reconnected']) {
      window.plaza.client.on(t, (d) => window.__events.push({ t, at: performance.now(), target: d?.target, state: d?.state, resumed: d?.resumed }));
    }
  });
  // The stayer counts decoded frames from the mover every 50 ms, in page time.
  await stayer.page.evaluate(() => {
    window.__frames = [];
    setInterval(async () => {
      const c = window.plaza.client;
      for (const [id, rt] of c.remoteTracks) {
        if (rt.kind !== 'video' || c.participants.get(rt.participantId)?.name !== 'mover') continue;
        const s = await c.getTrackStats(id);
        window.__frames.push({ at: performance.now(), frames: s?.framesDecoded ?? 0 });
      }
    }, 50);
  });
  for (let i = 0; i < RESTARTS; i++) {
    const [mAt, sAt] = [await mover.page.evaluate(() => performance.now()), await stayer.page.evaluate(() => performance.now())];
    const before = await stayer.page.evaluate(() => window.__frames.at(-1)?.frames ?? 0);
    net.moveTo(ADDRS[(i + 1) % 2]);
    await waitFor(() => mover.page.evaluate((t) => window.__events.some((e) => e.t === 'icerestart' && e.at >= t), mAt), {
      timeout: 40_000,
      what: `run ${i + 1}: the ICE restart`,
    });
    await waitFor(() => stayer.page.evaluate(({ t, before }) => window.__frames.some((f) => f.at >= t && f.frames > before + 15), { t: sAt, before }), {
      timeout: 30_000,
      what: `run ${i + 1}: frames from the mover again`,
    });
    const ev = await mover.page.evaluate((t) => window.__events.filter((e) => e.at >= t), mAt);
    const frames = await stayer.page.evaluate((t) => window.__frames.filter((f) => f.at >= t), sAt - 1000);
    // The freeze: the longest stretch without a new frame; frames again: its end.
    let freeze = 0;
    let again = null;
    for (let k = 1, still = frames[0].at; k < frames.length; k++) {
      if (frames[k].frames > frames[k - 1].frames) {
        if (frames[k].at - still > freeze) {
          freeze = frames[k].at - still;
          again = frames[k].at - sAt;
        }
        still = frames[k].at;
      }
    }
    const first = (pred) => ev.find(pred)?.at - mAt;
    const run = {
      to: net.address(),
      chromium_disconnected_ms: first((e) => e.t === 'icestatechange' && e.state === 'disconnected'),
      restart_ms: first((e) => e.t === 'icerestart'),
      resumed_ms: first((e) => e.t === 'reconnected' && e.resumed),
      frames_again_ms: again,
      freeze_ms: freeze,
    };
    run.restart_to_frames_ms = run.frames_again_ms - run.restart_ms;
    results.runs.push(run);
    console.log(`run ${i + 1}: ${JSON.stringify(run)}`);
    // Let the connection settle before the next move.
    await new Promise((r) => setTimeout(r, 2_000));
  }
} finally {
  for (const p of open) await p.close();
  await server?.stop();
  net.remove();
}
results.load_average_after = loadavg();
const col = (k) => results.runs.map((r) => r[k]);
results.summary = Object.fromEntries(
  ['chromium_disconnected_ms', 'restart_ms', 'resumed_ms', 'frames_again_ms', 'restart_to_frames_ms', 'freeze_ms'].map((k) => [k, stat(col(k))]),
);
const lines = ['| from the move (ms) | runs | p50 | p99 | min | max |', '|---|---|---|---|---|---|'];
for (const [k, s] of Object.entries(results.summary)) lines.push(`| ${k} | ${s.n} | ${s.p50.toFixed(0)} | ${s.p99.toFixed(0)} | ${s.min.toFixed(0)} | ${s.max.toFixed(0)} |`);
console.log(`\nChromium ${results.chromium}; load average before ${results.load_average_before.map((x) => x.toFixed(2)).join(' ')}, after ${results.load_average_after.map((x) => x.toFixed(2)).join(' ')}\n${lines.join('\n')}`);
writeFileSync(join(ARTIFACTS, 'restartbench.json'), JSON.stringify(results, null, 2));
