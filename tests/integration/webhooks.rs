//! Webhooks against the real server with real WebRTC peers and a real HTTP receiver: every
//! event arrives (through a receiver that first refuses connections, then answers 500),
//! signed, in `seq` order per room without gaps, retries keep their `id`, `participant_left`
//! says why (a `leave` vs a removal through the admin API); and a receiver that never
//! answers neither holds up joins nor grows without bound.

// A test, not the packet path: the receiver shares what it got with the test, and the test
// reads the clock for its deadlines.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use plaza_testkit::token::with_grants as token;
use plaza_testkit::{self as common, support};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use common::PeerOptions;
use plaza::auth::DEV_API_SECRET;
use plaza::signal::LeaveReason;
use plaza::webhook::{Backoff, Event, EventKind, WebhookConfig, sign};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use support::{T, TestServer, opts, test_config};

/// One request the receiver got.
#[derive(Debug, Clone)]
struct Got {
    authorization: String,
    body: Vec<u8>,
    /// What the receiver answered.
    status: u16,
}

#[derive(Default)]
struct Receiver {
    got: Mutex<Vec<Got>>,
    /// Requests answered 500 before the receiver starts accepting.
    fail_first: AtomicUsize,
}

impl Receiver {
    fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// The accepted (2xx) events, parsed.
    fn accepted(&self) -> Vec<Event> {
        self.got()
            .iter()
            .filter(|g| g.status == 200)
            .map(|g| serde_json::from_slice(&g.body).expect("an event"))
            .collect()
    }
}

async fn hook(
    State(r): State<Arc<Receiver>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let failing = r
        .fail_first
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let status = if failing {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    r.got.lock().unwrap().push(Got {
        authorization: headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned(),
        body: body.to_vec(),
        status: status.as_u16(),
    });
    status
}

/// Serve the receiver on `listener`.
fn serve(listener: tokio::net::TcpListener, r: Arc<Receiver>) -> tokio::task::JoinHandle<()> {
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(r);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    })
}

/// A port nothing listens on (yet).
async fn free_port() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

fn config_with(url: String, f: impl FnOnce(&mut WebhookConfig)) -> plaza::config::Config {
    let mut c = test_config();
    c.webhook = WebhookConfig {
        urls: vec![url],
        backoff: Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_millis(400),
            retry_for: Duration::from_secs(60),
        },
        ..WebhookConfig::default()
    };
    f(&mut c.webhook);
    c
}

async fn peer(server: &TestServer, room: &str, identity: &str, publish: bool) -> common::Peer {
    let o = PeerOptions {
        token: Some(token(room, identity, |_| {})),
        ..opts(publish)
    };
    common::Peer::connect(&server.ws_url(), room, identity, o)
        .await
        .unwrap_or_else(|e| panic!("{identity} connects: {e:#}"))
}

