//! The SFU core as a state machine: rooms, participants, every `rtc` peer connection,
//! published tracks and their down-tracks. One owner, no locks on the packet path.
//!
//! [`Sfu`] never touches a socket, a runtime or the clock. It is handed `now` with every input
//! (a datagram, a command from signaling, a timeout), writes the datagrams it produces to a
//! [`Transmit`] sink and the signaling events to each participant's channel, and says when it
//! next needs to be woken and why ([`Sfu::poll_timeout`]). Work found while handling an input
//! that must wait for the end of the turn is queued as an [`Effect`] and applied by
//! [`Sfu::end_turn`]. The driver (`crate::io`) owns the real socket and clock; the
//! virtual-time tests drive the same core over a simulated network.

use super::data::{self, DataError};
use super::demux::{self, BindingKind, Claim, Demux, DropCounters};
use super::effects::{Effect, Effects};
use super::egress::{self, Egress, EgressStats, KeyCapture, Outgoing};
use super::forward::{self, Decision, DownTrack, DropReason};
use super::h264;
use super::ids::{PartKey, RoomKey, TrackId};
use super::ingress::{self, Ingress, IngressStats};
use super::keyframe::SwitchWatch;
use super::outbox::Outbox;
use super::pipe::{self, PipeMsg, PipeOut, RelayId, ShardId, Submitted, layer_bits};
use super::red;
use super::rewrite::{Rewriter, Vp8Munger};
use super::room::{
    Channel, EARLY_MAX, Layer, Participant, Pc, PcKey, PcKind, PubTrack, Publisher, RemoteMember,
    Room, RoomTimeline, Section, Track, Viewer,
};
use super::sdpcheck;
use super::selector::{LayerSelector, Requested, layer_quality, needed_layers};
use super::speaker::AudioLevel;
use super::timeline::Lane;
use super::timers::{Deadline, Periodic, Reason, TimerQueue, soonest};
use super::vp8;
use super::{Command, CoreStats, Flow, JoinAccepted, JoinRequest, Remote, SfuError, Transmit};
use crate::signal::{
    ClientMessage, ErrorCode, LeaveReason, PROTOCOL_VERSION, ParticipantInfo, PcTarget, Quality,
    ServerMessage, TrackInfo, TrackKind,
};
use crate::webhook;
use bytes::{Bytes, BytesMut};
use rtc::data_channel::{RTCDataChannelId, RTCDataChannelInit};
use rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile;
use rtc::ice::tcp_type::TcpType;
use rtc::interceptor::Registry;
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
use rtc::peer_connection::configuration::media_engine::{
    MIME_TYPE_H264, MIME_TYPE_OPUS, MIME_TYPE_RTX, MIME_TYPE_VP8, MediaEngine,
};
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::configuration::{RTCConfigurationBuilder, RTCOfferOptions};
use rtc::peer_connection::event::{RTCDataChannelEvent, RTCPeerConnectionEvent, RTCTrackEvent};
use rtc::peer_connection::message::{RTCMessage, TaggedRTCMessage};
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::transport::{
    CandidateConfig, CandidateHostConfig, RTCDtlsRole, RTCIceCandidate, RTCIceCandidateInit,
};
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtp;
use rtc::rtp_transceiver::RTCRtpSenderId;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters,
    RTCRtpEncodingParameters, RTCRtpHeaderExtensionCapability, RTCRtpRtxParameters, RtpCodecKind,
};
use rtc::sansio::Protocol;
use rtc::sdp::extmap::{AUDIO_LEVEL_URI, TRANSPORT_CC_URI};
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use rustc_hash::FxHashMap;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};
use tracing::{debug, info, info_span, trace, warn};

/// What the core needs to know.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Addresses written into the server's ICE candidates (one host candidate each),
    /// all with the UDP socket's port.
    pub announce_ips: Vec<IpAddr>,
    /// Largest data-channel payload relayed, in bytes.
    pub max_data_message: usize,
    /// Per-participant and per-turn limits.
    pub limits: super::CoreLimits,
    /// Receive and send buffer asked of the kernel for the media socket, in bytes.
    pub udp_buffer: usize,
    /// A room with this many participants spreads over the shards (0: never).
    pub spread_above: usize,
    /// Bounds of each room's `chat` history.
    pub history: super::timeline::HistoryLimits,
    /// Input tick rate of a room whose opening join's token sets none (0: off).
    pub input_tick_hz: u32,
    /// Where webhook events go (`None`: webhooks off). Only the shard where a participant or
    /// track event originates emits it, never one that relays it.
    pub webhooks: Option<crate::webhook::Emitter>,
    /// Negotiate RFC 2198 redundant audio (`audio/red`) next to Opus (`--no-red`: off).
    pub red: bool,
}

/// A participant as webhook events name it.
fn hook_ref(p: &Participant) -> webhook::ParticipantRef {
    webhook::ParticipantRef {
        id: p.pid.clone(),
        identity: p.identity.clone(),
        name: p.name.clone(),
        session_id: p.session.clone(),
        hidden: p.grants.hidden,
    }
}

/// The first byte of a DTLS record of application data (SCTP: data channels).
pub const DTLS_APPLICATION_DATA: u8 = 23;
/// A simulcast layer nobody needs for this long is paused at the publisher.
const DYNACAST_GRACE: Duration = Duration::from_secs(5);
/// How often layer selection runs (besides on every packet).
const SELECT_INTERVAL: Duration = Duration::from_millis(250);
/// An estimate below this share (%) of the one the last selection used triggers a selection
/// at once.
const SHARP_DROP_PERCENT: u64 = 70;
/// Why a participant is removed when its identity joins again.
const REPLACED: &str = "replaced: the same identity joined the room again";
/// A participant whose transport never connects is dropped after this long.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// How often RTCP sender reports go out for every forwarded stream.
const SENDER_REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// How often stale demultiplexer entries are forgotten.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(1);

/// The SFU core. `T` is where its datagrams go: the driver's batched UDP socket, or a
/// simulated network.
pub struct Sfu<T: Transmit> {
    cfg: CoreConfig,
    local_addr: SocketAddr,
    tx: T,
    /// The time of the input being handled (never read from the clock).
    now: Instant,
    /// Wall-clock time at `clock_anchor.0` (sender reports carry wall-clock time).
    clock_anchor: (Instant, SystemTime),
    /// Every id, SSRC, initial sequence number and ICE credential comes from here.
    rng: rand::rngs::StdRng,
    /// Every room; each owns its participants and tracks.
    rooms: FxHashMap<RoomKey, Room>,
    /// Room name → key.
    room_keys: HashMap<String, RoomKey>,
    /// Participant id (`PA_…`) → key.
    by_pid: HashMap<String, PartKey>,
    /// Messages for the other shards hosting our rooms, sent at the end of the turn.
    pipe_out: PipeOut,
    /// Packets read this turn whose subscribers' copies are made at its end (see
    /// [`Sfu::copy_arrivals`]).
    arrivals: Vec<Arrival>,
    /// Tracks relayed to us: (publisher's shard, its relay id) → our copy.
    relays_in: HashMap<(ShardId, RelayId), (RoomKey, TrackId)>,
    /// Our tracks by relay id (the other shards name them so).
    relays_out: HashMap<RelayId, (RoomKey, TrackId)>,
    next_relay: RelayId,
    /// Shards that said hello for a room before it opened here: they are greeted when it
    /// opens.
    early_hellos: HashMap<String, BTreeSet<ShardId>>,
    /// When rooms' pending input ticks end (this shard being their home).
    tick_due: BTreeSet<(Instant, RoomKey)>,
    /// Which connection each datagram belongs to.
    demux: Demux<PcKey>,
    /// Datagrams dropped, by reason, and log lines for them (rate-limited).
    drops: DropCounters,
    /// Peer connections' deadlines (`Pc::deadline` holds the current one of each).
    timers: TimerQueue<PcKey>,
    /// When each participant that has not connected yet is due to be dropped.
    connect_timers: TimerQueue<PartKey>,
    select_timer: Periodic,
    report_timer: Periodic,
    maintenance_timer: Periodic,
    dirty: VecDeque<PcKey>,
    stats: CoreStats,
    /// Fast-path counters of participants that have left.
    departed_egress: EgressStats,
    departed_ingress: IngressStats,
    next_id: u32,
    next_room: u32,
    /// Work deferred to the end of the turn.
    effects: Effects,
    /// Participants with events waiting in their outbox.
    backlogged: BTreeSet<PartKey>,
    shutting_down: bool,
    /// ICE-TCP (RFC 6544): the port of the passive candidates, and the open connections.
    ice_tcp: IceTcp,
    /// Connection quality per participant (see `quality`).
    quality: quality::QualityBook,
    /// Active speakers per room (see `speaker`).
    speakers: speaker::SpeakerBook,
}

/// ICE over TCP, passive side: the driver accepts the connections and unframes them; the core
/// announces the candidates and tags what arrives on a connection as TCP.
#[derive(Debug, Default)]
struct IceTcp {
    /// The TCP port announced in a `tcptype passive` candidate after each UDP one (`None`:
    /// no TCP candidates).
    port: Option<u16>,
    /// Open connections: the client's address → the local candidate address it reached.
    peers: HashMap<SocketAddr, SocketAddr>,
}

/// The IP of the local candidate a datagram arrived on: `rtc`'s ICE agent finds the candidate
/// by address, so a socket bound to `0.0.0.0` (or a private IP behind 1:1 NAT) stands for the
/// announced IP, the first one unless the socket's own IP is announced.
fn candidate_ip(announced: &[IpAddr], local: IpAddr) -> IpAddr {
    if announced.contains(&local) {
        local
    } else {
        announced.first().copied().unwrap_or(local)
    }
}

