//! The node-to-node link: pipe messages ([`PipeMsg`]) between two Plaza nodes over UDP,
//! authenticated and encrypted, with a reliable ordered lane and a best-effort one.
//!
//! [`Link`] is a sans-I/O state machine like the core: it is handed datagrams
//! ([`Link::handle_datagram`]), messages to send ([`Link::send`]) and the time
//! ([`Link::handle_timeout`]), and hands out datagrams ([`Link::poll_transmit`]), events
//! ([`Link::poll_event`]: messages, peers up and down) and its next deadline
//! ([`Link::poll_timeout`]). [`driver`] runs one on a tokio UDP socket.
//!
//! # Wire format
//!
//! A datagram is sealed ([`seal`]):
//!
//! ```text
//! version u8 | node u32 | salt u32 | counter u64 | ChaCha20-Poly1305(frames) | tag (16)
//! ```
//!
//! and its plaintext is a sequence of frames (integers big-endian):
//!
//! ```text
//! 0x01 ACK      next u64                           every control frame before `next` arrived
//! 0x02 CONTROL  seq u64 | flags u8 | len u16 | fragment   flags bit 0: more fragments follow
//! 0x03 MEDIA    seq u64 | len u16 | message
//! 0x04 PING     (asks for an ACK)
//! ```
//!
//! A message is a [`codec::LinkMsg`] encoded by [`codec`] (RTP in a compact binary form, the
//! rest as JSON). A datagram is at most [`LinkConfig::max_datagram`] bytes (1400 by default:
//! it fits a 1500-byte MTU over IPv6 with room to spare). Frames are packed into datagrams as
//! they fit: acknowledgements first, then retransmissions, new control frames, media.
//!
//! # Lanes
//!
//! - **Control** ([`Lane::Control`]): reliable and in order per peer. Each frame has a
//!   sequence number; the receiver delivers in order, keeps frames that arrive early (up to
//!   the window), and acknowledges cumulatively. A message larger than one frame is split
//!   into fragments (consecutive sequence numbers; the last without the *more* flag), up to
//!   [`codec::MAX_MESSAGE`] bytes; a larger one is refused by [`Link::send`]. At most
//!   [`LinkConfig::window`] frames are in flight; up to [`LinkConfig::max_pending`] more wait,
//!   and past that `send` refuses with [`LinkError::QueueFull`] (the caller decides: the link
//!   never drops a control message it accepted, while the peer's session lasts). An
//!   unacknowledged frame is sent again after a timeout of about twice the smoothed round-trip
//!   time (within [`LinkConfig::rto_min`]..[`LinkConfig::rto_max`]), doubled on each retry up to
//!   `rto_max`.
//! - **Media** ([`Lane::Media`]): best effort. Each message is one frame (a message larger
//!   than one frame is refused); frames are numbered so that the receiver counts what was
//!   lost (`media_lost`), and are never sent twice. A full media queue drops the new message
//!   and counts it (`media_dropped`).
//!
//! A peer is *up* from the first authentic datagram it sends; a node with nothing else to send
//! to a peer pings it every [`LinkConfig::keepalive`], and a peer from which nothing authentic
//! has arrived for [`LinkConfig::down_after`] is reported down ([`LinkEvent::PeerDown`]; up
//! again when it is heard from).
//!
//! # Security model
//!
//! Each node draws a random 32-byte key when it starts and publishes it through the control
//! plane (its Redis record); the link is given its own key and a table of the peers' ids,
//! addresses and keys ([`Link::set_peer`]). A node seals what it sends with its own key; a
//! receiver opens a datagram with the key of the node its header names.
//!
//! - **Authenticated**: the whole datagram. The header (version, sending node, salt,
//!   counter) is associated data, the frames are the ciphertext; the Poly1305 tag covers
//!   both. A datagram that does not authenticate, names a node not in the table, or is not
//!   fresh is dropped and counted ([`LinkStats`]); nothing of it is parsed before it
//!   authenticates but its 17-byte header.
//! - **Encrypted**: the frames (messages, sequence numbers, acknowledgements). The header is
//!   in the clear: an observer learns which node sent a datagram, its size and time, and how
//!   many datagrams the node sent.
//! - **Nonces**: `salt ‖ counter`, where the salt is random per start and the counter counts
//!   the sender's datagrams (never reused; sealing stops before it would wrap). A key is never
//!   used with one nonce twice, even if a node were started twice with the same key.
//! - **Replay**: the receiver accepts each counter once, within a window of the newest
//!   [`seal::REPLAY_WINDOW`] counters, and only the salt first seen under the key; older or
//!   repeated datagrams are dropped (`replayed`). The window moves only for datagrams that
//!   authenticated.
//! - **What an attacker on the path can do**: drop, delay, reorder datagrams (the control
//!   lane repairs losses; a long outage makes the peer down), and count them. **What it
//!   cannot do**: read or change a message, inject one, replay one, or impersonate a node,
//!   without its key. Datagrams are sent to the address in the peer table, not to where the
//!   last one came from, so a rewritten source address does not move the traffic.
//! - **Trust**: whoever can write the control plane's records can name keys, so the control
//!   plane is trusted. A new key for a peer (a restart) starts a new session with it: both
//!   lanes start over, and the control frames not yet acknowledged by the old one are
//!   dropped (counted in `control_abandoned`).

