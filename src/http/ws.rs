//! The signaling WebSocket session at `/rtc`.
//!
//! A session has two phases:
//!
//! 1. **Before join** the session reads messages one by one and answers them itself: the first
//!    useful message must be `join` (validated here, then passed to the core); `ping` is
//!    answered with `pong`, `leave` closes the socket, anything else gets `invalid_state`.
//!    Errors never close the socket, so a client can fix its `join` and retry.
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
//! close code 1009 and a reason naming the limit.

use super::AppState;
use crate::sfu::{EVENT_QUEUE, JoinAccepted, JoinRequest, SfuError, SfuHandle};
use crate::signal::{self, ClientMessage, ErrorCode, PROTOCOL_VERSION, ServerMessage};
use axum::{
    Extension,
    extract::{
        ConnectInfo, State,
        ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade, close_code},
    },
    response::Response,
};
use futures_util::{
    SinkExt, StreamExt,
    stream::{SplitSink, SplitStream},
};
use std::net::SocketAddr;
use std::time::Duration;
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

type Sink = SplitSink<WebSocket, Message>;
type Stream = SplitStream<WebSocket>;

/// The WebSocket layer's own limit for a message or frame: `max_ws_message` plus 1 MiB.
/// Messages between the two limits are read and refused politely; beyond this one the
/// connection fails (close code 1009).
pub fn hard_limit(max_ws_message: usize) -> usize {
    max_ws_message.saturating_add(1 << 20)
}

/// `GET /rtc`.
pub(crate) async fn upgrade(
    ws: WebSocketUpgrade,
    State(state): State<AppState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
) -> Response {
    let hard = hard_limit(state.settings.max_ws_message);
    let peer = peer.map(|Extension(ConnectInfo(addr))| addr);
    ws.max_message_size(hard)
        .max_frame_size(hard)
        .on_failed_upgrade(move |e| debug!(?peer, error = %e, "websocket upgrade failed"))
        .on_upgrade(move |socket| {
            let span = info_span!(
                "ws",
                peer = field::display(peer.map_or_else(|| "-".to_owned(), |p| p.to_string())),
                participant = field::Empty,
                room = field::Empty
            );
            session(socket, state).instrument(span)
        })
}

/// What the reader hands to the writer.
#[derive(Debug)]
enum Out {
    Msg(ServerMessage),
    Close(u16, String),
}

/// One WebSocket session, from upgrade to close.
async fn session(socket: WebSocket, state: AppState) {
    // Held until the session ends, so the server can wait for every session on shutdown.
    let _session_guard = state.sessions.clone();
    let limit = state.settings.max_ws_message;
    let (mut sink, mut stream) = socket.split();
    let mut shutdown = state.shutdown.clone();
    debug!("websocket session started");

    let Some((participant, room, events)) =
        wait_for_join(&mut sink, &mut stream, &state.handle, &mut shutdown, limit).await
    else {
        debug!("websocket session ended before join");
        return;
    };
    let span = tracing::Span::current();
    span.record("participant", field::display(&participant.participant_id));
    span.record("room", field::display(&room));
    let pid = participant.participant_id;
    info!("participant joined");

    let reason = if send_msg(&mut sink, &participant.joined).await {
        run_joined(&mut sink, &mut stream, &state.handle, &pid, events, limit).await
    } else {
        "socket closed before `joined` was sent".to_owned()
    };
    info!(%reason, "participant session ended");
    state.handle.disconnect(&pid, &reason).await;
}

