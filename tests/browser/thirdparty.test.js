// Third-party browser clients against Plaza: Eyevinn's WHIP client (@eyevinn/whip-web-client)
// publishes Chromium's fake camera and microphone to /whip/{room} and a Plaza demo page,
// subscribe-only, decodes it; Eyevinn's WHEP player (@eyevinn/webrtc-player, type "whep") plays
// the same room from /whep/{room} into a <video> that decodes growing frames; then both
// libraries' own teardown DELETEs their sessions. Neither library was written for Plaza: the
// versions are pinned in package.json, their npm dist files are bundled here at test time with
// esbuild (they import bare module names) and served, with the page thirdparty/index.html, from
// another origin than the server's (every request is cross-origin, CORS preflights included).
// Join times (POST → first decoded frame) are printed.
// Run with scripts/browser-tests.sh (loopback-only network namespace, server started here).
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import esbuild from 'esbuild';
import { startServer, launchParticipant, joinViaUrl, waitFor, waitForMediaFrom, gridNames, loopbackOnly } from './harness.js';

const here = dirname(fileURLToPath(import.meta.url));
const require_ = (m) => JSON.parse(readFileSync(join(here, 'node_modules', m, 'package.json'), 'utf8'));

let server;
let pages; // the HTTP server of the test page and the bundle (another origin than Plaza's)
let pagesUrl;
let bundleDir;
const open = new Set();

async function participant(label) {
  const p = await launchParticipant(label);
  open.add(p);
  return p;
}

before(async () => {
  if (!loopbackOnly()) console.warn('warning: not in a loopback-only network namespace (run scripts/browser-tests.sh)');
  // The libraries as pinned (a missing or different install fails here, loudly).
  const whip = require_('@eyevinn/whip-web-client');
  const player = require_('@eyevinn/webrtc-player');
  assert.equal(whip.version, '1.1.7', '@eyevinn/whip-web-client (npm ci in tests/browser)');
  assert.equal(player.version, '0.13.0', '@eyevinn/webrtc-player (npm ci in tests/browser)');
  bundleDir = mkdtempSync(join(tmpdir(), 'plaza-thirdparty-'));
  const built = await esbuild.build({
    entryPoints: [join(here, 'thirdparty', 'libs.js')],
    bundle: true,
    format: 'iife',
    platform: 'browser',
    target: 'chrome110',
    outfile: join(bundleDir, 'eyevinn.js'),
    define: { 'process.env.NODE_ENV': '"production"' },
    logLevel: 'silent',
  });
  assert.deepEqual(built.errors, []);
  const files = {
    '/': ['text/html; charset=utf-8', readFileSync(join(here, 'thirdparty', 'index.html'))],
    '/eyevinn.js': ['text/javascript; charset=utf-8', readFileSync(join(bundleDir, 'eyevinn.js'))],
  };
  console.log(`# bundled @eyevinn/whip-web-client ${whip.version} + @eyevinn/webrtc-player ${player.version}: ${files['/eyevinn.js'][1].length} bytes`);
  pages = createServer((req, res) => {
    const path = new URL(req.url, 'http://x').pathname;
    const f = files[path];
    if (!f) {
      res.writeHead(path === '/favicon.ico' ? 204 : 404).end();
      return;
    }
    res.writeHead(200, { 'Content-Type': f[0] });
    res.end(f[1]);
  });
  await new Promise((resolve, reject) => {
    pages.once('error', reject);
    pages.listen(0, '127.0.0.1', resolve);
  });
  pagesUrl = `http://127.0.0.1:${pages.address().port}`;
  server = await startServer({ logName: 'plaza-thirdparty.log' });
});

after(async () => {
  for (const p of open) {
    if (process.env.SHOW_BROWSER_LOGS) console.log(p.logs.join('\n'));
    await p.close();
  }
  await new Promise((r) => (pages ? pages.close(r) : r()));
  await server?.stop();
  if (bundleDir) rmSync(bundleDir, { recursive: true, force: true });
});

async function devToken(room, identity, grants) {
  const r = await fetch(`${server.url}/dev/token?room=${encodeURIComponent(room)}&identity=${identity}&name=${identity}&grants=${grants}`);
  assert.equal(r.status, 200, `dev token for ${identity}`);
  return (await r.json()).token;
}

/** Open the test page in `p` and check that both libraries loaded. */
async function openPage(p) {
  await p.page.goto(`${pagesUrl}/`);
  const loaded = await p.page.evaluate(() => typeof window.WHIPClient === 'function' && typeof window.WebRTCPlayer === 'function');
  assert.ok(loaded, `the bundle did not load: ${p.logs.join('\n')}`);
}

