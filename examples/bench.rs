//! Plaza benchmark: three scenarios, each at a few subscriber counts, against Plaza and (side by
//! side, in the same run) Janus's videoroom, with the same synthetic webrtc-rs peers.
//!
//! ```text
//! cargo build --release --bins --example bench      # the server binary and this benchmark
//! bench/run.sh                                      # in a network namespace, with Janus
//! cargo run --release --example bench -- --servers plaza --scenarios meeting   # Plaza only
//! ```
//!
//! Scenarios (sized for a 2-core machine that also runs the load generator):
//! - **audio**: an audio room — `--audio-speakers` publish Opus, N listeners subscribe;
//! - **meeting**: N participants, each publishes Opus + VP8 and subscribes to all the others;
//! - **livestream**: one host publishes Opus + VP8 (simulcast with `--simulcast`, Plaza only),
//!   N viewers subscribe.
//!
//! Each point (server × scenario × N) starts a fresh server process, joins everyone, waits
//! `--warmup` seconds, then measures `--duration` seconds: packets forwarded per second, the
//! server's CPU time per forwarded packet (`/proc/<pid>`), media latency publisher → subscriber
//! (`common::probe`), join times, loss, data-channel round trips (Plaza), server RSS and its
//! growth per participant. Results go to `--out` (default `bench/results/`):
//! `<date>-<scenario>.json`, `.md` and `.svg`, and `README-table.md` (the README's section).
//! See `bench/README.md` for the method and its caveats.
//!
//! `--viewer light` replaces the livestream's and meeting's subscribers with
//! `common::lightviewer` viewers (real signaling, ICE and DTLS; SRTP only counted), so the load
//! generator costs less per packet than the server; `--knee` steps the livestream's viewer
//! count until loss or the forwarded rate gives way; `--server-workers 1,2` and `--server-arg`
//! change the server's command line. Light-viewer results go to
//! `<date>-<commit>-light-viewer-<scenario>….{json,md,svg}` (`-paced` with `--publisher-pacing`).
//!
//! `--viewer-protocols ws,whep` (livestream, light viewers) runs every point once per viewer
//! protocol: WebSocket subscribers, or WHEP viewers (`LightViewer::connect_whep`: `POST
//! /whep/{room}`, no WebSocket), the same layer for both; the server's CPU per viewer and the
//! join time (WHEP: `POST` → first packet; WebSocket: connect → first packet) side by side.

// A tool, not the packet path: shares state between tasks, reads the clock and prints its
// report.
#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    clippy::print_stdout
)]

use plaza_testkit as common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use clap::Parser;
use common::affinity;
use common::cli::{self, PeerArgs};
use common::janus::{JanusOptions, JanusPeer, JanusServer, create_room};
use common::lightviewer::{self, LightOptions, LightViewer};
use common::measure::{
    self, ClientTotals, Measured, Recorder, ServerSource, Summary, WindowStats, now_us, summarize,
    wait_http_ok,
};
use common::media;
use common::{Channel, Peer, PeerOptions};
use futures_util::StreamExt;
use plaza::signal::TrackKind;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

#[derive(Parser, Debug, Clone, Serialize)]
#[command(about = "Plaza benchmark: scenarios × subscriber counts, Plaza beside Janus")]
#[command(mut_arg("chat_interval_ms", |a| {
    a.help("Data-channel ping interval per peer (Plaza), milliseconds")
}))]
struct Args {
    /// Scenarios to run: audio, meeting, livestream.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "audio,meeting,livestream"
    )]
    scenarios: Vec<String>,
    /// Servers to measure: plaza, janus.
    #[arg(long, value_delimiter = ',', default_value = "plaza,janus")]
    servers: Vec<String>,
    /// Audio room: publishers of audio.
    #[arg(long, default_value_t = 3)]
    audio_speakers: usize,
    /// Audio room: listener counts.
    #[arg(long, value_delimiter = ',', default_value = "10,25,50")]
    audio_listeners: Vec<usize>,
    /// Meeting: participant counts (everyone publishes audio + video, subscribes to all).
    #[arg(long, value_delimiter = ',', default_value = "3,5,8")]
    meeting_participants: Vec<usize>,
    /// Livestream: viewer counts.
    #[arg(long, value_delimiter = ',', default_value = "10,25,50")]
    livestream_viewers: Vec<usize>,
    /// Livestream host publishes simulcast video (Plaza; Janus gets the plain track).
    #[arg(long)]
    simulcast: bool,
    /// Measured seconds per point.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Seconds between "everyone joined" and the measurement.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    #[command(flatten)]
    #[serde(flatten)]
    peer: PeerArgs,
    /// The plaza binary (default: `plaza` next to this example's directory, i.e. the same
    /// target profile).
    #[arg(long)]
    plaza_bin: Option<PathBuf>,
    /// Measure an already running Plaza instead of starting one (signaling URL).
    #[arg(long)]
    plaza_url: Option<String>,
    /// Pid of the already running Plaza (for /proc); else its /stats is used.
    #[arg(long)]
    plaza_pid: Option<u32>,
    #[arg(long, default_value_t = 17880)]
    plaza_port: u16,
    #[arg(long, default_value_t = 17882)]
    plaza_udp_port: u16,
    /// The address Plaza binds (signaling and media) and the peers reach it on.
    #[arg(long, default_value = "127.0.0.1")]
    plaza_ip: std::net::IpAddr,
    /// The address the load generator's peers bind (their ICE candidates).
    #[arg(long, default_value = "127.0.0.1")]
    client_ip: std::net::IpAddr,
    #[arg(long, default_value = "/usr/bin/janus")]
    janus_bin: PathBuf,
    #[arg(long, default_value_t = 18188)]
    janus_port: u16,
    /// Interface (or IP prefix) Janus gathers ICE candidates on (default: the first
    /// non-loopback interface with an IPv4 address; see bench/README.md).
    #[arg(long)]
    janus_ice: Option<String>,
    /// Where results are written.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Print only; write no files.
    #[arg(long)]
    no_write: bool,
    /// Only rebuild `README-table.md` from the newest results in `--out`, then exit.
    #[arg(long)]
    readme_only: bool,
    /// Bound of each connect step, seconds.
    #[arg(long, default_value_t = 15)]
    timeout: u64,
    /// CPUs the server under test runs on (e.g. `0` or `0-1`; default: CPU 0 when the machine
    /// has at least 2, see `--no-pin`).
    #[arg(long)]
    server_cpus: Option<String>,
    /// CPUs the load generator (this process) runs on (default: every CPU but the server's).
    #[arg(long)]
    generator_cpus: Option<String>,
    /// Let the server and the load generator share every CPU (the default pins them apart:
    /// see testkit/src/affinity.rs for why).
    #[arg(long)]
    no_pin: bool,
    /// Subscribers of the livestream and meeting scenarios: `full` (webrtc-rs peers that
    /// decrypt and depacketize everything) or `light` (`common::lightviewer`: ICE + DTLS with
    /// `rtc`, then SRTP only counted from the clear RTP header; no RTCP feedback).
    #[arg(long, value_enum, default_value_t = ViewerKind::Full)]
    viewer: ViewerKind,
    /// Livestream "find the knee": step the viewer count through `--knee-viewers` (up to
    /// `--knee-max`, within `--knee-budget` seconds) and stop after the first point with
    /// viewer loss > 1 %, forwarded rate below 97 % of the expected rate, or a viewer that
    /// could not join.
    #[arg(long)]
    knee: bool,
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "25,50,75,100,150,200,300,400,500,700,1000"
    )]
    knee_viewers: Vec<usize>,
    #[arg(long, default_value_t = 1000)]
    knee_max: usize,
    /// Wall-clock budget of the knee search, seconds (no new point starts after it).
    #[arg(long, default_value_t = 900)]
    knee_budget: u64,
    /// Run every point once per value, with `--workers N` on the server's command line
    /// (e.g. `1,2`); empty: the server's default, no `--workers` flag.
    #[arg(long, value_delimiter = ',')]
    server_workers: Vec<usize>,
    /// Extra argument for the server (repeatable), appended to its command line.
    #[arg(long, allow_hyphen_values = true)]
    server_arg: Vec<String>,
    /// Livestream with light viewers: run every point once per viewer protocol (`ws`: Plaza's
    /// WebSocket signaling; `whep`: WHEP playback).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "ws")]
    viewer_protocols: Vec<ViewerProtocol>,
}

