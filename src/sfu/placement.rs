//! Which core shards a room lives on.
//!
//! A new room goes to the shard with the fewest participants (the lowest index on a tie), and
//! its later joins go where it is, until the room has `spread_above` participants: from then
//! on each join goes to the least-loaded shard, so a big room (a livestream with thousands of
//! viewers) spreads over every core. The shards hosting one room exchange its media and events
//! over the pipe (`super::pipe`); a join is told which other shards already host its room.
//! A room is forgotten when its last participant has left, so it may be placed elsewhere next
//! time. Pure bookkeeping: the signaling side calls it around each join and leave, under one
//! lock; nothing on the packet path touches it.
//!
//! It is also where the whole server's view of its rooms is, so it enforces the per-server
//! caps ([`JoinCaps`]): rooms open at once and participants per room (over every shard of the
//! room). A join past one is refused ([`Refusal`]) before anything is held or sent to a
//! shard, so a refusal changes nothing. Reservations count: a join on its way holds its place
//! (and its room's slot) until it succeeds or gives them back. A rejoin of an identity
//! already in the room replaces the old participant, so it is never refused by the
//! participant cap (for a moment both are counted: the old one leaves when replaced).

use super::admin::Target;
use super::pipe::{self, ShardId};
use std::collections::{BTreeSet, HashMap};

/// Room → shards, participant → shard, and each shard's load.
#[derive(Debug)]
pub struct Placement {
    /// Participants (joined or joining) per shard.
    load: Vec<usize>,
    /// Room → participants (joined or joining) on each shard.
    rooms: HashMap<String, Vec<usize>>,
    /// Participant id → (shard, room, identity).
    parts: HashMap<String, (usize, String, Option<String>)>,
    /// (Room, identity) → the shard and participant id of its latest join: a second join of
    /// an identity goes to the same shard, which replaces the first.
    identities: HashMap<(String, String), (usize, String)>,
    /// A room with this many participants spreads over the shards (0: never).
    spread_above: usize,
    caps: JoinCaps,
    /// Room → its home shard: where its first participant went, for as long as the room is
    /// known here. The home sequences the room's timeline (`super::timeline`). For a room
    /// extended here from another node: that node's entry (`super::pipe::node_entry`).
    homes: HashMap<String, usize>,
    /// Room → the other nodes' shards that extended it from here (they greeted this node's
    /// entry): they are greeted by the room's later shards here, and keep the room known.
    remote: HashMap<String, BTreeSet<ShardId>>,
}

/// Where a message to this node's entry for a room goes ([`Placement::entry_hello`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Fanout {
    /// The room's shards here, and whether each is its home.
    pub local: Vec<(ShardId, bool)>,
    /// The shards of other nodes that extended the room from here (not the greeter's node):
    /// the greeting is passed on to them, so that the room's nodes all know each other.
    pub introduce: Vec<ShardId>,
}

/// Per-server caps on joins (0: unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JoinCaps {
    /// Rooms open at once (with participants joined or joining).
    pub max_rooms: usize,
    /// Participants (joined or joining) in one room, over all its shards.
    pub max_participants_per_room: usize,
}

/// Why [`Placement::reserve`] refused a join.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The join would open a new room past [`JoinCaps::max_rooms`].
    #[error("the server has {max} rooms open, its limit: no new room can be opened now")]
    TooManyRooms { max: usize },
    /// The room has [`JoinCaps::max_participants_per_room`] participants.
    #[error("room `{room}` is full ({max} participants)")]
    RoomFull { room: String, max: usize },
}

/// Where a join goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Place {
    pub shard: usize,
    /// The other shards already hosting the room.
    pub peers: Vec<usize>,
    /// The room's home shard (see [`Placement`]); `shard` for a new room.
    pub home: usize,
}

impl Placement {
    /// Bookkeeping for `shards` shards (at least one); rooms spread over shards from
    /// `spread_above` participants (0: never).
    pub fn new(shards: usize, spread_above: usize) -> Self {
        Placement {
            load: vec![0; shards.max(1)],
            rooms: HashMap::new(),
            parts: HashMap::new(),
            identities: HashMap::new(),
            spread_above,
            caps: JoinCaps::default(),
            homes: HashMap::new(),
            remote: HashMap::new(),
        }
    }

    /// The same bookkeeping with these caps.
    pub fn with_caps(mut self, caps: JoinCaps) -> Self {
        self.caps = caps;
        self
    }

