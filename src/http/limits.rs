//! Connection admission, byte counting and message-rate limiting for the HTTP front.
//!
//! - [`ConnLimiter`] counts open TCP connections in total and per client address (IPv4: the
//!   address; IPv6: its /64) and decides at accept time whether a connection is served
//!   normally, served from the small *reserve* (only `/healthz`, `/stats`, `/metrics` and static files:
//!   `/rtc` gets 503), or refused. Each admitted connection holds a [`ConnMeta`]; its slot is
//!   given back when the last clone is dropped (a WebSocket session keeps one).
//! - [`CountingIo`] wraps the TCP stream and counts the bytes read, so a WebSocket session can
//!   tell that a message has started but not completed.
//! - [`TokenBucket`] bounds the signaling messages one session may submit.
//! - [`JoinLimiter`] bounds the `join`s per second from one client address (same key as the
//!   connection cap), across all its connections; its memory is bounded ([`JOIN_TABLE_MAX`]).
//! - [`HttpCounters`]: what the limits did, for `/healthz`, `/stats` and `/metrics`.

use serde::Serialize;
use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Connections served beyond `max_connections` for `/healthz`, `/stats`, `/metrics` and static files
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
    /// Sessions resumed on a new connection, `resume`s refused, and dropped sessions whose
    /// grace period ended without a resume (the participant was removed).
    pub sessions_resumed: AtomicU64,
    pub resumes_refused: AtomicU64,
    pub resume_expired: AtomicU64,
    /// Joins refused with `too_many_rooms` (the server has `max_rooms` rooms open).
    pub joins_refused_rooms: AtomicU64,
    /// Joins refused with `room_full` (`max_participants_per_room`).
    pub joins_refused_room_full: AtomicU64,
    /// Joins refused with `join_rate_limited` (`max_joins_per_ip`, `join_burst_per_ip`).
    pub joins_rate_limited: AtomicU64,
}

/// A snapshot of [`HttpCounters`] plus the effective limits, as served under `"http"`.
#[derive(Debug, Clone, Serialize, PartialEq)]
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
    pub sessions_resumed: u64,
    pub resumes_refused: u64,
    pub resume_expired: u64,
    pub joins_refused_rooms: u64,
    pub joins_refused_room_full: u64,
    pub joins_rate_limited: u64,
    pub rate_limit_closes: u64,
    pub oversize_closes: u64,
    pub accept_errors: u64,
    pub max_connections: u64,
    pub max_connections_per_ip: u64,
    /// Joins per second per address, sustained (0: unlimited), and at once.
    pub max_joins_per_ip: f64,
    pub join_burst_per_ip: u64,
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
            sessions_resumed: g(&self.sessions_resumed),
            resumes_refused: g(&self.resumes_refused),
            resume_expired: g(&self.resume_expired),
            joins_refused_rooms: g(&self.joins_refused_rooms),
            joins_refused_room_full: g(&self.joins_refused_room_full),
            joins_rate_limited: g(&self.joins_rate_limited),
            rate_limit_closes: g(&self.rate_limit_closes),
            oversize_closes: g(&self.oversize_closes),
            accept_errors: g(&self.accept_errors),
            max_connections: limiter.map_or(0, |l| l.max_total as u64),
            max_connections_per_ip: limiter.map_or(0, |l| l.max_per_ip as u64),
            max_joins_per_ip: limiter.map_or(0.0, |l| l.join_rate.rate),
            join_burst_per_ip: limiter.map_or(0, |l| l.join_rate.burst as u64),
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

/// Counts open connections and admits new ones; also holds the per-address join limiter
/// (the connections it admits take their joins from it, [`ConnMeta::take_join`]).
#[derive(Debug)]
pub struct ConnLimiter {
    max_total: usize,
    max_per_ip: usize,
    counts: Mutex<Counts>,
    join_rate: JoinRate,
    joins: Mutex<JoinLimiter>,
    counters: Arc<HttpCounters>,
}

impl ConnLimiter {
    /// Connection caps, joins not limited.
    pub fn new(max_total: usize, max_per_ip: usize, counters: Arc<HttpCounters>) -> Arc<Self> {
        Self::with_join_rate(max_total, max_per_ip, JoinRate::UNLIMITED, counters)
    }

