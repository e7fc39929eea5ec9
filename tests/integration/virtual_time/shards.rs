//! Rooms that span shards, in virtual time: several cores as the shards of one server
//! (`plaza::sim::server::add_shards`), joins placed by the real `Placement`, the pipe between
//! the shards carried by the simulated network. What a participant sees must not depend on
//! which shard it landed on: media (with layer selection, dynacast and keyframe requests
//! across the pipe), membership, mutes and data; and each relayed packet crosses the pipe
//! once per shard with subscribers, not once per viewer. Mirrors
//! `tests/integration/lifecycle.rs::a_big_room_spans_shards`, which runs the real server over sockets.

use super::common::{self, digest, ip, ms, unwrap_seqs};
use super::sfu::{SIZES, assert_clean_stream, settings};
use plaza::sfu::CoreStats;
use plaza::signal::{
    ClientMessage, ErrorCode, LeaveReason, Quality, ServerMessage, TrackInfo, TrackKind,
};
use plaza::sim::server::{SfuNode, add_shards};
use plaza::sim::{Client, LinkConfig, MediaSpec, Net, NodeId, PipeConfig, RtcpIn, RxTrack};
use plaza::sim::{DataIn, envelope};
use std::time::{Duration, Instant};

/// Bound of every wait, in virtual time.
const T: Duration = Duration::from_secs(20);
const ROOM: &str = "live";

/// Shards of one server at `10.0.0.100:7882 + i`, and clients of room [`ROOM`].
struct Sim {
    net: Net,
    shards: Vec<NodeId>,
}

impl Sim {
    fn new(seed: u64, shards: usize, spread_above: usize) -> Self {
        let mut net = Net::new(seed);
        // The shards first: see `Net::settle`.
        let shards = add_shards(&mut net, shards, ip(100), 7882, seed, spread_above);
        Sim { net, shards }
    }

    /// A client at `10.0.0.n` that joins [`ROOM`]; runs until its join is answered, so that
    /// joins are placed in the order of the calls.
    fn join(&mut self, n: u8, name: &str, media: MediaSpec) -> NodeId {
        self.join_with(n, name, media, |c| c)
    }

    fn join_with(
        &mut self,
        n: u8,
        name: &str,
        media: MediaSpec,
        f: impl FnOnce(Client) -> Client,
    ) -> NodeId {
        let now = self.net.now();
        let c = Client::new(name, ROOM, ip(n), now, u64::from(n) * 1000, media).expect(name);
        let c = f(c);
        let addrs = c.addrs();
        let id = self.net.add_node(c, &addrs);
        let joined = self
            .net
            .run_until_cond(T, |net| net.node_ref::<Client>(id).participant_id.is_some());
        assert!(joined.is_some(), "{name} joined: {:?}", self.c(id).errors);
        id
    }

    fn c(&mut self, id: NodeId) -> &mut Client {
        self.net.node::<Client>(id)
    }

    fn pid(&mut self, id: NodeId) -> String {
        self.c(id).participant_id.clone().expect("joined")
    }

    /// The shard the placement put client `id` on.
    fn shard_of(&mut self, id: NodeId) -> usize {
        let pid = self.pid(id);
        self.net.placement().shard_of(&pid).expect("placed")
    }

    fn stats(&mut self, shard: usize) -> CoreStats {
        let now = self.net.now();
        let node = self.shards[shard];
        self.net.node::<SfuNode>(node).stats(now)
    }

    fn send(&mut self, id: NodeId, msg: ClientMessage) {
        self.c(id).send(msg);
    }

    /// The `kind` track `publisher` published, as `viewer` had it announced.
    fn track(&mut self, viewer: NodeId, publisher: NodeId, kind: TrackKind) -> TrackInfo {
        let pid = self.pid(publisher);
        let found = self.net.run_until_cond(T, |net| {
            net.node_ref::<Client>(viewer)
                .announced_tracks()
                .iter()
                .any(|t| t.participant_id == pid && t.kind == kind)
        });
        assert!(found.is_some(), "{kind:?} track announced to the viewer");
        self.c(viewer)
            .announced_tracks()
            .into_iter()
            .find(|t| t.participant_id == pid && t.kind == kind)
            .unwrap()
    }

    fn rx(&mut self, viewer: NodeId, track: &str) -> RxTrack {
        common::rx(&self.net, viewer, track)
    }

    /// Run until `viewer` receives layer `layer` of `track`; the time it took.
    fn wait_layer(&mut self, viewer: NodeId, track: &str, layer: u8) -> Option<Duration> {
        common::wait_layer(&mut self.net, viewer, track, layer, T)
    }

    /// Run until every viewer in `ids` has received at least `n` packets of `track`.
    fn wait_packets(&mut self, ids: &[NodeId], track: &str, n: usize) {
        let took = self.net.run_until_cond(T, |net| {
            ids.iter().all(|&id| {
                net.node_ref::<Client>(id)
                    .subscriber
                    .tracks
                    .get(track)
                    .is_some_and(|t| t.packets.len() >= n)
            })
        });
        assert!(took.is_some(), "{n} packets of {track} for every viewer");
    }

    /// RTP packets the publisher `id` has sent (audio and every video layer).
    fn sent(&mut self, id: NodeId) -> u64 {
        let p = self.c(id).publisher.as_ref().expect("publishes");
        p.audio_packets_sent()
            + p.video_layers()
                .iter()
                .map(|l| l.stats.packets)
                .sum::<u64>()
    }

    /// Packets the viewer `id` has received on every track.
    fn received(&mut self, id: NodeId) -> u64 {
        self.c(id)
            .subscriber
            .tracks
            .values()
            .map(|t| t.packets.len() as u64)
            .sum()
    }

    /// The link from client `id`'s shard to it.
    fn downlink(&mut self, id: NodeId) -> &mut LinkConfig {
        let shard = self.shard_of(id);
        let node = self.shards[shard];
        self.net.link_mut(node, id)
    }

    fn count(&mut self, id: NodeId, f: impl Fn(&ServerMessage) -> bool) -> usize {
        self.c(id).count_messages(f)
    }

    /// Whether each of the publisher's video layers is active (not paused by dynacast).
    fn active_layers(&mut self, publisher: NodeId) -> Vec<bool> {
        let p = self.c(publisher).publisher.as_ref().expect("publishes");
        p.video_layers().iter().map(|l| l.active).collect()
    }

    fn no_errors(&mut self, ids: &[NodeId]) {
        for &id in ids {
            let c = self.c(id);
            assert!(c.errors.is_empty(), "{}: {:?}", c.name, c.errors);
            let sub = &c.subscriber.errors;
            assert!(sub.is_empty(), "{} subscriber: {sub:?}", c.name);
            if let Some(p) = c.publisher.as_ref() {
                assert!(p.errors.is_empty(), "{} publisher: {:?}", c.name, p.errors);
            }
        }
    }
}

