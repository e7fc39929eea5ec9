//! The signaling protocol: JSON messages over the WebSocket at `/rtc`.
//!
//! Every message is a JSON object with a `type` field (snake_case). The protocol is versioned
//! by [`PROTOCOL_VERSION`]; a client may send the version it speaks in `join.protocol`, and the
//! server refuses a major version it does not know. `signaling/README.md` documents every message.
//!
//! Two peer connections per participant:
//! - **publisher** (client offers, server answers): `publish_offer` → `publish_answer`;
//! - **subscriber** (server offers, client answers): `subscribe_offer` → `subscribe_answer`.
//!
//! ICE candidates trickle both ways in `trickle`, tagged with the peer connection they belong to.

use serde::{Deserialize, Serialize};

/// The protocol version this server speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Which of a participant's two peer connections a message is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PcTarget {
    /// The connection the participant sends media on (client offers).
    Publisher,
    /// The connection the participant receives media and data channels on (server offers).
    Subscriber,
}

/// An ICE candidate, in the browser's `RTCIceCandidateInit` JSON shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct IceCandidate {
    /// The `candidate:` line; an empty string means end-of-candidates.
    pub candidate: String,
    #[serde(rename = "sdpMid", default, skip_serializing_if = "Option::is_none")]
    pub sdp_mid: Option<String>,
    #[serde(
        rename = "sdpMLineIndex",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub sdp_mline_index: Option<u16>,
    #[serde(
        rename = "usernameFragment",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub username_fragment: Option<String>,
}

/// A STUN or TURN server, in the browser's `RTCIceServer` JSON shape (hand it to
/// `new RTCPeerConnection({ iceServers })` as is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceServer {
    /// `turn:host:3478?transport=udp`, `turns:host:443?transport=tcp`, `stun:host:3478`, …
    pub urls: Vec<String>,
    /// TURN only: `<expiry unix seconds>:<participant id>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// TURN only: base64(HMAC-SHA1(the secret shared with the TURN server, username)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// A simulcast quality level. Layers are ranked by what they carry (resolution, then
/// bitrate), never by the order of the RID list: the smallest is `low`, the largest `high`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quality {
    Low,
    Medium,
    High,
}

/// Media kind of a track.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrackKind {
    Audio,
    Video,
}

/// A published track as the room sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackInfo {
    /// Server-assigned track id (`TR_...`). On the subscriber connection the forwarded
    /// track's MediaStreamTrack id is this id and its stream id is the publisher's participant id.
    pub id: String,
    /// Participant id of the publisher.
    pub participant_id: String,
    pub kind: TrackKind,
    /// Codec mime type, e.g. `video/VP8`, `audio/opus`.
    pub mime_type: String,
    /// The publisher's own track id (the `msid` track id in its offer), so a client can map
    /// its local tracks to server ids.
    pub client_track_id: String,
    pub muted: bool,
    /// Simulcast layers offered by the publisher (RIDs), empty when not simulcast.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<String>,
}

/// A participant as the room sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParticipantInfo {
    /// Server-assigned participant id (`PA_...`).
    pub id: String,
    /// Display name given at join.
    pub name: String,
    pub tracks: Vec<TrackInfo>,
}

/// What a participant may do: the grants of its access token, as a room admin may have
/// changed them since.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permissions {
    pub publish_audio: bool,
    pub publish_video: bool,
    pub publish_data: bool,
    pub subscribe: bool,
    pub hidden: bool,
    pub room_admin: bool,
    /// Its `chat` messages are refused (a room admin muted its chat).
    pub chat_muted: bool,
}

