//! Connection lifecycle in virtual time: a participant that never connects is dropped after
//! the connect timeout, one whose link dies is dropped when its connection fails (seconds of
//! virtual time, a fraction of a second of wall time), and a short outage heals by itself.

use super::common::{Sim, ms};
use plaza::sfu::CONNECT_TIMEOUT;
use plaza::signal::{LeaveReason, ServerMessage, TrackKind};
use plaza::sim::{Client, MediaSpec, Net, NodeId};
use std::time::{Duration, Instant};

/// Bound of every wait, in virtual time.
const T: Duration = Duration::from_secs(20);

/// `participant_left` of `pid`, for `why` (the test fails on another reason).
fn left(pid: &str, why: LeaveReason) -> impl Fn(&ServerMessage) -> bool + '_ {
    move |m| match m {
        ServerMessage::ParticipantLeft {
            participant_id,
            reason,
        } if participant_id == pid => {
            assert_eq!(*reason, why, "{pid} left for another reason");
            true
        }
        _ => false,
    }
}

/// The `Leave` reason client `id` was given, if any.
fn leave_reason(s: &mut Sim, id: NodeId) -> Option<String> {
    s.c(id).messages.iter().find_map(|(_, m)| match m {
        ServerMessage::Leave { reason } => Some(reason.clone()),
        _ => None,
    })
}

/// Packets `viewer` received from `publisher`'s `kind` track at or after `since`.
fn media_since(
    s: &mut Sim,
    viewer: NodeId,
    publisher: NodeId,
    kind: TrackKind,
    since: Instant,
) -> usize {
    let pid = s.pid(publisher);
    let c = s.c(viewer);
    let ids: Vec<String> = c
        .announced_tracks()
        .into_iter()
        .filter(|t| t.participant_id == pid && t.kind == kind)
        .map(|t| t.id)
        .collect();
    ids.iter()
        .filter_map(|id| c.subscriber.tracks.get(id))
        .map(|t| t.since(since).count())
        .sum()
}

/// Run until `viewer` receives `publisher`'s video.
fn wait_video(s: &mut Sim, viewer: NodeId, publisher: NodeId) {
    let t0 = s.net.now();
    let got = s.net.run_until_cond(T, |net: &mut Net| {
        let Some(pid) = net.node_ref::<Client>(publisher).participant_id.clone() else {
            return false;
        };
        let c = net.node_ref::<Client>(viewer);
        c.announced_tracks()
            .iter()
            .filter(|t| t.participant_id == pid && t.kind == TrackKind::Video)
            .any(|t| {
                c.subscriber
                    .tracks
                    .get(&t.id)
                    .is_some_and(|r| r.since(t0).count() > 0)
            })
    });
    let (v, p) = (s.c(viewer).name.clone(), s.c(publisher).name.clone());
    assert!(got.is_some(), "{v} receives {p}'s video");
}

/// A participant whose datagrams never get through (so ICE never completes) is removed when
/// the connect timeout runs out, measured on the virtual clock: it is told why (`leave`) and
/// the others get `participant_left`.
#[test]
fn never_connecting_participant_is_removed_after_the_connect_timeout() {
    let wall = Instant::now();
    let mut s = Sim::new(21);
    let alice = s.client(1, "alice", "a", MediaSpec::none());
    let bob = s.client(2, "bob", "a", MediaSpec::none());
    // Bob's network is dead from the start; signaling (out of band) still works.
    s.set_loss(bob, 1.0);
    let joined = s.net.run_until_cond(T, |net| {
        net.node_ref::<Client>(bob).participant_id.is_some()
    });
    let joined_at = s.net.start() + joined.expect("bob joins");
    let pb = s.pid(bob);
    s.wait_channels(&[alice], T);
    assert!(!s.c(bob).subscriber.is_connected());
    let took = s
        .net
        .run_until_cond(CONNECT_TIMEOUT + T, |net| {
            net.node_ref::<Client>(alice)
                .messages
                .iter()
                .any(|(_, m)| left(&pb, LeaveReason::ConnectTimeout)(m))
        })
        .expect("alice is told bob left");
    let at = s.messages(alice, left(&pb, LeaveReason::ConnectTimeout))[0];
    let after = at - joined_at;
    assert!(
        after >= CONNECT_TIMEOUT && after <= CONNECT_TIMEOUT + Duration::from_secs(1),
        "removed {after:?} after joining"
    );
    assert_eq!(
        leave_reason(&mut s, bob).as_deref(),
        Some("transport did not connect in time")
    );
    assert!(leave_reason(&mut s, alice).is_none(), "alice stays");
    assert_eq!(
        s.messages(alice, left(&pb, LeaveReason::ConnectTimeout))
            .len(),
        1
    );
    let stats = s.stats();
    assert_eq!(stats.participants, 1, "{stats:?}");
    s.no_errors(&[alice]);
    println!(
        "never connected: removed {:.0} ms after the join ({:.0} ms of waiting); wall {:?}",
        ms(after),
        ms(took),
        wall.elapsed()
    );
}

