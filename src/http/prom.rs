//! `GET /metrics` in the Prometheus text exposition format (version 0.0.4), encoded by the
//! `prometheus-client` crate.
//!
//! Nothing here is on the packet path: the core keeps counting in plain per-shard counters and
//! histograms ([`CoreStats`]); a scrape asks every shard for them (summed by
//! [`crate::sfu::SfuHandle::stats`]), reads the HTTP counters and `/proc/self`, and encodes a
//! [`Scrape`] through a per-scrape `Registry` holding it as a custom `Collector`.
//!
//! Names follow the Prometheus conventions: `plaza_` prefix, counters end in `_total`, units
//! are suffixes in base units (`_seconds`, `_bytes`). Drop reasons are a `reason` label, the
//! per-participant caps a `limit` label, per-shard figures a `shard` label; the process metrics
//! have the standard names (`process_cpu_seconds_total`, `process_resident_memory_bytes`, …).
//!
//! Latency histograms ([`LatencySnapshot`]: log-linear, 8 buckets per power of two) are
//! collapsed to the fixed `le` bounds of [`BOUNDS_US`] by [`collapse`]: a log-linear bucket is
//! counted under the smallest bound that its whole range lies below, so a `le` count never
//! includes a sample above the bound, and may miss samples within 12.5 % below it. Their
//! `_sum` is approximate (every sample counted at its bucket's midpoint), except for the join
//! time, whose sum is exact.

// The join-time histogram is shared by the WebSocket sessions (a mutex, taken once per join
// and once per scrape), off the packet path.
#![allow(clippy::disallowed_types)]

use super::limits::HttpStats;
use super::metrics::ProcessUsage;
use crate::sfu::admin::RoomSummary;
use crate::sfu::latency::{LatencyHistogram, LatencySnapshot};
use crate::sfu::{CoreStats, IceTcpStats, LimitsHit, ShardStats};
use crate::webhook::WebhookStats;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

/// The `Content-Type` of the answer.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The `le` bounds of the exported latency histograms, in microseconds (25 µs … 10 s; `+Inf`
/// is added by the encoder).
pub const BOUNDS_US: [u64; 18] = [
    25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// Width of the log-linear bucket whose inclusive upper bound is `ub` µs (it holds durations
/// of `ub + 1 − width` µs up to, not including, `ub + 1` µs): 1 µs below 8 µs, then an eighth
/// of the power of two holding `ub`.
fn bucket_width_us(ub: u64) -> u64 {
    if ub < 8 { 1 } else { 1 << (ub.ilog2() - 3) }
}

/// A log-linear histogram's buckets (`[inclusive upper bound µs, count]`) as a Prometheus
/// histogram: per-bound counts (not cumulative, as the encoder wants them) for
/// [`BOUNDS_US`] in seconds, the total count (the `+Inf` bucket) and the sum in seconds
/// estimated from the buckets' midpoints.
pub fn collapse(buckets: &[(u64, u64)]) -> (Vec<(f64, u64)>, u64, f64) {
    let mut per_bound = vec![0u64; BOUNDS_US.len()];
    let mut count = 0u64;
    let mut sum_us = 0f64;
    for &(ub, n) in buckets {
        count += n;
        let width = bucket_width_us(ub);
        sum_us += n as f64 * ((ub + 1) as f64 - width as f64 / 2.0);
        // Durations in the bucket are < ub + 1 µs: the bucket lies wholly under `le` when
        // ub + 1 ≤ le. Past the last bound it is only in `+Inf`.
        if let Some(i) = BOUNDS_US.iter().position(|&le| ub.saturating_add(1) <= le) {
            per_bound[i] += n;
        }
    }
    let le = BOUNDS_US.iter().map(|&us| us as f64 / 1e6);
    (le.zip(per_bound).collect(), count, sum_us / 1e6)
}

/// Time from a WebSocket `join` received to its `joined` sent, over the process life.
#[derive(Debug, Default)]
pub struct JoinTimes(Mutex<JoinInner>);

#[derive(Debug, Default)]
struct JoinInner {
    hist: LatencyHistogram,
    sum: Duration,
}

impl JoinTimes {
    /// Count one join that took `d`.
    pub fn record(&self, d: Duration) {
        let mut inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        inner.hist.record(d, 1);
        inner.sum += d;
    }

    /// The histogram and the exact sum of the durations, in seconds.
    pub fn snapshot(&self) -> (LatencySnapshot, f64) {
        let inner = self.0.lock().unwrap_or_else(|e| e.into_inner());
        (inner.hist.snapshot(), inner.sum.as_secs_f64())
    }
}

/// Everything one scrape exports, read before encoding.
#[derive(Debug, Default)]
pub struct Scrape {
    /// The core's counters; `None` when it did not answer in time (`plaza_core_up 0`).
    pub core: Option<CoreStats>,
    pub http: Option<HttpStats>,
    pub process: ProcessUsage,
    /// WebSocket join times and their exact sum in seconds.
    pub join_time: (LatencySnapshot, f64),
    /// The rooms given their own `room` label (at most `--metrics-room-labels`).
    pub rooms: Vec<RoomSummary>,
    /// Webhook delivery, when webhooks are on.
    pub webhooks: Option<WebhookStats>,
    /// The cluster registry, with `--redis`.
    pub cluster: Option<crate::cluster::ClusterStats>,
}

/// The at most `n` largest rooms (most participants, then most tracks, then by name so the
/// choice is stable).
pub fn largest_rooms(mut rooms: Vec<RoomSummary>, n: usize) -> Vec<RoomSummary> {
    rooms.sort_by(|a, b| {
        (b.participants, b.tracks)
            .cmp(&(a.participants, a.tracks))
            .then_with(|| a.name.cmp(&b.name))
    });
    rooms.truncate(n);
    rooms
}

/// The scrape in the Prometheus text format.
pub fn render(scrape: Scrape) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(scrape));
    let mut out = String::with_capacity(32 * 1024);
    // Writing to a `String` cannot fail; the collector itself returns no other error.
    if prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).is_err() {
        out.clear();
    }
    out
}

