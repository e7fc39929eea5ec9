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
//! [`SwitchWatch`] (one per down-track) covers the other half: a keyframe that reached the
//! server but was lost on the way to the subscriber. Right after a layer switch, the switch's
//! keyframe is what the subscriber cannot do without, and it crosses a link that is often
//! congested (a downgrade happens *because* the link is full): if the subscriber reports the
//! loss of packets sent since the switch (a NACK), the core asks for another keyframe at once
//! instead of leaving the subscriber frozen until the publisher's next one (seconds). The
//! NACK responder still repairs what it can; whichever arrives first wins.
//!
//! All methods take the current time as a parameter; nothing reads a clock.

use std::time::{Duration, Instant};

/// The default minimum interval between two PLIs for the same layer.
pub const DEFAULT_MIN_INTERVAL: Duration = Duration::from_millis(500);

/// PLI throttle for one published layer; see the module docs. Keep one per `(track, layer)`
/// (e.g. inside the track, one per simulcast layer), or keep one per layer in a map.
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
    /// [`retry_due`](Self::retry_due) retries once the interval has passed if no keyframe arrived).
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

/// How long after a layer switch a subscriber's loss report makes the core ask for another
/// keyframe of the new layer (see [`SwitchWatch`]). Long enough for a bottleneck queue to
/// drain (≈ 200 ms) plus the NACK's way back, short enough that a link that stays lossy does
/// not cause a keyframe every [`DEFAULT_MIN_INTERVAL`] forever.
pub const SWITCH_WATCH: Duration = Duration::from_millis(1_500);

/// Watches the packets a subscriber gets right after a layer switch of its down-track; see
/// the module docs. Sequence numbers are the down-track's (rewritten, outgoing) ones.
///
/// Armed at a switch with the sequence number of the switch keyframe's first packet; until
/// `SWITCH_WATCH` after the switch, a NACK for any packet sent since then (since the last
/// recovery request, after one) says the subscriber may not be able to decode: the core should
/// request a keyframe of the layer being forwarded (through the per-layer throttle, like every
/// request). Each loss triggers once: after a trigger, only packets sent later count, so the
/// receiver's repeated NACKs of the same packets do not add requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwitchWatch {
    /// First sequence number whose loss counts.
    from_seq: u16,
    until: Instant,
}

impl SwitchWatch {
    /// A switch happened at `now`; its keyframe's first packet went out as `first_seq`.
    pub fn new(first_seq: u16, now: Instant) -> Self {
        SwitchWatch {
            from_seq: first_seq,
            until: now.checked_add(SWITCH_WATCH).unwrap_or(now),
        }
    }

    /// Whether the watch is over (drop it).
    pub fn expired(&self, now: Instant) -> bool {
        now >= self.until
    }

    /// The subscriber NACKed `lost`; `next_seq` is the sequence number the down-track will
    /// send next (everything before it has been sent). Returns `true` when a keyframe should
    /// be requested: the watch is running and a packet in `[from_seq, next_seq)` is reported
    /// lost. Then only packets from `next_seq` on count.
    pub fn on_nack(
        &mut self,
        lost: impl IntoIterator<Item = u16>,
        next_seq: u16,
        now: Instant,
    ) -> bool {
        if self.expired(now) {
            return false;
        }
        let span = next_seq.wrapping_sub(self.from_seq);
        // A span this long cannot be a sane window (sequence numbers moved backwards).
        if span == 0 || span > u16::MAX / 2 {
            return false;
        }
        let hit = lost
            .into_iter()
            .any(|seq| seq.wrapping_sub(self.from_seq) < span);
        if hit {
            self.from_seq = next_seq;
        }
        hit
    }
}

#[cfg(test)]
// Tests pick an arbitrary origin for their virtual time (and may share test state).
#[allow(clippy::disallowed_methods, clippy::disallowed_types)]
mod tests {
    use super::*;

    #[test]
    fn switch_watch_triggers_on_loss_after_the_switch_only() {
        let t0 = Instant::now();
        // Switch keyframe's first packet went out as 65_530 (wrap-around ahead).
        let mut w = SwitchWatch::new(65_530, t0);
        // Losses from before the switch (the old layer) do not count.
        assert!(!w.on_nack([65_500, 65_529], 65_535, ms(t0, 100)));
        // A packet of the switch keyframe lost: request.
        assert!(w.on_nack([65_529, 65_531], 2, ms(t0, 300)));
        // The same loss NACKed again: nothing more.
        assert!(!w.on_nack([65_531], 4, ms(t0, 400)));
        // Not yet sent packets cannot be lost: nothing.
        assert!(!w.on_nack([10], 4, ms(t0, 450)));
        // A new loss after the recovery request: request again.
        assert!(w.on_nack([3], 6, ms(t0, 500)));
        // After the watch, nothing.
        assert!(!w.expired(ms(t0, 1_499)));
        assert!(!w.on_nack([8], 20, ms(t0, 1_500)));
        assert!(w.expired(ms(t0, 1_500)));
    }

    /// A thousand subscribers losing their switch keyframe at once still give one PLI per
    /// throttle interval: the watch only says "request", the layer's throttle decides.
    #[test]
    fn a_thousand_watches_give_one_pli() {
        let t0 = Instant::now();
        let mut throttle = KeyframeThrottle::default();
        assert!(throttle.request(t0), "the switch's own request");
        let mut watches: Vec<SwitchWatch> = (0..1000).map(|_| SwitchWatch::new(100, t0)).collect();
        let mut sent = 0;
        for w in &mut watches {
            if w.on_nack([100], 110, ms(t0, 250)) && throttle.request(ms(t0, 250)) {
                sent += 1;
            }
        }
        assert_eq!(sent, 0, "absorbed by the PLI in flight");
        assert!(throttle.retry_due(ms(t0, 500)), "... and retried once");
        assert!(throttle.request(ms(t0, 500)));
        assert!(!throttle.request(ms(t0, 500)));
    }

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
