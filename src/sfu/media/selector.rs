//! Simulcast layer selection for one subscriber's down-track of one published video track.
//!
//! Pure and socket-free: every method takes the current time as a parameter and nothing reads
//! a clock, so the whole behaviour is unit-testable with virtual time.
//!
//! # Model
//!
//! The publisher's layers are described by a slice of [`LayerInfo`], in any order (RID order
//! varies between browsers and apps). [`rank_layers`] orders them by what they carry: pixel
//! count first, then bitrate (by bitrate alone while any size is still unknown). Rank 0 is
//! [`Quality::Low`], the top rank [`Quality::High`], the middle of three [`Quality::Medium`];
//! two layers are Low and High, a single layer is High.
//!
//! A [`LayerSelector`] keeps three things:
//!
//! * **requested** ([`Requested`]): what the subscriber asked for, a maximum quality and/or the
//!   pixel size of the element it renders into. The *requested layer* is the smallest layer
//!   whose width and height cover the rendered size (or the biggest if none does), capped by
//!   the maximum quality; the lowest layer is always allowed. A rendered size of 0 (hidden
//!   element) *pauses* the down-track: no target, no current, every packet dropped.
//! * **target**: the highest *active* layer at or below the requested layer whose bitrate fits
//!   the available bandwidth with [`HEADROOM_PERCENT`] headroom. If nothing fits, the lowest
//!   active layer (never nothing: audio is protected by the core separately). If no layer at
//!   or below the requested one is active, the nearest active layer above it.
//! * **current**: the layer being forwarded. It becomes the target only at a keyframe of the
//!   target layer; until then the current layer keeps flowing, except after an *urgent*
//!   downgrade: when the bandwidth falls below half the current layer's bitrate
//!   ([`URGENT_PERCENT`]), the current layer stops at once (current = `None`) and the
//!   subscriber waits for the lower layer's keyframe. Behind such a bottleneck most of the
//!   current layer would be lost anyway; flowing on, it would only fill the bottleneck's queue
//!   ahead of that keyframe and of the audio.
//!
//! # Hysteresis
//!
//! The selector remembers, per layer, whether a bandwidth estimate ever showed it not to fit
//! and since when it has fitted continuously. Going *down* happens on the first estimate
//! (via [`LayerSelector::update`]) on which the target does not fit. Going *up* to a layer
//! that failed to fit at some point requires it to have fitted on every estimate for
//! `up_hold` ([`DEFAULT_UP_HOLD`], 3 s); a layer that never failed to fit is taken at once.
//! So after a bandwidth downgrade nothing above the new target is chosen again for at least
//! `up_hold`, and an oscillating estimate cannot make the target flap.
//!
//! The estimate itself does not grow into a higher layer (it is capped just above what is
//! delivered, see [`crate::sfu::bwe`]): the way up is a *probe*. When [`LayerSelector::next_up`]
//! names a layer above the target, the core probes the subscriber's link with padding
//! ([`crate::sfu::probe`]); a successful probe raises the estimate and calls
//! [`LayerSelector::probe_succeeded`], which lifts the hold, so the next
//! [`update`](LayerSelector::update) steps up at once. A failed probe moves nothing. Requested-preference
//! changes ([`LayerSelector::set_requested`]) apply immediately, within what the bandwidth
//! allows under the same rule. Losing a layer (the publisher stopped it: `active == false`)
//! moves the target at once, up or down, without any hold.
//!
//! # How the core drives it
//!
//! Per down-track (subscriber × video track) keep one [`LayerSelector`]; per published layer
//! keep one [`BitrateMeter`].
//!
//! * **Every RTP packet of the track** (layer `id`, `keyframe` = this packet *starts* a
//!   keyframe, e.g. [`super::vp8::is_keyframe`]): first `meter.add(now, len)` for its layer,
//!   then for each subscriber `selector.on_packet(id, keyframe, now)`:
//!   [`PacketAction::Drop`] means the packet never touches that down-track's rewriter;
//!   `Forward { switched: true }` means this is the first packet of a new layer: force the
//!   rewriter to re-base (`Rewriter::force_switch` before `rewrite`, so it works even when the
//!   SSRC did not change, e.g. resume after a pause) and send `layer_changed`
//!   ([`LayerSelector::current_quality`]).
//! * **Periodically (e.g. every 100–500 ms) and on every bandwidth estimate**: build the
//!   `LayerInfo`s from the meters (`bitrate_bps` = [`BitrateMeter::bps`] while the layer is
//!   active, else [`BitrateMeter::last_active_bps`]; `active` = [`BitrateMeter::is_active`];
//!   keep the last width/height seen in a keyframe, do not reset them when a layer pauses),
//!   and call `selector.update(&layers, available_bps, now)`.
//! * **On a subscriber's preference** (quality / rendered size): `set_requested`.
//! * **After any of these** (cheap): if [`LayerSelector::wants_keyframe`] is `Some(layer)`,
//!   ask for a PLI of that layer through the per-layer throttle (`super::keyframe`); the
//!   selector does not throttle. When `current()` became `None` (pause), stop forwarding.
//! * **Dynacast**: [`needed_layers`] over all selectors of a track gives the layers someone
//!   needs (target, current, or the one it would pick if every layer were active); the others
//!   can be paused upstream.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::signal::Quality;

/// How long a layer that once failed to fit the bandwidth must fit continuously before the
/// selector moves up to it again.
pub const DEFAULT_UP_HOLD: Duration = Duration::from_secs(3);

/// Bandwidth headroom: a layer fits when `bitrate × HEADROOM_PERCENT / 100 ≤ available`.
pub const HEADROOM_PERCENT: u64 = 110;

/// An *urgent* downgrade: when the bandwidth falls so far that the current layer's bitrate is
/// more than `URGENT_PERCENT / 100` times the available bandwidth (and the target is a lower
/// layer), the current layer stops at once instead of flowing until the target's keyframe.
/// Behind such a bottleneck it would be mostly lost anyway, while filling the queue ahead of the
/// lower layer's keyframe (and of the audio).
pub const URGENT_PERCENT: u64 = 200;

/// Width of the sliding window of a [`BitrateMeter`]; also how long after its last packet a
/// layer still counts as active.
pub const METER_WINDOW: Duration = Duration::from_secs(1);

/// Number of buckets of a [`BitrateMeter`] window.
const METER_BUCKETS: usize = 10;

/// Length of one [`BitrateMeter`] bucket in nanoseconds (`METER_WINDOW / METER_BUCKETS`).
const BUCKET_NANOS: u64 = METER_WINDOW.as_nanos() as u64 / METER_BUCKETS as u64;

/// One simulcast layer of a published video track, as the core measures it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LayerInfo {
    /// Stable index of the layer, assigned by the core (not a rank).
    pub id: usize,
    /// Frame width in pixels; 0 if not known yet.
    pub width: u32,
    /// Frame height in pixels; 0 if not known yet.
    pub height: u32,
    /// Bitrate measured over the last ~1 s; for an inactive layer, the last rate measured
    /// while it was active ([`BitrateMeter::last_active_bps`]).
    pub bitrate_bps: u64,
    /// Whether packets of the layer were seen in the last ~1 s.
    pub active: bool,
}

impl LayerInfo {
    /// Whether both dimensions are known.
    pub fn size_known(&self) -> bool {
        self.width > 0 && self.height > 0
    }

    /// Pixel count (0 if the size is unknown).
    pub fn pixels(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }
}

/// A layer's place in the ranking made by [`rank_layers`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankedLayer {
    /// [`LayerInfo::id`] of the layer.
    pub id: usize,
    /// Position of the layer in the slice given to [`rank_layers`].
    pub index: usize,
    /// Quality of the layer's rank.
    pub quality: Quality,
}

/// Quality of rank `rank` (0 = lowest) among `count` layers: the top one is High, rank 0 of
/// several is Low, anything in between is Medium (so two layers are Low and High, a single
/// layer is High).
pub fn quality_for_rank(rank: usize, count: usize) -> Quality {
    if rank.saturating_add(1) >= count {
        Quality::High
    } else if rank == 0 {
        Quality::Low
    } else {
        Quality::Medium
    }
}