pub mod codec;
pub mod driver;
pub mod seal;

use crate::sfu::pipe::Lane;
use codec::{CodecError, LinkMsg};
use seal::{Header, Key, Opener, SealError, Sealer};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// A node's number on the link (in every datagram's header).
pub type NodeNum = u32;

const FRAME_ACK: u8 = 1;
const FRAME_CONTROL: u8 = 2;
const FRAME_MEDIA: u8 = 3;
const FRAME_PING: u8 = 4;
const ACK_LEN: usize = 1 + 8;
const CONTROL_OVERHEAD: usize = 1 + 8 + 1 + 2;
const MEDIA_OVERHEAD: usize = 1 + 8 + 2;
const MORE: u8 = 1;

/// The link's settings.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// This node's number.
    pub node: NodeNum,
    /// This node's key (random per start).
    pub key: Key,
    /// Random per start (the nonces' first four bytes).
    pub salt: u32,
    /// The largest datagram (UDP payload), within 256..=65000.
    pub max_datagram: usize,
    /// Control frames in flight per peer (and how far ahead a receiver keeps frames).
    pub window: usize,
    /// Control frames waiting for the window per peer.
    pub max_pending: usize,
    /// Media messages waiting per peer.
    pub media_queue: usize,
    pub rto_min: Duration,
    pub rto_max: Duration,
    /// A peer with nothing else to send to is pinged this often.
    pub keepalive: Duration,
    /// A peer not heard from for this long is down.
    pub down_after: Duration,
}

impl LinkConfig {
    /// The defaults, with this node's number, key and salt.
    pub fn new(node: NodeNum, key: Key, salt: u32) -> LinkConfig {
        LinkConfig {
            node,
            key,
            salt,
            max_datagram: 1400,
            window: 256,
            max_pending: 8192,
            media_queue: 1024,
            rto_min: Duration::from_millis(50),
            rto_max: Duration::from_secs(1),
            keepalive: Duration::from_millis(500),
            down_after: Duration::from_secs(3),
        }
    }

    fn max_plaintext(&self) -> usize {
        self.max_datagram
            .saturating_sub(seal::HEADER_LEN + seal::TAG_LEN)
    }

    /// The largest message the media lane takes (one frame next to an ACK).
    pub fn max_media_message(&self) -> usize {
        self.max_plaintext()
            .saturating_sub(ACK_LEN + MEDIA_OVERHEAD)
    }

    fn max_fragment(&self) -> usize {
        self.max_plaintext()
            .saturating_sub(ACK_LEN + CONTROL_OVERHEAD)
    }
}

/// What the link tells its owner.
// Nearly every event is a message; boxing them would cost an allocation each.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum LinkEvent {
    /// A message from `peer`, on `lane`.
    Message {
        peer: NodeNum,
        lane: Lane,
        msg: LinkMsg,
    },
    /// An authentic datagram arrived from a peer that was down (or never heard from).
    PeerUp(NodeNum),
    /// Nothing authentic arrived from the peer for `down_after`.
    PeerDown(NodeNum),
}

/// Why [`Link::send`] refused a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    #[error("unknown peer {0}")]
    UnknownPeer(NodeNum),
    #[error("message of {0} bytes too large for its lane")]
    TooLarge(usize),
    #[error("queue to the peer is full")]
    QueueFull,
    #[error(transparent)]
    Codec(#[from] CodecError),
}

/// The link's counters (since start, all peers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub datagrams_sent: u64,
    pub bytes_sent: u64,
    pub datagrams_received: u64,
    pub bytes_received: u64,
    /// Dropped: too short, or an unknown version.
    pub malformed: u64,
    /// Dropped: names a node not in the table.
    pub unknown_sender: u64,
    /// Dropped: did not authenticate.
    pub auth_failed: u64,
    /// Dropped: a counter already seen, older than the window, or another start's salt.
    pub replayed: u64,
    /// Authentic datagrams whose frames did not parse (the rest of the datagram is dropped).
    pub bad_frames: u64,
    /// Authentic messages that did not decode.
    pub decode_errors: u64,
    pub control_sent: u64,
    pub control_retransmitted: u64,
    pub control_delivered: u64,
    /// Control frames dropped when a peer's session started over (a new key).
    pub control_abandoned: u64,
    /// Control frames beyond the receive window (the sender sends them again).
    pub control_out_of_window: u64,
    pub media_sent: u64,
    pub media_delivered: u64,
    /// Media messages the receiver never got (gaps in the numbering).
    pub media_lost: u64,
    /// Media messages dropped by a full queue.
    pub media_dropped: u64,
    pub peers_down: u64,
}

