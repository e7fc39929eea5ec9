//! The operator dashboard's view of a shard ([`Command::Dashboard`]): every room here, its
//! participants, the tracks published here with their layers' receive bitrates, and the
//! subscriptions of the participants here with the layer each receives. A plain value, built
//! on demand (a few times a second at most, while someone watches) from what the core keeps
//! anyway: the layers' bitrate meters (the layer selector's input), the layer selectors, the
//! subscribers' bandwidth estimates, the transport-wide loss counters and the connection
//! quality trackers. Nothing is added to the packet path.
//!
//! A room spread over several shards is reported by each for its own share (its
//! participants, the tracks they publish, their subscriptions); [`super::super::SfuHandle`]
//! merges the shards' answers by room name.

use super::*;
use crate::signal::ConnectionQuality;
use serde::Serialize;

/// What the dashboard shows of the server's rooms.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DashboardSnapshot {
    /// Rooms, by name.
    pub rooms: Vec<RoomSnapshot>,
}

/// One room (this shard's share of it, until merged).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RoomSnapshot {
    pub name: String,
    /// When the room opened (Unix seconds).
    pub created_at: u64,
    /// In join order (per shard).
    pub participants: Vec<ParticipantSnapshot>,
    /// Tracks published by the participants here.
    pub tracks: Vec<TrackSnapshot>,
    /// What the participants here receive.
    pub subscriptions: Vec<SubscriptionSnapshot>,
}

/// One participant.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ParticipantSnapshot {
    pub id: String,
    pub identity: Option<String>,
    pub name: String,
    /// When it joined (Unix seconds).
    pub joined_at: u64,
    /// Its connection state: `connecting` (not yet up), `connected`.
    pub state: &'static str,
    /// Hidden from the room (a recorder, a bot, a WHEP viewer).
    pub hidden: bool,
    /// Its connection quality as last told to the room, and the score behind it.
    pub quality: Option<ConnectionQuality>,
    pub score: Option<u8>,
    /// The downlink bandwidth estimate of its subscriber connection (TWCC, REMB fallback).
    pub available_bps: Option<u64>,
    /// Cumulative transport-wide counters (packets expected, lost) of its downlink (from its
    /// feedback on what the server sent) and of its uplink (what it published). The
    /// dashboard differences them into loss fractions.
    pub downlink: Option<(u64, u64)>,
    pub uplink: Option<(u64, u64)>,
    /// Among the room's active speakers (as the room was last told `speakers`).
    pub speaking: bool,
}

/// One track published here.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TrackSnapshot {
    pub id: String,
    pub participant_id: String,
    /// `audio` or `video`.
    pub kind: &'static str,
    pub mime_type: String,
    pub muted: bool,
    /// Its encodings (simulcast layers, or the only one), in the order they were offered.
    pub layers: Vec<LayerSnapshot>,
}

/// One encoding of a track.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LayerSnapshot {
    /// RID (empty without simulcast).
    pub rid: String,
    /// Receive bitrate over the last second (the meter the layer selector reads).
    pub bitrate_bps: u64,
    /// A packet arrived within the last second.
    pub active: bool,
    pub width: u32,
    pub height: u32,
}

/// One subscription of a participant here.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SubscriptionSnapshot {
    pub subscriber: String,
    pub track: String,
    /// The layer it receives now and the one it is switching to (RID, `"0"` … without one);
    /// `None` for audio (always forwarded) and before the first packet.
    pub layer: Option<String>,
    pub target: Option<String>,
    /// The subscriber paused the track (video it does not show).
    pub paused: bool,
}

impl DashboardSnapshot {
    /// Merge another shard's snapshot into this one (rooms by name).
    pub fn merge(&mut self, other: DashboardSnapshot) {
        for room in other.rooms {
            match self.rooms.iter_mut().find(|r| r.name == room.name) {
                Some(r) => {
                    r.created_at = r.created_at.min(room.created_at);
                    r.participants.extend(room.participants);
                    r.tracks.extend(room.tracks);
                    r.subscriptions.extend(room.subscriptions);
                }
                None => self.rooms.push(room),
            }
        }
        self.rooms.sort_by(|a, b| a.name.cmp(&b.name));
    }
}

