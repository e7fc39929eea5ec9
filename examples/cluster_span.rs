//! Rooms that span two nodes: what the node-to-node hop adds to a packet's latency, and how
//! many livestream viewers one node and two nodes serve, with the release binary as processes
//! and a real `redis-server`.
//!
//! ```sh
//! cargo build --release --bin plaza --example cluster_span
//! ./target/release/examples/cluster_span [--viewers 200,400,600,800,1000,1200,1400] [--duration 10] \
//!     [--out bench/results]
//! ```
//!
//! Every node runs with `--redis`, `--cluster-span-above 1` (a room with one participant on
//! its node is extended to the others) and `--workers 1`.
//!
//! A is the room's node: the one that serves the publisher (a new room goes to the least
//! loaded node, which need not be the one the publisher connected to); B is the other.
//!
//! 1. **Latency of the hop.** Nodes A and B (not pinned). A publisher on A (Opus + VP8
//!    320x240, no simulcast; webrtc-rs). A probe subscriber (webrtc-rs) joins through A, is
//!    measured `--duration` s and leaves; then one joins through B (served there: the room is
//!    extended to B, every packet crosses the node link once) and is measured as long; twice
//!    each, alternating. Latency is publisher `write_rtp` → subscriber track delivery of the
//!    same packet (`testkit/src/probe.rs`), both webrtc-rs stacks included; B's minus A's is
//!    the hop. One subscriber at a time, because the probe matches packets per track and the
//!    track is the same on both nodes.
//! 2. **Viewers on one node and on two.** One publisher on A (Opus + simulcast VP8, the
//!    viewers on the top layer), N light viewers (`testkit/src/lightviewer.rs`: real ICE and
//!    DTLS, then SRTP only counted). (a) one node serves all N, pinned to CPU 0, the load
//!    generator (this process) pinned to CPU 1; (b) two nodes, one pinned to CPU 0 and the
//!    other to CPU 1, half the viewers joining through A and half through B, the generator on
//!    both CPUs (there is no third). For every point: forwarded packets/s and CPU per forwarded packet per node
//!    (`/proc/<pid>` CPU time ÷ its `rtp_packets_forwarded`), in-core latency, viewer loss and
//!    delivery, the generator's CPU. N steps through `--viewers`; a setup stops after its
//!    first point with loss > 1 %, forwarded < 97 % of what is due, or a viewer that could not
//!    join or was dropped (the knee).
//!
//! Prints the tables and writes `<out>/<date>-<commit>-cluster-span.md`.

// A measuring tool: shares viewers between tasks, reads the clock and prints its results.
#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    clippy::print_stdout
)]

use anyhow::{Context, Result, bail};
use clap::Parser;
use futures_util::StreamExt;
use plaza_testkit::lightviewer::{self, LightOptions, LightViewer};
use plaza_testkit::measure::{self, ClientTotals, Sample, ServerSource, WindowStats};
use plaza_testkit::redis::RedisServer;
use plaza_testkit::{Peer, PeerOptions, affinity, probe};
use serde_json::Value;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(about = "Rooms spanning two Plaza nodes: the hop's latency, viewers on 1 vs 2 nodes")]
struct Args {
    /// Viewer counts of part 2, in order (`0`: part 1 only).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "200,400,600,800,1000,1200,1400"
    )]
    viewers: Vec<usize>,
    /// Measured seconds per latency window and per viewer point.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Directory of the result file (`<date>-<commit>-cluster-span.md`); `-`: print only.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

const TIMEOUT: Duration = Duration::from_secs(20);
const JOIN_CONCURRENCY: usize = 8;
/// Joins of one point stop after this (a point whose viewers did not all join is the knee).
const JOIN_BUDGET: Duration = Duration::from_secs(60);
/// No new point of a setup starts after this (the whole run stays near 10 minutes).
const SETUP_BUDGET: Duration = Duration::from_secs(240);
/// Seconds between "everyone receives" and a measurement.
const WARMUP: Duration = Duration::from_secs(3);

// ───────────────────────────── nodes ─────────────────────────────

