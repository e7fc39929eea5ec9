//! A UDP relay with a bandwidth bottleneck on its downstream direction, to put a subscriber
//! behind a slow link on loopback.
//!
//! ```text
//!  subscriber PC  ⇄  client socket ─ relay ─ upstream socket  ⇄  server
//!                 ◄── shaper: FIFO drained at `rate`, packets older than `max_delay` dropped
//! ```
//!
//! The peer points its subscriber connection at the relay by rewriting the server's host
//! candidate in each `subscribe_offer` ([`rewrite_candidates`]); the server (ICE-lite) learns
//! the relay's upstream address from the connectivity checks it forwards. Upstream traffic
//! (client → server: STUN, DTLS, RTCP feedback, data channels) passes through untouched.
//!
//! Downstream is a real bottleneck, not a token bucket that drops early: each datagram leaves
//! when the link has finished sending the ones before it (`size × 8 / rate`, counting 28 bytes of
//! IPv4 + UDP header), so a link near saturation first *delays* packets (what delay-based
//! estimators such as GCC see) and, once the queue holds more than `max_delay` worth, *drops*
//! them (what loss-based estimators see). The rate can be changed at any time
//! ([`Relay::set_rate`]); 0 means unlimited (packets pass at once, still in order).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// IPv4 + UDP header bytes counted per datagram.
pub const IP_UDP_OVERHEAD: usize = 28;

/// Default bound of the downstream queue, as a delay.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_millis(200);

/// Counters of a relay.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RelayStats {
    pub down_packets: u64,
    pub down_bytes: u64,
    /// Datagrams dropped because the queue was full (`max_delay` worth of data).
    pub down_dropped: u64,
    pub down_dropped_bytes: u64,
    pub up_packets: u64,
    pub up_bytes: u64,
    /// Upstream datagrams dropped because the server address was not known yet.
    pub up_dropped: u64,
    /// Largest queueing delay given to a forwarded datagram.
    pub max_queue_delay: Duration,
    /// Downstream RTP packets (the RTP header is readable through SRTP), and those whose
    /// sequence number was not above the highest seen on their SSRC: retransmissions (NACK
    /// answers) or reordering. Counted on arrival at the relay, before the bottleneck.
    pub down_rtp: u64,
    pub down_rtp_repeats: u64,
    /// Downstream RTCP packets.
    pub down_rtcp: u64,
    /// Current rate limit in bit/s (0 = unlimited).
    pub rate_bps: u64,
    /// Downstream RTP packets dropped on purpose ([`Relay::set_loss_every`]), and the first
    /// of them (SSRC, sequence number; at most [`MAX_LOST_KEPT`]).
    pub down_lost: u64,
    pub lost: Vec<(u32, u16)>,
    /// Downstream RTP packets by SSRC and payload type (as they arrive at the relay).
    pub down_rtp_by_stream: std::collections::BTreeMap<(u32, u8), u64>,
}

/// How many purposely dropped packets [`RelayStats::lost`] names.
pub const MAX_LOST_KEPT: usize = 10_000;

struct Inner {
    rate_bps: AtomicU64,
    max_delay_us: AtomicU64,
    upstream: Mutex<Option<SocketAddr>>,
    client: Mutex<Option<SocketAddr>>,
    stats: Mutex<RelayStats>,
    /// When the link is free again (the departure of the last queued datagram).
    link_free_at: Mutex<Option<Instant>>,
    /// Highest sequence number seen per downstream SSRC.
    highest_seq: Mutex<std::collections::HashMap<u32, u16>>,
    /// Drop every Nth new downstream RTP packet (0 = none), and how many were seen.
    loss_every: AtomicU64,
    new_rtp: AtomicU64,
}

/// What kind of datagram this is on a WebRTC transport (RFC 7983 demultiplexing, then RTP vs
/// RTCP by payload type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datagram {
    Rtp { ssrc: u32, seq: u16 },
    Rtcp,
    Other,
}

pub fn classify(d: &[u8]) -> Datagram {
    match d.first() {
        Some(128..=191) if d.len() >= 12 => {
            let pt = d[1] & 0x7f;
            if (72..=79).contains(&pt) {
                Datagram::Rtcp
            } else {
                Datagram::Rtp {
                    ssrc: u32::from_be_bytes([d[8], d[9], d[10], d[11]]),
                    seq: u16::from_be_bytes([d[2], d[3]]),
                }
            }
        }
        _ => Datagram::Other,
    }
}

