//! Down-track RTP rewriting: one subscriber's down-track sends one outgoing stream (its own
//! SSRC, continuous sequence numbers and timestamps) while the source behind it changes
//! (simulcast layer switches, publisher restarts, pause/resume).
//!
//! # Model
//!
//! The [`Rewriter`] keeps one *current source* (an incoming SSRC). Every packet the caller
//! decides to forward goes through [`Rewriter::rewrite`], which returns the outgoing SSRC,
//! sequence number and timestamp, or `None` if the packet must not be sent (see below).
//!
//! * **Sequence numbers.** Within a source, `out = in + offset` on 64-bit *extended*
//!   (unwrapped) sequence numbers, so 16-bit wrap-around is transparent, reordered and
//!   duplicate packets (NACK retransmits) get the same outgoing number as the original, and
//!   a gap in the source (real loss) stays a gap in the output, so the receiver NACKs it.
//! * **Switching.** A packet whose SSRC differs from the current source starts a new source:
//!   its outgoing sequence number is the highest one sent so far + 1 and its outgoing
//!   timestamp is the newest one sent so far + the wall-clock time elapsed since that
//!   packet arrived × the clock rate (at least + 1). Packets of the new source that are
//!   older than this switch point are dropped, as are late packets of the previous source,
//!   so the output never goes backwards past a switch. [`Rewriter::force_switch`] makes the
//!   next packet a switch point even if its SSRC is unchanged (resume after a pause,
//!   publisher restart that kept its SSRC).
//! * **Deliberate drops.** A packet of the current source that the caller drops on purpose
//!   (temporal-layer filtering, padding, pause) must be reported with [`Rewriter::skip`] so
//!   its slot is removed and the output has no hole that the receiver would NACK forever.
//!   Packets of *other* sources (a layer that is not current, e.g. while waiting for the
//!   target layer's keyframe) never touch the rewriter at all: don't call `rewrite` or
//!   `skip` for them.
//! * **Timestamps.** Within a source, `out = in + ts_offset` (mod 2^32), so timestamp
//!   wrap-around is transparent.
//!
//! Reordering is tolerated within [`REORDER_WINDOW`] packets of the newest one; anything
//! older is dropped.
//!
//! # VP8
//!
//! [`Vp8Munger`] keeps the VP8 payload descriptor continuous across switches: PictureID,
//! TL0PICIDX and KEYIDX each get an offset that is re-based at every switch so that the first
//! value of the new source is the last value sent + 1. The descriptor is rewritten **in place,
//! keeping the width the source used** (7- or 15-bit PictureID): the packet length never
//! changes and no copy is needed. Browsers use 15-bit PictureIDs for every simulcast layer,
//! so in practice the width never changes; if a new source does use another width, the
//! numbering continues modulo the new width, and because a switch always happens on a
//! keyframe (which references nothing earlier) the receiver loses nothing.

use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::vp8;

/// How far behind the newest packet (in packets) a reordered or retransmitted packet may be
/// and still be forwarded.
pub const REORDER_WINDOW: u64 = 2048;

/// Most offset changes (runs of skipped packets) remembered for the current source. Packets
/// older than the oldest remembered change are dropped.
const MAX_SEGMENTS: usize = 512;

/// For this long after a switch, packets of the previous source that are not newer than
/// the last one forwarded from it are treated as late and dropped. After that, any packet of
/// it is a switch back (its sequence numbers may have wrapped meanwhile).
const PREVIOUS_SOURCE_GRACE: Duration = Duration::from_secs(5);

/// Extended numbers start here so that unwrapping backwards never goes below zero.
const EXT_BASE: u64 = 1 << 16;

/// An incoming RTP packet, as far as the rewriter is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SrcPacket {
    /// SSRC of the incoming stream (one per simulcast layer).
    pub ssrc: u32,
    /// RTP sequence number.
    pub seq: u16,
    /// RTP timestamp.
    pub timestamp: u32,
    /// RTP clock rate of the codec (90000 for video, 48000 for Opus).
    pub clock_rate: u32,
    /// When the packet was received (virtual time in tests).
    pub arrival: Instant,
}

/// The outgoing header fields of a forwarded packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutHeader {
    /// The down-track's SSRC.
    pub ssrc: u32,
    /// Outgoing sequence number.
    pub seq: u16,
    /// Outgoing timestamp.
    pub timestamp: u32,
    /// This packet is the first of a new source (a switch point). Pass it on to
    /// [`Vp8Munger::munge`].
    pub switched: bool,
}

/// From extended sequence number `from` on, `out = in + offset`; the `skipped` numbers just
/// before `from` were dropped on purpose and have no outgoing slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Segment {
    from: u64,
    skipped: u64,
    offset: i64,
}

#[derive(Debug, Clone)]
struct Source {
    ssrc: u32,
    highest: u64,
    /// Sorted by `from`; never empty.
    segments: VecDeque<Segment>,
    ts_offset: u32,
}

impl Source {
    fn unwrap_seq(&self, seq: u16) -> u64 {
        unwrap(self.highest, seq)
    }

    /// The offset for extended sequence number `ext`, or `None` if it has no outgoing slot
    /// (before the switch point, skipped, or forgotten).
    fn offset_for(&self, ext: u64) -> Option<i64> {
        // Almost every packet is in the newest segment.
        if let Some(last) = self.segments.back().filter(|s| s.from <= ext) {
            return Some(last.offset);
        }
        let idx = self.segments.partition_point(|s| s.from <= ext);
        if let Some(next) = self.segments.get(idx) {
            if ext >= next.from.saturating_sub(next.skipped) {
                return None;
            }
        }
        self.segments.get(idx.checked_sub(1)?).map(|s| s.offset)
    }

    fn too_old(&self, ext: u64) -> bool {
        ext.saturating_add(REORDER_WINDOW) < self.highest
    }

    fn prune(&mut self) {
        while self.segments.len() > 1 {
            let Some(second) = self.segments.get(1) else {
                break;
            };
            let second_start = second.from.saturating_sub(second.skipped);
            if second_start.saturating_add(REORDER_WINDOW) <= self.highest
                || self.segments.len() > MAX_SEGMENTS
            {
                self.segments.pop_front();
            } else {
                break;
            }
        }
    }
}

/// Unwrap a 16-bit sequence number to the extended number closest to `reference`.
fn unwrap(reference: u64, seq: u16) -> u64 {
    let diff = i64::from(seq.wrapping_sub(reference as u16) as i16);
    reference.saturating_add_signed(diff)
}

/// Timestamp advance for a switch: elapsed wall-clock time × clock rate, clamped to
/// `1..=i32::MAX` so the new timestamp is always strictly newer.
fn ts_advance(since: Instant, now: Instant, clock_rate: u32) -> u32 {
    let micros = now.saturating_duration_since(since).as_micros();
    let ticks = micros.saturating_mul(u128::from(clock_rate)) / 1_000_000;
    ticks.clamp(1, i32::MAX as u128) as u32
}

