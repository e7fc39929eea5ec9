//! An in-memory `rtc` peer connection for the simulated network: the same sans-I/O
//! `rtc` 0.21 crate the server uses, driven by the virtual clock, with a synthetic media
//! source (Opus audio, VP8 video with real payload descriptors, optionally simulcast) and a
//! recorder of everything it receives.
//!
//! The peer runs `rtc`'s default interceptors (NACK generator and responder, TWCC feedback,
//! sender and receiver reports) and a TWCC sender (transport-wide sequence numbers on what it
//! sends), like a browser, plus [`RtcpTap`], which
//! hands every inbound RTCP packet to the application too (PLI/FIR make the source send a
//! keyframe; sender reports, NACKs and PLIs are logged for the tests).
//!
//! Data channels: the peer records every channel that opens (by label, with the virtual time
//! it opened) and every message that arrives on one ([`RxData`]); [`Peer::send_data`] sends
//! text or binary on an open channel, [`Peer::create_data_channel`] opens one of its own.

use super::net::Output;
use bytes::{Bytes, BytesMut};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rtc::data_channel::{RTCDataChannelId, RTCDataChannelInit};
use rtc::interceptor::{
    Attribute, Interceptor, Packet as IPacket, Registry, Slot, StreamInfo, TaggedPacket,
    TwccSenderBuilder,
};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
use rtc::peer_connection::configuration::media_engine::{
    MIME_TYPE_OPUS, MIME_TYPE_VP8, MediaEngine,
};
use rtc::peer_connection::event::{RTCDataChannelEvent, RTCPeerConnectionEvent, RTCTrackEvent};
use rtc::peer_connection::message::{RTCMessage, TaggedRTCMessage};
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::transport::{
    CandidateConfig, CandidateHostConfig, RTCIceCandidate, RTCIceCandidateInit,
};
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters,
    RTCRtpEncodingParameters, RTCRtpRtxParameters, RtpCodecKind,
};
use rtc::rtp_transceiver::{RTCRtpReceiverId, RTCRtpSenderId};
use rtc::sansio::Protocol;
use rtc::sdp::extmap::{AUDIO_LEVEL_URI, SDES_MID_URI, SDES_RTP_STREAM_ID_URI};
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Payload types the sim's peers register (the server's media engine uses the same).
pub const OPUS_PT: u8 = 111;
pub const VP8_PT: u8 = 96;
/// RTX for VP8 (with [`MediaSpec::rtx`]).
pub const RTX_PT: u8 = 97;

/// Largest VP8 payload in one RTP packet.
const MAX_PAYLOAD: usize = 1100;
/// Marks the synthetic frame header inside a VP8 payload: `S I M`, layer, frame number.
const SIM_TAG: &[u8; 3] = b"SIM";

/// One video encoding (a simulcast layer, or the only one).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSpec {
    /// RID; empty for a non-simulcast track.
    pub rid: String,
    pub bitrate_bps: u32,
    pub width: u16,
    pub height: u16,
}

impl LayerSpec {
    pub fn new(rid: &str, bitrate_bps: u32, width: u16, height: u16) -> Self {
        LayerSpec {
            rid: rid.to_owned(),
            bitrate_bps,
            width,
            height,
        }
    }
}

/// The layers a browser sends for a 720p camera: `q` 320x180 150 kbit/s, `h` 640x360
/// 500 kbit/s, `f` 1280x720 1.5 Mbit/s.
pub fn browser_simulcast() -> Vec<LayerSpec> {
    vec![
        LayerSpec::new("q", 150_000, 320, 180),
        LayerSpec::new("h", 500_000, 640, 360),
        LayerSpec::new("f", 1_500_000, 1280, 720),
    ]
}

/// What a peer sends.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MediaSpec {
    /// An Opus track, 20 ms frames.
    pub audio: bool,
    /// A VP8 track with these encodings (RIDs set = simulcast); empty = no video.
    pub video: Vec<LayerSpec>,
    /// Video frames per second (default 30 when 0).
    pub fps: u32,
    /// Send a keyframe on every layer this often, besides the ones asked for.
    pub keyframe_interval: Option<Duration>,
    /// Negotiate RTX (RFC 4588, `rtx/90000` with `apt=96`): video retransmissions go on an
    /// RTX stream, both ways (a sending peer announces one per encoding with
    /// `a=ssrc-group:FID`; a receiving one accepts the server's). Off by default.
    pub rtx: bool,
}

impl MediaSpec {
    /// Receive only.
    pub fn none() -> Self {
        MediaSpec::default()
    }
    /// Audio and one 500 kbit/s 640x360 VP8 encoding.
    pub fn audio_video() -> Self {
        MediaSpec {
            audio: true,
            video: vec![LayerSpec::new("", 500_000, 640, 360)],
            ..Default::default()
        }
    }
    /// Audio and VP8 simulcast `q`/`h`/`f`.
    pub fn simulcast() -> Self {
        MediaSpec {
            audio: true,
            video: browser_simulcast(),
            ..Default::default()
        }
    }
}

/// What one video layer has sent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct LayerStats {
    pub frames: u64,
    pub keyframes: u64,
    pub packets: u64,
    pub bytes: u64,
    /// Frames not sent because the layer was paused.
    pub paused_frames: u64,
}

/// One encoding of the video source.
#[derive(Debug)]
pub struct VideoLayer {
    pub spec: LayerSpec,
    pub ssrc: u32,
    /// False while paused (dynacast): no frames are sent.
    pub active: bool,
    pub stats: LayerStats,
    seq: u16,
    ts_base: u32,
    picture_id: u16,
    tl0: u8,
    want_keyframe: bool,
}

