//! Synthetic Plaza peers for the load tester and the integration tests.
//!
//! Used as `mod common;` from `examples/*.rs` and as
//! `#[path = "../examples/common/mod.rs"] mod common;` from `tests/*.rs`, so nothing here assumes
//! it is a crate root.
//!
//! - [`peer`]: [`Peer`] — WebSocket signaling + subscriber/publisher peer connections (webrtc-rs
//!   0.21), events, waits, data channels, stats.
//! - [`media`]: pre-encoded VP8 (IVF) and Opus (Ogg) clips, looped and paced into RTP.
//! - [`recv`]: per-remote-track receive statistics (loss from sequence gaps, VP8 keyframes).
//! - [`envelope`]: the data-channel envelope (`{"to":[..]}\n` / `{"from":".."}\n` + payload).
//! - [`keyframe`]: the interceptor that lets publishers see PLI/FIR.
#![allow(dead_code, unused_imports)]

pub mod envelope;
pub mod keyframe;
pub mod media;
pub mod peer;
pub mod recv;

pub use peer::{
    Channel, DataMessage, JoinedInfo, LocalTrackStats, NegotiationStats, Payload, Peer, PeerEvent,
    PeerOptions, PeerStats, TimedEvent,
};
pub use recv::{PacketInfo, RemoteTrackStats};
