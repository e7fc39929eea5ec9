//! The real SFU core ([`crate::sfu::Sfu`]) as a node of the simulated network.
//!
//! The node feeds the core what the network delivers (`handle_datagram`, `handle_timeout`,
//! signaling commands through `handle_command`), closes each batch with `end_turn`, and hands
//! the datagrams the core sent (collected by [`SimTransmit`]) back to the network.
//!
//! Several nodes can be the shards of one server ([`add_shards`]): each its own core, UDP
//! "port" and seed, their pipe batches carried by the network (see [`super::Net::set_shards`]).

use super::net::{Net, Node, NodeId, Output};
use crate::sfu::latency::LatencyHistogram;
use crate::sfu::pipe::{Lane, PipeMsg, ShardId};
use crate::sfu::{Command, CoreConfig, CoreStats, Remote, Sfu, Transmit};
use bytes::BytesMut;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Collects what the core sends until the node drains it.
#[derive(Debug, Default)]
pub struct SimTransmit {
    /// Datagrams the core sent this turn, with the origin of the forwarded ones.
    queue: Vec<(BytesMut, SocketAddr, Option<Instant>)>,
    /// The in-core latency of the forwarded datagrams (origin → the end of the turn that
    /// sent them), as the real driver records it when it hands them to the kernel.
    pub in_core: LatencyHistogram,
    /// The same for relayed data-channel messages (the DTLS records that carry them).
    pub data_relay: LatencyHistogram,
    /// Datagrams the core has sent.
    pub sent: u64,
    /// Forwarded packets (those with an `origin`).
    pub forwarded: u64,
    /// Batches for other shards, until the node drains them.
    pipes: Vec<(ShardId, Lane, Vec<PipeMsg>)>,
    /// Forwarded datagrams sent since the node last drained the queue (this turn).
    forwarded_this_turn: u64,
    /// Media batches carrying RTP handed to another shard.
    pub rtp_handoffs: u64,
    /// Of those, the ones handed over after this turn had already sent forwarded copies.
    pub rtp_handoffs_after_copies: u64,
    /// Forwarded datagrams sent right after another forwarded one to the same address (a
    /// subscriber's copies of several packets made together).
    pub forwarded_after_same_address: u64,
    /// Where the last forwarded datagram went.
    last_forwarded_to: Option<SocketAddr>,
}

impl Transmit for SimTransmit {
    fn send(&mut self, data: BytesMut, to: Remote, origin: Option<Instant>) {
        let to = to.addr;
        self.sent += 1;
        if origin.is_some() {
            self.forwarded += 1;
            self.forwarded_this_turn += 1;
            if self.last_forwarded_to.replace(to) == Some(to) {
                self.forwarded_after_same_address += 1;
            }
        }
        self.queue.push((data, to, origin));
    }

    fn pipe(&mut self, to: ShardId, lane: Lane, msgs: Vec<PipeMsg>) {
        if msgs.iter().any(|m| matches!(m, PipeMsg::Rtp { .. })) {
            self.rtp_handoffs += 1;
            if self.forwarded_this_turn > 0 {
                self.rtp_handoffs_after_copies += 1;
            }
        }
        self.pipes.push((to, lane, msgs));
    }
}

/// See the module docs.
pub struct SfuNode {
    pub sfu: Sfu<SimTransmit>,
    pub addr: SocketAddr,
    /// How long each datagram waited in the server's socket before the core read it (a
    /// busy core): the core is handed it as received that long before the network delivered
    /// it, as the real driver hands it the kernel's receive stamp. Zero by default.
    pub socket_wait: Duration,
    /// How often each timeout reason fired (by its `Debug` text).
    pub timeouts: BTreeMap<String, u64>,
    dirty: bool,
}

/// The core configuration the sim uses: the node's IP announced, default limits.
pub fn sim_config(ip: IpAddr) -> CoreConfig {
    CoreConfig {
        announce_ips: vec![ip],
        max_data_message: 16 * 1024,
        limits: Default::default(),
        udp_buffer: crate::io::UDP_BUFFER_DEFAULT,
        spread_above: 0,
        history: Default::default(),
        input_tick_hz: 0,
        webhooks: None,
        red: true,
    }
}

impl SfuNode {
    /// A core at `addr` started at `now`, its randomness seeded by `seed`.
    pub fn new(addr: SocketAddr, seed: u64, now: Instant) -> Self {
        Self::with_config(sim_config(addr.ip()), addr, seed, now)
    }

