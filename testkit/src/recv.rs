//! Receive-side statistics of one remote track: packets, bytes, loss from sequence gaps,
//! VP8 keyframes, and the last N packets for tests to inspect.
//!
//! For simulcast it also tells which layer arrives and whether the stream stays one clean
//! stream across layer switches:
//! - **resolution**: the frame size of every VP8 keyframe (parsed from the VP8 payload header);
//!   every packet counts towards the size of the last keyframe before it
//!   ([`RemoteTrackStats::packets_by_resolution`]), and each change is timestamped
//!   ([`RemoteTrackStats::resolution_changes`]);
//! - **origin of every frame** (not only keyframes): the first bytes of each frame are looked up
//!   among the clips loaded in this process ([`super::media::known_frame`]), which tells the
//!   layer of interframes too. A change of origin is a *switch*; a switch on an interframe is a
//!   glitch a decoder would show ([`ContinuityStats::switches_without_keyframe`]);
//! - **continuity** ([`ContinuityStats`]): sequence numbers without gaps, timestamps that never
//!   go back, VP8 picture ids that advance by one per frame;
//! - **`layer_changed`** messages from the server, with their arrival times.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use plaza::signal::{Quality, TrackKind};
use rtc::rtp;

use super::decoder::{DecoderModel, FramePacket, PliPolicy};
use super::media::{FrameOrigin, known_frame, vp8_keyframe_size};

/// How many entries the per-track histories (resolution changes, switches, anomalies) keep.
pub const MAX_HISTORY: usize = 10_000;

/// A `layer_changed` message from the server, as received.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerChange {
    pub at: Instant,
    pub quality: Quality,
    pub rid: String,
    pub width: Option<u32>,
    pub height: Option<u32>,
}

/// The received frame size changed (at a keyframe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResolutionChange {
    pub at: Instant,
    pub width: u16,
    pub height: u16,
    /// Sequence number of the keyframe's first packet.
    pub seq: u16,
    /// Index of the packet in the track (0 = first packet received).
    pub packet_index: u64,
}

/// The origin (clip size) of the received frames changed: a layer switch as the receiver sees
/// it. Only frames whose origin is known count (see [`super::media::known_frame`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwitchPoint {
    pub at: Instant,
    pub from: (u16, u16),
    pub to: (u16, u16),
    /// The first frame of the new layer is a keyframe (it must be).
    pub keyframe: bool,
    pub seq: u16,
}

/// Whether the received stream is one clean stream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContinuityStats {
    /// Forward jumps of the sequence number by more than one (in arrival order).
    pub seq_gaps: u64,
    /// Packets missing in those jumps.
    pub seq_gap_packets: u64,
    /// Packets whose sequence number is not above the previous one (reordering, duplicates,
    /// retransmissions).
    pub seq_backwards: u64,
    /// Of those, packets that filled a gap (late: reordered, or lost and retransmitted after
    /// a NACK), and the longest time a gap waited to be filled.
    pub seq_recovered: u64,
    pub max_recovery: Duration,
    /// Consecutive packets whose RTP timestamp went back.
    pub timestamp_regressions: u64,
    /// Frame starts checked for picture-id continuity (previous frame start seen, no sequence
    /// gap in between).
    pub picture_ids_checked: u64,
    /// Of those, frames whose picture id was not the previous frame's plus one.
    pub picture_id_jumps: u64,
    /// Frame starts whose origin was looked up, and how many were found.
    pub frames: u64,
    pub frames_known: u64,
    /// Layer switches seen in the frames' origin.
    pub switches: u64,
    /// Switches whose first frame was not a keyframe although no packet was missing before
    /// it (a decoder would glitch).
    pub switches_without_keyframe: u64,
    /// Switches first seen on an interframe right after a sequence gap: the keyframe may have
    /// been lost on the way (a bottleneck), so nothing can be said of the server.
    pub switches_after_loss: u64,
    /// The first anomalies, described (for test failure messages).
    pub anomalies: Vec<String>,
}

impl ContinuityStats {
    /// Packets missing from the sequence and never received late.
    pub fn seq_missing(&self) -> u64 {
        self.seq_gap_packets.saturating_sub(self.seq_recovered)
    }

