//! VP8 RTP payload descriptor (RFC 7741) and VP8 payload header parsing, plus in-place
//! rewriting of the descriptor fields the forwarder munges on simulcast switches.
//!
//! Layout of the payload descriptor at the start of every VP8 RTP payload:
//!
//! ```text
//!        0 1 2 3 4 5 6 7
//!       +-+-+-+-+-+-+-+-+
//!       |X|R|N|S|R| PID | (required)
//!       +-+-+-+-+-+-+-+-+
//!  X:   |I|L|T|K| RSV   | (present if X)
//!       +-+-+-+-+-+-+-+-+
//!  I:   |M| PictureID   | (present if I; M=1 means 15-bit PictureID, one more byte follows)
//!       +-+-+-+-+-+-+-+-+
//!       |   PictureID   | (present if M)
//!       +-+-+-+-+-+-+-+-+
//!  L:   |   TL0PICIDX   | (present if L)
//!       +-+-+-+-+-+-+-+-+
//! T/K:  |TID|Y| KEYIDX  | (present if T or K)
//!       +-+-+-+-+-+-+-+-+
//! ```
//!
//! The VP8 payload (the encoded frame) follows. When `S=1` and `PID=0` the packet carries
//! the start of a frame, whose first three bytes are the VP8 frame tag ("payload header"):
//!
//! ```text
//!       0 1 2 3 4 5 6 7
//!      +-+-+-+-+-+-+-+-+
//!      |Size0|H| VER |P|   P=0: keyframe, H: show_frame, Size0..Size2: first partition size
//!      +-+-+-+-+-+-+-+-+
//!      |     Size1     |
//!      +-+-+-+-+-+-+-+-+
//!      |     Size2     |
//!      +-+-+-+-+-+-+-+-+
//! ```
//!
//! A keyframe's tag is followed by the start code `9d 01 2a` and then the frame width and
//! height as little-endian 16-bit values (low 14 bits: size in pixels; top 2 bits: scaling).
//!
//! Everything here works on untrusted network bytes: no function panics, whatever the input.

use thiserror::Error;

const X_BIT: u8 = 0x80;
const N_BIT: u8 = 0x20;
const S_BIT: u8 = 0x10;
const PID_MASK: u8 = 0x07;
const I_BIT: u8 = 0x80;
const L_BIT: u8 = 0x40;
const T_BIT: u8 = 0x20;
const K_BIT: u8 = 0x10;
const M_BIT: u8 = 0x80;
const Y_BIT: u8 = 0x20;
const KEYIDX_MASK: u8 = 0x1f;

/// Largest 7-bit PictureID + 1.
pub const PICTURE_ID_7BIT_MODULUS: u16 = 1 << 7;
/// Largest 15-bit PictureID + 1.
pub const PICTURE_ID_15BIT_MODULUS: u16 = 1 << 15;
/// KEYIDX is 5 bits wide.
pub const KEYIDX_MODULUS: u16 = 1 << 5;

/// Errors from parsing or rewriting a VP8 payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum Vp8Error {
    /// The payload ended inside the payload descriptor.
    #[error("VP8 payload descriptor truncated")]
    Truncated,
    /// The field to rewrite is not present in this packet's descriptor.
    #[error("VP8 descriptor field not present")]
    FieldAbsent,
}

/// A PictureID together with the width it was encoded with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PictureId {
    /// 7-bit PictureID (`M=0`), 0..=127.
    Short(u8),
    /// 15-bit PictureID (`M=1`), 0..=32767.
    Long(u16),
}

impl PictureId {
    /// The numeric value.
    pub fn value(self) -> u16 {
        match self {
            PictureId::Short(v) => u16::from(v),
            PictureId::Long(v) => v,
        }
    }

    /// The number of distinct values of this width (128 or 32768).
    pub fn modulus(self) -> u16 {
        match self {
            PictureId::Short(_) => PICTURE_ID_7BIT_MODULUS,
            PictureId::Long(_) => PICTURE_ID_15BIT_MODULUS,
        }
    }
}

