//! The simulated network: nodes with addresses, directed links with delay, loss and a rate
//! limit, and one virtual clock.
//!
//! Shaped after quinn's `Pair::step` and str0m's test harness: every node is a sans-I/O state
//! machine; [`Net::step`] advances the clock to the earliest event (a datagram arriving or a
//! node's deadline), delivers or fires it, then lets every node drain its output
//! ([`Node::poll_output`]) until nothing more comes out. Nothing here reads the wall clock
//! after [`Net::new`].

#![allow(clippy::disallowed_methods)] // one real instant starts the virtual clock
use crate::sfu::Command;
use bytes::BytesMut;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::any::Any;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Index of a node in its [`Net`].
pub type NodeId = usize;

/// What a node hands the network when it is drained.
#[derive(Default)]
pub struct Output {
    /// Datagrams to send: (from, to, bytes).
    pub datagrams: Vec<(SocketAddr, SocketAddr, BytesMut)>,
    /// Signaling commands for the network's signaling server node (see
    /// [`Net::set_signaling_server`]); delivered at once, in order.
    pub commands: Vec<Command>,
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
    stats: LinkStats,
}

struct InFlight {
    from: SocketAddr,
    to: SocketAddr,
    to_node: NodeId,
    link: (NodeId, NodeId),
    data: BytesMut,
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
    /// Datagrams sent to an address no node has.
    pub unroutable: u64,
    /// Events processed (datagram deliveries and timeouts).
    pub steps: u64,
    same_instant: u32,
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
            unroutable: 0,
            steps: 0,
            same_instant: 0,
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
                from,
                to,
                to_node,
                link: (from_node, to_node),
                data,
            },
        );
    }

    /// Drain every node until a whole pass over them produces nothing. Nodes are polled in
    /// the order they were added: add the signaling server first, so the events its
    /// commands produce reach the clients in the same pass.
    fn settle(&mut self) {
        let now = self.now;
        loop {
            let mut commands = 0;
            let mut datagrams = 0;
            for id in 0..self.nodes.len() {
                let mut out = Output::default();
                self.nodes[id].poll_output(now, &mut out);
                datagrams += out.datagrams.len();
                for (from, to, data) in out.datagrams {
                    self.send(id, from, to, data);
                }
                if !out.commands.is_empty() {
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
            Some(seq) => {
                self.queue.pop();
                let d = self.in_flight.remove(&seq).expect("queued datagram");
                let stats = &mut self.links.get_mut(&d.link).expect("link").stats;
                stats.delivered += 1;
                stats.bytes_delivered += d.data.len() as u64;
                self.nodes[d.to_node].handle_datagram(at, d.from, d.to, d.data);
            }
            None => self.nodes[node].handle_timeout(at),
        }
        self.settle();
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
}
