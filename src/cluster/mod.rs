//! The cluster control plane on Redis (or Valkey): the node registry and room placement. With
//! `--redis URL` the node writes its [`registry::NodeRecord`] (id, addresses, version, load) as
//! a JSON string with a TTL at `plaza:node:<id>` and lists its id in the sorted set
//! `plaza:nodes`, refreshed by a heartbeat; graceful shutdown deletes both at once, a crash
//! is noticed when the record's TTL runs out. `GET /api/nodes` lists every live record.
//!
//! Redis is never on the media or signaling path: the heartbeat runs in its own task, a
//! failed heartbeat is counted (`/stats` `cluster`, `/metrics`), logged once per outage, and
//! retried with a backoff; the node re-registers as soon as Redis answers again.
//!
//! Room placement ([`placement`]): a room lives on one node, named by its lease
//! `plaza:room:<room>`. A join on any node asks [`ClusterView::place`]; a room without a live
//! lease goes to the least-loaded node, and a join for a room on another node is answered with
//! a redirect there (`redirect` on the WebSocket, `307` for WHIP/WHEP). The heartbeat renews
//! the leases of the rooms this node hosts and drops those it no longer does; a dead node's
//! leases are taken over by the next join. When Redis does not answer, a join is served where
//! it arrives (counted as a fallback): the node keeps working as one.
//!
//! Without `--redis` nothing here runs: no task, no connection.

// The driver side of the registry: the heartbeat task reads the clock (wall time for the
// record's timestamps, monotonic time for the schedule) and shares its counters with the HTTP
// handlers.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

pub mod events;
mod gateway;
pub mod link;
pub mod placement;
pub mod registry;

use crate::sfu::SfuHandle;
use base64::Engine as _;
use redis::AsyncCommands as _;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use registry::{Heartbeat, HeartbeatTiming, LoadSampler, NodeRecord, Transition};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

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
    /// A room with this many participants on its node is extended to the other nodes: a join
    /// through another node is served there, which receives the room's media over the node
    /// link (`--cluster-span-above`; 0: never, every join goes to the room's node).
    pub span_above: usize,
    /// UDP port of the node link (`--cluster-link-port`; 0: an ephemeral port).
    pub link_port: u16,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("redis", &self.redis.as_deref().map(redact_url))
            .field("node_id", &self.node_id)
            .field("node_address", &self.node_address)
            .field("span_above", &self.span_above)
            .field("link_port", &self.link_port)
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
    #[error("cannot open the node link's UDP socket: {0}")]
    Link(std::io::Error),
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
    /// Joins (WebSocket, WHIP, WHEP) for rooms placed on this node.
    pub placed_here: u64,
    /// Joins sent to the room's node on another node.
    pub redirected: u64,
    /// Joins served here because Redis did not answer the placement.
    pub placement_fallbacks: u64,
    /// Rooms placed again because the node holding their lease was gone.
    pub rooms_taken_over: u64,
    /// Heartbeats that found a room hosted here leased to another node (the room runs on two
    /// nodes, e.g. after a Redis outage).
    pub lease_conflicts: u64,
    /// Rooms whose lease this node renewed on its last heartbeat.
    pub leases: u64,
    /// Other nodes heard from over the node link now (authentic datagrams within 3 s).
    pub link_peers_up: u64,
    /// Times a node link peer that was up stopped being so (silent for 3 s, or gone from the
    /// cluster).
    pub link_peer_downs: u64,
    /// Joins served here in a room whose node is another one (the room extended here).
    pub extended_joins: u64,
    /// Messages to other nodes' shards the node link refused (its queue to that node full,
    /// or the node unknown).
    pub link_refused: u64,
    /// Media from other nodes dropped because a shard's queue was full.
    pub link_media_dropped: u64,
    /// Room events published in Redis (`events`), and those dropped (Redis failed).
    pub room_events_published: u64,
    pub room_events_dropped: u64,
}

