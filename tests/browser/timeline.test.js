// The room timeline in plaza-client.js and the demo page (README.md §7 "Room timeline"):
// every chat message and room event carries the room's `seq` and the server's `ts`, so every
// page shows one order; the client's own messages get theirs from the server's acknowledgement;
// a late joiner replays the recent timeline with `history`; the demo's buzzer names the press
// with the lowest seq. Chromium and Firefox in one room (a foreign WebRTC stack on each side).
// Run in a loopback-only network namespace (scripts/browser-tests.sh).
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { execFileSync } from 'node:child_process';
import { ARTIFACTS, startServer, launchParticipant, launchFirefoxParticipant, joinViaUrl, waitFor, loopbackOnly } from './harness.js';
import { PlazaClient, decodeEnvelope, decodeTickBatch } from '../../signaling/plaza-client.js';

const BURST = 25; // chat messages each page sends at once
let server;
const open = new Set();

before(async () => {
  if (!loopbackOnly()) console.warn('warning: not in a loopback-only network namespace (run scripts/browser-tests.sh)');
  server = await startServer({ logName: 'plaza-timeline.log' });
});

after(async () => {
  const all = [...open];
  open.clear();
  await Promise.all(all.map((p) => p.close()));
  await server?.stop();
});

async function track(launching) {
  const p = await launching;
  open.add(p);
  return p;
}

/** Join the demo page without camera (chat only) and wait for the chat channel. */
async function joinChat(p, room, name) {
  await joinViaUrl(p, server.url, room, name, '&publish=0');
  await waitFor(() => p.page.evaluate(() => window.plaza.client.channelOpen('chat')), { timeout: 15_000, what: `${p.label}'s chat channel to open` });
  return p.page.evaluate(() => window.plaza.client.participantId);
}

/** The page client's timeline, as plain data. */
const timelineOf = (p) =>
  p.page.evaluate(() =>
    window.plaza.client.timeline.map((e) => ({
      seq: e.seq,
      ts: e.ts,
      from: e.from,
      event: e.event,
      text: e.event ? null : e.text,
      mine: e.mine,
      id: e.event ? (e.data?.participant?.id ?? e.data?.participant_id ?? null) : null,
    })),
  );

/** The demo page's chat lines that have a timeline seq, in DOM order. */
const domLines = (p) =>
  p.page.$$eval('#chat-log li', (els) =>
    els.map((li) => ({
      seq: li.dataset.seq === undefined ? null : Number(li.dataset.seq),
      text: li.querySelector('.text')?.textContent ?? '',
      time: li.querySelector('time')?.textContent ?? null,
      pending: li.classList.contains('pending'),
    })),
  );

const strictlyIncreasing = (seqs) => seqs.every((s, i) => i === 0 || s > seqs[i - 1]);

describe('wire format (node)', () => {
  it('decodes stamped headers and input tick batches', () => {
    const enc = new TextEncoder();
    const ev = decodeEnvelope('{"from":"server","seq":7,"ts":1796533329123456,"event":"participant_joined"}\n{"type":"participant_joined"}');
    assert.deepEqual(ev.header, { from: 'server', seq: 7, ts: 1796533329123456, event: 'participant_joined' });
    assert.equal(ev.text, '{"type":"participant_joined"}');
    const entries = [enc.encode('{"from":"PA_a","seq":3,"ts":5,"text":true}\nhé\nllo'), new Uint8Array([...enc.encode('{"from":"PA_b","seq":4,"ts":6}\n'), 0, 255, 10, 128])];
    const parts = entries.flatMap((e) => {
      const len = new Uint8Array(4);
      new DataView(len.buffer).setUint32(0, e.length);
      return [...len, ...e];
    });
    const msg = new Uint8Array([...enc.encode('{"from":"server","tick":9,"ts":10,"count":2}\n'), ...parts]);
    const batch = decodeEnvelope(msg.buffer);
    assert.deepEqual(batch.header, { from: 'server', tick: 9, ts: 10, count: 2 });
    const got = decodeTickBatch(batch.data);
    assert.equal(got.length, 2);
    assert.deepEqual([got[0].binary, got[0].text, got[0].header.seq], [false, 'hé\nllo', 3]);
    assert.deepEqual([got[1].binary, [...got[1].data], got[1].header.from], [true, [0, 255, 10, 128], 'PA_b']);
    assert.throws(() => decodeTickBatch(batch.data.subarray(0, batch.data.length - 1)), /runs past the end/);
  });
});