#[derive(Debug)]
struct InFlight {
    seq: u64,
    flags: u8,
    bytes: Vec<u8>,
    /// When it was last sent (`None`: not yet).
    sent: Option<Instant>,
    retries: u32,
    deadline: Option<Instant>,
}

#[derive(Debug)]
struct Peer {
    addr: SocketAddr,
    key: Key,
    opener: Opener,
    // Control, sending.
    next_seq: u64,
    /// Unacknowledged frames, oldest first; those sent at least once are a prefix.
    outq: VecDeque<InFlight>,
    srtt: Option<Duration>,
    // Control, receiving.
    expected: u64,
    early: BTreeMap<u64, (u8, Vec<u8>)>,
    assembling: Vec<u8>,
    /// The message being put together grew too large: skip to its last fragment.
    discarding: bool,
    ack_due: bool,
    // Media.
    media_out: VecDeque<Vec<u8>>,
    media_seq: u64,
    media_newest: Option<u64>,
    media_received: u64,
    media_lost_counted: u64,
    // Liveness.
    up: bool,
    last_heard: Option<Instant>,
    last_sent: Option<Instant>,
    ping_due: bool,
}

impl Peer {
    fn new(addr: SocketAddr, key: Key) -> Peer {
        Peer {
            addr,
            key,
            opener: Opener::new(&key),
            next_seq: 0,
            outq: VecDeque::new(),
            srtt: None,
            expected: 0,
            early: BTreeMap::new(),
            assembling: Vec::new(),
            discarding: false,
            ack_due: false,
            media_out: VecDeque::new(),
            media_seq: 0,
            media_newest: None,
            media_received: 0,
            media_lost_counted: 0,
            up: false,
            last_heard: None,
            last_sent: None,
            ping_due: true,
        }
    }

    fn rto(&self, cfg: &LinkConfig) -> Duration {
        self.srtt
            .map_or(Duration::from_millis(200), |s| {
                s * 2 + Duration::from_millis(5)
            })
            .clamp(cfg.rto_min, cfg.rto_max)
    }

    fn in_flight(&self) -> usize {
        self.outq.iter().take_while(|f| f.sent.is_some()).count()
    }
}

/// The link: see the module documentation.
#[derive(Debug)]
pub struct Link {
    cfg: LinkConfig,
    sealer: Sealer,
    peers: HashMap<NodeNum, Peer>,
    /// Peer numbers in a fixed order, for fair transmission.
    order: Vec<NodeNum>,
    next_peer: usize,
    events: VecDeque<LinkEvent>,
    stats: LinkStats,
    scratch: Vec<u8>,
}

impl Link {
    pub fn new(mut cfg: LinkConfig) -> Link {
        // Room for a frame next to an ACK, and frame lengths that fit 16 bits.
        cfg.max_datagram = cfg.max_datagram.clamp(256, 65_000);
        cfg.window = cfg.window.max(1);
        Link {
            sealer: Sealer::new(cfg.node, &cfg.key, cfg.salt),
            cfg,
            peers: HashMap::new(),
            order: Vec::new(),
            next_peer: 0,
            events: VecDeque::new(),
            stats: LinkStats::default(),
            scratch: Vec::new(),
        }
    }

    pub fn config(&self) -> &LinkConfig {
        &self.cfg
    }

    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// Whether `peer` is up.
    pub fn is_up(&self, peer: NodeNum) -> bool {
        self.peers.get(&peer).is_some_and(|p| p.up)
    }

    /// Adds or updates a peer. A new key is a new start of the peer: its session starts over.
    pub fn set_peer(&mut self, id: NodeNum, addr: SocketAddr, key: Key) {
        match self.peers.get_mut(&id) {
            Some(p) if p.key == key => p.addr = addr,
            Some(p) => {
                self.stats.control_abandoned += p.outq.len() as u64;
                let was_up = p.up;
                *p = Peer::new(addr, key);
                if was_up {
                    // Reported down now, up again when the new start is heard from.
                    self.stats.peers_down += 1;
                    self.events.push_back(LinkEvent::PeerDown(id));
                }
            }
            None => {
                self.peers.insert(id, Peer::new(addr, key));
                self.order.push(id);
            }
        }
    }

    /// Forgets a peer (what waits for it is dropped).
    pub fn remove_peer(&mut self, id: NodeNum) {
        if let Some(p) = self.peers.remove(&id) {
            self.stats.control_abandoned += p.outq.len() as u64;
            self.order.retain(|&n| n != id);
        }
    }

