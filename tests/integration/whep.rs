//! WHEP playback (draft-ietf-wish-whep) against the real server: a webrtc-rs WHEP viewer (no
//! Plaza signaling, `testkit/src/whep.rs`) plays a room's host. The HTTP exchange and every
//! status (201 with its headers, 400, 401, 403, 404, 412, 415, 422, 428, CORS, the layer
//! extension); media from a simulcast WebSocket publisher and from a WHIP publisher; a viewer
//! that waits for the host, follows the host when it changes (one SSRC, continuous sequence
//! numbers and timestamps), switches layers on request and when its bandwidth is cut; and it is
//! hidden from the room.

// A test: it times the POST → first media path with the clock, and prints it.
#![allow(clippy::disallowed_methods, clippy::print_stdout)]

use std::time::{Duration, Instant};

use plaza::auth::Secret;
use plaza::signal::{ServerMessage, TrackKind};
use plaza::turn::IceConfig;
use plaza_testkit::token::with_grants as token;
use plaza_testkit::whep::{HttpReply, WhepOptions, WhepViewer, http};
use plaza_testkit::whip::{WhipOptions, WhipPublisher};
use plaza_testkit::{Peer, PeerEvent, PeerOptions, SimulcastOptions, support};
use support::{T, TestServer, opts};

const LOW: (u16, u16) = (320, 180);
const HIGH: (u16, u16) = (1280, 720);
/// Bound of a bandwidth estimate's ramp-up to the top layer.
const RAMP_UP: Duration = Duration::from_secs(25);

/// A subscribe-only token, as a player would be given.
fn viewer_token(room: &str, identity: &str) -> String {
    token(room, identity, |g| g.can_publish = Some(false))
}

fn whep_opts() -> WhepOptions {
    WhepOptions {
        timeout: T,
        ..WhepOptions::default()
    }
}

async fn play(server: &TestServer, path: &str, room: &str, o: WhepOptions) -> WhepViewer {
    let tok = viewer_token(room, "player");
    WhepViewer::play(server.http_addr, path, Some(&tok), o)
        .await
        .unwrap_or_else(|e| panic!("WHEP play {path}: {e:#}"))
}

async fn simulcast_publisher(server: &TestServer, room: &str) -> Peer {
    let o = PeerOptions {
        simulcast: Some(SimulcastOptions::standard()),
        ..opts(true)
    };
    Peer::connect(&server.ws_url(), room, "host", o)
        .await
        .unwrap_or_else(|e| panic!("the simulcast publisher connects: {e:#}"))
}

fn assert_cors(r: &HttpReply, what: &str) {
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("*"),
        "{what}: CORS origin on {} {:?}",
        r.status,
        r.headers
    );
    let exposed = r.header("access-control-expose-headers").unwrap_or("");
    for h in ["Location", "ETag", "Link"] {
        assert!(exposed.contains(h), "{what}: {h} exposed: {exposed:?}");
    }
}

async fn participants(server: &TestServer) -> u64 {
    let (_, h) = server.healthz().await.expect("healthz");
    h["participants"].as_u64().expect("participants in healthz")
}

/// Waits until `viewer` has `n` more packets of `kind` than now.
async fn wait_more(viewer: &WhepViewer, kind: TrackKind, n: u64, what: &str) {
    let from = viewer.packets(kind);
    viewer
        .wait_for_packets(kind, from + n, T)
        .await
        .unwrap_or_else(|e| panic!("{what}: {n} more {kind:?} packets (had {from}): {e:#}"));
}

/// Waits until the viewer's video keyframes are `size` (the first at or after `since`).
async fn wait_size(viewer: &WhepViewer, size: (u16, u16), since: Instant, bound: Duration) {
    viewer
        .wait_for(
            TrackKind::Video,
            &format!("{}x{} frames", size.0, size.1),
            |t| t.first_resolution_at(size, since).is_some() && t.resolution == Some(size),
            bound,
        )
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e:#}; frame sizes since then: {:?}",
                viewer.frame_sizes_since(since)
            )
        });
}

