//! Plaza load tester: joins publishers (Opus + VP8 from files, also subscribing) and subscribers
//! to one room, exchanges data-channel messages, and reports media delivery, loss, join times and
//! data-channel latency.
//!
//! ```text
//! cargo run --release --example loadtest -- --url ws://127.0.0.1:7880/rtc --room demo \
//!     --publishers 2 --subscribers 4 --duration 10 --json report.json
//! ```
//!
//! Data channels: every peer sends, once per `--chat-interval-ms`, a `ping` on `chat` addressed
//! to one other peer (round robin) and an `input` message to the same peer; the receiver of a
//! ping answers `pong` to its sender. Reported: chat round-trip time (ping → pong, through the
//! server twice) and one-way latency of chat and input (receive time − send time; all peers run
//! in this process, so they share one monotonic clock).
//!
//! Media delivery: over the measured window every publisher counts the packets it wrote and
//! every subscriber the packets it received of each track; delivery = received / written, per
//! track, per subscriber and in total, next to the gap-based loss (which cannot see a stream
//! that stops). The window starts once every peer receives every track and ends by pausing the
//! publishers, then waiting (bounded by `--drain-ms`) for the packets still in flight, so an
//! honest run reads ~100 % (see `common::delivery`). Simulcast video has no delivery figure (a
//! subscriber receives one of several layers); subscribers behind `--subscriber-bandwidth` are
//! reported but not held to `--min-delivery`.
//!
//! Exit status is non-zero, with one `FAIL:` line per peer and reason, when a peer failed to
//! join; when the server removed a peer (a `leave` from the server, its WebSocket closing, a
//! peer connection going `failed` / `closed`) before the run ended; when a peer got a server
//! `error` not allowed by `--expect-error`; when a subscriber's delivery of a track fell below
//! `--min-delivery`; when a peer that should have received media (there are publishers other
//! than itself) received none; or when a peer received no chat message although other peers
//! exist. When every peer is removed the run stops early.
//!
//! Simulcast (`--simulcast`): publishers send three VP8 layers (q 320x180, h 640x360, f
//! 1280x720; RIDs offered in `--rid-order`). Subscribers may ask for a layer
//! (`--preferred-layer`), switch between low and that layer every `--switch-every` seconds, and
//! receive through a bottleneck (`--subscriber-bandwidth 300kbps`, for the first
//! `--limited-subscribers` only if given), from the start or from `--cut-at` seconds into the
//! run (until `--restore-at`). Reported per subscriber video track: the sizes received
//! (frames and packets by resolution), `layer_changed` count, continuity; switch latency
//! (`track_settings` → first packet of the new size, p50/p99, by target layer); time to
//! downgrade after the cut (and to upgrade after the restore); keyframe requests each publisher
//! layer received (count and per minute).
//!
//! ```text
//! cargo run --release --example loadtest -- --publishers 1 --subscribers 10 --simulcast \
//!     --switch-every 2 --duration 20 --json switch.json
//! cargo run --release --example loadtest -- --publishers 1 --subscribers 4 --simulcast \
//!     --subscriber-bandwidth 400kbps --limited-subscribers 2 --warmup 30 --cut-at 5 \
//!     --restore-at 15 --duration 30
//! ```

// A tool, not the packet path: shares state between tasks, reads the clock and prints its
// report.
#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    clippy::print_stdout
)]

use plaza_testkit as common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use common::cli::{self, PeerArgs};
use common::delivery::{self, Window};
use common::layers::{self, SwitchRequest, Target};
use common::measure::{self, Sorted, Summary, now_us};
use common::{
    Channel, DataMessage, LocalTrackStats, Peer, PeerOptions, RemoteTrackStats, SimulcastOptions,
};
use futures_util::StreamExt;
use futures_util::future::join_all;
use plaza::signal::{ErrorCode, Quality, TrackKind};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;

#[derive(Parser, Debug, Clone, Serialize)]
#[command(about = "Plaza load tester: synthetic publishers and subscribers in one room")]
struct Args {
    /// Signaling WebSocket URL.
    #[arg(long, default_value = "ws://127.0.0.1:7880/rtc")]
    url: String,
    /// Room to join.
    #[arg(long, default_value = "loadtest")]
    room: String,
    /// Peers that publish audio + video (they also subscribe).
    #[arg(long, default_value_t = 2)]
    publishers: usize,
    /// Peers that only subscribe.
    #[arg(long, default_value_t = 4)]
    subscribers: usize,
    /// Seconds of measured traffic after everyone joined.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Write a JSON report here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Bound of each connect step (WebSocket, join, negotiation, connection), seconds.
    #[arg(long, default_value_t = 10)]
    timeout: u64,
    /// How long to wait, after joining, for every peer to receive every track, seconds.
    #[arg(long, default_value_t = 20)]
    join_timeout: u64,
    #[command(flatten)]
    #[serde(flatten)]
    peer: PeerArgs,
    /// VP8 IVF file to publish (default: assets/video_320x240_vp8.ivf).
    #[arg(long)]
    video: Option<PathBuf>,
    /// Ogg Opus file to publish (default: assets/audio_sine_opus.ogg).
    #[arg(long)]
    audio: Option<PathBuf>,
    /// Pid of the server when it runs on this machine: its CPU time and RSS are read from
    /// /proc/<pid> (CPU time per forwarded packet, RSS per participant).
    #[arg(long)]
    server_pid: Option<u32>,
    /// The server's metrics URL (counters + its own CPU time and RSS; works remotely).
    /// Default: http://<host:port of --url>/metrics, falling back to /healthz (counters only).
    #[arg(long)]
    metrics_url: Option<String>,
    /// Publishers send simulcast video: three layers (q 320x180, h 640x360, f 1280x720).
    #[arg(long)]
    simulcast: bool,
    /// Order of the RIDs in the publishers' offers: standard (q,h,f), reversed, random.
    #[arg(long, default_value = "random")]
    rid_order: String,
    /// Receive-bandwidth limit of subscribers (e.g. 300kbps, 1.5Mbps), enforced on their
    /// receive path by a local bottleneck relay.
    #[arg(long)]
    subscriber_bandwidth: Option<String>,
    /// Limit only the first N subscribers (default: all of them).
    #[arg(long)]
    limited_subscribers: Option<usize>,
    /// When subscribers ask for a keyframe (PLI) of video they cannot decode: off (a webrtc-rs
    /// peer), libwebrtc (a browser: 200 ms without a decodable frame before the first one,
    /// 3 s after), eager[:MS] (also when a gap stays unrepaired for MS, default 100).
    #[arg(long, default_value = "libwebrtc")]
    subscriber_pli: common::decoder::PliPolicy,
    /// Subscribers ask for this layer of every simulcast track (low, medium, high).
    #[arg(long)]
    preferred_layer: Option<String>,
    /// Subscribers alternate their preferred layer every SECS: low and --preferred-layer
    /// (high if not given, or if that is low).
    #[arg(long)]
    switch_every: Option<f64>,
    /// The limited subscribers receive without limit until SECS into the run, then at
    /// --subscriber-bandwidth (time to downgrade is measured).
    #[arg(long)]
    cut_at: Option<f64>,
    /// ... and without limit again from SECS into the run (time to upgrade is measured).
    #[arg(long)]
    restore_at: Option<f64>,
    /// Before the run, wait up to SECS for every subscriber to receive its preferred layer
    /// (the top one by default) of every simulcast track, and keep it for 2 s.
    #[arg(long, default_value_t = 0.0)]
    warmup: f64,
    /// Queue bound of the bandwidth limit, milliseconds (beyond it packets are dropped).
    #[arg(long, default_value_t = 200)]
    bottleneck_queue_ms: u64,
    /// Fail when a subscriber received less than this percentage of the packets a publisher
    /// wrote during the window, for any track (simulcast video and bandwidth-limited
    /// subscribers excepted).
    #[arg(long, default_value_t = 95.0)]
    min_delivery: f64,
    /// At the end of the window the publishers stop writing; wait at most this long for the
    /// packets still in flight, milliseconds.
    #[arg(long, default_value_t = 1000)]
    drain_ms: u64,
    /// A server error code this run expects (e.g. rate_limited); repeatable. Any other server
    /// `error` a peer receives fails the run.
    #[arg(long)]
    expect_error: Vec<String>,
}

