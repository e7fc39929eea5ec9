// Active speakers with two Chromium pages on the demo: each page's microphone is a tone from
// an AudioContext (an oscillator behind a gain node) that the test turns on and off — silence
// is digital zero, which Chromium sends with the audio level 127. The pages speak in turn; the
// client's `speakers` event and the demo's ring (class `speaking` on the tile) follow the page
// with the tone, on both pages. The change latency — from the tone turned on to the speaker's
// own page receiving a `speakers` message naming it first (one clock) — is printed.
// Run in a loopback-only network namespace (scripts/browser-tests.sh).
import { it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchParticipant, joinViaUrl, remoteStats, waitFor, loopbackOnly, percentile } from './harness.js';

let server;
const open = new Set();

before(async () => {
  if (!loopbackOnly()) console.warn('warning: not in a loopback-only network namespace (run scripts/browser-tests.sh)');
  server = await startServer({ logName: 'plaza-speaker.log' });
});

after(async () => {
  const all = [...open];
  open.clear();
  await Promise.all(all.map((p) => p.close()));
  await server?.stop();
});

/**
 * The page's getUserMedia: the fake camera, and for audio a tone the test switches with
 * `window.__tone(on)` (returns the page time of the switch).
 */
function toneMicrophone() {
  const real = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
  navigator.mediaDevices.getUserMedia = async (constraints = {}) => {
    const stream = constraints.video ? await real({ video: constraints.video }) : new MediaStream();
    if (constraints.audio) {
      const ctx = new AudioContext();
      await ctx.resume();
      const osc = ctx.createOscillator();
      osc.frequency.value = 440;
      const gain = ctx.createGain();
      gain.gain.value = 0;
      const out = ctx.createMediaStreamDestination();
      osc.connect(gain).connect(out);
      osc.start();
      window.__tone = (on) => {
        gain.gain.setValueAtTime(on ? 0.5 : 0, ctx.currentTime);
        return performance.now();
      };
      stream.addTrack(out.stream.getAudioTracks()[0]);
    }
    return stream;
  };
}

/** Record every `speakers` event of the page's client: {t (page ms), ids}. */
function recordSpeakers(p) {
  return p.page.evaluate(() => {
    window.__speakers = [];
    window.plaza.client.on('speakers', ({ speakers }) => {
      window.__speakers.push({ t: performance.now(), ids: speakers.map((s) => s.participantId) });
    });
  });
}

/** The page's current speakers (participant ids, loudest first) and the ringed tiles. */
function speakersOf(p) {
  return p.page.evaluate(() => ({
    ids: window.plaza.client.speakers.map((s) => s.participantId),
    ringed: [...document.querySelectorAll('#grid .tile.speaking')].map((t) => t.dataset.participantId),
  }));
}

async function launch(name) {
  const p = await launchParticipant(name);
  open.add(p);
  await p.page.addInitScript(toneMicrophone);
  return p;
}

it('speakers follow the page with the tone, and the demo rings its tile', { timeout: 120_000 }, async () => {
  const room = `speaker-${Date.now()}`;
  const alice = await launch('alice');
  const bob = await launch('bob');
  await joinViaUrl(alice, server.url, room, 'alice');
  await joinViaUrl(bob, server.url, room, 'bob');
  for (const [p, other] of [
    [alice, 'bob'],
    [bob, 'alice'],
  ]) {
    await waitFor(async () => (await remoteStats(p)).some((s) => s.name === other && s.kind === 'audio' && s.packetsReceived > 50), {
      timeout: 30_000,
      what: `${p.label} to receive ${other}'s audio`,
    });
  }
  const pid = {
    alice: await alice.page.evaluate(() => window.plaza.client.participantId),
    bob: await bob.page.evaluate(() => window.plaza.client.participantId),
  };
  await recordSpeakers(alice);
  await recordSpeakers(bob);
  // Both silent: nobody speaks.
  await new Promise((r) => setTimeout(r, 1_500));
  for (const p of [alice, bob]) assert.deepEqual((await speakersOf(p)).ids, [], `${p.label}: nobody speaks in silence`);

  const latencies = [];
  const namedLatencies = [];
  const turns = [alice, bob, alice, bob, alice, bob];
  let previous = null;
  for (const speaker of turns) {
    const listener = speaker === alice ? bob : alice;
    const me = pid[speaker.label];
    if (previous) await previous.page.evaluate(() => window.__tone(false));
    const t0 = await speaker.page.evaluate(() => window.__tone(true));
    // The speaker's own page: a `speakers` message naming it first (its own clock).
    const t1 = await waitFor(
      () =>
        speaker.page.evaluate(
          ({ t0, me }) => window.__speakers.find((e) => e.t >= t0 && e.ids[0] === me)?.t ?? null,
          { t0, me },
        ),
      { timeout: 5_000, interval: 20, what: `${speaker.label} told it speaks` },
    );
    latencies.push(t1 - t0);
    const named = await speaker.page.evaluate(({ t0, me }) => window.__speakers.find((e) => e.t >= t0 && e.ids.includes(me)).t, { t0, me });
    namedLatencies.push(named - t0);
    // Then alone (the previous speaker stopped), on both pages; the demo rings the right tile.
    await waitFor(async () => JSON.stringify((await speakersOf(speaker)).ids) === JSON.stringify([me]), {
      timeout: 5_000,
      what: `${speaker.label} the only speaker on its own page`,
    });
    const seen = await waitFor(
      async () => {
        const s = await speakersOf(listener);
        return JSON.stringify(s.ids) === JSON.stringify([me]) && JSON.stringify(s.ringed) === JSON.stringify([me]) ? s : null;
      },
      { timeout: 5_000, what: `${listener.label} to ring ${speaker.label}'s tile only` },
    );
    assert.deepEqual(seen.ringed, [me]);
    assert.deepEqual((await speakersOf(speaker)).ringed, ['local'], `${speaker.label}: its own tile is ringed`);
    previous = speaker;
  }
  // Silence again: nobody, no ring.
  await previous.page.evaluate(() => window.__tone(false));
  for (const p of [alice, bob]) {
    await waitFor(async () => {
      const s = await speakersOf(p);
      return s.ids.length === 0 && s.ringed.length === 0;
    }, { timeout: 5_000, what: `${p.label}: nobody speaks after the tones` });
  }
  const summary = (what, values) => {
    const sorted = [...values].sort((a, b) => a - b);
    console.log(
      `# ${what} (${values.length} turns): min ${sorted[0].toFixed(0)} ms, median ${percentile(sorted, 0.5).toFixed(0)} ms, ` +
        `max ${sorted[sorted.length - 1].toFixed(0)} ms; all: ${values.map((l) => l.toFixed(0)).join(', ')}`,
    );
  };
  summary('tone on → speakers naming it', namedLatencies);
  summary('tone on → speakers naming it first', latencies);
  for (const l of latencies) assert.ok(l < 2_000, `a change took ${l.toFixed(0)} ms`);
  for (const p of [alice, bob]) {
    const errors = p.logs.filter((l) => l.includes('pageerror'));
    assert.deepEqual(errors, [], `${p.label}: no page errors`);
  }
});