/// A simulcast publisher on shard 0 and viewers on every shard: each viewer receives audio
/// and a clean video stream; the publisher's shard hands each packet to the pipe once per
/// other shard with subscribers (not once per viewer there, and not at all to a shard that
/// hosts the room without subscribers), and each shard forwards to its own viewers.
#[test]
fn each_packet_crosses_once_per_shard_with_subscribers() {
    let wall = Instant::now();
    let mut s = Sim::new(21, 3, 2);
    let alice = s.join(1, "alice", MediaSpec::simulcast());
    let bob = s.join(2, "bob", MediaSpec::none());
    let carol = s.join(3, "carol", MediaSpec::none());
    // On shard 2 without subscribing to anything.
    let dave = s.join_with(4, "dave", MediaSpec::none(), Client::without_auto_subscribe);
    let erin = s.join(5, "erin", MediaSpec::none());
    let placed: Vec<usize> = [alice, bob, carol, dave, erin]
        .iter()
        .map(|&id| s.shard_of(id))
        .collect();
    assert_eq!(placed, [0, 0, 1, 2, 1], "the placement spreads the room");
    let video = s.track(carol, alice, TrackKind::Video);
    let audio = s.track(carol, alice, TrackKind::Audio);
    for v in [bob, carol, erin] {
        assert!(s.wait_layer(v, &video.id, 2).is_some(), "{v} on f");
    }
    // Past the first connection-quality rating (2 s in), which every shard of the room gets.
    s.net.run_for(Duration::from_secs(2));

    // One shard (1) with two subscribers, one (2) hosting the room without any.
    let (piped0, sent0) = (s.stats(0).rtp_packets_piped, s.sent(alice));
    let fwd1 = s.stats(1).rtp_packets_forwarded;
    let rx1 = s.received(carol) + s.received(erin);
    let to2 = s.net.pipe_stats(0, 2).msgs_delivered;
    s.net.run_for(Duration::from_secs(5));
    let piped = s.stats(0).rtp_packets_piped - piped0;
    let sent = s.sent(alice) - sent0;
    let fwd = s.stats(1).rtp_packets_forwarded - fwd1;
    let rx = s.received(carol) + s.received(erin) - rx1;
    println!(
        "5 s: alice sent {sent}, shard 0 piped {piped}; shard 1 forwarded {fwd}, its viewers got {rx}"
    );
    assert!(sent > 1000, "alice sent {sent}");
    // Packets in flight on alice's uplink at either end of the window: a few.
    assert!(
        piped.abs_diff(sent) <= 20,
        "each packet once to the one shard with subscribers: piped {piped}, sent {sent}"
    );
    assert!(
        fwd.abs_diff(rx) <= 20,
        "shard 1 forwards to its own viewers: {fwd} vs {rx}"
    );
    assert!(rx > sent / 2, "two viewers on f and audio: {rx}");
    assert_eq!(
        s.net.pipe_stats(0, 2).msgs_delivered,
        to2,
        "nothing piped to a shard without subscribers"
    );
    assert_eq!(s.stats(2).rtp_packets_forwarded, 0);

    // dave subscribes: now two shards have subscribers, each packet crosses twice.
    s.send(
        dave,
        ClientMessage::Subscribe {
            track_ids: vec![video.id.clone(), audio.id.clone()],
            subscribe: true,
        },
    );
    assert!(s.wait_layer(dave, &video.id, 2).is_some(), "dave on f");
    s.net.run_for(Duration::from_secs(1));
    let (piped0, sent0) = (s.stats(0).rtp_packets_piped, s.sent(alice));
    s.net.run_for(Duration::from_secs(3));
    let piped = s.stats(0).rtp_packets_piped - piped0;
    let sent = s.sent(alice) - sent0;
    assert!(
        piped.abs_diff(2 * sent) <= 40,
        "once to each of two shards: piped {piped}, sent {sent}"
    );
    for v in [bob, carol, dave, erin] {
        let a = s.rx(v, &audio.id);
        assert!(a.packets.len() > 100, "{v} audio: {}", a.packets.len());
        assert_clean_stream(&s.rx(v, &video.id), &SIZES);
    }
    s.no_errors(&[alice, bob, carol, dave, erin]);
    let st = s.stats(1);
    assert_eq!(st.pipe_msgs_dropped, 0);
    println!(
        "shards fan-out: {:.0} ms wall for {:.1} s virtual",
        ms(wall.elapsed()),
        s.net.elapsed().as_secs_f64()
    );
}

/// Layer selection on the remote shard: one remote viewer's downlink cut to 400 kbit/s makes
/// it alone go down to `q`, at a keyframe, with continuous sequence numbers; the other
/// viewers (on both shards) stay on `f`; lifting the cut brings it back up.
/// The publisher's shard hands each packet to the other shards before it sends its own
/// copies: their fan-outs (each shard on its own core) run beside its own instead of after it.
#[test]
fn a_packet_goes_to_the_other_shards_before_the_local_copies() {
    let mut s = Sim::new(22, 2, 2);
    let audio_only = MediaSpec {
        audio: true,
        ..MediaSpec::none()
    };
    // Audio: one packet per 20 ms, so each turn of alice's shard holds one packet.
    let alice = s.join(1, "alice", audio_only);
    let bob = s.join(2, "bob", MediaSpec::none());
    let carol = s.join(3, "carol", MediaSpec::none());
    let placed: Vec<usize> = [alice, bob, carol]
        .iter()
        .map(|&id| s.shard_of(id))
        .collect();
    assert_eq!(
        placed,
        [0, 0, 1],
        "bob beside alice, carol on the other shard"
    );
    let audio = s.track(carol, alice, TrackKind::Audio);
    s.wait_packets(&[bob, carol], &audio.id, 20);
    let shard0 = s.shards[0];
    let counts = |s: &mut Sim| {
        let tx = s.net.node::<SfuNode>(shard0).sfu.transmit();
        (tx.rtp_handoffs, tx.rtp_handoffs_after_copies)
    };
    let (handoffs0, late0) = counts(&mut s);
    let (bob0, carol0) = (s.received(bob), s.received(carol));
    s.net.run_for(Duration::from_secs(2));
    let (handoffs, late) = counts(&mut s);
    let (handoffs, late) = (handoffs - handoffs0, late - late0);
    let (bob_rx, carol_rx) = (s.received(bob) - bob0, s.received(carol) - carol0);
    assert!(
        bob_rx >= 90 && carol_rx >= 90,
        "2 s of audio to both shards' viewers: bob {bob_rx}, carol {carol_rx}"
    );
    assert!(handoffs >= 90, "each packet handed over: {handoffs}");
    assert_eq!(
        late, 0,
        "{late} of {handoffs} packets were handed over after shard 0 sent bob's copy"
    );
}

#[test]
fn a_remote_viewer_alone_goes_down_a_layer_and_back() {
    let mut s = Sim::new(22, 2, 2);
    let alice = s.join(1, "alice", MediaSpec::simulcast());
    let bob = s.join(2, "bob", MediaSpec::none());
    let carol = s.join(3, "carol", MediaSpec::none());
    let dave = s.join(4, "dave", MediaSpec::none());
    assert_eq!((s.shard_of(carol), s.shard_of(dave)), (1, 1));
    let video = s.track(carol, alice, TrackKind::Video);
    // The remote viewers' first keyframe request makes an extra keyframe of f early on,
    // which the start-up estimates do not cover: every viewer spends ~3 s on h first.
    s.net.run_for(Duration::from_secs(5));
    for v in [bob, carol, dave] {
        assert!(s.wait_layer(v, &video.id, 2).is_some(), "{v} on f");
    }
    s.net.run_for(Duration::from_secs(2));
    *s.downlink(carol) = LinkConfig {
        rate_bps: Some(400_000),
        queue_bytes: 30_000,
        ..LinkConfig::default()
    };
    let cut = s.net.now();
    let track = video.id.clone();
    let down = s.net.run_until_cond(Duration::from_secs(4), |net| {
        net.node_ref::<Client>(carol)
            .subscriber
            .tracks
            .get(&track)
            .and_then(|t| t.current_layer())
            .is_some_and(|l| l < 2)
    });
    let down = down.expect("carol goes down within 4 s of a 400 kbit/s cut");
    s.net.run_for(Duration::from_secs(5));
    assert_eq!(
        s.rx(carol, &video.id).current_layer(),
        Some(0),
        "only q fits"
    );
    for v in [bob, dave] {
        let layers: Vec<u8> = s
            .rx(v, &video.id)
            .since(cut)
            .filter_map(|p| p.vp8.and_then(|v| v.layer))
            .collect();
        let not_f = layers.iter().filter(|&&l| l != 2).count();
        assert!(
            layers.len() > 500 && not_f == 0,
            "{v} stays on f: {} packets, {not_f} of another layer",
            layers.len()
        );
    }
    *s.downlink(carol) = LinkConfig::default();
    let up = s
        .wait_layer(carol, &video.id, 2)
        .expect("back on f after the lift");
    s.net.run_for(Duration::from_secs(1));
    // A rate-limited link drops what NACK then mostly repairs; the switches themselves keep
    // one stream: each at a keyframe of the new layer, numbered right after the last packet
    // of the old one (checked where the link lost neither).
    let (whole, switches, missing) = assert_clean_switches(&s.rx(carol, &video.id));
    assert!(switches >= 2, "down and up: {switches}");
    assert!(whole >= 1, "at least the switch up arrived whole: {whole}");
    for v in [bob, dave] {
        assert_clean_stream(&s.rx(v, &video.id), &SIZES);
    }
    s.no_errors(&[alice, bob, carol, dave]);
    println!(
        "remote viewer: down {:.0} ms after the cut, up {:.0} ms after the lift; {switches} switches ({whole} seen whole), {missing} packets never repaired",
        ms(down),
        ms(up)
    );
}

