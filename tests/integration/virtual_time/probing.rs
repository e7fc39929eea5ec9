//! Bandwidth probing in virtual time: a simulcast subscriber behind a rate-limited downlink.
//! Lifting the limit brings the top layer back within seconds (a probe cluster of padding
//! proves the link, the selector steps up without its hold); behind a lasting limit the
//! subscriber stays on the layer it can carry, with no freeze and no up-switch that is then
//! reverted, its audio never starved, and the padding spent bounded.

use super::common::{Sim, ms, unwrap_seqs};
use super::sfu::{SIZES, assert_clean_stream};
use plaza::signal::{TrackInfo, TrackKind};
use plaza::sim::{Client, LinkConfig, MediaSpec, NodeId, RxPacket, RxTrack};
use std::time::{Duration, Instant};

/// Bound of every wait, in virtual time.
const T: Duration = Duration::from_secs(20);
/// The limit of the subscriber's downlink.
const LIMIT_BPS: u64 = 300_000;

struct Setup {
    s: Sim,
    alice: NodeId,
    bob: NodeId,
    video: TrackInfo,
    audio: TrackInfo,
}

fn track(s: &mut Sim, viewer: NodeId, kind: TrackKind) -> TrackInfo {
    let found = s.net.run_until_cond(T, |net| {
        net.node::<Client>(viewer)
            .announced_tracks()
            .iter()
            .any(|t| t.kind == kind)
    });
    assert!(found.is_some(), "{kind:?} track announced");
    s.c(viewer)
        .announced_tracks()
        .into_iter()
        .find(|t| t.kind == kind)
        .unwrap()
}

/// Alice publishes simulcast audio and video; Bob subscribes and reaches the top layer.
fn setup(seed: u64) -> Setup {
    setup_with(seed, false)
}

/// [`setup`], Bob negotiating RTX (as browsers do) when `rtx`.
fn setup_with(seed: u64, rtx: bool) -> Setup {
    let mut s = Sim::new(seed);
    let alice = s.client(1, "alice", "room", MediaSpec::simulcast());
    let bob = s.client(
        2,
        "bob",
        "room",
        MediaSpec {
            rtx,
            ..MediaSpec::none()
        },
    );
    let video = track(&mut s, bob, TrackKind::Video);
    let audio = track(&mut s, bob, TrackKind::Audio);
    assert!(
        s.wait_layer(bob, &video.id, 2, T).is_some(),
        "bob reaches f"
    );
    s.net.run_for(Duration::from_secs(2));
    Setup {
        s,
        alice,
        bob,
        video,
        audio,
    }
}

/// A 200 ms drop-tail queue at the limit (what `loadtest --subscriber-bandwidth` uses).
fn limit(u: &mut Setup, bps: Option<u64>) {
    let (server, bob) = (u.s.server, u.bob);
    *u.s.net.link_mut(server, bob) = LinkConfig {
        rate_bps: bps,
        queue_bytes: 7_500,
        ..LinkConfig::default()
    };
}

/// Frame starts of `t` received in `[from, to)`, with their layers.
fn frames(t: &RxTrack, from: Instant, to: Instant) -> Vec<(Instant, u8)> {
    t.packets
        .iter()
        .filter(|p| p.at >= from && p.at < to)
        .filter_map(|p| {
            let v = p.vp8?;
            v.frame_start.then_some((p.at, v.layer?))
        })
        .collect()
}

/// The longest time without a packet among `packets` in `[from, to)` (edges included).
fn longest_gap<'a>(
    packets: impl Iterator<Item = &'a RxPacket>,
    from: Instant,
    to: Instant,
) -> Duration {
    let mut last = from;
    let mut gap = Duration::ZERO;
    for p in packets.filter(|p| p.at >= from && p.at < to) {
        gap = gap.max(p.at - last);
        last = p.at;
    }
    gap.max(to - last)
}