/// Writes metric families to an encoder, one call per family.
struct Out<'a, 'b>(&'a mut DescriptorEncoder<'b>);

impl Out<'_, '_> {
    fn counter(&mut self, name: &str, help: &str, v: u64) -> fmt::Result {
        self.0
            .encode_descriptor(name, help, None, MetricType::Counter)?
            .encode_counter::<NoLabelSet, _, u64>(&v, None)
    }

    fn counter_f(&mut self, name: &str, help: &str, unit: Unit, v: f64) -> fmt::Result {
        self.0
            .encode_descriptor(name, help, Some(&unit), MetricType::Counter)?
            .encode_counter::<NoLabelSet, _, f64>(&v, None)
    }

    fn gauge(&mut self, name: &str, help: &str, v: impl GaugeValue) -> fmt::Result {
        v.encode(
            self.0
                .encode_descriptor(name, help, None, MetricType::Gauge)?,
        )
    }

    fn gauge_bytes(&mut self, name: &str, help: &str, v: u64) -> fmt::Result {
        self.0
            .encode_descriptor(name, help, Some(&Unit::Bytes), MetricType::Gauge)?
            .encode_gauge(&v)
    }

    /// One counter family with a label (`key`) taking each value of `values`.
    fn counters<'v>(
        &mut self,
        name: &str,
        help: &str,
        key: &'static str,
        values: impl IntoIterator<Item = (&'v str, u64)>,
    ) -> fmt::Result {
        let mut family = self
            .0
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (label, v) in values {
            family
                .encode_family(&[(key, label)])?
                .encode_counter::<NoLabelSet, _, u64>(&v, None)?;
        }
        Ok(())
    }

    /// One gauge family with one sample per labelled value.
    fn gauges<L: EncodeLabelSet>(
        &mut self,
        name: &str,
        help: &str,
        values: impl IntoIterator<Item = (L, u64)>,
    ) -> fmt::Result {
        let mut family = self
            .0
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, v) in values {
            family.encode_family(&labels)?.encode_gauge(&v)?;
        }
        Ok(())
    }

    fn histogram(
        &mut self,
        name: &str,
        help: &str,
        snapshot: &LatencySnapshot,
        exact_sum: Option<f64>,
    ) -> fmt::Result {
        let (buckets, count, approx_sum) = collapse(&snapshot.buckets);
        self.0
            .encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?
            .encode_histogram::<NoLabelSet>(exact_sum.unwrap_or(approx_sum), count, &buckets, None)
    }
}

/// The gauge value types used here.
trait GaugeValue {
    fn encode(self, e: prometheus_client::encoding::MetricEncoder<'_>) -> fmt::Result;
}

impl GaugeValue for u64 {
    fn encode(self, mut e: prometheus_client::encoding::MetricEncoder<'_>) -> fmt::Result {
        e.encode_gauge(&self)
    }
}

impl GaugeValue for usize {
    fn encode(self, e: prometheus_client::encoding::MetricEncoder<'_>) -> fmt::Result {
        (self as u64).encode(e)
    }
}

impl GaugeValue for f64 {
    fn encode(self, mut e: prometheus_client::encoding::MetricEncoder<'_>) -> fmt::Result {
        e.encode_gauge(&self)
    }
}

const APPROX: &str = "le bounds collapsed from a log-linear histogram (a bucket counts under the \
                      first bound it lies wholly below); _sum approximate (bucket midpoints)";

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let mut o = Out(&mut encoder);
        o.gauge(
            "plaza_core_up",
            "1 when every core shard answered this scrape in time, else 0 (no core metrics then)",
            u64::from(self.core.is_some()),
        )?;
        if let Some(core) = &self.core {
            encode_core(&mut o, core)?;
        }
        if let Some(http) = &self.http {
            encode_http(&mut o, http)?;
        }
        if let Some(w) = &self.webhooks {
            encode_webhooks(&mut o, w)?;
        }
        if let Some(c) = &self.cluster {
            encode_cluster(&mut o, c)?;
        }
        let (join, join_sum) = &self.join_time;
        o.histogram(
            "plaza_join_duration",
            "Time from a WebSocket join received to its joined sent (le bounds collapsed from a \
             log-linear histogram; _sum exact)",
            join,
            Some(*join_sum),
        )?;
        o.gauges(
            "plaza_room_participants",
            "Participants in the room (only the largest rooms, --metrics-room-labels)",
            self.rooms
                .iter()
                .map(|r| ([("room", r.name.as_str())], r.participants as u64)),
        )?;
        o.gauges(
            "plaza_room_tracks",
            "Tracks published in the room (only the largest rooms, --metrics-room-labels)",
            self.rooms
                .iter()
                .map(|r| ([("room", r.name.as_str())], r.tracks as u64)),
        )?;
        encode_process(&mut o, &self.process)
    }
}

