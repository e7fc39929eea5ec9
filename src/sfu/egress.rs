//! The subscriber fast path: what leaves on a subscriber connection, and the RTCP that comes
//! back, without `rtc`'s per-connection pipeline.
//!
//! # Why
//!
//! Forwarding a packet through `rtc` (`RTCRtpSender::write_rtp`, then `poll_write`) costs
//! ≈ 20 µs of CPU per packet and subscriber: `write_rtp` rebuilds the sender's parameters for
//! every packet, and the packet then walks every handler of the connection and its interceptor
//! chain (measured in bench/results/session2-2026-11-22.md). An SFU sends each packet once per
//! subscriber, so that cost multiplies by the audience. The work actually needed is small: set
//! the transport-wide sequence number, remember the packet for NACKs, encrypt, and send.
//!
//! # How
//!
//! `rtc` keeps its SRTP keys private, but it takes its crypto from a provider the application
//! may supply ([`SettingEngineBuilder::with_crypto_provider`]). SRTP derives its session keys
//! (RFC 3711 §4.3) by AES-encrypting blocks built from the master salt with the master key;
//! [`KeyCapture`] wraps the default provider and records those blocks, from which
//! [`SrtpKeys::from_kdf_blocks`] recovers both directions' master key and salt and the profile.
//! `rtc` derives the local context first and the remote one second, which tells them apart.
//!
//! With the keys, [`Egress`] owns per subscriber connection:
//!
//! * an SRTP context for what it sends (RTP and our own RTCP sender reports) and one for what
//!   the subscriber sends (its SRTCP feedback, intercepted before `rtc` sees it);
//! * the transport-wide sequence number (TWCC header extension) and the send history matched
//!   against the subscriber's TWCC feedback, feeding its [`Bwe`];
//! * the budgeted [`Retransmitter`] answering NACKs;
//! * packet and octet counts for RTCP sender reports.
//!
//! `rtc` keeps everything else of the connection: ICE, DTLS, SDP negotiation and the data
//! channels (SCTP). It no longer sends or receives any RTP or RTCP on a subscriber connection,
//! so no SRTP context is ever used by both for the same SSRC.
//!
//! [`SettingEngineBuilder::with_crypto_provider`]: rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder::with_crypto_provider

use super::bwe::{Bwe, Estimate};
use super::nack::{NackStats, Retransmitter, nack_seqs};
use bytes::{Bytes, BytesMut};
use rtc::crypto::{
    AeadAlgorithm, AeadCipher, BlockCipherAlgorithm, CbcAlgorithm, CbcCipher, CryptoAlgorithm,
    CryptoError, HashAlgorithm, HmacAlgorithm, KeyExchangeAlgorithm, Mac, PublicKey, RTCCrypto,
    RTCCryptoProvider, RTCRandom, SignatureScheme, SigningKey, StreamCipher, StreamCipherAlgorithm,
};
use rtc::interceptor::{Acknowledgement, BandwidthEstimator, PacketReport, convert_twcc};
use rtc::rtcp;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtcp::transport_feedbacks::cc_feedback_report::Ecn;
use rtc::rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::rtp;
use rtc::shared::marshal::{Marshal, MarshalSize};
use rtc::srtp::context::Context;
use rtc::srtp::option::{srtcp_replay_protection, srtp_replay_protection};
use rtc::srtp::protection_profile::ProtectionProfile;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Replay window for the subscriber's SRTCP (as `rtc` uses).
const REPLAY_WINDOW: usize = 64;
/// Sent packets remembered for TWCC feedback (a power of two): ~7 s at 150 packets/s, far
/// more than the ~100 ms feedback interval.
pub const TWCC_LOG: usize = 1024;
/// At most this many key-derivation blocks are recorded per connection (two contexts need 8
/// with AES-GCM, 16 with AES-CM/HMAC).
const MAX_BLOCKS: usize = 64;
/// AES-128 key and block size.
const AES_128: usize = 16;
/// RFC 3711 key-derivation labels of the authentication keys, which only the HMAC profiles
/// derive.
const LABEL_SRTP_AUTH: u8 = 0x01;
const LABEL_SRTCP_AUTH: u8 = 0x04;
/// Seconds between the NTP epoch (1900) and the Unix epoch.
const NTP_UNIX_OFFSET: u64 = 2_208_988_800;

/// Why the fast path could not be set up or a packet could not go through it.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("SRTP keys were not derived (saw {0} key-derivation blocks)")]
    NoKeys(usize),
    #[error("SRTP: {0}")]
    Srtp(String),
    #[error("RTP/RTCP encoding: {0}")]
    Encoding(String),
}