#[derive(Debug, Default)]
struct Counters {
    registered: AtomicBool,
    heartbeats: AtomicU64,
    failures: AtomicU64,
    outages: AtomicU64,
    placed_here: AtomicU64,
    redirected: AtomicU64,
    fallbacks: AtomicU64,
    taken_over: AtomicU64,
    conflicts: AtomicU64,
    leases: AtomicU64,
    link_up: AtomicU64,
    link_downs: AtomicU64,
    extended: AtomicU64,
    link_refused: Arc<AtomicU64>,
    link_media_dropped: AtomicU64,
    events_published: AtomicU64,
    events_dropped: AtomicU64,
}

/// What the HTTP handlers see of the cluster: the counters and a connection to list nodes.
#[derive(Clone)]
pub struct ClusterView {
    node_id: String,
    /// Carries admin calls to the node that hosts their room.
    http: HttpClient,
    address: String,
    lease_ttl: Duration,
    timing: HeartbeatTiming,
    counters: Arc<Counters>,
    conn: ConnectionManager,
    /// `--cluster-span-above` (0: rooms never span nodes).
    span_above: usize,
    /// This node has a node link (the core's pipes reach it).
    link: bool,
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
            placed_here: c.placed_here.load(Ordering::Relaxed),
            redirected: c.redirected.load(Ordering::Relaxed),
            placement_fallbacks: c.fallbacks.load(Ordering::Relaxed),
            rooms_taken_over: c.taken_over.load(Ordering::Relaxed),
            lease_conflicts: c.conflicts.load(Ordering::Relaxed),
            leases: c.leases.load(Ordering::Relaxed),
            link_peers_up: c.link_up.load(Ordering::Relaxed),
            link_peer_downs: c.link_downs.load(Ordering::Relaxed),
            extended_joins: c.extended.load(Ordering::Relaxed),
            link_refused: c.link_refused.load(Ordering::Relaxed),
            link_media_dropped: c.link_media_dropped.load(Ordering::Relaxed),
            room_events_published: c.events_published.load(Ordering::Relaxed),
            room_events_dropped: c.events_dropped.load(Ordering::Relaxed),
        }
    }

    /// Where a join for `room` is served: here, or on the node that hosts the room. Never
    /// fails: when Redis does not answer within [`REDIS_TIMEOUT`], the room is served here.
    pub async fn place(&self, room: &str, here: placement::LocalLoad) -> Placed {
        let placed = match tokio::time::timeout(REDIS_TIMEOUT, self.try_place(room, here)).await {
            Ok(Ok(placed)) => placed,
            Ok(Err(e)) => {
                debug!(%room, error = %e, "placement: Redis failed, serving the room here");
                self.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
                return Placed::Here;
            }
            Err(_) => {
                debug!(%room, "placement: Redis did not answer in time, serving the room here");
                self.counters.fallbacks.fetch_add(1, Ordering::Relaxed);
                return Placed::Here;
            }
        };
        let counter = match placed {
            Placed::Here => &self.counters.placed_here,
            Placed::Elsewhere { .. } => &self.counters.redirected,
            Placed::Extended { .. } => &self.counters.extended,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        placed
    }

    async fn try_place(
        &self,
        room: &str,
        here: placement::LocalLoad,
    ) -> Result<Placed, redis::RedisError> {
        let key = placement::room_key(room);
        let me = NodeRecord {
            id: self.node_id.clone(),
            address: self.address.clone(),
            media: Vec::new(),
            version: String::new(),
            started_at: 0,
            heartbeat_at: 0,
            ttl_ms: 0,
            load: Default::default(),
            link: None,
        };
        let mut conn = self.conn.clone();
        // A lost race (another node claimed the lease between the read and the write) is read
        // again; three in a row is contention worth a fallback.
        for _ in 0..3 {
            let (holder, spans, ids): (Option<String>, bool, Vec<String>) = redis::pipe()
                .get(&key)
                .exists(placement::span_key(room))
                .zrange(registry::NODES_KEY, 0, -1)
                .query_async(&mut conn)
                .await?;
            let nodes = records(&mut conn, &ids).await?;
            let (node, replacing) = match placement::decide(&me, holder.as_deref(), &nodes) {
                placement::Decision::Keep { node }
                    if !self.dead(&mut conn, &node, &nodes).await? =>
                {
                    // A big room of this node's, extended to every node: a join may go to a
                    // less loaded node, which serves it.
                    if node == self.node_id
                        && spans
                        && let Some(to) = placement::spill(&node, here, self.span_above, &nodes)
                    {
                        debug!(%room, to = %to.id, "placement: the room is big here, the join goes to a less loaded node");
                        return Ok(Placed::Elsewhere {
                            node_id: to.id.clone(),
                            address: to.address.clone(),
                        });
                    }
                    return Ok(self.placed(&node, &nodes, spans));
                }
                // Its node missed heartbeats and does not answer: placed again now, not when
                // its record expires.
                placement::Decision::Keep { node } => {
                    let others: Vec<NodeRecord> =
                        nodes.iter().filter(|n| n.id != node).cloned().collect();
                    let to = placement::least_loaded(&me, &others).id.clone();
                    (to, Some(node))
                }
                placement::Decision::Claim { node, replacing } => (node, replacing),
            };
            let (now, wrote): (String, i64) = redis::cmd("EVAL")
                .arg(placement::CLAIM_SCRIPT)
                .arg(1)
                .arg(&key)
                .arg(replacing.as_deref().unwrap_or(""))
                .arg(&node)
                .arg(self.lease_ttl.as_millis() as u64)
                .query_async(&mut conn)
                .await?;
            if now == node {
                // `wrote == 0`: another join placed it the same way first.
                match replacing {
                    Some(gone) if wrote == 1 => {
                        self.counters.taken_over.fetch_add(1, Ordering::Relaxed);
                        info!(%room, from = %gone, to = %node, "placement: the room's node is gone, room placed again");
                    }
                    None if wrote == 1 => debug!(%room, %node, "placement: new room placed"),
                    _ => {}
                }
                return Ok(self.placed(&node, &nodes, false));
            }
        }
        Err(redis::RedisError::from((
            redis::ErrorKind::Io,
            "the room's lease kept changing",
        )))
    }

    /// The live node, other than this one, that holds `room`'s lease; `None` when this node
    /// holds it, nobody does, or its holder is gone (the call is then answered here). Reads
    /// only: an admin call places no room.
    pub async fn room_node(&self, room: &str) -> Result<Option<NodeRecord>, redis::RedisError> {
        let mut conn = self.conn.clone();
        let fut = async move {
            let holder: Option<String> = conn.get(placement::room_key(room)).await?;
            let Some(holder) = holder.filter(|h| *h != self.node_id) else {
                return Ok(None);
            };
            let record: Option<String> = conn.get(registry::node_key(&holder)).await?;
            Ok(record.and_then(|r| NodeRecord::decode(&r).ok()))
        };
        within_redis_timeout(fut).await
    }

    /// Carries an HTTP call to `node` (same method, path and query, `Authorization` and
    /// `Content-Type`, marked with [`FORWARDED_HEADER`]) and returns its answer.
    pub async fn forward(
        &self,
        node: &NodeRecord,
        method: axum::http::Method,
        path_and_query: &str,
        headers: &axum::http::HeaderMap,
        body: bytes::Bytes,
    ) -> Result<Forwarded, ForwardError> {
        use http_body_util::BodyExt as _;
        let who = || node.id.clone();
        let mut req = axum::http::Request::builder()
            .method(method)
            .uri(format!("http://{}{path_and_query}", node.address))
            .header(FORWARDED_HEADER, &self.node_id);
        for name in [
            axum::http::header::AUTHORIZATION,
            axum::http::header::CONTENT_TYPE,
        ] {
            if let Some(v) = headers.get(&name) {
                req = req.header(name, v);
            }
        }
        let req =
            req.body(http_body_util::Full::new(body))
                .map_err(|e| ForwardError::Unreachable {
                    node: who(),
                    reason: e.to_string(),
                })?;
        let call = async {
            let res = self
                .http
                .request(req)
                .await
                .map_err(|e| ForwardError::Unreachable {
                    node: who(),
                    reason: e.to_string(),
                })?;
            let (parts, body) = res.into_parts();
            let body = http_body_util::Limited::new(body, MAX_FORWARDED_ANSWER)
                .collect()
                .await
                .map_err(|e| ForwardError::BadAnswer {
                    node: who(),
                    reason: e.to_string(),
                })?
                .to_bytes();
            let headers = [
                axum::http::header::CONTENT_TYPE,
                axum::http::header::WWW_AUTHENTICATE,
            ]
            .iter()
            .filter_map(|n| {
                parts
                    .headers
                    .get(n)
                    .map(|v| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            })
            .collect();
            Ok(Forwarded {
                status: parts.status.as_u16(),
                headers,
                body,
            })
        };
        tokio::time::timeout(FORWARD_TIMEOUT, call)
            .await
            .unwrap_or_else(|_| Err(ForwardError::Timeout { node: who() }))
    }

    /// Opens a long-lived `GET path_and_query` on `node` with `token` as its bearer token (a
    /// stream: only the response head is bounded by [`FORWARD_TIMEOUT`]), marked with
    /// [`FORWARDED_HEADER`].
    pub async fn open_stream(
        &self,
        node: &NodeRecord,
        path_and_query: &str,
        token: &str,
    ) -> Result<axum::http::Response<hyper::body::Incoming>, ForwardError> {
        let who = || node.id.clone();
        let req = axum::http::Request::builder()
            .method(axum::http::Method::GET)
            .uri(format!("http://{}{path_and_query}", node.address))
            .header(FORWARDED_HEADER, &self.node_id)
            .header(axum::http::header::ACCEPT, "text/event-stream")
            .header(axum::http::header::AUTHORIZATION, format!("Bearer {token}"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .map_err(|e| ForwardError::Unreachable {
                node: who(),
                reason: e.to_string(),
            })?;
        match tokio::time::timeout(FORWARD_TIMEOUT, self.http.request(req)).await {
            Ok(Ok(res)) => Ok(res),
            Ok(Err(e)) => Err(ForwardError::Unreachable {
                node: who(),
                reason: e.to_string(),
            }),
            Err(_) => Err(ForwardError::Timeout { node: who() }),
        }
    }

    /// Whether `node` (another node, holding a room's lease) is dead: its record is late (see
    /// [`placement::suspect`]) and its `/healthz` does not answer within [`PROBE_TIMEOUT`]. A
    /// live node costs one `PTTL`.
    async fn dead(
        &self,
        conn: &mut ConnectionManager,
        node: &str,
        nodes: &[NodeRecord],
    ) -> Result<bool, redis::RedisError> {
        if node == self.node_id {
            return Ok(false);
        }
        let pttl: i64 = conn.pttl(registry::node_key(node)).await?;
        if !placement::suspect(pttl, self.timing.ttl, self.timing.interval) {
            return Ok(false);
        }
        let Some(record) = nodes.iter().find(|n| n.id == node) else {
            return Ok(false);
        };
        let req = axum::http::Request::builder()
            .uri(format!("http://{}/healthz", record.address))
            .header(FORWARDED_HEADER, &self.node_id)
            .body(http_body_util::Full::new(bytes::Bytes::new()));
        let Ok(req) = req else {
            return Ok(false);
        };
        let alive = matches!(
            tokio::time::timeout(PROBE_TIMEOUT, self.http.request(req)).await,
            Ok(Ok(res)) if res.status().is_success()
        );
        if !alive {
            info!(%node, pttl_ms = pttl, "placement: a node late with its heartbeat does not answer: its rooms are placed again");
        }
        Ok(!alive)
    }

    fn placed(&self, node: &str, nodes: &[NodeRecord], spans: bool) -> Placed {
        if node == self.node_id {
            return Placed::Here;
        }
        let record = nodes.iter().find(|n| n.id == node);
        // Extended here: the room's node said it spans nodes, and both ends have a link.
        if spans
            && self.link
            && let Some(info) = record.and_then(|n| n.link.as_ref())
        {
            return Placed::Extended {
                node_id: node.to_owned(),
                entry: crate::sfu::pipe::node_entry(info.num),
            };
        }
        match record {
            Some(n) => Placed::Elsewhere {
                node_id: n.id.clone(),
                address: n.address.clone(),
            },
            // Listed a moment ago; gone since: served here (its lease is taken over later).
            None => Placed::Here,
        }
    }

    /// A join made `room` this big on this node: past `--cluster-span-above`, the room is
    /// marked as extended to every node at once (the heartbeat renews the mark while it stays
    /// that big). Bounded by [`REDIS_TIMEOUT`]; a failure only delays the mark.
    pub async fn note_room_size(&self, room: &str, size: usize) {
        if self.span_above == 0 || size < self.span_above {
            return;
        }
        let mut conn = self.conn.clone();
        let ttl = self.lease_ttl.as_millis() as u64;
        let set = conn.pset_ex::<_, _, ()>(placement::span_key(room), 1, ttl);
        if let Err(e) = within_redis_timeout(set).await {
            debug!(%room, error = %e, "cluster: could not mark the room as extended");
        }
    }

    /// Every live node's record (those whose TTL has not run out), by id.
    pub async fn nodes(&self) -> Result<Vec<NodeRecord>, redis::RedisError> {
        let mut conn = self.conn.clone();
        within_redis_timeout(async move { live_nodes(&mut conn).await }).await
    }
}

/// `fut`, failing with an I/O error when Redis does not answer within [`REDIS_TIMEOUT`].
async fn within_redis_timeout<T>(
    fut: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> redis::RedisResult<T> {
    tokio::time::timeout(REDIS_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| {
            Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "Redis did not answer in time",
            )))
        })
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
>;

/// The header a node puts on an admin call it carries to another node: that node answers it
/// itself (a call is carried at most once).
pub const FORWARDED_HEADER: &str = "x-plaza-forwarded-by";
/// The header on an answer that another node gave: its id.
pub const NODE_HEADER: &str = "x-plaza-node";
/// How long a suspect node has to answer its health probe.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(300);
/// How long a carried admin call may take.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest answer body taken from another node.
const MAX_FORWARDED_ANSWER: usize = 4 * 1024 * 1024;

/// Why an admin call could not be carried to another node.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("node {node} did not answer in time")]
    Timeout { node: String },
    #[error("node {node} could not be reached: {reason}")]
    Unreachable { node: String, reason: String },
    #[error("node {node}'s answer is too large or broken: {reason}")]
    BadAnswer { node: String, reason: String },
}

/// Another node's answer to a carried call.
#[derive(Debug)]
pub struct Forwarded {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: bytes::Bytes,
}

/// Where a join is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placed {
    Here,
    /// On another node: the client is sent there.
    Elsewhere {
        node_id: String,
        address: String,
    },
    /// Here, in a room whose node is another one (`node_id`): the room is extended here, its
    /// home reached through that node's entry `entry` on the node link.
    Extended {
        node_id: String,
        entry: crate::sfu::pipe::ShardId,
    },
}

