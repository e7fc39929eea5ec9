//! Room administration in the core: the admin API's operations ([`AdminOp`]) and room admins'
//! requests on the WebSocket (`remove_participant`, `mute_chat`, `mute` of another's track).
//!
//! A room admin's request is checked here, on the admin's shard: the grant first (a participant
//! without it learns nothing, not even whether the id exists), then the target, which must be
//! in the admin's room. A target on another shard of the room gets the request over the pipe
//! ([`PipeMsg::Admin`]).

use super::super::admin::{
    AdminError, AdminOp, AdminReply, ParticipantSummary, PermissionsUpdate, RoomSummary, Target,
    with_reason,
};
use super::*;

/// Seconds since the Unix epoch.
fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `removed by a room admin`, with the admin's reason if it gave one.
fn removal_reason(reason: Option<&str>) -> String {
    with_reason("removed by a room admin", reason)
}

impl<T: Transmit> Sfu<T> {
    /// An admin operation on this shard's share of the room(s) it names.
    pub(super) fn on_admin(&mut self, op: AdminOp) -> Result<AdminReply, AdminError> {
        if self.shutting_down {
            return Err(AdminError::ShuttingDown);
        }
        match op {
            AdminOp::ListRooms => {
                let mut rooms: Vec<RoomSummary> = self
                    .rooms
                    .values()
                    .map(|r| RoomSummary {
                        name: r.name.clone(),
                        participants: r.parts.len(),
                        tracks: r
                            .tracks
                            .values()
                            .filter(|t| t.local_publisher().is_some())
                            .count(),
                        created_at: unix_secs(self.wall_clock(r.created)),
                        shards: 1,
                    })
                    .collect();
                rooms.sort_by(|a, b| a.name.cmp(&b.name));
                Ok(AdminReply::Rooms(rooms))
            }
            AdminOp::ListParticipants { room } => {
                let rk = self.admin_room(&room)?;
                let members = self.rooms.get(&rk).map(|r| r.members.clone());
                Ok(AdminReply::Participants(
                    members
                        .unwrap_or_default()
                        .into_iter()
                        .filter_map(|m| self.summary(m))
                        .collect(),
                ))
            }
            AdminOp::RemoveParticipant {
                room,
                target,
                reason,
            } => {
                let part = self.admin_target(&room, &target)?;
                self.remove_participant(part, LeaveReason::Removed, &reason, true);
                Ok(AdminReply::Done { participants: 1 })
            }
            AdminOp::MuteTrack {
                room,
                target,
                track_id,
                muted,
            } => {
                let part = self.admin_target(&room, &target)?;
                if self
                    .track(part.room, &track_id)
                    .is_none_or(|t| t.local_publisher() != Some(part))
                {
                    return Err(AdminError::TrackNotFound(target.to_string(), track_id));
                }
                self.admin_mute(part.room, &track_id, muted);
                self.summary(part)
                    .map(|s| AdminReply::Participant(Box::new(s)))
                    .ok_or_else(|| AdminError::ParticipantNotFound(target.to_string()))
            }
            AdminOp::UpdatePermissions {
                room,
                target,
                update,
            } => {
                let part = self.admin_target(&room, &target)?;
                self.update_permissions(part, &update);
                self.summary(part)
                    .map(|s| AdminReply::Participant(Box::new(s)))
                    .ok_or_else(|| AdminError::ParticipantNotFound(target.to_string()))
            }
            AdminOp::SendData {
                room,
                lane,
                is_text,
                payload,
                to,
            } => {
                let rk = self.admin_room(&room)?;
                let Some(r) = self.rooms.get(&rk) else {
                    return Err(AdminError::RoomNotFound(room));
                };
                // The named participants of the room (here or on its other shards).
                let mut pids: Vec<String> = Vec::new();
                for t in &to {
                    let pid = match t {
                        Target::Participant(pid) => (r.remote.contains_key(pid.as_str())
                            || r.parts.values().any(|p| p.pid == *pid))
                        .then(|| pid.clone()),
                        Target::Identity(id) => r
                            .parts
                            .values()
                            .find(|p| p.identity.as_ref() == Some(id))
                            .map(|p| p.pid.clone()),
                    };
                    if let Some(pid) = pid.filter(|p| !pids.contains(p)) {
                        pids.push(pid);
                    }
                }
                if !to.is_empty() && pids.is_empty() {
                    return Ok(AdminReply::Done { participants: 0 });
                }
                let participants = if to.is_empty() {
                    r.parts
                        .values()
                        .filter(|p| p.viewer.is_none() && !p.publish_only)
                        .count()
                        + r.remote.len()
                } else {
                    pids.len()
                };
                let lane = match lane {
                    super::super::admin::Lane::Chat => Lane::Chat,
                    super::super::admin::Lane::Input => Lane::Input,
                };
                let msg = Submitted {
                    lane,
                    from: data::SERVER_SENDER.to_owned(),
                    is_text,
                    payload,
                    to: (!to.is_empty()).then_some(pids),
                    sseq: None,
                    ack: false,
                    event: None,
                    origin: self.now,
                };
                let now = self.now;
                self.submit(rk, msg, now);
                Ok(AdminReply::Done { participants })
            }
            AdminOp::CloseRoom { room, reason } => {
                let rk = self.admin_room(&room)?;
                let members = self
                    .rooms
                    .get(&rk)
                    .map(|r| r.members.clone())
                    .unwrap_or_default();
                info!(room = %room, participants = members.len(), "room closed by an admin");
                for &m in &members {
                    self.remove_participant(m, LeaveReason::RoomClosed, &reason, true);
                }
                Ok(AdminReply::Done {
                    participants: members.len(),
                })
            }
        }
    }

