//! The subscriber fast path: what leaves on a subscriber connection, and the RTCP that comes
//! back, without `rtc`'s per-connection pipeline.
//!
//! # Why
//!
//! Forwarding a packet through `rtc` (`RTCRtpSender::write_rtp`, then `poll_write`) costs
//! ≈ 20 µs of CPU per packet and subscriber: `write_rtp` rebuilds the sender's parameters for
//! every packet, and the packet then walks every handler of the connection and its interceptor
//! chain (measured in bench/results/2026-11-22-65f861b-analysis.md). An SFU sends each packet once per
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
//! Both directions avoid per-packet and per-feedback allocations where they can. Outgoing
//! RTP is written once, straight into the datagram handed to the driver
//! ([`write_rtp_header`] with the transport-wide sequence number, then the payload), and
//! sealed there in place by [`RtpSealer`] with the crypto provider `rtc` uses (one allocation
//! and one payload copy per packet and subscriber; the packet's own header is left alone).
//! The subscriber's RTCP is read in place ([`rtcp_packets`], [`parse_twcc`], [`parse_nack`],
//! …) into reused buffers instead of `rtc`'s boxed packets, and a packet it cannot read is
//! skipped, not the whole compound. What remains is `rtc`'s: SRTCP (sender reports out,
//! feedback in) returns a freshly allocated buffer.
//!
//! `rtc` keeps everything else of the connection: ICE, DTLS, SDP negotiation and the data
//! channels (SCTP). It no longer sends or receives any RTP or RTCP on a subscriber connection,
//! so no SRTP context is ever used by both for the same SSRC.
//!
//! [`SettingEngineBuilder::with_crypto_provider`]: rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder::with_crypto_provider

use super::bwe::{Bwe, Estimate};
use super::nack::{self, NackStats, Retransmitter, RtxOrigins, RtxStream};
use super::probe::{Outcome, ProbeStats, Prober};
use bytes::{Bytes, BytesMut};
use rtc::crypto::{
    AeadAlgorithm, AeadCipher, BlockCipherAlgorithm, CbcAlgorithm, CbcCipher, CryptoAlgorithm,
    CryptoError, HashAlgorithm, HmacAlgorithm, KeyExchangeAlgorithm, Mac, PublicKey, RTCCrypto,
    RTCCryptoProvider, RTCRandom, SignatureScheme, SigningKey, StreamCipher, StreamCipherAlgorithm,
};
use rtc::interceptor::{Acknowledgement, BandwidthEstimator, PacketReport};
use rtc::rtcp;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtcp::transport_feedbacks::cc_feedback_report::Ecn;
use rtc::rtp;
use rtc::shared::marshal::{Marshal, MarshalSize};
use rtc::srtp::context::Context;
use rtc::srtp::option::{srtcp_replay_protection, srtp_replay_protection};
use rtc::srtp::protection_profile::ProtectionProfile;
// `rtc`'s crypto-provider hook takes a provider shared across threads: `KeyCapture` is one,
// touched only while a DTLS handshake completes, never on the packet path.
#[allow(clippy::disallowed_types)]
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
/// Labels of the SRTP encryption key and salt (RFC 3711 §4.3.1).
const LABEL_SRTP_ENCRYPTION: u8 = 0x00;
const LABEL_SRTP_SALT: u8 = 0x02;
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
    /// The SRTP contexts for both directions: the local one (what this side encrypts) and the
    /// remote one (what it decrypts, with replay protection). Errors are `rtc`'s, as text.
    pub fn contexts(&self) -> Result<(Context, Context), String> {
        let crypto = rtc::crypto::default_provider().map_err(|e| e.to_string())?;
        let local = Context::new(
            &self.local_key,
            &self.local_salt,
            self.profile,
            None,
            None,
            crypto.crypto(),
        )
        .map_err(|e| e.to_string())?;
        let remote = Context::new(
            &self.remote_key,
            &self.remote_salt,
            self.profile,
            Some(srtp_replay_protection(REPLAY_WINDOW)),
            Some(srtcp_replay_protection(REPLAY_WINDOW)),
            crypto.crypto(),
        )
        .map_err(|e| e.to_string())?;
        Ok((local, remote))
    }

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
#[allow(clippy::disallowed_types)] // see the `use` above: the handshake's, not the packet path's
pub struct KeyCapture {
    inner: Arc<Inner>,
}

#[allow(clippy::disallowed_types)]
struct Inner {
    provider: Arc<dyn RTCCryptoProvider>,
    /// Touched only while a DTLS handshake completes, never on the packet path.
    blocks: Mutex<Vec<([u8; AES_128], [u8; AES_128])>>,
}

#[allow(clippy::disallowed_types)]
impl KeyCapture {
    /// The provider as `rtc`'s setting engine takes it.
    pub fn shared(&self) -> Arc<dyn RTCCryptoProvider> {
        Arc::new(self.clone())
    }

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

#[allow(clippy::disallowed_types)]
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

#[allow(clippy::disallowed_types)]
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
        let mut out = Vec::new();
        self.take_reports_into(&mut out);
        out
    }

    /// [`Self::take_reports`] into `out` (cleared first), so a reused buffer saves the
    /// allocation.
    pub fn take_reports_into(&mut self, out: &mut Vec<PacketReport>) {
        out.clear();
        let Some(highest) = self.highest_acked else {
            return;
        };
        // Older ones have been overwritten.
        let from = self
            .next_to_report
            .max((highest + 1).saturating_sub(TWCC_LOG as u64));
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
    /// SRTP rollover counter of the stream (what [`RtpSealer`] encrypts under).
    roc: Roc,
}

/// How an outgoing media packet is sent (see [`Egress::protect_rtp`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outgoing {
    /// The transport-wide sequence number's header extension id, where negotiated.
    pub twcc_id: Option<u8>,
    /// The track's RTP clock rate (for sender reports).
    pub clock_rate: u32,
    /// Video packets are kept for retransmission.
    pub video: bool,
    pub keyframe: bool,
}

impl Outgoing {
    /// A video packet (RTP video clocks run at 90 kHz).
    pub fn video(twcc_id: Option<u8>, keyframe: bool) -> Self {
        Outgoing {
            twcc_id,
            clock_rate: 90_000,
            video: true,
            keyframe,
        }
    }
}

/// Counters of one [`Egress`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EgressStats {
    pub nack: NackStats,
    pub rtcp_in: u64,
    pub rtcp_rejected: u64,
    /// Packets of decrypted compounds that were malformed and skipped.
    pub rtcp_malformed: u64,
    pub twcc_feedback: u64,
    /// Of the retransmissions sent (`nack.resent`), those sent on an RTX stream.
    pub rtx_resent: u64,
}

impl std::ops::AddAssign for EgressStats {
    fn add_assign(&mut self, o: Self) {
        self.nack.requested += o.nack.requested;
        self.nack.resent += o.nack.resent;
        self.nack.refused += o.nack.refused;
        self.nack.over_budget += o.nack.over_budget;
        self.nack.unrepairable += o.nack.unrepairable;
        self.rtcp_in += o.rtcp_in;
        self.rtcp_rejected += o.rtcp_rejected;
        self.rtcp_malformed += o.rtcp_malformed;
        self.twcc_feedback += o.twcc_feedback;
        self.rtx_resent += o.rtx_resent;
    }
}

/// An RTX stream and the SRTP rollover counter it is sealed under.
struct RtxState {
    stream: RtxStream,
    roc: Roc,
    /// The media packets its recent retransmissions carried (for the feedback on them).
    origins: RtxOrigins,
}

/// One subscriber connection's media out and feedback in (see the module docs).
pub struct Egress {
    /// SRTCP of what we send (sender reports); SRTP too for a profile [`RtpSealer`] does not
    /// handle itself.
    local: Context,
    /// SRTP of what we send, sealed in place into the outgoing datagram.
    sealer: RtpSealer,
    remote: Context,
    profile: ProtectionProfile,
    twcc: TwccLog,
    bwe: Bwe,
    /// The estimator's target and the last REMB.
    estimate: Estimate,
    retransmit: Retransmitter,
    sent: SsrcMap<SentStream>,
    /// RTX streams (RFC 4588) by the media SSRC they repair: retransmissions of a media
    /// stream with one go on it; without, on the media SSRC itself.
    rtx: SsrcMap<RtxState>,
    stats: EgressStats,
    /// Acknowledgements of the transport-cc feedback being read (reused).
    acks: Vec<Acknowledgement>,
    /// Reports handed to the estimator (reused).
    reports: Vec<PacketReport>,
    /// Bandwidth probing with padding (see [`super::probe`]).
    probe: Prober,
}

/// What the subscriber's RTCP asked of the core (the egress handles NACK and TWCC itself).
#[derive(Debug, Default)]
pub struct Feedback {
    /// Media SSRCs (our down-tracks) the subscriber asked a keyframe for (PLI/FIR).
    pub keyframes: Vec<u32>,
    /// NACKs, per media SSRC, with the sequence numbers reported lost (after a layer switch
    /// they tell the core the switch's keyframe was lost).
    pub lost: Vec<(u32, Vec<u16>)>,
    /// Media SSRCs (our down-tracks) with a NACKed packet the responder gave up on
    /// ([`nack::NackAnswer::unrepairable`]): the subscriber needs a keyframe, as if it had
    /// sent a PLI.
    pub unrepairable: Vec<u32>,
    /// TWCC feedback arrived (the estimate may have changed).
    pub estimate_updated: bool,
    /// Retransmissions to send, encrypted.
    pub retransmissions: Vec<BytesMut>,
}

impl Egress {
    /// The fast path of a connection whose DTLS handshake gave `keys`.
    pub fn new(keys: &SrtpKeys) -> Result<Self, EgressError> {
        let (local, remote) = keys.contexts().map_err(EgressError::Srtp)?;
        let sealer = RtpSealer::new(keys)?;
        Ok(Egress {
            local,
            sealer,
            remote,
            profile: keys.profile,
            twcc: TwccLog::default(),
            bwe: Bwe::new(),
            estimate: Estimate::default(),
            retransmit: Retransmitter::new(),
            sent: SsrcMap::default(),
            rtx: SsrcMap::default(),
            stats: EgressStats::default(),
            acks: Vec::new(),
            reports: Vec::new(),
            probe: Prober::new(),
        })
    }

    /// Tell the NACK responder which of the packets in the reports just taken arrived (a
    /// retransmission on an RTX stream counts for the media packet it carried), so that it
    /// never gives up on a packet the subscriber has.
    fn note_delivered(&mut self) {
        for r in self.reports.iter().filter(|r| r.arrived) {
            let seq = r.rtp_sequence_number;
            if self.sent.contains_key(&r.ssrc) {
                self.retransmit.on_delivered(r.ssrc, seq);
            } else if let Some((&media, osn)) = self
                .rtx
                .iter()
                .find(|(_, x)| x.stream.ssrc == r.ssrc)
                .and_then(|(m, x)| Some((m, x.origins.osn(seq)?)))
            {
                self.retransmit.on_delivered(media, osn);
            }
        }
    }

