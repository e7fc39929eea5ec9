//! `GET /metrics` and `GET /stats`.
//!
//! `/metrics` answers in the Prometheus text format (see [`super::prom`] for the names):
//! every core counter, the HTTP counters, latency and join-time histograms, per-shard and
//! (with `--metrics-room-labels N`) per-room gauges, and the standard process metrics. When
//! the core does not answer in time it still answers 200, with `plaza_core_up 0` and the
//! HTTP and process metrics.
//!
//! `/stats` answers the same counters plus the server process's own resource usage in one
//! JSON object, so a load tester can compute CPU time per forwarded packet and memory per
//! participant against a server on another machine (where it cannot read `/proc/<pid>`).
//!
//! ```json
//! {"status":"ok", "rtp_packets_forwarded":…, …every CoreStats counter…,
//!  "http":{"connections_open":…, "refused_per_ip":…, "join_timeouts":…, …},
//!  "process":{"pid":1234, "cpu_user_s":1.23, "cpu_system_s":0.45, "cpu_total_s":1.68,
//!             "cpu_runtime_ns":1681234567, "rss_bytes":12345678, "rss_peak_bytes":…,
//!             "threads":9, "clock_ticks_per_s":100}}
//! ```
//!
//! - `cpu_user_s`/`cpu_system_s` come from `/proc/self/stat` (clock ticks, usually 10 ms);
//! - `cpu_runtime_ns` is the sum of every thread's `/proc/self/task/*/schedstat` run time, in
//!   nanoseconds (finer; absent when the kernel has no schedstat);
//! - `rss_bytes`/`rss_peak_bytes` are `VmRSS`/`VmHWM` from `/proc/self/status`.
//!
//! Counters and process figures are read in the same request, so two requests give consistent
//! deltas. Everything under `process` is `null` where `/proc` is unavailable (not Linux).

use super::{AppState, STATS_TIMEOUT, ok_stats_body, prom};
use crate::sfu::admin::{AdminOp, AdminReply};
use axum::{
    Json,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;

/// Linux `USER_HZ`: the unit of utime/stime in `/proc/<pid>/stat`. It is 100 on every Linux
/// architecture Rust targets (the kernel fixes it for user space), so no `sysconf` is needed.
pub const CLOCK_TICKS_PER_S: u64 = 100;

/// The server process's resource usage.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ProcessUsage {
    pub pid: u32,
    pub cpu_user_s: Option<f64>,
    pub cpu_system_s: Option<f64>,
    pub cpu_total_s: Option<f64>,
    pub cpu_runtime_ns: Option<u64>,
    pub rss_bytes: Option<u64>,
    pub rss_peak_bytes: Option<u64>,
    pub threads: Option<u64>,
    pub clock_ticks_per_s: u64,
    /// For `/metrics` only (`process_virtual_memory_bytes`, `process_open_fds`,
    /// `process_max_fds`, `process_start_time_seconds`); not in the JSON.
    #[serde(skip)]
    pub virtual_bytes: Option<u64>,
    #[serde(skip)]
    pub open_fds: Option<u64>,
    #[serde(skip)]
    pub max_fds: Option<u64>,
    #[serde(skip)]
    pub start_time_s: Option<f64>,
}

/// utime and stime (clock ticks) from the text of `/proc/<pid>/stat`. The command name (field 2)
/// may contain spaces and parentheses, so fields are counted after the last `)`.
pub fn parse_stat_times(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After ")": state(3) ppid(4) … utime is field 14, stime 15 → indexes 11 and 12 here.
    let utime = fields.nth(11)?.parse().ok()?;
    let stime = fields.next()?.parse().ok()?;
    Some((utime, stime))
}

/// The start time (field 22, clock ticks after boot) from the text of `/proc/<pid>/stat`.
pub fn parse_stat_start_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ")": state is field 3, so field 22 is index 19 here.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// `btime` (boot time, seconds since the epoch) from the text of `/proc/stat`.
pub fn parse_boot_time(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

/// The soft `Max open files` limit from the text of `/proc/<pid>/limits`.
pub fn parse_max_open_files(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A `Key:   123 kB` line of `/proc/<pid>/status`, in bytes (or the plain number for
/// unit-less keys such as `Threads`).
pub fn parse_status_field(status: &str, key: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(key)?.strip_prefix(':')?;
        let mut parts = rest.split_whitespace();
        let n: u64 = parts.next()?.parse().ok()?;
        Some(match parts.next() {
            Some("kB") => n * 1024,
            _ => n,
        })
    })
}

/// Sum of the first field (run time, ns) of every thread's `schedstat`.
fn runtime_ns() -> Option<u64> {
    let mut total = 0u64;
    let mut any = false;
    for entry in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path().join("schedstat")) else {
            continue;
        };
        if let Some(ns) = text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
        {
            total += ns;
            any = true;
        }
    }
    any.then_some(total)
}

