//! WHIP ingest (RFC 9725) against the real server: a webrtc-rs WHIP publisher (no Plaza
//! signaling) publishes to a room and a WebSocket subscriber receives its media; `DELETE`
//! unpublishes it; trickle `PATCH` with `If-Match`, an ICE restart; simulcast offers become layers; and every
//! refusal has its status (401, 403, 404, 405, 412, 413, 415, 422, 428, 503), never a 500,
//! with nothing left behind.

// A test: it times the POST → first media path with the clock, and prints it.
#![allow(clippy::disallowed_methods, clippy::print_stdout)]

use plaza::auth::{RoomGrants, Secret};
use plaza::signal::{ServerMessage, TrackKind};
use plaza::turn::IceConfig;
use plaza_testkit::token::with_grants as token;
use plaza_testkit::whip::{HttpReply, WhipOptions, WhipPublisher, http};
use plaza_testkit::{self as common, PeerEvent, support};
use std::time::Instant;
use support::{T, TestServer, test_config, wait_growth};

fn opts() -> WhipOptions {
    WhipOptions {
        timeout: T,
        ..WhipOptions::default()
    }
}

/// The id of the participant named `name`, as `viewer` knows it.
async fn participant_named(viewer: &common::Peer, name: &str) -> String {
    let found = viewer
        .wait_for_event(
            |e| {
                matches!(e, PeerEvent::Server(ServerMessage::ParticipantJoined { participant })
                    if participant.name == name)
            },
            T,
        )
        .await
        .unwrap_or_else(|e| panic!("{} sees {name} join: {e:#}", viewer.name()));
    match found {
        PeerEvent::Server(ServerMessage::ParticipantJoined { participant }) => participant.id,
        _ => unreachable!(),
    }
}