struct Node {
    child: Child,
    port: u16,
    /// `A`: the room's node (where the publisher is served), `B`: the other.
    name: &'static str,
    cpus: Option<Vec<usize>>,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/rtc", self.port)
    }

    fn source(&self) -> ServerSource {
        ServerSource::plaza(&self.ws_url(), Some(self.child.id()), None)
    }

    async fn stats(&self) -> Result<Value> {
        let (status, body) =
            plaza_testkit::support::http_get(([127, 0, 0, 1], self.port).into(), "/stats").await?;
        if status != 200 {
            bail!("{}: /stats {status}", self.name);
        }
        Ok(serde_json::from_str(&body)?)
    }

    async fn cluster(&self) -> Result<Value> {
        Ok(self.stats().await?["cluster"].clone())
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn plaza_bin() -> PathBuf {
    if let Ok(p) = std::env::var("PLAZA_BIN") {
        return p.into();
    }
    // target/release/examples/cluster_span → target/release/plaza
    std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.parent()?.join("plaza")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| "target/release/plaza".into())
}

fn start_node(
    redis: &RedisServer,
    name: &'static str,
    id: &str,
    cpus: Option<&[usize]>,
    logs: &Path,
) -> Result<Node> {
    let bin = plaza_bin();
    let port = free_port();
    let log = std::fs::File::create(logs.join(format!("{id}.log")))?;
    let mut cmd = Command::new(&bin);
    cmd.args(["--port", &port.to_string(), "--udp-port", "0"])
        .args(["--tcp-port", "off", "--workers", "1"])
        .args(["--log-level", "warn"])
        // Every viewer connects from 127.0.0.1 and joins one room: no per-address connection
        // cap (64 by default) or join rate, no room size limit.
        .args([
            "--max-connections-per-ip",
            "4096",
            "--max-joins-per-ip",
            "0",
        ])
        .args(["--max-participants-per-room", "0"])
        .args(["--redis", &redis.url(), "--node-id", id])
        .args(["--cluster-span-above", "1"])
        .env_remove("PLAZA_API_KEY")
        .env_remove("PLAZA_API_SECRET")
        .env_remove("PLAZA_CONFIG")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if let Some(cpus) = cpus {
        affinity::pin_command(&mut cmd, cpus);
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(Node {
        child,
        port,
        name,
        cpus: cpus.map(<[usize]>::to_vec),
    })
}

async fn wait_until<F, Fut>(what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + TIMEOUT;
    while Instant::now() < deadline {
        if check().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("{what}: not within {TIMEOUT:?}")
}

/// Starts a fresh `redis-server` and the nodes (`cpus[i]` for node i), and waits until each
/// node's link reaches all the others.
async fn cluster(
    tag: &str,
    cpus: &[Option<Vec<usize>>],
    logs: &Path,
) -> Result<(RedisServer, Vec<Node>)> {
    let redis = RedisServer::start()?;
    let mut nodes = Vec::new();
    for (i, c) in cpus.iter().enumerate() {
        let name = ["A", "B"][i];
        nodes.push(start_node(
            &redis,
            name,
            &format!("ND_{tag}_{name}"),
            c.as_deref(),
            logs,
        )?);
    }
    for n in &nodes {
        wait_until(&format!("node {} up", n.name), || async {
            n.cluster().await.is_ok_and(|c| c["registered"] == true)
        })
        .await?;
    }
    let others = nodes.len() as u64 - 1;
    for n in &nodes {
        wait_until(&format!("node {}'s link up", n.name), || async {
            n.cluster()
                .await
                .is_ok_and(|c| c["link_peers_up"].as_u64() == Some(others))
        })
        .await?;
    }
    Ok((redis, nodes))
}

/// Puts the node that serves `publisher` first and names the nodes `A` (the room's node) and
/// `B`: a new room is placed on the least loaded node (participants, rooms, then CPU), which
/// need not be the one the publisher connected to.
fn home_first(nodes: &mut [Node], publisher: &Peer) -> Result<()> {
    let Some(home) = nodes.iter().position(|n| n.ws_url() == publisher.url()) else {
        bail!(
            "the publisher ended on {}, not a node of this run",
            publisher.url()
        );
    };
    nodes.swap(0, home);
    for (n, name) in nodes.iter_mut().zip(["A", "B"]) {
        n.name = name;
    }
    Ok(())
}

fn node_label(n: &Node) -> String {
    match &n.cpus {
        Some(c) => format!("{} (CPU {})", n.name, affinity::format_cpus(c)),
        None => n.name.to_owned(),
    }
}

// ───────────────────────────── helpers ─────────────────────────────

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

/// Busy and total jiffies of all CPUs (`/proc/stat`).
fn machine_jiffies() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = text
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4)?;
    Some((total - idle, total))
}

