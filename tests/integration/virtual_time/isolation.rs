//! No participant reaches anything outside its own room, nor learns whether an id exists
//! there: every message that takes an id is sent with another room's real ids, and answered
//! exactly as for ids nobody has; the other room is untouched.

use super::common::Sim;
use plaza::signal::{ClientMessage, Quality, ServerMessage, TrackInfo, TrackKind};
use plaza::sim::{Client, MediaSpec, NodeId, envelope};
use std::time::Duration;

/// Bound of every wait, in virtual time.
const T: Duration = Duration::from_secs(20);

fn tracks_of(s: &mut Sim, viewer: NodeId, publisher: &str) -> Vec<TrackInfo> {
    let mut t: Vec<TrackInfo> = s
        .c(viewer)
        .announced_tracks()
        .into_iter()
        .filter(|t| t.participant_id == publisher)
        .collect();
    t.sort_by(|a, b| a.id.cmp(&b.id));
    t
}

/// The errors `id` got since message index `from`, with the ids in their text replaced by `ID`.
fn errors_since(s: &mut Sim, id: NodeId, from: usize, ids: &[&str]) -> Vec<String> {
    s.c(id).messages[from..]
        .iter()
        .filter_map(|(_, m)| match m {
            ServerMessage::Error {
                code,
                message,
                request,
            } => {
                let mut text = message.clone();
                for i in ids {
                    text = text.replace(i, "ID");
                }
                Some(format!("{code:?} {request:?} {text}"))
            }
            _ => None,
        })
        .collect()
}

fn received(s: &mut Sim, id: NodeId, track: &str) -> usize {
    s.c(id)
        .subscriber
        .tracks
        .get(track)
        .map_or(0, |t| t.packets.len())
}

