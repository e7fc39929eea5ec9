//! H.264 RTP payloads (RFC 6184, packetization-mode 1): what a packet carries, where a
//! keyframe starts, and each simulcast layer's parameter sets.
//!
//! # Keyframes
//!
//! A receiver can start decoding a layer at an IDR access unit whose SPS and PPS it has.
//! Chromium's encoder sends SPS and PPS with every IDR, aggregated in one STAP-A ahead of the
//! IDR slice (an FU-A for anything but tiny frames), all with the IDR's timestamp. A packet is
//! a **keyframe start** when it carries an IDR slice or an SPS (a single NAL, inside a
//! STAP-A, or the start fragment of an FU-A) *and* it is the first packet of its access unit
//! (its timestamp differs from the previous packet of the layer): an IDR picture made of
//! several slices is entered at its first slice only, never in the middle.
//!
//! # Parameter sets
//!
//! [`LayerState`] keeps the newest SPS and PPS of one layer (cheap slices of the packets that
//! carried them) and the frame size the SPS announces. When a down-track starts a layer at an
//! IDR whose packet lacks SPS or PPS (an encoder that sends them once, or a lost STAP-A whose
//! IDR fragment arrived), [`LayerState::prefix_for`] gives a STAP-A with the cached ones: the
//! core sends it first, in a sequence number the rewriter leaves free
//! ([`super::rewrite::Rewriter::open_slot_before_switch`]), with the IDR's timestamp.
//!
//! Nothing here panics on malformed input: a truncated or lying payload yields what could be
//! read of it.

use bytes::{BufMut, Bytes, BytesMut};

/// Coded slice of a non-IDR picture.
pub const NAL_SLICE: u8 = 1;
/// Coded slice of an IDR picture.
pub const NAL_IDR: u8 = 5;
/// Sequence parameter set.
pub const NAL_SPS: u8 = 7;
/// Picture parameter set.
pub const NAL_PPS: u8 = 8;
/// Single-time aggregation packet.
pub const STAP_A: u8 = 24;
/// Fragmentation unit.
pub const FU_A: u8 = 28;

/// Largest parameter set kept (real ones are tens of bytes).
const MAX_PARAMETER_SET: usize = 256;

/// The H.264 formats Plaza negotiates: payload type and fmtp line, packetization-mode 1 only
/// (the one browsers send simulcast with). Constrained Baseline first; then Baseline, Main,
/// Constrained High and High, so that a publisher offering any of Chromium's profiles gets an H.264 answer in the
/// profile it offered first, and a subscriber gets the same profile (see [`same_format`]).
/// The odd payload types after each are left for their retransmission (RTX) formats.
pub const FORMATS: [(u8, &str); 5] = [
    (
        102,
        "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
    ),
    (
        104,
        "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f",
    ),
    (
        106,
        "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=4d001f",
    ),
    (
        108,
        "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=640c1f",
    ),
    (
        112,
        "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=64001f",
    ),
];

/// The value of `key` in an fmtp line (`a=b;c=d`).
fn fmtp_param<'a>(fmtp: &'a str, key: &str) -> Option<&'a str> {
    fmtp.split(';')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(key))
        .map(|(_, v)| v.trim())
}

/// Whether two H.264 fmtp lines describe the same format (RFC 6184 8.2.2): the same
/// packetization-mode (absent means 0) and the same profile (profile_idc and the constraint
/// flags of profile-level-id, absent means 42000a); the level does not matter.
pub fn same_format(a: &str, b: &str) -> bool {
    let mode = |f| fmtp_param(f, "packetization-mode").unwrap_or("0");
    let profile = |f| {
        let id = fmtp_param(f, "profile-level-id").unwrap_or("42000a");
        id.get(..4).map(str::to_ascii_lowercase)
    };
    mode(a) == mode(b) && profile(a).is_some() && profile(a) == profile(b)
}

/// The `nal_unit_type` of a NAL header byte (or of an RTP payload's first byte).
pub fn nal_type(header: u8) -> u8 {
    header & 0x1f
}

/// One FU-A fragment's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fragment {
    /// Type of the fragmented NAL unit.
    pub nal_type: u8,
    pub start: bool,
    pub end: bool,
}

