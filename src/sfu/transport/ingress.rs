//! The publisher fast path: the media a publisher sends, and the feedback it gets, without
//! `rtc`'s per-connection pipeline.
//!
//! # Why
//!
//! A packet a publisher sends walked `rtc`'s whole read pipeline (`handle_read` → SRTP →
//! interceptors → `poll_read`): ≈ 20 µs of server CPU per incoming packet, of which SRTP
//! decryption is a small part (bench/results/2026-11-22-profile-fastpath-meeting5.txt). The work
//! actually needed is small: decrypt, note what feedback needs (transport-wide sequence number
//! and arrival time, RTP sequence number for losses, timestamps for jitter), forward.
//!
//! # How
//!
//! The publisher connection records its SRTP key derivation like a subscriber one
//! ([`KeyCapture`](super::egress::KeyCapture)) and offers the same two profiles. Once it is connected,
//! [`Ingress`] owns:
//!
//! * an SRTP context for what the publisher sends (its RTP and SRTCP, intercepted before `rtc`
//!   sees them) and one for the RTCP Plaza sends it;
//! * the bindings *SSRC → `rtc` track id*. `rtc` binds an SSRC to a track (MID/RID header
//!   extensions, simulcast) and raises the track event when it sees the SSRC's first packets, so
//!   a datagram whose SSRC is not bound yet is decrypted here *and* handed, still encrypted, to
//!   `rtc` (decrypting one packet in two independent contexts is harmless; encrypting would not
//!   be). The core binds the SSRC when `rtc` delivers a packet of it; from then on its packets
//!   skip `rtc` and go straight to forwarding;
//! * every RTCP packet toward the publisher, encrypted with Plaza's own SRTCP context: the
//!   publisher connection runs no `rtc` interceptors and Plaza never asks `rtc` to send RTCP on
//!   it, so no two contexts ever share a key and SRTCP index (nonce reuse). That is:
//!   - transport-wide congestion control feedback ([`TwccRecorder`], every
//!     [`TWCC_INTERVAL`], sooner when [`TWCC_PROMPT`] packets are pending), which the publisher's
//!     send-side bandwidth estimation (and so its top simulcast layers) depends on;
//!   - NACKs for gaps in each video SSRC's sequence numbers ([`NackGenerator`]);
//!   - receiver reports once a second per SSRC ([`ReceptionStats`]: loss, extended highest
//!     sequence number, jitter, LSR/DLSR from the publisher's sender reports, which are read
//!     here: the publisher's RTCP no longer goes to `rtc`);
//!   - keyframe requests (PLI).
//!
//! The generators follow `rtc`'s own interceptors (`TwccReceiverInterceptor`,
//! `NackGeneratorInterceptor`, `ReceiverReportInterceptor`); the TWCC feedback and the NACKs
//! are differential-tested against the first two below (same packets, same virtual time, the
//! reported arrivals and asked-for sequence numbers compared after a wire round trip).
//!
//! The fast path starts as soon as the keys are derived, which can be before `rtc` reports the
//! connection connected: the publisher's first packets (the bandwidth probes of a browser) can
//! arrive in the same batch of datagrams as the last DTLS flight, and feedback that misses them
//! leaves the browser's estimate to ramp up slowly (seen as Chromium not sending its top
//! simulcast layer in time). Differences, on purpose: a NACKed sequence number is given up after
//! [`NACK_MAX_RETRIES`] requests or [`NACK_MAX_AGE`] (`rtc` asks for it until it leaves the
//! 512-packet log); the newest [`NACK_SKIP_LAST`] sequence number is not asked for yet (one
//! packet of reordering costs no NACK); one TWCC feedback packet reports at most
//! [`TWCC_MAX_STATUS`] sequence numbers (it stays well inside an MTU; `rtc` has no bound).
//!
//! The media engine of the publisher connection is configured exactly as
//! `register_default_interceptors` configures it (nack, nack pli, transport-cc feedback, the
//! transport-cc and simulcast header extensions), so the SDP does not change; only the
//! interceptors it would build are left out.

use super::egress::SrtpKeys;
use crate::sfu::ids::TrackId;
use crate::sfu::speaker::AudioLevel;
use bytes::BytesMut;
use rtc::rtcp;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtcp::reception_report::ReceptionReport;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtcp::transport_feedbacks::transport_layer_cc::{
    PacketStatusChunk, RecvDelta, RunLengthChunk, StatusChunkTypeTcc, StatusVectorChunk,
    SymbolSizeTypeTcc, SymbolTypeTcc, TransportLayerCc,
};
use rtc::rtcp::transport_feedbacks::transport_layer_nack::{
    TransportLayerNack, nack_pairs_from_sequence_numbers,
};
use rtc::rtp;
use rtc::shared::marshal::Unmarshal;
use rtc::srtp::context::Context;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// How often TWCC feedback is sent (as `rtc`'s receiver interceptor).
pub const TWCC_INTERVAL: Duration = Duration::from_millis(100);
/// Feedback goes out at once when this many packets wait for it.
pub const TWCC_PROMPT: usize = 100;
/// Most sequence numbers (received or not) one TWCC feedback packet reports.
pub const TWCC_MAX_STATUS: usize = 1_000;
/// Arrivals older than this (behind the newest) are forgotten once reported.
const TWCC_WINDOW_US: i64 = 500_000;
/// Most arrivals kept.
const TWCC_MAX_KEPT: usize = 8_192;
/// How far back a feedback packet reports missing sequence numbers (as `rtc`).
const TWCC_MAX_MISSING: i64 = 0x7FFE;
/// TWCC delta unit (µs).
const TWCC_DELTA_US: i64 = 250;
/// TWCC reference time unit (µs).
const TWCC_REF_US: i64 = 64_000;
/// How often NACKs are generated.
pub const NACK_INTERVAL: Duration = Duration::from_millis(100);
/// Received-packet log per SSRC (a power of two, as `rtc`'s default).
pub const NACK_LOG: u16 = 512;
/// The newest sequence numbers not asked for yet.
pub const NACK_SKIP_LAST: u16 = 1;
/// A missing packet is asked for at most this many times...
pub const NACK_MAX_RETRIES: u16 = 10;
/// ...and for at most this long after it was first asked for.
pub const NACK_MAX_AGE: Duration = Duration::from_secs(1);
/// How often receiver reports are sent.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// Most SSRCs a publisher connection keeps reception statistics for.
const MAX_STREAMS: usize = 64;
/// RTCP datagrams are kept below this size.
const MAX_RTCP: usize = 1_200;

/// Why a datagram could not go through the fast path.
#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error("SRTP: {0}")]
    Srtp(String),
    #[error("RTP/RTCP encoding: {0}")]
    Encoding(String),
}

// ---------------------------------------------------------------- TWCC feedback

/// Records transport-wide sequence numbers and arrival times and builds TWCC feedback
/// (draft-holmer-rmcat-transport-wide-cc-extensions-01), as `rtc`'s TWCC receiver does: each
/// feedback covers from the first sequence number not yet reported (or an older one that
/// arrived late, which reports everything after it again) to the highest received.
pub struct TwccRecorder {
    /// Time base of arrival times (the first recorded packet).
    start: Option<Instant>,
    /// Last unwrapped sequence number.
    last: Option<i64>,
    /// Unwrapped sequence number → arrival (µs since `start`); first arrival only.
    arrivals: BTreeMap<i64, i64>,
    /// First sequence number of the next feedback.
    next_base: Option<i64>,
    fb_count: u8,
    pending: usize,
    /// Sequence numbers covered by the feedback so far, and how many of them had arrived
    /// (connection quality: the uplink's loss).
    covered: u64,
    arrived: u64,
}

impl Default for TwccRecorder {
    fn default() -> Self {
        Self::new()
    }
}

impl TwccRecorder {
    pub fn new() -> Self {
        TwccRecorder {
            start: None,
            last: None,
            arrivals: BTreeMap::new(),
            next_base: None,
            fb_count: 0,
            pending: 0,
            covered: 0,
            arrived: 0,
        }
    }

    /// Sequence numbers reported so far, and how many of them were missing.
    pub fn totals(&self) -> (u64, u64) {
        (self.covered, self.covered.saturating_sub(self.arrived))
    }

    /// Packets recorded since the last feedback.
    pub fn pending(&self) -> usize {
        self.pending
    }

    fn unwrap(&mut self, seq: u16) -> i64 {
        let ext = match self.last {
            None => i64::from(seq),
            Some(last) => {
                let mut diff = i64::from(seq) - (last & 0xFFFF);
                if diff > 0x8000 {
                    diff -= 0x10000;
                } else if diff < -0x8000 {
                    diff += 0x10000;
                }
                last + diff
            }
        };
        self.last = Some(ext);
        ext
    }

    /// A packet carrying transport-wide sequence number `seq` arrived at `now`.
    pub fn record(&mut self, seq: u16, now: Instant) {
        let start = *self.start.get_or_insert(now);
        let at = now.saturating_duration_since(start).as_micros() as i64;
        let ext = self.unwrap(seq);
        if self.arrivals.contains_key(&ext) {
            return;
        }
        match self.next_base {
            Some(base) if ext < base => {
                if base - ext > TWCC_MAX_MISSING {
                    return; // far too old to report
                }
                self.next_base = Some(ext);
            }
            None => self.next_base = Some(ext),
            _ => {}
        }
        self.arrivals.insert(ext, at);
        self.pending += 1;
        // Forget what has been reported and is old, and bound the rest.
        let base = self.next_base.unwrap_or(ext);
        while let Some((&s, &t)) = self.arrivals.first_key_value() {
            let old = s < base && t < at - TWCC_WINDOW_US;
            if old || self.arrivals.len() > TWCC_MAX_KEPT {
                self.arrivals.remove(&s);
                if s >= base {
                    self.next_base = Some(s + 1);
                }
            } else {
                break;
            }
        }
    }