/// Rewrites the RTP header fields of one down-track. See the module docs for the model.
#[derive(Debug, Clone)]
pub struct Rewriter {
    out_ssrc: u32,
    initial_seq: Option<u16>,
    initial_ts: Option<u32>,
    source: Option<Source>,
    /// The source before the current one: its SSRC, highest extended seq and when we
    /// switched away from it, to drop its late packets instead of switching back to it.
    previous: Option<(u32, u64, Instant)>,
    /// Highest extended outgoing sequence number sent.
    last_out_seq: Option<u64>,
    /// Newest outgoing timestamp sent and when its first packet arrived.
    last_out_ts: Option<(u32, Instant)>,
    force_switch: bool,
}

impl Rewriter {
    /// A rewriter for a down-track sending as `out_ssrc`. The first source passes through
    /// unchanged (same sequence numbers and timestamps) until the first switch.
    pub fn new(out_ssrc: u32) -> Self {
        Rewriter {
            out_ssrc,
            initial_seq: None,
            initial_ts: None,
            source: None,
            previous: None,
            last_out_seq: None,
            last_out_ts: None,
            force_switch: false,
        }
    }

    /// A rewriter whose first outgoing packet gets sequence number `seq` and timestamp `ts`
    /// (e.g. random values, as RFC 3550 recommends).
    pub fn with_initial(out_ssrc: u32, seq: u16, ts: u32) -> Self {
        Rewriter {
            initial_seq: Some(seq),
            initial_ts: Some(ts),
            ..Rewriter::new(out_ssrc)
        }
    }

    /// The outgoing SSRC.
    pub fn out_ssrc(&self) -> u32 {
        self.out_ssrc
    }

    /// The SSRC of the current source, if any packet was forwarded yet.
    pub fn current_source(&self) -> Option<u32> {
        self.source.as_ref().map(|s| s.ssrc)
    }

    /// The highest outgoing sequence number sent so far.
    pub fn last_out_seq(&self) -> Option<u16> {
        self.last_out_seq.map(|s| s as u16)
    }

    /// The newest outgoing timestamp sent so far.
    pub fn last_out_timestamp(&self) -> Option<u32> {
        self.last_out_ts.map(|(ts, _)| ts)
    }

    /// Make the next forwarded packet a switch point even if it comes from the current SSRC:
    /// continuous output, no gap for whatever the source sent in between. Use it when
    /// resuming after a pause (call it when pausing, then forward from the next keyframe) or
    /// when the publisher restarted a stream without changing its SSRC.
    pub fn force_switch(&mut self) {
        self.force_switch = true;
    }

    /// Map a packet the caller wants to forward. `None` means: do not send it (it is older
    /// than the switch point, a late packet of the previous source, older than
    /// [`REORDER_WINDOW`], or a retransmission of a packet that was [`skip`](Self::skip)ped).
    ///
    /// A packet whose SSRC is not the current source's starts a new source; it should be the
    /// first packet of a keyframe (the rewriter does not check: that is the selector's job).
    pub fn rewrite(&mut self, p: &SrcPacket) -> Option<OutHeader> {
        let same = self.source.as_ref().is_some_and(|s| s.ssrc == p.ssrc);
        let switched = self.force_switch || !same;
        if switched {
            if let Some((ssrc, highest, at)) = self.previous {
                if ssrc == p.ssrc
                    && !self.force_switch
                    && p.arrival.saturating_duration_since(at) < PREVIOUS_SOURCE_GRACE
                    && unwrap(highest, p.seq) <= highest
                {
                    // A late packet (or retransmission) of the source we switched away from.
                    return None;
                }
            }
            self.start_source(p);
        }
        let src = self.source.as_mut()?;
        let ext = src.unwrap_seq(p.seq);
        if src.too_old(ext) {
            return None;
        }
        let offset = src.offset_for(ext)?;
        if ext > src.highest {
            src.highest = ext;
            src.prune();
        }
        let out_ext = (ext as i64).saturating_add(offset).max(0) as u64;
        self.last_out_seq = Some(self.last_out_seq.map_or(out_ext, |l| l.max(out_ext)));
        let ts = p.timestamp.wrapping_add(src.ts_offset);
        let newer = match self.last_out_ts {
            None => true,
            Some((last, _)) => (ts.wrapping_sub(last) as i32) > 0,
        };
        if newer {
            self.last_out_ts = Some((ts, p.arrival));
        }
        Some(OutHeader {
            ssrc: self.out_ssrc,
            seq: out_ext as u16,
            timestamp: ts,
            switched,
        })
    }

    /// Report a packet of the current source that the caller drops on purpose, so that it
    /// leaves no gap in the output.
    ///
    /// Returns `true` if the packet leaves no hole: it was newer than anything seen so its
    /// slot was removed, or it never had a slot (other source, already skipped, too old).
    /// Returns `false` if its outgoing slot was already reserved because a newer packet was
    /// forwarded first (reordering): the receiver will see a gap there, unless this packet
    /// had itself been forwarded earlier (a duplicate), in which case `false` is harmless.
    /// If in doubt, forwarding such a packet rather than skipping it is always safe.
    ///
    /// Calling `skip` for packets of sources other than the current one is a no-op.
    pub fn skip(&mut self, p: &SrcPacket) -> bool {
        if self.force_switch {
            return true;
        }
        let Some(src) = self.source.as_mut() else {
            return true;
        };
        if src.ssrc != p.ssrc {
            return true;
        }
        let ext = src.unwrap_seq(p.seq);
        if ext <= src.highest {
            return src.too_old(ext) || src.offset_for(ext).is_none();
        }
        let Some(last) = src.segments.back_mut() else {
            return true;
        };
        if last.skipped > 0 && last.from == ext {
            // Extends the run of skips that ended just before.
            last.from += 1;
            last.skipped += 1;
            last.offset -= 1;
        } else {
            let seg = Segment {
                from: ext + 1,
                skipped: 1,
                offset: last.offset - 1,
            };
            src.segments.push_back(seg);
        }
        src.highest = ext;
        src.prune();
        true
    }

    /// Right after [`rewrite`](Self::rewrite) returned a switch point, and before any other
    /// packet: move the new source one outgoing sequence number up, leaving the switch
    /// packet's slot free for a packet of the caller's own (H.264 parameter sets sent ahead of
    /// an IDR). Returns the switch packet's new sequence number; the freed slot is the one
    /// `rewrite` returned. `None` (and nothing changes) if the source has seen more than its
    /// first packet. The freed slot maps to no source packet ([`source_seq`](Self::source_seq)).
    pub fn open_slot_before_switch(&mut self) -> Option<u16> {
        let src = self.source.as_mut()?;
        let [seg] = src.segments.make_contiguous() else {
            return None;
        };
        if seg.from != src.highest || seg.skipped != 0 {
            return None;
        }
        seg.offset += 1;
        let last = self.last_out_seq.as_mut()?;
        *last += 1;
        Some(*last as u16)
    }

    /// Reserve the next outgoing sequence number for a packet the down-track inserts itself
    /// (padding for bandwidth probing), with the newest timestamp sent: the current source's
    /// later packets move up by one. `None` before the first packet, or while a switch is
    /// pending. Call it between frames only (after a marker packet), so no packet of the
    /// frame before it is still to come.
    pub fn insert(&mut self) -> Option<(u16, u32)> {
        if self.force_switch {
            return None;
        }
        let src = self.source.as_mut()?;
        let (last_seq, (ts, _)) = (self.last_out_seq?, self.last_out_ts?);
        let from = src.highest + 1;
        let last = src.segments.back_mut()?;
        if last.from == from {
            last.offset += 1;
        } else {
            let seg = Segment {
                from,
                skipped: 0,
                offset: last.offset + 1,
            };
            src.segments.push_back(seg);
            src.prune();
        }
        let seq = last_seq + 1;
        self.last_out_seq = Some(seq);
        Some((seq as u16, ts))
    }

