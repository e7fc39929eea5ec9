//! The fan-out: a media packet from a publisher here (or from the publisher's shard) to every
//! subscriber of its track.
//!
//! [`Sfu::fan_out`] meters the packet, hands it once to each other shard with subscribers of
//! the track, and keeps it as an [`Arrival`]. At the end of the turn,
//! [`Sfu::copy_arrivals`] makes the copies track by track, each subscriber's copies of the
//! turn's packets together. For each subscription and packet the copy is first decided, as a
//! value ([`decide_copy`]: the down-track's decision, its rewritten header and payload, or a
//! drop with its reason), then acted on ([`send_copy`]: sealed and queued on the sink).

use super::*;

impl<T: Transmit> Sfu<T> {
    /// One packet of layer `li` of track `tid` (published here, or relayed from the
    /// publisher's shard): metered, handed once to each other shard with subscribers of it,
    /// and kept for the copies to every down-track here, made at the end of the turn
    /// ([`Sfu::copy_arrivals`]). `origin`: when the packet reached the publisher's shard; `level`:
    /// its audio level (a local track's packet), for the active speakers.
    pub(super) fn fan_out(
        &mut self,
        room: RoomKey,
        tid: &TrackId,
        li: usize,
        packet: rtp::Packet,
        origin: Instant,
        level: Option<AudioLevel>,
    ) {
        let now = self.now;
        let Some(Room { tracks, .. }) = self.rooms.get_mut(&room) else {
            return;
        };
        let Some(track) = tracks.get_mut(&**tid) else {
            return;
        };
        if let Some(l) = level {
            track.levels.observe(l.level);
        }
        let is_video = track.kind == TrackKind::Video;
        let is_vp8 = track.codec.mime_type.eq_ignore_ascii_case(MIME_TYPE_VP8);
        let is_h264 = track.codec.mime_type.eq_ignore_ascii_case(MIME_TYPE_H264);
        if li >= track.layers.len() {
            // (A relayed track whose publisher's shard learned a layer after announcing it.)
            track
                .layers
                .resize_with(li + 1, || Layer::new(String::new(), None));
        }
        let layer = &mut track.layers[li];
        // H.264: the layer's parameter sets are cached, a keyframe starts at the first packet
        // of an IDR access unit, and a down-track starting at an IDR without SPS/PPS gets the
        // cached ones first (`h264_prefix`).
        let mut h264_prefix = None;
        let keyframe = if is_video && is_h264 {
            let seen = layer.h264.observe(&packet.payload, packet.header.timestamp);
            if let Some((width, height)) = seen.size {
                (layer.width, layer.height) = (width, height);
            }
            if seen.keyframe {
                let info = seen.info;
                trace!(track = %tid, layer = li, sps = info.sps, pps = info.pps, "H.264 IDR");
                h264_prefix = layer.h264.prefix_for(&info);
            }
            seen.keyframe
        } else {
            is_video && is_keyframe(&track.codec.mime_type, &packet.payload)
        };
        layer.meter.add(now, packet.payload.len() + 12);
        if keyframe {
            trace!(track = %tid, layer = li, "keyframe");
            layer.throttle.on_keyframe(now);
            if is_vp8 {
                if let Some(size) = vp8::keyframe_size(&packet.payload) {
                    layer.width = u32::from(size.width);
                    layer.height = u32::from(size.height);
                }
            }
        }
        if track.muted {
            self.stats.forward_dropped.muted += 1;
            return;
        }
        // Once to each other shard with subscribers (only the publisher's shard relays).
        if let Ok(layer) = u8::try_from(li) {
            for &shard in track.relayed_to.keys() {
                self.stats.rtp_packets_piped += 1;
                self.pipe_out.push(
                    shard,
                    PipeMsg::Rtp {
                        relay: track.relay,
                        layer,
                        packet: packet.clone(),
                        origin,
                    },
                );
            }
        }
        if track.down.is_empty() {
            return;
        }
        if !track.relayed_to.is_empty() {
            // The other shards get the packet before this one sends its own copies, so their
            // fan-outs (on their own cores) run beside this one instead of after it. What is
            // queued for them (control first) goes along, in order.
            hand_over(&mut self.pipe_out, &mut self.tx, &mut self.stats);
        }
        let meta = forward::Packet {
            layer: li,
            keyframe,
            ssrc: packet.header.ssrc,
            seq: packet.header.sequence_number,
            timestamp: packet.header.timestamp,
            clock_rate: track.codec.clock_rate,
        };
        self.arrivals.push(Arrival {
            room,
            track: tid.clone(),
            packet,
            meta,
            origin,
            h264_prefix,
        });
    }

