//! WebSocket session tests against the fake core, over loopback.

use super::*;
use crate::auth::dev_token;
use crate::http::fake_core::{self, Seen};
use crate::http::{HttpSettings, router};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message as WsMessage};

const LIMIT: usize = 1024;

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

struct Harness {
    addr: SocketAddr,
    seen: mpsc::UnboundedReceiver<Seen>,
    stop: watch::Sender<bool>,
    _sessions: mpsc::Receiver<()>,
}

async fn harness() -> Harness {
    let (handle, seen, _stopped) = fake_core::spawn();
    harness_with(handle, seen).await
}

async fn harness_with(handle: SfuHandle, seen: mpsc::UnboundedReceiver<Seen>) -> Harness {
    harness_with_settings(handle, seen, HttpSettings::new(LIMIT)).await
}

async fn harness_with_settings(
    handle: SfuHandle,
    seen: mpsc::UnboundedReceiver<Seen>,
    settings: HttpSettings,
) -> Harness {
    let (stop, stop_rx) = watch::channel(false);
    let (sessions_tx, sessions) = mpsc::channel(1);
    let settings = HttpSettings {
        static_dir: std::env::temp_dir().join("plaza-no-such-dir"),
        ..settings
    };
    let app = router(AppState::new(handle, settings, stop_rx, sessions_tx));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    Harness {
        addr,
        seen,
        stop,
        _sessions: sessions,
    }
}

impl Harness {
    async fn connect(&self) -> Client {
        tokio_tungstenite::connect_async(format!("ws://{}/rtc", self.addr))
            .await
            .unwrap()
            .0
    }

    /// Next thing the core saw (waits a little).
    async fn next_seen(&mut self) -> Seen {
        tokio::time::timeout(Duration::from_secs(5), self.seen.recv())
            .await
            .expect("core saw nothing")
            .expect("core gone")
    }

    /// Nothing more reaches the core for a short while.
    async fn assert_quiet(&mut self) {
        let r = tokio::time::timeout(Duration::from_millis(200), self.seen.recv()).await;
        assert!(r.is_err(), "unexpected {r:?}");
    }
}

async fn send(ws: &mut Client, text: &str) {
    ws.send(WsMessage::text(text.to_owned())).await.unwrap();
}

/// Next text message, parsed.
async fn recv(ws: &mut Client) -> Value {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("no message in time")
            .expect("socket ended")
            .expect("socket failed");
        match m {
            WsMessage::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
            other => panic!("expected text, got {other:?}"),
        }
    }
}

/// Expect the server's close frame; returns its code and reason.
async fn recv_close(ws: &mut Client) -> (u16, String) {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("no close in time");
        match m {
            Some(Ok(WsMessage::Close(Some(frame)))) => {
                return (u16::from(frame.code), frame.reason.as_str().to_owned());
            }
            Some(Ok(WsMessage::Text(t))) => panic!("expected close, got text {t}"),
            Some(Ok(_)) => continue,
            other => panic!("expected close frame, got {other:?}"),
        }
    }
}

fn assert_error(v: &Value, code: &str) {
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["code"], code, "{v}");
    assert!(!v["message"].as_str().unwrap_or("").is_empty(), "{v}");
}

