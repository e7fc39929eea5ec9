//! The room timeline in the core (the pure parts are in `super::super::timeline`): what a
//! participant sends is submitted to the room's home shard, which stamps it, keeps `chat` in
//! history, batches ticked input, acknowledges, and delivers: here, and to the room's other
//! shards over the pipe. Room events (joins, leaves, tracks, mutes) are stamped on the home
//! as it hears of them. Messages for a channel that is not open yet wait for it.

use super::super::pipe::Submitted;
use super::super::timeline::{Audience, Entry, Lane, Seen, Stamp, frame_ack, frame_ticks};
use super::*;

/// How often a participant may ask for history: bursts of 3, then one a second (a replay
/// may be a whole history: up to 4 MiB).
pub(super) const HISTORY_RATE: data::RateLimit = data::RateLimit {
    messages_per_sec: 1,
    message_burst: 3,
    bytes_per_sec: 0,
    byte_burst: 1,
};

/// The name of a room event that goes on the timeline (`None`: not one).
fn event_name(msg: &ServerMessage) -> Option<&'static str> {
    Some(match msg {
        ServerMessage::ParticipantJoined { .. } => "participant_joined",
        ServerMessage::ParticipantLeft { .. } => "participant_left",
        ServerMessage::TrackPublished { .. } => "track_published",
        ServerMessage::TrackUnpublished { .. } => "track_unpublished",
        ServerMessage::TrackMuted { .. } => "track_muted",
        _ => return None,
    })
}

impl<T: Transmit> Sfu<T> {
    /// The server's clock at `now`, in µs since the Unix epoch.
    fn wall_micros(&self, now: Instant) -> u64 {
        crate::signal::unix_micros(self.wall_clock(now))
    }

    /// A checked message from a participant here (or the admin API): to the room's home.
    pub(super) fn submit(&mut self, rk: RoomKey, msg: Submitted, now: Instant) {
        let Some(room) = self.rooms.get(&rk) else {
            return;
        };
        match room.home {
            None => self.sequence(rk, msg, now),
            Some(home) => {
                let room = room.name.clone();
                self.pipe_out.push(home, PipeMsg::Submit { room, msg });
            }
        }
    }

    /// (On the room's home.) Stamp `msg` on the timeline and send it on its way.
    pub(super) fn sequence(&mut self, rk: RoomKey, msg: Submitted, now: Instant) {
        let wall = self.wall_micros(now);
        let Some(room) = self.rooms.get_mut(&rk) else {
            return;
        };
        let (lane, origin) = (msg.lane, msg.origin.min(now));
        let t = &mut room.timeline;
        if let Some(sseq) = msg.sseq {
            let seen = t
                .dedup
                .get(&msg.from)
                .map_or(Seen::New, |d| d[lane as usize].check(sseq));
            if let Seen::Duplicate(first) = seen {
                self.stats.data_duplicates_dropped += 1;
                trace!(from = %msg.from, sseq, "duplicate data-channel message dropped");
                if msg.ack {
                    let ack = frame_ack(sseq, first, true, None);
                    self.send_private(rk, &msg.from, lane, true, ack, now);
                }
                return;
            }
        }
        let stamp = t.seq.stamp(lane, wall);
        if let Some(sseq) = msg.sseq {
            t.dedup.entry(msg.from.clone()).or_default()[lane as usize].record(sseq, stamp);
        }
        self.stats.data_messages_sequenced += 1;
        let entry = Entry {
            stamp,
            from: msg.from.clone(),
            sseq: msg.sseq,
            event: msg.event,
            is_text: msg.is_text,
            audience: match (msg.event, msg.to) {
                (Some(_), _) => Audience::Events,
                (None, None) => Audience::All,
                (None, Some(to)) => Audience::Only(to),
            },
            payload: msg.payload,
        };
        if lane == Lane::Chat {
            t.history.push(now, entry.clone());
        }
        let mut tick = None;
        let mut closed = None;
        if lane == Lane::Input
            && let Some(ticker) = t.ticker.as_mut()
        {
            closed = ticker.take(now);
            let was_idle = ticker.deadline().is_none();
            tick = Some(ticker.push(now, entry.clone()));
            if was_idle && let Some(at) = ticker.deadline() {
                self.tick_due.insert((at, rk));
            }
        }
        if let Some((k, entries)) = closed {
            self.flush_tick(rk, k, entries, now);
        }
        if tick.is_none() {
            let framed = entry.framed(false);
            self.deliver_live(
                rk,
                lane,
                &entry.from,
                &entry.audience,
                entry.is_text,
                framed,
                now,
                origin,
            );
        }
        if msg.ack
            && let Some(sseq) = msg.sseq
        {
            let ack = frame_ack(sseq, Some(stamp), false, tick);
            self.send_private(rk, &msg.from, lane, true, ack, now);
        }
    }

