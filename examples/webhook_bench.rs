//! Webhook delivery under a receiver outage: a server in this process with one webhook URL,
//! whose receiver is down (connection refused) for the first `DOWN_S` seconds, while
//! `PARTICIPANTS` webrtc-rs peers (subscribers, no media) join and leave rooms in cycles for
//! `RUN_S` seconds. Then it waits until every event the server queued has arrived (or 120 s).
//!
//! ```text
//! cargo run --release --example webhook_bench -- [PARTICIPANTS] [ROOMS] [DOWN_S] [RUN_S] [BACKOFF_MAX_S]
//! cargo run --release --example webhook_bench -- 20 4 30 45
//! ```
//!
//! Prints: events queued / delivered / lost (by id), duplicates,
//! delivery latency (arrival − `created_at`) p50/p99 for events made while the receiver was
//! down and after it came up, join latency in both periods, and the server's counters.

// A benchmark: it reads the clock, shares the receiver's log, and prints its result.
#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    clippy::print_stdout
)]

use axum::extract::State;
use axum::http::StatusCode;
use plaza::webhook::{Event, WebhookConfig};
use plaza_testkit::measure::summarize;
use plaza_testkit::{self as common, support};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

type Log = Arc<Mutex<Vec<(u64, Event)>>>;

async fn hook(State(log): State<Log>, body: axum::body::Bytes) -> StatusCode {
    let at = now_us();
    match serde_json::from_slice::<Event>(&body) {
        Ok(e) => {
            log.lock().unwrap().push((at, e));
            StatusCode::OK
        }
        Err(_) => StatusCode::BAD_REQUEST,
    }
}

