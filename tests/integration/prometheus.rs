//! `GET /metrics` in the Prometheus text format, against a real server carrying real media and
//! data: parsed with a Prometheus text parser (`prometheus-parse`), names and types checked
//! against the conventions, counters compared with the JSON of `GET /stats` taken between two
//! scrapes, histograms checked for cumulative buckets, per-room labels capped by
//! `--metrics-room-labels`. Also: the monitoring files under `docker/` parse, and every metric
//! the Grafana dashboard queries exists in a live scrape.

// A test, not the packet path: times deadlines with the clock.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use plaza_testkit::{self as common, support};

use common::Peer;
use plaza::signal::TrackKind;
use prometheus_parse::{Sample, Scrape, Value};
use serde_json::Value as Json;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use support::{T, TestServer, announced_track, assert_media_flows, publisher, subscriber};

/// `GET /metrics`: the parsed scrape, and the raw text.
async fn scrape(server: &TestServer) -> (Scrape, String) {
    let reply = support::http(server.http_addr, "GET", "/metrics", &[], b"")
        .await
        .expect("GET /metrics");
    assert_eq!(reply.status, 200, "{}", reply.body);
    let ct = reply.header("content-type").unwrap_or_default();
    assert!(
        ct.starts_with("text/plain; version=0.0.4"),
        "Prometheus text format content type, got {ct:?}"
    );
    let lines = reply.body.lines().map(|l| Ok(l.to_owned()));
    let parsed = Scrape::parse(lines).expect("the Prometheus text parser reads /metrics");
    (parsed, reply.body)
}

fn samples<'a>(s: &'a Scrape, name: &str) -> Vec<&'a Sample> {
    s.samples.iter().filter(|x| x.metric == name).collect()
}

/// The value of the one unlabelled counter `name`.
fn counter(s: &Scrape, name: &str) -> f64 {
    match samples(s, name).as_slice() {
        [one] => match one.value {
            Value::Counter(v) => v,
            ref other => panic!("{name} is not a counter: {other:?}"),
        },
        other => panic!("{name}: expected one sample, got {other:?}"),
    }
}

fn gauge(s: &Scrape, name: &str) -> f64 {
    match samples(s, name).as_slice() {
        [one] => match one.value {
            Value::Gauge(v) => v,
            ref other => panic!("{name} is not a gauge: {other:?}"),
        },
        other => panic!("{name}: expected one sample, got {other:?}"),
    }
}

/// An unlabelled histogram: its `(le, cumulative count)` buckets, `_count` and `_sum`.
fn histogram(s: &Scrape, name: &str) -> (Vec<(f64, f64)>, f64, f64) {
    let buckets = match samples(s, name).as_slice() {
        [one] => match &one.value {
            Value::Histogram(b) => b.iter().map(|h| (h.less_than, h.count)).collect::<Vec<_>>(),
            other => panic!("{name} is not a histogram: {other:?}"),
        },
        other => panic!("{name}: expected one histogram, got {other:?}"),
    };
    let untyped = |n: String| match samples(s, &n).as_slice() {
        [one] => match one.value {
            Value::Untyped(v) => v,
            ref other => panic!("{n}: {other:?}"),
        },
        other => panic!("{n}: expected one sample, got {other:?}"),
    };
    (
        buckets,
        untyped(format!("{name}_count")),
        untyped(format!("{name}_sum")),
    )
}

/// Buckets cumulative (non-decreasing in `le` order), `+Inf` present and equal to `_count`.
fn assert_histogram_consistent(name: &str, buckets: &[(f64, f64)], count: f64) {
    let mut sorted = buckets.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert!(sorted.len() >= 15, "{name}: {} buckets", sorted.len());
    for w in sorted.windows(2) {
        assert!(
            w[0].1 <= w[1].1,
            "{name}: buckets not cumulative: {sorted:?}"
        );
    }
    let (le, inf) = *sorted.last().expect("buckets");
    assert!(
        le.is_infinite(),
        "{name}: the last bucket is +Inf: {sorted:?}"
    );
    assert_eq!(inf, count, "{name}: +Inf == _count");
    let first = sorted[0].0;
    assert!(
        (20e-6..=60e-6).contains(&first),
        "{name}: first bound {first}"
    );
    let last_finite = sorted[sorted.len() - 2].0;
    assert!(
        (5.0..=20.0).contains(&last_finite),
        "{name}: last finite bound {last_finite}"
    );
}