/// Every message that names a track or a participant, sent by bob (room `a`) with ids of
/// room `b` and then with made-up ids of the same shape: the answers are the same, word for
/// word once the ids are blanked out, and room `b` notices nothing.
#[test]
fn another_rooms_ids_are_answered_like_ids_nobody_has() {
    let mut s = Sim::new(41);
    let alice = s.client(1, "alice", "a", MediaSpec::audio_video());
    let bob = s.client(2, "bob", "a", MediaSpec::audio_video());
    let carol = s.client(3, "carol", "b", MediaSpec::audio_video());
    let dan = s.client(4, "dan", "b", MediaSpec::none());
    s.wait_channels(&[alice, bob, carol, dan], T);
    let (pc, pd) = (s.pid(carol), s.pid(dan));
    let ok = s.net.run_until_cond(T, |net| {
        net.node::<Client>(dan)
            .announced_tracks()
            .iter()
            .filter(|t| t.participant_id == pc)
            .count()
            == 2
    });
    assert!(ok.is_some(), "dan learns of carol's tracks");
    let theirs = tracks_of(&mut s, dan, &pc);
    let video = theirs
        .iter()
        .find(|t| t.kind == TrackKind::Video)
        .expect("carol's video")
        .id
        .clone();
    let audio = theirs
        .iter()
        .find(|t| t.kind == TrackKind::Audio)
        .expect("carol's audio")
        .id
        .clone();
    s.net.run_for(Duration::from_secs(1));
    assert!(received(&mut s, dan, &video) > 10);
    // Bob's own view holds nothing of room b.
    assert!(
        s.c(bob)
            .announced_tracks()
            .iter()
            .all(|t| t.participant_id != pc)
    );

    // Made-up ids of the same shape (so the answers can be compared word for word).
    let fake_track = format!("TR_{}", "Z".repeat(video.len() - 3));
    let fake_pid = format!("PA_{}", "Z".repeat(pd.len() - 3));
    let probe = |track: &str, audio_track: &str, pid: &str| -> Vec<ClientMessage> {
        vec![
            ClientMessage::Subscribe {
                track_ids: vec![track.to_owned(), audio_track.to_owned()],
                subscribe: true,
            },
            ClientMessage::Subscribe {
                track_ids: vec![track.to_owned()],
                subscribe: false,
            },
            ClientMessage::Mute {
                track_id: track.to_owned(),
                muted: true,
            },
            ClientMessage::TrackSettings {
                track_id: track.to_owned(),
                quality: Some(Some(Quality::Low)),
                width: None,
                height: None,
            },
            ClientMessage::TrackSettings {
                track_id: track.to_owned(),
                quality: None,
                width: Some(160),
                height: Some(90),
            },
            // (A participant id where a track id goes, too.)
            ClientMessage::Mute {
                track_id: pid.to_owned(),
                muted: true,
            },
        ]
    };
    let dan_before = received(&mut s, dan, &video);
    let carol_msgs = s.c(carol).messages.len();
    let dan_msgs = s.c(dan).messages.len();
    let dan_data = s.c(dan).data_received().len();
    let mut answers = Vec::new();
    for (track, audio_track, pid) in [
        (video.as_str(), audio.as_str(), pd.as_str()),
        (fake_track.as_str(), fake_track.as_str(), fake_pid.as_str()),
    ] {
        let from = s.c(bob).messages.len();
        for m in probe(track, audio_track, pid) {
            s.c(bob).send(m);
            s.net.run_for(Duration::from_millis(50));
        }
        // Data addressed to a participant of room b.
        s.c(bob).send_data("chat", true, envelope(&[pid], b"psst"));
        s.net.run_for(Duration::from_millis(500));
        answers.push(errors_since(
            &mut s,
            bob,
            from,
            &[
                track,
                audio_track,
                pid,
                &video,
                &audio,
                &pd,
                &fake_track,
                &fake_pid,
            ],
        ));
    }
    // One answer per message: 6 signaling messages and the data-channel message.
    assert_eq!(answers[0].len(), 7, "{:?}", answers[0]);
    assert_eq!(
        answers[0], answers[1],
        "room b's real ids are answered like made-up ones"
    );
    assert!(
        answers[0].iter().all(|a| a.starts_with("NotFound")),
        "{:?}",
        answers[0]
    );

    // Room b noticed nothing: no mute, no message, no data; dan still receives carol.
    s.net.run_for(Duration::from_secs(1));
    // (Room b's own connection-quality ratings may come meanwhile.)
    let own = |m: &ServerMessage| match m {
        ServerMessage::ConnectionQuality { updates } => updates
            .iter()
            .all(|u| u.participant_id == pc || u.participant_id == pd),
        _ => false,
    };
    let new_for_carol: Vec<_> = s.c(carol).messages[carol_msgs..]
        .iter()
        .map(|(_, m)| m.clone())
        .filter(|m| {
            !matches!(
                m,
                ServerMessage::LayerChanged { .. } | ServerMessage::PublisherLayers { .. }
            ) && !own(m)
        })
        .collect();
    assert!(new_for_carol.is_empty(), "{new_for_carol:?}");
    let new_for_dan: Vec<_> = s.c(dan).messages[dan_msgs..]
        .iter()
        .map(|(_, m)| m.clone())
        .filter(|m| !matches!(m, ServerMessage::LayerChanged { .. }) && !own(m))
        .collect();
    assert!(new_for_dan.is_empty(), "{new_for_dan:?}");
    assert_eq!(s.c(dan).data_received().len(), dan_data, "no data crossed");
    assert!(
        received(&mut s, dan, &video) > dan_before + 30,
        "carol's video still flows to dan"
    );
    // Bob never received a packet of room b.
    assert_eq!(received(&mut s, bob, &video), 0);
    assert_eq!(received(&mut s, bob, &audio), 0);
}

