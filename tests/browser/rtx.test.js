// RTX (RFC 4588) with Chromium on both ends, each behind a lossy link (5 % random loss and
// 20 ms delay on its UDP flow, both directions: tests/browser/impair.py behind iptables
// NFQUEUE rules, harness.js impairUdp). Asserts that
//  (a) both connections negotiated RTX: the server's subscribe offer announces an RTX stream
//      for the video (`a=ssrc-group:FID`, `rtx/90000`) and the subscriber's answer keeps it;
//      the server's answer to the publisher has `rtx/90000` too;
//  (b) under loss the subscriber's inbound video counts retransmissions
//      (`retransmittedPacketsReceived` > 0: what arrives on the RTX stream), and the server
//      sent every retransmission on RTX (`nack_resent_rtx` > 0, `nack_resent_media` = 0);
//  (c) the publisher's own repairs arrive on its RTX streams and the server's fast path
//      forwards them (`publisher_rtx_repaired` > 0);
// and prints the counters. Runs inside the loopback-only network namespace of
// scripts/browser-tests.sh (it changes iptables rules).
import { describe, it, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, participants, joinViaUrl, waitFor, requireLoopbackOnly, selectedCandidatePairs, whileImpaired } from './harness.js';

// Its own ports, so that it never meets another test file's server.
const PORT = 7930;
const UDP_PORT = 7932;
const LOSS = 0.05;
const DELAY_MS = 20;
const IMPAIR_MS = 12_000;

let server;
const browsers = participants();
const participant = (label) => browsers.launch(label);

before(async () => {
  requireLoopbackOnly();
  // No ICE-TCP: both stay on their (impaired) UDP paths.
  server = await startServer({ logName: 'plaza-rtx.log', port: PORT, udpPort: UDP_PORT, args: ['--tcp-port', 'off'] });
});

after(async () => {
  await browsers.closeAll();
  await server?.stop();
});

/** Join as a receive-only client that plays what it gets; window.__client is the client. */
async function joinReceiving(p, room) {
  await p.page.goto(`${server.url}/`);
  await p.page.evaluate(async (room) => {
    const { PlazaClient } = await import('/plaza-client.js');
    const c = new PlazaClient({ room, name: 'subscriber', adaptiveStream: false, reconnect: false });
    window.__client = c;
    c.on('trackadded', ({ trackId, kind }) => {
      const el = document.createElement(kind === 'video' ? 'video' : 'audio');
      document.body.append(el);
      c.attach(trackId, el);
    });
    await c.connect();
  }, room);
}

/** The subscriber's inbound video: counters and the codecs of its connection. */
const inboundVideo = (p) =>
  p.page.evaluate(async () => {
    const c = window.__client;
    for (const rt of c.remoteTracks.values()) {
      if (rt.kind !== 'video' || !rt.receiver) continue;
      const report = await rt.receiver.getStats();
      let inbound = null;
      const codecs = [];
      report.forEach((s) => {
        if (s.type === 'inbound-rtp') inbound = s;
        if (s.type === 'codec') codecs.push(s.mimeType);
      });
      if (!inbound) continue;
      return {
        framesDecoded: inbound.framesDecoded ?? 0,
        packetsReceived: inbound.packetsReceived ?? 0,
        packetsLost: inbound.packetsLost ?? 0,
        nackCount: inbound.nackCount ?? 0,
        retransmittedPacketsReceived: inbound.retransmittedPacketsReceived ?? null,
        retransmittedBytesReceived: inbound.retransmittedBytesReceived ?? null,
        codecs,
      };
    }
    return null;
  });

const stats = () => fetch(`${server.url}/stats`).then((r) => r.json());

