//! The room timeline: one order and one clock for everything a room relays on its data
//! channels (signaling/README.md, "Room timeline").
//!
//! Pure values, no I/O and no clock of their own (time is passed in):
//!
//! - [`Sequencer`]: the room's counters, one per [`Lane`], and the stamp `(seq, ts)` it gives
//!   each message: `seq` grows by exactly one per message of a lane, `ts` never decreases.
//! - [`Dedup`]: a sender's retries, recognised by its own sequence number (`sseq`), with the
//!   stamps of its last few messages to acknowledge a retry with.
//! - [`History`]: the ring of recent `chat` messages (count, age and byte bounds) and the
//!   replay of what followed a given `seq`.
//! - [`Ticker`]: an input tick's messages, batched per receiver at the end of the tick.
//! - The wire: [`frame`] builds the server → client header, [`frame_ack`] an acknowledgement,
//!   [`frame_tick`] a tick batch.
//!
//! A room that spans several cores has one sequencer, on its home shard (see `super::pipe`);
//! the other shards send it what their participants send and deliver what it stamped.

use bytes::Bytes;
use std::collections::VecDeque;
use std::fmt::Write as _;

use std::time::{Duration, Instant};

/// A room's two data lanes: one counter each.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Lane {
    /// The reliable, ordered `chat` channel, and the room's events.
    Chat = 0,
    /// The lossy, unordered `input` channel.
    Input = 1,
}

impl Lane {
    /// The lane of a channel label.
    pub fn of(label: &str) -> Option<Lane> {
        match label {
            super::data::CHAT_LABEL => Some(Lane::Chat),
            super::data::INPUT_LABEL => Some(Lane::Input),
            _ => None,
        }
    }

    /// The channel label of the lane.
    pub fn label(self) -> &'static str {
        match self {
            Lane::Chat => super::data::CHAT_LABEL,
            Lane::Input => super::data::INPUT_LABEL,
        }
    }
}

/// A message's place on the timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Stamp {
    /// Position on its lane: 1, 2, 3, … with no gaps.
    pub seq: u64,
    /// The server's clock when it was stamped: µs since the Unix epoch.
    pub ts: u64,
}

/// A room's counters.
#[derive(Debug, Clone, Default)]
pub struct Sequencer {
    last: [u64; 2],
    last_ts: u64,
}

impl Sequencer {
    /// Stamp the next message of `lane` at `now_us` (µs since the Unix epoch; an earlier
    /// reading than the last one counts as the last one, so `ts` never goes back).
    pub fn stamp(&mut self, lane: Lane, now_us: u64) -> Stamp {
        let seq = &mut self.last[lane as usize];
        *seq += 1;
        self.last_ts = self.last_ts.max(now_us);
        Stamp {
            seq: *seq,
            ts: self.last_ts,
        }
    }

    /// The last `seq` given on `lane` (0: none yet).
    pub fn last(&self, lane: Lane) -> u64 {
        self.last[lane as usize]
    }
}

/// How far below the highest `sseq` taken a message still counts as possibly new.
pub const DEDUP_WINDOW: u64 = 1024;
/// How many of a sender's last stamps are remembered, to acknowledge a retry with.
pub const ACK_MEMORY: usize = 64;

/// What [`Dedup::check`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Not taken before: sequence it, then [`Dedup::record`] it.
    New,
    /// A retry; the stamp it got the first time, when still remembered.
    Duplicate(Option<Stamp>),
}

/// One sender's `sseq`s on one lane: the highest taken and which of the
/// [`DEDUP_WINDOW`] below it were taken (a sliding bitmap, as SRTP's replay window).
#[derive(Debug, Clone, Default)]
pub struct Dedup {
    highest: Option<u64>,
    /// Bit `i` of the window: `highest - i` was taken.
    bits: [u64; (DEDUP_WINDOW / 64) as usize],
    recent: VecDeque<(u64, Stamp)>,
}

