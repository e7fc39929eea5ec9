//! The time a forwarded packet spends inside the server: from the moment its datagram was read
//! from the socket to the moment the rewritten, re-encrypted datagram is handed to the kernel.
//!
//! [`LatencyHistogram`] is a log-linear histogram (8 buckets per power of two, ≤ 12.5 % error)
//! from 1 µs to ~67 s with plain counters, cheap enough to update per datagram. It is exported
//! whole in `/stats` so a load generator can subtract two snapshots and get percentiles for
//! its own measurement window.

use serde::Serialize;
use std::time::Duration;

/// Sub-buckets per power of two.
const SUB: u32 = 8;
/// Powers of two covered (1 µs .. 2^26 µs ≈ 67 s).
const POWERS: u32 = 26;
const BUCKETS: usize = (SUB * POWERS) as usize + 1;

/// Counts of durations, in microseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatencyHistogram {
    counts: Vec<u64>,
    total: u64,
    max_us: u64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

/// The bucket holding `us`.
fn bucket_of(us: u64) -> usize {
    if us < u64::from(SUB) {
        return us as usize;
    }
    let power = 63 - us.leading_zeros(); // us in [2^power, 2^(power+1))
    let sub = (us >> (power - SUB.trailing_zeros())) as u32 - SUB; // 0..SUB
    let idx = (power - SUB.trailing_zeros() + 1) * SUB + sub;
    (idx as usize).min(BUCKETS - 1)
}

/// The largest value bucket `i` holds (its inclusive upper bound), in microseconds.
fn upper_bound(i: usize) -> u64 {
    let i = i as u32;
    if i < SUB {
        return u64::from(i);
    }
    let shift = i / SUB - 1;
    let sub = u64::from(i % SUB + SUB);
    ((sub + 1) << shift) - 1
}

impl LatencyHistogram {
    pub fn new() -> Self {
        LatencyHistogram {
            counts: vec![0; BUCKETS],
            total: 0,
            max_us: 0,
        }
    }

    /// Count one duration (`n` times).
    pub fn record(&mut self, d: Duration, n: u64) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.counts[bucket_of(us)] += n;
        self.total += n;
        self.max_us = self.max_us.max(us);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// The `q`-quantile (0 < q ≤ 1) in microseconds, as the upper bound of its bucket; `None`
    /// when empty.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        quantile(&self.counts, self.total, q).map(|us| us.min(self.max_us))
    }

    /// What `/stats` shows.
    pub fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            count: self.total,
            p50_us: self.quantile_us(0.5),
            p90_us: self.quantile_us(0.9),
            p99_us: self.quantile_us(0.99),
            max_us: (self.total > 0).then_some(self.max_us),
            buckets: self
                .counts
                .iter()
                .enumerate()
                .filter(|(_, c)| **c > 0)
                .map(|(i, c)| (upper_bound(i), *c))
                .collect(),
        }
    }
}

fn quantile(counts: &[u64], total: u64, q: f64) -> Option<u64> {
    if total == 0 {
        return None;
    }
    let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    for (i, c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return Some(upper_bound(i));
        }
    }
    None
}

/// The histogram as exported: summary over the process life, and the non-empty buckets as
/// `[upper bound µs, count]` pairs (subtract two snapshots for a window).
#[derive(Debug, Clone, Default, Serialize)]
pub struct LatencySnapshot {
    pub count: u64,
    pub p50_us: Option<u64>,
    pub p90_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub max_us: Option<u64>,
    pub buckets: Vec<(u64, u64)>,
}

impl LatencySnapshot {
    /// Add another histogram's counts (another shard's); the percentiles are recomputed from
    /// the merged buckets.
    pub fn merge(&mut self, other: &LatencySnapshot) {
        for &(ub, c) in &other.buckets {
            match self.buckets.iter_mut().find(|(b, _)| *b == ub) {
                Some((_, mine)) => *mine += c,
                None => self.buckets.push((ub, c)),
            }
        }
        self.buckets.sort_unstable();
        self.count += other.count;
        self.max_us = self.max_us.max(other.max_us);
        self.p50_us = window_quantile_us(&[], &self.buckets, 0.50);
        self.p90_us = window_quantile_us(&[], &self.buckets, 0.90);
        self.p99_us = window_quantile_us(&[], &self.buckets, 0.99);
    }
}

