//! Room events over Redis pub/sub: every node publishes what happens to the participants it
//! serves — `participant_joined`, `participant_left`, `track_published`, `track_unpublished`,
//! the events its core hands the webhooks — on `plaza:room-events:<room>`, so that whoever
//! subscribes (`PSUBSCRIBE plaza:room-events:*`) sees every node's side of every room, those
//! that span nodes included. A message is the webhook event's JSON (`signaling/WEBHOOKS.md`)
//! plus `node`, the id of the node that serves the participant; `id` and `seq` are not set
//! (they are the webhook dispatcher's). Publishing never holds up the core: the events reach
//! this task through a bounded channel (full: dropped), and a Redis outage drops them (counted
//! in `cluster.room_events_dropped`).

use super::{Counters, within_redis_timeout};
use crate::webhook::Event;
use redis::aio::ConnectionManager;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::mpsc;
use tracing::debug;

/// The channel of `room`'s events.
pub fn channel(room: &str) -> String {
    format!("{}room-events:{room}", super::registry::KEY_PREFIX)
}

/// Events waiting for the publisher (more are dropped).
pub const QUEUE: usize = 4096;
/// Events published in one round trip at most.
const BATCH: usize = 64;

/// The message published for `event`, served by node `node`.
pub fn message(node: &str, event: &Event) -> String {
    let mut v = serde_json::to_value(event).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.remove("id");
        o.remove("seq");
        o.insert("node".into(), node.into());
    }
    v.to_string()
}

/// Publishes what arrives on `rx` until it closes.
pub(super) async fn run(
    node: String,
    mut conn: ConnectionManager,
    mut rx: mpsc::Receiver<Event>,
    counters: Arc<Counters>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let mut pipe = redis::pipe();
        for e in &batch {
            pipe.publish(channel(&e.room), message(&node, e)).ignore();
        }
        let n = batch.len() as u64;
        batch.clear();
        match within_redis_timeout(pipe.query_async::<()>(&mut conn)).await {
            Ok(()) => {
                counters.events_published.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                counters.events_dropped.fetch_add(n, Ordering::Relaxed);
                debug!(error = %e, events = n, "room events not published (Redis)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::{EventKind, ParticipantRef};

    #[test]
    fn a_message_is_the_event_with_its_node() {
        let e = Event::new(
            EventKind::ParticipantJoined,
            "r",
            std::time::SystemTime::UNIX_EPOCH,
        )
        .with_participant(ParticipantRef {
            id: "PA_1".into(),
            identity: Some("alice".into()),
            name: "Alice".into(),
            session_id: String::new(),
            hidden: false,
        });
        let m: serde_json::Value = serde_json::from_str(&message("ND_a", &e)).unwrap();
        assert_eq!(m["node"], "ND_a");
        assert_eq!(m["event"], "participant_joined");
        assert_eq!(m["room"], "r");
        assert_eq!(m["participant"]["identity"], "alice");
        assert!(m.get("id").is_none() && m.get("seq").is_none(), "{m}");
        assert_eq!(channel("r"), "plaza:room-events:r");
    }
}
