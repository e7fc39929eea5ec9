//! Bandwidth probing: whether a subscriber's downlink can carry a higher simulcast layer,
//! asked with padding rather than with the layer itself.
//!
//! The estimate ([`super::bwe::Bwe`]) only grows with what is delivered, capped just above
//! it, so it never reaches the next layer's bitrate on its own: the selector would never
//! step up, and a blind step-up behind a lasting limit is a freeze. Instead, when the
//! selector wants a layer the estimate does not allow, the core starts a *probe cluster*
//! ([`Prober::start`]): for [`CLUSTER`] the subscriber gets padding-only RTP packets on its
//! video down-track, between frames, so that media plus padding runs at [`PROBE_MARGIN`] ×
//! what the higher layer needs ([`Prober::padding_due`]). Every packet of the cluster carries
//! a transport-wide sequence number; the subscriber's TWCC feedback for them
//! ([`Prober::on_reports`]) decides:
//!
//! * **success**: the cluster's packets arrived (loss under [`MAX_LOSS`]) at a rate of at
//!   least what the layer needs: the estimate jumps to the delivered rate and the selector
//!   steps up at once ([`Outcome::Success`]);
//! * **failure**: loss, delay overuse, or a delivered rate below the need: nothing moves and
//!   the next cluster waits [`MIN_BACKOFF`], doubled after every failure up to
//!   [`MAX_BACKOFF`]. A cluster that sees loss or overuse while it runs stops at once, so a
//!   lasting limit costs a short burst of padding now and then, never a freeze: the media
//!   layer stays where it is.
//!
//! Pure: `now` and the feedback are handed in; unit-tested with virtual `Instant`s.

use rtc::interceptor::PacketReport;
use std::time::{Duration, Instant};

/// How long a cluster sends padding: three frame intervals, enough for the feedback to show
/// the rate its packets arrived at, short enough that a failed one costs little.
pub const CLUSTER: Duration = Duration::from_millis(100);
/// The cluster runs media plus padding at this × the rate it must prove.
pub const PROBE_MARGIN: f64 = 1.15;
/// A cluster whose feedback shows more loss than this failed.
pub const MAX_LOSS: f64 = 0.05;
/// Loss above [`MAX_LOSS`] among at least this many reported packets of a running cluster
/// stops it early.
pub const EARLY_STOP_PACKETS: u64 = 8;
/// Wait after the first failure before the next cluster.
pub const MIN_BACKOFF: Duration = Duration::from_millis(500);
/// Longest wait between clusters (the backoff doubles up to it).
pub const MAX_BACKOFF: Duration = Duration::from_millis(1500);
/// Feedback that has not covered a finished cluster after this long: decide on what came.
pub const FEEDBACK_TIMEOUT: Duration = Duration::from_millis(1000);
/// No cluster starts while the link is congested, nor this long after the estimate last
/// went down (the bottleneck's queue is still draining).
pub const QUIET_AFTER_DECREASE: Duration = Duration::from_secs(1);
/// Largest padding in one packet (the RTP padding length is one byte).
pub const MAX_PADDING: usize = 255;
/// Most padding packets after one frame.
pub const MAX_BURST: usize = 40;

/// What a finished cluster showed.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// The link delivered `bps`, at least what the cluster had to prove.
    Success { bps: u64 },
    /// It did not (`bps`: what was delivered, if measured).
    Failure { bps: Option<u64> },
}

/// Counters of one prober (summed into the core's stats).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProbeStats {
    pub clusters: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub padding_packets: u64,
    pub padding_bytes: u64,
}

impl std::ops::AddAssign for ProbeStats {
    fn add_assign(&mut self, o: Self) {
        self.clusters += o.clusters;
        self.succeeded += o.succeeded;
        self.failed += o.failed;
        self.padding_packets += o.padding_packets;
        self.padding_bytes += o.padding_bytes;
    }
}

#[derive(Debug, Clone, Copy)]
struct Cluster {
    start: Instant,
    /// Padding stops here (moved earlier by an early stop).
    end: Instant,
    /// The delivered rate that makes the cluster a success.
    need_bps: u64,
    /// The rate of padding on top of the media.
    padding_bps: u64,
    padding_sent: u64,
    /// The last burst (up to `end`) is being sent: the cluster ends after it.
    closing: bool,
    /// Transport-wide ids: the first packet of the cluster, and one past its last (set when
    /// padding stops).
    first_id: u64,
    end_id: Option<u64>,
    /// Feedback on the cluster's packets so far.
    reported: u64,
    lost: u64,
    arrived_bytes: u64,
    /// Size of the packet that arrived first (not part of the rate: it starts the span).
    first_arrival: Option<(Duration, u64)>,
    last_arrival: Option<Duration>,
    max_id_seen: Option<u64>,
    overuse: bool,
}

