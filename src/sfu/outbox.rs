//! Per-participant signaling events the WebSocket has not taken yet, coalesced so that what
//! *other* participants do costs a recipient only the size of the room's state, never the
//! number of things they did.
//!
//! Events go straight into the participant's bounded channel while it has room. Once it is
//! full they wait here, in order, and idempotent state events are coalesced:
//!
//! - `track_muted`, `layer_changed`, `publisher_layers`: the latest per track replaces a
//!   waiting one (the latest state wins); so does the latest `speakers` list;
//! - `track_unpublished` of a track whose `track_published` is still waiting: both vanish, with
//!   the track's waiting state events;
//! - `participant_left` of a participant whose `participant_joined` is still waiting: both
//!   vanish.
//!
//! So a participant toggling mute 5,000 times leaves at most one waiting `track_muted` per
//! recipient, and joining/leaving or publishing/unpublishing in a loop leaves nothing. What can
//! still fill the outbox is the recipient's own traffic (replies to its own messages) while it
//! does not read: past [`OUTBOX_MAX`] the participant is removed.

use crate::signal::ServerMessage;
use std::collections::VecDeque;
use tokio::sync::mpsc;

/// Most events waiting for one participant.
pub const OUTBOX_MAX: usize = 4096;

/// The participant is not reading its events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("more than {OUTBOX_MAX} signaling events are waiting")]
pub struct Overflow;

#[derive(Debug, Default)]
pub struct Outbox {
    queue: VecDeque<ServerMessage>,
}

/// The track a state event is about, and the kind of event (for coalescing).
fn state_key(m: &ServerMessage) -> Option<(&'static str, &str)> {
    match m {
        ServerMessage::TrackMuted { track_id, .. } => Some(("muted", track_id)),
        ServerMessage::LayerChanged { track_id, .. } => Some(("layer", track_id)),
        ServerMessage::PublisherLayers { track_id, .. } => Some(("publisher_layers", track_id)),
        ServerMessage::Speakers { .. } => Some(("speakers", "")),
        _ => None,
    }
}

impl Outbox {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Send `msg` to `tx`, or queue it behind what is already waiting (coalesced).
    /// `Err(Overflow)`: too much is waiting; the participant should be removed.
    pub fn send(
        &mut self,
        tx: &mpsc::Sender<ServerMessage>,
        msg: ServerMessage,
    ) -> Result<(), Overflow> {
        if self.queue.is_empty() {
            match tx.try_send(msg) {
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
                Err(mpsc::error::TrySendError::Full(msg)) => return self.push(msg),
            }
        }
        self.push(msg)
    }

    /// Queue `msg`, coalescing it with what waits.
    pub fn push(&mut self, msg: ServerMessage) -> Result<(), Overflow> {
        if let Some((kind, track)) = state_key(&msg) {
            if let Some(i) = self
                .queue
                .iter()
                .position(|m| state_key(m) == Some((kind, track)))
            {
                self.queue.remove(i);
            }
        }
        match &msg {
            ServerMessage::TrackUnpublished { track_id, .. } => {
                let published = self.queue.iter().position(
                    |m| matches!(m, ServerMessage::TrackPublished { track } if track.id == *track_id),
                );
                if let Some(i) = published {
                    self.queue.remove(i);
                    self.queue
                        .retain(|m| state_key(m).is_none_or(|(_, t)| t != track_id));
                    return Ok(());
                }
            }
            ServerMessage::ParticipantLeft { participant_id, .. } => {
                let joined = self.queue.iter().position(|m| {
                    matches!(m, ServerMessage::ParticipantJoined { participant } if participant.id == *participant_id)
                });
                if let Some(i) = joined {
                    self.queue.remove(i);
                    return Ok(());
                }
            }
            _ => {}
        }
        if self.queue.len() >= OUTBOX_MAX {
            return Err(Overflow);
        }
        self.queue.push_back(msg);
        Ok(())
    }

    /// Move waiting events into `tx` while it has room. True when nothing waits any more.
    pub fn flush(&mut self, tx: &mpsc::Sender<ServerMessage>) -> bool {
        while let Some(msg) = self.queue.pop_front() {
            match tx.try_send(msg) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(msg)) => {
                    self.queue.push_front(msg);
                    return false;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.queue.clear();
                    return true;
                }
            }
        }
        true
    }
}

