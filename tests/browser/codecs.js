// What the browsers here can do with video codecs: the codecs RTCRtpSender/RTCRtpReceiver
// report, and for each video codec whether a real encode and decode happens (two peer
// connections in one page, the codec forced first through setCodecPreferences, a canvas
// stream as the source). Prints a Markdown table per browser.
//
//   node tests/browser/codecs.js            (Chromium, then Firefox)
import { createServer } from 'node:http';
import { launchParticipant, launchFirefoxParticipant } from './harness.js';

// A secure-context page (127.0.0.1) to probe from.
const http = createServer((_, res) => res.end('<!doctype html><title>codecs</title>'));
await new Promise((r) => http.listen(0, '127.0.0.1', r));
const page = `http://127.0.0.1:${http.address().port}/`;

/** Runs in the page: capabilities and one loopback call per codec. */
async function probe() {
  const send = RTCRtpSender.getCapabilities('video').codecs;
  const recv = RTCRtpReceiver.getCapabilities('video').codecs;
  const names = (list) => [...new Set(list.map((c) => c.mimeType).filter((m) => !/rtx|red|ulpfec|flexfec/i.test(m)))];
  const fmtp = (list, mime) => list.filter((c) => c.mimeType === mime).map((c) => c.sdpFmtpLine ?? '').filter(Boolean);
  const canvas = document.createElement('canvas');
  canvas.width = 640;
  canvas.height = 360;
  const ctx = canvas.getContext('2d');
  let n = 0;
  const timer = setInterval(() => {
    ctx.fillStyle = `hsl(${(n += 7) % 360} 80% 50%)`;
    ctx.fillRect(0, 0, 640, 360);
    ctx.fillStyle = '#000';
    ctx.fillRect(n % 600, 100, 40, 40);
  }, 33);
  const stream = canvas.captureStream(30);
  const track = stream.getVideoTracks()[0];
  const states = [];
  const results = [];
  for (const mime of names(send)) {
    const a = new RTCPeerConnection();
    const b = new RTCPeerConnection();
    a.onicecandidate = (e) => e.candidate && b.addIceCandidate(e.candidate).catch(() => {});
    b.onicecandidate = (e) => e.candidate && a.addIceCandidate(e.candidate).catch(() => {});
    const tr = a.addTransceiver(track, { direction: 'sendonly' });
    const first = send.filter((c) => c.mimeType === mime);
    try {
      tr.setCodecPreferences([...first, ...send.filter((c) => c.mimeType !== mime)]);
    } catch (e) {
      results.push({ mime, error: `setCodecPreferences: ${e.message}` });
      a.close();
      b.close();
      continue;
    }
    await a.setLocalDescription();
    await b.setRemoteDescription(a.localDescription);
    await b.setLocalDescription();
    await a.setRemoteDescription(b.localDescription);
    await new Promise((r) => setTimeout(r, 4000));
    const out = [...(await a.getStats()).values()];
    const inn = [...(await b.getStats()).values()];
    states.push(a.iceConnectionState);
    const o = out.find((s) => s.type === 'outbound-rtp' && s.kind === 'video');
    const i = inn.find((s) => s.type === 'inbound-rtp' && s.kind === 'video');
    const codec = (all, s) => all.find((c) => c.id === s?.codecId);
    results.push({
      mime,
      negotiated: codec(out, o)?.mimeType ?? null,
      fmtp: codec(out, o)?.sdpFmtpLine ?? null,
      framesEncoded: o?.framesEncoded ?? 0,
      encoder: o?.encoderImplementation ?? null,
      framesDecoded: i?.framesDecoded ?? 0,
      decoder: i?.decoderImplementation ?? null,
      width: i?.frameWidth ?? 0,
      ice: a.iceConnectionState,
    });
    a.close();
    b.close();
  }
  clearInterval(timer);
  return {
    ua: navigator.userAgent,
    send: names(send),
    recv: names(recv),
    h264SendFmtp: fmtp(send, 'video/H264'),
    h264RecvFmtp: fmtp(recv, 'video/H264'),
    results,
  };
}

function table(label, r) {
  console.log(`\n### ${label}\n\n${r.ua}\n`);
  console.log(`- sender capabilities: ${r.send.join(', ')}`);
  console.log(`- receiver capabilities: ${r.recv.join(', ')}`);
  console.log(`- H.264 fmtp (send): ${r.h264SendFmtp.join(' | ') || 'none'}`);
  console.log(`- H.264 fmtp (receive): ${r.h264RecvFmtp.join(' | ') || 'none'}\n`);
  console.log('| codec forced | negotiated | frames encoded (4 s) | encoder | frames decoded | decoder | width | ICE |');
  console.log('|---|---|---|---|---|---|---|---|');
  for (const x of r.results) {
    if (x.error) console.log(`| ${x.mime} | ${x.error} | | | | | |`);
    else console.log(`| ${x.mime} | ${x.negotiated} ${x.fmtp ?? ''} | ${x.framesEncoded} | ${x.encoder} | ${x.framesDecoded} | ${x.decoder} | ${x.width} | ${x.ice} |`);
  }
}

for (const [label, launch] of [
  ['Chromium', () => launchParticipant('probe')],
  ['Firefox', () => launchFirefoxParticipant('probe')],
]) {
  const p = await launch();
  try {
    await p.page.goto(page);
    table(label, await p.page.evaluate(probe));
  } catch (e) {
    console.log(`\n### ${label}\n\nprobe failed: ${e.message}`);
  } finally {
    await p.close();
  }
}
http.close();
