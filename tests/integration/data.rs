//! Data-channel relay end to end: `chat` (reliable, ordered, text here) and `input`
//! (unordered, unreliable, binary here), broadcast and targeted, limits and envelope errors.

use plaza_testkit::{self as common, support};

use bytes::Bytes;
use common::{Channel, DataMessage, Payload, Peer};
use plaza::signal::ErrorCode;
use support::{T, TestServer, errors_after, subscriber};

/// Multi-byte UTF-8 (2, 3 and 4 bytes), a newline and JSON-looking text in the payload.
const TEXT: &str = "héllo wörld — 你好 🎉👋🏽\nsecond line {\"from\":\"PA_nobody\"}";

/// Every byte value, starting with the awkward ones.
fn binary_payload() -> Vec<u8> {
    let mut b = vec![0x00, 0x0A, 0xFF, 0x0A, 0x0A, 0x00, 0x0D, 0x0A];
    b.extend(0..=255u8);
    b.extend([0xFF, 0xFE, 0x00]);
    b
}

async fn three(server: &TestServer, room: &str) -> (Peer, Peer, Peer) {
    let a = subscriber(server, room, "ann").await;
    let b = subscriber(server, room, "ben").await;
    let c = subscriber(server, room, "cid").await;
    (a, b, c)
}

async fn wait_msg(peer: &Peer, what: &str, pred: impl FnMut(&DataMessage) -> bool) -> DataMessage {
    peer.wait_for_message(pred, T).await.unwrap_or_else(|e| {
        panic!(
            "{} receives {what}: {e:#}\nreceived: {:#?}",
            peer.name(),
            peer.messages()
        )
    })
}

