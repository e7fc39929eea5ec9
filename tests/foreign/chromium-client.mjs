// A Plaza participant in headless Chromium: the demo page (signaling/demo.js with
// plaza-client.js), which joins from its URL and publishes the fake camera and microphone
// (simulcast VP8 + Opus). Driven with playwright-core; same options and RESULT line as the other
// clients:
//
//   node chromium-client.mjs --url ws://H:P/rtc --room R --name N [--publish] [--expect-from NAME]
//                            [--peer NAME] [--until-signal] [--media-only] [--timeout S]
//
// The page always publishes (that is what the demo does); --publish only selects the publisher's
// success rule: audio and video sent (getPublishStats) and `done` from --peer. With
// --expect-from NAME it waits until Chromium decodes NAME's video (framesDecoded, frameWidth) and
// receives its audio (packets, samples) and chat, then sends `done`. CHROMIUM names the browser
// binary (default /usr/bin/chromium).
import { chromium } from 'playwright-core';

const args = { timeout: 25 };
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i];
  if (a === '--publish') args.publish = true;
  else if (a === '--until-signal') args.until_signal = true;
  else if (a === '--media-only') args.media_only = true;
  else args[a.replace(/^--/, '').replace(/-/g, '_')] = process.argv[++i];
}
for (const k of ['url', 'room', 'name']) if (!args[k]) throw new Error(`--${k} is required`);

const t0 = Date.now();
const log = (...m) => console.error(`[chromium ${args.name} +${((Date.now() - t0) / 1000).toFixed(2)}s]`, ...m);
const result = { client: 'chromium', name: args.name, errors: [], tracks: {}, chat_from: [], sent: {} };
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
process.on('SIGTERM', () => {
  const ok = args.publish && result.sent.audio > 0 && result.sent.video > 0 && (!args.peer || chatFrom(args.peer));
  finish(ok, `stopped by SIGTERM: ${JSON.stringify(result)}`);
});

const chatFrom = (name, body) => result.chat_from.some((c) => (body ? c === `${name}:${body}` : c.startsWith(`${name}:`)));

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
  '--use-fake-device-for-media-stream',
  '--use-fake-ui-for-media-stream',
  '--autoplay-policy=no-user-gesture-required',
  // without camera permission host candidates hide behind mDNS names, which the namespace
  // cannot resolve
  '--disable-features=WebRtcHideLocalIpsWithMdns',
];

try {
  browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium', headless: true, args: CHROMIUM_ARGS });
  const page = await (await browser.newContext()).newPage();
  page.on('pageerror', (e) => log('pageerror', e.message));
  const base = args.url.replace(/^ws/, 'http').replace(/\/rtc$/, '');
  await page.goto(`${base}/?room=${encodeURIComponent(args.room)}&name=${encodeURIComponent(args.name)}`);
  await page.waitForSelector('#call:not([hidden])', { timeout: 15_000 });
  log('joined');
  await page.evaluate((name) => {
    const c = window.plaza.client;
    window.__chat = [];
    c.on('chat', ({ participant, text }) => window.__chat.push(`${participant?.name ?? '?'}:${text}`));
    setInterval(() => {
      try {
        c.sendChat(`hello from ${name}`);
      } catch {}
    }, 400);
  }, args.name);
  let doneSent = false;
  for (;;) {
    const s = await page.evaluate(async () => {
      const c = window.plaza.client;
      const tracks = [];
      for (const [id, rt] of c.remoteTracks) {
        const st = await c.getTrackStats(id);
        tracks.push({ id, from: c.participants.get(rt.participantId)?.name ?? null, kind: rt.kind, ...(st ?? {}) });
      }
      const sent = {};
      for (const p of await c.getPublishStats()) sent[p.kind] = (sent[p.kind] ?? 0) + (p.bytesSent ?? 0);
      return { tracks, sent, chat: window.__chat };
    });
    result.tracks = Object.fromEntries(
      s.tracks.map((t) => [t.id, { from: t.from, kind: t.kind, packets: t.packetsReceived, frames: t.framesDecoded, width: t.frameWidth, samples: t.totalSamplesReceived }]),
    );
    result.sent = s.sent;
    result.chat_from = [...new Set(s.chat)];
    if (args.expect_from) {
      const mine = Object.values(result.tracks).filter((t) => t.from === args.expect_from);
      const v = mine.filter((t) => t.kind === 'video');
      const a = mine.filter((t) => t.kind === 'audio');
      const ok = v.length === 1 && a.length === 1 && v[0].frames >= 20 && v[0].width > 0 && a[0].packets >= 50 && a[0].samples > 0;
      if (ok && (args.media_only || chatFrom(args.expect_from)) && !doneSent) {
        doneSent = true;
        await page.evaluate(() => window.plaza.client.sendChat('done')).catch(() => {});
        await new Promise((r) => setTimeout(r, 300));
        await finish(true, `decoded media and chat from ${args.expect_from}`);
      }
    } else if (args.publish && !args.until_signal) {
      if (result.sent.audio > 0 && result.sent.video > 0 && (!args.peer || chatFrom(args.peer, 'done'))) {
        await finish(true, `sent audio and video; ${args.peer ?? 'nobody'} said done`);
      }
    }
    await new Promise((r) => setTimeout(r, 250));
  }
} catch (e) {
  await finish(false, `${e.stack ?? e}`);
}
