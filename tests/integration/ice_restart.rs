//! ICE restarts against the real server: either connection of a participant gets new ICE
//! credentials and connects again (webrtc-rs gathers on new sockets, so the server sees the
//! client at new addresses), while its tracks, subscriptions, DTLS session and data channels
//! stay: the others see no leave, no join, no new track, and media and data flow on.

// A test, not the packet path: it times the restart with the clock.
#![allow(clippy::disallowed_methods)]

use plaza_testkit::{self as common, support};

use common::{Peer, PeerEvent};
use plaza::auth::Secret;
use plaza::signal::{ClientMessage, IceServer, PcTarget, ServerMessage, TrackKind};
use plaza::turn::IceConfig;
use std::time::{Duration, Instant};
use support::{T, TestServer, announced_track, publisher, subscriber, wait_growth};
use webrtc::peer_connection::RTCIceConnectionState;

fn ufrag(sdp: &str) -> String {
    plaza::sfu::sdpcheck::ice_ufrag(sdp)
        .expect("an ice-ufrag")
        .to_owned()
}

/// The server's ICE ufrags in `peer`'s offers (subscriber) or answers (publisher), in order.
fn server_ufrags(peer: &Peer, target: PcTarget) -> Vec<String> {
    peer.events()
        .into_iter()
        .filter_map(|e| match (&e.event, target) {
            (PeerEvent::Server(ServerMessage::SubscribeOffer { sdp }), PcTarget::Subscriber)
            | (PeerEvent::Server(ServerMessage::PublishAnswer { sdp }), PcTarget::Publisher) => {
                Some(ufrag(sdp))
            }
            _ => None,
        })
        .collect()
}

/// Waits for `peer`'s `target` connection to report ICE `connected` (or `completed`) at event
/// index `from` or later.
async fn ice_connected_after(peer: &Peer, target: PcTarget, from: usize) {
    peer.wait_for_event_after(
        from,
        |e| {
            matches!(e, PeerEvent::IceState { target: t, state }
                if *t == target
                    && matches!(state, RTCIceConnectionState::Connected | RTCIceConnectionState::Completed))
        },
        T,
    )
    .await
    .unwrap_or_else(|e| panic!("{}: {target:?} ICE connects again: {e:#}", peer.name()));
}

