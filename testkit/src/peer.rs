//! A synthetic Plaza participant: WebSocket signaling plus two webrtc-rs peer connections.
//!
//! - **subscriber PC**: answers every `subscribe_offer` (the latest one when several are queued),
//!   receives the server's `chat`/`input` data channels and the forwarded tracks, and keeps
//!   per-track receive statistics.
//! - **publisher PC** (when publishing): Opus + VP8 tracks fed from pre-encoded files, offered
//!   with `publish_offer`; media starts once the connection is up. With
//!   [`PeerOptions::simulcast`] the video track has one encoding per layer (RIDs, `a=rid` /
//!   `a=simulcast` in the offer, MID + RID header extensions on every packet), each fed from its
//!   own clip; keyframe requests are answered per layer (by media SSRC) and the server's
//!   `publisher_layers` pauses and resumes layers ([`PeerOptions::honour_publisher_layers`]).
//! - **bandwidth limit** ([`PeerOptions::subscriber_bandwidth_bps`]): the subscriber PC talks
//!   to the server through a local UDP relay whose downstream is a bottleneck
//!   ([`super::relay`]), changeable at run time ([`Peer::set_subscriber_bandwidth`]).
//!
//! Every wait is bounded by a timeout; server misbehaviour is recorded as events and returned as
//! errors, never a panic. State changes wake waiters through a `watch` counter, so tests wait
//! for conditions, not for time.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Display;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::{Bytes, BytesMut};
use futures_util::stream::SplitStream;
use futures_util::{SinkExt, StreamExt};
use plaza::signal::{
    ClientMessage, ErrorCode, IceCandidate, ParticipantInfo, PcTarget, Quality, ServerMessage,
    TrackInfo, TrackKind,
};
use rtc::interceptor::Slot;
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::media_engine::{MIME_TYPE_OPUS, MIME_TYPE_VP8};
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters,
    RTCRtpEncodingParameters, RtpCodecKind,
};
use serde_json::{Map, Value};
use tokio::net::TcpStream;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::AbortHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceCandidateInit, RTCIceConnectionState, RTCPeerConnectionIceEvent,
    RTCPeerConnectionState, RTCSessionDescription, Registry, SettingEngineBuilder,
    register_default_interceptors,
};
use webrtc::rtp_transceiver::RtpSender;

use super::decoder::PliPolicy;
use super::envelope;
use super::keyframe::{
    FeedbackCounters, KEYFRAME_TAP_SLOT, KeyframeRequestTap, SenderReportSeen,
    keyframe_request_ssrcs,
};
use super::media::{
    self, Clip, MediaPacketizer, PacerControl, Pacing, PacketSink, SendCounters, run_pacer,
};
use super::recv::{LayerChange, RemoteTrackStats};
use super::relay::{self, Relay, RelayStats};

type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

// ───────────────────────────── options and public types ─────────────────────────────

/// How a synthetic peer joins and what it publishes.
#[derive(Debug, Clone)]
pub struct PeerOptions {
    pub publish_audio: bool,
    pub publish_video: bool,
    /// Ogg Opus file for the audio track.
    pub audio_file: PathBuf,
    /// VP8 IVF file for the video track.
    pub video_file: PathBuf,
    /// `join.auto_subscribe` (None = server default, which is true).
    pub auto_subscribe: Option<bool>,
    /// `join.timeline_events` (None = server default, which is false).
    pub timeline_events: Option<bool>,
    /// Access token to join with; `None`: one minted by [`crate::token::participant`].
    pub token: Option<String>,
    pub protocol: Option<u32>,
    /// Bound of every connect step (WebSocket open, join, publish answer, connection, channels)
    /// and of each peer-connection operation.
    pub timeout: Duration,
    /// `connect` returns only once the publisher PC is connected (when publishing) and both
    /// data channels are open.
    pub wait_ready: bool,
    /// How many recent packets each remote track keeps for inspection.
    pub keep_recent_packets: usize,
    /// How many received data-channel messages are kept (oldest dropped first).
    pub max_kept_messages: usize,
    /// Local address the peer connections bind (host candidates only; mDNS is off).
    pub bind_ip: String,
    /// Publish the video track as simulcast (replaces `video_file`).
    pub simulcast: Option<SimulcastOptions>,
    /// Pause / resume simulcast layers as the server's `publisher_layers` says (dynacast).
    pub honour_publisher_layers: bool,
    /// Receive through a bottleneck of this many bit/s (see [`super::relay`]); `Some(0)` puts
    /// the relay in place without a limit, so that one can be set later with
    /// [`Peer::set_subscriber_bandwidth`].
    pub subscriber_bandwidth_bps: Option<u64>,
    /// Queue bound of that bottleneck, as a delay: beyond it packets are dropped.
    pub subscriber_max_queue_delay: Duration,
    /// The subscriber connection accepts RTX (`rtx/90000`, `apt=96`; RFC 4588): the server's
    /// retransmissions come on each video track's RTX stream. Off by default (retransmissions
    /// on the media SSRC).
    pub subscriber_rtx: bool,
    /// When received video asks the server for a keyframe (PLI), as a browser would (see
    /// [`super::decoder`]). `Off` by default: a webrtc-rs peer without a decoder never does.
    pub pli_policy: PliPolicy,
    /// Leave out the Nth RTP packet (1-based) of the first video encoding, as a lossy network
    /// would: the server should ask for it (NACK) and report it lost. `None`: send everything.
    pub skip_video_packet: Option<u64>,
    /// Rewrites the first publish offer's SDP before it is sent (to act as another client
    /// would, e.g. one that sends no `a=msid`). The local description keeps the original.
    pub munge_publish_offer: Option<fn(&str) -> String>,
    /// How each published encoding's frames leave: all of a frame's packets at once (the
    /// default), or spread as a browser's pacer sends them.
    pub pacing: Pacing,
}

/// The layers of a simulcast video track.
#[derive(Debug, Clone, PartialEq)]
pub struct SimulcastOptions {
    /// `(rid, VP8 IVF file)`, in the order they are offered (`a=rid` lines and the
    /// `a=simulcast` list). The server must rank layers by content, not by this order.
    pub layers: Vec<(String, PathBuf)>,
}

impl SimulcastOptions {
    /// The shipped clips `q` (320x180), `h` (640x360), `f` (1280x720), offered in that order.
    pub fn standard() -> Self {
        SimulcastOptions {
            layers: media::simulcast_files(),
        }
    }

    /// The same layers offered in reverse order (`f`, `h`, `q`).
    pub fn reversed(mut self) -> Self {
        self.layers.reverse();
        self
    }

    /// The same layers in a random order.
    pub fn shuffled(mut self) -> Self {
        use rand::seq::SliceRandom;
        self.layers.shuffle(&mut rand::rng());
        self
    }

    pub fn rids(&self) -> Vec<String> {
        self.layers.iter().map(|(r, _)| r.clone()).collect()
    }
}

impl Default for PeerOptions {
    fn default() -> Self {
        PeerOptions {
            publish_audio: false,
            publish_video: false,
            audio_file: media::default_audio_file(),
            video_file: media::default_video_file(),
            auto_subscribe: None,
            timeline_events: None,
            token: None,
            protocol: None,
            timeout: Duration::from_secs(10),
            wait_ready: true,
            keep_recent_packets: 64,
            max_kept_messages: 10_000,
            bind_ip: "127.0.0.1".to_owned(),
            simulcast: None,
            honour_publisher_layers: true,
            subscriber_bandwidth_bps: None,
            subscriber_max_queue_delay: relay::DEFAULT_MAX_DELAY,
            subscriber_rtx: false,
            pli_policy: PliPolicy::Off,
            skip_video_packet: None,
            munge_publish_offer: None,
            pacing: Pacing::Burst,
        }
    }
}

impl PeerOptions {
    /// Publishes audio and video (and subscribes, like every participant).
    pub fn publisher() -> Self {
        PeerOptions {
            publish_audio: true,
            publish_video: true,
            ..Default::default()
        }
    }

    /// Subscribes only.
    pub fn subscriber() -> Self {
        PeerOptions::default()
    }

    /// Publishes audio and simulcast video (the three shipped layers).
    pub fn simulcast_publisher() -> Self {
        PeerOptions {
            simulcast: Some(SimulcastOptions::standard()),
            ..PeerOptions::publisher()
        }
    }

    pub fn publishing(&self) -> bool {
        self.publish_audio || self.publish_video
    }
}

/// What the server said in `joined`, plus how long joining took.
#[derive(Debug, Clone)]
pub struct JoinedInfo {
    pub protocol: u32,
    pub server_version: String,
    pub room: String,
    pub participant_id: String,
    pub participants: Vec<ParticipantInfo>,
    pub max_data_message: usize,
    /// For `resume` after a dropped connection (absent when the server does not resume).
    pub resume_token: Option<String>,
    /// The STUN/TURN servers the server handed out (empty when it has none).
    pub ice_servers: Vec<plaza::signal::IceServer>,
    /// The server's id of this session (`SE_…`), in its logs and webhook events.
    pub session_id: Option<String>,
    /// WebSocket open → `joined` received.
    pub join_latency: Duration,
}

/// A data channel of the subscriber connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Channel {
    /// Reliable, ordered.
    Chat,
    /// Unordered, no retransmissions.
    Input,
    /// Any other label the server opened.
    Other(String),
}

impl Channel {
    pub fn label(&self) -> &str {
        match self {
            Channel::Chat => "chat",
            Channel::Input => "input",
            Channel::Other(l) => l,
        }
    }

    pub fn from_label(label: &str) -> Channel {
        match label {
            "chat" => Channel::Chat,
            "input" => Channel::Input,
            other => Channel::Other(other.to_owned()),
        }
    }
}

/// A payload to send on a data channel.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    Text(String),
    Binary(Bytes),
}

/// A data-channel message received from the server.
#[derive(Debug, Clone)]
pub struct DataMessage {
    pub channel: Channel,
    /// The sender (`from` in the envelope header), if the envelope had one.
    pub from: Option<String>,
    /// The payload after the envelope header.
    pub payload: Bytes,
    pub is_text: bool,
    /// The whole envelope header.
    pub header: Map<String, Value>,
    /// Set when the message was not a valid envelope (then `payload` is the whole message).
    pub malformed: Option<String>,
    pub received_at: Instant,
}

impl DataMessage {
    /// The payload as text, for text messages that are valid UTF-8.
    pub fn text(&self) -> Option<&str> {
        if self.is_text {
            std::str::from_utf8(&self.payload).ok()
        } else {
            None
        }
    }
}

/// Something that happened to the peer, in order of arrival.
#[derive(Debug, Clone)]
pub enum PeerEvent {
    /// Every message the server sent (including offers, answers and trickles).
    Server(ServerMessage),
    /// A server text frame that is not a valid `ServerMessage`.
    Unparsed {
        text: String,
        error: String,
    },
    /// The WebSocket ended (`reason` says how).
    WsClosed {
        reason: String,
    },
    /// The nth `subscribe_offer` was answered.
    SubscribeAnswered {
        n: u64,
    },
    /// The publisher's answer was applied.
    PublishAnswered {
        n: u64,
    },
    /// An offer/answer could not be applied (the connection goes on).
    NegotiationFailed {
        target: PcTarget,
        error: String,
    },
    /// A server ICE candidate could not be added.
    CandidateFailed {
        target: PcTarget,
        error: String,
    },
    ConnectionState {
        target: PcTarget,
        state: RTCPeerConnectionState,
    },
    /// The ICE connection state of one connection (it goes through `checking` again after an
    /// ICE restart).
    IceState {
        target: PcTarget,
        state: RTCIceConnectionState,
    },
    /// A forwarded track delivered its first packet.
    TrackStarted {
        track_id: String,
        stream_id: String,
        kind: TrackKind,
    },
    /// The server unpublished a forwarded track (or its publisher left), or the connection
    /// closed.
    TrackEnded {
        track_id: String,
    },
    DataChannelOpen {
        label: String,
    },
    DataChannelClosed {
        label: String,
    },
    /// Local media started flowing on the publisher PC.
    MediaStarted {
        kind: TrackKind,
        client_track_id: String,
        payload_type: u8,
    },
    /// A local problem worth knowing about (e.g. media could not start).
    Warning {
        message: String,
    },
}

#[derive(Debug, Clone)]
pub struct TimedEvent {
    pub at: Instant,
    pub event: PeerEvent,
}

/// Offer/answer and ICE bookkeeping.
#[derive(Debug, Clone, Default)]
pub struct NegotiationStats {
    pub subscribe_offers: u64,
    /// Offers superseded by a newer one before they were handled.
    pub subscribe_offers_skipped: u64,
    pub subscribe_answers: u64,
    pub publish_offers: u64,
    pub publish_answers: u64,
    pub remote_candidates_added: u64,
    pub local_candidates_sent: u64,
    pub errors: Vec<String>,
}

/// A published local track and its send counters.
#[derive(Debug, Clone)]
pub struct LocalTrackStats {
    pub kind: TrackKind,
    /// Our own track id (the msid track id in the offer).
    pub client_track_id: String,
    /// The server's id for it, once the server announced it (`track_published`).
    pub server_track_id: Option<String>,
    /// SSRC of the (first) encoding.
    pub ssrc: u32,
    pub payload_type: Option<u8>,
    /// Every layer is paused (by the application or the server).
    pub paused: bool,
    /// Sum over the layers.
    pub counters: SendCounters,
    /// Per encoding: one for a plain track, one per RID for simulcast (in offer order).
    pub layers: Vec<LocalLayerStats>,
    /// `publisher_layers` messages received for this track.
    pub publisher_layers_received: u64,
}

