//! The pipe between shards: how a room spans several cores.
//!
//! A room lives on every shard that hosts one of its participants. Each shard keeps its own
//! copy of the room: its local participants, and a mirror of the others' (their ids, names
//! and tracks). What happens on one shard and concerns the room goes to the room's other
//! shards as a [`PipeMsg`]:
//!
//! - **Membership.** A shard that opens the room says [`PipeMsg::Hello`]; each shard that
//!   hosts the room answers with its participants and tracks, and from then on tells of every
//!   join, leave, publication, unpublication and mute. A shard whose last participant left says
//!   [`PipeMsg::Bye`].
//! - **Media.** A published track is relayed under a number of its shard's choosing
//!   ([`RelayId`], announced by [`PipeMsg::TrackOpen`]). The publisher's shard hands each
//!   packet *once* to every shard that has subscribers of the track ([`PipeMsg::Rtp`]); each
//!   of those rewrites, encrypts and sends it for its own subscribers, with its own layer
//!   selection. Keyframe requests ([`PipeMsg::Keyframe`]) and the layers a shard's subscribers
//!   need ([`PipeMsg::Needed`], for dynacast) flow back.
//! - **Data.** A room has one timeline (`super::timeline`), sequenced on its *home* shard
//!   (where its first participant went; it keeps the room while any shard hosts it). A
//!   data-channel message from a participant elsewhere goes to the home
//!   ([`PipeMsg::Submit`]); the home stamps it and hands it, framed, to the shards hosting
//!   its receivers ([`PipeMsg::Data`]; input ticks as [`PipeMsg::Tick`]). History requests go
//!   to the home too ([`PipeMsg::History`]). Since every shard hears of the room's joins,
//!   leaves and tracks, the home puts those room events on the timeline itself.
//!
//! Messages are collected per destination during a turn and handed over once at its end, as
//! batch per [`Lane`] (a `Vec`). Media ([`Lane::Media`]) goes through a bounded queue per shard
//! that never blocks its sender: a full queue drops the batch and counts it, and the sender is
//! told ([`super::Sfu::pipe_dropped`]) so that it asks the publisher for a keyframe of what was
//! lost. Everything else (membership, tracks, mutes, data, keyframe requests, needed layers)
//! is never dropped: it is rare, bounded by what signaling and data channels let clients send,
//! and losing one would leave the shards disagreeing for good. Nothing in a message refers to
//! the sending shard's state (no keys of its maps), so the same messages can later be carried
//! between two Plaza nodes over the network.
//!
//! A relayed packet's payload arrives as a reference to the publisher's shard's buffer. The
//! receiving shard copies it once ([`own_payload`]) before its fan-out: every copy it sends
//! keeps a reference to the payload in its NACK history, and references counted on one
//! buffer by two cores at once make that counter's cache line bounce between them on every
//! copy (in a profile of 400 viewers over two shards, the copy saved 7 % of the receiving
//! shard's CPU).

use super::timeline::{Audience, Entry};
use crate::signal::{
    ConnectionQualityUpdate, LeaveReason, ParticipantInfo, ServerMessage, SpeakerInfo, TrackInfo,
};
use bytes::Bytes;
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::RTCRtpCodec;
use std::time::Instant;

/// A shard: a local shard's index (`0..workers`), or a shard of another node
/// ([`remote_shard`]): the same messages reach it over the node link (`crate::cluster::link`).
pub type ShardId = usize;

/// Shard ids from here on are other nodes' shards ([`remote_shard`]).
pub const REMOTE_BASE: ShardId = 1 << 16;
/// The shard number that stands for "the room's shards on that node" ([`node_entry`]).
pub const ANY_SHARD: u16 = u16::MAX;

/// Shard `shard` of the node numbered `node` on the node link.
pub fn remote_shard(node: u32, shard: u16) -> ShardId {
    ((node as usize + 1) << 16) | shard as usize
}

/// A node's entry for a room: a message to it reaches the room's shards on that node (its
/// home, for what only the home handles). A room extended from another node names its home
/// so, since the node it joins through does not know which of the home node's shards that is.
pub fn node_entry(node: u32) -> ShardId {
    remote_shard(node, ANY_SHARD)
}

/// The node and shard of a remote shard id; `None` for a local shard.
pub fn split_remote(id: ShardId) -> Option<(u32, u16)> {
    (id >= REMOTE_BASE).then(|| (((id >> 16) - 1) as u32, (id & 0xFFFF) as u16))
}

/// Whether `id` is a node's entry ([`node_entry`]).
pub fn is_node_entry(id: ShardId) -> bool {
    split_remote(id).is_some_and(|(_, s)| s == ANY_SHARD)
}