fn random_string(rng: &mut impl rand::Rng, n: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    (0..n)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Is this a keyframe start of the given codec?
pub fn is_keyframe(mime: &str, payload: &[u8]) -> bool {
    if mime.eq_ignore_ascii_case(MIME_TYPE_VP8) {
        vp8::is_keyframe(payload)
    } else if mime.eq_ignore_ascii_case(MIME_TYPE_H264) {
        h264::is_keyframe(payload)
    } else {
        true
    }
}

/// Opus as every connection negotiates it: in-band FEC on (`useinbandfec=1`), so a decoder
/// that misses a packet recovers it from the next one's FEC data (the SFU forwards Opus payloads
/// untouched).
fn opus_codec() -> RTCRtpCodecParameters {
    RTCRtpCodecParameters {
        rtp_codec: RTCRtpCodec {
            mime_type: MIME_TYPE_OPUS.to_owned(),
            clock_rate: 48000,
            channels: 2,
            sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
            rtcp_feedback: vec![],
        },
        payload_type: 111,
    }
}

/// RFC 2198 redundant Opus (`red/48000/2`, fmtp `111/111`) as Chromium offers it.
fn red_codec() -> RTCRtpCodecParameters {
    RTCRtpCodecParameters {
        rtp_codec: RTCRtpCodec {
            mime_type: red::MIME_TYPE_RED.to_owned(),
            clock_rate: 48000,
            channels: 2,
            sdp_fmtp_line: "111/111".to_owned(),
            rtcp_feedback: vec![],
        },
        payload_type: red::RED_PAYLOAD_TYPE,
    }
}

/// The codecs every connection negotiates: Opus (and RED, unless `red` is off), VP8, H.264.
fn media_engine(red: bool) -> Result<MediaEngine, rtc::shared::error::Error> {
    let mut me = MediaEngine::default();
    let fb = |typ: &str, parameter: &str| RTCPFeedback {
        typ: typ.to_owned(),
        parameter: parameter.to_owned(),
    };
    if red {
        me.register_codec(red_codec(), RtpCodecKind::Audio)?;
    }
    me.register_codec(opus_codec(), RtpCodecKind::Audio)?;
    let video_fb = vec![
        fb("goog-remb", ""),
        fb("ccm", "fir"),
        fb("nack", ""),
        fb("nack", "pli"),
    ];
    me.register_codec(
        RTCRtpCodecParameters {
            rtp_codec: RTCRtpCodec {
                mime_type: MIME_TYPE_VP8.to_owned(),
                clock_rate: 90000,
                channels: 0,
                sdp_fmtp_line: String::new(),
                rtcp_feedback: video_fb.clone(),
            },
            payload_type: 96,
        },
        RtpCodecKind::Video,
    )?;
    for (payload_type, fmtp) in h264::FORMATS {
        me.register_codec(
            RTCRtpCodecParameters {
                rtp_codec: RTCRtpCodec {
                    mime_type: MIME_TYPE_H264.to_owned(),
                    clock_rate: 90000,
                    channels: 0,
                    sdp_fmtp_line: fmtp.to_owned(),
                    rtcp_feedback: video_fb.clone(),
                },
                payload_type,
            },
            RtpCodecKind::Video,
        )?;
    }
    Ok(me)
}

/// A publisher's offer applied: every audio section's answer lists RED ahead of Opus, so
/// Chromium sends RED where it offered it (`red::red_before_opus`).
fn answer_red_first(rtc: &mut RTCPeerConnection) {
    for id in rtc.get_transceivers().collect::<Vec<_>>() {
        let Some(receiver) = rtc.rtp_transceiver(id).and_then(|t| t.receiver()) else {
            continue;
        };
        // (Only an audio section lists both; the receiver's track has no kind before media.)
        let Some(mut r) = rtc.rtp_receiver(receiver) else {
            continue;
        };
        let mut codecs = r.get_parameters().rtp_parameters.codecs.clone();
        if red::red_before_opus(&mut codecs) {
            if let Some(Err(e)) = rtc
                .rtp_transceiver(id)
                .map(|mut t| t.set_codec_preferences(codecs))
            {
                debug!("RED ahead of Opus refused: {e}");
            }
        }
    }
}

/// An audio down-track's section offers Opus and RED (the track goes as RED where the
/// subscriber answers with both, as plain Opus where it answers with Opus alone), so a
/// subscriber's negotiated codecs keep RED for the RED tracks that come later. Opus comes
/// first: a subscriber that answers with one codec only takes the first (GStreamer's
/// webrtcbin does), and every subscriber can decode Opus; a browser answers with both.
fn offer_red(rtc: &mut RTCPeerConnection, sender: RTCRtpSenderId) {
    let ids: Vec<_> = rtc.get_transceivers().collect();
    let Some(id) = ids.into_iter().find(|&id| {
        rtc.rtp_transceiver(id)
            .is_some_and(|t| t.sender() == Some(sender))
    }) else {
        return;
    };
    if let Some(Err(e)) = rtc
        .rtp_transceiver(id)
        .map(|mut t| t.set_codec_preferences(vec![opus_codec(), red_codec()]))
    {
        // The subscriber answered an earlier audio section without RED: Opus alone.
        debug!("RED not offered: {e}");
    }
}

/// RTX (RFC 4588) for each video codec of [`media_engine`]: `rtx/90000` with `apt=` its
/// payload type. Registered on subscriber connections: retransmissions go on each
/// down-track's RTX stream (`a=ssrc-group:FID`) where the subscriber accepts it.
fn register_rtx(me: &mut MediaEngine) -> Result<(), rtc::shared::error::Error> {
    // VP8 96 → 97; each H.264 format's payload type → the odd one after it.
    let video = std::iter::once(96).chain(h264::FORMATS.iter().map(|&(pt, _)| pt));
    for (pt, apt) in video.map(|apt| (apt + 1, apt)) {
        me.register_codec(
            RTCRtpCodecParameters {
                rtp_codec: RTCRtpCodec {
                    mime_type: MIME_TYPE_RTX.to_owned(),
                    clock_rate: 90000,
                    channels: 0,
                    sdp_fmtp_line: format!("apt={apt}"),
                    rtcp_feedback: vec![],
                },
                payload_type: pt,
            },
            RtpCodecKind::Video,
        )?;
    }
    Ok(())
}

/// What a publisher connection negotiated for RTX: from its local (answer) and remote (offer)
/// descriptions.
fn rtx_config_of(pc: &Pc) -> ingress::RtxConfig {
    match (pc.rtc.local_description(), pc.rtc.remote_description()) {
        (Some(l), Some(r)) => ingress::rtx_config(&l.sdp, &r.sdp),
        _ => ingress::RtxConfig::default(),
    }
}

/// The RTX stream negotiated for a sender whose media goes with `payload_type`: its SSRC
/// (the encoding's, announced in `a=ssrc-group:FID`) and the RTX payload type whose `apt` is
/// `payload_type`. `None` when the subscriber did not accept RTX.
fn negotiated_rtx(
    params: &rtc::rtp_transceiver::rtp_sender::RTCRtpSendParameters,
    payload_type: u8,
) -> Option<(u32, u8)> {
    let ssrc = params
        .encodings
        .first()?
        .rtp_coding_parameters
        .rtx
        .as_ref()?
        .ssrc;
    let apt = format!("apt={payload_type}");
    let pt = params.rtp_parameters.codecs.iter().find_map(|c| {
        (c.rtp_codec.mime_type.eq_ignore_ascii_case(MIME_TYPE_RTX)
            && c.rtp_codec
                .sdp_fmtp_line
                .split(';')
                .any(|kv| kv.trim() == apt))
        .then_some(c.payload_type)
    })?;
    Some((ssrc, pt))
}

/// The participant `$k` of core `$s`, borrowing only the rooms (so other fields of the core
/// stay usable while it is held).
macro_rules! part_mut {
    ($s:expr, $k:expr) => {{
        let k: PartKey = $k;
        $s.rooms
            .get_mut(&k.room)
            .and_then(|r| r.parts.get_mut(&k))
            .map(|p| &mut **p)
    }};
}

pub mod dashboard;
mod fanout;
mod ice;
mod moderation;
mod probing;
mod quality;
mod speaker;
mod timeline;
mod viewer;

/// A packet of a track read this turn, for its subscribers' copies at the turn's end.
struct Arrival {
    room: RoomKey,
    track: TrackId,
    packet: rtp::Packet,
    meta: forward::Packet,
    /// When it reached the publisher's shard.
    origin: Instant,
    /// H.264 parameter sets to send ahead of this IDR where a down-track starts at it.
    h264_prefix: Option<Bytes>,
}

/// Hand what is queued for other shards to the sink, one batch per destination and lane.
fn hand_over<T: Transmit>(out: &mut PipeOut, tx: &mut T, stats: &mut CoreStats) {
    if out.is_empty() {
        return;
    }
    for (to, lane, msgs) in out.take() {
        stats.pipe_msgs_out += msgs.len() as u64;
        tx.pipe(to, lane, msgs);
    }
}

impl<T: Transmit> Sfu<T> {
    /// A core whose media address is `local_addr` (the port its candidates announce), with
    /// randomness from `seed`, created at `now`, writing its datagrams to `tx`.
    pub fn new(cfg: CoreConfig, local_addr: SocketAddr, seed: u64, now: Instant, tx: T) -> Self {
        use rand::SeedableRng;
        Sfu {
            cfg,
            local_addr,
            tx,
            now,
            // Sender reports need wall-clock time; without an anchor (virtual time) the core
            // starts at a fixed date.
            clock_anchor: (
                now,
                SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600),
            ),
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            rooms: FxHashMap::default(),
            room_keys: HashMap::new(),
            by_pid: HashMap::new(),
            pipe_out: PipeOut::default(),
            arrivals: Vec::new(),
            relays_in: HashMap::new(),
            relays_out: HashMap::new(),
            next_relay: 0,
            early_hellos: HashMap::new(),
            tick_due: BTreeSet::new(),
            demux: Demux::new(),
            drops: DropCounters::default(),
            timers: TimerQueue::default(),
            connect_timers: TimerQueue::default(),
            select_timer: Periodic::new(now, SELECT_INTERVAL, Reason::LayerSelection),
            report_timer: Periodic::new(now, SENDER_REPORT_INTERVAL, Reason::SenderReports),
            maintenance_timer: Periodic::new(now, MAINTENANCE_INTERVAL, Reason::Maintenance),
            dirty: VecDeque::new(),
            stats: CoreStats::default(),
            departed_egress: EgressStats::default(),
            departed_ingress: IngressStats::default(),
            next_id: 1,
            next_room: 0,
            effects: Effects::default(),
            backlogged: BTreeSet::new(),
            shutting_down: false,
            ice_tcp: IceTcp::default(),
            quality: quality::QualityBook::new(now),
            speakers: speaker::SpeakerBook::new(now),
        }
    }

    /// The wall-clock time at `at` (an instant of the core's clock); sender reports carry it.
    pub fn with_wall_clock(mut self, at: Instant, wall: SystemTime) -> Self {
        self.clock_anchor = (at, wall);
        self
    }

    /// Announce a `tcptype passive` TCP host candidate on `port` after each UDP one (ICE-TCP,
    /// RFC 6544; lower priority than UDP). The driver accepts the connections and hands their
    /// frames to [`Sfu::handle_tcp_frame`] after [`Sfu::tcp_opened`].
    pub fn with_tcp_port(mut self, port: u16) -> Self {
        self.ice_tcp.port = Some(port);
        self
    }

    /// A TCP connection from `peer` was accepted on `local`: what comes from `peer` is ICE-TCP
    /// until [`Sfu::tcp_closed`] (and what the core sends to `peer` must go back over it).
    pub fn tcp_opened(&mut self, peer: SocketAddr, local: SocketAddr) {
        let Some(port) = self.ice_tcp.port else {
            return;
        };
        let ip = candidate_ip(&self.cfg.announce_ips, local.ip());
        self.ice_tcp.peers.insert(peer, SocketAddr::new(ip, port));
    }

    /// The TCP connection from `peer` is gone.
    pub fn tcp_closed(&mut self, peer: SocketAddr) {
        self.ice_tcp.peers.remove(&peer);
    }

    /// Where the core's datagrams go.
    pub fn transmit(&mut self) -> &mut T {
        &mut self.tx
    }

    pub fn limits(&self) -> &super::CoreLimits {
        &self.cfg.limits
    }

    /// The driver left client commands queued to serve the media socket first.
    pub fn note_commands_deferred(&mut self) {
        self.stats.limits_hit.commands_deferred += 1;
    }

    /// Time moves forward only: an input stamped earlier than the last one is taken as now.
    fn advance(&mut self, now: Instant) {
        if now > self.now {
            self.now = now;
        }
    }

    fn wall_clock(&self, now: Instant) -> SystemTime {
        let (at, wall) = self.clock_anchor;
        wall + now.saturating_duration_since(at)
    }

    /// A command from signaling. [`Flow::Stop`] after a shutdown: the driver ends the turn,
    /// sends what is queued and stops.
    pub fn handle_command(&mut self, now: Instant, cmd: Command) -> Flow {
        self.advance(now);
        match cmd {
            Command::Shutdown { done } => {
                self.shutdown(now);
                return Flow::Stop(Some(done));
            }
            other => self.on_command(other),
        }
        Flow::Continue
    }

    /// A datagram from the network, which the kernel received at `received` (no later than
    /// `now`; `now` itself where nothing says otherwise) and the driver read at `now`. A media
    /// packet's in-core latency counts from `received`, and so does its arrival in the
    /// transport-wide feedback to its publisher.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        received: Instant,
        from: SocketAddr,
        data: &[u8],
    ) {
        self.advance(now);
        self.stats.udp_datagrams_in += 1;
        self.feed_datagram(now, received.min(self.now), data, Remote::udp(from));
    }

    /// A frame read from the ICE-TCP connection of `from` (RFC 4571 framing removed): handled
    /// as a datagram of that connection's.
    /// `received`: when the connection's reader had the frame (its origin for the in-core
    /// latency, as a datagram's receive stamp is).
    pub fn handle_tcp_frame(
        &mut self,
        now: Instant,
        received: Instant,
        from: SocketAddr,
        data: &[u8],
    ) {
        self.advance(now);
        self.feed_datagram(now, received.min(self.now), data, Remote::tcp(from));
    }

    /// A datagram (or ICE-TCP frame) from `remote` read and given to no connection: counted.
    fn count_ignored(&mut self, remote: Remote) {
        if remote.tcp {
            self.stats.ice_tcp_frames_ignored += 1;
        } else {
            self.stats.udp_datagrams_ignored += 1;
        }
    }

    /// The time [`Sfu::poll_timeout`] named has come (or passed): fire everything due.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.advance(now);
        let now = self.now;
        while let Some((at, key)) = self.timers.pop_due(now) {
            let Some(pc) = self.pc_mut(key) else { continue };
            if pc.deadline.map(|d| d.at) != Some(at) {
                continue;
            }
            pc.deadline = None;
            if let Err(e) = pc.rtc.handle_timeout(now) {
                debug!("handle_timeout: {e}");
            }
            if key.kind == PcKind::Publisher {
                self.ingress_timeout(key.part, now);
            }
            self.mark_dirty(key);
        }
        while let Some((_, part)) = self.connect_timers.pop_due(now) {
            let stale = self.part(part).is_some_and(|p| !p.transport_connected());
            if stale {
                self.effects.push(Effect::Remove {
                    part,
                    why: LeaveReason::ConnectTimeout,
                    reason: "transport did not connect in time".into(),
                });
            }
        }
        if self.select_timer.fire(now) {
            self.select_layers(now);
        }
        if self.report_timer.fire(now) {
            self.sender_reports(now);
        }
        if self.maintenance_timer.fire(now) {
            self.demux.expire(now);
        }
        if self.quality.timer.fire(now) {
            self.quality_tick(now);
        }
        if self.speakers.timer.fire(now) {
            self.speaker_tick();
        }
        self.ticks_due(now);
    }

    /// When the core next needs [`Sfu::handle_timeout`], and why.
    pub fn poll_timeout(&mut self) -> Option<Deadline> {
        let rooms = &self.rooms;
        let part = |k: PartKey| rooms.get(&k.room).and_then(|r| r.parts.get(&k));
        let pc_deadline = |key: PcKey, at: Instant| {
            let Some(p) = part(key.part) else {
                return false;
            };
            let pc = match key.kind {
                PcKind::Subscriber => Some(&p.sub),
                PcKind::Publisher => p.publ.as_ref(),
            };
            pc.and_then(|pc| pc.deadline).is_some_and(|d| d.at == at)
        };
        let pc = self
            .timers
            .peek(pc_deadline)
            .and_then(|(_, key)| self.pc(key)?.deadline);
        let connect = self
            .connect_timers
            .peek(|k, _| part(k).is_some_and(|p| !p.transport_connected()))
            .map(|(at, _)| Deadline::new(at, Reason::ConnectTimeout));
        let mut next = soonest(soonest(pc, connect), self.tick_deadline());
        for periodic in [
            &self.select_timer,
            &self.report_timer,
            &self.maintenance_timer,
            &self.quality.timer,
            &self.speakers.timer,
        ] {
            next = soonest(next, Some(periodic.deadline()));
        }
        next
    }

    /// End the turn: apply the deferred work and drain every touched connection until nothing
    /// is left; the datagrams go to the sink. Call after each batch of `handle_*` calls.
    pub fn end_turn(&mut self, now: Instant) {
        self.advance(now);
        // (Processing can forward packets too: those `rtc` delivered, before a publisher's
        // fast path knew their SSRC. Their copies are made in this turn as well.)
        loop {
            self.copy_arrivals();
            self.process();
            if self.arrivals.is_empty() {
                break;
            }
        }
        hand_over(&mut self.pipe_out, &mut self.tx, &mut self.stats);
    }

    fn reschedule(&mut self, key: PcKey) {
        let Some(p) = part_mut!(self, key.part) else {
            return;
        };
        let (pc, ingress) = match key.kind {
            PcKind::Subscriber => (&mut p.sub, None),
            PcKind::Publisher => match p.publ.as_mut() {
                Some(pc) => (pc, p.ingress.as_ref()),
                None => return,
            },
        };
        let next = soonest(
            pc.rtc
                .poll_timeout()
                .map(|at| Deadline::new(at, Reason::Rtc)),
            ingress
                .and_then(Ingress::deadline)
                .map(|at| Deadline::new(at, Reason::IngressFeedback)),
        );
        if next.map(|d| d.at) != pc.deadline.map(|d| d.at) {
            if let Some(d) = next {
                self.timers.push(d.at, key);
            }
        }
        pc.deadline = next;
    }

    fn part(&self, k: PartKey) -> Option<&Participant> {
        self.rooms.get(&k.room)?.parts.get(&k).map(|p| &**p)
    }

    /// Every participant, room by room.
    fn participants(&self) -> impl Iterator<Item = &Participant> {
        self.rooms
            .values()
            .flat_map(|r| r.parts.values().map(|p| &**p))
    }

    fn track(&self, room: RoomKey, tid: &str) -> Option<&Track> {
        self.rooms.get(&room)?.tracks.get(tid)
    }

    fn track_mut(&mut self, room: RoomKey, tid: &str) -> Option<&mut Track> {
        self.rooms.get_mut(&room)?.tracks.get_mut(tid)
    }

    fn pc(&self, key: PcKey) -> Option<&Pc> {
        let p = self.part(key.part)?;
        match key.kind {
            PcKind::Subscriber => Some(&p.sub),
            PcKind::Publisher => p.publ.as_ref(),
        }
    }

    fn pc_mut(&mut self, key: PcKey) -> Option<&mut Pc> {
        let p = part_mut!(self, key.part)?;
        match key.kind {
            PcKind::Subscriber => Some(&mut p.sub),
            PcKind::Publisher => p.publ.as_mut(),
        }
    }

    // ---------------------------------------------------------------- UDP in

    /// Route a datagram to the connection it belongs to (also used to replay early ones).
    fn feed_datagram(&mut self, now: Instant, received: Instant, data: &[u8], remote: Remote) {
        let from = remote.addr;
        // See `demux` for the rules: STUN requests by the server ufrag, responses by the check
        // they answer, everything else only from addresses the connection validated.
        let key = match self.demux.route(data, remote, now) {
            Ok(key) => key,
            Err(reason) => {
                self.count_ignored(remote);
                self.drops.count(reason, remote, now);
                return;
            }
        };
        let first = data[0];
        if key.kind == PcKind::Subscriber && egress::is_rtcp(data) {
            if let Some(egress) = part_mut!(self, key.part).and_then(|p| p.egress.as_mut()) {
                match egress.on_rtcp(now, data) {
                    Ok(fb) => self.on_subscriber_feedback(key.part, fb, now),
                    Err(e) => {
                        self.count_ignored(remote);
                        trace!(%from, "subscriber RTCP rejected: {e}");
                    }
                }
                return;
            }
        }
        if key.kind == PcKind::Publisher && (128..192).contains(&first) {
            // SRTP or SRTCP from a publisher: its fast path once it has started. The first
            // media can arrive in the same batch as the last DTLS flight, before the connected
            // event: start as soon as the keys are there, so that transport-wide feedback
            // covers the publisher's first packets (its bandwidth probes).
            if self.part(key.part).is_some_and(|p| p.ingress.is_none()) {
                self.start_ingress_early(key.part);
            }
            let res = part_mut!(self, key.part)
                .and_then(|p| p.ingress.as_mut())
                .map(|ing| {
                    if egress::is_rtcp(data) {
                        ing.on_rtcp(now, data).map(|()| None)
                    } else {
                        ing.on_rtp(received, data).map(Some)
                    }
                });
            match res {
                None => {}
                Some(Ok(incoming)) => {
                    self.after_ingress(key.part);
                    match incoming {
                        // RTCP, taken; an RTX duplicate or padding, dropped.
                        None | Some(ingress::Incoming { dropped: true, .. }) => return,
                        Some(ingress::Incoming {
                            packet,
                            track: Some(track),
                            audio_level,
                            ..
                        }) => {
                            self.forward_rtp(key.part, &track, packet, received, audio_level);
                            return;
                        }
                        // SSRC not bound yet: `rtc` binds it (below).
                        Some(_) => {}
                    }
                }
                Some(Err(e)) => {
                    self.count_ignored(remote);
                    trace!(%from, "publisher SRTP rejected: {e}");
                    return;
                }
            }
        }
        let (local_addr, protocol) = if remote.tcp {
            // (A connection closed since leaves nothing to answer over.)
            let Some(&local) = self.ice_tcp.peers.get(&from) else {
                self.count_ignored(remote);
                return;
            };
            (local, TransportProtocol::TCP)
        } else {
            let ip = candidate_ip(&self.cfg.announce_ips, self.local_addr.ip());
            (
                SocketAddr::new(ip, self.local_addr.port()),
                TransportProtocol::UDP,
            )
        };
        let Some(pc) = self.pc_mut(key) else {
            self.count_ignored(remote);
            return;
        };
        if pc.rtc.remote_description().is_none() {
            if pc.early.len() < EARLY_MAX {
                pc.early.push((remote, now, BytesMut::from(data)));
            }
            return;
        }
        let stun = if first < 4 {
            demux::binding_kind(data)
        } else {
            None
        };
        if stun == Some(BindingKind::Nominating) {
            pc.pending_nomination = Some((remote, BytesMut::from(data)));
        }
        let read = |pc: &mut Pc, data: BytesMut| {
            pc.rtc.handle_read(TaggedBytesMut {
                now,
                transport: TransportContext {
                    local_addr,
                    peer_addr: from,
                    ecn: None,
                    transport_protocol: protocol,
                },
                message: data,
            })
        };
        pc.read_origin = Some(pc.read_origin.map_or(received, |o| o.min(received)));
        let mut res = read(pc, BytesMut::from(data));
        if res.is_ok() && stun == Some(BindingKind::Success) {
            // The answer to the server's own (triggered) check of this pair: the pair has
            // just succeeded. `rtc` left the client's nominating check that triggered it
            // unanswered; hand it over again now, so that it is answered and the pair
            // selected at once rather than at the client's next check or retransmission
            // (20–130 ms for Firefox). The client takes the answer for its transaction.
            if let Some((addr, check)) = pc.pending_nomination.take() {
                if addr == remote {
                    // Still pending until its answer goes out (`flush` then moves the media
                    // address to this pair).
                    pc.pending_nomination = Some((addr, check.clone()));
                    res = read(pc, check);
                }
            }
        }
        match res {
            Ok(()) => {}
            Err(e) => {
                self.count_ignored(remote);
                trace!(%from, "datagram rejected: {e}");
            }
        }
        self.mark_dirty(key);
    }

    fn mark_dirty(&mut self, key: PcKey) {
        if let Some(pc) = self.pc_mut(key) {
            pc.full_drain = true;
            if !pc.queued {
                pc.queued = true;
                self.dirty.push_back(key);
            }
        }
    }

    // ---------------------------------------------------------------- processing

    /// Drain every touched peer connection and apply the deferred work, until nothing is
    /// left to do.
    fn process(&mut self) {
        let mut rounds = 0;
        loop {
            if let Some(key) = self.dirty.pop_front() {
                rounds += 1;
                let Some(pc) = self.pc_mut(key) else { continue };
                pc.queued = false;
                // A subscriber connection that only had RTP written to it needs its datagrams
                // sent and nothing else: writing media raises no events, no application
                // messages and no earlier timer (no pacer is configured). Every extra call into
                // `rtc` walks its whole handler pipeline, so this halves the work per packet.
                if std::mem::take(&mut pc.full_drain) {
                    self.drain_pc(key);
                } else {
                    self.flush(key);
                }
                if rounds > 100_000 {
                    warn!("processing did not settle; deferring");
                    break;
                }
                continue;
            }
            let Some(effect) = self.effects.pop() else {
                break;
            };
            self.apply(effect);
        }
        if !self.backlogged.is_empty() {
            self.flush_outboxes();
        }
    }

    /// Do one piece of deferred work.
    fn apply(&mut self, effect: Effect) {
        let now = self.now;
        match effect {
            Effect::RequestKeyframe { room, track, layer } => {
                self.request_keyframe(room, &track, layer, now)
            }
            Effect::SelectLayers => self.select_layers(now),
            Effect::Renegotiate(part) => self.send_offer(part),
            Effect::Remove { part, why, reason } => {
                self.remove_participant(part, why, &reason, true)
            }
        }
    }

    /// Everything a connection has for us: outgoing datagrams, events, application messages,
    /// what those produced, and its next timer.
    fn drain_pc(&mut self, key: PcKey) {
        // 1. Outgoing datagrams first: `rtc` raises some events (ICE connected) only while it
        //    writes (taking this flush out made joins ~1 s slower).
        self.flush(key);
        // 2. Events.
        loop {
            let Some(pc) = self.pc_mut(key) else { return };
            let Some(ev) = pc.rtc.poll_event() else { break };
            self.handle_pc_event(key, ev);
        }
        // 3. Application messages, which came in the datagrams handed over since the last
        //    time (a message completed by a later datagram counts from that one's stamp).
        let origin = self.pc_mut(key).and_then(|pc| pc.read_origin.take());
        loop {
            let Some(pc) = self.pc_mut(key) else { return };
            let Some(msg) = pc.rtc.poll_read() else { break };
            self.handle_pc_message(key, msg, origin);
        }
        // 4. What they produced, and the next timer.
        self.flush(key);
        self.reschedule(key);
    }

    /// Feedback just processed may have lowered the subscriber's estimate: a drop below
    /// [`SHARP_DROP_PERCENT`] of what the last selection used is acted on at once (downgrade
    /// within the turn, not up to a selection interval later).
    fn check_estimate_drop(&mut self, part: PartKey) {
        let Some(p) = self.part(part) else {
            return;
        };
        if let (Some(last), Some(now)) = (p.selected_at_bps, p.estimate().twcc()) {
            if now.saturating_mul(100) < last.saturating_mul(SHARP_DROP_PERCENT) {
                self.effects.push(Effect::SelectLayers);
            }
        }
    }

    fn flush(&mut self, key: PcKey) {
        let Some(p) = part_mut!(self, key.part) else {
            return;
        };
        let pc = match key.kind {
            PcKind::Subscriber => &mut p.sub,
            PcKind::Publisher => match p.publ.as_mut() {
                Some(pc) => pc,
                None => return,
            },
        };
        let mut data_sent = false;
        while let Some(out) = pc.rtc.poll_write() {
            let to = Remote::of(&out.transport);
            // Checks are remembered (their responses are routed back here); a Binding success
            // or DTLS/SRTP claims the address for this connection, unless another live
            // connection owns it.
            if self.demux.on_send(key, &out.message, to, out.now) == Claim::Refused {
                self.drops.rebind_refused(to, out.now);
            }
            if pc
                .pending_nomination
                .as_ref()
                .is_some_and(|(a, _)| *a == to)
                && demux::binding_kind(&out.message) == Some(BindingKind::Success)
            {
                // The nominating check was answered: the client uses this pair from now on
                // (after an ICE restart, a new one), and so does the fast path.
                pc.pending_nomination = None;
                if pc.media_addr != Some(to) {
                    debug!(pc = ?key.kind, %to, "media address: the nominated pair");
                    pc.media_addr = Some(to);
                }
            }
            if out.message.first().is_some_and(|&b| b > 3) && pc.media_addr != Some(to) {
                debug!(pc = ?key.kind, %to, "media address: where rtc sends");
                pc.media_addr = Some(to);
            }
            let origin = if egress::is_rtp(&out.message) {
                Some(out.now)
            } else if out.message.first() == Some(&DTLS_APPLICATION_DATA) {
                // (SCTP may send the message later, e.g. when its window opens: the origin
                // waits for the first DTLS record that goes out.)
                data_sent |= pc.data_origin.is_some();
                pc.data_origin
            } else {
                None
            };
            self.tx.send(out.message, to, origin);
        }
        if data_sent {
            pc.data_origin = None;
        }
    }

    fn handle_pc_event(&mut self, key: PcKey, ev: RTCPeerConnectionEvent) {
        match ev {
            RTCPeerConnectionEvent::OnIceConnectionStateChangeEvent(
                rtc::peer_connection::state::RTCIceConnectionState::Connected,
            ) => {
                // When we are the DTLS client, `rtc` queues the ClientHello but only sends it
                // on its next timer; kick it now instead of ~200 ms later.
                let now = self.now;
                if let Some(pc) = self.pc_mut(key) {
                    if let Err(e) = pc.rtc.handle_timeout(now) {
                        debug!("handle_timeout after ICE connected: {e}");
                    }
                }
                self.mark_dirty(key);
            }
            RTCPeerConnectionEvent::OnConnectionStateChangeEvent(state) => {
                let pid = self
                    .part(key.part)
                    .map(|p| p.pid.clone())
                    .unwrap_or_default();
                debug!(participant = %pid, pc = ?key.kind, "connection state {state}");
                match state {
                    RTCPeerConnectionState::Connected => {
                        if let Some(pc) = self.pc_mut(key) {
                            pc.connected = true;
                        }
                        if key.kind == PcKind::Subscriber {
                            self.start_egress(key.part);
                            self.refresh_downtracks(key.part);
                        } else {
                            self.start_ingress(key.part);
                        }
                    }
                    RTCPeerConnectionState::Failed => {
                        self.effects.push(Effect::Remove {
                            part: key.part,
                            why: LeaveReason::IceFailed,
                            reason: format!("{:?} connection failed", key.kind),
                        });
                    }
                    _ => {}
                }
            }
            RTCPeerConnectionEvent::OnIceCandidateEvent(_) => {
                // Our host candidates (and end-of-candidates) are already in every SDP we send.
            }
            RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(init))
                if key.kind == PcKind::Publisher =>
            {
                self.on_published_track(key.part, init);
            }
            RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnClose(_))
                if key.kind == PcKind::Publisher =>
            {
                // The event names the client's track id, which need not be unique: look at
                // which receivers still receive instead.
                self.drop_stopped_publications(key.part);
            }
            RTCPeerConnectionEvent::OnDataChannel(RTCDataChannelEvent::OnOpen(id))
                if key.kind == PcKind::Subscriber =>
            {
                let opened = part_mut!(self, key.part).and_then(|p| {
                    let label = p.channels.get(&id)?.label();
                    p.open_channels.insert(label, id);
                    Some(label)
                });
                if let Some(label) = opened {
                    let now = self.now;
                    self.flush_waiting(key.part, label, now);
                }
            }
            RTCPeerConnectionEvent::OnDataChannel(RTCDataChannelEvent::OnClose(id))
                if key.kind == PcKind::Subscriber =>
            {
                if let Some(p) = part_mut!(self, key.part) {
                    p.open_channels.retain(|_, v| *v != id);
                }
            }
            _ => {}
        }
    }

    /// `origin`: the earliest receive stamp of the datagrams `msg` may have come in.
    fn handle_pc_message(&mut self, key: PcKey, msg: TaggedRTCMessage, origin: Option<Instant>) {
        match msg.message {
            RTCMessage::RtpPacket(_, packet) if key.kind == PcKind::Publisher => {
                // Tagged with the client's track id, which need not be unique (no msid, or the
                // same msid on two m-lines): find the track by SSRC, which `rtc` bound to one
                // receiver (the track event for it was handled before this packet).
                let ssrc = packet.header.ssrc;
                let Some(tid) = self.published_ssrc(key.part, ssrc) else {
                    self.stats.rtp_packets_in += 1;
                    self.stats.rtp_packets_dropped += 1;
                    return;
                };
                self.forward_rtp(key.part, &tid, packet, msg.now, None);
                self.bind_ingress(key.part, &tid, ssrc);
            }
            RTCMessage::DataChannelMessage(id, m) if key.kind == PcKind::Subscriber => {
                let origin = origin.map_or(msg.now, |o| o.min(msg.now));
                self.relay_data(key.part, id, m.is_string, &m.data, msg.now, origin);
            }
            _ => {}
        }
    }

    // ---------------------------------------------------------------- media

    fn on_published_track(
        &mut self,
        part: PartKey,
        init: rtc::peer_connection::event::RTCTrackEventInit,
    ) {
        let wall = self.wall_clock(self.now);
        let Some(room) = self.rooms.get_mut(&part.room) else {
            return;
        };
        let Some(p) = room.parts.get_mut(&part) else {
            return;
        };
        if p.refused.contains(&init.receiver_id) {
            // Refused (a kind not granted, or unpublished when its grant was revoked).
            return;
        }
        if let Some(tid) = p.pub_track(init.receiver_id) {
            // Another encoding (simulcast layer) of a known track, or a new SSRC of its only
            // encoding.
            if let Some(t) = room.tracks.get_mut(&**tid) {
                let rid = init.rid.clone().unwrap_or_default();
                match t.layers.iter_mut().find(|l| l.rid == rid) {
                    Some(l) => l.ssrc = Some(init.ssrc),
                    None => {
                        debug!(track = %tid, rid = %rid, ssrc = init.ssrc, "simulcast layer");
                        t.layers.push(Layer::new(rid, Some(init.ssrc)));
                    }
                }
            }
            return;
        }
        let max = self.cfg.limits.max_published_tracks;
        if p.pub_tracks.len() >= max {
            warn!(participant = %p.pid, limit = max, "published track over the limit; ignored");
            self.stats.limits_hit.published_tracks += 1;
            self.send_to(
                part,
                ServerMessage::error(
                    ErrorCode::LimitExceeded,
                    format!(
                        "at most {max} published tracks per participant; track {} is not forwarded",
                        init.track_id
                    ),
                    Some("publish_offer"),
                ),
            );
            return;
        }
        let Some(pc) = p.publ.as_mut() else { return };
        // The m-section (mid) this receiver belongs to: the track's name when the client gave
        // no msid.
        let mut mid = String::new();
        for id in pc.rtc.get_transceivers().collect::<Vec<_>>() {
            if let Some(t) = pc.rtc.rtp_transceiver(id) {
                if t.receiver() == Some(init.receiver_id) {
                    mid = t.mid().clone().unwrap_or_default();
                    break;
                }
            }
        }
        let Some(receiver) = pc.rtc.rtp_receiver(init.receiver_id) else {
            return;
        };
        let track = receiver.track();
        let kind = match track.kind() {
            RtpCodecKind::Audio => TrackKind::Audio,
            _ => TrackKind::Video,
        };
        let Some(codec) = track.codec(init.ssrc).cloned() else {
            warn!(participant = %p.pid, "published track without codec; ignored");
            return;
        };
        let granted = match kind {
            TrackKind::Audio => p.grants.publish_audio,
            TrackKind::Video => p.grants.publish_video,
        };
        if !granted {
            p.refused.push(init.receiver_id);
            debug!(participant = %p.pid, ?kind, "track kind not granted; ignored");
            let kind = match kind {
                TrackKind::Audio => "audio",
                TrackKind::Video => "video",
            };
            self.send_to(
                part,
                ServerMessage::error(
                    ErrorCode::PermissionDenied,
                    format!(
                        "your token does not grant publishing {kind}; track {} is not forwarded",
                        init.track_id
                    ),
                    Some("publish_offer"),
                ),
            );
            return;
        }
        let tid = TrackId::from(format!("TR_{}", random_string(&mut self.rng, 12)));
        // Every RID the publisher offered for this track, seen or not (so `track_published`
        // lists them all); the first packets of each fill in its SSRC.
        let offered = pc
            .rtc
            .remote_description()
            .map(|d| offered_rids(&d.sdp, &mid))
            .unwrap_or_default();
        let mut layers = vec![Layer::new(
            init.rid.clone().unwrap_or_default(),
            Some(init.ssrc),
        )];
        for rid in offered {
            if !layers.iter().any(|l| l.rid == rid) {
                layers.push(Layer::new(rid, None));
            }
        }
        let tracks = &room.tracks;
        self.next_relay = self.next_relay.wrapping_add(1);
        let relay = self.next_relay;
        let client_track_id = client_track_id(&init.track_id, &mid, |id| {
            p.pub_tracks
                .iter()
                .any(|t| tracks.get(&*t.tid).is_some_and(|t| t.client_track_id == id))
        });
        let publisher = Publisher::Local {
            part,
            receiver: init.receiver_id,
        };
        let t = Track::new(
            tid.clone(),
            publisher,
            relay,
            kind,
            codec,
            client_track_id,
            false,
            layers,
        );
        p.pub_tracks.push(PubTrack {
            receiver: init.receiver_id,
            tid: tid.clone(),
        });
        let info = t.info(&p.pid);
        if let Some(w) = &self.cfg.webhooks {
            w.emit(
                webhook::Event::new(webhook::EventKind::TrackPublished, &room.name, wall)
                    .with_participant(hook_ref(p))
                    .with_track(info.clone()),
            );
        }
        let span = info_span!("track", session = %p.session, room = %room.name, participant = %p.pid, track = %tid);
        let _g = span.enter();
        info!(kind = ?kind, mime = %info.mime_type, "track published");
        for &peer in &room.peers {
            self.pipe_out.push(
                peer,
                PipeMsg::TrackOpen {
                    room: room.name.clone(),
                    relay,
                    info: info.clone(),
                    codec: t.codec.clone(),
                },
            );
        }
        room.tracks.insert(tid.clone(), t);
        room.track_order.push(tid.clone());
        self.relays_out.insert(relay, (part.room, tid.clone()));
        let members = room.members.clone();
        // Everyone, the publisher included: that is how it learns the server id of its track.
        self.broadcast(
            part.room,
            None,
            ServerMessage::TrackPublished { track: info },
        );
        // Auto-subscribe the others.
        for m in members {
            if m != part && self.part(m).is_some_and(Participant::auto_subscribes) {
                self.subscribe(m, &tid);
            }
        }
        self.bind_viewers(part.room);
    }

    fn subscribe(&mut self, sub: PartKey, tid: &str) -> bool {
        let Some(room) = self.rooms.get(&sub.room) else {
            return false;
        };
        let Some(track) = room.tracks.get(tid) else {
            return false;
        };
        if track.local_publisher() == Some(sub) || track.down.contains_key(&sub) {
            return false;
        }
        let kind = match track.kind {
            TrackKind::Audio => RtpCodecKind::Audio,
            TrackKind::Video => RtpCodecKind::Video,
        };
        // A RED track's encoding is Opus: its section offers RED and Opus (`offer_red`), and
        // a subscriber without RED gets the primary blocks as Opus.
        let audio = kind == RtpCodecKind::Audio;
        let codec = if red::is_red(&track.codec) {
            opus_codec().rtp_codec
        } else {
            track.codec.clone()
        };
        let stream = room.publisher_id(track);
        use rand::Rng;
        let ssrc: u32 = self.rng.random::<u32>() | 1;
        let (seq0, ts0) = (self.rng.random(), self.rng.random());
        // Its RTX stream's SSRC (`rtc` keeps it only if RTX is negotiated).
        let rtx_ssrc: u32 = self.rng.random::<u32>() | 1;
        let Some(p) = part_mut!(self, sub) else {
            return false;
        };
        let mst = MediaStreamTrack::new(
            stream,
            tid.to_owned(),
            tid.to_owned(),
            kind,
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(ssrc),
                    rtx: (kind == RtpCodecKind::Video)
                        .then_some(RTCRtpRtxParameters { ssrc: rtx_ssrc }),
                    ..Default::default()
                },
                codec,
                ..Default::default()
            }],
        );
        let sender = match p.sub.rtc.add_track(mst) {
            Ok(s) => s,
            Err(e) => {
                warn!(participant = %p.pid, track = %tid, "add_track failed: {e}");
                return false;
            }
        };
        if audio && self.cfg.red {
            offer_red(&mut p.sub.rtc, sender);
        }
        p.subscriptions.insert(TrackId::from(tid), sender);
        let first_offer = p.offers_sent + 1;
        let is_video = kind == RtpCodecKind::Video;
        let now = self.now;
        if let Some(track) = self
            .rooms
            .get_mut(&sub.room)
            .and_then(|r| r.tracks.get_mut(tid))
        {
            let selector = is_video.then(|| {
                let mut sel = LayerSelector::new(Requested::default());
                sel.update(&track.layer_infos(now), None, now);
                sel
            });
            let munger = track
                .codec
                .mime_type
                .eq_ignore_ascii_case(MIME_TYPE_VP8)
                .then(Vp8Munger::new);
            track.down.insert(
                sub,
                DownTrack {
                    ssrc,
                    payload_type: None,
                    payload: red::Payload::AsIs,
                    twcc_ext: None,
                    rewriter: Rewriter::with_initial(ssrc, seq0, ts0),
                    munger,
                    selector,
                    first_offer,
                    switch_watch: None,
                },
            );
            sync_needed(track, &mut self.pipe_out);
        }
        self.renegotiate(sub);
        true
    }

    fn unsubscribe(&mut self, sub: PartKey, tid: &str) -> bool {
        let gone = self
            .rooms
            .get_mut(&sub.room)
            .and_then(|r| r.tracks.get_mut(tid))
            .and_then(|t| {
                let gone = t.down.remove(&sub);
                sync_needed(t, &mut self.pipe_out);
                gone
            });
        let Some(p) = part_mut!(self, sub) else {
            return false;
        };
        if let (Some(dt), Some(e)) = (gone, p.egress.as_mut()) {
            e.remove_stream(dt.ssrc);
        }
        let Some(sender) = p.subscriptions.remove(tid) else {
            return false;
        };
        if let Err(e) = p.sub.rtc.remove_track(sender) {
            debug!(participant = %p.pid, "remove_track: {e}");
        }
        self.renegotiate(sub);
        true
    }

    /// After a (re)negotiation of `sub`'s subscriber PC: learn payload types and ask for
    /// keyframes for video down-tracks that are waiting for one.
    fn refresh_downtracks(&mut self, sub: PartKey) {
        let Some(room) = self.rooms.get_mut(&sub.room) else {
            return;
        };
        let Some(p) = room.parts.get_mut(&sub) else {
            return;
        };
        let connected = p.sub.connected;
        let answered = p.offers_answered;
        for (tid, &sender_id) in p.subscriptions.iter() {
            let Some(track) = room.tracks.get_mut(tid) else {
                continue;
            };
            let Some(dt) = track.down.get_mut(&sub) else {
                continue;
            };
            if dt.first_offer > answered {
                continue;
            }
            if dt.payload_type.is_none() {
                if let Some(mut sender) = p.sub.rtc.rtp_sender(sender_id) {
                    let params = sender.get_parameters();
                    // The track's codec, or for a RED track whichever of RED and Opus the
                    // subscriber has.
                    let plan = red::plan(&track.codec, &params.rtp_parameters.codecs);
                    dt.payload_type = plan.map(|(pt, _)| pt);
                    dt.payload = plan.map(|(_, p)| p).unwrap_or_default();
                    dt.twcc_ext = params
                        .rtp_parameters
                        .header_extensions
                        .iter()
                        .find(|h| h.uri == TRANSPORT_CC_URI)
                        .and_then(|h| u8::try_from(h.id).ok());
                }
            }
            if connected && dt.payload_type.is_some() {
                if let Some(layer) = dt.selector.as_ref().and_then(|s| s.wants_keyframe()) {
                    self.effects.push(Effect::RequestKeyframe {
                        room: sub.room,
                        track: tid.clone(),
                        layer,
                    });
                }
            }
        }
        self.sync_rtx(sub);
    }

    /// Tell `sub`'s subscriber fast path (once it runs) which of its video down-tracks
    /// retransmit on an RTX stream: those whose negotiation kept the sender's RTX encoding
    /// and an RTX codec for their payload type. Called after each negotiation and when the
    /// fast path starts.
    fn sync_rtx(&mut self, sub: PartKey) {
        let Some(room) = self.rooms.get_mut(&sub.room) else {
            return;
        };
        let Some(p) = room.parts.get_mut(&sub) else {
            return;
        };
        let Some(egress) = p.egress.as_mut() else {
            return;
        };
        for (tid, &sender_id) in p.subscriptions.iter() {
            let Some(dt) = room.tracks.get(tid).and_then(|t| t.down.get(&sub)) else {
                continue;
            };
            let Some(pt) = dt.payload_type else { continue };
            let Some(mut sender) = p.sub.rtc.rtp_sender(sender_id) else {
                continue;
            };
            let rtx = negotiated_rtx(sender.get_parameters(), pt);
            if egress.has_rtx(dt.ssrc) != rtx.is_some() {
                debug!(participant = %p.pid, track = %tid, ?rtx, "retransmissions on RTX");
            }
            egress.set_rtx(dt.ssrc, rtx);
        }
    }

    /// Which layer of `track` an incoming SSRC belongs to, learning new layers on the way.
    fn layer_of(&mut self, part: PartKey, tid: &str, ssrc: u32) -> Option<usize> {
        let track = self.track(part.room, tid)?;
        if let Some(i) = track.layers.iter().position(|l| l.ssrc == Some(ssrc)) {
            return Some(i);
        }
        // Unknown SSRC: ask the receiver which RID it carries (RID-based simulcast).
        let Publisher::Local { receiver, .. } = track.publisher else {
            return None;
        };
        let pc = part_mut!(self, part)?.publ.as_mut()?;
        let rid = pc.rtc.rtp_receiver(receiver)?.track().rid(ssrc)?.to_owned();
        let track = self.track_mut(part.room, tid)?;
        if let Some(i) = track.layers.iter().position(|l| l.rid == rid) {
            track.layers[i].ssrc = Some(ssrc);
            return Some(i);
        }
        debug!(track = %tid, rid = %rid, ssrc, "simulcast layer");
        track.layers.push(Layer::new(rid, Some(ssrc)));
        Some(track.layers.len() - 1)
    }

    /// The server track of a publisher's SSRC (a layer's SSRC, learned from the track event).
    fn published_ssrc(&self, part: PartKey, ssrc: u32) -> Option<TrackId> {
        let room = self.rooms.get(&part.room)?;
        let p = room.parts.get(&part)?;
        p.pub_tracks
            .iter()
            .find(|t| {
                room.tracks
                    .get(&*t.tid)
                    .is_some_and(|tr| tr.layers.iter().any(|l| l.ssrc == Some(ssrc)))
            })
            .map(|t| t.tid.clone())
    }

    /// One packet of the publisher's track `tid` (server id), with the audio level it
    /// carries: to every down-track.
    fn forward_rtp(
        &mut self,
        part: PartKey,
        tid: &TrackId,
        mut packet: rtp::Packet,
        now: Instant,
        level: Option<AudioLevel>,
    ) {
        self.stats.rtp_packets_in += 1;
        let tid = tid.clone();
        let Some(li) = self.layer_of(part, &tid, packet.header.ssrc) else {
            return;
        };
        // Header extensions of the publisher leg are not negotiated on the subscriber leg.
        packet.header.extension = false;
        packet.header.extensions.clear();
        packet.header.extension_profile = 0;
        packet.header.extensions_padding = 0;
        self.fan_out(part.room, &tid, li, packet, now, level);
    }

    /// The subscriber connection is up: its SRTP keys are known, start its fast path.
    fn start_egress(&mut self, part: PartKey) {
        let Some(p) = part_mut!(self, part) else {
            return;
        };
        if p.egress.is_some() {
            return;
        }
        let res = p
            .sub
            .capture
            .as_ref()
            .ok_or(egress::EgressError::NoKeys(0))
            .and_then(|c| c.keys())
            .and_then(|keys| Egress::new(&keys));
        match res {
            Ok(e) => {
                debug!(participant = %p.pid, "subscriber fast path ready");
                p.egress = Some(e);
                self.sync_rtx(part);
            }
            Err(e) => {
                warn!(participant = %p.pid, "subscriber media path: {e}");
                self.effects.push(Effect::Remove {
                    part,
                    why: LeaveReason::Error,
                    reason: format!("subscriber media path could not start: {e}"),
                });
            }
        }
    }

    /// The publisher connection is up: its SRTP keys are known, start its fast path.
    fn start_ingress(&mut self, part: PartKey) {
        let sender_ssrc = rand::Rng::random(&mut self.rng);
        let Some(p) = part_mut!(self, part) else {
            return;
        };
        let Some(pc) = p.publ.as_ref() else { return };
        if p.ingress.is_some() {
            return;
        }
        let twcc_ext = pc
            .rtc
            .local_description()
            .and_then(|d| ingress::twcc_ext_id(&d.sdp));
        let rtx = rtx_config_of(pc);
        let res = pc
            .capture
            .as_ref()
            .ok_or(egress::EgressError::NoKeys(0))
            .and_then(|c| c.keys())
            .map_err(|e| e.to_string())
            .and_then(|keys| Ingress::new(&keys, twcc_ext, sender_ssrc).map_err(|e| e.to_string()));
        match res {
            Ok(mut i) => {
                debug!(participant = %p.pid, ?twcc_ext, ?rtx, "publisher fast path ready");
                i.set_rtx(rtx);
                i.set_audio_level_ext(
                    pc.rtc
                        .local_description()
                        .and_then(|d| ingress::audio_level_ext_id(&d.sdp)),
                );
                p.ingress = Some(i);
            }
            Err(e) => {
                warn!(participant = %p.pid, "publisher media path: {e}");
                self.effects.push(Effect::Remove {
                    part,
                    why: LeaveReason::Error,
                    reason: format!("publisher media path could not start: {e}"),
                });
            }
        }
    }

    /// Start the publisher's fast path before the connected event if its SRTP keys are
    /// already derived (nothing happens, and `rtc` takes the datagram, while they are not).
    fn start_ingress_early(&mut self, part: PartKey) {
        let ready = self
            .part(part)
            .and_then(|p| p.publ.as_ref())
            .and_then(|pc| pc.capture.as_ref())
            .is_some_and(|c| c.keys().is_ok());
        if ready {
            self.start_ingress(part);
        }
    }

    /// After the publisher's fast path took a datagram: send the feedback it produced, and
    /// move the connection's timer earlier if the fast path now needs it sooner.
    fn after_ingress(&mut self, part: PartKey) {
        let Some(p) = part_mut!(self, part) else {
            return;
        };
        let (Some(ing), Some(pc)) = (p.ingress.as_mut(), p.publ.as_mut()) else {
            return;
        };
        if ing.has_output() {
            if let Some(to) = pc.media_addr {
                for wire in ing.take_output() {
                    self.tx.send(wire, to, None);
                }
            }
        }
        if let Some(at) = ing.deadline() {
            if pc.deadline.is_none_or(|d| at < d.at) {
                pc.deadline = Some(Deadline::new(at, Reason::IngressFeedback));
                self.timers.push(
                    at,
                    PcKey {
                        part,
                        kind: PcKind::Publisher,
                    },
                );
            }
        }
    }

    /// The publisher connection's timer fired: feedback that is due.
    fn ingress_timeout(&mut self, part: PartKey, now: Instant) {
        if let Some(ing) = part_mut!(self, part).and_then(|p| p.ingress.as_mut()) {
            ing.on_timeout(now);
            self.after_ingress(part);
        }
    }

    /// `rtc` delivered a packet of `ssrc` of the published track `tid`: once the SSRC belongs
    /// to a layer of it, its packets skip `rtc`.
    fn bind_ingress(&mut self, part: PartKey, tid: &TrackId, ssrc: u32) {
        let Some(room) = self.rooms.get_mut(&part.room) else {
            return;
        };
        let Some(p) = room.parts.get_mut(&part) else {
            return;
        };
        let Some(ing) = p.ingress.as_mut() else {
            return;
        };
        if ing.is_bound(ssrc) {
            return;
        }
        let Some(track) = room.tracks.get(&**tid) else {
            return;
        };
        if !track.layers.iter().any(|l| l.ssrc == Some(ssrc)) {
            return;
        }
        let video = track.kind == TrackKind::Video;
        ing.bind(ssrc, tid.clone(), track.codec.clock_rate, video);
        trace!(participant = %p.pid, ssrc, "publisher SSRC on the fast path");
    }

    /// What a subscriber's RTCP asked for: retransmissions (already answered by its egress),
    /// keyframes, a look at a new TWCC estimate.
    fn on_subscriber_feedback(&mut self, part: PartKey, fb: egress::Feedback, now: Instant) {
        let Some(room) = self.rooms.get_mut(&part.room) else {
            return;
        };
        let Some(p) = room.parts.get(&part) else {
            return;
        };
        if let Some(to) = p.sub.media_addr {
            for wire in fb.retransmissions {
                self.tx.send(wire, to, None);
            }
        }
        // Down-tracks by the SSRC the subscriber knows them by (feedback is rare: a scan of
        // the participant's subscriptions is enough).
        let tracks = &mut room.tracks;
        fn tid_of<'a>(
            subs: &'a HashMap<TrackId, RTCRtpSenderId>,
            tracks: &HashMap<TrackId, Track>,
            part: PartKey,
            ssrc: u32,
        ) -> Option<&'a TrackId> {
            subs.keys().find(|tid| {
                tracks
                    .get(*tid)
                    .and_then(|t| t.down.get(&part))
                    .is_some_and(|dt| dt.ssrc == ssrc)
            })
        }
        let subs = &p.subscriptions;
        let mut wanted: Vec<&TrackId> = fb
            .keyframes
            .iter()
            .filter_map(|&s| tid_of(subs, tracks, part, s))
            .collect();
        // A loss the NACK responder will not repair stalls the subscriber's decoder until the
        // next keyframe: treated like a PLI from the subscriber (the responder reports it at
        // most once per down-track per interval; the layer's throttle coalesces).
        for &media_ssrc in &fb.unrepairable {
            if let Some(tid) = tid_of(subs, tracks, part, media_ssrc) {
                debug!(participant = %p.pid, track = %tid, "unrepairable loss: keyframe requested");
                wanted.push(tid);
            }
        }
        // Loss of packets sent since a layer switch (its keyframe, most likely): ask again
        // rather than wait for the publisher's next keyframe.
        for (media_ssrc, lost) in fb.lost {
            let Some(tid) = tid_of(subs, tracks, part, media_ssrc) else {
                continue;
            };
            let Some(dt) = tracks.get_mut(tid).and_then(|t| t.down.get_mut(&part)) else {
                continue;
            };
            let Some(watch) = dt.switch_watch.as_mut() else {
                continue;
            };
            let next = dt.rewriter.last_out_seq().map_or(0, |s| s.wrapping_add(1));
            if watch.on_nack(lost, next, now) {
                debug!(participant = %p.pid, "switch keyframe lost: asking again");
                wanted.push(tid);
            } else if watch.expired(now) {
                dt.switch_watch = None;
            }
        }
        for tid in wanted {
            let layer = tracks.get(tid).and_then(|t| {
                let sel = t.down.get(&part)?.selector.as_ref()?;
                sel.wants_keyframe().or(sel.current())
            });
            if let Some(l) = layer {
                self.effects.push(Effect::RequestKeyframe {
                    room: part.room,
                    track: tid.clone(),
                    layer: l,
                });
            }
        }
        if fb.estimate_updated {
            self.check_estimate_drop(part);
            self.probe_outcome(part, now);
        }
    }

    /// Ask the publisher of `tid` for a keyframe of layer `li`, through the layer's throttle.
    fn request_keyframe(&mut self, room: RoomKey, tid: &str, li: usize, now: Instant) {
        let Some(Room { parts, tracks, .. }) = self.rooms.get_mut(&room) else {
            return;
        };
        let Some(track) = tracks.get_mut(tid) else {
            return;
        };
        if track.kind != TrackKind::Video {
            return;
        }
        let Some(layer) = track.layers.get_mut(li) else {
            return;
        };
        let part = match &track.publisher {
            Publisher::Local { part, .. } => *part,
            Publisher::Remote { shard, .. } => {
                // The publisher's shard asks (through its own throttle).
                if let (true, Ok(layer)) = (layer.throttle.request(now), u8::try_from(li)) {
                    trace!(track = %tid, layer = li, "keyframe request to the publisher's shard");
                    let relay = track.relay;
                    self.pipe_out
                        .push(*shard, PipeMsg::Keyframe { relay, layer });
                }
                return;
            }
        };
        let Some(media_ssrc) = layer.ssrc else {
            return;
        };
        if !layer.throttle.request(now) {
            return;
        }
        // Through the publisher's fast path only: `rtc` never sends RTCP on a publisher
        // connection (its SRTCP context shares the fast path's key).
        let Some(p) = parts.get_mut(&part) else {
            return;
        };
        let (Some(ing), Some(to)) = (
            p.ingress.as_mut(),
            p.publ.as_ref().and_then(|pc| pc.media_addr),
        ) else {
            return;
        };
        match ing.pli(media_ssrc) {
            Ok(wire) => {
                trace!(track = %tid, layer = li, "PLI to publisher");
                self.stats.keyframe_requests += 1;
                self.tx.send(wire, to, None);
            }
            Err(e) => debug!("PLI: {e}"),
        }
    }

    /// Re-run layer selection for every video down-track: bandwidth per subscriber (audio
    /// first, then video tracks in turn), keyframe requests for pending switches, retries of
    /// lost keyframe requests, and dynacast (pause layers nobody needs).
    fn select_layers(&mut self, now: Instant) {
        let mut rooms: Vec<RoomKey> = self.rooms.keys().copied().collect();
        rooms.sort();
        for room in rooms {
            self.select_room_layers(room, now);
        }
    }

    /// [`Sfu::select_layers`] for one room.
    fn select_room_layers(&mut self, room: RoomKey, now: Instant) {
        let Some(r) = self.rooms.get_mut(&room) else {
            return;
        };
        // Probe clusters whose feedback never came are decided first.
        let mut parts: Vec<PartKey> = r.parts.keys().copied().collect();
        parts.sort();
        for part in parts {
            self.probe_outcome(part, now);
        }
        let Some(r) = self.rooms.get_mut(&room) else {
            return;
        };
        // Budget per subscriber: the downlink estimate less the audio it receives.
        let mut budget: HashMap<PartKey, Option<i64>> = HashMap::new();
        // What each subscriber receives (audio and video targets), for probing.
        let mut media: HashMap<PartKey, u64> = HashMap::new();
        let mut probe_for: Vec<(PartKey, u64, u64)> = Vec::new();
        for (&part, p) in r.parts.iter_mut() {
            let available = p.estimate().available(now);
            p.selected_at_bps = available;
            budget.insert(part, available.map(|b| b as i64));
        }
        for t in r.tracks.values() {
            if t.kind == TrackKind::Audio {
                let bps = t.layers.first().map_or(0, |l| l.meter.bps(now)) as i64;
                for sub in t.down.keys() {
                    if let Some(Some(b)) = budget.get_mut(sub) {
                        *b -= bps;
                    }
                    *media.entry(*sub).or_default() += bps as u64;
                }
            }
        }
        let mut tids: Vec<TrackId> = r
            .tracks
            .values()
            .filter(|t| t.kind == TrackKind::Video)
            .map(|t| t.id.clone())
            .collect();
        tids.sort();
        let mut wanted = Vec::new();
        let mut layer_msgs: Vec<(PartKey, ServerMessage)> = Vec::new();
        for tid in tids {
            let Some(track) = r.tracks.get_mut(&tid) else {
                continue;
            };
            let infos = track.layer_infos(now);
            for (sub, dt) in track.down.iter_mut() {
                let Some(sel) = dt.selector.as_mut() else {
                    continue;
                };
                let avail = budget.get(sub).copied().flatten();
                sel.update(&infos, avail.map(|b| b.max(0) as u64), now);
                let bitrate = |id: usize| {
                    infos
                        .iter()
                        .find(|l| l.id == id)
                        .map_or(0, |l| l.bitrate_bps)
                };
                let target_bps = sel.target().map_or(0, bitrate);
                if let (Some(Some(b)), Some(_)) = (budget.get_mut(sub), sel.target()) {
                    *b -= target_bps as i64;
                }
                *media.entry(*sub).or_default() += target_bps;
                if let Some(l) = sel.wants_keyframe() {
                    wanted.push((tid.clone(), l));
                }
                // The way up is a probe (one down-track per subscriber at a time), also while
                // an up-switch waits for its keyframe (the next step is probed meanwhile);
                // never during a down-switch.
                let down = sel.current().is_some_and(|c| bitrate(c) > target_bps);
                if let (false, Some(next), Some(_)) = (down, sel.next_up(&infos), dt.twcc_ext) {
                    if !probe_for.iter().any(|(p, _, _)| p == sub) {
                        probe_for.push((*sub, target_bps, bitrate(next)));
                    }
                }
            }
            // Dynacast: the publisher's shard pauses what nobody here or on the other shards
            // needs; another shard tells it what its subscribers need.
            let publisher = match &track.publisher {
                Publisher::Local { part, .. } => *part,
                Publisher::Remote { .. } => continue,
            };
            if track.is_simulcast() && track.has_subscribers() {
                let mut needed =
                    needed_layers(track.down.values().filter_map(|d| d.selector.as_ref()));
                for &bits in track.relayed_to.values() {
                    needed.extend((0..64).filter(|i| bits & (1 << i) != 0));
                }
                let mut changed = false;
                for li in 0..track.layers.len() {
                    if needed.contains(&li) {
                        track.unneeded_since.remove(&li);
                        if track.paused_upstream.remove(&li) {
                            changed = true;
                        }
                    } else {
                        let since = *track.unneeded_since.entry(li).or_insert(now);
                        if now.duration_since(since) >= DYNACAST_GRACE
                            && track.paused_upstream.insert(li)
                        {
                            // A paused layer sends no keyframe: stop asking for one.
                            track.layers[li].throttle.cancel();
                            changed = true;
                        }
                    }
                }
                if changed {
                    let (paused, active): (Vec<_>, Vec<_>) = track
                        .layers
                        .iter()
                        .enumerate()
                        .partition(|(i, _)| track.paused_upstream.contains(i));
                    let rids = |v: Vec<(usize, &Layer)>| -> Vec<String> {
                        v.into_iter().map(|(_, l)| l.rid.clone()).collect()
                    };
                    let (active, paused) = (rids(active), rids(paused));
                    debug!(track = %tid, ?active, "dynacast: publisher layers");
                    layer_msgs.push((
                        publisher,
                        ServerMessage::PublisherLayers {
                            track_id: tid.to_string(),
                            active,
                            paused,
                        },
                    ));
                }
            }
        }
        // Retries (through the throttle like any request) of keyframes that never came, for
        // layers someone still receives from and the publisher still sends.
        for (tid, track) in r.tracks.iter_mut() {
            sync_needed(track, &mut self.pipe_out);
            let subscribed = track.has_subscribers();
            for (li, layer) in track.layers.iter_mut().enumerate() {
                if !subscribed || track.paused_upstream.contains(&li) {
                    layer.throttle.cancel();
                } else if layer.throttle.retry_due(now) {
                    wanted.push((tid.clone(), li));
                }
            }
        }
        for (track, layer) in wanted {
            self.effects
                .push(Effect::RequestKeyframe { room, track, layer });
        }
        for (part, msg) in layer_msgs {
            self.send_to(part, msg);
        }
        let wants = probe_for
            .into_iter()
            .map(|(part, target, next)| {
                let m = media.get(&part).copied().unwrap_or(0);
                (part, probing::ProbeWant::new(m, target, next))
            })
            .collect();
        self.start_probes(room, wants);
    }

    fn unpublish(&mut self, room: RoomKey, tid: &str) {
        let wall = self.wall_clock(self.now);
        let Some(r) = self.rooms.get_mut(&room) else {
            return;
        };
        let Some(mut track) = r.tracks.remove(tid) else {
            return;
        };
        r.track_order.retain(|t| &**t != tid);
        self.park_viewers(room, &mut track);
        let Some(r) = self.rooms.get_mut(&room) else {
            return;
        };
        let publisher_pid = r.publisher_id(&track);
        match &track.publisher {
            Publisher::Local { part, .. } => {
                if let (Some(w), Some(p)) = (&self.cfg.webhooks, r.parts.get(part)) {
                    w.emit(
                        webhook::Event::new(webhook::EventKind::TrackUnpublished, &r.name, wall)
                            .with_participant(hook_ref(p))
                            .with_track(track.info(&publisher_pid)),
                    );
                }
                if let Some(p) = r.parts.get_mut(part) {
                    if let Some(ing) = p.ingress.as_mut() {
                        ing.unbind_track(tid);
                    }
                    p.pub_tracks.retain(|t| &*t.tid != tid);
                }
                for &peer in &r.peers {
                    self.pipe_out
                        .push(peer, PipeMsg::TrackClose { relay: track.relay });
                }
                self.relays_out.remove(&track.relay);
            }
            Publisher::Remote { shard, .. } => {
                self.relays_in.remove(&(*shard, track.relay));
            }
        }
        for (&sub, dt) in track.down.iter() {
            if let Some(p) = part_mut!(self, sub) {
                if let Some(e) = p.egress.as_mut() {
                    e.remove_stream(dt.ssrc);
                }
                if let Some(sender) = p.subscriptions.remove(tid) {
                    if let Err(e) = p.sub.rtc.remove_track(sender) {
                        debug!("remove_track: {e}");
                    }
                }
            }
            self.renegotiate(sub);
        }
        info!(track = %tid, participant = %publisher_pid, "track unpublished");
        self.bind_viewers(room);
        self.broadcast(
            room,
            track.local_publisher(),
            ServerMessage::TrackUnpublished {
                track_id: tid.to_owned(),
                participant_id: publisher_pid,
            },
        );
    }

    // ---------------------------------------------------------------- data channels

    fn relay_data(
        &mut self,
        part: PartKey,
        id: RTCDataChannelId,
        is_text: bool,
        msg: &[u8],
        now: Instant,
        origin: Instant,
    ) {
        let Some(p) = part_mut!(self, part) else {
            return;
        };
        let Some(channel) = p.channels.get(&id).copied() else {
            return;
        };
        if !p.grants.publish_data {
            let m = ServerMessage::error(
                ErrorCode::PermissionDenied,
                format!(
                    "your token does not grant sending data; {} message not relayed",
                    channel.label()
                ),
                Some(channel.label()),
            );
            self.send_to(part, m);
            return;
        }
        if p.chat_muted && channel == Channel::Chat {
            let m = ServerMessage::error(
                ErrorCode::PermissionDenied,
                "your chat is muted by a room admin; chat message not relayed",
                Some(channel.label()),
            );
            self.send_to(part, m);
            return;
        }
        let inbound = data::parse_client(msg, self.cfg.max_data_message)
            .and_then(|i| p.limiter.check(now, i.payload.len()).map(|_| i));
        let inbound = match inbound {
            Ok(i) => i,
            Err(e) => {
                let code = match e {
                    DataError::TooLarge { .. } => ErrorCode::MessageTooLarge,
                    DataError::RateLimited { .. } => ErrorCode::RateLimited,
                    _ => ErrorCode::InvalidField,
                };
                let m = ServerMessage::error(
                    code,
                    format!("{} data-channel message not relayed: {e}", channel.label()),
                    Some(channel.label()),
                );
                self.send_to(part, m);
                return;
            }
        };
        let from = p.pid.clone();
        let Some(room) = self.rooms.get(&part.room) else {
            return;
        };
        // Named recipients: those in the room (here or on its other shards); the sender is
        // told of the others.
        let to = if inbound.to.is_empty() {
            None
        } else {
            let mut known = Vec::with_capacity(inbound.to.len());
            let mut unknown = Vec::new();
            for pid in inbound.to {
                let here = self
                    .by_pid
                    .get(pid.as_str())
                    .is_some_and(|m| m.room == part.room && room.parts.contains_key(m));
                if pid == from {
                    continue;
                } else if here || room.remote.contains_key(pid.as_str()) {
                    known.push(pid);
                } else {
                    unknown.push(pid);
                }
            }
            if !unknown.is_empty() {
                let m = ServerMessage::error(
                    ErrorCode::NotFound,
                    format!(
                        "{} data-channel message not delivered to unknown participant(s): {}",
                        channel.label(),
                        unknown.join(", ")
                    ),
                    Some(channel.label()),
                );
                self.send_to(part, m);
            }
            if known.is_empty() {
                return;
            }
            Some(known)
        };
        let lane = match channel {
            Channel::Chat => Lane::Chat,
            Channel::Input => Lane::Input,
        };
        let msg = Submitted {
            lane,
            from,
            is_text,
            payload: Bytes::copy_from_slice(inbound.payload),
            to,
            sseq: inbound.sseq,
            ack: inbound.ack,
            event: None,
            origin,
        };
        self.submit(part.room, msg, now);
    }

    /// A framed data-channel message to participants of this shard, on their channel `label`;
    /// how many it was handed to (those whose channel is open). `origin`: where its relay
    /// latency counts from (the kernel's receive stamp of a relayed message; `now` for what
    /// the server itself sends, and for what waited for a channel to open).
    #[allow(clippy::too_many_arguments)]
    fn deliver_data(
        &mut self,
        targets: &[PartKey],
        label: &str,
        is_text: bool,
        framed: &Bytes,
        now: Instant,
        origin: Instant,
    ) -> usize {
        let mut delivered = 0;
        for &t in targets {
            let Some(tp) = part_mut!(self, t) else {
                continue;
            };
            let Some(&dc_id) = tp.open_channels.get(label) else {
                // Not open yet: it waits.
                if self.wait_for_channel(t, label, is_text, framed) {
                    delivered += 1;
                }
                continue;
            };
            let Some(mut dc) = tp.sub.rtc.data_channel(dc_id) else {
                continue;
            };
            let res = if is_text {
                match std::str::from_utf8(framed) {
                    Ok(s) => dc.send_text(now, s.to_owned()),
                    Err(_) => dc.send(now, BytesMut::from(&framed[..])),
                }
            } else {
                dc.send(now, BytesMut::from(&framed[..]))
            };
            match res {
                Ok(()) => {
                    delivered += 1;
                    self.stats.data_messages_relayed += 1;
                    let o = &mut tp.sub.data_origin;
                    *o = Some(o.map_or(origin, |o| o.min(origin)));
                    self.mark_dirty(PcKey {
                        part: t,
                        kind: PcKind::Subscriber,
                    });
                }
                Err(e) => debug!("data-channel send: {e}"),
            }
        }
        delivered
    }

    // ---------------------------------------------------------------- the pipe

    /// Messages from another shard hosting some of the same rooms (see [`super::pipe`]).
    pub fn handle_pipe(&mut self, now: Instant, from: ShardId, msgs: Vec<PipeMsg>) {
        self.advance(now);
        self.stats.pipe_msgs_in += msgs.len() as u64;
        for msg in msgs {
            self.on_pipe(from, msg);
        }
    }

    /// Messages this core handed over for shard `to` were dropped on the way (its queue was
    /// full): counted, and for the media among them the publisher is asked for a keyframe of
    /// each layer that lost packets (the other shard has nothing to resend them from).
    pub fn pipe_dropped(&mut self, now: Instant, to: ShardId, msgs: Vec<PipeMsg>) {
        self.advance(now);
        self.stats.pipe_msgs_dropped += msgs.len() as u64;
        let mut lost: BTreeSet<(RelayId, u8)> = BTreeSet::new();
        for m in &msgs {
            if let PipeMsg::Rtp { relay, layer, .. } = m {
                lost.insert((*relay, *layer));
            }
        }
        for (relay, layer) in lost {
            if let Some((room, track)) = self.relays_out.get(&relay).cloned() {
                trace!(track = %track, layer, shard = to, "packets lost on the pipe");
                self.effects.push(Effect::RequestKeyframe {
                    room,
                    track,
                    layer: usize::from(layer),
                });
            }
        }
    }

    fn on_pipe(&mut self, from: ShardId, msg: PipeMsg) {
        match msg {
            PipeMsg::Rtp {
                relay,
                layer,
                packet,
                origin,
            } => {
                if let Some((rk, tid)) = self.relays_in.get(&(from, relay)).cloned() {
                    let packet = pipe::own_payload(packet);
                    self.fan_out(rk, &tid, usize::from(layer), packet, origin, None);
                }
            }
            PipeMsg::Keyframe { relay, layer } => {
                if let Some((room, track)) = self.relays_out.get(&relay).cloned() {
                    self.effects.push(Effect::RequestKeyframe {
                        room,
                        track,
                        layer: usize::from(layer),
                    });
                }
            }
            PipeMsg::Needed {
                relay,
                subscribed,
                layers,
            } => {
                let Some((rk, tid)) = self.relays_out.get(&relay) else {
                    return;
                };
                let Some(t) = self.rooms.get_mut(rk).and_then(|r| r.tracks.get_mut(tid)) else {
                    return;
                };
                let newly = subscribed && !t.relayed_to.contains_key(&from);
                if subscribed {
                    t.relayed_to.insert(from, layers);
                } else {
                    t.relayed_to.remove(&from);
                }
                if newly {
                    debug!(track = %tid, shard = from, "relaying to another shard");
                }
            }
            PipeMsg::Data {
                room,
                from: sender,
                channel,
                is_text,
                framed,
                to,
                origin,
            } => self.on_pipe_data(&room, &sender, channel, is_text, framed, &to, origin),
            // (Sequenced here even if this shard thinks another is the room's home: the
            // sender takes this one for it, and passing it on could go round in circles.)
            PipeMsg::Submit { room, msg } => {
                if let Some(&rk) = self.room_keys.get(&room) {
                    let now = self.now;
                    self.sequence(rk, msg, now);
                }
            }
            PipeMsg::History {
                room,
                participant_id,
                since,
                events,
            } => {
                if let Some(&rk) = self.room_keys.get(&room) {
                    self.replay(rk, &participant_id, since, events);
                }
            }
            PipeMsg::Tell {
                room,
                participant_id,
                msg,
            } => {
                let here = self.room_keys.get(&room).copied();
                if let Some(&k) = self.by_pid.get(participant_id.as_str())
                    && Some(k.room) == here
                {
                    self.send_to(k, msg);
                }
            }
            PipeMsg::Tick {
                room,
                tick,
                ts,
                entries,
            } => {
                if let Some(&rk) = self.room_keys.get(&room) {
                    let now = self.now;
                    self.deliver_tick(rk, tick, ts, &entries, now);
                }
            }
            PipeMsg::Hello {
                room,
                to_home,
                reply,
            } => self.on_hello(from, room, to_home, reply),
            PipeMsg::NodeGone { node, homes } => self.on_node_gone(node, homes),
            PipeMsg::Bye { room } => self.on_bye(from, &room),
            PipeMsg::Member { room, info } => self.on_remote_member(from, &room, info),
            PipeMsg::MemberLeft {
                room,
                participant_id,
                reason,
            } => self.on_remote_member_left(from, &room, &participant_id, reason),
            PipeMsg::TrackOpen {
                room,
                relay,
                info,
                codec,
            } => self.on_remote_track(from, &room, relay, info, codec),
            PipeMsg::TrackClose { relay } => {
                if let Some((rk, tid)) = self.relays_in.get(&(from, relay)).cloned() {
                    self.unpublish(rk, &tid);
                }
            }
            PipeMsg::Muted {
                relay,
                muted,
                by_admin,
            } => {
                if let Some((rk, tid)) = self.relays_in.get(&(from, relay)).cloned() {
                    self.set_muted(rk, &tid, muted, by_admin);
                }
            }
            PipeMsg::Admin { op } => {
                if let Err(e) = self.on_admin(op) {
                    debug!(shard = from, "admin request from another shard: {e}");
                }
            }
            PipeMsg::Quality { room, updates } => self.on_remote_quality(from, &room, updates),
            PipeMsg::Speakers { room, speakers } => self.on_remote_speakers(from, &room, speakers),
        }
    }

    /// Shard `from` hosts `room` now: it gets our participants and tracks of the room (or,
    /// if the room is not open here yet, it is greeted when it opens).
    fn on_hello(&mut self, from: ShardId, room: String, to_home: bool, reply: bool) {
        if to_home && !self.room_keys.contains_key(&room) {
            // This shard is the room's home but no longer has it (its participants left
            // while another shard joined): it holds the room again, for its timeline.
            let rk = self.new_room_key();
            let mut r = Room::new(
                room.clone(),
                self.now,
                None,
                self.new_timeline(self.cfg.input_tick_hz),
            );
            r.peers
                .extend(self.early_hellos.remove(&room).unwrap_or_default());
            debug!(room = %room, shard = from, "holding the room for its timeline");
            self.rooms.insert(rk, r);
            self.room_keys.insert(room.clone(), rk);
        }
        let Some(r) = self
            .room_keys
            .get(&room)
            .and_then(|k| self.rooms.get_mut(k))
        else {
            self.early_hellos.entry(room).or_default().insert(from);
            return;
        };
        debug!(room = %room, shard = from, "room spans another shard");
        if r.peers.insert(from) && reply {
            self.pipe_out.push(
                from,
                PipeMsg::Hello {
                    room: room.clone(),
                    to_home: false,
                    reply: false,
                },
            );
        }
        for m in &r.members {
            if let Some(p) = r.parts.get(m).filter(|p| !p.grants.hidden) {
                self.pipe_out.push(
                    from,
                    PipeMsg::Member {
                        room: room.clone(),
                        info: ParticipantInfo {
                            id: p.pid.clone(),
                            name: p.name.clone(),
                            tracks: Vec::new(),
                        },
                    },
                );
            }
        }
        let mut local: Vec<&Track> = r
            .tracks
            .values()
            .filter(|t| t.local_publisher().is_some())
            .collect();
        local.sort_by_key(|t| t.relay);
        for t in local {
            self.pipe_out.push(
                from,
                PipeMsg::TrackOpen {
                    room: room.clone(),
                    relay: t.relay,
                    info: t.info(&r.publisher_id(t)),
                    codec: t.codec.clone(),
                },
            );
        }
    }

    /// Node `node` is gone: each of its shards leaves every room here, and the rooms whose
    /// home was there get the new one (`None`: this shard).
    fn on_node_gone(&mut self, node: u32, homes: Vec<(String, Option<ShardId>)>) {
        let on_node = |s: &ShardId| pipe::split_remote(*s).is_some_and(|(n, _)| n == node);
        for (room, home) in homes {
            if let Some(r) = self
                .room_keys
                .get(&room)
                .and_then(|k| self.rooms.get_mut(k))
                && r.home.is_some_and(|h| on_node(&h))
            {
                info!(room = %room, home = ?home, "the room's home node is gone: new home");
                r.home = home;
            }
        }
        let gone: Vec<(String, ShardId)> = self
            .rooms
            .values()
            .flat_map(|r| {
                let remote = r.remote.values().map(|m| m.shard);
                r.peers
                    .iter()
                    .copied()
                    .chain(remote)
                    .filter(on_node)
                    .map(|s| (r.name.clone(), s))
                    .collect::<BTreeSet<_>>()
            })
            .collect();
        for (room, shard) in gone {
            self.on_bye(shard, &room);
        }
        self.early_hellos.retain(|_, from| {
            from.retain(|s| !on_node(s));
            !from.is_empty()
        });
    }

    /// Shard `from` no longer hosts `room`.
    fn on_bye(&mut self, from: ShardId, room: &str) {
        if let Some(early) = self.early_hellos.get_mut(room) {
            early.remove(&from);
            if early.is_empty() {
                self.early_hellos.remove(room);
            }
        }
        let Some(r) = self.room_keys.get(room).and_then(|k| self.rooms.get_mut(k)) else {
            return;
        };
        r.peers.remove(&from);
        // Nothing more is relayed to it.
        for t in r.tracks.values_mut() {
            t.relayed_to.remove(&from);
        }
        let gone: Vec<String> = r
            .remote
            .iter()
            .filter(|(_, m)| m.shard == from)
            .map(|(pid, _)| pid.clone())
            .collect();
        for pid in gone {
            self.on_remote_member_left(from, room, &pid, LeaveReason::RoomClosed);
        }
        // The home kept the room for the other shards: the last one is gone.
        if let Some(&rk) = self.room_keys.get(room)
            && self
                .rooms
                .get(&rk)
                .is_some_and(|r| r.home.is_none() && r.members.is_empty() && r.peers.is_empty())
        {
            info!(room = %room, "room closed");
            self.close_room(rk);
            self.room_keys.remove(room);
        }
    }

    /// A participant of `room` on shard `from`.
    fn on_remote_member(&mut self, from: ShardId, room: &str, info: ParticipantInfo) {
        let Some(&rk) = self.room_keys.get(room) else {
            return;
        };
        let Some(r) = self.rooms.get_mut(&rk) else {
            return;
        };
        r.peers.insert(from);
        let known = r
            .remote
            .insert(
                info.id.clone(),
                RemoteMember {
                    shard: from,
                    name: info.name.clone(),
                },
            )
            .is_some();
        if !known {
            self.broadcast(
                rk,
                None,
                ServerMessage::ParticipantJoined { participant: info },
            );
        }
    }

    /// A participant of `room` on shard `from` left.
    fn on_remote_member_left(&mut self, from: ShardId, room: &str, pid: &str, reason: LeaveReason) {
        let Some(&rk) = self.room_keys.get(room) else {
            return;
        };
        let Some(r) = self.rooms.get_mut(&rk) else {
            return;
        };
        if r.remote.get(pid).is_none_or(|m| m.shard != from) {
            return;
        }
        r.remote.remove(pid);
        let mut theirs: Vec<TrackId> = r
            .tracks
            .values()
            .filter(|t| t.is_remote_of(pid))
            .map(|t| t.id.clone())
            .collect();
        theirs.sort();
        for tid in theirs {
            self.unpublish(rk, &tid);
        }
        self.broadcast(
            rk,
            None,
            ServerMessage::ParticipantLeft {
                participant_id: pid.to_owned(),
                reason,
            },
        );
    }

    /// A track published on shard `from`, relayed as `relay`: the room here learns of it and
    /// its participants here subscribe as to any track.
    fn on_remote_track(
        &mut self,
        from: ShardId,
        room: &str,
        relay: RelayId,
        info: TrackInfo,
        codec: RTCRtpCodec,
    ) {
        let Some(&rk) = self.room_keys.get(room) else {
            return;
        };
        let Some(r) = self.rooms.get_mut(&rk) else {
            return;
        };
        if r.tracks.contains_key(info.id.as_str()) || !r.remote.contains_key(&info.participant_id) {
            return;
        }
        let tid = TrackId::from(info.id.as_str());
        let layers = if info.layers.is_empty() {
            vec![Layer::new(String::new(), None)]
        } else {
            info.layers
                .iter()
                .map(|rid| Layer::new(rid.clone(), None))
                .collect()
        };
        let publisher = Publisher::Remote {
            shard: from,
            participant_id: info.participant_id.clone(),
        };
        r.tracks.insert(
            tid.clone(),
            Track::new(
                tid.clone(),
                publisher,
                relay,
                info.kind,
                codec,
                info.client_track_id.clone(),
                info.muted,
                layers,
            ),
        );
        r.track_order.push(tid.clone());
        self.relays_in.insert((from, relay), (rk, tid.clone()));
        let members = r.members.clone();
        debug!(track = %tid, shard = from, "track relayed from another shard");
        self.broadcast(rk, None, ServerMessage::TrackPublished { track: info });
        for m in members {
            if self.part(m).is_some_and(Participant::auto_subscribes) {
                self.subscribe(m, &tid);
            }
        }
        self.bind_viewers(rk);
    }

    // ---------------------------------------------------------------- signaling

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Join { req, reply } => {
                let res = self.join(req);
                let _ = reply.send(res);
            }
            Command::Client { participant, msg } => {
                if let Some(&part) = self.by_pid.get(&participant) {
                    self.handle_client(part, msg);
                }
            }
            Command::Disconnect {
                participant,
                why,
                reason,
            } => {
                if let Some(&part) = self.by_pid.get(&participant) {
                    self.remove_participant(part, why, &reason, false);
                }
            }
            Command::Stats { reply } => {
                let _ = reply.send(self.stats());
            }
            Command::Admin { op, reply } => {
                let _ = reply.send(self.on_admin(op));
            }
            Command::Dashboard { reply } => {
                let _ = reply.send(self.dashboard());
            }
            Command::Shutdown { .. } => {}
        }
    }

    /// Counters for `/stats`, `/metrics` and `/healthz`.
    pub fn stats(&self) -> CoreStats {
        let mut s = self.stats.clone();
        s.rooms = self.rooms.len();
        s.participants = self.rooms.values().map(|r| r.parts.len()).sum();
        s.published_tracks = self.rooms.values().map(|r| r.tracks.len()).sum();
        s.udp_dropped = self.drops.snapshot();
        s.log_lines_suppressed = crate::logging::suppressed_lines();
        let mut e = self.departed_egress;
        for p in self.participants() {
            if let Some(eg) = &p.egress {
                e += eg.stats();
            }
        }
        s.nack_requested = e.nack.requested;
        s.nack_resent = e.nack.resent;
        s.nack_refused = e.nack.refused;
        s.nack_over_budget = e.nack.over_budget;
        s.nack_unrepairable = e.nack.unrepairable;
        s.nack_resent_rtx = e.rtx_resent;
        s.nack_resent_media = e.nack.resent.saturating_sub(e.rtx_resent);
        s.subscriber_rtcp_in = e.rtcp_in;
        s.subscriber_rtcp_rejected = e.rtcp_rejected;
        s.subscriber_rtcp_malformed = e.rtcp_malformed;
        let mut i = self.departed_ingress;
        for p in self.participants() {
            if let Some(ing) = &p.ingress {
                i += ing.stats();
            }
        }
        s.publisher_rtp_fast = i.rtp_fast;
        s.publisher_rtp_to_rtc = i.rtp_to_rtc;
        s.publisher_rtp_rejected = i.rtp_rejected;
        s.publisher_rtcp_in = i.rtcp_in;
        s.publisher_rtcp_rejected = i.rtcp_rejected;
        s.nack_sent_to_publishers = i.nack_sent;
        s.twcc_feedback_sent = i.twcc_feedback_sent;
        s.receiver_reports_sent = i.receiver_reports_sent;
        s.publisher_rtx_repaired = i.rtx_repaired;
        s.publisher_rtx_duplicate = i.rtx_duplicate;
        s.publisher_rtx_padding = i.rtx_padding;
        self.tx.report(&mut s);
        s
    }

    /// A new peer connection. No connection runs `rtc` interceptors: media and RTCP go
    /// through the fast paths ([`Egress`] for subscribers: TWCC, NACK, sender reports;
    /// [`Ingress`] for publishers: TWCC feedback, NACK generation, receiver reports, PLI), for
    /// which every connection records its SRTP keys and offers the two SRTP profiles the fast
    /// paths handle.
    fn new_pc(&mut self, key: PcKey) -> Result<Pc, SfuError> {
        let rtc_err = |e: rtc::shared::error::Error| SfuError::Rtc(e.to_string());
        // No fixed ICE credentials: `rtc` draws them (from the crypto provider's CSPRNG) and
        // draws new ones for an ICE restart, which fixed ones would defeat. The demux learns
        // each ufrag from the local description (`sync_ufrag`).
        let mut setting = SettingEngineBuilder::new()
            .with_answering_dtls_role(RTCDtlsRole::Client)
            .with_lite(true);
        let mut me = media_engine(self.cfg.red).map_err(rtc_err)?;
        let c = KeyCapture::new().map_err(|e| SfuError::Rtc(e.to_string()))?;
        setting = setting
            // `rtc` takes its crypto provider shared across threads; it is touched only during
            // the DTLS handshake, never per packet.
            .with_crypto_provider(c.shared())
            .with_srtp_protection_profiles(vec![
                SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm,
                SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80,
            ]);
        let capture = Some(c);
        let registry = match key.kind {
            PcKind::Publisher => {
                // The media engine exactly as the default chain configures it (so the SDP
                // is unchanged); the interceptors it builds are left out: the fast path
                // ([`Ingress`]) does their work.
                let _ = register_default_interceptors(Registry::new(), &mut me).map_err(rtc_err)?;
                // The audio level of each audio packet (RFC 6464): the active speakers.
                me.register_header_extension(
                    RTCRtpHeaderExtensionCapability {
                        uri: AUDIO_LEVEL_URI.to_owned(),
                    },
                    RtpCodecKind::Audio,
                    None,
                )
                .map_err(rtc_err)?;
                // RTX, which browsers send repairs (and probes) on: the fast path unwraps it.
                register_rtx(&mut me).map_err(rtc_err)?;
                Registry::new()
            }
            PcKind::Subscriber => {
                register_rtx(&mut me).map_err(rtc_err)?;
                for (typ, parameter) in [("nack", ""), ("nack", "pli"), ("transport-cc", "")] {
                    me.register_feedback(
                        RTCPFeedback {
                            typ: typ.to_owned(),
                            parameter: parameter.to_owned(),
                        },
                        RtpCodecKind::Video,
                    );
                }
                me.register_feedback(
                    RTCPFeedback {
                        typ: "transport-cc".to_owned(),
                        parameter: String::new(),
                    },
                    RtpCodecKind::Audio,
                );
                for kind in [RtpCodecKind::Video, RtpCodecKind::Audio] {
                    me.register_header_extension(
                        RTCRtpHeaderExtensionCapability {
                            uri: TRANSPORT_CC_URI.to_owned(),
                        },
                        kind,
                        None,
                    )
                    .map_err(rtc_err)?;
                }
                Registry::new()
            }
        };
        let setting = setting.build();
        let now = self.now;
        let mut rtc = RTCPeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_setting_engine(setting)
            .with_media_engine(me)
            .with_interceptor_registry(registry)
            .build(now)
            .map_err(|e| SfuError::Rtc(e.to_string()))?;
        let port = self.local_addr.port();
        // After each UDP host candidate, the TCP passive one (ICE-TCP), if on: its priority's
        // local preference is lower (RFC 6544 §4.2), so UDP wins wherever it works.
        let tcp = self.ice_tcp.port.map(|p| ("tcp", p, TcpType::Passive));
        for ip in &self.cfg.announce_ips {
            for (network, port, tcp_type) in
                std::iter::once(("udp", port, TcpType::Unspecified)).chain(tcp)
            {
                let cand = CandidateHostConfig {
                    base_config: CandidateConfig {
                        network: network.to_owned(),
                        address: ip.to_string(),
                        port,
                        component: 1,
                        ..Default::default()
                    },
                    tcp_type,
                }
                .new_candidate_host()
                .map_err(|e| SfuError::Rtc(e.to_string()))?;
                let init = RTCIceCandidate::from(&cand)
                    .to_json()
                    .map_err(|e| SfuError::Rtc(e.to_string()))?;
                rtc.add_local_candidate(init)
                    .map_err(|e| SfuError::Rtc(e.to_string()))?;
            }
        }
        rtc.add_local_candidate(RTCIceCandidateInit::default())
            .map_err(|e| SfuError::Rtc(e.to_string()))?;
        Ok(Pc {
            rtc,
            deadline: None,
            connected: false,
            queued: false,
            full_drain: false,
            early: Vec::new(),
            media_addr: None,
            capture,
            remote_candidates: 0,
            pending_nomination: None,
            restart_wanted: false,
            data_origin: None,
            read_origin: None,
        })
    }

    /// A key for a room opening here.
    fn new_room_key(&mut self) -> RoomKey {
        self.next_room = self.next_room.wrapping_add(1);
        RoomKey(self.next_room)
    }

    /// A fresh timeline for a room opening now, with input ticks of `tick_hz` (0: none).
    fn new_timeline(&self, tick_hz: u32) -> RoomTimeline {
        RoomTimeline::new(self.cfg.history, tick_hz, self.now)
    }

    fn join(&mut self, req: JoinRequest) -> Result<JoinAccepted, SfuError> {
        let room = req.room.trim().to_owned();
        let name = req.name.trim().to_owned();
        validate_name("room", &room)?;
        validate_name("name", &name)?;
        // An identity is unique in the room: a second join replaces the first.
        if let Some(identity) = &req.identity {
            let old: Vec<PartKey> = self
                .room_keys
                .get(&room)
                .and_then(|k| self.rooms.get(k))
                .map(|r| {
                    r.parts
                        .iter()
                        .filter(|(_, p)| p.identity.as_ref() == Some(identity))
                        .map(|(k, _)| *k)
                        .collect()
                })
                .unwrap_or_default();
            for part in old {
                self.remove_participant(part, LeaveReason::Replaced, REPLACED, true);
            }
        }
        let grants = req.grants.clone();
        let hidden = grants.hidden;
        let auto_subscribe = req.auto_subscribe && grants.subscribe;
        // The room's key; a new room exists only once its first participant is in.
        let rk = match self.room_keys.get(&room) {
            Some(&k) => k,
            None => self.new_room_key(),
        };
        let part = PartKey::new(rk, self.next_id);
        self.next_id = self.next_id.wrapping_add(1);
        let pid = format!("PA_{}", random_string(&mut self.rng, 12));
        let key = PcKey {
            part,
            kind: PcKind::Subscriber,
        };
        let mut sub = self.new_pc(key)?;
        let mut channels = HashMap::new();
        let data_channels = if req.publish_only || req.view.is_some() {
            Vec::new()
        } else {
            vec![
                (
                    Channel::Chat,
                    RTCDataChannelInit {
                        ordered: true,
                        ..Default::default()
                    },
                ),
                (
                    Channel::Input,
                    RTCDataChannelInit {
                        ordered: false,
                        max_retransmits: Some(0),
                        ..Default::default()
                    },
                ),
            ]
        };
        for (label, init) in data_channels {
            let dc = sub
                .rtc
                .create_data_channel(label.label(), Some(init))
                .map_err(|e| SfuError::Rtc(e.to_string()))?;
            channels.insert(dc.id(), label);
        }
        let mut others: Vec<ParticipantInfo> = self
            .rooms
            .get(&rk)
            .map(|r| r.members.clone())
            .unwrap_or_default()
            .iter()
            .filter_map(|m| self.participant_info(*m))
            .collect();
        if let Some(r) = self.rooms.get(&rk) {
            others.extend(r.remote_infos());
        }
        let participant = Participant {
            pid: pid.clone(),
            name: name.clone(),
            identity: req.identity.clone(),
            session: req.session.clone(),
            grants,
            chat_muted: false,
            joined: self.now,
            events: req.events,
            auto_subscribe: req.auto_subscribe,
            publish_only: req.publish_only,
            viewer: req.view.clone().map(|target| Viewer {
                target,
                sections: Vec::new(),
            }),
            sub,
            publ: None,
            sub_offer_pending: false,
            offers_sent: 0,
            offers_answered: 0,
            sub_needs_offer: false,
            channels,
            open_channels: HashMap::new(),
            pub_tracks: Vec::new(),
            refused: Vec::new(),
            subscriptions: HashMap::new(),
            limiter: data::RateLimiter::new(self.cfg.limits.data_rate()),
            timeline_events: req.timeline.events && !req.publish_only && req.view.is_none(),
            history_limiter: data::RateLimiter::new(timeline::HISTORY_RATE),
            waiting: Default::default(),
            outbox: Outbox::new(),
            selected_at_bps: None,
            egress: None,
            ingress: None,
        };
        // (Taken by a room that opens here, or by one that was placed again elsewhere.)
        let tick_hz = req.timeline.input_tick_hz.unwrap_or(self.cfg.input_tick_hz);
        let mut timeline = Some(self.new_timeline(tick_hz));
        let now = self.now;
        let r = self.rooms.entry(rk).or_insert_with(|| {
            info!(room = %room, peers = ?req.peers, home = ?req.home, "room opened");
            let mut r = Room::new(
                room.clone(),
                now,
                req.home,
                timeline
                    .take()
                    .expect("a new room takes the fresh timeline"),
            );
            // The room's other shards (and any that greeted it before it opened here) are
            // greeted: each answers with its participants and tracks. The home is greeted
            // even when it has no participant of the room any more (it keeps the room).
            // A home on another node is greeted through that node's entry, which is not a
            // peer: the room's shards there greet back (`reply`) and become peers.
            r.peers.extend(req.peers.iter().copied());
            r.peers
                .extend(req.home.filter(|&h| !pipe::is_node_entry(h)));
            r.peers
                .extend(self.early_hellos.remove(&room).unwrap_or_default());
            for &peer in &r.peers {
                self.pipe_out.push(
                    peer,
                    PipeMsg::Hello {
                        room: room.clone(),
                        to_home: Some(peer) == req.home,
                        reply: false,
                    },
                );
            }
            if let Some(entry) = req.home.filter(|&h| pipe::is_node_entry(h)) {
                self.pipe_out.push(
                    entry,
                    PipeMsg::Hello {
                        room: room.clone(),
                        to_home: true,
                        reply: true,
                    },
                );
            }
            r
        });
        if r.home != req.home {
            // The room was forgotten and placed again while this shard still held it.
            debug!(room = %room, home = ?req.home, "room has a new home");
            r.home = req.home;
            if let Some(t) = timeline.take() {
                r.timeline = t;
            }
        }
        let input_tick_hz = r.timeline.ticker.as_ref().map_or(0, |t| t.hz());
        for &peer in r.peers.iter().filter(|_| !hidden) {
            self.pipe_out.push(
                peer,
                PipeMsg::Member {
                    room: room.clone(),
                    info: ParticipantInfo {
                        id: pid.clone(),
                        name: name.clone(),
                        tracks: Vec::new(),
                    },
                },
            );
        }
        r.parts.insert(part, Box::new(participant));
        r.members.push(part);
        self.room_keys.insert(room.clone(), rk);
        self.by_pid.insert(pid.clone(), part);
        self.connect_timers.push(self.now + CONNECT_TIMEOUT, part);
        let span =
            info_span!("participant", session = %req.session, room = %room, participant = %pid);
        let _g = span.enter();
        info!(name = %name, "joined");
        if let (Some(w), Some(p)) = (&self.cfg.webhooks, self.part(part)) {
            w.emit(
                webhook::Event::new(
                    webhook::EventKind::ParticipantJoined,
                    &room,
                    self.wall_clock(self.now),
                )
                .with_participant(hook_ref(p)),
            );
        }
        if let Some(info) = self.participant_info(part) {
            self.broadcast(
                rk,
                Some(part),
                ServerMessage::ParticipantJoined { participant: info },
            );
        }
        let Some(r) = self.rooms.get_mut(&rk) else {
            return Err(SfuError::Rtc("room vanished during the join".into()));
        };
        // Subscribe to what is already published.
        if auto_subscribe {
            let mut existing: Vec<TrackId> = r.tracks.keys().cloned().collect();
            existing.sort();
            for tid in existing {
                self.subscribe(part, &tid);
            }
        }
        // The initial subscriber offer goes out after `joined` (queued behind it).
        if !req.publish_only {
            self.renegotiate(part);
        }
        Ok(JoinAccepted {
            participant_id: pid.clone(),
            joined: ServerMessage::Joined {
                protocol: PROTOCOL_VERSION,
                server_version: env!("CARGO_PKG_VERSION").to_owned(),
                room,
                participant_id: pid,
                participants: others,
                max_data_message: self.cfg.max_data_message,
                resume_token: None,
                resume_grace_ms: None,
                ice_servers: Vec::new(),
                input_tick_hz,
                session_id: (!req.session.is_empty()).then(|| req.session.clone()),
                node_id: None,
            },
        })
    }

    /// The participant as the others see it (`None` for a hidden one).
    fn participant_info(&self, part: PartKey) -> Option<ParticipantInfo> {
        let room = self.rooms.get(&part.room)?;
        let p = room.parts.get(&part).filter(|p| !p.grants.hidden)?;
        Some(ParticipantInfo {
            id: p.pid.clone(),
            name: p.name.clone(),
            tracks: p
                .published()
                .filter_map(|t| room.tracks.get(t))
                .map(|t| t.info(&p.pid))
                .collect(),
        })
    }

    /// Ask for a (re)offer on the subscriber PC. Deferred to the end of the current turn so
    /// that several track changes (a late joiner's existing tracks, audio and video starting
    /// together) go out in one offer.
    fn renegotiate(&mut self, part: PartKey) {
        if self.shutting_down
            || self
                .part(part)
                .is_some_and(|p| p.publish_only || p.viewer.is_some())
        {
            return;
        }
        self.effects.push(Effect::Renegotiate(part));
    }

    /// Send a (re)offer on the subscriber PC now, or remember to once the pending one is
    /// answered.
    fn send_offer(&mut self, part: PartKey) {
        let Some(p) = part_mut!(self, part) else {
            return;
        };
        if p.sub_offer_pending {
            p.sub_needs_offer = true;
            return;
        }
        p.sub_needs_offer = false;
        let restart = std::mem::take(&mut p.sub.restart_wanted);
        let options = restart.then_some(RTCOfferOptions { ice_restart: true });
        let offer = match p.sub.rtc.create_offer(options) {
            Ok(o) => o,
            Err(e) => {
                warn!(participant = %p.pid, "create_offer failed: {e}");
                return;
            }
        };
        if let Err(e) = p.sub.rtc.set_local_description(self.now, offer.clone()) {
            warn!(participant = %p.pid, "set_local_description(offer) failed: {e}");
            return;
        }
        let sdp = p
            .sub
            .rtc
            .local_description()
            .map(|d| d.sdp)
            .unwrap_or(offer.sdp);
        p.sub_offer_pending = true;
        p.offers_sent += 1;
        let key = PcKey {
            part,
            kind: PcKind::Subscriber,
        };
        self.sync_ufrag(key, &sdp);
        self.send_to(part, ServerMessage::SubscribeOffer { sdp });
        self.mark_dirty(key);
    }

    fn handle_client(&mut self, part: PartKey, msg: ClientMessage) {
        let Some(room) = self.rooms.get(&part.room) else {
            return;
        };
        let Some(p) = room.parts.get(&part) else {
            return;
        };
        let span = info_span!("participant", session = %p.session, room = %room.name, participant = %p.pid);
        let _g = span.enter();
        match msg {
            ClientMessage::Join { .. } => self.send_to(
                part,
                ServerMessage::error(ErrorCode::InvalidState, "already joined", Some("join")),
            ),
            ClientMessage::Resume { .. } => self.send_to(
                part,
                ServerMessage::error(ErrorCode::InvalidState, "already joined", Some("resume")),
            ),
            ClientMessage::PublishOffer { sdp } if p.viewer.is_some() => {
                self.on_viewer_offer(part, sdp)
            }
            ClientMessage::PublishOffer { sdp } => self.on_publish_offer(part, sdp),
            ClientMessage::SubscribeAnswer { sdp } => self.on_subscribe_answer(part, sdp),
            ClientMessage::Trickle { target, candidate } => {
                self.on_trickle(part, target, candidate)
            }
            ClientMessage::IceRestart { target } => self.on_ice_restart(part, target),
            ClientMessage::Subscribe {
                track_ids,
                subscribe,
            } => self.on_subscribe(part, track_ids, subscribe),
            ClientMessage::Mute { track_id, muted } => self.on_mute(part, track_id, muted),
            ClientMessage::RemoveParticipant {
                participant_id,
                reason,
            } => self.on_remove_participant(part, participant_id, reason),
            ClientMessage::MuteChat {
                participant_id,
                muted,
            } => self.on_mute_chat(part, participant_id, muted),
            ClientMessage::TrackSettings {
                quality,
                width,
                height,
                ..
            } if p.viewer.is_some() => self.on_viewer_settings(part, quality, width, height),
            ClientMessage::TrackSettings {
                track_id,
                quality,
                width,
                height,
            } => self.on_track_settings(part, track_id, quality, width, height),
            ClientMessage::Ping { ts } => {
                let at = self.wall_clock(self.now);
                self.send_to(part, ServerMessage::pong(ts, at));
            }
            ClientMessage::History { since } => self.on_history(part, since),
            ClientMessage::Leave => self.remove_participant(part, LeaveReason::Left, "left", false),
        }
    }

    /// `trickle`: a remote candidate for one of the participant's connections.
    fn on_trickle(
        &mut self,
        part: PartKey,
        target: PcTarget,
        candidate: crate::signal::IceCandidate,
    ) {
        let kind = match target {
            PcTarget::Publisher => PcKind::Publisher,
            PcTarget::Subscriber => PcKind::Subscriber,
        };
        let key = PcKey { part, kind };
        let adding = usize::from(!candidate.candidate.is_empty());
        if self.refuse_candidates(key, adding, "trickle") {
            return;
        }
        let res = match self.pc_mut(key) {
            None => {
                self.send_to(
                    part,
                    ServerMessage::error(
                        ErrorCode::InvalidState,
                        "no publisher connection yet: send publish_offer first",
                        Some("trickle"),
                    ),
                );
                return;
            }
            Some(pc) => {
                if !candidate.candidate.is_empty() {
                    pc.remote_candidates += 1;
                }
                pc.rtc.add_remote_candidate(RTCIceCandidateInit {
                    candidate: candidate.candidate,
                    sdp_mid: candidate.sdp_mid,
                    sdp_mline_index: candidate.sdp_mline_index,
                    username_fragment: candidate.username_fragment,
                    ..Default::default()
                })
            }
            .map_err(|e| e.to_string()),
        };
        match res {
            Ok(()) => self.mark_dirty(key),
            Err(e) => self.send_to(
                part,
                ServerMessage::error(
                    ErrorCode::InvalidCandidate,
                    format!("candidate not added: {e}"),
                    Some("trickle"),
                ),
            ),
        }
    }

    /// `subscribe` / `unsubscribe`: one error per message and cause, not one per id.
    fn on_subscribe(&mut self, part: PartKey, track_ids: Vec<String>, subscribe: bool) {
        if subscribe && self.part(part).is_some_and(|p| !p.grants.subscribe) {
            self.send_to(
                part,
                ServerMessage::error(
                    ErrorCode::PermissionDenied,
                    "your token does not grant subscribing",
                    Some("subscribe"),
                ),
            );
            return;
        }
        let limits = &self.cfg.limits;
        if track_ids.len() > limits.max_ids_per_message {
            let max = limits.max_ids_per_message;
            self.stats.limits_hit.ids_per_message += 1;
            self.send_to(
                part,
                ServerMessage::error(
                    ErrorCode::LimitExceeded,
                    format!("at most {max} track ids per message; nothing was done"),
                    Some("subscribe"),
                ),
            );
            return;
        }
        let max_subs = limits.max_subscriptions;
        let mut unknown = Vec::new();
        let mut over_limit = 0usize;
        for tid in track_ids {
            // Only the participant's own room is looked in.
            if self.track(part.room, &tid).is_none() {
                unknown.push(tid);
                continue;
            }
            if subscribe {
                let full = self.part(part).is_some_and(|p| {
                    p.subscriptions.len() >= max_subs && !p.subscriptions.contains_key(tid.as_str())
                });
                if full {
                    over_limit += 1;
                    continue;
                }
                self.subscribe(part, &tid);
            } else {
                self.unsubscribe(part, &tid);
            }
        }
        // One error per message and cause, not one per id.
        if !unknown.is_empty() {
            let n = unknown.len();
            let mut listed: Vec<String> = unknown.into_iter().take(8).collect();
            if n > listed.len() {
                listed.push(format!("and {} more", n - listed.len()));
            }
            self.send_to(
                part,
                ServerMessage::error(
                    ErrorCode::NotFound,
                    format!("no track {} in this room", listed.join(", ")),
                    Some("subscribe"),
                ),
            );
        }
        if over_limit > 0 {
            self.stats.limits_hit.subscriptions += 1;
            self.send_to(
                part,
                ServerMessage::error(
                    ErrorCode::LimitExceeded,
                    format!(
                        "at most {max_subs} subscriptions per participant; {over_limit} track(s) not subscribed"
                    ),
                    Some("subscribe"),
                ),
            );
        }
    }

    /// `mute`: a publisher (un)mutes one of its tracks; unmuting resumes every subscriber at
    /// a keyframe without a sequence gap.
    fn on_mute(&mut self, part: PartKey, track_id: String, muted: bool) {
        let Some(t) = self.track(part.room, &track_id) else {
            return self.send_to(
                part,
                ServerMessage::error(
                    ErrorCode::NotFound,
                    format!("you publish no track {track_id}"),
                    Some("mute"),
                ),
            );
        };
        let owned = t.local_publisher() == Some(part);
        let admin = self.part(part).is_some_and(|p| p.grants.room_admin);
        if admin && !owned {
            return self.admin_mute_from(part, track_id, muted);
        }
        if owned && t.admin_muted && !muted && !admin {
            return self.send_to(
                part,
                ServerMessage::error(
                    ErrorCode::PermissionDenied,
                    format!(
                        "track {track_id} is muted by a room admin; only an admin can unmute it"
                    ),
                    Some("mute"),
                ),
            );
        }
        // (Another participant's track gets the same answer as a made-up id.)
        if !owned {
            self.send_to(
                part,
                ServerMessage::error(
                    ErrorCode::NotFound,
                    format!("you publish no track {track_id}"),
                    Some("mute"),
                ),
            );
            return;
        }
        if let Some(t) = self.track_mut(part.room, &track_id) {
            t.admin_muted = false;
        }
        self.set_muted(part.room, &track_id, muted, false);
    }

    /// A track was muted or unmuted (by its publisher here, or on its shard): everyone in the
    /// room is told, and unmuting resumes every subscriber at a keyframe without a gap.
    fn set_muted(&mut self, room: RoomKey, track_id: &str, muted: bool, by_admin: bool) {
        let now = self.now;
        let Some(r) = self.rooms.get_mut(&room) else {
            return;
        };
        let Some(pid) = r.tracks.get(track_id).map(|t| r.publisher_id(t)) else {
            return;
        };
        let Some(t) = r.tracks.get_mut(track_id) else {
            return;
        };
        if t.muted == muted {
            return;
        }
        t.muted = muted;
        if !muted {
            let infos = t.layer_infos(now);
            for dt in t.down.values_mut() {
                dt.rewriter.force_switch();
                if let Some(sel) = dt.selector.as_mut() {
                    sel.restart(&infos, now);
                    if let Some(l) = sel.wants_keyframe() {
                        self.effects.push(Effect::RequestKeyframe {
                            room,
                            track: t.id.clone(),
                            layer: l,
                        });
                    }
                }
            }
        }
        if t.local_publisher().is_some() {
            let relay = t.relay;
            for &peer in &r.peers {
                self.pipe_out.push(
                    peer,
                    PipeMsg::Muted {
                        relay,
                        muted,
                        by_admin,
                    },
                );
            }
        }
        self.broadcast(
            room,
            None,
            ServerMessage::TrackMuted {
                track_id: track_id.to_owned(),
                participant_id: pid,
                muted,
                by_admin,
            },
        );
    }

    /// `track_settings`: what a subscriber wants of a video track (layer cap, video size).
    fn on_track_settings(
        &mut self,
        part: PartKey,
        track_id: String,
        quality: Option<Option<Quality>>,
        width: Option<u32>,
        height: Option<u32>,
    ) {
        let now = self.now;
        // A track of another room is answered exactly like one that does not exist
        // (no existence oracle across rooms).
        let Some(track) = self
            .rooms
            .get_mut(&part.room)
            .and_then(|r| r.tracks.get_mut(track_id.as_str()))
        else {
            self.send_to(
                part,
                ServerMessage::error(
                    ErrorCode::NotFound,
                    format!("no track {track_id} in this room"),
                    Some("track_settings"),
                ),
            );
            return;
        };
        let infos = track.layer_infos(now);
        let Some(sel) = track.down.get_mut(&part).and_then(|d| d.selector.as_mut()) else {
            self.send_to(
                part,
                ServerMessage::error(
                    ErrorCode::InvalidState,
                    format!("not subscribed to video track {track_id}"),
                    Some("track_settings"),
                ),
            );
            return;
        };
        let requested = sel.requested().updated(quality, width, height);
        debug!(track = %track_id, ?requested, "track settings");
        sel.set_requested(requested, &infos, now);
        if let Some(l) = sel.wants_keyframe() {
            self.effects.push(Effect::RequestKeyframe {
                room: part.room,
                track: TrackId::from(track_id),
                layer: l,
            });
        }
    }

    /// Would `adding` more remote candidates take connection `key` past
    /// `max_remote_candidates`? Then the client is told (`request` names its message), the
    /// refusal counted, and true returned. Each candidate costs the ICE agent a scan of all
    /// earlier ones: a connection's list stays short.
    fn refuse_candidates(&mut self, key: PcKey, adding: usize, request: &str) -> bool {
        let max = self.cfg.limits.max_remote_candidates;
        let had = self.pc(key).map_or(0, |pc| pc.remote_candidates);
        if adding == 0 || had + adding <= max {
            return false;
        }
        self.stats.limits_hit.remote_candidates += 1;
        self.send_to(
            key.part,
            ServerMessage::error(
                ErrorCode::LimitExceeded,
                format!("at most {max} remote candidates per peer connection"),
                Some(request),
            ),
        );
        true
    }

    fn on_publish_offer(&mut self, part: PartKey, sdp: String) {
        let key = PcKey {
            part,
            kind: PcKind::Publisher,
        };
        let may_publish = self.part(part).is_some_and(|p| {
            !p.grants.hidden && (p.grants.publish_audio || p.grants.publish_video)
        });
        if !may_publish {
            self.send_to(
                part,
                ServerMessage::error(
                    ErrorCode::PermissionDenied,
                    "your token does not grant publishing media",
                    Some("publish_offer"),
                ),
            );
            return;
        }
        let Some((offer, candidates)) = self.checked_offer(key, sdp) else {
            return;
        };
        let fresh = self.part(part).is_some_and(|p| p.publ.is_none());
        if fresh {
            match self.new_pc(key) {
                Ok(pc) => {
                    if let Some(p) = part_mut!(self, part) {
                        p.publ = Some(pc);
                    }
                }
                Err(e) => {
                    self.send_to(
                        part,
                        ServerMessage::error(
                            ErrorCode::Internal,
                            e.to_string(),
                            Some("publish_offer"),
                        ),
                    );
                    return;
                }
            }
        }
        let now = self.now;
        let Some(pc) = self.pc_mut(key) else { return };
        let res = pc
            .rtc
            .set_remote_description(now, offer)
            .map_err(|e| (ErrorCode::InvalidSdp, format!("offer rejected: {e}")))
            .and_then(|_| {
                answer_red_first(&mut pc.rtc);
                pc.rtc
                    .create_answer(None)
                    .map_err(|e| (ErrorCode::InvalidSdp, format!("no answer possible: {e}")))
            })
            .and_then(|answer| {
                // What fails here fails because of the offer (e.g. transport parameters that
                // parse but cannot be used).
                pc.rtc
                    .set_local_description(now, answer.clone())
                    .map_err(|e| (ErrorCode::InvalidSdp, format!("answer not applied: {e}")))?;
                Ok(pc
                    .rtc
                    .local_description()
                    .map(|d| d.sdp)
                    .unwrap_or(answer.sdp))
            });
        match res {
            Ok(sdp) => {
                if self.sync_ufrag(key, &sdp) {
                    // An ICE restart: the agent dropped the old remote candidates.
                    if let Some(pc) = self.pc_mut(key) {
                        pc.remote_candidates = 0;
                    }
                }
                if let Some(pc) = self.pc_mut(key) {
                    pc.remote_candidates += candidates;
                }
                if let Some(p) = part_mut!(self, part) {
                    let rtx = p.publ.as_ref().map(rtx_config_of).unwrap_or_default();
                    if let Some(ing) = p.ingress.as_mut() {
                        ing.set_twcc_ext(ingress::twcc_ext_id(&sdp));
                        ing.set_rtx(rtx);
                        ing.set_audio_level_ext(ingress::audio_level_ext_id(&sdp));
                    }
                }
                self.send_to(part, ServerMessage::PublishAnswer { sdp });
                self.drop_stopped_publications(part);
            }
            Err((code, msg)) => {
                self.send_to(part, ServerMessage::error(code, msg, Some("publish_offer")));
                if fresh {
                    // A first offer that failed leaves nothing behind: the next one starts
                    // from a new connection.
                    if let Some(mut pc) = part_mut!(self, part).and_then(|p| p.publ.take()) {
                        let _ = pc.rtc.close();
                        self.demux.release(key);
                    }
                    return;
                }
            }
        }
        self.mark_dirty(key);
    }

    /// A client's offer (`publish_offer`) for connection `key`: within the candidate budget,
    /// passing `sdpcheck`, parsed; with its number of candidates. `None` when refused (the
    /// client was told).
    fn checked_offer(&mut self, key: PcKey, sdp: String) -> Option<(RTCSessionDescription, usize)> {
        let candidates = sdpcheck::count_candidates(&sdp);
        if self.refuse_candidates(key, candidates, "publish_offer") {
            return None;
        }
        let refused = match sdpcheck::check_offer(&sdp) {
            Err(e) => format!("offer refused: {e}"),
            Ok(()) => match RTCSessionDescription::offer(sdp) {
                Ok(o) => return Some((o, candidates)),
                Err(e) => format!("offer could not be parsed: {e}"),
            },
        };
        let msg = ServerMessage::error(ErrorCode::InvalidSdp, refused, Some("publish_offer"));
        self.send_to(key.part, msg);
        None
    }

    /// After a publisher renegotiation: tracks whose transceiver no longer receives (the
    /// client removed the track, or set it inactive) are unpublished.
    fn drop_stopped_publications(&mut self, part: PartKey) {
        use rtc::rtp_transceiver::RTCRtpTransceiverDirection as Dir;
        let Some(room) = self.rooms.get_mut(&part.room) else {
            return;
        };
        let Some(p) = room.parts.get_mut(&part) else {
            return;
        };
        let Some(pc) = p.publ.as_mut() else { return };
        let ids: Vec<_> = pc.rtc.get_transceivers().collect();
        let mut receiving = Vec::new();
        for id in ids {
            if let Some(t) = pc.rtc.rtp_transceiver(id) {
                if matches!(t.direction(), Dir::Recvonly | Dir::Sendrecv) {
                    if let Some(r) = t.receiver() {
                        receiving.push(r);
                    }
                }
            }
        }
        let stopped: Vec<String> = p
            .published()
            .filter(|tid| {
                room.tracks.get(*tid).is_some_and(|t| match &t.publisher {
                    Publisher::Local { receiver, .. } => !receiving.contains(receiver),
                    Publisher::Remote { .. } => false,
                })
            })
            .map(str::to_owned)
            .collect();
        for tid in stopped {
            self.unpublish(part.room, &tid);
        }
    }

    fn on_subscribe_answer(&mut self, part: PartKey, sdp: String) {
        let key = PcKey {
            part,
            kind: PcKind::Subscriber,
        };
        let Some(p) = part_mut!(self, part) else {
            return;
        };
        if !p.sub_offer_pending {
            self.send_to(
                part,
                ServerMessage::error(
                    ErrorCode::InvalidState,
                    "no subscribe_offer is waiting for an answer",
                    Some("subscribe_answer"),
                ),
            );
            return;
        }
        let candidates = sdpcheck::count_candidates(&sdp);
        if self.refuse_candidates(key, candidates, "subscribe_answer") {
            return;
        }
        let Some(p) = part_mut!(self, part) else {
            return;
        };
        let res = sdpcheck::check_answer(&sdp)
            .map_err(|e| format!("answer refused: {e}"))
            .and_then(|()| {
                RTCSessionDescription::answer(sdp)
                    .map_err(|e| format!("answer could not be parsed: {e}"))
            })
            .and_then(|a| {
                p.sub
                    .rtc
                    .set_remote_description(self.now, a)
                    .map_err(|e| format!("answer rejected: {e}"))
            });
        match res {
            Ok(()) => {
                p.sub.remote_candidates += candidates;
                p.sub_offer_pending = false;
                p.offers_answered = p.offers_sent;
                let again = p.sub_needs_offer;
                let early = std::mem::take(&mut p.sub.early);
                for (from, at, data) in early {
                    self.feed_datagram(at, at, &data, from);
                }
                self.refresh_downtracks(part);
                if again {
                    self.send_offer(part);
                }
            }
            Err(e) => {
                self.send_to(
                    part,
                    ServerMessage::error(ErrorCode::InvalidSdp, e, Some("subscribe_answer")),
                );
            }
        }
        self.mark_dirty(key);
    }

    // ---------------------------------------------------------------- lifecycle

    /// Queue a signaling event for a participant: into its channel, or behind what already
    /// waits in its outbox (coalesced; see `outbox`).
    fn send_to(&mut self, part: PartKey, msg: ServerMessage) {
        let Some(p) = part_mut!(self, part) else {
            return;
        };
        if p.events.is_closed() {
            self.effects.push(Effect::Remove {
                part,
                why: LeaveReason::Disconnected,
                reason: "signaling closed".into(),
            });
            return;
        }
        // A viewer's HTTP session reads only the answer to its offer and errors.
        if p.viewer.is_some()
            && !matches!(
                msg,
                ServerMessage::PublishAnswer { .. } | ServerMessage::Error { .. }
            )
        {
            return;
        }
        match p.outbox.send(&p.events, msg) {
            Ok(()) => {
                if !p.outbox.is_empty() {
                    self.backlogged.insert(part);
                }
            }
            Err(e) => {
                self.stats.limits_hit.signaling_queue_overflows += 1;
                warn!(participant = %p.pid, "signaling queue full ({e}); disconnecting");
                self.effects.push(Effect::Remove {
                    part,
                    why: LeaveReason::SignalingOverflow,
                    reason: "signaling queue full".into(),
                });
            }
        }
    }

    /// Move waiting events of backlogged participants into their channels.
    fn flush_outboxes(&mut self) {
        let rooms = &mut self.rooms;
        self.backlogged.retain(|part| {
            rooms
                .get_mut(&part.room)
                .and_then(|r| r.parts.get_mut(part))
                .is_some_and(|p| !p.outbox.flush(&p.events))
        });
    }

    fn broadcast(&mut self, room: RoomKey, except: Option<PartKey>, msg: ServerMessage) {
        if self.shutting_down {
            return;
        }
        // On the room's home, room events go on its timeline too.
        self.timeline_event(room, &msg);
        // Viewers (WHEP) get no room events: nothing on their side reads them.
        let members: Vec<PartKey> = self
            .rooms
            .get(&room)
            .map(|r| {
                r.members
                    .iter()
                    .copied()
                    .filter(|m| Some(*m) != except)
                    .filter(|m| r.parts.get(m).is_some_and(|p| p.viewer.is_none()))
                    .collect()
            })
            .unwrap_or_default();
        for m in members {
            self.send_to(m, msg.clone());
        }
    }

    fn remove_participant(&mut self, part: PartKey, why: LeaveReason, reason: &str, tell: bool) {
        let Some(room) = self.rooms.get_mut(&part.room) else {
            return;
        };
        let Some(p) = room.parts.get_mut(&part) else {
            return;
        };
        let span = info_span!("participant", session = %p.session, room = %room.name, participant = %p.pid);
        let _g = span.enter();
        info!(reason, why = why.as_str(), "leaving");
        if tell {
            p.outbox.flush(&p.events);
            let _ = p.events.try_send(ServerMessage::Leave {
                reason: reason.to_owned(),
            });
        }
        let published: Vec<String> = p.published().map(str::to_owned).collect();
        for tid in p.subscriptions.keys() {
            if let Some(t) = room.tracks.get_mut(tid) {
                t.down.remove(&part);
                sync_needed(t, &mut self.pipe_out);
            }
        }
        for tid in published {
            self.unpublish(part.room, &tid);
        }
        let Some(room) = self.rooms.get_mut(&part.room) else {
            return;
        };
        let Some(mut p) = room.parts.remove(&part) else {
            return;
        };
        room.members.retain(|m| *m != part);
        let hidden = p.grants.hidden;
        let room_name = room.name.clone();
        for &peer in room.peers.iter().filter(|_| !hidden) {
            self.pipe_out.push(
                peer,
                PipeMsg::MemberLeft {
                    room: room.name.clone(),
                    participant_id: p.pid.clone(),
                    reason: why,
                },
            );
        }
        // The room's home keeps it while other shards host it (it sequences its timeline).
        if room.members.is_empty() && (room.home.is_some() || room.peers.is_empty()) {
            info!(room = %room.name, "room closed");
            let name = room.name.clone();
            self.close_room(part.room);
            self.room_keys.remove(&name);
        }
        self.by_pid.remove(&p.pid);
        if let Some(e) = &p.egress {
            let s = e.stats();
            if s.nack.requested > 0 {
                debug!(stats = ?s, "subscriber fast path");
            }
            self.departed_egress += s;
        }
        if let Some(ing) = &p.ingress {
            self.departed_ingress += ing.stats();
        }
        for (kind, pc) in std::iter::once((PcKind::Subscriber, &mut p.sub))
            .chain(p.publ.as_mut().map(|pc| (PcKind::Publisher, pc)))
        {
            let _ = pc.rtc.close();
            while let Some(out) = pc.rtc.poll_write() {
                self.tx.send(out.message, Remote::of(&out.transport), None);
            }
            self.demux.release(PcKey { part, kind });
        }
        self.dirty.retain(|k| k.part != part);
        let pid = p.pid.clone();
        let who = hook_ref(&p);
        drop(p); // closes the events channel: the WebSocket session ends
        if let Some(w) = &self.cfg.webhooks {
            w.emit(
                webhook::Event::new(
                    webhook::EventKind::ParticipantLeft,
                    &room_name,
                    self.wall_clock(self.now),
                )
                .with_participant(who)
                .with_reason(why),
            );
        }
        if hidden {
            return;
        }
        self.broadcast(
            part.room,
            None,
            ServerMessage::ParticipantLeft {
                participant_id: pid,
                reason: why,
            },
        );
    }

    /// The room has no participant left here: the other shards are told, and what was
    /// relayed to us of it is forgotten.
    fn close_room(&mut self, room: RoomKey) {
        let Some(r) = self.rooms.remove(&room) else {
            return;
        };
        for &peer in &r.peers {
            self.pipe_out.push(
                peer,
                PipeMsg::Bye {
                    room: r.name.clone(),
                },
            );
        }
        for t in r.tracks.values() {
            if let Publisher::Remote { shard, .. } = t.publisher {
                self.relays_in.remove(&(shard, t.relay));
            }
        }
    }

    /// RTCP sender reports for every forwarded stream.
    fn sender_reports(&mut self, now: Instant) {
        let wall = self.wall_clock(now);
        for p in self.rooms.values_mut().flat_map(|r| r.parts.values_mut()) {
            trace!(participant = %p.pid, twcc = ?p.estimate().twcc(), remb = ?p.estimate().remb(now), "downlink estimate");
            if let (Some(e), Some(to)) = (p.egress.as_mut(), p.sub.media_addr) {
                if let Some(wire) = e.sender_reports(now, wall) {
                    self.tx.send(wire, to, None);
                }
            }
        }
    }

    /// Graceful shutdown: every participant is told and removed; nothing is accepted after.
    /// The driver then ends the turn and sends what is queued.
    pub fn shutdown(&mut self, now: Instant) {
        self.advance(now);
        if self.shutting_down {
            return;
        }
        let parts: Vec<PartKey> = self
            .rooms
            .values()
            .flat_map(|r| r.members.iter().copied())
            .collect();
        info!(participants = parts.len(), "core shutting down");
        self.shutting_down = true;
        for part in parts {
            self.remove_participant(part, LeaveReason::Shutdown, "server shutting down", true);
        }
    }
}

