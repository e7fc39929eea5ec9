//! Server-side measurements for the load tester and the benchmark: the server's packet counters,
//! CPU time and RSS, sampled at the start and end of a measurement window; percentiles; a
//! progress line while a run goes on.
//!
//! Sources, each optional, all read at the same moment:
//! - **`/proc/<pid>`** of a server on this machine (`--server-pid`): CPU time from the sum of
//!   every thread's `schedstat` run time (ns; falls back to `stat` utime+stime in 10 ms ticks)
//!   and RSS from `status`;
//! - **`GET /stats`** of a Plaza server (works remotely): its counters plus its own CPU time
//!   and RSS (see `src/http/metrics.rs`); a server without `/stats` falls back to
//! - **`GET /healthz`**: counters only (`rtp_packets_forwarded`, …).
//!
//! A server without counters (Janus) is measured by what the subscribers received: the caller
//! passes the client-side totals in with each sample.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::peer::{Peer, PeerEvent};
use super::probe;
use plaza::http::metrics;
use plaza::signal::PcTarget;
use webrtc::peer_connection::RTCPeerConnectionState;

/// Microseconds since the process's clock origin (shared by every peer of the process, so
/// one-way latencies between them are comparable).
pub fn now_us() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

// ───────────────────────────── percentiles ─────────────────────────────

/// Percentiles of a set of values (durations in milliseconds, mostly).
#[derive(Debug, Serialize, Default, Clone, PartialEq)]
pub struct Summary {
    pub count: usize,
    pub min: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

/// A non-empty set of values, sorted, for nearest-rank percentiles (the one implementation
/// behind [`summarize`] and the load tester's own summary, which has p95 instead of p90).
pub struct Sorted(Vec<f64>);

impl Sorted {
    /// `values` (any order) sorted; `None` when there are none.
    pub fn new(values: &[f64]) -> Option<Sorted> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        Some(Sorted(v))
    }

    pub fn count(&self) -> usize {
        self.0.len()
    }

    pub fn min(&self) -> f64 {
        self.0[0]
    }

    pub fn max(&self) -> f64 {
        self.0[self.0.len() - 1]
    }

    pub fn mean(&self) -> f64 {
        self.0.iter().sum::<f64>() / self.0.len() as f64
    }

    /// The nearest-rank `p`th percentile (`p` in 0..=100).
    pub fn pct(&self, p: f64) -> f64 {
        self.0[((p / 100.0) * (self.0.len() - 1) as f64).round() as usize]
    }
}

/// Nearest-rank percentiles of `values` (any order).
pub fn summarize(values: &[f64]) -> Summary {
    let Some(v) = Sorted::new(values) else {
        return Summary::default();
    };
    Summary {
        count: v.count(),
        min: v.min(),
        p50: v.pct(50.0),
        p90: v.pct(90.0),
        p99: v.pct(99.0),
        max: v.max(),
        mean: v.mean(),
    }
}

/// Percentiles of microsecond samples, in milliseconds.
pub fn summarize_us_as_ms(us: &[u32]) -> Summary {
    let ms: Vec<f64> = us.iter().map(|&u| f64::from(u) / 1000.0).collect();
    summarize(&ms)
}

// ───────────────────────────── /proc ─────────────────────────────

// The parsers are the server's own (`src/http/metrics.rs`), so both read `/proc` alike.

/// `USER_HZ`, the unit of utime/stime in `/proc/<pid>/stat` (100 on Linux).
pub const CLOCK_TICKS_PER_S: f64 = metrics::CLOCK_TICKS_PER_S as f64;

/// `Key: N kB` from `/proc/<pid>/status`, in bytes (a unit-less value as it is).
pub use plaza::http::metrics::parse_status_field as parse_status_kb;

/// utime + stime (ticks) from `/proc/<pid>/stat` text; the command name may contain spaces.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    metrics::parse_stat_times(stat).map(|(utime, stime)| utime + stime)
}

/// CPU time and RSS of a process, read from `/proc`.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct ProcUsage {
    /// utime + stime, seconds (10 ms resolution).
    pub cpu_ticks_s: Option<f64>,
    /// Sum of the threads' schedstat run time, seconds (ns resolution; threads that already
    /// exited are missing, so it is only used while it agrees with the tick count).
    pub cpu_runtime_s: Option<f64>,
    /// Sum of the threads' schedstat run-queue wait: time spent runnable but waiting for a
    /// CPU (seconds). On a shared machine this says how much other processes held it back.
    pub cpu_wait_s: Option<f64>,
    pub rss_bytes: Option<u64>,
    pub threads: Option<u64>,
}

impl ProcUsage {
    pub fn read(pid: u32) -> ProcUsage {
        let base = format!("/proc/{pid}");
        let cpu_ticks_s = std::fs::read_to_string(format!("{base}/stat"))
            .ok()
            .as_deref()
            .and_then(parse_stat_ticks)
            .map(|t| t as f64 / CLOCK_TICKS_PER_S);
        let status = std::fs::read_to_string(format!("{base}/status")).unwrap_or_default();
        let (mut runtime_ns, mut wait_ns) = (0u64, 0u64);
        let mut any = false;
        if let Ok(dir) = std::fs::read_dir(format!("{base}/task")) {
            for e in dir.flatten() {
                if let Some((run, wait)) = thread_schedstat(&e.path()) {
                    runtime_ns += run;
                    wait_ns += wait;
                    any = true;
                }
            }
        }
        ProcUsage {
            cpu_ticks_s,
            cpu_runtime_s: any.then_some(runtime_ns as f64 / 1e9),
            cpu_wait_s: any.then_some(wait_ns as f64 / 1e9),
            rss_bytes: parse_status_kb(&status, "VmRSS"),
            threads: parse_status_kb(&status, "Threads"),
        }
    }

