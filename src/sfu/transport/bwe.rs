//! Per-subscriber bandwidth estimation.
//!
//! The subscriber fast path ([`super::egress`]) matches the subscriber's transport-wide
//! congestion control (TWCC) feedback against what it sent and hands the per-packet reports to
//! [`Bwe`], which implements `rtc`'s `BandwidthEstimator` (so it also fits `rtc`'s
//! congestion-control interceptor). The egress keeps each new target, and the last REMB, in
//! an [`Estimate`] that the core (layer selection) and the NACK responder (retransmission
//! budget, [`super::nack`]) read.
//!
//! # Why not `rtc`'s `Gcc` as is
//!
//! `rtc`'s GCC takes the minimum of a delay-based and a loss-based half. Measured behind a
//! drop-tail bottleneck (bench/results/simulcast-2026-11-22.md, git 65f861b):
//!
//! * Both halves grow without bound while the path is clean, whatever is actually sent: after
//!   30 s the delay half stood at ~4.5 Mbit/s and the loss half at the 20 Mbit/s ceiling, for
//!   ~1.7 Mbit/s of media.
//! * After a cut, the delay half never saw overuse (the 200 ms queue fills within tens of
//!   milliseconds and then only drops: the delay stops growing), so only the loss half reacted,
//!   and it moves at most every 200 ms, by `1 − loss/2` of an EWMA that needs ~1 s to build
//!   up. Coming down from 20 Mbit/s to below the top layer took ~1.5 s and below the middle
//!   one ~2 s, every time: that is the "suspiciously constant" ~1.98 s to the server's
//!   decision.
//! * Recovery grows 8 %/s, and only 12 kbit/s per 200 ms near the rate of the last decrease:
//!   ~30 s from the floor back to the top layer.
//!
//! [`Bwe`] keeps `rtc`'s delay machinery (arrival groups, trendline filter, adaptive-threshold
//! overuse detector) and replaces the rest:
//!
//! * **Acknowledged rate**: what the receiver got over the last [`ACKED_WINDOW`], from the
//!   arrival times in the feedback.
//! * **Loss**: over the feedback of the last [`LOSS_WINDOW`]. Above [`HIGH_LOSS`] the target
//!   drops at once to [`LOSS_BACKOFF`] × the acknowledged rate (what the link delivers), not by
//!   a factor per interval. Overuse does the same with [`DELAY_BACKOFF`].
//! * **Growth** ([`GROWTH_PER_S`], [`SLOW_GROWTH_PER_S`] for [`SETTLE`] after a decrease)
//!   only while loss is under [`LOW_LOSS`] and the delay is normal, and never above
//!   [`CAP_FACTOR`] × the acknowledged rate + [`CAP_HEADROOM_BPS`], so the estimate stays tied to
//!   what was actually delivered and an idle estimate cannot run away. The cap is below what
//!   the next simulcast layer needs: the estimate never grows into a layer the link was not
//!   shown to carry (a blind step-up behind a lasting limit is a freeze).
//! * **Probing** ([`super::probe`]): the way up. A probe cluster of padding that the
//!   subscriber's feedback shows delivered at a higher rate sets the estimate to that rate
//!   at once ([`Bwe::on_probe_success`]).
//! * **Start** at [`INITIAL_BPS`], enough for the top layer of a 720p simulcast: a new
//!   subscriber starts on it and falls back within a few hundred milliseconds if its link
//!   cannot carry it.
//!
//! REMB (`goog-remb`) from receivers that do not send TWCC feedback is the fallback: the
//! egress records it in the same [`Estimate`] with [`Estimate::set_remb`].

