//! Per-server join limits against the real server: `max_rooms`, `max_participants_per_room`
//! (over every shard of a spread room) and the per-address join rate. Each refusal has its own
//! error code, leaves the socket open (a later join on it succeeds), changes nothing on the
//! server (the others in the room see no `participant_joined`, the core's counts stay) and is
//! counted under `"http"` in `/stats`.

// A test, not the packet path: times deadlines with the clock.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use plaza_testkit::support::{self, RawWs, TestServer, test_config};
use plaza_testkit::token;

use plaza::auth::{self, Claims};
use plaza::config::Config;
use plaza::signal::{ClientMessage, ErrorCode, ServerMessage};
use serde_json::Value;
use std::time::{Duration, Instant};

/// Bound for waiting on the core's counters.
const WAIT: Duration = Duration::from_secs(10);

async fn server(config: Config) -> TestServer {
    TestServer::start_with(Config {
        workers: 2,
        ..config
    })
    .await
}

async fn connect(server: &TestServer) -> RawWs {
    RawWs::connect(&server.ws_url()).await.unwrap()
}

/// Sends a join with `token` and returns the error it gets (the join must be refused).
async fn refused_with(
    ws: &mut RawWs,
    room: &str,
    name: &str,
    token: Option<&str>,
) -> (ErrorCode, String) {
    ws.send_msg(&ClientMessage::Join {
        room: room.into(),
        name: name.into(),
        token: token.map(str::to_owned),
        protocol: None,
        auto_subscribe: None,
        timeline_events: None,
    })
    .await
    .unwrap();
    match ws
        .recv_until("joined or error", |m| {
            matches!(
                m,
                ServerMessage::Joined { .. } | ServerMessage::Error { .. }
            )
        })
        .await
        .unwrap()
    {
        ServerMessage::Error {
            code,
            message,
            request,
        } => {
            assert_eq!(request.as_deref(), Some("join"), "{message}");
            (code, message)
        }
        other => panic!("the join of {name} to {room} was accepted: {other:?}"),
    }
}

async fn refused(ws: &mut RawWs, room: &str, name: &str) -> (ErrorCode, String) {
    let token = token::participant(room, name);
    refused_with(ws, room, name, Some(&token)).await
}

/// The socket is open and in step after a refusal.
async fn still_open(ws: &mut RawWs, ts: f64) {
    ws.ping(ts)
        .await
        .expect("the socket stays open after a refused join");
}

/// The next `participant_joined` `ws` gets: the name of who joined.
async fn next_joined(ws: &mut RawWs) -> String {
    match ws
        .recv_until("participant_joined", |m| {
            matches!(m, ServerMessage::ParticipantJoined { .. })
        })
        .await
        .unwrap()
    {
        ServerMessage::ParticipantJoined { participant } => participant.name,
        _ => unreachable!(),
    }
}

/// Waits for `participant_left` of `id` on `ws`. The handle forgets the participant's place
/// before the core hears of the leave, so this also means the place is free.
async fn wait_left(ws: &mut RawWs, id: &str) {
    ws.recv_until(
        "participant_left",
        |m| matches!(m, ServerMessage::ParticipantLeft { participant_id, .. } if participant_id == id),
    )
    .await
    .unwrap();
}