impl Dedup {
    /// Whether `sseq` is new.
    pub fn check(&self, sseq: u64) -> Seen {
        let Some(h) = self.highest else {
            return Seen::New;
        };
        if sseq > h {
            return Seen::New;
        }
        let back = h - sseq;
        if back >= DEDUP_WINDOW || self.bit(back) {
            let stamp = self
                .recent
                .iter()
                .find(|(s, _)| *s == sseq)
                .map(|(_, st)| *st);
            return Seen::Duplicate(stamp);
        }
        Seen::New
    }

    /// `sseq` was sequenced as `stamp`.
    pub fn record(&mut self, sseq: u64, stamp: Stamp) {
        match self.highest {
            Some(h) if sseq <= h => {
                let back = h - sseq;
                if back < DEDUP_WINDOW {
                    self.set(back);
                }
            }
            Some(h) => {
                self.shift(sseq - h);
                self.highest = Some(sseq);
                self.set(0);
            }
            None => {
                self.highest = Some(sseq);
                self.set(0);
            }
        }
        if self.recent.len() == ACK_MEMORY {
            self.recent.pop_front();
        }
        self.recent.push_back((sseq, stamp));
    }

    fn bit(&self, back: u64) -> bool {
        self.bits[(back / 64) as usize] & (1 << (back % 64)) != 0
    }

    fn set(&mut self, back: u64) {
        self.bits[(back / 64) as usize] |= 1 << (back % 64);
    }

    /// Move the window up by `by`: bit `i` becomes bit `i + by`.
    fn shift(&mut self, by: u64) {
        if by >= DEDUP_WINDOW {
            self.bits = Default::default();
            return;
        }
        let words = (by / 64) as usize;
        let bits = (by % 64) as u32;
        let n = self.bits.len();
        for i in (0..n).rev() {
            let src = i.checked_sub(words);
            let hi = src.map_or(0, |s| self.bits[s] << bits);
            let lo = match src.and_then(|s| s.checked_sub(1)) {
                Some(s) if bits > 0 => self.bits[s] >> (64 - bits),
                _ => 0,
            };
            self.bits[i] = hi | lo;
        }
    }
}

/// Who a message goes to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Audience {
    /// Everyone in the room (but the sender, live; the sender too, in history and ticks).
    All,
    /// These participants (and the sender, in history and ticks).
    Only(Vec<String>),
    /// Participants that asked for room events.
    Events,
}

impl Audience {
    /// Whether participant `pid` (that asked for room events: `events`) is in it; the
    /// sender `from` always is.
    pub fn includes(&self, pid: &str, from: &str, events: bool) -> bool {
        match self {
            Audience::All => true,
            Audience::Only(to) => pid == from || to.iter().any(|t| t == pid),
            Audience::Events => events,
        }
    }
}

/// One stamped message, as kept in history and ticks.
#[derive(Debug, Clone)]
pub struct Entry {
    pub stamp: Stamp,
    pub from: String,
    pub sseq: Option<u64>,
    /// A room event's name.
    pub event: Option<&'static str>,
    pub is_text: bool,
    pub audience: Audience,
    pub payload: Bytes,
}

impl Entry {
    /// The message as a receiver gets it (`replay`: marked as replayed from history).
    pub fn framed(&self, replay: bool) -> Bytes {
        frame(
            &Header {
                from: &self.from,
                stamp: self.stamp,
                sseq: self.sseq,
                event: self.event,
                replay,
                text: false,
                tick: None,
            },
            &self.payload,
        )
    }
}

/// Bounds of a room's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Most messages kept (0: no history).
    pub messages: usize,
    /// Oldest message kept.
    pub max_age: Duration,
    /// Most payload bytes kept in all.
    pub bytes: usize,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        HistoryLimits {
            messages: 1024,
            max_age: Duration::from_secs(600),
            bytes: 4 << 20,
        }
    }
}

/// The recent `chat` timeline of a room.
#[derive(Debug, Clone)]
pub struct History {
    limits: HistoryLimits,
    entries: VecDeque<(Instant, Entry)>,
    bytes: usize,
}

/// What a replay from `since` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayInfo {
    /// The oldest `seq` kept (0: none).
    pub oldest: u64,
    /// Whether everything after `since` is still kept.
    pub complete: bool,
}