    /// No sequence number missing for good, no timestamp regression, no picture-id jump, no
    /// switch on an interframe.
    pub fn is_clean(&self) -> bool {
        self.seq_missing() == 0
            && self.timestamp_regressions == 0
            && self.picture_id_jumps == 0
            && self.switches_without_keyframe == 0
    }

    fn note(&mut self, what: String) {
        if self.anomalies.len() < 50 {
            self.anomalies.push(what);
        }
    }

    /// Loss notes are many under a bottleneck: they take at most 20 of the 50 slots.
    fn note_loss(&mut self, what: impl FnOnce() -> String) {
        if self.anomalies.len() < 20 {
            self.anomalies.push(what());
        }
    }
}

/// What the continuity check remembers of the previous packet / frame.
#[derive(Debug, Clone, Default)]
struct Last {
    seq: Option<u16>,
    timestamp: Option<u32>,
    /// Picture id (and its width in bits) of the last frame start, and whether a sequence gap
    /// happened since.
    picture_id: Option<(u16, u16)>,
    gap_since_frame: bool,
    /// Origin (clip size) of the last known frame.
    origin: Option<(u16, u16)>,
    /// What the last frame was, if known.
    frame: Option<FrameOrigin>,
    /// Sequence numbers skipped by gaps and not received yet, with when the gap was seen
    /// (bounded: the oldest are forgotten).
    missing: VecDeque<(u16, Instant)>,
}

/// At most this many missing sequence numbers are remembered for late arrivals.
const MAX_MISSING: usize = 1024;

/// What was seen of one received RTP packet.
#[derive(Debug, Clone, PartialEq)]
pub struct PacketInfo {
    pub ssrc: u32,
    pub sequence_number: u16,
    pub timestamp: u32,
    pub payload_type: u8,
    pub marker: bool,
    pub payload_len: usize,
    pub arrival: Instant,
    /// Header extension ids present on the packet.
    pub extension_ids: Vec<u8>,
    /// VP8 only: this packet starts a keyframe.
    pub keyframe_start: bool,
    /// VP8 only: the payload descriptor's picture id, if present.
    pub picture_id: Option<u16>,
    /// VP8 only: TL0PICIDX, if present.
    pub tl0_pic_idx: Option<u8>,
}

/// Sequence tracking of one SSRC (RFC 3550 A.3 style: expected vs. received).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeqTracker {
    base: i64,
    max: i64,
    started: bool,
    pub received: u64,
    /// Packets that arrived with a sequence number below the highest seen.
    pub out_of_order: u64,
}

impl SeqTracker {
    pub fn on_seq(&mut self, seq: u16) {
        self.received += 1;
        if !self.started {
            self.started = true;
            self.base = i64::from(seq);
            self.max = self.base;
            return;
        }
        let delta = i64::from(seq.wrapping_sub(self.max as u16) as i16);
        let ext = self.max + delta;
        if ext > self.max {
            self.max = ext;
        } else {
            self.out_of_order += 1;
            if ext < self.base {
                self.base = ext;
            }
        }
    }

    pub fn expected(&self) -> u64 {
        if self.started {
            (self.max - self.base + 1) as u64
        } else {
            0
        }
    }

    /// Expected minus received, never negative (duplicates can make received exceed expected).
    pub fn lost(&self) -> u64 {
        self.expected().saturating_sub(self.received)
    }
}