/// CPU the whole machine used between two [`machine_jiffies`], % of one CPU.
fn machine_percent(a: Option<(u64, u64)>, b: Option<(u64, u64)>) -> Option<f64> {
    let ((busy0, total0), (busy1, total1)) = (a?, b?);
    let total = total1.checked_sub(total0).filter(|&t| t > 0)?;
    Some(100.0 * (busy1 - busy0) as f64 / total as f64 * affinity::online_cpus() as f64)
}

fn command_output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Restricts every thread of this process (the load generator) to `cpus`.
fn pin_generator(cpus: &[usize]) -> Result<()> {
    let list = affinity::format_cpus(cpus);
    let pid = std::process::id().to_string();
    let status = Command::new("taskset")
        .args(["-a", "-p", "-c", &list, &pid])
        .stdout(Stdio::null())
        .status()
        .context("taskset")?;
    if !status.success() {
        bail!("taskset -a -p -c {list} {pid}: {status}");
    }
    Ok(())
}

fn quantile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    f64::from(sorted[((sorted.len() - 1) as f64 * p).round() as usize]) / 1000.0
}

fn in_core(w: &WindowStats) -> String {
    w.server_forward_latency_us.map_or("n/a".into(), |l| {
        format!("{:.2} / {:.2}", l.p50 as f64 / 1e3, l.p99 as f64 / 1e3)
    })
}

fn pct(v: Option<f64>) -> String {
    v.map_or("n/a".into(), |v| format!("{v:.0}%"))
}

// ───────────────────────────── part 1: latency ─────────────────────────────

struct LatencyRow {
    side: &'static str,
    latencies_us: Vec<u32>,
    counts: probe::WindowCounts,
    /// In-core p50 / p99 of node A and node B over this side's windows.
    in_core: Vec<String>,
    windows: usize,
}

