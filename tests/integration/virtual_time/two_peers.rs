//! Two `rtc` peers on the simulated network, no server: the network and the peers
//! themselves. The offerer publishes Opus + VP8 simulcast (q/h/f with RID header
//! extensions); the answerer receives.

use super::common::{addr, digest, ms, unwrap_seqs};
use plaza::sim::{LinkConfig, MediaSpec, Net, NodeId, Peer, PeerNode, RtcpIn};
use std::time::{Duration, Instant};

struct Pair {
    net: Net,
    a: NodeId,
    b: NodeId,
}

/// Two peers, `a` (offerer, publishes `media`) and `b` (answerer, receives), negotiated
/// directly (no signaling server).
fn pair(seed: u64, media: MediaSpec, link: LinkConfig) -> Pair {
    let mut net = Net::new(seed);
    net.set_default_link(link);
    let now = net.now();
    let mut pa = Peer::new("a", now, addr(1, 5000), seed, &media).expect("peer a");
    let mut pb = Peer::new("b", now, addr(2, 5000), seed + 1, &MediaSpec::none()).expect("b");
    let offer = pa.create_offer(now).expect("offer");
    let answer = pb.answer(now, &offer).expect("answer");
    pa.accept_answer(now, &answer).expect("accept");
    let a = net.add_node(PeerNode(pa), &[addr(1, 5000)]);
    let b = net.add_node(PeerNode(pb), &[addr(2, 5000)]);
    Pair { net, a, b }
}

fn peer(net: &mut Net, id: NodeId) -> &mut Peer {
    &mut net.node::<PeerNode>(id).0
}

fn connect(p: &mut Pair) -> Duration {
    let (a, b) = (p.a, p.b);
    p.net
        .run_until_cond(Duration::from_secs(10), |net| {
            peer(net, a).is_connected() && peer(net, b).is_connected()
        })
        .expect("the two peers connect within 10 s of virtual time")
}

#[test]
fn two_peers_connect_and_exchange_simulcast_media() {
    let wall = Instant::now();
    let mut p = pair(1, MediaSpec::simulcast(), LinkConfig::default());
    let took = connect(&mut p);
    // ICE (one round trip per check) and DTLS (two round trips) over 10 ms links.
    assert!(took < Duration::from_millis(500), "connect took {took:?}");
    p.net.run_for(Duration::from_secs(10));
    let (a, b) = (p.a, p.b);
    assert!(
        peer(&mut p.net, a).errors.is_empty(),
        "{:?}",
        peer(&mut p.net, a).errors
    );
    assert!(
        peer(&mut p.net, b).errors.is_empty(),
        "{:?}",
        peer(&mut p.net, b).errors
    );
    let sent: Vec<(u32, u64, u64)> = peer(&mut p.net, a)
        .video_layers()
        .iter()
        .map(|l| (l.ssrc, l.stats.packets, l.stats.keyframes))
        .collect();
    let audio_sent = peer(&mut p.net, a).audio_packets_sent();
    let rx = peer(&mut p.net, b);
    let audio = rx
        .tracks
        .values()
        .find(|t| t.packets.iter().all(|p| p.vp8.is_none()) && !t.packets.is_empty())
        .expect("an audio track");
    assert!(
        audio.packets.len() as u64 + 2 >= audio_sent && audio_sent >= 490,
        "audio {} of {audio_sent}",
        audio.packets.len()
    );
    let video = rx
        .tracks
        .values()
        .find(|t| t.packets.iter().any(|p| p.vp8.is_some()))
        .expect("a video track");
    // Every layer arrives complete, in order, starting with a keyframe of its own size.
    for (i, (ssrc, packets, keyframes)) in sent.iter().enumerate() {
        let got: Vec<_> = video.packets.iter().filter(|p| p.ssrc == *ssrc).collect();
        assert_eq!(
            got.len() as u64,
            *packets,
            "layer {i}: all packets arrive (no loss)"
        );
        assert_eq!(*keyframes, 1, "layer {i}: one keyframe, at the start");
        let first = got[0].vp8.expect("vp8");
        assert!(
            first.keyframe && first.frame_start,
            "layer {i} starts with a keyframe"
        );
        assert_eq!(first.layer, Some(i as u8));
        let seqs = unwrap_seqs(got.iter().copied());
        assert!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "layer {i}: consecutive seqs"
        );
        let pids: Vec<u16> = got
            .iter()
            .filter(|p| p.vp8.is_some_and(|v| v.frame_start))
            .map(|p| p.vp8.unwrap().picture_id.unwrap())
            .collect();
        assert!(
            pids.windows(2).all(|w| w[1] == (w[0] + 1) & 0x7fff),
            "layer {i}: picture ids"
        );
        assert!(
            pids.len() >= 295,
            "layer {i}: ~30 fps for 10 s, got {}",
            pids.len()
        );
    }
    println!(
        "two peers: connected in {:.1} ms virtual, 10 s of simulcast in {:.1} ms wall",
        ms(took),
        ms(wall.elapsed())
    );
}