    /// Feedback for everything recorded since the last call (empty when nothing was).
    pub fn feedback(&mut self, sender_ssrc: u32, media_ssrc: u32) -> Vec<TransportLayerCc> {
        let mut out = Vec::new();
        self.pending = 0;
        let (Some(mut begin), Some((&last, _))) = (self.next_base, self.arrivals.last_key_value())
        else {
            return out;
        };
        let end = last + 1;
        let mut fb: Option<FeedbackBuilder> = None;
        let received: Vec<(i64, i64)> = self
            .arrivals
            .range(begin..end)
            .map(|(&s, &t)| (s, t))
            .collect();
        self.covered += (end - begin).max(0) as u64;
        self.arrived += received.len() as u64;
        for (seq, at) in received {
            if let Some(f) = fb.as_mut() {
                if f.status_count() + (seq - f.next_seq) as usize >= TWCC_MAX_STATUS
                    || !f.add_received(seq, at)
                {
                    out.extend(fb.take().map(FeedbackBuilder::finish));
                    begin = seq;
                }
            }
            if fb.is_none() {
                let base = begin.max(seq - TWCC_MAX_MISSING);
                let mut f = FeedbackBuilder::new(sender_ssrc, media_ssrc, self.fb_count, base, at);
                self.fb_count = self.fb_count.wrapping_add(1);
                // The first delta is within one reference tick: it always fits.
                f.add_received(seq, at);
                fb = Some(f);
            }
        }
        out.extend(fb.map(FeedbackBuilder::finish));
        self.next_base = Some(end);
        out
    }
}

/// One TWCC feedback packet being built.
struct FeedbackBuilder {
    packet: TransportLayerCc,
    /// Next unwrapped sequence number to report.
    next_seq: i64,
    /// Arrival time (µs) the next delta is relative to.
    last_us: i64,
    chunk: Chunk,
}

impl FeedbackBuilder {
    fn new(sender_ssrc: u32, media_ssrc: u32, count: u8, base: i64, first_us: i64) -> Self {
        let reference = first_us.div_euclid(TWCC_REF_US);
        FeedbackBuilder {
            packet: TransportLayerCc {
                sender_ssrc,
                media_ssrc,
                base_sequence_number: base as u16,
                packet_status_count: 0,
                // 24 bits on the wire.
                reference_time: (reference as u32) & 0x00FF_FFFF,
                fb_pkt_count: count,
                packet_chunks: Vec::new(),
                recv_deltas: Vec::new(),
            },
            next_seq: base,
            last_us: reference * TWCC_REF_US,
            chunk: Chunk::default(),
        }
    }

    fn status_count(&self) -> usize {
        usize::from(self.packet.packet_status_count)
    }

    fn push(&mut self, symbol: SymbolTypeTcc) {
        if !self.chunk.can_add(symbol) {
            self.packet.packet_chunks.push(self.chunk.encode());
        }
        self.chunk.add(symbol);
        self.packet.packet_status_count += 1;
    }

    /// Report `seq` received at `at_us` (and everything between the last one and it as not
    /// received). False, and nothing added, when its delta does not fit.
    fn add_received(&mut self, seq: i64, at_us: i64) -> bool {
        let delta_us = at_us - self.last_us;
        let half = TWCC_DELTA_US / 2;
        let delta = if delta_us >= 0 {
            (delta_us + half) / TWCC_DELTA_US
        } else {
            (delta_us - half) / TWCC_DELTA_US
        };
        if delta < i64::from(i16::MIN) || delta > i64::from(i16::MAX) {
            return false;
        }
        while self.next_seq < seq {
            self.push(SymbolTypeTcc::PacketNotReceived);
            self.next_seq += 1;
        }
        let symbol = if (0..=0xff).contains(&delta) {
            SymbolTypeTcc::PacketReceivedSmallDelta
        } else {
            SymbolTypeTcc::PacketReceivedLargeDelta
        };
        self.push(symbol);
        let rounded = delta * TWCC_DELTA_US;
        self.packet.recv_deltas.push(RecvDelta {
            type_tcc_packet: symbol,
            delta: rounded,
        });
        self.last_us += rounded;
        self.next_seq = seq + 1;
        true
    }

    fn finish(mut self) -> TransportLayerCc {
        while !self.chunk.symbols.is_empty() {
            self.packet.packet_chunks.push(self.chunk.encode());
        }
        self.packet
    }
}

/// Packet status chunk under construction: a run-length chunk while all symbols are equal,
/// else a status vector (14 one-bit symbols, or 7 two-bit ones when a large delta is among
/// them).
#[derive(Default)]
struct Chunk {
    symbols: Vec<SymbolTypeTcc>,
    large: bool,
    mixed: bool,
}

const RUN_LENGTH_MAX: usize = 0x1fff;
const ONE_BIT_MAX: usize = 14;
const TWO_BIT_MAX: usize = 7;

impl Chunk {
    fn can_add(&self, s: SymbolTypeTcc) -> bool {
        let n = self.symbols.len();
        n < TWO_BIT_MAX
            || (n < ONE_BIT_MAX && !self.large && s != SymbolTypeTcc::PacketReceivedLargeDelta)
            || (n < RUN_LENGTH_MAX && !self.mixed && self.symbols.first() == Some(&s))
    }

    fn add(&mut self, s: SymbolTypeTcc) {
        if self.symbols.first().is_some_and(|f| *f != s) {
            self.mixed = true;
        }
        self.large |= s == SymbolTypeTcc::PacketReceivedLargeDelta;
        self.symbols.push(s);
    }

    fn encode(&mut self) -> PacketStatusChunk {
        if !self.mixed {
            let chunk = PacketStatusChunk::RunLengthChunk(RunLengthChunk {
                type_tcc: StatusChunkTypeTcc::RunLengthChunk,
                packet_status_symbol: self.symbols[0],
                run_length: self.symbols.len() as u16,
            });
            *self = Chunk::default();
            return chunk;
        }
        if self.symbols.len() == ONE_BIT_MAX && !self.large {
            let chunk = PacketStatusChunk::StatusVectorChunk(StatusVectorChunk {
                type_tcc: StatusChunkTypeTcc::StatusVectorChunk,
                symbol_size: SymbolSizeTypeTcc::OneBit,
                symbol_list: std::mem::take(&mut self.symbols),
            });
            *self = Chunk::default();
            return chunk;
        }
        let n = TWO_BIT_MAX.min(self.symbols.len());
        let rest = self.symbols.split_off(n);
        let chunk = PacketStatusChunk::StatusVectorChunk(StatusVectorChunk {
            type_tcc: StatusChunkTypeTcc::StatusVectorChunk,
            symbol_size: SymbolSizeTypeTcc::TwoBit,
            symbol_list: std::mem::take(&mut self.symbols),
        });
        *self = Chunk::default();
        for s in rest {
            self.add(s);
        }
        chunk
    }
}

// ---------------------------------------------------------------- NACK generation

/// Which of the last [`NACK_LOG`] sequence numbers of one SSRC arrived (as `rtc`'s
/// `ReceiveLog`).
struct ReceiveLog {
    bits: Vec<u64>,
    size: u16,
    end: u16,
    last_consecutive: u16,
    started: bool,
}

impl ReceiveLog {
    fn new(size: u16) -> Self {
        debug_assert!(size.is_power_of_two() && size >= 64);
        ReceiveLog {
            bits: vec![0; usize::from(size / 64)],
            size,
            end: 0,
            last_consecutive: 0,
            started: false,
        }
    }

    fn pos(&self, seq: u16) -> (usize, u64) {
        let p = seq & (self.size - 1);
        (usize::from(p / 64), 1u64 << (p % 64))
    }
    fn set(&mut self, seq: u16) {
        let (i, b) = self.pos(seq);
        self.bits[i] |= b;
    }
    fn clear(&mut self, seq: u16) {
        let (i, b) = self.pos(seq);
        self.bits[i] &= !b;
    }
    fn get(&self, seq: u16) -> bool {
        let (i, b) = self.pos(seq);
        self.bits[i] & b != 0
    }

    fn add(&mut self, seq: u16) {
        if !self.started {
            self.started = true;
            self.set(seq);
            self.end = seq;
            self.last_consecutive = seq;
            return;
        }
        let diff = seq.wrapping_sub(self.end);
        if diff == 0 {
            return;
        }
        if diff < 0x8000 {
            let mut i = self.end.wrapping_add(1);
            while i != seq {
                self.clear(i);
                i = i.wrapping_add(1);
            }
            self.end = seq;
            if self.last_consecutive.wrapping_add(1) == seq {
                self.last_consecutive = seq;
            } else if seq.wrapping_sub(self.last_consecutive) > self.size {
                self.last_consecutive = seq.wrapping_sub(self.size);
                self.fix_last_consecutive();
            }
        } else if self.last_consecutive.wrapping_add(1) == seq {
            self.last_consecutive = seq;
            self.fix_last_consecutive();
        }
        self.set(seq);
    }

    fn fix_last_consecutive(&mut self) {
        let mut i = self.last_consecutive.wrapping_add(1);
        while i != self.end.wrapping_add(1) && self.get(i) {
            i = i.wrapping_add(1);
        }
        self.last_consecutive = i.wrapping_sub(1);
    }

    /// Whether `seq` arrived: `false` for one newer than any seen, `true` for one older than
    /// the log remembers (too late to matter).
    fn has(&self, seq: u16) -> bool {
        if !self.started {
            return false;
        }
        let behind = self.end.wrapping_sub(seq);
        if behind >= 0x8000 {
            false
        } else if behind >= self.size {
            true
        } else {
            self.get(seq)
        }
    }

