//! placeholder until the real module lands
use std::time::Instant;
pub struct Rewriter {
    _ssrc: u32,
    off: Option<(u16, u32)>,
}
impl Rewriter {
    pub fn new(ssrc: u32) -> Self {
        Self {
            _ssrc: ssrc,
            off: None,
        }
    }
    pub fn rewrite(
        &mut self,
        _src: u32,
        seq: u16,
        ts: u32,
        _clock: u32,
        _now: Instant,
    ) -> Option<(u16, u32)> {
        let (a, b) = *self.off.get_or_insert((0, 0));
        Some((seq.wrapping_add(a), ts.wrapping_add(b)))
    }
}
