//! WHIP ingest (RFC 9725): OBS, FFmpeg, GStreamer and browsers publish to a room with one
//! HTTP request, no WebSocket. `signaling/WHIP.md` documents every request and response.
//!
//! | request | answer |
//! |---|---|
//! | `POST /whip/{room}[/{name}]`, `application/sdp` offer, `Authorization: Bearer <token>` | `201` + answer (`application/sdp`), `Location`, `ETag`, `Link: <…>; rel="ice-server"` |
//! | `PATCH /whip/{room}/sessions/{id}`, `application/trickle-ice-sdpfrag`, `If-Match` | `204` (trickle); `200` + the server's new fragment and a new `ETag` (ICE restart) |
//! | `DELETE /whip/{room}/sessions/{id}` | `200`: the participant leaves, its tracks are unpublished |
//! | `OPTIONS` on either | `204` with the CORS headers |
//!
//! The publisher is a participant of the room ([`session`]: joined through the core's
//! `JoinRequest` as a publish-only participant whose signaling events go to a task of the
//! server), so the room's subscribers receive its tracks like any other; a simulcast offer
//! (`a=rid`/`a=simulcast`) becomes a simulcast track with layers. The server is ICE-lite with
//! its host candidates known up front: the answer is complete, the server trickles nothing.
//!
//! Limits as for the WebSocket: the connection caps (a reserve connection gets 503), the
//! per-address join rate (429 with `Retry-After`), `max_rooms` and
//! `max_participants_per_room` (503 with `Retry-After`); request bodies are at most
//! `max_ws_message` bytes (413). Client input never gets a 500.

pub mod sdpfrag;
pub mod session;

use super::AppState;
use super::limits::{ConnMeta, HttpCounters};
use crate::auth::TokenError;
use crate::sfu::{JoinRequest, SfuError};
use crate::signal::{ClientMessage, ErrorCode, IceServer, PcTarget};
use axum::{
    Extension, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, State},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header},
    middleware::map_response,
    response::{IntoResponse, Response},
    routing::{patch, post},
};
use session::StartError;
use std::time::Instant;
use tokio::sync::mpsc;
use tracing::{debug, info};

/// The offer's media type.
pub const SDP: &str = "application/sdp";
/// The media type of a `PATCH` body.
pub const SDPFRAG: &str = "application/trickle-ice-sdpfrag";
/// What a client may wait before trying again after a 503.
const RETRY_AFTER_S: u32 = super::serve::RETRY_AFTER_S;

/// The WHIP routes; `max_body`: the largest request body accepted.
pub fn routes(max_body: usize) -> Router<AppState> {
    Router::new()
        .route("/whip/{room}", post(create).options(options_endpoint))
        .route(
            "/whip/{room}/{name}",
            post(create_named).options(options_endpoint),
        )
        .route(
            "/whip/{room}/sessions/{id}",
            patch(update)
                .delete(delete)
                .options(options_session)
                .post(session_post),
        )
        .layer(DefaultBodyLimit::max(max_body))
        .layer(map_response(cors))
}

/// CORS on every WHIP response (errors too, so a browser client can read them): any origin
/// (the bearer token is the credential, no cookies are used).
async fn cors(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("POST, PATCH, DELETE, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Authorization, Content-Type, If-Match"),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("Location, ETag, Link, Accept-Patch, Accept-Post, Retry-After"),
    );
    res
}

/// A refusal: status and a one-line text body.
fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    let mut body = message.into();
    body.push('\n');
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )],
        body,
    )
        .into_response()
}

fn with_header(mut res: Response, name: HeaderName, value: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(value) {
        res.headers_mut().insert(name, v);
    }
    res
}

/// Whether the request's `Content-Type` is `want` (parameters and case aside).
fn content_type_is(headers: &HeaderMap, want: &str) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case(want))
}

/// The bearer token of `Authorization`, if any.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