describe('client timeline logic (node, a fake session)', () => {
  it('sseq and acks, own messages on the timeline, room events, dedup by seq, history, ticks', async () => {
    const client = new PlazaClient({ room: 'r', name: 'me', url: 'ws://127.0.0.1:9/rtc', ackTimeout: 5_000 });
    const sent = [];
    const wsSent = [];
    const sess = {
      joined: true,
      closed: false,
      wsDown: false,
      outbox: [],
      channels: { chat: { readyState: 'open', send: (m) => sent.push(m) }, input: { readyState: 'open', send: (m) => sent.push(m) } },
      ws: { readyState: 1, send: (m) => wsSent.push(JSON.parse(m)), close() {} },
      acks: { chat: new Map(), input: new Map() },
      tl: { seen: new Set(), lastSeq: 0, duplicates: 0 },
      historyReqs: [],
      mids: new Map(),
    };
    client._sess = sess;
    client.participantId = 'PA_me';
    const events = [];
    for (const t of ['chat', 'input', 'timeline', 'tick', 'history']) client.on(t, (d) => events.push([t, d]));
    const rx = (label, text) => client._onData(sess, label, decodeEnvelope(text));
    const take = (type) => events.splice(0).filter(([t]) => !type || t === type);

    assert.equal(client.sendChat('hi'), 1);
    assert.deepEqual(JSON.parse(sent[0].split('\n')[0]), { sseq: 1, ack: true }, 'chat asks for an ack (chatAcks)');
    assert.equal(client.sendInput('x', { to: ['PA_b'] }), 1);
    assert.deepEqual(JSON.parse(sent[1].split('\n')[0]), { sseq: 1, to: ['PA_b'] });
    const acked = client.sendChat('hello', { ack: true });
    assert.deepEqual(JSON.parse(sent[2].split('\n')[0]), { sseq: 2, ack: true });
    rx('chat', '{"ack":2,"seq":5,"ts":5000}\n');
    assert.deepEqual(await acked, { sseq: 2, seq: 5, ts: 5000, tick: null, dup: false });
    rx('chat', '{"from":"PA_b","seq":4,"ts":4000,"sseq":9}\nearlier');
    rx('chat', '{"from":"server","seq":3,"ts":3000,"event":"participant_joined"}\n{"type":"participant_joined","participant":{"id":"PA_b","name":"b","tracks":[]}}');
    rx('chat', '{"from":"PA_b","seq":4,"ts":4000,"sseq":9}\nearlier'); // a duplicate seq
    const ev = take();
    assert.deepEqual(
      ev.map(([t, d]) => [t, d.seq, d.mine, d.event]),
      [
        ['timeline', 5, true, null],
        ['chat', 4, false, null],
        ['timeline', 4, false, null],
        ['timeline', 3, false, 'participant_joined'],
      ],
    );
    assert.equal(ev[1][1].sseq, 9);
    assert.equal(ev[3][1].data.participant.name, 'b');
    assert.deepEqual(client.timeline.map((e) => e.seq), [3, 4, 5]);
    assert.equal(client.lastSeq, 5);

    const hist = client.history(0);
    assert.deepEqual(wsSent.at(-1), { type: 'history', since: 0 });
    rx('chat', '{"from":"PA_c","seq":2,"ts":2000,"replay":true}\nbefore');
    rx('chat', '{"from":"server","seq":3,"ts":3000,"event":"participant_joined","replay":true}\n{}');
    await client._onMessage(sess, { type: 'history', since: 0, oldest: 2, latest: 5, replayed: 4, complete: true });
    rx('chat', '{"from":"PA_b","seq":4,"ts":4000,"replay":true}\nearlier');
    rx('chat', '{"from":"PA_me","seq":5,"ts":5000,"replay":true}\nhello');
    const h = await hist;
    assert.deepEqual(
      h.messages.map((m) => [m.seq, m.replay, m.duplicate]),
      [
        [2, true, false],
        [3, true, true],
        [4, true, true],
        [5, true, true],
      ],
    );
    assert.deepEqual([h.oldest, h.latest, h.complete, h.auto], [2, 5, true, false]);
    assert.deepEqual(
      take().map(([t, d]) => [t, d.seq ?? null]),
      [
        ['chat', 2],
        ['timeline', 2],
        ['history', null],
      ],
      'only the new one is delivered',
    );
    assert.deepEqual(client.timeline.map((e) => e.seq), [2, 3, 4, 5]);

    // an input tick batch: a tick event with all, input events for the others'
    const enc = new TextEncoder();
    const entry = (s) => {
      const b = enc.encode(s);
      const len = new Uint8Array(4);
      new DataView(len.buffer).setUint32(0, b.length);
      return [...len, ...b];
    };
    const batch = new Uint8Array([...enc.encode('{"from":"server","tick":12,"ts":9,"count":2}\n'), ...entry('{"from":"PA_me","seq":7,"ts":8,"text":true}\nmine'), ...entry('{"from":"PA_b","seq":8,"ts":8,"text":true}\ntheirs')]);
    client._onData(sess, 'input', decodeEnvelope(batch.buffer));
    const tk = take();
    assert.deepEqual(
      tk.map(([t, d]) => [t, d.tick, t === 'tick' ? d.inputs.map((i) => [i.from, i.text, i.mine, i.tick]) : d.text]),
      [
        [
          'tick',
          12,
          [
            ['PA_me', 'mine', true, 12],
            ['PA_b', 'theirs', false, 12],
          ],
        ],
        ['input', 12, 'theirs'],
      ],
    );
    // an input ack names its tick; a duplicate says so
    const inAck = client.sendInput('y', { ack: true });
    rx('input', '{"ack":2,"seq":9,"ts":9,"tick":13}\n');
    assert.deepEqual(await inAck, { sseq: 2, seq: 9, ts: 9, tick: 13, dup: false });
    const dupAck = client.sendChat('again', { ack: true });
    rx('chat', '{"ack":3,"dup":true,"seq":5,"ts":5000}\n');
    assert.equal((await dupAck).dup, true);
    assert.equal(take('timeline').length, 0, 'a duplicate is not a new timeline entry');
    // closing the session rejects what is still awaited
    const lost = client.sendChat('lost', { ack: true });
    client._closeSession(sess, 'test over');
    await assert.rejects(lost, (e) => e.code === 'unavailable');
  });
});

