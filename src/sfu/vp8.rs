//! placeholder until the real module lands
pub fn is_keyframe(p: &[u8]) -> bool {
    let _ = p;
    false
}