async fn latency(args: &Args, logs: &Path, md: &mut String) -> Result<()> {
    pin_generator(&(0..affinity::online_cpus()).collect::<Vec<_>>())?;
    let load = loadavg();
    let (_redis, mut nodes) = cluster("lat", &[None, None], logs).await?;
    probe::reset();
    probe::enable();
    let room = format!("span-latency-{:x}", rand::random::<u32>());
    let quiet = |o: PeerOptions| PeerOptions {
        timeout: TIMEOUT,
        keep_recent_packets: 0,
        max_kept_messages: 1,
        ..o
    };
    let publisher = Arc::new(
        Peer::connect(
            &nodes[0].ws_url(),
            &room,
            "publisher",
            quiet(PeerOptions::publisher()),
        )
        .await?,
    );
    home_first(&mut nodes, &publisher)?;
    let (a, b) = (&nodes[0], &nodes[1]);
    let mut rows = ["A", "B"].map(|side| LatencyRow {
        side,
        latencies_us: Vec::new(),
        counts: probe::WindowCounts::default(),
        in_core: Vec::new(),
        windows: 0,
    });
    for round in 0..2 {
        for (i, node) in [a, b].into_iter().enumerate() {
            let name = format!("probe-{}-{round}", node.name);
            let sub = Arc::new(
                Peer::connect(
                    &node.ws_url(),
                    &room,
                    &name,
                    quiet(PeerOptions::subscriber()),
                )
                .await?,
            );
            if sub.redirects() != 0 || sub.url() != node.ws_url() {
                bail!("{name} was redirected to {}", sub.url());
            }
            sub.wait_for_tracks(2, TIMEOUT).await?;
            measure::map_plaza_probe(&[publisher.clone(), sub.clone()]);
            tokio::time::sleep(WARMUP).await;
            let (sa, sb) = (a.source(), b.source());
            let (a0, b0) = (
                sa.sample(ClientTotals::default()).await,
                sb.sample(ClientTotals::default()).await,
            );
            probe::start_window();
            tokio::time::sleep(Duration::from_secs(args.duration)).await;
            let w = probe::take_window();
            let (a1, b1) = (
                sa.sample(ClientTotals::default()).await,
                sb.sample(ClientTotals::default()).await,
            );
            let row = &mut rows[i];
            row.windows += 1;
            row.latencies_us.extend(w.latencies_us);
            let c = &mut row.counts;
            c.sent += w.counts.sent;
            c.received += w.counts.received;
            c.matched += w.counts.matched;
            c.unmapped += w.counts.unmapped;
            c.unmatched += w.counts.unmatched;
            c.stale += w.counts.stale;
            row.in_core.push(format!(
                "A {} · B {}",
                in_core(&measure::window(&a0, &a1)),
                in_core(&measure::window(&b0, &b1))
            ));
            let _ = tokio::time::timeout(Duration::from_secs(3), sub.leave()).await;
        }
    }
    let (ca, cb) = (a.cluster().await?, b.cluster().await?);
    let _ = tokio::time::timeout(Duration::from_secs(3), publisher.leave()).await;

    let mut t = String::new();
    writeln!(
        t,
        "| probe subscriber | windows × s | packets matched / received | p50 ms | p90 ms | p99 ms | max ms | in-core p50 / p99 ms per window (A · B) |"
    )?;
    writeln!(t, "|---|---:|---:|---:|---:|---:|---:|---|")?;
    let mut q = Vec::new();
    for row in &mut rows {
        row.latencies_us.sort_unstable();
        let l = &row.latencies_us;
        q.push([0.5, 0.99].map(|p| quantile(l, p)));
        writeln!(
            t,
            "| through {} ({}) | {} × {} | {} / {} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
            row.side,
            if row.side == "A" {
                "the publisher's node"
            } else {
                "the room extended to B: over the node link"
            },
            row.windows,
            args.duration,
            row.counts.matched,
            row.counts.received,
            quantile(l, 0.5),
            quantile(l, 0.9),
            quantile(l, 0.99),
            quantile(l, 1.0),
            row.in_core.join("; ")
        )?;
    }
    writeln!(
        t,
        "| **the hop (B − A)** | | | **{:+.2}** | | **{:+.2}** | | |",
        q[1][0] - q[0][0],
        q[1][1] - q[0][1]
    )?;
    let summary = format!(
        "Node B's counters: `extended_joins` {}, `placed_here` {}, `redirected` {}, \
         `link_media_dropped` {}; node A's: `placed_here` {}, `redirected` {}, `link_refused` {}",
        cb["extended_joins"],
        cb["placed_here"],
        cb["redirected"],
        cb["link_media_dropped"],
        ca["placed_here"],
        ca["redirected"],
        ca["link_refused"]
    );

    println!("\n{t}\n{summary}\n");
    writeln!(
        md,
        "## 1. Added latency of the node-to-node hop\n\n\
         Publisher on A: Opus + VP8 320x240, **not simulcast** (webrtc-rs). One probe subscriber \
         at a time, through A or through B, alternating (A, B, A, B), {} s each after {} s of \
         warm-up. Nodes and generator not pinned. 1-min load average before: {load}.\n\n{t}\n{summary}.\n",
        args.duration,
        WARMUP.as_secs()
    )?;
    Ok(())
}

// ───────────────────────────── part 2: viewers ─────────────────────────────