describe('room timeline: Chromium and Firefox', { timeout: 300_000 }, () => {
  const room = `timeline-${Date.now()}`;
  let ann;
  let bob;
  let ids;

  before(async () => {
    [ann, bob] = await Promise.all([track(launchParticipant('ann')), track(launchFirefoxParticipant('bob'))]);
    const annId = await joinChat(ann, room, 'ann');
    const bobId = await joinChat(bob, room, 'bob');
    ids = { ann: annId, bob: bobId };
  });

  it('both pages see bob join at the same seq, in the chat log', async () => {
    const bobJoin = (p) => timelineOf(p).then((t) => t.find((e) => e.event === 'participant_joined' && e.id === ids.bob));
    const [a, b] = await Promise.all([ann, bob].map((p) => waitFor(() => bobJoin(p), { timeout: 10_000, what: `${p.label} to see bob's join on the timeline` })));
    assert.equal(a.seq, b.seq);
    assert.equal(a.ts, b.ts);
    // ann's own join came first, on both pages' terms
    const annJoin = (await timelineOf(ann)).find((e) => e.event === 'participant_joined' && e.id === ids.ann);
    assert.ok(annJoin && annJoin.seq < a.seq, JSON.stringify(annJoin));
    const line = (await domLines(ann)).find((l) => l.seq === a.seq);
    assert.equal(line?.text, 'bob joined');
    assert.match(line.time, /^\d\d:\d\d:\d\d\.\d{3}$/);
  });

  it('a burst from each at once: every page has the same (seq, from, text) sequence, and shows it in that order', async () => {
    for (const [p, label] of [
      [ann, 'ann'],
      [bob, 'bob'],
    ]) {
      // Each page sends its burst when it sees "GO" on the timeline (ann: her own, acknowledged).
      await p.page.evaluate(
        ({ label, n }) => {
          const c = window.plaza.client;
          window.__burst = new Promise((resolve, reject) => {
            const off = c.on('timeline', (e) => {
              if (e.text !== 'GO') return;
              off();
              // Paced (one every 4 ms), so the two bursts overlap even if one page sees GO
              // a little later than the other.
              const acks = [];
              let i = 0;
              const next = () => {
                acks.push(c.sendChat(`${label}-${i}`, { ack: true }));
                if (++i < n) setTimeout(next, 4);
                else Promise.all(acks).then(resolve, reject);
              };
              next();
            });
          });
        },
        { label, n: BURST },
      );
    }
    await ann.page.evaluate(() => window.plaza.client.sendChat('GO'));
    const [annAcks, bobAcks] = await Promise.all([ann, bob].map((p) => p.page.evaluate(() => window.__burst)));
    const total = 2 * BURST + 1;
    const chatFrom = async (p) => {
      const t = await timelineOf(p);
      const go = t.find((e) => e.text === 'GO');
      return go ? t.filter((e) => !e.event && e.seq >= go.seq) : [];
    };
    const [a, b] = await Promise.all(
      [ann, bob].map((p) => waitFor(async () => ((await chatFrom(p)).length >= total ? chatFrom(p) : null), { timeout: 15_000, what: `${p.label} to have all ${total} messages` })),
    );
    const key = (t) => t.map((e) => [e.seq, e.from, e.text]);
    assert.deepEqual(key(a), key(b), 'the same sequence on both pages');
    assert.equal(a.length, total);
    assert.ok(strictlyIncreasing(a.map((e) => e.seq)), JSON.stringify(a.map((e) => e.seq)));
    // chat seqs have no gaps (no messages to others only here)
    assert.equal(a.at(-1).seq - a[0].seq, total - 1);
    // Own messages: the acknowledged seq is where the other page has them.
    const seqOf = (t, text) => t.find((e) => e.text === text)?.seq;
    annAcks.forEach((ack, i) => assert.equal(ack.seq, seqOf(b, `ann-${i}`), `ann-${i}`));
    bobAcks.forEach((ack, i) => assert.equal(ack.seq, seqOf(a, `bob-${i}`), `bob-${i}`));
    assert.ok(a.filter((e) => e.from === ids.ann).every((e) => e.mine === true) && b.filter((e) => e.from === ids.bob).every((e) => e.mine === true));
    // each sender's messages in the order sent
    for (const [label, id] of Object.entries(ids)) {
      assert.deepEqual(
        a.filter((e) => e.from === id && e.text !== 'GO').map((e) => e.text),
        Array.from({ length: BURST }, (_, i) => `${label}-${i}`),
      );
    }
    const switches = a.slice(1).filter((e, i) => e.from !== a[i].from).length;
    console.log(`# burst: ${total} messages, seq ${a[0].seq}…${a.at(-1).seq}, the sender changes ${switches} times along the timeline`);
    // The demo's chat log: the same lines in the same order on both pages (own lines included),
    // none left pending.
    const shown = async (p) => {
      const lines = await domLines(p);
      const first = lines.findIndex((l) => l.text === 'GO');
      return first < 0 ? [] : lines.slice(first);
    };
    const [da, db] = await Promise.all(
      [ann, bob].map((p) => waitFor(async () => ((await shown(p)).length >= total ? shown(p) : null), { timeout: 10_000, what: `${p.label}'s chat log to show all ${total} lines` })),
    );
    assert.deepEqual(
      da.map((l) => [l.seq, l.text]),
      a.map((e) => [e.seq, e.text]),
      "ann's chat log in timeline order",
    );
    assert.deepEqual(
      db.map((l) => [l.seq, l.text]),
      a.map((e) => [e.seq, e.text]),
      "bob's chat log in timeline order",
    );
    assert.ok(da.concat(db).every((l) => !l.pending && /^\d\d:\d\d:\d\d\.\d{3}$/.test(l.time)));
    await ann.page.screenshot({ path: join(ARTIFACTS, 'timeline-burst.png') });
  });

  it('sendChat(…, {ack: true}) resolves with the seq and ts the other page sees', async () => {
    await bob.page.evaluate(() => {
      window.__probe = new Promise((resolve) => {
        const off = window.plaza.client.on('chat', (m) => {
          if (m.text !== 'ack-probe') return;
          off();
          resolve({ seq: m.seq, ts: m.ts, sseq: m.sseq, from: m.from, replay: m.replay });
        });
      });
    });
    const ack = await ann.page.evaluate(async () => {
      const c = window.plaza.client;
      const before = c.serverNow();
      const t0 = performance.now();
      const r = await c.sendChat('ack-probe', { ack: true });
      return { ...r, before, after: c.serverNow(), ms: performance.now() - t0, rtt: c.clock?.rtt ?? null };
    });
    const seen = await waitFor(() => bob.page.evaluate(() => Promise.race([window.__probe, new Promise((r) => setTimeout(() => r(null), 200))])), {
      timeout: 10_000,
      what: 'bob to receive ack-probe',
    });
    console.log(`# ack: seq ${ack.seq} after ${ack.ms.toFixed(1)} ms; ts − sender's serverNow() at send = ${(ack.ts / 1000 - ack.before).toFixed(2)} ms`);
    assert.deepEqual({ seq: seen.seq, ts: seen.ts, sseq: seen.sseq, from: seen.from, replay: seen.replay }, { seq: ack.seq, ts: ack.ts, sseq: ack.sseq, from: ids.ann, replay: false });
    assert.equal(ack.dup, false);
    // The server took it between the send and the ack, on the clock serverNow() estimates
    // (one machine: the estimate is within rtt/2; 2 ms for coarse browser clocks).
    const slack = (ack.rtt ?? 0) / 2 + 2;
    assert.ok(ack.ts / 1000 >= ack.before - slack && ack.ts / 1000 <= ack.after + slack, JSON.stringify(ack));
  });

  it('the buzzer: both press at once, both pages name the same winner, the lower seq', async () => {
    await Promise.all([ann, bob].map((p) => p.page.waitForSelector('#buzz:not([disabled])', { timeout: 10_000 })));
    const round = await ann.page.evaluate(() => window.plaza.buzzer.round);
    await Promise.all([ann.page.click('#buzz'), bob.page.click('#buzz')]);
    const presses = (p) =>
      p.page.evaluate(() => ({
        round: window.plaza.buzzer.round,
        list: [...document.querySelectorAll('#buzz-presses li')].map((li) => ({ seq: Number(li.dataset.seq), from: li.dataset.from, winner: li.classList.contains('winner'), text: li.textContent })),
        winner: document.querySelector('#buzz-winner').dataset.winner,
        presses: (window.plaza.buzzer.rounds.get(window.plaza.buzzer.round) ?? []).map((x) => ({ seq: x.seq, ts: x.ts, from: x.from })),
      }));
    const [a, b] = await Promise.all([ann, bob].map((p) => waitFor(async () => ((await presses(p)).list.length === 2 ? presses(p) : null), { timeout: 10_000, what: `${p.label} to show both presses` })));
    assert.equal(a.round, round);
    assert.deepEqual(
      a.list.map((x) => [x.seq, x.from]),
      b.list.map((x) => [x.seq, x.from]),
    );
    assert.deepEqual(a.presses, b.presses);
    assert.ok(a.list[0].seq < a.list[1].seq);
    assert.equal(a.winner, a.list[0].from);
    assert.equal(b.winner, a.list[0].from);
    assert.deepEqual(new Set(a.list.map((x) => x.from)), new Set([ids.ann, ids.bob]));
    assert.ok(a.list[0].winner && !a.list[1].winner && b.list[0].winner);
    const gap = (a.presses[1].ts - a.presses[0].ts) / 1000;
    assert.ok(gap >= 0, `ts never decreases along seq (${gap} ms)`);
    assert.match(a.list[1].text, new RegExp(`\\+${gap.toFixed(1).replace('.', '\\.')} ms$`));
    console.log(`# buzzer: ${a.list[0].from === ids.ann ? 'ann (Chromium)' : 'bob (Firefox)'} won by ${gap.toFixed(3)} ms (seq ${a.list[0].seq} vs ${a.list[1].seq})`);
    // both may press only once per round
    assert.deepEqual(await Promise.all([ann, bob].map((p) => p.page.evaluate(() => document.querySelector('#buzz').disabled))), [true, true]);
    // a new round, from bob: both pages move on and may press again
    await bob.page.click('#buzz-new');
    for (const p of [ann, bob]) {
      await waitFor(() => p.page.evaluate((r) => window.plaza.buzzer.round === r + 1 && !document.querySelector('#buzz').disabled, round), { timeout: 10_000, what: `${p.label} to start round ${round + 1}` });
      assert.equal(await p.page.evaluate(() => document.querySelector('#buzz-winner').dataset.winner), '');
      // the finished round stays listed with its winner
      assert.equal(await p.page.evaluate((r) => document.querySelector(`#buzz-past li[data-round="${r}"]`)?.dataset.winner, round), a.winner);
    }
  });

  it('a late joiner replays the timeline with history(0): replay:true, in seq order, the seqs the others saw', async () => {
    const dan = await track(launchParticipant('dan'));
    const danId = await joinChat(dan, room, 'dan');
    const annTimeline = await timelineOf(ann);
    // Asked explicitly (after the demo page's own history(0) on joining, which went first):
    // everything is replayed, and dropped as already delivered.
    const res = await dan.page.evaluate(async () => {
      const c = window.plaza.client;
      let chats = 0;
      let timeline = 0;
      const offs = [c.on('chat', () => chats++), c.on('timeline', () => timeline++)];
      let r;
      try {
        r = await c.history(0);
      } catch (e) {
        return { error: `${e.code}: ${e.message}` };
      } finally {
        offs.forEach((off) => off());
      }
      return {
        reply: { since: r.since, oldest: r.oldest, latest: r.latest, replayed: r.replayed, complete: r.complete },
        messages: r.messages.map((m) => ({ seq: m.seq, from: m.from, text: m.event ? null : m.text, event: m.event, replay: m.replay, duplicate: m.duplicate })),
        chats,
        timeline,
      };
    });
    assert.equal(res.error, undefined, 'history(0) failed');
    // The demo page asks for history(0) itself on joining: its chat log shows what was said.
    const lines = await waitFor(
      async () => {
        const l = await domLines(dan);
        return l.some((x) => x.text === 'GO') && l.some((x) => x.text === 'ack-probe') ? l : null;
      },
      { timeout: 10_000, what: "dan's chat log to show the earlier messages" },
    );
    const seqLines = lines.filter((l) => l.seq !== null);
    assert.ok(strictlyIncreasing(seqLines.map((l) => l.seq)), JSON.stringify(seqLines.map((l) => l.seq)));
    const annShown = (await domLines(ann)).filter((l) => l.seq !== null && l.seq < seqLines.find((x) => x.text === 'dan joined' || x.text === 'you joined').seq);
    const danShown = seqLines.filter((l) => l.seq <= annShown.at(-1).seq);
    // The same lines in the same order as on ann's page, except her own joining ("you joined").
    assert.deepEqual(
      danShown.map((l) => [l.seq, l.text]),
      annShown.map((l) => [l.seq, l.text === 'you joined' ? 'ann joined' : l.text]),
    );
    // The buzzer caught up from the replay: round 2 on, round 1's presses as on ann's page.
    const buzz = (p) => p.page.evaluate(() => ({ round: window.plaza.buzzer.round, presses: [...window.plaza.buzzer.rounds.entries()].map(([r, l]) => [r, l.map((x) => x.seq)]) }));
    assert.deepEqual(await buzz(dan), await buzz(ann));

    assert.equal(res.reply.since, 0);
    assert.equal(res.reply.complete, true);
    assert.equal(res.reply.replayed, res.messages.length);
    assert.ok(res.messages.length >= 2 * BURST + 3, `${res.messages.length} replayed`);
    assert.ok(res.messages.every((m) => m.replay === true && m.duplicate === true), 'replay:true, all already delivered');
    assert.ok(strictlyIncreasing(res.messages.map((m) => m.seq)));
    assert.equal(res.reply.latest, res.messages.at(-1).seq);
    assert.deepEqual([res.chats, res.timeline], [0, 0], 'duplicates are not delivered again');
    // What was said before dan came is replayed with the seqs ann saw.
    const annChat = annTimeline.filter((e) => !e.event).map((e) => [e.seq, e.from, e.text]);
    const replayedChat = res.messages.filter((m) => !m.event && m.seq <= annChat.at(-1)[0]).map((m) => [m.seq, m.from, m.text]);
    assert.deepEqual(replayedChat, annChat);
    assert.ok(res.messages.some((m) => m.event === 'participant_joined'));
    // dan's join is on the others' timeline too, and when dan leaves, both see it at one seq
    await dan.close();
    open.delete(dan);
    const left = (p) => timelineOf(p).then((t) => t.find((e) => e.event === 'participant_left' && e.id === danId));
    const [la, lb] = await Promise.all([ann, bob].map((p) => waitFor(() => left(p), { timeout: 20_000, what: `${p.label} to see dan leave` })));
    assert.equal(la.seq, lb.seq);
    const annLines = await domLines(ann);
    assert.equal(annLines.find((l) => l.seq === la.seq)?.text, 'dan left');
  });

  it('after a resume the client asks for the history since the last seq it saw; nothing is delivered twice', async () => {
    const port = new URL(server.url).port || '80';
    await ann.page.evaluate(() => {
      const c = window.plaza.client;
      window.__res = { events: [], texts: [] };
      for (const t of ['disconnected', 'reconnected', 'history']) c.on(t, (d) => window.__res.events.push({ t, resumed: d.resumed, auto: d.auto, since: d.since, replayed: d.replayed, lastSeq: c.lastSeq }));
      c.on('error', (e) => window.__res.events.push({ t: 'error', code: e.code, message: e.message }));
      c.on('chat', (m) => window.__res.texts.push(m.text));
    });
    const rule = ['-p', 'tcp', '--dport', port, '-j', 'REJECT', '--reject-with', 'tcp-reset'];
    execFileSync('iptables', ['-I', 'INPUT', ...rule]);
    let lastBefore;
    try {
      await ann.page.evaluate(() => window.plaza.client._sendOn(window.plaza.client._sess, { type: 'ping' }));
      await waitFor(() => ann.page.evaluate(() => window.__res.events.some((e) => e.t === 'disconnected')), { timeout: 15_000, what: 'ann to notice the cut' });
      lastBefore = await ann.page.evaluate(() => window.plaza.client.lastSeq);
      // Said while ann's signaling is down: the data channel still brings it.
      await bob.page.evaluate(() => window.plaza.client.sendChat('while-you-were-away'));
      await waitFor(() => ann.page.evaluate(() => window.__res.texts.includes('while-you-were-away')), { timeout: 10_000, what: 'ann to get the message over the data channel' });
    } finally {
      execFileSync('iptables', ['-D', 'INPUT', ...rule]);
    }
    const hist = await waitFor(
      async () => {
        const events = await ann.page.evaluate(() => window.__res.events);
        const failed = events.find((e) => e.t === 'error' && /history/.test(e.message));
        if (failed) throw new Error(`the history request after the resume failed: ${failed.code}: ${failed.message}`);
        return events.find((e) => e.t === 'history' && e.auto);
      },
      { timeout: 20_000, what: 'ann to resume and ask for history' },
    );
    const events = await ann.page.evaluate(() => window.__res.events);
    assert.equal(events.find((e) => e.t === 'reconnected')?.resumed, true, JSON.stringify(events));
    // since: the last seq seen when the request went out (the message said meanwhile included)
    assert.ok(hist.since >= lastBefore, JSON.stringify({ hist, lastBefore }));
    assert.equal(hist.replayed, 0, 'nothing was missed: the data channel ran on');
    const texts = await ann.page.evaluate(() => window.__res.texts);
    assert.equal(texts.filter((t) => t === 'while-you-were-away').length, 1);
  });
});

