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
//! Exit status is non-zero when a peer failed to join, when a peer that should have received
//! media (there are publishers other than itself) received none, or when a peer received no chat
//! message although other peers exist.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use common::{Channel, DataMessage, Peer, PeerOptions, RemoteTrackStats};
use futures_util::StreamExt;
use futures_util::future::join_all;
use plaza::signal::TrackKind;
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
    /// Data-channel message interval per peer, milliseconds.
    #[arg(long, default_value_t = 1000)]
    chat_interval_ms: u64,
    /// Peers joining at the same time.
    #[arg(long, default_value_t = 4)]
    join_concurrency: usize,
    /// VP8 IVF file to publish (default: assets/video_320x240_vp8.ivf).
    #[arg(long)]
    video: Option<PathBuf>,
    /// Ogg Opus file to publish (default: assets/audio_sine_opus.ogg).
    #[arg(long)]
    audio: Option<PathBuf>,
}

/// Microseconds since the process's clock origin (shared by every peer here).
fn now_us() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
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
    if values.is_empty() {
        return LatencySummary::default();
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let pct = |p: f64| v[((p / 100.0) * (v.len() - 1) as f64).round() as usize];
    LatencySummary {
        count: v.len(),
        min: v[0],
        p50: pct(50.0),
        p95: pct(95.0),
        p99: pct(99.0),
        max: v[v.len() - 1],
        mean: v.iter().sum::<f64>() / v.len() as f64,
    }
}

struct Member {
    peer: Arc<Peer>,
    publisher: bool,
    dc: Arc<Mutex<DcCounters>>,
}

#[derive(Serialize)]
struct TrackReport {
    subscriber: String,
    subscriber_id: String,
    publisher: String,
    publisher_id: String,
    track_id: String,
    kind: Option<TrackKind>,
    packets_sent: Option<u64>,
    packets_received: u64,
    bytes_received: u64,
    packets_expected: u64,
    packets_lost: u64,
    loss_percent: f64,
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
    match run(args).await {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("loadtest: error: {e:#}");
            std::process::exit(2);
        }
    }
}

async fn run(args: Args) -> Result<bool> {
    now_us();
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
            let opts = PeerOptions {
                publish_audio: role_pub,
                publish_video: role_pub,
                ..base.clone()
            };
            let (url, room) = (args.url.clone(), args.room.clone());
            async move {
                let r = Peer::connect(&url, &room, &name, opts).await;
                (name, r)
            }
        }))
        .buffer_unordered(args.join_concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
        for (name, r) in joins {
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

    // Traffic.
    let ids: Vec<String> = members
        .iter()
        .map(|m| m.peer.participant_id().to_owned())
        .collect();
    let run_for = Duration::from_secs(args.duration);
    let interval = Duration::from_millis(args.chat_interval_ms.max(10));
    let traffic = members.iter().enumerate().map(|(i, m)| {
        let targets: Vec<String> = ids
            .iter()
            .filter(|id| id.as_str() != m.peer.participant_id())
            .cloned()
            .collect();
        peer_traffic(m.peer.clone(), m.dc.clone(), targets, i, run_for, interval)
    });
    join_all(traffic).await;

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
            tracks.push(track_report(m, t, &room_tracks, &peers_by_id, origin));
        }
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

    let ok = failures.is_empty();
    if let Some(path) = &args.json {
        let report = json!({
            "args": args,
            "ok": ok,
            "failures": failures,
            "wall_time_s": started.elapsed().as_secs_f64(),
            "peers": peer_reports,
            "tracks": tracks,
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
        kind: Some(info.map(|i| i.kind).unwrap_or(t.kind)),
        packets_sent,
        packets_received: t.packets,
        bytes_received: t.bytes,
        packets_expected: t.expected(),
        packets_lost: t.lost(),
        loss_percent: t.loss_percent(),
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
                on_message(&peer, &dc, msg).await;
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
            let r = peer.send_chat(&ping, Some(vec![to.clone()])).await;
            record_send(&dc, r, true);
            let input = json!({"lt": "input", "seq": seq, "t_us": now_us()}).to_string();
            let r = peer.send_input(input.as_bytes(), Some(vec![to])).await;
            record_send(&dc, r, false);
            seq += 1;
        }
    };
    tokio::join!(receiver, sender);
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
        "{:<8} {:<12} {:>8} {:>9} {:>10} {:>10} {:>10} {:>6}",
        "peer", "role", "join ms", "tracks", "pkts recv", "chat s/r", "input s/r", "errs"
    );
    for p in peers {
        println!(
            "{:<8} {:<12} {:>8.1} {:>9} {:>10} {:>10} {:>10} {:>6}",
            p.name,
            p.role,
            p.join_ms,
            format!("{}/{}", p.tracks_received, p.tracks_expected),
            p.packets_received,
            format!("{}/{}", p.chat_sent, p.chat_received),
            format!("{}/{}", p.input_sent, p.input_received),
            p.send_errors + p.server_errors.len() as u64 + p.negotiation_errors.len() as u64,
        );
    }
    println!();
    println!(
        "{:<8} {:<8} {:<6} {:>9} {:>9} {:>7} {:>8} {:>9}",
        "sub", "pub", "kind", "sent", "recv", "loss%", "keyfr", "join ms"
    );
    for t in tracks {
        println!(
            "{:<8} {:<8} {:<6} {:>9} {:>9} {:>7.2} {:>8} {:>9}",
            t.subscriber,
            t.publisher,
            match t.kind {
                Some(TrackKind::Audio) => "audio",
                Some(TrackKind::Video) => "video",
                None => "?",
            },
            t.packets_sent.map_or("?".to_owned(), |n| n.to_string()),
            t.packets_received,
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
