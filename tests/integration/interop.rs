//! Offers shaped like other clients' (no `a=msid`, the same msid twice, no way to demultiplex):
//! a published track is its m-section's receiver, never its msid, and what cannot be
//! demultiplexed is refused with an error naming the m-section.
//!
//! The publisher is a webrtc-rs peer whose offer is rewritten before it is sent, the way werift
//! (no msid) or a GStreamer webrtcbin offer made before its caps exist (no SSRC) look.

use plaza_testkit::{self as common, support};

use common::{Peer, PeerOptions};
use plaza::signal::TrackKind;
use support::*;

/// The offer without any msid (werift's default).
fn strip_msid(sdp: &str) -> String {
    let names_msid = |l: &str| l.starts_with("a=ssrc:") && l.contains(" msid:");
    keep_lines(sdp, |l| !l.starts_with("a=msid:") && !names_msid(l))
}

/// The same msid on every m-section.
fn same_msid(sdp: &str) -> String {
    let mut first: Option<String> = None;
    sdp.split("\r\n")
        .map(|l| match l.strip_prefix("a=msid:") {
            Some(v) => {
                let v = first.get_or_insert_with(|| v.to_owned());
                format!("a=msid:{v}")
            }
            None => l.to_owned(),
        })
        .filter(|l| !(l.starts_with("a=ssrc:") && l.contains(" msid:")))
        .collect::<Vec<_>>()
        .join("\r\n")
}

/// No msid and no SSRC: several m-sections whose RTP cannot be told apart.
fn strip_msid_and_ssrc(sdp: &str) -> String {
    keep_lines(&strip_msid(sdp), |l| {
        !l.starts_with("a=ssrc:") && !l.starts_with("a=ssrc-group:")
    })
}

fn keep_lines(sdp: &str, keep: impl Fn(&str) -> bool) -> String {
    sdp.split("\r\n")
        .filter(|l| keep(l))
        .collect::<Vec<_>>()
        .join("\r\n")
}

fn munged(munge: fn(&str) -> String) -> PeerOptions {
    PeerOptions {
        munge_publish_offer: Some(munge),
        ..opts(true)
    }
}

/// Audio and video from `publisher` reach `viewer` as two tracks of the right kinds, codecs and
/// payloads (before the fix, both m-lines of an offer without msid became one track, and the
/// video went out inside the Opus track).
async fn assert_two_distinct_tracks(viewer: &Peer, publisher: &Peer) -> (String, String) {
    let audio = announced_track(viewer, publisher, TrackKind::Audio).await;
    let video = announced_track(viewer, publisher, TrackKind::Video).await;
    assert_ne!(audio.id, video.id);
    assert!(
        audio.mime_type.eq_ignore_ascii_case("audio/opus"),
        "{audio:?}"
    );
    assert!(
        video.mime_type.eq_ignore_ascii_case("video/VP8"),
        "{video:?}"
    );
    assert_ne!(
        audio.client_track_id, video.client_track_id,
        "client track ids are unique"
    );
    let a = wait_growth(viewer, &audio.id, 50).await;
    let v = wait_growth(viewer, &video.id, 50).await;
    assert_eq!(a.kind, TrackKind::Audio);
    assert_eq!(v.kind, TrackKind::Video);
    assert_eq!(a.payload_types, vec![111], "audio track carries Opus only");
    assert_eq!(v.payload_types, vec![96], "video track carries VP8 only");
    let largest_audio = a.recent.iter().map(|p| p.payload_len).max().unwrap_or(0);
    assert!(
        largest_audio < 600,
        "audio payloads are Opus-sized, not video (largest {largest_audio} bytes)"
    );
    assert!(v.keyframes > 0, "VP8 keyframes arrive on the video track");
    (audio.client_track_id, video.client_track_id)
}

#[tokio::test]
async fn offer_without_msid_publishes_audio_and_video_as_two_tracks() {
    init_tracing();
    let server = TestServer::start().await;
    let publ = Peer::connect(
        &server.ws_url(),
        "nomsid",
        "werift-like",
        munged(strip_msid),
    )
    .await
    .expect("a publisher without msid connects");
    let viewer = subscriber(&server, "nomsid", "viewer").await;
    let (a, v) = assert_two_distinct_tracks(&viewer, &publ).await;
    // Without msid the client track id is the m-section's mid.
    assert_eq!((a.as_str(), v.as_str()), ("0", "1"));
    viewer.leave().await.unwrap();
    publ.leave().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn the_same_msid_on_two_m_sections_does_not_merge_them() {
    init_tracing();
    let server = TestServer::start().await;
    let publ = Peer::connect(&server.ws_url(), "samemsid", "pub", munged(same_msid))
        .await
        .expect("a publisher with one msid on both m-sections connects");
    let viewer = subscriber(&server, "samemsid", "viewer").await;
    assert_two_distinct_tracks(&viewer, &publ).await;
    viewer.leave().await.unwrap();
    publ.leave().await.unwrap();
    server.shutdown().await;
}

#[tokio::test]
async fn an_m_section_that_cannot_be_demultiplexed_is_refused_by_name() {
    init_tracing();
    let server = TestServer::start().await;
    let err = Peer::connect(
        &server.ws_url(),
        "nossrc",
        "webrtcbin-like",
        munged(strip_msid_and_ssrc),
    )
    .await
    .err()
    .expect("an offer whose m-sections cannot be demultiplexed is refused");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("m-section") && msg.contains("a=ssrc") && msg.contains("mid 0"),
        "the error names the m-section and why: {msg}"
    );
    // The server is unharmed and the room usable.
    let publ = publisher(&server, "nossrc", "pub").await;
    let viewer = subscriber(&server, "nossrc", "viewer").await;
    assert_two_distinct_tracks(&viewer, &publ).await;
    viewer.leave().await.unwrap();
    publ.leave().await.unwrap();
    server.shutdown().await;
}
