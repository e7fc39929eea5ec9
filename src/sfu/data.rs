//! placeholder until the real module lands
use std::time::Instant;
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("too large {size} > {max}")]
    TooLarge { size: usize, max: usize },
    #[error("missing header")]
    MissingHeader,
}
pub struct Inbound<'a> {
    pub to: Vec<String>,
    pub payload: &'a [u8],
}
pub fn parse_client(msg: &[u8], max: usize) -> Result<Inbound<'_>, DataError> {
    let i = msg
        .iter()
        .position(|b| *b == b'\n')
        .ok_or(DataError::MissingHeader)?;
    let payload = &msg[i + 1..];
    if payload.len() > max {
        return Err(DataError::TooLarge {
            size: payload.len(),
            max,
        });
    }
    Ok(Inbound {
        to: vec![],
        payload,
    })
}
pub fn frame_for_receiver(from: &str, payload: &[u8]) -> Vec<u8> {
    let mut v = format!("{{\"from\":\"{from}\"}}\n").into_bytes();
    v.extend_from_slice(payload);
    v
}
#[derive(Default)]
pub struct RateLimiter;
impl RateLimiter {
    pub fn allow(&mut self, _now: Instant, _bytes: usize) -> bool {
        true
    }
}
