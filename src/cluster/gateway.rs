//! The gateway between this node's shards and the node link: the shards' pipes reach other
//! nodes' shards through it, and what other nodes' shards send reaches the shards here.
//!
//! A shard of another node has an id past the local ones (`pipe::remote_shard`): a batch
//! a shard hands to such an id arrives here ([`NodePipe::out_control`] /
//! [`NodePipe::out_media`]) and goes over the link, one link message per pipe message, from
//! the shard's index to the remote shard's. A message from the link is delivered to the shard
//! it names, as a batch from the sender's remote id, through the shard's own two lanes (media
//! bounded: a full queue drops it and counts it; control never dropped). The gateway never
//! waits for the link, nor for a shard: the link's driver may itself be waiting for the
//! gateway to take its events, so control messages that find the link's command queue full
//! wait in order in the gateway, and media is dropped (counted in `cluster.link_refused`).
//!
//! A room extended to this node from another greets that node's *entry*
//! (`pipe::node_entry`), since it does not know the room's shards there. The gateway of the
//! receiving node resolves an entry with the node's placement (`SfuHandle::entry_hello`):
//! a greeting goes to every shard of the room there (its home told it is the home), the
//! greeter is remembered as one of the room's shards (the room's later shards here greet it
//! directly), and the greeting is passed on to the room's shards on third nodes, so that
//! every two nodes of a room know each other. What only the home handles (data to sequence,
//! history requests) goes to the home; other messages to every shard of the room.
//!
//! When a node goes silent (`LinkEvent::PeerDown`) or leaves the cluster, each shard here is
//! told (`PipeMsg::NodeGone`): that node's shards leave every room, and a room whose home was
//! there gets a new home here (chosen by the placement).

use super::Counters;
use super::link::{LinkEvent, NodeNum, codec::LinkMsg, driver::LinkSender};
use crate::sfu::SfuHandle;
use crate::sfu::pipe::{self, ANY_SHARD, Lane, NodePipe, PipeBatch, PipeMsg, RemoteBatch, ShardId};
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::mpsc;
use tracing::{debug, info, trace};

/// Link events handled in one turn at most (then the shards get what was gathered).
const EVENTS_PER_TURN: usize = 256;

pub(super) struct Gateway {
    handle: SfuHandle,
    pipe: Option<NodePipe>,
    me: NodeNum,
    link: LinkSender,
    counters: Arc<Counters>,
    /// The link's peers heard from (for the counters, and to tell a node gone once).
    up: HashSet<NodeNum>,
    /// Deliveries gathered this turn: (shard, from, lane) → messages.
    gathered: BTreeMap<(ShardId, ShardId, Lane), Vec<PipeMsg>>,
    /// Control messages for the link that found its command queue full, in order, per node:
    /// handed over as soon as there is room. The gateway never waits for the link (the link
    /// may be waiting for the gateway to take its events); media finding the queue full is
    /// dropped and counted.
    pending: VecDeque<(NodeNum, Vec<LinkMsg>)>,
}

impl Gateway {
    pub(super) fn new(
        handle: SfuHandle,
        pipe: Option<NodePipe>,
        me: NodeNum,
        link: LinkSender,
        counters: Arc<Counters>,
    ) -> Gateway {
        Gateway {
            handle,
            pipe,
            me,
            link,
            counters,
            up: HashSet::new(),
            gathered: BTreeMap::new(),
            pending: VecDeque::new(),
        }
    }

    /// Hands `msgs` for `node` to the link on `lane`, never waiting (see `pending`). Nothing
    /// overtakes what waits: control queues behind it, and media for a node with control
    /// waiting (a track's announcement, perhaps) is dropped like media the link refused.
    fn hand_to_link(&mut self, node: NodeNum, lane: Lane, msgs: Vec<LinkMsg>) {
        if !self.pending.is_empty() {
            match lane {
                Lane::Control => {
                    self.pending.push_back((node, msgs));
                    return;
                }
                Lane::Media if self.pending.iter().any(|(n, _)| *n == node) => {
                    refused_media(&self.counters, msgs.len());
                    return;
                }
                Lane::Media => {}
            }
        }
        let refused = Arc::clone(&self.counters.link_refused);
        if let Err(msgs) = self.link.try_send_batch(node, lane, msgs, refused) {
            match lane {
                Lane::Control => self.pending.push_back((node, msgs)),
                Lane::Media => {
                    refused_media(&self.counters, msgs.len());
                }
            }
        }
    }