use rtc::interceptor::{
    BandwidthEstimator, EstimatorStats, OveruseDetector, PacketReport, SlopeEstimator, Usage,
};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Starting estimate for a new subscriber: enough for the top layer of a 720p simulcast
/// (~1.5 Mbit/s) plus audio.
pub const INITIAL_BPS: f64 = 2_500_000.0;
/// Floor of the estimate.
pub const MIN_BPS: f64 = 50_000.0;
/// Ceiling of the estimate.
pub const MAX_BPS: f64 = 20_000_000.0;
/// A REMB value older than this is ignored.
pub const REMB_TTL: Duration = Duration::from_secs(5);
/// Window of the acknowledged (received) rate, on the receiver's clock.
pub const ACKED_WINDOW: Duration = Duration::from_millis(300);
/// Window of the loss fraction, by feedback arrival.
pub const LOSS_WINDOW: Duration = Duration::from_millis(300);
/// The loss fraction needs at least this many packets to count.
pub const LOSS_MIN_PACKETS: usize = 10;
/// Loss above this is congestion: back off to what is delivered.
pub const HIGH_LOSS: f64 = 0.10;
/// Loss below this allows growth (in between: hold).
pub const LOW_LOSS: f64 = 0.02;
/// On heavy loss the target becomes this × the acknowledged rate.
pub const LOSS_BACKOFF: f64 = 0.9;
/// On delay overuse the target becomes this × the acknowledged rate (GCC's factor).
pub const DELAY_BACKOFF: f64 = 0.85;
/// Multiplicative growth per second on a clean path.
pub const GROWTH_PER_S: f64 = 1.25;
/// Growth per second for [`SETTLE`] after a decrease, when the last limit is close.
pub const SLOW_GROWTH_PER_S: f64 = 1.08;
/// How long after a decrease growth stays slow.
pub const SETTLE: Duration = Duration::from_secs(4);
/// Growth stops at `CAP_FACTOR × acknowledged + CAP_HEADROOM_BPS`.
pub const CAP_FACTOR: f64 = 1.25;
/// See [`CAP_FACTOR`]: room for the media's own fluctuation, not for the next simulcast
/// layer (three times the one below it; the acknowledged rate includes probe padding, so
/// the cap stays below the next layer's need even right after a failed probe): moving up
/// takes a probe.
pub const CAP_HEADROOM_BPS: f64 = 50_000.0;

/// The latest estimate of one subscriber's downlink: the TWCC estimator's target once
/// feedback has arrived, and the last REMB (fallback). Owned by the subscriber's
/// [`super::egress::Egress`], next to the estimator.
#[derive(Debug, Clone, Copy, Default)]
pub struct Estimate {
    twcc_bps: Option<u64>,
    /// The last REMB value and when it arrived.
    remb: Option<(u64, Instant)>,
}

impl Estimate {
    /// Record a REMB value received from the subscriber.
    pub fn set_remb(&mut self, now: Instant, bps: u64) {
        self.remb = Some((bps.max(1), now));
    }

    /// Record the TWCC estimator's new target.
    pub fn set_twcc(&mut self, bps: f64) {
        self.twcc_bps = Some(bps.max(1.0) as u64);
    }

    /// The TWCC-based estimate, once feedback has arrived.
    pub fn twcc(&self) -> Option<u64> {
        self.twcc_bps
    }

    /// The REMB value, if one arrived within [`REMB_TTL`].
    pub fn remb(&self, now: Instant) -> Option<u64> {
        let (v, at) = self.remb?;
        (now.saturating_duration_since(at) <= REMB_TTL).then_some(v)
    }

    /// The estimate to select layers by: TWCC when the subscriber sends it, else REMB, else
    /// unknown (no constraint).
    pub fn available(&self, now: Instant) -> Option<u64> {
        self.twcc().or_else(|| self.remb(now))
    }
}

/// The subscriber-side bandwidth estimator (see the module docs).
pub struct Bwe {
    slope: SlopeEstimator,
    detector: OveruseDetector,
    usage: Usage,
    target: f64,
    /// Arrived packets of the last [`ACKED_WINDOW`]: (arrival on the receiver clock, bytes).
    arrivals: VecDeque<(Duration, usize)>,
    arrived_bytes: usize,
    /// The latest arrival ever recorded: never dropped from `arrivals` (only arrivals older
    /// than it by the window are), so it is the newest of the window without a scan.
    newest: Option<Duration>,
    /// Feedback batches of the last [`LOSS_WINDOW`]: (when, lost, total).
    batches: VecDeque<(Instant, usize, usize)>,
    last_update: Option<Instant>,
    last_decrease: Option<Instant>,
    /// Packets reported by the feedback so far, and how many of them were lost.
    reported: u64,
    reported_lost: u64,
}

