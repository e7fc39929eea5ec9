//! placeholder until the real module lands
use std::time::{Duration, Instant};
pub struct KeyframeThrottle {
    min: Duration,
    last: Option<Instant>,
}
impl KeyframeThrottle {
    pub fn new(min: Duration) -> Self {
        Self { min, last: None }
    }
    pub fn request(&mut self, now: Instant) -> bool {
        if self.last.is_some_and(|l| now.duration_since(l) < self.min) {
            false
        } else {
            self.last = Some(now);
            true
        }
    }
    pub fn on_keyframe(&mut self, _now: Instant) {}
}
