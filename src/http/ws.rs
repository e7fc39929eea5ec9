//! The signaling WebSocket session at `/rtc`.
//!
//! A session has two phases:
//!
//! 1. **Before join** the session reads messages one by one and answers them itself: the first
//!    useful message must be `join` (validated here, then passed to the core); `ping` is
//!    answered with `pong`, `leave` closes the socket, anything else gets `invalid_state`.
//!    Errors never close the socket, so a client can fix its `join` and retry. Every decoded
//!    `join` first takes one from its client address's join bucket ([`ConnMeta::take_join`]:
//!    `max_joins_per_ip`, `join_burst_per_ip`), before its token is checked, so a flood of
//!    joins with bad tokens is held off the verifier too; over it the join gets
//!    `join_rate_limited` with a retry-after. The per-server caps (`max_rooms`,
//!    `max_participants_per_room`) are enforced where the join is placed
//!    ([`SfuHandle::join`]): `too_many_rooms`, `room_full`. Each refusal is counted under
//!    `http` in `/stats`.
//! 2. **After join** two halves run concurrently: the *reader* decodes client frames and
//!    passes them to the core ([`SfuHandle::client`]); the *writer* sends the core's events
//!    (from the participant's bounded event channel) and the reader's local replies (errors,
//!    `pong`). When the core closes the event channel (participant removed, shutdown), the
//!    writer sends a close frame. However the session ends, [`SfuHandle::disconnect`] is called
//!    exactly once.
//!
//! Size limits: text messages over `max_ws_message` get a `message_too_large` error and the
//! socket stays open. The WebSocket layer itself is configured with a higher hard limit
//! ([`hard_limit`]); a message beyond that cannot be skipped, so the connection is closed with
//! close code 1009 and a reason naming the limit. The WebSocket layer's buffers are small
//! ([`READ_BUFFER`], [`WRITE_BUFFER`]): an idle connection costs a few KiB, not 128 KiB.
//!
//! Time and rate limits (`Guards`), each closing the socket with a close frame whose reason
//! names the limit, and each counted in `/stats` (`http`) and `/metrics`:
//!
//! - **join timeout**: no accepted `join` within `join_timeout` → 1008 `join timeout: …`;
//! - **idle timeout** (after join): the server sends a WebSocket ping every third of
//!   `idle_timeout`; no frame at all from the client (a pong counts) for `idle_timeout` → 1001
//!   `idle timeout: …`. Browsers and tungstenite answer pings by themselves;
//! - **message timeout**: a message whose first bytes arrived but which is not complete within
//!   `message_timeout` → 1008 `message timeout: …` (known from the bytes the connection has
//!   read versus the bytes of the messages and control frames it yielded; needs the server's
//!   accept loop, [`super::serve`]);
//! - **message rate**: a token bucket (`ws_message_rate` per second, `ws_message_burst` at
//!   once) on every text or binary message, before and after join. A message over the rate is
//!   answered with `rate_limited` and dropped (not decoded, not passed to the core); the
//!   session stays open. A session rate limited without a pause of [`FLOOD_PAUSE`] for
//!   `flood_close_after` ([`FLOOD_CLOSE_AFTER`]) is closed: 1008 `message rate limit exceeded …`.

use super::AppState;
use super::limits::{ConnMeta, HttpCounters, TokenBucket};
use super::resume::{self, Handover, Replay};
use crate::auth::Verifier;
use crate::sfu::{EVENT_QUEUE, Grants, JoinAccepted, JoinRequest, SfuError, SfuHandle};
use crate::signal::{self, ClientMessage, ErrorCode, LeaveReason, PROTOCOL_VERSION, ServerMessage};
use axum::extract::ws::Utf8Bytes;
use axum::{
    Extension,
    extract::{
        ConnectInfo, State,
        ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code},
    },
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use futures_util::{
    SinkExt, StreamExt,
    stream::{SplitSink, SplitStream},
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, field, info, info_span};

/// Longest `room` / `name`, in characters.
pub const MAX_NAME_CHARS: usize = 128;
/// How long a session waits for its last frames (close handshake) to go out.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// After closing a connection whose client is still sending (a message beyond the hard limit
/// cannot be read), keep the socket this long before dropping it. Dropping a TCP socket with
/// unread data sends a reset, and a reset can make the client's kernel discard our close frame
/// (with its reason) before the client reads it.
const LINGER: Duration = Duration::from_millis(300);
/// Queue of replies the reader hands to the writer.
const LOCAL_QUEUE: usize = 64;
/// Most events written before one flush.
const WRITE_BATCH: usize = 64;
/// The WebSocket layer's read buffer (tungstenite's default is 128 KiB, allocated up front).
pub const READ_BUFFER: usize = 4 * 1024;
/// Bytes the WebSocket layer collects before writing (flushes write everything anyway).
pub const WRITE_BUFFER: usize = 8 * 1024;
/// Most bytes waiting to be written to one client before writes fail.
pub const MAX_WRITE_BUFFER: usize = 4 << 20;
/// A rate-limited session that has not paused for this long is still flooding.
pub const FLOOD_PAUSE: Duration = Duration::from_secs(1);
/// Default time a session may keep flooding before it is closed.
pub const FLOOD_CLOSE_AFTER: Duration = Duration::from_secs(10);
/// Bytes read but not yet explained by a complete message that do not count as "a message
/// started" (tolerance of the byte accounting).
const MESSAGE_SLACK: u64 = 256;
/// Wire size of a client control frame without its payload: 2-byte header and 4-byte mask.
const CONTROL_FRAME_OVERHEAD: u64 = 6;

type Sink = SplitSink<WebSocket, Message>;
type Stream = SplitStream<WebSocket>;

