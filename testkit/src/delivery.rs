//! Media delivery over a measured window: what each publisher wrote against what each
//! subscriber of that track received.
//!
//! Gap-based loss (sequence numbers missing among the packets received) cannot see a stream
//! that stops: no packet arrives, so no gap opens. Delivery counts from the other end: the
//! synthetic publisher knows how many packets it wrote, so every subscriber of the track is
//! expected to receive that many, and a stream that stops shows up as missing packets.
//!
//! The window, so that an honest run reads ~100 %:
//! - **start** ([`Window::start`]): after every peer joined and received its first packet of
//!   every track (the load tester waits for that), so no subscription is still being set up.
//!   Both counters are snapshotted at once. Packets in flight at that moment are received
//!   inside the window although they were written before it; that excess (a few packets at
//!   most) is why a flow's delivery is capped at 100 %.
//! - **end** ([`Window::end`]): the publishers' measured tracks are paused, so nothing more is
//!   written; then [`Window::drain`] waits (event-driven, bounded) until every subscriber
//!   received what was written, so packets in flight at the end are not counted as missing.
//!
//! Measured flows: every (subscriber, published track) pair, the subscriber being every other
//! peer (everyone subscribes to everything). Simulcast video is reported without a delivery
//! figure: the subscriber receives one of several layers, whose packet counts differ.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use plaza::signal::TrackKind;
use serde::Serialize;

use super::peer::{LocalTrackStats, Peer};

/// One (subscriber, published track) pair over the window.
#[derive(Debug, Clone, Serialize)]
pub struct Flow {
    pub subscriber: String,
    pub subscriber_id: String,
    pub publisher: String,
    pub publisher_id: String,
    /// The server's id of the track (what the subscriber receives it as).
    pub track_id: String,
    pub kind: TrackKind,
    /// Packets the publisher wrote in the window.
    pub expected: u64,
    /// Packets the subscriber received in the window (including the few in flight at its
    /// start; see the module docs).
    pub received: u64,
    /// `min(received, expected) / expected`, in percent; `None` when not measurable
    /// (simulcast video) or nothing was written.
    pub delivery_percent: Option<f64>,
    /// Held to the delivery threshold (the caller decides, e.g. not behind a bandwidth limit).
    pub checked: bool,
    #[serde(skip)]
    sent_at_start: u64,
    #[serde(skip)]
    received_at_start: u64,
    #[serde(skip)]
    publisher_index: usize,
    #[serde(skip)]
    subscriber_index: usize,
    #[serde(skip)]
    client_track_id: String,
}

/// Delivery in percent of `expected`, received capped at expected; `None` when nothing was
/// expected.
pub fn delivery_percent(expected: u64, received: u64) -> Option<f64> {
    (expected > 0).then(|| 100.0 * received.min(expected) as f64 / expected as f64)
}

/// Totals over flows.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Totals {
    pub flows: usize,
    pub expected: u64,
    /// Received, each flow capped at its expected count.
    pub received: u64,
    pub delivery_percent: Option<f64>,
    /// The lowest delivery of one flow.
    pub min_flow_percent: Option<f64>,
}

/// Sums the measurable flows.
pub fn totals<'a>(flows: impl IntoIterator<Item = &'a Flow>) -> Totals {
    let mut t = Totals::default();
    for f in flows {
        let Some(p) = f.delivery_percent else {
            continue;
        };
        t.flows += 1;
        t.expected += f.expected;
        t.received += f.received.min(f.expected);
        t.min_flow_percent = Some(t.min_flow_percent.map_or(p, |m: f64| m.min(p)));
    }
    t.delivery_percent = delivery_percent(t.expected, t.received);
    t
}

/// A publisher track as the window sees it.
struct Published {
    publisher_index: usize,
    client_track_id: String,
    kind: TrackKind,
    track_id: String,
    simulcast: bool,
    sent: u64,
}