    /// The best CPU time of this sample (runtime when available, else ticks).
    pub fn cpu_s(&self) -> Option<f64> {
        self.cpu_runtime_s.or(self.cpu_ticks_s)
    }
}

/// CPU seconds between two samples: schedstat run time when both have it and it agrees with the
/// tick count (no thread exited in between), else ticks.
pub fn cpu_delta(a: &ProcUsage, b: &ProcUsage) -> Option<f64> {
    let ticks = match (a.cpu_ticks_s, b.cpu_ticks_s) {
        (Some(x), Some(y)) => Some(y - x),
        _ => None,
    };
    let runtime = match (a.cpu_runtime_s, b.cpu_runtime_s) {
        (Some(x), Some(y)) if y >= x => Some(y - x),
        _ => None,
    };
    match (runtime, ticks) {
        (Some(r), Some(t)) if (r - t).abs() <= 0.05 + 0.1 * t => Some(r),
        (_, Some(t)) => Some(t),
        (r, None) => r,
    }
}

/// Run-queue wait seconds between two samples (None when a thread exited in between).
pub fn wait_delta(a: &ProcUsage, b: &ProcUsage) -> Option<f64> {
    match (a.cpu_wait_s, b.cpu_wait_s) {
        (Some(x), Some(y)) if y >= x => Some(y - x),
        _ => None,
    }
}

// ───────────────────────────── HTTP ─────────────────────────────

/// A minimal `GET` (HTTP/1.1, `Connection: close`): status and body. `url` is
/// `http://host:port/path`.
pub async fn http_get(url: &str, timeout: Duration) -> Result<(u16, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("{url}: only http:// URLs"))?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr = if hostport.contains(':') {
        hostport.to_owned()
    } else {
        format!("{hostport}:80")
    };
    let fut = async {
        let mut s = TcpStream::connect(&addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| anyhow!("GET {url}: timed out"))?
        .with_context(|| format!("GET {url}"))?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("GET {url}: malformed response"))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("GET {url}: no status"))?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// `ws://host:port/rtc` → `http://host:port/<path>`.
pub fn http_url_from_ws(ws_url: &str, path: &str) -> Option<String> {
    let rest = ws_url
        .strip_prefix("ws://")
        .or_else(|| ws_url.strip_prefix("http://"))?;
    let hostport = rest.split('/').next()?;
    Some(format!("http://{hostport}{path}"))
}

// ───────────────────────────── server samples ─────────────────────────────

/// Counters a Plaza server exports (`/healthz`, `/stats`).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct ServerCounters {
    pub rtp_packets_in: u64,
    pub rtp_packets_forwarded: u64,
    pub rtp_packets_dropped: u64,
    pub participants: u64,
}

/// What the server says about its own process (`/stats`).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct SelfReported {
    pub cpu_s: Option<f64>,
    pub cpu_runtime_s: Option<f64>,
    pub rss_bytes: Option<u64>,
}

/// Client-side totals at a moment (what every subscriber received so far).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct ClientTotals {
    pub packets_received: u64,
    pub packets_expected: u64,
    pub packets_sent: u64,
    /// Packets the subscribers should have received given what the publishers wrote (each
    /// plain track's packets times its subscribers); 0 when unknown (simulcast).
    #[serde(default)]
    pub packets_due: u64,
    /// Peers whose session the server (or the network) ended (see `Peer::removed`).
    #[serde(default)]
    pub peers_removed: u64,
    #[serde(default)]
    pub peers: u64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Sample {
    #[serde(skip)]
    pub at: Option<Instant>,
    pub counters: Option<ServerCounters>,
    pub proc: Option<ProcUsage>,
    pub self_reported: Option<SelfReported>,
    pub clients: ClientTotals,
    /// This process (the load generator).
    pub generator: ProcUsage,
    /// The server's in-core forwarding latency histogram (Plaza `/stats`
    /// `forward_latency.buckets`: `[upper bound µs, count]`).
    #[serde(skip)]
    pub forward_latency_buckets: Option<Vec<(u64, u64)>>,
    /// Packets forwarded by each core shard (Plaza `/stats` `shards[].rtp_packets_forwarded`).
    #[serde(skip)]
    pub shard_forwarded: Option<Vec<u64>>,
    /// CPU time each core shard's thread (`plaza-core-<i>`) used so far, seconds, by shard
    /// index (Plaza on this machine).
    #[serde(skip)]
    pub shard_cpu_s: Option<Vec<f64>>,
}

/// A thread's run time and run-queue wait so far, ns (`/proc/<pid>/task/<tid>/schedstat`, the
/// thread's directory given).
fn thread_schedstat(task: &std::path::Path) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(task.join("schedstat")).ok()?;
    let mut f = text.split_whitespace().map(|v| v.parse::<u64>().ok());
    Some((f.next()??, f.next()??))
}

/// CPU time (schedstat run time, seconds) of each thread of process `pid` named
/// `plaza-core-<i>` (a Plaza core shard), by `i`; `None` without such threads.
pub fn shard_thread_cpu(pid: u32) -> Option<Vec<f64>> {
    let mut by_shard: Vec<(usize, f64)> = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        let Some(i) = comm
            .trim()
            .strip_prefix("plaza-core-")
            .and_then(|i| i.parse().ok())
        else {
            continue;
        };
        if let Some((run, _)) = thread_schedstat(&e.path()) {
            by_shard.push((i, run as f64 / 1e9));
        }
    }
    if by_shard.is_empty() {
        return None;
    }
    by_shard.sort_by_key(|&(i, _)| i);
    // Only a complete set (shards 0..n) is usable.
    by_shard
        .iter()
        .enumerate()
        .all(|(k, &(i, _))| k == i)
        .then(|| by_shard.into_iter().map(|(_, s)| s).collect())
}