    fn admin_room(&self, room: &str) -> Result<RoomKey, AdminError> {
        self.room_keys
            .get(room.trim())
            .copied()
            .filter(|k| self.rooms.contains_key(k))
            .ok_or_else(|| AdminError::RoomNotFound(room.to_owned()))
    }

    /// The participant of `room` (on this shard) that `target` names.
    fn admin_target(&self, room: &str, target: &Target) -> Result<PartKey, AdminError> {
        let rk = self.admin_room(room)?;
        let r = self.rooms.get(&rk);
        let found = match target {
            Target::Participant(pid) => self
                .by_pid
                .get(pid)
                .copied()
                .filter(|k| k.room == rk && r.is_some_and(|r| r.parts.contains_key(k))),
            Target::Identity(id) => r.and_then(|r| {
                r.members
                    .iter()
                    .copied()
                    .find(|m| r.parts.get(m).and_then(|p| p.identity.as_ref()) == Some(id))
            }),
        };
        found.ok_or_else(|| AdminError::ParticipantNotFound(target.to_string()))
    }

    /// A participant as an admin sees it.
    fn summary(&self, part: PartKey) -> Option<ParticipantSummary> {
        let room = self.rooms.get(&part.room)?;
        let p = room.parts.get(&part)?;
        Some(ParticipantSummary {
            participant_id: p.pid.clone(),
            identity: p.identity.clone(),
            name: p.name.clone(),
            permissions: p.permissions(),
            tracks: p
                .published()
                .filter_map(|t| room.tracks.get(t))
                .map(|t| t.info(&p.pid))
                .collect(),
            subscriptions: p.subscriptions.len(),
            joined_at: unix_secs(self.wall_clock(p.joined)),
        })
    }

    /// An admin mutes (or unmutes) a local track: forwarding stops, everyone (its publisher
    /// too) is told, and its publisher cannot unmute it while the admin holds it.
    fn admin_mute(&mut self, room: RoomKey, track_id: &str, muted: bool) {
        let Some(t) = self.track_mut(room, track_id) else {
            return;
        };
        t.admin_muted = muted;
        info!(track = %track_id, muted, "track muted by a room admin");
        self.set_muted(room, track_id, muted, true);
    }