fn token_refusal(e: TokenError) -> Response {
    let status = match &e {
        TokenError::WrongRoom { .. } | TokenError::JoinNotGranted(_) => StatusCode::FORBIDDEN,
        TokenError::BadKey(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::UNAUTHORIZED,
    };
    let message = match e {
        TokenError::Missing => {
            "WHIP needs an access token: `Authorization: Bearer <token>`".to_owned()
        }
        other => other.to_string(),
    };
    let res = refuse(status, message);
    if status == StatusCode::UNAUTHORIZED {
        with_header(res, header::WWW_AUTHENTICATE, "Bearer")
    } else {
        res
    }
}

/// `/whip/{room}/sessions/{id}` with the room percent-encoded.
fn location(room: &str, id: &str) -> String {
    let mut out = String::from("/whip/");
    for b in room.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out.push_str("/sessions/");
    out.push_str(id);
    out
}

/// `Link` header values for the ICE servers (RFC 9725, STUN/TURN server configuration): one
/// per URL, TURN ones with their credentials.
pub fn ice_links(servers: &[IceServer]) -> Vec<String> {
    let quoted = |s: &str| s.replace(['"', '\\'], "");
    let mut out = Vec::new();
    for server in servers {
        for url in &server.urls {
            let mut link = format!("<{url}>; rel=\"ice-server\"");
            if let (Some(user), Some(cred)) = (&server.username, &server.credential) {
                link.push_str(&format!(
                    "; username=\"{}\"; credential=\"{}\"; credential-type=\"password\"",
                    quoted(user),
                    quoted(cred)
                ));
            }
            out.push(link);
        }
    }
    out
}

/// `POST /whip/{room}`.
async fn create(
    State(state): State<AppState>,
    Path(room): Path<String>,
    conn: Option<Extension<ConnMeta>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    publish(state, room, None, conn.map(|Extension(c)| c), headers, body).await
}

/// `POST /whip/{room}/{name}`.
async fn create_named(
    State(state): State<AppState>,
    Path((room, name)): Path<(String, String)>,
    conn: Option<Extension<ConnMeta>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    publish(
        state,
        room,
        Some(name),
        conn.map(|Extension(c)| c),
        headers,
        body,
    )
    .await
}

/// A new WHIP session: checks in the order a client learns the least from (connection caps,
/// media type, join rate, token, grants), then the offer.
async fn publish(
    state: AppState,
    room: String,
    name: Option<String>,
    conn: Option<ConnMeta>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if conn.as_ref().is_some_and(ConnMeta::is_reserve) {
        // Past the connection cap: this connection serves monitoring, not sessions (counted
        // with the WebSocket refusals, the same reserve).
        HttpCounters::inc(&state.counters.websocket_refused);
        let res = refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many connections: try again later",
        );
        return with_header(res, header::RETRY_AFTER, &RETRY_AFTER_S.to_string());
    }
    if !content_type_is(&headers, SDP) {
        let res = refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("a WHIP offer is `Content-Type: {SDP}`"),
        );
        return with_header(res, HeaderName::from_static("accept-post"), SDP);
    }
    if let Some(Err(retry)) = conn.as_ref().map(|c| c.take_join(Instant::now())) {
        let secs = retry.as_secs_f64().ceil().max(1.0);
        let res = refuse(
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many joins from this address: retry after {secs} s"),
        );
        return with_header(res, header::RETRY_AFTER, &format!("{secs}"));
    }
    let room = room.trim();
    let verified = match state
        .settings
        .verifier
        .verify(bearer(&headers), (!room.is_empty()).then_some(room))
    {
        Ok(v) => v,
        Err(e) => {
            HttpCounters::inc(&state.counters.token_refusals);
            debug!(error = %e, "WHIP publish refused: access token");
            return token_refusal(e);
        }
    };
    let grants = verified.grants.to_core();
    if grants.hidden || !(grants.publish_audio || grants.publish_video) {
        return refuse(
            StatusCode::FORBIDDEN,
            "your token does not grant publishing media",
        );
    }
    let name = [
        verified.name.as_str(),
        name.as_deref().map(str::trim).unwrap_or_default(),
        verified.identity.as_str(),
    ]
    .into_iter()
    .find(|n| !n.is_empty())
    .unwrap_or_default();
    let (room, name) = match (
        super::ws::validate_field("room", &verified.room),
        super::ws::validate_field("name", name),
    ) {
        (Ok(r), Ok(n)) => (r, n),
        (Err(e), _) | (_, Err(e)) => return refuse(StatusCode::BAD_REQUEST, e),
    };
    let Some(offer) = std::str::from_utf8(&body)
        .ok()
        .filter(|s| s.trim_start().starts_with("v="))
    else {
        return refuse(StatusCode::BAD_REQUEST, "the body is not an SDP offer");
    };
    let media = offer
        .lines()
        .filter(|l| l.starts_with("m=audio") || l.starts_with("m=video"))
        .count();
    if media == 0 {
        return refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the offer has no audio or video to publish",
        );
    }
    let remote_ufrag = sdpfrag::ice_ufrag(offer).map(str::to_owned);
    let mut core_grants = grants;
    // A WHIP session only publishes: nothing to subscribe to, no data channels.
    core_grants.subscribe = false;
    core_grants.publish_data = false;
    let (placeholder, _) = mpsc::channel(1);
    let req = JoinRequest {
        room: room.clone(),
        name,
        auto_subscribe: false,
        events: placeholder,
        peers: Vec::new(),
        identity: Some(verified.identity),
        grants: core_grants,
        publish_only: true,
    };
    // Run to the end even if the client goes away meanwhile (the handler's future is dropped
    // then): a participant that joined is either given its session or removed again, never
    // left without one.
    let start = tokio::spawn({
        let (state, offer) = (state.clone(), offer.to_owned());
        async move { session::start_publisher(&state, req, offer, remote_ufrag).await }
    });
    let started = start
        .await
        .unwrap_or(Err(StartError::Join(SfuError::ShuttingDown)));
    match started {
        Ok(started) => {
            let s = &started.session;
            info!(room = %room, participant = %s.participant_id, session = %s.id, "WHIP publisher joined");
            let ice = state
                .settings
                .ice
                .ice_servers(&s.participant_id, std::time::SystemTime::now());
            let mut res = (
                StatusCode::CREATED,
                [
                    (header::CONTENT_TYPE, HeaderValue::from_static(SDP)),
                    (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
                ],
                started.answer,
            )
                .into_response();
            res = with_header(res, header::LOCATION, &location(&room, &s.id));
            res = with_header(res, header::ETAG, &started.etag);
            res = with_header(res, HeaderName::from_static("accept-patch"), SDPFRAG);
            for link in ice_links(&ice) {
                if let Ok(v) = HeaderValue::from_str(&link) {
                    res.headers_mut().append(header::LINK, v);
                }
            }
            res
        }
        Err(e) => start_refusal(&state, e),
    }
}