/// Where to read a server's numbers from.
#[derive(Debug, Clone, Default)]
pub struct ServerSource {
    pub pid: Option<u32>,
    /// `http://host:port/stats` (Plaza).
    pub stats_url: Option<String>,
    /// `http://host:port/healthz` (Plaza; fallback when `/stats` is missing).
    pub healthz_url: Option<String>,
    stats_missing: Arc<AtomicBool>,
}

fn counters_from(v: &Value) -> Option<ServerCounters> {
    let n = |k: &str| v.get(k).and_then(Value::as_u64);
    Some(ServerCounters {
        rtp_packets_forwarded: n("rtp_packets_forwarded")?,
        rtp_packets_in: n("rtp_packets_in").unwrap_or(0),
        rtp_packets_dropped: n("rtp_packets_dropped").unwrap_or(0),
        participants: n("participants").unwrap_or(0),
    })
}

impl ServerSource {
    /// A Plaza server at signaling URL `ws_url` (and, optionally, on this machine as `pid`).
    pub fn plaza(ws_url: &str, pid: Option<u32>, stats_url: Option<String>) -> Self {
        ServerSource {
            pid,
            stats_url: stats_url.or_else(|| http_url_from_ws(ws_url, "/stats")),
            healthz_url: http_url_from_ws(ws_url, "/healthz"),
            stats_missing: Arc::default(),
        }
    }

    /// A server known only by its pid (Janus).
    pub fn process(pid: u32) -> Self {
        ServerSource {
            pid: Some(pid),
            ..Default::default()
        }
    }

    pub async fn sample(&self, clients: ClientTotals) -> Sample {
        let t = Duration::from_secs(2);
        let mut counters = None;
        let mut self_reported = None;
        let mut forward_latency_buckets = None;
        let mut shard_forwarded = None;
        if let Some(url) = &self.stats_url
            && !self.stats_missing.load(Ordering::Relaxed)
        {
            match http_get(url, t).await {
                Ok((200, body)) => {
                    if let Ok(v) = serde_json::from_str::<Value>(&body) {
                        counters = counters_from(&v);
                        forward_latency_buckets = v
                            .pointer("/forward_latency/buckets")
                            .and_then(|b| serde_json::from_value(b.clone()).ok());
                        shard_forwarded = v.get("shards").and_then(Value::as_array).map(|s| {
                            s.iter()
                                .map(|s| s["rtp_packets_forwarded"].as_u64().unwrap_or(0))
                                .collect()
                        });
                        let p = v.get("process");
                        let f = |k: &str| p.and_then(|p| p.get(k)).and_then(Value::as_f64);
                        self_reported = Some(SelfReported {
                            cpu_s: f("cpu_total_s"),
                            cpu_runtime_s: f("cpu_runtime_ns").map(|ns| ns / 1e9),
                            rss_bytes: p.and_then(|p| p.get("rss_bytes")).and_then(Value::as_u64),
                        });
                    }
                }
                Ok((404, _)) => self.stats_missing.store(true, Ordering::Relaxed),
                _ => {}
            }
        }
        if counters.is_none()
            && let Some(url) = &self.healthz_url
            && let Ok((200, body)) = http_get(url, t).await
            && let Ok(v) = serde_json::from_str::<Value>(&body)
        {
            counters = counters_from(&v);
        }
        Sample {
            at: Some(Instant::now()),
            counters,
            proc: self.pid.map(ProcUsage::read),
            self_reported,
            clients,
            generator: ProcUsage::read(std::process::id()),
            forward_latency_buckets,
            shard_forwarded,
            shard_cpu_s: self.pid.and_then(shard_thread_cpu),
        }
    }
}

// ───────────────────────────── windows ─────────────────────────────

/// Everything derived from two samples.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WindowStats {
    pub seconds: f64,
    /// Server counter delta (`rtp_packets_forwarded`), when the server has one.
    pub forwarded_server: Option<u64>,
    /// What the subscribers received in the window.
    pub received_clients: u64,
    /// Subscriber-side loss in the window (expected − received over expected, %).
    pub loss_percent: f64,
    /// The count used for "per packet": the server counter when present, else what the
    /// subscribers received (Janus).
    pub forwarded: u64,
    pub forwarded_source: &'static str,
    pub forwarded_per_s: f64,
    /// Server CPU seconds in the window, from /proc (or the server's own report).
    pub server_cpu_s: Option<f64>,
    pub server_cpu_source: &'static str,
    /// Server CPU in % of one core.
    pub server_cpu_percent: Option<f64>,
    pub server_us_per_packet: Option<f64>,
    /// The same from the server's own `/stats` (remote-capable), for comparison.
    pub self_reported_cpu_s: Option<f64>,
    pub self_reported_us_per_packet: Option<f64>,
    pub server_rss_bytes: Option<u64>,
    /// The load generator's CPU in % of one core.
    pub generator_cpu_percent: Option<f64>,
    /// Time the server's / the generator's threads were runnable but waited for a CPU, in %
    /// of the window (summed over threads): how much the rest of the machine held them back.
    pub server_cpu_wait_percent: Option<f64>,
    pub generator_cpu_wait_percent: Option<f64>,
    /// Time forwarded packets spent inside the server (kernel receive stamp → handed to the kernel),
    /// from the server's own histogram over the window (Plaza only), µs.
    pub server_forward_latency_us: Option<InCoreLatency>,
    /// Each core shard's share of the packets forwarded in the window, % (Plaza with
    /// `--workers` > 1).
    pub shard_share_percent: Option<Vec<f64>>,
    /// Each core shard's thread: its CPU in % of one core, and that CPU per packet the shard
    /// forwarded itself, µs (Plaza on this machine; with one worker, its only shard). A shard that receives
    /// the publisher's packets also pays for reading and decrypting them.
    pub shard_cpu: Option<Vec<ShardCpu>>,
}

