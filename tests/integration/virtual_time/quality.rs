//! Connection quality in virtual time: a participant whose link goes silent is reported `lost`
//! to the room within seconds (long before the server gives up on it), and comes back when its
//! packets do; a lossy uplink or downlink lowers the quality of that participant only; rooms
//! that span shards report across the pipe.

use super::common::{Sim, ip, ms};
use plaza::signal::{ConnectionQuality, ServerMessage, TrackKind};
use plaza::sim::server::{SfuNode, add_shards};
use plaza::sim::{Client, MediaSpec, Net, NodeId};
use std::time::{Duration, Instant};

use ConnectionQuality::{Excellent, Good, Lost, Poor};

/// Bound of every wait, in virtual time.
const T: Duration = Duration::from_secs(20);
/// Silence (2.75 s) plus one evaluation tick (0.25 s), plus the delivery of the message.
const LOST_WITHIN: Duration = Duration::from_millis(3_100);

/// The qualities of participant `pid` that client `viewer` was told, in order, with their
/// virtual arrival.
fn timeline(net: &Net, viewer: NodeId, pid: &str) -> Vec<(Instant, ConnectionQuality)> {
    net.node_ref::<Client>(viewer)
        .messages
        .iter()
        .filter_map(|(at, m)| match m {
            ServerMessage::ConnectionQuality { updates } => updates
                .iter()
                .rfind(|u| u.participant_id == pid)
                .map(|u| (*at, u.quality)),
            _ => None,
        })
        .collect()
}

/// The latest quality of `pid` that `viewer` was told.
fn latest(net: &Net, viewer: NodeId, pid: &str) -> Option<ConnectionQuality> {
    timeline(net, viewer, pid).last().map(|(_, q)| *q)
}

fn pid_of(net: &Net, id: NodeId) -> String {
    net.node_ref::<Client>(id)
        .participant_id
        .clone()
        .expect("joined")
}

/// Run until `viewer` is told `pid`'s quality satisfies `f`; how long it took.
fn wait_quality(
    net: &mut Net,
    viewer: NodeId,
    pid: &str,
    max: Duration,
    f: impl Fn(ConnectionQuality) -> bool,
) -> Option<Duration> {
    net.run_until_cond(max, |net| latest(net, viewer, pid).is_some_and(&f))
}

/// Run until `viewer` receives video from `publisher`.
fn wait_video(net: &mut Net, viewer: NodeId, publisher: NodeId) {
    let got = net.run_until_cond(T, |net| {
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
                    .is_some_and(|r| !r.packets.is_empty())
            })
    });
    assert!(got.is_some(), "video flows");
}

/// Everyone in `ids` is told that everyone in `ids` is excellent.
fn all_excellent(s: &mut Sim, ids: &[NodeId]) {
    let pids: Vec<String> = ids.iter().map(|&id| pid_of(&s.net, id)).collect();
    let ok = s.net.run_until_cond(T, |net| {
        ids.iter()
            .all(|&v| pids.iter().all(|p| latest(net, v, p) == Some(Excellent)))
    });
    assert!(ok.is_some(), "everyone rated excellent");
}

