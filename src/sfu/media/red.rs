//! Opus with redundancy (RFC 2198 `audio/red`, as Chromium sends it): reading a RED payload,
//! taking out its primary block for a subscriber that did not negotiate RED, retagging its
//! blocks for one whose Opus payload type differs, and deciding per down-track which of these
//! the fan-out does. Pure: no socket, no clock; malformed input is an error, never a panic.
//!
//! A RED payload is a run of block headers then the blocks' data, in the same order:
//!
//! ```text
//!  redundant block header (4 bytes), F = 1:     last header (1 byte), F = 0:
//!  |F|  block PT   |  timestamp offset |  block length  |      |0|  block PT   |
//!   1       7               14                 10                1      7
//! ```
//!
//! The redundant blocks carry earlier frames (their timestamp is the packet's minus the
//! offset); the last header is the primary block's, whose data is the rest of the payload.

use bytes::Bytes;
use rtc::peer_connection::configuration::media_engine::{MIME_TYPE_H264, MIME_TYPE_OPUS};
use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodec, RTCRtpCodecParameters};
use std::ops::Range;

/// The MIME type of RFC 2198 redundant audio.
pub const MIME_TYPE_RED: &str = "audio/red";
/// The payload type Chromium offers RED with (`a=rtpmap:63 red/48000/2`).
pub const RED_PAYLOAD_TYPE: u8 = 63;

/// Block headers read before giving up: Chromium sends at most two redundant blocks; a payload
/// of nothing but headers is refused long before its length would be.
const MAX_BLOCKS: usize = 16;

/// Why a payload is not valid RED.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RedError {
    #[error("empty RED payload")]
    Empty,
    #[error("RED block header cut short")]
    TruncatedHeader,
    #[error("RED block lengths exceed the payload")]
    BlocksExceedPayload,
    #[error("more than {MAX_BLOCKS} RED blocks")]
    TooManyBlocks,
    #[error("RED primary block of payload type {0}, not the negotiated one")]
    UnexpectedPayloadType(u8),
}

/// One block of a RED payload: its payload type, how much older than the packet's timestamp
/// it is, and where its data is in the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub payload_type: u8,
    pub timestamp_offset: u16,
    pub data: Range<usize>,
}

/// A RED payload read whole: its redundant blocks (oldest first, as sent) and its primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Red {
    pub redundant: Vec<Block>,
    pub primary: Block,
}

/// Reads every block of a RED payload (tests, logs; the fan-out uses [`primary`]).
pub fn parse(payload: &[u8]) -> Result<Red, RedError> {
    let mut redundant = Vec::new();
    let primary = walk(payload, |b| redundant.push(b))?;
    Ok(Red { redundant, primary })
}

/// The primary block of a RED payload, without allocating.
pub fn primary(payload: &[u8]) -> Result<Block, RedError> {
    walk(payload, |_| {})
}

/// The primary block's data as its own payload (shares `payload`'s buffer), checked against
/// the payload type the publisher's RED format names (`expect`, from its fmtp), if any.
pub fn strip(payload: &Bytes, expect: Option<u8>) -> Result<Bytes, RedError> {
    let p = primary(payload)?;
    match expect {
        Some(pt) if pt != p.payload_type => Err(RedError::UnexpectedPayloadType(p.payload_type)),
        _ => Ok(payload.slice(p.data)),
    }
}

/// The payload with every block's payload type `from` changed to `to` (a subscriber whose
/// Opus payload type differs from the publisher's). Copies the payload.
pub fn retag(payload: &Bytes, from: u8, to: u8) -> Result<Bytes, RedError> {
    let red = parse(payload)?;
    let mut out = payload.to_vec();
    let blocks = red.redundant.len();
    for i in 0..=blocks {
        // Headers: 4 bytes per redundant block, then the primary's 1 byte.
        let at = 4 * i;
        let Some(b) = out.get_mut(at) else { break };
        if *b & 0x7f == from {
            *b = (*b & 0x80) | (to & 0x7f);
        }
    }
    Ok(Bytes::from(out))
}