/// Packets the publisher's top layer (or plain track) sent, summed over its tracks.
fn top_layer_sent(p: &Peer) -> u64 {
    p.local_tracks()
        .iter()
        .map(|t| {
            t.layers
                .iter()
                .max_by_key(|l| u32::from(l.width) * u32::from(l.height))
                .filter(|_| t.layers.len() > 1)
                .map_or(t.counters.packets, |l| l.counters.packets)
        })
        .sum()
}

fn totals(publisher: &Peer, viewers: &[Arc<LightViewer>]) -> ClientTotals {
    let mut t = ClientTotals {
        peers: viewers.len() as u64,
        packets_due: top_layer_sent(publisher) * viewers.len() as u64,
        ..ClientTotals::default()
    };
    for v in viewers {
        t.packets_received += v.stats.received();
        t.packets_expected += v.stats.expected();
        t.peers_removed += u64::from(v.ended().is_some());
    }
    t
}

struct NodeResult {
    node: String,
    /// The node's viewers' joins, WebSocket connect → connected (ICE + DTLS), ms.
    join_ms: measure::Summary,
    viewers: usize,
    w: WindowStats,
    due: u64,
    received: u64,
}

struct ViewerPoint {
    setup: &'static str,
    n: usize,
    load: String,
    nodes: Vec<NodeResult>,
    generator_cpu: Option<f64>,
    generator_wait: Option<f64>,
    /// Everything else on the machine (other processes, the kernel's softirqs not charged to
    /// the nodes or the generator), % of one CPU.
    others_cpu: Option<f64>,
    receive_thread_us: Option<f64>,
    failures: Vec<String>,
    extended: String,
    knee: bool,
}

