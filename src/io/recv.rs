//! Batched UDP input, each datagram with the time the kernel received it.
//!
//! One `recvmmsg(2)` call takes up to a batch of queued datagrams on Linux instead of one
//! `recvfrom(2)` each, and `SO_TIMESTAMPNS` has the kernel stamp each one when it arrived.
//! That stamp, not the time the core's turn read the datagram, is when a packet entered the
//! server: the in-core latency counts the time a packet waited in the socket while the core
//! fanned out the ones before it, and the arrival times in the transport-wide feedback to a
//! publisher are the network's, not the server's turns. Elsewhere (or when the kernel gives
//! no stamp) a datagram is taken as received when it was read.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};
use tokio::net::UdpSocket;

/// Room for the largest datagram read, and for the one that does not fit (it is read
/// truncated, as `recv_from` does).
const SLOT: usize = 2 * 1500;

/// A stamp older than this against the turn's wall clock is not believed (the wall clock was
/// stepped since): the datagram counts as received when it was read.
const MAX_AGE: Duration = Duration::from_secs(1);

/// One datagram of a batch.
#[derive(Debug, Clone, Copy)]
pub struct Datagram<'a> {
    pub data: &'a [u8],
    pub from: SocketAddr,
    /// When the kernel received it (wall clock, `SO_TIMESTAMPNS`), if it said.
    pub stamp: Option<SystemTime>,
}

/// The buffers one batch is read into, reused from batch to batch.
pub struct RecvBatch {
    data: Vec<u8>,
    /// Per datagram read: its slot in `data` and its length.
    lens: Vec<(usize, usize)>,
    froms: Vec<SocketAddr>,
    stamps: Vec<Option<SystemTime>>,
    #[cfg(target_os = "linux")]
    sys: linux::Buffers,
}

impl RecvBatch {
    /// Buffers for batches of up to `capacity` datagrams.
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        RecvBatch {
            data: vec![0; capacity * SLOT],
            lens: Vec::with_capacity(capacity),
            froms: Vec::with_capacity(capacity),
            stamps: Vec::with_capacity(capacity),
            #[cfg(target_os = "linux")]
            sys: linux::Buffers::new(capacity),
        }
    }

    fn capacity(&self) -> usize {
        self.data.len() / SLOT
    }

    /// Read up to `max` datagrams already queued on `socket`, without waiting: how many
    /// (`WouldBlock` when there are none, which also clears the socket's readiness).
    pub fn recv(&mut self, socket: &UdpSocket, max: usize) -> std::io::Result<usize> {
        self.lens.clear();
        self.froms.clear();
        self.stamps.clear();
        let max = max.clamp(1, self.capacity());
        #[cfg(target_os = "linux")]
        {
            let RecvBatch {
                data,
                lens,
                froms,
                stamps,
                sys,
            } = self;
            socket.try_io(tokio::io::Interest::READABLE, || {
                sys.recv(socket, &mut data[..max * SLOT], lens, froms, stamps)
            })
        }
        #[cfg(not(target_os = "linux"))]
        {
            for i in 0..max {
                match socket.try_recv_from(&mut self.data[i * SLOT..(i + 1) * SLOT]) {
                    Ok((n, from)) => {
                        self.lens.push((i, n));
                        self.froms.push(from);
                        self.stamps.push(None);
                    }
                    Err(e) if i == 0 => return Err(e),
                    Err(_) => break,
                }
            }
            Ok(self.lens.len())
        }
    }

    /// The datagrams the last [`RecvBatch::recv`] read, in the order they arrived.
    pub fn datagrams(&self) -> impl Iterator<Item = Datagram<'_>> {
        self.lens.iter().zip(&self.froms).zip(&self.stamps).map(
            |((&(slot, len), &from), &stamp)| Datagram {
                data: &self.data[slot * SLOT..slot * SLOT + len],
                from,
                stamp,
            },
        )
    }
}

/// Ask the kernel to stamp each datagram `socket` receives (`SO_TIMESTAMPNS`).
#[cfg(target_os = "linux")]
pub fn enable_timestamps(socket: &std::net::UdpSocket) -> std::io::Result<()> {
    super::set_int_option(socket, libc::SOL_SOCKET, libc::SO_TIMESTAMPNS, 1)
}

#[cfg(not(target_os = "linux"))]
pub fn enable_timestamps(_socket: &std::net::UdpSocket) -> std::io::Result<()> {
    Ok(())
}

/// The wall clock and the monotonic clock read together, once per turn: converts the
/// kernel's wall-clock stamps to `Instant`s.
#[derive(Debug, Clone, Copy)]
pub struct Clocks {
    pub now: Instant,
    pub wall: SystemTime,
}

