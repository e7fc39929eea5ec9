//! H.264 negotiation on the core alone: a Chromium publish offer that puts H.264 first is
//! answered with H.264 in the profile offered (Baseline, Constrained Baseline, Main, High),
//! never another profile; one the server does not support falls back to the next codec.

use plaza::sfu::{Command, EVENT_QUEUE, Grants, JoinRequest, Sfu};
use plaza::signal::{ClientMessage, ServerMessage};
use plaza::sim::server::{SimTransmit, sim_config};
use std::net::SocketAddr;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// A Chromium simulcast offer (VP8 first, then H.264 42001f).
const CHROMIUM_OFFER: &str = include_str!("../fuzz/seeds/sdp/chromium-simulcast-offer.sdp");

/// The offer with H.264 (payload type 102) first and its profile-level-id set to `profile`.
fn h264_first(profile: &str) -> String {
    CHROMIUM_OFFER
        .replace(
            "m=video 9 UDP/TLS/RTP/SAVPF 96 97 102 103 45 46",
            "m=video 9 UDP/TLS/RTP/SAVPF 102 103 96 97 45 46",
        )
        .replace(
            "a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f",
            &format!("a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id={profile}"),
        )
}

/// The server's answer to `offer` from a fresh publisher.
fn answer(offer: String) -> String {
    let addr: SocketAddr = "127.0.0.1:7882".parse().unwrap();
    let t0 = Instant::now();
    let mut sfu = Sfu::new(sim_config(addr.ip()), addr, 1, t0, SimTransmit::default());
    let (events, mut rx) = mpsc::channel(EVENT_QUEUE);
    let (reply, mut accepted) = oneshot::channel();
    let req = JoinRequest {
        room: "r".into(),
        name: "pub".into(),
        auto_subscribe: false,
        events,
        peers: Vec::new(),
        identity: None,
        grants: Grants::default(),
        publish_only: false,
        view: None,
        home: None,
        timeline: Default::default(),
        session: String::new(),
    };
    let _ = sfu.handle_command(t0, Command::Join { req, reply });
    let participant = accepted.try_recv().unwrap().unwrap().participant_id;
    let msg = ClientMessage::PublishOffer { sdp: offer };
    let _ = sfu.handle_command(t0, Command::Client { participant, msg });
    sfu.end_turn(t0);
    while let Ok(m) = rx.try_recv() {
        if let ServerMessage::PublishAnswer { sdp } = m {
            return sdp;
        }
    }
    panic!("no publish_answer");
}

/// The first payload type of the answer's video section: (codec name, fmtp line).
fn first_video_format(sdp: &str) -> (String, String) {
    let video = sdp
        .split("m=")
        .find(|s| s.starts_with("video"))
        .expect("a video section");
    let pt = video
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .nth(3)
        .expect("a payload type");
    let attr = |name: &str| {
        video
            .lines()
            .find_map(|l| l.strip_prefix(&format!("a={name}:{pt} ")))
            .unwrap_or_default()
            .trim()
            .to_owned()
    };
    (attr("rtpmap"), attr("fmtp"))
}

#[test]
fn h264_is_answered_in_the_profile_offered() {
    for profile in ["42001f", "42e01f", "4d001f", "640c1f", "640034"] {
        let (codec, fmtp) = first_video_format(&answer(h264_first(profile)));
        assert_eq!(codec, "H264/90000", "{profile}");
        assert!(fmtp.contains("packetization-mode=1"), "{profile}: {fmtp}");
        let answered = fmtp
            .split(';')
            .find_map(|kv| kv.strip_prefix("profile-level-id="))
            .unwrap_or_default()
            .to_ascii_lowercase();
        assert_eq!(answered.get(..4), profile.get(..4), "{profile}: {fmtp}");
    }
}

#[test]
fn an_unsupported_h264_profile_falls_back_to_the_next_codec() {
    // High 4:4:4 Predictive: not among the server's formats.
    let (codec, fmtp) = first_video_format(&answer(h264_first("f4001f")));
    assert_eq!(codec, "VP8/90000", "{fmtp}");
}
