// WHEP playback with the player page /watch: a Chromium host on the demo page publishes three
// simulcast layers; a Chromium /watch page, opened from the demo's go-live link, plays the room
// over WHEP (one POST, no WebSocket) and the join time POST → first decoded frame is printed;
// the quality selector (the layer extension) gives the 320 wide layer, then the widest one the
// host sends; ICE restarts over PATCH (asked for, and by itself when the viewer's path is cut);
// a session the server ended is replaced by a new POST; leaving the page DELETEs the session; a
// viewer opened before anyone publishes waits, then plays; Firefox plays too; when the host
// leaves the viewer plays the next one, and waits when nobody publishes; refusals show the
// server's text.
// Run with scripts/browser-tests.sh (loopback-only network namespace, server started here).
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import {
  ARTIFACTS,
  startServer,
  launchParticipant,
  launchFirefoxParticipant,
  joinViaUrl,
  waitFor,
  gridNames,
  loopbackOnly,
  openWatch,
  watchState,
  waitForWatchPlaying,
  iptablesRules,
} from './harness.js';

let server;
const open = new Set();

async function track(launch) {
  const p = await launch;
  open.add(p);
  return p;
}

before(async () => {
  if (!loopbackOnly()) console.warn('warning: not in a loopback-only network namespace (run scripts/browser-tests.sh)');
  server = await startServer({ logName: 'plaza-whep.log' });
});

after(async () => {
  const all = [...open];
  open.clear();
  for (const p of all) {
    if (process.env.SHOW_BROWSER_LOGS) console.log(p.logs.join('\n'));
  }
  await Promise.all(all.map((p) => p.close()));
  await server?.stop();
});

/** Video layers the demo page `p` publishes: [{rid, active, frameWidth}]. */
async function publishedLayers(p) {
  const all = await p.page.evaluate(() => window.plaza.client?.getPublishStats() ?? []);
  return all.filter((l) => l.kind === 'video').map((l) => ({ rid: l.rid, active: l.active, frameWidth: l.frameWidth, limit: l.qualityLimitationReason }));
}

const describeLayers = (layers) => layers.map((l) => `${l.rid}:${l.active === false ? 'paused,' : ''}${l.frameWidth}w/${l.limit ?? '-'}`).join(' ');

const ms = (x) => `${Math.round(x)} ms`;

/** The player's ICE path: its selected pair's local candidate {protocol, port}. */
function selectedPath(p) {
  return p.page.evaluate(async () => {
    const stats = await window.watch.pc.getStats();
    let pair = null;
    stats.forEach((s) => {
      if (s.type === 'transport' && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId);
    });
    const local = pair && stats.get(pair.localCandidateId);
    return local ? { protocol: local.protocol, port: local.port } : null;
  });
}

/** Status of a PATCH that changes nothing (a stale If-Match): 412 while the session exists, 404 once it is gone. */
async function sessionProbe(session) {
  const r = await fetch(session, {
    method: 'PATCH',
    headers: { 'Content-Type': 'application/trickle-ice-sdpfrag', 'If-Match': '"probe"' },
    body: 'a=end-of-candidates\r\n',
  });
  await r.text();
  return r.status;
}

