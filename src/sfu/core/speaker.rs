//! Active speakers in the core: every [`speaker::TICK`] each local audio track's [`Voice`] gets
//! what its meter counted (the packet path only adds each packet's level to the meter on the
//! track it already looked up), and the room is told `speakers` when who speaks, or their
//! order, changes.
//!
//! A room spread over shards: a track's levels reach only its publisher's shard, so each shard
//! decides for the participants it hosts (the publisher's shard: no level crosses the pipe, and
//! the decision is made where the packets are) and tells the room's other shards its own list
//! when it changes ([`PipeMsg::Speakers`]; a shard that starts hosting the room is told the
//! current one). Each shard merges its list with the others' and tells its participants the
//! merged list when it changes. Levels of another shard's speakers are those of its last
//! change, so the order across shards follows the levels at their last change. Muted tracks and
//! hidden participants never speak; WHEP viewers get no room events.

use super::*;
use crate::sfu::speaker::{self, Voice, keep_order, rank, same_speakers};
use crate::signal::SpeakerInfo;
use std::collections::BTreeMap;

/// The core's speaker bookkeeping.
pub(super) struct SpeakerBook {
    pub(super) timer: Periodic,
    /// Each local audio track's voice.
    voices: HashMap<(RoomKey, TrackId), Voice>,
    rooms: HashMap<RoomKey, RoomSpeakers>,
}

/// One room's speakers, as this shard knows them.
#[derive(Default)]
struct RoomSpeakers {
    /// The speakers among the participants here (the other shards know who, in this order).
    local: Vec<SpeakerInfo>,
    /// The other shards' lists.
    remote: BTreeMap<ShardId, Vec<SpeakerInfo>>,
    /// The merged list the participants here were last told (with the levels of the last
    /// tick).
    told: Vec<SpeakerInfo>,
    /// Participants here that know `told` (joined before it, or told on joining).
    knows: BTreeSet<PartKey>,
    /// Other shards of the room that know `local`.
    greeted: BTreeSet<ShardId>,
}

impl SpeakerBook {
    /// Whether participant `pid` is among `room`'s active speakers, as the participants here
    /// were last told.
    pub(super) fn is_speaking(&self, room: RoomKey, pid: &str) -> bool {
        self.rooms
            .get(&room)
            .is_some_and(|rs| rs.told.iter().any(|s| s.participant_id == pid))
    }

    pub(super) fn new(now: Instant) -> Self {
        SpeakerBook {
            timer: Periodic::new(now, speaker::TICK, Reason::Speakers),
            voices: HashMap::new(),
            rooms: HashMap::new(),
        }
    }
}

impl<T: Transmit> Sfu<T> {
    /// The speaker timer fired: every local audio track's levels, every room's speakers.
    pub(super) fn speaker_tick(&mut self) {
        let mut rooms: Vec<RoomKey> = self.rooms.keys().copied().collect();
        rooms.sort();
        for rk in rooms {
            self.room_speakers(rk);
        }
        let rooms = &self.rooms;
        let book = &mut self.speakers;
        book.voices
            .retain(|(rk, tid), _| rooms.get(rk).is_some_and(|r| r.tracks.contains_key(&**tid)));
        book.rooms.retain(|rk, rs| {
            let Some(r) = rooms.get(rk) else {
                return false;
            };
            rs.remote.retain(|shard, _| r.peers.contains(shard));
            rs.greeted.retain(|shard| r.peers.contains(shard));
            rs.knows.retain(|k| r.parts.contains_key(k));
            true
        });
    }

    fn room_speakers(&mut self, rk: RoomKey) {
        let Sfu {
            rooms,
            speakers: book,
            ..
        } = self;
        let Some(r) = rooms.get_mut(&rk) else {
            return;
        };
        let mut speaking = Vec::new();
        for (tid, t) in r.tracks.iter_mut() {
            if t.kind != TrackKind::Audio {
                continue;
            }
            let Publisher::Local { part, .. } = t.publisher else {
                continue;
            };
            let sample = t.levels.take();
            let voice = book.voices.entry((rk, tid.clone())).or_default();
            let Some(p) = r.parts.get(&part).filter(|p| !p.grants.hidden) else {
                continue;
            };
            if t.muted {
                *voice = Voice::new();
                continue;
            }
            if let Some(level) = voice.tick(sample) {
                speaking.push((p.pid.clone(), level));
            }
        }
        let rs = book.rooms.entry(rk).or_default();
        let local = keep_order(&rs.local, rank(speaking));
        // (The levels are refreshed every tick; the other shards hear of a change of who or
        // of the order, with the levels of that moment.)
        let changed = !same_speakers(&local, &rs.local);
        rs.local = local;
        let name = r.name.clone();
        let peers: Vec<ShardId> = r.peers.iter().copied().collect();
        let mut to_peers = Vec::new();
        for peer in peers {
            // The changed list to every shard; the current one to a shard that just started
            // hosting the room (unless nobody speaks here).
            let new_peer = rs.greeted.insert(peer);
            if changed || new_peer && !rs.local.is_empty() {
                to_peers.push(peer);
            }
        }
        let list = rs.local.clone();
        for peer in to_peers {
            self.pipe_out.push(
                peer,
                PipeMsg::Speakers {
                    room: name.clone(),
                    speakers: list.clone(),
                },
            );
        }
        self.tell_speakers(rk);
    }

    /// Tell the participants here the room's merged list if it changed, and those who joined
    /// since the last change the current one (unless nobody speaks).
    fn tell_speakers(&mut self, rk: RoomKey) {
        let Some(r) = self.rooms.get(&rk) else {
            return;
        };
        let Some(rs) = self.speakers.rooms.get_mut(&rk) else {
            return;
        };
        let merged = keep_order(
            &rs.told,
            rank(
                rs.local
                    .iter()
                    .chain(rs.remote.values().flatten())
                    .map(|s| (s.participant_id.clone(), s.level)),
            ),
        );
        let members = r.members.clone();
        let changed = !same_speakers(&merged, &rs.told);
        // (Newcomers get the levels of now.)
        rs.told = merged.clone();
        if changed {
            rs.knows = members.iter().copied().collect();
            trace!(room = %r.name, speakers = merged.len(), "active speakers");
            self.broadcast(rk, None, ServerMessage::Speakers { speakers: merged });
            return;
        }
        let newcomers: Vec<PartKey> = members
            .into_iter()
            .filter(|m| rs.knows.insert(*m))
            .collect();
        if rs.told.is_empty() {
            return;
        }
        let told = rs.told.clone();
        for part in newcomers {
            self.send_to(
                part,
                ServerMessage::Speakers {
                    speakers: told.clone(),
                },
            );
        }
    }

    /// Another shard of `room` tells who speaks among its participants (only its own count).
    pub(super) fn on_remote_speakers(
        &mut self,
        from: ShardId,
        room: &str,
        speakers: Vec<SpeakerInfo>,
    ) {
        let Some(&rk) = self.room_keys.get(room) else {
            return;
        };
        let Some(r) = self.rooms.get(&rk) else {
            return;
        };
        if !r.peers.contains(&from) {
            return;
        }
        let speakers: Vec<SpeakerInfo> = speakers
            .into_iter()
            .filter(|s| {
                r.remote
                    .get(&s.participant_id)
                    .is_some_and(|m| m.shard == from)
            })
            .collect();
        self.speakers
            .rooms
            .entry(rk)
            .or_default()
            .remote
            .insert(from, speakers);
        self.tell_speakers(rk);
    }
}
