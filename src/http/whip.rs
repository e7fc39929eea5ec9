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
use crate::signal::{ClientMessage, ErrorCode, IceServer};
use axum::{
    Extension, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, OriginalUri, Path, State},
    http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri, header},
    middleware::map_response,
    response::{IntoResponse, Response},
    routing::{patch, post},
};
pub use session::Kind;
use session::StartError;
use std::time::Instant;
use tokio::sync::mpsc;
use tracing::{Instrument as _, debug, info};

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
pub(super) async fn cors(mut res: Response) -> Response {
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
pub(super) fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
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

pub(super) fn with_header(mut res: Response, name: HeaderName, value: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(value) {
        res.headers_mut().insert(name, v);
    }
    res
}

/// Whether the request's `Content-Type` is `want` (parameters and case aside).
pub(super) fn content_type_is(headers: &HeaderMap, want: &str) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case(want))
}

fn token_refusal(kind: Kind, e: TokenError) -> Response {
    let status = match &e {
        TokenError::WrongRoom { .. } | TokenError::JoinNotGranted(_) => StatusCode::FORBIDDEN,
        TokenError::BadKey(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::UNAUTHORIZED,
    };
    let message = match e {
        TokenError::Missing => {
            format!(
                "{} needs an access token: `Authorization: Bearer <token>`",
                kind.title()
            )
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

/// `/whip/{room}/sessions/{id}` (or `/whep/…`) with the room percent-encoded.
pub(super) fn location(kind: Kind, room: &str, id: &str) -> String {
    let mut out = format!("/{}/", kind.name());
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
    OriginalUri(uri): OriginalUri,
    conn: Option<Extension<ConnMeta>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let conn = conn.map(|Extension(c)| c);
    publish(state, room, None, &uri, conn, headers, body).await
}

/// `POST /whip/{room}/{name}`.
async fn create_named(
    State(state): State<AppState>,
    Path((room, name)): Path<(String, String)>,
    OriginalUri(uri): OriginalUri,
    conn: Option<Extension<ConnMeta>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    publish(
        state,
        room,
        Some(name),
        &uri,
        conn.map(|Extension(c)| c),
        headers,
        body,
    )
    .await
}

/// The checks every session `POST` (WHIP and WHEP) starts with, in the order a client learns
/// the least from: connection caps, media type, join rate, token. The verified token.
#[allow(clippy::result_large_err)] // an HTTP handler's early answer, once per request
pub(super) fn admit(
    state: &AppState,
    kind: Kind,
    room: &str,
    conn: Option<&ConnMeta>,
    headers: &HeaderMap,
) -> Result<crate::auth::Verified, Response> {
    if conn.is_some_and(ConnMeta::is_reserve) {
        // Past the connection cap: this connection serves monitoring, not sessions (counted
        // with the WebSocket refusals, the same reserve).
        HttpCounters::inc(&state.counters.websocket_refused);
        let res = refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many connections: try again later",
        );
        return Err(with_header(
            res,
            header::RETRY_AFTER,
            &RETRY_AFTER_S.to_string(),
        ));
    }
    if !content_type_is(headers, SDP) {
        let res = refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("a {} offer is `Content-Type: {SDP}`", kind.title()),
        );
        return Err(with_header(
            res,
            HeaderName::from_static("accept-post"),
            SDP,
        ));
    }
    if let Some(Err(retry)) = conn.map(|c| c.take_join(Instant::now())) {
        let secs = retry.as_secs_f64().ceil().max(1.0);
        let res = refuse(
            StatusCode::TOO_MANY_REQUESTS,
            format!("too many joins from this address: retry after {secs} s"),
        );
        return Err(with_header(res, header::RETRY_AFTER, &format!("{secs}")));
    }
    let room = room.trim();
    match state
        .settings
        .verifier
        .verify(super::bearer(headers), (!room.is_empty()).then_some(room))
    {
        Ok(v) => Ok(v),
        Err(e) => {
            HttpCounters::inc(&state.counters.token_refusals);
            debug!(error = %e, kind = kind.name(), "session refused: access token");
            Err(token_refusal(kind, e))
        }
    }
}

/// In a cluster, a session for a room that lives on another node is sent there: `307
/// Temporary Redirect` to the same path and query on that node (a WHIP/WHEP client repeats
/// its `POST` there; tokens work on every node) — unless the room is extended to every node
/// (`Ok(Some(entry))`: served here, with its home on that node). `Ok(None)`: served here.
#[allow(clippy::result_large_err)] // an HTTP handler's early answer, once per request
pub(super) async fn redirect_to_room_node(
    state: &AppState,
    room: &str,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Option<crate::sfu::pipe::ShardId>, Response> {
    let Some(cluster) = state.cluster.as_ref() else {
        return Ok(None);
    };
    let (node_id, address) = match cluster.place(room, state.handle.local_load(room)).await {
        crate::cluster::Placed::Here => return Ok(None),
        crate::cluster::Placed::Extended { entry, .. } => return Ok(Some(entry)),
        crate::cluster::Placed::Elsewhere { node_id, address } => (node_id, address),
    };
    // Behind a TLS-terminating proxy the other node is reached the same way.
    let scheme = match headers.get("x-forwarded-proto").map(HeaderValue::as_bytes) {
        Some(b"https") => "https",
        _ => "http",
    };
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let location = format!("{scheme}://{address}{path}");
    debug!(%room, node = %node_id, %location, "session redirected to the room's node");
    let res = refuse(
        StatusCode::TEMPORARY_REDIRECT,
        format!("room {room} is on node {node_id}: {location}"),
    );
    Err(with_header(res, header::LOCATION, &location))
}

/// A new WHIP session: the common checks ([`admit`]), the publish grant, then the offer.
async fn publish(
    state: AppState,
    room: String,
    name: Option<String>,
    uri: &Uri,
    conn: Option<ConnMeta>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let verified = match admit(&state, Kind::Whip, &room, conn.as_ref(), &headers) {
        Ok(v) => v,
        Err(res) => return res,
    };
    let grants = verified.grants.to_core();
    if grants.hidden || !(grants.publish_audio || grants.publish_video) {
        return refuse(
            StatusCode::FORBIDDEN,
            "your token does not grant publishing media",
        );
    }
    let home = match redirect_to_room_node(&state, &verified.room, uri, &headers).await {
        Ok(home) => home,
        Err(res) => return res,
    };
    let names = [
        verified.name.as_str(),
        name.as_deref().map(str::trim).unwrap_or_default(),
        verified.identity.as_str(),
    ];
    let (mut req, offer) = match session_join(&verified.room, &names, &body) {
        Ok(j) => j,
        Err(res) => return res,
    };
    // A WHIP session only publishes: nothing to subscribe to, no data channels.
    req.home = home;
    req.grants = grants;
    req.grants.subscribe = false;
    req.grants.publish_data = false;
    req.identity = Some(verified.identity);
    req.publish_only = true;
    open(state, Kind::Whip, req, offer, |_| Vec::new()).await
}

/// What every session joins with: the room and the first non-empty of `names`, validated
/// (400), no auto-subscribe, default grants; and the body's offer ([`offer_of`]). The caller
/// sets the grants and the kind of participant.
#[allow(clippy::result_large_err)] // an HTTP handler's early answer, once per request
pub(super) fn session_join<'b>(
    room: &str,
    names: &[&str],
    body: &'b [u8],
) -> Result<(JoinRequest, &'b str), Response> {
    let name = names
        .iter()
        .copied()
        .find(|n| !n.is_empty())
        .unwrap_or_default();
    let (room, name) = match (
        super::ws::validate_field("room", room),
        super::ws::validate_field("name", name),
    ) {
        (Ok(r), Ok(n)) => (r, n),
        (Err(e), _) | (_, Err(e)) => return Err(refuse(StatusCode::BAD_REQUEST, e)),
    };
    let offer = offer_of(body)?;
    // The session's task replaces the events channel with its own.
    let (placeholder, _) = mpsc::channel(1);
    let req = JoinRequest {
        room,
        name,
        auto_subscribe: false,
        events: placeholder,
        peers: Vec::new(),
        identity: None,
        grants: Default::default(),
        publish_only: false,
        view: None,
        home: None,
        timeline: Default::default(),
        session: crate::signal::new_session_id(),
    };
    Ok((req, offer))
}

/// The request body as an SDP offer with audio or video: 400 / 422 otherwise.
#[allow(clippy::result_large_err)] // an HTTP handler's early answer, once per request
pub(super) fn offer_of(body: &[u8]) -> Result<&str, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "the body is empty: POST an SDP offer (the server makes no counter-offers)",
        ));
    }
    let Some(offer) = std::str::from_utf8(body)
        .ok()
        .filter(|s| s.trim_start().starts_with("v="))
    else {
        return Err(refuse(
            StatusCode::BAD_REQUEST,
            "the body is not an SDP offer",
        ));
    };
    let media = offer
        .lines()
        .filter(|l| l.starts_with("m=audio") || l.starts_with("m=video"))
        .count();
    if media == 0 {
        return Err(refuse(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the offer has no audio or video section",
        ));
    }
    Ok(offer)
}

