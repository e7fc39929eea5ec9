//! Viewers (WHEP playback) in virtual time: the real core with `rtc` clients that offer
//! recvonly audio and video, as a WHEP player does. A viewer plays the room's host with the
//! same layer selection as any subscriber (its requested quality, its bandwidth), waits when
//! nothing is published, and moves to the next host on the same SSRC with continuous
//! numbering.

use super::common::{Sim, ip, ms, unwrap_seqs};
use super::sfu::{SIZES, assert_clean_stream};
use plaza::sfu::viewing::ViewTarget;
use plaza::signal::{ClientMessage, Quality, ServerMessage};
use plaza::sim::{Client, LinkConfig, MediaSpec, NodeId, RxTrack};
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use std::time::Duration;

/// Bound of every wait, in virtual time.
const T: Duration = Duration::from_secs(20);

fn viewer(s: &mut Sim, n: u8, target: ViewTarget) -> NodeId {
    let now = s.net.now();
    let c = Client::new(
        "viewer",
        "room",
        ip(n),
        now,
        u64::from(n) * 1000,
        MediaSpec::none(),
    )
    .expect("viewer")
    .viewer(target);
    let addrs = c.addrs();
    s.net.add_node(c, &addrs)
}

/// What the viewer received of `kind` (one section each).
fn rx(s: &mut Sim, id: NodeId, kind: RtpCodecKind) -> RxTrack {
    s.c(id)
        .subscriber
        .tracks
        .values()
        .find(|t| t.kind == Some(kind))
        .cloned()
        .unwrap_or_default()
}

fn layer_is(s: &mut Sim, id: NodeId, max: Duration, want: impl Fn(u8) -> bool) -> bool {
    s.net
        .run_until_cond(max, |net| {
            net.node::<Client>(id)
                .subscriber
                .tracks
                .values()
                .find(|t| t.kind == Some(RtpCodecKind::Video))
                .and_then(|t| t.current_layer())
                .is_some_and(&want)
        })
        .is_some()
}

fn quality(q: Option<Quality>) -> ClientMessage {
    // A viewer's settings name no track: they are for its video sections.
    ClientMessage::TrackSettings {
        track_id: String::new(),
        quality: Some(q),
        width: None,
        height: None,
    }
}

/// The host's audio and simulcast video reach a viewer on one clean stream each; the viewer
/// asks for `low`, then for automatic, and gets q then f again; nobody is told it joined.
#[test]
fn a_viewer_plays_the_host_and_picks_its_layer() {
    let mut s = Sim::new(41);
    let alice = s.client(1, "alice", "room", MediaSpec::simulcast());
    let bob = s.client(2, "bob", "room", MediaSpec::none());
    s.net.run_for(Duration::from_secs(1));
    let v = viewer(&mut s, 3, ViewTarget::Host);
    assert!(layer_is(&mut s, v, T, |l| l == 2), "the viewer reaches f");
    s.c(v).send(quality(Some(Quality::Low)));
    let t = s.net.now();
    assert!(layer_is(&mut s, v, T, |l| l == 0), "low → q");
    println!("viewer to q in {:.0} ms (virtual)", ms(s.net.now() - t));
    s.c(v).send(quality(None));
    assert!(layer_is(&mut s, v, T, |l| l == 2), "automatic → f again");
    s.net.run_for(Duration::from_secs(2));
    s.no_errors(&[alice, bob, v]);
    let video = rx(&mut s, v, RtpCodecKind::Video);
    assert!(
        assert_clean_stream(&video, &SIZES) >= 2,
        "switched down and up"
    );
    let audio = rx(&mut s, v, RtpCodecKind::Audio);
    assert!(audio.packets.len() > 100, "audio: {}", audio.packets.len());
    // Hidden, and told nothing about the room.
    for id in [alice, bob] {
        let joined = s.c(id).count_messages(|m| {
            matches!(m, ServerMessage::ParticipantJoined { participant } if participant.name == "viewer")
        });
        assert_eq!(joined, 0, "the viewer is not announced");
    }
    let events: Vec<String> = s
        .c(v)
        .messages
        .iter()
        .filter(|(_, m)| !matches!(m, ServerMessage::PublishAnswer { .. }))
        .map(|(_, m)| format!("{m:?}"))
        .collect();
    assert!(
        events.is_empty(),
        "a viewer gets no room events: {events:?}"
    );
}

