//! Batched UDP output.
//!
//! The driver collects the datagrams the core produces during one turn into an
//! [`OutQueue`] and hands them to the kernel together: one `sendmmsg(2)` call per up to
//! [`BATCH`] messages on Linux instead of one `sendto(2)` per datagram, and consecutive
//! datagrams for one destination of one size in one message (UDP segmentation offload, see
//! [`Plan`]). Elsewhere it falls back to one send per datagram. Sending never blocks: when the socket buffer is full the rest of the batch
//! is dropped (and counted), as a congested network would.

use crate::sfu::latency::LatencyHistogram;
use bytes::BytesMut;
use rustc_hash::FxHashMap;
use std::collections::hash_map::Entry;
use std::net::SocketAddr;
use std::time::Instant;
use tokio::net::UdpSocket;

/// Datagrams handed to the kernel per call.
pub const BATCH: usize = 64;

/// Buffers of sent datagrams kept for the next ones (see [`OutQueue::buffer`]).
const SPARE: usize = 4 * BATCH;

/// The capacity a new datagram buffer starts with: an Ethernet MTU, so that a reused buffer
/// fits any media packet without growing.
const BUFFER_CAPACITY: usize = 1500;

/// Datagrams for one destination that leave in one message (UDP segmentation offload): at
/// most this many (older kernels' limit)...
const MAX_SEGMENTS: usize = 64;

/// ... and at most this many bytes together (an IP datagram's limit, less its headers).
const MAX_SEGMENTED_BYTES: usize = 65_000;

/// What one [`OutQueue::send`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SendOutcome {
    pub sent: u64,
    pub dropped: u64,
    pub calls: u64,
    /// Of `sent`, the datagrams that left as segments of a larger message.
    pub segmented: u64,
}

/// Which latency a datagram with an origin counts in: 0 media, 1 data channels (a DTLS
/// record).
pub fn latency_kind(datagram: &[u8]) -> usize {
    usize::from(datagram.first() == Some(&crate::sfu::core::DTLS_APPLICATION_DATA))
}

/// Datagrams waiting to be sent, in order for each destination.
#[derive(Debug)]
pub struct OutQueue {
    queue: Vec<(BytesMut, SocketAddr)>,
    /// When the kernel received the packet each queued RTP datagram carries (`None` for
    /// everything else), parallel to `queue`.
    origins: Vec<Option<Instant>>,
    /// Buffers whose datagrams have been sent, emptied, for the next ones (at most [`SPARE`],
    /// none larger than twice [`BUFFER_CAPACITY`]).
    spare: Vec<BytesMut>,
    /// Whether consecutive datagrams for one destination leave as one segmented message
    /// (Linux's `UDP_SEGMENT`); off for good once the kernel refuses one.
    segments: bool,
    plan: Plan,
}

impl Default for OutQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl OutQueue {
    pub fn new() -> Self {
        OutQueue {
            queue: Vec::with_capacity(BATCH),
            origins: Vec::with_capacity(BATCH),
            spare: Vec::with_capacity(SPARE),
            segments: cfg!(target_os = "linux"),
            plan: Plan::default(),
        }
    }

    /// An empty buffer for the next datagram: one a sent datagram left, or a new one.
    pub fn buffer(&mut self) -> BytesMut {
        self.spare
            .pop()
            .unwrap_or_else(|| BytesMut::with_capacity(BUFFER_CAPACITY))
    }

    /// Buffers kept for reuse.
    #[cfg(test)]
    fn spare(&self) -> usize {
        self.spare.len()
    }