/// A room admin's reach ends at its room: `remove_participant`, `mute_chat` and `mute` with
/// room `b`'s real ids are answered like made-up ids (`not_found`) and change nothing there;
/// without the grant, the same messages get `permission_denied` whatever the id.
#[test]
fn a_room_admin_cannot_reach_another_room() {
    let mut s = Sim::new(43);
    let admin = s.client(1, "moderator", "a", MediaSpec::none());
    s.c(admin).join_with(|req| req.grants.room_admin = true);
    let bob = s.client(2, "bob", "a", MediaSpec::none());
    let carol = s.client(3, "carol", "b", MediaSpec::audio_video());
    let dan = s.client(4, "dan", "b", MediaSpec::none());
    s.wait_channels(&[admin, bob, carol, dan], T);
    let (pc, pd) = (s.pid(carol), s.pid(dan));
    let ok = s.net.run_until_cond(T, |net| {
        net.node::<Client>(dan)
            .announced_tracks()
            .iter()
            .any(|t| t.participant_id == pc && t.kind == TrackKind::Video)
    });
    assert!(ok.is_some(), "dan learns of carol's video");
    let video = tracks_of(&mut s, dan, &pc)
        .into_iter()
        .find(|t| t.kind == TrackKind::Video)
        .expect("carol's video")
        .id;
    s.net.run_for(Duration::from_secs(1));
    let fake_track = format!("TR_{}", "Z".repeat(video.len() - 3));
    let fake_pid = format!("PA_{}", "Z".repeat(pd.len() - 3));
    let probe = |track: &str, pid: &str| -> Vec<ClientMessage> {
        vec![
            ClientMessage::RemoveParticipant {
                participant_id: pid.to_owned(),
                reason: Some("x".into()),
            },
            ClientMessage::MuteChat {
                participant_id: pid.to_owned(),
                muted: true,
            },
            ClientMessage::Mute {
                track_id: track.to_owned(),
                muted: true,
            },
        ]
    };
    let carol_msgs = s.c(carol).messages.len();
    let dan_msgs = s.c(dan).messages.len();
    let dan_before = received(&mut s, dan, &video);
    for who in [admin, bob] {
        let mut answers = Vec::new();
        for (track, pid) in [
            (video.as_str(), pd.as_str()),
            (fake_track.as_str(), fake_pid.as_str()),
        ] {
            let from = s.c(who).messages.len();
            for m in probe(track, pid) {
                s.c(who).send(m);
                s.net.run_for(Duration::from_millis(50));
            }
            s.net.run_for(Duration::from_millis(300));
            answers.push(errors_since(
                &mut s,
                who,
                from,
                &[track, pid, &video, &pd, &fake_track, &fake_pid],
            ));
        }
        assert_eq!(answers[0].len(), 3, "{:?}", answers[0]);
        assert_eq!(
            answers[0], answers[1],
            "real ids answered like made-up ones"
        );
        // The admin: not found (a `mute` of a track it does not see: as any participant's);
        // bob: no grant (but `mute` of another's track is `not_found` for him too).
        let want = if who == admin {
            ["NotFound", "NotFound", "NotFound"]
        } else {
            ["PermissionDenied", "PermissionDenied", "NotFound"]
        };
        for (a, w) in answers[0].iter().zip(want) {
            assert!(a.starts_with(w), "{a}");
        }
    }
    // Room b noticed nothing.
    s.net.run_for(Duration::from_secs(1));
    // (Room b's own connection-quality ratings may come meanwhile.)
    let quiet = |m: &ServerMessage| match m {
        ServerMessage::LayerChanged { .. } | ServerMessage::PublisherLayers { .. } => false,
        ServerMessage::ConnectionQuality { updates } => !updates
            .iter()
            .all(|u| u.participant_id == pc || u.participant_id == pd),
        _ => true,
    };
    let new_for_carol = s.c(carol).messages[carol_msgs..]
        .iter()
        .filter(|(_, m)| quiet(m))
        .count();
    assert_eq!(new_for_carol, 0);
    let new_for_dan = s.c(dan).messages[dan_msgs..]
        .iter()
        .filter(|(_, m)| quiet(m))
        .count();
    assert_eq!(new_for_dan, 0);
    assert!(!s.c(dan).session_ended, "dan is still in");
    assert!(
        received(&mut s, dan, &video) > dan_before + 30,
        "carol's video still flows to dan"
    );
}
