//! HTTP-signaled sessions: a participant of the core with no WebSocket, a WHIP publisher or a
//! WHEP viewer. Either has one connection, offered by the client and answered by the core
//! (`publish_offer` → `publish_answer`; for a viewer that is its subscriber connection). Its
//! signaling events go to a task of the server that keeps nothing but the participant alive: it drains them, notices when the core removes the
//! participant, and ends the participant when the session's resource is deleted. However the
//! session ends, [`SfuHandle::disconnect`](crate::sfu::SfuHandle::disconnect) is called once
//! and the session leaves the registry.

use crate::http::AppState;
use crate::sfu::{EVENT_QUEUE, JoinRequest, SfuError};
use crate::signal::{ClientMessage, ErrorCode, LeaveReason, ServerMessage};
use rand::Rng as _;
use rand::distr::Alphanumeric;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::{Instrument, debug, info, info_span};

/// How long a session start waits for the core's answer to the offer.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Characters of a session id (≈ 143 bits: the session URL is its capability).
const ID_CHARS: usize = 24;

/// Which protocol a session speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// WHIP ingest: a publish-only participant.
    Whip,
    /// WHEP playback: a viewer.
    Whep,
}

impl Kind {
    /// The URL's first segment, and the name in messages.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Whip => "whip",
            Kind::Whep => "whep",
        }
    }

    /// The protocol's name in messages.
    pub fn title(self) -> &'static str {
        match self {
            Kind::Whip => "WHIP",
            Kind::Whep => "WHEP",
        }
    }

    /// The connection the client's offer (and trickled candidates) are for.
    pub fn target(self) -> crate::signal::PcTarget {
        match self {
            Kind::Whip => crate::signal::PcTarget::Publisher,
            Kind::Whep => crate::signal::PcTarget::Subscriber,
        }
    }
}

/// One session, as its HTTP resource sees it.
#[derive(Debug)]
pub struct Session {
    /// The resource's id (in its URL).
    pub id: String,
    pub kind: Kind,
    pub room: String,
    pub participant_id: String,
    /// The participant's display name.
    pub name: String,
    /// The session id (`SE_…`) in its log lines and webhook events.
    pub session_id: String,
    /// What an ICE restart changes; a `PATCH` holds it while it runs, so restarts (and the
    /// trickles around them) are applied one at a time.
    pub ice: tokio::sync::Mutex<IceState>,
    /// Ends the session (with this reason).
    stop: mpsc::Sender<String>,
    /// New offers for the participant's publisher connection (ICE restarts).
    offers: mpsc::Sender<OfferRequest>,
}

/// The session's current negotiation.
#[derive(Debug)]
pub struct IceState {
    /// The resource's entity tag, quoted (`"…"`); a new one after each ICE restart.
    pub etag: String,
    /// The client's ICE username fragment: a fragment naming another one is an ICE restart.
    pub remote_ufrag: Option<String>,
    /// The client's offer as last applied (an ICE restart applies it with new credentials).
    pub offer: String,
}

/// An offer for the session's task to pass to the core, and where its answer goes.
#[derive(Debug)]
struct OfferRequest {
    sdp: String,
    reply: oneshot::Sender<Result<String, StartError>>,
}

impl Session {
    /// Ask the session's task to end the participant (idempotent).
    pub fn stop(&self, reason: &str) {
        let _ = self.stop.try_send(reason.to_owned());
    }

    /// Apply a new offer on the publisher connection (an ICE restart); the core's answer.
    pub async fn renegotiate(&self, sdp: String) -> Result<String, StartError> {
        let (reply, answer) = oneshot::channel();
        let ask = async {
            self.offers
                .send(OfferRequest { sdp, reply })
                .await
                .map_err(|_| StartError::Join(SfuError::ShuttingDown))?;
            answer
                .await
                .map_err(|_| StartError::Join(SfuError::ShuttingDown))?
        };
        tokio::time::timeout(ANSWER_TIMEOUT, ask)
            .await
            .unwrap_or(Err(StartError::Timeout))
    }
}