/// A publisher's uplink goes fully silent for 5 s: within 3 s everyone (the publisher too:
/// its downlink still works) is told it is `lost`; once the link heals it is `good` again at
/// once and `excellent` a few seconds later. Nobody else's quality moves.
#[test]
fn silent_uplink_is_lost_within_seconds_and_comes_back() {
    let mut s = Sim::new(31);
    let alice = s.client(1, "alice", "q", MediaSpec::audio_video());
    let bob = s.client(2, "bob", "q", MediaSpec::audio_video());
    let carol = s.client(3, "carol", "q", MediaSpec::none());
    for (v, p) in [(bob, alice), (carol, alice), (alice, bob), (carol, bob)] {
        wait_video(&mut s.net, v, p);
    }
    all_excellent(&mut s, &[alice, bob, carol]);
    let (pa, pb, pc) = (
        pid_of(&s.net, alice),
        pid_of(&s.net, bob),
        pid_of(&s.net, carol),
    );

    let cut = s.net.now();
    let server = s.server;
    s.net.link_mut(alice, server).loss = 1.0;
    for v in [bob, carol, alice] {
        let took = wait_quality(&mut s.net, v, &pa, T, |q| q == Lost)
            .map(|_| s.net.now() - cut)
            .expect("alice is reported lost");
        assert!(took <= LOST_WITHIN, "lost reported after {took:?}");
    }
    let lost_at = s.net.now() - cut;
    s.net.run_until(cut + Duration::from_secs(5));
    // Still lost (no flapping while silent), and still in the room.
    for v in [bob, carol] {
        let t = timeline(&s.net, v, &pa);
        assert_eq!(t.iter().filter(|(at, _)| *at > cut).count(), 1, "{t:?}");
        assert_eq!(t.last().map(|x| x.1), Some(Lost));
    }

    let healed = s.net.now();
    s.net.link_mut(alice, server).loss = 0.0;
    let back = wait_quality(&mut s.net, bob, &pa, T, |q| q != Lost).expect("alice is back");
    assert!(
        back <= Duration::from_millis(1_100),
        "back reported {back:?} after the link healed"
    );
    let excellent =
        wait_quality(&mut s.net, bob, &pa, T, |q| q == Excellent).expect("alice excellent again");
    assert!(excellent <= Duration::from_secs(8), "{excellent:?}");
    s.net.run_for(Duration::from_secs(1));
    for v in [carol, alice] {
        assert_eq!(latest(&s.net, v, &pa), Some(Excellent));
    }
    // Bob and carol were never anything but excellent.
    for v in [alice, bob, carol] {
        for p in [&pb, &pc] {
            let t = timeline(&s.net, v, p);
            assert!(
                t.iter().all(|(_, q)| *q == Excellent),
                "{p} seen by {v:?}: {t:?}"
            );
        }
    }
    // Nobody left.
    for v in [alice, bob, carol] {
        let lefts = s.messages(v, |m| matches!(m, ServerMessage::ParticipantLeft { .. }));
        assert!(lefts.is_empty());
    }
    s.no_errors(&[bob, carol]);
    println!(
        "silent uplink: lost reported {:.0} ms after the cut; back {:.0} ms and excellent \
         {:.0} ms after the link healed ({:.0} ms after the cut)",
        ms(lost_at),
        ms(back),
        ms(excellent),
        ms(healed - cut),
    );
}

/// A participant whose link dies for good is reported `lost` within seconds, and removed
/// (`participant_left`) only when its connection fails, ~30 s later.
#[test]
fn dead_link_is_lost_first_then_removed() {
    let mut s = Sim::new(32);
    let alice = s.client(1, "alice", "q", MediaSpec::audio_video());
    let bob = s.client(2, "bob", "q", MediaSpec::none());
    wait_video(&mut s.net, bob, alice);
    all_excellent(&mut s, &[alice, bob]);
    let pa = pid_of(&s.net, alice);
    let cut = s.net.now();
    s.set_loss(alice, 1.0);
    let left = |pid: &str| {
        let pid = pid.to_owned();
        move |m: &ServerMessage| matches!(m, ServerMessage::ParticipantLeft { participant_id, .. } if *participant_id == pid)
    };
    let gone = s.net.run_until_cond(Duration::from_secs(60), |net| {
        net.node_ref::<Client>(bob)
            .messages
            .iter()
            .any(|(_, m)| left(&pa)(m))
    });
    assert!(gone.is_some(), "alice removed");
    let left_at = s.messages(bob, left(&pa))[0];
    let t = timeline(&s.net, bob, &pa);
    let lost: Vec<Instant> = t
        .iter()
        .filter(|(_, q)| *q == Lost)
        .map(|(at, _)| *at)
        .collect();
    assert_eq!(lost.len(), 1, "{t:?}");
    assert!(
        lost[0] - cut <= LOST_WITHIN,
        "lost {:?} after",
        lost[0] - cut
    );
    assert!(
        left_at - lost[0] >= Duration::from_secs(15),
        "removed {:?} after lost",
        left_at - lost[0]
    );
    assert!(
        t.iter().all(|(at, q)| *at <= cut || *q == Lost),
        "nothing but lost after the cut: {t:?}"
    );
    println!(
        "dead link: lost reported {:.0} ms after the cut, removed {:.0} ms after the cut",
        ms(lost[0] - cut),
        ms(left_at - cut)
    );
}

