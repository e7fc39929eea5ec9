//! Session resume: a participant whose WebSocket drops is kept for a grace period, and a new
//! connection that sends `resume` continues as the same participant.
//!
//! The core never learns that a connection dropped: the participant's peer connections keep
//! working (media flows on), and its signaling events keep arriving on the same event channel.
//! What a session owns across connections is a [`Handover`]: that channel and the [`Replay`]
//! of the messages it sent. Every message the server sends in a participant's session is
//! numbered (`joined` is 1); the client counts what it received and says so in `resume`, and
//! the messages after that are sent again — those lost in flight when the connection died, and
//! those that arrived while no connection was there.
//!
//! A dropped session *parks*: it keeps reading the event channel into its replay until a new
//! connection claims it ([`Registry::claim`]), the grace period ends (the participant is then
//! removed), or the core closes the channel. A `resume` that arrives while the old connection
//! still looks alive (its drop not noticed yet) takes the session over from it the same way.
//! A connection that closes cleanly (a close frame, `leave`) or that the server closes is not
//! resumable: the participant leaves at once.

// Not the packet path: the registry is shared by the WebSocket sessions; the grace period reads
// the clock.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use crate::signal::ServerMessage;
use axum::extract::ws::Utf8Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Default time a dropped session is kept for a `resume`.
pub const DEFAULT_RESUME_GRACE: Duration = Duration::from_secs(20);
/// Most messages a session keeps for replay.
pub const REPLAY_MESSAGES: usize = 256;
/// Most bytes a session keeps for replay.
pub const REPLAY_BYTES: usize = 256 * 1024;
/// How long a `resume` waits for the old connection to hand its session over.
pub const HANDOVER_TIMEOUT: Duration = Duration::from_secs(3);

/// The messages a session sent (or would have sent while parked), numbered from 1, the
/// newest [`REPLAY_MESSAGES`] / [`REPLAY_BYTES`] of them kept.
#[derive(Debug, Default)]
pub struct Replay {
    frames: VecDeque<Utf8Bytes>,
    bytes: usize,
    /// Number of the newest frame (0: none yet).
    last: u64,
    /// Numbers frames but keeps none (the server does not resume sessions).
    numbering_only: bool,
}

impl Replay {
    /// A replay that numbers frames but keeps none: for a server that does not resume
    /// sessions (`--resume-grace 0`), nothing is held per session.
    pub fn numbering_only() -> Self {
        Replay {
            numbering_only: true,
            ..Replay::default()
        }
    }

    /// Number the next frame and keep it; returns its number.
    pub fn push(&mut self, frame: Utf8Bytes) -> u64 {
        self.last += 1;
        if self.numbering_only {
            return self.last;
        }
        self.bytes += frame.len();
        self.frames.push_back(frame);
        while self.frames.len() > REPLAY_MESSAGES
            || (self.bytes > REPLAY_BYTES && self.frames.len() > 1)
        {
            if let Some(f) = self.frames.pop_front() {
                self.bytes -= f.len();
            }
        }
        self.last
    }

    /// Number `msg`, keep it, and return its frame.
    pub fn push_message(&mut self, msg: &ServerMessage) -> Utf8Bytes {
        let frame: Utf8Bytes = crate::signal::encode_server(msg).into();
        self.push(frame.clone());
        frame
    }

    /// Number of the newest frame.
    pub fn last(&self) -> u64 {
        self.last
    }

    /// The frames after the first `received`, or `None` when some of them are no longer kept
    /// (or `received` is more than was sent).
    pub fn since(&self, received: u64) -> Option<Vec<Utf8Bytes>> {
        if received > self.last {
            return None;
        }
        let first_kept = self.last + 1 - self.frames.len() as u64;
        if received + 1 < first_kept {
            return None;
        }
        let skip = usize::try_from(received + 1 - first_kept).ok()?;
        Some(self.frames.iter().skip(skip).cloned().collect())
    }
}

/// What a session hands to the connection that resumes it.
#[derive(Debug)]
pub struct Handover {
    pub events: mpsc::Receiver<ServerMessage>,
    pub replay: Replay,
    /// The participant's session id (`SE_…`): the resuming connection logs under it.
    pub session: String,
}