/// The WebSocket layer's own limit for a message or frame: `max_ws_message` plus a quarter and
/// 1 KiB. Messages between the two limits are read and refused politely; beyond this one the
/// connection fails (close code 1009).
pub fn hard_limit(max_ws_message: usize) -> usize {
    max_ws_message
        .saturating_add(max_ws_message / 4)
        .saturating_add(1024)
}

/// `GET /rtc`.
pub(crate) async fn upgrade(
    ws: WebSocketUpgrade,
    State(state): State<AppState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    conn: Option<Extension<ConnMeta>>,
) -> Response {
    let conn = conn.map(|Extension(c)| c);
    if conn.as_ref().is_some_and(ConnMeta::is_reserve) {
        // Past the connection cap: this connection serves monitoring, not sessions.
        HttpCounters::inc(&state.counters.websocket_refused);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, super::serve::RETRY_AFTER_S.to_string())],
            "too many connections: try again later\n",
        )
            .into_response();
    }
    let hard = hard_limit(state.settings.max_ws_message);
    let peer = peer.map(|Extension(ConnectInfo(addr))| addr);
    ws.max_message_size(hard)
        .max_frame_size(hard)
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(MAX_WRITE_BUFFER)
        .on_failed_upgrade(move |e| debug!(?peer, error = %e, "websocket upgrade failed"))
        .on_upgrade(move |socket| {
            // A resume records the resumed session's id over this one.
            let sid = signal::new_session_id();
            let span = info_span!(
                "ws",
                session = %sid,
                peer = field::display(peer.map_or_else(|| "-".to_owned(), |p| p.to_string())),
                participant = field::Empty,
                room = field::Empty
            );
            session(socket, state, conn, sid).instrument(span)
        })
}

/// What the reader hands to the writer.
#[derive(Debug)]
enum Out {
    Msg(ServerMessage),
    /// An already encoded frame (the `rate_limited` reply, sent once per dropped message).
    Frame(Message),
    Close(u16, String),
}

/// Why [`Guards`] ends a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    Join,
    Idle,
    Message,
    Flood,
}

/// The session's time and rate limits (see the module docs).
struct Guards {
    settings: Arc<super::HttpSettings>,
    counters: Arc<super::HttpCounters>,
    bucket: TokenBucket,
    /// Bytes read by the connection (`None` without the server's accept loop).
    bytes_read: Option<Arc<AtomicU64>>,
    /// Bytes explained by complete messages and control frames.
    accounted: u64,
    /// Since when bytes of an incomplete message have been waiting.
    pending_since: Option<Instant>,
    join_deadline: Instant,
    joined: bool,
    last_frame: Instant,
    limited_since: Option<Instant>,
    last_limited: Instant,
    rate_limited_text: Option<axum::extract::ws::Utf8Bytes>,
}

/// What [`Guards::admit`] says about one message.
enum Admit {
    Pass,
    /// Over the rate: answer `rate_limited`, drop it.
    Limited,
    /// Over the rate for too long: close.
    Close,
}

impl Guards {
    fn new(state: &AppState, conn: Option<&ConnMeta>) -> Self {
        let now = Instant::now();
        let settings = Arc::clone(&state.settings);
        let bytes_read = conn.map(ConnMeta::byte_counter);
        Guards {
            bucket: TokenBucket::new(settings.ws_message_rate, settings.ws_message_burst, now),
            accounted: bytes_read.as_ref().map_or(0, |b| b.load(Relaxed)),
            bytes_read,
            pending_since: None,
            join_deadline: now + settings.join_timeout,
            joined: false,
            last_frame: now,
            limited_since: None,
            last_limited: now,
            rate_limited_text: None,
            counters: Arc::clone(&state.counters),
            settings,
        }
    }

    /// How often [`Guards::check`] runs.
    fn tick(&self) -> Duration {
        let s = &self.settings;
        (s.join_timeout.min(s.idle_timeout).min(s.message_timeout) / 4)
            .clamp(Duration::from_millis(5), Duration::from_secs(1))
    }

    /// Account for one frame the WebSocket layer yielded.
    fn on_frame(&mut self, msg: &Message) {
        self.last_frame = Instant::now();
        let Some(read) = &self.bytes_read else { return };
        match msg {
            Message::Ping(p) | Message::Pong(p) => {
                self.accounted += CONTROL_FRAME_OVERHEAD + p.len() as u64;
            }
            _ => self.accounted = read.load(Relaxed),
        }
    }

    /// The time limits, checked every [`Guards::tick`].
    fn check(&mut self, now: Instant) -> Option<Expiry> {
        if !self.joined && now >= self.join_deadline {
            return Some(Expiry::Join);
        }
        if self.joined && now.duration_since(self.last_frame) >= self.settings.idle_timeout {
            return Some(Expiry::Idle);
        }
        if let Some(read) = &self.bytes_read {
            let pending = read.load(Relaxed).saturating_sub(self.accounted);
            if pending > MESSAGE_SLACK {
                let since = *self.pending_since.get_or_insert(now);
                if now.duration_since(since) >= self.settings.message_timeout {
                    return Some(Expiry::Message);
                }
            } else {
                self.pending_since = None;
            }
        }
        None
    }

    /// The rate limit, for every text or binary message.
    fn admit(&mut self, now: Instant) -> Admit {
        if self.bucket.take(now) {
            return Admit::Pass;
        }
        HttpCounters::inc(&self.counters.rate_limited_messages);
        if self.limited_since.is_none() || now.duration_since(self.last_limited) >= FLOOD_PAUSE {
            self.limited_since = Some(now);
        }
        self.last_limited = now;
        match self.limited_since {
            Some(t) if now.duration_since(t) >= self.settings.flood_close_after => Admit::Close,
            _ => Admit::Limited,
        }
    }