struct VideoSource {
    sender: RTCRtpSenderId,
    layers: Vec<VideoLayer>,
    fps: u32,
    next_frame: Option<Instant>,
    frame_no: u64,
    keyframe_interval: Option<Duration>,
    last_periodic_key: Option<Instant>,
    mid: Option<String>,
    ext: Option<(Option<u8>, Option<u8>)>,
}

struct AudioSource {
    sender: RTCRtpSenderId,
    ssrc: u32,
    seq: u16,
    ts: u32,
    next_frame: Option<Instant>,
    packets: u64,
    /// The audio level (RFC 6464, −dBov) each packet carries, if any, and the negotiated
    /// extension id (looked up at the first packet with a level).
    level: Option<u8>,
    level_ext: Option<u8>,
}

/// A decoded VP8 payload descriptor, plus the sim's own frame tag when present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Vp8Info {
    /// S bit with PID 0: first packet of a frame.
    pub frame_start: bool,
    pub picture_id: Option<u16>,
    /// Whether the picture id used 15 bits.
    pub pid15: bool,
    pub tl0: Option<u8>,
    /// Frame start of a keyframe (frame tag P bit clear).
    pub keyframe: bool,
    /// Width and height, from a keyframe.
    pub size: Option<(u16, u16)>,
    /// Layer index and frame number the sim's source wrote (on every packet).
    pub layer: Option<u8>,
    pub frame: Option<u32>,
}

/// Parse a VP8 RTP payload (RFC 7741 descriptor, RFC 6386 frame tag). `None` if malformed.
pub fn parse_vp8(p: &[u8]) -> Option<Vp8Info> {
    let b0 = *p.first()?;
    let mut i = 1;
    let mut info = Vp8Info {
        frame_start: b0 & 0x10 != 0 && b0 & 0x07 == 0,
        picture_id: None,
        pid15: false,
        tl0: None,
        keyframe: false,
        size: None,
        layer: None,
        frame: None,
    };
    if b0 & 0x80 != 0 {
        let x = *p.get(i)?;
        i += 1;
        if x & 0x80 != 0 {
            let m = *p.get(i)?;
            if m & 0x80 != 0 {
                info.picture_id = Some((u16::from(m & 0x7f) << 8) | u16::from(*p.get(i + 1)?));
                info.pid15 = true;
                i += 2;
            } else {
                info.picture_id = Some(u16::from(m));
                i += 1;
            }
        }
        if x & 0x40 != 0 {
            info.tl0 = Some(*p.get(i)?);
            i += 1;
        }
        if x & 0x30 != 0 {
            i += 1;
        }
    }
    if info.frame_start {
        let tag = *p.get(i)?;
        i += 3;
        if tag & 0x01 == 0 {
            info.keyframe = true;
            if p.get(i..i + 3)? == [0x9d, 0x01, 0x2a] {
                let w = u16::from_le_bytes([*p.get(i + 3)?, *p.get(i + 4)?]) & 0x3fff;
                let h = u16::from_le_bytes([*p.get(i + 5)?, *p.get(i + 6)?]) & 0x3fff;
                info.size = Some((w, h));
                i += 7;
            }
        }
    }
    if p.get(i..i + 3) == Some(SIM_TAG) {
        info.layer = p.get(i + 3).copied();
        if let Some(f) = p.get(i + 4..i + 8) {
            info.frame = Some(u32::from_be_bytes([f[0], f[1], f[2], f[3]]));
        }
    }
    Some(info)
}

/// Build the synthetic VP8 payload of one packet of a frame.
fn vp8_payload(
    layer: &VideoLayer,
    layer_index: u8,
    frame: u32,
    start: bool,
    key: bool,
    len: usize,
) -> Bytes {
    let mut p = Vec::with_capacity(len.max(32));
    p.push(0x80 | if start { 0x10 } else { 0 });
    p.push(0xc0); // I, L
    p.push(0x80 | ((layer.picture_id >> 8) as u8 & 0x7f));
    p.push(layer.picture_id as u8);
    p.push(layer.tl0);
    if start {
        // Frame tag: P (bit 0) clear on keyframes, show_frame set; partition size 0.
        p.extend_from_slice(&[if key { 0x10 } else { 0x11 }, 0, 0]);
        if key {
            p.extend_from_slice(&[0x9d, 0x01, 0x2a]);
            p.extend_from_slice(&layer.spec.width.to_le_bytes());
            p.extend_from_slice(&layer.spec.height.to_le_bytes());
        }
    }
    p.extend_from_slice(SIM_TAG);
    p.push(layer_index);
    p.extend_from_slice(&frame.to_be_bytes());
    if p.len() < len {
        p.resize(len, 0x5a);
    }
    Bytes::from(p)
}

/// One RTP packet as a receiver saw it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RxPacket {
    pub at: Instant,
    pub ssrc: u32,
    pub seq: u16,
    pub ts: u32,
    pub marker: bool,
    pub pt: u8,
    pub len: usize,
    /// VP8 tracks only.
    pub vp8: Option<Vp8Info>,
}

/// Everything received on one track (keyed by the track id the remote side gave it).
#[derive(Debug, Clone, Default)]
pub struct RxTrack {
    pub kind: Option<RtpCodecKind>,
    pub receiver: Option<RTCRtpReceiverId>,
    pub stream_ids: Vec<String>,
    pub packets: Vec<RxPacket>,
    /// Padding-only packets (bandwidth probing): no media, kept apart from `packets`.
    pub padding: Vec<RxPacket>,
}