impl Default for Bwe {
    fn default() -> Self {
        Self::new()
    }
}

impl Bwe {
    /// An estimator starting at [`INITIAL_BPS`].
    pub fn new() -> Self {
        Bwe {
            slope: SlopeEstimator::new(),
            detector: OveruseDetector::new(),
            usage: Usage::Normal,
            target: INITIAL_BPS,
            arrivals: VecDeque::new(),
            arrived_bytes: 0,
            newest: None,
            batches: VecDeque::new(),
            last_update: None,
            last_decrease: None,
            reported: 0,
            reported_lost: 0,
        }
    }

    /// The rate the receiver acknowledged over the last [`ACKED_WINDOW`], if the window spans
    /// at least a tenth of a second.
    pub fn acked_bps(&self) -> Option<f64> {
        let (first, _) = *self.arrivals.front()?;
        let newest = self.newest?;
        let span = newest.saturating_sub(first);
        if span < Duration::from_millis(100) {
            return None;
        }
        Some(self.arrived_bytes as f64 * 8.0 / span.as_secs_f64())
    }

    /// Whether the link looks congested now, or was until lately: loss or delay overuse in
    /// the current windows, or a decrease less than `quiet` ago. No time to probe.
    pub fn congested(&self, now: Instant, quiet: Duration) -> bool {
        self.usage != Usage::Normal
            || self.loss().is_some_and(|l| l >= LOW_LOSS)
            || self
                .last_decrease
                .is_some_and(|t| now.saturating_duration_since(t) < quiet)
    }

    /// Whether the delay estimator sees the queue growing (overuse).
    pub fn overuse(&self) -> bool {
        self.usage == Usage::Over
    }

    /// A probe cluster showed the link delivering `bps`: the estimate becomes at least that
    /// (growth from there is capped as usual).
    pub fn on_probe_success(&mut self, now: Instant, bps: u64) {
        let bps = (bps as f64).clamp(MIN_BPS, MAX_BPS);
        if bps > self.target {
            self.target = bps;
            self.last_update = Some(now);
        }
    }

    /// Packets the feedback reported so far, and how many of them were lost.
    pub fn loss_totals(&self) -> (u64, u64) {
        (self.reported, self.reported_lost)
    }

    /// Loss fraction over the last [`LOSS_WINDOW`], if enough packets were reported.
    pub fn loss(&self) -> Option<f64> {
        let (lost, total) = self
            .batches
            .iter()
            .fold((0, 0), |(l, t), (_, bl, bt)| (l + bl, t + bt));
        (total >= LOSS_MIN_PACKETS).then(|| lost as f64 / total as f64)
    }

    fn record(&mut self, now: Instant, reports: &[PacketReport]) {
        for r in reports {
            if let (true, Some(arrival)) = (r.arrived, r.arrival) {
                self.arrivals.push_back((arrival, r.size));
                self.arrived_bytes += r.size;
                self.newest = Some(self.newest.map_or(arrival, |n| n.max(arrival)));
            }
            if let Some(trend) = self.slope.accumulate(r) {
                self.usage = self.detector.update(trend.at, trend.estimate_ms);
            }
        }
        // Arrival times are on the receiver's clock and may be slightly out of order.
        if let Some(newest) = self.newest {
            while let Some(&(a, size)) = self.arrivals.front() {
                if newest.saturating_sub(a) <= ACKED_WINDOW {
                    break;
                }
                self.arrivals.pop_front();
                self.arrived_bytes -= size;
            }
        }
        let lost = reports.iter().filter(|r| !r.arrived).count();
        self.reported += reports.len() as u64;
        self.reported_lost += lost as u64;
        self.batches.push_back((now, lost, reports.len()));
        while let Some(&(at, _, _)) = self.batches.front() {
            if now.saturating_duration_since(at) <= LOSS_WINDOW {
                break;
            }
            self.batches.pop_front();
        }
    }