async fn viewer_point(two: bool, n: usize, args: &Args, logs: &Path) -> Result<ViewerPoint> {
    let cpus: Vec<Option<Vec<usize>>> = if two {
        vec![Some(vec![0]), Some(vec![1])]
    } else {
        vec![Some(vec![0])]
    };
    pin_generator(&if two { vec![0, 1] } else { vec![1] })?;
    let tag = format!("{}{n}", if two { "two" } else { "one" });
    let (_redis, mut nodes) = cluster(&tag, &cpus, logs).await?;
    let room = format!("span-viewers-{tag}-{:x}", rand::random::<u32>());
    let publisher = Peer::connect(
        &nodes[0].ws_url(),
        &room,
        "host",
        PeerOptions {
            timeout: TIMEOUT,
            keep_recent_packets: 0,
            max_kept_messages: 1,
            ..PeerOptions::simulcast_publisher()
        },
    )
    .await?;
    home_first(&mut nodes, &publisher)?;
    let mut failures = Vec::new();
    let urls: Vec<String> = nodes.iter().map(Node::ws_url).collect();
    let urls = &urls;
    let mut joining = futures_util::stream::iter((0..n).map(|i| {
        let (url, room) = (urls[i % urls.len()].clone(), room.clone());
        async move {
            let opts = LightOptions {
                timeout: TIMEOUT,
                ..LightOptions::default()
            };
            (
                i % urls.len(),
                LightViewer::connect(&url, &room, &format!("view-{i}"), opts).await,
            )
        }
    }))
    .buffer_unordered(JOIN_CONCURRENCY);
    // An overloaded machine times joins out one by one: bounded, the rest never start.
    let deadline = tokio::time::Instant::now() + JOIN_BUDGET;
    let mut joins = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, joining.next()).await {
            Ok(Some(j)) => joins.push(j),
            Ok(None) => break,
            Err(_) => {
                failures.insert(
                    0,
                    format!(
                        "joins stopped after {} s: {} of {n} done",
                        JOIN_BUDGET.as_secs(),
                        joins.len()
                    ),
                );
                break;
            }
        }
    }
    drop(joining);
    let mut per_node: Vec<Vec<Arc<LightViewer>>> = vec![Vec::new(); nodes.len()];
    for (node, r) in joins {
        match r {
            Ok(v) => per_node[node].push(Arc::new(v)),
            Err(e) => failures.push(format!("{e:#}")),
        }
    }
    let all: Vec<Arc<LightViewer>> = per_node.iter().flatten().cloned().collect();
    let waits = all.iter().map(|v| v.wait_for_streams(2, TIMEOUT));
    for r in futures_util::future::join_all(waits).await {
        if let Err(e) = r {
            failures.push(format!("{e:#}"));
        }
    }
    tokio::time::sleep(WARMUP).await;
    let load = loadavg();
    let sources: Vec<ServerSource> = nodes.iter().map(Node::source).collect();
    let mut before: Vec<Sample> = Vec::new();
    for (s, v) in sources.iter().zip(&per_node) {
        before.push(s.sample(totals(&publisher, v)).await);
    }
    let rx0 = lightviewer::receive_thread_cpu_s();
    let m0 = machine_jiffies();
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    let rx1 = lightviewer::receive_thread_cpu_s();
    let m1 = machine_jiffies();
    let mut results = Vec::new();
    for ((s, v), (b, node)) in sources.iter().zip(&per_node).zip(before.iter().zip(&nodes)) {
        let a = s.sample(totals(&publisher, v)).await;
        let w = measure::window(b, &a);
        let joins: Vec<f64> = v
            .iter()
            .filter_map(|v| v.join_times().connected)
            .map(|d| d.as_secs_f64() * 1e3)
            .collect();
        results.push(NodeResult {
            node: node_label(node),
            join_ms: measure::summarize(&joins),
            viewers: v.len(),
            due: a.clients.packets_due.saturating_sub(b.clients.packets_due),
            received: a
                .clients
                .packets_received
                .saturating_sub(b.clients.packets_received),
            w,
        });
    }
    let ended = all.iter().filter(|v| v.ended().is_some()).count();
    if ended > 0 {
        failures.push(format!("{ended} viewers ended early"));
    }
    let received: u64 = results.iter().map(|r| r.received).sum();
    let extended = match nodes.get(1) {
        Some(b) => {
            let c = b.cluster().await?;
            let ca = nodes[0].cluster().await?;
            format!(
                "B: extended_joins {}, placed_here {}, redirected {}, link_media_dropped {}; \
                 A: placed_here {}, redirected {}, link_refused {}",
                c["extended_joins"],
                c["placed_here"],
                c["redirected"],
                c["link_media_dropped"],
                ca["placed_here"],
                ca["redirected"],
                ca["link_refused"]
            )
        }
        None => String::new(),
    };
    let knee = results.iter().any(|r| {
        r.w.loss_percent > 1.0 || (r.due > 0 && (r.received as f64) < 0.97 * r.due as f64)
    }) || all.len() < n
        || ended > 0;
    let point = ViewerPoint {
        setup: if two {
            "(b) two nodes, one CPU each"
        } else {
            "(a) one node"
        },
        n,
        load,
        generator_cpu: results[0].w.generator_cpu_percent,
        generator_wait: results[0].w.generator_cpu_wait_percent,
        others_cpu: machine_percent(m0, m1).map(|m| {
            m - results
                .iter()
                .map(|r| r.w.server_cpu_percent.unwrap_or(0.0))
                .sum::<f64>()
                - results[0].w.generator_cpu_percent.unwrap_or(0.0)
        }),
        receive_thread_us: match (rx0, rx1) {
            (Some(x), Some(y)) if received > 0 => Some((y - x) * 1e6 / received as f64),
            _ => None,
        },
        nodes: results,
        failures,
        extended,
        knee,
    };
    futures_util::future::join_all(all.iter().map(|v| v.leave())).await;
    let _ = tokio::time::timeout(Duration::from_secs(3), publisher.leave()).await;
    Ok(point)
}

