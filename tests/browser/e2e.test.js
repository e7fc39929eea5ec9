// End-to-end tests of the Plaza client and demo page in headless Chromium.
// Run with scripts/browser-tests.sh (loopback-only network namespace, server started here).
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { execFileSync } from 'node:child_process';
import {
  ARTIFACTS,
  startServer,
  launchParticipant,
  joinViaForm,
  joinViaUrl,
  waitFor,
  waitForMediaFrom,
  gridNames,
  decodedWidth,
  loopbackOnly,
} from './harness.js';

let server;
const open = new Set();

async function participant(label, opts) {
  const p = await launchParticipant(label, opts);
  open.add(p);
  return p;
}

async function close(p) {
  open.delete(p);
  await p.close();
}

before(async () => {
  if (!loopbackOnly()) console.warn('warning: not in a loopback-only network namespace (run scripts/browser-tests.sh)');
  server = await startServer();
});

after(async () => {
  for (const p of open) {
    if (process.env.SHOW_BROWSER_LOGS) console.log(p.logs.join('\n'));
    await p.close();
  }
  await server?.stop();
});

describe('two participants and a late joiner', { timeout: 300_000 }, () => {
  const room = `e2e-${Date.now()}`;
  let alice;
  let bob;
  let carol;

  it('two browsers join one room and each decodes the other\'s video and audio', async () => {
    [alice, bob] = await Promise.all([participant('alice'), participant('bob')]);
    await joinViaForm(alice, server.url, room, 'alice');
    await joinViaForm(bob, server.url, room, 'bob');
    const [ab, ba] = await Promise.all([waitForMediaFrom(alice, 'bob'), waitForMediaFrom(bob, 'alice')]);
    assert.ok(ab.v.frameWidth > 0 && ba.v.frameWidth > 0);
    console.log(`# alice receives bob at ${ab.v.frameWidth}x${ab.v.frameHeight}, bob receives alice at ${ba.v.frameWidth}x${ba.v.frameHeight}`);
    assert.deepEqual(await gridNames(alice), ['bob']);
    assert.deepEqual(await gridNames(bob), ['alice']);
    // The stats overlay shows something once it has had a second of data.
    await waitFor(() => alice.page.$eval('#grid .tile:not(.local) .stats', (e) => /[1-9]\d* fps/.test(e.textContent) && /[1-9][\d.]* [kM]b\/s/.test(e.textContent)), {
      what: 'the stats overlay to show resolution, fps and bitrate',
    });
    // Each tile shows the server's connection-quality rating of its participant (loopback:
    // excellent, or good right after the join).
    const quality = await waitFor(() => alice.page.$eval('#grid .tile:not(.local)', (e) => e.dataset.quality ?? null), {
      what: "bob's tile to show his connection quality",
    });
    assert.match(quality, /^(excellent|good)$/);
    const shot = join(ARTIFACTS, 'demo-two-participants.png');
    await alice.page.screenshot({ path: shot });
    console.log(`# screenshot: ${shot}`);
  });

  it('a chat message typed in one appears in the other', async () => {
    await alice.page.waitForSelector('#chat-input:not([disabled])', { timeout: 10_000 });
    await alice.page.fill('#chat-input', 'hello from alice ✓');
    await alice.page.press('#chat-input', 'Enter');
    await bob.page.waitForSelector('#chat-log li:has-text("hello from alice ✓")', { timeout: 10_000 });
    const line = await bob.page.$eval('#chat-log li:has-text("hello from alice ✓")', (e) => e.textContent);
    assert.match(line, /^alice/);
    // and back, through the button
    await bob.page.fill('#chat-input', 'hi alice');
    await bob.page.click('#chat-send');
    await alice.page.waitForSelector('#chat-log li:has-text("hi alice")', { timeout: 10_000 });
  });

  it('input messages (binary, addressed) arrive byte for byte with the sender attached', async () => {
    await bob.page.evaluate(() => {
      window.__inputs = [];
      window.plaza.client.on('input', (m) => window.__inputs.push({ from: m.from, binary: m.binary, bytes: m.binary ? [...m.data] : m.text }));
    });
    const [aliceId, bobId] = await Promise.all([alice, bob].map((p) => p.page.evaluate(() => window.plaza.client.participantId)));
    // `input` is unreliable by design (no retransmits): resend until one arrives.
    const got = await waitFor(
      async () => {
        await alice.page.evaluate((to) => window.plaza.client.sendInput(new Uint8Array([0x00, 0xff, 0x0a, 0x80]), { to: [to] }), bobId);
        return bob.page.evaluate(() => window.__inputs[0]);
      },
      { timeout: 10_000, interval: 250, what: 'bob to receive alice\'s input message' },
    );
    assert.deepEqual(got, { from: aliceId, binary: true, bytes: [0x00, 0xff, 0x0a, 0x80] });
  });

  it('muting the camera and the microphone shows on the other side', async () => {
    const badge = () => bob.page.$eval('#grid .tile:not(.local) .badges', (e) => e.textContent);
    await alice.page.click('#toggle-camera');
    await waitFor(async () => /camera off/.test(await badge()), { timeout: 10_000, what: "bob to see alice's camera off" });
    await alice.page.click('#toggle-mic');
    await waitFor(async () => /muted/.test(await badge()), { timeout: 10_000, what: "bob to see alice's microphone muted" });
    assert.equal(await alice.page.evaluate(() => window.plaza.client.localStream.getVideoTracks()[0].enabled), false);
    await alice.page.click('#toggle-camera');
    await alice.page.click('#toggle-mic');
    await waitFor(async () => (await badge()) === '', { timeout: 10_000, what: "bob to see alice's camera and microphone back" });
    await waitForMediaFrom(bob, 'alice');
  });

  it('a third browser joins late and sees both; they see it', async () => {
    carol = await participant('carol');
    await joinViaUrl(carol, server.url, room, 'carol');
    await Promise.all([
      waitForMediaFrom(carol, 'alice'),
      waitForMediaFrom(carol, 'bob'),
      waitForMediaFrom(alice, 'carol'),
      waitForMediaFrom(bob, 'carol'),
    ]);
    assert.deepEqual((await gridNames(carol)).sort(), ['alice', 'bob']);
  });

  it('a browser that leaves disappears from the others\' grids', async () => {
    await carol.page.click('#leave');
    await Promise.all(
      [alice, bob].map((p) =>
        waitFor(async () => !(await gridNames(p)).includes('carol'), { timeout: 10_000, what: `carol's tile to leave ${p.label}'s grid` }),
      ),
    );
    await close(carol);
    // A browser that just goes away (process closed, no leave) disappears as well.
    await close(bob);
    await waitFor(async () => (await gridNames(alice)).length === 0, { timeout: 10_000, what: "bob's tile to leave alice's grid" });
    await close(alice);
  });
});