/// How the light viewers join.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
enum ViewerProtocol {
    Ws,
    Whep,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
enum ViewerKind {
    Full,
    Light,
}

/// Where the server and the load generator run: `None` = not pinned.
#[derive(Debug, Clone, Serialize)]
struct Pinning {
    server: Vec<usize>,
    generator: Vec<usize>,
}

fn pinning(args: &Args) -> Result<Option<Pinning>> {
    if args.no_pin {
        return Ok(None);
    }
    let n = affinity::online_cpus();
    let server = match &args.server_cpus {
        Some(s) => affinity::parse_cpus(s)?,
        None if n >= 2 => vec![0],
        None => return Ok(None),
    };
    let generator = match &args.generator_cpus {
        Some(s) => affinity::parse_cpus(s)?,
        None => (0..n).filter(|c| !server.contains(c)).collect(),
    };
    if generator.is_empty() {
        bail!("no CPU left for the load generator (--server-cpus takes them all)");
    }
    Ok(Some(Pinning { server, generator }))
}

// ───────────────────────────── scenarios ─────────────────────────────

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Scenario {
    Audio,
    Meeting,
    Livestream,
}

impl Scenario {
    fn parse(s: &str) -> Result<Scenario> {
        Ok(match s {
            "audio" => Scenario::Audio,
            "meeting" => Scenario::Meeting,
            "livestream" => Scenario::Livestream,
            _ => bail!("unknown scenario {s:?} (audio, meeting, livestream)"),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Scenario::Audio => "audio",
            Scenario::Meeting => "meeting",
            Scenario::Livestream => "livestream",
        }
    }

    fn title(self, args: &Args) -> String {
        match self {
            Scenario::Audio => format!(
                "Audio room: {} speakers (Opus), N listeners",
                args.audio_speakers
            ),
            Scenario::Meeting => {
                "Meeting: N participants, each publishes Opus + VP8 and subscribes to all".into()
            }
            Scenario::Livestream => format!(
                "Livestream: 1 host (Opus + VP8{}), N viewers",
                if args.simulcast {
                    ", simulcast on Plaza"
                } else {
                    ""
                }
            ),
        }
    }

    fn sizes(self, args: &Args) -> Vec<usize> {
        match self {
            Scenario::Audio => args.audio_listeners.clone(),
            Scenario::Meeting => args.meeting_participants.clone(),
            Scenario::Livestream => args.livestream_viewers.clone(),
        }
    }

    /// (publishers, subscribe-only peers, publish video) for size `n`.
    fn shape(self, n: usize, args: &Args) -> (usize, usize, bool) {
        match self {
            Scenario::Audio => (args.audio_speakers, n, false),
            Scenario::Meeting => (n, 0, true),
            Scenario::Livestream => (1, n, true),
        }
    }
}

// ───────────────────────────── results ─────────────────────────────

#[derive(Debug, Clone, Serialize)]
struct Point {
    scenario: Scenario,
    server: String,
    /// The x axis: listeners, participants or viewers.
    n: usize,
    publishers: usize,
    participants: usize,
    ok: bool,
    failures: Vec<String>,
    measured: Option<Measured>,
    /// WebSocket open → participant ready (Plaza: data channels open and publisher connected;
    /// Janus: its publisher or subscriber connection connected).
    join_ready_ms: Summary,
    /// WebSocket open → `joined` (Plaza) / publisher `joined` (Janus; not measured).
    join_signaling_ms: Option<Summary>,
    first_media_ms: Option<Summary>,
    dc_rtt_ms: Option<Summary>,
    loadavg_before: Option<[f64; 3]>,
    loadavg_after: Option<[f64; 3]>,
    wall_s: f64,
    /// The host's steal time over the point (joins, warm-up and window), % of all CPUs: time
    /// the hypervisor ran something else on this VM's CPUs. `/proc` CPU time cannot see it,
    /// and per-packet figures measured while it is high are inflated.
    host_steal_pct: Option<f64>,
    #[serde(skip)]
    steal_before: Option<u64>,
    /// `--workers` given to the server for this point (None: not given).
    workers: Option<usize>,
    /// Subscriber kind (`full` or `light`).
    viewer: ViewerKind,
    /// Light-viewer measurements (with `--viewer light`).
    light: Option<LightPoint>,
    /// How the light viewers joined.
    protocol: ViewerProtocol,
}

/// What the light viewers measured over the window.
#[derive(Debug, Clone, Default, Serialize)]
struct LightPoint {
    viewers: usize,
    /// Packets the viewers should have received in the window (publisher packets of the
    /// forwarded layer × the viewers that subscribe to them), per second.
    expected_per_s: f64,
    /// Packets the viewers received per second.
    received_per_s: f64,
    /// Received ÷ expected from the publishers' counters, %.
    delivery_percent: f64,
    /// Sequence-gap loss, %.
    loss_percent: f64,
    reordered: u64,
    /// The load generator's CPU (viewers, publishers, the bench itself) per received packet.
    generator_us_per_packet: Option<f64>,
    /// The light viewers' receive thread alone (recvmmsg + counting) per received packet.
    viewer_us_per_packet: Option<f64>,
    /// Largest inter-arrival gap on one SSRC since the viewers joined, ms.
    max_gap_ms: f64,
    /// Received packets per `recvmmsg` call.
    packets_per_batch: f64,
    /// The layer (rid) the viewers were told they receive (`layer_changed`), viewer count per
    /// rid.
    layers: std::collections::BTreeMap<String, usize>,
    /// Viewers whose task ended early (removed, failed).
    ended: usize,
    /// This point is the knee: loss > 1 %, forwarded rate < 97 % of the expected, or a viewer
    /// that did not join or was dropped.
    knee: bool,
}

impl Point {
    fn empty(scenario: Scenario, server: &str, n: usize, publishers: usize, subs: usize) -> Self {
        Point {
            scenario,
            server: server.to_owned(),
            n,
            publishers,
            participants: publishers + subs,
            ok: false,
            failures: Vec::new(),
            measured: None,
            join_ready_ms: Summary::default(),
            join_signaling_ms: None,
            first_media_ms: None,
            dc_rtt_ms: None,
            loadavg_before: loadavg(),
            loadavg_after: None,
            wall_s: 0.0,
            host_steal_pct: None,
            steal_before: steal_ticks(),
            workers: None,
            viewer: ViewerKind::Full,
            light: None,
            protocol: ViewerProtocol::Ws,
        }
    }

    /// Records the measured window (a failure when no subscriber received anything).
    fn set_measured(&mut self, measured: Measured) {
        if measured.window.received_clients == 0 {
            self.failures.push("subscribers received nothing".into());
        }
        self.measured = Some(measured);
    }

    /// Closes the point once its peers and server are gone: verdict, load average, wall time.
    fn finish(mut self, started: Instant) -> Self {
        self.ok = self.failures.is_empty();
        self.loadavg_after = loadavg();
        self.wall_s = started.elapsed().as_secs_f64();
        if let (Some(a), Some(b)) = (self.steal_before, steal_ticks()) {
            let cpus = affinity::online_cpus() as f64;
            // /proc/stat counts in USER_HZ ticks (100 per second on Linux).
            self.host_steal_pct =
                Some(b.saturating_sub(a) as f64 / (self.wall_s.max(0.001) * 100.0 * cpus) * 100.0);
        }
        self
    }
}

/// The machine's total steal time so far, in USER_HZ ticks (`/proc/stat`, first line, 8th
/// value).
fn steal_ticks() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    text.lines().next()?.split_whitespace().nth(8)?.parse().ok()
}

/// Connects peers `<prefix>-1` … `<prefix>-<count>` (`--join-concurrency` at a time) into
/// `peers`; a peer that could not join is a failure of `point`.
async fn join_peers<P, F, Fut>(
    point: &mut Point,
    peers: &mut Vec<Arc<P>>,
    count: usize,
    prefix: &str,
    args: &Args,
    connect: F,
) where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<P>>,
{
    let joins = futures_util::stream::iter((1..=count).map(|i| {
        let name = format!("{prefix}-{i}");
        let joined = connect(name.clone());
        async move { (name, joined.await) }
    }))
    .buffer_unordered(args.peer.join_concurrency.max(1))
    .collect::<Vec<_>>()
    .await;
    for (name, r) in joins {
        match r {
            Ok(p) => peers.push(Arc::new(p)),
            Err(e) => point.failures.push(format!("{name}: {e:#}")),
        }
    }
}

fn loadavg() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().map(|v| v.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

// ───────────────────────────── machine, build, date ─────────────────────────────

fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| measure::parse_status_kb(&t, "MemTotal"));
    json!({
        "nproc": affinity::online_cpus(),
        "cpu_model": cpu,
        "memory_bytes": mem,
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_owned()).unwrap_or_default(),
    })
}