/// What one RTP payload carries, as far as forwarding cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PayloadInfo {
    /// An IDR slice, or the start of one (FU-A).
    pub idr: bool,
    /// A complete SPS.
    pub sps: bool,
    /// A complete PPS.
    pub pps: bool,
    /// The FU-A header, for a fragment.
    pub fragment: Option<Fragment>,
}

impl PayloadInfo {
    /// Carries an IDR slice or an SPS: a keyframe, if it starts its access unit.
    pub fn keyframe_content(&self) -> bool {
        self.idr || self.sps
    }

    /// Starts an IDR but lacks an SPS or a PPS of its own.
    pub fn needs_parameter_sets(&self) -> bool {
        self.idr && !(self.sps && self.pps)
    }
}

/// The complete NAL units of a payload: the payload itself for a single NAL unit packet,
/// each aggregated unit of a STAP-A, none for a fragment or another packet type. Stops at the
/// first unit whose size runs past the payload.
pub fn nal_units(payload: &[u8]) -> NalUnits<'_> {
    match payload.first().map(|&b| nal_type(b)) {
        Some(1..=23) => NalUnits {
            rest: payload,
            single: true,
        },
        Some(STAP_A) => NalUnits {
            rest: payload.get(1..).unwrap_or_default(),
            single: false,
        },
        _ => NalUnits {
            rest: &[],
            single: false,
        },
    }
}

/// Iterator of [`nal_units`].
#[derive(Debug, Clone)]
pub struct NalUnits<'a> {
    rest: &'a [u8],
    single: bool,
}

impl<'a> Iterator for NalUnits<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.single {
            self.single = false;
            return Some(std::mem::take(&mut self.rest));
        }
        let [hi, lo, rest @ ..] = self.rest else {
            self.rest = &[];
            return None;
        };
        let size = usize::from(u16::from_be_bytes([*hi, *lo]));
        if size == 0 || size > rest.len() {
            self.rest = &[];
            return None;
        }
        let (unit, rest) = rest.split_at(size);
        self.rest = rest;
        Some(unit)
    }
}

/// What an RTP payload carries (see [`PayloadInfo`]).
pub fn inspect(payload: &[u8]) -> PayloadInfo {
    let mut info = PayloadInfo::default();
    match payload {
        [] => {}
        [first, fu, ..] if nal_type(*first) == FU_A => {
            let fragment = Fragment {
                nal_type: nal_type(*fu),
                start: fu & 0x80 != 0,
                end: fu & 0x40 != 0,
            };
            info.idr = fragment.start && fragment.nal_type == NAL_IDR;
            info.fragment = Some(fragment);
        }
        _ => {
            for unit in nal_units(payload) {
                match unit.first().map(|&b| nal_type(b)) {
                    Some(NAL_IDR) => info.idr = true,
                    Some(NAL_SPS) => info.sps = true,
                    Some(NAL_PPS) => info.pps = true,
                    _ => {}
                }
            }
        }
    }
    info
}

/// Carries an IDR slice (or its first fragment) or an SPS, without looking at its neighbours
/// (see [`LayerState::observe`] for the keyframe start of a layer).
pub fn is_keyframe(payload: &[u8]) -> bool {
    inspect(payload).keyframe_content()
}

/// What [`LayerState::observe`] learned from one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Observed {
    pub info: PayloadInfo,
    /// The first packet of an IDR access unit: a layer switch may happen here.
    pub keyframe: bool,
    /// The frame size of a new SPS (width, height).
    pub size: Option<(u32, u32)>,
}

/// One H.264 layer's state at the SFU: its newest parameter sets and the newest timestamp
/// seen.
#[derive(Debug, Clone, Default)]
pub struct LayerState {
    sps: Option<Bytes>,
    pps: Option<Bytes>,
    last_timestamp: Option<u32>,
}