/// The first `a=ice-ufrag` of an SDP or fragment.
fn ufrag(sdp: &str) -> String {
    sdp.lines()
        .find_map(|l| l.trim().strip_prefix("a=ice-ufrag:"))
        .unwrap_or_default()
        .to_owned()
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

/// The main path: publish, receive, trickle, the session's refusals, `DELETE`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whip_publisher_is_received_by_room_subscribers_until_deleted() {
    let server = TestServer::start().await;
    let viewer = support::subscriber(&server, "stage", "viewer").await;
    let tok = token("stage", "obs", |_| {});
    let t0 = Instant::now();
    let mut whip = WhipPublisher::publish(server.http_addr, "/whip/stage", Some(&tok), opts())
        .await
        .expect("WHIP publish");

    // The 201: answer, Location, ETag, CORS.
    let c = &whip.created;
    assert_eq!(c.header("content-type"), Some("application/sdp"));
    assert!(
        whip.location.starts_with("/whip/stage/sessions/") && whip.location.len() > 30,
        "Location {:?}",
        whip.location
    );
    assert!(
        whip.etag.starts_with('"') && whip.etag.ends_with('"') && whip.etag.len() > 10,
        "ETag {:?}",
        whip.etag
    );
    assert_eq!(
        c.header("accept-patch"),
        Some("application/trickle-ice-sdpfrag")
    );
    assert!(
        c.body.contains("a=candidate:"),
        "complete answer: {}",
        c.body
    );
    assert!(
        c.all("link").is_empty(),
        "no ICE servers configured: {:?}",
        c.all("link")
    );
    assert_cors(c, "201");

    // The room sees a participant with an audio and a video track, and receives both.
    let pid = participant_named(&viewer, "obs").await;
    let mut ids = Vec::new();
    for (kind, mime) in [
        (TrackKind::Audio, "audio/opus"),
        (TrackKind::Video, "video/VP8"),
    ] {
        let track = viewer
            .wait_for_room_track(|t| t.participant_id == pid && t.kind == kind, T)
            .await
            .unwrap_or_else(|e| panic!("viewer learns about the WHIP {kind:?} track: {e:#}"));
        assert!(
            track.mime_type.eq_ignore_ascii_case(mime),
            "{kind:?}: {}",
            track.mime_type
        );
        assert!(track.layers.is_empty(), "not simulcast: {:?}", track.layers);
        ids.push(track.id);
    }
    viewer
        .wait_for_packets(&ids[1], 1, T)
        .await
        .expect("first video packet");
    println!(
        "WHIP POST → first video RTP at a WebSocket subscriber: {} ms",
        t0.elapsed().as_millis()
    );
    for id in &ids {
        let stats = wait_growth(&viewer, id, 30).await;
        assert!(stats.packets >= 30, "{id}: {stats:?}");
    }
    assert!(whip.frames_sent() > 0);
    // Its connection quality is rated (on its publisher connection: it has no other).
    viewer
        .wait_for_event(
            |e| {
                matches!(e, PeerEvent::Server(ServerMessage::ConnectionQuality { updates })
                if updates.iter().any(|u| u.participant_id == pid))
            },
            T,
        )
        .await
        .expect("the viewer gets the WHIP publisher's connection quality");

    // Trickle: a candidate with the session's ETag is taken; what the publisher trickled by
    // itself was too.
    let sdpfrag = ("Content-Type", "application/trickle-ice-sdpfrag");
    let trickle = "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\n\
                   a=candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host\r\n\
                   a=end-of-candidates\r\n";
    let etag = whip.etag.clone();
    let r = whip
        .request(
            "PATCH",
            &[sdpfrag, ("If-Match", etag.as_str())],
            trickle.as_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 204, "trickle: {}", r.body);
    assert!(
        whip.patch_statuses().iter().all(|s| *s == 204),
        "the publisher's own trickle: {:?}",
        whip.patch_statuses()
    );
    let r = whip
        .request(
            "PATCH",
            &[sdpfrag, ("If-Match", "\"stale\"")],
            trickle.as_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 412, "stale ETag: {}", r.body);
    let r = whip
        .request("PATCH", &[sdpfrag], trickle.as_bytes())
        .await
        .unwrap();
    assert_eq!(r.status, 428, "no If-Match: {}", r.body);
    let r = whip
        .request(
            "PATCH",
            &[("Content-Type", "application/sdp"), ("If-Match", "*")],
            trickle.as_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 415, "PATCH of another type: {}", r.body);
    let r = whip
        .request(
            "PATCH",
            &[sdpfrag, ("If-Match", "*")],
            b"this is not a fragment",
        )
        .await
        .unwrap();
    assert_eq!(r.status, 400, "garbage fragment: {}", r.body);
    let r = whip.request("GET", &[], b"").await.unwrap();
    assert_eq!(r.status, 405, "GET on the session: {}", r.body);
    let r = whip.request("OPTIONS", &[], b"").await.unwrap();
    assert!(r.status == 204 || r.status == 200, "OPTIONS: {}", r.status);
    assert_cors(&r, "OPTIONS on the session");
    // Media still flows after all that.
    wait_growth(&viewer, &ids[1], 10).await;

    // ICE restart: new credentials with `If-Match: *` → 200 with the server's new ones and a
    // new ETag; ICE connects again and media goes on.
    let old_etag = whip.etag.clone();
    let old_ufrag = ufrag(&whip.created.body);
    let r = whip.restart_ice().await.expect("ICE restart");
    assert_eq!(
        r.header("content-type"),
        Some("application/trickle-ice-sdpfrag")
    );
    assert_ne!(
        ufrag(&r.body),
        old_ufrag,
        "new server credentials: {}",
        r.body
    );
    assert!(
        r.body.contains("a=candidate:") && r.body.contains("a=end-of-candidates"),
        "{}",
        r.body
    );
    assert_ne!(whip.etag, old_etag, "a new ETag");
    assert_eq!(r.header("etag"), Some(whip.etag.as_str()));
    let stale = whip
        .request(
            "PATCH",
            &[sdpfrag, ("If-Match", old_etag.as_str())],
            trickle.as_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(
        stale.status, 412,
        "the ETag before the restart: {}",
        stale.body
    );
    let etag = whip.etag.clone();
    let r = whip
        .request(
            "PATCH",
            &[sdpfrag, ("If-Match", etag.as_str())],
            trickle.as_bytes(),
        )
        .await
        .unwrap();
    assert_eq!(r.status, 204, "trickle after the restart: {}", r.body);
    for id in &ids {
        wait_growth(&viewer, id, 20).await;
    }
    let (_, h) = server.healthz().await.unwrap();
    assert_eq!(h["ice_restarts"], 1, "{h}");

    // DELETE: the tracks are unpublished and the participant leaves.
    let mark = viewer.event_count();
    assert_eq!(whip.delete().await.unwrap(), 200);
    for id in &ids {
        viewer
            .wait_for_event_after(
                mark,
                |e| matches!(e, PeerEvent::Server(ServerMessage::TrackUnpublished { track_id, .. }) if track_id == id),
                T,
            )
            .await
            .unwrap_or_else(|e| panic!("viewer sees {id} unpublished: {e:#}"));
    }
    viewer
        .wait_for_event_after(
            mark,
            |e| matches!(e, PeerEvent::Server(ServerMessage::ParticipantLeft { participant_id, .. }) if *participant_id == pid),
            T,
        )
        .await
        .expect("viewer sees the WHIP participant leave");
    // The session is gone: a second DELETE and a PATCH find nothing.
    assert_eq!(whip.request("DELETE", &[], b"").await.unwrap().status, 404);
    let r = whip
        .request("PATCH", &[sdpfrag, ("If-Match", "*")], trickle.as_bytes())
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    assert_eq!(participants(&server).await, 1, "only the viewer is left");
    whip.close().await;
    viewer.leave().await.ok();
    server.shutdown().await;
}

/// A simulcast offer (three RIDs) becomes one video track with three layers, which a
/// subscriber receives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulcast_offer_becomes_a_track_with_layers() {
    let server = TestServer::start().await;
    let viewer = support::subscriber(&server, "sc", "viewer").await;
    let tok = token("sc", "encoder", |_| {});
    let o = WhipOptions {
        audio: false,
        simulcast: true,
        ..opts()
    };
    let whip = WhipPublisher::publish(server.http_addr, "/whip/sc/Encoder", Some(&tok), o)
        .await
        .expect("WHIP simulcast publish");
    let pid = participant_named(&viewer, "encoder").await;
    let track = viewer
        .wait_for_room_track(|t| t.participant_id == pid, T)
        .await
        .expect("the simulcast track is announced");
    assert_eq!(track.kind, TrackKind::Video);
    let mut layers = track.layers.clone();
    layers.sort();
    assert_eq!(layers, vec!["f", "h", "q"], "layers of {track:?}");
    wait_growth(&viewer, &track.id, 50).await;
    whip.close().await;
    viewer.leave().await.ok();
    server.shutdown().await;
}

