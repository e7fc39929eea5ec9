//! A subscriber's loss that the NACK responder cannot repair asks the publisher for a
//! keyframe: a video packet lost every time it is sent (the original and each
//! retransmission) leaves the subscriber's decoder stalled until the next keyframe, and the
//! server asks for that keyframe itself (a browser would ask only after ~3 s without a
//! decodable frame), once, not once per NACK.

use super::common::{Sim, ms};
use plaza::signal::TrackKind;
use plaza::sim::{Client, MediaSpec, NodeId, RtcpIn};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

fn plis(s: &mut Sim, publisher: NodeId) -> usize {
    s.c(publisher)
        .publisher
        .as_ref()
        .expect("a publisher")
        .rtcp_count(|r| matches!(r, RtcpIn::Pli { .. }))
}

#[test]
fn an_unrepairable_loss_gets_a_keyframe_from_the_publisher() {
    let mut s = Sim::new(61);
    // No periodic keyframes: every keyframe after the first is one somebody asked for.
    let alice = s.client(1, "alice", "room", MediaSpec::audio_video());
    let bob = s.client(2, "bob", "room", MediaSpec::none());
    let server = s.server;
    let joined = s
        .net
        .run_until_cond(T, |net| net.node::<Client>(alice).participant_id.is_some());
    assert!(joined.is_some(), "alice joined");
    let pid = s.pid(alice);
    let video = s.net.run_until_cond(T, |net| {
        net.node::<Client>(bob)
            .announced_tracks()
            .iter()
            .any(|t| t.participant_id == pid && t.kind == TrackKind::Video)
    });
    assert!(video.is_some(), "alice's video announced to bob");
    let track = s
        .c(bob)
        .announced_tracks()
        .into_iter()
        .find(|t| t.participant_id == pid && t.kind == TrackKind::Video)
        .expect("video")
        .id;
    // A distant subscriber: 100 ms each way.
    for (from, to) in [(server, bob), (bob, server)] {
        s.net.link_mut(from, to).delay = Duration::from_millis(100);
    }
    s.net.run_for(Duration::from_secs(3));
    let rx = s.rx(bob, &track);
    assert!(rx.keyframes().count() >= 1, "bob's video started");
    let ssrc = rx.ssrcs()[0];
    let last = rx.packets.last().expect("video").seq;
    // A packet about 150 ms ahead is lost, and so is every retransmission of it.
    let doomed = last.wrapping_add(10);
    s.net.drop_rtp(server, bob, ssrc, doomed);
    let plis_before = plis(&mut s, alice);
    let keyframe_after_loss = |net: &mut plaza::sim::Net| {
        let t = &net.node_ref::<Client>(bob).subscriber.tracks[&track];
        let lost_at = t
            .packets
            .iter()
            .find(|p| p.seq.wrapping_sub(doomed) < 0x8000 && p.seq != doomed)
            .map(|p| p.at);
        lost_at.and_then(|l| {
            t.since(l)
                .find(|p| p.vp8.is_some_and(|v| v.keyframe))
                .map(|p| p.at - l)
        })
    };
    let got = s.net.run_until_cond(Duration::from_secs(3), |net| {
        keyframe_after_loss(net).is_some()
    });
    let rx = s.rx(bob, &track);
    assert!(
        !rx.packets.iter().any(|p| p.seq == doomed),
        "the packet was never delivered"
    );
    let st = s.stats();
    assert!(
        got.is_some(),
        "no keyframe within 3 s of the loss: {} PLIs, unrepairable {}, refused {}",
        plis(&mut s, alice) - plis_before,
        st.nack_unrepairable,
        st.nack_refused
    );
    let stall = keyframe_after_loss(&mut s.net).expect("keyframe");
    println!(
        "unrepairable loss at 200 ms RTT: keyframe {:.0} ms after the packets following it \
         arrived; resent {}, refused {}, unrepairable {}",
        ms(stall),
        st.nack_resent,
        st.nack_refused,
        st.nack_unrepairable
    );
    assert!(stall < Duration::from_millis(1_500), "{stall:?}");
    assert!(plis(&mut s, alice) > plis_before, "the publisher saw a PLI");
    assert!(st.nack_unrepairable >= 1, "{st:?}");
    // Bounded: the subscriber keeps NACKing the lost packet, but the keyframe made it moot;
    // no more keyframe requests for it.
    s.net.run_for(Duration::from_secs(5));
    let st = s.stats();
    let n = plis(&mut s, alice) - plis_before;
    assert!(n <= 2, "{n} PLIs for one lost packet");
    assert!(st.nack_unrepairable <= 2, "{st:?}");
    assert!(
        st.nack_refused >= 3,
        "the lost packet was NACKed on after the keyframe: {st:?}"
    );
    s.no_errors(&[alice, bob]);
}
