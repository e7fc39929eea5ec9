//! Which core shard a room lives on.
//!
//! Every room lives on one shard (one thread, one UDP socket). A new room goes to the shard
//! with the fewest participants (the lowest index on a tie); every later join of the room goes
//! where the room is. A room is forgotten when its last participant has left, so it may be
//! placed elsewhere next time. Pure bookkeeping: the signaling side calls it around each join
//! and leave, under one lock; nothing on the packet path touches it.

use std::collections::HashMap;

/// Room → shard, participant → shard, and each shard's load.
#[derive(Debug)]
pub struct Placement {
    /// Participants (joined or joining) per shard.
    load: Vec<usize>,
    /// Room → (shard, participants joined or joining).
    rooms: HashMap<String, (usize, usize)>,
    /// Participant id → (shard, room).
    parts: HashMap<String, (usize, String)>,
}

impl Placement {
    /// Bookkeeping for `shards` shards (at least one).
    pub fn new(shards: usize) -> Self {
        Placement {
            load: vec![0; shards.max(1)],
            rooms: HashMap::new(),
            parts: HashMap::new(),
        }
    }

    pub fn shards(&self) -> usize {
        self.load.len()
    }

    /// The shard a join of `room` goes to; the place is held until [`Placement::joined`] or
    /// [`Placement::join_failed`], so concurrent joins of a new room land together.
    pub fn reserve(&mut self, room: &str) -> usize {
        let room = room.trim();
        let shard = match self.rooms.get_mut(room) {
            Some((shard, members)) => {
                *members += 1;
                *shard
            }
            None => {
                let shard = (0..self.load.len())
                    .min_by_key(|&i| (self.load[i], i))
                    .unwrap_or(0);
                self.rooms.insert(room.to_owned(), (shard, 1));
                shard
            }
        };
        self.load[shard] += 1;
        shard
    }

    /// The reserved join succeeded: `participant` is on `shard`.
    pub fn joined(&mut self, participant: &str, room: &str, shard: usize) {
        self.parts
            .insert(participant.to_owned(), (shard, room.trim().to_owned()));
    }

    /// The reserved join failed: give the place back.
    pub fn join_failed(&mut self, room: &str, shard: usize) {
        self.release(room.trim(), shard);
    }

    /// The shard `participant` is on.
    pub fn shard_of(&self, participant: &str) -> Option<usize> {
        self.parts.get(participant).map(|(s, _)| *s)
    }

    /// `participant` has left (its session ended).
    pub fn left(&mut self, participant: &str) {
        if let Some((shard, room)) = self.parts.remove(participant) {
            self.release(&room, shard);
        }
    }

    /// Participants per shard.
    pub fn load(&self) -> &[usize] {
        &self.load
    }

    /// The shard `room` is on, if it has participants.
    pub fn room_shard(&self, room: &str) -> Option<usize> {
        self.rooms.get(room.trim()).map(|(s, _)| *s)
    }

    fn release(&mut self, room: &str, shard: usize) {
        if let Some(l) = self.load.get_mut(shard) {
            *l = l.saturating_sub(1);
        }
        if let Some((_, members)) = self.rooms.get_mut(room) {
            *members = members.saturating_sub(1);
            if *members == 0 {
                self.rooms.remove(room);
            }
        }
    }
}

#[cfg(test)]
// Tests pick an arbitrary origin for their virtual time (and may share test state).
#[allow(clippy::disallowed_methods, clippy::disallowed_types)]
mod tests {
    use super::*;

    #[test]
    fn rooms_go_to_the_least_loaded_shard_and_stay_there() {
        let mut p = Placement::new(2);
        let a = p.reserve("a");
        assert_eq!(a, 0);
        p.joined("PA_1", "a", a);
        // The second room goes to the empty shard; the room's second member joins it on 0.
        assert_eq!(p.reserve("b"), 1);
        p.joined("PA_2", "b", 1);
        assert_eq!(p.reserve(" a "), 0);
        p.joined("PA_3", "a", 0);
        assert_eq!(p.load(), &[2, 1]);
        assert_eq!(p.reserve("c"), 1);
        p.joined("PA_4", "c", 1);
        assert_eq!(p.shard_of("PA_3"), Some(0));
        assert_eq!(p.shard_of("PA_9"), None);
    }

    #[test]
    fn a_room_is_forgotten_when_its_last_member_leaves() {
        let mut p = Placement::new(2);
        assert_eq!(p.reserve("a"), 0);
        p.joined("PA_1", "a", 0);
        assert_eq!(p.reserve("b"), 1);
        p.joined("PA_2", "b", 1);
        assert_eq!(p.reserve("b"), 1);
        p.joined("PA_3", "b", 1);
        p.left("PA_1");
        assert_eq!(p.room_shard("a"), None);
        assert_eq!(p.load(), &[0, 2]);
        // "a" comes back on the emptier shard.
        assert_eq!(p.reserve("a"), 0);
        p.left("PA_unknown");
        assert_eq!(p.load(), &[1, 2]);
    }

    #[test]
    fn a_failed_join_gives_its_place_back() {
        let mut p = Placement::new(3);
        let s = p.reserve("x");
        p.join_failed("x", s);
        assert_eq!(p.load(), &[0, 0, 0]);
        assert_eq!(p.room_shard("x"), None);
        // Concurrent joins of a new room land together.
        let s1 = p.reserve("y");
        let s2 = p.reserve("y");
        assert_eq!(s1, s2);
    }
}