impl Cluster {
    fn delivered_bps(&self) -> Option<u64> {
        let ((first, first_size), last) = (self.first_arrival?, self.last_arrival?);
        let span = last.saturating_sub(first);
        if span < Duration::from_millis(50) {
            return None;
        }
        let bytes = self.arrived_bytes.saturating_sub(first_size);
        Some((bytes as f64 * 8.0 / span.as_secs_f64()) as u64)
    }

    fn loss(&self) -> f64 {
        if self.reported == 0 {
            0.0
        } else {
            self.lost as f64 / self.reported as f64
        }
    }

    fn outcome(&self) -> Outcome {
        let bps = self.delivered_bps();
        match bps {
            Some(b) if !self.overuse && self.loss() <= MAX_LOSS && b >= self.need_bps => {
                Outcome::Success { bps: b }
            }
            _ => Outcome::Failure { bps },
        }
    }
}

/// One subscriber connection's prober (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct Prober {
    cluster: Option<Cluster>,
    /// No new cluster before this.
    not_before: Option<Instant>,
    /// The wait after the next failure.
    backoff: Option<Duration>,
    outcome: Option<Outcome>,
    stats: ProbeStats,
}

impl Prober {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn stats(&self) -> ProbeStats {
        self.stats
    }

    /// Whether a cluster is running or waiting for its feedback.
    pub fn busy(&self) -> bool {
        self.cluster.is_some()
    }

    /// Whether padding may be due (a cluster runs; past its time, the next call of
    /// [`Self::padding_due`] closes it, so its packets end with the frame sent then).
    pub fn sending(&self) -> bool {
        self.cluster.is_some_and(|c| c.end_id.is_none())
    }

    /// Whether a cluster may start now (none running, backoff over).
    pub fn can_start(&self, now: Instant) -> bool {
        self.cluster.is_none() && self.not_before.is_none_or(|t| now >= t)
    }

    /// Start a cluster that must show `need_bps` delivered while the media runs at
    /// `media_bps`; `next_id` is the transport-wide id the next packet will get. Returns
    /// whether it started.
    pub fn start(&mut self, now: Instant, need_bps: u64, media_bps: u64, next_id: u64) -> bool {
        if !self.can_start(now) || need_bps == 0 {
            return false;
        }
        let goal = (need_bps as f64 * PROBE_MARGIN) as u64;
        self.cluster = Some(Cluster {
            start: now,
            end: now + CLUSTER,
            need_bps,
            padding_bps: goal.saturating_sub(media_bps).max(need_bps / 4),
            padding_sent: 0,
            closing: false,
            first_id: next_id,
            end_id: None,
            reported: 0,
            lost: 0,
            arrived_bytes: 0,
            first_arrival: None,
            last_arrival: None,
            max_id_seen: None,
            overuse: false,
        });
        self.stats.clusters += 1;
        true
    }

    /// Padding bytes to send now (after a frame), to keep the cluster's pace for the next
    /// `ahead` (about a frame interval); `next_id` as for [`Self::start`]. Zero when no cluster
    /// runs; when the cluster's time is up, padding stops here.
    pub fn padding_due(&mut self, now: Instant, ahead: Duration, next_id: u64) -> usize {
        let Some(c) = self.cluster.as_mut() else {
            return 0;
        };
        if c.end_id.is_some() {
            return 0;
        }
        if now >= c.end {
            c.end_id = Some(next_id);
            return 0;
        }
        let until = (now + ahead).min(c.end);
        c.closing = until >= c.end;
        let elapsed = until.saturating_duration_since(c.start).as_secs_f64();
        let due = (c.padding_bps as f64 * elapsed / 8.0) as u64;
        let n = due.saturating_sub(c.padding_sent) as usize;
        n.min(MAX_PADDING * MAX_BURST)
    }

    /// The burst [`Self::padding_due`] asked for went out; `next_id` as for [`Self::start`].
    /// After the cluster's last burst, its packets are all numbered: it ends.
    pub fn burst_sent(&mut self, next_id: u64) {
        if let Some(c) = self
            .cluster
            .as_mut()
            .filter(|c| c.closing && c.end_id.is_none())
        {
            c.end_id = Some(next_id);
        }
    }

    /// `bytes` of padding in one packet went out.
    pub fn on_padding_sent(&mut self, bytes: usize) {
        if let Some(c) = self.cluster.as_mut() {
            c.padding_sent += bytes as u64;
        }
        self.stats.padding_packets += 1;
        self.stats.padding_bytes += bytes as u64;
    }

