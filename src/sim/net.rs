//! The simulated network: nodes with addresses, directed links with delay, loss and a rate
//! limit, and one virtual clock.
//!
//! Shaped after quinn's `Pair::step` and str0m's test harness: every node is a sans-I/O state
//! machine; [`Net::step`] advances the clock to the earliest event (a datagram arriving or a
//! node's deadline), delivers or fires it, then lets every node drain its output
//! ([`Node::poll_output`]) until nothing more comes out. Nothing here reads the wall clock
//! after [`Net::new`].
//!
//! Shards: [`Net::set_shards`] makes some nodes the shards of one server. Signaling commands
//! then go where the real `SfuHandle` sends them (a join to the shard [`Placement`] picks,
//! with the room's other shards in `peers`; everything else to the participant's shard), and
//! the batches the shards hand to each other ([`Output::pipes`]) travel as events of the
//! network ([`PipeConfig`]: a delay, FIFO per pair of shards, an optional bound per receiving
//! shard that drops whole batches).

#![allow(clippy::disallowed_methods)] // one real instant starts the virtual clock
use crate::sfu::pipe::{Lane, PipeMsg, ShardId};
use crate::sfu::placement::{Place, Placement};
use crate::sfu::{Command, JoinAccepted, SfuError};
use bytes::BytesMut;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::any::Any;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Index of a node in its [`Net`].
pub type NodeId = usize;

/// What a node hands the network when it is drained.
#[derive(Default)]
pub struct Output {
    /// Datagrams to send: (from, to, bytes).
    pub datagrams: Vec<(SocketAddr, SocketAddr, BytesMut)>,
    /// Signaling commands for the network's signaling server node (see
    /// [`Net::set_signaling_server`], or the shards of [`Net::set_shards`]); delivered at
    /// once, in order.
    pub commands: Vec<Command>,
    /// (A shard only.) Batches for other shards: (destination shard, messages), delivered
    /// as events of the network (see [`PipeConfig`]).
    pub pipes: Vec<(ShardId, Lane, Vec<PipeMsg>)>,
}

/// A sans-I/O participant of the simulated network.
pub trait Node: Any {
    /// For logs and panics.
    fn name(&self) -> String;
    /// A datagram arrived at one of the node's addresses.
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, to: SocketAddr, data: BytesMut);
    /// The deadline from [`Node::poll_timeout`] has passed.
    fn handle_timeout(&mut self, now: Instant);
    /// The next instant the node wants [`Node::handle_timeout`] called.
    fn poll_timeout(&mut self) -> Option<Instant>;
    /// Drain everything the node wants to send (and do any work that needs no timer, such as
    /// reacting to signaling). Called after every event, on every node, until quiet.
    fn poll_output(&mut self, now: Instant, out: &mut Output);
    /// A signaling command from a client (only the signaling server node gets these).
    fn handle_command(&mut self, now: Instant, cmd: Command) {
        let _ = (now, cmd);
    }
    /// (A shard only.) A batch another shard handed over (see [`Net::set_shards`]).
    fn handle_pipe(&mut self, now: Instant, from: ShardId, msgs: Vec<PipeMsg>) {
        let _ = (now, from, msgs);
    }
    /// (A shard only.) Messages this node handed over for shard `to` were dropped: the
    /// receiving shard's queue was full (media only), or the shard does not exist.
    fn pipe_dropped(&mut self, now: Instant, to: ShardId, msgs: Vec<PipeMsg>) {
        let _ = (now, to, msgs);
    }
}

/// How batches travel between shards (see [`Net::set_shards`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipeConfig {
    /// From the end of the sender's turn to the receiver's `handle_pipe`.
    pub delay: Duration,
    /// Batches a shard's queue holds (sent to it, not yet handled); the media of a batch
    /// that finds it full is dropped and counted, never waited for (like the real driver's
    /// bounded media lane); its other messages are delivered all the same (the real driver's
    /// control lane never drops). `None`: unbounded.
    pub capacity: Option<usize>,
}

impl Default for PipeConfig {
    fn default() -> Self {
        PipeConfig {
            delay: Duration::from_micros(5),
            capacity: None,
        }
    }
}

/// What went from one shard to another over the pipe.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct PipeStats {
    pub batches_sent: u64,
    pub batches_delivered: u64,
    pub msgs_delivered: u64,
    /// Dropped because the receiving shard's queue was full.
    pub batches_dropped: u64,
    pub msgs_dropped: u64,
}

/// A join on its way to a shard: the client's reply is passed on when the shard answers,
/// and the placement learns the participant's shard (as `SfuHandle::join` does).
struct PendingJoin {
    rx: oneshot::Receiver<Result<JoinAccepted, SfuError>>,
    reply: oneshot::Sender<Result<JoinAccepted, SfuError>>,
    room: String,
    identity: Option<String>,
    shard: ShardId,
}

/// The shards of one server and what routes to and between them.
struct Shards {
    /// Shard index → node.
    nodes: Vec<NodeId>,
    placement: Placement,
    pending: Vec<PendingJoin>,
    cfg: PipeConfig,
    /// Batches sent to each shard and not yet handled.
    queued: Vec<usize>,
    /// The last arrival scheduled per (from, to), to keep each pair FIFO.
    last: BTreeMap<(ShardId, ShardId), Instant>,
    stats: BTreeMap<(ShardId, ShardId), PipeStats>,
    /// Batches for a shard index that does not exist.
    unroutable: u64,
}

impl Shards {
    fn index_of(&self, node: NodeId) -> Option<ShardId> {
        self.nodes.iter().position(|&n| n == node)
    }
}