async fn ping_pong(ws: &mut Client) {
    send(ws, r#"{"type":"ping","ts":42.5}"#).await;
    let v = recv(ws).await;
    assert_eq!(v["type"], "pong", "{v}");
    assert_eq!(v["ts"], 42.5, "{v}");
    assert!(
        v["server_time"].as_u64() > Some(1_700_000_000_000_000),
        "{v}"
    );
}

/// A `join` with a development token for `room` (the token names no display name).
fn join_msg(room: &str, name: &str) -> String {
    serde_json::json!({"type":"join","room":room,"name":name,"token":dev_token(room, "id-1")})
        .to_string()
}

async fn join(h: &mut Harness, ws: &mut Client, room: &str, name: &str) -> String {
    send(ws, &join_msg(room, name)).await;
    let v = recv(ws).await;
    assert_eq!(v["type"], "joined", "{v}");
    assert_eq!(
        h.next_seen().await,
        Seen::Join {
            room: room.trim().into(),
            name: name.trim().into()
        }
    );
    v["participant_id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn decode_errors_keep_the_socket_open() {
    let h = harness().await;
    let mut ws = h.connect().await;
    send(&mut ws, "{not json").await;
    assert_error(&recv(&mut ws).await, "malformed_message");
    send(&mut ws, r#"{"no":"type"}"#).await;
    assert_error(&recv(&mut ws).await, "malformed_message");
    send(&mut ws, r#"{"type":"dance"}"#).await;
    let v = recv(&mut ws).await;
    assert_error(&v, "unknown_message_type");
    assert_eq!(v["request"], "dance");
    send(&mut ws, r#"{"type":"join","room":5}"#).await;
    assert_error(&recv(&mut ws).await, "invalid_field");
    send(&mut ws, r#"{"type":"join","room":"r"}"#).await;
    assert_error(&recv(&mut ws).await, "token_missing");
    ws.send(WsMessage::binary(vec![1u8, 2, 3])).await.unwrap();
    let v = recv(&mut ws).await;
    assert_error(&v, "malformed_message");
    assert!(v["message"].as_str().unwrap().contains("binary"), "{v}");
    ping_pong(&mut ws).await;
}

#[tokio::test]
async fn join_is_validated_and_can_be_retried() {
    let mut h = harness().await;
    let mut ws = h.connect().await;
    send(&mut ws, r#"{"type":"publish_offer","sdp":"v=0"}"#).await;
    let v = recv(&mut ws).await;
    assert_error(&v, "invalid_state");
    assert_eq!(v["request"], "publish_offer");

    // The token's room and the join's name are checked like any name.
    for (room, name) in [("r", "a\u{7}b"), ("r\u{7}", "x"), ("r", "x\ty")] {
        send(&mut ws, &join_msg(room, name)).await;
        let v = recv(&mut ws).await;
        assert_error(&v, "invalid_field");
        assert_eq!(v["request"], "join");
    }
    let long = "é".repeat(MAX_NAME_CHARS + 1);
    send(&mut ws, &join_msg("r", &long)).await;
    assert_error(&recv(&mut ws).await, "invalid_field");
    send(
        &mut ws,
        &serde_json::json!({"type":"join","room":"r","name":"a","protocol":99,
                            "token": dev_token("r", "a")})
        .to_string(),
    )
    .await;
    assert_error(&recv(&mut ws).await, "unsupported_protocol");
    // The core refuses: the client hears why and can retry.
    send(&mut ws, &join_msg("full", "a")).await;
    assert_error(&recv(&mut ws).await, "unavailable");
    h.next_seen().await;
    send(&mut ws, &join_msg("r", "reject")).await;
    let v = recv(&mut ws).await;
    assert_error(&v, "invalid_field");
    assert_eq!(v["message"], "name `reject` is taken");
    h.next_seen().await;
    h.assert_quiet().await;
    // Names are trimmed; exactly MAX_NAME_CHARS is fine.
    let max = "é".repeat(MAX_NAME_CHARS);
    let pid = join(&mut h, &mut ws, " lobby ", &format!(" {max} ")).await;
    assert_eq!(pid, "PA_1");
}

#[tokio::test]
async fn joined_session_relays_both_ways() {
    let mut h = harness().await;
    let mut ws = h.connect().await;
    let pid = join(&mut h, &mut ws, "r", "alice").await;
    send(&mut ws, r#"{"type":"publish_offer","sdp":"v=0"}"#).await;
    assert_eq!(
        recv(&mut ws).await,
        serde_json::json!({"type":"publish_answer","sdp":"answer:v=0"})
    );
    assert_eq!(
        h.next_seen().await,
        Seen::Client {
            participant: pid.clone(),
            msg: ClientMessage::PublishOffer { sdp: "v=0".into() }
        }
    );
    // Local answers do not reach the core.
    ping_pong(&mut ws).await;
    send(&mut ws, &join_msg("r", "again")).await;
    assert_error(&recv(&mut ws).await, "invalid_state");
    send(&mut ws, "[]").await;
    assert_error(&recv(&mut ws).await, "malformed_message");
    send(&mut ws, r#"{"type":"mute","track_id":"TR_1"}"#).await;
    assert_error(&recv(&mut ws).await, "invalid_field");
    h.assert_quiet().await;

    // The client closes: the core hears `disconnect` exactly once.
    ws.close(None).await.unwrap();
    match h.next_seen().await {
        Seen::Disconnect { participant, .. } => assert_eq!(participant, pid),
        other => panic!("unexpected {other:?}"),
    }
    h.assert_quiet().await;
}

#[tokio::test]
async fn oversize_messages() {
    let mut h = harness().await;
    let mut ws = h.connect().await;
    // Over the protocol limit, under the hard one: error, socket stays usable (before join)...
    let big = format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(LIMIT));
    send(&mut ws, &big).await;
    let v = recv(&mut ws).await;
    assert_error(&v, "message_too_large");
    assert!(v["message"].as_str().unwrap().contains("1024"), "{v}");
    ping_pong(&mut ws).await;
    // ...and after.
    let pid = join(&mut h, &mut ws, "r", "a").await;
    send(&mut ws, &big).await;
    assert_error(&recv(&mut ws).await, "message_too_large");
    ping_pong(&mut ws).await;
    h.assert_quiet().await;
    // Exactly at the limit is fine.
    let exact = format!(
        r#"{{"type":"ping","pad":"{}"}}"#,
        "x".repeat(LIMIT - r#"{"type":"ping","pad":""}"#.len())
    );
    assert_eq!(exact.len(), LIMIT);
    send(&mut ws, &exact).await;
    assert_eq!(recv(&mut ws).await["type"], "pong");

    // Beyond the hard limit the connection is closed with 1009.
    let huge = "x".repeat(hard_limit(LIMIT) + 1);
    send(&mut ws, &huge).await;
    let (code, reason) = recv_close(&mut ws).await;
    assert_eq!(code, 1009);
    assert!(reason.contains("too large"), "{reason}");
    match h.next_seen().await {
        Seen::Disconnect { participant, .. } => assert_eq!(participant, pid),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn huge_message_before_join_closes_with_1009() {
    let h = harness().await;
    let mut ws = h.connect().await;
    send(&mut ws, &"x".repeat(hard_limit(LIMIT) + 1)).await;
    assert_eq!(recv_close(&mut ws).await.0, 1009);
}

#[tokio::test]
async fn leave_is_forwarded_then_closed() {
    let mut h = harness().await;
    let mut ws = h.connect().await;
    let pid = join(&mut h, &mut ws, "r", "a").await;
    send(&mut ws, r#"{"type":"leave"}"#).await;
    assert_eq!(recv_close(&mut ws).await, (1000, "left".to_owned()));
    assert_eq!(
        h.next_seen().await,
        Seen::Client {
            participant: pid.clone(),
            msg: ClientMessage::Leave
        }
    );
    assert_eq!(
        h.next_seen().await,
        Seen::Disconnect {
            participant: pid,
            reason: "client left".into()
        }
    );
    h.assert_quiet().await;
}

#[tokio::test]
async fn leave_before_join_just_closes() {
    let mut h = harness().await;
    let mut ws = h.connect().await;
    send(&mut ws, r#"{"type":"leave"}"#).await;
    assert_eq!(recv_close(&mut ws).await.0, 1000);
    h.assert_quiet().await;
}

#[tokio::test]
async fn core_closing_the_channel_closes_the_socket() {
    let mut h = harness().await;
    let mut ws = h.connect().await;
    let pid = join(&mut h, &mut ws, "r", "a").await;
    send(&mut ws, r#"{"type":"mute","track_id":"kick","muted":true}"#).await;
    assert_eq!(
        recv(&mut ws).await,
        serde_json::json!({"type":"leave","reason":"kicked"})
    );
    assert_eq!(recv_close(&mut ws).await, (1000, "kicked".to_owned()));
    // Reading on sends the client's close reply and sees the server end the connection.
    while let Some(Ok(_)) = ws.next().await {}
    h.next_seen().await; // the mute
    match h.next_seen().await {
        Seen::Disconnect { participant, .. } => assert_eq!(participant, pid),
        other => panic!("unexpected {other:?}"),
    }
    h.assert_quiet().await;
}

#[tokio::test]
async fn shutdown_flag_closes_sessions_that_never_joined() {
    let h = harness().await;
    let mut ws = h.connect().await;
    ping_pong(&mut ws).await;
    h.stop.send(true).unwrap();
    assert_eq!(recv_close(&mut ws).await.0, 1001);
}

#[tokio::test]
async fn core_gone() {
    // A handle whose core has stopped.
    let (tx, rx) = mpsc::channel(1);
    drop(rx);
    let (_seen_tx, seen) = mpsc::unbounded_channel();
    let h = harness_with(SfuHandle::new(tx), seen).await;
    let mut ws = h.connect().await;
    send(&mut ws, &join_msg("r", "a")).await;
    assert_error(&recv(&mut ws).await, "unavailable");
    assert_eq!(recv_close(&mut ws).await.0, 1001);

    let mut s = TcpStream::connect(h.addr).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert!(out.contains(r#""status":"unavailable""#), "{out}");
    assert!(out.contains(r#""http":{"#), "{out}");
}

#[tokio::test]
async fn sustained_flood_is_rate_limited_then_closed() {
    let (handle, seen, _stopped) = fake_core::spawn();
    let settings = HttpSettings {
        ws_message_rate: 10.0,
        ws_message_burst: 5,
        flood_close_after: Duration::from_millis(400),
        ..HttpSettings::new(LIMIT)
    };
    let mut h = harness_with_settings(handle, seen, settings).await;
    let mut ws = h.connect().await;
    let pid = join(&mut h, &mut ws, "r", "a").await;
    let (mut tx, mut rx) = ws.split();
    // Keep sending far over the rate, without pauses, until the server closes.
    let flood = tokio::spawn(async move {
        for _ in 0..2000 {
            let m = WsMessage::text(r#"{"type":"subscribe","track_ids":[],"subscribe":true}"#);
            if tx.send(m).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    });
    let started = std::time::Instant::now();
    let mut limited = 0;
    let (code, reason) = loop {
        let m = tokio::time::timeout(Duration::from_secs(5), rx.next())
            .await
            .expect("no close in time")
            .expect("socket ended")
            .expect("socket failed");
        match m {
            WsMessage::Text(t) => {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                assert_error(&v, "rate_limited");
                limited += 1;
            }
            WsMessage::Close(Some(f)) => break (u16::from(f.code), f.reason.to_string()),
            _ => {}
        }
    };
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.contains("rate limit"), "{reason}");
    assert!(limited > 10, "{limited}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(400), "{took:?}");
    flood.abort();
    // The core saw at most the burst plus what the rate refilled, then the disconnect.
    let mut passed = 0;
    loop {
        match h.next_seen().await {
            Seen::Client { .. } => passed += 1,
            Seen::Disconnect { participant, .. } => {
                assert_eq!(participant, pid);
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let allowed = 5 + (took.as_secs_f64() * 10.0).ceil() as usize + 1;
    assert!(
        passed <= allowed,
        "{passed} passed, at most {allowed} allowed"
    );
}

#[tokio::test]
async fn join_timeout_closes_with_a_reason() {
    let (handle, seen, _stopped) = fake_core::spawn();
    let settings = HttpSettings {
        join_timeout: Duration::from_millis(200),
        ..HttpSettings::new(LIMIT)
    };
    let h = harness_with_settings(handle, seen, settings).await;
    let mut ws = h.connect().await;
    ping_pong(&mut ws).await;
    let (code, reason) = recv_close(&mut ws).await;
    assert_eq!(code, 1008);
    assert_eq!(reason, "join timeout: no join within 0.2 s");
}

#[test]
fn field_validation() {
    assert_eq!(validate_field("name", "  bob "), Ok("bob".to_owned()));
    assert!(validate_field("name", "").is_err());
    assert!(validate_field("name", "a\u{0}b").is_err());
    assert!(validate_field("name", "a\u{9f}b").is_err());
    assert!(validate_field("name", &"x".repeat(129)).is_err());
    assert!(validate_field("name", "Zoë 🎉").is_ok());
    let dev = Verifier::new(crate::auth::KeySet::new());
    let counters = HttpCounters::default();
    let t = dev_token("r", "id-1");
    assert!(validate_join(&dev, &counters, Some(&t), "r", "n", Some(PROTOCOL_VERSION)).is_ok());
    assert!(
        validate_join(
            &dev,
            &counters,
            Some(&t),
            "r",
            "n",
            Some(PROTOCOL_VERSION + 1)
        )
        .is_err()
    );
}

/// The token decides the room and the identity; the display name is the token's, else the
/// join's, else the identity.
#[test]
fn join_takes_room_identity_and_name_from_the_token() {
    use crate::auth::{ApiKey, Claims, DEFAULT_TTL, mint};
    let dev = Verifier::new(crate::auth::KeySet::new());
    let counters = HttpCounters::default();
    let named = mint(
        &ApiKey::dev(),
        &Claims::new("u-1", "stage", DEFAULT_TTL).with_name("Uma"),
    )
    .unwrap();
    let a = validate_join(&dev, &counters, Some(&named), "", "ignored", None).unwrap();
    assert_eq!((a.room.as_str(), a.name.as_str()), ("stage", "Uma"));
    assert_eq!(a.identity, "u-1");
    assert_eq!(a.grants, Grants::default());
    let anon = dev_token("stage", "u-2");
    let a = validate_join(&dev, &counters, Some(&anon), "stage", " Val ", None).unwrap();
    assert_eq!(a.name, "Val");
    let a = validate_join(&dev, &counters, Some(&anon), "stage", "", None).unwrap();
    assert_eq!(a.name, "u-2");
    let code = |r: Result<Admitted, Box<ServerMessage>>| match *r.unwrap_err() {
        ServerMessage::Error { code, .. } => code,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        code(validate_join(
            &dev,
            &counters,
            Some(&anon),
            "lobby",
            "x",
            None
        )),
        ErrorCode::TokenWrongRoom
    );
    assert_eq!(
        code(validate_join(&dev, &counters, None, "stage", "x", None)),
        ErrorCode::TokenMissing
    );
    // The token is checked before anything else.
    assert_eq!(
        code(validate_join(&dev, &counters, None, "stage", "x", Some(99))),
        ErrorCode::TokenMissing
    );
    assert_eq!(counters.snapshot(None).token_refusals, 3);
}

#[tokio::test]
async fn joined_carries_turn_credentials_when_configured() {
    // Without TURN: no `ice_servers` at all.
    let h = harness().await;
    let mut ws = h.connect().await;
    send(&mut ws, &join_msg("r", "a")).await;
    let v = recv(&mut ws).await;
    assert_eq!(v["type"], "joined", "{v}");
    assert!(v.get("ice_servers").is_none(), "{v}");

    let (handle, seen, _stopped) = fake_core::spawn();
    let secret = "turn-secret-for-the-ws-test";
    let settings = HttpSettings {
        ice: crate::turn::IceConfig {
            turn_urls: vec!["turn:127.0.0.2:3478?transport=udp".into()],
            turn_secret: Some(crate::auth::Secret::new(secret)),
            turn_ttl: Duration::from_secs(600),
            stun_urls: vec!["stun:127.0.0.2:3478".into()],
        },
        ..HttpSettings::new(LIMIT)
    };
    let mut h = harness_with_settings(handle, seen, settings).await;
    let mut ws = h.connect().await;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    send(&mut ws, &join_msg("r", "a")).await;
    let v = recv(&mut ws).await;
    assert_eq!(v["type"], "joined", "{v}");
    assert_eq!(
        h.next_seen().await,
        Seen::Join {
            room: "r".into(),
            name: "a".into()
        }
    );
    let pid = v["participant_id"].as_str().unwrap();
    let servers = v["ice_servers"].as_array().expect("ice_servers");
    assert_eq!(servers.len(), 2, "{v}");
    assert_eq!(
        servers[0]["urls"],
        serde_json::json!(["turn:127.0.0.2:3478?transport=udp"])
    );
    let user = servers[0]["username"].as_str().unwrap();
    let (expiry, who) = user.split_once(':').unwrap();
    assert_eq!(who, pid);
    let expiry: u64 = expiry.parse().unwrap();
    assert!((before + 600..=before + 602).contains(&expiry), "{user}");
    assert_eq!(
        servers[0]["credential"].as_str().unwrap(),
        crate::turn::credential(secret.as_bytes(), user)
    );
    assert_eq!(
        servers[1],
        serde_json::json!({"urls": ["stun:127.0.0.2:3478"]})
    );
}