    /// Queues `msg` for `peer` on `lane`.
    pub fn send(&mut self, peer: NodeNum, lane: Lane, msg: &LinkMsg) -> Result<(), LinkError> {
        let max_fragment = self.cfg.max_fragment();
        let max_media = self.cfg.max_media_message();
        let (max_pending, window, media_queue) =
            (self.cfg.max_pending, self.cfg.window, self.cfg.media_queue);
        let p = self
            .peers
            .get_mut(&peer)
            .ok_or(LinkError::UnknownPeer(peer))?;
        let mut bytes = Vec::new();
        codec::encode(msg, &mut bytes)?;
        match lane {
            Lane::Media => {
                if bytes.len() > max_media {
                    return Err(LinkError::TooLarge(bytes.len()));
                }
                if p.media_out.len() >= media_queue {
                    self.stats.media_dropped += 1;
                    return Err(LinkError::QueueFull);
                }
                p.media_out.push_back(bytes);
            }
            Lane::Control => {
                let frags = bytes.len().div_ceil(max_fragment.max(1)).max(1);
                if p.outq.len() + frags > max_pending + window {
                    return Err(LinkError::QueueFull);
                }
                let mut chunks = bytes.chunks(max_fragment.max(1)).peekable();
                if chunks.peek().is_none() {
                    return Err(LinkError::Codec(CodecError::Truncated));
                }
                while let Some(c) = chunks.next() {
                    let flags = if chunks.peek().is_some() { MORE } else { 0 };
                    p.outq.push_back(InFlight {
                        seq: p.next_seq,
                        flags,
                        bytes: c.to_vec(),
                        sent: None,
                        retries: 0,
                        deadline: None,
                    });
                    p.next_seq += 1;
                }
            }
        }
        Ok(())
    }

    /// One datagram from `from`.
    pub fn handle_datagram(&mut self, _from: SocketAddr, d: &[u8], now: Instant) {
        self.stats.datagrams_received += 1;
        self.stats.bytes_received += d.len() as u64;
        let h = match Header::parse(d) {
            Ok(h) => h,
            Err(_) => {
                self.stats.malformed += 1;
                return;
            }
        };
        let Some(p) = self.peers.get_mut(&h.node) else {
            self.stats.unknown_sender += 1;
            return;
        };
        let mut buf = std::mem::take(&mut self.scratch);
        match p.opener.open(&h, d, &mut buf).map(<[u8]>::len) {
            Ok(len) => self.on_plaintext(h.node, &buf[..len], now),
            Err(SealError::Auth) => self.stats.auth_failed += 1,
            Err(SealError::Replay | SealError::StaleSalt) => self.stats.replayed += 1,
            Err(_) => self.stats.malformed += 1,
        }
        self.scratch = buf;
    }

    fn on_plaintext(&mut self, node: NodeNum, plain: &[u8], now: Instant) {
        let window = self.cfg.window as u64;
        let Some(p) = self.peers.get_mut(&node) else {
            return;
        };
        p.last_heard = Some(now);
        if !p.up {
            p.up = true;
            self.events.push_back(LinkEvent::PeerUp(node));
        }
        let mut r = codec::Reader(plain);
        while !r.0.is_empty() {
            let frame = (|| -> Result<(), CodecError> {
                match r.u8()? {
                    FRAME_ACK => {
                        let next = r.u64()?;
                        let mut rtt = None;
                        while p
                            .outq
                            .front()
                            .is_some_and(|f| f.seq < next && f.sent.is_some())
                        {
                            if let Some(f) = p.outq.pop_front() {
                                if f.retries == 0 {
                                    rtt = f.sent.map(|s| now.saturating_duration_since(s));
                                }
                            }
                        }
                        if let Some(rtt) = rtt {
                            p.srtt = Some(p.srtt.map_or(rtt, |s| (s * 7 + rtt) / 8));
                        }
                    }
                    FRAME_CONTROL => {
                        let seq = r.u64()?;
                        let flags = r.u8()?;
                        let len = r.u16()? as usize;
                        let body = r.take(len)?;
                        p.ack_due = true;
                        if seq >= p.expected.saturating_add(window) {
                            self.stats.control_out_of_window += 1;
                        } else if seq >= p.expected {
                            p.early.entry(seq).or_insert_with(|| (flags, body.to_vec()));
                        }
                    }
                    FRAME_MEDIA => {
                        let seq = r.u64()?;
                        let len = r.u16()? as usize;
                        let body = r.take(len)?;
                        p.media_received += 1;
                        p.media_newest = Some(p.media_newest.map_or(seq, |n| n.max(seq)));
                        match codec::decode(body, now) {
                            Ok(msg) => {
                                self.stats.media_delivered += 1;
                                self.events.push_back(LinkEvent::Message {
                                    peer: node,
                                    lane: Lane::Media,
                                    msg,
                                });
                            }
                            Err(_) => self.stats.decode_errors += 1,
                        }
                    }
                    FRAME_PING => p.ack_due = true,
                    k => return Err(CodecError::UnknownKind(k)),
                }
                Ok(())
            })();
            if frame.is_err() {
                self.stats.bad_frames += 1;
                break;
            }
        }
        // Media lost: the numbers up to the newest that have not come (a late arrival lowers
        // that; the count only grows, so it is the most ever missing at once).
        if let Some(n) = p.media_newest {
            let lost = n.saturating_add(1).saturating_sub(p.media_received);
            if lost > p.media_lost_counted {
                self.stats.media_lost += lost - p.media_lost_counted;
                p.media_lost_counted = lost;
            }
        }
        // Control frames now in order.
        while let Some((flags, body)) = p.early.remove(&p.expected) {
            p.expected += 1;
            if !p.discarding {
                p.assembling.extend_from_slice(&body);
                if p.assembling.len() > codec::MAX_MESSAGE {
                    p.discarding = true;
                    p.assembling = Vec::new();
                    self.stats.decode_errors += 1;
                }
            }
            if flags & MORE == 0 {
                if !p.discarding {
                    match codec::decode(&p.assembling, now) {
                        Ok(msg) => {
                            self.stats.control_delivered += 1;
                            self.events.push_back(LinkEvent::Message {
                                peer: node,
                                lane: Lane::Control,
                                msg,
                            });
                        }
                        Err(_) => self.stats.decode_errors += 1,
                    }
                }
                p.assembling.clear();
                p.discarding = false;
            }
        }
    }