/// Reads this process's usage from `/proc/self`.
pub fn process_usage() -> ProcessUsage {
    let mut u = ProcessUsage {
        pid: std::process::id(),
        clock_ticks_per_s: CLOCK_TICKS_PER_S,
        ..Default::default()
    };
    let stat = std::fs::read_to_string("/proc/self/stat").ok();
    if let Some((ut, st)) = stat.as_deref().and_then(parse_stat_times) {
        let hz = CLOCK_TICKS_PER_S as f64;
        u.cpu_user_s = Some(ut as f64 / hz);
        u.cpu_system_s = Some(st as f64 / hz);
        u.cpu_total_s = Some((ut + st) as f64 / hz);
    }
    if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
        u.rss_bytes = parse_status_field(&status, "VmRSS");
        u.rss_peak_bytes = parse_status_field(&status, "VmHWM");
        u.threads = parse_status_field(&status, "Threads");
        u.virtual_bytes = parse_status_field(&status, "VmSize");
    }
    u.cpu_runtime_ns = runtime_ns();
    u
}

/// [`process_usage`] and what only `/metrics` exports: open and maximum file descriptors,
/// virtual memory, start time.
pub fn process_usage_full() -> ProcessUsage {
    let mut u = process_usage();
    u.open_fds = std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as u64);
    u.max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .as_deref()
        .and_then(parse_max_open_files);
    let start = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .as_deref()
        .and_then(parse_stat_start_ticks);
    let boot = std::fs::read_to_string("/proc/stat")
        .ok()
        .as_deref()
        .and_then(parse_boot_time);
    if let (Some(start), Some(boot)) = (start, boot) {
        u.start_time_s = Some(boot as f64 + start as f64 / CLOCK_TICKS_PER_S as f64);
    }
    u
}

/// `GET /metrics`: the Prometheus text format. Wire with
/// `.route("/metrics", get(metrics::metrics))`.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let body = prom::render(scrape(&state).await);
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, prom::CONTENT_TYPE),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

/// Reads what `/metrics` exports: the core's counters (each shard waited for at most
/// [`STATS_TIMEOUT`] in all), and with `--metrics-room-labels N` the room listing.
pub async fn scrape(state: &AppState) -> prom::Scrape {
    let core = tokio::time::timeout(STATS_TIMEOUT, state.handle.stats())
        .await
        .ok()
        .and_then(Result::ok);
    let n = state.settings.metrics_room_labels;
    let rooms = if n == 0 || core.is_none() {
        Vec::new()
    } else {
        match tokio::time::timeout(STATS_TIMEOUT, state.handle.admin(AdminOp::ListRooms)).await {
            Ok(Ok(AdminReply::Rooms(rooms))) => prom::largest_rooms(rooms, n),
            _ => Vec::new(),
        }
    };
    prom::Scrape {
        core,
        http: Some(state.http_stats()),
        process: process_usage_full(),
        join_time: state.join_time.snapshot(),
        rooms,
        webhooks: state.handle.webhooks().map(|w| w.stats()),
        cluster: state
            .cluster
            .as_ref()
            .map(crate::cluster::ClusterView::stats),
    }
}

/// `GET /stats`: the JSON counters (`/healthz`'s body plus `process`). Wire with
/// `.route("/stats", get(metrics::stats))`.
pub async fn stats(State(state): State<AppState>) -> Response {
    match ok_stats_body(&state).await {
        Some(mut body) => {
            body.insert(
                "process".into(),
                serde_json::to_value(process_usage()).unwrap_or_default(),
            );
            (StatusCode::OK, Json(serde_json::Value::Object(body))).into_response()
        }
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({
                "status": "unavailable",
                "http": super::http_json(&state),
                "process": process_usage(),
            })),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_times_survive_odd_command_names() {
        let stat = "4242 (plaza (core) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                    321 45 0 0 20 0 9 0 12345 1000000 2000 18446744073709551615";
        assert_eq!(parse_stat_times(stat), Some((321, 45)));
        assert_eq!(parse_stat_times("garbage"), None);
        assert_eq!(parse_stat_times("1 (x) S 1 2"), None);
    }

    #[test]
    fn start_time_limits_and_boot_time() {
        let stat = "4242 (plaza (core) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 \
                    321 45 0 0 20 0 9 0 12345 1000000 2000 18446744073709551615";
        assert_eq!(parse_stat_start_ticks(stat), Some(12345));
        assert_eq!(
            parse_boot_time("cpu  1 2 3\nbtime 1765000000\nprocesses 9\n"),
            Some(1765000000)
        );
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 524288               files\n";
        assert_eq!(parse_max_open_files(limits), Some(1024));
        if cfg!(target_os = "linux") {
            let u = process_usage_full();
            assert!(u.open_fds.unwrap_or(0) > 0);
            assert!(u.max_fds.unwrap_or(0) >= u.open_fds.unwrap_or(0));
            let start = u.start_time_s.unwrap_or(0.0);
            assert!(start > 1.5e9, "{start}");
        }
    }

    #[test]
    fn status_fields() {
        let status = "Name:\tplaza\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\nThreads:\t9\n";
        assert_eq!(parse_status_field(status, "VmRSS"), Some(10240 * 1024));
        assert_eq!(parse_status_field(status, "VmHWM"), Some(20480 * 1024));
        assert_eq!(parse_status_field(status, "Threads"), Some(9));
        assert_eq!(parse_status_field(status, "VmSwap"), None);
    }

    #[test]
    fn own_usage_is_readable_on_linux() {
        let u = process_usage();
        assert_eq!(u.pid, std::process::id());
        if cfg!(target_os = "linux") {
            assert!(u.cpu_total_s.is_some());
            assert!(u.rss_bytes.unwrap_or(0) > 0);
            assert!(u.threads.unwrap_or(0) >= 1);
        }
    }
}