    /// Queue a datagram. `origin`: for forwarded media, when its source packet arrived.
    pub fn push(&mut self, data: BytesMut, to: SocketAddr, origin: Option<Instant>) {
        self.queue.push((data, to));
        self.origins.push(origin);
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Send everything queued and empty the queue: each destination's datagrams in the order
    /// they were queued, runs of them together as one segmented message where the kernel
    /// takes it (see [`Plan`]). Record how long each media datagram's packet spent in the
    /// server (`latency[0]`), and each data-channel one's message (`latency[1]`: a DTLS
    /// record).
    pub fn send(&mut self, socket: &UdpSocket, latency: &mut [LatencyHistogram; 2]) -> SendOutcome {
        let mut outcome = SendOutcome::default();
        self.plan.make(&self.queue, self.segments);
        for messages in self.plan.messages.chunks(BATCH) {
            let now = Instant::now();
            for m in messages {
                for &i in self.plan.datagrams(m) {
                    let i = i as usize;
                    if let Some(origin) = self.origins[i] {
                        latency[latency_kind(&self.queue[i].0)]
                            .record(now.saturating_duration_since(origin), 1);
                    }
                }
            }
            send_messages(
                socket,
                &self.queue,
                &self.plan,
                messages,
                &mut self.segments,
                &mut outcome,
            );
        }
        for (mut data, _) in self.queue.drain(..) {
            if self.spare.len() == SPARE {
                break;
            }
            // (An oversized one, grown for a jumbo packet, is not kept.)
            if data.capacity() <= 2 * BUFFER_CAPACITY {
                data.clear();
                self.spare.push(data);
            }
        }
        self.queue.clear();
        self.origins.clear();
        outcome
    }
}

/// One message of a send: `count` datagrams for one destination, `order[first..]` of its
/// [`Plan`]. More than one leave as UDP segments of `segment` bytes (the last may be shorter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Message {
    first: u32,
    count: u32,
    segment: u32,
}

/// How a queue's datagrams leave: each destination's in their queued order, consecutive ones
/// of one size (the last of a run may be shorter, as the kernel's segmentation requires)
/// together in one message, at most [`MAX_SEGMENTS`] and [`MAX_SEGMENTED_BYTES`] of them. A
/// fan-out queues each packet's copy for every subscriber in turn, so a turn that handles a
/// frame's packets queues a run of them for each subscriber: one message instead of one per
/// packet saves the kernel most of its per-datagram work on the way out. Destinations come in
/// the order of their first datagram. Worked out anew for each send, into reused storage.
#[derive(Debug, Default)]
struct Plan {
    /// Queue indices in sending order.
    order: Vec<u32>,
    messages: Vec<Message>,
    /// For each queued datagram, the next one for the same destination (or `NONE`).
    next: Vec<u32>,
    /// Each destination's first and last queued datagram.
    chains: FxHashMap<SocketAddr, (u32, u32)>,
    /// First datagram of each destination, in queue order.
    heads: Vec<u32>,
}

const NONE: u32 = u32::MAX;

impl Plan {
    /// Plan `queue`'s send; `segments: false` makes a message of every datagram, in queue
    /// order.
    fn make(&mut self, queue: &[(BytesMut, SocketAddr)], segments: bool) {
        self.order.clear();
        self.messages.clear();
        if !segments {
            for i in 0..queue.len() as u32 {
                self.order.push(i);
                self.messages.push(Message {
                    first: i,
                    count: 1,
                    segment: queue[i as usize].0.len() as u32,
                });
            }
            return;
        }
        self.next.clear();
        self.next.resize(queue.len(), NONE);
        self.chains.clear();
        self.heads.clear();
        for (i, (_, to)) in queue.iter().enumerate() {
            let i = i as u32;
            match self.chains.entry(*to) {
                Entry::Occupied(mut e) => {
                    let (_, tail) = e.get_mut();
                    self.next[*tail as usize] = i;
                    *tail = i;
                }
                Entry::Vacant(e) => {
                    e.insert((i, i));
                    self.heads.push(i);
                }
            }
        }
        for &head in &self.heads {
            let mut i = head;
            // The message being filled, its bytes, and whether it has its shorter last one.
            let mut open: Option<(Message, usize, bool)> = None;
            while i != NONE {
                let len = queue[i as usize].0.len();
                match &mut open {
                    Some((m, bytes, short))
                        if !*short
                            && len > 0
                            && len <= m.segment as usize
                            && (m.count as usize) < MAX_SEGMENTS
                            && *bytes + len <= MAX_SEGMENTED_BYTES =>
                    {
                        m.count += 1;
                        *bytes += len;
                        *short = len < m.segment as usize;
                    }
                    _ => {
                        if let Some((m, ..)) = open.take() {
                            self.messages.push(m);
                        }
                        open = Some((
                            Message {
                                first: self.order.len() as u32,
                                count: 1,
                                segment: len as u32,
                            },
                            len,
                            false,
                        ));
                    }
                }
                self.order.push(i);
                i = self.next[i as usize];
            }
            if let Some((m, ..)) = open {
                self.messages.push(m);
            }
        }
    }