/// Recovered SRTP master keys of one connection.
#[derive(Debug, Clone)]
pub struct SrtpKeys {
    pub profile: ProtectionProfile,
    pub local_key: Vec<u8>,
    pub local_salt: Vec<u8>,
    pub remote_key: Vec<u8>,
    pub remote_salt: Vec<u8>,
}

impl SrtpKeys {
    /// Recover the keys from the AES blocks SRTP key derivation encrypted, in order:
    /// `(master key, input block)`. The first block under a key is label 0 with counter 0:
    /// the master salt, zero-padded. Labels 1 and 4 (authentication keys) mean an
    /// AES-CM/HMAC-SHA1 profile (14-byte salt); without them it is AES-128-GCM (12-byte salt).
    pub fn from_kdf_blocks(blocks: &[([u8; AES_128], [u8; AES_128])]) -> Result<Self, EgressError> {
        // Distinct master keys in order of first use: the local context is derived first.
        let mut keys: Vec<([u8; AES_128], [u8; AES_128], bool)> = Vec::new();
        for (key, block) in blocks {
            match keys.iter_mut().find(|(k, _, _)| k == key) {
                None => keys.push((*key, *block, false)),
                Some((_, first, hmac)) => {
                    let label = block[7] ^ first[7];
                    if label == LABEL_SRTP_AUTH || label == LABEL_SRTCP_AUTH {
                        *hmac = true;
                    }
                }
            }
        }
        let [(lk, lb, lh), (rk, rb, rh)] = keys.as_slice() else {
            return Err(EgressError::NoKeys(blocks.len()));
        };
        if lh != rh {
            return Err(EgressError::NoKeys(blocks.len()));
        }
        let (profile, salt_len) = if *lh {
            (ProtectionProfile::Aes128CmHmacSha1_80, 14)
        } else {
            (ProtectionProfile::AeadAes128Gcm, 12)
        };
        Ok(SrtpKeys {
            profile,
            local_key: lk.to_vec(),
            local_salt: lb[..salt_len].to_vec(),
            remote_key: rk.to_vec(),
            remote_salt: rb[..salt_len].to_vec(),
        })
    }
}

/// A crypto provider that does everything the default one does and records the AES-128 blocks
/// SRTP key derivation encrypts (see the module docs). One per subscriber connection.
#[derive(Clone)]
pub struct KeyCapture {
    inner: Arc<Inner>,
}

struct Inner {
    provider: Arc<dyn RTCCryptoProvider>,
    /// Touched only while a DTLS handshake completes, never on the packet path.
    blocks: Mutex<Vec<([u8; AES_128], [u8; AES_128])>>,
}