impl RxTrack {
    /// Packets that start a keyframe.
    pub fn keyframes(&self) -> impl Iterator<Item = &RxPacket> {
        self.packets
            .iter()
            .filter(|p| p.vp8.is_some_and(|v| v.keyframe))
    }
    /// The SSRCs seen, in order of first appearance.
    pub fn ssrcs(&self) -> Vec<u32> {
        let mut v: Vec<u32> = Vec::new();
        for p in &self.packets {
            if !v.contains(&p.ssrc) {
                v.push(p.ssrc);
            }
        }
        v
    }
    /// The layer (index into the publisher's encodings) of the last packet that carried one.
    pub fn current_layer(&self) -> Option<u8> {
        self.packets
            .iter()
            .rev()
            .find_map(|p| p.vp8.and_then(|v| v.layer))
    }
    /// Packets received at or after `t`.
    pub fn since(&self, t: Instant) -> impl Iterator<Item = &RxPacket> {
        self.packets.iter().filter(move |p| p.at >= t)
    }
}

/// One data-channel message a peer received.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RxData {
    /// Virtual arrival time (when `rtc` handed the message to the application).
    pub at: Instant,
    /// Label of the channel it arrived on.
    pub label: String,
    /// A text (string) message; false for binary.
    pub is_text: bool,
    pub data: Bytes,
}

/// A data channel of a peer, by label in [`Peer::channels`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChannelInfo {
    pub id: RTCDataChannelId,
    /// When it opened; `None` for one this peer created that is not open yet.
    pub opened_at: Option<Instant>,
    /// When it closed.
    pub closed_at: Option<Instant>,
}

/// An RTCP packet the peer received, as far as the tests care.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum RtcpIn {
    Pli {
        media_ssrc: u32,
    },
    Fir {
        media_ssrc: u32,
    },
    Nack {
        media_ssrc: u32,
        seqs: Vec<u16>,
    },
    SenderReport {
        ssrc: u32,
        ntp: u64,
        rtp: u32,
        packets: u32,
    },
    /// A receiver report block about `ssrc`.
    ReceiverReport {
        ssrc: u32,
        fraction_lost: u8,
        total_lost: u32,
    },
    Twcc,
    Other,
}

/// Hands every inbound RTCP packet to the application as well (marks it
/// `DeliverToApplication`); the interceptors before it still act on it.
#[derive(Default)]
pub struct RtcpTap {
    read: VecDeque<TaggedPacket>,
    write: VecDeque<TaggedPacket>,
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for RtcpTap {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = rtc::shared::error::Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if matches!(&msg.message.packet, IPacket::Rtcp(p) if !p.is_empty()) {
            msg.message.add(Attribute::DeliverToApplication);
        }
        self.read.push_back(msg);
        Ok(())
    }
    fn poll_read(&mut self) -> Option<TaggedPacket> {
        self.read.pop_front()
    }
    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.write.push_back(msg);
        Ok(())
    }
    fn poll_write(&mut self) -> Option<TaggedPacket> {
        self.write.pop_front()
    }
}

impl Interceptor for RtcpTap {
    fn bind_local_stream(&mut self, _: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _: &StreamInfo) {}
}

/// The media engine of every sim peer: Opus 111 (with the audio level extension) and VP8 96
/// with NACK, PLI, FIR and transport-cc feedback; with `rtx`, RTX 97 for VP8.
fn media_engine(rtx: bool) -> rtc::shared::error::Result<MediaEngine> {
    let mut me = MediaEngine::default();
    let fb = |typ: &str, parameter: &str| RTCPFeedback {
        typ: typ.to_owned(),
        parameter: parameter.to_owned(),
    };
    me.register_codec(
        RTCRtpCodecParameters {
            rtp_codec: RTCRtpCodec {
                mime_type: MIME_TYPE_OPUS.to_owned(),
                clock_rate: 48000,
                channels: 2,
                sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
                rtcp_feedback: vec![fb("transport-cc", "")],
            },
            payload_type: OPUS_PT,
        },
        RtpCodecKind::Audio,
    )?;
    me.register_codec(
        RTCRtpCodecParameters {
            rtp_codec: vp8_codec(),
            payload_type: VP8_PT,
        },
        RtpCodecKind::Video,
    )?;
    // The audio level (RFC 6464), which audio packets carry once set (`set_audio_level`).
    me.register_header_extension(
        rtc::rtp_transceiver::rtp_sender::RTCRtpHeaderExtensionCapability {
            uri: AUDIO_LEVEL_URI.to_owned(),
        },
        RtpCodecKind::Audio,
        None,
    )?;
    if rtx {
        me.register_codec(
            RTCRtpCodecParameters {
                rtp_codec: RTCRtpCodec {
                    mime_type: "video/rtx".to_owned(),
                    clock_rate: 90000,
                    channels: 0,
                    sdp_fmtp_line: format!("apt={VP8_PT}"),
                    rtcp_feedback: vec![],
                },
                payload_type: RTX_PT,
            },
            RtpCodecKind::Video,
        )?;
    }
    Ok(me)
}

fn vp8_codec() -> RTCRtpCodec {
    let fb = |typ: &str, parameter: &str| RTCPFeedback {
        typ: typ.to_owned(),
        parameter: parameter.to_owned(),
    };
    RTCRtpCodec {
        mime_type: MIME_TYPE_VP8.to_owned(),
        clock_rate: 90000,
        channels: 0,
        sdp_fmtp_line: String::new(),
        rtcp_feedback: vec![
            fb("goog-remb", ""),
            fb("ccm", "fir"),
            fb("nack", ""),
            fb("nack", "pli"),
            fb("transport-cc", ""),
        ],
    }
}

/// Errors of a sim peer (an `rtc` call failed).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PeerError(pub String);

