//! Active speakers: who is talking in a room, loudest first. Pure (no sockets, no clock): the
//! packet path hands each audio track's [`Meter`] the level of every packet, and every
//! [`TICK`] the core hands each track's [`Voice`] what its meter counted and ranks the
//! speaking participants ([`rank`]).
//!
//! # Input
//!
//! The audio level a publisher puts in each audio packet (RFC 6464, the
//! `urn:ietf:params:rtp-hdrext:ssrc-audio-level` header extension): one byte, the V (voice
//! activity) bit and the level in −dBov, 0 the loudest and 127 silence (a disabled microphone
//! sends 127). A packet is *active* when its level is at most [`ACTIVE_LEVEL`]. The V bit is
//! read but not relied on: a sender sets it only when its own voice detector runs, while every
//! sender measures the level.
//!
//! # Decision
//!
//! A tick's *activity* is the share of its packets that were active (a tick without enough
//! packets, e.g. Opus DTX in silence, counts the missing ones as silence:
//! [`MIN_PACKETS_PER_TICK`]). A track starts speaking when the activity over the last
//! [`START_TICKS`] ticks reaches [`START_ACTIVITY`] (about half of 0.4 s of voice), and stops
//! when the activity over the last [`WINDOW_TICKS`] ticks (1 s) falls below
//! [`STOP_ACTIVITY`]: the pauses between words (a few hundred milliseconds) keep it speaking,
//! ~0.8 s of silence ends it. Its level, 0.0–1.0, is the linear amplitude of the window's mean
//! active level (10^(−dBov/20), as LiveKit reports it) times the window's activity, so a
//! steady loud voice ranks above a quiet or intermittent one. A participant's level is that of
//! its loudest speaking audio track; [`rank`] orders them loudest first, and [`keep_order`]
//! keeps the order the room was told until someone is clearly louder than one ranked above.

use crate::signal::SpeakerInfo;
use std::time::Duration;

/// How often the core evaluates the meters.
pub const TICK: Duration = Duration::from_millis(200);
/// A packet whose level is at most this (−dBov) counts as voice.
pub const ACTIVE_LEVEL: u8 = 40;
/// Ticks (the most recent ones) whose activity starts a speaker.
pub const START_TICKS: usize = 2;
/// Share of active packets over [`START_TICKS`] ticks that starts a speaker.
pub const START_ACTIVITY: f64 = 0.5;
/// Ticks of the window that keeps a speaker speaking (and its level is measured over).
pub const WINDOW_TICKS: usize = 5;
/// Below this share of active packets over [`WINDOW_TICKS`] a speaker stops.
pub const STOP_ACTIVITY: f64 = 0.25;
/// Packets a tick counts at least: one per 40 ms. A tick with fewer (DTX: a packet every
/// 400 ms in silence) counts the missing ones as silence, so a click after a silence is not a
/// voice; a sender of 60 ms frames still reaches an activity of 2/3, above both thresholds.
pub const MIN_PACKETS_PER_TICK: u32 = 5;
/// The quietest level (−dBov) of RFC 6464.
pub const SILENCE: u8 = 127;

/// One packet's audio level (RFC 6464 §3): `level` in −dBov (0 loudest, 127 silence) and
/// the V bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioLevel {
    pub level: u8,
    pub voice: bool,
}

impl AudioLevel {
    /// The header extension's payload (its first byte; one-byte and two-byte header forms
    /// carry the same byte).
    #[inline]
    pub fn parse(ext: &[u8]) -> Option<Self> {
        let &b = ext.first()?;
        Some(AudioLevel {
            level: b & 0x7f,
            voice: b & 0x80 != 0,
        })
    }
}

/// What one audio track's packets said since the last tick: kept on the track, fed by the
/// packet path (a few additions, no allocation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Meter {
    packets: u32,
    active: u32,
    /// Sum over the active packets of their level (−dBov).
    active_dbov: u32,
}

impl Meter {
    /// One packet with audio level `level` (−dBov).
    #[inline]
    pub fn observe(&mut self, level: u8) {
        self.packets = self.packets.saturating_add(1);
        if level <= ACTIVE_LEVEL {
            self.active = self.active.saturating_add(1);
            self.active_dbov = self.active_dbov.saturating_add(u32::from(level));
        }
    }

    /// What was counted, and start again.
    pub fn take(&mut self) -> Meter {
        std::mem::take(self)
    }

