//! The link's message codec: one [`LinkMsg`] (a [`PipeMsg`] addressed by node and shards) to
//! bytes and back.
//!
//! ```text
//! kind u8 | origin u32 | from shard u16 | to shard u16 | body
//!   kind 0 (RTP):     relay u32 | layer u8 | the RTP packet as `rtp::Packet` marshals it
//!   kind 1 (control): the message as JSON (`Wire`, a mirror of `PipeMsg` without `Rtp`)
//! ```
//!
//! All integers are big-endian. A message's length is given by the frame that carries it
//! (see the parent module). The origins of `PipeMsg::Rtp`, `PipeMsg::Data` and `Submitted`
//! are not sent: the receiver stamps each with its own arrival time. The `&'static str` fields (a data channel's label, a
//! room event's name) travel as strings and map back to a closed set of known values; an
//! unknown one is a decode error. Decoding never panics: every read is bounds-checked and
//! every failure is a [`CodecError`].

use crate::sfu::admin::AdminOp;
use crate::sfu::data::{CHAT_LABEL, INPUT_LABEL};
use crate::sfu::pipe::{PipeMsg, RelayId, ShardId, Submitted};
use crate::sfu::timeline::{self, Audience, Entry, Stamp};
use crate::signal::{
    ConnectionQualityUpdate, LeaveReason, ParticipantInfo, ServerMessage, SpeakerInfo, TrackInfo,
};
use bytes::Bytes;
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::{RTCPFeedback, RTCRtpCodec};
use rtc::shared::marshal::{Marshal, MarshalSize, Unmarshal};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// The largest encoded message (a control message, once its fragments are put together).
pub const MAX_MESSAGE: usize = 256 * 1024;

/// Bytes before a message's body: kind, origin, from shard, to shard.
pub const MSG_HEADER_LEN: usize = 1 + 4 + 2 + 2;

/// Bytes of an RTP message before the packet: the message header, relay, layer.
pub const RTP_OVERHEAD: usize = MSG_HEADER_LEN + 4 + 1;

const KIND_RTP: u8 = 0;
const KIND_CONTROL: u8 = 1;

/// Room events that go on a room's timeline (`Entry::event`, `Submitted::event`): the
/// closed set a decoder accepts.
pub const ROOM_EVENTS: &[&str] = &[
    "participant_joined",
    "participant_left",
    "track_published",
    "track_unpublished",
    "track_muted",
    "permissions_changed",
];

/// One pipe message between two nodes: from shard `from_shard` of node `origin` (the sending
/// node, or a node whose greeting the sender passes on: see `crate::cluster::gateway`) to
/// shard `to_shard` of the receiving node (`ANY_SHARD`: the room's shards there).
#[derive(Debug, Clone)]
pub struct LinkMsg {
    pub origin: u32,
    pub from_shard: ShardId,
    pub to_shard: ShardId,
    pub msg: PipeMsg,
}

/// Why bytes are not a message (or a message cannot be encoded).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("message truncated")]
    Truncated,
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    #[error("shard {0} does not fit the wire format")]
    ShardOutOfRange(ShardId),
    #[error("message of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("bad RTP packet: {0}")]
    Rtp(String),
    #[error("bad control message: {0}")]
    Control(String),
    #[error("unknown data channel {0:?}")]
    UnknownChannel(String),
    #[error("unknown room event {0:?}")]
    UnknownEvent(String),
}