/// One encoding of a local track.
#[derive(Debug, Clone)]
pub struct LocalLayerStats {
    /// RID, empty for a plain track.
    pub rid: String,
    pub ssrc: u32,
    pub width: u16,
    pub height: u16,
    /// Paused by the application ([`Peer::pause_layer`], [`Peer::pause_media`], mute).
    pub paused: bool,
    /// Paused because the server's last `publisher_layers` listed it in `paused`.
    pub dynacast_paused: bool,
    /// How often `publisher_layers` paused / resumed it.
    pub dynacast_pauses: u64,
    pub dynacast_resumes: u64,
    pub counters: SendCounters,
}

/// A snapshot of everything the peer knows.
#[derive(Debug, Clone)]
pub struct PeerStats {
    pub name: String,
    pub participant_id: String,
    pub remote_tracks: Vec<RemoteTrackStats>,
    pub local_tracks: Vec<LocalTrackStats>,
    pub negotiation: NegotiationStats,
    pub messages_received: u64,
    pub closed: Option<String>,
}

/// The server (or the network) ended the peer's session while it did not mean to leave: the
/// first of a `leave` from the server, the WebSocket closing, or a peer connection going
/// `failed` / `closed`. What [`Peer::leave`] / [`Peer::disconnect`] cause afterwards is not a
/// removal.
#[derive(Debug, Clone, PartialEq)]
pub struct Removal {
    pub at: Instant,
    pub reason: String,
}

// ───────────────────────────── shared state ─────────────────────────────

#[derive(Debug, Default)]
struct State {
    participant_id: Option<String>,
    /// The node a `redirect` named (`host:port`): join there instead.
    redirect: Option<String>,
    events: Vec<TimedEvent>,
    remote_tracks: BTreeMap<String, RemoteTrackStats>,
    room_tracks: BTreeMap<String, TrackInfo>,
    participants: BTreeMap<String, ParticipantInfo>,
    messages: VecDeque<DataMessage>,
    messages_total: u64,
    negotiation: NegotiationStats,
    pc_state: HashMap<PcTarget, RTCPeerConnectionState>,
    open_channels: Vec<String>,
    closed: Option<String>,
    /// The code of the error that refused the join, if one did.
    join_refusal: Option<ErrorCode>,
    /// Server messages received in this participant's session (`joined` is the first; a
    /// `resumed` does not count), as `resume` reports them.
    received: u64,
    /// The first sign the session was ended for us (see [`Removal`]).
    removed: Option<Removal>,
    joined: Option<std::result::Result<JoinedInfo, String>>,
    /// `layer_changed` for tracks that have not delivered a packet yet.
    pending_layer_changes: HashMap<String, Vec<LayerChange>>,
    /// `publisher_layers` received: server track id → count.
    publisher_layers: HashMap<String, u64>,
}

impl State {
    fn push(&mut self, event: PeerEvent) {
        self.events.push(TimedEvent {
            at: Instant::now(),
            event,
        });
    }

    /// Marks a forwarded track as ended. webrtc-rs 0.21 never reports the end of a remote track
    /// (only closing the connection ends its event stream), so the server's
    /// `track_unpublished` / `participant_left` are what end it.
    fn end_remote_track(&mut self, track_id: &str) {
        if let Some(t) = self.remote_tracks.get_mut(track_id)
            && !t.ended
        {
            t.ended = true;
            self.push(PeerEvent::TrackEnded {
                track_id: track_id.to_owned(),
            });
        }
    }

    /// Records a removal unless one is recorded already.
    fn remove(&mut self, reason: String) {
        if self.removed.is_none() {
            self.removed = Some(Removal {
                at: Instant::now(),
                reason,
            });
        }
    }

    fn layer_changed(&mut self, track_id: &str, change: LayerChange) {
        match self.remote_tracks.get_mut(track_id) {
            Some(t) => t.on_layer_changed(change),
            None => self
                .pending_layer_changes
                .entry(track_id.to_owned())
                .or_default()
                .push(change),
        }
    }

    fn add_participant(&mut self, p: &ParticipantInfo) {
        for t in &p.tracks {
            self.room_tracks.insert(t.id.clone(), t.clone());
        }
        self.participants.insert(p.id.clone(), p.clone());
    }
}

struct Shared {
    name: String,
    ws_opened_at: Instant,
    keep_recent: usize,
    max_kept_messages: usize,
    state: Mutex<State>,
    version: watch::Sender<u64>,
    messages_tx: broadcast::Sender<DataMessage>,
    channels: Mutex<HashMap<String, Arc<dyn DataChannel>>>,
    remote_handles: Mutex<HashMap<String, Arc<dyn TrackRemote>>>,
    tasks: Mutex<Vec<AbortHandle>>,
    ping_seq: AtomicU64,
    /// Local candidates are held until the description they belong to was sent (so the server
    /// never sees a `trickle` before the `publish_offer` / first `subscribe_answer`).
    gates: Mutex<HashMap<PcTarget, CandidateGate>>,
    /// The bottleneck in front of the subscriber connection, if any.
    relay: Option<Arc<Relay>>,
    /// Encodings of the local tracks, for `publisher_layers` and keyframe requests.
    encodings: Mutex<Vec<LocalEncodings>>,
    honour_publisher_layers: bool,
    /// NACKs the publisher connection received.
    feedback: Arc<FeedbackCounters>,
    /// When received video asks for a keyframe.
    pli_policy: PliPolicy,
    /// We are leaving (or disconnecting) on purpose: what follows is no [`Removal`].
    leaving: AtomicBool,
}

/// The encodings of one local track, as the signaling reader needs them.
struct LocalEncodings {
    client_track_id: String,
    layers: Vec<LocalLayer>,
}

#[derive(Default)]
struct CandidateGate {
    open: bool,
    held: Vec<String>,
}

/// Locks `m`, recovering it if a holder panicked.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn bump(&self) {
        self.version.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let r = f(&mut self.state());
        self.bump();
        r
    }

    fn event(&self, event: PeerEvent) {
        self.update(|s| s.push(event));
    }

    /// Records a [`Removal`] unless we are leaving on purpose.
    fn removed(&self, s: &mut State, reason: impl FnOnce() -> String) {
        if !self.leaving.load(Ordering::Acquire) {
            s.remove(reason());
        }
    }

    fn spawn(&self, fut: impl Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(fut);
        lock(&self.tasks).push(handle.abort_handle());
    }

    /// Sends a local candidate now, or holds it until [`Shared::open_gate`] for its connection.
    fn send_candidate(&self, target: PcTarget, text: String, ws_tx: &mpsc::Sender<WsOut>) {
        let sent = {
            let mut gates = lock(&self.gates);
            let gate = gates.entry(target).or_default();
            if gate.open {
                ws_tx.try_send(WsOut::Text(text)).is_ok()
            } else {
                gate.held.push(text);
                true
            }
        };
        self.update(|s| {
            if sent {
                s.negotiation.local_candidates_sent += 1;
            } else {
                s.negotiation
                    .errors
                    .push("local candidate dropped: signaling queue full or closed".into());
            }
        });
    }

    /// Lets `target`'s candidates through, flushing the held ones first (in order).
    fn open_gate(&self, target: PcTarget, ws_tx: &mpsc::Sender<WsOut>) {
        let mut gates = lock(&self.gates);
        let gate = gates.entry(target).or_default();
        if gate.open {
            return;
        }
        gate.open = true;
        for text in gate.held.drain(..) {
            let _ = ws_tx.try_send(WsOut::Text(text));
        }
    }

    /// The server's offer for the subscriber connection, pointed at the relay if there is one.
    fn via_relay_sdp(&self, sdp: &str) -> String {
        let Some(relay) = &self.relay else {
            return sdp.to_owned();
        };
        let (rewritten, server) = relay::rewrite_candidates(sdp, relay.client_facing_addr());
        match server {
            Some(addr) => relay.set_upstream(addr),
            None if relay.upstream().is_none() => self.event(PeerEvent::Warning {
                message: "subscribe_offer without a UDP candidate: the relay has no target".into(),
            }),
            None => {}
        }
        rewritten
    }

    /// A trickled server candidate for the subscriber connection, pointed at the relay (`None`:
    /// one the relay cannot carry, dropped).
    fn via_relay_candidate(&self, c: &IceCandidate) -> Option<IceCandidate> {
        let Some(relay) = &self.relay else {
            return Some(c.clone());
        };
        let text = c.candidate.trim();
        let body = text.strip_prefix("a=").unwrap_or(text);
        match relay::rewrite_candidate(body, relay.client_facing_addr()) {
            relay::CandidateRewrite::NotACandidate => Some(c.clone()),
            relay::CandidateRewrite::Unusable => None,
            relay::CandidateRewrite::Rewritten(candidate, addr) => {
                if relay.upstream().is_none() {
                    relay.set_upstream(addr);
                }
                (relay.upstream() == Some(addr)).then(|| IceCandidate {
                    candidate,
                    ..c.clone()
                })
            }
        }
    }

    /// Applies a `publisher_layers` for our track `track_id` (server id): pauses exactly the
    /// encodings the server lists in `paused` and resumes the others (a layer the server has
    /// not received yet is in neither list and stays on).
    fn apply_publisher_layers(&self, track_id: &str, paused: &[String]) {
        let client_track_id = self
            .state()
            .room_tracks
            .get(track_id)
            .map(|t| t.client_track_id.clone());
        let encodings = lock(&self.encodings);
        let simulcast: Vec<&LocalEncodings> = encodings
            .iter()
            .filter(|e| e.layers.iter().any(|l| !l.rid.is_empty()))
            .collect();
        let target = match client_track_id {
            Some(id) => simulcast.iter().find(|e| e.client_track_id == id).copied(),
            // Not announced to us yet: our only simulcast track, if there is one.
            None if simulcast.len() == 1 => Some(simulcast[0]),
            None => None,
        };
        let Some(enc) = target else {
            drop(encodings);
            self.event(PeerEvent::Warning {
                message: format!("publisher_layers for {track_id}, which we do not publish"),
            });
            return;
        };
        for l in enc.layers.iter().filter(|l| !l.rid.is_empty()) {
            let pause = paused.contains(&l.rid);
            let was = l.control.dynacast_paused.swap(pause, Ordering::AcqRel);
            if was != pause {
                let counter = if pause {
                    &l.dynacast_pauses
                } else {
                    // Resume at a keyframe: subscribers of this layer need one.
                    l.control.keyframe_requested.store(true, Ordering::Release);
                    &l.dynacast_resumes
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn abort_tasks(&self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }

    /// Waits until `f` returns `Some`, re-checking on every state change, for at most `timeout`.
    async fn wait_until<T>(
        &self,
        timeout: Duration,
        what: &str,
        mut f: impl FnMut(&State) -> Option<T>,
    ) -> Result<T> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut rx = self.version.subscribe();
        loop {
            if let Some(v) = f(&self.state()) {
                return Ok(v);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => bail!("{}: peer state dropped while waiting for {what}", self.name),
                Err(_) => bail!(
                    "{}: timed out after {timeout:?} waiting for {what}",
                    self.name
                ),
            }
        }
    }
}

enum WsOut {
    Text(String),
    Close,
    /// Drop the connection's sending half without a close frame (with the reading half
    /// aborted, the TCP connection closes: a dropped connection, as the server sees it); texts
    /// wait until [`WsOut::Attach`].
    Detach,
    /// Go on over a new connection.
    Attach(futures_util::stream::SplitSink<WsStream, Message>),
}

enum NegCmd {
    Offer(String),
    Answer(String),
    Candidate(IceCandidate),
}

/// `fut` within `timeout`; a timeout or an error becomes an `Err` naming `what`.
pub async fn bounded<T, E: Display>(
    timeout: Duration,
    what: &str,
    fut: impl Future<Output = std::result::Result<T, E>>,
) -> Result<T> {
    match tokio::time::timeout(timeout, fut).await {
        Err(_) => bail!("{what} timed out after {timeout:?}"),
        Ok(Err(e)) => bail!("{what}: {e}"),
        Ok(Ok(v)) => Ok(v),
    }
}

fn encode(msg: &ClientMessage) -> String {
    // Plain serde structs: serialising cannot fail.
    serde_json::to_string(msg).unwrap_or_default()
}

// ───────────────────────────── peer-connection event handler ─────────────────────────────

struct PcHandler {
    target: PcTarget,
    shared: Arc<Shared>,
    ws_tx: mpsc::Sender<WsOut>,
}

pub type HandlerFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// The future every `PeerConnectionEventHandler` method returns once it has recorded or spawned.
pub fn done<'a>() -> HandlerFuture<'a> {
    Box::pin(std::future::ready(()))
}

// `PeerConnectionEventHandler` is declared with `#[async_trait]`; this is its expansion written
// out, so the examples need no extra dependency. The handlers run on the connection's driver
// task, so they only record and spawn.
impl PeerConnectionEventHandler for PcHandler {
    fn on_ice_candidate<'life0, 'async_trait>(
        &'life0 self,
        event: RTCPeerConnectionIceEvent,
    ) -> HandlerFuture<'async_trait>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        match event.candidate.to_json() {
            Ok(init) => {
                let msg = ClientMessage::Trickle {
                    target: self.target,
                    candidate: IceCandidate {
                        candidate: init.candidate,
                        // BUNDLE: every m-line shares the first one's transport.
                        sdp_mid: Some("0".to_owned()),
                        sdp_mline_index: Some(0),
                        username_fragment: init.username_fragment,
                    },
                };
                self.shared
                    .send_candidate(self.target, encode(&msg), &self.ws_tx);
            }
            Err(e) => self.shared.update(|s| {
                s.negotiation
                    .errors
                    .push(format!("local candidate to_json: {e}"))
            }),
        }
        done()
    }

    fn on_ice_connection_state_change<'life0, 'async_trait>(
        &'life0 self,
        state: RTCIceConnectionState,
    ) -> HandlerFuture<'async_trait>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let target = self.target;
        self.shared
            .update(|s| s.push(PeerEvent::IceState { target, state }));
        done()
    }

    fn on_connection_state_change<'life0, 'async_trait>(
        &'life0 self,
        state: RTCPeerConnectionState,
    ) -> HandlerFuture<'async_trait>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let target = self.target;
        self.shared.update(|s| {
            s.pc_state.insert(target, state);
            s.push(PeerEvent::ConnectionState { target, state });
            if matches!(
                state,
                RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed
            ) {
                self.shared
                    .removed(s, || format!("{target:?} connection {state}"));
            }
        });
        done()
    }

    fn on_data_channel<'life0, 'async_trait>(
        &'life0 self,
        data_channel: Arc<dyn DataChannel>,
    ) -> HandlerFuture<'async_trait>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let shared = self.shared.clone();
        self.shared.spawn(data_channel_task(shared, data_channel));
        done()
    }

    fn on_track<'life0, 'async_trait>(
        &'life0 self,
        track: Arc<dyn TrackRemote>,
    ) -> HandlerFuture<'async_trait>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let shared = self.shared.clone();
        self.shared.spawn(remote_track_task(shared, track));
        done()
    }
}