fn err(e: impl std::fmt::Display) -> PeerError {
    PeerError(e.to_string())
}

/// An `rtc` peer connection plus a media source and a recorder. See the module docs.
pub struct Peer {
    pub pc: RTCPeerConnection,
    pub name: String,
    pub local: SocketAddr,
    pub state: RTCPeerConnectionState,
    /// When the connection first reached `Connected`.
    pub connected_at: Option<Instant>,
    /// Every received track, by the remote side's track id.
    pub tracks: BTreeMap<String, RxTrack>,
    /// Inbound RTCP, with arrival time.
    pub rtcp: Vec<(Instant, RtcpIn)>,
    /// Errors `rtc` returned (a test usually asserts there are none).
    pub errors: Vec<String>,
    /// Data channels, by label (the last one of a label wins).
    pub channels: BTreeMap<String, ChannelInfo>,
    /// Every data-channel message received, in arrival order.
    pub data: Vec<RxData>,
    video: Option<VideoSource>,
    audio: Option<AudioSource>,
    /// Remote track id of each receiver's packets (the poll_read id is the track id).
    receivers: HashMap<String, RTCRtpReceiverId>,
    /// Something went in since the last [`Peer::poll_output`]: drain it. An untouched `rtc`
    /// connection has nothing to say, and polling it costs as much as a small packet.
    dirty: bool,
    /// [`Peer::poll_timeout`]'s answer until the peer is touched again.
    timeout: Option<Option<Instant>>,
}

impl Peer {
    /// A peer at `local` that sends `media` (once connected). `seed` picks its SSRCs,
    /// timestamps and picture ids.
    pub fn new(
        name: &str,
        now: Instant,
        local: SocketAddr,
        seed: u64,
        media: &MediaSpec,
    ) -> Result<Self, PeerError> {
        let mut me = media_engine(media.rtx).map_err(err)?;
        let registry = register_default_interceptors(Registry::new(), &mut me)
            .map_err(err)?
            // Transport-wide sequence numbers on what the peer sends, as browsers do.
            .with(Slot::TwccSender, TwccSenderBuilder::new().build())
            .with(Slot::Custom(50_000), RtcpTap::default());
        let mut pc = RTCPeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_media_engine(me)
            .with_interceptor_registry(registry)
            .build(now)
            .map_err(err)?;
        let cand = CandidateHostConfig {
            base_config: CandidateConfig {
                network: "udp".to_owned(),
                address: local.ip().to_string(),
                port: local.port(),
                component: 1,
                ..Default::default()
            },
            ..Default::default()
        }
        .new_candidate_host()
        .map_err(err)?;
        pc.add_local_candidate(RTCIceCandidate::from(&cand).to_json().map_err(err)?)
            .map_err(err)?;
        pc.add_local_candidate(RTCIceCandidateInit::default())
            .map_err(err)?;
        let mut rng = StdRng::seed_from_u64(seed);
        let stream = format!("{name}-stream");
        let audio = if media.audio {
            let ssrc = rng.random();
            let track = MediaStreamTrack::new(
                stream.clone(),
                format!("{name}-audio"),
                "audio".to_owned(),
                RtpCodecKind::Audio,
                vec![RTCRtpEncodingParameters {
                    rtp_coding_parameters: RTCRtpCodingParameters {
                        ssrc: Some(ssrc),
                        ..Default::default()
                    },
                    codec: RTCRtpCodec {
                        mime_type: MIME_TYPE_OPUS.to_owned(),
                        clock_rate: 48000,
                        channels: 2,
                        sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
                        rtcp_feedback: vec![],
                    },
                    ..Default::default()
                }],
            );
            let sender = pc.add_track(track).map_err(err)?;
            Some(AudioSource {
                sender,
                ssrc,
                seq: rng.random(),
                ts: rng.random(),
                next_frame: None,
                packets: 0,
                level: None,
                level_ext: None,
            })
        } else {
            None
        };
        let video = if media.video.is_empty() {
            None
        } else {
            let mut layers = Vec::new();
            let mut codings = Vec::new();
            for spec in &media.video {
                let ssrc = rng.random();
                // (Drawn only with RTX, so that the other numbers stay as they were.)
                let rtx = media
                    .rtx
                    .then(|| RTCRtpRtxParameters { ssrc: rng.random() });
                codings.push(RTCRtpEncodingParameters {
                    rtp_coding_parameters: RTCRtpCodingParameters {
                        rid: spec.rid.clone(),
                        ssrc: Some(ssrc),
                        rtx,
                        ..Default::default()
                    },
                    codec: vp8_codec(),
                    ..Default::default()
                });
                layers.push(VideoLayer {
                    spec: spec.clone(),
                    ssrc,
                    active: true,
                    stats: LayerStats::default(),
                    seq: rng.random(),
                    ts_base: rng.random(),
                    picture_id: rng.random::<u16>() & 0x7fff,
                    tl0: rng.random(),
                    want_keyframe: true,
                });
            }
            let track = MediaStreamTrack::new(
                stream,
                format!("{name}-video"),
                "video".to_owned(),
                RtpCodecKind::Video,
                codings,
            );
            let sender = pc.add_track(track).map_err(err)?;
            Some(VideoSource {
                sender,
                layers,
                fps: if media.fps == 0 { 30 } else { media.fps },
                next_frame: None,
                frame_no: 0,
                keyframe_interval: media.keyframe_interval,
                last_periodic_key: None,
                mid: None,
                ext: None,
            })
        };
        Ok(Peer {
            pc,
            name: name.to_owned(),
            local,
            state: RTCPeerConnectionState::New,
            connected_at: None,
            tracks: BTreeMap::new(),
            rtcp: Vec::new(),
            errors: Vec::new(),
            channels: BTreeMap::new(),
            data: Vec::new(),
            video,
            audio,
            receivers: HashMap::new(),
            dirty: true,
            timeout: None,
        })
    }