/// Appends `m` to `out`.
pub fn encode(m: &LinkMsg, out: &mut Vec<u8>) -> Result<(), CodecError> {
    if matches!(m.msg, PipeMsg::NodeGone { .. }) {
        return Err(CodecError::Control("a node-local message".to_owned()));
    }
    let start = out.len();
    let shard = |s: ShardId| u16::try_from(s).map_err(|_| CodecError::ShardOutOfRange(s));
    let (from, to) = (shard(m.from_shard)?, shard(m.to_shard)?);
    let kind = if matches!(m.msg, PipeMsg::Rtp { .. }) {
        KIND_RTP
    } else {
        KIND_CONTROL
    };
    out.push(kind);
    out.extend_from_slice(&m.origin.to_be_bytes());
    out.extend_from_slice(&from.to_be_bytes());
    out.extend_from_slice(&to.to_be_bytes());
    let res = match &m.msg {
        PipeMsg::Rtp {
            relay,
            layer,
            packet,
            ..
        } => {
            out.extend_from_slice(&relay.to_be_bytes());
            out.push(*layer);
            let at = out.len();
            out.resize(at + packet.marshal_size(), 0);
            packet
                .marshal_to(&mut out[at..])
                .map(|n| out.truncate(at + n))
                .map_err(|e| CodecError::Rtp(e.to_string()))
        }
        other => serde_json::to_writer(&mut *out, &Wire::from_msg(other))
            .map_err(|e| CodecError::Control(e.to_string())),
    };
    let len = out.len() - start;
    if res.is_err() || len > MAX_MESSAGE {
        out.truncate(start);
        res?;
        return Err(CodecError::TooLarge(len));
    }
    Ok(())
}

/// The message in `b` (exactly); an RTP packet's and a data-channel message's `origin` is
/// `now`.
pub fn decode(b: &[u8], now: Instant) -> Result<LinkMsg, CodecError> {
    if b.len() > MAX_MESSAGE {
        return Err(CodecError::TooLarge(b.len()));
    }
    let mut r = Reader(b);
    let kind = r.u8()?;
    let origin = r.u32()?;
    let from_shard = r.u16()? as ShardId;
    let to_shard = r.u16()? as ShardId;
    let msg = match kind {
        KIND_RTP => {
            let relay = r.u32()?;
            let layer = r.u8()?;
            let mut rest = r.0;
            let packet =
                rtp::Packet::unmarshal(&mut rest).map_err(|e| CodecError::Rtp(e.to_string()))?;
            if !rest.is_empty() {
                return Err(CodecError::Rtp("trailing bytes".to_owned()));
            }
            PipeMsg::Rtp {
                relay,
                layer,
                packet,
                origin: now,
            }
        }
        KIND_CONTROL => serde_json::from_slice::<Wire>(r.0)
            .map_err(|e| CodecError::Control(e.to_string()))?
            .into_msg(now)?,
        k => return Err(CodecError::UnknownKind(k)),
    };
    Ok(LinkMsg {
        origin,
        from_shard,
        to_shard,
        msg,
    })
}

/// A bounds-checked big-endian reader.
pub(super) struct Reader<'a>(pub(super) &'a [u8]);

impl<'a> Reader<'a> {
    pub(super) fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if self.0.len() < n {
            return Err(CodecError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    pub(super) fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }
    pub(super) fn u16(&mut self) -> Result<u16, CodecError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    pub(super) fn u32(&mut self) -> Result<u32, CodecError> {
        let mut a = [0; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(a))
    }
    pub(super) fn u64(&mut self) -> Result<u64, CodecError> {
        let mut a = [0; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
}

/// `Bytes` as a base64 string (serde `with` module).
pub mod base64_bytes {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD
            .decode(s.as_bytes())
            .map(Bytes::from)
            .map_err(serde::de::Error::custom)
    }
}

fn channel(label: String) -> Result<&'static str, CodecError> {
    [CHAT_LABEL, INPUT_LABEL]
        .into_iter()
        .find(|l| *l == label)
        .ok_or(CodecError::UnknownChannel(label))
}

fn event(name: Option<String>) -> Result<Option<&'static str>, CodecError> {
    name.map(|n| {
        ROOM_EVENTS
            .iter()
            .copied()
            .find(|e| *e == n)
            .ok_or(CodecError::UnknownEvent(n))
    })
    .transpose()
}