    /// Map an outgoing sequence number (e.g. from a subscriber's NACK) back to the source
    /// packet `(ssrc, seq)` it stands for. Only packets of the current source within the
    /// reorder window can be mapped; slots of packets lost upstream map too (the source may
    /// still retransmit them).
    pub fn source_seq(&self, out_seq: u16) -> Option<(u32, u16)> {
        let src = self.source.as_ref()?;
        let out_ext = unwrap(self.last_out_seq?, out_seq) as i64;
        for (i, seg) in src.segments.iter().enumerate() {
            let end = match src.segments.get(i + 1) {
                Some(n) => n.from.saturating_sub(n.skipped),
                None => src.highest.saturating_add(1),
            };
            let start_out = (seg.from as i64).saturating_add(seg.offset);
            let end_out = (end as i64).saturating_add(seg.offset);
            if out_ext >= start_out && out_ext < end_out {
                let in_ext = (out_ext - seg.offset).max(0) as u64;
                if src.too_old(in_ext) {
                    return None;
                }
                return Some((src.ssrc, in_ext as u16));
            }
        }
        None
    }

    /// Map a timestamp of the current source to the outgoing timeline (e.g. to translate the
    /// publisher's sender reports). `None` if `ssrc` is not the current source.
    pub fn map_timestamp(&self, ssrc: u32, ts: u32) -> Option<u32> {
        let src = self.source.as_ref()?;
        (src.ssrc == ssrc).then(|| ts.wrapping_add(src.ts_offset))
    }

    fn start_source(&mut self, p: &SrcPacket) {
        self.force_switch = false;
        if let Some(old) = self.source.take() {
            self.previous = Some((old.ssrc, old.highest, p.arrival));
        }
        let ext = EXT_BASE + u64::from(p.seq);
        let out_first = match self.last_out_seq {
            Some(l) => l + 1,
            None => EXT_BASE + u64::from(self.initial_seq.unwrap_or(p.seq)),
        };
        let offset = out_first as i64 - ext as i64;
        let ts_out = match self.last_out_ts {
            Some((last, at)) => last.wrapping_add(ts_advance(at, p.arrival, p.clock_rate)),
            None => self.initial_ts.unwrap_or(p.timestamp),
        };
        self.source = Some(Source {
            ssrc: p.ssrc,
            highest: ext,
            segments: VecDeque::from([Segment {
                from: ext,
                skipped: 0,
                offset,
            }]),
            ts_offset: ts_out.wrapping_sub(p.timestamp),
        });
    }
}

/// One munged VP8 descriptor field: `out = (in + offset) mod modulus`.
#[derive(Debug, Clone, Copy, Default)]
struct Field {
    offset: Option<u16>,
    /// Newest value sent (in the width it was sent with).
    last: Option<u16>,
    rebase: bool,
    /// Modulus of the previous packet's field (PictureID: 7 or 15 bits).
    modulus: u16,
}

impl Field {
    /// `modulus` is a power of two no larger than 2^15.
    fn map(&mut self, value: u16, modulus: u16) -> u16 {
        let mask = modulus.wrapping_sub(1);
        if self.modulus != modulus {
            // The source changed the field's width without a switch: an offset computed in the
            // other width means nothing here, so continue from the last value sent.
            self.rebase |= self.modulus != 0;
            self.modulus = modulus;
        }
        let offset = match self.offset {
            Some(o) if !self.rebase => o,
            _ => {
                let want = self.last.map_or(value, |l| l.wrapping_add(1));
                let o = want.wrapping_sub(value);
                self.offset = Some(o);
                self.rebase = false;
                o
            }
        };
        let out = value.wrapping_add(offset) & mask;
        match self.last {
            Some(l) => {
                let d = out.wrapping_sub(l) & mask;
                if d != 0 && d < modulus / 2 {
                    self.last = Some(out);
                }
            }
            None => self.last = Some(out),
        }
        out
    }
}

/// Keeps VP8 PictureID, TL0PICIDX and KEYIDX continuous across source switches, rewriting
/// the payload descriptor in place (see the module docs for the width choice).
///
/// Call [`munge`](Self::munge) for every VP8 packet the [`Rewriter`] forwarded (and only
/// those), with the `switched` flag of its [`OutHeader`].
#[derive(Debug, Clone, Default)]
pub struct Vp8Munger {
    picture_id: Field,
    tl0_pic_idx: Field,
    key_idx: Field,
}

impl Vp8Munger {
    /// A munger that passes the first source's values through unchanged.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rewrite the descriptor of `payload` (the RTP payload) in place. `switched` is
    /// [`OutHeader::switched`]: the offsets are re-based on the first packet of a new source
    /// that carries each field. Returns the descriptor as parsed before rewriting (for the
    /// TID, frame-start flags, ...). On error the payload is left unchanged, except that a
    /// truncated descriptor cannot be rewritten at all.
    pub fn munge(
        &mut self,
        payload: &mut [u8],
        switched: bool,
    ) -> Result<vp8::Descriptor, vp8::Vp8Error> {
        let (d, plan) = self.plan(payload, switched)?;
        plan.apply(&d, payload)?;
        Ok(d)
    }

    /// Like [`munge`](Self::munge), for a shared payload: returns the payload itself (no copy)
    /// when no descriptor field changes, which is the case for every packet of the first source
    /// a down-track forwards; a rewritten copy otherwise. A payload whose descriptor cannot be
    /// parsed is returned unchanged.
    pub fn munge_shared(&mut self, payload: &Bytes, switched: bool) -> Bytes {
        let Ok((d, plan)) = self.plan(payload, switched) else {
            return payload.clone();
        };
        if !plan.changes() {
            return payload.clone();
        }
        let mut out = BytesMut::from(&payload[..]);
        // The fields were found by parsing this very payload, so writing them cannot fail.
        let _ = plan.apply(&d, &mut out);
        out.freeze()
    }

    /// Map the descriptor fields of `payload` (advancing the munger's state) without writing.
    fn plan(
        &mut self,
        payload: &[u8],
        switched: bool,
    ) -> Result<(vp8::Descriptor, MungePlan), vp8::Vp8Error> {
        if switched {
            self.picture_id.rebase = true;
            self.tl0_pic_idx.rebase = true;
            self.key_idx.rebase = true;
        }
        let d = vp8::parse_descriptor(payload)?;
        let picture_id = d
            .picture_id
            .map(|pid| (pid.value(), self.picture_id.map(pid.value(), pid.modulus())));
        let tl0_pic_idx = d
            .tl0_pic_idx
            .map(|t| (u16::from(t), self.tl0_pic_idx.map(u16::from(t), 256)));
        let key_idx = d.key_idx.map(|k| {
            (
                u16::from(k),
                self.key_idx.map(u16::from(k), vp8::KEYIDX_MODULUS),
            )
        });
        Ok((
            d,
            MungePlan {
                picture_id,
                tl0_pic_idx,
                key_idx,
            },
        ))
    }
}