/// Messages from a client to the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    /// First message on a connection: join (and create, if needed) a room.
    Join {
        /// The room; empty or absent: the access token's room.
        #[serde(default)]
        room: String,
        /// Display name; used when the access token names none. Empty or absent: the token's
        /// name, else its identity.
        #[serde(default)]
        name: String,
        /// Access token (a JWT, see `crate::auth`); required.
        #[serde(default)]
        token: Option<String>,
        /// Protocol version the client speaks; defaults to the server's.
        #[serde(default)]
        protocol: Option<u32>,
        /// Subscribe to every track in the room automatically (default true).
        #[serde(default)]
        auto_subscribe: Option<bool>,
        /// Also receive the room's events on the `chat` channel, on the room timeline
        /// (default false).
        #[serde(default)]
        timeline_events: Option<bool>,
    },
    /// Offer for the publisher peer connection (initial or renegotiation).
    PublishOffer { sdp: String },
    /// Answer to the server's `subscribe_offer`.
    SubscribeAnswer { sdp: String },
    /// A local ICE candidate of the client's `target` connection.
    Trickle {
        target: PcTarget,
        candidate: IceCandidate,
    },
    /// Restart ICE on one of the participant's connections (its network changed, or the
    /// connection went `disconnected`/`failed`), keeping its tracks, DTLS and SRTP.
    /// `subscriber`: the server sends a `subscribe_offer` with new ICE credentials; answer it
    /// as usual. `publisher`: the client is that connection's offerer, so it restarts with a
    /// `publish_offer` made with `createOffer({ iceRestart: true })` (or after
    /// `RTCPeerConnection.restartIce()`); this message, sent first, only fetches fresh TURN
    /// credentials (`ice_servers`) for it.
    IceRestart { target: PcTarget },
    /// Subscribe to (or unsubscribe from) tracks by server id.
    Subscribe {
        track_ids: Vec<String>,
        subscribe: bool,
    },
    /// Mute or unmute one of the participant's own published tracks. A room admin may name
    /// another participant's track: the server stops (or resumes) forwarding it, and its
    /// publisher cannot unmute it until an admin does.
    Mute { track_id: String, muted: bool },
    /// Room admins only: remove a participant from the room (it gets `leave` with the reason).
    RemoveParticipant {
        participant_id: String,
        #[serde(default)]
        reason: Option<String>,
    },
    /// Room admins only: mute (or unmute) a participant's chat: its `chat` data-channel
    /// messages are refused (`permission_denied`) until unmuted.
    MuteChat { participant_id: String, muted: bool },
    /// Per-subscription preferences for a video track (simulcast layer selection): the
    /// highest quality wanted and/or the pixel size of the element it is rendered into.
    /// `quality`: absent = keep the cap if a size is given (remove it otherwise), `null` =
    /// no cap ("best available"), a value = that cap. A size given replaces the previous one.
    TrackSettings {
        track_id: String,
        #[serde(
            default,
            deserialize_with = "present_or_null",
            skip_serializing_if = "Option::is_none"
        )]
        quality: Option<Option<Quality>>,
        #[serde(default)]
        width: Option<u32>,
        #[serde(default)]
        height: Option<u32>,
    },
    /// Keep-alive / latency probe; answered with `pong` carrying the same `ts`.
    Ping {
        #[serde(default)]
        ts: Option<f64>,
    },
    /// Replay the room's `chat` timeline after `since` (on the `chat` channel); answered with
    /// `history`.
    History { since: u64 },
    /// Leave the room; the server closes both peer connections and the WebSocket.
    Leave,
    /// First message on a new connection after the previous one dropped: continue as the same
    /// participant (same id, tracks, subscriptions and peer connections). `received`: how many
    /// server messages the client got in this participant's session, `joined` being the first;
    /// the server sends the ones after them again.
    Resume {
        participant_id: String,
        resume_token: String,
        received: u64,
    },
}

/// A new session id, `SE_` and 12 letters and digits (random): one per WebSocket connection
/// (a resumed one takes the id of the session it resumes) and per WHIP/WHEP session. Every log
/// line of the session, in signaling and in the core, carries it as `session`, and so do the
/// webhook events of its participant; `joined` returns it (`session_id`).
pub fn new_session_id() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    format!("SE_{}", Alphanumeric.sample_string(&mut rand::rng(), 12))
}

/// Why a participant left its room: `participant_left`'s `reason`, and the webhook
/// `participant_left` event's. New reasons may be added: treat an unknown one like `left`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaveReason {
    /// The client said `leave`, closed its WebSocket with a close frame, or ended its
    /// WHIP/WHEP session (`DELETE`).
    #[default]
    Left,
    /// Its WebSocket was lost (no close frame) and not resumed within the grace period.
    Disconnected,
    /// A room admin (`remove_participant`) or the admin API removed it.
    Removed,
    /// The admin API closed the room (or the shard it was relayed from closed it).
    RoomClosed,
    /// A new session joined with the same identity and took its place.
    Replaced,
    /// Its media transport (ICE + DTLS) did not connect in time after the join.
    ConnectTimeout,
    /// A connected peer connection failed (ICE consent lost or DTLS closed).
    IceFailed,
    /// It did not read its signaling messages fast enough (its queue overflowed).
    SignalingOverflow,
    /// Its session could not go on: an offer refused, a media path that could not start, a
    /// resume whose missed messages were gone.
    Error,
    /// The server shut down.
    Shutdown,
}

