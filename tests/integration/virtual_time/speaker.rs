//! Active speakers in virtual time: sim publishers put an audio level (RFC 6464) in every Opus
//! packet; who talks, in turn, reaches everyone in the room as `speakers` messages within a
//! second, a pause between words does not end a speaker, a mute does; a room spread over two
//! shards hears the speakers of both.

use super::common::{Sim, ip, ms};
use plaza::signal::{ClientMessage, ServerMessage, TrackKind};
use plaza::sim::server::{SfuNode, add_shards};
use plaza::sim::{Client, MediaSpec, Net, NodeId};
use std::time::{Duration, Instant};

/// Bound of every wait, in virtual time.
const T: Duration = Duration::from_secs(20);
/// A voice: −20 dBov.
const VOICE: u8 = 20;
/// Silence, as a disabled microphone sends it.
const SILENT: u8 = 127;
/// The change latency the room must see at most: voice for two ticks (0.4 s) at worst plus
/// one tick of alignment and the delivery.
const CHANGE_WITHIN: Duration = Duration::from_millis(1_000);

fn audio_only() -> MediaSpec {
    MediaSpec {
        audio: true,
        ..MediaSpec::default()
    }
}

/// The `speakers` lists client `id` got (participant ids, loudest first), with arrival.
fn lists(net: &Net, id: NodeId) -> Vec<(Instant, Vec<String>)> {
    net.node_ref::<Client>(id)
        .messages
        .iter()
        .filter_map(|(at, m)| match m {
            ServerMessage::Speakers { speakers } => Some((
                *at,
                speakers.iter().map(|s| s.participant_id.clone()).collect(),
            )),
            _ => None,
        })
        .collect()
}

/// The latest `speakers` list client `id` got (empty before any).
fn latest(net: &Net, id: NodeId) -> Vec<String> {
    lists(net, id).pop().map(|(_, l)| l).unwrap_or_default()
}

fn set_level(net: &mut Net, id: NodeId, level: u8) {
    net.node::<Client>(id)
        .publisher
        .as_mut()
        .expect("publishes")
        .set_audio_level(Some(level));
}

/// Run until every client in `ids` was told `want` (in that order); how long it took.
fn wait_list(net: &mut Net, ids: &[NodeId], want: &[&str]) -> Duration {
    net.run_until_cond(T, |net| ids.iter().all(|&id| latest(net, id) == want))
        .unwrap_or_else(|| {
            let got: Vec<Vec<String>> = ids.iter().map(|&id| latest(net, id)).collect();
            panic!("speakers {want:?} not told: {got:?}")
        })
}

/// Run until every client in `ids` receives audio from each publisher in `from`.
fn wait_audio(net: &mut Net, ids: &[NodeId], from: &[NodeId]) {
    let got = net.run_until_cond(T, |net| {
        let pids: Vec<String> = from
            .iter()
            .filter_map(|&p| net.node_ref::<Client>(p).participant_id.clone())
            .collect();
        pids.len() == from.len()
            && ids.iter().all(|&id| {
                let c = net.node_ref::<Client>(id);
                pids.iter()
                    .filter(|pid| c.participant_id.as_ref() != Some(pid))
                    .all(|pid| {
                        c.announced_tracks()
                            .iter()
                            .filter(|t| &t.participant_id == pid && t.kind == TrackKind::Audio)
                            .any(|t| {
                                c.subscriber
                                    .tracks
                                    .get(&t.id)
                                    .is_some_and(|r| r.packets.len() > 10)
                            })
                    })
            })
    });
    assert!(got.is_some(), "audio flows");
}