/// The (input, output) value of each descriptor field present in one packet.
#[derive(Debug, Clone, Copy)]
struct MungePlan {
    picture_id: Option<(u16, u16)>,
    tl0_pic_idx: Option<(u16, u16)>,
    key_idx: Option<(u16, u16)>,
}

impl MungePlan {
    fn changes(&self) -> bool {
        [self.picture_id, self.tl0_pic_idx, self.key_idx]
            .into_iter()
            .flatten()
            .any(|(i, o)| i != o)
    }

    fn apply(&self, d: &vp8::Descriptor, payload: &mut [u8]) -> Result<(), vp8::Vp8Error> {
        if let Some((_, out)) = self.picture_id {
            d.set_picture_id(payload, out)?;
        }
        if let Some((_, out)) = self.tl0_pic_idx {
            d.set_tl0_pic_idx(payload, out as u8)?;
        }
        if let Some((_, out)) = self.key_idx {
            d.set_key_idx(payload, out as u8)?;
        }
        Ok(())
    }
}

#[cfg(test)]
// Tests pick an arbitrary origin for their virtual time (and may share test state).
#[allow(clippy::disallowed_methods, clippy::disallowed_types)]
mod tests {
    use super::*;
    use crate::sfu::vp8::PictureId;
    use crate::sfu::vp8::tests::{XorShift, build};
    use std::collections::{BTreeMap, BTreeSet};

    const OUT: u32 = 0xdead_beef;

    struct Clock(Instant);
    impl Clock {
        fn at(&self, ms: u64) -> Instant {
            self.0 + Duration::from_millis(ms)
        }
    }

    fn pkt(ssrc: u32, seq: u16, ts: u32, at: Instant) -> SrcPacket {
        SrcPacket {
            ssrc,
            seq,
            timestamp: ts,
            clock_rate: 90_000,
            arrival: at,
        }
    }

    fn seq_of(r: &mut Rewriter, p: SrcPacket) -> Option<u16> {
        r.rewrite(&p).map(|h| h.seq)
    }

    /// Inserted packets (probe padding) take the next numbers; the source's later packets
    /// follow them, earlier (reordered) ones keep their slots, skips and switches still work.
    #[test]
    fn inserted_packets_continue_the_numbering() {
        let c = Clock(Instant::now());
        let mut r = Rewriter::new(OUT);
        assert_eq!(r.insert(), None, "nothing sent yet");
        assert_eq!(seq_of(&mut r, pkt(1, 65_534, 5000, c.at(0))), Some(65_534));
        assert_eq!(seq_of(&mut r, pkt(1, 65_535, 5000, c.at(1))), Some(65_535));
        assert_eq!(r.insert(), Some((0, 5000)), "wraps");
        assert_eq!(r.insert(), Some((1, 5000)));
        // 0 was lost upstream: its slot comes after the padding.
        assert_eq!(seq_of(&mut r, pkt(1, 1, 8000, c.at(33))), Some(3));
        assert_eq!(
            seq_of(&mut r, pkt(1, 0, 8000, c.at(34))),
            Some(2),
            "late, own slot"
        );
        assert!(r.skip(&pkt(1, 2, 8000, c.at(35))));
        assert_eq!(r.insert(), Some((4, 8000)));
        assert_eq!(seq_of(&mut r, pkt(1, 3, 11_000, c.at(66))), Some(5));
        assert_eq!(r.source_seq(5), Some((1, 3)));
        // A switch continues after everything.
        r.force_switch();
        assert_eq!(r.insert(), None, "not while a switch is pending");
        assert_eq!(seq_of(&mut r, pkt(2, 500, 1, c.at(99))), Some(6));
        assert_eq!(r.insert().map(|(s, _)| s), Some(7));
        assert_eq!(seq_of(&mut r, pkt(2, 501, 2, c.at(100))), Some(8));
    }

    #[test]
    fn first_source_passes_through() {
        let c = Clock(Instant::now());
        let mut r = Rewriter::new(OUT);
        let h = r.rewrite(&pkt(1, 1000, 5000, c.at(0))).unwrap();
        assert_eq!(
            h,
            OutHeader {
                ssrc: OUT,
                seq: 1000,
                timestamp: 5000,
                switched: true
            }
        );
        let h = r.rewrite(&pkt(1, 1001, 8000, c.at(33))).unwrap();
        assert_eq!(
            h,
            OutHeader {
                ssrc: OUT,
                seq: 1001,
                timestamp: 8000,
                switched: false
            }
        );
        assert_eq!(r.current_source(), Some(1));
        assert_eq!(r.last_out_seq(), Some(1001));
        assert_eq!(r.last_out_timestamp(), Some(8000));
        assert_eq!(r.out_ssrc(), OUT);
    }

    #[test]
    fn initial_values() {
        let c = Clock(Instant::now());
        let mut r = Rewriter::with_initial(OUT, 7, 1_000_000);
        let h = r.rewrite(&pkt(1, 40_000, 5000, c.at(0))).unwrap();
        assert_eq!((h.seq, h.timestamp), (7, 1_000_000));
        let h = r.rewrite(&pkt(1, 40_001, 5090, c.at(1))).unwrap();
        assert_eq!((h.seq, h.timestamp), (8, 1_000_090));
    }

    #[test]
    fn seq_wraps_within_a_source() {
        let c = Clock(Instant::now());
        let mut r = Rewriter::with_initial(OUT, 100, 0);
        let seqs = [65533u16, 65534, 65535, 0, 1, 2];
        let outs: Vec<u16> = seqs
            .iter()
            .map(|&s| seq_of(&mut r, pkt(1, s, 0, c.at(0))).unwrap())
            .collect();
        assert_eq!(outs, vec![100, 101, 102, 103, 104, 105]);

        // Output wrap: the source is far from the wrap, the output crosses it.
        let mut r = Rewriter::with_initial(OUT, 65534, 0);
        let outs: Vec<u16> = (500..504)
            .map(|s| seq_of(&mut r, pkt(1, s, 0, c.at(0))).unwrap())
            .collect();
        assert_eq!(outs, vec![65534, 65535, 0, 1]);
        // A late packet from before the output wrap still maps correctly.
        assert_eq!(r.source_seq(65535), Some((1, 501)));
        assert_eq!(r.source_seq(1), Some((1, 503)));
    }

    #[test]
    fn many_wraps_stay_continuous() {
        let c = Clock(Instant::now());
        let mut r = Rewriter::with_initial(OUT, 3, 0);
        let mut expect = 3u16;
        for i in 0..300_000u32 {
            let s = (60_000u32 + i) as u16;
            assert_eq!(seq_of(&mut r, pkt(1, s, i, c.at(0))), Some(expect));
            expect = expect.wrapping_add(1);
        }
    }

