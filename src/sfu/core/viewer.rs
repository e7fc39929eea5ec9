//! Viewers (WHEP playback): a participant whose only connection is the subscriber one, offered
//! by the client (recvonly media sections), answered here. Each media section gets one sender
//! and one SSRC for the whole session and plays one track of the room at a time, chosen by
//! [`viewing::assign`] whenever the room's tracks change: the section's down-track moves from
//! track to track (a new source for its rewriter: sequence numbers and timestamps continue, a
//! keyframe is asked for), or is parked while there is nothing to play. No renegotiation ever
//! happens; a viewer gets no room events.

use super::super::viewing::{self, Candidate};
use super::*;
use crate::signal::{LeaveReason, Quality};

impl<T: Transmit> Sfu<T> {
    /// The viewer's offer (its first, or an ICE restart's): applied to its subscriber
    /// connection; the answer goes back as `publish_answer`, an error as a `publish_offer`
    /// error (what the HTTP session waits for).
    pub(super) fn on_viewer_offer(&mut self, part: PartKey, sdp: String) {
        let key = PcKey {
            part,
            kind: PcKind::Subscriber,
        };
        let refuse =
            |code: ErrorCode, msg: String| ServerMessage::error(code, msg, Some("publish_offer"));
        // The offer's audio and video sections, in order.
        let kinds: Vec<TrackKind> = sdp
            .lines()
            .filter_map(|l| match l.split_whitespace().next() {
                Some("m=audio") => Some(TrackKind::Audio),
                Some("m=video") => Some(TrackKind::Video),
                _ => None,
            })
            .collect();
        let Some((offer, candidates)) = self.checked_offer(key, sdp) else {
            return;
        };
        let now = self.now;
        // Each section's SSRC and first sequence number / timestamp.
        let (numbering, stream) = {
            use rand::Rng;
            // Per section: SSRC, first sequence number and timestamp, RTX SSRC (kept by `rtc`
            // only for a video section whose offer has RTX).
            let numbering: Vec<(u32, u16, u32, u32)> = (0..MAX_VIEWER_SECTIONS)
                .map(|_| {
                    (
                        self.rng.random::<u32>() | 1,
                        self.rng.random(),
                        self.rng.random(),
                        self.rng.random::<u32>() | 1,
                    )
                })
                .collect();
            (numbering, format!("plaza-{:08x}", self.rng.random::<u32>()))
        };
        let Some(p) = part_mut!(self, part) else {
            return;
        };
        let first = p.viewer.as_ref().is_some_and(|v| v.sections.is_empty())
            && p.sub.rtc.remote_description().is_none();
        let pc = &mut p.sub;
        let res = pc
            .rtc
            .set_remote_description(now, offer)
            .map_err(|e| (ErrorCode::InvalidSdp, format!("offer rejected: {e}")))
            .and_then(|()| {
                if !first {
                    return Ok(Vec::new());
                }
                // One sender per audio / video section, in SDP order (`add_track` takes the
                // first section of the kind without one).
                let kinds: Vec<TrackKind> = kinds.into_iter().take(MAX_VIEWER_SECTIONS).collect();
                if kinds.is_empty() {
                    return Err((
                        ErrorCode::InvalidSdp,
                        "the offer has no audio or video section".to_owned(),
                    ));
                }
                let mut sections = Vec::new();
                for (i, kind) in kinds.into_iter().enumerate() {
                    let rtc_kind = match kind {
                        TrackKind::Audio => RtpCodecKind::Audio,
                        TrackKind::Video => RtpCodecKind::Video,
                    };
                    let label = format!("{stream}-{i}");
                    let mst = MediaStreamTrack::new(
                        stream.clone(),
                        label.clone(),
                        label,
                        rtc_kind,
                        vec![RTCRtpEncodingParameters {
                            rtp_coding_parameters: RTCRtpCodingParameters {
                                ssrc: Some(numbering[i].0),
                                rtx: (kind == TrackKind::Video).then_some(RTCRtpRtxParameters {
                                    ssrc: numbering[i].3,
                                }),
                                ..Default::default()
                            },
                            ..Default::default()
                        }],
                    );
                    let sender = pc
                        .rtc
                        .add_track(mst)
                        .map_err(|e| (ErrorCode::Internal, format!("add_track: {e}")))?;
                    sections.push((kind, sender, numbering[i]));
                }
                Ok(sections)
            })
            .and_then(|sections| {
                let answer = pc
                    .rtc
                    .create_answer(None)
                    .map_err(|e| (ErrorCode::InvalidSdp, format!("no answer possible: {e}")))?;
                pc.rtc
                    .set_local_description(now, answer.clone())
                    .map_err(|e| (ErrorCode::InvalidSdp, format!("answer not applied: {e}")))?;
                let sdp = pc
                    .rtc
                    .local_description()
                    .map(|d| d.sdp)
                    .unwrap_or(answer.sdp);
                Ok((sdp, sections))
            });
        let (sdp, sections) = match res {
            Ok(ok) => ok,
            Err((code, msg)) => {
                self.send_to(part, refuse(code, msg));
                if first {
                    // Nothing usable was negotiated: the viewer's session ends (the HTTP
                    // request gets the error), and nothing is left behind.
                    self.effects.push(Effect::Remove {
                        part,
                        why: LeaveReason::Error,
                        reason: "offer refused".to_owned(),
                    });
                }
                return;
            }
        };
        if self.sync_ufrag(key, &sdp) {
            if let Some(pc) = self.pc_mut(key) {
                pc.remote_candidates = 0;
            }
        }
        let Some(p) = part_mut!(self, part) else {
            return;
        };
        p.sub.remote_candidates += candidates;
        if let Some(v) = p.viewer.as_mut() {
            for (kind, sender, (ssrc, seq0, ts0, _)) in sections {
                v.sections.push(Section {
                    kind,
                    sender,
                    playing: None,
                    parked: Some(DownTrack {
                        ssrc,
                        payload_type: None,
                        payload: Default::default(),
                        twcc_ext: None,
                        rewriter: Rewriter::with_initial(ssrc, seq0, ts0),
                        munger: None,
                        selector: None,
                        first_offer: 1,
                        switch_watch: None,
                    }),
                    requested: Requested::default(),
                });
            }
        }
        // Its one negotiation is done: down-tracks may forward.
        p.offers_sent = 1;
        p.offers_answered = 1;
        let early = std::mem::take(&mut p.sub.early);
        self.send_to(part, ServerMessage::PublishAnswer { sdp });
        for (from, at, data) in early {
            self.feed_datagram(at, at, &data, from);
        }
        if first {
            info!("viewer negotiated");
        }
        self.bind_viewer(part);
        self.mark_dirty(key);
    }

