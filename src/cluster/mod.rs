//! The cluster control plane on Redis (or Valkey). What exists: the node registry. With
//! `--redis URL` the node writes its [`registry::NodeRecord`] (id, addresses, version, load) as
//! a JSON string with a TTL at `plaza:node:<id>` and lists its id in the sorted set
//! `plaza:nodes`, refreshed by a heartbeat; graceful shutdown deletes both at once, a crash
//! is noticed when the record's TTL runs out. `GET /api/nodes` lists every live record.
//!
//! Redis is never on the media or signaling path: the heartbeat runs in its own task, a
//! failed heartbeat is counted (`/stats` `cluster`, `/metrics`), logged once per outage, and
//! retried with a backoff; the node re-registers as soon as Redis answers again.
//!
//! Without `--redis` nothing here runs: no task, no connection.

// The driver side of the registry: the heartbeat task reads the clock (wall time for the
// record's timestamps, monotonic time for the schedule) and shares its counters with the HTTP
// handlers.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

pub mod registry;

use crate::sfu::SfuHandle;
use redis::AsyncCommands as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use registry::{Heartbeat, HeartbeatTiming, LoadSampler, NodeRecord, Transition};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// How long one Redis round trip (a heartbeat, a listing, the deregistration) may take.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(1);

/// The cluster settings (`--redis`, `--node-id`, `--node-address`).
#[derive(Clone, Default, PartialEq)]
pub struct ClusterConfig {
    /// Redis URL; `None`: one node, no Redis code runs.
    pub redis: Option<String>,
    /// This node's id (`None`: a random `ND_…` id at start).
    pub node_id: Option<String>,
    /// HTTP address (`host:port`) other nodes and clients use (`None`: the first announced IP
    /// and the bound HTTP port).
    pub node_address: Option<String>,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("redis", &self.redis.as_deref().map(redact_url))
            .field("node_id", &self.node_id)
            .field("node_address", &self.node_address)
            .finish()
    }
}

/// The URL without its password (`redis://user:secret@host` → `redis://user:***@host`).
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => format!("{scheme}://***@{host}"),
    }
}

/// Why the cluster could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("bad --redis URL {url}: {source}")]
    BadUrl {
        url: String,
        source: redis::RedisError,
    },
}

/// The registry's counters, served under `"cluster"` in `/stats` and in `/metrics`.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ClusterStats {
    /// `false`: no `--redis`, one node (the other fields are empty).
    pub enabled: bool,
    pub node_id: Option<String>,
    /// The last heartbeat reached Redis (the node is listed).
    pub registered: bool,
    pub heartbeats: u64,
    pub heartbeat_failures: u64,
    /// Times Redis became unreachable.
    pub outages: u64,
}

#[derive(Debug, Default)]
struct Counters {
    registered: AtomicBool,
    heartbeats: AtomicU64,
    failures: AtomicU64,
    outages: AtomicU64,
}

/// What the HTTP handlers see of the cluster: the counters and a connection to list nodes.
#[derive(Clone)]
pub struct ClusterView {
    node_id: String,
    counters: Arc<Counters>,
    conn: ConnectionManager,
}

impl std::fmt::Debug for ClusterView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterView")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl ClusterView {
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn stats(&self) -> ClusterStats {
        let c = &self.counters;
        ClusterStats {
            enabled: true,
            node_id: Some(self.node_id.clone()),
            registered: c.registered.load(Ordering::Relaxed),
            heartbeats: c.heartbeats.load(Ordering::Relaxed),
            heartbeat_failures: c.failures.load(Ordering::Relaxed),
            outages: c.outages.load(Ordering::Relaxed),
        }
    }

    /// Every live node's record (those whose TTL has not run out), by id.
    pub async fn nodes(&self) -> Result<Vec<NodeRecord>, redis::RedisError> {
        let mut conn = self.conn.clone();
        let fut = async move {
            let ids: Vec<String> = conn.zrange(registry::NODES_KEY, 0, -1).await?;
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let keys: Vec<String> = ids.iter().map(|id| registry::node_key(id)).collect();
            let values: Vec<Option<String>> = conn.mget(&keys).await?;
            let mut nodes: Vec<NodeRecord> = values
                .into_iter()
                .flatten()
                .filter_map(|v| NodeRecord::decode(&v).ok())
                .collect();
            nodes.sort_by(|a, b| a.id.cmp(&b.id));
            Ok(nodes)
        };
        match tokio::time::timeout(REDIS_TIMEOUT, fut).await {
            Ok(r) => r,
            Err(_) => Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "Redis did not answer in time",
            ))),
        }
    }
}