    /// (On the room's home.) A room event on the timeline, for those that asked for them.
    pub(super) fn timeline_event(&mut self, rk: RoomKey, msg: &ServerMessage) {
        let Some(name) = event_name(msg) else {
            return;
        };
        let now = self.now;
        let wall = self.wall_micros(now);
        let Some(room) = self.rooms.get_mut(&rk) else {
            return;
        };
        if room.home.is_some() {
            return;
        }
        let payload = match serde_json::to_vec(msg) {
            Ok(p) => Bytes::from(p),
            Err(_) => return,
        };
        let t = &mut room.timeline;
        if let ServerMessage::ParticipantLeft { participant_id, .. } = msg {
            t.dedup.remove(participant_id);
        }
        let stamp: Stamp = t.seq.stamp(Lane::Chat, wall);
        self.stats.data_messages_sequenced += 1;
        let entry = Entry {
            stamp,
            from: data::SERVER_SENDER.to_owned(),
            sseq: None,
            event: Some(name),
            is_text: true,
            audience: Audience::Events,
            payload,
        };
        let framed = entry.framed(false);
        t.history.push(now, entry);
        self.deliver_live(
            rk,
            Lane::Chat,
            data::SERVER_SENDER,
            &Audience::Events,
            true,
            framed,
            now,
            now,
        );
    }

    /// A stamped message to its receivers here (all that `to` includes but the sender) and
    /// to the room's other shards that host any; `origin`: its origin for the relay latency.
    #[allow(clippy::too_many_arguments)]
    fn deliver_live(
        &mut self,
        rk: RoomKey,
        lane: Lane,
        from: &str,
        to: &Audience,
        is_text: bool,
        framed: Bytes,
        now: Instant,
        origin: Instant,
    ) {
        let Some(room) = self.rooms.get(&rk) else {
            return;
        };
        let targets = receivers(room, from, to);
        let shards: BTreeSet<ShardId> = match to {
            Audience::Only(pids) => pids
                .iter()
                .filter_map(|pid| room.remote.get(pid.as_str()).map(|m| m.shard))
                .collect(),
            _ => room.peers.clone(),
        };
        for shard in shards {
            self.pipe_out.push(
                shard,
                PipeMsg::Data {
                    room: room.name.clone(),
                    from: from.to_owned(),
                    channel: lane.label(),
                    is_text,
                    framed: framed.clone(),
                    to: to.clone(),
                    origin,
                },
            );
        }
        self.deliver_data(&targets, lane.label(), is_text, &framed, now, origin);
    }

    /// Where participant `pid` of the room is: here, or on another shard (with the room's
    /// name, to tell that shard).
    fn locate(&self, rk: RoomKey, pid: &str) -> Option<Located> {
        if let Some(&k) = self.by_pid.get(pid)
            && k.room == rk
        {
            return Some(Located::Here(k));
        }
        let room = self.rooms.get(&rk)?;
        let m = room.remote.get(pid)?;
        Some(Located::Shard(m.shard, room.name.clone()))
    }