/// A parsed VP8 payload descriptor.
///
/// It remembers where each optional field sits so the `set_*` methods can rewrite them in
/// place. Use those methods only on the same buffer the descriptor was parsed from (they
/// bounds-check anyway, so a mismatch gives an error or a wrong write, never a panic).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptor {
    /// `N`: the frame is not used as a reference and may be discarded.
    pub non_reference: bool,
    /// `S`: this packet starts a VP8 partition.
    pub start_of_partition: bool,
    /// `PID`: the partition index (0..=7).
    pub partition_index: u8,
    /// PictureID, if `I` was set.
    pub picture_id: Option<PictureId>,
    /// TL0PICIDX, if `L` was set.
    pub tl0_pic_idx: Option<u8>,
    /// Temporal layer index (0..=3), if `T` was set.
    pub tid: Option<u8>,
    /// `Y`: layer sync bit (only meaningful when `T` was set; false otherwise).
    pub layer_sync: bool,
    /// KEYIDX (0..=31), if `K` was set.
    pub key_idx: Option<u8>,
    /// Length of the descriptor in bytes: the VP8 payload starts at this offset.
    pub len: usize,
    picture_id_at: Option<usize>,
    tl0_at: Option<usize>,
    tk_at: Option<usize>,
}

impl Descriptor {
    /// Whether this packet carries the first bytes of a frame (`S=1` and `PID=0`).
    pub fn is_frame_start(&self) -> bool {
        self.start_of_partition && self.partition_index == 0
    }

    /// Overwrite the PictureID in `payload`, keeping the width the packet already uses
    /// (a 7-bit field gets `value % 128`, a 15-bit field `value % 32768`). The packet length
    /// never changes.
    pub fn set_picture_id(&self, payload: &mut [u8], value: u16) -> Result<(), Vp8Error> {
        let (Some(at), Some(pid)) = (self.picture_id_at, self.picture_id) else {
            return Err(Vp8Error::FieldAbsent);
        };
        match pid {
            PictureId::Short(_) => {
                let b = payload.get_mut(at).ok_or(Vp8Error::Truncated)?;
                *b = (value % PICTURE_ID_7BIT_MODULUS) as u8;
            }
            PictureId::Long(_) => {
                let v = value % PICTURE_ID_15BIT_MODULUS;
                let Some([hi, lo]) = payload.get_mut(at..at + 2) else {
                    return Err(Vp8Error::Truncated);
                };
                *hi = M_BIT | (v >> 8) as u8;
                *lo = (v & 0xff) as u8;
            }
        }
        Ok(())
    }

    /// Overwrite TL0PICIDX in `payload`.
    pub fn set_tl0_pic_idx(&self, payload: &mut [u8], value: u8) -> Result<(), Vp8Error> {
        let at = self.tl0_at.ok_or(Vp8Error::FieldAbsent)?;
        *payload.get_mut(at).ok_or(Vp8Error::Truncated)? = value;
        Ok(())
    }

    /// Overwrite KEYIDX (`value % 32`) in `payload`, preserving TID and Y.
    pub fn set_key_idx(&self, payload: &mut [u8], value: u8) -> Result<(), Vp8Error> {
        if self.key_idx.is_none() {
            return Err(Vp8Error::FieldAbsent);
        }
        let at = self.tk_at.ok_or(Vp8Error::FieldAbsent)?;
        let b = payload.get_mut(at).ok_or(Vp8Error::Truncated)?;
        *b = (*b & !KEYIDX_MASK) | (value & KEYIDX_MASK);
        Ok(())
    }
}