/// Statistics of one remote (forwarded) track on the subscriber connection.
#[derive(Debug, Clone)]
pub struct RemoteTrackStats {
    /// Server track id (`TR_...`), the remote track's id.
    pub track_id: String,
    /// The remote stream id: the publisher's participant id.
    pub stream_id: String,
    pub kind: TrackKind,
    pub mime_type: Option<String>,
    /// When `on_track` fired (the first packet's arrival, in webrtc-rs).
    pub started_at: Instant,
    pub packets: u64,
    /// Padding-only packets among them (bandwidth probes).
    pub padding_packets: u64,
    /// RTP payload bytes.
    pub bytes: u64,
    pub first_packet_at: Option<Instant>,
    pub last_packet_at: Option<Instant>,
    /// Largest gap between two consecutive arrivals.
    pub max_interarrival: Duration,
    /// VP8 keyframes seen (packets starting a keyframe).
    pub keyframes: u64,
    pub first_keyframe_at: Option<Instant>,
    pub ssrcs: Vec<u32>,
    pub payload_types: Vec<u8>,
    pub seq: HashMap<u32, SeqTracker>,
    /// The server unpublished the track (or its publisher left), or the connection closed.
    pub ended: bool,
    /// The most recent packets, oldest first.
    pub recent: VecDeque<PacketInfo>,
    pub keep_recent: usize,
    /// VP8: the frame size of the last keyframe received.
    pub resolution: Option<(u16, u16)>,
    /// VP8: every change of the keyframe size (the first keyframe included), oldest first.
    pub resolution_changes: Vec<ResolutionChange>,
    /// VP8: packets by the frame size of the keyframe they follow (packets before the first
    /// keyframe are not counted).
    pub packets_by_resolution: BTreeMap<(u16, u16), u64>,
    /// VP8: frames by the size of the clip they come from (frames of unknown origin are not
    /// counted; see the module docs).
    pub frames_by_origin: BTreeMap<(u16, u16), u64>,
    /// VP8: layer switches seen in the frames' origin, oldest first.
    pub switches: Vec<SwitchPoint>,
    /// `layer_changed` messages for this track, oldest first.
    pub layer_changes: Vec<LayerChange>,
    pub continuity: ContinuityStats,
    /// VP8: what a receiver could decode, and when it would ask for a keyframe (see
    /// [`super::decoder`]). Every video track has one; its policy is `Off` unless set with
    /// [`RemoteTrackStats::with_pli_policy`].
    pub decoder: Option<DecoderModel>,
    last: Last,
}

impl RemoteTrackStats {
    pub fn new(track_id: String, stream_id: String, kind: TrackKind, keep_recent: usize) -> Self {
        RemoteTrackStats {
            track_id,
            stream_id,
            kind,
            mime_type: None,
            started_at: Instant::now(),
            packets: 0,
            padding_packets: 0,
            bytes: 0,
            first_packet_at: None,
            last_packet_at: None,
            max_interarrival: Duration::ZERO,
            keyframes: 0,
            first_keyframe_at: None,
            ssrcs: Vec::new(),
            payload_types: Vec::new(),
            seq: HashMap::new(),
            ended: false,
            recent: VecDeque::new(),
            keep_recent,
            resolution: None,
            resolution_changes: Vec::new(),
            packets_by_resolution: BTreeMap::new(),
            frames_by_origin: BTreeMap::new(),
            switches: Vec::new(),
            layer_changes: Vec::new(),
            continuity: ContinuityStats::default(),
            decoder: (kind == TrackKind::Video).then(|| DecoderModel::new(PliPolicy::Off)),
            last: Last::default(),
        }
    }

    /// Sets when the modelled receiver asks for keyframes (video tracks only).
    pub fn with_pli_policy(mut self, policy: PliPolicy) -> Self {
        if self.kind == TrackKind::Video {
            self.decoder = Some(DecoderModel::new(policy));
        }
        self
    }

    /// When the first keyframe of size `size` became decodable at or after `since` (a
    /// keyframe repaired by retransmission included; see [`super::decoder`]).
    pub fn first_decodable_at(&self, size: (u16, u16), since: Instant) -> Option<Instant> {
        self.decoder
            .as_ref()?
            .decoded_keyframes()
            .iter()
            .find(|k| k.at >= since && k.size == Some(size))
            .map(|k| k.at)
    }

    /// Whether the modelled receiver asks for a keyframe now (counted as sent).
    pub fn poll_pli(&mut self, now: Instant) -> bool {
        self.decoder.as_mut().is_some_and(|d| d.poll_pli(now))
    }

