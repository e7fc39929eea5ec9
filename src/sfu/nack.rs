//! NACK responder for subscriber connections: retransmits what a subscriber lost, within a
//! budget.
//!
//! `rtc`'s own responder keeps 1024 packets per stream and answers every NACK, every time. A
//! webrtc-rs receiver re-NACKs a missing packet every 100 ms for as long as it stays in its
//! 512-packet receive log, and a browser does much the same, so behind a bottleneck the
//! responder turns every lost packet into up to ten retransmissions a second. Measured at a
//! 300 kbit/s bottleneck, 74–85 % of what reached the subscriber were retransmissions: they kept
//! the link saturated, delayed the keyframe of the lower layer by seconds, and held the
//! bandwidth estimate at its floor (bench/results/simulcast-2026-11-22.md).
//!
//! This responder answers a NACK for a packet only when all of these hold:
//!
//! * it is in the bounded history ([`HISTORY`] packets per stream) and was first sent at most
//!   [`MAX_AGE`] ago (older ones are useless to a real-time receiver);
//! * it has been retransmitted fewer than [`MAX_ATTEMPTS`] times, the last one at least
//!   [`RESEND_INTERVAL`] ago (a re-NACK sooner than that is the receiver not having had time to
//!   see the previous copy);
//! * the [`RetransmitBudget`] has room: retransmissions may use the part of the subscriber's
//!   bandwidth estimate the media does not, between [`MIN_SHARE_PERCENT`] and
//!   [`MAX_SHARE_PERCENT`] of the estimate. When the link cannot carry the media, retransmitting
//!   only makes it worse, so the share shrinks to the minimum.
//!
//! Within one NACK, packets of a VP8 keyframe come first (a subscriber switching layers or
//! recovering waits for exactly that), then the newest ones (the oldest losses are the least
//! useful, often of a layer the subscriber is leaving). A NACK that is not answered is dropped,
//! not queued. The decision logic
//! ([`SendHistory`], [`RetransmitBudget`]) is pure and unit-tested; [`NackResponder`] is the
//! interceptor around it.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use rtc::interceptor::{
    Attribute, AttributedPacket, Interceptor, Packet, StreamInfo, TaggedPacket,
};
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::rtp;
use rtc::sansio::Protocol;
use rtc::shared::TransportContext;

use super::bwe::Estimate;
use super::selector::BitrateMeter;
use super::vp8;

/// Packets remembered per stream (a power of two). At ~150 packets/s (a 1.5 Mbit/s layer) this
/// is ~1.7 s, more than [`MAX_AGE`].
pub const HISTORY: usize = 256;
/// A packet first sent longer ago than this is not retransmitted.
pub const MAX_AGE: Duration = Duration::from_millis(1_000);
/// Retransmissions of one packet at most.
pub const MAX_ATTEMPTS: u8 = 3;
/// Minimum time between two retransmissions of one packet.
pub const RESEND_INTERVAL: Duration = Duration::from_millis(150);
/// Retransmissions may always use this share of the estimate (so isolated losses on a link
/// that is full but not overloaded are still repaired).
pub const MIN_SHARE_PERCENT: u64 = 20;
/// ... and never more than this share, however idle the link.
pub const MAX_SHARE_PERCENT: u64 = 50;
/// Rate allowed while the subscriber's bandwidth is unknown (no TWCC/REMB feedback yet).
pub const UNKNOWN_RATE_BPS: u64 = 300_000;
/// The budget may be saved up for this long (burst size).
pub const BURST: Duration = Duration::from_millis(100);
/// ... but always holds at least one full-size packet.
const MIN_BURST_BITS: f64 = 1_500.0 * 8.0;

/// One remembered packet.
#[derive(Debug, Clone)]
struct Entry {
    packet: rtp::Packet,
    /// Part of a keyframe (retransmitted first).
    keyframe: bool,
    sent: Instant,
    attempts: u8,
    last_resent: Option<Instant>,
}