/// Ranks layers by what they carry, lowest first, whatever their order in the slice: by
/// pixel count then bitrate when every size is known, by bitrate alone otherwise (ties by id,
/// so the order is total and deterministic).
pub fn rank_layers(layers: &[LayerInfo]) -> Vec<RankedLayer> {
    let sizes_known = layers.iter().all(LayerInfo::size_known);
    let mut order: Vec<(usize, &LayerInfo)> = layers.iter().enumerate().collect();
    order.sort_by_key(|(_, l)| {
        let pixels = if sizes_known { l.pixels() } else { 0 };
        (pixels, l.bitrate_bps, l.id)
    });
    let count = order.len();
    order
        .into_iter()
        .enumerate()
        .map(|(rank, (index, l))| RankedLayer {
            id: l.id,
            index,
            quality: quality_for_rank(rank, count),
        })
        .collect()
}

/// Quality of the layer `id` among `layers` (see [`rank_layers`]); `None` if it is not there.
pub fn layer_quality(layers: &[LayerInfo], id: usize) -> Option<Quality> {
    rank_layers(layers)
        .into_iter()
        .find(|r| r.id == id)
        .map(|r| r.quality)
}

/// What a subscriber asked for, for one video track. `None` fields mean "no limit".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Requested {
    /// Highest quality wanted.
    pub max_quality: Option<Quality>,
    /// Width of the element the video renders into, in pixels (0 = hidden: pause).
    pub width: Option<u32>,
    /// Height of the element the video renders into, in pixels (0 = hidden: pause).
    pub height: Option<u32>,
}

impl Requested {
    /// The request after a `track_settings` (or the WHEP layer extension) on top of this one:
    /// `quality` absent keeps the cap alongside a new size (and removes it without one),
    /// `null` removes it, a value sets it; a size given (width or height) replaces both
    /// dimensions, none keeps them.
    pub fn updated(
        self,
        quality: Option<Option<Quality>>,
        width: Option<u32>,
        height: Option<u32>,
    ) -> Self {
        let size_given = width.is_some() || height.is_some();
        Requested {
            max_quality: match quality {
                Some(q) => q,
                None if size_given => self.max_quality,
                None => None,
            },
            width: if size_given { width } else { self.width },
            height: if size_given { height } else { self.height },
        }
    }

    /// Whether the rendered size is zero (hidden element): forward nothing.
    pub fn is_paused(&self) -> bool {
        self.width == Some(0) || self.height == Some(0)
    }
}

/// Rank (index into `ranked`) of the requested layer; `None` when paused or without layers.
fn requested_rank(layers: &[LayerInfo], ranked: &[RankedLayer], req: &Requested) -> Option<usize> {
    if req.is_paused() || ranked.is_empty() {
        return None;
    }
    let top = ranked.len() - 1;
    let cap = match req.max_quality {
        None => top,
        // Qualities never decrease with rank; the lowest layer is always allowed.
        Some(q) => ranked.iter().rposition(|r| r.quality <= q).unwrap_or(0),
    };
    if req.width.is_none() && req.height.is_none() {
        return Some(cap);
    }
    let covering = ranked.iter().take(cap + 1).position(|r| {
        layers.get(r.index).is_some_and(|l| {
            l.size_known()
                && req.width.is_none_or(|w| l.width >= w)
                && req.height.is_none_or(|h| l.height >= h)
        })
    });
    Some(covering.unwrap_or(cap))
}

/// What to do with one packet, for one down-track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PacketAction {
    /// Forward the packet (through the down-track's rewriter).
    Forward {
        /// First packet of a new current layer (always a keyframe): re-base the rewriter
        /// and the VP8 munger, and tell the subscriber which layer it now gets.
        switched: bool,
    },
    /// Not for this down-track: do not forward, do not show it to the rewriter.
    Drop,
}

impl PacketAction {
    /// Whether the packet is to be forwarded.
    pub fn is_forward(&self) -> bool {
        matches!(self, PacketAction::Forward { .. })
    }
}

/// Bandwidth history of one layer, for hysteresis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FitState {
    id: usize,
    /// Last estimate on which the layer did not fit.
    last_fail: Option<Instant>,
    /// First estimate of the current run of estimates on which it fitted.
    ok_since: Option<Instant>,
}

/// Layer selection for one subscriber's down-track of one video track; see the module docs.
#[derive(Debug, Clone)]
pub struct LayerSelector {
    up_hold: Duration,
    requested: Requested,
    available_bps: Option<u64>,
    target: Option<usize>,
    current: Option<usize>,
    desired: Option<usize>,
    fit: Vec<FitState>,
    pending_since: Option<Instant>,
    last_switch_wait: Option<Duration>,
}

impl Default for LayerSelector {
    fn default() -> Self {
        Self::new(Requested::default())
    }
}

impl LayerSelector {
    /// A selector with the subscriber's initial preference, no layer yet and unknown
    /// bandwidth. Call [`update`](Self::update) with the layers before the first packet.
    pub fn new(requested: Requested) -> Self {
        LayerSelector {
            up_hold: DEFAULT_UP_HOLD,
            requested,
            available_bps: None,
            target: None,
            current: None,
            desired: None,
            fit: Vec::new(),
            pending_since: None,
            last_switch_wait: None,
        }
    }

    /// Sets how long a layer that once failed to fit must fit before moving up to it.
    pub fn with_up_hold(mut self, up_hold: Duration) -> Self {
        self.up_hold = up_hold;
        self
    }

    /// The configured up-switch hold.
    pub fn up_hold(&self) -> Duration {
        self.up_hold
    }

    /// What the subscriber asked for.
    pub fn requested(&self) -> Requested {
        self.requested
    }

    /// The last available bandwidth given to [`update`](Self::update).
    pub fn available_bps(&self) -> Option<u64> {
        self.available_bps
    }

    /// Whether the subscriber paused the track (rendered size 0).
    pub fn is_paused(&self) -> bool {
        self.requested.is_paused()
    }

    /// The layer the selector wants to forward (`None`: paused, or no layer known).
    pub fn target(&self) -> Option<usize> {
        self.target
    }

    /// The layer being forwarded (`None`: nothing forwarded yet, or paused).
    pub fn current(&self) -> Option<usize> {
        self.current
    }

    /// The layer the selector would target if every layer were active (a paused upstream
    /// layer included): what this subscriber needs from the publisher, for dynacast.
    pub fn desired(&self) -> Option<usize> {
        self.desired
    }

    /// The layer whose keyframe is awaited (target ≠ current): the core should request a
    /// keyframe (PLI) of it, through its per-layer throttle.
    pub fn wants_keyframe(&self) -> Option<usize> {
        match self.target {
            Some(t) if self.current != Some(t) => Some(t),
            _ => None,
        }
    }

    /// Since when the current target has been awaited (`None` if target = current).
    pub fn pending_since(&self) -> Option<Instant> {
        self.pending_since
    }

    /// How long the last switch waited for its keyframe, from the moment its layer became
    /// the target (a latency metric).
    pub fn last_switch_wait(&self) -> Option<Duration> {
        self.last_switch_wait
    }

    /// Quality of the current layer among `layers` (for `layer_changed`).
    pub fn current_quality(&self, layers: &[LayerInfo]) -> Option<Quality> {
        self.current.and_then(|id| layer_quality(layers, id))
    }

    /// Quality of the target layer among `layers`.
    pub fn target_quality(&self, layers: &[LayerInfo]) -> Option<Quality> {
        self.target.and_then(|id| layer_quality(layers, id))
    }

    /// New layer measurements and/or bandwidth estimate (`None` = unknown, no constraint).
    /// Recomputes the target; returns whether it changed. Changes `current` only on an urgent
    /// downgrade (see [`URGENT_PERCENT`]): it becomes `None` (nothing is forwarded) until the
    /// target's keyframe.
    pub fn update(
        &mut self,
        layers: &[LayerInfo],
        available_bps: Option<u64>,
        now: Instant,
    ) -> bool {
        self.available_bps = available_bps;
        self.fit.retain(|s| layers.iter().any(|l| l.id == s.id));
        for l in layers {
            let fits = self.fits(l);
            let state = match self.fit.iter().position(|s| s.id == l.id) {
                Some(i) => &mut self.fit[i],
                None => {
                    self.fit.push(FitState {
                        id: l.id,
                        last_fail: None,
                        ok_since: None,
                    });
                    let last = self.fit.len() - 1;
                    &mut self.fit[last]
                }
            };
            if fits {
                state.ok_since.get_or_insert(now);
            } else {
                state.last_fail = Some(now);
                state.ok_since = None;
            }
        }
        let changed = self.retarget(layers, now);
        if self.urgent(layers) {
            self.current = None;
        }
        changed
    }