    /// Hands over the control messages that waited, while the link takes them.
    fn flush_pending(&mut self) {
        while let Some((node, msgs)) = self.pending.pop_front() {
            let refused = Arc::clone(&self.counters.link_refused);
            if let Err(msgs) = self.link.try_send_batch(node, Lane::Control, msgs, refused) {
                self.pending.push_front((node, msgs));
                return;
            }
        }
    }

    fn shards(&self) -> usize {
        self.pipe.as_ref().map_or(0, |p| p.shard_control.len())
    }

    /// A batch from a shard here to another node's shard: over the link.
    fn send(&mut self, b: RemoteBatch) {
        let Some((node, shard)) = pipe::split_remote(b.to) else {
            return;
        };
        let msgs = b
            .msgs
            .into_iter()
            .map(|msg| LinkMsg {
                origin: self.me,
                from_shard: b.from,
                to_shard: shard as ShardId,
                msg,
            })
            .collect();
        self.hand_to_link(node, b.lane, msgs);
    }

    /// One event of the link.
    fn on_event(&mut self, ev: LinkEvent) {
        match ev {
            LinkEvent::PeerUp(p) => {
                self.up.insert(p);
                self.counters
                    .link_up
                    .store(self.up.len() as u64, Ordering::Relaxed);
            }
            LinkEvent::PeerDown(p) => self.peer_lost(p),
            LinkEvent::Message { peer, lane, msg } => self.on_message(peer, lane, msg),
        }
    }

    /// `node` is gone: the link heard nothing from it, or it left the cluster (its record is
    /// gone; a peer that was up is down now, whether the link noticed its silence first or
    /// not). Counted once if it was up, and the shards are told.
    fn peer_lost(&mut self, node: NodeNum) {
        if self.up.remove(&node) {
            self.counters.link_downs.fetch_add(1, Ordering::Relaxed);
            self.counters
                .link_up
                .store(self.up.len() as u64, Ordering::Relaxed);
        }
        self.node_gone(node);
    }

    fn on_message(&mut self, peer: NodeNum, lane: Lane, m: LinkMsg) {
        // A node passes on only greetings of third nodes; anything else is its own.
        let origin = if matches!(m.msg, PipeMsg::Hello { .. }) {
            m.origin
        } else {
            peer
        };
        let Ok(from_shard) = u16::try_from(m.from_shard) else {
            return;
        };
        if from_shard == ANY_SHARD {
            return;
        }
        let from = pipe::remote_shard(origin, from_shard);
        let msg = m.msg;
        if let PipeMsg::Bye { room } = &msg {
            self.handle.remote_bye(room, from);
        }
        if m.to_shard != ANY_SHARD as ShardId {
            if m.to_shard < self.shards() {
                self.gather(m.to_shard, from, lane, msg);
            }
            return;
        }
        // To this node's entry for a room.
        match (&msg, msg.room().map(str::to_owned)) {
            (PipeMsg::Hello { reply, .. }, Some(room)) => {
                let reply = *reply;
                let fanout = self.handle.entry_hello(&room, from);
                debug!(%room, from, shards = ?fanout.local, introduce = ?fanout.introduce, "another node extends a room from here");
                for (shard, home) in fanout.local {
                    let hello = PipeMsg::Hello {
                        room: room.clone(),
                        to_home: home,
                        reply,
                    };
                    self.gather(shard, from, Lane::Control, hello);
                }
                for third in fanout.introduce {
                    let Some((node, shard)) = pipe::split_remote(third) else {
                        continue;
                    };
                    let pass_on = LinkMsg {
                        origin,
                        from_shard: from_shard as ShardId,
                        to_shard: shard as ShardId,
                        msg: PipeMsg::Hello {
                            room: room.clone(),
                            to_home: false,
                            reply: true,
                        },
                    };
                    self.hand_to_link(node, Lane::Control, vec![pass_on]);
                }
            }
            (_, Some(room)) => {
                let home_only = msg.for_home();
                let targets: Vec<ShardId> = self
                    .handle
                    .entry_targets(&room)
                    .into_iter()
                    .filter(|&(_, home)| home || !home_only)
                    .map(|(s, _)| s)
                    .collect();
                self.gather_all(&targets, from, lane, msg);
            }
            // (Messages about a track or a participant, not a room: every shard, each of which
            // ignores what it does not know.)
            (_, None) => {
                let all: Vec<ShardId> = (0..self.shards()).collect();
                self.gather_all(&all, from, lane, msg);
            }
        }
    }

