// The operator dashboard (/dashboard) in headless Chromium: it mints its own token in
// development mode, shows a room and its participant when a browser joins from the demo page
// and removes them when it leaves, by applying the stream's deltas (no reload, one snapshot).
// Run with scripts/browser-tests.sh (loopback-only network namespace, server started here).
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { ARTIFACTS, startServer, launchParticipant, joinViaForm, waitFor, loopbackOnly } from './harness.js';

let server;
const open = new Set();

async function browser(label) {
  const p = await launchParticipant(label);
  open.add(p);
  return p;
}

before(async () => {
  if (!loopbackOnly()) console.warn('warning: not in a loopback-only network namespace (run scripts/browser-tests.sh)');
  server = await startServer({ logName: 'plaza-dashboard.log' });
});

after(async () => {
  for (const p of open) {
    if (process.env.SHOW_BROWSER_LOGS) console.log(p.logs.join('\n'));
    await p.close();
  }
  await server?.stop();
});

const stats = (p) => p.page.evaluate(() => ({ ...window.plazaDashboard.stats }));

describe('the dashboard follows a room live', { timeout: 120_000 }, () => {
  const room = `dash-${Date.now()}`;
  let dash;
  let alice;
  let loadId;

  it('opens, mints a token and gets its snapshot', async () => {
    dash = await browser('dashboard');
    await dash.page.goto(`${server.url}/dashboard`);
    await waitFor(() => dash.page.$eval('#status', (e) => e.dataset.state === 'live'), { what: 'the dashboard stream to be live' });
    await waitFor(async () => (await stats(dash)).snapshots === 1, { what: 'the first snapshot' });
    loadId = (await stats(dash)).loadId;
    // Nobody in the room yet.
    assert.equal(await dash.page.$(`section.room[data-room="${room}"]`), null);
  });

  it('shows a room and a participant appearing, with its tracks, without a reload', async () => {
    alice = await browser('alice');
    await joinViaForm(alice, server.url, room, 'alice');
    const section = `section.room[data-room="${room}"]`;
    await waitFor(() => dash.page.$(section), { what: 'the room to appear on the dashboard' });
    await waitFor(
      () => dash.page.$$eval(`${section} .participant .name`, (els) => els.some((e) => e.textContent === 'alice')),
      { what: 'alice to appear in the room' },
    );
    // Her published tracks appear under her, with a bitrate once media flows.
    await waitFor(
      () => dash.page.$$eval(`${section} .participant .track`, (els) => els.some((e) => /video/.test(e.textContent) && /[kM]b\/s/.test(e.textContent))),
      { what: "alice's video track with its bitrate", timeout: 30_000 },
    );
    // Her video's chart draws (a canvas, sampled every second).
    await waitFor(
      () => dash.page.$$eval(`${section} .participant .track canvas`, (cs) => cs.some((c) => c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some((v, i) => i % 4 === 3 && v > 0))),
      { what: 'a bitrate chart to be drawn' },
    );
    // Server-wide numbers are shown.
    await waitFor(() => dash.page.$eval('#server-participants', (e) => Number(e.textContent) >= 1), { what: 'the participant count' });
    await waitFor(() => dash.page.$eval('#server-cpu', (e) => /%/.test(e.textContent)), { what: 'server CPU' });
    const s = await stats(dash);
    assert.equal(s.snapshots, 1, 'one snapshot: everything since came as deltas');
    assert.ok(s.deltas >= 1, `deltas applied: ${s.deltas}`);
    assert.equal(s.loadId, loadId, 'the page was not reloaded');
    const shot = join(ARTIFACTS, 'dashboard-room.png');
    await dash.page.screenshot({ path: shot, fullPage: true });
    console.log(`# screenshot: ${shot}; ${s.deltas} deltas, ${s.bytes} bytes so far`);
  });

  it('removes the participant and the room when she leaves', async () => {
    open.delete(alice);
    await alice.close();
    const section = `section.room[data-room="${room}"]`;
    await waitFor(async () => (await dash.page.$(section)) === null, { what: 'the room to disappear', timeout: 30_000 });
    const s = await stats(dash);
    assert.equal(s.snapshots, 1, 'still the one snapshot');
    assert.equal(s.loadId, loadId, 'the page was not reloaded');
  });

  it('refuses a stream without a token (401, JSON)', async () => {
    const res = await fetch(`${server.url}/dashboard/events`);
    assert.equal(res.status, 401);
    const body = await res.json();
    assert.equal(body.code, 'token_missing');
  });
});
