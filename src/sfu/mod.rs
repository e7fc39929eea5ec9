//! The SFU core: rooms, participants, tracks and down-tracks, as a sans-I/O state machine
//! ([`Sfu`]) that a driver (`crate::io`, or the virtual-time simulation) feeds with `now`,
//! datagrams, commands and timeouts.
//!
//! Signaling talks to the core only through [`SfuHandle`]: commands go in over an mpsc
//! channel, replies come back over a oneshot (join) or on the participant's own event channel
//! (everything else). The core never blocks on signaling: a participant whose event channel is
//! full is disconnected rather than waited for.

pub mod core;
/// Decide: pure media decisions per subscription and per track (no socket, `now` passed in).
pub mod media {
    pub mod forward;
    pub mod h264;
    pub mod keyframe;
    pub mod red;
    pub mod rewrite;
    pub mod selector;
    pub mod vp8;
}
/// Act: per-connection media paths (SRTP, RTCP, feedback, retransmission, estimation).
pub mod transport {
    pub mod bwe;
    pub mod egress;
    pub mod ingress;
    pub mod nack;
    pub mod probe;
}
pub use media::{forward, h264, keyframe, red, rewrite, selector, vp8};
pub use transport::{bwe, egress, ingress, nack, probe};
pub mod admin;
pub mod data;
pub mod demux;
pub mod effects;
pub mod ids;
pub mod latency;
pub mod loglimit;
pub mod outbox;
pub mod pipe;
pub mod placement;
pub mod quality;
pub mod room;
pub mod sdpcheck;
pub mod speaker;
pub mod timeline;
pub mod timers;
pub mod viewing;

pub use self::core::CONNECT_TIMEOUT;
pub use self::core::{CoreConfig, Sfu};
pub use timers::{Deadline, Reason};

use crate::signal::{ClientMessage, LeaveReason, ServerMessage};
use bytes::BytesMut;
use std::net::SocketAddr;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// A peer's transport address: where its datagrams come from and go to, over UDP or over
/// one of its ICE-TCP connections. A UDP peer and a TCP peer may have the same address (the
/// kernel, or a NAT, numbers UDP and TCP ports apart), so the address alone does not say
/// which.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Remote {
    pub addr: SocketAddr,
    pub tcp: bool,
}

impl Remote {
    pub const fn udp(addr: SocketAddr) -> Self {
        Remote { addr, tcp: false }
    }

    pub const fn tcp(addr: SocketAddr) -> Self {
        Remote { addr, tcp: true }
    }

    /// Where `rtc` sends a datagram (or whence it came).
    pub fn of(t: &rtc::shared::TransportContext) -> Self {
        Remote {
            addr: t.peer_addr,
            tcp: t.transport_protocol == rtc::shared::TransportProtocol::TCP,
        }
    }
}

impl std::fmt::Display for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.tcp {
            write!(f, "tcp/{}", self.addr)
        } else {
            write!(f, "{}", self.addr)
        }
    }
}

/// Where the core's datagrams go: the driver's batched UDP socket (and its ICE-TCP
/// connections), or a simulated network.
pub trait Transmit {
    /// A datagram for `to`. `origin`: for forwarded media, when the kernel received its source
    /// packet (the in-core latency is measured from it when the datagram leaves).
    fn send(&mut self, data: BytesMut, to: Remote, origin: Option<Instant>);

    /// An empty buffer for the next datagram: a sink may hand back one it has sent from, so
    /// that a fan-out does not allocate (and free) one per copy. The default allocates
    /// nothing until written.
    fn buffer(&mut self) -> BytesMut {
        BytesMut::new()
    }

    /// Fill in what the sink counts (datagrams sent, dropped, send calls, in-core latency).
    fn report(&self, _stats: &mut CoreStats) {}

    /// One turn's messages for another shard hosting the same rooms (see [`pipe`]). Must
    /// never block: a sink that cannot take them drops them (and counts it). Without other
    /// shards nothing is ever piped; the default drops.
    fn pipe(&mut self, _to: pipe::ShardId, _lane: pipe::Lane, _msgs: Vec<pipe::PipeMsg>) {}
}

/// Whether the core goes on after a command.
#[derive(Debug)]
pub enum Flow {
    Continue,
    /// Shut down: the driver sends what is queued, answers `done` (if any) and stops.
    Stop(Option<oneshot::Sender<()>>),
}

/// Capacity of each participant's signaling event queue.
pub const EVENT_QUEUE: usize = 1024;

/// What one participant may make the core hold or do. Every limit is a configuration setting
/// (`src/config.rs`); hitting one gets the client a clear error and is counted in `/stats` and `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CoreLimits {
    /// Remote ICE candidates accepted per peer connection (more get `limit_exceeded`).
    pub max_remote_candidates: usize,
    /// Tracks one participant may publish at once.
    pub max_published_tracks: usize,
    /// Tracks one participant may be subscribed to at once.
    pub max_subscriptions: usize,
    /// Ids in one `subscribe` / `unsubscribe` message.
    pub max_ids_per_message: usize,
    /// Data-channel messages one participant may send per second, sustained (0: unlimited),
    /// and at once; bytes per second (0: unlimited; bursts of twice this). Over them the
    /// sender gets `rate_limited` and nothing is relayed.
    pub data_message_rate: usize,
    pub data_message_burst: usize,
    pub data_byte_rate: usize,
    /// Client commands the core handles in one turn before it serves the media socket again.
    pub commands_per_turn: usize,
}

