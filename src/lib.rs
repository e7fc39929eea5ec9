//! # Plaza — a WebRTC SFU for media and data channels
//!
//! ```text
//!  browser / live host / synthetic peer
//!    │  WebSocket /rtc  (JSON signaling: join, offer/answer, ICE, tracks)      ← axum (src/http)
//!    │  UDP one port    (ICE, DTLS, SRTP, SCTP for every participant)          ← SFU core (src/sfu)
//!    ▼
//!  signaling (async, thin) ──commands (mpsc) + replies (oneshot)──► SFU core task
//!                                                                   owns the UDP socket, every
//!                                                                   `rtc` peer connection, rooms,
//!                                                                   tracks and down-tracks
//! ```
//!
//! The server drives webrtc-rs's sans-I/O `rtc` core itself: one task owns the UDP socket and
//! every peer connection, feeds datagrams in, drains what they want to send and drives their
//! timers from one timer heap. The packet path has one owner and no locks. What a subscriber
//! receives bypasses `rtc`'s per-connection pipeline: the core encrypts it with the
//! connection's own SRTP keys and handles the subscriber's RTCP itself (`sfu::egress`). What a
//! publisher sends bypasses it too once `rtc` has bound the SSRC to a track: the core decrypts
//! and forwards it and generates the publisher's feedback (TWCC, NACK, receiver reports, PLI;
//! `sfu::ingress`). `rtc` keeps ICE, DTLS, negotiation, data channels and track binding. Pure
//! logic (rewriting, keyframe throttling, data-channel envelopes, message parsing, feedback
//! generation) lives in small modules that are unit-tested without sockets.

pub mod config;
pub mod http;
pub mod io;
pub mod logging;
pub mod server;
pub mod sfu;
pub mod signal;