/// `PipeMsg` on the wire, but `Rtp` (which has its own binary form).
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
enum Wire {
    Hello {
        room: String,
        to_home: bool,
        #[serde(default)]
        reply: bool,
    },
    Bye {
        room: String,
    },
    Member {
        room: String,
        info: ParticipantInfo,
    },
    MemberLeft {
        room: String,
        participant_id: String,
        reason: LeaveReason,
    },
    TrackOpen {
        room: String,
        relay: RelayId,
        info: TrackInfo,
        codec: WireCodec,
    },
    TrackClose {
        relay: RelayId,
    },
    Muted {
        relay: RelayId,
        muted: bool,
        by_admin: bool,
    },
    Admin {
        op: AdminOp,
    },
    Keyframe {
        relay: RelayId,
        layer: u8,
    },
    Needed {
        relay: RelayId,
        subscribed: bool,
        layers: u64,
    },
    Submit {
        room: String,
        msg: WireSubmitted,
    },
    Data {
        room: String,
        from: String,
        channel: String,
        is_text: bool,
        #[serde(with = "base64_bytes")]
        framed: Bytes,
        to: Audience,
    },
    History {
        room: String,
        participant_id: String,
        since: u64,
        events: bool,
    },
    Tell {
        room: String,
        participant_id: String,
        msg: ServerMessage,
    },
    Tick {
        room: String,
        tick: u64,
        ts: u64,
        entries: Vec<WireEntry>,
    },
    Quality {
        room: String,
        updates: Vec<ConnectionQualityUpdate>,
    },
    Speakers {
        room: String,
        speakers: Vec<SpeakerInfo>,
    },
    /// Stands for `PipeMsg::Rtp` (never encoded: it has its own form); refused by the decoder.
    Rtp,
    /// Stands for messages a node never sends (`PipeMsg::NodeGone`); refused by the decoder.
    Local,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireCodec {
    mime_type: String,
    clock_rate: u32,
    channels: u16,
    sdp_fmtp_line: String,
    /// `(type, parameter)`.
    rtcp_feedback: Vec<(String, String)>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireSubmitted {
    lane: timeline::Lane,
    from: String,
    is_text: bool,
    #[serde(with = "base64_bytes")]
    payload: Bytes,
    to: Option<Vec<String>>,
    sseq: Option<u64>,
    ack: bool,
    event: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireEntry {
    stamp: Stamp,
    from: String,
    sseq: Option<u64>,
    event: Option<String>,
    is_text: bool,
    audience: Audience,
    #[serde(with = "base64_bytes")]
    payload: Bytes,
}

impl Wire {
    fn from_msg(m: &PipeMsg) -> Wire {
        match m.clone() {
            PipeMsg::Hello {
                room,
                to_home,
                reply,
            } => Wire::Hello {
                room,
                to_home,
                reply,
            },
            PipeMsg::NodeGone { .. } => Wire::Local,
            PipeMsg::Bye { room } => Wire::Bye { room },
            PipeMsg::Member { room, info } => Wire::Member { room, info },
            PipeMsg::MemberLeft {
                room,
                participant_id,
                reason,
            } => Wire::MemberLeft {
                room,
                participant_id,
                reason,
            },
            PipeMsg::TrackOpen {
                room,
                relay,
                info,
                codec,
            } => Wire::TrackOpen {
                room,
                relay,
                info,
                codec: WireCodec {
                    mime_type: codec.mime_type,
                    clock_rate: codec.clock_rate,
                    channels: codec.channels,
                    sdp_fmtp_line: codec.sdp_fmtp_line,
                    rtcp_feedback: codec
                        .rtcp_feedback
                        .into_iter()
                        .map(|f| (f.typ, f.parameter))
                        .collect(),
                },
            },
            PipeMsg::TrackClose { relay } => Wire::TrackClose { relay },
            PipeMsg::Muted {
                relay,
                muted,
                by_admin,
            } => Wire::Muted {
                relay,
                muted,
                by_admin,
            },
            PipeMsg::Admin { op } => Wire::Admin { op },
            PipeMsg::Rtp { .. } => Wire::Rtp,
            PipeMsg::Keyframe { relay, layer } => Wire::Keyframe { relay, layer },
            PipeMsg::Needed {
                relay,
                subscribed,
                layers,
            } => Wire::Needed {
                relay,
                subscribed,
                layers,
            },
            PipeMsg::Submit { room, msg } => Wire::Submit {
                room,
                msg: WireSubmitted {
                    lane: msg.lane,
                    from: msg.from,
                    is_text: msg.is_text,
                    payload: msg.payload,
                    to: msg.to,
                    sseq: msg.sseq,
                    ack: msg.ack,
                    event: msg.event.map(str::to_owned),
                },
            },
            PipeMsg::Data {
                room,
                from,
                channel,
                is_text,
                framed,
                to,
                origin: _,
            } => Wire::Data {
                room,
                from,
                channel: channel.to_owned(),
                is_text,
                framed,
                to,
            },
            PipeMsg::History {
                room,
                participant_id,
                since,
                events,
            } => Wire::History {
                room,
                participant_id,
                since,
                events,
            },
            PipeMsg::Tell {
                room,
                participant_id,
                msg,
            } => Wire::Tell {
                room,
                participant_id,
                msg,
            },
            PipeMsg::Tick {
                room,
                tick,
                ts,
                entries,
            } => Wire::Tick {
                room,
                tick,
                ts,
                entries: entries
                    .into_iter()
                    .map(|e| WireEntry {
                        stamp: e.stamp,
                        from: e.from,
                        sseq: e.sseq,
                        event: e.event.map(str::to_owned),
                        is_text: e.is_text,
                        audience: e.audience,
                        payload: e.payload,
                    })
                    .collect(),
            },
            PipeMsg::Quality { room, updates } => Wire::Quality { room, updates },
            PipeMsg::Speakers { room, speakers } => Wire::Speakers { room, speakers },
        }
    }

    /// The message, with `now` as the origin of a data-channel message's relay latency.
    fn into_msg(self, now: Instant) -> Result<PipeMsg, CodecError> {
        Ok(match self {
            Wire::Hello {
                room,
                to_home,
                reply,
            } => PipeMsg::Hello {
                room,
                to_home,
                reply,
            },
            Wire::Bye { room } => PipeMsg::Bye { room },
            Wire::Member { room, info } => PipeMsg::Member { room, info },
            Wire::MemberLeft {
                room,
                participant_id,
                reason,
            } => PipeMsg::MemberLeft {
                room,
                participant_id,
                reason,
            },
            Wire::TrackOpen {
                room,
                relay,
                info,
                codec,
            } => PipeMsg::TrackOpen {
                room,
                relay,
                info,
                codec: RTCRtpCodec {
                    mime_type: codec.mime_type,
                    clock_rate: codec.clock_rate,
                    channels: codec.channels,
                    sdp_fmtp_line: codec.sdp_fmtp_line,
                    rtcp_feedback: codec
                        .rtcp_feedback
                        .into_iter()
                        .map(|(typ, parameter)| RTCPFeedback { typ, parameter })
                        .collect(),
                },
            },
            Wire::TrackClose { relay } => PipeMsg::TrackClose { relay },
            Wire::Muted {
                relay,
                muted,
                by_admin,
            } => PipeMsg::Muted {
                relay,
                muted,
                by_admin,
            },
            Wire::Admin { op } => PipeMsg::Admin { op },
            Wire::Rtp => return Err(CodecError::Control("RTP as a control message".to_owned())),
            Wire::Local => return Err(CodecError::Control("a node-local message".to_owned())),
            Wire::Keyframe { relay, layer } => PipeMsg::Keyframe { relay, layer },
            Wire::Needed {
                relay,
                subscribed,
                layers,
            } => PipeMsg::Needed {
                relay,
                subscribed,
                layers,
            },
            Wire::Submit { room, msg } => PipeMsg::Submit {
                room,
                msg: Submitted {
                    lane: msg.lane,
                    from: msg.from,
                    is_text: msg.is_text,
                    payload: msg.payload,
                    to: msg.to,
                    sseq: msg.sseq,
                    ack: msg.ack,
                    event: event(msg.event)?,
                    origin: now,
                },
            },
            Wire::Data {
                room,
                from,
                channel: ch,
                is_text,
                framed,
                to,
            } => PipeMsg::Data {
                room,
                from,
                channel: channel(ch)?,
                is_text,
                framed,
                to,
                origin: now,
            },
            Wire::History {
                room,
                participant_id,
                since,
                events,
            } => PipeMsg::History {
                room,
                participant_id,
                since,
                events,
            },
            Wire::Tell {
                room,
                participant_id,
                msg,
            } => PipeMsg::Tell {
                room,
                participant_id,
                msg,
            },
            Wire::Tick {
                room,
                tick,
                ts,
                entries,
            } => PipeMsg::Tick {
                room,
                tick,
                ts,
                entries: entries
                    .into_iter()
                    .map(|e| {
                        Ok(Entry {
                            stamp: e.stamp,
                            from: e.from,
                            sseq: e.sseq,
                            event: event(e.event)?,
                            is_text: e.is_text,
                            audience: e.audience,
                            payload: e.payload,
                        })
                    })
                    .collect::<Result<_, CodecError>>()?,
            },
            Wire::Quality { room, updates } => PipeMsg::Quality { room, updates },
            Wire::Speakers { room, speakers } => PipeMsg::Speakers { room, speakers },
        })
    }
}

/// Random messages of every kind, for round trips here and in the link's tests.
#[cfg(test)]
pub(crate) mod arbitrary {
    use super::*;
    use crate::sfu::admin::{Lane as AdminLane, PermissionsUpdate, Target};
    use crate::signal::{ConnectionQuality, TrackKind};
    use rand::rngs::StdRng;
    use rand::{Rng, RngCore as _};

    /// How many kinds `msg` makes (every `PipeMsg` variant).
    pub const KINDS: usize = 18;

    fn s(r: &mut StdRng) -> String {
        const ALPHA: &[&str] = &["a", "Z", "9", "_", "é", "\"", "\\", "\n", "💬", " ", "{"];
        (0..r.random_range(0..12))
            .map(|_| ALPHA[r.random_range(0..ALPHA.len())])
            .collect()
    }

    fn bytes(r: &mut StdRng, max: usize) -> Bytes {
        let mut b = vec![0; r.random_range(0..=max)];
        r.fill_bytes(&mut b);
        Bytes::from(b)
    }

    fn opt<T>(r: &mut StdRng, f: impl FnOnce(&mut StdRng) -> T) -> Option<T> {
        r.random_bool(0.5).then(|| f(r))
    }

    fn track(r: &mut StdRng) -> TrackInfo {
        TrackInfo {
            id: s(r),
            participant_id: s(r),
            kind: if r.random_bool(0.5) {
                TrackKind::Audio
            } else {
                TrackKind::Video
            },
            mime_type: s(r),
            client_track_id: s(r),
            muted: r.random_bool(0.5),
            layers: (0..r.random_range(0..3)).map(|_| s(r)).collect(),
        }
    }

    fn participant(r: &mut StdRng) -> ParticipantInfo {
        ParticipantInfo {
            id: s(r),
            name: s(r),
            tracks: (0..r.random_range(0..3)).map(|_| track(r)).collect(),
        }
    }

    fn reason(r: &mut StdRng) -> LeaveReason {
        [
            LeaveReason::Left,
            LeaveReason::Disconnected,
            LeaveReason::Removed,
            LeaveReason::RoomClosed,
            LeaveReason::Replaced,
        ][r.random_range(0..5)]
    }

    fn audience(r: &mut StdRng) -> Audience {
        match r.random_range(0..3) {
            0 => Audience::All,
            1 => Audience::Events,
            _ => Audience::Only((0..r.random_range(0..3)).map(|_| s(r)).collect()),
        }
    }

    fn target(r: &mut StdRng) -> Target {
        if r.random_bool(0.5) {
            Target::Identity(s(r))
        } else {
            Target::Participant(s(r))
        }
    }

    fn event_name(r: &mut StdRng) -> Option<&'static str> {
        opt(r, |r| ROOM_EVENTS[r.random_range(0..ROOM_EVENTS.len())])
    }

    fn admin(r: &mut StdRng) -> AdminOp {
        let room = s(r);
        match r.random_range(0..7) {
            0 => AdminOp::ListRooms,
            1 => AdminOp::ListParticipants { room },
            2 => AdminOp::RemoveParticipant {
                room,
                target: target(r),
                reason: s(r),
            },
            3 => AdminOp::MuteTrack {
                room,
                target: target(r),
                track_id: s(r),
                muted: r.random_bool(0.5),
            },
            4 => AdminOp::UpdatePermissions {
                room,
                target: target(r),
                update: PermissionsUpdate {
                    publish_audio: opt(r, |r| r.random_bool(0.5)),
                    publish_video: opt(r, |r| r.random_bool(0.5)),
                    publish_data: opt(r, |r| r.random_bool(0.5)),
                    subscribe: opt(r, |r| r.random_bool(0.5)),
                    room_admin: opt(r, |r| r.random_bool(0.5)),
                    chat_muted: opt(r, |r| r.random_bool(0.5)),
                },
            },
            5 => AdminOp::SendData {
                room,
                lane: if r.random_bool(0.5) {
                    AdminLane::Chat
                } else {
                    AdminLane::Input
                },
                is_text: r.random_bool(0.5),
                payload: bytes(r, 64),
                to: (0..r.random_range(0..3)).map(|_| target(r)).collect(),
            },
            _ => AdminOp::CloseRoom { room, reason: s(r) },
        }
    }

    /// An RTP packet as the pipe carries it (no header extensions).
    pub fn packet(r: &mut StdRng, payload: usize) -> rtp::Packet {
        rtp::Packet {
            header: rtp::header::Header {
                version: 2,
                marker: r.random_bool(0.5),
                payload_type: r.random_range(0..128),
                sequence_number: r.random(),
                timestamp: r.random(),
                ssrc: r.random(),
                csrc: (0..r.random_range(0..3)).map(|_| r.random()).collect(),
                ..Default::default()
            },
            payload: bytes(r, payload),
        }
    }

    /// A message of kind `kind` (`0..KINDS`).
    pub fn msg(r: &mut StdRng, kind: usize, now: Instant) -> PipeMsg {
        let room = s(r);
        match kind {
            0 => PipeMsg::Hello {
                room,
                to_home: r.random_bool(0.5),
                reply: r.random_bool(0.5),
            },
            1 => PipeMsg::Bye { room },
            2 => PipeMsg::Member {
                room,
                info: participant(r),
            },
            3 => PipeMsg::MemberLeft {
                room,
                participant_id: s(r),
                reason: reason(r),
            },
            4 => PipeMsg::TrackOpen {
                room,
                relay: r.random(),
                info: track(r),
                codec: RTCRtpCodec {
                    mime_type: s(r),
                    clock_rate: r.random(),
                    channels: r.random(),
                    sdp_fmtp_line: s(r),
                    rtcp_feedback: (0..r.random_range(0..3))
                        .map(|_| RTCPFeedback {
                            typ: s(r),
                            parameter: s(r),
                        })
                        .collect(),
                },
            },
            5 => PipeMsg::TrackClose { relay: r.random() },
            6 => PipeMsg::Muted {
                relay: r.random(),
                muted: r.random_bool(0.5),
                by_admin: r.random_bool(0.5),
            },
            7 => PipeMsg::Admin { op: admin(r) },
            8 => PipeMsg::Rtp {
                relay: r.random(),
                layer: r.random(),
                packet: packet(r, 1100),
                origin: now,
            },
            9 => PipeMsg::Keyframe {
                relay: r.random(),
                layer: r.random(),
            },
            10 => PipeMsg::Needed {
                relay: r.random(),
                subscribed: r.random_bool(0.5),
                layers: r.random(),
            },
            11 => PipeMsg::Submit {
                room,
                msg: Submitted {
                    lane: if r.random_bool(0.5) {
                        timeline::Lane::Chat
                    } else {
                        timeline::Lane::Input
                    },
                    from: s(r),
                    is_text: r.random_bool(0.5),
                    payload: bytes(r, 300),
                    to: opt(r, |r| (0..r.random_range(0..3)).map(|_| s(r)).collect()),
                    sseq: opt(r, |r| r.random()),
                    ack: r.random_bool(0.5),
                    event: event_name(r),
                    origin: now,
                },
            },
            12 => PipeMsg::Data {
                room,
                from: s(r),
                channel: if r.random_bool(0.5) {
                    CHAT_LABEL
                } else {
                    INPUT_LABEL
                },
                is_text: r.random_bool(0.5),
                framed: bytes(r, 300),
                to: audience(r),
                origin: now,
            },
            13 => PipeMsg::History {
                room,
                participant_id: s(r),
                since: r.random(),
                events: r.random_bool(0.5),
            },
            14 => PipeMsg::Tell {
                room,
                participant_id: s(r),
                msg: match r.random_range(0..3) {
                    0 => ServerMessage::ParticipantJoined {
                        participant: participant(r),
                    },
                    1 => ServerMessage::ParticipantLeft {
                        participant_id: s(r),
                        reason: reason(r),
                    },
                    _ => ServerMessage::Speakers {
                        speakers: vec![SpeakerInfo {
                            participant_id: s(r),
                            level: f64::from(r.random_range(0..1024u16)) / 1024.0,
                        }],
                    },
                },
            },
            15 => PipeMsg::Tick {
                room,
                tick: r.random(),
                ts: r.random(),
                entries: (0..r.random_range(0..4))
                    .map(|_| Entry {
                        stamp: Stamp {
                            seq: r.random(),
                            ts: r.random(),
                        },
                        from: s(r),
                        sseq: opt(r, |r| r.random()),
                        event: event_name(r),
                        is_text: r.random_bool(0.5),
                        audience: audience(r),
                        payload: bytes(r, 100),
                    })
                    .collect(),
            },
            16 => PipeMsg::Quality {
                room,
                updates: (0..r.random_range(0..3))
                    .map(|_| ConnectionQualityUpdate {
                        participant_id: s(r),
                        quality: [
                            ConnectionQuality::Lost,
                            ConnectionQuality::Poor,
                            ConnectionQuality::Good,
                            ConnectionQuality::Excellent,
                        ][r.random_range(0..4)],
                        score: opt(r, |r| r.random_range(0..=100)),
                    })
                    .collect(),
            },
            _ => PipeMsg::Speakers {
                room,
                speakers: (0..r.random_range(0..3))
                    .map(|_| SpeakerInfo {
                        participant_id: s(r),
                        level: f64::from(r.random_range(0..1024u16)) / 1024.0,
                    })
                    .collect(),
            },
        }
    }

    /// A random message addressed between random shards.
    pub fn link_msg(r: &mut StdRng, kind: usize, now: Instant) -> LinkMsg {
        LinkMsg {
            origin: r.random(),
            from_shard: r.random_range(0..64),
            to_shard: r.random_range(0..64),
            msg: msg(r, kind, now),
        }
    }
}

#[cfg(test)]
// A test picks the instant packets are stamped with.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    fn round_trip(m: &LinkMsg, now: Instant) -> LinkMsg {
        let mut b = Vec::new();
        encode(m, &mut b).unwrap();
        decode(&b, now).unwrap_or_else(|e| panic!("{e}: {m:?}"))
    }