/// Waits until the viewer receives `size` and has kept it for 2 s.
async fn wait_kept(viewer: &WhepViewer, size: (u16, u16), since: Instant) {
    viewer
        .wait_for(
            TrackKind::Video,
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
                "{e:#}; frame sizes since {:?} ago: {:?}",
                since.elapsed(),
                viewer.frame_sizes_since(since)
            )
        });
}

/// The HTTP exchange: the 201 and its headers, every refusal, trickle, the layer extension,
/// OPTIONS/CORS, DELETE. The room has no publisher: the viewer is answered and waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_statuses_follow_the_spec() {
    let server = TestServer::start().await;
    let addr = server.http_addr;
    let mut viewer = play(&server, "/whep/r", "r", whep_opts()).await;

    // 201: the answer, Location, ETag, Accept-Patch, the layer Link, CORS.
    let c = &viewer.created;
    assert_eq!(c.header("content-type"), Some("application/sdp"));
    assert!(
        viewer.location.starts_with("/whep/r/sessions/") && viewer.location.len() > 30,
        "Location {:?}",
        viewer.location
    );
    assert!(
        viewer.etag.starts_with('"') && viewer.etag.ends_with('"') && viewer.etag.len() > 10,
        "ETag {:?}",
        viewer.etag
    );
    assert_eq!(
        c.header("accept-patch"),
        Some("application/trickle-ice-sdpfrag")
    );
    assert!(
        c.body.contains("a=candidate:") && c.body.contains("a=end-of-candidates"),
        "complete answer: {}",
        c.body
    );
    let mlines = c.body.lines().filter(|l| l.starts_with("m=")).count();
    let sendonly = c.body.lines().filter(|l| l.trim() == "a=sendonly").count();
    assert_eq!(mlines, 2, "audio + video: {}", c.body);
    assert_eq!(sendonly, 2, "every m-line sendonly: {}", c.body);
    assert_eq!(
        viewer.links.layer.as_deref(),
        Some(format!("{}/layer", viewer.location).as_str()),
        "layer Link: {:?}",
        c.all("link")
    );
    assert!(
        viewer.links.ice_servers.is_empty(),
        "no ICE servers configured: {:?}",
        viewer.links
    );
    assert_cors(c, "201");
    assert_eq!(
        participants(&server).await,
        1,
        "the viewer is a participant"
    );

    // Refusals of the POST.
    let good = format!("Bearer {}", viewer_token("r", "other"));
    let sdp = ("Content-Type", "application/sdp");
    let offer = c.body.replace("a=sendonly", "a=recvonly"); // any SDP with media
    let post = |headers: Vec<(&'static str, String)>, body: Vec<u8>| async move {
        let h: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        http(addr, "POST", "/whep/r", &h, &body).await.unwrap()
    };
    let r = post(
        vec![
            ("Content-Type", "application/json".into()),
            ("Authorization", good.clone()),
        ],
        offer.clone().into_bytes(),
    )
    .await;
    assert_eq!(r.status, 415, "wrong content type: {}", r.body);
    assert_cors(&r, "415");
    let r = post(vec![(sdp.0, sdp.1.into())], offer.clone().into_bytes()).await;
    assert_eq!(r.status, 401, "no token: {}", r.body);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let r = post(
        vec![
            (sdp.0, sdp.1.into()),
            ("Authorization", "Bearer nope".into()),
        ],
        offer.clone().into_bytes(),
    )
    .await;
    assert_eq!(r.status, 401, "bad token: {}", r.body);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let publish_only = format!(
        "Bearer {}",
        token("r", "cam", |g| g.can_subscribe = Some(false))
    );
    let r = post(
        vec![(sdp.0, sdp.1.into()), ("Authorization", publish_only)],
        offer.clone().into_bytes(),
    )
    .await;
    assert_eq!(r.status, 403, "publish-only token: {}", r.body);
    let elsewhere = format!("Bearer {}", viewer_token("elsewhere", "other"));
    let r = post(
        vec![(sdp.0, sdp.1.into()), ("Authorization", elsewhere)],
        offer.clone().into_bytes(),
    )
    .await;
    assert_eq!(r.status, 403, "another room's token: {}", r.body);
    let r = post(
        vec![(sdp.0, sdp.1.into()), ("Authorization", good.clone())],
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, 400, "empty body (no counter-offers): {}", r.body);
    let r = post(
        vec![(sdp.0, sdp.1.into()), ("Authorization", good.clone())],
        b"{\"sdp\": \"hello\"}".to_vec(),
    )
    .await;
    assert_eq!(r.status, 400, "not SDP: {}", r.body);
    let r = post(
        vec![(sdp.0, sdp.1.into()), ("Authorization", good.clone())],
        b"v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n".to_vec(),
    )
    .await;
    assert_eq!(r.status, 422, "no media: {}", r.body);
    let r = post(
        vec![(sdp.0, sdp.1.into()), ("Authorization", good.clone())],
        b"v=0\r\nm=video garbage\r\n\xff\xfe\x00".to_vec(),
    )
    .await;
    assert!(
        r.status == 400 || r.status == 422,
        "garbage: {} {}",
        r.status,
        r.body
    );

    // Trickle: with the ETag 204, a wrong one 412, none 428; an unknown session 404.
    let sdpfrag = ("Content-Type", "application/trickle-ice-sdpfrag");
    let trickle = "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n\
                   a=candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host\r\n\
                   a=end-of-candidates\r\n";
    let r = viewer.trickle(trickle).await.unwrap();
    assert_eq!(r.status, 204, "trickle: {}", r.body);
    assert!(
        viewer.patch_statuses().iter().all(|s| *s == 204),
        "the viewer's own trickle: {:?}",
        viewer.patch_statuses()
    );
    let r = viewer
        .request(
            "PATCH",
            &[sdpfrag, ("If-Match", "\"stale\"")],
            trickle.as_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 412, "wrong If-Match: {}", r.body);
    let r = viewer
        .request("PATCH", &[sdpfrag], trickle.as_bytes())
        .await
        .unwrap();
    assert_eq!(r.status, 428, "no If-Match: {}", r.body);
    let r = http(
        addr,
        "PATCH",
        "/whep/r/sessions/nope",
        &[sdpfrag, ("If-Match", "*")],
        trickle.as_bytes(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 404, "unknown session: {}", r.body);

    // OPTIONS: the endpoint's preflight and the session's.
    let r = http(
        addr,
        "OPTIONS",
        "/whep/r",
        &[
            ("Origin", "https://player.example"),
            ("Access-Control-Request-Method", "POST"),
        ],
        b"",
    )
    .await
    .unwrap();
    assert!(
        r.status == 204 || r.status == 200,
        "preflight: {}",
        r.status
    );
    assert_cors(&r, "preflight");
    let methods = r.header("access-control-allow-methods").unwrap_or("");
    assert!(
        methods.contains("POST") && methods.contains("PATCH") && methods.contains("DELETE"),
        "{methods}"
    );
    let allowed = r
        .header("access-control-allow-headers")
        .unwrap_or("")
        .to_ascii_lowercase();
    for h in ["authorization", "content-type", "if-match"] {
        assert!(allowed.contains(h), "{h} allowed: {allowed}");
    }
    let r = viewer.request("OPTIONS", &[], b"").await.unwrap();
    assert!(r.status == 204 || r.status == 200, "OPTIONS: {}", r.status);
    assert_cors(&r, "OPTIONS on the session");

    // The layer extension: 204, bad JSON 400, wrong type 415, unknown session 404.
    for body in [
        "{\"quality\":\"low\"}",
        "{\"quality\":null}",
        "{\"maxWidth\":640,\"maxHeight\":360}",
    ] {
        let r = viewer.set_layer(body).await.unwrap();
        assert_eq!(r.status, 204, "layer {body}: {}", r.body);
    }
    let r = viewer.set_layer("{not json").await.unwrap();
    assert_eq!(r.status, 400, "bad JSON: {}", r.body);
    let layer = viewer.links.layer.clone().unwrap();
    let r = viewer
        .request_to(
            &layer,
            "POST",
            &[("Content-Type", "text/plain")],
            b"{\"quality\":\"low\"}",
        )
        .await
        .unwrap();
    assert_eq!(r.status, 415, "layer POST of another type: {}", r.body);
    let r = http(
        addr,
        "POST",
        "/whep/r/sessions/nope/layer",
        &[("Content-Type", "application/json")],
        b"{\"quality\":\"low\"}",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 404, "layer of an unknown session: {}", r.body);

    // DELETE: 200, then the session is gone.
    assert_eq!(viewer.delete().await.unwrap(), 200);
    assert_eq!(
        viewer.request("DELETE", &[], b"").await.unwrap().status,
        404
    );
    let r = viewer.trickle(trickle).await.unwrap();
    assert_eq!(r.status, 404, "PATCH after DELETE: {}", r.body);
    server
        .wait_healthz("the viewer gone", |h| h["participants"] == 0, T)
        .await
        .expect("no participant left behind");
    viewer.close().await;
    server.shutdown().await;
}

