//! Server and room lifecycle: graceful shutdown with peers connected, rooms that disappear
//! when their last participant goes.

use plaza_testkit::{self as common, support};

use common::{Peer, PeerEvent};
use plaza::server::SHUTDOWN_TIMEOUT;
use plaza::signal::{ServerMessage, TrackKind};
use support::{RawWs, Received, T, TestServer, announced_track, publisher, subscriber};

/// Index of the first event matching `pred`.
fn position(peer: &Peer, mut pred: impl FnMut(&PeerEvent) -> bool) -> Option<usize> {
    peer.events().iter().position(|e| pred(&e.event))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_tells_everyone_and_closes() {
    let server = TestServer::start().await;
    let alice = publisher(&server, "bye", "alice").await;
    let bob = publisher(&server, "bye", "bob").await;
    for (rx, tx) in [(&alice, &bob), (&bob, &alice)] {
        let id = announced_track(rx, tx, TrackKind::Video).await.id;
        rx.wait_for_packets(&id, 20, T).await.unwrap();
    }
    // A connection that never joined.
    let mut idle = RawWs::connect(&server.ws_url()).await.unwrap();
    idle.ping(1.0).await.unwrap();
    let http = server.http_addr;

    let took = server.shutdown().await;
    assert!(
        took < SHUTDOWN_TIMEOUT,
        "shutdown took {took:?}: it ran into its own timeout, something did not stop"
    );

    for p in [&alice, &bob] {
        let closed = p
            .wait_closed(T)
            .await
            .unwrap_or_else(|e| panic!("{}'s WebSocket is closed: {e:#}", p.name()));
        let leave = position(p, |e| {
            matches!(e, PeerEvent::Server(ServerMessage::Leave { reason }) if reason.contains("shut"))
        })
        .unwrap_or_else(|| {
            panic!(
                "{} got no `leave` mentioning the shutdown: {:#?}",
                p.name(),
                p.events()
            )
        });
        let ws_closed =
            position(p, |e| matches!(e, PeerEvent::WsClosed { .. })).expect("a WsClosed event");
        assert!(leave < ws_closed, "`leave` comes before the close");
        // A clean close frame from the server, not a dropped connection.
        assert!(
            closed.contains("closed by server") && closed.contains("shutting down"),
            "{}: {closed}",
            p.name()
        );
        // Nothing after the leave but the close (e.g. no error).
        let after: Vec<_> = p
            .events()
            .into_iter()
            .skip(leave + 1)
            .filter(|e| matches!(e.event, PeerEvent::Server(_)))
            .collect();
        assert!(after.is_empty(), "{}: {after:?}", p.name());
    }
    match idle.recv().await.unwrap() {
        Received::Closed(Some((code, _))) => assert_eq!(code, 1001, "going away"),
        other => panic!("the idle connection is closed with 1001, got {other:?}"),
    }
    assert!(
        tokio::net::TcpStream::connect(http).await.is_err(),
        "the HTTP listener is closed after shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_disappear_when_empty() {
    let server = TestServer::start().await;
    let (status, h) = server.healthz().await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        (h["rooms"].as_u64(), h["participants"].as_u64()),
        (Some(0), Some(0)),
        "{h}"
    );

    let ann = publisher(&server, "one", "ann").await;
    let ben = subscriber(&server, "one", "ben").await;
    let cid = subscriber(&server, "two", "cid").await;
    announced_track(&ben, &ann, TrackKind::Video).await;
    let (_, h) = server.healthz().await.unwrap();
    assert_eq!(h["rooms"], 2, "{h}");
    assert_eq!(h["participants"], 3, "{h}");
    assert_eq!(h["published_tracks"], 2, "{h}");

    // A polite leave: the server closes the socket, the room stays for ben.
    ann.leave().await.unwrap();
    assert!(
        position(&ann, |e| matches!(e, PeerEvent::WsClosed { .. })).is_some(),
        "the server closes the WebSocket after `leave`: {:?}",
        ann.closed_reason()
    );
    let ann_id = ann.participant_id().to_owned();
    ben.wait_for_server(
        |m| matches!(m, ServerMessage::ParticipantLeft { participant_id, .. } if *participant_id == ann_id),
        T,
    )
    .await
    .unwrap();
    let h = server
        .wait_healthz(
            "ann gone",
            |h| h["participants"] == 2 && h["published_tracks"] == 0,
            T,
        )
        .await
        .unwrap();
    assert_eq!(h["rooms"], 2, "{h}");

    // A vanished client (no `leave`): its room goes too.
    ben.disconnect().await;
    let h = server
        .wait_healthz(
            "room `one` gone after ben vanished",
            |h| h["rooms"] == 1 && h["participants"] == 1,
            T,
        )
        .await
        .unwrap();
    assert_eq!(h["published_tracks"], 0, "{h}");

    cid.leave().await.unwrap();
    server
        .wait_healthz(
            "no rooms left",
            |h| h["rooms"] == 0 && h["participants"] == 0 && h["published_tracks"] == 0,
            T,
        )
        .await
        .unwrap();

    // The name can be used again: a fresh, empty room.
    let dan = subscriber(&server, "one", "dan").await;
    assert!(
        dan.joined().participants.is_empty(),
        "stale participants in a re-created room: {:?}",
        dan.joined().participants
    );
    let (_, h) = server.healthz().await.unwrap();
    assert_eq!(h["rooms"], 1, "{h}");
    dan.leave().await.unwrap();
    server
        .wait_healthz("no rooms left again", |h| h["rooms"] == 0, T)
        .await
        .unwrap();

    server.shutdown().await;
}

/// `--workers 2`: rooms are placed on the two shards (each with its own UDP port), a room's
/// later joiners land where the room is, media flows on both shards, `/healthz` sums them and
/// shows each shard's share, and shutdown stops both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_are_spread_over_shards() {
    let server = TestServer::start_with(plaza::config::Config {
        workers: 2,
        ..support::test_config()
    })
    .await;
    let (_, h) = server.healthz().await.unwrap();
    assert_eq!(h["shards"].as_array().map(Vec::len), Some(2), "{h}");

    // Room one on a shard, room two on the other (the emptier one).
    let ann = publisher(&server, "one", "ann").await;
    let cid = publisher(&server, "two", "cid").await;
    let ben = subscriber(&server, "one", "ben").await;
    let dan = subscriber(&server, "two", "dan").await;
    let a = announced_track(&ben, &ann, TrackKind::Video).await;
    let c = announced_track(&dan, &cid, TrackKind::Video).await;
    support::assert_media_flows("both rooms", &[(&ben, &a.id), (&dan, &c.id)], 30).await;

    let h = server
        .wait_healthz(
            "both shards forward",
            |h| {
                h["shards"].as_array().is_some_and(|s| {
                    s.iter().all(|s| {
                        s["rooms"] == 1
                            && s["participants"] == 2
                            && s["rtp_packets_forwarded"].as_u64() > Some(0)
                    })
                })
            },
            T,
        )
        .await
        .unwrap();
    assert_eq!(h["rooms"], 2, "{h}");
    assert_eq!(h["participants"], 4, "{h}");
    let sum: u64 = h["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["rtp_packets_forwarded"].as_u64().unwrap())
        .sum();
    assert_eq!(
        h["rtp_packets_forwarded"].as_u64(),
        Some(sum),
        "the total is the sum of the shards: {h}"
    );
    // The participants of one room see each other, never the other room's.
    assert!(
        ben.joined()
            .participants
            .iter()
            .any(|p| p.id == ann.participant_id())
            && !ben
                .joined()
                .participants
                .iter()
                .any(|p| p.id == cid.participant_id()),
        "{:?}",
        ben.joined().participants
    );

    let took = server.shutdown().await;
    assert!(took < SHUTDOWN_TIMEOUT, "shutdown took {took:?}");
    for p in [&ann, &ben, &cid, &dan] {
        p.wait_closed(T).await.unwrap();
    }
}

/// A room bigger than `room_spread_above` spreads over both shards: the publisher's shard hands
/// each packet once to the other, whose viewers get it like any other; participants, data and
/// departures cross between the shards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_room_spans_shards() {
    let server = TestServer::start_with(plaza::config::Config {
        workers: 2,
        room_spread_above: 2,
        pin_shards: true,
        ..support::test_config()
    })
    .await;
    // Two on the first shard; from then on joins go to the emptier shard.
    let ann = publisher(&server, "live", "ann").await;
    let ben = subscriber(&server, "live", "ben").await;
    let cid = subscriber(&server, "live", "cid").await;
    let dan = subscriber(&server, "live", "dan").await;
    let h = server.healthz().await.unwrap().1;
    let per_shard: Vec<u64> = h["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["participants"].as_u64().unwrap())
        .collect();
    assert_eq!(per_shard, vec![2, 2], "{h}");

    // Media crosses: every viewer gets ann's audio and video.
    let video = announced_track(&dan, &ann, TrackKind::Video).await;
    let audio = announced_track(&dan, &ann, TrackKind::Audio).await;
    let flows: Vec<(&Peer, &str)> = [&ben, &cid, &dan]
        .iter()
        .flat_map(|p| [(*p, video.id.as_str()), (*p, audio.id.as_str())])
        .collect();
    support::assert_media_flows("across shards", &flows, 30).await;
    let h = server
        .wait_healthz(
            "both shards send",
            |h| {
                h["shards"].as_array().is_some_and(|s| {
                    s.iter()
                        .all(|s| s["rtp_packets_forwarded"].as_u64() > Some(0))
                })
            },
            T,
        )
        .await
        .unwrap();
    assert!(h["rtp_packets_piped"].as_u64() > Some(0), "{h}");
    assert_eq!(h["pipe_msgs_dropped"], 0, "{h}");
    // `--pin-shards`: each shard's thread (running: both have sent) is on its own CPU of
    // this process's.
    let allowed = plaza::io::allowed_cpus();
    for shard in 0..2 {
        let want = plaza::io::shard_cpu(&allowed, shard).expect("the kernel lists our CPUs");
        assert_eq!(
            thread_cpus(&format!("plaza-core-{shard}")),
            want.to_string(),
            "shard {shard} pinned (allowed: {allowed:?})"
        );
    }

    // Everyone knows everyone, whichever shard they are on.
    for p in [&ann, &ben, &cid, &dan] {
        for other in [&ann, &ben, &cid, &dan] {
            if p.participant_id() == other.participant_id() {
                continue;
            }
            let id = other.participant_id().to_owned();
            p.wait_for_participant(|i| i.id == id, T)
                .await
                .unwrap_or_else(|e| panic!("{} knows {}: {e:#}", p.name(), other.name()));
        }
    }

    // Data crosses: a broadcast from the second shard reaches all three others once; a
    // message to one participant on the other shard reaches only it.
    dan.send_chat("hello from the second shard", None)
        .await
        .unwrap();
    for p in [&ann, &ben, &cid] {
        let m = p
            .wait_for_message(|m| &m.payload[..] == b"hello from the second shard", T)
            .await
            .unwrap_or_else(|e| panic!("{} gets dan's chat: {e:#}", p.name()));
        assert_eq!(m.from.as_deref(), Some(dan.participant_id()));
    }
    ann.send_chat("for cid only", Some(vec![cid.participant_id().to_owned()]))
        .await
        .unwrap();
    let m = cid
        .wait_for_message(|m| &m.payload[..] == b"for cid only", T)
        .await
        .unwrap();
    assert_eq!(m.from.as_deref(), Some(ann.participant_id()));
    // (Sent after, on the same ordered channel: once it is in, the targeted one would be too.)
    ann.send_chat("marker", None).await.unwrap();
    for p in [&ben, &dan] {
        p.wait_for_message(|m| &m.payload[..] == b"marker", T)
            .await
            .unwrap();
        assert!(
            !p.messages()
                .iter()
                .any(|m| &m.payload[..] == b"for cid only"),
            "{} got a message meant for cid",
            p.name()
        );
        assert!(p.server_errors().is_empty(), "{:?}", p.server_errors());
    }
    assert!(ann.server_errors().is_empty(), "{:?}", ann.server_errors());

    // Departures cross too: the publisher leaves, the other shard's viewers are told.
    ann.leave().await.unwrap();
    for p in [&cid, &dan] {
        let id = ann.participant_id().to_owned();
        p.wait_for_server(
            |m| matches!(m, ServerMessage::ParticipantLeft { participant_id, .. } if *participant_id == id),
            T,
        )
        .await
        .unwrap_or_else(|e| panic!("{} is told ann left: {e:#}", p.name()));
        assert!(p.room_tracks().is_empty(), "{:?}", p.room_tracks());
    }

    let took = server.shutdown().await;
    assert!(took < SHUTDOWN_TIMEOUT, "shutdown took {took:?}");
    for p in [&ben, &cid, &dan] {
        p.wait_closed(T).await.unwrap();
    }
}

/// One participant's log lines, from signaling (its WebSocket session) and from the core (its
/// participant and track spans), all carry the session id it got in `joined`: the server
/// binary, JSON logs, a real publisher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::disallowed_methods)] // a test: its deadline reads the clock
async fn one_session_id_ties_signaling_and_media_log_lines() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    #[allow(clippy::disallowed_types)] // the test's reader thread shares what it read
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_plaza"))
        .args([
            "--port",
            "0",
            "--udp-port",
            "0",
            "--workers",
            "1",
            "--tcp-port",
            "off",
        ])
        .args(["--log-level", "debug", "--log-format", "json"])
        .env_remove("PLAZA_API_KEY")
        .env_remove("PLAZA_API_SECRET")
        .env_remove("PLAZA_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // Stopped however the test ends.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _child = Kill(child);
    {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
    }
    // Polls what the server logged until `f` finds something (bounded).
    let wait = |what: &str, f: &dyn Fn(&[String]) -> Option<String>| {
        let deadline = std::time::Instant::now() + T;
        loop {
            if let Some(v) = f(&lines.lock().unwrap()) {
                return v;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the server did not log {what}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let ws_url = wait("its address", &|ls| {
        ls.iter().find_map(|l| {
            let start = l.find("ws://")?;
            let rest = &l[start..];
            Some(rest[..rest.find("/rtc")? + 4].to_owned())
        })
    });
    let peer = Peer::connect(&ws_url, "logs", "alice", support::opts(true))
        .await
        .expect("alice joins the server binary");
    let sid = peer.joined().session_id.clone().expect("joined.session_id");
    assert!(sid.starts_with("SE_"), "{sid}");
    wait("the track's publication", &|ls| {
        ls.iter()
            .find(|l| l.contains(&sid) && l.contains("track published"))
            .cloned()
    });
    peer.leave().await.unwrap();
    let mine = wait("the participant's end", &|ls| {
        let mine: Vec<String> = ls.iter().filter(|l| l.contains(&sid)).cloned().collect();
        let ended = |m: &str| mine.iter().any(|l| l.contains(m));
        (ended("participant session ended") && ended("\"leaving\"")).then(|| mine.join("\n"))
    });
    for (what, needle) in [
        ("the signaling session's join", "participant joined"),
        ("the core's join", "\"joined\""),
        ("the core's track span", "track published"),
        ("the core's leave", "\"leaving\""),
    ] {
        assert!(
            mine.contains(needle),
            "{what} ({needle}) with {sid}:\n{mine}"
        );
    }
}

/// `Cpus_allowed_list` of this process's thread named `name` (the first, if several).
fn thread_cpus(name: &str) -> String {
    let tasks = std::fs::read_dir("/proc/self/task").expect("/proc/self/task");
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).expect("status");
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"));
        return line.expect("Cpus_allowed_list").trim().to_owned();
    }
    panic!("no thread named {name}");
}