    /// Feedback: per-packet reports (extended transport-wide ids) and whether the delay
    /// estimator sees overuse. Returns the outcome when the cluster is decided.
    pub fn on_reports(
        &mut self,
        now: Instant,
        reports: &[PacketReport],
        overuse: bool,
        next_id: u64,
    ) -> Option<Outcome> {
        let c = self.cluster.as_mut()?;
        let mut covered = false;
        for r in reports {
            if r.id < c.first_id || c.end_id.is_some_and(|e| r.id >= e) {
                covered |= c.end_id.is_some_and(|e| r.id >= e);
                continue;
            }
            c.reported += 1;
            c.max_id_seen = Some(c.max_id_seen.map_or(r.id, |m| m.max(r.id)));
            match (r.arrived, r.arrival) {
                (true, Some(at)) => {
                    c.arrived_bytes += r.size as u64;
                    if c.first_arrival.is_none_or(|(f, _)| at < f) {
                        c.first_arrival = Some((at, r.size as u64));
                    }
                    c.last_arrival = Some(c.last_arrival.map_or(at, |l| l.max(at)));
                }
                _ => c.lost += 1,
            }
        }
        if overuse && c.reported > 0 {
            c.overuse = true;
        }
        if let (Some(e), Some(m)) = (c.end_id, c.max_id_seen) {
            covered |= m + 1 >= e;
        }
        let running = c.end_id.is_none();
        let congested = c.overuse || (c.reported >= EARLY_STOP_PACKETS && c.loss() > MAX_LOSS);
        if running && congested {
            // Stop the padding at once: the link is full.
            c.end_id = Some(next_id);
            c.end = now;
            return self.finish(now, Outcome::Failure { bps: None });
        }
        if covered {
            let outcome = c.outcome();
            return self.finish(now, outcome);
        }
        None
    }

    /// A cluster whose feedback never covered it is decided on what arrived; call on every
    /// selection. Returns the outcome when the cluster is decided.
    pub fn poll(&mut self, now: Instant, next_id: u64) -> Option<Outcome> {
        let c = self.cluster.as_mut()?;
        if c.end_id.is_none() && now >= c.end {
            c.end_id = Some(next_id);
        }
        if now.saturating_duration_since(c.end) < FEEDBACK_TIMEOUT {
            return None;
        }
        let outcome = c.outcome();
        self.finish(now, outcome)
    }

    fn finish(&mut self, now: Instant, outcome: Outcome) -> Option<Outcome> {
        self.cluster = None;
        match outcome {
            Outcome::Success { .. } => {
                self.stats.succeeded += 1;
                self.backoff = None;
                self.not_before = None;
            }
            Outcome::Failure { .. } => {
                self.stats.failed += 1;
                let wait = self.backoff.unwrap_or(MIN_BACKOFF);
                self.not_before = Some(now + wait);
                self.backoff = Some((wait * 2).min(MAX_BACKOFF));
            }
        }
        self.outcome = Some(outcome);
        Some(outcome)
    }

    /// The last outcome, once (for the core to act on).
    pub fn take_outcome(&mut self) -> Option<Outcome> {
        self.outcome.take()
    }
}