/// A simulcast WebSocket publisher → a WHEP viewer: audio and video; the layer extension
/// picks `low` (320 wide) then `high` (1280 wide); the publisher is never told the viewer
/// joined (it is hidden).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_plays_the_host_and_switches_layers_on_request() {
    let server = TestServer::start().await;
    let host = simulcast_publisher(&server, "live").await;
    let t0 = Instant::now();
    let viewer = play(&server, "/whep/live", "live", whep_opts()).await;
    viewer
        .wait_for_packets(TrackKind::Video, 1, T)
        .await
        .expect("first video packet");
    println!(
        "WHEP POST → first video RTP: {} ms",
        viewer
            .first_packet_at()
            .map_or(0, |f| (f - viewer.posted_at).as_millis())
    );
    wait_more(&viewer, TrackKind::Audio, 30, "audio").await;
    wait_more(&viewer, TrackKind::Video, 30, "video").await;
    let audio = viewer.track(TrackKind::Audio).unwrap();
    assert!(
        audio
            .mime_type
            .as_deref()
            .is_some_and(|m| m.eq_ignore_ascii_case("audio/opus")),
        "{:?}",
        audio.mime_type
    );

    let asked = Instant::now();
    let r = viewer.set_layer("{\"quality\":\"low\"}").await.unwrap();
    assert_eq!(r.status, 204, "{}", r.body);
    wait_size(&viewer, LOW, asked, T).await;
    println!("low: 320x180 after {} ms", asked.elapsed().as_millis());
    let asked = Instant::now();
    let r = viewer.set_layer("{\"quality\":\"high\"}").await.unwrap();
    assert_eq!(r.status, 204, "{}", r.body);
    wait_size(&viewer, HIGH, asked, RAMP_UP).await;
    println!("high: 1280x720 after {} ms", asked.elapsed().as_millis());
    let video = viewer.track(TrackKind::Video).unwrap();
    assert_eq!(video.ssrcs.len(), 1, "one SSRC across layers: {video:?}");
    let c = &video.continuity;
    println!("continuity across the layer switches: {c:?}");
    assert!(
        c.timestamp_regressions == 0 && c.picture_id_jumps == 0 && c.switches >= 2,
        "one clean stream across the switches: {c:?}"
    );
    assert_eq!(c.switches_without_keyframe, 0, "{c:?}");

    // Hidden: the host never heard of it.
    let joined: Vec<_> = host
        .events()
        .into_iter()
        .filter(|e| {
            matches!(
                e.event,
                PeerEvent::Server(ServerMessage::ParticipantJoined { .. })
            )
        })
        .collect();
    assert!(joined.is_empty(), "the host saw {joined:?}");
    assert!(
        host.participants().is_empty(),
        "the host's participant list: {:?}",
        host.participants()
    );
    println!("total {} ms", t0.elapsed().as_millis());
    let mut viewer = viewer;
    assert_eq!(viewer.delete().await.unwrap(), 200);
    viewer.close().await;
    host.leave().await.ok();
    server.shutdown().await;
}

