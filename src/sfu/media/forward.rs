//! One subscription: a subscriber's down-track of one published track (mediasoup calls it a
//! Consumer). For every packet of the track it returns a decision as a value — forward with the
//! rewritten header, or drop with a named reason — which the core's fan-out then acts on
//! (munge, encrypt, send) or counts. Pure: no socket, no clock (`now` is passed in).

use super::keyframe::SwitchWatch;
use super::rewrite::{Rewriter, SrcPacket, Vp8Munger};
use super::selector::{LayerSelector, PacketAction};
use serde::Serialize;
use std::time::Instant;

/// A subscriber's down-track of one published track.
pub struct DownTrack {
    /// The SSRC the subscriber knows this down-track by.
    pub ssrc: u32,
    /// Negotiated on the subscriber connection; `None` until its answer is applied.
    pub payload_type: Option<u8>,
    /// What each payload needs on the way (RED kept, retagged or stripped to its primary
    /// block); learned with `payload_type`.
    pub payload: super::red::Payload,
    /// Negotiated id of the transport-wide sequence number extension, if any.
    pub twcc_ext: Option<u8>,
    pub rewriter: Rewriter,
    /// VP8: keeps picture id / TL0PICIDX / KEYIDX continuous across layer switches.
    pub munger: Option<Vp8Munger>,
    /// Video: which simulcast layer this subscriber gets (one layer for plain video).
    /// `None` for audio, which is always forwarded.
    pub selector: Option<LayerSelector>,
    /// The first subscriber offer that carries this down-track: nothing is forwarded (and no
    /// keyframe spent) before the answer to that offer is applied.
    pub first_offer: u64,
    /// Armed at a layer switch: a NACK for packets sent since asks for another keyframe
    /// (the switch's keyframe was lost on the way; see `keyframe::SwitchWatch`).
    pub switch_watch: Option<SwitchWatch>,
}

/// What the fan-out knows of one incoming packet.
#[derive(Debug, Clone, Copy)]
pub struct Packet {
    /// Index of the simulcast layer it belongs to (0 without simulcast).
    pub layer: usize,
    /// First packet of a keyframe (always `true` for audio).
    pub keyframe: bool,
    pub ssrc: u32,
    pub seq: u16,
    pub timestamp: u32,
    pub clock_rate: u32,
}

/// What to do with one packet for one subscriber.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Forward(Forward),
    Drop(DropReason),
}

/// The rewritten header of a packet to forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    pub ssrc: u32,
    pub payload_type: u8,
    pub seq: u16,
    pub timestamp: u32,
    /// The first packet of a newly selected layer: the subscriber is told which layer it now
    /// receives.
    pub layer_switched: bool,
    /// The first packet of a new source for the rewriter (a layer switch, or the publisher
    /// restarted its stream): codec-specific continuity (VP8 picture id) is re-based.
    pub rebase: bool,
}

/// Why a packet was not forwarded to a subscriber. Counted per reason in `/stats` and `/metrics`
/// (`forward_dropped`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// The subscriber's answer to the offer carrying this track is not applied yet.
    NotNegotiated,
    /// The subscriber connection is not connected (yet, or any more).
    NotConnected,
    /// A simulcast layer this subscriber does not receive.
    OtherLayer,
    /// The layer to switch to has not sent its keyframe yet (one is asked for).
    AwaitingKeyframe,
    /// Older than the last switch point or the reorder window, or a late packet of the
    /// previous layer.
    Stale,
    /// Connected, but no media address or fast path (the subscriber is on its way out).
    NoTransport,
    /// SRTP protection failed.
    Encrypt,
    /// A RED payload that could not be read, for a subscriber that gets its primary block
    /// (or its blocks retagged).
    MalformedRed,
}

impl DownTrack {
    /// The decision for one packet of the track, and the state change it implies (the
    /// selector may switch layers, the rewriter advances).
    pub fn decide(&mut self, p: &Packet, connected: bool, now: Instant) -> Decision {
        let Some(payload_type) = self.payload_type else {
            return Decision::Drop(DropReason::NotNegotiated);
        };
        if !connected {
            return Decision::Drop(DropReason::NotConnected);
        }
        let mut layer_switched = false;
        if let Some(sel) = self.selector.as_mut() {
            match sel.on_packet(p.layer, p.keyframe, now) {
                PacketAction::Drop => {
                    return Decision::Drop(if sel.wants_keyframe().is_some() {
                        DropReason::AwaitingKeyframe
                    } else {
                        DropReason::OtherLayer
                    });
                }
                PacketAction::Forward { switched } => layer_switched = switched,
            }
        }
        if layer_switched {
            self.rewriter.force_switch();
        }
        let src = SrcPacket {
            ssrc: p.ssrc,
            seq: p.seq,
            timestamp: p.timestamp,
            clock_rate: p.clock_rate,
            arrival: now,
        };
        let Some(h) = self.rewriter.rewrite(&src) else {
            return Decision::Drop(DropReason::Stale);
        };
        Decision::Forward(Forward {
            ssrc: self.ssrc,
            payload_type,
            seq: h.seq,
            timestamp: h.timestamp,
            layer_switched,
            rebase: h.switched || layer_switched,
        })
    }

    /// The layer a keyframe is wanted of (a switch is pending), if any.
    pub fn wants_keyframe(&self) -> Option<usize> {
        self.selector
            .as_ref()
            .and_then(LayerSelector::wants_keyframe)
    }
}

/// Packets not forwarded, by [`DropReason`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ForwardDrops {
    pub not_negotiated: u64,
    pub not_connected: u64,
    pub other_layer: u64,
    pub awaiting_keyframe: u64,
    pub stale: u64,
    pub no_transport: u64,
    pub encrypt: u64,
    pub malformed_red: u64,
    /// Packets of a muted track (by its publisher or a room admin), counted once per packet,
    /// not per subscriber.
    pub muted: u64,
}

