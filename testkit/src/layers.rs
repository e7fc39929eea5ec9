//! Simulcast measurements for the load tester: subscribers that switch their preferred layer
//! on a schedule, a bandwidth cut (and restore) on the limited subscribers, and per-track
//! reports of what was received.
//!
//! - **Switch latency**: from sending `track_settings` to the first packet of a keyframe of the
//!   requested layer's size at the subscriber. Which size a quality means is known from the
//!   publisher's clips (ranked by pixel count, as the server ranks them). A switch that did not
//!   complete before the next one (or the end of the run) is counted as incomplete, not timed.
//! - **Downgrade after a cut**: from the cut to the first keyframe smaller than the one in
//!   force at the cut (and to the first `layer_changed` of a lower quality).
//! - **Upgrade after a restore**: from the restore to the first keyframe larger than the one in
//!   force at the restore.
//! - **Keyframe requests**: what each publisher layer received (PLI/FIR), over the measured
//!   window.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use plaza::signal::{Quality, TrackKind};
use serde::Serialize;

use super::measure::{Summary, summarize};
use super::peer::{LocalTrackStats, Peer};
use super::recv::RemoteTrackStats;

/// Parses a bit rate: `300kbps`, `1.5Mbps`, `400k`, `2m`, `250000`, `unlimited` (0).
pub fn parse_rate(text: &str) -> Result<u64> {
    let t = text.trim().to_ascii_lowercase();
    if t == "unlimited" || t == "none" {
        return Ok(0);
    }
    let t = t
        .strip_suffix("bps")
        .or_else(|| t.strip_suffix("bit/s"))
        .or_else(|| t.strip_suffix("b/s"))
        .unwrap_or(&t);
    let (num, mult) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1e3),
        Some('m') => (&t[..t.len() - 1], 1e6),
        Some('g') => (&t[..t.len() - 1], 1e9),
        _ => (t, 1.0),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| anyhow::anyhow!("not a bit rate: {text:?} (try 300kbps, 1.5Mbps)"))?;
    if !(v.is_finite() && v >= 0.0) {
        bail!("not a bit rate: {text:?}");
    }
    Ok((v * mult).round() as u64)
}

pub fn parse_quality(text: &str) -> Result<Quality> {
    match text.trim().to_ascii_lowercase().as_str() {
        "low" | "q" => Ok(Quality::Low),
        "medium" | "mid" | "h" => Ok(Quality::Medium),
        "high" | "f" => Ok(Quality::High),
        _ => bail!("not a layer: {text:?} (low, medium or high)"),
    }
}

/// The frame size each quality stands for, from a publisher's simulcast layers (ranked by
/// pixel count, as the server ranks them).
pub fn quality_sizes(local: &LocalTrackStats) -> BTreeMap<Quality, (u16, u16)> {
    let mut sizes: Vec<(u16, u16)> = local.layers.iter().map(|l| (l.width, l.height)).collect();
    sizes.sort_by_key(|(w, h)| u32::from(*w) * u32::from(*h));
    sizes.dedup();
    let n = sizes.len();
    let mut out = BTreeMap::new();
    for (rank, size) in sizes.into_iter().enumerate() {
        let q = if rank + 1 == n {
            Quality::High
        } else if rank == 0 {
            Quality::Low
        } else {
            Quality::Medium
        };
        out.insert(q, size);
    }
    out
}

/// One `track_settings` a subscriber sent, and what came of it.
#[derive(Debug, Clone)]
pub struct SwitchRequest {
    pub subscriber: String,
    pub track_id: String,
    pub quality: Quality,
    pub size: (u16, u16),
    pub sent_at: Instant,
    /// When the next request was sent (or the run ended): the switch must complete before.
    pub until: Option<Instant>,
    /// The subscriber already received this size when asking (no switch expected).
    pub already: bool,
}

/// A video track a subscriber receives from a simulcast publisher.
#[derive(Clone)]
pub struct Target {
    pub subscriber: Arc<Peer>,
    pub track_id: String,
    pub sizes: BTreeMap<Quality, (u16, u16)>,
}