#[cfg(test)]
// Tests pick an arbitrary origin for their virtual time (and may share test state).
#[allow(clippy::disallowed_methods, clippy::disallowed_types)]
mod tests {
    use super::*;
    use crate::signal::{ParticipantInfo, TrackInfo, TrackKind};

    fn muted(track: &str, muted: bool) -> ServerMessage {
        ServerMessage::TrackMuted {
            track_id: track.into(),
            participant_id: "PA_x".into(),
            muted,
            by_admin: false,
        }
    }

    fn published(track: &str) -> ServerMessage {
        ServerMessage::TrackPublished {
            track: TrackInfo {
                id: track.into(),
                participant_id: "PA_x".into(),
                kind: TrackKind::Video,
                mime_type: "video/VP8".into(),
                client_track_id: "v".into(),
                muted: false,
                layers: vec![],
            },
        }
    }

    fn drain(rx: &mut mpsc::Receiver<ServerMessage>) -> Vec<ServerMessage> {
        let mut v = Vec::new();
        while let Ok(m) = rx.try_recv() {
            v.push(m);
        }
        v
    }

    #[test]
    fn a_mute_flood_leaves_one_waiting_event_with_the_latest_state() {
        let (tx, mut rx) = mpsc::channel(4);
        let mut o = Outbox::new();
        for i in 0..5000 {
            o.send(&tx, muted("TR_a", i % 2 == 1)).unwrap();
            o.send(&tx, muted("TR_b", i % 2 == 0)).unwrap();
        }
        assert_eq!(o.len(), 2);
        assert_eq!(drain(&mut rx).len(), 4);
        assert!(o.flush(&tx));
        let rest = drain(&mut rx);
        assert_eq!(rest, vec![muted("TR_a", true), muted("TR_b", false)]);
    }

    #[test]
    fn order_is_kept_and_nothing_is_lost_while_the_channel_has_room() {
        let (tx, mut rx) = mpsc::channel(2);
        let mut o = Outbox::new();
        let pong = |ts| ServerMessage::pong(Some(ts), std::time::SystemTime::UNIX_EPOCH);
        for i in 0..10 {
            o.send(&tx, pong(f64::from(i))).unwrap();
        }
        let mut got = drain(&mut rx);
        while !o.flush(&tx) {
            got.extend(drain(&mut rx));
        }
        got.extend(drain(&mut rx));
        assert_eq!(got, (0..10).map(|i| pong(f64::from(i))).collect::<Vec<_>>());
    }

    #[test]
    fn publish_then_unpublish_while_waiting_leaves_nothing() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut o = Outbox::new();
        o.send(
            &tx,
            ServerMessage::pong(None, std::time::SystemTime::UNIX_EPOCH),
        )
        .unwrap();
        for i in 0..1000 {
            let t = format!("TR_{i}");
            o.send(&tx, published(&t)).unwrap();
            o.send(&tx, muted(&t, true)).unwrap();
            o.send(
                &tx,
                ServerMessage::TrackUnpublished {
                    track_id: t,
                    participant_id: "PA_x".into(),
                },
            )
            .unwrap();
        }
        assert!(o.is_empty());
        assert_eq!(drain(&mut rx).len(), 1);
    }

    #[test]
    fn join_then_leave_while_waiting_leaves_nothing() {
        let (tx, _rx) = mpsc::channel(1);
        let mut o = Outbox::new();
        o.send(
            &tx,
            ServerMessage::pong(None, std::time::SystemTime::UNIX_EPOCH),
        )
        .unwrap();
        for i in 0..1000 {
            let id = format!("PA_{i}");
            o.send(
                &tx,
                ServerMessage::ParticipantJoined {
                    participant: ParticipantInfo {
                        id: id.clone(),
                        name: "n".into(),
                        tracks: vec![],
                    },
                },
            )
            .unwrap();
            o.send(
                &tx,
                ServerMessage::ParticipantLeft {
                    participant_id: id,
                    reason: Default::default(),
                },
            )
            .unwrap();
        }
        assert!(o.is_empty());
    }

    #[test]
    fn a_participant_that_does_not_read_overflows_on_its_own_traffic() {
        let (tx, _rx) = mpsc::channel(1);
        let mut o = Outbox::new();
        let mut res = Ok(());
        for _ in 0..=OUTBOX_MAX + 1 {
            res = o.send(
                &tx,
                ServerMessage::pong(None, std::time::SystemTime::UNIX_EPOCH),
            );
            if res.is_err() {
                break;
            }
        }
        assert_eq!(res, Err(Overflow));
    }
}