    /// Change the caps; joins already placed stay (a lowered cap refuses only later joins).
    pub fn set_caps(&mut self, caps: JoinCaps) {
        self.caps = caps;
    }

    pub fn caps(&self) -> JoinCaps {
        self.caps
    }

    /// Rooms open (with participants joined or joining).
    pub fn rooms(&self) -> usize {
        self.rooms.len()
    }

    /// The names of the rooms open (with participants joined or joining).
    pub fn room_names(&self) -> Vec<String> {
        self.rooms.keys().cloned().collect()
    }

    /// The names of the rooms open whose home is here (not extended from another node): the
    /// rooms this node holds the lease of in a cluster.
    pub fn homed_room_names(&self) -> Vec<String> {
        self.rooms
            .keys()
            .filter(|r| {
                self.homes
                    .get(*r)
                    .is_none_or(|&h| pipe::split_remote(h).is_none())
            })
            .cloned()
            .collect()
    }

    /// Participants here per room whose home is here.
    pub fn homed_room_sizes(&self) -> Vec<(String, usize)> {
        self.homed_room_names()
            .into_iter()
            .map(|r| {
                let n = self.room_size(&r);
                (r, n)
            })
            .collect()
    }

    /// Shard `from` of another node greeted this node's entry for `room` (it extends the room
    /// from here): it is remembered as one of the room's shards, and the greeting goes to the
    /// room's shards here (its home included, even without participants: it keeps the room
    /// for its timeline) and is passed on to the room's shards on third nodes. A room not
    /// known here (its last participant left meanwhile) is opened again, with a home on the
    /// least-loaded shard.
    pub fn entry_hello(&mut self, room: &str, from: ShardId) -> Fanout {
        let room = room.trim();
        let n = self.load.len();
        if !self.rooms.contains_key(room) {
            self.rooms.insert(room.to_owned(), vec![0; n]);
            let home = (0..n).min_by_key(|&i| (self.load[i], i)).unwrap_or(0);
            self.homes.insert(room.to_owned(), home);
        }
        let from_node = pipe::split_remote(from).map(|(node, _)| node);
        let remote = self.remote.entry(room.to_owned()).or_default();
        let introduce = remote
            .iter()
            .copied()
            .filter(|&s| pipe::split_remote(s).map(|(node, _)| node) != from_node)
            .collect();
        remote.insert(from);
        Fanout {
            local: self.entry_targets(room),
            introduce,
        }
    }

    /// The room's shards here and whether each is its home (for messages to this node's
    /// entry): those with participants, and the home.
    pub fn entry_targets(&self, room: &str) -> Vec<(ShardId, bool)> {
        let room = room.trim();
        let home = self.homes.get(room).copied();
        let mut out: Vec<(ShardId, bool)> = self
            .rooms
            .get(room)
            .map(|c| {
                (0..c.len())
                    .filter(|&i| c[i] > 0 || Some(i) == home)
                    .map(|i| (i, Some(i) == home))
                    .collect()
            })
            .unwrap_or_default();
        if out.is_empty()
            && let Some(h) = home.filter(|&h| h < self.load.len())
        {
            out.push((h, true));
        }
        out
    }

    /// Shard `from` of another node no longer hosts `room`.
    pub fn remote_bye(&mut self, room: &str, from: ShardId) {
        let room = room.trim();
        if let Some(set) = self.remote.get_mut(room) {
            set.remove(&from);
            if set.is_empty() {
                self.remote.remove(room);
            }
        }
        self.forget_if_empty(room);
    }

    /// The node numbered `node` is gone: its shards are forgotten, and each room whose home
    /// was there gets a new one here (the shard with most of its participants). Returns those
    /// rooms and their new homes.
    pub fn node_gone(&mut self, node: u32) -> Vec<(String, ShardId)> {
        let on_node = |s: ShardId| pipe::split_remote(s).is_some_and(|(n, _)| n == node);
        let mut emptied = Vec::new();
        for (room, set) in &mut self.remote {
            set.retain(|&s| !on_node(s));
            if set.is_empty() {
                emptied.push(room.clone());
            }
        }
        for room in &emptied {
            self.remote.remove(room);
        }
        let mut moved = Vec::new();
        for (room, home) in &mut self.homes {
            if on_node(*home) {
                let per_shard = self.rooms.get(room).map(Vec::as_slice).unwrap_or(&[]);
                let new = (0..per_shard.len())
                    .max_by_key(|&i| (per_shard[i], std::cmp::Reverse(i)))
                    .unwrap_or(0);
                *home = new;
                moved.push((room.clone(), new));
            }
        }
        for room in emptied {
            self.forget_if_empty(&room);
        }
        moved.sort();
        moved
    }

