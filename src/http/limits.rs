//! Connection admission, byte counting and message-rate limiting for the HTTP front.
//!
//! - [`ConnLimiter`] counts open TCP connections in total and per client address (IPv4: the
//!   address; IPv6: its /64) and decides at accept time whether a connection is served
//!   normally, served from the small *reserve* (only `/healthz`, `/metrics` and static files:
//!   `/rtc` gets 503), or refused. Each admitted connection holds a [`ConnMeta`]; its slot is
//!   given back when the last clone is dropped (a WebSocket session keeps one).
//! - [`CountingIo`] wraps the TCP stream and counts the bytes read, so a WebSocket session can
//!   tell that a message has started but not completed.
//! - [`TokenBucket`] bounds the signaling messages one session may submit.
//! - [`HttpCounters`]: what the limits did, for `/healthz` and `/metrics`.

use serde::Serialize;
use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Connections served beyond `max_connections` for `/healthz`, `/metrics` and static files
/// only (no WebSocket), so monitoring still answers when the WebSocket cap is full.
pub const RESERVE: usize = 32;

/// Counters of the HTTP front: limits hit and connections open.
#[derive(Debug, Default)]
pub struct HttpCounters {
    pub connections_open: AtomicU64,
    pub connections_accepted: AtomicU64,
    pub websockets_open: AtomicU64,
    /// Connections from an address already at `max_connections_per_ip` (refused).
    pub refused_per_ip: AtomicU64,
    /// Connections beyond `max_connections` and the reserve (refused).
    pub refused_total: AtomicU64,
    /// Connections served from the reserve (`/rtc` refused with 503 there).
    pub reserve_connections: AtomicU64,
    /// WebSocket upgrades refused with 503 because the connection came from the reserve.
    pub websocket_refused: AtomicU64,
    /// Connections closed because their request headers did not arrive in time.
    pub header_timeouts: AtomicU64,
    /// WebSockets closed for not joining in time.
    pub join_timeouts: AtomicU64,
    /// Joined WebSockets closed for sending nothing (not even a pong) in time.
    pub idle_timeouts: AtomicU64,
    /// WebSockets closed because a message started but did not complete in time.
    pub message_timeouts: AtomicU64,
    /// Messages answered with `rate_limited` (not passed on).
    pub rate_limited_messages: AtomicU64,
    /// WebSockets closed for flooding past the rate limit for a sustained time.
    pub rate_limit_closes: AtomicU64,
    /// WebSockets closed for a message beyond the hard size limit (1009).
    pub oversize_closes: AtomicU64,
    /// Accept errors (e.g. out of file descriptors).
    pub accept_errors: AtomicU64,
    /// Joins refused for their access token (missing, invalid, expired, not yet valid, wrong
    /// room, join not granted).
    pub token_refusals: AtomicU64,
}

/// A snapshot of [`HttpCounters`] plus the effective limits, as served under `"http"`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HttpStats {
    pub connections_open: u64,
    pub connections_accepted: u64,
    pub websockets_open: u64,
    pub refused_per_ip: u64,
    pub refused_total: u64,
    pub reserve_connections: u64,
    pub websocket_refused: u64,
    pub header_timeouts: u64,
    pub join_timeouts: u64,
    pub idle_timeouts: u64,
    pub message_timeouts: u64,
    pub rate_limited_messages: u64,
    pub token_refusals: u64,
    pub rate_limit_closes: u64,
    pub oversize_closes: u64,
    pub accept_errors: u64,
    pub max_connections: u64,
    pub max_connections_per_ip: u64,
}

impl HttpCounters {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self, limiter: Option<&ConnLimiter>) -> HttpStats {
        let g = |c: &AtomicU64| c.load(Relaxed);
        HttpStats {
            connections_open: g(&self.connections_open),
            connections_accepted: g(&self.connections_accepted),
            websockets_open: g(&self.websockets_open),
            refused_per_ip: g(&self.refused_per_ip),
            refused_total: g(&self.refused_total),
            reserve_connections: g(&self.reserve_connections),
            websocket_refused: g(&self.websocket_refused),
            header_timeouts: g(&self.header_timeouts),
            join_timeouts: g(&self.join_timeouts),
            idle_timeouts: g(&self.idle_timeouts),
            message_timeouts: g(&self.message_timeouts),
            rate_limited_messages: g(&self.rate_limited_messages),
            token_refusals: g(&self.token_refusals),
            rate_limit_closes: g(&self.rate_limit_closes),
            oversize_closes: g(&self.oversize_closes),
            accept_errors: g(&self.accept_errors),
            max_connections: limiter.map_or(0, |l| l.max_total as u64),
            max_connections_per_ip: limiter.map_or(0, |l| l.max_per_ip as u64),
        }
    }
}

/// The key connections are counted under: the IPv4 address, or the /64 of an IPv6 one
/// (IPv4-mapped IPv6 addresses count as IPv4).
pub fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// What an accepted connection may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Served normally.
    Normal,
    /// Served from the reserve: no WebSocket, no keep-alive.
    Reserve,
    /// Over the per-address cap: refused.
    RefusedPerIp,
    /// Over the total cap and the reserve: refused.
    RefusedTotal,
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    reserve: usize,
    per_ip: HashMap<IpAddr, usize>,
}

/// Counts open connections and admits new ones.
#[derive(Debug)]
pub struct ConnLimiter {
    max_total: usize,
    max_per_ip: usize,
    counts: Mutex<Counts>,
    counters: Arc<HttpCounters>,
}

impl ConnLimiter {
    pub fn new(max_total: usize, max_per_ip: usize, counters: Arc<HttpCounters>) -> Arc<Self> {
        Arc::new(ConnLimiter {
            max_total,
            max_per_ip,
            counts: Mutex::new(Counts::default()),
            counters,
        })
    }