async fn data_channel_task(shared: Arc<Shared>, dc: Arc<dyn DataChannel>) {
    let label = match dc.label().await {
        Ok(l) => l,
        Err(e) => {
            shared.event(PeerEvent::Warning {
                message: format!("data channel without label: {e}"),
            });
            return;
        }
    };
    let channel = Channel::from_label(&label);
    lock(&shared.channels).insert(label.clone(), dc.clone());
    shared.update(|s| {
        s.open_channels.push(label.clone());
        s.push(PeerEvent::DataChannelOpen {
            label: label.clone(),
        });
    });
    while let Some(event) = dc.poll().await {
        match event {
            DataChannelEvent::OnMessage(msg) => {
                let data = msg.data.freeze();
                let received_at = Instant::now();
                let m = match envelope::decode(data.clone()) {
                    Ok(env) => DataMessage {
                        channel: channel.clone(),
                        from: env.from().map(str::to_owned),
                        payload: env.payload,
                        is_text: msg.is_string,
                        header: env.header,
                        malformed: None,
                        received_at,
                    },
                    Err(e) => DataMessage {
                        channel: channel.clone(),
                        from: None,
                        payload: data,
                        is_text: msg.is_string,
                        header: Map::new(),
                        malformed: Some(e),
                        received_at,
                    },
                };
                let _ = shared.messages_tx.send(m.clone());
                shared.update(|s| {
                    if s.messages.len() >= shared.max_kept_messages {
                        s.messages.pop_front();
                    }
                    s.messages.push_back(m);
                    s.messages_total += 1;
                });
            }
            DataChannelEvent::OnClose => break,
            _ => {}
        }
    }
    lock(&shared.channels).remove(&label);
    shared.update(|s| {
        s.open_channels.retain(|l| l != &label);
        s.push(PeerEvent::DataChannelClosed { label });
    });
}

async fn remote_track_task(shared: Arc<Shared>, track: Arc<dyn TrackRemote>) {
    let track_id = track.track_id().await;
    let stream_id = track.stream_id().await;
    let kind = match track.kind().await {
        RtpCodecKind::Audio => TrackKind::Audio,
        _ => TrackKind::Video,
    };
    lock(&shared.remote_handles).insert(track_id.clone(), track.clone());
    let probe_key = super::probe::track_key(&track_id);
    shared.update(|s| {
        let mut stats = RemoteTrackStats::new(
            track_id.clone(),
            stream_id.clone(),
            kind,
            shared.keep_recent,
        )
        .with_pli_policy(shared.pli_policy);
        for change in s
            .pending_layer_changes
            .remove(&track_id)
            .unwrap_or_default()
        {
            stats.on_layer_changed(change);
        }
        s.remote_tracks.insert(track_id.clone(), stats);
        s.push(PeerEvent::TrackStarted {
            track_id: track_id.clone(),
            stream_id,
            kind,
        });
    });
    while let Some(event) = track.poll().await {
        match event {
            TrackRemoteEvent::OnOpen(init) => {
                let mime = track.codec(init.ssrc).await.map(|c| c.mime_type);
                shared.update(|s| {
                    if let Some(t) = s.remote_tracks.get_mut(&track_id) {
                        t.mime_type = mime;
                    }
                });
            }
            TrackRemoteEvent::OnRtpPacket(pkt) => {
                let now = Instant::now();
                super::probe::received(probe_key, &pkt.payload, now);
                let mut pli = false;
                shared.update(|s| {
                    if let Some(t) = s.remote_tracks.get_mut(&track_id) {
                        t.on_packet(&pkt, now);
                        pli = t.poll_pli(now);
                    }
                });
                if pli {
                    // Like a browser's receiver: a PLI for the stream that cannot be decoded.
                    let pli = PictureLossIndication {
                        sender_ssrc: 0,
                        media_ssrc: pkt.header.ssrc,
                    };
                    if let Err(e) = track.write_rtcp(vec![Box::new(pli)]).await {
                        shared.event(PeerEvent::Warning {
                            message: format!("write_rtcp(PLI): {e}"),
                        });
                    }
                }
            }
            TrackRemoteEvent::OnEnded => break,
            _ => {}
        }
    }
    lock(&shared.remote_handles).remove(&track_id);
    shared.update(|s| s.end_remote_track(&track_id));
}

// ───────────────────────────── peer connections ─────────────────────────────

/// Opus as the clips carry it (48 kHz stereo, in-band FEC).
pub fn opus_codec() -> RTCRtpCodec {
    RTCRtpCodec {
        mime_type: MIME_TYPE_OPUS.to_owned(),
        clock_rate: 48_000,
        channels: 2,
        sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
        rtcp_feedback: vec![],
    }
}

/// VP8 with the RTCP feedback browsers offer (REMB, FIR, NACK, PLI).
pub fn vp8_codec() -> RTCRtpCodec {
    let fb = |typ: &str, parameter: &str| RTCPFeedback {
        typ: typ.to_owned(),
        parameter: parameter.to_owned(),
    };
    RTCRtpCodec {
        mime_type: MIME_TYPE_VP8.to_owned(),
        clock_rate: 90_000,
        channels: 0,
        sdp_fmtp_line: String::new(),
        rtcp_feedback: vec![
            fb("goog-remb", ""),
            fb("ccm", "fir"),
            fb("nack", ""),
            fb("nack", "pli"),
        ],
    }
}

/// Builds a webrtc-rs peer connection the way every synthetic peer here has it, Plaza's and
/// Janus's ([`super::janus`]): default interceptors, mDNS off, ICE on UDP `bind_ip:0`, built
/// within `t`. A publisher (`keyframe_tap` given) offers exactly what the files contain, Opus/111
/// and VP8/96 (no RTX), and sees PLI/FIR through the tap; a subscriber (`None`) accepts whatever
/// the server forwards (the default codecs).
pub async fn new_peer_connection(
    keyframe_tap: Option<KeyframeRequestTap>,
    handler: Arc<dyn PeerConnectionEventHandler>,
    bind_ip: &str,
    t: Duration,
) -> Result<Arc<dyn PeerConnection>> {
    new_peer_connection_with(keyframe_tap, handler, bind_ip, t, false).await
}

/// [`new_peer_connection`], with `rtx`: the peer also registers RTX for VP8 (`rtx/90000`
/// payload type 97, `apt=96`), so it accepts (or offers) RTX.
pub async fn new_peer_connection_with(
    keyframe_tap: Option<KeyframeRequestTap>,
    handler: Arc<dyn PeerConnectionEventHandler>,
    bind_ip: &str,
    t: Duration,
    rtx: bool,
) -> Result<Arc<dyn PeerConnection>> {
    let mut media_engine = MediaEngine::default();
    if keyframe_tap.is_some() {
        media_engine
            .register_codec(
                RTCRtpCodecParameters {
                    rtp_codec: opus_codec(),
                    payload_type: 111,
                },
                RtpCodecKind::Audio,
            )
            .map_err(|e| anyhow!("register opus: {e}"))?;
        media_engine
            .register_codec(
                RTCRtpCodecParameters {
                    rtp_codec: vp8_codec(),
                    payload_type: 96,
                },
                RtpCodecKind::Video,
            )
            .map_err(|e| anyhow!("register vp8: {e}"))?;
        if rtx {
            media_engine
                .register_codec(
                    RTCRtpCodecParameters {
                        rtp_codec: RTCRtpCodec {
                            mime_type: "video/rtx".to_owned(),
                            clock_rate: 90_000,
                            channels: 0,
                            sdp_fmtp_line: "apt=96".to_owned(),
                            rtcp_feedback: vec![],
                        },
                        payload_type: 97,
                    },
                    RtpCodecKind::Video,
                )
                .map_err(|e| anyhow!("register rtx: {e}"))?;
        }
    } else {
        media_engine
            .register_default_codecs()
            .map_err(|e| anyhow!("register codecs: {e}"))?;
    }
    let mut registry = register_default_interceptors(Registry::new(), &mut media_engine)
        .map_err(|e| anyhow!("interceptors: {e}"))?;
    if let Some(tap) = keyframe_tap {
        registry = registry.with(Slot::from(KEYFRAME_TAP_SLOT), tap);
    }
    let setting_engine = SettingEngineBuilder::new()
        .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
        .build();
    let pc = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(media_engine)
        .with_setting_engine(setting_engine)
        .with_interceptor_registry(registry)
        .with_handler(handler)
        .with_udp_addrs(vec![format!("{bind_ip}:0")])
        .build();
    // webrtc-rs's builder future is ~40 KB: boxed, so the futures awaiting it stay small.
    let pc = bounded(t, "build peer connection", Box::pin(pc)).await?;
    Ok(Arc::new(pc))
}

async fn build_pc(
    target: PcTarget,
    shared: &Arc<Shared>,
    ws_tx: &mpsc::Sender<WsOut>,
    opts: &PeerOptions,
) -> Result<Arc<dyn PeerConnection>> {
    // Publisher side: keyframe requests and NACKs; subscriber side: sender reports.
    let keyframe_tap = Some(KeyframeRequestTap::with_counters(shared.feedback.clone()));
    let handler = Arc::new(PcHandler {
        target,
        shared: shared.clone(),
        ws_tx: ws_tx.clone(),
    });
    let rtx = target == PcTarget::Subscriber && opts.subscriber_rtx;
    new_peer_connection_with(keyframe_tap, handler, &opts.bind_ip, opts.timeout, rtx).await
}

fn to_init(c: IceCandidate) -> RTCIceCandidateInit {
    RTCIceCandidateInit {
        candidate: c.candidate,
        sdp_mid: c.sdp_mid,
        sdp_mline_index: c.sdp_mline_index,
        username_fragment: c.username_fragment,
        ..Default::default()
    }
}

async fn add_candidate(
    pc: &Arc<dyn PeerConnection>,
    target: PcTarget,
    c: IceCandidate,
    shared: &Shared,
    timeout: Duration,
) {
    if c.candidate.trim().is_empty() {
        // End-of-candidates: nothing to add.
        return;
    }
    match bounded(
        timeout,
        "add_ice_candidate",
        pc.add_ice_candidate(to_init(c)),
    )
    .await
    {
        Ok(()) => shared.update(|s| s.negotiation.remote_candidates_added += 1),
        Err(e) => shared.update(|s| {
            s.negotiation.errors.push(e.to_string());
            s.push(PeerEvent::CandidateFailed {
                target,
                error: e.to_string(),
            });
        }),
    }
}

async fn answer_offer(pc: &Arc<dyn PeerConnection>, sdp: String, t: Duration) -> Result<String> {
    let offer = RTCSessionDescription::offer(sdp).map_err(|e| anyhow!("bad offer SDP: {e}"))?;
    bounded(
        t,
        "set_remote_description(offer)",
        pc.set_remote_description(offer),
    )
    .await?;
    let answer = bounded(t, "create_answer", pc.create_answer(None)).await?;
    let sdp = answer.sdp.clone();
    bounded(
        t,
        "set_local_description(answer)",
        pc.set_local_description(answer),
    )
    .await?;
    Ok(sdp)
}