    /// The layer above the target the subscriber would get if its bandwidth allowed: the
    /// lowest layer ranked above the target, at or below the requested one, that has a
    /// bitrate (active, or paused upstream after it was: dynacast resumes it once the
    /// bandwidth is there). `None` when the target is already the best wanted (or paused, or
    /// no layers).
    pub fn next_up(&self, layers: &[LayerInfo]) -> Option<usize> {
        let target = self.target?;
        let ranked = rank_layers(layers);
        let ceiling = requested_rank(layers, &ranked, &self.requested)?;
        let t = ranked.iter().position(|r| r.id == target)?;
        ranked
            .iter()
            .enumerate()
            .skip(t + 1)
            .take_while(|(k, _)| *k <= ceiling)
            .find(|(_, r)| layers.get(r.index).is_some_and(|l| l.bitrate_bps > 0))
            .map(|(_, r)| r.id)
    }

    /// A probe showed the link carrying more: forget which layers failed to fit, so the next
    /// [`update`](Self::update) takes whatever fits the new estimate at once (no `up_hold`).
    pub fn probe_succeeded(&mut self) {
        for s in &mut self.fit {
            s.last_fail = None;
        }
    }

    /// Whether the current layer is so far over the bandwidth that it should stop before the
    /// (lower) target's keyframe arrives.
    fn urgent(&self, layers: &[LayerInfo]) -> bool {
        let (Some(cur), Some(target), Some(avail)) =
            (self.current, self.target, self.available_bps)
        else {
            return false;
        };
        if cur == target {
            return false;
        }
        let ranked = rank_layers(layers);
        let rank = |id| ranked.iter().position(|r| r.id == id);
        let (Some(cur_rank), Some(target_rank)) = (rank(cur), rank(target)) else {
            return false;
        };
        let Some(l) = layers.iter().find(|l| l.id == cur) else {
            return false;
        };
        target_rank < cur_rank
            && u128::from(l.bitrate_bps) * 100 > u128::from(avail) * u128::from(URGENT_PERCENT)
    }

    /// The subscriber changed its preference: applies at once (no hold), within what the
    /// last bandwidth estimate allows. A rendered size of 0 pauses: target and current
    /// become `None`. Returns whether the target changed.
    pub fn set_requested(
        &mut self,
        requested: Requested,
        layers: &[LayerInfo],
        now: Instant,
    ) -> bool {
        self.requested = requested;
        if requested.is_paused() {
            self.current = None;
        }
        self.retarget(layers, now)
    }

    /// Forget the layer being sent and start again at the next keyframe of the target (after
    /// a pause of the source, e.g. an unmute: what the receiver had is stale). Requested,
    /// bandwidth and hysteresis state are kept. Returns whether the target changed.
    pub fn restart(&mut self, layers: &[LayerInfo], now: Instant) -> bool {
        self.current = None;
        let changed = self.retarget(layers, now);
        if !changed && self.target.is_some() {
            self.pending_since = Some(now);
        }
        changed
    }

    /// One packet of layer `layer` arrived; `keyframe` = it is the first packet of a
    /// keyframe. Switches current to the target at the target's keyframe.
    pub fn on_packet(&mut self, layer: usize, keyframe: bool, now: Instant) -> PacketAction {
        if keyframe && self.target == Some(layer) && self.current != Some(layer) {
            self.current = Some(layer);
            self.last_switch_wait = self
                .pending_since
                .take()
                .map(|t| now.saturating_duration_since(t));
            return PacketAction::Forward { switched: true };
        }
        if self.current == Some(layer) {
            PacketAction::Forward { switched: false }
        } else {
            PacketAction::Drop
        }
    }

    fn fits(&self, l: &LayerInfo) -> bool {
        match self.available_bps {
            None => true,
            Some(a) => {
                u128::from(l.bitrate_bps) * u128::from(HEADROOM_PERCENT) <= u128::from(a) * 100
            }
        }
    }

    /// Whether moving up to layer `id` is allowed by the bandwidth history: it never failed
    /// to fit, or it has fitted continuously for `up_hold`.
    fn proven(&self, id: usize, now: Instant) -> bool {
        match self.fit.iter().find(|s| s.id == id) {
            None => true,
            Some(s) => {
                s.last_fail.is_none()
                    || s.ok_since
                        .is_some_and(|t| now.saturating_duration_since(t) >= self.up_hold)
            }
        }
    }

    fn retarget(&mut self, layers: &[LayerInfo], now: Instant) -> bool {
        let ranked = rank_layers(layers);
        let (target, desired) = match requested_rank(layers, &ranked, &self.requested) {
            None => (None, None),
            Some(ceiling) => {
                let desired = self.choose(layers, &ranked, ceiling, self.desired, false, now);
                // No active layer at all (mute, or nothing received yet): aim at what
                // would be chosen if they were.
                let target = self
                    .choose(layers, &ranked, ceiling, self.target, true, now)
                    .or(desired);
                (target, desired)
            }
        };
        self.desired = desired;
        if target == self.target {
            return false;
        }
        self.target = target;
        self.pending_since = match target {
            Some(_) if target != self.current => Some(now),
            _ => None,
        };
        true
    }

    /// The best layer at or below rank `ceiling` (see the module docs). `baseline` is the
    /// previous choice: moving to it or below needs only the bandwidth to fit now; moving
    /// above it needs the layer to be [`proven`](Self::proven).
    fn choose(
        &self,
        layers: &[LayerInfo],
        ranked: &[RankedLayer],
        ceiling: usize,
        baseline: Option<usize>,
        only_active: bool,
        now: Instant,
    ) -> Option<usize> {
        let layer = |k: usize| ranked.get(k).and_then(|r| layers.get(r.index));
        let candidate = |k: &usize| layer(*k).is_some_and(|l| !only_active || l.active);
        let (lo, hi) = if (0..=ceiling).any(|k| candidate(&k)) {
            (0, ceiling)
        } else {
            let k = (ceiling + 1..ranked.len()).find(candidate)?;
            (k, k)
        };
        let baseline = baseline.and_then(|id| ranked.iter().position(|r| r.id == id));
        let allowed = |k: &usize| {
            layer(*k).is_some_and(|l| {
                self.fits(l) && (baseline.is_some_and(|b| *k <= b) || self.proven(l.id, now))
            })
        };
        (lo..=hi)
            .rev()
            .filter(candidate)
            .find(allowed)
            .or_else(|| (lo..=hi).find(candidate))
            .and_then(|k| ranked.get(k))
            .map(|r| r.id)
    }
}

/// The layers some subscriber of a track needs: the target, current and desired layer of
/// every selector. Layers not in the set can be paused upstream (dynacast).
pub fn needed_layers<'a, I>(selectors: I) -> BTreeSet<usize>
where
    I: IntoIterator<Item = &'a LayerSelector>,
{
    selectors
        .into_iter()
        .flat_map(|s| [s.target, s.current, s.desired])
        .flatten()
        .collect()
}

/// One bucket of a [`BitrateMeter`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Bucket {
    /// Absolute bucket number since the meter's origin.
    number: u64,
    bytes: u64,
}

/// Bytes received over a sliding [`METER_WINDOW`] (1 s, in 100 ms buckets), with virtual
/// time. Keep one per published layer: [`bps`](Self::bps) gives [`LayerInfo::bitrate_bps`]
/// and [`is_active`](Self::is_active) gives [`LayerInfo::active`].
#[derive(Debug, Clone, Default)]
pub struct BitrateMeter {
    origin: Option<Instant>,
    buckets: [Bucket; METER_BUCKETS],
    /// Latest time seen (calls with an earlier time count at this one).
    newest: Option<Instant>,
    last_packet: Option<Instant>,
    /// Start of the current run of packets (no gap of a whole window), so a stream that
    /// just started or resumed is not under-reported during its first window.
    run_start: Option<Instant>,
    /// The bucket of the last packet: when it ends, and its slot. A packet before then
    /// (almost every one: a bucket holds 100 ms of them) only adds its bytes.
    current: Option<(Instant, usize)>,
}

impl BitrateMeter {
    /// An empty meter.
    pub fn new() -> Self {
        Self::default()
    }

    fn clamp(&self, now: Instant) -> Instant {
        match self.newest {
            Some(n) if n > now => n,
            _ => now,
        }
    }

