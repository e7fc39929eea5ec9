//! The real SFU core on the simulated network with `rtc` clients: the behaviours that need
//! time (simulcast switching, bandwidth, dynacast, mute, NACK, sender reports), each in
//! virtual time. Mirrors `tests/integration/simulcast.rs` and `tests/integration/media.rs`, which test the same over
//! loopback sockets with real waits.

use super::common::{self, addr, digest, ip, ms, unwrap_seqs};
use plaza::signal::{ClientMessage, Quality, ServerMessage, TrackInfo, TrackKind};
use plaza::sim::server::SfuNode;
use plaza::sim::{Client, LinkConfig, MediaSpec, Net, NodeId, RtcpIn, RxTrack};
use std::time::{Duration, Instant};

/// Bound of every wait, in virtual time.
const T: Duration = Duration::from_secs(20);

struct Sim {
    net: Net,
    server: NodeId,
}

impl Sim {
    fn new(seed: u64) -> Self {
        let mut net = Net::new(seed);
        let now = net.now();
        let sa = addr(100, 7882);
        // The server first: see `Net::settle`.
        let server = net.add_node(SfuNode::new(sa, seed, now), &[sa]);
        net.set_signaling_server(server);
        Sim { net, server }
    }

    fn client(&mut self, n: u8, name: &str, media: MediaSpec) -> NodeId {
        let now = self.net.now();
        let c = Client::new(name, "room", ip(n), now, u64::from(n) * 1000, media).expect(name);
        let addrs = c.addrs();
        self.net.add_node(c, &addrs)
    }

    fn c(&mut self, id: NodeId) -> &mut Client {
        self.net.node::<Client>(id)
    }

    fn send(&mut self, id: NodeId, msg: ClientMessage) {
        self.c(id).send(msg);
    }

    /// The `kind` track `publisher` published, as `viewer` had it announced.
    fn track(&mut self, viewer: NodeId, publisher: NodeId, kind: TrackKind) -> TrackInfo {
        let joined = self.net.run_until_cond(T, |net| {
            net.node::<Client>(publisher).participant_id.is_some()
        });
        assert!(joined.is_some(), "the publisher joined");
        let pid = self.c(publisher).participant_id.clone();
        let found = self.net.run_until_cond(T, |net| {
            let c = net.node::<Client>(viewer);
            c.announced_tracks()
                .iter()
                .any(|t| Some(&t.participant_id) == pid.as_ref() && t.kind == kind)
        });
        assert!(found.is_some(), "{kind:?} track announced to the viewer");
        self.c(viewer)
            .announced_tracks()
            .into_iter()
            .find(|t| Some(&t.participant_id) == pid.as_ref() && t.kind == kind)
            .unwrap()
    }

    fn rx(&mut self, viewer: NodeId, track: &str) -> RxTrack {
        common::rx(&self.net, viewer, track)
    }