    /// Mark the peer as needing a drain and a fresh deadline. Every method here that feeds
    /// the connection does it; call it after using [`Peer::pc`] directly.
    pub fn touch(&mut self) {
        self.dirty = true;
        self.timeout = None;
    }

    /// Create an offer and set it as the local description; returns its SDP.
    pub fn create_offer(&mut self, now: Instant) -> Result<String, PeerError> {
        self.touch();
        let offer = self.pc.create_offer(None).map_err(err)?;
        self.pc
            .set_local_description(now, offer.clone())
            .map_err(err)?;
        Ok(offer.sdp)
    }

    /// Add a receive-only transceiver of `kind` (what a WHEP player offers).
    pub fn add_recvonly(&mut self, kind: RtpCodecKind) -> Result<(), PeerError> {
        use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
        self.touch();
        self.pc
            .add_transceiver_from_kind(
                kind,
                Some(RTCRtpTransceiverInit {
                    direction: RTCRtpTransceiverDirection::Recvonly,
                    streams: Vec::new(),
                    send_encodings: Vec::new(),
                }),
            )
            .map(|_| ())
            .map_err(err)
    }

    /// Apply a remote answer.
    pub fn accept_answer(&mut self, now: Instant, sdp: &str) -> Result<(), PeerError> {
        self.touch();
        let answer = RTCSessionDescription::answer(sdp.to_owned()).map_err(err)?;
        self.pc.set_remote_description(now, answer).map_err(err)
    }

    /// Apply a remote offer and return the answer (set as the local description).
    pub fn answer(&mut self, now: Instant, sdp: &str) -> Result<String, PeerError> {
        self.touch();
        let offer = RTCSessionDescription::offer(sdp.to_owned()).map_err(err)?;
        self.pc.set_remote_description(now, offer).map_err(err)?;
        let answer = self.pc.create_answer(None).map_err(err)?;
        self.pc
            .set_local_description(now, answer.clone())
            .map_err(err)?;
        Ok(answer.sdp)
    }

    /// A remote ICE candidate (trickled).
    pub fn add_remote_candidate(&mut self, c: RTCIceCandidateInit) -> Result<(), PeerError> {
        self.touch();
        self.pc.add_remote_candidate(c).map_err(err)
    }

    pub fn is_connected(&self) -> bool {
        self.state == RTCPeerConnectionState::Connected
    }

    /// The video source's layers (what was sent, paused or not).
    pub fn video_layers(&self) -> &[VideoLayer] {
        self.video.as_ref().map_or(&[], |v| &v.layers)
    }

    /// Pause or resume the layer with this RID (dynacast); `""` = the only layer.
    pub fn set_layer_active(&mut self, rid: &str, active: bool) {
        self.touch();
        if let Some(v) = self.video.as_mut() {
            for l in v.layers.iter_mut().filter(|l| l.spec.rid == rid) {
                if active && !l.active {
                    // A resumed encoding starts with a keyframe, as a browser's does.
                    l.want_keyframe = true;
                }
                l.active = active;
            }
        }
    }

    /// Audio packets sent.
    /// From now on every audio packet carries this audio level (RFC 6464, −dBov: 0 loudest,
    /// 127 silence); `None`: no level.
    pub fn set_audio_level(&mut self, level: Option<u8>) {
        if let Some(a) = self.audio.as_mut() {
            a.level = level;
        }
    }

    pub fn audio_packets_sent(&self) -> u64 {
        self.audio.as_ref().map_or(0, |a| a.packets)
    }

    /// Send a PLI for the remote track `track_id` (as a receiver whose decoder lost sync).
    pub fn send_pli(&mut self, now: Instant, track_id: &str) -> Result<(), PeerError> {
        self.touch();
        let rid = *self
            .receivers
            .get(track_id)
            .ok_or_else(|| PeerError(format!("no receiver for {track_id}")))?;
        let media_ssrc = self
            .tracks
            .get(track_id)
            .and_then(|t| t.packets.last())
            .map(|p| p.ssrc)
            .unwrap_or(0);
        let mut r = self
            .pc
            .rtp_receiver(rid)
            .ok_or_else(|| PeerError("receiver gone".into()))?;
        r.write_rtcp(
            now,
            vec![Box::new(PictureLossIndication {
                sender_ssrc: 0,
                media_ssrc,
            })],
        )
        .map_err(err)
    }

    /// Create a data channel (before [`Peer::create_offer`], so the offer carries the SCTP
    /// m-line; or later, with a new offer). It is in [`Peer::channels`] at once and open when
    /// its `opened_at` is set.
    pub fn create_data_channel(
        &mut self,
        label: &str,
        init: RTCDataChannelInit,
    ) -> Result<RTCDataChannelId, PeerError> {
        self.touch();
        let id = self
            .pc
            .create_data_channel(label, Some(init))
            .map_err(err)?
            .id();
        self.channels.insert(
            label.to_owned(),
            ChannelInfo {
                id,
                opened_at: None,
                closed_at: None,
            },
        );
        Ok(id)
    }

    /// Whether the channel `label` is open.
    pub fn channel_open(&self, label: &str) -> bool {
        self.channels
            .get(label)
            .is_some_and(|c| c.opened_at.is_some() && c.closed_at.is_none())
    }

