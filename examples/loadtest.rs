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
//! Publishers send each frame's packets at once by default; `--publisher-pacing 2.5` spreads
//! them at 2.5 × the clip's bitrate, as a browser's pacer does (`media::Pacing`).
//!
//! ```text
//! cargo run --release --example loadtest -- --publishers 1 --subscribers 10 --simulcast \
//!     --switch-every 2 --duration 20 --json switch.json
//! cargo run --release --example loadtest -- --publishers 1 --subscribers 4 --simulcast \
//!     --subscriber-bandwidth 400kbps --limited-subscribers 2 --warmup 30 --cut-at 5 \
//!     --restore-at 15 --duration 30
//! ```
//!
//! Room timeline (`--timeline`): `--peers` peers (default 50, no media) join one room; each
//! sends, `--rate` times a second, one broadcast on `chat` and one on `input`, each with an
//! increasing `sseq` in its header and its send time in the payload, and records per channel
//! the `(seq, from, sseq, ts)` the server stamped on every message it receives. Reported:
//! - order agreement: on `chat`, the receivers whose list is strictly increasing in `seq`,
//!   agrees with every other receiver on `seq` → (from, sseq, ts) and misses nothing (goal
//!   100 %; less fails the run), plus holes in the timeline, `ts` going back, a sender's
//!   messages reordered; on `input` (unordered, lossy), `seq` agreement and the fraction
//!   received;
//! - relay latency per lane, p50/p99/max: one-way (receive − send) and its two halves, before
//!   the server stamped the message (`ts` − send) and after (receive − `ts`); every peer runs
//!   here, so one clock serves all;
//! - clock-sync error: `--pings` WebSocket `ping`s per peer during the run; each peer's
//!   estimate is the offset of its min-RTT sample, `server_time − (t_send + t_recv) / 2`, and
//!   the truth on one machine is 0: |offset| p50/p99 and the round trips;
//! - server CPU per relayed message: the server's CPU time over the window (`/proc/<pid>`
//!   with `--server-pid`, else its `/stats` `process`) over its `data_messages_relayed`,
//!   also above its idle cost (the peers joined and silent for `--idle-ms` before the traffic),
//!   with the server's and the generator's CPU wait (runnable, no CPU free) and the load
//!   average: on a busy machine latency measures the machine.
//!
//! Exit status is non-zero when a receiver's `chat` is not exactly the agreed order, a message
//! has no `seq`/`ts`, `input` receivers disagree on a `seq`, the `chat` timeline has a hole, a
//! `ts` going back or a sender's messages reordered, an echoed `sseq` differs from the sent
//! one, a peer failed to join, was removed or got a server error, or got no `pong`.
//!
//! ```text
//! cargo run --release --example loadtest -- --timeline --peers 50 --rate 10 --duration 20 \
//!     --server-pid $(pidof plaza) --json timeline.json
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
    /// The server's JSON stats URL (counters + its own CPU time and RSS; works remotely).
    /// Default: http://<host:port of --url>/stats, falling back to /healthz (counters only).
    #[arg(long, alias = "metrics-url")]
    stats_url: Option<String>,
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
    /// Measure the room timeline instead (see the top of this file): order agreement, relay
    /// latency per lane, clock-sync error, server CPU per relayed message. Uses --peers,
    /// --rate, --pings, --settle-ms, --idle-ms (not --publishers / --subscribers).
    #[arg(long)]
    timeline: bool,
    /// --timeline: peers in the room (each sends and receives on chat and input).
    #[arg(long, default_value_t = 50)]
    peers: usize,
    /// --timeline: messages per second each peer sends on each lane (chat and input).
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// --timeline: clock-sync pings per peer (200 ms apart, from a quarter into the run).
    #[arg(long, default_value_t = 5)]
    pings: usize,
    /// --timeline: after the senders stop, wait at most this long for the chat messages
    /// still in flight, milliseconds (the wait ends as soon as all arrived).
    #[arg(long, default_value_t = 10000)]
    settle_ms: u64,
    /// --timeline: before the traffic, measure the server's CPU with every peer joined and
    /// silent for this long, milliseconds (0: no idle window), so the report can also give the
    /// CPU per relayed message above idle.
    #[arg(long, default_value_t = 2000)]
    idle_ms: u64,
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
    if args.timeline {
        return cli::exit_with("loadtest", timeline::run(args).await);
    }
    cli::exit_with("loadtest", run(args).await);
}