    /// One message for participant `pid` of the room only (an acknowledgement, a replay),
    /// here or on its shard.
    fn send_private(
        &mut self,
        rk: RoomKey,
        pid: &str,
        lane: Lane,
        is_text: bool,
        framed: Bytes,
        now: Instant,
    ) {
        match self.locate(rk, pid) {
            Some(Located::Here(k)) => {
                self.deliver_data(&[k], lane.label(), is_text, &framed, now, now);
            }
            Some(Located::Shard(shard, room)) => self.pipe_out.push(
                shard,
                PipeMsg::Data {
                    room,
                    from: data::SERVER_SENDER.to_owned(),
                    channel: lane.label(),
                    is_text,
                    framed,
                    to: Audience::Only(vec![pid.to_owned()]),
                    origin: now,
                },
            ),
            None => {}
        }
    }

    /// A signaling message for participant `pid` of the room, here or on its shard.
    fn tell(&mut self, rk: RoomKey, pid: &str, msg: ServerMessage) {
        match self.locate(rk, pid) {
            Some(Located::Here(k)) => self.send_to(k, msg),
            Some(Located::Shard(shard, room)) => self.pipe_out.push(
                shard,
                PipeMsg::Tell {
                    room,
                    participant_id: pid.to_owned(),
                    msg,
                },
            ),
            None => {}
        }
    }

    /// `history`: replay the room's `chat` after `since` to the participant.
    pub(super) fn on_history(&mut self, part: PartKey, since: u64) {
        let now = self.now;
        let Some(room) = self.rooms.get_mut(&part.room) else {
            return;
        };
        let Some(p) = room.parts.get_mut(&part) else {
            return;
        };
        if let Err(e) = p.history_limiter.check(now, 0) {
            let m = ServerMessage::error(
                ErrorCode::RateLimited,
                format!("history not replayed: {e}"),
                Some("history"),
            );
            self.send_to(part, m);
            return;
        }
        if p.viewer.is_some() || p.publish_only {
            let m = ServerMessage::error(
                ErrorCode::InvalidState,
                "this session has no data channels",
                Some("history"),
            );
            self.send_to(part, m);
            return;
        }
        let (pid, events) = (p.pid.clone(), p.timeline_events);
        match room.home {
            None => self.replay(part.room, &pid, since, events),
            Some(home) => {
                let room = room.name.clone();
                self.pipe_out.push(
                    home,
                    PipeMsg::History {
                        room,
                        participant_id: pid,
                        since,
                        events,
                    },
                );
            }
        }
    }

    /// (On the room's home.) Replay the kept `chat` after `since` that `pid` may see.
    pub(super) fn replay(&mut self, rk: RoomKey, pid: &str, since: u64, events: bool) {
        let now = self.now;
        let Some(room) = self.rooms.get_mut(&rk) else {
            return;
        };
        let t = &mut room.timeline;
        t.history.expire(now);
        let latest = t.seq.last(Lane::Chat);
        let (info, entries) = t
            .history
            .replay(since, latest, |e| e.audience.includes(pid, &e.from, events));
        let frames: Vec<(bool, Bytes)> = entries
            .into_iter()
            .map(|e| (e.is_text, e.framed(true)))
            .collect();
        let reply = ServerMessage::History {
            since,
            oldest: info.oldest,
            latest,
            replayed: frames.len() as u64,
            complete: info.complete,
        };
        debug!(participant = %pid, since, replayed = frames.len(), complete = info.complete, "history replayed");
        for (is_text, f) in frames {
            self.send_private(rk, pid, Lane::Chat, is_text, f, now);
        }
        self.tell(rk, pid, reply);
    }

    /// Input ticks that have ended.
    pub(super) fn ticks_due(&mut self, now: Instant) {
        while let Some(&(at, rk)) = self.tick_due.first() {
            if at > now {
                break;
            }
            self.tick_due.pop_first();
            let taken = self
                .rooms
                .get_mut(&rk)
                .and_then(|r| r.timeline.ticker.as_mut())
                .and_then(|t| t.take(now));
            if let Some((k, entries)) = taken {
                self.flush_tick(rk, k, entries, now);
            }
        }
    }

    /// When the next input tick ends.
    pub(super) fn tick_deadline(&self) -> Option<Deadline> {
        self.tick_due
            .first()
            .map(|&(at, _)| Deadline::new(at, Reason::InputTick))
    }

