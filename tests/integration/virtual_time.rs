//! Virtual-time tests: the network simulator and the in-memory `rtc` peers (`plaza::sim`).
//!
//! Every test runs on one virtual clock: seconds or minutes of media take milliseconds of
//! wall time, and the same seed gives the same run (checked by digest). No sockets, no
//! sleeps, no runtime. `two_peers` proves the network and the client peers on their own
//! (offer/answer, ICE, DTLS, SRTP media, loss, rate limits); `shards` runs rooms that span
//! several cores of one server, joined through the real placement, over the pipe.

// A test, not the packet path: it reads the wall clock to report how long a simulation took,
// and prints the virtual times it measured.
#![allow(clippy::disallowed_methods, clippy::print_stdout)]

pub mod common;
pub mod data;
pub mod grants;
pub mod h264;
pub mod isolation;
pub mod lifecycle;
pub mod probing;
pub mod quality;
pub mod rtx;
pub mod sfu;
pub mod shards;
pub mod speaker;
pub mod timeline;
pub mod two_peers;
pub mod unrepaired;
pub mod viewer;