    pub fn on_packet(&mut self, pkt: &rtp::Packet, now: Instant) {
        let h = &pkt.header;
        self.packets += 1;
        self.bytes += pkt.payload.len() as u64;
        if let Some(last) = self.last_packet_at {
            self.max_interarrival = self
                .max_interarrival
                .max(now.saturating_duration_since(last));
        }
        self.first_packet_at.get_or_insert(now);
        self.last_packet_at = Some(now);
        if !self.ssrcs.contains(&h.ssrc) {
            self.ssrcs.push(h.ssrc);
        }
        if !self.payload_types.contains(&h.payload_type) {
            self.payload_types.push(h.payload_type);
        }
        self.seq
            .entry(h.ssrc)
            .or_default()
            .on_seq(h.sequence_number);
        if h.padding && pkt.payload.is_empty() {
            // Padding only (the server probing the bandwidth): no media, but its sequence
            // number is part of the stream.
            self.padding_packets += 1;
            if let Some(dec) = self.decoder.as_mut() {
                dec.on_padding(h.sequence_number, now);
            }
            let newer = self
                .last
                .seq
                .is_none_or(|l| h.sequence_number.wrapping_sub(l) as i16 > 0);
            if newer {
                self.last.seq = Some(h.sequence_number);
            }
            return;
        }
        let vp8 = if self.kind == TrackKind::Video && self.is_vp8() {
            parse_vp8_descriptor(&pkt.payload)
        } else {
            None
        };
        let keyframe_start = vp8.is_some_and(|d| d.keyframe_start);
        if let (Some(d), Some(dec)) = (vp8.as_ref(), self.decoder.as_mut()) {
            let data = pkt.payload.get(d.header_len..).unwrap_or_default();
            dec.on_packet(
                FramePacket {
                    seq: h.sequence_number,
                    timestamp: h.timestamp,
                    frame_start: d.start_of_partition && d.partition_id == 0,
                    keyframe: d.keyframe_start,
                    size: if d.keyframe_start {
                        vp8_keyframe_size(data)
                    } else {
                        None
                    },
                    marker: h.marker,
                },
                now,
            );
        }
        if keyframe_start {
            self.keyframes += 1;
            self.first_keyframe_at.get_or_insert(now);
        }
        self.check_continuity(pkt, vp8.as_ref(), now);
        if self.keep_recent > 0 {
            if self.recent.len() == self.keep_recent {
                self.recent.pop_front();
            }
            self.recent.push_back(PacketInfo {
                ssrc: h.ssrc,
                sequence_number: h.sequence_number,
                timestamp: h.timestamp,
                payload_type: h.payload_type,
                marker: h.marker,
                payload_len: pkt.payload.len(),
                arrival: now,
                extension_ids: h.extensions.iter().map(|e| e.id).collect(),
                keyframe_start,
                picture_id: vp8.and_then(|d| d.picture_id),
                tl0_pic_idx: vp8.and_then(|d| d.tl0_pic_idx),
            });
        }
    }