fn command_output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn build_info(plaza_bin: Option<&Path>, janus_bin: &Path) -> Value {
    let root = env!("CARGO_MANIFEST_DIR");
    let rev = command_output("git", &["-C", root, "rev-parse", "--short", "HEAD"]);
    let dirty =
        command_output("git", &["-C", root, "status", "--porcelain"]).map(|s| !s.is_empty());
    // `janus --version` prints the version, then exits 1 ("Unknown option").
    let janus_version = Command::new(janus_bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        });
    json!({
        "git_rev": rev,
        "git_dirty": dirty,
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
        "plaza_bin": plaza_bin.map(|p| p.display().to_string()),
        "janus": janus_version,
    })
}

/// (YYYY-MM-DD, HH:MM:SS) in UTC.
fn utc_now() -> (String, String) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil from days (H. Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        format!("{y:04}-{m:02}-{d:02}"),
        format!("{:02}:{:02}:{:02}", rem / 3600, (rem % 3600) / 60, rem % 60),
    )
}

// ───────────────────────────── Plaza ─────────────────────────────

struct PlazaServer {
    child: Option<Child>,
    url: String,
    pid: Option<u32>,
}

impl Drop for PlazaServer {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn default_plaza_bin() -> Option<PathBuf> {
    // target/<profile>/examples/bench → target/<profile>/plaza
    let exe = std::env::current_exe().ok()?;
    let bin = exe.parent()?.parent()?.join("plaza");
    bin.exists().then_some(bin)
}

async fn start_plaza(args: &Args, log: &Path, workers: Option<usize>) -> Result<PlazaServer> {
    if let Some(url) = &args.plaza_url {
        return Ok(PlazaServer {
            child: None,
            url: url.clone(),
            pid: args.plaza_pid,
        });
    }
    let bin = args
        .plaza_bin
        .clone()
        .or_else(default_plaza_bin)
        .ok_or_else(|| {
            anyhow!("no plaza binary next to this example: build it (cargo build --release --bins) or pass --plaza-bin")
        })?;
    let log_file = std::fs::File::create(log)?;
    let mut cmd = Command::new(&bin);
    let ip = args.plaza_ip.to_string();
    if let Some(p) = pinning(args)? {
        affinity::pin_command(&mut cmd, &p.server);
    }
    let child = cmd
        .args([
            "--bind",
            &ip,
            "--port",
            &args.plaza_port.to_string(),
            "--udp-bind",
            &ip,
            "--udp-port",
            &args.plaza_udp_port.to_string(),
            "--log-level",
            "warn",
            // Every synthetic peer connects from one address: the per-address cap (64 by
            // default) would refuse the viewers past it.
            "--max-connections-per-ip",
            "4096",
            // Likewise the per-address join rate (20 per second, bursts of 100), and the
            // viewers join one room (1000 participants by default).
            "--max-joins-per-ip",
            "0",
            "--max-participants-per-room",
            "0",
        ])
        .args(
            workers
                .map(|w| ["--workers".to_owned(), w.to_string()])
                .into_iter()
                .flatten(),
        )
        .args(&args.server_arg)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id();
    let server = PlazaServer {
        child: Some(child),
        url: format!(
            "ws://{}/rtc",
            SocketAddr::new(args.plaza_ip, args.plaza_port)
        ),
        pid: Some(pid),
    };
    wait_http_ok(
        &format!(
            "http://{}/healthz",
            SocketAddr::new(args.plaza_ip, args.plaza_port)
        ),
        Duration::from_secs(15),
    )
    .await
    .with_context(|| format!("plaza did not come up (log: {})", log.display()))?;
    Ok(server)
}

/// Data-channel round trips between Plaza peers: every peer pings the next one on `chat` once
/// per `interval`; every peer answers pings with pongs. Returns the RTTs in ms.
async fn dc_round_trips(peers: Vec<Arc<Peer>>, run_for: Duration, interval: Duration) -> Vec<f64> {
    let rtts = Arc::new(Mutex::new(Vec::new()));
    let n = peers.len();
    if n < 2 {
        return Vec::new();
    }
    let deadline = tokio::time::Instant::now() + run_for;
    let grace = deadline + Duration::from_secs(2);
    let tasks = peers.iter().enumerate().map(|(i, peer)| {
        let peer = peer.clone();
        let target = peers[(i + 1) % n].participant_id().to_owned();
        let rtts = rtts.clone();
        async move {
            let mut rx = peer.subscribe_messages();
            let receiver = async {
                loop {
                    let msg = match tokio::time::timeout_at(grace, rx.recv()).await {
                        Err(_) | Ok(Err(RecvError::Closed)) => break,
                        Ok(Err(RecvError::Lagged(_))) => continue,
                        Ok(Ok(m)) => m,
                    };
                    if msg.channel != Channel::Chat {
                        continue;
                    }
                    let Ok(body) = serde_json::from_slice::<Value>(&msg.payload) else {
                        continue;
                    };
                    let t = body.get("t_us").and_then(Value::as_u64).unwrap_or(0);
                    match body.get("b").and_then(Value::as_str) {
                        Some("ping") => {
                            if let Some(from) = msg.from.clone() {
                                let pong = json!({"b": "pong", "t_us": t}).to_string();
                                let _ = tokio::time::timeout_at(
                                    grace,
                                    peer.send_chat(&pong, Some(vec![from])),
                                )
                                .await;
                            }
                        }
                        Some("pong") => {
                            let rtt = now_us().saturating_sub(t) as f64 / 1000.0;
                            rtts.lock().unwrap_or_else(|e| e.into_inner()).push(rtt);
                        }
                        _ => {}
                    }
                }
            };
            let sender = async {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if tokio::time::Instant::now() >= deadline {
                        break;
                    }
                    let ping = json!({"b": "ping", "t_us": now_us()}).to_string();
                    let _ = tokio::time::timeout_at(
                        grace,
                        peer.send_chat(&ping, Some(vec![target.clone()])),
                    )
                    .await;
                }
            };
            tokio::join!(receiver, sender);
        }
    });
    futures_util::future::join_all(tasks).await;
    rtts.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

async fn run_plaza(
    args: &Args,
    sc: Scenario,
    n: usize,
    logs: &Path,
    workers: Option<usize>,
    protocol: ViewerProtocol,
) -> Point {
    if args.viewer == ViewerKind::Light && sc != Scenario::Audio {
        return run_plaza_light(args, sc, n, logs, workers, protocol).await;
    }
    let (pubs, subs, video) = sc.shape(n, args);
    let mut point = Point::empty(sc, "plaza", n, pubs, subs);
    point.workers = workers;
    let started = Instant::now();
    let log = logs.join(match workers {
        Some(w) => format!("plaza-{}-{n}-w{w}.log", sc.name()),
        None => format!("plaza-{}-{n}.log", sc.name()),
    });
    let server = match start_plaza(args, &log, workers).await {
        Ok(s) => s,
        Err(e) => {
            point.failures.push(format!("{e:#}"));
            return point;
        }
    };
    let source = ServerSource::plaza(&server.url, server.pid, None);
    let mut recorder = Recorder::start(source).await;
    let room = format!("bench-{}-{n}-{:x}", sc.name(), rand::random::<u32>());
    let t = Duration::from_secs(args.timeout);
    let base = PeerOptions {
        timeout: t,
        keep_recent_packets: 0,
        max_kept_messages: 1,
        bind_ip: args.client_ip.to_string(),
        ..PeerOptions::default()
    };
    let publisher_opts = if video && args.simulcast && sc == Scenario::Livestream {
        PeerOptions {
            timeout: t,
            keep_recent_packets: 0,
            max_kept_messages: 1,
            bind_ip: args.client_ip.to_string(),
            pacing: args.peer.pacing(),
            ..PeerOptions::simulcast_publisher()
        }
    } else {
        PeerOptions {
            publish_audio: true,
            publish_video: video,
            pacing: args.peer.pacing(),
            ..base.clone()
        }
    };
    let mut peers: Vec<Arc<Peer>> = Vec::new();
    for (count, prefix, opts) in [(pubs, "pub", publisher_opts), (subs, "sub", base)] {
        let connect = |name: String| {
            let (url, room, opts) = (server.url.clone(), room.clone(), opts.clone());
            async move { Peer::connect(&url, &room, &name, opts).await }
        };
        join_peers(&mut point, &mut peers, count, prefix, args, connect).await;
    }
    // Every peer should receive every track of every other publisher.
    let tracks_per_pub = if video { 2 } else { 1 };
    let publisher_ids: Vec<String> = peers
        .iter()
        .filter(|p| p.publisher_pc().is_some())
        .map(|p| p.participant_id().to_owned())
        .collect();
    let waits = peers.iter().map(|p| {
        let others = publisher_ids
            .iter()
            .filter(|id| id.as_str() != p.participant_id())
            .count();
        let want = others * tracks_per_pub;
        async move {
            if want == 0 {
                return Ok(());
            }
            p.wait_for_tracks(want, Duration::from_secs(20))
                .await
                .map(|_| ())
                .map_err(|e| anyhow!("{}: {e:#}", p.name()))
        }
    });
    for r in futures_util::future::join_all(waits).await {
        if let Err(e) = r {
            point.failures.push(format!("{e:#}"));
        }
    }
    measure::map_plaza_probe(&peers);
    recorder
        .joined(peers.len(), measure::plaza_client_totals(&peers))
        .await;
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    let progress_peers = peers.clone();
    recorder
        .begin(
            &format!("plaza {} n={n}", sc.name()),
            Arc::new(move || measure::plaza_client_totals(&progress_peers)),
        )
        .await;
    let pings = tokio::spawn(dc_round_trips(
        peers.clone(),
        Duration::from_secs(args.duration),
        Duration::from_millis(args.peer.chat_interval_ms.max(10)),
    ));
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    let measured = recorder.end(measure::plaza_client_totals(&peers)).await;
    let rtts = pings.await.unwrap_or_default();
    let joins = measure::plaza_join_summary(&peers);
    point.join_ready_ms = joins.ready_ms;
    point.join_signaling_ms = Some(joins.signaling_ms);
    point.first_media_ms = Some(joins.first_media_ms);
    point.dc_rtt_ms = Some(summarize(&rtts));
    point.set_measured(measured);
    futures_util::future::join_all(peers.iter().map(|p| async move {
        let _ = tokio::time::timeout(Duration::from_secs(3), p.leave()).await;
    }))
    .await;
    drop(peers);
    drop(server);
    point.finish(started)
}

/// Packets the light viewers should receive, from the publishers' send counters: per track,
/// the packets of the layer the server forwards (the largest simulcast layer: no feedback, and
/// `track_settings` asks for `high`; the only layer of a plain track) × the viewers that
/// subscribe to that publisher.
fn light_due(publishers: &[Arc<Peer>], viewers_per_publisher: &[u64]) -> u64 {
    let mut due = 0;
    for (p, &v) in publishers.iter().zip(viewers_per_publisher) {
        for t in p.local_tracks() {
            let packets = t
                .layers
                .iter()
                .max_by_key(|l| u32::from(l.width) * u32::from(l.height))
                .filter(|_| t.layers.len() > 1)
                .map_or(t.counters.packets, |l| l.counters.packets);
            due += packets * v;
        }
    }
    due
}

fn light_totals(
    publishers: &[Arc<Peer>],
    viewers: &[Arc<LightViewer>],
    per_publisher: &[u64],
) -> ClientTotals {
    let mut t = ClientTotals {
        peers: (publishers.len() + viewers.len()) as u64,
        ..ClientTotals::default()
    };
    for v in viewers {
        t.packets_received += v.stats.received();
        t.packets_expected += v.stats.expected();
        if v.ended().is_some() {
            t.peers_removed += 1;
        }
    }
    for p in publishers {
        for l in p.local_tracks() {
            t.packets_sent += l.counters.packets;
        }
        if p.removed().is_some() {
            t.peers_removed += 1;
        }
    }
    t.packets_due = light_due(publishers, per_publisher);
    t
}

/// A livestream or meeting point with light viewers (`--viewer light`). Livestream: the host
/// is a full webrtc-rs publisher, the N viewers are light. Meeting: each of the N participants
/// is a full publish-only peer (`auto_subscribe: false`) paired with a light viewer that
/// subscribes to every track but its partner's, so the server forwards exactly what an
/// N-participant meeting forwards (2N participants in the room, N publisher and 2N subscriber
/// connections).
async fn run_plaza_light(
    args: &Args,
    sc: Scenario,
    n: usize,
    logs: &Path,
    workers: Option<usize>,
    protocol: ViewerProtocol,
) -> Point {
    let (pubs, subs, video) = sc.shape(n, args);
    let viewers_n = if sc == Scenario::Meeting { n } else { subs };
    let mut point = Point::empty(sc, "plaza", n, pubs, viewers_n);
    point.workers = workers;
    point.viewer = ViewerKind::Light;
    point.protocol = protocol;
    let started = Instant::now();
    if protocol == ViewerProtocol::Whep && sc != Scenario::Livestream {
        point
            .failures
            .push("WHEP viewers play one host: livestream only".into());
        return point.finish(started);
    }
    let proto = match protocol {
        ViewerProtocol::Ws => "",
        ViewerProtocol::Whep => "-whep",
    };
    let log = logs.join(match workers {
        Some(w) => format!("plaza-light-{}{proto}-{n}-w{w}.log", sc.name()),
        None => format!("plaza-light-{}{proto}-{n}.log", sc.name()),
    });
    let server = match start_plaza(args, &log, workers).await {
        Ok(s) => s,
        Err(e) => {
            point.failures.push(format!("{e:#}"));
            return point;
        }
    };
    let source = ServerSource::plaza(&server.url, server.pid, None);
    let mut recorder = Recorder::start(source).await;
    let room = format!("bench-light-{}-{n}-{:x}", sc.name(), rand::random::<u32>());
    let t = Duration::from_secs(args.timeout);
    let publisher_opts = if video && args.simulcast && sc == Scenario::Livestream {
        PeerOptions {
            timeout: t,
            keep_recent_packets: 0,
            max_kept_messages: 1,
            bind_ip: args.client_ip.to_string(),
            pacing: args.peer.pacing(),
            ..PeerOptions::simulcast_publisher()
        }
    } else {
        PeerOptions {
            timeout: t,
            keep_recent_packets: 0,
            max_kept_messages: 1,
            publish_audio: true,
            publish_video: video,
            auto_subscribe: (sc == Scenario::Meeting).then_some(false),
            bind_ip: args.client_ip.to_string(),
            pacing: args.peer.pacing(),
            ..PeerOptions::default()
        }
    };
    let mut publishers: Vec<Arc<Peer>> = Vec::new();
    {
        let connect = |name: String| {
            let (url, room, opts) = (server.url.clone(), room.clone(), publisher_opts.clone());
            async move { Peer::connect(&url, &room, &name, opts).await }
        };
        join_peers(&mut point, &mut publishers, pubs, "pub", args, connect).await;
    }
    // Meeting: viewer i skips publisher i's tracks.
    let skips: Vec<Option<String>> = (0..viewers_n)
        .map(|i| {
            (sc == Scenario::Meeting)
                .then(|| publishers.get(i).map(|p| p.participant_id().to_owned()))
                .flatten()
        })
        .collect();
    let mut viewers: Vec<Arc<LightViewer>> = Vec::new();
    {
        let skips = Arc::new(skips.clone());
        let http_addr: std::net::SocketAddr = server
            .url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| SocketAddr::new(args.plaza_ip, args.plaza_port));
        let connect = |name: String| {
            let (url, room) = (server.url.clone(), room.clone());
            let i: usize = name
                .rsplit('-')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(1);
            let skip = skips.get(i - 1).cloned().flatten();
            let opts = LightOptions {
                timeout: t,
                auto_subscribe: sc != Scenario::Meeting,
                skip_participant: skip,
                bind_ip: args.client_ip,
                ..LightOptions::default()
            };
            async move {
                match protocol {
                    ViewerProtocol::Ws => LightViewer::connect(&url, &room, &name, opts).await,
                    ViewerProtocol::Whep => {
                        LightViewer::connect_whep(http_addr, &room, &name, opts).await
                    }
                }
            }
        };
        join_peers(&mut point, &mut viewers, viewers_n, "view", args, connect).await;
    }
    let per_publisher: Vec<u64> = publishers
        .iter()
        .map(|p| {
            viewers.len() as u64
                - skips
                    .iter()
                    .filter(|s| s.as_deref() == Some(p.participant_id()))
                    .count() as u64
        })
        .collect();
    let tracks_per_pub = if video { 2 } else { 1 };
    // Every viewer should receive every track of every publisher but its partner's.
    let mine = usize::from(sc == Scenario::Meeting);
    let want = (publishers.len().saturating_sub(mine) * tracks_per_pub) as u64;
    let waits = viewers
        .iter()
        .map(|v| v.wait_for_streams(want, Duration::from_secs(20)));
    for r in futures_util::future::join_all(waits).await {
        if let Err(e) = r {
            point.failures.push(format!("{e:#}"));
        }
    }
    let totals = {
        let (p, v, pp) = (publishers.clone(), viewers.clone(), per_publisher.clone());
        Arc::new(move || light_totals(&p, &v, &pp))
    };
    recorder
        .joined(publishers.len() + viewers.len(), totals())
        .await;
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    let batches0: u64 = viewers
        .iter()
        .map(|v| v.stats.batches.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    let reordered0: u64 = viewers
        .iter()
        .map(|v| v.stats.reordered.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    let before = totals();
    let rx_cpu0 = lightviewer::receive_thread_cpu_s();
    recorder
        .begin(&format!("plaza light {} n={n}", sc.name()), totals.clone())
        .await;
    let pings = tokio::spawn(dc_round_trips(
        publishers.clone(),
        Duration::from_secs(args.duration),
        Duration::from_millis(args.peer.chat_interval_ms.max(10)),
    ));
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    let after = totals();
    let rx_cpu1 = lightviewer::receive_thread_cpu_s();
    let measured = recorder.end(after).await;
    let rtts = pings.await.unwrap_or_default();
    let w = &measured.window;
    let received = after
        .packets_received
        .saturating_sub(before.packets_received);
    let due = after.packets_due.saturating_sub(before.packets_due);
    let batches: u64 = viewers
        .iter()
        .map(|v| v.stats.batches.load(std::sync::atomic::Ordering::Relaxed))
        .sum::<u64>()
        .saturating_sub(batches0);
    let reordered: u64 = viewers
        .iter()
        .map(|v| v.stats.reordered.load(std::sync::atomic::Ordering::Relaxed))
        .sum::<u64>()
        .saturating_sub(reordered0);
    let mut layers = std::collections::BTreeMap::new();
    for v in &viewers {
        for (_, (q, rid)) in v.layers() {
            let q = format!("{q:?}").to_lowercase();
            let key = if rid.is_empty() {
                q
            } else {
                format!("{rid}/{q}")
            };
            *layers.entry(key).or_insert(0) += 1;
        }
    }
    let expected_per_s = due as f64 / w.seconds;
    let delivery = if due > 0 {
        100.0 * received as f64 / due as f64
    } else {
        0.0
    };
    let ended = viewers.iter().filter(|v| v.ended().is_some()).count();
    if protocol == ViewerProtocol::Whep {
        let refused = viewers
            .iter()
            .filter(|v| v.layer_status() != Some(204))
            .count();
        if refused > 0 {
            point.failures.push(format!(
                "{refused} WHEP viewers' layer requests not answered 204"
            ));
        }
    }
    // A viewer that could not join (or was dropped) also means the server gave way: the
    // packets it would have received are missing from both sides of the comparison.
    let knee = w.loss_percent > 1.0
        || (due > 0 && (w.forwarded as f64) < 0.97 * due as f64)
        || viewers.len() < viewers_n
        || ended > 0;
    point.light = Some(LightPoint {
        viewers: viewers.len(),
        expected_per_s,
        received_per_s: received as f64 / w.seconds,
        delivery_percent: delivery,
        loss_percent: w.loss_percent,
        reordered,
        generator_us_per_packet: w
            .generator_cpu_percent
            .filter(|_| received > 0)
            .map(|c| c / 100.0 * w.seconds * 1e6 / received as f64),
        viewer_us_per_packet: match (rx_cpu0, rx_cpu1) {
            (Some(a), Some(b)) if received > 0 => Some((b - a) * 1e6 / received as f64),
            _ => None,
        },
        max_gap_ms: viewers
            .iter()
            .map(|v| {
                v.stats
                    .max_gap_us
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
            .max()
            .unwrap_or(0) as f64
            / 1000.0,
        packets_per_batch: if batches > 0 {
            received as f64 / batches as f64
        } else {
            0.0
        },
        layers,
        ended,
        knee,
    });
    let ready: Vec<f64> = viewers
        .iter()
        .filter_map(|v| v.join_times().connected)
        .map(|d| d.as_secs_f64() * 1000.0)
        .collect();
    let first: Vec<f64> = viewers
        .iter()
        .filter_map(|v| v.join_times().first_media)
        .map(|d| d.as_secs_f64() * 1000.0)
        .collect();
    let signaling: Vec<f64> = viewers
        .iter()
        .filter_map(|v| v.join_times().joined)
        .map(|d| d.as_secs_f64() * 1000.0)
        .collect();
    point.join_ready_ms = summarize(&ready);
    point.join_signaling_ms = Some(summarize(&signaling));
    point.first_media_ms = Some(summarize(&first));
    point.dc_rtt_ms = Some(summarize(&rtts));
    if ended > 0 {
        point
            .failures
            .push(format!("{ended} light viewers ended early"));
    }
    point.set_measured(measured);
    futures_util::future::join_all(viewers.iter().map(|v| v.leave())).await;
    futures_util::future::join_all(publishers.iter().map(|p| async move {
        let _ = tokio::time::timeout(Duration::from_secs(3), p.leave()).await;
    }))
    .await;
    drop(viewers);
    drop(publishers);
    drop(server);
    point.finish(started)
}

// ───────────────────────────── Janus ─────────────────────────────

/// (interface, IPv4 address) from `ip -4 -o addr show`: the interface named `want`, or the
/// first non-loopback one.
fn ice_interface(want: Option<&str>) -> Option<(String, String)> {
    let out = command_output("ip", &["-4", "-o", "addr", "show"])?;
    out.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let name = f.nth(1)?.split('@').next()?.to_owned();
        let addr = f.nth(1)?.split('/').next()?.to_owned();
        let ok = match want {
            Some(w) => name == w,
            None => name != "lo",
        };
        ok.then_some((name, addr))
    })
}

fn janus_totals(peers: &[Arc<JanusPeer>]) -> ClientTotals {
    let mut t = ClientTotals::default();
    for p in peers {
        for r in p.remote_tracks() {
            t.packets_received += r.packets;
            t.packets_expected += r.expected();
        }
        for (_, _, c) in p.local_tracks() {
            t.packets_sent += c.packets;
        }
    }
    t
}

async fn run_janus(
    args: &Args,
    sc: Scenario,
    n: usize,
    logs: &Path,
    (ice, ip): &(String, String),
) -> Point {
    let (pubs, subs, video) = sc.shape(n, args);
    let mut point = Point::empty(sc, "janus", n, pubs, subs);
    let started = Instant::now();
    let log = logs.join(format!("janus-{}-{n}.log", sc.name()));
    let cfg = std::env::temp_dir().join(format!("plaza-bench-janus-{}", std::process::id()));
    let server = match JanusServer::start(
        &args.janus_bin,
        &cfg,
        args.janus_port,
        ice,
        &log,
        pinning(args)
            .ok()
            .flatten()
            .as_ref()
            .map(|p| p.server.as_slice()),
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            point.failures.push(format!("{e:#}"));
            return point;
        }
    };
    let t = Duration::from_secs(args.timeout);
    let room = u64::from(rand::random::<u32>()) + 1;
    if let Err(e) = create_room(&server.ws_url, room, pubs + 1, t).await {
        point.failures.push(format!("{e:#}"));
        return point;
    }
    let mut recorder = Recorder::start(ServerSource::process(server.pid())).await;
    let opts = |publish: bool| JanusOptions {
        publish_audio: publish,
        publish_video: publish && video,
        timeout: t,
        bind_ip: ip.clone(),
        pacing: args.peer.pacing(),
        ..JanusOptions::new(&server.ws_url, room)
    };
    let mut peers: Vec<Arc<JanusPeer>> = Vec::new();
    for (count, prefix, publish) in [(pubs, "pub", true), (subs, "sub", false)] {
        let connect = |name: String| {
            let o = opts(publish);
            async move { JanusPeer::connect(&name, o).await }
        };
        join_peers(&mut point, &mut peers, count, prefix, args, connect).await;
    }
    let feeds: HashMap<u64, Vec<(TrackKind, u32)>> = peers
        .iter()
        .filter_map(|p| {
            p.feed_id.map(|f| {
                (
                    f,
                    p.local_tracks()
                        .into_iter()
                        .map(|(k, ssrc, _)| (k, ssrc))
                        .collect(),
                )
            })
        })
        .collect();
    let subscribes = futures_util::stream::iter(peers.iter().map(|p| {
        let wanted: Vec<u64> = feeds
            .keys()
            .copied()
            .filter(|f| Some(*f) != p.feed_id)
            .collect();
        async move { (p.name().to_owned(), p.subscribe(&wanted).await) }
    }))
    .buffer_unordered(args.peer.join_concurrency.max(1))
    .collect::<Vec<_>>()
    .await;
    for (name, r) in subscribes {
        if let Err(e) = r {
            point.failures.push(format!("{name}: subscribe: {e:#}"));
        }
    }
    for p in &peers {
        p.map_probe(&feeds);
    }
    recorder.joined(peers.len(), janus_totals(&peers)).await;
    tokio::time::sleep(Duration::from_secs(args.warmup)).await;
    for p in &peers {
        let streams = p.streams().len();
        let live = p.remote_tracks().iter().filter(|t| t.packets > 0).count();
        if live < streams {
            point
                .failures
                .push(format!("{}: {live} of {streams} streams live", p.name()));
        }
    }
    let progress_peers = peers.clone();
    recorder
        .begin(
            &format!("janus {} n={n}", sc.name()),
            Arc::new(move || janus_totals(&progress_peers)),
        )
        .await;
    tokio::time::sleep(Duration::from_secs(args.duration)).await;
    let measured = recorder.end(janus_totals(&peers)).await;
    let ready: Vec<f64> = peers
        .iter()
        .filter_map(|p| {
            if p.feed_id.is_some() {
                p.publish_ready()
            } else {
                p.subscriber_ready_since_open()
            }
        })
        .map(|d| d.as_secs_f64() * 1000.0)
        .collect();
    point.join_ready_ms = summarize(&ready);
    point.set_measured(measured);
    futures_util::future::join_all(peers.iter().map(|p| async move {
        let _ = tokio::time::timeout(Duration::from_secs(3), p.leave()).await;
    }))
    .await;
    drop(peers);
    drop(server);
    let _ = std::fs::remove_dir_all(&cfg);
    point.finish(started)
}

// ───────────────────────────── tables ─────────────────────────────

fn f(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".to_owned(), |v| format!("{v:.digits$}"))
}

fn table(points: &[Point]) -> String {
    let mut s = String::new();
    s.push_str(
        "| server | N | peers | fwd pkt/s | server CPU | µs/pkt | latency p50 / p99 / max (ms) \
         | in-core p50 / p99 (ms) | join p50 / p99 (ms) | loss | DC RTT p50 / p99 (ms) | RSS \
         | RSS/peer joined / end | gen CPU | CPU wait srv / gen |\n",
    );
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for p in points {
        let m = p.measured.as_ref();
        let w = m.map(|m| &m.window);
        let l = m.map(|m| &m.media_latency_ms);
        let join = format!("{:.0} / {:.0}", p.join_ready_ms.p50, p.join_ready_ms.p99);
        s.push_str(&format!(
            "| {}{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} |\n",
            server_label(p),
            if p.ok { "" } else { " ⚠" },
            p.n,
            p.participants,
            f(w.map(|w| w.forwarded_per_s), 0),
            f(w.and_then(|w| w.server_cpu_percent), 0) + "%",
            f(w.and_then(|w| w.server_us_per_packet), 2),
            l.filter(|l| l.count > 0).map_or("n/a".into(), |l| format!(
                "{:.2} / {:.2} / {:.1}",
                l.p50, l.p99, l.max
            )),
            w.and_then(|w| w.server_forward_latency_us)
                .map_or("n/a".into(), |l| format!(
                    "{:.2} / {:.2}",
                    l.p50 as f64 / 1000.0,
                    l.p99 as f64 / 1000.0
                )),
            join,
            f(w.map(|w| w.loss_percent), 2) + "%",
            p.dc_rtt_ms
                .as_ref()
                .filter(|d| d.count > 0)
                .map_or("n/a".into(), |d| format!("{:.1} / {:.1}", d.p50, d.p99)),
            w.and_then(|w| w.server_rss_bytes)
                .map_or("–".into(), |b| format!(
                    "{:.0} MB",
                    b as f64 / 1_048_576.0
                )),
            m.map_or("–".into(), |m| format!(
                "{} / {}",
                m.server_rss_per_participant_bytes
                    .map_or("–".into(), |b| format!("{:.0} KB", b / 1024.0)),
                m.server_rss_end_per_participant_bytes
                    .map_or("–".into(), |b| format!("{:.0} KB", b / 1024.0)),
            )),
            f(w.and_then(|w| w.generator_cpu_percent), 0) + "%",
            f(w.and_then(|w| w.server_cpu_wait_percent), 0) + "%",
            f(w.and_then(|w| w.generator_cpu_wait_percent), 0) + "%",
        ));
    }
    s
}

fn server_label(p: &Point) -> String {
    let mut s = p.server.clone();
    if let Some(w) = p.workers {
        s.push_str(&format!(" w{w}"));
    }
    if p.viewer == ViewerKind::Light {
        s.push_str(" (light)");
    }
    if p.protocol == ViewerProtocol::Whep {
        s.push_str(" WHEP");
    }
    s
}

/// The light viewers' table: per point, what was forwarded against what should have been,
/// the server's cost per packet, the viewers' loss, the in-core p99 and the generator's cost.
fn light_table(points: &[Point]) -> String {
    if points.iter().all(|p| p.light.is_none()) {
        return String::new();
    }
    let mut s = String::from(
        "| server | N | fwd pkt/s | expected pkt/s | server CPU | server µs/pkt | viewer loss \
         | delivery | in-core p50 / p99 (µs) | srv CPU wait | gen CPU | gen µs/pkt \
         | viewer rx µs/pkt | pkts/recvmmsg | layer (viewers) | max gap (ms) \
         | first packet p50 / p99 (ms) | shards: share · µs per own pkt | knee |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---|\n",
    );
    for p in points {
        let (Some(l), Some(m)) = (&p.light, &p.measured) else {
            continue;
        };
        let w = &m.window;
        s.push_str(&format!(
            "| {}{} | {} | {:.0} | {:.0} | {} | {} | {:.2}% | {:.1}% | {} | {} | {} | {} | {} | {:.1} | {} | {:.0} | {} | {} | {} |\n",
            server_label(p),
            if p.ok { "" } else { " ⚠" },
            p.n,
            w.forwarded_per_s,
            l.expected_per_s,
            f(w.server_cpu_percent, 1) + "%",
            f(w.server_us_per_packet, 2),
            l.loss_percent,
            l.delivery_percent,
            w.server_forward_latency_us
                .map_or("n/a".into(), |x| format!("{} / {}", x.p50, x.p99)),
            f(w.server_cpu_wait_percent, 0) + "%",
            f(w.generator_cpu_percent, 0) + "%",
            f(l.generator_us_per_packet, 2),
            f(l.viewer_us_per_packet, 2),
            l.packets_per_batch,
            l.layers
                .iter()
                .map(|(k, v)| format!("{k} ({v})"))
                .collect::<Vec<_>>()
                .join(", "),
            l.max_gap_ms,
            p.first_media_ms
                .as_ref()
                .filter(|j| j.count > 0)
                .map_or("n/a".into(), |j| format!("{:.0} / {:.0}", j.p50, j.p99)),
            shard_text(w),
            if l.knee { "**knee**" } else { "" },
        ));
    }
    s.push('\n');
    s
}

/// Each shard's share of the forwarded packets and its thread's CPU per packet it forwarded
/// (the shard threads alone: without the server's signaling and HTTP threads).
fn shard_text(w: &WindowStats) -> String {
    let Some(cpu) = &w.shard_cpu else {
        return "–".into();
    };
    let all = [100.0];
    let shares = match &w.shard_share_percent {
        Some(s) => &s[..],
        None if cpu.len() == 1 => &all[..],
        None => return "–".into(),
    };
    shares
        .iter()
        .zip(cpu)
        .map(|(share, c)| format!("{share:.0}% · {}", f(c.us_per_packet, 2)))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// Plaza / Janus ratios per N.
fn ratios(points: &[Point]) -> Vec<Value> {
    let mut out = Vec::new();
    let mut ns: Vec<usize> = points.iter().map(|p| p.n).collect();
    ns.sort_unstable();
    ns.dedup();
    for n in ns {
        let get = |server: &str| points.iter().find(|p| p.n == n && p.server == server);
        let (Some(pl), Some(ja)) = (get("plaza"), get("janus")) else {
            continue;
        };
        let r = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => Some(a / b),
            _ => None,
        };
        let cpu = |p: &Point| p.measured.as_ref()?.window.server_us_per_packet;
        let lat = |p: &Point| p.measured.as_ref().map(|m| m.media_latency_ms.p50);
        let lat99 = |p: &Point| p.measured.as_ref().map(|m| m.media_latency_ms.p99);
        out.push(json!({
            "n": n,
            "cpu_per_packet": r(cpu(pl), cpu(ja)),
            "latency_p50": r(lat(pl), lat(ja)),
            "latency_p99": r(lat99(pl), lat99(ja)),
            "join_p50": r(Some(pl.join_ready_ms.p50), Some(ja.join_ready_ms.p50)),
        }));
    }
    out
}

fn ratio_text(ratios: &[Value]) -> String {
    let mut s = String::new();
    for r in ratios {
        let g = |k: &str| r[k].as_f64().map_or("–".to_owned(), |v| format!("{v:.2}"));
        s.push_str(&format!(
            "- N = {}: Plaza/Janus CPU per packet **{}**, latency p50 {}, p99 {}, join p50 {}\n",
            r["n"],
            g("cpu_per_packet"),
            g("latency_p50"),
            g("latency_p99"),
            g("join_p50")
        ));
    }
    s
}

// ───────────────────────────── chart ─────────────────────────────

fn nice_max(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

struct Series {
    label: String,
    color: &'static str,
    dashed: bool,
    points: Vec<(f64, f64)>,
}

#[allow(clippy::too_many_arguments)]
fn panel(
    out: &mut String,
    x0: f64,
    y0: f64,
    w: f64,
    h: f64,
    title: &str,
    ylabel: &str,
    xlabel: &str,
    series: &[Series],
) {
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    let ys: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .collect();
    let xmax = nice_max(xs.iter().copied().fold(0.0, f64::max));
    let ymax = nice_max(ys.iter().copied().fold(0.0, f64::max) * 1.05);
    let (l, r, t, b) = (55.0, 10.0, 30.0, 40.0);
    let (pw, ph) = (w - l - r, h - t - b);
    let px = |x: f64| x0 + l + pw * x / xmax;
    let py = |y: f64| y0 + t + ph * (1.0 - y / ymax);
    out.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"14\" font-weight=\"bold\">{}</text>\n",
        x0 + l,
        y0 + 18.0,
        xml(title)
    ));
    for i in 0..=5 {
        let yv = ymax * f64::from(i) / 5.0;
        let y = py(yv);
        out.push_str(&format!(
            "<line x1=\"{:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{}</text>\n",
            px(0.0),
            px(xmax),
            px(0.0) - 5.0,
            y + 4.0,
            trim_num(yv)
        ));
        let xv = xmax * f64::from(i) / 5.0;
        out.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{}</text>\n",
            px(xv),
            py(0.0) + 15.0,
            trim_num(xv)
        ));
    }
    out.push_str(&format!(
        "<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#333\"/>\n\
         <line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#333\"/>\n",
        px(0.0),
        py(0.0),
        px(xmax),
        py(0.0),
        px(0.0),
        py(0.0),
        px(0.0),
        py(ymax)
    ));
    out.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"middle\">{}</text>\n\
         <text transform=\"translate({:.1},{:.1}) rotate(-90)\" font-size=\"12\" \
         text-anchor=\"middle\">{}</text>\n",
        x0 + l + pw / 2.0,
        y0 + h - 5.0,
        xml(xlabel),
        x0 + 14.0,
        y0 + t + ph / 2.0,
        xml(ylabel)
    ));
    for (i, s) in series.iter().enumerate() {
        let dash = if s.dashed {
            " stroke-dasharray=\"6,4\""
        } else {
            ""
        };
        let pts: Vec<String> = s
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        out.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\"{dash} points=\"{}\"/>\n",
            s.color,
            pts.join(" ")
        ));
        for &(x, y) in &s.points {
            out.push_str(&format!(
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{}\"/>\n",
                px(x),
                py(y),
                s.color
            ));
        }
        let ly = y0 + t + 8.0 + 16.0 * i as f64;
        out.push_str(&format!(
            "<line x1=\"{:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{}\" \
             stroke-width=\"2\"{dash}/>\n<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\">{}</text>\n",
            px(0.0) + 10.0,
            px(0.0) + 34.0,
            s.color,
            px(0.0) + 40.0,
            ly + 4.0,
            xml(&s.label)
        ));
    }
}