    /// (In 64 bits, which last 584 years: a division by a constant, not a 128-bit one, on
    /// every packet.)
    fn elapsed_nanos(origin: Instant, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(origin).as_nanos()).unwrap_or(u64::MAX)
    }

    fn bucket_number(origin: Instant, t: Instant) -> u64 {
        Self::elapsed_nanos(origin, t) / BUCKET_NANOS
    }

    /// A packet of `bytes` bytes arrived at `now`.
    pub fn add(&mut self, now: Instant, bytes: usize) {
        let now = self.clamp(now);
        if let Some((_, slot)) = self.current.filter(|&(end, _)| now < end) {
            // In the last packet's bucket, so in its run too.
            if let Some(b) = self.buckets.get_mut(slot) {
                b.bytes = b.bytes.saturating_add(bytes as u64);
            }
            self.newest = Some(now);
            self.last_packet = Some(now);
            return;
        }
        let origin = *self.origin.get_or_insert(now);
        let new_run = self
            .last_packet
            .is_none_or(|lp| now.saturating_duration_since(lp) >= METER_WINDOW);
        if new_run {
            self.run_start = Some(now);
        }
        let number = Self::bucket_number(origin, now);
        let slot = (number % METER_BUCKETS as u64) as usize;
        if let Some(b) = self.buckets.get_mut(slot) {
            if b.number != number {
                *b = Bucket { number, bytes: 0 };
            }
            b.bytes = b.bytes.saturating_add(bytes as u64);
        }
        let end = number
            .checked_add(1)
            .and_then(|n| n.checked_mul(BUCKET_NANOS))
            .and_then(|n| origin.checked_add(Duration::from_nanos(n)));
        self.current = end.map(|end| (end, slot));
        self.newest = Some(now);
        self.last_packet = Some(now);
    }

    /// Bitrate over the last [`METER_WINDOW`] (over the time since the stream started or
    /// resumed, if that is shorter, but at least one 100 ms bucket).
    pub fn bps(&self, now: Instant) -> u64 {
        let (Some(origin), Some(run_start)) = (self.origin, self.run_start) else {
            return 0;
        };
        let now = self.clamp(now);
        let current = Self::bucket_number(origin, now);
        let bytes = self
            .buckets
            .iter()
            .filter(|b| b.number <= current && b.number + (METER_BUCKETS as u64) > current)
            .fold(0u64, |acc, b| acc.saturating_add(b.bytes));
        if bytes == 0 {
            return 0;
        }
        // The buckets summed span from the start of the oldest one to `now`.
        let into_bucket = Self::elapsed_nanos(origin, now) % BUCKET_NANOS;
        let window = (METER_BUCKETS as u64 - 1) * BUCKET_NANOS + into_bucket;
        let run = Self::elapsed_nanos(run_start, now);
        let span = u128::from(window.min(run).max(BUCKET_NANOS));
        let bps = u128::from(bytes) * 8 * 1_000_000_000 / span;
        u64::try_from(bps).unwrap_or(u64::MAX)
    }

    /// When the last packet arrived.
    pub fn last_packet(&self) -> Option<Instant> {
        self.last_packet
    }

    /// Whether a packet arrived within the last [`METER_WINDOW`].
    pub fn is_active(&self, now: Instant) -> bool {
        self.last_packet
            .is_some_and(|lp| self.clamp(now).saturating_duration_since(lp) < METER_WINDOW)
    }

    /// The bitrate measured when the last packet arrived: what an inactive (paused) layer
    /// should report as [`LayerInfo::bitrate_bps`], so the bandwidth it would need when it
    /// resumes is still known.
    pub fn last_active_bps(&self) -> u64 {
        // Nothing has changed the buckets since that packet: the rate then is the rate
        // measured at its time.
        self.last_packet.map_or(0, |lp| self.bps(lp))
    }
}

