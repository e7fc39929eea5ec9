//! A model of what a browser's video receiver does with a VP8 stream, as far as keyframes go:
//! which frames it could decode (a frame is *complete* once all its packets are in, in order
//! or repaired by a retransmission; it is *decodable* when it is a keyframe or the frame just
//! before it was decoded), and when it would ask the sender for a keyframe (PLI).
//!
//! The synthetic subscribers (webrtc-rs) have no decoder: they NACK gaps (the default
//! interceptors) but never send a PLI. This model gives them the two behaviours of a real
//! receiver that matter to an SFU, without decoding any pixels:
//!
//! * **Decodability.** [`DecoderModel::decoded_keyframes`] says when each keyframe became
//!   decodable, including a keyframe whose first packet was lost and came back through a NACK
//!   (the packet-order view of [`super::recv`] does not count that one).
//! * **Keyframe requests** ([`PliPolicy`]). [`PliPolicy::Libwebrtc`] follows libwebrtc's
//!   `VideoReceiveStream2` (Chrome, Firefox, Safari): a PLI when the first complete frame is not
//!   a keyframe; when no frame was decodable for 200 ms while a keyframe is *required* (before
//!   the first decoded frame); and when no frame was decodable for 3 s otherwise; not while
//!   keyframe packets arrived in the last 200 ms; repeated at those intervals while stalled.
//!   It does **not** send a PLI for a lost packet: a lost keyframe packet is NACKed, and if the
//!   NACK does not repair it the picture freezes until the next keyframe or the 3 s timeout.
//!   [`PliPolicy::Eager`] is more impatient than any browser: a PLI as soon as a complete frame
//!   waits behind an incomplete one (a gap the NACKs did not repair) for `after`, at most once
//!   per `after`. Both are throttled.
//!
//! Pure: every method takes the time as a parameter.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// libwebrtc's `kMaxWaitForKeyFrame`: no decodable frame for this long while a keyframe is
/// required → PLI (and the minimum time between two PLIs).
pub const WAIT_FOR_KEYFRAME: Duration = Duration::from_millis(200);
/// libwebrtc's `kMaxWaitForFrame`: no decodable frame for this long otherwise → PLI.
pub const WAIT_FOR_FRAME: Duration = Duration::from_secs(3);
/// Frames remembered ahead of the last decoded one (older ones are forgotten).
const MAX_FRAMES: usize = 256;

/// When the modelled receiver asks for a keyframe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PliPolicy {
    /// Never (what a webrtc-rs peer without a decoder does).
    Off,
    /// Like libwebrtc's receive stream (see the module docs).
    #[default]
    Libwebrtc,
    /// Also when a gap stays unrepaired for `after` (see the module docs).
    Eager { after: Duration },
}

impl std::str::FromStr for PliPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(PliPolicy::Off),
            "libwebrtc" => Ok(PliPolicy::Libwebrtc),
            "eager" => Ok(PliPolicy::Eager {
                after: Duration::from_millis(100),
            }),
            _ => match s.strip_prefix("eager:") {
                Some(ms) => ms
                    .parse::<u64>()
                    .map(|ms| PliPolicy::Eager {
                        after: Duration::from_millis(ms),
                    })
                    .map_err(|e| format!("eager:<ms>: {e}")),
                None => Err(format!(
                    "unknown PLI policy {s:?} (off, libwebrtc, eager, eager:<ms>)"
                )),
            },
        }
    }
}

/// A keyframe that became decodable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodedKeyframe {
    pub at: Instant,
    /// Frame size, if the keyframe header was readable.
    pub size: Option<(u16, u16)>,
    /// Sequence number of its first packet.
    pub seq: u16,
}

/// What one packet contributes (parsed by the caller from RTP + VP8 descriptor).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FramePacket {
    pub seq: u16,
    pub timestamp: u32,
    /// The packet starts a frame (S = 1, partition 0).
    pub frame_start: bool,
    /// ... and that frame is a keyframe.
    pub keyframe: bool,
    /// Keyframe size (from the start packet of a keyframe).
    pub size: Option<(u16, u16)>,
    /// RTP marker: the last packet of the frame.
    pub marker: bool,
}