impl LayerState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Look at one packet of the layer (in arrival order): cache its parameter sets and say
    /// whether it starts a keyframe.
    pub fn observe(&mut self, payload: &Bytes, timestamp: u32) -> Observed {
        let info = inspect(payload);
        // A newer timestamp than any before starts an access unit; a late packet (reordered,
        // retransmitted) never does.
        let first_of_unit = self
            .last_timestamp
            .is_none_or(|last| (timestamp.wrapping_sub(last) as i32) > 0);
        if first_of_unit {
            self.last_timestamp = Some(timestamp);
        }
        let mut size = None;
        if info.sps || info.pps {
            for unit in nal_units(payload) {
                if unit.is_empty() || unit.len() > MAX_PARAMETER_SET {
                    continue;
                }
                let keep = || Some(payload.slice_ref(unit));
                match nal_type(unit[0]) {
                    NAL_SPS if self.sps.as_deref() != Some(unit) => {
                        size = sps_size(unit);
                        self.sps = keep();
                    }
                    NAL_PPS if self.pps.as_deref() != Some(unit) => self.pps = keep(),
                    _ => {}
                }
            }
        }
        Observed {
            info,
            keyframe: first_of_unit && info.keyframe_content(),
            size,
        }
    }

    /// The newest SPS and PPS, once both were seen.
    pub fn parameter_sets(&self) -> Option<(&Bytes, &Bytes)> {
        Some((self.sps.as_ref()?, self.pps.as_ref()?))
    }

    /// For a packet a down-track starts this layer with: a STAP-A with the cached SPS and PPS
    /// to send just before it, when it starts an IDR without them. `None` when nothing is
    /// needed or nothing is cached (the receiver then asks for a keyframe itself).
    pub fn prefix_for(&self, info: &PayloadInfo) -> Option<Bytes> {
        if !info.needs_parameter_sets() {
            return None;
        }
        let (sps, pps) = self.parameter_sets()?;
        Some(stap_a(&[sps, pps]))
    }
}

/// A STAP-A aggregating `units` (each a NAL unit with its header; at most 65535 bytes each,
/// longer ones are left out). Its NRI is the highest of the units'.
pub fn stap_a(units: &[&[u8]]) -> Bytes {
    let units: Vec<&[u8]> = units
        .iter()
        .copied()
        .filter(|u| !u.is_empty() && u.len() <= usize::from(u16::MAX))
        .collect();
    let nri = units.iter().map(|u| u[0] & 0x60).max().unwrap_or(0x60);
    let mut out = BytesMut::with_capacity(1 + units.iter().map(|u| u.len() + 2).sum::<usize>());
    out.put_u8(nri | STAP_A);
    for u in units {
        out.put_u16(u.len() as u16);
        out.put_slice(u);
    }
    out.freeze()
}

/// Reads bits of an RBSP (emulation prevention bytes already removed).
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Bits<'_> {
    fn bit(&mut self) -> Option<u32> {
        let byte = self.data.get(self.pos / 8)?;
        let b = (byte >> (7 - self.pos % 8)) & 1;
        self.pos += 1;
        Some(u32::from(b))
    }

    fn bits(&mut self, n: u32) -> Option<u32> {
        (0..n).try_fold(0u32, |acc, _| Some((acc << 1) | self.bit()?))
    }

    /// Unsigned Exp-Golomb (ue(v)); `None` past 31 leading zeros.
    fn ue(&mut self) -> Option<u32> {
        let mut zeros = 0;
        while self.bit()? == 0 {
            zeros += 1;
            if zeros > 31 {
                return None;
            }
        }
        let rest = self.bits(zeros)?;
        Some(((1u64 << zeros) - 1 + u64::from(rest)).min(u64::from(u32::MAX)) as u32)
    }

    /// Signed Exp-Golomb (se(v)).
    fn se(&mut self) -> Option<i64> {
        let k = i64::from(self.ue()?);
        Some(if k % 2 == 1 { (k + 1) / 2 } else { -(k / 2) })
    }
}

/// The RBSP of a NAL unit: its payload without the header byte and with every emulation
/// prevention byte (the 3 of 0x000003) removed.
fn rbsp(nal: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(nal.len());
    let mut zeros = 0;
    for &b in nal.iter().skip(1) {
        if zeros >= 2 && b == 3 {
            zeros = 0;
            continue;
        }
        zeros = if b == 0 { zeros + 1 } else { 0 };
        out.push(b);
    }
    out
}