    #[test]
    fn timestamp_wraps_within_a_source() {
        let c = Clock(Instant::now());
        let mut r = Rewriter::with_initial(OUT, 0, 100);
        let tss = [u32::MAX - 3000, u32::MAX, 2999, 5999];
        let mut outs = Vec::new();
        for (i, &ts) in tss.iter().enumerate() {
            outs.push(r.rewrite(&pkt(1, i as u16, ts, c.at(0))).unwrap().timestamp);
        }
        assert_eq!(outs, vec![100, 3100, 6100, 9100]);
        assert_eq!(r.last_out_timestamp(), Some(9100));

        // Output timestamps wrap too.
        let mut r = Rewriter::with_initial(OUT, 0, u32::MAX - 1);
        let a = r.rewrite(&pkt(1, 0, 1000, c.at(0))).unwrap().timestamp;
        let b = r.rewrite(&pkt(1, 1, 4000, c.at(33))).unwrap().timestamp;
        assert_eq!((a, b), (u32::MAX - 1, 2998));
        assert_eq!(r.last_out_timestamp(), Some(2998));
        assert_eq!(r.map_timestamp(1, 7000), Some(5998));
        assert_eq!(r.map_timestamp(2, 7000), None);
    }

    #[test]
    fn switch_is_continuous() {
        let c = Clock(Instant::now());
        let mut r = Rewriter::new(OUT);
        for i in 0..10u16 {
            let h = r
                .rewrite(&pkt(
                    1,
                    500 + i,
                    90_000 + u32::from(i) * 3000,
                    c.at(u64::from(i) * 33),
                ))
                .unwrap();
            assert_eq!(h.seq, 500 + i);
        }
        // Last out: seq 509, ts 117000 (arrived at 297 ms). Switch at 317 ms: +20 ms = 1800.
        let h = r.rewrite(&pkt(2, 30_000, 7, c.at(317))).unwrap();
        assert_eq!(
            h,
            OutHeader {
                ssrc: OUT,
                seq: 510,
                timestamp: 118_800,
                switched: true
            }
        );
        let h = r.rewrite(&pkt(2, 30_001, 3007, c.at(350))).unwrap();
        assert_eq!(
            h,
            OutHeader {
                ssrc: OUT,
                seq: 511,
                timestamp: 121_800,
                switched: false
            }
        );
        assert_eq!(r.current_source(), Some(2));

        // Switch with no elapsed time: the timestamp still moves forward by 1.
        let h = r.rewrite(&pkt(3, 9, 42, c.at(350))).unwrap();
        assert_eq!((h.seq, h.timestamp, h.switched), (512, 121_801, true));

        // Opus-like clock rate.
        let mut a = pkt(4, 1, 1, c.at(1350));
        a.clock_rate = 48_000;
        let h = r.rewrite(&a).unwrap();
        assert_eq!((h.seq, h.timestamp), (513, 121_801 + 48_000));
    }

    #[test]
    fn packets_older_than_the_switch_point_are_dropped() {
        let c = Clock(Instant::now());
        let mut r = Rewriter::new(OUT);
        r.rewrite(&pkt(1, 10, 0, c.at(0))).unwrap();
        r.rewrite(&pkt(1, 11, 0, c.at(0))).unwrap();
        // Switch to source 2 at its seq 100.
        assert_eq!(seq_of(&mut r, pkt(2, 100, 0, c.at(10))), Some(12));
        // Reordered packet of source 2 from before the keyframe: dropped.
        assert_eq!(seq_of(&mut r, pkt(2, 99, 0, c.at(11))), None);
        assert_eq!(seq_of(&mut r, pkt(2, 101, 0, c.at(11))), Some(13));
        // Late packet / retransmission of the old source: dropped, not a switch back.
        assert_eq!(seq_of(&mut r, pkt(1, 11, 0, c.at(12))), None);
        assert_eq!(seq_of(&mut r, pkt(1, 5, 0, c.at(12))), None);
        assert_eq!(r.current_source(), Some(2));
        assert_eq!(seq_of(&mut r, pkt(2, 102, 0, c.at(13))), Some(14));
        // A genuinely new packet of the old source is a switch back.
        let h = r.rewrite(&pkt(1, 40, 0, c.at(14))).unwrap();
        assert_eq!((h.seq, h.switched), (15, true));
        assert_eq!(r.current_source(), Some(1));
        // Now source 2's late packets are the stale ones.
        assert_eq!(seq_of(&mut r, pkt(2, 102, 0, c.at(15))), None);
    }

    #[test]
    fn switch_back_after_a_long_time_works_even_if_seq_looks_old() {
        let c = Clock(Instant::now());
        let mut r = Rewriter::with_initial(OUT, 0, 0);
        r.rewrite(&pkt(1, 40_000, 0, c.at(0))).unwrap();
        r.rewrite(&pkt(2, 7, 0, c.at(10))).unwrap();
        // Soon after: a seq of source 1 that looks older is a late packet.
        assert_eq!(seq_of(&mut r, pkt(1, 30_000, 0, c.at(1000))), None);
        // Long after, source 1's numbering moved on by ~40000 and wrapped: it is a switch.
        let h = r.rewrite(&pkt(1, 14_464, 0, c.at(60_000))).unwrap();
        assert_eq!((h.seq, h.switched), (2, true));
    }

    #[test]
    fn duplicates_map_to_the_same_seq() {
        let c = Clock(Instant::now());
        let mut r = Rewriter::with_initial(OUT, 0, 0);
        for s in 0..5u16 {
            r.rewrite(&pkt(1, 200 + s, 1000, c.at(0))).unwrap();
        }
        let h1 = r.rewrite(&pkt(1, 202, 1000, c.at(1))).unwrap();
        let h2 = r.rewrite(&pkt(1, 202, 1000, c.at(2))).unwrap();
        assert_eq!((h1.seq, h2.seq), (2, 2));
        assert!(!h1.switched);
        assert_eq!(r.last_out_seq(), Some(4));
        // Duplicate of the switch packet itself.
        assert_eq!(seq_of(&mut r, pkt(1, 200, 1000, c.at(3))), Some(0));
    }

    #[test]
    fn reordering_within_a_source() {
        let c = Clock(Instant::now());
        let mut r = Rewriter::with_initial(OUT, 1000, 0);
        let order = [10u16, 12, 11, 15, 13, 14, 16];
        let outs: Vec<u16> = order
            .iter()
            .map(|&s| seq_of(&mut r, pkt(1, s, 0, c.at(0))).unwrap())
            .collect();
        assert_eq!(outs, vec![1000, 1002, 1001, 1005, 1003, 1004, 1006]);
        assert_eq!(r.last_out_seq(), Some(1006));
        // Reordering across the 16-bit wrap.
        let mut r = Rewriter::with_initial(OUT, 0, 0);
        let order = [65534u16, 0, 65535, 1];
        let outs: Vec<u16> = order
            .iter()
            .map(|&s| seq_of(&mut r, pkt(1, s, 0, c.at(0))).unwrap())
            .collect();
        assert_eq!(outs, vec![0, 2, 1, 3]);
    }

    #[test]
    fn timestamp_of_reordered_packets_does_not_move_the_newest() {
        let c = Clock(Instant::now());
        let mut r = Rewriter::with_initial(OUT, 0, 0);
        r.rewrite(&pkt(1, 1, 3000, c.at(0))).unwrap();
        r.rewrite(&pkt(1, 3, 9000, c.at(66))).unwrap();
        r.rewrite(&pkt(1, 2, 6000, c.at(70))).unwrap();
        assert_eq!(r.last_out_timestamp(), Some(6000));
        // The switch measures time from the arrival of the newest timestamp (66 ms).
        let h = r.rewrite(&pkt(2, 0, 0, c.at(76))).unwrap();
        assert_eq!(h.timestamp, 6000 + 900);
    }