impl CoreLimits {
    /// The per-participant data-channel limits.
    pub fn data_rate(&self) -> data::RateLimit {
        let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        data::RateLimit {
            messages_per_sec: clamp(self.data_message_rate),
            message_burst: clamp(self.data_message_burst).max(1),
            bytes_per_sec: self.data_byte_rate as u64,
            byte_burst: (self.data_byte_rate as u64).saturating_mul(2).max(1),
        }
    }
}

impl Default for CoreLimits {
    fn default() -> Self {
        CoreLimits {
            max_remote_candidates: 64,
            max_published_tracks: 16,
            max_subscriptions: 512,
            max_ids_per_message: 512,
            data_message_rate: 100,
            data_message_burst: 200,
            data_byte_rate: 1 << 20,
            commands_per_turn: 64,
        }
    }
}

/// Server-assigned participant id (`PA_...`).
pub type ParticipantId = String;

/// What the WebSocket session asks of the core.
#[derive(Debug)]
pub enum Command {
    Join {
        req: JoinRequest,
        reply: oneshot::Sender<Result<JoinAccepted, SfuError>>,
    },
    /// Any post-join client message (offers, answers, trickle, subscribe, mute, leave).
    Client {
        participant: ParticipantId,
        msg: ClientMessage,
    },
    /// The WebSocket went away (or the client said `leave`).
    Disconnect {
        participant: ParticipantId,
        /// Why, for `participant_left` and webhooks.
        why: LeaveReason,
        /// Why, in words, for the logs.
        reason: String,
    },
    /// Graceful shutdown: tell everyone, close everything, then stop the loop.
    Shutdown { done: oneshot::Sender<()> },
    /// Snapshot of counters for `/healthz` and benchmarks.
    Stats { reply: oneshot::Sender<CoreStats> },
    /// Room administration (the admin API), on this shard's share of what `op` names.
    Admin {
        op: admin::AdminOp,
        reply: oneshot::Sender<Result<admin::AdminReply, admin::AdminError>>,
    },
    /// This shard's share of the operator dashboard ([`core::dashboard`]).
    Dashboard {
        reply: oneshot::Sender<core::dashboard::DashboardSnapshot>,
    },
}

/// A join, as the WebSocket session passes it on.
#[derive(Debug)]
pub struct JoinRequest {
    pub room: String,
    pub name: String,
    pub auto_subscribe: bool,
    /// Where the core sends this participant's signaling events (bounded).
    pub events: mpsc::Sender<ServerMessage>,
    /// Other shards already hosting the room (from [`placement::Placement::reserve`]); empty
    /// with one shard.
    pub peers: Vec<pipe::ShardId>,
    /// Who the participant is (from its access token; unique in the room), if known.
    pub identity: Option<String>,
    /// What the participant may do (from its access token).
    pub grants: Grants,
    /// A publish-only participant (WHIP ingest): no subscriber connection, no data channels,
    /// no `subscribe_offer`; its signaling events go to an HTTP session, not a client. The
    /// connect timeout waits for its publisher connection instead.
    pub publish_only: bool,
    /// A viewer (WHEP playback): what it plays. No data channels, no signaling but the answer
    /// to its offer (sent as `ClientMessage::PublishOffer`, answered with
    /// `ServerMessage::PublishAnswer`: its one connection is the subscriber one, offered by the
    /// client); it gets no room events. Its media sections are bound to tracks by
    /// [`viewing::assign`].
    pub view: Option<viewing::ViewTarget>,
    /// The shard that sequences the room's timeline ([`timeline`]); `None`: this one. Filled
    /// in by the handle from where the room is placed.
    pub home: Option<pipe::ShardId>,
    /// What the participant asked of the room timeline, and the room's settings should this
    /// join open it.
    pub timeline: JoinTimeline,
    /// The signaling session's id (`SE_…`, [`crate::signal::new_session_id`]) for the
    /// participant's log lines and webhook events; empty: none.
    pub session: String,
}

/// A join's room-timeline options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JoinTimeline {
    /// Deliver the room's events on the participant's `chat` channel.
    pub events: bool,
    /// The room's input tick rate, if this join opens the room (`None`: the server's).
    pub input_tick_hz: Option<u32>,
}

/// What a participant may do, from the grants of its access token. The default allows what
/// every participant could do before tokens: join, publish anything, subscribe, send data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grants {
    /// May publish audio tracks.
    pub publish_audio: bool,
    /// May publish video tracks.
    pub publish_video: bool,
    /// May send data-channel messages.
    pub publish_data: bool,
    /// May subscribe to others' tracks.
    pub subscribe: bool,
    /// Others do not see it (a recorder or a bot): no `participant_joined`, not listed.
    pub hidden: bool,
    /// May moderate the room (remove participants, mute their tracks or chat).
    pub room_admin: bool,
}

impl Default for Grants {
    fn default() -> Self {
        Grants {
            publish_audio: true,
            publish_video: true,
            publish_data: true,
            subscribe: true,
            hidden: false,
            room_admin: false,
        }
    }
}