/// A request for a session's [`Handover`].
pub type Claim = oneshot::Sender<Handover>;

struct Slot {
    token: String,
    room: String,
    /// Which connection of the session holds it now.
    generation: u64,
    claims: mpsc::Sender<Claim>,
}

/// Why a `resume` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResumeError {
    #[error(
        "no session of participant {0} can be resumed (it left, was removed, or its grace period is over): join again"
    )]
    Unknown(String),
    #[error("wrong resume token for participant {0}")]
    BadToken(String),
    #[error("participant {0}'s session did not hand over in time: join again")]
    NoHandover(String),
    #[error("the messages after the {0} you received are no longer held: join again")]
    TooOld(u64),
}

/// The resumable sessions, by participant id.
#[derive(Clone, Default)]
pub struct Registry {
    slots: Arc<Mutex<HashMap<String, Slot>>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("sessions", &self.lock().len())
            .finish()
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new session of `participant` in `room`: its resume token, and where claims for it
    /// arrive. Generation 0.
    pub fn register(&self, participant: &str, room: &str) -> (String, mpsc::Receiver<Claim>) {
        use rand::distr::{Alphanumeric, SampleString};
        let token = Alphanumeric.sample_string(&mut rand::rng(), 32);
        let (claims, rx) = mpsc::channel(1);
        self.lock().insert(
            participant.to_owned(),
            Slot {
                token: token.clone(),
                room: room.to_owned(),
                generation: 0,
                claims,
            },
        );
        (token, rx)
    }

    /// Take `participant`'s session over (from its parked or still-connected holder): checks
    /// the token, asks the holder for the handover (at most [`HANDOVER_TIMEOUT`]). Returns it,
    /// the room, the new generation and where later claims arrive.
    pub async fn claim(
        &self,
        participant: &str,
        token: &str,
    ) -> Result<(Handover, String, u64, mpsc::Receiver<Claim>), ResumeError> {
        let (claims, room) = {
            let slots = self.lock();
            let slot = slots
                .get(participant)
                .ok_or_else(|| ResumeError::Unknown(participant.to_owned()))?;
            if !constant_time_eq(slot.token.as_bytes(), token.as_bytes()) {
                return Err(ResumeError::BadToken(participant.to_owned()));
            }
            (slot.claims.clone(), slot.room.clone())
        };
        let (tx, rx) = oneshot::channel();
        let no_handover = || ResumeError::NoHandover(participant.to_owned());
        claims.try_send(tx).map_err(|_| no_handover())?;
        let handover = tokio::time::timeout(HANDOVER_TIMEOUT, rx)
            .await
            .map_err(|_| no_handover())?
            .map_err(|_| no_handover())?;
        let (new_claims, claims_rx) = mpsc::channel(1);
        let mut slots = self.lock();
        let slot = slots
            .get_mut(participant)
            .ok_or_else(|| ResumeError::Unknown(participant.to_owned()))?;
        slot.generation += 1;
        slot.claims = new_claims;
        Ok((handover, room, slot.generation, claims_rx))
    }

    /// The session of `participant` held by connection `generation` ended for good: forget
    /// it (unless another connection holds it now).
    pub fn forget(&self, participant: &str, generation: u64) {
        let mut slots = self.lock();
        if slots
            .get(participant)
            .is_some_and(|s| s.generation == generation)
        {
            slots.remove(participant);
        }
    }