#[test]
fn speakers_follow_who_talks() {
    let mut s = Sim::new(0x5bea);
    let alice = s.client(1, "alice", "talk", audio_only());
    let bob = s.client(2, "bob", "talk", audio_only());
    let carol = s.client(3, "carol", "talk", MediaSpec::none());
    let all = [alice, bob, carol];
    wait_audio(&mut s.net, &all, &[alice, bob]);
    for id in [alice, bob] {
        set_level(&mut s.net, id, SILENT);
    }
    let (pa, pb) = (s.pid(alice), s.pid(bob));
    s.net.run_for(Duration::from_secs(2));
    assert!(
        all.iter().all(|&id| lists(&s.net, id).is_empty()),
        "silence: no speakers message"
    );

    // Alice talks, with pauses between words (0.6 s of voice, 0.3 s of silence).
    set_level(&mut s.net, alice, VOICE);
    let took = wait_list(&mut s.net, &all, &[&pa]);
    println!("alice speaking: told after {:.0} ms", ms(took));
    assert!(took <= CHANGE_WITHIN, "alice told after {took:?}");
    let before = lists(&s.net, carol).len();
    for _ in 0..4 {
        s.net
            .run_for(Duration::from_millis(600) - took.min(Duration::from_millis(600)));
        set_level(&mut s.net, alice, SILENT);
        s.net.run_for(Duration::from_millis(300));
        set_level(&mut s.net, alice, VOICE);
    }
    s.net.run_for(Duration::from_millis(600));
    assert_eq!(
        lists(&s.net, carol).len(),
        before,
        "a pause between words changes nothing: {:?}",
        lists(&s.net, carol)
    );

    // Bob takes over: he is first within a second, then alone.
    let turn = s.net.now();
    set_level(&mut s.net, alice, SILENT);
    set_level(&mut s.net, bob, VOICE);
    let took = s
        .net
        .run_until_cond(T, |net| {
            all.iter().all(|&id| latest(net, id).first() == Some(&pb))
        })
        .expect("bob first");
    println!("bob speaking: first after {:.0} ms", ms(took));
    assert!(took <= CHANGE_WITHIN, "bob first after {took:?}");
    wait_list(&mut s.net, &all, &[&pb]);
    let alone = s.net.now() - turn;
    println!("alice stopped: bob alone after {:.0} ms", ms(alone));
    assert!(
        alone <= Duration::from_millis(1_500),
        "alice stopped after {alone:?}"
    );

    // The dashboard shows who speaks.
    let now = s.net.now();
    let snap = s.net.node::<SfuNode>(s.server).dashboard(now);
    let speaking: Vec<(String, bool)> = snap.rooms[0]
        .participants
        .iter()
        .map(|p| (p.name.clone(), p.speaking))
        .collect();
    assert_eq!(
        speaking,
        [
            ("alice".into(), false),
            ("bob".into(), true),
            ("carol".into(), false)
        ],
        "the dashboard's speakers"
    );

    // Both talk, alice louder: she is first.
    set_level(&mut s.net, alice, 10);
    set_level(&mut s.net, bob, 30);
    wait_list(&mut s.net, &all, &[&pa, &pb]);

    // Alice mutes her track: she does not speak any more, whatever she sends.
    let audio = s
        .c(carol)
        .announced_tracks()
        .into_iter()
        .find(|t| t.participant_id == pa && t.kind == TrackKind::Audio)
        .expect("alice's audio")
        .id;
    let at = s.net.now();
    s.c(alice).send(ClientMessage::Mute {
        track_id: audio,
        muted: true,
    });
    wait_list(&mut s.net, &all, &[&pb]);
    let took = s.net.now() - at;
    assert!(took <= CHANGE_WITHIN, "mute told after {took:?}");

    // Silence: nobody.
    set_level(&mut s.net, bob, SILENT);
    wait_list(&mut s.net, &all, &[]);

    // A newcomer while bob talks is told at once.
    set_level(&mut s.net, bob, VOICE);
    wait_list(&mut s.net, &all, &[&pb]);
    let dan = s.client(4, "dan", "talk", MediaSpec::none());
    let took = s
        .net
        .run_until_cond(T, |net| latest(net, dan) == [pb.clone()])
        .expect("dan told");
    assert!(took <= Duration::from_secs(2), "dan told after {took:?}");
    s.no_errors(&[alice, bob, carol, dan]);
}