/// One core shard's CPU over a window.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct ShardCpu {
    pub cpu_percent: f64,
    /// CPU per packet this shard forwarded, µs (`None`: it forwarded none).
    pub us_per_packet: Option<f64>,
}

/// Percentiles of the server's in-core forwarding latency over a window, µs (bucket upper
/// bounds: ≤ 12.5 % above the true value).
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct InCoreLatency {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
}

fn shard_shares(a: &Sample, b: &Sample) -> Option<Vec<f64>> {
    let (x, y) = (a.shard_forwarded.as_ref()?, b.shard_forwarded.as_ref()?);
    if x.len() != y.len() || y.len() < 2 {
        return None;
    }
    let d: Vec<u64> = x.iter().zip(y).map(|(x, y)| y.saturating_sub(*x)).collect();
    let total: u64 = d.iter().sum();
    (total > 0).then(|| d.iter().map(|&n| 100.0 * n as f64 / total as f64).collect())
}

fn shard_cpu(a: &Sample, b: &Sample, seconds: f64) -> Option<Vec<ShardCpu>> {
    let (cx, cy) = (a.shard_cpu_s.as_ref()?, b.shard_cpu_s.as_ref()?);
    let (fx, fy) = (a.shard_forwarded.as_ref()?, b.shard_forwarded.as_ref()?);
    let n = cy.len();
    if n == 0 || cx.len() != n || fx.len() != n || fy.len() != n || seconds <= 0.0 {
        return None;
    }
    Some(
        (0..n)
            .map(|i| {
                let cpu = (cy[i] - cx[i]).max(0.0);
                let fwd = fy[i].saturating_sub(fx[i]);
                ShardCpu {
                    cpu_percent: 100.0 * cpu / seconds,
                    us_per_packet: (fwd > 0).then(|| cpu * 1e6 / fwd as f64),
                }
            })
            .collect(),
    )
}

fn in_core_latency(a: &Sample, b: &Sample) -> Option<InCoreLatency> {
    use plaza::sfu::latency::window_quantile_us as q;
    let (x, y) = (
        a.forward_latency_buckets.as_ref()?,
        b.forward_latency_buckets.as_ref()?,
    );
    Some(InCoreLatency {
        p50: q(x, y, 0.5)?,
        p90: q(x, y, 0.9)?,
        p99: q(x, y, 0.99)?,
        max: q(x, y, 1.0)?,
    })
}

pub fn window(a: &Sample, b: &Sample) -> WindowStats {
    let seconds = match (a.at, b.at) {
        (Some(x), Some(y)) => y.duration_since(x).as_secs_f64().max(1e-6),
        _ => 1e-6,
    };
    let forwarded_server = match (a.counters, b.counters) {
        (Some(x), Some(y)) => Some(
            y.rtp_packets_forwarded
                .saturating_sub(x.rtp_packets_forwarded),
        ),
        _ => None,
    };
    let received_clients = b
        .clients
        .packets_received
        .saturating_sub(a.clients.packets_received);
    let expected = b
        .clients
        .packets_expected
        .saturating_sub(a.clients.packets_expected);
    let loss_percent = if expected > 0 {
        100.0 * expected.saturating_sub(received_clients) as f64 / expected as f64
    } else {
        0.0
    };
    let (forwarded, forwarded_source) = match forwarded_server {
        Some(n) => (n, "server counter rtp_packets_forwarded"),
        None => (received_clients, "packets received by the subscribers"),
    };
    let proc_cpu = match (&a.proc, &b.proc) {
        (Some(x), Some(y)) => cpu_delta(x, y),
        _ => None,
    };
    let self_cpu = match (a.self_reported, b.self_reported) {
        (Some(x), Some(y)) => match (x.cpu_runtime_s, y.cpu_runtime_s, x.cpu_s, y.cpu_s) {
            (Some(p), Some(q), _, _) if q >= p => Some(q - p),
            (_, _, Some(p), Some(q)) => Some(q - p),
            _ => None,
        },
        _ => None,
    };
    let (server_cpu_s, server_cpu_source) = match (proc_cpu, self_cpu) {
        (Some(c), _) => (Some(c), "/proc/<pid>"),
        (None, Some(c)) => (Some(c), "GET /stats"),
        _ => (None, "none"),
    };
    let per_pkt = |cpu: Option<f64>| {
        cpu.filter(|_| forwarded > 0)
            .map(|c| c * 1e6 / forwarded as f64)
    };
    WindowStats {
        seconds,
        forwarded_server,
        received_clients,
        loss_percent,
        forwarded,
        forwarded_source,
        forwarded_per_s: forwarded as f64 / seconds,
        server_cpu_s,
        server_cpu_source,
        server_cpu_percent: server_cpu_s.map(|c| 100.0 * c / seconds),
        server_us_per_packet: per_pkt(server_cpu_s),
        self_reported_cpu_s: self_cpu,
        self_reported_us_per_packet: per_pkt(self_cpu),
        server_rss_bytes: b
            .proc
            .and_then(|p| p.rss_bytes)
            .or(b.self_reported.and_then(|s| s.rss_bytes)),
        generator_cpu_percent: cpu_delta(&a.generator, &b.generator).map(|c| 100.0 * c / seconds),
        server_cpu_wait_percent: match (&a.proc, &b.proc) {
            (Some(x), Some(y)) => wait_delta(x, y).map(|w| 100.0 * w / seconds),
            _ => None,
        },
        generator_cpu_wait_percent: wait_delta(&a.generator, &b.generator)
            .map(|w| 100.0 * w / seconds),
        server_forward_latency_us: in_core_latency(a, b),
        shard_share_percent: shard_shares(a, b),
        shard_cpu: shard_cpu(a, b, seconds),
    }
}