/// Every family has HELP text; `_total` ⇔ counter; gauges and histograms carry no `_total`.
fn assert_conventions(s: &Scrape, text: &str) {
    let mut types: HashMap<&str, &str> = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').expect("TYPE name type");
            assert!(types.insert(name, ty).is_none(), "{name} declared twice");
            assert!(
                name.starts_with("plaza_") || name.starts_with("process_"),
                "{name}: plaza_ or the standard process_ prefix"
            );
            assert!(
                s.docs.contains_key(name),
                "{name} has HELP text: {:?}",
                s.docs.keys()
            );
            assert_eq!(
                name.ends_with("_total"),
                ty == "counter",
                "{name} is a {ty}: counters and only counters end in _total"
            );
            assert!(
                !name.contains("_us") && !name.contains("_ms") && !name.contains("_kb"),
                "{name}: base units"
            );
            if ty == "histogram" {
                assert!(name.ends_with("_seconds"), "{name}: a latency in seconds");
            }
        }
    }
    for sample in &s.samples {
        match sample.value {
            Value::Counter(_) => assert!(sample.metric.ends_with("_total"), "{}", sample.metric),
            Value::Gauge(_) => assert!(!sample.metric.ends_with("_total"), "{}", sample.metric),
            _ => {}
        }
    }
    for (name, ty) in [
        ("plaza_rtp_packets_forwarded_total", "counter"),
        ("plaza_data_messages_relayed_total", "counter"),
        ("plaza_udp_datagrams_in_total", "counter"),
        ("plaza_udp_datagrams_out_total", "counter"),
        ("plaza_forward_dropped_packets_total", "counter"),
        ("plaza_udp_demux_dropped_total", "counter"),
        ("plaza_limits_hit_total", "counter"),
        ("plaza_ice_tcp_connections_closed_total", "counter"),
        ("plaza_http_connections_refused_total", "counter"),
        ("plaza_http_token_refusals_total", "counter"),
        ("plaza_shard_rtp_packets_forwarded_total", "counter"),
        ("plaza_rooms", "gauge"),
        ("plaza_participants", "gauge"),
        ("plaza_published_tracks", "gauge"),
        ("plaza_http_connections_open", "gauge"),
        ("plaza_websockets_open", "gauge"),
        ("plaza_ice_tcp_connections_open", "gauge"),
        ("plaza_shard_participants", "gauge"),
        ("plaza_core_up", "gauge"),
        ("plaza_forward_latency_seconds", "histogram"),
        ("plaza_data_relay_latency_seconds", "histogram"),
        ("plaza_join_duration_seconds", "histogram"),
        ("process_cpu_seconds_total", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
        ("process_start_time_seconds", "gauge"),
    ] {
        assert_eq!(types.get(name), Some(&ty), "{name} is a {ty}");
    }
}

/// The labels `key` of the samples of `name`, with their values.
fn by_label(s: &Scrape, name: &str, key: &str) -> HashMap<String, f64> {
    samples(s, name)
        .into_iter()
        .map(|x| {
            let v = match x.value {
                Value::Counter(v) | Value::Gauge(v) => v,
                ref other => panic!("{name}: {other:?}"),
            };
            let label = x
                .labels
                .get(key)
                .unwrap_or_else(|| panic!("{name}: no {key}"));
            (label.to_owned(), v)
        })
        .collect()
}

fn json_u64(v: &Json, pointer: &str) -> f64 {
    v.pointer(pointer)
        .and_then(Json::as_u64)
        .unwrap_or_else(|| panic!("/stats has no {pointer}: {v}")) as f64
}

