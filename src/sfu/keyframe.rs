//! Keyframe-request (PLI) throttling towards publishers.
//!
//! Any number of subscribers may want a keyframe of the same layer at the same time (joins,
//! layer switches, their own PLIs after loss). [`KeyframeThrottle`] (one per published layer)
//! coalesces them so the layer receives at most one PLI per `min_interval`, however many
//! subscribers ask, and so that a lost PLI or a lost keyframe is retried.
//!
//! Each throttle remembers when a PLI was last sent and whether a keyframe is still
//! *wanted*. There is one way to send: [`request`](KeyframeThrottle::request), which marks a
//! keyframe wanted and returns `true` when a PLI should go out now (none sent within the
//! interval, and it is then recorded as sent); otherwise the request is absorbed by the one in
//! flight.
//!
//! * [`on_keyframe`](KeyframeThrottle::on_keyframe) clears the want: the keyframe satisfies
//!   every request made before it. It does **not** shorten the interval: if it did, a steady
//!   flow of subscriber requests would make the publisher send one keyframe per round trip.
//! * [`retry_due`](KeyframeThrottle::retry_due) only *says* whether a retry is due (a keyframe
//!   is still wanted and the interval has passed: the PLI or its keyframe was lost, or
//!   requests were absorbed after the keyframe went by); the caller retries through `request`
//!   like any other request, so retries obey the same interval.
//!
//! All methods take the current time as a parameter; nothing reads a clock.

use std::time::{Duration, Instant};

/// The default minimum interval between two PLIs for the same layer.
pub const DEFAULT_MIN_INTERVAL: Duration = Duration::from_millis(500);

/// PLI throttle for one published layer; see the module docs. Keep one per `(track, layer)`
/// (e.g. inside the track, one per simulcast layer), or use [`KeyframeThrottleMap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyframeThrottle {
    min_interval: Duration,
    last_sent: Option<Instant>,
    wanted: bool,
}

impl Default for KeyframeThrottle {
    fn default() -> Self {
        Self::new(DEFAULT_MIN_INTERVAL)
    }
}

impl KeyframeThrottle {
    /// A throttle allowing at most one PLI per `min_interval`.
    pub fn new(min_interval: Duration) -> Self {
        KeyframeThrottle {
            min_interval,
            last_sent: None,
            wanted: false,
        }
    }

    /// The configured minimum interval.
    pub fn min_interval(&self) -> Duration {
        self.min_interval
    }

    fn may_send(&self, now: Instant) -> bool {
        match self.last_sent {
            None => true,
            Some(t) => now.saturating_duration_since(t) >= self.min_interval,
        }
    }

    /// Someone wants a keyframe. Returns `true` if a PLI must be sent to the publisher now;
    /// `false` if the request is absorbed (a PLI went out less than `min_interval` ago;
    /// [`due`](Self::due) retries once the interval has passed if no keyframe arrived).
    pub fn request(&mut self, now: Instant) -> bool {
        self.wanted = true;
        if self.may_send(now) {
            self.last_sent = Some(now);
            true
        } else {
            false
        }
    }

    /// A keyframe arrived: every request so far is satisfied (the interval is kept).
    pub fn on_keyframe(&mut self, _now: Instant) {
        self.wanted = false;
    }

    /// Nobody needs the keyframe any more: stop retrying. Does not reset the interval.
    pub fn cancel(&mut self) {
        self.wanted = false;
    }

    /// Whether a keyframe is wanted and has not arrived yet.
    pub fn is_wanted(&self) -> bool {
        self.wanted
    }

    /// Whether a retry is due: a keyframe is still wanted and the interval has passed. Pure:
    /// send the retry with [`request`](Self::request), which records it.
    pub fn retry_due(&self, now: Instant) -> bool {
        self.wanted && self.may_send(now)
    }

