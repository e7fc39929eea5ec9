//! Redundant audio (RFC 2198 `audio/red`) end to end: a real server and hand-built webrtc-rs
//! peers over loopback. A publisher offers Opus and RED in Chromium's order and sends RED
//! packets built here (two redundant blocks each, a malformed one now and then); a subscriber
//! with RED receives them as RED, byte for byte, and one without RED receives each packet's
//! primary block as plain Opus.

// A test, not the packet path: shares state between tasks and times deadlines with the clock;
// its hand-built webrtc-rs peers are awaited in place.
#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    clippy::large_futures
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use plaza::sfu::red;
use plaza::signal::{PcTarget, TrackKind};
use plaza_testkit::manual::Client;
use plaza_testkit::support::{self, TestServer};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::media_engine::MIME_TYPE_OPUS;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters,
    RtpCodecKind,
};
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::peer_connection::MediaEngine;

/// Samples per 20 ms Opus frame at 48 kHz: the timestamp step, and a redundant block's offset.
const FRAME: u32 = 960;
const RED_PT: u8 = 63;
const OPUS_PT: u8 = 111;
/// Every this many packets the publisher sends a malformed RED payload.
const MALFORMED_EVERY: u32 = 25;

fn codec(pt: u8, mime: &str, fmtp: &str) -> RTCRtpCodecParameters {
    RTCRtpCodecParameters {
        rtp_codec: RTCRtpCodec {
            mime_type: mime.to_owned(),
            clock_rate: 48_000,
            channels: 2,
            sdp_fmtp_line: fmtp.to_owned(),
            rtcp_feedback: vec![],
        },
        payload_type: pt,
    }
}

/// Opus, then (with `red`) RED: the codecs and the order Chromium offers.
fn media_engine(red: bool) -> MediaEngine {
    let mut me = MediaEngine::default();
    me.register_codec(
        codec(OPUS_PT, MIME_TYPE_OPUS, "minptime=10;useinbandfec=1"),
        RtpCodecKind::Audio,
    )
    .unwrap();
    if red {
        me.register_codec(
            codec(RED_PT, red::MIME_TYPE_RED, "111/111"),
            RtpCodecKind::Audio,
        )
        .unwrap();
    }
    me
}

/// A subscriber (with RED when `red`) whose subscriber connection is up.
async fn subscriber(url: &str, room: &str, name: &str, red: bool) -> Client {
    let mut c = Client::join(url, room, name, media_engine(red), PcTarget::Subscriber).await;
    c.start_subscriber().await;
    c
}

/// Adds an audio track whose encoding names no codec, so its section offers every registered
/// codec (Opus and RED, in that order, as Chromium does); publishes it; returns the track and
/// the server's answer.
async fn publish_audio(c: &mut Client, ssrc: u32) -> (Arc<TrackLocalStaticRTP>, String) {
    let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
        "red-stream".to_owned(),
        "red-audio".to_owned(),
        "red audio".to_owned(),
        RtpCodecKind::Audio,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                ssrc: Some(ssrc),
                ..Default::default()
            },
            ..Default::default()
        }],
    )));
    let answer = c.publish(track.clone() as Arc<dyn TrackLocal>).await;
    (track, answer)
}

/// The primary block of packet `i`: its number, then filler of a length that varies.
fn frame(i: u32) -> Vec<u8> {
    let mut f = vec![b'P'];
    f.extend_from_slice(&i.to_be_bytes());
    f.extend(std::iter::repeat_n((i % 251) as u8, 20 + (i % 40) as usize));
    f
}

/// The number of the frame `data` is (None: not a frame).
fn frame_number(data: &[u8]) -> Option<u32> {
    let i = u32::from_be_bytes(data.get(1..5)?.try_into().ok()?);
    (data == frame(i).as_slice()).then_some(i)
}

