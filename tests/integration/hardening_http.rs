//! Attacks on the HTTP/WebSocket front — idle sockets past the per-address cap, the total cap,
//! half-sent messages, slowloris headers, sessions that never join or go silent, message
//! floods — each while another room (1 publisher, 2 subscribers) runs beside it. Every test
//! asserts that the attack is cut off as configured and counted in `/healthz`, and that the
//! other room's media kept flowing and `/healthz` kept answering.
//!
//! The attacker connects from 127.0.0.2 (any 127/8 address reaches a 127.0.0.1 listener on
//! Linux), so the per-address cap it hits is not the one of the room beside it (127.0.0.1).

// A test, not the packet path: shares state between tasks and times deadlines with the clock.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use plaza_testkit::{self as common, support};

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::Peer;
use futures_util::{SinkExt, StreamExt};
use plaza::config::Config;
use plaza::signal::{ErrorCode, ServerMessage, TrackKind};
use serde_json::Value;
use support::{
    RawWs, Received, T, TestServer, announced_track, assert_media_flows, publisher, subscriber,
    test_config,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{self, Message};

/// Where the attacker connects from.
const ATTACKER: &str = "127.0.0.2";

/// The room beside the attack: a publisher and two subscribers receiving its audio and video.
struct Beside {
    _publisher: Peer,
    subscribers: Vec<Peer>,
    flows: Vec<(usize, String)>,
}

impl Beside {
    async fn start(server: &TestServer) -> Beside {
        let publisher = publisher(server, "beside", "pub").await;
        let subscribers = vec![
            subscriber(server, "beside", "sub1").await,
            subscriber(server, "beside", "sub2").await,
        ];
        let mut flows = Vec::new();
        for (i, sub) in subscribers.iter().enumerate() {
            for kind in [TrackKind::Audio, TrackKind::Video] {
                let info = announced_track(sub, &publisher, kind).await;
                sub.wait_for_packets(&info.id, 10, T)
                    .await
                    .unwrap_or_else(|e| panic!("{} receives {}: {e:#}", sub.name(), info.id));
                flows.push((i, info.id));
            }
        }
        Beside {
            _publisher: publisher,
            subscribers,
            flows,
        }
    }

    /// Media keeps flowing to both subscribers and `/healthz` answers 200.
    async fn assert_alive(&self, server: &TestServer, what: &str) -> Value {
        let flows: Vec<(&Peer, &str)> = self
            .flows
            .iter()
            .map(|(i, t)| (&self.subscribers[*i], t.as_str()))
            .collect();
        assert_media_flows(what, &flows, 20).await;
        let started = Instant::now();
        let (status, body) = server.healthz().await.expect("healthz answers");
        assert_eq!(status, 200, "{what}: healthz {body}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{what}: healthz took {:?}",
            started.elapsed()
        );
        body
    }
}

/// Short limits so every attack is cut within a second or two.
fn config() -> Config {
    Config {
        join_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(30),
        header_timeout: Duration::from_millis(500),
        message_timeout: Duration::from_millis(500),
        ..test_config()
    }
}

async fn start(config: Config) -> TestServer {
    plaza::server::raise_nofile_limit();
    TestServer::start_with(config).await
}

fn http_counter(body: &Value, name: &str) -> u64 {
    body["http"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no http.{name} in {body}"))
}

/// A TCP connection from the attacker's address.
async fn attacker_tcp(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{ATTACKER}:0").parse().unwrap())?;
    tokio::time::timeout(T, socket.connect(addr))
        .await
        .map_err(|_| std::io::Error::other("connect timed out"))?
}

type AttackerWs = WebSocketStream<TcpStream>;

/// A WebSocket from the attacker's address (the handshake's error when refused).
async fn attacker_ws(addr: SocketAddr) -> Result<AttackerWs, tungstenite::Error> {
    let stream = attacker_tcp(addr).await?;
    let (ws, _) = tokio::time::timeout(
        T,
        tokio_tungstenite::client_async(format!("ws://{addr}/rtc"), stream),
    )
    .await
    .map_err(|_| tungstenite::Error::Io(std::io::Error::other("handshake timed out")))??;
    Ok(ws)
}

/// Reads until the server's close frame (skipping messages); its code and reason.
async fn close_of(ws: &mut AttackerWs) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => panic!("no close from the server in {T:?}"),
            Ok(Some(Ok(Message::Close(Some(f))))) => {
                return (u16::from(f.code), f.reason.to_string());
            }
            Ok(Some(Ok(Message::Close(None)))) | Ok(None) => panic!("closed without a close frame"),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => panic!("websocket error before the close frame: {e}"),
        }
    }
}