/// One SSRC; sequence numbers lost on the way (never repaired) under 10 %; and every layer
/// switch whose packets arrived (the one before it too) at a keyframe of the new layer, of
/// its size, numbered right after the old layer's last packet. Returns (switches seen
/// whole, switches, missing).
fn assert_clean_switches(t: &RxTrack) -> (usize, usize, u64) {
    assert_eq!(t.ssrcs().len(), 1, "one SSRC on the down-track");
    // In sequence order (NACK retransmissions arrive late).
    let seqs = unwrap_seqs(t.packets.iter());
    let mut by_seq: Vec<(u64, &plaza::sim::RxPacket)> =
        seqs.iter().copied().zip(&t.packets).collect();
    by_seq.sort_by_key(|(s, _)| *s);
    by_seq.dedup_by_key(|(s, _)| *s);
    let (mut whole, mut switches) = (0, 0);
    let mut prev: Option<(u8, u64)> = None;
    for &(seq, p) in &by_seq {
        let v = p.vp8.expect("vp8");
        let layer = v.layer.expect("layer tag");
        if let Some((pl, pseq)) = prev {
            if layer != pl {
                switches += 1;
                // A gap right before: the switch's first packets were lost on the link.
                if pseq + 1 == seq {
                    assert!(
                        v.keyframe && v.frame_start,
                        "switch not at a keyframe: seq {seq}"
                    );
                    assert_eq!(v.size, Some(SIZES[usize::from(layer)]));
                    whole += 1;
                }
            }
        }
        prev = Some((layer, seq));
    }
    let span = by_seq.last().unwrap().0 - by_seq[0].0 + 1;
    // Probe padding takes sequence numbers of the stream too.
    let mut all = unwrap_seqs(t.packets.iter().chain(&t.padding));
    all.sort_unstable();
    all.dedup();
    let missing = span - all.len() as u64;
    // The same cut on one shard leaves about as many (≈ 6 %): what the NACK budget does
    // not repair on a saturated link, not something the pipe loses.
    assert!(missing * 10 < span, "{missing} of {span} missing");
    (whole, switches, missing)
}

/// Dynacast across shards: the publisher's shard pauses a layer only when no viewer on any
/// shard needs it, and resumes it when a viewer on the other shard asks for it again.
#[test]
fn dynacast_counts_the_viewers_of_every_shard() {
    let mut s = Sim::new(23, 2, 2);
    let alice = s.join(1, "alice", MediaSpec::simulcast());
    let bob = s.join(2, "bob", MediaSpec::none());
    let carol = s.join(3, "carol", MediaSpec::none());
    assert_eq!(s.shard_of(carol), 1);
    let video = s.track(carol, alice, TrackKind::Video);
    s.send(bob, settings(&video.id, Quality::Low));
    s.send(carol, settings(&video.id, Quality::High));
    assert!(s.wait_layer(carol, &video.id, 2).is_some(), "carol on f");
    // Past the grace period: h is needed by nobody, f only by carol on the other shard.
    let paused = s.net.run_until_cond(T, |net| {
        let p = net.node_ref::<Client>(alice).publisher.as_ref().unwrap();
        !p.video_layers()[1].active
    });
    assert!(paused.is_some(), "h (nobody's) is paused");
    s.net.run_for(Duration::from_secs(8));
    assert_eq!(
        s.active_layers(alice),
        [true, false, true],
        "f stays active for the remote viewer"
    );
    assert_eq!(s.rx(carol, &video.id).current_layer(), Some(2));

    // carol wants q too: now nobody anywhere needs f.
    s.send(carol, settings(&video.id, Quality::Low));
    let paused = s.net.run_until_cond(T, |net| {
        let p = net.node_ref::<Client>(alice).publisher.as_ref().unwrap();
        !p.video_layers()[2].active
    });
    let paused = paused.expect("f paused once no shard needs it");
    let f_sent = s.c(alice).publisher.as_ref().unwrap().video_layers()[2]
        .stats
        .packets;
    s.net.run_for(Duration::from_secs(3));
    assert_eq!(
        s.c(alice).publisher.as_ref().unwrap().video_layers()[2]
            .stats
            .packets,
        f_sent,
        "f sends nothing while paused"
    );
    assert_eq!(s.active_layers(alice), [true, false, false]);

    // The remote viewer asks for f again.
    s.send(carol, settings(&video.id, Quality::High));
    let resumed = s
        .wait_layer(carol, &video.id, 2)
        .expect("f resumed for the remote viewer");
    assert!(s.active_layers(alice)[2]);
    assert_clean_stream(&s.rx(carol, &video.id), &SIZES);
    s.no_errors(&[alice, bob, carol]);
    println!(
        "dynacast across shards: f paused {:.0} ms after the last remote need, delivered {:.0} ms after it came back",
        ms(paused),
        ms(resumed)
    );
}

