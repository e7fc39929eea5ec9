//! # Plaza — a WebRTC SFU for media and data channels
//!
//! ```text
//!  browser / live host / synthetic peer
//!    │  WebSocket /rtc  (JSON signaling)           │  UDP (ICE, DTLS, SRTP, SCTP), one port per shard
//!    ▼                                             ▼
//!  http (axum, async, thin)                     io — drive: per shard one thread owning its socket,
//!    │  SfuHandle: room → shard                      the clock (once per turn) and the command channel
//!    └── Command (mpsc) ──────────────────────►   │  handle_datagram / handle_command / handle_timeout
//!        events ◄── per-participant channel        ▼
//!                                               sfu::Sfu — decide and act, sans-I/O: rooms,
//!                                               participants, `rtc` peer connections, tracks,
//!                                               down-tracks; poll_timeout() → Deadline{at, reason}
//! ```
//!
//! The SFU core ([`sfu::Sfu`]) is a state machine: it is handed `now` with every input (a
//! datagram, a signaling command, a timeout), writes datagrams to a [`sfu::Transmit`] sink and
//! events to each participant's channel, and names its next deadline with the reason. The
//! driver ([`io`]) is the only async media code: one shard per core (`--workers`), each owning
//! one UDP socket and the rooms placed on it; the packet path has one owner per core and no
//! locks. The server drives webrtc-rs's sans-I/O `rtc` for ICE, DTLS, data channels,
//! negotiation and SSRC binding; media bypasses its pipeline: the core decrypts a publisher's
//! packets (`sfu::ingress`), decides per subscriber (`sfu::forward`: forward with a rewritten
//! header, or drop with a named reason), and encrypts with each subscriber's own SRTP keys
//! (`sfu::egress`). Pure logic (selection, rewriting, keyframe throttling, feedback,
//! demultiplexing, placement) lives in small modules unit-tested without sockets.
//! `docs/ARCHITECTURE.md` has the whole picture.

pub mod auth;
pub mod cluster;
pub mod config;
pub mod http;
pub mod io;
pub mod logging;
pub mod server;
pub mod sfu;
pub mod signal;
pub mod turn;
pub mod webhook;
// The simulation is a driver (like `io`): it owns the virtual clock, started from one
// real instant.
pub mod sim;