impl KeyCapture {
    /// Wrap the default provider.
    pub fn new() -> Result<Self, EgressError> {
        let provider =
            rtc::crypto::default_provider().map_err(|e| EgressError::Srtp(e.to_string()))?;
        Ok(KeyCapture {
            inner: Arc::new(Inner {
                provider,
                blocks: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The keys of the connection, once its DTLS handshake is complete.
    pub fn keys(&self) -> Result<SrtpKeys, EgressError> {
        let blocks = self
            .inner
            .blocks
            .lock()
            .map_err(|_| EgressError::NoKeys(0))?;
        SrtpKeys::from_kdf_blocks(&blocks)
    }
}

impl RTCCryptoProvider for KeyCapture {
    fn name(&self) -> &'static str {
        "plaza-key-capture"
    }
    fn crypto(&self) -> &dyn RTCCrypto {
        self
    }
    fn random(&self) -> &dyn RTCRandom {
        self.inner.provider.random()
    }
}

impl RTCCrypto for KeyCapture {
    fn supports(&self, algorithm: CryptoAlgorithm) -> bool {
        self.inner.provider.crypto().supports(algorithm)
    }
    fn hash(&self, algorithm: HashAlgorithm, data: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.inner.provider.crypto().hash(algorithm, data)
    }
    fn block_encrypt(
        &self,
        algorithm: BlockCipherAlgorithm,
        key: &[u8],
        block: &mut [u8],
    ) -> Result<(), CryptoError> {
        if algorithm == BlockCipherAlgorithm::Aes128 {
            if let (Ok(k), Ok(b)) = (
                <[u8; AES_128]>::try_from(key),
                <[u8; AES_128]>::try_from(&*block),
            ) {
                if let Ok(mut blocks) = self.inner.blocks.lock() {
                    if blocks.len() < MAX_BLOCKS {
                        blocks.push((k, b));
                    }
                }
            }
        }
        self.inner
            .provider
            .crypto()
            .block_encrypt(algorithm, key, block)
    }
    fn new_hmac(&self, algorithm: HmacAlgorithm, key: &[u8]) -> Result<Box<dyn Mac>, CryptoError> {
        self.inner.provider.crypto().new_hmac(algorithm, key)
    }
    fn new_stream_cipher(
        &self,
        algorithm: StreamCipherAlgorithm,
        key: &[u8],
    ) -> Result<Box<dyn StreamCipher>, CryptoError> {
        self.inner
            .provider
            .crypto()
            .new_stream_cipher(algorithm, key)
    }
    fn new_aead(
        &self,
        algorithm: AeadAlgorithm,
        key: &[u8],
    ) -> Result<Box<dyn AeadCipher>, CryptoError> {
        self.inner.provider.crypto().new_aead(algorithm, key)
    }
    fn new_cbc(
        &self,
        algorithm: CbcAlgorithm,
        key: &[u8],
    ) -> Result<Box<dyn CbcCipher>, CryptoError> {
        self.inner.provider.crypto().new_cbc(algorithm, key)
    }
    fn start_key_exchange(
        &self,
        algorithm: KeyExchangeAlgorithm,
    ) -> Result<Box<dyn rtc::crypto::ActiveKeyExchange>, CryptoError> {
        self.inner.provider.crypto().start_key_exchange(algorithm)
    }
    fn generate_signing_key(
        &self,
        scheme: SignatureScheme,
    ) -> Result<Arc<dyn SigningKey>, CryptoError> {
        self.inner.provider.crypto().generate_signing_key(scheme)
    }
    fn import_signing_key(
        &self,
        scheme: SignatureScheme,
        pkcs8_der: &[u8],
    ) -> Result<Arc<dyn SigningKey>, CryptoError> {
        self.inner
            .provider
            .crypto()
            .import_signing_key(scheme, pkcs8_der)
    }
    fn verify_signature(
        &self,
        scheme: SignatureScheme,
        public_key: PublicKey<'_>,
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), CryptoError> {
        self.inner
            .provider
            .crypto()
            .verify_signature(scheme, public_key, message, signature)
    }
}

/// One sent packet awaiting its TWCC verdict.
#[derive(Debug, Clone, Copy)]
struct Sent {
    /// Extended transport-wide sequence number (its low 16 bits are on the wire).
    id: u64,
    ssrc: u32,
    rtp_seq: u16,
    size: usize,
    departure: Instant,
    arrived: bool,
    arrival: Option<Duration>,
}

/// What left with a transport-wide sequence number, matched against TWCC feedback: the same
/// reports as `rtc`'s `History` (in send order; everything before the highest arrived packet
/// is reported, unacknowledged as lost), in a fixed ring of [`TWCC_LOG`] slots instead of
/// three hash maps per packet, so nothing needs pruning.
pub struct TwccLog {
    slots: Vec<Option<Sent>>,
    next_id: u64,
    highest_acked: Option<u64>,
    next_to_report: u64,
}

impl Default for TwccLog {
    fn default() -> Self {
        TwccLog {
            slots: vec![None; TWCC_LOG],
            next_id: 0,
            highest_acked: None,
            next_to_report: 0,
        }
    }
}

impl TwccLog {
    /// Record a packet leaving; returns the transport-wide sequence number to put on it.
    pub fn add(&mut self, ssrc: u32, rtp_seq: u16, size: usize, departure: Instant) -> u16 {
        let id = self.next_id;
        self.next_id += 1;
        self.slots[id as usize % TWCC_LOG] = Some(Sent {
            id,
            ssrc,
            rtp_seq,
            size,
            departure,
            arrived: false,
            arrival: None,
        });
        id as u16
    }

    /// Apply one acknowledgement of TWCC feedback (unknown or forgotten numbers are ignored).
    pub fn on_ack(&mut self, ack: &Acknowledgement) {
        let slot = &mut self.slots[usize::from(ack.sequence_number) % TWCC_LOG];
        let Some(sent) = slot.as_mut().filter(|s| s.id as u16 == ack.sequence_number) else {
            return;
        };
        sent.arrived = ack.arrived;
        sent.arrival = ack.arrival;
        if ack.arrived {
            self.highest_acked = Some(self.highest_acked.map_or(sent.id, |h| h.max(sent.id)));
        }
    }

    /// Everything up to the highest arrived packet since the last call, in send order.
    pub fn take_reports(&mut self) -> Vec<PacketReport> {
        let Some(highest) = self.highest_acked else {
            return Vec::new();
        };
        // Older ones have been overwritten.
        let from = self
            .next_to_report
            .max((highest + 1).saturating_sub(TWCC_LOG as u64));
        let mut out = Vec::new();
        for id in from..=highest {
            let slot = &mut self.slots[id as usize % TWCC_LOG];
            if let Some(s) = slot.take_if(|s| s.id == id) {
                out.push(PacketReport {
                    ssrc: s.ssrc,
                    id: s.id,
                    rtp_sequence_number: s.rtp_seq,
                    is_twcc: true,
                    twcc_sequence_number: s.id as u16,
                    size: s.size,
                    arrived: s.arrived,
                    departure: s.departure,
                    arrival: s.arrival,
                    ecn: Ecn::NotEct,
                });
            }
        }
        self.next_to_report = self.next_to_report.max(highest + 1);
        out
    }
}

/// What a sender report needs of one outgoing stream.
#[derive(Debug, Clone, Copy)]
struct SentStream {
    clock_rate: u32,
    /// Negotiated transport-wide sequence number extension id (retransmissions carry it too).
    twcc_id: Option<u8>,
    packets: u32,
    octets: u32,
    /// RTP timestamp of the last packet and when it left.
    last_ts: u32,
    last_at: Instant,
}

/// Counters of one [`Egress`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EgressStats {
    pub nack: NackStats,
    pub rtcp_in: u64,
    pub rtcp_rejected: u64,
    pub twcc_feedback: u64,
}

impl std::ops::AddAssign for EgressStats {
    fn add_assign(&mut self, o: Self) {
        self.nack.requested += o.nack.requested;
        self.nack.resent += o.nack.resent;
        self.nack.refused += o.nack.refused;
        self.nack.over_budget += o.nack.over_budget;
        self.rtcp_in += o.rtcp_in;
        self.rtcp_rejected += o.rtcp_rejected;
        self.twcc_feedback += o.twcc_feedback;
    }
}

/// One subscriber connection's media out and feedback in (see the module docs).
pub struct Egress {
    local: Context,
    remote: Context,
    twcc: TwccLog,
    bwe: Bwe,
    /// The estimator's target and the last REMB.
    estimate: Estimate,
    retransmit: Retransmitter,
    sent: HashMap<u32, SentStream>,
    stats: EgressStats,
    /// Plaintext of the packet being protected (reused: no allocation per packet).
    scratch: Vec<u8>,
}

/// What the subscriber's RTCP asked of the core (the egress handles NACK and TWCC itself).
#[derive(Debug, Default)]
pub struct Feedback {
    /// Media SSRCs (our down-tracks) the subscriber asked a keyframe for (PLI/FIR).
    pub keyframes: Vec<u32>,
    /// NACKs, per media SSRC, with the sequence numbers reported lost (after a layer switch
    /// they tell the core the switch's keyframe was lost).
    pub lost: Vec<(u32, Vec<u16>)>,
    /// TWCC feedback arrived (the estimate may have changed).
    pub estimate_updated: bool,
    /// Retransmissions to send, encrypted.
    pub retransmissions: Vec<BytesMut>,
}

impl Egress {
    /// The fast path of a connection whose DTLS handshake gave `keys`.
    pub fn new(keys: &SrtpKeys) -> Result<Self, EgressError> {
        let crypto =
            rtc::crypto::default_provider().map_err(|e| EgressError::Srtp(e.to_string()))?;
        let srtp = |e: rtc::shared::error::Error| EgressError::Srtp(e.to_string());
        let local = Context::new(
            &keys.local_key,
            &keys.local_salt,
            keys.profile,
            None,
            None,
            crypto.crypto(),
        )
        .map_err(srtp)?;
        let remote = Context::new(
            &keys.remote_key,
            &keys.remote_salt,
            keys.profile,
            Some(srtp_replay_protection(REPLAY_WINDOW)),
            Some(srtcp_replay_protection(REPLAY_WINDOW)),
            crypto.crypto(),
        )
        .map_err(srtp)?;
        Ok(Egress {
            local,
            remote,
            twcc: TwccLog::default(),
            bwe: Bwe::new(),
            estimate: Estimate::default(),
            retransmit: Retransmitter::new(),
            sent: HashMap::new(),
            stats: EgressStats::default(),
            scratch: Vec::with_capacity(1_500),
        })
    }

    /// The subscriber's downlink estimate.
    pub fn estimate(&self) -> &Estimate {
        &self.estimate
    }

    pub fn stats(&self) -> EgressStats {
        EgressStats {
            nack: self.retransmit.stats(),
            ..self.stats
        }
    }

    /// Protect one outgoing media packet (already rewritten for this subscriber): add the
    /// transport-wide sequence number when `twcc_id` is negotiated, remember it for NACKs
    /// (`video`) and sender reports, encrypt.
    pub fn protect_rtp(
        &mut self,
        now: Instant,
        packet: &mut rtp::Packet,
        twcc_id: Option<u8>,
        clock_rate: u32,
        video: bool,
        keyframe: bool,
    ) -> Result<BytesMut, EgressError> {
        self.retransmit.on_sent(now, packet, video, keyframe);
        let size = packet.payload.len();
        let s = self.sent.entry(packet.header.ssrc).or_insert(SentStream {
            clock_rate,
            twcc_id,
            packets: 0,
            octets: 0,
            last_ts: packet.header.timestamp,
            last_at: now,
        });
        s.packets = s.packets.wrapping_add(1);
        s.octets = s.octets.wrapping_add(size as u32);
        s.last_ts = packet.header.timestamp;
        s.last_at = now;
        s.twcc_id = twcc_id;
        self.seal(now, packet, twcc_id)
    }

    /// Encrypt `packet`, with a fresh transport-wide sequence number if `twcc_id` is set.
    fn seal(
        &mut self,
        now: Instant,
        packet: &mut rtp::Packet,
        twcc_id: Option<u8>,
    ) -> Result<BytesMut, EgressError> {
        let header = &mut packet.header;
        header.extension = false;
        header.extensions.clear();
        header.extension_profile = 0;
        header.extensions_padding = 0;
        if let Some(id) = twcc_id {
            header.extension = true;
            header.extension_profile = rtp::header::EXTENSION_PROFILE_ONE_BYTE;
            // The size is fixed by the extension, which is set next.
            let size = packet.payload.len() + 12 + 4 * header.csrc.len() + 8;
            let seq = self
                .twcc
                .add(header.ssrc, header.sequence_number, size, now);
            header
                .set_extension(id, Bytes::copy_from_slice(&seq.to_be_bytes()))
                .map_err(|e| EgressError::Encoding(e.to_string()))?;
        }
        self.scratch.clear();
        self.scratch.resize(packet.marshal_size(), 0);
        packet
            .marshal_to(&mut self.scratch)
            .map_err(|e| EgressError::Encoding(e.to_string()))?;
        self.local
            .encrypt_rtp_with_header(&self.scratch, &packet.header)
            .map_err(|e| EgressError::Srtp(e.to_string()))
    }

    /// Decrypt and handle one SRTCP datagram from the subscriber.
    pub fn on_rtcp(&mut self, now: Instant, data: &[u8]) -> Result<Feedback, EgressError> {
        let plain = match self.remote.decrypt_rtcp(data) {
            Ok(p) => p,
            Err(e) => {
                self.stats.rtcp_rejected += 1;
                return Err(EgressError::Srtp(e.to_string()));
            }
        };
        self.stats.rtcp_in += 1;
        let packets = rtcp::packet::unmarshal(&mut plain.freeze())
            .map_err(|e| EgressError::Encoding(e.to_string()))?;
        let mut fb = Feedback::default();
        for p in &packets {
            let any = p.as_any();
            if let Some(nack) = any.downcast_ref::<TransportLayerNack>() {
                fb.lost.push((nack.media_ssrc, nack_seqs(nack).collect()));
                let estimate = self.estimate.available(now);
                for mut packet in self.retransmit.on_nack(now, nack, estimate) {
                    // A retransmission carries a new transport-wide sequence number: the
                    // receiver reports its arrival like any other packet.
                    let twcc_id = self.sent.get(&packet.header.ssrc).and_then(|s| s.twcc_id);
                    match self.seal(now, &mut packet, twcc_id) {
                        Ok(b) => fb.retransmissions.push(b),
                        Err(e) => tracing::trace!("retransmission: {e}"),
                    }
                }
            } else if let Some(cc) = any.downcast_ref::<TransportLayerCc>() {
                self.stats.twcc_feedback += 1;
                for ack in convert_twcc(cc) {
                    self.twcc.on_ack(&ack);
                }
                let reports = self.twcc.take_reports();
                if !reports.is_empty() {
                    self.bwe.on_reports(now, &reports);
                    self.estimate.set_twcc(self.bwe.target_bitrate());
                    fb.estimate_updated = true;
                }
            } else if let Some(pli) = any.downcast_ref::<rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication>() {
                fb.keyframes.push(pli.media_ssrc);
            } else if let Some(fir) = any.downcast_ref::<rtcp::payload_feedbacks::full_intra_request::FullIntraRequest>() {
                fb.keyframes.extend(fir.fir.iter().map(|e| e.ssrc));
            } else if let Some(remb) = any.downcast_ref::<rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate>() {
                self.estimate.set_remb(now, remb.bitrate.max(0.0) as u64);
            }
        }
        Ok(fb)
    }

    /// A down-track is gone: forget its stream.
    pub fn remove_stream(&mut self, ssrc: u32) {
        self.retransmit.remove_stream(ssrc);
        self.sent.remove(&ssrc);
    }

    /// Sender reports for every stream that has sent something, as one encrypted compound
    /// packet (`None` when there is nothing to report).
    pub fn sender_reports(&mut self, now: Instant, wall: SystemTime) -> Option<BytesMut> {
        if self.sent.is_empty() {
            return None;
        }
        let ntp = ntp_time(wall);
        let reports: Vec<Box<dyn rtcp::Packet>> = self
            .sent
            .iter()
            .map(|(&ssrc, s)| {
                Box::new(SenderReport {
                    ssrc,
                    ntp_time: ntp,
                    rtp_time: rtp_time_at(s.last_ts, s.last_at, now, s.clock_rate),
                    packet_count: s.packets,
                    octet_count: s.octets,
                    ..Default::default()
                }) as Box<dyn rtcp::Packet>
            })
            .collect();
        let plain = rtcp::packet::marshal(&reports).ok()?;
        self.local.encrypt_rtcp(&plain).ok()
    }
}

/// The RTP timestamp that corresponds to `now`, extrapolated from the last packet's.
pub fn rtp_time_at(last_ts: u32, last_at: Instant, now: Instant, clock_rate: u32) -> u32 {
    let elapsed = now.saturating_duration_since(last_at);
    let ticks = (elapsed.as_secs_f64() * f64::from(clock_rate)) as u64;
    last_ts.wrapping_add(ticks as u32)
}

/// 64-bit NTP time (seconds since 1900 in the high word, fraction in the low word).
pub fn ntp_time(wall: SystemTime) -> u64 {
    let d = wall.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() + NTP_UNIX_OFFSET;
    let frac = (u64::from(d.subsec_nanos()) << 32) / 1_000_000_000;
    (secs << 32) | frac
}

/// Whether a datagram is RTCP (RFC 5761 demultiplexing: version 2, payload type 192–223).
pub fn is_rtcp(data: &[u8]) -> bool {
    data.len() >= 8 && data[0] & 0xC0 == 0x80 && (192..=223).contains(&data[1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
    use rtc::rtcp::transport_feedbacks::transport_layer_nack::NackPair;

    /// A recording crypto whose blocks come from `rtc`'s own SRTP key derivation.
    fn derive(profile: ProtectionProfile, key: &[u8], salt: &[u8], capture: &KeyCapture) {
        Context::new(key, salt, profile, None, None, capture.crypto()).expect("context");
    }

    fn keys_for(profile: ProtectionProfile, salt_len: usize) -> (SrtpKeys, KeyCapture) {
        let capture = KeyCapture::new().expect("provider");
        let lk: Vec<u8> = (0..16).collect();
        let ls: Vec<u8> = (100..100 + salt_len as u8).collect();
        let rk: Vec<u8> = (50..66).collect();
        let rs: Vec<u8> = (200..200 + salt_len as u8).collect();
        derive(profile, &lk, &ls, &capture);
        derive(profile, &rk, &rs, &capture);
        (
            SrtpKeys {
                profile,
                local_key: lk,
                local_salt: ls,
                remote_key: rk,
                remote_salt: rs,
            },
            capture,
        )
    }

    #[test]
    fn keys_are_recovered_from_key_derivation_for_both_profiles() {
        for (profile, salt_len) in [
            (ProtectionProfile::AeadAes128Gcm, 12),
            (ProtectionProfile::Aes128CmHmacSha1_80, 14),
        ] {
            let (want, capture) = keys_for(profile, salt_len);
            let got = capture.keys().expect("keys");
            assert_eq!(got.profile as u8, profile as u8);
            assert_eq!(got.local_key, want.local_key);
            assert_eq!(got.local_salt, want.local_salt);
            assert_eq!(got.remote_key, want.remote_key);
            assert_eq!(got.remote_salt, want.remote_salt);
        }
    }

    #[test]
    fn too_few_or_mismatched_blocks_are_an_error() {
        assert!(matches!(
            SrtpKeys::from_kdf_blocks(&[]),
            Err(EgressError::NoKeys(0))
        ));
        let capture = KeyCapture::new().expect("provider");
        derive(
            ProtectionProfile::AeadAes128Gcm,
            &[1; 16],
            &[2; 12],
            &capture,
        );
        assert!(capture.keys().is_err(), "one direction only");
    }

    /// Our egress and a receiver keyed the other way round (as the subscriber is).
    fn pair(profile: ProtectionProfile, salt_len: usize) -> (Egress, Context, Context) {
        let (keys, _) = keys_for(profile, salt_len);
        let e = Egress::new(&keys).expect("egress");
        let crypto = rtc::crypto::default_provider().expect("provider");
        // The subscriber decrypts with our local key and encrypts with our remote key.
        let rx = Context::new(
            &keys.local_key,
            &keys.local_salt,
            profile,
            None,
            None,
            crypto.crypto(),
        )
        .expect("rx");
        let tx = Context::new(
            &keys.remote_key,
            &keys.remote_salt,
            profile,
            None,
            None,
            crypto.crypto(),
        )
        .expect("tx");
        (e, rx, tx)
    }

    fn media(ssrc: u32, seq: u16, ts: u32) -> rtp::Packet {
        rtp::Packet {
            header: rtp::Header {
                version: 2,
                payload_type: 96,
                ssrc,
                sequence_number: seq,
                timestamp: ts,
                ..Default::default()
            },
            payload: Bytes::from(vec![seq as u8; 200]),
        }
    }

    #[test]
    fn protected_packets_decrypt_at_the_subscriber_with_a_transport_sequence() {
        use rtc::shared::marshal::Unmarshal;
        for (profile, salt_len) in [
            (ProtectionProfile::AeadAes128Gcm, 12),
            (ProtectionProfile::Aes128CmHmacSha1_80, 14),
        ] {
            let (mut e, mut rx, _) = pair(profile, salt_len);
            let now = Instant::now();
            for i in 0..3u16 {
                let mut p = media(7, 65_534u16.wrapping_add(i), 1000);
                let wire = e
                    .protect_rtp(now, &mut p, Some(3), 90_000, true, i == 0)
                    .expect("protect");
                let plain = rx.decrypt_rtp(&wire).expect("decrypt");
                let got = rtp::Packet::unmarshal(&mut plain.freeze()).expect("parse");
                assert_eq!(got.header.sequence_number, 65_534u16.wrapping_add(i));
                assert_eq!(
                    got.payload,
                    Bytes::from(vec![got.header.sequence_number as u8; 200])
                );
                let ext = got.header.get_extension(3).expect("twcc extension");
                assert_eq!(&ext[..], &i.to_be_bytes(), "{profile:?}");
            }
        }
    }

    #[test]
    fn nacks_are_answered_and_keyframe_requests_surface() {
        let (mut e, mut rx, mut tx) = pair(ProtectionProfile::AeadAes128Gcm, 12);
        let now = Instant::now();
        for seq in 0..5u16 {
            let mut p = media(7, seq, 3000);
            e.protect_rtp(now, &mut p, Some(3), 90_000, true, seq == 0)
                .expect("protect");
        }
        let nack = TransportLayerNack {
            sender_ssrc: 1,
            media_ssrc: 7,
            nacks: vec![NackPair {
                packet_id: 2,
                lost_packets: 0,
            }],
        };
        let pli = PictureLossIndication {
            sender_ssrc: 1,
            media_ssrc: 7,
        };
        let remb = rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate {
            sender_ssrc: 1,
            bitrate: 800_000.0,
            ssrcs: vec![7],
        };
        let compound: Vec<Box<dyn rtcp::Packet>> =
            vec![Box::new(nack), Box::new(pli), Box::new(remb)];
        let plain = rtcp::packet::marshal(&compound).expect("marshal");
        let wire = tx.encrypt_rtcp(&plain).expect("encrypt");
        let fb = e
            .on_rtcp(now + Duration::from_millis(30), &wire)
            .expect("rtcp");
        assert_eq!(fb.keyframes, vec![7]);
        // REMB is the fallback estimate while no TWCC feedback has come.
        assert_eq!(e.estimate().twcc(), None);
        assert_eq!(e.estimate().available(now), Some(800_000));
        assert_eq!(fb.retransmissions.len(), 1);
        let again = rx.decrypt_rtp(&fb.retransmissions[0]).expect("decrypt");
        use rtc::shared::marshal::Unmarshal;
        let got = rtp::Packet::unmarshal(&mut again.freeze()).expect("parse");
        assert_eq!(got.header.sequence_number, 2);
        // The retransmission got the next transport-wide sequence number.
        let ext = got.header.get_extension(3).expect("twcc");
        assert_eq!(&ext[..], &5u16.to_be_bytes());
        // A replayed datagram is rejected, and so is garbage.
        assert!(e.on_rtcp(now, &wire).is_err());
        assert!(e.on_rtcp(now, &[0x81, 200, 0, 1, 0, 0, 0, 1]).is_err());
        assert_eq!(e.stats().rtcp_rejected, 2);
    }

    #[test]
    fn sender_reports_count_what_was_sent() {
        let (mut e, mut rx, _) = pair(ProtectionProfile::AeadAes128Gcm, 12);
        let t0 = Instant::now();
        assert!(e.sender_reports(t0, SystemTime::now()).is_none());
        for seq in 0..4u16 {
            let mut p = media(9, seq, 48_000 * u32::from(seq));
            e.protect_rtp(t0, &mut p, None, 48_000, false, false)
                .expect("protect");
        }
        let wire = e
            .sender_reports(t0 + Duration::from_millis(500), SystemTime::now())
            .expect("report");
        let plain = rx.decrypt_rtcp(&wire).expect("decrypt");
        let packets = rtcp::packet::unmarshal(&mut plain.freeze()).expect("parse");
        let sr = packets[0]
            .as_any()
            .downcast_ref::<SenderReport>()
            .expect("SR");
        assert_eq!(sr.ssrc, 9);
        assert_eq!(sr.packet_count, 4);
        assert_eq!(sr.octet_count, 800);
        // Extrapolated half a second past the last packet.
        assert_eq!(sr.rtp_time, 48_000 * 3 + 24_000);
    }

    #[test]
    fn twcc_log_reports_like_rtcs_history() {
        use rtc::interceptor::History;
        let t0 = Instant::now();
        let mut ours = TwccLog::default();
        let mut theirs = History::new();
        // 3000 packets (the sequence number wraps the ring several times), fed back in batches
        // of 10 with every 7th lost; one batch is never fed back at all.
        for batch in 0..300u64 {
            for i in 0..10u64 {
                let n = batch * 10 + i;
                let at = t0 + Duration::from_millis(n);
                let seq = ours.add(5, n as u16, 1_000 + i as usize, at);
                assert_eq!(seq, n as u16);
                theirs.add_outgoing(5, n as u16, true, seq, 1_000 + i as usize, at);
            }
            if batch == 100 {
                continue;
            }
            for i in 0..10u64 {
                let n = batch * 10 + i;
                let ack = if n % 7 == 0 {
                    Acknowledgement::lost(n as u16)
                } else {
                    Acknowledgement::received(
                        n as u16,
                        Some(Duration::from_millis(n + 20)),
                        Ecn::NotEct,
                    )
                };
                ours.on_ack(&ack);
                theirs.on_twcc_feedback(t0, ack);
            }
            assert_eq!(ours.take_reports(), theirs.take_reports(), "batch {batch}");
        }
        // Unknown or forgotten numbers change nothing.
        ours.on_ack(&Acknowledgement::received(60_000, None, Ecn::NotEct));
        assert!(ours.take_reports().is_empty());
    }

    #[test]
    fn ntp_and_rtcp_helpers() {
        let t = UNIX_EPOCH + Duration::from_millis(1_500);
        assert_eq!(ntp_time(t) >> 32, NTP_UNIX_OFFSET + 1);
        assert_eq!(ntp_time(t) & 0xffff_ffff, 1 << 31);
        assert!(is_rtcp(&[0x81, 201, 0, 7, 0, 0, 0, 1]));
        assert!(!is_rtcp(&[0x80, 96, 0, 7, 0, 0, 0, 1]));
        assert!(!is_rtcp(&[0x16, 0xfe, 0xfd, 0, 0, 0, 0, 0]));
        let t0 = Instant::now();
        assert_eq!(
            rtp_time_at(u32::MAX, t0, t0 + Duration::from_millis(10), 90_000),
            899
        );
    }
}