    fn forget_if_empty(&mut self, room: &str) {
        let empty = self
            .rooms
            .get(room)
            .is_some_and(|c| c.iter().all(|&c| c == 0));
        if empty && !self.remote.contains_key(room) {
            self.rooms.remove(room);
            self.homes.remove(room);
        }
    }

    /// Participants (joined or joining) in `room`, over all its shards.
    pub fn room_size(&self, room: &str) -> usize {
        self.rooms.get(room.trim()).map_or(0, |c| c.iter().sum())
    }

    pub fn shards(&self) -> usize {
        self.load.len()
    }

    /// Where a join of `room` (by `identity`, if known) goes; the place is held until
    /// [`Placement::joined`] or [`Placement::join_failed`], so concurrent joins of a new room
    /// land together. An identity already in the room goes where it is. Refused (nothing held)
    /// when the join would open a room past [`JoinCaps::max_rooms`], or add a participant
    /// past [`JoinCaps::max_participants_per_room`] (a rejoin of an identity in the room is
    /// never refused).
    pub fn reserve(&mut self, room: &str, identity: Option<&str>) -> Result<Place, Refusal> {
        self.reserve_in(room, identity, None)
    }

    /// [`Placement::reserve`] for a room whose home is on another node (its entry,
    /// `remote_home`) when the room is not known here yet: the room is extended here.
    pub fn reserve_in(
        &mut self,
        room: &str,
        identity: Option<&str>,
        remote_home: Option<ShardId>,
    ) -> Result<Place, Refusal> {
        let room = room.trim();
        let known = identity.and_then(|id| {
            self.identities
                .get(&(room.to_owned(), id.to_owned()))
                .map(|(shard, _)| *shard)
        });
        let n = self.load.len();
        match self.rooms.get(room) {
            None => {
                let max = self.caps.max_rooms;
                if max > 0 && self.rooms.len() >= max {
                    return Err(Refusal::TooManyRooms { max });
                }
            }
            Some(per_shard) => {
                let max = self.caps.max_participants_per_room;
                if max > 0 && known.is_none() && per_shard.iter().sum::<usize>() >= max {
                    return Err(Refusal::RoomFull {
                        room: room.to_owned(),
                        max,
                    });
                }
            }
        }
        let least_loaded = |load: &[usize], prefer: &[usize]| {
            (0..n)
                .min_by_key(|&i| (load[i], prefer.get(i).is_none_or(|&c| c == 0), i))
                .unwrap_or(0)
        };
        let per_shard = self
            .rooms
            .entry(room.to_owned())
            .or_insert_with(|| vec![0; n]);
        let total: usize = per_shard.iter().sum();
        let shard = if let Some(shard) = known.filter(|&s| s < n) {
            shard
        } else if total == 0 {
            least_loaded(&self.load, &[])
        } else if self.spread_above == 0 || total < self.spread_above {
            // Where most of the room is.
            (0..n)
                .max_by_key(|&i| (per_shard[i], std::cmp::Reverse(i)))
                .unwrap_or(0)
        } else {
            // Big enough to spread: the least-loaded shard (one already hosting the room on
            // a tie).
            least_loaded(&self.load, per_shard)
        };
        let mut peers: Vec<ShardId> = (0..n).filter(|&i| i != shard && per_shard[i] > 0).collect();
        per_shard[shard] += 1;
        self.load[shard] += 1;
        let home = *self
            .homes
            .entry(room.to_owned())
            .or_insert(remote_home.unwrap_or(shard));
        peers.extend(self.remote.get(room).into_iter().flatten().copied());
        Ok(Place { shard, peers, home })
    }

    /// The reserved join succeeded: `participant` (`identity`) is on `shard`.
    pub fn joined(&mut self, participant: &str, room: &str, shard: usize, identity: Option<&str>) {
        let room = room.trim().to_owned();
        if let Some(id) = identity {
            self.identities.insert(
                (room.clone(), id.to_owned()),
                (shard, participant.to_owned()),
            );
        }
        self.parts.insert(
            participant.to_owned(),
            (shard, room, identity.map(str::to_owned)),
        );
    }