/// (A track relayed from another shard.) Tell the publisher's shard whether we have
/// subscribers of it, and which layers they need, when that changed.
fn sync_needed(track: &mut Track, out: &mut PipeOut) {
    let Publisher::Remote { shard, .. } = track.publisher else {
        return;
    };
    let subscribed = !track.down.is_empty();
    let layers = if subscribed {
        layer_bits(needed_layers(
            track.down.values().filter_map(|d| d.selector.as_ref()),
        ))
    } else {
        0
    };
    let state = (subscribed, layers);
    if track.needed_sent == Some(state) || (track.needed_sent.is_none() && !subscribed) {
        return;
    }
    track.needed_sent = Some(state);
    out.push(
        shard,
        PipeMsg::Needed {
            relay: track.relay,
            subscribed,
            layers,
        },
    );
}

fn validate_name(field: &str, value: &str) -> Result<(), SfuError> {
    if value.is_empty() {
        return Err(SfuError::InvalidJoin(format!(
            "`{field}` must not be empty"
        )));
    }
    if value.chars().count() > 128 {
        return Err(SfuError::InvalidJoin(format!(
            "`{field}` is longer than 128 characters"
        )));
    }
    if value.chars().any(char::is_control) {
        return Err(SfuError::InvalidJoin(format!(
            "`{field}` contains control characters"
        )));
    }
    Ok(())
}

