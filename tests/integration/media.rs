//! Media forwarding end to end: real server, real webrtc-rs peers over loopback.

// A test, not the packet path: shares state between tasks and times deadlines with the clock;
// its hand-built webrtc-rs peers are awaited in place.
#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    clippy::large_futures
)]

use plaza_testkit::{self as common, support};

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{Peer, PeerEvent, RemoteTrackStats, manual};
use plaza::signal::{ClientMessage, PcTarget, ServerMessage, TrackInfo, TrackKind};
use support::{
    T, TestServer, announced_track, assert_media_flows, packets, publisher, subscriber, wait_growth,
};

const KINDS: [TrackKind; 2] = [TrackKind::Audio, TrackKind::Video];

/// Asserts that `rx` receives `tx`'s audio and video: the ids are the ones the server
/// announced, the stream id is the publisher's participant id, at least 50 packets each,
/// and video starts with a keyframe. Returns the announced tracks (audio, video).
async fn assert_receives(rx: &Peer, tx: &Peer) -> Vec<TrackInfo> {
    let mut infos = Vec::new();
    for kind in KINDS {
        let info = announced_track(rx, tx, kind).await;
        let (mime, label) = match kind {
            TrackKind::Audio => ("audio/opus", "audio"),
            TrackKind::Video => ("video/vp8", "video"),
        };
        assert!(
            info.mime_type.eq_ignore_ascii_case(mime),
            "{}'s {kind:?} announced as {}",
            tx.name(),
            info.mime_type
        );
        assert!(info.id.starts_with("TR_"), "{info:?}");
        assert_eq!(info.client_track_id, format!("{}-{label}", tx.name()));
        assert!(!info.muted, "{info:?}");

        let stats = rx
            .wait_for_packets(&info.id, 50, T)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{} receives 50 packets of {}'s {kind:?} track {}: {e:#}\nremote tracks: {:#?}",
                    rx.name(),
                    tx.name(),
                    info.id,
                    rx.remote_tracks()
                )
            });
        assert_eq!(stats.track_id, info.id);
        assert_eq!(
            stats.stream_id,
            tx.participant_id(),
            "the stream id of a forwarded track is the publisher's participant id"
        );
        assert_eq!(stats.kind, kind);
        if kind == TrackKind::Video {
            assert!(stats.keyframes >= 1, "no keyframe received: {stats:?}");
            assert_starts_with_keyframe(rx, &stats);
        }
        infos.push(info);
    }
    // Exactly the announced tracks of this publisher, nothing else, arrive from it.
    let received: BTreeSet<String> = rx
        .remote_tracks()
        .into_iter()
        .filter(|t| t.stream_id == tx.participant_id() && !t.ended)
        .map(|t| t.track_id)
        .collect();
    let announced: BTreeSet<String> = infos.iter().map(|t| t.id.clone()).collect();
    assert_eq!(
        received,
        announced,
        "{}'s tracks at {}",
        tx.name(),
        rx.name()
    );
    infos
}

/// The server holds a video down-track until a keyframe: the first packet is a keyframe's.
fn assert_starts_with_keyframe(rx: &Peer, stats: &RemoteTrackStats) {
    assert_eq!(
        stats.recent.len() as u64,
        stats.packets,
        "keep_recent_packets too small for this check"
    );
    let first = stats.recent.front().expect("packets were received");
    assert!(
        first.keyframe_start,
        "{}: the first video packet on {} is not the start of a keyframe; the first \
         packets:\n{}signaling around then (ms relative to the first packet):\n{}",
        rx.name(),
        stats.track_id,
        describe(stats.recent.iter().take(12)),
        signaling_timeline(rx, first.arrival)
    );
}

/// Negotiation-related events with their time relative to `t0`, for failure messages.
fn signaling_timeline(peer: &Peer, t0: std::time::Instant) -> String {
    let mut out = String::new();
    for e in peer.events() {
        let what = match &e.event {
            PeerEvent::Server(ServerMessage::SubscribeOffer { sdp }) => format!(
                "subscribe_offer ({} m-lines)",
                sdp.lines().filter(|l| l.starts_with("m=")).count()
            ),
            PeerEvent::Server(ServerMessage::TrackPublished { track }) => {
                format!("track_published {} {:?}", track.id, track.kind)
            }
            PeerEvent::SubscribeAnswered { .. }
            | PeerEvent::TrackStarted { .. }
            | PeerEvent::NegotiationFailed { .. } => format!("{:?}", e.event),
            _ => continue,
        };
        let ms = if e.at >= t0 {
            e.at.duration_since(t0).as_secs_f64() * 1000.0
        } else {
            -(t0.duration_since(e.at).as_secs_f64() * 1000.0)
        };
        out.push_str(&format!("  {ms:>+9.1} {what}\n"));
    }
    out
}

