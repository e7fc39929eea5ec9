// The client's estimate of the server clock: after `joined`, plaza-client.js times a burst of
// pings against the server's `pong.server_time`, and `serverNow()` is the server's wall clock.
// Browser and server run on one machine, so the true offset is 0: the estimate must be within
// half the round trip it was made with (plus 2 ms for the browser's coarsened clocks).
// Chromium and Firefox. Run in a loopback-only network namespace
// (scripts/browser-tests.sh).
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchParticipant, launchFirefoxParticipant, joinViaUrl, waitFor, loopbackOnly } from './harness.js';

let server;
const open = new Set();

before(async () => {
  if (!loopbackOnly()) console.warn('warning: not in a loopback-only network namespace (run scripts/browser-tests.sh)');
  server = await startServer({ logName: 'plaza-clock.log' });
});

after(async () => {
  const all = [...open];
  open.clear();
  await Promise.all(all.map((p) => p.close()));
  await server?.stop();
});

/** Join, wait for the clock estimate, and check `serverNow()` against the page's own clock. */
async function checkClock(p, room) {
  open.add(p);
  await joinViaUrl(p, server.url, room, p.label);
  // The burst after `joined` gives samples within a second; 2 s is the bound.
  const clock = await waitFor(() => p.page.evaluate(() => window.plaza?.client?.clock ?? null), {
    timeout: 2_000,
    interval: 20,
    what: `${p.label}: a clock estimate within 2 s of joining`,
  });
  assert.ok(clock.samples >= 1, JSON.stringify(clock));
  assert.ok(Number.isFinite(clock.offset) && Number.isFinite(clock.rtt) && clock.rtt >= 0, JSON.stringify(clock));
  // The burst fills the window further: wait for all of its samples (5 pings, 100 ms apart).
  await waitFor(() => p.page.evaluate(() => window.plaza.client.clock.samples >= 5), {
    timeout: 3_000,
    interval: 20,
    what: `${p.label}: the burst's 5 samples`,
  });
  const got = await p.page.evaluate(() => {
    const c = window.plaza.client;
    // Both clocks read back to back; Date.now() is whole milliseconds.
    const before = Date.now();
    const server = c.serverNow();
    const after = Date.now();
    return { clock: c.clock, diff: server - (before + after) / 2, spread: after - before };
  });
  console.log(
    `# ${p.label}: offset ${got.clock.offset.toFixed(3)} ms, rtt ${got.clock.rtt.toFixed(3)} ms, ` +
      `${got.clock.samples} samples; serverNow() − Date.now() = ${got.diff.toFixed(3)} ms`,
  );
  const bound = got.clock.rtt / 2 + 2 + got.spread / 2;
  assert.ok(Math.abs(got.diff) <= bound, `|serverNow() − Date.now()| = ${Math.abs(got.diff).toFixed(3)} ms > rtt/2 + 2 ms = ${bound.toFixed(3)} ms`);
  assert.ok(Math.abs(got.clock.offset) <= bound, `|offset| = ${Math.abs(got.clock.offset).toFixed(3)} ms > ${bound.toFixed(3)} ms`);
  return got;
}

describe('server clock in the client', { timeout: 120_000 }, () => {
  it('Chromium: serverNow() is the server clock within rtt/2 soon after joining', async () => {
    const p = await launchParticipant('clock-chromium');
    open.add(p);
    // Every change of the estimate is a `clock` event with the new estimate: record them from
    // the moment the demo creates its client.
    await p.page.addInitScript(() => {
      window.__clockEvents = [];
      Object.defineProperty(window, 'plaza', {
        configurable: true,
        set(demo) {
          let client = demo.client;
          Object.defineProperty(demo, 'client', {
            enumerable: true,
            get: () => client,
            set(c) {
              client = c;
              c?.on('clock', (d) => window.__clockEvents.push(d));
            },
          });
          Object.defineProperty(window, 'plaza', { value: demo, writable: true, configurable: true });
        },
      });
    });
    await checkClock(p, `clock-${Date.now()}`);
    const events = await p.page.evaluate(() => window.__clockEvents);
    const now = await p.page.evaluate(() => window.plaza.client.clock);
    assert.ok(events.length >= 1, 'a clock event');
    // The first sample made the estimate, so its event has samples: 1.
    assert.equal(events[0].samples, 1, JSON.stringify(events));
    assert.deepEqual({ offset: events.at(-1).offset, rtt: events.at(-1).rtt }, { offset: now.offset, rtt: now.rtt });
  });

  it('Firefox: serverNow() is the server clock within rtt/2 soon after joining', async () => {
    const p = await launchFirefoxParticipant('clock-firefox');
    open.add(p);
    await checkClock(p, `clock-ff-${Date.now()}`);
  });
});
