//! The room admin API (`/api/...`) and moderation on the WebSocket, against the real server
//! with real WebRTC peers: every call with its grant (allowed and refused), what the
//! participants see of it, and that a refused call changes nothing.

// A test, not the packet path: it times the remove-participant round trip with the clock.
#![allow(clippy::disallowed_methods)]

use plaza_testkit::token::with_grants as token;
use plaza_testkit::{self as common, support};

use common::{Channel, PeerEvent, PeerOptions};
use plaza::auth::RoomGrants;
use plaza::signal::{ClientMessage, ErrorCode, LeaveReason, ServerMessage, TrackKind};
use serde_json::{Value, json};
use std::time::Instant;
use support::{T, TestServer, announced_track, opts, test_config, wait_growth};

/// An admin-API token for `room`.
fn admin_token(room: &str) -> String {
    token(room, "ops", |g| {
        g.room_join = false;
        g.room_admin = true;
    })
}

/// A token that may list rooms (and nothing else).
fn list_token() -> String {
    token("any", "lister", |g| {
        g.room_join = false;
        g.room_list = true;
    })
}

async fn peer(server: &TestServer, room: &str, identity: &str, publish: bool) -> common::Peer {
    peer_with(server, room, identity, publish, |_| {}).await
}

async fn peer_with(
    server: &TestServer,
    room: &str,
    identity: &str,
    publish: bool,
    f: impl FnOnce(&mut RoomGrants),
) -> common::Peer {
    let o = PeerOptions {
        token: Some(token(room, identity, f)),
        ..opts(publish)
    };
    common::Peer::connect(&server.ws_url(), room, identity, o)
        .await
        .unwrap_or_else(|e| panic!("{identity} connects: {e:#}"))
}

/// One admin-API call: status and JSON body.
async fn call(
    server: &TestServer,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, Value) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| ("Authorization", a))
        .into_iter()
        .collect();
    let (status, text) = support::http_request(server.http_addr, method, path, &headers, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"));
    let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, value)
}

/// Asserts a refusal: status and error code.
fn refused(res: &(u16, Value), status: u16, code: &str) {
    assert_eq!(res.0, status, "{res:?}");
    assert_eq!(res.1["code"], code, "{res:?}");
}

fn identities(list: &Value) -> Vec<String> {
    let mut ids: Vec<String> = list["participants"]
        .as_array()
        .unwrap_or_else(|| panic!("a participant list: {list}"))
        .iter()
        .map(|p| p["identity"].as_str().unwrap_or_default().to_owned())
        .collect();
    ids.sort();
    ids
}

/// The reason the server gave in its `leave`.
fn said(r: &common::peer::Removal) -> &str {
    r.reason
        .strip_prefix("server sent leave: ")
        .unwrap_or_else(|| panic!("removed by the server's leave: {r:?}"))
}