    /// Run until `viewer` receives video of layer `layer` on `track`; returns the time taken.
    fn wait_layer(
        &mut self,
        viewer: NodeId,
        track: &str,
        layer: u8,
        max: Duration,
    ) -> Option<Duration> {
        common::wait_layer(&mut self.net, viewer, track, layer, max)
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

pub fn settings(track: &str, q: Quality) -> ClientMessage {
    ClientMessage::TrackSettings {
        track_id: track.to_owned(),
        quality: Some(Some(q)),
        width: None,
        height: None,
    }
}

/// What a subscriber must see on one down-track, however the layers changed: one SSRC,
/// consecutive sequence numbers, picture ids and TL0PICIDX that advance by one per frame,
/// timestamps that only move forward by a few frames at most, and a new layer only ever
/// starting at a keyframe of that layer (with that layer's size).
pub fn assert_clean_stream(t: &RxTrack, sizes: &[(u16, u16)]) -> usize {
    assert!(!t.packets.is_empty(), "no video");
    assert_eq!(t.ssrcs().len(), 1, "one SSRC on the down-track");
    // Probe padding takes sequence numbers of the stream too.
    let mut all: Vec<&plaza::sim::RxPacket> = t.packets.iter().chain(&t.padding).collect();
    all.sort_by_key(|p| p.at);
    let mut seqs = unwrap_seqs(all.into_iter());
    seqs.sort_unstable();
    for (i, w) in seqs.windows(2).enumerate() {
        assert_eq!(w[1], w[0] + 1, "sequence gap or jump at packet {}", i + 1);
    }
    let first = t.packets[0].vp8.expect("vp8");
    assert!(first.keyframe, "the down-track starts with a keyframe");
    let mut switches = 0;
    let mut prev_frame: Option<(u32, Instant, u16, u8)> = None;
    let mut prev_layer = first.layer;
    for p in &t.packets {
        let v = p.vp8.expect("vp8 descriptor");
        if v.layer != prev_layer {
            assert!(
                v.frame_start && v.keyframe,
                "layer {:?} → {:?} not at a keyframe (seq {})",
                prev_layer,
                v.layer,
                p.seq
            );
            let l = v.layer.expect("layer tag") as usize;
            assert_eq!(v.size, Some(sizes[l]), "keyframe of the new layer");
            switches += 1;
            prev_layer = v.layer;
        }
        if v.frame_start {
            let (pid, tl0) = (v.picture_id.expect("pid"), v.tl0.expect("tl0"));
            if let Some((ts, at, ppid, ptl0)) = prev_frame {
                assert_eq!(
                    pid,
                    (ppid + 1) & 0x7fff,
                    "picture id continuity at seq {}",
                    p.seq
                );
                assert_eq!(
                    tl0,
                    ptl0.wrapping_add(1),
                    "TL0PICIDX continuity at seq {}",
                    p.seq
                );
                // Timestamps move forward with the clock: across a pause in the media (a
                // layer that stopped) by about the time that passed, never by a jump.
                let dt = p.ts.wrapping_sub(ts);
                let clock = (p.at - at).as_secs_f64();
                assert!(
                    dt >= 1 && (f64::from(dt) / 90_000.0 - clock).abs() < 0.1,
                    "timestamp step {dt} over {clock:.3} s at seq {}",
                    p.seq
                );
            }
            prev_frame = Some((p.ts, p.at, pid, tl0));
        }
    }
    switches
}

pub const SIZES: [(u16, u16); 3] = [(320, 180), (640, 360), (1280, 720)];

/// A publisher's audio and video reach a subscriber: the ids the server announced, the
/// publisher's participant id as stream id, video starting with a keyframe.
#[test]
fn media_flows_through_the_sfu() {
    let wall = Instant::now();
    let mut s = Sim::new(1);
    let alice = s.client(1, "alice", MediaSpec::audio_video());
    let bob = s.client(2, "bob", MediaSpec::none());
    let audio = s.track(bob, alice, TrackKind::Audio);
    let video = s.track(bob, alice, TrackKind::Video);
    s.net.run_for(Duration::from_secs(5));
    s.no_errors(&[alice, bob]);
    let pid = s.c(alice).participant_id.clone().unwrap();
    let a = s.rx(bob, &audio.id);
    let v = s.rx(bob, &video.id);
    assert!(a.packets.len() > 150, "audio packets: {}", a.packets.len());
    assert!(v.packets.len() > 150, "video packets: {}", v.packets.len());
    assert_eq!(v.stream_ids, vec![pid]);
    assert_clean_stream(&v, &[(640, 360)]);
    println!(
        "media through the sfu: 5 s in {:.0} ms wall",
        ms(wall.elapsed())
    );
}

/// A forwarded packet's in-core latency counts from when the server received it, not from
/// when the core read it: a packet that waited in the socket (the core busy with the ones
/// before it) counts that wait, as the driver hands the core the kernel's receive stamp. In
/// virtual time the core itself takes no time, so the latency is the wait, to the bucket.
#[test]
fn in_core_latency_counts_the_wait_in_the_socket() {
    for wait in [Duration::ZERO, Duration::from_millis(3)] {
        let mut s = Sim::new(1);
        let server = s.server;
        s.net.node::<SfuNode>(server).socket_wait = wait;
        let alice = s.client(1, "alice", MediaSpec::audio_video());
        let bob = s.client(2, "bob", MediaSpec::none());
        let video = s.track(bob, alice, TrackKind::Video);
        s.net.run_for(Duration::from_secs(3));
        s.no_errors(&[alice, bob]);
        let v = s.rx(bob, &video.id);
        assert!(v.packets.len() > 50, "video packets: {}", v.packets.len());
        let h = &s.net.node::<SfuNode>(server).sfu.transmit().in_core;
        assert!(h.count() > 100, "forwarded: {}", h.count());
        let (low, high) = (h.quantile_us(0.01).unwrap(), h.quantile_us(1.0).unwrap());
        let want = wait.as_micros() as u64;
        // The histogram's buckets are 1/8 of a power of two wide.
        assert!(
            low >= want && high <= want + want / 8,
            "socket wait {wait:?}: in-core latency {low}..{high} µs"
        );
    }
}

/// Simulcast: low, then high, then low again. Every switch happens at a keyframe of the
/// target layer, on the subscriber's one SSRC, with no gap or jump in sequence numbers,
/// timestamps and picture ids.
#[test]
fn simulcast_switch_at_keyframe_keeps_one_clean_stream() {
    let mut s = Sim::new(2);
    let alice = s.client(1, "alice", MediaSpec::simulcast());
    let bob = s.client(2, "bob", MediaSpec::none());
    let video = s.track(bob, alice, TrackKind::Video);
    s.send(bob, settings(&video.id, Quality::Low));
    assert!(s.wait_layer(bob, &video.id, 0, T).is_some(), "low layer");
    s.net.run_for(Duration::from_secs(2));
    s.send(bob, settings(&video.id, Quality::High));
    let up = s.wait_layer(bob, &video.id, 2, T).expect("switch up to f");
    s.net.run_for(Duration::from_secs(2));
    s.send(bob, settings(&video.id, Quality::Low));
    let down = s
        .wait_layer(bob, &video.id, 0, T)
        .expect("switch down to q");
    s.net.run_for(Duration::from_secs(2));
    s.no_errors(&[alice, bob]);
    let v = s.rx(bob, &video.id);
    let switches = assert_clean_stream(&v, &SIZES);
    assert!(switches >= 2, "switched up and down: {switches}");
    println!(
        "switch up {:.0} ms, down {:.0} ms (virtual)",
        ms(up),
        ms(down)
    );
}

/// A turn that reads several packets of a track makes each subscriber's copies of them
/// together, in arrival order. With a frame's packets read in one turn (frames of about two
/// packets here, and audio packets one per turn), about a third of the forwarded datagrams
/// follow one to the same subscriber (with one turn per packet, none do), and both
/// subscribers' streams stay clean.
#[test]
fn each_subscriber_gets_its_copies_of_a_turns_packets_together() {
    let run = |batch_reads: bool| {
        let mut s = Sim::new(3);
        s.net.set_batch_reads(batch_reads);
        let alice = s.client(1, "alice", MediaSpec::simulcast());
        let bob = s.client(2, "bob", MediaSpec::none());
        let carol = s.client(3, "carol", MediaSpec::none());
        let video = s.track(bob, alice, TrackKind::Video);
        for v in [bob, carol] {
            assert!(s.wait_layer(v, &video.id, 2, T).is_some(), "{v} on f");
        }
        let tx = |s: &mut Sim| {
            let tx = s.net.node::<SfuNode>(s.server).sfu.transmit();
            (tx.forwarded, tx.forwarded_after_same_address)
        };
        let (fwd0, same0) = tx(&mut s);
        s.net.run_for(Duration::from_secs(3));
        let (fwd, same) = tx(&mut s);
        s.no_errors(&[alice, bob, carol]);
        for v in [bob, carol] {
            let rx = s.rx(v, &video.id);
            assert!(rx.packets.len() > 150, "{v}: {} packets", rx.packets.len());
            assert_clean_stream(&rx, &SIZES);
        }
        (fwd - fwd0, same - same0)
    };
    let (fwd, together) = run(true);
    println!(
        "read together: {together} of {fwd} forwarded datagrams after one to the same subscriber"
    );
    assert!(
        fwd > 300 && together * 4 >= fwd,
        "{together} of {fwd} forwarded datagrams followed one to the same subscriber"
    );
    let (fwd, together) = run(false);
    assert!(fwd > 300, "{fwd} forwarded");
    assert_eq!(
        together, 0,
        "one packet per turn: copies alternate subscribers"
    );
}

/// A rate-limited subscriber link makes the server downgrade that subscriber within a few
/// seconds; lifting the limit brings the top layer back (the time it takes is printed).
#[test]
fn bandwidth_cut_downgrades_and_lifting_it_recovers() {
    let mut s = Sim::new(3);
    let alice = s.client(1, "alice", MediaSpec::simulcast());
    let bob = s.client(2, "bob", MediaSpec::none());
    let carol = s.client(3, "carol", MediaSpec::none());
    let video = s.track(bob, alice, TrackKind::Video);
    let to_f = s.wait_layer(bob, &video.id, 2, Duration::from_secs(15));
    assert!(to_f.is_some(), "the unconstrained subscriber reaches f");
    assert!(
        s.wait_layer(carol, &video.id, 2, Duration::from_secs(15))
            .is_some()
    );
    s.net.run_for(Duration::from_secs(3));
    let (server, bob_node) = (s.server, bob);
    *s.net.link_mut(server, bob_node) = LinkConfig {
        rate_bps: Some(400_000),
        queue_bytes: 30_000,
        ..LinkConfig::default()
    };
    let cut = s.net.now();
    let track = video.id.clone();
    let down = s.net.run_until_cond(Duration::from_secs(4), |net| {
        net.node::<Client>(bob_node)
            .subscriber
            .tracks
            .get(&track)
            .and_then(|t| t.current_layer())
            .is_some_and(|l| l < 2)
    });
    let down = down.unwrap_or_else(|| panic!("no downgrade within 4 s of a 400 kbit/s cut"));
    s.net.run_for(Duration::from_secs(5));
    let layer = s.rx(bob, &video.id).current_layer();
    assert_eq!(layer, Some(0), "only q fits 400 kbit/s");
    // The other subscriber is not affected: it stayed on f throughout.
    let c = s.rx(carol, &video.id);
    let since_cut: Vec<_> = c
        .since(cut)
        .filter_map(|p| p.vp8.and_then(|v| v.layer))
        .collect();
    assert!(
        since_cut.len() > 500 && since_cut.iter().all(|l| *l == 2),
        "carol stays on f"
    );
    *s.net.link_mut(server, bob_node) = LinkConfig::default();
    let up = s.wait_layer(bob, &video.id, 2, Duration::from_secs(60));
    let up = up.expect("back to f within 60 s of lifting the limit");
    s.no_errors(&[alice, bob, carol]);
    println!(
        "bandwidth: downgrade {:.0} ms after the cut, recovery {:.0} ms after the lift",
        ms(down),
        ms(up)
    );
}

/// The encoder drops its top layer without a word to the server: the subscriber on it
/// falls back to the next layer (one clean stream) and returns when the layer comes back.
#[test]
fn a_layer_that_stops_does_not_freeze_its_subscribers() {
    let mut s = Sim::new(8);
    let alice = s.client(1, "alice", MediaSpec::simulcast());
    let bob = s.client(2, "bob", MediaSpec::none());
    let video = s.track(bob, alice, TrackKind::Video);
    s.send(bob, settings(&video.id, Quality::High));
    assert!(s.wait_layer(bob, &video.id, 2, T).is_some(), "on f");
    s.net.run_for(Duration::from_secs(2));
    {
        let c = s.c(alice);
        c.obey_publisher_layers = false;
        c.publisher.as_mut().unwrap().set_layer_active("f", false);
    }
    let fell = s.wait_layer(bob, &video.id, 1, T).expect("falls back to h");
    s.net.run_for(Duration::from_secs(2));
    s.c(alice)
        .publisher
        .as_mut()
        .unwrap()
        .set_layer_active("f", true);
    let back = s.wait_layer(bob, &video.id, 2, T).expect("back on f");
    s.net.run_for(Duration::from_secs(1));
    assert_clean_stream(&s.rx(bob, &video.id), &SIZES);
    s.no_errors(&[alice, bob]);
    println!(
        "fell back to h {:.0} ms after f stopped, back on f {:.0} ms after it resumed",
        ms(fell),
        ms(back)
    );
}

/// Dynacast: layers nobody wants are paused at the publisher (`publisher_layers`) and
/// stop being sent; asking for the top layer resumes it.
#[test]
fn unused_layers_are_paused_at_the_publisher_and_resumed() {
    let mut s = Sim::new(4);
    let alice = s.client(1, "alice", MediaSpec::simulcast());
    let bob = s.client(2, "bob", MediaSpec::none());
    let video = s.track(bob, alice, TrackKind::Video);
    s.send(bob, settings(&video.id, Quality::Low));
    let paused = s.net.run_until_cond(T, |net| {
        let p = net.node::<Client>(alice).publisher.as_ref().unwrap();
        p.video_layers()
            .iter()
            .all(|l| l.active == (l.spec.rid == "q"))
    });
    assert!(paused.is_some(), "h and f paused at the publisher");
    let sent: Vec<u64> = s
        .c(alice)
        .publisher
        .as_ref()
        .unwrap()
        .video_layers()
        .iter()
        .map(|l| l.stats.packets)
        .collect();
    s.net.run_for(Duration::from_secs(3));
    let later: Vec<u64> = s
        .c(alice)
        .publisher
        .as_ref()
        .unwrap()
        .video_layers()
        .iter()
        .map(|l| l.stats.packets)
        .collect();
    assert!(later[0] > sent[0] + 60, "q keeps going");
    assert_eq!(
        (later[1], later[2]),
        (sent[1], sent[2]),
        "h and f send nothing while paused"
    );
    s.send(bob, settings(&video.id, Quality::High));
    let resumed = s
        .wait_layer(bob, &video.id, 2, T)
        .expect("f resumed and delivered");
    assert!(s.c(alice).publisher.as_ref().unwrap().video_layers()[2].active);
    s.no_errors(&[alice, bob]);
    println!(
        "paused top layer delivered {:.0} ms after the request",
        ms(resumed)
    );
}

/// Mute stops forwarding (the publisher keeps sending), unmute resumes with a keyframe.
#[test]
fn mute_stops_forwarding_and_unmute_resumes_with_keyframe() {
    let mut s = Sim::new(5);
    let alice = s.client(1, "alice", MediaSpec::audio_video());
    let bob = s.client(2, "bob", MediaSpec::none());
    let video = s.track(bob, alice, TrackKind::Video);
    s.net.run_for(Duration::from_secs(2));
    s.send(
        alice,
        ClientMessage::Mute {
            track_id: video.id.clone(),
            muted: true,
        },
    );
    let track = video.id.clone();
    let told = s.net.run_until_cond(T, |net| {
        net.node::<Client>(bob).count_messages(|m| matches!(m, ServerMessage::TrackMuted { track_id, muted: true, .. } if *track_id == track)) > 0
    });
    assert!(told.is_some(), "bob gets track_muted");
    s.net.run_for(Duration::from_millis(200));
    let before = s.rx(bob, &video.id).packets.len();
    let sent_before = s.c(alice).publisher.as_ref().unwrap().video_layers()[0]
        .stats
        .packets;
    s.net.run_for(Duration::from_secs(3));
    let sent = s.c(alice).publisher.as_ref().unwrap().video_layers()[0]
        .stats
        .packets
        - sent_before;
    let grew = s.rx(bob, &video.id).packets.len() - before;
    assert!(sent > 100, "alice kept sending");
    assert_eq!(grew, 0, "muted video still forwarded");
    s.send(
        alice,
        ClientMessage::Mute {
            track_id: video.id.clone(),
            muted: false,
        },
    );
    let track = video.id.clone();
    let resumed = s.net.run_until_cond(T, |net| {
        net.node::<Client>(bob)
            .subscriber
            .tracks
            .get(&track)
            .is_some_and(|t| t.packets.len() > before)
    });
    assert!(resumed.is_some(), "forwarding resumes");
    let v = s.rx(bob, &video.id);
    let first = v.packets[before].vp8.unwrap();
    assert!(
        first.keyframe && first.frame_start,
        "first packet after unmute starts a keyframe"
    );
    s.no_errors(&[alice, bob]);
}

/// After a switch the subscriber's NACKs (rtc's NACK generator, on a lossy downlink) get
/// retransmissions: the sequence numbers end up (nearly) complete, and the server counts
/// resends.
#[test]
fn nack_after_a_switch_gets_retransmissions() {
    let mut s = Sim::new(6);
    let alice = s.client(1, "alice", MediaSpec::simulcast());
    let bob = s.client(2, "bob", MediaSpec::none());
    let video = s.track(bob, alice, TrackKind::Video);
    s.send(bob, settings(&video.id, Quality::Low));
    assert!(s.wait_layer(bob, &video.id, 0, T).is_some());
    s.send(bob, settings(&video.id, Quality::Medium));
    assert!(s.wait_layer(bob, &video.id, 1, T).is_some());
    let (server, b) = (s.server, bob);
    s.net.link_mut(server, b).loss = 0.03;
    s.net.run_for(Duration::from_secs(10));
    s.net.link_mut(server, b).loss = 0.0;
    s.net.run_for(Duration::from_secs(1));
    let lost = s.net.link_stats(server, b).lost;
    assert!(lost > 20, "the link lost packets: {lost}");
    let v = s.rx(bob, &video.id);
    // Probe padding takes sequence numbers of the stream too.
    let mut seqs = unwrap_seqs(v.packets.iter().chain(&v.padding));
    seqs.sort_unstable();
    let span = seqs.last().unwrap() - seqs.first().unwrap() + 1;
    seqs.dedup();
    let missing = span - seqs.len() as u64;
    assert!(missing * 200 <= span, "{missing} of {span} never repaired");
    let now = s.net.now();
    let stats = s.net.node::<SfuNode>(server).stats(now);
    assert!(stats.nack_resent > 0, "the server resent: {stats:?}");
    s.no_errors(&[alice, bob]);
    println!("nack: {lost} lost on the downlink, {missing} of {span} never repaired");
}

/// The subscriber gets sender reports for its down-track's SSRC, and they agree with the
/// media clock: RTP time advances by 90 kHz × the NTP time between two reports.
#[test]
fn sender_reports_are_consistent() {
    let mut s = Sim::new(7);
    let alice = s.client(1, "alice", MediaSpec::audio_video());
    let bob = s.client(2, "bob", MediaSpec::none());
    let video = s.track(bob, alice, TrackKind::Video);
    s.net.run_for(Duration::from_secs(20));
    let ssrc = s.rx(bob, &video.id).ssrcs()[0];
    let srs: Vec<(u64, u32)> = s
        .c(bob)
        .subscriber
        .rtcp
        .iter()
        .filter_map(|(_, r)| match r {
            RtcpIn::SenderReport {
                ssrc: s, ntp, rtp, ..
            } if *s == ssrc => Some((*ntp, *rtp)),
            _ => None,
        })
        .collect();
    assert!(
        srs.len() >= 3,
        "sender reports for the video down-track: {}",
        srs.len()
    );
    // Nothing is lost: each report counts what the subscriber had received by then, give or
    // take what was in flight (one link delay of packets).
    let rx = s.rx(bob, &video.id);
    let sub = &s.c(bob).subscriber;
    for (at, r) in &sub.rtcp {
        if let RtcpIn::SenderReport {
            ssrc: x, packets, ..
        } = r
        {
            if *x == ssrc {
                let received = rx.packets.iter().filter(|p| p.at <= *at).count() as u32;
                assert!(
                    *packets >= received && *packets <= received + 10,
                    "report counts {packets}, {received} received by then"
                );
            }
        }
    }
    for w in srs.windows(2) {
        let dntp = (w[1].0.wrapping_sub(w[0].0)) as f64 / (1u64 << 32) as f64;
        let drtp = w[1].1.wrapping_sub(w[0].1) as f64 / 90_000.0;
        assert!(dntp > 0.0, "NTP time moves forward");
        assert!(
            (drtp - dntp).abs() < 0.05,
            "RTP {drtp:.3} s vs NTP {dntp:.3} s"
        );
    }
    s.no_errors(&[alice, bob]);
}

/// Same seed, same run, with the server in the loop: a simulcast publisher, a subscriber
/// that switches layers, and a lossy downlink (so NACKs and retransmissions are in the
/// record too). The subscriber's whole record hashes the same twice.
#[test]
fn same_seed_same_run_with_the_server() {
    let run = || {
        let mut s = Sim::new(9);
        let alice = s.client(1, "alice", MediaSpec::simulcast());
        let bob = s.client(2, "bob", MediaSpec::none());
        let video = s.track(bob, alice, TrackKind::Video);
        let server = s.server;
        s.net.link_mut(server, bob).loss = 0.02;
        s.send(bob, settings(&video.id, Quality::Medium));
        s.net.run_for(Duration::from_secs(3));
        s.send(bob, settings(&video.id, Quality::High));
        s.net.run_for(Duration::from_secs(3));
        let t0 = s.net.start();
        let v = s.rx(bob, &video.id);
        assert!(v.packets.len() > 500, "{} video packets", v.packets.len());
        let stats: Vec<_> = s
            .net
            .all_link_stats()
            .into_iter()
            .map(|(k, l)| (k, l.sent, l.lost))
            .collect();
        (digest(t0, &[&v]), stats)
    };
    let first = run();
    for _ in 0..3 {
        assert_eq!(run(), first);
    }
}

/// A minute and a half of a room: two simulcast publishers (who also receive each other) and three
/// viewers — one capped at low, one on a link that drops to 600 kbit/s for 30 s in the
/// middle, one unconstrained. Every down-track stays one clean stream throughout, and each
/// viewer ends where its constraints put it.
#[test]
fn ninety_seconds_of_a_room() {
    let wall = Instant::now();
    let mut s = Sim::new(10);
    let alice = s.client(1, "alice", MediaSpec::simulcast());
    let bob = s.client(2, "bob", MediaSpec::simulcast());
    let low = s.client(3, "low", MediaSpec::none());
    let squeezed = s.client(4, "squeezed", MediaSpec::none());
    let free = s.client(5, "free", MediaSpec::none());
    let mut videos = Vec::new();
    for publisher in [alice, bob] {
        let v = s.track(low, publisher, TrackKind::Video);
        s.send(low, settings(&v.id, Quality::Low));
        videos.push(v.id);
    }
    s.net.run_for(Duration::from_secs(30));
    let server = s.server;
    *s.net.link_mut(server, squeezed) = LinkConfig {
        rate_bps: Some(600_000),
        queue_bytes: 30_000,
        ..LinkConfig::default()
    };
    s.net.run_for(Duration::from_secs(30));
    *s.net.link_mut(server, squeezed) = LinkConfig::default();
    s.net.run_for(Duration::from_secs(30));
    s.no_errors(&[alice, bob, low, squeezed, free]);
    let mut packets = 0;
    for viewer in [alice, bob, low, squeezed, free] {
        for id in &videos {
            let t = s.rx(viewer, id);
            if t.packets.is_empty() {
                // A publisher does not receive its own track.
                continue;
            }
            packets += t.packets.len();
            // The squeezed viewer lost packets in its queue (NACK repairs some): only the
            // layer-switch rules are checked there.
            if viewer != squeezed {
                assert_clean_stream(&t, &SIZES);
            }
            let expected = if viewer == low { 0 } else { 2 };
            assert_eq!(t.current_layer(), Some(expected), "{viewer} on {id}");
        }
    }
    assert!(packets > 40_000, "{packets} video packets received");
    println!(
        "90 s of a 5-person room: {packets} video packets received, {} events, {:.0} ms wall",
        s.net.steps,
        ms(wall.elapsed())
    );
}

/// A lossy uplink: the server's fast path NACKs the publisher's missing packets and sends
/// it receiver reports, and the subscriber still gets a complete stream (the publisher's
/// retransmissions are forwarded).
#[test]
fn publishers_get_nacks_and_receiver_reports() {
    let mut s = Sim::new(11);
    let alice = s.client(1, "alice", MediaSpec::audio_video());
    let bob = s.client(2, "bob", MediaSpec::none());
    let video = s.track(bob, alice, TrackKind::Video);
    let server = s.server;
    s.net.link_mut(alice, server).loss = 0.03;
    s.net.run_for(Duration::from_secs(10));
    s.net.link_mut(alice, server).loss = 0.0;
    s.net.run_for(Duration::from_secs(1));
    let lost = s.net.link_stats(alice, server).lost;
    let publ = s.c(alice).publisher.as_ref().unwrap();
    let ssrc = publ.video_layers()[0].ssrc;
    let nacked: usize = publ
        .rtcp
        .iter()
        .filter_map(|(_, r)| match r {
            RtcpIn::Nack { media_ssrc, seqs } if *media_ssrc == ssrc => Some(seqs.len()),
            _ => None,
        })
        .sum();
    let reports =
        publ.rtcp_count(|r| matches!(r, RtcpIn::ReceiverReport { ssrc: x, .. } if *x == ssrc));
    assert!(lost > 10, "the uplink lost {lost}");
    assert!(nacked > 0, "the publisher was asked for {nacked} packets");
    assert!(reports >= 5, "receiver reports about the video: {reports}");
    let v = s.rx(bob, &video.id);
    let mut seqs = unwrap_seqs(v.packets.iter());
    seqs.sort_unstable();
    let span = seqs.last().unwrap() - seqs.first().unwrap() + 1;
    seqs.dedup();
    let missing = span - seqs.len() as u64;
    assert!(
        missing * 100 <= span,
        "{missing} of {span} never reached bob"
    );
    s.no_errors(&[alice, bob]);
    println!(
        "uplink: {lost} lost, {nacked} NACKed, {reports} RRs, {missing}/{span} missing at bob"
    );
}

/// Layers are ranked by what they carry, not by the order of the RIDs: here `q` is the
/// largest and `h` the smallest. `low` gets the smallest, `high` the largest.
#[test]
fn layers_are_ranked_by_content_not_by_rid_order() {
    use plaza::sim::LayerSpec;
    let mut s = Sim::new(12);
    let media = MediaSpec {
        audio: false,
        video: vec![
            LayerSpec::new("q", 1_500_000, 1280, 720),
            LayerSpec::new("h", 150_000, 320, 180),
            LayerSpec::new("f", 500_000, 640, 360),
        ],
        ..Default::default()
    };
    let sizes = [(1280, 720), (320, 180), (640, 360)];
    let alice = s.client(1, "alice", media);
    let bob = s.client(2, "bob", MediaSpec::none());
    let video = s.track(bob, alice, TrackKind::Video);
    s.send(bob, settings(&video.id, Quality::Low));
    assert!(
        s.wait_layer(bob, &video.id, 1, T).is_some(),
        "low = 320x180 (rid h)"
    );
    s.net.run_for(Duration::from_secs(2));
    s.send(bob, settings(&video.id, Quality::High));
    assert!(
        s.wait_layer(bob, &video.id, 0, T).is_some(),
        "high = 1280x720 (rid q)"
    );
    s.send(bob, settings(&video.id, Quality::Medium));
    assert!(
        s.wait_layer(bob, &video.id, 2, T).is_some(),
        "medium = 640x360 (rid f)"
    );
    s.net.run_for(Duration::from_secs(1));
    assert!(assert_clean_stream(&s.rx(bob, &video.id), &sizes) >= 2);
    s.no_errors(&[alice, bob]);
}

/// The stream checker itself fails on what it is there to catch.
mod checker {
    use super::*;
    use plaza::sim::{RxPacket, Vp8Info};

    fn track(frames: &[(u8, bool)]) -> RxTrack {
        let t0 = Instant::now();
        let mut packets = Vec::new();
        for (i, (layer, key)) in frames.iter().enumerate() {
            let i = i as u32;
            packets.push(RxPacket {
                at: t0 + Duration::from_millis(u64::from(i) * 33),
                ssrc: 1,
                seq: 100 + i as u16,
                ts: 1000 + i * 3000,
                marker: true,
                pt: 96,
                len: 100,
                vp8: Some(Vp8Info {
                    frame_start: true,
                    picture_id: Some(10 + i as u16),
                    pid15: true,
                    tl0: Some(i as u8),
                    keyframe: *key,
                    size: key.then_some(SIZES[*layer as usize]),
                    layer: Some(*layer),
                    frame: Some(i),
                }),
            });
        }
        RxTrack {
            packets,
            ..Default::default()
        }
    }

    #[test]
    fn accepts_a_switch_at_a_keyframe() {
        let t = track(&[(0, true), (0, false), (2, true), (2, false)]);
        assert_eq!(assert_clean_stream(&t, &SIZES), 1);
    }

    #[test]
    #[should_panic(expected = "not at a keyframe")]
    fn catches_a_switch_on_an_interframe() {
        assert_clean_stream(&track(&[(0, true), (0, false), (2, false)]), &SIZES);
    }

    #[test]
    #[should_panic(expected = "sequence gap")]
    fn catches_a_sequence_gap() {
        let mut t = track(&[(0, true), (0, false), (0, false)]);
        t.packets[2].seq += 1;
        assert_clean_stream(&t, &SIZES);
    }

    #[test]
    #[should_panic(expected = "picture id continuity")]
    fn catches_a_picture_id_jump() {
        let mut t = track(&[(0, true), (0, false), (0, false)]);
        t.packets[2].vp8.as_mut().unwrap().picture_id = Some(50);
        assert_clean_stream(&t, &SIZES);
    }

    #[test]
    #[should_panic(expected = "timestamp step")]
    fn catches_a_timestamp_jump() {
        let mut t = track(&[(0, true), (0, false), (0, false)]);
        t.packets[2].ts += 90_000;
        assert_clean_stream(&t, &SIZES);
    }

    #[test]
    #[should_panic(expected = "one SSRC")]
    fn catches_a_second_ssrc() {
        let mut t = track(&[(0, true), (0, false)]);
        t.packets[1].ssrc = 2;
        assert_clean_stream(&t, &SIZES);
    }
}

/// Publishers receive each other; a late joiner gets everything already published, video
/// starting with a keyframe; a participant that leaves is announced gone and its media stops.
#[test]
fn late_joiner_and_leave() {
    let mut s = Sim::new(13);
    let alice = s.client(1, "alice", MediaSpec::audio_video());
    let bob = s.client(2, "bob", MediaSpec::audio_video());
    let alice_video = s.track(bob, alice, TrackKind::Video);
    let bob_video = s.track(alice, bob, TrackKind::Video);
    s.net.run_for(Duration::from_secs(3));
    let carol = s.client(3, "carol", MediaSpec::none());
    for publisher in [alice, bob] {
        for kind in [TrackKind::Audio, TrackKind::Video] {
            s.track(carol, publisher, kind);
        }
    }
    s.net.run_for(Duration::from_secs(3));
    let alice_pid = s.c(alice).participant_id.clone().unwrap();
    for (viewer, track) in [
        (bob, &alice_video.id),
        (alice, &bob_video.id),
        (carol, &alice_video.id),
        (carol, &bob_video.id),
    ] {
        let t = s.rx(viewer, track);
        assert!(t.packets.len() > 100, "{viewer} receives {track}");
        assert!(t.packets[0].vp8.unwrap().keyframe, "starts with a keyframe");
    }
    // carol learned alice's tracks from `joined`, not from `track_published`.
    let joined_tracks = match &s.c(carol).joined {
        Some(ServerMessage::Joined { participants, .. }) => {
            participants.iter().map(|p| p.tracks.len()).sum::<usize>()
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(joined_tracks, 4);

    s.send(alice, ClientMessage::Leave);
    let gone = s.net.run_until_cond(T, |net| {
        [bob, carol].iter().all(|&v| {
            net.node::<Client>(v).count_messages(
                |m| matches!(m, ServerMessage::ParticipantLeft { participant_id, .. } if *participant_id == alice_pid),
            ) == 1
                && net.node::<Client>(v).count_messages(
                    |m| matches!(m, ServerMessage::TrackUnpublished { participant_id, .. } if *participant_id == alice_pid),
                ) == 2
        })
    });
    assert!(
        gone.is_some(),
        "bob and carol are told alice left, with her two tracks"
    );
    s.net.run_for(Duration::from_millis(200));
    let before = s.rx(carol, &alice_video.id).packets.len();
    let still = s.rx(carol, &bob_video.id).packets.len();
    s.net.run_for(Duration::from_secs(2));
    assert_eq!(
        s.rx(carol, &alice_video.id).packets.len(),
        before,
        "alice's video stopped"
    );
    assert!(
        s.rx(carol, &bob_video.id).packets.len() > still + 50,
        "bob's goes on"
    );
    s.no_errors(&[bob, carol]);
}

/// A subscription made while a subscriber offer is out is negotiated by a later offer; a
/// slow subscriber that answers it 1.5 s later still gets a keyframe first (the server does
/// not spend it before the answer).
#[test]
fn keyframe_is_not_spent_before_a_slow_subscriber_answers() {
    let mut s = Sim::new(14);
    let bob = s.client(2, "bob", MediaSpec::audio_video());
    let slow = {
        let now = s.net.now();
        let c = Client::new("slowpoke", "room", ip(3), now, 3000, MediaSpec::none())
            .unwrap()
            .without_auto_subscribe();
        let addrs = c.addrs();
        s.net.add_node(c, &addrs)
    };
    let audio = s.track(slow, bob, TrackKind::Audio).id;
    let video = s.track(slow, bob, TrackKind::Video).id;
    let connected = s
        .net
        .run_until_cond(T, |net| net.node::<Client>(slow).subscriber.is_connected());
    assert!(connected.is_some());
    s.c(slow).hold_offers = true;
    for id in [&audio, &video] {
        s.send(
            slow,
            ClientMessage::Subscribe {
                track_ids: vec![id.clone()],
                subscribe: true,
            },
        );
    }
    // Answer offers until one carries the video track; hold that one.
    loop {
        let got = s
            .net
            .run_until_cond(T, |net| !net.node::<Client>(slow).held_offers.is_empty());
        assert!(got.is_some(), "an offer for the subscriptions");
        if s.c(slow).held_offers[0].contains(&video) {
            break;
        }
        let now = s.net.now();
        s.c(slow).answer_held(now);
    }
    s.net.run_for(Duration::from_millis(1500));
    let now = s.net.now();
    s.c(slow).answer_held(now);
    let video2 = video.clone();
    let got = s.net.run_until_cond(T, |net| {
        net.node::<Client>(slow)
            .subscriber
            .tracks
            .get(&video2)
            .is_some_and(|t| t.packets.len() >= 30)
    });
    assert!(got.is_some(), "the slow subscriber receives video");
    let v = s.rx(slow, &video);
    let first = v.packets[0].vp8.unwrap();
    assert!(
        first.keyframe && first.frame_start,
        "the first video packet starts a keyframe"
    );
    s.no_errors(&[bob, slow]);
}

/// A subscriber that asks for the low layer from the start never gets another one.
#[test]
fn low_preference_receives_only_the_low_layer() {
    let mut s = Sim::new(15);
    let alice = s.client(1, "alice", MediaSpec::simulcast());
    let bob = s.client(2, "bob", MediaSpec::none());
    let video = s.track(bob, alice, TrackKind::Video);
    s.send(bob, settings(&video.id, Quality::Low));
    s.net.run_for(Duration::from_secs(10));
    let v = s.rx(bob, &video.id);
    assert!(v.packets.len() > 250, "{} packets", v.packets.len());
    assert!(
        v.packets
            .iter()
            .all(|p| p.vp8.and_then(|x| x.layer) == Some(0)),
        "only q reached bob"
    );
    assert_clean_stream(&v, &SIZES);
    s.no_errors(&[alice, bob]);
}

/// Selection by rendered size: a 320x180 element gets `q`; a cap sent together with a size
/// is lifted by `quality: null` (the size still applies), and a large element gets `f`.
#[test]
fn size_selects_the_layer_and_null_lifts_the_cap() {
    let mut s = Sim::new(16);
    let alice = s.client(1, "alice", MediaSpec::simulcast());
    let bob = s.client(2, "bob", MediaSpec::none());
    let video = s.track(bob, alice, TrackKind::Video);
    let sized = |quality, w, h| ClientMessage::TrackSettings {
        track_id: video.id.clone(),
        quality,
        width: Some(w),
        height: Some(h),
    };
    s.send(bob, sized(None, 320, 180));
    assert!(
        s.wait_layer(bob, &video.id, 0, T).is_some(),
        "320x180 element: q"
    );
    s.send(bob, sized(Some(Some(Quality::Medium)), 1280, 720));
    assert!(
        s.wait_layer(bob, &video.id, 1, T).is_some(),
        "capped at medium: h"
    );
    s.net.run_for(Duration::from_secs(2));
    s.send(bob, sized(Some(None), 1280, 720));
    assert!(
        s.wait_layer(bob, &video.id, 2, T).is_some(),
        "cap lifted, 1280x720: f"
    );
    s.net.run_for(Duration::from_secs(1));
    assert!(assert_clean_stream(&s.rx(bob, &video.id), &SIZES) >= 2);
    s.no_errors(&[alice, bob]);
}

/// A loss right after a switch: the first packets of the new layer after its keyframe are
/// dropped on the downlink; the subscriber's NACK gets them retransmitted (with the
/// down-track's rewritten sequence numbers) or a keyframe follows, and the stream has no hole.
#[test]
fn loss_right_after_a_switch_is_repaired() {
    let mut s = Sim::new(17);
    let alice = s.client(1, "alice", MediaSpec::simulcast());
    let bob = s.client(2, "bob", MediaSpec::none());
    let video = s.track(bob, alice, TrackKind::Video);
    s.send(bob, settings(&video.id, Quality::Low));
    assert!(s.wait_layer(bob, &video.id, 0, T).is_some());
    s.net.run_for(Duration::from_secs(2));
    s.send(bob, settings(&video.id, Quality::Medium));
    assert!(s.wait_layer(bob, &video.id, 1, T).is_some());
    let server = s.server;
    let now = s.net.now();
    let before = s.net.node::<SfuNode>(server).stats(now);
    s.net.run_for(Duration::from_millis(40));
    s.net.drop_next(server, bob, 3);
    let dropped_at = s.net.now();
    s.net.run_for(Duration::from_secs(3));
    assert_eq!(s.net.link_stats(server, bob).lost, 3);
    let now = s.net.now();
    let after = s.net.node::<SfuNode>(server).stats(now);
    let v = s.rx(bob, &video.id);
    let mut seqs = unwrap_seqs(v.packets.iter());
    seqs.sort_unstable();
    let span = seqs.last().unwrap() - seqs.first().unwrap() + 1;
    seqs.dedup();
    let resent = after.nack_resent - before.nack_resent;
    let hole = span - seqs.len() as u64;
    let keyframes = v.keyframes().filter(|p| p.at > dropped_at).count();
    assert!(
        (hole == 0 && resent > 0) || keyframes > 0,
        "a hole of {hole} packets, {resent} resent, {keyframes} keyframes since the loss"
    );
    s.no_errors(&[alice, bob]);
    println!(
        "after a switch: 3 dropped, {resent} resent, hole {hole}, {keyframes} keyframes since"
    );
}