/// 12 % loss on a publisher's uplink: it and the others are told it is `poor` (at most
/// `good` now and then), while the clean participants stay `excellent`. When the loss stops,
/// it climbs back to `excellent`.
#[test]
fn lossy_uplink_lowers_only_the_publishers_quality() {
    let mut s = Sim::new(33);
    let alice = s.client(1, "alice", "q", MediaSpec::audio_video());
    let bob = s.client(2, "bob", "q", MediaSpec::audio_video());
    let carol = s.client(3, "carol", "q", MediaSpec::none());
    for (v, p) in [(bob, alice), (carol, alice), (alice, bob), (carol, bob)] {
        wait_video(&mut s.net, v, p);
    }
    all_excellent(&mut s, &[alice, bob, carol]);
    let (pa, pb, pc) = (
        pid_of(&s.net, alice),
        pid_of(&s.net, bob),
        pid_of(&s.net, carol),
    );
    let server = s.server;
    let start = s.net.now();
    s.net.link_mut(alice, server).loss = 0.12;
    for v in [alice, bob, carol] {
        wait_quality(&mut s.net, v, &pa, Duration::from_secs(5), |q| q == Poor)
            .expect("alice reported poor");
    }
    let poor_after = s.net.now() - start;
    s.net.run_for(Duration::from_secs(10));
    let settled = start + Duration::from_secs(4);
    for v in [alice, bob, carol] {
        let t = timeline(&s.net, v, &pa);
        assert!(
            t.iter()
                .filter(|(at, _)| *at >= settled)
                .all(|(_, q)| matches!(q, Poor | Good)),
            "alice while lossy: {t:?}"
        );
        assert!(matches!(latest(&s.net, v, &pa), Some(Poor | Good)));
        for p in [&pb, &pc] {
            let t = timeline(&s.net, v, p);
            assert!(t.iter().all(|(_, q)| *q == Excellent), "{p}: {t:?}");
        }
    }
    s.net.link_mut(alice, server).loss = 0.0;
    let back =
        wait_quality(&mut s.net, bob, &pa, T, |q| q == Excellent).expect("alice excellent again");
    println!(
        "lossy uplink (12 %): poor reported {:.0} ms after the loss began; excellent {:.0} ms \
         after it stopped",
        ms(poor_after),
        ms(back)
    );
}

/// 12 % loss on a subscriber's downlink lowers that subscriber's quality; the publisher it
/// watches stays `excellent`.
#[test]
fn lossy_downlink_lowers_the_subscribers_quality() {
    let mut s = Sim::new(34);
    let alice = s.client(1, "alice", "q", MediaSpec::audio_video());
    let bob = s.client(2, "bob", "q", MediaSpec::none());
    wait_video(&mut s.net, bob, alice);
    all_excellent(&mut s, &[alice, bob]);
    let (pa, pb) = (pid_of(&s.net, alice), pid_of(&s.net, bob));
    let server = s.server;
    let start = s.net.now();
    s.net.link_mut(server, bob).loss = 0.12;
    for v in [alice, bob] {
        wait_quality(&mut s.net, v, &pb, Duration::from_secs(5), |q| {
            matches!(q, Poor | Good)
        })
        .expect("bob's quality drops");
    }
    let dropped = s.net.now() - start;
    s.net.run_for(Duration::from_secs(8));
    for v in [alice, bob] {
        assert!(matches!(latest(&s.net, v, &pb), Some(Poor | Good)));
        let t = timeline(&s.net, v, &pa);
        assert!(t.iter().all(|(_, q)| *q == Excellent), "alice: {t:?}");
    }
    let seen: Vec<ConnectionQuality> = timeline(&s.net, alice, &pb).iter().map(|x| x.1).collect();
    assert!(seen.contains(&Poor), "bob poor at some point: {seen:?}");
    println!(
        "lossy downlink (12 %): bob's quality dropped {:.0} ms after the loss began: {seen:?}",
        ms(dropped)
    );
}