impl ForwardDrops {
    pub fn count(&mut self, r: DropReason) {
        *match r {
            DropReason::NotNegotiated => &mut self.not_negotiated,
            DropReason::NotConnected => &mut self.not_connected,
            DropReason::OtherLayer => &mut self.other_layer,
            DropReason::AwaitingKeyframe => &mut self.awaiting_keyframe,
            DropReason::Stale => &mut self.stale,
            DropReason::NoTransport => &mut self.no_transport,
            DropReason::Encrypt => &mut self.encrypt,
            DropReason::MalformedRed => &mut self.malformed_red,
        } += 1;
    }

    pub fn merge(&mut self, o: &ForwardDrops) {
        let ForwardDrops {
            not_negotiated,
            not_connected,
            other_layer,
            awaiting_keyframe,
            stale,
            no_transport,
            encrypt,
            malformed_red,
            muted,
        } = o;
        self.not_negotiated += not_negotiated;
        self.not_connected += not_connected;
        self.other_layer += other_layer;
        self.awaiting_keyframe += awaiting_keyframe;
        self.stale += stale;
        self.no_transport += no_transport;
        self.encrypt += encrypt;
        self.malformed_red += malformed_red;
        self.muted += muted;
    }
}

/// Down-tracks for tests here and in the core's fan-out.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::sfu::selector::{LayerInfo, Requested};

    /// Three simulcast layers: 320×180, 640×360, 1280×720, all active.
    pub fn layers() -> Vec<LayerInfo> {
        [
            (320, 180, 150_000),
            (640, 360, 500_000),
            (1280, 720, 1_500_000),
        ]
        .iter()
        .enumerate()
        .map(|(id, &(width, height, bitrate_bps))| LayerInfo {
            id,
            width,
            height,
            bitrate_bps,
            active: true,
        })
        .collect()
    }

    /// A down-track of a video track with those layers (SSRC 0xabc, payload type 96, first
    /// outgoing sequence number 1000 and timestamp 5000), its selector updated at `now`.
    pub fn video_down_track(now: Instant) -> DownTrack {
        let mut sel = LayerSelector::new(Requested::default());
        sel.update(&layers(), None, now);
        DownTrack {
            ssrc: 0xabc,
            payload_type: Some(96),
            payload: Default::default(),
            twcc_ext: None,
            rewriter: Rewriter::with_initial(0xabc, 1000, 5000),
            munger: None,
            selector: Some(sel),
            first_offer: 1,
            switch_watch: None,
        }
    }
}

#[cfg(test)]
// Tests pick an arbitrary origin for their virtual time (and may share test state).
#[allow(clippy::disallowed_methods, clippy::disallowed_types)]
mod tests {
    use super::testing::video_down_track;
    use super::*;
    use std::time::Duration;

    fn packet(layer: usize, seq: u16, keyframe: bool) -> Packet {
        Packet {
            layer,
            keyframe,
            ssrc: 100 + layer as u32,
            seq,
            timestamp: u32::from(seq) * 3000,
            clock_rate: 90_000,
        }
    }

    #[test]
    fn nothing_before_negotiation_or_connection() {
        let t0 = Instant::now();
        let mut dt = video_down_track(t0);
        dt.payload_type = None;
        assert_eq!(
            dt.decide(&packet(2, 1, true), true, t0),
            Decision::Drop(DropReason::NotNegotiated)
        );
        dt.payload_type = Some(96);
        assert_eq!(
            dt.decide(&packet(2, 1, true), false, t0),
            Decision::Drop(DropReason::NotConnected)
        );
    }

    #[test]
    fn a_layer_starts_at_its_keyframe_and_the_others_are_dropped_by_name() {
        let t0 = Instant::now();
        let mut dt = video_down_track(t0);
        let target = dt
            .wants_keyframe()
            .expect("a fresh down-track wants a keyframe");
        let other = (target + 1) % 3;
        // Before the target's keyframe: its delta frames wait, other layers are not ours.
        assert_eq!(
            dt.decide(&packet(target, 1, false), true, t0),
            Decision::Drop(DropReason::AwaitingKeyframe)
        );
        let Decision::Forward(f) = dt.decide(&packet(target, 2, true), true, t0) else {
            panic!("the target's keyframe is forwarded");
        };
        assert!(f.layer_switched && f.rebase);
        assert_eq!((f.ssrc, f.payload_type), (0xabc, 96));
        assert_eq!(
            dt.decide(&packet(other, 3, true), true, t0),
            Decision::Drop(DropReason::OtherLayer)
        );
        let Decision::Forward(g) = dt.decide(
            &packet(target, 3, false),
            true,
            t0 + Duration::from_millis(33),
        ) else {
            panic!("the next packet of the layer is forwarded");
        };
        assert!(!g.layer_switched && !g.rebase);
        assert_eq!(g.seq, f.seq.wrapping_add(1), "continuous sequence numbers");
        // A packet from before the switch point is stale.
        assert_eq!(
            dt.decide(
                &packet(target, 1, false),
                true,
                t0 + Duration::from_millis(40)
            ),
            Decision::Drop(DropReason::Stale)
        );
    }

    #[test]
    fn drops_are_counted_by_reason() {
        let mut d = ForwardDrops::default();
        d.count(DropReason::OtherLayer);
        d.count(DropReason::OtherLayer);
        d.count(DropReason::Encrypt);
        let mut total = ForwardDrops::default();
        total.merge(&d);
        total.merge(&d);
        assert_eq!((total.other_layer, total.encrypt, total.stale), (4, 2, 0));
    }
}