impl History {
    pub fn new(limits: HistoryLimits) -> Self {
        History {
            limits,
            entries: VecDeque::new(),
            bytes: 0,
        }
    }

    /// Keep `entry` (taken at `now`), forgetting what falls out of the bounds.
    pub fn push(&mut self, now: Instant, entry: Entry) {
        if self.limits.messages == 0 || entry.payload.len() > self.limits.bytes {
            // Not kept, and nothing before it can be replayed in order past it.
            self.entries.clear();
            self.bytes = 0;
            return;
        }
        self.bytes += entry.payload.len();
        self.entries.push_back((now, entry));
        while self.entries.len() > self.limits.messages || self.bytes > self.limits.bytes {
            self.pop();
        }
        self.expire(now);
    }

    /// Forget what is older than the age bound.
    pub fn expire(&mut self, now: Instant) {
        while self
            .entries
            .front()
            .is_some_and(|(at, _)| now.saturating_duration_since(*at) > self.limits.max_age)
        {
            self.pop();
        }
    }

    fn pop(&mut self) {
        if let Some((_, e)) = self.entries.pop_front() {
            self.bytes -= e.payload.len();
        }
    }

    /// The oldest `seq` kept (0: none).
    pub fn oldest(&self) -> u64 {
        self.entries.front().map_or(0, |(_, e)| e.stamp.seq)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The kept entries after `since` for which `visible` holds, in `seq` order, and whether
    /// anything after `since` was forgotten. `latest` is the lane's last `seq`.
    pub fn replay(
        &self,
        since: u64,
        latest: u64,
        mut visible: impl FnMut(&Entry) -> bool,
    ) -> (ReplayInfo, Vec<&Entry>) {
        let oldest = self.oldest();
        // Forgotten: something after `since` exists (latest > since) but the ring starts
        // later than since + 1.
        let complete = latest <= since || (oldest != 0 && oldest <= since + 1);
        let start = self.entries.partition_point(|(_, e)| e.stamp.seq <= since);
        let found = self
            .entries
            .range(start..)
            .map(|(_, e)| e)
            .filter(|e| visible(e))
            .collect();
        (ReplayInfo { oldest, complete }, found)
    }
}

/// Highest input tick rate.
pub const MAX_TICK_HZ: u32 = 240;

/// A room's input ticks: tick `k` covers `[k/hz, (k+1)/hz)` after `start`.
#[derive(Debug, Clone)]
pub struct Ticker {
    hz: u32,
    start: Instant,
    /// The tick the pending entries belong to.
    current: u64,
    pending: Vec<Entry>,
}

impl Ticker {
    /// Ticks of `hz` (1..=[`MAX_TICK_HZ`]) from `start`.
    pub fn new(hz: u32, start: Instant) -> Self {
        Ticker {
            hz: hz.clamp(1, MAX_TICK_HZ),
            start,
            current: 0,
            pending: Vec::new(),
        }
    }

    pub fn hz(&self) -> u32 {
        self.hz
    }

    /// The tick `now` falls in.
    pub fn tick_at(&self, now: Instant) -> u64 {
        let d = now.saturating_duration_since(self.start);
        (d.as_nanos() * u128::from(self.hz) / 1_000_000_000) as u64
    }

    /// When tick `k` starts.
    pub fn start_of(&self, k: u64) -> Instant {
        let nanos = u128::from(k) * 1_000_000_000 / u128::from(self.hz);
        self.start + Duration::from_nanos(nanos.min(u128::from(u64::MAX)) as u64)
    }

    /// Add an input taken at `now`; the tick it goes into. (A tick whose end passed without
    /// [`Ticker::take`] is closed first by the caller: `take` before `push`.)
    pub fn push(&mut self, now: Instant, entry: Entry) -> u64 {
        if self.pending.is_empty() {
            self.current = self.tick_at(now);
        }
        self.pending.push(entry);
        self.current
    }

    /// When the pending tick ends (none: nothing pending).
    pub fn deadline(&self) -> Option<Instant> {
        (!self.pending.is_empty()).then(|| self.start_of(self.current + 1))
    }