impl Clocks {
    /// When a datagram stamped `stamp` was received, as an `Instant`: `now` less the stamp's
    /// age. No stamp, one from the future (the two clocks were read a moment apart) or one
    /// older than [`MAX_AGE`] (the wall clock was stepped): `now`.
    pub fn received(&self, stamp: Option<SystemTime>) -> Instant {
        let Some(stamp) = stamp else {
            return self.now;
        };
        match self.wall.duration_since(stamp) {
            Ok(age) if age <= MAX_AGE => self.now.checked_sub(age).unwrap_or(self.now),
            _ => self.now,
        }
    }
}

#[cfg(target_os = "linux")]
pub use linux::socket_addr;

#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // recvmmsg(2) and the control messages; see the SAFETY comments
mod linux {
    use super::SLOT;
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
    use std::os::fd::AsRawFd;
    use std::time::{Duration, SystemTime};
    use tokio::net::UdpSocket;

    /// Room for one control message carrying a `timespec` (`CMSG_SPACE(16)`: 32 bytes on
    /// 64-bit Linux), and one more in case the kernel adds another, aligned as a `cmsghdr`.
    type Control = [u64; 8];

    /// What `recvmmsg` writes besides the data, per datagram.
    pub(super) struct Buffers {
        addrs: Vec<libc::sockaddr_storage>,
        controls: Vec<Control>,
        iovs: Vec<libc::iovec>,
        hdrs: Vec<libc::mmsghdr>,
    }

    impl Buffers {
        pub(super) fn new(capacity: usize) -> Self {
            Buffers {
                // SAFETY: an all-zero sockaddr_storage is a valid value.
                addrs: vec![unsafe { std::mem::zeroed() }; capacity],
                controls: vec![[0; 8]; capacity],
                iovs: Vec::with_capacity(capacity),
                hdrs: Vec::with_capacity(capacity),
            }
        }