fn walk(payload: &[u8], mut redundant: impl FnMut(Block)) -> Result<Block, RedError> {
    if payload.is_empty() {
        return Err(RedError::Empty);
    }
    let mut at = 0;
    // Where the next block's data starts: after every header, so found at the end.
    let mut lens: [(u8, u16, usize); MAX_BLOCKS] = [(0, 0, 0); MAX_BLOCKS];
    let mut n = 0;
    loop {
        let Some(&first) = payload.get(at) else {
            return Err(RedError::TruncatedHeader);
        };
        if first & 0x80 == 0 {
            // The primary's header: the last one.
            at += 1;
            let mut data = at;
            for &(pt, offset, len) in &lens[..n] {
                let end = data + len;
                if end > payload.len() {
                    return Err(RedError::BlocksExceedPayload);
                }
                redundant(Block {
                    payload_type: pt,
                    timestamp_offset: offset,
                    data: data..end,
                });
                data = end;
            }
            if data > payload.len() {
                return Err(RedError::BlocksExceedPayload);
            }
            return Ok(Block {
                payload_type: first & 0x7f,
                timestamp_offset: 0,
                data: data..payload.len(),
            });
        }
        let Some(h) = payload.get(at..at + 4) else {
            return Err(RedError::TruncatedHeader);
        };
        if n == MAX_BLOCKS {
            return Err(RedError::TooManyBlocks);
        }
        let offset = (u16::from(h[1]) << 6) | (u16::from(h[2]) >> 2);
        let len = (usize::from(h[2] & 0x03) << 8) | usize::from(h[3]);
        lens[n] = (h[0] & 0x7f, offset, len);
        n += 1;
        at += 4;
    }
}

/// Builds a RED payload (tests and synthetic publishers): redundant blocks as
/// `(payload type, timestamp offset, data)`, then the primary.
pub fn build(redundant: &[(u8, u16, &[u8])], primary_pt: u8, primary: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(pt, offset, data) in redundant {
        let len = data.len().min(0x3ff);
        let offset = offset & 0x3fff;
        out.push(0x80 | (pt & 0x7f));
        out.push((offset >> 6) as u8);
        out.push((((offset & 0x3f) << 2) as u8) | ((len >> 8) as u8 & 0x03));
        out.push((len & 0xff) as u8);
    }
    out.push(primary_pt & 0x7f);
    for &(_, _, data) in redundant {
        out.extend_from_slice(&data[..data.len().min(0x3ff)]);
    }
    out.extend_from_slice(primary);
    out
}

/// The payload type a RED format's fmtp names for its blocks (`111/111` → 111), if it names
/// one.
pub fn block_payload_type(fmtp: &str) -> Option<u8> {
    fmtp.split('/').next().and_then(|s| s.trim().parse().ok())
}

/// Is this codec RFC 2198 redundant audio?
pub fn is_red(codec: &RTCRtpCodec) -> bool {
    codec.mime_type.eq_ignore_ascii_case(MIME_TYPE_RED)
}

/// What a down-track does to each payload of its track.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Payload {
    /// Forwarded as it is (the same codec on both legs).
    #[default]
    AsIs,
    /// RED to a RED subscriber whose Opus payload type differs: blocks retagged `from` → `to`.
    Retag { from: u8, to: u8 },
    /// RED to a subscriber without RED: the primary block alone, as plain Opus (checked to be
    /// of payload type `expect`, when the publisher's RED format names one).
    Strip { expect: Option<u8> },
}

/// Which of the subscriber's negotiated codecs a track of codec `track` goes out as, and what
/// its payloads need on the way: a RED track goes as RED where the subscriber has RED and as
/// plain Opus (its primary blocks) where it has only Opus; anything else goes as the codec
/// itself (an Opus track to a RED subscriber stays plain Opus on the Opus payload type: a RED
/// wrapper with only a primary block would add a byte and no redundancy).
pub fn plan(track: &RTCRtpCodec, negotiated: &[RTCRtpCodecParameters]) -> Option<(u8, Payload)> {
    let by_mime = |mime: &str| {
        negotiated
            .iter()
            .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(mime))
    };
    if is_red(track) {
        let inner = block_payload_type(&track.sdp_fmtp_line);
        let opus = by_mime(MIME_TYPE_OPUS).map(|c| c.payload_type);
        if let Some(red) = by_mime(MIME_TYPE_RED) {
            let sub_inner = block_payload_type(&red.rtp_codec.sdp_fmtp_line).or(opus);
            let payload = match (inner, sub_inner) {
                (Some(from), Some(to)) if from != to => Payload::Retag { from, to },
                _ => Payload::AsIs,
            };
            return Some((red.payload_type, payload));
        }
        return opus.map(|pt| (pt, Payload::Strip { expect: inner }));
    }
    negotiated
        .iter()
        .find(|c| {
            c.rtp_codec.mime_type.eq_ignore_ascii_case(&track.mime_type)
                && (c.rtp_codec.sdp_fmtp_line == track.sdp_fmtp_line
                    || c.rtp_codec.mime_type.eq_ignore_ascii_case(MIME_TYPE_H264)
                        && super::h264::same_format(
                            &c.rtp_codec.sdp_fmtp_line,
                            &track.sdp_fmtp_line,
                        ))
        })
        .or_else(|| by_mime(&track.mime_type))
        .map(|c| (c.payload_type, Payload::AsIs))
}