    /// When [`retry_due`](Self::retry_due) will return `true` if no keyframe arrives: arm a timer for
    /// it. `None` if no keyframe is wanted.
    pub fn next_deadline(&self) -> Option<Instant> {
        if !self.wanted {
            return None;
        }
        let t = self.last_sent?;
        Some(t.checked_add(self.min_interval).unwrap_or(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(base: Instant, n: u64) -> Instant {
        base + Duration::from_millis(n)
    }

    #[test]
    fn thousand_requests_within_the_interval_give_one_pli() {
        let t0 = Instant::now();
        let mut k = KeyframeThrottle::default();
        let sent = (0..1000u64)
            .filter(|i| k.request(ms(t0, i * 499 / 1000)))
            .count();
        assert_eq!(sent, 1);
        assert!(k.is_wanted());
    }

    #[test]
    fn requests_after_the_interval_send_another() {
        let t0 = Instant::now();
        let mut k = KeyframeThrottle::new(Duration::from_millis(500));
        assert!(k.request(t0));
        assert!(!k.request(ms(t0, 499)));
        assert!(k.request(ms(t0, 500)));
        assert!(!k.request(ms(t0, 600)));
        assert!(k.request(ms(t0, 1000)));
    }

    #[test]
    fn keyframe_clears_pending() {
        let t0 = Instant::now();
        let mut k = KeyframeThrottle::default();
        assert!(k.request(t0));
        for i in 1..100 {
            assert!(!k.request(ms(t0, i)));
        }
        k.on_keyframe(ms(t0, 120));
        assert!(!k.is_wanted());
        assert_eq!(k.next_deadline(), None);
        assert!(!k.retry_due(ms(t0, 10_000)));
        // The interval still holds after a keyframe (no storm).
        let mut k = KeyframeThrottle::default();
        assert!(k.request(t0));
        k.on_keyframe(ms(t0, 50));
        assert!(!k.request(ms(t0, 60)));
        assert!(k.is_wanted());
    }

    /// Retries go through `request` and obey the same interval as everything else: a retry
    /// and a subscriber request at the same moment still give one PLI.
    #[test]
    fn unanswered_requests_are_retried_once_per_interval() {
        let t0 = Instant::now();
        let mut k = KeyframeThrottle::default();
        assert!(k.request(t0));
        assert!(!k.request(ms(t0, 100)));
        assert_eq!(k.next_deadline(), Some(ms(t0, 500)));
        assert!(!k.retry_due(ms(t0, 499)));
        assert!(k.retry_due(ms(t0, 500)));
        assert!(
            k.retry_due(ms(t0, 500)),
            "asking does not consume the retry"
        );
        assert!(k.request(ms(t0, 500)), "the retry is sent");
        assert!(!k.request(ms(t0, 500)), "... once");
        assert!(!k.retry_due(ms(t0, 501)));
        assert_eq!(k.next_deadline(), Some(ms(t0, 1000)));
        assert!(k.retry_due(ms(t0, 1000)));
        // Cancel stops retries.
        k.cancel();
        assert!(!k.retry_due(ms(t0, 5000)));
        assert_eq!(k.next_deadline(), None);
    }

    #[test]
    fn requests_absorbed_after_a_keyframe_are_served_later() {
        let t0 = Instant::now();
        let mut k = KeyframeThrottle::default();
        assert!(k.request(t0));
        k.on_keyframe(ms(t0, 40));
        // A new subscriber asks just after the keyframe went by.
        assert!(!k.request(ms(t0, 100)));
        assert!(k.retry_due(ms(t0, 500)));
        assert!(k.request(ms(t0, 500)));
    }

    #[test]
    fn time_going_backwards_is_harmless() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut k = KeyframeThrottle::default();
        assert!(k.request(t0));
        assert!(!k.request(t0 - Duration::from_secs(5)));
        assert!(!k.retry_due(t0 - Duration::from_secs(5)));
        assert_eq!(k.min_interval(), DEFAULT_MIN_INTERVAL);
    }
}