/// A viewer of an empty room is answered and waits; media starts when a host publishes; when
/// the host leaves, the next publisher takes over on the same SSRCs with continuous sequence
/// numbers and timestamps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn viewer_waits_for_the_host_and_follows_the_next_one() {
    let server = TestServer::start().await;
    let viewer = play(&server, "/whep/relay", "relay", whep_opts()).await;
    assert_eq!(viewer.packets(TrackKind::Video), 0);
    let first = support::publisher(&server, "relay", "first").await;
    viewer
        .wait_for_packets(TrackKind::Video, 50, T)
        .await
        .expect("media once the host publishes");
    viewer
        .wait_for_packets(TrackKind::Audio, 50, T)
        .await
        .expect("audio once the host publishes");
    let second = support::publisher(&server, "relay", "second").await;
    wait_more(&viewer, TrackKind::Video, 30, "video from the first host").await;
    let before: Vec<_> = [TrackKind::Audio, TrackKind::Video]
        .iter()
        .map(|k| viewer.track(*k).unwrap())
        .collect();
    let left = Instant::now();
    first.leave().await.unwrap();
    for kind in [TrackKind::Audio, TrackKind::Video] {
        wait_more(&viewer, kind, 100, "media from the second host").await;
    }
    println!(
        "host change: 100 more packets {} ms after the leave",
        left.elapsed().as_millis()
    );
    for b in before {
        let a = viewer.track(b.kind).unwrap();
        assert_eq!(a.ssrcs, b.ssrcs, "{:?}: one SSRC for the session", b.kind);
        assert_eq!(a.ssrcs.len(), 1, "{:?}: {:?}", b.kind, a.ssrcs);
        let c = &a.continuity;
        println!("{:?} continuity: {c:?}", b.kind);
        assert_eq!(c.timestamp_regressions, 0, "{:?}: {c:?}", b.kind);
        assert!(
            c.seq_missing() <= 5 && c.seq_backwards <= 20,
            "{:?}: sequence numbers continue across the host change: {c:?}",
            b.kind
        );
        assert!(!a.ended, "{:?} ended", b.kind);
        if b.kind == TrackKind::Video {
            assert!(c.picture_ids_checked > 50, "{c:?}");
            assert_eq!(
                c.picture_id_jumps, 0,
                "VP8 picture ids continue across the host change: {c:?}"
            );
        }
        println!(
            "{:?}: longest gap between packets {} ms",
            b.kind,
            a.max_interarrival.as_millis()
        );
    }
    // A keyframe of the second host's (the server asks for one) decodes.
    viewer
        .wait_for(
            TrackKind::Video,
            "a decodable keyframe after the host change",
            |t| {
                t.decoder
                    .as_ref()
                    .is_some_and(|d| d.decoded_keyframes().iter().any(|k| k.at > left))
            },
            T,
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    let mut viewer = viewer;
    assert_eq!(viewer.delete().await.unwrap(), 200);
    viewer.close().await;
    second.leave().await.ok();
    server.shutdown().await;
}