    #[test]
    fn every_kind_round_trips() {
        let now = Instant::now();
        let mut r = StdRng::seed_from_u64(1);
        for i in 0..100 * arbitrary::KINDS {
            let m = arbitrary::link_msg(&mut r, i % arbitrary::KINDS, now);
            let back = round_trip(&m, now);
            assert_eq!(format!("{m:?}"), format!("{back:?}"));
        }
    }

    #[test]
    fn rtp_is_compact_and_stamped_on_arrival() {
        let sent = Instant::now();
        let arrived = sent + std::time::Duration::from_millis(7);
        let mut r = StdRng::seed_from_u64(2);
        let packet = arbitrary::packet(&mut r, 1000);
        let m = LinkMsg {
            origin: 1,
            from_shard: 2,
            to_shard: 3,
            msg: PipeMsg::Rtp {
                relay: 9,
                layer: 1,
                packet: packet.clone(),
                origin: sent,
            },
        };
        let mut b = Vec::new();
        encode(&m, &mut b).unwrap();
        assert_eq!(b.len(), RTP_OVERHEAD + packet.marshal_size());
        let back = decode(&b, arrived).unwrap();
        let PipeMsg::Rtp {
            relay: 9,
            layer: 1,
            packet: p,
            origin,
        } = back.msg
        else {
            panic!("{back:?}")
        };
        assert_eq!(p, packet);
        assert_eq!(origin, arrived);
    }

