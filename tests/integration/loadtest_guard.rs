//! The load tester does not hide removed peers: it runs (the built example binary) against the
//! real server started in this process; a healthy run passes with ~100 % delivery, and a run in
//! which the server removes every peer (a graceful shutdown sends each one `leave`) fails and
//! names the removal.
//!
//! The binary is `target/<profile>/examples/loadtest`, next to this test's own `deps/`
//! directory: build it first (`cargo build --release --all-targets`, which the test command
//! runs). A missing binary fails the test.

// A test, not the packet path: shares state between tasks and times deadlines with the clock.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use plaza_testkit::{self as common, support};

use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use common::delivery::{self, Window};
use plaza::signal::TrackKind;
use serde_json::Value;
use support::{T, TestServer, announced_track, publisher, subscriber};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

/// Bound of one load-test run (it normally takes under 10 s).
const RUN_BOUND: Duration = Duration::from_secs(40);

/// The example binary built alongside this test (`target/<profile>/examples/loadtest`).
fn loadtest_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    // target/<profile>/deps/integration-<hash> → target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary lives in target/<profile>/deps");
    let bin = profile_dir.join("examples").join("loadtest");
    assert!(
        bin.is_file(),
        "{} is missing: build the examples first (cargo build --release --all-targets)",
        bin.display()
    );
    bin
}

/// A running load test: its output arrives line by line on `lines` (stdout and stderr).
struct Run {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    output: Vec<String>,
    json: PathBuf,
}