/// The live records of the nodes `ids` (those whose TTL has not run out), by id.
async fn records(
    conn: &mut ConnectionManager,
    ids: &[String],
) -> Result<Vec<NodeRecord>, redis::RedisError> {
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
}

/// The running registry: its heartbeat task. [`Registry::deregister`] removes the node at
/// once; dropping it without that stops the heartbeat only (as a crash would: the record
/// expires after its TTL).
#[derive(Debug)]
pub struct Registry {
    view: ClusterView,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    /// Carries the rooms' pipes between this node and the others (ends with the registry).
    gateway: Option<JoinHandle<()>>,
    /// Publishes room events ([`Registry::publish_room_events`]).
    events: Option<JoinHandle<()>>,
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
            link: None,
        };
        // The node link's socket, on the media bind address (`--cluster-link-port`, or an
        // ephemeral port; published in the record), and this start's key.
        let link_ip = node
            .udp_addrs
            .first()
            .map_or(node.http_addr.ip(), |a| a.ip());
        // Buffers as big as the media sockets': a burst of relayed media must not overflow them.
        let socket = std::net::UdpSocket::bind(SocketAddr::new(link_ip, config.link_port))
            .and_then(|s| s.set_nonblocking(true).map(|()| s))
            .inspect(|s| {
                crate::io::set_socket_buffers(s, crate::io::UDP_BUFFER_DEFAULT);
            })
            .and_then(tokio::net::UdpSocket::from_std)
            .map_err(ClusterError::Link)?;
        let (key, salt) = link::driver::random_key_and_salt();
        let num = rand::random::<u32>();
        let link = link::driver::spawn(
            link::Link::new(link::LinkConfig::new(num, key, salt)),
            socket,
        )
        .map_err(ClusterError::Link)?;
        let mut record = record;
        record.link = Some(registry::LinkInfo {
            address: SocketAddr::new(ip, link.local_addr.port()).to_string(),
            num,
            key: base64::engine::general_purpose::STANDARD.encode(key),
        });
        let view = ClusterView {
            node_id: id.clone(),
            http: hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http(),
            address: record.address.clone(),
            // Longer than the record's: a dead node's leases outlive its record, so the next
            // join sees the holder gone and takes the room over (counted, logged).
            lease_ttl: timing.ttl * 2,
            timing,
            counters: Arc::default(),
            conn: conn.clone(),
            span_above: config.span_above,
            link: true,
        };
        // The gateway between the shards' pipes and the link.
        let mut link = link;
        let (removed_tx, removed_rx) = tokio::sync::mpsc::unbounded_channel();
        let gateway = tokio::spawn(tracing::Instrument::instrument(
            gateway::run(
                gateway::Gateway::new(
                    handle.clone(),
                    handle.take_node_pipe(),
                    num,
                    link.sender(),
                    Arc::clone(&view.counters),
                ),
                link.take_events(),
                removed_rx,
            ),
            tracing::info_span!("gateway", node = %id),
        ));
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
                link,
                removed_tx,
                config.span_above,
            ),
            span,
        ));
        info!(node = %id, redis = %redact_url(url), "cluster: registering in Redis");
        Ok(Some(Registry {
            view,
            stop,
            task: Some(task),
            gateway: Some(gateway),
            events: None,
        }))
    }

    pub fn view(&self) -> ClusterView {
        self.view.clone()
    }

    /// Publishes the room events that arrive on `rx` in Redis ([`events`]), until it closes.
    pub fn publish_room_events(&mut self, rx: tokio::sync::mpsc::Receiver<crate::webhook::Event>) {
        let task = tokio::spawn(events::run(
            self.view.node_id.clone(),
            self.view.conn.clone(),
            rx,
            Arc::clone(&self.view.counters),
        ));
        self.events = Some(task);
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
        for task in [self.task.take(), self.gateway.take(), self.events.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The process's CPU time (user + system) in clock ticks
/// (`crate::http::metrics::CLOCK_TICKS_PER_S` a second).
pub fn cpu_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let (user, system) = crate::http::metrics::parse_stat_times(&stat)?;
    Some(user + system)
}

#[allow(clippy::too_many_arguments)] // one call site: the task's whole state, handed over once
async fn heartbeat_loop(
    mut record: NodeRecord,
    mut conn: ConnectionManager,
    handle: SfuHandle,
    timing: HeartbeatTiming,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
    link: link::driver::LinkHandle,
    removed: tokio::sync::mpsc::UnboundedSender<link::NodeNum>,
    span_above: usize,
) {
    // The link's peers (the other live nodes' ends, from their records); the gateway learns
    // of those removed.
    let mut peers = Peers::default();
    let mut hb = Heartbeat::new(timing, std::time::Instant::now());
    let mut sampler = LoadSampler::default();
    let key = registry::node_key(&record.id);
    // The rooms whose lease the last successful heartbeat renewed, and those found leased to
    // another node (logged once each).
    let mut leased: HashSet<String> = HashSet::new();
    let mut conflicted: HashSet<String> = HashSet::new();
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
        // The rooms whose home is here (not those extended here from another node), and those
        // big enough to be extended to every node.
        let mut homed = handle.homed_rooms();
        homed.sort();
        let spans: Vec<String> = homed
            .iter()
            .filter(|(_, n)| span_above > 0 && *n >= span_above)
            .map(|(r, _)| r.clone())
            .collect();
        let rooms: Vec<String> = homed.into_iter().map(|(r, _)| r).collect();
        let released: Vec<String> = leased
            .iter()
            .filter(|r| rooms.binary_search(r).is_err())
            .cloned()
            .collect();
        let mut error = None;
        let mut holders = Vec::new();
        // A failed command makes the connection manager reconnect; the first command after
        // Redis returns may still see the old error, so a failure is retried once at once (it
        // waits for that reconnection).
        for _ in 0..2 {
            let result = tokio::time::timeout(
                REDIS_TIMEOUT,
                beat(&mut conn, &key, &record, timing, &rooms, &released, &spans),
            )
            .await;
            error = match result {
                Ok(Ok(h)) => {
                    holders = h;
                    None
                }
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some("Redis did not answer in time".to_owned()),
            };
            if error.is_none() {
                break;
            }
        }
        let ok = error.is_none();
        if ok {
            note_leases(&record.id, &rooms, &holders, &counters, &mut conflicted);
            leased = rooms.into_iter().collect();
            if let Ok(Ok(nodes)) = tokio::time::timeout(REDIS_TIMEOUT, live_nodes(&mut conn)).await
            {
                sync_peers(&record.id, &nodes, &mut peers, timing.ttl, &removed, &link).await;
            }
        }
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
        let mut pipe = redis::pipe();
        pipe.atomic()
            .del(&key)
            .ignore()
            .zrem(registry::NODES_KEY, &id)
            .ignore();
        // The rooms' leases go too: their next joins place them on a live node at once.
        for room in &leased {
            release(&mut pipe, room, &id);
        }
        pipe.query_async::<()>(&mut conn).await
    };
    match tokio::time::timeout(REDIS_TIMEOUT, gone).await {
        Ok(Ok(())) => info!("cluster: deregistered"),
        Ok(Err(e)) => warn!(error = %e, "cluster: could not deregister (the record expires)"),
        Err(_) => warn!("cluster: Redis did not answer the deregistration (the record expires)"),
    }
}