    /// Sequence, timestamp, picture-id and layer-switch checks, and the resolution bookkeeping.
    fn check_continuity(&mut self, pkt: &rtp::Packet, vp8: Option<&Vp8Descriptor>, now: Instant) {
        let h = &pkt.header;
        let index = self.packets - 1;
        let c = &mut self.continuity;
        let last = &mut self.last;
        if let Some(prev) = last.seq {
            let delta = h.sequence_number.wrapping_sub(prev) as i16;
            if delta > 1 {
                c.seq_gaps += 1;
                c.seq_gap_packets += (delta - 1) as u64;
                last.gap_since_frame = true;
                for k in 1..delta as u16 {
                    if last.missing.len() == MAX_MISSING {
                        last.missing.pop_front();
                    }
                    last.missing.push_back((prev.wrapping_add(k), now));
                }
                c.note_loss(|| {
                    format!(
                        "sequence gap: {prev} -> {} ({} missing) at packet {index}",
                        h.sequence_number,
                        delta - 1
                    )
                });
            } else if delta <= 0 {
                c.seq_backwards += 1;
                if let Some(i) = last
                    .missing
                    .iter()
                    .position(|(s, _)| *s == h.sequence_number)
                    && let Some((_, seen)) = last.missing.remove(i)
                {
                    c.seq_recovered += 1;
                    let waited = now.saturating_duration_since(seen);
                    c.max_recovery = c.max_recovery.max(waited);
                    c.note_loss(|| {
                        format!(
                            "seq {} arrived {:.1} ms after its gap was seen",
                            h.sequence_number,
                            waited.as_secs_f64() * 1000.0
                        )
                    });
                }
            }
            if delta <= 0 {
                // Reordered or repeated: not part of the in-order walk.
                return;
            }
        }
        last.seq = Some(h.sequence_number);
        if let Some(prev) = last.timestamp
            && (h.timestamp.wrapping_sub(prev) as i32) < 0
        {
            c.timestamp_regressions += 1;
            c.note(format!(
                "timestamp went back: {prev} -> {} at seq {}",
                h.timestamp, h.sequence_number
            ));
        }
        last.timestamp = Some(h.timestamp);

        let Some(d) = vp8 else { return };
        let vp8_data = pkt.payload.get(d.header_len..).unwrap_or_default();
        if d.keyframe_start
            && let Some(size) = vp8_keyframe_size(vp8_data)
            && self.resolution != Some(size)
        {
            if self.resolution_changes.len() < MAX_HISTORY {
                self.resolution_changes.push(ResolutionChange {
                    at: now,
                    width: size.0,
                    height: size.1,
                    seq: h.sequence_number,
                    packet_index: index,
                });
            }
            self.resolution = Some(size);
        }
        if let Some(size) = self.resolution {
            *self.packets_by_resolution.entry(size).or_default() += 1;
        }
        if !(d.start_of_partition && d.partition_id == 0) {
            return;
        }
        // A frame starts here.
        let origin = known_frame(vp8_data);
        let describe = |o: Option<FrameOrigin>| match o {
            Some(o) => format!(
                "{}x{} frame {}{}",
                o.width,
                o.height,
                o.index,
                if o.keyframe { " (key)" } else { "" }
            ),
            None => "unknown frame".to_owned(),
        };
        if let Some(pid) = d.picture_id {
            // The field may change width between frames (webrtc-rs sends ids below 128 in 7
            // bits): the value must still be the previous one plus one, modulo the field.
            let modulo: u16 = if d.picture_id_15bit { 1 << 15 } else { 1 << 7 };
            if let Some((prev, _)) = last.picture_id
                && !last.gap_since_frame
            {
                c.picture_ids_checked += 1;
                let expected = (prev + 1) % modulo;
                if pid != expected {
                    c.picture_id_jumps += 1;
                    c.note(format!(
                        "picture id jumped: {prev} -> {pid} (expected {expected}) at seq {}, \
                         {}-bit, {} after {}",
                        h.sequence_number,
                        if d.picture_id_15bit { 15 } else { 7 },
                        describe(origin),
                        describe(last.frame)
                    ));
                }
            }
            last.picture_id = Some((pid, modulo));
        }
        let gap_before = std::mem::replace(&mut last.gap_since_frame, false);
        last.frame = origin;
        c.frames += 1;
        let Some(FrameOrigin { width, height, .. }) = origin else {
            return;
        };
        if width == 0 {
            return;
        }
        c.frames_known += 1;
        *self.frames_by_origin.entry((width, height)).or_default() += 1;
        if let Some(from) = last.origin
            && from != (width, height)
        {
            c.switches += 1;
            if !d.keyframe_start && gap_before {
                c.switches_after_loss += 1;
            } else if !d.keyframe_start {
                c.switches_without_keyframe += 1;
                c.note(format!(
                    "switch {}x{} -> {width}x{height} on an interframe at seq {}",
                    from.0, from.1, h.sequence_number
                ));
            }
            if self.switches.len() < MAX_HISTORY {
                self.switches.push(SwitchPoint {
                    at: now,
                    from,
                    to: (width, height),
                    keyframe: d.keyframe_start,
                    seq: h.sequence_number,
                });
            }
        }
        last.origin = Some((width, height));
    }

    /// Records a `layer_changed` message for this track.
    pub fn on_layer_changed(&mut self, change: LayerChange) {
        if self.layer_changes.len() < MAX_HISTORY {
            self.layer_changes.push(change);
        }
    }