/** In the page: Eyevinn's WHIPClient publishes the fake camera and microphone. */
async function eyevinnPublish({ endpoint, token }) {
  const withTimeout = (promise, ms, what) =>
    Promise.race([promise, new Promise((_, reject) => setTimeout(() => reject(new Error(`${what}: no result in ${ms} ms`)), ms))]);
  const stream = await navigator.mediaDevices.getUserMedia({ audio: true, video: { width: 640, height: 480 } });
  document.querySelector('#preview').srcObject = stream;
  // No STUN server (the library's default is a public one; nothing but loopback here).
  const client = new window.WHIPClient({ endpoint, opts: { authkey: token, iceServers: [], debug: true } });
  window.whipClient = client;
  await withTimeout(client.ingest(stream), 10_000, 'ingest()');
  const resource = await withTimeout(client.getResourceUrl(), 15_000, 'the WHIP resource (POST answered)');
  const pc = client.peer;
  await withTimeout(
    new Promise((resolve, reject) => {
      const check = () => {
        if (pc.connectionState === 'connected') resolve();
        if (pc.connectionState === 'failed') reject(new Error('connection failed'));
      };
      pc.addEventListener('connectionstatechange', check);
      check();
    }),
    15_000,
    'the publisher connection',
  );
  return { resource, trickle: client.supportTrickleIce(), requests: window.requests, connectedAt: Date.now() };
}

/** In the viewer page (demo, window.plaza.client): Date.now() of the first decoded video frame from `name`. */
function firstFrameFrom(p, name, timeout) {
  return p.page.evaluate(
    async ({ name, timeout }) => {
      const deadline = Date.now() + timeout;
      while (Date.now() < deadline) {
        const c = window.plaza.client;
        for (const [id, rt] of c?.remoteTracks ?? []) {
          if (rt.kind !== 'video' || c.participants.get(rt.participantId)?.name !== name) continue;
          const s = await c.getTrackStats(id);
          if (s?.framesDecoded > 0) return Date.now();
        }
        await new Promise((r) => setTimeout(r, 20));
      }
      return null;
    },
    { name, timeout },
  );
}

/** In the page: Eyevinn's WebRTCPlayer (WHEP) plays `endpoint` into #player. */
async function eyevinnPlay({ endpoint, token }) {
  const video = document.querySelector('#player');
  const firstFrame = new Promise((resolve) => video.requestVideoFrameCallback(() => resolve(Date.now())));
  const player = new window.WebRTCPlayer({ video, type: 'whep', iceServers: [], debug: true });
  window.player = player;
  // The library sends its second argument verbatim as the Authorization header.
  const loadAt = Date.now();
  await player.load(new URL(endpoint), `Bearer ${token}`);
  const firstFrameAt = await Promise.race([firstFrame, new Promise((r) => setTimeout(() => r(null), 20_000))]);
  const post = window.requests.find((r) => r.method === 'POST' && r.url === endpoint);
  return { post, loadAt, firstFrameAt, videoWidth: video.videoWidth, videoHeight: video.videoHeight };
}

function playerFrames(p) {
  return p.page.evaluate(() => {
    const v = document.querySelector('#player');
    return { frames: v.getVideoPlaybackQuality().totalVideoFrames, width: v.videoWidth, time: v.currentTime, paused: v.paused };
  });
}