/// `packet` with a payload of its own: a copy of the relayed payload in a buffer of the
/// receiving shard (see the module's documentation).
pub fn own_payload(mut packet: rtp::Packet) -> rtp::Packet {
    packet.payload = Bytes::copy_from_slice(&packet.payload);
    packet
}

/// A track's number on the pipe, chosen by its publisher's shard.
pub type RelayId = u32;

/// One message between two shards hosting the same room.
#[derive(Debug, Clone)]
pub enum PipeMsg {
    /// The sender hosts `room` now: tell it about the room. `to_home`: the receiver is the
    /// room's home (it keeps the room, even without participants of its own, while another
    /// shard hosts it). `reply`: the sender does not know the receiver yet (it greeted another
    /// node's entry, [`node_entry`]): the receiver greets it back, so that each learns the other.
    Hello {
        room: String,
        to_home: bool,
        reply: bool,
    },
    /// The sender no longer hosts `room` (its last participant left).
    Bye { room: String },
    /// A participant of `room` on the sender (joined, or already there when a shard said
    /// hello). Its tracks follow as [`PipeMsg::TrackOpen`].
    Member { room: String, info: ParticipantInfo },
    /// That participant left.
    MemberLeft {
        room: String,
        participant_id: String,
        reason: LeaveReason,
    },
    /// A track published on the sender, relayed as `relay`.
    TrackOpen {
        room: String,
        relay: RelayId,
        info: TrackInfo,
        codec: RTCRtpCodec,
    },
    /// The track is no longer published.
    TrackClose { relay: RelayId },
    /// The track was muted or unmuted (by a room admin: `by_admin`).
    Muted {
        relay: RelayId,
        muted: bool,
        by_admin: bool,
    },
    /// A room admin on the sender asks this shard to act on one of its participants
    /// (remove it, mute its chat or one of its tracks). The sender checked the grant.
    Admin { op: super::admin::AdminOp },
    /// One media packet of a relayed track (header extensions already removed), of simulcast
    /// layer `layer` (its index in the track's layer list). `origin`: when the publisher's
    /// shard received it (in-core latency is measured from there).
    Rtp {
        relay: RelayId,
        layer: u8,
        packet: rtp::Packet,
        origin: Instant,
    },
    /// (Back to the publisher's shard.) A subscriber there needs a keyframe of `layer`.
    Keyframe { relay: RelayId, layer: u8 },
    /// (Back to the publisher's shard.) Whether the sender has subscribers of the track, and
    /// which layers they need (bit `i`: layer `i`).
    Needed {
        relay: RelayId,
        subscribed: bool,
        layers: u64,
    },
    /// (To the room's home.) A data-channel message a participant on the sender sent, checked
    /// there (grants, envelope, rate): the home stamps it on the room's timeline and sends it
    /// back out as [`PipeMsg::Data`] (or in a [`PipeMsg::Tick`]).
    Submit { room: String, msg: Submitted },
    /// (From the room's home.) A stamped data-channel message, framed for its receivers, on
    /// channel `channel`: those of `room` on the receiving shard that `to` includes, but
    /// `from` (see [`Audience::includes`]).
    Data {
        room: String,
        from: String,
        channel: &'static str,
        is_text: bool,
        framed: Bytes,
        to: Audience,
        /// Its origin for the relay latency (see [`Submitted::origin`]).
        origin: Instant,
    },
    /// (To the room's home.) Participant `participant_id` (on the sender) asks for the
    /// room's `chat` history after `since`; `events`: it gets room events.
    History {
        room: String,
        participant_id: String,
        since: u64,
        events: bool,
    },
    /// A signaling message for participant `participant_id` of `room` on the receiver.
    Tell {
        room: String,
        participant_id: String,
        msg: ServerMessage,
    },
    /// (From the room's home.) Input tick `tick` of `room` ended at `ts`: its entries, which
    /// the receiver batches for each of its participants.
    Tick {
        room: String,
        tick: u64,
        ts: u64,
        entries: Vec<Entry>,
    },
    /// The connection quality of participants of `room` on the sender changed (or, to a
    /// shard that just started hosting the room: what it is).
    Quality {
        room: String,
        updates: Vec<ConnectionQualityUpdate>,
    },
    /// The active speakers among the participants of `room` on the sender changed (or, to a
    /// shard that just started hosting the room: who they are), loudest first.
    Speakers {
        room: String,
        speakers: Vec<SpeakerInfo>,
    },
    /// (From this node's link, never sent over it.) The node numbered `node` is gone (its
    /// link went silent): each of its shards says goodbye to every room. `homes`: the rooms
    /// whose home was there, and their new home (`None`: the receiver).
    NodeGone {
        node: u32,
        homes: Vec<(String, Option<ShardId>)>,
    },
}

