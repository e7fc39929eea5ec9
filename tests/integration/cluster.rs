//! The cluster's node registry with a real `redis-server` (testkit `redis`) and real Plaza
//! nodes: nodes register with their load and see each other (`GET /api/nodes`), a graceful
//! shutdown removes a node at once, a node that stops heartbeating drops out after its TTL,
//! a Redis restart does not stop a node from serving and the node re-registers, and without
//! `--redis` no cluster code runs; a room extended to a second node (`--cluster-span-above`)
//! carries media, data and membership between the two over the node link, and survives the
//! loss of its first node. Every wait polls with a deadline.

// Tests: deadlines read the clock.
#![allow(clippy::disallowed_methods)]

use plaza::cluster::ClusterConfig;
use plaza_testkit::redis::RedisServer;
use plaza_testkit::support::{self, TestServer, test_config};
use plaza_testkit::token::with_grants;
use serde_json::Value;
use std::time::{Duration, Instant};

/// The registry's record TTL (its default heartbeat timing).
const TTL: Duration = Duration::from_secs(3);
/// Bound of every wait that is not about the TTL.
const WAIT: Duration = Duration::from_secs(10);

async fn node(redis: &RedisServer, id: &str) -> TestServer {
    node_spanning(redis, id, 0).await
}

/// A node whose rooms are extended to the other nodes from `span_above` participants.
async fn node_spanning(redis: &RedisServer, id: &str, span_above: usize) -> TestServer {
    TestServer::start_with(plaza::config::Config {
        cluster: ClusterConfig {
            redis: Some(redis.url()),
            node_id: Some(id.to_owned()),
            node_address: None,
            span_above,
            link_port: 0,
        },
        ..test_config()
    })
    .await
}

fn list_token() -> String {
    with_grants("any", "ops", |g| {
        g.room_join = false;
        g.room_list = true;
    })
}

