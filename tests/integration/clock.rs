//! One clock for a room: every `pong` carries the server's wall-clock time (`server_time`,
//! microseconds since the Unix epoch), and the RTCP sender reports' NTP time is that same
//! clock on the NTP epoch. The test runs on the server's machine, so its own `SystemTime` is
//! the server's clock: a pong's `server_time` must fall between the moment the test sent the
//! ping and the moment it read the pong, and a sender report's NTP time must be the moment it
//! was made, just before it arrived. The measured figures are printed (`--nocapture`).

// A test, not the packet path: reads the wall clock and prints what it measured.
#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    clippy::print_stdout
)]

use plaza_testkit::support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use plaza::signal::{ClientMessage, ServerMessage, TrackKind, unix_micros};
use support::{RawWs, T, TestServer, announced_track, publisher, subscriber};

/// Seconds from the NTP epoch (1900) to the Unix epoch (1970).
const NTP_UNIX_OFFSET: u64 = 2_208_988_800;

/// Sends `n` pings and checks each pong's `server_time` against the test's own clock: it lies
/// in [sent, received]. The largest round trip, in µs.
async fn pings_within_round_trip(ws: &mut RawWs, what: &str, n: u32) -> u64 {
    let mut worst = 0;
    for i in 0..n {
        let ts = f64::from(i) + 0.25;
        let sent = unix_micros(SystemTime::now());
        ws.send_msg(&ClientMessage::Ping { ts: Some(ts) })
            .await
            .unwrap();
        let pong = ws
            .recv_until(
                "pong",
                |m| matches!(m, ServerMessage::Pong { ts: Some(x), .. } if *x == ts),
            )
            .await
            .unwrap_or_else(|e| panic!("{what}: ping {i}: {e:#}"));
        let received = unix_micros(SystemTime::now());
        let ServerMessage::Pong { server_time, .. } = pong else {
            unreachable!("matched a pong")
        };
        assert!(
            (sent..=received).contains(&server_time),
            "{what}: ping {i}: server_time {server_time} outside [{sent}, {received}] \
             ({} µs after the send, round trip {} µs)",
            server_time as i128 - sent as i128,
            received - sent
        );
        worst = worst.max(received - sent);
    }
    println!("{what}: {n} pongs within their round trip (largest {worst} µs)");
    worst
}

/// Before and after `join` (the two places the signaling answers `ping`), every pong's
/// `server_time` is the server's wall clock at a moment between the ping and the pong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pong_server_time_is_within_the_round_trip() {
    let server = TestServer::start().await;
    let mut ws = RawWs::connect(&server.ws_url()).await.unwrap();
    pings_within_round_trip(&mut ws, "before join", 20).await;
    ws.join("clock", "timer").await.unwrap();
    pings_within_round_trip(&mut ws, "joined", 20).await;
    // A `ping` without `ts` still gets the server's time.
    ws.send_text(r#"{"type":"ping"}"#).await.unwrap();
    let pong = ws
        .recv_until("pong without ts", |m| {
            matches!(m, ServerMessage::Pong { ts: None, .. })
        })
        .await
        .unwrap();
    let json = serde_json::to_value(&pong).unwrap();
    assert!(
        json["server_time"].as_u64() > Some(1_700_000_000_000_000),
        "{json}"
    );
    assert!(json.get("ts").is_none(), "{json}");
    server.shutdown().await;
}

/// A subscriber's RTCP sender report carries, as NTP time, the server's wall clock when the
/// report was made: the same clock as `pong.server_time`, 2 208 988 800 s later in numbers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_report_ntp_time_is_the_pong_clock() {
    let server = TestServer::start().await;
    let alice = publisher(&server, "srclock", "alice").await;
    let bob = subscriber(&server, "srclock", "bob").await;
    let mut lags = Vec::new();
    for kind in [TrackKind::Audio, TrackKind::Video] {
        let info = announced_track(&bob, &alice, kind).await;
        bob.wait_for_packets(&info.id, 10, T)
            .await
            .unwrap_or_else(|e| panic!("{kind:?}: {e:#}"));
        let ssrc = *bob
            .remote_track(&info.id)
            .expect("a remote track")
            .ssrcs
            .first()
            .expect("an SSRC");
        // Reports come about once a second; take the next two so one is fresh.
        let first = bob
            .wait_for_sender_report(ssrc, |_| true, Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("{kind:?}: {e:#}"));
        let sr = bob
            .wait_for_sender_report(ssrc, |s| s.count > first.count, Duration::from_secs(5))
            .await
            .unwrap_or_else(|e| panic!("{kind:?}: {e:#}"));
        // The report's arrival on the test's (= the server's) wall clock.
        let arrived = unix_micros(SystemTime::now() - sr.at.elapsed());
        let secs = (sr.ntp_time >> 32) - NTP_UNIX_OFFSET;
        let frac = ((sr.ntp_time & 0xffff_ffff) * 1_000_000) >> 32;
        let made = secs * 1_000_000 + frac;
        let lag = arrived as i128 - made as i128;
        println!("{kind:?}: sender report made at {made} µs (Unix), arrived {lag} µs later");
        // Made before it arrived (1 ms of slack for the tap's own timing), and not long before:
        // the core stamps a report in the turn that sends it.
        assert!(
            (-1_000..=200_000).contains(&lag),
            "{kind:?}: sender report's NTP time {made} µs vs arrival {arrived} µs ({lag} µs)"
        );
        lags.push(lag);
    }
    // The pongs beside the media are still on the test's clock.
    let mut ws = RawWs::connect(&server.ws_url()).await.unwrap();
    pings_within_round_trip(&mut ws, "beside the media", 5).await;
    println!("sender report → arrival lags (µs): {lags:?}");
    bob.leave().await.unwrap();
    alice.leave().await.unwrap();
    server.shutdown().await;
}

#[test]
fn ntp_epoch_offset() {
    // 1970-01-01 is 70 years (17 of them leap) after 1900-01-01.
    assert_eq!(NTP_UNIX_OFFSET, (70 * 365 + 17) * 86_400);
    assert_eq!(
        unix_micros(UNIX_EPOCH + Duration::from_micros(1_234_567)),
        1_234_567
    );
    assert_eq!(unix_micros(UNIX_EPOCH - Duration::from_secs(1)), 0);
}
