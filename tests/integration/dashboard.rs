//! The operator dashboard's event stream (`GET /dashboard/events`) against the real server with
//! real WebRTC peers: the first event is a full snapshot of the room (participants, tracks,
//! subscriptions), a participant joining or leaving comes as a small delta (never another
//! snapshot), a server where nothing changes sends no delta at all (only keep-alive comments),
//! and the stream is refused without a token with the `roomList` grant.

// A test, not the packet path: it times the stream's silences with the clock.
#![allow(clippy::disallowed_methods)]

use anyhow::{Context, Result, anyhow, bail};
use plaza::auth::{Claims, DEFAULT_TTL, RoomGrants};
use plaza_testkit::{self as common, support};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use support::{T, TestServer, announced_track, opts, wait_growth};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A token with the `roomList` grant (what the dashboard needs), and nothing else.
fn list_token() -> String {
    let mut grants = RoomGrants::participant("any");
    grants.room_join = false;
    grants.room_list = true;
    common::token::sign(&Claims::new("ops", "any", DEFAULT_TTL).with_grants(grants))
}

/// One thing read from the stream.
#[derive(Debug)]
enum Item {
    Event {
        name: String,
        data: Value,
        bytes: usize,
    },
    Comment(String),
}

/// A minimal Server-Sent Events client over a raw HTTP/1.1 connection (no new
/// dependencies): the status, then events and comments as they arrive.
struct SseClient {
    stream: TcpStream,
    /// Raw bytes not yet decoded (chunked transfer encoding).
    raw: Vec<u8>,
    /// Decoded body text not yet parsed into events.
    text: String,
    chunked: bool,
}

impl SseClient {
    /// Opens `path`; returns the status and, for a 200, the client (else the body).
    async fn open(addr: SocketAddr, path: &str) -> Result<(u16, Result<SseClient, String>)> {
        let mut stream = TcpStream::connect(addr).await?;
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
        stream.write_all(req.as_bytes()).await?;
        let mut raw = Vec::new();
        let head_end = loop {
            if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let mut buf = vec![0u8; 4096];
            let n = tokio::time::timeout(T, stream.read(&mut buf))
                .await
                .context("response head")??;
            if n == 0 {
                bail!("connection closed before the response head");
            }
            raw.extend_from_slice(&buf[..n]);
        };
        let head = String::from_utf8_lossy(&raw[..head_end]).to_string();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("bad status line: {head}"))?;
        let lower = head.to_ascii_lowercase();
        let chunked = lower.contains("transfer-encoding: chunked");
        let mut client = SseClient {
            stream,
            raw: raw[head_end + 4..].to_vec(),
            text: String::new(),
            chunked,
        };
        if status != 200 {
            // The refusal's body (small: read until it is complete or the server closes).
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                client.decode();
                if client.text.trim_end().ends_with('}') {
                    break;
                }
                if !client
                    .read_more(Duration::from_secs(1))
                    .await
                    .unwrap_or(false)
                {
                    break;
                }
            }
            client.decode();
            return Ok((status, Err(client.text)));
        }
        if !lower.contains("content-type: text/event-stream") {
            bail!("not an event stream: {head}");
        }
        Ok((status, Ok(client)))
    }

    /// Reads more bytes within `wait`; `false` on timeout or end of stream.
    async fn read_more(&mut self, wait: Duration) -> Result<bool> {
        let mut buf = vec![0u8; 16384];
        match tokio::time::timeout(wait, self.stream.read(&mut buf)).await {
            Err(_) => Ok(false),
            Ok(Ok(0)) => bail!("the stream ended"),
            Ok(Ok(n)) => {
                self.raw.extend_from_slice(&buf[..n]);
                Ok(true)
            }
            Ok(Err(e)) => Err(e.into()),
        }
    }

    /// Moves complete chunks (or everything, without chunking) from `raw` to `text`.
    fn decode(&mut self) {
        if !self.chunked {
            self.text.push_str(&String::from_utf8_lossy(&self.raw));
            self.raw.clear();
            return;
        }
        loop {
            let Some(eol) = self.raw.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let Ok(size) = usize::from_str_radix(
                String::from_utf8_lossy(&self.raw[..eol])
                    .split(';')
                    .next()
                    .unwrap_or("")
                    .trim(),
                16,
            ) else {
                return;
            };
            let start = eol + 2;
            if self.raw.len() < start + size + 2 {
                return;
            }
            self.text
                .push_str(&String::from_utf8_lossy(&self.raw[start..start + size]));
            self.raw.drain(..start + size + 2);
        }
    }

    /// The next event or comment, waiting at most `wait`; `None` when nothing came.
    async fn next(&mut self, wait: Duration) -> Result<Option<Item>> {
        let deadline = Instant::now() + wait;
        loop {
            self.decode();
            if let Some(end) = self.text.find("\n\n") {
                let block: String = self.text.drain(..end + 2).collect();
                return parse_block(&block).map(Some);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || !self.read_more(left).await? {
                return Ok(None);
            }
        }
    }

    /// The next event (comments skipped), within `wait`.
    async fn next_event(&mut self, wait: Duration) -> Result<(String, Value, usize)> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await? {
                Some(Item::Event { name, data, bytes }) => return Ok((name, data, bytes)),
                Some(Item::Comment(_)) => continue,
                None => bail!("no event within {wait:?}"),
            }
        }
    }
}