    /// The reserved join failed: give the place back.
    pub fn join_failed(&mut self, room: &str, shard: usize) {
        self.release(room.trim(), shard);
    }

    /// The shard `participant` is on.
    pub fn shard_of(&self, participant: &str) -> Option<usize> {
        self.parts.get(participant).map(|(s, _, _)| *s)
    }

    /// The shard and participant id of the participant of `room` that `target` names.
    pub fn locate(&self, room: &str, target: &Target) -> Option<(usize, String)> {
        let room = room.trim();
        match target {
            Target::Participant(pid) => self
                .parts
                .get(pid)
                .filter(|(_, r, _)| r == room)
                .map(|(shard, _, _)| (*shard, pid.clone())),
            Target::Identity(id) => self.identities.get(&(room.to_owned(), id.clone())).cloned(),
        }
    }

    /// `participant` has left (its session ended).
    pub fn left(&mut self, participant: &str) {
        if let Some((shard, room, identity)) = self.parts.remove(participant) {
            if let Some(id) = identity {
                let key = (room.clone(), id);
                if self
                    .identities
                    .get(&key)
                    .is_some_and(|(_, p)| p == participant)
                {
                    self.identities.remove(&key);
                }
            }
            self.release(&room, shard);
        }
    }

    /// Participants per shard.
    pub fn load(&self) -> &[usize] {
        &self.load
    }

    /// The shards `room` is on (with participants joined or joining).
    pub fn room_shards(&self, room: &str) -> Vec<usize> {
        self.rooms
            .get(room.trim())
            .map(|c| (0..c.len()).filter(|&i| c[i] > 0).collect())
            .unwrap_or_default()
    }

    /// The home shard of `room` (where its timeline is sequenced), if the room is known.
    pub fn home_of(&self, room: &str) -> Option<usize> {
        self.homes.get(room.trim()).copied()
    }

    fn release(&mut self, room: &str, shard: usize) {
        if let Some(l) = self.load.get_mut(shard) {
            *l = l.saturating_sub(1);
        }
        if let Some(per_shard) = self.rooms.get_mut(room) {
            if let Some(c) = per_shard.get_mut(shard) {
                *c = c.saturating_sub(1);
            }
        }
        self.forget_if_empty(room);
    }
}

#[cfg(test)]
// Tests pick an arbitrary origin for their virtual time (and may share test state).
#[allow(clippy::disallowed_methods, clippy::disallowed_types)]
mod tests {
    use super::*;

    impl Placement {
        fn reserve_shard(&mut self, room: &str) -> usize {
            self.reserve(room, None).unwrap().shard
        }
    }

    #[test]
    fn rooms_go_to_the_least_loaded_shard_and_stay_there() {
        let mut p = Placement::new(2, 0);
        let a = p.reserve_shard("a");
        assert_eq!(a, 0);
        p.joined("PA_1", "a", a, None);
        // The second room goes to the empty shard; the room's second member joins it on 0.
        assert_eq!(p.reserve_shard("b"), 1);
        p.joined("PA_2", "b", 1, None);
        assert_eq!(p.reserve_shard(" a "), 0);
        p.joined("PA_3", "a", 0, None);
        assert_eq!(p.load(), &[2, 1]);
        assert_eq!(p.reserve_shard("c"), 1);
        p.joined("PA_4", "c", 1, None);
        assert_eq!(p.shard_of("PA_3"), Some(0));
        assert_eq!(p.shard_of("PA_9"), None);
    }

    #[test]
    fn a_room_keeps_its_home_while_it_is_known() {
        let mut p = Placement::new(2, 1);
        let first = p.reserve("a", None).unwrap();
        assert_eq!(first.home, first.shard);
        p.joined("PA_1", "a", first.shard, None);
        // Spread: the second join goes to the other shard, with the same home.
        let second = p.reserve("a", None).unwrap();
        assert_ne!(second.shard, first.shard);
        assert_eq!(second.home, first.shard);
        p.joined("PA_2", "a", second.shard, None);
        // The home's participant leaves: the room keeps its home while PA_2 is there.
        p.left("PA_1");
        assert_eq!(p.home_of("a"), Some(first.shard));
        let third = p.reserve("a", None).unwrap();
        assert_eq!(third.home, first.shard);
        p.joined("PA_3", "a", third.shard, None);
        p.left("PA_2");
        p.left("PA_3");
        assert_eq!(p.home_of("a"), None);
    }