    fn add(&mut self, o: &Meter) {
        self.packets = self.packets.saturating_add(o.packets);
        self.active = self.active.saturating_add(o.active);
        self.active_dbov = self.active_dbov.saturating_add(o.active_dbov);
    }

    /// Share of active packets over `ticks` ticks, counting at least [`MIN_PACKETS_PER_TICK`]
    /// packets a tick (those that did not come were silence).
    fn activity(&self, ticks: usize) -> f64 {
        let floor = (ticks as u32).saturating_mul(MIN_PACKETS_PER_TICK);
        f64::from(self.active) / f64::from(self.packets.max(floor).max(1))
    }
}

/// One audio track's speaking state: the meters of its last [`WINDOW_TICKS`] ticks.
#[derive(Debug, Clone, Default)]
pub struct Voice {
    /// Ring of the last ticks' meters; `next` is the oldest.
    ring: [Meter; WINDOW_TICKS],
    next: usize,
    speaking: bool,
}

impl Voice {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_speaking(&self) -> bool {
        self.speaking
    }

    /// The sum of the last `n` ticks' meters.
    fn last(&self, n: usize) -> Meter {
        let mut sum = Meter::default();
        for i in 1..=n.min(WINDOW_TICKS) {
            sum.add(&self.ring[(self.next + WINDOW_TICKS - i) % WINDOW_TICKS]);
        }
        sum
    }

    /// A tick: `sample` is what the track's meter counted since the previous one. The track's
    /// level (0.0–1.0) while it speaks.
    pub fn tick(&mut self, sample: Meter) -> Option<f64> {
        self.ring[self.next] = sample;
        self.next = (self.next + 1) % WINDOW_TICKS;
        let window = self.last(WINDOW_TICKS);
        if self.speaking {
            self.speaking = window.activity(WINDOW_TICKS) >= STOP_ACTIVITY;
        } else {
            self.speaking = self.last(START_TICKS).activity(START_TICKS) >= START_ACTIVITY;
        }
        self.speaking.then(|| level(&window))
    }
}

/// The level (0.0–1.0) of a window: the amplitude of its mean active level times its
/// activity, to three decimals.
fn level(w: &Meter) -> f64 {
    if w.active == 0 {
        return 0.0;
    }
    let dbov = f64::from(w.active_dbov) / f64::from(w.active);
    let amplitude = 10f64.powf(-dbov / 20.0);
    ((amplitude * w.activity(WINDOW_TICKS)) * 1000.0).round() / 1000.0
}

/// Speaking participants (id, level of one speaking track; a participant may appear once per
/// track) → the `speakers` list: one entry per participant with its loudest track's level,
/// loudest first (ties by id, so the order is stable).
pub fn rank(speaking: impl IntoIterator<Item = (String, f64)>) -> Vec<SpeakerInfo> {
    let mut out: Vec<SpeakerInfo> = Vec::new();
    for (participant_id, level) in speaking {
        match out.iter_mut().find(|s| s.participant_id == participant_id) {
            Some(s) => s.level = s.level.max(level),
            None => out.push(SpeakerInfo {
                participant_id,
                level,
            }),
        }
    }
    out.sort_by(|a, b| {
        b.level
            .total_cmp(&a.level)
            .then_with(|| a.participant_id.cmp(&b.participant_id))
    });
    out
}

/// A speaker overtakes one ranked above it only when louder by this factor: two voices of
/// about the same level do not swap places every tick.
pub const OVERTAKE: f64 = 1.25;

/// `next` (ranked) in the order of `prev` when it names the same participants and nobody in it
/// is louder than someone ranked above it in `prev` by [`OVERTAKE`]; else `next` as ranked.
pub fn keep_order(prev: &[SpeakerInfo], next: Vec<SpeakerInfo>) -> Vec<SpeakerInfo> {
    if prev.len() != next.len() || same_speakers(prev, &next) {
        return next;
    }
    let level_of = |pid: &str| {
        next.iter()
            .find(|s| s.participant_id == pid)
            .map(|s| s.level)
    };
    let mut kept = Vec::with_capacity(prev.len());
    for p in prev {
        let Some(level) = level_of(&p.participant_id) else {
            return next; // another set
        };
        kept.push(SpeakerInfo {
            participant_id: p.participant_id.clone(),
            level,
        });
    }
    let overtaken = kept.iter().enumerate().any(|(i, s)| {
        kept[..i]
            .iter()
            .any(|above| s.level > above.level * OVERTAKE)
    });
    if overtaken { next } else { kept }
}