fn viewer_table(points: &[ViewerPoint]) -> String {
    let mut t = String::from(
        "| setup | N | load | node | viewers | fwd pkt/s | node CPU (wait) | µs/pkt | in-core p50 / p99 ms | join p50 / p99 ms | viewer loss | delivery | gen CPU (wait) | gen rx µs/pkt | rest of machine | knee |\n\
         |---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    let with_wait = |cpu: Option<f64>, wait: Option<f64>| match (cpu, wait) {
        (Some(c), Some(w)) => format!("{c:.0}% ({w:.0}%)"),
        (c, _) => pct(c),
    };
    for p in points {
        let (mut per_s, mut cpu_s, mut fwd, mut due, mut received) = (0.0, 0.0, 0u64, 0u64, 0u64);
        for (i, r) in p.nodes.iter().enumerate() {
            let w = &r.w;
            per_s += w.forwarded_per_s;
            cpu_s += w.server_cpu_s.unwrap_or(0.0);
            fwd += w.forwarded;
            due += r.due;
            received += r.received;
            let first = i == 0;
            let _ = writeln!(
                t,
                "| {} | {} | {} | {} | {} | {:.0} | {} | {} | {} | {:.0} / {:.0} | {:.2}% | {:.1}% | {} | {} | {} | {} |",
                if first { p.setup } else { "" },
                p.n,
                p.load,
                r.node,
                r.viewers,
                w.forwarded_per_s,
                with_wait(w.server_cpu_percent, w.server_cpu_wait_percent),
                w.server_us_per_packet
                    .map_or("n/a".into(), |v| format!("{v:.2}")),
                in_core(w),
                r.join_ms.p50,
                r.join_ms.p99,
                w.loss_percent,
                if r.due > 0 {
                    100.0 * r.received as f64 / r.due as f64
                } else {
                    0.0
                },
                if first {
                    with_wait(p.generator_cpu, p.generator_wait)
                } else {
                    String::new()
                },
                if first {
                    p.receive_thread_us
                        .map_or("n/a".into(), |v| format!("{v:.2}"))
                } else {
                    String::new()
                },
                if first {
                    pct(p.others_cpu)
                } else {
                    String::new()
                },
                if first && p.knee { "**knee**" } else { "" },
            );
        }
        if p.nodes.len() > 1 {
            let secs = p.nodes[0].w.seconds;
            let _ = writeln!(
                t,
                "| | {} | | A + B | {} | {:.0} | {:.0}% | {:.2} | | | | {:.1}% | | | | |",
                p.n,
                p.nodes.iter().map(|r| r.viewers).sum::<usize>(),
                per_s,
                100.0 * cpu_s / secs,
                if fwd > 0 {
                    cpu_s * 1e6 / fwd as f64
                } else {
                    0.0
                },
                if due > 0 {
                    100.0 * received as f64 / due as f64
                } else {
                    0.0
                },
            );
        }
    }
    t
}