#[test]
fn speakers_cross_shards() {
    let mut net = Net::new(0x5bee);
    let shards = add_shards(&mut net, 2, ip(100), 7882, 0x5bee, 1);
    let join = |net: &mut Net, n: u8, name: &str, media: MediaSpec| {
        let now = net.now();
        let c = Client::new(name, "spread", ip(n), now, u64::from(n) * 1000, media).expect(name);
        let addrs = c.addrs();
        let id = net.add_node(c, &addrs);
        let joined =
            net.run_until_cond(T, |net| net.node_ref::<Client>(id).participant_id.is_some());
        assert!(joined.is_some(), "{name} joins");
        id
    };
    let alice = join(&mut net, 1, "alice", audio_only());
    let bob = join(&mut net, 2, "bob", audio_only());
    let pid = |net: &Net, id: NodeId| {
        net.node_ref::<Client>(id)
            .participant_id
            .clone()
            .expect("joined")
    };
    let (pa, pb) = (pid(&net, alice), pid(&net, bob));
    let shard_of = |net: &Net, p: &str| net.placement().shard_of(p).expect("placed");
    assert_ne!(shard_of(&net, &pa), shard_of(&net, &pb), "one per shard");
    assert_eq!(shards.len(), 2);
    wait_audio(&mut net, &[alice, bob], &[alice, bob]);
    for id in [alice, bob] {
        set_level(&mut net, id, SILENT);
    }

    net.run_for(Duration::from_secs(1));
    set_level(&mut net, alice, VOICE);
    let took = wait_list(&mut net, &[alice, bob], &[&pa]);
    println!("spread room: alice told after {:.0} ms", ms(took));
    assert!(took <= CHANGE_WITHIN, "alice told after {took:?}");

    set_level(&mut net, alice, SILENT);
    set_level(&mut net, bob, VOICE);
    let took = net
        .run_until_cond(T, |net| {
            [alice, bob]
                .iter()
                .all(|&id| latest(net, id).first() == Some(&pb))
        })
        .expect("bob first");
    println!("spread room: bob first after {:.0} ms", ms(took));
    assert!(took <= CHANGE_WITHIN, "bob first after {took:?}");
    wait_list(&mut net, &[alice, bob], &[&pb]);

    // Both: the louder first, whichever shard it is on.
    set_level(&mut net, alice, 10);
    set_level(&mut net, bob, 35);
    wait_list(&mut net, &[alice, bob], &[&pa, &pb]);
    set_level(&mut net, alice, SILENT);
    set_level(&mut net, bob, SILENT);
    wait_list(&mut net, &[alice, bob], &[]);
}

/// The change latency over voices starting at every phase of the server's tick: from the
/// first packet with a voice to the `speakers` message that names the new speaker at a
/// listener, to the one that names it first, and to the one without the previous speaker. Printed for the bench file.
#[test]
fn speaker_change_latency() {
    let mut s = Sim::new(0x5bef);
    let alice = s.client(1, "alice", "lat", audio_only());
    let bob = s.client(2, "bob", "lat", audio_only());
    let carol = s.client(3, "carol", "lat", MediaSpec::none());
    wait_audio(&mut s.net, &[carol], &[alice, bob]);
    let (pa, pb) = (s.pid(alice), s.pid(bob));
    for id in [alice, bob] {
        set_level(&mut s.net, id, SILENT);
    }
    s.net.run_for(Duration::from_secs(2));
    let mut named = Vec::new();
    let mut first = Vec::new();
    let mut alone = Vec::new();
    // 20 turns, each starting 10 ms later in the server's 200 ms tick than the last.
    for turn in 0..20u32 {
        let (from, to, pto) = if turn % 2 == 0 {
            (alice, bob, &pb)
        } else {
            (bob, alice, &pa)
        };
        s.net
            .run_for(Duration::from_millis(2_000 + 10 * u64::from(turn)));
        let start = s.net.now();
        set_level(&mut s.net, from, SILENT);
        set_level(&mut s.net, to, VOICE);
        let n = s
            .net
            .run_until_cond(T, |net| latest(net, carol).contains(pto))
            .expect("new speaker named");
        named.push(n);
        let t = n + s
            .net
            .run_until_cond(T, |net| latest(net, carol).first() == Some(pto))
            .expect("new speaker first");
        first.push(t);
        wait_list(&mut s.net, &[carol], &[pto]);
        alone.push(s.net.now() - start);
    }
    let stats = |v: &mut Vec<Duration>| {
        v.sort();
        (ms(v[0]), ms(v[v.len() / 2]), ms(v[v.len() - 1]))
    };
    let (lo, med, hi) = stats(&mut named);
    println!(
        "speaker change, new speaker named: min {lo:.0} ms, median {med:.0} ms, max {hi:.0} ms"
    );
    let (lo, med, hi) = stats(&mut first);
    println!(
        "speaker change, new speaker first: min {lo:.0} ms, median {med:.0} ms, max {hi:.0} ms (n={})",
        first.len()
    );
    assert!(hi <= ms(CHANGE_WITHIN), "max {hi} ms");
    let (lo, med, hi) = stats(&mut alone);
    println!(
        "speaker change, previous speaker gone: min {lo:.0} ms, median {med:.0} ms, max {hi:.0} ms"
    );
    assert!(hi <= 1_500.0, "max {hi} ms");
    s.no_errors(&[alice, bob, carol]);
}