/// The frame size (width, height in pixels, after cropping) of an SPS NAL unit (ITU-T H.264
/// 7.3.2.1.1); `None` if it cannot be read.
pub fn sps_size(nal: &[u8]) -> Option<(u32, u32)> {
    if nal.first().map(|&b| nal_type(b)) != Some(NAL_SPS) {
        return None;
    }
    let data = rbsp(nal);
    let mut r = Bits {
        data: &data,
        pos: 0,
    };
    let profile_idc = r.bits(8)?;
    r.bits(16)?; // constraint flags, level_idc
    r.ue()?; // seq_parameter_set_id
    let mut chroma_format_idc = 1;
    let mut separate_colour_plane = false;
    if matches!(
        profile_idc,
        100 | 110 | 122 | 244 | 44 | 83 | 86 | 118 | 128 | 138 | 139 | 134 | 135
    ) {
        chroma_format_idc = r.ue()?;
        if chroma_format_idc == 3 {
            separate_colour_plane = r.bit()? == 1;
        }
        r.ue()?; // bit_depth_luma_minus8
        r.ue()?; // bit_depth_chroma_minus8
        r.bit()?; // qpprime_y_zero_transform_bypass_flag
        if r.bit()? == 1 {
            // seq_scaling_matrix_present_flag: skip the scaling lists
            let lists = if chroma_format_idc == 3 { 12 } else { 8 };
            for i in 0..lists {
                if r.bit()? == 1 {
                    let size = if i < 6 { 16 } else { 64 };
                    let (mut last, mut next) = (8i64, 8i64);
                    for _ in 0..size {
                        if next != 0 {
                            next = (last + r.se()? + 256).rem_euclid(256);
                        }
                        if next != 0 {
                            last = next;
                        }
                    }
                }
            }
        }
    }
    r.ue()?; // log2_max_frame_num_minus4
    match r.ue()? {
        0 => {
            r.ue()?; // log2_max_pic_order_cnt_lsb_minus4
        }
        1 => {
            r.bit()?; // delta_pic_order_always_zero_flag
            r.se()?; // offset_for_non_ref_pic
            r.se()?; // offset_for_top_to_bottom_field
            let cycle = r.ue()?;
            if cycle > 255 {
                return None;
            }
            for _ in 0..cycle {
                r.se()?;
            }
        }
        _ => {}
    }
    r.ue()?; // max_num_ref_frames
    r.bit()?; // gaps_in_frame_num_value_allowed_flag
    let width_mbs = u64::from(r.ue()?) + 1;
    let height_map_units = u64::from(r.ue()?) + 1;
    let frame_mbs_only = u64::from(r.bit()?);
    if frame_mbs_only == 0 {
        r.bit()?; // mb_adaptive_frame_field_flag
    }
    r.bit()?; // direct_8x8_inference_flag
    let (mut left, mut right, mut top, mut bottom) = (0u64, 0u64, 0u64, 0u64);
    if r.bit()? == 1 {
        left = u64::from(r.ue()?);
        right = u64::from(r.ue()?);
        top = u64::from(r.ue()?);
        bottom = u64::from(r.ue()?);
    }
    let chroma_array_type = if separate_colour_plane {
        0
    } else {
        chroma_format_idc
    };
    let (sub_width, sub_height) = match chroma_array_type {
        1 => (2, 2),
        2 => (2, 1),
        _ => (1, 1),
    };
    let crop_x = sub_width;
    let crop_y = sub_height * (2 - frame_mbs_only);
    let width = (width_mbs * 16).checked_sub((left + right).saturating_mul(crop_x))?;
    let height = ((2 - frame_mbs_only) * height_map_units * 16)
        .checked_sub((top + bottom).saturating_mul(crop_y))?;
    if width == 0 || height == 0 {
        return None;
    }
    Some((u32::try_from(width).ok()?, u32::try_from(height).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes bits and Exp-Golomb codes, to build parameter sets.
    #[derive(Default)]
    struct Writer {
        bits: Vec<u8>,
    }

    impl Writer {
        fn bits(&mut self, n: u32, v: u32) -> &mut Self {
            for i in (0..n).rev() {
                self.bits.push(((v >> i) & 1) as u8);
            }
            self
        }
        fn ue(&mut self, v: u32) -> &mut Self {
            let x = u64::from(v) + 1;
            let len = 64 - x.leading_zeros();
            for _ in 1..len {
                self.bits.push(0);
            }
            for i in (0..len).rev() {
                self.bits.push(((x >> i) & 1) as u8);
            }
            self
        }
        fn se(&mut self, v: i32) -> &mut Self {
            let k = if v > 0 { 2 * v - 1 } else { -2 * v };
            self.ue(k as u32)
        }
        /// The NAL unit: header byte, then the RBSP with trailing bits and emulation
        /// prevention.
        fn nal(&mut self, header: u8) -> Vec<u8> {
            self.bits.push(1);
            while self.bits.len() % 8 != 0 {
                self.bits.push(0);
            }
            let bytes: Vec<u8> = self
                .bits
                .chunks(8)
                .map(|c| c.iter().fold(0, |a, b| (a << 1) | b))
                .collect();
            let mut out = vec![header];
            let mut zeros = 0;
            for b in bytes {
                if zeros >= 2 && b <= 3 {
                    out.push(3);
                    zeros = 0;
                }
                zeros = if b == 0 { zeros + 1 } else { 0 };
                out.push(b);
            }
            out
        }
    }

    /// A Constrained Baseline SPS (profile 66) of `w`×`h`, cropped from whole macroblocks.
    fn baseline_sps(w: u32, h: u32) -> Vec<u8> {
        let (mw, mh) = (w.div_ceil(16), h.div_ceil(16));
        let mut wr = Writer::default();
        wr.bits(8, 66).bits(8, 0xe0).bits(8, 0x1f); // profile, constraints, level 3.1
        wr.ue(0).ue(0).ue(0).ue(0); // sps id, log2_max_frame_num-4, poc type 0, lsb-4
        wr.ue(1).bits(1, 0); // max_num_ref_frames, gaps
        wr.ue(mw - 1).ue(mh - 1).bits(1, 1).bits(1, 1); // size, frame_mbs_only, direct_8x8
        let (cx, cy) = (mw * 16 - w, mh * 16 - h);
        if cx + cy > 0 {
            wr.bits(1, 1).ue(0).ue(cx / 2).ue(0).ue(cy / 2);
        } else {
            wr.bits(1, 0);
        }
        wr.bits(1, 0); // vui_parameters_present_flag
        wr.nal(0x67)
    }

    const PPS: [u8; 4] = [0x68, 0xce, 0x3c, 0x80];

    fn stap(units: &[&[u8]]) -> Vec<u8> {
        stap_a(units).to_vec()
    }

    #[test]
    fn formats_match_by_profile_and_mode() {
        let chromium = "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f";
        assert!(same_format(chromium, FORMATS[1].1));
        assert!(
            !same_format(chromium, FORMATS[0].1),
            "42e0 is another profile"
        );
        assert!(same_format(
            "profile-level-id=42E01F;packetization-mode=1",
            FORMATS[0].1
        ));
        assert!(same_format(
            "packetization-mode=1;profile-level-id=640c34",
            FORMATS[3].1
        ));
        assert!(!same_format(
            "level-asymmetry-allowed=1;packetization-mode=0;profile-level-id=42001f",
            chromium
        ));
        assert!(same_format(
            "",
            "packetization-mode=0;profile-level-id=42000a"
        ));
        assert!(!same_format("profile-level-id=4", "profile-level-id=4"));
        let pts: Vec<u8> = FORMATS.iter().map(|f| f.0).collect();
        assert!(pts.iter().all(|pt| pt % 2 == 0), "{pts:?}");
    }

    #[test]
    fn single_nal_units() {
        assert!(is_keyframe(&[0x65, 0x88, 0x84]));
        assert!(is_keyframe(&[0x67, 0x42]));
        assert!(!is_keyframe(&[0x68, 0xce]));
        assert!(!is_keyframe(&[0x41, 0x9a]));
        assert!(!is_keyframe(&[0x06, 0x05])); // SEI
        let i = inspect(&[0x65, 0x88]);
        assert!(i.idr && !i.sps && !i.pps && i.fragment.is_none());
        assert!(i.needs_parameter_sets());
        assert_eq!(
            nal_units(&[0x41, 1, 2]).collect::<Vec<_>>(),
            vec![&[0x41, 1, 2][..]]
        );
    }

    #[test]
    fn stap_a_with_parameter_sets() {
        let sps = baseline_sps(320, 180);
        let p = stap(&[&sps, &PPS]);
        assert_eq!(p[0], 0x78); // NRI 3, type 24
        let i = inspect(&p);
        assert!(i.sps && i.pps && !i.idr);
        assert!(is_keyframe(&p));
        assert!(!i.needs_parameter_sets());
        assert_eq!(nal_units(&p).collect::<Vec<_>>(), vec![&sps[..], &PPS[..]]);
        // SPS, PPS and a small IDR in one STAP-A
        let p = stap(&[&sps, &PPS, &[0x65, 0x88, 0x80]]);
        let i = inspect(&p);
        assert!(i.sps && i.pps && i.idr && !i.needs_parameter_sets());
        // a STAP-A of non-IDR slices
        assert!(!is_keyframe(&stap(&[&[0x41, 1], &[0x41, 2]])));
    }

    #[test]
    fn fu_a_start_middle_end() {
        let start = [0x7c, 0x85, 0xaa];
        let i = inspect(&start);
        assert_eq!(
            i.fragment,
            Some(Fragment {
                nal_type: NAL_IDR,
                start: true,
                end: false
            })
        );
        assert!(i.idr && i.needs_parameter_sets());
        let middle = inspect(&[0x7c, 0x05, 0xaa]);
        assert!(!middle.idr && !middle.fragment.unwrap().start);
        let end = inspect(&[0x7c, 0x45, 0xaa]);
        assert!(end.fragment.unwrap().end && !end.idr);
        // a fragmented non-IDR slice
        assert!(!is_keyframe(&[0x5c, 0x81, 0xaa]));
        // fragments carry no complete unit
        assert_eq!(nal_units(&start).count(), 0);
    }

    #[test]
    fn malformed_input_never_panics() {
        for p in [
            &[][..],
            &[0x78],
            &[0x78, 0xff],
            &[0x78, 0xff, 0xff, 0x67],
            &[0x78, 0x00, 0x00, 0x67],
            &[0x78, 0x00, 0x01],
            &[0x7c],
            &[0x00],
            &[0x19, 0, 1, 0x67], // STAP-B: not parsed
            &[0x1f, 0xff],
        ] {
            let _ = inspect(p);
            let _ = is_keyframe(p);
            let _ = nal_units(p).count();
            let _ = sps_size(p);
        }
        // a unit whose size runs past the end is not read, the ones before it are
        let p = [0x78, 0x00, 0x01, 0x67, 0x00, 0x09, 0x65];
        assert_eq!(nal_units(&p).count(), 1);
        assert!(inspect(&p).sps && !inspect(&p).idr);
        // truncated SPSs of every length
        let sps = baseline_sps(1280, 720);
        for n in 0..sps.len() {
            let _ = sps_size(&sps[..n]);
        }
        assert_eq!(sps_size(&[0x67]), None);
        assert_eq!(sps_size(&[0x68, 1, 2, 3]), None);
        // random garbage
        let mut x: u32 = 0x1234_5678;
        for _ in 0..20_000 {
            let len = (x % 40) as usize;
            let mut buf = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                buf.push(x as u8);
            }
            let _ = inspect(&buf);
            let _ = nal_units(&buf).count();
            let mut s = vec![0x67];
            s.extend_from_slice(&buf);
            let _ = sps_size(&s);
            let mut state = LayerState::new();
            let o = state.observe(&Bytes::from(buf), x);
            let _ = state.prefix_for(&o.info);
        }
    }

    #[test]
    fn sps_sizes() {
        for (w, h) in [
            (320, 180),
            (640, 360),
            (1280, 720),
            (1920, 1080),
            (176, 144),
        ] {
            assert_eq!(sps_size(&baseline_sps(w, h)), Some((w, h)), "{w}x{h}");
        }
    }

    #[test]
    fn high_profile_sps_with_scaling_lists_and_cropping() {
        let mut wr = Writer::default();
        wr.bits(8, 100).bits(8, 0).bits(8, 40); // High, level 4
        wr.ue(0); // sps id
        wr.ue(1).ue(0).ue(0).bits(1, 0); // 4:2:0, 8 bit, no bypass
        wr.bits(1, 1); // scaling matrix present
        wr.bits(1, 1); // list 0 present: 16 deltas
        for i in 0..16 {
            wr.se(if i == 0 { 8 } else { 1 });
        }
        for _ in 1..8 {
            wr.bits(1, 0);
        }
        wr.ue(0); // log2_max_frame_num-4
        wr.ue(1).bits(1, 0).se(-2).se(3).ue(2).se(1).se(-1); // poc type 1 and its cycle
        wr.ue(4).bits(1, 0);
        wr.ue(119).ue(67).bits(1, 1).bits(1, 1); // 120×68 macroblocks
        wr.bits(1, 1).ue(0).ue(0).ue(0).ue(4); // crop 8 rows at the bottom
        wr.bits(1, 0);
        assert_eq!(sps_size(&wr.nal(0x67)), Some((1920, 1080)));
    }

    #[test]
    fn emulation_prevention_is_removed() {
        // runs of zero bytes get an emulation prevention byte, which the reader drops
        let mut wr = Writer::default();
        wr.bits(8, 66).bits(8, 0).bits(8, 0);
        wr.bits(16, 0); // zeros, to force emulation prevention...
        let nal = wr.nal(0x67);
        assert!(nal.windows(3).any(|w| w == [0, 0, 3]));
        assert_eq!(rbsp(&nal).len(), nal.len() - 2); // header and one 0x03 removed
    }

    #[test]
    fn layer_keyframe_starts_at_the_first_packet_of_the_access_unit() {
        let sps = baseline_sps(640, 360);
        let mut st = LayerState::new();
        // STAP-A(SPS, PPS), FU-A IDR start, middle, end: one access unit at ts 1000
        let o = st.observe(&Bytes::from(stap(&[&sps, &PPS])), 1000);
        assert!(o.keyframe);
        assert_eq!(o.size, Some((640, 360)));
        let o = st.observe(&Bytes::from_static(&[0x7c, 0x85, 1]), 1000);
        assert!(
            !o.keyframe && o.info.idr,
            "later packets of the same unit are no start"
        );
        assert!(
            !st.observe(&Bytes::from_static(&[0x7c, 0x05, 1]), 1000)
                .keyframe
        );
        assert!(
            !st.observe(&Bytes::from_static(&[0x7c, 0x45, 1]), 1000)
                .keyframe
        );
        // a second IDR slice of the same picture: not a start either
        assert!(
            !st.observe(&Bytes::from_static(&[0x65, 0x88]), 1000)
                .keyframe
        );
        // a P frame
        assert!(
            !st.observe(&Bytes::from_static(&[0x41, 0x9a]), 4000)
                .keyframe
        );
        // a late retransmission of the keyframe's first packet is no start
        assert!(!st.observe(&Bytes::from(stap(&[&sps, &PPS])), 1000).keyframe);
        // an IDR without parameter sets: a start, and the cached ones go first
        let o = st.observe(&Bytes::from_static(&[0x7c, 0x85, 1]), 7000);
        assert!(o.keyframe && o.size.is_none());
        let prefix = st.prefix_for(&o.info).expect("cached SPS/PPS");
        assert_eq!(
            nal_units(&prefix).collect::<Vec<_>>(),
            vec![&sps[..], &PPS[..]]
        );
        // the same SPS again reports no new size; a new one does
        let o = st.observe(&Bytes::from(stap(&[&sps, &PPS])), 10_000);
        assert!(o.keyframe && o.size.is_none());
        assert!(st.prefix_for(&o.info).is_none(), "it carries its own");
        let o = st.observe(&Bytes::from(baseline_sps(320, 180)), 13_000);
        assert_eq!(o.size, Some((320, 180)));
    }

    #[test]
    fn no_prefix_without_both_parameter_sets() {
        let mut st = LayerState::new();
        let idr = inspect(&[0x65, 0x88]);
        assert_eq!(st.prefix_for(&idr), None);
        st.observe(&Bytes::from(baseline_sps(320, 180)), 1);
        assert_eq!(st.prefix_for(&idr), None, "no PPS yet");
        st.observe(&Bytes::from_static(&PPS), 1);
        assert!(st.prefix_for(&idr).is_some());
        assert_eq!(st.prefix_for(&inspect(&[0x41, 0x9a])), None, "not an IDR");
    }
}