/// Sends `track_settings` to every target every `every`, alternating between `a` and `b`
/// (starting with whichever the subscriber does not receive now), until `deadline`. Returns
/// every request sent.
pub async fn run_switches(
    targets: Vec<Target>,
    a: Quality,
    b: Quality,
    every: Duration,
    deadline: tokio::time::Instant,
) -> Vec<SwitchRequest> {
    let tasks = targets.into_iter().enumerate().map(|(i, t)| async move {
        let mut out: Vec<SwitchRequest> = Vec::new();
        // Spread the subscribers over the period, as real viewers would not act in step.
        let offset = every.mul_f64((i as f64 * 0.618_034) % 1.0);
        let mut next = tokio::time::Instant::now() + offset;
        let current = t
            .subscriber
            .remote_track(&t.track_id)
            .and_then(|s| s.resolution);
        let mut quality = if current == t.sizes.get(&a).copied() {
            b
        } else {
            a
        };
        while next < deadline {
            tokio::time::sleep_until(next).await;
            let Some(&size) = t.sizes.get(&quality) else {
                break;
            };
            let now = Instant::now();
            if let Some(last) = out.last_mut() {
                last.until = Some(now);
            }
            let already = t
                .subscriber
                .remote_track(&t.track_id)
                .and_then(|s| s.resolution)
                == Some(size);
            if t.subscriber
                .track_settings(&t.track_id, Some(quality), None, None)
                .await
                .is_err()
            {
                break;
            }
            out.push(SwitchRequest {
                subscriber: t.subscriber.name().to_owned(),
                track_id: t.track_id.clone(),
                quality,
                size,
                sent_at: now,
                until: None,
                already,
            });
            quality = if quality == a { b } else { a };
            next += every;
        }
        if let Some(last) = out.last_mut() {
            last.until = Some(deadline.into_std());
        }
        out
    });
    futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What the switch requests gave.
#[derive(Debug, Serialize, Default, Clone)]
pub struct SwitchReport {
    pub requests: usize,
    /// Requests for the layer already received (nothing to switch).
    pub already: usize,
    /// Switches that completed before the next request: `track_settings` → first packet of
    /// the requested size.
    pub latency_ms: Summary,
    /// The same, by requested quality (moving up waits for the bandwidth estimate).
    pub latency_by_quality_ms: BTreeMap<String, Summary>,
    /// `track_settings` → the server's `layer_changed` for that quality.
    pub layer_changed_ms: Summary,
    /// Switches that did not complete before the next request.
    pub incomplete: usize,
    pub incomplete_by_quality: BTreeMap<String, usize>,
}

fn quality_name(q: Quality) -> String {
    format!("{q:?}").to_ascii_lowercase()
}

/// Times every request against what its subscriber received.
pub fn switch_report(requests: &[SwitchRequest], peers: &[Arc<Peer>]) -> SwitchReport {
    let mut r = SwitchReport {
        requests: requests.len(),
        ..Default::default()
    };
    let mut all = Vec::new();
    let mut changed = Vec::new();
    let mut by_q: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for req in requests {
        if req.already {
            r.already += 1;
            continue;
        }
        let Some(stats) = peers
            .iter()
            .find(|p| p.name() == req.subscriber)
            .and_then(|p| p.remote_track(&req.track_id))
        else {
            continue;
        };
        let until = req.until.unwrap_or_else(Instant::now);
        let arrived = stats
            .first_resolution_at(req.size, req.sent_at)
            .filter(|at| *at <= until);
        match arrived {
            Some(at) => {
                let v = ms(at - req.sent_at);
                all.push(v);
                by_q.entry(quality_name(req.quality)).or_default().push(v);
            }
            None => {
                r.incomplete += 1;
                *r.incomplete_by_quality
                    .entry(quality_name(req.quality))
                    .or_default() += 1;
            }
        }
        if let Some(c) = stats
            .layer_changes
            .iter()
            .find(|c| c.at >= req.sent_at && c.at <= until && c.quality == req.quality)
        {
            changed.push(ms(c.at - req.sent_at));
        }
    }
    r.latency_ms = summarize(&all);
    r.layer_changed_ms = summarize(&changed);
    r.latency_by_quality_ms = by_q.into_iter().map(|(k, v)| (k, summarize(&v))).collect();
    r
}

/// How one limited subscriber's track reacted to a bandwidth change.
#[derive(Debug, Serialize, Clone)]
pub struct RateChangeReport {
    pub subscriber: String,
    pub track_id: String,
    /// Size received when the rate changed.
    pub before: Option<(u16, u16)>,
    /// First keyframe of another size after the change (smaller after a cut, larger after a
    /// restore), and when.
    pub after: Option<(u16, u16)>,
    pub after_ms: Option<f64>,
    /// When that first keyframe of another size became decodable (complete, its lost packets
    /// repaired by retransmission; see [`super::decoder`]).
    pub decodable_ms: Option<f64>,
    /// First `layer_changed` after the change.
    pub layer_changed_ms: Option<f64>,
    /// Keyframe requests (PLI) the subscriber's modelled decoder sent over the whole run.
    pub plis: u64,
    /// Where it settled: the smallest size received after a cut (the largest after a
    /// restore), and when it was first received.
    pub settled: Option<(u16, u16)>,
    pub settled_ms: Option<f64>,
}

fn pixels(s: (u16, u16)) -> u32 {
    u32::from(s.0) * u32::from(s.1)
}

/// The reaction of `stats` to a rate change at `at`: `down` = look for a smaller size.
pub fn rate_change(
    subscriber: &str,
    stats: &RemoteTrackStats,
    at: Instant,
    down: bool,
    until: Instant,
) -> RateChangeReport {
    let before = stats
        .resolution_changes
        .iter()
        .rev()
        .find(|c| c.at <= at)
        .map(|c| (c.width, c.height));
    let first = stats.resolution_changes.iter().find(|c| {
        c.at > at
            && c.at <= until
            && before.is_none_or(|b| {
                let p = pixels((c.width, c.height));
                if down { p < pixels(b) } else { p > pixels(b) }
            })
    });
    // The first change to the most extreme size (strictly better only, so ties keep the
    // earliest).
    let mut extreme: Option<&super::recv::ResolutionChange> = None;
    for c in stats
        .resolution_changes
        .iter()
        .filter(|c| c.at > at && c.at <= until)
    {
        let p = pixels((c.width, c.height));
        let better = extreme.is_none_or(|e| {
            let q = pixels((e.width, e.height));
            if down { p < q } else { p > q }
        });
        if better {
            extreme = Some(c);
        }
    }
    let extreme = extreme.filter(|c| {
        before.is_none_or(|b| {
            let p = pixels((c.width, c.height));
            if down { p < pixels(b) } else { p > pixels(b) }
        })
    });
    RateChangeReport {
        settled: extreme.map(|c| (c.width, c.height)),
        settled_ms: extreme.map(|c| ms(c.at - at)),
        subscriber: subscriber.to_owned(),
        track_id: stats.track_id.clone(),
        before,
        after: first.map(|c| (c.width, c.height)),
        after_ms: first.map(|c| ms(c.at - at)),
        decodable_ms: stats
            .decoder
            .as_ref()
            .and_then(|d| {
                let before = before.map(pixels);
                d.decoded_keyframes().iter().find(|k| {
                    k.at > at
                        && k.at <= until
                        && k.size.is_some_and(|s| {
                            before.is_none_or(|b| if down { pixels(s) < b } else { pixels(s) > b })
                        })
                })
            })
            .map(|k| ms(k.at - at)),
        plis: stats.decoder.as_ref().map_or(0, |d| d.plis()),
        layer_changed_ms: stats
            .layer_changes
            .iter()
            .find(|c| c.at > at && c.at <= until)
            .map(|c| ms(c.at - at)),
    }
}

/// What a subscriber's video track received, for the report.
#[derive(Debug, Serialize, Clone)]
pub struct LayerTrackReport {
    pub subscriber: String,
    pub track_id: String,
    pub limited: bool,
    /// Frames by the size of the clip they came from (`"320x180": n`).
    pub frames_by_size: BTreeMap<String, u64>,
    /// Packets by the size of the last keyframe before them.
    pub packets_by_size: BTreeMap<String, u64>,
    pub layer_changed: usize,
    pub switches: u64,
    pub switches_without_keyframe: u64,
    pub switches_after_loss: u64,
    pub seq_missing: u64,
    pub seq_recovered: u64,
    pub timestamp_regressions: u64,
    pub picture_id_jumps: u64,
    pub final_size: Option<(u16, u16)>,
}

fn size_key(s: (u16, u16)) -> String {
    format!("{}x{}", s.0, s.1)
}

pub fn track_layers(subscriber: &str, limited: bool, t: &RemoteTrackStats) -> LayerTrackReport {
    let c = &t.continuity;
    LayerTrackReport {
        subscriber: subscriber.to_owned(),
        track_id: t.track_id.clone(),
        limited,
        frames_by_size: t
            .frames_by_origin
            .iter()
            .map(|(k, v)| (size_key(*k), *v))
            .collect(),
        packets_by_size: t
            .packets_by_resolution
            .iter()
            .map(|(k, v)| (size_key(*k), *v))
            .collect(),
        layer_changed: t.layer_changes.len(),
        switches: c.switches,
        switches_without_keyframe: c.switches_without_keyframe,
        switches_after_loss: c.switches_after_loss,
        seq_missing: c.seq_missing(),
        seq_recovered: c.seq_recovered,
        timestamp_regressions: c.timestamp_regressions,
        picture_id_jumps: c.picture_id_jumps,
        final_size: t.resolution,
    }
}

/// Keyframe requests one publisher layer received over the measured window.
#[derive(Debug, Serialize, Clone)]
pub struct KeyframeReport {
    pub publisher: String,
    pub rid: String,
    pub size: String,
    pub requests: u64,
    pub per_minute: f64,
    pub keyframes_sent: u64,
    pub dynacast_pauses: u64,
    pub dynacast_resumes: u64,
}

/// Per layer of every video track of `publisher`: requests between `start` (a snapshot of its
/// local tracks) and now, per minute of `window`.
pub fn keyframe_reports(
    publisher: &Peer,
    start: &[LocalTrackStats],
    window: Duration,
) -> Vec<KeyframeReport> {
    let minutes = window.as_secs_f64() / 60.0;
    let mut out = Vec::new();
    for t in publisher
        .local_tracks()
        .into_iter()
        .filter(|t| t.kind == TrackKind::Video)
    {
        let before = start
            .iter()
            .find(|s| s.client_track_id == t.client_track_id);
        for l in &t.layers {
            let b = before.and_then(|s| s.layers.iter().find(|x| x.ssrc == l.ssrc));
            let requests =
                l.counters.keyframe_requests - b.map_or(0, |b| b.counters.keyframe_requests);
            out.push(KeyframeReport {
                publisher: publisher.name().to_owned(),
                rid: if l.rid.is_empty() {
                    "-".to_owned()
                } else {
                    l.rid.clone()
                },
                size: size_key((l.width, l.height)),
                requests,
                per_minute: if minutes > 0.0 {
                    requests as f64 / minutes
                } else {
                    0.0
                },
                keyframes_sent: l.counters.keyframes - b.map_or(0, |b| b.counters.keyframes),
                dynacast_pauses: l.dynacast_pauses,
                dynacast_resumes: l.dynacast_resumes,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("300kbps").unwrap(), 300_000);
        assert_eq!(parse_rate("1.5Mbps").unwrap(), 1_500_000);
        assert_eq!(parse_rate("400k").unwrap(), 400_000);
        assert_eq!(parse_rate("250000").unwrap(), 250_000);
        assert_eq!(parse_rate("2 m").unwrap(), 2_000_000);
        assert_eq!(parse_rate("unlimited").unwrap(), 0);
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("-3k").is_err());
        assert_eq!(parse_quality("Low").unwrap(), Quality::Low);
        assert!(parse_quality("ultra").is_err());
    }
}