#[cfg(test)]
// Tests pick an arbitrary origin for their virtual time (and may share test state).
#[allow(clippy::disallowed_methods, clippy::disallowed_types)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_updated_like_track_settings_says() {
        let r = Requested::default().updated(Some(Some(Quality::Low)), None, None);
        assert_eq!(r.max_quality, Some(Quality::Low));
        // A size alone keeps the cap; quality absent without a size removes it.
        let r = r.updated(None, Some(640), Some(360));
        assert_eq!(
            (r.max_quality, r.width, r.height),
            (Some(Quality::Low), Some(640), Some(360))
        );
        let r2 = r.updated(None, None, None);
        assert_eq!((r2.max_quality, r2.width), (None, Some(640)));
        // `null` removes the cap and keeps the size.
        let r3 = r.updated(Some(None), None, None);
        assert_eq!((r3.max_quality, r3.height), (None, Some(360)));
    }

    const Q: usize = 7;
    const H: usize = 3;
    const F: usize = 5;

    fn ms(base: Instant, n: u64) -> Instant {
        base + Duration::from_millis(n)
    }

    fn layer(id: usize, width: u32, height: u32, bitrate_bps: u64) -> LayerInfo {
        LayerInfo {
            id,
            width,
            height,
            bitrate_bps,
            active: true,
        }
    }

    /// Three layers, deliberately neither in id order nor in rank order.
    fn three() -> Vec<LayerInfo> {
        vec![
            layer(H, 640, 360, 500_000),
            layer(F, 1280, 720, 1_500_000),
            layer(Q, 320, 180, 150_000),
        ]
    }

    fn set_active(layers: &mut [LayerInfo], id: usize, active: bool) {
        for l in layers.iter_mut().filter(|l| l.id == id) {
            l.active = active;
        }
    }

    fn req(max_quality: Option<Quality>, width: Option<u32>, height: Option<u32>) -> Requested {
        Requested {
            max_quality,
            width,
            height,
        }
    }

    fn size(width: u32, height: u32) -> Requested {
        req(None, Some(width), Some(height))
    }

    /// A selector that has settled on `layer` as current.
    fn forwarding(layers: &[LayerInfo], bw: Option<u64>, now: Instant) -> LayerSelector {
        let mut s = LayerSelector::default();
        s.update(layers, bw, now);
        let t = s.target().expect("a target");
        assert_eq!(
            s.on_packet(t, true, now),
            PacketAction::Forward { switched: true }
        );
        s
    }

    fn fwd(switched: bool) -> PacketAction {
        PacketAction::Forward { switched }
    }

    #[test]
    fn ranking_is_independent_of_slice_order() {
        let base = three();
        let perms = [
            [0, 1, 2],
            [0, 2, 1],
            [1, 0, 2],
            [1, 2, 0],
            [2, 0, 1],
            [2, 1, 0],
        ];
        for p in perms {
            let layers: Vec<LayerInfo> = p.iter().map(|&i| base[i]).collect();
            let ranked: Vec<(usize, Quality)> = rank_layers(&layers)
                .iter()
                .map(|r| (r.id, r.quality))
                .collect();
            assert_eq!(
                ranked,
                vec![(Q, Quality::Low), (H, Quality::Medium), (F, Quality::High)]
            );
            for r in rank_layers(&layers) {
                assert_eq!(layers[r.index].id, r.id);
            }
            assert_eq!(layer_quality(&layers, H), Some(Quality::Medium));
            assert_eq!(layer_quality(&layers, 99), None);
        }
    }

    #[test]
    fn ranking_uses_pixels_first_then_bitrate() {
        // A bigger layer ranks higher even if its bitrate is momentarily lower.
        let layers = [layer(0, 1280, 720, 100_000), layer(1, 320, 180, 900_000)];
        let ids: Vec<usize> = rank_layers(&layers).iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![1, 0]);
        // Same size: bitrate decides.
        let layers = [layer(0, 640, 360, 900_000), layer(1, 640, 360, 100_000)];
        let ids: Vec<usize> = rank_layers(&layers).iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![1, 0]);
        // A size still unknown: bitrate decides for all.
        let layers = [
            layer(0, 0, 0, 1_200_000),
            layer(1, 320, 180, 150_000),
            layer(2, 640, 0, 400_000),
        ];
        let ids: Vec<usize> = rank_layers(&layers).iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![1, 2, 0]);
    }

    #[test]
    fn qualities_for_one_two_and_three_layers() {
        assert_eq!(quality_for_rank(0, 1), Quality::High);
        assert_eq!(quality_for_rank(0, 2), Quality::Low);
        assert_eq!(quality_for_rank(1, 2), Quality::High);
        assert_eq!(quality_for_rank(0, 3), Quality::Low);
        assert_eq!(quality_for_rank(1, 3), Quality::Medium);
        assert_eq!(quality_for_rank(2, 3), Quality::High);
        assert_eq!(quality_for_rank(usize::MAX, 3), Quality::High);
        assert!(rank_layers(&[]).is_empty());
        let two = [layer(1, 1280, 720, 1_000_000), layer(0, 640, 360, 300_000)];
        let q: Vec<Quality> = rank_layers(&two).iter().map(|r| r.quality).collect();
        assert_eq!(q, vec![Quality::Low, Quality::High]);
    }

    #[test]
    fn requested_quality_caps_the_target() {
        let t0 = Instant::now();
        let layers = three();
        for (max, want) in [
            (Some(Quality::Low), Q),
            (Some(Quality::Medium), H),
            (Some(Quality::High), F),
            (None, F),
        ] {
            let mut s = LayerSelector::new(req(max, None, None));
            s.update(&layers, None, t0);
            assert_eq!(s.target(), Some(want), "max {max:?}");
        }
        // Two layers (Low, High): a Medium cap gives Low.
        let two = [layer(0, 1280, 720, 1_000_000), layer(1, 640, 360, 300_000)];
        let mut s = LayerSelector::new(req(Some(Quality::Medium), None, None));
        s.update(&two, None, t0);
        assert_eq!(s.target(), Some(1));
        assert_eq!(s.target_quality(&two), Some(Quality::Low));
    }

    #[test]
    fn rendered_size_selects_the_smallest_layer_covering_it() {
        let t0 = Instant::now();
        let layers = three();
        for (r, want) in [
            (size(300, 170), Q),
            (size(320, 180), Q),
            (size(321, 180), H),
            (size(320, 181), H),
            (size(640, 360), H),
            (size(641, 360), F),
            (size(1920, 1080), F), // nothing covers it: the biggest
            (req(None, Some(500), None), H),
            (req(None, None, Some(400)), F),
            // Capped by the maximum quality.
            (req(Some(Quality::Medium), Some(1280), Some(720)), H),
            (req(Some(Quality::Low), Some(1280), Some(720)), Q),
        ] {
            let mut s = LayerSelector::new(r);
            s.update(&layers, None, t0);
            assert_eq!(s.target(), Some(want), "{r:?}");
        }
        // Sizes unknown: the biggest (within the cap).
        let unsized_layers: Vec<LayerInfo> = three()
            .into_iter()
            .map(|l| LayerInfo {
                width: 0,
                height: 0,
                ..l
            })
            .collect();
        let mut s = LayerSelector::new(size(100, 100));
        s.update(&unsized_layers, None, t0);
        assert_eq!(s.target(), Some(F));
    }

    #[test]
    fn bandwidth_selects_the_highest_layer_that_fits() {
        let t0 = Instant::now();
        let layers = three();
        for (bw, want) in [
            (None, F),
            (Some(10_000_000), F),
            (Some(1_650_000), F), // 1.5 M × 1.1 exactly
            (Some(1_649_999), H),
            (Some(550_000), H),
            (Some(549_999), Q),
            (Some(165_000), Q),
            (Some(100_000), Q), // nothing fits: keep the lowest rather than nothing
            (Some(0), Q),
        ] {
            let mut s = LayerSelector::default();
            s.update(&layers, bw, t0);
            assert_eq!(s.target(), Some(want), "bw {bw:?}");
            assert_eq!(s.available_bps(), bw);
        }
        // Never above the requested layer, however much bandwidth.
        let mut s = LayerSelector::new(req(Some(Quality::Medium), None, None));
        s.update(&layers, Some(100_000_000), t0);
        assert_eq!(s.target(), Some(H));
    }

    #[test]
    fn downgrade_happens_on_the_first_bad_estimate() {
        let t0 = Instant::now();
        let layers = three();
        let mut s = forwarding(&layers, Some(5_000_000), t0);
        assert_eq!(s.current(), Some(F));
        // Plenty for a while, then one estimate below the top layer.
        for i in 1..=10 {
            assert!(!s.update(&layers, Some(5_000_000), ms(t0, i * 100)));
        }
        assert!(s.update(&layers, Some(1_000_000), ms(t0, 1_100)));
        assert_eq!(s.target(), Some(H));
        assert_eq!(s.wants_keyframe(), Some(H));
        assert_eq!(s.pending_since(), Some(ms(t0, 1_100)));
        // Straight to the lowest if that is all that fits.
        assert!(s.update(&layers, Some(200_000), ms(t0, 1_200)));
        assert_eq!(s.target(), Some(Q));
        assert_eq!(s.wants_keyframe(), Some(Q));
        assert_eq!(s.on_packet(Q, true, ms(t0, 1_300)), fwd(true));
        assert_eq!(s.last_switch_wait(), Some(Duration::from_millis(100)));
        assert_eq!(s.current_quality(&layers), Some(Quality::Low));
    }

    #[test]
    fn urgent_downgrade_stops_the_current_layer_at_once() {
        let t0 = Instant::now();
        let layers = three();
        // A mild shortfall: F (1.5 Mbit/s) keeps flowing until H's keyframe.
        let mut s = forwarding(&layers, Some(5_000_000), t0);
        assert!(s.update(&layers, Some(1_000_000), ms(t0, 100)));
        assert_eq!(s.current(), Some(F));
        assert_eq!(s.on_packet(F, false, ms(t0, 110)), fwd(false));
        // The link collapses below half of F: F stops at once, Q's keyframe restarts.
        assert!(s.update(&layers, Some(300_000), ms(t0, 200)));
        assert_eq!(s.target(), Some(Q));
        assert_eq!(s.current(), None);
        assert_eq!(s.wants_keyframe(), Some(Q));
        assert_eq!(s.pending_since(), Some(ms(t0, 200)));
        assert_eq!(s.on_packet(F, false, ms(t0, 210)), PacketAction::Drop);
        assert_eq!(s.on_packet(F, true, ms(t0, 220)), PacketAction::Drop);
        assert_eq!(s.on_packet(Q, false, ms(t0, 230)), PacketAction::Drop);
        assert_eq!(s.on_packet(Q, true, ms(t0, 240)), fwd(true));
        assert_eq!(s.current(), Some(Q));
        // At the bottom nothing is urgent: the lowest layer flows whatever the estimate.
        assert!(!s.update(&layers, Some(10_000), ms(t0, 300)));
        assert_eq!(s.current(), Some(Q));
        assert_eq!(s.on_packet(Q, false, ms(t0, 310)), fwd(false));
        // Unknown bandwidth is never urgent.
        let mut s = forwarding(&layers, Some(5_000_000), t0);
        s.set_requested(req(Some(Quality::Low), None, None), &layers, ms(t0, 10));
        s.update(&layers, None, ms(t0, 20));
        assert_eq!(s.current(), Some(F));
        assert_eq!(s.target(), Some(Q));
    }

    #[test]
    fn upgrade_needs_up_hold_of_continuous_fit() {
        let t0 = Instant::now();
        let layers = three();
        let mut s = LayerSelector::default();
        assert_eq!(s.up_hold(), DEFAULT_UP_HOLD);
        s.update(&layers, Some(5_000_000), t0);
        assert_eq!(s.target(), Some(F));
        // Downgrade at 1 s.
        assert!(s.update(&layers, Some(1_000_000), ms(t0, 1_000)));
        assert_eq!(s.target(), Some(H));
        // Recovery: the top layer fits again from 1.1 s on, estimates every 100 ms.
        let mut upgraded_at = None;
        for i in 11..=60 {
            let now = ms(t0, i * 100);
            if s.update(&layers, Some(5_000_000), now) {
                upgraded_at.get_or_insert(now);
            }
        }
        assert_eq!(upgraded_at, Some(ms(t0, 1_100 + 3_000)));
        assert_eq!(s.target(), Some(F));

        // A configured hold, interrupted by one bad estimate: the hold restarts.
        let mut s = LayerSelector::default().with_up_hold(Duration::from_secs(2));
        s.update(&layers, Some(5_000_000), t0);
        s.update(&layers, Some(1_000_000), ms(t0, 100)); // down to H
        s.update(&layers, Some(5_000_000), ms(t0, 200));
        s.update(&layers, Some(5_000_000), ms(t0, 1_900));
        assert_eq!(s.target(), Some(H));
        s.update(&layers, Some(1_600_000), ms(t0, 2_000)); // F does not fit: restart
        assert_eq!(s.target(), Some(H));
        s.update(&layers, Some(5_000_000), ms(t0, 2_100));
        assert!(!s.update(&layers, Some(5_000_000), ms(t0, 4_099)));
        assert!(s.update(&layers, Some(5_000_000), ms(t0, 4_100)));
        assert_eq!(s.target(), Some(F));
    }

    #[test]
    fn next_up_names_the_layer_a_probe_should_prove_and_success_skips_the_hold() {
        let t0 = Instant::now();
        let layers = three();
        let mut s = forwarding(&layers, Some(5_000_000), t0);
        assert_eq!(s.next_up(&layers), None, "already on the top");
        s.update(&layers, Some(300_000), ms(t0, 100));
        assert_eq!(s.target(), Some(Q));
        assert_eq!(s.next_up(&layers), Some(H));
        // Capped by the request.
        s.set_requested(req(Some(Quality::Low), None, None), &layers, ms(t0, 200));
        assert_eq!(s.next_up(&layers), None);
        s.set_requested(Requested::default(), &layers, ms(t0, 300));
        // A layer paused upstream still counts (it can be resumed); one never seen does not.
        let mut no_h = three();
        set_active(&mut no_h, H, false);
        assert_eq!(s.next_up(&no_h), Some(H));
        for l in no_h.iter_mut().filter(|l| l.id == H) {
            l.bitrate_bps = 0;
        }
        assert_eq!(s.next_up(&no_h), Some(F));
        // The estimate rises (a probe): without it, the hold keeps Q ...
        let mut held = s.clone();
        held.update(&layers, Some(5_000_000), ms(t0, 400));
        assert_eq!(held.target(), Some(Q));
        // ... after a successful probe, F at once.
        s.probe_succeeded();
        s.update(&layers, Some(5_000_000), ms(t0, 400));
        assert_eq!(s.target(), Some(F));
        assert_eq!(s.next_up(&layers), None);
        // A later downgrade holds again.
        s.update(&layers, Some(300_000), ms(t0, 500));
        s.update(&layers, Some(5_000_000), ms(t0, 600));
        assert_eq!(s.target(), Some(Q));
    }

    #[test]
    fn oscillating_estimate_does_not_flap() {
        let t0 = Instant::now();
        let layers = three();
        let mut s = forwarding(&layers, Some(5_000_000), t0);
        let mut changes = 0;
        // Good and bad alternate every 500 ms for a minute.
        for i in 1..=120u64 {
            let bw = if i % 2 == 0 { 5_000_000 } else { 1_000_000 };
            if s.update(&layers, Some(bw), ms(t0, i * 500)) {
                changes += 1;
            }
            assert_eq!(s.target(), Some(H), "at step {i}");
        }
        assert_eq!(changes, 1, "only the first downgrade");
        // Slow oscillation (good for longer than the hold) does go back up.
        let mut s = forwarding(&layers, Some(5_000_000), t0);
        s.update(&layers, Some(1_000_000), ms(t0, 100));
        for i in 2..=40 {
            s.update(&layers, Some(5_000_000), ms(t0, i * 100));
        }
        assert_eq!(s.target(), Some(F));
    }

    #[test]
    fn requested_change_applies_immediately() {
        let t0 = Instant::now();
        let layers = three();
        let mut s = LayerSelector::new(req(Some(Quality::Low), None, None));
        s.update(&layers, Some(5_000_000), t0);
        assert_eq!(s.target(), Some(Q));
        // Up: no hold.
        assert!(s.set_requested(req(Some(Quality::High), None, None), &layers, ms(t0, 10)));
        assert_eq!(s.target(), Some(F));
        assert_eq!(s.requested().max_quality, Some(Quality::High));
        // Down: immediate too.
        assert!(s.set_requested(size(320, 180), &layers, ms(t0, 20)));
        assert_eq!(s.target(), Some(Q));
        assert!(!s.set_requested(size(300, 100), &layers, ms(t0, 30)));

        // But the bandwidth history still applies: a layer that just failed is not taken.
        let mut s = LayerSelector::new(req(Some(Quality::Low), None, None));
        s.update(&layers, Some(5_000_000), t0);
        s.update(&layers, Some(1_000_000), ms(t0, 100)); // F fails
        s.update(&layers, Some(5_000_000), ms(t0, 200));
        s.set_requested(Requested::default(), &layers, ms(t0, 300));
        assert_eq!(s.target(), Some(H));
        s.update(&layers, Some(5_000_000), ms(t0, 3_200));
        assert_eq!(s.target(), Some(F));
    }

    #[test]
    fn switch_happens_only_at_a_keyframe_of_the_target() {
        let t0 = Instant::now();
        let layers = three();
        let mut s = LayerSelector::new(req(Some(Quality::Low), None, None));
        s.update(&layers, None, t0);
        assert_eq!(s.on_packet(Q, true, t0), fwd(true));
        assert_eq!(s.wants_keyframe(), None);
        assert_eq!(s.pending_since(), None);
        s.set_requested(Requested::default(), &layers, ms(t0, 10));
        assert_eq!(s.target(), Some(F));
        assert_eq!(s.wants_keyframe(), Some(F));
        // Until F's keyframe: Q keeps flowing (keyframes of Q too), F is dropped.
        for i in 0..50 {
            let now = ms(t0, 20 + i);
            assert_eq!(s.on_packet(Q, i % 10 == 0, now), fwd(false));
            assert_eq!(s.on_packet(F, false, now), PacketAction::Drop);
            assert_eq!(s.on_packet(H, i % 7 == 0, now), PacketAction::Drop);
            assert_eq!(s.current(), Some(Q));
        }
        assert_eq!(s.on_packet(F, true, ms(t0, 100)), fwd(true));
        assert_eq!(s.current(), Some(F));
        assert_eq!(s.current_quality(&layers), Some(Quality::High));
        assert_eq!(s.wants_keyframe(), None);
        assert_eq!(s.last_switch_wait(), Some(Duration::from_millis(90)));
        // From now on Q is dropped and F flows, keyframe or not.
        assert_eq!(s.on_packet(Q, true, ms(t0, 101)), PacketAction::Drop);
        assert_eq!(s.on_packet(F, false, ms(t0, 101)), fwd(false));
        assert_eq!(s.on_packet(F, true, ms(t0, 102)), fwd(false));
    }

    #[test]
    fn packets_of_other_layers_are_dropped() {
        let t0 = Instant::now();
        let layers = three();
        let mut s = forwarding(&layers, Some(1_000_000), t0);
        assert_eq!(s.current(), Some(H));
        for (l, kf) in [(Q, false), (Q, true), (F, false), (F, true), (42, true)] {
            assert_eq!(s.on_packet(l, kf, ms(t0, 1)), PacketAction::Drop);
            assert!(!s.on_packet(l, kf, ms(t0, 1)).is_forward());
        }
        assert!(s.on_packet(H, false, ms(t0, 2)).is_forward());
    }

    #[test]
    fn new_subscriber_starts_at_the_first_keyframe_of_the_target() {
        let t0 = Instant::now();
        let layers = three();
        let mut s = LayerSelector::default();
        // No layers known yet: nothing to do.
        assert!(!s.update(&[], None, t0));
        assert_eq!(s.on_packet(F, true, t0), PacketAction::Drop);
        assert!(s.update(&layers, Some(1_000_000), ms(t0, 1)));
        assert_eq!(s.current(), None);
        assert_eq!(s.wants_keyframe(), Some(H));
        assert_eq!(s.on_packet(H, false, ms(t0, 2)), PacketAction::Drop);
        assert_eq!(s.on_packet(Q, true, ms(t0, 2)), PacketAction::Drop);
        assert_eq!(s.on_packet(H, true, ms(t0, 3)), fwd(true));
        assert_eq!(s.on_packet(H, false, ms(t0, 4)), fwd(false));
    }

    #[test]
    fn inactive_current_layer_falls_back_without_freezing() {
        let t0 = Instant::now();
        let mut layers = three();
        let mut s = forwarding(&layers, None, t0);
        assert_eq!(s.current(), Some(F));
        // The publisher stops the top layer.
        set_active(&mut layers, F, false);
        assert!(s.update(&layers, None, ms(t0, 1_000)));
        assert_eq!(s.target(), Some(H));
        assert_eq!(s.wants_keyframe(), Some(H));
        // Stragglers of F are still forwarded; H's keyframe switches.
        assert_eq!(s.on_packet(F, false, ms(t0, 1_001)), fwd(false));
        assert_eq!(s.on_packet(H, false, ms(t0, 1_002)), PacketAction::Drop);
        assert_eq!(s.on_packet(H, true, ms(t0, 1_050)), fwd(true));
        assert_eq!(s.current(), Some(H));
        // F comes back: it never failed the bandwidth, so back up at once.
        set_active(&mut layers, F, true);
        assert!(s.update(&layers, None, ms(t0, 5_000)));
        assert_eq!(s.target(), Some(F));

        // Losing the lowest layer while on it moves *up* at once, whatever the hold.
        let mut layers = three();
        let mut s = forwarding(&layers, Some(5_000_000), t0);
        s.update(&layers, Some(300_000), ms(t0, 100)); // down to Q: H and F failed
        assert_eq!(s.on_packet(Q, true, ms(t0, 150)), fwd(true));
        set_active(&mut layers, Q, false);
        assert!(s.update(&layers, Some(300_000), ms(t0, 200)));
        assert_eq!(s.target(), Some(H)); // doesn't fit, but it is the lowest active one
        assert_eq!(s.wants_keyframe(), Some(H));
        assert_eq!(s.on_packet(H, true, ms(t0, 250)), fwd(true));
    }

    #[test]
    fn inactive_requested_layer_falls_back_below_then_above() {
        let t0 = Instant::now();
        let mut layers = three();
        let mut s = LayerSelector::new(req(Some(Quality::Medium), None, None));
        set_active(&mut layers, H, false);
        s.update(&layers, None, t0);
        assert_eq!(s.target(), Some(Q));
        // Below is gone too: above.
        set_active(&mut layers, Q, false);
        s.update(&layers, None, ms(t0, 1));
        assert_eq!(s.target(), Some(F));
        // Nothing active (muted publisher): what would be chosen, here the requested one.
        set_active(&mut layers, F, false);
        s.update(&layers, None, ms(t0, 2));
        assert_eq!(s.target(), Some(H));
        assert_eq!(s.desired(), Some(H));
    }

    #[test]
    fn single_layer_track_always_uses_its_layer() {
        let t0 = Instant::now();
        let one = [LayerInfo {
            id: 0,
            width: 0,
            height: 0,
            bitrate_bps: 2_000_000,
            active: true,
        }];
        assert_eq!(layer_quality(&one, 0), Some(Quality::High));
        for r in [
            Requested::default(),
            req(Some(Quality::Low), None, None),
            req(Some(Quality::Medium), None, None),
            size(160, 90),
            size(4000, 3000),
        ] {
            for bw in [None, Some(0), Some(100_000), Some(100_000_000)] {
                let mut s = LayerSelector::new(r);
                s.update(&one, bw, t0);
                assert_eq!(s.target(), Some(0), "{r:?} {bw:?}");
                assert_eq!(s.on_packet(0, false, t0), PacketAction::Drop);
                assert_eq!(s.on_packet(0, true, t0), fwd(true));
                assert_eq!(s.current_quality(&one), Some(Quality::High));
                for i in 1..10 {
                    assert!(!s.update(&one, Some(i * 1000), ms(t0, i)));
                    assert_eq!(s.on_packet(0, false, ms(t0, i)), fwd(false));
                }
            }
        }
    }

    #[test]
    fn zero_size_pauses_and_resumes_at_a_keyframe() {
        let t0 = Instant::now();
        let layers = three();
        let mut s = forwarding(&layers, None, t0);
        assert_eq!(s.current(), Some(F));
        assert!(s.set_requested(size(0, 0), &layers, ms(t0, 10)));
        assert!(s.is_paused());
        assert_eq!(s.target(), None);
        assert_eq!(s.current(), None);
        assert_eq!(s.wants_keyframe(), None);
        assert_eq!(s.current_quality(&layers), None);
        for l in [Q, H, F] {
            assert_eq!(s.on_packet(l, true, ms(t0, 20)), PacketAction::Drop);
        }
        // Estimates while paused change nothing.
        assert!(!s.update(&layers, Some(100_000), ms(t0, 30)));
        assert_eq!(needed_layers([&s]), BTreeSet::new());
        // A single zero dimension pauses too.
        assert!(req(None, Some(0), None).is_paused());
        assert!(req(None, Some(640), Some(0)).is_paused());
        assert!(!Requested::default().is_paused());
        // Resume: the target's keyframe restarts forwarding, as a switch.
        assert!(s.set_requested(size(640, 360), &layers, ms(t0, 40)));
        assert_eq!(s.target(), Some(Q)); // the 100 kbps estimate still holds
        assert_eq!(s.wants_keyframe(), Some(Q));
        assert_eq!(s.on_packet(Q, false, ms(t0, 50)), PacketAction::Drop);
        assert_eq!(s.on_packet(Q, true, ms(t0, 60)), fwd(true));
    }

    /// After a restart (unmute) nothing is forwarded until a keyframe of the target, which
    /// then counts as a switch; preference and target are kept.
    #[test]
    fn restart_waits_for_a_keyframe_of_the_same_target() {
        let t0 = Instant::now();
        let layers = three();
        let mut s = forwarding(&layers, None, t0);
        assert_eq!(s.current(), Some(F));
        let before = s.requested();
        assert!(!s.restart(&layers, ms(t0, 10)));
        assert_eq!(s.requested(), before);
        assert_eq!(s.target(), Some(F));
        assert_eq!(s.current(), None);
        assert_eq!(s.wants_keyframe(), Some(F));
        assert_eq!(s.pending_since(), Some(ms(t0, 10)));
        assert_eq!(s.on_packet(F, false, ms(t0, 20)), PacketAction::Drop);
        assert_eq!(s.on_packet(F, true, ms(t0, 30)), fwd(true));
        assert_eq!(s.current(), Some(F));
    }

    #[test]
    fn needed_layers_are_targets_currents_and_desired_layers() {
        let t0 = Instant::now();
        let layers = three();
        assert!(needed_layers(std::iter::empty()).is_empty());
        let mut low = LayerSelector::new(req(Some(Quality::Low), None, None));
        low.update(&layers, None, t0);
        low.on_packet(Q, true, t0);
        assert_eq!(needed_layers([&low]), BTreeSet::from([Q]));
        // A subscriber switching H → F needs both meanwhile.
        let mut switching = LayerSelector::new(req(Some(Quality::Medium), None, None));
        switching.update(&layers, None, t0);
        assert_eq!(switching.on_packet(H, true, t0), fwd(true));
        switching.set_requested(Requested::default(), &layers, ms(t0, 1));
        assert_eq!(switching.current(), Some(H));
        assert_eq!(switching.target(), Some(F));
        assert_eq!(needed_layers([&low, &switching]), BTreeSet::from([Q, H, F]));
        let v = vec![low.clone(), low];
        assert_eq!(needed_layers(&v), BTreeSet::from([Q]));

        // A layer paused upstream is still needed by whoever would use it, so it can be
        // resumed (otherwise nobody would ever target it again).
        let mut paused_top = three();
        set_active(&mut paused_top, F, false);
        let mut s = LayerSelector::default();
        s.update(&paused_top, Some(5_000_000), t0);
        assert_eq!(s.target(), Some(H));
        assert_eq!(s.desired(), Some(F));
        assert!(needed_layers([&s]).contains(&F));
        // ...but not by one whose bandwidth could not carry it.
        let mut s = LayerSelector::default();
        s.update(&paused_top, Some(1_000_000), t0);
        assert_eq!(needed_layers([&s]), BTreeSet::from([H]));
    }

    #[test]
    fn removed_layers_and_time_going_backwards_are_harmless() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let layers = three();
        let mut s = forwarding(&layers, Some(5_000_000), t0);
        s.update(&layers, Some(1_000_000), t0 - Duration::from_secs(5));
        assert_eq!(s.target(), Some(H));
        s.update(&layers, Some(5_000_000), t0 - Duration::from_secs(9));
        assert_eq!(s.target(), Some(H));
        // F disappears from the list while current: the target moves, F stragglers flow.
        let two: Vec<LayerInfo> = layers.iter().copied().filter(|l| l.id != F).collect();
        s.update(&two, None, t0);
        assert_eq!(s.target(), Some(H));
        assert_eq!(s.on_packet(F, false, t0), fwd(false));
        assert_eq!(s.on_packet(H, true, t0), fwd(true));
        assert_eq!(s.current_quality(&two), Some(Quality::High));
        // Everything gone.
        assert!(s.update(&[], None, t0));
        assert_eq!(s.target(), None);
        assert_eq!(s.wants_keyframe(), None);
        assert_eq!(s.on_packet(H, false, t0), fwd(false));
    }

    /// Tiny deterministic PRNG (xorshift64*), so the test needs no crate.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            self.0 = x;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn random_sequences_only_forward_current_and_switch_on_keyframes() {
        for seed in [1u64, 0x9E37_79B9_7F4A_7C15, 12345, 0xDEAD_BEEF] {
            let mut rng = XorShift(seed);
            let t0 = Instant::now();
            let mut now = t0;
            let mut layers = three();
            let mut s = LayerSelector::default().with_up_hold(Duration::from_millis(1_500));
            s.update(&layers, None, now);
            let (mut forwarded, mut switches, mut drops) = (0u32, 0u32, 0u32);
            let mut last_keyframe_wait_ok = true;
            for _ in 0..40_000 {
                now += Duration::from_millis(rng.below(20));
                match rng.below(100) {
                    0..=84 => {
                        let l = [Q, H, F][rng.below(3) as usize];
                        let keyframe = rng.below(30) == 0;
                        let before = s.current();
                        let target = s.target();
                        let action = s.on_packet(l, keyframe, now);
                        match action {
                            PacketAction::Forward { switched } => {
                                forwarded += 1;
                                assert_eq!(s.current(), Some(l), "forwarded a non-current layer");
                                if switched {
                                    switches += 1;
                                    assert!(keyframe, "switched on a non-keyframe");
                                    assert_eq!(target, Some(l));
                                    assert_ne!(before, Some(l));
                                    last_keyframe_wait_ok &= s.last_switch_wait().is_some();
                                } else {
                                    assert_eq!(before, Some(l));
                                }
                            }
                            PacketAction::Drop => {
                                drops += 1;
                                assert_ne!(before, Some(l), "dropped a packet of current");
                                assert_eq!(s.current(), before);
                            }
                        }
                    }
                    85..=94 => {
                        let bw = match rng.below(4) {
                            0 => None,
                            _ => Some(rng.below(2_500_000)),
                        };
                        for l in layers.iter_mut() {
                            if rng.below(20) == 0 {
                                l.active = !l.active;
                            }
                        }
                        s.update(&layers, bw, now);
                    }
                    _ => {
                        let r = match rng.below(6) {
                            0 => size(0, 0),
                            1 => size(rng.below(1400) as u32, rng.below(800) as u32),
                            2 => req(Some(Quality::Low), None, None),
                            3 => req(Some(Quality::Medium), None, None),
                            4 => req(Some(Quality::High), None, None),
                            _ => Requested::default(),
                        };
                        let current_before = s.current();
                        s.set_requested(r, &layers, now);
                        if r.is_paused() {
                            assert_eq!(s.current(), None);
                        } else {
                            assert_eq!(s.current(), current_before);
                        }
                    }
                }
                // Invariants after every step.
                assert_eq!(s.target().is_none(), s.is_paused());
                match s.target() {
                    Some(t) if s.current() != Some(t) => {
                        assert_eq!(s.wants_keyframe(), Some(t));
                        assert!(s.pending_since().is_some());
                    }
                    _ => {
                        assert_eq!(s.wants_keyframe(), None);
                        assert_eq!(s.pending_since(), None);
                    }
                }
                let needed = needed_layers([&s]);
                for l in [s.target(), s.current(), s.desired()].into_iter().flatten() {
                    assert!(needed.contains(&l));
                }
            }
            assert!(forwarded > 1_000, "seed {seed}: {forwarded} forwarded");
            assert!(switches > 20, "seed {seed}: {switches} switches");
            assert!(drops > 1_000, "seed {seed}: {drops} drops");
            assert!(last_keyframe_wait_ok);
        }
    }

    #[test]
    fn targets_are_active_and_never_above_requested_when_possible() {
        let mut rng = XorShift(77);
        let t0 = Instant::now();
        let mut s = LayerSelector::default();
        let mut layers = three();
        for i in 0..5_000u64 {
            let now = ms(t0, i * 50);
            for l in layers.iter_mut() {
                l.active = rng.below(4) != 0;
                l.bitrate_bps = l.bitrate_bps * (90 + rng.below(21)) / 100 + 1;
            }
            let r = match rng.below(4) {
                0 => req(Some(Quality::Low), None, None),
                1 => req(Some(Quality::Medium), None, None),
                2 => size(rng.below(1300) as u32 + 1, rng.below(700) as u32 + 1),
                _ => Requested::default(),
            };
            s.set_requested(r, &layers, now);
            let bw = Some(rng.below(3_000_000));
            s.update(&layers, bw, now);
            let ranked = rank_layers(&layers);
            let ceiling = requested_rank(&layers, &ranked, &r).expect("not paused");
            let rank_of = |id| ranked.iter().position(|x| x.id == id).expect("ranked");
            let t = s.target().expect("a target");
            let active_at_or_below = ranked[..=ceiling].iter().any(|x| layers[x.index].active);
            if layers.iter().any(|l| l.active) {
                assert!(layers.iter().any(|l| l.id == t && l.active), "step {i}");
            }
            if active_at_or_below {
                assert!(rank_of(t) <= ceiling, "step {i}: above requested");
            }
        }
    }

    #[test]
    fn bitrate_meter_measures_a_steady_stream() {
        let t0 = Instant::now();
        let mut m = BitrateMeter::new();
        assert_eq!(m.bps(t0), 0);
        assert_eq!(m.last_packet(), None);
        assert!(!m.is_active(t0));
        // 1000 bytes every 10 ms = 800 kbps.
        for i in 0..300 {
            m.add(ms(t0, i * 10), 1000);
            let rate = m.bps(ms(t0, i * 10));
            if i >= 10 {
                assert!((720_000..=880_000).contains(&rate), "at {i}: {rate}");
            }
        }
        assert_eq!(m.last_packet(), Some(ms(t0, 2_990)));
        assert!(m.is_active(ms(t0, 3_500)));
        let last = m.last_active_bps();
        assert!((720_000..=880_000).contains(&last), "{last}");
        // The window slides: after a second of silence, nothing.
        assert!(m.bps(ms(t0, 3_500)) < 500_000);
        assert_eq!(m.bps(ms(t0, 4_000)), 0);
        assert!(!m.is_active(ms(t0, 3_990)));
        assert_eq!(m.last_active_bps(), last);
        // Resumes at half the rate: measured right from the start of the new run.
        for i in 0..100 {
            m.add(ms(t0, 10_000 + i * 20), 1000);
            if i >= 10 {
                let rate = m.bps(ms(t0, 10_000 + i * 20));
                assert!((340_000..=460_000).contains(&rate), "resume {i}: {rate}");
            }
        }
        assert!(m.is_active(ms(t0, 12_000)));
    }

    #[test]
    fn bitrate_meter_counts_alike_with_and_without_its_bucket_shortcut() {
        let t0 = Instant::now();
        let (mut fast, mut slow) = (BitrateMeter::new(), BitrateMeter::new());
        // Steps across bucket edges, bursts at one instant, late packets, and gaps of a
        // bucket, of a window and of more than one.
        let steps_us = [
            0u64, 3, 99_997, 3, 0, 0, 1, 250_000, 7, 99_999, 1, 1_000_000, 5, 1_500_000, 40_000,
            40_000, 40_000, 99_999, 2, 0, 60_000,
        ];
        let mut t = t0;
        for (i, &d) in steps_us.iter().cycle().take(400).enumerate() {
            t += Duration::from_micros(d);
            // Every fifth packet is stamped a little late.
            let at = if i % 5 == 4 {
                t - Duration::from_micros(30_000)
            } else {
                t
            };
            let size = 100 + i * 7 % 1_100;
            fast.add(at, size);
            slow.current = None;
            slow.add(at, size);
            for probe in [
                t,
                t + Duration::from_millis(50),
                t + Duration::from_millis(950),
            ] {
                assert_eq!(fast.bps(probe), slow.bps(probe), "step {i}");
                assert_eq!(fast.is_active(probe), slow.is_active(probe), "step {i}");
            }
            assert_eq!(fast.last_packet(), slow.last_packet(), "step {i}");
        }
    }

    #[test]
    fn bitrate_meter_tolerates_odd_input() {
        let t0 = Instant::now() + Duration::from_secs(5);
        let mut m = BitrateMeter::new();
        // A single packet is not a spike to infinity.
        m.add(t0, 1200);
        assert_eq!(m.bps(t0), 1200 * 8 * 10);
        // Earlier timestamps count at the newest one.
        m.add(t0 - Duration::from_secs(3), 1200);
        assert_eq!(m.last_packet(), Some(t0));
        assert_eq!(m.bps(t0 - Duration::from_secs(1)), 2400 * 8 * 10);
        assert!(m.is_active(t0 - Duration::from_secs(1)));
        // Huge sizes saturate instead of overflowing.
        m.add(t0, usize::MAX);
        m.add(t0, usize::MAX);
        assert!(m.bps(t0) > 0);
        // Far future.
        assert_eq!(m.bps(t0 + Duration::from_secs(86_400 * 365)), 0);
    }
}