/// Owns the negotiation of one PC: subscriber (answers offers) or publisher (applies answers).
/// Server candidates are held until a remote description exists.
async fn negotiation_task(
    target: PcTarget,
    pc: Arc<dyn PeerConnection>,
    mut rx: mpsc::Receiver<NegCmd>,
    shared: Arc<Shared>,
    ws_tx: mpsc::Sender<WsOut>,
    t: Duration,
) {
    let mut have_remote = false;
    let mut pending: Vec<IceCandidate> = Vec::new();
    while let Some(cmd) = rx.recv().await {
        match cmd {
            NegCmd::Candidate(c) if have_remote => add_candidate(&pc, target, c, &shared, t).await,
            NegCmd::Candidate(c) => pending.push(c),
            NegCmd::Offer(sdp) if target == PcTarget::Subscriber => {
                // Answer only the latest of the offers already queued.
                let mut latest = sdp;
                let mut skipped = 0;
                let mut later = Vec::new();
                while let Ok(cmd) = rx.try_recv() {
                    match cmd {
                        NegCmd::Offer(s) => {
                            latest = s;
                            skipped += 1;
                        }
                        NegCmd::Candidate(c) => later.push(c),
                        NegCmd::Answer(_) => {}
                    }
                }
                let n = shared.update(|s| {
                    s.negotiation.subscribe_offers += 1 + skipped;
                    s.negotiation.subscribe_offers_skipped += skipped;
                    s.negotiation.subscribe_offers
                });
                match answer_offer(&pc, latest, t).await {
                    Ok(answer) => {
                        let msg = ClientMessage::SubscribeAnswer { sdp: answer };
                        if ws_tx.send(WsOut::Text(encode(&msg))).await.is_err() {
                            break;
                        }
                        shared.open_gate(PcTarget::Subscriber, &ws_tx);
                        have_remote = true;
                        shared.update(|s| {
                            s.negotiation.subscribe_answers += 1;
                            s.push(PeerEvent::SubscribeAnswered { n });
                        });
                    }
                    Err(e) => shared.update(|s| {
                        s.negotiation
                            .errors
                            .push(format!("subscribe offer {n}: {e}"));
                        s.push(PeerEvent::NegotiationFailed {
                            target,
                            error: e.to_string(),
                        });
                    }),
                }
                pending.extend(later);
                if have_remote {
                    for c in pending.drain(..) {
                        add_candidate(&pc, target, c, &shared, t).await;
                    }
                }
            }
            NegCmd::Answer(sdp) if target == PcTarget::Publisher => {
                let applied = async {
                    let answer = RTCSessionDescription::answer(sdp)
                        .map_err(|e| anyhow!("bad answer SDP: {e}"))?;
                    bounded(
                        t,
                        "set_remote_description(answer)",
                        pc.set_remote_description(answer),
                    )
                    .await
                }
                .await;
                match applied {
                    Ok(()) => {
                        have_remote = true;
                        shared.update(|s| {
                            s.negotiation.publish_answers += 1;
                            let n = s.negotiation.publish_answers;
                            s.push(PeerEvent::PublishAnswered { n });
                        });
                        for c in pending.drain(..) {
                            add_candidate(&pc, target, c, &shared, t).await;
                        }
                    }
                    Err(e) => shared.update(|s| {
                        s.negotiation.errors.push(format!("publish answer: {e}"));
                        s.push(PeerEvent::NegotiationFailed {
                            target,
                            error: e.to_string(),
                        });
                    }),
                }
            }
            NegCmd::Offer(_) | NegCmd::Answer(_) => shared.update(|s| {
                s.push(PeerEvent::Warning {
                    message: format!("unexpected offer/answer for the {target:?} connection"),
                })
            }),
        }
    }
}

// ───────────────────────────── signaling ─────────────────────────────

async fn writer_task(
    sink: futures_util::stream::SplitSink<WsStream, Message>,
    mut rx: mpsc::Receiver<WsOut>,
    shared: Arc<Shared>,
) {
    let mut sink = Some(sink);
    let mut waiting: Vec<String> = Vec::new();
    while let Some(out) = rx.recv().await {
        let result = match (out, sink.as_mut()) {
            (WsOut::Text(t), Some(sink)) => sink.send(Message::text(t)).await,
            (WsOut::Text(t), None) => {
                waiting.push(t);
                Ok(())
            }
            (WsOut::Close, Some(sink)) => {
                let _ = sink.close().await;
                break;
            }
            (WsOut::Close, None) => break,
            (WsOut::Detach, _) => {
                sink = None;
                Ok(())
            }
            (WsOut::Attach(mut new), _) => {
                let mut result = Ok(());
                for t in waiting.drain(..) {
                    result = new.send(Message::text(t)).await;
                    if result.is_err() {
                        break;
                    }
                }
                sink = Some(new);
                result
            }
        };
        if let Err(e) = result {
            shared.update(|s| {
                s.closed
                    .get_or_insert(format!("websocket send failed: {e}"));
            });
            break;
        }
    }
}

#[derive(Clone)]
struct Routes {
    subscriber: mpsc::Sender<NegCmd>,
    publisher: Option<mpsc::Sender<NegCmd>>,
}

impl Routes {
    fn for_target(&self, target: PcTarget) -> Option<&mpsc::Sender<NegCmd>> {
        match target {
            PcTarget::Subscriber => Some(&self.subscriber),
            PcTarget::Publisher => self.publisher.as_ref(),
        }
    }
}

async fn reader_task(mut stream: SplitStream<WsStream>, shared: Arc<Shared>, routes: Routes) {
    let reason = loop {
        let msg = match stream.next().await {
            None => break "websocket closed".to_owned(),
            Some(Err(e)) => break format!("websocket error: {e}"),
            Some(Ok(m)) => m,
        };
        let text = match msg {
            Message::Text(t) => t.to_string(),
            Message::Close(frame) => break format!("websocket closed by server: {frame:?}"),
            Message::Binary(b) => {
                shared.event(PeerEvent::Unparsed {
                    text: String::from_utf8_lossy(&b).into_owned(),
                    error: "binary frame".to_owned(),
                });
                continue;
            }
            _ => continue,
        };
        let msg: ServerMessage = match serde_json::from_str(&text) {
            Ok(m) => m,
            Err(e) => {
                shared.event(PeerEvent::Unparsed {
                    text,
                    error: e.to_string(),
                });
                continue;
            }
        };
        // Route negotiation messages to the connection's task (in order with candidates).
        let routed = match &msg {
            ServerMessage::SubscribeOffer { sdp } => Some((
                PcTarget::Subscriber,
                NegCmd::Offer(shared.via_relay_sdp(sdp)),
            )),
            ServerMessage::PublishAnswer { sdp } => {
                Some((PcTarget::Publisher, NegCmd::Answer(sdp.clone())))
            }
            ServerMessage::Trickle {
                target: PcTarget::Subscriber,
                candidate,
            } => shared
                .via_relay_candidate(candidate)
                .map(|c| (PcTarget::Subscriber, NegCmd::Candidate(c))),
            ServerMessage::Trickle { target, candidate } => {
                Some((*target, NegCmd::Candidate(candidate.clone())))
            }
            _ => None,
        };
        let ws_opened_at = shared.ws_opened_at;
        if let ServerMessage::PublisherLayers {
            track_id, paused, ..
        } = &msg
            && shared.honour_publisher_layers
        {
            shared.apply_publisher_layers(track_id, paused);
        }
        shared.update(|s| {
            match &msg {
                ServerMessage::Joined { .. } => s.received = 1,
                ServerMessage::Resumed { .. } => {}
                _ if s.received > 0 => s.received += 1,
                _ => {}
            }
            apply_server_message(s, &msg, ws_opened_at);
            if let ServerMessage::Leave { reason } = &msg {
                shared.removed(s, || format!("server sent leave: {reason}"));
            }
            s.push(PeerEvent::Server(msg));
        });
        if let Some((target, cmd)) = routed {
            match routes.for_target(target) {
                Some(tx) => {
                    let _ = tx.send(cmd).await;
                }
                None => shared.event(PeerEvent::Warning {
                    message: format!("server sent {target:?} negotiation but we do not publish"),
                }),
            }
        }
    };
    shared.update(|s| {
        s.closed.get_or_insert(reason.clone());
        shared.removed(s, || reason.clone());
        if s.joined.is_none() {
            s.joined = Some(Err(format!("before joined: {reason}")));
        }
        s.push(PeerEvent::WsClosed { reason });
    });
}

fn apply_server_message(s: &mut State, msg: &ServerMessage, ws_opened_at: Instant) {
    match msg {
        ServerMessage::Joined {
            protocol,
            server_version,
            room,
            participant_id,
            participants,
            max_data_message,
            resume_token,
            ice_servers,
            session_id,
            ..
        } => {
            s.participant_id = Some(participant_id.clone());
            for p in participants {
                s.add_participant(p);
            }
            if s.joined.is_none() {
                s.joined = Some(Ok(JoinedInfo {
                    protocol: *protocol,
                    server_version: server_version.clone(),
                    room: room.clone(),
                    participant_id: participant_id.clone(),
                    participants: participants.clone(),
                    max_data_message: *max_data_message,
                    resume_token: resume_token.clone(),
                    ice_servers: ice_servers.clone(),
                    session_id: session_id.clone(),
                    join_latency: ws_opened_at.elapsed(),
                }));
            }
        }
        ServerMessage::Redirect { address, .. } => {
            s.redirect = Some(address.clone());
            if s.joined.is_none() {
                s.joined = Some(Err(format!("redirected to {address}")));
            }
        }
        ServerMessage::ParticipantJoined { participant } => s.add_participant(participant),
        ServerMessage::ParticipantLeft { participant_id, .. } => {
            s.participants.remove(participant_id);
            s.room_tracks
                .retain(|_, t| &t.participant_id != participant_id);
            let gone: Vec<String> = s
                .remote_tracks
                .values()
                .filter(|t| &t.stream_id == participant_id)
                .map(|t| t.track_id.clone())
                .collect();
            for id in gone {
                s.end_remote_track(&id);
            }
        }
        ServerMessage::TrackPublished { track } => {
            s.room_tracks.insert(track.id.clone(), track.clone());
            if let Some(p) = s.participants.get_mut(&track.participant_id) {
                p.tracks.retain(|t| t.id != track.id);
                p.tracks.push(track.clone());
            }
        }
        ServerMessage::TrackUnpublished {
            track_id,
            participant_id,
        } => {
            s.room_tracks.remove(track_id);
            if let Some(p) = s.participants.get_mut(participant_id) {
                p.tracks.retain(|t| &t.id != track_id);
            }
            s.end_remote_track(track_id);
        }
        ServerMessage::TrackMuted {
            track_id, muted, ..
        } => {
            if let Some(t) = s.room_tracks.get_mut(track_id) {
                t.muted = *muted;
            }
        }
        ServerMessage::LayerChanged {
            track_id,
            quality,
            rid,
            width,
            height,
        } => s.layer_changed(
            track_id,
            LayerChange {
                at: Instant::now(),
                quality: *quality,
                rid: rid.clone(),
                width: *width,
                height: *height,
            },
        ),
        ServerMessage::PublisherLayers { track_id, .. } => {
            *s.publisher_layers.entry(track_id.clone()).or_default() += 1;
        }
        ServerMessage::Error {
            code,
            message,
            request,
        } if s.joined.is_none() => {
            s.join_refusal = Some(*code);
            s.joined = Some(Err(format!(
                "server error {code:?} ({}): {message}",
                request.as_deref().unwrap_or("-")
            )));
        }
        ServerMessage::Leave { reason } if s.joined.is_none() => {
            s.joined = Some(Err(format!("server sent leave: {reason}")));
        }
        _ => {}
    }
}

// ───────────────────────────── publishing ─────────────────────────────

/// A local track of the publisher PC.
#[derive(Clone)]
struct LocalTrack {
    kind: TrackKind,
    client_track_id: String,
    mime_type: &'static str,
    /// One per encoding (one for a plain track), in offer order.
    layers: Vec<LocalLayer>,
    track: Arc<TrackLocalStaticRTP>,
    sender: Arc<dyn RtpSender>,
    payload_type: Arc<Mutex<Option<u8>>>,
}

/// One encoding of a local track: its clip, SSRC and pacer.
#[derive(Clone)]
struct LocalLayer {
    /// RID, empty for a plain track.
    rid: String,
    ssrc: u32,
    clip: Arc<Clip>,
    control: Arc<PacerControl>,
    dynacast_pauses: Arc<AtomicU64>,
    dynacast_resumes: Arc<AtomicU64>,
}

impl LocalTrack {
    fn counters(&self) -> SendCounters {
        let mut c = SendCounters::default();
        for l in &self.layers {
            c.add(&l.control.counters());
        }
        c
    }

    fn set_paused(&self, paused: bool) {
        for l in &self.layers {
            l.control.paused.store(paused, Ordering::Release);
        }
    }
}

/// Writes a pacer's packets to a local track, adding header extensions (MID and RID for a
/// simulcast layer, so the server can tell the encodings apart).
pub(crate) struct TrackSink {
    pub(crate) track: Arc<TrackLocalStaticRTP>,
    pub(crate) extensions: Vec<(u8, Bytes)>,
    /// Leave out this packet (1-based count of packets written).
    pub(crate) skip: Option<u64>,
    pub(crate) written: AtomicU64,
}

impl PacketSink for TrackSink {
    fn write(
        &self,
        mut packet: rtc::rtp::Packet,
    ) -> impl Future<Output = std::result::Result<(), String>> + Send {
        let track = self.track.clone();
        let mut err = None;
        for (id, value) in &self.extensions {
            if let Err(e) = packet.header.set_extension(*id, value.clone()) {
                err = Some(format!("header extension {id}: {e}"));
            }
        }
        super::probe::sent(packet.header.ssrc, &packet.payload);
        let n = self.written.fetch_add(1, Ordering::Relaxed) + 1;
        let skip = self.skip == Some(n);
        async move {
            if let Some(e) = err {
                return Err(e);
            }
            if skip {
                return Ok(());
            }
            track.write_rtp(packet).await.map_err(|e| e.to_string())
        }
    }
}