fn parse_block(block: &str) -> Result<Item> {
    let mut name = None;
    let mut data = String::new();
    let mut comment = None;
    for line in block.lines() {
        if let Some(c) = line.strip_prefix(':') {
            comment = Some(c.trim().to_owned());
        } else if let Some(v) = line.strip_prefix("event:") {
            name = Some(v.trim().to_owned());
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    match (name, comment) {
        (Some(name), _) => Ok(Item::Event {
            name,
            bytes: data.len(),
            data: serde_json::from_str(&data).with_context(|| format!("event data {data}"))?,
        }),
        (None, Some(c)) => Ok(Item::Comment(c)),
        (None, None) => bail!("unexpected block {block:?}"),
    }
}

/// Entities of `kind` set by an event.
fn set<'a>(data: &'a Value, kind: &str) -> Vec<&'a Value> {
    data[kind]["set"]
        .as_array()
        .map(|a| a.iter().collect())
        .unwrap_or_default()
}

fn ids(entities: &[&Value]) -> Vec<String> {
    entities
        .iter()
        .filter_map(|e| e["id"].as_str().map(str::to_owned))
        .collect()
}

/// Reads deltas until one satisfies `pred` (never a snapshot), within `wait`.
async fn wait_delta(
    sse: &mut SseClient,
    what: &str,
    wait: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Result<(Value, usize)> {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (name, data, bytes) = sse
            .next_event(left)
            .await
            .with_context(|| format!("waiting for {what}"))?;
        if name != "delta" {
            bail!("{what}: got a {name} event, not a delta: {data}");
        }
        if pred(&data) {
            return Ok((data, bytes));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_stream_is_a_snapshot_then_small_deltas() -> Result<()> {
    let server = TestServer::start().await;
    let room = "dash";
    let alice = common::Peer::connect(&server.ws_url(), room, "alice", opts(true)).await?;
    let bob = common::Peer::connect(&server.ws_url(), room, "bob", opts(false)).await?;
    let video = announced_track(&bob, &alice, plaza::signal::TrackKind::Video).await;
    let audio = announced_track(&bob, &alice, plaza::signal::TrackKind::Audio).await;
    wait_growth(&bob, &video.id, 20).await;

    // ── The first event: everything, in one snapshot.
    let token = list_token();
    let (status, sse) = SseClient::open(
        server.http_addr,
        &format!("/dashboard/events?access_token={token}"),
    )
    .await?;
    assert_eq!(status, 200);
    let mut sse = sse.map_err(|b| anyhow!("refused: {b}"))?;
    let (name, snap, bytes) = sse.next_event(T).await?;
    assert_eq!(name, "snapshot", "{snap}");
    eprintln!("snapshot: {bytes} bytes: {snap}");
    assert_eq!(
        ids(&set(&snap, "rooms")),
        Vec::<String>::new(),
        "rooms have no id"
    );
    assert_eq!(set(&snap, "rooms")[0]["room"], room);
    let mut parts = ids(&set(&snap, "participants"));
    parts.sort();
    let mut want = vec![
        alice.participant_id().to_owned(),
        bob.participant_id().to_owned(),
    ];
    want.sort();
    assert_eq!(parts, want);
    let alice_p = set(&snap, "participants")
        .into_iter()
        .find(|p| p["id"] == alice.participant_id())
        .cloned()
        .unwrap();
    assert_eq!(alice_p["name"], "alice");
    assert_eq!(alice_p["state"], "connected");
    let mut tracks = ids(&set(&snap, "tracks"));
    tracks.sort();
    let mut want_tracks = vec![video.id.clone(), audio.id.clone()];
    want_tracks.sort();
    assert_eq!(tracks, want_tracks);
    let v = set(&snap, "tracks")
        .into_iter()
        .find(|t| t["id"] == video.id.as_str())
        .cloned()
        .unwrap();
    assert_eq!(v["participant_id"], alice.participant_id());
    assert_eq!(v["kind"], "video");
    assert!(
        v["layers"][0]["bitrate_bps"].as_u64().unwrap_or(0) > 0,
        "the video layer's bitrate: {v}"
    );
    let subs = set(&snap, "subscriptions");
    assert!(
        subs.iter()
            .any(|s| s["subscriber"] == bob.participant_id() && s["track"] == video.id.as_str()),
        "bob's subscription to alice's video: {subs:?}"
    );
    assert!(snap["server"]["participants"].as_u64() == Some(2), "{snap}");

    // ── A join is a delta naming the newcomer (not a snapshot), and small.
    let carol = common::Peer::connect(&server.ws_url(), room, "carol", opts(false)).await?;
    let carol_id = carol.participant_id().to_owned();
    let (d, bytes) = wait_delta(&mut sse, "carol's join", T, |d| {
        ids(&set(d, "participants")).contains(&carol_id)
    })
    .await?;
    eprintln!("join delta: {bytes} bytes: {d}");
    assert!(bytes < 4096, "a join's delta is small: {bytes} bytes");
    // ── A leave is a delta removing her.
    carol.leave().await?;
    let (d, bytes) = wait_delta(&mut sse, "carol's leave", T, |d| {
        d["participants"]["removed"].as_array().is_some_and(|r| {
            r.iter()
                .any(|k| k["id"] == carol_id.as_str() && k["room"] == room)
        })
    })
    .await?;
    eprintln!("leave delta: {bytes} bytes: {d}");
    assert!(bytes < 4096, "a leave's delta is small: {bytes} bytes");

    // ── Nothing changes (media flows steadily): no delta for at least 2 s. Joins, a
    // connection settling and the first bitrate windows may take a few seconds to calm.
    let quiet = Duration::from_millis(2_500);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last_event = Instant::now();
    let mut deltas = 0;
    let mut closest = Duration::MAX;
    loop {
        let since = last_event.elapsed();
        if since >= quiet {
            break;
        }
        if Instant::now() >= deadline {
            bail!("no quiet stretch of {quiet:?} within 20 s ({deltas} deltas)");
        }
        match sse.next(quiet - since).await? {
            Some(Item::Event { name, data, bytes }) => {
                assert_eq!(name, "delta", "only deltas after the snapshot: {data}");
                eprintln!("delta while settling ({bytes} bytes): {data}");
                deltas += 1;
                closest = closest.min(last_event.elapsed());
                last_event = Instant::now();
            }
            Some(Item::Comment(_)) | None => {}
        }
    }
    eprintln!("quiet for {quiet:?} after {deltas} settling deltas (closest {closest:?} apart)");
    // Updates are coalesced: at most one per sampling interval (0.5 s, less the jitter of
    // two busy schedulers).
    assert!(
        deltas < 2 || closest >= Duration::from_millis(250),
        "two deltas {closest:?} apart"
    );

    // ── Refusals: no token, a bad one, one without the grant.
    let (status, body) = SseClient::open(server.http_addr, "/dashboard/events").await?;
    assert_eq!(status, 401);
    let body: Value = serde_json::from_str(&body.err().unwrap_or_default())?;
    assert_eq!(body["code"], "token_missing", "{body}");
    let (status, body) = SseClient::open(
        server.http_addr,
        "/dashboard/events?access_token=not.a.token",
    )
    .await?;
    assert_eq!(status, 401);
    let body: Value = serde_json::from_str(&body.err().unwrap_or_default())?;
    assert_eq!(body["code"], "token_invalid", "{body}");
    let participant = common::token::participant(room, "mallory");
    let (status, body) = SseClient::open(
        server.http_addr,
        &format!("/dashboard/events?access_token={participant}"),
    )
    .await?;
    assert_eq!(status, 403);
    let body: Value = serde_json::from_str(&body.err().unwrap_or_default())?;
    assert_eq!(body["code"], "permission_denied", "{body}");

    // The page itself.
    let (status, page) = support::http_get(server.http_addr, "/dashboard").await?;
    assert_eq!(status, 200);
    assert!(page.contains("dashboard.js"), "{page}");

    drop(sse);
    alice.leave().await?;
    bob.leave().await?;
    server.shutdown().await;
    Ok(())
}

/// With nothing changing at all, the stream sends only its keep-alive comment (after 15 s);
/// and the sampler stops when the last viewer goes.
#[tokio::test]
async fn an_idle_server_sends_only_keep_alives() -> Result<()> {
    let server = TestServer::start().await;
    let token = list_token();
    let path = format!("/dashboard/events?access_token={token}");
    let (_, sse) = SseClient::open(server.http_addr, &path).await?;
    let mut sse = sse.map_err(|b| anyhow!("refused: {b}"))?;
    let (name, snap, _) = sse.next_event(T).await?;
    assert_eq!(name, "snapshot");
    assert!(set(&snap, "rooms").is_empty(), "{snap}");
    // The second sample has a CPU figure: the one delta an idle server may send; then only the
    // keep-alive.
    let started = Instant::now();
    let mut deltas = 0;
    let comment = loop {
        match sse.next(Duration::from_secs(20)).await? {
            Some(Item::Comment(c)) => break c,
            Some(Item::Event { name, data, .. }) => {
                assert_eq!(name, "delta", "{data}");
                assert!(
                    data.as_object()
                        .is_some_and(|o| o.keys().all(|k| k == "seq" || k == "server")),
                    "an idle server changes nothing but its own numbers: {data}"
                );
                deltas += 1;
                assert!(deltas <= 3, "an idle server keeps sending deltas: {data}");
            }
            None => bail!("no keep-alive within 20 s"),
        }
    };
    let took = started.elapsed();
    eprintln!("keep-alive {comment:?} after {took:?}, {deltas} deltas before it");
    assert_eq!(comment, "keep-alive");
    assert!(
        took >= Duration::from_secs(10),
        "the keep-alive came after {took:?}"
    );
    drop(sse);
    server.shutdown().await;
    Ok(())
}

/// In a cluster, any node's dashboard stream can show another node's view (`?node=<id>`),
/// relayed as it comes: a room on A seen through B, then its participant leaving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_relays_another_nodes_stream() -> Result<()> {
    let redis = plaza_testkit::redis::RedisServer::start()?;
    let node = |id: &str| plaza::config::Config {
        cluster: plaza::cluster::ClusterConfig {
            redis: Some(redis.url()),
            node_id: Some(id.to_owned()),
            node_address: None,
            span_above: 0,
            link_port: 0,
        },
        ..support::test_config()
    };
    let a = TestServer::start_with(node("ND_a")).await;
    let b = TestServer::start_with(node("ND_b")).await;
    let alice = common::Peer::connect(&a.ws_url(), "on-a", "alice", opts(false)).await?;
    let token = list_token();
    // B relays A's stream once B can see A in the cluster.
    let deadline = Instant::now() + T;
    let mut sse = loop {
        let (status, sse) = SseClient::open(
            b.http_addr,
            &format!("/dashboard/events?access_token={token}&node=ND_a"),
        )
        .await?;
        match (status, sse) {
            (200, Ok(sse)) => break sse,
            (404, Err(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (status, other) => bail!("B relaying A's stream: {status} {:?}", other.err()),
        }
    };
    let (name, snap, _) = sse.next_event(T).await?;
    assert_eq!(name, "snapshot", "{snap}");
    assert_eq!(set(&snap, "rooms")[0]["room"], "on-a", "A's room: {snap}");
    assert_eq!(ids(&set(&snap, "participants")), [alice.participant_id()]);
    let gone = alice.participant_id().to_owned();
    alice.leave().await?;
    wait_delta(&mut sse, "alice leaving A", T, |d| {
        d["participants"]["removed"]
            .as_array()
            .is_some_and(|r| r.iter().any(|k| k["id"] == gone.as_str()))
    })
    .await?;
    // Its own view without `node`; an unknown node is a 404; no token, no relay.
    let (status, own) = SseClient::open(
        b.http_addr,
        &format!("/dashboard/events?access_token={token}"),
    )
    .await?;
    assert_eq!(status, 200);
    let (_, snap, _) = own.map_err(|e| anyhow!("{e}"))?.next_event(T).await?;
    assert!(set(&snap, "rooms").is_empty(), "B has no rooms: {snap}");
    let (status, body) = SseClient::open(
        b.http_addr,
        &format!("/dashboard/events?access_token={token}&node=ND_zz"),
    )
    .await?;
    assert_eq!(status, 404, "{:?}", body.err());
    let (status, _) = SseClient::open(b.http_addr, "/dashboard/events?node=ND_a").await?;
    assert_eq!(status, 401);
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}