fn describe<'a>(packets: impl Iterator<Item = &'a common::PacketInfo>) -> String {
    let mut out = String::new();
    let mut t0 = None;
    for p in packets {
        let t0 = *t0.get_or_insert(p.arrival);
        out.push_str(&format!(
            "  +{:>6.1} ms seq {} ts {} marker {} key_start {} len {} picture_id {:?}\n",
            p.arrival.duration_since(t0).as_secs_f64() * 1000.0,
            p.sequence_number,
            p.timestamp,
            p.marker,
            p.keyframe_start,
            p.payload_len,
            p.picture_id
        ));
    }
    out
}

fn has_server(peer: &Peer, mut pred: impl FnMut(&ServerMessage) -> bool) -> bool {
    peer.events()
        .iter()
        .any(|e| matches!(&e.event, PeerEvent::Server(m) if pred(m)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_exchange_media_late_joiner_and_leave() {
    let server = TestServer::start().await;
    let alice = publisher(&server, "plaza", "alice").await;
    let bob = publisher(&server, "plaza", "bob").await;

    let alice_tracks = assert_receives(&bob, &alice).await;
    let bob_tracks = assert_receives(&alice, &bob).await;

    // A late joiner sees both publishers in `joined` and receives all four tracks.
    let carol = subscriber(&server, "plaza", "carol").await;
    let others = &carol.joined().participants;
    assert_eq!(others.len(), 2, "{others:?}");
    for (p, tracks) in [(&alice, &alice_tracks), (&bob, &bob_tracks)] {
        let info = others
            .iter()
            .find(|o| o.id == p.participant_id())
            .unwrap_or_else(|| panic!("{} missing from carol's joined: {others:?}", p.name()));
        assert_eq!(info.name, p.name());
        let ids: BTreeSet<&str> = info.tracks.iter().map(|t| t.id.as_str()).collect();
        let want: BTreeSet<&str> = tracks.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, want, "{}'s tracks in carol's joined", p.name());
    }
    assert_receives(&carol, &alice).await;
    assert_receives(&carol, &bob).await;
    let (_, health) = server.healthz().await.unwrap();
    assert_eq!(health["participants"], 3, "{health}");
    assert_eq!(health["published_tracks"], 4, "{health}");

    // Alice leaves: the others hear it, their subscriber connections renegotiate, and bob's
    // media keeps flowing to carol.
    let answers_before: Vec<u64> = [&bob, &carol]
        .iter()
        .map(|p| p.negotiation().subscribe_answers)
        .collect();
    alice.leave().await.unwrap();
    for (p, before) in [&bob, &carol].into_iter().zip(answers_before) {
        let alice_id = alice.participant_id().to_owned();
        p.wait_for_server(
            |m| matches!(m, ServerMessage::ParticipantLeft { participant_id, .. } if *participant_id == alice_id),
            T,
        )
        .await
        .unwrap_or_else(|e| panic!("{} hears that alice left: {e:#}", p.name()));
        for t in &alice_tracks {
            assert!(
                has_server(p, |m| matches!(m,
                    ServerMessage::TrackUnpublished { track_id, participant_id }
                        if *track_id == t.id && *participant_id == alice_id)),
                "{} got no track_unpublished for {} before participant_left",
                p.name(),
                t.id
            );
        }
        p.wait_for_subscribe_answers(before + 1, T)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "{}: the subscriber renegotiation after alice left completes: {e:#}; {:?}",
                    p.name(),
                    p.negotiation()
                )
            });
        assert!(
            !p.events().iter().any(|e| matches!(
                &e.event,
                PeerEvent::NegotiationFailed { .. }
                    | PeerEvent::Server(ServerMessage::Error { .. })
            )),
            "{}: negotiation failure or error: {:#?}",
            p.name(),
            p.events()
        );
        assert!(
            p.room_tracks().iter().all(|t| t.participant_id != alice_id),
            "{}",
            p.name()
        );
        assert!(p.participants().iter().all(|x| x.id != alice_id));
    }
    let flows: Vec<(&Peer, &str)> = bob_tracks.iter().map(|t| (&carol, t.id.as_str())).collect();
    assert_media_flows("after alice left", &flows, 50).await;
    let health = server
        .wait_healthz(
            "alice gone",
            |h| h["participants"] == 2 && h["published_tracks"] == 2,
            T,
        )
        .await
        .unwrap();
    assert_eq!(health["rooms"], 1, "{health}");

    bob.leave().await.unwrap();
    carol.leave().await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mute_stops_forwarding_and_unmute_resumes_with_keyframe() {
    let server = TestServer::start().await;
    let alice = publisher(&server, "mute", "alice").await;
    let bob = subscriber(&server, "mute", "bob").await;
    let tracks = assert_receives(&bob, &alice).await;
    let (audio, video) = (&tracks[0], &tracks[1]);
    let alice_id = alice.participant_id().to_owned();

    // Mute on the server only: alice keeps sending (as a browser with a disabled track
    // still does), so what stops is the server's forwarding.
    alice
        .send(ClientMessage::Mute {
            track_id: video.id.clone(),
            muted: true,
        })
        .await
        .unwrap();
    let muted = bob
        .wait_for_server(
            |m| matches!(m, ServerMessage::TrackMuted { track_id, muted: true, .. } if *track_id == video.id),
            T,
        )
        .await
        .expect("bob gets track_muted");
    assert_eq!(
        muted,
        ServerMessage::TrackMuted {
            track_id: video.id.clone(),
            participant_id: alice_id.clone(),
            muted: true,
            by_admin: false,
        }
    );
    assert!(
        bob.room_tracks()
            .iter()
            .any(|t| t.id == video.id && t.muted)
    );

    // The observation window for the negative assertion is defined by events, not a fixed
    // time, so a starved machine cannot make it vacuous: it lasts until alice has sent 30
    // more video packets (about 1 s) AND bob has received 25 more audio packets (so bob's
    // receive path was demonstrably running meanwhile, including for anything in flight).
    let video_before = packets(&bob, &video.id);
    let sent_before = alice
        .wait_for_sent_packets(TrackKind::Video, 1, T)
        .await
        .unwrap()
        .packets;
    alice
        .wait_for_sent_packets(TrackKind::Video, sent_before + 30, T)
        .await
        .expect("alice keeps sending video while muted");
    wait_growth(&bob, &audio.id, 25).await;
    let video_grew = packets(&bob, &video.id) - video_before;
    assert!(
        video_grew < 5,
        "muted video still forwarded: {video_grew} packets while alice sent 30"
    );

    // Unmute: forwarding resumes, starting with a keyframe.
    let before = packets(&bob, &video.id);
    alice
        .send(ClientMessage::Mute {
            track_id: video.id.clone(),
            muted: false,
        })
        .await
        .unwrap();
    bob.wait_for_server(
        |m| matches!(m, ServerMessage::TrackMuted { track_id, muted: false, participant_id, .. } if *track_id == video.id && *participant_id == alice_id),
        T,
    )
    .await
    .expect("bob gets track_muted (false)");
    let stats = wait_growth(&bob, &video.id, 30).await;
    let after_unmute = (stats.packets - before) as usize;
    assert!(after_unmute <= stats.recent.len());
    let first = &stats.recent[stats.recent.len() - after_unmute];
    assert!(
        first.keyframe_start,
        "the first video packet after unmute is not a keyframe start; the packets from \
         the last one before it:\n{}",
        describe(
            stats
                .recent
                .iter()
                .skip(stats.recent.len() - after_unmute - 1)
                .take(12)
        )
    );

    alice.leave().await.unwrap();
    bob.leave().await.unwrap();
    server.shutdown().await;
}