    /// A change of a participant's permissions, applied at once: revoked publishing
    /// unpublishes its tracks of that kind, revoked subscribing unsubscribes it from
    /// everything, a new subscribe grant subscribes it to everything if it asked to be.
    fn update_permissions(&mut self, part: PartKey, update: &PermissionsUpdate) {
        let Some(p) = part_mut!(self, part) else {
            return;
        };
        let was = p.grants.clone();
        let g = &mut p.grants;
        for (field, value) in [
            (&mut g.publish_audio, update.publish_audio),
            (&mut g.publish_video, update.publish_video),
            (&mut g.publish_data, update.publish_data),
            (&mut g.subscribe, update.subscribe),
            (&mut g.room_admin, update.room_admin),
            (&mut p.chat_muted, update.chat_muted),
        ] {
            if let Some(v) = value {
                *field = v;
            }
        }
        let now = p.grants.clone();
        let pid = p.pid.clone();
        let permissions = p.permissions();
        info!(participant = %pid, ?permissions, "permissions changed by a room admin");
        // Tracks of a kind it may no longer publish.
        let revoked: Vec<(TrackId, rtc::rtp_transceiver::RTCRtpReceiverId)> = self
            .rooms
            .get(&part.room)
            .and_then(|r| r.parts.get(&part).map(|p| (r, p)))
            .map(|(r, p)| {
                p.pub_tracks
                    .iter()
                    .filter(|pt| {
                        r.tracks.get(&*pt.tid).is_some_and(|t| match t.kind {
                            TrackKind::Audio => !now.publish_audio,
                            TrackKind::Video => !now.publish_video,
                        })
                    })
                    .map(|pt| (pt.tid.clone(), pt.receiver))
                    .collect()
            })
            .unwrap_or_default();
        for (tid, receiver) in revoked {
            if let Some(p) = part_mut!(self, part) {
                p.refused.push(receiver);
            }
            self.unpublish(part.room, &tid);
            self.send_to(
                part,
                ServerMessage::TrackUnpublished {
                    track_id: tid.to_string(),
                    participant_id: pid.clone(),
                },
            );
        }
        if was.subscribe && !now.subscribe {
            let subscribed: Vec<TrackId> = self
                .part(part)
                .map(|p| p.subscriptions.keys().cloned().collect())
                .unwrap_or_default();
            for tid in subscribed {
                self.unsubscribe(part, &tid);
            }
        } else if !was.subscribe && self.part(part).is_some_and(Participant::auto_subscribes) {
            let mut tracks: Vec<TrackId> = self
                .rooms
                .get(&part.room)
                .map(|r| {
                    r.tracks
                        .iter()
                        .filter(|(_, t)| t.local_publisher() != Some(part))
                        .map(|(id, _)| id.clone())
                        .collect()
                })
                .unwrap_or_default();
            tracks.sort();
            for tid in tracks {
                self.subscribe(part, &tid);
            }
        }
        // On the room's timeline, with whose permissions they are (a room admin's action).
        if !permissions.hidden {
            let event = serde_json::json!({
                "type": "permissions_changed",
                "participant_id": pid,
                "permissions": permissions,
            });
            let msg = Submitted {
                lane: Lane::Chat,
                from: data::SERVER_SENDER.to_owned(),
                is_text: true,
                payload: Bytes::from(event.to_string()),
                to: None,
                sseq: None,
                ack: false,
                event: Some("permissions_changed"),
                origin: self.now,
            };
            let now = self.now;
            self.submit(part.room, msg, now);
        }
        self.send_to(part, ServerMessage::PermissionsChanged { permissions });
    }

    /// Checks that `admin` may moderate its room; answers `permission_denied` to `request`
    /// otherwise.
    fn check_admin(&mut self, admin: PartKey, request: &str) -> bool {
        if self.part(admin).is_some_and(|p| p.grants.room_admin) {
            return true;
        }
        self.send_to(
            admin,
            ServerMessage::error(
                ErrorCode::PermissionDenied,
                "your token does not grant moderating the room (`roomAdmin`)",
                Some(request),
            ),
        );
        false
    }