fn encode_core(o: &mut Out<'_, '_>, s: &CoreStats) -> fmt::Result {
    // Destructured so that a new counter cannot be left out of /metrics.
    let CoreStats {
        rooms,
        participants,
        published_tracks,
        rtp_packets_in,
        rtp_packets_forwarded,
        rtp_packets_dropped,
        forward_dropped,
        udp_datagrams_in,
        udp_datagrams_ignored,
        ice_tcp_frames_ignored,
        udp_dropped,
        limits_hit,
        log_lines_suppressed,
        udp_datagrams_out,
        udp_datagrams_out_dropped,
        udp_send_calls,
        udp_datagrams_segmented,
        data_messages_relayed,
        data_messages_sequenced,
        data_duplicates_dropped,
        data_queued_dropped,
        pipe_msgs_out,
        pipe_msgs_in,
        pipe_msgs_dropped,
        rtp_packets_piped,
        keyframe_requests,
        nack_requested,
        nack_resent,
        nack_refused,
        nack_over_budget,
        nack_unrepairable,
        nack_resent_rtx,
        nack_resent_media,
        publisher_rtx_repaired,
        publisher_rtx_duplicate,
        publisher_rtx_padding,
        subscriber_rtcp_in,
        subscriber_rtcp_rejected,
        subscriber_rtcp_malformed,
        publisher_rtp_fast,
        publisher_rtp_to_rtc,
        publisher_rtp_rejected,
        publisher_rtcp_in,
        publisher_rtcp_rejected,
        nack_sent_to_publishers,
        twcc_feedback_sent,
        receiver_reports_sent,
        ice_restarts,
        probe_clusters,
        probe_clusters_succeeded,
        probe_clusters_failed,
        probe_padding_packets,
        probe_padding_bytes,
        forward_latency,
        data_relay_latency,
        ice_tcp,
        shards,
    } = s;
    o.gauge(
        "plaza_rooms",
        "Rooms open (summed over shards: a room spread over k shards counts k times)",
        *rooms,
    )?;
    o.gauge("plaza_participants", "Participants joined", *participants)?;
    o.gauge(
        "plaza_published_tracks",
        "Tracks published",
        *published_tracks,
    )?;
    let counters: [(&str, &str, u64); 49] = [
        (
            "plaza_rtp_packets_in",
            "RTP packets received from publishers",
            *rtp_packets_in,
        ),
        (
            "plaza_rtp_packets_forwarded",
            "RTP packets forwarded to subscribers",
            *rtp_packets_forwarded,
        ),
        (
            "plaza_rtp_packets_dropped",
            "RTP packets from publishers dropped (unusable)",
            *rtp_packets_dropped,
        ),
        (
            "plaza_udp_datagrams_in",
            "UDP datagrams read from the media sockets",
            *udp_datagrams_in,
        ),
        (
            "plaza_udp_datagrams_ignored",
            "UDP datagrams read and not given to any connection",
            *udp_datagrams_ignored,
        ),
        (
            "plaza_ice_tcp_frames_ignored",
            "ICE-TCP frames read and not given to any connection",
            *ice_tcp_frames_ignored,
        ),
        (
            "plaza_udp_datagrams_out",
            "UDP datagrams sent",
            *udp_datagrams_out,
        ),
        (
            "plaza_udp_datagrams_out_dropped",
            "UDP datagrams not sent (socket buffer full or send failed)",
            *udp_datagrams_out_dropped,
        ),
        (
            "plaza_udp_send_calls",
            "Send system calls made (each sends a batch of datagrams)",
            *udp_send_calls,
        ),
        (
            "plaza_udp_datagrams_segmented",
            "UDP datagrams sent as segments of a larger message (segmentation offload)",
            *udp_datagrams_segmented,
        ),
        (
            "plaza_log_lines_suppressed",
            "Log lines dropped by the per-call-site rate limit",
            *log_lines_suppressed,
        ),
        (
            "plaza_data_messages_relayed",
            "Data-channel messages relayed to participants",
            *data_messages_relayed,
        ),
        (
            "plaza_data_messages_sequenced",
            "Data-channel messages stamped on a room timeline",
            *data_messages_sequenced,
        ),
        (
            "plaza_data_duplicates_dropped",
            "Data-channel message retries dropped as duplicates",
            *data_duplicates_dropped,
        ),
        (
            "plaza_data_queued_dropped",
            "Data-channel messages dropped: too many waiting for a channel to open",
            *data_queued_dropped,
        ),
        (
            "plaza_pipe_messages_out",
            "Messages handed to other shards hosting the same rooms",
            *pipe_msgs_out,
        ),
        (
            "plaza_pipe_messages_in",
            "Messages received from other shards",
            *pipe_msgs_in,
        ),
        (
            "plaza_pipe_messages_dropped",
            "Messages to other shards dropped (their queue was full)",
            *pipe_msgs_dropped,
        ),
        (
            "plaza_rtp_packets_piped",
            "RTP packets handed to other shards",
            *rtp_packets_piped,
        ),
        (
            "plaza_keyframe_requests",
            "Keyframe requests (PLI) sent to publishers",
            *keyframe_requests,
        ),
        (
            "plaza_nack_requested",
            "Sequence numbers subscribers asked for in NACKs",
            *nack_requested,
        ),
        (
            "plaza_nack_resent",
            "Packets retransmitted to subscribers",
            *nack_resent,
        ),
        (
            "plaza_nack_refused",
            "NACKed packets not retransmitted (not kept, too old, too often)",
            *nack_refused,
        ),
        (
            "plaza_nack_over_budget",
            "NACKed packets not retransmitted for lack of budget",
            *nack_over_budget,
        ),
        (
            "plaza_nack_unrepairable",
            "Subscriber losses given up on (not repairable): a keyframe requested for each",
            *nack_unrepairable,
        ),
        (
            "plaza_nack_resent_rtx",
            "Packets retransmitted to subscribers on an RTX stream (RFC 4588)",
            *nack_resent_rtx,
        ),
        (
            "plaza_nack_resent_media",
            "Packets retransmitted to subscribers on the media SSRC (no RTX negotiated)",
            *nack_resent_media,
        ),
        (
            "plaza_publisher_rtx_repaired",
            "RTX repairs from publishers forwarded as the original packet",
            *publisher_rtx_repaired,
        ),
        (
            "plaza_publisher_rtx_duplicate",
            "RTX repairs from publishers dropped: the original had arrived",
            *publisher_rtx_duplicate,
        ),
        (
            "plaza_publisher_rtx_padding",
            "Padding-only RTX packets (probes) from publishers dropped",
            *publisher_rtx_padding,
        ),
        (
            "plaza_subscriber_rtcp_in",
            "RTCP datagrams from subscribers taken by the fast path",
            *subscriber_rtcp_in,
        ),
        (
            "plaza_subscriber_rtcp_rejected",
            "RTCP datagrams from subscribers rejected (authentication, replay)",
            *subscriber_rtcp_rejected,
        ),
        (
            "plaza_subscriber_rtcp_malformed",
            "Malformed RTCP packets in authenticated subscriber datagrams",
            *subscriber_rtcp_malformed,
        ),
        (
            "plaza_publisher_rtp_fast",
            "Publisher RTP packets forwarded by the fast path",
            *publisher_rtp_fast,
        ),
        (
            "plaza_publisher_rtp_to_rtc",
            "Publisher RTP packets handed to the WebRTC stack (SSRC not yet bound)",
            *publisher_rtp_to_rtc,
        ),
        (
            "plaza_publisher_rtp_rejected",
            "Publisher RTP packets rejected (authentication, replay, unparseable)",
            *publisher_rtp_rejected,
        ),
        (
            "plaza_publisher_rtcp_in",
            "RTCP datagrams from publishers taken by the fast path",
            *publisher_rtcp_in,
        ),
        (
            "plaza_publisher_rtcp_rejected",
            "RTCP datagrams from publishers rejected",
            *publisher_rtcp_rejected,
        ),
        (
            "plaza_nack_sent_to_publishers",
            "Sequence numbers asked of publishers in NACKs",
            *nack_sent_to_publishers,
        ),
        (
            "plaza_twcc_feedback_sent",
            "TWCC feedback packets sent to publishers",
            *twcc_feedback_sent,
        ),
        (
            "plaza_receiver_reports_sent",
            "Receiver report packets sent to publishers",
            *receiver_reports_sent,
        ),
        (
            "plaza_ice_restarts",
            "ICE restarts done (publisher and subscriber connections)",
            *ice_restarts,
        ),
        (
            "plaza_probe_clusters",
            "Bandwidth probe clusters started on subscriber connections",
            *probe_clusters,
        ),
        (
            "plaza_probe_clusters_succeeded",
            "Bandwidth probe clusters whose padding was delivered at the rate probed for",
            *probe_clusters_succeeded,
        ),
        (
            "plaza_probe_clusters_failed",
            "Bandwidth probe clusters that showed loss, delay growth or too low a rate",
            *probe_clusters_failed,
        ),
        (
            "plaza_probe_padding_packets",
            "Padding-only RTP packets sent to probe subscribers' bandwidth",
            *probe_padding_packets,
        ),
        (
            "plaza_probe_padding_bytes",
            "Padding bytes sent to probe subscribers' bandwidth",
            *probe_padding_bytes,
        ),
        (
            "plaza_ice_tcp_connections_accepted",
            "ICE-TCP connections accepted",
            ice_tcp.accepted,
        ),
        (
            "plaza_ice_tcp_connections_refused",
            "ICE-TCP connections refused (over the per-shard cap)",
            ice_tcp.refused,
        ),
    ];
    for (name, help, v) in counters {
        o.counter(name, help, v)?;
    }
    let f = forward_dropped;
    o.counters(
        "plaza_forward_dropped_packets",
        "Packets of a track not forwarded to one of its subscribers, by reason (muted: once per packet)",
        "reason",
        [
            ("not_negotiated", f.not_negotiated),
            ("not_connected", f.not_connected),
            ("other_layer", f.other_layer),
            ("awaiting_keyframe", f.awaiting_keyframe),
            ("stale", f.stale),
            ("no_transport", f.no_transport),
            ("encrypt", f.encrypt),
            ("malformed_red", f.malformed_red),
            ("muted", f.muted),
        ],
    )?;
    let u = udp_dropped;
    o.counters(
        "plaza_udp_demux_dropped",
        "Datagrams the demux gave to no connection, by reason, and refused address re-bindings",
        "reason",
        [
            ("empty", u.empty),
            ("unknown_ufrag", u.unknown_ufrag),
            ("unknown_transaction", u.unknown_transaction),
            ("response_from_other_address", u.response_from_other_address),
            ("unknown_address", u.unknown_address),
            ("rebind_refused", u.rebind_refused),
        ],
    )?;
    let LimitsHit {
        remote_candidates,
        published_tracks: published_tracks_hit,
        subscriptions,
        ids_per_message,
        commands_deferred,
        signaling_queue_overflows,
    } = limits_hit;
    o.counters(
        "plaza_limits_hit",
        "Per-participant caps hit (the client got an error), turns that deferred client commands, \
         participants removed for a full signaling queue",
        "limit",
        [
            ("remote_candidates", *remote_candidates),
            ("published_tracks", *published_tracks_hit),
            ("subscriptions", *subscriptions),
            ("ids_per_message", *ids_per_message),
            ("commands_deferred", *commands_deferred),
            ("signaling_queue_overflows", *signaling_queue_overflows),
        ],
    )?;
    let IceTcpStats {
        open,
        accepted: _,
        refused: _,
        closed_no_stun,
        closed_oversize,
        closed_idle,
        frames_in,
        frames_out,
        frames_dropped,
    } = ice_tcp;
    o.gauge(
        "plaza_ice_tcp_connections_open",
        "ICE-TCP connections open",
        *open,
    )?;
    o.counters(
        "plaza_ice_tcp_connections_closed",
        "ICE-TCP connections closed by the server, by reason",
        "reason",
        [
            ("no_stun", *closed_no_stun),
            ("oversize", *closed_oversize),
            ("idle", *closed_idle),
        ],
    )?;
    o.counter("plaza_ice_tcp_frames_in", "ICE-TCP frames read", *frames_in)?;
    o.counter(
        "plaza_ice_tcp_frames_out",
        "ICE-TCP frames written",
        *frames_out,
    )?;
    o.counter(
        "plaza_ice_tcp_frames_dropped",
        "ICE-TCP frames dropped (the connection's write queue was full)",
        *frames_dropped,
    )?;
    o.histogram(
        "plaza_forward_latency",
        &format!(
            "Time forwarded RTP packets spent in the server, socket read to send call ({APPROX})"
        ),
        forward_latency,
        None,
    )?;
    o.histogram(
        "plaza_data_relay_latency",
        &format!(
            "Time relayed data-channel messages spent in the server on the delivering shard \
             ({APPROX})"
        ),
        data_relay_latency,
        None,
    )?;
    encode_shards(o, shards)
}