/// The name a published track has for its publisher: the msid's track id, or the m-section's
/// mid when there is no msid or another of the participant's tracks already has that id (so it
/// is unique per participant).
fn client_track_id(msid_track: &str, mid: &str, taken: impl Fn(&str) -> bool) -> String {
    if msid_track.is_empty() || taken(msid_track) {
        mid.to_owned()
    } else {
        msid_track.to_owned()
    }
}

/// The RIDs (`a=rid:<id> send`) of the m-section of `sdp` whose `a=mid` is `mid`.
pub fn offered_rids(sdp: &str, mid: &str) -> Vec<String> {
    let mut out = Vec::new();
    for section in sdp.split("\nm=").skip(1) {
        let names_track = section
            .lines()
            .any(|l| l.trim().strip_prefix("a=mid:") == Some(mid));
        if !names_track {
            continue;
        }
        for line in section.lines() {
            let Some(v) = line.trim().strip_prefix("a=rid:") else {
                continue;
            };
            let mut parts = v.split_whitespace();
            if let (Some(rid), Some("send")) = (parts.next(), parts.next()) {
                if !out.iter().any(|r| r == rid) {
                    out.push(rid.to_owned());
                }
            }
        }
    }
    out
}

#[cfg(test)]
// Tests pick an arbitrary origin for their virtual time (and may share test state).
#[allow(clippy::disallowed_methods, clippy::disallowed_types)]
mod tests {
    use super::*;