    /// Send `data` on the open channel `label`, as a text message (`data` must be UTF-8) or
    /// a binary one.
    pub fn send_data(
        &mut self,
        now: Instant,
        label: &str,
        is_text: bool,
        data: &[u8],
    ) -> Result<(), PeerError> {
        self.touch();
        let id = self
            .channels
            .get(label)
            .filter(|c| c.opened_at.is_some() && c.closed_at.is_none())
            .ok_or_else(|| PeerError(format!("data channel {label:?} is not open")))?
            .id;
        let mut dc = self
            .pc
            .data_channel(id)
            .ok_or_else(|| PeerError(format!("data channel {label:?} is gone")))?;
        if is_text {
            let s = std::str::from_utf8(data).map_err(err)?;
            dc.send_text(now, s)
        } else {
            dc.send(now, BytesMut::from(data))
        }
        .map_err(err)
    }

    /// Messages received on the channel `label`.
    pub fn data_on<'a>(&'a self, label: &'a str) -> impl Iterator<Item = &'a RxData> + 'a {
        self.data.iter().filter(move |d| d.label == label)
    }

    /// Feed a datagram that arrived at `self.local` from `from`.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, data: BytesMut) {
        self.touch();
        let r = self.pc.handle_read(TaggedBytesMut {
            now,
            transport: TransportContext {
                local_addr: self.local,
                peer_addr: from,
                ecn: None,
                transport_protocol: TransportProtocol::UDP,
            },
            message: data,
        });
        if let Err(e) = r {
            self.errors.push(format!("handle_read: {e}"));
        }
    }

    /// The next instant the peer wants [`Peer::handle_timeout`].
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        if let Some(t) = self.timeout {
            return t;
        }
        let t = self.compute_timeout();
        self.timeout = Some(t);
        t
    }

    fn compute_timeout(&mut self) -> Option<Instant> {
        let mut t = self.pc.poll_timeout();
        for m in [
            self.video.as_ref().and_then(|v| v.next_frame),
            self.audio.as_ref().and_then(|a| a.next_frame),
        ]
        .into_iter()
        .flatten()
        {
            t = Some(t.map_or(m, |t| t.min(m)));
        }
        t
    }

    /// Send the media frames that are due, and let `rtc` run its timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.touch();
        self.send_audio(now);
        self.send_video(now);
        if self.pc.poll_timeout().is_some_and(|t| t <= now) {
            if let Err(e) = self.pc.handle_timeout(now) {
                self.errors.push(format!("handle_timeout: {e}"));
            }
        }
    }

    fn send_audio(&mut self, now: Instant) {
        let Some(a) = self.audio.as_mut() else { return };
        let Some(due) = a.next_frame else { return };
        if due > now {
            return;
        }
        let mut payload = vec![0x78u8];
        payload.resize(80, 0x33);
        let mut header = rtp::header::Header {
            version: 2,
            payload_type: OPUS_PT,
            sequence_number: a.seq,
            timestamp: a.ts,
            ssrc: a.ssrc,
            marker: false,
            ..Default::default()
        };
        let (level, sender, cached) = (a.level, a.sender, a.level_ext);
        if let Some(level) = level {
            let ext = cached.or_else(|| self.header_ext_id(sender, AUDIO_LEVEL_URI));
            if let Some(id) = ext {
                let _ = header.set_extension(id, Bytes::copy_from_slice(&[level & 0x7f]));
            }
            if let Some(a) = self.audio.as_mut() {
                // (Not negotiated yet: looked up again at the next packet.)
                a.level_ext = ext;
            }
        }
        let Some(a) = self.audio.as_mut() else { return };
        let packet = rtp::Packet {
            header,
            payload: Bytes::from(payload),
        };
        a.seq = a.seq.wrapping_add(1);
        a.ts = a.ts.wrapping_add(960);
        a.packets += 1;
        a.next_frame = Some(due + Duration::from_millis(20));
        let sender = a.sender;
        if let Some(mut s) = self.pc.rtp_sender(sender) {
            if let Err(e) = s.write_rtp(now, packet) {
                self.errors.push(format!("write_rtp audio: {e}"));
            }
        }
    }

    fn send_video(&mut self, now: Instant) {
        let Some(mut v) = self.video.take() else {
            return;
        };
        if let Some(due) = v.next_frame.filter(|d| *d <= now) {
            if v.ext.is_none() {
                v.ext = Some(self.header_ext_ids(v.sender));
                v.mid = self.video_mid();
            }
            let (mid_id, rid_id) = v.ext.unwrap_or((None, None));
            let periodic = v.keyframe_interval.is_some_and(|i| {
                v.last_periodic_key
                    .is_none_or(|t| now.duration_since(t) >= i)
            });
            if periodic {
                v.last_periodic_key = Some(now);
            }
            let fps = v.fps;
            let frame_no = v.frame_no;
            for (index, layer) in v.layers.iter_mut().enumerate() {
                if !layer.active {
                    layer.stats.paused_frames += 1;
                    continue;
                }
                let key = layer.want_keyframe || periodic;
                layer.want_keyframe = false;
                let mut bytes = (layer.spec.bitrate_bps / 8 / fps) as usize;
                if key {
                    bytes *= 3;
                }
                let n = bytes.div_ceil(MAX_PAYLOAD).max(1);
                let ts = layer
                    .ts_base
                    .wrapping_add((frame_no * 90_000 / u64::from(fps)) as u32);
                for i in 0..n {
                    let len = (bytes / n).max(24);
                    let payload =
                        vp8_payload(layer, index as u8, frame_no as u32, i == 0, key, len);
                    let mut header = rtp::header::Header {
                        version: 2,
                        payload_type: VP8_PT,
                        sequence_number: layer.seq,
                        timestamp: ts,
                        ssrc: layer.ssrc,
                        marker: i + 1 == n,
                        ..Default::default()
                    };
                    if let (Some(id), Some(mid)) = (mid_id, v.mid.as_ref()) {
                        let _ = header.set_extension(id, Bytes::from(mid.clone().into_bytes()));
                    }
                    if let Some(id) = rid_id.filter(|_| !layer.spec.rid.is_empty()) {
                        let _ = header
                            .set_extension(id, Bytes::from(layer.spec.rid.clone().into_bytes()));
                    }
                    layer.seq = layer.seq.wrapping_add(1);
                    layer.stats.packets += 1;
                    layer.stats.bytes += payload.len() as u64;
                    if let Some(mut s) = self.pc.rtp_sender(v.sender) {
                        if let Err(e) = s.write_rtp(now, rtp::Packet { header, payload }) {
                            self.errors.push(format!("write_rtp video: {e}"));
                        }
                    }
                }
                layer.stats.frames += 1;
                if key {
                    layer.stats.keyframes += 1;
                }
                layer.picture_id = (layer.picture_id + 1) & 0x7fff;
                layer.tl0 = layer.tl0.wrapping_add(1);
            }
            v.frame_no += 1;
            v.next_frame = Some(due + Duration::from_nanos(1_000_000_000 / u64::from(fps)));
        }
        self.video = Some(v);
    }

    /// The negotiated id of header extension `uri` on a sender.
    fn header_ext_id(&mut self, sender: RTCRtpSenderId, uri: &str) -> Option<u8> {
        let mut s = self.pc.rtp_sender(sender)?;
        let params = s.get_parameters();
        params
            .rtp_parameters
            .header_extensions
            .iter()
            .find(|e| e.uri == uri)
            .map(|e| e.id as u8)
    }

    /// Negotiated (mid, rid) header extension ids of a sender.
    fn header_ext_ids(&mut self, sender: RTCRtpSenderId) -> (Option<u8>, Option<u8>) {
        (
            self.header_ext_id(sender, SDES_MID_URI),
            self.header_ext_id(sender, SDES_RTP_STREAM_ID_URI),
        )
    }

    /// The mid of the video m-section of the local description.
    fn video_mid(&self) -> Option<String> {
        let sdp = self.pc.local_description()?.sdp;
        let mut in_video = false;
        for line in sdp.lines() {
            if let Some(m) = line.strip_prefix("m=") {
                in_video = m.starts_with("video");
            } else if in_video {
                if let Some(mid) = line.strip_prefix("a=mid:") {
                    return Some(mid.trim().to_owned());
                }
            }
        }
        None
    }

    /// Drain events, inbound messages and outbound datagrams into `out`.
    pub fn poll_output(&mut self, now: Instant, out: &mut Output) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        self.timeout = None;
        while let Some(ev) = self.pc.poll_event() {
            match ev {
                RTCPeerConnectionEvent::OnConnectionStateChangeEvent(s) => {
                    self.state = s;
                    if s == RTCPeerConnectionState::Connected && self.connected_at.is_none() {
                        self.connected_at = Some(now);
                        if let Some(a) = self.audio.as_mut() {
                            a.next_frame = Some(now);
                        }
                        if let Some(v) = self.video.as_mut() {
                            v.next_frame = Some(now);
                        }
                    }
                }
                RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(init)) => {
                    let kind = self
                        .pc
                        .rtp_receiver(init.receiver_id)
                        .map(|r| r.track().kind());
                    self.receivers
                        .insert(init.track_id.clone(), init.receiver_id);
                    let t = self.tracks.entry(init.track_id.clone()).or_default();
                    t.kind = kind;
                    t.receiver = Some(init.receiver_id);
                    t.stream_ids = init.stream_ids.clone();
                }
                RTCPeerConnectionEvent::OnDataChannel(RTCDataChannelEvent::OnOpen(id)) => {
                    let label = self.pc.data_channel(id).map(|dc| dc.label().to_owned());
                    if let Some(label) = label {
                        self.channels.insert(
                            label,
                            ChannelInfo {
                                id,
                                opened_at: Some(now),
                                closed_at: None,
                            },
                        );
                    }
                }
                RTCPeerConnectionEvent::OnDataChannel(RTCDataChannelEvent::OnClose(id)) => {
                    for c in self.channels.values_mut().filter(|c| c.id == id) {
                        c.closed_at.get_or_insert(now);
                    }
                }
                _ => {}
            }
        }
        while let Some(TaggedRTCMessage { now: at, message }) = self.pc.poll_read() {
            match message {
                RTCMessage::RtpPacket(track_id, p) => {
                    let t = self.tracks.entry(track_id).or_default();
                    let padding = p.header.padding && p.payload.is_empty();
                    let vp8 = if !padding
                        && (p.header.payload_type == VP8_PT || t.kind == Some(RtpCodecKind::Video))
                    {
                        parse_vp8(&p.payload)
                    } else {
                        None
                    };
                    let rx = RxPacket {
                        at,
                        ssrc: p.header.ssrc,
                        seq: p.header.sequence_number,
                        ts: p.header.timestamp,
                        marker: p.header.marker,
                        pt: p.header.payload_type,
                        len: p.payload.len(),
                        vp8,
                    };
                    if padding {
                        t.padding.push(rx);
                    } else {
                        t.packets.push(rx);
                    }
                }
                RTCMessage::RtcpPacket(_, packets) => {
                    for p in packets {
                        let any = p.as_any();
                        let item = if let Some(pli) = any.downcast_ref::<PictureLossIndication>() {
                            self.keyframe_requested(pli.media_ssrc);
                            RtcpIn::Pli {
                                media_ssrc: pli.media_ssrc,
                            }
                        } else if let Some(fir) = any.downcast_ref::<FullIntraRequest>() {
                            let ssrc = fir.fir.first().map_or(fir.media_ssrc, |e| e.ssrc);
                            self.keyframe_requested(ssrc);
                            RtcpIn::Fir { media_ssrc: ssrc }
                        } else if let Some(n) = any.downcast_ref::<TransportLayerNack>() {
                            let mut seqs = Vec::new();
                            for pair in &n.nacks {
                                seqs.extend(pair.packet_list());
                            }
                            RtcpIn::Nack {
                                media_ssrc: n.media_ssrc,
                                seqs,
                            }
                        } else if let Some(sr) = any.downcast_ref::<SenderReport>() {
                            RtcpIn::SenderReport {
                                ssrc: sr.ssrc,
                                ntp: sr.ntp_time,
                                rtp: sr.rtp_time,
                                packets: sr.packet_count,
                            }
                        } else if let Some(rr) = any.downcast_ref::<ReceiverReport>() {
                            for r in &rr.reports {
                                self.rtcp.push((
                                    at,
                                    RtcpIn::ReceiverReport {
                                        ssrc: r.ssrc,
                                        fraction_lost: r.fraction_lost,
                                        total_lost: r.total_lost,
                                    },
                                ));
                            }
                            continue;
                        } else if any.is::<TransportLayerCc>() {
                            RtcpIn::Twcc
                        } else {
                            RtcpIn::Other
                        };
                        self.rtcp.push((at, item));
                    }
                }
                RTCMessage::DataChannelMessage(id, m) => {
                    let label = self
                        .channels
                        .iter()
                        .find(|(_, c)| c.id == id)
                        .map(|(l, _)| l.clone())
                        .or_else(|| self.pc.data_channel(id).map(|dc| dc.label().to_owned()))
                        .unwrap_or_default();
                    self.data.push(RxData {
                        at,
                        label,
                        is_text: m.is_string,
                        data: m.data.freeze(),
                    });
                }
                _ => {}
            }
        }
        while let Some(m) = self.pc.poll_write() {
            out.datagrams
                .push((self.local, m.transport.peer_addr, m.message));
        }
    }

    fn keyframe_requested(&mut self, media_ssrc: u32) {
        if let Some(v) = self.video.as_mut() {
            let mut hit = false;
            for l in v.layers.iter_mut().filter(|l| l.ssrc == media_ssrc) {
                l.want_keyframe = true;
                hit = true;
            }
            if !hit {
                for l in v.layers.iter_mut() {
                    l.want_keyframe = true;
                }
            }
        }
    }

    /// Count of inbound RTCP items matching `f`.
    pub fn rtcp_count(&self, f: impl Fn(&RtcpIn) -> bool) -> usize {
        self.rtcp.iter().filter(|(_, r)| f(r)).count()
    }
}