/// One heartbeat: the record with its TTL, the listing entry scored by the heartbeat time,
/// listing entries of nodes gone for [`registry::STALE_AFTER`] removed, the leases of `rooms`
/// (hosted here) renewed and those of `released` (no longer hosted) dropped; one round trip.
/// Returns each of `rooms`' lease holder after the renewal (this node, or another one).
async fn beat(
    conn: &mut ConnectionManager,
    key: &str,
    record: &NodeRecord,
    timing: HeartbeatTiming,
    rooms: &[String],
    released: &[String],
    spans: &[String],
) -> redis::RedisResult<Vec<String>> {
    let stale = record
        .heartbeat_at
        .saturating_sub(registry::STALE_AFTER.as_millis() as u64);
    let ttl = timing.ttl.as_millis() as u64;
    let lease_ttl = ttl * 2;
    let mut pipe = redis::pipe();
    pipe.atomic()
        .pset_ex(key, record.encode(), ttl)
        .ignore()
        .zadd(registry::NODES_KEY, &record.id, record.heartbeat_at)
        .ignore()
        .zrembyscore(registry::NODES_KEY, "-inf", stale)
        .ignore();
    for room in rooms {
        pipe.cmd("EVAL")
            .arg(placement::RENEW_SCRIPT)
            .arg(1)
            .arg(placement::room_key(room))
            .arg(&record.id)
            .arg(lease_ttl);
    }
    for room in released {
        release(&mut pipe, room, &record.id);
    }
    for room in spans {
        pipe.pset_ex(placement::span_key(room), 1, lease_ttl)
            .ignore();
    }
    pipe.query_async::<Vec<String>>(conn).await
}