/// A viewer that joins an empty room waits; it plays the first host once it publishes, and
/// when that host leaves, the next one, on the same SSRC with consecutive sequence numbers.
#[test]
fn a_viewer_waits_for_the_host_and_follows_the_next_one() {
    let mut s = Sim::new(42);
    let v = viewer(&mut s, 3, ViewTarget::Host);
    s.net.run_for(Duration::from_secs(3));
    assert!(s.c(v).subscriber.is_connected(), "connected while waiting");
    assert!(
        rx(&mut s, v, RtpCodecKind::Video).packets.is_empty(),
        "nothing to play yet"
    );
    let alice = s.client(1, "alice", "room", MediaSpec::audio_video());
    assert!(
        layer_is(&mut s, v, T, |_| true),
        "plays the host once it publishes"
    );
    s.net.run_for(Duration::from_secs(2));
    let before = rx(&mut s, v, RtpCodecKind::Video).packets.len();
    s.c(alice).send(ClientMessage::Leave);
    s.net.run_for(Duration::from_secs(1));
    let bob = s.client(2, "bob", "room", MediaSpec::audio_video());
    let took = s.net.run_until_cond(T, |net| {
        net.node::<Client>(v)
            .subscriber
            .tracks
            .values()
            .find(|t| t.kind == Some(RtpCodecKind::Video))
            .is_some_and(|t| t.packets.len() > before + 60)
    });
    assert!(took.is_some(), "the next host plays");
    s.no_errors(&[bob, v]);
    for kind in [RtpCodecKind::Video, RtpCodecKind::Audio] {
        let t = rx(&mut s, v, kind);
        assert_eq!(t.ssrcs().len(), 1, "{kind:?}: one SSRC for the session");
        let seqs = unwrap_seqs(t.packets.iter());
        for w in seqs.windows(2) {
            assert_eq!(w[1], w[0] + 1, "{kind:?}: consecutive sequence numbers");
        }
        for w in t.packets.windows(2) {
            let step = w[1].ts.wrapping_sub(w[0].ts);
            assert!(step < 1 << 31, "{kind:?}: timestamps never go back");
        }
    }
    assert_clean_stream(&rx(&mut s, v, RtpCodecKind::Video), &[(640, 360)]);
}

/// A viewer behind a 400 kbit/s link is moved down to q within seconds, and back to f once
/// the limit is lifted; another subscriber is not affected.
#[test]
fn a_viewer_behind_a_bandwidth_cut_switches_down() {
    let mut s = Sim::new(43);
    let alice = s.client(1, "alice", "room", MediaSpec::simulcast());
    let v = viewer(&mut s, 3, ViewTarget::Host);
    assert!(layer_is(&mut s, v, T, |l| l == 2), "unconstrained: f");
    s.net.run_for(Duration::from_secs(3));
    let server = s.server;
    *s.net.link_mut(server, v) = LinkConfig {
        rate_bps: Some(400_000),
        queue_bytes: 30_000,
        ..LinkConfig::default()
    };
    let cut = s.net.now();
    assert!(
        layer_is(&mut s, v, Duration::from_secs(4), |l| l < 2),
        "no downgrade within 4 s of a 400 kbit/s cut"
    );
    let down = s.net.now() - cut;
    s.net.run_for(Duration::from_secs(5));
    assert_eq!(
        rx(&mut s, v, RtpCodecKind::Video).current_layer(),
        Some(0),
        "only q fits 400 kbit/s"
    );
    *s.net.link_mut(server, v) = LinkConfig::default();
    let lifted = s.net.now();
    assert!(
        layer_is(&mut s, v, Duration::from_secs(60), |l| l == 2),
        "back to f within 60 s of lifting the limit"
    );
    s.no_errors(&[alice, v]);
    println!(
        "viewer bandwidth: downgrade {:.0} ms after the cut, recovery {:.0} ms after the lift",
        ms(down),
        ms(s.net.now() - lifted)
    );
}

/// A viewer of a named participant plays that one, not the room's host.
#[test]
fn a_viewer_of_a_named_participant() {
    let mut s = Sim::new(44);
    let alice = s.client(1, "alice", "room", MediaSpec::audio_video());
    s.net.run_for(Duration::from_secs(1));
    let bob = s.client(2, "bob", "room", MediaSpec::simulcast());
    s.net.run_for(Duration::from_secs(1));
    let bob_pid = s.pid(bob);
    let v = viewer(&mut s, 3, ViewTarget::Participant(bob_pid));
    assert!(
        layer_is(&mut s, v, T, |l| l == 2),
        "bob's simulcast (alice sends no layers)"
    );
    s.no_errors(&[alice, bob, v]);
}