#[derive(Debug, Default, Clone)]
struct DcCounters {
    chat_sent: u64,
    input_sent: u64,
    pings_received: u64,
    pongs_received: u64,
    input_received: u64,
    other_received: u64,
    send_errors: u64,
    last_send_error: Option<String>,
    lagged: u64,
    rtt_ms: Vec<f64>,
    chat_one_way_ms: Vec<f64>,
    input_one_way_ms: Vec<f64>,
}

impl DcCounters {
    fn chat_received(&self) -> u64 {
        self.pings_received + self.pongs_received
    }
}

#[derive(Debug, Serialize, Default, Clone)]
struct LatencySummary {
    count: usize,
    min: f64,
    p50: f64,
    p95: f64,
    p99: f64,
    max: f64,
    mean: f64,
}

fn summarize(values: &[f64]) -> LatencySummary {
    let Some(v) = Sorted::new(values) else {
        return LatencySummary::default();
    };
    LatencySummary {
        count: v.count(),
        min: v.min(),
        p50: v.pct(50.0),
        p95: v.pct(95.0),
        p99: v.pct(99.0),
        max: v.max(),
        mean: v.mean(),
    }
}

struct Member {
    peer: Arc<Peer>,
    publisher: bool,
    /// Behind the bandwidth limit.
    limited: bool,
    dc: Arc<Mutex<DcCounters>>,
}

#[derive(Serialize)]
struct TrackReport {
    subscriber: String,
    subscriber_id: String,
    publisher: String,
    publisher_id: String,
    track_id: String,
    kind: TrackKind,
    packets_sent: Option<u64>,
    packets_received: u64,
    bytes_received: u64,
    packets_expected: u64,
    packets_lost: u64,
    loss_percent: f64,
    /// Over the measured window: packets the publisher wrote, packets this subscriber
    /// received, and delivery (None: simulcast video, or no publisher in this run).
    window_expected: Option<u64>,
    window_received: Option<u64>,
    delivery_percent: Option<f64>,
    keyframes_received: u64,
    join_time_ms: Option<f64>,
    max_interarrival_ms: f64,
    ended: bool,
}

#[derive(Serialize)]
struct PeerReport {
    name: String,
    participant_id: String,
    role: &'static str,
    join_ms: f64,
    tracks_expected: usize,
    tracks_received: usize,
    packets_received: u64,
    /// Over the measured window, the plain tracks this peer subscribes to: packets written by
    /// their publishers, packets received, delivery.
    window_expected: u64,
    window_received: u64,
    delivery_percent: Option<f64>,
    /// Why and when (seconds from the start of the run) the server removed this peer.
    removed: Option<String>,
    removed_at_s: Option<f64>,
    chat_sent: u64,
    chat_received: u64,
    input_sent: u64,
    input_received: u64,
    send_errors: u64,
    last_send_error: Option<String>,
    subscribe_offers: u64,
    subscribe_answers: u64,
    negotiation_errors: Vec<String>,
    server_errors: Vec<String>,
    published: Vec<Value>,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Err(e) = args.peer.install_signing_key() {
        return cli::exit_with("loadtest", Err(e));
    }
    cli::exit_with("loadtest", run(args).await);
}

