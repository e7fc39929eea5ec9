//! What a participant's grants allow, enforced by the core (the grants come from its access
//! token; here they are set on the join directly): publishing and which kinds, subscribing,
//! sending data, being hidden, and one participant per identity in a room.

use super::common::Sim;
use plaza::sfu::Grants;
use plaza::signal::{ClientMessage, ErrorCode, ServerMessage, TrackKind};
use plaza::sim::{MediaSpec, NodeId};
use std::time::Duration;

/// Bound of every wait, in virtual time.
const T: Duration = Duration::from_secs(20);

fn grants(f: impl FnOnce(&mut Grants)) -> Grants {
    let mut g = Grants::default();
    f(&mut g);
    g
}

/// The `permission_denied` errors `id` got, by the request they answer.
fn denied(s: &mut Sim, id: NodeId) -> Vec<(Option<String>, String)> {
    s.c(id)
        .messages
        .iter()
        .filter_map(|(_, m)| match m {
            ServerMessage::Error {
                code: ErrorCode::PermissionDenied,
                message,
                request,
            } => Some((request.clone(), message.clone())),
            _ => None,
        })
        .collect()
}

fn received_packets(s: &mut Sim, id: NodeId) -> usize {
    s.c(id)
        .subscriber
        .tracks
        .values()
        .map(|t| t.packets.len())
        .sum()
}

/// A viewer-only participant that offers media anyway gets `permission_denied`; its media
/// never flows and nobody learns of a track. Without the data grant, its chat is refused
/// with an error on the same channel name and relayed to nobody.
#[test]
fn a_viewer_only_token_cannot_publish_media_or_data() {
    let mut s = Sim::new(31);
    let viewer = s.client(1, "viewer", "g", MediaSpec::audio_video());
    s.c(viewer).join_with(|req| {
        req.grants = grants(|g| {
            g.publish_audio = false;
            g.publish_video = false;
            g.publish_data = false;
        })
    });
    let host = s.client(2, "host", "g", MediaSpec::audio_video());
    s.wait_channels(&[viewer, host], T);
    s.net.run_for(Duration::from_secs(3));

    let d = denied(&mut s, viewer);
    assert!(
        d.iter().any(|(r, _)| r.as_deref() == Some("publish_offer")),
        "the publish offer is refused: {d:?}"
    );
    let viewer_id = s.pid(viewer);
    let host_knows = s.c(host).announced_tracks();
    assert!(
        host_knows.iter().all(|t| t.participant_id != viewer_id),
        "no track of the viewer is announced: {host_knows:?}"
    );
    // The viewer still receives the host's media.
    assert!(
        received_packets(&mut s, viewer) > 100,
        "the viewer receives"
    );
    let relayed_before = s.stats().data_messages_relayed;

    s.c(viewer)
        .send_data("chat", true, plaza::sim::envelope(&[], b"hi"));
    s.net.run_for(Duration::from_secs(1));
    let d = denied(&mut s, viewer);
    assert!(
        d.iter()
            .any(|(r, m)| r.as_deref() == Some("chat") && m.contains("sending data")),
        "chat without the data grant is refused: {d:?}"
    );
    assert!(
        s.c(host).data_received().is_empty(),
        "nothing was relayed: {:?}",
        s.c(host).data_received()
    );
    assert_eq!(s.stats().data_messages_relayed, relayed_before);
    assert!(denied(&mut s, host).is_empty());
}

/// An audio-only grant: the audio track is published and forwarded; the video track is
/// refused with `permission_denied` and never reaches anyone.
#[test]
fn a_publish_grant_limited_to_audio_refuses_the_video_track() {
    let mut s = Sim::new(32);
    // Simulcast: three encodings of one refused track.
    let host = s.client(1, "host", "g", MediaSpec::simulcast());
    s.c(host)
        .join_with(|req| req.grants = grants(|g| g.publish_video = false));
    let viewer = s.client(2, "viewer", "g", MediaSpec::none());
    s.wait_channels(&[host, viewer], T);
    let host_id = s.pid(host);
    let hid = host_id.clone();
    let audio = s.net.run_until_cond(T, |net| {
        net.node::<plaza::sim::Client>(viewer)
            .announced_tracks()
            .iter()
            .any(|t| t.participant_id == hid && t.kind == TrackKind::Audio)
    });
    assert!(audio.is_some(), "the audio track is announced");
    s.net.run_for(Duration::from_secs(3));
    let tracks = s.c(viewer).announced_tracks();
    assert!(
        tracks
            .iter()
            .all(|t| t.participant_id != host_id || t.kind == TrackKind::Audio),
        "no video track is announced: {tracks:?}"
    );
    let d = denied(&mut s, host);
    assert_eq!(
        d.iter()
            .filter(|(_, m)| m.contains("publishing video"))
            .count(),
        1,
        "the video track is refused, once for all its encodings: {d:?}"
    );
    let rx = s.c(viewer).subscriber.tracks.len();
    assert_eq!(rx, 1, "the viewer receives one track (audio)");
    assert!(received_packets(&mut s, viewer) > 50, "audio flows");
}