/// One direction of a link between two nodes.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkConfig {
    /// One-way propagation delay.
    pub delay: Duration,
    /// Probability that a datagram is lost (0.0 … 1.0), drawn from the network's seeded rng.
    pub loss: f64,
    /// Bottleneck rate in bits per second; `None` = unlimited.
    pub rate_bps: Option<u64>,
    /// Bytes the bottleneck queue holds before it drops arrivals (tail drop).
    pub queue_bytes: usize,
    /// Extra delay per datagram, uniform in `0..=jitter` (seeded); datagrams may overtake
    /// each other.
    pub jitter: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            delay: Duration::from_millis(10),
            loss: 0.0,
            rate_bps: None,
            queue_bytes: 64 * 1024,
            jitter: Duration::ZERO,
        }
    }
}

/// What happened on one directed link.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct LinkStats {
    pub sent: u64,
    pub delivered: u64,
    pub bytes_delivered: u64,
    /// Lost to [`LinkConfig::loss`].
    pub lost: u64,
    /// Dropped because the rate-limited queue was full.
    pub queue_drops: u64,
}

#[derive(Debug, Default)]
struct Link {
    cfg: LinkConfig,
    /// When the bottleneck finishes serialising what it has queued.
    busy_until: Option<Instant>,
    /// Datagrams still to drop on purpose ([`Net::drop_next`]).
    drop_next: u32,
    /// RTP packets (SSRC, sequence number) dropped every time they are sent
    /// ([`Net::drop_rtp`]).
    drop_rtp: Vec<(u32, u16)>,
    stats: LinkStats,
}

/// The SSRC and sequence number of an (S)RTP datagram (the header is not encrypted); `None`
/// for anything else (STUN, DTLS, RTCP).
fn rtp_id(data: &[u8]) -> Option<(u32, u16)> {
    let h = data.get(..12)?;
    // RTP version 2; RTCP's packet types 192–223 (RFC 5761) are not RTP.
    if h[0] >> 6 != 2 || (192..=223).contains(&h[1]) {
        return None;
    }
    let seq = u16::from_be_bytes([h[2], h[3]]);
    let ssrc = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
    Some((ssrc, seq))
}

struct InFlight {
    to_node: NodeId,
    what: Carried,
}

enum Carried {
    Datagram {
        from: SocketAddr,
        to: SocketAddr,
        link: (NodeId, NodeId),
        data: BytesMut,
    },
    /// A batch between two shards.
    Pipe {
        from: ShardId,
        to: ShardId,
        msgs: Vec<PipeMsg>,
    },
}

/// The simulated network. See the module docs.
pub struct Net {
    now: Instant,
    start: Instant,
    nodes: Vec<Box<dyn Node>>,
    addrs: HashMap<SocketAddr, NodeId>,
    links: BTreeMap<(NodeId, NodeId), Link>,
    default_link: LinkConfig,
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    in_flight: HashMap<u64, InFlight>,
    next_seq: u64,
    rng: StdRng,
    signaling: Option<NodeId>,
    shards: Option<Shards>,
    /// Datagrams sent to an address no node has.
    pub unroutable: u64,
    /// Events processed (datagram deliveries and timeouts).
    pub steps: u64,
    same_instant: u32,
    /// Whether a node reads every datagram reaching it at one instant in one turn (see
    /// [`Net::set_batch_reads`]); otherwise each datagram is a turn.
    batch_reads: bool,
}

fn sh_node(sh: &Shards, shard: ShardId) -> NodeId {
    sh.nodes[shard.min(sh.nodes.len() - 1)]
}

/// Consecutive events at one instant after which the network assumes a node never moves
/// its deadline and panics (a bug in the node, not a slow test).
const MAX_EVENTS_AT_ONE_INSTANT: u32 = 100_000;

impl Net {
    /// A network whose clock starts now (the only read of the wall clock) and whose losses
    /// are drawn from `seed`.
    pub fn new(seed: u64) -> Self {
        let start = Instant::now();
        Net {
            now: start,
            start,
            nodes: Vec::new(),
            addrs: HashMap::new(),
            links: BTreeMap::new(),
            default_link: LinkConfig::default(),
            queue: BinaryHeap::new(),
            in_flight: HashMap::new(),
            next_seq: 0,
            rng: StdRng::seed_from_u64(seed),
            signaling: None,
            shards: None,
            unroutable: 0,
            steps: 0,
            same_instant: 0,
            batch_reads: false,
        }
    }

    /// The virtual now.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Virtual time since the network was created.
    pub fn elapsed(&self) -> Duration {
        self.now - self.start
    }

    /// The instant the clock started at.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Links created after this get `cfg` (links already used keep theirs).
    pub fn set_default_link(&mut self, cfg: LinkConfig) {
        self.default_link = cfg;
    }

    /// Add a node reachable at `addrs`.
    pub fn add_node(&mut self, node: impl Node, addrs: &[SocketAddr]) -> NodeId {
        let id = self.nodes.len();
        for a in addrs {
            let prev = self.addrs.insert(*a, id);
            assert!(prev.is_none(), "address {a} given to two nodes");
        }
        self.nodes.push(Box::new(node));
        id
    }

    /// Another address for an existing node.
    pub fn add_addr(&mut self, id: NodeId, addr: SocketAddr) {
        let prev = self.addrs.insert(addr, id);
        assert!(prev.is_none(), "address {addr} given to two nodes");
    }

    /// The node that receives every [`Output::commands`].
    pub fn set_signaling_server(&mut self, id: NodeId) {
        self.signaling = Some(id);
    }