/// Phase 1: answer messages until a join is accepted. `None` when the socket ended first.
async fn wait_for_join(
    sink: &mut Sink,
    stream: &mut Stream,
    handle: &SfuHandle,
    shutdown: &mut watch::Receiver<bool>,
    limit: usize,
) -> Option<(JoinAccepted, String, mpsc::Receiver<ServerMessage>)> {
    loop {
        let item = tokio::select! {
            item = stream.next() => item,
            () = wait_shutdown(shutdown) => {
                close(sink, close_code::AWAY, "server shutting down").await;
                return None;
            }
        };
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
                    close(sink, code, &reason).await;
                    tokio::time::sleep(LINGER).await;
                }
                debug!(error = %e, "websocket read failed before join");
                return None;
            }
        };
        let msg = match check_text(&text, limit) {
            Ok(msg) => msg,
            Err(reply) => {
                if !send_msg(sink, &reply).await {
                    return None;
                }
                continue;
            }
        };
        let reply = match msg {
            ClientMessage::Join {
                room,
                name,
                protocol,
                auto_subscribe,
                token: _,
            } => match validate_join(&room, &name, protocol) {
                Err(reply) => *reply,
                Ok((room, name)) => {
                    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
                    let req = JoinRequest {
                        room: room.clone(),
                        name,
                        auto_subscribe: auto_subscribe.unwrap_or(true),
                        events: events_tx,
                    };
                    match handle.join(req).await {
                        Ok(accepted) => return Some((accepted, room, events_rx)),
                        Err(e) => {
                            debug!(error = %e, %room, "join refused");
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
            ClientMessage::Ping { ts } => ServerMessage::Pong { ts },
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
}

/// Phase 2: reader and writer run concurrently until either ends. Returns the reason.
async fn run_joined(
    sink: &mut Sink,
    stream: &mut Stream,
    handle: &SfuHandle,
    pid: &str,
    events: mpsc::Receiver<ServerMessage>,
    limit: usize,
) -> String {
    let (local_tx, local_rx) = mpsc::channel(LOCAL_QUEUE);
    let writer_ended = {
        let reader = read_loop(stream, local_tx, handle, pid, limit);
        let writer = write_loop(sink, events, local_rx);
        tokio::pin!(reader, writer);
        tokio::select! {
            end = &mut reader => {
                if end.flush_writer {
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, &mut writer).await;
                }
                if end.linger {
                    tokio::time::sleep(LINGER).await;
                }
                return end.reason;
            }
            reason = &mut writer => reason,
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
) -> ReaderEnd {
    while let Some(item) = stream.next().await {
        let text = match item {
            Ok(Message::Text(text)) => text,
            Ok(Message::Binary(_)) => {
                let _ = local.send(Out::Msg(binary_error())).await;
                continue;
            }
            Ok(Message::Close(frame)) => {
                debug!(?frame, "client sent close");
                continue;
            }
            Ok(_) => continue,
            Err(e) => {
                debug!(error = %e, "websocket read failed");
                let flush_writer = match read_error_close(&e, limit) {
                    Some((code, reason)) => local.send(Out::Close(code, reason)).await.is_ok(),
                    None => false,
                };
                return ReaderEnd {
                    reason: format!("websocket read failed: {e}"),
                    flush_writer,
                    linger: flush_writer,
                };
            }
        };
        let reply = match check_text(&text, limit) {
            Err(reply) => *reply,
            Ok(ClientMessage::Ping { ts }) => ServerMessage::Pong { ts },
            Ok(ClientMessage::Join { .. }) => ServerMessage::error(
                ErrorCode::InvalidState,
                "already joined: one session per connection",
                Some("join"),
            ),
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
                };
            }
        };
        if local.send(Out::Msg(reply)).await.is_err() {
            break;
        }
    }
    ReaderEnd {
        reason: "client closed the connection".to_owned(),
        flush_writer: false,
        linger: false,
    }
}

/// Sends the core's events and the reader's replies; returns why it stopped.
async fn write_loop(
    sink: &mut Sink,
    mut events: mpsc::Receiver<ServerMessage>,
    mut local: mpsc::Receiver<Out>,
) -> String {
    let mut local_open = true;
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
        };
        match out {
            Out::Msg(msg) => {
                note_leave(&msg, &mut leave_reason);
                if sink.feed(text_frame(&msg)).await.is_err() {
                    return "websocket write failed".to_owned();
                }
                // Batch whatever else the core has ready, then flush once.
                for _ in 0..WRITE_BATCH {
                    let Ok(msg) = events.try_recv() else { break };
                    note_leave(&msg, &mut leave_reason);
                    if sink.feed(text_frame(&msg)).await.is_err() {
                        return "websocket write failed".to_owned();
                    }
                }
                if sink.flush().await.is_err() {
                    return "websocket write failed".to_owned();
                }
            }
            Out::Close(code, reason) => {
                close(sink, code, &reason).await;
                return format!("closed by server: {reason}");
            }
        }
    }
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
fn check_text(text: &str, limit: usize) -> Result<ClientMessage, Box<ServerMessage>> {
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
    if text.contains("Space limit exceeded") || text.contains("too long") {
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

/// Check `room` and `name` of a join (trimmed values on success) and the protocol version.
fn validate_join(
    room: &str,
    name: &str,
    protocol: Option<u32>,
) -> Result<(String, String), Box<ServerMessage>> {
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
    Ok((check("room", room)?, check("name", name)?))
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
    };
    let message = match e {
        SfuError::InvalidJoin(m) => m.clone(),
        other => other.to_string(),
    };
    ServerMessage::error(code, message, Some("join"))
}

/// The wire `type` of a client message.
fn kind(msg: &ClientMessage) -> &'static str {
    match msg {
        ClientMessage::Join { .. } => "join",
        ClientMessage::PublishOffer { .. } => "publish_offer",
        ClientMessage::SubscribeAnswer { .. } => "subscribe_answer",
        ClientMessage::Trickle { .. } => "trickle",
        ClientMessage::Subscribe { .. } => "subscribe",
        ClientMessage::Mute { .. } => "mute",
        ClientMessage::TrackSettings { .. } => "track_settings",
        ClientMessage::Ping { .. } => "ping",
        ClientMessage::Leave => "leave",
    }
}

#[cfg(test)]
mod tests;
