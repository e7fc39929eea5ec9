//! Connection quality in the core: every [`quality::TICK`] the core looks at each of its
//! participants (silence of its peer connections, from the demultiplexer's last-seen time of
//! their addresses; at the end of each [`quality::WINDOW`] also the loss its uplink and
//! downlink feedback counted, and its bandwidth estimate against its video's needs), lets its
//! [`Tracker`] decide, and tells the room when a participant's quality changes:
//! `connection_quality` to every participant of the room (the participant itself included),
//! and [`PipeMsg::Quality`] to the room's other shards, which tell theirs. A participant's
//! quality is computed on its own shard only.
//!
//! A participant that joins gets, on the next tick, the qualities already known in its room;
//! a shard that starts hosting the room gets those of the participants here. A hidden
//! participant's quality is told to itself only. Nothing here runs per packet: the packet
//! path keeps its counters (transport-wide feedback, the demultiplexer's last-seen time) as
//! before, and they are read here.

use super::*;
use crate::sfu::quality::{self, Bandwidth, Counts, Tracker};
use crate::signal::ConnectionQualityUpdate;

/// The core's quality bookkeeping.
pub(super) struct QualityBook {
    pub(super) timer: Periodic,
    ticks: u32,
    /// Participants here, by key (from the first tick after their join).
    trackers: HashMap<PartKey, Tracker>,
    /// What the room's other shards told of their participants: (room, participant id) →
    /// the last update (for participants joining here later).
    remote: HashMap<(RoomKey, String), ConnectionQualityUpdate>,
    /// Other shards of a room that have been told the qualities of its participants here.
    greeted: BTreeSet<(RoomKey, ShardId)>,
}

impl QualityBook {
    pub(super) fn new(now: Instant) -> Self {
        QualityBook {
            timer: Periodic::new(now, quality::TICK, Reason::Quality),
            ticks: 0,
            trackers: HashMap::new(),
            remote: HashMap::new(),
            greeted: BTreeSet::new(),
        }
    }

    /// The quality of a participant here the room was last told, if any.
    pub(super) fn update_of(&self, part: PartKey, pid: &str) -> Option<ConnectionQualityUpdate> {
        let t = self.trackers.get(&part)?;
        Some(ConnectionQualityUpdate {
            participant_id: pid.to_owned(),
            quality: t.reported()?,
            score: Some(t.score()),
        })
    }
}

fn counts((expected, lost): (u64, u64)) -> Counts {
    Counts { expected, lost }
}

impl<T: Transmit> Sfu<T> {
    /// The quality timer fired: look at every participant, report the changes.
    pub(super) fn quality_tick(&mut self, now: Instant) {
        self.quality.ticks = self.quality.ticks.wrapping_add(1);
        let window_end = self.quality.ticks % quality::TICKS_PER_WINDOW == 0;
        let mut rooms: Vec<RoomKey> = self.rooms.keys().copied().collect();
        rooms.sort();
        for rk in rooms {
            self.room_quality(rk, now, window_end);
        }
        let rooms = &self.rooms;
        self.quality
            .trackers
            .retain(|k, _| rooms.get(&k.room).is_some_and(|r| r.parts.contains_key(k)));
        self.quality
            .remote
            .retain(|(rk, pid), _| rooms.get(rk).is_some_and(|r| r.remote.contains_key(pid)));
        self.quality
            .greeted
            .retain(|(rk, shard)| rooms.get(rk).is_some_and(|r| r.peers.contains(shard)));
    }