impl LeaveReason {
    /// The wire name (`snake_case`), for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Left => "left",
            Self::Disconnected => "disconnected",
            Self::Removed => "removed",
            Self::RoomClosed => "room_closed",
            Self::Replaced => "replaced",
            Self::ConnectTimeout => "connect_timeout",
            Self::IceFailed => "ice_failed",
            Self::SignalingOverflow => "signaling_overflow",
            Self::Error => "error",
            Self::Shutdown => "shutdown",
        }
    }
}

impl std::fmt::Display for LeaveReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Messages from the server to a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMessage {
    /// Reply to `join`.
    Joined {
        protocol: u32,
        server_version: String,
        room: String,
        participant_id: String,
        /// The other participants already in the room, with their tracks.
        participants: Vec<ParticipantInfo>,
        /// Largest data-channel payload (bytes) the server relays.
        max_data_message: usize,
        /// Proves the participant's identity for `resume` after a dropped connection.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume_token: Option<String>,
        /// How long (ms) the participant is kept after its connection dropped, waiting for a
        /// `resume`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        resume_grace_ms: Option<u64>,
        /// STUN/TURN servers for both of the client's peer connections, with time-limited
        /// TURN credentials (`src/turn.rs`). Absent (empty) when the server has none configured.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        ice_servers: Vec<IceServer>,
        /// The room's input tick rate (0: inputs are relayed one by one).
        #[serde(default)]
        input_tick_hz: u32,
        /// The session's id (`SE_…`): every server log line of this session carries it; quote
        /// it in a bug report. Kept across `resume`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session_id: Option<String>,
        /// In a cluster: the id of the node the session lives on (absent on a single node).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        node_id: Option<String>,
    },
    /// Reply to `join` on a node of a cluster that does not host the room: join there
    /// instead, with the same `join` (tokens work on every node). The server closes the
    /// WebSocket after it (code 1000, reason `redirected`). Not counted in `received`.
    Redirect {
        room: String,
        /// The node that hosts the room.
        node_id: String,
        /// Its HTTP/WebSocket address, `host:port`: the client keeps its URL's scheme and path
        /// and replaces the host and port with this.
        address: String,
    },
    /// Reply to an accepted `resume`; the messages the client missed follow, then the session
    /// goes on. Not counted in `received`.
    Resumed {
        participant_id: String,
        room: String,
        /// How many missed messages follow.
        replayed: u64,
        /// The session's id (`SE_…`), the one `joined` gave: a resumed session keeps it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session_id: Option<String>,
    },
    /// Reply to `history`: what part of the asked history is kept, and how many messages are
    /// replayed on `chat`.
    History {
        since: u64,
        oldest: u64,
        latest: u64,
        replayed: u64,
        complete: bool,
    },
    ParticipantJoined {
        participant: ParticipantInfo,
    },
    ParticipantLeft {
        participant_id: String,
        /// Why it left (absent from servers before it was added: read as `left`).
        #[serde(default)]
        reason: LeaveReason,
    },
    TrackPublished {
        track: TrackInfo,
    },
    TrackUnpublished {
        track_id: String,
        participant_id: String,
    },
    TrackMuted {
        track_id: String,
        participant_id: String,
        muted: bool,
        /// A room admin (not the publisher) muted or unmuted it; while an admin holds it
        /// muted, the publisher's own `mute` with `muted: false` is refused.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        by_admin: bool,
    },
    /// To a participant: what it may do changed (a room admin updated its grants or muted its
    /// chat). Tracks of a kind it may no longer publish were unpublished (`track_unpublished`
    /// tells it), and it was unsubscribed from everything if it may no longer subscribe.
    PermissionsChanged {
        permissions: Permissions,
    },
    /// Answer to `publish_offer`.
    PublishAnswer {
        sdp: String,
    },
    /// Server offer for the subscriber peer connection; reply with `subscribe_answer`.
    SubscribeOffer {
        sdp: String,
    },
    /// A server ICE candidate for the client's `target` connection.
    Trickle {
        target: PcTarget,
        candidate: IceCandidate,
    },
    /// The answer to `ping`: its `ts` echoed, and the server's wall-clock time when the pong
    /// was made, for the client's clock-sync estimate (offset and round-trip time).
    Pong {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ts: Option<f64>,
        /// Microseconds since the Unix epoch on the server's wall clock (`SystemTime`) when the
        /// pong was made. The RTCP sender reports' NTP time is the same clock, shifted to the
        /// NTP epoch (NTP = Unix + 2 208 988 800 s).
        server_time: u64,
    },
    /// The simulcast layer a subscriber receives for a track changed (for a quality indicator).
    LayerChanged {
        track_id: String,
        quality: Quality,
        /// RID of the layer now forwarded (empty for a non-simulcast track).
        rid: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        width: Option<u32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        height: Option<u32>,
    },
    /// To a publisher (dynacast): which simulcast layers (RIDs) of its track someone needs.
    /// The client may pause the encodings listed in `paused`
    /// (`RTCRtpEncodingParameters.active = false`) until a later `publisher_layers` no longer
    /// lists them. `active` lists the layers the server has received and wants; a RID in
    /// neither list has not reached the server yet and must stay on.
    PublisherLayers {
        track_id: String,
        active: Vec<String>,
        #[serde(default)]
        paused: Vec<String>,
    },
    /// Reply to `ice_restart` when the server has STUN/TURN servers configured: the same
    /// servers as in `joined`, with fresh TURN credentials. Set them on both peer connections
    /// (`setConfiguration`) before the restart's negotiation, so the new candidates (and a new
    /// relay allocation) use them.
    IceServers {
        ice_servers: Vec<IceServer>,
    },
    /// Something the client sent could not be done. The connection stays open unless the
    /// error is fatal (then the server closes the WebSocket).
    Error {
        code: ErrorCode,
        message: String,
        /// The `type` of the message that caused it, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request: Option<String>,
    },
    /// The server ends the session (shutdown, kicked, or fatal error); the socket closes next.
    Leave {
        reason: String,
    },
    /// The connection quality of participants of the room changed (the receiver's own
    /// included). Sent when a participant's quality changes, and once on joining for everyone
    /// already rated.
    ConnectionQuality {
        updates: Vec<ConnectionQualityUpdate>,
    },
    /// The room's active speakers changed (who speaks, or their order): everyone speaking
    /// now, loudest first (empty: nobody). Sent on every change, and on joining when someone
    /// speaks.
    Speakers {
        speakers: Vec<SpeakerInfo>,
    },
}