/// A lossy link loses packets, the receiver NACKs them (rtc's NACK generator) and the
/// sender's NACK responder retransmits: the link counts losses, the sender counts NACKs,
/// and the receiver ends up with (nearly) every packet.
#[test]
fn lossy_link_loses_packets_and_nack_repairs_them() {
    let mut p = pair(7, MediaSpec::audio_video(), LinkConfig::default());
    connect(&mut p);
    let (a, b) = (p.a, p.b);
    p.net.link_mut(a, b).loss = 0.05;
    p.net.run_for(Duration::from_secs(20));
    p.net.link_mut(a, b).loss = 0.0;
    p.net.run_for(Duration::from_secs(1));
    let stats = p.net.link_stats(a, b);
    assert!(
        stats.lost > 50,
        "5% of ~{} datagrams lost: {stats:?}",
        stats.sent
    );
    let layer = peer(&mut p.net, a).video_layers()[0].stats.clone();
    let ssrc = peer(&mut p.net, a).video_layers()[0].ssrc;
    let nacks = peer(&mut p.net, a).rtcp_count(|r| matches!(r, RtcpIn::Nack { .. }));
    assert!(nacks > 0, "the receiver NACKed");
    let rx = peer(&mut p.net, b);
    let video = rx
        .tracks
        .values()
        .find(|t| t.packets.iter().any(|p| p.ssrc == ssrc))
        .expect("video track");
    let mut seqs = unwrap_seqs(video.packets.iter());
    let received_all = seqs.len();
    seqs.sort_unstable();
    seqs.dedup();
    let unique = seqs.len() as u64;
    // Without repair ~5% would be missing; NACK brings most of them back.
    assert!(
        unique * 1000 >= layer.packets * 995,
        "{unique} distinct of {} sent ({received_all} received, {nacks} NACKs)",
        layer.packets
    );
    println!(
        "lossy link: {} lost of {} sent, {nacks} NACKs, {unique}/{} video packets recovered",
        stats.lost, stats.sent, layer.packets
    );
}

/// A rate-limited link carries what its rate allows and tail-drops the rest.
#[test]
fn rate_limited_link_carries_its_rate_and_drops_the_excess() {
    let mut p = pair(3, MediaSpec::simulcast(), LinkConfig::default());
    connect(&mut p);
    let (a, b) = (p.a, p.b);
    p.net.run_for(Duration::from_secs(1));
    let before = p.net.link_stats(a, b);
    *p.net.link_mut(a, b) = LinkConfig {
        rate_bps: Some(1_000_000),
        queue_bytes: 30_000,
        ..LinkConfig::default()
    };
    p.net.run_for(Duration::from_secs(10));
    let after = p.net.link_stats(a, b);
    let bits = (after.bytes_delivered - before.bytes_delivered) * 8;
    let rate = bits as f64 / 10.0;
    // ~2.2 Mbit/s offered into 1 Mbit/s: the link runs full and drops the rest.
    assert!(
        (900_000.0..=1_050_000.0).contains(&rate),
        "delivered {rate} bit/s"
    );
    assert!(after.queue_drops > before.queue_drops + 100, "{after:?}");
}

/// Same seed, same run: the receiver's whole record (arrival times, sequence numbers,
/// timestamps, sizes, VP8 fields) and every link's counters hash the same twice.
#[test]
fn same_seed_same_run() {
    let run = |seed: u64| {
        let link = LinkConfig {
            loss: 0.02,
            ..LinkConfig::default()
        };
        let mut p = pair(seed, MediaSpec::simulcast(), link);
        connect(&mut p);
        p.net.run_for(Duration::from_secs(5));
        let t0 = p.net.start();
        // Datagram counts, not bytes: `rtc`'s own crypto randomness (certificates, ECDSA
        // signatures whose DER length varies by a byte) is not seeded by the sim.
        let stats: Vec<_> = p
            .net
            .all_link_stats()
            .into_iter()
            .map(|(k, s)| (k, s.sent, s.delivered, s.lost, s.queue_drops))
            .collect();
        let b = p.b;
        let rx = peer(&mut p.net, b);
        let tracks: Vec<_> = rx.tracks.values().collect();
        (digest(t0, &tracks), stats)
    };
    let (d1, s1) = run(42);
    let (d2, s2) = run(42);
    assert_eq!(
        s1, s2,
        "link counters differ between two runs with one seed"
    );
    assert_eq!(
        d1, d2,
        "receiver record differs between two runs with one seed"
    );
    let (d3, _) = run(43);
    assert_ne!(d1, d3, "another seed gives another run");
}