/// The running registry: its heartbeat task. [`Registry::deregister`] removes the node at
/// once; dropping it without that stops the heartbeat only (as a crash would: the record
/// expires after its TTL).
#[derive(Debug)]
pub struct Registry {
    view: ClusterView,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

/// What the registry needs to know about the node.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub http_addr: SocketAddr,
    pub udp_addrs: Vec<SocketAddr>,
    pub announce_ips: Vec<std::net::IpAddr>,
}

impl Registry {
    /// Starts the heartbeat (the first one at once). Returns `Ok(None)` without `--redis`.
    /// Never waits for Redis: the connection is made by the heartbeat task.
    pub fn start(
        config: &ClusterConfig,
        node: NodeInfo,
        handle: SfuHandle,
        timing: HeartbeatTiming,
    ) -> Result<Option<Registry>, ClusterError> {
        let Some(url) = config.redis.as_deref() else {
            return Ok(None);
        };
        let bad = |source| ClusterError::BadUrl {
            url: redact_url(url),
            source,
        };
        let client = redis::Client::open(url).map_err(bad)?;
        let conn = ConnectionManager::new_lazy_with_config(
            client,
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(REDIS_TIMEOUT))
                .set_response_timeout(Some(REDIS_TIMEOUT))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(500)),
        )
        .map_err(bad)?;
        let id = config
            .node_id
            .clone()
            .unwrap_or_else(registry::random_node_id);
        let ip = node
            .announce_ips
            .first()
            .copied()
            .unwrap_or(node.http_addr.ip());
        let address = config
            .node_address
            .clone()
            .unwrap_or_else(|| SocketAddr::new(ip, node.http_addr.port()).to_string());
        let media = node
            .udp_addrs
            .iter()
            .map(|a| SocketAddr::new(ip, a.port()).to_string())
            .collect();
        let record = NodeRecord {
            id: id.clone(),
            address,
            media,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at: unix_ms(),
            heartbeat_at: 0,
            ttl_ms: timing.ttl.as_millis() as u64,
            load: Default::default(),
        };
        let view = ClusterView {
            node_id: id.clone(),
            counters: Arc::default(),
            conn: conn.clone(),
        };
        let (stop, stop_rx) = watch::channel(false);
        let span = tracing::info_span!("cluster", node = %id);
        let task = tokio::spawn(tracing::Instrument::instrument(
            heartbeat_loop(
                record,
                conn,
                handle,
                timing,
                Arc::clone(&view.counters),
                stop_rx,
            ),
            span,
        ));
        info!(node = %id, redis = %redact_url(url), "cluster: registering in Redis");
        Ok(Some(Registry {
            view,
            stop,
            task: Some(task),
        }))
    }

    pub fn view(&self) -> ClusterView {
        self.view.clone()
    }

    /// Stops the heartbeat and removes the node's record and listing entry (waiting at most
    /// three [`REDIS_TIMEOUT`]s: a heartbeat and its retry in flight, then the deletion).
    pub async fn deregister(mut self) {
        let _ = self.stop.send(true);
        if let Some(mut task) = self.task.take() {
            if tokio::time::timeout(REDIS_TIMEOUT * 3, &mut task)
                .await
                .is_err()
            {
                warn!("cluster: the heartbeat did not stop in time");
                task.abort();
            }
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The process's CPU time (user + system) in clock ticks.
fn cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let (user, system) = crate::http::metrics::parse_stat_times(&stat)?;
    Some(user + system)
}

async fn heartbeat_loop(
    mut record: NodeRecord,
    mut conn: ConnectionManager,
    handle: SfuHandle,
    timing: HeartbeatTiming,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) {
    let mut hb = Heartbeat::new(timing, std::time::Instant::now());
    let mut sampler = LoadSampler::default();
    let key = registry::node_key(&record.id);
    loop {
        let due = tokio::time::Instant::from_std(hb.next_at());
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = stop.changed() => break,
        }
        if *stop.borrow() {
            break;
        }
        // The load, from the same counters `/stats` reads (skipped if the core is slow).
        let stats = tokio::time::timeout(REDIS_TIMEOUT, handle.stats())
            .await
            .ok()
            .and_then(Result::ok);
        if let Some(s) = &stats {
            let (cpu, pps) = sampler.sample(
                std::time::Instant::now(),
                cpu_ticks(),
                crate::http::metrics::CLOCK_TICKS_PER_S,
                s.rtp_packets_forwarded,
            );
            record.load = registry::NodeLoad {
                cpu_percent: cpu,
                rooms: s.rooms,
                participants: s.participants,
                forwarded_pps: pps,
            };
        }
        record.heartbeat_at = unix_ms();
        let mut error = None;
        // A failed command makes the connection manager reconnect; the first command after
        // Redis returns may still see the old error, so a failure is retried once at once (it
        // waits for that reconnection).
        for _ in 0..2 {
            let result =
                tokio::time::timeout(REDIS_TIMEOUT, beat(&mut conn, &key, &record, timing)).await;
            error = match result {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("Redis did not answer in time".to_owned()),
            };
            if error.is_none() {
                break;
            }
        }
        let ok = error.is_none();
        counters.registered.store(ok, Ordering::Relaxed);
        if ok {
            counters.heartbeats.fetch_add(1, Ordering::Relaxed);
        } else {
            counters.failures.fetch_add(1, Ordering::Relaxed);
        }
        match hb.on_result(std::time::Instant::now(), ok) {
            Transition::None => {}
            Transition::Lost => {
                counters.outages.fetch_add(1, Ordering::Relaxed);
                warn!(
                    error = error.as_deref().unwrap_or(""),
                    "cluster: Redis unreachable, the node keeps serving and retries (logged once per outage)"
                );
            }
            Transition::Restored { outage, failures } => {
                info!(
                    outage_ms = outage.as_millis() as u64,
                    failures, "cluster: Redis reachable again, the node is registered"
                );
            }
        }
    }
    counters.registered.store(false, Ordering::Relaxed);
    let id = record.id.clone();
    let gone = async {
        redis::pipe()
            .atomic()
            .del(&key)
            .ignore()
            .zrem(registry::NODES_KEY, &id)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
    };
    match tokio::time::timeout(REDIS_TIMEOUT, gone).await {
        Ok(Ok(())) => info!("cluster: deregistered"),
        Ok(Err(e)) => warn!(error = %e, "cluster: could not deregister (the record expires)"),
        Err(_) => warn!("cluster: Redis did not answer the deregistration (the record expires)"),
    }
}

/// One heartbeat: the record with its TTL, the listing entry scored by the heartbeat time,
/// and listing entries of nodes gone for [`registry::STALE_AFTER`] removed; one round trip.
async fn beat(
    conn: &mut ConnectionManager,
    key: &str,
    record: &NodeRecord,
    timing: HeartbeatTiming,
) -> redis::RedisResult<()> {
    let stale = record
        .heartbeat_at
        .saturating_sub(registry::STALE_AFTER.as_millis() as u64);
    redis::pipe()
        .atomic()
        .pset_ex(key, record.encode(), timing.ttl.as_millis() as u64)
        .ignore()
        .zadd(registry::NODES_KEY, &record.id, record.heartbeat_at)
        .ignore()
        .zrembyscore(registry::NODES_KEY, "-inf", stale)
        .ignore()
        .query_async::<()>(conn)
        .await
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("redis://h:6379/0"), "redis://h:6379/0");
        assert_eq!(redact_url("redis://:pw@h:6379"), "redis://:***@h:6379");
        assert_eq!(redact_url("rediss://u:pw@h"), "rediss://u:***@h");
        assert_eq!(redact_url("redis://tok@h"), "redis://***@h");
    }
}