/// Join `req`, hand the core the offer, and answer `201 Created` with the session (or the
/// refusal). `links`: more `Link` header values for the session's URL.
pub(super) async fn open(
    state: AppState,
    kind: Kind,
    req: JoinRequest,
    offer: &str,
    links: impl FnOnce(&str) -> Vec<String>,
) -> Response {
    let remote_ufrag = sdpfrag::ice_ufrag(offer).map(str::to_owned);
    let room = req.room.clone();
    // Run to the end even if the client goes away meanwhile (the handler's future is dropped
    // then): a participant that joined is either given its session or removed again, never
    // left without one.
    let span = tracing::info_span!("start", session = %req.session);
    let start = tokio::spawn(
        {
            let (state, offer) = (state.clone(), offer.to_owned());
            async move { session::start(&state, kind, req, offer, remote_ufrag).await }
        }
        .instrument(span),
    );
    let started = start
        .await
        .unwrap_or(Err(StartError::Join(SfuError::ShuttingDown)));
    match started {
        Ok(started) => {
            let s = &started.session;
            info!(room = %room, participant = %s.participant_id, resource = %s.id, kind = kind.name(), "session opened");
            // A room past the cluster's threshold is extended to the other nodes from now on.
            if let Some(cluster) = &state.cluster {
                cluster
                    .note_room_size(&room, state.handle.room_size(&room))
                    .await;
            }
            let ice = state
                .settings
                .ice
                .ice_servers(&s.participant_id, std::time::SystemTime::now());
            let at = location(kind, &room, &s.id);
            let mut res = (
                StatusCode::CREATED,
                [
                    (header::CONTENT_TYPE, HeaderValue::from_static(SDP)),
                    (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
                ],
                started.answer,
            )
                .into_response();
            res = with_header(res, header::ETAG, &started.etag);
            res = with_header(res, HeaderName::from_static("accept-patch"), SDPFRAG);
            for link in ice_links(&ice).into_iter().chain(links(&at)) {
                if let Ok(v) = HeaderValue::from_str(&link) {
                    res.headers_mut().append(header::LINK, v);
                }
            }
            with_header(res, header::LOCATION, &at)
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

/// The `kind` session `id` of `room`, if open.
pub(super) fn find(
    state: &AppState,
    kind: Kind,
    room: &str,
    id: &str,
) -> Option<std::sync::Arc<session::Session>> {
    state
        .whip
        .get(id)
        .filter(|s| s.kind == kind && s.room == room.trim())
}

pub(super) fn not_found(kind: Kind) -> Response {
    refuse(
        StatusCode::NOT_FOUND,
        format!("no such {} session", kind.title()),
    )
}

/// Whether `If-Match` (a list of entity tags, or `*`) matches `etag` (strong comparison).
fn if_match(value: &str, etag: &str) -> bool {
    value
        .split(',')
        .map(str::trim)
        .any(|t| t == "*" || t == etag)
}

/// `PATCH /whip/{room}/sessions/{id}`.
async fn update(
    State(state): State<AppState>,
    Path((room, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    patch_session(state, Kind::Whip, room, id, headers, body).await
}

/// `PATCH` on a session: trickle ICE (204), or an ICE restart (new credentials in the
/// fragment: 200 with the server's new ones).
pub(super) async fn patch_session(
    state: AppState,
    kind: Kind,
    room: String,
    id: String,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(session) = find(&state, kind, &room, &id) else {
        return not_found(kind);
    };
    if !content_type_is(&headers, SDPFRAG) {
        let res = refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("a {} PATCH is `Content-Type: {SDPFRAG}`", kind.title()),
        );
        return with_header(res, HeaderName::from_static("accept-patch"), SDPFRAG);
    }
    let Some(tag) = headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok()) else {
        return refuse(
            StatusCode::PRECONDITION_REQUIRED,
            format!(
                "a {} PATCH needs `If-Match` (the session's ETag, or `*` for an ICE restart)",
                kind.title()
            ),
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
                info!(session = %session.id, kind = kind.name(), "ICE restart");
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
            target: kind.target(),
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
    delete_session(&state, Kind::Whip, &room, &id)
}

/// `DELETE` on a session: its participant leaves.
pub(super) fn delete_session(state: &AppState, kind: Kind, room: &str, id: &str) -> Response {
    if find(state, kind, room, id).is_none() {
        return not_found(kind);
    }
    match state.whip.remove(id) {
        Some(session) => {
            session.stop("session deleted");
            StatusCode::OK.into_response()
        }
        None => not_found(kind),
    }
}

/// `POST` on a session resource: not how a session changes.
pub(super) async fn session_post() -> Response {
    with_header(
        refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            "a session takes PATCH (trickle ICE) and DELETE",
        ),
        header::ALLOW,
        "PATCH, DELETE, OPTIONS",
    )
}

/// `OPTIONS /whip/{room}[/{name}]` (and WHEP's): the CORS preflight (and what the endpoint
/// accepts).
pub(super) async fn options_endpoint() -> Response {
    let mut res = StatusCode::NO_CONTENT.into_response();
    res = with_header(res, header::ALLOW, "POST, OPTIONS");
    res = with_header(res, HeaderName::from_static("accept-post"), SDP);
    with_header(res, header::ACCESS_CONTROL_MAX_AGE, "86400")
}

/// `OPTIONS /whip/{room}/sessions/{id}` (and WHEP's).
pub(super) async fn options_session() -> Response {
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
        assert_eq!(
            location(Kind::Whip, "demo", "abc"),
            "/whip/demo/sessions/abc"
        );
        assert_eq!(
            location(Kind::Whip, "a b/ü", "x"),
            "/whip/a%20b%2F%C3%BC/sessions/x"
        );
        assert_eq!(
            location(Kind::Whep, "demo", "abc"),
            "/whep/demo/sessions/abc"
        );
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
