//! What a viewer plays (WHEP playback): which of the room's tracks goes to each of the media
//! sections the viewer offered. A pure decision, recomputed whenever the room's tracks change;
//! the core then moves each section's down-track to its new source (keeping the section's SSRC,
//! sequence numbers and timestamps continuous) or parks it until a source appears.

use crate::signal::TrackKind;

/// What a viewer asked to play.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ViewTarget {
    /// The room's host: the publisher of the earliest-published track still in the room.
    #[default]
    Host,
    /// One participant, by participant id or by identity.
    Participant(String),
    /// One track, by server track id.
    Track(String),
}

/// A track the viewer could play, in publication order.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub track_id: &'a str,
    pub kind: TrackKind,
    /// The publisher's participant id.
    pub publisher: &'a str,
    /// The publisher's identity, if known (a local participant with a token).
    pub identity: Option<&'a str>,
}

/// For each media section the viewer offered (its kind, in SDP order), the index in
/// `candidates` (publication order) of the track it plays, or `None`: nothing to play yet.
///
/// Sections take the chosen publisher's tracks of their kind in order: the first video
/// section its first video track, a second video section its second one, and so on. A
/// [`ViewTarget::Track`] fills the first section of its kind only.
pub fn assign(
    target: &ViewTarget,
    candidates: &[Candidate<'_>],
    sections: &[TrackKind],
) -> Vec<Option<usize>> {
    let eligible: Vec<usize> = match target {
        ViewTarget::Host => match candidates.first() {
            Some(first) => candidates
                .iter()
                .enumerate()
                .filter(|(_, c)| c.publisher == first.publisher)
                .map(|(i, _)| i)
                .collect(),
            None => Vec::new(),
        },
        ViewTarget::Participant(who) => candidates
            .iter()
            .enumerate()
            .filter(|(_, c)| c.publisher == who || c.identity == Some(who.as_str()))
            .map(|(i, _)| i)
            .collect(),
        ViewTarget::Track(tid) => candidates
            .iter()
            .position(|c| c.track_id == tid)
            .into_iter()
            .collect(),
    };
    let mut used = vec![false; eligible.len()];
    sections
        .iter()
        .map(|&kind| {
            let slot = eligible
                .iter()
                .zip(used.iter())
                .position(|(&i, &u)| !u && candidates[i].kind == kind)?;
            used[slot] = true;
            Some(eligible[slot])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use TrackKind::{Audio, Video};

    fn c<'a>(tid: &'a str, kind: TrackKind, publisher: &'a str) -> Candidate<'a> {
        Candidate {
            track_id: tid,
            kind,
            publisher,
            identity: None,
        }
    }

    #[test]
    fn the_host_is_the_earliest_publisher() {
        let cands = [
            c("a1", Audio, "A"),
            c("b1", Video, "B"),
            c("a2", Video, "A"),
            c("b2", Audio, "B"),
        ];
        assert_eq!(
            assign(&ViewTarget::Host, &cands, &[Audio, Video]),
            vec![Some(0), Some(2)]
        );
        // The host left: the next publisher takes over.
        assert_eq!(
            assign(&ViewTarget::Host, &cands[1..], &[Audio, Video]),
            vec![Some(2), Some(0)]
        );
    }

    #[test]
    fn an_empty_room_leaves_every_section_waiting() {
        assert_eq!(
            assign(&ViewTarget::Host, &[], &[Audio, Video]),
            vec![None, None]
        );
    }

    #[test]
    fn sections_take_distinct_tracks_in_order() {
        let cands = [c("v1", Video, "A"), c("v2", Video, "A"), c("x", Audio, "A")];
        assert_eq!(
            assign(&ViewTarget::Host, &cands, &[Video, Video, Video, Audio]),
            vec![Some(0), Some(1), None, Some(2)]
        );
    }

    #[test]
    fn a_named_participant_by_id_or_identity() {
        let mut cands = vec![c("a", Video, "PA_1"), c("b", Video, "PA_2")];
        cands[1].identity = Some("obs");
        let by_id = ViewTarget::Participant("PA_2".into());
        let by_identity = ViewTarget::Participant("obs".into());
        assert_eq!(assign(&by_id, &cands, &[Video]), vec![Some(1)]);
        assert_eq!(assign(&by_identity, &cands, &[Video]), vec![Some(1)]);
        assert_eq!(
            assign(&ViewTarget::Participant("nobody".into()), &cands, &[Video]),
            vec![None]
        );
    }

    #[test]
    fn a_named_track_fills_one_section_of_its_kind() {
        let cands = [c("a", Video, "A"), c("b", Video, "A"), c("s", Audio, "A")];
        let t = ViewTarget::Track("b".into());
        assert_eq!(
            assign(&t, &cands, &[Audio, Video, Video]),
            vec![None, Some(1), None]
        );
    }
}