    #[test]
    fn loss_gaps_are_preserved() {
        let c = Clock(Instant::now());
        let mut r = Rewriter::with_initial(OUT, 50, 0);
        assert_eq!(seq_of(&mut r, pkt(1, 1, 0, c.at(0))), Some(50));
        assert_eq!(seq_of(&mut r, pkt(1, 2, 0, c.at(0))), Some(51));
        // 3 and 4 lost.
        assert_eq!(seq_of(&mut r, pkt(1, 5, 0, c.at(0))), Some(54));
        // The retransmission of 3 fills its slot.
        assert_eq!(seq_of(&mut r, pkt(1, 3, 0, c.at(0))), Some(52));
        // A NACK for out 53 maps to source seq 4.
        assert_eq!(r.source_seq(53), Some((1, 4)));
        assert_eq!(r.source_seq(55), None); // not sent yet
    }

    #[test]
    fn skipped_packets_leave_no_gap() {
        let c = Clock(Instant::now());
        let mut r = Rewriter::with_initial(OUT, 0, 0);
        assert_eq!(seq_of(&mut r, pkt(1, 100, 0, c.at(0))), Some(0));
        assert!(r.skip(&pkt(1, 101, 0, c.at(0))));
        assert_eq!(seq_of(&mut r, pkt(1, 102, 0, c.at(0))), Some(1));
        // A run of skips.
        for s in 103..110 {
            assert!(r.skip(&pkt(1, s, 0, c.at(0))));
        }
        assert_eq!(seq_of(&mut r, pkt(1, 110, 0, c.at(0))), Some(2));
        // A retransmission of a skipped packet is not forwarded.
        assert_eq!(seq_of(&mut r, pkt(1, 101, 0, c.at(0))), None);
        assert_eq!(seq_of(&mut r, pkt(1, 105, 0, c.at(0))), None);
        assert!(r.skip(&pkt(1, 105, 0, c.at(0))));
        // Duplicates of forwarded packets keep their numbers.
        assert_eq!(seq_of(&mut r, pkt(1, 102, 0, c.at(0))), Some(1));
        // Reverse mapping skips the holes.
        assert_eq!(r.source_seq(0), Some((1, 100)));
        assert_eq!(r.source_seq(1), Some((1, 102)));
        assert_eq!(r.source_seq(2), Some((1, 110)));

        // Loss then skip: 111 lost, 112 skipped, 113 forwarded. The hole for 111 stays.
        assert!(r.skip(&pkt(1, 112, 0, c.at(0))));
        assert_eq!(seq_of(&mut r, pkt(1, 113, 0, c.at(0))), Some(4));
        assert_eq!(seq_of(&mut r, pkt(1, 111, 0, c.at(0))), Some(3));
        assert_eq!(r.source_seq(3), Some((1, 111)));

        // Skipping a reordered packet whose slot is already reserved: reported.
        assert_eq!(seq_of(&mut r, pkt(1, 115, 0, c.at(0))), Some(6));
        assert!(!r.skip(&pkt(1, 114, 0, c.at(0))));
        // A duplicate of a forwarded packet: also false (harmless).
        assert!(!r.skip(&pkt(1, 115, 0, c.at(0))));

        // Skips of another source are no-ops.
        assert!(r.skip(&pkt(9, 1, 0, c.at(0))));
        assert_eq!(seq_of(&mut r, pkt(1, 116, 0, c.at(0))), Some(7));
    }

    #[test]
    fn skips_before_a_switch_leave_no_gap() {
        let c = Clock(Instant::now());
        let mut r = Rewriter::with_initial(OUT, 0, 0);
        assert_eq!(seq_of(&mut r, pkt(1, 10, 0, c.at(0))), Some(0));
        assert!(r.skip(&pkt(1, 11, 0, c.at(0))));
        assert!(r.skip(&pkt(1, 12, 0, c.at(0))));
        assert_eq!(seq_of(&mut r, pkt(2, 900, 0, c.at(0))), Some(1));
    }

    #[test]
    fn force_switch_resumes_without_gap() {
        let c = Clock(Instant::now());
        let mut r = Rewriter::with_initial(OUT, 0, 0);
        for s in 0..5u16 {
            r.rewrite(&pkt(1, s, u32::from(s) * 3000, c.at(u64::from(s) * 33)))
                .unwrap();
        }
        // Paused: the caller drops 5..=99 and does not report them.
        r.force_switch();
        assert!(r.skip(&pkt(1, 50, 0, c.at(200)))); // no-op while a switch is pending
        let h = r.rewrite(&pkt(1, 100, 300_000, c.at(1132))).unwrap();
        // Last out ts 12000 at 132 ms; resumed 1000 ms later.
        assert_eq!((h.seq, h.timestamp, h.switched), (5, 12_000 + 90_000, true));
        assert_eq!(seq_of(&mut r, pkt(1, 101, 303_000, c.at(1165))), Some(6));
        // Packets from before the resume point are dropped.
        assert_eq!(seq_of(&mut r, pkt(1, 4, 0, c.at(1166))), None);
        assert_eq!(seq_of(&mut r, pkt(1, 99, 0, c.at(1166))), None);
    }

    #[test]
    fn a_slot_opens_before_a_switch_point() {
        let t = Instant::now();
        let mut r = Rewriter::with_initial(9, 100, 0);
        assert_eq!(r.open_slot_before_switch(), None, "nothing forwarded yet");
        let first = r.rewrite(&pkt(1, 500, 0, t)).unwrap();
        assert_eq!(first.seq, 100);
        assert_eq!(r.open_slot_before_switch(), Some(101));
        assert_eq!(seq_of(&mut r, pkt(1, 501, 0, t)), Some(102));
        assert_eq!(r.source_seq(102), Some((1, 501)));
        assert_eq!(r.source_seq(101), Some((1, 500)));
        assert_eq!(r.source_seq(100), None, "the caller's packet");
        assert_eq!(
            r.open_slot_before_switch(),
            None,
            "not right after a switch"
        );
        // at a switch to another source
        let sw = r.rewrite(&pkt(2, 7000, 90, t)).unwrap();
        assert!(sw.switched);
        assert_eq!(sw.seq, 103);
        assert_eq!(r.open_slot_before_switch(), Some(104));
        assert_eq!(seq_of(&mut r, pkt(2, 7001, 90, t)), Some(105));
        assert_eq!(r.last_out_seq(), Some(105));
        // a retransmission of the switch packet keeps its moved number
        assert_eq!(seq_of(&mut r, pkt(2, 7000, 90, t)), Some(104));
    }