    fn missing(&self, skip_last: u16) -> Vec<u16> {
        let until = self.end.wrapping_sub(skip_last);
        if until.wrapping_sub(self.last_consecutive) >= 0x8000 {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut i = self.last_consecutive.wrapping_add(1);
        while i != until.wrapping_add(1) {
            if !self.get(i) {
                out.push(i);
            }
            i = i.wrapping_add(1);
        }
        out
    }
}

/// How a [`NackGenerator`] behaves.
#[derive(Debug, Clone, Copy)]
pub struct NackConfig {
    pub log_size: u16,
    pub skip_last: u16,
    pub max_retries: u16,
    pub max_age: Duration,
}

impl Default for NackConfig {
    fn default() -> Self {
        NackConfig {
            log_size: NACK_LOG,
            skip_last: NACK_SKIP_LAST,
            max_retries: NACK_MAX_RETRIES,
            max_age: NACK_MAX_AGE,
        }
    }
}

/// NACKs for the gaps in the sequence numbers of each tracked SSRC. Call
/// [`NackGenerator::generate`] every [`NACK_INTERVAL`].
pub struct NackGenerator {
    cfg: NackConfig,
    logs: HashMap<u32, ReceiveLog>,
    /// Per SSRC: missing sequence number → (times asked, first asked).
    asked: HashMap<u32, HashMap<u16, (u16, Instant)>>,
}

impl NackGenerator {
    pub fn new(cfg: NackConfig) -> Self {
        NackGenerator {
            cfg,
            logs: HashMap::new(),
            asked: HashMap::new(),
        }
    }

    /// Start asking for the losses of `ssrc`.
    pub fn track(&mut self, ssrc: u32) {
        let size = self.cfg.log_size;
        self.logs
            .entry(ssrc)
            .or_insert_with(|| ReceiveLog::new(size));
    }

    pub fn untrack(&mut self, ssrc: u32) {
        self.logs.remove(&ssrc);
        self.asked.remove(&ssrc);
    }

    /// A packet of `ssrc` arrived (ignored unless the SSRC is tracked).
    pub fn on_packet(&mut self, ssrc: u32, seq: u16) {
        if let Some(log) = self.logs.get_mut(&ssrc) {
            log.add(seq);
        }
    }

    /// Whether `seq` of `ssrc` arrived (see `ReceiveLog::has`); `None`: the SSRC is not
    /// tracked.
    pub fn received(&self, ssrc: u32, seq: u16) -> Option<bool> {
        self.logs.get(&ssrc).map(|log| log.has(seq))
    }

    /// The NACKs to send now.
    pub fn generate(&mut self, now: Instant, sender_ssrc: u32) -> Vec<TransportLayerNack> {
        let mut out = Vec::new();
        for (&ssrc, log) in &self.logs {
            let missing = log.missing(self.cfg.skip_last);
            if missing.is_empty() {
                self.asked.remove(&ssrc);
                continue;
            }
            let asked = self.asked.entry(ssrc).or_default();
            asked.retain(|seq, _| missing.contains(seq));
            let wanted: Vec<u16> = missing
                .into_iter()
                .filter(|seq| {
                    let (n, first) = asked.entry(*seq).or_insert((0, now));
                    if *n >= self.cfg.max_retries
                        || now.saturating_duration_since(*first) > self.cfg.max_age
                    {
                        return false;
                    }
                    *n += 1;
                    true
                })
                .collect();
            if wanted.is_empty() {
                continue;
            }
            out.push(TransportLayerNack {
                sender_ssrc,
                media_ssrc: ssrc,
                nacks: nack_pairs_from_sequence_numbers(&wanted),
            });
        }
        out
    }
}

// ---------------------------------------------------------------- receiver reports

/// Reception statistics of one SSRC for receiver reports (RFC 3550 §6.4.1, A.3, A.8; the same
/// computation as `rtc`'s receiver report interceptor).
pub struct ReceptionStats {
    clock_rate: f64,
    /// Packets received since the last report (bitmap of the sequence numbers).
    bits: Vec<u64>,
    cycles: u16,
    last_seq: u16,
    last_report_seq: u16,
    last_ts: u32,
    last_at: Option<Instant>,
    jitter: f64,
    /// Middle 32 bits of the last sender report's NTP time, and when it arrived.
    last_sr: u32,
    last_sr_at: Option<Instant>,
    total_lost: u32,
}

const RR_LOG_WORDS: usize = 128;
const RR_LOG_MASK: usize = RR_LOG_WORDS * 64 - 1;

impl ReceptionStats {
    pub fn new(clock_rate: u32) -> Self {
        ReceptionStats {
            clock_rate: f64::from(clock_rate),
            bits: vec![0; RR_LOG_WORDS],
            cycles: 0,
            last_seq: 0,
            last_report_seq: 0,
            last_ts: 0,
            last_at: None,
            jitter: 0.0,
            last_sr: 0,
            last_sr_at: None,
            total_lost: 0,
        }
    }

    pub fn set_clock_rate(&mut self, clock_rate: u32) {
        self.clock_rate = f64::from(clock_rate);
    }

    fn set(&mut self, seq: u16, on: bool) {
        let p = usize::from(seq) & RR_LOG_MASK;
        if on {
            self.bits[p / 64] |= 1 << (p % 64);
        } else {
            self.bits[p / 64] &= !(1u64 << (p % 64));
        }
    }
    fn get(&self, seq: u16) -> bool {
        let p = usize::from(seq) & RR_LOG_MASK;
        self.bits[p / 64] & (1 << (p % 64)) != 0
    }

    pub fn on_packet(&mut self, now: Instant, seq: u16, ts: u32) {
        match self.last_at {
            Some(last_at) => {
                self.set(seq, true);
                let diff = seq.wrapping_sub(self.last_seq);
                if diff > 0 && diff < 0x8000 {
                    if seq < self.last_seq {
                        self.cycles = self.cycles.wrapping_add(1);
                    }
                    let mut i = self.last_seq.wrapping_add(1);
                    while i != seq {
                        self.set(i, false);
                        i = i.wrapping_add(1);
                    }
                    self.last_seq = seq;
                }
                let d = now.saturating_duration_since(last_at).as_secs_f64() * self.clock_rate
                    - (f64::from(ts) - f64::from(self.last_ts));
                self.jitter += (d.abs() - self.jitter) / 16.0;
            }
            None => {
                self.set(seq, true);
                self.last_seq = seq;
                self.last_report_seq = seq.wrapping_sub(1);
            }
        }
        self.last_ts = ts;
        self.last_at = Some(now);
    }

    pub fn on_sender_report(&mut self, now: Instant, ntp_time: u64) {
        self.last_sr = (ntp_time >> 16) as u32;
        self.last_sr_at = Some(now);
    }

    /// The report block for `ssrc` now; starts the next reporting interval.
    pub fn report(&mut self, now: Instant, ssrc: u32) -> ReceptionReport {
        let expected = self.last_seq.wrapping_sub(self.last_report_seq);
        let mut lost: u32 = 0;
        let mut i = self.last_report_seq.wrapping_add(1);
        while expected > 0 && i != self.last_seq {
            if !self.get(i) {
                lost += 1;
            }
            i = i.wrapping_add(1);
        }
        self.total_lost = (self.total_lost + lost).min(0xFF_FFFF);
        let fraction_lost = if expected > 0 {
            ((lost.min(0xFF_FFFF) * 256) as f64 / f64::from(expected)).min(255.0) as u8
        } else {
            0
        };
        let delay = self.last_sr_at.map_or(0, |at| {
            (now.saturating_duration_since(at).as_secs_f64() * 65536.0) as u32
        });
        self.last_report_seq = self.last_seq;
        ReceptionReport {
            ssrc,
            fraction_lost,
            total_lost: self.total_lost,
            last_sequence_number: (u32::from(self.cycles) << 16) | u32::from(self.last_seq),
            jitter: self.jitter as u32,
            last_sender_report: self.last_sr,
            delay,
        }
    }
}

// ---------------------------------------------------------------- the fast path

/// Counters of one [`Ingress`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IngressStats {
    /// RTP packets forwarded without `rtc`, and those handed to `rtc` (SSRC not bound yet).
    pub rtp_fast: u64,
    pub rtp_to_rtc: u64,
    /// SRTP packets that failed authentication, replay protection or parsing.
    pub rtp_rejected: u64,
    /// SRTCP datagrams from the publisher taken, and rejected.
    pub rtcp_in: u64,
    pub rtcp_rejected: u64,
    /// Sequence numbers asked for in NACKs, TWCC feedback packets and receiver reports sent.
    pub nack_sent: u64,
    pub twcc_feedback_sent: u64,
    pub receiver_reports_sent: u64,
    /// RTX packets (RFC 4588): repairs forwarded as the original packet, repairs of packets
    /// that had arrived (dropped), padding-only ones (probes, dropped).
    pub rtx_repaired: u64,
    pub rtx_duplicate: u64,
    pub rtx_padding: u64,
}

impl std::ops::AddAssign for IngressStats {
    fn add_assign(&mut self, o: Self) {
        self.rtp_fast += o.rtp_fast;
        self.rtp_to_rtc += o.rtp_to_rtc;
        self.rtp_rejected += o.rtp_rejected;
        self.rtcp_in += o.rtcp_in;
        self.rtcp_rejected += o.rtcp_rejected;
        self.nack_sent += o.nack_sent;
        self.twcc_feedback_sent += o.twcc_feedback_sent;
        self.receiver_reports_sent += o.receiver_reports_sent;
        self.rtx_repaired += o.rtx_repaired;
        self.rtx_duplicate += o.rtx_duplicate;
        self.rtx_padding += o.rtx_padding;
    }
}

/// A decrypted packet from the publisher.
pub struct Incoming {
    pub packet: rtp::Packet,
    /// The `rtc` track its SSRC is bound to; `None`: hand the datagram to `rtc`.
    pub track: Option<TrackId>,
    /// Its audio level (RFC 6464), when it carries one.
    pub audio_level: Option<AudioLevel>,
    /// Taken and dropped here (an RTX duplicate or padding): neither forwarded nor handed to
    /// `rtc`.
    pub dropped: bool,
}

