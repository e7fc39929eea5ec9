// A WHEP viewer in headless Chromium: the server's player page (/watch, signaling/watch.html
// with watch.js), which fetches its own development token (subscribe grant), POSTs a recvonly
// offer to /whep/{room} and plays the answer in a <video>. Driven with playwright-core; same
// RESULT line as the other WHEP viewers:
//
//   node chromium-watch.mjs --page http://H:P/watch?room=R [--name N] [--timeout S]
//
// Passes when the page's `window.watch` shows a session (the POST's Location), at least 20
// decoded video frames with a width, and at least 50 audio packets; it then ends the session
// (watch.stop(), which DELETEs it) and checks that the page says `ended` and the DELETE got 200. For the runner's
// join-time numbers it reports CLOCK_MONOTONIC seconds, as Python's time.monotonic() counts
// them: `post_mono` (the page's POST) and, for the video track, `first_mono` (the page's first
// shown frame, from requestVideoFrameCallback). The page stamps performance.now(), a monotonic
// clock too; each stamp is moved onto this process's CLOCK_MONOTONIC (process.hrtime, libuv)
// by reading performance.now() and hrtime together (error: half an evaluate() round trip).
// CHROMIUM names the browser binary (default /usr/bin/chromium).
import { chromium } from 'playwright-core';

const args = { timeout: 25, name: 'chromium-watch' };
for (let i = 2; i < process.argv.length; i++) args[process.argv[i].replace(/^--/, '').replace(/-/g, '_')] = process.argv[++i];
if (!args.page) throw new Error('--page is required');

const t0 = Date.now();
const log = (...m) => console.error(`[chromium-watch +${((Date.now() - t0) / 1000).toFixed(2)}s]`, ...m);
const monoNow = () => Number(process.hrtime.bigint()) / 1e9;
const result = { client: 'chromium-watch', name: args.name, tracks: {}, states: [] };
let finished = false;
let browser = null;

async function finish(ok, why) {
  if (finished) return;
  finished = true;
  result.ok = ok;
  result.reason = why;
  log(ok ? 'PASS' : 'FAIL', why);
  console.log('RESULT ' + JSON.stringify(result));
  const closing = browser?.close().catch(() => {});
  await Promise.race([closing, new Promise((r) => setTimeout(r, 3000))]);
  process.exit(ok ? 0 : 1);
}
setTimeout(() => finish(false, `timed out after ${args.timeout} s: ${JSON.stringify(result)}`), Number(args.timeout) * 1000);
process.on('SIGTERM', () => finish(false, `stopped by SIGTERM before it was satisfied: ${JSON.stringify(result)}`));

// As chromium-client.mjs: the namespace's only non-loopback address is on a veth, and host
// candidates must be plain addresses (no mDNS names, which nothing here resolves).
const CHROMIUM_ARGS = [
  '--headless=new',
  '--no-sandbox',
  '--disable-gpu',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-renderer-backgrounding',
  '--disable-background-timer-throttling',
  '--allow-loopback-in-peer-connection',
  '--autoplay-policy=no-user-gesture-required',
  '--disable-features=WebRtcHideLocalIpsWithMdns',
];

/** The page's player state, with its performance.now() stamps moved to CLOCK_MONOTONIC. */
async function sample(page) {
  const before = monoNow();
  const s = await page.evaluate(() => {
    const w = window.watch;
    if (!w) return null;
    return {
      now: performance.now(),
      state: w.state,
      error: w.error,
      session: w.session,
      frames: w.framesDecoded,
      width: w.frameWidth,
      height: w.frameHeight,
      audio: w.audioPacketsReceived,
      posts: w.posts,
      times: { ...w.times },
    };
  });
  const after = monoNow();
  if (!s) return null;
  const at = (before + after) / 2;
  s.mono = (ms) => (ms == null ? null : at - (s.now - ms) / 1000);
  return s;
}

try {
  browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium', headless: true, args: CHROMIUM_ARGS });
  const page = await (await browser.newContext()).newPage();
  page.on('pageerror', (e) => log('pageerror', e.message));
  page.on('console', (m) => m.type() === 'error' && log('console', m.text()));
  log('opening', args.page);
  const res = await page.goto(args.page);
  if (!res || res.status() !== 200) throw new Error(`GET ${args.page}: ${res?.status()}`);
  await page.waitForFunction(() => window.watch, null, { timeout: 10_000 });
  for (;;) {
    const s = await sample(page);
    if (s.state !== result.states.at(-1)) {
      result.states.push(s.state);
      log('state', s.state, s.error ?? '');
    }
    if (s.state === 'error') {
      // the page retries by itself; a request it will not retry (4xx) ends here
      result.error = s.error;
    }
    if (s.session && s.session !== result.session) {
      result.session = s.session;
      result.post_mono = s.mono(s.times.post);
      result.answer_ms = s.times.answer != null ? Math.round(s.times.answer - s.times.post) : null;
      log('WHEP session', s.session, `answered in ${result.answer_ms} ms`);
    }
    result.posts = s.posts;
    result.tracks.video = { kind: 'video', frames: s.frames, width: s.width, height: s.height };
    result.tracks.audio = { kind: 'audio', packets: s.audio };
    if (s.times.firstFrame != null) {
      result.tracks.video.first_mono = s.mono(s.times.firstFrame);
      // this session's POST (the page may have posted again after an error)
      result.post_mono = s.mono(s.times.post);
      result.first_media_ms = Math.round(s.times.firstFrame - s.times.post);
    }
    if (s.session && s.frames >= 20 && s.width > 0 && s.audio >= 50) {
      log(`decoded ${s.frames} frames ${s.width}x${s.height}, ${s.audio} audio packets; stopping`);
      // watch.stop() DELETEs the session without waiting for the answer: see it here
      const session = s.session;
      const deleted = page
        .waitForResponse((r) => r.request().method() === 'DELETE' && r.url() === session, { timeout: 5000 })
        .then((r) => r.status(), () => null);
      const ended = await page.evaluate(() => {
        window.watch.stop();
        return window.watch.state;
      });
      if (ended !== 'ended') await finish(false, `watch.stop() left the page in state ${ended}`);
      result.delete_status = await deleted;
      if (result.delete_status !== 200) await finish(false, `DELETE ${session}: ${result.delete_status ?? 'no response within 5 s'}`);
      await finish(
        true,
        `played the room: ${s.frames} frames ${s.width}x${s.height}, ${s.audio} audio packets ` +
          `(201, first frame ${result.first_media_ms} ms after the POST, DELETE 200)`,
      );
    }
    await new Promise((r) => setTimeout(r, 100));
  }
} catch (e) {
  await finish(false, `${e.stack ?? e}`);
}
