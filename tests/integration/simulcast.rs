//! Simulcast end to end: a real server, synthetic publishers sending three VP8 layers
//! (`q` 320x180, `h` 640x360, `f` 1280x720, distinct real streams), and subscribers that pick
//! a layer, switch, sit behind a bandwidth bottleneck, or lose their layer.
//!
//! What a subscriber receives is judged from the media itself (see `testkit/src/recv.rs`):
//! the frame size of every keyframe, the clip every frame comes from (so the layer of
//! interframes too), and the continuity of sequence numbers, timestamps and VP8 picture ids.
//! Every wait is bounded; timings are printed (run with `--nocapture`), only loosely asserted.

// A test, not the packet path: shares state between tasks, times its windows with the clock
// and prints the figures it asserts.
#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    clippy::print_stdout
)]

use plaza_testkit::{self as common, support};

use std::time::{Duration, Instant};

use common::{Peer, PeerOptions, RemoteTrackStats, SimulcastOptions};
use plaza::signal::{Quality, TrackInfo, TrackKind};
use support::{T, TestServer, announced_track, opts};

const LOW: (u16, u16) = (320, 180);
const MEDIUM: (u16, u16) = (640, 360);
const HIGH: (u16, u16) = (1280, 720);

async fn simulcast_publisher(server: &TestServer, room: &str, layers: SimulcastOptions) -> Peer {
    let o = PeerOptions {
        simulcast: Some(layers),
        ..opts(true)
    };
    Peer::connect(&server.ws_url(), room, "pub", o)
        .await
        .unwrap_or_else(|e| panic!("the simulcast publisher connects: {e:#}"))
}

async fn viewer(server: &TestServer, room: &str, name: &str, o: PeerOptions) -> Peer {
    Peer::connect(&server.ws_url(), room, name, o)
        .await
        .unwrap_or_else(|e| panic!("{name} connects: {e:#}"))
}

/// The publisher's video track as `viewer` saw it announced.
async fn video_track(viewer: &Peer, publisher: &Peer) -> TrackInfo {
    announced_track(viewer, publisher, TrackKind::Video).await
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Waits until `peer` receives keyframes of `size` on `track`, from `since` on; returns the
/// stats and when the first such keyframe arrived.
async fn wait_resolution(
    peer: &Peer,
    track: &str,
    size: (u16, u16),
    since: Instant,
    timeout: Duration,
) -> (RemoteTrackStats, Instant) {
    let stats = peer
        .wait_for_track_state(
            track,
            &format!("receiving {}x{}", size.0, size.1),
            |t| t.first_resolution_at(size, since).is_some() && t.resolution == Some(size),
            timeout,
        )
        .await
        .unwrap_or_else(|e| {
            let t = peer.remote_track(track);
            panic!(
                "{}: {e:#}\nresolution now {:?}, changes since: {:?}, layer_changed: {:?}",
                peer.name(),
                t.as_ref().and_then(|t| t.resolution),
                t.as_ref().map(|t| t.resolutions_since(since)),
                t.as_ref().map(|t| &t.layer_changes)
            )
        });
    let at = stats.first_resolution_at(size, since).expect("checked");
    (stats, at)
}

/// Waits (up to [`RAMP_UP`]) until `peer` receives `size` on `track` and has kept it for 2 s.
async fn wait_kept(peer: &Peer, track: &str, size: (u16, u16), since: Instant) -> RemoteTrackStats {
    peer.wait_for_track_state(
        track,
        &format!("{}x{} kept for 2 s", size.0, size.1),
        |t| {
            t.resolution == Some(size)
                && t.resolution_changes
                    .last()
                    .is_some_and(|c| c.at.elapsed() >= Duration::from_secs(2))
        },
        RAMP_UP,
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{} never kept {}x{}: {e:#}; resolutions since {:?} ago: {:?}",
            peer.name(),
            size.0,
            size.1,
            since.elapsed(),
            peer.remote_track(track).map(|t| t.resolutions_since(since))
        )
    })
}

