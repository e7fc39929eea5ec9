//! RTX (RFC 4588) in virtual time: retransmissions to a subscriber that negotiated RTX go on
//! its RTX stream (and its `rtc` stack unwraps them into the stream it plays), those to one
//! that did not go on the media SSRC; a publisher that negotiated RTX repairs its lossy uplink
//! on its RTX stream, which the server's fast path unwraps and forwards; a subscriber on a
//! randomly lossy link gets its losses repaired though its loss-based estimate collapsed.

use super::common::{Sim, unwrap_seqs};
use plaza::signal::{TrackInfo, TrackKind};
use plaza::sim::{Client, MediaSpec, NodeId, RxTrack};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

fn with_rtx(media: MediaSpec) -> MediaSpec {
    MediaSpec { rtx: true, ..media }
}

/// The video track `publisher` published, as `viewer` had it announced.
fn video(s: &mut Sim, viewer: NodeId, publisher: NodeId) -> TrackInfo {
    let joined = s.net.run_until_cond(T, |net| {
        net.node::<Client>(publisher).participant_id.is_some()
    });
    assert!(joined.is_some(), "the publisher joined");
    let pid = s.c(publisher).participant_id.clone();
    let pick = |c: &Client| {
        c.announced_tracks()
            .into_iter()
            .find(|t| Some(&t.participant_id) == pid.as_ref() && t.kind == TrackKind::Video)
    };
    let found = s
        .net
        .run_until_cond(T, |net| pick(net.node::<Client>(viewer)).is_some());
    assert!(found.is_some(), "video announced to the viewer");
    pick(s.c(viewer)).expect("found")
}

/// Sequence numbers of `t`'s first SSRC never received, of how many in its span.
fn missing(t: &RxTrack) -> (u64, u64) {
    let ssrc = t.ssrcs()[0];
    let mut seqs = unwrap_seqs(t.packets.iter().filter(|p| p.ssrc == ssrc));
    seqs.sort_unstable();
    let span = seqs.last().unwrap() - seqs.first().unwrap() + 1;
    seqs.dedup();
    (span - seqs.len() as u64, span)
}

#[test]
fn subscribers_with_rtx_get_their_repairs_on_the_rtx_stream() {
    let mut s = Sim::new(41);
    let alice = s.client(1, "alice", "room", MediaSpec::audio_video());
    let bob = s.client(2, "bob", "room", with_rtx(MediaSpec::none()));
    let carol = s.client(3, "carol", "room", MediaSpec::none());
    let track = video(&mut s, bob, alice);
    s.net.run_for(Duration::from_secs(2));
    // The offer bob answered announced an RTX stream for the video (FID group).
    let offer = s
        .c(bob)
        .subscriber
        .pc
        .remote_description()
        .map(|d| d.sdp.clone())
        .expect("bob's subscriber offer");
    assert!(offer.contains("a=ssrc-group:FID "), "{offer}");
    let server = s.server;
    for viewer in [bob, carol] {
        s.net.link_mut(server, viewer).loss = 0.05;
    }
    s.net.run_for(Duration::from_secs(10));
    for viewer in [bob, carol] {
        s.net.link_mut(server, viewer).loss = 0.0;
    }
    s.net.run_for(Duration::from_secs(1));
    let st = s.stats();
    println!(
        "5 % downlink loss for 10 s: resent {} (rtx {}, media {}), refused {}, over budget {}",
        st.nack_resent,
        st.nack_resent_rtx,
        st.nack_resent_media,
        st.nack_refused,
        st.nack_over_budget
    );
    assert!(st.nack_resent_rtx > 10, "{st:?}");
    assert!(st.nack_resent_media > 10, "{st:?}");
    assert_eq!(st.nack_resent, st.nack_resent_rtx + st.nack_resent_media);
    // Both streams are whole but for a few repairs lost themselves or given up.
    for (viewer, name) in [(bob, "bob"), (carol, "carol")] {
        let t = s.rx(viewer, &track.id);
        let (miss, span) = missing(&t);
        let lost = s.net.link_stats(server, viewer).lost;
        println!(
            "{name}: {lost} datagrams lost on the way, {miss} of {span} video packets missing"
        );
        assert!(lost > 50, "{name}: {lost}");
        assert!(miss * 100 <= span, "{name}: {miss} of {span} missing");
        // What bob's stack delivered is the media stream: the RTX packets were unwrapped.
        assert!(t.packets.iter().all(|p| p.pt == 96), "{name}");
        assert_eq!(t.ssrcs().len(), 1, "{name}: {:?}", t.ssrcs());
    }
    s.no_errors(&[alice, bob, carol]);
}

