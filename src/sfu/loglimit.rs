//! Log lines rate-limited per cause: a flood of bad input costs one line per cause and
//! interval (with the count of what was not logged), never one line per packet or message.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// At most one line per cause in this long.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Remembers, per cause, when a line was last let through and how many were held back since.
#[derive(Debug, Default)]
pub struct LogLimiter {
    causes: HashMap<&'static str, (Instant, u64)>,
}

impl LogLimiter {
    pub fn new() -> Self {
        Self::default()
    }

    /// May a line for `cause` be logged at `now`? `Some(n)`: yes, and `n` earlier ones were
    /// held back since the last line; `None`: not now (counted).
    pub fn allow(&mut self, cause: &'static str, now: Instant) -> Option<u64> {
        match self.causes.get_mut(cause) {
            Some((last, held)) if now.saturating_duration_since(*last) < LOG_INTERVAL => {
                *held += 1;
                None
            }
            Some((last, held)) => {
                *last = now;
                Some(std::mem::take(held))
            }
            None => {
                self.causes.insert(cause, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
// Tests pick an arbitrary origin for their virtual time (and may share test state).
#[allow(clippy::disallowed_methods, clippy::disallowed_types)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_cause_and_interval_with_the_held_back_count() {
        let mut l = LogLimiter::new();
        let t = Instant::now();
        assert_eq!(l.allow("a", t), Some(0));
        assert_eq!(l.allow("b", t), Some(0));
        for i in 1..=1000 {
            assert_eq!(l.allow("a", t + Duration::from_millis(i)), None);
        }
        assert_eq!(l.allow("a", t + LOG_INTERVAL), Some(1000));
        assert_eq!(l.allow("a", t + LOG_INTERVAL), None);
        assert_eq!(l.allow("b", t + LOG_INTERVAL), Some(0));
    }
}