    /// Make the subscribers' copies of the packets read this turn: track by track, each
    /// subscriber's copies of all of the track's packets together, in the order they arrived.
    /// A turn that read several packets of a track (a frame's, or a backlog's) so queues a
    /// run of datagrams for each subscriber, which the sink can hand to the kernel as one
    /// message (see `io::udp`); one packet's copies are made as before.
    pub(super) fn copy_arrivals(&mut self) {
        if self.arrivals.is_empty() {
            return;
        }
        let mut arrivals = std::mem::take(&mut self.arrivals);
        // Stable: each track's packets stay in their order.
        if arrivals.len() > 1 {
            arrivals.sort_by(|a, b| (a.room, &*a.track).cmp(&(b.room, &*b.track)));
        }
        let mut rest = &arrivals[..];
        while let Some(first) = rest.first() {
            let n = rest
                .iter()
                .take_while(|a| a.room == first.room && a.track == first.track)
                .count();
            let (run, next) = rest.split_at(n);
            self.copy_run(run);
            rest = next;
        }
        arrivals.clear();
        self.arrivals = arrivals;
    }

    /// Every subscriber's copies of `run` (packets of one track, in arrival order): for each
    /// subscription and packet, the copy is decided ([`decide_copy`]), then sent
    /// ([`send_copy`]) or its drop counted by reason.
    fn copy_run(&mut self, run: &[Arrival]) {
        let now = self.now;
        let (room, tid) = (run[0].room, &run[0].track);
        let Some(Room { parts, tracks, .. }) = self.rooms.get_mut(&room) else {
            return;
        };
        let Some(track) = tracks.get_mut(&**tid) else {
            return;
        };
        let (tx, stats) = (&mut self.tx, &mut self.stats);
        let (video, clock_rate) = (track.kind == TrackKind::Video, track.codec.clock_rate);
        let mut want_keyframe: Option<usize> = None;
        let mut switched_subs: Vec<PartKey> = Vec::new();
        for (&sub, dt) in track.down.iter_mut() {
            let mut p = parts.get_mut(&sub);
            let connected = p.as_ref().is_some_and(|p| p.sub.connected);
            for a in run {
                let copy = match decide_copy(dt, a, connected, now, tid) {
                    Ok(copy) => copy,
                    Err(reason) => {
                        stats.forward_dropped.count(reason);
                        if reason == DropReason::AwaitingKeyframe {
                            want_keyframe = dt.wants_keyframe();
                        }
                        continue;
                    }
                };
                let Some(p) = p.as_mut() else { continue };
                if copy.layer_switched {
                    switched_subs.push(sub);
                }
                let (Some(egress), Some(to)) = (p.egress.as_mut(), p.sub.media_addr) else {
                    // Connected, but its fast path did not start (the participant is on its
                    // way out) or no address is known yet.
                    stats.rtp_packets_dropped += 1;
                    stats.forward_dropped.count(DropReason::NoTransport);
                    continue;
                };
                let how = Outgoing {
                    twcc_id: dt.twcc_ext,
                    clock_rate,
                    video,
                    keyframe: a.meta.keyframe,
                };
                for out in copy.prefix.into_iter().chain(std::iter::once(copy.out)) {
                    let sink = Sink { tx, stats, to };
                    send_copy(sink, egress, dt, out, how, a.origin, now);
                }
            }
        }
        if let Some(layer) = want_keyframe {
            self.effects.push(Effect::RequestKeyframe {
                room,
                track: tid.clone(),
                layer,
            });
        }
        for sub in switched_subs {
            self.report_layer(tid, sub, now);
        }
    }