    /// Make `nodes` (in shard order) the shards of one server: signaling commands are
    /// routed to them as the real `SfuHandle` routes them, with a [`Placement`] of
    /// `nodes.len()` shards that spreads a room from `spread_above` participants (0: never),
    /// and their pipe batches are carried as [`PipeConfig::default`] says until
    /// [`Net::set_pipe`]. Replaces any signaling server.
    pub fn set_shards(&mut self, nodes: Vec<NodeId>, spread_above: usize) {
        let n = nodes.len();
        assert!(n > 0, "at least one shard");
        self.signaling = None;
        self.shards = Some(Shards {
            nodes,
            placement: Placement::new(n, spread_above),
            pending: Vec::new(),
            cfg: PipeConfig::default(),
            queued: vec![0; n],
            last: BTreeMap::new(),
            stats: BTreeMap::new(),
            unroutable: 0,
        });
    }

    /// How batches between shards travel from now on (batches already on their way keep
    /// their arrival time).
    pub fn set_pipe(&mut self, cfg: PipeConfig) {
        self.shards_mut().cfg = cfg;
    }

    /// The current pipe configuration.
    pub fn pipe(&self) -> &PipeConfig {
        &self.shards_ref().cfg
    }

    /// What the pipe from shard `from` to shard `to` has carried.
    pub fn pipe_stats(&self, from: ShardId, to: ShardId) -> PipeStats {
        self.shards_ref()
            .stats
            .get(&(from, to))
            .cloned()
            .unwrap_or_default()
    }

    /// Batches sent to a shard index that does not exist.
    pub fn pipe_unroutable(&self) -> u64 {
        self.shards_ref().unroutable
    }

    /// The placement the shards' joins go through.
    pub fn placement(&self) -> &Placement {
        &self.shards_ref().placement
    }

    /// The node of shard `shard`.
    pub fn shard_node(&self, shard: ShardId) -> NodeId {
        self.shards_ref().nodes[shard]
    }

    /// The shard nodes, in shard order (empty without [`Net::set_shards`]).
    pub fn shard_nodes(&self) -> Vec<NodeId> {
        self.shards
            .as_ref()
            .map(|s| s.nodes.clone())
            .unwrap_or_default()
    }

    fn shards_ref(&self) -> &Shards {
        self.shards
            .as_ref()
            .expect("the net has no shards (set_shards)")
    }

    fn shards_mut(&mut self) -> &mut Shards {
        self.shards
            .as_mut()
            .expect("the net has no shards (set_shards)")
    }

    /// The node `id` as its concrete type. Panics if it is another type.
    pub fn node<T: Node>(&mut self, id: NodeId) -> &mut T {
        let name = self.nodes[id].name();
        let any: &mut dyn Any = self.nodes[id].as_mut();
        any.downcast_mut::<T>()
            .unwrap_or_else(|| panic!("node {id} ({name}) is not a {}", std::any::type_name::<T>()))
    }

    /// Immutable access for conditions.
    pub fn node_ref<T: Node>(&self, id: NodeId) -> &T {
        let any: &dyn Any = self.nodes[id].as_ref();
        any.downcast_ref::<T>().expect("node type")
    }

    fn link_entry(&mut self, from: NodeId, to: NodeId) -> &mut Link {
        let default = &self.default_link;
        self.links.entry((from, to)).or_insert_with(|| Link {
            cfg: default.clone(),
            ..Default::default()
        })
    }

    /// Configure the link from `from` to `to` (one direction). Takes effect for datagrams
    /// sent from now on.
    pub fn set_link(&mut self, from: NodeId, to: NodeId, cfg: LinkConfig) {
        self.link_entry(from, to).cfg = cfg;
    }

    /// The link's configuration, to change one field.
    pub fn link_mut(&mut self, from: NodeId, to: NodeId) -> &mut LinkConfig {
        &mut self.link_entry(from, to).cfg
    }

    /// Drop the next `n` datagrams sent from `from` to `to` (counted as lost): a loss at
    /// a chosen moment.
    pub fn drop_next(&mut self, from: NodeId, to: NodeId, n: u32) {
        self.link_entry(from, to).drop_next += n;
    }

    /// Drop every datagram from `from` to `to` that carries the RTP packet `seq` of `ssrc`:
    /// a packet lost each time it is sent, its retransmissions on the same SSRC included.
    pub fn drop_rtp(&mut self, from: NodeId, to: NodeId, ssrc: u32, seq: u16) {
        self.link_entry(from, to).drop_rtp.push((ssrc, seq));
    }

    /// What the link from `from` to `to` has carried.
    pub fn link_stats(&self, from: NodeId, to: NodeId) -> LinkStats {
        self.links
            .get(&(from, to))
            .map(|l| l.stats.clone())
            .unwrap_or_default()
    }

    /// Every link's statistics, in a stable order (for digests).
    pub fn all_link_stats(&self) -> Vec<((NodeId, NodeId), LinkStats)> {
        self.links
            .iter()
            .map(|(k, l)| (*k, l.stats.clone()))
            .collect()
    }

    fn send(&mut self, from_node: NodeId, from: SocketAddr, to: SocketAddr, data: BytesMut) {
        let Some(&to_node) = self.addrs.get(&to) else {
            self.unroutable += 1;
            return;
        };
        let now = self.now;
        let seq = self.next_seq;
        self.next_seq += 1;
        let link = self
            .links
            .entry((from_node, to_node))
            .or_insert_with(|| Link {
                cfg: self.default_link.clone(),
                ..Default::default()
            });
        link.stats.sent += 1;
        if link.drop_next > 0 {
            link.drop_next -= 1;
            link.stats.lost += 1;
            return;
        }
        if !link.drop_rtp.is_empty() && rtp_id(&data).is_some_and(|id| link.drop_rtp.contains(&id))
        {
            link.stats.lost += 1;
            return;
        }
        if link.cfg.loss > 0.0 && self.rng.random::<f64>() < link.cfg.loss {
            link.stats.lost += 1;
            return;
        }
        let leaves = match link.cfg.rate_bps {
            None => now,
            Some(rate) => {
                let start = link.busy_until.filter(|t| *t > now).unwrap_or(now);
                let backlog = start - now;
                let backlog_bytes = backlog.as_secs_f64() * rate as f64 / 8.0;
                if backlog_bytes + data.len() as f64 > link.cfg.queue_bytes as f64 {
                    link.stats.queue_drops += 1;
                    return;
                }
                let tx = Duration::from_nanos(
                    (data.len() as u64 * 8).saturating_mul(1_000_000_000) / rate.max(1),
                );
                link.busy_until = Some(start + tx);
                start + tx
            }
        };
        let mut at = leaves + link.cfg.delay;
        if !link.cfg.jitter.is_zero() {
            let j = self.rng.random_range(0..=link.cfg.jitter.as_nanos() as u64);
            at += Duration::from_nanos(j);
        }
        self.queue.push(Reverse((at, seq)));
        self.in_flight.insert(
            seq,
            InFlight {
                to_node,
                what: Carried::Datagram {
                    from,
                    to,
                    link: (from_node, to_node),
                    data,
                },
            },
        );
    }