async fn http_counter(server: &TestServer, name: &str) -> u64 {
    let (status, body) = support::stats(server.http_addr).await.unwrap();
    assert_eq!(status, 200, "{body}");
    body["http"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no http.{name} in /stats: {body}"))
}

fn core_counts(body: &Value) -> (u64, u64) {
    (
        body["rooms"].as_u64().unwrap_or(u64::MAX),
        body["participants"].as_u64().unwrap_or(u64::MAX),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_rooms_refuses_new_rooms_only_until_one_closes() {
    let server = server(Config {
        max_rooms: 2,
        ..test_config()
    })
    .await;
    let mut a = connect(&server).await;
    a.join("one", "a").await.unwrap();
    let mut b = connect(&server).await;
    b.join("two", "b").await.unwrap();

    // A third room is refused, on the same socket again and again; the socket stays open.
    let mut c = connect(&server).await;
    for i in 0..2 {
        let (code, message) = refused(&mut c, "three", "c").await;
        assert_eq!(code, ErrorCode::TooManyRooms, "{message}");
        assert!(message.contains("2 rooms"), "{message}");
        still_open(&mut c, f64::from(i)).await;
    }
    assert_eq!(http_counter(&server, "joins_refused_rooms").await, 2);
    // Nothing changed on the server.
    let (_, body) = server.healthz().await.unwrap();
    assert_eq!(core_counts(&body), (2, 2), "{body}");

    // An existing room is never refused by it: the same socket joins room "one"; the first
    // participant_joined `a` sees is that one (nothing of the refused joins).
    let mut d = connect(&server).await;
    let (code, _) = refused(&mut d, "three", "refused-d").await;
    assert_eq!(code, ErrorCode::TooManyRooms);
    d.join("one", "d").await.unwrap();
    assert_eq!(next_joined(&mut a).await, "d");

    // Room "two" closes (its only member leaves): a new room may open, on the socket that was
    // refused.
    b.send_msg(&ClientMessage::Leave).await.unwrap();
    b.close().await;
    server
        .wait_healthz("room two closed", |body| core_counts(body) == (1, 2), WAIT)
        .await
        .unwrap();
    c.join("three", "c").await.unwrap();
    let (code, _) = refused(&mut connect(&server).await, "four", "e").await;
    assert_eq!(code, ErrorCode::TooManyRooms);
    assert_eq!(http_counter(&server, "joins_refused_rooms").await, 4);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_full_counts_every_shard_and_lets_an_identity_rejoin() {
    // The room spreads over both shards from its second participant; the cap (3) is counted
    // over both.
    let server = server(Config {
        max_participants_per_room: 3,
        room_spread_above: 1,
        ..test_config()
    })
    .await;
    let alice_token =
        token::sign(&Claims::new("alice", "hall", auth::DEFAULT_TTL).with_name("Alice"));
    let mut a = connect(&server).await;
    a.join_with("hall", "Alice", Some(&alice_token))
        .await
        .unwrap();
    let mut b = connect(&server).await;
    let b_id = b.join("hall", "b").await.unwrap();
    assert_eq!(next_joined(&mut a).await, "b");
    let mut c = connect(&server).await;
    c.join("hall", "c").await.unwrap();
    assert_eq!(next_joined(&mut a).await, "c");
    let (_, body) = server.healthz().await.unwrap();
    let per_shard: Vec<u64> = body["shards"]
        .as_array()
        .unwrap_or_else(|| panic!("no shards: {body}"))
        .iter()
        .map(|s| s["participants"].as_u64().unwrap())
        .collect();
    assert_eq!(per_shard.len(), 2, "{body}");
    assert!(
        per_shard.iter().all(|&n| n > 0),
        "the room spans both shards: {per_shard:?}"
    );

    // Full: a fourth is refused, the socket stays open, nobody hears of it.
    let mut d = connect(&server).await;
    let (code, message) = refused(&mut d, "hall", "refused-d").await;
    assert_eq!(code, ErrorCode::RoomFull, "{message}");
    assert!(
        message.contains("hall") && message.contains('3'),
        "{message}"
    );
    still_open(&mut d, 1.0).await;
    let (_, body) = server.healthz().await.unwrap();
    // (The core counts the room once per shard it is on.)
    assert_eq!(core_counts(&body), (2, 3), "{body}");
    // Another room is not affected.
    let mut other = connect(&server).await;
    other.join("elsewhere", "o").await.unwrap();

    // Someone leaves: the refused socket joins. The first participant_joined `a` sees is d's
    // (nothing of the refused join).
    b.send_msg(&ClientMessage::Leave).await.unwrap();
    wait_left(&mut a, &b_id).await;
    d.join("hall", "d").await.unwrap();
    assert_eq!(next_joined(&mut a).await, "d");
    let (code, _) = refused(&mut connect(&server).await, "hall", "e").await;
    assert_eq!(code, ErrorCode::RoomFull);

    // Full again. Alice joins again: her new session replaces the old one (the old socket is
    // told to leave), it is not refused.
    let mut a2 = connect(&server).await;
    a2.join_with("hall", "Alice", Some(&alice_token))
        .await
        .expect("an identity already in the room may rejoin at the cap");
    a.recv_until("leave", |m| matches!(m, ServerMessage::Leave { .. }))
        .await
        .unwrap();
    let (code, _) = refused(&mut connect(&server).await, "hall", "f").await;
    assert_eq!(code, ErrorCode::RoomFull);
    assert_eq!(http_counter(&server, "joins_refused_room_full").await, 3);
    server.shutdown().await;
}

/// The seconds in "retry after N s".
fn retry_after(message: &str) -> Duration {
    let secs: f64 = message
        .split("retry after ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no retry-after in {message:?}"));
    Duration::from_secs_f64(secs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_per_address_are_rate_limited_with_a_retry_after() {
    let server = server(Config {
        max_joins_per_ip: 2.0,
        join_burst_per_ip: 3,
        ..test_config()
    })
    .await;
    let start = Instant::now();
    // The burst: three joins from 127.0.0.1, over several sockets (the bucket is the
    // address's, not the socket's); one of them has a bad token: attempts count before the
    // token is checked.
    let mut a = connect(&server).await;
    a.join("room", "a").await.unwrap();
    let mut bad = connect(&server).await;
    let (code, _) = refused_with(&mut bad, "room", "bad", Some("not-a-token")).await;
    assert_eq!(code, ErrorCode::TokenInvalid);
    let mut b = connect(&server).await;
    b.join("room", "b").await.unwrap();
    assert_eq!(next_joined(&mut a).await, "b");

    // Over the rate: refused with a retry-after, whatever the token; the socket stays open.
    let mut c = connect(&server).await;
    let (code, message) = refused(&mut c, "room", "c").await;
    assert_eq!(code, ErrorCode::JoinRateLimited, "{message}");
    let wait = retry_after(&message);
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_millis(600),
        "{message}"
    );
    let (code, _) = refused_with(&mut bad, "room", "bad", Some("not-a-token")).await;
    assert_eq!(code, ErrorCode::JoinRateLimited);
    still_open(&mut c, 1.0).await;
    let (_, body) = server.healthz().await.unwrap();
    assert_eq!(core_counts(&body), (1, 2), "{body}");
    assert_eq!(
        body["http"]["max_joins_per_ip"].as_f64(),
        Some(2.0),
        "{body}"
    );
    assert_eq!(
        body["http"]["join_burst_per_ip"].as_u64(),
        Some(3),
        "{body}"
    );

    assert_eq!(http_counter(&server, "joins_rate_limited").await, 2);

    // After the rate has refilled (the retry-after: a rate limiter's clock is no event to
    // await), the same socket joins; the first participant_joined `a` sees is c's.
    tokio::time::sleep(wait).await;
    c.join("room", "c").await.expect("the rate refilled");
    assert_eq!(next_joined(&mut a).await, "c");
    // Sustained: at most the burst plus 2 per second since the start (and one for rounding)
    // can have been taken: a, bad, b and c so far, then what passes of a stream of attempts.
    let mut taken = 4;
    let mut limited = 0;
    // 20 attempts per second: under the per-socket message rate (50), over the join rate.
    let mut pace = tokio::time::interval(Duration::from_millis(50));
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(1500) {
        pace.tick().await;
        match refused_with(&mut bad, "room", "bad", Some("not-a-token"))
            .await
            .0
        {
            ErrorCode::TokenInvalid => taken += 1,
            ErrorCode::JoinRateLimited => limited += 1,
            other => panic!("{other:?}"),
        }
    }
    let allowed = 3.0 + 2.0 * start.elapsed().as_secs_f64() + 1.0;
    assert!(
        f64::from(taken) <= allowed && taken >= 6 && limited >= 3,
        "{taken} joins taken in {:?} ({limited} limited)",
        start.elapsed()
    );
    server.shutdown().await;
}

/// `n` join attempts with a bad token from one socket, sent at once (no waiting for the
/// answers in between): the codes received, in order.
async fn bad_token_joins(ws: &mut RawWs, n: usize) -> Vec<ErrorCode> {
    let join = serde_json::to_string(&ClientMessage::Join {
        room: "room".into(),
        name: "p".into(),
        token: Some("not-a-token".into()),
        protocol: None,
        auto_subscribe: None,
        timeline_events: None,
    })
    .unwrap();
    ws.send_burst(std::iter::repeat_n(join, n)).await.unwrap();
    let mut codes = Vec::with_capacity(n);
    for _ in 0..n {
        let (code, message, request) = ws.expect_error().await.unwrap();
        assert_eq!(request.as_deref(), Some("join"), "{message}");
        codes.push(code);
    }
    codes
}

/// The defaults (20 per second, bursts of 100) hold off a flood of joins from one address;
/// a join rate of 0 is unlimited (the bench and load tests join ~1000 peers from 127.0.0.1).
/// Attempts count before the token is checked, so bad tokens exercise the limiter alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_join_rate_and_zero_for_unlimited() {
    let defaults = server(test_config()).await;
    let mut ws = connect(&defaults).await;
    let start = Instant::now();
    let codes = bad_token_joins(&mut ws, 150).await;
    let passed = codes
        .iter()
        .filter(|c| **c == ErrorCode::TokenInvalid)
        .count();
    let limited = codes
        .iter()
        .filter(|c| **c == ErrorCode::JoinRateLimited)
        .count();
    assert_eq!(passed + limited, 150, "{codes:?}");
    let allowed = 100.0 + 20.0 * start.elapsed().as_secs_f64() + 1.0;
    assert!(
        passed >= 100 && passed as f64 <= allowed && limited > 0,
        "{passed} passed, {limited} limited in {:?}",
        start.elapsed()
    );
    assert_eq!(codes[..100], [ErrorCode::TokenInvalid; 100]);
    assert_eq!(
        http_counter(&defaults, "joins_rate_limited").await,
        limited as u64
    );
    defaults.shutdown().await;

    let unlimited = server(Config {
        max_joins_per_ip: 0.0,
        ..test_config()
    })
    .await;
    let mut ws = connect(&unlimited).await;
    let codes = bad_token_joins(&mut ws, 150).await;
    assert!(
        codes.iter().all(|c| *c == ErrorCode::TokenInvalid),
        "{codes:?}"
    );
    ws.join("room", "p").await.unwrap();
    assert_eq!(http_counter(&unlimited, "joins_rate_limited").await, 0);
    unlimited.shutdown().await;
}

/// The synthetic peers (and so the load tester) wait the time a `join_rate_limited` names and
/// join again, instead of failing: four peers from one address against a burst of two all get
/// in, the last two only after waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synthetic_peers_wait_out_the_join_rate() {
    let server = server(Config {
        max_joins_per_ip: 4.0,
        join_burst_per_ip: 2,
        ..test_config()
    })
    .await;
    let started = Instant::now();
    let mut peers = Vec::new();
    for name in ["p1", "p2", "p3", "p4"] {
        peers.push(support::subscriber(&server, "waits", name).await);
    }
    let took = started.elapsed();
    assert_eq!(peers.len(), 4);
    assert!(
        took >= Duration::from_millis(400),
        "the last two waited for the rate ({took:?})"
    );
    assert!(http_counter(&server, "joins_rate_limited").await >= 2);
    for p in &peers {
        p.leave().await.unwrap();
    }
}
