// Measurements in Chromium and Firefox on loopback (printed, never asserted):
//  1. join: from the click on "Join" to the first remote video frame presented
//     (requestVideoFrameCallback on the remote <video>), over JOINS joins (default 10);
//  1b. the same for Firefox and Chromium joiners taking turns in one run, BROWSER_JOINS each
//     (default 5), with each joiner's ICE timings: from its connection's ICE state 'checking'
//     (its first connectivity check) to 'connected' (the nominated pair succeeded);
//  2. quality switch: from selecting "high" (after "low") in the quality menu to the first
//     getStats sample (polled every 20 ms) whose decoded frameWidth is 1280, over SWITCHES runs.
// Run through scripts/browser-tests.sh --bench (loopback-only namespace). Writes
// target/browser/bench.json.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  ARTIFACTS,
  startServer,
  launchParticipant,
  launchFirefoxParticipant,
  joinViaUrl,
  recordIceTimes,
  waitFor,
  waitForMediaFrom,
  percentile,
} from './harness.js';

const JOINS = Number(process.env.JOINS ?? 10);
const BROWSER_JOINS = Number(process.env.BROWSER_JOINS ?? 5);
const SWITCHES = Number(process.env.SWITCHES ?? 5);
const fmt = (xs) => xs.map((x) => (Number.isFinite(x) ? x.toFixed(0) : String(x))).join(', ');