    /// Runs `op` (about participant `pid` of the admin's room) here if `pid` is on this
    /// shard, or on its shard; answers `not_found` to `request` if the room has no `pid`.
    fn moderate(&mut self, admin: PartKey, pid: &str, op: AdminOp, request: &str) {
        let Some(r) = self.rooms.get(&admin.room) else {
            return;
        };
        let local = self
            .by_pid
            .get(pid)
            .copied()
            .filter(|k| k.room == admin.room && r.parts.contains_key(k));
        let remote = r.remote.get(pid).map(|m| m.shard);
        let op = op.with_target(Target::Participant(pid.to_owned()));
        if local.is_some() {
            if let Err(e) = self.on_admin(op) {
                self.send_to(
                    admin,
                    ServerMessage::error(ErrorCode::NotFound, e.to_string(), Some(request)),
                );
            }
        } else if let Some(shard) = remote {
            self.pipe_out.push(shard, PipeMsg::Admin { op });
        } else {
            self.send_to(
                admin,
                ServerMessage::error(
                    ErrorCode::NotFound,
                    format!("no participant {pid} in the room"),
                    Some(request),
                ),
            );
        }
    }

    fn admin_room_name(&self, admin: PartKey) -> String {
        self.rooms
            .get(&admin.room)
            .map(|r| r.name.clone())
            .unwrap_or_default()
    }

    /// `remove_participant` from a room admin.
    pub(super) fn on_remove_participant(
        &mut self,
        admin: PartKey,
        pid: String,
        reason: Option<String>,
    ) {
        if !self.check_admin(admin, "remove_participant") {
            return;
        }
        let op = AdminOp::RemoveParticipant {
            room: self.admin_room_name(admin),
            target: Target::Participant(pid.clone()),
            reason: removal_reason(reason.as_deref()),
        };
        self.moderate(admin, &pid, op, "remove_participant");
    }

    /// `mute_chat` from a room admin.
    pub(super) fn on_mute_chat(&mut self, admin: PartKey, pid: String, muted: bool) {
        if !self.check_admin(admin, "mute_chat") {
            return;
        }
        let op = AdminOp::UpdatePermissions {
            room: self.admin_room_name(admin),
            target: Target::Participant(pid.clone()),
            update: PermissionsUpdate {
                chat_muted: Some(muted),
                ..PermissionsUpdate::default()
            },
        };
        self.moderate(admin, &pid, op, "mute_chat");
    }

    /// `mute` of another participant's track from a room admin (the track exists in its
    /// room).
    pub(super) fn admin_mute_from(&mut self, admin: PartKey, track_id: String, muted: bool) {
        let Some(r) = self.rooms.get(&admin.room) else {
            return;
        };
        let Some(t) = r.tracks.get(track_id.as_str()) else {
            return;
        };
        if t.local_publisher().is_some() {
            self.admin_mute(admin.room, &track_id, muted);
            return;
        }
        let pid = r.publisher_id(t);
        let op = AdminOp::MuteTrack {
            room: r.name.clone(),
            target: Target::Participant(pid.clone()),
            track_id,
            muted,
        };
        self.moderate(admin, &pid, op, "mute");
    }
}

#[cfg(test)]
mod tests {
    use super::removal_reason;

    #[test]
    fn removal_reasons_are_bounded_and_clean() {
        assert_eq!(removal_reason(None), "removed by a room admin");
        assert_eq!(removal_reason(Some("  ")), "removed by a room admin");
        assert_eq!(
            removal_reason(Some("spam\n")),
            "removed by a room admin: spam"
        );
        let long = "x".repeat(1000);
        assert_eq!(
            removal_reason(Some(&long)).chars().count(),
            "removed by a room admin: ".len() + 200
        );
    }
}