/// WHIP in, WHEP out: no WebSocket at all. The participant form of the URL (the token's
/// identity), an ICE restart of the viewer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whip_publisher_to_whep_viewer() {
    let server = TestServer::start().await;
    let tok = token("ww", "obs", |_| {});
    let whip = WhipPublisher::publish(
        server.http_addr,
        "/whip/ww",
        Some(&tok),
        WhipOptions {
            timeout: T,
            ..WhipOptions::default()
        },
    )
    .await
    .expect("WHIP publish");
    let mut viewer = play(&server, "/whep/ww/obs", "ww", whep_opts()).await;
    for kind in [TrackKind::Audio, TrackKind::Video] {
        viewer
            .wait_for_packets(kind, 50, T)
            .await
            .unwrap_or_else(|e| panic!("{kind:?} from the WHIP publisher: {e:#}"));
    }
    let video = viewer.track(TrackKind::Video).unwrap();
    assert!(
        video.keyframes > 0 && video.resolution.is_some(),
        "decodable video: {video:?}"
    );

    // ICE restart: 200 with new credentials and a new ETag; media goes on.
    let old_etag = viewer.etag.clone();
    let r = viewer.restart_ice().await.expect("ICE restart");
    assert_eq!(r.status, 200);
    assert_ne!(viewer.etag, old_etag, "a new ETag");
    wait_more(&viewer, TrackKind::Video, 30, "video after the restart").await;

    assert_eq!(viewer.delete().await.unwrap(), 200);
    viewer.close().await;
    whip.close().await;
    server.shutdown().await;
}