#[test]
fn a_publishers_rtx_repairs_are_unwrapped_and_forwarded() {
    let mut s = Sim::new(42);
    let alice = s.client(1, "alice", "room", with_rtx(MediaSpec::audio_video()));
    let bob = s.client(2, "bob", "room", MediaSpec::none());
    let track = video(&mut s, bob, alice);
    s.net.run_for(Duration::from_secs(2));
    let server = s.server;
    s.net.link_mut(alice, server).loss = 0.03;
    s.net.run_for(Duration::from_secs(10));
    s.net.link_mut(alice, server).loss = 0.0;
    s.net.run_for(Duration::from_secs(1));
    let st = s.stats();
    let lost = s.net.link_stats(alice, server).lost;
    let t = s.rx(bob, &track.id);
    let (miss, span) = missing(&t);
    println!(
        "3 % uplink loss for 10 s: {lost} lost, NACKed {}, RTX repairs forwarded {}, \
         duplicates {}, padding {}; {miss} of {span} missing at bob",
        st.nack_sent_to_publishers,
        st.publisher_rtx_repaired,
        st.publisher_rtx_duplicate,
        st.publisher_rtx_padding
    );
    assert!(lost > 20, "{lost}");
    assert!(st.publisher_rtx_repaired > 10, "{st:?}");
    assert!(miss * 100 <= span, "{miss} of {span} missing");
    assert!(t.packets.iter().all(|p| p.pt == 96));
    s.no_errors(&[alice, bob]);
}

/// A subscriber on a link with 10 % random loss and 100 ms delay each way: its loss-based
/// estimate sits far below what the link delivers (the lowest layer is sent anyway), and the
/// retransmission budget, a share of what the link delivers, still repairs its losses: 0–1.2 %
/// of the video packets stay missing over seeds 43–50, against 1.9–5.2 % with a share of the
/// estimate alone (in a browser, each such hole freezes the picture until the next keyframe).
#[test]
fn a_randomly_lossy_link_is_repaired_though_its_estimate_collapsed() {
    // Summed over four seeds: one seed's count moves by a few packets from one process to the
    // next (the DTLS handshake's randomness is not seeded).
    let (mut miss, mut span) = (0, 0);
    for seed in 43..47 {
        let (m, n) = lossy_link_missing(seed);
        miss += m;
        span += n;
    }
    assert!(
        miss * 1000 <= span * 15,
        "{miss} of {span} video packets missing over four seeds"
    );
}

/// One run of [`a_randomly_lossy_link_is_repaired_though_its_estimate_collapsed`]: (video
/// packets missing, video packets in the span).
fn lossy_link_missing(seed: u64) -> (u64, u64) {
    let mut s = Sim::new(seed);
    let alice = s.client(1, "alice", "room", MediaSpec::simulcast());
    let bob = s.client(2, "bob", "room", with_rtx(MediaSpec::none()));
    let track = video(&mut s, bob, alice);
    s.net.run_for(Duration::from_secs(3));
    let server = s.server;
    for (from, to) in [(server, bob), (bob, server)] {
        let link = s.net.link_mut(from, to);
        link.loss = 0.1;
        link.delay = Duration::from_millis(100);
    }
    let start = s.net.now();
    s.net.run_for(Duration::from_secs(30));
    let end = s.net.now();
    for (from, to) in [(server, bob), (bob, server)] {
        let link = s.net.link_mut(from, to);
        link.loss = 0.0;
        link.delay = Duration::from_millis(10);
    }
    s.net.run_for(Duration::from_secs(1));
    let st = s.stats();
    // The video packets that first arrived in the last 27 s of the loss (after the switch to
    // the lowest layer), by sequence number, and those in their span that never arrived.
    let t = s.rx(bob, &track.id);
    let ssrc = t.ssrcs()[0];
    let mine: Vec<_> = t.packets.iter().filter(|p| p.ssrc == ssrc).collect();
    let seqs = unwrap_seqs(mine.iter().copied());
    let window = |at| at >= start + Duration::from_secs(3) && at <= end;
    let first = seqs
        .iter()
        .zip(&mine)
        .filter(|(_, p)| window(p.at))
        .map(|(s, _)| *s);
    let (lo, hi) = first.fold((u64::MAX, 0), |(lo, hi), s| (lo.min(s), hi.max(s)));
    let mut got: Vec<u64> = seqs
        .iter()
        .copied()
        .filter(|s| (lo..=hi).contains(s))
        .collect();
    got.sort_unstable();
    got.dedup();
    let span = hi - lo + 1;
    let miss = span - got.len() as u64;
    let lost = s.net.link_stats(server, bob).lost;
    println!(
        "seed {seed}, 10 % loss, 200 ms RTT for 30 s: {lost} datagrams lost, {miss} of {span} \
         video packets never arrived; resent {}, refused {}, over budget {}",
        st.nack_resent, st.nack_refused, st.nack_over_budget
    );
    assert!(lost > 100, "{lost}");
    assert!(span > 200, "{span}");
    s.no_errors(&[alice, bob]);
    (miss, span)
}