/// One participant of a `speakers` message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpeakerInfo {
    pub participant_id: String,
    /// How loud, 0.0–1.0 (the linear amplitude of its voice over the last second times the
    /// share of that second it spoke; normal speech is a few hundredths).
    pub level: f64,
}

/// How well a participant's connection works, as the server measures it (its uplink when it
/// publishes, its downlink, and whether anything arrives from it at all).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionQuality {
    /// Nothing has arrived from it for a few seconds.
    Lost,
    Poor,
    Good,
    Excellent,
}

impl ConnectionQuality {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionQuality::Lost => "lost",
            ConnectionQuality::Poor => "poor",
            ConnectionQuality::Good => "good",
            ConnectionQuality::Excellent => "excellent",
        }
    }
}

/// One participant's connection quality in a `connection_quality` message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionQualityUpdate {
    pub participant_id: String,
    pub quality: ConnectionQuality,
    /// The score behind it, 0 (nothing arrives) … 100 (no loss).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<u8>,
}

/// Machine-readable error codes carried by [`ServerMessage::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, or not an object of a known shape.
    MalformedMessage,
    /// `type` names no message this server knows.
    UnknownMessageType,
    /// A required field is missing or empty, or a value is out of range.
    InvalidField,
    /// The message needs a joined session (or `join` was sent twice).
    InvalidState,
    /// The SDP could not be parsed or applied.
    InvalidSdp,
    /// The ICE candidate could not be parsed or applied.
    InvalidCandidate,
    /// A WebSocket or data-channel message was larger than the limit.
    MessageTooLarge,
    /// The referenced track or participant does not exist.
    NotFound,
    /// Too many messages (signaling or data channel) or bytes per second from this
    /// participant; the message was not acted on, the session stays open.
    RateLimited,
    /// The participant's access token does not grant what it asked for (joining the room,
    /// publishing, a kind of track, subscribing, sending data); nothing was done, the session
    /// stays open.
    PermissionDenied,
    /// A per-participant cap was reached (candidates, tracks, subscriptions, ids in one
    /// message); the message was not acted on, the session stays open.
    LimitExceeded,
    /// Protocol version mismatch.
    UnsupportedProtocol,
    /// `join` without an access token.
    TokenMissing,
    /// The access token is malformed, its signature does not verify, or its API key is
    /// unknown (the message says which).
    TokenInvalid,
    /// The access token's `exp` has passed.
    TokenExpired,
    /// The access token's `nbf` is still in the future.
    TokenNotYetValid,
    /// The access token is for another room (or names none).
    TokenWrongRoom,
    /// `resume` could not continue the session (unknown or removed participant, wrong token,
    /// grace period over, or the missed messages are no longer held): join again.
    ResumeFailed,
    /// The server is shutting down or overloaded.
    Unavailable,
    /// Anything else: a bug, reported rather than hidden.
    Internal,
    /// The join would open a new room and the server has `max_rooms` open; the session stays
    /// open (joining an existing room still works).
    TooManyRooms,
    /// The room has `max_participants_per_room` participants; the session stays open.
    RoomFull,
    /// Too many joins per second from this client address (`max_joins_per_ip`, after a burst
    /// of `join_burst_per_ip`); the message says when to retry, the session stays open.
    JoinRateLimited,
}