    /// The subscriber's downlink estimate.
    pub fn estimate(&self) -> &Estimate {
        &self.estimate
    }

    /// Packets the subscriber's transport-wide feedback reported so far, and how many of
    /// them were lost (the downlink's loss, retransmissions included).
    pub fn loss_totals(&self) -> (u64, u64) {
        self.bwe.loss_totals()
    }

    pub fn stats(&self) -> EgressStats {
        EgressStats {
            nack: self.retransmit.stats(),
            ..self.stats
        }
    }

    /// Protect one outgoing media packet (already rewritten for this subscriber) into `buf`
    /// (emptied first; a buffer an earlier datagram was sent from, so that a fan-out does not
    /// allocate one per copy): add the transport-wide sequence number when `out.twcc_id` is
    /// negotiated, remember it for NACKs (video) and sender reports, encrypt. The packet
    /// itself is not changed (its header extensions are not written into it: the datagram
    /// carries only the transport-wide sequence number).
    pub fn protect_rtp(
        &mut self,
        now: Instant,
        packet: &mut rtp::Packet,
        out: Outgoing,
        buf: BytesMut,
    ) -> Result<BytesMut, EgressError> {
        let Outgoing {
            twcc_id,
            clock_rate,
            video,
            keyframe,
        } = out;
        self.retransmit.on_sent(now, packet, video, keyframe);
        let size = packet.payload.len();
        let s = self.sent.entry(packet.header.ssrc).or_insert(SentStream {
            clock_rate,
            twcc_id,
            packets: 0,
            octets: 0,
            last_ts: packet.header.timestamp,
            last_at: now,
            roc: Roc::default(),
        });
        s.packets = s.packets.wrapping_add(1);
        s.octets = s.octets.wrapping_add(size as u32);
        s.last_ts = packet.header.timestamp;
        s.last_at = now;
        s.twcc_id = twcc_id;
        seal(
            &mut self.sealer,
            &mut self.local,
            &mut self.twcc,
            &mut s.roc,
            now,
            packet,
            twcc_id,
            buf,
        )
    }

    /// Decrypt and handle one SRTCP datagram from the subscriber: receiver reports are
    /// ignored; transport-cc feeds the estimator, NACKs are answered, PLI/FIR/REMB surface;
    /// anything else, or malformed, is skipped (counted in [`EgressStats::rtcp_malformed`]),
    /// never an error for the rest of the compound. Only a datagram that does not decrypt is
    /// an error.
    pub fn on_rtcp(&mut self, now: Instant, data: &[u8]) -> Result<Feedback, EgressError> {
        if !srtcp_encrypted(data, self.profile) {
            self.stats.rtcp_rejected += 1;
            return Err(EgressError::Srtp("SRTCP without the E flag".into()));
        }
        let plain = match self.remote.decrypt_rtcp(data) {
            Ok(p) => p,
            Err(e) => {
                self.stats.rtcp_rejected += 1;
                return Err(EgressError::Srtp(e.to_string()));
            }
        };
        self.stats.rtcp_in += 1;
        let mut fb = Feedback::default();
        for p in rtcp_packets(&plain) {
            let handled = match p {
                Ok(p) => self.on_rtcp_packet(now, p, &mut fb),
                Err(e) => Err(e),
            };
            if let Err(e) = handled {
                self.stats.rtcp_malformed += 1;
                tracing::trace!("subscriber RTCP packet skipped: {e}");
            }
        }
        Ok(fb)
    }

    fn on_rtcp_packet(
        &mut self,
        now: Instant,
        p: RtcpPacket<'_>,
        fb: &mut Feedback,
    ) -> Result<(), RtcpError> {
        match (p.pt, p.fmt) {
            (PT_RTPFB, FMT_TWCC) => {
                parse_twcc(p.body, &mut self.acks)?;
                self.stats.twcc_feedback += 1;
                for ack in &self.acks {
                    self.twcc.on_ack(ack);
                }
                self.twcc.take_reports_into(&mut self.reports);
                self.note_delivered();
                if !self.reports.is_empty() {
                    self.bwe.on_reports(now, &self.reports);
                    self.on_probe_feedback(now);
                    self.estimate.set_twcc(self.bwe.target_bitrate());
                    fb.estimate_updated = true;
                }
                // A feedback may claim up to 65 535 packets: do not keep that much around.
                if self.acks.capacity() > TWCC_LOG {
                    self.acks = Vec::new();
                }
            }
            (PT_RTPFB, FMT_NACK) => {
                let mut lost = Vec::new();
                let media_ssrc = parse_nack(p.body, &mut lost)?;
                // What the link delivers counts when the estimate is below it (random loss).
                let capacity = nack::capacity_bps(
                    self.estimate.available(now),
                    self.bwe.acked_bps().map(|bps| bps as u64),
                );
                let answer = self.retransmit.on_nack(now, media_ssrc, &lost, capacity);
                if answer.unrepairable {
                    fb.unrepairable.push(media_ssrc);
                }
                for packet in answer.packets {
                    // A retransmission carries a new transport-wide sequence number: the
                    // receiver reports its arrival like any other packet.
                    // (A stream is forgotten by both at once: a packet in the history has one.)
                    let Some(s) = self.sent.get_mut(&packet.header.ssrc) else {
                        continue;
                    };
                    // On the RTX stream when the subscriber negotiated one (RFC 4588), else
                    // as the original packet again.
                    let rtx = self.rtx.get_mut(&packet.header.ssrc);
                    let on_rtx = rtx.is_some();
                    let sealed = match rtx {
                        Some(r) => {
                            let wrapped = r.stream.wrap(&packet);
                            r.origins.record(
                                wrapped.header.sequence_number,
                                packet.header.sequence_number,
                            );
                            seal(
                                &mut self.sealer,
                                &mut self.local,
                                &mut self.twcc,
                                &mut r.roc,
                                now,
                                &wrapped,
                                s.twcc_id,
                                BytesMut::new(),
                            )
                        }
                        None => seal(
                            &mut self.sealer,
                            &mut self.local,
                            &mut self.twcc,
                            &mut s.roc,
                            now,
                            &packet,
                            s.twcc_id,
                            BytesMut::new(),
                        ),
                    };
                    match sealed {
                        Ok(b) => {
                            self.stats.rtx_resent += u64::from(on_rtx);
                            fb.retransmissions.push(b);
                        }
                        Err(e) => tracing::trace!("retransmission: {e}"),
                    }
                }
                fb.lost.push((media_ssrc, lost));
            }
            (PT_PSFB, FMT_PLI) => fb.keyframes.push(feedback_media_ssrc(p.body)?),
            (PT_PSFB, FMT_FIR) => parse_fir(p.body, &mut fb.keyframes)?,
            (PT_PSFB, FMT_REMB) => {
                if let Some(bps) = parse_remb(p.body)? {
                    self.estimate.set_remb(now, bps);
                }
            }
            // Receiver reports, SDES, BYE, XR and the rest: nothing to do.
            _ => {}
        }
        Ok(())
    }

    /// A down-track is gone: forget its stream.
    pub fn remove_stream(&mut self, ssrc: u32) {
        self.retransmit.remove_stream(ssrc);
        self.sent.remove(&ssrc);
        self.rtx.remove(&ssrc);
    }

    /// The RTX stream negotiated for the media stream `media_ssrc` (its SSRC and payload
    /// type), or none: retransmissions of it then go on the media SSRC. Setting the same
    /// stream again keeps its numbering.
    pub fn set_rtx(&mut self, media_ssrc: u32, rtx: Option<(u32, u8)>) {
        match rtx {
            None => {
                self.rtx.remove(&media_ssrc);
            }
            Some((ssrc, payload_type)) => {
                let same = self.rtx.get(&media_ssrc).is_some_and(|r| {
                    r.stream.ssrc == ssrc && r.stream.payload_type == payload_type
                });
                if !same {
                    self.rtx.insert(
                        media_ssrc,
                        RtxState {
                            stream: RtxStream::new(ssrc, payload_type),
                            roc: Roc::default(),
                            origins: RtxOrigins::default(),
                        },
                    );
                }
            }
        }
    }

    /// Whether retransmissions of `media_ssrc` go on an RTX stream.
    pub fn has_rtx(&self, media_ssrc: u32) -> bool {
        self.rtx.contains_key(&media_ssrc)
    }