    /// A core with its own configuration.
    pub fn with_config(cfg: CoreConfig, addr: SocketAddr, seed: u64, now: Instant) -> Self {
        let sfu = Sfu::new(cfg, addr, seed, now, SimTransmit::default());
        SfuNode {
            sfu,
            addr,
            socket_wait: Duration::ZERO,
            timeouts: BTreeMap::new(),
            dirty: true,
        }
    }
}

/// The seed of shard `i` of a server seeded `seed` (shard 0 gets `seed` itself, so a
/// one-shard server is the plain [`SfuNode::new`]).
pub fn shard_seed(seed: u64, i: ShardId) -> u64 {
    seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// Add `shards` cores as the shards of one server: shard `i` at `ip:port + i` (like the real
/// server's `udp_port + i`), seeded by [`shard_seed`], rooms spreading over them from
/// `spread_above` participants (0: never), joins placed by the real
/// [`crate::sfu::placement::Placement`] ([`Net::set_shards`]). Add them before the clients
/// (see `Net::settle`). Returns the nodes in shard order.
pub fn add_shards(
    net: &mut Net,
    shards: usize,
    ip: IpAddr,
    port: u16,
    seed: u64,
    spread_above: usize,
) -> Vec<NodeId> {
    let now = net.now();
    let nodes: Vec<NodeId> = (0..shards)
        .map(|i| {
            let port = u16::try_from(usize::from(port) + i).expect("shard ports fit in u16");
            let addr = SocketAddr::new(ip, port);
            let cfg = CoreConfig {
                spread_above,
                ..sim_config(ip)
            };
            net.add_node(
                SfuNode::with_config(cfg, addr, shard_seed(seed, i), now),
                &[addr],
            )
        })
        .collect();
    net.set_shards(nodes.clone(), spread_above);
    nodes
}

impl SfuNode {
    /// The core's counters now (a `Command::Stats` answered within the call).
    pub fn stats(&mut self, now: Instant) -> CoreStats {
        let (reply, mut rx) = tokio::sync::oneshot::channel();
        let _ = self.sfu.handle_command(now, Command::Stats { reply });
        self.sfu.end_turn(now);
        rx.try_recv()
            .expect("the core answers Stats within its turn")
    }

    /// The core's dashboard snapshot now (a `Command::Dashboard` answered within the call).
    pub fn dashboard(&mut self, now: Instant) -> crate::sfu::core::dashboard::DashboardSnapshot {
        let (reply, mut rx) = tokio::sync::oneshot::channel();
        let _ = self.sfu.handle_command(now, Command::Dashboard { reply });
        self.sfu.end_turn(now);
        rx.try_recv()
            .expect("the core answers Dashboard within its turn")
    }
}

impl Node for SfuNode {
    fn name(&self) -> String {
        format!("sfu {}", self.addr)
    }

    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, _to: SocketAddr, data: BytesMut) {
        let received = now.checked_sub(self.socket_wait).unwrap_or(now);
        self.sfu.handle_datagram(now, received, from, &data);
        self.dirty = true;
    }

    fn handle_timeout(&mut self, now: Instant) {
        if let Some(d) = self.sfu.poll_timeout() {
            *self.timeouts.entry(format!("{:?}", d.reason)).or_default() += 1;
        }
        self.sfu.handle_timeout(now);
        self.dirty = true;
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        self.sfu.poll_timeout().map(|d| d.at)
    }

    fn handle_command(&mut self, now: Instant, cmd: Command) {
        // `Flow::Stop` (after a shutdown) needs no action here: the node keeps draining.
        let _ = self.sfu.handle_command(now, cmd);
        self.dirty = true;
    }

    fn handle_pipe(&mut self, now: Instant, from: ShardId, msgs: Vec<PipeMsg>) {
        self.sfu.handle_pipe(now, from, msgs);
        self.dirty = true;
    }

    fn pipe_dropped(&mut self, now: Instant, to: ShardId, msgs: Vec<PipeMsg>) {
        self.sfu.pipe_dropped(now, to, msgs);
        self.dirty = true;
    }

    fn poll_output(&mut self, now: Instant, out: &mut Output) {
        if self.dirty {
            self.sfu.end_turn(now);
            self.dirty = false;
        }
        let tx = self.sfu.transmit();
        tx.forwarded_this_turn = 0;
        tx.last_forwarded_to = None;
        for (data, to, origin) in tx.queue.drain(..) {
            if let Some(origin) = origin {
                let h = match crate::io::udp::latency_kind(&data) {
                    0 => &mut tx.in_core,
                    _ => &mut tx.data_relay,
                };
                h.record(now.saturating_duration_since(origin), 1);
            }
            out.datagrams.push((self.addr, to, data));
        }
        out.pipes.append(&mut tx.pipes);
    }
}