describe('reconnect', { timeout: 120_000 }, () => {
  it('rejoins by itself after its WebSocket drops, and media flows again', async () => {
    const room = `reconnect-${Date.now()}`;
    const [dave, erin] = await Promise.all([participant('dave'), participant('erin')]);
    await joinViaUrl(dave, server.url, room, 'dave');
    await joinViaUrl(erin, server.url, room, 'erin');
    await Promise.all([waitForMediaFrom(dave, 'erin'), waitForMediaFrom(erin, 'dave')]);
    const before = await dave.page.evaluate(() => window.plaza.client.participantId);
    // Drop the signaling socket under the client's feet (as a network blip would).
    await dave.page.evaluate(() => window.plaza.client._sess.ws.close(4001, 'test drop'));
    await waitFor(() => dave.page.evaluate((id) => window.plaza.client.state === 'connected' && window.plaza.client.participantId !== id, before), {
      timeout: 15_000,
      what: 'dave to rejoin with a fresh session',
    });
    await Promise.all([waitForMediaFrom(dave, 'erin'), waitForMediaFrom(erin, 'dave')]);
    assert.deepEqual(await gridNames(erin), ['dave']);
    await Promise.all([close(dave), close(erin)]);
  });
});

describe('resume', { timeout: 120_000 }, () => {
  it('resumes the same session when its connection is cut, and the others see nothing', async () => {
    const room = `resume-${Date.now()}`;
    const [dave, erin] = await Promise.all([participant('dave'), participant('erin')]);
    await joinViaUrl(dave, server.url, room, 'dave');
    await joinViaUrl(erin, server.url, room, 'erin');
    await Promise.all([waitForMediaFrom(dave, 'erin'), waitForMediaFrom(erin, 'dave')]);
    const port = new URL(server.url).port || '80';
    for (const p of [dave, erin]) {
      await p.page.evaluate(() => {
        window.__events = [];
        for (const t of ['reconnected', 'participantleft', 'participantjoined', 'disconnected']) {
          window.plaza.client.on(t, (d) => window.__events.push({ t, resumed: d.resumed, id: d.participantId ?? d.participant?.id }));
        }
      });
    }
    const before = await dave.page.evaluate(() => window.plaza.client.participantId);
    // Cut dave's signaling connection the way a network would: his next packets to the
    // server get a TCP reset, and new connections are refused until the rule goes.
    const rule = ['-p', 'tcp', '--dport', port, '-j', 'REJECT', '--reject-with', 'tcp-reset'];
    execFileSync('iptables', ['-I', 'INPUT', ...rule]);
    let cut;
    try {
      await dave.page.evaluate(() => window.plaza.client._sendOn(window.plaza.client._sess, { type: 'ping' }));
      await waitFor(() => dave.page.evaluate(() => window.__events.some((e) => e.t === 'disconnected')), {
        timeout: 15_000,
        what: 'dave to notice the cut',
      });
      cut = Date.now();
      // Media keeps flowing meanwhile: the peer connections do not use the WebSocket.
      await waitForMediaFrom(erin, 'dave');
    } finally {
      execFileSync('iptables', ['-D', 'INPUT', ...rule]);
    }
    await waitFor(() => dave.page.evaluate(() => window.__events.some((e) => e.t === 'reconnected')), {
      timeout: 20_000,
      what: 'dave to resume',
    });
    console.log(`# resume: connection back ${Date.now() - cut} ms after the cut was noticed (backoff included)`);
    const daveEvents = await dave.page.evaluate(() => window.__events);
    const reconnected = daveEvents.find((e) => e.t === 'reconnected');
    assert.equal(reconnected.resumed, true, JSON.stringify(daveEvents));
    assert.equal(await dave.page.evaluate(() => window.plaza.client.participantId), before, 'the same participant');
    assert.equal(await dave.page.evaluate(() => window.plaza.client.state), 'connected');
    // erin saw no leave and no new join of dave. (The rule resets every connection to the
    // server's port, so erin's own socket may have been cut too: then she resumed her own
    // session, which is allowed, and nothing else.)
    const erinEvents = await erin.page.evaluate(() => window.__events);
    assert.deepEqual(erinEvents.filter((e) => e.t !== 'reconnected' && e.t !== 'disconnected'), [], JSON.stringify(erinEvents));
    assert.ok(erinEvents.filter((e) => e.t === 'reconnected').every((e) => e.resumed === true), JSON.stringify(erinEvents));
    await Promise.all([waitForMediaFrom(dave, 'erin'), waitForMediaFrom(erin, 'dave')]);
    assert.deepEqual(await gridNames(erin), ['dave']);
    assert.deepEqual(await gridNames(dave), ['erin']);
    await Promise.all([close(dave), close(erin)]);
  });
});