#[cfg(test)]
// Tests pick an arbitrary origin for their virtual time.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;

    fn report(id: u64, size: usize, arrival: Option<Duration>) -> PacketReport {
        PacketReport {
            ssrc: 1,
            id,
            rtp_sequence_number: id as u16,
            is_twcc: true,
            twcc_sequence_number: id as u16,
            size,
            arrived: arrival.is_some(),
            departure: Instant::now(),
            arrival,
            ecn: Default::default(),
        }
    }

    /// Reports for ids `from..to`, arriving evenly at `bps` from `at`; every `lose`-th lost.
    fn reports(
        from: u64,
        to: u64,
        size: usize,
        bps: u64,
        at: Duration,
        lose: u64,
    ) -> Vec<PacketReport> {
        (from..to)
            .map(|id| {
                let k = id - from;
                let t = at + Duration::from_secs_f64(k as f64 * size as f64 * 8.0 / bps as f64);
                let lost = lose > 0 && k % lose == lose - 1;
                report(id, size, (!lost).then_some(t))
            })
            .collect()
    }

    /// Run a cluster: padding after every 33 ms frame until the window ends; returns the ids
    /// used (media packets take ids too).
    fn run_cluster(p: &mut Prober, t0: Instant, mut next_id: u64) -> (u64, usize) {
        let mut padding = 0;
        for f in 0..=10u64 {
            let now = t0 + Duration::from_millis(33 * f);
            next_id += 5; // a frame of media
            let due = p.padding_due(now, Duration::from_millis(33), next_id);
            let mut left = due;
            while left > 0 {
                let n = left.min(MAX_PADDING);
                p.on_padding_sent(n);
                next_id += 1;
                left -= n;
                padding += n;
            }
            p.burst_sent(next_id);
        }
        (next_id, padding)
    }

    #[test]
    fn padding_is_paced_to_the_goal_over_the_cluster() {
        let t0 = Instant::now();
        let mut p = Prober::new();
        assert!(p.can_start(t0));
        assert!(p.start(t0, 800_000, 200_000, 100));
        assert!(p.busy() && p.sending());
        assert!(!p.start(t0, 800_000, 200_000, 100), "one at a time");
        let (_, padding) = run_cluster(&mut p, t0, 100);
        // (1.15 × 800k − 200k) over 100 ms = 9 000 bytes.
        assert!((8_500..=9_300).contains(&padding), "{padding}");
        assert!(!p.sending(), "closed by its last burst");
        assert_eq!(p.stats().padding_bytes, padding as u64);
    }

    #[test]
    fn delivered_feedback_is_a_success_and_allows_the_next_cluster_at_once() {
        let t0 = Instant::now();
        let mut p = Prober::new();
        p.start(t0, 800_000, 200_000, 100);
        let (end, _) = run_cluster(&mut p, t0, 100);
        let at = Duration::from_millis(1000);
        let fb = reports(100, end, 250, 1_000_000, at, 0);
        let (head, tail) = fb.split_at(fb.len() / 2);
        let later = t0 + Duration::from_millis(400);
        assert_eq!(
            p.on_reports(later, head, false, end),
            None,
            "not covered yet"
        );
        let out = p.on_reports(later, tail, false, end).expect("decided");
        let Outcome::Success { bps } = out else {
            panic!("{out:?}")
        };
        assert!((900_000..=1_100_000).contains(&bps), "{bps}");
        assert_eq!(p.take_outcome(), Some(out));
        assert_eq!(p.take_outcome(), None);
        assert!(p.can_start(later));
        assert_eq!(p.stats().succeeded, 1);
    }

    #[test]
    fn loss_stops_the_cluster_early_and_backs_off_exponentially() {
        let t0 = Instant::now();
        let mut p = Prober::new();
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..6 {
            while !p.can_start(now) {
                now += Duration::from_millis(10);
            }
            waits.push(now);
            assert!(p.start(now, 800_000, 200_000, 0));
            // The first feedback, 100 ms in, shows loss: padding stops at once.
            let fb = reports(0, 20, 250, 300_000, Duration::ZERO, 3);
            let out = p.on_reports(now + Duration::from_millis(100), &fb, false, 30);
            assert!(matches!(out, Some(Outcome::Failure { .. })), "{out:?}");
            assert!(!p.sending());
            assert_eq!(
                p.padding_due(now + Duration::from_millis(120), Duration::ZERO, 31),
                0
            );
            now += Duration::from_millis(100);
        }
        let gaps: Vec<u128> = waits
            .windows(2)
            .map(|w| (w[1] - w[0]).as_millis())
            .collect();
        assert_eq!(gaps, vec![600, 1100, 1600, 1600, 1600]);
        assert_eq!(p.stats().failed, 6);
    }

    #[test]
    fn a_rate_below_the_need_fails_and_overuse_fails() {
        let t0 = Instant::now();
        let mut p = Prober::new();
        p.start(t0, 800_000, 200_000, 0);
        let (end, _) = run_cluster(&mut p, t0, 0);
        // Everything arrives, but at 500 kbit/s (a queue drained it slowly).
        let fb = reports(0, end, 250, 500_000, Duration::ZERO, 0);
        let out = p.on_reports(t0 + Duration::from_millis(700), &fb, false, end);
        assert!(
            matches!(out, Some(Outcome::Failure { bps: Some(b) }) if b < 800_000),
            "{out:?}"
        );
        let later = t0 + Duration::from_secs(2);
        p.start(later, 800_000, 200_000, end);
        let fb = reports(end, end + 10, 250, 2_000_000, Duration::ZERO, 0);
        let out = p.on_reports(later + Duration::from_millis(100), &fb, true, end + 10);
        assert_eq!(out, Some(Outcome::Failure { bps: None }));
    }

    #[test]
    fn missing_feedback_times_out() {
        let t0 = Instant::now();
        let mut p = Prober::new();
        p.start(t0, 800_000, 200_000, 0);
        run_cluster(&mut p, t0, 0);
        assert_eq!(p.poll(t0 + CLUSTER, 99), None);
        let out = p.poll(t0 + CLUSTER + FEEDBACK_TIMEOUT, 99);
        assert_eq!(out, Some(Outcome::Failure { bps: None }));
        assert!(!p.busy());
        // Reports for an old cluster change nothing.
        let fb = reports(0, 50, 250, 1_000_000, Duration::ZERO, 0);
        assert_eq!(
            p.on_reports(t0 + Duration::from_secs(2), &fb, false, 99),
            None
        );
    }
}