/// Negotiated id of the header extension `uri` on `sender`.
pub(crate) async fn extension_id(sender: &Arc<dyn RtpSender>, uri: &str) -> Result<u8> {
    let params = sender
        .get_parameters()
        .await
        .map_err(|e| anyhow!("get_parameters: {e}"))?;
    params
        .rtp_parameters
        .header_extensions
        .iter()
        .find(|h| h.uri == uri)
        .map(|h| h.id as u8)
        .ok_or_else(|| anyhow!("header extension {uri} not negotiated"))
}

/// The MID of the transceiver that sends `sender`.
pub(crate) async fn mid_of(
    pc: &Arc<dyn PeerConnection>,
    sender: &Arc<dyn RtpSender>,
) -> Result<String> {
    for t in pc.get_transceivers().await {
        if let Ok(Some(s)) = t.sender().await
            && s.id() == sender.id()
        {
            return t
                .mid()
                .await
                .map_err(|e| anyhow!("mid: {e}"))?
                .ok_or_else(|| anyhow!("transceiver has no mid yet"));
        }
    }
    bail!("no transceiver for our sender")
}

/// The payload type negotiated for `mime` on `sender` (else its first codec).
pub async fn negotiated_payload_type(sender: &Arc<dyn RtpSender>, mime: &str) -> Result<u8> {
    let params = sender
        .get_parameters()
        .await
        .map_err(|e| anyhow!("get_parameters: {e}"))?;
    let codecs = &params.rtp_parameters.codecs;
    codecs
        .iter()
        .find(|c| c.rtp_codec.mime_type.eq_ignore_ascii_case(mime))
        .or_else(|| codecs.first())
        .map(|c| c.payload_type)
        .ok_or_else(|| anyhow!("no negotiated codec for {mime}"))
}

/// Waits (in the background, tied to the peer's lifetime) for the publisher PC to connect,
/// then starts one pacer per encoding and one RTCP reader per track.
async fn start_media(
    shared: Arc<Shared>,
    pc: Arc<dyn PeerConnection>,
    tracks: Vec<LocalTrack>,
    t: Duration,
    skip_video_packet: Option<u64>,
    pacing: Pacing,
) {
    let connected = |s: &State| {
        (s.pc_state.get(&PcTarget::Publisher) == Some(&RTCPeerConnectionState::Connected))
            .then_some(())
    };
    let mut warned = false;
    while let Err(e) = shared.wait_until(t, "publisher connected", connected).await {
        if !warned {
            warned = true;
            shared.event(PeerEvent::Warning {
                message: format!("media not started yet: {e}"),
            });
        }
    }
    for lt in tracks {
        let pt = match negotiated_payload_type(&lt.sender, lt.mime_type).await {
            Ok(pt) => pt,
            Err(e) => {
                shared.event(PeerEvent::Warning {
                    message: format!("{}: {e}", lt.client_track_id),
                });
                continue;
            }
        };
        *lock(&lt.payload_type) = Some(pt);
        let simulcast = lt.layers.iter().any(|l| !l.rid.is_empty());
        let mut ids = None;
        if simulcast {
            let found = async {
                let mid_id = extension_id(&lt.sender, rtc::sdp::extmap::SDES_MID_URI).await?;
                let rid_id =
                    extension_id(&lt.sender, rtc::sdp::extmap::SDES_RTP_STREAM_ID_URI).await?;
                let mid = mid_of(&pc, &lt.sender).await?;
                anyhow::Ok((mid_id, rid_id, mid))
            }
            .await;
            match found {
                Ok(found) => ids = Some(found),
                Err(e) => {
                    shared.event(PeerEvent::Warning {
                        message: format!("{}: simulcast not possible: {e}", lt.client_track_id),
                    });
                    continue;
                }
            }
        }
        for layer in &lt.layers {
            let packetizer = match MediaPacketizer::new(layer.clip.clone(), layer.ssrc, pt) {
                Ok(p) => p,
                Err(e) => {
                    shared.event(PeerEvent::Warning {
                        message: format!("{}: {e}", lt.client_track_id),
                    });
                    continue;
                }
            };
            let progress = {
                let shared = shared.clone();
                move || shared.bump()
            };
            let extensions = match &ids {
                Some((mid_id, rid_id, mid)) => vec![
                    (*mid_id, Bytes::from(mid.clone())),
                    (*rid_id, Bytes::from(layer.rid.clone())),
                ],
                None => Vec::new(),
            };
            let first_video = lt.kind == TrackKind::Video && std::ptr::eq(layer, &lt.layers[0]);
            let sink = TrackSink {
                track: lt.track.clone(),
                extensions,
                skip: skip_video_packet.filter(|_| first_video),
                written: AtomicU64::new(0),
            };
            shared.spawn(run_pacer(
                packetizer,
                layer.clip.frame_interval,
                pacing,
                sink,
                layer.control.clone(),
                progress,
            ));
        }
        let (track, layers, rtcp_shared) = (lt.track.clone(), lt.layers.clone(), shared.clone());
        shared.spawn(async move {
            while let Some(event) = track.poll().await {
                let TrackLocalEvent::OnRtcpPacket(packets) = event else {
                    continue;
                };
                let mut any = false;
                for ssrc in packets
                    .iter()
                    .flat_map(|p| keyframe_request_ssrcs(p.as_ref()))
                {
                    any = true;
                    // Per layer, by media SSRC; an SSRC we do not know asks every layer.
                    let known = layers.iter().any(|l| l.ssrc == ssrc);
                    for l in layers.iter().filter(|l| !known || l.ssrc == ssrc) {
                        l.control.request_keyframe();
                    }
                }
                if any {
                    rtcp_shared.bump();
                }
            }
        });
        shared.event(PeerEvent::MediaStarted {
            kind: lt.kind,
            client_track_id: lt.client_track_id.clone(),
            payload_type: pt,
        });
    }
}

// ───────────────────────────── the peer ─────────────────────────────

/// A connected synthetic participant. Dropping it tears everything down (best effort);
/// [`Peer::leave`] does it politely.
pub struct Peer {
    shared: Arc<Shared>,
    ws_tx: mpsc::Sender<WsOut>,
    subscriber: Arc<dyn PeerConnection>,
    publisher: Option<Arc<dyn PeerConnection>>,
    local_tracks: Vec<LocalTrack>,
    joined: JoinedInfo,
    opts: PeerOptions,
    room: String,
    left: AtomicBool,
    /// Where the signaling reader sends negotiation (a resumed connection's reader too).
    routes: Routes,
    /// The signaling reader of the current connection.
    reader: Mutex<Option<tokio::task::AbortHandle>>,
    url: String,
    redirects: u32,
}

/// Tears down a peer that failed half-way through `connect` (and is reused by `Drop`).
struct Teardown {
    shared: Arc<Shared>,
    pcs: Vec<Arc<dyn PeerConnection>>,
    armed: bool,
}

impl Drop for Teardown {
    fn drop(&mut self) {
        if self.armed {
            teardown(&self.shared, std::mem::take(&mut self.pcs));
        }
    }
}

fn teardown(shared: &Arc<Shared>, pcs: Vec<Arc<dyn PeerConnection>>) {
    shared.abort_tasks();
    lock(&shared.channels).clear();
    lock(&shared.remote_handles).clear();
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        for pc in pcs {
            handle.spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(2), pc.close()).await;
            });
        }
    }
}

/// The most `redirect`s [`Peer::connect`] follows for one join.
pub const MAX_REDIRECTS: u32 = 3;

/// A join answered with `redirect` to this node address.
#[derive(Debug)]
struct Redirected(String);

impl Display for Redirected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "redirected to {}", self.0)
    }
}

impl std::error::Error for Redirected {}

impl Peer {
    /// Opens the WebSocket, joins `room` as `name`, sets up the subscriber PC and, when
    /// publishing, the publisher PC with its tracks. See [`PeerOptions::wait_ready`].
    ///
    /// A cluster node that does not host the room answers `redirect`: the peer follows it (at
    /// most [`MAX_REDIRECTS`] times) and joins on the node named; [`Peer::url`] is where it
    /// joined, [`Peer::redirects`] how many it followed.
    pub async fn connect(url: &str, room: &str, name: &str, opts: PeerOptions) -> Result<Peer> {
        let mut url = url.to_owned();
        let mut redirects = 0;
        loop {
            match Self::connect_once(&url, room, name, opts.clone()).await {
                Err(e) => match e.downcast_ref::<Redirected>() {
                    Some(Redirected(address)) if redirects < MAX_REDIRECTS => {
                        url = plaza::cluster::placement::redirect_url(&url, address)
                            .ok_or_else(|| anyhow!("{name}: cannot redirect {url}"))?;
                        redirects += 1;
                    }
                    _ => return Err(e),
                },
                Ok(mut peer) => {
                    peer.redirects = redirects;
                    return Ok(peer);
                }
            }
        }
    }

    /// Where this peer joined (after any redirect).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// How many `redirect`s [`Peer::connect`] followed to join.
    pub fn redirects(&self) -> u32 {
        self.redirects
    }