    #[test]
    fn a_room_is_forgotten_when_its_last_member_leaves() {
        let mut p = Placement::new(2, 0);
        assert_eq!(p.reserve_shard("a"), 0);
        p.joined("PA_1", "a", 0, None);
        assert_eq!(p.reserve_shard("b"), 1);
        p.joined("PA_2", "b", 1, None);
        assert_eq!(p.reserve_shard("b"), 1);
        p.joined("PA_3", "b", 1, None);
        p.left("PA_1");
        assert!(p.room_shards("a").is_empty());
        assert_eq!(p.load(), &[0, 2]);
        // "a" comes back on the emptier shard.
        assert_eq!(p.reserve_shard("a"), 0);
        p.left("PA_unknown");
        assert_eq!(p.load(), &[1, 2]);
    }

    #[test]
    fn a_room_extended_from_another_node_has_its_home_there_and_no_lease_here() {
        let entry = pipe::node_entry(7);
        let mut p = Placement::new(2, 0);
        let place = p.reserve_in("r", None, Some(entry)).unwrap();
        assert_eq!(
            place,
            Place {
                shard: 0,
                peers: vec![],
                home: entry,
            }
        );
        p.joined("PA_1", "r", 0, None);
        // A later join here keeps the remote home, and the room is not one of this node's.
        assert_eq!(p.reserve_in("r", None, Some(entry)).unwrap().home, entry);
        p.joined("PA_2", "r", 0, None);
        p.reserve("own", None).unwrap();
        assert_eq!(p.room_size("r"), 2);
        assert_eq!(p.homed_room_names(), vec!["own".to_owned()]);
        assert_eq!(p.homed_room_sizes(), vec![("own".to_owned(), 1)]);
        // Its home node is gone: the room's home moves here, to the shard with its members.
        assert_eq!(p.node_gone(7), vec![("r".to_owned(), 0)]);
        assert_eq!(p.home_of("r"), Some(0));
        let mut homed = p.homed_room_names();
        homed.sort();
        assert_eq!(homed, vec!["own".to_owned(), "r".to_owned()]);
    }

    #[test]
    fn other_nodes_greeting_this_nodes_entry_are_remembered_and_introduced() {
        let (b0, b1, c0) = (
            pipe::remote_shard(1, 0),
            pipe::remote_shard(1, 1),
            pipe::remote_shard(2, 0),
        );
        let mut p = Placement::new(3, 1);
        let first = p.reserve("r", None).unwrap();
        p.joined("PA_1", "r", first.shard, None);
        // B's shard greets: it reaches the room's shard here (the home), nobody to introduce.
        let f = p.entry_hello("r", b0);
        assert_eq!(
            f,
            Fanout {
                local: vec![(first.shard, true)],
                introduce: vec![],
            }
        );
        // A second shard here learns of B's shard among its peers.
        let second = p.reserve("r", None).unwrap();
        assert_ne!(second.shard, first.shard);
        assert_eq!(second.peers, vec![first.shard, b0]);
        p.joined("PA_2", "r", second.shard, None);
        // Another shard of B is not introduced to B's own; C's is introduced to both of B's.
        let f = p.entry_hello("r", b1);
        assert!(f.introduce.is_empty(), "{f:?}");
        assert_eq!(f.local.len(), 2);
        let f = p.entry_hello("r", c0);
        assert_eq!(f.introduce, vec![b0, b1]);
        // Messages to the entry reach the room's shards here, the home marked.
        let mut targets = p.entry_targets("r");
        targets.sort();
        let mut want = vec![(first.shard, true), (second.shard, false)];
        want.sort();
        assert_eq!(targets, want);
        // The room stays known while other nodes extend it, after its last member here left.
        p.left("PA_1");
        p.left("PA_2");
        assert_eq!(p.rooms(), 1);
        assert_eq!(p.entry_targets("r"), vec![(first.shard, true)]);
        p.remote_bye("r", b0);
        p.remote_bye("r", b1);
        assert_eq!(p.node_gone(2), vec![]);
        assert_eq!(p.rooms(), 0);
        assert!(p.entry_targets("r").is_empty());
        // A greeting for a room not known (any more) opens it again, its home the least
        // loaded shard.
        let f = p.entry_hello("gone", b0);
        assert_eq!(f.local, vec![(0, true)]);
        assert_eq!(p.home_of("gone"), Some(0));
    }

