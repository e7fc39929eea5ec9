//! Bad input on every door — signaling before and after join, oversize frames, garbage SDP,
//! random UDP datagrams — is answered or ignored, and two real peers keep exchanging media.

// Prints the random seed, so that a failing run can be replayed.
#![allow(clippy::print_stdout)]

use plaza_testkit::{self as common, support};

use std::time::Duration;

use common::Peer;
use plaza::auth::{Claims, DEFAULT_TTL};
use plaza::config::DEFAULT_MAX_WS_MESSAGE;
use plaza::signal::{ClientMessage, ErrorCode, IceCandidate, PcTarget, ServerMessage, TrackKind};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::{
    RawWs, Received, T, TestServer, announced_track, assert_media_flows, publisher, subscriber,
};

/// Two publishers in `room` that receive each other's audio and video.
/// Returns them and the (receiver, track id) pairs to watch.
async fn two_publishers(server: &TestServer, room: &str) -> (Peer, Peer, Vec<(usize, String)>) {
    let a = publisher(server, room, "alice").await;
    let b = publisher(server, room, "bob").await;
    let mut flows = Vec::new();
    for (rx, (rxp, txp)) in [(0, (&a, &b)), (1, (&b, &a))] {
        for kind in [TrackKind::Audio, TrackKind::Video] {
            let info = announced_track(rxp, txp, kind).await;
            rxp.wait_for_packets(&info.id, 20, T)
                .await
                .unwrap_or_else(|e| panic!("{} receives {}: {e:#}", rxp.name(), info.id));
            flows.push((rx, info.id));
        }
    }
    (a, b, flows)
}

async fn assert_flows(what: &str, peers: [&Peer; 2], flows: &[(usize, String)]) {
    let flows: Vec<(&Peer, &str)> = flows.iter().map(|(i, t)| (peers[*i], t.as_str())).collect();
    assert_media_flows(what, &flows, 50).await;
}

async fn expect(ws: &mut RawWs, what: &str, want: ErrorCode) -> (String, Option<String>) {
    let (code, message, request) = ws
        .expect_error()
        .await
        .unwrap_or_else(|e| panic!("{what}: no error reply: {e:#}"));
    assert_eq!(code, want, "{what}: {message}");
    (message, request)
}

/// Sends `text` on a peer's own signaling socket and expects an error with `want`.
async fn peer_expect(peer: &Peer, text: &str, want: ErrorCode) -> String {
    let from = peer.event_count();
    peer.send_ws_text(text).await.unwrap();
    let (code, message, _) = peer
        .wait_for_error_after(from, T)
        .await
        .unwrap_or_else(|e| panic!("{}: no error for {:.80}: {e:#}", peer.name(), text));
    assert_eq!(code, want, "{}: {message}", peer.name());
    message
}

/// A join with a valid token for `room` whose identity is `mallory` (and no display name).
fn join_json(room: &str, name: &str) -> String {
    let token = token_for(room);
    serde_json::json!({"type": "join", "room": room, "name": name, "token": token}).to_string()
}