#[derive(Debug, Clone, Default)]
struct Frame {
    first: Option<u64>,
    last: Option<u64>,
    /// Extended sequence numbers received (deduplicated).
    got: Vec<u64>,
    keyframe: bool,
    size: Option<(u16, u16)>,
    /// When this frame was first found complete while not decodable.
    blocked_since: Option<Instant>,
}

impl Frame {
    fn complete(&self) -> bool {
        match (self.first, self.last) {
            (Some(f), Some(l)) if l >= f => self.got.len() as u64 == l - f + 1,
            _ => false,
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct DecoderModel {
    policy: PliPolicy,
    /// Highest extended sequence number seen (for unwrapping).
    max_seq: Option<u64>,
    /// Frames by the extended sequence number of their first known packet... keyed by RTP
    /// timestamp, which all packets of a frame share.
    frames: BTreeMap<u32, Frame>,
    /// Extended sequence number of the last packet of the last decoded frame.
    decoded_until: Option<u64>,
    keyframe_required: bool,
    any_frame_complete: bool,
    /// Stall timer: since the last decoded frame (or the first packet, or the last PLI).
    stall_since: Option<Instant>,
    last_keyframe_packet: Option<Instant>,
    last_pli: Option<Instant>,
    decoded_frames: u64,
    decoded_keyframes: Vec<DecodedKeyframe>,
    plis: u64,
    /// Padding-only packets not yet passed by the decoded chain (extended numbers).
    padding: std::collections::BTreeSet<u64>,
}

impl DecoderModel {
    pub fn new(policy: PliPolicy) -> Self {
        DecoderModel {
            policy,
            max_seq: None,
            frames: BTreeMap::new(),
            decoded_until: None,
            keyframe_required: true,
            any_frame_complete: false,
            stall_since: None,
            last_keyframe_packet: None,
            last_pli: None,
            decoded_frames: 0,
            decoded_keyframes: Vec::new(),
            plis: 0,
            padding: std::collections::BTreeSet::new(),
        }
    }

    pub fn policy(&self) -> PliPolicy {
        self.policy
    }

    /// Frames decoded so far.
    pub fn decoded_frames(&self) -> u64 {
        self.decoded_frames
    }

    /// Keyframes decoded, oldest first (bounded).
    pub fn decoded_keyframes(&self) -> &[DecodedKeyframe] {
        &self.decoded_keyframes
    }

    /// PLIs asked for (by [`poll_pli`](Self::poll_pli)).
    pub fn plis(&self) -> u64 {
        self.plis
    }

    fn extend(&mut self, seq: u16) -> u64 {
        let ext = match self.max_seq {
            None => u64::from(seq) + (1 << 16),
            Some(max) => {
                let delta = i64::from(seq.wrapping_sub(max as u16) as i16);
                (max as i64 + delta).max(0) as u64
            }
        };
        if self.max_seq.is_none_or(|m| ext > m) {
            self.max_seq = Some(ext);
        }
        ext
    }

    /// One received packet (in arrival order, retransmissions included).
    pub fn on_packet(&mut self, p: FramePacket, now: Instant) {
        self.stall_since.get_or_insert(now);
        let ext = self.extend(p.seq);
        if self.decoded_until.is_some_and(|d| ext <= d) {
            return; // late copy of something already decoded past
        }
        let f = self.frames.entry(p.timestamp).or_default();
        if f.got.contains(&ext) {
            return;
        }
        f.got.push(ext);
        if p.frame_start {
            f.first = Some(ext);
            f.keyframe = p.keyframe;
            f.size = p.size;
        }
        if p.marker {
            f.last = Some(ext);
        }
        if f.keyframe {
            self.last_keyframe_packet = Some(now);
        }
        if self.frames.len() > MAX_FRAMES {
            // Forget the frame with the oldest packets.
            if let Some(ts) = self
                .frames
                .iter()
                .min_by_key(|(_, f)| f.got.iter().min().copied().unwrap_or(0))
                .map(|(ts, _)| *ts)
            {
                self.frames.remove(&ts);
            }
        }
        self.decode(now);
    }

    /// A padding-only packet (bandwidth probing): it carries no frame, but its sequence
    /// number continues the chain, as libwebrtc's packet buffer treats padding.
    pub fn on_padding(&mut self, seq: u16, now: Instant) {
        self.stall_since.get_or_insert(now);
        let ext = self.extend(seq);
        if self.decoded_until.is_some_and(|d| ext <= d) {
            return;
        }
        if self.padding.len() < 4 * MAX_FRAMES {
            self.padding.insert(ext);
        }
        self.decode(now);
    }

    /// Decodes whatever became decodable: the newest complete keyframe past the last decoded
    /// frame, then every complete frame that continues the chain (padding included).
    fn decode(&mut self, now: Instant) {
        loop {
            while let Some(d) = self.decoded_until {
                if !self.padding.remove(&(d + 1)) {
                    break;
                }
                self.decoded_until = Some(d + 1);
            }
            if let Some(d) = self.decoded_until {
                self.padding.retain(|&s| s > d);
            }
            let mut complete: Vec<(u64, u32)> = self
                .frames
                .iter()
                .filter(|(_, f)| f.complete())
                .filter_map(|(ts, f)| f.first.map(|s| (s, *ts)))
                .filter(|(s, _)| self.decoded_until.is_none_or(|d| *s > d))
                .collect();
            if complete.is_empty() {
                return;
            }
            self.any_frame_complete = true;
            complete.sort_unstable();
            // The next frame in the chain, else the newest complete keyframe.
            let next = complete
                .iter()
                .find(|(s, _)| self.decoded_until.is_some_and(|d| *s == d + 1))
                .or_else(|| {
                    complete
                        .iter()
                        .rev()
                        .find(|(_, ts)| self.frames.get(ts).is_some_and(|f| f.keyframe))
                })
                .copied();
            let Some((_, ts)) = next else {
                for (_, ts) in complete {
                    if let Some(f) = self.frames.get_mut(&ts) {
                        f.blocked_since.get_or_insert(now);
                    }
                }
                return;
            };
            let f = self.frames.remove(&ts).expect("listed above");
            self.decoded_until = f.last;
            self.decoded_frames += 1;
            self.keyframe_required = false;
            self.stall_since = Some(now);
            if f.keyframe && self.decoded_keyframes.len() < 10_000 {
                self.decoded_keyframes.push(DecodedKeyframe {
                    at: now,
                    size: f.size,
                    seq: f.first.unwrap_or(0) as u16,
                });
            }
            // Everything at or before the decoded frame is of no use any more.
            let until = self.decoded_until.unwrap_or(0);
            self.frames
                .retain(|_, f| f.got.iter().max().is_some_and(|&m| m > until));
        }
    }

    fn pli_allowed(&self, now: Instant) -> bool {
        self.last_pli
            .is_none_or(|t| now.saturating_duration_since(t) >= WAIT_FOR_KEYFRAME)
    }

    /// Whether the receiver asks for a keyframe now; if so, it counts as sent (call it after
    /// each packet, or on a timer).
    pub fn poll_pli(&mut self, now: Instant) -> bool {
        let due = match self.policy {
            PliPolicy::Off => false,
            PliPolicy::Libwebrtc => self.libwebrtc_due(now),
            PliPolicy::Eager { after } => self.libwebrtc_due(now) || self.gap_due(now, after),
        };
        if due {
            self.plis += 1;
            self.last_pli = Some(now);
            // libwebrtc re-arms its decodable-frame timer after a request.
            self.stall_since = Some(now);
        }
        due
    }

    fn libwebrtc_due(&self, now: Instant) -> bool {
        if !self.pli_allowed(now) {
            return false;
        }
        // The first complete frame is not a keyframe (libwebrtc asks at once).
        if self.decoded_frames == 0 && self.any_frame_complete && self.last_pli.is_none() {
            return true;
        }
        let Some(since) = self.stall_since else {
            return false;
        };
        let wait = if self.keyframe_required {
            WAIT_FOR_KEYFRAME
        } else {
            WAIT_FOR_FRAME
        };
        let receiving_keyframe = self
            .last_keyframe_packet
            .is_some_and(|t| now.saturating_duration_since(t) < WAIT_FOR_KEYFRAME);
        now.saturating_duration_since(since) >= wait && !receiving_keyframe
    }

    fn gap_due(&self, now: Instant, after: Duration) -> bool {
        if self
            .last_pli
            .is_some_and(|t| now.saturating_duration_since(t) < after)
        {
            return false;
        }
        self.frames
            .values()
            .filter_map(|f| f.blocked_since)
            .any(|t| now.saturating_duration_since(t) >= after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_millis(n)
    }

    /// Packets of a frame of `n` packets starting at `seq`, timestamp `ts`.
    fn frame(seq: u16, ts: u32, n: u16, key: bool) -> Vec<FramePacket> {
        (0..n)
            .map(|i| FramePacket {
                seq: seq.wrapping_add(i),
                timestamp: ts,
                frame_start: i == 0,
                keyframe: key && i == 0,
                size: (key && i == 0).then_some((320, 180)),
                marker: i == n - 1,
            })
            .collect()
    }

    /// A stream: keyframe of 3 packets, then `inter` interframes of 1 packet, from `seq`.
    fn stream(seq: u16, inter: u16) -> Vec<FramePacket> {
        let mut v = frame(seq, 0, 3, true);
        for i in 0..inter {
            v.extend(frame(
                seq.wrapping_add(3 + i),
                3000 * (u32::from(i) + 1),
                1,
                false,
            ));
        }
        v
    }

    #[test]
    fn in_order_stream_decodes_everything() {
        let t0 = Instant::now();
        let mut d = DecoderModel::new(PliPolicy::Libwebrtc);
        for (i, p) in stream(65_530, 10).into_iter().enumerate() {
            d.on_packet(p, ms(t0, i as u64 * 10));
            assert!(!d.poll_pli(ms(t0, i as u64 * 10)));
        }
        assert_eq!(d.decoded_frames(), 11);
        assert_eq!(d.decoded_keyframes().len(), 1);
        assert_eq!(d.decoded_keyframes()[0].size, Some((320, 180)));
    }

    /// Padding-only packets between frames (bandwidth probing) continue the chain, even
    /// when they arrive after the frame that follows them.
    #[test]
    fn padding_between_frames_keeps_the_chain() {
        let t0 = Instant::now();
        let mut d = DecoderModel::new(PliPolicy::Libwebrtc);
        for p in frame(65_534, 0, 3, true) {
            d.on_packet(p, t0);
        }
        d.on_padding(1, ms(t0, 1));
        d.on_padding(2, ms(t0, 1));
        for p in frame(3, 3000, 2, false) {
            d.on_packet(p, ms(t0, 33));
        }
        for p in frame(7, 6000, 1, false) {
            d.on_packet(p, ms(t0, 66));
        }
        assert_eq!(d.decoded_frames(), 2, "the padding at 5, 6 has not arrived");
        d.on_padding(6, ms(t0, 70));
        d.on_padding(5, ms(t0, 71));
        assert_eq!(d.decoded_frames(), 3);
        assert!(!d.poll_pli(ms(t0, 80)));
    }

    #[test]
    fn a_keyframe_repaired_by_retransmission_counts_when_complete() {
        let t0 = Instant::now();
        let mut d = DecoderModel::new(PliPolicy::Libwebrtc);
        let mut pkts = stream(100, 5);
        let first = pkts.remove(0); // the keyframe's first packet is lost...
        for (i, p) in pkts.into_iter().enumerate() {
            d.on_packet(p, ms(t0, i as u64));
        }
        assert_eq!(d.decoded_frames(), 0);
        d.on_packet(first, ms(t0, 150)); // ... and retransmitted
        assert_eq!(
            d.decoded_frames(),
            6,
            "the keyframe and the frames after it"
        );
        assert_eq!(d.decoded_keyframes()[0].at, ms(t0, 150));
    }

    #[test]
    fn libwebrtc_asks_only_after_its_timeouts() {
        let t0 = Instant::now();
        let mut d = DecoderModel::new(PliPolicy::Libwebrtc);
        // Decoding, then the next keyframe's first packet is lost and never repaired.
        for (i, p) in stream(0, 5).into_iter().enumerate() {
            d.on_packet(p, ms(t0, i as u64));
        }
        let mut lost_key = frame(8, 100_000, 3, true);
        lost_key.remove(0);
        for p in lost_key {
            d.on_packet(p, ms(t0, 10));
        }
        let mut plis = Vec::new();
        for k in 0..200u16 {
            let now = ms(t0, 20 + u64::from(k) * 33);
            d.on_packet(
                frame(11 + k, 200_000 + u32::from(k) * 3000, 1, false)[0],
                now,
            );
            if d.poll_pli(now) {
                plis.push(now);
            }
        }
        assert_eq!(d.decoded_frames(), 6);
        // No decodable frame since t0+5: the first PLI ~3 s later, then every 3 s.
        assert!(!plis.is_empty());
        assert!(
            plis[0] >= ms(t0, 3_000) && plis[0] < ms(t0, 3_100),
            "{plis:?}"
        );
        assert!(plis.windows(2).all(|w| w[1] - w[0] >= WAIT_FOR_FRAME));
    }

    #[test]
    fn before_the_first_keyframe_it_asks_every_200_ms() {
        let t0 = Instant::now();
        let mut d = DecoderModel::new(PliPolicy::Libwebrtc);
        // Joins mid-stream: interframes only.
        let mut plis = Vec::new();
        for k in 0..30u64 {
            let now = ms(t0, k * 33);
            d.on_packet(frame(k as u16, k as u32 * 3000, 1, false)[0], now);
            if d.poll_pli(now) {
                plis.push(now);
            }
        }
        assert_eq!(
            plis.first(),
            Some(&t0),
            "first complete frame is not a keyframe"
        );
        assert!(plis.len() >= 4 && plis.len() <= 6, "{plis:?}");
        assert!(plis.windows(2).all(|w| w[1] - w[0] >= WAIT_FOR_KEYFRAME));
    }

    #[test]
    fn eager_asks_when_a_gap_stays_unrepaired() {
        let t0 = Instant::now();
        let mut d = DecoderModel::new(PliPolicy::Eager {
            after: Duration::from_millis(100),
        });
        for (i, p) in stream(0, 3).into_iter().enumerate() {
            d.on_packet(p, ms(t0, i as u64));
        }
        // Frame at seq 6 lost; the frames after it complete but cannot be decoded.
        let mut plis = Vec::new();
        for k in 0..10u64 {
            let now = ms(t0, 10 + k * 33);
            d.on_packet(frame(7 + k as u16, 50_000 + k as u32, 1, false)[0], now);
            if d.poll_pli(now) {
                plis.push(now);
            }
        }
        assert_eq!(plis.len(), 2, "{plis:?}");
        assert!(plis[0] >= ms(t0, 110) && plis[0] < ms(t0, 150), "{plis:?}");
        assert_eq!(d.plis(), 2);
        assert_eq!(
            "eager:250".parse(),
            Ok(PliPolicy::Eager {
                after: Duration::from_millis(250)
            })
        );
        assert_eq!("off".parse(), Ok(PliPolicy::Off));
        assert!("sometimes".parse::<PliPolicy>().is_err());
    }
}