/// Sequence numbers missing from `packets` (received, in order of arrival).
fn missing(packets: &[RxPacket]) -> u64 {
    let mut seqs = unwrap_seqs(packets.iter());
    seqs.sort_unstable();
    seqs.dedup();
    match (seqs.first(), seqs.last()) {
        (Some(a), Some(b)) => b - a + 1 - seqs.len() as u64,
        _ => 0,
    }
}

/// What `t` received from the first keyframe of a layer above q at or after `from` on (the
/// first up-switch; retransmissions of older packets left out).
fn since_up_switch(t: &RxTrack, from: Instant) -> RxTrack {
    let start = t
        .packets
        .iter()
        .find(|p| {
            p.at >= from
                && p.vp8
                    .is_some_and(|v| v.keyframe && v.frame_start && v.layer > Some(0))
        })
        .cloned()
        .expect("an up-switch");
    let after = |p: &&RxPacket| p.at >= start.at && p.seq.wrapping_sub(start.seq) < 0x8000;
    RxTrack {
        packets: t.packets.iter().filter(after).cloned().collect(),
        padding: t.padding.iter().filter(after).cloned().collect(),
        ..t.clone()
    }
}

/// A subscriber held on q by a 300 kbit/s limit for 30 s is back on f within 3 s of the
/// limit being lifted; six runs, the lift falling at a different point of the probes'
/// backoff each time (30 s + 0, 0.35, … 1.75 s).
#[test]
fn the_top_layer_returns_within_3_s_of_a_30_s_limit_lifting() {
    let mut ups = Vec::new();
    for k in 0..6u64 {
        ups.push(lift_after(
            61 + k,
            Duration::from_millis(30_000 + 350 * k),
            false,
        ));
    }
    println!(
        "back on f after the lift: {:?} ms",
        ups.iter().map(|d| ms(*d).round()).collect::<Vec<_>>()
    );
    for up in ups {
        assert!(
            up <= Duration::from_secs(3),
            "f again {up:?} after the lift"
        );
    }
}

/// A subscriber that negotiated RTX is probed on its RTX stream: its media stream carries no
/// padding (its numbering is the publisher's), and f still returns within 3 s of the lift.
#[test]
fn an_rtx_subscriber_is_probed_on_its_rtx_stream() {
    let up = lift_after(71, Duration::from_secs(20), true);
    assert!(
        up <= Duration::from_secs(3),
        "f again {up:?} after the lift"
    );
}

fn lift_after(seed: u64, limited: Duration, rtx: bool) -> Duration {
    let mut u = setup_with(seed, rtx);
    limit(&mut u, Some(LIMIT_BPS));
    let cut = u.s.net.now();
    let vid = u.video.id.clone();
    let down = u.s.wait_layer(u.bob, &vid, 0, Duration::from_secs(5));
    assert!(down.is_some(), "down to q within 5 s of the cut");
    let left = limited.saturating_sub(u.s.net.now() - cut);
    u.s.net.run_for(left);
    assert_eq!(
        u.s.rx(u.bob, &vid).current_layer(),
        Some(0),
        "q under the limit"
    );
    let before = u.s.stats();
    limit(&mut u, None);
    let lifted = u.s.net.now();
    let up = u.s.wait_layer(u.bob, &vid, 2, Duration::from_secs(10));
    let up = up.expect("back on f within 10 s");
    let after = u.s.stats();
    println!(
        "seed {seed}: f again {:.0} ms after the lift; probes {} ({} ok, {} failed), {} padding \
         bytes in all, {} while recovering",
        ms(up),
        after.probe_clusters,
        after.probe_clusters_succeeded,
        after.probe_clusters_failed,
        after.probe_padding_bytes,
        after.probe_padding_bytes - before.probe_padding_bytes,
    );
    assert!(after.probe_clusters_succeeded >= 1);
    assert!(after.probe_padding_bytes > 0, "padding was sent");
    u.s.net.run_for(Duration::from_secs(2));
    let video = u.s.rx(u.bob, &vid);
    // From the lift on (the cut itself lost packets at the bottleneck): one clean stream,
    // padding included, switching up only at keyframes.
    let since = since_up_switch(&video, lifted);
    assert_eq!(
        since.padding.is_empty(),
        rtx,
        "the probes' padding reached the subscriber on the media stream only without RTX"
    );
    assert!(assert_clean_stream(&since, &SIZES) >= 1, "switched up");
    let (alice, bob) = (u.alice, u.bob);
    u.s.no_errors(&[alice, bob]);
    up
}