/// `TrackInfo::client_track_id` exists "so a client can map its local tracks to server ids":
/// the publisher must learn the server ids of its own tracks (the peer library's `set_muted`
/// relies on it). Then muting through the peer library works end to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_learns_its_track_ids_and_set_muted_works() {
    let server = TestServer::start().await;
    let alice = publisher(&server, "ids", "alice").await;
    let bob = subscriber(&server, "ids", "bob").await;
    let tracks = assert_receives(&bob, &alice).await;
    for (kind, info) in KINDS.into_iter().zip(&tracks) {
        alice
            .wait_for_local_track(kind, |t| t.server_track_id.is_some(), T)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "alice never learns the server id of her {kind:?} track {} \
                     (no track_published for her own tracks?): {e:#}",
                    info.id
                )
            });
        let local = alice
            .local_tracks()
            .into_iter()
            .find(|t| t.kind == kind)
            .unwrap();
        assert_eq!(local.server_track_id.as_deref(), Some(info.id.as_str()));
    }

    let video = &tracks[1];
    alice.set_muted(TrackKind::Video, true).await.unwrap();
    bob.wait_for_server(
        |m| matches!(m, ServerMessage::TrackMuted { track_id, muted: true, .. } if *track_id == video.id),
        T,
    )
    .await
    .expect("bob gets track_muted");
    alice.set_muted(TrackKind::Video, false).await.unwrap();
    bob.wait_for_server(
        |m| matches!(m, ServerMessage::TrackMuted { track_id, muted: false, .. } if *track_id == video.id),
        T,
    )
    .await
    .expect("bob gets track_muted (false)");
    wait_growth(&bob, &video.id, 30).await;
    assert_eq!(
        alice.connection_state(PcTarget::Publisher),
        Some(webrtc::peer_connection::RTCPeerConnectionState::Connected)
    );

    alice.leave().await.unwrap();
    bob.leave().await.unwrap();
    server.shutdown().await;
}