/// A successful join.
#[derive(Debug)]
pub struct JoinAccepted {
    pub participant_id: ParticipantId,
    /// The `joined` message to send to the client first.
    pub joined: ServerMessage,
}

/// How often each [`CoreLimits`] cap refused something (each time the client got an error).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LimitsHit {
    pub remote_candidates: u64,
    pub published_tracks: u64,
    pub subscriptions: u64,
    pub ids_per_message: u64,
    /// Turns in which the core left client commands queued to serve the media socket first.
    pub commands_deferred: u64,
    /// Participants removed because more than `outbox::OUTBOX_MAX` signaling events waited
    /// for them (they did not read their own traffic).
    pub signaling_queue_overflows: u64,
}

impl LimitsHit {
    fn merge(&mut self, o: &LimitsHit) {
        let LimitsHit {
            remote_candidates,
            published_tracks,
            subscriptions,
            ids_per_message,
            commands_deferred,
            signaling_queue_overflows,
        } = o;
        self.remote_candidates += remote_candidates;
        self.published_tracks += published_tracks;
        self.subscriptions += subscriptions;
        self.ids_per_message += ids_per_message;
        self.commands_deferred += commands_deferred;
        self.signaling_queue_overflows += signaling_queue_overflows;
    }
}

/// Counters exported by the core.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CoreStats {
    pub rooms: usize,
    pub participants: usize,
    pub published_tracks: usize,
    pub rtp_packets_in: u64,
    pub rtp_packets_forwarded: u64,
    pub rtp_packets_dropped: u64,
    /// Packets of a track not forwarded to one of its subscribers, by reason (most are
    /// simulcast layers the subscriber does not receive).
    pub forward_dropped: forward::ForwardDrops,
    /// UDP datagrams read from the media socket (ICE-TCP frames count in
    /// `IceTcpStats::frames_in`).
    pub udp_datagrams_in: u64,
    pub udp_datagrams_ignored: u64,
    /// ICE-TCP frames read and not given to any connection.
    pub ice_tcp_frames_ignored: u64,
    /// UDP datagrams the demux could not give to any connection, by reason (part of
    /// `udp_datagrams_ignored`), and refused address re-bindings.
    pub udp_dropped: demux::UdpDrops,
    /// Per-participant caps hit.
    pub limits_hit: LimitsHit,
    /// Log lines dropped by the per-call-site rate limit (see `crate::logging`).
    pub log_lines_suppressed: u64,
    /// Datagrams sent, and dropped because the socket buffer was full (or the send failed).
    pub udp_datagrams_out: u64,
    pub udp_datagrams_out_dropped: u64,
    /// Send system calls made (each sends a batch of datagrams).
    pub udp_send_calls: u64,
    /// Of `udp_datagrams_out`, the datagrams that left as segments of a larger message (UDP
    /// segmentation offload: a run of one size for one destination).
    pub udp_datagrams_segmented: u64,
    pub data_messages_relayed: u64,
    /// Data-channel messages stamped on a room timeline here (this shard is their room's
    /// home), retries dropped as duplicates, and messages for a participant whose channel was
    /// not open yet dropped because too many were waiting.
    pub data_messages_sequenced: u64,
    pub data_duplicates_dropped: u64,
    pub data_queued_dropped: u64,
    /// Messages handed to other shards hosting the same rooms ([`pipe`]), received from them,
    /// and dropped because the receiving shard's queue was full; media packets among those
    /// handed over.
    pub pipe_msgs_out: u64,
    pub pipe_msgs_in: u64,
    pub pipe_msgs_dropped: u64,
    pub rtp_packets_piped: u64,
    /// Keyframe requests (PLI) sent to publishers.
    pub keyframe_requests: u64,
    /// Subscribers' NACKs: sequence numbers asked for, retransmitted, refused (not remembered,
    /// too old, retransmitted too often or too recently) and refused for lack of budget.
    pub nack_requested: u64,
    pub nack_resent: u64,
    pub nack_refused: u64,
    pub nack_over_budget: u64,
    /// Subscribers' losses the NACK responder gave up on (lost for good: not kept, too old,
    /// retransmitted too often, or refused for lack of budget for too long), each answered
    /// like a PLI from that subscriber: a keyframe request for its layer (through the
    /// layer's throttle; at most one per down-track per 500 ms).
    pub nack_unrepairable: u64,
    /// Of `nack_resent`: sent on the down-track's RTX stream (RFC 4588; the subscriber
    /// negotiated RTX) and sent as the original packet on the media SSRC.
    pub nack_resent_rtx: u64,
    pub nack_resent_media: u64,
    /// RTX packets (RFC 4588) from publishers: repairs unwrapped and forwarded as the
    /// original packet (it had not arrived), repairs dropped because the original had, and
    /// padding-only ones (bandwidth probes) dropped.
    pub publisher_rtx_repaired: u64,
    pub publisher_rtx_duplicate: u64,
    pub publisher_rtx_padding: u64,
    /// RTCP datagrams from subscribers taken by the fast path, those rejected (failed
    /// authentication or replay), and malformed RTCP packets inside authenticated datagrams
    /// (skipped; the rest of the compound is still used).
    pub subscriber_rtcp_in: u64,
    pub subscriber_rtcp_rejected: u64,
    pub subscriber_rtcp_malformed: u64,
    /// Publishers' RTP packets forwarded by the publisher fast path, handed to `rtc` (their
    /// SSRC not yet bound to a track) and rejected (authentication, replay, unparseable).
    pub publisher_rtp_fast: u64,
    pub publisher_rtp_to_rtc: u64,
    pub publisher_rtp_rejected: u64,
    /// RTCP datagrams from publishers taken by the fast path, and those rejected.
    pub publisher_rtcp_in: u64,
    pub publisher_rtcp_rejected: u64,
    /// Feedback sent to publishers: sequence numbers asked for in NACKs, TWCC feedback
    /// packets, receiver report packets.
    pub nack_sent_to_publishers: u64,
    pub twcc_feedback_sent: u64,
    pub receiver_reports_sent: u64,
    /// ICE restarts done, on publisher and subscriber connections (see `core::ice`).
    pub ice_restarts: u64,
    /// Bandwidth probing (see `transport::probe`): clusters started, succeeded and failed,
    /// and the padding-only packets (and their padding bytes) sent for them.
    pub probe_clusters: u64,
    pub probe_clusters_succeeded: u64,
    pub probe_clusters_failed: u64,
    pub probe_padding_packets: u64,
    pub probe_padding_bytes: u64,
    /// Time forwarded RTP packets spent in the server: read from the socket → handed to the
    /// kernel, over the process life (subtract two snapshots' buckets for a window).
    pub forward_latency: latency::LatencySnapshot,
    /// Time relayed data-channel messages spent in the server on the shard that delivered
    /// them: the turn that took (or received from the room's home) the message → the first
    /// datagram carrying it handed to the kernel; one sample per such datagram (messages sent
    /// together share one).
    pub data_relay_latency: latency::LatencySnapshot,
    /// ICE-TCP connections (filled in by the driver).
    pub ice_tcp: IceTcpStats,
    /// Per shard, in shard order (filled in by [`SfuHandle::stats`]).
    pub shards: Vec<ShardStats>,
}

