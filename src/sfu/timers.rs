//! Deadlines with reasons.
//!
//! The core never sleeps and never reads the clock: it answers "when do you next need me, and
//! why?" ([`Deadline`]) and is called back with `now` when that time has come. Every timer has
//! a [`Reason`], so a trace (or a virtual-time test) can say what woke the core. There are no
//! intervals inside the core: a periodic job is a [`Periodic`] that computes its next
//! deadline from the time it last ran.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

/// Why the core wants to be woken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// A peer connection's `rtc` timer: ICE checks and consent, DTLS retransmission, SCTP.
    Rtc,
    /// A publisher's feedback is due: transport-wide CC, NACKs, receiver reports.
    IngressFeedback,
    /// Periodic layer selection, keyframe-request retries and dynacast.
    LayerSelection,
    /// RTCP sender reports for every forwarded stream.
    SenderReports,
    /// A participant whose transport has not connected is due to be dropped.
    ConnectTimeout,
    /// Housekeeping: forgetting stale demultiplexer entries.
    Maintenance,
    /// Connection quality: silence of each participant's connections, and loss windows.
    Quality,
    /// A room's input tick ended: its batches go out.
    InputTick,
    /// Active speakers: each audio track's levels since the last tick.
    Speakers,
}

/// A point in time and what is due then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    pub at: Instant,
    pub reason: Reason,
}

impl Deadline {
    pub fn new(at: Instant, reason: Reason) -> Self {
        Deadline { at, reason }
    }
}

/// The earlier of two optional deadlines (the first on a tie).
pub fn soonest(a: Option<Deadline>, b: Option<Deadline>) -> Option<Deadline> {
    match (a, b) {
        (Some(a), Some(b)) => Some(if b.at < a.at { b } else { a }),
        (a, b) => a.or(b),
    }
}

/// A job that runs every `every`, measured from when it last ran (a late run delays the next
/// one rather than bunching runs up).
#[derive(Debug, Clone, Copy)]
pub struct Periodic {
    next: Instant,
    every: Duration,
    reason: Reason,
}

impl Periodic {
    /// First due `every` after `now`.
    pub fn new(now: Instant, every: Duration, reason: Reason) -> Self {
        Periodic {
            next: now + every,
            every,
            reason,
        }
    }

    pub fn deadline(&self) -> Deadline {
        Deadline::new(self.next, self.reason)
    }

    /// Whether the job is due at `now`; if so, its next run is scheduled from `now`.
    pub fn fire(&mut self, now: Instant) -> bool {
        if now < self.next {
            return false;
        }
        self.next = now + self.every;
        true
    }
}

/// Deadlines of many keys, earliest first. A key's entry is only a hint: the owner decides,
/// when it pops, whether the entry is still current (a key rescheduled to another time leaves
/// its old entry behind, which is skipped). Pushing is O(log n), finding the earliest O(1)
/// amortised.
#[derive(Debug)]
pub struct TimerQueue<K: Ord + Copy> {
    heap: BinaryHeap<Reverse<(Instant, K)>>,
}

impl<K: Ord + Copy> Default for TimerQueue<K> {
    fn default() -> Self {
        TimerQueue {
            heap: BinaryHeap::new(),
        }
    }
}

impl<K: Ord + Copy> TimerQueue<K> {
    pub fn push(&mut self, at: Instant, key: K) {
        self.heap.push(Reverse((at, key)));
    }

    /// The earliest entry that `current(key, at)` still accepts; stale entries on the way are
    /// dropped.
    pub fn peek(&mut self, mut current: impl FnMut(K, Instant) -> bool) -> Option<(Instant, K)> {
        while let Some(&Reverse((at, key))) = self.heap.peek() {
            if current(key, at) {
                return Some((at, key));
            }
            self.heap.pop();
        }
        None
    }

    /// Take the earliest entry if it is due at `now` (stale or not: the caller checks).
    pub fn pop_due(&mut self, now: Instant) -> Option<(Instant, K)> {
        match self.heap.peek() {
            Some(&Reverse((at, _))) if at <= now => self.heap.pop().map(|Reverse(e)| e),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
// Tests pick an arbitrary origin for their virtual time (and may share test state).
#[allow(clippy::disallowed_methods, clippy::disallowed_types)]
mod tests {
    use super::*;

    #[test]
    fn soonest_picks_the_earlier_and_keeps_the_first_on_a_tie() {
        let t0 = Instant::now();
        let a = Deadline::new(t0 + Duration::from_millis(5), Reason::Rtc);
        let b = Deadline::new(t0 + Duration::from_millis(3), Reason::SenderReports);
        assert_eq!(soonest(Some(a), Some(b)), Some(b));
        assert_eq!(soonest(Some(a), None), Some(a));
        assert_eq!(soonest(None, Some(b)), Some(b));
        assert_eq!(soonest(None, None), None);
        let tie = Deadline::new(a.at, Reason::Maintenance);
        assert_eq!(soonest(Some(a), Some(tie)), Some(a));
    }

    #[test]
    fn periodic_runs_from_when_it_last_ran() {
        let t0 = Instant::now();
        let mut p = Periodic::new(t0, Duration::from_millis(250), Reason::LayerSelection);
        assert_eq!(p.deadline().at, t0 + Duration::from_millis(250));
        assert!(!p.fire(t0 + Duration::from_millis(100)));
        // Late by 150 ms: the next run is 250 ms after this one, not at 500 ms.
        assert!(p.fire(t0 + Duration::from_millis(400)));
        assert_eq!(p.deadline().at, t0 + Duration::from_millis(650));
        assert_eq!(p.deadline().reason, Reason::LayerSelection);
    }

    #[test]
    fn timer_queue_skips_stale_entries() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut q = TimerQueue::default();
        q.push(ms(10), 1u32);
        q.push(ms(5), 2u32);
        q.push(ms(20), 1u32);
        // Key 2 was rescheduled away: its entry is stale; key 1's current deadline is 20.
        let current = |k: u32, at: Instant| (k == 1 && at == ms(20)) || k == 3;
        assert_eq!(q.peek(current), Some((ms(20), 1)));
        assert_eq!(q.len(), 1);
        assert_eq!(q.pop_due(ms(19)), None);
        assert_eq!(q.pop_due(ms(20)), Some((ms(20), 1)));
        assert!(q.is_empty());
    }
}