/// Waits (at most `T`) until `f` holds for what the receiver accepted.
async fn wait_accepted(r: &Receiver, what: &str, f: impl Fn(&[Event]) -> bool) -> Vec<Event> {
    let deadline = Instant::now() + T;
    loop {
        let got = r.accepted();
        if f(&got) {
            return got;
        }
        assert!(Instant::now() < deadline, "{what}: got {got:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn unix_s() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn kinds(events: &[Event]) -> Vec<EventKind> {
    events.iter().map(|e| e.event).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_signed_in_order_with_reasons_through_a_failing_receiver() {
    let addr = free_port().await;
    let url = format!("http://{addr}/hook");
    let server = TestServer::start_with(config_with(url, |_| {})).await;
    let room = "hooks";

    // The receiver is down (connection refused) while alice and bob join and alice publishes.
    let alice = peer(&server, room, "alice", true).await;
    let bob = peer(&server, room, "bob", false).await;
    bob.wait_for_tracks(2, T)
        .await
        .expect("bob gets alice's tracks");
    let stats = server_stats(&server).await;
    assert!(
        stats["webhook_events_retried"].as_u64().unwrap() > 0,
        "refused connections are retried: {stats}"
    );

    // Then it comes up and answers 500 three times before it accepts.
    let r = Arc::new(Receiver::default());
    r.fail_first.store(3, Ordering::SeqCst);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .expect("the receiver's port is still free");
    let _rx_task = serve(listener, Arc::clone(&r));

    // Bob leaves; alice is removed through the admin API; the room ends.
    bob.leave().await.unwrap();
    let admin = token(room, "ops", |g| {
        g.room_join = false;
        g.room_admin = true;
    });
    let (status, body) = support::http_request(
        server.http_addr,
        "DELETE",
        &format!("/api/rooms/{room}/participants/alice"),
        &[("Authorization", &format!("Bearer {admin}"))],
        r#"{"reason":"test"}"#,
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body}");

    let events = wait_accepted(&r, "the room finishes", |evs| {
        evs.iter().any(|e| e.event == EventKind::RoomFinished)
    })
    .await;

    // Every request is signed with the development key, over its exact body.
    let got = r.got();
    for g in &got {
        let claims = sign::verify(&g.authorization, &g.body, DEV_API_SECRET, unix_s())
            .unwrap_or_else(|e| panic!("signature: {e}: {}", g.authorization));
        assert_eq!(claims.iss, plaza::auth::DEV_API_KEY);
    }
    // The three 500s were retried: the same event (same id, same body) came again.
    let refused: Vec<&Got> = got.iter().filter(|g| g.status == 500).collect();
    assert_eq!(refused.len(), 3);
    for g in refused {
        let e: Event = serde_json::from_slice(&g.body).unwrap();
        let again: Vec<&Got> = got
            .iter()
            .filter(|o| o.status == 200 && o.body == g.body)
            .collect();
        assert_eq!(
            again.len(),
            1,
            "event {} ({:?}) retried once it was refused",
            e.id,
            e.event
        );
    }
    // Each event once accepted, in seq order without gaps.
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    let want: Vec<u64> = (1..=events.len() as u64).collect();
    assert_eq!(seqs, want, "{events:#?}");
    let mut ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), events.len(), "distinct ids");
    assert!(events.iter().all(|e| e.room == room));

    use EventKind::*;
    let k = kinds(&events);
    assert_eq!(k.first(), Some(&RoomStarted));
    assert_eq!(k.last(), Some(&RoomFinished));
    assert_eq!(k.iter().filter(|&&e| e == ParticipantJoined).count(), 2);
    assert_eq!(k.iter().filter(|&&e| e == TrackPublished).count(), 2);
    assert_eq!(k.iter().filter(|&&e| e == TrackUnpublished).count(), 2);
    assert_eq!(k.len(), 10, "{k:?}");
    let who = |e: &Event| {
        e.participant
            .as_ref()
            .map(|p| p.name.clone())
            .unwrap_or_default()
    };
    let left: Vec<(String, Option<LeaveReason>)> = events
        .iter()
        .filter(|e| e.event == ParticipantLeft)
        .map(|e| (who(e), e.reason))
        .collect();
    assert_eq!(
        left,
        [
            ("bob".to_owned(), Some(LeaveReason::Left)),
            ("alice".to_owned(), Some(LeaveReason::Removed)),
        ]
    );
    // Tracks are alice's, unpublished before she leaves.
    for e in events
        .iter()
        .filter(|e| matches!(e.event, TrackPublished | TrackUnpublished))
    {
        assert_eq!(who(e), "alice");
        assert_eq!(
            e.track.as_ref().unwrap().participant_id,
            alice.participant_id()
        );
    }
    let alice_left = k.iter().rposition(|&e| e == ParticipantLeft).unwrap();
    assert!(
        k[..alice_left]
            .iter()
            .filter(|&&e| e == TrackUnpublished)
            .count()
            == 2
    );
    // Participants carry their session ids, as `joined` gave them.
    let sessions: BTreeMap<String, String> = events
        .iter()
        .filter(|e| e.event == ParticipantJoined)
        .map(|e| {
            let p = e.participant.clone().unwrap();
            (p.name, p.session_id)
        })
        .collect();
    assert_eq!(
        Some(&sessions["alice"]),
        alice.joined().session_id.as_ref(),
        "alice's session id"
    );
    assert_eq!(Some(&sessions["bob"]), bob.joined().session_id.as_ref());
    assert!(sessions["bob"].starts_with("SE_") && sessions["alice"] != sessions["bob"]);
    assert!(events.iter().all(|e| e.created_at > 1_700_000_000_000_000));

    let stats = server_stats(&server).await;
    assert_eq!(
        stats["webhook_events_delivered"].as_u64(),
        Some(10),
        "{stats}"
    );
    assert_eq!(stats["webhook_events_dropped"].as_u64(), Some(0), "{stats}");
    assert_eq!(stats["webhook_events_pending"].as_u64(), Some(0), "{stats}");
    server.shutdown().await;
}

/// A receiver that accepts connections and never answers: joins go on (the core only hands
/// events over), events beyond the queue are dropped and counted, and the server still shuts
/// down in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_receiver_does_not_hold_up_joins() {
    // Accepts and holds every connection, reads nothing, answers nothing.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let holder = {
        let held = Arc::clone(&held);
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                held.lock().unwrap().push(s);
            }
        })
    };
    let server = TestServer::start_with(config_with(format!("http://{addr}/hook"), |w| {
        w.queue = 4;
        // Longer than the whole test: a join waiting on a request would time out the test.
        w.timeout = Duration::from_secs(600);
    }))
    .await;
    let mut peers = Vec::new();
    let mut took = Vec::new();
    for i in 0..6 {
        let started = Instant::now();
        peers.push(peer(&server, "dead", &format!("p{i}"), false).await);
        took.push(started.elapsed());
    }
    eprintln!("joins with a dead webhook receiver: {took:?}");
    // room_started + 6 joins = 7 events: the first is in flight, 3 more wait, the rest drop.
    let deadline = Instant::now() + T;
    let stats = loop {
        let stats = server_stats(&server).await;
        if stats["webhook_events_dropped"].as_u64() >= Some(3) || Instant::now() > deadline {
            break stats;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(stats["webhook_events_pending"].as_u64(), Some(4), "{stats}");
    assert_eq!(stats["webhook_events_dropped"].as_u64(), Some(3), "{stats}");
    assert_eq!(
        stats["webhook_events_delivered"].as_u64(),
        Some(0),
        "{stats}"
    );
    assert!(
        !held.lock().unwrap().is_empty(),
        "the receiver got a connection"
    );
    for p in &peers {
        p.leave().await.unwrap();
    }
    let stopping = Instant::now();
    server.shutdown().await;
    assert!(
        stopping.elapsed() < plaza::server::SHUTDOWN_TIMEOUT + Duration::from_secs(2),
        "shutdown is bounded"
    );
    holder.abort();
}

async fn server_stats(server: &TestServer) -> serde_json::Value {
    let (status, body) = support::http_request(server.http_addr, "GET", "/healthz", &[], "")
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["webhooks"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whep_viewer_alone_opens_and_closes_its_room() {
    use plaza_testkit::whep::{WhepOptions, WhepViewer};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let r = Arc::new(Receiver::default());
    let _rx_task = serve(listener, Arc::clone(&r));
    let server = TestServer::start_with(config_with(format!("http://{addr}/hook"), |_| {})).await;
    let room = "stage";

    // A viewer in an empty room waits for a host: a hidden participant, alone.
    let tok = token(room, "player", |g| g.can_publish = Some(false));
    let o = WhepOptions {
        timeout: T,
        ..WhepOptions::default()
    };
    let mut viewer = WhepViewer::play(server.http_addr, &format!("/whep/{room}"), Some(&tok), o)
        .await
        .unwrap_or_else(|e| panic!("WHEP play: {e:#}"));
    let got = wait_accepted(&r, "the viewer's session starts", |e| {
        kinds(e).contains(&EventKind::WhepSessionStarted)
            && kinds(e).contains(&EventKind::ParticipantJoined)
    })
    .await;
    assert_eq!(got[0].event, EventKind::RoomStarted, "{got:#?}");
    let joined = got
        .iter()
        .find(|e| e.event == EventKind::ParticipantJoined)
        .unwrap();
    let who = joined.participant.as_ref().expect("a participant");
    assert!(who.hidden, "a WHEP viewer is hidden: {joined:#?}");
    assert!(who.session_id.starts_with("SE_"), "{joined:#?}");
    let started = got
        .iter()
        .find(|e| e.event == EventKind::WhepSessionStarted)
        .unwrap();
    assert_eq!(
        started.participant.as_ref().map(|p| &p.id),
        Some(&who.id),
        "the session event names the same participant"
    );

    // DELETE ends the session and, the room being empty, the room.
    assert_eq!(viewer.delete().await.unwrap(), 200);
    let got = wait_accepted(&r, "the room finishes", |e| {
        kinds(e).contains(&EventKind::RoomFinished)
    })
    .await;
    let k = kinds(&got);
    assert!(k.contains(&EventKind::WhepSessionEnded), "{k:?}");
    let left = got
        .iter()
        .find(|e| e.event == EventKind::ParticipantLeft)
        .expect("participant_left");
    assert_eq!(left.reason, Some(LeaveReason::Left), "{left:#?}");
    assert_eq!(k.last(), Some(&EventKind::RoomFinished), "{k:?}");
    let seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=got.len() as u64).collect::<Vec<_>>(), "{got:#?}");

    // /metrics counts the deliveries too.
    let (status, text) = support::http_request(server.http_addr, "GET", "/metrics", &[], "")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let value = |name: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} in /metrics:\n{text}"))
    };
    assert!(
        value("plaza_webhook_events_delivered_total") >= got.len() as u64,
        "{text}"
    );
    assert_eq!(value("plaza_webhook_events_dropped_total"), 0);
    server.shutdown().await;
}
