//! The delivery state of one webhook URL, as a pure state machine fed `now`: which events go
//! out next, when a failed one is tried again, when one is given up. The dispatcher
//! ([`super::dispatch`]) does the HTTP requests and reports each result here.
//!
//! Rules:
//! - Per room, events go out one at a time in the order they were pushed (their `seq`): the
//!   next event of a room waits until the one before it was delivered (or given up). Rooms are
//!   independent: a failing room does not hold up the others (but a dead URL fails them all).
//! - A failed event is retried after [`Backoff::delay`] (exponential, jittered), for at most
//!   [`Backoff::retry_for`] after its first try; then it is given up (counted as dropped) and
//!   the room's next event goes out.
//! - At most `cap` events wait per URL (queued and in flight); a push beyond that is refused
//!   (counted as dropped by the caller).
//! - At most `max_in_flight` requests at once per URL.
//! - A success at the URL means it is back: the rooms waiting for a retry are tried at once
//!   (their backoff is not reset: if they fail again they wait as long as they would have).

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// Retry timing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The first retry waits about this long.
    pub min: Duration,
    /// No wait is longer.
    pub max: Duration,
    /// An event is given up this long after its first try.
    pub retry_for: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            min: Duration::from_millis(500),
            max: Duration::from_secs(30),
            retry_for: Duration::from_secs(300),
        }
    }
}

impl Backoff {
    /// The wait before retry number `retry` (1 = the first retry): `min · 2^(retry-1)`, at
    /// most `max`, scaled by `0.5 + jitter/2` (`jitter` in `[0, 1)`), so that many receivers'
    /// retries spread out.
    pub fn delay(&self, retry: u32, jitter: f64) -> Duration {
        let exp = retry.saturating_sub(1).min(30);
        let base = self
            .min
            .saturating_mul(1u32 << exp)
            .min(self.max)
            .max(Duration::from_millis(1));
        base.mul_f64(0.5 + jitter.clamp(0.0, 1.0) / 2.0)
    }
}

/// One event waiting for a URL.
#[derive(Debug)]
struct Item<B> {
    seq: u64,
    body: B,
    first_try: Option<Instant>,
    attempts: u32,
}

#[derive(Debug)]
struct RoomQueue<B> {
    items: VecDeque<Item<B>>,
    /// The head is being sent.
    in_flight: bool,
    /// The head is not tried again before this.
    not_before: Option<Instant>,
}

/// A request to make: POST `body` (event `seq` of `room`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Send<B> {
    pub room: String,
    pub seq: u64,
    pub body: B,
    /// 1 for the first try.
    pub attempt: u32,
}

/// What became of an event after a request's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    /// Failed; tried again at this time.
    Retry(Instant),
    /// Failed for longer than `retry_for`: dropped.
    GaveUp,
    /// The result names no event in flight (ignored).
    Unknown,
}

/// The delivery state of one URL.
#[derive(Debug)]
pub struct UrlQueue<B> {
    rooms: BTreeMap<String, RoomQueue<B>>,
    len: usize,
    cap: usize,
    in_flight: usize,
    max_in_flight: usize,
    backoff: Backoff,
}

impl<B: Clone> UrlQueue<B> {
    pub fn new(cap: usize, max_in_flight: usize, backoff: Backoff) -> Self {
        UrlQueue {
            rooms: BTreeMap::new(),
            len: 0,
            cap: cap.max(1),
            in_flight: 0,
            max_in_flight: max_in_flight.max(1),
            backoff,
        }
    }

    /// Events waiting (queued or in flight).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Queue event `seq` of `room`; `false` (refused) when the URL already holds `cap`.
    pub fn push(&mut self, room: &str, seq: u64, body: B) -> bool {
        if self.len >= self.cap {
            return false;
        }
        self.len += 1;
        self.rooms
            .entry(room.to_owned())
            .or_insert_with(|| RoomQueue {
                items: VecDeque::new(),
                in_flight: false,
                not_before: None,
            })
            .items
            .push_back(Item {
                seq,
                body,
                first_try: None,
                attempts: 0,
            });
        true
    }