/// A participant whose link goes dead both ways is removed when its connection fails: its
/// subscribers get `track_unpublished` for its tracks and `participant_left`, and the two
/// others keep receiving each other's media all along. The loopback equivalent takes about
/// 26 s of real time; here it is seconds of virtual time and well under a second of wall time.
#[test]
fn dead_link_removes_the_participant_when_its_connection_fails() {
    let mut s = Sim::new(22);
    let alice = s.client(1, "alice", "a", MediaSpec::audio_video());
    let bob = s.client(2, "bob", "a", MediaSpec::audio_video());
    let carol = s.client(3, "carol", "a", MediaSpec::audio_video());
    for (v, p) in [
        (alice, bob),
        (bob, alice),
        (alice, carol),
        (bob, carol),
        (carol, alice),
    ] {
        wait_video(&mut s, v, p);
    }
    s.net.run_for(Duration::from_secs(1));
    s.no_errors(&[alice, bob, carol]);
    let pc = s.pid(carol);
    let carol_tracks: Vec<String> = s
        .c(alice)
        .announced_tracks()
        .into_iter()
        .filter(|t| t.participant_id == pc)
        .map(|t| t.id)
        .collect();
    assert_eq!(carol_tracks.len(), 2);

    let wall = Instant::now();
    let dead_at = s.net.now();
    s.set_loss(carol, 1.0);
    let took = s
        .net
        .run_until_cond(Duration::from_secs(60), |net| {
            [alice, bob].iter().all(|&id| {
                net.node_ref::<Client>(id)
                    .messages
                    .iter()
                    .any(|(_, m)| left(&pc, LeaveReason::IceFailed)(m))
            })
        })
        .expect("carol's connection fails and she is removed");
    let wall_took = wall.elapsed();
    for id in [alice, bob] {
        let name = s.c(id).name.clone();
        let left_at = s.messages(id, left(&pc, LeaveReason::IceFailed));
        assert_eq!(left_at.len(), 1, "{name}: one participant_left");
        for tid in &carol_tracks {
            let unpub = s.messages(id, |m| {
                matches!(m, ServerMessage::TrackUnpublished { track_id, participant_id }
                    if track_id == tid && participant_id == &pc)
            });
            assert_eq!(unpub.len(), 1, "{name}: track_unpublished for {tid}");
            assert!(unpub[0] <= left_at[0], "{name}: unpublished before left");
        }
        assert!(leave_reason(&mut s, id).is_none(), "{name} stays");
    }
    // Carol never hears it (her link is dead), but the server sent her a `leave` naming the
    // failed connection.
    let reason = leave_reason(&mut s, carol).expect("carol is told");
    assert!(reason.contains("connection failed"), "{reason}");
    // Failure is detected by the server's ICE agent: `rtc`'s defaults call a connection
    // disconnected after 5 s without traffic and failed 25 s later, so about 30 s.
    assert!(
        took >= Duration::from_secs(20) && took <= Duration::from_secs(35),
        "removed {took:?} after the link died"
    );
    // Simulated, not waited for: far less wall time than the ~30 s it stands for (a bound
    // loose enough for a loaded 2-core machine running other tests beside it).
    assert!(wall_took < Duration::from_secs(10), "wall {wall_took:?}");

    // Alice and bob kept getting each other's media the whole time, and still do.
    let mid = dead_at + took / 2;
    s.net.run_for(Duration::from_secs(2));
    let recent = s.net.now() - Duration::from_secs(1);
    for (v, p) in [(alice, bob), (bob, alice)] {
        for kind in [TrackKind::Audio, TrackKind::Video] {
            let during = media_since(&mut s, v, p, kind, mid);
            let now = media_since(&mut s, v, p, kind, recent);
            assert!(
                during > now && now > 20,
                "{v}<-{p} {kind:?}: {during} since the outage, {now} in the last second"
            );
        }
    }
    let stats = s.stats();
    assert_eq!(stats.participants, 2, "{stats:?}");
    s.no_errors(&[alice, bob]);
    println!(
        "dead link: carol removed {:.0} ms (virtual) after her link died, in {:?} of wall time",
        ms(took),
        wall_took
    );
}