fn trim_num(v: f64) -> String {
    if v == v.round() {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn color(server: &str) -> &'static str {
    if server == "plaza" {
        "#1f77b4"
    } else {
        "#ff7f0e"
    }
}

fn chart(title: &str, xlabel: &str, points: &[Point], footer: &str) -> String {
    let servers: Vec<String> = {
        let mut v: Vec<String> = points.iter().map(|p| p.server.clone()).collect();
        v.dedup();
        v.sort();
        v.dedup();
        v
    };
    let series_of = |server: &str, get: &dyn Fn(&Point) -> Option<f64>| -> Vec<(f64, f64)> {
        let mut v: Vec<(f64, f64)> = points
            .iter()
            .filter(|p| p.server == server)
            .filter_map(|p| get(p).map(|y| (p.n as f64, y)))
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        v
    };
    let cpu: Vec<Series> = servers
        .iter()
        .map(|s| Series {
            label: format!("{s} server CPU µs per forwarded packet"),
            color: color(s),
            dashed: false,
            points: series_of(s, &|p| p.measured.as_ref()?.window.server_us_per_packet),
        })
        .collect();
    let mut lat: Vec<Series> = Vec::new();
    for s in &servers {
        lat.push(Series {
            label: format!("{s} p50"),
            color: color(s),
            dashed: false,
            points: series_of(s, &|p| p.measured.as_ref().map(|m| m.media_latency_ms.p50)),
        });
        lat.push(Series {
            label: format!("{s} p99"),
            color: color(s),
            dashed: true,
            points: series_of(s, &|p| p.measured.as_ref().map(|m| m.media_latency_ms.p99)),
        });
    }
    let (w, h) = (1000.0, 380.0);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
         viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"20\" font-size=\"15\" font-weight=\"bold\">{}</text>\n",
        xml(title)
    );
    panel(
        &mut out,
        0.0,
        25.0,
        w / 2.0,
        h - 45.0,
        "Server CPU per forwarded packet",
        "µs / packet",
        xlabel,
        &cpu,
    );
    panel(
        &mut out,
        w / 2.0,
        25.0,
        w / 2.0,
        h - 45.0,
        "Media latency, publisher → subscriber",
        "ms",
        xlabel,
        &lat,
    );
    out.push_str(&format!(
        "<text x=\"10\" y=\"{:.0}\" font-size=\"10\" fill=\"#555\">{}</text>\n</svg>\n",
        h - 6.0,
        xml(footer)
    ));
    out
}