/// Keyframe requests from the other shard reach the publisher: a remote viewer's PLI gets a
/// keyframe within a few round trips, a burst of PLIs gets few keyframes (throttled), and a
/// new remote viewer's video starts with a keyframe made for it.
#[test]
fn remote_keyframe_requests_reach_the_publisher_throttled() {
    let mut s = Sim::new(24, 2, 2);
    // No periodic keyframes: every keyframe is one somebody asked for.
    let alice = s.join(1, "alice", MediaSpec::audio_video());
    let bob = s.join(2, "bob", MediaSpec::none());
    let carol = s.join(3, "carol", MediaSpec::none());
    assert_eq!(s.shard_of(carol), 1);
    let video = s.track(carol, alice, TrackKind::Video);
    s.wait_packets(&[bob, carol], &video.id, 60);
    s.net.run_for(Duration::from_secs(2));
    let keyframes = |s: &mut Sim| {
        s.c(alice).publisher.as_ref().unwrap().video_layers()[0]
            .stats
            .keyframes
    };
    let plis = |s: &mut Sim| {
        s.c(alice)
            .publisher
            .as_ref()
            .unwrap()
            .rtcp_count(|r| matches!(r, RtcpIn::Pli { .. }))
    };
    let (k0, p0) = (keyframes(&mut s), plis(&mut s));
    let t0 = s.net.now();
    let now = s.net.now();
    s.c(carol).subscriber.send_pli(now, &video.id).unwrap();
    let track = video.id.clone();
    let got = s.net.run_until_cond(Duration::from_secs(2), |net| {
        net.node_ref::<Client>(carol)
            .subscriber
            .tracks
            .get(&track)
            .is_some_and(|t| t.since(t0).any(|p| p.vp8.is_some_and(|v| v.keyframe)))
    });
    let got = got.expect("a keyframe for the remote viewer's PLI");
    assert!(got < Duration::from_millis(200), "keyframe after {got:?}");
    assert_eq!(plis(&mut s), p0 + 1, "the PLI reached the publisher");
    assert_eq!(keyframes(&mut s), k0 + 1);

    // A burst: a PLI every 20 ms for 2 s. The publisher gets at most one per 300 ms (the
    // layer's keyframe throttle, as for a viewer on its own shard).
    s.net.run_for(Duration::from_secs(1));
    let (k1, p1) = (keyframes(&mut s), plis(&mut s));
    let start = s.net.now();
    let mut at = Vec::new();
    for _ in 0..100 {
        let now = s.net.now();
        s.c(carol).subscriber.send_pli(now, &video.id).unwrap();
        for _ in 0..20 {
            s.net.run_for(Duration::from_millis(1));
            if plis(&mut s) > p1 + at.len() {
                at.push(s.net.now() - start);
            }
        }
    }
    let k = keyframes(&mut s) - k1;
    println!(
        "100 remote PLIs in 2 s: {} reached the publisher (at {:?} ms), {k} keyframes",
        at.len(),
        at.iter().map(|d| d.as_millis()).collect::<Vec<_>>()
    );
    assert!((5..=7).contains(&at.len()), "throttled: {at:?}");
    assert!(
        at.windows(2)
            .all(|w| w[1] - w[0] >= Duration::from_millis(290)),
        "at most one PLI per 300 ms: {at:?}"
    );
    assert!(
        k <= at.len() as u64 && k + 1 >= at.len() as u64,
        "{k} keyframes"
    );

    // A new remote viewer: its video starts with a keyframe, soon after it connects.
    s.net.run_for(Duration::from_secs(2));
    let k2 = keyframes(&mut s);
    let dave = s.join(4, "dave", MediaSpec::none());
    assert_eq!(s.shard_of(dave), 1);
    let connected = s.net.run_until_cond(T, |net| {
        net.node_ref::<Client>(dave).subscriber.is_connected()
    });
    assert!(connected.is_some());
    let at = s.net.now();
    s.wait_packets(&[dave], &video.id, 1);
    let first = s.rx(dave, &video.id).packets[0].clone();
    assert!(
        first.vp8.is_some_and(|v| v.keyframe && v.frame_start),
        "the new remote viewer's video starts with a keyframe"
    );
    assert!(
        first.at - at < Duration::from_millis(300),
        "first keyframe {:?} after connecting",
        first.at - at
    );
    assert!(keyframes(&mut s) > k2, "made for the new viewer");
    s.no_errors(&[alice, bob, carol, dave]);
}

fn is_left(pid: &str) -> impl Fn(&ServerMessage) -> bool + '_ {
    move |m| matches!(m, ServerMessage::ParticipantLeft { participant_id, .. } if participant_id == pid)
}

/// `participant_left` of `pid` for `why` (relayed across shards with its reason).
fn left_for(pid: &str, why: LeaveReason) -> impl Fn(&ServerMessage) -> bool + '_ {
    move |m| matches!(m, ServerMessage::ParticipantLeft { participant_id, reason } if participant_id == pid && *reason == why)
}

fn is_unpublished(pid: &str) -> impl Fn(&ServerMessage) -> bool + '_ {
    move |m| matches!(m, ServerMessage::TrackUnpublished { participant_id, .. } if participant_id == pid)
}

fn is_muted<'a>(track: &'a str, muted: bool) -> impl Fn(&ServerMessage) -> bool + 'a {
    move |m| matches!(m, ServerMessage::TrackMuted { track_id, muted: mu, .. } if track_id == track && *mu == muted)
}

/// How often `viewer` learned of participant `pid` (in `joined` or `participant_joined`).
fn times_announced(s: &mut Sim, viewer: NodeId, pid: &str) -> usize {
    let c = s.c(viewer);
    let in_joined = match &c.joined {
        Some(ServerMessage::Joined { participants, .. }) => {
            participants.iter().filter(|p| p.id == pid).count()
        }
        _ => 0,
    };
    in_joined
        + c.count_messages(|m| matches!(m, ServerMessage::ParticipantJoined { participant } if participant.id == pid))
}

/// What `id` received on `label` from `from`.
fn data_from(s: &mut Sim, id: NodeId, label: &str, from: &str) -> Vec<DataIn> {
    s.c(id)
        .data_received()
        .into_iter()
        .filter(|d| d.label == label && d.from.as_deref() == Some(from))
        .collect()
}