/// Moves RED ahead of Opus in an answer's codec list (returns whether it moved). Chromium
/// sends RED only when the answer lists it before the codec it carries: its send codec is the
/// answer's first plain codec, and a RED format counts only if it comes earlier. An answer that
/// keeps Chromium's own offer order (Opus first) would leave it sending plain Opus.
pub fn red_before_opus(codecs: &mut Vec<RTCRtpCodecParameters>) -> bool {
    let is =
        |c: &RTCRtpCodecParameters, mime: &str| c.rtp_codec.mime_type.eq_ignore_ascii_case(mime);
    let (Some(r), Some(o)) = (
        codecs.iter().position(|c| is(c, MIME_TYPE_RED)),
        codecs.iter().position(|c| is(c, MIME_TYPE_OPUS)),
    ) else {
        return false;
    };
    if r < o {
        return false;
    }
    let red = codecs.remove(r);
    codecs.insert(o, red);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Chromium's first RED packet of a stream: no redundancy yet, a one-byte header.
    #[test]
    fn primary_only() {
        let p = build(&[], 111, b"opus-frame");
        assert_eq!(p[0], 111);
        let red = parse(&p).unwrap();
        assert!(red.redundant.is_empty());
        assert_eq!(red.primary.payload_type, 111);
        assert_eq!(&p[red.primary.data.clone()], b"opus-frame");
        let b = Bytes::from(p);
        assert_eq!(&strip(&b, Some(111)).unwrap()[..], b"opus-frame");
    }

    /// Two redundant blocks (Chromium's default distance), 20 ms frames at 48 kHz: offsets 960
    /// and 1920, written oldest first.
    #[test]
    fn two_redundant_blocks() {
        let older = [1u8; 70];
        let old = [2u8; 65];
        let p = build(&[(111, 1920, &older), (111, 960, &old)], 111, &[3u8; 80]);
        // Hand-checked header of the first block: F=1 PT=111, offset 1920, length 70.
        assert_eq!(&p[..4], &[0x80 | 111, 30, 0, 70]);
        assert_eq!(p[8], 111, "the primary's header: F = 0");
        let red = parse(&p).unwrap();
        assert_eq!(red.redundant.len(), 2);
        assert_eq!(red.redundant[0].timestamp_offset, 1920);
        assert_eq!(red.redundant[1].timestamp_offset, 960);
        assert_eq!(red.redundant[0].data, 9..79);
        assert_eq!(red.redundant[1].data, 79..144);
        assert_eq!(red.primary.data, 144..224);
        assert!(p[red.primary.data.clone()].iter().all(|&b| b == 3));
        let b = Bytes::from(p);
        assert_eq!(strip(&b, Some(111)).unwrap(), Bytes::from(vec![3u8; 80]));
    }

    /// The largest values the header's fields hold: a 14-bit offset and a 10-bit length.
    #[test]
    fn field_limits() {
        let big = vec![7u8; 1023];
        let p = build(&[(100, 0x3fff, &big)], 111, b"x");
        let red = parse(&p).unwrap();
        assert_eq!(red.redundant[0].payload_type, 100);
        assert_eq!(red.redundant[0].timestamp_offset, 0x3fff);
        assert_eq!(red.redundant[0].data.len(), 1023);
        assert_eq!(&p[red.primary.data], b"x");
    }

    /// A redundant block may be empty (DTX), and so may the primary.
    #[test]
    fn empty_blocks() {
        let p = build(&[(111, 960, &[])], 111, &[]);
        let red = parse(&p).unwrap();
        assert_eq!(red.redundant[0].data, 5..5);
        assert_eq!(red.primary.data, 5..5);
    }

    #[test]
    fn malformed_is_an_error() {
        assert_eq!(primary(&[]), Err(RedError::Empty));
        // F set, but the header is cut short.
        assert_eq!(primary(&[0x80 | 111, 0, 0]), Err(RedError::TruncatedHeader));
        // Only redundant headers, no primary header.
        assert_eq!(
            primary(&[0x80 | 111, 0, 0, 0]),
            Err(RedError::TruncatedHeader)
        );
        // A block longer than what follows.
        let mut p = build(&[(111, 960, &[9u8; 10])], 111, b"abc");
        p.truncate(8);
        assert_eq!(primary(&p), Err(RedError::BlocksExceedPayload));
        // Headers without end.
        let p: Vec<u8> = (0..17).flat_map(|_| [0x80 | 111, 0, 0, 0]).collect();
        assert_eq!(primary(&p), Err(RedError::TooManyBlocks));
        // A primary of another payload type than the format names.
        let b = Bytes::from(build(&[], 13, b"cn"));
        assert_eq!(
            strip(&b, Some(111)),
            Err(RedError::UnexpectedPayloadType(13))
        );
        assert!(strip(&b, None).is_ok());
    }

    #[test]
    fn retag_changes_every_block_of_that_type() {
        let p = Bytes::from(build(&[(109, 960, b"old")], 109, b"new"));
        let r = retag(&p, 109, 111).unwrap();
        let red = parse(&r).unwrap();
        assert_eq!(red.redundant[0].payload_type, 111);
        assert_eq!(red.primary.payload_type, 111);
        assert_eq!(red.redundant[0].timestamp_offset, 960);
        assert_eq!(&r[red.primary.data], b"new");
        assert_eq!(&r[red.redundant[0].data.clone()], b"old");
    }

    #[test]
    fn fmtp_names_the_block_type() {
        assert_eq!(block_payload_type("111/111"), Some(111));
        assert_eq!(block_payload_type("109/109/109"), Some(109));
        assert_eq!(block_payload_type(""), None);
    }

    fn codec(pt: u8, mime: &str, fmtp: &str) -> RTCRtpCodecParameters {
        RTCRtpCodecParameters {
            rtp_codec: RTCRtpCodec {
                mime_type: mime.to_owned(),
                clock_rate: 48000,
                channels: 2,
                sdp_fmtp_line: fmtp.to_owned(),
                rtcp_feedback: vec![],
            },
            payload_type: pt,
        }
    }

    #[test]
    fn plan_per_subscriber() {
        let red = codec(63, MIME_TYPE_RED, "111/111").rtp_codec;
        let opus = codec(111, MIME_TYPE_OPUS, "minptime=10;useinbandfec=1").rtp_codec;
        let both = [
            codec(63, MIME_TYPE_RED, "111/111"),
            codec(111, MIME_TYPE_OPUS, "minptime=10;useinbandfec=1"),
        ];
        let opus_only = [codec(111, MIME_TYPE_OPUS, "minptime=10;useinbandfec=1")];
        assert_eq!(plan(&red, &both), Some((63, Payload::AsIs)));
        assert_eq!(
            plan(&red, &opus_only),
            Some((111, Payload::Strip { expect: Some(111) }))
        );
        assert_eq!(plan(&opus, &both), Some((111, Payload::AsIs)));
        assert_eq!(plan(&opus, &opus_only), Some((111, Payload::AsIs)));
        // A publisher whose Opus is 109 to a subscriber whose Opus is 111.
        let red109 = codec(120, MIME_TYPE_RED, "109/109").rtp_codec;
        assert_eq!(
            plan(&red109, &both),
            Some((63, Payload::Retag { from: 109, to: 111 }))
        );
        assert_eq!(plan(&red, &[]), None);
    }

    #[test]
    fn red_moves_ahead_of_opus() {
        // Chromium's offer order: opus, red, G.722 …
        let mut c = vec![
            codec(111, MIME_TYPE_OPUS, "minptime=10;useinbandfec=1"),
            codec(63, MIME_TYPE_RED, "111/111"),
            codec(9, "audio/G722", ""),
        ];
        assert!(red_before_opus(&mut c));
        let pts: Vec<u8> = c.iter().map(|c| c.payload_type).collect();
        assert_eq!(pts, [63, 111, 9]);
        assert!(!red_before_opus(&mut c), "already first");
        let mut opus_only = vec![codec(111, MIME_TYPE_OPUS, "")];
        assert!(!red_before_opus(&mut opus_only));
    }

    proptest! {
        /// Whatever the bytes, parsing never panics, and what it finds lies inside the payload,
        /// in order, with the primary last.
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(red) = parse(&bytes) {
                let mut end = 0;
                for b in red.redundant.iter().chain(std::iter::once(&red.primary)) {
                    prop_assert!(b.data.start >= end && b.data.end <= bytes.len());
                    end = b.data.end;
                }
                prop_assert_eq!(red.primary.data.end, bytes.len());
            }
            let b = Bytes::from(bytes);
            let _ = retag(&b, 111, 109);
            let _ = strip(&b, Some(111));
        }

        /// What `build` writes, `parse` reads back.
        #[test]
        fn round_trip(
            blocks in proptest::collection::vec(
                (0u8..128, 0u16..0x4000, proptest::collection::vec(any::<u8>(), 0..40)),
                0..4,
            ),
            pt in 0u8..128,
            primary in proptest::collection::vec(any::<u8>(), 0..100),
        ) {
            let refs: Vec<(u8, u16, &[u8])> =
                blocks.iter().map(|(p, o, d)| (*p, *o, d.as_slice())).collect();
            let p = build(&refs, pt, &primary);
            let red = parse(&p).unwrap();
            prop_assert_eq!(red.redundant.len(), blocks.len());
            for (b, (bpt, off, data)) in red.redundant.iter().zip(&blocks) {
                prop_assert_eq!(b.payload_type, *bpt);
                prop_assert_eq!(b.timestamp_offset, *off);
                prop_assert_eq!(&p[b.data.clone()], data.as_slice());
            }
            prop_assert_eq!(red.primary.payload_type, pt);
            prop_assert_eq!(&p[red.primary.data], primary.as_slice());
        }
    }
}
