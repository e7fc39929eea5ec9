//! The cluster's node registry with a real `redis-server` (testkit `redis`) and real Plaza
//! nodes: nodes register with their load and see each other (`GET /api/nodes`), a graceful
//! shutdown removes a node at once, a node that stops heartbeating drops out after its TTL,
//! a Redis restart does not stop a node from serving and the node re-registers, and without
//! `--redis` no cluster code runs. Every wait polls with a deadline.

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
    TestServer::start_with(plaza::config::Config {
        cluster: ClusterConfig {
            redis: Some(redis.url()),
            node_id: Some(id.to_owned()),
            node_address: None,
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
    // Signaling and media do not wait for Redis: a join during the outage succeeds.
    let joined = Instant::now();
    let alice = support::publisher(&a, "during-outage", "alice").await;
    let joined = joined.elapsed();
    assert!(joined < Duration::from_secs(5), "join took {joined:?}");

    // Redis back on the same port (empty: no persistence): the node registers again.
    let _redis = RedisServer::start_on(port).expect("redis-server restarted");
    let (list, back) = wait_nodes(&a, WAIT, "A registered again", |l| {
        ids(l) == ["ND_a"] && l["nodes"][0]["load"]["participants"] == 1
    })
    .await;
    assert_eq!(list["nodes"][0]["load"]["rooms"], 1);
    let c = cluster_stats(&a).await;
    assert_eq!(c["registered"], true, "{c}");
    assert_eq!(c["outages"], 1, "one outage: {c}");
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