/// Membership, tracks, mutes and data across shards, each exactly once: everyone learns of
/// everyone and of every track; media flows both ways over the pipe; a mute on the
/// publisher's shard reaches the remote viewers and stops their media, the unmute resumes it
/// at a keyframe; chat (broadcast and targeted) crosses once per receiver; a remote leave is
/// seen everywhere.
#[test]
fn members_tracks_mutes_and_data_cross_shards_once() {
    let mut s = Sim::new(25, 2, 2);
    let alice = s.join(1, "alice", MediaSpec::audio_video());
    let bob = s.join(2, "bob", MediaSpec::none());
    let carol = s.join(3, "carol", MediaSpec::audio_video());
    let dave = s.join(4, "dave", MediaSpec::none());
    let all = [alice, bob, carol, dave];
    let placed: Vec<usize> = all.iter().map(|&id| s.shard_of(id)).collect();
    assert_eq!(placed, [0, 0, 1, 1]);
    let pids: Vec<String> = all.iter().map(|&id| s.pid(id)).collect();
    let open = s.net.run_until_cond(T, |net| {
        all.iter()
            .all(|&id| net.node_ref::<Client>(id).channels_open())
    });
    assert!(open.is_some(), "data channels open");
    let a_video = s.track(dave, alice, TrackKind::Video);
    let c_video = s.track(bob, carol, TrackKind::Video);
    s.wait_packets(&[bob, carol, dave], &a_video.id, 60);
    s.wait_packets(&[alice, bob, dave], &c_video.id, 60);
    s.net.run_for(Duration::from_secs(1));

    // Everyone knows everyone else once, and each of alice's and carol's tracks once.
    for (i, &v) in all.iter().enumerate() {
        for (j, pid) in pids.iter().enumerate() {
            if i != j {
                assert_eq!(times_announced(&mut s, v, pid), 1, "{i} learned of {j}");
            }
        }
        for (j, publisher) in [(0, alice), (2, carol)] {
            if i == j {
                continue;
            }
            let ppid = pids[j].clone();
            let tracks: Vec<TrackInfo> = s
                .c(v)
                .announced_tracks()
                .into_iter()
                .filter(|t| t.participant_id == ppid)
                .collect();
            assert_eq!(tracks.len(), 2, "{i} learned of {j}'s two tracks once");
            let _ = publisher;
        }
    }

    // alice (shard 0) mutes her video: the remote viewers are told once, their media stops.
    s.send(
        alice,
        ClientMessage::Mute {
            track_id: a_video.id.clone(),
            muted: true,
        },
    );
    let id = a_video.id.clone();
    let told = s.net.run_until_cond(T, |net| {
        [bob, carol, dave].iter().all(|&v| {
            net.node_ref::<Client>(v)
                .count_messages(is_muted(&id, true))
                == 1
        })
    });
    assert!(told.is_some(), "track_muted reaches both shards");
    s.net.run_for(Duration::from_millis(200));
    let before: Vec<usize> = [carol, dave]
        .iter()
        .map(|&v| s.rx(v, &a_video.id).packets.len())
        .collect();
    let sent_before = s.sent(alice);
    s.net.run_for(Duration::from_secs(2));
    assert!(s.sent(alice) > sent_before + 100, "alice keeps sending");
    for (k, &v) in [carol, dave].iter().enumerate() {
        assert_eq!(
            s.rx(v, &a_video.id).packets.len(),
            before[k],
            "muted video still reaches {v}"
        );
    }
    s.send(
        alice,
        ClientMessage::Mute {
            track_id: a_video.id.clone(),
            muted: false,
        },
    );
    let resumed = s.net.run_until_cond(T, |net| {
        [carol, dave].iter().enumerate().all(|(k, &v)| {
            net.node_ref::<Client>(v)
                .subscriber
                .tracks
                .get(&id)
                .is_some_and(|t| t.packets.len() > before[k])
        })
    });
    assert!(
        resumed.is_some(),
        "unmuted video resumes on the remote shard"
    );
    for (k, &v) in [carol, dave].iter().enumerate() {
        let first = s.rx(v, &a_video.id).packets[before[k]].vp8.unwrap();
        assert!(
            first.keyframe && first.frame_start,
            "{v} resumes at a keyframe"
        );
        assert_eq!(s.count(v, is_muted(&a_video.id, false)), 1);
        assert_eq!(s.count(v, is_muted(&a_video.id, true)), 1);
    }

    // Chat: bob to everyone, then dave to alice and carol only.
    s.c(bob)
        .send_data("chat", true, envelope(&[], b"hello from bob"));
    let to = [pids[0].as_str(), pids[2].as_str()];
    s.c(dave)
        .send_data("chat", true, envelope(&to, b"psst from dave"));
    s.net.run_for(Duration::from_secs(1));
    for (k, &v) in all.iter().enumerate() {
        let from_bob = data_from(&mut s, v, "chat", &pids[1]);
        let from_dave = data_from(&mut s, v, "chat", &pids[3]);
        let want_bob = usize::from(v != bob);
        let want_dave = usize::from(v == alice || v == carol);
        assert_eq!(from_bob.len(), want_bob, "{k}: bob's broadcast");
        assert_eq!(from_dave.len(), want_dave, "{k}: dave's targeted message");
        if want_bob == 1 {
            assert_eq!(from_bob[0].payload, b"hello from bob");
        }
        if want_dave == 1 {
            assert_eq!(from_dave[0].payload, b"psst from dave");
        }
    }

    // carol (shard 1, publishing) leaves: both shards see her and her tracks go, once.
    let c_pid = pids[2].clone();
    s.send(carol, ClientMessage::Leave);
    let gone = s.net.run_until_cond(T, |net| {
        [alice, bob, dave].iter().all(|&v| {
            let c = net.node_ref::<Client>(v);
            c.count_messages(is_left(&c_pid)) == 1 && c.count_messages(is_unpublished(&c_pid)) == 2
        })
    });
    assert!(gone.is_some(), "carol's departure seen on both shards");
    s.net.run_for(Duration::from_millis(300));
    let b = s.rx(bob, &c_video.id).packets.len();
    let a = s.rx(dave, &a_video.id).packets.len();
    s.net.run_for(Duration::from_secs(1));
    for &v in &[alice, bob, dave] {
        assert_eq!(s.count(v, left_for(&c_pid, LeaveReason::Left)), 1);
        assert_eq!(s.count(v, is_unpublished(&c_pid)), 2);
    }
    assert_eq!(
        s.rx(bob, &c_video.id).packets.len(),
        b,
        "carol's video stopped"
    );
    assert!(
        s.rx(dave, &a_video.id).packets.len() > a + 20,
        "alice's goes on"
    );
    assert_eq!(s.net.placement().load(), &[2, 1]);
    s.no_errors(&[alice, bob, dave]);
}

/// The room closes on one shard (all its participants there leave) while the other keeps
/// it: the relays stop (`rtp_packets_piped` stops growing), the remaining members see the
/// departures, and a later join that spreads to that shard again gets the media again. Then
/// the publisher's shard empties: the last viewer sees the publisher and its tracks go, and
/// nothing crosses the pipe any more.
#[test]
fn a_shard_that_empties_stops_the_relays() {
    let mut s = Sim::new(26, 2, 2);
    let alice = s.join(1, "alice", MediaSpec::simulcast());
    let bob = s.join(2, "bob", MediaSpec::none());
    let carol = s.join(3, "carol", MediaSpec::none());
    let dave = s.join(4, "dave", MediaSpec::none());
    assert_eq!((s.shard_of(carol), s.shard_of(dave)), (1, 1));
    let video = s.track(carol, alice, TrackKind::Video);
    s.wait_packets(&[bob, carol, dave], &video.id, 100);
    let (cp, dp) = (s.pid(carol), s.pid(dave));
    s.send(carol, ClientMessage::Leave);
    s.send(dave, ClientMessage::Leave);
    let gone = s.net.run_until_cond(T, |net| {
        [alice, bob].iter().all(|&v| {
            let c = net.node_ref::<Client>(v);
            c.count_messages(is_left(&cp)) == 1 && c.count_messages(is_left(&dp)) == 1
        })
    });
    assert!(gone.is_some(), "alice and bob see carol and dave leave");
    s.net.run_for(Duration::from_millis(500));
    let st1 = s.stats(1);
    assert_eq!(
        (st1.rooms, st1.participants),
        (0, 0),
        "shard 1 closed the room"
    );
    assert_eq!(s.net.placement().room_shards(ROOM), vec![0]);
    let piped = s.stats(0).rtp_packets_piped;
    let msgs = s.net.pipe_stats(0, 1).msgs_delivered;
    let b = s.rx(bob, &video.id).packets.len();
    s.net.run_for(Duration::from_secs(3));
    assert_eq!(s.stats(0).rtp_packets_piped, piped, "no stale relay");
    assert_eq!(
        s.net.pipe_stats(0, 1).msgs_delivered,
        msgs,
        "nothing crosses to the empty shard"
    );
    assert!(
        s.rx(bob, &video.id).packets.len() > b + 300,
        "bob still gets f"
    );
    for v in [alice, bob] {
        assert_eq!(s.count(v, is_left(&cp)), 1);
        assert_eq!(s.count(v, is_left(&dp)), 1);
    }

    // A join spreads to shard 1 again: the room reopens there and the relay resumes.
    let erin = s.join(5, "erin", MediaSpec::none());
    assert_eq!(s.shard_of(erin), 1);
    let erin_video = s.track(erin, alice, TrackKind::Video);
    assert_eq!(erin_video.id, video.id);
    s.wait_packets(&[erin], &video.id, 100);
    assert_clean_stream(&s.rx(erin, &video.id), &SIZES);
    assert!(s.stats(0).rtp_packets_piped > piped, "relayed again");
    let ap = s.pid(alice);
    assert_eq!(
        times_announced(&mut s, erin, &ap),
        1,
        "erin learns of alice once"
    );

    // Now the publisher's shard empties: erin sees both leave and alice's tracks go.
    let bp = s.pid(bob);
    s.send(alice, ClientMessage::Leave);
    s.send(bob, ClientMessage::Leave);
    let gone = s.net.run_until_cond(T, |net| {
        let c = net.node_ref::<Client>(erin);
        c.count_messages(is_left(&ap)) == 1
            && c.count_messages(is_left(&bp)) == 1
            && c.count_messages(is_unpublished(&ap)) == 2
    });
    assert!(gone.is_some(), "erin sees alice, her tracks and bob go");
    s.net.run_for(Duration::from_millis(500));
    // Shard 0 is the room's home: it holds the room (its timeline) while shard 1 hosts it.
    let st0 = s.stats(0);
    assert_eq!((st0.rooms, st0.participants), (1, 0));
    let (m01, m10) = (
        s.net.pipe_stats(0, 1).msgs_delivered,
        s.net.pipe_stats(1, 0).msgs_delivered,
    );
    let e = s.rx(erin, &video.id).packets.len();
    s.net.run_for(Duration::from_secs(2));
    assert_eq!(
        s.rx(erin, &video.id).packets.len(),
        e,
        "alice's video stopped"
    );
    // (Shard 1 still tells the home, which holds the room, of its participants' connection
    // quality; nothing comes back.)
    assert_eq!(
        s.net.pipe_stats(0, 1).msgs_delivered,
        m01,
        "the pipe is quiet"
    );
    assert!(s.net.pipe_stats(1, 0).msgs_delivered <= m10 + 4);
    let st1 = s.stats(1);
    assert_eq!((st1.participants, st1.published_tracks), (1, 0));
    s.no_errors(&[erin]);

    // Erin's chat still goes through the home; once she leaves the home lets the room go.
    s.net
        .run_until_cond(T, |net| net.node_ref::<Client>(erin).channels_open());
    let seq0 = s.stats(0).data_messages_sequenced;
    s.c(erin).send_data("chat", true, envelope(&[], b"alone"));
    s.net.run_for(Duration::from_millis(200));
    assert_eq!(
        s.stats(0).data_messages_sequenced,
        seq0 + 1,
        "sequenced on the home"
    );
    s.send(erin, ClientMessage::Leave);
    s.net.run_for(Duration::from_millis(500));
    assert_eq!(s.stats(0).rooms, 0, "the home closed the room");
    assert_eq!(s.stats(1).rooms, 0);
}