    /// Fires what is due at `now`: peers that went silent are down, idle ones get a ping.
    pub fn handle_timeout(&mut self, now: Instant) {
        for &id in &self.order {
            let Some(p) = self.peers.get_mut(&id) else {
                continue;
            };
            if p.up
                && p.last_heard
                    .is_some_and(|t| now.saturating_duration_since(t) >= self.cfg.down_after)
            {
                p.up = false;
                self.stats.peers_down += 1;
                self.events.push_back(LinkEvent::PeerDown(id));
            }
            if p.last_sent
                .is_none_or(|t| now.saturating_duration_since(t) >= self.cfg.keepalive)
            {
                p.ping_due = true;
            }
        }
    }

    /// The next datagram to send, if any (call until `None` after every input).
    pub fn poll_transmit(&mut self, now: Instant) -> Option<(SocketAddr, Vec<u8>)> {
        let n = self.order.len();
        for i in 0..n {
            let id = self.order[(self.next_peer + i) % n];
            if let Some(plain) = self.build(id, now) {
                self.next_peer = (self.next_peer + i + 1) % n;
                let mut out = Vec::with_capacity(plain.len() + seal::HEADER_LEN + seal::TAG_LEN);
                if self.sealer.seal(&plain, &mut out).is_err() {
                    return None;
                }
                let p = self.peers.get_mut(&id)?;
                p.last_sent = Some(now);
                self.stats.datagrams_sent += 1;
                self.stats.bytes_sent += out.len() as u64;
                return Some((p.addr, out));
            }
        }
        None
    }

    /// The plaintext of the next datagram to `id`, if it has anything to send.
    fn build(&mut self, id: NodeNum, now: Instant) -> Option<Vec<u8>> {
        let max = self.cfg.max_plaintext();
        let window = self.cfg.window;
        let p = self.peers.get_mut(&id)?;
        let rto = p.rto(&self.cfg);
        let rto_max = self.cfg.rto_max;
        let mut out = Vec::new();
        if p.ack_due {
            out.push(FRAME_ACK);
            out.extend_from_slice(&p.expected.to_be_bytes());
            p.ack_due = false;
        }
        // Control: retransmissions due, then new frames within the window (the frames sent
        // are a prefix of the queue).
        let mut in_flight = p.in_flight();
        for f in p.outq.iter_mut() {
            let due = match f.sent {
                Some(_) => f.deadline.is_some_and(|d| d <= now),
                None if in_flight >= window => break,
                None => true,
            };
            if !due {
                continue;
            }
            if out.len() + CONTROL_OVERHEAD + f.bytes.len() > max {
                break;
            }
            out.push(FRAME_CONTROL);
            out.extend_from_slice(&f.seq.to_be_bytes());
            out.push(f.flags);
            out.extend_from_slice(&(f.bytes.len() as u16).to_be_bytes());
            out.extend_from_slice(&f.bytes);
            if f.sent.is_some() {
                f.retries += 1;
                self.stats.control_retransmitted += 1;
            } else {
                in_flight += 1;
                self.stats.control_sent += 1;
            }
            f.sent = Some(now);
            let backoff = rto.saturating_mul(1 << f.retries.min(16)).min(rto_max);
            f.deadline = Some(now + backoff);
        }
        // Media.
        while let Some(m) = p.media_out.front() {
            if out.len() + MEDIA_OVERHEAD + m.len() > max {
                break;
            }
            let m = p.media_out.pop_front()?;
            out.push(FRAME_MEDIA);
            out.extend_from_slice(&p.media_seq.to_be_bytes());
            out.extend_from_slice(&(m.len() as u16).to_be_bytes());
            out.extend_from_slice(&m);
            p.media_seq += 1;
            self.stats.media_sent += 1;
        }
        if out.is_empty() && p.ping_due {
            out.push(FRAME_PING);
        }
        p.ping_due = false;
        (!out.is_empty()).then_some(out)
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<LinkEvent> {
        self.events.pop_front()
    }

    /// When [`Link::handle_timeout`] (and then [`Link::poll_transmit`]) must run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.peers
            .values()
            .flat_map(|p| {
                let retransmit = p
                    .outq
                    .iter()
                    .take_while(|f| f.sent.is_some())
                    .filter_map(|f| f.deadline)
                    .min();
                // Never sent: a ping is due at once (the caller polls transmit anyway).
                let keepalive = p.last_sent.map(|t| t + self.cfg.keepalive);
                let down =
                    p.up.then(|| p.last_heard.map(|t| t + self.cfg.down_after))
                        .flatten();
                [retransmit, keepalive, down]
            })
            .flatten()
            .min()
    }
}