/// ICE over TCP (RFC 6544, passive): the driver's connections and the frames they carried.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct IceTcpStats {
    /// Connections open now, accepted in all, and refused (over the per-shard cap).
    pub open: u64,
    pub accepted: u64,
    pub refused: u64,
    /// Connections closed: no valid STUN in time (or a first frame that was not STUN), a
    /// frame over the size limit, no frame for the idle time.
    pub closed_no_stun: u64,
    pub closed_oversize: u64,
    pub closed_idle: u64,
    /// Frames (ICE, DTLS, SRTP packets) read and written, and dropped because the
    /// connection's write queue was full.
    pub frames_in: u64,
    pub frames_out: u64,
    pub frames_dropped: u64,
}

impl IceTcpStats {
    fn merge(&mut self, o: &IceTcpStats) {
        let IceTcpStats {
            open,
            accepted,
            refused,
            closed_no_stun,
            closed_oversize,
            closed_idle,
            frames_in,
            frames_out,
            frames_dropped,
        } = o;
        self.open += open;
        self.accepted += accepted;
        self.refused += refused;
        self.closed_no_stun += closed_no_stun;
        self.closed_oversize += closed_oversize;
        self.closed_idle += closed_idle;
        self.frames_in += frames_in;
        self.frames_out += frames_out;
        self.frames_dropped += frames_dropped;
    }
}

/// One shard's share of the work.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ShardStats {
    pub rooms: usize,
    pub participants: usize,
    pub rtp_packets_forwarded: u64,
    pub udp_datagrams_out: u64,
}