/// Percentile from the difference of two bucket lists (`later` − `earlier`), as a load
/// generator computes it for its window. Buckets are `[upper bound µs, count]`.
pub fn window_quantile_us(earlier: &[(u64, u64)], later: &[(u64, u64)], q: f64) -> Option<u64> {
    let mut diff: Vec<(u64, u64)> = later
        .iter()
        .map(|&(ub, c)| {
            let before = earlier
                .iter()
                .find(|(b, _)| *b == ub)
                .map_or(0, |(_, c)| *c);
            (ub, c.saturating_sub(before))
        })
        .collect();
    diff.sort_unstable();
    let total: u64 = diff.iter().map(|(_, c)| c).sum();
    if total == 0 {
        return None;
    }
    let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
    let mut seen = 0;
    diff.into_iter().find_map(|(ub, c)| {
        seen += c;
        (seen >= rank).then_some(ub)
    })
}

#[cfg(test)]
// Tests pick an arbitrary origin for their virtual time (and may share test state).
#[allow(clippy::disallowed_methods, clippy::disallowed_types)]
mod tests {
    use super::*;

    #[test]
    fn merged_snapshots_count_both() {
        let mut a = LatencyHistogram::new();
        let mut b = LatencyHistogram::new();
        a.record(Duration::from_micros(10), 90);
        b.record(Duration::from_micros(1000), 10);
        b.record(Duration::from_micros(10), 10);
        let mut m = a.snapshot();
        m.merge(&b.snapshot());
        assert_eq!(m.count, 110);
        assert_eq!(m.buckets.iter().map(|(_, c)| c).sum::<u64>(), 110);
        assert!(m.p50_us.unwrap() <= 12);
        assert!(m.p99_us.unwrap() >= 900);
        assert!(m.max_us.unwrap() >= 1000);
    }

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn buckets_are_ordered_and_bounded() {
        let mut prev = 0;
        for v in 0..200_000u64 {
            let b = bucket_of(v);
            assert!(b >= prev, "{v}");
            prev = b;
            assert!(
                upper_bound(b) >= v,
                "{v} -> bucket {b} ub {}",
                upper_bound(b)
            );
            if b > 0 {
                assert!(upper_bound(b - 1) < v, "{v}");
            }
            // ≤ 12.5 % error
            assert!(upper_bound(b) as f64 <= (v as f64) * 1.125 + 1.0, "{v}");
        }
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles_of_known_data() {
        let mut h = LatencyHistogram::new();
        assert_eq!(h.quantile_us(0.5), None);
        for v in 1..=100 {
            h.record(us(v * 10), 1); // 10 .. 1000 µs
        }
        assert_eq!(h.count(), 100);
        let p50 = h.quantile_us(0.5).unwrap();
        assert!((500..=570).contains(&p50), "{p50}");
        let p99 = h.quantile_us(0.99).unwrap();
        assert!((990..=1000).contains(&p99), "{p99}");
        assert_eq!(h.quantile_us(1.0), Some(1000)); // capped at the true max
        let s = h.snapshot();
        assert_eq!(s.max_us, Some(1000));
        assert_eq!(s.buckets.iter().map(|(_, c)| c).sum::<u64>(), 100);
    }

    #[test]
    fn window_quantile_subtracts_snapshots() {
        let mut h = LatencyHistogram::new();
        h.record(us(5_000), 1000); // before the window: slow
        let before = h.snapshot().buckets;
        h.record(us(40), 99);
        h.record(us(900), 1);
        let after = h.snapshot().buckets;
        let p50 = window_quantile_us(&before, &after, 0.5).unwrap();
        assert!((40..=45).contains(&p50), "{p50}");
        let p99 = window_quantile_us(&before, &after, 0.99).unwrap();
        assert!((40..=45).contains(&p99), "{p99}");
        let p100 = window_quantile_us(&before, &after, 1.0).unwrap();
        assert!((900..=1023).contains(&p100), "{p100}");
        assert_eq!(window_quantile_us(&after, &after, 0.5), None);
    }
}