    /// Connection caps and a per-address join rate.
    pub fn with_join_rate(
        max_total: usize,
        max_per_ip: usize,
        join_rate: JoinRate,
        counters: Arc<HttpCounters>,
    ) -> Arc<Self> {
        Arc::new(ConnLimiter {
            max_total,
            max_per_ip,
            counts: Mutex::new(Counts::default()),
            join_rate,
            joins: Mutex::new(JoinLimiter::new(join_rate, JOIN_TABLE_MAX)),
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

    /// One `join` from this connection's address, at `now`: `Err(retry_after)` when the
    /// address is over its join rate (counted in `joins_rate_limited`).
    pub fn take_join(&self, now: Instant) -> Result<(), Duration> {
        let limiter = &self.0.limiter;
        let r = limiter
            .joins
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(self.0.key, now);
        if r.is_err() {
            HttpCounters::inc(&limiter.counters.joins_rate_limited);
        }
        r
    }

    /// The join rate this connection's address is held to.
    pub fn join_rate(&self) -> JoinRate {
        self.0.limiter.join_rate
    }
}

/// Joins per address: `rate` per second sustained, `burst` at once; a rate of 0 is unlimited.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JoinRate {
    pub rate: f64,
    pub burst: usize,
}

impl JoinRate {
    pub const UNLIMITED: JoinRate = JoinRate {
        rate: 0.0,
        burst: 0,
    };

    pub fn is_unlimited(&self) -> bool {
        self.rate <= 0.0
    }
}

/// Addresses the join limiter remembers at most. An address whose bucket is full again
/// (unused for `burst / rate` seconds) is forgotten first, losing nothing; past this many
/// busy addresses the fullest buckets are forgotten (each such address gets a fresh burst),
/// so spraying addresses costs the server at most this many entries (≈ 64 bytes each).
pub const JOIN_TABLE_MAX: usize = 65_536;

/// Token buckets of `join`s per client address (IPv4 address or IPv6 /64, see
/// [`address_key`]), with bounded memory. Time is passed in.
#[derive(Debug)]
pub struct JoinLimiter {
    rate: JoinRate,
    max_entries: usize,
    buckets: HashMap<IpAddr, TokenBucket>,
}

impl JoinLimiter {
    pub fn new(rate: JoinRate, max_entries: usize) -> Self {
        JoinLimiter {
            rate,
            max_entries: max_entries.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Addresses remembered.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Takes one join for `key` (already an [`address_key`]); `Err` says how long until the
    /// next one is allowed.
    pub fn take(&mut self, key: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.rate.is_unlimited() {
            return Ok(());
        }
        if !self.buckets.contains_key(&key) && self.buckets.len() >= self.max_entries {
            self.evict(now);
        }
        let JoinRate { rate, burst } = self.rate;
        let bucket = self
            .buckets
            .entry(key)
            .or_insert_with(|| TokenBucket::new(rate, burst, now));
        if bucket.take(now) {
            Ok(())
        } else {
            Err(bucket.until_next())
        }
    }

    /// Make room: forget every address whose bucket has refilled (as if never seen); if that
    /// is not enough, forget the fullest buckets until an eighth of the table is free (so
    /// the sweep runs at most once per that many new addresses).
    fn evict(&mut self, now: Instant) {
        self.buckets.retain(|_, b| !b.is_full(now));
        let keep = self.max_entries - self.max_entries.div_ceil(8);
        if self.buckets.len() > keep {
            let mut by_tokens: Vec<(f64, IpAddr)> = self
                .buckets
                .iter_mut()
                .map(|(k, b)| (b.tokens_at(now), *k))
                .collect();
            by_tokens.sort_by(|a, b| b.0.total_cmp(&a.0));
            let excess = self.buckets.len() - keep;
            for (_, k) in by_tokens.into_iter().take(excess) {
                self.buckets.remove(&k);
            }
        }
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
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
    }

    /// Tokens available at `now`.
    pub fn tokens_at(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }

    /// Full at `now`: the bucket is as good as a new one.
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.tokens_at(now) >= self.burst
    }

    /// Time until the next token (zero when one is there), as of the last take.
    pub fn until_next(&self) -> Duration {
        let missing = (1.0 - self.tokens).max(0.0);
        if missing == 0.0 || self.rate <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(missing / self.rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn ip(s: &str) -> IpAddr {
        address_key(s.parse().unwrap())
    }

    #[test]
    fn joins_per_address_burst_then_rate_with_retry_after() {
        // Virtual time: an arbitrary origin, then only offsets from it.
        let t0 = Instant::now();
        let mut l = JoinLimiter::new(
            JoinRate {
                rate: 2.0,
                burst: 3,
            },
            100,
        );
        let a = ip("10.0.0.1");
        assert!((0..3).all(|_| l.take(a, t0).is_ok()));
        // Over: the next join is 0.5 s away.
        assert_eq!(l.take(a, t0), Err(Duration::from_millis(500)));
        // Refusals take nothing: 0.3 s later it is 0.2 s away, at 0.5 s it passes.
        assert_eq!(
            l.take(a, t0 + Duration::from_millis(300)),
            Err(Duration::from_millis(200))
        );
        assert!(l.take(a, t0 + Duration::from_millis(500)).is_ok());
        assert!(l.take(a, t0 + Duration::from_millis(500)).is_err());
        // Another address has its own bucket; an IPv6 /64 is one address.
        let b = ip("2001:db8:0:1::1");
        assert!((0..3).all(|_| l.take(b, t0).is_ok()));
        assert!(l.take(ip("2001:db8:0:1:ffff::2"), t0).is_err());
        assert!(l.take(ip("2001:db8:0:2::1"), t0).is_ok());
        // Sustained: 2 per second, whatever is tried.
        let mut passed = 0;
        for ms in (1000..11_000).step_by(50) {
            passed += usize::from(l.take(a, t0 + Duration::from_millis(ms)).is_ok());
        }
        assert!((19..=21).contains(&passed), "{passed}");
        // Unlimited: everything passes, nothing is remembered.
        let mut u = JoinLimiter::new(JoinRate::UNLIMITED, 10);
        assert!((0..1000).all(|_| u.take(a, t0).is_ok()));
        assert!(u.is_empty());
    }

    #[test]
    fn join_limiter_memory_is_bounded() {
        let t0 = Instant::now();
        let max = 64;
        let mut l = JoinLimiter::new(
            JoinRate {
                rate: 1.0,
                burst: 2,
            },
            max,
        );
        // An attacker sprays 10 000 addresses, one join each, all at once: the table never
        // holds more than `max`.
        for i in 0..10_000u32 {
            let a = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert!(l.take(a, t0).is_ok());
            assert!(l.len() <= max, "{} entries", l.len());
        }
        // A busy address (bucket empty) survives eviction while sprayed addresses are
        // forgotten: the fullest buckets go first.
        let busy = ip("192.0.2.1");
        assert!(l.take(busy, t0).is_ok());
        assert!(l.take(busy, t0).is_ok());
        assert!(l.take(busy, t0).is_err());
        for i in 0..(4 * max as u32) {
            let a = IpAddr::V4(std::net::Ipv4Addr::from(0x0b00_0000 + i));
            let _ = l.take(a, t0);
            assert!(l.len() <= max);
        }
        assert!(
            l.take(busy, t0).is_err(),
            "the busy address was not forgotten"
        );
        // Buckets that refilled are dropped first (nothing lost): 2 s later all are full, so
        // the first eviction keeps only the addresses seen since.
        let t1 = t0 + Duration::from_secs(2);
        let mut fresh = 0;
        loop {
            let before = l.len();
            let a = IpAddr::V4(std::net::Ipv4Addr::from(0x0c00_0000 + fresh));
            assert!(l.take(a, t1).is_ok());
            fresh += 1;
            if l.len() <= before {
                break;
            }
        }
        assert_eq!(l.len(), fresh as usize);
        assert!(l.take(busy, t1).is_ok() && l.take(busy, t1).is_ok());
    }

    #[test]
    fn connections_share_their_address_join_bucket() {
        let t0 = Instant::now();
        let counters = Arc::new(HttpCounters::default());
        let l = ConnLimiter::with_join_rate(
            10,
            10,
            JoinRate {
                rate: 1.0,
                burst: 2,
            },
            Arc::clone(&counters),
        );
        let a = l.admit(ip("10.0.0.1")).unwrap();
        let b = l.admit(ip("10.0.0.1")).unwrap();
        assert!(a.take_join(t0).is_ok());
        assert!(b.take_join(t0).is_ok());
        assert_eq!(a.take_join(t0), Err(Duration::from_secs(1)));
        assert!(l.admit(ip("10.0.0.2")).unwrap().take_join(t0).is_ok());
        assert_eq!(counters.joins_rate_limited.load(Relaxed), 1);
        let stats = counters.snapshot(Some(&l));
        assert_eq!(stats.joins_rate_limited, 1);
        assert_eq!(stats.max_joins_per_ip, 1.0);
        assert_eq!(stats.join_burst_per_ip, 2);
        // Without a join rate, joins are not limited.
        let u = ConnLimiter::new(10, 10, Arc::clone(&counters));
        let c = u.admit(ip("10.0.0.1")).unwrap();
        assert!((0..100).all(|_| c.take_join(t0).is_ok()));
    }
}