/// A viewer behind a bottleneck: on the top layer while unlimited, down to the low layer once
/// its bandwidth is cut to 400 kbit/s (the estimate comes from its TWCC feedback).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_whose_bandwidth_is_cut_switches_down() {
    let server = TestServer::start().await;
    let host = simulcast_publisher(&server, "bw").await;
    let joined = Instant::now();
    let viewer = play(
        &server,
        "/whep/bw",
        "bw",
        WhepOptions {
            bandwidth_bps: Some(0),
            ..whep_opts()
        },
    )
    .await;
    wait_kept(&viewer, HIGH, joined).await;
    println!(
        "on 1280x720 {:.1} s after joining",
        joined.elapsed().as_secs_f64()
    );
    let relayed = viewer.relay_stats().unwrap();
    assert!(
        relayed.down_packets > 100,
        "the media goes through the relay: {relayed:?}"
    );
    let cut = Instant::now();
    viewer.set_bandwidth(400_000).unwrap();
    wait_size(&viewer, LOW, cut, T).await;
    println!(
        "on 320x180 {} ms after the cut; relay {:?}",
        cut.elapsed().as_millis(),
        viewer.relay_stats()
    );
    let mut viewer = viewer;
    assert_eq!(viewer.delete().await.unwrap(), 200);
    viewer.close().await;
    host.leave().await.ok();
    server.shutdown().await;
}

/// `/whep/{room}` plays the publisher of the earliest-published track;
/// `/whep/{room}/{participant}` (its id) another one; `?track=` one track by its server id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_participant_or_track_is_played() {
    let server = TestServer::start().await;
    let plain = support::publisher(&server, "pick", "plain").await;
    // The host is the publisher of the earliest-published track: the plain one's tracks are
    // published before the other publisher joins.
    plain
        .wait_for_local_track(TrackKind::Audio, |t| t.server_track_id.is_some(), T)
        .await
        .expect("the plain audio track is announced");
    let plain_video = plain
        .wait_for_local_track(TrackKind::Video, |t| t.server_track_id.is_some(), T)
        .await
        .expect("the plain video track is announced")
        .server_track_id
        .expect("checked");
    let simulcast = simulcast_publisher(&server, "pick").await;
    let size = |v: &WhepViewer| v.track(TrackKind::Video).and_then(|t| t.resolution);
    let video_only = WhepOptions {
        audio: false,
        ..whep_opts()
    };

    // The host: the first that published (plain, not simulcast).
    let host = play(&server, "/whep/pick", "pick", whep_opts()).await;
    let by_id = play(
        &server,
        &format!("/whep/pick/{}", simulcast.participant_id()),
        "pick",
        whep_opts(),
    )
    .await;
    let by_track = play(
        &server,
        &format!("/whep/pick?track={plain_video}"),
        "pick",
        video_only,
    )
    .await;
    for v in [&host, &by_id, &by_track] {
        v.wait_for(
            TrackKind::Video,
            "a keyframe",
            |t| t.resolution.is_some(),
            T,
        )
        .await
        .unwrap_or_else(|e| panic!("{}: {e:#}", v.location));
    }
    let simulcast_sizes = [LOW, (640, 360), HIGH];
    let (h, i, t) = (size(&host), size(&by_id), size(&by_track));
    println!("frame sizes: host {h:?}, by id {i:?}, by track {t:?}");
    assert!(
        h.is_some_and(|s| !simulcast_sizes.contains(&s)),
        "the host is the plain publisher: {h:?}"
    );
    assert!(
        i.is_some_and(|s| simulcast_sizes.contains(&s)),
        "by id: the simulcast publisher: {i:?}"
    );
    assert_eq!(t, h, "by track id: the plain publisher's video");
    assert!(
        by_track.track(TrackKind::Audio).is_none(),
        "one video section only"
    );
    for mut v in [host, by_id, by_track] {
        assert_eq!(v.delete().await.unwrap(), 200);
        v.close().await;
    }
    plain.leave().await.ok();
    simulcast.leave().await.ok();
    server.shutdown().await;
}