/// What the publisher connection negotiated for RTX (RFC 4588), read from its SDP
/// ([`rtx_config`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RtxConfig {
    /// RTX payload type → the payload type it repairs (`apt`).
    pub payload_types: HashMap<u8, u8>,
    /// RTX SSRC → media SSRC, from the offer's `a=ssrc-group:FID` lines.
    pub fid: HashMap<u32, u32>,
    /// Header extension ids: MID, RID (`rtp-stream-id`) and repaired RID: how the RTX stream
    /// of a simulcast layer (no SSRCs in the SDP) names the layer it repairs.
    pub mid_ext: Option<u8>,
    pub rid_ext: Option<u8>,
    pub repaired_rid_ext: Option<u8>,
}

/// One publisher connection's media in and feedback out (see the module docs).
pub struct Ingress {
    remote: Context,
    local: Context,
    profile: rtc::srtp::protection_profile::ProtectionProfile,
    sender_ssrc: u32,
    twcc_ext: Option<u8>,
    /// The negotiated audio level extension id (RFC 6464).
    audio_level_ext: Option<u8>,
    bound: HashMap<u32, TrackId>,
    twcc: TwccRecorder,
    /// Media SSRC of the last packet with a transport-wide sequence number.
    twcc_media_ssrc: u32,
    nack: NackGenerator,
    reception: HashMap<u32, ReceptionStats>,
    rtx: RtxConfig,
    /// Media SSRC by (MID, RID), learned from the header extensions of media packets, and
    /// RTX SSRC → media SSRC learned from RTX packets' (MID, repaired RID).
    rids: HashMap<(bytes::Bytes, bytes::Bytes), u32>,
    rtx_media: HashMap<u32, u32>,
    next_twcc: Option<Instant>,
    next_nack: Option<Instant>,
    next_report: Option<Instant>,
    /// Encrypted RTCP datagrams to send to the publisher.
    out: Vec<BytesMut>,
    stats: IngressStats,
}

impl Ingress {
    /// The fast path of a publisher connection whose DTLS handshake gave `keys`, with the
    /// negotiated transport-wide sequence number extension id.
    /// `sender_ssrc`: the SSRC the server's feedback to this publisher is sent from.
    pub fn new(
        keys: &SrtpKeys,
        twcc_ext: Option<u8>,
        sender_ssrc: u32,
    ) -> Result<Self, IngressError> {
        let (local, remote) = keys.contexts().map_err(IngressError::Srtp)?;
        Ok(Ingress {
            remote,
            local,
            profile: keys.profile,
            sender_ssrc,
            twcc_ext,
            audio_level_ext: None,
            bound: HashMap::new(),
            twcc: TwccRecorder::new(),
            twcc_media_ssrc: 0,
            nack: NackGenerator::new(NackConfig::default()),
            reception: HashMap::new(),
            rtx: RtxConfig::default(),
            rids: HashMap::new(),
            rtx_media: HashMap::new(),
            next_twcc: None,
            next_nack: None,
            next_report: None,
            out: Vec::new(),
            stats: IngressStats::default(),
        })
    }

    pub fn stats(&self) -> IngressStats {
        self.stats
    }

    /// Transport-wide sequence numbers expected so far and how many of them were lost, as the
    /// feedback reported them (the uplink's loss, before retransmissions).
    pub fn loss_totals(&self) -> (u64, u64) {
        self.twcc.totals()
    }

    /// The transport-wide sequence number extension id (after a renegotiation).
    pub fn set_twcc_ext(&mut self, id: Option<u8>) {
        self.twcc_ext = id;
    }

    /// The audio level extension id (RFC 6464), from the negotiated SDP.
    pub fn set_audio_level_ext(&mut self, id: Option<u8>) {
        self.audio_level_ext = id;
    }

    /// What was negotiated for RTX (after each negotiation).
    pub fn set_rtx(&mut self, rtx: RtxConfig) {
        self.rtx_media.extend(rtx.fid.iter().map(|(&r, &m)| (r, m)));
        self.rtx = rtx;
    }

    pub fn is_bound(&self, ssrc: u32) -> bool {
        self.bound.contains_key(&ssrc)
    }

    /// `rtc` delivered a packet of `ssrc` of the (server) track `track`: later ones skip
    /// `rtc`. `nack`: ask for
    /// its losses (video).
    pub fn bind(&mut self, ssrc: u32, track: TrackId, clock_rate: u32, nack: bool) {
        self.bound.insert(ssrc, track);
        if let Some(r) = self.reception.get_mut(&ssrc) {
            r.set_clock_rate(clock_rate);
        }
        if nack {
            self.nack.track(ssrc);
        }
    }

    /// The (server) track is gone: forget its SSRCs.
    pub fn unbind_track(&mut self, track: &str) {
        let gone: Vec<u32> = self
            .bound
            .iter()
            .filter(|(_, t)| &***t == track)
            .map(|(s, _)| *s)
            .collect();
        for ssrc in gone {
            self.bound.remove(&ssrc);
            self.nack.untrack(ssrc);
            self.reception.remove(&ssrc);
        }
    }

    /// Decrypt one SRTP datagram from the publisher and record it for feedback.
    pub fn on_rtp(&mut self, now: Instant, data: &[u8]) -> Result<Incoming, IngressError> {
        let plain = match self.remote.decrypt_rtp(data) {
            Ok(p) => p,
            Err(e) => {
                self.stats.rtp_rejected += 1;
                return Err(IngressError::Srtp(e.to_string()));
            }
        };
        let packet = match rtp::Packet::unmarshal(&mut plain.freeze()) {
            Ok(p) => p,
            Err(e) => {
                self.stats.rtp_rejected += 1;
                return Err(IngressError::Encoding(e.to_string()));
            }
        };
        let h = &packet.header;
        if let Some(id) = self.twcc_ext {
            if let Some(ext) = h.get_extension(id) {
                if let [a, b, ..] = ext[..] {
                    self.twcc.record(u16::from_be_bytes([a, b]), now);
                    self.twcc_media_ssrc = h.ssrc;
                    if self.next_twcc.is_none() {
                        self.next_twcc = Some(now + TWCC_INTERVAL);
                    }
                    if self.twcc.pending() >= TWCC_PROMPT {
                        self.send_twcc();
                    }
                }
            }
        }
        if self.next_nack.is_none() {
            self.next_nack = Some(now + NACK_INTERVAL);
        }
        if self.next_report.is_none() {
            self.next_report = Some(now + REPORT_INTERVAL);
        }
        if let Some(&apt) = self.rtx.payload_types.get(&h.payload_type) {
            return Ok(self.on_rtx(packet, apt));
        }
        if let Some(id) = self
            .rtx
            .rid_ext
            .filter(|_| !self.rtx.payload_types.is_empty())
        {
            self.learn_rid(&packet, id);
        }
        let h = &packet.header;
        self.nack.on_packet(h.ssrc, h.sequence_number);
        if !self.reception.contains_key(&h.ssrc) && self.reception.len() < MAX_STREAMS {
            self.reception.insert(h.ssrc, ReceptionStats::new(90_000));
        }
        if let Some(r) = self.reception.get_mut(&h.ssrc) {
            r.on_packet(now, h.sequence_number, h.timestamp);
        }
        // One byte of the header already parsed (no allocation, no copy).
        let audio_level = self.audio_level_ext.filter(|_| h.extension).and_then(|id| {
            let ext = h.extensions.iter().find(|e| e.id == id)?;
            AudioLevel::parse(&ext.payload)
        });
        let track = self.bound.get(&h.ssrc).cloned();
        if track.is_some() {
            self.stats.rtp_fast += 1;
        } else {
            self.stats.rtp_to_rtc += 1;
        }
        Ok(Incoming {
            packet,
            track,
            audio_level,
            dropped: false,
        })
    }

    /// A media packet naming its (MID, RID): remember its SSRC, for the RTX stream that
    /// names the same layer as the one it repairs.
    fn learn_rid(&mut self, packet: &rtp::Packet, rid_ext: u8) {
        let h = &packet.header;
        let Some(rid) = h.get_extension(rid_ext) else {
            return;
        };
        let mid = self
            .rtx
            .mid_ext
            .and_then(|id| h.get_extension(id))
            .unwrap_or_default();
        if self.rids.get(&(mid.clone(), rid.clone())) != Some(&h.ssrc)
            && self.rids.len() < MAX_STREAMS
        {
            self.rids.insert((mid, rid), h.ssrc);
        }
    }

    /// An RTX packet (payload type `apt` once unwrapped): padding is dropped; a repair of a
    /// bound stream is forwarded as the original packet if that never arrived, else dropped;
    /// an RTX stream not known yet (no FID group, no repaired RID seen) goes to `rtc`.
    fn on_rtx(&mut self, packet: rtp::Packet, apt: u8) -> Incoming {
        let drop = |packet| Incoming {
            packet,
            track: None,
            audio_level: None,
            dropped: true,
        };
        if packet.payload.is_empty() {
            self.stats.rtx_padding += 1;
            return drop(packet);
        }
        let h = &packet.header;
        let media = self.rtx_media.get(&h.ssrc).copied().or_else(|| {
            let rrid = h.get_extension(self.rtx.repaired_rid_ext?)?;
            let mid = self
                .rtx
                .mid_ext
                .and_then(|id| h.get_extension(id))
                .unwrap_or_default();
            let media = *self.rids.get(&(mid, rrid))?;
            if self.rtx_media.len() < MAX_STREAMS {
                self.rtx_media.insert(h.ssrc, media);
            }
            Some(media)
        });
        let Some((media, track)) = media.and_then(|m| Some((m, self.bound.get(&m).cloned()?)))
        else {
            self.stats.rtp_to_rtc += 1;
            return Incoming {
                packet,
                track: None,
                audio_level: None,
                dropped: false,
            };
        };
        match crate::sfu::nack::unwrap_rtx(&packet, media, apt) {
            Some(crate::sfu::nack::Unwrapped::Repair(original)) => {
                let seq = original.header.sequence_number;
                if self.nack.received(media, seq) == Some(false) {
                    self.nack.on_packet(media, seq);
                    self.stats.rtx_repaired += 1;
                    self.stats.rtp_fast += 1;
                    Incoming {
                        packet: original,
                        track: Some(track),
                        audio_level: None,
                        dropped: false,
                    }
                } else {
                    self.stats.rtx_duplicate += 1;
                    drop(packet)
                }
            }
            Some(crate::sfu::nack::Unwrapped::Padding) => {
                self.stats.rtx_padding += 1;
                drop(packet)
            }
            None => {
                self.stats.rtp_rejected += 1;
                drop(packet)
            }
        }
    }