/// Parse the payload descriptor at the start of a VP8 RTP payload.
///
/// Parsing is lenient about reserved bits; it fails only when the descriptor is cut short.
/// A packet consisting of a descriptor and no VP8 bytes parses fine (`len == payload.len()`).
pub fn parse_descriptor(payload: &[u8]) -> Result<Descriptor, Vp8Error> {
    let mut at = 0usize;
    let next = |at: &mut usize| -> Result<u8, Vp8Error> {
        let b = *payload.get(*at).ok_or(Vp8Error::Truncated)?;
        *at += 1;
        Ok(b)
    };
    let b0 = next(&mut at)?;
    let mut d = Descriptor {
        non_reference: b0 & N_BIT != 0,
        start_of_partition: b0 & S_BIT != 0,
        partition_index: b0 & PID_MASK,
        picture_id: None,
        tl0_pic_idx: None,
        tid: None,
        layer_sync: false,
        key_idx: None,
        len: 0,
        picture_id_at: None,
        tl0_at: None,
        tk_at: None,
    };
    if b0 & X_BIT != 0 {
        let x = next(&mut at)?;
        if x & I_BIT != 0 {
            d.picture_id_at = Some(at);
            let p0 = next(&mut at)?;
            d.picture_id = Some(if p0 & M_BIT != 0 {
                let p1 = next(&mut at)?;
                PictureId::Long(u16::from(p0 & !M_BIT) << 8 | u16::from(p1))
            } else {
                PictureId::Short(p0)
            });
        }
        if x & L_BIT != 0 {
            d.tl0_at = Some(at);
            d.tl0_pic_idx = Some(next(&mut at)?);
        }
        if x & (T_BIT | K_BIT) != 0 {
            d.tk_at = Some(at);
            let tk = next(&mut at)?;
            if x & T_BIT != 0 {
                d.tid = Some(tk >> 6);
                d.layer_sync = tk & Y_BIT != 0;
            }
            if x & K_BIT != 0 {
                d.key_idx = Some(tk & KEYIDX_MASK);
            }
        }
    }
    d.len = at;
    Ok(d)
}

/// The VP8 frame tag (the "payload header" of RFC 7741 section 4.3), present at the start of
/// the VP8 bytes of a packet whose descriptor has `S=1, PID=0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayloadHeader {
    /// `P=0`: this is a keyframe (intra frame).
    pub keyframe: bool,
    /// `VER`: the VP8 version/profile (0..=7).
    pub version: u8,
    /// `H`: the frame is meant to be shown.
    pub show_frame: bool,
    /// Size of the first partition in bytes (19 bits).
    pub first_partition_size: u32,
}

/// Parse the VP8 payload header of a frame-start packet. `None` if the packet does not start
/// a frame (`S=0` or `PID!=0`), or is too short.
pub fn payload_header(payload: &[u8]) -> Option<PayloadHeader> {
    let d = parse_descriptor(payload).ok()?;
    if !d.is_frame_start() {
        return None;
    }
    let &[t0, t1, t2] = payload.get(d.len..d.len + 3)? else {
        return None;
    };
    let raw = u32::from_le_bytes([t0, t1, t2, 0]);
    Some(PayloadHeader {
        keyframe: raw & 1 == 0,
        version: ((raw >> 1) & 0x7) as u8,
        show_frame: (raw >> 4) & 1 == 1,
        first_partition_size: raw >> 5,
    })
}

/// Whether this RTP payload is the first packet of a VP8 keyframe: `S=1`, `PID=0` and the
/// `P` bit of the payload header is 0. Only this packet of a keyframe returns true, which is
/// exactly the packet at which a forwarder may switch layers.
pub fn is_keyframe(payload: &[u8]) -> bool {
    payload_header(payload).is_some_and(|h| h.keyframe)
}

/// Frame dimensions carried in a keyframe's first packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameSize {
    /// Width in pixels (14 bits).
    pub width: u16,
    /// Height in pixels (14 bits).
    pub height: u16,
    /// Horizontal upscaling code (2 bits, normally 0).
    pub horizontal_scale: u8,
    /// Vertical upscaling code (2 bits, normally 0).
    pub vertical_scale: u8,
}