    /// Tell a subscriber which layer of a track it now receives (called right after the
    /// switch's keyframe packet was sent), and watch for that keyframe's loss.
    fn report_layer(&mut self, tid: &str, sub: PartKey, now: Instant) {
        if let Some(dt) = self
            .track_mut(sub.room, tid)
            .and_then(|t| t.down.get_mut(&sub))
        {
            dt.switch_watch = dt
                .rewriter
                .last_out_seq()
                .map(|seq| SwitchWatch::new(seq, now));
        }
        let Some(track) = self.track(sub.room, tid) else {
            return;
        };
        let Some(cur) = track
            .down
            .get(&sub)
            .and_then(|d| d.selector.as_ref())
            .and_then(|s| s.current())
        else {
            return;
        };
        let infos = track.layer_infos(now);
        let quality = layer_quality(&infos, cur).unwrap_or(Quality::High);
        let layer = &track.layers[cur];
        let msg = ServerMessage::LayerChanged {
            track_id: tid.to_owned(),
            quality,
            rid: layer.rid.clone(),
            width: (layer.width > 0).then_some(layer.width),
            height: (layer.height > 0).then_some(layer.height),
        };
        debug!(track = %tid, layer = %layer.rid, ?quality, "layer changed");
        self.send_to(sub, msg);
    }
}

/// One subscription's copy of one packet, decided: what goes out, in order.
#[derive(Debug)]
struct Copy {
    /// The packet with the down-track's header (and payload, where the down-track's
    /// descriptors or RED negotiation differ from the publisher's).
    out: rtp::Packet,
    /// H.264 parameter sets, sent just before `out`: an IDR that starts this down-track
    /// without them.
    prefix: Option<rtp::Packet>,
    /// The down-track switched layers with this packet (the subscriber is told once it left).
    layer_switched: bool,
}

/// Decide the copy of arrival `a` for down-track `dt` (of track `tid`), and advance the
/// down-track's state as the decision implies (selector, rewriter, munger): the copy, or why
/// there is none.
#[inline(always)] // once per copy: no call, and the copy built in place
fn decide_copy(
    dt: &mut DownTrack,
    a: &Arrival,
    connected: bool,
    now: Instant,
    tid: &TrackId,
) -> Result<Copy, DropReason> {
    // A RED payload this subscriber gets stripped or retagged: read before the rewriter
    // counts the packet (a malformed one is dropped, counted, never sent).
    let payload = match dt.payload {
        red::Payload::AsIs => None,
        red::Payload::Strip { expect } => Some(red::strip(&a.packet.payload, expect)),
        red::Payload::Retag { from, to } => Some(red::retag(&a.packet.payload, from, to)),
    };
    let payload = match payload {
        Some(Err(e)) if dt.payload_type.is_some() => {
            trace!(track = %tid, "RED payload dropped: {e}");
            return Err(DropReason::MalformedRed);
        }
        Some(Ok(p)) => Some(p),
        _ => None,
    };
    let f = match dt.decide(&a.meta, connected, now) {
        Decision::Forward(f) => f,
        Decision::Drop(reason) => return Err(reason),
    };
    let mut out = a.packet.clone();
    out.header.ssrc = f.ssrc;
    out.header.payload_type = f.payload_type;
    out.header.sequence_number = f.seq;
    out.header.timestamp = f.timestamp;
    if let Some(m) = dt.munger.as_mut() {
        // Copies the payload only when a descriptor field must change.
        out.payload = m.munge_shared(&a.packet.payload, f.rebase);
    }
    if let Some(payload) = payload {
        out.payload = payload;
    }
    // H.264 parameter sets ahead of an IDR that starts this down-track without them, in the
    // slot the rewriter frees before the IDR.
    let prefix = match &a.h264_prefix {
        Some(sets) if f.rebase => dt.rewriter.open_slot_before_switch().map(|seq| {
            let mut pre = out.clone();
            pre.header.marker = false;
            pre.payload = sets.clone();
            out.header.sequence_number = seq;
            trace!(track = %tid, layer = a.meta.layer, "H.264 parameter sets sent ahead of an IDR");
            pre
        }),
        _ => None,
    };
    Ok(Copy {
        out,
        prefix,
        layer_switched: f.layer_switched,
    })
}

