//! Deferred work, as one typed queue.
//!
//! Handling an input often finds work that must not be done on the spot: a keyframe request
//! goes through the layer's throttle once per turn, a participant cannot be removed while its
//! connection is being drained, several track changes should go out in one subscriber offer.
//! Such work is pushed here as an [`Effect`] and applied at the end of the turn
//! ([`super::Sfu::end_turn`]), in order, after the touched connections have been drained.

use std::collections::VecDeque;

pub use super::ids::{PartKey, RoomKey, TrackId};

/// One piece of deferred work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Ask the publisher of `track` (of `room`) for a keyframe of `layer` (through its
    /// throttle).
    RequestKeyframe {
        room: RoomKey,
        track: TrackId,
        layer: usize,
    },
    /// Re-run layer selection now (a subscriber's estimate fell sharply), not at the next
    /// periodic run.
    SelectLayers,
    /// Send a new offer on the participant's subscriber connection (once per turn however
    /// many changes asked for it).
    Renegotiate(PartKey),
    /// Remove the participant, telling it and its room why.
    Remove {
        part: PartKey,
        why: crate::signal::LeaveReason,
        reason: String,
    },
}

/// Effects waiting for the end of the turn.
#[derive(Debug, Default)]
pub struct Effects {
    queue: VecDeque<Effect>,
}

impl Effects {
    /// Queue an effect. Idempotent ones ([`Effect::SelectLayers`], [`Effect::Renegotiate`]) are
    /// queued once per turn.
    pub fn push(&mut self, e: Effect) {
        let once = matches!(e, Effect::SelectLayers | Effect::Renegotiate(_));
        if once && self.queue.contains(&e) {
            return;
        }
        self.queue.push_back(e);
    }

    pub fn pop(&mut self) -> Option<Effect> {
        self.queue.pop_front()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }
}

#[cfg(test)]
// Tests pick an arbitrary origin for their virtual time (and may share test state).
#[allow(clippy::disallowed_methods, clippy::disallowed_types)]
mod tests {
    use super::*;

    #[test]
    fn idempotent_effects_are_queued_once_others_in_order() {
        let mut q = Effects::default();
        q.push(Effect::Renegotiate(PartKey::new(RoomKey(0), 1)));
        q.push(Effect::RequestKeyframe {
            room: RoomKey(0),
            track: TrackId::from("TR_a"),
            layer: 0,
        });
        q.push(Effect::Renegotiate(PartKey::new(RoomKey(0), 1)));
        q.push(Effect::Renegotiate(PartKey::new(RoomKey(0), 2)));
        q.push(Effect::SelectLayers);
        q.push(Effect::SelectLayers);
        q.push(Effect::RequestKeyframe {
            room: RoomKey(0),
            track: TrackId::from("TR_a"),
            layer: 0,
        });
        assert_eq!(q.len(), 5);
        assert_eq!(
            q.pop(),
            Some(Effect::Renegotiate(PartKey::new(RoomKey(0), 1)))
        );
        assert!(matches!(q.pop(), Some(Effect::RequestKeyframe { .. })));
        assert_eq!(
            q.pop(),
            Some(Effect::Renegotiate(PartKey::new(RoomKey(0), 2)))
        );
        assert_eq!(q.pop(), Some(Effect::SelectLayers));
        assert!(matches!(q.pop(), Some(Effect::RequestKeyframe { .. })));
        assert!(q.is_empty());
        // Once applied, it can be queued again.
        q.push(Effect::Renegotiate(PartKey::new(RoomKey(0), 1)));
        assert_eq!(
            q.pop(),
            Some(Effect::Renegotiate(PartKey::new(RoomKey(0), 1)))
        );
    }
}