/// Two scrapes with `/stats` between them: every counter in `/stats` lies between the two.
async fn assert_between(server: &TestServer, pairs: &[(&str, &str)]) -> (Scrape, String) {
    let (before, _) = scrape(server).await;
    let (status, stats) = support::stats(server.http_addr).await.expect("GET /stats");
    assert_eq!(status, 200, "{stats}");
    let (after, text) = scrape(server).await;
    for (metric, pointer) in pairs {
        let (a, s, b) = (
            counter(&before, metric),
            json_u64(&stats, pointer),
            counter(&after, metric),
        );
        assert!(a > 0.0, "{metric} > 0");
        assert!(
            a <= s && s <= b,
            "{metric}: scrape {a} ≤ /stats {pointer} {s} ≤ scrape {b}"
        );
    }
    (after, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_real_media_and_data() {
    let server = TestServer::start_with(plaza::config::Config {
        workers: 2,
        metrics_room_labels: 2,
        ..support::test_config()
    })
    .await;
    // Three rooms (2, 2 and 1 participants): five WebSocket joins.
    let alice = publisher(&server, "prom-big", "alice").await;
    let bob = subscriber(&server, "prom-big", "bob").await;
    let carol = subscriber(&server, "prom-mid", "carol").await;
    let dave = subscriber(&server, "prom-mid", "dave").await;
    let erin = subscriber(&server, "prom-small", "erin").await;
    let joins = 5.0;

    let video = announced_track(&bob, &alice, TrackKind::Video).await;
    let audio = announced_track(&bob, &alice, TrackKind::Audio).await;
    assert_media_flows(
        "bob receives alice",
        &[(&bob, video.id.as_str()), (&bob, audio.id.as_str())],
        30,
    )
    .await;
    for i in 0..5 {
        carol.send_chat(&format!("hello {i}"), None).await.unwrap();
    }
    dave.wait_for_message(|m| m.text() == Some("hello 4"), T)
        .await
        .expect("dave gets carol's chat");

    let (s, text) = assert_between(
        &server,
        &[
            (
                "plaza_rtp_packets_forwarded_total",
                "/rtp_packets_forwarded",
            ),
            ("plaza_rtp_packets_in_total", "/rtp_packets_in"),
            (
                "plaza_data_messages_relayed_total",
                "/data_messages_relayed",
            ),
            ("plaza_udp_datagrams_in_total", "/udp_datagrams_in"),
            ("plaza_udp_datagrams_out_total", "/udp_datagrams_out"),
            (
                "plaza_http_connections_accepted_total",
                "/http/connections_accepted",
            ),
        ],
    )
    .await;
    assert_conventions(&s, &text);
    assert_eq!(gauge(&s, "plaza_core_up"), 1.0);
    assert_eq!(gauge(&s, "plaza_participants"), 5.0);
    assert_eq!(gauge(&s, "plaza_rooms"), 3.0);
    assert!(gauge(&s, "plaza_published_tracks") >= 2.0);
    assert!(gauge(&s, "plaza_websockets_open") >= 5.0);
    assert!(counter(&s, "process_cpu_seconds_total") > 0.0);
    assert!(gauge(&s, "process_resident_memory_bytes") > 1e6);

    // Drop reasons are one family with a `reason` label.
    let reasons: BTreeSet<String> = by_label(&s, "plaza_forward_dropped_packets_total", "reason")
        .into_keys()
        .collect();
    assert!(
        reasons.contains("other_layer") && reasons.contains("muted") && reasons.len() == 9,
        "{reasons:?}"
    );
    assert!(!text.contains("plaza_forward_dropped_other_layer"));

    // Per shard: both shards, summing to the total of the same scrape.
    let shards = by_label(&s, "plaza_shard_rtp_packets_forwarded_total", "shard");
    assert_eq!(
        shards.keys().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from(["0".to_owned(), "1".to_owned()])
    );
    assert_eq!(
        shards.values().sum::<f64>(),
        counter(&s, "plaza_rtp_packets_forwarded_total")
    );
    let shard_participants = by_label(&s, "plaza_shard_participants", "shard");
    assert_eq!(shard_participants.values().sum::<f64>(), 5.0);

    // Histograms: cumulative, +Inf == _count; forwarded packets were timed, messages too.
    let (fwd, fwd_count, fwd_sum) = histogram(&s, "plaza_forward_latency_seconds");
    assert_histogram_consistent("forward latency", &fwd, fwd_count);
    assert!(fwd_count > 0.0 && fwd_sum > 0.0);
    assert!(fwd_sum / fwd_count < 1.0, "mean forward latency under 1 s");
    let (relay, relay_count, _) = histogram(&s, "plaza_data_relay_latency_seconds");
    assert_histogram_consistent("data relay latency", &relay, relay_count);
    assert!(relay_count > 0.0);
    let (join, join_count, join_sum) = histogram(&s, "plaza_join_duration_seconds");
    assert_histogram_consistent("join time", &join, join_count);
    assert_eq!(join_count, joins, "one join time per WebSocket join");
    assert!(join_sum > 0.0 && join_sum / joins < T.as_secs_f64());

    // Per-room gauges: the two largest rooms only.
    let rooms = by_label(&s, "plaza_room_participants", "room");
    assert_eq!(
        rooms,
        HashMap::from([("prom-big".to_owned(), 2.0), ("prom-mid".to_owned(), 2.0)]),
        "{text}"
    );
    let tracks = by_label(&s, "plaza_room_tracks", "room");
    assert_eq!(tracks.len(), 2);
    assert!(
        tracks["prom-big"] >= 2.0 && tracks["prom-mid"] == 0.0,
        "{tracks:?}"
    );

    // A sixth join is counted.
    let frank = subscriber(&server, "prom-small", "frank").await;
    let (s2, _) = scrape(&server).await;
    let (_, join_count2, _) = histogram(&s2, "plaza_join_duration_seconds");
    assert_eq!(join_count2, joins + 1.0);

    for p in [alice, bob, carol, dave, erin, frank] {
        close(p).await;
    }
    server.shutdown().await;
}

async fn close(p: Peer) {
    p.leave().await.expect("leave");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_labels_are_off_by_default_and_the_dashboard_queries_real_metrics() {
    let server = TestServer::start().await;
    let ann = subscriber(&server, "quiet", "ann").await;
    let (s, text) = scrape(&server).await;
    assert_eq!(gauge(&s, "plaza_participants"), 1.0);
    assert!(samples(&s, "plaza_room_participants").is_empty(), "{text}");
    assert!(samples(&s, "plaza_room_tracks").is_empty(), "{text}");
    assert_dashboard_matches(&text);
    // /healthz is unchanged: JSON, no process figures; /stats has them.
    let (status, health) = server.healthz().await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(health["participants"], 1);
    assert!(health.get("process").is_none(), "{health}");
    let (_, stats) = support::stats(server.http_addr).await.unwrap();
    assert!(
        stats["process"]["rss_bytes"].as_u64().unwrap_or(0) > 0,
        "{stats}"
    );
    assert!(stats["forward_latency"]["buckets"].is_array(), "{stats}");
    close(ann).await;
    server.shutdown().await;
}

/// The Grafana dashboard and provisioning files and the Prometheus configuration parse, and
/// every metric the dashboard queries is one `/metrics` exports (`text`: a live scrape).
fn assert_dashboard_matches(text: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dash_path = root.join("docker/grafana/dashboards/plaza.json");
    let dash: Json = serde_json::from_str(
        &std::fs::read_to_string(&dash_path).unwrap_or_else(|e| panic!("{dash_path:?}: {e}")),
    )
    .expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(e) = target["expr"].as_str() {
                exprs.push(e.to_owned());
            }
        }
    }
    assert!(exprs.len() >= 9, "{exprs:?}");
    let exported: BTreeSet<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let mut used = BTreeSet::new();
    for e in &exprs {
        for word in e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            if word.starts_with("plaza_") || word.starts_with("process_") {
                // A histogram's series: name_bucket, name_sum, name_count.
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| word.strip_suffix(s).filter(|f| exported.contains(f)))
                    .unwrap_or(word);
                assert!(
                    exported.contains(family),
                    "the dashboard queries {word}, which /metrics does not export"
                );
                used.insert(family.to_owned());
            }
        }
    }
    for needed in [
        "plaza_rtp_packets_forwarded_total",
        "plaza_udp_datagrams_in_total",
        "plaza_udp_datagrams_out_total",
        "plaza_forward_dropped_packets_total",
        "plaza_participants",
        "plaza_rooms",
        "plaza_forward_latency_seconds",
        "plaza_join_duration_seconds",
        "plaza_data_relay_latency_seconds",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ] {
        assert!(
            used.contains(needed),
            "the dashboard shows {needed}: {used:?}"
        );
    }
    let quantiles = exprs
        .iter()
        .filter(|e| e.contains("histogram_quantile(0.99"))
        .count();
    assert!(quantiles >= 2, "p99 panels: {exprs:?}");

    // YAML: the compose file, the Prometheus configuration and the Grafana provisioning files
    // (read with PyYAML: no YAML crate in the tree).
    let yaml = [
        "docker/compose.yaml",
        "docker/prometheus.yml",
        "docker/grafana/provisioning/datasources/prometheus.yaml",
        "docker/grafana/provisioning/dashboards/plaza.yaml",
    ];
    let script = r#"