/// Where a subscriber's copies go: the sink, the counters, the subscriber's address.
struct Sink<'a, T> {
    tx: &'a mut T,
    stats: &'a mut CoreStats,
    to: Remote,
}

/// Seal `out` for the subscriber (`egress`, down-track `dt`) and queue it on the sink; a
/// frame's last packet is followed by the probe padding due, if the subscriber probes.
#[inline(always)] // once per copy
fn send_copy<T: Transmit>(
    sink: Sink<'_, T>,
    egress: &mut Egress,
    dt: &mut DownTrack,
    mut out: rtp::Packet,
    how: Outgoing,
    origin: Instant,
    now: Instant,
) {
    let Sink { tx, stats, to } = sink;
    let buf = tx.buffer();
    match egress.protect_rtp(now, &mut out, how, buf) {
        Ok(wire) => {
            stats.rtp_packets_forwarded += 1;
            tx.send(wire, to, Some(origin));
            // Probe padding goes between frames: after a frame's last packet.
            if how.video && out.header.marker && egress.probing() {
                probing::send_padding(tx, stats, egress, dt, &out.header, to, now);
            }
        }
        Err(e) => {
            stats.rtp_packets_dropped += 1;
            stats.forward_dropped.count(DropReason::Encrypt);
            trace!("fast path: {e}");
        }
    }
}

#[cfg(test)]
// Tests pick an arbitrary origin for their virtual time.
#[allow(clippy::disallowed_methods)]
mod tests {
    use super::*;
    use crate::sfu::forward::testing::video_down_track as down_track;

    /// A packet of `layer` as the publisher's shard keeps it for the fan-out.
    fn arrival(layer: usize, seq: u16, keyframe: bool, now: Instant) -> Arrival {
        let mut packet = rtp::Packet::default();
        packet.header.ssrc = 100 + layer as u32;
        packet.header.payload_type = 100;
        packet.header.sequence_number = seq;
        packet.header.timestamp = u32::from(seq) * 3000;
        packet.header.marker = true;
        packet.payload = Bytes::from_static(b"\x10\x00\x00\x9d\x01\x2a payload");
        Arrival {
            room: RoomKey(1),
            track: TrackId::from("TR_v"),
            meta: forward::Packet {
                layer,
                keyframe,
                ssrc: packet.header.ssrc,
                seq,
                timestamp: packet.header.timestamp,
                clock_rate: 90_000,
            },
            packet,
            origin: now,
            h264_prefix: None,
        }
    }