    async fn connect_once(url: &str, room: &str, name: &str, opts: PeerOptions) -> Result<Peer> {
        let t = opts.timeout;
        let (ws, _response) = bounded(
            t,
            "websocket connect",
            tokio_tungstenite::connect_async_with_config(url, None, true),
        )
        .await
        .with_context(|| format!("{name}: connecting to {url}"))?;
        let ws_opened_at = Instant::now();
        let (sink, stream) = ws.split();
        let (version, _) = watch::channel(0u64);
        let (messages_tx, _) = broadcast::channel(4096);
        let (relay, relay_tasks) = match opts.subscriber_bandwidth_bps {
            Some(rate) => {
                let (r, tasks) =
                    Relay::bind(&opts.bind_ip, rate, opts.subscriber_max_queue_delay).await?;
                (Some(Arc::new(r)), tasks)
            }
            None => (None, Vec::new()),
        };
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            ws_opened_at,
            keep_recent: opts.keep_recent_packets,
            max_kept_messages: opts.max_kept_messages.max(1),
            state: Mutex::new(State::default()),
            version,
            messages_tx,
            channels: Mutex::new(HashMap::new()),
            remote_handles: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
            ping_seq: AtomicU64::new(0),
            gates: Mutex::new(HashMap::new()),
            relay,
            encodings: Mutex::new(Vec::new()),
            honour_publisher_layers: opts.honour_publisher_layers,
            leaving: AtomicBool::new(false),
            feedback: Arc::default(),
            pli_policy: opts.pli_policy,
        });
        let mut guard = Teardown {
            shared: shared.clone(),
            pcs: Vec::new(),
            armed: true,
        };
        for task in relay_tasks {
            shared.spawn(task);
        }
        let (ws_tx, ws_rx) = mpsc::channel::<WsOut>(1024);
        shared.spawn(writer_task(sink, ws_rx, shared.clone()));

        let subscriber = build_pc(PcTarget::Subscriber, &shared, &ws_tx, &opts).await?;
        guard.pcs.push(subscriber.clone());
        let (sub_tx, sub_rx) = mpsc::channel(256);
        shared.spawn(negotiation_task(
            PcTarget::Subscriber,
            subscriber.clone(),
            sub_rx,
            shared.clone(),
            ws_tx.clone(),
            t,
        ));
        let (pub_tx, pub_rx) = if opts.publishing() {
            let (tx, rx) = mpsc::channel(256);
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let routes = Routes {
            subscriber: sub_tx,
            publisher: pub_tx,
        };
        let reader = tokio::spawn(reader_task(stream, shared.clone(), routes.clone()));
        let reader_handle = reader.abort_handle();
        lock(&shared.tasks).push(reader.abort_handle());

        let join = ClientMessage::Join {
            room: room.to_owned(),
            name: name.to_owned(),
            token: Some(
                opts.token
                    .clone()
                    .unwrap_or_else(|| crate::token::participant(room, name)),
            ),
            protocol: opts.protocol,
            auto_subscribe: opts.auto_subscribe,
            timeline_events: opts.timeline_events,
        };
        send_ws(&ws_tx, encode(&join), t).await?;
        // A server over its per-address join rate says when to try again: wait that long
        // (within the connect bound) and join again on the same socket.
        let deadline = Instant::now() + t;
        let joined = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match shared
                .wait_until(left, "joined", |s| s.joined.clone())
                .await?
            {
                Err(e) if shared.state().join_refusal == Some(ErrorCode::JoinRateLimited) => {
                    let wait = retry_after(&e).unwrap_or(Duration::from_secs(1));
                    if Instant::now() + wait >= deadline {
                        break Err(e);
                    }
                    tokio::time::sleep(wait).await;
                    shared.update(|s| {
                        s.joined = None;
                        s.join_refusal = None;
                    });
                    send_ws(&ws_tx, encode(&join), t).await?;
                }
                other => break other,
            }
        }
        .map_err(|e| match shared.state().redirect.clone() {
            Some(address) => anyhow::Error::new(Redirected(address)),
            None => anyhow!("{name}: join failed: {e}"),
        })?;

        let mut publisher = None;
        let mut local_tracks = Vec::new();
        if let Some(pub_rx) = pub_rx {
            let pc = build_pc(PcTarget::Publisher, &shared, &ws_tx, &opts).await?;
            guard.pcs.push(pc.clone());
            shared.spawn(negotiation_task(
                PcTarget::Publisher,
                pc.clone(),
                pub_rx,
                shared.clone(),
                ws_tx.clone(),
                t,
            ));
            let mut wanted = Vec::new();
            if opts.publish_audio {
                wanted.push((
                    TrackKind::Audio,
                    vec![(String::new(), opts.audio_file.clone())],
                ));
            }
            if opts.publish_video {
                let files = match &opts.simulcast {
                    Some(sc) => sc.layers.clone(),
                    None => vec![(String::new(), opts.video_file.clone())],
                };
                wanted.push((TrackKind::Video, files));
            }
            for (kind, files) in wanted {
                let mut clips = Vec::new();
                for (rid, file) in files {
                    let clip = Clip::load(&file)?;
                    if clip.kind != kind {
                        bail!("{}: is not a {kind:?} file", file.display());
                    }
                    clips.push((rid, clip));
                }
                let lt = add_local_track(&pc, name, kind, clips, t).await?;
                lock(&shared.encodings).push(LocalEncodings {
                    client_track_id: lt.client_track_id.clone(),
                    layers: lt.layers.clone(),
                });
                local_tracks.push(lt);
            }
            let offer = bounded(t, "create_offer", pc.create_offer(None)).await?;
            let sdp = offer.sdp.clone();
            bounded(
                t,
                "set_local_description(offer)",
                pc.set_local_description(offer),
            )
            .await?;
            shared.update(|s| s.negotiation.publish_offers += 1);
            let sdp = match opts.munge_publish_offer {
                Some(munge) => munge(&sdp),
                None => sdp,
            };
            send_ws(&ws_tx, encode(&ClientMessage::PublishOffer { sdp }), t).await?;
            shared.open_gate(PcTarget::Publisher, &ws_tx);
            shared
                .wait_until(t, "publish_answer applied", |s| {
                    if s.negotiation.publish_answers > 0 {
                        return Some(Ok(()));
                    }
                    s.events.iter().rev().find_map(|e| match &e.event {
                        PeerEvent::NegotiationFailed {
                            target: PcTarget::Publisher,
                            error,
                        } => Some(Err(error.clone())),
                        PeerEvent::Server(ServerMessage::Error {
                            request: Some(r),
                            message,
                            ..
                        }) if r == "publish_offer" => Some(Err(message.clone())),
                        _ => None,
                    })
                })
                .await?
                .map_err(|e| anyhow!("{name}: publish failed: {e}"))?;
            shared.spawn(start_media(
                shared.clone(),
                pc.clone(),
                local_tracks.clone(),
                t,
                opts.skip_video_packet,
                opts.pacing,
            ));
            publisher = Some(pc);
        }

        let peer = Peer {
            shared: shared.clone(),
            ws_tx,
            subscriber,
            publisher,
            local_tracks,
            joined,
            opts,
            room: room.to_owned(),
            left: AtomicBool::new(false),
            routes,
            reader: Mutex::new(Some(reader_handle)),
            url: url.to_owned(),
            redirects: 0,
        };
        guard.armed = false;
        if peer.opts.wait_ready {
            if peer.publisher.is_some() {
                peer.wait_connected(PcTarget::Publisher, t).await?;
            }
            peer.wait_data_channels(t).await?;
        }
        Ok(peer)
    }

    // ── identity ──

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    pub fn room(&self) -> &str {
        &self.room
    }

    pub fn participant_id(&self) -> &str {
        &self.joined.participant_id
    }

    pub fn joined(&self) -> &JoinedInfo {
        &self.joined
    }

    pub fn options(&self) -> &PeerOptions {
        &self.opts
    }

    /// When the WebSocket opened (the origin of join times).
    pub fn ws_opened_at(&self) -> Instant {
        self.shared.ws_opened_at
    }

    // ── events ──

    pub fn events(&self) -> Vec<TimedEvent> {
        self.shared.state().events.clone()
    }

    pub fn event_count(&self) -> usize {
        self.shared.state().events.len()
    }

    /// Waits for an event matching `pred` (already recorded ones count too).
    pub async fn wait_for_event(
        &self,
        pred: impl FnMut(&PeerEvent) -> bool,
        timeout: Duration,
    ) -> Result<PeerEvent> {
        self.wait_for_event_after(0, pred, timeout)
            .await
            .map(|(_, e)| e)
    }

    /// Waits for an event matching `pred` at index `from` or later (see [`Peer::event_count`]).
    /// Returns its index and the event.
    pub async fn wait_for_event_after(
        &self,
        from: usize,
        mut pred: impl FnMut(&PeerEvent) -> bool,
        timeout: Duration,
    ) -> Result<(usize, PeerEvent)> {
        self.shared
            .wait_until(timeout, "event", |s| {
                s.events
                    .iter()
                    .enumerate()
                    .skip(from)
                    .find(|(_, e)| pred(&e.event))
                    .map(|(i, e)| (i, e.event.clone()))
            })
            .await
    }

    /// Waits for a server message matching `pred`.
    pub async fn wait_for_server(
        &self,
        mut pred: impl FnMut(&ServerMessage) -> bool,
        timeout: Duration,
    ) -> Result<ServerMessage> {
        match self
            .wait_for_event(|e| matches!(e, PeerEvent::Server(m) if pred(m)), timeout)
            .await?
        {
            PeerEvent::Server(m) => Ok(m),
            _ => unreachable!("predicate only matches server messages"),
        }
    }

    /// Waits for an `error` from the server at event index `from` or later.
    pub async fn wait_for_error_after(
        &self,
        from: usize,
        timeout: Duration,
    ) -> Result<(ErrorCode, String, Option<String>)> {
        let (_, e) = self
            .wait_for_event_after(
                from,
                |e| matches!(e, PeerEvent::Server(ServerMessage::Error { .. })),
                timeout,
            )
            .await?;
        match e {
            PeerEvent::Server(ServerMessage::Error {
                code,
                message,
                request,
            }) => Ok((code, message, request)),
            _ => unreachable!("predicate only matches errors"),
        }
    }

    /// Server errors received so far.
    pub fn server_errors(&self) -> Vec<(ErrorCode, String)> {
        self.shared
            .state()
            .events
            .iter()
            .filter_map(|e| match &e.event {
                PeerEvent::Server(ServerMessage::Error { code, message, .. }) => {
                    Some((*code, message.clone()))
                }
                _ => None,
            })
            .collect()
    }

    // ── room view ──

    /// Tracks the room announced (joined / participant_joined / track_published), minus
    /// unpublished ones.
    pub fn room_tracks(&self) -> Vec<TrackInfo> {
        self.shared.state().room_tracks.values().cloned().collect()
    }

    /// The other participants, as last announced.
    pub fn participants(&self) -> Vec<ParticipantInfo> {
        self.shared.state().participants.values().cloned().collect()
    }

    pub async fn wait_for_room_track(
        &self,
        mut pred: impl FnMut(&TrackInfo) -> bool,
        timeout: Duration,
    ) -> Result<TrackInfo> {
        self.shared
            .wait_until(timeout, "room track", |s| {
                s.room_tracks.values().find(|t| pred(t)).cloned()
            })
            .await
    }

    pub async fn wait_for_participant(
        &self,
        mut pred: impl FnMut(&ParticipantInfo) -> bool,
        timeout: Duration,
    ) -> Result<ParticipantInfo> {
        self.shared
            .wait_until(timeout, "participant", |s| {
                s.participants.values().find(|p| pred(p)).cloned()
            })
            .await
    }

    // ── receiving media ──

    pub fn remote_tracks(&self) -> Vec<RemoteTrackStats> {
        self.shared
            .state()
            .remote_tracks
            .values()
            .cloned()
            .collect()
    }

    pub fn remote_track(&self, track_id: &str) -> Option<RemoteTrackStats> {
        self.shared.state().remote_tracks.get(track_id).cloned()
    }

    /// Waits until at least `n` remote tracks are live (have packets and have not ended).
    pub async fn wait_for_tracks(
        &self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<RemoteTrackStats>> {
        self.shared
            .wait_until(timeout, &format!("{n} live remote tracks"), |s| {
                let live: Vec<_> = s
                    .remote_tracks
                    .values()
                    .filter(|t| t.packets > 0 && !t.ended)
                    .cloned()
                    .collect();
                (live.len() >= n).then_some(live)
            })
            .await
    }

    /// Waits until remote track `track_id` has received at least `n` packets in total.
    pub async fn wait_for_packets(
        &self,
        track_id: &str,
        n: u64,
        timeout: Duration,
    ) -> Result<RemoteTrackStats> {
        self.shared
            .wait_until(timeout, &format!("{n} packets on {track_id}"), |s| {
                s.remote_tracks
                    .get(track_id)
                    .filter(|t| t.packets >= n)
                    .cloned()
            })
            .await
    }

    /// Waits for a remote track matching `pred`.
    pub async fn wait_for_remote_track(
        &self,
        mut pred: impl FnMut(&RemoteTrackStats) -> bool,
        timeout: Duration,
    ) -> Result<RemoteTrackStats> {
        self.shared
            .wait_until(timeout, "remote track", |s| {
                s.remote_tracks.values().find(|t| pred(t)).cloned()
            })
            .await
    }

    /// Sends a PLI for a remote track to the server.
    pub async fn request_keyframe(&self, track_id: &str) -> Result<()> {
        let track = lock(&self.shared.remote_handles)
            .get(track_id)
            .cloned()
            .ok_or_else(|| anyhow!("no live remote track {track_id}"))?;
        let ssrc = track
            .ssrcs()
            .await
            .first()
            .copied()
            .ok_or_else(|| anyhow!("remote track {track_id} has no SSRC"))?;
        let pli = PictureLossIndication {
            sender_ssrc: 0,
            media_ssrc: ssrc,
        };
        bounded(
            self.opts.timeout,
            "write_rtcp(PLI)",
            track.write_rtcp(vec![Box::new(pli)]),
        )
        .await
    }

    // ── publishing ──

    pub fn local_tracks(&self) -> Vec<LocalTrackStats> {
        self.local_stats(&self.shared.state())
    }

    fn local_stats(&self, s: &State) -> Vec<LocalTrackStats> {
        self.local_tracks
            .iter()
            .map(|lt| {
                let server_track_id = server_id_of(s, self.participant_id(), lt);
                let layers: Vec<LocalLayerStats> = lt
                    .layers
                    .iter()
                    .map(|l| LocalLayerStats {
                        rid: l.rid.clone(),
                        ssrc: l.ssrc,
                        width: l.clip.width,
                        height: l.clip.height,
                        paused: l.control.paused.load(Ordering::Acquire),
                        dynacast_paused: l.control.dynacast_paused.load(Ordering::Acquire),
                        dynacast_pauses: l.dynacast_pauses.load(Ordering::Relaxed),
                        dynacast_resumes: l.dynacast_resumes.load(Ordering::Relaxed),
                        counters: l.control.counters(),
                    })
                    .collect();
                LocalTrackStats {
                    kind: lt.kind,
                    client_track_id: lt.client_track_id.clone(),
                    publisher_layers_received: server_track_id
                        .as_ref()
                        .and_then(|id| s.publisher_layers.get(id))
                        .copied()
                        .unwrap_or(0),
                    server_track_id,
                    ssrc: lt.layers.first().map_or(0, |l| l.ssrc),
                    payload_type: *lock(&lt.payload_type),
                    paused: layers.iter().all(|l| l.paused || l.dynacast_paused),
                    counters: lt.counters(),
                    layers,
                }
            })
            .collect()
    }

    /// Waits until the local track of `kind` has sent at least `n` packets.
    pub async fn wait_for_sent_packets(
        &self,
        kind: TrackKind,
        n: u64,
        timeout: Duration,
    ) -> Result<SendCounters> {
        let lt = self
            .local_tracks
            .iter()
            .find(|t| t.kind == kind)
            .ok_or_else(|| anyhow!("not publishing {kind:?}"))?
            .clone();
        self.shared
            .wait_until(timeout, &format!("{n} {kind:?} packets sent"), |_| {
                let c = lt.counters();
                (c.packets >= n).then_some(c)
            })
            .await
    }

    /// Waits until the local track of `kind` satisfies `pred` (e.g. keyframe requests seen).
    pub async fn wait_for_local_track(
        &self,
        kind: TrackKind,
        mut pred: impl FnMut(&LocalTrackStats) -> bool,
        timeout: Duration,
    ) -> Result<LocalTrackStats> {
        if !self.local_tracks.iter().any(|t| t.kind == kind) {
            bail!("not publishing {kind:?}");
        }
        self.shared
            .wait_until(timeout, &format!("local {kind:?} track condition"), |s| {
                self.local_stats(s)
                    .into_iter()
                    .find(|t| t.kind == kind && pred(t))
            })
            .await
    }

    /// Stops (or resumes) sending the local track of `kind` and tells the server (`mute`).
    /// Needs the server's id for the track (from `track_published`).
    pub async fn set_muted(&self, kind: TrackKind, muted: bool) -> Result<()> {
        let lt = self
            .local_tracks
            .iter()
            .find(|t| t.kind == kind)
            .ok_or_else(|| anyhow!("not publishing {kind:?}"))?;
        let server_id = self
            .shared
            .wait_until(self.opts.timeout, "server id of our track", |s| {
                server_id_of(s, self.participant_id(), lt)
            })
            .await?;
        lt.set_paused(muted);
        self.send(ClientMessage::Mute {
            track_id: server_id,
            muted,
        })
        .await
    }

    /// Pauses or resumes the local track of `kind` without telling the server (a camera that
    /// stops producing frames).
    pub fn pause_media(&self, kind: TrackKind, paused: bool) -> Result<()> {
        let lt = self
            .local_tracks
            .iter()
            .find(|t| t.kind == kind)
            .ok_or_else(|| anyhow!("not publishing {kind:?}"))?;
        lt.set_paused(paused);
        Ok(())
    }

    /// Pauses or resumes one simulcast layer (by RID) of the local video track, without
    /// telling the server (an encoder that drops a layer, e.g. for CPU or bandwidth).
    pub fn pause_layer(&self, rid: &str, paused: bool) -> Result<()> {
        let layer = self
            .local_tracks
            .iter()
            .flat_map(|t| t.layers.iter())
            .find(|l| !l.rid.is_empty() && l.rid == rid)
            .ok_or_else(|| anyhow!("no simulcast layer {rid:?}"))?;
        layer.control.paused.store(paused, Ordering::Release);
        if !paused {
            // An encoder that resumes a layer starts it with a keyframe.
            layer
                .control
                .keyframe_requested
                .store(true, Ordering::Release);
        }
        self.shared.bump();
        Ok(())
    }

    // ── bandwidth limit ──

    /// Changes the subscriber connection's downstream limit (bit/s; 0 = unlimited). Needs
    /// [`PeerOptions::subscriber_bandwidth_bps`] set at connect (the relay is put in place
    /// then).
    pub fn set_subscriber_bandwidth(&self, bps: u64) -> Result<()> {
        let relay = self.shared.relay.as_ref().ok_or_else(|| {
            anyhow!(
                "{}: no relay (connect with subscriber_bandwidth_bps)",
                self.name()
            )
        })?;
        relay.set_rate(bps);
        Ok(())
    }

    /// Drops every `n`th new RTP packet on the subscriber connection's downstream (see
    /// [`Relay::set_loss_every`]; 0 stops). Needs the relay, as
    /// [`Peer::set_subscriber_bandwidth`].
    pub fn set_subscriber_loss_every(&self, n: u64) -> Result<()> {
        let relay = self.shared.relay.as_ref().ok_or_else(|| {
            anyhow!(
                "{}: no relay (connect with subscriber_bandwidth_bps)",
                self.name()
            )
        })?;
        relay.set_loss_every(n);
        Ok(())
    }

    /// Packets the server asked this publisher to retransmit (NACK): loss between this
    /// publisher and the server.
    pub fn nacked_packets(&self) -> u64 {
        self.shared.feedback.nacked_packets()
    }

    /// What the publisher connection's tap saw of the server's feedback.
    pub fn feedback(&self) -> &FeedbackCounters {
        &self.shared.feedback
    }

    /// Waits until the subscriber connection has received an RTCP sender report for `ssrc`
    /// that satisfies `pred`.
    pub async fn wait_for_sender_report(
        &self,
        ssrc: u32,
        pred: impl Fn(&SenderReportSeen) -> bool,
        timeout: Duration,
    ) -> Result<SenderReportSeen> {
        let fb = &self.shared.feedback;
        let wait = async {
            loop {
                let arrived = fb.sender_report_arrived.notified();
                tokio::pin!(arrived);
                arrived.as_mut().enable();
                if let Some(sr) = lock(&fb.sender_reports).get(&ssrc).filter(|s| pred(s)) {
                    return *sr;
                }
                arrived.await;
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| anyhow!("no sender report for SSRC {ssrc} within {timeout:?}"))
    }

    /// Counters of the subscriber connection's relay, if there is one.
    pub fn relay_stats(&self) -> Option<RelayStats> {
        self.shared.relay.as_ref().map(|r| r.stats())
    }

    /// The `layer_changed` messages received for `track_id` so far.
    pub fn layer_changes(&self, track_id: &str) -> Vec<LayerChange> {
        let s = self.shared.state();
        match s.remote_tracks.get(track_id) {
            Some(t) => t.layer_changes.clone(),
            None => s
                .pending_layer_changes
                .get(track_id)
                .cloned()
                .unwrap_or_default(),
        }
    }

    /// Waits until remote track `track_id` satisfies `pred`.
    pub async fn wait_for_track_state(
        &self,
        track_id: &str,
        what: &str,
        mut pred: impl FnMut(&RemoteTrackStats) -> bool,
        timeout: Duration,
    ) -> Result<RemoteTrackStats> {
        self.shared
            .wait_until(timeout, &format!("{track_id}: {what}"), |s| {
                s.remote_tracks.get(track_id).filter(|t| pred(t)).cloned()
            })
            .await
    }

    // ── data channels ──

    /// Waits until both `chat` and `input` are open.
    pub async fn wait_data_channels(&self, timeout: Duration) -> Result<()> {
        self.shared
            .wait_until(timeout, "data channels chat and input", |s| {
                if s.open_channels.iter().any(|l| l == "chat")
                    && s.open_channels.iter().any(|l| l == "input")
                {
                    Some(Ok(()))
                } else {
                    s.closed.as_ref().map(|r| {
                        Err(anyhow!(
                            "signaling closed ({r}) before data channels opened"
                        ))
                    })
                }
            })
            .await?
    }

    async fn channel(&self, channel: &Channel) -> Result<Arc<dyn DataChannel>> {
        let label = channel.label().to_owned();
        self.shared
            .wait_until(self.opts.timeout, &format!("data channel {label}"), |s| {
                s.open_channels.contains(&label).then_some(())
            })
            .await?;
        lock(&self.shared.channels)
            .get(&label)
            .cloned()
            .ok_or_else(|| anyhow!("data channel {label} closed"))
    }

    /// Sends a text message on `chat`, to everyone (None) or to the named participants.
    pub async fn send_chat(&self, text: &str, to: Option<Vec<String>>) -> Result<()> {
        self.send_data(Channel::Chat, Payload::Text(text.to_owned()), to)
            .await
    }

    /// Sends a binary message on `input`, to everyone (None) or to the named participants.
    pub async fn send_input(&self, bytes: &[u8], to: Option<Vec<String>>) -> Result<()> {
        self.send_data(
            Channel::Input,
            Payload::Binary(Bytes::copy_from_slice(bytes)),
            to,
        )
        .await
    }

    /// Sends an enveloped message on any channel.
    pub async fn send_data(
        &self,
        channel: Channel,
        payload: Payload,
        to: Option<Vec<String>>,
    ) -> Result<()> {
        let to = to.as_deref();
        match payload {
            Payload::Text(text) => {
                let data = envelope::encode_text(to, &text);
                self.send_raw_data(channel, Bytes::from(data), true).await
            }
            Payload::Binary(bytes) => {
                let data = envelope::encode(to, &bytes);
                self.send_raw_data(channel, Bytes::from(data), false).await
            }
        }
    }

    /// Sends `data` as is (no envelope): for testing how the server treats bad envelopes.
    pub async fn send_raw_data(&self, channel: Channel, data: Bytes, is_text: bool) -> Result<()> {
        let dc = self.channel(&channel).await?;
        let what = format!("send on {}", channel.label());
        if is_text {
            let text = std::str::from_utf8(&data).context("text message is not UTF-8")?;
            bounded(self.opts.timeout, &what, dc.send_text(text)).await
        } else {
            bounded(self.opts.timeout, &what, dc.send(BytesMut::from(&data[..]))).await
        }
    }

    /// Received data-channel messages (the most recent `max_kept_messages`).
    pub fn messages(&self) -> Vec<DataMessage> {
        self.shared.state().messages.iter().cloned().collect()
    }

    /// Messages received since the peer connected (including ones no longer kept).
    pub fn message_count(&self) -> u64 {
        self.shared.state().messages_total
    }

    /// A live feed of received messages (from now on).
    pub fn subscribe_messages(&self) -> broadcast::Receiver<DataMessage> {
        self.shared.messages_tx.subscribe()
    }

    /// Waits for a kept message matching `pred` (already received ones count too).
    pub async fn wait_for_message(
        &self,
        mut pred: impl FnMut(&DataMessage) -> bool,
        timeout: Duration,
    ) -> Result<DataMessage> {
        self.shared
            .wait_until(timeout, "data-channel message", |s| {
                s.messages.iter().find(|m| pred(m)).cloned()
            })
            .await
    }

    // ── signaling ──

    /// Sends any client message.
    pub async fn send(&self, msg: ClientMessage) -> Result<()> {
        send_ws(&self.ws_tx, encode(&msg), self.opts.timeout).await
    }

    /// Sends a raw text frame (for protocol-error tests).
    pub async fn send_ws_text(&self, text: impl Into<String>) -> Result<()> {
        send_ws(&self.ws_tx, text.into(), self.opts.timeout).await
    }

    /// Subscribes to (or unsubscribes from) tracks by server id.
    pub async fn subscribe(&self, track_ids: Vec<String>, subscribe: bool) -> Result<()> {
        self.send(ClientMessage::Subscribe {
            track_ids,
            subscribe,
        })
        .await
    }

    /// Per-subscription preferences for a video track (`track_settings`: simulcast quality
    /// and/or rendered size).
    pub async fn track_settings(
        &self,
        track_id: &str,
        quality: Option<Quality>,
        width: Option<u32>,
        height: Option<u32>,
    ) -> Result<()> {
        self.send(ClientMessage::TrackSettings {
            track_id: track_id.to_owned(),
            // Always explicit: `None` asks for no cap, also alongside a size.
            quality: Some(quality),
            width,
            height,
        })
        .await
    }

    /// Round trip of a `ping` → `pong` on the WebSocket.
    pub async fn ping(&self) -> Result<Duration> {
        let n = self.shared.ping_seq.fetch_add(1, Ordering::Relaxed);
        let ts = n as f64 + 0.5;
        let start = self.event_count();
        let t0 = Instant::now();
        self.send(ClientMessage::Ping { ts: Some(ts) }).await?;
        self.wait_for_event_after(
            start,
            |e| matches!(e, PeerEvent::Server(ServerMessage::Pong { ts: Some(x), .. }) if *x == ts),
            self.opts.timeout,
        )
        .await?;
        Ok(t0.elapsed())
    }

    pub fn negotiation(&self) -> NegotiationStats {
        self.shared.state().negotiation.clone()
    }

    /// Waits until at least `n` subscribe offers have been answered in total.
    pub async fn wait_for_subscribe_answers(&self, n: u64, timeout: Duration) -> Result<()> {
        self.shared
            .wait_until(timeout, &format!("{n} subscribe answers"), |s| {
                (s.negotiation.subscribe_answers >= n).then_some(())
            })
            .await
    }

    pub fn connection_state(&self, target: PcTarget) -> Option<RTCPeerConnectionState> {
        self.shared.state().pc_state.get(&target).copied()
    }

    /// Waits for the `target` connection to be connected; fails early if it failed.
    pub async fn wait_connected(&self, target: PcTarget, timeout: Duration) -> Result<()> {
        self.shared
            .wait_until(timeout, &format!("{target:?} connected"), |s| {
                match s.pc_state.get(&target) {
                    Some(RTCPeerConnectionState::Connected) => Some(Ok(())),
                    Some(RTCPeerConnectionState::Failed) => {
                        Some(Err(anyhow!("{target:?} connection failed")))
                    }
                    _ => s.closed.as_ref().map(|r| {
                        Err(anyhow!(
                            "signaling closed ({r}) before {target:?} connected"
                        ))
                    }),
                }
            })
            .await?
    }

    /// Restarts ICE on one connection and returns once the new ICE credentials are
    /// negotiated (not once ICE has connected again: wait for [`PeerEvent::IceState`]). The
    /// publisher connection restarts with an ICE-restart offer (`publish_offer`), the
    /// subscriber connection by asking the server (`ice_restart`), which offers. webrtc-rs
    /// gathers again on new sockets: the server sees the client at new addresses.
    pub async fn restart_ice(&self, target: PcTarget) -> Result<()> {
        let t = self.opts.timeout;
        match target {
            PcTarget::Publisher => {
                let pc = self
                    .publisher
                    .as_ref()
                    .ok_or_else(|| anyhow!("{}: no publisher connection", self.name()))?;
                let before = self.negotiation().publish_answers;
                bounded(t, "restart_ice", pc.restart_ice()).await?;
                let offer = bounded(t, "create_offer(restart)", pc.create_offer(None)).await?;
                let sdp = offer.sdp.clone();
                bounded(
                    t,
                    "set_local_description(restart)",
                    pc.set_local_description(offer),
                )
                .await?;
                self.shared.update(|s| s.negotiation.publish_offers += 1);
                self.send(ClientMessage::PublishOffer { sdp }).await?;
                self.shared
                    .wait_until(t, "restart answer applied", |s| {
                        (s.negotiation.publish_answers > before).then_some(())
                    })
                    .await
            }
            PcTarget::Subscriber => {
                let before = self.negotiation().subscribe_answers;
                self.send(ClientMessage::IceRestart { target }).await?;
                self.wait_for_subscribe_answers(before + 1, t).await
            }
        }
    }

    /// The direct handles, for tests that need the webrtc-rs API.
    pub fn subscriber_pc(&self) -> &Arc<dyn PeerConnection> {
        &self.subscriber
    }

    pub fn publisher_pc(&self) -> Option<&Arc<dyn PeerConnection>> {
        self.publisher.as_ref()
    }

    // ── stats and lifecycle ──

    pub fn stats(&self) -> PeerStats {
        let local_tracks = self.local_tracks();
        let s = self.shared.state();
        PeerStats {
            name: self.shared.name.clone(),
            participant_id: self.joined.participant_id.clone(),
            remote_tracks: s.remote_tracks.values().cloned().collect(),
            local_tracks,
            negotiation: s.negotiation.clone(),
            messages_received: s.messages_total,
            closed: s.closed.clone(),
        }
    }

    /// Why the signaling connection ended, if it did.
    pub fn closed_reason(&self) -> Option<String> {
        self.shared.state().closed.clone()
    }

    /// Whether (and why) the session was ended for us: see [`Removal`].
    pub fn removed(&self) -> Option<Removal> {
        self.shared.state().removed.clone()
    }

    /// Drops the signaling connection as a network failure would: no close frame, no
    /// `leave`. The peer connections stay up; what the peer sends meanwhile waits for
    /// [`Peer::resume`].
    pub fn drop_signaling(&self) {
        if let Some(reader) = lock(&self.reader).take() {
            reader.abort();
        }
        let _ = self.ws_tx.try_send(WsOut::Detach);
    }

    /// Server messages received so far in this participant's session (what `resume` reports).
    pub fn received_messages(&self) -> u64 {
        self.shared.state().received
    }

    /// Opens a new signaling connection and resumes the session on it (`resume` with the
    /// join's token and the messages received). Returns the `resumed` message, or the server's
    /// refusal as an error.
    pub async fn resume(&self) -> Result<ServerMessage> {
        let t = self.opts.timeout;
        let token = self
            .joined
            .resume_token
            .clone()
            .ok_or_else(|| anyhow!("{}: the server gave no resume token", self.name()))?;
        let (ws, _) = bounded(
            t,
            "websocket connect",
            tokio_tungstenite::connect_async_with_config(&self.url, None, true),
        )
        .await?;
        let (mut sink, mut stream) = ws.split();
        let msg = ClientMessage::Resume {
            participant_id: self.participant_id().to_owned(),
            resume_token: token,
            received: self.received_messages(),
        };
        bounded(t, "send resume", sink.send(Message::text(encode(&msg)))).await?;
        let reply = bounded(t, "resume reply", async {
            loop {
                match stream.next().await {
                    Some(Ok(Message::Text(text))) => {
                        break serde_json::from_str::<ServerMessage>(&text)
                            .map_err(|e| anyhow!("resume reply {text}: {e}"));
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => break Err(anyhow!("resume reply: {e}")),
                    None => break Err(anyhow!("connection closed before the resume reply")),
                }
            }
        })
        .await?;
        if !matches!(reply, ServerMessage::Resumed { .. }) {
            bail!("resume refused: {reply:?}");
        }
        self.shared
            .update(|s| s.push(PeerEvent::Server(reply.clone())));
        let reader = tokio::spawn(reader_task(
            stream,
            self.shared.clone(),
            self.routes.clone(),
        ));
        lock(&self.shared.tasks).push(reader.abort_handle());
        *lock(&self.reader) = Some(reader.abort_handle());
        self.ws_tx
            .send(WsOut::Attach(sink))
            .await
            .map_err(|_| anyhow!("the signaling writer is gone"))?;
        Ok(reply)
    }

    /// Waits (bounded) for a [`Removal`].
    pub async fn wait_removed(&self, timeout: Duration) -> Result<Removal> {
        self.shared
            .wait_until(timeout, "removal", |s| s.removed.clone())
            .await
    }

    pub async fn wait_closed(&self, timeout: Duration) -> Result<String> {
        self.shared
            .wait_until(timeout, "websocket closed", |s| s.closed.clone())
            .await
    }

    /// Leaves politely: `leave`, waits (bounded) for the server to close the socket, then closes
    /// both peer connections. Idempotent.
    pub async fn leave(&self) -> Result<()> {
        self.shared.leaving.store(true, Ordering::Release);
        if self.left.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let sent = self.send(ClientMessage::Leave).await;
        if sent.is_ok() {
            let _ = self.wait_closed(Duration::from_secs(2)).await;
        }
        let _ = self.ws_tx.try_send(WsOut::Close);
        self.close_pcs().await;
        Ok(())
    }

    /// Drops the connection without `leave` (as a crashed client would).
    pub async fn disconnect(&self) {
        self.shared.leaving.store(true, Ordering::Release);
        if self.left.swap(true, Ordering::AcqRel) {
            return;
        }
        let _ = self.ws_tx.try_send(WsOut::Close);
        self.close_pcs().await;
    }

    async fn close_pcs(&self) {
        self.shared.abort_tasks();
        let mut closes = vec![self.subscriber.clone()];
        closes.extend(self.publisher.clone());
        for pc in closes {
            let _ = tokio::time::timeout(Duration::from_secs(2), pc.close()).await;
        }
        lock(&self.shared.channels).clear();
        lock(&self.shared.remote_handles).clear();
        self.shared.update(|s| {
            s.closed.get_or_insert_with(|| "left".to_owned());
        });
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.shared.leaving.store(true, Ordering::Release);
        if !self.left.swap(true, Ordering::AcqRel) {
            let _ = self.ws_tx.try_send(WsOut::Close);
            let mut pcs = vec![self.subscriber.clone()];
            pcs.extend(self.publisher.clone());
            teardown(&self.shared, pcs);
        }
    }
}

fn server_id_of(s: &State, participant_id: &str, lt: &LocalTrack) -> Option<String> {
    find_server_id(s, participant_id, &lt.client_track_id, lt.kind)
}

/// The server id of one of our tracks: by client track id, else by kind.
fn find_server_id(
    s: &State,
    participant_id: &str,
    client_track_id: &str,
    kind: TrackKind,
) -> Option<String> {
    let mine = s
        .room_tracks
        .values()
        .filter(|t| t.participant_id == participant_id);
    let mut by_kind = None;
    for t in mine {
        if t.client_track_id == client_track_id {
            return Some(t.id.clone());
        }
        if t.kind == kind {
            by_kind = Some(t.id.clone());
        }
    }
    by_kind
}

async fn send_ws(ws_tx: &mpsc::Sender<WsOut>, text: String, t: Duration) -> Result<()> {
    match tokio::time::timeout(t, ws_tx.send(WsOut::Text(text))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => bail!("signaling connection is closed"),
        Err(_) => bail!("signaling queue full for {t:?}"),
    }
}

/// What a local track of `kind` sends: (codec kind, codec, MIME type, label in its ids).
pub fn local_codec(kind: TrackKind) -> (RtpCodecKind, RTCRtpCodec, &'static str, &'static str) {
    match kind {
        TrackKind::Audio => (RtpCodecKind::Audio, opus_codec(), MIME_TYPE_OPUS, "audio"),
        TrackKind::Video => (RtpCodecKind::Video, vp8_codec(), MIME_TYPE_VP8, "video"),
    }
}

/// The wait in a `join_rate_limited` message ("… retry after 0.5 s").
fn retry_after(message: &str) -> Option<Duration> {
    let tail = message.rsplit("retry after ").next()?;
    let secs: f64 = tail
        .trim_end_matches(|c: char| !c.is_ascii_digit())
        .trim()
        .parse()
        .ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(60.0)))
}