// ───────────────────── a subscriber that answers when told to ─────────────────────

/// A subscription made while a subscriber offer is out is negotiated by the follow-up offer.
/// Until the subscriber has answered that offer it cannot receive the new track, so the
/// server must not spend the track's keyframe (or start forwarding) before then: the first
/// video packet a slow subscriber gets must still be a keyframe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyframe_is_not_spent_before_a_slow_subscriber_answers() {
    let server = TestServer::start().await;
    let bob = publisher(&server, "slow", "bob").await;
    let mut sub = manual::Client::join(
        &server.ws_url(),
        "slow",
        "slowpoke",
        manual::default_media_engine(),
        PcTarget::Subscriber,
    )
    .await;
    sub.start_subscriber().await;

    // bob's own view of his tracks (the publisher is told the server ids).
    let audio = announced_track(&bob, &bob, TrackKind::Audio).await.id;
    let video = announced_track(&bob, &bob, TrackKind::Video).await.id;
    // Back to back: the video subscription arrives while the offer for audio is out.
    for id in [&audio, &video] {
        sub.send_subscribe(id, true).await;
    }
    // Both subscriptions may land in one offer (handled in the same turn) or the video in a
    // follow-up one (it arrived while the first offer was out): answer until an offer carries
    // the video track.
    let offer = loop {
        let offer = sub.next_offer().await;
        if offer.contains(&video) {
            break offer;
        }
        sub.answer(offer).await;
    };
    // A slow client: the answer takes a while (bob's keyframes keep coming meanwhile).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    sub.answer(offer).await;

    let got = sub.wait_packets(&video, 30).await;
    let first_key = got.iter().position(|p| p.vp8_keyframe_start());
    assert_eq!(
        first_key,
        Some(0),
        "the first video packet after the slow answer is not a keyframe start (first \
         keyframe at packet {first_key:?}, {:?} later)",
        first_key.map(|i| got[i].at - got[0].at)
    );
    sub.close().await;
    bob.leave().await.unwrap();
    server.shutdown().await;
}