    /// (On the room's home.) Tick `k` ended: its inputs to each receiver here, and to the
    /// room's other shards.
    fn flush_tick(&mut self, rk: RoomKey, k: u64, entries: Vec<Entry>, now: Instant) {
        let ts = self.wall_micros(now);
        let Some(room) = self.rooms.get(&rk) else {
            return;
        };
        for &peer in &room.peers {
            self.pipe_out.push(
                peer,
                PipeMsg::Tick {
                    room: room.name.clone(),
                    tick: k,
                    ts,
                    entries: entries.clone(),
                },
            );
        }
        self.deliver_tick(rk, k, ts, &entries, now);
    }

    /// Tick `k`'s batch to each participant here that any of `entries` is for.
    pub(super) fn deliver_tick(
        &mut self,
        rk: RoomKey,
        k: u64,
        ts: u64,
        entries: &[Entry],
        now: Instant,
    ) {
        let Some(room) = self.rooms.get(&rk) else {
            return;
        };
        let batches: Vec<(PartKey, Vec<Bytes>)> = room
            .members
            .iter()
            .filter_map(|m| {
                let p = room.parts.get(m)?;
                let mine: Vec<&Entry> = entries
                    .iter()
                    .filter(|e| e.audience.includes(&p.pid, &e.from, false))
                    .collect();
                (!mine.is_empty()).then(|| (*m, frame_ticks(k, ts, &mine)))
            })
            .collect();
        for (m, batch) in batches {
            for b in batch {
                self.deliver_data(&[m], Lane::Input.label(), false, &b, now, now);
            }
        }
    }

    /// A stamped message from the room's home, for participants here.
    #[allow(clippy::too_many_arguments)] // the fields of `PipeMsg::Data`
    pub(super) fn on_pipe_data(
        &mut self,
        room: &str,
        from: &str,
        channel: &'static str,
        is_text: bool,
        framed: Bytes,
        to: &Audience,
        origin: Instant,
    ) {
        let Some(&rk) = self.room_keys.get(room) else {
            return;
        };
        let Some(r) = self.rooms.get(&rk) else {
            return;
        };
        let targets = receivers(r, from, to);
        trace!(from = %from, n = targets.len(), "data from another shard");
        let now = self.now;
        self.deliver_data(&targets, channel, is_text, &framed, now, origin.min(now));
    }

    /// The channel `label` of `part` opened: what waited for it goes out, in order.
    pub(super) fn flush_waiting(&mut self, part: PartKey, label: &'static str, now: Instant) {
        let Some(lane) = Lane::of(label) else {
            return;
        };
        let Some(p) = part_mut!(self, part) else {
            return;
        };
        let waiting = p.waiting[lane as usize].take();
        if !waiting.is_empty() {
            debug!(participant = %p.pid, channel = label, n = waiting.len(), "delivering what waited for the channel");
        }
        for (is_text, msg) in waiting {
            self.deliver_data(&[part], label, is_text, &msg, now, now);
        }
    }

    /// Keep `msg` for `part`'s channel `label` until it opens.
    pub(super) fn wait_for_channel(
        &mut self,
        part: PartKey,
        label: &str,
        is_text: bool,
        msg: &Bytes,
    ) -> bool {
        let Some(lane) = Lane::of(label) else {
            return false;
        };
        let Some(p) = part_mut!(self, part) else {
            return false;
        };
        if p.viewer.is_some() || p.publish_only {
            return false;
        }
        let dropped = p.waiting[lane as usize].push(is_text, msg.clone());
        self.stats.data_queued_dropped += dropped as u64;
        true
    }
}

/// Where a participant of a room is.
enum Located {
    Here(PartKey),
    /// On that shard, in the room of that name.
    Shard(ShardId, String),
}

/// The participants of `room` here that a message from `from` to `to` reaches live.
fn receivers(room: &Room, from: &str, to: &Audience) -> Vec<PartKey> {
    room.members
        .iter()
        .copied()
        .filter(|m| {
            room.parts.get(m).is_some_and(|p| {
                p.pid != from
                    && p.viewer.is_none()
                    && !p.publish_only
                    && to.includes(&p.pid, from, p.timeline_events)
            })
        })
        .collect()
}
