// Firefox in Plaza rooms: with Chromium, publishing simulcast, restarting ICE, with another Firefox,
// and subscribed to a webrtc-rs publisher (the load tester) whose frames leave as segmented runs.
// Firefox (Debian firefox-esr) is driven over WebDriver BiDi by puppeteer-core, Chromium by
// playwright-core. Run with scripts/browser-tests.sh (loopback-only network namespace with a
// default route over lo, which Firefox needs to gather candidates; server started here).
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import {
  ARTIFACTS,
  REPO,
  startServer,
  launchParticipant,
  launchFirefoxParticipant,
  joinViaForm,
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
const open = new Set();

async function track(launch) {
  const p = await launch;
  open.add(p);
  return p;
}

async function closeAll() {
  const all = [...open];
  open.clear();
  for (const p of all) {
    if (process.env.SHOW_BROWSER_LOGS) console.log(p.logs.join('\n'));
  }
  await Promise.all(all.map((p) => p.close()));
}

/** Video layers a page publishes: [{rid, active, frameWidth}]. */
async function publishedLayers(p) {
  const all = await p.page.evaluate(() => window.plaza.client.getPublishStats());
  return all.filter((l) => l.kind === 'video').map((l) => ({ rid: l.rid, active: l.active, frameWidth: l.frameWidth }));
}

before(async () => {
  if (!loopbackOnly()) console.warn('warning: not in a loopback-only network namespace (run scripts/browser-tests.sh)');
  server = await startServer({ logName: 'plaza-firefox.log' });
});

after(async () => {
  await closeAll();
  await server?.stop();
});

describe('Firefox', { timeout: 300_000 }, () => {
  // Browsers are reused across the tests (each test joins a room of its own by loading the page
  // again); the first test launches them all at once.
  let fox;
  let fox2;
  let chrome;
  let chrome2;

  before(async () => {
    [fox, fox2, chrome, chrome2] = await Promise.all([
      track(launchFirefoxParticipant('firefox')),
      track(launchFirefoxParticipant('firefox-2')),
      track(launchParticipant('chromium')),
      track(launchParticipant('chromium-2')),
    ]);
    console.log(`# ${await fox.browser.version()}, chromium ${chrome.browser.version()}`);
  });

  it('Firefox and Chromium in one room decode each other\'s video, receive audio and chat', async () => {
    const room = `ff-cr-${Date.now()}`;
    await joinViaForm(fox, server.url, room, 'fox');
    await joinViaForm(chrome, server.url, room, 'chrome');
    const [fc, cf] = await Promise.all([waitForMediaFrom(fox, 'chrome'), waitForMediaFrom(chrome, 'fox')]);
    console.log(`# firefox receives chromium at ${fc.v.frameWidth}x${fc.v.frameHeight}, chromium receives firefox at ${cf.v.frameWidth}x${cf.v.frameHeight}`);
    assert.deepEqual(await gridNames(fox), ['chrome']);
    assert.deepEqual(await gridNames(chrome), ['fox']);
    await sendChat(fox, 'hello from firefox ✓');
    await waitForChat(chrome, 'fox', 'hello from firefox ✓');
    await sendChat(chrome, 'hello from chromium ✓');
    await waitForChat(fox, 'chrome', 'hello from chromium ✓');
    await fox.page.screenshot({ path: join(ARTIFACTS, 'firefox-with-chromium.png') });
  });

  it('Firefox publishes simulcast: a quality=low Chromium viewer decodes the 320 wide layer, another a larger one', async () => {
    const room = `ff-simulcast-${Date.now()}`;
    await joinViaUrl(fox, server.url, room, 'fox');
    await Promise.all([joinViaUrl(chrome, server.url, room, 'low', '&quality=low'), joinViaUrl(chrome2, server.url, room, 'high', '&quality=high')]);
    await Promise.all([waitForMediaFrom(chrome, 'fox'), waitForMediaFrom(chrome2, 'fox')]);
    // Firefox starts with the low layer and adds the larger ones as its bandwidth estimate grows.
    await waitFor(async () => (await publishedLayers(fox)).filter((l) => l.frameWidth > 0).length >= 2, {
      timeout: 30_000,
      what: 'Firefox to send at least two simulcast layers',
    });
    const describeLayers = async () =>
      (await publishedLayers(fox)).map((l) => `${l.rid}:${l.active === false ? 'paused,' : ''}${l.frameWidth}w`).join(' ');
    let low = 0;
    await waitFor(
      async () => {
        low = await decodedWidth(chrome, 'fox');
        return low === 320;
      },
      { timeout: 30_000, what: 'the quality=low viewer to decode 320 wide video' },
    ).catch(async (e) => {
      throw new Error(`${e.message}; decoded width was ${low}; Firefox sends ${await describeLayers()}`);
    });
    let high = 0;
    await waitFor(
      async () => {
        high = await decodedWidth(chrome2, 'fox');
        return high > 320;
      },
      { timeout: 45_000, what: 'the quality=high viewer to decode wider video than 320' },
    ).catch(async (e) => {
      throw new Error(`${e.message}; decoded width was ${high}; Firefox sends ${await describeLayers()}`);
    });
    // The low viewer still gets the low layer (Firefox's own 'q' encoding) while the other gets more.
    const layers = await publishedLayers(fox);
    assert.equal(layers.find((l) => l.rid === 'q')?.frameWidth, 320, `Firefox's q layer is 320 wide (sends ${await describeLayers()})`);
    assert.ok(layers.some((l) => l.rid !== 'q' && l.frameWidth === high), `the quality=high viewer's ${high} is one of Firefox's layers`);
    assert.equal(await decodedWidth(chrome, 'fox'), 320);
    console.log(`# Firefox sends ${await describeLayers()}; quality=low viewer decodes ${low} wide, quality=high viewer ${high} wide`);
  });

  it('Firefox restarts ICE on both connections and stays in the room: media and chat go on', async () => {
    const room = `ff-restart-${Date.now()}`;
    await joinViaUrl(fox, server.url, room, 'fox');
    await joinViaUrl(chrome, server.url, room, 'chrome');
    await Promise.all([waitForMediaFrom(fox, 'chrome'), waitForMediaFrom(chrome, 'fox')]);
    for (const p of [fox, chrome]) {
      await p.page.evaluate(() => {
        window.__events = [];
        for (const t of ['icestatechange', 'icerestart', 'participantleft', 'participantjoined', 'trackunpublished']) {
          window.plaza.client.on(t, (d) => window.__events.push({ t, target: d?.target, state: d?.state }));
        }
      });
    }
    const stats = async () => (await (await fetch(`${server.url}/stats`)).json()).ice_restarts;
    const before = await stats();
    const foxId = await fox.page.evaluate(() => window.plaza.client.participantId);
    await fox.page.evaluate(() => window.plaza.client.restartIce('both', 'test'));
    await waitFor(async () => (await stats()) >= before + 2, { timeout: 15_000, what: 'the server to restart ICE on both of Firefox\'s connections' });
    // Firefox checks the new credentials and connects again on both.
    await waitFor(
      () =>
        fox.page.evaluate(() => {
          const c = window.plaza.client;
          const s = c._sess;
          return c.iceRestarts.publisher > 0 && c.iceRestarts.subscriber > 0 && ['connected', 'completed'].includes(s?.pub?.iceConnectionState) && ['connected', 'completed'].includes(s?.sub?.iceConnectionState);
        }),
      { timeout: 15_000, what: 'Firefox to connect again after its ICE restarts' },
    );
    await Promise.all([waitForMediaFrom(fox, 'chrome'), waitForMediaFrom(chrome, 'fox')]);
    // Chat to Firefox travels on its restarted subscriber connection (SCTP on the new pair).
    await sendChat(chrome, 'after the restart');
    await waitForChat(fox, 'chrome', 'after the restart');
    await sendChat(fox, 'restarted fine');
    await waitForChat(chrome, 'fox', 'restarted fine');
    assert.equal(await fox.page.evaluate(() => window.plaza.client.participantId), foxId);
    const seen = await chrome.page.evaluate(() => window.__events.filter((e) => e.t !== 'icestatechange'));
    assert.deepEqual(seen, [], 'chromium saw no leave, join or unpublish');
    const foxStates = await fox.page.evaluate(() => window.__events.filter((e) => e.t === 'icestatechange').map((e) => `${e.target}:${e.state}`));
    console.log(`# Firefox ICE states across its restart: ${foxStates.join(', ')}`);
  });

  it('Firefox decodes a webrtc-rs publisher whose frames leave Plaza as segmented runs', async () => {
    // The load tester's publisher writes each frame's packets back to back (browsers pace
    // theirs), so the server reads several per turn and sends each subscriber its copies as
    // one UDP_SEGMENT message, which the kernel cuts into datagrams on the way. Firefox, the
    // only subscriber, must decode what arrives so.
    const plazaBin = process.env.PLAZA_BIN ?? join(REPO, 'target', 'release', 'plaza');
    const loadtest = join(dirname(plazaBin), 'examples', 'loadtest');
    assert.ok(existsSync(loadtest), `${loadtest} is missing: cargo build --release --examples`);
    const room = `ff-burst-${Date.now()}`;
    const ws = `${server.url.replace(/^http/, 'ws')}/rtc`;
    const pub = spawn(loadtest, ['--url', ws, '--room', room, '--publishers', '1', '--subscribers', '0', '--duration', '90'], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    const out = [];
    pub.stdout.on('data', (d) => out.push(String(d)));
    pub.stderr.on('data', (d) => out.push(String(d)));
    const segmented = async () => (await (await fetch(`${server.url}/stats`)).json()).udp_datagrams_segmented;
    try {
      await joinViaUrl(fox, server.url, room, 'fox', '&publish=0');
      const first = await waitForMediaFrom(fox, 'pub-1').catch((e) => {
        throw new Error(`${e.message}\nload tester:\n${out.join('')}`);
      });
      const before = await segmented();
      // More segmented datagrams while Firefox keeps decoding (it is the room's only subscriber).
      const after = await waitFor(async () => {
        const now = await segmented();
        return now >= before + 50 ? now : null;
      }, {
        timeout: 20_000,
        what: 'the server to send Firefox segmented runs',
      });
      const later = await waitForMediaFrom(fox, 'pub-1');
      assert.ok(later.v.framesDecoded > first.v.framesDecoded, 'Firefox keeps decoding');
      assert.ok(later.v.frameWidth > 0);
      console.log(`# ${after - before} datagrams sent as segments while Firefox decoded ${later.v.framesDecoded - first.v.framesDecoded} frames at ${later.v.frameWidth}x${later.v.frameHeight}`);
    } finally {
      pub.kill('SIGTERM');
    }
  });

  it('two Firefox participants decode each other', async () => {
    const room = `ff-ff-${Date.now()}`;
    // Leave the previous room first: nothing else is published to the Firefox pair.
    await Promise.all([chrome, chrome2].map((p) => p.page.goto('about:blank')));
    await joinViaUrl(fox, server.url, room, 'fox');
    await joinViaUrl(fox2, server.url, room, 'fox2');
    const [a, b] = await Promise.all([waitForMediaFrom(fox, 'fox2'), waitForMediaFrom(fox2, 'fox')]);
    console.log(`# firefox receives firefox-2 at ${a.v.frameWidth}x${a.v.frameHeight}, firefox-2 receives firefox at ${b.v.frameWidth}x${b.v.frameHeight}`);
    assert.deepEqual(await gridNames(fox), ['fox2']);
    assert.deepEqual(await gridNames(fox2), ['fox']);
  });

  after(closeAll);
});