fn encode_shards(o: &mut Out<'_, '_>, shards: &[ShardStats]) -> fmt::Result {
    let ids: Vec<String> = (0..shards.len()).map(|i| i.to_string()).collect();
    let label = |i: usize| [("shard", ids[i].as_str())];
    o.gauges(
        "plaza_shard_rooms",
        "Rooms on the core shard",
        shards
            .iter()
            .enumerate()
            .map(|(i, s)| (label(i), s.rooms as u64)),
    )?;
    o.gauges(
        "plaza_shard_participants",
        "Participants on the core shard",
        shards
            .iter()
            .enumerate()
            .map(|(i, s)| (label(i), s.participants as u64)),
    )?;
    let mut fam = o.0.encode_descriptor(
        "plaza_shard_rtp_packets_forwarded",
        "RTP packets forwarded by the core shard",
        None,
        MetricType::Counter,
    )?;
    for (i, s) in shards.iter().enumerate() {
        fam.encode_family(&label(i))?
            .encode_counter::<NoLabelSet, _, u64>(&s.rtp_packets_forwarded, None)?;
    }
    let mut fam = o.0.encode_descriptor(
        "plaza_shard_udp_datagrams_out",
        "UDP datagrams sent by the core shard",
        None,
        MetricType::Counter,
    )?;
    for (i, s) in shards.iter().enumerate() {
        fam.encode_family(&label(i))?
            .encode_counter::<NoLabelSet, _, u64>(&s.udp_datagrams_out, None)?;
    }
    Ok(())
}