    /// The frame sizes received from `since` on: the one in force at `since`, then every
    /// change after it, in order.
    pub fn resolutions_since(&self, since: Instant) -> Vec<(u16, u16)> {
        let mut out: Vec<(u16, u16)> = Vec::new();
        let before = self
            .resolution_changes
            .iter()
            .rev()
            .find(|c| c.at <= since)
            .map(|c| (c.width, c.height));
        out.extend(before);
        for c in self.resolution_changes.iter().filter(|c| c.at > since) {
            out.push((c.width, c.height));
        }
        out
    }

    /// When the first keyframe of size `size` arrived at or after `since`.
    pub fn first_resolution_at(&self, size: (u16, u16), since: Instant) -> Option<Instant> {
        self.resolution_changes
            .iter()
            .find(|c| c.at >= since && (c.width, c.height) == size)
            .map(|c| c.at)
    }

    fn is_vp8(&self) -> bool {
        // Before the codec is known, assume VP8 (the only video codec publishers send here).
        self.mime_type
            .as_deref()
            .is_none_or(|m| m.eq_ignore_ascii_case("video/vp8"))
    }

    pub fn expected(&self) -> u64 {
        self.seq.values().map(SeqTracker::expected).sum()
    }

    pub fn lost(&self) -> u64 {
        self.seq.values().map(SeqTracker::lost).sum()
    }

    /// Loss in percent of expected packets (0 when nothing was expected).
    pub fn loss_percent(&self) -> f64 {
        let expected = self.expected();
        if expected == 0 {
            0.0
        } else {
            100.0 * self.lost() as f64 / expected as f64
        }
    }
}

/// The parts of a VP8 RTP payload descriptor (RFC 7741 §4.2) the tests care about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vp8Descriptor {
    pub start_of_partition: bool,
    pub partition_id: u8,
    pub picture_id: Option<u16>,
    /// The picture id is 15 bits long (M bit), else 7.
    pub picture_id_15bit: bool,
    pub tl0_pic_idx: Option<u8>,
    /// The packet starts a frame (S=1, PID=0) and that frame is a keyframe.
    pub keyframe_start: bool,
    /// Length of the descriptor; the VP8 payload starts here.
    pub header_len: usize,
}