    /// Re-bind every viewer of `room` (its tracks changed).
    pub(super) fn bind_viewers(&mut self, room: RoomKey) {
        let viewers: Vec<PartKey> = self
            .rooms
            .get(&room)
            .map(|r| {
                r.members
                    .iter()
                    .copied()
                    .filter(|k| r.parts.get(k).is_some_and(|p| p.viewer.is_some()))
                    .collect()
            })
            .unwrap_or_default();
        for v in viewers {
            self.bind_viewer(v);
        }
    }

    /// Move each of the viewer's sections to the track it should play now.
    pub(super) fn bind_viewer(&mut self, part: PartKey) {
        let Some(r) = self.rooms.get_mut(&part.room) else {
            return;
        };
        let Some(p) = r.parts.get(&part) else { return };
        let Some(v) = p.viewer.as_ref() else { return };
        if v.sections.is_empty() {
            return;
        }
        let kinds: Vec<TrackKind> = v.sections.iter().map(|s| s.kind).collect();
        let want: Vec<Option<TrackId>> = {
            let pids: Vec<String> = r
                .track_order
                .iter()
                .map(|tid| {
                    r.tracks
                        .get(tid)
                        .map(|t| r.publisher_id(t))
                        .unwrap_or_default()
                })
                .collect();
            let mut cands = Vec::new();
            for (tid, pid) in r.track_order.iter().zip(&pids) {
                let Some(t) = r.tracks.get(tid) else { continue };
                let identity = t
                    .local_publisher()
                    .and_then(|k| r.parts.get(&k))
                    .and_then(|p| p.identity.as_deref());
                cands.push(Candidate {
                    track_id: tid,
                    kind: t.kind,
                    publisher: pid,
                    identity,
                });
            }
            viewing::assign(&v.target, &cands, &kinds)
                .into_iter()
                .map(|i| i.map(|i| TrackId::from(cands[i].track_id)))
                .collect()
        };
        let now = self.now;
        let mut changed = false;
        for (i, want) in want.into_iter().enumerate() {
            let Some(p) = r.parts.get_mut(&part) else {
                return;
            };
            let Some(section) = p.viewer.as_mut().and_then(|v| v.sections.get_mut(i)) else {
                return;
            };
            if section.playing == want {
                continue;
            }
            changed = true;
            // Off the track it played (if that track is still here).
            if let Some(old) = section.playing.take() {
                p.subscriptions.remove(&old);
                if let Some(dt) = r.tracks.get_mut(&old).and_then(|t| t.down.remove(&part)) {
                    section.parked = Some(dt);
                }
                if let Some(t) = r.tracks.get_mut(&old) {
                    sync_needed(t, &mut self.pipe_out);
                }
            }
            let Some(tid) = want else { continue };
            let Some(mut dt) = section.parked.take() else {
                continue;
            };
            let Some(track) = r.tracks.get_mut(&tid) else {
                section.parked = Some(dt);
                continue;
            };
            // A new source: its payload type is learned again (the codec may differ), the
            // rewriter continues the section's numbering, video waits for a keyframe.
            dt.payload_type = None;
            dt.switch_watch = None;
            dt.rewriter.force_switch();
            // VP8 picture ids continue across tracks too (the first packet re-bases them).
            let vp8 = track.codec.mime_type.eq_ignore_ascii_case(MIME_TYPE_VP8);
            dt.munger = vp8.then(|| dt.munger.take().unwrap_or_else(Vp8Munger::new));
            dt.selector = (track.kind == TrackKind::Video).then(|| {
                let mut sel = LayerSelector::new(section.requested);
                sel.update(&track.layer_infos(now), None, now);
                sel
            });
            debug!(participant = %p.pid, track = %tid, section = i, "viewer plays");
            track.down.insert(part, dt);
            sync_needed(track, &mut self.pipe_out);
            p.subscriptions.insert(tid.clone(), section.sender);
            section.playing = Some(tid);
        }
        if changed {
            self.refresh_downtracks(part);
        }
    }