/// Why a retransmission was refused (or that it was allowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Retransmit.
    Resend,
    /// Not in the history (never sent, or overwritten).
    Unknown,
    /// Sent longer than [`MAX_AGE`] ago.
    TooOld,
    /// Already retransmitted [`MAX_ATTEMPTS`] times.
    Exhausted,
    /// Retransmitted less than [`RESEND_INTERVAL`] ago.
    TooSoon,
    /// The [`RetransmitBudget`] is spent.
    OverBudget,
}

/// The last [`HISTORY`] packets of one stream, by sequence number.
#[derive(Debug, Clone)]
pub struct SendHistory {
    slots: Vec<Option<Entry>>,
}

impl Default for SendHistory {
    fn default() -> Self {
        Self::new()
    }
}

impl SendHistory {
    /// An empty history.
    pub fn new() -> Self {
        SendHistory {
            slots: vec![None; HISTORY],
        }
    }

    fn slot(seq: u16) -> usize {
        usize::from(seq) % HISTORY
    }

    /// Remember a packet as it is sent; `keyframe`: it belongs to a keyframe.
    pub fn add(&mut self, now: Instant, packet: rtp::Packet, keyframe: bool) {
        let i = Self::slot(packet.header.sequence_number);
        if let Some(s) = self.slots.get_mut(i) {
            *s = Some(Entry {
                packet,
                keyframe,
                sent: now,
                attempts: 0,
                last_resent: None,
            });
        }
    }

    /// Whether `seq` may be retransmitted now, by history, age and attempts (not budget).
    pub fn check(&self, seq: u16, now: Instant) -> Verdict {
        let Some(e) = self.entry(seq) else {
            return Verdict::Unknown;
        };
        if now.saturating_duration_since(e.sent) > MAX_AGE {
            Verdict::TooOld
        } else if e.attempts >= MAX_ATTEMPTS {
            Verdict::Exhausted
        } else if e
            .last_resent
            .is_some_and(|t| now.saturating_duration_since(t) < RESEND_INTERVAL)
        {
            Verdict::TooSoon
        } else {
            Verdict::Resend
        }
    }

    /// Size of `seq` on the wire (header + payload), if remembered.
    pub fn size(&self, seq: u16) -> Option<usize> {
        self.get(seq)
            .map(|p| 12 + p.header.csrc.len() * 4 + p.payload.len())
    }

    /// Whether `seq` is remembered as part of a keyframe.
    pub fn is_keyframe(&self, seq: u16) -> bool {
        self.entry(seq).is_some_and(|e| e.keyframe)
    }

    fn entry(&self, seq: u16) -> Option<&Entry> {
        self.slots
            .get(Self::slot(seq))
            .and_then(Option::as_ref)
            .filter(|e| e.packet.header.sequence_number == seq)
    }

    fn get(&self, seq: u16) -> Option<&rtp::Packet> {
        self.entry(seq).map(|e| &e.packet)
    }

    /// Record a retransmission of `seq` and return the packet to send.
    pub fn resend(&mut self, seq: u16, now: Instant) -> Option<rtp::Packet> {
        let e = self
            .slots
            .get_mut(Self::slot(seq))
            .and_then(Option::as_mut)
            .filter(|e| e.packet.header.sequence_number == seq)?;
        e.attempts = e.attempts.saturating_add(1);
        e.last_resent = Some(now);
        Some(e.packet.clone())
    }
}

/// Token bucket limiting the retransmission rate of one subscriber connection to the share of
/// its bandwidth estimate the media leaves free (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct RetransmitBudget {
    /// Media (first transmissions) sent on the connection.
    media: BitrateMeter,
    tokens_bits: f64,
    last: Option<Instant>,
}

impl RetransmitBudget {
    /// A budget with nothing saved.
    pub fn new() -> Self {
        Self::default()
    }

    /// Media of `bytes` bytes was sent (not a retransmission).
    pub fn on_media(&mut self, now: Instant, bytes: usize) {
        self.media.add(now, bytes);
    }