/// Five seconds of total loss on the publisher's link heal by themselves: nobody leaves, and
/// the subscriber receives the publisher's audio and video again on the same tracks, without
/// a new join.
#[test]
fn short_outage_recovers_without_a_new_join() {
    let wall = Instant::now();
    let mut s = Sim::new(23);
    let alice = s.client(1, "alice", "a", MediaSpec::audio_video());
    let bob = s.client(2, "bob", "a", MediaSpec::none());
    wait_video(&mut s, bob, alice);
    s.net.run_for(Duration::from_secs(2));
    let pa = s.pid(alice);
    let tracks_before = s.c(bob).announced_tracks();

    let cut = s.net.now();
    s.set_loss(alice, 1.0);
    s.net.run_for(Duration::from_secs(5));
    let healed = s.net.now();
    s.set_loss(alice, 0.0);
    let gap_media = media_since(
        &mut s,
        bob,
        alice,
        TrackKind::Video,
        cut + Duration::from_millis(100),
    ) + media_since(
        &mut s,
        bob,
        alice,
        TrackKind::Audio,
        cut + Duration::from_millis(100),
    );
    assert_eq!(gap_media, 0, "nothing gets through during the outage");

    let back = s
        .net
        .run_until_cond(T, |net| {
            let c = net.node_ref::<Client>(bob);
            c.announced_tracks()
                .iter()
                .filter(|t| t.participant_id == pa)
                .all(|t| {
                    c.subscriber
                        .tracks
                        .get(&t.id)
                        .is_some_and(|r| r.since(healed).count() > 0)
                })
        })
        .expect("media resumes after the outage");
    s.net.run_for(Duration::from_secs(3));
    // The outage shows at the subscriber as a sequence and picture-id gap on the same
    // stream (what makes a browser's decoder ask for a keyframe); a PLI then gets one.
    let video = s
        .c(bob)
        .announced_tracks()
        .into_iter()
        .find(|t| t.participant_id == pa && t.kind == TrackKind::Video)
        .expect("video track")
        .id;
    let rx = s.c(bob).subscriber.tracks[&video].clone();
    let last = rx.packets.iter().rfind(|p| p.at < healed).expect("before");
    let first = rx.packets.iter().find(|p| p.at >= healed).expect("after");
    assert_eq!(first.ssrc, last.ssrc, "same down-track SSRC");
    assert!(
        first.seq.wrapping_sub(last.seq) > 100,
        "sequence gap over 5 s"
    );
    let pid_gap = first
        .vp8
        .and_then(|v| v.picture_id)
        .unwrap_or(0)
        .wrapping_sub(last.vp8.and_then(|v| v.picture_id).unwrap_or(0));
    assert!(pid_gap > 100, "picture-id gap over 5 s: {pid_gap}");
    let now = s.net.now();
    s.c(bob).subscriber.send_pli(now, &video).expect("pli");
    let key = s.net.run_until_cond(T, |net| {
        net.node_ref::<Client>(bob).subscriber.tracks[&video]
            .keyframes()
            .any(|p| p.at >= now)
    });
    assert!(key.is_some(), "a keyframe after the PLI");
    let later = s.net.now() - Duration::from_secs(2);
    let audio = media_since(&mut s, bob, alice, TrackKind::Audio, later);
    let video = media_since(&mut s, bob, alice, TrackKind::Video, later);
    assert!(audio > 80, "audio in the last 2 s: {audio}");
    assert!(video > 60, "video in the last 2 s: {video}");
    // Same participants, same tracks, no new join, nobody left.
    assert_eq!(s.pid(alice), pa);
    assert_eq!(s.c(bob).announced_tracks(), tracks_before);
    for id in [alice, bob] {
        assert!(leave_reason(&mut s, id).is_none());
        let lefts = s.messages(id, |m| matches!(m, ServerMessage::ParticipantLeft { .. }));
        assert!(lefts.is_empty());
    }
    for id in [alice, bob] {
        let joins = s.messages(id, |m| matches!(m, ServerMessage::ParticipantJoined { .. }));
        assert!(joins.iter().all(|t| *t < cut), "no join after the outage");
    }
    s.no_errors(&[alice, bob]);
    println!(
        "5 s outage: media back {:.0} ms after the link healed, keyframe {:.0} ms after a PLI; \
         wall {:?}",
        ms(back),
        ms(key.unwrap()),
        wall.elapsed()
    );
}