// ───────────────────────────── main ─────────────────────────────

fn main() {
    let args = Args::parse();
    if let Err(e) = args.peer.install_signing_key() {
        return cli::exit_with("bench", Err(e));
    }
    // Pin before the runtime starts its threads: they inherit the affinity.
    let pins = match pinning(&args) {
        Ok(p) => p,
        Err(e) => return cli::exit_with("bench", Err(e)),
    };
    if let Some(p) = &pins {
        if let Err(e) = affinity::pin_current_thread(&p.generator) {
            return cli::exit_with("bench", Err(e));
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return cli::exit_with("bench", Err(e.into())),
    };
    cli::exit_with("bench", rt.block_on(run(args, pins)));
}

fn xlabel(sc: Scenario) -> &'static str {
    match sc {
        Scenario::Audio => "listeners",
        Scenario::Meeting => "participants",
        Scenario::Livestream => "viewers",
    }
}

async fn run(args: Args, pins: Option<Pinning>) -> Result<bool> {
    now_us();
    if args.readme_only {
        let path = args.out.join("README-table.md");
        let text = readme_table(&args.out)
            .ok_or_else(|| anyhow!("no results in {}", args.out.display()))?;
        std::fs::write(&path, text)?;
        println!("wrote {}", path.display());
        return Ok(true);
    }
    let scenarios: Vec<Scenario> = args
        .scenarios
        .iter()
        .map(|s| Scenario::parse(s))
        .collect::<Result<_>>()?;
    let want_plaza = args.servers.iter().any(|s| s == "plaza");
    let mut want_janus = args.servers.iter().any(|s| s == "janus");
    let ice = ice_interface(args.janus_ice.as_deref());
    if want_janus {
        if !args.janus_bin.exists() {
            eprintln!(
                "bench: {} not found (apt-get install janus); measuring Plaza only",
                args.janus_bin.display()
            );
            want_janus = false;
        } else if ice.is_none() {
            eprintln!(
                "bench: no non-loopback interface with an IPv4 address for Janus's ICE \
                 (libnice ignores loopback); run bench/run.sh, which makes one in a network \
                 namespace. Measuring Plaza only."
            );
            want_janus = false;
        }
    }
    let (date, time) = utc_now();
    let logs = std::env::temp_dir().join(format!("plaza-bench-logs-{}", std::process::id()));
    std::fs::create_dir_all(&logs)?;
    let plaza_bin = args.plaza_bin.clone().or_else(default_plaza_bin);
    let machine = machine();
    let build = build_info(plaza_bin.as_deref(), &args.janus_bin);
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let pin_text = match &pins {
        Some(p) => format!(
            "server on CPU {}, load generator on CPU {}",
            affinity::format_cpus(&p.server),
            affinity::format_cpus(&p.generator)
        ),
        None => "server and load generator share the CPUs".to_owned(),
    };
    println!("bench: {pin_text}");
    println!(
        "bench {date} {time} UTC on {} × {} ({} GB); build {}; load {:?}",
        machine["nproc"],
        machine["cpu_model"].as_str().unwrap_or("?"),
        machine["memory_bytes"].as_u64().unwrap_or(0) >> 30,
        build,
        loadavg()
    );
    let mut all_ok = true;
    let mut readme = String::new();
    for sc in scenarios {
        let title = sc.title(&args);
        println!("\n=== {title}");
        let mut points: Vec<Point> = Vec::new();
        let knee_mode = args.knee && sc == Scenario::Livestream;
        let sizes: Vec<usize> = if knee_mode {
            args.knee_viewers
                .iter()
                .copied()
                .filter(|&n| n <= args.knee_max)
                .collect()
        } else {
            sc.sizes(&args)
        };
        let worker_sets: Vec<Option<usize>> = if args.server_workers.is_empty() {
            vec![None]
        } else {
            args.server_workers.iter().map(|&w| Some(w)).collect()
        };
        let mut knee_hit: Vec<Option<usize>> = Vec::new();
        let knee_started = Instant::now();
        for n in sizes {
            if knee_mode && knee_started.elapsed() > Duration::from_secs(args.knee_budget) {
                println!(
                    "knee: time budget of {} s spent, stopping",
                    args.knee_budget
                );
                break;
            }
            if knee_mode && worker_sets.iter().all(|w| knee_hit.contains(w)) {
                break;
            }
            if want_plaza {
                for &workers in &worker_sets {
                    if knee_hit.contains(&workers) {
                        continue;
                    }
                    let protocols =
                        if args.viewer == ViewerKind::Light && sc == Scenario::Livestream {
                            args.viewer_protocols.clone()
                        } else {
                            vec![ViewerProtocol::Ws]
                        };
                    for protocol in protocols {
                        println!(
                            "--- plaza{}{}, {} = {n}",
                            workers.map_or(String::new(), |w| format!(" --workers {w}")),
                            if protocol == ViewerProtocol::Whep {
                                " (WHEP viewers)"
                            } else {
                                ""
                            },
                            xlabel(sc)
                        );
                        let p = run_plaza(&args, sc, n, &logs, workers, protocol).await;
                        report_point(&p);
                        if knee_mode && p.light.as_ref().is_some_and(|l| l.knee) {
                            println!("knee reached at {n} viewers");
                            knee_hit.push(workers);
                        }
                        points.push(p);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
            if want_janus && let Some(ice) = &ice {
                println!("--- janus, {} = {n}", xlabel(sc));
                let p = run_janus(&args, sc, n, &logs, ice).await;
                report_point(&p);
                points.push(p);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        all_ok &= points.iter().all(|p| p.ok);
        let tbl = table(&points);
        let rat = ratios(&points);
        let rtext = ratio_text(&rat);
        println!("\n{title}\n\n{tbl}\n{rtext}");
        let load: Vec<String> = points
            .iter()
            .filter_map(|p| p.loadavg_before.map(|l| format!("{:.1}", l[0])))
            .collect();
        let steal = points
            .iter()
            .filter_map(|p| p.host_steal_pct)
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
        let steal_text = steal.map_or_else(
            || "host steal time not available".to_owned(),
            |v| format!("host steal time ≤ {v:.1} % per point"),
        );
        let pacing_text = match args.peer.pacing() {
            media::Pacing::Burst => "publishers send each frame's packets at once".to_owned(),
            media::Pacing::Rate(f) => {
                format!("publishers pace each frame's packets at {f} × the clip's bitrate")
            }
        };
        let footer = format!(
            "{date} {time} UTC · {} × {} · git {} ({}) · {pin_text} · {} s per point · {pacing_text} · 1-min \
             load before each point: {} · {steal_text}",
            machine["nproc"],
            machine["cpu_model"].as_str().unwrap_or("?"),
            build["git_rev"].as_str().unwrap_or("?"),
            build["profile"].as_str().unwrap_or("?"),
            args.duration,
            load.join(", ")
        );
        let ltbl = light_table(&points);
        if !ltbl.is_empty() {
            println!("\nLight viewers:\n\n{ltbl}");
        }
        let md = format!(
            "### {title}\n\n{tbl}\n{ltbl}{rtext}\n<sub>{footer}. Command: `{command}`. µs/pkt = server \
             CPU time (all threads, /proc/&lt;pid&gt;) ÷ packets forwarded (Plaza: its \
             `rtp_packets_forwarded` counter; Janus: packets the subscribers received). Latency = \
             publisher `write_rtp` → subscriber track delivery of the same packet, both \
             webrtc-rs stacks included. In-core = the kernel's receive stamp → sendmmsg of the forwarded \
             packet inside Plaza, from its own histogram (Janus exports none). CPU wait = time the server's / load generator's \
             threads were runnable but waited for a core, % of the window (a busy shared \
             machine shows here). ⚠ = the point had failures (see the JSON).</sub>\n"
        );
        readme.push_str(&md);
        readme.push('\n');
        if !args.no_write {
            std::fs::create_dir_all(&args.out)?;
            let mut suffix = if args.simulcast && sc == Scenario::Livestream {
                "-simulcast".to_owned()
            } else {
                String::new()
            };
            if args.peer.pacing() != media::Pacing::Burst {
                suffix.push_str("-paced");
            }
            let base = if args.viewer == ViewerKind::Light && sc != Scenario::Audio {
                args.out.join(format!(
                    "{date}-{}-light-viewer-{}{suffix}{}",
                    build["git_rev"].as_str().unwrap_or("unknown"),
                    sc.name(),
                    if knee_mode { "-knee" } else { "" }
                ))
            } else {
                args.out.join(format!("{date}-{}{suffix}", sc.name()))
            };
            let doc = json!({
                "scenario": sc,
                "title": title,
                "date": date,
                "time_utc": time,
                "machine": machine,
                "build": build,
                "pinning": pins,
                "command": command,
                "args": args,
                "points": points,
                "ratios_plaza_over_janus": rat,
            });
            std::fs::write(
                base.with_extension("json"),
                serde_json::to_string_pretty(&doc)?,
            )?;
            std::fs::write(base.with_extension("md"), &md)?;
            std::fs::write(
                base.with_extension("svg"),
                chart(&title, xlabel(sc), &points, &footer),
            )?;
            println!("wrote {}.{{json,md,svg}}", base.display());
        }
    }
    // Light-viewer results are kept apart from the README's table (full peers).
    if !args.no_write && args.viewer == ViewerKind::Full {
        let path = args.out.join("README-table.md");
        std::fs::write(&path, readme_table(&args.out).unwrap_or(readme))?;
        println!("wrote {}", path.display());
    }
    println!("server logs in {}", logs.display());
    Ok(all_ok)
}

/// The README's benchmark section: the newest `<date>-<name>.md` of every scenario (and of the
/// micro-benchmarks) found in `dir`, so a partial run does not drop the others.
fn readme_table(dir: &Path) -> Option<String> {
    let names = [
        "audio",
        "meeting",
        "livestream",
        "livestream-simulcast",
        "micro",
    ];
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    files.sort();
    let mut out = String::new();
    for name in names {
        let suffix = format!("-{name}.md");
        // `<YYYY-MM-DD>-<name>.md`: the date is the first 10 characters.
        let newest = files
            .iter()
            .rev()
            .find(|f| f.len() == 10 + suffix.len() && f.ends_with(&suffix));
        if let Some(f) = newest
            && let Ok(text) = std::fs::read_to_string(dir.join(f))
        {
            out.push_str(text.trim_end());
            out.push_str(&format!("\n\n<sub>Source: `bench/results/{f}`.</sub>\n\n"));
        }
    }
    (!out.is_empty()).then_some(out)
}

fn report_point(p: &Point) {
    if let Some(m) = &p.measured {
        m.print();
    }
    println!(
        "join ready p50 {:.1} p99 {:.1} ms; DC RTT {}",
        p.join_ready_ms.p50,
        p.join_ready_ms.p99,
        p.dc_rtt_ms
            .as_ref()
            .filter(|d| d.count > 0)
            .map_or("n/a".into(), |d| format!(
                "p50 {:.1} p99 {:.1} ms (n={})",
                d.p50, d.p99, d.count
            ))
    );
    for f in &p.failures {
        println!("  FAIL {f}");
    }
}