/// Server RSS of a sample (from /proc, else self-reported).
pub fn rss(s: &Sample) -> Option<u64> {
    s.proc
        .and_then(|p| p.rss_bytes)
        .or(s.self_reported.and_then(|r| r.rss_bytes))
}

// ───────────────────────────── progress ─────────────────────────────

/// The progress line's view of the peers: how many the server removed, and delivery (received
/// against what the publishers wrote) between two totals.
pub fn peer_health(a: &ClientTotals, b: &ClientTotals) -> String {
    let due = b.packets_due.saturating_sub(a.packets_due);
    let got = b.packets_received.saturating_sub(a.packets_received);
    let delivery = if due > 0 {
        format!("{:.1}%", 100.0 * got.min(due) as f64 / due as f64)
    } else {
        "-".to_owned()
    };
    let removed = if b.peers_removed > 0 {
        format!("REMOVED {}/{}", b.peers_removed, b.peers)
    } else {
        format!("removed 0/{}", b.peers)
    };
    format!("peers: {removed}  delivery {delivery} (recv {got} of {due} written×subscribers)")
}

/// Prints two lines per `every` to stderr until the returned guard is dropped: the peers
/// (removed ones, delivery), then elapsed time, forwarded packets/s, server CPU %, µs per
/// packet, RSS, received/s, latency so far.
pub fn spawn_progress(
    label: String,
    source: ServerSource,
    clients: Arc<dyn Fn() -> ClientTotals + Send + Sync>,
    every: Duration,
) -> ProgressGuard {
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let task = tokio::spawn(async move {
        let start = Instant::now();
        let mut last = source.sample(clients()).await;
        let mut ticker = tokio::time::interval(every);
        ticker.tick().await;
        loop {
            ticker.tick().await;
            if stop2.load(Ordering::Acquire) {
                break;
            }
            let now = source.sample(clients()).await;
            let w = window(&last, &now);
            let (counts, lat) = probe::peek();
            let lat = summarize_us_as_ms(&lat);
            eprintln!(
                "  [{label} {:>4.0}s] {}",
                start.elapsed().as_secs_f64(),
                peer_health(&last.clients, &now.clients)
            );
            eprintln!(
                "  [{label} {:>4.0}s] fwd {:>7.0} pkt/s  server cpu {:>5}  {:>6} µs/pkt  rss {:>7}  \
                 recv {:>7.0} pkt/s  loss {:>5.2}%  latency p50 {:.2} p99 {:.2} ms (n={})  gen cpu {}  \
                 cpu wait srv/gen {}/{}",
                start.elapsed().as_secs_f64(),
                w.forwarded_per_s,
                w.server_cpu_percent
                    .map_or("-".into(), |c| format!("{c:.0}%")),
                w.server_us_per_packet
                    .map_or("-".into(), |c| format!("{c:.2}")),
                w.server_rss_bytes.map_or("-".into(), mb),
                w.received_clients as f64 / w.seconds,
                w.loss_percent,
                lat.p50,
                lat.p99,
                counts.matched,
                w.generator_cpu_percent
                    .map_or("-".into(), |c| format!("{c:.0}%")),
                w.server_cpu_wait_percent
                    .map_or("-".into(), |c| format!("{c:.0}%")),
                w.generator_cpu_wait_percent
                    .map_or("-".into(), |c| format!("{c:.0}%")),
            );
            last = now;
        }
    });
    ProgressGuard { stop, task }
}

pub struct ProgressGuard {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ProgressGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.task.abort();
    }
}

pub fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1_048_576.0)
}