describe('Eyevinn WHIP client and WHEP player (npm) against Plaza', { timeout: 180_000 }, () => {
  const room = `eyevinn-${Date.now()}`;
  let viewer;
  let publisher;
  let watcher;

  it('@eyevinn/whip-web-client publishes the camera; a Plaza subscriber page decodes it', async () => {
    viewer = await participant('viewer');
    await joinViaUrl(viewer, server.url, room, 'viewer', '&grants=subscribe');
    const token = await devToken(room, 'eyevinn-whip', 'publish');
    publisher = await participant('eyevinn-whip');
    await openPage(publisher);

    const endpoint = `${server.url}/whip/${encodeURIComponent(room)}`;
    const firstFrame = firstFrameFrom(viewer, 'eyevinn-whip', 40_000);
    const r = await publisher.page.evaluate(eyevinnPublish, { endpoint, token }).catch((e) => {
      throw new Error(`${e.message}\n${publisher.logs.join('\n')}`);
    });
    const post = r.requests.find((q) => q.method === 'POST' && q.url === endpoint);
    assert.ok(post, `no POST: ${JSON.stringify(r.requests)}`);
    assert.equal(post.status, 201, JSON.stringify(post));
    assert.equal(post.headers.authorization, `Bearer ${token}`);
    assert.equal(post.headers['content-type'], 'application/sdp');
    assert.ok(r.resource.startsWith(`${endpoint}/sessions/`), r.resource);
    const firstFrameAt = await firstFrame;
    assert.ok(firstFrameAt, 'the viewer decoded no frame from the Eyevinn publisher');
    const opts = r.requests.find((q) => q.method === 'OPTIONS');
    const patches = r.requests.filter((q) => q.method === 'PATCH');
    console.log(
      `# Eyevinn WHIP: OPTIONS ${opts?.status ?? opts?.error ?? 'none'} (trickle ${r.trickle ? 'on' : 'off'}), ` +
        `POST ${post.at - (opts?.at ?? post.at)} ms after the OPTIONS → 201 in ${post.doneAt - post.at} ms, ` +
        `→ connected ${r.connectedAt - post.at} ms, → viewer's first decoded frame ${firstFrameAt - post.at} ms; ` +
        `${patches.length} PATCH(es): ${JSON.stringify(patches.map((q) => q.status ?? q.error))}`,
    );

    const media = await waitForMediaFrom(viewer, 'eyevinn-whip');
    assert.ok(media.v.frameWidth > 0);
    console.log(`# viewer decodes the Eyevinn WHIP video at ${media.v.frameWidth}x${media.v.frameHeight}`);
    assert.deepEqual(await gridNames(viewer), ['eyevinn-whip']);
  });

  it('@eyevinn/webrtc-player (whep) plays the room from /whep/{room} with a bearer token', async () => {
    assert.ok(publisher, 'needs the publisher of the first test');
    const token = await devToken(room, 'eyevinn-player', 'subscribe');
    watcher = await participant('eyevinn-player');
    await openPage(watcher);
    const endpoint = `${server.url}/whep/${encodeURIComponent(room)}`;
    const r = await watcher.page.evaluate(eyevinnPlay, { endpoint, token });
    assert.ok(r.post, `no POST: ${JSON.stringify(await watcher.page.evaluate(() => window.requests))}\n${watcher.logs.join('\n')}`);
    assert.equal(r.post.status, 201, JSON.stringify(r.post));
    assert.equal(r.post.headers.authorization, `Bearer ${token}`);
    assert.equal(r.post.headers['content-type'], 'application/sdp');
    assert.ok(r.firstFrameAt, `the player's <video> showed no frame in 20 s\n${watcher.logs.join('\n')}`);
    console.log(
      `# Eyevinn WHEP player: load() → POST ${r.post.at - r.loadAt} ms (offer, ICE gathering), POST → 201 in ${r.post.doneAt - r.post.at} ms, → first video frame ${r.firstFrameAt - r.post.at} ms ` +
        `(${r.videoWidth}x${r.videoHeight})`,
    );

    const first = await waitFor(async () => {
      const s = await playerFrames(watcher);
      return s.width > 0 && s.frames > 0 ? s : null;
    }, { timeout: 10_000, what: 'the player to decode frames' });
    const later = await waitFor(async () => {
      const s = await playerFrames(watcher);
      return s.frames >= first.frames + 20 && s.time > first.time ? s : null;
    }, { timeout: 10_000, what: 'the player\'s frames to keep growing' });
    assert.ok(later.width > 0 && !later.paused, JSON.stringify(later));
    console.log(`# player decodes ${later.width} wide, frames ${first.frames} → ${later.frames}`);
    // A viewer is hidden: the demo page's grid still shows the publisher only.
    assert.deepEqual(await gridNames(viewer), ['eyevinn-whip']);
  });

  it('the libraries\' own teardown DELETEs both sessions; the publisher leaves the viewer\'s grid', async () => {
    assert.ok(watcher && publisher, 'needs the first two tests');
    const unload = await watcher.page.evaluate(async () => {
      await window.player.unload();
      return window.requests.filter((r) => r.method === 'DELETE');
    });
    assert.equal(unload.length, 1, JSON.stringify(unload));
    assert.match(unload[0].url, /\/whep\/[^/]+\/sessions\//);
    assert.equal(unload[0].status, 200, JSON.stringify(unload[0]));

    const destroy = await publisher.page.evaluate(async () => {
      await window.whipClient.destroy();
      return window.requests.filter((r) => r.method === 'DELETE');
    });
    assert.equal(destroy.length, 1, JSON.stringify(destroy));
    assert.match(destroy[0].url, /\/whip\/[^/]+\/sessions\//);
    assert.equal(destroy[0].status, 200, JSON.stringify(destroy[0]));
    await waitFor(async () => (await gridNames(viewer)).length === 0, { timeout: 10_000, what: 'the Eyevinn publisher to leave the viewer\'s grid' });
  });
});