/// The configured STUN and TURN servers come as `Link` headers (TURN with credentials), beside
/// the layer extension's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ice_servers_are_link_headers() {
    let mut config = support::test_config();
    config.ice = IceConfig {
        turn_urls: vec!["turn:turn.example:3478?transport=udp".into()],
        turn_secret: Some(Secret::new("a-shared-secret-of-enough-length")),
        stun_urls: vec!["stun:stun.example:3478".into()],
        ..IceConfig::none()
    };
    let server = TestServer::start_with(config).await;
    let mut viewer = play(&server, "/whep/links", "links", whep_opts()).await;
    let l = &viewer.links;
    assert_eq!(l.ice_servers.len(), 2, "{l:?}");
    let turn = &l.ice_servers[0];
    assert_eq!(turn.url, "turn:turn.example:3478?transport=udp");
    assert!(
        turn.username.as_ref().is_some_and(|u| !u.is_empty())
            && turn.credential.as_ref().is_some_and(|c| !c.is_empty())
            && turn.credential_type.as_deref() == Some("password"),
        "{turn:?}"
    );
    assert_eq!(l.ice_servers[1].url, "stun:stun.example:3478");
    assert_eq!(l.ice_servers[1].username, None);
    assert!(l.layer.is_some(), "{l:?}");
    assert_eq!(viewer.delete().await.unwrap(), 200);
    viewer.close().await;
    server.shutdown().await;
}

/// The server's limits apply to WHEP like to any join: a full room (503 with `Retry-After`),
/// the join rate of an address (429), the body size (413); `POST` on a session is 405. None
/// of them leaves a participant behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_apply_to_whep() {
    let mut config = support::test_config();
    config.max_participants_per_room = 1;
    config.max_joins_per_ip = 0.5;
    config.join_burst_per_ip = 3;
    config.max_ws_message = 4096;
    let server = TestServer::start_with(config).await;
    let host = support::subscriber(&server, "full", "host").await;
    let tok = viewer_token("full", "player");
    let e = WhepViewer::play(server.http_addr, "/whep/full", Some(&tok), whep_opts())
        .await
        .err()
        .expect("a full room refuses");
    assert!(e.to_string().contains("503"), "{e:#}");
    // Over the body limit (before the join rate counts it).
    let big = vec![b'a'; 8192];
    let auth = format!("Bearer {tok}");
    let r = http(
        server.http_addr,
        "POST",
        "/whep/full",
        &[
            ("Content-Type", "application/sdp"),
            ("Authorization", &auth),
        ],
        &big,
    )
    .await
    .unwrap();
    assert_eq!(r.status, 413, "{}", r.body);
    // The third join from this address within the burst of 3 is over the rate.
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let r = http(
            server.http_addr,
            "POST",
            "/whep/full",
            &[("Content-Type", "application/sdp")],
            b"v=0\r\n",
        )
        .await
        .unwrap();
        statuses.push(r.status);
        if r.status == 429 {
            assert!(r.header("retry-after").is_some(), "429 with Retry-After");
        }
    }
    assert!(statuses.contains(&429), "over the join rate: {statuses:?}");
    let r = http(
        server.http_addr,
        "POST",
        "/whep/full/sessions/nope",
        &[("Content-Type", "application/sdp")],
        b"v=0\r\n",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 405, "{}", r.body);
    assert!(r.header("allow").is_some_and(|a| a.contains("PATCH")));
    assert_eq!(participants(&server).await, 1, "only the host");
    host.leave().await.ok();
    server.shutdown().await;
}