/// The receiver's PLI reaches the sender's application (through the RTCP tap) and the next
/// frame of that layer is a keyframe.
#[test]
fn pli_gets_a_keyframe() {
    let mut p = pair(11, MediaSpec::audio_video(), LinkConfig::default());
    connect(&mut p);
    let (a, b) = (p.a, p.b);
    p.net.run_for(Duration::from_secs(2));
    let keyframes = peer(&mut p.net, a).video_layers()[0].stats.keyframes;
    assert_eq!(keyframes, 1, "only the first frame so far");
    let track = peer(&mut p.net, b)
        .tracks
        .iter()
        .find(|(_, t)| t.packets.iter().any(|p| p.vp8.is_some()))
        .map(|(id, _)| id.clone())
        .expect("video track");
    let now = p.net.now();
    peer(&mut p.net, b).send_pli(now, &track).expect("pli");
    let took = p
        .net
        .run_until_cond(Duration::from_secs(1), |net| {
            net.node::<PeerNode>(b).0.tracks[&track]
                .since(now)
                .any(|p| p.vp8.is_some_and(|v| v.keyframe))
        })
        .expect("a keyframe follows the PLI");
    let tx = peer(&mut p.net, a);
    assert_eq!(tx.rtcp_count(|r| matches!(r, RtcpIn::Pli { .. })), 1);
    assert_eq!(tx.video_layers()[0].stats.keyframes, 2);
    // One link delay there, at most one frame interval, one link delay back.
    assert!(
        took <= Duration::from_millis(60),
        "keyframe {took:?} after the PLI"
    );
}

/// The sender's reports (rtc's SenderReport interceptor) reach the receiver and their RTP
/// time follows the media clock; the receiver's transport-wide feedback reaches the sender.
///
/// Between two `rtc` peers the NTP field is not checked: `rtc`'s sender report interceptor
/// takes it from the system clock (`SystemInstant::now` reads `SystemTime::now()`), not from
/// the instant it is handed, so under virtual time it barely moves. The RTP time is checked
/// against the virtual arrival times instead. (The server's own sender reports are checked
/// against NTP in the SFU tests.)
#[test]
fn sender_reports_and_twcc_feedback_flow() {
    let mut p = pair(12, MediaSpec::audio_video(), LinkConfig::default());
    connect(&mut p);
    let (a, b) = (p.a, p.b);
    p.net.run_for(Duration::from_secs(10));
    let ssrc = peer(&mut p.net, a).video_layers()[0].ssrc;
    let twcc = peer(&mut p.net, a).rtcp_count(|r| matches!(r, RtcpIn::Twcc));
    assert!(twcc > 10, "TWCC feedback packets at the sender: {twcc}");
    let srs: Vec<(Instant, u32)> = peer(&mut p.net, b)
        .rtcp
        .iter()
        .filter_map(|(at, r)| match r {
            RtcpIn::SenderReport { ssrc: s, rtp, .. } if *s == ssrc => Some((*at, *rtp)),
            _ => None,
        })
        .collect();
    assert!(srs.len() >= 3, "sender reports: {}", srs.len());
    for w in srs.windows(2) {
        let dt = (w[1].0 - w[0].0).as_secs_f64();
        let drtp = w[1].1.wrapping_sub(w[0].1) as f64 / 90_000.0;
        assert!(dt > 0.0);
        assert!(
            (drtp - dt).abs() < 0.04,
            "RTP {drtp:.3} s vs arrival {dt:.3} s"
        );
    }
}

/// ICE and DTLS retransmit on their own timers under virtual time: a handshake over links
/// that lose a fifth of all datagrams still completes.
#[test]
fn lossy_handshake_still_connects() {
    let link = LinkConfig {
        loss: 0.2,
        ..LinkConfig::default()
    };
    let mut p = pair(13, MediaSpec::audio_video(), link);
    let took = connect(&mut p);
    let (a, b) = (p.a, p.b);
    assert!(p.net.link_stats(a, b).lost + p.net.link_stats(b, a).lost > 0);
    println!("connected over 20% loss in {:.0} ms (virtual)", ms(took));
}

/// Five minutes of simulcast in well under the wall time of a loopback test: the clock is
/// virtual. Every packet arrives, in order.
#[test]
fn five_minutes_of_simulcast() {
    let wall = Instant::now();
    let mut p = pair(14, MediaSpec::simulcast(), LinkConfig::default());
    connect(&mut p);
    p.net.run_for(Duration::from_secs(300));
    let (a, b) = (p.a, p.b);
    let sent: u64 = peer(&mut p.net, a)
        .video_layers()
        .iter()
        .map(|l| l.stats.packets)
        .sum::<u64>()
        + peer(&mut p.net, a).audio_packets_sent();
    let rx = peer(&mut p.net, b);
    let received: usize = rx.tracks.values().map(|t| t.packets.len()).sum();
    assert!(rx.errors.is_empty(), "{:?}", rx.errors);
    assert!(sent > 300 * 200, "sent {sent}");
    assert!(
        received as u64 + 10 >= sent,
        "received {received} of {sent}"
    );
    println!(
        "5 min of simulcast ({sent} packets, {} events) in {:.0} ms wall",
        p.net.steps,
        ms(wall.elapsed())
    );
}