    #[test]
    fn offered_rids_are_read_from_the_tracks_section() {
        let sdp = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=msid:s a1\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:1\r\na=rid:f send\r\n\
                   a=rid:q send\r\na=rid:h send\r\na=simulcast:send f;q;h\r\n";
        assert_eq!(offered_rids(sdp, "1"), ["f", "q", "h"]);
        assert!(offered_rids(sdp, "0").is_empty());
        assert!(offered_rids(sdp, "nope").is_empty());
    }

    /// A publish-only participant (WHIP) gets no subscriber offer, and the connect timeout
    /// waits for its publisher connection: without one it is removed like any participant
    /// whose transport never came up.
    #[test]
    fn a_publish_only_participant_is_never_offered_and_times_out_on_its_publisher() {
        use crate::sfu::{EVENT_QUEUE, Grants};
        use tokio::sync::{mpsc, oneshot};
        let addr: SocketAddr = "127.0.0.1:7882".parse().unwrap();
        let t0 = Instant::now();
        let mut sfu = Sfu::new(
            crate::sim::server::sim_config(addr.ip()),
            addr,
            1,
            t0,
            crate::sim::server::SimTransmit::default(),
        );
        let mut join = |publish_only: bool, name: &str| {
            let (events, rx) = mpsc::channel(EVENT_QUEUE);
            let (reply, mut answer) = oneshot::channel();
            let req = JoinRequest {
                room: "r".into(),
                name: name.into(),
                auto_subscribe: !publish_only,
                events,
                peers: Vec::new(),
                identity: None,
                grants: Grants::default(),
                publish_only,
                view: None,
                home: None,
                timeline: Default::default(),
                session: String::new(),
            };
            let _ = sfu.handle_command(t0, Command::Join { req, reply });
            assert!(matches!(answer.try_recv(), Ok(Ok(_))), "{name} joins");
            rx
        };
        let mut ingest = join(true, "ingest");
        let mut viewer = join(false, "viewer");
        sfu.end_turn(t0);
        let drain = |rx: &mut mpsc::Receiver<ServerMessage>| {
            let mut out = Vec::new();
            while let Ok(m) = rx.try_recv() {
                out.push(m);
            }
            out
        };
        let offers = |msgs: &[ServerMessage]| {
            msgs.iter()
                .filter(|m| matches!(m, ServerMessage::SubscribeOffer { .. }))
                .count()
        };
        assert_eq!(offers(&drain(&mut ingest)), 0, "no subscriber offer");
        assert_eq!(
            offers(&drain(&mut viewer)),
            1,
            "a normal participant gets one"
        );
        let later = t0 + CONNECT_TIMEOUT + Duration::from_secs(1);
        sfu.handle_timeout(later);
        sfu.end_turn(later);
        let left = drain(&mut ingest);
        assert!(
            left.iter()
                .any(|m| matches!(m, ServerMessage::Leave { reason }
                if reason.contains("did not connect"))),
            "{left:?}"
        );
    }