fn encode_webhooks(o: &mut Out<'_, '_>, w: &WebhookStats) -> fmt::Result {
    let WebhookStats {
        webhook_events_queued,
        webhook_events_delivered,
        webhook_events_retried,
        webhook_events_dropped,
        webhook_events_pending,
    } = w;
    o.counter(
        "plaza_webhook_events_queued",
        "Webhook events accepted for delivery (once per URL)",
        *webhook_events_queued,
    )?;
    o.counter(
        "plaza_webhook_events_delivered",
        "Webhook events a URL answered with 2xx",
        *webhook_events_delivered,
    )?;
    o.counter(
        "plaza_webhook_events_retried",
        "Failed webhook requests that were tried again",
        *webhook_events_retried,
    )?;
    o.counter(
        "plaza_webhook_events_dropped",
        "Webhook events lost: a queue was full, or a URL failed for longer than the retry period",
        *webhook_events_dropped,
    )?;
    o.gauge(
        "plaza_webhook_events_pending",
        "Webhook events waiting now (queued or in flight, all URLs)",
        *webhook_events_pending,
    )
}

fn encode_cluster(o: &mut Out<'_, '_>, c: &crate::cluster::ClusterStats) -> fmt::Result {
    // Destructured so that a new counter cannot be left out of /metrics.
    let crate::cluster::ClusterStats {
        enabled: _,
        node_id: _,
        registered,
        heartbeats,
        heartbeat_failures,
        outages,
        placed_here,
        redirected,
        placement_fallbacks,
        rooms_taken_over,
        lease_conflicts,
        leases,
        link_peers_up,
        link_peer_downs,
        extended_joins,
        link_refused,
        link_media_dropped,
        room_events_published,
        room_events_dropped,
    } = c;
    o.gauge(
        "plaza_cluster_registered",
        "1 when this node's last heartbeat reached Redis (it is listed in the cluster), else 0",
        u64::from(*registered),
    )?;
    o.counter(
        "plaza_cluster_heartbeats",
        "Heartbeats that reached Redis",
        *heartbeats,
    )?;
    o.counter(
        "plaza_cluster_heartbeat_failures",
        "Heartbeats that failed (Redis unreachable or too slow)",
        *heartbeat_failures,
    )?;
    o.counter(
        "plaza_cluster_redis_outages",
        "Times Redis became unreachable for this node",
        *outages,
    )?;
    o.counter(
        "plaza_cluster_joins_placed_here",
        "Joins (WebSocket, WHIP, WHEP) for rooms placed on this node",
        *placed_here,
    )?;
    o.counter(
        "plaza_cluster_joins_redirected",
        "Joins sent to the node that hosts their room",
        *redirected,
    )?;
    o.counter(
        "plaza_cluster_placement_fallbacks",
        "Joins served here because Redis did not answer the placement",
        *placement_fallbacks,
    )?;
    o.counter(
        "plaza_cluster_rooms_taken_over",
        "Rooms placed again because the node holding their lease was gone",
        *rooms_taken_over,
    )?;
    o.counter(
        "plaza_cluster_lease_conflicts",
        "Heartbeats that found a room hosted here leased to another node",
        *lease_conflicts,
    )?;
    o.gauge(
        "plaza_cluster_room_leases",
        "Rooms whose lease this node renewed on its last heartbeat",
        *leases,
    )?;
    o.gauge(
        "plaza_cluster_link_peers_up",
        "Other nodes heard from over the node link within the last 3 s",
        *link_peers_up,
    )?;
    o.counter(
        "plaza_cluster_link_peer_downs",
        "Times a node link peer that was up went silent for 3 s or left the cluster",
        *link_peer_downs,
    )?;
    o.counter(
        "plaza_cluster_joins_extended",
        "Joins served here in a room whose node is another one (the room extended here)",
        *extended_joins,
    )?;
    o.counter(
        "plaza_cluster_link_refused_messages",
        "Pipe messages to other nodes the node link refused (queue full, unknown node)",
        *link_refused,
    )?;
    o.counter(
        "plaza_cluster_link_media_dropped_messages",
        "Media from other nodes dropped because a shard's queue was full",
        *link_media_dropped,
    )?;
    o.counter(
        "plaza_cluster_room_events_published",
        "Room events (joins, leaves, tracks) published in Redis",
        *room_events_published,
    )?;
    o.counter(
        "plaza_cluster_room_events_dropped",
        "Room events not published in Redis (Redis failed)",
        *room_events_dropped,
    )
}