    fn update(&mut self, now: Instant) {
        let elapsed = self
            .last_update
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(t))
            .min(Duration::from_secs(1));
        self.last_update = Some(now);
        let acked = self.acked_bps();
        let loss = self.loss().unwrap_or(0.0);
        let backoff = if loss > HIGH_LOSS {
            Some(LOSS_BACKOFF)
        } else if self.usage == Usage::Over {
            Some(DELAY_BACKOFF)
        } else {
            None
        };
        match (backoff, acked) {
            (Some(f), Some(acked)) => {
                if acked * f < self.target {
                    self.target = acked * f;
                    self.last_decrease = Some(now);
                }
            }
            // Congested but nothing measured yet: hold.
            (Some(_), None) => {}
            (None, _) if loss < LOW_LOSS && self.usage == Usage::Normal => {
                let settling = self
                    .last_decrease
                    .is_some_and(|t| now.saturating_duration_since(t) < SETTLE);
                let per_s = if settling {
                    SLOW_GROWTH_PER_S
                } else {
                    GROWTH_PER_S
                };
                let grown = self.target * per_s.powf(elapsed.as_secs_f64());
                let cap = acked.map_or(f64::INFINITY, |a| a * CAP_FACTOR + CAP_HEADROOM_BPS);
                if grown > self.target && self.target < cap {
                    self.target = grown.min(cap);
                }
            }
            // Moderate loss or a draining queue: hold.
            (None, _) => {}
        }
        self.target = self.target.clamp(MIN_BPS, MAX_BPS);
    }
}

impl BandwidthEstimator for Bwe {
    fn on_reports(&mut self, now: Instant, reports: &[PacketReport]) {
        if reports.is_empty() {
            return;
        }
        self.record(now, reports);
        self.update(now);
        tracing::trace!(
            n = reports.len(),
            lost = reports.iter().filter(|r| !r.arrived).count(),
            target = self.target as u64,
            acked = self.acked_bps().unwrap_or(0.0) as u64,
            loss = self.loss().unwrap_or(0.0),
            usage = ?self.usage,
            "bwe"
        );
    }

    fn target_bitrate(&self) -> f64 {
        self.target
    }

    fn stats(&self) -> EstimatorStats {
        let mut s = EstimatorStats::default();
        s.packet_loss = self.loss();
        s
    }
}

#[cfg(test)]
// Tests pick an arbitrary origin for their virtual time (and may share test state).
#[allow(clippy::disallowed_methods, clippy::disallowed_types)]
mod tests {
    use super::*;

    #[test]
    fn twcc_wins_over_remb_and_remb_expires() {
        let t0 = Instant::now();
        let mut e = Estimate::default();
        assert_eq!(e.available(t0), None);
        e.set_remb(t0, 300_000);
        assert_eq!(e.available(t0 + Duration::from_secs(1)), Some(300_000));
        assert_eq!(e.available(t0 + Duration::from_secs(6)), None);
        e.set_twcc(2_000_000.0);
        assert_eq!(e.available(t0), Some(2_000_000));
    }

    /// Feedback for 100 ms of a stream of `rate_bps` in 1200-byte packets starting at `at`,
    /// `delivered_bps` of it arriving (the rest lost), with a constant one-way delay.
    fn batch(
        t0: Instant,
        at: Duration,
        rate_bps: u64,
        delivered_bps: u64,
        id: &mut u64,
    ) -> Vec<PacketReport> {
        let n = rate_bps * 100 / 1000 / (1200 * 8);
        let keep = delivered_bps * 100 / 1000 / (1200 * 8);
        (0..n)
            .map(|i| {
                *id += 1;
                let sent = at + Duration::from_millis(100 * i / n.max(1));
                // Deliver `keep` of the `n` packets, spread evenly.
                let arrived = i * keep / n.max(1) != (i + 1) * keep / n.max(1);
                PacketReport {
                    ssrc: 1,
                    id: *id,
                    rtp_sequence_number: *id as u16,
                    is_twcc: true,
                    twcc_sequence_number: *id as u16,
                    size: 1200,
                    arrived,
                    departure: t0 + sent,
                    arrival: arrived.then_some(sent + Duration::from_millis(20)),
                    ecn: Default::default(),
                }
            })
            .collect()
    }