fn start_refusal(state: &AppState, e: StartError) -> Response {
    let busy = unavailable;
    match e {
        StartError::Join(SfuError::TooManyRooms(m)) => {
            HttpCounters::inc(&state.counters.joins_refused_rooms);
            busy(m)
        }
        StartError::Join(SfuError::RoomFull(m)) => {
            HttpCounters::inc(&state.counters.joins_refused_room_full);
            busy(m)
        }
        StartError::Join(SfuError::InvalidJoin(m)) => refuse(StatusCode::BAD_REQUEST, m),
        StartError::Join(other) => busy(other.to_string()),
        StartError::Offer(ErrorCode::PermissionDenied, m) => refuse(StatusCode::FORBIDDEN, m),
        StartError::Offer(ErrorCode::Unavailable | ErrorCode::Internal, m) => busy(m),
        // The offer itself: unparseable, unusable, or over a limit.
        StartError::Offer(_, m) => refuse(StatusCode::UNPROCESSABLE_ENTITY, m),
        StartError::Timeout => busy("the SFU core did not answer in time".to_owned()),
    }
}

/// The session `id` of `room`, if open.
fn find(state: &AppState, room: &str, id: &str) -> Option<std::sync::Arc<session::Session>> {
    state.whip.get(id).filter(|s| s.room == room.trim())
}

fn not_found() -> Response {
    refuse(StatusCode::NOT_FOUND, "no such WHIP session")
}

/// Whether `If-Match` (a list of entity tags, or `*`) matches `etag` (strong comparison).
fn if_match(value: &str, etag: &str) -> bool {
    value
        .split(',')
        .map(str::trim)
        .any(|t| t == "*" || t == etag)
}

/// `PATCH /whip/{room}/sessions/{id}`: trickle ICE (204), or an ICE restart (new
/// credentials in the fragment: 200 with the server's new ones).
async fn update(
    State(state): State<AppState>,
    Path((room, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(session) = find(&state, &room, &id) else {
        return not_found();
    };
    if !content_type_is(&headers, SDPFRAG) {
        let res = refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("a WHIP PATCH is `Content-Type: {SDPFRAG}`"),
        );
        return with_header(res, HeaderName::from_static("accept-patch"), SDPFRAG);
    }
    let Some(tag) = headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok()) else {
        return refuse(
            StatusCode::PRECONDITION_REQUIRED,
            "a WHIP PATCH needs `If-Match` (the session's ETag, or `*` for an ICE restart)",
        );
    };
    let fragment = match sdpfrag::parse(&body) {
        Ok(f) => f,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("bad SDP fragment: {e}")),
    };
    // One PATCH at a time per session: a restart changes what the next one is checked against.
    let mut ice = session.ice.lock().await;
    if !if_match(tag, &ice.etag) {
        return refuse(
            StatusCode::PRECONDITION_FAILED,
            "`If-Match` does not match the session's ETag",
        );
    }
    let restart = match (&fragment.ufrag, &fragment.pwd) {
        (Some(u), Some(p)) if ice.remote_ufrag.as_deref() != Some(u) => Some((u, p)),
        _ => None,
    };
    let mut reply = StatusCode::NO_CONTENT.into_response();
    if let Some((ufrag, pwd)) = restart {
        let offer = sdpfrag::restart_offer(&ice.offer, ufrag, pwd);
        match session.renegotiate(offer.clone()).await {
            Ok(answer) => {
                info!(session = %session.id, "WHIP ICE restart");
                ice.offer = offer;
                ice.remote_ufrag = Some(ufrag.clone());
                ice.etag = session::new_etag();
                reply = (
                    StatusCode::OK,
                    [(header::CONTENT_TYPE, HeaderValue::from_static(SDPFRAG))],
                    sdpfrag::answer_fragment(&answer),
                )
                    .into_response();
            }
            Err(e) => return restart_refusal(e),
        }
    }
    for candidate in fragment.candidates {
        let msg = ClientMessage::Trickle {
            target: PcTarget::Publisher,
            candidate,
        };
        if state
            .handle
            .client(&session.participant_id, msg)
            .await
            .is_err()
        {
            return unavailable("the server is shutting down".to_owned());
        }
    }
    with_header(reply, header::ETAG, &ice.etag)
}