fn encode_http(o: &mut Out<'_, '_>, h: &HttpStats) -> fmt::Result {
    let HttpStats {
        connections_open,
        connections_accepted,
        websockets_open,
        refused_per_ip,
        refused_total,
        reserve_connections,
        websocket_refused,
        header_timeouts,
        join_timeouts,
        idle_timeouts,
        message_timeouts,
        rate_limited_messages,
        token_refusals,
        sessions_resumed,
        resumes_refused,
        resume_expired,
        joins_refused_rooms,
        joins_refused_room_full,
        joins_rate_limited,
        rate_limit_closes,
        oversize_closes,
        accept_errors,
        max_connections,
        max_connections_per_ip,
        max_joins_per_ip,
        join_burst_per_ip,
    } = h;
    o.gauge(
        "plaza_http_connections_open",
        "HTTP/WebSocket connections open",
        *connections_open,
    )?;
    o.gauge(
        "plaza_websockets_open",
        "WebSocket sessions open",
        *websockets_open,
    )?;
    o.counters(
        "plaza_http_connections_refused",
        "Connections refused: per_ip (max_connections_per_ip), total (max_connections and the reserve)",
        "reason",
        [("per_ip", *refused_per_ip), ("total", *refused_total)],
    )?;
    let counters: [(&str, &str, u64); 18] = [
        (
            "plaza_http_connections_accepted",
            "HTTP connections accepted",
            *connections_accepted,
        ),
        (
            "plaza_http_reserve_connections",
            "Connections served from the monitoring reserve",
            *reserve_connections,
        ),
        (
            "plaza_http_websocket_refused",
            "WebSocket upgrades refused (connection from the reserve)",
            *websocket_refused,
        ),
        (
            "plaza_http_header_timeouts",
            "Connections closed: request headers not in time",
            *header_timeouts,
        ),
        (
            "plaza_http_join_timeouts",
            "WebSockets closed for not joining in time",
            *join_timeouts,
        ),
        (
            "plaza_http_idle_timeouts",
            "Joined WebSockets closed for sending nothing in time",
            *idle_timeouts,
        ),
        (
            "plaza_http_message_timeouts",
            "WebSockets closed: a message did not complete in time",
            *message_timeouts,
        ),
        (
            "plaza_http_rate_limited_messages",
            "Signaling messages answered with rate_limited",
            *rate_limited_messages,
        ),
        (
            "plaza_http_token_refusals",
            "Joins refused for their access token",
            *token_refusals,
        ),
        (
            "plaza_http_sessions_resumed",
            "Sessions resumed on a new connection",
            *sessions_resumed,
        ),
        (
            "plaza_http_resumes_refused",
            "Resumes refused",
            *resumes_refused,
        ),
        (
            "plaza_http_resume_expired",
            "Dropped sessions not resumed within the grace period",
            *resume_expired,
        ),
        (
            "plaza_http_joins_refused_rooms",
            "Joins refused with too_many_rooms (max_rooms)",
            *joins_refused_rooms,
        ),
        (
            "plaza_http_joins_refused_room_full",
            "Joins refused with room_full (max_participants_per_room)",
            *joins_refused_room_full,
        ),
        (
            "plaza_http_joins_rate_limited",
            "Joins refused with join_rate_limited (max_joins_per_ip)",
            *joins_rate_limited,
        ),
        (
            "plaza_http_rate_limit_closes",
            "WebSockets closed for flooding past the rate limit",
            *rate_limit_closes,
        ),
        (
            "plaza_http_oversize_closes",
            "WebSockets closed for a message over the hard size limit",
            *oversize_closes,
        ),
        (
            "plaza_http_accept_errors",
            "Accept errors (e.g. out of file descriptors)",
            *accept_errors,
        ),
    ];
    for (name, help, v) in counters {
        o.counter(name, help, v)?;
    }
    o.gauge(
        "plaza_http_max_connections",
        "Setting: open connections in total",
        *max_connections,
    )?;
    o.gauge(
        "plaza_http_max_connections_per_ip",
        "Setting: open connections per client address",
        *max_connections_per_ip,
    )?;
    o.gauge(
        "plaza_http_max_joins_per_ip",
        "Setting: joins per second per client address (0: unlimited)",
        *max_joins_per_ip,
    )?;
    o.gauge(
        "plaza_http_join_burst_per_ip",
        "Setting: joins per client address at once",
        *join_burst_per_ip,
    )
}