    #[test]
    fn packets_beyond_the_reorder_window_are_dropped() {
        let c = Clock(Instant::now());
        let mut r = Rewriter::with_initial(OUT, 0, 0);
        for s in 0..=3000u16 {
            r.rewrite(&pkt(1, s, 0, c.at(0))).unwrap();
        }
        assert_eq!(seq_of(&mut r, pkt(1, 3000 - 2048, 0, c.at(0))), Some(952));
        assert_eq!(seq_of(&mut r, pkt(1, 3000 - 2049, 0, c.at(0))), None);
        assert_eq!(r.source_seq(951), None);
        assert_eq!(r.source_seq(952), Some((1, 952)));
    }

    #[test]
    fn many_skips_are_bounded() {
        let c = Clock(Instant::now());
        let mut r = Rewriter::with_initial(OUT, 0, 0);
        let mut expect = 0u16;
        for i in 0..100_000u32 {
            let s = i as u16;
            if i % 2 == 1 {
                assert!(r.skip(&pkt(1, s, 0, c.at(0))));
            } else {
                assert_eq!(seq_of(&mut r, pkt(1, s, 0, c.at(0))), Some(expect));
                expect = expect.wrapping_add(1);
            }
        }
        let src = r.source.as_ref().unwrap();
        assert!(src.segments.len() <= MAX_SEGMENTS + 1);
        // A recent retransmission still maps right.
        let back = (99_990u32) as u16;
        assert_eq!(seq_of(&mut r, pkt(1, back, 0, c.at(0))), Some(49_995));
    }

    /// Random single-source streams with loss, reordering, duplicates and skips; check that
    /// the mapping is the order-preserving, gap-preserving, skip-compressing one.
    #[test]
    fn random_streams_keep_invariants() {
        let c = Clock(Instant::now());
        let mut rng = XorShift(0x1234_5678_9abc_def1);
        for round in 0..200 {
            let start = (rng.next() as u16).wrapping_sub(round * 7);
            let mut r = Rewriter::with_initial(OUT, rng.next() as u16, 0);
            let n = 400u32;
            // Decide per packet: lost, skipped, or forwarded.
            let mut fate = Vec::new();
            for i in 0..n {
                let x = rng.next() % 10;
                fate.push(if i == 0 { 2 } else { x });
            }
            // Arrival order: mostly in order, with local swaps and duplicates.
            let mut order: Vec<u32> = (0..n).collect();
            for i in 1..order.len() {
                if rng.next() % 5 == 0 {
                    order.swap(i - 1, i);
                }
            }
            // Keep packet 0 first: it is the switch point.
            let pos0 = order.iter().position(|&x| x == 0).unwrap();
            order.remove(pos0);
            order.insert(0, 0);
            let mut outs: BTreeMap<u32, u16> = BTreeMap::new();
            let mut skipped = BTreeSet::new();
            let mut highest_seen = 0u32;
            for &i in &order {
                let p = pkt(1, start.wrapping_add(i as u16), 0, c.at(0));
                match fate[i as usize] {
                    0 => {} // lost
                    1 if i > highest_seen => {
                        assert!(r.skip(&p));
                        skipped.insert(i);
                    }
                    _ => {
                        let h = r.rewrite(&p).expect("forwardable");
                        if let Some(prev) = outs.insert(i, h.seq) {
                            assert_eq!(prev, h.seq);
                        }
                        if rng.next() % 7 == 0 {
                            assert_eq!(r.rewrite(&p).unwrap().seq, h.seq);
                        }
                    }
                }
                highest_seen = highest_seen.max(i);
            }
            // out(b) - out(a) == (b - a) - skipped in (a, b)
            let (&first, &first_out) = outs.iter().next().unwrap();
            for (&i, &o) in &outs {
                let skips = skipped.range(first..i).count() as u32;
                let want = first_out.wrapping_add((i - first - skips) as u16);
                assert_eq!(o, want, "round {round} packet {i}");
                assert_eq!(r.source_seq(o), Some((1, start.wrapping_add(i as u16))));
            }
            for &s in &skipped {
                let p = pkt(1, start.wrapping_add(s as u16), 0, c.at(0));
                assert_eq!(r.rewrite(&p), None);
            }
        }
    }

    #[test]
    fn random_garbage_never_panics() {
        let c = Clock(Instant::now());
        let mut rng = XorShift(42);
        let mut r = Rewriter::new(OUT);
        for i in 0..200_000u64 {
            let x = rng.next();
            let ssrc = (x % 3) as u32;
            let mut p = pkt(ssrc, (x >> 8) as u16, (x >> 24) as u32, c.at(i / 10));
            p.clock_rate = if x & 1 == 0 { 90_000 } else { u32::MAX };
            match (x >> 60) % 4 {
                0 => {
                    let _ = r.skip(&p);
                }
                1 => r.force_switch(),
                _ => {
                    let before = r.last_out_seq();
                    if let Some(h) = r.rewrite(&p) {
                        if let (true, Some(b)) = (h.switched, before) {
                            assert_eq!(h.seq, b.wrapping_add(1));
                        }
                    }
                }
            }
            let _ = r.source_seq(x as u16);
        }
    }

    /// Several sources with small random steps (loss, reordering, duplicates), random skips
    /// and switches: output is continuous at switches and never older than the last switch.
    #[test]
    fn random_switching_never_goes_back_past_a_switch() {
        let c = Clock(Instant::now());
        let mut rng = XorShift(4242);
        let mut r = Rewriter::new(OUT);
        let mut next_seq = [100u16, 30_000, 65_000];
        let mut floor: Option<u64> = None;
        for i in 0..200_000u64 {
            let x = rng.next();
            let k = if x % 50 == 0 { (x >> 8) % 3 } else { 0 } as usize;
            let step = ((x >> 16) % 8) as i16 - 2; // -2..=5: reorder, dup, loss
            next_seq[k] = next_seq[k].wrapping_add_signed(step);
            let p = pkt(k as u32, next_seq[k], 0, c.at(i));
            if (x >> 40) % 10 == 0 {
                let _ = r.skip(&p);
                continue;
            }
            if (x >> 40) % 97 == 1 {
                r.force_switch();
            }
            let before = r.last_out_seq;
            if let Some(h) = r.rewrite(&p) {
                let out_ext = match before {
                    Some(b) if !h.switched => unwrap(b, h.seq),
                    Some(b) => {
                        assert_eq!(h.seq, (b + 1) as u16);
                        b + 1
                    }
                    None => EXT_BASE + u64::from(h.seq),
                };
                if h.switched {
                    floor = Some(out_ext);
                }
                assert!(out_ext >= floor.unwrap(), "packet {i}");
            }
        }
    }

    fn vp8_pkt(pid: u16, long: bool, tl0: u8, keyidx: u8) -> Vec<u8> {
        let mut v = build(
            true,
            Some((pid, long)),
            Some(tl0),
            Some((0, false)),
            Some(keyidx),
        );
        v.extend_from_slice(&[0xaa, 0xbb]);
        v
    }

    fn fields(p: &[u8]) -> (u16, u8, u8) {
        let d = vp8::parse_descriptor(p).unwrap();
        (
            d.picture_id.unwrap().value(),
            d.tl0_pic_idx.unwrap(),
            d.key_idx.unwrap(),
        )
    }