fn payload_is(m: &DataMessage, bytes: &[u8]) -> bool {
    &m.payload[..] == bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_text_and_binary_reach_everyone_else_intact() {
    let server = TestServer::start().await;
    let (ann, ben, cid) = three(&server, "data").await;

    // Text on `chat`, from ann to everyone else.
    ann.send_chat(TEXT, None).await.unwrap();
    for p in [&ben, &cid] {
        let m = wait_msg(p, "ann's chat text", |m| payload_is(m, TEXT.as_bytes())).await;
        assert_eq!(m.channel, Channel::Chat);
        assert!(m.is_text, "the text type is preserved: {m:?}");
        assert_eq!(m.text(), Some(TEXT));
        assert_eq!(m.from.as_deref(), Some(ann.participant_id()));
        assert!(m.malformed.is_none(), "{m:?}");
    }

    // Binary on `input`, from ben to everyone else.
    let bin = binary_payload();
    ben.send_input(&bin, None).await.unwrap();
    for p in [&ann, &cid] {
        let m = wait_msg(p, "ben's binary input", |m| payload_is(m, &bin)).await;
        assert_eq!(m.channel, Channel::Input);
        assert!(!m.is_text, "the binary type is preserved: {m:?}");
        assert_eq!(&m.payload[..], &bin[..], "byte-identical payload");
        assert_eq!(m.from.as_deref(), Some(ben.participant_id()));
    }

    // Binary on `chat` and text on `input` work too; an empty payload is a message.
    cid.send_data(
        Channel::Chat,
        Payload::Binary(Bytes::from(bin.clone())),
        None,
    )
    .await
    .unwrap();
    cid.send_data(Channel::Input, Payload::Text(String::new()), None)
        .await
        .unwrap();
    for p in [&ann, &ben] {
        let m = wait_msg(p, "cid's binary chat", |m| {
            m.channel == Channel::Chat && payload_is(m, &bin)
        })
        .await;
        assert!(!m.is_text);
        assert_eq!(m.from.as_deref(), Some(cid.participant_id()));
        let m = wait_msg(p, "cid's empty text input", |m| {
            m.channel == Channel::Input && m.payload.is_empty()
        })
        .await;
        assert!(m.is_text);
        assert_eq!(m.from.as_deref(), Some(cid.participant_id()));
    }

    // A sender cannot claim to be someone else: `from` is set by the server.
    let spoof = format!("{{\"from\":\"{}\"}}\nspoofed", ben.participant_id());
    ann.send_raw_data(Channel::Chat, Bytes::from(spoof), true)
        .await
        .unwrap();
    for p in [&ben, &cid] {
        let m = wait_msg(p, "the spoofing attempt", |m| payload_is(m, b"spoofed")).await;
        assert_eq!(m.from.as_deref(), Some(ann.participant_id()));
    }

    // Nobody gets their own messages back (everything they sent has been delivered by now).
    for p in [&ann, &ben, &cid] {
        let own: Vec<_> = p
            .messages()
            .into_iter()
            .filter(|m| m.from.as_deref() == Some(p.participant_id()))
            .collect();
        assert!(own.is_empty(), "{} got its own messages: {own:?}", p.name());
        assert!(p.server_errors().is_empty(), "{:?}", p.server_errors());
    }
    let (_, health) = server.healthz().await.unwrap();
    assert!(
        health["data_messages_relayed"].as_u64().unwrap() >= 10,
        "{health}"
    );

    for p in [&ann, &ben, &cid] {
        p.leave().await.unwrap();
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn targeted_message_reaches_only_its_recipient() {
    let server = TestServer::start().await;
    let (ann, ben, cid) = three(&server, "dm").await;

    ann.send_chat("for ben only", Some(vec![ben.participant_id().to_owned()]))
        .await
        .unwrap();
    let m = wait_msg(&ben, "the targeted message", |m| {
        payload_is(m, b"for ben only")
    })
    .await;
    assert_eq!(m.from.as_deref(), Some(ann.participant_id()));
    assert_eq!(m.channel, Channel::Chat);

    // `chat` is ordered and the server relays a sender's messages in order: once cid has the
    // later broadcast, the targeted message would have reached cid before it.
    ann.send_chat("for everyone", None).await.unwrap();
    wait_msg(&cid, "the later broadcast", |m| {
        payload_is(m, b"for everyone")
    })
    .await;
    wait_msg(&ben, "the later broadcast", |m| {
        payload_is(m, b"for everyone")
    })
    .await;
    let leaked: Vec<_> = cid
        .messages()
        .into_iter()
        .filter(|m| payload_is(m, b"for ben only"))
        .collect();
    assert!(
        leaked.is_empty(),
        "cid got a message addressed to ben: {leaked:?}"
    );

    // Several recipients, binary on `input`: both named ones get it.
    let bin = [0x00, 0x0A, 0xFF, 0x42];
    ben.send_input(
        &bin,
        Some(vec![
            ann.participant_id().to_owned(),
            cid.participant_id().to_owned(),
        ]),
    )
    .await
    .unwrap();
    for p in [&ann, &cid] {
        let m = wait_msg(p, "ben's input to ann and cid", |m| payload_is(m, &bin)).await;
        assert_eq!(m.from.as_deref(), Some(ben.participant_id()));
        assert!(!m.is_text);
    }

    // An unknown recipient is reported to the sender (not_found) and nothing is relayed.
    let from = ann.event_count();
    ann.send_chat("to nobody", Some(vec!["PA_doesnotexist".to_owned()]))
        .await
        .unwrap();
    let (code, message, request) = ann.wait_for_error_after(from, T).await.unwrap();
    assert_eq!(code, ErrorCode::NotFound, "{message}");
    assert!(message.contains("PA_doesnotexist"), "{message}");
    assert_eq!(request.as_deref(), Some("chat"));
    ann.send_chat("marker after nobody", None).await.unwrap();
    for p in [&ben, &cid] {
        wait_msg(p, "the marker", |m| payload_is(m, b"marker after nobody")).await;
        assert!(
            !p.messages().iter().any(|m| payload_is(m, b"to nobody")),
            "{} got a message addressed to an unknown participant",
            p.name()
        );
    }

    for p in [&ann, &ben, &cid] {
        p.leave().await.unwrap();
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_and_headerless_messages_are_refused_with_an_error() {
    let server = TestServer::start().await;
    let (ann, ben, cid) = three(&server, "limits").await;
    let max = ann.joined().max_data_message;
    assert!(max > 0);
    assert!(
        max + 1024 < 64 * 1024,
        "the test sends max+1 bytes, which must stay under the SCTP limit"
    );

    // Exactly the limit is relayed, byte for byte.
    let at_limit = "a".repeat(max);
    ann.send_chat(&at_limit, None).await.unwrap();
    for p in [&ben, &cid] {
        let m = wait_msg(p, "the message at the limit", |m| m.payload.len() == max).await;
        assert_eq!(m.text(), Some(at_limit.as_str()));
    }

    // One byte over: an error on the WebSocket, nothing relayed.
    let from = ann.event_count();
    ann.send_chat(&"b".repeat(max + 1), None).await.unwrap();
    let (code, message, request) = ann.wait_for_error_after(from, T).await.unwrap();
    assert_eq!(code, ErrorCode::MessageTooLarge, "{message}");
    assert_eq!(request.as_deref(), Some("chat"), "{message}");

    // Binary on `input`, well over the limit (still far below the SCTP maximum).
    let from = ann.event_count();
    ann.send_input(&vec![0xFF; max + 4096], None).await.unwrap();
    let (code, message, request) = ann.wait_for_error_after(from, T).await.unwrap();
    assert_eq!(code, ErrorCode::MessageTooLarge, "{message}");
    assert_eq!(request.as_deref(), Some("input"), "{message}");

    // No header line (no "\n" at all): an error, nothing relayed.
    let from = ann.event_count();
    ann.send_raw_data(Channel::Chat, Bytes::from_static(b"no header here"), true)
        .await
        .unwrap();
    let (code, message, request) = ann.wait_for_error_after(from, T).await.unwrap();
    assert_eq!(code, ErrorCode::InvalidField, "{message}");
    assert!(message.contains("header"), "{message}");
    assert_eq!(request.as_deref(), Some("chat"));

    // A header that is not a JSON object: an error too.
    let from = ann.event_count();
    ann.send_raw_data(Channel::Chat, Bytes::from_static(b"[1,2]\npayload"), true)
        .await
        .unwrap();
    let (code, message, _) = ann.wait_for_error_after(from, T).await.unwrap();
    assert_eq!(code, ErrorCode::InvalidField, "{message}");

    // The channel still works, and the refused messages never arrived before this one.
    ann.send_chat("still fine", None).await.unwrap();
    for p in [&ben, &cid] {
        wait_msg(p, "the message after the refused ones", |m| {
            payload_is(m, b"still fine")
        })
        .await;
        let chat: Vec<Bytes> = p
            .messages()
            .into_iter()
            .filter(|m| m.channel == Channel::Chat)
            .map(|m| m.payload)
            .collect();
        assert_eq!(
            chat,
            vec![
                Bytes::from(at_limit.clone()),
                Bytes::from_static(b"still fine")
            ],
            "{}: only the valid chat messages, in order",
            p.name()
        );
        assert!(
            p.messages().iter().all(|m| m.channel != Channel::Input),
            "{}: the oversize input was relayed",
            p.name()
        );
    }
    // Only the errors above were sent to ann, none to the others.
    assert_eq!(
        errors_after(&ann, 0).len(),
        4,
        "{:?}",
        errors_after(&ann, 0)
    );
    assert!(ben.server_errors().is_empty() && cid.server_errors().is_empty());

    for p in [&ann, &ben, &cid] {
        p.leave().await.unwrap();
    }
    server.shutdown().await;
}

/// The room timeline over real sockets: every relayed message carries `seq` (one order for
/// every receiver) and the server's `ts` (between send and receive on this machine's clock);
/// a late joiner's `history` replays what was said before it came, marked `replay`; the time
/// relayed messages spent in the server is in `/healthz`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::disallowed_methods)] // the server's stamps are checked against this machine's clock
async fn the_timeline_stamps_orders_and_replays() {
    let server = TestServer::start().await;
    let (ann, ben, cid) = three(&server, "timeline").await;
    let unix_us = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64
    };
    let before = unix_us();
    for i in 0..10 {
        ann.send_chat(&format!("a{i}"), None).await.unwrap();
        ben.send_chat(&format!("b{i}"), None).await.unwrap();
    }
    let seq_of = |m: &DataMessage| m.header.get("seq").and_then(|v| v.as_u64());
    // Chat is ordered: each sender's last message arriving means all of its messages did.
    for p in [&ann, &ben, &cid] {
        for last in ["a9", "b9"] {
            if (last == "a9" && p.participant_id() == ann.participant_id())
                || (last == "b9" && p.participant_id() == ben.participant_id())
            {
                continue;
            }
            wait_msg(p, last, |m| payload_is(m, last.as_bytes())).await;
        }
    }
    let after = unix_us();
    let order = |p: &Peer| -> Vec<(u64, String)> {
        p.messages()
            .iter()
            .filter(|m| m.channel == Channel::Chat)
            .map(|m| (seq_of(m).expect("seq"), m.text().unwrap().to_owned()))
            .collect()
    };
    let c = order(&cid);
    assert!(c.windows(2).all(|w| w[0].0 < w[1].0), "seq order: {c:?}");
    // ann and ben each see the other's messages with the seqs cid saw.
    for p in [&ann, &ben] {
        for m in order(p) {
            assert!(c.contains(&m), "{} saw {m:?}, cid did not", p.name());
        }
    }
    for m in cid.messages() {
        let ts = m.header.get("ts").and_then(|v| v.as_u64()).expect("ts");
        assert!(before <= ts && ts <= after, "{before} <= {ts} <= {after}");
    }

    // A late joiner asks for everything kept.
    let dan = subscriber(&server, "timeline", "dan").await;
    dan.wait_data_channels(T).await.unwrap();
    dan.send(plaza::signal::ClientMessage::History { since: 0 })
        .await
        .unwrap();
    let reply = dan
        .wait_for_server(
            |m| matches!(m, plaza::signal::ServerMessage::History { .. }),
            T,
        )
        .await
        .unwrap();
    let plaza::signal::ServerMessage::History {
        replayed, complete, ..
    } = reply
    else {
        unreachable!()
    };
    assert_eq!((replayed, complete), (20, true));
    let (last_seq, _) = c.last().cloned().unwrap();
    wait_msg(&dan, "the last replayed message", |m| {
        m.header.contains_key("replay") && seq_of(m) == Some(last_seq)
    })
    .await;
    let replay: Vec<(u64, String)> = order(&dan);
    assert_eq!(
        replay, c,
        "the same messages, seqs and order as cid saw live"
    );

    let (_, health) = server.healthz().await.unwrap();
    let lat = &health["data_relay_latency"];
    // (Counted per datagram: several messages may share one.)
    assert!(lat["count"].as_u64().unwrap() >= 4, "{lat}");
    assert!(lat["p50_us"].as_u64().is_some(), "{lat}");
    for p in [&ann, &ben, &cid, &dan] {
        assert!(p.server_errors().is_empty(), "{:?}", p.server_errors());
        p.leave().await.unwrap();
    }
    server.shutdown().await;
}