/// A full pipe queue drops whole batches, counted by the network and in the sender's
/// `pipe_msgs_dropped`, and never blocks the sender (the viewer on its own shard is not
/// affected); once the queue drains, the remote viewer recovers: a keyframe, then a clean
/// stream.
#[test]
fn a_full_pipe_drops_batches_and_the_room_recovers() {
    let mut s = Sim::new(27, 2, 2);
    let alice = s.join(1, "alice", MediaSpec::audio_video());
    let bob = s.join(2, "bob", MediaSpec::none());
    let carol = s.join(3, "carol", MediaSpec::none());
    assert_eq!(s.shard_of(carol), 1);
    let video = s.track(carol, alice, TrackKind::Video);
    s.wait_packets(&[bob, carol], &video.id, 100);
    s.net.run_for(Duration::from_secs(1));
    // A slow receiving shard: each batch takes 5 ms to be taken, and the queue holds one.
    s.net.set_pipe(PipeConfig {
        delay: Duration::from_millis(5),
        capacity: Some(1),
    });
    let t_full = s.net.now();
    s.net.run_for(Duration::from_secs(2));
    let p01 = s.net.pipe_stats(0, 1);
    let p10 = s.net.pipe_stats(1, 0);
    println!("full pipe, 2 s: 0→1 {p01:?}, 1→0 {p10:?}");
    assert!(p01.batches_dropped > 20, "batches dropped: {p01:?}");
    assert!(p01.batches_delivered > 20, "and some delivered: {p01:?}");
    assert_eq!(
        s.stats(0).pipe_msgs_dropped,
        p01.msgs_dropped,
        "the sender counts what it lost"
    );
    assert_eq!(s.stats(1).pipe_msgs_dropped, p10.msgs_dropped);
    // The sender's own viewer is not affected.
    let bob_v = s.rx(bob, &video.id);
    let seqs = unwrap_seqs(bob_v.since(t_full));
    assert!(seqs.len() > 100);
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "bob's stream has no gap"
    );
    let carol_during = s.rx(carol, &video.id).since(t_full).count();

    s.net.set_pipe(PipeConfig::default());
    let lift = s.net.now();
    s.net.run_for(Duration::from_secs(1));
    // Media flows again at once; the gaps are NACKed, but the remote shard never had those
    // packets (see `a_gap_on_the_pipe_gets_a_keyframe`).
    let flowing = s.rx(carol, &video.id).since(lift).count();
    assert!(flowing > 40, "video flows after the lift: {flowing}");
    let st1 = s.stats(1);
    assert!(st1.nack_requested > 0, "carol NACKs the gaps");
    assert_eq!(st1.nack_resent, 0, "not repairable from the remote shard");
    // carol's decoder lost sync: its PLI crosses the pipe and a keyframe comes back.
    let t0 = s.net.now();
    s.c(carol).subscriber.send_pli(t0, &video.id).unwrap();
    let track = video.id.clone();
    let key = s.net.run_until_cond(Duration::from_secs(2), |net| {
        net.node_ref::<Client>(carol)
            .subscriber
            .tracks
            .get(&track)
            .is_some_and(|t| t.since(t0).any(|p| p.vp8.is_some_and(|v| v.keyframe)))
    });
    let key = key.expect("a keyframe for the remote viewer's PLI after the pipe drained");
    assert!(key < Duration::from_millis(200), "recovered after {key:?}");
    s.net.run_for(Duration::from_secs(3));
    println!(
        "full pipe: carol got {carol_during} video packets in 2 s of a full pipe, {flowing} in 1 s after; NACKed {} (resent {}), keyframe {:.0} ms after her PLI",
        st1.nack_requested,
        st1.nack_resent,
        ms(key)
    );
    let after: Vec<_> = s.rx(carol, &video.id).since(t0).cloned().collect();
    let k = after
        .iter()
        .position(|p| p.vp8.is_some_and(|v| v.keyframe))
        .unwrap();
    let seqs = unwrap_seqs(after[k..].iter());
    assert!(seqs.len() > 150, "video flows: {}", seqs.len());
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "a clean stream from the keyframe on"
    );
    assert_eq!(s.net.pipe_stats(0, 1).batches_dropped, p01.batches_dropped);
    s.no_errors(&[alice, bob, carol]);
}

/// A relayed packet lost on the pipe cannot be retransmitted by the remote shard (it never
/// had it), so the remote shard should ask the publisher's shard for a keyframe of that
/// layer (as it does for a refused NACK right after a switch), without waiting for the
/// viewer's decoder to give up and send a PLI.
#[test]
fn a_gap_on_the_pipe_gets_a_keyframe() {
    let mut s = Sim::new(29, 2, 2);
    let alice = s.join(1, "alice", MediaSpec::audio_video());
    let bob = s.join(2, "bob", MediaSpec::none());
    let carol = s.join(3, "carol", MediaSpec::none());
    let video = s.track(carol, alice, TrackKind::Video);
    s.wait_packets(&[bob, carol], &video.id, 100);
    s.net.run_for(Duration::from_secs(1));
    s.net.set_pipe(PipeConfig {
        delay: Duration::from_millis(5),
        capacity: Some(1),
    });
    s.net.run_for(Duration::from_millis(500));
    assert!(s.net.pipe_stats(0, 1).batches_dropped > 0);
    s.net.set_pipe(PipeConfig::default());
    let lift = s.net.now();
    let track = video.id.clone();
    let key = s.net.run_until_cond(Duration::from_secs(3), |net| {
        net.node_ref::<Client>(carol)
            .subscriber
            .tracks
            .get(&track)
            .is_some_and(|t| t.since(lift).any(|p| p.vp8.is_some_and(|v| v.keyframe)))
    });
    assert!(
        key.is_some_and(|k| k < Duration::from_secs(1)),
        "no keyframe within 1 s of the pipe losing packets: {key:?}"
    );
}

/// Same seed, same run: two runs of a spread room give the same remote viewer's stream and
/// the same pipe traffic.
#[test]
fn same_seed_same_run_across_shards() {
    let run = || {
        let mut s = Sim::new(28, 2, 2);
        let alice = s.join(1, "alice", MediaSpec::simulcast());
        let bob = s.join(2, "bob", MediaSpec::none());
        let carol = s.join(3, "carol", MediaSpec::none());
        let video = s.track(carol, alice, TrackKind::Video);
        let audio = s.track(carol, alice, TrackKind::Audio);
        s.net.run_for(Duration::from_secs(5));
        let t0 = s.net.start();
        let (v, a, b) = (
            s.rx(carol, &video.id),
            s.rx(carol, &audio.id),
            s.rx(bob, &video.id),
        );
        (
            digest(t0, &[&v, &a, &b]),
            s.net.pipe_stats(0, 1),
            s.net.pipe_stats(1, 0),
            v.packets.len(),
        )
    };
    let first = run();
    assert!(first.3 > 300, "carol got video: {}", first.3);
    assert!(first.1.msgs_delivered > 300);
    assert_eq!(run(), first, "same seed, same run");
}