impl Run {
    fn start(server: &TestServer, name: &str, extra: &[&str]) -> Run {
        let json = std::env::temp_dir().join(format!(
            "plaza-loadtest-guard-{}-{name}.json",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&json);
        let mut child = Command::new(loadtest_bin())
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["--url", &server.ws_url(), "--room", name])
            .args(["--timeout", "10", "--join-timeout", "10"])
            .arg("--json")
            .arg(&json)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the loadtest binary starts");
        let (tx, lines) = mpsc::unbounded_channel();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        for (tag, pipe) in [
            (
                "out",
                Box::new(stdout) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
            ),
            ("err", Box::new(stderr)),
        ] {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut r = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = r.next_line().await {
                    let _ = tx.send(format!("{tag}| {line}"));
                }
            });
        }
        Run {
            child,
            lines,
            output: Vec::new(),
            json,
        }
    }

    /// Waits (bounded) for an output line containing every one of `words`.
    async fn wait_line(&mut self, words: &[&str], timeout: Duration) -> String {
        let found = tokio::time::timeout(timeout, async {
            while let Some(line) = self.lines.recv().await {
                self.output.push(line.clone());
                if words.iter().all(|w| line.contains(w)) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            _ => panic!(
                "no output line with {words:?} within {timeout:?}; output so far:\n{}",
                self.output.join("\n")
            ),
        }
    }

    /// Waits (bounded) for the process to exit; returns its status, its whole output and the
    /// JSON report.
    async fn finish(mut self) -> (ExitStatus, String, Value) {
        let status = match tokio::time::timeout(RUN_BOUND, self.child.wait()).await {
            Ok(s) => s.expect("waiting for the loadtest"),
            Err(_) => {
                let _ = self.child.kill().await;
                panic!("the loadtest did not finish within {RUN_BOUND:?}");
            }
        };
        // The pipes close with the process: collect the rest of the output.
        while let Ok(Some(line)) =
            tokio::time::timeout(Duration::from_secs(5), self.lines.recv()).await
        {
            self.output.push(line);
        }
        let output = self.output.join("\n");
        let text = std::fs::read_to_string(&self.json)
            .unwrap_or_else(|e| panic!("no JSON report {}: {e}\n{output}", self.json.display()));
        let _ = std::fs::remove_file(&self.json);
        let report: Value = serde_json::from_str(&text).expect("the JSON report parses");
        (status, output, report)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_run_passes_with_full_delivery() {
    let server = TestServer::start().await;
    let run = Run::start(
        &server,
        "guard-ok",
        &["--publishers", "1", "--subscribers", "2", "--duration", "3"],
    );
    let (status, output, report) = run.finish().await;
    assert!(status.success(), "healthy run failed ({status}):\n{output}");
    assert!(output.contains("out| OK"), "no OK line:\n{output}");
    assert_eq!(report["ok"], true, "{output}");
    assert_eq!(report["removed"].as_array().map(Vec::len), Some(0));

    let d = &report["delivery"];
    let pct = d["delivery_percent"].as_f64().expect("a delivery figure");
    assert!(pct >= 95.0, "delivery {pct}% in a healthy run:\n{output}");
    // 1 publisher × (audio + video) × 2 other peers, each written to and received.
    let flows = d["flows"].as_array().expect("flows");
    assert_eq!(flows.len(), 4, "{d:#}");
    for f in flows {
        let (exp, got) = (
            f["expected"].as_u64().unwrap(),
            f["received"].as_u64().unwrap(),
        );
        assert!(exp > 20, "{f}: the window saw too few packets written");
        assert!(
            got * 100 >= exp * 95,
            "{f}: received {got} of {exp} in a healthy run"
        );
    }
    // The per-peer figures are in the report too (the publisher subscribes to no one else).
    for p in report["peers"].as_array().expect("peers") {
        assert!(p["removed"].is_null(), "{p}");
        if p["role"] == "subscriber" {
            assert!(p["delivery_percent"].as_f64().unwrap_or(0.0) >= 95.0, "{p}");
        }
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_fails_and_names_peers_the_server_removed() {
    let server = TestServer::start().await;
    let mut run = Run::start(
        &server,
        "guard-removed",
        &["--publishers", "1", "--subscribers", "2", "--duration", "8"],
    );
    // Traffic flows (the first progress line), then the server goes away: every participant
    // gets `leave` and its WebSocket closes, while the run has seconds to go.
    run.wait_line(&["[loadtest", "delivery"], Duration::from_secs(20))
        .await;
    server.shutdown().await;
    let (status, output, report) = run.finish().await;

    assert!(
        !status.success(),
        "a run whose peers were all removed passed:\n{output}"
    );
    assert_eq!(status.code(), Some(1), "{output}");
    for name in ["pub-1", "sub-1", "sub-2"] {
        let fail = format!("err| FAIL: {name}: removed by the server");
        let line = output
            .lines()
            .find(|l| l.starts_with(&fail))
            .unwrap_or_else(|| panic!("no {fail:?} line:\n{output}"));
        assert!(line.contains("server sent leave"), "{line}");
    }
    assert!(
        output.contains("REMOVED 3/3") || output.contains("REMOVED at"),
        "the output does not show the removed peers:\n{output}"
    );
    assert_eq!(report["ok"], false);
    let removed = report["removed"].as_array().expect("removed");
    assert_eq!(removed.len(), 3, "{removed:?}");
    for r in removed {
        let at = r["at_s"].as_f64().unwrap();
        assert!(at > 0.0 && at < 8.0, "removed mid-run: {r}");
    }
}

/// The timeline mode (`--timeline`): four peers send on `chat` and `input` for 3 s; every
/// receiver's chat must be in the server's `seq` order and agree with the others (100 %), input
/// must be stamped consistently, and the latency, clock-sync and server figures must be there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeline_run_agrees_on_chat_order() {
    let server = TestServer::start().await;
    let run = Run::start(
        &server,
        "guard-timeline",
        &[
            "--timeline",
            "--peers",
            "4",
            "--rate",
            "20",
            "--duration",
            "3",
            "--pings",
            "3",
            "--settle-ms",
            "5000",
        ],
    );
    let (status, output, report) = run.finish().await;
    assert!(
        status.success(),
        "timeline run failed ({status}):\n{output}"
    );
    assert!(output.contains("out| OK"), "no OK line:\n{output}");
    assert_eq!(report["mode"], "timeline", "{output}");
    assert_eq!(report["ok"], true, "{output}");

    let chat = &report["timeline"]["chat"];
    assert_eq!(chat["receivers"], 4, "{chat:#}");
    assert_eq!(chat["exact"], 4, "{chat:#}");
    assert_eq!(chat["exact_percent"], 100.0, "{chat:#}");
    for k in [
        "unstamped",
        "missing_messages",
        "conflicting_seqs",
        "seq_holes",
        "ts_regressions",
        "sender_order_violations",
        "sseq_echo_mismatches",
    ] {
        assert_eq!(chat[k], 0, "chat {k}: {chat:#}");
    }
    // 4 peers × 20/s × 3 s, each to the 3 others; the timeline numbers every one of them.
    let sent = report["sent"]["chat"].as_u64().unwrap();
    assert!(sent >= 150, "only {sent} chat messages sent:\n{output}");
    let (first, last) = (
        chat["first_seq"].as_u64().unwrap(),
        chat["last_seq"].as_u64().unwrap(),
    );
    assert_eq!(last - first + 1, sent, "{chat:#}");

    let input = &report["timeline"]["input"];
    assert_eq!(input["conflicting_seqs"], 0, "{input:#}");
    assert_eq!(input["unstamped"], 0, "{input:#}");
    assert!(input["received"].as_u64().unwrap() > 0, "{input:#}");

    // Latency: every received message has its three figures; the halves add up.
    for lane in ["chat", "input"] {
        let l = &report["latency"][lane];
        let n = l["one_way_ms"]["count"].as_u64().unwrap();
        assert!(n > 0, "{lane}: {l:#}");
        assert_eq!(l["send_to_ts_ms"]["count"], n, "{lane}: {l:#}");
        assert_eq!(l["ts_to_receive_ms"]["count"], n, "{lane}: {l:#}");
        let half = |k: &str| l[k]["mean"].as_f64().unwrap();
        let sum = half("send_to_ts_ms") + half("ts_to_receive_ms");
        assert!(
            (sum - half("one_way_ms")).abs() < 0.01,
            "{lane}: the halves do not add up: {l:#}"
        );
    }
    // Clock sync: each peer's min-RTT estimate is within half its round trip of the truth (0,
    // one machine), plus slack for the two readings of the system clock.
    let sync = &report["clock_sync"];
    assert_eq!(sync["peers"], 4, "{sync:#}");
    let worst = sync["abs_offset_us"]["max"].as_f64().unwrap();
    let rtt = sync["best_rtt_us"]["max"].as_f64().unwrap();
    assert!(
        worst <= rtt / 2.0 + 1000.0,
        "offset {worst} µs, rtt {rtt} µs"
    );
    // The server counted what it relayed (at least what the peers received).
    let relayed = report["server"]["data_messages_relayed"].as_u64();
    let received = report["received"]["total"].as_u64().unwrap();
    assert!(
        relayed.is_some_and(|r| r >= received && received > 0),
        "relayed {relayed:?}, received {received}"
    );
    assert!(
        report["server"]["us_per_relayed_message"]
            .as_f64()
            .is_some()
    );
    server.shutdown().await;
}

/// What the load tester relies on: a server `leave` is a removal; leaving on purpose is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_records_removal_but_not_its_own_leave() {
    let server = TestServer::start().await;
    let alice = publisher(&server, "removal", "alice").await;
    let bob = subscriber(&server, "removal", "bob").await;
    bob.leave().await.unwrap();
    assert_eq!(bob.removed(), None, "our own leave is no removal");
    assert_eq!(alice.removed(), None);

    server.shutdown().await;
    let r = alice.wait_removed(T).await.unwrap();
    assert!(
        r.reason.contains("server sent leave"),
        "first sign of the removal: {r:?}"
    );
    assert_eq!(alice.removed(), Some(r));
}

/// Delivery sees a stream that stops, which gap-based loss cannot: a subscriber that stops
/// receiving a track mid-window (it unsubscribes; no packet goes missing among those it got)
/// reads well below 95 %, the other subscriber ~100 %.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_counts_a_stream_that_stops() {
    let server = TestServer::start().await;
    let alice = publisher(&server, "stops", "alice").await;
    let bob = subscriber(&server, "stops", "bob").await;
    let carol = subscriber(&server, "stops", "carol").await;
    let audio = announced_track(&carol, &alice, TrackKind::Audio).await.id;
    for p in [&bob, &carol] {
        p.wait_for_tracks(2, T).await.unwrap();
    }
    let peers: Vec<Arc<_>> = [alice, bob, carol].into_iter().map(Arc::new).collect();
    let (bob, carol) = (&peers[1], &peers[2]);
    let mut window = Window::start(&peers, |_| true);

    // 25 packets (0.5 s of audio) into the window carol stops receiving audio, then 75 more
    // are written.
    let at_start = bob.remote_track(&audio).unwrap().packets;
    bob.wait_for_packets(&audio, at_start + 25, T)
        .await
        .unwrap();
    carol.subscribe(vec![audio.clone()], false).await.unwrap();
    bob.wait_for_packets(&audio, at_start + 100, T)
        .await
        .unwrap();
    window.end();
    window.drain(Duration::from_millis(500)).await;
    let flows = window.finish();

    let flow = |who: &str| {
        flows
            .iter()
            .find(|f| f.subscriber == who && f.track_id == audio)
            .unwrap_or_else(|| panic!("no flow {who} ← audio in {flows:#?}"))
    };
    let (b, c) = (flow("bob"), flow("carol"));
    assert!(b.expected >= 100, "{b:?}");
    assert!(b.delivery_percent.unwrap() >= 95.0, "{b:?}");
    let carol_delivery = c.delivery_percent.unwrap();
    assert!(
        carol_delivery < 80.0,
        "a stream that stopped after a quarter of the window reads {carol_delivery}%: {c:?}"
    );
    // What the load tester reported before: gap-based loss sees nothing.
    let carol_audio = carol.remote_track(&audio).unwrap();
    assert_eq!(carol_audio.lost(), 0, "no gap among the packets carol got");
    let total = delivery::totals(flows.iter().filter(|f| f.subscriber == "carol"));
    assert!(total.delivery_percent.unwrap() < 95.0, "{total:?}");
    server.shutdown().await;
}
