//! RTX (RFC 4588) end to end: a real server, a synthetic VP8 publisher, and subscribers behind
//! a lossy relay (every 20th new RTP packet dropped downstream, 5 %). A subscriber that
//! negotiates RTX gets its repairs on the RTX stream its subscribe offer announced
//! (`a=ssrc-group:FID`), with the RTX payload type; its own stack unwraps them by the original
//! sequence number (OSN), so the packets the relay dropped reach its track. A subscriber that
//! does not negotiate RTX gets them on the media SSRC, as before.

// A test, not the packet path: shares state between tasks and prints what it measured.
#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    clippy::print_stdout
)]

use plaza_testkit::{self as common, support};

use std::collections::HashSet;
use std::time::Duration;

use common::{Peer, PeerOptions};
use plaza::signal::TrackKind;
use support::{TestServer, announced_track, opts};

/// Every `LOSS_EVERY`th new downstream RTP packet is dropped.
const LOSS_EVERY: u64 = 20;

async fn lossy_viewer(server: &TestServer, room: &str, name: &str, rtx: bool) -> Peer {
    let o = PeerOptions {
        subscriber_bandwidth_bps: Some(0),
        subscriber_rtx: rtx,
        keep_recent_packets: 5_000,
        ..opts(false)
    };
    Peer::connect(&server.ws_url(), room, name, o)
        .await
        .unwrap_or_else(|e| panic!("{name} connects: {e:#}"))
}