impl CoreStats {
    /// Add another shard's counters to these.
    pub fn merge(&mut self, other: &CoreStats) {
        // Destructured so that a new counter cannot be forgotten here.
        let CoreStats {
            rooms,
            participants,
            published_tracks,
            rtp_packets_in,
            rtp_packets_forwarded,
            rtp_packets_dropped,
            forward_dropped,
            udp_datagrams_in,
            udp_datagrams_ignored,
            ice_tcp_frames_ignored,
            udp_dropped,
            limits_hit,
            log_lines_suppressed,
            udp_datagrams_out,
            udp_datagrams_out_dropped,
            udp_send_calls,
            udp_datagrams_segmented,
            data_messages_relayed,
            data_messages_sequenced,
            data_duplicates_dropped,
            data_queued_dropped,
            pipe_msgs_out,
            pipe_msgs_in,
            pipe_msgs_dropped,
            rtp_packets_piped,
            keyframe_requests,
            nack_requested,
            nack_resent,
            nack_refused,
            nack_over_budget,
            nack_unrepairable,
            nack_resent_rtx,
            nack_resent_media,
            publisher_rtx_repaired,
            publisher_rtx_duplicate,
            publisher_rtx_padding,
            subscriber_rtcp_in,
            subscriber_rtcp_rejected,
            subscriber_rtcp_malformed,
            publisher_rtp_fast,
            publisher_rtp_to_rtc,
            publisher_rtp_rejected,
            publisher_rtcp_in,
            publisher_rtcp_rejected,
            nack_sent_to_publishers,
            twcc_feedback_sent,
            receiver_reports_sent,
            ice_restarts,
            probe_clusters,
            probe_clusters_succeeded,
            probe_clusters_failed,
            probe_padding_packets,
            probe_padding_bytes,
            forward_latency,
            data_relay_latency,
            ice_tcp,
            shards,
        } = other;
        self.rooms += rooms;
        self.participants += participants;
        self.published_tracks += published_tracks;
        self.rtp_packets_in += rtp_packets_in;
        self.rtp_packets_forwarded += rtp_packets_forwarded;
        self.rtp_packets_dropped += rtp_packets_dropped;
        self.udp_datagrams_in += udp_datagrams_in;
        self.udp_datagrams_ignored += udp_datagrams_ignored;
        self.ice_tcp_frames_ignored += ice_tcp_frames_ignored;
        self.udp_datagrams_out += udp_datagrams_out;
        self.udp_datagrams_out_dropped += udp_datagrams_out_dropped;
        self.udp_send_calls += udp_send_calls;
        self.udp_datagrams_segmented += udp_datagrams_segmented;
        self.data_messages_relayed += data_messages_relayed;
        self.data_messages_sequenced += data_messages_sequenced;
        self.data_duplicates_dropped += data_duplicates_dropped;
        self.data_queued_dropped += data_queued_dropped;
        self.pipe_msgs_out += pipe_msgs_out;
        self.pipe_msgs_in += pipe_msgs_in;
        self.pipe_msgs_dropped += pipe_msgs_dropped;
        self.rtp_packets_piped += rtp_packets_piped;
        self.keyframe_requests += keyframe_requests;
        self.nack_requested += nack_requested;
        self.nack_resent += nack_resent;
        self.nack_refused += nack_refused;
        self.nack_over_budget += nack_over_budget;
        self.nack_unrepairable += nack_unrepairable;
        self.nack_resent_rtx += nack_resent_rtx;
        self.nack_resent_media += nack_resent_media;
        self.publisher_rtx_repaired += publisher_rtx_repaired;
        self.publisher_rtx_duplicate += publisher_rtx_duplicate;
        self.publisher_rtx_padding += publisher_rtx_padding;
        self.subscriber_rtcp_in += subscriber_rtcp_in;
        self.subscriber_rtcp_rejected += subscriber_rtcp_rejected;
        self.subscriber_rtcp_malformed += subscriber_rtcp_malformed;
        self.publisher_rtp_fast += publisher_rtp_fast;
        self.publisher_rtp_to_rtc += publisher_rtp_to_rtc;
        self.publisher_rtp_rejected += publisher_rtp_rejected;
        self.publisher_rtcp_in += publisher_rtcp_in;
        self.publisher_rtcp_rejected += publisher_rtcp_rejected;
        self.nack_sent_to_publishers += nack_sent_to_publishers;
        self.twcc_feedback_sent += twcc_feedback_sent;
        self.receiver_reports_sent += receiver_reports_sent;
        self.ice_restarts += ice_restarts;
        self.probe_clusters += probe_clusters;
        self.probe_clusters_succeeded += probe_clusters_succeeded;
        self.probe_clusters_failed += probe_clusters_failed;
        self.probe_padding_packets += probe_padding_packets;
        self.probe_padding_bytes += probe_padding_bytes;
        self.udp_dropped.merge(udp_dropped);
        self.forward_dropped.merge(forward_dropped);
        self.limits_hit.merge(limits_hit);
        self.forward_latency.merge(forward_latency);
        self.data_relay_latency.merge(data_relay_latency);
        self.ice_tcp.merge(ice_tcp);
        // Process-wide already, not per shard.
        self.log_lines_suppressed = self.log_lines_suppressed.max(*log_lines_suppressed);
        self.shards.extend(shards.iter().cloned());
    }
}

/// Errors at the core's boundary.
#[derive(Debug, thiserror::Error)]
pub enum SfuError {
    #[error("invalid join: {0}")]
    InvalidJoin(String),
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("the SFU core is overloaded")]
    Overloaded,
    #[error("webrtc: {0}")]
    Rtc(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The join would open a room past the server's `max_rooms`.
    #[error("{0}")]
    TooManyRooms(String),
    /// The room has `max_participants_per_room` participants.
    #[error("{0}")]
    RoomFull(String),
}

impl From<placement::Refusal> for SfuError {
    fn from(r: placement::Refusal) -> Self {
        match r {
            placement::Refusal::TooManyRooms { .. } => SfuError::TooManyRooms(r.to_string()),
            placement::Refusal::RoomFull { .. } => SfuError::RoomFull(r.to_string()),
        }
    }
}

/// A place in a room's shard, held while a join is on its way.
struct Reservation<'a> {
    handle: &'a SfuHandle,
    room: &'a str,
    shard: usize,
    held: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if self.held {
            self.handle.placement().join_failed(self.room, self.shard);
        }
    }
}

/// Cloneable handle to the core's shards: joins go to the shard of their room
/// ([`placement::Placement`]), everything a participant sends after to its shard.
#[derive(Debug, Clone)]
#[allow(clippy::disallowed_types)] // signaling side: shared by the WebSocket sessions, never on the packet path
pub struct SfuHandle {
    shards: std::sync::Arc<[mpsc::Sender<Command>]>,
    // Signaling side only (taken around joins, leaves and each client message); the packet
    // path never sees it.
    placement: std::sync::Arc<std::sync::Mutex<placement::Placement>>,
    /// Webhook events from the HTTP side (WHIP/WHEP sessions) and their counters.
    webhooks: Option<crate::webhook::Emitter>,
    /// The shards' pipes to and from other nodes, until the node link takes them.
    node_pipe: std::sync::Arc<std::sync::Mutex<Option<pipe::NodePipe>>>,
}