    /// The `rate_limited` reply, encoded once per session (a flood gets one per message).
    fn rate_limited(&mut self) -> Message {
        let settings = &self.settings;
        let text = self.rate_limited_text.get_or_insert_with(|| {
            let msg = ServerMessage::error(
                ErrorCode::RateLimited,
                format!(
                    "more than {} messages per second (bursts of {}): message dropped",
                    settings.ws_message_rate, settings.ws_message_burst
                ),
                None,
            );
            signal::encode_server(&msg).into()
        });
        Message::Text(text.clone())
    }

    /// Counts the expiry; returns the close code and reason, and whether the client may
    /// still be sending (linger before dropping the socket).
    fn close_for(&self, why: Expiry) -> (u16, String, bool) {
        let s = &self.settings;
        let c = &self.counters;
        let secs = |d: Duration| d.as_secs_f64();
        match why {
            Expiry::Join => {
                HttpCounters::inc(&c.join_timeouts);
                let reason = format!("join timeout: no join within {} s", secs(s.join_timeout));
                (close_code::POLICY, reason, false)
            }
            Expiry::Idle => {
                HttpCounters::inc(&c.idle_timeouts);
                let reason = format!(
                    "idle timeout: nothing received for {} s",
                    secs(s.idle_timeout)
                );
                (close_code::AWAY, reason, false)
            }
            Expiry::Message => {
                HttpCounters::inc(&c.message_timeouts);
                let reason = format!(
                    "message timeout: a message took longer than {} s",
                    secs(s.message_timeout)
                );
                (close_code::POLICY, reason, true)
            }
            Expiry::Flood => {
                HttpCounters::inc(&c.rate_limit_closes);
                let reason = format!(
                    "message rate limit exceeded for {} s",
                    secs(s.flood_close_after)
                );
                (close_code::POLICY, reason, true)
            }
        }
    }
}

/// Counts an open WebSocket while alive.
struct OpenGuard(Arc<super::HttpCounters>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.websockets_open.fetch_sub(1, Relaxed);
    }
}

/// One WebSocket session, from upgrade to close.
async fn session(socket: WebSocket, state: AppState, conn: Option<ConnMeta>, mut sid: String) {
    // Held until the session ends, so the server can wait for every session on shutdown.
    let _session_guard = state.sessions.clone();
    state.counters.websockets_open.fetch_add(1, Relaxed);
    let _open = OpenGuard(Arc::clone(&state.counters));
    let mut guards = Guards::new(&state, conn.as_ref());
    // When the accepted `join` arrived (its `joined` being sent is the end of the join time).
    let mut join_received = None;
    // The connection's slot (per-address and total caps) is held until the socket closes.
    let _conn = conn;
    let limit = state.settings.max_ws_message;
    let (mut sink, mut stream) = socket.split();
    let mut shutdown = state.shutdown.clone();
    debug!("websocket session started");

    let Some(start) = wait_for_join(
        &mut sink,
        &mut stream,
        &state,
        &mut shutdown,
        &mut guards,
        _conn.as_ref(),
        &sid,
    )
    .await
    else {
        debug!("websocket session ended before join");
        return;
    };
    let registry = &state.resumable;
    let grace = state.settings.resume_grace;
    let span = tracing::Span::current();
    guards.joined = true;
    guards.last_frame = Instant::now();
    // The participant's session: its events, what it sent, and where a resume claims it.
    let (pid, mut events, mut replay, mut claims, generation, first) = match start {
        Start::Joined {
            accepted,
            room,
            events,
            received,
        } => {
            join_received = Some(received);
            span.record("participant", field::display(&accepted.participant_id));
            span.record("room", field::display(&room));
            info!("participant joined");
            let pid = accepted.participant_id;
            let (token, claims) = registry.register(&pid, &room);
            // The ICE servers (TURN credentials for this participant) are added here, not by
            // the core.
            let mut joined = state.settings.ice.add_to_joined(
                accepted.joined,
                &pid,
                std::time::SystemTime::now(),
            );
            if let ServerMessage::Joined {
                resume_token,
                resume_grace_ms,
                node_id,
                ..
            } = &mut joined
            {
                *node_id = state.cluster.as_ref().map(|c| c.node_id().to_owned());
                if !grace.is_zero() {
                    *resume_token = Some(token);
                    *resume_grace_ms = u64::try_from(grace.as_millis()).ok();
                }
            }
            let mut replay = if grace.is_zero() {
                Replay::numbering_only()
            } else {
                Replay::default()
            };
            let first = vec![numbered(&mut replay, &joined)];
            (pid, events, replay, claims, 0, first)
        }
        Start::Resumed {
            participant_id,
            room,
            handover,
            generation,
            claims,
            missed,
        } => {
            span.record("participant", field::display(&participant_id));
            span.record("room", field::display(&room));
            info!(replayed = missed.len(), resumed_session = %handover.session, connection_session = %sid, "participant resumed");
            span.record("session", field::display(&handover.session));
            sid = handover.session.clone();
            HttpCounters::inc(&state.counters.sessions_resumed);
            let resumed = ServerMessage::Resumed {
                participant_id: participant_id.clone(),
                room,
                replayed: missed.len() as u64,
                session_id: Some(sid.clone()),
            };
            let mut first = vec![text_frame(&resumed)];
            first.extend(missed.into_iter().map(Message::Text));
            (
                participant_id,
                handover.events,
                handover.replay,
                claims,
                generation,
                first,
            )
        }
    };
    let mut sent = true;
    for frame in first {
        if sink.feed(frame).await.is_err() {
            sent = false;
            break;
        }
    }
    let end = if sent && sink.flush().await.is_ok() {
        if let Some(received) = join_received {
            state.join_time.record(received.elapsed());
        }
        run_joined(
            &mut sink,
            &mut stream,
            &state.handle,
            &pid,
            Session {
                events: &mut events,
                replay: &mut replay,
                claims: &mut claims,
            },
            limit,
            &mut guards,
        )
        .await
    } else {
        JoinedEnd::Ended {
            reason: "socket closed before the session started".to_owned(),
            resumable: true,
        }
    };
    let (reason, resumable) = match end {
        JoinedEnd::Claimed(claim) => {
            info!("session taken over by a resuming connection");
            close(
                &mut sink,
                close_code::AWAY,
                "session resumed on another connection",
            )
            .await;
            let _ = claim.send(Handover {
                events,
                replay,
                session: sid,
            });
            return;
        }
        JoinedEnd::Ended { reason, resumable } => (reason, resumable),
    };
    if resumable && !grace.is_zero() {
        info!(%reason, "connection lost; the participant waits for a resume");
        drop(sink);
        drop(stream);
        match resume::park(&mut events, &mut replay, &mut claims, grace).await {
            resume::ParkEnd::Claimed(claim) => {
                let _ = claim.send(Handover {
                    events,
                    replay,
                    session: sid,
                });
                return;
            }
            resume::ParkEnd::Expired => {
                HttpCounters::inc(&state.counters.resume_expired);
                registry.forget(&pid, generation);
                let reason = format!("did not resume within {} s ({reason})", grace.as_secs_f32());
                info!(%reason, "participant session ended");
                state
                    .handle
                    .disconnect(&pid, LeaveReason::Disconnected, &reason)
                    .await;
                return;
            }
            resume::ParkEnd::Closed => {
                registry.forget(&pid, generation);
                info!("participant removed while waiting for a resume");
                state
                    .handle
                    .disconnect(&pid, LeaveReason::Removed, "removed while disconnected")
                    .await;
                return;
            }
        }
    }
    registry.forget(&pid, generation);
    info!(%reason, "participant session ended");
    // A close frame (or `leave`) is a leave; a lost connection without a grace period to
    // resume in is a disconnection.
    let why = if resumable {
        LeaveReason::Disconnected
    } else {
        LeaveReason::Left
    };
    state.handle.disconnect(&pid, why, &reason).await;
}

