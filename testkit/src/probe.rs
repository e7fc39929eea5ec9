//! Media latency probe: publisher send → subscriber receive of the *same* RTP packet, for peers
//! that all live in this process (one monotonic clock).
//!
//! An SFU rewrites what identifies a packet on the wire — SSRC, sequence number, timestamp,
//! payload type, header extensions — and Plaza's VP8 munger (like Janus's simulcast context)
//! rewrites the VP8 payload descriptor (picture id, TL0PICIDX) at the start of the payload. What
//! survives untouched is the codec payload after that descriptor. So a packet is identified by
//! **(publisher SSRC, hash of the payload's last ≤ 64 bytes, never its first 8)**: the VP8
//! descriptor is at most 6 bytes, and Opus payloads are forwarded byte for byte.
//!
//! - The sender side calls [`sent`] with its SSRC just before handing the packet to webrtc-rs.
//! - The receiver side calls [`received`] with a key of the remote track ([`track_key`]) when
//!   webrtc-rs delivers the packet. The load generator tells the probe which publisher SSRCs a
//!   remote track can carry ([`map_track`]; several for simulcast), once the room is known.
//! - A received packet is matched with the latest send of the same (SSRC, payload hash) no
//!   older than [`MAX_AGE`]. Clips loop every 5–6 s and no two packets of one pass of a shipped
//!   clip share a payload tail (checked in the tests below), so the latest send is the right
//!   one whenever the latency is below the loop period; older matches count as `stale`.
//!
//! What is measured is webrtc-rs `write_rtp` on the publisher → webrtc-rs delivering the packet
//! to the subscriber's track: the SFU's own time plus SRTP and the webrtc-rs stacks of both
//! synthetic peers, plus scheduling delays of this (busy) process. It is therefore an upper
//! bound of the latency the SFU adds; the load generator's own share can be estimated by running
//! the same measurement against another SFU on the same machine (see `examples/bench.rs`).
//!
//! The probe is off until [`enable`] is called (the integration tests never pay for it) and
//! records latencies only inside a window ([`start_window`] … [`take_window`]).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Bytes at the start of a payload that are never hashed (an SFU may rewrite them).
pub const SKIP: usize = 8;
/// At most this many bytes at the end of a payload are hashed.
pub const TAIL: usize = 64;
/// A send older than this is not matched (the packet counts as `stale`).
pub const MAX_AGE: Duration = Duration::from_secs(2);
/// Sends kept for matching, at most (oldest evicted first).
const MAX_SENDS: usize = 1 << 18;
/// Latencies kept per window, at most (about 80 MB).
const MAX_SAMPLES: usize = 20_000_000;

static ENABLED: AtomicBool = AtomicBool::new(false);
static RECORDING: AtomicBool = AtomicBool::new(false);

#[derive(Default)]
struct ProbeState {
    /// (publisher SSRC, payload hash) → latest send time.
    sends: HashMap<(u32, u64), Instant>,
    order: VecDeque<(u32, u64, Instant)>,
    /// Remote-track key → the publisher SSRCs it may carry.
    tracks: HashMap<u64, Vec<u32>>,
    window: WindowCounts,
    latencies_us: Vec<u32>,
}

/// What one window saw.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct WindowCounts {
    pub sent: u64,
    pub received: u64,
    pub matched: u64,
    /// Received on a track the probe has no publisher for (not mapped yet).
    pub unmapped: u64,
    /// No send of that payload on the track's publisher SSRCs (e.g. a packet rewritten by the
    /// server beyond the descriptor, or sent before the probe was enabled).
    pub unmatched: u64,
    /// The only matching send was older than [`MAX_AGE`].
    pub stale: u64,
}

/// A finished window: counts and every matched latency in microseconds.
#[derive(Debug, Clone, Default)]
pub struct Window {
    pub counts: WindowCounts,
    pub latencies_us: Vec<u32>,
}

fn state() -> MutexGuard<'static, ProbeState> {
    static STATE: OnceLock<Mutex<ProbeState>> = OnceLock::new();
    STATE
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

/// FNV-1a, 64 bit: stable, dependency-free and fast enough for ≤ 64 bytes.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The part of a payload that identifies it across an SFU (see the module docs).
pub fn payload_tail(payload: &[u8]) -> &[u8] {
    if payload.len() <= SKIP {
        return payload;
    }
    let start = payload.len().saturating_sub(TAIL).max(SKIP);
    &payload[start..]
}

pub fn payload_hash(payload: &[u8]) -> u64 {
    fnv1a(payload_tail(payload))
}

/// Key of a remote track (any string unique per remote track in the run: Plaza's server track
/// id, or `subscriber/mid` for Janus).
pub fn track_key(id: &str) -> u64 {
    fnv1a(id.as_bytes())
}

/// Turns the probe on (idempotent). Nothing is recorded before.
pub fn enable() {
    ENABLED.store(true, Ordering::Release);
    #[cfg(test)]
    TEST_ENABLED.with(|e| e.set(true));
}

#[cfg(not(test))]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// In test builds the probe records only on the thread that enabled it: the unit tests below
/// share the process with integration tests whose real peers call `sent` and `received` from
/// other threads (the integration tests in `tests/integration/` include this module).
#[cfg(test)]
pub fn enabled() -> bool {
    TEST_ENABLED.with(|e| e.get())
}