/// Waits until `url` answers 200 (a server starting), bounded.
pub async fn wait_http_ok(url: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok((200, _)) = http_get(url, Duration::from_millis(500)).await {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{url} did not answer 200 within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = summarize(&v);
        assert_eq!(
            (s.count, s.min, s.p50, s.p99, s.max),
            (100, 1.0, 51.0, 99.0, 100.0)
        );
        assert_eq!(summarize(&[]).count, 0);
        assert_eq!(summarize_us_as_ms(&[1500]).p50, 1.5);
    }

    #[test]
    fn proc_parsing() {
        let stat = "42 (a b) S 1 2 3 4 5 6 7 8 9 10 150 50 0 0";
        assert_eq!(parse_stat_ticks(stat), Some(200));
        let status = "VmRSS:\t  2048 kB\nThreads:\t3\n";
        assert_eq!(parse_status_kb(status, "VmRSS"), Some(2 << 20));
        assert_eq!(parse_status_kb(status, "Threads"), Some(3));
        let me = ProcUsage::read(std::process::id());
        if cfg!(target_os = "linux") {
            assert!(me.cpu_s().is_some() && me.rss_bytes.unwrap_or(0) > 0);
        }
    }

    #[test]
    fn cpu_delta_prefers_runtime_when_consistent() {
        let a = ProcUsage {
            cpu_ticks_s: Some(1.0),
            cpu_runtime_s: Some(1.004),
            ..Default::default()
        };
        let b = ProcUsage {
            cpu_ticks_s: Some(3.0),
            cpu_runtime_s: Some(3.001),
            ..Default::default()
        };
        assert!((cpu_delta(&a, &b).unwrap() - 1.997).abs() < 1e-9);
        // A thread exited: runtime went backwards → ticks.
        let c = ProcUsage {
            cpu_ticks_s: Some(3.0),
            cpu_runtime_s: Some(0.5),
            ..Default::default()
        };
        assert_eq!(cpu_delta(&a, &c), Some(2.0));
    }

    #[test]
    fn urls_and_chunks() {
        assert_eq!(
            http_url_from_ws("ws://127.0.0.1:7880/rtc", "/stats").as_deref(),
            Some("http://127.0.0.1:7880/stats")
        );
        assert_eq!(dechunk("4\r\nabcd\r\n2\r\nef\r\n0\r\n\r\n"), "abcdef");
    }

    #[test]
    fn window_uses_the_server_counter_or_the_clients() {
        let t0 = Instant::now();
        let s = |secs: u64, fwd: Option<u64>, cpu: f64, recv: u64| Sample {
            at: Some(t0 + Duration::from_secs(secs)),
            counters: fwd.map(|f| ServerCounters {
                rtp_packets_forwarded: f,
                ..Default::default()
            }),
            proc: Some(ProcUsage {
                cpu_ticks_s: Some(cpu),
                ..Default::default()
            }),
            self_reported: None,
            clients: ClientTotals {
                packets_received: recv,
                packets_expected: recv + recv / 100,
                ..Default::default()
            },
            generator: ProcUsage::default(),
            forward_latency_buckets: Some(vec![(10, secs * 100), (1000, secs)]),
            shard_forwarded: None,
            shard_cpu_s: None,
        };
        let w = window(
            &s(0, Some(1000), 1.0, 500),
            &s(10, Some(101_000), 2.0, 100_500),
        );
        assert_eq!(w.forwarded, 100_000);
        let l = w.server_forward_latency_us.unwrap();
        assert_eq!((l.p50, l.p99, l.max), (10, 10, 1000));
        assert!((w.server_us_per_packet.unwrap() - 10.0).abs() < 1e-9);
        assert!((w.server_cpu_percent.unwrap() - 10.0).abs() < 1e-9);
        let w = window(&s(0, None, 1.0, 0), &s(10, None, 1.5, 50_000));
        assert_eq!(w.forwarded, 50_000);
        assert!((w.server_us_per_packet.unwrap() - 10.0).abs() < 1e-9);
        assert!((w.loss_percent - 100.0 * 500.0 / 50_500.0).abs() < 1e-9);
    }
}

#[cfg(test)]
mod shard_tests {
    use super::*;

    #[test]
    fn each_shards_cpu_is_divided_by_the_packets_it_forwarded() {
        let t0 = Instant::now();
        let s = |secs: u64, fwd: [u64; 2], cpu: [f64; 2]| Sample {
            at: Some(t0 + Duration::from_secs(secs)),
            shard_forwarded: Some(fwd.to_vec()),
            shard_cpu_s: Some(cpu.to_vec()),
            ..Default::default()
        };
        let w = window(
            &s(0, [100, 0], [1.0, 0.5]),
            &s(10, [200_100, 0], [1.4, 0.6]),
        );
        let shards = w.shard_cpu.expect("two shards with their threads' CPU");
        assert!((shards[0].cpu_percent - 4.0).abs() < 1e-9);
        assert!((shards[0].us_per_packet.unwrap() - 2.0).abs() < 1e-9);
        assert!((shards[1].cpu_percent - 1.0).abs() < 1e-9);
        assert_eq!(shards[1].us_per_packet, None, "shard 1 forwarded nothing");
        // One shard: its thread alone (without the server's other threads).
        let one = |secs: u64| Sample {
            at: Some(t0 + Duration::from_secs(secs)),
            shard_forwarded: Some(vec![secs * 100_000]),
            shard_cpu_s: Some(vec![secs as f64 / 10.0]),
            ..Default::default()
        };
        let w = window(&one(0), &one(10));
        assert_eq!(w.shard_share_percent, None);
        assert!((w.shard_cpu.unwrap()[0].us_per_packet.unwrap() - 1.0).abs() < 1e-9);
        // A sample without the threads (another server, or not on this machine): nothing.
        let none = |secs: u64| Sample {
            shard_cpu_s: None,
            ..one(secs)
        };
        assert_eq!(window(&none(0), &none(10)).shard_cpu, None);
    }

    #[test]
    fn shard_threads_are_found_by_name() {
        // No thread of this process is a core shard.
        assert_eq!(shard_thread_cpu(std::process::id()), None);
        let (ready_tx, ready) = std::sync::mpsc::channel::<()>();
        let mut stops = Vec::new();
        let mut threads = Vec::new();
        for i in 0..2 {
            let (stop_tx, stop) = std::sync::mpsc::channel::<()>();
            let ready_tx = ready_tx.clone();
            stops.push(stop_tx);
            let t = std::thread::Builder::new()
                .name(format!("plaza-core-{i}"))
                .spawn(move || {
                    ready_tx.send(()).unwrap();
                    let _ = stop.recv();
                })
                .unwrap();
            threads.push(t);
        }
        ready.recv().unwrap();
        ready.recv().unwrap();
        let cpu = shard_thread_cpu(std::process::id());
        drop(stops);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(
            cpu.map(|c| c.len()),
            Some(2),
            "both shard threads, by index"
        );
    }
}