/// Whether two lists name the same participants in the same order (levels aside): the room is
/// told only of such changes.
pub fn same_speakers(a: &[SpeakerInfo], b: &[SpeakerInfo]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.participant_id == y.participant_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PACKET_MS: u64 = 20;

    /// Run a track for `ms` of packets at `level` every 20 ms, ticking every [`TICK`] from
    /// time `t0`; returns the (time, speaking level) of each tick.
    struct Run {
        t_ms: u64,
        meter: Meter,
        voice: Voice,
        ticks: Vec<(u64, Option<f64>)>,
    }

    impl Run {
        fn new() -> Self {
            Run {
                t_ms: 0,
                meter: Meter::default(),
                voice: Voice::new(),
                ticks: Vec::new(),
            }
        }

        /// `ms` of packets at `level` (`None`: no packets, as DTX).
        fn feed(&mut self, ms: u64, level: Option<u8>) -> &mut Self {
            let end = self.t_ms + ms;
            while self.t_ms < end {
                if let Some(l) = level {
                    self.meter.observe(l);
                }
                self.t_ms += PACKET_MS;
                if self.t_ms % TICK.as_millis() as u64 == 0 {
                    let s = self.voice.tick(self.meter.take());
                    self.ticks.push((self.t_ms, s));
                }
            }
            self
        }

        fn speaking(&self) -> bool {
            self.voice.is_speaking()
        }

        /// The time of the first tick at or after `from_ms` whose speaking state is `want`.
        fn first(&self, from_ms: u64, want: bool) -> Option<u64> {
            self.ticks
                .iter()
                .find(|(t, s)| *t >= from_ms && s.is_some() == want)
                .map(|(t, _)| *t)
        }
    }

    #[test]
    fn the_level_byte_is_read() {
        assert_eq!(
            AudioLevel::parse(&[0x80 | 30]),
            Some(AudioLevel {
                level: 30,
                voice: true
            })
        );
        assert_eq!(
            AudioLevel::parse(&[127]),
            Some(AudioLevel {
                level: 127,
                voice: false
            })
        );
        assert_eq!(AudioLevel::parse(&[]), None);
    }

    #[test]
    fn silence_never_speaks() {
        let mut r = Run::new();
        r.feed(5_000, Some(SILENCE));
        assert!(r.ticks.iter().all(|(_, s)| s.is_none()));
        let mut r = Run::new();
        r.feed(5_000, None);
        assert!(r.ticks.iter().all(|(_, s)| s.is_none()));
        // Background noise above the threshold is not voice either.
        let mut r = Run::new();
        r.feed(5_000, Some(ACTIVE_LEVEL + 5));
        assert!(!r.speaking());
    }

    #[test]
    fn speaking_starts_after_a_few_hundred_ms_of_voice() {
        let mut r = Run::new();
        r.feed(1_000, Some(SILENCE)).feed(2_000, Some(20));
        let started = r.first(1_000, true).expect("speaking");
        let latency = started - 1_000;
        assert!(
            (200..=400).contains(&latency),
            "started {latency} ms after the voice"
        );
        // A voice starting mid-tick: still within two ticks and a half.
        let mut r = Run::new();
        r.feed(1_100, Some(SILENCE)).feed(2_000, Some(20));
        let latency = r.first(1_100, true).expect("speaking") - 1_100;
        assert!(latency <= 500, "started {latency} ms after the voice");
        // A single click (one packet) does not, nor a short one after DTX silence.
        let mut r = Run::new();
        r.feed(1_000, Some(SILENCE))
            .feed(20, Some(10))
            .feed(2_000, Some(SILENCE));
        assert!(r.first(0, true).is_none());
        let mut r = Run::new();
        r.feed(1_000, None).feed(60, Some(10)).feed(2_000, None);
        assert!(r.first(0, true).is_none());
        // Voice after DTX silence (or after packets without a level) starts as after silence.
        let mut r = Run::new();
        r.feed(1_000, None).feed(2_000, Some(20));
        let latency = r.first(1_000, true).expect("speaking") - 1_000;
        assert!(
            (200..=400).contains(&latency),
            "started {latency} ms after the voice"
        );
    }

    #[test]
    fn a_short_pause_between_words_keeps_speaking() {
        let mut r = Run::new();
        r.feed(2_000, Some(25));
        assert!(r.speaking());
        for _ in 0..5 {
            r.feed(400, Some(SILENCE)).feed(600, Some(25));
        }
        let from = r.first(300, true).expect("speaking");
        assert!(
            r.ticks
                .iter()
                .filter(|(t, _)| *t >= from)
                .all(|(_, s)| s.is_some()),
            "flickered: {:?}",
            r.ticks
        );
        // Pauses without packets at all (DTX) too.
        let mut r = Run::new();
        r.feed(2_000, Some(25));
        for _ in 0..5 {
            r.feed(400, None).feed(600, Some(25));
            assert!(r.speaking());
        }
    }

    #[test]
    fn speaking_stops_after_silence() {
        let mut r = Run::new();
        r.feed(2_000, Some(25)).feed(3_000, Some(SILENCE));
        let stopped = r.first(2_000, false).expect("stopped") - 2_000;
        assert!(
            (600..=1_000).contains(&stopped),
            "stopped {stopped} ms after the voice"
        );
        // And without packets (DTX).
        let mut r = Run::new();
        r.feed(2_000, Some(25)).feed(3_000, None);
        let stopped = r.first(2_000, false).expect("stopped") - 2_000;
        assert!(stopped <= 1_000, "stopped {stopped} ms after the voice");
    }

    #[test]
    fn levels_rank_the_loudest_first() {
        let mut loud = Run::new();
        loud.feed(2_000, Some(10));
        let mut quiet = Run::new();
        quiet.feed(2_000, Some(35));
        let mut sparse = Run::new();
        for _ in 0..4 {
            sparse.feed(300, Some(10)).feed(200, Some(SILENCE));
        }
        let l = |r: &Run| r.ticks.last().and_then(|(_, s)| *s).expect("speaking");
        assert!(l(&loud) > l(&quiet), "{} vs {}", l(&loud), l(&quiet));
        assert!(l(&loud) > l(&sparse), "{} vs {}", l(&loud), l(&sparse));
        assert!(l(&loud) <= 1.0 && l(&quiet) > 0.0);
        let ranked = rank([
            ("PA_b".to_owned(), l(&quiet)),
            ("PA_a".to_owned(), l(&loud)),
            ("PA_c".to_owned(), l(&sparse)),
            // A second track of PA_b, louder: PA_b's level is its loudest track's.
            ("PA_b".to_owned(), l(&sparse) + 0.0001),
        ]);
        let ids: Vec<&str> = ranked.iter().map(|s| s.participant_id.as_str()).collect();
        assert_eq!(ids, ["PA_a", "PA_b", "PA_c"]);
        // Equal levels: by id.
        let ranked = rank([("PA_z".to_owned(), 0.5), ("PA_y".to_owned(), 0.5)]);
        assert_eq!(ranked[0].participant_id, "PA_y");
    }

    #[test]
    fn close_levels_keep_their_order() {
        let told = rank([("PA_a".to_owned(), 0.10), ("PA_b".to_owned(), 0.09)]);
        // PA_b a little louder now: the order stays, with the new levels.
        let next = keep_order(
            &told,
            rank([("PA_a".to_owned(), 0.10), ("PA_b".to_owned(), 0.11)]),
        );
        let ids: Vec<&str> = next.iter().map(|s| s.participant_id.as_str()).collect();
        assert_eq!(ids, ["PA_a", "PA_b"]);
        assert_eq!(next[1].level, 0.11);
        // Clearly louder: it overtakes.
        let next = keep_order(
            &told,
            rank([("PA_a".to_owned(), 0.10), ("PA_b".to_owned(), 0.2)]),
        );
        assert_eq!(next[0].participant_id, "PA_b");
        // Another set: as ranked.
        let next = keep_order(
            &told,
            rank([("PA_c".to_owned(), 0.01), ("PA_b".to_owned(), 0.2)]),
        );
        assert_eq!(next[0].participant_id, "PA_b");
        assert_eq!(next[1].participant_id, "PA_c");
    }

    #[test]
    fn only_the_set_and_order_make_a_change() {
        let a = rank([("PA_a".to_owned(), 0.5), ("PA_b".to_owned(), 0.2)]);
        let b = rank([("PA_a".to_owned(), 0.4), ("PA_b".to_owned(), 0.3)]);
        let c = rank([("PA_a".to_owned(), 0.2), ("PA_b".to_owned(), 0.3)]);
        assert!(same_speakers(&a, &b));
        assert!(!same_speakers(&a, &c));
        assert!(!same_speakers(&a, &a[..1]));
        assert!(same_speakers(&[], &[]));
    }
}