fn unavailable(message: String) -> Response {
    with_header(
        refuse(StatusCode::SERVICE_UNAVAILABLE, message),
        header::RETRY_AFTER,
        &RETRY_AFTER_S.to_string(),
    )
}

fn restart_refusal(e: StartError) -> Response {
    match e {
        StartError::Offer(ErrorCode::Unavailable | ErrorCode::Internal, m) => unavailable(m),
        StartError::Offer(_, m) => refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("ICE restart refused: {m}"),
        ),
        StartError::Join(e) => unavailable(e.to_string()),
        StartError::Timeout => unavailable("the SFU core did not answer in time".to_owned()),
    }
}

/// `DELETE /whip/{room}/sessions/{id}`: the participant leaves; its tracks are unpublished.
async fn delete(
    State(state): State<AppState>,
    Path((room, id)): Path<(String, String)>,
) -> Response {
    if find(&state, &room, &id).is_none() {
        return not_found();
    }
    match state.whip.remove(&id) {
        Some(session) => {
            session.stop("WHIP session deleted");
            StatusCode::OK.into_response()
        }
        None => not_found(),
    }
}

/// `POST` on a session resource: not how a session changes.
async fn session_post() -> Response {
    with_header(
        refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "a WHIP session takes PATCH (trickle ICE) and DELETE",
        ),
        header::ALLOW,
        "PATCH, DELETE, OPTIONS",
    )
}

/// `OPTIONS /whip/{room}[/{name}]`: the CORS preflight (and what the endpoint accepts).
async fn options_endpoint() -> Response {
    let mut res = StatusCode::NO_CONTENT.into_response();
    res = with_header(res, header::ALLOW, "POST, OPTIONS");
    res = with_header(res, HeaderName::from_static("accept-post"), SDP);
    with_header(res, header::ACCESS_CONTROL_MAX_AGE, "86400")
}

/// `OPTIONS /whip/{room}/sessions/{id}`.
async fn options_session() -> Response {
    let mut res = StatusCode::NO_CONTENT.into_response();
    res = with_header(res, header::ALLOW, "PATCH, DELETE, OPTIONS");
    res = with_header(res, HeaderName::from_static("accept-patch"), SDPFRAG);
    with_header(res, header::ACCESS_CONTROL_MAX_AGE, "86400")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_encode_the_room() {
        assert_eq!(location("demo", "abc"), "/whip/demo/sessions/abc");
        assert_eq!(location("a b/ü", "x"), "/whip/a%20b%2F%C3%BC/sessions/x");
    }

    #[test]
    fn if_match_is_strong() {
        assert!(if_match("\"abc\"", "\"abc\""));
        assert!(if_match("*", "\"abc\""));
        assert!(if_match("\"x\", \"abc\"", "\"abc\""));
        assert!(!if_match("W/\"abc\"", "\"abc\""));
        assert!(!if_match("\"abd\"", "\"abc\""));
    }

    #[test]
    fn links_name_every_ice_server() {
        let links = ice_links(&[
            IceServer {
                urls: vec![
                    "turn:t.example:3478?transport=udp".into(),
                    "turns:t.example:443?transport=tcp".into(),
                ],
                username: Some("1700000000:PA_x".into()),
                credential: Some("c2VjcmV0".into()),
            },
            IceServer {
                urls: vec!["stun:s.example:3478".into()],
                username: None,
                credential: None,
            },
        ]);
        assert_eq!(
            links,
            vec![
                "<turn:t.example:3478?transport=udp>; rel=\"ice-server\"; username=\"1700000000:PA_x\"; credential=\"c2VjcmV0\"; credential-type=\"password\"",
                "<turns:t.example:443?transport=tcp>; rel=\"ice-server\"; username=\"1700000000:PA_x\"; credential=\"c2VjcmV0\"; credential-type=\"password\"",
                "<stun:s.example:3478>; rel=\"ice-server\"",
            ]
        );
    }

    #[test]
    fn media_types() {
        let mut h = HeaderMap::new();
        assert!(!content_type_is(&h, SDP));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("Application/SDP; charset=utf-8"),
        );
        assert!(content_type_is(&h, SDP));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(!content_type_is(&h, SDP));
    }
}