#[cfg(test)]
// Tests pick an arbitrary origin for their virtual time (and may share test state).
#[allow(clippy::disallowed_methods, clippy::disallowed_types)]
mod tests {
    use super::*;
    use crate::sfu::vp8;

    fn layer(pid: u16, tl0: u8) -> VideoLayer {
        VideoLayer {
            spec: LayerSpec::new("h", 500_000, 640, 360),
            ssrc: 1,
            active: true,
            stats: LayerStats::default(),
            seq: 0,
            ts_base: 0,
            picture_id: pid,
            tl0,
            want_keyframe: false,
        }
    }

    /// The synthetic payloads are what the server's own VP8 parser expects: descriptor
    /// fields, frame start, keyframe bit and size.
    #[test]
    fn synthetic_vp8_parses_like_the_server_parses_it() {
        let l = layer(0x1234, 7);
        let key = vp8_payload(&l, 1, 99, true, true, 600);
        let d = vp8::parse_descriptor(&key).expect("descriptor");
        assert!(d.is_frame_start());
        assert_eq!(d.picture_id.map(|p| p.value()), Some(0x1234));
        assert_eq!(d.tl0_pic_idx, Some(7));
        assert!(vp8::is_keyframe(&key));
        let size = vp8::keyframe_size(&key).expect("size");
        assert_eq!((size.width, size.height), (640, 360));
        assert_eq!(key.len(), 600);
        let mine = parse_vp8(&key).unwrap();
        assert_eq!(
            (
                mine.frame_start,
                mine.keyframe,
                mine.size,
                mine.layer,
                mine.frame
            ),
            (true, true, Some((640, 360)), Some(1), Some(99))
        );
        assert_eq!(
            (mine.picture_id, mine.tl0, mine.pid15),
            (Some(0x1234), Some(7), true)
        );

        let inter = vp8_payload(&l, 1, 100, true, false, 300);
        assert!(!vp8::is_keyframe(&inter));
        assert!(vp8::parse_descriptor(&inter).unwrap().is_frame_start());
        assert!(!parse_vp8(&inter).unwrap().keyframe);

        let middle = vp8_payload(&l, 2, 100, false, false, 300);
        assert!(!vp8::parse_descriptor(&middle).unwrap().is_frame_start());
        let m = parse_vp8(&middle).unwrap();
        assert_eq!(
            (m.frame_start, m.layer, m.frame),
            (false, Some(2), Some(100))
        );
    }

    #[test]
    fn parse_vp8_never_panics_on_short_input() {
        let full = vp8_payload(&layer(5, 1), 0, 1, true, true, 64);
        for n in 0..full.len() {
            let _ = parse_vp8(&full[..n]);
        }
        assert!(parse_vp8(&[]).is_none());
    }
}