    pub fn max_total(&self) -> usize {
        self.max_total
    }

    /// Decide about a connection from `ip`; on admission the returned [`ConnMeta`] holds its
    /// slot until dropped.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<ConnMeta, Admission> {
        let key = address_key(ip);
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let from_ip = c.per_ip.get(&key).copied().unwrap_or(0);
        if from_ip >= self.max_per_ip {
            HttpCounters::inc(&self.counters.refused_per_ip);
            return Err(Admission::RefusedPerIp);
        }
        let admission = if c.total - c.reserve < self.max_total {
            Admission::Normal
        } else if c.reserve < RESERVE {
            c.reserve += 1;
            HttpCounters::inc(&self.counters.reserve_connections);
            Admission::Reserve
        } else {
            HttpCounters::inc(&self.counters.refused_total);
            return Err(Admission::RefusedTotal);
        };
        c.total += 1;
        *c.per_ip.entry(key).or_insert(0) += 1;
        drop(c);
        self.counters.connections_open.fetch_add(1, Relaxed);
        HttpCounters::inc(&self.counters.connections_accepted);
        Ok(ConnMeta(Arc::new(MetaInner {
            limiter: Arc::clone(self),
            key,
            reserve: admission == Admission::Reserve,
            bytes_read: Arc::new(AtomicU64::new(0)),
        })))
    }

    fn release(&self, key: IpAddr, reserve: bool) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        c.total -= 1;
        if reserve {
            c.reserve -= 1;
        }
        if let Some(n) = c.per_ip.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&key);
            }
        }
        drop(c);
        self.counters.connections_open.fetch_sub(1, Relaxed);
    }
}

#[derive(Debug)]
struct MetaInner {
    limiter: Arc<ConnLimiter>,
    key: IpAddr,
    reserve: bool,
    bytes_read: Arc<AtomicU64>,
}

impl Drop for MetaInner {
    fn drop(&mut self) {
        self.limiter.release(self.key, self.reserve);
    }
}

/// An admitted connection: put into every request's extensions; the WebSocket session keeps a
/// clone, so the slot is held as long as the socket is open.
#[derive(Debug, Clone)]
pub struct ConnMeta(Arc<MetaInner>);

impl ConnMeta {
    /// Served from the reserve: no WebSocket.
    pub fn is_reserve(&self) -> bool {
        self.0.reserve
    }

    /// Bytes read from the connection so far (HTTP request included).
    pub fn bytes_read(&self) -> u64 {
        self.0.bytes_read.load(Relaxed)
    }

    pub(crate) fn byte_counter(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.0.bytes_read)
    }
}

/// An I/O stream that counts the bytes read through it.
#[derive(Debug)]
pub struct CountingIo<T> {
    inner: T,
    read: Arc<AtomicU64>,
}

impl<T> CountingIo<T> {
    pub fn new(inner: T, read: Arc<AtomicU64>) -> Self {
        CountingIo { inner, read }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CountingIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.read.fetch_add(n as u64, Relaxed);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountingIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A token bucket: `burst` tokens, refilled at `rate` per second.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: usize, now: Instant) -> Self {
        TokenBucket {
            rate,
            burst: burst as f64,
            tokens: burst as f64,
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, now: Instant) -> bool {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 5, t0);
        assert!((0..5).all(|_| b.take(t0)));
        assert!(!b.take(t0));
        // 0.25 s later: 2.5 tokens.
        let t1 = t0 + Duration::from_millis(250);
        assert!(b.take(t1));
        assert!(b.take(t1));
        assert!(!b.take(t1));
        // Never more than the burst.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| b.take(t2)).count(), 5);
    }

    #[test]
    fn limiter_caps_per_address_and_total_with_reserve() {
        let counters = Arc::new(HttpCounters::default());
        let l = ConnLimiter::new(3, 2, Arc::clone(&counters));
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = l.admit(a).unwrap();
        let _a2 = l.admit(a).unwrap();
        assert_eq!(l.admit(a).unwrap_err(), Admission::RefusedPerIp);
        let b1 = l.admit(b).unwrap();
        assert!(!b1.is_reserve());
        // Total cap reached: the next ones come from the reserve.
        let c: Vec<ConnMeta> = (0..RESERVE)
            .map(|i| {
                let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0b00_0000 + i as u32));
                l.admit(ip).unwrap()
            })
            .collect();
        assert!(c.iter().all(ConnMeta::is_reserve));
        let late: IpAddr = "12.0.0.1".parse().unwrap();
        assert_eq!(l.admit(late).unwrap_err(), Admission::RefusedTotal);
        // A normal slot freed: normal again. A reserve slot freed: reserve again.
        drop(a1);
        assert!(!l.admit(late).unwrap().is_reserve());
        drop(c);
        assert_eq!(counters.connections_open.load(Relaxed), 2);
        assert_eq!(counters.refused_per_ip.load(Relaxed), 1);
        assert_eq!(counters.refused_total.load(Relaxed), 1);
        drop(b1);
        // Clones hold the slot.
        let x = l.admit(b).unwrap();
        let y = x.clone();
        drop(x);
        assert_eq!(counters.connections_open.load(Relaxed), 2);
        drop(y);
        assert_eq!(counters.connections_open.load(Relaxed), 1);
    }

    #[test]
    fn ipv6_counts_per_64() {
        let a = address_key("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = address_key("2001:db8:1:2:bbbb::9".parse().unwrap());
        let c = address_key("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            address_key("::ffff:10.0.0.1".parse().unwrap()),
            "10.0.0.1".parse::<IpAddr>().unwrap()
        );
    }
}