    /// A padding-only packet of `size` bytes (1..=255) on the RTX stream of `media_ssrc`,
    /// encrypted, with a transport-wide sequence number (so the subscriber's feedback reports
    /// it): what a bandwidth probe sends, as libwebrtc probes. `None` when the stream has no
    /// RTX stream or has sent nothing yet (its timestamp follows the media's).
    pub fn rtx_padding(
        &mut self,
        now: Instant,
        media_ssrc: u32,
        size: usize,
    ) -> Option<Result<BytesMut, EgressError>> {
        let s = self.sent.get(&media_ssrc)?;
        let r = self.rtx.get_mut(&media_ssrc)?;
        let ts = rtp_time_at(s.last_ts, s.last_at, now, s.clock_rate);
        let packet = r.stream.padding(ts, size);
        Some(seal_padding(
            &mut self.sealer,
            &mut self.local,
            &mut self.twcc,
            &mut r.roc,
            now,
            &packet,
            s.twcc_id,
        ))
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

/// Bandwidth probing ([`super::probe`]): the prober sees this connection's transport-wide
/// sequence numbers and feedback; padding-only packets go out like media.
impl Egress {
    /// Start a probe cluster that must show `need_bps` delivered while the media runs at
    /// `media_bps`. Returns whether it started (none running, backoff over, the link not
    /// congested lately).
    pub fn start_probe(&mut self, now: Instant, need_bps: u64, media_bps: u64) -> bool {
        if self.bwe.congested(now, super::probe::QUIET_AFTER_DECREASE) {
            return false;
        }
        self.probe
            .start(now, need_bps, media_bps, self.twcc.next_id)
    }

    /// Whether a probe cluster is sending padding.
    pub fn probing(&self) -> bool {
        self.probe.sending()
    }

    /// Whether a probe cluster is running or awaiting its feedback.
    pub fn probe_busy(&self) -> bool {
        self.probe.busy()
    }

    /// Padding bytes due now (after a frame) to pace the cluster for the next `ahead`.
    pub fn padding_due(&mut self, now: Instant, ahead: Duration) -> usize {
        self.probe.padding_due(now, ahead, self.twcc.next_id)
    }

    /// The padding [`Self::padding_due`] asked for went out.
    pub fn padding_sent(&mut self) {
        self.probe.burst_sent(self.twcc.next_id);
    }

    /// Decide a cluster whose feedback never came; then the last outcome, once.
    pub fn poll_probe(&mut self, now: Instant) -> Option<Outcome> {
        self.probe.poll(now, self.twcc.next_id);
        self.probe.take_outcome()
    }

    pub fn probe_stats(&self) -> ProbeStats {
        self.probe.stats()
    }

    fn on_probe_feedback(&mut self, now: Instant) {
        let overuse = self.bwe.overuse();
        let next = self.twcc.next_id;
        if let Some(Outcome::Success { bps }) =
            self.probe.on_reports(now, &self.reports, overuse, next)
        {
            self.bwe.on_probe_success(now, bps);
        }
    }

    /// One padding-only RTP packet on stream `ssrc` (which must have sent media: its SRTP
    /// rollover state is the media's): header `seq`/`timestamp`/`payload_type`, the P bit,
    /// `padding` bytes of payload (1..=255) whose last byte is their count, and the
    /// transport-wide sequence number when `twcc_id` is set. Encrypted like media; not kept
    /// for retransmission nor counted in sender reports.
    pub fn protect_padding(
        &mut self,
        now: Instant,
        header: &rtp::header::Header,
        padding: usize,
        twcc_id: Option<u8>,
    ) -> Result<BytesMut, EgressError> {
        let padding = padding.clamp(1, super::probe::MAX_PADDING);
        let Some(s) = self.sent.get_mut(&header.ssrc) else {
            return Err(EgressError::Encoding(
                "padding on a stream that sent nothing".into(),
            ));
        };
        let mut h = header.clone();
        h.padding = false;
        h.marker = false;
        h.csrc.clear();
        let header_len = 12 + if twcc_id.is_some() { 8 } else { 0 };
        let size = header_len + padding;
        let twcc = twcc_id.map(|id| (id, self.twcc.add(h.ssrc, h.sequence_number, size, now)));
        let mut buf = BytesMut::with_capacity(size + self.sealer.tag_len());
        if !write_rtp_header(&h, twcc, &mut buf) {
            return Err(EgressError::Encoding("padding header".into()));
        }
        buf[0] |= 0x20;
        buf.resize(size, 0);
        buf[size - 1] = padding as u8;
        self.probe.on_padding_sent(padding);
        self.sealer.seal(
            &mut self.local,
            &mut s.roc,
            h.ssrc,
            h.sequence_number,
            header_len,
            buf,
        )
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

// ---- SRTP of what the egress sends, sealed in place ---------------------------------------
//
// `rtc`'s `Context::encrypt_rtp_with_header` takes the marshalled packet and copies it into a
// fresh buffer before encrypting (two copies of the payload per subscriber), looks the SSRC's
// rollover state up in a SipHash map twice, and needs an `rtp::Header` whose extension list
// holds the transport-wide sequence number (an allocation per packet). The egress instead
// writes the header and the payload once, straight into the datagram it hands to the driver,
// encrypts that in place with the same crypto provider (`ring`: AES-NI/VAES and CLMUL chosen at
// run time), and appends the tag; the rollover counter lives with the stream's other
// per-packet state. Tested below against `rtc`'s SRTP: what is sealed here decrypts with the
// subscriber's `Context`, across a sequence-number wrap and for retransmissions.

/// A map keyed by SSRC (server-chosen, random): a hash cheaper than SipHash on the packet path.
pub type SsrcMap<V> = rustc_hash::FxHashMap<u32, V>;

/// The SRTP rollover counter of one sent stream (RFC 3711 §3.3.1), kept exactly as `rtc`'s
/// `SrtpSsrcState` keeps it, so a retransmission of a packet from before a sequence-number
/// wrap is sealed under the counter it was first sent with.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Roc {
    /// Highest (extended) index sealed: rollover counter × 2^16 + sequence number.
    index: u64,
    started: bool,
}

impl Roc {
    const SEQ_MEDIAN: u16 = 1 << 15;

    /// The rollover counter for `seq`, and the index step to record once it is sealed;
    /// `None` when the counter would wrap (2^48 packets under one key: the key is spent).
    pub fn guess(&self, seq: u16) -> Option<(u32, i64)> {
        let local_roc = (self.index >> 16) as u32;
        let local_seq = self.index as u16;
        let mut roc = local_roc;
        let diff = if !self.started {
            0
        } else {
            let d = i64::from(seq) - i64::from(local_seq);
            if self.index <= u64::from(Self::SEQ_MEDIAN) {
                d
            } else if local_seq < Self::SEQ_MEDIAN {
                if d > i64::from(Self::SEQ_MEDIAN) {
                    roc = local_roc.wrapping_sub(1);
                    d - 65_536
                } else {
                    d
                }
            } else if local_seq - Self::SEQ_MEDIAN > seq {
                roc = local_roc.wrapping_add(1);
                d + 65_536
            } else {
                d
            }
        };
        (!(roc == 0 && local_roc == u32::MAX)).then_some((roc, diff))
    }

    /// `seq` was sealed with the step [`Self::guess`] gave.
    pub fn update(&mut self, seq: u16, diff: i64) {
        if self.started {
            self.index = self.index.wrapping_add_signed(diff);
        } else {
            self.index |= u64::from(seq);
            self.started = true;
        }
    }
}

/// The SRTP transform of outgoing RTP for the connection's profile.
pub enum RtpSealer {
    /// AEAD_AES_128_GCM (RFC 7714): what webrtc-rs peers (and Firefox) negotiate.
    Gcm {
        aead: Box<dyn AeadCipher>,
        salt: [u8; 12],
    },
    /// AES_CM_128_HMAC_SHA1_80 (RFC 3711): what Chromium negotiates unless offered GCM only.
    CmHmacSha1 {
        ctr: Box<dyn StreamCipher>,
        mac: Box<dyn Mac>,
        salt: [u8; 14],
    },
    /// Any other profile: `rtc`'s context seals the marshalled packet (copying it once more).
    Rtc,
}

/// Tag length of AEAD_AES_128_GCM, and of AES_CM_128_HMAC_SHA1_80 on RTP.
const GCM_TAG: usize = 16;
const HMAC_SHA1_80_TAG: usize = 10;

/// An RFC 3711 §4.3.1 session key (AES-128 counter-mode PRF, key derivation rate 0).
fn derive_session_key(
    crypto: &dyn RTCCrypto,
    master_key: &[u8; AES_128],
    master_salt: &[u8],
    label: u8,
    out: &mut [u8],
) -> Result<(), EgressError> {
    let mut prf_in = [0u8; AES_128];
    let n = master_salt.len().min(14);
    prf_in[..n].copy_from_slice(&master_salt[..n]);
    prf_in[7] ^= label;
    for (i, chunk) in out.chunks_mut(AES_128).enumerate() {
        let mut block = prf_in;
        block[14..].copy_from_slice(&(i as u16).to_be_bytes());
        crypto
            .block_encrypt(BlockCipherAlgorithm::Aes128, master_key, &mut block)
            .map_err(|e| EgressError::Srtp(e.to_string()))?;
        chunk.copy_from_slice(&block[..chunk.len()]);
    }
    Ok(())
}

impl RtpSealer {
    /// The sealer for what this side sends under `keys` (its local key and salt).
    pub fn new(keys: &SrtpKeys) -> Result<Self, EgressError> {
        let srtp = |e: CryptoError| EgressError::Srtp(e.to_string());
        let provider = rtc::crypto::default_provider().map_err(srtp)?;
        let crypto = provider.crypto();
        let Ok(master_key) = <[u8; AES_128]>::try_from(&keys.local_key[..]) else {
            return Ok(RtpSealer::Rtc);
        };
        let salt = &keys.local_salt;
        let derive =
            |label: u8, out: &mut [u8]| derive_session_key(crypto, &master_key, salt, label, out);
        match keys.profile {
            ProtectionProfile::AeadAes128Gcm if salt.len() == 12 => {
                let mut key = [0u8; AES_128];
                derive(LABEL_SRTP_ENCRYPTION, &mut key)?;
                let mut session_salt = [0u8; 12];
                derive(LABEL_SRTP_SALT, &mut session_salt)?;
                let aead = crypto
                    .new_aead(AeadAlgorithm::Aes128Gcm, &key)
                    .map_err(srtp)?;
                if aead.tag_len() != GCM_TAG {
                    return Ok(RtpSealer::Rtc);
                }
                Ok(RtpSealer::Gcm {
                    aead,
                    salt: session_salt,
                })
            }
            ProtectionProfile::Aes128CmHmacSha1_80 if salt.len() == 14 => {
                let mut key = [0u8; AES_128];
                derive(LABEL_SRTP_ENCRYPTION, &mut key)?;
                let mut auth = [0u8; 20];
                derive(LABEL_SRTP_AUTH, &mut auth)?;
                let mut session_salt = [0u8; 14];
                derive(LABEL_SRTP_SALT, &mut session_salt)?;
                let ctr = crypto
                    .new_stream_cipher(StreamCipherAlgorithm::Aes128Ctr, &key)
                    .map_err(srtp)?;
                let mac = crypto.new_hmac(HmacAlgorithm::Sha1, &auth).map_err(srtp)?;
                if mac.output_len() < HMAC_SHA1_80_TAG {
                    return Ok(RtpSealer::Rtc);
                }
                Ok(RtpSealer::CmHmacSha1 {
                    ctr,
                    mac,
                    salt: session_salt,
                })
            }
            _ => Ok(RtpSealer::Rtc),
        }
    }

    /// Bytes the transform appends to a packet (what to reserve; 0 lets `rtc` allocate).
    fn tag_len(&self) -> usize {
        match self {
            RtpSealer::Gcm { .. } => GCM_TAG,
            RtpSealer::CmHmacSha1 { .. } => HMAC_SHA1_80_TAG,
            RtpSealer::Rtc => 0,
        }
    }

    /// Encrypt the marshalled packet in `buf` (its header is `header_len` bytes) in place and
    /// append the tag; `local` is used only by [`RtpSealer::Rtc`].
    fn seal(
        &mut self,
        local: &mut Context,
        roc: &mut Roc,
        ssrc: u32,
        seq: u16,
        header_len: usize,
        mut buf: BytesMut,
    ) -> Result<BytesMut, EgressError> {
        let (counter, diff) = match self {
            RtpSealer::Rtc => {
                // Its own rollover state; parses the header back from the bytes.
                return local
                    .encrypt_rtp(&buf)
                    .map_err(|e| EgressError::Srtp(e.to_string()));
            }
            _ => roc
                .guess(seq)
                .ok_or_else(|| EgressError::Srtp("SRTP rollover counter exhausted".into()))?,
        };
        let err = |e: CryptoError| EgressError::Srtp(e.to_string());
        match self {
            RtpSealer::Gcm { aead, salt } => {
                // RFC 7714 §8.1: 00 00 | SSRC | ROC | SEQ, XOR the session salt.
                let mut iv = [0u8; 12];
                iv[2..6].copy_from_slice(&ssrc.to_be_bytes());
                iv[6..10].copy_from_slice(&counter.to_be_bytes());
                iv[10..12].copy_from_slice(&seq.to_be_bytes());
                for (v, s) in iv.iter_mut().zip(salt.iter()) {
                    *v ^= s;
                }
                let mut tag = [0u8; GCM_TAG];
                let (aad, body) = buf.split_at_mut(header_len);
                aead.seal_in_place(&iv, aad, body, &mut tag).map_err(err)?;
                buf.extend_from_slice(&tag);
            }
            RtpSealer::CmHmacSha1 { ctr, mac, salt } => {
                // RFC 3711 §4.1.1: (salt × 2^16) XOR (SSRC × 2^64) XOR (index × 2^16).
                let mut iv = [0u8; 16];
                iv[4..8].copy_from_slice(&ssrc.to_be_bytes());
                iv[8..12].copy_from_slice(&counter.to_be_bytes());
                iv[12..14].copy_from_slice(&seq.to_be_bytes());
                for (v, s) in iv.iter_mut().zip(salt.iter()) {
                    *v ^= s;
                }
                ctr.apply_keystream(&iv, &mut buf[header_len..])
                    .map_err(err)?;
                // RFC 3711 §4.2: HMAC-SHA1 over the packet and the ROC, truncated.
                let mut full = [0u8; 20];
                let full = &mut full[..mac.output_len().min(20)];
                mac.sign(&[&buf, &counter.to_be_bytes()], full)
                    .map_err(err)?;
                buf.extend_from_slice(&full[..HMAC_SHA1_80_TAG]);
            }
            RtpSealer::Rtc => unreachable!("returned above"),
        }
        roc.update(seq, diff);
        Ok(buf)
    }
}

/// Seal one outgoing packet into `buf` (emptied first, grown as needed): a fresh
/// transport-wide sequence number if `twcc_id` is set, the header written and the payload
/// copied once into the datagram, encrypted in place.
#[allow(clippy::too_many_arguments)]
fn seal(
    sealer: &mut RtpSealer,
    local: &mut Context,
    twcc: &mut TwccLog,
    roc: &mut Roc,
    now: Instant,
    packet: &rtp::Packet,
    twcc_id: Option<u8>,
    mut buf: BytesMut,
) -> Result<BytesMut, EgressError> {
    let h = &packet.header;
    let ext_len = if twcc_id.is_some() { 8 } else { 0 };
    let header_len = 12 + 4 * h.csrc.len() + ext_len;
    let twcc = twcc_id.map(|id| {
        let size = packet.payload.len() + header_len;
        (id, twcc.add(h.ssrc, h.sequence_number, size, now))
    });
    let capacity = header_len + packet.payload.len() + sealer.tag_len();
    buf.clear();
    buf.reserve(capacity);
    let header_len = if write_rtp_header(h, twcc, &mut buf) {
        header_len
    } else {
        // What the writer leaves to `rtc` (RTP padding, an id a one-byte header cannot
        // carry): its marshal, on a copy whose extension list holds the sequence number.
        let mut p = packet.clone();
        let hdr = &mut p.header;
        hdr.extension = false;
        hdr.extensions.clear();
        hdr.extension_profile = 0;
        hdr.extensions_padding = 0;
        if let Some((id, seq)) = twcc {
            hdr.extension = true;
            hdr.extension_profile = rtp::header::EXTENSION_PROFILE_ONE_BYTE;
            hdr.set_extension(id, twcc_seq_bytes(seq))
                .map_err(|e| EgressError::Encoding(e.to_string()))?;
        }
        buf.clear();
        buf.resize(p.marshal_size(), 0);
        p.marshal_to(&mut buf)
            .map_err(|e| EgressError::Encoding(e.to_string()))?;
        buf.reserve(sealer.tag_len());
        p.header.marshal_size()
    };
    buf.extend_from_slice(&packet.payload);
    sealer.seal(local, roc, h.ssrc, h.sequence_number, header_len, buf)
}

/// Seal a padding-only packet (`packet.header.padding` set, its payload the padding itself,
/// as [`RtxStream::padding`] makes it): written as is, with a transport-wide sequence number.
fn seal_padding(
    sealer: &mut RtpSealer,
    local: &mut Context,
    twcc: &mut TwccLog,
    roc: &mut Roc,
    now: Instant,
    packet: &rtp::Packet,
    twcc_id: Option<u8>,
) -> Result<BytesMut, EgressError> {
    let mut h = packet.header.clone();
    h.padding = false;
    let ext_len = if twcc_id.is_some() { 8 } else { 0 };
    let header_len = 12 + 4 * h.csrc.len() + ext_len;
    let size = packet.payload.len() + header_len;
    let twcc = twcc_id.map(|id| (id, twcc.add(h.ssrc, h.sequence_number, size, now)));
    let mut buf = BytesMut::with_capacity(size + sealer.tag_len());
    if !write_rtp_header(&h, twcc, &mut buf) {
        return Err(EgressError::Encoding("padding packet header".into()));
    }
    buf[0] |= 0x20;
    buf.extend_from_slice(&packet.payload);
    sealer.seal(local, roc, h.ssrc, h.sequence_number, header_len, buf)
}

/// Every 16-bit number, big-endian: `Bytes` views of it carry a transport-wide sequence
/// number without allocating.
static TWCC_SEQ_BYTES: [u8; 2 * 65_536] = {
    let mut t = [0u8; 2 * 65_536];
    let mut i = 0;
    while i < 65_536 {
        t[2 * i] = (i >> 8) as u8;
        t[2 * i + 1] = i as u8;
        i += 1;
    }
    t
};

/// `seq` big-endian, as a static `Bytes` (no allocation).
pub fn twcc_seq_bytes(seq: u16) -> Bytes {
    let i = 2 * usize::from(seq);
    Bytes::from_static(&TWCC_SEQ_BYTES[i..i + 2])
}

/// Write `packet` into `out` (cleared first) as `Packet::marshal_to` would, its header
/// extensions replaced by the one-byte-header transport-wide sequence number `twcc` (id,
/// number), or none: the header is written by hand, the payload copied once, nothing
/// zero-filled first. Returns `false`, leaving `out` to the caller, for what it does not
/// handle (RTP padding, a version other than 2).
pub fn marshal_rtp(packet: &rtp::Packet, twcc: Option<(u8, u16)>, out: &mut Vec<u8>) -> bool {
    out.clear();
    if !write_rtp_header(&packet.header, twcc, out) {
        return false;
    }
    out.extend_from_slice(&packet.payload);
    true
}

/// Append the RTP header `h` to `out` as `Header::marshal_to` would, its header extensions
/// replaced by the one-byte-header transport-wide sequence number `twcc` (id, number), or
/// none: 12 bytes, 4 per CSRC, 8 for the extension. Returns `false` and writes nothing for
/// what it does not handle (RTP padding, a version other than 2, an id a one-byte header
/// cannot carry).
pub fn write_rtp_header(
    h: &rtp::header::Header,
    twcc: Option<(u8, u16)>,
    out: &mut impl bytes::BufMut,
) -> bool {
    let id_ok = twcc.is_none_or(|(id, _)| (1..=14).contains(&id));
    if h.padding || h.version != 2 || h.csrc.len() > 15 || !id_ok {
        return false;
    }
    let ext = if twcc.is_some() { 0x10 } else { 0 };
    let mut fixed = [0u8; 12];
    fixed[0] = 0x80 | ext | h.csrc.len() as u8;
    fixed[1] = h.payload_type | if h.marker { 0x80 } else { 0 };
    fixed[2..4].copy_from_slice(&h.sequence_number.to_be_bytes());
    fixed[4..8].copy_from_slice(&h.timestamp.to_be_bytes());
    fixed[8..12].copy_from_slice(&h.ssrc.to_be_bytes());
    out.put_slice(&fixed);
    for c in &h.csrc {
        out.put_slice(&c.to_be_bytes());
    }
    if let Some((id, seq)) = twcc {
        // RFC 8285 one-byte header: profile 0xBEDE, one word of elements: id, length − 1,
        // two bytes, one byte of padding.
        let [hi, lo] = seq.to_be_bytes();
        out.put_slice(&[0xbe, 0xde, 0, 1, id << 4 | 1, hi, lo, 0]);
    }
    true
}

/// Whether a datagram is an (S)RTP media packet: version 2 and not an RTCP packet type.
pub fn is_rtp(data: &[u8]) -> bool {
    data.len() >= 12 && data[0] & 0xC0 == 0x80 && !(192..=223).contains(&data[1])
}

/// Whether an SRTCP datagram has its E flag set (RFC 3711 §3.4): the first bit of the word
/// before the SRTCP authentication tag (AES-CM/HMAC-SHA1: 10 bytes; AES-GCM: none, the
/// index ends the packet). `rtc`'s AES-CM unprotect returns a packet with the flag clear
/// without checking its authentication tag; WebRTC peers always encrypt SRTCP, so such a
/// packet is refused before it gets there.
pub fn srtcp_encrypted(data: &[u8], profile: ProtectionProfile) -> bool {
    let trailer = 4 + profile.rtcp_auth_tag_len();
    data.len() >= 8 + trailer && data[data.len() - trailer] & 0x80 != 0
}

/// Whether a datagram is RTCP (RFC 5761 demultiplexing: version 2, payload type 192–223).
pub fn is_rtcp(data: &[u8]) -> bool {
    data.len() >= 8 && data[0] & 0xC0 == 0x80 && (192..=223).contains(&data[1])
}

// ---- The subscriber's RTCP, read in place -------------------------------------------------
//
// `rtc::rtcp::packet::unmarshal` boxes every packet of a compound and allocates the chunk and
// delta vectors of a transport-cc feedback, and `convert_twcc` a third vector, every ~100 ms
// per subscriber; one malformed packet fails the whole compound. The egress reads the few
// packet types it acts on straight from the decrypted bytes instead (differential-tested
// against `rtc`'s parsers below) and skips everything else.

/// RTCP packet type of transport-layer feedback (RFC 4585): generic NACK, transport-cc.
pub const PT_RTPFB: u8 = 205;
/// RTCP packet type of payload-specific feedback (RFC 4585): PLI, FIR, REMB.
pub const PT_PSFB: u8 = 206;
/// Feedback message types (the header's count field) of the packets the egress reads.
pub const FMT_NACK: u8 = 1;
pub const FMT_TWCC: u8 = 15;
pub const FMT_PLI: u8 = 1;
pub const FMT_FIR: u8 = 4;
pub const FMT_REMB: u8 = 15;
/// Reference time unit of transport-cc feedback.
const TWCC_REFERENCE_TICK: Duration = Duration::from_millis(64);
/// Receive-delta unit of transport-cc feedback, in microseconds.
const TWCC_DELTA_US: u64 = 250;

/// Why (part of) a subscriber's RTCP compound could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RtcpError {
    #[error("RTCP: version is not 2")]
    Version,
    #[error("RTCP: packet longer than the datagram")]
    Length,
    #[error("RTCP: padding longer than the packet")]
    Padding,
    #[error("RTCP: feedback truncated")]
    Truncated,
}

/// One packet of an RTCP compound: the header's count/format field, the packet type and the
/// body (everything after the 4-byte header, padding removed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RtcpPacket<'a> {
    pub fmt: u8,
    pub pt: u8,
    pub body: &'a [u8],
}

/// The packets of an RTCP compound, in order, without copying. A packet with bad padding is
/// an error for that packet only; a bad header or length ends the walk (what follows cannot
/// be found) with an error.
pub fn rtcp_packets(data: &[u8]) -> RtcpPackets<'_> {
    RtcpPackets { rest: data }
}

