//! Session resume against the real server: a participant whose WebSocket drops comes back
//! on a new connection as the same participant (same id, tracks, subscriptions and peer
//! connections), gets what it missed, and the others notice nothing; one that does not come
//! back is removed after the grace period; a resume needs the right token.

// A test, not the packet path: it times the resume with the clock.
#![allow(clippy::disallowed_methods)]

use plaza_testkit::{self as common, support};

use common::PeerEvent;
use plaza::signal::{ClientMessage, ErrorCode, ServerMessage, TrackKind};
use std::time::{Duration, Instant};
use support::{
    RawWs, Received, T, TestServer, announced_track, publisher, subscriber, test_config,
    wait_growth,
};

fn left(pid: &str) -> impl Fn(&PeerEvent) -> bool + '_ {
    move |e| matches!(e, PeerEvent::Server(ServerMessage::ParticipantLeft { participant_id, .. }) if participant_id == pid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_resumes_as_the_same_participant() {
    let server = TestServer::start().await;
    let alice = publisher(&server, "resume", "alice").await;
    let bob = subscriber(&server, "resume", "bob").await;
    bob.wait_data_channels(T).await.expect("bob's channels");
    let video = announced_track(&bob, &alice, TrackKind::Video).await;
    wait_growth(&bob, &video.id, 10).await;
    let bob_id = bob.participant_id().to_owned();
    let alice_from = alice.event_count();

    // The signaling connection drops; the peer connections do not care.
    bob.drop_signaling();
    wait_growth(&bob, &video.id, 30).await;
    alice.send_chat("still there?", None).await.unwrap();
    bob.wait_for_message(|m| m.text() == Some("still there?"), T)
        .await
        .expect("data flows without signaling");

    // Meanwhile carol joins and publishes: bob's announcements and the offer that adds her
    // tracks go nowhere until he is back.
    let carol = publisher(&server, "resume", "carol").await;
    let carol_video = announced_track(&alice, &carol, TrackKind::Video).await;

    let started = Instant::now();
    let resumed = bob.resume().await.expect("bob resumes");
    let took = started.elapsed();
    // (What he missed comes as replayed messages, or — not yet read from the core when he
    // came back — as the session's next events; either way, in order.)
    match &resumed {
        ServerMessage::Resumed { participant_id, .. } => {
            assert_eq!(participant_id, &bob_id, "the same participant");
        }
        other => panic!("{other:?}"),
    }
    // What he missed arrives, and the renegotiation it carries completes: carol's video.
    let theirs = announced_track(&bob, &carol, TrackKind::Video).await;
    assert_eq!(theirs.id, carol_video.id);
    wait_growth(&bob, &carol_video.id, 10).await;
    wait_growth(&bob, &video.id, 10).await;
    let first_after = started.elapsed();
    eprintln!(
        "resume: `resumed` after {took:?}; first media of the track added while away after {first_after:?}"
    );
    // The others saw nothing: no leave, no second join of bob.
    let seen: Vec<_> = alice.events().into_iter().skip(alice_from).collect();
    assert!(
        !seen.iter().any(|e| left(&bob_id)(&e.event)),
        "alice saw bob leave"
    );
    assert!(
        !seen.iter().any(|e| matches!(&e.event, PeerEvent::Server(ServerMessage::ParticipantJoined { participant }) if participant.id == bob_id)),
        "alice saw bob join again"
    );
    // Signaling works on the new connection.
    bob.ping().await.expect("ping over the resumed connection");
    let (_, stats) = support::stats(server.http_addr).await.unwrap();
    assert_eq!(stats["http"]["sessions_resumed"], 1, "{}", stats["http"]);

    // A second drop and resume works the same.
    bob.drop_signaling();
    carol.leave().await.unwrap();
    bob.resume().await.expect("bob resumes again");
    bob.wait_for_server(
        |m| matches!(m, ServerMessage::ParticipantLeft { participant_id, .. } if participant_id == carol.participant_id()),
        T,
    )
    .await
    .expect("carol's leave arrives after the second resume");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_participant_that_does_not_resume_is_removed_after_the_grace_period() {
    let grace = Duration::from_millis(1500);
    let server = TestServer::start_with(plaza::config::Config {
        resume_grace: grace,
        ..test_config()
    })
    .await;
    let alice = subscriber(&server, "grace", "alice").await;
    let bob = subscriber(&server, "grace", "bob").await;
    let bob_id = bob.participant_id().to_owned();
    let dropped = Instant::now();
    bob.drop_signaling();
    alice
        .wait_for_event(left(&bob_id), T)
        .await
        .expect("bob is removed after the grace period");
    let after = dropped.elapsed();
    assert!(
        after >= grace,
        "removed after {after:?}, before the grace period"
    );
    let err = bob.resume().await.expect_err("too late to resume");
    assert!(format!("{err:#}").contains("ResumeFailed"), "{err:#}");
    let (_, stats) = support::stats(server.http_addr).await.unwrap();
    assert_eq!(stats["http"]["resume_expired"], 1, "{}", stats["http"]);
}

/// Joins over a raw WebSocket: the participant id and resume token.
/// Joins `name` to `room`: its participant id, resume token and session id.
async fn raw_join(ws: &mut RawWs, room: &str, name: &str) -> (String, String, String) {
    let token = common::token::participant(room, name);
    ws.send_msg(&ClientMessage::Join {
        room: room.into(),
        name: name.into(),
        token: Some(token),
        protocol: None,
        auto_subscribe: None,
        timeline_events: None,
    })
    .await
    .unwrap();
    match ws
        .recv_until("joined", |m| matches!(m, ServerMessage::Joined { .. }))
        .await
        .unwrap()
    {
        ServerMessage::Joined {
            participant_id,
            resume_token,
            session_id,
            ..
        } => (
            participant_id,
            resume_token.expect("a resume token"),
            session_id.expect("a session id"),
        ),
        _ => unreachable!(),
    }
}

async fn resume_error(ws: &mut RawWs, pid: &str, token: &str, received: u64) -> String {
    ws.send_msg(&ClientMessage::Resume {
        participant_id: pid.into(),
        resume_token: token.into(),
        received,
    })
    .await
    .unwrap();
    let (code, message, request) = ws.expect_error().await.unwrap();
    assert_eq!(code, ErrorCode::ResumeFailed, "{message}");
    assert_eq!(request.as_deref(), Some("resume"));
    message
}

/// A resume needs the participant's token; it takes a session over from a connection that
/// still looks alive; a connection that closes cleanly leaves at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_needs_the_token_and_takes_over_a_live_connection() {
    let server = TestServer::start().await;
    let mut a = RawWs::connect(&server.ws_url()).await.unwrap();
    let (pid, token, _) = raw_join(&mut a, "raw", "ann").await;
    let mut watcher = RawWs::connect(&server.ws_url()).await.unwrap();
    let (watcher_id, _, _) = raw_join(&mut watcher, "raw", "wes").await;

    let mut b = RawWs::connect(&server.ws_url()).await.unwrap();
    let m = resume_error(&mut b, "PA_nobody", &token, 1).await;
    assert!(m.contains("PA_nobody"), "{m}");
    resume_error(&mut b, &pid, "not-the-token", 1).await;
    // More than was ever sent.
    resume_error(&mut b, &pid, &token, 1_000_000).await;
    // (That gave up the session: ann is gone.)
    watcher
        .recv_until("ann leaves", |m| matches!(m, ServerMessage::ParticipantLeft { participant_id, .. } if *participant_id == pid))
        .await
        .unwrap();

    // Take over a live connection.
    let mut c = RawWs::connect(&server.ws_url()).await.unwrap();
    let (cid, ctoken, csession) = raw_join(&mut c, "raw", "cid").await;
    // Message 2 of cid's session: fay joins (cid reads it on the old connection).
    let mut f = RawWs::connect(&server.ws_url()).await.unwrap();
    let (fid, _, _) = raw_join(&mut f, "raw", "fay").await;
    c.recv_until(
        "fay joins",
        |m| matches!(m, ServerMessage::ParticipantJoined { participant } if participant.id == fid),
    )
    .await
    .unwrap();
    let mut d = RawWs::connect(&server.ws_url()).await.unwrap();
    d.send_msg(&ClientMessage::Resume {
        participant_id: cid.clone(),
        resume_token: ctoken,
        received: 1,
    })
    .await
    .unwrap();
    // Resumed as having received only `joined`: everything after it is sent again (the
    // initial subscriber offer, then fay's join), in order.
    let replayed = match d.recv().await.unwrap() {
        Received::Msg(ServerMessage::Resumed {
            participant_id,
            replayed,
            session_id,
            ..
        }) => {
            assert_eq!(participant_id, cid);
            assert!(csession.starts_with("SE_"), "{csession}");
            assert_eq!(
                session_id,
                Some(csession),
                "the resumed session keeps its id"
            );
            replayed
        }
        other => panic!("{other:?}"),
    };
    let mut again = Vec::new();
    for _ in 0..replayed {
        match d.recv().await.unwrap() {
            Received::Msg(m) => again.push(m),
            other => panic!("{other:?}"),
        }
    }
    assert!(
        matches!(again.first(), Some(ServerMessage::SubscribeOffer { .. })),
        "{again:?}"
    );
    assert!(
        matches!(again.last(), Some(ServerMessage::ParticipantJoined { participant }) if participant.id == fid),
        "{again:?}"
    );
    // The old connection is closed by the server; the new one gets what follows.
    loop {
        match c.recv().await {
            Ok(Received::Closed(_)) | Err(_) => break,
            Ok(Received::Msg(_)) => continue,
        }
    }
    let mut e = RawWs::connect(&server.ws_url()).await.unwrap();
    let (eid, _, _) = raw_join(&mut e, "raw", "eve").await;
    d.recv_until(
        "eve joins",
        |m| matches!(m, ServerMessage::ParticipantJoined { participant } if participant.id == eid),
    )
    .await
    .unwrap();
    // `resume` is only a first message.
    d.send_msg(&ClientMessage::Resume {
        participant_id: cid.clone(),
        resume_token: "x".into(),
        received: 0,
    })
    .await
    .unwrap();
    let (code, _, _) = d.expect_error().await.unwrap();
    assert_eq!(code, ErrorCode::InvalidState);

    // A clean close (close frame) leaves at once: no grace period.
    let closed = Instant::now();
    d.close().await;
    watcher
        .recv_until("cid leaves", |m| matches!(m, ServerMessage::ParticipantLeft { participant_id, .. } if *participant_id == cid))
        .await
        .unwrap();
    assert!(
        closed.elapsed() < Duration::from_secs(5),
        "{:?}",
        closed.elapsed()
    );
    let _ = watcher_id;
}
