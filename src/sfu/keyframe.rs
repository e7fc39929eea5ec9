//! Keyframe-request (PLI) throttling towards publishers.
//!
//! Any number of subscribers may want a keyframe of the same layer at the same time (joins,
//! layer switches, their own PLIs after loss). [`KeyframeThrottle`] coalesces them so each
//! published layer receives at most one PLI per `min_interval` (500 ms by default), however
//! many subscribers ask, and so that a lost PLI or a lost keyframe is retried.
//! [`KeyframeThrottleMap`] holds one per key (typically `(track, layer)`).
//!
//! Each throttle remembers when a PLI was last sent and whether a keyframe is still
//! *wanted*:
//!
//! * [`request`](KeyframeThrottle::request) marks a keyframe wanted and returns `true` when a
//!   PLI should go out now (none sent within the interval); otherwise the request is absorbed
//!   by the one already in flight.
//! * [`on_keyframe`](KeyframeThrottle::on_keyframe) clears the want: the keyframe satisfies
//!   every request made before it. It does **not** shorten the interval: if it did, a steady
//!   flow of subscriber requests would make the publisher send one keyframe per round trip.
//! * [`due`](KeyframeThrottle::due), called from the core's timer (see
//!   [`next_deadline`](KeyframeThrottle::next_deadline)), says whether to retry: a keyframe
//!   is still wanted and the interval has passed (the PLI or its keyframe was lost, or
//!   requests were absorbed after the keyframe went by). Like `request`, it allows at most
//!   one PLI per interval.
//!
//! All methods take the current time as a parameter; nothing reads a clock.

use std::collections::HashMap;
use std::hash::Hash;
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

    /// Retry: `true` if a keyframe is still wanted and the interval has passed, in which
    /// case a PLI must be sent now (it is recorded as sent).
    pub fn due(&mut self, now: Instant) -> bool {
        if self.wanted && self.may_send(now) {
            self.last_sent = Some(now);
            true
        } else {
            false
        }
    }

    /// When [`due`](Self::due) will return `true` if no keyframe arrives: arm a timer for
    /// it. `None` if no keyframe is wanted.
    pub fn next_deadline(&self) -> Option<Instant> {
        if !self.wanted {
            return None;
        }
        let t = self.last_sent?;
        Some(t.checked_add(self.min_interval).unwrap_or(t))
    }

    /// Neither wanted nor inside its interval: carries no state worth keeping.
    fn is_idle(&self, now: Instant) -> bool {
        !self.wanted && self.may_send(now)
    }
}

/// [`KeyframeThrottle`]s keyed by `K` (e.g. `(track id, layer)`), created on first request.
#[derive(Debug, Clone)]
pub struct KeyframeThrottleMap<K> {
    min_interval: Duration,
    layers: HashMap<K, KeyframeThrottle>,
}

impl<K: Eq + Hash + Clone> Default for KeyframeThrottleMap<K> {
    fn default() -> Self {
        Self::new(DEFAULT_MIN_INTERVAL)
    }
}

impl<K: Eq + Hash + Clone> KeyframeThrottleMap<K> {
    /// A map whose throttles allow at most one PLI per `min_interval` per key.
    pub fn new(min_interval: Duration) -> Self {
        KeyframeThrottleMap {
            min_interval,
            layers: HashMap::new(),
        }
    }

    /// The configured minimum interval.
    pub fn min_interval(&self) -> Duration {
        self.min_interval
    }

    /// See [`KeyframeThrottle::request`].
    pub fn request(&mut self, key: K, now: Instant) -> bool {
        let min_interval = self.min_interval;
        self.layers
            .entry(key)
            .or_insert_with(|| KeyframeThrottle::new(min_interval))
            .request(now)
    }

    /// See [`KeyframeThrottle::on_keyframe`].
    pub fn on_keyframe(&mut self, key: &K, now: Instant) {
        if let Some(t) = self.layers.get_mut(key) {
            t.on_keyframe(now);
        }
    }

    /// See [`KeyframeThrottle::cancel`].
    pub fn cancel(&mut self, key: &K) {
        if let Some(t) = self.layers.get_mut(key) {
            t.cancel();
        }
    }

    /// Forget `key` entirely (the track was unpublished).
    pub fn remove(&mut self, key: &K) {
        self.layers.remove(key);
    }

    /// See [`KeyframeThrottle::is_wanted`].
    pub fn is_wanted(&self, key: &K) -> bool {
        self.layers.get(key).is_some_and(|t| t.is_wanted())
    }

    /// Keys whose PLI must be retried now (see [`KeyframeThrottle::due`]). Also forgets
    /// idle keys, so the map stays small.
    pub fn due(&mut self, now: Instant) -> Vec<K> {
        let mut out = Vec::new();
        self.layers.retain(|key, t| {
            if t.due(now) {
                out.push(key.clone());
            }
            !t.is_idle(now)
        });
        out
    }