#[cfg(test)]
// The simulated network's clock starts at one real instant.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use crate::sfu::pipe::PipeMsg;
    use bytes::Bytes;
    use codec::arbitrary;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const A: NodeNum = 1;
    const B: NodeNum = 2;

    fn addr(n: NodeNum) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n as u8], 7000))
    }

    /// Two links on a simulated network: a delay, jitter (so datagrams overtake each other)
    /// and a loss probability, one virtual clock.
    struct Net {
        rng: StdRng,
        now: Instant,
        links: [Link; 2],
        /// (arrival, destination index, datagram)
        flying: Vec<(Instant, usize, Vec<u8>)>,
        loss: f64,
        delay: Duration,
        jitter: Duration,
        events: [Vec<(Instant, LinkEvent)>; 2],
        /// Every datagram sent, per sender.
        sent: [Vec<Vec<u8>>; 2],
    }

    impl Net {
        fn new(seed: u64, loss: f64) -> Net {
            let ka = [1; 32];
            let kb = [2; 32];
            let mut a = Link::new(LinkConfig::new(A, ka, 11));
            let mut b = Link::new(LinkConfig::new(B, kb, 22));
            a.set_peer(B, addr(B), kb);
            b.set_peer(A, addr(A), ka);
            Net {
                rng: StdRng::seed_from_u64(seed),
                now: Instant::now(),
                links: [a, b],
                flying: Vec::new(),
                loss,
                delay: Duration::from_millis(20),
                jitter: Duration::from_millis(30),
                events: [Vec::new(), Vec::new()],
                sent: [Vec::new(), Vec::new()],
            }
        }

        fn pump(&mut self) {
            for i in 0..2 {
                while let Some((to, d)) = self.links[i].poll_transmit(self.now) {
                    assert_eq!(to, addr([B, A][i]));
                    assert!(d.len() <= self.links[i].config().max_datagram);
                    self.sent[i].push(d.clone());
                    if self.rng.random_bool(self.loss) {
                        continue;
                    }
                    let jitter = self.jitter.mul_f64(self.rng.random());
                    self.flying.push((self.now + self.delay + jitter, 1 - i, d));
                }
                while let Some(e) = self.links[i].poll_event() {
                    self.events[i].push((self.now, e));
                }
            }
        }

        /// Runs until `until` (virtual).
        fn run_until(&mut self, until: Instant) {
            self.pump();
            loop {
                let next = self
                    .flying
                    .iter()
                    .map(|f| f.0)
                    .chain(self.links.iter().filter_map(Link::poll_timeout))
                    .min()
                    .map_or(until, |t| t.min(until));
                self.now = self.now.max(next);
                let (due, later): (Vec<_>, Vec<_>) =
                    self.flying.drain(..).partition(|f| f.0 <= self.now);
                self.flying = later;
                let mut due = due;
                due.sort_by_key(|f| f.0);
                for (_, to, d) in due {
                    let from = addr([A, B][1 - to]);
                    self.links[to].handle_datagram(from, &d, self.now);
                }
                for l in &mut self.links {
                    l.handle_timeout(self.now);
                }
                self.pump();
                if self.now >= until {
                    return;
                }
            }
        }

        fn run_for(&mut self, d: Duration) {
            let until = self.now + d;
            self.run_until(until);
        }

        fn messages(&self, i: usize, lane: Lane) -> Vec<&LinkMsg> {
            self.events[i]
                .iter()
                .filter_map(|(_, e)| match e {
                    LinkEvent::Message { lane: l, msg, .. } if *l == lane => Some(msg),
                    _ => None,
                })
                .collect()
        }
    }

    fn numbered(i: u32, big: bool) -> LinkMsg {
        LinkMsg {
            origin: 5,
            from_shard: 1,
            to_shard: 2,
            msg: if big {
                // Several fragments.
                PipeMsg::Data {
                    room: format!("room-{i}"),
                    from: "p".into(),
                    channel: "chat",
                    is_text: true,
                    framed: Bytes::from(vec![i as u8; 5000]),
                    to: crate::sfu::timeline::Audience::All,
                    origin: Instant::now(),
                }
            } else {
                PipeMsg::TrackClose { relay: i }
            },
        }
    }

    fn number(m: &LinkMsg) -> u32 {
        match &m.msg {
            PipeMsg::TrackClose { relay } => *relay,
            PipeMsg::Data { room, framed, .. } => {
                assert_eq!(framed.len(), 5000);
                room["room-".len()..].parse().unwrap()
            }
            PipeMsg::Rtp { relay, .. } => *relay,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn control_arrives_once_in_order_over_a_lossy_reordering_network() {
        let mut net = Net::new(7, 0.2);
        let mut r = StdRng::seed_from_u64(8);
        let start = net.now;
        let (mut control, mut media) = (0u32, 0u32);
        // 20 s: every 10 ms, a few control messages (one in 20 big) both ways and media one
        // way.
        for step in 0..2000u32 {
            for _ in 0..r.random_range(0..3) {
                let m = numbered(control, control % 20 == 7);
                net.links[0].send(B, Lane::Control, &m).unwrap();
                net.links[1].send(A, Lane::Control, &m).unwrap();
                control += 1;
            }
            for _ in 0..3 {
                let mut packet = arbitrary::packet(&mut r, 1000);
                packet.header.sequence_number = media as u16;
                let m = LinkMsg {
                    origin: 5,
                    from_shard: 0,
                    to_shard: 0,
                    msg: PipeMsg::Rtp {
                        relay: media,
                        layer: 0,
                        packet,
                        origin: net.now,
                    },
                };
                net.links[0].send(B, Lane::Media, &m).unwrap();
                media += 1;
            }
            net.run_until(start + Duration::from_millis(10) * (step + 1));
        }
        net.run_for(Duration::from_secs(5));
        for i in [0, 1] {
            let got: Vec<u32> = net
                .messages(i, Lane::Control)
                .into_iter()
                .map(number)
                .collect();
            assert_eq!(got, (0..control).collect::<Vec<_>>(), "node {i}");
        }
        let (a, b) = (net.links[0].stats(), net.links[1].stats());
        assert!(a.control_retransmitted > 0);
        assert_eq!(
            a.control_sent as usize,
            net.links[0].peers[&B].next_seq as usize
        );
        // Media: each sent once; what arrived, arrived once; the rest is counted lost.
        assert_eq!(a.media_sent, u64::from(media));
        let got: Vec<u32> = net
            .messages(1, Lane::Media)
            .into_iter()
            .map(number)
            .collect();
        let mut unique = got.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), got.len(), "no media twice");
        assert_eq!(b.media_delivered + b.media_lost, u64::from(media));
        let loss = b.media_lost as f64 / f64::from(media);
        assert!((0.1..0.35).contains(&loss), "{loss}");
        assert_eq!(
            (
                b.auth_failed,
                b.replayed,
                b.unknown_sender,
                b.decode_errors,
                b.bad_frames
            ),
            (0, 0, 0, 0, 0)
        );
        // Nobody went down (the outages of a 20 % loss are short).
        assert_eq!((a.peers_down, b.peers_down), (0, 0));
        assert!(net.links[0].is_up(B) && net.links[1].is_up(A));
    }

    #[test]
    fn hostile_datagrams_are_dropped_and_counted() {
        let mut net = Net::new(1, 0.0);
        net.links[0]
            .send(B, Lane::Control, &numbered(1, false))
            .unwrap();
        net.pump();
        let good = net.flying.iter().find(|f| f.1 == 1).unwrap().2.clone();
        net.flying.clear();
        let b = &mut net.links[1];
        let now = net.now;
        let from = addr(A);
        // Tampered, anywhere.
        for i in 0..good.len() {
            let mut t = good.clone();
            t[i] ^= 1;
            b.handle_datagram(from, &t, now);
        }
        // Truncated.
        for n in 0..good.len() {
            b.handle_datagram(from, &good[..n], now);
        }
        // From a node not in the table (sealed with its own key).
        let mut stranger = Link::new(LinkConfig::new(9, [9; 32], 1));
        stranger.set_peer(B, addr(B), [2; 32]);
        while let Some((_, d)) = stranger.poll_transmit(now) {
            b.handle_datagram(from, &d, now);
        }
        // A node in the table, but a wrong key.
        let mut forger = Link::new(LinkConfig::new(A, [3; 32], 11));
        forger.set_peer(B, addr(B), [2; 32]);
        while let Some((_, d)) = forger.poll_transmit(now) {
            b.handle_datagram(from, &d, now);
        }
        let s = b.stats();
        assert!(b.poll_event().is_none(), "nothing delivered, nobody up");
        // The real one, then again.
        b.handle_datagram(from, &good, now);
        b.handle_datagram(from, &good, now);
        let s2 = b.stats();
        assert_eq!(s2.control_delivered, 1);
        assert_eq!(s2.replayed, 1);
        // The stranger, and a flipped bit in the node field (4 bytes).
        assert_eq!(s.unknown_sender, 1 + 4);
        assert_eq!(s.malformed, (seal::HEADER_LEN + seal::TAG_LEN) as u64 + 1);
        // Flipped version byte: malformed; salt, counter, body and tag: not authentic (the
        // salt is not latched yet), plus the forger's datagram and the truncated ones long
        // enough to parse.
        let parsable_truncated = (good.len() - seal::HEADER_LEN - seal::TAG_LEN) as u64;
        assert_eq!(
            s.auth_failed,
            (good.len() - 5) as u64 + parsable_truncated + 1
        );
        assert!(matches!(b.poll_event(), Some(LinkEvent::PeerUp(A))));
        assert!(matches!(b.poll_event(), Some(LinkEvent::Message { .. })));
    }

    #[test]
    fn a_silent_peer_is_down_within_the_bound_and_up_when_it_comes_back() {
        let mut net = Net::new(3, 0.0);
        net.run_for(Duration::from_secs(2));
        assert!(net.links[0].is_up(B) && net.links[1].is_up(A));
        let down_after = net.links[0].config().down_after;
        // B goes silent (everything it sends is lost).
        let cut = net.now;
        net.loss = 1.0;
        // Control sent meanwhile is kept and arrives once the peer is back.
        for i in 0..50 {
            net.links[1]
                .send(A, Lane::Control, &numbered(i, i == 3))
                .unwrap();
        }
        net.run_for(down_after * 2);
        let downs: Vec<Instant> = net.events[0]
            .iter()
            .filter(|(_, e)| matches!(e, LinkEvent::PeerDown(B)))
            .map(|(t, _)| *t)
            .collect();
        assert_eq!(downs.len(), 1);
        let took = downs[0] - cut;
        // Heard from last at most a keepalive before the cut (plus the network's delay).
        assert!(took <= down_after, "{took:?}");
        assert!(took + net.links[0].config().keepalive + Duration::from_millis(60) >= down_after);
        assert!(!net.links[0].is_up(B));
        // Retransmissions back off but keep going at `rto_max` at most.
        // (49 small messages and one in several fragments.)
        let frames = net.links[1].peers[&A].outq.len() as u64;
        assert!(frames > 50);
        let before = net.links[1].stats().control_retransmitted;
        net.run_for(Duration::from_secs(10));
        let retransmitted = net.links[1].stats().control_retransmitted - before;
        let rto_max = net.links[1].config().rto_max.as_secs_f64();
        assert!(
            retransmitted as f64 <= frames as f64 * (10.0 / rto_max + 1.0),
            "{retransmitted} retransmissions of {frames} frames in 10 s"
        );
        // Back.
        net.loss = 0.0;
        net.run_for(Duration::from_secs(3));
        assert!(net.links[0].is_up(B));
        assert!(matches!(
            net.events[0].last(),
            Some((_, LinkEvent::Message { .. }))
        ));
        let got: Vec<u32> = net
            .messages(0, Lane::Control)
            .into_iter()
            .map(number)
            .collect();
        assert_eq!(got, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn a_new_key_starts_the_session_over() {
        let mut net = Net::new(4, 0.0);
        net.links[0]
            .send(B, Lane::Control, &numbered(0, false))
            .unwrap();
        net.run_for(Duration::from_secs(1));
        // B restarts: new key, new salt, fresh state.
        let kb2 = [5; 32];
        net.links[1] = Link::new(LinkConfig::new(B, kb2, 33));
        net.events[1].clear();
        net.links[1].set_peer(A, addr(A), [1; 32]);
        net.links[0].set_peer(B, addr(B), kb2);
        net.links[0]
            .send(B, Lane::Control, &numbered(1, false))
            .unwrap();
        net.run_for(Duration::from_secs(1));
        let got: Vec<u32> = net
            .messages(1, Lane::Control)
            .into_iter()
            .map(number)
            .collect();
        assert_eq!(got, [1]);
        assert!(net.links[0].is_up(B));
        assert_eq!(net.links[1].stats().replayed, 0);
    }

    #[test]
    fn oversized_and_unknown_are_refused() {
        let mut l = Link::new(LinkConfig::new(A, [1; 32], 1));
        let m = numbered(1, false);
        assert_eq!(l.send(B, Lane::Control, &m), Err(LinkError::UnknownPeer(B)));
        l.set_peer(B, addr(B), [2; 32]);
        // A media message must fit one datagram.
        assert!(matches!(
            l.send(B, Lane::Media, &numbered(1, true)),
            Err(LinkError::TooLarge(_))
        ));
        // A control message up to MAX_MESSAGE is fragmented, past it refused.
        let huge = LinkMsg {
            msg: PipeMsg::Bye {
                room: "x".repeat(codec::MAX_MESSAGE),
            },
            ..m
        };
        assert!(matches!(
            l.send(B, Lane::Control, &huge),
            Err(LinkError::Codec(CodecError::TooLarge(_)))
        ));
        // The send queue is bounded.
        let mut refused = 0;
        for i in 0..20_000 {
            refused += usize::from(l.send(B, Lane::Control, &numbered(i, false)).is_err());
        }
        let cfg = l.config();
        assert_eq!(refused, 20_000 - cfg.window - cfg.max_pending);
    }
}