    /// The pending tick's number and entries, if it has ended by `now`.
    pub fn take(&mut self, now: Instant) -> Option<(u64, Vec<Entry>)> {
        match self.deadline() {
            Some(end) if end <= now => Some((self.current, std::mem::take(&mut self.pending))),
            _ => None,
        }
    }
}

/// Most messages waiting for one channel of a participant to open.
pub const WAITING_MAX: usize = 256;
/// Most bytes waiting for one channel of a participant to open.
pub const WAITING_BYTES: usize = 1 << 20;

/// Messages for a channel that is not open yet, delivered in order when it opens. Past
/// [`WAITING_MAX`] messages or [`WAITING_BYTES`] the oldest are dropped.
#[derive(Debug, Clone, Default)]
pub struct Waiting {
    queue: VecDeque<(bool, Bytes)>,
    bytes: usize,
}

impl Waiting {
    /// Queue a message (`is_text`); how many older ones were dropped to make room.
    pub fn push(&mut self, is_text: bool, msg: Bytes) -> usize {
        self.bytes += msg.len();
        self.queue.push_back((is_text, msg));
        let mut dropped = 0;
        while self.queue.len() > 1 && (self.queue.len() > WAITING_MAX || self.bytes > WAITING_BYTES)
        {
            if let Some((_, m)) = self.queue.pop_front() {
                self.bytes -= m.len();
                dropped += 1;
            }
        }
        dropped
    }

    /// Everything waiting, in order.
    pub fn take(&mut self) -> VecDeque<(bool, Bytes)> {
        self.bytes = 0;
        std::mem::take(&mut self.queue)
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

/// The fields of a server → client header.
#[derive(Debug, Clone, Copy)]
pub struct Header<'a> {
    pub from: &'a str,
    pub stamp: Stamp,
    pub sseq: Option<u64>,
    pub event: Option<&'a str>,
    pub replay: bool,
    /// (Tick entries) the sender sent text.
    pub text: bool,
    /// (Tick batches) the tick number; `stamp.seq` is then not written.
    pub tick: Option<(u64, usize)>,
}

/// Write `s` as a JSON string.
fn push_str(out: &mut String, s: &str) {
    if s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into()));
    }
}

fn header_line(h: &Header) -> String {
    let mut out = String::with_capacity(96);
    out.push_str("{\"from\":");
    push_str(&mut out, h.from);
    match h.tick {
        Some((tick, count)) => {
            let _ = write!(
                out,
                ",\"tick\":{tick},\"ts\":{},\"count\":{count}",
                h.stamp.ts
            );
        }
        None => {
            let _ = write!(out, ",\"seq\":{},\"ts\":{}", h.stamp.seq, h.stamp.ts);
        }
    }
    if let Some(s) = h.sseq {
        let _ = write!(out, ",\"sseq\":{s}");
    }
    if let Some(e) = h.event {
        out.push_str(",\"event\":");
        push_str(&mut out, e);
    }
    if h.replay {
        out.push_str(",\"replay\":true");
    }
    if h.text {
        out.push_str(",\"text\":true");
    }
    out.push_str("}\n");
    out
}

/// A relayed message: the header line, then the payload byte for byte. Valid UTF-8 when
/// the payload is.
pub fn frame(h: &Header, payload: &[u8]) -> Bytes {
    let line = header_line(h);
    let mut buf = Vec::with_capacity(line.len() + payload.len());
    buf.extend_from_slice(line.as_bytes());
    buf.extend_from_slice(payload);
    Bytes::from(buf)
}

/// An acknowledgement of the sender's `sseq` (`stamp`: what it got; `dup`: it was a retry;
/// `tick`: the input tick it went into).
pub fn frame_ack(sseq: u64, stamp: Option<Stamp>, dup: bool, tick: Option<u64>) -> Bytes {
    let mut out = format!("{{\"ack\":{sseq}");
    if let Some(s) = stamp {
        let _ = write!(out, ",\"seq\":{},\"ts\":{}", s.seq, s.ts);
    }
    if let Some(t) = tick {
        let _ = write!(out, ",\"tick\":{t}");
    }
    if dup {
        out.push_str(",\"dup\":true");
    }
    out.push_str("}\n");
    Bytes::from(out)
}