/// The ICE servers go out as `Link` headers, TURN with fresh credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ice_servers_are_link_headers() {
    let mut config = test_config();
    config.ice = IceConfig {
        turn_urls: vec!["turn:turn.example:3478?transport=udp".into()],
        turn_secret: Some(Secret::new("a-shared-secret-of-enough-length")),
        stun_urls: vec!["stun:stun.example:3478".into()],
        ..IceConfig::none()
    };
    let server = TestServer::start_with(config).await;
    let tok = token("links", "cam", |_| {});
    let o = WhipOptions {
        audio: false,
        trickle: false,
        ..opts()
    };
    let mut whip = WhipPublisher::publish(server.http_addr, "/whip/links", Some(&tok), o)
        .await
        .expect("WHIP publish");
    let links = whip.created.all("link");
    assert_eq!(links.len(), 2, "{links:?}");
    assert!(
        links[0]
            .starts_with("<turn:turn.example:3478?transport=udp>; rel=\"ice-server\"; username=\"")
            && links[0].contains("credential=\"")
            && links[0].contains("credential-type=\"password\""),
        "{links:?}"
    );
    assert_eq!(links[1], "<stun:stun.example:3478>; rel=\"ice-server\"");
    assert_eq!(whip.delete().await.unwrap(), 200);
    server.shutdown().await;
}

