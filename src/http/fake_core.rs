//! A stand-in for the SFU core in unit tests: answers commands like the real core would and
//! reports what it saw.
//!
//! - `join`: refused with `Overloaded` for room `"full"`, with `InvalidJoin` for name
//!   `"reject"`, otherwise accepted as `PA_<n>`;
//! - `publish_offer { sdp }` → event `publish_answer { sdp: "answer:" + sdp }`;
//! - `mute { track_id: "kick" }` → event `leave { reason: "kicked" }`, then the event channel
//!   is closed (what the core does when it removes a participant);
//! - `leave` and `disconnect` remove the participant;
//! - `shutdown`: `leave { reason: "shutdown" }` to everyone, channels closed, loop ends.

use crate::sfu::{Command, CoreStats, JoinAccepted, SfuError, SfuHandle};
use crate::signal::{ClientMessage, PROTOCOL_VERSION, ServerMessage};
use std::collections::HashMap;
use tokio::sync::{mpsc, oneshot};

/// What the fake core saw.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Seen {
    Join {
        room: String,
        name: String,
    },
    Client {
        participant: String,
        msg: ClientMessage,
    },
    Disconnect {
        participant: String,
        reason: String,
    },
    Shutdown,
}

/// Spawn the fake core on the current runtime. Returns the handle, what it sees, and a
/// receiver that resolves when it stopped.
pub(crate) fn spawn() -> (
    SfuHandle,
    mpsc::UnboundedReceiver<Seen>,
    oneshot::Receiver<()>,
) {
    let (tx, mut rx) = mpsc::channel::<Command>(64);
    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    let (stopped_tx, stopped_rx) = oneshot::channel();
    tokio::spawn(async move {
        let mut next_id = 1u32;
        let mut participants: HashMap<String, mpsc::Sender<ServerMessage>> = HashMap::new();
        while let Some(cmd) = rx.recv().await {
            match cmd {
                Command::Join { req, reply } => {
                    let _ = seen_tx.send(Seen::Join {
                        room: req.room.clone(),
                        name: req.name.clone(),
                    });
                    let result = if req.room == "full" {
                        Err(SfuError::Overloaded)
                    } else if req.name == "reject" {
                        Err(SfuError::InvalidJoin("name `reject` is taken".into()))
                    } else {
                        let participant_id = format!("PA_{next_id}");
                        next_id += 1;
                        participants.insert(participant_id.clone(), req.events);
                        Ok(JoinAccepted {
                            joined: ServerMessage::Joined {
                                protocol: PROTOCOL_VERSION,
                                server_version: "test".into(),
                                room: req.room,
                                participant_id: participant_id.clone(),
                                participants: Vec::new(),
                                max_data_message: 16384,
                                resume_token: None,
                                resume_grace_ms: None,
                                ice_servers: Vec::new(),
                                input_tick_hz: 0,
                                session_id: None,
                                node_id: None,
                            },
                            participant_id,
                        })
                    };
                    let _ = reply.send(result);
                }
                Command::Client { participant, msg } => {
                    let _ = seen_tx.send(Seen::Client {
                        participant: participant.clone(),
                        msg: msg.clone(),
                    });
                    match msg {
                        ClientMessage::PublishOffer { sdp } => {
                            if let Some(events) = participants.get(&participant) {
                                let _ = events.try_send(ServerMessage::PublishAnswer {
                                    sdp: format!("answer:{sdp}"),
                                });
                            }
                        }
                        ClientMessage::Mute { track_id, .. } if track_id == "kick" => {
                            if let Some(events) = participants.remove(&participant) {
                                let _ = events.try_send(ServerMessage::Leave {
                                    reason: "kicked".into(),
                                });
                            }
                        }
                        ClientMessage::Leave => {
                            participants.remove(&participant);
                        }
                        _ => {}
                    }
                }
                Command::Disconnect {
                    participant,
                    reason,
                    ..
                } => {
                    participants.remove(&participant);
                    let _ = seen_tx.send(Seen::Disconnect {
                        participant,
                        reason,
                    });
                }
                Command::Shutdown { done } => {
                    let _ = seen_tx.send(Seen::Shutdown);
                    for (_, events) in participants.drain() {
                        let _ = events.try_send(ServerMessage::Leave {
                            reason: "shutdown".into(),
                        });
                    }
                    let _ = done.send(());
                    break;
                }
                Command::Admin { reply, .. } => {
                    let _ = reply.send(Err(crate::sfu::admin::AdminError::Invalid(
                        "the fake core has no admin API".into(),
                    )));
                }
                Command::Dashboard { reply } => {
                    let _ = reply.send(Default::default());
                }
                Command::Stats { reply } => {
                    let _ = reply.send(CoreStats {
                        participants: participants.len(),
                        ..CoreStats::default()
                    });
                }
            }
        }
        let _ = stopped_tx.send(());
    });
    (SfuHandle::new(tx), seen_rx, stopped_rx)
}