describe('input ticks', { timeout: 120_000 }, () => {
  it('inputs arrive batched per tick, the same batch on every page, own input included', async () => {
    const ticked = await startServer({ logName: 'plaza-timeline-ticks.log', args: ['--input-tick-hz', '20'], port: 7894, udpPort: 7896 });
    try {
      const [eve, fay] = await Promise.all([track(launchParticipant('eve')), track(launchFirefoxParticipant('fay'))]);
      const room = `ticks-${Date.now()}`;
      const join = async (p, name) => {
        await p.page.goto(`${ticked.url}/?room=${room}&name=${name}&publish=0`);
        await waitFor(() => p.page.evaluate(() => window.plaza?.client?.channelOpen('input') ?? false), { timeout: 15_000, what: `${p.label}'s input channel` });
        await p.page.evaluate(() => {
          window.__ticks = [];
          window.__inputs = [];
          window.plaza.client.on('tick', (t) => window.__ticks.push({ tick: t.tick, ts: t.ts, inputs: t.inputs.map((i) => ({ seq: i.seq, from: i.from, text: i.text, bytes: i.binary ? [...i.data] : null, tick: i.tick, mine: i.mine })) }));
          window.plaza.client.on('input', (m) => window.__inputs.push({ text: m.text, tick: m.tick }));
        });
        return p.page.evaluate(() => ({ id: window.plaza.client.participantId, hz: window.plaza.client.inputTickHz }));
      };
      const e = await join(eve, 'eve');
      const f = await join(fay, 'fay');
      assert.equal(e.hz, 20);
      // Unreliable channel: send until one pair of inputs made it into ticks on both pages.
      const acks = [];
      const got = await waitFor(
        async () => {
          const [ae, af] = await Promise.all([
            eve.page.evaluate(() => window.plaza.client.sendInput('e-move', { ack: true }).catch(() => null)),
            fay.page.evaluate(() => window.plaza.client.sendInput(new Uint8Array([1, 2, 10, 3]), { ack: true }).catch(() => null)),
          ]);
          acks.push(ae, af);
          const [te, tf] = await Promise.all([eve, fay].map((p) => p.page.evaluate(() => window.__ticks)));
          return te.length && tf.length && te.some((t) => t.inputs.some((i) => i.from === f.id)) && tf.some((t) => t.inputs.some((i) => i.from === e.id)) ? { te, tf } : null;
        },
        { timeout: 15_000, interval: 50, what: 'tick batches with both inputs' },
      );
      // The same batches on both pages (ticks both received), own inputs included.
      const byTick = (list) => new Map(list.map((t) => [t.tick, JSON.stringify(t.inputs.map((i) => [i.seq, i.from, i.text, i.bytes]))]));
      const me = byTick(got.te);
      const mf = byTick(got.tf);
      let common = 0;
      for (const [k, v] of me) if (mf.has(k)) (common++, assert.equal(v, mf.get(k), `tick ${k}`));
      assert.ok(common >= 1, 'a tick both pages received');
      const all = got.te.flatMap((t) => t.inputs);
      assert.ok(all.some((i) => i.from === e.id && i.mine && i.text === 'e-move'), "eve's own input in her batch");
      assert.ok(all.some((i) => i.from === f.id && !i.mine && i.text === null && JSON.stringify(i.bytes) === '[1,2,10,3]'), "fay's binary input");
      for (const t of got.te) assert.ok(strictlyIncreasing(t.inputs.map((i) => i.seq)) && t.inputs.every((i) => i.tick === t.tick));
      // acknowledgements name the tick the input went into
      const ok = acks.filter((a) => a && a.seq !== null);
      assert.ok(ok.length >= 1 && ok.every((a) => Number.isInteger(a.tick)), JSON.stringify(ok));
      // the per-message input event: others' inputs only, with their tick
      const inputs = await eve.page.evaluate(() => window.__inputs);
      assert.ok(inputs.length >= 1 && inputs.every((i) => i.text === null && Number.isInteger(i.tick)), JSON.stringify(inputs.slice(0, 3)));
    } finally {
      await ticked.stop();
    }
  });
});
