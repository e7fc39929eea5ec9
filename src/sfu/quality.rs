//! Connection quality of a participant: what the core measures → a score → `excellent`,
//! `good`, `poor` or `lost`, with hysteresis. Pure (no sockets, no clock): the core hands a
//! [`Tracker`] what it observed and is told when the quality to report changes.
//!
//! # Inputs
//!
//! * **Silence.** Nothing at all (no RTP, no RTCP, no STUN) arrived from one of the
//!   participant's connected peer connections for [`SILENCE`]. A live client always sends
//!   something that often: its RTCP while media flows, its ICE consent checks, and its answers
//!   to the server's own keepalive checks (every 2 s). A silent participant is `lost` at once,
//!   long before its connection is declared failed (~30 s) and it is removed.
//! * **Uplink loss** (a publisher): transport-wide sequence numbers the server expected vs
//!   those that arrived, as its transport-wide feedback reports them. Retransmissions carry
//!   new transport-wide numbers, so this is the loss of the link itself, not what is left once
//!   NACKs have repaired it.
//! * **Downlink loss** (a subscriber): the same, from the subscriber's transport-wide feedback
//!   about what the server sent it. Feedback lost on the way counts the packets it covered as
//!   lost, so a lossy uplink shows in the downlink's count too (the same participant's link).
//! * **Downlink bandwidth**: the subscriber's bandwidth estimate against what its video
//!   subscriptions need: the lowest layer of each ([`Bandwidth::lowest_bps`]) and the highest
//!   ([`Bandwidth::full_bps`]).
//!
//! Loss is counted over a window of [`WINDOW`] (cumulative counters, differenced); a window
//! with fewer than [`MIN_PACKETS`] packets says nothing about loss.
//!
//! # Score
//!
//! Each link scores `100 − LOSS_WEIGHT × loss %` (2 % → 90, 6 % → 70, 10 % → 50, 15 % → 25);
//! the participant's score is the worse link's, less up to [`BANDWIDTH_PENALTY`] when the
//! estimate falls between the lowest and the full need of its video, and
//! [`STARVED_PENALTY`] when it cannot even carry the lowest layers. Quality: `excellent` from
//! [`EXCELLENT`], `good` from [`GOOD`], `poor` below, `lost` when silent.
//!
//! # Hysteresis
//!
//! A worse quality is reported at once (a user wants to know now that a link broke); a better
//! one only after [`UP_WINDOWS`] windows in a row whose score clears the threshold by
//! [`MARGIN`], so a link that hovers around a threshold does not flap. Leaving `lost` (packets
//! arrive again) is reported at once, at most `good` until the next windows show better.

use crate::signal::ConnectionQuality;
use std::time::Duration;

/// How often the core evaluates silence (and counts windows).
pub const TICK: Duration = Duration::from_millis(250);
/// Loss and bandwidth are scored over windows of this length (a whole number of ticks).
pub const WINDOW: Duration = Duration::from_secs(2);
/// Ticks per window.
pub const TICKS_PER_WINDOW: u32 = (WINDOW.as_millis() / TICK.as_millis()) as u32;
/// Nothing from a connected peer connection for this long: `lost`. An idle connection (no
/// media either way) hears from a live client every 2 s (its answers to the server's
/// keepalives): this leaves 0.75 s of jitter before a live one is taken for silent.
pub const SILENCE: Duration = Duration::from_millis(2_750);
/// A window with fewer packets than this says nothing about loss.
pub const MIN_PACKETS: u64 = 20;
/// Score points per percent of loss.
pub const LOSS_WEIGHT: f64 = 5.0;
/// Score at which `excellent` starts.
pub const EXCELLENT: u8 = 80;
/// Score at which `good` starts.
pub const GOOD: u8 = 50;
/// A better quality needs its threshold cleared by this much.
pub const MARGIN: u8 = 5;
/// … for this many windows in a row.
pub const UP_WINDOWS: u8 = 2;
/// Most taken off when the estimate lies between the lowest and the full need.
pub const BANDWIDTH_PENALTY: f64 = 25.0;
/// Taken off when the estimate cannot carry the lowest layers.
pub const STARVED_PENALTY: u8 = 40;