async fn muted_drops(server: &TestServer) -> u64 {
    let (_, m) = support::stats(server.http_addr).await.expect("stats");
    m["forward_dropped"]["muted"]
        .as_u64()
        .expect("forward_dropped.muted")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_lists_mutes_updates_sends_removes_and_closes() {
    let server = TestServer::start().await;
    let room = "adm";
    let alice = peer(&server, room, "alice", true).await;
    let bob = peer(&server, room, "bob", false).await;
    let rec = peer_with(&server, room, "rec", false, |g| g.hidden = true).await;
    let video = announced_track(&bob, &alice, TrackKind::Video).await;
    let audio = announced_track(&bob, &alice, TrackKind::Audio).await;
    wait_growth(&bob, &video.id, 10).await;
    let admin = admin_token(room);
    let base = format!("/api/rooms/{room}");

    // ── Authorization: nothing without a token that grants it; a refusal changes nothing.
    refused(
        &call(&server, "GET", "/api/rooms", None, "").await,
        401,
        "token_missing",
    );
    refused(
        &call(&server, "GET", "/api/rooms", Some("not.a.jwt"), "").await,
        401,
        "token_invalid",
    );
    refused(
        &call(&server, "GET", "/api/rooms", Some(&admin), "").await,
        403,
        "permission_denied",
    );
    let participant = token(room, "mallory", |_| {});
    refused(
        &call(
            &server,
            "GET",
            &format!("{base}/participants"),
            Some(&participant),
            "",
        )
        .await,
        403,
        "permission_denied",
    );
    let other_room = admin_token("elsewhere");
    refused(
        &call(
            &server,
            "DELETE",
            &format!("{base}/participants/bob"),
            Some(&other_room),
            "",
        )
        .await,
        403,
        "token_wrong_room",
    );
    assert!(bob.removed().is_none(), "a refused call removed nobody");

    // ── List rooms (with `roomList`) and participants (hidden ones too).
    let (status, rooms) = call(&server, "GET", "/api/rooms", Some(&list_token()), "").await;
    assert_eq!(status, 200, "{rooms}");
    let listed = rooms["rooms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == room)
        .unwrap_or_else(|| panic!("room listed: {rooms}"));
    assert_eq!(listed["participants"], 3, "{listed}");
    assert_eq!(listed["tracks"], 2, "{listed}");
    let (status, list) = call(
        &server,
        "GET",
        &format!("{base}/participants"),
        Some(&admin),
        "",
    )
    .await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(identities(&list), ["alice", "bob", "rec"]);
    let (status, one) = call(
        &server,
        "GET",
        &format!("{base}/participants/alice"),
        Some(&admin),
        "",
    )
    .await;
    assert_eq!(status, 200, "{one}");
    assert_eq!(one["participant"]["participant_id"], alice.participant_id());
    assert_eq!(one["participant"]["tracks"].as_array().unwrap().len(), 2);
    assert_eq!(one["participant"]["permissions"]["publish_video"], true);
    let (_, hidden) = call(
        &server,
        "GET",
        &format!("{base}/participants/rec"),
        Some(&admin),
        "",
    )
    .await;
    assert_eq!(
        hidden["participant"]["permissions"]["hidden"], true,
        "{hidden}"
    );
    for path in [
        format!("{base}/participants/nobody"),
        "/api/rooms/nowhere/participants".to_owned(),
    ] {
        let admin_of = if path.contains("nowhere") {
            admin_token("nowhere")
        } else {
            admin.clone()
        };
        refused(
            &call(&server, "GET", &path, Some(&admin_of), "").await,
            404,
            "not_found",
        );
    }

    // ── Mute alice's video from the server: forwarding stops, everyone is told, alice cannot
    // unmute it herself; the admin's unmute brings it back.
    let mute_path = format!("{base}/participants/alice/tracks/{}/mute", video.id);
    let (status, res) = call(
        &server,
        "POST",
        &mute_path,
        Some(&admin),
        r#"{"muted":true}"#,
    )
    .await;
    assert_eq!(status, 200, "{res}");
    for p in [&alice, &bob] {
        p.wait_for_server(
            |m| matches!(m, ServerMessage::TrackMuted { track_id, muted: true, by_admin: true, .. } if *track_id == video.id),
            T,
        )
        .await
        .unwrap_or_else(|e| panic!("{} is told of the admin mute: {e:#}", p.name()));
    }
    let drops = muted_drops(&server).await;
    let before = support::packets(&bob, &video.id);
    // The publisher keeps sending; the server drops it.
    let waited = tokio::time::timeout(T, async {
        while muted_drops(&server).await < drops + 30 {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "the muted video reaches the server and is dropped"
    );
    let leaked = support::packets(&bob, &video.id) - before;
    assert!(
        leaked <= 5,
        "{leaked} video packets reached bob while muted"
    );
    wait_growth(&bob, &audio.id, 10).await; // audio is not muted
    let from = alice.event_count();
    alice
        .send(ClientMessage::Mute {
            track_id: video.id.clone(),
            muted: false,
        })
        .await
        .unwrap();
    let (code, message, _) = alice.wait_for_error_after(from, T).await.unwrap();
    assert_eq!(code, ErrorCode::PermissionDenied, "{message}");
    let (status, _) = call(
        &server,
        "POST",
        &mute_path,
        Some(&admin),
        r#"{"muted":false}"#,
    )
    .await;
    assert_eq!(status, 200);
    wait_growth(&bob, &video.id, 10).await;
    refused(
        &call(
            &server,
            "POST",
            &format!("{base}/participants/bob/tracks/{}/mute", video.id),
            Some(&admin),
            "",
        )
        .await,
        404,
        "not_found",
    );

    // ── Update permissions: bob loses data, alice loses video (unpublished at once).
    let bob_events = bob.event_count();
    let (status, res) = call(
        &server,
        "PATCH",
        &format!("{base}/participants/bob"),
        Some(&admin),
        r#"{"permissions":{"publish_data":false}}"#,
    )
    .await;
    assert_eq!(status, 200, "{res}");
    assert_eq!(res["participant"]["permissions"]["publish_data"], false);
    bob.wait_for_server(
        |m| matches!(m, ServerMessage::PermissionsChanged { permissions } if !permissions.publish_data),
        T,
    )
    .await
    .expect("bob is told his permissions changed");
    bob.send_chat("can you hear me?", None).await.unwrap();
    let (code, _, request) = bob.wait_for_error_after(bob_events, T).await.unwrap();
    assert_eq!(
        (code, request.as_deref()),
        (ErrorCode::PermissionDenied, Some("chat"))
    );
    let (status, _) = call(
        &server,
        "PATCH",
        &format!("{base}/participants/alice"),
        Some(&admin),
        r#"{"permissions":{"publish_video":false}}"#,
    )
    .await;
    assert_eq!(status, 200);
    for p in [&alice, &bob] {
        p.wait_for_server(
            |m| matches!(m, ServerMessage::TrackUnpublished { track_id, .. } if *track_id == video.id),
            T,
        )
        .await
        .unwrap_or_else(|e| panic!("{} sees the video unpublished: {e:#}", p.name()));
    }
    wait_growth(&bob, &audio.id, 10).await;
    for (body, code) in [
        (r#"{"permissions":{"hidden":true}}"#, "invalid_field"),
        (r#"{"permissions":{}}"#, "invalid_field"),
        ("", "invalid_field"),
        ("{nope", "malformed_message"),
    ] {
        refused(
            &call(
                &server,
                "PATCH",
                &format!("{base}/participants/bob"),
                Some(&admin),
                body,
            )
            .await,
            400,
            code,
        );
    }

    // ── Send data from the server: to everyone, then to bob only (alice's next message shows
    // she did not get bob's: the chat lane is ordered).
    let (status, res) = call(
        &server,
        "POST",
        &format!("{base}/data"),
        Some(&admin),
        r#"{"data":"hello from the server"}"#,
    )
    .await;
    assert_eq!(status, 200, "{res}");
    assert_eq!(res["delivered"], 3, "alice, bob and the hidden recorder");
    for p in [&alice, &bob, &rec] {
        let m = p
            .wait_for_message(|m| m.text() == Some("hello from the server"), T)
            .await
            .unwrap_or_else(|e| panic!("{} gets the server's message: {e:#}", p.name()));
        assert_eq!(m.from.as_deref(), Some("server"));
        assert_eq!(m.channel, Channel::Chat);
    }
    let (_, res) = call(
        &server,
        "POST",
        &format!("{base}/data"),
        Some(&admin),
        r#"{"data":"for bob","identities":["bob"],"lane":"chat"}"#,
    )
    .await;
    assert_eq!(res["delivered"], 1, "{res}");
    call(
        &server,
        "POST",
        &format!("{base}/data"),
        Some(&admin),
        r#"{"data":"for all"}"#,
    )
    .await;
    bob.wait_for_message(|m| m.text() == Some("for bob"), T)
        .await
        .expect("bob gets his message");
    alice
        .wait_for_message(|m| m.text() == Some("for all"), T)
        .await
        .expect("alice gets the next broadcast");
    assert!(
        !alice.messages().iter().any(|m| m.text() == Some("for bob")),
        "a message for bob reached alice"
    );
    let (_, res) = call(
        &server,
        "POST",
        &format!("{base}/data"),
        Some(&admin),
        r#"{"data_base64":"AAEC/w==","lane":"input","identities":["bob"]}"#,
    )
    .await;
    assert_eq!(res["delivered"], 1, "{res}");
    let m = bob
        .wait_for_message(|m| m.payload[..] == [0, 1, 2, 255], T)
        .await
        .expect("bob gets the binary message");
    assert!(!m.is_text);
    assert_eq!(m.channel, Channel::Input);
    let big = json!({ "data": "x".repeat(70_000) }).to_string();
    refused(
        &call(&server, "POST", &format!("{base}/data"), Some(&admin), &big).await,
        413,
        "message_too_large",
    );
    refused(
        &call(
            &server,
            "POST",
            &format!("{base}/data"),
            Some(&admin),
            r#"{"data":"a","data_base64":"AA=="}"#,
        )
        .await,
        400,
        "invalid_field",
    );

    // ── Remove bob (he is told why; the others see him leave).
    let alice_from = alice.event_count();
    let sent = Instant::now();
    let (status, res) = call(
        &server,
        "DELETE",
        &format!("{base}/participants/bob"),
        Some(&admin),
        r#"{"reason":"spam"}"#,
    )
    .await;
    assert_eq!(status, 200, "{res}");
    let bob_id = bob.participant_id().to_owned();
    alice
        .wait_for_event_after(
            alice_from,
            |e| matches!(e, PeerEvent::Server(ServerMessage::ParticipantLeft { participant_id, reason: LeaveReason::Removed }) if *participant_id == bob_id),
            T,
        )
        .await
        .expect("alice sees bob leave");
    let round_trip = sent.elapsed();
    eprintln!("admin remove-participant → participant_left at another participant: {round_trip:?}");
    let removal = bob.wait_removed(T).await.expect("bob is removed");
    assert_eq!(said(&removal), "removed by a room admin: spam");
    refused(
        &call(
            &server,
            "DELETE",
            &format!("{base}/participants/bob"),
            Some(&admin),
            "",
        )
        .await,
        404,
        "not_found",
    );

    // ── Close the room: everyone is told, the room is gone.
    let (status, res) = call(&server, "DELETE", &base, Some(&admin), "").await;
    assert_eq!(status, 200, "{res}");
    assert_eq!(res["removed"], 2, "alice and the recorder");
    for p in [&alice, &rec] {
        let r = p.wait_removed(T).await.expect("removed with the room");
        assert_eq!(said(&r), "room closed by an admin");
    }
    let (_, rooms) = call(&server, "GET", "/api/rooms", Some(&list_token()), "").await;
    assert!(
        !rooms["rooms"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == room),
        "{rooms}"
    );
    refused(
        &call(
            &server,
            "GET",
            &format!("{base}/participants"),
            Some(&admin),
            "",
        )
        .await,
        404,
        "not_found",
    );
}

/// A room admin on the WebSocket: removes a participant, mutes its chat and another's track;
/// a participant without the grant can do none of it and learns nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_admins_moderate_over_the_websocket() {
    let server = TestServer::start().await;
    let room = "mod";
    let alice = peer(&server, room, "alice", true).await;
    let bob = peer(&server, room, "bob", false).await;
    let mallory = peer(&server, room, "mallory", false).await;
    let admin = peer_with(&server, room, "moderator", false, |g| g.room_admin = true).await;
    let elsewhere = peer(&server, "other", "eve", false).await;
    let video = announced_track(&bob, &alice, TrackKind::Video).await;

    // Without the grant: permission_denied, whatever the id (a real one or not).
    for msg in [
        ClientMessage::RemoveParticipant {
            participant_id: bob.participant_id().into(),
            reason: None,
        },
        ClientMessage::RemoveParticipant {
            participant_id: "PA_nobody".into(),
            reason: None,
        },
        ClientMessage::MuteChat {
            participant_id: bob.participant_id().into(),
            muted: true,
        },
    ] {
        let from = mallory.event_count();
        mallory.send(msg).await.unwrap();
        let (code, message, _) = mallory.wait_for_error_after(from, T).await.unwrap();
        assert_eq!(code, ErrorCode::PermissionDenied, "{message}");
    }
    // Another participant's track: the same answer as a made-up id.
    let from = mallory.event_count();
    mallory
        .send(ClientMessage::Mute {
            track_id: video.id.clone(),
            muted: true,
        })
        .await
        .unwrap();
    let (code, _, _) = mallory.wait_for_error_after(from, T).await.unwrap();
    assert_eq!(code, ErrorCode::NotFound);
    assert!(bob.removed().is_none());

    // An admin cannot reach another room's participant: not_found, like an id nobody has.
    for pid in [elsewhere.participant_id(), "PA_nobody"] {
        let from = admin.event_count();
        admin
            .send(ClientMessage::RemoveParticipant {
                participant_id: pid.into(),
                reason: None,
            })
            .await
            .unwrap();
        let (code, _, _) = admin.wait_for_error_after(from, T).await.unwrap();
        assert_eq!(code, ErrorCode::NotFound);
    }
    assert!(elsewhere.removed().is_none());

    // Mute bob's chat: his chat is refused, his input still goes through.
    admin
        .send(ClientMessage::MuteChat {
            participant_id: bob.participant_id().into(),
            muted: true,
        })
        .await
        .unwrap();
    bob.wait_for_server(
        |m| matches!(m, ServerMessage::PermissionsChanged { permissions } if permissions.chat_muted),
        T,
    )
    .await
    .expect("bob is told his chat is muted");
    let from = bob.event_count();
    bob.send_chat("spam", None).await.unwrap();
    let (code, message, request) = bob.wait_for_error_after(from, T).await.unwrap();
    assert_eq!(code, ErrorCode::PermissionDenied, "{message}");
    assert_eq!(request.as_deref(), Some("chat"));
    bob.send_input(b"move", None).await.unwrap();
    alice
        .wait_for_message(|m| &m.payload[..] == b"move", T)
        .await
        .expect("input still relayed");
    assert!(!alice.messages().iter().any(|m| &m.payload[..] == b"spam"));
    admin
        .send(ClientMessage::MuteChat {
            participant_id: bob.participant_id().into(),
            muted: false,
        })
        .await
        .unwrap();
    bob.wait_for_server(
        |m| matches!(m, ServerMessage::PermissionsChanged { permissions } if !permissions.chat_muted),
        T,
    )
    .await
    .unwrap();
    bob.send_chat("sorry", None).await.unwrap();
    let m = alice
        .wait_for_message(|m| m.text() == Some("sorry"), T)
        .await
        .expect("chat relayed again");
    assert_eq!(m.from.as_deref(), Some(bob.participant_id()));

    // The admin mutes alice's video with `mute`.
    admin
        .send(ClientMessage::Mute {
            track_id: video.id.clone(),
            muted: true,
        })
        .await
        .unwrap();
    bob.wait_for_server(
        |m| matches!(m, ServerMessage::TrackMuted { track_id, muted: true, by_admin: true, .. } if *track_id == video.id),
        T,
    )
    .await
    .expect("bob sees the admin's mute");

    // And removes mallory.
    admin
        .send(ClientMessage::RemoveParticipant {
            participant_id: mallory.participant_id().into(),
            reason: Some("trolling".into()),
        })
        .await
        .unwrap();
    let r = mallory.wait_removed(T).await.expect("mallory removed");
    assert_eq!(said(&r), "removed by a room admin: trolling");
    let mallory_id = mallory.participant_id().to_owned();
    bob.wait_for_server(
        |m| matches!(m, ServerMessage::ParticipantLeft { participant_id, .. } if *participant_id == mallory_id),
        T,
    )
    .await
    .expect("the others see mallory leave");
}

/// A room spread over two shards: the admin API lists and reaches participants on both, and
/// a room admin on one shard removes a participant on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moderation_reaches_every_shard_of_a_room() {
    let server = TestServer::start_with(plaza::config::Config {
        workers: 2,
        room_spread_above: 1,
        ..test_config()
    })
    .await;
    let room = "spread";
    let admin = peer_with(&server, room, "moderator", false, |g| g.room_admin = true).await;
    let a = peer(&server, room, "a", false).await;
    let b = peer(&server, room, "b", false).await;
    let (_, list) = call(
        &server,
        "GET",
        &format!("/api/rooms/{room}/participants"),
        Some(&admin_token(room)),
        "",
    )
    .await;
    assert_eq!(identities(&list), ["a", "b", "moderator"]);
    let (_, rooms) = call(&server, "GET", "/api/rooms", Some(&list_token()), "").await;
    let r = &rooms["rooms"][0];
    assert_eq!(
        (r["participants"].as_u64(), r["shards"].as_u64()),
        (Some(3), Some(2)),
        "{rooms}"
    );

    // Whichever of a and b is on the other shard, the admin removes both.
    for p in [&a, &b] {
        p.wait_for_participant(|i| i.id == admin.participant_id(), T)
            .await
            .expect("the admin is known");
        admin
            .wait_for_participant(|i| i.id == p.participant_id(), T)
            .await
            .expect("the participant is known to the admin");
        admin
            .send(ClientMessage::RemoveParticipant {
                participant_id: p.participant_id().into(),
                reason: None,
            })
            .await
            .unwrap();
        let r = p.wait_removed(T).await.expect("removed");
        assert_eq!(said(&r), "removed by a room admin");
    }
    let (_, list) = call(
        &server,
        "GET",
        &format!("/api/rooms/{room}/participants"),
        Some(&admin_token(room)),
        "",
    )
    .await;
    assert_eq!(identities(&list), ["moderator"]);
}