    /// The earliest [`KeyframeThrottle::next_deadline`] over all keys.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.layers.values().filter_map(|t| t.next_deadline()).min()
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

        let mut m = KeyframeThrottleMap::default();
        let sent = (0..1000u64)
            .filter(|i| m.request(("track", 2u8), ms(t0, i * 499 / 1000)))
            .count();
        assert_eq!(sent, 1);
        assert!(m.is_wanted(&("track", 2)));
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
    fn layers_are_independent() {
        let t0 = Instant::now();
        let mut k = KeyframeThrottleMap::default();
        assert!(k.request(("t", 0u8), t0));
        assert!(k.request(("t", 1u8), t0));
        assert!(k.request(("u", 0u8), t0));
        assert!(!k.request(("t", 0u8), ms(t0, 1)));
        k.on_keyframe(&("t", 0), ms(t0, 2));
        assert!(!k.is_wanted(&("t", 0)));
        assert!(k.is_wanted(&("t", 1)));
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
        assert!(!k.due(ms(t0, 10_000)));
        // The interval still holds after a keyframe (no storm).
        let mut k = KeyframeThrottle::default();
        assert!(k.request(t0));
        k.on_keyframe(ms(t0, 50));
        assert!(!k.request(ms(t0, 60)));
        assert!(k.is_wanted());

        let mut m = KeyframeThrottleMap::default();
        assert!(m.request("a", t0));
        assert!(!m.request("a", ms(t0, 10)));
        m.on_keyframe(&"a", ms(t0, 120));
        assert_eq!(m.next_deadline(), None);
        assert!(m.due(ms(t0, 10_000)).is_empty());
    }

    #[test]
    fn unanswered_requests_are_retried_once_per_interval() {
        let t0 = Instant::now();
        let mut k = KeyframeThrottleMap::default();
        assert!(k.request("a", t0));
        assert!(!k.request("a", ms(t0, 100)));
        assert_eq!(k.next_deadline(), Some(ms(t0, 500)));
        assert!(k.due(ms(t0, 499)).is_empty());
        assert_eq!(k.due(ms(t0, 500)), vec!["a"]);
        // Retried: the next one is an interval later, and request() agrees.
        assert!(k.due(ms(t0, 700)).is_empty());
        assert!(!k.request("a", ms(t0, 800)));
        assert_eq!(k.due(ms(t0, 1000)), vec!["a"]);
        // Cancel stops retries.
        k.cancel(&"a");
        assert!(k.due(ms(t0, 5000)).is_empty());

        let mut k = KeyframeThrottle::default();
        assert!(k.request(t0));
        assert_eq!(k.next_deadline(), Some(ms(t0, 500)));
        assert!(!k.due(ms(t0, 499)));
        assert!(k.due(ms(t0, 500)));
        assert!(!k.due(ms(t0, 501)));
        assert_eq!(k.next_deadline(), Some(ms(t0, 1000)));
        k.cancel();
        assert!(!k.due(ms(t0, 5000)));
    }

    #[test]
    fn requests_absorbed_after_a_keyframe_are_served_later() {
        let t0 = Instant::now();
        let mut k = KeyframeThrottle::default();
        assert!(k.request(t0));
        k.on_keyframe(ms(t0, 40));
        // A new subscriber asks just after the keyframe went by.
        assert!(!k.request(ms(t0, 100)));
        assert!(k.due(ms(t0, 500)));
    }

    #[test]
    fn idle_keys_are_forgotten() {
        let t0 = Instant::now();
        let mut k = KeyframeThrottleMap::default();
        assert!(k.request("a", t0));
        assert!(k.request("b", t0));
        assert!(k.request("c", t0));
        k.on_keyframe(&"a", ms(t0, 10));
        k.remove(&"b");
        assert_eq!(k.due(ms(t0, 600)), vec!["c"]);
        // "a" is idle and gone; "c" was just retried and is kept.
        assert_eq!(k.layers.len(), 1);
        assert!(k.request("a", ms(t0, 601)));
    }

    #[test]
    fn time_going_backwards_is_harmless() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut k = KeyframeThrottle::default();
        assert!(k.request(t0));
        assert!(!k.request(t0 - Duration::from_secs(5)));
        assert!(!k.due(t0 - Duration::from_secs(5)));
        assert_eq!(k.min_interval(), DEFAULT_MIN_INTERVAL);
        let m = KeyframeThrottleMap::<u8>::new(Duration::from_secs(1));
        assert_eq!(m.min_interval(), Duration::from_secs(1));
    }
}