/// Every live node's record.
async fn live_nodes(conn: &mut ConnectionManager) -> Result<Vec<NodeRecord>, redis::RedisError> {
    let ids: Vec<String> = conn.zrange(registry::NODES_KEY, 0, -1).await?;
    records(conn, &ids).await
}

/// The link's peers, as the heartbeat keeps them in step with the live records.
#[derive(Default)]
struct Peers {
    /// Node id → its link end.
    ends: HashMap<String, registry::LinkInfo>,
    /// Node id → since when a peer has been missing from the listing.
    missing: HashMap<String, std::time::Instant>,
}

/// Points the node link at the other live nodes' ends: new or changed ones are set, and those
/// missing from the listing for `grace` (the record TTL) removed. A node missing for less is
/// kept: after Redis restarts empty, every node is missing until its next heartbeat, and the
/// rooms spanning nodes must not be torn apart for that (a node that really died goes silent on
/// the link, which reports it down by itself).
async fn sync_peers(
    me: &str,
    nodes: &[NodeRecord],
    peers: &mut Peers,
    grace: Duration,
    removed: &tokio::sync::mpsc::UnboundedSender<link::NodeNum>,
    handle: &link::driver::LinkHandle,
) {
    use base64::Engine as _;
    let now = std::time::Instant::now();
    let Peers {
        ends: peers,
        missing,
    } = peers;
    let mut seen = HashSet::new();
    for n in nodes.iter().filter(|n| n.id != me) {
        let Some(info) = &n.link else { continue };
        seen.insert(n.id.clone());
        if peers.get(&n.id) == Some(info) {
            continue;
        }
        let key = base64::engine::general_purpose::STANDARD
            .decode(&info.key)
            .ok()
            .and_then(|k| <link::seal::Key>::try_from(k).ok());
        let (Some(key), Ok(addr)) = (key, info.address.parse::<SocketAddr>()) else {
            warn!(node = %n.id, "node link: the node's record has no usable link end");
            continue;
        };
        if let Some(old) = peers.insert(n.id.clone(), info.clone())
            && old.num != info.num
        {
            handle.remove_peer(old.num).await;
            let _ = removed.send(old.num);
        }
        debug!(node = %n.id, %addr, "node link: peer set");
        handle.set_peer(info.num, addr, key).await;
    }
    missing.retain(|id, _| !seen.contains(id) && peers.contains_key(id));
    let gone: Vec<String> = peers
        .keys()
        .filter(|id| !seen.contains(*id))
        .filter(|id| now.duration_since(*missing.entry((*id).clone()).or_insert(now)) >= grace)
        .cloned()
        .collect();
    for id in gone {
        missing.remove(&id);
        if let Some(info) = peers.remove(&id) {
            handle.remove_peer(info.num).await;
            let _ = removed.send(info.num);
            debug!(node = %id, "node link: peer removed (gone from the cluster)");
        }
    }
}

/// Adds the deletion of `room`'s lease, if `node` holds it, to `pipe` (its reply ignored).
fn release(pipe: &mut redis::Pipeline, room: &str, node: &str) {
    pipe.cmd("EVAL")
        .arg(placement::RELEASE_SCRIPT)
        .arg(1)
        .arg(placement::room_key(room))
        .arg(node)
        .ignore();
}

/// Counts the leases renewed and the rooms found leased to another node (a warning the first
/// time for each room).
fn note_leases(
    me: &str,
    rooms: &[String],
    holders: &[String],
    counters: &Counters,
    conflicted: &mut HashSet<String>,
) {
    let mut mine = 0;
    for (room, holder) in rooms.iter().zip(holders) {
        if holder == me {
            mine += 1;
            conflicted.remove(room);
            continue;
        }
        counters.conflicts.fetch_add(1, Ordering::Relaxed);
        if conflicted.insert(room.clone()) {
            warn!(%room, other = %holder, "placement: a room hosted here is leased to another node; its participants are split between the two");
        }
    }
    conflicted.retain(|r| rooms.binary_search(r).is_ok());
    counters.leases.store(mine, Ordering::Relaxed);
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