/// Cumulative packet counters of one link (as kept by the transport), or their difference
/// over a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub expected: u64,
    pub lost: u64,
}

impl Counts {
    /// What happened since `earlier` (a counter that went backwards counts as nothing).
    pub fn since(self, earlier: Counts) -> Counts {
        Counts {
            expected: self.expected.saturating_sub(earlier.expected),
            lost: self.lost.saturating_sub(earlier.lost),
        }
    }

    /// The loss fraction, when there were enough packets to say.
    pub fn loss(self) -> Option<f64> {
        (self.expected >= MIN_PACKETS)
            .then(|| (self.lost.min(self.expected) as f64) / self.expected as f64)
    }
}

/// A subscriber's downlink estimate and what its video subscriptions need.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bandwidth {
    pub available_bps: u64,
    /// The lowest active layer of each subscribed video track, summed.
    pub lowest_bps: u64,
    /// The highest active layer of each subscribed video track, summed.
    pub full_bps: u64,
}

/// What one window showed (loss over the window; `None`: no such link, or not measured).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Window {
    pub uplink: Option<Counts>,
    pub downlink: Option<Counts>,
    pub bandwidth: Option<Bandwidth>,
}

/// One link's score from its loss over a window (100 when nothing can be said).
pub fn link_score(c: Option<Counts>) -> u8 {
    match c.and_then(Counts::loss) {
        Some(loss) => (100.0 - LOSS_WEIGHT * loss * 100.0)
            .clamp(0.0, 100.0)
            .round() as u8,
        None => 100,
    }
}

/// Points the bandwidth takes off.
pub fn bandwidth_penalty(b: Option<Bandwidth>) -> u8 {
    let Some(b) = b else { return 0 };
    if b.full_bps == 0 || b.available_bps >= b.full_bps {
        0
    } else if b.available_bps < b.lowest_bps {
        STARVED_PENALTY
    } else {
        let span = (b.full_bps - b.lowest_bps).max(1) as f64;
        let short = (b.full_bps - b.available_bps) as f64;
        (BANDWIDTH_PENALTY * (short / span).min(1.0)).round() as u8
    }
}

/// The score of a window: the worse link, less the bandwidth penalty.
pub fn score(w: &Window) -> u8 {
    link_score(w.uplink)
        .min(link_score(w.downlink))
        .saturating_sub(bandwidth_penalty(w.bandwidth))
}

/// The quality a score means, without hysteresis (never `lost`: that is silence).
pub fn level(score: u8) -> ConnectionQuality {
    if score >= EXCELLENT {
        ConnectionQuality::Excellent
    } else if score >= GOOD {
        ConnectionQuality::Good
    } else {
        ConnectionQuality::Poor
    }
}

/// A quality to report: the participant's new quality and the score behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub quality: ConnectionQuality,
    pub score: u8,
}

/// One participant's quality over time.
#[derive(Debug, Clone, Default)]
pub struct Tracker {
    /// What the room was last told (`None`: nothing yet).
    reported: Option<ConnectionQuality>,
    /// The last window's score.
    score: Option<u8>,
    /// Windows in a row that would raise the quality, and to what.
    up: Option<(ConnectionQuality, u8)>,
    /// Cumulative counters at the start of the current window.
    uplink_at: Option<Counts>,
    downlink_at: Option<Counts>,
    /// Back from silence: the next window only sets the counters' baseline (what was sent
    /// during the silence and never arrived is reported lost when packets flow again; that
    /// is the silence, already told, not the link's loss).
    fresh: bool,
}

