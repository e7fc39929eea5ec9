//! The dispatcher task: numbers events per room, derives `room_started`/`room_finished`,
//! queues each event for every URL and makes the HTTP requests ([`super::queue`] decides
//! which and when).

use super::queue::{Outcome, UrlQueue};
use super::{Counters, Event, EventKind, WebhookConfig, sign};
use crate::auth::ApiKey;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, USER_AGENT};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::Rng as _;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A room's numbering.
#[derive(Debug, Default)]
struct RoomState {
    /// The last `seq` given.
    seq: u64,
    /// Participants in it (joined, not left).
    members: usize,
    /// WHIP/WHEP sessions in it (started, not ended). A session's `…_ended` and its
    /// participant's `participant_left` come from different tasks in either order; the room
    /// finishes after both.
    sessions: usize,
    started: bool,
}

fn is_session_start(k: EventKind) -> bool {
    matches!(
        k,
        EventKind::WhipSessionStarted | EventKind::WhepSessionStarted
    )
}

fn is_session_end(k: EventKind) -> bool {
    matches!(k, EventKind::WhipSessionEnded | EventKind::WhepSessionEnded)
}

/// Numbers events and derives the room's start and end: pure, fed one event at a time.
#[derive(Debug, Default)]
pub(super) struct Sequencer {
    rooms: HashMap<String, RoomState>,
}

impl Sequencer {
    /// `ev` and the events it implies, each with its `id` and `seq`, in order.
    pub(super) fn accept(&mut self, ev: Event, rng: &mut impl rand::Rng) -> Vec<Event> {
        let st = self.rooms.entry(ev.room.clone()).or_default();
        let mut out = Vec::with_capacity(2);
        let derived = |kind: EventKind, ev: &Event| Event {
            participant: None,
            track: None,
            reason: None,
            resource: None,
            ..Event {
                event: kind,
                ..ev.clone()
            }
        };
        match ev.event {
            EventKind::ParticipantJoined => {
                if !st.started {
                    st.started = true;
                    out.push(derived(EventKind::RoomStarted, &ev));
                }
                st.members += 1;
            }
            EventKind::ParticipantLeft => st.members = st.members.saturating_sub(1),
            k if is_session_start(k) => st.sessions += 1,
            k if is_session_end(k) => st.sessions = st.sessions.saturating_sub(1),
            _ => {}
        }
        let ends = matches!(ev.event, EventKind::ParticipantLeft) || is_session_end(ev.event);
        let finish = (ends && st.started && st.members == 0 && st.sessions == 0)
            .then(|| derived(EventKind::RoomFinished, &ev));
        out.push(ev);
        let finished = finish.is_some();
        out.extend(finish);
        for e in &mut out {
            st.seq += 1;
            e.seq = st.seq;
            e.id = new_event_id(rng);
        }
        // A finished room starts again from 1; a stray event of a room that never started
        // (a session that ended after its room) leaves nothing behind.
        if finished || (!st.started && st.members == 0 && st.sessions == 0) {
            let room = out[0].room.clone();
            self.rooms.remove(&room);
        }
        out
    }
}

fn new_event_id(rng: &mut impl rand::Rng) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let tail: String = (0..16)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("EV_{tail}")
}

struct Target {
    uri: hyper::Uri,
    queue: UrlQueue<Bytes>,
}

pub(super) struct Dispatcher {
    targets: Vec<Target>,
    seq: Sequencer,
    key: ApiKey,
    client: HttpClient,
    timeout: Duration,
    counters: Arc<Counters>,
}

/// The result of one request.
struct Done {
    target: usize,
    room: String,
    seq: u64,
    ok: bool,
    latency: Duration,
}

impl Dispatcher {
    pub(super) fn new(
        cfg: &WebhookConfig,
        urls: Vec<hyper::Uri>,
        key: ApiKey,
        counters: Arc<Counters>,
    ) -> Result<Self, String> {
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
            .map_err(|e| format!("webhook TLS setup: {e}"))?
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(tls);
        Ok(Dispatcher {
            targets: urls
                .into_iter()
                .map(|uri| Target {
                    uri,
                    queue: UrlQueue::new(cfg.queue, super::MAX_IN_FLIGHT, cfg.backoff),
                })
                .collect(),
            seq: Sequencer::default(),
            key,
            client,
            timeout: cfg.timeout,
            counters,
        })
    }