pub fn parse_vp8_descriptor(p: &[u8]) -> Option<Vp8Descriptor> {
    let b0 = *p.first()?;
    let x = b0 & 0x80 != 0;
    let start_of_partition = b0 & 0x10 != 0;
    let partition_id = b0 & 0x07;
    let mut i = 1;
    let (mut picture_id, mut tl0_pic_idx) = (None, None);
    let mut picture_id_15bit = false;
    if x {
        let b1 = *p.get(i)?;
        i += 1;
        let (has_i, has_l, has_t, has_k) = (
            b1 & 0x80 != 0,
            b1 & 0x40 != 0,
            b1 & 0x20 != 0,
            b1 & 0x10 != 0,
        );
        if has_i {
            let m = *p.get(i)?;
            if m & 0x80 != 0 {
                let m2 = *p.get(i + 1)?;
                picture_id = Some((u16::from(m & 0x7f) << 8) | u16::from(m2));
                picture_id_15bit = true;
                i += 2;
            } else {
                picture_id = Some(u16::from(m & 0x7f));
                i += 1;
            }
        }
        if has_l {
            tl0_pic_idx = Some(*p.get(i)?);
            i += 1;
        }
        if has_t || has_k {
            p.get(i)?;
            i += 1;
        }
    }
    let keyframe_start =
        start_of_partition && partition_id == 0 && p.get(i).is_some_and(|&b| b & 0x01 == 0);
    Some(Vp8Descriptor {
        start_of_partition,
        partition_id,
        picture_id,
        picture_id_15bit,
        tl0_pic_idx,
        keyframe_start,
        header_len: i,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_tracker_counts_gaps_wrap_and_reorder() {
        let mut t = SeqTracker::default();
        for s in [65533u16, 65534, 65535, 0, 2, 1, 5] {
            t.on_seq(s);
        }
        // 65533..=5 is 9 packets; 3 and 4 missing.
        assert_eq!(t.expected(), 9);
        assert_eq!(t.received, 7);
        assert_eq!(t.lost(), 2);
        assert_eq!(t.out_of_order, 1);
        // A duplicate never makes loss negative.
        t.on_seq(5);
        assert_eq!(t.lost(), 1);
    }

    #[test]
    fn vp8_descriptor() {
        // X=1,S=1,PID=0; I=1 with 15-bit picture id 0x1234; L=1 tl0=7; payload keyframe byte.
        let p = [0x90, 0xc0, 0x80 | 0x12, 0x34, 7, 0x10];
        let d = parse_vp8_descriptor(&p).unwrap();
        assert_eq!(d.picture_id, Some(0x1234));
        assert_eq!(d.tl0_pic_idx, Some(7));
        assert!(d.keyframe_start);
        assert_eq!(d.header_len, 5);
        // Interframe (P bit set).
        let d = parse_vp8_descriptor(&[0x10, 0x01]).unwrap();
        assert!(!d.keyframe_start);
        // Not a start of partition.
        let d = parse_vp8_descriptor(&[0x00, 0x00]).unwrap();
        assert!(!d.keyframe_start);
        assert!(parse_vp8_descriptor(&[0x80]).is_none());
    }

    use super::super::media::{Clip, MediaPacketizer, simulcast_files};

    /// Packets of `frames` frames of the simulcast clip `rid`, starting at frame `from`.
    fn layer_packets(rid: &str, from: usize, frames: usize) -> Vec<Vec<rtp::Packet>> {
        let file = simulcast_files()
            .into_iter()
            .find(|(r, _)| r == rid)
            .unwrap()
            .1;
        let mut p = MediaPacketizer::new(Clip::load(&file).unwrap(), 7, 96).unwrap();
        for _ in 0..from {
            p.next_packets(false).unwrap();
        }
        (0..frames)
            .map(|_| p.next_packets(false).unwrap().0)
            .collect()
    }

    /// What an SFU does to a stream of frames from several layers: one SSRC, continuous
    /// sequence numbers, timestamps and (15-bit) picture ids.
    fn rewrite(frames: Vec<Vec<rtp::Packet>>) -> Vec<rtp::Packet> {
        let mut out = Vec::new();
        let (mut seq, mut ts, mut pid) = (65_530u16, 4_294_960_000u32, 32_765u16);
        for frame in frames {
            for mut p in frame {
                p.header.ssrc = 1;
                p.header.sequence_number = seq;
                p.header.timestamp = ts;
                seq = seq.wrapping_add(1);
                let d = parse_vp8_descriptor(&p.payload).unwrap();
                assert!(d.picture_id.is_some(), "picture id present");
                let mut payload = vec![p.payload[0] | 0x80, 0x80];
                payload.extend([0x80 | (pid >> 8) as u8, pid as u8]);
                payload.extend_from_slice(&p.payload[d.header_len..]);
                p.payload = payload.into();
                out.push(p);
            }
            ts = ts.wrapping_add(3000);
            pid = (pid + 1) % (1 << 15);
        }
        out
    }

    fn receive(packets: &[rtp::Packet]) -> RemoteTrackStats {
        let mut s = RemoteTrackStats::new("TR_x".into(), "PA_y".into(), TrackKind::Video, 0);
        let now = Instant::now();
        for p in packets {
            s.on_packet(p, now);
        }
        s
    }

    #[test]
    fn publishers_send_continuous_15_bit_picture_ids() {
        let packets: Vec<rtp::Packet> = layer_packets("q", 0, 200).into_iter().flatten().collect();
        assert!(
            packets
                .iter()
                .all(|p| parse_vp8_descriptor(&p.payload).is_some_and(|d| d.picture_id_15bit))
        );
        let s = receive(&packets);
        assert!(s.continuity.is_clean(), "{:?}", s.continuity);
        assert_eq!(s.continuity.picture_ids_checked, 199);
        assert_eq!(s.continuity.frames_known, 200);
    }

    #[test]
    fn switches_at_keyframes_are_clean() {
        // q frames 50..60, then h from its keyframe at 60, then q again from 120.
        let mut frames = layer_packets("q", 50, 10);
        frames.extend(layer_packets("h", 60, 60));
        frames.extend(layer_packets("q", 120, 5));
        let s = receive(&rewrite(frames));
        let c = &s.continuity;
        assert!(c.is_clean(), "{c:?}");
        assert_eq!((c.frames, c.frames_known, c.switches), (75, 75, 2), "{c:?}");
        assert!(c.picture_ids_checked >= 74, "{c:?}");
        assert_eq!(s.switches.len(), 2);
        assert_eq!(
            (s.switches[0].from, s.switches[0].to),
            ((320, 180), (640, 360))
        );
        assert!(s.switches.iter().all(|w| w.keyframe));
        // Packets before the first keyframe have no known resolution.
        let sizes: Vec<(u16, u16)> = s
            .resolution_changes
            .iter()
            .map(|r| (r.width, r.height))
            .collect();
        assert_eq!(sizes, vec![(640, 360), (320, 180)]);
        assert_eq!(s.resolution, Some((320, 180)));
        assert_eq!(s.frames_by_origin[&(320, 180)], 15);
        assert_eq!(s.frames_by_origin[&(640, 360)], 60);
        assert!(s.packets_by_resolution[&(640, 360)] >= 60);
    }

    #[test]
    fn a_switch_on_an_interframe_and_gaps_are_caught() {
        let mut frames = layer_packets("q", 0, 10);
        frames.extend(layer_packets("h", 10, 10));
        let mut packets = rewrite(frames);
        let s = receive(&packets);
        assert_eq!(
            s.continuity.switches_without_keyframe, 1,
            "{:?}",
            s.continuity
        );
        assert!(!s.continuity.is_clean());
        assert_eq!(s.resolution_changes.len(), 1, "only q's keyframe");

        // A lost packet: one gap, and the picture id after it is not checked.
        let lost = packets.remove(30);
        let s = receive(&packets);
        assert_eq!(
            (s.continuity.seq_gaps, s.continuity.seq_gap_packets),
            (1, 1)
        );
        assert_eq!(s.lost(), 1);
        // Late arrival of the lost packet: counted as backwards, nothing else.
        packets.push(lost);
        let s = receive(&packets);
        assert_eq!(s.continuity.seq_backwards, 1);
        assert_eq!(s.continuity.seq_recovered, 1);
        assert_eq!(s.continuity.seq_missing(), 0);
        assert_eq!(s.lost(), 0);

        // A picture id that jumps, and a timestamp that goes back.
        let mut packets = rewrite(layer_packets("q", 0, 5));
        let last = packets.len() - 1;
        // The last frame's first packet gets a picture id 5 too far.
        let first_of_last = packets
            .iter()
            .rposition(|p| p.payload[0] & 0x10 != 0)
            .unwrap();
        let mut payload = packets[first_of_last].payload.to_vec();
        payload[3] = payload[3].wrapping_add(5);
        packets[first_of_last].payload = payload.into();
        packets[last].header.timestamp = packets[0].header.timestamp.wrapping_sub(1);
        let s = receive(&packets);
        assert_eq!(s.continuity.timestamp_regressions, 1);
        assert_eq!(s.continuity.picture_id_jumps, 1, "{:?}", s.continuity);
    }

    #[test]
    fn stats_from_packetizer_output() {
        use super::super::media::{Clip, MediaPacketizer, default_video_file};
        let clip = Clip::load(&default_video_file()).unwrap();
        let mut p = MediaPacketizer::new(clip, 42, 96).unwrap();
        let mut s = RemoteTrackStats::new("TR_x".into(), "PA_y".into(), TrackKind::Video, 8);
        let now = Instant::now();
        for i in 0..31 {
            let (pkts, _) = p.next_packets(false).unwrap();
            for (j, pkt) in pkts.iter().enumerate() {
                // Drop one packet of frame 5.
                if i == 5 && j == 0 {
                    continue;
                }
                s.on_packet(pkt, now);
            }
        }
        assert_eq!(s.keyframes, 2, "frames 0 and 30 are keyframes");
        assert_eq!(s.lost(), 1);
        assert_eq!(s.recent.len(), 8);
        assert!(s.recent.iter().all(|r| r.picture_id.is_some()));
        assert!(s.loss_percent() > 0.0);
    }
}