async fn viewers(args: &Args, logs: &Path, md: &mut String) -> Result<()> {
    let mut points: Vec<ViewerPoint> = Vec::new();
    let mut budget_spent = Vec::new();
    let started = Instant::now();
    for two in [false, true] {
        let setup_started = Instant::now();
        for &n in &args.viewers {
            if setup_started.elapsed() > SETUP_BUDGET {
                println!("  {n} viewers and more: the setup's time budget is spent");
                budget_spent.push(n);
                break;
            }
            println!(
                "{} viewers on {} node(s) (load {}, {:.0} s in)",
                n,
                if two { 2 } else { 1 },
                loadavg(),
                started.elapsed().as_secs_f64()
            );
            let p = match viewer_point(two, n, args, logs).await {
                Ok(p) => p,
                Err(e) => {
                    println!("  point failed: {e:#}");
                    break;
                }
            };
            println!("{}", viewer_table(std::slice::from_ref(&p)));
            if !p.extended.is_empty() {
                println!("  {}", p.extended);
            }
            for f in p.failures.iter().take(5) {
                println!("  failure: {f}");
            }
            let knee = p.knee;
            points.push(p);
            if knee {
                println!("  knee reached at {n} viewers");
                break;
            }
        }
    }
    pin_generator(&(0..affinity::online_cpus()).collect::<Vec<_>>())?;
    let t = viewer_table(&points);
    println!("\n{t}");
    let mut notes = String::new();
    for n in budget_spent {
        let _ = writeln!(
            notes,
            "- A setup's {} s budget was spent before its {n}-viewer point.",
            SETUP_BUDGET.as_secs()
        );
    }
    for p in &points {
        if !p.extended.is_empty() {
            let _ = writeln!(notes, "- {} viewers, two nodes: {}", p.n, p.extended);
        }
        for f in p.failures.iter().take(3) {
            let _ = writeln!(notes, "- {} viewers, {}: {f}", p.n, p.setup);
        }
        if p.failures.len() > 3 {
            let _ = writeln!(notes, "- … and {} more failures", p.failures.len() - 3);
        }
    }
    writeln!(
        md,
        "## 2. Livestream viewers served by one node and by two\n\n\
         One publisher on A (Opus + simulcast VP8 q/h/f, webrtc-rs), N light viewers asking for \
         the top layer. (a): one node pinned to CPU 0, the load generator pinned to CPU 1. \
         (b): two nodes, one pinned to CPU 0 and the other to CPU 1, the generator on both; \
         viewer i joins through A when i is even, through B when odd. A is the room's node \
         (where the publisher is served: a new room goes to the least loaded node). \
         {} s measured per point after {} s of warm-up; a fresh `redis-server` and fresh nodes \
         per point. Load = 1-min load average just before the measured window. µs/pkt = the \
         node's CPU time (`/proc/<pid>`, all threads) ÷ its `rtp_packets_forwarded`. Delivery = \
         packets the node's viewers received ÷ the top layer's packets × its viewers. gen CPU = \
         the load generator (this process: publisher, viewers' tasks, the viewers' receive \
         thread), % of one CPU; (wait) = time its threads were runnable but waited for a CPU, \
         % of the window; gen rx µs/pkt = the viewers' receive thread per received packet; rest \
         of machine = all CPUs' busy time (`/proc/stat`) minus the nodes and the generator, % of \
         one CPU (other processes, and kernel work charged to none of them); join = a viewer's \
         WebSocket connect → connected (ICE + DTLS), viewers joining 8 at a time.\n\n{t}\n{notes}",
        args.duration,
        WARMUP.as_secs()
    )?;
    Ok(())
}

// ───────────────────────────── main ─────────────────────────────

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let mut args = Args::parse();
    args.viewers.retain(|&n| n > 0);
    if affinity::online_cpus() < 2 {
        bail!("needs 2 CPUs (one per node)");
    }
    let logs = std::env::temp_dir().join(format!("cluster-span-{}", std::process::id()));
    std::fs::create_dir_all(&logs)?;
    let commit = command_output("git", &["rev-parse", "--short=7", "HEAD"]).unwrap_or_default();
    let date = command_output("date", &["-u", "+%Y-%m-%d"]).unwrap_or_default();
    let when = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    let cpu = command_output(
        "sh",
        &["-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"],
    )
    .unwrap_or_default();
    let command: Vec<String> = std::env::args().collect();
    let mut md = format!(
        "# Rooms that span two nodes: the hop's latency, viewers on one node and on two ({date}, {commit})\n\n\
         ```sh\ncargo build --release --bin plaza --example cluster_span\n./target/release/examples/cluster_span {}\n```\n\n\
         {when}, release build, {} × {}, nodes as processes (`--workers 1`, `--redis`, \
         `--cluster-span-above 1`) with a real `redis-server`, all on loopback. \
         Whatever else ran on the machine shows in the load averages and in the rest of the \
         machine's CPU below.\n\n",
        command[1..].join(" "),
        affinity::online_cpus(),
        cpu.trim(),
    );
    let started = Instant::now();
    let r = latency(&args, &logs, &mut md).await;
    if let Err(e) = &r {
        println!("latency part failed: {e:#}");
        writeln!(
            md,
            "## 1. Added latency of the node-to-node hop\n\nFailed: {e:#}\n"
        )?;
    }
    if !args.viewers.is_empty() {
        viewers(&args, &logs, &mut md).await?;
    }
    writeln!(
        md,
        "<sub>Whole run {:.0} s. Node logs: {}.</sub>",
        started.elapsed().as_secs_f64(),
        logs.display()
    )?;
    if args.out.as_os_str() != "-" {
        let path = args.out.join(format!("{date}-{commit}-cluster-span.md"));
        std::fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