    /// Decrypt and read one SRTCP datagram from the publisher (its sender reports).
    pub fn on_rtcp(&mut self, now: Instant, data: &[u8]) -> Result<(), IngressError> {
        if !super::egress::srtcp_encrypted(data, self.profile) {
            self.stats.rtcp_rejected += 1;
            return Err(IngressError::Srtp("SRTCP without the E flag".into()));
        }
        let plain = match self.remote.decrypt_rtcp(data) {
            Ok(p) => p,
            Err(e) => {
                self.stats.rtcp_rejected += 1;
                return Err(IngressError::Srtp(e.to_string()));
            }
        };
        self.stats.rtcp_in += 1;
        let packets = rtcp::packet::unmarshal(&mut plain.freeze())
            .map_err(|e| IngressError::Encoding(e.to_string()))?;
        for p in &packets {
            if let Some(sr) = p.as_any().downcast_ref::<SenderReport>() {
                if let Some(r) = self.reception.get_mut(&sr.ssrc) {
                    r.on_sender_report(now, sr.ntp_time);
                }
            }
        }
        Ok(())
    }

    /// A keyframe request for `media_ssrc`, encrypted.
    pub fn pli(&mut self, media_ssrc: u32) -> Result<BytesMut, IngressError> {
        let pli: Vec<Box<dyn rtcp::Packet>> = vec![Box::new(PictureLossIndication {
            sender_ssrc: self.sender_ssrc,
            media_ssrc,
        })];
        self.seal(&pli)
    }

    /// When [`Ingress::on_timeout`] next has something to do.
    pub fn deadline(&self) -> Option<Instant> {
        [self.next_twcc, self.next_nack, self.next_report]
            .into_iter()
            .flatten()
            .min()
    }

    /// Generate what is due: TWCC feedback, NACKs, receiver reports (into the output).
    pub fn on_timeout(&mut self, now: Instant) {
        if self.next_twcc.is_some_and(|t| t <= now) {
            self.next_twcc = Some(now + TWCC_INTERVAL);
            self.send_twcc();
        }
        if self.next_nack.is_some_and(|t| t <= now) {
            self.next_nack = Some(now + NACK_INTERVAL);
            let nacks = self.nack.generate(now, self.sender_ssrc);
            let packets: Vec<Box<dyn rtcp::Packet>> = nacks
                .into_iter()
                .map(|n| {
                    self.stats.nack_sent += n
                        .nacks
                        .iter()
                        .map(|p| 1 + u64::from(p.lost_packets.count_ones()))
                        .sum::<u64>();
                    Box::new(n) as Box<dyn rtcp::Packet>
                })
                .collect();
            self.send(packets);
        }
        if self.next_report.is_some_and(|t| t <= now) {
            self.next_report = Some(now + REPORT_INTERVAL);
            let mut reports: Vec<ReceptionReport> = self
                .bound
                .keys()
                .filter_map(|ssrc| Some(self.reception.get_mut(ssrc)?.report(now, *ssrc)))
                .collect();
            // 31 report blocks per receiver report at most.
            let mut packets: Vec<Box<dyn rtcp::Packet>> = Vec::new();
            while !reports.is_empty() {
                let rest = reports.split_off(reports.len().min(31));
                packets.push(Box::new(ReceiverReport {
                    ssrc: self.sender_ssrc,
                    reports: std::mem::replace(&mut reports, rest),
                    ..Default::default()
                }));
                self.stats.receiver_reports_sent += 1;
            }
            self.send(packets);
        }
    }

    /// Encrypted RTCP produced so far (to send to the publisher).
    pub fn take_output(&mut self) -> Vec<BytesMut> {
        std::mem::take(&mut self.out)
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty()
    }

    fn send_twcc(&mut self) {
        let fb = self.twcc.feedback(self.sender_ssrc, self.twcc_media_ssrc);
        self.stats.twcc_feedback_sent += fb.len() as u64;
        self.send(
            fb.into_iter()
                .map(|f| Box::new(f) as Box<dyn rtcp::Packet>)
                .collect(),
        );
    }

    /// Encrypt `packets` into as few datagrams below [`MAX_RTCP`] as they fit in.
    fn send(&mut self, packets: Vec<Box<dyn rtcp::Packet>>) {
        let mut batch: Vec<Box<dyn rtcp::Packet>> = Vec::new();
        let mut size = 0;
        for p in packets {
            let n = p.marshal_size();
            if !batch.is_empty() && size + n > MAX_RTCP {
                self.flush_batch(&mut batch);
                size = 0;
            }
            size += n;
            batch.push(p);
        }
        self.flush_batch(&mut batch);
    }

    fn flush_batch(&mut self, batch: &mut Vec<Box<dyn rtcp::Packet>>) {
        if batch.is_empty() {
            return;
        }
        match self.seal(batch) {
            Ok(wire) => self.out.push(wire),
            Err(e) => tracing::debug!("publisher RTCP: {e}"),
        }
        batch.clear();
    }

    fn seal(&mut self, packets: &[Box<dyn rtcp::Packet>]) -> Result<BytesMut, IngressError> {
        let plain =
            rtcp::packet::marshal(packets).map_err(|e| IngressError::Encoding(e.to_string()))?;
        self.local
            .encrypt_rtcp(&plain)
            .map_err(|e| IngressError::Srtp(e.to_string()))
    }
}

/// The id of the audio level extension (RFC 6464) in an SDP.
pub fn audio_level_ext_id(sdp: &str) -> Option<u8> {
    ext_id(sdp, rtc::sdp::extmap::AUDIO_LEVEL_URI)
}

/// The id of the transport-wide sequence number extension in an SDP (`a=extmap:<id>` with the
/// transport-cc URI; one id per BUNDLE group).
pub fn twcc_ext_id(sdp: &str) -> Option<u8> {
    ext_id(sdp, rtc::sdp::extmap::TRANSPORT_CC_URI)
}

/// The id of the header extension `uri` in an SDP (the first `a=extmap:<id>` naming it).
fn ext_id(sdp: &str, wanted: &str) -> Option<u8> {
    sdp.lines().find_map(|l| {
        let rest = l.trim().strip_prefix("a=extmap:")?;
        let (id, uri) = rest.split_once(' ')?;
        let uri = uri.split_whitespace().next()?;
        if uri != wanted {
            return None;
        }
        id.split('/').next()?.parse().ok()
    })
}

/// What a publisher connection negotiated for RTX: the RTX payload types of `answer` (ours:
/// `a=rtpmap:<pt> rtx/90000` with `a=fmtp:<pt> apt=<pt>`), the FID groups of `offer` (the
/// publisher's) and the MID / RID / repaired RID extension ids of `answer`.
pub fn rtx_config(answer: &str, offer: &str) -> RtxConfig {
    let mut rtx_pts = std::collections::HashSet::new();
    let mut c = RtxConfig::default();
    for l in answer.lines().map(str::trim) {
        if let Some(rest) = l.strip_prefix("a=rtpmap:") {
            if let Some((pt, codec)) = rest.split_once(' ') {
                if codec.to_ascii_lowercase().starts_with("rtx/") {
                    if let Ok(pt) = pt.parse::<u8>() {
                        rtx_pts.insert(pt);
                    }
                }
            }
        }
    }
    for l in answer.lines().map(str::trim) {
        if let Some(rest) = l.strip_prefix("a=fmtp:") {
            let Some((pt, params)) = rest.split_once(' ') else {
                continue;
            };
            let Ok(pt) = pt.parse::<u8>() else { continue };
            if !rtx_pts.contains(&pt) {
                continue;
            }
            let apt = params
                .split(';')
                .find_map(|kv| kv.trim().strip_prefix("apt=")?.parse::<u8>().ok());
            if let Some(apt) = apt {
                c.payload_types.insert(pt, apt);
            }
        } else if let Some(rest) = l.strip_prefix("a=extmap:") {
            let Some((id, uri)) = rest.split_once(' ') else {
                continue;
            };
            let uri = uri.split_whitespace().next().unwrap_or_default();
            let id = id.split('/').next().and_then(|i| i.parse::<u8>().ok());
            match uri {
                rtc::sdp::extmap::SDES_MID_URI => c.mid_ext = id,
                rtc::sdp::extmap::SDES_RTP_STREAM_ID_URI => c.rid_ext = id,
                rtc::sdp::extmap::SDES_REPAIR_RTP_STREAM_ID_URI => c.repaired_rid_ext = id,
                _ => {}
            }
        }
    }
    for l in offer.lines().map(str::trim) {
        if let Some(rest) = l.strip_prefix("a=ssrc-group:FID ") {
            let mut it = rest.split_whitespace().map(|s| s.parse::<u32>().ok());
            if let (Some(Some(media)), Some(Some(rtx))) = (it.next(), it.next()) {
                c.fid.insert(rtx, media);
            }
        }
    }
    c
}