/// A data-channel message as its sender's shard hands it to the room's home.
#[derive(Debug, Clone)]
pub struct Submitted {
    pub lane: super::timeline::Lane,
    /// The sender's participant id (or `server`).
    pub from: String,
    pub is_text: bool,
    pub payload: Bytes,
    /// The recipients it named (`None`: everyone else in the room).
    pub to: Option<Vec<String>>,
    /// The sender's `sseq`, and whether it asked for an acknowledgement.
    pub sseq: Option<u64>,
    pub ack: bool,
    /// A room event (from the server, on `chat`, for those that asked for events): its name.
    pub event: Option<&'static str>,
    /// When the datagrams that carried it reached the server (the kernel's receive stamp);
    /// its origin for the relay latency. A message from another node counts from its arrival
    /// on this one.
    pub origin: Instant,
}

/// Which of a shard's two queues a batch goes through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Lane {
    /// Everything but media: never dropped.
    Control = 0,
    /// Media: bounded, dropped when full (the sender is told).
    Media = 1,
}

impl PipeMsg {
    /// Media may be dropped on the way (a full queue); nothing else may.
    pub fn lane(&self) -> Lane {
        match self {
            PipeMsg::Rtp { .. } => Lane::Media,
            _ => Lane::Control,
        }
    }
}

/// What a shard received from one other shard in one of its turns.
#[derive(Debug)]
pub struct PipeBatch {
    pub from: ShardId,
    pub msgs: Vec<PipeMsg>,
}

/// A turn's messages of one lane from local shard `from` to another node's shard `to`
/// ([`remote_shard`]), on their way to the node link.
#[derive(Debug)]
pub struct RemoteBatch {
    pub from: ShardId,
    pub to: ShardId,
    pub lane: Lane,
    pub msgs: Vec<PipeMsg>,
}

/// The node's end of its shards' pipes, for the node link (`crate::cluster::gateway`): what
/// the shards hand to other nodes' shards, and each shard's two lanes, to deliver what comes
/// from them.
#[derive(Debug)]
pub struct NodePipe {
    pub out_control: tokio::sync::mpsc::UnboundedReceiver<RemoteBatch>,
    pub out_media: tokio::sync::mpsc::Receiver<RemoteBatch>,
    pub shard_media: Vec<tokio::sync::mpsc::Sender<PipeBatch>>,
    pub shard_control: Vec<tokio::sync::mpsc::UnboundedSender<PipeBatch>>,
}

impl PipeMsg {
    /// The room the message is about, when it names one.
    pub fn room(&self) -> Option<&str> {
        match self {
            PipeMsg::Hello { room, .. }
            | PipeMsg::Bye { room }
            | PipeMsg::Member { room, .. }
            | PipeMsg::MemberLeft { room, .. }
            | PipeMsg::TrackOpen { room, .. }
            | PipeMsg::Submit { room, .. }
            | PipeMsg::Data { room, .. }
            | PipeMsg::History { room, .. }
            | PipeMsg::Tell { room, .. }
            | PipeMsg::Tick { room, .. }
            | PipeMsg::Quality { room, .. }
            | PipeMsg::Speakers { room, .. } => Some(room),
            PipeMsg::TrackClose { .. }
            | PipeMsg::Muted { .. }
            | PipeMsg::Admin { .. }
            | PipeMsg::Rtp { .. }
            | PipeMsg::Keyframe { .. }
            | PipeMsg::Needed { .. }
            | PipeMsg::NodeGone { .. } => None,
        }
    }

    /// Only the room's home handles it.
    pub fn for_home(&self) -> bool {
        matches!(self, PipeMsg::Submit { .. } | PipeMsg::History { .. })
    }
}

/// Messages waiting for the end of the turn, per destination shard and lane.
#[derive(Debug, Default)]
pub struct PipeOut {
    /// Per local shard, indexed by its id (a relayed packet queues without a search).
    local: Vec<[Vec<PipeMsg>; 2]>,
    /// Per shard of another node (ids from [`REMOTE_BASE`] on: few), in order.
    remote: std::collections::BTreeMap<ShardId, [Vec<PipeMsg>; 2]>,
    waiting: usize,
}

impl PipeOut {
    /// Queue `msg` for shard `to`.
    pub fn push(&mut self, to: ShardId, msg: PipeMsg) {
        let lanes = if to < REMOTE_BASE {
            if to >= self.local.len() {
                self.local.resize_with(to + 1, Default::default);
            }
            &mut self.local[to]
        } else {
            self.remote.entry(to).or_default()
        };
        lanes[msg.lane() as usize].push(msg);
        self.waiting += 1;
    }