        /// One `recvmmsg` into `data` (whole slots): the datagrams' lengths, senders and
        /// stamps pushed in order.
        pub(super) fn recv(
            &mut self,
            socket: &UdpSocket,
            data: &mut [u8],
            lens: &mut Vec<(usize, usize)>,
            froms: &mut Vec<SocketAddr>,
            stamps: &mut Vec<Option<SystemTime>>,
        ) -> std::io::Result<usize> {
            let n = data.len() / SLOT;
            self.iovs.clear();
            self.hdrs.clear();
            for slot in data.chunks_exact_mut(SLOT).take(n) {
                self.iovs.push(libc::iovec {
                    iov_base: slot.as_mut_ptr().cast(),
                    iov_len: SLOT,
                });
            }
            for i in 0..n {
                // SAFETY: an all-zero msghdr is a valid value (null pointers, zero lengths).
                let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
                msg.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
                msg.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as _;
                msg.msg_iov = &mut self.iovs[i];
                msg.msg_iovlen = 1;
                msg.msg_control = self.controls[i].as_mut_ptr().cast();
                msg.msg_controllen = std::mem::size_of::<Control>() as _;
                self.hdrs.push(libc::mmsghdr {
                    msg_hdr: msg,
                    msg_len: 0,
                });
            }
            // SAFETY: `hdrs` holds `n` initialised mmsghdr values whose name, iovec and
            // control pointers refer to `addrs`, `iovs`, `controls` and `data`, all alive,
            // unmoved and large enough (the lengths say so) until the call returns.
            let got = unsafe {
                libc::recvmmsg(
                    socket.as_raw_fd(),
                    self.hdrs.as_mut_ptr(),
                    n as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if got < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let got = got as usize;
            for i in 0..got {
                let h = &self.hdrs[i];
                let Some(from) = socket_addr(&self.addrs[i], h.msg_hdr.msg_namelen) else {
                    // (Not an IP sender: nothing a UDP socket of ours receives.)
                    continue;
                };
                lens.push((i, (h.msg_len as usize).min(SLOT)));
                froms.push(from);
                stamps.push(stamp(&h.msg_hdr));
            }
            Ok(lens.len())
        }
    }

    /// The `SCM_TIMESTAMPNS` control message of a received message, if any.
    fn stamp(msg: &libc::msghdr) -> Option<SystemTime> {
        // SAFETY: `msg` is a message recvmmsg filled in: its control pointer and length
        // describe the control buffer, which CMSG_FIRSTHDR/CMSG_NXTHDR walk within; the
        // timespec is read unaligned from inside the message the kernel wrote.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                    let ts = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::timespec>());
                    let secs = u64::try_from(ts.tv_sec).ok()?;
                    let nanos = u32::try_from(ts.tv_nsec).ok()?;
                    return SystemTime::UNIX_EPOCH
                        .checked_add(Duration::new(secs, nanos.min(999_999_999)));
                }
                c = libc::CMSG_NXTHDR(msg, c);
            }
        }
        None
    }

    /// The address a receive call wrote into `storage` (`len` bytes of it): IPv4 or IPv6,
    /// `None` for anything else or a length too short for its family.
    pub fn socket_addr(
        storage: &libc::sockaddr_storage,
        len: libc::socklen_t,
    ) -> Option<SocketAddr> {
        let len = len as usize;
        match libc::c_int::from(storage.ss_family) {
            libc::AF_INET if len >= std::mem::size_of::<libc::sockaddr_in>() => {
                // SAFETY: the family says the storage holds a sockaddr_in, and it is large
                // and aligned enough for one.
                let a = unsafe {
                    &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>()
                };
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(a.sin_addr.s_addr.to_ne_bytes()),
                    u16::from_be(a.sin_port),
                )))
            }
            libc::AF_INET6 if len >= std::mem::size_of::<libc::sockaddr_in6>() => {
                // SAFETY: as above, for a sockaddr_in6.
                let a = unsafe {
                    &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
                };
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(a.sin6_addr.s6_addr),
                    u16::from_be(a.sin6_port),
                    a.sin6_flowinfo,
                    a.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
// The tests read the real clocks to check the kernel's stamps against them.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    fn pair(addr: &str) -> (UdpSocket, std::net::UdpSocket) {
        let rx = std::net::UdpSocket::bind(addr).unwrap();
        rx.set_nonblocking(true).unwrap();
        enable_timestamps(&rx).unwrap();
        let tx = std::net::UdpSocket::bind(addr).unwrap();
        tx.connect(rx.local_addr().unwrap()).unwrap();
        (UdpSocket::from_std(rx).unwrap(), tx)
    }

    #[tokio::test]
    async fn a_batch_holds_each_datagram_with_its_sender_and_the_kernels_stamp() {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let (rx, tx) = pair(addr);
            let before = SystemTime::now();
            for i in 0..5u8 {
                tx.send(&vec![i; 100 + usize::from(i)]).unwrap();
            }
            let mut batch = RecvBatch::new(4);
            rx.readable().await.unwrap();
            // At most the batch's capacity, and what was asked for.
            assert_eq!(batch.recv(&rx, 3).unwrap(), 3);
            let got: Vec<_> = batch.datagrams().collect();
            for (i, d) in got.iter().enumerate() {
                assert_eq!(d.data, &vec![i as u8; 100 + i][..]);
                assert_eq!(d.from, tx.local_addr().unwrap());
                #[cfg(target_os = "linux")]
                {
                    let stamp = d.stamp.expect("the kernel stamps each datagram");
                    assert!(stamp >= before && stamp <= SystemTime::now());
                }
            }
            assert_eq!(
                batch.recv(&rx, 64).unwrap(),
                2,
                "the rest, bounded by nothing else"
            );
            assert_eq!(batch.datagrams().next().unwrap().data, &[3u8; 103][..]);
            let err = batch.recv(&rx, 64).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
        }
    }

    #[tokio::test]
    async fn an_oversized_datagram_is_read_truncated_and_the_next_one_whole() {
        let (rx, tx) = pair("127.0.0.1:0");
        tx.send(&[7u8; SLOT + 500]).unwrap();
        tx.send(b"next").unwrap();
        let mut batch = RecvBatch::new(8);
        rx.readable().await.unwrap();
        let mut seen = Vec::new();
        while seen.len() < 2 {
            match batch.recv(&rx, 8) {
                Ok(_) => seen.extend(batch.datagrams().map(|d| d.data.to_vec())),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    rx.readable().await.unwrap()
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(seen[0].len(), SLOT);
        assert_eq!(seen[1], b"next");
    }

    #[test]
    fn a_stamp_becomes_the_instant_it_is_as_old_as() {
        let now = Instant::now();
        let wall = SystemTime::now();
        let clocks = Clocks { now, wall };
        let ms = Duration::from_millis;
        assert_eq!(clocks.received(Some(wall - ms(3))), now - ms(3));
        assert_eq!(clocks.received(Some(wall)), now);
        // No stamp, one a moment ahead of the wall clock read, one from before a step of the
        // wall clock: when it was read.
        assert_eq!(clocks.received(None), now);
        assert_eq!(clocks.received(Some(wall + ms(1))), now);
        assert_eq!(clocks.received(Some(wall - Duration::from_secs(5))), now);
    }
}