/// Iterator of [`rtcp_packets`].
pub struct RtcpPackets<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for RtcpPackets<'a> {
    type Item = Result<RtcpPacket<'a>, RtcpError>;

    fn next(&mut self) -> Option<Self::Item> {
        let data = self.rest;
        let &[b0, pt, l0, l1, ..] = data else {
            self.rest = &[];
            return (!data.is_empty()).then_some(Err(RtcpError::Length));
        };
        if b0 >> 6 != 2 {
            self.rest = &[];
            return Some(Err(RtcpError::Version));
        }
        let len = 4 * (usize::from(u16::from_be_bytes([l0, l1])) + 1);
        let Some((packet, rest)) = data.split_at_checked(len) else {
            self.rest = &[];
            return Some(Err(RtcpError::Length));
        };
        self.rest = rest;
        let mut body = &packet[4..];
        if b0 & 0x20 != 0 {
            let pad = body.last().map_or(0, |&p| usize::from(p));
            if pad == 0 || pad > body.len() {
                return Some(Err(RtcpError::Padding));
            }
            body = &body[..body.len() - pad];
        }
        Some(Ok(RtcpPacket {
            fmt: b0 & 0x1f,
            pt,
            body,
        }))
    }
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    let b = b.get(at..at + 4)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    let b = b.get(at..at + 2)?;
    Some(u16::from_be_bytes([b[0], b[1]]))
}