    /// Sessions held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// How a parked session ended.
pub enum ParkEnd {
    /// A new connection claimed it.
    Claimed(Claim),
    /// The grace period ended (or the replay was told to stop).
    Expired,
    /// The core closed the event channel (the participant was removed).
    Closed,
}

/// Park a dropped session: keep reading `events` into `replay` until a claim, the end of
/// `grace`, or the end of the channel.
pub async fn park(
    events: &mut mpsc::Receiver<ServerMessage>,
    replay: &mut Replay,
    claims: &mut mpsc::Receiver<Claim>,
    grace: Duration,
) -> ParkEnd {
    let deadline = tokio::time::sleep(grace);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            claim = claims.recv() => match claim {
                Some(c) => return ParkEnd::Claimed(c),
                None => return ParkEnd::Expired,
            },
            event = events.recv() => match event {
                Some(msg) => {
                    replay.push_message(&msg);
                }
                None => return ParkEnd::Closed,
            },
            () = &mut deadline => return ParkEnd::Expired,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(i: usize) -> Utf8Bytes {
        format!("m{i}").into()
    }

    #[test]
    fn replay_sends_what_came_after_what_was_received() {
        let mut r = Replay::default();
        assert_eq!(r.since(0), Some(vec![]));
        for i in 1..=5 {
            assert_eq!(r.push(frame(i)), i as u64);
        }
        assert_eq!(r.since(5), Some(vec![]));
        assert_eq!(r.since(3), Some(vec![frame(4), frame(5)]));
        assert_eq!(r.since(0).map(|v| v.len()), Some(5));
        assert_eq!(r.since(6), None, "more than was sent");
    }

    #[test]
    fn replay_is_bounded_and_says_when_it_lost_some() {
        let mut r = Replay::default();
        for i in 1..=REPLAY_MESSAGES + 10 {
            r.push(frame(i));
        }
        assert_eq!(r.frames.len(), REPLAY_MESSAGES);
        assert_eq!(r.since(9), None, "message 10 is gone");
        assert_eq!(r.since(10).map(|v| v.len()), Some(REPLAY_MESSAGES));
        let mut off = Replay::numbering_only();
        assert_eq!(off.push("a".into()), 1);
        assert_eq!(off.push("b".into()), 2);
        assert_eq!(off.since(1), None, "nothing kept");
        assert_eq!(off.since(2), Some(Vec::new()), "nothing missed");
        let mut big = Replay::default();
        for _ in 0..10 {
            big.push("x".repeat(REPLAY_BYTES / 4).into());
        }
        assert!(big.bytes <= REPLAY_BYTES, "{}", big.bytes);
        assert_eq!(big.last(), 10);
        // A single frame larger than the budget is still kept (it may be the one in flight).
        big.push("y".repeat(REPLAY_BYTES * 2).into());
        assert_eq!(big.since(10).map(|v| v.len()), Some(1));
    }

    #[tokio::test]
    async fn a_claim_takes_the_session_with_the_right_token_only() {
        let reg = Registry::default();
        let (token, mut claims) = reg.register("PA_1", "room");
        assert!(matches!(
            reg.claim("PA_2", &token).await,
            Err(ResumeError::Unknown(_))
        ));
        assert!(matches!(
            reg.claim("PA_1", "nope").await,
            Err(ResumeError::BadToken(_))
        ));
        // The holder answers the claim with its handover.
        let holder = tokio::spawn(async move {
            let claim = claims.recv().await.expect("a claim");
            let (_tx, events) = mpsc::channel(1);
            let mut replay = Replay::default();
            replay.push("joined".into());
            let _ = claim.send(Handover {
                events,
                replay,
                session: "SE_test".into(),
            });
        });
        let (handover, room, generation, _claims) = reg.claim("PA_1", &token).await.unwrap();
        holder.await.unwrap();
        assert_eq!((room.as_str(), generation), ("room", 1));
        assert_eq!(handover.replay.last(), 1);
        // The old holder's end does not forget the session the new one holds.
        reg.forget("PA_1", 0);
        assert_eq!(reg.len(), 1);
        reg.forget("PA_1", 1);
        assert!(reg.is_empty());
    }

    #[tokio::test]
    async fn a_parked_session_keeps_events_until_claimed_or_expired() {
        let (tx, mut events) = mpsc::channel(8);
        let mut replay = Replay::default();
        let (_claims_tx, mut claims) = mpsc::channel::<Claim>(1);
        tx.send(ServerMessage::pong(None, std::time::SystemTime::UNIX_EPOCH))
            .await
            .unwrap();
        let end = park(
            &mut events,
            &mut replay,
            &mut claims,
            Duration::from_millis(50),
        )
        .await;
        assert!(matches!(end, ParkEnd::Expired));
        assert_eq!(replay.last(), 1, "the event that came while parked is kept");
        drop(tx);
        let end = park(
            &mut events,
            &mut replay,
            &mut claims,
            Duration::from_secs(20),
        )
        .await;
        assert!(matches!(end, ParkEnd::Closed));
    }
}