// ───────────────────────────── a whole run ─────────────────────────────

/// Samples a server before the joins, after them, and around the measurement window.
pub struct Recorder {
    pub source: ServerSource,
    before_join: Sample,
    after_join: Option<Sample>,
    window_start: Option<Sample>,
    participants: usize,
    progress: Option<ProgressGuard>,
}

/// What a run measured on the server side and with the probe.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    pub window: WindowStats,
    /// Publisher `write_rtp` → subscriber track delivery of the same packet (see `probe`).
    pub media_latency_ms: Summary,
    pub probe: probe::WindowCounts,
    pub participants: usize,
    pub server_rss_before_join_bytes: Option<u64>,
    pub server_rss_after_join_bytes: Option<u64>,
    pub server_rss_end_bytes: Option<u64>,
    /// (RSS after the joins − RSS before) / participants.
    pub server_rss_per_participant_bytes: Option<f64>,
    /// (RSS at the end of the window − RSS before the joins) / participants: includes what
    /// fills up while media flows (e.g. NACK send buffers).
    pub server_rss_end_per_participant_bytes: Option<f64>,
    pub samples: Vec<Sample>,
}

impl Recorder {
    /// Takes the "before" sample (call before anyone joins) and turns the probe on.
    pub async fn start(source: ServerSource) -> Recorder {
        probe::enable();
        let before_join = source.sample(ClientTotals::default()).await;
        Recorder {
            source,
            before_join,
            after_join: None,
            window_start: None,
            participants: 0,
            progress: None,
        }
    }

    /// Everyone joined: samples RSS growth.
    pub async fn joined(&mut self, participants: usize, clients: ClientTotals) {
        self.participants = participants;
        self.after_join = Some(self.source.sample(clients).await);
    }

    /// Starts the measurement window (and the progress line, every second).
    pub async fn begin(
        &mut self,
        label: &str,
        clients: Arc<dyn Fn() -> ClientTotals + Send + Sync>,
    ) {
        probe::start_window();
        self.window_start = Some(self.source.sample(clients()).await);
        self.progress = Some(spawn_progress(
            label.to_owned(),
            self.source.clone(),
            clients,
            Duration::from_secs(1),
        ));
    }

    /// Ends the window and derives everything.
    pub async fn end(&mut self, clients: ClientTotals) -> Measured {
        self.progress = None;
        let end = self.source.sample(clients).await;
        let probed = probe::take_window();
        let start = self.window_start.clone().unwrap_or_else(|| end.clone());
        let window = window(&start, &end);
        let before = rss(&self.before_join);
        let after = self.after_join.as_ref().and_then(rss);
        let per = match (before, after) {
            (Some(b), Some(a)) if self.participants > 0 => {
                Some((a as f64 - b as f64) / self.participants as f64)
            }
            _ => None,
        };
        let end_rss = rss(&end);
        let per_end = match (before, end_rss) {
            (Some(b), Some(e)) if self.participants > 0 => {
                Some((e as f64 - b as f64) / self.participants as f64)
            }
            _ => None,
        };
        let mut samples = vec![self.before_join.clone()];
        samples.extend(self.after_join.clone());
        samples.push(start);
        samples.push(end.clone());
        Measured {
            window,
            media_latency_ms: summarize_us_as_ms(&probed.latencies_us),
            probe: probed.counts,
            participants: self.participants,
            server_rss_before_join_bytes: before,
            server_rss_after_join_bytes: after,
            server_rss_end_bytes: end_rss,
            server_rss_per_participant_bytes: per,
            server_rss_end_per_participant_bytes: per_end,
            samples,
        }
    }
}

impl Measured {
    /// A few human-readable lines.
    pub fn print(&self) {
        let w = &self.window;
        let opt =
            |v: Option<f64>, unit: &str| v.map_or("-".to_owned(), |v| format!("{v:.2}{unit}"));
        println!(
            "server: forwarded {} packets in {:.1} s = {:.0} pkt/s ({}); subscribers received {} \
             (loss {:.2}%)",
            w.forwarded,
            w.seconds,
            w.forwarded_per_s,
            w.forwarded_source,
            w.received_clients,
            w.loss_percent
        );
        println!(
            "server CPU: {} of one core = {} per forwarded packet ({}); self-reported {}",
            opt(w.server_cpu_percent, "%"),
            opt(w.server_us_per_packet, " µs"),
            w.server_cpu_source,
            opt(w.self_reported_us_per_packet, " µs/pkt"),
        );
        println!(
            "server RSS: {} before joins, {} after, {} at the end; per participant {} after \
             the joins, {} at the end ({} participants); load generator CPU {}; waiting for a \
             CPU: server {}, generator {}",
            self.server_rss_before_join_bytes.map_or("-".into(), mb),
            self.server_rss_after_join_bytes.map_or("-".into(), mb),
            self.server_rss_end_bytes.map_or("-".into(), mb),
            self.server_rss_per_participant_bytes
                .map_or("-".into(), |b| format!("{:.1} KB", b / 1024.0)),
            self.server_rss_end_per_participant_bytes
                .map_or("-".into(), |b| format!("{:.1} KB", b / 1024.0)),
            self.participants,
            opt(w.generator_cpu_percent, "%"),
            opt(w.server_cpu_wait_percent, "%"),
            opt(w.generator_cpu_wait_percent, "%"),
        );
        if let Some(shares) = &w.shard_share_percent {
            let s: Vec<String> = shares.iter().map(|p| format!("{p:.1}%")).collect();
            println!(
                "server shards: share of the forwarded packets {}",
                s.join(" / ")
            );
        }
        if let Some(shards) = &w.shard_cpu {
            let s: Vec<String> = shards
                .iter()
                .map(|c| {
                    let per = c.us_per_packet.map_or("-".into(), |u| format!("{u:.2} µs"));
                    format!("{:.1}% ({per}/pkt)", c.cpu_percent)
                })
                .collect();
            println!(
                "server shards: CPU of each shard's thread (per packet it forwarded) {}",
                s.join(" / ")
            );
        }
        if let Some(l) = w.server_forward_latency_us {
            println!(
                "server in-core latency (kernel receive stamp → sendmmsg, from /stats): p50 {} p90 {} \
                 p99 {} max {} µs",
                l.p50, l.p90, l.p99, l.max
            );
        }
        let l = &self.media_latency_ms;
        println!(
            "media latency (publisher write → subscriber receive): n={} p50 {:.2} p90 {:.2} \
             p99 {:.2} max {:.2} ms (matched {} of {} received; unmatched {}, unmapped {}, \
             stale {})",
            l.count,
            l.p50,
            l.p90,
            l.p99,
            l.max,
            self.probe.matched,
            self.probe.received,
            self.probe.unmatched,
            self.probe.unmapped,
            self.probe.stale
        );
    }
}