impl Tracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// What the room was last told.
    pub fn reported(&self) -> Option<ConnectionQuality> {
        self.reported
    }

    /// The last window's score (0 while `lost`).
    pub fn score(&self) -> u8 {
        if self.reported == Some(ConnectionQuality::Lost) {
            0
        } else {
            self.score.unwrap_or(100)
        }
    }

    /// The window of cumulative counters `uplink`/`downlink` (as the transport keeps them)
    /// since the last call; the next window starts now.
    pub fn window(
        &mut self,
        uplink: Option<Counts>,
        downlink: Option<Counts>,
        bandwidth: Option<Bandwidth>,
    ) -> Window {
        let diff = |now: Option<Counts>, at: &mut Option<Counts>| {
            let d = match (now, *at) {
                (Some(n), Some(a)) => Some(n.since(a)),
                // The link's first window: from zero (its counters started with it).
                (Some(n), None) => Some(n),
                (None, _) => None,
            };
            *at = now;
            d
        };
        let (uplink, downlink) = (
            diff(uplink, &mut self.uplink_at),
            diff(downlink, &mut self.downlink_at),
        );
        if std::mem::take(&mut self.fresh) {
            return Window {
                bandwidth,
                ..Window::default()
            };
        }
        Window {
            uplink,
            downlink,
            bandwidth,
        }
    }

    /// Every tick: whether the participant is silent (nothing arrived for [`SILENCE`] on a
    /// connected peer connection), and at the end of a window what it showed. Returns the
    /// quality to report when it changed.
    pub fn update(&mut self, silent: bool, window: Option<&Window>) -> Option<Change> {
        let lost = self.reported == Some(ConnectionQuality::Lost);
        if silent || lost {
            // A window that spans a silence says nothing of the link: the score before the
            // silence stands.
            self.fresh = true;
        } else if let Some(w) = window {
            self.score = Some(score(w));
        }
        if silent {
            self.up = None;
            return self.report(ConnectionQuality::Lost, 0);
        }
        let score = self.score.unwrap_or(100);
        let current = match self.reported {
            // Packets again: at once, at most `good` until later windows show better.
            Some(ConnectionQuality::Lost) => {
                self.up = None;
                return self.report(level(score).min(ConnectionQuality::Good), score);
            }
            Some(q) => q,
            // The first window rates the participant.
            None => {
                return match window {
                    Some(_) => self.report(level(score), score),
                    None => None,
                };
            }
        };
        window?;
        let down = level(score);
        if down < current {
            self.up = None;
            return self.report(down, score);
        }
        let up = level(score.saturating_sub(MARGIN));
        if up <= current {
            self.up = None;
            return None;
        }
        // Both windows are better than now: the lower of the two is where the climb goes.
        let (target, streak) = match self.up {
            Some((q, n)) => (q.min(up), n + 1),
            None => (up, 1),
        };
        if streak >= UP_WINDOWS {
            self.up = None;
            return self.report(target, score);
        }
        self.up = Some((target, streak));
        None
    }

    fn report(&mut self, q: ConnectionQuality, score: u8) -> Option<Change> {
        if self.reported == Some(q) {
            return None;
        }
        self.reported = Some(q);
        Some(Change { quality: q, score })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ConnectionQuality::*;

    fn counts(expected: u64, lost: u64) -> Counts {
        Counts { expected, lost }
    }

    /// A window with `pct` % loss of 200 packets on the uplink.
    fn uplink(pct: u64) -> Window {
        Window {
            uplink: Some(counts(200, 2 * pct)),
            ..Window::default()
        }
    }

    #[test]
    fn loss_scores_and_levels() {
        assert_eq!(link_score(Some(counts(200, 0))), 100);
        assert_eq!(link_score(Some(counts(200, 4))), 90);
        assert_eq!(link_score(Some(counts(200, 20))), 50);
        assert_eq!(link_score(Some(counts(200, 30))), 25);
        assert_eq!(link_score(Some(counts(200, 200))), 0);
        // Too few packets to say; more lost than expected (late duplicates) is all lost.
        assert_eq!(link_score(Some(counts(10, 10))), 100);
        assert_eq!(link_score(Some(counts(40, 50))), 0);
        assert_eq!(link_score(None), 100);
        assert_eq!(level(100), Excellent);
        assert_eq!(level(EXCELLENT), Excellent);
        assert_eq!(level(EXCELLENT - 1), Good);
        assert_eq!(level(GOOD), Good);
        assert_eq!(level(GOOD - 1), Poor);
        assert_eq!(level(0), Poor);
    }

    #[test]
    fn the_worse_link_and_the_bandwidth_decide() {
        let w = Window {
            uplink: Some(counts(200, 2)),
            downlink: Some(counts(300, 30)),
            bandwidth: None,
        };
        assert_eq!(score(&w), 50);
        let bw = |available_bps| {
            Some(Bandwidth {
                available_bps,
                lowest_bps: 200_000,
                full_bps: 2_200_000,
            })
        };
        assert_eq!(bandwidth_penalty(bw(3_000_000)), 0);
        assert_eq!(bandwidth_penalty(bw(2_200_000)), 0);
        assert_eq!(bandwidth_penalty(bw(1_200_000)), 13);
        assert_eq!(bandwidth_penalty(bw(200_000)), 25);
        assert_eq!(bandwidth_penalty(bw(100_000)), STARVED_PENALTY);
        // Nothing subscribed: nothing needed.
        assert_eq!(
            bandwidth_penalty(Some(Bandwidth {
                available_bps: 0,
                lowest_bps: 0,
                full_bps: 0
            })),
            0
        );
        let starved = Window {
            bandwidth: bw(100_000),
            ..Window::default()
        };
        assert_eq!(level(score(&starved)), Good);
    }

    #[test]
    fn windows_are_differences_of_the_counters() {
        let mut t = Tracker::new();
        let w = t.window(Some(counts(100, 5)), None, None);
        assert_eq!(w.uplink, Some(counts(100, 5)));
        assert_eq!(w.downlink, None);
        let w = t.window(Some(counts(300, 15)), Some(counts(50, 0)), None);
        assert_eq!(w.uplink, Some(counts(200, 10)));
        assert_eq!(w.downlink, Some(counts(50, 0)));
        // A new connection's counters start again: nothing negative.
        let w = t.window(Some(counts(10, 1)), Some(counts(80, 3)), None);
        assert_eq!(w.uplink, Some(counts(0, 0)));
        assert_eq!(w.downlink, Some(counts(30, 3)));
    }

    #[test]
    fn first_window_rates_then_only_changes_are_reported() {
        let mut t = Tracker::new();
        // Ticks before the first window report nothing.
        assert_eq!(t.update(false, None), None);
        assert_eq!(
            t.update(false, Some(&uplink(0))),
            Some(Change {
                quality: Excellent,
                score: 100
            })
        );
        assert_eq!(t.update(false, None), None);
        assert_eq!(t.update(false, Some(&uplink(1))), None);
        assert_eq!(t.reported(), Some(Excellent));
    }

    /// A window whose uplink scores `score`.
    fn scoring(score: u64) -> Window {
        Window {
            uplink: Some(counts(1000, (100 - score) * 2)),
            ..Window::default()
        }
    }

    #[test]
    fn worse_is_reported_at_once_better_after_two_clear_windows() {
        let mut t = Tracker::new();
        t.update(false, Some(&uplink(0)));
        let c = t.update(false, Some(&uplink(12))).expect("drops at once");
        assert_eq!((c.quality, c.score), (Poor, 40));
        // 55 clears `good` by the margin, but once is not enough.
        assert_eq!(t.update(false, Some(&scoring(55))), None);
        assert_eq!(t.update(false, None), None);
        assert_eq!(
            t.update(false, Some(&scoring(55))).map(|c| c.quality),
            Some(Good)
        );
        // Hovering around the `excellent` threshold never gets there…
        for s in [85, 80, 75, 80, 85, 80] {
            assert_eq!(t.update(false, Some(&scoring(s))), None, "score {s}");
        }
        // …a dip to the `good` threshold and back does not flap…
        assert_eq!(t.update(false, Some(&scoring(100))), None);
        assert_eq!(
            t.update(false, Some(&scoring(50))),
            None,
            "50 is still good"
        );
        assert_eq!(
            t.update(false, Some(&scoring(49))).map(|c| c.quality),
            Some(Poor)
        );
        // …nor does hovering just above it.
        for s in [50, 54, 50, 54] {
            assert_eq!(t.update(false, Some(&scoring(s))), None, "score {s}");
        }
        // Two clean windows: straight to excellent.
        assert_eq!(t.update(false, Some(&uplink(0))), None);
        assert_eq!(
            t.update(false, Some(&uplink(0))).map(|c| c.quality),
            Some(Excellent)
        );
    }

    #[test]
    fn an_interrupted_climb_starts_again() {
        let mut t = Tracker::new();
        t.update(false, Some(&uplink(20)));
        assert_eq!(t.reported(), Some(Poor));
        assert_eq!(t.update(false, Some(&uplink(0))), None);
        // Not better than poor: the streak is broken.
        assert_eq!(t.update(false, Some(&uplink(12))), None);
        assert_eq!(t.update(false, Some(&uplink(0))), None);
        assert_eq!(
            t.update(false, Some(&uplink(0))).map(|c| c.quality),
            Some(Excellent)
        );
    }

    #[test]
    fn a_climb_goes_as_high_as_both_windows_allow() {
        let mut t = Tracker::new();
        t.update(false, Some(&uplink(20)));
        assert_eq!(t.update(false, Some(&uplink(0))), None);
        // Excellent then good: good it is.
        assert_eq!(
            t.update(false, Some(&uplink(8))).map(|c| c.quality),
            Some(Good)
        );
    }

    #[test]
    fn silence_is_lost_at_once_and_recovery_is_reported_at_once() {
        let mut t = Tracker::new();
        t.update(false, Some(&uplink(0)));
        // Within a window, on the tick that finds it silent.
        assert_eq!(
            t.update(true, None),
            Some(Change {
                quality: Lost,
                score: 0
            })
        );
        assert_eq!(t.score(), 0);
        assert_eq!(t.update(true, None), None);
        assert_eq!(t.update(true, Some(&Window::default())), None);
        // Packets again: good at once, excellent after two clean windows.
        assert_eq!(t.update(false, None).map(|c| c.quality), Some(Good));
        assert_eq!(t.update(false, Some(&uplink(0))), None);
        assert_eq!(
            t.update(false, Some(&uplink(0))).map(|c| c.quality),
            Some(Excellent)
        );
    }

    #[test]
    fn the_window_after_a_silence_does_not_count_its_losses() {
        let mut t = Tracker::new();
        let w = t.window(Some(counts(300, 0)), None, None);
        t.update(false, Some(&w));
        assert_eq!(t.reported(), Some(Excellent));
        assert_eq!(t.update(true, None).map(|c| c.quality), Some(Lost));
        // Back on a window's tick whose counters hold the silence as lost: not counted.
        let w = t.window(Some(counts(1300, 700)), None, None);
        assert_eq!(t.update(false, Some(&w)).map(|c| c.quality), Some(Good));
        // Nor in the next window (its baseline only, nothing against the link).
        let w = t.window(Some(counts(1400, 760)), None, None);
        assert_eq!(w.uplink, None);
        assert_eq!(t.update(false, Some(&w)), None);
        let w = t.window(Some(counts(1700, 760)), None, None);
        assert_eq!(w.uplink, Some(counts(300, 0)));
        assert_eq!(
            t.update(false, Some(&w)).map(|c| c.quality),
            Some(Excellent)
        );
    }

    #[test]
    fn recovery_from_silence_keeps_a_bad_link_poor() {
        let mut t = Tracker::new();
        t.update(false, Some(&uplink(15)));
        assert_eq!(t.reported(), Some(Poor));
        t.update(true, None);
        assert_eq!(t.update(false, None).map(|c| c.quality), Some(Poor));
    }

    #[test]
    fn silent_before_the_first_window_is_lost() {
        let mut t = Tracker::new();
        assert_eq!(t.update(true, None).map(|c| c.quality), Some(Lost));
        // Back before any window: good (nothing known against it yet).
        assert_eq!(t.update(false, None).map(|c| c.quality), Some(Good));
    }
}