/// Adds to `pc` the track `<name>-<audio|video>` (stream `<name>-stream`) of `kind`'s codec
/// ([`local_codec`]), with one encoding per `(rid, ssrc)`: one with an empty RID for a plain
/// track, several with RIDs for simulcast (`a=rid:<rid> send` and `a=simulcast:send` in the
/// offer, in this order).
pub async fn add_track_with_encodings(
    pc: &Arc<dyn PeerConnection>,
    name: &str,
    kind: TrackKind,
    encodings: &[(String, u32)],
    t: Duration,
) -> Result<(Arc<TrackLocalStaticRTP>, Arc<dyn RtpSender>)> {
    let (codec_kind, codec, _, label) = local_codec(kind);
    let encodings = encodings
        .iter()
        .map(|(rid, ssrc)| RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                rid: rid.clone(),
                ssrc: Some(*ssrc),
                ..Default::default()
            },
            codec: codec.clone(),
            ..Default::default()
        })
        .collect();
    let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
        format!("{name}-stream"),
        format!("{name}-{label}"),
        format!("{name} {label}"),
        codec_kind,
        encodings,
    )));
    let sender = bounded(
        t,
        "add_track",
        pc.add_track(track.clone() as Arc<dyn TrackLocal>),
    )
    .await?;
    Ok((track, sender))
}