/// Every refusal, with its status; none leaves a participant behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_statuses() {
    let mut config = test_config();
    config.max_ws_message = 4096;
    let server = TestServer::start_with(config).await;
    let addr = server.http_addr;
    let good = token("r", "pub", |_| {});
    let auth = format!("Bearer {good}");
    let sdp = ("Content-Type", "application/sdp");
    let offer = b"v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
                  m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=rtpmap:96 VP8/90000\r\n";
    let post = |headers: Vec<(&'static str, String)>, body: Vec<u8>| async move {
        let h: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        http(addr, "POST", "/whip/r", &h, &body).await.unwrap()
    };

    // Tokens: none, garbage, another room, no publish grant, hidden.
    let r = post(vec![(sdp.0, sdp.1.into())], offer.to_vec()).await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    assert_cors(&r, "401");
    let r = post(
        vec![
            (sdp.0, sdp.1.into()),
            ("Authorization", "Bearer nope".into()),
        ],
        offer.to_vec(),
    )
    .await;
    assert_eq!(r.status, 401, "{}", r.body);
    let other = format!("Bearer {}", token("elsewhere", "pub", |_| {}));
    let r = post(
        vec![(sdp.0, sdp.1.into()), ("Authorization", other)],
        offer.to_vec(),
    )
    .await;
    assert_eq!(r.status, 403, "wrong room: {}", r.body);
    for (what, f) in [
        (
            "no publish grant",
            Box::new(|g: &mut RoomGrants| g.can_publish = Some(false))
                as Box<dyn FnOnce(&mut RoomGrants)>,
        ),
        ("hidden", Box::new(|g: &mut RoomGrants| g.hidden = true)),
    ] {
        let t = format!("Bearer {}", token("r", "pub", f));
        let r = post(
            vec![(sdp.0, sdp.1.into()), ("Authorization", t)],
            offer.to_vec(),
        )
        .await;
        assert_eq!(r.status, 403, "{what}: {}", r.body);
    }

    // Bodies: wrong type, not SDP, unusable SDP, no media, too large.
    let r = post(
        vec![
            ("Content-Type", "application/json".into()),
            ("Authorization", auth.clone()),
        ],
        offer.to_vec(),
    )
    .await;
    assert_eq!(r.status, 415, "{}", r.body);
    assert_eq!(r.header("accept-post"), Some("application/sdp"));
    let r = post(
        vec![(sdp.0, sdp.1.into()), ("Authorization", auth.clone())],
        b"{\"sdp\": \"hello\"}".to_vec(),
    )
    .await;
    assert_eq!(r.status, 400, "not SDP: {}", r.body);
    // Parses as SDP lines, but no ICE credentials, no fingerprint: unusable.
    let r = post(
        vec![(sdp.0, sdp.1.into()), ("Authorization", auth.clone())],
        offer.to_vec(),
    )
    .await;
    assert_eq!(r.status, 422, "unusable offer: {}", r.body);
    let r = post(
        vec![(sdp.0, sdp.1.into()), ("Authorization", auth.clone())],
        b"v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n".to_vec(),
    )
    .await;
    assert_eq!(r.status, 422, "no media: {}", r.body);
    let r = post(
        vec![(sdp.0, sdp.1.into()), ("Authorization", auth.clone())],
        b"v=0\r\nm=video garbage\r\n\xff\xfe\x00".to_vec(),
    )
    .await;
    assert!(
        r.status == 400 || r.status == 422,
        "garbage: {} {}",
        r.status,
        r.body
    );
    let mut big = offer.to_vec();
    big.extend(std::iter::repeat_n(b'a', 8192));
    let r = post(
        vec![(sdp.0, sdp.1.into()), ("Authorization", auth.clone())],
        big,
    )
    .await;
    assert_eq!(r.status, 413, "{}", r.body);

    // Methods and unknown sessions.
    let r = http(addr, "GET", "/whip/r", &[], b"").await.unwrap();
    assert_eq!(r.status, 405, "{}", r.body);
    let r = http(
        addr,
        "OPTIONS",
        "/whip/r",
        &[
            ("Origin", "https://app.example"),
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
    let frag = [
        ("Content-Type", "application/trickle-ice-sdpfrag"),
        ("If-Match", "*"),
    ];
    let r = http(
        addr,
        "PATCH",
        "/whip/r/sessions/nope",
        &frag,
        b"m=audio 9 x 0\r\n",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
    let r = http(addr, "DELETE", "/whip/r/sessions/nope", &[], b"")
        .await
        .unwrap();
    assert_eq!(r.status, 404, "{}", r.body);

    assert_eq!(
        participants(&server).await,
        0,
        "no refusal leaves a participant"
    );
    server.shutdown().await;
}

/// The server's caps apply to WHIP: a full room is 503 with `Retry-After`; the per-address
/// join rate is 429.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_apply_to_whip() {
    let mut config = test_config();
    config.max_participants_per_room = 1;
    config.max_joins_per_ip = 0.5;
    config.join_burst_per_ip = 2;
    let server = TestServer::start_with(config).await;
    let viewer = support::subscriber(&server, "full", "viewer").await;
    let tok = token("full", "cam", |_| {});
    let o = WhipOptions {
        trickle: false,
        ..opts()
    };
    let e = WhipPublisher::publish(server.http_addr, "/whip/full", Some(&tok), o.clone())
        .await
        .err()
        .expect("a full room refuses");
    assert!(e.to_string().contains("503"), "{e:#}");
    // The third join from this address within the burst of 2 is over the rate.
    let r = http(
        server.http_addr,
        "POST",
        "/whip/full",
        &[("Content-Type", "application/sdp")],
        b"v=0\r\n",
    )
    .await
    .unwrap();
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(r.header("retry-after").is_some());
    assert_eq!(participants(&server).await, 1);
    viewer.leave().await.ok();
    server.shutdown().await;
}