fn encode_process(o: &mut Out<'_, '_>, p: &ProcessUsage) -> fmt::Result {
    if let Some(cpu) = p.cpu_total_s {
        o.counter_f(
            "process_cpu",
            "Total user and system CPU time spent in seconds",
            Unit::Seconds,
            cpu,
        )?;
    }
    if let Some(ns) = p.cpu_runtime_ns {
        o.counter_f(
            "plaza_process_cpu_runtime",
            "CPU time of every thread from schedstat (finer than process_cpu_seconds_total)",
            Unit::Seconds,
            ns as f64 / 1e9,
        )?;
    }
    if let Some(rss) = p.rss_bytes {
        o.gauge_bytes(
            "process_resident_memory",
            "Resident memory size in bytes",
            rss,
        )?;
    }
    if let Some(peak) = p.rss_peak_bytes {
        o.gauge_bytes(
            "plaza_process_resident_memory_peak",
            "Peak resident memory size in bytes (VmHWM)",
            peak,
        )?;
    }
    if let Some(v) = p.virtual_bytes {
        o.gauge_bytes("process_virtual_memory", "Virtual memory size in bytes", v)?;
    }
    if let Some(t) = p.threads {
        o.gauge("process_threads", "Number of OS threads in the process", t)?;
    }
    if let Some(n) = p.open_fds {
        o.gauge("process_open_fds", "Number of open file descriptors", n)?;
    }
    if let Some(n) = p.max_fds {
        o.gauge(
            "process_max_fds",
            "Maximum number of open file descriptors",
            n,
        )?;
    }
    if let Some(t) = p.start_time_s {
        o.gauge(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds",
            t,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_match_the_log_linear_buckets() {
        let mut h = LatencyHistogram::new();
        for us in [0u64, 7, 8, 9, 15, 16, 17, 100, 1000, 65_535, 1_000_000] {
            h.record(Duration::from_micros(us), 1);
        }
        for (ub, _) in h.snapshot().buckets {
            let w = bucket_width_us(ub);
            // The bucket below ends where this one starts.
            let mut below = LatencyHistogram::new();
            below.record(Duration::from_micros(ub + 1 - w), 1);
            assert_eq!(below.snapshot().buckets[0].0, ub, "start of {ub}");
            if ub + 1 > w {
                let mut prev = LatencyHistogram::new();
                prev.record(Duration::from_micros(ub - w), 1);
                assert!(prev.snapshot().buckets[0].0 < ub, "below {ub}");
            }
        }
    }

    #[test]
    fn collapse_keeps_counts_and_never_overstates_a_bound() {
        let mut h = LatencyHistogram::new();
        let samples: Vec<u64> = (0..2000u64).map(|i| i * i * 7 + i).collect(); // 0 .. ~28 s
        for &us in &samples {
            h.record(Duration::from_micros(us), 1);
        }
        let (buckets, count, sum) = collapse(&h.snapshot().buckets);
        assert_eq!(count, samples.len() as u64);
        assert_eq!(buckets.len(), BOUNDS_US.len());
        let mut cumulative = 0;
        for (i, (le, n)) in buckets.iter().enumerate() {
            cumulative += n;
            let le_us = BOUNDS_US[i];
            assert!((le - le_us as f64 / 1e6).abs() < 1e-12);
            let at_most = samples.iter().filter(|&&s| s < le_us).count() as u64;
            // Never more than the truth, and at least every sample 12.5 % below the bound.
            assert!(
                cumulative <= at_most,
                "le {le_us}: {cumulative} > {at_most}"
            );
            let surely = samples
                .iter()
                .filter(|&&s| (s as f64) * 1.125 + 1.0 < le_us as f64)
                .count() as u64;
            assert!(cumulative >= surely, "le {le_us}: {cumulative} < {surely}");
        }
        // Samples above 10 s are only in +Inf, with those in the bucket straddling 10 s.
        let above = samples.iter().filter(|&&s| s >= 10_000_000).count() as u64;
        let near = samples.iter().filter(|&&s| s * 9 >= 80_000_000).count() as u64;
        assert!(above > 0);
        assert!(
            (above..=near).contains(&(count - cumulative)),
            "{above} {near}"
        );
        // The midpoint sum is within the buckets' 12.5 % of the true sum.
        let truth = samples.iter().sum::<u64>() as f64 / 1e6;
        assert!((sum - truth).abs() <= truth * 0.07, "sum {sum} vs {truth}");
    }

    #[test]
    fn collapse_of_nothing_is_zero() {
        let (buckets, count, sum) = collapse(&[]);
        assert_eq!(count, 0);
        assert_eq!(sum, 0.0);
        assert!(buckets.iter().all(|(_, n)| *n == 0));
    }

    #[test]
    fn exact_bucket_bounds() {
        // The bucket [22, 24) µs lies wholly under 25 µs; [24, 26) straddles it and counts
        // under 50 µs.
        let mut h = LatencyHistogram::new();
        h.record(Duration::from_micros(23), 3);
        h.record(Duration::from_micros(24), 5);
        let (buckets, count, _) = collapse(&h.snapshot().buckets);
        assert_eq!(count, 8);
        assert_eq!(buckets[0], (25e-6, 3));
        assert_eq!(buckets[1], (50e-6, 5));
    }

    #[test]
    fn join_times_sum_is_exact() {
        let j = JoinTimes::default();
        j.record(Duration::from_millis(3));
        j.record(Duration::from_micros(2500));
        let (snap, sum) = j.snapshot();
        assert_eq!(snap.count, 2);
        assert!((sum - 0.0055).abs() < 1e-9);
    }

    #[test]
    fn largest_rooms_are_kept() {
        let room = |name: &str, participants, tracks| RoomSummary {
            name: name.into(),
            participants,
            tracks,
            created_at: 0,
            shards: 1,
        };
        let rooms = vec![
            room("a", 1, 0),
            room("b", 5, 1),
            room("c", 5, 3),
            room("d", 2, 0),
        ];
        let top: Vec<String> = largest_rooms(rooms.clone(), 2)
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(top, ["c", "b"]);
        assert_eq!(largest_rooms(rooms, 0).len(), 0);
    }

    #[test]
    fn renders_names_types_and_labels() {
        let mut core = CoreStats {
            rtp_packets_forwarded: 42,
            shards: vec![ShardStats::default(), ShardStats::default()],
            ..Default::default()
        };
        core.forward_dropped.other_layer = 7;
        let mut h = LatencyHistogram::new();
        h.record(Duration::from_micros(30), 10);
        core.forward_latency = h.snapshot();
        let text = render(Scrape {
            core: Some(core),
            rooms: vec![RoomSummary {
                name: "r\"1".into(),
                participants: 3,
                tracks: 2,
                created_at: 0,
                shards: 1,
            }],
            ..Default::default()
        });
        for line in [
            "# TYPE plaza_rtp_packets_forwarded_total counter",
            "plaza_rtp_packets_forwarded_total 42",
            "plaza_forward_dropped_packets_total{reason=\"other_layer\"} 7",
            "# TYPE plaza_forward_latency_seconds histogram",
            "plaza_forward_latency_seconds_bucket{le=\"+Inf\"} 10",
            "plaza_forward_latency_seconds_count 10",
            "plaza_shard_rtp_packets_forwarded_total{shard=\"1\"} 0",
            "plaza_room_participants{room=\"r\\\"1\"} 3",
            "plaza_core_up 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
        let down = render(Scrape::default());
        assert!(down.lines().any(|l| l == "plaza_core_up 0"));
        assert!(!down.contains("plaza_rtp_packets_forwarded_total"));
    }
}