/// Frames of each origin received so far (see `RemoteTrackStats::frames_by_origin`).
fn frames_of(peer: &Peer, track: &str, size: (u16, u16)) -> u64 {
    peer.remote_track(track)
        .and_then(|t| t.frames_by_origin.get(&size).copied())
        .unwrap_or(0)
}

/// Prints where packets were lost, if any: NACKs the publisher got (publisher → server leg),
/// the server's drop counter, and each subscriber's continuity.
async fn report_loss(server: &TestServer, publisher: &Peer, subs: &[&Peer]) {
    let health = server.healthz().await.map(|(_, h)| h).unwrap_or_default();
    println!(
        "loss: publisher NACKed {} packets; server forwarded {} dropped {}",
        publisher.nacked_packets(),
        health["rtp_packets_forwarded"],
        health["rtp_packets_dropped"]
    );
    for s in subs {
        for t in s.remote_tracks() {
            if t.kind == TrackKind::Video {
                println!("  {} {}: {:?}", s.name(), t.track_id, t.continuity);
            }
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_preference_receives_only_the_low_layer() {
    let server = TestServer::start().await;
    let publisher = simulcast_publisher(&server, "low", SimulcastOptions::standard()).await;
    let sub = viewer(&server, "low", "sub", opts(false)).await;
    let video = video_track(&sub, &publisher).await;
    sub.wait_for_packets(&video.id, 30, T).await.unwrap();

    let asked = Instant::now();
    sub.track_settings(&video.id, Some(Quality::Low), None, None)
        .await
        .unwrap();
    let (_, at) = wait_resolution(&sub, &video.id, LOW, asked, T).await;
    println!("switch to low: {:.0} ms", ms(at - asked));

    // From the switch on, only low-layer content: 60 more frames, every one from the 320x180
    // clip, every keyframe 320x180.
    let before = sub.remote_track(&video.id).unwrap();
    let frames_before: u64 = before.frames_by_origin.values().sum();
    let low_before = frames_of(&sub, &video.id, LOW);
    let after = sub
        .wait_for_track_state(
            &video.id,
            "60 more frames",
            |t| t.frames_by_origin.values().sum::<u64>() >= frames_before + 60,
            T,
        )
        .await
        .unwrap();
    let frames_after: u64 = after.frames_by_origin.values().sum();
    assert_eq!(
        frames_of(&sub, &video.id, LOW) - low_before,
        frames_after - frames_before,
        "frames of other layers after the switch to low: {:?} → {:?}",
        before.frames_by_origin,
        after.frames_by_origin
    );
    assert_eq!(after.resolutions_since(at), vec![LOW]);
    let change = after
        .layer_changes
        .last()
        .unwrap_or_else(|| panic!("no layer_changed: {after:?}"));
    assert_eq!(change.quality, Quality::Low, "{change:?}");
    assert_eq!(change.rid, "q");
    assert_eq!((change.width, change.height), (Some(320), Some(180)));
    report_loss(&server, &publisher, &[&sub]).await;
    assert!(after.continuity.is_clean(), "{:?}", after.continuity);

    sub.leave().await.unwrap();
    publisher.leave().await.unwrap();
    server.shutdown().await;
}

/// A client that sends its whole state each time (cap and rendered size together, as the
/// browser client does) can set a cap and lift it again with `quality: null`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cap_sent_with_a_size_is_lifted_by_null() {
    let server = TestServer::start().await;
    let publisher = simulcast_publisher(&server, "cap", SimulcastOptions::standard()).await;
    let sub = viewer(&server, "cap", "sub", opts(false)).await;
    let video = video_track(&sub, &publisher).await;
    sub.wait_for_packets(&video.id, 30, T).await.unwrap();

    let asked = Instant::now();
    sub.track_settings(&video.id, Some(Quality::Low), Some(640), Some(360))
        .await
        .unwrap();
    wait_resolution(&sub, &video.id, LOW, asked, T).await;

    // Same size, no cap: the layer that covers 640x360.
    let asked = Instant::now();
    sub.track_settings(&video.id, None, Some(640), Some(360))
        .await
        .unwrap();
    let (_, at) = wait_resolution(&sub, &video.id, MEDIUM, asked, T).await;
    println!("cap lifted: {:.0} ms", ms(at - asked));

    sub.leave().await.unwrap();
    publisher.leave().await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_are_ranked_by_content_not_by_rid_order() {
    let server = TestServer::start().await;
    // Offered as f, h, q: the first RID is the largest layer.
    let publisher =
        simulcast_publisher(&server, "order", SimulcastOptions::standard().reversed()).await;
    let sub = viewer(&server, "order", "sub", opts(false)).await;
    let video = video_track(&sub, &publisher).await;
    sub.wait_for_packets(&video.id, 30, T).await.unwrap();

    for (quality, size, rid) in [
        (Quality::Low, LOW, "q"),
        (Quality::High, HIGH, "f"),
        (Quality::Medium, MEDIUM, "h"),
    ] {
        let asked = Instant::now();
        sub.track_settings(&video.id, Some(quality), None, None)
            .await
            .unwrap();
        let (stats, at) = wait_resolution(&sub, &video.id, size, asked, T).await;
        println!(
            "{quality:?} → {}x{} in {:.0} ms",
            size.0,
            size.1,
            ms(at - asked)
        );
        let change = sub
            .wait_for_track_state(
                &video.id,
                &format!("layer_changed {quality:?}"),
                |t| {
                    t.layer_changes
                        .iter()
                        .any(|c| c.at >= asked && c.quality == quality)
                },
                T,
            )
            .await
            .unwrap()
            .layer_changes
            .into_iter()
            .rfind(|c| c.quality == quality)
            .unwrap();
        assert_eq!(change.rid, rid, "{change:?}");
        assert_eq!(
            (change.width, change.height),
            (Some(u32::from(size.0)), Some(u32::from(size.1)))
        );
        assert_eq!(stats.resolutions_since(at), vec![size]);
    }
    sub.leave().await.unwrap();
    publisher.leave().await.unwrap();
    server.shutdown().await;
}

/// The track's layers as announced: to viewers already in the room (`track_published`) and to
/// a late joiner (`joined`). Every RID the publisher offered is listed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_track_lists_every_offered_rid() {
    let server = TestServer::start().await;
    let early = viewer(&server, "rids", "early", opts(false)).await;
    let publisher =
        simulcast_publisher(&server, "rids", SimulcastOptions::standard().shuffled()).await;
    let video = video_track(&early, &publisher).await;
    early.wait_for_packets(&video.id, 30, T).await.unwrap();
    let late = viewer(&server, "rids", "late", opts(false)).await;
    let in_joined = late
        .joined()
        .participants
        .iter()
        .flat_map(|p| p.tracks.iter())
        .find(|t| t.id == video.id)
        .cloned()
        .expect("the late joiner's `joined` lists the video track");
    assert_eq!(
        sorted(in_joined.layers.clone()),
        ["f", "h", "q"],
        "{in_joined:?}"
    );
    assert_eq!(
        sorted(video.layers.clone()),
        ["f", "h", "q"],
        "track_published lists every offered RID, also those whose first packet came later: {video:?}"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_up_and_down_keeps_one_clean_stream() {
    let server = TestServer::start().await;
    let publisher = simulcast_publisher(&server, "switch", SimulcastOptions::standard()).await;
    let sub = viewer(&server, "switch", "sub", opts(false)).await;
    let video = video_track(&sub, &publisher).await;
    sub.wait_for_packets(&video.id, 30, T).await.unwrap();

    let steps = [
        (Quality::Low, LOW),
        (Quality::High, HIGH),
        (Quality::Medium, MEDIUM),
        (Quality::Low, LOW),
        (Quality::High, HIGH),
        (Quality::Low, LOW),
        (Quality::Medium, MEDIUM),
        (Quality::High, HIGH),
    ];
    let mut latencies = Vec::new();
    for (quality, size) in steps {
        let asked = Instant::now();
        sub.track_settings(&video.id, Some(quality), None, None)
            .await
            .unwrap();
        let (_, at) = wait_resolution(&sub, &video.id, size, asked, T).await;
        latencies.push(ms(at - asked));
        // A few frames of the new layer before the next switch.
        let frames = frames_of(&sub, &video.id, size);
        sub.wait_for_track_state(
            &video.id,
            "10 frames of the new layer",
            |t| t.frames_by_origin.get(&size).copied().unwrap_or(0) >= frames + 10,
            T,
        )
        .await
        .unwrap();
    }
    println!("switch latencies (ms): {latencies:.0?}");
    let stats = sub.remote_track(&video.id).unwrap();
    report_loss(&server, &publisher, &[&sub]).await;
    let c = &stats.continuity;
    // Every layer change is one switch in the received frames, on a keyframe.
    assert!(c.switches >= steps.len() as u64, "{c:?}");
    assert_eq!(c.switches_without_keyframe, 0, "{c:?}");
    assert!(
        stats.switches.iter().all(|w| w.keyframe),
        "{:?}",
        stats.switches
    );
    // No sequence number missing for good, timestamps never back, picture ids +1 per frame.
    assert!(c.is_clean(), "{c:?}");
    assert!(c.picture_ids_checked + 5 >= c.frames, "{c:?}");
    assert_eq!(c.frames_known, c.frames, "every frame identified: {c:?}");
    assert_eq!(stats.ssrcs.len(), 1, "one SSRC: {:?}", stats.ssrcs);
    assert_eq!(
        stats.resolution_changes.len(),
        stats.switches.len() + 1,
        "{:?}",
        stats.resolution_changes
    );
    // Each switch asked the publisher for a keyframe of the target layer: every layer got
    // keyframe requests of its own (by media SSRC), and sent keyframes beyond its regular ones.
    let local = publisher
        .local_tracks()
        .into_iter()
        .find(|t| t.kind == TrackKind::Video)
        .unwrap();
    for l in &local.layers {
        println!(
            "layer {}: {} keyframe requests, {} keyframes sent",
            l.rid, l.counters.keyframe_requests, l.counters.keyframes
        );
        assert!(l.counters.keyframe_requests >= 1, "{l:?}");
    }

    sub.leave().await.unwrap();
    publisher.leave().await.unwrap();
    server.shutdown().await;
}

/// How long a subscriber waits, at most, to reach the top layer after joining (the estimate
/// starts at 2.5 Mbit/s, so ~2 s in practice; generous for a loaded CI machine).
const RAMP_UP: Duration = Duration::from_secs(15);
/// The bound on the time to downgrade after a bandwidth cut, measured at the subscriber (first
/// frame of a lower layer). The target is 2 s; the benchmark measures ~1.0 s and this test
/// ~0.8 s. Twice the target leaves room for a loaded CI machine while still failing if the
/// downgrade misses its goal by much.
const DOWNGRADE_BOUND: Duration = Duration::from_secs(4);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_cut_downgrades_only_the_limited_subscriber() {
    let server = TestServer::start().await;
    let publisher = simulcast_publisher(&server, "bw", SimulcastOptions::standard()).await;
    let free = viewer(&server, "bw", "free", opts(false)).await;
    // Behind a relay, unlimited for now.
    let limited = viewer(
        &server,
        "bw",
        "limited",
        PeerOptions {
            subscriber_bandwidth_bps: Some(0),
            ..opts(false)
        },
    )
    .await;
    let video = video_track(&free, &publisher).await;
    let joined = Instant::now();
    // A new subscriber gets the top layer at once, drops when the first bandwidth estimate
    // comes in, and gets it back once the estimate has grown: wait until it is kept.
    for p in [&free, &limited] {
        wait_kept(p, &video.id, HIGH, joined).await;
    }
    println!(
        "both on 1280x720 {:.1} s after joining",
        joined.elapsed().as_secs_f64()
    );

    let cut = Instant::now();
    limited.set_subscriber_bandwidth(400_000).unwrap();
    let down = limited
        .wait_for_track_state(
            &video.id,
            "a lower layer after the cut",
            |t| t.resolutions_since(cut).iter().any(|r| *r != HIGH),
            T,
        )
        .await
        .unwrap_or_else(|e| panic!("limited never left 1280x720: {e:#}"));
    let first_lower = down
        .resolution_changes
        .iter()
        .find(|c| c.at > cut && (c.width, c.height) != HIGH)
        .expect("checked");
    let downgrade = first_lower.at - cut;
    let layer_changed = down
        .layer_changes
        .iter()
        .find(|c| c.at > cut)
        .map(|c| ms(c.at - cut));
    println!(
        "downgrade after the cut to 400 kbit/s: first lower keyframe ({}x{}) after {:.0} ms \
         (layer_changed after {layer_changed:?} ms)",
        first_lower.width,
        first_lower.height,
        ms(downgrade)
    );
    // 400 kbit/s carries the low layer (~150 kbit/s) but not the medium one (~500 kbit/s).
    let (_, low_at) = wait_resolution(&limited, &video.id, LOW, cut, T).await;
    println!("on 320x180 after {:.0} ms", ms(low_at - cut));
    println!("relay: {:?}", limited.relay_stats());

    // The unlimited subscriber kept the top layer throughout.
    let frames = frames_of(&free, &video.id, HIGH);
    let f = free
        .wait_for_track_state(
            &video.id,
            "30 more top-layer frames",
            |t| t.frames_by_origin.get(&HIGH).copied().unwrap_or(0) >= frames + 30,
            T,
        )
        .await
        .unwrap();
    assert_eq!(
        f.resolutions_since(cut),
        vec![HIGH],
        "free: {:?}",
        f.resolution_changes
    );
    report_loss(&server, &publisher, &[&free, &limited]).await;
    assert!(
        downgrade <= DOWNGRADE_BOUND,
        "downgrade took {downgrade:?} (bound {DOWNGRADE_BOUND:?}, target 2 s)"
    );

    free.leave().await.unwrap();
    limited.leave().await.unwrap();
    publisher.leave().await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_layer_that_stops_does_not_freeze_its_subscribers() {
    let server = TestServer::start().await;
    let publisher = simulcast_publisher(&server, "stop", SimulcastOptions::standard()).await;
    let sub = viewer(&server, "stop", "sub", opts(false)).await;
    let video = video_track(&sub, &publisher).await;
    // On the top layer (once the bandwidth estimate allows it).
    let asked = Instant::now();
    sub.track_settings(&video.id, Some(Quality::High), None, None)
        .await
        .unwrap();
    let on_top = wait_kept(&sub, &video.id, HIGH, asked).await;
    let packets = on_top.packets;
    let medium_frames = frames_of(&sub, &video.id, MEDIUM);

    // The encoder drops its top layer, without a word to the server.
    let stopped = Instant::now();
    publisher.pause_layer("f", true).unwrap();
    let (_, fell_back) = wait_resolution(&sub, &video.id, MEDIUM, stopped, T).await;
    let last_top = sub.remote_track(&video.id).and_then(|t| {
        t.recent
            .iter()
            .rev()
            .find(|p| p.arrival < fell_back)
            .map(|p| p.arrival)
    });
    println!(
        "fell back to 640x360 {:.0} ms after f stopped (video gap {:?} ms)",
        ms(fell_back - stopped),
        last_top.map(|l| ms(fell_back - l))
    );
    let after = sub
        .wait_for_track_state(
            &video.id,
            "media keeps flowing",
            |t| t.frames_by_origin.get(&MEDIUM).copied().unwrap_or(0) >= medium_frames + 30,
            T,
        )
        .await
        .unwrap();
    assert!(after.packets > packets + 30);
    assert_eq!(after.resolutions_since(fell_back), vec![MEDIUM]);
    assert!(
        after.continuity.is_clean(),
        "the fallback kept one clean stream: {:?}",
        after.continuity
    );

    // The layer comes back: the subscriber (who asked for High) returns to it.
    let resumed = Instant::now();
    publisher.pause_layer("f", false).unwrap();
    let (_, back) = wait_resolution(&sub, &video.id, HIGH, resumed, T).await;
    println!(
        "back on 1280x720 {:.0} ms after f resumed",
        ms(back - resumed)
    );
    report_loss(&server, &publisher, &[&sub]).await;

    sub.leave().await.unwrap();
    publisher.leave().await.unwrap();
    server.shutdown().await;
}

/// Dynacast: a layer nobody needs is paused at the publisher (`publisher_layers`), and
/// resumed when someone asks for it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_layers_are_paused_at_the_publisher_and_resumed() {
    let server = TestServer::start().await;
    let publisher = simulcast_publisher(&server, "dyna", SimulcastOptions::standard()).await;
    let sub = viewer(&server, "dyna", "sub", opts(false)).await;
    let video = video_track(&sub, &publisher).await;
    sub.track_settings(&video.id, Some(Quality::Low), None, None)
        .await
        .unwrap();
    let paused = publisher
        .wait_for_local_track(
            TrackKind::Video,
            |t| t.layers.iter().all(|l| l.dynacast_paused == (l.rid != "q")),
            T,
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "h and f paused at the publisher: {e:#}; {:#?}",
                publisher.local_tracks()
            )
        });
    assert!(paused.publisher_layers_received >= 1);
    let sent: Vec<u64> = paused.layers.iter().map(|l| l.counters.packets).collect();
    let asked: Vec<u64> = paused
        .layers
        .iter()
        .map(|l| l.counters.keyframe_requests)
        .collect();

    // The paused layers send nothing while q keeps going, and the server asks them for no
    // keyframe (a paused layer cannot answer; retries would go on every 300 ms).
    let later = publisher
        .wait_for_local_track(
            TrackKind::Video,
            |t| {
                t.layers
                    .iter()
                    .any(|l| l.rid == "q" && l.counters.packets >= sent[0] + 30)
            },
            T,
        )
        .await
        .unwrap();
    for ((l, before), pli_before) in later.layers.iter().zip(&sent).zip(&asked) {
        if l.rid != "q" {
            assert_eq!(l.counters.packets, *before, "{} sent while paused", l.rid);
            assert_eq!(
                l.counters.keyframe_requests, *pli_before,
                "{} was asked for keyframes while paused",
                l.rid
            );
        }
    }

    // Asking for the top layer resumes it.
    let asked = Instant::now();
    sub.track_settings(&video.id, Some(Quality::High), None, None)
        .await
        .unwrap();
    let (_, at) = wait_resolution(&sub, &video.id, HIGH, asked, T).await;
    println!(
        "paused top layer delivered {:.0} ms after the request",
        ms(at - asked)
    );
    let t = publisher
        .local_tracks()
        .into_iter()
        .find(|t| t.kind == TrackKind::Video)
        .unwrap();
    let f = t.layers.iter().find(|l| l.rid == "f").unwrap();
    assert!(!f.dynacast_paused && f.dynacast_resumes >= 1, "{f:?}");

    sub.leave().await.unwrap();
    publisher.leave().await.unwrap();
    server.shutdown().await;
}