const server = await startServer();
const results = { chromium: null, load_average: null, joins_ms: [], join_p50_ms: null, switch_low_to_high_ms: [], switch_p50_ms: null, notes: [] };
const publisher = await launchParticipant('publisher');
const viewer = await launchParticipant('viewer');
try {
  results.chromium = publisher.browser.version();
  const room = `bench-${Date.now()}`;
  await joinViaUrl(publisher, server.url, room, 'publisher');

  // 1. join click → first remote frame, JOINS times (a fresh page load each time).
  for (let i = 0; i < JOINS; i++) {
    await viewer.page.goto(`${server.url}/`);
    await viewer.page.fill('#room', room);
    await viewer.page.fill('#name', `viewer-${i}`);
    await viewer.page.click('#join');
    const t = await waitFor(
      () =>
        viewer.page.evaluate(() => {
          const { joinClick, joined, subscriberConnected, firstTrack, firstFrame } = window.plaza.times;
          const since = (t) => (t === null ? NaN : t - joinClick);
          return firstFrame !== null ? { frame: since(firstFrame), joined: since(joined), connected: since(subscriberConnected), track: since(firstTrack) } : null;
        }),
      { timeout: 20_000, interval: 50, what: `first remote frame (join ${i + 1})` },
    );
    results.joins_ms.push(t.frame);
    (results.joined_ms ??= []).push(t.joined);
    (results.video_track_ms ??= []).push(t.track);
    (results.subscriber_connected_ms ??= []).push(t.connected);
  }
  results.join_p50_ms = percentile(results.joins_ms, 0.5);
  console.log(`join click → first remote frame, ${JOINS} joins (ms): ${fmt(results.joins_ms)}`);
  console.log(`  p50 ${results.join_p50_ms.toFixed(0)} ms, max ${Math.max(...results.joins_ms).toFixed(0)} ms`);
  const p50 = (xs) => percentile(xs.filter(Number.isFinite), 0.5).toFixed(0);
  console.log(
    `  milestones, p50 from the click: joined ${p50(results.joined_ms)} ms, remote video track added ${p50(results.video_track_ms)} ms, ` +
      `subscriber connection connected ${p50(results.subscriber_connected_ms)} ms, first frame ${p50(results.joins_ms)} ms`,
  );

  // 1b. Firefox vs Chromium joiners, taking turns (same publisher, same room, same load).
  const fox = await launchFirefoxParticipant('firefox-viewer');
  try {
    results.firefox = await fox.browser.version();
    const joiners = { firefox: fox, chromium: viewer };
    for (const p of Object.values(joiners)) await p.page.addInitScript(recordIceTimes);
    const by = (results.browser_joins = { firefox: [], chromium: [] });
    for (let i = 0; i < BROWSER_JOINS; i++) {
      for (const [kind, p] of Object.entries(joiners)) {
        await p.page.goto(`${server.url}/`);
        await p.page.fill('#room', room);
        await p.page.fill('#name', `${kind}-${i}`);
        await p.page.click('#join');
        const t = await waitFor(
          () =>
            p.page.evaluate(() => {
              const { joinClick, subscriberConnected, firstFrame } = window.plaza.times;
              const sub = window.__ice.find((r) => r.role === 'subscriber');
              const pub = window.__ice.find((r) => r.role === 'publisher');
              if (firstFrame === null || !sub || !pub) return null;
              return {
                frame: firstFrame - joinClick,
                connected: subscriberConnected - joinClick,
                sub_checking_to_connected: sub.connected - sub.checking,
                pub_checking_to_connected: pub.connected - pub.checking,
              };
            }),
          { timeout: 20_000, interval: 50, what: `${kind}: first remote frame and both connections connected (join ${i + 1})` },
        );
        by[kind].push(t);
      }
    }
    for (const [kind, xs] of Object.entries(by)) {
      const col = (k) => xs.map((x) => x[k]);
      const p50 = (k) => percentile(col(k), 0.5).toFixed(0);
      results[`${kind}_join_p50_ms`] = percentile(col('frame'), 0.5);
      console.log(`${kind} join click → first remote frame, ${xs.length} joins (ms): ${fmt(col('frame'))}; p50 ${p50('frame')} ms`);
      console.log(
        `  ICE checking → connected (ms): subscriber ${fmt(col('sub_checking_to_connected'))} (p50 ${p50('sub_checking_to_connected')}), ` +
          `publisher ${fmt(col('pub_checking_to_connected'))} (p50 ${p50('pub_checking_to_connected')})`,
      );
    }
  } finally {
    await fox.close();
  }

  // 2. quality low → high. First let the publisher's bandwidth estimate ramp up until it sends
  //    its 1280 wide layer to a viewer that wants it, as a user's would after a while.
  const layerWidths = async () =>
    (await publisher.page.evaluate(() => window.plaza.client.getPublishStats()))
      .filter((l) => l.kind === 'video')
      .map((l) => ({ rid: l.rid, active: l.active, width: l.frameWidth }));
  const t0 = Date.now();
  await joinViaUrl(viewer, server.url, room, 'switcher', '&quality=high');
  await waitForMediaFrom(viewer, 'publisher');
  const width = () => viewer.page.evaluate(async () => {
    const c = window.plaza.client;
    const v = [...c.remoteTracks.values()].find((t) => t.kind === 'video');
    return v ? ((await c.getTrackStats(v.trackId))?.frameWidth ?? 0) : 0;
  });
  const reached = await waitFor(async () => (await width()) === 1280, { timeout: 60_000, interval: 250, what: 'the viewer to decode 1280 wide with quality=high' }).then(
    () => true,
    async (e) => {
      const layers = (await layerWidths()).map((l) => `${l.rid}:${l.active ? '' : 'paused,'}${l.width}w`).join(' ');
      const note = `quality switch not measurable: ${e.message}; publisher sends ${layers}`;
      results.notes.push(note);
      console.log(note);
      return false;
    },
  );
  results.first_1280_after_ms = reached ? Date.now() - t0 : null;
  const setQuality = (q) => viewer.page.selectOption('#quality', q);
  for (let i = 0; reached && i < SWITCHES; i++) {
    await setQuality('low');
    await waitFor(async () => (await width()) === 320, { timeout: 15_000, what: 'decoded width 320 with quality=low' });
    // Steady state at "low": the server has paused the unused layers upstream (dynacast), if it does.
    const paused = await waitFor(async () => (await layerWidths()).find((l) => l.rid === 'f')?.active === false, {
      timeout: 10_000,
      interval: 200,
      what: 'f paused',
    }).then(
      () => true,
      () => false,
    );
    const r = await viewer.page.evaluate(async () => {
      const c = window.plaza.client;
      const select = document.querySelector('#quality');
      const v = [...c.remoteTracks.values()].find((t) => t.kind === 'video');
      const start = performance.now();
      select.value = 'high';
      select.dispatchEvent(new Event('change'));
      let last = 0;
      while (performance.now() - start < 15_000) {
        last = (await c.getTrackStats(v.trackId))?.frameWidth ?? 0;
        if (last === 1280) return { ms: performance.now() - start };
        await new Promise((res) => setTimeout(res, 20));
      }
      return { error: `never got 1280 wide with quality=high within 15 s (last ${last})` };
    });
    if (r.error) {
      results.notes.push(r.error);
      console.log(`quality switch ${i + 1}: ${r.error}`);
      continue;
    }
    results.switch_low_to_high_ms.push(r.ms);
    results.switch_f_was_paused = [...(results.switch_f_was_paused ?? []), paused];
    await setQuality('high');
  }
  if (results.switch_low_to_high_ms.length) {
    results.switch_p50_ms = percentile(results.switch_low_to_high_ms, 0.5);
    console.log(`quality low → high until decoded width 1280 (ms): ${fmt(results.switch_low_to_high_ms)}; p50 ${results.switch_p50_ms.toFixed(0)} ms`);
    console.log(`  (f layer paused upstream before the switch: ${results.switch_f_was_paused.join(', ')}; first 1280 wide frame ${results.first_1280_after_ms} ms after the switcher joined)`);
  }
} finally {
  await viewer.close();
  await publisher.close();
  await server.stop();
}
results.load_average = (await import('node:os')).loadavg();
console.log(`load average during the run: ${results.load_average.map((x) => x.toFixed(1)).join(' ')} (2 cores shared)`);
writeFileSync(join(ARTIFACTS, 'bench.json'), JSON.stringify(results, null, 2));
console.log(`written ${join(ARTIFACTS, 'bench.json')}`);