/// Most bytes of entries in one tick batch message: a tick with more for one receiver is sent
/// as several batches with the same tick number (each under the SCTP message size the server
/// announces, 65536).
pub const TICK_BATCH_BYTES: usize = 60 * 1024;

/// A tick's batches for one receiver: `entries` in order, split so that each batch's entries
/// stay under [`TICK_BATCH_BYTES`] (a batch has at least one entry).
pub fn frame_ticks(tick: u64, ts: u64, entries: &[&Entry]) -> Vec<Bytes> {
    // An entry's header is at most this long (from, seq, ts, sseq, text) and its length 4.
    const ENTRY_OVERHEAD: usize = 160;
    let mut out = Vec::new();
    let mut start = 0;
    let mut size = 0;
    for (i, e) in entries.iter().enumerate() {
        let n = e.payload.len() + ENTRY_OVERHEAD;
        if i > start && size + n > TICK_BATCH_BYTES {
            out.push(frame_tick(tick, ts, entries[start..i].iter().copied()));
            start = i;
            size = 0;
        }
        size += n;
    }
    if start < entries.len() {
        out.push(frame_tick(tick, ts, entries[start..].iter().copied()));
    }
    out
}

/// A tick batch for one receiver: `{"from":"server","tick":K,"ts":T,"count":C}` `\n`, then
/// each entry as a 4-byte big-endian length and the entry framed as it would be relayed
/// (with `"text":true` for a text message).
pub fn frame_tick<'a>(
    tick: u64,
    ts: u64,
    entries: impl ExactSizeIterator<Item = &'a Entry>,
) -> Bytes {
    let line = header_line(&Header {
        from: super::data::SERVER_SENDER,
        stamp: Stamp { seq: 0, ts },
        sseq: None,
        event: None,
        replay: false,
        text: false,
        tick: Some((tick, entries.len())),
    });
    let mut buf = Vec::with_capacity(line.len() + 64 * entries.len());
    buf.extend_from_slice(line.as_bytes());
    for e in entries {
        let head = header_line(&Header {
            from: &e.from,
            stamp: e.stamp,
            sseq: e.sseq,
            event: None,
            replay: false,
            text: e.is_text,
            tick: None,
        });
        let len = (head.len() + e.payload.len()) as u32;
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(head.as_bytes());
        buf.extend_from_slice(&e.payload);
    }
    Bytes::from(buf)
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // tests start their virtual clocks anywhere
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(seq: u64, from: &str, audience: Audience, payload: &[u8]) -> Entry {
        Entry {
            stamp: Stamp { seq, ts: seq * 10 },
            from: from.into(),
            sseq: None,
            event: None,
            is_text: true,
            audience,
            payload: Bytes::copy_from_slice(payload),
        }
    }

    #[test]
    fn the_header_is_json_and_the_payload_follows_byte_for_byte() {
        let h = Header {
            from: "PA_a",
            stamp: Stamp { seq: 7, ts: 99 },
            sseq: Some(3),
            event: None,
            replay: true,
            text: false,
            tick: None,
        };
        let b = frame(&h, b"hi\nthere");
        assert_eq!(
            &b[..],
            b"{\"from\":\"PA_a\",\"seq\":7,\"ts\":99,\"sseq\":3,\"replay\":true}\nhi\nthere"
        );
        let odd = frame(&Header { from: "a\"b", ..h }, b"");
        let line = std::str::from_utf8(&odd[..odd.len() - 1]).unwrap();
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["from"], "a\"b");
        assert_eq!(
            &frame_ack(5, Some(Stamp { seq: 2, ts: 3 }), true, Some(9))[..],
            b"{\"ack\":5,\"seq\":2,\"ts\":3,\"tick\":9,\"dup\":true}\n"
        );
    }

    #[test]
    fn a_tick_batch_holds_length_prefixed_entries() {
        let a = entry(1, "PA_a", Audience::All, b"x");
        let mut b = entry(2, "PA_b", Audience::All, &[0, 10, 255]);
        b.is_text = false;
        let batch = frame_tick(4, 1000, [&a, &b].into_iter());
        let nl = batch.iter().position(|&c| c == b'\n').unwrap();
        let head: serde_json::Value = serde_json::from_slice(&batch[..nl]).unwrap();
        assert_eq!(head["tick"], 4);
        assert_eq!(head["count"], 2);
        assert_eq!(head["from"], "server");
        let mut rest = &batch[nl + 1..];
        let mut got = Vec::new();
        while !rest.is_empty() {
            let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            got.push(rest[4..4 + len].to_vec());
            rest = &rest[4 + len..];
        }
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[0],
            b"{\"from\":\"PA_a\",\"seq\":1,\"ts\":10,\"text\":true}\nx".to_vec()
        );
        assert!(got[1].ends_with(&[b'\n', 0, 10, 255]));
    }

    #[test]
    fn a_big_tick_is_split_under_the_message_size() {
        let big: Vec<Entry> = (1..=5)
            .map(|s| entry(s, "PA_a", Audience::All, &vec![7; 20_000]))
            .collect();
        let refs: Vec<&Entry> = big.iter().collect();
        let batches = frame_ticks(3, 9, &refs);
        assert_eq!(batches.len(), 2);
        let mut seqs = Vec::new();
        for b in &batches {
            assert!(b.len() < 65_536, "{}", b.len());
            let d = crate::sim::DataIn::from_bytes(Instant::now(), b.clone());
            assert_eq!(d.tick, Some(3));
            seqs.extend(d.tick_entries().iter().map(|e| e.seq.unwrap()));
        }
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
        assert_eq!(frame_ticks(3, 9, &refs[..1]).len(), 1);
        assert!(frame_ticks(3, 9, &[]).is_empty());
    }

    #[test]
    fn ticks_close_at_their_end() {
        let t0 = Instant::now();
        let mut t = Ticker::new(20, t0);
        assert_eq!(t.deadline(), None);
        let k = t.push(
            t0 + Duration::from_millis(120),
            entry(1, "PA_a", Audience::All, b""),
        );
        assert_eq!(k, 2);
        assert_eq!(t.deadline(), Some(t0 + Duration::from_millis(150)));
        assert!(t.take(t0 + Duration::from_millis(149)).is_none());
        let (k, e) = t.take(t0 + Duration::from_millis(150)).unwrap();
        assert_eq!((k, e.len()), (2, 1));
        assert_eq!(t.deadline(), None);
    }

    #[test]
    fn replay_reports_what_fell_out() {
        let t0 = Instant::now();
        let mut h = History::new(HistoryLimits {
            messages: 3,
            ..Default::default()
        });
        for s in 1..=5 {
            h.push(t0, entry(s, "PA_a", Audience::All, b"m"));
        }
        assert_eq!(h.oldest(), 3);
        let (info, got) = h.replay(0, 5, |_| true);
        assert!(!info.complete);
        assert_eq!(
            got.iter().map(|e| e.stamp.seq).collect::<Vec<_>>(),
            [3, 4, 5]
        );
        let (info, got) = h.replay(2, 5, |_| true);
        assert!(info.complete);
        assert_eq!(got.len(), 3);
        let (info, got) = h.replay(5, 5, |_| true);
        assert!(info.complete && got.is_empty());
        // Age.
        h.expire(t0 + Duration::from_secs(601));
        assert!(h.is_empty());
        let (info, _) = h.replay(4, 5, |_| true);
        assert!(!info.complete);
        assert!(h.replay(5, 5, |_| true).0.complete);
    }

    #[test]
    fn waiting_keeps_the_newest_in_order() {
        let mut w = Waiting::default();
        let mut dropped = 0;
        for i in 0..(WAITING_MAX + 10) {
            dropped += w.push(true, Bytes::from(i.to_string()));
        }
        assert_eq!(dropped, 10);
        assert_eq!(w.len(), WAITING_MAX);
        let q = w.take();
        assert_eq!(q.front().unwrap().1, Bytes::from("10"));
        assert!(w.is_empty());
        // Bytes: a big message pushes out what came before, but is kept itself.
        w.push(false, Bytes::from(vec![0; 10]));
        assert_eq!(w.push(false, Bytes::from(vec![0; WAITING_BYTES])), 1);
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn audience_rules() {
        let only = Audience::Only(vec!["PA_b".into()]);
        assert!(only.includes("PA_b", "PA_a", false));
        assert!(only.includes("PA_a", "PA_a", false));
        assert!(!only.includes("PA_c", "PA_a", true));
        assert!(Audience::Events.includes("PA_c", "server", true));
        assert!(!Audience::Events.includes("PA_c", "server", false));
    }

    proptest! {
        /// Every lane counts 1, 2, 3, … whatever the interleaving, and `ts` never goes back
        /// whatever the clock readings.
        #[test]
        fn the_sequencer_has_no_gaps_and_time_never_goes_back(
            ops in proptest::collection::vec((any::<bool>(), 0u64..1_000_000), 1..300)
        ) {
            let mut s = Sequencer::default();
            let mut next = [1u64, 1];
            let mut last_ts = 0;
            for (chat, now) in ops {
                let lane = if chat { Lane::Chat } else { Lane::Input };
                let st = s.stamp(lane, now);
                prop_assert_eq!(st.seq, next[lane as usize]);
                next[lane as usize] += 1;
                prop_assert!(st.ts >= last_ts);
                prop_assert!(st.ts >= now);
                last_ts = st.ts;
            }
        }

        /// The window says "duplicate" exactly for what was recorded (within the window)
        /// and for everything too far below the highest.
        #[test]
        fn dedup_matches_a_set(
            seqs in proptest::collection::vec(0u64..5000, 1..400)
        ) {
            let mut d = Dedup::default();
            let mut taken = std::collections::BTreeSet::new();
            let mut highest: Option<u64> = None;
            for (i, s) in seqs.into_iter().enumerate() {
                let expect_dup = taken.contains(&s)
                    || highest.is_some_and(|h| s + DEDUP_WINDOW <= h);
                let got = d.check(s);
                prop_assert_eq!(matches!(got, Seen::Duplicate(_)), expect_dup, "sseq {}", s);
                if let Seen::Duplicate(Some(st)) = got {
                    prop_assert!(taken.contains(&s));
                    prop_assert!(st.seq >= 1);
                }
                if !expect_dup {
                    d.record(s, Stamp { seq: i as u64 + 1, ts: 0 });
                    taken.insert(s);
                    highest = Some(highest.map_or(s, |h| h.max(s)));
                }
            }
        }

        /// Replay returns exactly the kept entries after `since` that are visible, in order,
        /// and calls it complete exactly when nothing after `since` was forgotten.
        #[test]
        fn replay_matches_a_model(
            n in 0u64..60,
            cap in 1usize..20,
            since in 0u64..70,
            directed in proptest::collection::vec(any::<bool>(), 60),
        ) {
            let t0 = Instant::now();
            let mut h = History::new(HistoryLimits { messages: cap, ..Default::default() });
            for s in 1..=n {
                let aud = if directed[(s - 1) as usize] {
                    Audience::Only(vec!["PA_x".into()])
                } else {
                    Audience::All
                };
                h.push(t0, entry(s, "PA_a", aud, b"p"));
            }
            let kept_from = if n as usize > cap { n - cap as u64 + 1 } else { 1 };
            let (info, got) = h.replay(since, n, |e| e.audience.includes("PA_y", &e.from, false));
            let expect: Vec<u64> = (kept_from.max(since + 1)..=n)
                .filter(|s| !directed[(*s - 1) as usize])
                .collect();
            prop_assert_eq!(got.iter().map(|e| e.stamp.seq).collect::<Vec<_>>(), expect);
            prop_assert_eq!(info.complete, since >= n || since + 1 >= kept_from);
            prop_assert!(h.len() <= cap);
        }
    }
}