/// The measured window (see the module docs).
pub struct Window {
    peers: Vec<Arc<Peer>>,
    flows: Vec<Flow>,
    /// Each flow measured (a plain track).
    measured: Vec<bool>,
    started: Instant,
    ended: Option<Instant>,
    /// What [`Window::end`] paused: (publisher index, kind).
    paused: Vec<(usize, TrackKind)>,
}

fn sent_of(locals: &[LocalTrackStats], client_track_id: &str) -> Option<u64> {
    locals
        .iter()
        .find(|l| l.client_track_id == client_track_id)
        .map(|l| l.counters.packets)
}

impl Window {
    /// Starts the window over `peers` (every peer subscribes to every other peer's tracks);
    /// `checked(subscriber)` says whether a subscriber is held to the threshold.
    pub fn start(peers: &[Arc<Peer>], checked: impl Fn(&Peer) -> bool) -> Window {
        let started = Instant::now();
        let mut published = Vec::new();
        for (pi, p) in peers.iter().enumerate() {
            for l in p.local_tracks() {
                // The server's id: as the publisher knows it, else as another peer heard it.
                let track_id = l.server_track_id.clone().or_else(|| {
                    peers.iter().find_map(|o| {
                        o.room_tracks()
                            .into_iter()
                            .find(|t| {
                                t.participant_id == p.participant_id()
                                    && t.client_track_id == l.client_track_id
                            })
                            .map(|t| t.id)
                    })
                });
                let Some(track_id) = track_id else {
                    continue;
                };
                published.push(Published {
                    publisher_index: pi,
                    client_track_id: l.client_track_id.clone(),
                    kind: l.kind,
                    track_id,
                    simulcast: l.layers.len() > 1,
                    sent: l.counters.packets,
                });
            }
        }
        let received: Vec<HashMap<String, u64>> = peers
            .iter()
            .map(|p| {
                p.remote_tracks()
                    .into_iter()
                    .map(|t| (t.track_id, t.packets))
                    .collect()
            })
            .collect();
        let mut flows = Vec::new();
        let mut measured = Vec::new();
        for t in &published {
            let publisher = &peers[t.publisher_index];
            for (si, s) in peers.iter().enumerate() {
                if si == t.publisher_index {
                    continue;
                }
                flows.push(Flow {
                    subscriber: s.name().to_owned(),
                    subscriber_id: s.participant_id().to_owned(),
                    publisher: publisher.name().to_owned(),
                    publisher_id: publisher.participant_id().to_owned(),
                    track_id: t.track_id.clone(),
                    kind: t.kind,
                    expected: 0,
                    received: 0,
                    delivery_percent: None,
                    checked: checked(s) && !t.simulcast,
                    sent_at_start: t.sent,
                    received_at_start: received[si].get(&t.track_id).copied().unwrap_or(0),
                    publisher_index: t.publisher_index,
                    subscriber_index: si,
                    client_track_id: t.client_track_id.clone(),
                });
                measured.push(!t.simulcast);
            }
        }
        Window {
            peers: peers.to_vec(),
            flows,
            measured,
            started,
            ended: None,
            paused: Vec::new(),
        }
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    /// Ends the window: pauses the measured (plain) tracks of every publisher, so nothing more
    /// is written until [`Window::finish`]. Idempotent.
    pub fn end(&mut self) {
        if self.ended.is_some() {
            return;
        }
        self.ended = Some(Instant::now());
        for (f, m) in self.flows.iter().zip(&self.measured) {
            if *m && !self.paused.contains(&(f.publisher_index, f.kind)) {
                self.paused.push((f.publisher_index, f.kind));
                let _ = self.peers[f.publisher_index].pause_media(f.kind, true);
            }
        }
    }

    /// The flows with their final counts; then resumes what [`Window::end`] paused (the pause
    /// lasts as long as the drain: milliseconds in a healthy run).
    pub fn finish(&mut self) -> Vec<Flow> {
        self.end();
        let flows = self.flows();
        for (i, kind) in self.paused.drain(..) {
            let _ = self.peers[i].pause_media(kind, false);
        }
        flows
    }

    /// The window's length (up to now while it runs).
    pub fn length(&self) -> Duration {
        self.ended
            .unwrap_or_else(Instant::now)
            .duration_since(self.started)
    }

    /// Waits until every subscriber received every packet written in the window, for at most
    /// `bound` (all flows at once). Returns how long it took.
    pub async fn drain(&self, bound: Duration) -> Duration {
        let t0 = Instant::now();
        let locals: Vec<Vec<LocalTrackStats>> =
            self.peers.iter().map(|p| p.local_tracks()).collect();
        let waits = self
            .flows
            .iter()
            .zip(&self.measured)
            .filter(|(_, m)| **m)
            .filter_map(|(f, _)| {
                let sent = sent_of(&locals[f.publisher_index], &f.client_track_id)?;
                let target = f.received_at_start + sent.saturating_sub(f.sent_at_start);
                let peer = &self.peers[f.subscriber_index];
                Some(async move {
                    let _ = peer
                        .wait_for_track_state(&f.track_id, "drain", |t| t.packets >= target, bound)
                        .await;
                })
            });
        join_all(waits).await;
        t0.elapsed()
    }

    /// The flows with their counts as of now.
    pub fn flows(&self) -> Vec<Flow> {
        let locals: Vec<Vec<LocalTrackStats>> =
            self.peers.iter().map(|p| p.local_tracks()).collect();
        let received: Vec<BTreeMap<String, u64>> = self
            .peers
            .iter()
            .map(|p| {
                p.remote_tracks()
                    .into_iter()
                    .map(|t| (t.track_id, t.packets))
                    .collect()
            })
            .collect();
        self.flows
            .iter()
            .zip(&self.measured)
            .map(|(f, m)| {
                let mut f = f.clone();
                let sent = sent_of(&locals[f.publisher_index], &f.client_track_id)
                    .unwrap_or(f.sent_at_start);
                f.expected = sent.saturating_sub(f.sent_at_start);
                f.received = received[f.subscriber_index]
                    .get(&f.track_id)
                    .copied()
                    .unwrap_or(0)
                    .saturating_sub(f.received_at_start);
                f.delivery_percent = if *m {
                    delivery_percent(f.expected, f.received)
                } else {
                    None
                };
                f
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(expected: u64, received: u64, measured: bool) -> Flow {
        Flow {
            subscriber: "s".into(),
            subscriber_id: "S".into(),
            publisher: "p".into(),
            publisher_id: "P".into(),
            track_id: "T".into(),
            kind: TrackKind::Audio,
            expected,
            received,
            delivery_percent: if measured {
                delivery_percent(expected, received)
            } else {
                None
            },
            checked: measured,
            sent_at_start: 0,
            received_at_start: 0,
            publisher_index: 0,
            subscriber_index: 1,
            client_track_id: "c".into(),
        }
    }

    #[test]
    fn a_stream_that_stops_is_missing_packets() {
        // 3 s of 10 s received, no gap among them: gap-based loss says 0 %, delivery 30 %.
        assert_eq!(delivery_percent(1000, 300), Some(30.0));
        assert_eq!(delivery_percent(1000, 0), Some(0.0));
        // In-flight packets at the start do not lift delivery above 100 %.
        assert_eq!(delivery_percent(1000, 1002), Some(100.0));
        assert_eq!(delivery_percent(0, 5), None);
    }

    #[test]
    fn totals_cap_each_flow_and_skip_unmeasured() {
        let flows = [
            flow(1000, 1003, true),
            flow(1000, 500, true),
            flow(400, 0, false),
        ];
        let t = totals(&flows);
        assert_eq!(t.flows, 2);
        assert_eq!((t.expected, t.received), (2000, 1500));
        assert_eq!(t.delivery_percent, Some(75.0));
        assert_eq!(t.min_flow_percent, Some(50.0));
        assert_eq!(totals(&[]).delivery_percent, None);
    }
}