    fn run(bwe: &mut Bwe, t0: Instant, from_ms: u64, to_ms: u64, rate: u64, delivered: u64) {
        let mut id = from_ms * 1000;
        for step in (from_ms..to_ms).step_by(100) {
            let at = Duration::from_millis(step);
            let reports = batch(t0, at, rate, delivered, &mut id);
            bwe.on_reports(t0 + at + Duration::from_millis(120), &reports);
        }
    }

    #[test]
    fn bwe_backs_off_to_the_delivered_rate_within_a_few_feedbacks() {
        let t0 = Instant::now();
        let mut bwe = Bwe::new();
        assert_eq!(bwe.target_bitrate(), INITIAL_BPS);
        // 1.7 Mbit/s delivered cleanly for 10 s: grows, but only to the cap.
        run(&mut bwe, t0, 0, 10_000, 1_700_000, 1_700_000);
        let cap = 1_700_000.0 * CAP_FACTOR + CAP_HEADROOM_BPS;
        assert!(bwe.target_bitrate() >= INITIAL_BPS);
        assert!(
            bwe.target_bitrate() <= cap.max(INITIAL_BPS) * 1.05,
            "{}",
            bwe.target_bitrate()
        );
        // Cut to 300 kbit/s: within 300 ms of feedback the target is ~0.9 × 300 kbit/s.
        run(&mut bwe, t0, 10_000, 10_300, 1_700_000, 300_000);
        let t = bwe.target_bitrate();
        assert!((200_000.0..=330_000.0).contains(&t), "{t}");
        // The sender moves down to 200 kbit/s: no loss, slow growth while settling...
        run(&mut bwe, t0, 10_300, 12_300, 200_000, 200_000);
        let settled = bwe.target_bitrate();
        assert!(settled > 200_000.0 && settled < t * 1.2, "{t} → {settled}");
        // ... then never above the cap over what is sent: no growth into the next layer
        // without a probe.
        run(&mut bwe, t0, 12_300, 42_300, 200_000, 200_000);
        let capped = bwe.target_bitrate();
        let cap = 200_000.0 * CAP_FACTOR + CAP_HEADROOM_BPS;
        assert!(capped > settled && capped <= cap * 1.1, "{capped}");
        // A successful probe lifts it at once; growth then resumes from there.
        let at = t0 + Duration::from_millis(42_400);
        bwe.on_probe_success(at, 1_800_000);
        assert_eq!(bwe.target_bitrate(), 1_800_000.0);
        bwe.on_probe_success(at, 100_000);
        assert_eq!(bwe.target_bitrate(), 1_800_000.0, "a probe never lowers it");
        run(&mut bwe, t0, 42_400, 44_400, 200_000, 200_000);
        assert_eq!(bwe.target_bitrate(), 1_800_000.0, "held above the cap");
        assert!(!bwe.overuse());
    }

    #[test]
    fn bwe_holds_on_moderate_loss_and_ignores_empty_feedback() {
        let t0 = Instant::now();
        let mut bwe = Bwe::default();
        bwe.on_reports(t0, &[]);
        assert_eq!(bwe.target_bitrate(), INITIAL_BPS);
        // 5 % loss: neither up nor down.
        run(&mut bwe, t0, 0, 3_000, 2_000_000, 1_900_000);
        assert_eq!(bwe.target_bitrate(), INITIAL_BPS);
        assert!(bwe.loss().is_some_and(|l| (0.03..0.08).contains(&l)));
        // Heavy loss on a tiny stream never goes under the floor.
        run(&mut bwe, t0, 3_000, 6_000, 100_000, 10_000);
        assert!(bwe.target_bitrate() >= MIN_BPS);
    }
}