/// `GET /api/nodes` on `server`: (status, body).
async fn nodes(server: &TestServer) -> (u16, Value) {
    let auth = format!("Bearer {}", list_token());
    let (status, text) = support::http_request(
        server.http_addr,
        "GET",
        "/api/nodes",
        &[("Authorization", auth.as_str())],
        "",
    )
    .await
    .expect("GET /api/nodes");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// The ids in a `/api/nodes` listing.
fn ids(list: &Value) -> Vec<String> {
    list["nodes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| n["id"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `server`'s listing until `pred` holds; panics after `within`. Returns the listing
/// and the time it took.
async fn wait_nodes(
    server: &TestServer,
    within: Duration,
    what: &str,
    pred: impl Fn(&Value) -> bool,
) -> (Value, Duration) {
    let start = Instant::now();
    loop {
        let (status, list) = nodes(server).await;
        if status == 200 && pred(&list) {
            return (list, start.elapsed());
        }
        assert!(
            start.elapsed() < within,
            "{what}: not within {within:?}; last answer {status} {list}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn cluster_stats(server: &TestServer) -> Value {
    let (_, s) = support::stats(server.http_addr).await.expect("/stats");
    s["cluster"].clone()
}

/// Polls `server`'s `/stats` `cluster` until `pred` holds (within [`WAIT`]); returns it.
async fn wait_stats(server: &TestServer, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let c = cluster_stats(server).await;
        if pred(&c) {
            return c;
        }
        assert!(start.elapsed() < WAIT, "{what}: not within {WAIT:?}: {c}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_register_and_see_each_other_with_their_load() {
    let redis = RedisServer::start().expect("redis-server");
    let a = node(&redis, "ND_a").await;
    let b = node(&redis, "ND_b").await;
    let _alice = support::publisher(&a, "room1", "alice").await;

    // B sees A with A's room and participant (a heartbeat after the join).
    let (list, _) = wait_nodes(&b, WAIT, "both nodes, A with its participant", |l| {
        ids(l) == ["ND_a", "ND_b"]
            && l["nodes"][0]["load"]["participants"] == 1
            && l["nodes"][0]["load"]["cpu_percent"].is_number()
    })
    .await;
    assert_eq!(list["self"], "ND_b");
    let rec_a = &list["nodes"][0];
    assert_eq!(rec_a["address"], a.http_addr.to_string(), "{rec_a}");
    assert_eq!(rec_a["media"][0], a.udp_addr.to_string(), "{rec_a}");
    assert_eq!(rec_a["load"]["rooms"], 1, "{rec_a}");
    assert_eq!(rec_a["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(rec_a["ttl_ms"], TTL.as_millis() as u64);
    assert!(rec_a["started_at"].as_u64().unwrap() > 0);
    assert!(rec_a["heartbeat_at"].as_u64() >= rec_a["started_at"].as_u64());
    assert!(rec_a["load"]["forwarded_pps"].is_number(), "{rec_a}");
    assert!(rec_a["load"]["cpu_percent"].is_number(), "{rec_a}");
    let rec_b = &list["nodes"][1];
    assert_eq!(rec_b["load"]["participants"], 0, "{rec_b}");

    // A sees the same cluster.
    wait_nodes(&a, WAIT, "A lists both", |l| ids(l) == ["ND_a", "ND_b"]).await;

    // Each record publishes the node's end of the node link, and the two links hear each
    // other (authenticated with the keys the records carry).
    let link = &rec_a["link"];
    assert!(
        link["address"]
            .as_str()
            .is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{rec_a}"
    );
    assert!(link["num"].is_u64() && link["key"].as_str().is_some_and(|k| k.len() == 44));
    for n in [&a, &b] {
        wait_stats(n, "the link peer up", |c| c["link_peers_up"] == 1).await;
    }

    // Counters in /stats and /metrics.
    let c = cluster_stats(&a).await;
    assert_eq!(c["enabled"], true, "{c}");
    assert_eq!(c["node_id"], "ND_a");
    assert_eq!(c["registered"], true, "{c}");
    assert!(c["heartbeats"].as_u64().unwrap() >= 1, "{c}");
    assert_eq!(c["heartbeat_failures"], 0, "{c}");
    let (_, metrics) = support::http_get(a.http_addr, "/metrics")
        .await
        .expect("/metrics");
    assert!(metrics.contains("plaza_cluster_registered 1"), "{metrics}");
    assert!(
        metrics.contains("plaza_cluster_heartbeat_failures_total 0"),
        "{metrics}"
    );

    // The listing needs the roomList grant.
    let (status, _) = support::http_get(a.http_addr, "/api/nodes")
        .await
        .expect("GET");
    assert_eq!(status, 401);

    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_deregisters_at_once() {
    let redis = RedisServer::start().expect("redis-server");
    let a = node(&redis, "ND_a").await;
    let b = node(&redis, "ND_b").await;
    wait_nodes(&a, WAIT, "both nodes", |l| ids(l) == ["ND_a", "ND_b"]).await;
    let took = b.shutdown().await;
    // Gone as soon as the shutdown returns: the first listing after it lacks B.
    let (status, list) = nodes(&a).await;
    assert_eq!(status, 200);
    assert_eq!(
        ids(&list),
        ["ND_a"],
        "B deregistered on shutdown ({took:?})"
    );
    assert!(took < TTL, "the shutdown took {took:?}");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_heartbeating_drops_out_after_the_ttl() {
    let redis = RedisServer::start().expect("redis-server");
    let a = node(&redis, "ND_a").await;
    let b = node(&redis, "ND_b").await;
    wait_nodes(&a, WAIT, "both nodes", |l| ids(l) == ["ND_a", "ND_b"]).await;
    // Dropped without its shutdown path: the heartbeat stops, nothing deregisters.
    drop(b);
    let (_, list) = nodes(&a).await;
    assert_eq!(
        ids(&list),
        ["ND_a", "ND_b"],
        "still listed until the TTL runs out"
    );
    let (_, took) = wait_nodes(&a, TTL + Duration::from_secs(2), "B expired", |l| {
        ids(l) == ["ND_a"]
    })
    .await;
    // The last heartbeat was at most one interval (1 s) before the drop.
    assert!(
        took >= TTL - Duration::from_millis(1100),
        "gone after {took:?}"
    );
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_keeps_serving_while_redis_is_down_and_registers_again() {
    let mut redis = RedisServer::start().expect("redis-server");
    let port = redis.port;
    let a = node(&redis, "ND_a").await;
    wait_nodes(&a, WAIT, "A registered", |l| ids(l) == ["ND_a"]).await;
    // Media already flowing when Redis goes.
    let host = support::publisher(&a, "flowing", "host").await;
    let fan = support::subscriber(&a, "flowing", "fan").await;
    let track = support::announced_track(&fan, &host, plaza::signal::TrackKind::Video).await;
    support::wait_growth(&fan, &track.id, 10).await;

    redis.kill();
    // The next heartbeat fails; the node says so and keeps serving.
    let start = Instant::now();
    loop {
        let c = cluster_stats(&a).await;
        if c["registered"] == false && c["heartbeat_failures"].as_u64() >= Some(1) {
            assert_eq!(c["outages"], 1, "{c}");
            break;
        }
        assert!(start.elapsed() < WAIT, "the outage is not seen: {c}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _) = nodes(&a).await;
    assert_eq!(status, 503, "the listing needs Redis");
    support::assert_media_flows("during the outage", &[(&fan, &track.id)], 50).await;
    // Signaling and media do not wait for Redis: a join during the outage succeeds.
    let joined = Instant::now();
    let alice = support::publisher(&a, "during-outage", "alice").await;
    let joined = joined.elapsed();
    assert!(joined < Duration::from_secs(5), "join took {joined:?}");

    // Redis back on the same port (empty: no persistence): the node registers again.
    let _redis = RedisServer::start_on(port).expect("redis-server restarted");
    let (list, back) = wait_nodes(&a, WAIT, "A registered again", |l| {
        ids(l) == ["ND_a"] && l["nodes"][0]["load"]["participants"] == 3
    })
    .await;
    assert_eq!(list["nodes"][0]["load"]["rooms"], 2);
    let c = cluster_stats(&a).await;
    assert_eq!(c["registered"], true, "{c}");
    assert_eq!(c["outages"], 1, "one outage: {c}");
    // The join during the outage was served here (no placement), and the rooms' leases are
    // back with the registration.
    assert_eq!(c["placement_fallbacks"], 1, "{c}");
    wait_lease(&_redis, "during-outage", Some("ND_a"), WAIT).await;
    wait_lease(&_redis, "flowing", Some("ND_a"), WAIT).await;
    support::assert_media_flows("after the outage", &[(&fan, &track.id)], 20).await;
    eprintln!("re-registered {back:?} after Redis came back; join during the outage {joined:?}");
    drop(alice);
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_no_cluster_code_runs() {
    let server = TestServer::start().await;
    let c = cluster_stats(&server).await;
    assert_eq!(c["enabled"], false, "{c}");
    assert_eq!(c["heartbeats"], 0, "{c}");
    let (status, body) = nodes(&server).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["code"], "not_found");
    let (_, metrics) = support::http_get(server.http_addr, "/metrics")
        .await
        .expect("/metrics");
    assert!(!metrics.contains("plaza_cluster_"), "no cluster metrics");
    server.shutdown().await;
}

/// The lease of `room` in Redis: the id of the node that hosts it.
/// A WHEP viewer of `room` whose `POST` goes to `node`, once it receives the room's video.
async fn play_video_through(node: &TestServer, room: &str) -> plaza_testkit::whep::WhepViewer {
    let token = with_grants(room, "viewer", |g| {
        g.can_publish = Some(false);
        g.can_publish_data = Some(false);
    });
    let viewer = plaza_testkit::whep::WhepViewer::play(
        node.http_addr,
        &format!("/whep/{room}"),
        Some(&token),
        plaza_testkit::whep::WhepOptions::default(),
    )
    .await
    .expect("WHEP POST");
    viewer
        .wait_for_packets(plaza::signal::TrackKind::Video, 20, WAIT)
        .await
        .expect("the viewer plays the room's video");
    viewer
}

/// The messages published on the cluster's room event channels (`plaza:room-events:*`), as a
/// subscriber collects them.
#[allow(clippy::disallowed_types)] // shared with the collecting task
struct RoomEvents(std::sync::Arc<std::sync::Mutex<Vec<Value>>>);

impl RoomEvents {
    fn all(&self) -> Vec<Value> {
        self.0.lock().unwrap().clone()
    }

    /// The first message matching `pred`, waiting at most `within`.
    async fn wait(&self, within: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        let start = Instant::now();
        loop {
            if let Some(m) = self.all().into_iter().find(|m| pred(m)) {
                return Some(m);
            }
            if start.elapsed() > within {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[allow(clippy::disallowed_types)] // as above
async fn room_events(redis: &RedisServer) -> RoomEvents {
    use futures_util::StreamExt as _;
    let client = ::redis::Client::open(redis.url()).expect("redis URL");
    let mut sub = client.get_async_pubsub().await.expect("pubsub connection");
    sub.psubscribe("plaza:room-events:*")
        .await
        .expect("PSUBSCRIBE");
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = std::sync::Arc::clone(&seen);
    tokio::spawn(async move {
        let mut stream = sub.into_on_message();
        while let Some(msg) = stream.next().await {
            if let Ok(text) = msg.get_payload::<String>()
                && let Ok(v) = serde_json::from_str::<Value>(&text)
            {
                sink.lock().unwrap().push(v);
            }
        }
    });
    RoomEvents(seen)
}

/// Writes `room`'s lease as `node`'s (for 10 s; the node renews it once the room is open
/// there), so that the room starts there whatever the nodes' loads.
async fn place_on(redis: &RedisServer, room: &str, node: &str) {
    let client = ::redis::Client::open(redis.url()).expect("redis URL");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    ::redis::cmd("SET")
        .arg(plaza::cluster::placement::room_key(room))
        .arg(node)
        .arg("PX")
        .arg(10_000)
        .query_async::<()>(&mut conn)
        .await
        .expect("SET lease");
}

async fn lease(redis: &RedisServer, room: &str) -> Option<String> {
    let client = ::redis::Client::open(redis.url()).expect("redis URL");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    ::redis::cmd("GET")
        .arg(plaza::cluster::placement::room_key(room))
        .query_async(&mut conn)
        .await
        .expect("GET lease")
}

/// Waits until `room`'s lease is `want`; panics after `within`.
async fn wait_lease(redis: &RedisServer, room: &str, want: Option<&str>, within: Duration) {
    let start = Instant::now();
    loop {
        let now = lease(redis, room).await;
        if now.as_deref() == want {
            return;
        }
        assert!(
            start.elapsed() < within,
            "lease of {room}: {now:?}, wanted {want:?} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participants_joining_through_either_node_meet_on_the_rooms_node() {
    use plaza::signal::TrackKind;
    let redis = RedisServer::start().expect("redis-server");
    let a = node(&redis, "ND_a").await;
    let b = node(&redis, "ND_b").await;
    wait_nodes(&a, WAIT, "both nodes", |l| ids(l) == ["ND_a", "ND_b"]).await;

    // Both nodes idle: the room stays where its first join arrives.
    let alice = support::publisher(&a, "meet", "alice").await;
    assert_eq!(alice.redirects(), 0);
    assert_eq!(lease(&redis, "meet").await.as_deref(), Some("ND_a"));
    // Bob joins through B: sent to A, where alice is.
    let bob = support::publisher(&b, "meet", "bob").await;
    assert_eq!(bob.redirects(), 1, "bob followed one redirect");
    assert_eq!(bob.url(), a.ws_url());
    assert!(
        bob.joined().participants.iter().any(|p| p.name == "alice"),
        "bob met alice: {:?}",
        bob.joined().participants
    );

    // Media and data both ways.
    let from_alice = support::announced_track(&bob, &alice, TrackKind::Video).await;
    let from_bob = support::announced_track(&alice, &bob, TrackKind::Video).await;
    support::assert_media_flows(
        "alice ⇄ bob",
        &[(&bob, &from_alice.id), (&alice, &from_bob.id)],
        30,
    )
    .await;
    bob.send_chat("hello from B's door", None).await.unwrap();
    alice
        .wait_for_message(|m| m.text() == Some("hello from B's door"), WAIT)
        .await
        .expect("alice gets bob's chat");

    // A WHEP viewer through B: 307 to A, and it plays alice.
    let mut viewer = play_video_through(&b, "meet").await;

    let (ca, cb) = (cluster_stats(&a).await, cluster_stats(&b).await);
    assert_eq!(cb["redirected"], 2, "bob and the viewer: {cb}");
    assert_eq!(cb["placed_here"], 0, "{cb}");
    let (_, metrics) = support::http_get(b.http_addr, "/metrics")
        .await
        .expect("/metrics");
    assert!(
        metrics.contains("plaza_cluster_joins_redirected_total 2"),
        "{metrics}"
    );
    assert_eq!(ca["redirected"], 0, "{ca}");
    assert_eq!(ca["placed_here"], 3, "alice, bob, the viewer: {ca}");

    // The lease outlives its TTL while the room lives (renewed by A's heartbeat), and it
    // goes with the room's last participant.
    tokio::time::sleep(TTL + Duration::from_millis(500)).await;
    assert_eq!(lease(&redis, "meet").await.as_deref(), Some("ND_a"));
    assert!(cluster_stats(&a).await["leases"] == 1);
    assert_eq!(viewer.delete().await.expect("DELETE"), 200);
    alice.leave().await.unwrap();
    bob.leave().await.unwrap();
    wait_lease(&redis, "meet", None, TTL).await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_rooms_go_to_the_least_loaded_node() {
    let redis = RedisServer::start().expect("redis-server");
    let a = node(&redis, "ND_a").await;
    let b = node(&redis, "ND_b").await;
    let _p1 = support::subscriber(&a, "busy", "p1").await;
    let _p2 = support::subscriber(&a, "busy", "p2").await;
    // Once the heartbeat tells the cluster A's load, a new room goes to B, wherever its
    // first participant knocks.
    wait_nodes(&a, WAIT, "A's load published", |l| {
        ids(l) == ["ND_a", "ND_b"] && l["nodes"][0]["load"]["participants"] == 2
    })
    .await;
    let q = support::subscriber(&a, "fresh", "q").await;
    assert_eq!(q.url(), b.ws_url(), "the new room is on B");
    assert_eq!(lease(&redis, "fresh").await.as_deref(), Some("ND_b"));
    // A join for an existing room stays with the room, however loaded its node.
    let p3 = support::subscriber(&b, "busy", "p3").await;
    assert_eq!(p3.url(), a.ws_url());
    a.shutdown().await;
    b.shutdown().await;
}

/// A Plaza node as its own process (so that it can be killed), in the cluster of `redis`.
struct NodeProcess(std::process::Child);

impl NodeProcess {
    fn start(redis: &RedisServer, id: &str) -> NodeProcess {
        NodeProcess::start_with(redis, id, &[])
    }

    /// ... with `extra` arguments on its command line.
    fn start_with(redis: &RedisServer, id: &str, extra: &[&str]) -> NodeProcess {
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_plaza"))
            .args(["--port", "0", "--udp-port", "0", "--tcp-port", "off"])
            .args(["--workers", "1", "--log-level", "warn"])
            .args(["--redis", &redis.url(), "--node-id", id])
            .args(extra)
            .env_remove("PLAZA_API_KEY")
            .env_remove("PLAZA_API_SECRET")
            .env_remove("PLAZA_CONFIG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start the plaza binary");
        NodeProcess(child)
    }

    /// SIGKILL: no shutdown path runs, the record and the leases stay until their TTL.
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_room_is_placed_again_and_its_clients_come_back() {
    use plaza::signal::TrackKind;
    let redis = RedisServer::start().expect("redis-server");
    let a = node(&redis, "ND_a").await;
    let mut b = NodeProcess::start(&redis, "ND_b");
    let (list, _) = wait_nodes(&a, WAIT, "B registered", |l| ids(l) == ["ND_a", "ND_b"]).await;
    let b_url = format!("ws://{}/rtc", list["nodes"][1]["address"].as_str().unwrap());
    // The room starts on B: its first participant joins there directly.
    let opts = support::opts(true);
    let alice = plaza_testkit::peer::Peer::connect(&b_url, "live", "alice", opts.clone())
        .await
        .expect("alice joins on B");
    assert_eq!(alice.redirects(), 0);
    // Bob knocks on A and is sent to B.
    let bob = support::publisher(&a, "live", "bob").await;
    assert_eq!(bob.url(), b_url);
    let track = support::announced_track(&bob, &alice, TrackKind::Video).await;
    support::wait_growth(&bob, &track.id, 20).await;

    wait_stats(&a, "B's link up", |c| c["link_peers_up"] == 1).await;

    // B dies. Its clients rejoin through their entry node, A: until B is late with a
    // heartbeat they are sent to B and fail; then A probes B, finds it dead and places the
    // room again, on A — before B's record has expired.
    b.kill();
    let killed = Instant::now();
    let rejoin = |name: &'static str| {
        let url = a.ws_url();
        let opts = opts.clone();
        async move {
            loop {
                match plaza_testkit::peer::Peer::connect(&url, "live", name, opts.clone()).await {
                    Ok(p) => return p,
                    Err(e) => {
                        assert!(killed.elapsed() < TTL + WAIT, "{name} is not back: {e:#}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        }
    };
    let (alice2, bob2) = tokio::join!(rejoin("alice"), rejoin("bob"));
    let back = killed.elapsed();
    assert_eq!(alice2.url(), a.ws_url());
    assert_eq!(bob2.url(), a.ws_url());
    assert_eq!(lease(&redis, "live").await.as_deref(), Some("ND_a"));
    let track = support::announced_track(&bob2, &alice2, TrackKind::Video).await;
    support::wait_growth(&bob2, &track.id, 20).await;
    let media_back = killed.elapsed();
    let c = cluster_stats(&a).await;
    assert_eq!(c["rooms_taken_over"], 1, "{c}");
    // The node link says B is silent within its 3 s bound (pings every 0.5 s), or B's record
    // expired first (both take about 3 s): either way B is down once.
    let c = wait_stats(&a, "B's link down", |c| c["link_peers_up"] == 0).await;
    assert_eq!(c["link_peer_downs"], 1, "{c}");
    assert!(
        killed.elapsed() < Duration::from_secs(6),
        "link down after {:?}",
        killed.elapsed()
    );
    eprintln!("node killed → both rejoined in {back:?}, media flowing again {media_back:?}");
    assert!(
        back < TTL,
        "back after {back:?}: the room waited for B's record to expire"
    );
    drop((alice, bob));
    a.shutdown().await;
}

/// A node of a spanning room is killed (SIGKILL: no goodbye on the link, its record and
/// lease stay until their TTL): the other node notices the silence, the killed node's
/// participants leave the room there, the room's timeline and lease move to the survivor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_leaves_a_spanning_room_that_lives_on() {
    use plaza::signal::{ServerMessage, TrackKind};
    let redis = RedisServer::start().expect("redis-server");
    let b = node_spanning(&redis, "ND_b", 1).await;
    let mut a = NodeProcess::start_with(&redis, "ND_a", &["--cluster-span-above", "1"]);
    let (list, _) = wait_nodes(&b, WAIT, "A registered", |l| ids(l) == ["ND_a", "ND_b"]).await;
    let a_url = format!("ws://{}/rtc", list["nodes"][0]["address"].as_str().unwrap());
    wait_stats(&b, "A's link up", |c| c["link_peers_up"] == 1).await;
    // The room's home is A; bob and carol join through B, which extends it.
    place_on(&redis, "span", "ND_a").await;
    let alice = plaza_testkit::peer::Peer::connect(&a_url, "span", "alice", support::opts(true))
        .await
        .expect("alice joins on A");
    assert_eq!(alice.redirects(), 0);
    let bob = support::publisher(&b, "span", "bob").await;
    let carol = support::publisher(&b, "span", "carol").await;
    assert_eq!(bob.url(), b.ws_url(), "bob is served by B");
    assert_eq!(carol.url(), b.ws_url(), "carol is served by B");
    let from_alice = support::announced_track(&bob, &alice, TrackKind::Video).await;
    support::wait_growth(&bob, &from_alice.id, 20).await;
    let alice_id = alice.participant_id().to_owned();

    a.kill();
    // Only the link's silence (3 s) or A's record expiring tells B: A said nothing.
    bob.wait_for_server(
        |m| matches!(m, ServerMessage::ParticipantLeft { participant_id, .. } if *participant_id == alice_id),
        TTL + WAIT,
    )
    .await
    .expect("bob sees alice go with her killed node");
    let c = wait_stats(&b, "A's link down", |c| c["link_peers_up"] == 0).await;
    assert_eq!(c["link_peer_downs"], 1, "{c}");
    // The room's timeline now runs on B: chat between B's participants still flows.
    carol.send_chat("after A", None).await.unwrap();
    bob.wait_for_message(|m| m.text() == Some("after A"), WAIT)
        .await
        .expect("bob gets carol's chat");
    // And B takes the room's lease once A's has expired (`place_on` wrote it for 10 s).
    let start = Instant::now();
    loop {
        let holder = lease(&redis, "span").await;
        if holder.as_deref() == Some("ND_b") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10) + WAIT,
            "the lease stays {holder:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.shutdown().await;
}

/// An admin call through `server`: (status, JSON body, the `x-plaza-node` header).
async fn admin_call(
    server: &TestServer,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, Value, Option<String>) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    let reply = support::http(server.http_addr, method, path, &headers, body.as_bytes())
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"));
    let value = serde_json::from_str(&reply.body).unwrap_or(Value::String(reply.body.clone()));
    (
        reply.status,
        value,
        reply.header("x-plaza-node").map(str::to_owned),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_reach_the_rooms_node_through_any_node() {
    let redis = RedisServer::start().expect("redis-server");
    let a = node(&redis, "ND_a").await;
    let b = node(&redis, "ND_b").await;
    wait_nodes(&a, WAIT, "both nodes", |l| ids(l) == ["ND_a", "ND_b"]).await;
    let alice = support::subscriber(&a, "on-a", "alice").await;
    let bob = support::subscriber(&a, "on-a", "bob").await;
    let carol = support::subscriber(&b, "on-b", "carol").await;
    assert_eq!(carol.url(), b.ws_url());
    let admin = with_grants("on-a", "ops", |g| {
        g.room_join = false;
        g.room_admin = true;
    });

    // Listing rooms through either node lists every node's rooms, each with its node.
    for via in [&a, &b] {
        let (status, list, _) = admin_call(via, "GET", "/api/rooms", Some(&list_token()), "").await;
        assert_eq!(status, 200, "{list}");
        assert_eq!(list["complete"], true, "{list}");
        let mut rooms: Vec<(String, String)> = list["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["name"].as_str().unwrap().to_owned(),
                    r["node"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        rooms.sort();
        assert_eq!(
            rooms,
            [
                ("on-a".into(), "ND_a".into()),
                ("on-b".into(), "ND_b".into())
            ],
            "{list}"
        );
    }

    // A room's calls through B are answered by A, the room's node.
    let (status, list, by) =
        admin_call(&b, "GET", "/api/rooms/on-a/participants", Some(&admin), "").await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(by.as_deref(), Some("ND_a"));
    assert_eq!(
        list["participants"].as_array().map(Vec::len),
        Some(2),
        "{list}"
    );
    let bob_identity = list["participants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "bob")
        .and_then(|p| p["identity"].as_str())
        .unwrap_or_else(|| panic!("bob listed: {list}"))
        .to_owned();
    let (status, done, by) = admin_call(
        &b,
        "DELETE",
        &format!("/api/rooms/on-a/participants/{bob_identity}"),
        Some(&admin),
        r#"{"reason":"bye from B"}"#,
    )
    .await;
    assert_eq!((status, by.as_deref()), (200, Some("ND_a")), "{done}");
    bob.wait_for_event(
        |e| {
            matches!(e, plaza_testkit::peer::PeerEvent::Server(
                plaza::signal::ServerMessage::Leave { reason, .. }
            ) if reason.contains("bye from B"))
        },
        WAIT,
    )
    .await
    .expect("bob is removed with the reason");

    // Refusals happen at the door: no token is carried anywhere.
    let (status, refused, by) =
        admin_call(&b, "GET", "/api/rooms/on-a/participants", None, "").await;
    assert_eq!(status, 401, "{refused}");
    assert_eq!(by, None, "refused by B itself");
    // A room nobody hosts is answered where asked.
    let ghost = with_grants("ghost", "ops", |g| {
        g.room_join = false;
        g.room_admin = true;
    });
    let (status, _, by) =
        admin_call(&b, "GET", "/api/rooms/ghost/participants", Some(&ghost), "").await;
    assert_eq!((status, by), (404, None));
    drop((alice, carol));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_spans_two_nodes_with_media_and_data_both_ways() {
    use plaza::signal::{ServerMessage, TrackKind};
    let redis = RedisServer::start().expect("redis-server");
    let a = node_spanning(&redis, "ND_a", 1).await;
    let b = node_spanning(&redis, "ND_b", 1).await;
    wait_nodes(&a, WAIT, "both nodes", |l| ids(l) == ["ND_a", "ND_b"]).await;
    wait_stats(&a, "B's link up", |c| c["link_peers_up"] == 1).await;
    wait_stats(&b, "A's link up", |c| c["link_peers_up"] == 1).await;

    // Every node's room events, as a subscriber of the cluster's Redis sees them.
    let events = room_events(&redis).await;
    // The room starts on A; with one participant it is extended to every node.
    place_on(&redis, "span", "ND_a").await;
    let alice = support::publisher(&a, "span", "alice").await;
    assert_eq!(lease(&redis, "span").await.as_deref(), Some("ND_a"));
    // Bob joins through B and stays there: B extends the room.
    let bob = support::publisher(&b, "span", "bob").await;
    assert_eq!(bob.redirects(), 0, "bob is served by B");
    assert_eq!(bob.url(), b.ws_url());
    bob.wait_for_participant(|p| p.name == "alice", WAIT)
        .await
        .expect("bob meets alice (on A)");
    alice
        .wait_for_participant(|p| p.name == "bob", WAIT)
        .await
        .expect("alice meets bob (on B)");

    // Media both ways, each packet crossing the node link once.
    let from_alice = support::announced_track(&bob, &alice, TrackKind::Video).await;
    let from_bob = support::announced_track(&alice, &bob, TrackKind::Video).await;
    support::assert_media_flows(
        "alice (A) ⇄ bob (B)",
        &[(&bob, &from_alice.id), (&alice, &from_bob.id)],
        30,
    )
    .await;
    // Data both ways, sequenced on the room's home (on A).
    bob.send_chat("hello from B", None).await.unwrap();
    alice
        .wait_for_message(|m| m.text() == Some("hello from B"), WAIT)
        .await
        .expect("alice gets bob's chat");
    alice.send_chat("hello from A", None).await.unwrap();
    bob.wait_for_message(|m| m.text() == Some("hello from A"), WAIT)
        .await
        .expect("bob gets alice's chat");

    // A WHEP viewer through B plays there too.
    let mut viewer = play_video_through(&b, "span").await;

    // The room's events came through Redis pub/sub from both nodes, each about its own.
    for (event, who, node) in [
        ("participant_joined", "alice", "ND_a"),
        ("participant_joined", "bob", "ND_b"),
        ("track_published", "alice", "ND_a"),
        ("track_published", "bob", "ND_b"),
    ] {
        events
            .wait(WAIT, |m| {
                m["room"] == "span"
                    && m["event"] == event
                    && m["participant"]["name"] == who
                    && m["node"] == node
            })
            .await
            .unwrap_or_else(|| panic!("no {event} of {who} from {node}: {:?}", events.all()));
    }

    let (ca, cb) = (cluster_stats(&a).await, cluster_stats(&b).await);
    assert_eq!(cb["extended_joins"], 2, "bob and the viewer: {cb}");
    assert_eq!(cb["redirected"], 0, "{cb}");
    assert_eq!(ca["placed_here"], 1, "alice: {ca}");
    // The lease stays A's: B never claims a room whose home is elsewhere.
    tokio::time::sleep(TTL).await;
    assert_eq!(lease(&redis, "span").await.as_deref(), Some("ND_a"));
    let cb = cluster_stats(&b).await;
    assert_eq!(
        (cb["leases"].as_u64(), cb["lease_conflicts"].as_u64()),
        (Some(0), Some(0)),
        "{cb}"
    );

    // The admin API through either node sees the room's participants on both, and reaches
    // one served by B through A (the room's node does not know it: the call goes on to B).
    let admin = with_grants("span", "ops", |g| {
        g.room_join = false;
        g.room_admin = true;
    });
    for via in [&a, &b] {
        let (status, list, _) =
            admin_call(via, "GET", "/api/rooms/span/participants", Some(&admin), "").await;
        assert_eq!(status, 200, "{list}");
        let mut seen: Vec<(String, String)> = list["participants"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["name"] != "viewer")
            .map(|p| {
                (
                    p["name"].as_str().unwrap().into(),
                    p["node"].as_str().unwrap().into(),
                )
            })
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            [
                ("alice".into(), "ND_a".into()),
                ("bob".into(), "ND_b".into())
            ],
            "{list}"
        );
    }
    let dave = support::subscriber(&b, "span", "dave").await;
    let (_, list, _) =
        admin_call(&a, "GET", "/api/rooms/span/participants", Some(&admin), "").await;
    let dave_identity = list["participants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "dave")
        .and_then(|p| p["identity"].as_str())
        .unwrap_or_else(|| panic!("dave listed: {list}"))
        .to_owned();
    let (status, answer, by) = admin_call(
        &a,
        "GET",
        &format!("/api/rooms/span/participants/{dave_identity}"),
        Some(&admin),
        "",
    )
    .await;
    assert_eq!((status, by.as_deref()), (200, Some("ND_b")), "{answer}");
    assert_eq!(answer["participant"]["name"], "dave", "{answer}");
    let (status, answer, by) = admin_call(
        &a,
        "DELETE",
        &format!("/api/rooms/span/participants/{dave_identity}"),
        Some(&admin),
        r#"{"reason":"bye from A"}"#,
    )
    .await;
    assert_eq!((status, by.as_deref()), (200, Some("ND_b")), "{answer}");
    dave.wait_removed(WAIT)
        .await
        .expect("dave (on B) is removed through A");

    // Carol joins through B too; then A goes away. The room lives on, on B: alice leaves
    // B's view, B's participants still talk, and B takes the lease.
    let carol = support::publisher(&b, "span", "carol").await;
    assert_eq!(carol.url(), b.ws_url());
    assert_eq!(viewer.delete().await.expect("DELETE"), 200);
    let alice_id = alice.participant_id().to_owned();
    a.shutdown().await;
    bob.wait_for_server(
        |m| matches!(m, ServerMessage::ParticipantLeft { participant_id, .. } if *participant_id == alice_id),
        WAIT,
    )
    .await
    .expect("bob sees alice go with her node");
    carol.send_chat("still here", None).await.unwrap();
    bob.wait_for_message(|m| m.text() == Some("still here"), WAIT)
        .await
        .expect("bob gets carol's chat after A is gone");
    wait_lease(&redis, "span", Some("ND_b"), TTL * 3).await;
    drop(alice);
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_spans_three_nodes_and_each_two_meet_directly() {
    use plaza::signal::TrackKind;
    let redis = RedisServer::start().expect("redis-server");
    let a = node_spanning(&redis, "ND_a", 1).await;
    let b = node_spanning(&redis, "ND_b", 1).await;
    let c = node_spanning(&redis, "ND_c", 1).await;
    wait_nodes(&a, WAIT, "three nodes", |l| {
        ids(l) == ["ND_a", "ND_b", "ND_c"]
    })
    .await;
    for n in [&a, &b, &c] {
        wait_stats(n, "links up", |c| c["link_peers_up"] == 2).await;
    }
    place_on(&redis, "tri", "ND_a").await;
    let alice = support::publisher(&a, "tri", "alice").await;
    let bob = support::publisher(&b, "tri", "bob").await;
    let carol = support::publisher(&c, "tri", "carol").await;
    assert_eq!(
        (bob.redirects(), carol.redirects()),
        (0, 0),
        "each is served by the node it joined through"
    );
    // Carol greeted A's entry; A introduced her shard to B's: bob and carol meet.
    for (p, others) in [
        (&alice, ["bob", "carol"]),
        (&bob, ["alice", "carol"]),
        (&carol, ["alice", "bob"]),
    ] {
        for o in others {
            p.wait_for_participant(|x| x.name == o, WAIT)
                .await
                .unwrap_or_else(|e| panic!("a participant does not see {o}: {e:#}"));
        }
    }
    // Media between the two extended nodes, and data through the home.
    let from_bob = support::announced_track(&carol, &bob, TrackKind::Video).await;
    let from_carol = support::announced_track(&bob, &carol, TrackKind::Video).await;
    support::assert_media_flows(
        "bob (B) ⇄ carol (C)",
        &[(&carol, &from_bob.id), (&bob, &from_carol.id)],
        30,
    )
    .await;
    carol.send_chat("from C", None).await.unwrap();
    for p in [&alice, &bob] {
        p.wait_for_message(|m| m.text() == Some("from C"), WAIT)
            .await
            .expect("carol's chat reaches A and B");
    }
    let cc = cluster_stats(&c).await;
    assert_eq!(cc["extended_joins"], 1, "{cc}");
    drop((alice, bob, carol));
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_livestream_spread_over_two_nodes_reaches_every_viewer_and_outlives_a_redis_outage() {
    use plaza::signal::TrackKind;
    let mut redis = RedisServer::start().expect("redis-server");
    let port = redis.port;
    let a = node_spanning(&redis, "ND_a", 1).await;
    let b = node_spanning(&redis, "ND_b", 1).await;
    wait_nodes(&a, WAIT, "both nodes", |l| ids(l) == ["ND_a", "ND_b"]).await;
    wait_stats(&b, "A's link up", |c| c["link_peers_up"] == 1).await;
    place_on(&redis, "live", "ND_a").await;
    let host = support::publisher(&a, "live", "host").await;
    // Three viewers through each node: B's are served by B, which receives the host's tracks
    // once over the node link and sends them on to each of its viewers. (A sends some of its
    // own to B too, while B serves fewer participants than A: served by B all the same.)
    let mut viewers = Vec::new();
    for (node, side) in [(&a, "a"), (&b, "b")] {
        for i in 0..3 {
            let v = support::subscriber(node, "live", &format!("viewer-{side}{i}")).await;
            if side == "b" {
                assert_eq!((v.redirects(), v.url()), (0, b.ws_url().as_str()));
            }
            viewers.push(v);
        }
    }
    let track = support::announced_track(&viewers[0], &host, TrackKind::Video).await;
    let flows: Vec<(&plaza_testkit::peer::Peer, &str)> =
        viewers.iter().map(|v| (v, track.id.as_str())).collect();
    support::assert_media_flows("host (A) → 6 viewers over A and B", &flows, 30).await;
    assert!(cluster_stats(&b).await["extended_joins"].as_u64() >= Some(3));
    // B forwards what it relays to its own viewers: its forwarded-packet counter grows.
    let (_, sb) = support::stats(b.http_addr).await.expect("B's /stats");
    assert!(
        sb["rtp_packets_forwarded"].as_u64() > Some(0),
        "B forwards to its viewers: {sb}"
    );

    // Redis goes away: the media between the nodes does not need it.
    redis.kill();
    wait_stats(&b, "B sees the outage", |c| c["registered"] == false).await;
    support::assert_media_flows("during the Redis outage", &flows, 30).await;
    let _redis = RedisServer::start_on(port).expect("redis-server restarted");
    wait_stats(&b, "B registered again", |c| c["registered"] == true).await;
    support::assert_media_flows("after the outage", &flows, 20).await;
    // A holds the room's lease again; B never claims it.
    wait_lease(&_redis, "live", Some("ND_a"), WAIT).await;
    drop((host, viewers));
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_rooms_joins_through_its_node_spill_to_a_less_loaded_node() {
    use plaza::signal::TrackKind;
    let redis = RedisServer::start().expect("redis-server");
    let a = node_spanning(&redis, "ND_a", 2).await;
    let b = node_spanning(&redis, "ND_b", 2).await;
    wait_nodes(&a, WAIT, "both nodes", |l| ids(l) == ["ND_a", "ND_b"]).await;
    wait_stats(&a, "B's link up", |c| c["link_peers_up"] == 1).await;
    place_on(&redis, "big", "ND_a").await;
    // Below the threshold the room stays on A.
    let host = support::publisher(&a, "big", "host").await;
    let first = support::subscriber(&a, "big", "viewer-0").await;
    assert_eq!(first.url(), a.ws_url());
    // At two participants it spans; A serves two and B none: the next viewer, joining through
    // A like everyone, is sent to B, which serves it (the room extended there).
    let second = support::subscriber(&a, "big", "viewer-1").await;
    assert_eq!(second.redirects(), 1);
    assert_eq!(
        second.url(),
        b.ws_url(),
        "the join went to the less loaded node"
    );
    let track = support::announced_track(&second, &host, TrackKind::Video).await;
    support::assert_media_flows(
        "host (A) → a viewer on A and one on B",
        &[(&first, &track.id), (&second, &track.id)],
        30,
    )
    .await;
    let (ca, cb) = (cluster_stats(&a).await, cluster_stats(&b).await);
    assert_eq!(ca["redirected"], 1, "{ca}");
    assert_eq!(cb["extended_joins"], 1, "{cb}");
    drop((host, first, second));
    a.shutdown().await;
    b.shutdown().await;
}