import json, sys, yaml
docs = {p: yaml.safe_load(open(p)) for p in sys.argv[1:]}
print(json.dumps(docs))
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(yaml)
        .current_dir(root)
        .output()
        .expect("python3 runs (install python3 and python3-yaml)");
    assert!(
        out.status.success(),
        "the YAML files parse (python3-yaml needed): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Json = serde_json::from_slice(&out.stdout).expect("JSON from python");
    let compose = &docs["docker/compose.yaml"]["services"];
    for svc in ["plaza", "prometheus", "grafana"] {
        assert!(compose[svc].is_object(), "compose service {svc}: {compose}");
    }
    let prom = &docs["docker/prometheus.yml"];
    let job = prom["scrape_configs"]
        .as_array()
        .and_then(|jobs| jobs.iter().find(|j| j["job_name"] == "plaza"))
        .unwrap_or_else(|| panic!("a plaza scrape job: {prom}"));
    assert_eq!(job["metrics_path"], "/metrics", "{job}");
    let targets = job["static_configs"][0]["targets"].to_string();
    assert!(targets.contains("plaza:7880"), "{targets}");
    let ds = &docs["docker/grafana/provisioning/datasources/prometheus.yaml"]["datasources"][0];
    assert_eq!(ds["type"], "prometheus", "{ds}");
    assert_eq!(ds["uid"], "prometheus", "{ds}");
    let provider = &docs["docker/grafana/provisioning/dashboards/plaza.yaml"]["providers"][0];
    assert!(provider["options"]["path"].is_string(), "{provider}");
}