/// The relay; its tasks run until [`Relay::tasks`] are aborted (the peer does that on
/// teardown).
pub struct Relay {
    inner: Arc<Inner>,
    client_addr: SocketAddr,
    upstream_local: SocketAddr,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Relay {
    /// Binds both sockets on `bind_ip` (ephemeral ports) and returns the relay and the futures
    /// of its three tasks (to be spawned by the caller, which owns their lifetime).
    pub async fn bind(
        bind_ip: &str,
        rate_bps: u64,
        max_delay: Duration,
    ) -> Result<(
        Relay,
        Vec<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>>,
    )> {
        let client_sock = Arc::new(
            UdpSocket::bind(format!("{bind_ip}:0"))
                .await
                .context("relay: binding the client-facing socket")?,
        );
        let up_sock = Arc::new(
            UdpSocket::bind(format!("{bind_ip}:0"))
                .await
                .context("relay: binding the upstream socket")?,
        );
        let inner = Arc::new(Inner {
            rate_bps: AtomicU64::new(rate_bps),
            max_delay_us: AtomicU64::new(max_delay.as_micros() as u64),
            upstream: Mutex::new(None),
            client: Mutex::new(None),
            stats: Mutex::new(RelayStats::default()),
            link_free_at: Mutex::new(None),
            highest_seq: Mutex::new(std::collections::HashMap::new()),
            loss_every: AtomicU64::new(0),
            new_rtp: AtomicU64::new(0),
        });
        let relay = Relay {
            inner: inner.clone(),
            client_addr: client_sock.local_addr()?,
            upstream_local: up_sock.local_addr()?,
        };
        let (tx, rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
        let tasks: Vec<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>> = vec![
            Box::pin(upstream_task(
                inner.clone(),
                client_sock.clone(),
                up_sock.clone(),
            )),
            Box::pin(downstream_in_task(inner.clone(), up_sock, tx)),
            Box::pin(downstream_out_task(inner, client_sock, rx)),
        ];
        Ok((relay, tasks))
    }

    /// The address the subscriber connection must send to (what the rewritten candidate says).
    pub fn client_facing_addr(&self) -> SocketAddr {
        self.client_addr
    }

    /// The address the server sees the subscriber at.
    pub fn upstream_local_addr(&self) -> SocketAddr {
        self.upstream_local
    }

    /// Where upstream datagrams go (the server's media address).
    pub fn set_upstream(&self, addr: SocketAddr) {
        *lock(&self.inner.upstream) = Some(addr);
    }

    pub fn upstream(&self) -> Option<SocketAddr> {
        *lock(&self.inner.upstream)
    }

    /// Changes the downstream rate (bit/s; 0 = unlimited). Takes effect for the next datagram;
    /// what is already queued leaves at the times it was given.
    pub fn set_rate(&self, rate_bps: u64) {
        self.inner.rate_bps.store(rate_bps, Ordering::Release);
    }

    pub fn rate(&self) -> u64 {
        self.inner.rate_bps.load(Ordering::Acquire)
    }

    pub fn set_max_delay(&self, max_delay: Duration) {
        self.inner
            .max_delay_us
            .store(max_delay.as_micros() as u64, Ordering::Release);
    }

    /// Drops every `n`th downstream RTP packet that is not a repeat of its SSRC's sequence
    /// numbers (first transmissions, RTX packets included; NACK answers on the media SSRC are
    /// repeats and pass): a lossy link, deterministic. 0 stops dropping.
    pub fn set_loss_every(&self, n: u64) {
        self.inner.loss_every.store(n, Ordering::Release);
    }

    pub fn stats(&self) -> RelayStats {
        let mut s = lock(&self.inner.stats).clone();
        s.rate_bps = self.rate();
        s
    }
}

async fn upstream_task(inner: Arc<Inner>, client_sock: Arc<UdpSocket>, up_sock: Arc<UdpSocket>) {
    let mut buf = vec![0u8; 2048];
    loop {
        let Ok((n, from)) = client_sock.recv_from(&mut buf).await else {
            continue;
        };
        *lock(&inner.client) = Some(from);
        let target = *lock(&inner.upstream);
        match target {
            Some(server) => {
                let _ = up_sock.send_to(&buf[..n], server).await;
                let mut s = lock(&inner.stats);
                s.up_packets += 1;
                s.up_bytes += n as u64;
            }
            None => lock(&inner.stats).up_dropped += 1,
        }
    }
}

/// Gives each downstream datagram its departure time (or drops it) and queues it.
async fn downstream_in_task(
    inner: Arc<Inner>,
    up_sock: Arc<UdpSocket>,
    tx: mpsc::UnboundedSender<(Instant, Vec<u8>)>,
) {
    let mut buf = vec![0u8; 2048];
    loop {
        let Ok((n, _from)) = up_sock.recv_from(&mut buf).await else {
            continue;
        };
        let now = Instant::now();
        let rate = inner.rate_bps.load(Ordering::Acquire);
        let max_delay = Duration::from_micros(inner.max_delay_us.load(Ordering::Acquire));
        let depart = {
            let mut free = lock(&inner.link_free_at);
            let start = free.map_or(now, |f| f.max(now));
            if rate == 0 {
                *free = Some(now);
                Some(now)
            } else if start.duration_since(now) > max_delay {
                None
            } else {
                let bits = ((n + IP_UDP_OVERHEAD) * 8) as u64;
                let busy = Duration::from_nanos(bits * 1_000_000_000 / rate);
                *free = Some(start + busy);
                // The datagram is delivered when its last bit has crossed the link.
                Some(start + busy)
            }
        };
        let kind = classify(&buf[..n]);
        let repeat = match kind {
            Datagram::Rtp { ssrc, seq } => {
                let mut highest = lock(&inner.highest_seq);
                match highest.get(&ssrc) {
                    Some(&h) if (seq.wrapping_sub(h) as i16) <= 0 => true,
                    _ => {
                        highest.insert(ssrc, seq);
                        false
                    }
                }
            }
            _ => false,
        };
        let every = inner.loss_every.load(Ordering::Acquire);
        let lose = match kind {
            Datagram::Rtp { .. } if !repeat && every > 0 => {
                (inner.new_rtp.fetch_add(1, Ordering::AcqRel) + 1) % every == 0
            }
            _ => false,
        };
        let mut s = lock(&inner.stats);
        if let Datagram::Rtp { ssrc, seq } = kind {
            *s.down_rtp_by_stream
                .entry((ssrc, buf[1] & 0x7f))
                .or_default() += 1;
            if lose {
                s.down_lost += 1;
                if s.lost.len() < MAX_LOST_KEPT {
                    s.lost.push((ssrc, seq));
                }
                continue;
            }
        }
        match kind {
            Datagram::Rtp { .. } => s.down_rtp += 1,
            Datagram::Rtcp => s.down_rtcp += 1,
            Datagram::Other => {}
        }
        if repeat {
            s.down_rtp_repeats += 1;
        }
        match depart {
            None => {
                s.down_dropped += 1;
                s.down_dropped_bytes += n as u64;
            }
            Some(at) => {
                s.max_queue_delay = s.max_queue_delay.max(at.saturating_duration_since(now));
                drop(s);
                if tx.send((at, buf[..n].to_vec())).is_err() {
                    return;
                }
            }
        }
    }
}

async fn downstream_out_task(
    inner: Arc<Inner>,
    client_sock: Arc<UdpSocket>,
    mut rx: mpsc::UnboundedReceiver<(Instant, Vec<u8>)>,
) {
    while let Some((at, data)) = rx.recv().await {
        tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
        let client = *lock(&inner.client);
        if let Some(client) = client {
            let _ = client_sock.send_to(&data, client).await;
            let mut s = lock(&inner.stats);
            s.down_packets += 1;
            s.down_bytes += data.len() as u64;
        }
    }
}

/// Points the UDP host candidates of an SDP at the relay: the first one's address becomes the
/// relay's upstream target and is replaced by `relay`; any other candidate line is removed
/// (the relay forwards to one address). Returns the new SDP and the server address found.
pub fn rewrite_candidates(sdp: &str, relay: SocketAddr) -> (String, Option<SocketAddr>) {
    let mut server = None;
    let mut out = String::with_capacity(sdp.len());
    for line in sdp.split_inclusive('\n') {
        let body = line.trim_end_matches(['\r', '\n']);
        let ending = &line[body.len()..];
        if let Some(cand) = body.strip_prefix("a=") {
            match rewrite_candidate(cand, relay) {
                CandidateRewrite::NotACandidate => out.push_str(line),
                CandidateRewrite::Rewritten(text, addr) if server.is_none() => {
                    server = Some(addr);
                    out.push_str("a=");
                    out.push_str(&text);
                    out.push_str(ending);
                }
                // Another candidate (second host, TCP, ...): dropped.
                _ => {}
            }
        } else {
            out.push_str(line);
        }
    }
    (out, server)
}

/// What [`rewrite_candidate`] did with one `candidate:` value.
#[derive(Debug, PartialEq)]
pub enum CandidateRewrite {
    NotACandidate,
    /// A UDP candidate, now pointing at the relay; with the address it had.
    Rewritten(String, SocketAddr),
    /// A candidate the relay cannot carry (TCP, unparsable).
    Unusable,
}

/// Rewrites one `candidate:...` value (without `a=`) to point at `relay`.
pub fn rewrite_candidate(cand: &str, relay: SocketAddr) -> CandidateRewrite {
    if !cand.starts_with("candidate:") {
        return CandidateRewrite::NotACandidate;
    }
    // candidate:<foundation> <component> <transport> <priority> <address> <port> typ <type> ...
    let mut parts: Vec<String> = cand.split(' ').map(str::to_owned).collect();
    if parts.len() < 8 || !parts[2].eq_ignore_ascii_case("udp") {
        return CandidateRewrite::Unusable;
    }
    let Ok(ip) = parts[4].parse::<std::net::IpAddr>() else {
        return CandidateRewrite::Unusable;
    };
    let Ok(port) = parts[5].parse::<u16>() else {
        return CandidateRewrite::Unusable;
    };
    parts[4] = relay.ip().to_string();
    parts[5] = relay.port().to_string();
    CandidateRewrite::Rewritten(parts.join(" "), SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_are_classified() {
        let mut rtp = vec![0x80, 96, 0x12, 0x34, 0, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef];
        assert_eq!(
            classify(&rtp),
            Datagram::Rtp {
                ssrc: 0xdead_beef,
                seq: 0x1234
            }
        );
        rtp[1] = 201; // RTCP RR (PT 201: 201 & 0x7f = 73)
        assert_eq!(classify(&rtp), Datagram::Rtcp);
        assert_eq!(classify(&[0, 1, 0, 0]), Datagram::Other); // STUN
        assert_eq!(classify(&[22, 254, 253]), Datagram::Other); // DTLS
    }

    #[test]
    fn candidates_point_at_the_relay() {
        let relay: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let sdp = "v=0\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n\
                   a=candidate:1 1 udp 2130706431 127.0.0.1 7882 typ host\r\n\
                   a=candidate:2 1 udp 2130706431 10.0.0.1 7882 typ host\r\n\
                   a=end-of-candidates\r\na=mid:0\r\n";
        let (out, server) = rewrite_candidates(sdp, relay);
        assert_eq!(server, Some("127.0.0.1:7882".parse().unwrap()));
        assert!(out.contains("a=candidate:1 1 udp 2130706431 127.0.0.1 4000 typ host\r\n"));
        assert!(!out.contains("10.0.0.1"));
        assert!(out.contains("a=end-of-candidates\r\na=mid:0\r\n"));
        assert_eq!(
            rewrite_candidate("candidate:1 1 tcp 1 127.0.0.1 9 typ host", relay),
            CandidateRewrite::Unusable
        );
    }

    /// Sends `n` datagrams of `size` bytes through a relay limited to `rate` and returns what
    /// the client received and when.
    async fn blast(rate: u64, n: usize, size: usize) -> (Vec<Instant>, RelayStats) {
        let (relay, tasks) = Relay::bind("127.0.0.1", rate, Duration::from_millis(200))
            .await
            .unwrap();
        let handles: Vec<_> = tasks.into_iter().map(tokio::spawn).collect();
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        relay.set_upstream(server.local_addr().unwrap());
        // The client speaks first (as ICE does): the relay learns both ends.
        client
            .send_to(b"hello", relay.client_facing_addr())
            .await
            .unwrap();
        let mut buf = [0u8; 2048];
        let (_, relay_up) = server.recv_from(&mut buf).await.unwrap();
        let payload = vec![7u8; size];
        for _ in 0..n {
            server.send_to(&payload, relay_up).await.unwrap();
        }
        let mut arrivals = Vec::new();
        while let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_millis(500), client.recv_from(&mut buf)).await
        {
            arrivals.push(Instant::now());
        }
        let stats = relay.stats();
        for h in handles {
            h.abort();
        }
        (arrivals, stats)
    }

    #[tokio::test]
    async fn unlimited_relay_passes_everything() {
        let (arrivals, stats) = blast(0, 50, 1000).await;
        assert_eq!(arrivals.len(), 50);
        assert_eq!(stats.down_dropped, 0);
        assert_eq!(stats.up_packets, 1);
    }

    #[tokio::test]
    async fn limited_relay_paces_and_drops_beyond_the_queue_bound() {
        // 1000-byte datagrams at 400 kbit/s: 20.56 ms each; 200 ms of queue holds ~10 (more
        // if this busy machine hands them to the relay slowly, but never all 40).
        let (arrivals, stats) = blast(400_000, 40, 1000).await;
        assert!(
            (9..40).contains(&arrivals.len()) && stats.down_dropped > 0,
            "{} arrived, {stats:?}",
            arrivals.len()
        );
        assert!(
            stats.max_queue_delay <= Duration::from_millis(221),
            "{stats:?}"
        );
        assert_eq!(stats.down_dropped as usize + arrivals.len(), 40);
        let span = arrivals.last().unwrap().duration_since(arrivals[0]);
        let expected = Duration::from_micros(20_560 * (arrivals.len() as u64 - 1));
        assert!(
            span + Duration::from_millis(15) >= expected,
            "{} datagrams in {span:?}, expected about {expected:?}",
            arrivals.len()
        );
    }
}