#[cfg(test)]
// Tests pick an arbitrary origin for their virtual time (and may share test state).
#[allow(clippy::disallowed_methods, clippy::disallowed_types)]
mod tests {
    use super::*;
    use rtc::interceptor::{
        AttributedPacket, Interceptor, NackGeneratorBuilder, Packet, RTCPFeedback,
        RTPHeaderExtension, StreamInfo, TaggedPacket, TwccReceiverBuilder, convert_twcc,
    };
    use rtc::rtcp::transport_feedbacks::transport_layer_nack::NackPair;
    use rtc::sansio::Protocol;
    use rtc::shared::TransportContext;
    use rtc::srtp::protection_profile::ProtectionProfile;
    use std::collections::BTreeSet;

    const TWCC_ID: u8 = 5;

    fn media(ssrc: u32, seq: u16, ts: u32, twcc: Option<u16>) -> rtp::Packet {
        let mut p = rtp::Packet {
            header: rtp::Header {
                version: 2,
                payload_type: 96,
                ssrc,
                sequence_number: seq,
                timestamp: ts,
                ..Default::default()
            },
            payload: bytes::Bytes::from(vec![seq as u8; 100]),
        };
        if let Some(t) = twcc {
            p.header.extension = true;
            p.header.extension_profile = rtp::header::EXTENSION_PROFILE_ONE_BYTE;
            p.header
                .set_extension(TWCC_ID, bytes::Bytes::copy_from_slice(&t.to_be_bytes()))
                .expect("extension");
        }
        p
    }

    fn tagged(now: Instant, p: rtp::Packet) -> TaggedPacket {
        TaggedPacket {
            now,
            transport: TransportContext::default(),
            message: AttributedPacket::new(Packet::Rtp(p)),
        }
    }

    /// RTCP an `rtc` interceptor wants to send.
    fn written<I: Interceptor>(i: &mut I) -> Vec<Box<dyn rtcp::Packet>> {
        while i.poll_read().is_some() {}
        let mut out = Vec::new();
        while let Some(m) = i.poll_write() {
            if let Packet::Rtcp(ps) = m.message.packet {
                out.extend(ps);
            }
        }
        out
    }

    /// Per transport-wide sequence number, the last verdict of a series of feedback packets
    /// (`Some(arrival)` received, `None` lost), after a marshal/unmarshal round trip.
    fn verdicts(
        into: &mut BTreeMap<u16, Option<Duration>>,
        packets: impl IntoIterator<Item = TransportLayerCc>,
    ) {
        use rtc::shared::marshal::Marshal;
        for p in packets {
            let wire = p.marshal().expect("marshal");
            let back = TransportLayerCc::unmarshal(&mut &wire[..]).expect("unmarshal");
            for ack in convert_twcc(&back) {
                let v = if ack.arrived { ack.arrival } else { None };
                // A packet reported received stays received (a late report of an earlier
                // base may list it again).
                let e = into.entry(ack.sequence_number).or_insert(v);
                if v.is_some() {
                    *e = v;
                }
            }
        }
    }

    fn as_twcc(ps: Vec<Box<dyn rtcp::Packet>>) -> Vec<TransportLayerCc> {
        ps.iter()
            .filter_map(|p| p.as_any().downcast_ref::<TransportLayerCc>().cloned())
            .collect()
    }

    #[test]
    fn twcc_feedback_reports_what_rtcs_receiver_reports() {
        let mut theirs = TwccReceiverBuilder::new()
            .with_interval(TWCC_INTERVAL)
            .build();
        theirs.bind_remote_stream(&StreamInfo {
            ssrc: 7,
            rtp_header_extensions: vec![RTPHeaderExtension {
                uri: rtc::sdp::extmap::TRANSPORT_CC_URI.to_owned(),
                id: u16::from(TWCC_ID),
            }],
            ..Default::default()
        });
        let mut ours = TwccRecorder::new();
        let t0 = Instant::now();
        let (mut want, mut got) = (BTreeMap::new(), BTreeMap::new());
        let mut now = t0;
        let mut next_fb = None;
        // 3000 packets from near the wrap: every 13th lost, pairs swapped now and then, spacing
        // 0.3–3 ms, and a 300 ms pause (a large delta) in the middle.
        let mut order: Vec<u16> = (0..3000u16).map(|i| 64_000u16.wrapping_add(i)).collect();
        for i in (50..2950).step_by(97) {
            order.swap(i, i + 1);
        }
        for (i, seq) in order.into_iter().enumerate() {
            now += Duration::from_micros(300 + (i as u64 * 7919) % 2_700);
            if i == 1500 {
                now += Duration::from_millis(300);
            }
            if next_fb.is_some_and(|t| t <= now) {
                theirs.handle_timeout(now).expect("timeout");
                verdicts(&mut want, as_twcc(written(&mut theirs)));
                verdicts(&mut got, ours.feedback(1, 7));
                next_fb = theirs.poll_timeout();
            }
            if seq % 13 == 0 {
                continue;
            }
            theirs
                .handle_read(tagged(now, media(7, i as u16, 0, Some(seq))))
                .expect("read");
            ours.record(seq, now);
            next_fb = next_fb.or(theirs.poll_timeout());
        }
        now += TWCC_INTERVAL;
        theirs.handle_timeout(now).expect("timeout");
        verdicts(&mut want, as_twcc(written(&mut theirs)));
        verdicts(&mut got, ours.feedback(1, 7));
        assert!(want.len() > 2_900, "{}", want.len());
        let lost = |m: &BTreeMap<u16, Option<Duration>>| m.values().filter(|v| v.is_none()).count();
        assert!(lost(&want) > 200, "{}", lost(&want));
        assert_eq!(got.len(), want.len());
        assert_eq!(got, want);
    }

    #[test]
    fn twcc_feedback_encodes_runs_vectors_and_large_deltas() {
        let mut r = TwccRecorder::new();
        assert!(r.feedback(1, 2).is_empty());
        let t0 = Instant::now();
        // 20 in a row, 3 lost, 1 after 100 ms (large delta), 1 arriving before its
        // predecessor (negative delta).
        for s in 0..20u16 {
            r.record(s, t0 + Duration::from_millis(u64::from(s)));
        }
        r.record(23, t0 + Duration::from_millis(120));
        r.record(25, t0 + Duration::from_millis(130));
        r.record(24, t0 + Duration::from_millis(131));
        assert_eq!(r.pending(), 23);
        let fb = r.feedback(1, 2);
        assert_eq!(fb.len(), 1);
        assert_eq!(r.pending(), 0);
        let f = &fb[0];
        assert_eq!((f.base_sequence_number, f.packet_status_count), (0, 26));
        assert_eq!(f.fb_pkt_count, 0);
        assert!(matches!(
            f.packet_chunks[0],
            PacketStatusChunk::RunLengthChunk(RunLengthChunk { run_length: 20, .. })
        ));
        let mut m = BTreeMap::new();
        verdicts(&mut m, fb);
        assert_eq!(m[&21], None);
        assert_eq!(m[&23], Some(Duration::from_millis(120)));
        assert_eq!(m[&24], Some(Duration::from_millis(131)));
        assert_eq!(m[&25], Some(Duration::from_millis(130)));
        // The next feedback starts after what was reported and counts on.
        r.record(26, t0 + Duration::from_millis(140));
        let fb = r.feedback(1, 2);
        assert_eq!(
            (fb[0].base_sequence_number, fb[0].packet_status_count),
            (26, 1)
        );
        assert_eq!(fb[0].fb_pkt_count, 1);
        // A packet reported lost that arrives late is reported again (received).
        r.record(21, t0 + Duration::from_millis(150));
        let mut m = BTreeMap::new();
        verdicts(&mut m, r.feedback(1, 2));
        assert_eq!(m[&21], Some(Duration::from_millis(150)));
        // Duplicates count once.
        r.record(21, t0 + Duration::from_millis(151));
        assert_eq!(r.pending(), 0);
    }

    #[test]
    fn twcc_feedback_splits_beyond_its_status_bound() {
        let mut r = TwccRecorder::new();
        let t0 = Instant::now();
        for s in 0..2_500u16 {
            r.record(s, t0 + Duration::from_micros(u64::from(s) * 100));
        }
        let fb = r.feedback(1, 2);
        assert_eq!(fb.len(), 3);
        assert!(
            fb.iter()
                .all(|f| usize::from(f.packet_status_count) <= TWCC_MAX_STATUS)
        );
        let mut m = BTreeMap::new();
        verdicts(&mut m, fb);
        assert_eq!(m.len(), 2_500);
        assert!(m.values().all(Option::is_some));
    }