    /// The retransmission rate allowed now, given the estimate (`None` = unknown).
    pub fn rate_bps(&self, now: Instant, estimate_bps: Option<u64>) -> u64 {
        match estimate_bps {
            None => UNKNOWN_RATE_BPS,
            Some(e) => {
                let spare = e.saturating_sub(self.media.bps(now));
                let lo = e.saturating_mul(MIN_SHARE_PERCENT) / 100;
                let hi = e.saturating_mul(MAX_SHARE_PERCENT) / 100;
                spare.clamp(lo, hi)
            }
        }
    }

    /// Spend `bytes` on a retransmission if the budget allows; refills first.
    pub fn try_spend(&mut self, now: Instant, bytes: usize, estimate_bps: Option<u64>) -> bool {
        let rate = self.rate_bps(now, estimate_bps) as f64;
        let cap = (rate * BURST.as_secs_f64()).max(MIN_BURST_BITS);
        let elapsed = match self.last {
            // A new budget starts full.
            None => f64::INFINITY,
            Some(t) => now.saturating_duration_since(t).as_secs_f64(),
        };
        if self.last.is_none_or(|t| now > t) {
            self.last = Some(now);
        }
        self.tokens_bits = (self.tokens_bits + rate * elapsed).min(cap);
        let bits = bytes as f64 * 8.0;
        if self.tokens_bits >= bits {
            self.tokens_bits -= bits;
            true
        } else {
            false
        }
    }
}

/// Counters of a [`NackResponder`] (for logs and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NackStats {
    /// Sequence numbers asked for.
    pub requested: u64,
    /// Retransmissions sent.
    pub resent: u64,
    /// Refused: not in the history, too old, too many attempts or too soon.
    pub refused: u64,
    /// Refused for lack of budget.
    pub over_budget: u64,
}

struct Stream {
    history: SendHistory,
    /// VP8: keyframes can be recognised.
    vp8: bool,
    /// RTP timestamp of the last keyframe sent (its packets share it).
    keyframe_ts: Option<u32>,
    rtx: Option<(u32, u8)>,
    rtx_seq: u16,
}

/// The interceptor: records what leaves on NACK-capable streams, answers NACKs within the
/// limits of [`SendHistory::check`] and the connection's [`RetransmitBudget`].
pub struct NackResponder {
    estimate: Option<Estimate>,
    streams: HashMap<u32, Stream>,
    budget: RetransmitBudget,
    stats: NackStats,
    read_queue: VecDeque<TaggedPacket>,
    write_queue: VecDeque<TaggedPacket>,
}