/// The pipe drops whole batches when a shard's queue is full, control messages included:
/// a mute and a departure on the publisher's shard while the other shard's queue is full
/// are never told to that shard's participants (they keep seeing an unmuted track and a
/// participant who has left, for good). Control messages must survive a full queue (only
/// media may be dropped), or a lost batch must be detected and the room re-synchronised.
#[test]
fn control_messages_survive_a_full_pipe() {
    let mut s = Sim::new(30, 2, 2);
    let alice = s.join(1, "alice", MediaSpec::audio_video());
    let bob = s.join(2, "bob", MediaSpec::none());
    let carol = s.join(3, "carol", MediaSpec::none());
    assert_eq!(s.shard_of(carol), 1);
    let video = s.track(carol, alice, TrackKind::Video);
    s.wait_packets(&[bob, carol], &video.id, 60);
    let bp = s.pid(bob);
    // Shard 1's queue is full for 200 ms: alice mutes her video and bob leaves.
    s.net.set_pipe(PipeConfig {
        delay: PipeConfig::default().delay,
        capacity: Some(0),
    });
    s.send(
        alice,
        ClientMessage::Mute {
            track_id: video.id.clone(),
            muted: true,
        },
    );
    s.send(bob, ClientMessage::Leave);
    s.net.run_for(Duration::from_millis(200));
    assert!(s.net.pipe_stats(0, 1).batches_dropped > 0);
    s.net.set_pipe(PipeConfig::default());
    s.net.run_for(Duration::from_secs(3));
    let told = (
        s.count(carol, is_muted(&video.id, true)),
        s.count(carol, is_left(&bp)),
    );
    assert_eq!(told, (1, 1), "carol told of (the mute, bob's departure)");
}

/// A hidden participant (a recorder) on the other shard receives the room's media, and
/// nobody on either shard is told of it.
#[test]
fn a_hidden_participant_on_the_other_shard_is_not_seen() {
    let mut s = Sim::new(31, 2, 2);
    let alice = s.join(1, "alice", MediaSpec::audio_video());
    let bob = s.join(2, "bob", MediaSpec::none());
    let carol = s.join(3, "carol", MediaSpec::none());
    let rec = s.join_with(4, "recorder", MediaSpec::none(), |mut c| {
        c.join_with(|req| req.grants.hidden = true);
        c
    });
    assert_eq!((s.shard_of(carol), s.shard_of(rec)), (1, 1));
    let video = s.track(rec, alice, TrackKind::Video);
    s.wait_packets(&[bob, carol, rec], &video.id, 100);
    let rp = s.pid(rec);
    for v in [alice, bob, carol] {
        assert_eq!(
            times_announced(&mut s, v, &rp),
            0,
            "{v} told of the recorder"
        );
    }
    // And its departure is not announced either; the others are not disturbed.
    s.send(rec, ClientMessage::Leave);
    s.net.run_for(Duration::from_secs(1));
    for v in [alice, bob, carol] {
        assert_eq!(s.count(v, is_left(&rp)), 0);
    }
    s.no_errors(&[alice, bob, carol, rec]);
}

/// An identity is unique in the room across its shards: a second join with the same
/// identity that lands on the other shard replaces the first, as on one shard.
#[test]
fn an_identity_is_unique_across_shards() {
    let mut s = Sim::new(32, 2, 2);
    let with_identity = |mut c: Client| {
        c.join_with(|req| req.identity = Some("user-1".into()));
        c
    };
    let first = s.join_with(1, "alice", MediaSpec::audio_video(), with_identity);
    let bob = s.join(2, "bob", MediaSpec::none());
    let carol = s.join(3, "carol", MediaSpec::none());
    s.track(carol, first, TrackKind::Video);
    let first_shard = s.shard_of(first);
    // (Without the identity the room would send this join to the other, emptier shard.)
    let second = s.join_with(4, "alice again", MediaSpec::none(), with_identity);
    assert_eq!(
        s.shard_of(second),
        first_shard,
        "the identity rejoins where it is"
    );
    let fp = s.pid(first);
    s.net.run_for(Duration::from_secs(1));
    let replaced = s.c(first).messages.iter().any(
        |(_, m)| matches!(m, ServerMessage::Leave { reason } if reason.starts_with("replaced")),
    );
    let told: Vec<usize> = [bob, carol]
        .iter()
        .map(|&v| s.count(v, left_for(&fp, LeaveReason::Replaced)))
        .collect();
    assert!(replaced, "the first join is replaced");
    assert_eq!(told, [1, 1], "everyone is told the first one left");
    // The second join happened after the first was gone: it never saw it.
    let listed = match s.c(second).joined.clone() {
        Some(ServerMessage::Joined { participants, .. }) => participants,
        other => panic!("not joined: {other:?}"),
    };
    assert!(listed.iter().all(|p| p.id != fp), "{listed:?}");
    assert_eq!(s.count(second, is_left(&fp)), 0);
}