describe('RTX with Chromium on a lossy link (5 % loss both ways)', { timeout: 180_000 }, () => {
  it('negotiates RTX both ways and repairs losses on the RTX streams', async () => {
    const room = `rtx-${Date.now()}`;
    const pub = await participant('rtx-publisher');
    await joinViaUrl(pub, server.url, room, 'publisher');
    const sub = await participant('rtx-subscriber');
    await joinReceiving(sub, room);
    await waitFor(async () => ((await inboundVideo(sub))?.framesDecoded ?? 0) > 30, {
      timeout: 30_000,
      what: 'the subscriber to decode video',
    });

    // (a) What was negotiated.
    const subSdp = await sub.page.evaluate(() => ({
      offer: window.__client._sess.sub.remoteDescription.sdp,
      answer: window.__client._sess.sub.localDescription.sdp,
    }));
    const video = (sdp) => sdp.split(/\r?\nm=/).find((m) => m.startsWith('video')) ?? '';
    assert.match(video(subSdp.offer), /a=rtpmap:\d+ rtx\/90000/, 'rtx in the subscribe offer');
    assert.match(video(subSdp.offer), /a=ssrc-group:FID \d+ \d+/, 'an RTX SSRC for the video');
    assert.match(video(subSdp.answer), /a=rtpmap:\d+ rtx\/90000/, 'the subscriber kept rtx');
    const pubAnswer = await pub.page.evaluate(() => window.plaza.client._sess.pub.remoteDescription.sdp);
    assert.match(video(pubAnswer), /a=rtpmap:\d+ rtx\/90000/, 'rtx in the publish answer');

    const subPort = (await selectedCandidatePairs(sub)).subscriber?.local?.port;
    const pubPort = (await selectedCandidatePairs(pub)).publisher?.local?.port;
    assert.ok(subPort > 0 && pubPort > 0, `ports ${subPort} ${pubPort}`);

    const before = await stats();
    const inBefore = await inboundVideo(sub);
    const { counters } = await whileImpaired([subPort, pubPort], { loss: LOSS, delayMs: DELAY_MS, uplink: true }, () =>
      new Promise((r) => setTimeout(r, IMPAIR_MS)),
    );
    // The last repairs arrive.
    await new Promise((r) => setTimeout(r, 1_000));
    const after = await stats();
    const inAfter = await inboundVideo(sub);
    const d = (k) => after[k] - before[k];
    console.log(`# impairment: subscriber ${JSON.stringify(counters[0])}, publisher ${JSON.stringify(counters[1])}`);
    console.log(
      `# subscriber inbound video: +${inAfter.packetsReceived - inBefore.packetsReceived} packets, ` +
        `+${inAfter.packetsLost - inBefore.packetsLost} lost, +${inAfter.nackCount - inBefore.nackCount} NACKs, ` +
        `+${inAfter.retransmittedPacketsReceived - inBefore.retransmittedPacketsReceived} retransmitted packets received; codecs ${inAfter.codecs.join(' ')}`,
    );
    console.log(
      `# server: NACKed ${d('nack_requested')}, resent ${d('nack_resent')} (rtx ${d('nack_resent_rtx')}, media ${d('nack_resent_media')}), ` +
        `refused ${d('nack_refused')}, over budget ${d('nack_over_budget')}; ` +
        `from the publisher: NACKed ${d('nack_sent_to_publishers')}, RTX repaired ${d('publisher_rtx_repaired')}, ` +
        `duplicate ${d('publisher_rtx_duplicate')}, padding ${after.publisher_rtx_padding} (since the start)`,
    );

    // The impairment was real.
    assert.ok(counters[0].downlink.dropped > 20, JSON.stringify(counters[0]));
    assert.ok(counters[1].uplink.dropped > 20, JSON.stringify(counters[1]));
    // (b) Repairs to the subscriber on its RTX stream.
    assert.ok(inAfter.retransmittedPacketsReceived !== null, 'Chromium reports retransmittedPacketsReceived');
    assert.ok(inAfter.retransmittedPacketsReceived - inBefore.retransmittedPacketsReceived > 0, JSON.stringify(inAfter));
    assert.ok(d('nack_resent_rtx') > 0, JSON.stringify(after));
    assert.equal(d('nack_resent_media'), 0);
    // (c) The publisher's repairs, unwrapped and forwarded.
    assert.ok(d('publisher_rtx_repaired') > 0, JSON.stringify(after));
    // Video kept playing.
    assert.ok(inAfter.framesDecoded > inBefore.framesDecoded + 100, `${inBefore.framesDecoded} → ${inAfter.framesDecoded}`);
  });
});