/// Seconds since the Unix epoch.
fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A layer's name: its RID, or its index without one.
fn layer_name(t: &Track, id: usize) -> String {
    match t.layers.get(id) {
        Some(l) if !l.rid.is_empty() => l.rid.clone(),
        _ => id.to_string(),
    }
}

impl<T: Transmit> Sfu<T> {
    /// This shard's share of the dashboard.
    pub(super) fn dashboard(&self) -> DashboardSnapshot {
        let now = self.now;
        let mut rooms: Vec<RoomSnapshot> = self
            .rooms
            .iter()
            .map(|(rk, r)| self.room_dashboard(*rk, r, now))
            .collect();
        rooms.sort_by(|a, b| a.name.cmp(&b.name));
        DashboardSnapshot { rooms }
    }

    fn room_dashboard(&self, rk: RoomKey, r: &Room, now: Instant) -> RoomSnapshot {
        let mut out = RoomSnapshot {
            name: r.name.clone(),
            created_at: unix_secs(self.wall_clock(r.created)),
            ..RoomSnapshot::default()
        };
        for part in &r.members {
            let Some(p) = r.parts.get(part) else {
                continue;
            };
            let update = self.quality.update_of(*part, &p.pid);
            out.participants.push(ParticipantSnapshot {
                id: p.pid.clone(),
                identity: p.identity.clone(),
                name: p.name.clone(),
                joined_at: unix_secs(self.wall_clock(p.joined)),
                state: if p.transport_connected() {
                    "connected"
                } else {
                    "connecting"
                },
                hidden: p.grants.hidden,
                quality: update.as_ref().map(|u| u.quality),
                score: update.and_then(|u| u.score),
                available_bps: p.estimate().available(now),
                downlink: p.egress.as_ref().map(|e| e.loss_totals()),
                uplink: p.ingress.as_ref().map(|i| i.loss_totals()),
                speaking: self.speakers.is_speaking(rk, &p.pid),
            });
            for tid in p.published() {
                let Some(t) = r.tracks.get(tid) else {
                    continue;
                };
                out.tracks.push(TrackSnapshot {
                    id: t.id.to_string(),
                    participant_id: p.pid.clone(),
                    kind: match t.kind {
                        TrackKind::Audio => "audio",
                        TrackKind::Video => "video",
                    },
                    mime_type: t.codec.mime_type.clone(),
                    muted: t.muted,
                    layers: t
                        .layers
                        .iter()
                        .map(|l| {
                            let active = l.meter.is_active(now);
                            LayerSnapshot {
                                rid: l.rid.clone(),
                                bitrate_bps: if active { l.meter.bps(now) } else { 0 },
                                active,
                                width: l.width,
                                height: l.height,
                            }
                        })
                        .collect(),
                });
            }
        }
        let mut subs: Vec<SubscriptionSnapshot> = Vec::new();
        for t in r.tracks.values() {
            for (part, down) in &t.down {
                let Some(p) = r.parts.get(part) else {
                    continue;
                };
                let sel = down.selector.as_ref();
                subs.push(SubscriptionSnapshot {
                    subscriber: p.pid.clone(),
                    track: t.id.to_string(),
                    layer: sel.and_then(|s| s.current()).map(|id| layer_name(t, id)),
                    target: sel.and_then(|s| s.target()).map(|id| layer_name(t, id)),
                    paused: sel.is_some_and(|s| s.is_paused()),
                });
            }
        }
        subs.sort_by(|a, b| (&a.subscriber, &a.track).cmp(&(&b.subscriber, &b.track)));
        out.subscriptions = subs;
        out
    }
}