describe('WHEP player /watch', { timeout: 300_000 }, () => {
  const room = `whep-${Date.now()}`;
  const room2 = `whep-wait-${Date.now()}`;
  let host;
  let viewer;

  it('a Chromium /watch page plays a simulcast host; the viewer is hidden from the room', async () => {
    [host, viewer] = await Promise.all([track(launchParticipant('host')), track(launchParticipant('viewer'))]);
    await joinViaUrl(host, server.url, room, 'host');
    await waitFor(async () => (await publishedLayers(host)).some((l) => l.frameWidth > 0), { what: 'the host to send video' });

    // The demo's go-live panel: the room's WHIP URL, a publish token, and the player link.
    await host.page.click('#go-live summary');
    const panel = await host.page.evaluate(() => ({
      whip: document.querySelector('#whip-url').textContent,
      command: document.querySelector('#token-command').textContent,
      href: document.querySelector('#watch-link').href,
      target: document.querySelector('#watch-link').target,
    }));
    assert.equal(panel.whip, `${server.url}/whip/${room}`);
    assert.match(panel.command, new RegExp(`^plaza token --room ${room} .*--grants publish`));
    assert.equal(panel.href, `${server.url}/watch?room=${room}`);
    assert.equal(panel.target, '_blank');
    await host.page.click('#mint-token');
    const minted = await waitFor(() => host.page.$eval('#whip-token', (e) => e.textContent), { what: 'a development token in the go-live panel' });
    const claims = JSON.parse(Buffer.from(minted.split('.')[1], 'base64url').toString());
    assert.equal(claims.grants.room, room);
    assert.equal(claims.grants.canPublish, true, JSON.stringify(claims));

    await viewer.page.goto(panel.href);
    const s = await waitForWatchPlaying(viewer);
    assert.equal(s.data.state, 'playing');
    assert.equal(Number(s.data.frameWidth), s.frameWidth);
    assert.ok(s.frameWidth > 0 && s.frameHeight > 0, `decodes ${s.frameWidth}x${s.frameHeight}`);
    assert.ok(s.session.startsWith(`${server.url}/whep/${encodeURIComponent(room)}/sessions/`), s.session);
    assert.ok(s.layerUrl?.startsWith(`${s.session}/layer`), `layer extension link: ${s.layerUrl}`);
    assert.equal(s.statusShown, 'playing');
    assert.match(s.layerShown, /^\d+×\d+ · \d+ fps/);
    const { start, post, answer, connected, firstFrame } = s.times;
    // (ICE may connect while the answer is being applied, before `answer` is stamped.)
    assert.ok(start <= post && answer > post && connected > post && firstFrame > post, `times ${JSON.stringify(s.times)}`);
    console.log(
      `# WHEP join: POST → answer ${ms(answer - post)}, → ICE connected ${ms(connected - post)}, → first decoded frame ${ms(firstFrame - post)} (offer and ICE gathering before the POST: ${ms(post - start)}); decodes ${s.frameWidth}x${s.frameHeight}`,
    );
    // Hidden: the host is not told about the viewer.
    assert.deepEqual(await gridNames(host), []);
    await viewer.page.screenshot({ path: join(ARTIFACTS, 'whep-watch.png') });
  });

  it('the quality selector: low → the 320 wide layer, high → the widest layer the host sends', async () => {
    await viewer.page.selectOption('#quality', 'low');
    let s = null;
    await waitFor(
      async () => {
        s = await watchState(viewer);
        return s.layerStatus === 204 && s.frameWidth === 320;
      },
      { timeout: 20_000, what: 'the quality=low viewer to decode 320 wide video' },
    ).catch(async (e) => {
      throw new Error(`${e.message}; layer POST ${s?.layerStatus}, decoded ${s?.frameWidth}; the host sends ${describeLayers(await publishedLayers(host))}`);
    });
    assert.equal(s.data.frameWidth, '320');
    assert.match(s.layerShown, /^320×180 · \d+ fps · asked: low/);

    await viewer.page.selectOption('#quality', 'high');
    let widest = 0;
    const t0 = Date.now();
    await waitFor(
      async () => {
        // The widest layer the host sends once its ramp-up settled (Chromium may send only
        // 320/640 on a busy machine).
        const layers = await publishedLayers(host);
        widest = Math.max(0, ...layers.filter((l) => l.active !== false).map((l) => l.frameWidth));
        s = await watchState(viewer);
        return s.layerStatus === 204 && widest > 320 && s.frameWidth === widest;
      },
      { timeout: 45_000, interval: 250, what: 'the quality=high viewer to decode the widest layer the host sends' },
    ).catch(async (e) => {
      throw new Error(`${e.message}; decoded ${s?.frameWidth}; the host sends ${describeLayers(await publishedLayers(host))}`);
    });
    console.log(`# quality high: decodes ${s.frameWidth}x${s.frameHeight} after ${Date.now() - t0} ms; the host sends ${describeLayers(await publishedLayers(host))}`);
    assert.equal(await viewer.page.evaluate(() => new URL(location.href).searchParams.get('quality')), 'high');

    // Back to automatic: accepted, and still playing.
    await viewer.page.selectOption('#quality', '');
    await waitFor(async () => (await watchState(viewer)).quality === null, { what: 'quality back to auto' });
    s = await waitForWatchPlaying(viewer);
    assert.equal(s.layerStatus, 204);
  });

  it('an ICE restart over PATCH: new server credentials, the same session, still playing', async () => {
    const stats = () => fetch(`${server.url}/stats`).then((r) => r.json());
    const restartsBefore = (await stats()).ice_restarts;
    const s0 = await watchState(viewer);
    await viewer.page.evaluate(() => window.watch.restartIce());
    const s = await waitFor(
      async () => {
        const x = await watchState(viewer);
        return x.iceRestarts === 1 && x.state === 'playing' && x.framesDecoded >= s0.framesDecoded + 30 ? x : null;
      },
      { timeout: 20_000, what: 'the player to restart ICE and keep playing' },
    );
    assert.notEqual(s.remoteUfrag, s0.remoteUfrag, 'the answer has the server\'s new ICE credentials');
    assert.equal(s.session, s0.session, 'the same session (no new POST)');
    assert.equal(s.posts, s0.posts);
    assert.equal((await stats()).ice_restarts, restartsBefore + 1, 'the server restarted ICE once');
    assert.equal(await sessionProbe(s.session), 412, 'the session still exists');
  });

  it('ICE restart by itself: a viewer whose path is cut for over 2 s restarts ICE over PATCH and plays again', async () => {
    const s0 = await watchState(viewer);
    const path = await selectedPath(viewer);
    assert.equal(path.protocol, 'udp', `the viewer's path: ${JSON.stringify(path)}`);
    // Cut the viewer's path: its UDP port both ways, and ICE-TCP to the server (a backup path
    // the viewer could otherwise switch to). The host's UDP path is untouched.
    const tcpPort = String(server.udpPort);
    const cut = iptablesRules([
      ['OUTPUT', '-p', 'udp', '--sport', String(path.port), '-j', 'DROP'],
      ['OUTPUT', '-p', 'udp', '--dport', String(path.port), '-j', 'DROP'],
      ['OUTPUT', '-p', 'tcp', '--dport', tcpPort, '-j', 'DROP'],
      ['OUTPUT', '-p', 'tcp', '--sport', tcpPort, '-j', 'DROP'],
    ]);
    const t0 = Date.now();
    let restartedAt = null;
    try {
      // The restart gathers new candidates (new ports), which the rules do not match.
      await waitFor(
        async () => {
          const x = await watchState(viewer);
          if (x.iceRestarts > s0.iceRestarts && restartedAt === null) restartedAt = Date.now();
          return x.iceRestarts > s0.iceRestarts && x.state === 'playing';
        },
        { timeout: 30_000, what: 'the player to notice the cut path and restart ICE' },
      );
    } finally {
      cut.remove();
    }
    const s = await waitForWatchPlaying(viewer);
    assert.equal(s.session, s0.session, 'the same session (ICE restart, no new POST)');
    assert.equal(s.posts, s0.posts);
    assert.notEqual(s.remoteUfrag, s0.remoteUfrag);
    assert.notEqual((await selectedPath(viewer)).port, path.port, 'a new local port');
    console.log(`# path cut: ICE restarted ${restartedAt - t0} ms after the cut, playing again on a new path`);
  });

  it('a session the server ended: the ICE restart gets 404 and the player POSTs a new session', async () => {
    const s0 = await watchState(viewer);
    const del = await fetch(s0.session, { method: 'DELETE' });
    assert.equal(del.status, 200);
    const t0 = Date.now();
    const s = await waitFor(
      async () => {
        const x = await watchState(viewer);
        return x.posts === s0.posts + 1 && x.state === 'playing' && x.framesDecoded > 10 ? x : null;
      },
      { timeout: 30_000, what: 'the player to POST a new session and play again' },
    );
    assert.notEqual(s.session, s0.session);
    assert.equal(await sessionProbe(s.session), 412, 'the new session exists');
    console.log(`# session ended by the server: playing again on a new session ${Date.now() - t0} ms after the DELETE`);
    const since = s.events.filter((e) => e.t >= s0.events.at(-1).t);
    console.log(`# player events: ${since.map((e) => `${e.what}@${e.t - since[0].t}`).join(', ')}`);
  });

  it('leaving the page DELETEs the session', async () => {
    const { session } = await watchState(viewer);
    await viewer.page.goto(`${server.url}/healthz`);
    await waitFor(async () => (await sessionProbe(session)) === 404, { timeout: 5_000, what: 'the session to be gone after pagehide' });
    const again = await fetch(session, { method: 'DELETE' });
    assert.equal(again.status, 404);
  });

  it('a viewer opened before the host publishes waits for the host, then plays', async () => {
    await openWatch(viewer, server.url, { room: room2 });
    const waiting = await waitFor(
      async () => {
        const s = await watchState(viewer);
        return s.state === 'waiting' ? s : null;
      },
      { timeout: 15_000, what: 'the player to wait for the host' },
    );
    assert.equal(waiting.statusShown, 'waiting for the host…');
    assert.equal(waiting.data.state, 'waiting');
    assert.equal(waiting.framesDecoded, 0);
    assert.ok(waiting.session, 'answered at once, with a session');

    const t0 = Date.now();
    await joinViaUrl(host, server.url, room2, 'host-2');
    const s = await waitForWatchPlaying(viewer);
    assert.equal(s.session, waiting.session, 'the same session');
    assert.equal(s.posts, 1);
    console.log(`# waiting viewer: playing ${Date.now() - t0} ms after the host's page started joining; decodes ${s.frameWidth}x${s.frameHeight}`);
  });

  it('a Firefox /watch page plays the host; ?quality=low from the URL gives the 320 wide layer', async () => {
    const fox = await track(launchFirefoxParticipant('firefox-viewer'));
    await openWatch(fox, server.url, { room: room2, quality: 'low' });
    const s = await waitForWatchPlaying(fox, { timeout: 30_000 });
    assert.ok(s.frameWidth > 0);
    assert.equal(s.data.state, 'playing');
    const { post, firstFrame } = s.times;
    console.log(`# firefox: ${await fox.browser.version()}, decodes ${s.frameWidth}x${s.frameHeight}, POST → first frame ${firstFrame === null ? 'not recorded' : ms(firstFrame - post)}`);
    assert.ok(firstFrame > post, `times ${JSON.stringify(s.times)}`);
    assert.equal(await fox.page.$eval('#quality', (e) => e.value), 'low');
    const low = await waitFor(
      async () => {
        const x = await watchState(fox);
        return x.layerStatus === 204 && x.frameWidth === 320 ? x : null;
      },
      { timeout: 20_000, what: 'the quality=low Firefox viewer to decode 320 wide video' },
    );
    assert.equal(low.data.frameWidth, '320');
  });

  it('the host leaves: the viewer moves to the next host in the same session; the last one leaves: waiting', async () => {
    const second = await track(launchParticipant('host-b'));
    await joinViaUrl(second, server.url, room2, 'host-b');
    await waitFor(async () => (await publishedLayers(second)).some((l) => l.frameWidth > 0), { what: 'the second host to send video' });
    const s0 = await watchState(viewer);
    assert.equal(s0.state, 'playing');
    // The first host leaves (the Leave button: a page that only goes away keeps its
    // participant for the resume grace period, silent, and the viewer with it).
    await host.page.click('#leave');
    await host.page.goto(`${server.url}/healthz`);
    const t0 = Date.now();
    // The viewer keeps its session and plays the second host (frames grow again after the switch).
    const s = await waitForWatchPlaying(viewer, { grow: 60 });
    assert.equal(s.session, s0.session, 'the same session');
    assert.equal(s.posts, s0.posts, 'no new POST');
    console.log(`# host left: the viewer decodes the next host (${s.frameWidth}x${s.frameHeight}) ${Date.now() - t0} ms later`);
    await second.page.click('#leave'); // nobody publishes any more
    await second.page.goto(`${server.url}/healthz`);
    const waiting = await waitFor(
      async () => {
        const x = await watchState(viewer);
        return x.state === 'waiting' ? x : null;
      },
      { timeout: 15_000, what: 'the player to wait for a host again' },
    );
    assert.equal(waiting.session, s0.session);
    assert.equal(waiting.statusShown, 'waiting for the host…');
  });

  it('a refused POST shows the server\'s error text and is not retried', async () => {
    await openWatch(viewer, server.url, { room: room2, token: 'not-a-token' });
    const s = await waitFor(
      async () => {
        const x = await watchState(viewer);
        return x.state === 'error' ? x : null;
      },
      { timeout: 10_000, what: 'the player to show the refusal' },
    );
    assert.match(s.statusShown, /^error: 401: \S/, s.statusShown);
    assert.equal(await viewer.page.$eval('#message', (e) => !e.hidden), true);
    // Another token in the same room but without the subscribe grant: 403 with its reason.
    const tr = await fetch(`${server.url}/dev/token?room=${encodeURIComponent(room2)}&grants=publish`).then((r) => r.json());
    await openWatch(viewer, server.url, { room: room2, token: tr.token });
    const forbidden = await waitFor(
      async () => {
        const x = await watchState(viewer);
        return x.state === 'error' ? x : null;
      },
      { timeout: 10_000, what: 'the player to show the 403' },
    );
    assert.match(forbidden.statusShown, /^error: 403: .*subscrib/, forbidden.statusShown);
    await new Promise((r) => setTimeout(r, 1500)); // a retry would have started by now
    const later = await watchState(viewer);
    assert.equal(later.posts, 1, 'not retried');
    assert.equal(later.state, 'error');
  });
});