/// Behind a lasting 300 kbit/s limit for 60 s the subscriber stays on q: no switch up that
/// is then reverted, no gap in its video above 500 ms, its audio never starved (no gap, no
/// loss) while the probes run, and the padding they cost bounded.
#[test]
fn a_lasting_limit_is_probed_without_freezes_or_starved_audio() {
    let mut u = setup(62);
    limit(&mut u, Some(LIMIT_BPS));
    let vid = u.video.id.clone();
    let aid = u.audio.id.clone();
    assert!(
        u.s.wait_layer(u.bob, &vid, 0, Duration::from_secs(5))
            .is_some()
    );
    // Settled on q (the cut's own downgrade is behind).
    u.s.net.run_for(Duration::from_secs(3));
    let from = u.s.net.now();
    let before = u.s.stats();
    let audio_before = u.s.rx(u.bob, &aid).packets.len();
    u.s.net.run_for(Duration::from_secs(60));
    let to = u.s.net.now();
    let after = u.s.stats();
    let video = u.s.rx(u.bob, &vid);
    let audio = u.s.rx(u.bob, &aid);
    let f = frames(&video, from, to);
    let layers: Vec<u8> = f.iter().map(|(_, l)| *l).collect();
    let switches = layers.windows(2).filter(|w| w[0] != w[1]).count();
    let video_gap = longest_gap(video.packets.iter().filter(|p| p.vp8.is_some()), from, to);
    let audio_gap = longest_gap(audio.packets.iter(), from, to);
    let audio_since: Vec<RxPacket> = audio.packets[audio_before..].to_vec();
    let audio_missing = missing(&audio_since);
    let clusters = after.probe_clusters - before.probe_clusters;
    let padding = after.probe_padding_bytes - before.probe_padding_bytes;
    let share = padding as f64 * 8.0 / (60.0 * LIMIT_BPS as f64);
    println!(
        "60 s behind {LIMIT_BPS} bit/s: {} frames, {switches} layer switches, longest video gap \
         {:.0} ms, audio gap {:.0} ms, {audio_missing} audio packets missing; {clusters} probe \
         clusters ({} failed), {padding} padding bytes ({:.1} % of the link)",
        f.len(),
        ms(video_gap),
        ms(audio_gap),
        after.probe_clusters_failed - before.probe_clusters_failed,
        share * 100.0
    );
    assert!(f.len() > 1_500, "video kept flowing: {} frames", f.len());
    assert!(
        layers.iter().all(|l| *l == 0),
        "stayed on q: {switches} switches"
    );
    assert!(
        video_gap <= Duration::from_millis(500),
        "video gap {video_gap:?}"
    );
    assert!(
        audio_gap <= Duration::from_millis(150),
        "audio gap {audio_gap:?}"
    );
    assert_eq!(audio_missing, 0, "audio lost while probing");
    // Probed (rarely), and the padding is a small share of the link.
    assert!(
        (5..=120).contains(&clusters),
        "{clusters} probe clusters in 60 s"
    );
    assert!(share < 0.10, "padding {:.1} % of the link", share * 100.0);
    let (alice, bob) = (u.alice, u.bob);
    u.s.no_errors(&[alice, bob]);
}

/// A subscriber whose link has room never probes: it is on the top layer already.
#[test]
fn an_unconstrained_subscriber_sends_no_padding() {
    let mut u = setup(63);
    u.s.net.run_for(Duration::from_secs(20));
    let st = u.s.stats();
    assert_eq!(st.probe_clusters, 0);
    assert_eq!(st.probe_padding_packets, 0);
    let vid = u.video.id.clone();
    assert_eq!(u.s.rx(u.bob, &vid).current_layer(), Some(2));
}