/// Frame width and height from the first packet of a keyframe (useful to rank simulcast
/// layers). `None` for anything else, including a keyframe with a wrong start code.
pub fn keyframe_size(payload: &[u8]) -> Option<FrameSize> {
    let d = parse_descriptor(payload).ok()?;
    if !is_keyframe(payload) {
        return None;
    }
    let body = payload.get(d.len..)?;
    // 3-byte frame tag, 3-byte start code, 2 bytes width, 2 bytes height.
    let &[0x9d, 0x01, 0x2a, w0, w1, h0, h1] = body.get(3..10)? else {
        return None;
    };
    let w = u16::from_le_bytes([w0, w1]);
    let h = u16::from_le_bytes([h0, h1]);
    Some(FrameSize {
        width: w & 0x3fff,
        height: h & 0x3fff,
        horizontal_scale: (w >> 14) as u8,
        vertical_scale: (h >> 14) as u8,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Build a descriptor for tests. `pid15` chooses the PictureID width.
    pub(crate) fn build(
        start: bool,
        picture_id: Option<(u16, bool)>,
        tl0: Option<u8>,
        tid: Option<(u8, bool)>,
        keyidx: Option<u8>,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        let any = picture_id.is_some() || tl0.is_some() || tid.is_some() || keyidx.is_some();
        let mut b0 = 0u8;
        if any {
            b0 |= X_BIT;
        }
        if start {
            b0 |= S_BIT;
        }
        out.push(b0);
        if any {
            let mut x = 0u8;
            if picture_id.is_some() {
                x |= I_BIT;
            }
            if tl0.is_some() {
                x |= L_BIT;
            }
            if tid.is_some() {
                x |= T_BIT;
            }
            if keyidx.is_some() {
                x |= K_BIT;
            }
            out.push(x);
            if let Some((v, long)) = picture_id {
                if long {
                    out.push(M_BIT | (v >> 8) as u8 & 0x7f);
                    out.push(v as u8);
                } else {
                    out.push(v as u8 & 0x7f);
                }
            }
            if let Some(t) = tl0 {
                out.push(t);
            }
            if tid.is_some() || keyidx.is_some() {
                let (t, y) = tid.unwrap_or((0, false));
                out.push(t << 6 | if y { Y_BIT } else { 0 } | keyidx.unwrap_or(0) & 0x1f);
            }
        }
        out
    }

    /// A keyframe start: descriptor + frame tag + start code + size.
    pub(crate) fn keyframe_packet(desc: &[u8], width: u16, height: u16) -> Vec<u8> {
        let mut p = desc.to_vec();
        // frame tag: P=0 (key), version 0, show_frame=1, first partition size 100
        let raw: u32 = (100 << 5) | (1 << 4);
        p.extend_from_slice(&[raw as u8, (raw >> 8) as u8, (raw >> 16) as u8]);
        p.extend_from_slice(&[0x9d, 0x01, 0x2a]);
        p.extend_from_slice(&width.to_le_bytes());
        p.extend_from_slice(&height.to_le_bytes());
        p.extend_from_slice(&[0u8; 20]);
        p
    }

    #[test]
    fn minimal_descriptor() {
        let d = parse_descriptor(&[0x10, 0xaa]).unwrap();
        assert!(d.start_of_partition);
        assert_eq!(d.partition_index, 0);
        assert!(d.is_frame_start());
        assert!(!d.non_reference);
        assert_eq!(d.picture_id, None);
        assert_eq!(d.len, 1);
    }

    #[test]
    fn full_descriptor_15bit() {
        let buf = build(
            true,
            Some((0x1234, true)),
            Some(77),
            Some((2, true)),
            Some(19),
        );
        assert_eq!(buf.len(), 6);
        let d = parse_descriptor(&buf).unwrap();
        assert_eq!(d.picture_id, Some(PictureId::Long(0x1234)));
        assert_eq!(d.tl0_pic_idx, Some(77));
        assert_eq!(d.tid, Some(2));
        assert!(d.layer_sync);
        assert_eq!(d.key_idx, Some(19));
        assert_eq!(d.len, 6);
    }

    #[test]
    fn descriptor_7bit_and_partial_fields() {
        let buf = build(false, Some((100, false)), None, None, Some(3));
        let d = parse_descriptor(&buf).unwrap();
        assert_eq!(d.picture_id, Some(PictureId::Short(100)));
        assert_eq!(d.picture_id.unwrap().modulus(), 128);
        assert_eq!(d.tl0_pic_idx, None);
        assert_eq!(d.tid, None);
        assert!(!d.layer_sync);
        assert_eq!(d.key_idx, Some(3));
        assert_eq!(d.len, 4);
        assert!(!d.is_frame_start());

        // T without K: KEYIDX bits are not reported.
        let buf = build(true, None, None, Some((1, false)), None);
        let d = parse_descriptor(&buf).unwrap();
        assert_eq!(d.tid, Some(1));
        assert_eq!(d.key_idx, None);
    }

    #[test]
    fn truncated_descriptors_are_errors() {
        assert_eq!(parse_descriptor(&[]), Err(Vp8Error::Truncated));
        let full = build(
            true,
            Some((0x1234, true)),
            Some(77),
            Some((2, true)),
            Some(19),
        );
        for n in 0..full.len() {
            assert_eq!(
                parse_descriptor(&full[..n]),
                Err(Vp8Error::Truncated),
                "{n}"
            );
        }
        assert!(parse_descriptor(&full).is_ok());
    }

    #[test]
    fn keyframe_detection_and_size() {
        let desc = build(true, Some((5, true)), Some(1), Some((0, false)), Some(0));
        let kf = keyframe_packet(&desc, 1280, 720);
        assert!(is_keyframe(&kf));
        let size = keyframe_size(&kf).unwrap();
        assert_eq!((size.width, size.height), (1280, 720));
        assert_eq!((size.horizontal_scale, size.vertical_scale), (0, 0));
        let h = payload_header(&kf).unwrap();
        assert!(h.keyframe && h.show_frame);
        assert_eq!(h.first_partition_size, 100);

        // Scale bits are split off.
        let kf2 = keyframe_packet(&desc, 320 | 0x4000, 180 | 0x8000);
        let s = keyframe_size(&kf2).unwrap();
        assert_eq!(
            (s.width, s.height, s.horizontal_scale, s.vertical_scale),
            (320, 180, 1, 2)
        );

        // Interframe: P=1.
        let mut inter = kf.clone();
        inter[desc.len()] |= 1;
        assert!(!is_keyframe(&inter));
        assert_eq!(keyframe_size(&inter), None);

        // Not the start of the frame: S=0.
        let mut cont = kf.clone();
        cont[0] &= !S_BIT;
        assert!(!is_keyframe(&cont));

        // Start of another partition: PID=1.
        let mut p1 = kf.clone();
        p1[0] |= 1;
        assert!(!is_keyframe(&p1));

        // Bad start code.
        let mut bad = kf.clone();
        bad[desc.len() + 3] = 0;
        assert!(is_keyframe(&bad));
        assert_eq!(keyframe_size(&bad), None);

        // Too short for the payload header / for the size.
        assert!(!is_keyframe(&desc));
        for n in desc.len()..desc.len() + 10 {
            assert_eq!(keyframe_size(&kf[..n]), None);
        }
        assert!(keyframe_size(&kf[..desc.len() + 10]).is_some());
    }

    #[test]
    fn in_place_writes() {
        let mut buf = build(
            true,
            Some((0x1234, true)),
            Some(77),
            Some((2, true)),
            Some(19),
        );
        buf.extend_from_slice(&[1, 2, 3]);
        let d = parse_descriptor(&buf).unwrap();
        d.set_picture_id(&mut buf, 0x7ffe).unwrap();
        d.set_tl0_pic_idx(&mut buf, 200).unwrap();
        d.set_key_idx(&mut buf, 33).unwrap(); // 33 % 32 == 1
        let e = parse_descriptor(&buf).unwrap();
        assert_eq!(e.picture_id, Some(PictureId::Long(0x7ffe)));
        assert_eq!(e.tl0_pic_idx, Some(200));
        assert_eq!(e.key_idx, Some(1));
        assert_eq!(e.tid, Some(2));
        assert!(e.layer_sync);
        assert_eq!(&buf[e.len..], &[1, 2, 3]);

        // 15-bit values wrap; the width stays 15 bits.
        d.set_picture_id(&mut buf, 0x8001).unwrap();
        assert_eq!(
            parse_descriptor(&buf).unwrap().picture_id,
            Some(PictureId::Long(1))
        );

        let mut short = build(true, Some((3, false)), None, None, None);
        let d = parse_descriptor(&short).unwrap();
        d.set_picture_id(&mut short, 300).unwrap();
        assert_eq!(
            parse_descriptor(&short).unwrap().picture_id,
            Some(PictureId::Short((300 % 128) as u8))
        );
        assert_eq!(d.set_tl0_pic_idx(&mut short, 1), Err(Vp8Error::FieldAbsent));
        assert_eq!(d.set_key_idx(&mut short, 1), Err(Vp8Error::FieldAbsent));

        // Writing into a buffer shorter than the one parsed: an error, no panic.
        let long = build(true, Some((3, true)), Some(1), None, Some(1));
        let d = parse_descriptor(&long).unwrap();
        let mut tiny = [0u8; 2];
        assert_eq!(d.set_picture_id(&mut tiny, 1), Err(Vp8Error::Truncated));
        assert_eq!(d.set_tl0_pic_idx(&mut tiny, 1), Err(Vp8Error::Truncated));
        assert_eq!(d.set_key_idx(&mut tiny, 1), Err(Vp8Error::Truncated));
    }

    /// Tiny xorshift64* so the fuzz test needs no dependency.
    pub(crate) struct XorShift(pub u64);
    impl XorShift {
        pub(crate) fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut buf = Vec::new();
        for i in 0..200_000u32 {
            let len = (rng.next() % 24) as usize;
            buf.clear();
            for _ in 0..len {
                buf.push(rng.next() as u8);
            }
            // Bias some inputs towards valid-looking keyframes.
            if i % 3 == 0 && len > 8 {
                buf[0] = (buf[0] | S_BIT) & !PID_MASK;
                if let Ok(d) = parse_descriptor(&buf) {
                    if let Some(b) = buf.get_mut(d.len) {
                        *b &= !1;
                    }
                    if let Some(s) = buf.get_mut(d.len + 3..d.len + 6) {
                        s.copy_from_slice(&[0x9d, 0x01, 0x2a]);
                    }
                }
            }
            let _ = is_keyframe(&buf);
            let _ = keyframe_size(&buf);
            let _ = payload_header(&buf);
            if let Ok(d) = parse_descriptor(&buf) {
                assert!(d.len <= buf.len());
                let v = rng.next();
                let _ = d.set_picture_id(&mut buf, v as u16);
                let _ = d.set_tl0_pic_idx(&mut buf, (v >> 16) as u8);
                let _ = d.set_key_idx(&mut buf, (v >> 24) as u8);
                // Rewriting never changes the shape of the descriptor.
                let e = parse_descriptor(&buf).unwrap();
                assert_eq!(e.len, d.len);
                assert_eq!(
                    e.picture_id.map(|p| p.modulus()),
                    d.picture_id.map(|p| p.modulus())
                );
                assert_eq!(e.tid, d.tid);
                assert_eq!(e.layer_sync, d.layer_sync);
                // And a descriptor parsed from a longer buffer may be misapplied to a shorter one.
                let cut = (v as usize) % (buf.len() + 1);
                let _ = d.set_picture_id(&mut buf[..cut], 1);
                let _ = d.set_tl0_pic_idx(&mut buf[..cut], 1);
                let _ = d.set_key_idx(&mut buf[..cut], 1);
            }
        }
    }
}