    /// The queue indices of `m`'s datagrams.
    fn datagrams(&self, m: &Message) -> &[u32] {
        &self.order[m.first as usize..(m.first + m.count) as usize]
    }
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // sendmmsg(2); see the SAFETY comments
fn send_messages(
    socket: &UdpSocket,
    queue: &[(BytesMut, SocketAddr)],
    plan: &Plan,
    messages: &[Message],
    segments: &mut bool,
    outcome: &mut SendOutcome,
) {
    use std::os::fd::AsRawFd;

    // Room for one control message carrying a u16 (`CMSG_SPACE(2)`: 24 bytes on 64-bit
    // Linux), aligned as a `cmsghdr`.
    type Control = [u64; 4];

    let mut addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)> = messages
        .iter()
        .map(|m| sockaddr(&queue[plan.order[m.first as usize] as usize].1))
        .collect();
    let mut iovs: Vec<libc::iovec> = messages
        .iter()
        .flat_map(|m| plan.datagrams(m))
        .map(|&i| {
            let data = &queue[i as usize].0;
            libc::iovec {
                iov_base: data.as_ptr() as *mut libc::c_void,
                iov_len: data.len(),
            }
        })
        .collect();
    let mut controls: Vec<Control> = vec![[0; 4]; messages.len()];
    let mut hdrs: Vec<libc::mmsghdr> = Vec::with_capacity(messages.len());
    let mut iov_at = 0;
    for ((m, (addr, len)), control) in messages.iter().zip(&mut addrs).zip(&mut controls) {
        // SAFETY: an all-zero msghdr is a valid value (null pointers, zero lengths).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (addr as *mut libc::sockaddr_storage).cast();
        msg.msg_namelen = *len;
        msg.msg_iov = &mut iovs[iov_at];
        msg.msg_iovlen = m.count as _;
        iov_at += m.count as usize;
        if m.count > 1 {
            msg.msg_control = control.as_mut_ptr().cast();
            // SAFETY: CMSG_SPACE only computes a size.
            msg.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as _;
            // SAFETY: `msg` points at `control`, which is large enough (checked by the
            // assertion) and aligned for a cmsghdr; CMSG_FIRSTHDR and CMSG_DATA stay within
            // it, and the u16 is written unaligned.
            unsafe {
                debug_assert!(libc::CMSG_SPACE(2) as usize <= std::mem::size_of::<Control>());
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_UDP;
                (*c).cmsg_type = libc::UDP_SEGMENT;
                (*c).cmsg_len = libc::CMSG_LEN(2) as _;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), m.segment as u16);
            }
        }
        hdrs.push(libc::mmsghdr {
            msg_hdr: msg,
            msg_len: 0,
        });
    }
    let fd = socket.as_raw_fd();
    let mut start = 0;
    while start < hdrs.len() {
        let rest = &mut hdrs[start..];
        // SAFETY: `rest` points at `rest.len()` initialised mmsghdr values whose name, iovec
        // and control pointers refer to `addrs`, `iovs`, `controls` and the queued buffers,
        // all alive and unmoved until this function returns.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                rest.as_mut_ptr(),
                rest.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
            )
        };
        outcome.calls += 1;
        if n > 0 {
            let n = n as usize;
            for m in &messages[start..start + n] {
                outcome.sent += u64::from(m.count);
                if m.count > 1 {
                    outcome.segmented += u64::from(m.count);
                }
            }
            start += n;
            continue;
        }
        let err = std::io::Error::last_os_error();
        match err.kind() {
            std::io::ErrorKind::WouldBlock => {
                // Socket buffer full: drop, never block.
                let left: u64 = messages[start..].iter().map(|m| u64::from(m.count)).sum();
                outcome.dropped += left;
                tracing::trace!("udp send buffer full, {left} datagrams dropped");
                return;
            }
            std::io::ErrorKind::Interrupted => continue,
            _ if messages[start].count > 1 => {
                // The kernel refused the segmented message (no segmentation offload on this
                // route, or an old kernel): send its datagrams one by one, and every later
                // one too.
                if *segments {
                    tracing::debug!("udp segmentation refused ({err}); sending datagrams singly");
                    *segments = false;
                }
                let (addr, len) = &addrs[start];
                for &i in plan.datagrams(&messages[start]) {
                    let data = &queue[i as usize].0;
                    outcome.calls += 1;
                    // SAFETY: `data` and `addr` are alive, and their lengths are theirs.
                    let n = unsafe {
                        libc::sendto(
                            fd,
                            data.as_ptr().cast(),
                            data.len(),
                            libc::MSG_DONTWAIT,
                            (addr as *const libc::sockaddr_storage).cast(),
                            *len,
                        )
                    };
                    if n >= 0 {
                        outcome.sent += 1;
                    } else {
                        let e = std::io::Error::last_os_error();
                        tracing::trace!("udp send failed: {e}");
                        outcome.dropped += 1;
                    }
                }
                start += 1;
            }
            _ => {
                // This datagram cannot be sent (e.g. unreachable address): skip it only.
                tracing::trace!(
                    "udp send to {} failed: {err}",
                    queue[plan.order[messages[start].first as usize] as usize].1
                );
                outcome.dropped += 1;
                start += 1;
            }
        }
    }
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // raw sockaddr writes; see the SAFETY comment
fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid; the writes below stay within it (it is
    // large and aligned enough for both sockaddr_in and sockaddr_in6).
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe {
                std::ptr::write(
                    (&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>(),
                    sin,
                )
            };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe {
                std::ptr::write(
                    (&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>(),
                    sin6,
                )
            };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

#[cfg(not(target_os = "linux"))]
fn send_messages(
    socket: &UdpSocket,
    queue: &[(BytesMut, SocketAddr)],
    plan: &Plan,
    messages: &[Message],
    _segments: &mut bool,
    outcome: &mut SendOutcome,
) {
    for &i in messages.iter().flat_map(|m| plan.datagrams(m)) {
        let (data, to) = &queue[i as usize];
        outcome.calls += 1;
        match socket.try_send_to(data, *to) {
            Ok(_) => outcome.sent += 1,
            Err(e) => {
                tracing::trace!("udp send to {to} failed: {e}");
                outcome.dropped += 1;
            }
        }
    }
}

#[cfg(test)]
// Tests pick an arbitrary origin for their virtual time (and may share test state).
#[allow(clippy::disallowed_methods, clippy::disallowed_types)]
mod tests {
    use super::*;

    /// A socket to receive on, that gives up after 5 s.
    fn receiver(addr: &str) -> std::net::UdpSocket {
        let s = std::net::UdpSocket::bind(addr).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        s
    }

    /// Every queued datagram arrives, byte for byte and in order, at the right socket, across
    /// more than one batch and to two destinations.
    #[tokio::test]
    async fn batches_arrive_in_order() {
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (a, b) = (receiver("127.0.0.1:0"), receiver("127.0.0.1:0"));
        let mut q = OutQueue::new();
        // One message per datagram: this is about batches (segments are tested below).
        q.segments = false;
        let n = BATCH * 2 + 5;
        for i in 0..n {
            let to = if i % 3 == 0 { &b } else { &a };
            let payload = format!("datagram {i}").into_bytes();
            let origin = (i % 2 == 0).then(Instant::now);
            q.push(
                BytesMut::from(&payload[..]),
                to.local_addr().unwrap(),
                origin,
            );
        }
        assert_eq!(q.len(), n);
        let mut lat: [LatencyHistogram; 2] = Default::default();
        let out = q.send(&tx, &mut lat);
        assert!(q.is_empty());
        // ("datagram …" starts with 'd': media, not a DTLS record.)
        assert_eq!(lat[0].count(), n.div_ceil(2) as u64);
        assert_eq!(lat[1].count(), 0);
        assert_eq!(out.sent, n as u64);
        assert_eq!(out.dropped, 0);
        #[cfg(target_os = "linux")]
        assert!(out.calls >= 3 && out.calls < n as u64, "{out:?}");
        let mut buf = [0u8; 64];
        for i in (0..n).filter(|i| i % 3 != 0) {
            let k = a.recv(&mut buf).unwrap();
            assert_eq!(&buf[..k], format!("datagram {i}").as_bytes());
        }
        for i in (0..n).filter(|i| i % 3 == 0) {
            let k = b.recv(&mut buf).unwrap();
            assert_eq!(&buf[..k], format!("datagram {i}").as_bytes());
        }
    }

    /// Sent datagrams leave their buffers for the next ones: emptied, their capacity kept, at
    /// most [`SPARE`] of them, none grown past twice the usual size; a second round of
    /// datagrams written into reused buffers arrives intact.
    #[tokio::test]
    async fn sent_buffers_are_reused() {
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let rx = receiver("127.0.0.1:0");
        let to = rx.local_addr().unwrap();
        let mut q = OutQueue::new();
        let fresh = q.buffer();
        assert!(fresh.is_empty() && fresh.capacity() >= BUFFER_CAPACITY);
        let mut lat: [LatencyHistogram; 2] = Default::default();
        for round in 0..2 {
            for i in 0..BATCH {
                let mut b = q.buffer();
                assert!(b.is_empty(), "a reused buffer starts empty");
                b.extend_from_slice(format!("round {round} datagram {i}").as_bytes());
                q.push(b, to, None);
            }
            assert_eq!(q.spare(), 0);
            assert_eq!(q.send(&tx, &mut lat).sent, BATCH as u64);
            assert_eq!(q.spare(), BATCH, "every sent buffer kept");
            let mut buf = [0u8; 64];
            for i in 0..BATCH {
                let k = rx.recv(&mut buf).unwrap();
                assert_eq!(&buf[..k], format!("round {round} datagram {i}").as_bytes());
            }
        }
        q.push(BytesMut::zeroed(4 * BUFFER_CAPACITY), to, None);
        q.send(&tx, &mut lat);
        assert_eq!(
            q.spare(),
            BATCH,
            "a buffer grown past twice the usual size is not kept"
        );
        for _ in 0..SPARE + BATCH {
            q.push(BytesMut::from(&b"x"[..]), to, None);
        }
        q.send(&tx, &mut lat);
        assert_eq!(q.spare(), SPARE, "no more than SPARE kept");
    }

    /// IPv6 destinations are encoded correctly too.
    #[tokio::test]
    async fn ipv6_destination() {
        let tx = UdpSocket::bind("[::1]:0").await.unwrap();
        let rx = receiver("[::1]:0");
        let mut q = OutQueue::new();
        q.push(BytesMut::from(&b"six"[..]), rx.local_addr().unwrap(), None);
        assert_eq!(q.send(&tx, &mut Default::default()).sent, 1);
        let mut buf = [0u8; 8];
        let k = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"six");
    }

    /// A queue of `(length, destination)`s, the bytes `i` repeated `length` times.
    fn queue(datagrams: &[(usize, u16)]) -> Vec<(BytesMut, SocketAddr)> {
        datagrams
            .iter()
            .enumerate()
            .map(|(i, &(len, port))| {
                (
                    BytesMut::from(&vec![i as u8; len][..]),
                    SocketAddr::from(([127, 0, 0, 1], port)),
                )
            })
            .collect()
    }

    /// The messages of a plan as (queue indices, segment size).
    fn messages(plan: &Plan) -> Vec<(Vec<u32>, u32)> {
        plan.messages
            .iter()
            .map(|m| (plan.datagrams(m).to_vec(), m.segment))
            .collect()
    }

    /// Each destination's datagrams in their order, runs of one size (the last may be
    /// shorter) in one message, destinations in the order of their first datagram; without
    /// segmentation, one message per datagram in queue order.
    #[test]
    fn a_plan_groups_each_destinations_runs_of_one_size() {
        let q = queue(&[
            (1200, 1), // 0
            (1200, 2), // 1
            (1200, 1), // 2
            (1200, 2), // 3
            (900, 1),  // 4: shorter, ends 1's run
            (1200, 2), // 5
            (1200, 1), // 6: a new run after the shorter one
            (100, 3),  // 7
            (1300, 2), // 8: larger, a new message
            (0, 3),    // 9: empty, never a segment
        ]);
        let mut plan = Plan::default();
        plan.make(&q, true);
        assert_eq!(
            messages(&plan),
            vec![
                (vec![0, 2, 4], 1200),
                (vec![6], 1200),
                (vec![1, 3, 5], 1200),
                (vec![8], 1300),
                (vec![7], 100),
                (vec![9], 0),
            ]
        );
        plan.make(&q, false);
        assert_eq!(
            messages(&plan),
            q.iter()
                .enumerate()
                .map(|(i, (d, _))| (vec![i as u32], d.len() as u32))
                .collect::<Vec<_>>()
        );
    }

    /// A message holds at most [`MAX_SEGMENTS`] datagrams and [`MAX_SEGMENTED_BYTES`].
    #[test]
    fn a_plans_messages_are_bounded() {
        let mut plan = Plan::default();
        plan.make(&queue(&[(100, 1); 2 * MAX_SEGMENTS + 1]), true);
        let counts: Vec<u32> = plan.messages.iter().map(|m| m.count).collect();
        let most = MAX_SEGMENTS as u32;
        assert_eq!(counts, vec![most, most, 1]);
        let big = MAX_SEGMENTED_BYTES / 4 + 1;
        plan.make(&queue(&[(big, 1); 7]), true);
        let counts: Vec<u32> = plan.messages.iter().map(|m| m.count).collect();
        assert_eq!(counts, vec![3, 3, 1]);
    }

    /// Runs of datagrams for one destination leave as one message each (one `sendmmsg` for
    /// all of them here) and arrive as the separate datagrams they were, in order.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn segmented_messages_arrive_as_their_datagrams() {
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let rxs = [receiver("127.0.0.1:0"), receiver("127.0.0.1:0")];
        let mut q = OutQueue::new();
        let len = |i: usize| if i % 5 == 4 { 700 } else { 1200 };
        for i in 0..20 {
            let mut b = q.buffer();
            b.resize(len(i), i as u8);
            q.push(b, rxs[i % 2].local_addr().unwrap(), None);
        }
        let out = q.send(&tx, &mut Default::default());
        assert_eq!((out.sent, out.dropped, out.calls), (20, 0, 1), "{out:?}");
        assert_eq!(out.segmented, 20, "{out:?}");
        assert!(q.segments);
        let mut buf = [0u8; 2048];
        for (r, rx) in rxs.iter().enumerate() {
            for i in (0..20).filter(|i| i % 2 == r) {
                let k = rx.recv(&mut buf).unwrap();
                assert_eq!(k, len(i), "datagram {i}");
                assert!(buf[..k].iter().all(|&b| b == i as u8), "datagram {i}");
            }
        }
    }

    /// Where the kernel refuses a segmented message (here: a socket sending without UDP
    /// checksums, which segmentation needs), its datagrams go one by one, nothing is lost,
    /// and the queue stops segmenting.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    #[allow(unsafe_code)] // setsockopt(2)
    async fn a_refused_segmented_message_is_sent_datagram_by_datagram() {
        use std::os::fd::AsRawFd;
        const SO_NO_CHECK: libc::c_int = 11;
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let on: libc::c_int = 1;
        // SAFETY: a valid socket, and a c_int option value of the size given.
        let rc = unsafe {
            libc::setsockopt(
                tx.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_NO_CHECK,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0);
        let rx = receiver("127.0.0.1:0");
        let mut q = OutQueue::new();
        for round in 0..2u8 {
            for i in 0..6u8 {
                q.push(
                    BytesMut::from(&[round * 10 + i; 1000][..]),
                    rx.local_addr().unwrap(),
                    None,
                );
            }
            let out = q.send(&tx, &mut Default::default());
            assert_eq!((out.sent, out.dropped), (6, 0), "round {round}: {out:?}");
            assert_eq!(out.segmented, 0, "round {round}: {out:?}");
            assert!(!q.segments, "round {round}: segmentation stays off");
            let mut buf = [0u8; 2048];
            for i in 0..6u8 {
                let k = rx.recv(&mut buf).unwrap();
                assert_eq!(&buf[..k], &[round * 10 + i; 1000][..]);
            }
        }
    }
}
