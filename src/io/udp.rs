//! Batched UDP output.
//!
//! The driver collects the datagrams the core produces during one turn into an
//! [`OutQueue`] and hands them to the kernel together: one `sendmmsg(2)` call per up to
//! [`BATCH`] datagrams on Linux instead of one `sendto(2)` each. Elsewhere it falls back to one
//! send per datagram. Sending never blocks: when the socket buffer is full the rest of the batch
//! is dropped (and counted), as a congested network would.

use crate::sfu::latency::LatencyHistogram;
use bytes::BytesMut;
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

/// What one [`OutQueue::send`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SendOutcome {
    pub sent: u64,
    pub dropped: u64,
    pub calls: u64,
}

/// Which latency a datagram with an origin counts in: 0 media, 1 data channels (a DTLS
/// record).
pub fn latency_kind(datagram: &[u8]) -> usize {
    usize::from(datagram.first() == Some(&crate::sfu::core::DTLS_APPLICATION_DATA))
}

/// Datagrams waiting to be sent, in order.
#[derive(Debug, Default)]
pub struct OutQueue {
    queue: Vec<(BytesMut, SocketAddr)>,
    /// When the packet each queued RTP datagram carries was read from the socket (`None` for
    /// everything else), parallel to `queue`.
    origins: Vec<Option<Instant>>,
    /// Buffers whose datagrams have been sent, emptied, for the next ones (at most [`SPARE`],
    /// none larger than twice [`BUFFER_CAPACITY`]).
    spare: Vec<BytesMut>,
}

impl OutQueue {
    pub fn new() -> Self {
        OutQueue {
            queue: Vec::with_capacity(BATCH),
            origins: Vec::with_capacity(BATCH),
            spare: Vec::with_capacity(SPARE),
        }
    }

    /// An empty buffer for the next datagram: one a sent datagram left, or a new one.
    pub fn buffer(&mut self) -> BytesMut {
        self.spare
            .pop()
            .unwrap_or_else(|| BytesMut::with_capacity(BUFFER_CAPACITY))
    }

    /// Buffers kept for reuse.
    pub fn spare(&self) -> usize {
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

    /// Send everything queued (in order) and empty the queue; record how long each media
    /// datagram's packet spent in the server (`latency[0]`), and each data-channel one's
    /// message (`latency[1]`: a DTLS record).
    pub fn send(&mut self, socket: &UdpSocket, latency: &mut [LatencyHistogram; 2]) -> SendOutcome {
        let mut outcome = SendOutcome::default();
        for (chunk, origins) in self.queue.chunks(BATCH).zip(self.origins.chunks(BATCH)) {
            let now = Instant::now();
            for ((data, _), origin) in chunk.iter().zip(origins) {
                if let Some(origin) = origin {
                    latency[latency_kind(data)].record(now.saturating_duration_since(*origin), 1);
                }
            }
            send_chunk(socket, chunk, &mut outcome);
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

#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // sendmmsg(2); see the SAFETY comments
fn send_chunk(socket: &UdpSocket, chunk: &[(BytesMut, SocketAddr)], outcome: &mut SendOutcome) {
    use std::os::fd::AsRawFd;

    let mut addrs: Vec<(libc::sockaddr_storage, libc::socklen_t)> =
        chunk.iter().map(|(_, to)| sockaddr(to)).collect();
    let mut iovs: Vec<libc::iovec> = chunk
        .iter()
        .map(|(data, _)| libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        })
        .collect();
    let mut hdrs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .zip(addrs.iter_mut())
        .map(|(iov, (addr, len))| {
            // SAFETY: an all-zero msghdr is a valid value (null pointers, zero lengths).
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_name = (addr as *mut libc::sockaddr_storage).cast();
            msg.msg_namelen = *len;
            msg.msg_iov = iov;
            msg.msg_iovlen = 1;
            libc::mmsghdr {
                msg_hdr: msg,
                msg_len: 0,
            }
        })
        .collect();
    let fd = socket.as_raw_fd();
    let mut start = 0;
    while start < hdrs.len() {
        let rest = &mut hdrs[start..];
        // SAFETY: `rest` points at `rest.len()` initialised mmsghdr values whose name and iovec
        // pointers refer to `addrs`, `iovs` and the queued buffers, all alive and unmoved until
        // this function returns.
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
            outcome.sent += n as u64;
            start += n as usize;
            continue;
        }
        let err = std::io::Error::last_os_error();
        match err.kind() {
            std::io::ErrorKind::WouldBlock => {
                // Socket buffer full: drop, never block.
                outcome.dropped += (hdrs.len() - start) as u64;
                tracing::trace!(
                    "udp send buffer full, {} datagrams dropped",
                    hdrs.len() - start
                );
                return;
            }
            std::io::ErrorKind::Interrupted => continue,
            _ => {
                // This datagram cannot be sent (e.g. unreachable address): skip it only.
                tracing::trace!("udp send to {} failed: {err}", chunk[start].1);
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
fn send_chunk(socket: &UdpSocket, chunk: &[(BytesMut, SocketAddr)], outcome: &mut SendOutcome) {
    for (data, to) in chunk {
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

    /// Every queued datagram arrives, byte for byte and in order, at the right socket, across
    /// more than one batch and to two destinations.
    #[tokio::test]
    async fn batches_arrive_in_order() {
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        for s in [&a, &b] {
            s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .unwrap();
        }
        let mut q = OutQueue::new();
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
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
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
        let rx = std::net::UdpSocket::bind("[::1]:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut q = OutQueue::new();
        q.push(BytesMut::from(&b"six"[..]), rx.local_addr().unwrap(), None);
        assert_eq!(q.send(&tx, &mut Default::default()).sent, 1);
        let mut buf = [0u8; 8];
        let k = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..k], b"six");
    }
}