    fn room_quality(&mut self, rk: RoomKey, now: Instant, window_end: bool) {
        // Newcomers first learn what is already known (this tick's changes follow, to all).
        let newcomers: Vec<PartKey> = self.rooms.get(&rk).map_or_else(Vec::new, |r| {
            r.members
                .iter()
                .copied()
                .filter(|m| !self.quality.trackers.contains_key(m))
                .collect()
        });
        for part in newcomers {
            self.quality.trackers.insert(part, Tracker::new());
            let known = self.known_qualities(rk, Some(part));
            if !known.is_empty() {
                self.send_to(part, ServerMessage::ConnectionQuality { updates: known });
            }
        }
        // Each connected participant's tracker, with what the packet path counted (a
        // participant id is copied only for a change).
        let Sfu {
            rooms,
            demux,
            quality: book,
            ..
        } = self;
        let Some(r) = rooms.get(&rk) else {
            return;
        };
        let mut changes = Vec::new();
        for &part in &r.members {
            let Some(p) = r.parts.get(&part) else {
                continue;
            };
            // (A publish-only participant, WHIP, is rated on its publisher connection.)
            if !p.transport_connected() {
                continue;
            }
            let quiet = |kind| {
                demux
                    .last_seen(PcKey { part, kind })
                    .is_some_and(|at| now.saturating_duration_since(at) >= quality::SILENCE)
            };
            let silent = !p.publish_only && quiet(PcKind::Subscriber)
                || p.publ.as_ref().is_some_and(|pc| pc.connected) && quiet(PcKind::Publisher);
            let tracker = book.trackers.entry(part).or_default();
            let window = window_end.then(|| {
                tracker.window(
                    p.ingress.as_ref().map(|i| counts(i.loss_totals())),
                    p.egress.as_ref().map(|e| counts(e.loss_totals())),
                    p.estimate()
                        .available(now)
                        .map(|available_bps| video_needs(r, part, available_bps, now)),
                )
            });
            if let Some(change) = tracker.update(silent, window.as_ref()) {
                changes.push((part, p.pid.clone(), p.grants.hidden, change));
            }
        }
        let mut updates = Vec::new();
        for (part, pid, hidden, change) in changes {
            debug!(
                participant = %pid,
                quality = change.quality.as_str(),
                score = change.score,
                "connection quality"
            );
            let update = ConnectionQualityUpdate {
                participant_id: pid,
                quality: change.quality,
                score: Some(change.score),
            };
            if hidden {
                self.send_to(
                    part,
                    ServerMessage::ConnectionQuality {
                        updates: vec![update],
                    },
                );
            } else {
                updates.push(update);
            }
        }
        let Some(r) = self.rooms.get(&rk) else {
            return;
        };
        let greeted = &self.quality.greeted;
        let new_peer = r.peers.iter().any(|&peer| !greeted.contains(&(rk, peer)));
        if updates.is_empty() && !new_peer {
            return;
        }
        let peers: Vec<ShardId> = r.peers.iter().copied().collect();
        let room_name = r.name.clone();
        let members = r.members.clone();
        // Shards that started hosting the room learn the qualities of the participants here.
        for &peer in &peers {
            if self.quality.greeted.insert((rk, peer)) {
                let here = self.local_qualities(rk, &members, None);
                if !here.is_empty() {
                    self.pipe_out.push(
                        peer,
                        PipeMsg::Quality {
                            room: room_name.clone(),
                            updates: here,
                        },
                    );
                }
                // Changes of this tick are in `here` already.
                continue;
            }
            if !updates.is_empty() {
                self.pipe_out.push(
                    peer,
                    PipeMsg::Quality {
                        room: room_name.clone(),
                        updates: updates.clone(),
                    },
                );
            }
        }
        if !updates.is_empty() {
            self.broadcast(rk, None, ServerMessage::ConnectionQuality { updates });
        }
    }

    /// The rated, visible participants here among `members` (except `except`).
    fn local_qualities(
        &self,
        rk: RoomKey,
        members: &[PartKey],
        except: Option<PartKey>,
    ) -> Vec<ConnectionQualityUpdate> {
        let Some(r) = self.rooms.get(&rk) else {
            return Vec::new();
        };
        members
            .iter()
            .filter(|&&m| Some(m) != except)
            .filter_map(|m| {
                let p = r.parts.get(m).filter(|p| !p.grants.hidden)?;
                self.quality.update_of(*m, &p.pid)
            })
            .collect()
    }

    /// Every quality known in the room: participants here (but `except`), then the others'.
    fn known_qualities(
        &self,
        rk: RoomKey,
        except: Option<PartKey>,
    ) -> Vec<ConnectionQualityUpdate> {
        let Some(r) = self.rooms.get(&rk) else {
            return Vec::new();
        };
        let mut out = self.local_qualities(rk, &r.members, except);
        let mut remote: Vec<&ConnectionQualityUpdate> = self
            .quality
            .remote
            .iter()
            .filter(|((k, _), _)| *k == rk)
            .map(|(_, u)| u)
            .collect();
        remote.sort_by(|a, b| a.participant_id.cmp(&b.participant_id));
        out.extend(remote.into_iter().cloned());
        out
    }

    /// Another shard of `room` tells of its participants' qualities: its participants' only
    /// (a shard rates its own), told to everyone here.
    pub(super) fn on_remote_quality(
        &mut self,
        from: ShardId,
        room: &str,
        updates: Vec<ConnectionQualityUpdate>,
    ) {
        let Some(&rk) = self.room_keys.get(room) else {
            return;
        };
        let Some(r) = self.rooms.get(&rk) else {
            return;
        };
        let updates: Vec<ConnectionQualityUpdate> = updates
            .into_iter()
            .filter(|u| {
                r.remote
                    .get(&u.participant_id)
                    .is_some_and(|m| m.shard == from)
            })
            .collect();
        if updates.is_empty() {
            return;
        }
        for u in &updates {
            self.quality
                .remote
                .insert((rk, u.participant_id.clone()), u.clone());
        }
        self.broadcast(rk, None, ServerMessage::ConnectionQuality { updates });
    }
}

/// The subscriber `part`'s estimate against what its video subscriptions (with a layer
/// selector, not paused) need: the lowest and the highest active layer of each.
fn video_needs(r: &Room, part: PartKey, available_bps: u64, now: Instant) -> Bandwidth {
    let mut b = Bandwidth {
        available_bps,
        ..Bandwidth::default()
    };
    for t in r.tracks.values().filter(|t| t.kind == TrackKind::Video) {
        let Some(sel) = t.down.get(&part).and_then(|d| d.selector.as_ref()) else {
            continue;
        };
        if sel.is_paused() {
            continue;
        }
        let rates = t
            .layer_infos(now)
            .into_iter()
            .filter(|l| l.active)
            .map(|l| l.bitrate_bps);
        let (lo, hi) = rates.fold((u64::MAX, 0), |(lo, hi), bps| (lo.min(bps), hi.max(bps)));
        if hi > 0 {
            b.lowest_bps += lo;
            b.full_bps += hi;
        }
    }
    b
}