/// The open sessions, by id.
#[derive(Debug, Clone, Default)]
#[allow(clippy::disallowed_types)] // signaling side: shared by the HTTP handlers, never on the packet path
pub struct Sessions(Arc<Mutex<HashMap<String, Arc<Session>>>>);

#[allow(clippy::disallowed_types)] // as above
impl Sessions {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Session>>> {
        // Every update is one map operation: a panic elsewhere leaves it consistent.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The session `id`, if open.
    pub fn get(&self, id: &str) -> Option<Arc<Session>> {
        self.map().get(id).cloned()
    }

    /// Take the session `id` out (the first of two `DELETE`s gets it).
    pub fn remove(&self, id: &str) -> Option<Arc<Session>> {
        self.map().remove(id)
    }

    /// Sessions open.
    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn insert(&self, session: Arc<Session>) {
        self.map().insert(session.id.clone(), session);
    }
}

/// Why a session could not start.
#[derive(Debug)]
pub enum StartError {
    /// The core refused the join (limits, shutting down, a bad name).
    Join(SfuError),
    /// The core refused the offer: its error code and message.
    Offer(ErrorCode, String),
    /// The core did not answer in time.
    Timeout,
}

/// What a started session hands back: the session and the core's answer.
#[derive(Debug)]
pub struct Started {
    pub session: Arc<Session>,
    pub answer: String,
    /// The session's first entity tag.
    pub etag: String,
}

/// A random id of [`ID_CHARS`] letters and digits.
pub fn random_id() -> String {
    rand::rng()
        .sample_iter(Alphanumeric)
        .take(ID_CHARS)
        .map(char::from)
        .collect()
}

/// A fresh entity tag, quoted.
pub fn new_etag() -> String {
    format!("\"{}\"", random_id())
}

/// Join `req` (its `events` are replaced by the session's own), send `offer` as the
/// participant's publisher offer and wait for the answer; then register the session and start
/// its task. On failure the participant (if it joined) is removed again.
pub async fn start(
    state: &AppState,
    kind: Kind,
    mut req: JoinRequest,
    offer: String,
    remote_ufrag: Option<String>,
) -> Result<Started, StartError> {
    let (events_tx, mut events) = mpsc::channel(EVENT_QUEUE);
    req.events = events_tx;
    let room = req.room.clone();
    let sid = req.session.clone();
    let name = req.name.clone();
    let handle = &state.handle;
    let accepted = handle.join(req).await.map_err(StartError::Join)?;
    let pid = accepted.participant_id;
    let answer = async {
        handle
            .client(&pid, ClientMessage::PublishOffer { sdp: offer.clone() })
            .await
            .map_err(StartError::Join)?;
        loop {
            match events.recv().await {
                Some(ServerMessage::PublishAnswer { sdp }) => return Ok(sdp),
                Some(ServerMessage::Error {
                    code,
                    message,
                    request,
                }) if request.as_deref() == Some("publish_offer") => {
                    return Err(StartError::Offer(code, message));
                }
                Some(ServerMessage::Leave { reason }) => {
                    return Err(StartError::Offer(ErrorCode::Unavailable, reason));
                }
                Some(_) => {}
                None => return Err(StartError::Join(SfuError::ShuttingDown)),
            }
        }
    };
    let answer = match tokio::time::timeout(ANSWER_TIMEOUT, answer).await {
        Ok(Ok(sdp)) => sdp,
        Ok(Err(e)) => {
            handle
                .disconnect(&pid, LeaveReason::Error, "offer refused")
                .await;
            return Err(e);
        }
        Err(_) => {
            handle
                .disconnect(&pid, LeaveReason::Error, "no answer in time")
                .await;
            return Err(StartError::Timeout);
        }
    };
    let (stop, stop_rx) = mpsc::channel(1);
    let (offers, offers_rx) = mpsc::channel(1);
    let etag = new_etag();
    let session = Arc::new(Session {
        id: random_id(),
        kind,
        room: room.clone(),
        participant_id: pid.clone(),
        name,
        session_id: sid.clone(),
        ice: tokio::sync::Mutex::new(IceState {
            etag: etag.clone(),
            remote_ufrag,
            offer,
        }),
        stop,
        offers,
    });
    state.whip.insert(Arc::clone(&session));
    hook(state, &session, true);
    let span = match kind {
        Kind::Whip => {
            info_span!("whip", session = %sid, participant = %pid, room = %room, resource = %session.id)
        }
        Kind::Whep => {
            info_span!("whep", session = %sid, participant = %pid, room = %room, resource = %session.id)
        }
    };
    let task = run(
        state.clone(),
        Arc::clone(&session),
        events,
        stop_rx,
        offers_rx,
    );
    tokio::spawn(task.instrument(span));
    Ok(Started {
        session,
        answer,
        etag,
    })
}

/// The session's task: drains the participant's events until the core removes it or the
/// session is stopped, and passes new offers (ICE restarts) to the core, handing back their
/// answers.
async fn run(
    state: AppState,
    session: Arc<Session>,
    mut events: mpsc::Receiver<ServerMessage>,
    mut stop: mpsc::Receiver<String>,
    mut offers: mpsc::Receiver<OfferRequest>,
) {
    // Held until the session ends, so the server can wait for every session on shutdown.
    let _session_guard = state.sessions.clone();
    info!(kind = session.kind.name(), "session started");
    let pid = session.participant_id.as_str();
    let mut removed_because: Option<String> = None;
    let mut pending: Option<oneshot::Sender<Result<String, StartError>>> = None;
    let reason = loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(ServerMessage::PublishAnswer { sdp }) => {
                    if let Some(reply) = pending.take() {
                        let _ = reply.send(Ok(sdp));
                    }
                }
                Some(ServerMessage::Error { code, message, request }) => {
                    debug!(?code, %message, ?request, "error from the core");
                    if request.as_deref() == Some("publish_offer") {
                        if let Some(reply) = pending.take() {
                            let _ = reply.send(Err(StartError::Offer(code, message)));
                        }
                    }
                }
                Some(ServerMessage::Leave { reason }) => removed_because = Some(reason),
                Some(_) => {}
                None => {
                    break removed_because
                        .take()
                        .map_or_else(|| "removed by the server".to_owned(), |r| format!("removed: {r}"));
                }
            },
            Some(request) = offers.recv() => {
                let msg = ClientMessage::PublishOffer { sdp: request.sdp };
                if state.handle.client(pid, msg).await.is_ok() {
                    pending = Some(request.reply);
                }
            }
            reason = stop.recv() => break reason.unwrap_or_else(|| "session ended".to_owned()),
        }
    };
    // The resource is gone with the participant (a `DELETE` already took it out).
    if state
        .whip
        .get(&session.id)
        .is_some_and(|s| Arc::ptr_eq(&s, &session))
    {
        state.whip.remove(&session.id);
    }
    info!(kind = session.kind.name(), %reason, "session ended");
    // The session's end goes out before the leave it causes (the webhook sequencer finishes
    // the room only when both are in, in either order).
    hook(&state, &session, false);
    // A `DELETE` (or the server removing it first: then this is a no-op).
    state
        .handle
        .disconnect(pid, LeaveReason::Left, &reason)
        .await;
}

/// The session's `whip_session_started`/`…_ended` (`whep_…`) webhook event.
fn hook(state: &AppState, session: &Session, started: bool) {
    let Some(w) = state.handle.webhooks() else {
        return;
    };
    use crate::webhook::{Event, EventKind, ParticipantRef};
    let kind = match (session.kind, started) {
        (Kind::Whip, true) => EventKind::WhipSessionStarted,
        (Kind::Whip, false) => EventKind::WhipSessionEnded,
        (Kind::Whep, true) => EventKind::WhepSessionStarted,
        (Kind::Whep, false) => EventKind::WhepSessionEnded,
    };
    w.emit(
        Event::new(kind, &session.room, std::time::SystemTime::now())
            .with_participant(ParticipantRef {
                id: session.participant_id.clone(),
                identity: None,
                name: session.name.clone(),
                session_id: session.session_id.clone(),
                hidden: session.kind == Kind::Whep,
            })
            .with_resource(&session.id),
    );
}