/// How a session starts: a new participant, or one resumed.
enum Start {
    Joined {
        accepted: JoinAccepted,
        room: String,
        events: mpsc::Receiver<ServerMessage>,
        /// When its `join` arrived.
        received: Instant,
    },
    Resumed {
        participant_id: String,
        room: String,
        handover: Handover,
        generation: u64,
        claims: mpsc::Receiver<resume::Claim>,
        /// The messages the client did not get, to send after `resumed`.
        missed: Vec<Utf8Bytes>,
    },
}

/// What a joined session holds across its connections.
struct Session<'a> {
    events: &'a mut mpsc::Receiver<ServerMessage>,
    replay: &'a mut Replay,
    claims: &'a mut mpsc::Receiver<resume::Claim>,
}

/// How the joined phase ended.
enum JoinedEnd {
    /// The connection is done; `resumable`: it dropped (no close frame, a read or write
    /// failure, the idle timeout), so the participant may come back with `resume`.
    Ended { reason: String, resumable: bool },
    /// A resuming connection claimed the session.
    Claimed(resume::Claim),
}

/// Phase 1: answer messages until a join is accepted. `None` when the socket ended first.
/// `conn` (the server's accept loop) holds the per-address join rate.
async fn wait_for_join(
    sink: &mut Sink,
    stream: &mut Stream,
    state: &AppState,
    shutdown: &mut watch::Receiver<bool>,
    guards: &mut Guards,
    conn: Option<&ConnMeta>,
    sid: &str,
) -> Option<Start> {
    let limit = state.settings.max_ws_message;
    let handle = &state.handle;
    let mut ticker = tokio::time::interval(guards.tick());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let item = tokio::select! {
            item = stream.next() => item,
            () = wait_shutdown(shutdown) => {
                close(sink, close_code::AWAY, "server shutting down").await;
                return None;
            }
            now = ticker.tick() => {
                if let Some(why) = guards.check(now.into_std()) {
                    let (code, reason, linger) = guards.close_for(why);
                    debug!(%reason, "closing before join");
                    close(sink, code, &reason).await;
                    if linger {
                        tokio::time::sleep(LINGER).await;
                    }
                    return None;
                }
                continue;
            }
        };
        if let Some(Ok(frame)) = &item {
            guards.on_frame(frame);
            if matches!(frame, Message::Text(_) | Message::Binary(_)) {
                match guards.admit(Instant::now()) {
                    Admit::Pass => {}
                    Admit::Limited => {
                        if sink.send(guards.rate_limited()).await.is_err() {
                            return None;
                        }
                        continue;
                    }
                    Admit::Close => {
                        let (code, reason, _) = guards.close_for(Expiry::Flood);
                        close(sink, code, &reason).await;
                        tokio::time::sleep(LINGER).await;
                        return None;
                    }
                }
            }
        }
        let text = match item {
            None => return None,
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Binary(_))) => {
                if !send_msg(sink, &binary_error()).await {
                    return None;
                }
                continue;
            }
            // Pings are answered by the WebSocket layer; after a close frame the next read
            // completes the handshake and yields `None`.
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                if let Some((code, reason)) = read_error_close(&e, limit) {
                    if code == close_code::SIZE {
                        HttpCounters::inc(&guards.counters.oversize_closes);
                    }
                    close(sink, code, &reason).await;
                    tokio::time::sleep(LINGER).await;
                }
                debug!(error = %e, "websocket read failed before join");
                return None;
            }
        };
        let received = Instant::now();
        let msg = match check_text(&text, limit) {
            Ok(msg) => msg,
            Err(reply) => {
                if !send_msg(sink, &reply).await {
                    return None;
                }
                continue;
            }
        };
        // Every decoded `join` takes one from its address's join bucket, before its token is
        // checked: a flood of joins with bad tokens is held off the verifier too.
        let over_rate = match (&msg, conn) {
            (ClientMessage::Join { .. } | ClientMessage::Resume { .. }, Some(c)) => {
                c.take_join(Instant::now()).err()
            }
            _ => None,
        };
        let reply = match msg {
            ClientMessage::Join { .. } | ClientMessage::Resume { .. } if over_rate.is_some() => {
                join_rate_limited(conn, over_rate.unwrap_or_default())
            }
            ClientMessage::Resume {
                participant_id,
                resume_token,
                received,
            } => {
                let refused = match state.resumable.claim(&participant_id, &resume_token).await {
                    Err(e) => e,
                    Ok((handover, room, generation, claims)) => {
                        match handover.replay.since(received) {
                            Some(missed) => {
                                return Some(Start::Resumed {
                                    participant_id,
                                    room,
                                    handover,
                                    generation,
                                    claims,
                                    missed,
                                });
                            }
                            None => {
                                // What it missed is gone: the participant cannot go on.
                                state.resumable.forget(&participant_id, generation);
                                drop(handover);
                                state
                                    .handle
                                    .disconnect(
                                        &participant_id,
                                        LeaveReason::Error,
                                        "resume failed: missed messages are gone",
                                    )
                                    .await;
                                resume::ResumeError::TooOld(received)
                            }
                        }
                    }
                };
                debug!(error = %refused, "resume refused");
                HttpCounters::inc(&guards.counters.resumes_refused);
                ServerMessage::error(ErrorCode::ResumeFailed, refused.to_string(), Some("resume"))
            }
            ClientMessage::Join {
                room,
                name,
                protocol,
                auto_subscribe,
                token,
                timeline_events,
            } => match validate_join(
                &guards.settings.verifier,
                &guards.counters,
                token.as_deref(),
                &room,
                &name,
                protocol,
            ) {
                Err(reply) => *reply,
                Ok(admitted) => {
                    let room = admitted.room;
                    // In a cluster, the room may live on another node: the client goes there
                    // (or, for a room extended to every node, it is served here).
                    let placed = match &state.cluster {
                        Some(cluster) => cluster.place(&room, handle.local_load(&room)).await,
                        None => crate::cluster::Placed::Here,
                    };
                    let home = match &placed {
                        crate::cluster::Placed::Extended { entry, .. } => Some(*entry),
                        _ => None,
                    };
                    if let crate::cluster::Placed::Elsewhere { node_id, address } = placed {
                        debug!(%room, node = %node_id, %address, "join redirected to the room's node");
                        let redirect = ServerMessage::Redirect {
                            room,
                            node_id,
                            address,
                        };
                        if send_msg(sink, &redirect).await {
                            close(sink, close_code::NORMAL, "redirected").await;
                        }
                        return None;
                    }
                    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
                    let req = JoinRequest {
                        room: room.clone(),
                        name: admitted.name,
                        auto_subscribe: auto_subscribe.unwrap_or(true),
                        events: events_tx,
                        // Filled in by the handle from where the room is placed.
                        peers: Vec::new(),
                        identity: Some(admitted.identity),
                        grants: admitted.grants,
                        publish_only: false,
                        view: None,
                        home,
                        timeline: crate::sfu::JoinTimeline {
                            events: timeline_events.unwrap_or(false),
                            input_tick_hz: admitted.input_tick_hz,
                        },
                        session: sid.to_owned(),
                    };
                    match handle.join(req).await {
                        Ok(accepted) => {
                            // A room past the cluster's threshold is extended to the other
                            // nodes from now on.
                            if let Some(cluster) = &state.cluster {
                                cluster.note_room_size(&room, handle.room_size(&room)).await;
                            }
                            return Some(Start::Joined {
                                accepted,
                                room,
                                events: events_rx,
                                received,
                            });
                        }
                        Err(e) => {
                            debug!(error = %e, %room, "join refused");
                            match e {
                                SfuError::TooManyRooms(_) => {
                                    HttpCounters::inc(&guards.counters.joins_refused_rooms);
                                }
                                SfuError::RoomFull(_) => {
                                    HttpCounters::inc(&guards.counters.joins_refused_room_full);
                                }
                                _ => {}
                            }
                            let fatal = matches!(e, SfuError::ShuttingDown);
                            let reply = join_error(&e);
                            if fatal {
                                send_msg(sink, &reply).await;
                                close(sink, close_code::AWAY, "server shutting down").await;
                                return None;
                            }
                            reply
                        }
                    }
                }
            },
            ClientMessage::Ping { ts } => ServerMessage::pong(ts, std::time::SystemTime::now()),
            ClientMessage::Leave => {
                close(sink, close_code::NORMAL, "left").await;
                return None;
            }
            other => ServerMessage::error(
                ErrorCode::InvalidState,
                format!(
                    "`{}` needs a joined session: send `join` first",
                    kind(&other)
                ),
                Some(kind(&other)),
            ),
        };
        if !send_msg(sink, &reply).await {
            return None;
        }
    }
}