describe('errors are explained', { timeout: 120_000 }, () => {
  it('an unreachable server is reported on the page', async () => {
    const hank = await participant('hank');
    await hank.page.goto(`${server.url}/`);
    // Point the page's client at a port nothing listens on.
    await hank.page.evaluate(() => {
      const Real = window.WebSocket;
      window.WebSocket = class extends Real {
        constructor(url, ...rest) {
          super(url.replace(/:\d+\//, ':9/'), ...rest);
        }
      };
    });
    await hank.page.fill('#name', 'hank');
    await hank.page.click('#join');
    await hank.page.waitForSelector('#message:not([hidden])', { timeout: 15_000 });
    assert.match(await hank.page.textContent('#message-text'), /Cannot reach the Plaza server/);
    assert.equal(await hank.page.isVisible('#join-form'), true);
    await close(hank);
  });

  it('a refused camera leaves a clear message and a viewer that still receives', async () => {
    const room = `refused-${Date.now()}`;
    const frank = await participant('frank');
    // No fake UI: the permission prompt is denied.
    const gina = await participant('gina', { extraArgs: ['--deny-permission-prompts'], dropFakeUi: true });
    await joinViaUrl(frank, server.url, room, 'frank');
    await joinViaUrl(gina, server.url, room, 'gina');
    await gina.page.waitForSelector('#message:not([hidden])', { timeout: 10_000 });
    const text = await gina.page.textContent('#message-text');
    assert.match(text, /Camera and microphone unavailable/);
    await waitForMediaFrom(gina, 'frank');
    await Promise.all([close(frank), close(gina)]);
  });
});

describe('access tokens', { timeout: 120_000 }, () => {
  it('a viewer-only token: publishing is refused on the page, the viewer still receives', async () => {
    const room = `viewer-${Date.now()}`;
    const [ivan, judy] = await Promise.all([participant('ivan'), participant('judy')]);
    await joinViaUrl(ivan, server.url, room, 'ivan');
    // The demo page asks the development token endpoint for a token granting only `subscribe`.
    await joinViaUrl(judy, server.url, room, 'judy', '&grants=subscribe');
    await judy.page.waitForSelector('#message:not([hidden])', { timeout: 15_000 });
    const text = await judy.page.textContent('#message-text');
    assert.match(text, /Could not publish camera and microphone: .*does not grant publishing/);
    await waitForMediaFrom(judy, 'ivan');
    // Nothing of judy's was published: ivan's client knows her, without tracks.
    const judysTracks = await ivan.page.evaluate(() => {
      const p = [...window.plaza.client.participants.values()].find((x) => x.name === 'judy');
      return p ? p.tracks.size : -1;
    });
    assert.equal(judysTracks, 0);
    await Promise.all([close(ivan), close(judy)]);
  });
});

describe('simulcast quality caps (need layer selection in the server)', { timeout: 240_000 }, () => {
  const room = `quality-${Date.now()}`;
  let pub;

  before(async () => {
    pub = await participant('publisher');
    await joinViaUrl(pub, server.url, room, 'publisher');
    // The publisher is sending video; its bandwidth estimate may still be ramping up to the
    // point where it can afford the 1280 wide layer (the 'high' test waits for that).
    await waitFor(
      async () => {
        const layers = await pub.page.evaluate(() => window.plaza.client.getPublishStats());
        return layers.some((l) => l.kind === 'video' && l.frameWidth > 0);
      },
      { timeout: 20_000, what: 'the publisher to send video' },
    );
  });

  // "high" first, while the publisher is not yet told to pause anything. A layer the server
  // paused upstream (dynacast) needs the publisher's bandwidth estimate to ramp up again when
  // it comes back, which tests/browser/bench.js measures; here only the caps' outcome is
  // asserted.
  // "high": the widest layer the publisher sends (1280, or 640 when Chromium leaves its top
  // encoding out on a busy machine); "low": the 320 wide one.
  const widestSent = async () => {
    const sent = await pub.page.evaluate(() => window.plaza.client.getPublishStats());
    return Math.max(0, ...sent.filter((l) => l.kind === 'video' && l.active !== false).map((l) => l.frameWidth ?? 0));
  };
  for (const [quality, width] of [
    ['high', 'the widest layer sent'],
    ['low', 320],
  ]) {
    it(`with quality=${quality} the received video is ${typeof width === 'number' ? `${width} wide` : width}`, async () => {
      const viewer = await participant(`viewer-${quality}`);
      try {
        await joinViaUrl(viewer, server.url, room, `viewer-${quality}`, `&quality=${quality}`);
        await waitForMediaFrom(viewer, 'publisher');
        let last = 0;
        const t0 = Date.now();
        await waitFor(
          async () => {
            last = await decodedWidth(viewer, 'publisher');
            if (typeof width === 'number') return last === width;
            const widest = await widestSent();
            return widest > 320 && last >= widest;
          },
          { timeout: 45_000, what: `decoded width: ${width}` },
        ).catch(async (e) => {
          const sent = await pub.page.evaluate(() => window.plaza.client.getPublishStats());
          const layers = sent.filter((l) => l.kind === 'video').map((l) => `${l.rid}:${l.active ? '' : 'paused,'}${l.frameWidth}w,${l.qualityLimitationReason}`);
          throw new Error(`${e.message}; decoded width was ${last}; publisher sends ${layers.join(' ')}`);
        });
        console.log(`# quality=${quality}: ${last} wide ${Date.now() - t0} ms after media started`);
      } finally {
        await close(viewer);
      }
    });
  }

  after(async () => pub && close(pub));
});