/// Packet `i` as Chromium's RED encoder would write it: the two previous frames as redundant
/// blocks (oldest first), then frame `i`; every `MALFORMED_EVERY`th a truncated header.
fn red_payload(i: u32) -> Vec<u8> {
    if i % MALFORMED_EVERY == MALFORMED_EVERY - 1 {
        return vec![0x80 | OPUS_PT, 0, 0];
    }
    let older: Vec<(u8, u16, Vec<u8>)> = (1..=2u32)
        .rev()
        .filter(|&k| i >= k)
        .map(|k| (OPUS_PT, (k * FRAME) as u16, frame(i - k)))
        .collect();
    let refs: Vec<(u8, u16, &[u8])> = older
        .iter()
        .map(|(pt, off, d)| (*pt, *off, d.as_slice()))
        .collect();
    red::build(&refs, OPUS_PT, &frame(i))
}

/// Sends RED packets every 10 ms until `stop`.
fn spawn_sender(track: Arc<TrackLocalStaticRTP>, ssrc: u32, stop: Arc<AtomicBool>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let mut i: u32 = 0;
        while !stop.load(Ordering::Relaxed) && i < 6000 {
            tick.tick().await;
            let packet = rtc::rtp::Packet {
                header: rtc::rtp::header::Header {
                    version: 2,
                    payload_type: RED_PT,
                    sequence_number: (1000 + i) as u16,
                    timestamp: 50_000 + i * FRAME,
                    ssrc,
                    ..Default::default()
                },
                payload: Bytes::from(red_payload(i)),
            };
            if track.write_rtp(packet).await.is_err() {
                // Not bound yet: try the same packet number again.
                continue;
            }
            i += 1;
        }
    });
}