    fn nacked(ps: &[TransportLayerNack]) -> BTreeSet<(u32, u16)> {
        ps.iter()
            .flat_map(|n| {
                super::super::nack::nack_seqs(n)
                    .map(|s| (n.media_ssrc, s))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn nacks_ask_for_what_rtcs_generator_asks_for() {
        let cfg = NackConfig::default();
        let mut theirs = NackGeneratorBuilder::new()
            .with_size(cfg.log_size)
            .with_interval(NACK_INTERVAL)
            .with_skip_last_n(cfg.skip_last)
            .with_max_nacks_per_packet(cfg.max_retries)
            .build();
        let mut ours = NackGenerator::new(cfg);
        for ssrc in [1, 2] {
            theirs.bind_remote_stream(&StreamInfo {
                ssrc,
                rtcp_feedback: vec![RTCPFeedback {
                    typ: "nack".to_owned(),
                    parameter: String::new(),
                }],
                ..Default::default()
            });
            ours.track(ssrc);
        }
        let t0 = Instant::now();
        let mut now = t0;
        let mut rounds = 0;
        let mut total = 0;
        // Two streams from near the wrap; losses single, in bursts, and a run longer than the
        // log; some lost packets arrive late (retransmitted).
        for i in 0..4_000u32 {
            now += Duration::from_millis(2);
            if theirs.poll_timeout().is_some_and(|t| t <= now) {
                theirs.handle_timeout(now).expect("timeout");
                let want: Vec<TransportLayerNack> = written(&mut theirs)
                    .iter()
                    .filter_map(|p| p.as_any().downcast_ref::<TransportLayerNack>().cloned())
                    .collect();
                let got = ours.generate(now, 9);
                assert_eq!(nacked(&got), nacked(&want), "round {rounds}");
                total += nacked(&got).len();
                rounds += 1;
            }
            let ssrc = 1 + i % 2;
            let seq = 65_000u16.wrapping_add((i / 2) as u16);
            let lost = seq % 17 == 3 || (seq / 10) % 50 == 7 || (1_200..1_800).contains(&(i / 2));
            if !lost {
                for p in [seq]
                    .into_iter()
                    .chain((seq % 34 == 20).then(|| seq.wrapping_sub(17)))
                {
                    theirs
                        .handle_read(tagged(now, media(ssrc, p, 0, None)))
                        .expect("read");
                    ours.on_packet(ssrc, p);
                }
            }
        }
        assert!(rounds > 70, "{rounds}");
        assert!(total > 500, "{total}");
    }

    #[test]
    fn nacks_give_up_after_retries_or_age_and_skip_the_newest() {
        let mut g = NackGenerator::new(NackConfig {
            max_retries: 3,
            max_age: Duration::from_millis(250),
            ..NackConfig::default()
        });
        let t0 = Instant::now();
        g.on_packet(1, 10); // not tracked: ignored
        g.track(1);
        for s in [10u16, 11, 13, 14, 16] {
            g.on_packet(1, s);
        }
        // 15 is the newest missing one before 16... skip_last 1 leaves 16 itself out, and 15
        // is asked for; 12 too.
        let seqs =
            |v: Vec<TransportLayerNack>| nacked(&v).into_iter().map(|(_, s)| s).collect::<Vec<_>>();
        assert_eq!(seqs(g.generate(t0, 9)), vec![12, 15]);
        g.on_packet(1, 15);
        assert_eq!(seqs(g.generate(t0 + NACK_INTERVAL, 9)), vec![12]);
        assert_eq!(seqs(g.generate(t0 + 2 * NACK_INTERVAL, 9)), vec![12]);
        // Three requests: given up.
        assert!(g.generate(t0 + 3 * NACK_INTERVAL, 9).is_empty());
        // Age: a new gap asked for at 0.4 s is not asked for after 0.65 s.
        g.on_packet(1, 18);
        g.on_packet(1, 19);
        let t = t0 + Duration::from_millis(400);
        assert_eq!(seqs(g.generate(t, 9)), vec![17]);
        assert_eq!(
            seqs(g.generate(t + Duration::from_millis(200), 9)),
            vec![17]
        );
        assert!(g.generate(t + Duration::from_millis(300), 9).is_empty());
        g.untrack(1);
        g.on_packet(1, 30);
        assert!(g.generate(t0 + Duration::from_secs(2), 9).is_empty());
    }

    #[test]
    fn reception_stats_report_loss_sequence_jitter_and_lsr() {
        let mut r = ReceptionStats::new(90_000);
        let t0 = Instant::now();
        // 65530..65545 (wrapping), 65533 and 2 lost; 20 ms apart, 1800 ticks apart, except
        // one packet 5 ms late.
        for (i, seq) in (0..16u16).map(|i| (i, 65_530u16.wrapping_add(i))) {
            if seq == 65_533 || seq == 2 {
                continue;
            }
            let late = if i == 10 { 5 } else { 0 };
            r.on_packet(
                t0 + Duration::from_millis(u64::from(i) * 20 + late),
                seq,
                u32::from(i) * 1_800,
            );
        }
        r.on_sender_report(t0, 0x1234_5678_9abc_def0);
        let rep = r.report(t0 + Duration::from_millis(500), 42);
        assert_eq!(rep.ssrc, 42);
        assert_eq!(rep.total_lost, 2);
        // 2 of the 16 expected.
        assert_eq!(rep.fraction_lost, (2 * 256 / 16) as u8);
        assert_eq!(rep.last_sequence_number, (1 << 16) | 9);
        assert_eq!(rep.last_sender_report, 0x5678_9abc);
        assert_eq!(rep.delay, 65_536 / 2);
        // The late packet: |D| = 450 ticks twice (late, then early again), smoothed by 1/16.
        assert!(rep.jitter > 40 && rep.jitter < 60, "{}", rep.jitter);
        // Nothing new: nothing lost in this interval, the totals stay.
        let rep = r.report(t0 + Duration::from_secs(1), 42);
        assert_eq!((rep.fraction_lost, rep.total_lost), (0, 2));
    }

    /// An ingress and the publisher's two contexts (it encrypts with our remote key and
    /// decrypts with our local one).
    fn pair() -> (Ingress, Context, Context) {
        let keys = SrtpKeys {
            profile: ProtectionProfile::AeadAes128Gcm,
            local_key: (0..16).collect(),
            local_salt: (100..112).collect(),
            remote_key: (50..66).collect(),
            remote_salt: (200..212).collect(),
        };
        let crypto = rtc::crypto::default_provider().expect("provider");
        let ctx = |k: &[u8], s: &[u8]| {
            Context::new(k, s, keys.profile, None, None, crypto.crypto()).expect("context")
        };
        let tx = ctx(&keys.remote_key, &keys.remote_salt);
        let rx = ctx(&keys.local_key, &keys.local_salt);
        (
            Ingress::new(&keys, Some(TWCC_ID), 0x5eed).expect("ingress"),
            tx,
            rx,
        )
    }

    fn seal(tx: &mut Context, p: &rtp::Packet) -> Vec<u8> {
        use rtc::shared::marshal::Marshal;
        let plain = p.marshal().expect("marshal");
        tx.encrypt_rtp(&plain).expect("encrypt").to_vec()
    }

    fn open(rx: &mut Context, wire: &[u8]) -> Vec<Box<dyn rtcp::Packet>> {
        let plain = rx.decrypt_rtcp(wire).expect("decrypt");
        rtcp::packet::unmarshal(&mut plain.freeze()).expect("parse")
    }

    #[test]
    fn rtx_config_is_read_from_the_answer_and_the_offer() {
        let answer = "v=0\r\n\
            m=video 9 UDP/TLS/RTP/SAVPF 96 97 102 103\r\n\
            a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid\r\n\
            a=extmap:10 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id\r\n\
            a=extmap:11/recvonly urn:ietf:params:rtp-hdrext:sdes:repaired-rtp-stream-id\r\n\
            a=rtpmap:96 VP8/90000\r\n\
            a=rtpmap:97 rtx/90000\r\n\
            a=fmtp:97 apt=96\r\n\
            a=rtpmap:102 H264/90000\r\n\
            a=fmtp:102 packetization-mode=1;apt=5\r\n\
            a=rtpmap:103 rtx/90000\r\n\
            a=fmtp:103 rtx-time=3000;apt=102\r\n";
        let offer = "a=ssrc-group:FID 1111 2222\r\na=ssrc-group:FID 3333\r\n\
            a=ssrc-group:SIM 1 2 3\r\n";
        let c = rtx_config(answer, offer);
        assert_eq!(
            c.payload_types,
            HashMap::from([(97, 96), (103, 102)]),
            "an fmtp of a non-RTX codec does not count"
        );
        assert_eq!(c.fid, HashMap::from([(2222, 1111)]));
        assert_eq!(
            (c.mid_ext, c.rid_ext, c.repaired_rid_ext),
            (Some(4), Some(10), Some(11))
        );
        assert_eq!(rtx_config("", ""), RtxConfig::default());
    }

    fn rtx_of(osn: Option<u16>, seq: u16, ssrc: u32) -> rtp::Packet {
        let mut p = media(ssrc, seq, 0, None);
        p.header.payload_type = 97;
        p.payload = match osn {
            Some(osn) => {
                let mut b = osn.to_be_bytes().to_vec();
                b.extend_from_slice(&[osn as u8; 100]);
                b.into()
            }
            None => bytes::Bytes::new(),
        };
        if osn.is_none() {
            // Padding only: the padding bit, the padding as payload (what a probe sends).
            p.header.padding = true;
        }
        p
    }

    #[test]
    fn rtx_repairs_are_unwrapped_once_and_padding_is_dropped() {
        let (mut ing, mut tx, _) = pair();
        let t0 = Instant::now();
        ing.set_rtx(RtxConfig {
            payload_types: HashMap::from([(97, 96)]),
            fid: HashMap::from([(8, 7)]),
            ..Default::default()
        });
        ing.bind(7, TrackId::from("track-a"), 90_000, true);
        for seq in [100u16, 101, 103] {
            let inc = ing
                .on_rtp(t0, &seal(&mut tx, &media(7, seq, 0, None)))
                .expect("decrypt");
            assert_eq!(inc.track.as_deref(), Some("track-a"));
        }
        // 102 was lost: its repair is forwarded as the original packet.
        let inc = ing
            .on_rtp(t0, &seal(&mut tx, &rtx_of(Some(102), 5000, 8)))
            .expect("decrypt");
        assert!(!inc.dropped);
        assert_eq!(inc.track.as_deref(), Some("track-a"));
        let h = &inc.packet.header;
        assert_eq!((h.ssrc, h.payload_type, h.sequence_number), (7, 96, 102));
        assert_eq!(&inc.packet.payload[..], &[102u8; 100][..]);
        // A second repair of 102, and one of 101 (never lost): dropped.
        for (osn, seq) in [(102, 5001), (101, 5002)] {
            let inc = ing
                .on_rtp(t0, &seal(&mut tx, &rtx_of(Some(osn), seq, 8)))
                .expect("decrypt");
            assert!(inc.dropped && inc.track.is_none(), "{osn}");
        }
        // Padding only (a probe): dropped, whether its stream is known or not.
        for ssrc in [8, 9] {
            let inc = ing
                .on_rtp(t0, &seal(&mut tx, &rtx_of(None, 6000, ssrc)))
                .expect("decrypt");
            assert!(inc.dropped, "{ssrc}");
        }
        // An RTX stream nothing names: `rtc`'s to resolve.
        let inc = ing
            .on_rtp(t0, &seal(&mut tx, &rtx_of(Some(100), 7000, 9)))
            .expect("decrypt");
        assert!(!inc.dropped && inc.track.is_none());
        let s = ing.stats();
        assert_eq!((s.rtx_repaired, s.rtx_duplicate, s.rtx_padding), (1, 2, 2));
        // No NACK for the repaired packet.
        ing.on_timeout(t0 + NACK_INTERVAL);
        assert_eq!(ing.stats().nack_sent, 0);
    }

    #[test]
    fn simulcast_rtx_streams_are_found_by_their_repaired_rid() {
        let (mut ing, mut tx, _) = pair();
        let t0 = Instant::now();
        let (mid, rid, rrid) = (1u8, 2u8, 3u8);
        ing.set_rtx(RtxConfig {
            payload_types: HashMap::from([(97, 96)]),
            mid_ext: Some(mid),
            rid_ext: Some(rid),
            repaired_rid_ext: Some(rrid),
            ..Default::default()
        });
        let ext = |mut p: rtp::Packet, id: u8, rid: &'static str| {
            p.header.extension = true;
            p.header.extension_profile = rtp::header::EXTENSION_PROFILE_ONE_BYTE;
            p.header
                .set_extension(mid, bytes::Bytes::from_static(b"0"))
                .expect("mid");
            p.header
                .set_extension(id, bytes::Bytes::from_static(rid.as_bytes()))
                .expect("rid");
            p
        };
        for (ssrc, r) in [(10u32, "q"), (20, "h")] {
            ing.bind(ssrc, TrackId::from("track-s"), 90_000, true);
            for seq in [1u16, 3] {
                let p = ext(media(ssrc, seq, 0, None), rid, r);
                ing.on_rtp(t0, &seal(&mut tx, &p)).expect("decrypt");
            }
        }
        // The RTX stream of `h` says so once; later packets need not.
        let p = ext(rtx_of(Some(2), 50, 21), rrid, "h");
        let inc = ing.on_rtp(t0, &seal(&mut tx, &p)).expect("decrypt");
        assert_eq!(inc.packet.header.ssrc, 20);
        assert_eq!(inc.packet.header.sequence_number, 2);
        assert_eq!(inc.track.as_deref(), Some("track-s"));
        let inc = ing
            .on_rtp(t0, &seal(&mut tx, &rtx_of(Some(2), 51, 21)))
            .expect("decrypt");
        assert!(inc.dropped, "a duplicate by now");
        assert_eq!(ing.stats().rtx_repaired, 1);
    }

    #[test]
    fn ingress_decrypts_binds_and_sends_feedback_the_publisher_can_read() {
        let (mut ing, mut tx, mut rx) = pair();
        let t0 = Instant::now();
        assert_eq!(ing.deadline(), None);
        // Before the binding the datagram is for `rtc`; after it, for forwarding.
        let first = ing
            .on_rtp(t0, &seal(&mut tx, &media(7, 100, 0, Some(0))))
            .expect("decrypt");
        assert!(first.track.is_none());
        assert_eq!(first.packet.header.sequence_number, 100);
        ing.bind(7, TrackId::from("track-a"), 90_000, true);
        for (i, seq) in [101u16, 102, 104, 105].into_iter().enumerate() {
            let at = t0 + Duration::from_millis(10 * (i as u64 + 1));
            let inc = ing
                .on_rtp(at, &seal(&mut tx, &media(7, seq, 0, Some(i as u16 + 1))))
                .expect("decrypt");
            assert_eq!(inc.track.as_deref(), Some("track-a"));
        }
        // The publisher's sender report, then the timers.
        let sr: Vec<Box<dyn rtcp::Packet>> = vec![Box::new(SenderReport {
            ssrc: 7,
            ntp_time: 0x0000_1111_2222_0000,
            ..Default::default()
        })];
        let wire = tx
            .encrypt_rtcp(&rtcp::packet::marshal(&sr).expect("marshal"))
            .expect("encrypt");
        ing.on_rtcp(t0, &wire).expect("sender report");
        assert!(ing.on_rtcp(t0, &wire).is_err(), "replayed");
        assert_eq!(ing.deadline(), Some(t0 + TWCC_INTERVAL));
        ing.on_timeout(t0 + REPORT_INTERVAL);
        let mut twcc = 0;
        let mut nacks = BTreeSet::new();
        let mut blocks = Vec::new();
        for wire in ing.take_output() {
            for p in open(&mut rx, &wire) {
                let any = p.as_any();
                if let Some(cc) = any.downcast_ref::<TransportLayerCc>() {
                    twcc += 1;
                    assert_eq!(cc.packet_status_count, 5);
                    assert_eq!(cc.media_ssrc, 7);
                } else if let Some(n) = any.downcast_ref::<TransportLayerNack>() {
                    nacks.extend(nacked(std::slice::from_ref(n)));
                } else if let Some(rr) = any.downcast_ref::<ReceiverReport>() {
                    blocks.extend(rr.reports.clone());
                }
            }
        }
        assert_eq!(twcc, 1);
        assert_eq!(nacks, BTreeSet::from([(7, 103)]));
        assert_eq!(blocks.len(), 1);
        assert_eq!(blocks[0].ssrc, 7);
        assert_eq!(blocks[0].total_lost, 1);
        assert_eq!(blocks[0].last_sender_report, 0x1111_2222);
        assert_eq!(blocks[0].delay, 65_536);
        // A keyframe request, readable by the publisher.
        let pli = ing.pli(7).expect("pli");
        let got = open(&mut rx, &pli);
        let pli = got[0]
            .as_any()
            .downcast_ref::<PictureLossIndication>()
            .expect("PLI");
        assert_eq!(pli.media_ssrc, 7);
        // Garbage and replays are rejected and counted.
        assert!(
            ing.on_rtp(t0, &[0x80, 96, 0, 1, 0, 0, 0, 0, 0, 0, 0, 7])
                .is_err()
        );
        let again = seal(&mut tx, &media(7, 106, 0, None));
        assert!(ing.on_rtp(t0, &again).is_ok());
        assert!(ing.on_rtp(t0, &again).is_err());
        let s = ing.stats();
        assert_eq!((s.rtp_fast, s.rtp_to_rtc, s.rtp_rejected), (5, 1, 2));
        assert_eq!((s.rtcp_in, s.rtcp_rejected), (1, 1));
        assert_eq!(
            (s.nack_sent, s.twcc_feedback_sent, s.receiver_reports_sent),
            (1, 1, 1)
        );
        // A track gone: its SSRC goes back to `rtc`.
        ing.unbind_track("track-a");
        let inc = ing
            .on_rtp(t0, &seal(&mut tx, &media(7, 107, 0, None)))
            .expect("decrypt");
        assert!(inc.track.is_none());
    }

    #[test]
    fn the_audio_level_is_read_once_negotiated() {
        let (mut ing, mut tx, _) = pair();
        let t0 = Instant::now();
        let mut p = media(9, 1, 0, Some(1));
        p.header
            .set_extension(1, bytes::Bytes::from_static(&[0x80 | 33]))
            .expect("ext");
        let inc = ing.on_rtp(t0, &seal(&mut tx, &p)).expect("decrypt");
        assert_eq!(inc.audio_level, None, "not negotiated: not read");
        ing.set_audio_level_ext(Some(1));
        p.header.sequence_number = 2;
        let inc = ing.on_rtp(t0, &seal(&mut tx, &p)).expect("decrypt");
        assert_eq!(
            inc.audio_level,
            Some(AudioLevel {
                level: 33,
                voice: true
            })
        );
        // A packet without it (video, or a sender that does not send it).
        let inc = ing
            .on_rtp(t0, &seal(&mut tx, &media(9, 3, 0, Some(3))))
            .expect("decrypt");
        assert_eq!(inc.audio_level, None);
    }

    #[test]
    fn twcc_feedback_goes_out_promptly_when_many_packets_wait() {
        let (mut ing, mut tx, _) = pair();
        let t0 = Instant::now();
        for i in 0..TWCC_PROMPT as u16 {
            ing.on_rtp(t0, &seal(&mut tx, &media(7, i, 0, Some(i))))
                .expect("decrypt");
            assert_eq!(ing.has_output(), usize::from(i) + 1 == TWCC_PROMPT, "{i}");
        }
        assert_eq!(ing.stats().twcc_feedback_sent, 1);
    }

    #[test]
    fn nack_pairs_are_counted_per_sequence_number() {
        // (A NACK pair with a bitmask stands for several sequence numbers.)
        let n = TransportLayerNack {
            sender_ssrc: 1,
            media_ssrc: 2,
            nacks: vec![NackPair {
                packet_id: 10,
                lost_packets: 0b101,
            }],
        };
        assert_eq!(nacked(&[n]).len(), 3);
    }

    #[test]
    fn twcc_extension_id_is_read_from_the_sdp() {
        let sdp = "v=0\r\na=extmap:3 urn:ietf:params:rtp-hdrext:sdes:mid\r\n\
                   a=extmap:5/sendrecv http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01\r\n";
        assert_eq!(twcc_ext_id(sdp), Some(5));
        assert_eq!(twcc_ext_id("v=0\r\na=extmap:x y\r\n"), None);
        assert_eq!(twcc_ext_id(""), None);
        let sdp = "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\n\
                   a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level\r\n\
                   a=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01\r\n";
        assert_eq!(audio_level_ext_id(sdp), Some(1));
        assert_eq!(twcc_ext_id(sdp), Some(3));
    }
}