/// A subscriber receives RTCP sender reports for every forwarded stream (Plaza writes them
/// itself: forwarded media bypasses `rtc`'s pipeline), with counts that match what it received,
/// an RTP timestamp on the stream's own clock and the current wall-clock time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_get_sender_reports_for_forwarded_streams() {
    let server = TestServer::start().await;
    let alice = publisher(&server, "reports", "alice").await;
    let bob = subscriber(&server, "reports", "bob").await;
    for info in assert_receives(&bob, &alice).await {
        let before = bob.remote_track(&info.id).expect("a remote track");
        let ssrc = *before.ssrcs.first().expect("an SSRC");
        // Reports come once a second: wait for one that covers what has arrived so far.
        let sr = bob
            .wait_for_sender_report(
                ssrc,
                |s| u64::from(s.packet_count) >= before.packets,
                Duration::from_secs(5),
            )
            .await
            .unwrap_or_else(|e| panic!("{:?}: {e:#}", info.kind));
        let after = bob.remote_track(&info.id).expect("a remote track");
        // Nothing is lost on loopback: the server sent what bob received, give or take what
        // was in flight.
        assert!(
            u64::from(sr.packet_count) <= after.packets + 20,
            "{:?}: report says {} packets, bob received {}",
            info.kind,
            sr.packet_count,
            after.packets
        );
        assert!(
            u64::from(sr.octet_count) >= u64::from(sr.packet_count),
            "{sr:?}"
        );
        let clock: i64 = match info.kind {
            TrackKind::Audio => 48_000,
            TrackKind::Video => 90_000,
        };
        let last = after.recent.back().expect("recent packets").timestamp;
        let skew = i64::from(sr.rtp_time.wrapping_sub(last) as i32).abs();
        assert!(
            skew < clock,
            "{:?}: report's RTP time {} vs last packet {last}: {skew} ticks apart",
            info.kind,
            sr.rtp_time
        );
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let ntp_secs = (sr.ntp_time >> 32) - 2_208_988_800;
        assert!(
            unix.abs_diff(ntp_secs) <= 5,
            "NTP time {ntp_secs} vs {unix}"
        );
    }
    // The subscriber's RTCP (receiver reports, TWCC feedback) went through the fast path and
    // authenticated; on loopback no retransmission is refused for lack of budget.
    let (_, health) = server.healthz().await.unwrap();
    assert!(health["subscriber_rtcp_in"].as_u64() > Some(0), "{health}");
    assert_eq!(health["subscriber_rtcp_rejected"], 0, "{health}");
    assert_eq!(health["subscriber_rtcp_malformed"], 0, "{health}");
    assert_eq!(health["nack_over_budget"], 0, "{health}");
    bob.leave().await.unwrap();
    alice.leave().await.unwrap();
    server.shutdown().await;
}

/// A publisher's feedback comes from Plaza's publisher fast path (its connection runs no `rtc`
/// interceptors): a video packet the publisher leaves out is asked for (NACK) and counted lost
/// in receiver reports, all of which the publisher's own stack decrypts and reads; the rest of
/// its media skips `rtc` and still reaches the subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_get_nacks_and_receiver_reports_from_the_fast_path() {
    let server = TestServer::start().await;
    let opts = common::PeerOptions {
        skip_video_packet: Some(40),
        ..support::opts(true)
    };
    let alice = Peer::connect(&server.ws_url(), "feedback", "alice", opts)
        .await
        .expect("alice connects and publishes");
    let bob = subscriber(&server, "feedback", "bob").await;
    assert_receives(&bob, &alice).await;
    // What the publisher's RTCP tap read of the server's feedback (receiver reports come once
    // a second: wait for one that counts the loss).
    let fb = alice.feedback();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while fb.reported_lost.load(Ordering::Relaxed) == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, health) = server.healthz().await.unwrap();
    assert!(
        alice.nacked_packets() >= 1,
        "the publisher received no NACK for the packet it left out: {health}"
    );
    assert!(
        fb.report_blocks.load(Ordering::Relaxed) >= 1,
        "the publisher received no receiver report: {health}"
    );
    assert_eq!(
        fb.reported_lost.load(Ordering::Relaxed),
        1,
        "the receiver reports count exactly the packet left out as lost: {health}"
    );
    for counter in [
        "publisher_rtp_fast",
        "publisher_rtcp_in",
        "nack_sent_to_publishers",
        "receiver_reports_sent",
    ] {
        assert!(health[counter].as_u64() > Some(0), "{counter}: {health}");
    }
    assert_eq!(health["publisher_rtp_rejected"], 0, "{health}");
    assert_eq!(health["publisher_rtcp_rejected"], 0, "{health}");
    // Media is on the fast path: only the first packets of each SSRC went through `rtc`.
    let fast = health["publisher_rtp_fast"].as_u64().unwrap_or(0);
    let slow = health["publisher_rtp_to_rtc"].as_u64().unwrap_or(0);
    assert!(fast > 10 * slow, "fast {fast}, through rtc {slow}");
    bob.leave().await.unwrap();
    alice.leave().await.unwrap();
    server.shutdown().await;
}