// ───────────────────────────── Plaza peers ─────────────────────────────

/// What every peer received and sent so far.
pub fn plaza_client_totals(peers: &[Arc<Peer>]) -> ClientTotals {
    let mut t = ClientTotals {
        peers: peers.len() as u64,
        ..ClientTotals::default()
    };
    let subscribing = |p: &Peer| p.options().auto_subscribe != Some(false);
    let mut due_known = true;
    for p in peers {
        for r in p.remote_tracks() {
            t.packets_received += r.packets;
            t.packets_expected += r.expected();
        }
        let others = peers
            .iter()
            .filter(|o| !Arc::ptr_eq(o, p) && subscribing(o))
            .count() as u64;
        for l in p.local_tracks() {
            t.packets_sent += l.counters.packets;
            t.packets_due += l.counters.packets * others;
            due_known &= l.layers.len() <= 1;
        }
        if p.removed().is_some() {
            t.peers_removed += 1;
        }
    }
    if !due_known {
        t.packets_due = 0;
    }
    t
}

/// Tells the probe which publisher SSRCs each room track carries (call once everyone joined).
pub fn map_plaza_probe(peers: &[Arc<Peer>]) {
    let by_id: std::collections::HashMap<&str, &Arc<Peer>> =
        peers.iter().map(|p| (p.participant_id(), p)).collect();
    for p in peers {
        for t in p.room_tracks() {
            let Some(publisher) = by_id.get(t.participant_id.as_str()) else {
                continue;
            };
            let ssrcs: Vec<u32> = publisher
                .local_tracks()
                .iter()
                .filter(|l| l.kind == t.kind)
                .flat_map(|l| {
                    std::iter::once(l.ssrc).chain(l.layers.iter().map(|layer| layer.ssrc))
                })
                .collect();
            probe::map_track(probe::track_key(&t.id), &ssrcs);
        }
    }
}

/// A peer's join, from its events.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JoinTime {
    /// WebSocket open → `joined`.
    pub signaling_ms: f64,
    /// WebSocket open → ready: `chat` and `input` open and, when publishing, the publisher
    /// connection connected (what `Peer::connect` waits for).
    pub ready_ms: Option<f64>,
    /// WebSocket open → the first forwarded media packet.
    pub first_media_ms: Option<f64>,
}

pub fn plaza_join_time(peer: &Peer) -> JoinTime {
    let origin = peer.ws_opened_at();
    let (mut chat, mut input, mut publ) = (None, None, None);
    for e in peer.events() {
        match &e.event {
            PeerEvent::DataChannelOpen { label } if label == "chat" => {
                chat.get_or_insert(e.at);
            }
            PeerEvent::DataChannelOpen { label } if label == "input" => {
                input.get_or_insert(e.at);
            }
            PeerEvent::ConnectionState {
                target: PcTarget::Publisher,
                state: RTCPeerConnectionState::Connected,
            } => {
                publ.get_or_insert(e.at);
            }
            _ => {}
        }
    }
    let ready = match (chat, input) {
        (Some(c), Some(i)) => {
            let t = c.max(i);
            if peer.publisher_pc().is_some() {
                publ.map(|p| p.max(t))
            } else {
                Some(t)
            }
        }
        _ => None,
    };
    let ms = |t: Instant| t.saturating_duration_since(origin).as_secs_f64() * 1000.0;
    JoinTime {
        signaling_ms: peer.joined().join_latency.as_secs_f64() * 1000.0,
        ready_ms: ready.map(ms),
        first_media_ms: peer
            .remote_tracks()
            .iter()
            .filter_map(|t| t.first_packet_at)
            .min()
            .map(ms),
    }
}

/// Percentiles of the join times of `peers`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JoinSummary {
    pub signaling_ms: Summary,
    pub ready_ms: Summary,
    pub first_media_ms: Summary,
}

pub fn plaza_join_summary(peers: &[Arc<Peer>]) -> JoinSummary {
    let times: Vec<JoinTime> = peers.iter().map(|p| plaza_join_time(p)).collect();
    JoinSummary {
        signaling_ms: summarize(&times.iter().map(|t| t.signaling_ms).collect::<Vec<_>>()),
        ready_ms: summarize(&times.iter().filter_map(|t| t.ready_ms).collect::<Vec<_>>()),
        first_media_ms: summarize(
            &times
                .iter()
                .filter_map(|t| t.first_media_ms)
                .collect::<Vec<_>>(),
        ),
    }
}
