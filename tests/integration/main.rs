//! Plaza's integration tests, built as one test binary: one module per area, each with its
//! own documentation and its own lint exceptions at the top of its file. One binary compiles
//! the test kit's generic code once and links once, where a binary per file repeated both.
//!
//! Run one area with a filter on the module path:
//! `cargo nextest run --release --test integration media::` (a substring: `rtx::` also selects
//! `virtual_time::rtx::`; `-E 'test(/^rtx::/)'` selects the top-level module alone).

mod admin;
mod bad_input;
mod clock;
mod cluster;
mod dashboard;
mod data;
mod fuzz;
mod hardening_core;
mod hardening_http;
mod ice_restart;
mod ice_tcp;
mod interop;
mod lifecycle;
mod limits;
mod loadtest_guard;
mod media;
mod node_link;
mod prometheus;
mod red;
mod resume;
mod rtx;
mod simulcast;
mod tokens;
mod virtual_time;
mod webhooks;
mod whep;
mod whip;
