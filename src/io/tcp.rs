//! ICE over TCP, passive side (RFC 6544), with RFC 4571 framing.
//!
//! A client whose UDP is blocked connects to the shard's TCP port (announced in a
//! `tcptype passive` candidate) and sends every ICE, DTLS and SRTP packet as a frame: a 2-byte
//! big-endian length, then the packet. Each accepted connection gets two small tasks on the
//! shard's runtime: a reader that unframes what arrives and hands each frame to the driver as
//! a datagram from the connection's remote address ([`TcpEvent`]), and a writer that frames
//! what the core sends to that address. The core's packet path stays the same: the driver's
//! sink looks the destination up in [`TcpConns`] and queues the datagram there instead of on
//! the UDP socket.
//!
//! Everything is bounded: connections per shard ([`MAX_CONNECTIONS`]), frame size
//! ([`MAX_FRAME`]: a larger length prefix closes the connection), the time to a first valid
//! STUN exchange ([`STUN_TIMEOUT`]), silence ([`IDLE_TIMEOUT`]), and each connection's write
//! queue ([`WRITE_QUEUE`]: a full queue drops, as a congested UDP path would; the shard never
//! waits for a connection).

use crate::sfu::IceTcpStats;
use bytes::{Buf, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// Largest frame accepted: a full-size datagram and a margin (DTLS records and SRTP packets
/// stay under the path MTU; browsers send ~1200 bytes).
pub const MAX_FRAME: usize = 1500 + 548;
/// Open ICE-TCP connections per shard at most; more are closed at once. Lowered where the
/// open-file limit is small ([`connection_cap`]).
pub const MAX_CONNECTIONS: usize = 1024;

/// The ICE-TCP connections each of `shards` shards may keep open: [`MAX_CONNECTIONS`], but
/// all shards together at most a quarter of the open-file limit (each connection is a file
/// descriptor, and HTTP connections and the process need the rest). At least 1.
pub fn connection_cap(shards: usize, nofile_soft: Option<u64>) -> usize {
    let Some(soft) = nofile_soft else {
        return MAX_CONNECTIONS;
    };
    let share = usize::try_from(soft / 4).unwrap_or(usize::MAX) / shards.max(1);
    share.clamp(1, MAX_CONNECTIONS)
}
/// A connection the core has sent nothing to (no STUN request of it was valid) within this
/// time is closed.
pub const STUN_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection that sends nothing for this long is closed (ICE consent checks come every
/// few seconds).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A write that cannot complete in this time (the client does not read) ends the writer.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Datagrams queued for one connection; more are dropped.
pub const WRITE_QUEUE: usize = 256;
/// Capacity of the channel from all readers of a shard to its driver.
pub const EVENT_QUEUE: usize = 1024;
/// Bytes read per call.
const READ_CHUNK: usize = 4096;
/// Most bytes the writer hands to one `write` call.
const WRITE_BATCH: usize = 64 * 1024;

/// A frame's length prefix is larger than [`MAX_FRAME`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Oversize(pub usize);

/// RFC 4571 unframing: bytes in, in whatever pieces the stream delivers them; whole frames
/// out.
#[derive(Debug)]
pub struct Deframer {
    buf: BytesMut,
    max: usize,
}

impl Deframer {
    pub fn new(max: usize) -> Self {
        Deframer {
            buf: BytesMut::with_capacity(READ_CHUNK),
            max,
        }
    }

    /// Bytes just read.
    pub fn extend(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole frame, `None` until one is complete, or the oversize length that makes
    /// the stream unusable (nothing after it can be trusted).
    pub fn next_frame(&mut self) -> Result<Option<BytesMut>, Oversize> {
        if self.buf.len() < 2 {
            return Ok(None);
        }
        let len = usize::from(u16::from_be_bytes([self.buf[0], self.buf[1]]));
        if len > self.max {
            return Err(Oversize(len));
        }
        if self.buf.len() < 2 + len {
            return Ok(None);
        }
        self.buf.advance(2);
        Ok(Some(self.buf.split_to(len)))
    }

    /// Bytes of an incomplete frame are waiting (at end of stream: it was cut off).
    pub fn is_mid_frame(&self) -> bool {
        !self.buf.is_empty()
    }
}

/// Append `data` to `out` as one RFC 4571 frame. `data` longer than 65535 bytes cannot be
/// framed: false, nothing appended.
pub fn frame(out: &mut Vec<u8>, data: &[u8]) -> bool {
    let Ok(len) = u16::try_from(data.len()) else {
        return false;
    };
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(data);
    true
}

/// A STUN Binding request (RFC 5389 header: type 0x0001, magic cookie): what an ICE-TCP
/// connection must start with.
pub fn is_binding_request(data: &[u8]) -> bool {
    data.len() >= 20 && data[..2] == [0, 1] && data[4..8] == [0x21, 0x12, 0xa4, 0x42]
}

/// Why a reader stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed (or reset) the connection.
    Closed,
    /// A length prefix over [`MAX_FRAME`].
    Oversize,
    /// Nothing for [`IDLE_TIMEOUT`].
    Idle,
    /// The first frame was not a STUN Binding request.
    NotStun,
}

/// From a connection's reader to the driver.
#[derive(Debug)]
pub enum TcpEvent {
    /// One unframed packet from `peer`, and when the reader had it.
    Frame {
        peer: SocketAddr,
        data: BytesMut,
        read: Instant,
    },
    /// The reader of connection `id` stopped.
    Closed {
        peer: SocketAddr,
        id: u64,
        why: CloseReason,
    },
}

struct Conn {
    id: u64,
    out: mpsc::Sender<BytesMut>,
    /// The core has sent something here (it answered a valid STUN request).
    answered: bool,
    reader: AbortHandle,
}

/// One shard's ICE-TCP connections, by the client's address: where the sink sends what the
/// core addresses to them.
pub struct TcpConns {
    conns: HashMap<SocketAddr, Conn>,
    /// When each connection must have been answered, in accept order (so in deadline order).
    deadlines: VecDeque<(Instant, SocketAddr, u64)>,
    next_id: u64,
    max: usize,
    stats: IceTcpStats,
}

impl Default for TcpConns {
    fn default() -> Self {
        TcpConns::new(MAX_CONNECTIONS)
    }
}

impl TcpConns {
    pub fn new(max: usize) -> Self {
        TcpConns {
            conns: HashMap::new(),
            deadlines: VecDeque::new(),
            next_id: 0,
            max,
            stats: IceTcpStats::default(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// The counters, with the open connections.
    pub fn stats(&self) -> IceTcpStats {
        IceTcpStats {
            open: self.conns.len() as u64,
            ..self.stats.clone()
        }
    }

    /// A frame from `peer` arrived: counted, and `true`, if its connection is still open.
    pub fn count_frame_in(&mut self, peer: SocketAddr) -> bool {
        let open = self.conns.contains_key(&peer);
        self.stats.frames_in += u64::from(open);
        open
    }

    /// Queue `data` for `to` if it is an ICE-TCP client (a full queue drops it); `Err(data)`
    /// when `to` is not one (it goes out over UDP).
    pub fn send(&mut self, to: SocketAddr, data: BytesMut) -> Result<(), BytesMut> {
        let Some(conn) = self.conns.get_mut(&to) else {
            return Err(data);
        };
        conn.answered = true;
        match conn.out.try_send(data) {
            Ok(()) => self.stats.frames_out += 1,
            Err(_) => self.stats.frames_dropped += 1,
        }
        Ok(())
    }

    /// Take an accepted connection: start its reader and writer (on the current runtime).
    /// `false`: refused (over the cap, or its address is taken), and closed.
    pub fn accept(
        &mut self,
        stream: TcpStream,
        peer: SocketAddr,
        events: &mpsc::Sender<TcpEvent>,
        now: Instant,
    ) -> bool {
        if self.conns.len() >= self.max || self.conns.contains_key(&peer) {
            self.stats.refused += 1;
            return false;
        }
        let _ = stream.set_nodelay(true);
        let id = self.next_id;
        self.next_id += 1;
        let (read, write) = stream.into_split();
        let (out, out_rx) = mpsc::channel(WRITE_QUEUE);
        let reader = tokio::spawn(read_frames(read, peer, id, events.clone())).abort_handle();
        tokio::spawn(write_frames(write, out_rx));
        self.conns.insert(
            peer,
            Conn {
                id,
                out,
                answered: false,
                reader,
            },
        );
        self.deadlines.push_back((now + STUN_TIMEOUT, peer, id));
        self.stats.accepted += 1;
        true
    }

    /// The reader of connection `id` from `peer` stopped: forget it (its writer ends when the
    /// queue's sender goes). `true` if it was still open.
    pub fn closed(&mut self, peer: SocketAddr, id: u64, why: CloseReason) -> bool {
        if self.conns.get(&peer).is_none_or(|c| c.id != id) {
            return false;
        }
        self.conns.remove(&peer);
        match why {
            CloseReason::Closed => {}
            CloseReason::Oversize => self.stats.closed_oversize += 1,
            CloseReason::Idle => self.stats.closed_idle += 1,
            CloseReason::NotStun => self.stats.closed_no_stun += 1,
        }
        true
    }

    /// When the next unanswered connection is due to be closed.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.front().map(|d| d.0)
    }

    /// Close the connections that have not been answered by `now`; their addresses.
    pub fn expire(&mut self, now: Instant) -> Vec<SocketAddr> {
        let mut gone = Vec::new();
        while let Some(&(at, peer, id)) = self.deadlines.front() {
            if at > now {
                break;
            }
            self.deadlines.pop_front();
            let stale = self
                .conns
                .get(&peer)
                .is_some_and(|c| c.id == id && !c.answered);
            if stale {
                if let Some(c) = self.conns.remove(&peer) {
                    c.reader.abort();
                }
                self.stats.closed_no_stun += 1;
                gone.push(peer);
            }
        }
        gone
    }

    /// Close every connection (shutdown).
    pub fn close_all(&mut self) {
        for (_, c) in self.conns.drain() {
            c.reader.abort();
        }
        self.deadlines.clear();
    }
}

/// Unframe what `peer` sends and hand it to the driver, until the connection ends or breaks a
/// rule; then say so.
async fn read_frames(
    mut read: OwnedReadHalf,
    peer: SocketAddr,
    id: u64,
    events: mpsc::Sender<TcpEvent>,
) {
    let why = read_loop(&mut read, peer, &events).await;
    let _ = events.send(TcpEvent::Closed { peer, id, why }).await;
}

async fn read_loop(
    read: &mut OwnedReadHalf,
    peer: SocketAddr,
    events: &mpsc::Sender<TcpEvent>,
) -> CloseReason {
    let mut deframer = Deframer::new(MAX_FRAME);
    let mut buf = vec![0u8; READ_CHUNK];
    let mut first = true;
    loop {
        let n = match tokio::time::timeout(IDLE_TIMEOUT, read.read(&mut buf)).await {
            Err(_) => return CloseReason::Idle,
            Ok(Ok(0) | Err(_)) => return CloseReason::Closed,
            Ok(Ok(n)) => n,
        };
        // The frames' origin for the in-core latency: a shard busy with other work reads
        // them from the channel later.
        #[allow(clippy::disallowed_methods)] // the reader, not the core: it stamps what it read
        let read_at = Instant::now();
        deframer.extend(&buf[..n]);
        loop {
            match deframer.next_frame() {
                Ok(Some(data)) => {
                    if std::mem::take(&mut first) && !is_binding_request(&data) {
                        return CloseReason::NotStun;
                    }
                    // Waits while the driver is behind: the client's TCP window closes, as
                    // its sending rate deserves.
                    let frame = TcpEvent::Frame {
                        peer,
                        data,
                        read: read_at,
                    };
                    if events.send(frame).await.is_err() {
                        return CloseReason::Closed;
                    }
                }
                Ok(None) => break,
                Err(Oversize(_)) => return CloseReason::Oversize,
            }
        }
    }
}

/// Frame what the core sends to this connection and write it, several datagrams per call.
async fn write_frames(mut write: OwnedWriteHalf, mut queue: mpsc::Receiver<BytesMut>) {
    let mut buf = Vec::with_capacity(WRITE_BATCH);
    while let Some(first) = queue.recv().await {
        buf.clear();
        frame(&mut buf, &first);
        while buf.len() < WRITE_BATCH {
            match queue.try_recv() {
                Ok(more) => {
                    frame(&mut buf, &more);
                }
                Err(_) => break,
            }
        }
        match tokio::time::timeout(WRITE_TIMEOUT, write.write_all(&buf)).await {
            Ok(Ok(())) => {}
            _ => break,
        }
    }
    // Dropping the write half sends FIN.
}

#[cfg(test)]
// Tests read the clock for their deadlines.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    fn framed(packets: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in packets {
            assert!(frame(&mut out, p));
        }
        out
    }

    fn drain(d: &mut Deframer) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        while let Some(f) = d.next_frame().unwrap() {
            frames.push(f.to_vec());
        }
        frames
    }

    #[test]
    fn frame_prefixes_the_length() {
        assert_eq!(framed(&[b"abc"]), vec![0, 3, b'a', b'b', b'c']);
        assert_eq!(framed(&[b""]), vec![0, 0]);
        let mut out = Vec::new();
        assert!(!frame(&mut out, &vec![0u8; 65_536]));
        assert!(out.is_empty());
        assert!(frame(&mut out, &vec![7u8; 65_535]));
        assert_eq!(&out[..2], &[0xff, 0xff]);
    }

    /// Frames split across reads at every possible point come out whole and in order.
    #[test]
    fn frames_split_across_reads() {
        let packets: [&[u8]; 3] = [b"first packet", b"", &[9u8; 1400]];
        let bytes = framed(&packets);
        for cut in 0..bytes.len() {
            let mut d = Deframer::new(MAX_FRAME);
            d.extend(&bytes[..cut]);
            let mut got = drain(&mut d);
            d.extend(&bytes[cut..]);
            got.extend(drain(&mut d));
            assert_eq!(got.len(), 3, "cut at {cut}");
            for (g, p) in got.iter().zip(packets) {
                assert_eq!(g.as_slice(), p, "cut at {cut}");
            }
            assert!(!d.is_mid_frame());
        }
        // One byte at a time.
        let mut d = Deframer::new(MAX_FRAME);
        let mut got = Vec::new();
        for b in &bytes {
            d.extend(std::slice::from_ref(b));
            got.extend(drain(&mut d));
        }
        assert_eq!(got.len(), 3);
        assert_eq!(got[2], vec![9u8; 1400]);
    }

    #[test]
    fn several_frames_in_one_read() {
        let packets: Vec<Vec<u8>> = (0..50u8).map(|i| vec![i; usize::from(i) * 7]).collect();
        let refs: Vec<&[u8]> = packets.iter().map(Vec::as_slice).collect();
        let mut d = Deframer::new(MAX_FRAME);
        d.extend(&framed(&refs));
        assert_eq!(drain(&mut d), packets);
    }

    /// A length over the limit is refused as soon as its prefix is read, before the body.
    #[test]
    fn oversize_length_is_refused() {
        let mut d = Deframer::new(MAX_FRAME);
        d.extend(&framed(&[b"ok"]));
        d.extend(&u16::try_from(MAX_FRAME + 1).unwrap().to_be_bytes());
        assert_eq!(d.next_frame().unwrap().unwrap().as_ref(), b"ok");
        assert_eq!(d.next_frame(), Err(Oversize(MAX_FRAME + 1)));
        // Exactly the limit is fine.
        let mut d = Deframer::new(MAX_FRAME);
        d.extend(&framed(&[&vec![1u8; MAX_FRAME]]));
        assert_eq!(d.next_frame().unwrap().unwrap().len(), MAX_FRAME);
    }

    /// A stream that ends inside a frame leaves it incomplete (never a short frame).
    #[test]
    fn eof_mid_frame() {
        let bytes = framed(&[b"whole", b"cut off here"]);
        let mut d = Deframer::new(MAX_FRAME);
        d.extend(&bytes[..bytes.len() - 3]);
        assert_eq!(drain(&mut d), vec![b"whole".to_vec()]);
        assert!(d.is_mid_frame());
        // Half a length prefix.
        let mut d = Deframer::new(MAX_FRAME);
        d.extend(&[0]);
        assert_eq!(d.next_frame(), Ok(None));
        assert!(d.is_mid_frame());
    }

    /// Garbage never panics: any bytes give frames, `None` or an oversize error.
    #[test]
    fn the_connection_cap_leaves_most_descriptors_to_the_rest() {
        assert_eq!(connection_cap(2, None), MAX_CONNECTIONS);
        assert_eq!(connection_cap(2, Some(1_048_576)), MAX_CONNECTIONS);
        // 20000 / 4 = 5000 over 8 shards: 625 each.
        assert_eq!(connection_cap(8, Some(20_000)), 625);
        assert_eq!(connection_cap(2, Some(1024)), 128);
        assert_eq!(connection_cap(4, Some(3)), 1);
    }

    #[test]
    fn garbage_never_panics() {
        let mut x: u32 = 0x1234_5678;
        for _ in 0..200 {
            let mut d = Deframer::new(MAX_FRAME);
            for _ in 0..20 {
                let chunk: Vec<u8> = (0..(x % 700))
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        x as u8
                    })
                    .collect();
                d.extend(&chunk);
                match d.next_frame() {
                    Ok(Some(f)) => assert!(f.len() <= MAX_FRAME),
                    Ok(None) => {}
                    Err(Oversize(n)) => {
                        assert!(n > MAX_FRAME);
                        break;
                    }
                }
            }
        }
        assert!(!is_binding_request(&[0, 1, 0, 0]));
        let mut req = vec![0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42];
        req.extend([0u8; 12]);
        assert!(is_binding_request(&req));
        req[1] = 0x11; // a Binding indication
        assert!(!is_binding_request(&req));
    }

    /// The connection table: the sink finds TCP clients, the cap refuses, unanswered
    /// connections expire and answered ones stay, a stale close is ignored.
    #[tokio::test]
    async fn connection_table() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (events, mut events_rx) = mpsc::channel(EVENT_QUEUE);
        let mut conns = TcpConns::new(2);
        let now = Instant::now();
        let mut clients = Vec::new();
        let mut peers = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(addr).await.unwrap());
            let (stream, peer) = listener.accept().await.unwrap();
            peers.push(peer);
            let ok = conns.accept(stream, peer, &events, now);
            assert_eq!(ok, peers.len() <= 2);
        }
        assert_eq!(conns.len(), 2);
        assert_eq!(conns.stats().refused, 1);
        // The third (refused) stream was dropped: its client reads EOF.
        let mut b = [0u8; 1];
        assert_eq!(clients[2].read(&mut b).await.unwrap(), 0);

        let udp_peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert!(conns.send(udp_peer, BytesMut::from(&b"x"[..])).is_err());
        conns
            .send(peers[0], BytesMut::from(&b"hello"[..]))
            .expect("a TCP client");
        let mut got = [0u8; 7];
        clients[0].read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"\x00\x05hello");

        assert_eq!(conns.next_deadline(), Some(now + STUN_TIMEOUT));
        assert!(conns.expire(now).is_empty());
        // Only the unanswered one goes.
        assert_eq!(conns.expire(now + STUN_TIMEOUT), vec![peers[1]]);
        assert_eq!(conns.len(), 1);
        assert_eq!(conns.stats().closed_no_stun, 1);
        assert_eq!(clients[1].read(&mut b).await.unwrap(), 0);

        // The client's first frame is not STUN: its reader says so.
        clients[0].write_all(&framed(&[b"not stun"])).await.unwrap();
        let ev = tokio::time::timeout(Duration::from_secs(5), events_rx.recv())
            .await
            .unwrap()
            .unwrap();
        let TcpEvent::Closed { peer, id, why } = ev else {
            panic!("{ev:?}");
        };
        assert_eq!((peer, why), (peers[0], CloseReason::NotStun));
        assert!(!conns.closed(peer, id + 100, why));
        assert!(conns.closed(peer, id, why));
        assert!(conns.is_empty());
        assert_eq!(conns.stats().closed_no_stun, 2);
    }
}