fn token_for(room: &str) -> String {
    common::token::sign(&Claims::new("mallory", room, DEFAULT_TTL))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_signaling_gets_errors_and_media_keeps_flowing() {
    let server = TestServer::start().await;
    let (alice, bob, flows) = two_publishers(&server, "stage").await;
    let url = server.ws_url();

    // ── Before join ──
    let cases: Vec<(&str, String, ErrorCode)> = vec![
        (
            "truncated JSON",
            r#"{"type":"ping""#.into(),
            ErrorCode::MalformedMessage,
        ),
        (
            "no type",
            r#"{"room":"x"}"#.into(),
            ErrorCode::MalformedMessage,
        ),
        (
            "not an object",
            "[1,2,3]".into(),
            ErrorCode::MalformedMessage,
        ),
        (
            "type not a string",
            r#"{"type":7}"#.into(),
            ErrorCode::MalformedMessage,
        ),
        (
            "unknown type",
            r#"{"type":"dance"}"#.into(),
            ErrorCode::UnknownMessageType,
        ),
        (
            "join without a token",
            r#"{"type":"join","room":"stage","name":"m"}"#.into(),
            ErrorCode::TokenMissing,
        ),
        (
            "join with a token that is not a JWT",
            r#"{"type":"join","room":"stage","name":"m","token":"x.y.z"}"#.into(),
            ErrorCode::TokenInvalid,
        ),
        (
            "join with a token for another room",
            serde_json::json!({"type":"join","room":"stage","name":"m",
                               "token": token_for("backstage")})
            .to_string(),
            ErrorCode::TokenWrongRoom,
        ),
        (
            "join with a token for a blank room",
            join_json("  \t ", "mallory"),
            ErrorCode::TokenWrongRoom,
        ),
        (
            "join with a 200-char name",
            join_json("stage", &"n".repeat(200)),
            ErrorCode::InvalidField,
        ),
        (
            "join with a control char",
            join_json("stage", "mal\u{7}lory"),
            ErrorCode::InvalidField,
        ),
        (
            "join with a wrong field type",
            r#"{"type":"join","room":5,"name":"m"}"#.into(),
            ErrorCode::InvalidField,
        ),
        (
            "join with an unknown protocol",
            serde_json::json!({"type":"join","room":"stage","name":"m","protocol":99,
                               "token": token_for("stage")})
            .to_string(),
            ErrorCode::UnsupportedProtocol,
        ),
        (
            "publish_offer before join",
            r#"{"type":"publish_offer","sdp":"v=0"}"#.into(),
            ErrorCode::InvalidState,
        ),
        (
            "oversize message (soft limit)",
            format!(
                r#"{{"type":"ping","pad":"{}"}}"#,
                "x".repeat(DEFAULT_MAX_WS_MESSAGE)
            ),
            ErrorCode::MessageTooLarge,
        ),
    ];
    let mut ws = RawWs::connect(&url).await.unwrap();
    ws.send_text("{nope").await.unwrap();
    expect(&mut ws, "not JSON", ErrorCode::MalformedMessage).await;
    ws.ping(1.0)
        .await
        .expect("the socket stays usable after malformed JSON");
    for (i, (what, text, want)) in cases.iter().enumerate() {
        ws.send_text(text.clone()).await.unwrap();
        let (message, request) = expect(&mut ws, what, *want).await;
        if what.starts_with("join") {
            assert_eq!(request.as_deref(), Some("join"), "{what}: {message}");
        }
        if *want == ErrorCode::UnknownMessageType {
            assert_eq!(request.as_deref(), Some("dance"), "{what}: {message}");
        }
        ws.ping(10.0 + i as f64)
            .await
            .unwrap_or_else(|e| panic!("the socket stays usable after {what}: {e:#}"));
    }
    // A binary frame is not part of the protocol.
    ws.send_binary(b"{\"type\":\"ping\"}".to_vec())
        .await
        .unwrap();
    expect(&mut ws, "binary frame", ErrorCode::MalformedMessage).await;
    ws.ping(50.0)
        .await
        .expect("the socket stays usable after a binary frame");

    // A valid join after all that succeeds.
    let mallory = ws
        .join("stage", "mallory")
        .await
        .expect("a valid join after errors");
    assert!(mallory.starts_with("PA_"), "{mallory}");

    // ── After join, on the same socket ──
    ws.recv_until("the first subscribe_offer", |m| {
        matches!(m, ServerMessage::SubscribeOffer { .. })
    })
    .await
    .unwrap();
    let alice_video = announced_track(&bob, &alice, TrackKind::Video).await.id;
    let joined_cases: Vec<(&str, String, ErrorCode)> = vec![
        ("not JSON", "{nope".into(), ErrorCode::MalformedMessage),
        (
            "unknown type",
            r#"{"type":"dance"}"#.into(),
            ErrorCode::UnknownMessageType,
        ),
        (
            "second join",
            join_json("stage", "again"),
            ErrorCode::InvalidState,
        ),
        (
            "mute without fields",
            r#"{"type":"mute"}"#.into(),
            ErrorCode::InvalidField,
        ),
        (
            "oversize message",
            format!(
                r#"{{"type":"ping","pad":"{}"}}"#,
                "y".repeat(DEFAULT_MAX_WS_MESSAGE + 100)
            ),
            ErrorCode::MessageTooLarge,
        ),
        (
            "garbage publish_offer",
            serde_json::to_string(&ClientMessage::PublishOffer {
                sdp: "this is not SDP\r\nm=nothing\r\n".into(),
            })
            .unwrap(),
            ErrorCode::InvalidSdp,
        ),
        (
            "garbage subscribe_answer (an offer is pending)",
            serde_json::to_string(&ClientMessage::SubscribeAnswer {
                sdp: "garbage".into(),
            })
            .unwrap(),
            ErrorCode::InvalidSdp,
        ),
        (
            "garbage candidate",
            serde_json::to_string(&ClientMessage::Trickle {
                target: PcTarget::Subscriber,
                candidate: IceCandidate {
                    candidate: "candidate:garbage".into(),
                    sdp_mid: Some("0".into()),
                    sdp_mline_index: Some(0),
                    username_fragment: None,
                },
            })
            .unwrap(),
            ErrorCode::InvalidCandidate,
        ),
        (
            "subscribe to an unknown track",
            r#"{"type":"subscribe","track_ids":["TR_nope"],"subscribe":true}"#.into(),
            ErrorCode::NotFound,
        ),
        (
            "mute someone else's track",
            serde_json::to_string(&ClientMessage::Mute {
                track_id: alice_video.clone(),
                muted: true,
            })
            .unwrap(),
            ErrorCode::NotFound,
        ),
    ];
    for (i, (what, text, want)) in joined_cases.iter().enumerate() {
        ws.send_text(text.clone()).await.unwrap();
        let (message, _) = expect(&mut ws, what, *want).await;
        ws.ping(100.0 + i as f64).await.unwrap_or_else(|e| {
            panic!("the joined socket stays usable after {what} ({message}): {e:#}")
        });
    }
    ws.send_binary(vec![0x00, 0x0A, 0xFF]).await.unwrap();
    expect(
        &mut ws,
        "binary frame after join",
        ErrorCode::MalformedMessage,
    )
    .await;
    ws.ping(200.0).await.expect("usable after a binary frame");

    // ── On the real peers' own sockets ──
    peer_expect(&alice, "{nope", ErrorCode::MalformedMessage).await;
    peer_expect(&alice, r#"{"type":"dance"}"#, ErrorCode::UnknownMessageType).await;
    let pad = "z".repeat(DEFAULT_MAX_WS_MESSAGE + 1);
    peer_expect(
        &bob,
        &format!(r#"{{"type":"ping","pad":"{pad}"}}"#),
        ErrorCode::MessageTooLarge,
    )
    .await;
    // Bob's subscriber connection is negotiated: no offer is waiting for an answer.
    let n = bob.negotiation();
    assert_eq!(n.subscribe_offers, n.subscribe_answers, "{n:?}");
    let message = peer_expect(
        &bob,
        &serde_json::to_string(&ClientMessage::SubscribeAnswer {
            sdp: "v=0\r\n".into(),
        })
        .unwrap(),
        ErrorCode::InvalidState,
    )
    .await;
    assert!(message.contains("subscribe_offer"), "{message}");
    // That error came from the core, after it handled mallory's requests: had it applied
    // mallory's mute of alice's video, bob would have heard it by now.
    assert!(
        !bob.events().iter().any(|e| matches!(
            &e.event,
            common::PeerEvent::Server(ServerMessage::TrackMuted { .. })
        )),
        "someone else's mute request was applied"
    );
    // Likewise for alice (a core-routed error first): of all the join attempts on the
    // refused socket, only the valid one entered the room.
    peer_expect(
        &alice,
        r#"{"type":"mute","track_id":"TR_nope","muted":true}"#,
        ErrorCode::NotFound,
    )
    .await;
    let joined: Vec<String> = alice
        .events()
        .into_iter()
        .filter_map(|e| match e.event {
            common::PeerEvent::Server(ServerMessage::ParticipantJoined { participant }) => {
                Some(participant.name)
            }
            _ => None,
        })
        .collect();
    assert_eq!(joined, ["bob", "mallory"], "participants alice saw join");
    alice.ping().await.unwrap();
    bob.ping().await.unwrap();

    assert_flows("after bad signaling", [&alice, &bob], &flows).await;
    let (status, health) = server.healthz().await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(health["participants"], 3, "{health}");
    ws.close().await;

    // ── Beyond the hard limit: the connection is closed with 1009 ──
    // The server closes as soon as it reads the frame header, while the client is still
    // sending (more than the socket buffers hold): the client reads while it sends.
    let big = RawWs::connect(&url).await.unwrap();
    let hard = plaza::http::ws::hard_limit(DEFAULT_MAX_WS_MESSAGE);
    let text = format!(r#"{{"type":"ping","pad":"{}"}}"#, "h".repeat(hard));
    match big.send_unreadable_and_recv(text).await.unwrap() {
        Received::Closed(Some((code, reason))) => {
            assert_eq!(code, 1009, "{reason}");
        }
        other => panic!("expected a close with 1009, got {other:?}"),
    }
    assert_flows("after the hard-limit close", [&alice, &bob], &flows).await;

    alice.leave().await.unwrap();
    bob.leave().await.unwrap();
    server.shutdown().await;
}

// ───────────────────────────── UDP garbage ─────────────────────────────

fn stun_attr(out: &mut Vec<u8>, typ: u16, value: &[u8]) {
    out.extend_from_slice(&typ.to_be_bytes());
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value);
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

/// A well-formed STUN binding request with `username`, a priority, ICE-CONTROLLING, and
/// random (so wrong) MESSAGE-INTEGRITY and FINGERPRINT.
fn stun_binding_request(rng: &mut StdRng, username: &str) -> Vec<u8> {
    let mut attrs = Vec::new();
    stun_attr(&mut attrs, 0x0006, username.as_bytes());
    stun_attr(&mut attrs, 0x0024, &rng.random::<u32>().to_be_bytes());
    stun_attr(&mut attrs, 0x802A, &rng.random::<u64>().to_be_bytes());
    if rng.random_bool(0.5) {
        stun_attr(&mut attrs, 0x0025, &[]); // USE-CANDIDATE
    }
    stun_attr(&mut attrs, 0x0008, &rng.random::<[u8; 20]>());
    stun_attr(&mut attrs, 0x8028, &rng.random::<[u8; 4]>());
    let mut msg = Vec::with_capacity(20 + attrs.len());
    msg.extend_from_slice(&0x0001u16.to_be_bytes());
    msg.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    msg.extend_from_slice(&[0x21, 0x12, 0xA4, 0x42]);
    msg.extend_from_slice(&rng.random::<[u8; 12]>());
    msg.extend_from_slice(&attrs);
    msg
}

fn random_ascii(rng: &mut StdRng, n: usize) -> String {
    (0..n)
        .map(|_| char::from(rng.random_range(b'!'..=b'~')))
        .collect()
}

fn random_bytes(rng: &mut StdRng, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

/// Datagram number `i` of the flood: a mix of shapes the server's demultiplexer must survive.
fn garbage(rng: &mut StdRng, i: usize, real_ufrags: &[String]) -> Vec<u8> {
    match i % 8 {
        // Anything, including empty datagrams.
        0 => {
            let len = if i % 64 == 0 {
                0
            } else {
                rng.random_range(1..1500)
            };
            random_bytes(rng, len)
        }
        // STUN-looking: first byte 0..=3, the magic cookie, random attributes (lengths lie).
        1 => {
            let len = rng.random_range(1..600);
            let mut v = random_bytes(rng, len);
            v[0] = rng.random_range(0..4);
            if v.len() >= 8 && rng.random_bool(0.7) {
                v[4..8].copy_from_slice(&[0x21, 0x12, 0xA4, 0x42]);
            }
            v
        }
        // A binding request whose USERNAME length runs past the end of the datagram.
        2 => {
            let user = random_ascii(rng, 9);
            let mut v = stun_binding_request(rng, &user);
            let cut = rng.random_range(24..v.len());
            v[22..24].copy_from_slice(&0xFFF0u16.to_be_bytes());
            v.truncate(cut);
            v
        }
        // DTLS-looking: content type 20..=63, DTLS 1.2 version, random epoch/length/body.
        3 => {
            let len = rng.random_range(1..1400);
            let mut v = random_bytes(rng, len);
            v[0] = rng.random_range(20..64);
            if v.len() >= 3 {
                v[1] = 0xFE;
                v[2] = 0xFD;
            }
            v
        }
        // RTP/RTCP-looking: version 2, random payload type (RTCP range too), random body.
        4 => {
            let len = rng.random_range(1..1400);
            let mut v = random_bytes(rng, len);
            v[0] = 0x80 | (v[0] & 0x3F);
            v
        }
        // Well-formed binding requests with random USERNAMEs.
        5 | 6 => {
            let (a, b) = (rng.random_range(1..40), rng.random_range(1..40));
            let user = format!("{}:{}", random_ascii(rng, a), random_ascii(rng, b));
            stun_binding_request(rng, &user)
        }
        // Binding requests naming a real server ufrag, with a wrong MESSAGE-INTEGRITY.
        _ => {
            let ufrag = real_ufrags[rng.random_range(0..real_ufrags.len())].clone();
            let user = format!("{ufrag}:{}", random_ascii(rng, 8));
            stun_binding_request(rng, &user)
        }
    }
}

/// Sends datagrams number `range` of the flood to `to`.
async fn flood(
    sock: &tokio::net::UdpSocket,
    to: std::net::SocketAddr,
    rng: &mut StdRng,
    range: std::ops::Range<usize>,
    ufrags: &[String],
) {
    for i in range {
        let d = garbage(rng, i, ufrags);
        sock.send_to(&d, to).await.unwrap();
        if i % 200 == 199 {
            // Pacing, not synchronisation: keep the flood from just overflowing the socket
            // buffer, so the core really parses these datagrams.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// The server's ICE ufrags from the SDPs a peer received (subscriber offers, publisher answer).
fn server_ufrags(peer: &Peer) -> Vec<String> {
    let mut out = Vec::new();
    for e in peer.events() {
        let sdp = match &e.event {
            common::PeerEvent::Server(ServerMessage::SubscribeOffer { sdp })
            | common::PeerEvent::Server(ServerMessage::PublishAnswer { sdp }) => sdp,
            _ => continue,
        };
        for line in sdp.lines() {
            if let Some(u) = line.trim().strip_prefix("a=ice-ufrag:") {
                if !out.iter().any(|x| x == u) {
                    out.push(u.to_owned());
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_garbage_is_ignored_and_media_keeps_flowing() {
    let server = TestServer::start().await;
    let (alice, bob, flows) = two_publishers(&server, "udp").await;
    let mut ufrags = server_ufrags(&alice);
    ufrags.extend(server_ufrags(&bob));
    assert!(ufrags.len() >= 4, "server ufrags: {ufrags:?}");

    let (_, before) = server.healthz().await.unwrap();
    // PLAZA_TEST_SEED=<n> replays a run.
    let seed: u64 = std::env::var("PLAZA_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("UDP garbage seed: {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    const N: usize = 4000;
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    flood(&sock, server.udp_addr, &mut rng, 0..N, &ufrags).await;

    assert_flows(
        &format!("after {N} garbage datagrams (seed {seed})"),
        [&alice, &bob],
        &flows,
    )
    .await;
    let (status, after) = server.healthz().await.unwrap();
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["status"], "ok", "{after}");
    let got =
        after["udp_datagrams_in"].as_u64().unwrap() - before["udp_datagrams_in"].as_u64().unwrap();
    assert!(
        got >= N as u64 * 9 / 10,
        "the core saw {got} datagrams: the flood did not reach it, the test proves nothing"
    );
    assert_eq!(after["participants"], 2, "{after}");

    // The core still serves: a newcomer joins and receives both publishers' media.
    let carol = subscriber(&server, "udp", "carol").await;
    let mut carol_tracks = Vec::new();
    for p in [&alice, &bob] {
        for kind in [TrackKind::Audio, TrackKind::Video] {
            let id = announced_track(&carol, p, kind).await.id;
            carol.wait_for_packets(&id, 30, T).await.unwrap_or_else(|e| {
                panic!(
                    "carol receives {}'s {kind:?} {id}: {e:#}\nremote tracks: {:#?}\nnegotiation: {:?}",
                    p.name(),
                    carol.remote_tracks(),
                    carol.negotiation()
                )
            });
            carol_tracks.push(id);
        }
    }
    // More from the same socket, now that carol's connections exist too: had the server
    // taken the garbage sender's address for one of its peers' (a spoofed binding request
    // naming a real ufrag), this would go into that peer's DTLS/SRTP.
    ufrags.extend(server_ufrags(&carol));
    flood(&sock, server.udp_addr, &mut rng, N..N + 1000, &ufrags).await;
    assert_flows("after the second flood", [&alice, &bob], &flows).await;
    let carol_flows: Vec<(&Peer, &str)> =
        carol_tracks.iter().map(|t| (&carol, t.as_str())).collect();
    assert_media_flows("carol, after the second flood", &carol_flows, 50).await;

    for p in [&alice, &bob, &carol] {
        p.leave().await.unwrap();
    }
    server.shutdown().await;
}