/// The media SSRC of a feedback body (PLI, NACK): the second word.
pub fn feedback_media_ssrc(body: &[u8]) -> Result<u32, RtcpError> {
    be_u32(body, 4).ok_or(RtcpError::Truncated)
}

/// The sequence numbers a generic NACK body (RFC 4585 §6.2.1) reports lost, appended to
/// `out` in the order [`super::nack::nack_seqs`] gives them; returns the media SSRC.
pub fn parse_nack(body: &[u8], out: &mut Vec<u16>) -> Result<u32, RtcpError> {
    let media_ssrc = feedback_media_ssrc(body)?;
    for pair in body[8..].chunks_exact(4) {
        let pid = u16::from_be_bytes([pair[0], pair[1]]);
        let blp = u16::from_be_bytes([pair[2], pair[3]]);
        out.push(pid);
        out.extend(
            (0..16u16)
                .filter(|i| blp & (1 << i) != 0)
                .map(|i| pid.wrapping_add(i + 1)),
        );
    }
    Ok(media_ssrc)
}

/// The SSRCs a FIR body (RFC 5104 §4.3.1) asks keyframes of, appended to `out`.
pub fn parse_fir(body: &[u8], out: &mut Vec<u32>) -> Result<(), RtcpError> {
    let entries = body.get(8..).ok_or(RtcpError::Truncated)?;
    out.extend(
        entries
            .chunks_exact(8)
            .map(|e| u32::from_be_bytes([e[0], e[1], e[2], e[3]])),
    );
    Ok(())
}

/// The bitrate of a REMB body (draft-alvestrand-rmcat-remb), bits per second; `None` for
/// another application-layer feedback (no "REMB" identifier).
pub fn parse_remb(body: &[u8]) -> Result<Option<u64>, RtcpError> {
    let fields = body.get(8..16).ok_or(RtcpError::Truncated)?;
    if &fields[..4] != b"REMB" {
        return Ok(None);
    }
    let exp = u32::from(fields[5] >> 2);
    let mantissa =
        u128::from(fields[5] & 3) << 16 | u128::from(fields[6]) << 8 | u128::from(fields[7]);
    // At most 18 + 63 bits: saturate rather than wrap.
    Ok(Some(u64::try_from(mantissa << exp).unwrap_or(u64::MAX)))
}

/// Read a transport-cc feedback body (draft-holmer-rmcat-transport-wide-cc-extensions-01
/// §3.1) into `out` (cleared first): one acknowledgement per reported packet, in order, with
/// its arrival time on the receiver's clock, exactly as `rtc`'s `TransportLayerCc` unmarshal
/// followed by `convert_twcc` gives them — except that nothing past the packet status count
/// is reported (`rtc` also reports the unused tail of the last chunk) and a feedback without
/// any receive delta is accepted. Nothing is allocated once `out` has grown. A truncated
/// feedback is an error and leaves `out` empty.
pub fn parse_twcc(body: &[u8], out: &mut Vec<Acknowledgement>) -> Result<(), RtcpError> {
    out.clear();
    let r = read_twcc(body, out);
    if r.is_err() {
        out.clear();
    }
    r
}