impl ServerMessage {
    /// Convenience constructor for an error reply.
    pub fn error(code: ErrorCode, message: impl Into<String>, request: Option<&str>) -> Self {
        ServerMessage::Error {
            code,
            message: message.into(),
            request: request.map(str::to_owned),
        }
    }

    /// The `pong` for a `ping` carrying `ts`, stamped with the wall-clock time `at`.
    pub fn pong(ts: Option<f64>, at: std::time::SystemTime) -> Self {
        ServerMessage::Pong {
            ts,
            server_time: unix_micros(at),
        }
    }
}

/// Microseconds since the Unix epoch (0 for a time before it).
pub fn unix_micros(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Why a client message could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("message is not valid JSON: {0}")]
    NotJson(String),
    #[error("message has no string field `type`")]
    MissingType,
    #[error("unknown message type `{0}`")]
    UnknownType(String),
    #[error("invalid `{kind}` message: {detail}")]
    InvalidFields { kind: String, detail: String },
}

impl DecodeError {
    /// The error code to send back for this decode failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::NotJson(_) | DecodeError::MissingType => ErrorCode::MalformedMessage,
            DecodeError::UnknownType(_) => ErrorCode::UnknownMessageType,
            DecodeError::InvalidFields { .. } => ErrorCode::InvalidField,
        }
    }

    /// The offending message's `type`, when it had one.
    pub fn request_type(&self) -> Option<&str> {
        match self {
            DecodeError::UnknownType(t) => Some(t),
            DecodeError::InvalidFields { kind, .. } => Some(kind),
            _ => None,
        }
    }
}

const CLIENT_TYPES: &[&str] = &[
    "join",
    "publish_offer",
    "subscribe_answer",
    "trickle",
    "ice_restart",
    "subscribe",
    "mute",
    "remove_participant",
    "mute_chat",
    "track_settings",
    "ping",
    "history",
    "leave",
    "resume",
];

/// Decode one client message, telling apart bad JSON, unknown types and bad fields.
/// For `Option<Option<T>>` fields: absent → `None` (via `default`), `null` → `Some(None)`,
/// a value → `Some(Some(v))`.
fn present_or_null<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

pub fn decode_client(text: &str) -> Result<ClientMessage, DecodeError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| DecodeError::NotJson(e.to_string()))?;
    let kind = value
        .get("type")
        .and_then(|t| t.as_str())
        .ok_or(DecodeError::MissingType)?
        .to_owned();
    if !CLIENT_TYPES.contains(&kind.as_str()) {
        return Err(DecodeError::UnknownType(kind));
    }
    serde_json::from_value(value).map_err(|e| DecodeError::InvalidFields {
        kind,
        detail: e.to_string(),
    })
}