/// Asserts that a refused handshake was a 503 with `Retry-After`.
fn assert_refused_503(r: Result<AttackerWs, tungstenite::Error>, what: &str) {
    match r {
        Err(tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 503, "{what}");
            assert!(
                resp.headers().contains_key("retry-after"),
                "{what}: {:?}",
                resp.headers()
            );
        }
        Err(e) => panic!("{what}: expected a 503, got {e}"),
        Ok(_) => panic!("{what}: the connection was accepted"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_websockets_past_the_per_address_cap_are_refused() {
    const CAP: usize = 16;
    let server = start(Config {
        max_connections_per_ip: CAP,
        ..config()
    })
    .await;
    let room = Beside::start(&server).await;

    // The attacker fills its address's share with idle WebSockets...
    let mut held = Vec::new();
    for i in 0..CAP {
        held.push(
            attacker_ws(server.http_addr)
                .await
                .unwrap_or_else(|e| panic!("connection {i} under the cap: {e}")),
        );
    }
    // ...and everything past it is refused with a 503 and Retry-After, at once.
    let started = Instant::now();
    for i in 0..40 {
        assert_refused_503(
            attacker_ws(server.http_addr).await,
            &format!("connection {} past the cap", CAP + i),
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let body = room.assert_alive(&server, "per-address cap reached").await;
    assert!(http_counter(&body, "refused_per_ip") >= 40, "{body}");
    assert!(
        http_counter(&body, "websockets_open") >= CAP as u64,
        "{body}"
    );

    // Others still join.
    let late = subscriber(&server, "other", "late").await;
    late.ping()
        .await
        .expect("a client from another address is served");

    // A slot given back is usable again.
    drop(held.pop());
    let deadline = Instant::now() + T;
    loop {
        match attacker_ws(server.http_addr).await {
            Ok(ws) => {
                held.push(ws);
                break;
            }
            Err(tungstenite::Error::Http(_)) if Instant::now() < deadline => {
                // The server has not seen the close yet.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("a freed slot is not reusable: {e}"),
        }
    }
    room.assert_alive(&server, "after the slot was reused")
        .await;
    drop(held);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn total_cap_keeps_a_reserve_for_healthz() {
    // The room beside uses 3 connections; the attacker gets the rest of 10.
    const TOTAL: usize = 10;
    let server = start(Config {
        max_connections: TOTAL,
        ..config()
    })
    .await;
    let room = Beside::start(&server).await;
    room.assert_alive(&server, "before").await;
    let mut held = Vec::new();
    // Until the cap: accepted (the room holds 3 connections; the `/healthz` one just used
    // may not be released yet).
    loop {
        match attacker_ws(server.http_addr).await {
            Ok(ws) => held.push(ws),
            Err(e) => {
                assert_refused_503(Err(e), "the first websocket past the total cap");
                break;
            }
        }
        assert!(
            held.len() <= TOTAL - 3,
            "{} accepted past the cap",
            held.len()
        );
    }
    assert!(held.len() >= TOTAL - 4, "only {} accepted", held.len());
    // Past it: WebSockets refused with 503, /healthz, /metrics and /stats still served (the
    // reserve).
    for i in 0..5 {
        assert_refused_503(
            attacker_ws(server.http_addr).await,
            &format!("websocket {i} past the total cap"),
        );
    }
    let body = room.assert_alive(&server, "total cap reached").await;
    assert!(http_counter(&body, "websocket_refused") >= 1, "{body}");
    assert!(http_counter(&body, "reserve_connections") >= 1, "{body}");
    for path in ["/metrics", "/stats"] {
        let (status, body) = support::http_get(server.http_addr, path).await.unwrap();
        assert_eq!(status, 200, "{path}: {body}");
    }
    drop(held);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_messages_are_cut() {
    let server = start(config()).await;
    let room = Beside::start(&server).await;
    const N: usize = 20;
    let mut socks = Vec::new();
    for _ in 0..N {
        let mut ws = attacker_ws(server.http_addr).await.expect("connects");
        // A masked text frame announcing 60,000 bytes, of which 20,000 are sent.
        let mut frame = vec![0x81, 0x80 | 126];
        frame.extend_from_slice(&60_000u16.to_be_bytes());
        frame.extend_from_slice(&[1, 2, 3, 4]);
        frame.extend(std::iter::repeat_n(b'x' ^ 1, 20_000));
        ws.get_mut().write_all(&frame).await.unwrap();
        socks.push(ws);
    }
    let started = Instant::now();
    // Meanwhile a legitimate client's big message (under the limit) is fine.
    let mut ok = RawWs::connect(&server.ws_url()).await.unwrap();
    ok.send_text(format!(
        r#"{{"type":"ping","ts":1,"pad":"{}"}}"#,
        "y".repeat(60_000)
    ))
    .await
    .unwrap();
    match ok.recv().await.unwrap() {
        Received::Msg(ServerMessage::Pong { .. }) => {}
        other => panic!("expected pong, got {other:?}"),
    }
    room.assert_alive(&server, "half-sent messages pending")
        .await;
    for ws in &mut socks {
        let (code, reason) = close_of(ws).await;
        assert_eq!(code, 1008, "{reason}");
        assert!(reason.contains("message timeout"), "{reason}");
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "cut after {took:?}");
    let body = room.assert_alive(&server, "half-sent messages cut").await;
    assert!(
        http_counter(&body, "message_timeouts") >= N as u64,
        "{body}"
    );
    ok.ping(2.0)
        .await
        .expect("the legitimate session is still open");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_headers_are_cut() {
    let server = start(config()).await;
    let room = Beside::start(&server).await;
    const N: usize = 40;
    let mut socks = Vec::new();
    for i in 0..N {
        let mut s = attacker_tcp(server.http_addr).await.expect("connects");
        if i % 2 == 0 {
            // Half start a request and never finish it; the others send nothing at all.
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
        }
        socks.push(s);
    }
    let started = Instant::now();
    // Keep trickling header bytes while the room is checked.
    let trickle = async {
        for _ in 0..5 {
            for (i, s) in socks.iter_mut().enumerate() {
                if i % 2 == 0 {
                    let _ = s.write_all(b"X-A: b\r\n").await;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let ((), _) = tokio::join!(trickle, room.assert_alive(&server, "slowloris in progress"));
    // Every one of them is closed by the server (EOF or reset), none got a response.
    for (i, s) in socks.iter_mut().enumerate() {
        let mut buf = [0u8; 256];
        let n = match tokio::time::timeout(T, s.read(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(_)) => 0, // reset
            Err(_) => panic!("connection {i} still open after {T:?}"),
        };
        assert_eq!(
            n,
            0,
            "connection {i} got {:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "cut after {took:?}");
    let body = room.assert_alive(&server, "slowloris cut").await;
    assert!(http_counter(&body, "header_timeouts") >= N as u64, "{body}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_that_never_join_or_go_silent_are_closed() {
    let server = start(Config {
        join_timeout: Duration::from_millis(800),
        idle_timeout: Duration::from_millis(1500),
        // An idle-timed-out participant may still resume: it is removed after this.
        resume_grace: Duration::from_millis(500),
        ..config()
    })
    .await;
    let room = Beside::start(&server).await;
    const N: usize = 20;
    let mut socks = Vec::new();
    for i in 0..N {
        let mut ws = attacker_ws(server.http_addr).await.expect("connects");
        if i % 2 == 0 {
            // Pings keep nothing alive before join.
            ws.send(Message::text(r#"{"type":"ping"}"#)).await.unwrap();
        }
        socks.push(ws);
    }
    let started = Instant::now();
    for ws in &mut socks {
        let (code, reason) = close_of(ws).await;
        assert_eq!(code, 1008, "{reason}");
        assert!(reason.contains("join timeout"), "{reason}");
    }
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "closed after {took:?}");
    let body = room.assert_alive(&server, "join timeouts").await;
    assert!(http_counter(&body, "join_timeouts") >= N as u64, "{body}");

    // A joined client that stops reading (so never answers the server's pings) and sends
    // nothing is closed after the idle timeout (and removed when it has not resumed within the
    // grace period); the room's peers answer pings and stay.
    // (Reading would answer the pings: the client reads nothing until it has been closed.)
    let mut silent = RawWs::connect(&server.ws_url()).await.unwrap();
    silent.join("quiet", "silent").await.unwrap();
    let since = Instant::now();
    server
        .wait_healthz(
            "the silent session closed",
            |b| b["http"]["idle_timeouts"].as_u64() >= Some(1) && b["participants"] == 3,
            T,
        )
        .await
        .unwrap();
    let took = since.elapsed();
    assert!(took >= Duration::from_millis(1400), "closed after {took:?}");
    assert!(took < Duration::from_secs(5), "closed after {took:?}");
    // Its close frame is waiting behind the unanswered pings (unless answering one of them
    // hit the closed socket first).
    if let Ok(Received::Closed(Some((code, reason)))) = silent.recv().await {
        assert_eq!(code, 1001, "{reason}");
        assert!(reason.contains("idle timeout"), "{reason}");
    }
    // The room beside has been up for longer than the idle timeout by now: its peers answer
    // the server's pings.
    room.assert_alive(&server, "after the idle timeout").await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_floods_are_rate_limited_and_the_session_stays_usable() {
    const RATE: f64 = 20.0;
    const BURST: usize = 40;
    const FLOOD: usize = 600;
    let server = start(Config {
        ws_message_rate: RATE,
        ws_message_burst: BURST,
        ..config()
    })
    .await;
    let room = Beside::start(&server).await;
    let mut ws = RawWs::connect(&server.ws_url()).await.unwrap();
    ws.join("flood", "flooder").await.unwrap();
    let started = Instant::now();
    let flood = async {
        for _ in 0..FLOOD {
            ws.send_text(r#"{"type":"subscribe","track_ids":[],"subscribe":true}"#)
                .await
                .unwrap();
        }
        let mut limited = 0;
        while limited < FLOOD - BURST - 2 * (RATE as usize) {
            match ws.recv().await.unwrap() {
                Received::Msg(ServerMessage::Error { code, message, .. }) => {
                    if code == ErrorCode::RateLimited {
                        assert!(message.contains("per second"), "{message}");
                        limited += 1;
                    }
                }
                Received::Msg(_) => {}
                Received::Closed(c) => panic!("closed during the flood: {c:?}"),
            }
        }
        limited
    };
    let (limited, _) = tokio::join!(flood, room.assert_alive(&server, "during the flood"));
    let flood_took = started.elapsed();
    assert!(flood_took < Duration::from_secs(10), "{flood_took:?}");

    // Still usable once tokens come back: a ping is answered (retried while rate limited).
    let deadline = Instant::now() + T;
    let mut ts = 1.0;
    'ping: loop {
        ws.send_text(format!(r#"{{"type":"ping","ts":{ts}}}"#))
            .await
            .unwrap();
        loop {
            match ws.recv().await.unwrap() {
                Received::Msg(ServerMessage::Pong { ts: Some(x), .. }) if x == ts => break 'ping,
                Received::Msg(ServerMessage::Error {
                    code: ErrorCode::RateLimited,
                    ..
                }) => {
                    break;
                }
                Received::Msg(_) => {}
                Received::Closed(c) => panic!("closed after the flood: {c:?}"),
            }
        }
        assert!(Instant::now() < deadline, "no pong after the flood");
        ts += 1.0;
        tokio::time::sleep(Duration::from_secs_f64(1.0 / RATE)).await;
    }
    let body = room.assert_alive(&server, "after the flood").await;
    assert!(
        http_counter(&body, "rate_limited_messages") >= limited as u64,
        "{body}"
    );
    assert_eq!(http_counter(&body, "rate_limit_closes"), 0, "{body}");
    server.shutdown().await;
}