/// Without the subscribe grant a participant is not subscribed to anything, and asking is
/// refused.
#[test]
fn without_the_subscribe_grant_nothing_is_received() {
    let mut s = Sim::new(33);
    let host = s.client(1, "host", "g", MediaSpec::audio_video());
    let bot = s.client(2, "bot", "g", MediaSpec::none());
    s.c(bot)
        .join_with(|req| req.grants = grants(|g| g.subscribe = false));
    s.wait_channels(&[host, bot], T);
    s.net.run_for(Duration::from_secs(3));
    let tracks = s.c(bot).announced_tracks();
    assert_eq!(tracks.len(), 2, "the bot still learns of the tracks");
    assert_eq!(received_packets(&mut s, bot), 0, "but receives none");
    let ids: Vec<String> = tracks.iter().map(|t| t.id.clone()).collect();
    s.c(bot).send(ClientMessage::Subscribe {
        track_ids: ids,
        subscribe: true,
    });
    s.net.run_for(Duration::from_secs(2));
    let d = denied(&mut s, bot);
    assert!(
        d.iter().any(|(r, _)| r.as_deref() == Some("subscribe")),
        "{d:?}"
    );
    assert_eq!(received_packets(&mut s, bot), 0);
}

/// A hidden participant (a recorder) receives the room but nobody sees it: no
/// `participant_joined` or `participant_left`, not in a later joiner's list; it may not
/// publish media.
#[test]
fn a_hidden_participant_is_not_seen() {
    let mut s = Sim::new(34);
    let host = s.client(1, "host", "g", MediaSpec::audio_video());
    let recorder = s.client(2, "recorder", "g", MediaSpec::audio_video());
    s.c(recorder)
        .join_with(|req| req.grants = grants(|g| g.hidden = true));
    s.wait_channels(&[host, recorder], T);
    s.net.run_for(Duration::from_secs(2));
    let late = s.client(3, "late", "g", MediaSpec::none());
    s.wait_channels(&[late], T);
    s.net.run_for(Duration::from_secs(1));
    let rid = s.pid(recorder);
    for id in [host, late] {
        let seen = s.c(id).count_messages(|m| {
            matches!(m, ServerMessage::ParticipantJoined { participant } if participant.id == rid)
        });
        assert_eq!(
            seen,
            0,
            "{} was told of the hidden participant",
            s.c(id).name
        );
    }
    let listed = match s.c(late).joined.clone() {
        Some(ServerMessage::Joined { participants, .. }) => participants,
        other => panic!("late did not join: {other:?}"),
    };
    assert!(listed.iter().all(|p| p.id != rid), "{listed:?}");
    assert!(listed.iter().any(|p| p.id == s.pid(host)), "{listed:?}");
    // It receives the host, publishes nothing.
    assert!(received_packets(&mut s, recorder) > 100);
    let d = denied(&mut s, recorder);
    assert!(
        d.iter().any(|(r, _)| r.as_deref() == Some("publish_offer")),
        "{d:?}"
    );
    assert!(
        s.c(host)
            .announced_tracks()
            .iter()
            .all(|t| t.participant_id != rid)
    );
    // Leaving is silent too.
    s.c(recorder).send(ClientMessage::Leave);
    s.net.run_for(Duration::from_secs(1));
    for id in [host, late] {
        let seen = s.c(id).count_messages(|m| {
            matches!(m, ServerMessage::ParticipantLeft { participant_id, .. } if *participant_id == rid)
        });
        assert_eq!(seen, 0);
    }
    assert_eq!(s.stats().participants, 2);
}

/// One participant per identity in a room: a second join replaces the first, which is told
/// why; the others see the first leave and the second join.
#[test]
fn a_second_join_with_the_same_identity_replaces_the_first() {
    let mut s = Sim::new(35);
    let first = s.client(1, "alice", "g", MediaSpec::none());
    s.c(first)
        .join_with(|req| req.identity = Some("alice@example".into()));
    let bob = s.client(2, "bob", "g", MediaSpec::none());
    s.wait_channels(&[first, bob], T);
    let first_id = s.pid(first);
    let second = s.client(3, "alice", "g", MediaSpec::none());
    s.c(second)
        .join_with(|req| req.identity = Some("alice@example".into()));
    s.wait_channels(&[second], T);
    s.net.run_for(Duration::from_secs(1));
    let second_id = s.pid(second);
    assert_ne!(first_id, second_id);
    let told = s.c(first).count_messages(
        |m| matches!(m, ServerMessage::Leave { reason } if reason.contains("same identity")),
    );
    assert_eq!(told, 1, "the first is told why it leaves");
    let left = s.c(bob).count_messages(|m| {
        matches!(m, ServerMessage::ParticipantLeft { participant_id, .. } if *participant_id == first_id)
    });
    let joined = s.c(bob).count_messages(|m| {
        matches!(m, ServerMessage::ParticipantJoined { participant } if participant.id == second_id)
    });
    assert_eq!((left, joined), (1, 1));
    assert_eq!(s.stats().participants, 2);
    // Another identity, or none, is not affected.
    let carol = s.client(4, "carol", "g", MediaSpec::none());
    s.wait_channels(&[carol], T);
    assert_eq!(s.stats().participants, 3);
}