/// Resolves when the shutdown flag is set (or its sender is gone).
async fn wait_shutdown(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// How the reader ended.
struct ReaderEnd {
    reason: String,
    /// The reader queued a final frame for the writer: let it go out before returning.
    flush_writer: bool,
    /// The client may still be sending: wait [`LINGER`] before dropping the socket.
    linger: bool,
    /// The connection dropped (no close frame, a read failure, the idle timeout): the
    /// participant may resume.
    resumable: bool,
}

/// Phase 2: reader and writer run concurrently until either ends, or a resuming connection
/// claims the session.
async fn run_joined(
    sink: &mut Sink,
    stream: &mut Stream,
    handle: &SfuHandle,
    pid: &str,
    session: Session<'_>,
    limit: usize,
    guards: &mut Guards,
) -> JoinedEnd {
    let Session {
        events,
        replay,
        claims,
    } = session;
    let (local_tx, local_rx) = mpsc::channel(LOCAL_QUEUE);
    let ping_every = guards.settings.idle_timeout / 3;
    let writer_ended = {
        let reader = read_loop(stream, local_tx, handle, pid, limit, guards);
        let writer = write_loop(sink, events, replay, local_rx, ping_every);
        tokio::pin!(reader, writer);
        tokio::select! {
            end = &mut reader => {
                if end.flush_writer {
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, &mut writer).await;
                }
                if end.linger {
                    tokio::time::sleep(LINGER).await;
                }
                return JoinedEnd::Ended {
                    reason: end.reason,
                    resumable: end.resumable,
                };
            }
            end = &mut writer => end,
            Some(claim) = claims.recv() => return JoinedEnd::Claimed(claim),
        }
    };
    // The writer sent a close frame (or the socket failed): read until the client's close
    // reply so the handshake completes, but not forever.
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
    writer_ended
}