#[cfg(test)]
thread_local! {
    static TEST_ENABLED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Records that remote track `key` carries packets of these publisher SSRCs.
pub fn map_track(key: u64, ssrcs: &[u32]) {
    if ssrcs.is_empty() {
        return;
    }
    let mut s = state();
    let e = s.tracks.entry(key).or_default();
    for &ssrc in ssrcs {
        if !e.contains(&ssrc) {
            e.push(ssrc);
        }
    }
}

/// Publisher side: `payload` of SSRC `ssrc` is being written now.
pub fn sent(ssrc: u32, payload: &[u8]) {
    if !enabled() {
        return;
    }
    let h = payload_hash(payload);
    let now = Instant::now();
    let mut s = state();
    s.sends.insert((ssrc, h), now);
    s.order.push_back((ssrc, h, now));
    if RECORDING.load(Ordering::Relaxed) {
        s.window.sent += 1;
    }
    // Evict by age and by count; an entry is removed only if no newer send replaced it.
    while let Some(&(fs, fh, ft)) = s.order.front() {
        if s.order.len() <= MAX_SENDS && now.saturating_duration_since(ft) <= MAX_AGE * 2 {
            break;
        }
        s.order.pop_front();
        if s.sends.get(&(fs, fh)) == Some(&ft) {
            s.sends.remove(&(fs, fh));
        }
    }
}

/// Subscriber side: remote track `key` delivered `payload` at `at`.
pub fn received(key: u64, payload: &[u8], at: Instant) {
    if !enabled() || !RECORDING.load(Ordering::Relaxed) {
        return;
    }
    let h = payload_hash(payload);
    let mut s = state();
    s.window.received += 1;
    let Some(ssrcs) = s.tracks.get(&key) else {
        s.window.unmapped += 1;
        return;
    };
    let best = ssrcs
        .iter()
        .filter_map(|&ssrc| s.sends.get(&(ssrc, h)).copied())
        .filter(|&t| t <= at)
        .max();
    match best {
        None => s.window.unmatched += 1,
        Some(t) if at.duration_since(t) > MAX_AGE => s.window.stale += 1,
        Some(t) => {
            s.window.matched += 1;
            if s.latencies_us.len() < MAX_SAMPLES {
                let us = at.duration_since(t).as_micros().min(u128::from(u32::MAX)) as u32;
                s.latencies_us.push(us);
            }
        }
    }
}

/// Starts recording (clears what the previous window saw).
pub fn start_window() {
    let mut s = state();
    s.window = WindowCounts::default();
    s.latencies_us.clear();
    RECORDING.store(true, Ordering::Release);
}

/// Stops recording and returns what the window saw.
pub fn take_window() -> Window {
    RECORDING.store(false, Ordering::Release);
    let mut s = state();
    Window {
        counts: std::mem::take(&mut s.window),
        latencies_us: std::mem::take(&mut s.latencies_us),
    }
}

/// A copy of the current window's counts and the latencies recorded so far (for progress).
pub fn peek() -> (WindowCounts, Vec<u32>) {
    let s = state();
    (s.window.clone(), s.latencies_us.clone())
}

/// Forgets every send and track mapping (between runs in one process).
pub fn reset() {
    RECORDING.store(false, Ordering::Release);
    let mut s = state();
    *s = ProbeState::default();
}

#[cfg(test)]
mod tests {
    use super::super::media::{Clip, MediaPacketizer, assets_dir};
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn tail_skips_the_descriptor_and_caps_the_length() {
        let p: Vec<u8> = (0..200u8).collect();
        assert_eq!(payload_tail(&p), &p[136..]);
        assert_eq!(payload_tail(&p[..20]), &p[8..20]);
        assert_eq!(payload_tail(&p[..5]), &p[..5]);
        // A rewritten VP8 descriptor (first bytes) does not change the hash.
        let mut q = p.clone();
        q[1] ^= 0xff;
        q[3] = 0x42;
        assert_eq!(payload_hash(&p), payload_hash(&q));
    }

    /// No two packets of one pass of a shipped clip share a payload tail, so matching by
    /// (SSRC, tail hash) is unambiguous within a loop period.
    #[test]
    fn shipped_clips_have_unique_payload_tails() {
        for name in [
            "video_320x240_vp8.ivf",
            "audio_sine_opus.ogg",
            "simulcast_q_320x180_vp8.ivf",
            "simulcast_h_640x360_vp8.ivf",
            "simulcast_f_1280x720_vp8.ivf",
        ] {
            let clip = Clip::load(&assets_dir().join(name)).unwrap();
            let frames = clip.frames.len();
            let mut p = MediaPacketizer::new(clip, 7, 96).unwrap();
            let mut seen = HashSet::new();
            let mut n = 0;
            for _ in 0..frames {
                for pkt in p.next_packets(false).unwrap().0 {
                    n += 1;
                    assert!(
                        seen.insert(payload_hash(&pkt.payload)),
                        "{name}: packet {n}"
                    );
                }
            }
        }
    }

    #[test]
    fn matches_the_latest_send_of_the_mapped_publisher() {
        reset();
        enable();
        let key = track_key("TR_1");
        map_track(key, &[10, 11]);
        let payload = vec![7u8; 100];
        sent(99, &payload); // another publisher, same bytes: never matched for TR_1
        start_window();
        received(key, &payload, Instant::now());
        sent(11, &payload);
        std::thread::sleep(Duration::from_millis(2));
        received(key, &payload, Instant::now());
        received(track_key("TR_unknown"), &payload, Instant::now());
        let w = take_window();
        assert_eq!(w.counts.received, 3);
        assert_eq!(w.counts.matched, 1);
        assert_eq!(w.counts.unmatched, 1);
        assert_eq!(w.counts.unmapped, 1);
        assert!(w.latencies_us[0] >= 2000, "{:?}", w.latencies_us);
        // Outside a window nothing is recorded.
        received(key, &payload, Instant::now());
        assert_eq!(take_window().counts.received, 0);
        reset();
    }
}