    fn gather_all(&mut self, shards: &[ShardId], from: ShardId, lane: Lane, msg: PipeMsg) {
        if let Some((&last, rest)) = shards.split_last() {
            for &s in rest {
                self.gather(s, from, lane, msg.clone());
            }
            self.gather(last, from, lane, msg);
        }
    }

    fn gather(&mut self, shard: ShardId, from: ShardId, lane: Lane, msg: PipeMsg) {
        self.gathered
            .entry((shard, from, lane))
            .or_default()
            .push(msg);
    }

    /// Hands what was gathered to the shards.
    fn deliver(&mut self) {
        let Some(pipe) = &self.pipe else {
            self.gathered.clear();
            return;
        };
        for ((shard, from, lane), msgs) in std::mem::take(&mut self.gathered) {
            let batch = PipeBatch { from, msgs };
            match lane {
                Lane::Control => {
                    let _ = pipe.shard_control[shard].send(batch);
                }
                Lane::Media => {
                    if let Err(e) = pipe.shard_media[shard].try_send(batch) {
                        let n = match e {
                            mpsc::error::TrySendError::Full(b)
                            | mpsc::error::TrySendError::Closed(b) => b.msgs.len(),
                        };
                        self.counters
                            .link_media_dropped
                            .fetch_add(n as u64, Ordering::Relaxed);
                        trace!(
                            shard,
                            n, "media from another node dropped: the shard's queue is full"
                        );
                    }
                }
            }
        }
    }

    /// Node `node` is gone: every shard here is told, with the rooms' new homes.
    fn node_gone(&mut self, node: NodeNum) {
        let moved = self.handle.node_gone(node);
        if !moved.is_empty() {
            info!(
                node,
                rooms = moved.len(),
                "a node is gone: its rooms' homes moved here"
            );
        }
        for shard in 0..self.shards() {
            let homes = moved
                .iter()
                .map(|(room, h)| (room.clone(), (*h != shard).then_some(*h)))
                .collect();
            self.gather(
                shard,
                pipe::node_entry(node),
                Lane::Control,
                PipeMsg::NodeGone { node, homes },
            );
        }
    }
}

fn refused_media(counters: &Counters, n: usize) {
    counters.link_refused.fetch_add(n as u64, Ordering::Relaxed);
    trace!(
        n,
        "media for another node dropped: the link's queue is full"
    );
}

/// While control messages wait for the link, how often it is offered them again.
const RETRY: std::time::Duration = std::time::Duration::from_millis(1);

/// Runs the gateway until the link and the shards' pipes are gone.
pub(super) async fn run(
    mut gw: Gateway,
    mut events: mpsc::Receiver<LinkEvent>,
    mut removed: mpsc::UnboundedReceiver<NodeNum>,
) {
    // The shards' ends (none: a core without pipes, e.g. in tests).
    let (mut out_control, mut out_media) = match gw.pipe.as_mut() {
        Some(p) => {
            let (_, c) = mpsc::unbounded_channel();
            let (_, m) = mpsc::channel(1);
            (
                std::mem::replace(&mut p.out_control, c),
                std::mem::replace(&mut p.out_media, m),
            )
        }
        None => {
            let (_, c) = mpsc::unbounded_channel();
            let (_, m) = mpsc::channel(1);
            (c, m)
        }
    };
    let mut removed_open = true;
    loop {
        let waiting = !gw.pending.is_empty();
        tokio::select! {
            Some(b) = out_control.recv() => gw.send(b),
            Some(b) = out_media.recv() => gw.send(b),
            ev = events.recv() => {
                let Some(ev) = ev else { break };
                gw.on_event(ev);
                for _ in 1..EVENTS_PER_TURN {
                    match events.try_recv() {
                        Ok(ev) => gw.on_event(ev),
                        Err(_) => break,
                    }
                }
            }
            n = removed.recv(), if removed_open => match n {
                Some(n) => gw.peer_lost(n),
                None => removed_open = false,
            },
            () = tokio::time::sleep(RETRY), if waiting => {}
        }
        gw.flush_pending();
        gw.deliver();
    }
}