async fn read_loop(
    stream: &mut Stream,
    local: mpsc::Sender<Out>,
    handle: &SfuHandle,
    pid: &str,
    limit: usize,
    guards: &mut Guards,
) -> ReaderEnd {
    let mut ticker = tokio::time::interval(guards.tick());
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut saw_close = false;
    loop {
        let item = tokio::select! {
            item = stream.next() => match item {
                Some(item) => item,
                None => break,
            },
            now = ticker.tick() => {
                let Some(why) = guards.check(now.into_std()) else { continue };
                let (code, reason, linger) = guards.close_for(why);
                debug!(%reason, "closing");
                let flush_writer = local.send(Out::Close(code, reason.clone())).await.is_ok();
                return ReaderEnd {
                    reason,
                    flush_writer,
                    linger,
                    resumable: why == Expiry::Idle,
                };
            }
        };
        if let Ok(frame) = &item {
            guards.on_frame(frame);
            if matches!(frame, Message::Text(_) | Message::Binary(_)) {
                match guards.admit(Instant::now()) {
                    Admit::Pass => {}
                    Admit::Limited => {
                        if local.send(Out::Frame(guards.rate_limited())).await.is_err() {
                            break;
                        }
                        continue;
                    }
                    Admit::Close => {
                        let (code, reason, _) = guards.close_for(Expiry::Flood);
                        let flush_writer =
                            local.send(Out::Close(code, reason.clone())).await.is_ok();
                        return ReaderEnd {
                            reason,
                            flush_writer,
                            linger: true,
                            resumable: false,
                        };
                    }
                }
            }
        }
        let text = match item {
            Ok(Message::Text(text)) => text,
            Ok(Message::Binary(_)) => {
                let _ = local.send(Out::Msg(binary_error())).await;
                continue;
            }
            Ok(Message::Close(frame)) => {
                debug!(?frame, "client sent close");
                saw_close = true;
                continue;
            }
            Ok(_) => continue,
            Err(e) => {
                debug!(error = %e, "websocket read failed");
                let flush_writer = match read_error_close(&e, limit) {
                    Some((code, reason)) => {
                        if code == close_code::SIZE {
                            HttpCounters::inc(&guards.counters.oversize_closes);
                        }
                        local.send(Out::Close(code, reason)).await.is_ok()
                    }
                    None => false,
                };
                return ReaderEnd {
                    reason: format!("websocket read failed: {e}"),
                    flush_writer,
                    linger: flush_writer,
                    resumable: !flush_writer,
                };
            }
        };
        let reply = match check_text(&text, limit) {
            Err(reply) => *reply,
            Ok(ClientMessage::Ping { ts }) => ServerMessage::pong(ts, std::time::SystemTime::now()),
            Ok(ClientMessage::Join { .. }) => ServerMessage::error(
                ErrorCode::InvalidState,
                "already joined: one session per connection",
                Some("join"),
            ),
            Ok(ClientMessage::Resume { .. }) => ServerMessage::error(
                ErrorCode::InvalidState,
                "already joined: `resume` must be the first message of a new connection",
                Some("resume"),
            ),
            Ok(ClientMessage::IceRestart { target }) => {
                // Fresh TURN credentials first (the client sets them before it negotiates the
                // restart), then the core restarts what it offers on.
                let ice = &guards.settings.ice;
                if !ice.is_empty() {
                    let ice_servers = ice.ice_servers(pid, std::time::SystemTime::now());
                    if local
                        .send(Out::Msg(ServerMessage::IceServers { ice_servers }))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                match handle
                    .client(pid, ClientMessage::IceRestart { target })
                    .await
                {
                    Ok(()) => continue,
                    Err(_) => ServerMessage::error(
                        ErrorCode::Unavailable,
                        "the server is shutting down",
                        Some("ice_restart"),
                    ),
                }
            }
            Ok(ClientMessage::Leave) => {
                let _ = handle.client(pid, ClientMessage::Leave).await;
                let flush_writer = local
                    .send(Out::Close(close_code::NORMAL, "left".to_owned()))
                    .await
                    .is_ok();
                return ReaderEnd {
                    reason: "client left".to_owned(),
                    flush_writer,
                    linger: false,
                    resumable: false,
                };
            }
            Ok(msg) => {
                let request = kind(&msg);
                if handle.client(pid, msg).await.is_ok() {
                    continue;
                }
                debug!(request, "core is gone");
                let _ = local
                    .send(Out::Msg(ServerMessage::error(
                        ErrorCode::Unavailable,
                        "the server is shutting down",
                        Some(request),
                    )))
                    .await;
                let flush_writer = local
                    .send(Out::Close(
                        close_code::AWAY,
                        "server shutting down".to_owned(),
                    ))
                    .await
                    .is_ok();
                return ReaderEnd {
                    reason: "the core is gone".to_owned(),
                    flush_writer,
                    linger: false,
                    resumable: false,
                };
            }
        };
        if local.send(Out::Msg(reply)).await.is_err() {
            break;
        }
    }
    ReaderEnd {
        reason: if saw_close {
            "client closed the connection".to_owned()
        } else {
            "connection dropped (no close frame)".to_owned()
        },
        flush_writer: false,
        linger: false,
        resumable: !saw_close,
    }
}

/// Sends the core's events and the reader's replies, each numbered in `replay` first (so a
/// frame lost with the connection is sent again on resume); returns why it stopped.
async fn write_loop(
    sink: &mut Sink,
    events: &mut mpsc::Receiver<ServerMessage>,
    replay: &mut Replay,
    mut local: mpsc::Receiver<Out>,
    ping_every: Duration,
) -> JoinedEnd {
    let failed = || JoinedEnd::Ended {
        reason: "websocket write failed".to_owned(),
        resumable: true,
    };
    let closed = |reason: &str| JoinedEnd::Ended {
        reason: format!("closed by server: {reason}"),
        resumable: false,
    };
    let mut local_open = true;
    // Keeps the client sending (its pongs) so a dead connection is noticed (idle timeout).
    let mut pings = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The reason of the last `leave` the core sent, used for the close frame.
    let mut leave_reason: Option<String> = None;
    loop {
        let out = tokio::select! {
            biased;
            out = local.recv(), if local_open => match out {
                Some(out) => out,
                None => {
                    local_open = false;
                    continue;
                }
            },
            event = events.recv() => match event {
                Some(msg) => Out::Msg(msg),
                None => Out::Close(
                    close_code::NORMAL,
                    leave_reason.take().unwrap_or_else(|| "session ended".to_owned()),
                ),
            },
            _ = pings.tick() => {
                if sink.send(Message::Ping(Default::default())).await.is_err() {
                    return failed();
                }
                continue;
            }
        };
        let first = match out {
            Out::Msg(msg) => {
                note_leave(&msg, &mut leave_reason);
                numbered(replay, &msg)
            }
            Out::Frame(frame) => numbered_frame(replay, frame),
            Out::Close(code, reason) => {
                close(sink, code, &reason).await;
                return closed(&reason);
            }
        };
        if sink.feed(first).await.is_err() {
            return failed();
        }
        // Batch the reader's other replies (a flood's `rate_limited` answers)...
        let mut close_after: Option<(u16, String)> = None;
        for _ in 0..WRITE_BATCH {
            let frame = match local.try_recv() {
                Ok(Out::Msg(msg)) => numbered(replay, &msg),
                Ok(Out::Frame(frame)) => numbered_frame(replay, frame),
                Ok(Out::Close(code, reason)) => {
                    close_after = Some((code, reason));
                    break;
                }
                Err(_) => break,
            };
            if sink.feed(frame).await.is_err() {
                return failed();
            }
        }
        if let Some((code, reason)) = close_after {
            let _ = sink.flush().await;
            close(sink, code, &reason).await;
            return closed(&reason);
        }
        // ...and whatever else the core has ready, then flush once.
        for _ in 0..WRITE_BATCH {
            let Ok(msg) = events.try_recv() else { break };
            note_leave(&msg, &mut leave_reason);
            if sink.feed(numbered(replay, &msg)).await.is_err() {
                return failed();
            }
        }
        if sink.flush().await.is_err() {
            return failed();
        }
    }
}

/// The frame of `msg`, numbered and kept in `replay`.
fn numbered(replay: &mut Replay, msg: &ServerMessage) -> Message {
    Message::Text(replay.push_message(msg))
}

/// An encoded text frame, numbered and kept in `replay` (other frames are not messages).
fn numbered_frame(replay: &mut Replay, frame: Message) -> Message {
    if let Message::Text(text) = &frame {
        replay.push(text.clone());
    }
    frame
}

fn note_leave(msg: &ServerMessage, leave_reason: &mut Option<String>) {
    if let ServerMessage::Leave { reason } = msg {
        *leave_reason = Some(reason.clone());
    }
}

fn text_frame(msg: &ServerMessage) -> Message {
    Message::Text(signal::encode_server(msg).into())
}

/// Send one message; `false` when the socket is gone.
async fn send_msg(sink: &mut Sink, msg: &ServerMessage) -> bool {
    sink.send(text_frame(msg)).await.is_ok()
}

/// Send a close frame (best effort). The reason is cut to the 123 bytes a close frame holds.
async fn close(sink: &mut Sink, code: u16, reason: &str) {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let frame = CloseFrame {
        code,
        reason: reason[..end].into(),
    };
    let _ = sink.send(Message::Close(Some(frame))).await;
}

/// Size check and decoding of one text message; `Err` is the error reply.
pub fn check_text(text: &str, limit: usize) -> Result<ClientMessage, Box<ServerMessage>> {
    if text.len() > limit {
        return Err(Box::new(ServerMessage::error(
            ErrorCode::MessageTooLarge,
            format!(
                "message of {} bytes exceeds the limit of {limit} bytes",
                text.len()
            ),
            None,
        )));
    }
    signal::decode_client(text).map_err(|e| {
        Box::new(ServerMessage::error(
            e.code(),
            e.to_string(),
            e.request_type(),
        ))
    })
}

fn binary_error() -> ServerMessage {
    ServerMessage::error(
        ErrorCode::MalformedMessage,
        "binary frames are not part of the protocol: send JSON text",
        None,
    )
}

/// Close code and reason for a failed read: 1009 for a message beyond the hard limit,
/// 1002/1007 for protocol and UTF-8 violations, nothing for I/O errors.
fn read_error_close(e: &axum::Error, limit: usize) -> Option<(u16, String)> {
    // axum wraps tungstenite's error; its text is the only stable handle we have.
    let text = e.to_string();
    if text.contains("without closing handshake") {
        // The connection dropped (a reset): nothing can be sent, and the client may resume.
        None
    } else if text.contains("Space limit exceeded") || text.contains("too long") {
        Some((
            close_code::SIZE,
            format!("message too large: the limit is {limit} bytes"),
        ))
    } else if text.contains("UTF-8") {
        Some((
            close_code::INVALID,
            "invalid UTF-8 in text frame".to_owned(),
        ))
    } else if text.contains("protocol error") {
        Some((close_code::PROTOCOL, "websocket protocol error".to_owned()))
    } else {
        None
    }
}

/// A join whose token verified: where, as whom, with what grants.
#[derive(Debug)]
struct Admitted {
    room: String,
    name: String,
    identity: String,
    grants: Grants,
    /// The token's room setting (`roomConfig.input_tick_hz`).
    input_tick_hz: Option<u32>,
}

/// Check a join: its access token first (before anything else: a join without a valid token
/// learns nothing more), then the protocol version, the room (the join's must be the token's;
/// an empty one takes the token's) and the display name (the token's, else the join's, else
/// the identity). Trimmed values on success.
fn validate_join(
    verifier: &Verifier,
    counters: &HttpCounters,
    token: Option<&str>,
    room: &str,
    name: &str,
    protocol: Option<u32>,
) -> Result<Admitted, Box<ServerMessage>> {
    let room = room.trim();
    let verified = verifier
        .verify(token, (!room.is_empty()).then_some(room))
        .map_err(|e| {
            HttpCounters::inc(&counters.token_refusals);
            debug!(error = %e, "join refused: access token");
            Box::new(ServerMessage::error(e.code(), e.to_string(), Some("join")))
        })?;
    if let Some(version) = protocol.filter(|v| *v != PROTOCOL_VERSION) {
        return Err(Box::new(ServerMessage::error(
            ErrorCode::UnsupportedProtocol,
            format!(
                "protocol version {version} is not supported; this server speaks {PROTOCOL_VERSION}"
            ),
            Some("join"),
        )));
    }
    let check = |field: &str, value: &str| {
        validate_field(field, value).map_err(|m| {
            Box::new(ServerMessage::error(
                ErrorCode::InvalidField,
                m,
                Some("join"),
            ))
        })
    };
    let name = [
        verified.name.as_str(),
        name.trim(),
        verified.identity.as_str(),
    ]
    .into_iter()
    .find(|n| !n.is_empty())
    .unwrap_or_default();
    Ok(Admitted {
        room: check("room", &verified.room)?,
        name: check("name", name)?,
        identity: verified.identity,
        grants: verified.grants.to_core(),
        input_tick_hz: verified.room_config.input_tick_hz,
    })
}

/// A room or participant name: non-empty after trimming, at most [`MAX_NAME_CHARS`]
/// characters, no control characters. Returns the trimmed value.
pub fn validate_field(field: &str, value: &str) -> Result<String, String> {
    let value = value.trim();
    if value.is_empty() {
        return Err(format!("`{field}` must not be empty"));
    }
    let chars = value.chars().count();
    if chars > MAX_NAME_CHARS {
        return Err(format!(
            "`{field}` is {chars} characters long; at most {MAX_NAME_CHARS} are allowed"
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(format!("`{field}` must not contain control characters"));
    }
    Ok(value.to_owned())
}

fn join_error(e: &SfuError) -> ServerMessage {
    let code = match e {
        SfuError::InvalidJoin(_) => ErrorCode::InvalidField,
        SfuError::ShuttingDown | SfuError::Overloaded => ErrorCode::Unavailable,
        SfuError::Rtc(_) | SfuError::Io(_) => ErrorCode::Internal,
        SfuError::TooManyRooms(_) => ErrorCode::TooManyRooms,
        SfuError::RoomFull(_) => ErrorCode::RoomFull,
    };
    let message = match e {
        SfuError::InvalidJoin(m) => m.clone(),
        other => other.to_string(),
    };
    ServerMessage::error(code, message, Some("join"))
}

/// The `join_rate_limited` reply: the rate, and when to retry (rounded up to 0.1 s).
fn join_rate_limited(conn: Option<&ConnMeta>, retry: Duration) -> ServerMessage {
    let rate = conn.map(ConnMeta::join_rate);
    let retry_s = ((retry.as_secs_f64() * 10.0).ceil() / 10.0).max(0.1);
    ServerMessage::error(
        ErrorCode::JoinRateLimited,
        format!(
            "too many joins from this address (more than {} per second, bursts of {}): retry \
             after {retry_s:.1} s",
            rate.map_or(0.0, |r| r.rate),
            rate.map_or(0, |r| r.burst),
        ),
        Some("join"),
    )
}

/// The wire `type` of a client message.
fn kind(msg: &ClientMessage) -> &'static str {
    match msg {
        ClientMessage::Join { .. } => "join",
        ClientMessage::PublishOffer { .. } => "publish_offer",
        ClientMessage::SubscribeAnswer { .. } => "subscribe_answer",
        ClientMessage::Trickle { .. } => "trickle",
        ClientMessage::IceRestart { .. } => "ice_restart",
        ClientMessage::Subscribe { .. } => "subscribe",
        ClientMessage::Mute { .. } => "mute",
        ClientMessage::RemoveParticipant { .. } => "remove_participant",
        ClientMessage::MuteChat { .. } => "mute_chat",
        ClientMessage::TrackSettings { .. } => "track_settings",
        ClientMessage::Ping { .. } => "ping",
        ClientMessage::History { .. } => "history",
        ClientMessage::Leave => "leave",
        ClientMessage::Resume { .. } => "resume",
    }
}

#[cfg(test)]
mod tests;