    /// A shard's batch for shard `to`: queued for delivery, or dropped (counted, and the
    /// sender told) when the receiving shard's queue is full.
    fn send_pipe(&mut self, from_node: NodeId, to: ShardId, lane: Lane, msgs: Vec<PipeMsg>) {
        let now = self.now;
        let seq = self.next_seq;
        let Some(sh) = self.shards.as_mut() else {
            self.nodes[from_node].pipe_dropped(now, to, msgs);
            return;
        };
        let (Some(from), Some(&to_node)) = (sh.index_of(from_node), sh.nodes.get(to)) else {
            sh.unroutable += 1;
            self.nodes[from_node].pipe_dropped(now, to, msgs);
            return;
        };
        let stats = sh.stats.entry((from, to)).or_default();
        stats.batches_sent += 1;
        if lane == Lane::Media && sh.cfg.capacity.is_some_and(|c| sh.queued[to] >= c) {
            stats.batches_dropped += 1;
            stats.msgs_dropped += msgs.len() as u64;
            self.nodes[from_node].pipe_dropped(now, to, msgs);
            return;
        }
        sh.queued[to] += 1;
        let last = sh.last.entry((from, to)).or_insert(now);
        let at = (now + sh.cfg.delay).max(*last);
        *last = at;
        self.next_seq += 1;
        self.queue.push(Reverse((at, seq)));
        self.in_flight.insert(
            seq,
            InFlight {
                to_node,
                what: Carried::Pipe { from, to, msgs },
            },
        );
    }

    /// A command for the shards, routed as `SfuHandle` routes it.
    fn route_command(&mut self, now: Instant, cmd: Command) {
        let sh = self.shards.as_mut().expect("shards");
        let (shard, cmd) = match cmd {
            Command::Join { mut req, reply } => {
                let Place { shard, peers, home } =
                    match sh.placement.reserve(&req.room, req.identity.as_deref()) {
                        Ok(place) => place,
                        Err(refusal) => {
                            let _ = reply.send(Err(refusal.into()));
                            return;
                        }
                    };
                req.peers = peers;
                req.home = (home != shard).then_some(home);
                let (tx, rx) = oneshot::channel();
                sh.pending.push(PendingJoin {
                    rx,
                    reply,
                    room: req.room.clone(),
                    identity: req.identity.clone(),
                    shard,
                });
                (shard, Command::Join { req, reply: tx })
            }
            Command::Client { participant, msg } => (
                sh.placement.shard_of(&participant).unwrap_or(0),
                Command::Client { participant, msg },
            ),
            Command::Disconnect {
                participant,
                why,
                reason,
            } => {
                let shard = sh.placement.shard_of(&participant).unwrap_or(0);
                sh.placement.left(&participant);
                (
                    shard,
                    Command::Disconnect {
                        participant,
                        why,
                        reason,
                    },
                )
            }
            Command::Shutdown { done } => {
                // Every shard shuts down; `done` is answered by the first.
                for &node in sh.nodes.iter().skip(1) {
                    let (d, _) = oneshot::channel();
                    self.nodes[node].handle_command(now, Command::Shutdown { done: d });
                }
                (0, Command::Shutdown { done })
            }
            other => (0, other),
        };
        let node = sh_node(self.shards.as_ref().expect("shards"), shard);
        self.nodes[node].handle_command(now, cmd);
        self.settle_joins();
    }

    /// Pass on the shards' answers to joins; returns how many were passed on.
    fn settle_joins(&mut self) -> usize {
        let Some(sh) = self.shards.as_mut() else {
            return 0;
        };
        let mut done = 0;
        let mut i = 0;
        while i < sh.pending.len() {
            match sh.pending[i].rx.try_recv() {
                Err(oneshot::error::TryRecvError::Empty) => i += 1,
                res => {
                    let p = sh.pending.swap_remove(i);
                    done += 1;
                    match res {
                        Ok(Ok(acc)) => {
                            sh.placement.joined(
                                &acc.participant_id,
                                &p.room,
                                p.shard,
                                p.identity.as_deref(),
                            );
                            if let Err(Ok(acc)) = p.reply.send(Ok(acc)) {
                                // The client is gone: so is its session.
                                sh.placement.left(&acc.participant_id);
                            }
                        }
                        Ok(Err(e)) => {
                            sh.placement.join_failed(&p.room, p.shard);
                            let _ = p.reply.send(Err(e));
                        }
                        Err(_) => sh.placement.join_failed(&p.room, p.shard),
                    }
                }
            }
        }
        done
    }