/// Encode a server message as JSON text.
pub fn encode_server(msg: &ServerMessage) -> String {
    // Serialising these plain structs cannot fail.
    serde_json::to_string(msg).unwrap_or_else(|_| {
        r#"{"type":"error","code":"internal","message":"encode failed"}"#.to_owned()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `room` and `name` may be left to the access token.
    #[test]
    fn join_needs_only_a_token() {
        let m = decode_client(r#"{"type":"join","token":"t"}"#).unwrap();
        assert_eq!(
            m,
            ClientMessage::Join {
                room: String::new(),
                name: String::new(),
                token: Some("t".into()),
                protocol: None,
                auto_subscribe: None,
                timeline_events: None,
            }
        );
    }

    #[test]
    fn history_needs_a_non_negative_integer() {
        assert_eq!(
            decode_client(r#"{"type":"history","since":41}"#).unwrap(),
            ClientMessage::History { since: 41 }
        );
        for bad in [
            r#"{"type":"history"}"#,
            r#"{"type":"history","since":-1}"#,
            r#"{"type":"history","since":1.5}"#,
            r#"{"type":"history","since":"1"}"#,
        ] {
            assert!(
                matches!(decode_client(bad), Err(DecodeError::InvalidFields { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn join_parses_with_defaults() {
        let m = decode_client(r#"{"type":"join","room":"r","name":"alice"}"#).unwrap();
        assert_eq!(
            m,
            ClientMessage::Join {
                room: "r".into(),
                name: "alice".into(),
                token: None,
                protocol: None,
                auto_subscribe: None,
                timeline_events: None,
            }
        );
    }

    /// `quality` absent, `null` and set are three different requests.
    #[test]
    fn track_settings_tells_absent_from_null() {
        let q = |text: &str| match decode_client(text).unwrap() {
            ClientMessage::TrackSettings { quality, .. } => quality,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            q(r#"{"type":"track_settings","track_id":"t","width":640}"#),
            None
        );
        assert_eq!(
            q(r#"{"type":"track_settings","track_id":"t","quality":null,"width":640}"#),
            Some(None)
        );
        assert_eq!(
            q(r#"{"type":"track_settings","track_id":"t","quality":"low"}"#),
            Some(Some(Quality::Low))
        );
        assert!(
            decode_client(r#"{"type":"track_settings","track_id":"t","quality":"huge"}"#).is_err()
        );
    }

    #[test]
    fn errors_are_told_apart() {
        assert!(matches!(
            decode_client("{nope"),
            Err(DecodeError::NotJson(_))
        ));
        assert_eq!(decode_client("{}"), Err(DecodeError::MissingType));
        assert_eq!(
            decode_client(r#"{"type":"dance"}"#),
            Err(DecodeError::UnknownType("dance".into()))
        );
        let e = decode_client(r#"{"type":"join","name":"x","token":5}"#).unwrap_err();
        assert_eq!(e.code(), ErrorCode::InvalidField);
        assert_eq!(e.request_type(), Some("join"));
    }

    #[test]
    fn trickle_uses_browser_field_names() {
        let m = decode_client(
            r#"{"type":"trickle","target":"publisher","candidate":{"candidate":"candidate:1 1 udp 1 127.0.0.1 5000 typ host","sdpMid":"0","sdpMLineIndex":0}}"#,
        )
        .unwrap();
        match m {
            ClientMessage::Trickle { target, candidate } => {
                assert_eq!(target, PcTarget::Publisher);
                assert_eq!(candidate.sdp_mid.as_deref(), Some("0"));
                assert_eq!(candidate.sdp_mline_index, Some(0));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn server_messages_are_tagged() {
        let s = encode_server(&ServerMessage::error(
            ErrorCode::InvalidSdp,
            "bad",
            Some("publish_offer"),
        ));
        assert_eq!(
            s,
            r#"{"type":"error","code":"invalid_sdp","message":"bad","request":"publish_offer"}"#
        );
        let s = encode_server(&ServerMessage::Leave {
            reason: "shutdown".into(),
        });
        assert_eq!(s, r#"{"type":"leave","reason":"shutdown"}"#);
        let s = encode_server(&ServerMessage::ConnectionQuality {
            updates: vec![ConnectionQualityUpdate {
                participant_id: "PA_1".into(),
                quality: ConnectionQuality::Lost,
                score: Some(0),
            }],
        });
        assert_eq!(
            s,
            r#"{"type":"connection_quality","updates":[{"participant_id":"PA_1","quality":"lost","score":0}]}"#
        );
        let s = encode_server(&ServerMessage::Speakers {
            speakers: vec![SpeakerInfo {
                participant_id: "PA_1".into(),
                level: 0.125,
            }],
        });
        assert_eq!(
            s,
            r#"{"type":"speakers","speakers":[{"participant_id":"PA_1","level":0.125}]}"#
        );
    }
}