async fn run(args: Args) -> Result<bool> {
    now_us();
    let mut recorder = common::measure::Recorder::start(common::measure::ServerSource::plaza(
        &args.url,
        args.server_pid,
        args.stats_url.clone(),
    ))
    .await;
    let started = Instant::now();
    let timeout = Duration::from_secs(args.timeout.max(1));
    let mut base = PeerOptions {
        timeout,
        keep_recent_packets: 0,
        max_kept_messages: 1,
        pacing: args.peer.pacing(),
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
    Ok(verdict(ok, &failures))
}

/// Print the verdict (`OK`, or each failure); `ok` again.
fn verdict(ok: bool, failures: &[String]) -> bool {
    if ok {
        println!("OK");
    } else {
        for f in failures {
            eprintln!("FAIL: {f}");
        }
    }
    ok
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

    use timeline::{Rec, chat_order, clock_sync_report, input_order, lane_latency};

    /// A message `seq` from peer `from` (its `sseq`), stamped at `ts`, sent at `sent`,
    /// received at `recv` (µs).
    fn rec(seq: u64, from: u32, sseq: u64) -> Rec {
        Rec {
            seq,
            ts: 1000 + seq,
            sseq,
            from,
            sent_us: 900 + seq as i64,
            k: sseq,
            recv_us: 1100 + seq as i64,
        }
    }

    /// Peers 0, 1, 2 each broadcast two chat messages; the timeline is 1..=6.
    fn timeline_of_three() -> Vec<Vec<Rec>> {
        let all = [
            rec(1, 0, 1),
            rec(2, 1, 1),
            rec(3, 2, 1),
            rec(4, 0, 2),
            rec(5, 1, 2),
            rec(6, 2, 2),
        ];
        (0..3)
            .map(|me| all.iter().filter(|r| r.from != me).copied().collect())
            .collect()
    }

    #[test]
    fn chat_order_agrees_on_a_clean_timeline() {
        let chat = timeline_of_three();
        let o = chat_order(&chat, &[4, 4, 4]);
        assert_eq!((o.exact, o.receivers, o.exact_percent), (3, 3, 100.0));
        assert_eq!(
            (o.first_seq, o.last_seq, o.seq_holes),
            (Some(1), Some(6), 0)
        );
        assert_eq!(
            o.conflicting_seqs + o.ts_regressions + o.sender_order_violations,
            0
        );
    }

    #[test]
    fn chat_order_catches_reorder_disagreement_loss_and_missing_stamps() {
        // Receiver 0 gets two messages swapped.
        let mut chat = timeline_of_three();
        chat[0].swap(1, 2);
        let o = chat_order(&chat, &[4, 4, 4]);
        assert_eq!((o.exact, o.out_of_order_receivers), (2, 1));
        // Receiver 1 sees seq 3 as another message (another sseq).
        let mut chat = timeline_of_three();
        chat[1][1].sseq = 9;
        chat[1][1].k = 9;
        let o = chat_order(&chat, &[4, 4, 4]);
        assert_eq!(
            (o.exact, o.disagreeing_receivers, o.conflicting_seqs),
            (2, 1, 1)
        );
        // Receiver 2 misses one message: incomplete, and nobody else is.
        let mut chat = timeline_of_three();
        chat[2].remove(0);
        let o = chat_order(&chat, &[4, 4, 4]);
        assert_eq!(
            (o.exact, o.incomplete_receivers, o.missing_messages),
            (2, 1, 1)
        );
        // No seq in the header (an older server): nobody is exact.
        let mut chat = timeline_of_three();
        for r in chat.iter_mut().flatten() {
            r.seq = 0;
        }
        let o = chat_order(&chat, &[4, 4, 4]);
        assert_eq!((o.exact, o.unstamped), (0, 12));
        // A hole on the timeline and a ts going back, seen by everyone alike.
        let mut chat = timeline_of_three();
        for r in chat.iter_mut().flatten() {
            if r.seq == 6 {
                r.seq = 8;
                r.ts = 1;
            }
        }
        let o = chat_order(&chat, &[4, 4, 4]);
        assert_eq!((o.seq_holes, o.ts_regressions), (2, 1));
        // An sseq echo that is not what the sender put in its header.
        let mut chat = timeline_of_three();
        chat[0][0].sseq = 7;
        assert!(chat_order(&chat, &[4, 4, 4]).sseq_echo_mismatches >= 1);
    }

    #[test]
    fn input_order_tolerates_loss_and_reorder_but_not_conflicts() {
        let mut input = timeline_of_three();
        input[0].swap(0, 1);
        input[1].pop();
        let o = input_order(&input, &[4, 4, 4]);
        assert_eq!((o.agreeing, o.conflicting_seqs), (3, 0));
        assert_eq!((o.received, o.expected, o.arrived_late), (11, 12, 1));
        input[2][0].from = 1;
        let o = input_order(&input, &[4, 4, 4]);
        assert_eq!((o.agreeing, o.conflicting_seqs), (2, 1));
    }

    #[test]
    fn lane_latency_splits_at_the_server_stamp() {
        let chat = timeline_of_three();
        let l = lane_latency(chat.iter().flatten());
        // sent 900+s, ts 1000+s, received 1100+s (µs) → 0.2 ms, 0.1 ms, 0.1 ms.
        assert_eq!(l.one_way_ms.count, 12);
        assert!((l.one_way_ms.p50 - 0.2).abs() < 1e-9);
        assert!((l.send_to_ts_ms.max - 0.1).abs() < 1e-9);
        assert!((l.ts_to_receive_ms.min - 0.1).abs() < 1e-9);
    }

    #[test]
    fn clock_sync_takes_the_min_rtt_sample() {
        // Peer 0: the 100 µs round trip says +20; peer 1: the 50 µs one says −10.
        let s = clock_sync_report(&[vec![(300, 900), (100, 20)], vec![(50, -10), (80, 40)]], 1);
        assert_eq!((s.peers, s.samples, s.errors), (2, 4, 1));
        assert_eq!((s.abs_offset_us.min, s.abs_offset_us.max), (10.0, 20.0));
        assert_eq!((s.offset_us.min, s.best_rtt_us.max), (-10.0, 100.0));
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

// ───────────────────────────── room timeline ─────────────────────────────

/// `--timeline`: every peer sends on `chat` and `input` at `--rate` with an increasing `sseq`
/// and its send time in the payload; every receiver records, per channel, the `(seq, from,
/// sseq, ts)` of each message and when it arrived. Then: order agreement, relay latency per
/// lane (split at the server's `ts`), clock-sync error, server CPU per relayed message.
mod timeline {
    use super::*;
    use bytes::Bytes;
    use common::PeerEvent;
    use common::envelope::{self, Stamp};
    use common::measure::ProcUsage;
    use plaza::signal::{ClientMessage, ServerMessage};
    use serde::Deserialize;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::SystemTime;
    use tokio::sync::Notify;

    /// This process's wall clock, µs since the Unix epoch: one reading of `SystemTime`,
    /// advanced by the monotonic clock, so every timestamp of the run is on one steady clock
    /// (the server stamps `ts` and `server_time` from its `SystemTime`; on one machine the
    /// two agree, so the truth of every offset below is 0).
    #[derive(Clone, Copy)]
    pub(super) struct WallClock {
        at: Instant,
        unix_us: i64,
    }

    impl WallClock {
        pub(super) fn new() -> Self {
            let unix_us = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as i64);
            WallClock {
                at: Instant::now(),
                unix_us,
            }
        }

        pub(super) fn us(&self, t: Instant) -> i64 {
            match t.checked_duration_since(self.at) {
                Some(d) => self.unix_us + d.as_micros() as i64,
                None => self.unix_us - self.at.duration_since(t).as_micros() as i64,
            }
        }

        fn now(&self) -> i64 {
            self.us(Instant::now())
        }
    }

    /// One message as a receiver saw it. `0` / `u32::MAX` / `i64::MIN` stand for absent (`seq`
    /// and `ts` start at 1 on the timeline; the payload always carries `t` and `k`).
    #[derive(Clone, Copy, Debug)]
    pub(super) struct Rec {
        pub seq: u64,
        pub ts: u64,
        pub sseq: u64,
        /// The sender, as an index into the run's peers (`u32::MAX`: not one of them).
        pub from: u32,
        /// The sender's send time and `sseq`, from the payload.
        pub sent_us: i64,
        pub k: u64,
        pub recv_us: i64,
    }

    const NONE_U64: u64 = u64::MAX;

    #[derive(Deserialize)]
    struct Body {
        t: i64,
        k: u64,
    }

    fn record(msg: &DataMessage, ids: &HashMap<String, u32>, clock: &WallClock) -> Rec {
        let s = Stamp::from_header(&msg.header);
        let body: Option<Body> = serde_json::from_slice(&msg.payload).ok();
        Rec {
            seq: s.seq.unwrap_or(0),
            ts: s.ts.unwrap_or(0),
            sseq: s.sseq.unwrap_or(NONE_U64),
            from: msg
                .from
                .as_deref()
                .and_then(|f| ids.get(f).copied())
                .unwrap_or(u32::MAX),
            sent_us: body.as_ref().map_or(i64::MIN, |b| b.t),
            k: body.map_or(NONE_U64, |b| b.k),
            recv_us: clock.us(msg.received_at),
        }
    }

    /// What one peer received, sent and measured.
    #[derive(Default)]
    pub(super) struct PeerLog {
        pub chat: Vec<Rec>,
        pub input: Vec<Rec>,
        /// Messages of other kinds (acks, events, malformed) and messages this peer's feed
        /// dropped because the receive loop fell behind (`Lagged`).
        pub other: u64,
        pub lagged: u64,
        pub chat_sent: u64,
        pub input_sent: u64,
        pub send_errors: u64,
        pub last_send_error: Option<String>,
        /// Clock-sync samples: (round trip µs, offset µs = server_time − (t_send + t_recv) / 2).
        pub pings: Vec<(i64, i64)>,
        pub ping_errors: u64,
    }

    /// Counts chat messages received by every peer, and wakes the drain when it reaches the
    /// target (set once the senders stopped).
    struct Drain {
        received: AtomicU64,
        target: AtomicU64,
        done: Notify,
    }

    impl Drain {
        fn add(&self) {
            let n = self.received.fetch_add(1, Ordering::SeqCst) + 1;
            if n == self.target.load(Ordering::SeqCst) {
                self.done.notify_one();
            }
        }

        /// Waits (bounded) until `target` chat messages were received; returns how many were.
        async fn wait(&self, target: u64, bound: Duration) -> u64 {
            self.target.store(target, Ordering::SeqCst);
            if self.received.load(Ordering::SeqCst) < target {
                let _ = tokio::time::timeout(bound, self.done.notified()).await;
            }
            self.received.load(Ordering::SeqCst)
        }
    }

    async fn receive(
        peer: Arc<Peer>,
        ids: Arc<HashMap<String, u32>>,
        clock: WallClock,
        drain: Arc<Drain>,
        mut stop: tokio::sync::watch::Receiver<bool>,
        bound: tokio::time::Instant,
        mut rx: tokio::sync::broadcast::Receiver<DataMessage>,
    ) -> (Vec<Rec>, Vec<Rec>, u64, u64) {
        let (mut chat, mut input, mut other, mut lagged) = (Vec::new(), Vec::new(), 0, 0);
        let _ = &peer;
        loop {
            let msg = tokio::select! {
                r = tokio::time::timeout_at(bound, rx.recv()) => r,
                _ = stop.wait_for(|v| *v) => break,
            };
            match msg {
                Err(_) | Ok(Err(RecvError::Closed)) => break,
                Ok(Err(RecvError::Lagged(n))) => lagged += n,
                Ok(Ok(m)) => {
                    let plain = m.malformed.is_none()
                        && !m.header.contains_key("ack")
                        && !m.header.contains_key("event")
                        && !m.header.contains_key("tick");
                    match m.channel {
                        Channel::Chat if plain => {
                            chat.push(record(&m, &ids, &clock));
                            drain.add();
                        }
                        Channel::Input if plain => input.push(record(&m, &ids, &clock)),
                        _ => other += 1,
                    }
                }
            }
        }
        (chat, input, other, lagged)
    }

    /// Sends on both lanes every 1/`rate` s until `deadline`, starting at `phase` (so the peers
    /// do not all send at once).
    async fn send(
        peer: Arc<Peer>,
        clock: WallClock,
        rate: f64,
        phase: Duration,
        deadline: tokio::time::Instant,
        log: &Mutex<PeerLog>,
    ) {
        let interval = Duration::from_secs_f64(1.0 / rate);
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + phase, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let grace = deadline + Duration::from_secs(5);
        let mut sseq = 0u64;
        loop {
            ticker.tick().await;
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            sseq += 1;
            for chat in [true, false] {
                let body = format!("{{\"t\":{},\"k\":{sseq}}}", clock.now());
                let r = if chat {
                    let text = envelope::encode_text_timeline(None, sseq, false, &body);
                    peer.send_raw_data(Channel::Chat, Bytes::from(text), true)
                } else {
                    let data = envelope::encode_timeline(None, sseq, false, body.as_bytes());
                    peer.send_raw_data(Channel::Input, Bytes::from(data), false)
                };
                let r = bounded_send(grace, r).await;
                let mut l = lock(log);
                match r {
                    Ok(()) if chat => l.chat_sent += 1,
                    Ok(()) => l.input_sent += 1,
                    Err(e) => {
                        l.send_errors += 1;
                        l.last_send_error = Some(format!("{e:#}"));
                    }
                }
            }
        }
    }

    /// `n` clock-sync samples (`ping` → `pong.server_time`), `spacing` apart, from `phase` on.
    async fn clock_sync(
        peer: Arc<Peer>,
        clock: WallClock,
        n: usize,
        phase: Duration,
        spacing: Duration,
        log: &Mutex<PeerLog>,
    ) {
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + phase, spacing);
        for k in 0..n {
            ticker.tick().await;
            // Unlike `Peer::ping`'s (small integers + 0.5), so the two never match each other.
            let ts = 1e9 + k as f64 + 0.25;
            let from = peer.event_count();
            let t_send = Instant::now();
            let sent = peer.send(ClientMessage::Ping { ts: Some(ts) }).await;
            let got = match sent {
                Ok(()) => {
                    peer.wait_for_event_after(
                        from,
                        |e| matches!(e, PeerEvent::Server(ServerMessage::Pong { ts: Some(x), .. }) if *x == ts),
                        Duration::from_secs(5),
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            let sample = got.ok().and_then(|(i, e)| {
                let PeerEvent::Server(ServerMessage::Pong { server_time, .. }) = e else {
                    return None;
                };
                // When the WebSocket task took the pong, not when this task woke up.
                let t_recv = peer.events().get(i)?.at;
                let (a, b) = (clock.us(t_send), clock.us(t_recv));
                Some((b - a, server_time as i64 - (a + b) / 2))
            });
            let mut l = lock(log);
            match sample {
                Some(s) => l.pings.push(s),
                None => l.ping_errors += 1,
            }
        }
    }

    /// The server's data counter and CPU time at one moment.
    #[derive(Debug, Clone, Copy, Default, Serialize)]
    struct ServerSample {
        relayed: Option<u64>,
        /// From `/stats` `process.cpu_runtime_ns` (else `cpu_total_s`).
        metrics_cpu_s: Option<f64>,
        /// From `/proc/<pid>` (`--server-pid`).
        #[serde(skip)]
        proc: Option<ProcUsage>,
    }

    /// Server CPU seconds between two samples, where they came from, and the `/stats` figure
    /// alone.
    fn server_cpu(a: &ServerSample, b: &ServerSample) -> (Option<f64>, &'static str, Option<f64>) {
        let proc_cpu = match (&a.proc, &b.proc) {
            (Some(a), Some(b)) => measure::cpu_delta(a, b),
            _ => None,
        };
        let metrics_cpu = match (a.metrics_cpu_s, b.metrics_cpu_s) {
            (Some(a), Some(b)) if b >= a => Some(b - a),
            _ => None,
        };
        match (proc_cpu, metrics_cpu) {
            (Some(c), m) => (Some(c), "/proc/<pid>", m),
            (None, Some(c)) => (Some(c), "GET /stats process.cpu_runtime_ns", Some(c)),
            _ => (None, "none", None),
        }
    }

    async fn server_sample(stats_url: Option<&str>, pid: Option<u32>) -> ServerSample {
        let mut s = ServerSample {
            proc: pid.map(ProcUsage::read),
            ..ServerSample::default()
        };
        if let Some(url) = stats_url
            && let Ok((200, body)) = measure::http_get(url, Duration::from_secs(2)).await
            && let Ok(v) = serde_json::from_str::<Value>(&body)
        {
            s.relayed = v.get("data_messages_relayed").and_then(Value::as_u64);
            let p = &v["process"];
            s.metrics_cpu_s = p["cpu_runtime_ns"]
                .as_f64()
                .map(|ns| ns / 1e9)
                .or_else(|| p["cpu_total_s"].as_f64());
        }
        s
    }

    #[derive(Debug, Serialize, Default, Clone)]
    pub(super) struct ChatOrder {
        pub receivers: usize,
        /// Receivers whose list is strictly increasing in `seq`, agrees with every other
        /// receiver on (seq → from, sseq, ts) and misses nothing the others sent.
        pub exact: usize,
        pub exact_percent: f64,
        /// Receivers whose list is not strictly increasing.
        pub out_of_order_receivers: usize,
        pub out_of_order_messages: u64,
        /// Receivers with a message the majority saw differently under the same `seq`.
        pub disagreeing_receivers: usize,
        /// `seq`s that receivers saw as different messages.
        pub conflicting_seqs: u64,
        /// Receivers missing some chat message another peer sent (sent − received).
        pub incomplete_receivers: usize,
        pub missing_messages: u64,
        /// Messages without `seq` / `ts` in the header.
        pub unstamped: u64,
        /// Along the agreed timeline: `seq`s nobody saw between the first and the last
        /// (`chat` has no gaps on a timeline of broadcasts), `ts` going back, a sender's
        /// `sseq` going back, and `sseq` echoes that differ from the payload's.
        pub first_seq: Option<u64>,
        pub last_seq: Option<u64>,
        pub seq_holes: u64,
        pub ts_regressions: u64,
        pub sender_order_violations: u64,
        pub sseq_echo_mismatches: u64,
    }

    #[derive(Debug, Serialize, Default, Clone)]
    pub(super) struct InputOrder {
        pub receivers: usize,
        /// Receivers that agree with the majority on every `seq` they saw.
        pub agreeing: usize,
        pub agreeing_percent: f64,
        pub conflicting_seqs: u64,
        pub unstamped: u64,
        pub received: u64,
        pub expected: u64,
        pub received_percent: f64,
        /// Messages that arrived after one with a higher `seq` (input is unordered).
        pub arrived_late: u64,
        pub duplicates: u64,
        pub sseq_echo_mismatches: u64,
    }

    type Key = (u32, u64, u64);

    fn key(r: &Rec) -> Key {
        (r.from, r.sseq, r.ts)
    }

    /// seq → the message most receivers saw under it, and how many `seq`s were seen as
    /// different messages.
    fn consensus<'a>(lists: impl Iterator<Item = &'a [Rec]>) -> (HashMap<u64, Key>, u64) {
        let mut votes: HashMap<u64, HashMap<Key, u32>> = HashMap::new();
        for list in lists {
            for r in list.iter().filter(|r| r.seq != 0) {
                *votes.entry(r.seq).or_default().entry(key(r)).or_default() += 1;
            }
        }
        let conflicts = votes.values().filter(|v| v.len() > 1).count() as u64;
        let agreed = votes
            .into_iter()
            .map(|(seq, v)| {
                let best = v
                    .into_iter()
                    .max_by_key(|(k, n)| (*n, std::cmp::Reverse(*k)))
                    .map(|(k, _)| k)
                    .unwrap_or((u32::MAX, 0, 0));
                (seq, best)
            })
            .collect();
        (agreed, conflicts)
    }

    fn percent(a: u64, b: u64) -> f64 {
        if b == 0 {
            0.0
        } else {
            100.0 * a as f64 / b as f64
        }
    }

    /// `chat[i]`: what peer `i` received; `expected[i]`: chat messages the other peers sent.
    pub(super) fn chat_order(chat: &[Vec<Rec>], expected: &[u64]) -> ChatOrder {
        let (agreed, conflicting_seqs) = consensus(chat.iter().map(Vec::as_slice));
        let mut o = ChatOrder {
            receivers: chat.len(),
            conflicting_seqs,
            ..ChatOrder::default()
        };
        for (list, &exp) in chat.iter().zip(expected) {
            let mut out_of_order = 0;
            let mut disagree = 0;
            let mut prev = 0;
            for r in list {
                if r.seq == 0 || r.ts == 0 {
                    o.unstamped += 1;
                    continue;
                }
                if r.seq <= prev {
                    out_of_order += 1;
                }
                prev = prev.max(r.seq);
                if agreed.get(&r.seq) != Some(&key(r)) {
                    disagree += 1;
                }
                if r.sseq != r.k {
                    o.sseq_echo_mismatches += 1;
                }
            }
            let missing = exp.saturating_sub(list.len() as u64);
            o.out_of_order_messages += out_of_order;
            o.out_of_order_receivers += usize::from(out_of_order > 0);
            o.disagreeing_receivers += usize::from(disagree > 0);
            o.incomplete_receivers += usize::from(missing > 0);
            o.missing_messages += missing;
            let stamped = list.iter().all(|r| r.seq != 0 && r.ts != 0);
            if stamped && out_of_order == 0 && disagree == 0 && missing == 0 && !list.is_empty() {
                o.exact += 1;
            }
        }
        o.exact_percent = percent(o.exact as u64, o.receivers as u64);
        let mut seqs: Vec<(&u64, &Key)> = agreed.iter().collect();
        seqs.sort_unstable();
        o.first_seq = seqs.first().map(|(s, _)| **s);
        o.last_seq = seqs.last().map(|(s, _)| **s);
        if let (Some(a), Some(b)) = (o.first_seq, o.last_seq) {
            o.seq_holes = (b - a + 1) - seqs.len() as u64;
        }
        let mut last_ts = 0;
        let mut last_sseq: HashMap<u32, u64> = HashMap::new();
        for (_, &(from, sseq, ts)) in seqs {
            if ts < last_ts {
                o.ts_regressions += 1;
            }
            last_ts = last_ts.max(ts);
            let prev = last_sseq.entry(from).or_insert(0);
            if sseq != NONE_U64 && sseq <= *prev {
                o.sender_order_violations += 1;
            }
            *prev = (*prev).max(sseq);
        }
        o
    }

    pub(super) fn input_order(input: &[Vec<Rec>], expected: &[u64]) -> InputOrder {
        let (agreed, conflicting_seqs) = consensus(input.iter().map(Vec::as_slice));
        let mut o = InputOrder {
            receivers: input.len(),
            conflicting_seqs,
            expected: expected.iter().sum(),
            ..InputOrder::default()
        };
        for list in input {
            let mut agree = true;
            let mut max = 0;
            let mut seen = std::collections::HashSet::new();
            for r in list {
                if r.seq == 0 || r.ts == 0 {
                    o.unstamped += 1;
                    agree = false;
                    continue;
                }
                if agreed.get(&r.seq) != Some(&key(r)) {
                    agree = false;
                }
                if r.seq < max {
                    o.arrived_late += 1;
                }
                max = max.max(r.seq);
                if !seen.insert(r.seq) {
                    o.duplicates += 1;
                }
                if r.sseq != r.k {
                    o.sseq_echo_mismatches += 1;
                }
            }
            o.received += list.len() as u64;
            o.agreeing += usize::from(agree);
        }
        o.agreeing_percent = percent(o.agreeing as u64, o.receivers as u64);
        o.received_percent = percent(o.received, o.expected);
        o
    }

    /// One lane's latency, ms: one-way (receive − send), before the server's stamp (`ts` −
    /// send) and after it (receive − `ts`).
    #[derive(Debug, Serialize, Default, Clone)]
    pub(super) struct LaneLatency {
        pub one_way_ms: LatencySummary,
        pub send_to_ts_ms: LatencySummary,
        pub ts_to_receive_ms: LatencySummary,
    }

    pub(super) fn lane_latency<'a>(recs: impl Iterator<Item = &'a Rec>) -> LaneLatency {
        let (mut ow, mut before, mut after) = (Vec::new(), Vec::new(), Vec::new());
        for r in recs {
            if r.sent_us == i64::MIN {
                continue;
            }
            ow.push((r.recv_us - r.sent_us) as f64 / 1000.0);
            if r.ts != 0 {
                before.push((r.ts as i64 - r.sent_us) as f64 / 1000.0);
                after.push((r.recv_us - r.ts as i64) as f64 / 1000.0);
            }
        }
        LaneLatency {
            one_way_ms: summarize(&ow),
            send_to_ts_ms: summarize(&before),
            ts_to_receive_ms: summarize(&after),
        }
    }

    #[derive(Debug, Serialize, Default, Clone)]
    pub(super) struct ClockSync {
        pub peers: usize,
        pub samples: usize,
        pub errors: u64,
        /// |offset| of each peer's estimate (the sample with the smallest round trip), µs.
        pub abs_offset_us: LatencySummary,
        /// Each peer's estimate, signed, µs (server − this machine's clock; truth 0).
        pub offset_us: LatencySummary,
        /// Round trips of all samples, and of each peer's best one, µs.
        pub rtt_us: LatencySummary,
        pub best_rtt_us: LatencySummary,
    }

    pub(super) fn clock_sync_report(pings: &[Vec<(i64, i64)>], errors: u64) -> ClockSync {
        let best: Vec<(i64, i64)> = pings
            .iter()
            .filter_map(|p| p.iter().min_by_key(|(rtt, _)| *rtt).copied())
            .collect();
        let all_rtt: Vec<f64> = pings.iter().flatten().map(|(r, _)| *r as f64).collect();
        ClockSync {
            peers: best.len(),
            samples: all_rtt.len(),
            errors,
            abs_offset_us: summarize(
                &best
                    .iter()
                    .map(|(_, o)| o.unsigned_abs() as f64)
                    .collect::<Vec<_>>(),
            ),
            offset_us: summarize(&best.iter().map(|(_, o)| *o as f64).collect::<Vec<_>>()),
            rtt_us: summarize(&all_rtt),
            best_rtt_us: summarize(&best.iter().map(|(r, _)| *r as f64).collect::<Vec<_>>()),
        }
    }

    fn line(name: &str, s: &LatencySummary, unit: &str) -> String {
        format!(
            "{name:<28} n={:<8} p50 {:>8.2} p99 {:>8.2} max {:>8.2} {unit}",
            s.count, s.p50, s.p99, s.max
        )
    }

    pub(super) async fn run(args: Args) -> Result<bool> {
        let started = Instant::now();
        let clock = WallClock::new();
        let n = args.peers;
        if n < 2 {
            anyhow::bail!("--peers {n}: the timeline needs at least 2 peers");
        }
        if !(args.rate.is_finite() && args.rate > 0.0 && args.rate <= 1000.0) {
            anyhow::bail!(
                "--rate {}: messages per second (0 < rate ≤ 1000)",
                args.rate
            );
        }
        let timeout = Duration::from_secs(args.timeout.max(1));
        let base = PeerOptions {
            timeout,
            keep_recent_packets: 0,
            max_kept_messages: 1,
            publish_audio: false,
            publish_video: false,
            ..PeerOptions::default()
        };
        let stats_url = args
            .stats_url
            .clone()
            .or_else(|| measure::http_url_from_ws(&args.url, "/stats"));
        println!(
            "loadtest --timeline: {n} peers → {} room {:?}, {} msg/s per peer on chat and on \
             input, {} s",
            args.url, args.room, args.rate, args.duration
        );
        let mut failures: Vec<String> = Vec::new();

        let joins = futures_util::stream::iter((1..=n).map(|i| {
            let name = format!("peer-{i}");
            let (url, room, opts) = (args.url.clone(), args.room.clone(), base.clone());
            async move {
                let r = async {
                    let p = Peer::connect(&url, &room, &name, opts).await?;
                    p.wait_data_channels(timeout).await?;
                    Ok::<_, anyhow::Error>(p)
                }
                .await;
                (name, r)
            }
        }))
        .buffer_unordered(args.peer.join_concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
        let mut peers: Vec<Arc<Peer>> = Vec::new();
        for (name, r) in joins {
            match r {
                Ok(p) => peers.push(Arc::new(p)),
                Err(e) => {
                    eprintln!("  {name}: {e:#}");
                    failures.push(format!("{name}: join failed: {e:#}"));
                }
            }
        }
        peers.sort_by(|a, b| a.name().cmp(b.name()));
        if peers.len() < 2 {
            for f in &failures {
                eprintln!("FAIL: {f}");
            }
            eprintln!("fewer than 2 peers joined; nothing to measure");
            return Ok(false);
        }
        let n = peers.len();
        let ids: Arc<HashMap<String, u32>> = Arc::new(
            peers
                .iter()
                .enumerate()
                .map(|(i, p)| (p.participant_id().to_owned(), i as u32))
                .collect(),
        );
        println!(
            "{n} peers joined, data channels open, after {:.1} s",
            started.elapsed().as_secs_f64()
        );

        // Traffic, clock sync, then the drain of the chat still in flight.
        let logs: Vec<Mutex<PeerLog>> = (0..n).map(|_| Mutex::default()).collect();
        let drain = Arc::new(Drain {
            received: AtomicU64::new(0),
            target: AtomicU64::new(u64::MAX),
            done: Notify::new(),
        });
        let run_for = Duration::from_secs(args.duration);
        let settle = Duration::from_millis(args.settle_ms);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let hard_bound = tokio::time::Instant::now() + run_for + settle + Duration::from_secs(10);
        let receivers: Vec<_> = peers
            .iter()
            .map(|p| {
                tokio::spawn(receive(
                    p.clone(),
                    ids.clone(),
                    clock,
                    drain.clone(),
                    stop_rx.clone(),
                    hard_bound,
                    p.subscribe_messages(),
                ))
            })
            .collect();
        let idle = if args.idle_ms > 0 {
            let a = server_sample(stats_url.as_deref(), args.server_pid).await;
            let t0 = Instant::now();
            // A measurement window (nothing to wait for): the peers keep their sessions alive.
            tokio::time::sleep(Duration::from_millis(args.idle_ms)).await;
            let b = server_sample(stats_url.as_deref(), args.server_pid).await;
            server_cpu(&a, &b).0.map(|c| c / t0.elapsed().as_secs_f64())
        } else {
            None
        };
        let before = server_sample(stats_url.as_deref(), args.server_pid).await;
        let generator_before = ProcUsage::read(std::process::id());
        let window_start = Instant::now();
        let deadline = tokio::time::Instant::now() + run_for;
        let interval = Duration::from_secs_f64(1.0 / args.rate);
        let ping_spacing = Duration::from_millis(200);
        let work = peers.iter().zip(&logs).enumerate().map(|(i, (p, log))| {
            let phase = interval.mul_f64(i as f64 / n as f64);
            // Clock sync in the middle of the run, under load; spread over the peers.
            let ping_phase = run_for.mul_f64(0.25) + ping_spacing.mul_f64(i as f64 / n as f64);
            async move {
                tokio::join!(
                    send(p.clone(), clock, args.rate, phase, deadline, log),
                    clock_sync(p.clone(), clock, args.pings, ping_phase, ping_spacing, log),
                );
            }
        });
        join_all(work).await;
        let sent_end = Instant::now();
        let chat_sent: Vec<u64> = logs.iter().map(|l| lock(l).chat_sent).collect();
        let input_sent: Vec<u64> = logs.iter().map(|l| lock(l).input_sent).collect();
        let total_chat: u64 = chat_sent.iter().sum();
        let total_input: u64 = input_sent.iter().sum();
        let expected_chat: Vec<u64> = chat_sent.iter().map(|s| total_chat - s).collect();
        let expected_input: Vec<u64> = input_sent.iter().map(|s| total_input - s).collect();
        let got = drain.wait(expected_chat.iter().sum(), settle).await;
        let drained_in = sent_end.elapsed();
        let after = server_sample(stats_url.as_deref(), args.server_pid).await;
        let generator_after = ProcUsage::read(std::process::id());
        let window = window_start.elapsed();
        let _ = stop_tx.send(true);
        for (log, r) in logs.iter().zip(join_all(receivers).await) {
            let (chat, input, other, lagged) =
                r.map_err(|e| anyhow::anyhow!("a receive task failed: {e}"))?;
            let mut l = lock(log);
            (l.chat, l.input, l.other, l.lagged) = (chat, input, other, lagged);
        }
        let removals: Vec<(String, common::Removal)> = peers
            .iter()
            .filter_map(|p| Some((p.name().to_owned(), p.removed()?)))
            .collect();
        let server_errors: Vec<String> = peers
            .iter()
            .flat_map(|p| {
                p.server_errors()
                    .into_iter()
                    .map(|(c, m)| format!("{}: {c:?}: {m}", p.name()))
                    .collect::<Vec<_>>()
            })
            .collect();
        join_all(peers.iter().map(|p| async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), p.leave()).await;
        }))
        .await;

        // Analysis.
        let logs: Vec<PeerLog> = logs
            .into_iter()
            .map(|l| l.into_inner().unwrap_or_else(|e| e.into_inner()))
            .collect();
        let chat: Vec<Vec<Rec>> = logs.iter().map(|l| l.chat.clone()).collect();
        let input: Vec<Vec<Rec>> = logs.iter().map(|l| l.input.clone()).collect();
        let chat_o = chat_order(&chat, &expected_chat);
        let input_o = input_order(&input, &expected_input);
        let chat_lat = lane_latency(chat.iter().flatten());
        let input_lat = lane_latency(input.iter().flatten());
        let pings: Vec<Vec<(i64, i64)>> = logs.iter().map(|l| l.pings.clone()).collect();
        let sync = clock_sync_report(&pings, logs.iter().map(|l| l.ping_errors).sum());
        let lagged: u64 = logs.iter().map(|l| l.lagged).sum();
        let send_errors: u64 = logs.iter().map(|l| l.send_errors).sum();
        let other: u64 = logs.iter().map(|l| l.other).sum();

        let secs = window.as_secs_f64();
        let relayed = match (before.relayed, after.relayed) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        let (server_cpu_s, cpu_source, metrics_cpu) = server_cpu(&before, &after);
        let per_msg = |c: Option<f64>| {
            c.zip(relayed.filter(|&r| r > 0))
                .map(|(c, r)| c * 1e6 / r as f64)
        };
        // Above idle: what the same peers cost the server without traffic, taken off.
        let above_idle = server_cpu_s
            .zip(idle)
            .map(|(c, per_s)| (c - per_s * secs).max(0.0));
        let received_total: u64 = chat.iter().chain(&input).map(|l| l.len() as u64).sum();
        let generator_cpu = measure::cpu_delta(&generator_before, &generator_after);
        // Time runnable but waiting for a CPU, % of the window: how much the rest of the
        // machine held the server and this process back (latency then measures the machine).
        let wait_percent = |a: Option<&ProcUsage>, b: Option<&ProcUsage>| {
            a.zip(b)
                .and_then(|(a, b)| measure::wait_delta(a, b))
                .map(|w| 100.0 * w / secs)
        };
        let server_wait = wait_percent(before.proc.as_ref(), after.proc.as_ref());
        let generator_wait = wait_percent(Some(&generator_before), Some(&generator_after));
        let loadavg = std::fs::read_to_string("/proc/loadavg")
            .ok()
            .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok());

        // Verdict.
        for (name, r) in &removals {
            failures.push(format!(
                "{name}: removed by the server {}: {}",
                relative(r.at, window_start),
                r.reason
            ));
        }
        if let Some(e) = server_errors.first() {
            failures.push(format!(
                "{} server error(s), first {e}",
                server_errors.len()
            ));
        }
        if chat_o.unstamped + input_o.unstamped > 0 {
            failures.push(format!(
                "{} chat and {} input message(s) without seq/ts in the server's header",
                chat_o.unstamped, input_o.unstamped
            ));
        }
        if chat_o.exact < chat_o.receivers {
            failures.push(format!(
                "chat order agreement {:.1}% ({} of {} receivers): {} out of order ({} \
                 messages), {} disagreeing ({} conflicting seqs), {} incomplete ({} messages \
                 missing{})",
                chat_o.exact_percent,
                chat_o.exact,
                chat_o.receivers,
                chat_o.out_of_order_receivers,
                chat_o.out_of_order_messages,
                chat_o.disagreeing_receivers,
                chat_o.conflicting_seqs,
                chat_o.incomplete_receivers,
                chat_o.missing_messages,
                if lagged > 0 {
                    format!("; {lagged} dropped by this process's receive feeds")
                } else {
                    String::new()
                }
            ));
        }
        if chat_o.seq_holes + chat_o.ts_regressions + chat_o.sender_order_violations > 0 {
            failures.push(format!(
                "chat timeline: {} seq hole(s), {} ts regression(s), {} sender-order violation(s)",
                chat_o.seq_holes, chat_o.ts_regressions, chat_o.sender_order_violations
            ));
        }
        if input_o.conflicting_seqs > 0
            || chat_o.sseq_echo_mismatches + input_o.sseq_echo_mismatches > 0
        {
            failures.push(format!(
                "input: {} seq(s) seen as different messages; sseq echoes that differ from the \
                 sender's: {} chat, {} input",
                input_o.conflicting_seqs, chat_o.sseq_echo_mismatches, input_o.sseq_echo_mismatches
            ));
        }
        if total_chat == 0 {
            failures.push("no chat message was sent".to_owned());
        }
        if sync.peers < n {
            failures.push(format!(
                "clock sync: {} of {n} peers got no pong ({} ping errors)",
                n - sync.peers,
                sync.errors
            ));
        }

        // Report.
        println!();
        println!(
            "window {secs:.1} s (traffic {} s + drain {:.0} ms); sent chat {total_chat}, input \
             {total_input}; send errors {send_errors}; other messages {other}; receive-feed \
             drops {lagged}",
            args.duration,
            ms(drained_in)
        );
        println!(
            "chat order agreement: {:.1}% ({} of {} receivers exact); seq {}..{} ({} holes), \
             {} conflicting seqs, {} out-of-order, {} missing ({} of {} received), {} ts \
             regressions, {} sender-order violations",
            chat_o.exact_percent,
            chat_o.exact,
            chat_o.receivers,
            chat_o.first_seq.unwrap_or(0),
            chat_o.last_seq.unwrap_or(0),
            chat_o.seq_holes,
            chat_o.conflicting_seqs,
            chat_o.out_of_order_messages,
            chat_o.missing_messages,
            got,
            expected_chat.iter().sum::<u64>(),
            chat_o.ts_regressions,
            chat_o.sender_order_violations
        );
        println!(
            "input seq agreement: {:.1}% ({} of {} receivers), {} conflicting seqs; received \
             {} of {} ({:.2}%), {} arrived after a higher seq, {} duplicates",
            input_o.agreeing_percent,
            input_o.agreeing,
            input_o.receivers,
            input_o.conflicting_seqs,
            input_o.received,
            input_o.expected,
            input_o.received_percent,
            input_o.arrived_late,
            input_o.duplicates
        );
        for (lane, l) in [("chat", &chat_lat), ("input", &input_lat)] {
            println!("{}", line(&format!("{lane} one-way"), &l.one_way_ms, "ms"));
            println!(
                "{}",
                line(&format!("{lane} send → ts"), &l.send_to_ts_ms, "ms")
            );
            println!(
                "{}",
                line(&format!("{lane} ts → receive"), &l.ts_to_receive_ms, "ms")
            );
        }
        println!(
            "{}",
            line(
                "clock sync |offset|",
                &sync.abs_offset_us,
                "µs (min-RTT of each peer)"
            )
        );
        println!(
            "{}",
            line("clock sync rtt", &sync.rtt_us, "µs (all samples)")
        );
        println!("{}", line("clock sync best rtt", &sync.best_rtt_us, "µs"));
        let opt =
            |v: Option<f64>, unit: &str| v.map_or("-".to_owned(), |v| format!("{v:.2}{unit}"));
        println!(
            "server: relayed {} data messages ({}/s), CPU {} ({} of one core, {cpu_source}) = {} \
             per relayed message; generator CPU {}",
            relayed.map_or("?".to_owned(), |r| r.to_string()),
            relayed.map_or("?".to_owned(), |r| format!("{:.0}", r as f64 / secs)),
            opt(server_cpu_s, " s"),
            opt(server_cpu_s.map(|c| 100.0 * c / secs), "%"),
            opt(per_msg(server_cpu_s), " µs"),
            opt(generator_cpu.map(|c| 100.0 * c / secs), "% of one core"),
        );
        println!(
            "CPU wait (runnable, no CPU free) in % of the window: server {}, generator {}; \
             1-minute load average {}",
            opt(server_wait, "%"),
            opt(generator_wait, "%"),
            loadavg.map_or("?".to_owned(), |l| format!("{l:.2}")),
        );
        if let Some(per_s) = idle {
            println!(
                "server idle (peers joined, silent, {} ms before the traffic): {:.2}% of one \
                 core; above idle {} per relayed message",
                args.idle_ms,
                100.0 * per_s,
                opt(per_msg(above_idle), " µs"),
            );
        }
        let ok = failures.is_empty();
        if let Some(path) = &args.json {
            let report = json!({
                "mode": "timeline",
                "args": args,
                "ok": ok,
                "failures": failures,
                "wall_time_s": started.elapsed().as_secs_f64(),
                "peers": n,
                "window_s": secs,
                "drain_ms": ms(drained_in),
                "sent": {"chat": total_chat, "input": total_input, "errors": send_errors},
                "received": {"total": received_total, "other": other, "feed_drops": lagged},
                "timeline": {"chat": chat_o, "input": input_o},
                "latency": {"chat": chat_lat, "input": input_lat},
                "clock_sync": sync,
                "server": {
                    "data_messages_relayed": relayed,
                    "relayed_per_s": relayed.map(|r| r as f64 / secs),
                    "cpu_s": server_cpu_s,
                    "cpu_source": cpu_source,
                    "cpu_percent": server_cpu_s.map(|c| 100.0 * c / secs),
                    "us_per_relayed_message": per_msg(server_cpu_s),
                    "idle_cpu_percent": idle.map(|c| 100.0 * c),
                    "us_per_relayed_message_above_idle": per_msg(above_idle),
                    "metrics_cpu_s": metrics_cpu,
                    "metrics_us_per_relayed_message": per_msg(metrics_cpu),
                    "generator_cpu_percent": generator_cpu.map(|c| 100.0 * c / secs),
                    "cpu_wait_percent": server_wait,
                    "generator_cpu_wait_percent": generator_wait,
                    "load_average_1m": loadavg,
                },
                "removed": removals.iter().map(|(name, r)| json!({"peer": name, "reason": r.reason})).collect::<Vec<_>>(),
                "note": "one-way = receive − send, both on this process's wall clock (one \
                         SystemTime reading advanced by the monotonic clock); ts is the server's; \
                         clock offsets are server_time − (t_send + t_recv)/2 of each peer's \
                         min-RTT ping, truth 0 on one machine",
            });
            std::fs::write(path, serde_json::to_string_pretty(&report)?)
                .with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {}", path.display());
        }
        Ok(super::verdict(ok, &failures))
    }
}