    /// Drain every node until a whole pass over them produces nothing. Nodes are polled in
    /// the order they were added: add the signaling server first, so the events its
    /// commands produce reach the clients in the same pass.
    fn settle(&mut self) {
        let now = self.now;
        loop {
            let mut commands = self.settle_joins();
            let mut datagrams = 0;
            for id in 0..self.nodes.len() {
                let mut out = Output::default();
                self.nodes[id].poll_output(now, &mut out);
                datagrams += out.datagrams.len() + out.pipes.len();
                for (from, to, data) in out.datagrams {
                    self.send(id, from, to, data);
                }
                for (to, lane, msgs) in out.pipes {
                    self.send_pipe(id, to, lane, msgs);
                }
                if !out.commands.is_empty() {
                    if self.shards.is_some() {
                        for cmd in out.commands {
                            commands += 1;
                            self.route_command(now, cmd);
                        }
                        continue;
                    }
                    let server = self
                        .signaling
                        .expect("a node sent a signaling command but the net has no server");
                    for cmd in out.commands {
                        commands += 1;
                        self.nodes[server].handle_command(now, cmd);
                    }
                }
            }
            if commands == 0 && datagrams == 0 {
                break;
            }
        }
    }

    /// The next event: (when, Some(datagram seq) | None for a node timeout, node).
    fn next_event(&mut self) -> Option<(Instant, Option<u64>, NodeId)> {
        let mut best: Option<(Instant, Option<u64>, NodeId)> = self
            .queue
            .peek()
            .map(|Reverse((t, seq))| (*t, Some(*seq), self.in_flight[seq].to_node));
        for (id, node) in self.nodes.iter_mut().enumerate() {
            if let Some(t) = node.poll_timeout() {
                let t = t.max(self.now);
                if best.is_none_or(|(b, _, _)| t < b) {
                    best = Some((t, None, id));
                }
            }
        }
        best
    }

    /// Advance to the earliest event and handle it. Returns false when nothing is scheduled.
    pub fn step(&mut self) -> bool {
        self.settle();
        let Some((at, datagram, node)) = self.next_event() else {
            return false;
        };
        self.advance_to(at, datagram, node);
        true
    }

    fn advance_to(&mut self, at: Instant, datagram: Option<u64>, node: NodeId) {
        if at == self.now {
            self.same_instant += 1;
            if self.same_instant > MAX_EVENTS_AT_ONE_INSTANT {
                panic!(
                    "{} events at one instant ({:?}): node {} never moves its deadline",
                    self.same_instant,
                    self.elapsed(),
                    self.nodes[node].name()
                );
            }
        } else {
            self.same_instant = 0;
        }
        self.now = at;
        self.steps += 1;
        match datagram {
            Some(mut seq) => loop {
                self.queue.pop();
                let d = self.in_flight.remove(&seq).expect("queued datagram");
                let to_node = d.to_node;
                match d.what {
                    Carried::Datagram {
                        from,
                        to,
                        link,
                        data,
                    } => {
                        let stats = &mut self.links.get_mut(&link).expect("link").stats;
                        stats.delivered += 1;
                        stats.bytes_delivered += data.len() as u64;
                        self.nodes[to_node].handle_datagram(at, from, to, data);
                    }
                    Carried::Pipe { from, to, msgs } => {
                        let sh = self.shards.as_mut().expect("shards");
                        sh.queued[to] -= 1;
                        let stats = sh.stats.entry((from, to)).or_default();
                        stats.batches_delivered += 1;
                        stats.msgs_delivered += msgs.len() as u64;
                        self.nodes[to_node].handle_pipe(at, from, msgs);
                        break;
                    }
                }
                // With `batch_reads`, every datagram that reaches this node at this instant is
                // read in the same turn, as a driver takes what its socket holds.
                match self.queue.peek() {
                    Some(Reverse((t, next)))
                        if self.batch_reads
                            && *t == at
                            && self.in_flight[next].to_node == to_node
                            && matches!(self.in_flight[next].what, Carried::Datagram { .. }) =>
                    {
                        seq = *next;
                        self.steps += 1;
                    }
                    _ => break,
                }
            },
            None => self.nodes[node].handle_timeout(at),
        }
        self.settle();
    }

    /// Let each node read every datagram that reaches it at one instant in one turn (its core
    /// ends the turn once, after all of them), as the real driver reads what its socket
    /// holds; off by default (one turn per datagram).
    pub fn set_batch_reads(&mut self, on: bool) {
        self.batch_reads = on;
    }

    /// Run every event up to and including `t`, then set the clock to `t`.
    pub fn run_until(&mut self, t: Instant) {
        loop {
            self.settle();
            match self.next_event() {
                Some((at, datagram, node)) if at <= t => self.advance_to(at, datagram, node),
                _ => break,
            }
        }
        if t > self.now {
            self.now = t;
            self.same_instant = 0;
        }
        self.settle();
    }

    /// [`Net::run_until`] `now + d`.
    pub fn run_for(&mut self, d: Duration) {
        let t = self.now + d;
        self.run_until(t);
    }

    /// Run until `cond` holds (checked after every event) or `max` of virtual time has
    /// passed. Returns the virtual time it took, `None` if `cond` never held.
    pub fn run_until_cond(
        &mut self,
        max: Duration,
        mut cond: impl FnMut(&mut Net) -> bool,
    ) -> Option<Duration> {
        let begin = self.now;
        let end = begin + max;
        loop {
            self.settle();
            if cond(self) {
                return Some(self.now - begin);
            }
            match self.next_event() {
                Some((at, datagram, node)) if at <= end => self.advance_to(at, datagram, node),
                _ => {
                    self.now = self.now.max(end);
                    self.settle();
                    return cond(self).then(|| self.now - begin);
                }
            }
        }
    }
}

