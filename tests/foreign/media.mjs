// Media for the JavaScript clients: the pre-encoded clips in assets/, packetised into RTP here
// (the SFU forwards without decoding, but keyframe detection and the other clients' decoders need
// real VP8 and Opus).
import { readFileSync } from 'node:fs';

/** VP8 frames of an IVF file: [{data: Buffer, key: bool}], and the frame rate. */
export function readIvf(path) {
  const buf = readFileSync(path);
  if (buf.toString('latin1', 0, 4) !== 'DKIF') throw new Error(`${path}: not an IVF file`);
  const headerLen = buf.readUInt16LE(6);
  const fourcc = buf.toString('latin1', 8, 12);
  if (fourcc !== 'VP80') throw new Error(`${path}: codec ${fourcc}, expected VP80`);
  const rate = buf.readUInt32LE(16);
  const scale = buf.readUInt32LE(20);
  const frames = [];
  let off = headerLen;
  while (off + 12 <= buf.length) {
    const size = buf.readUInt32LE(off);
    const data = buf.subarray(off + 12, off + 12 + size);
    off += 12 + size;
    frames.push({ data, key: (data[0] & 0x01) === 0 });
  }
  if (frames.length === 0 || !frames[0].key) throw new Error(`${path}: no frames, or the first is not a keyframe`);
  return { frames, fps: rate / scale };
}

/** Opus packets of an Ogg Opus file (OpusHead and OpusTags skipped). */
export function readOggOpus(path) {
  const buf = readFileSync(path);
  const packets = [];
  let off = 0;
  let partial = [];
  while (off + 27 <= buf.length) {
    if (buf.toString('latin1', off, off + 4) !== 'OggS') throw new Error(`${path}: lost Ogg sync at ${off}`);
    const nseg = buf[off + 26];
    const lacing = buf.subarray(off + 27, off + 27 + nseg);
    let p = off + 27 + nseg;
    for (const len of lacing) {
      partial.push(buf.subarray(p, p + len));
      p += len;
      if (len < 255) {
        packets.push(Buffer.concat(partial));
        partial = [];
      }
    }
    off = p;
  }
  if (packets.length < 3 || packets[0].toString('latin1', 0, 8) !== 'OpusHead') throw new Error(`${path}: not Ogg Opus`);
  return packets.slice(2);
}

/**
 * VP8 RTP payloads of one frame (RFC 7741): a payload descriptor with a 15-bit picture id,
 * S set on the first packet, the frame split into chunks of at most `mtu` bytes.
 */
export function packetiseVp8(frame, pictureId, mtu = 1100) {
  const out = [];
  for (let i = 0; i < frame.length; i += mtu) {
    const desc = Buffer.from([0x80 | (i === 0 ? 0x10 : 0), 0x80, 0x80 | ((pictureId >> 8) & 0x7f), pictureId & 0xff]);
    out.push(Buffer.concat([desc, frame.subarray(i, i + mtu)]));
  }
  return out;
}

/**
 * Whether a VP8 RTP payload starts a keyframe: S=1, partition index 0, and the frame header's
 * P bit clear (RFC 7741 section 4.3).
 */
export function isVp8KeyframeStart(payload) {
  if (payload.length < 1) return false;
  const b0 = payload[0];
  const s = (b0 & 0x10) !== 0;
  const pid = b0 & 0x07;
  let off = 1;
  if (b0 & 0x80) {
    if (payload.length < 2) return false;
    const x = payload[1];
    off = 2;
    if (x & 0x80) off += payload[off] & 0x80 ? 2 : 1; // I: picture id
    if (x & 0x40) off += 1; // L: TL0PICIDX
    if (x & 0x30) off += 1; // T/K
  }
  return s && pid === 0 && off < payload.length && (payload[off] & 0x01) === 0;
}
