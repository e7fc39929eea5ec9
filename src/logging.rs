//! Logging: `tracing` to stdout (text or JSON), with every log line rate-limited per cause.
//!
//! A client sending garbage can make a library log once per packet (forged STUN with a known
//! ufrag, SCTP aborts): a log line per bad packet is a flood an attacker controls. Every call
//! site (Plaza's and the libraries', including their `log` records) may write at most
//! [`BURST`] lines per [`WINDOW`]; the rest are dropped and counted in
//! [`suppressed_lines`] (`log_lines_suppressed` in `/stats`, `plaza_log_lines_suppressed_total` in `/metrics`).

// Not the packet path: the per-call-site rate limits are shared by every thread and timed
// by the clock.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tracing::{Event, Metadata, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::layer::{Context, Filter};

/// Lines one call site may write per window.
pub const BURST: u32 = 20;
/// The window.
pub const WINDOW: Duration = Duration::from_secs(10);

static SUPPRESSED: AtomicU64 = AtomicU64::new(0);

/// Log lines dropped by the rate limit since the process started.
pub fn suppressed_lines() -> u64 {
    SUPPRESSED.load(Ordering::Relaxed)
}

/// Per call site: the window's start and the lines written in it.
type Sites = HashMap<(String, &'static str, u32), (Instant, u32)>;

/// A [`Filter`] that lets each call site through at most [`BURST`] times per [`WINDOW`].
/// (Only consulted for events the level filter already let through; not on any hot path.)
#[derive(Debug, Default)]
pub struct RateLimit {
    sites: Mutex<Sites>,
}

impl RateLimit {
    /// May a line from this site be written at `now`?
    fn allow(&self, target: &str, file: &'static str, line: u32, now: Instant) -> bool {
        let mut sites = match self.sites.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        if sites.len() > 10_000 {
            sites.retain(|_, (start, _)| now.saturating_duration_since(*start) < WINDOW);
        }
        let entry = sites
            .entry((target.to_owned(), file, line))
            .or_insert((now, 0));
        if now.saturating_duration_since(entry.0) >= WINDOW {
            *entry = (now, 0);
        }
        if entry.1 < BURST {
            entry.1 += 1;
            true
        } else {
            SUPPRESSED.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

impl<S: Subscriber> Filter<S> for RateLimit {
    fn enabled(&self, _meta: &Metadata<'_>, _cx: &Context<'_, S>) -> bool {
        true
    }

    fn event_enabled(&self, event: &Event<'_>, _cx: &Context<'_, S>) -> bool {
        // `log` records all share one call site per level; their own target/file/line are in
        // the normalized metadata.
        let normalized = event.normalized_metadata();
        let meta = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let file: &'static str = match (normalized.is_some(), event.metadata().file()) {
            // A `log` record's file name is not 'static: key on its target and line.
            (true, _) => "",
            (false, Some(f)) => f,
            (false, None) => "",
        };
        self.allow(
            meta.target(),
            file,
            meta.line().unwrap_or(0),
            Instant::now(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_site_gets_a_burst_per_window() {
        let rl = RateLimit::default();
        let t = Instant::now();
        let before = suppressed_lines();
        let allowed = (0..1000).filter(|_| rl.allow("rtc_ice", "", 42, t)).count();
        assert_eq!(allowed, BURST as usize);
        assert!(suppressed_lines() >= before + 1000 - u64::from(BURST));
        // Another site is not affected; the next window starts afresh.
        assert!(rl.allow("rtc_ice", "", 43, t));
        assert!(rl.allow("rtc_sctp", "", 42, t));
        assert!(rl.allow("rtc_ice", "", 42, t + WINDOW));
    }
}