    #[test]
    fn unknown_static_names_are_refused() {
        let mk = |kind: &str, name: &str| {
            let j = match kind {
                "data" => format!(
                    r#"{{"Data":{{"room":"r","from":"f","channel":"{name}","is_text":true,"framed":"","to":"All"}}}}"#
                ),
                _ => format!(
                    r#"{{"Tick":{{"room":"r","tick":1,"ts":2,"entries":[{{"stamp":{{"seq":1,"ts":2}},"from":"f","sseq":null,"event":"{name}","is_text":true,"audience":"Events","payload":""}}]}}}}"#
                ),
            };
            let mut b = vec![KIND_CONTROL, 0, 0, 0, 1, 0, 0, 0, 1];
            b.extend_from_slice(j.as_bytes());
            decode(&b, Instant::now())
        };
        assert!(mk("data", "chat").is_ok());
        assert_eq!(
            mk("data", "video").unwrap_err(),
            CodecError::UnknownChannel("video".to_owned())
        );
        assert!(mk("tick", "track_muted").is_ok());
        assert_eq!(
            mk("tick", "rm -rf").unwrap_err(),
            CodecError::UnknownEvent("rm -rf".to_owned())
        );
    }

    #[test]
    fn unknown_fields_and_kinds_are_refused() {
        let dec = |j: &str| {
            let mut b = vec![KIND_CONTROL, 0, 0, 0, 1, 0, 0, 0, 1];
            b.extend_from_slice(j.as_bytes());
            decode(&b, Instant::now())
        };
        assert!(dec(r#"{"Hello":{"room":"r","to_home":true}}"#).is_ok());
        for bad in [
            r#"{"Hello":{"room":"r","to_home":true,"extra":1}}"#,
            r#"{"Hello":{"room":"r"}}"#,
            r#"{"Goodbye":{"room":"r"}}"#,
            r#""Rtp""#,
            r#"{"Hello":{"room":"r","to_home":true}} x"#,
        ] {
            assert!(
                matches!(dec(bad), Err(CodecError::Control(_))),
                "{bad}: {:?}",
                dec(bad)
            );
        }
    }

    #[test]
    fn garbage_never_panics() {
        let now = Instant::now();
        let mut r = StdRng::seed_from_u64(3);
        let mut errors = 0;
        for i in 0..20_000 {
            let b: Vec<u8> = if i % 2 == 0 {
                // Pure noise, sometimes with a valid kind byte.
                let mut b = vec![0; r.random_range(0..200)];
                r.fill(&mut b[..]);
                if !b.is_empty() && r.random_bool(0.5) {
                    b[0] = r.random_range(0..2);
                }
                b
            } else {
                // A valid message, mutated: bytes flipped, truncated or extended.
                let mut b = Vec::new();
                encode(
                    &arbitrary::link_msg(&mut r, i % arbitrary::KINDS, now),
                    &mut b,
                )
                .unwrap();
                for _ in 0..r.random_range(1..4) {
                    match r.random_range(0..3) {
                        0 if !b.is_empty() => {
                            let at = r.random_range(0..b.len());
                            b[at] = r.random();
                        }
                        1 => b.truncate(r.random_range(0..=b.len())),
                        _ => b.push(r.random()),
                    }
                }
                b
            };
            errors += usize::from(decode(&b, now).is_err());
        }
        assert!(errors > 5_000, "most garbage is refused ({errors})");
        assert_eq!(decode(&[], now).unwrap_err(), CodecError::Truncated);
        assert_eq!(
            decode(&[7, 0, 0, 0, 0, 0, 0, 0, 0], now).unwrap_err(),
            CodecError::UnknownKind(7)
        );
        let big = vec![1; MAX_MESSAGE + 1];
        assert_eq!(
            decode(&big, now).unwrap_err(),
            CodecError::TooLarge(big.len())
        );
    }

    #[test]
    fn shards_past_the_wire_format_are_refused() {
        let m = LinkMsg {
            origin: 0,
            from_shard: 70_000,
            to_shard: 0,
            msg: PipeMsg::Bye { room: "r".into() },
        };
        let mut b = vec![1, 2];
        assert_eq!(encode(&m, &mut b), Err(CodecError::ShardOutOfRange(70_000)));
        assert_eq!(b, [1, 2], "nothing appended");
    }
}
