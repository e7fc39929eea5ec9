//! `plaza-testkit`: synthetic Plaza peers and integration-test helpers, one library compiled
//! once for the integration tests (`tests/integration/`), the load tester and the benchmark
//! (`examples/*.rs`). Its unit tests run with `cargo nextest run -p plaza-testkit`.
//!
//! - [`peer`]: [`Peer`] — WebSocket signaling + subscriber/publisher peer connections (webrtc-rs
//!   0.21), events, waits, data channels, stats.
//! - [`media`]: pre-encoded VP8 (IVF) and Opus (Ogg) clips from `assets/`, looped and paced into
//!   RTP (15-bit VP8 picture ids, like browsers); publishers answer PLI/FIR by jumping to the
//!   clip's next keyframe (per simulcast layer, by media SSRC); frame fingerprints tell a
//!   receiver which clip (layer) a frame came from.
//! - [`recv`]: per-remote-track receive statistics (loss from sequence gaps, VP8 keyframes,
//!   the last N packets; for simulcast: the size of every keyframe, the layer of every frame,
//!   `layer_changed` messages, and continuity of sequence numbers, timestamps and picture ids
//!   across switches).
//! - [`decoder`]: a model of a browser's video receiver: which VP8 frames it could decode
//!   (retransmissions included) and when it would send a PLI (libwebrtc's timers, or eager).
//! - [`delivery`]: media delivery over a measured window (packets the publishers wrote vs.
//!   packets each subscriber received), which sees a stream that stops.
//! - [`envelope`]: the data-channel envelope (`{"to":[..]}\n` / `{"from":".."}\n` + payload).
//! - [`keyframe`]: the interceptor that lets publishers see PLI/FIR.
//! - [`layers`]: simulcast measurements for the load tester (layer switches, bandwidth cuts).
//! - [`lightviewer`]: a light benchmark viewer (real signaling, ICE and DTLS; SRTP only counted
//!   from the clear RTP header, never decrypted; no RTCP feedback).
//! - [`manual`]: a hand-driven webrtc-rs client (raw signaling, one peer connection over a
//!   chosen media engine, answers when the test says, every received RTP packet captured).
//! - [`relay`]: a UDP relay with a bandwidth bottleneck, to limit what a subscriber receives.
//! - [`probe`]: media latency probe (publisher send → subscriber receive of the same packet).
//! - [`measure`]: server counters, CPU time and RSS sampled around a window; percentiles; a
//!   progress line.
//! - [`cli`]: the command-line flags the load tester and the benchmark share.
//! - [`janus`]: the same synthetic media against Janus's videoroom plugin (benchmark
//!   comparison).
//! - [`whip`]: a WHIP publisher (RFC 9725: `POST` an offer, trickle with `PATCH`, `DELETE`),
//!   plain or simulcast, and a raw HTTP client that keeps the response headers; the HTTP
//!   session WHIP and WHEP share.
//! - [`whep`]: a WHEP viewer (`POST` a `recvonly` offer, receive, layer extension), measured
//!   like a WebSocket subscriber's tracks, optionally behind a bandwidth bottleneck.
//! - [`support`]: the integration tests' side: the real server in-process on loopback, raw
//!   HTTP and WebSocket clients, media-flow waits.
//!
//! ```ignore
//! let alice = Peer::connect(&url, "room", "alice", PeerOptions::publisher()).await?;
//! let bob = Peer::connect(&url, "room", "bob", PeerOptions::subscriber()).await?;
//! let tracks = bob.wait_for_tracks(2, Duration::from_secs(10)).await?;
//! bob.wait_for_packets(&tracks[0].track_id, 50, Duration::from_secs(10)).await?;
//! alice.send_chat("hi", Some(vec![bob.participant_id().to_owned()])).await?;
//! let msg = bob.wait_for_message(|m| m.text() == Some("hi"), Duration::from_secs(5)).await?;
//! assert_eq!(msg.from.as_deref(), Some(alice.participant_id()));
//! bob.leave().await?;
//! ```
//!
//! Every wait takes a timeout and re-checks its condition on each state change (no sleeps);
//! what the server does wrong ends up in [`PeerEvent`]s and `Err`s, never in a panic.
// A test tool: it shares state between tasks and reads the clock, which the packet path may
// not; it prints its reports and exits with a status.
#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    clippy::print_stdout
)]

pub mod affinity;
pub mod cli;
pub mod decoder;
pub mod delivery;
pub mod envelope;
pub mod janus;
pub mod keyframe;
pub mod layers;
pub mod lightviewer;
pub mod manual;
pub mod measure;
pub mod media;
pub mod peer;
pub mod probe;
pub mod recv;
pub mod redis;
pub mod relay;
pub mod support;
pub mod token;
pub mod whep;
pub mod whip;

pub use peer::{
    Channel, DataMessage, JoinedInfo, LocalLayerStats, LocalTrackStats, NegotiationStats, Payload,
    Peer, PeerEvent, PeerOptions, PeerStats, Removal, SimulcastOptions, TimedEvent,
};
pub use recv::{LayerChange, PacketInfo, RemoteTrackStats};
