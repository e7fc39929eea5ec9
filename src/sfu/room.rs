//! What a room owns: its participants (each with its two peer connections and media paths),
//! the tracks published in it (each with its layers) and their subscriptions (one
//! [`DownTrack`] per subscriber and track, like a mediasoup Consumer). A participant or a
//! track is reached only through its room ([`PartKey`] names the room), so nothing in one
//! room can reach another's.

use super::bwe::Estimate;
use super::data;
use super::egress::{Egress, KeyCapture};
use super::forward::DownTrack;
use super::h264;
use super::ids::{PartKey, TrackId};
use super::ingress::Ingress;
use super::keyframe::KeyframeThrottle;
use super::outbox::Outbox;
use super::pipe::{RelayId, ShardId};
use super::selector::{BitrateMeter, LayerInfo, Requested};
use super::timeline::{Dedup, History, HistoryLimits, Sequencer, Ticker, Waiting};
use super::timers::Deadline;
use super::viewing::ViewTarget;
use super::{Grants, Remote};
use crate::signal::{ParticipantInfo, Permissions, ServerMessage, TrackInfo, TrackKind};
use bytes::BytesMut;
use rtc::data_channel::RTCDataChannelId;
use rtc::peer_connection::RTCPeerConnection;
use rtc::rtp_transceiver::rtp_sender::RTCRtpCodec;
use rtc::rtp_transceiver::{RTCRtpReceiverId, RTCRtpSenderId};
use rustc_hash::FxHashMap;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Minimum time between keyframe requests to one publisher track.
pub(super) const KEYFRAME_INTERVAL: Duration = Duration::from_millis(300);

/// One room of the core.
pub(super) struct Room {
    /// The room's name (what clients join).
    pub(super) name: String,
    /// Participants in join order.
    pub(super) members: Vec<PartKey>,
    /// Boxed: a participant is large (its connections), and the fan-out looks up one per
    /// forwarded copy; the table itself stays small and dense.
    pub(super) parts: FxHashMap<PartKey, Box<Participant>>,
    /// Tracks published in the room, here and on the room's other shards.
    pub(super) tracks: HashMap<TrackId, Track>,
    /// The same tracks in the order they were published here (what a viewer's host is).
    pub(super) track_order: Vec<TrackId>,
    /// The other shards hosting the room.
    pub(super) peers: BTreeSet<ShardId>,
    /// Participants of the room on other shards, by id.
    pub(super) remote: BTreeMap<String, RemoteMember>,
    /// When the room opened here.
    pub(super) created: Instant,
    /// The shard that sequences the room's timeline; `None`: this one (then
    /// [`Room::timeline`] is the room's).
    pub(super) home: Option<ShardId>,
    /// The room's timeline (used on its home shard only).
    pub(super) timeline: RoomTimeline,
}

/// A room's timeline state, on its home shard.
pub(super) struct RoomTimeline {
    pub(super) seq: Sequencer,
    pub(super) history: History,
    /// Each sender's `sseq`s per lane (forgotten when it leaves).
    pub(super) dedup: HashMap<String, [Dedup; 2]>,
    /// Input ticks (a rate was set for the room).
    pub(super) ticker: Option<Ticker>,
}

impl RoomTimeline {
    pub(super) fn new(limits: HistoryLimits, tick_hz: u32, now: Instant) -> Self {
        RoomTimeline {
            seq: Sequencer::default(),
            history: History::new(limits),
            dedup: HashMap::new(),
            ticker: (tick_hz > 0).then(|| Ticker::new(tick_hz, now)),
        }
    }
}

/// A participant of the room on another shard.
pub(super) struct RemoteMember {
    pub(super) shard: ShardId,
    pub(super) name: String,
}

impl Room {
    pub(super) fn new(
        name: String,
        now: Instant,
        home: Option<ShardId>,
        timeline: RoomTimeline,
    ) -> Self {
        Room {
            home,
            timeline,
            created: now,
            name,
            members: Vec::new(),
            parts: FxHashMap::default(),
            tracks: HashMap::new(),
            track_order: Vec::new(),
            peers: BTreeSet::new(),
            remote: BTreeMap::new(),
        }
    }

    /// The room's participants on other shards, with their tracks.
    pub(super) fn remote_infos(&self) -> Vec<ParticipantInfo> {
        self.remote
            .iter()
            .map(|(pid, m)| {
                let mut tracks: Vec<TrackInfo> = self
                    .tracks
                    .values()
                    .filter(|t| t.is_remote_of(pid))
                    .map(|t| t.info(pid))
                    .collect();
                tracks.sort_by(|a, b| a.id.cmp(&b.id));
                ParticipantInfo {
                    id: pid.clone(),
                    name: m.name.clone(),
                    tracks,
                }
            })
            .collect()
    }