    /// `track` (taken out of its room) is going away: its viewers' down-tracks are parked in
    /// their sections (the numbering continues on the next track).
    pub(super) fn park_viewers(&mut self, room: RoomKey, track: &mut Track) {
        let Some(r) = self.rooms.get_mut(&room) else {
            return;
        };
        let tid = track.id.clone();
        let viewers: Vec<PartKey> = track
            .down
            .keys()
            .copied()
            .filter(|k| r.parts.get(k).is_some_and(|p| p.viewer.is_some()))
            .collect();
        for k in viewers {
            let Some(dt) = track.down.remove(&k) else {
                continue;
            };
            let Some(p) = r.parts.get_mut(&k) else {
                continue;
            };
            p.subscriptions.remove(&tid);
            if let Some(s) = p.viewer.as_mut().and_then(|v| {
                v.sections
                    .iter_mut()
                    .find(|s| s.playing.as_ref() == Some(&tid))
            }) {
                s.playing = None;
                s.parked = Some(dt);
            }
        }
    }

    /// The layer extension: what the viewer's video sections should get (as `track_settings`
    /// for every video track it plays, and the ones it will play).
    pub(super) fn on_viewer_settings(
        &mut self,
        part: PartKey,
        quality: Option<Option<Quality>>,
        width: Option<u32>,
        height: Option<u32>,
    ) {
        let now = self.now;
        let Some(r) = self.rooms.get_mut(&part.room) else {
            return;
        };
        let Some(v) = r.parts.get_mut(&part).and_then(|p| p.viewer.as_mut()) else {
            return;
        };
        let mut keyframes = Vec::new();
        for s in v.sections.iter_mut().filter(|s| s.kind == TrackKind::Video) {
            s.requested = s.requested.updated(quality, width, height);
            let Some(tid) = &s.playing else { continue };
            let Some(track) = r.tracks.get_mut(tid) else {
                continue;
            };
            let infos = track.layer_infos(now);
            if let Some(sel) = track.down.get_mut(&part).and_then(|d| d.selector.as_mut()) {
                sel.set_requested(s.requested, &infos, now);
                if let Some(l) = sel.wants_keyframe() {
                    keyframes.push((tid.clone(), l));
                }
            }
        }
        for (track, layer) in keyframes {
            self.effects.push(Effect::RequestKeyframe {
                room: part.room,
                track,
                layer,
            });
        }
    }
}

/// At most this many media sections of a viewer's offer are served (more are answered
/// inactive).
const MAX_VIEWER_SECTIONS: usize = 8;