/// A room over two shards: the publisher's shard rates it and the other shard's participants
/// are told over the pipe; a participant joining later on either shard is told the
/// qualities already known.
#[test]
fn quality_crosses_shards() {
    let mut net = Net::new(35);
    let shards = add_shards(&mut net, 2, ip(100), 7882, 35, 1);
    let join = |net: &mut Net, n: u8, name: &str, media: MediaSpec| {
        let now = net.now();
        let c = Client::new(name, "q", ip(n), now, u64::from(n) * 1000, media).expect(name);
        let addrs = c.addrs();
        let id = net.add_node(c, &addrs);
        let joined =
            net.run_until_cond(T, |net| net.node_ref::<Client>(id).participant_id.is_some());
        assert!(joined.is_some(), "{name} joins");
        id
    };
    let alice = join(&mut net, 1, "alice", MediaSpec::audio_video());
    let bob = join(&mut net, 2, "bob", MediaSpec::none());
    let (pa, pb) = (pid_of(&net, alice), pid_of(&net, bob));
    let shard_of = |net: &Net, pid: &str| net.placement().shard_of(pid).expect("placed");
    assert_ne!(shard_of(&net, &pa), shard_of(&net, &pb), "one per shard");
    wait_video(&mut net, bob, alice);
    let rated = net.run_until_cond(T, |net| {
        [alice, bob].iter().all(|&v| {
            latest(net, v, &pa) == Some(Excellent) && latest(net, v, &pb) == Some(Excellent)
        })
    });
    assert!(rated.is_some(), "both rated on both shards");

    let cut = net.now();
    for &shard in &shards {
        net.link_mut(alice, shard).loss = 1.0;
    }
    wait_quality(&mut net, bob, &pa, T, |q| q == Lost).expect("bob told alice is lost");
    assert!(net.now() - cut <= LOST_WITHIN, "{:?}", net.now() - cut);
    for &shard in &shards {
        net.link_mut(alice, shard).loss = 0.0;
    }
    wait_quality(&mut net, bob, &pa, T, |q| q != Lost).expect("bob told alice is back");

    // A late joiner learns both qualities without waiting for a change.
    let carol = join(&mut net, 3, "carol", MediaSpec::none());
    let told = net.run_until_cond(Duration::from_secs(2), |net| {
        latest(net, carol, &pa).is_some() && latest(net, carol, &pb).is_some()
    });
    assert!(told.is_some(), "carol is told the known qualities");
    let pc = pid_of(&net, carol);
    wait_quality(&mut net, alice, &pc, T, |q| q == Excellent).expect("carol rated");
    for &shard in &shards {
        let now = net.now();
        let stats = net.node::<SfuNode>(shard).stats(now);
        assert!(stats.pipe_msgs_out > 0, "{stats:?}");
    }
}

/// Participants that send and receive no media at all (only ICE consent and the answers to the
/// server's keepalives cross their links) are never taken for silent.
#[test]
fn idle_participants_are_not_silent() {
    let mut s = Sim::new(36);
    let alice = s.client(1, "alice", "q", MediaSpec::none());
    let bob = s.client(2, "bob", "q", MediaSpec::none());
    s.wait_channels(&[alice, bob], T);
    all_excellent(&mut s, &[alice, bob]);
    s.net.run_for(Duration::from_secs(30));
    let (pa, pb) = (pid_of(&s.net, alice), pid_of(&s.net, bob));
    for v in [alice, bob] {
        for p in [&pa, &pb] {
            let t = timeline(&s.net, v, p);
            assert_eq!(
                t.iter().map(|x| x.1).collect::<Vec<_>>(),
                vec![Excellent],
                "{p}"
            );
        }
    }
}
