//! Room administration: what the admin API (`crate::http::admin`) and room admins on the
//! WebSocket (`remove_participant`, `mute_chat`, `mute` of another's track) ask of the core.
//!
//! [`SfuHandle::admin`](super::SfuHandle::admin) routes an [`AdminOp`] to the shard(s) that
//! hold what it names: a participant's own shard for the operations on one participant, every
//! shard hosting the room for the operations on a room, every shard to list rooms. Each shard
//! answers for what it holds; the handle merges the answers. A room admin's request on the
//! WebSocket is checked on its own shard, and reaches a participant on another shard of the
//! room over the pipe.

use crate::signal::{Permissions, TrackInfo};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Longest reason an admin may give, in characters (longer ones are cut).
pub const MAX_REASON_CHARS: usize = 200;

/// `what`, with the admin's reason if it gave one (`what: reason`; control characters
/// dropped, at most [`MAX_REASON_CHARS`] of it kept).
pub fn with_reason(what: &str, reason: Option<&str>) -> String {
    let reason: String = reason
        .unwrap_or_default()
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_REASON_CHARS)
        .collect();
    match reason.trim() {
        "" => what.to_owned(),
        r => format!("{what}: {r}"),
    }
}

/// Who an operation is about: a participant by its identity (from its token) or by its
/// participant id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    Identity(String),
    Participant(String),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Identity(i) => write!(f, "identity {i:?}"),
            Target::Participant(p) => write!(f, "participant {p}"),
        }
    }
}

/// A change of a participant's permissions; `None` leaves one as it is. `hidden` cannot
/// change after the join (the others would have to be told of a participant they never saw).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PermissionsUpdate {
    #[serde(default)]
    pub publish_audio: Option<bool>,
    #[serde(default)]
    pub publish_video: Option<bool>,
    #[serde(default)]
    pub publish_data: Option<bool>,
    #[serde(default)]
    pub subscribe: Option<bool>,
    #[serde(default)]
    pub room_admin: Option<bool>,
    #[serde(default)]
    pub chat_muted: Option<bool>,
}

impl PermissionsUpdate {
    /// Nothing would change.
    pub fn is_empty(&self) -> bool {
        *self == PermissionsUpdate::default()
    }
}

/// The data-channel lane a server message goes out on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Lane {
    /// Reliable, ordered.
    #[default]
    Chat,
    /// Unordered, unreliable.
    Input,
}

impl Lane {
    pub fn label(self) -> &'static str {
        match self {
            Lane::Chat => super::data::CHAT_LABEL,
            Lane::Input => super::data::INPUT_LABEL,
        }
    }
}

/// What an admin asks of the core.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AdminOp {
    /// Every room (needs every shard).
    ListRooms,
    /// A room's participants with their tracks (hidden ones too).
    ListParticipants { room: String },
    /// Remove a participant; it is told `leave` with the reason.
    RemoveParticipant {
        room: String,
        target: Target,
        reason: String,
    },
    /// Mute (stop forwarding) or unmute one of a participant's published tracks; its
    /// publisher cannot unmute it while an admin holds it muted.
    MuteTrack {
        room: String,
        target: Target,
        track_id: String,
        muted: bool,
    },
    /// Change a participant's permissions (revoking publishing unpublishes its tracks of that
    /// kind; revoking subscribing unsubscribes it from everything).
    UpdatePermissions {
        room: String,
        target: Target,
        update: PermissionsUpdate,
    },
    /// A data-channel message from the server to the room's participants (`to` empty) or to
    /// some of them. Receivers get `{"from":"server"}` `"\n"` payload.
    SendData {
        room: String,
        lane: Lane,
        is_text: bool,
        #[serde(with = "crate::cluster::link::codec::base64_bytes")]
        payload: Bytes,
        to: Vec<Target>,
    },
    /// Remove every participant (told `leave` with the reason); the room closes.
    CloseRoom { room: String, reason: String },
}

impl AdminOp {
    /// The room the operation is about (`None`: every room).
    pub fn room(&self) -> Option<&str> {
        match self {
            AdminOp::ListRooms => None,
            AdminOp::ListParticipants { room }
            | AdminOp::RemoveParticipant { room, .. }
            | AdminOp::MuteTrack { room, .. }
            | AdminOp::UpdatePermissions { room, .. }
            | AdminOp::SendData { room, .. }
            | AdminOp::CloseRoom { room, .. } => Some(room),
        }
    }

    /// The participant the operation is about, if it is about one.
    pub fn target(&self) -> Option<&Target> {
        match self {
            AdminOp::RemoveParticipant { target, .. }
            | AdminOp::MuteTrack { target, .. }
            | AdminOp::UpdatePermissions { target, .. } => Some(target),
            _ => None,
        }
    }

    /// The same operation about `target` instead.
    pub fn with_target(mut self, t: Target) -> Self {
        if let AdminOp::RemoveParticipant { target, .. }
        | AdminOp::MuteTrack { target, .. }
        | AdminOp::UpdatePermissions { target, .. } = &mut self
        {
            *target = t;
        }
        self
    }
}

/// A room, as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomSummary {
    pub name: String,
    /// Participants (hidden ones included).
    pub participants: usize,
    /// Published tracks.
    pub tracks: usize,
    /// When the room opened (seconds since the Unix epoch).
    pub created_at: u64,
    /// Core shards hosting it.
    pub shards: usize,
}

/// A participant, as an admin sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParticipantSummary {
    pub participant_id: String,
    /// From its token (absent only for a participant that joined without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    pub name: String,
    pub permissions: Permissions,
    /// What it publishes.
    pub tracks: Vec<TrackInfo>,
    /// Tracks it is subscribed to.
    pub subscriptions: usize,
    /// When it joined (seconds since the Unix epoch).
    pub joined_at: u64,
}

/// What a shard answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminReply {
    Rooms(Vec<RoomSummary>),
    Participants(Vec<ParticipantSummary>),
    /// The participant after the change.
    Participant(Box<ParticipantSummary>),
    /// Done; how many participants it reached (removed, or sent the data to).
    Done {
        participants: usize,
    },
}

/// Why an operation was not done. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    #[error("no room {0:?}")]
    RoomNotFound(String),
    #[error("no {0} in the room")]
    ParticipantNotFound(String),
    #[error("{0} publishes no track {1:?}")]
    TrackNotFound(String, String),
    #[error("{0}")]
    Invalid(String),
    #[error("the server is shutting down")]
    ShuttingDown,
}