    #[test]
    fn a_copy_carries_the_down_tracks_header_and_shares_the_payload() {
        let t0 = Instant::now();
        let mut dt = down_track(t0);
        let top = dt
            .wants_keyframe()
            .expect("a new down-track waits for a keyframe");
        let tid = TrackId::from("TR_v");
        // Before the layer's keyframe: no copy, and the reason says why.
        let a = arrival(top, 7, false, t0);
        assert_eq!(
            decide_copy(&mut dt, &a, true, t0, &tid).unwrap_err(),
            DropReason::AwaitingKeyframe
        );
        let a = arrival(top, 8, true, t0);
        let copy = decide_copy(&mut dt, &a, true, t0, &tid).expect("the keyframe is copied");
        let h = &copy.out.header;
        assert_eq!((h.ssrc, h.payload_type), (0xabc, 96));
        assert_eq!((h.sequence_number, h.timestamp), (1000, 5000));
        assert!(h.marker, "the rest of the header is the publisher's");
        assert!(copy.layer_switched, "the down-track starts its layer here");
        assert!(copy.prefix.is_none());
        // Nothing to change in the payload: the copy shares the arrival's buffer.
        assert_eq!(copy.out.payload.as_ptr(), a.packet.payload.as_ptr());
        let next = decide_copy(&mut dt, &arrival(top, 9, false, t0), true, t0, &tid)
            .expect("the next packet of the layer is copied");
        assert_eq!(next.out.header.sequence_number, 1001);
        assert_eq!(next.out.header.timestamp, 8000);
        assert!(!next.layer_switched);
        // Another layer is not this down-track's.
        let other = arrival((top + 1) % 3, 10, true, t0);
        assert_eq!(
            decide_copy(&mut dt, &other, true, t0, &tid).unwrap_err(),
            DropReason::OtherLayer
        );
    }

    #[test]
    fn no_copy_before_the_connection_nor_of_a_malformed_red_payload() {
        let t0 = Instant::now();
        let tid = TrackId::from("TR_v");
        let mut dt = down_track(t0);
        let top = dt.wants_keyframe().unwrap();
        let a = arrival(top, 1, true, t0);
        assert_eq!(
            decide_copy(&mut dt, &a, false, t0, &tid).unwrap_err(),
            DropReason::NotConnected
        );
        // A subscriber without RED gets the primary block of a RED payload: a payload that is
        // not RED is dropped, before the rewriter counts it (the next copy is numbered first).
        dt.payload = red::Payload::Strip { expect: None };
        let mut bad = arrival(top, 2, true, t0);
        bad.packet.payload = Bytes::from_static(b"\x80");
        assert_eq!(
            decide_copy(&mut dt, &bad, true, t0, &tid).unwrap_err(),
            DropReason::MalformedRed
        );
        // A RED payload of one primary block (F=0, payload type 111) and its data.
        let mut red = arrival(top, 3, true, t0);
        red.packet.payload = Bytes::from_static(b"\x6fopus");
        let copy = decide_copy(&mut dt, &red, true, t0, &tid).expect("the primary is copied");
        assert_eq!(&copy.out.payload[..], b"opus");
        assert_eq!(copy.out.header.sequence_number, 1000);
    }

    #[test]
    fn an_idr_that_starts_a_down_track_goes_behind_its_parameter_sets() {
        let t0 = Instant::now();
        let tid = TrackId::from("TR_v");
        let mut dt = down_track(t0);
        let top = dt.wants_keyframe().unwrap();
        let mut a = arrival(top, 40, true, t0);
        a.h264_prefix = Some(Bytes::from_static(b"\x78sps-pps"));
        let copy = decide_copy(&mut dt, &a, true, t0, &tid).expect("the IDR is copied");
        let pre = copy.prefix.expect("the parameter sets go first");
        assert_eq!(&pre.payload[..], b"\x78sps-pps");
        assert!(!pre.header.marker);
        assert_eq!(pre.header.ssrc, 0xabc);
        assert_eq!(pre.header.timestamp, copy.out.header.timestamp);
        assert_eq!(pre.header.sequence_number, 1000);
        assert_eq!(
            copy.out.header.sequence_number, 1001,
            "the IDR moves up one"
        );
        // Later packets of the layer follow the IDR without a gap, and without the sets.
        let next = decide_copy(&mut dt, &arrival(top, 41, false, t0), true, t0, &tid).unwrap();
        assert_eq!(next.out.header.sequence_number, 1002);
        assert!(next.prefix.is_none());
    }
}