fn membership_changes(peer: &Peer, from: usize) -> Vec<String> {
    peer.events()
        .into_iter()
        .skip(from)
        .filter_map(|e| match e.event {
            PeerEvent::Server(
                m @ (ServerMessage::ParticipantJoined { .. }
                | ServerMessage::ParticipantLeft { .. }
                | ServerMessage::TrackPublished { .. }
                | ServerMessage::TrackUnpublished { .. }),
            ) => Some(format!("{m:?}")),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_connections_restart_ice_and_the_session_goes_on() {
    let server = TestServer::start().await;
    let alice = publisher(&server, "restart", "alice").await;
    let bob = subscriber(&server, "restart", "bob").await;
    bob.wait_data_channels(T).await.expect("bob's channels");
    let video = announced_track(&bob, &alice, TrackKind::Video).await;
    let audio = announced_track(&bob, &alice, TrackKind::Audio).await;
    wait_growth(&bob, &video.id, 10).await;
    let (alice_from, bob_from) = (alice.event_count(), bob.event_count());
    let tracks_before = bob.remote_tracks().len();

    // The subscriber connection: bob asks, the server offers new credentials.
    let before = server_ufrags(&bob, PcTarget::Subscriber);
    let started = Instant::now();
    bob.restart_ice(PcTarget::Subscriber)
        .await
        .expect("bob's subscriber restart is negotiated");
    let negotiated = started.elapsed();
    let after = server_ufrags(&bob, PcTarget::Subscriber);
    assert_eq!(after.len(), before.len() + 1, "one more offer");
    assert_ne!(
        after.last(),
        before.last(),
        "the offer has new ICE credentials"
    );
    ice_connected_after(&bob, PcTarget::Subscriber, bob_from).await;
    wait_growth(&bob, &video.id, 10).await;
    wait_growth(&bob, &audio.id, 5).await;
    let media = started.elapsed();
    // Data channels (SCTP over the DTLS session, sent on the selected pair) work too.
    alice.send_chat("after bob's restart", None).await.unwrap();
    bob.wait_for_message(|m| m.text() == Some("after bob's restart"), T)
        .await
        .expect("chat reaches bob after his restart");
    eprintln!(
        "subscriber ICE restart: offer answered after {negotiated:?}, media again after {media:?}"
    );

    // The publisher connection: alice offers with new credentials, the server answers with
    // its own new ones.
    let before = server_ufrags(&alice, PcTarget::Publisher);
    let plis = || {
        alice
            .local_tracks()
            .iter()
            .find(|t| t.kind == TrackKind::Video)
            .map_or(0, |t| t.counters.keyframe_requests)
    };
    let alice_ice_from = alice.event_count();
    let started = Instant::now();
    alice
        .restart_ice(PcTarget::Publisher)
        .await
        .expect("alice's publisher restart is negotiated");
    let negotiated = started.elapsed();
    let after = server_ufrags(&alice, PcTarget::Publisher);
    assert_eq!(after.len(), before.len() + 1, "one more answer");
    assert_ne!(
        after.last(),
        before.last(),
        "the answer has new ICE credentials"
    );
    ice_connected_after(&alice, PcTarget::Publisher, alice_ice_from).await;
    wait_growth(&bob, &video.id, 30).await;
    wait_growth(&bob, &audio.id, 10).await;
    let media = started.elapsed();
    // Feedback reaches alice where she is now: bob's keyframe request becomes the server's
    // PLI to her (asked again while the server's throttle holds it back).
    let plis_before = plis();
    let deadline = Instant::now() + T;
    while plis() == plis_before {
        assert!(
            Instant::now() < deadline,
            "alice gets a keyframe request after her restart"
        );
        bob.request_keyframe(&video.id).await.expect("bob's PLI");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "publisher ICE restart: answer applied after {negotiated:?}, media again after {media:?}"
    );

    // Nobody saw anything but media: no leave, no join, no track published or unpublished,
    // and bob still has the same tracks.
    assert_eq!(membership_changes(&alice, alice_from), Vec::<String>::new());
    assert_eq!(membership_changes(&bob, bob_from), Vec::<String>::new());
    assert_eq!(bob.remote_tracks().len(), tracks_before);
    let errors: Vec<_> = bob
        .server_errors()
        .into_iter()
        .chain(alice.server_errors())
        .collect();
    assert!(errors.is_empty(), "{errors:?}");

    let (_, stats) = support::stats(server.http_addr).await.unwrap();
    assert_eq!(stats["ice_restarts"], 2, "{stats}");
}

fn turn_expiry(servers: &[IceServer]) -> u64 {
    let user = servers[0].username.as_deref().expect("a TURN username");
    user.split(':')
        .next()
        .unwrap()
        .parse()
        .expect("<expiry>:<participant id>")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ice_restart_brings_fresh_turn_credentials() {
    const SECRET: &str = "a secret shared with the TURN server";
    let mut config = support::test_config();
    config.ice = IceConfig {
        turn_urls: vec!["turn:127.0.0.1:3478?transport=udp".to_owned()],
        turn_secret: Some(Secret::new(SECRET)),
        turn_ttl: Duration::from_secs(600),
        stun_urls: Vec::new(),
    };
    let server = TestServer::start_with(config).await;
    let alice = publisher(&server, "restart-turn", "alice").await;
    let at_join = turn_expiry(&alice.joined().ice_servers);
    for target in [PcTarget::Publisher, PcTarget::Subscriber] {
        let from = alice.event_count();
        alice
            .send(ClientMessage::IceRestart { target })
            .await
            .unwrap();
        let (_, reply) = alice
            .wait_for_event_after(
                from,
                |e| matches!(e, PeerEvent::Server(ServerMessage::IceServers { .. })),
                T,
            )
            .await
            .unwrap_or_else(|e| panic!("{target:?}: fresh ICE servers: {e:#}"));
        let PeerEvent::Server(ServerMessage::IceServers { ice_servers }) = reply else {
            unreachable!()
        };
        assert_eq!(ice_servers[0].urls, ["turn:127.0.0.1:3478?transport=udp"]);
        let user = ice_servers[0].username.clone().unwrap();
        assert!(
            user.ends_with(&format!(":{}", alice.participant_id())),
            "{user}"
        );
        assert!(turn_expiry(&ice_servers) >= at_join, "{user}");
        assert_eq!(
            ice_servers[0].credential.as_deref(),
            Some(plaza::turn::credential(SECRET.as_bytes(), &user).as_str()),
            "coturn's REST scheme: base64(HMAC-SHA1(secret, username))"
        );
    }
    // The subscriber restart was made (the publisher's is alice's own offer, not made here),
    // and nothing went wrong.
    alice
        .wait_for_subscribe_answers(2, T)
        .await
        .expect("the restart offer answered");
    assert!(
        alice.server_errors().is_empty(),
        "{:?}",
        alice.server_errors()
    );
    let (_, stats) = support::stats(server.http_addr).await.unwrap();
    assert_eq!(stats["ice_restarts"], 1, "{stats}");
    alice.ping().await.expect("the session goes on");
}