    #[test]
    fn names_are_validated() {
        assert!(validate_name("room", "").is_err());
        assert!(validate_name("room", "a\nb").is_err());
        assert!(validate_name("room", &"x".repeat(129)).is_err());
        assert!(validate_name("room", "demo").is_ok());
    }

    /// ICE-TCP frames are counted by the connection table (`IceTcpStats::frames_in`), not as
    /// UDP datagrams; those the core gives to no connection count apart from the UDP
    /// datagrams it ignores, and out of the UDP drop reasons.
    #[test]
    fn ice_tcp_frames_are_not_counted_as_udp_datagrams() {
        struct Nowhere;
        impl Transmit for Nowhere {
            fn send(&mut self, _data: BytesMut, _to: Remote, _origin: Option<Instant>) {}
        }
        let t0 = Instant::now();
        let server: SocketAddr = "127.0.0.1:7882".parse().unwrap();
        let config = crate::sim::server::sim_config(server.ip());
        let mut sfu = Sfu::new(config, server, 1, t0, Nowhere);
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        // SRTP-looking, from an address no connection validated: dropped by the demux.
        let data = b"\x80\x60\x00\x01 not from a known address";
        for _ in 0..3 {
            sfu.handle_datagram(t0, t0, peer, data);
        }
        for _ in 0..2 {
            sfu.handle_tcp_frame(t0, t0, peer, data);
        }
        let s = sfu.stats();
        assert_eq!(s.udp_datagrams_in, 3);
        assert_eq!(s.udp_datagrams_ignored, 3);
        assert_eq!(s.ice_tcp_frames_ignored, 2);
        assert_eq!(s.udp_dropped.unknown_address, 3, "{:?}", s.udp_dropped);
    }
}