    /// The participant id of whoever publishes `t` (here or on another shard).
    pub(super) fn publisher_id(&self, t: &Track) -> String {
        match &t.publisher {
            Publisher::Local { part, .. } => self
                .parts
                .get(part)
                .map(|p| p.pid.clone())
                .unwrap_or_default(),
            Publisher::Remote { participant_id, .. } => participant_id.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum PcKind {
    Publisher,
    Subscriber,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct PcKey {
    pub(super) part: PartKey,
    pub(super) kind: PcKind,
}

/// One `rtc` peer connection with the bookkeeping the loop needs.
pub(super) struct Pc {
    pub(super) rtc: RTCPeerConnection,
    /// When the connection next needs a timeout, and for what.
    pub(super) deadline: Option<Deadline>,
    pub(super) connected: bool,
    /// Already in the dirty queue.
    pub(super) queued: bool,
    /// Needs a full drain (events, application messages, timers), not just its outgoing
    /// datagrams: set by everything except the forwarding of RTP packets (see `process`).
    pub(super) full_drain: bool,
    /// Connectivity checks that arrived before the remote description (the client starts
    /// checking as soon as it has answered; its answer may still be on the WebSocket).
    pub(super) early: Vec<(Remote, Instant, BytesMut)>,
    /// Where the fast path sends media and feedback: the remote address of the pair the client
    /// nominated last, or where `rtc` last sent something other than STUN (DTLS, SCTP).
    pub(super) media_addr: Option<Remote>,
    /// Records SRTP key derivation for the fast path.
    pub(super) capture: Option<KeyCapture>,
    /// Remote candidates added so far (trickled or in the client's SDP).
    pub(super) remote_candidates: usize,
    /// The client's latest nominating check (USE-CANDIDATE) that `rtc` has not answered yet
    /// (it answers only once its own check of the pair succeeded), and where it came from.
    pub(super) pending_nomination: Option<(Remote, BytesMut)>,
    /// The client asked for an ICE restart of this (subscriber) connection: the next offer
    /// carries new credentials.
    pub(super) restart_wanted: bool,
    /// A relayed data-channel message was handed to this connection's channel in this turn,
    /// with this origin (the earliest, if several): the DTLS datagrams it flushes carry it
    /// (the relay latency in `/stats` and `/metrics`).
    pub(super) data_origin: Option<Instant>,
    /// The earliest receive stamp of the datagrams handed to its `rtc` since its application
    /// messages were last read: the origin of the data-channel messages it delivers then.
    pub(super) read_origin: Option<Instant>,
}

/// At most this many early datagrams are kept per peer connection.
pub(super) const EARLY_MAX: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Channel {
    Chat,
    Input,
}

impl Channel {
    pub(super) fn label(self) -> &'static str {
        match self {
            Channel::Chat => "chat",
            Channel::Input => "input",
        }
    }
}

pub(super) struct Participant {
    pub(super) pid: String,
    pub(super) name: String,
    /// Who it is (from its token; unique in the room), if known.
    pub(super) identity: Option<String>,
    /// The signaling session's id (`SE_…`; empty: none), in its log spans and webhook events.
    pub(super) session: String,
    /// What it may do.
    pub(super) grants: Grants,
    /// A room admin muted its chat: its `chat` messages are refused.
    pub(super) chat_muted: bool,
    /// When it joined.
    pub(super) joined: Instant,
    pub(super) events: mpsc::Sender<ServerMessage>,
    /// It asked to be subscribed to every track (whether it may: [`Grants::subscribe`]).
    pub(super) auto_subscribe: bool,
    /// Publishes only (WHIP ingest): its subscriber connection is never offered.
    pub(super) publish_only: bool,
    /// A viewer (WHEP playback): its subscriber connection is offered by the client, and its
    /// media sections play what [`Viewer::target`] names.
    pub(super) viewer: Option<Viewer>,
    pub(super) sub: Pc,
    pub(super) publ: Option<Pc>,
    /// A subscriber offer is out and its answer not yet applied.
    pub(super) sub_offer_pending: bool,
    /// Something changed while an offer was out: offer again after the answer.
    pub(super) sub_needs_offer: bool,
    /// Subscriber offers sent so far; the number of the latest.
    pub(super) offers_sent: u64,
    /// Number of the latest subscriber offer whose answer has been applied.
    pub(super) offers_answered: u64,
    pub(super) channels: HashMap<RTCDataChannelId, Channel>,
    pub(super) open_channels: HashMap<&'static str, RTCDataChannelId>,
    /// What this participant publishes, in order.
    pub(super) pub_tracks: Vec<PubTrack>,
    /// Receivers of its publisher connection whose track was refused (a kind its grants do
    /// not allow): the track's other encodings are ignored without another error.
    pub(super) refused: Vec<RTCRtpReceiverId>,
    /// Server track id → sender on this participant's subscriber PC.
    pub(super) subscriptions: HashMap<TrackId, RTCRtpSenderId>,
    pub(super) limiter: data::RateLimiter,
    /// It asked for the room's events on its `chat` channel.
    pub(super) timeline_events: bool,
    /// Its `history` requests (each may replay a whole history).
    pub(super) history_limiter: data::RateLimiter,
    /// Data-channel messages waiting for its channel to open, per lane (`is_text`, message).
    pub(super) waiting: [Waiting; 2],
    /// Signaling events waiting for room in `events` (coalesced).
    pub(super) outbox: Outbox,
    /// The estimate the last layer selection used (to notice a sharp drop between ticks).
    pub(super) selected_at_bps: Option<u64>,
    /// The subscriber connection's media path, once its DTLS handshake is done.
    pub(super) egress: Option<Egress>,
    /// The publisher connection's media path, once its DTLS handshake is done.
    pub(super) ingress: Option<Ingress>,
}

/// What a viewer (WHEP) plays: one [`Section`] per media section of its offer.
pub(super) struct Viewer {
    pub(super) target: ViewTarget,
    pub(super) sections: Vec<Section>,
}

/// One media section of a viewer's connection: a sender with one SSRC for the whole session,
/// playing one track of the room at a time (or nothing, waiting for one).
pub(super) struct Section {
    pub(super) kind: TrackKind,
    pub(super) sender: RTCRtpSenderId,
    /// The track it plays now; its down-track is in that track's `down`.
    pub(super) playing: Option<TrackId>,
    /// Its down-track while it plays nothing: the next track continues its sequence numbers
    /// and timestamps.
    pub(super) parked: Option<DownTrack>,
    /// What the viewer asked for (video; the layer extension), kept across tracks.
    pub(super) requested: Requested,
}

/// A track a participant publishes: one receiving transceiver of its publisher connection.
/// Identified by that receiver, never by the client's msid (which may be absent, or the same
/// on several m-lines): only a new RID on the same receiver is a new layer.
pub(super) struct PubTrack {
    pub(super) receiver: RTCRtpReceiverId,
    /// The server's track id, shared so the packet path can hold it without allocating.
    pub(super) tid: TrackId,
}

impl Participant {
    /// Downlink estimate of the subscriber connection (TWCC, REMB fallback); empty before its
    /// fast path starts.
    pub(super) fn estimate(&self) -> Estimate {
        self.egress
            .as_ref()
            .map(|e| *e.estimate())
            .unwrap_or_default()
    }

    /// The server track id of what the publisher connection's receiver `receiver` gets.
    pub(super) fn pub_track(&self, receiver: RTCRtpReceiverId) -> Option<&TrackId> {
        self.pub_tracks
            .iter()
            .find(|t| t.receiver == receiver)
            .map(|t| &t.tid)
    }

    /// Whether the connection it must bring up within the connect timeout is up: the
    /// subscriber connection, or for a publish-only participant the publisher connection.
    pub(super) fn transport_connected(&self) -> bool {
        if self.publish_only {
            self.publ.as_ref().is_some_and(|pc| pc.connected)
        } else {
            self.sub.connected
        }
    }

    /// Whether it is subscribed to every new track by itself (it asked to, and may).
    pub(super) fn auto_subscribes(&self) -> bool {
        self.auto_subscribe && self.grants.subscribe
    }

    /// What it may do now, as it is told.
    pub(super) fn permissions(&self) -> Permissions {
        let g = &self.grants;
        Permissions {
            publish_audio: g.publish_audio,
            publish_video: g.publish_video,
            publish_data: g.publish_data,
            subscribe: g.subscribe,
            hidden: g.hidden,
            room_admin: g.room_admin,
            chat_muted: self.chat_muted,
        }
    }

    /// Server track ids this participant publishes, in order.
    pub(super) fn published(&self) -> impl Iterator<Item = &str> {
        self.pub_tracks.iter().map(|t| &*t.tid)
    }
}

/// One encoding of a published track: a simulcast layer, or the only one.
pub(super) struct Layer {
    /// RID, empty for a track without simulcast.
    pub(super) rid: String,
    /// Learned from the track event or from the first packet of the layer.
    pub(super) ssrc: Option<u32>,
    pub(super) width: u32,
    pub(super) height: u32,
    pub(super) meter: BitrateMeter,
    pub(super) throttle: KeyframeThrottle,
    /// H.264: the layer's parameter sets and where its keyframes start.
    pub(super) h264: h264::LayerState,
}

impl Layer {
    pub(super) fn new(rid: String, ssrc: Option<u32>) -> Self {
        Layer {
            rid,
            ssrc,
            width: 0,
            height: 0,
            meter: BitrateMeter::new(),
            throttle: KeyframeThrottle::new(KEYFRAME_INTERVAL),
            h264: h264::LayerState::new(),
        }
    }
}

/// Who publishes a track: a participant of this shard, or one of another shard hosting the
/// same room (the track then arrives over the pipe).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Publisher {
    Local {
        part: PartKey,
        /// The receiving transceiver of the publisher connection.
        receiver: RTCRtpReceiverId,
    },
    Remote {
        shard: ShardId,
        participant_id: String,
    },
}

pub(super) struct Track {
    pub(super) id: TrackId,
    pub(super) publisher: Publisher,
    /// The track's number on the pipe: ours for a local track, the publisher's shard's for a
    /// remote one.
    pub(super) relay: RelayId,
    pub(super) kind: TrackKind,
    pub(super) codec: RTCRtpCodec,
    pub(super) client_track_id: String,
    pub(super) muted: bool,
    /// A room admin holds it muted: its publisher cannot unmute it.
    pub(super) admin_muted: bool,
    /// Encodings; a layer's id is its index here (never reordered).
    pub(super) layers: Vec<Layer>,
    pub(super) down: FxHashMap<PartKey, DownTrack>,
    /// Dynacast: layers the publisher was told to pause, and since when each layer has been
    /// unneeded.
    pub(super) paused_upstream: BTreeSet<usize>,
    pub(super) unneeded_since: HashMap<usize, Instant>,
    /// (A local track.) Other shards with subscribers of it, and the layers each needs: its
    /// packets are relayed to them.
    pub(super) relayed_to: BTreeMap<ShardId, u64>,
    /// (A remote track.) What this shard last told the publisher's shard it needs.
    pub(super) needed_sent: Option<(bool, u64)>,
    /// (A local audio track.) The audio levels of its packets since the last speaker tick.
    pub(super) levels: crate::sfu::speaker::Meter,
}

impl Track {
    /// A track nobody subscribes to yet.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        id: TrackId,
        publisher: Publisher,
        relay: RelayId,
        kind: TrackKind,
        codec: RTCRtpCodec,
        client_track_id: String,
        muted: bool,
        layers: Vec<Layer>,
    ) -> Self {
        Track {
            id,
            publisher,
            relay,
            kind,
            codec,
            client_track_id,
            muted,
            admin_muted: false,
            layers,
            down: FxHashMap::default(),
            paused_upstream: BTreeSet::new(),
            unneeded_since: HashMap::new(),
            relayed_to: BTreeMap::new(),
            needed_sent: None,
            levels: Default::default(),
        }
    }

    /// Whether the track is published by participant `pid` of another shard.
    pub(super) fn is_remote_of(&self, pid: &str) -> bool {
        matches!(&self.publisher, Publisher::Remote { participant_id, .. } if participant_id == pid)
    }

    /// The local participant publishing the track, if it is local.
    pub(super) fn local_publisher(&self) -> Option<PartKey> {
        match self.publisher {
            Publisher::Local { part, .. } => Some(part),
            Publisher::Remote { .. } => None,
        }
    }

    /// Whether anyone, here or on another shard, receives the track.
    pub(super) fn has_subscribers(&self) -> bool {
        !self.down.is_empty() || !self.relayed_to.is_empty()
    }

    pub(super) fn info(&self, publisher_pid: &str) -> TrackInfo {
        TrackInfo {
            id: self.id.to_string(),
            participant_id: publisher_pid.to_owned(),
            kind: self.kind,
            mime_type: self.codec.mime_type.clone(),
            client_track_id: self.client_track_id.clone(),
            muted: self.muted,
            layers: self
                .layers
                .iter()
                .filter(|l| !l.rid.is_empty())
                .map(|l| l.rid.clone())
                .collect(),
        }
    }

    pub(super) fn is_simulcast(&self) -> bool {
        self.layers.len() > 1 || self.layers.first().is_some_and(|l| !l.rid.is_empty())
    }

    /// What the selector needs to know of each layer now.
    pub(super) fn layer_infos(&self, now: Instant) -> Vec<LayerInfo> {
        self.layers
            .iter()
            .enumerate()
            .map(|(id, l)| {
                let active = l.meter.is_active(now);
                LayerInfo {
                    id,
                    width: l.width,
                    height: l.height,
                    bitrate_bps: if active {
                        l.meter.bps(now)
                    } else {
                        l.meter.last_active_bps()
                    },
                    active,
                }
            })
            .collect()
    }
}