    #[test]
    fn a_failed_join_gives_its_place_back() {
        let mut p = Placement::new(3, 0);
        let s = p.reserve_shard("x");
        p.join_failed("x", s);
        assert_eq!(p.load(), &[0, 0, 0]);
        assert!(p.room_shards("x").is_empty());
        // Concurrent joins of a new room land together.
        let s1 = p.reserve_shard("y");
        let s2 = p.reserve_shard("y");
        assert_eq!(s1, s2);
    }

    #[test]
    fn a_big_room_spreads_over_the_shards_and_joins_learn_their_peers() {
        let mut p = Placement::new(2, 3);
        // Below the threshold the room stays together on shard 0 (even with 1 emptier).
        for i in 0..3 {
            let place = p.reserve("live", None).unwrap();
            assert_eq!(
                place,
                Place {
                    shard: 0,
                    peers: vec![],
                    home: 0,
                }
            );
            p.joined(&format!("PA_{i}"), "live", 0, None);
        }
        // From 3 on it spreads: the least-loaded shard, told that shard 0 hosts the room.
        let place = p.reserve("live", None).unwrap();
        assert_eq!(
            place,
            Place {
                shard: 1,
                peers: vec![0],
                home: 0,
            }
        );
        p.joined("PA_3", "live", 1, None);
        let mut per = [0usize; 2];
        per[0] = 3;
        per[1] = 1;
        for i in 4..100 {
            let place = p.reserve("live", None).unwrap();
            assert_eq!(place.peers, vec![1 - place.shard]);
            per[place.shard] += 1;
            p.joined(&format!("PA_{i}"), "live", place.shard, None);
        }
        assert_eq!(per, [50, 50]);
        assert_eq!(p.room_shards("live"), vec![0, 1]);
        // Another room still goes to one shard.
        assert_eq!(p.reserve("other", None).unwrap().peers, Vec::<usize>::new());
        // With spreading off, a room never leaves its shard.
        let mut q = Placement::new(2, 0);
        for _ in 0..10 {
            assert_eq!(q.reserve("r", None).unwrap().shard, 0);
        }
    }

    #[test]
    fn an_identity_rejoins_where_it_is() {
        let mut p = Placement::new(2, 1);
        assert_eq!(p.reserve("r", Some("alice")).unwrap().shard, 0);
        p.joined("PA_1", "r", 0, Some("alice"));
        // The room spreads: bob goes to the emptier shard, alice's second join to hers.
        assert_eq!(p.reserve("r", Some("bob")).unwrap().shard, 1);
        p.joined("PA_2", "r", 1, Some("bob"));
        assert_eq!(p.reserve("r", Some("alice")).unwrap().shard, 0);
        p.joined("PA_3", "r", 0, Some("alice"));
        // The first alice's session ends after the second joined: the identity stays known.
        p.left("PA_1");
        assert_eq!(p.reserve("r", Some("alice")).unwrap().shard, 0);
        p.join_failed("r", 0);
        p.left("PA_3");
        // Gone: alice is placed like anyone (the emptier shard).
        assert_eq!(p.load(), &[0, 1]);
        assert_eq!(p.reserve("r", Some("alice")).unwrap().shard, 0);
        // Another room's alice is someone else.
        assert_eq!(
            p.reserve("s", Some("bob")).unwrap().peers,
            Vec::<usize>::new()
        );
    }
    fn capped(shards: usize, spread_above: usize, max_rooms: usize, per_room: usize) -> Placement {
        Placement::new(shards, spread_above).with_caps(JoinCaps {
            max_rooms,
            max_participants_per_room: per_room,
        })
    }