fn read_twcc(body: &[u8], out: &mut Vec<Acknowledgement>) -> Result<(), RtcpError> {
    let (Some(base), Some(count), Some(reference)) =
        (be_u16(body, 8), be_u16(body, 10), be_u32(body, 12))
    else {
        return Err(RtcpError::Truncated);
    };
    // 24-bit reference time, then the feedback packet count.
    let reference = reference >> 8;
    let count = usize::from(count);
    const CHUNKS: usize = 16;
    // Each chunk: (first byte, second byte); the status of `n` more packets.
    let chunk = |at: usize| -> Result<(u8, u8), RtcpError> {
        match body.get(at..at + 2) {
            Some(&[a, b]) => Ok((a, b)),
            _ => Err(RtcpError::Truncated),
        }
    };
    let covers = |(a, b): (u8, u8)| -> usize {
        if a & 0x80 == 0 {
            // Run length: 13 bits.
            usize::from(u16::from_be_bytes([a & 0x1f, b]))
        } else if a & 0x40 == 0 {
            14
        } else {
            7
        }
    };
    // The receive deltas follow the last chunk needed for `count` packets.
    let mut deltas = CHUNKS;
    let mut covered = 0;
    while covered < count {
        covered += covers(chunk(deltas)?);
        deltas += 2;
    }
    let mut arrival = TWCC_REFERENCE_TICK * reference;
    let mut push = |symbol: u8, deltas: &mut usize| -> Result<(), RtcpError> {
        let sequence_number = base.wrapping_add(out.len() as u16);
        let ack = match symbol {
            0 => Acknowledgement::lost(sequence_number),
            1 => {
                let d = *body.get(*deltas).ok_or(RtcpError::Truncated)?;
                *deltas += 1;
                arrival += Duration::from_micros(TWCC_DELTA_US * u64::from(d));
                Acknowledgement::received(sequence_number, Some(arrival), Ecn::NotEct)
            }
            2 => {
                let d = be_u16(body, *deltas).ok_or(RtcpError::Truncated)? as i16;
                *deltas += 2;
                let magnitude = Duration::from_micros(TWCC_DELTA_US * u64::from(d.unsigned_abs()));
                arrival = if d < 0 {
                    arrival.saturating_sub(magnitude)
                } else {
                    arrival + magnitude
                };
                Acknowledgement::received(sequence_number, Some(arrival), Ecn::NotEct)
            }
            _ => Acknowledgement::received(sequence_number, None, Ecn::NotEct),
        };
        out.push(ack);
        Ok(())
    };
    let mut at = CHUNKS;
    let mut left = count;
    while left > 0 {
        let (a, b) = chunk(at)?;
        at += 2;
        let n = covers((a, b)).min(left);
        left -= n;
        let word = u16::from_be_bytes([a, b]);
        if a & 0x80 == 0 {
            let symbol = (a >> 5) & 3;
            for _ in 0..n {
                push(symbol, &mut deltas)?;
            }
        } else if a & 0x40 == 0 {
            for i in 0..n {
                push(((word >> (13 - i)) & 1) as u8, &mut deltas)?;
            }
        } else {
            for i in 0..n {
                push(((word >> (12 - 2 * i)) & 3) as u8, &mut deltas)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
// Tests pick an arbitrary origin for their virtual time (and may share test state).
#[allow(clippy::disallowed_methods, clippy::disallowed_types)]
mod tests {
    use super::*;

    #[test]
    fn rtp_is_told_from_rtcp_and_the_rest() {
        let mut rtp = [0u8; 12];
        rtp[0] = 0x80;
        rtp[1] = 96;
        assert!(is_rtp(&rtp));
        rtp[1] = 96 | 0x80; // marker bit set
        assert!(is_rtp(&rtp));
        rtp[1] = 201; // RTCP receiver report
        assert!(!is_rtp(&rtp));
        assert!(!is_rtp(&[0x16, 0xfe, 0xfd])); // DTLS
        assert!(!is_rtp(&[0x00, 0x01, 0x00, 0x00])); // STUN
    }

    use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
    use rtc::rtcp::transport_feedbacks::transport_layer_nack::{NackPair, TransportLayerNack};

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
                    .protect_rtp(
                        now,
                        &mut p,
                        Outgoing::video(Some(3), i == 0),
                        BytesMut::new(),
                    )
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

    /// Probe padding: padding-only packets on a media stream (its SRTP rollover state), the
    /// P bit and the count in the last byte, a transport-wide sequence number after the
    /// media's; they decrypt at the subscriber as an empty payload.
    #[test]
    fn padding_packets_decrypt_as_padding_only() {
        use rtc::shared::marshal::Unmarshal;
        for (profile, salt_len) in [
            (ProtectionProfile::AeadAes128Gcm, 12),
            (ProtectionProfile::Aes128CmHmacSha1_80, 14),
        ] {
            let (mut e, mut rx, _) = pair(profile, salt_len);
            let now = Instant::now();
            let mut p = media(7, 65_535, 1000);
            let h = p.header.clone();
            assert!(
                e.protect_padding(now, &h, 255, Some(3)).is_err(),
                "no stream yet"
            );
            let wire = e.protect_rtp(now, &mut p, Outgoing::video(Some(3), true), BytesMut::new());
            rx.decrypt_rtp(&wire.expect("protect")).expect("decrypt");
            for (i, size) in [(1u16, 255usize), (2, 1), (3, 1000)] {
                let mut h = h.clone();
                h.sequence_number = 65_535u16.wrapping_add(i);
                h.marker = true;
                let wire = e.protect_padding(now, &h, size, Some(3)).expect("padding");
                let plain = rx.decrypt_rtp(&wire).expect("decrypt");
                assert_eq!(plain[0] & 0x20, 0x20, "P bit");
                assert_eq!(usize::from(plain[plain.len() - 1]), size.min(255));
                let got = rtp::Packet::unmarshal(&mut plain.freeze()).expect("parse");
                assert!(got.header.padding && !got.header.marker);
                assert!(got.payload.is_empty(), "{profile:?}");
                assert_eq!(got.header.sequence_number, h.sequence_number);
                assert_eq!(got.header.timestamp, 1000);
                let ext = got.header.get_extension(3).expect("twcc extension");
                assert_eq!(&ext[..], &i.to_be_bytes(), "{profile:?}");
            }
            let st = e.probe_stats();
            assert_eq!((st.padding_packets, st.padding_bytes), (3, 511));
        }
    }

    /// What `rtc` would have sent for `p` with the transport-wide sequence number `twcc`: its
    /// marshal of the packet with the extension set, sealed by its SRTP context.
    fn rtc_wire(reference: &mut Context, p: &rtp::Packet, twcc: Option<(u8, u16)>) -> BytesMut {
        let mut p = p.clone();
        p.header.extension = false;
        p.header.extensions.clear();
        p.header.extension_profile = 0;
        if let Some((id, seq)) = twcc {
            p.header.extension = true;
            p.header.extension_profile = rtp::header::EXTENSION_PROFILE_ONE_BYTE;
            p.header
                .set_extension(id, Bytes::copy_from_slice(&seq.to_be_bytes()))
                .expect("ext");
        }
        let plain = p.marshal().expect("marshal");
        reference.encrypt_rtp(&plain).expect("rtc encrypts")
    }

    /// The in-place sealer gives, byte for byte, what `rtc`'s SRTP context gives for the same
    /// packets, for both profiles: random headers (marker, payload type, CSRCs, with and
    /// without the transport-wide sequence number), two streams, sequence numbers that wrap
    /// (the rollover counter), and retransmissions of packets from before the wrap; and the
    /// subscriber's context decrypts every datagram back to the packet.
    #[test]
    fn sealed_packets_are_rtcs_bytes_and_decrypt_at_the_subscriber() {
        use rtc::shared::marshal::Unmarshal;
        for (profile, salt_len) in [
            (ProtectionProfile::AeadAes128Gcm, 12),
            (ProtectionProfile::Aes128CmHmacSha1_80, 14),
        ] {
            let (keys, _) = keys_for(profile, salt_len);
            let (mut e, mut rx, _) = pair(profile, salt_len);
            assert!(!matches!(e.sealer, RtpSealer::Rtc), "{profile:?}: native");
            let crypto = rtc::crypto::default_provider().expect("provider");
            let mut reference = Context::new(
                &keys.local_key,
                &keys.local_salt,
                profile,
                None,
                None,
                crypto.crypto(),
            )
            .expect("reference");
            let mut rng = Rng(0xfeed_0000_1111_2222 ^ salt_len as u64);
            let t0 = Instant::now();
            let mut twcc_seq = 0u16;
            let mut sent: Vec<rtp::Packet> = Vec::new();
            let mut resent = 0;
            for n in 0..1_500u32 {
                let ssrc = if n % 3 == 0 { 0xaaaa } else { 0xbbbb };
                // Each stream starts near the wrap and wraps within the run.
                let seq = (65_000u32 + n) as u16;
                let mut p = media(ssrc, seq, n * 3000);
                p.header.marker = rng.chance(20);
                p.header.payload_type = 96 + rng.below(20) as u8;
                p.header.csrc = (0..rng.below(3)).map(|_| rng.next() as u32).collect();
                p.payload = Bytes::from(
                    (0..1 + rng.below(1_200))
                        .map(|_| rng.next() as u8)
                        .collect::<Vec<u8>>(),
                );
                let twcc_id = rng.chance(80).then_some(5);
                let now = t0 + Duration::from_millis(u64::from(n));
                let wire = e
                    .protect_rtp(
                        now,
                        &mut p,
                        Outgoing::video(twcc_id, false),
                        BytesMut::new(),
                    )
                    .expect("protect");
                let want_twcc = twcc_id.map(|id| (id, twcc_seq));
                twcc_seq = twcc_seq.wrapping_add(u16::from(twcc_id.is_some()));
                assert_eq!(
                    &wire[..],
                    &rtc_wire(&mut reference, &p, want_twcc)[..],
                    "{profile:?} packet {n}"
                );
                let plain = rx.decrypt_rtp(&wire).expect("subscriber decrypts");
                let got = rtp::Packet::unmarshal(&mut plain.freeze()).expect("parse");
                assert_eq!(got.payload, p.payload);
                assert_eq!(got.header.sequence_number, seq);
                assert_eq!(got.header.csrc, p.header.csrc);
                sent.push(p);
                // Now and then a retransmission of an older packet (before the wrap too).
                if n % 97 == 96 {
                    let old = &sent[sent.len() - 90];
                    let mut s = e.sent.get(&old.header.ssrc).copied().expect("stream");
                    let twcc_id = s.twcc_id;
                    let wire = seal(
                        &mut e.sealer,
                        &mut e.local,
                        &mut e.twcc,
                        &mut s.roc,
                        now,
                        old,
                        twcc_id,
                        BytesMut::new(),
                    )
                    .expect("reseal");
                    e.sent.insert(old.header.ssrc, s);
                    let want_twcc = twcc_id.map(|id| (id, twcc_seq));
                    twcc_seq = twcc_seq.wrapping_add(u16::from(twcc_id.is_some()));
                    assert_eq!(&wire[..], &rtc_wire(&mut reference, old, want_twcc)[..]);
                    let plain = rx.decrypt_rtp(&wire).expect("retransmission decrypts");
                    assert_eq!(&plain[plain.len() - old.payload.len()..], &old.payload[..]);
                    resent += 1;
                }
            }
            assert!(resent >= 15);
            // Both streams went past the wrap: their rollover counter is 1.
            for ssrc in [0xaaaa, 0xbbbb] {
                assert_eq!(e.sent[&ssrc].roc.index >> 16, 1, "{profile:?}");
            }
        }
    }

    /// What the header writer leaves to `rtc` (RTP padding) and a profile the sealer does not
    /// implement itself (`rtc`'s context seals) still reach the subscriber intact.
    #[test]
    fn padding_and_other_profiles_go_through_rtc() {
        use rtc::shared::marshal::Unmarshal;
        let (mut e, mut rx, _) = pair(ProtectionProfile::AeadAes128Gcm, 12);
        let mut p = media(7, 10, 1000);
        p.header.padding = true;
        p.payload = Bytes::from(vec![1, 2, 3, 0, 0, 3]);
        let wire = e
            .protect_rtp(
                Instant::now(),
                &mut p,
                Outgoing::video(Some(3), false),
                BytesMut::new(),
            )
            .expect("protect");
        let plain = rx.decrypt_rtp(&wire).expect("decrypt");
        let got = rtp::Packet::unmarshal(&mut plain.freeze()).expect("parse");
        assert!(got.header.padding);
        assert_eq!(&got.header.get_extension(3).expect("twcc")[..], &[0, 0]);

        let profile = ProtectionProfile::Aes128CmHmacSha1_32;
        let (keys, _) = keys_for(ProtectionProfile::Aes128CmHmacSha1_80, 14);
        let keys = SrtpKeys { profile, ..keys };
        let mut e = Egress::new(&keys).expect("egress");
        assert!(matches!(e.sealer, RtpSealer::Rtc));
        let crypto = rtc::crypto::default_provider().expect("provider");
        let mut rx = Context::new(
            &keys.local_key,
            &keys.local_salt,
            profile,
            None,
            None,
            crypto.crypto(),
        )
        .expect("rx");
        for seq in [65_535u16, 0, 1] {
            let mut p = media(9, seq, 1000);
            let wire = e
                .protect_rtp(
                    Instant::now(),
                    &mut p,
                    Outgoing::video(Some(3), false),
                    BytesMut::new(),
                )
                .expect("protect");
            let plain = rx.decrypt_rtp(&wire).expect("decrypt");
            assert_eq!(&plain[plain.len() - 200..], &p.payload[..]);
        }
    }

    #[test]
    fn nacks_are_answered_and_keyframe_requests_surface() {
        let (mut e, mut rx, mut tx) = pair(ProtectionProfile::AeadAes128Gcm, 12);
        let now = Instant::now();
        for seq in 0..5u16 {
            let mut p = media(7, seq, 3000);
            e.protect_rtp(
                now,
                &mut p,
                Outgoing::video(Some(3), seq == 0),
                BytesMut::new(),
            )
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
    fn nacks_of_a_stream_with_rtx_are_answered_on_the_rtx_stream() {
        use rtc::shared::marshal::Unmarshal;
        for (profile, salt_len) in [
            (ProtectionProfile::AeadAes128Gcm, 12),
            (ProtectionProfile::Aes128CmHmacSha1_80, 14),
        ] {
            let (mut e, mut rx, mut tx) = pair(profile, salt_len);
            let now = Instant::now();
            // Stream 7 repairs on RTX stream 8 (payload type 97); stream 9 has none.
            e.set_rtx(7, Some((8, 97)));
            assert!(e.has_rtx(7) && !e.has_rtx(9));
            // No media sent yet: no padding either.
            assert!(e.rtx_padding(now, 7, 100).is_none());
            for seq in 0..5u16 {
                for ssrc in [7, 9] {
                    let mut p = media(ssrc, 1000 + seq, 3000);
                    let wire = e
                        .protect_rtp(
                            now,
                            &mut p,
                            Outgoing::video(Some(3), seq == 0),
                            BytesMut::new(),
                        )
                        .expect("protect");
                    rx.decrypt_rtp(&wire).expect("decrypt");
                }
            }
            let nack = |media_ssrc| TransportLayerNack {
                sender_ssrc: 1,
                media_ssrc,
                nacks: vec![NackPair {
                    packet_id: 1002,
                    lost_packets: 0b1,
                }],
            };
            let compound: Vec<Box<dyn rtcp::Packet>> = vec![Box::new(nack(7)), Box::new(nack(9))];
            let plain = rtcp::packet::marshal(&compound).expect("marshal");
            let wire = tx.encrypt_rtcp(&plain).expect("encrypt");
            let fb = e
                .on_rtcp(now + Duration::from_millis(30), &wire)
                .expect("rtcp");
            assert_eq!(fb.retransmissions.len(), 4);
            let got: Vec<rtp::Packet> = fb
                .retransmissions
                .iter()
                .map(|w| {
                    let plain = rx.decrypt_rtp(w).expect("decrypt");
                    rtp::Packet::unmarshal(&mut plain.freeze()).expect("parse")
                })
                .collect();
            // Newest first; on the RTX stream: its SSRC, payload type, consecutive sequence
            // numbers, the OSN, then the original payload.
            let first = RtxStream::new(8, 97).next_seq;
            for (i, (g, osn)) in got[..2].iter().zip([1003u16, 1002]).enumerate() {
                assert_eq!(g.header.ssrc, 8, "{profile:?}");
                assert_eq!(g.header.payload_type, 97);
                assert_eq!(g.header.sequence_number, first.wrapping_add(i as u16));
                assert_eq!(&g.payload[..2], &osn.to_be_bytes());
                assert_eq!(&g.payload[2..], &[osn as u8; 200][..]);
                // With the next transport-wide sequence numbers (10 media packets before).
                let ext = g.header.get_extension(3).expect("twcc");
                assert_eq!(&ext[..], &(10 + i as u16).to_be_bytes());
            }
            // Without RTX: the original packets again.
            for (g, seq) in got[2..].iter().zip([1003u16, 1002]) {
                assert_eq!(g.header.ssrc, 9);
                assert_eq!(g.header.payload_type, 96);
                assert_eq!(g.header.sequence_number, seq);
            }
            let s = e.stats();
            assert_eq!((s.nack.resent, s.rtx_resent), (4, 2));
            // A padding-only packet on the RTX stream: next RTX sequence number, the padding
            // bit, a transport-wide sequence number, nothing left after the padding.
            let pad = e
                .rtx_padding(now + Duration::from_millis(40), 7, 200)
                .expect("rtx stream")
                .expect("sealed");
            let plain = rx.decrypt_rtp(&pad).expect("decrypt padding");
            assert_eq!(plain.len(), 12 + 8 + 200);
            let g = rtp::Packet::unmarshal(&mut plain.freeze()).expect("parse");
            assert!(g.header.padding);
            assert!(g.payload.is_empty());
            assert_eq!(g.header.ssrc, 8);
            assert_eq!(g.header.sequence_number, first.wrapping_add(2));
            let ext = g.header.get_extension(3).expect("twcc");
            assert_eq!(&ext[..], &14u16.to_be_bytes());
            assert!(e.rtx_padding(now, 9, 100).is_none());
            // Set again: same numbering; a removed stream forgets its RTX stream.
            e.set_rtx(7, Some((8, 97)));
            assert_eq!(
                e.rtx.get(&7).map(|r| r.stream.next_seq),
                Some(first.wrapping_add(3))
            );
            e.remove_stream(7);
            assert!(!e.has_rtx(7));
        }
    }

    #[test]
    fn sender_reports_count_what_was_sent() {
        let (mut e, mut rx, _) = pair(ProtectionProfile::AeadAes128Gcm, 12);
        let t0 = Instant::now();
        assert!(e.sender_reports(t0, SystemTime::now()).is_none());
        for seq in 0..4u16 {
            let mut p = media(9, seq, 48_000 * u32::from(seq));
            e.protect_rtp(
                t0,
                &mut p,
                Outgoing {
                    twcc_id: None,
                    clock_rate: 48_000,
                    video: false,
                    keyframe: false,
                },
                BytesMut::new(),
            )
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
    /// xorshift64*: reproducible randomness without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    /// A transport-cc feedback written independently of both parsers, and what it says.
    struct GenTwcc {
        /// The whole RTCP packet.
        wire: Vec<u8>,
        /// The acknowledgements it encodes (the truth both parsers are checked against).
        acks: Vec<Acknowledgement>,
    }

    /// A random, well-formed feedback: run-length and 1-/2-bit status-vector chunks, small
    /// and large (also negative) deltas, packets received without delta, sequence numbers
    /// around the wrap, unused vector symbols zero (as libwebrtc writes them), a last run
    /// that may claim more packets than the count, padding by the padding bit or by zeros.
    fn gen_twcc(rng: &mut Rng) -> GenTwcc {
        let base = if rng.chance(30) {
            65_535 - rng.below(40) as u16
        } else {
            rng.next() as u16
        };
        let count = if rng.chance(10) {
            1 + rng.below(3_000) as usize
        } else {
            1 + rng.below(60) as usize
        };
        let loss = rng.below(60);
        let large = rng.below(30);
        let no_delta = if rng.chance(20) { rng.below(20) } else { 0 };
        let mut symbols: Vec<u8> = (0..count)
            .map(|_| {
                if rng.chance(loss) {
                    0
                } else if rng.chance(large) {
                    2
                } else if rng.chance(no_delta) {
                    3
                } else {
                    1
                }
            })
            .collect();
        // At least one receive delta (`rtc` rejects a feedback that ends right after an even
        // number of chunks; tested apart).
        if !symbols.iter().any(|&s| s == 1 || s == 2) {
            symbols[0] = 1;
        }
        let mut chunks: Vec<u16> = Vec::new();
        let mut i = 0;
        while i < count {
            let run = symbols[i..]
                .iter()
                .take_while(|&&s| s == symbols[i])
                .count();
            let fits_1bit = symbols[i..].iter().take(14).all(|&s| s <= 1);
            let choice = rng.below(3);
            if choice == 0 || run >= 14 {
                let mut len = run.min(8_191);
                if i + len == count && rng.chance(20) {
                    len = (len + rng.below(5) as usize).min(8_191);
                }
                chunks.push((u16::from(symbols[i]) << 13) | len as u16);
                i += len.min(run);
            } else if choice == 1 && fits_1bit {
                let mut w = 0x8000u16;
                for k in 0..14 {
                    if let Some(&s) = symbols.get(i + k) {
                        w |= u16::from(s) << (13 - k);
                    }
                }
                chunks.push(w);
                i += 14;
            } else {
                let mut w = 0xc000u16;
                for k in 0..7 {
                    if let Some(&s) = symbols.get(i + k) {
                        w |= u16::from(s) << (12 - 2 * k);
                    }
                }
                chunks.push(w);
                i += 7;
            }
        }
        let reference = rng.below(1 << 24) as u32;
        let mut arrival = Duration::from_millis(64) * reference;
        let mut deltas = Vec::new();
        let mut acks = Vec::new();
        for (k, &s) in symbols.iter().enumerate() {
            let seq = base.wrapping_add(k as u16);
            acks.push(match s {
                0 => Acknowledgement::lost(seq),
                1 => {
                    let d = if rng.chance(5) {
                        255
                    } else {
                        rng.below(40) as u8
                    };
                    deltas.push(d);
                    arrival += Duration::from_micros(250 * u64::from(d));
                    Acknowledgement::received(seq, Some(arrival), Ecn::NotEct)
                }
                2 => {
                    let d = match rng.below(4) {
                        0 => i16::MIN + rng.below(10) as i16,
                        1 => i16::MAX - rng.below(10) as i16,
                        2 => -(rng.below(2_000) as i16),
                        _ => rng.next() as i16,
                    };
                    deltas.extend_from_slice(&d.to_be_bytes());
                    let m = Duration::from_micros(250 * u64::from(d.unsigned_abs()));
                    arrival = if d < 0 {
                        arrival.saturating_sub(m)
                    } else {
                        arrival + m
                    };
                    Acknowledgement::received(seq, Some(arrival), Ecn::NotEct)
                }
                _ => Acknowledgement::received(seq, None, Ecn::NotEct),
            });
        }
        let mut body = Vec::new();
        body.extend_from_slice(&0x1111_2222u32.to_be_bytes());
        body.extend_from_slice(&0x3333_4444u32.to_be_bytes());
        body.extend_from_slice(&base.to_be_bytes());
        body.extend_from_slice(&(count as u16).to_be_bytes());
        body.extend_from_slice(&reference.to_be_bytes()[1..]);
        body.push(rng.next() as u8);
        for c in &chunks {
            body.extend_from_slice(&c.to_be_bytes());
        }
        body.extend_from_slice(&deltas);
        let mut b0 = 0x80 | FMT_TWCC;
        let pad = (4 - body.len() % 4) % 4;
        if pad > 0 && rng.chance(50) {
            b0 |= 0x20;
            body.extend(std::iter::repeat_n(0, pad - 1));
            body.push(pad as u8);
        } else {
            body.extend(std::iter::repeat_n(0, pad));
        }
        let mut wire = vec![b0, PT_RTPFB];
        wire.extend_from_slice(&((body.len() / 4) as u16).to_be_bytes());
        wire.extend_from_slice(&body);
        GenTwcc { wire, acks }
    }

    fn rr(ssrc: u32) -> Vec<u8> {
        let rr = rtc::rtcp::receiver_report::ReceiverReport {
            ssrc,
            reports: vec![rtc::rtcp::reception_report::ReceptionReport {
                ssrc: 7,
                last_sequence_number: 1234,
                ..Default::default()
            }],
            ..Default::default()
        };
        rr.marshal().expect("rr").to_vec()
    }

    /// `rtc`'s view of a compound: the acknowledgements of its transport-cc feedback.
    fn rtc_twcc(compound: &[u8]) -> Vec<Acknowledgement> {
        use rtc::interceptor::convert_twcc;
        use rtc::rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc;
        let packets =
            rtcp::packet::unmarshal(&mut Bytes::copy_from_slice(compound)).expect("rtc parses");
        let cc = packets
            .iter()
            .find_map(|p| p.as_any().downcast_ref::<TransportLayerCc>())
            .expect("transport-cc");
        convert_twcc(cc)
    }

    fn our_twcc(compound: &[u8], out: &mut Vec<Acknowledgement>) -> Result<(), RtcpError> {
        let p = rtcp_packets(compound)
            .filter_map(Result::ok)
            .find(|p| (p.pt, p.fmt) == (PT_RTPFB, FMT_TWCC))
            .expect("transport-cc");
        parse_twcc(p.body, out)
    }

    #[test]
    fn twcc_parser_matches_rtc_on_random_feedback() {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        let mut ours = Vec::new();
        let (mut runs, mut vec1, mut vec2, mut padded, mut wrapped) = (0, 0, 0, 0, 0);
        for n in 0..4_000 {
            let g = gen_twcc(&mut rng);
            let mut compound = if n % 2 == 0 { rr(0xabc) } else { Vec::new() };
            compound.extend_from_slice(&g.wire);
            our_twcc(&compound, &mut ours).expect("ours parses");
            assert_eq!(ours, g.acks, "feedback {n}: ours vs the encoder");
            let theirs = rtc_twcc(&compound);
            // `rtc` also reports the unused tail of the last chunk (never as arrived with a
            // time); the reported packets agree exactly.
            assert!(theirs.len() >= ours.len(), "feedback {n}");
            assert_eq!(
                &theirs[..ours.len()],
                &ours[..],
                "feedback {n}: ours vs rtc"
            );
            assert!(theirs[ours.len()..].iter().all(|a| a.arrival.is_none()));
            // What the generator covered.
            for c in g.wire[20..].chunks_exact(2).take(1) {
                match c[0] >> 6 {
                    0 | 1 => runs += 1,
                    2 => vec1 += 1,
                    _ => vec2 += 1,
                }
            }
            padded += usize::from(g.wire[0] & 0x20 != 0);
            wrapped +=
                usize::from(u32::from(g.acks[0].sequence_number) + g.acks.len() as u32 > 65_536);
        }
        assert!(runs > 100 && vec1 > 100 && vec2 > 100 && padded > 100 && wrapped > 100);
    }

    #[test]
    fn twcc_parser_never_panics_on_malformed_feedback() {
        let mut rng = Rng(0xdead_beef_0000_0042);
        let mut out = Vec::new();
        for n in 0..400 {
            let g = gen_twcc(&mut rng);
            let body = &g.wire[4..];
            // Cut short anywhere before the last delta: an error, nothing reported.
            let deltas_end = body.len()
                - if g.wire[0] & 0x20 != 0 {
                    body[body.len() - 1] as usize
                } else {
                    0
                };
            for cut in 0..body.len() {
                let r = parse_twcc(&body[..cut], &mut out);
                if r.is_err() {
                    assert!(out.is_empty());
                } else {
                    assert_eq!(out, g.acks, "feedback {n} cut at {cut}");
                }
                if cut < 16 {
                    assert_eq!(r, Err(RtcpError::Truncated));
                }
            }
            let _ = deltas_end;
            // Random corruption: any outcome but a panic.
            let mut bad = g.wire.clone();
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(bad.len() as u64) as usize;
                bad[i] = rng.next() as u8;
            }
            for p in rtcp_packets(&bad).flatten() {
                let _ = parse_twcc(p.body, &mut out);
            }
        }
        // Pure garbage through the compound walk and every parser.
        for _ in 0..2_000 {
            let len = rng.below(80) as usize;
            let mut junk: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if let Some(b) = junk.first_mut() {
                *b = 0x80 | (*b & 0x3f);
            }
            for p in rtcp_packets(&junk).flatten() {
                let _ = parse_twcc(p.body, &mut out);
                let _ = parse_nack(p.body, &mut Vec::new());
                let _ = parse_fir(p.body, &mut Vec::new());
                let _ = parse_remb(p.body);
                let _ = feedback_media_ssrc(p.body);
            }
        }
        // A huge run claimed by a short packet is fine (all lost: no deltas needed), and a
        // feedback without any delta ending right after an even number of chunks (which
        // `rtc` rejects) is read.
        let body = [
            0, 0, 0, 1, 0, 0, 0, 2, 0xff, 0xf0, 0x00, 0x20, 0, 0, 1, 0, 0x00, 0x10, 0x00, 0x10,
        ];
        parse_twcc(&body, &mut out).expect("all lost");
        assert_eq!(out.len(), 32);
        assert!(out.iter().all(|a| !a.arrived));
        assert_eq!(out[16].sequence_number, 0);
    }

    #[test]
    fn nack_parser_matches_rtc() {
        use rtc::shared::marshal::Unmarshal;
        let mut rng = Rng(0x0bad_cafe_0000_0007);
        for n in 0..2_000 {
            let pairs: Vec<NackPair> = (0..1 + rng.below(20))
                .map(|_| NackPair {
                    packet_id: if rng.chance(30) {
                        65_535 - rng.below(20) as u16
                    } else {
                        rng.next() as u16
                    },
                    lost_packets: if rng.chance(50) { 0 } else { rng.next() as u16 },
                })
                .collect();
            let nack = TransportLayerNack {
                sender_ssrc: 1,
                media_ssrc: rng.next() as u32,
                nacks: pairs,
            };
            let wire = nack.marshal().expect("marshal");
            let theirs =
                TransportLayerNack::unmarshal(&mut Bytes::copy_from_slice(&wire)).expect("rtc");
            let want: Vec<u16> = crate::sfu::nack::nack_seqs(&theirs).collect();
            let p = rtcp_packets(&wire).next().expect("packet").expect("header");
            assert_eq!((p.pt, p.fmt), (PT_RTPFB, FMT_NACK));
            let mut got = Vec::new();
            assert_eq!(
                parse_nack(p.body, &mut got),
                Ok(nack.media_ssrc),
                "nack {n}"
            );
            assert_eq!(got, want, "nack {n}");
        }
        assert_eq!(
            parse_nack(&[0; 7], &mut Vec::new()),
            Err(RtcpError::Truncated)
        );
    }

    #[test]
    fn remb_parser_matches_rtc() {
        use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate as Remb;
        use rtc::shared::marshal::Unmarshal;
        for exp in 0..64u8 {
            for mantissa in [1u32, 2, 3, 1000, 0x1_ffff, 0x3_ffff] {
                let mut wire = vec![0x8f, PT_PSFB, 0, 5, 0, 0, 0, 1, 0, 0, 0, 0];
                wire.extend_from_slice(b"REMB");
                wire.extend_from_slice(&[1, exp << 2 | (mantissa >> 16) as u8]);
                wire.extend_from_slice(&(mantissa as u16).to_be_bytes());
                wire.extend_from_slice(&7u32.to_be_bytes());
                let theirs = Remb::unmarshal(&mut Bytes::copy_from_slice(&wire)).expect("rtc");
                let p = rtcp_packets(&wire).next().expect("packet").expect("header");
                assert_eq!(
                    parse_remb(p.body),
                    Ok(Some(theirs.bitrate.max(0.0) as u64)),
                    "2^{exp} × {mantissa}"
                );
            }
        }
        // A zero mantissa is zero (`rtc` makes it 2^(exp+23)); another application feedback is
        // not a REMB.
        let body = [0, 0, 0, 1, 0, 0, 0, 0, b'R', b'E', b'M', b'B', 1, 0, 0, 0];
        assert_eq!(parse_remb(&body), Ok(Some(0)));
        let body = [0, 0, 0, 1, 0, 0, 0, 0, b'G', b'O', b'O', b'G', 1, 0, 0, 0];
        assert_eq!(parse_remb(&body), Ok(None));
    }

    #[test]
    fn one_malformed_packet_does_not_lose_the_rest_of_the_compound() {
        use rtc::rtcp::payload_feedbacks::full_intra_request::{FirEntry, FullIntraRequest};
        let (mut e, _, mut tx) = pair(ProtectionProfile::AeadAes128Gcm, 12);
        let now = Instant::now();
        let mut compound = rr(0xabc);
        // A transport-cc feedback whose deltas are missing, an unknown transport feedback,
        // an APP packet, a PLI too short to name its SSRC: skipped.
        compound.extend_from_slice(&[
            0x8f, PT_RTPFB, 0, 5, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 1, 0, 0x20, 0x03, 0, 0,
        ]);
        compound.extend_from_slice(&[0x89, PT_RTPFB, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2]);
        compound.extend_from_slice(&[0x80, 204, 0, 2, 0, 0, 0, 1, b'a', b'b', b'c', b'd']);
        compound.extend_from_slice(&[0x81, PT_PSFB, 0, 1, 0, 0, 0, 1]);
        // Then what matters: PLI and FIR.
        let pli = PictureLossIndication {
            sender_ssrc: 1,
            media_ssrc: 7,
        };
        compound.extend_from_slice(&pli.marshal().expect("pli"));
        let fir = FullIntraRequest {
            sender_ssrc: 1,
            media_ssrc: 0,
            fir: vec![
                FirEntry {
                    ssrc: 8,
                    sequence_number: 1,
                },
                FirEntry {
                    ssrc: 9,
                    sequence_number: 1,
                },
            ],
        };
        compound.extend_from_slice(&fir.marshal().expect("fir"));
        let wire = tx.encrypt_rtcp(&compound).expect("encrypt");
        let fb = e.on_rtcp(now, &wire).expect("feedback");
        assert_eq!(fb.keyframes, vec![7, 8, 9]);
        assert!(!fb.estimate_updated);
        let s = e.stats();
        assert_eq!((s.rtcp_in, s.rtcp_malformed, s.twcc_feedback), (1, 2, 0));
        // A broken length ends the walk, keeping what came before it.
        let mut compound = pli.marshal().expect("pli").to_vec();
        compound.extend_from_slice(&[0x81, PT_PSFB, 0, 9, 0, 0, 0, 1, 0, 0, 0, 8]);
        let wire = tx.encrypt_rtcp(&compound).expect("encrypt");
        let fb = e.on_rtcp(now, &wire).expect("feedback");
        assert_eq!(fb.keyframes, vec![7]);
        assert_eq!(e.stats().rtcp_malformed, 3);
    }

    #[test]
    fn twcc_feedback_feeds_the_estimator() {
        let (mut e, _, mut tx) = pair(ProtectionProfile::AeadAes128Gcm, 12);
        let t0 = Instant::now();
        for seq in 0..10u16 {
            let mut p = media(7, seq, 3000);
            e.protect_rtp(
                t0 + Duration::from_millis(u64::from(seq)),
                &mut p,
                Outgoing::video(Some(3), false),
                BytesMut::new(),
            )
            .expect("protect");
        }
        // All 10 received, 1 ms apart (run-length chunk, small deltas of 4 × 250 µs).
        let mut fb = vec![
            0x8f, PT_RTPFB, 0, 7, 0, 0, 0, 1, 0, 0, 0, 7, 0, 0, 0, 10, 0, 0, 1, 0, 0x20, 10,
        ];
        fb.extend_from_slice(&[4; 10]);
        let mut compound = rr(0xabc);
        compound.extend_from_slice(&fb);
        let wire = tx.encrypt_rtcp(&compound).expect("encrypt");
        assert_eq!(e.estimate().twcc(), None);
        let out = e
            .on_rtcp(t0 + Duration::from_millis(40), &wire)
            .expect("feedback");
        assert!(out.estimate_updated);
        assert_eq!(e.stats().twcc_feedback, 1);
        assert!(e.estimate().twcc().is_some());
        // Every packet was reported: the log has nothing left to report.
        assert!(e.twcc.take_reports().is_empty());
        assert_eq!(e.twcc.next_to_report, 10);
        // A feedback claiming 65 535 lost packets (9 run-length chunks) is read, and its
        // buffer is not kept.
        let mut huge = vec![
            0x8f, PT_RTPFB, 0, 9, 0, 0, 0, 1, 0, 0, 0, 7, 0, 0, 0xff, 0xff, 0, 0, 2, 1,
        ];
        for _ in 0..9 {
            huge.extend_from_slice(&[0x1f, 0xff]);
        }
        huge.extend_from_slice(&[0, 0]);
        let wire = tx.encrypt_rtcp(&huge).expect("encrypt");
        e.on_rtcp(t0 + Duration::from_millis(50), &wire)
            .expect("feedback");
        assert_eq!(e.stats().twcc_feedback, 2);
        assert!(e.acks.capacity() <= TWCC_LOG);
    }
    #[test]
    fn rtp_marshal_matches_rtc() {
        let mut rng = Rng(0x1234_5678_9abc_def0);
        let mut ours = Vec::new();
        for n in 0..3_000 {
            let mut p = media(rng.next() as u32, rng.next() as u16, rng.next() as u32);
            p.header.marker = rng.chance(30);
            p.header.payload_type = rng.below(128) as u8;
            p.header.csrc = (0..rng.below(4)).map(|_| rng.next() as u32).collect();
            p.payload = Bytes::from(
                (0..rng.below(1_300))
                    .map(|_| rng.next() as u8)
                    .collect::<Vec<u8>>(),
            );
            // What the publisher's packet carried is replaced.
            p.header.extension = true;
            p.header.extension_profile = rtp::header::EXTENSION_PROFILE_ONE_BYTE;
            p.header
                .set_extension(5, Bytes::from_static(&[1, 2, 3]))
                .expect("ext");
            let twcc = rng
                .chance(80)
                .then(|| (1 + rng.below(14) as u8, rng.next() as u16));
            p.header.extension = false;
            p.header.extensions.clear();
            p.header.extension_profile = 0;
            if let Some((id, seq)) = twcc {
                p.header.extension = true;
                p.header.extension_profile = rtp::header::EXTENSION_PROFILE_ONE_BYTE;
                p.header
                    .set_extension(id, twcc_seq_bytes(seq))
                    .expect("ext");
                assert_eq!(&twcc_seq_bytes(seq)[..], &seq.to_be_bytes());
            }
            assert!(marshal_rtp(&p, twcc, &mut ours));
            let theirs = p.marshal().expect("marshal");
            assert_eq!(&ours[..], &theirs[..], "packet {n}");
            // SRTP splits header and payload by the header's own size.
            assert_eq!(p.header.marshal_size(), ours.len() - p.payload.len());
        }
        // Left to `rtc`: padding, an id a one-byte header cannot carry.
        let mut p = media(1, 2, 3);
        assert!(!marshal_rtp(&p, Some((15, 1)), &mut ours));
        p.header.padding = true;
        assert!(!marshal_rtp(&p, None, &mut ours));
    }
}