#[allow(clippy::disallowed_types)] // as above
impl SfuHandle {
    /// A handle to one core.
    pub fn new(tx: mpsc::Sender<Command>) -> Self {
        Self::sharded(vec![tx], 0)
    }

    /// A handle to several shards (at least one); a room spreads over them from
    /// `spread_above` participants (0: never).
    pub fn sharded(shards: Vec<mpsc::Sender<Command>>, spread_above: usize) -> Self {
        let n = shards.len();
        SfuHandle {
            shards: shards.into(),
            placement: std::sync::Arc::new(std::sync::Mutex::new(placement::Placement::new(
                n,
                spread_above,
            ))),
            webhooks: None,
            node_pipe: std::sync::Arc::default(),
        }
    }

    /// With the shards' pipes to other nodes (for [`SfuHandle::take_node_pipe`]).
    pub fn with_node_pipe(self, pipe: pipe::NodePipe) -> Self {
        *self
            .node_pipe
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(pipe);
        self
    }

    /// The shards' pipes to other nodes, for the node link (once).
    pub fn take_node_pipe(&self) -> Option<pipe::NodePipe> {
        self.node_pipe
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    /// A shard of another node greeted this node's entry for `room`: where the greeting goes
    /// (see [`placement::Placement::entry_hello`]).
    pub fn entry_hello(&self, room: &str, from: pipe::ShardId) -> placement::Fanout {
        self.placement().entry_hello(room, from)
    }

    /// The room's shards here, and whether each is its home.
    pub fn entry_targets(&self, room: &str) -> Vec<(pipe::ShardId, bool)> {
        self.placement().entry_targets(room)
    }

    /// A shard of another node no longer hosts `room`.
    pub fn remote_bye(&self, room: &str, from: pipe::ShardId) {
        self.placement().remote_bye(room, from);
    }

    /// The node numbered `node` is gone: the rooms whose home was there, and their new home.
    pub fn node_gone(&self, node: u32) -> Vec<(String, pipe::ShardId)> {
        self.placement().node_gone(node)
    }

    /// The rooms open here whose home is here (in a cluster: those whose lease this node
    /// holds), with their participants here.
    pub fn homed_rooms(&self) -> Vec<(String, usize)> {
        self.placement().homed_room_sizes()
    }

    /// With webhook events going to `emitter` (`None`: off).
    pub fn with_webhooks(mut self, emitter: Option<crate::webhook::Emitter>) -> Self {
        self.webhooks = emitter;
        self
    }

    /// Where webhook events go, if webhooks are on.
    pub fn webhooks(&self) -> Option<&crate::webhook::Emitter> {
        self.webhooks.as_ref()
    }

    fn placement(&self) -> std::sync::MutexGuard<'_, placement::Placement> {
        // A panic while holding the lock leaves consistent bookkeeping (every method finishes
        // its update before it can fail): go on with it.
        self.placement
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The per-server join caps (rooms, participants per room); 0 is unlimited. Applies to
    /// later joins.
    pub fn set_join_caps(&self, caps: placement::JoinCaps) {
        self.placement().set_caps(caps);
    }

    /// The shard a participant's commands go to (the first for an unknown one: it answers
    /// nothing, as for any unknown participant).
    fn shard_of(&self, participant: &str) -> &mpsc::Sender<Command> {
        let i = self.placement().shard_of(participant).unwrap_or(0);
        &self.shards[i.min(self.shards.len() - 1)]
    }

    /// Participants (joined or joining) in `room` on this server.
    pub fn room_size(&self, room: &str) -> usize {
        self.placement().room_size(room)
    }

    /// This server's load for a join of `room`: its participants there and in all.
    pub fn local_load(&self, room: &str) -> crate::cluster::placement::LocalLoad {
        let p = self.placement();
        crate::cluster::placement::LocalLoad {
            room: p.room_size(room),
            participants: p.load().iter().sum(),
        }
    }

    /// The names of the rooms open on this server (with participants joined or joining).
    pub fn room_names(&self) -> Vec<String> {
        self.placement().room_names()
    }

    /// Number of shards.
    pub fn shards(&self) -> usize {
        self.shards.len()
    }

    /// Join a room. The `events` channel in `req` receives everything after `joined`.
    pub async fn join(&self, mut req: JoinRequest) -> Result<JoinAccepted, SfuError> {
        let room = req.room.clone();
        let identity = req.identity.clone();
        // Refused past the per-server caps before anything is held or sent.
        // (A room extended here from another node names that node's entry as its home.)
        let remote_home = req.home.filter(|&h| pipe::split_remote(h).is_some());
        let placement::Place { shard, peers, home } =
            self.placement()
                .reserve_in(&room, identity.as_deref(), remote_home)?;
        req.peers = peers;
        req.home = (home != shard).then_some(home);
        // Given back if the join fails, or if this future is dropped before the answer (the
        // session went away mid-join; the core then removes the participant on its own).
        let mut reservation = Reservation {
            handle: self,
            room: &room,
            shard,
            held: true,
        };
        let res = self.join_on(shard, req).await;
        if let Ok(ok) = &res {
            self.placement()
                .joined(&ok.participant_id, &room, shard, identity.as_deref());
            reservation.held = false;
        }
        res
    }

    async fn join_on(&self, shard: usize, req: JoinRequest) -> Result<JoinAccepted, SfuError> {
        let (reply, rx) = oneshot::channel();
        self.shards[shard]
            .send(Command::Join { req, reply })
            .await
            .map_err(|_| SfuError::ShuttingDown)?;
        rx.await.map_err(|_| SfuError::ShuttingDown)?
    }

    /// Pass a post-join client message to the core. Replies arrive on the events channel.
    pub async fn client(&self, participant: &str, msg: ClientMessage) -> Result<(), SfuError> {
        self.shard_of(participant)
            .send(Command::Client {
                participant: participant.to_owned(),
                msg,
            })
            .await
            .map_err(|_| SfuError::ShuttingDown)
    }

    /// The participant's WebSocket is gone.
    pub async fn disconnect(&self, participant: &str, why: LeaveReason, reason: &str) {
        let tx = self.shard_of(participant).clone();
        self.placement().left(participant);
        let _ = tx
            .send(Command::Disconnect {
                participant: participant.to_owned(),
                why,
                reason: reason.to_owned(),
            })
            .await;
    }

    /// Ask every shard to shut down gracefully; resolves when all have.
    pub async fn shutdown(&self) {
        let mut waits = Vec::new();
        for tx in self.shards.iter() {
            let (done, rx) = oneshot::channel();
            if tx.send(Command::Shutdown { done }).await.is_ok() {
                waits.push(rx);
            }
        }
        for rx in waits {
            let _ = rx.await;
        }
    }

    /// Room administration: `op` goes to the shard of the participant it names, to every shard
    /// hosting the room it names, or (listing rooms) to every shard; the answers are merged.
    pub async fn admin(&self, op: admin::AdminOp) -> Result<admin::AdminReply, admin::AdminError> {
        use admin::{AdminError, AdminOp, AdminReply, RoomSummary, Target};
        // Data from the server goes on the room's timeline: to its home, the recipients
        // named by participant id.
        if let AdminOp::SendData {
            room,
            lane,
            is_text,
            payload,
            to,
        } = &op
        {
            let named = !to.is_empty();
            let (home, to) = {
                let placement = self.placement();
                // (A room extended here from another node: one of its shards here, which
                // hands the message to the home.)
                let Some(home) = placement
                    .home_of(room)
                    .filter(|&h| h < self.shards.len())
                    .or_else(|| placement.room_shards(room).first().copied())
                else {
                    return Err(AdminError::RoomNotFound(room.to_owned()));
                };
                let to: Vec<Target> = to
                    .iter()
                    .filter_map(|t| placement.locate(room, t))
                    .map(|(_, pid)| Target::Participant(pid))
                    .collect();
                (home, to)
            };
            if named && to.is_empty() {
                return Ok(AdminReply::Done { participants: 0 });
            }
            let op = AdminOp::SendData {
                room: room.clone(),
                lane: *lane,
                is_text: *is_text,
                payload: payload.clone(),
                to,
            };
            return self.admin_on(home, op).await;
        }
        let shards: Vec<usize> = match (&op, op.room(), op.target()) {
            (_, Some(room), Some(target)) => {
                let Some((shard, pid)) = self.placement().locate(room, target) else {
                    if self.placement().room_shards(room).is_empty() {
                        return Err(AdminError::RoomNotFound(room.to_owned()));
                    }
                    return Err(AdminError::ParticipantNotFound(target.to_string()));
                };
                let op = op.with_target(Target::Participant(pid));
                return self.admin_on(shard, op).await;
            }
            (_, Some(room), None) => self.placement().room_shards(room),
            (_, None, _) => (0..self.shards.len()).collect(),
        };
        if let Some(room) = op.room().filter(|_| shards.is_empty()) {
            return Err(AdminError::RoomNotFound(room.to_owned()));
        }
        let mut replies = Vec::with_capacity(shards.len());
        for shard in shards {
            match self.admin_on(shard, op.clone()).await {
                // (The room closed there meanwhile.)
                Err(AdminError::RoomNotFound(_)) => {}
                other => replies.push(other?),
            }
        }
        if replies.is_empty() {
            return Err(AdminError::RoomNotFound(
                op.room().unwrap_or_default().to_owned(),
            ));
        }
        Ok(match op {
            AdminOp::ListRooms => {
                let mut rooms: std::collections::BTreeMap<String, RoomSummary> =
                    std::collections::BTreeMap::new();
                for reply in replies {
                    let AdminReply::Rooms(list) = reply else {
                        continue;
                    };
                    for r in list {
                        match rooms.get_mut(&r.name) {
                            Some(m) => {
                                m.participants += r.participants;
                                m.tracks += r.tracks;
                                m.shards += r.shards;
                                m.created_at = m.created_at.min(r.created_at);
                            }
                            None => {
                                rooms.insert(r.name.clone(), r);
                            }
                        }
                    }
                }
                AdminReply::Rooms(rooms.into_values().collect())
            }
            AdminOp::ListParticipants { .. } => {
                let mut all: Vec<_> = replies
                    .into_iter()
                    .flat_map(|r| match r {
                        AdminReply::Participants(list) => list,
                        _ => Vec::new(),
                    })
                    .collect();
                all.sort_by(|a, b| {
                    (a.joined_at, &a.participant_id).cmp(&(b.joined_at, &b.participant_id))
                });
                AdminReply::Participants(all)
            }
            _ => AdminReply::Done {
                participants: replies
                    .iter()
                    .map(|r| match r {
                        AdminReply::Done { participants } => *participants,
                        _ => 0,
                    })
                    .sum(),
            },
        })
    }

    async fn admin_on(
        &self,
        shard: usize,
        op: admin::AdminOp,
    ) -> Result<admin::AdminReply, admin::AdminError> {
        let (reply, rx) = oneshot::channel();
        self.shards[shard.min(self.shards.len() - 1)]
            .send(Command::Admin { op, reply })
            .await
            .map_err(|_| admin::AdminError::ShuttingDown)?;
        rx.await.map_err(|_| admin::AdminError::ShuttingDown)?
    }

    /// The operator dashboard's view of every room, merged over the shards (a room spread
    /// over several appears once).
    pub async fn dashboard(&self) -> Result<core::dashboard::DashboardSnapshot, SfuError> {
        let mut total = core::dashboard::DashboardSnapshot::default();
        for tx in self.shards.iter() {
            let (reply, rx) = oneshot::channel();
            tx.send(Command::Dashboard { reply })
                .await
                .map_err(|_| SfuError::ShuttingDown)?;
            total.merge(rx.await.map_err(|_| SfuError::ShuttingDown)?);
        }
        Ok(total)
    }

    /// Current counters, summed over the shards.
    pub async fn stats(&self) -> Result<CoreStats, SfuError> {
        let mut total: Option<CoreStats> = None;
        let mut per_shard = Vec::with_capacity(self.shards.len());
        for tx in self.shards.iter() {
            let (reply, rx) = oneshot::channel();
            tx.send(Command::Stats { reply })
                .await
                .map_err(|_| SfuError::ShuttingDown)?;
            let s = rx.await.map_err(|_| SfuError::ShuttingDown)?;
            per_shard.push(ShardStats {
                participants: s.participants,
                rooms: s.rooms,
                rtp_packets_forwarded: s.rtp_packets_forwarded,
                udp_datagrams_out: s.udp_datagrams_out,
            });
            match total.as_mut() {
                None => total = Some(s),
                Some(t) => t.merge(&s),
            }
        }
        let mut total = total.unwrap_or_default();
        total.shards = per_shard;
        Ok(total)
    }
}

#[cfg(test)]
// Tests share the handle across tasks.
#[allow(clippy::disallowed_types, clippy::disallowed_methods)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn join_req(room: &str) -> (JoinRequest, mpsc::Receiver<ServerMessage>) {
        let (events, rx) = mpsc::channel(8);
        (
            JoinRequest {
                room: room.into(),
                name: "n".into(),
                auto_subscribe: true,
                events,
                peers: Vec::new(),
                identity: None,
                grants: Grants::default(),
                publish_only: false,
                view: None,
                home: None,
                timeline: Default::default(),
                session: String::new(),
            },
            rx,
        )
    }

    /// A join whose session goes away before the core answers gives its place back: the room
    /// is not pinned to its shard forever, and the shard's load is right.
    #[tokio::test]
    async fn an_abandoned_join_gives_its_place_back() {
        let (tx0, mut rx0) = mpsc::channel(8);
        let (tx1, _rx1) = mpsc::channel(8);
        let handle = SfuHandle::sharded(vec![tx0, tx1], 0);
        let (req, _events) = join_req("r");
        let abandoned = tokio::time::timeout(Duration::from_millis(50), handle.join(req)).await;
        assert!(abandoned.is_err(), "no core answered");
        assert!(matches!(rx0.try_recv(), Ok(Command::Join { .. })));
        assert_eq!(handle.placement().load(), &[0, 0]);
        assert!(handle.placement().room_shards("r").is_empty());

        // A join the core refuses gives it back too; one it accepts keeps it.
        let (req, _events) = join_req("r");
        let refused = tokio::spawn({
            let h = handle.clone();
            async move { h.join(req).await }
        });
        match rx0.recv().await {
            Some(Command::Join { reply, .. }) => {
                let _ = reply.send(Err(SfuError::InvalidJoin("no".into())));
            }
            other => panic!("{other:?}"),
        }
        assert!(refused.await.unwrap().is_err());
        assert_eq!(handle.placement().load(), &[0, 0]);
        let (req, _events) = join_req("r");
        let accepted = tokio::spawn({
            let h = handle.clone();
            async move { h.join(req).await }
        });
        match rx0.recv().await {
            Some(Command::Join { reply, .. }) => {
                let _ = reply.send(Ok(JoinAccepted {
                    participant_id: "PA_1".into(),
                    joined: ServerMessage::pong(None, std::time::SystemTime::UNIX_EPOCH),
                }));
            }
            other => panic!("{other:?}"),
        }
        assert!(accepted.await.unwrap().is_ok());
        assert_eq!(handle.placement().load(), &[1, 0]);
        assert_eq!(handle.placement().shard_of("PA_1"), Some(0));
        handle.disconnect("PA_1", LeaveReason::Left, "bye").await;
        assert_eq!(handle.placement().load(), &[0, 0]);
    }
}
