//! Bandwidth probing in the core: which subscriber probes for which layer, the padding after
//! a frame, and what a probe's outcome does to layer selection.
//!
//! At every layer selection, a subscriber with TWCC feedback whose video down-track could go
//! higher than its target ([`LayerSelector::next_up`]) and is not waiting for a keyframe
//! starts a probe cluster on its connection ([`Egress::start_probe`]) for what that layer
//! would need: the media it receives now, that down-track's target replaced by the higher
//! layer with the selector's headroom. While the cluster runs, every video packet with the
//! marker bit (the end of a frame) forwarded to the subscriber is followed by the padding due
//! ([`send_padding`]): on the down-track's RTX stream where the subscriber negotiated RTX
//! (browsers do), else on its media SSRC, numbered by the down-track's rewriter. When the feedback decides the
//! cluster, a success lifts the selectors' hold and selection runs at once
//! ([`Sfu::probe_outcome`]); a failure changes nothing (the prober backs off).

use super::*;
use crate::sfu::probe::{MAX_PADDING, Outcome};
use crate::sfu::selector::HEADROOM_PERCENT;

/// Padding after a frame paces the cluster for this long (about a frame interval).
const FRAME_AHEAD: Duration = Duration::from_millis(33);

/// The padding due on `egress` after a frame just forwarded with `header` (rewritten for the
/// down-track `dt`): padding-only packets on its RTX stream, or continuing the down-track's
/// numbering when it has none, sent to `to`.
pub(super) fn send_padding<T: Transmit>(
    tx: &mut T,
    stats: &mut CoreStats,
    egress: &mut Egress,
    dt: &mut DownTrack,
    header: &rtp::header::Header,
    to: Remote,
    now: Instant,
) {
    let mut due = egress.padding_due(now, FRAME_AHEAD);
    // On the down-track's RTX stream where the subscriber negotiated one (as libwebrtc
    // probes): the media stream's numbering is left alone.
    let rtx = egress.has_rtx(header.ssrc);
    while due > 0 {
        let n = due.min(MAX_PADDING);
        let sealed = if rtx {
            egress.rtx_padding(now, header.ssrc, n)
        } else {
            let Some((seq, timestamp)) = dt.rewriter.insert() else {
                break;
            };
            let mut h = header.clone();
            h.sequence_number = seq;
            h.timestamp = timestamp;
            Some(egress.protect_padding(now, &h, n, dt.twcc_ext))
        };
        let Some(sealed) = sealed else {
            break;
        };
        match sealed {
            Ok(wire) => {
                stats.probe_padding_packets += 1;
                stats.probe_padding_bytes += n as u64;
                tx.send(wire, to, None);
            }
            Err(e) => {
                trace!("probe padding: {e}");
                break;
            }
        }
        due -= n;
    }
    egress.padding_sent();
}

/// A probe to start: what the subscriber's link must show delivered, and the media it gets.
#[derive(Debug, Clone, Copy)]
pub(super) struct ProbeWant {
    pub(super) need_bps: u64,
    pub(super) media_bps: u64,
}

impl ProbeWant {
    /// For a down-track whose target is `target_bps` and whose next layer up is `next_bps`,
    /// of a subscriber receiving `media_bps` in all.
    pub(super) fn new(media_bps: u64, target_bps: u64, next_bps: u64) -> Self {
        let need = media_bps.saturating_sub(target_bps) + next_bps * HEADROOM_PERCENT / 100;
        ProbeWant {
            need_bps: need,
            media_bps,
        }
    }
}

impl<T: Transmit> Sfu<T> {
    /// Start the probes layer selection asked for (one cluster per subscriber at a time).
    pub(super) fn start_probes(&mut self, room: RoomKey, wants: Vec<(PartKey, ProbeWant)>) {
        let now = self.now;
        let Some(r) = self.rooms.get_mut(&room) else {
            return;
        };
        for (part, want) in wants {
            let Some(p) = r.parts.get_mut(&part) else {
                continue;
            };
            // Only where the estimate is what holds the subscriber back.
            if p.estimate().twcc().is_none_or(|e| e >= want.need_bps) {
                continue;
            }
            let Some(eg) = p.egress.as_mut() else {
                continue;
            };
            if eg.start_probe(now, want.need_bps, want.media_bps) {
                self.stats.probe_clusters += 1;
                debug!(
                    participant = %p.pid,
                    need = want.need_bps,
                    media = want.media_bps,
                    "probe cluster"
                );
            }
        }
    }

    /// A probe cluster of `part`'s connection was decided (its feedback came, or never will):
    /// on success its selectors step up at once. Returns whether one was decided.
    pub(super) fn probe_outcome(&mut self, part: PartKey, now: Instant) -> bool {
        let Some(r) = self.rooms.get_mut(&part.room) else {
            return false;
        };
        let Some(p) = r.parts.get_mut(&part) else {
            return false;
        };
        let Some(outcome) = p.egress.as_mut().and_then(|e| e.poll_probe(now)) else {
            return false;
        };
        let estimate = p.estimate().twcc();
        match outcome {
            Outcome::Success { bps } => {
                self.stats.probe_clusters_succeeded += 1;
                debug!(participant = %p.pid, bps, ?estimate, "probe succeeded");
                for t in r.tracks.values_mut() {
                    if let Some(sel) = t.down.get_mut(&part).and_then(|d| d.selector.as_mut()) {
                        sel.probe_succeeded();
                    }
                }
                self.effects.push(Effect::SelectLayers);
            }
            Outcome::Failure { bps } => {
                self.stats.probe_clusters_failed += 1;
                debug!(participant = %p.pid, ?bps, ?estimate, "probe failed");
            }
        }
        true
    }
}