/// The payload types of the `m=audio` line of `sdp`, in order.
fn audio_pts(sdp: &str) -> Vec<u8> {
    sdp.lines()
        .find(|l| l.starts_with("m=audio"))
        .map(|l| {
            l.split_whitespace()
                .skip(3)
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn red_reaches_red_subscribers_as_red_and_others_as_opus() {
    let server = TestServer::start().await;
    red_to_both(&server).await;
    server.shutdown().await;
}

/// The same across shards: the room spreads from its second participant on, so the
/// subscribers are on different shards and one of them gets the RED track over the pipe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn red_crosses_shards() {
    let server = TestServer::start_with(plaza::config::Config {
        workers: 2,
        room_spread_above: 1,
        ..support::test_config()
    })
    .await;
    red_to_both(&server).await;
    let h = server.healthz().await.unwrap().1;
    let per_shard: Vec<u64> = h["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["rtp_packets_forwarded"].as_u64().unwrap())
        .collect();
    assert!(
        per_shard.iter().all(|&n| n > 0),
        "both shards forwarded: {h}"
    );
    assert!(h["rtp_packets_piped"].as_u64() > Some(0), "{h}");
    server.shutdown().await;
}

/// A RED publisher and two subscribers, one with RED and one without, in one room of `server`.
async fn red_to_both(server: &TestServer) {
    let url = server.ws_url();
    let room = "red";
    let mut with_red = subscriber(&url, room, "with-red", true).await;
    let mut opus_only = subscriber(&url, room, "opus-only", false).await;

    let mut publ = Client::join(&url, room, "pub", media_engine(true), PcTarget::Publisher).await;
    let ssrc = 0x5eed_0001;
    let (track, answer) = publish_audio(&mut publ, ssrc).await;
    // Chromium sends RED only where the answer lists it ahead of Opus.
    assert_eq!(
        audio_pts(&answer),
        [RED_PT, OPUS_PT],
        "the publisher's answer lists RED first:\n{answer}"
    );
    let stop = Arc::new(AtomicBool::new(false));
    spawn_sender(track, ssrc, stop.clone());

    let info = with_red.track_published().await;
    assert_eq!(info.kind, TrackKind::Audio);
    assert!(
        info.mime_type.eq_ignore_ascii_case(red::MIME_TYPE_RED),
        "the track is announced as RED: {info:?}"
    );
    let offer = with_red.subscribe(&info.id).await;
    assert!(
        offer.contains("a=rtpmap:63 red/48000/2") && offer.contains("a=fmtp:63 111/111"),
        "the subscriber offer carries RED:\n{offer}"
    );
    assert!(
        offer.contains("a=fmtp:111 minptime=10;useinbandfec=1"),
        "subscribers' decoders are told of Opus in-band FEC:\n{offer}"
    );
    let _ = opus_only.track_published().await;
    opus_only.subscribe(&info.id).await;

    let red_got = with_red.wait_packets(&info.id, 100).await;
    let opus_got = opus_only.wait_packets(&info.id, 100).await;
    stop.store(true, Ordering::Relaxed);

    // The RED subscriber: RED on its RED payload type, the payload byte for byte as sent
    // (malformed ones too: it reads them itself), timestamps one frame apart.
    let mut frames = 0;
    for w in red_got.windows(2) {
        assert_eq!(
            w[1].seq,
            w[0].seq.wrapping_add(1),
            "consecutive sequence numbers"
        );
        assert_eq!(w[1].ts.wrapping_sub(w[0].ts), FRAME, "one frame apart");
    }
    for g in &red_got {
        assert_eq!(g.pt, RED_PT, "{g:?}");
        let Ok(r) = red::parse(&g.payload) else {
            assert_eq!(
                &g.payload[..],
                &[0x80 | OPUS_PT, 0, 0],
                "only the malformed ones"
            );
            continue;
        };
        let i = frame_number(&g.payload[r.primary.data.clone()]).expect("a frame");
        assert_eq!(
            &g.payload[..],
            red_payload(i).as_slice(),
            "forwarded untouched"
        );
        frames += 1;
    }
    assert!(frames >= 90, "{frames} RED frames");

    // The subscriber without RED: plain Opus on its Opus payload type, each payload exactly
    // one primary block, in order, the malformed packets left out.
    let numbers: Vec<u32> = opus_got
        .iter()
        .map(|g| {
            assert_eq!(g.pt, OPUS_PT, "{g:?}");
            frame_number(&g.payload)
                .unwrap_or_else(|| panic!("not a primary block: {:?}", &g.payload[..]))
        })
        .collect();
    for w in numbers.windows(2) {
        let step = w[1] - w[0];
        let skipped_malformed = step == 2 && w[0] % MALFORMED_EVERY == MALFORMED_EVERY - 2;
        assert!(
            step == 1 || skipped_malformed,
            "frames {} then {}",
            w[0],
            w[1]
        );
    }
    for (g, &i) in opus_got.iter().zip(&numbers) {
        // The timestamp is the packet's (the primary block's), on the rewritten clock.
        let first = (&opus_got[0], numbers[0]);
        assert_eq!(g.ts.wrapping_sub(first.0.ts), (i - first.1) * FRAME);
    }

    let (_, stats) = support::stats(server.http_addr).await.unwrap();
    let malformed = stats["forward_dropped"]["malformed_red"].as_u64().unwrap();
    assert!(malformed >= 1, "malformed RED is counted: {stats}");

    for c in [with_red, opus_only, publ] {
        c.close().await;
    }
}

/// A publisher without RED: its Opus goes to a RED-capable subscriber as plain Opus on the
/// Opus payload type (a RED wrapper with only a primary block would add nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opus_reaches_red_subscribers_as_opus() {
    let server = TestServer::start().await;
    let url = server.ws_url();
    let room = "opus";
    let mut with_red = subscriber(&url, room, "with-red", true).await;
    let bob = support::publisher(&server, room, "bob").await;
    let info = loop {
        let t = with_red.track_published().await;
        if t.kind == TrackKind::Audio {
            break t;
        }
    };
    assert!(
        info.mime_type.eq_ignore_ascii_case(MIME_TYPE_OPUS),
        "{info:?}"
    );
    let offer = with_red.subscribe(&info.id).await;
    assert!(offer.contains("red/48000/2"), "RED is offered:\n{offer}");
    let got = with_red.wait_packets(&info.id, 50).await;
    assert!(
        got.iter().all(|g| g.pt == OPUS_PT),
        "plain Opus: {:?}",
        got[0]
    );
    with_red.close().await;
    bob.leave().await.unwrap();
    server.shutdown().await;
}
