//! Per-subscriber bandwidth estimation.
//!
//! The subscriber connection's interceptor chain runs `rtc`'s congestion-control interceptor
//! with a GCC estimator fed by the subscriber's transport-wide congestion control (TWCC)
//! feedback. The estimator lives inside the peer connection, so [`SharedGcc`] publishes each new
//! estimate into an [`Estimate`] cell the core reads when it selects layers. Both sides run on
//! the core thread; the atomics only make the cell `Send + Sync` as the interceptor API
//! requires, nothing contends on them.
//!
//! REMB (`goog-remb`) from receivers that do not send TWCC feedback is the fallback: the core
//! records it in the same cell with [`Estimate::set_remb`].

use rtc::interceptor::{BandwidthEstimator, EstimatorStats, Gcc, PacketReport};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Starting estimate for a new subscriber: enough for a medium layer plus audio.
pub const INITIAL_BPS: f64 = 1_000_000.0;
/// Floor of the estimate.
pub const MIN_BPS: f64 = 50_000.0;
/// Ceiling of the estimate.
pub const MAX_BPS: f64 = 20_000_000.0;
/// A REMB value older than this is ignored.
pub const REMB_TTL: Duration = Duration::from_secs(5);

/// The latest estimate of one subscriber's downlink, shared between its interceptor chain and
/// the core.
#[derive(Debug, Clone)]
pub struct Estimate {
    inner: Arc<Cell>,
    origin: Instant,
}

#[derive(Debug, Default)]
struct Cell {
    /// TWCC/GCC estimate in bps; 0 = no feedback has arrived yet.
    twcc_bps: AtomicU64,
    /// REMB in bps; 0 = none.
    remb_bps: AtomicU64,
    /// When the REMB arrived, in ms since `origin`.
    remb_at_ms: AtomicU64,
}

impl Estimate {
    /// A fresh, empty estimate.
    pub fn new(origin: Instant) -> Self {
        Estimate {
            inner: Arc::new(Cell::default()),
            origin,
        }
    }

    /// Record a REMB value received from the subscriber.
    pub fn set_remb(&self, now: Instant, bps: u64) {
        self.inner.remb_bps.store(bps.max(1), Ordering::Relaxed);
        let ms = now.saturating_duration_since(self.origin).as_millis() as u64;
        self.inner.remb_at_ms.store(ms, Ordering::Relaxed);
    }

    fn set_twcc(&self, bps: f64) {
        self.inner
            .twcc_bps
            .store(bps.max(1.0) as u64, Ordering::Relaxed);
    }

    /// The TWCC-based estimate, once feedback has arrived.
    pub fn twcc(&self) -> Option<u64> {
        match self.inner.twcc_bps.load(Ordering::Relaxed) {
            0 => None,
            v => Some(v),
        }
    }

    /// The REMB value, if one arrived within [`REMB_TTL`].
    pub fn remb(&self, now: Instant) -> Option<u64> {
        let v = self.inner.remb_bps.load(Ordering::Relaxed);
        if v == 0 {
            return None;
        }
        let at = self.origin + Duration::from_millis(self.inner.remb_at_ms.load(Ordering::Relaxed));
        (now.saturating_duration_since(at) <= REMB_TTL).then_some(v)
    }

    /// The estimate to select layers by: TWCC when the subscriber sends it, else REMB, else
    /// unknown (no constraint).
    pub fn available(&self, now: Instant) -> Option<u64> {
        self.twcc().or_else(|| self.remb(now))
    }
}

/// GCC that publishes every new target into an [`Estimate`].
pub struct SharedGcc {
    gcc: Gcc,
    out: Estimate,
}

impl SharedGcc {
    /// A GCC estimator writing into `out`.
    pub fn new(out: Estimate) -> Self {
        SharedGcc {
            gcc: Gcc::new(INITIAL_BPS, MIN_BPS, MAX_BPS),
            out,
        }
    }
}

impl BandwidthEstimator for SharedGcc {
    fn on_reports(&mut self, now: Instant, reports: &[PacketReport]) {
        self.gcc.on_reports(now, reports);
        if !reports.is_empty() {
            self.out.set_twcc(self.gcc.target_bitrate());
        }
    }

    fn target_bitrate(&self) -> f64 {
        self.gcc.target_bitrate()
    }

    fn handle_timeout(&mut self, now: Instant) {
        self.gcc.handle_timeout(now);
    }

    fn poll_timeout(&self) -> Option<Instant> {
        self.gcc.poll_timeout()
    }

    fn stats(&self) -> EstimatorStats {
        self.gcc.stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twcc_wins_over_remb_and_remb_expires() {
        let t0 = Instant::now();
        let e = Estimate::new(t0);
        assert_eq!(e.available(t0), None);
        e.set_remb(t0, 300_000);
        assert_eq!(e.available(t0 + Duration::from_secs(1)), Some(300_000));
        assert_eq!(e.available(t0 + Duration::from_secs(6)), None);
        e.set_twcc(2_000_000.0);
        assert_eq!(e.available(t0), Some(2_000_000));
    }
}