#[cfg(test)]
// Tests pick an arbitrary origin for their virtual time (and may share test state).
#[allow(clippy::disallowed_methods, clippy::disallowed_types)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, n)), 1000)
    }

    /// Sends `count` datagrams of `size` bytes to `to`, one every `every`, and records what
    /// it receives.
    struct Blaster {
        me: SocketAddr,
        to: SocketAddr,
        size: usize,
        every: Duration,
        left: u32,
        next: Option<Instant>,
        pending: Vec<BytesMut>,
        got: Vec<(Instant, u32)>,
    }

    impl Blaster {
        fn new(me: SocketAddr, to: SocketAddr, start: Instant, count: u32) -> Self {
            Blaster {
                me,
                to,
                size: 1000,
                every: Duration::from_millis(1),
                left: count,
                next: (count > 0).then_some(start),
                pending: Vec::new(),
                got: Vec::new(),
            }
        }
    }

    impl Node for Blaster {
        fn name(&self) -> String {
            format!("blaster {}", self.me)
        }
        fn handle_datagram(&mut self, now: Instant, _: SocketAddr, _: SocketAddr, d: BytesMut) {
            self.got
                .push((now, u32::from_be_bytes([d[0], d[1], d[2], d[3]])));
        }
        fn handle_timeout(&mut self, now: Instant) {
            let n = self.left;
            let mut d = BytesMut::zeroed(self.size);
            d[..4].copy_from_slice(&n.to_be_bytes());
            self.pending.push(d);
            self.left -= 1;
            self.next = (self.left > 0).then(|| now + self.every);
        }
        fn poll_timeout(&mut self) -> Option<Instant> {
            self.next
        }
        fn poll_output(&mut self, _: Instant, out: &mut Output) {
            for d in self.pending.drain(..) {
                out.datagrams.push((self.me, self.to, d));
            }
        }
    }

    fn two(count: u32, link: LinkConfig, seed: u64) -> (Net, NodeId, NodeId) {
        let mut net = Net::new(seed);
        net.set_default_link(link);
        let start = net.now();
        let a = net.add_node(Blaster::new(addr(1), addr(2), start, count), &[addr(1)]);
        let b = net.add_node(Blaster::new(addr(2), addr(1), start, 0), &[addr(2)]);
        (net, a, b)
    }

    #[test]
    fn delay_is_exact_and_order_kept() {
        let (mut net, a, b) = two(100, LinkConfig::default(), 1);
        net.run_for(Duration::from_secs(1));
        let start = net.start();
        let got = net.node::<Blaster>(b).got.clone();
        assert_eq!(got.len(), 100);
        for (i, (at, n)) in got.iter().enumerate() {
            assert_eq!(*n, 100 - i as u32);
            assert_eq!(*at - start, Duration::from_millis(10 + i as u64));
        }
        assert_eq!(net.link_stats(a, b).delivered, 100);
        assert_eq!(net.elapsed(), Duration::from_secs(1));
    }

    #[test]
    fn loss_is_seeded_and_about_right() {
        let link = LinkConfig {
            loss: 0.1,
            ..LinkConfig::default()
        };
        let lost = |seed| {
            let (mut net, a, b) = two(10_000, link.clone(), seed);
            net.run_for(Duration::from_secs(11));
            let s = net.link_stats(a, b);
            assert_eq!(s.lost + s.delivered, 10_000);
            let got: Vec<u32> = net.node::<Blaster>(b).got.iter().map(|g| g.1).collect();
            (s.lost, got)
        };
        let (l1, g1) = lost(5);
        assert!((800..1200).contains(&l1), "lost {l1} of 10000 at 10%");
        assert_eq!(lost(5), (l1, g1.clone()), "same seed, same losses");
        assert_ne!(lost(6).1, g1, "another seed, other losses");
    }

    #[test]
    fn rate_limit_serialises_and_tail_drops() {
        // 1000-byte datagrams every 1 ms = 8 Mbit/s into a 4 Mbit/s link with a 10 kB
        // queue: each takes 2 ms on the wire, the queue fills and then half is dropped.
        let link = LinkConfig {
            rate_bps: Some(4_000_000),
            queue_bytes: 10_000,
            ..LinkConfig::default()
        };
        let (mut net, a, b) = two(1000, link, 1);
        net.run_for(Duration::from_secs(3));
        let s = net.link_stats(a, b);
        assert_eq!(s.delivered + s.queue_drops, 1000);
        assert!((495..=515).contains(&s.delivered), "{s:?}");
        let start = net.start();
        let got = &net.node_ref::<Blaster>(b).got;
        assert_eq!(
            got[0].0 - start,
            Duration::from_millis(12),
            "2 ms on the wire + 10 ms"
        );
        for w in got.windows(2) {
            assert_eq!(
                w[1].0 - w[0].0,
                Duration::from_millis(2),
                "back to back at the rate"
            );
        }
        // The queue bounds the delay: at most 10 kB (20 ms) waiting.
        let sent_at = |n: u32| start + Duration::from_millis(u64::from(1000 - n));
        let worst = got.iter().map(|(at, n)| *at - sent_at(*n)).max().unwrap();
        assert!(worst <= Duration::from_millis(34), "worst delay {worst:?}");
    }

    #[test]
    fn jitter_reorders_within_its_bound() {
        let link = LinkConfig {
            jitter: Duration::from_millis(5),
            ..LinkConfig::default()
        };
        let (mut net, _, b) = two(1000, link, 3);
        net.run_for(Duration::from_secs(2));
        let start = net.start();
        let got = &net.node::<Blaster>(b).got;
        assert_eq!(got.len(), 1000);
        let reordered = got.windows(2).filter(|w| w[1].1 > w[0].1).count();
        assert!(reordered > 50, "reordered {reordered}");
        for (at, n) in got {
            let d = *at - (start + Duration::from_millis(u64::from(1000 - n)));
            assert!(d >= Duration::from_millis(10) && d <= Duration::from_millis(15));
        }
    }

    #[test]
    fn run_until_cond_stops_at_the_condition_or_the_bound() {
        let (mut net, _, b) = two(100, LinkConfig::default(), 1);
        let took = net.run_until_cond(Duration::from_secs(1), |n| {
            n.node::<Blaster>(b).got.len() >= 10
        });
        assert_eq!(took, Some(Duration::from_millis(19)));
        let never = net.run_until_cond(Duration::from_secs(1), |n| {
            n.node::<Blaster>(b).got.len() > 100
        });
        assert_eq!(never, None);
        assert_eq!(net.elapsed(), Duration::from_millis(1019));
    }

    #[test]
    fn unknown_address_is_counted_not_delivered() {
        let mut net = Net::new(1);
        let start = net.now();
        net.add_node(Blaster::new(addr(1), addr(9), start, 5), &[addr(1)]);
        net.run_for(Duration::from_secs(1));
        assert_eq!(net.unroutable, 5);
    }

    /// A stand-in shard: answers joins with ids of its own, records the commands and pipe
    /// batches it gets (a batch as the relay ids of its `TrackClose` messages), and hands the
    /// network the batches queued in `out`.
    #[derive(Default)]
    struct FakeShard {
        me: usize,
        joins: Vec<(String, Vec<ShardId>)>,
        commands: Vec<String>,
        got: Vec<(Instant, ShardId, Vec<u32>)>,
        out: Vec<(ShardId, Lane, Vec<PipeMsg>)>,
        dropped: u64,
    }

    fn batch(relays: &[u32]) -> Vec<PipeMsg> {
        relays
            .iter()
            .map(|&relay| PipeMsg::TrackClose { relay })
            .collect()
    }

    /// Media messages (the only ones a full queue drops), named by their relay.
    fn media(relays: &[u32]) -> Vec<PipeMsg> {
        relays
            .iter()
            .map(|&relay| PipeMsg::Rtp {
                relay,
                layer: 0,
                packet: Default::default(),
                origin: Instant::now(),
            })
            .collect()
    }

    impl Node for FakeShard {
        fn name(&self) -> String {
            format!("shard {}", self.me)
        }
        fn handle_datagram(&mut self, _: Instant, _: SocketAddr, _: SocketAddr, _: BytesMut) {}
        fn handle_timeout(&mut self, _: Instant) {}
        fn poll_timeout(&mut self) -> Option<Instant> {
            None
        }
        fn poll_output(&mut self, _: Instant, out: &mut Output) {
            out.pipes.append(&mut self.out);
        }
        fn handle_command(&mut self, _: Instant, cmd: Command) {
            match cmd {
                Command::Join { req, reply } => {
                    let pid = format!("PA_{}_{}", self.me, self.joins.len());
                    self.joins.push((req.room, req.peers));
                    let _ = reply.send(Ok(JoinAccepted {
                        participant_id: pid,
                        joined: crate::signal::ServerMessage::pong(
                            None,
                            std::time::SystemTime::UNIX_EPOCH,
                        ),
                    }));
                }
                Command::Client { participant, .. } => {
                    self.commands.push(format!("client {participant}"));
                }
                Command::Disconnect { participant, .. } => {
                    self.commands.push(format!("disconnect {participant}"));
                }
                _ => {}
            }
        }
        fn handle_pipe(&mut self, now: Instant, from: ShardId, msgs: Vec<PipeMsg>) {
            let relays = msgs
                .iter()
                .map(|m| match m {
                    PipeMsg::TrackClose { relay } | PipeMsg::Rtp { relay, .. } => *relay,
                    _ => u32::MAX,
                })
                .collect();
            self.got.push((now, from, relays));
        }
        fn pipe_dropped(&mut self, _: Instant, _: ShardId, msgs: Vec<PipeMsg>) {
            self.dropped += msgs.len() as u64;
        }
    }

    /// Sends the commands queued in `cmds` and keeps the join answers.
    #[derive(Default)]
    struct Signaler {
        cmds: Vec<Command>,
        answers: Vec<oneshot::Receiver<Result<JoinAccepted, SfuError>>>,
    }

    impl Signaler {
        fn join(&mut self, room: &str) {
            let (events, _) = tokio::sync::mpsc::channel(1);
            let (reply, rx) = oneshot::channel();
            self.answers.push(rx);
            self.cmds.push(Command::Join {
                req: crate::sfu::JoinRequest {
                    room: room.to_owned(),
                    name: "n".to_owned(),
                    auto_subscribe: true,
                    events,
                    peers: vec![7],
                    identity: None,
                    grants: Default::default(),
                    publish_only: false,
                    view: None,
                    home: None,
                    timeline: Default::default(),
                    session: String::new(),
                },
                reply,
            });
        }
    }

    impl Node for Signaler {
        fn name(&self) -> String {
            "signaler".into()
        }
        fn handle_datagram(&mut self, _: Instant, _: SocketAddr, _: SocketAddr, _: BytesMut) {}
        fn handle_timeout(&mut self, _: Instant) {}
        fn poll_timeout(&mut self) -> Option<Instant> {
            None
        }
        fn poll_output(&mut self, _: Instant, out: &mut Output) {
            out.commands.append(&mut self.cmds);
        }
    }

    fn shards(n: usize, spread_above: usize) -> (Net, Vec<NodeId>, NodeId) {
        let mut net = Net::new(1);
        let nodes: Vec<NodeId> = (0..n)
            .map(|me| {
                net.add_node(
                    FakeShard {
                        me,
                        ..Default::default()
                    },
                    &[addr(100 + me as u8)],
                )
            })
            .collect();
        net.set_shards(nodes.clone(), spread_above);
        let sig = net.add_node(Signaler::default(), &[addr(1)]);
        (net, nodes, sig)
    }

    #[test]
    fn joins_follow_the_placement_and_commands_their_participant() {
        let (mut net, nodes, sig) = shards(2, 2);
        for _ in 0..4 {
            net.node::<Signaler>(sig).join("r");
            net.run_for(Duration::from_millis(1));
        }
        // Two on shard 0 (told of no peer), then spread: two on shard 1, told of shard 0.
        let joins = |net: &mut Net, i: usize| net.node::<FakeShard>(nodes[i]).joins.clone();
        let r = "r".to_owned();
        assert_eq!(
            joins(&mut net, 0),
            vec![(r.clone(), vec![]), (r.clone(), vec![])]
        );
        assert_eq!(joins(&mut net, 1), vec![(r.clone(), vec![0]), (r, vec![0])]);
        let answers: Vec<String> = net
            .node::<Signaler>(sig)
            .answers
            .iter_mut()
            .map(|rx| {
                rx.try_recv()
                    .expect("answered")
                    .expect("accepted")
                    .participant_id
            })
            .collect();
        assert_eq!(answers, ["PA_0_0", "PA_0_1", "PA_1_0", "PA_1_1"]);
        assert_eq!(net.placement().load(), &[2, 2]);
        assert_eq!(net.placement().shard_of("PA_1_0"), Some(1));

        // Later commands go to the participant's shard; a disconnect frees its place.
        let s = net.node::<Signaler>(sig);
        s.cmds.push(Command::Client {
            participant: "PA_1_0".into(),
            msg: crate::signal::ClientMessage::Leave,
        });
        s.cmds.push(Command::Disconnect {
            participant: "PA_1_0".into(),
            why: crate::signal::LeaveReason::Left,
            reason: "left".into(),
        });
        net.run_for(Duration::from_millis(1));
        assert_eq!(
            net.node::<FakeShard>(nodes[1]).commands,
            ["client PA_1_0", "disconnect PA_1_0"]
        );
        assert!(net.node::<FakeShard>(nodes[0]).commands.is_empty());
        assert_eq!(net.placement().load(), &[2, 1]);
        assert_eq!(net.placement().shard_of("PA_1_0"), None);
    }

    #[test]
    fn pipe_batches_arrive_after_the_delay_in_order() {
        let (mut net, nodes, _) = shards(3, 0);
        net.set_pipe(PipeConfig {
            delay: Duration::from_millis(2),
            capacity: None,
        });
        let start = net.now();
        net.node::<FakeShard>(nodes[0]).out = vec![
            (1, Lane::Control, batch(&[1, 2])),
            (2, Lane::Control, batch(&[3])),
            (1, Lane::Control, batch(&[4])),
        ];
        net.run_for(Duration::from_millis(1));
        assert!(
            net.node::<FakeShard>(nodes[1]).got.is_empty(),
            "not before the delay"
        );
        net.run_for(Duration::from_millis(1));
        let at = start + Duration::from_millis(2);
        assert_eq!(
            net.node::<FakeShard>(nodes[1]).got,
            vec![(at, 0, vec![1, 2]), (at, 0, vec![4])]
        );
        assert_eq!(net.node::<FakeShard>(nodes[2]).got, vec![(at, 0, vec![3])]);
        let s = net.pipe_stats(0, 1);
        assert_eq!(
            (s.batches_sent, s.batches_delivered, s.msgs_delivered),
            (2, 2, 3)
        );
        // A shorter delay does not let a later batch overtake an earlier one of the pair.
        net.node::<FakeShard>(nodes[2]).out = vec![(1, Lane::Control, batch(&[5]))];
        net.run_for(Duration::ZERO);
        net.set_pipe(PipeConfig {
            delay: Duration::ZERO,
            capacity: None,
        });
        net.node::<FakeShard>(nodes[2]).out = vec![(1, Lane::Control, batch(&[6]))];
        net.run_for(Duration::from_millis(5));
        let got: Vec<u32> = net.node::<FakeShard>(nodes[1]).got[2..]
            .iter()
            .flat_map(|g| g.2.clone())
            .collect();
        assert_eq!(got, [5, 6]);
    }

    #[test]
    fn a_full_pipe_queue_drops_media_and_tells_the_sender() {
        let (mut net, nodes, _) = shards(2, 0);
        net.set_pipe(PipeConfig {
            delay: Duration::from_millis(1),
            capacity: Some(2),
        });
        net.node::<FakeShard>(nodes[0]).out = vec![
            (1, Lane::Media, media(&[1])),
            (1, Lane::Media, media(&[2, 3])),
            (1, Lane::Media, media(&[4, 5])),
            (1, Lane::Control, batch(&[6])),
            (1, Lane::Media, media(&[7])),
        ];
        net.run_for(Duration::from_millis(2));
        let got: Vec<Vec<u32>> = net
            .node::<FakeShard>(nodes[1])
            .got
            .iter()
            .map(|g| g.2.clone())
            .collect();
        // The control batch arrives all the same.
        assert_eq!(got, [vec![1], vec![2, 3], vec![6]]);
        let s = net.pipe_stats(0, 1);
        assert_eq!((s.batches_dropped, s.msgs_dropped), (2, 3));
        assert_eq!(net.node::<FakeShard>(nodes[0]).dropped, 3);
        // Drained: room again. A batch for a shard that does not exist is dropped too.
        net.node::<FakeShard>(nodes[0]).out = vec![
            (1, Lane::Control, batch(&[8])),
            (5, Lane::Control, batch(&[9, 9])),
        ];
        net.run_for(Duration::from_millis(2));
        assert_eq!(net.node::<FakeShard>(nodes[1]).got.len(), 4);
        assert_eq!(net.pipe_unroutable(), 1);
        assert_eq!(net.node::<FakeShard>(nodes[0]).dropped, 5);
    }
}