    fn accept(&mut self, ev: Event) {
        for ev in self.seq.accept(ev, &mut rand::rng()) {
            let body = match serde_json::to_vec(&ev) {
                Ok(b) => Bytes::from(b),
                Err(e) => {
                    warn!(error = %e, "webhook event does not serialise");
                    continue;
                }
            };
            debug!(event = ?ev.event, room = %ev.room, seq = ev.seq, id = %ev.id, session = ev.participant.as_ref().map_or("", |p| p.session_id.as_str()), "webhook event");
            for t in &mut self.targets {
                if t.queue.push(&ev.room, ev.seq, body.clone()) {
                    self.counters.queued.fetch_add(1, Relaxed);
                    self.counters.pending.fetch_add(1, Relaxed);
                } else {
                    self.counters.dropped.fetch_add(1, Relaxed);
                    warn!(url = %t.uri, room = %ev.room, seq = ev.seq, "webhook queue full: event dropped");
                }
            }
        }
    }

    fn start_requests(&mut self, inflight: &mut JoinSet<Done>) {
        let now = Instant::now();
        for (i, t) in self.targets.iter_mut().enumerate() {
            for send in t.queue.poll(now) {
                let wall = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let auth = match sign::sign(&self.key, &send.body, wall) {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "webhook signing failed");
                        String::new()
                    }
                };
                let req = hyper::Request::post(t.uri.clone())
                    .header(CONTENT_TYPE, "application/json")
                    .header(USER_AGENT, concat!("plaza/", env!("CARGO_PKG_VERSION")))
                    .header(AUTHORIZATION, auth)
                    .body(Full::new(send.body));
                let client = self.client.clone();
                let timeout = self.timeout;
                let (room, seq) = (send.room, send.seq);
                let uri = t.uri.clone();
                inflight.spawn(async move {
                    let started = Instant::now();
                    let ok = match req {
                        Err(e) => {
                            warn!(error = %e, "webhook request could not be built");
                            false
                        }
                        Ok(req) => match tokio::time::timeout(timeout, client.request(req)).await {
                            Ok(Ok(resp)) if resp.status().is_success() => true,
                            Ok(Ok(resp)) => {
                                debug!(url = %uri, status = %resp.status(), %room, seq, "webhook refused");
                                false
                            }
                            Ok(Err(e)) => {
                                debug!(url = %uri, error = %e, %room, seq, "webhook request failed");
                                false
                            }
                            Err(_) => {
                                debug!(url = %uri, %room, seq, "webhook request timed out");
                                false
                            }
                        },
                    };
                    Done {
                        target: i,
                        room,
                        seq,
                        ok,
                        latency: started.elapsed(),
                    }
                });
            }
        }
    }

    fn on_done(&mut self, d: Done) {
        let Some(t) = self.targets.get_mut(d.target) else {
            return;
        };
        let jitter: f64 = rand::rng().random();
        match t.queue.done(&d.room, d.seq, d.ok, Instant::now(), jitter) {
            Outcome::Delivered => {
                self.counters.delivered.fetch_add(1, Relaxed);
                self.counters.pending.fetch_sub(1, Relaxed);
                debug!(url = %t.uri, room = %d.room, seq = d.seq, latency_ms = d.latency.as_millis() as u64, "webhook delivered");
            }
            Outcome::Retry(at) => {
                self.counters.retried.fetch_add(1, Relaxed);
                debug!(url = %t.uri, room = %d.room, seq = d.seq, retry_in_ms = at.saturating_duration_since(Instant::now()).as_millis() as u64, "webhook failed: retrying");
            }
            Outcome::GaveUp => {
                self.counters.dropped.fetch_add(1, Relaxed);
                self.counters.pending.fetch_sub(1, Relaxed);
                warn!(url = %t.uri, room = %d.room, seq = d.seq, "webhook failed for too long: event dropped");
            }
            Outcome::Unknown => {}
        }
    }

    fn pending(&self) -> usize {
        self.targets.iter().map(|t| t.queue.len()).sum()
    }

    /// Until `finish` says when to stop (then: until everything is delivered or that time).
    pub(super) async fn run(
        mut self,
        mut rx: mpsc::Receiver<Event>,
        finish: oneshot::Receiver<Instant>,
    ) {
        info!(urls = self.targets.len(), "webhooks on");
        let mut inflight: JoinSet<Done> = JoinSet::new();
        let mut finish = std::pin::pin!(finish);
        let mut deadline: Option<Instant> = None;
        let mut open = true;
        loop {
            self.start_requests(&mut inflight);
            if deadline.is_some() && !open && self.pending() == 0 {
                break;
            }
            let wake = self
                .targets
                .iter()
                .filter_map(|t| t.queue.next_wakeup())
                .chain(deadline)
                .min();
            let sleep = async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                ev = rx.recv(), if open => match ev {
                    Some(ev) => self.accept(ev),
                    None => open = false,
                },
                at = &mut finish, if deadline.is_none() => {
                    // The server is stopping: take what is already in the channel, then
                    // deliver until the deadline.
                    deadline = Some(at.unwrap_or_else(|_| Instant::now()));
                    while let Ok(ev) = rx.try_recv() {
                        self.accept(ev);
                    }
                    open = false;
                }
                Some(done) = inflight.join_next(), if !inflight.is_empty() => {
                    if let Ok(done) = done {
                        self.on_done(done);
                    }
                }
                () = sleep => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        break;
                    }
                }
            }
            if !open && deadline.is_none() {
                // Every emitter is gone but no finish yet: deliver what is queued.
                deadline = Some(Instant::now() + self.timeout);
            }
        }
        let left = self.pending();
        if left > 0 {
            warn!(left, "webhooks stopped with events undelivered");
            self.counters.dropped.fetch_add(left as u64, Relaxed);
        }
        info!("webhooks stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signal::LeaveReason;
    use rand::SeedableRng;

    fn joined(room: &str, pid: &str) -> Event {
        Event::new(EventKind::ParticipantJoined, room, SystemTime::UNIX_EPOCH).with_participant(
            super::super::ParticipantRef {
                id: pid.into(),
                identity: None,
                name: pid.into(),
                session_id: String::new(),
                hidden: false,
            },
        )
    }

    fn left(room: &str, pid: &str) -> Event {
        Event {
            event: EventKind::ParticipantLeft,
            ..joined(room, pid)
        }
        .with_reason(LeaveReason::Left)
    }

    #[test]
    fn rooms_start_and_finish_with_their_participants_and_seq_has_no_gaps() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut s = Sequencer::default();
        let mut all = Vec::new();
        all.extend(s.accept(joined("a", "PA_1"), &mut rng));
        all.extend(s.accept(joined("b", "PA_2"), &mut rng));
        all.extend(s.accept(joined("a", "PA_3"), &mut rng));
        all.extend(s.accept(left("a", "PA_1"), &mut rng));
        all.extend(s.accept(left("a", "PA_3"), &mut rng));
        all.extend(s.accept(joined("a", "PA_4"), &mut rng));
        let a: Vec<(EventKind, u64)> = all
            .iter()
            .filter(|e| e.room == "a")
            .map(|e| (e.event, e.seq))
            .collect();
        use EventKind::*;
        assert_eq!(
            a,
            [
                (RoomStarted, 1),
                (ParticipantJoined, 2),
                (ParticipantJoined, 3),
                (ParticipantLeft, 4),
                (ParticipantLeft, 5),
                (RoomFinished, 6),
                // A new room of the same name counts again.
                (RoomStarted, 1),
                (ParticipantJoined, 2),
            ]
        );
        let b: Vec<(EventKind, u64)> = all
            .iter()
            .filter(|e| e.room == "b")
            .map(|e| (e.event, e.seq))
            .collect();
        assert_eq!(b, [(RoomStarted, 1), (ParticipantJoined, 2)]);
        let mut ids: Vec<&str> = all.iter().map(|e| e.id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), all.len(), "ids are unique");
        assert!(
            all[0].participant.is_none(),
            "room_started names no participant"
        );
    }

    #[test]
    fn a_session_room_finishes_after_both_its_participant_and_its_session_end() {
        use EventKind::*;
        let session = |kind: EventKind| Event {
            event: kind,
            ..joined("w", "PA_1")
        };
        // The session's end and its participant's leave race; both orders end the same way.
        for end_first in [true, false] {
            let mut rng = rand::rngs::StdRng::seed_from_u64(2);
            let mut s = Sequencer::default();
            let mut all = Vec::new();
            all.extend(s.accept(joined("w", "PA_1"), &mut rng));
            all.extend(s.accept(session(WhepSessionStarted), &mut rng));
            if end_first {
                all.extend(s.accept(session(WhepSessionEnded), &mut rng));
                all.extend(s.accept(left("w", "PA_1"), &mut rng));
            } else {
                all.extend(s.accept(left("w", "PA_1"), &mut rng));
                all.extend(s.accept(session(WhepSessionEnded), &mut rng));
            }
            let got: Vec<(EventKind, u64)> = all.iter().map(|e| (e.event, e.seq)).collect();
            assert_eq!(got.len(), 6, "{got:?}");
            assert_eq!(got[0], (RoomStarted, 1));
            assert_eq!(got[5], (RoomFinished, 6), "end_first={end_first}: {got:?}");
            assert!(s.rooms.is_empty(), "nothing kept after the room finished");
        }
        // A stray end of a room that already finished keeps no state behind.
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut s = Sequencer::default();
        let _ = s.accept(session(WhipSessionEnded), &mut rng);
        assert!(s.rooms.is_empty());
    }
}