    /// The requests to start now: the head of each room that is not in flight and not
    /// waiting for a retry, up to `max_in_flight` in all.
    pub fn poll(&mut self, now: Instant) -> Vec<Send<B>> {
        let mut out = Vec::new();
        for (room, q) in &mut self.rooms {
            if self.in_flight >= self.max_in_flight {
                break;
            }
            if q.in_flight || q.not_before.is_some_and(|t| t > now) {
                continue;
            }
            let Some(head) = q.items.front_mut() else {
                continue;
            };
            head.first_try.get_or_insert(now);
            head.attempts += 1;
            q.in_flight = true;
            q.not_before = None;
            self.in_flight += 1;
            out.push(Send {
                room: room.clone(),
                seq: head.seq,
                body: head.body.clone(),
                attempt: head.attempts,
            });
        }
        out
    }

    /// The result of the request for event `seq` of `room`. `jitter` in `[0, 1)`.
    pub fn done(&mut self, room: &str, seq: u64, ok: bool, now: Instant, jitter: f64) -> Outcome {
        let Some(q) = self.rooms.get_mut(room) else {
            return Outcome::Unknown;
        };
        if !q.in_flight || q.items.front().is_none_or(|h| h.seq != seq) {
            return Outcome::Unknown;
        }
        q.in_flight = false;
        self.in_flight -= 1;
        let outcome = if ok {
            Outcome::Delivered
        } else {
            let head = q.items.front().expect("checked above");
            let retry_at = now + self.backoff.delay(head.attempts, jitter);
            let since = head.first_try.unwrap_or(now);
            if retry_at.saturating_duration_since(since) > self.backoff.retry_for {
                Outcome::GaveUp
            } else {
                q.not_before = Some(retry_at);
                Outcome::Retry(retry_at)
            }
        };
        if !matches!(outcome, Outcome::Retry(_)) {
            q.items.pop_front();
            self.len -= 1;
            if q.items.is_empty() {
                self.rooms.remove(room);
            }
        }
        if ok {
            for other in self.rooms.values_mut() {
                if other.not_before.is_some_and(|t| t > now) {
                    other.not_before = Some(now);
                }
            }
        }
        outcome
    }

