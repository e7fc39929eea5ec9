//! Receive-side statistics of one remote track: packets, bytes, loss from sequence gaps,
//! VP8 keyframes, and the last N packets for tests to inspect.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use plaza::signal::TrackKind;
use rtc::rtp;

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
    pub ended: bool,
    /// The most recent packets, oldest first.
    pub recent: VecDeque<PacketInfo>,
    pub keep_recent: usize,
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
        }
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
        let vp8 = if self.kind == TrackKind::Video && self.is_vp8() {
            parse_vp8_descriptor(&pkt.payload)
        } else {
            None
        };
        let keyframe_start = vp8.is_some_and(|d| d.keyframe_start);
        if keyframe_start {
            self.keyframes += 1;
            self.first_keyframe_at.get_or_insert(now);
        }
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