/// Adds a local track with one encoding per `(rid, clip)` (see [`add_track_with_encodings`]).
async fn add_local_track(
    pc: &Arc<dyn PeerConnection>,
    name: &str,
    kind: TrackKind,
    clips: Vec<(String, Arc<Clip>)>,
    t: Duration,
) -> Result<LocalTrack> {
    let (_, _, mime, label) = local_codec(kind);
    if clips.is_empty() || (clips.len() > 1 && clips.iter().any(|(rid, _)| rid.is_empty())) {
        bail!("a track needs one clip, or one clip per non-empty RID");
    }
    let client_track_id = format!("{name}-{label}");
    let mut layers = Vec::new();
    for (rid, clip) in clips {
        let ssrc = loop {
            let s = rand::random::<u32>() | 1;
            if layers.iter().all(|l: &LocalLayer| l.ssrc != s) {
                break s;
            }
        };
        layers.push(LocalLayer {
            rid,
            ssrc,
            clip,
            control: Arc::new(PacerControl::default()),
            dynacast_pauses: Arc::new(AtomicU64::new(0)),
            dynacast_resumes: Arc::new(AtomicU64::new(0)),
        });
    }
    let encodings: Vec<(String, u32)> = layers.iter().map(|l| (l.rid.clone(), l.ssrc)).collect();
    let (track, sender) = add_track_with_encodings(pc, name, kind, &encodings, t).await?;
    Ok(LocalTrack {
        kind,
        client_track_id,
        mime_type: mime,
        layers,
        track,
        sender,
        payload_type: Arc::new(Mutex::new(None)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_is_read_from_a_join_rate_refusal() {
        let e = "server error JoinRateLimited (join): too many joins from this address (more \
                 than 20 per second, bursts of 100): retry after 0.5 s";
        assert_eq!(retry_after(e), Some(Duration::from_millis(500)));
        assert_eq!(retry_after("no number here"), None);
    }

    /// `Peer` can be shared across tasks, and its futures can be spawned.
    #[allow(unreachable_code, clippy::diverging_sub_expression)]
    fn _peer_and_its_futures_are_send(peer: Arc<Peer>) {
        fn is_send<T: Send>(_: &T) {}
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Peer>();
        let d = Duration::ZERO;
        is_send(&Peer::connect("", "", "", PeerOptions::default()));
        is_send(&peer.wait_for_tracks(1, d));
        is_send(&peer.wait_for_event(|_| true, d));
        is_send(&peer.wait_for_message(|_| true, d));
        is_send(&peer.send_chat("", None));
        is_send(&peer.send_input(b"", None));
        is_send(&peer.request_keyframe(""));
        is_send(&peer.set_muted(TrackKind::Audio, true));
        is_send(&peer.ping());
        is_send(&peer.leave());
    }

    #[test]
    fn server_ids_of_local_tracks_prefer_the_client_track_id() {
        let info = |id: &str, pid: &str, kind, client: &str| TrackInfo {
            id: id.into(),
            participant_id: pid.into(),
            kind,
            mime_type: String::new(),
            client_track_id: client.into(),
            muted: false,
            layers: vec![],
        };
        let mut s = State::default();
        for t in [
            info("TR_0", "PA_other", TrackKind::Video, "me-video"),
            info("TR_1", "PA_me", TrackKind::Video, "other-video"),
            info("TR_2", "PA_me", TrackKind::Video, "me-video"),
        ] {
            s.room_tracks.insert(t.id.clone(), t);
        }
        let id = |client, kind| find_server_id(&s, "PA_me", client, kind);
        assert_eq!(id("me-video", TrackKind::Video), Some("TR_2".into()));
        assert_eq!(id("renamed", TrackKind::Video).as_deref(), Some("TR_2"));
        assert_eq!(id("me-audio", TrackKind::Audio), None);
    }

    #[test]
    fn server_messages_update_the_room_view() {
        let mut s = State::default();
        let now = Instant::now();
        let track = TrackInfo {
            id: "TR_a".into(),
            participant_id: "PA_p".into(),
            kind: TrackKind::Audio,
            mime_type: "audio/opus".into(),
            client_track_id: "p-audio".into(),
            muted: false,
            layers: vec![],
        };
        apply_server_message(
            &mut s,
            &ServerMessage::ParticipantJoined {
                participant: ParticipantInfo {
                    id: "PA_p".into(),
                    name: "p".into(),
                    tracks: vec![],
                },
            },
            now,
        );
        apply_server_message(
            &mut s,
            &ServerMessage::TrackPublished {
                track: track.clone(),
            },
            now,
        );
        assert_eq!(s.participants["PA_p"].tracks, vec![track.clone()]);
        s.remote_tracks.insert(
            "TR_a".into(),
            RemoteTrackStats::new("TR_a".into(), "PA_p".into(), TrackKind::Audio, 0),
        );
        apply_server_message(
            &mut s,
            &ServerMessage::TrackMuted {
                track_id: "TR_a".into(),
                participant_id: "PA_p".into(),
                muted: true,
                by_admin: false,
            },
            now,
        );
        assert!(s.room_tracks["TR_a"].muted);
        apply_server_message(
            &mut s,
            &ServerMessage::ParticipantLeft {
                participant_id: "PA_p".into(),
                reason: Default::default(),
            },
            now,
        );
        assert!(s.room_tracks.is_empty() && s.participants.is_empty());
        assert!(s.remote_tracks["TR_a"].ended);
        assert!(matches!(
            s.events.last().map(|e| &e.event),
            Some(PeerEvent::TrackEnded { track_id }) if track_id == "TR_a"
        ));
        // A join error before `joined` fails the join; after it, it does not.
        let err = ServerMessage::error(ErrorCode::InvalidField, "bad", Some("join"));
        apply_server_message(&mut s, &err, now);
        assert!(matches!(&s.joined, Some(Err(e)) if e.contains("bad")));
    }
}