    #[test]
    fn munger_passes_first_source_through() {
        let mut m = Vp8Munger::new();
        let mut p = vp8_pkt(1234, true, 9, 3);
        m.munge(&mut p, true).unwrap();
        assert_eq!(fields(&p), (1234, 9, 3));
        let mut p = vp8_pkt(1235, true, 10, 3);
        m.munge(&mut p, false).unwrap();
        assert_eq!(fields(&p), (1235, 10, 3));
        assert_eq!(&p[p.len() - 2..], &[0xaa, 0xbb]);
    }

    /// The shared-payload path copies only when a field changes, and then writes exactly what
    /// the in-place path writes.
    #[test]
    fn munge_shared_copies_only_when_needed() {
        let mut shared = Vp8Munger::new();
        let mut in_place = Vp8Munger::new();
        let mut step = |pid: u16, tl0: u8, switched: bool| {
            let src = Bytes::from(vp8_pkt(pid, true, tl0, 3));
            let out = shared.munge_shared(&src, switched);
            let mut expect = src.to_vec();
            in_place.munge(&mut expect, switched).unwrap();
            assert_eq!(&out[..], &expect[..]);
            out.as_ptr() == src.as_ptr()
        };
        // First source: passed through untouched, no copy.
        assert!(step(500, 7, true));
        assert!(step(501, 8, false));
        // A new source with other numbering: rewritten into a copy.
        assert!(!step(9_000, 100, true));
        assert!(!step(9_001, 101, false));
        // Garbage is passed through as is.
        let junk = Bytes::from_static(&[0x80]);
        assert_eq!(shared.munge_shared(&junk, false), junk);
    }

    #[test]
    fn munger_rebases_on_switch() {
        let mut m = Vp8Munger::new();
        let mut p = vp8_pkt(100, true, 50, 7);
        m.munge(&mut p, true).unwrap();
        for i in 1..=5u16 {
            let mut p = vp8_pkt(100 + i, true, 50 + i as u8, 7);
            m.munge(&mut p, false).unwrap();
        }
        // New layer: completely different numbering.
        let mut p = vp8_pkt(30_000, true, 200, 30);
        let d = m.munge(&mut p, true).unwrap();
        assert_eq!(d.picture_id, Some(PictureId::Long(30_000))); // returned as parsed
        assert_eq!(fields(&p), (106, 56, 8));
        // Second packet of the same keyframe: same values.
        let mut p = vp8_pkt(30_000, true, 200, 30);
        m.munge(&mut p, false).unwrap();
        assert_eq!(fields(&p), (106, 56, 8));
        // Following frames continue, with wraps on the source side (pid 32767 -> 0,
        // tl0 255 -> 0, keyidx 31 -> 0).
        let mut p = vp8_pkt(32_767, true, 255, 31);
        m.munge(&mut p, false).unwrap();
        assert_eq!(fields(&p), (106 + 2767, (56 + 55) as u8, 9));
        let mut p = vp8_pkt(0, true, 0, 0);
        m.munge(&mut p, false).unwrap();
        assert_eq!(fields(&p), (106 + 2768, (56 + 56) as u8, 10));
        // A reordered older frame keeps its mapping and does not move "last".
        let mut p = vp8_pkt(30_001, true, 201, 30);
        m.munge(&mut p, false).unwrap();
        assert_eq!(fields(&p), (107, 57, 8));
        let mut p = vp8_pkt(5, true, 3, 1);
        m.munge(&mut p, true).unwrap();
        assert_eq!(fields(&p), (106 + 2769, (56 + 57) as u8, 11));
    }

    #[test]
    fn munger_wraps_output() {
        let mut m = Vp8Munger::new();
        let mut p = vp8_pkt(32_766, true, 254, 30);
        m.munge(&mut p, true).unwrap();
        let mut p = vp8_pkt(10, true, 0, 0);
        m.munge(&mut p, true).unwrap();
        assert_eq!(fields(&p), (32_767, 255, 31));
        let mut p = vp8_pkt(11, true, 1, 1);
        m.munge(&mut p, false).unwrap();
        assert_eq!(fields(&p), (0, 0, 0));
    }

    #[test]
    fn munger_7bit_and_width_changes() {
        let mut m = Vp8Munger::new();
        let mut p = vp8_pkt(126, false, 0, 0);
        m.munge(&mut p, true).unwrap();
        let mut p = vp8_pkt(127, false, 0, 0);
        m.munge(&mut p, false).unwrap();
        let mut p = vp8_pkt(0, false, 0, 0);
        m.munge(&mut p, false).unwrap();
        assert_eq!(fields(&p).0, 0);
        // Switch to a 15-bit source: continues from the last 7-bit value.
        let mut p = vp8_pkt(9000, true, 0, 0);
        m.munge(&mut p, true).unwrap();
        let d = vp8::parse_descriptor(&p).unwrap();
        assert_eq!(d.picture_id, Some(PictureId::Long(1)));
        // Back to 7 bits: the width of the packet is kept, the numbering continues mod 128.
        for _ in 0..200 {
            let mut p = vp8_pkt(9001, true, 0, 0);
            m.munge(&mut p, false).unwrap();
        }
        let mut p = vp8_pkt(77, false, 0, 0);
        m.munge(&mut p, true).unwrap();
        let d = vp8::parse_descriptor(&p).unwrap();
        assert_eq!(d.picture_id, Some(PictureId::Short(3)));
    }

    /// One source that changes its PictureID width mid-stream (no switch) still yields a
    /// picture id +1 per frame.
    #[test]
    fn munger_width_change_within_a_source() {
        let mut m = Vp8Munger::new();
        let mut p = vp8_pkt(300, true, 0, 0);
        m.munge(&mut p, true).unwrap();
        // Another layer first, so the offsets are non-zero.
        let mut p = vp8_pkt(20_000, true, 0, 0);
        m.munge(&mut p, true).unwrap();
        assert_eq!(
            vp8::parse_descriptor(&p).unwrap().picture_id,
            Some(PictureId::Long(301))
        );
        // The same source now sends 7-bit ids.
        let mut p = vp8_pkt(33, false, 0, 0);
        m.munge(&mut p, false).unwrap();
        assert_eq!(
            vp8::parse_descriptor(&p).unwrap().picture_id,
            Some(PictureId::Short(46)) // 302 mod 128
        );
        let mut p = vp8_pkt(34, false, 0, 0);
        m.munge(&mut p, false).unwrap();
        assert_eq!(
            vp8::parse_descriptor(&p).unwrap().picture_id,
            Some(PictureId::Short(47))
        );
    }

    #[test]
    fn munger_handles_missing_fields_and_garbage() {
        let mut m = Vp8Munger::new();
        // No extensions at all.
        let mut p = vec![0x10, 1, 2, 3];
        m.munge(&mut p, true).unwrap();
        assert_eq!(p, vec![0x10, 1, 2, 3]);
        assert_eq!(m.munge(&mut [], false), Err(vp8::Vp8Error::Truncated));
        // The rebase stays pending until a packet carries the field.
        let mut p = vp8_pkt(500, true, 5, 5);
        m.munge(&mut p, false).unwrap();
        assert_eq!(fields(&p), (500, 5, 5));
        let mut rng = XorShift(7);
        for _ in 0..100_000 {
            let len = (rng.next() % 12) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            let _ = m.munge(&mut buf, rng.next() % 10 == 0);
            assert_eq!(buf.len(), len);
        }
    }
}