    /// When [`Self::poll`] next has something to start, if only time must pass (`None`:
    /// nothing waits for a time; a result or a push comes first).
    pub fn next_wakeup(&self) -> Option<Instant> {
        if self.in_flight >= self.max_in_flight {
            return None;
        }
        self.rooms
            .values()
            .filter(|q| !q.in_flight && !q.items.is_empty())
            .filter_map(|q| q.not_before)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff() -> Backoff {
        Backoff {
            min: Duration::from_millis(500),
            max: Duration::from_secs(30),
            retry_for: Duration::from_secs(300),
        }
    }

    fn seqs(sends: &[Send<u64>]) -> Vec<(String, u64)> {
        sends.iter().map(|s| (s.room.clone(), s.seq)).collect()
    }

    #[test]
    fn delay_doubles_up_to_the_cap_and_jitter_halves_at_most() {
        let b = backoff();
        assert_eq!(b.delay(1, 1.0), Duration::from_millis(500));
        assert_eq!(b.delay(1, 0.0), Duration::from_millis(250));
        assert_eq!(b.delay(2, 1.0), Duration::from_secs(1));
        assert_eq!(b.delay(4, 1.0), Duration::from_secs(4));
        assert_eq!(b.delay(7, 1.0), Duration::from_secs(30));
        assert_eq!(b.delay(40, 1.0), Duration::from_secs(30));
        assert_eq!(b.delay(40, 0.0), Duration::from_secs(15));
    }

    #[test]
    fn one_event_per_room_in_flight_in_order() {
        let t0 = Instant::now();
        let mut q = UrlQueue::new(100, 8, backoff());
        for seq in 1..=3 {
            assert!(q.push("a", seq, seq));
        }
        assert!(q.push("b", 1, 100));
        let first = q.poll(t0);
        assert_eq!(seqs(&first), [("a".into(), 1), ("b".into(), 1)]);
        // Nothing more until a result comes.
        assert!(q.poll(t0).is_empty());
        assert_eq!(q.done("a", 1, true, t0, 0.5), Outcome::Delivered);
        assert_eq!(seqs(&q.poll(t0)), [("a".into(), 2)]);
        assert_eq!(q.len(), 3);
    }

    #[test]
    fn a_failed_event_is_retried_before_the_rooms_next_one() {
        let t0 = Instant::now();
        let mut q = UrlQueue::new(100, 8, backoff());
        q.push("a", 1, 1);
        q.push("a", 2, 2);
        q.push("b", 1, 10);
        q.poll(t0);
        // Room b goes on; room a waits for its retry, and its event 2 stays behind event 1.
        assert_eq!(q.done("b", 1, true, t0, 0.0), Outcome::Delivered);
        let Outcome::Retry(at) = q.done("a", 1, false, t0, 1.0) else {
            panic!("should retry");
        };
        assert_eq!(at, t0 + Duration::from_millis(500));
        assert!(q.poll(t0 + Duration::from_millis(499)).is_empty());
        assert_eq!(q.next_wakeup(), Some(at));
        let retry = q.poll(at);
        assert_eq!(seqs(&retry), [("a".into(), 1)]);
        assert_eq!(retry[0].attempt, 2);
        let Outcome::Retry(at2) = q.done("a", 1, false, at, 1.0) else {
            panic!("should retry");
        };
        assert_eq!(at2, at + Duration::from_secs(1));
        q.poll(at2);
        assert_eq!(q.done("a", 1, true, at2, 0.0), Outcome::Delivered);
        assert_eq!(seqs(&q.poll(at2)), [("a".into(), 2)]);
    }

    #[test]
    fn a_success_wakes_the_rooms_waiting_for_a_retry() {
        let t0 = Instant::now();
        let mut q = UrlQueue::new(100, 8, backoff());
        q.push("a", 1, 1);
        q.push("b", 1, 1);
        q.poll(t0);
        let Outcome::Retry(_) = q.done("a", 1, false, t0, 1.0) else {
            panic!("should retry");
        };
        let t1 = t0 + Duration::from_millis(100);
        assert!(q.poll(t1).is_empty(), "a waits for its retry");
        assert_eq!(q.done("b", 1, true, t1, 0.0), Outcome::Delivered);
        assert_eq!(q.next_wakeup(), Some(t1));
        assert_eq!(
            seqs(&q.poll(t1)),
            [("a".into(), 1)],
            "the URL is back: a goes now"
        );
    }

    #[test]
    fn an_event_failing_past_retry_for_is_given_up_and_the_next_goes() {
        let t0 = Instant::now();
        let mut q = UrlQueue::new(100, 8, backoff());
        q.push("a", 1, 1);
        q.push("a", 2, 2);
        let mut now = t0;
        let mut tries = 0;
        loop {
            let sends = q.poll(now);
            assert_eq!(
                seqs(&sends),
                [("a".into(), 1)],
                "only event 1 until it is given up"
            );
            tries += 1;
            match q.done("a", 1, false, now, 1.0) {
                Outcome::Retry(at) => {
                    assert!(at - t0 <= Duration::from_secs(300));
                    now = at;
                }
                Outcome::GaveUp => break,
                other => panic!("{other:?}"),
            }
        }
        // 0.5+1+2+4+8+16 = 31.5 s, then every 30 s up to 300 s.
        assert_eq!(tries, 15);
        assert!(now - t0 <= Duration::from_secs(300));
        assert_eq!(seqs(&q.poll(now)), [("a".into(), 2)]);
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn the_queue_is_bounded_and_in_flight_is_capped() {
        let t0 = Instant::now();
        let mut q = UrlQueue::new(3, 2, backoff());
        assert!(q.push("a", 1, 1));
        assert!(q.push("b", 1, 1));
        assert!(q.push("c", 1, 1));
        assert!(!q.push("d", 1, 1), "a fourth event is refused");
        assert_eq!(q.poll(t0).len(), 2);
        assert_eq!(q.next_wakeup(), None);
        assert_eq!(q.done("a", 1, true, t0, 0.0), Outcome::Delivered);
        assert!(q.push("d", 1, 1), "room again after a delivery");
        assert_eq!(seqs(&q.poll(t0)), [("c".into(), 1)]);
    }

    #[test]
    fn results_for_nothing_in_flight_are_ignored() {
        let t0 = Instant::now();
        let mut q = UrlQueue::new(10, 2, backoff());
        q.push("a", 1, 1);
        assert_eq!(q.done("a", 1, true, t0, 0.0), Outcome::Unknown);
        q.poll(t0);
        assert_eq!(q.done("a", 2, true, t0, 0.0), Outcome::Unknown);
        assert_eq!(q.done("zz", 1, true, t0, 0.0), Outcome::Unknown);
        assert_eq!(q.done("a", 1, true, t0, 0.0), Outcome::Delivered);
        assert!(q.is_empty());
    }
}