async fn run(args: Args) -> Result<bool> {
    now_us();
    let mut recorder = common::measure::Recorder::start(common::measure::ServerSource::plaza(
        &args.url,
        args.server_pid,
        args.metrics_url.clone(),
    ))
    .await;
    let started = Instant::now();
    let timeout = Duration::from_secs(args.timeout.max(1));
    let mut base = PeerOptions {
        timeout,
        keep_recent_packets: 0,
        max_kept_messages: 1,
        ..PeerOptions::default()
    };
    if let Some(v) = &args.video {
        base.video_file = v.clone();
    }
    if let Some(a) = &args.audio {
        base.audio_file = a.clone();
    }
    // Fail fast on unreadable media.
    if args.publishers > 0 {
        common::media::Clip::load(&base.video_file)?;
        common::media::Clip::load(&base.audio_file)?;
    }
    let sc = SimulcastArgs::from_args(&args)?;
    if !(0.0..=100.0).contains(&args.min_delivery) {
        anyhow::bail!(
            "--min-delivery {}: a percentage (0 … 100)",
            args.min_delivery
        );
    }
    let expected_errors: Vec<ErrorCode> = args
        .expect_error
        .iter()
        .map(|c| {
            serde_json::from_value(Value::String(c.clone())).map_err(|_| {
                anyhow::anyhow!("--expect-error {c}: not an error code (e.g. rate_limited)")
            })
        })
        .collect::<Result<_>>()?;
    if args.simulcast {
        let layers = SimulcastOptions::standard();
        for (_, file) in &layers.layers {
            common::media::Clip::load(file)?;
        }
    }

    println!(
        "loadtest: {} publishers + {} subscribers → {} room {:?}, {} s of traffic",
        args.publishers, args.subscribers, args.url, args.room, args.duration
    );
    let mut failures: Vec<String> = Vec::new();

    // Publishers first (their tracks exist when subscribers arrive), then subscribers.
    let mut members: Vec<Member> = Vec::new();
    for (role_pub, count, prefix) in [
        (true, args.publishers, "pub"),
        (false, args.subscribers, "sub"),
    ] {
        let joins = futures_util::stream::iter((1..=count).map(|i| {
            let name = format!("{prefix}-{i}");
            let limited = !role_pub && sc.limited(i);
            let opts = PeerOptions {
                publish_audio: role_pub,
                publish_video: role_pub,
                simulcast: (role_pub && args.simulcast).then(|| sc.rid_order(args.simulcast)),
                subscriber_bandwidth_bps: limited.then_some(sc.initial_rate()),
                subscriber_max_queue_delay: Duration::from_millis(args.bottleneck_queue_ms),
                pli_policy: args.subscriber_pli,
                ..base.clone()
            };
            let (url, room) = (args.url.clone(), args.room.clone());
            async move {
                let r = Peer::connect(&url, &room, &name, opts).await;
                (name, limited, r)
            }
        }))
        .buffer_unordered(args.peer.join_concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
        for (name, limited, r) in joins {
            match r {
                Ok(peer) => {
                    println!(
                        "  joined {name} as {} in {:.1} ms",
                        peer.participant_id(),
                        ms(peer.joined().join_latency)
                    );
                    members.push(Member {
                        peer: Arc::new(peer),
                        publisher: role_pub,
                        limited,
                        dc: Arc::default(),
                    });
                }
                Err(e) => {
                    eprintln!("  {name}: {e:#}");
                    failures.push(format!("{name}: join failed: {e:#}"));
                }
            }
        }
    }
    members.sort_by(|a, b| a.peer.name().cmp(b.peer.name()));
    let publisher_ids: Vec<String> = members
        .iter()
        .filter(|m| m.publisher)
        .map(|m| m.peer.participant_id().to_owned())
        .collect();
    let expected_tracks = |m: &Member| {
        let others = publisher_ids
            .iter()
            .filter(|id| id.as_str() != m.peer.participant_id())
            .count();
        2 * others
    };

    if members.is_empty() {
        for f in &failures {
            eprintln!("FAIL: {f}");
        }
        eprintln!("no peer joined; nothing to measure");
        return Ok(false);
    }

    // Wait (bounded) for everyone to receive every track.
    let join_wait = Duration::from_secs(args.join_timeout);
    let waits = members.iter().map(|m| {
        let n = expected_tracks(m);
        async move {
            if n == 0 {
                return Ok(());
            }
            m.peer.wait_for_tracks(n, join_wait).await.map(|_| ())
        }
    });
    for (m, r) in members.iter().zip(join_all(waits).await) {
        if let Err(e) = r {
            eprintln!("  {}: {e:#}", m.peer.name());
        }
    }
    println!(
        "all joined after {:.1} s; running traffic for {} s",
        started.elapsed().as_secs_f64(),
        args.duration
    );

    // Simulcast: the video tracks each subscriber receives from simulcast publishers, its
    // preferred layer, and the warm-up.
    let targets = simulcast_targets(&members);
    if let Some(q) = sc.preferred {
        for t in &targets {
            if let Err(e) = t
                .subscriber
                .track_settings(&t.track_id, Some(q), None, None)
                .await
            {
                eprintln!("  {}: track_settings: {e:#}", t.subscriber.name());
            }
        }
    }
    if args.warmup > 0.0 && !targets.is_empty() {
        let want = sc.preferred.unwrap_or(Quality::High);
        let bound = Duration::from_secs_f64(args.warmup);
        let t0 = Instant::now();
        let limited_now = sc.initial_rate() > 0;
        let waits = targets.iter().filter_map(|t| {
            let size = t.sizes.get(&want).copied()?;
            let limited = members
                .iter()
                .any(|m| m.limited && Arc::ptr_eq(&m.peer, &t.subscriber));
            if limited && limited_now {
                return None;
            }
            Some(async move {
                t.subscriber
                    .wait_for_track_state(
                        &t.track_id,
                        "warm-up",
                        // Kept for 2 s: a new subscriber gets the top layer at once and drops
                        // when the first bandwidth estimate arrives.
                        |s| {
                            s.resolution == Some(size)
                                && s.resolution_changes
                                    .last()
                                    .is_some_and(|c| c.at.elapsed() >= Duration::from_secs(2))
                        },
                        bound,
                    )
                    .await
                    .is_ok()
            })
        });
        let done = join_all(waits).await;
        println!(
            "warm-up: {}/{} tracks on {want:?} after {:.1} s",
            done.iter().filter(|ok| **ok).count(),
            done.len(),
            t0.elapsed().as_secs_f64()
        );
    }

    // Traffic.
    let ids: Vec<String> = members
        .iter()
        .map(|m| m.peer.participant_id().to_owned())
        .collect();
    let run_for = Duration::from_secs(args.duration);
    let interval = Duration::from_millis(args.peer.chat_interval_ms.max(10));
    // Set when every peer was removed: the run stops early.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let traffic = members.iter().enumerate().map(|(i, m)| {
        let targets: Vec<String> = ids
            .iter()
            .filter(|id| id.as_str() != m.peer.participant_id())
            .cloned()
            .collect();
        peer_traffic(
            m.peer.clone(),
            m.dc.clone(),
            targets,
            i,
            run_for,
            interval,
            stop_rx.clone(),
        )
    });
    let peers: Vec<Arc<Peer>> = members.iter().map(|m| m.peer.clone()).collect();
    common::measure::map_plaza_probe(&peers);
    let totals = common::measure::plaza_client_totals(&peers);
    recorder.joined(members.len(), totals).await;
    let progress_peers = peers.clone();
    recorder
        .begin(
            "loadtest",
            Arc::new(move || common::measure::plaza_client_totals(&progress_peers)),
        )
        .await;
    let traffic_start = Instant::now();
    let deadline = tokio::time::Instant::now() + run_for;
    let mut window = Window::start(&peers, |p| {
        !members
            .iter()
            .any(|m| m.limited && std::ptr::eq(Arc::as_ptr(&m.peer), p))
    });
    let drain_bound = Duration::from_millis(args.drain_ms);
    let window_end = async {
        let all_removed = async {
            let bound = run_for + Duration::from_secs(1);
            let removed = join_all(peers.iter().map(|p| p.wait_removed(bound))).await;
            if removed.iter().any(|r| r.is_err()) {
                std::future::pending::<()>().await;
            }
        };
        let early = tokio::select! {
            _ = tokio::time::sleep_until(deadline) => false,
            _ = all_removed => true,
        };
        if early {
            println!(
                "every peer was removed {:.1} s into the run; stopping",
                traffic_start.elapsed().as_secs_f64()
            );
            let _ = stop_tx.send(true);
        }
        window.end();
        let drained = window.drain(drain_bound).await;
        (window.finish(), drained)
    };
    let keyframes_at_start: Vec<(Arc<Peer>, Vec<LocalTrackStats>)> = members
        .iter()
        .filter(|m| m.publisher)
        .map(|m| (m.peer.clone(), m.peer.local_tracks()))
        .collect();
    let switching = async {
        match sc.switch_every {
            Some(every) if !targets.is_empty() => {
                let (a, b) = sc.switch_pair();
                tokio::select! {
                    r = layers::run_switches(targets.clone(), a, b, every, deadline) => r,
                    _ = stopped(stop_rx.clone()) => Vec::new(),
                }
            }
            _ => Vec::new(),
        }
    };
    let limited_peers: Vec<Arc<Peer>> = members
        .iter()
        .filter(|m| m.limited)
        .map(|m| m.peer.clone())
        .collect();
    let rate_changes = async {
        tokio::select! {
            r = rate_schedule(&sc, &limited_peers, run_for) => r,
            _ = stopped(stop_rx.clone()) => (None, None),
        }
    };
    let (_, requests, (cut_at, restore_at), (flows, drained)) =
        tokio::join!(join_all(traffic), switching, rate_changes, window_end);
    let traffic_window = traffic_start.elapsed();
    let window_length = window.length();
    // Removals and unexpected errors, before our own `leave` ends every session.
    let removals: Vec<(String, common::Removal)> = members
        .iter()
        .filter_map(|m| Some((m.peer.name().to_owned(), m.peer.removed()?)))
        .collect();
    for (name, r) in &removals {
        failures.push(format!(
            "{name}: removed by the server {}: {}",
            relative(r.at, traffic_start),
            r.reason
        ));
    }
    for m in &members {
        let unexpected: Vec<String> = m
            .peer
            .server_errors()
            .into_iter()
            .filter(|(c, _)| !expected_errors.contains(c))
            .map(|(c, msg)| format!("{c:?}: {msg}"))
            .collect();
        if let Some(first) = unexpected.first() {
            failures.push(format!(
                "{}: {} unexpected server error(s), first {first}",
                m.peer.name(),
                unexpected.len()
            ));
        }
    }
    let delivery_total = delivery::totals(&flows);
    for m in &members {
        let name = m.peer.name();
        let low: Vec<&delivery::Flow> = flows
            .iter()
            .filter(|f| f.subscriber == name && f.checked)
            .filter(|f| f.delivery_percent.is_some_and(|p| p < args.min_delivery))
            .collect();
        if !low.is_empty() {
            let mine = delivery::totals(flows.iter().filter(|f| f.subscriber == name));
            failures.push(format!(
                "{name}: delivery {:.1}% < {}% over the {:.1} s window: {}",
                mine.delivery_percent.unwrap_or(0.0),
                args.min_delivery,
                window_length.as_secs_f64(),
                low.iter()
                    .map(|f| format!(
                        "{} {} {} of {}",
                        f.publisher,
                        kind_name(f.kind),
                        f.received.min(f.expected),
                        f.expected
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    let measured = recorder
        .end(common::measure::plaza_client_totals(&peers))
        .await;
    let joins = common::measure::plaza_join_summary(&peers);
    let simulcast = (args.simulcast || sc.rate.is_some()).then(|| {
        simulcast_report(
            &members,
            &peers,
            &requests,
            &sc,
            cut_at,
            restore_at,
            &keyframes_at_start,
            traffic_window,
        )
    });
    if let Some(r) = &simulcast {
        failures.extend(r.failures.iter().cloned());
    }

    // Report.
    let peers_by_id: BTreeMap<String, &Member> = members
        .iter()
        .map(|m| (m.peer.participant_id().to_owned(), m))
        .collect();
    let mut tracks: Vec<TrackReport> = Vec::new();
    let mut peer_reports: Vec<PeerReport> = Vec::new();
    let mut all_rtt = Vec::new();
    let mut all_chat_ow = Vec::new();
    let mut all_input_ow = Vec::new();
    let (mut chat_sent, mut chat_recv, mut input_sent, mut input_recv) = (0, 0, 0, 0);
    for m in &members {
        let peer = &m.peer;
        let stats = peer.stats();
        let room_tracks = peer.room_tracks();
        let dc = m.dc.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let origin = peer.ws_opened_at();
        let mut received_tracks = 0;
        let mut packets_received = 0;
        for t in &stats.remote_tracks {
            if t.packets > 0 {
                received_tracks += 1;
            }
            packets_received += t.packets;
            let mut r = track_report(m, t, &room_tracks, &peers_by_id, origin);
            if let Some(f) = flows
                .iter()
                .find(|f| f.subscriber == peer.name() && f.track_id == t.track_id)
            {
                r.window_expected = Some(f.expected);
                r.window_received = Some(f.received);
                r.delivery_percent = f.delivery_percent;
            }
            tracks.push(r);
        }
        let mine = delivery::totals(flows.iter().filter(|f| f.subscriber == peer.name()));
        let removal = removals
            .iter()
            .find(|(n, _)| n == peer.name())
            .map(|(_, r)| r);
        let expected = expected_tracks(m);
        if expected > 0 && packets_received == 0 {
            failures.push(format!("{}: received no media", peer.name()));
        }
        if members.len() > 1 && dc.chat_received() == 0 {
            failures.push(format!("{}: received no chat message", peer.name()));
        }
        all_rtt.extend_from_slice(&dc.rtt_ms);
        all_chat_ow.extend_from_slice(&dc.chat_one_way_ms);
        all_input_ow.extend_from_slice(&dc.input_one_way_ms);
        chat_sent += dc.chat_sent;
        chat_recv += dc.chat_received();
        input_sent += dc.input_sent;
        input_recv += dc.input_received;
        peer_reports.push(PeerReport {
            name: peer.name().to_owned(),
            participant_id: peer.participant_id().to_owned(),
            role: if m.publisher {
                "publisher"
            } else {
                "subscriber"
            },
            join_ms: ms(peer.joined().join_latency),
            tracks_expected: expected,
            tracks_received: received_tracks,
            packets_received,
            window_expected: mine.expected,
            window_received: mine.received,
            delivery_percent: mine.delivery_percent,
            removed: removal.map(|r| r.reason.clone()),
            removed_at_s: removal.map(|r| match r.at.checked_duration_since(traffic_start) {
                Some(d) => d.as_secs_f64(),
                None => -traffic_start.duration_since(r.at).as_secs_f64(),
            }),
            chat_sent: dc.chat_sent,
            chat_received: dc.chat_received(),
            input_sent: dc.input_sent,
            input_received: dc.input_received,
            send_errors: dc.send_errors,
            last_send_error: dc.last_send_error.clone(),
            subscribe_offers: stats.negotiation.subscribe_offers,
            subscribe_answers: stats.negotiation.subscribe_answers,
            negotiation_errors: stats.negotiation.errors.clone(),
            server_errors: peer
                .server_errors()
                .into_iter()
                .map(|(c, msg)| format!("{c:?}: {msg}"))
                .collect(),
            published: stats
                .local_tracks
                .iter()
                .map(|l| {
                    json!({
                        "kind": l.kind,
                        "client_track_id": l.client_track_id,
                        "server_track_id": l.server_track_id,
                        "packets_sent": l.counters.packets,
                        "bytes_sent": l.counters.bytes,
                        "frames_sent": l.counters.frames,
                        "keyframes_sent": l.counters.keyframes,
                        "keyframe_requests": l.counters.keyframe_requests,
                        "write_errors": l.counters.write_errors,
                    })
                })
                .collect(),
        });
    }

    // Leave (bounded, concurrently).
    join_all(members.iter().map(|m| async move {
        let _ = tokio::time::timeout(Duration::from_secs(5), m.peer.leave()).await;
    }))
    .await;

    let rtt = summarize(&all_rtt);
    let chat_ow = summarize(&all_chat_ow);
    let input_ow = summarize(&all_input_ow);
    print_summary(&peer_reports, &tracks, &rtt, &chat_ow, &input_ow);
    println!(
        "data channels: chat sent {chat_sent} / received {chat_recv}, input sent {input_sent} / received {input_recv}"
    );

    let gap_loss = {
        let (exp, lost) = tracks.iter().fold((0, 0), |(e, l), t| {
            (e + t.packets_expected, l + t.packets_lost)
        });
        if exp > 0 {
            100.0 * lost as f64 / exp as f64
        } else {
            0.0
        }
    };
    let pct = |p: Option<f64>| p.map_or("-".to_owned(), |p| format!("{p:.2}%"));
    println!(
        "media delivery over the {:.1} s window: received {} of {} packets written (× subscribers) \
         = {} (lowest track {}; threshold {}%; drained in {:.1} ms); gap-based loss {gap_loss:.2}%",
        window_length.as_secs_f64(),
        delivery_total.received,
        delivery_total.expected,
        pct(delivery_total.delivery_percent),
        pct(delivery_total.min_flow_percent),
        args.min_delivery,
        ms(drained),
    );
    if !removals.is_empty() {
        println!(
            "removed by the server: {} of {} peers",
            removals.len(),
            members.len()
        );
    }
    measured.print();
    if let Some(r) = &simulcast {
        r.print();
    }
    for (name, s) in [
        ("join: ready (ms)", &joins.ready_ms),
        ("join: signaling (ms)", &joins.signaling_ms),
        ("join: first media (ms)", &joins.first_media_ms),
    ] {
        println!(
            "{name:<24} n={:<6} p50 {:>7.1} p90 {:>7.1} p99 {:>7.1} max {:>7.1}",
            s.count, s.p50, s.p90, s.p99, s.max
        );
    }

    let ok = failures.is_empty();
    if let Some(path) = &args.json {
        let report = json!({
            "server": measured,
            "join_ms": joins,
            "args": args,
            "ok": ok,
            "failures": failures,
            "wall_time_s": started.elapsed().as_secs_f64(),
            "simulcast": simulcast.as_ref().map(|r| &r.json),
            "peers": peer_reports,
            "tracks": tracks,
            "delivery": {
                "window_s": window_length.as_secs_f64(),
                "drained_ms": ms(drained),
                "min_delivery_percent": args.min_delivery,
                "expected": delivery_total.expected,
                "received": delivery_total.received,
                "delivery_percent": delivery_total.delivery_percent,
                "min_track_percent": delivery_total.min_flow_percent,
                "gap_loss_percent": gap_loss,
                "flows": flows,
                "note": "per (subscriber, track): packets the publisher wrote in the window vs. \
                         packets the subscriber received (capped at written); simulcast video \
                         has none",
            },
            "removed": removals.iter().map(|(name, r)| json!({
                "peer": name,
                "reason": r.reason,
                "at_s": match r.at.checked_duration_since(traffic_start) {
                    Some(d) => d.as_secs_f64(),
                    None => -traffic_start.duration_since(r.at).as_secs_f64(),
                },
            })).collect::<Vec<_>>(),
            "data_channel": {
                "chat_sent": chat_sent,
                "chat_received": chat_recv,
                "input_sent": input_sent,
                "input_received": input_recv,
                "chat_rtt_ms": rtt,
                "chat_one_way_ms": chat_ow,
                "input_one_way_ms": input_ow,
                "note": "one-way = receive - send on the one monotonic clock of this process",
            },
        });
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    if ok {
        println!("OK");
    } else {
        for f in &failures {
            eprintln!("FAIL: {f}");
        }
    }
    Ok(ok)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn track_report(
    m: &Member,
    t: &RemoteTrackStats,
    room_tracks: &[plaza::signal::TrackInfo],
    peers_by_id: &BTreeMap<String, &Member>,
    origin: Instant,
) -> TrackReport {
    let info = room_tracks.iter().find(|i| i.id == t.track_id);
    let publisher_id = info
        .map(|i| i.participant_id.clone())
        .unwrap_or_else(|| t.stream_id.clone());
    let publisher = peers_by_id.get(&publisher_id);
    let packets_sent = publisher.and_then(|p| {
        let locals = p.peer.local_tracks();
        let by_client = info.and_then(|i| {
            locals
                .iter()
                .find(|l| l.client_track_id == i.client_track_id)
        });
        by_client
            .or_else(|| locals.iter().find(|l| l.kind == t.kind))
            .map(|l| l.counters.packets)
    });
    TrackReport {
        subscriber: m.peer.name().to_owned(),
        subscriber_id: m.peer.participant_id().to_owned(),
        publisher: publisher
            .map(|p| p.peer.name().to_owned())
            .unwrap_or_else(|| "?".to_owned()),
        publisher_id,
        track_id: t.track_id.clone(),
        kind: info.map(|i| i.kind).unwrap_or(t.kind),
        packets_sent,
        packets_received: t.packets,
        bytes_received: t.bytes,
        packets_expected: t.expected(),
        packets_lost: t.lost(),
        loss_percent: t.loss_percent(),
        window_expected: None,
        window_received: None,
        delivery_percent: None,
        keyframes_received: t.keyframes,
        join_time_ms: t
            .first_packet_at
            .map(|f| ms(f.saturating_duration_since(origin))),
        max_interarrival_ms: ms(t.max_interarrival),
        ended: t.ended,
    }
}

/// One peer's data-channel traffic for `run_for`, plus a short grace period for replies.
async fn peer_traffic(
    peer: Arc<Peer>,
    dc: Arc<Mutex<DcCounters>>,
    targets: Vec<String>,
    offset: usize,
    run_for: Duration,
    interval: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let deadline = tokio::time::Instant::now() + run_for;
    let grace = deadline + Duration::from_secs(2);
    let mut rx = peer.subscribe_messages();
    let receiver = {
        let (peer, dc) = (peer.clone(), dc.clone());
        async move {
            loop {
                let msg = match tokio::time::timeout_at(grace, rx.recv()).await {
                    Err(_) | Ok(Err(RecvError::Closed)) => break,
                    Ok(Err(RecvError::Lagged(n))) => {
                        lock(&dc).lagged += n;
                        continue;
                    }
                    Ok(Ok(m)) => m,
                };
                if tokio::time::timeout_at(grace, on_message(&peer, &dc, msg))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
    };
    let sender = async {
        if targets.is_empty() {
            return;
        }
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        loop {
            ticker.tick().await;
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            let to = targets[(offset + seq as usize) % targets.len()].clone();
            let ping = json!({"lt": "ping", "seq": seq, "t_us": now_us()}).to_string();
            let r = bounded_send(grace, peer.send_chat(&ping, Some(vec![to.clone()]))).await;
            record_send(&dc, r, true);
            let input = json!({"lt": "input", "seq": seq, "t_us": now_us()}).to_string();
            let r = bounded_send(grace, peer.send_input(input.as_bytes(), Some(vec![to]))).await;
            record_send(&dc, r, false);
            seq += 1;
        }
    };
    tokio::select! {
        _ = async { tokio::join!(receiver, sender) } => {}
        _ = stopped(stop) => {}
    }
}

/// Returns once `stop` is set (never if its sender is gone unset).
async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    if stop.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// `at` relative to the start of the run, in words.
fn relative(at: Instant, start: Instant) -> String {
    match at.checked_duration_since(start) {
        Some(d) => format!("{:.1} s into the run", d.as_secs_f64()),
        None => format!(
            "{:.1} s before the run started",
            start.duration_since(at).as_secs_f64()
        ),
    }
}

fn kind_name(k: TrackKind) -> &'static str {
    match k {
        TrackKind::Audio => "audio",
        TrackKind::Video => "video",
    }
}

async fn bounded_send(
    deadline: tokio::time::Instant,
    send: impl std::future::Future<Output = Result<()>>,
) -> Result<()> {
    tokio::time::timeout_at(deadline, send)
        .await
        .unwrap_or_else(|_| Err(anyhow::anyhow!("send still pending at the end of the run")))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn record_send(dc: &Mutex<DcCounters>, r: Result<()>, chat: bool) {
    let mut c = lock(dc);
    match r {
        Ok(()) if chat => c.chat_sent += 1,
        Ok(()) => c.input_sent += 1,
        Err(e) => {
            c.send_errors += 1;
            c.last_send_error = Some(format!("{e:#}"));
        }
    }
}

async fn on_message(peer: &Peer, dc: &Mutex<DcCounters>, msg: DataMessage) {
    let now = now_us();
    let body: Option<Value> = serde_json::from_slice(&msg.payload).ok();
    let field = |k: &str| body.as_ref().and_then(|b| b.get(k)).cloned();
    let kind = field("lt").and_then(|v| v.as_str().map(str::to_owned));
    let sent_us = field("t_us").and_then(|v| v.as_u64());
    let one_way = sent_us.map(|t| now.saturating_sub(t) as f64 / 1000.0);
    match (msg.channel, kind.as_deref()) {
        (Channel::Chat, Some("ping")) => {
            {
                let mut c = lock(dc);
                c.pings_received += 1;
                c.chat_one_way_ms.extend(one_way);
            }
            if let (Some(from), Some(seq), Some(t)) = (msg.from, field("seq"), sent_us) {
                let pong = json!({"lt": "pong", "seq": seq, "t_us": t}).to_string();
                let r = peer.send_chat(&pong, Some(vec![from])).await;
                record_send(dc, r, true);
            }
        }
        (Channel::Chat, Some("pong")) => {
            let mut c = lock(dc);
            c.pongs_received += 1;
            c.rtt_ms.extend(one_way);
        }
        (Channel::Input, Some("input")) => {
            let mut c = lock(dc);
            c.input_received += 1;
            c.input_one_way_ms.extend(one_way);
        }
        _ => lock(dc).other_received += 1,
    }
}

fn print_summary(
    peers: &[PeerReport],
    tracks: &[TrackReport],
    rtt: &LatencySummary,
    chat_ow: &LatencySummary,
    input_ow: &LatencySummary,
) {
    println!();
    println!(
        "{:<8} {:<12} {:>8} {:>9} {:>10} {:>8} {:>10} {:>10} {:>6}  state",
        "peer", "role", "join ms", "tracks", "pkts recv", "deliv%", "chat s/r", "input s/r", "errs"
    );
    for p in peers {
        println!(
            "{:<8} {:<12} {:>8.1} {:>9} {:>10} {:>8} {:>10} {:>10} {:>6}  {}",
            p.name,
            p.role,
            p.join_ms,
            format!("{}/{}", p.tracks_received, p.tracks_expected),
            p.packets_received,
            p.delivery_percent
                .map_or("-".to_owned(), |d| format!("{d:.2}")),
            format!("{}/{}", p.chat_sent, p.chat_received),
            format!("{}/{}", p.input_sent, p.input_received),
            p.send_errors + p.server_errors.len() as u64 + p.negotiation_errors.len() as u64,
            match (&p.removed, p.removed_at_s) {
                (Some(r), Some(at)) => format!("REMOVED at {at:.1} s: {r}"),
                _ => "ok".to_owned(),
            }
        );
    }
    println!();
    println!(
        "{:<8} {:<8} {:<6} {:>9} {:>9} {:>9} {:>9} {:>8} {:>7} {:>8} {:>9}",
        "sub",
        "pub",
        "kind",
        "sent",
        "recv",
        "win sent",
        "win recv",
        "deliv%",
        "loss%",
        "keyfr",
        "join ms"
    );
    let opt = |v: Option<u64>| v.map_or("-".to_owned(), |n| n.to_string());
    for t in tracks {
        println!(
            "{:<8} {:<8} {:<6} {:>9} {:>9} {:>9} {:>9} {:>8} {:>7.2} {:>8} {:>9}",
            t.subscriber,
            t.publisher,
            kind_name(t.kind),
            t.packets_sent.map_or("?".to_owned(), |n| n.to_string()),
            t.packets_received,
            opt(t.window_expected),
            opt(t.window_received),
            t.delivery_percent
                .map_or("-".to_owned(), |d| format!("{d:.2}")),
            t.loss_percent,
            t.keyframes_received,
            t.join_time_ms.map_or("-".to_owned(), |j| format!("{j:.1}")),
        );
    }
    println!();
    for (name, s) in [
        ("chat rtt (ms)", rtt),
        ("chat one-way (ms)", chat_ow),
        ("input one-way (ms)", input_ow),
    ] {
        println!(
            "{name:<20} n={:<6} min {:>7.2} p50 {:>7.2} p95 {:>7.2} p99 {:>7.2} max {:>7.2}",
            s.count, s.min, s.p50, s.p95, s.p99, s.max
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = summarize(&v);
        assert_eq!((s.count, s.min, s.max), (100, 1.0, 100.0));
        assert_eq!(s.p50, 51.0);
        assert_eq!(s.p99, 99.0);
        assert_eq!(summarize(&[]).count, 0);
    }
}

// ───────────────────────────── simulcast ─────────────────────────────

/// The simulcast and bandwidth options, parsed and checked.
struct SimulcastArgs {
    rate: Option<u64>,
    limited: Option<usize>,
    cut_at: Option<Duration>,
    restore_at: Option<Duration>,
    preferred: Option<Quality>,
    switch_every: Option<Duration>,
    rid_order: String,
}

impl SimulcastArgs {
    fn from_args(a: &Args) -> Result<Self> {
        let rate = a
            .subscriber_bandwidth
            .as_deref()
            .map(layers::parse_rate)
            .transpose()?;
        let secs = |v: Option<f64>, what: &str| -> Result<Option<Duration>> {
            match v {
                None => Ok(None),
                Some(s) if s.is_finite() && s >= 0.0 => Ok(Some(Duration::from_secs_f64(s))),
                Some(s) => anyhow::bail!("--{what} {s}: not a number of seconds"),
            }
        };
        if (a.cut_at.is_some() || a.restore_at.is_some()) && rate.is_none() {
            anyhow::bail!("--cut-at / --restore-at need --subscriber-bandwidth");
        }
        if !matches!(a.rid_order.as_str(), "standard" | "reversed" | "random") {
            anyhow::bail!("--rid-order {}: standard, reversed or random", a.rid_order);
        }
        let switch_every = secs(a.switch_every, "switch-every")?;
        if switch_every.is_some_and(|d| d < Duration::from_millis(100)) {
            anyhow::bail!("--switch-every must be at least 0.1 s");
        }
        Ok(SimulcastArgs {
            rate,
            limited: a.limited_subscribers,
            cut_at: secs(a.cut_at, "cut-at")?,
            restore_at: secs(a.restore_at, "restore-at")?,
            preferred: a
                .preferred_layer
                .as_deref()
                .map(layers::parse_quality)
                .transpose()?,
            switch_every,
            rid_order: a.rid_order.clone(),
        })
    }

    /// Whether subscriber number `i` (1-based) is behind the bandwidth limit.
    fn limited(&self, i: usize) -> bool {
        self.rate.is_some() && self.limited.is_none_or(|n| i <= n)
    }

    /// The limit at join: none yet when it comes with `--cut-at`.
    fn initial_rate(&self) -> u64 {
        match (self.rate, self.cut_at) {
            (Some(r), None) => r,
            _ => 0,
        }
    }

    fn rid_order(&self, _simulcast: bool) -> SimulcastOptions {
        let layers = SimulcastOptions::standard();
        match self.rid_order.as_str() {
            "reversed" => layers.reversed(),
            "random" => layers.shuffled(),
            _ => layers,
        }
    }

    /// The two layers switches alternate between.
    fn switch_pair(&self) -> (Quality, Quality) {
        match self.preferred {
            Some(q) if q != Quality::Low => (Quality::Low, q),
            _ => (Quality::Low, Quality::High),
        }
    }
}

/// Every (subscriber, simulcast video track) pair, with the sizes of the track's layers.
fn simulcast_targets(members: &[Member]) -> Vec<Target> {
    let mut out = Vec::new();
    for m in members.iter().filter(|m| !m.publisher) {
        for info in m.peer.room_tracks() {
            if info.kind != TrackKind::Video {
                continue;
            }
            let Some(publisher) = members
                .iter()
                .find(|p| p.peer.participant_id() == info.participant_id)
            else {
                continue;
            };
            let Some(local) = publisher.peer.local_tracks().into_iter().find(|l| {
                l.server_track_id.as_deref() == Some(info.id.as_str())
                    || l.client_track_id == info.client_track_id
            }) else {
                continue;
            };
            if local.layers.len() < 2 {
                continue;
            }
            out.push(Target {
                subscriber: m.peer.clone(),
                track_id: info.id.clone(),
                sizes: layers::quality_sizes(&local),
            });
        }
    }
    out
}

/// Cuts the limited subscribers' bandwidth at `--cut-at` and restores it at `--restore-at`
/// (both within the run). Returns when each happened.
async fn rate_schedule(
    sc: &SimulcastArgs,
    limited: &[Arc<Peer>],
    run_for: Duration,
) -> (Option<Instant>, Option<Instant>) {
    let start = tokio::time::Instant::now();
    let mut cut = None;
    let mut restore = None;
    if let (Some(at), Some(rate)) = (sc.cut_at, sc.rate)
        && at < run_for
    {
        tokio::time::sleep_until(start + at).await;
        for p in limited {
            let _ = p.set_subscriber_bandwidth(rate);
        }
        cut = Some(Instant::now());
        println!(
            "cut: {} subscriber(s) limited to {} kbit/s at {:.1} s",
            limited.len(),
            rate / 1000,
            at.as_secs_f64()
        );
    }
    if let Some(at) = sc.restore_at
        && at < run_for
    {
        tokio::time::sleep_until(start + at).await;
        for p in limited {
            let _ = p.set_subscriber_bandwidth(0);
        }
        restore = Some(Instant::now());
        println!("restore: limit lifted at {:.1} s", at.as_secs_f64());
    }
    (cut, restore)
}

struct SimulcastReport {
    json: Value,
    lines: Vec<String>,
    failures: Vec<String>,
}

impl SimulcastReport {
    fn print(&self) {
        println!();
        for l in &self.lines {
            println!("{l}");
        }
    }
}

fn fmt_millis(m: &Summary) -> String {
    if m.count == 0 {
        return "n=0".to_owned();
    }
    format!(
        "n={} p50 {:.0} p90 {:.0} p99 {:.0} max {:.0} ms",
        m.count, m.p50, m.p90, m.p99, m.max
    )
}

/// How the limited subscribers' video tracks reacted to a rate change at `at` (`down`: a
/// cut): the reports, the times to the first change, how many did not change; one line each
/// for the summary.
fn rate_changes(
    limited: &[&Member],
    at: Option<Instant>,
    down: bool,
    until: Instant,
    lines: &mut Vec<String>,
) -> (Value, Vec<f64>, usize) {
    let Some(at) = at else {
        return (Value::Null, Vec::new(), 0);
    };
    let reports: Vec<layers::RateChangeReport> = limited
        .iter()
        .flat_map(|m| {
            m.peer
                .remote_tracks()
                .into_iter()
                .filter(|t| t.kind == TrackKind::Video)
                .map(|t| layers::rate_change(m.peer.name(), &t, at, down, until))
                .collect::<Vec<_>>()
        })
        .collect();
    let size = |s: Option<(u16, u16)>| s.map_or("-".to_owned(), |(w, h)| format!("{w}x{h}"));
    let round = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0} ms"));
    for r in &reports {
        lines.push(format!(
            "  {} {}: {} → first {} after {} (decodable after {}; layer_changed after {}), \
             settled on {} after {}; PLIs sent {}",
            if down { "cut" } else { "restore" },
            r.subscriber,
            size(r.before),
            size(r.after),
            round(r.after_ms),
            round(r.decodable_ms),
            round(r.layer_changed_ms),
            size(r.settled),
            round(r.settled_ms),
            r.plis,
        ));
    }
    let times: Vec<f64> = reports.iter().filter_map(|r| r.after_ms).collect();
    let missing = reports.iter().filter(|r| r.after_ms.is_none()).count();
    (json!(reports), times, missing)
}

#[allow(clippy::too_many_arguments)]
fn simulcast_report(
    members: &[Member],
    peers: &[Arc<Peer>],
    requests: &[SwitchRequest],
    sc: &SimulcastArgs,
    cut_at: Option<Instant>,
    restore_at: Option<Instant>,
    keyframes_at_start: &[(Arc<Peer>, Vec<LocalTrackStats>)],
    window: Duration,
) -> SimulcastReport {
    let now = Instant::now();
    let mut lines = Vec::new();
    let mut failures = Vec::new();

    // What each subscriber's video tracks received.
    let mut tracks = Vec::new();
    for m in members {
        for t in m.peer.remote_tracks() {
            if t.kind != TrackKind::Video {
                continue;
            }
            let r = layers::track_layers(m.peer.name(), m.limited, &t);
            if r.switches_without_keyframe > 0
                || r.picture_id_jumps > 0
                || r.timestamp_regressions > 0
            {
                failures.push(format!(
                    "{} {}: glitch: {} switch(es) on an interframe, {} picture-id jump(s), {} \
                     timestamp regression(s): {:?}",
                    m.peer.name(),
                    t.track_id,
                    r.switches_without_keyframe,
                    r.picture_id_jumps,
                    r.timestamp_regressions,
                    t.continuity.anomalies
                ));
            }
            tracks.push(r);
        }
    }
    lines.push(format!(
        "{:<8} {:<4} {:>9} {:>9} {:>9} {:>6} {:>6} {:>7} {:>9}",
        "sub", "lim", "320x180", "640x360", "1280x720", "l_chg", "switch", "missing", "final"
    ));
    for t in &tracks {
        let f = |k: &str| t.frames_by_size.get(k).copied().unwrap_or(0);
        lines.push(format!(
            "{:<8} {:<4} {:>9} {:>9} {:>9} {:>6} {:>6} {:>7} {:>9}",
            t.subscriber,
            if t.limited { "yes" } else { "" },
            f("320x180"),
            f("640x360"),
            f("1280x720"),
            t.layer_changed,
            t.switches,
            t.seq_missing,
            t.final_size
                .map_or("-".to_owned(), |(w, h)| format!("{w}x{h}"))
        ));
    }
    lines.push("(frames received per layer size; l_chg = layer_changed messages)".to_owned());

    // Switch latency.
    let switches = layers::switch_report(requests, peers);
    if switches.requests > 0 {
        lines.push(format!(
            "switch latency (track_settings → first packet of the new size): {} \
             [{} requests, {} already there, {} incomplete {:?}]",
            fmt_millis(&switches.latency_ms),
            switches.requests,
            switches.already,
            switches.incomplete,
            switches.incomplete_by_quality
        ));
        for (q, m) in &switches.latency_by_quality_ms {
            lines.push(format!("  to {q:<7} {}", fmt_millis(m)));
        }
        lines.push(format!(
            "  track_settings → layer_changed: {}",
            fmt_millis(&switches.layer_changed_ms)
        ));
    }

    // Bandwidth cut / restore.
    let limited: Vec<&Member> = members.iter().filter(|m| m.limited).collect();
    let mut settle_lines: Vec<String> = Vec::new();
    let (cut_tracks, down_ms, not_down) = rate_changes(
        &limited,
        cut_at,
        true,
        restore_at.unwrap_or(now),
        &mut settle_lines,
    );
    let (restore_tracks, up_ms, not_up) =
        rate_changes(&limited, restore_at, false, now, &mut settle_lines);
    let down = measure::summarize(&down_ms);
    let up = measure::summarize(&up_ms);
    if cut_at.is_some() {
        lines.push(format!(
            "time to downgrade after the cut to {} kbit/s: {} ({not_down} track(s) not downgraded)",
            sc.rate.unwrap_or(0) / 1000,
            fmt_millis(&down)
        ));
    }
    if restore_at.is_some() {
        lines.push(format!(
            "time to upgrade after the restore: {} ({not_up} track(s) not upgraded)",
            fmt_millis(&up)
        ));
    }
    let relays: Vec<Value> = limited
        .iter()
        .filter_map(|m| {
            let r = m.peer.relay_stats()?;
            Some(json!({
                "subscriber": m.peer.name(),
                "rate_bps": r.rate_bps,
                "down_packets": r.down_packets,
                "down_dropped": r.down_dropped,
                "down_rtp": r.down_rtp,
                "down_rtp_repeats": r.down_rtp_repeats,
                "max_queue_delay_ms": ms(r.max_queue_delay),
            }))
        })
        .collect();
    lines.append(&mut settle_lines);
    if let Some(r) = relays.first() {
        lines.push(format!(
            "bottleneck of {}: {} datagrams delivered, {} dropped; RTP {} of which {} repeats \
             (retransmissions)",
            r["subscriber"],
            r["down_packets"],
            r["down_dropped"],
            r["down_rtp"],
            r["down_rtp_repeats"]
        ));
    }

    // Keyframe requests per publisher layer.
    let mut keyframes = Vec::new();
    for (p, start) in keyframes_at_start {
        keyframes.extend(layers::keyframe_reports(p, start, window));
    }
    for k in &keyframes {
        lines.push(format!(
            "keyframe requests to {} layer {} ({}): {} in {:.1} s = {:.1}/min; keyframes sent {}; \
             dynacast pauses {} resumes {}",
            k.publisher,
            k.rid,
            k.size,
            k.requests,
            window.as_secs_f64(),
            k.per_minute,
            k.keyframes_sent,
            k.dynacast_pauses,
            k.dynacast_resumes
        ));
    }
    let total_requests: u64 = keyframes.iter().map(|k| k.requests).sum();
    let minutes = window.as_secs_f64() / 60.0;

    let json = json!({
        "tracks": tracks,
        "switches": switches,
        "cut": {
            "rate_bps": sc.rate,
            "at_s": sc.cut_at.map(|d| d.as_secs_f64()),
            "downgrade_ms": down,
            "not_downgraded": not_down,
            "tracks": cut_tracks,
        },
        "restore": {
            "at_s": sc.restore_at.map(|d| d.as_secs_f64()),
            "upgrade_ms": up,
            "not_upgraded": not_up,
            "tracks": restore_tracks,
        },
        "bottlenecks": relays,
        "keyframe_requests": keyframes,
        "keyframe_requests_total": total_requests,
        "keyframe_requests_per_minute": if minutes > 0.0 { total_requests as f64 / minutes } else { 0.0 },
        "window_s": window.as_secs_f64(),
    });
    SimulcastReport {
        json,
        lines,
        failures,
    }
}