    pub fn is_empty(&self) -> bool {
        self.waiting == 0
    }

    /// Every non-empty queue, as one batch per destination and lane, destinations in order
    /// (control first, so what announces a track goes before its media).
    pub fn take(&mut self) -> impl Iterator<Item = (ShardId, Lane, Vec<PipeMsg>)> + '_ {
        self.waiting = 0;
        let local = self.local.iter_mut().enumerate();
        let remote = self.remote.iter_mut().map(|(&to, lanes)| (to, lanes));
        local.chain(remote).flat_map(|(to, lanes)| {
            let [control, media] = lanes;
            [(Lane::Control, control), (Lane::Media, media)]
                .into_iter()
                .filter(|(_, q)| !q.is_empty())
                .map(move |(lane, q)| (to, lane, std::mem::take(q)))
        })
    }
}

/// Layers as a bit set (bit `i`: layer `i`; layers past 63 are not represented).
pub fn layer_bits(layers: impl IntoIterator<Item = usize>) -> u64 {
    layers
        .into_iter()
        .filter(|&l| l < 64)
        .fold(0, |acc, l| acc | (1 << l))
}

#[cfg(test)]
// A test picks an arbitrary origin for a packet.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    #[test]
    fn a_relayed_payload_is_copied_into_a_buffer_of_its_own() {
        let mut packet = rtp::Packet::default();
        packet.header.sequence_number = 7;
        packet.header.marker = true;
        packet.payload = Bytes::from(vec![0x90, 0x80, 1, 2, 3]);
        let theirs = packet.payload.clone();
        let ours = own_payload(packet);
        assert_eq!(ours.payload, theirs, "the same bytes");
        assert_ne!(ours.payload.as_ptr(), theirs.as_ptr(), "in another buffer");
        assert_eq!((ours.header.sequence_number, ours.header.marker), (7, true));
        // The publisher's shard holds the only reference left to its buffer.
        assert!(theirs.is_unique());
    }

    #[test]
    fn messages_are_batched_per_destination_in_order() {
        let mut out = PipeOut::default();
        assert!(out.is_empty());
        out.push(
            2,
            PipeMsg::Hello {
                room: "a".to_owned(),
                to_home: false,
                reply: false,
            },
        );
        // A shard of another node comes after the local ones.
        out.push(REMOTE_BASE + 1, PipeMsg::TrackClose { relay: 3 });
        out.push(0, PipeMsg::TrackClose { relay: 1 });
        out.push(
            2,
            PipeMsg::Rtp {
                relay: 2,
                layer: 0,
                packet: Default::default(),
                origin: std::time::Instant::now(),
            },
        );
        out.push(2, PipeMsg::TrackClose { relay: 2 });
        assert!(!out.is_empty());
        let batches: Vec<_> = out.take().collect();
        assert_eq!(batches.len(), 4);
        assert_eq!((batches[0].0, batches[0].1), (0, Lane::Control));
        // Shard 2: its control batch (in order), then its media.
        assert_eq!((batches[1].0, batches[1].1), (2, Lane::Control));
        assert!(matches!(batches[1].2[0], PipeMsg::Hello { .. }));
        assert!(matches!(batches[1].2[1], PipeMsg::TrackClose { relay: 2 }));
        assert_eq!((batches[2].0, batches[2].1), (2, Lane::Media));
        assert!(matches!(batches[2].2[..], [PipeMsg::Rtp { relay: 2, .. }]));
        assert_eq!(
            (batches[3].0, batches[3].1),
            (REMOTE_BASE + 1, Lane::Control)
        );
        assert!(out.is_empty());
        assert_eq!(out.take().count(), 0);
    }

    #[test]
    fn remote_shard_ids() {
        assert_eq!(split_remote(3), None);
        let id = remote_shard(7, 2);
        assert!(id >= REMOTE_BASE);
        assert_eq!(split_remote(id), Some((7, 2)));
        assert!(!is_node_entry(id));
        assert_eq!(split_remote(remote_shard(u32::MAX, 0)), Some((u32::MAX, 0)));
        assert!(is_node_entry(node_entry(0)));
        assert_eq!(split_remote(node_entry(0)), Some((0, ANY_SHARD)));
        assert!(!is_node_entry(5));
    }

    #[test]
    fn layer_sets() {
        assert_eq!(layer_bits([0, 2]), 0b101);
        assert_eq!(layer_bits([]), 0);
        assert_eq!(layer_bits([70]), 0);
    }

    #[test]
    fn messages_can_cross_threads() {
        fn send<T: Send + 'static>() {}
        send::<PipeMsg>();
        send::<PipeBatch>();
    }
}