fn arg(i: usize, default: u64) -> u64 {
    std::env::args()
        .nth(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let participants = arg(1, 20) as usize;
    let rooms = arg(2, 4).max(1) as usize;
    let down = Duration::from_secs(arg(3, 30));
    let run = Duration::from_secs(arg(4, 45));
    let backoff_max = Duration::from_secs(arg(5, 30));

    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let mut config = support::test_config();
    config.log_level = "warn".into();
    config.webhook = WebhookConfig {
        urls: vec![format!("http://{port}/hook")],
        ..WebhookConfig::default()
    };
    config.webhook.backoff.max = backoff_max;
    let backoff = config.webhook.backoff;
    let server = support::TestServer::start_with(config).await;
    let started = Instant::now();
    let up_at_us = now_us() + down.as_micros() as u64;

    let log: Log = Arc::default();
    let receiver = {
        let log = Arc::clone(&log);
        tokio::spawn(async move {
            tokio::time::sleep(down).await;
            let listener = tokio::net::TcpListener::bind(port).await.unwrap();
            let app = axum::Router::new()
                .route("/hook", axum::routing::post(hook))
                .with_state(log);
            let _ = axum::serve(listener, app).await;
        })
    };

    // Each participant: join, stay 1–3 s, leave, wait 0.5 s, again, until `run` is over.
    let joins: Arc<Mutex<Vec<(Duration, Duration)>>> = Arc::default();
    let mut tasks = Vec::new();
    for i in 0..participants {
        let url = server.ws_url();
        let joins = Arc::clone(&joins);
        tasks.push(tokio::spawn(async move {
            let room = format!("bench-{}", i % rooms);
            let mut cycle = 0u64;
            while started.elapsed() < run {
                let name = format!("p{i}-{cycle}");
                let o = common::PeerOptions {
                    token: Some(common::token::participant(&room, &name)),
                    ..support::opts(false)
                };
                let at = started.elapsed();
                match common::Peer::connect(&url, &room, &name, o).await {
                    Ok(p) => {
                        joins.lock().unwrap().push((at, p.joined().join_latency));
                        let stay = 1000 + (i as u64 * 137 + cycle * 71) % 2000;
                        tokio::time::sleep(Duration::from_millis(stay)).await;
                        let _ = p.leave().await;
                    }
                    Err(e) => eprintln!("{name}: join failed: {e:#}"),
                }
                cycle += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let workload = started.elapsed();

    // Wait for every queued event (the last retry of an event made during the outage comes
    // up to backoff.max after the receiver is back).
    let deadline = Instant::now() + Duration::from_secs(120);
    let stats = loop {
        let stats = webhook_stats(&server).await;
        let queued = stats["webhook_events_queued"].as_u64().unwrap_or(0);
        let done = stats["webhook_events_delivered"].as_u64().unwrap_or(0)
            + stats["webhook_events_dropped"].as_u64().unwrap_or(0);
        if (queued > 0 && done >= queued && stats["webhook_events_pending"] == 0)
            || Instant::now() > deadline
        {
            break stats;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let all_in = started.elapsed();
    receiver.abort();

    let got = log.lock().unwrap().clone();
    let mut first: BTreeMap<String, (u64, Event)> = BTreeMap::new();
    for (at, e) in &got {
        first.entry(e.id.clone()).or_insert((*at, e.clone()));
    }
    let duplicates = got.len() - first.len();
    let count = |k: plaza::webhook::EventKind| first.values().filter(|(_, e)| e.event == k).count();
    let (started_n, finished_n) = (
        count(plaza::webhook::EventKind::RoomStarted),
        count(plaza::webhook::EventKind::RoomFinished),
    );
    let (joined_n, left_n) = (
        count(plaza::webhook::EventKind::ParticipantJoined),
        count(plaza::webhook::EventKind::ParticipantLeft),
    );
    let (mut lat_down, mut lat_up) = (Vec::new(), Vec::new());
    for (at, e) in first.values() {
        let ms = at.saturating_sub(e.created_at) as f64 / 1000.0;
        if e.created_at < up_at_us {
            lat_down.push(ms);
        } else {
            lat_up.push(ms);
        }
    }
    let j = joins.lock().unwrap().clone();
    let (jd, ju): (Vec<_>, Vec<_>) = j.iter().partition(|(at, _)| *at < down);
    let ms = |v: &[(Duration, Duration)]| -> Vec<f64> {
        v.iter().map(|(_, l)| l.as_secs_f64() * 1000.0).collect()
    };
    let s_down = summarize(&lat_down);
    let s_up = summarize(&lat_up);
    let j_down = summarize(&ms(&jd));
    let j_up = summarize(&ms(&ju));

    println!(
        "participants {participants}, rooms {rooms}, receiver down {down:?}, workload {workload:.1?}, all in after {all_in:.1?}"
    );
    println!(
        "backoff {:?} → {:?}, retry for {:?}",
        backoff.min, backoff.max, backoff.retry_for
    );
    println!("joins: {}", j.len());
    println!(
        "events: queued {}, delivered (distinct ids) {}, requests {} (duplicates {duplicates}), lost {}",
        stats["webhook_events_queued"],
        first.len(),
        got.len(),
        stats["webhook_events_queued"].as_u64().unwrap_or(0) as i64 - first.len() as i64
            + stats["webhook_events_dropped"].as_u64().unwrap_or(0) as i64,
    );
    println!("server counters: {stats}");
    println!(
        "rooms started {started_n} finished {finished_n}; participants joined {joined_n} left {left_n}"
    );
    println!(
        "delivery latency, events made while down: n={} p50 {:.0} ms p99 {:.0} ms max {:.0} ms",
        s_down.count, s_down.p50, s_down.p99, s_down.max
    );
    println!(
        "delivery latency, events made while up:   n={} p50 {:.1} ms p99 {:.1} ms max {:.1} ms",
        s_up.count, s_up.p50, s_up.p99, s_up.max
    );
    println!(
        "join latency while down: n={} p50 {:.1} ms p99 {:.1} ms; while up: n={} p50 {:.1} ms p99 {:.1} ms",
        j_down.count, j_down.p50, j_down.p99, j_up.count, j_up.p50, j_up.p99
    );
    server.shutdown().await;
}

async fn webhook_stats(server: &support::TestServer) -> serde_json::Value {
    let (_, body) = support::http_request(server.http_addr, "GET", "/healthz", &[], "")
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    v["webhooks"].clone()
}