impl NackResponder {
    /// A responder budgeting against `estimate` (`None`: the fixed [`UNKNOWN_RATE_BPS`]).
    pub fn new(estimate: Option<Estimate>) -> Self {
        NackResponder {
            estimate,
            streams: HashMap::new(),
            budget: RetransmitBudget::new(),
            stats: NackStats::default(),
            read_queue: VecDeque::new(),
            write_queue: VecDeque::new(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> NackStats {
        self.stats
    }

    fn handle_nack(&mut self, now: Instant, nack: &TransportLayerNack) {
        let estimate = self.estimate.as_ref().and_then(|e| e.available(now));
        let Some(stream) = self.streams.get_mut(&nack.media_ssrc) else {
            return;
        };
        let mut seqs: Vec<u16> = nack
            .nacks
            .iter()
            .flat_map(|p| {
                std::iter::once(p.packet_id).chain(
                    (0..16u16)
                        .filter(move |i| p.lost_packets & (1 << i) != 0)
                        .map(move |i| p.packet_id.wrapping_add(i + 1)),
                )
            })
            .collect();
        // Keyframe packets first, then newest first: when the budget cannot cover everything,
        // a keyframe is what a switching or recovering subscriber waits for, and the most
        // recent losses are the ones still worth repairing (the oldest may be of a layer the
        // subscriber has already left).
        seqs.reverse();
        seqs.sort_by_key(|&seq| !stream.history.is_keyframe(seq));
        for seq in seqs {
            self.stats.requested += 1;
            match stream.history.check(seq, now) {
                Verdict::Resend => {}
                _ => {
                    self.stats.refused += 1;
                    continue;
                }
            }
            let size = stream.history.size(seq).unwrap_or(0);
            if !self.budget.try_spend(now, size, estimate) {
                self.stats.over_budget += 1;
                continue;
            }
            let Some(original) = stream.history.resend(seq, now) else {
                continue;
            };
            self.stats.resent += 1;
            let packet = match stream.rtx {
                Some((ssrc, pt)) => {
                    let mut payload = Vec::with_capacity(2 + original.payload.len());
                    payload.extend_from_slice(&original.header.sequence_number.to_be_bytes());
                    payload.extend_from_slice(&original.payload);
                    let seq = stream.rtx_seq;
                    stream.rtx_seq = seq.wrapping_add(1);
                    rtp::Packet {
                        header: rtp::header::Header {
                            version: 2,
                            ssrc,
                            payload_type: pt,
                            sequence_number: seq,
                            timestamp: original.header.timestamp,
                            marker: original.header.marker,
                            ..Default::default()
                        },
                        payload: payload.into(),
                    }
                }
                None => original,
            };
            self.write_queue.push_back(TaggedPacket {
                now,
                transport: TransportContext::default(),
                message: AttributedPacket::new(Packet::Rtp(packet)).with(Attribute::Retransmission),
            });
        }
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for NackResponder {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtcp(pkts) = &msg.message.packet {
            for p in pkts {
                if let Some(nack) = p.as_any().downcast_ref::<TransportLayerNack>() {
                    self.handle_nack(msg.now, nack);
                }
            }
        }
        self.read_queue.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.read_queue.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtp(p) = &msg.message.packet {
            self.budget
                .on_media(msg.now, 12 + p.header.csrc.len() * 4 + p.payload.len());
            if let Some(s) = self.streams.get_mut(&p.header.ssrc) {
                if s.vp8 && vp8::is_keyframe(&p.payload) {
                    s.keyframe_ts = Some(p.header.timestamp);
                }
                let keyframe = s.keyframe_ts == Some(p.header.timestamp);
                s.history.add(msg.now, p.clone(), keyframe);
            }
        }
        self.write_queue.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.write_queue.pop_front()
    }

    fn handle_timeout(&mut self, _now: Instant) -> Result<(), Self::Error> {
        Ok(())
    }

    fn poll_timeout(&mut self) -> Option<Self::Time> {
        None
    }
}

impl Interceptor for NackResponder {
    fn bind_local_stream(&mut self, info: &StreamInfo) {
        let nack = info
            .rtcp_feedback
            .iter()
            .any(|fb| fb.typ == "nack" && fb.parameter.is_empty());
        if nack {
            let rtx = info.ssrc_rtx.zip(info.payload_type_rtx);
            self.streams.insert(
                info.ssrc,
                Stream {
                    history: SendHistory::new(),
                    vp8: info.mime_type.eq_ignore_ascii_case("video/vp8"),
                    keyframe_ts: None,
                    rtx,
                    rtx_seq: 0,
                },
            );
        }
    }

    fn unbind_local_stream(&mut self, info: &StreamInfo) {
        self.streams.remove(&info.ssrc);
    }

    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}

    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

impl Drop for NackResponder {
    fn drop(&mut self) {
        if self.stats.requested > 0 {
            tracing::debug!(stats = ?self.stats, "nack responder");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::rtcp::transport_feedbacks::transport_layer_nack::NackPair;

    fn ms(t: Instant, n: u64) -> Instant {
        t + Duration::from_millis(n)
    }

    fn pkt(ssrc: u32, seq: u16, len: usize) -> rtp::Packet {
        rtp::Packet {
            header: rtp::header::Header {
                version: 2,
                ssrc,
                sequence_number: seq,
                payload_type: 96,
                ..Default::default()
            },
            payload: vec![0u8; len].into(),
        }
    }

    #[test]
    fn history_answers_recent_packets_a_few_times() {
        let t0 = Instant::now();
        let mut h = SendHistory::new();
        assert_eq!(h.check(5, t0), Verdict::Unknown);
        h.add(t0, pkt(1, 5, 1000), false);
        assert_eq!(h.size(5), Some(1012));
        assert_eq!(h.check(5, ms(t0, 10)), Verdict::Resend);
        assert!(h.resend(5, ms(t0, 10)).is_some());
        // A re-NACK 100 ms later is too soon, 150 ms later is fine.
        assert_eq!(h.check(5, ms(t0, 110)), Verdict::TooSoon);
        assert_eq!(h.check(5, ms(t0, 160)), Verdict::Resend);
        h.resend(5, ms(t0, 160));
        h.resend(5, ms(t0, 310));
        assert_eq!(h.check(5, ms(t0, 500)), Verdict::Exhausted);
        // Old packets are not answered, even if never retransmitted.
        h.add(t0, pkt(1, 6, 1000), false);
        assert_eq!(h.check(6, ms(t0, 1_000)), Verdict::Resend);
        assert_eq!(h.check(6, ms(t0, 1_001)), Verdict::TooOld);
        // Another packet: not the one asked for.
        assert_eq!(h.check(7, t0), Verdict::Unknown);
    }

    #[test]
    fn history_is_bounded_and_survives_wraparound() {
        let t0 = Instant::now();
        let mut h = SendHistory::new();
        for i in 0..(HISTORY as u32 * 3) {
            let seq = (65_000u32 + i) as u16;
            h.add(t0, pkt(1, seq, 10), false);
        }
        let last = (65_000u32 + HISTORY as u32 * 3 - 1) as u16;
        assert_eq!(h.check(last, t0), Verdict::Resend);
        assert_eq!(
            h.check(last.wrapping_sub(HISTORY as u16 - 1), t0),
            Verdict::Resend
        );
        // Overwritten by a newer packet with the same slot.
        assert_eq!(
            h.check(last.wrapping_sub(HISTORY as u16), t0),
            Verdict::Unknown
        );
        assert_eq!(h.slots.len(), HISTORY);
    }

    #[test]
    fn budget_uses_the_spare_share_of_the_estimate() {
        let t0 = Instant::now();
        let mut b = RetransmitBudget::new();
        // Nothing sent yet: the maximum share.
        assert_eq!(b.rate_bps(t0, Some(1_000_000)), 500_000);
        assert_eq!(b.rate_bps(t0, None), UNKNOWN_RATE_BPS);
        // 800 kbit/s of media: 300 kbit/s spare of a 1.1 Mbit/s estimate.
        for i in 0..200 {
            b.on_media(ms(t0, i * 10), 1_000);
        }
        let r = b.rate_bps(ms(t0, 1_990), Some(1_100_000));
        assert!((250_000..=350_000).contains(&r), "{r}");
        // The media does not fit the estimate at all: only the minimum share.
        assert_eq!(b.rate_bps(ms(t0, 1_990), Some(300_000)), 60_000);
        // The maximum share, however idle the link.
        assert_eq!(b.rate_bps(ms(t0, 1_990), Some(100_000_000)), 50_000_000);
    }

    #[test]
    fn budget_limits_the_retransmission_rate() {
        let t0 = Instant::now();
        let mut b = RetransmitBudget::new();
        // Link overloaded: 1.5 Mbit/s of media against a 300 kbit/s estimate → 60 kbit/s.
        for i in 0..100 {
            b.on_media(ms(t0, i * 8), 1_500);
        }
        let start = ms(t0, 800);
        let mut sent_bytes = 0usize;
        // NACKs for 1200-byte packets every 5 ms for 2 s.
        for i in 0..400 {
            let now = start + Duration::from_millis(i * 5);
            b.on_media(now, 940); // the media goes on at ~1.5 Mbit/s
            if b.try_spend(now, 1_200, Some(300_000)) {
                sent_bytes += 1_200;
            }
        }
        // ~60 kbit/s over 2 s, plus the initial burst.
        let bits = sent_bytes * 8;
        assert!(bits <= 60_000 * 2 + 2 * 1_500 * 8, "{bits} bits");
        assert!(bits >= 100_000, "{bits} bits");
        // A healthy link: plenty.
        let mut b = RetransmitBudget::new();
        let mut sent = 0;
        for i in 0..200 {
            if b.try_spend(ms(t0, i * 5), 1_200, Some(5_000_000)) {
                sent += 1;
            }
        }
        assert!(sent >= 150, "{sent}");
        // Time going backwards does not mint tokens.
        let mut b = RetransmitBudget::new();
        assert!(b.try_spend(ms(t0, 1_000), 1_500, Some(100_000)));
        assert!(!b.try_spend(ms(t0, 0), 1_500, Some(100_000)));
        assert!(!b.try_spend(ms(t0, 1_000), 1_500, Some(100_000)));
    }

    fn nack(ssrc: u32, seqs: &[u16]) -> TaggedPacket {
        let nacks = seqs
            .iter()
            .map(|&s| NackPair {
                packet_id: s,
                lost_packets: 0,
            })
            .collect();
        let n = TransportLayerNack {
            sender_ssrc: 0,
            media_ssrc: ssrc,
            nacks,
        };
        TaggedPacket {
            now: Instant::now(),
            transport: TransportContext::default(),
            message: AttributedPacket::new(Packet::Rtcp(vec![Box::new(n)])),
        }
    }

    fn info(ssrc: u32, nack: bool) -> StreamInfo {
        StreamInfo {
            ssrc,
            rtcp_feedback: if nack {
                vec![rtc::interceptor::RTCPFeedback {
                    typ: "nack".to_owned(),
                    parameter: String::new(),
                }]
            } else {
                vec![]
            },
            ..Default::default()
        }
    }

    #[test]
    fn interceptor_retransmits_within_limits() {
        let t0 = Instant::now();
        let mut r = NackResponder::new(None);
        r.bind_local_stream(&info(1, true));
        r.bind_local_stream(&info(2, false));
        for seq in 0..10u16 {
            for ssrc in [1, 2] {
                r.handle_write(TaggedPacket {
                    now: ms(t0, u64::from(seq)),
                    transport: TransportContext::default(),
                    message: AttributedPacket::new(Packet::Rtp(pkt(ssrc, seq, 100))),
                })
                .expect("write");
            }
        }
        while r.poll_write().is_some() {}
        let mut n = nack(1, &[3, 4]);
        n.now = ms(t0, 20);
        r.handle_read(n).expect("read");
        assert!(r.poll_read().is_some(), "the NACK goes on");
        let mut resent = Vec::new();
        while let Some(p) = r.poll_write() {
            assert!(
                p.message
                    .attributes
                    .iter()
                    .any(|a| matches!(a, Attribute::Retransmission))
            );
            if let Packet::Rtp(p) = p.message.packet {
                resent.push((p.header.ssrc, p.header.sequence_number));
            }
        }
        // Newest first.
        assert_eq!(resent, vec![(1, 4), (1, 3)]);
        // Again at once: too soon. A stream without NACK: nothing.
        for (ssrc, at) in [(1, 30), (2, 30)] {
            let mut n = nack(ssrc, &[3, 4]);
            n.now = ms(t0, at);
            r.handle_read(n).expect("read");
        }
        assert!(r.poll_write().is_none());
        let s = r.stats();
        assert_eq!(s.requested, 4);
        assert_eq!(s.resent, 2);
        assert_eq!(s.refused, 2);
    }
}