/// A room admin on one shard moderates participants on the other: its `mute` of a remote
/// publisher's track stops that track everywhere (and the publisher cannot undo it), its
/// `mute_chat` refuses the remote participant's chat, and its `remove_participant` removes
/// it; all of it over the pipe.
#[test]
fn a_room_admin_moderates_across_shards() {
    let mut s = Sim::new(34, 2, 2);
    let alice = s.join(1, "alice", MediaSpec::audio_video());
    let bob = s.join(2, "bob", MediaSpec::none());
    let carol = s.join(3, "carol", MediaSpec::none());
    let admin = s.join_with(4, "moderator", MediaSpec::none(), |mut c| {
        c.join_with(|req| req.grants.room_admin = true);
        c
    });
    let placed: Vec<usize> = [alice, bob, carol, admin]
        .iter()
        .map(|&id| s.shard_of(id))
        .collect();
    assert_eq!(placed, [0, 0, 1, 1]);
    let open = s.net.run_until_cond(T, |net| {
        [alice, bob, carol, admin]
            .iter()
            .all(|&id| net.node_ref::<Client>(id).channels_open())
    });
    assert!(open.is_some(), "data channels open");
    let video = s.track(carol, alice, TrackKind::Video);
    s.wait_packets(&[bob, carol], &video.id, 60);

    // The admin (shard 1) mutes alice's video (shard 0).
    s.send(
        admin,
        ClientMessage::Mute {
            track_id: video.id.clone(),
            muted: true,
        },
    );
    let id = video.id.clone();
    let by_admin = move |m: &ServerMessage| matches!(m, ServerMessage::TrackMuted { track_id, muted: true, by_admin: true, .. } if *track_id == id);
    let told = s.net.run_until_cond(T, |net| {
        [alice, bob, carol]
            .iter()
            .all(|&v| net.node_ref::<Client>(v).count_messages(&by_admin) == 1)
    });
    assert!(
        told.is_some(),
        "everyone, on both shards, is told of the admin's mute"
    );
    s.net.run_for(Duration::from_millis(200));
    let before = [
        s.rx(bob, &video.id).packets.len(),
        s.rx(carol, &video.id).packets.len(),
    ];
    // Alice cannot unmute it herself.
    s.send(
        alice,
        ClientMessage::Mute {
            track_id: video.id.clone(),
            muted: false,
        },
    );
    s.net.run_for(Duration::from_secs(2));
    assert_eq!(
        [
            s.rx(bob, &video.id).packets.len(),
            s.rx(carol, &video.id).packets.len()
        ],
        before,
        "the admin-muted video reaches nobody"
    );
    let refused = s.count(alice, |m| {
        matches!(m, ServerMessage::Error { code: ErrorCode::PermissionDenied, request, .. } if request.as_deref() == Some("mute"))
    });
    assert_eq!(refused, 1, "alice's unmute is refused");
    s.send(
        admin,
        ClientMessage::Mute {
            track_id: video.id.clone(),
            muted: false,
        },
    );
    let resumed = s.net.run_until_cond(T, |net| {
        net.node_ref::<Client>(carol)
            .subscriber
            .tracks
            .get(&video.id)
            .is_some_and(|t| t.packets.len() > before[1] + 20)
    });
    assert!(resumed.is_some(), "the admin's unmute brings it back");

    // The admin mutes bob's chat (shard 0): bob's chat is refused, his input goes through.
    let bob_pid = s.pid(bob);
    s.send(
        admin,
        ClientMessage::MuteChat {
            participant_id: bob_pid.clone(),
            muted: true,
        },
    );
    let muted = s.net.run_until_cond(T, |net| {
        net.node_ref::<Client>(bob).count_messages(|m| {
            matches!(m, ServerMessage::PermissionsChanged { permissions } if permissions.chat_muted)
        }) == 1
    });
    assert!(muted.is_some(), "bob is told his chat is muted");
    s.c(bob).send_data("chat", true, envelope(&[], b"spam"));
    s.c(bob).send_data("input", false, envelope(&[], b"move"));
    s.net.run_for(Duration::from_secs(1));
    for v in [alice, carol, admin] {
        assert!(data_from(&mut s, v, "chat", &bob_pid).is_empty());
        assert_eq!(data_from(&mut s, v, "input", &bob_pid).len(), 1);
    }
    let refused = s.count(bob, |m| {
        matches!(m, ServerMessage::Error { code: ErrorCode::PermissionDenied, request, .. } if request.as_deref() == Some("chat"))
    });
    assert_eq!(refused, 1, "bob is told his chat was not relayed");

    // And removes him.
    s.send(
        admin,
        ClientMessage::RemoveParticipant {
            participant_id: bob_pid.clone(),
            reason: Some("spam".into()),
        },
    );
    let gone = s.net.run_until_cond(T, |net| {
        [alice, carol, admin].iter().all(|&v| {
            net.node_ref::<Client>(v)
                .count_messages(left_for(&bob_pid, LeaveReason::Removed))
                == 1
        })
    });
    assert!(gone.is_some(), "bob's removal is seen on both shards");
    let told = s.count(bob, |m| {
        matches!(m, ServerMessage::Leave { reason } if reason == "removed by a room admin: spam")
    });
    assert_eq!(told, 1, "bob is told why");
    s.no_errors(&[carol, admin]);
}

/// A room spanning two shards has one timeline, sequenced on its home (the shard of its first
/// participant): participants on both shards send at the same instants and every receiver,
/// on either shard, gets the same seq for the same message, in seq order, with no seq used
/// twice; acks reach senders on the other shard; a participant on the other shard replays
/// history from the home; its events and input ticks cross the pipe too.
#[test]
fn a_room_on_two_shards_has_one_timeline() {
    use plaza::sim::envelope_seq;
    use std::collections::BTreeMap;
    let mut s = Sim::new(31, 2, 2);
    let a = s.join_with(1, "a", MediaSpec::none(), |c| {
        c.input_tick_hz(25).timeline_events()
    });
    let b = s.join(2, "b", MediaSpec::none());
    let c = s.join_with(3, "c", MediaSpec::none(), |c| c.timeline_events());
    let d = s.join(4, "d", MediaSpec::none());
    let all = [a, b, c, d];
    let shards: Vec<usize> = all.iter().map(|&id| s.shard_of(id)).collect();
    assert!(shards.contains(&0) && shards.contains(&1), "{shards:?}");
    let home = shards[0];
    s.net.run_until_cond(T, |net| {
        all.iter()
            .all(|&id| net.node_ref::<Client>(id).channels_open())
    });
    const N: u64 = 15;
    for round in 0..N {
        for (k, &id) in all.iter().enumerate() {
            let body = format!("{k}:{round}");
            s.c(id).send_data(
                "chat",
                true,
                envelope_seq(&[], round + 1, true, body.as_bytes()),
            );
        }
        s.net.run_for(Duration::from_millis(2));
    }
    s.net.run_for(Duration::from_secs(2));
    let mut agreed: BTreeMap<u64, (Option<String>, Vec<u8>)> = BTreeMap::new();
    for (k, &id) in all.iter().enumerate() {
        let got: Vec<DataIn> = s
            .c(id)
            .data_received()
            .into_iter()
            .filter(|m| m.label == "chat" && m.ack.is_none() && m.event.is_none())
            .collect();
        assert_eq!(got.len() as u64, 3 * N, "{k} gets the others' messages");
        let seqs: Vec<u64> = got.iter().map(|m| m.seq.unwrap()).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{k}: in seq order");
        for m in got {
            let v = (m.from.clone(), m.payload.clone());
            assert_eq!(
                *agreed.entry(m.seq.unwrap()).or_insert_with(|| v.clone()),
                v
            );
        }
        let acks = s
            .c(id)
            .data_received()
            .into_iter()
            .filter(|m| m.label == "chat" && m.ack.is_some())
            .count();
        assert_eq!(acks as u64, N, "{k}: acks, whichever shard it is on");
    }
    assert_eq!(agreed.len() as u64, 4 * N, "one seq per message");
    assert_eq!(s.stats(home).data_messages_sequenced, 4 * N + 4);
    assert_eq!(s.stats(1 - home).data_messages_sequenced, 0);

    // The room events from its own join on (the third and fourth joins) reached c, on
    // whichever shard it is, before the chat.
    let pos = all.iter().position(|&id| id == c).unwrap();
    let events: Vec<u64> = s
        .c(c)
        .data_received()
        .iter()
        .filter(|m| m.event.is_some())
        .map(|m| m.seq.unwrap())
        .collect();
    assert_eq!(events, [3, 4], "c (shard {}) gets the joins", shards[pos]);

    // History from a participant on the other shard than the home.
    let far = *all
        .iter()
        .zip(&shards)
        .find(|&(_, &sh)| sh != home)
        .unwrap()
        .0;
    s.send(far, ClientMessage::History { since: 4 + N });
    s.net.run_for(Duration::from_secs(1));
    let replayed: Vec<u64> = s
        .c(far)
        .data_received()
        .iter()
        .filter(|m| m.replay)
        .map(|m| m.seq.unwrap())
        .collect();
    assert_eq!(replayed, ((5 + N)..=(4 + 4 * N)).collect::<Vec<_>>());
    assert_eq!(
        s.count(far, |m| matches!(
            m,
            ServerMessage::History { complete: true, .. }
        )),
        1
    );

    // Input ticks (the room's rate came with its first join): one batch per receiver, the
    // same entries on both shards.
    for &id in &all {
        s.c(id).send_data("input", true, envelope(&[], b"tick me"));
    }
    s.net.run_for(Duration::from_millis(500));
    let mut seen: Vec<Vec<u64>> = Vec::new();
    for &id in &all {
        let entries: Vec<u64> = s
            .c(id)
            .data_received()
            .iter()
            .filter(|m| m.tick.is_some())
            .flat_map(|m| m.tick_entries())
            .map(|e| e.seq.unwrap())
            .collect();
        seen.push(entries);
    }
    assert!(seen.iter().all(|e| *e == seen[0]), "{seen:?}");
    assert_eq!(seen[0], [1, 2, 3, 4]);
    s.no_errors(&all);
}