/// The `(media, rtx)` SSRC pairs of the `a=ssrc-group:FID` lines of an SDP.
fn fid_groups(sdp: &str) -> Vec<(u32, u32)> {
    sdp.lines()
        .filter_map(|l| l.trim().strip_prefix("a=ssrc-group:FID "))
        .filter_map(|rest| {
            let mut it = rest.split_whitespace().map(|s| s.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
        .collect()
}

/// How many of the video packets the relay dropped on the way to `p` reached its track
/// afterwards (the track's recent packets by sequence number), of how many.
fn repairs(p: &Peer, track_id: &str) -> (usize, usize) {
    let track = p.remote_track(track_id).expect("video received");
    let media_ssrc = *track.ssrcs.first().expect("a media SSRC");
    let received: HashSet<u16> = track
        .recent
        .iter()
        .filter(|p| p.ssrc == media_ssrc)
        .map(|p| p.sequence_number)
        .collect();
    let relay = p.relay_stats().expect("relay");
    let dropped: Vec<u16> = relay
        .lost
        .iter()
        .filter(|(ssrc, _)| *ssrc == media_ssrc)
        .map(|&(_, seq)| seq)
        .collect();
    let n = dropped.iter().filter(|s| received.contains(s)).count();
    (n, dropped.len())
}

/// The payload type of `rtx/90000` with `apt=96` in an SDP's answer or offer.
fn rtx_payload_type(sdp: &str) -> Option<u8> {
    sdp.lines()
        .filter_map(|l| l.trim().strip_prefix("a=fmtp:"))
        .find_map(|rest| {
            let (pt, params) = rest.split_once(' ')?;
            params
                .split(';')
                .any(|p| p.trim() == "apt=96")
                .then(|| pt.parse().ok())?
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_packets_are_repaired_on_the_rtx_stream_when_negotiated() {
    let server = TestServer::start().await;
    let alice = support::publisher(&server, "rtx", "alice").await;
    let with = lossy_viewer(&server, "rtx", "with-rtx", true).await;
    let without = lossy_viewer(&server, "rtx", "without-rtx", false).await;
    let video = announced_track(&with, &alice, TrackKind::Video).await;
    // Media flows before the loss starts (the first keyframe is not at stake).
    for p in [&with, &without] {
        support::wait_growth(p, &video.id, 30).await;
    }
    for p in [&with, &without] {
        p.set_subscriber_loss_every(LOSS_EVERY).unwrap();
    }
    // ~ 6 s of video at ~ 100 packets/s.
    for p in [&with, &without] {
        support::wait_growth(p, &video.id, 600).await;
    }
    for p in [&with, &without] {
        p.set_subscriber_loss_every(0).unwrap();
    }
    // Let the last repairs arrive.
    for p in [&with, &without] {
        support::wait_growth(p, &video.id, 50).await;
    }

    // The RTX stream the server announced to `with`, and its answer's RTX payload type.
    let offer = with
        .subscriber_pc()
        .remote_description()
        .await
        .expect("a subscribe offer")
        .sdp;
    let answer = with
        .subscriber_pc()
        .local_description()
        .await
        .expect("an answer")
        .sdp;
    let track = with.remote_track(&video.id).expect("video received");
    let media_ssrc = *track.ssrcs.first().expect("a media SSRC");
    let groups = fid_groups(&offer);
    let (_, rtx_ssrc) = *groups
        .iter()
        .find(|(m, _)| *m == media_ssrc)
        .unwrap_or_else(|| panic!("no FID group for {media_ssrc} in\n{offer}"));
    let rtx_pt = rtx_payload_type(&answer).expect("RTX in the answer");
    let relay = with.relay_stats().expect("relay");
    let on_rtx = relay
        .down_rtp_by_stream
        .get(&(rtx_ssrc, rtx_pt))
        .copied()
        .unwrap_or(0);
    let on_media_repeats = relay.down_rtp_repeats;
    println!(
        "with RTX: {} dropped, {on_rtx} packets on RTX SSRC {rtx_ssrc} / PT {rtx_pt}, \
         {on_media_repeats} repeats of media sequence numbers; streams {:?}",
        relay.down_lost, relay.down_rtp_by_stream
    );
    assert!(relay.down_lost >= 20, "{relay:?}");
    assert!(on_rtx > 0, "no packet on the RTX stream: {relay:?}");
    // Nothing else on the RTX SSRC, no retransmission on the media SSRC.
    assert!(
        relay
            .down_rtp_by_stream
            .keys()
            .all(|&(ssrc, pt)| ssrc != rtx_ssrc || pt == rtx_pt),
        "{relay:?}"
    );
    assert_eq!(on_media_repeats, 0, "{relay:?}");
    // The dropped video packets reached the track after all: unwrapped by their OSN.
    let (repaired, dropped) = repairs(&with, &video.id);
    println!("with RTX: {repaired} of {dropped} dropped video packets repaired");
    assert!(dropped > 0);
    // Most, not all: a repair can be lost too, and the budget and attempts are bounded.
    assert!(
        repaired * 10 >= dropped * 8,
        "{repaired} of {dropped} repaired"
    );
    assert_eq!(track.payload_types, vec![96], "{:?}", track.payload_types);

    // Without RTX: repairs are the original packets again, on the media SSRC.
    let relay = without.relay_stats().expect("relay");
    println!(
        "without RTX: {} dropped, {} repeats, streams {:?}",
        relay.down_lost, relay.down_rtp_repeats, relay.down_rtp_by_stream
    );
    assert!(relay.down_rtp_repeats > 0, "{relay:?}");
    let (repaired, dropped) = repairs(&without, &video.id);
    println!("without RTX: {repaired} of {dropped} dropped video packets repaired");
    assert!(repaired > 0, "{repaired} of {dropped}");
    assert!(
        relay.down_rtp_by_stream.keys().all(|&(_, pt)| pt != rtx_pt),
        "{relay:?}"
    );

    let (_, stats) = support::stats(server.http_addr).await.unwrap();
    println!(
        "server: resent {} (rtx {}, media {}), refused {}, over budget {}",
        stats["nack_resent"],
        stats["nack_resent_rtx"],
        stats["nack_resent_media"],
        stats["nack_refused"],
        stats["nack_over_budget"]
    );
    let n = |k: &str| stats[k].as_u64().unwrap_or_else(|| panic!("{k}: {stats}"));
    assert!(n("nack_resent_rtx") > 0, "{stats}");
    assert!(n("nack_resent_media") > 0, "{stats}");
    assert_eq!(
        n("nack_resent"),
        n("nack_resent_rtx") + n("nack_resent_media")
    );
    for p in [with, without, alice] {
        p.leave().await.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(10), server.shutdown())
        .await
        .expect("shutdown");
}