    #[test]
    fn max_rooms_refuses_new_rooms_only_and_a_closed_room_frees_its_slot() {
        let mut p = capped(2, 0, 2, 0);
        assert_eq!(p.reserve_shard("a"), 0);
        p.joined("PA_1", "a", 0, None);
        // A reservation holds its room's slot before the join completes.
        assert_eq!(p.reserve_shard("b"), 1);
        assert_eq!(p.rooms(), 2);
        assert_eq!(p.reserve("c", None), Err(Refusal::TooManyRooms { max: 2 }));
        // The refusal changed nothing.
        assert_eq!(p.load(), &[1, 1]);
        assert!(p.room_shards("c").is_empty());
        assert_eq!(p.rooms(), 2);
        // Existing rooms are never refused by it.
        for i in 0..5 {
            let s = p.reserve(" a ", None).unwrap().shard;
            p.joined(&format!("PA_a{i}"), "a", s, None);
        }
        assert_eq!(p.room_size("a"), 6);
        // "b"'s join fails: its slot is free again.
        p.join_failed("b", 1);
        assert_eq!(p.rooms(), 1);
        assert_eq!(p.reserve_shard("c"), 1);
        p.joined("PA_c", "c", 1, None);
        assert!(matches!(
            p.reserve("d", None),
            Err(Refusal::TooManyRooms { .. })
        ));
        // "c" closes (its last member leaves): "d" may open.
        p.left("PA_c");
        assert_eq!(p.rooms(), 1);
        assert!(p.reserve("d", None).is_ok());
        // 0: unlimited.
        let mut q = capped(1, 0, 0, 0);
        for i in 0..100 {
            q.reserve(&format!("r{i}"), None).unwrap();
        }
        assert_eq!(q.rooms(), 100);
    }

    #[test]
    fn max_participants_counts_a_spread_room_over_its_shards() {
        // The room spreads from 2 participants; the cap is 5 over both shards.
        let mut p = capped(2, 2, 0, 5);
        for i in 0..5 {
            let place = p.reserve("live", Some(&format!("u{i}"))).unwrap();
            p.joined(
                &format!("PA_{i}"),
                "live",
                place.shard,
                Some(&format!("u{i}")),
            );
        }
        assert_eq!(p.room_shards("live"), vec![0, 1]);
        assert_eq!(p.load(), &[3, 2]);
        assert_eq!(
            p.reserve("live", Some("u9")),
            Err(Refusal::RoomFull {
                room: "live".into(),
                max: 5
            })
        );
        assert_eq!(
            p.reserve(" live ", None).unwrap_err().to_string(),
            "room `live` is full (5 participants)"
        );
        // Refused: nothing held.
        assert_eq!(p.load(), &[3, 2]);
        assert_eq!(p.room_size("live"), 5);
        // Another room is not affected.
        assert!(p.reserve("other", None).is_ok());
        // Someone leaves (on either shard): one place is free, and only one.
        p.left("PA_1");
        let place = p.reserve("live", Some("u9")).unwrap();
        assert!(matches!(
            p.reserve("live", Some("u10")),
            Err(Refusal::RoomFull { .. })
        ));
        // That join fails (or is abandoned): its place is back.
        p.join_failed("live", place.shard);
        let place = p.reserve("live", Some("u10")).unwrap();
        p.joined("PA_10", "live", place.shard, Some("u10"));
        assert!(p.reserve("live", None).is_err());
    }

    #[test]
    fn an_identity_in_the_room_may_rejoin_at_the_cap() {
        let mut p = capped(1, 0, 1, 2);
        p.reserve("r", Some("alice")).unwrap();
        p.joined("PA_1", "r", 0, Some("alice"));
        p.reserve("r", Some("bob")).unwrap();
        p.joined("PA_2", "r", 0, Some("bob"));
        assert!(matches!(
            p.reserve("r", Some("carol")),
            Err(Refusal::RoomFull { .. })
        ));
        // Alice's second join replaces her first: allowed at the cap.
        assert_eq!(
            p.reserve("r", Some("alice")),
            Ok(Place {
                shard: 0,
                peers: vec![],
                home: 0,
            })
        );
        p.joined("PA_3", "r", 0, Some("alice"));
        // The replaced session ends: back at the cap, alice still known.
        p.left("PA_1");
        assert_eq!(p.room_size("r"), 2);
        assert!(p.reserve("r", Some("carol")).is_err());
        assert!(p.reserve("r", Some("alice")).is_ok());
        p.join_failed("r", 0);
        // Alice's identity in another room is someone else (and that room is over max_rooms).
        assert_eq!(
            p.reserve("s", Some("alice")),
            Err(Refusal::TooManyRooms { max: 1 })
        );
        // Once alice has left for good, her identity is not special any more.
        p.left("PA_3");
        p.reserve("r", Some("carol")).unwrap();
        p.joined("PA_4", "r", 0, Some("carol"));
        assert!(matches!(
            p.reserve("r", Some("alice")),
            Err(Refusal::RoomFull { .. })
        ));
    }
}
