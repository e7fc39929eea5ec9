//! The room admin API: JSON over HTTP under `/api`, authenticated with an access token
//! (`Authorization: Bearer <token>`) that grants `roomAdmin` for the room named in the path
//! (`roomList` to list every room). `signaling/ADMIN.md` documents each call with curl.
//!
//! | call | grant |
//! |---|---|
//! | `GET /api/rooms` | `roomList` |
//! | `GET /api/nodes` | `roomList` |
//! | `DELETE /api/rooms/{room}` | `roomAdmin` |
//! | `GET /api/rooms/{room}/participants` | `roomAdmin` |
//! | `GET /api/rooms/{room}/participants/{identity}` | `roomAdmin` |
//! | `DELETE /api/rooms/{room}/participants/{identity}` | `roomAdmin` |
//! | `PATCH /api/rooms/{room}/participants/{identity}` | `roomAdmin` |
//! | `POST /api/rooms/{room}/participants/{identity}/tracks/{track}/mute` | `roomAdmin` |
//! | `POST /api/rooms/{room}/data` | `roomAdmin` |
//!
//! Errors are `{"code", "message"}` with the signaling error codes: 401 for a missing or bad
//! token (`token_*`, with `WWW-Authenticate: Bearer`), 403 `permission_denied` /
//! `token_wrong_room`, 404 `not_found`, 400 `malformed_message` / `invalid_field`, 413
//! `message_too_large`, 503 `unavailable`. A refused call changes nothing.
//!
//! In a cluster ([`crate::cluster`]), a call about a room hosted on another node is carried
//! there ([`to_room_node`]), and `GET /api/rooms` lists every node's rooms.

use super::AppState;
use crate::auth::TokenError;
use crate::cluster::{FORWARDED_HEADER, NODE_HEADER};
use crate::sfu::admin::{
    AdminError, AdminOp, AdminReply, Lane, PermissionsUpdate, Target, with_reason,
};
use crate::signal::ErrorCode;
use axum::extract::Request;
use axum::middleware::Next;
use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use base64::Engine as _;
use serde::Deserialize;
use std::collections::HashMap;
use std::time::Duration;

/// Largest request body accepted, in bytes (a data message's payload is further limited to
/// the server's `max_data_message`).
pub const MAX_BODY: usize = 256 * 1024;
/// How long a call waits for the core.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The admin API's routes (mounted under `/api` by [`super::router`]).
/// In a cluster, calls about one room go through [`to_room_node`] (`state` is its state).
pub fn routes(state: AppState) -> Router<AppState> {
    let room_calls = Router::new()
        .route("/api/rooms/{room}", axum::routing::delete(close_room))
        .route("/api/rooms/{room}/participants", get(list_participants))
        .route(
            "/api/rooms/{room}/participants/{identity}",
            get(get_participant)
                .delete(remove_participant)
                .patch(update_participant),
        )
        .route(
            "/api/rooms/{room}/participants/{identity}/tracks/{track}/mute",
            post(mute_track),
        )
        .route("/api/rooms/{room}/data", post(send_data))
        .route_layer(axum::middleware::from_fn_with_state(state, to_room_node));
    Router::new()
        .route("/api/rooms", get(list_rooms))
        .route("/api/nodes", get(list_nodes))
        .merge(room_calls)
        .layer(DefaultBodyLimit::max(MAX_BODY))
}

/// In a cluster, a call about a room that lives on another node is carried there (once: the
/// node that gets it answers it itself) and that node's answer is returned, marked with its id
/// ([`NODE_HEADER`]). The token is checked here first, so that no unauthenticated call is
/// carried anywhere; the room's node checks it again. A room with no live node (or Redis not
/// answering) is answered here.
async fn to_room_node(
    State(state): State<AppState>,
    Path(params): Path<HashMap<String, String>>,
    req: Request,
    next: Next,
) -> Response {
    let (Some(cluster), Some(room)) = (&state.cluster, params.get("room")) else {
        return next.run(req).await;
    };
    if req.headers().contains_key(FORWARDED_HEADER) {
        return next.run(req).await;
    }
    if let Err(e) = authorize(&state, req.headers(), Some(room)) {
        return e.into_response();
    }
    let node = match cluster.room_node(room).await {
        Ok(node) => node,
        Err(e) => {
            tracing::debug!(%room, error = %e, "admin call: Redis did not answer, answered here");
            return next.run(req).await;
        }
    };
    // Calls about participants: in a room that spans nodes, they are on several.
    let per_participant = params.contains_key("identity");
    let listing = req.method() == axum::http::Method::GET
        && params.len() == 1
        && req.uri().path().ends_with("/participants");
    if per_participant || listing {
        return participants_across_nodes(cluster, node, req, next, listing).await;
    }
    let Some(node) = node else {
        return next.run(req).await;
    };
    let (parts, bytes) = match buffered(req).await {
        Ok(r) => r,
        Err(refused) => return refused,
    };
    tracing::info!(%room, node = %node.id, method = %parts.method, "admin call carried to the room's node");
    carry(cluster, &node, &parts, bytes).await
}

/// A call about a room's participants, in a cluster: asked of the room's node (`node`; `None`:
/// this one) first. A room extended to other nodes has participants there too: a listing
/// merges every live node's (each participant naming its `node`), and a call about one
/// participant that the room's node does not know is carried to the other live nodes in turn,
/// the first that knows it answering.
async fn participants_across_nodes(
    cluster: &crate::cluster::ClusterView,
    node: Option<crate::cluster::registry::NodeRecord>,
    req: Request,
    next: Next,
    listing: bool,
) -> Response {
    let (parts, bytes) = match buffered(req).await {
        Ok(r) => r,
        Err(refused) => return refused,
    };
    let path = path_of(&parts).to_owned();
    let me = cluster.node_id().to_owned();
    let asked = node.as_ref().map_or(me.clone(), |n| n.id.clone());
    let local_req = || Request::from_parts(parts.clone(), axum::body::Body::from(bytes.clone()));
    let (first, next) = match &node {
        None => (next.run(local_req()).await, None),
        Some(n) => (carry(cluster, n, &parts, bytes.clone()).await, Some(next)),
    };
    if !listing && first.status() != StatusCode::NOT_FOUND {
        return first;
    }
    // This node's own answer, when the room's node is another one.
    let local = match next {
        Some(next) => {
            let res = next.run(local_req()).await;
            let status = res.status().as_u16();
            let body = axum::body::to_bytes(res.into_body(), MAX_FORWARDED_LIST)
                .await
                .unwrap_or_default();
            Some((
                me.clone(),
                crate::cluster::Forwarded {
                    status,
                    headers: vec![(
                        header::CONTENT_TYPE.as_str().to_owned(),
                        b"application/json".to_vec(),
                    )],
                    body,
                },
            ))
        }
        None => None,
    };
    let others: Vec<crate::cluster::registry::NodeRecord> = match cluster.nodes().await {
        Ok(nodes) => nodes.into_iter().filter(|n| n.id != asked).collect(),
        Err(_) => return first,
    };
    let ask = |n: &crate::cluster::registry::NodeRecord| {
        let (method, headers, bytes, path) = (
            parts.method.clone(),
            parts.headers.clone(),
            bytes.clone(),
            path.clone(),
        );
        let n = n.clone();
        let me = me.clone();
        async move {
            if n.id == me {
                return None;
            }
            cluster
                .forward(&n, method, &path, &headers, bytes)
                .await
                .ok()
                .map(|a| (n.id.clone(), a))
        }
    };
    if !listing {
        if let Some((_, answer)) = local.filter(|(_, a)| a.status != StatusCode::NOT_FOUND.as_u16())
        {
            // (Answered here: no node header.)
            let mut res = Response::new(axum::body::Body::from(answer.body));
            *res.status_mut() = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::OK);
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            return res;
        }
        for n in &others {
            if let Some((id, answer)) = ask(n).await
                && answer.status != StatusCode::NOT_FOUND.as_u16()
            {
                return forwarded(answer, &id);
            }
        }
        return first;
    }
    // A listing: this node's (or the room's node's) participants, and every other node's.
    let status = first.status();
    let (first_parts, first_body) = first.into_parts();
    let first_body = axum::body::to_bytes(first_body, MAX_FORWARDED_LIST)
        .await
        .unwrap_or_default();
    let mut participants = Vec::new();
    let mut found = status == StatusCode::OK;
    let mut add = |node: &str, body: &[u8]| {
        if let Some(list) = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["participants"].as_array().cloned())
        {
            participants.extend(list.into_iter().map(|p| with_node(p, node)));
            true
        } else {
            false
        }
    };
    if found {
        add(&asked, &first_body);
    }
    let answers = futures_util::future::join_all(others.iter().map(ask)).await;
    for (id, answer) in local.into_iter().chain(answers.into_iter().flatten()) {
        if answer.status == StatusCode::OK.as_u16() && add(&id, &answer.body) {
            found = true;
        }
    }
    if !found {
        return Response::from_parts(first_parts, axum::body::Body::from(first_body));
    }
    let mut res = ok(serde_json::json!({ "participants": participants }))
        .unwrap_or_else(|e| e.into_response());
    // (Answered for the room's node, as a call carried there is.)
    if asked != me
        && let Ok(v) = HeaderValue::from_str(&asked)
    {
        res.headers_mut().insert(NODE_HEADER, v);
    }
    res
}

/// The largest participant listing read back from this node's own answer.
const MAX_FORWARDED_LIST: usize = 16 * 1024 * 1024;

/// The request's head and its whole body (at most [`MAX_BODY`]: larger is `413`), to be carried
/// to another node.
async fn buffered(req: Request) -> Result<(axum::http::request::Parts, Bytes), Response> {
    let (parts, body) = req.into_parts();
    match axum::body::to_bytes(body, MAX_BODY).await {
        Ok(b) => Ok((parts, b)),
        Err(e) => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::MessageTooLarge,
            format!("request body: {e}"),
        )
        .into_response()),
    }
}

/// The path and query a call is carried to another node with.
fn path_of(parts: &axum::http::request::Parts) -> &str {
    parts
        .uri
        .path_and_query()
        .map_or(parts.uri.path(), |p| p.as_str())
}

/// The call (`parts` and its buffered body) carried to `node`, and its answer as this node's;
/// `502` when that node cannot be reached.
async fn carry(
    cluster: &crate::cluster::ClusterView,
    node: &crate::cluster::registry::NodeRecord,
    parts: &axum::http::request::Parts,
    bytes: Bytes,
) -> Response {
    let path = path_of(parts);
    match cluster
        .forward(node, parts.method.clone(), path, &parts.headers, bytes)
        .await
    {
        Ok(answer) => forwarded(answer, &node.id),
        Err(e) => ApiError::new(
            StatusCode::BAD_GATEWAY,
            ErrorCode::Unavailable,
            e.to_string(),
        )
        .into_response(),
    }
}

/// Another node's answer, as this node's.
fn forwarded(answer: crate::cluster::Forwarded, node: &str) -> Response {
    let mut res = Response::new(axum::body::Body::from(answer.body));
    *res.status_mut() = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
    for (name, value) in answer.headers {
        if let (Ok(n), Ok(v)) = (
            header::HeaderName::try_from(name),
            HeaderValue::from_bytes(&value),
        ) {
            res.headers_mut().insert(n, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(node) {
        res.headers_mut().insert(NODE_HEADER, v);
    }
    res
}

/// A refused call: its status, code and message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: ErrorCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad_field(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidField, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(serde_json::json!({ "code": self.code, "message": self.message }));
        if self.status == StatusCode::UNAUTHORIZED {
            (
                self.status,
                [(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"))],
                body,
            )
                .into_response()
        } else {
            (self.status, body).into_response()
        }
    }
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        let status = match &e {
            TokenError::Missing
            | TokenError::Malformed(_)
            | TokenError::BadSignature
            | TokenError::UnknownKey(_)
            | TokenError::Expired(_)
            | TokenError::NotYetValid(_) => StatusCode::UNAUTHORIZED,
            TokenError::WrongRoom { .. }
            | TokenError::JoinNotGranted(_)
            | TokenError::AdminNotGranted(_) => StatusCode::FORBIDDEN,
            TokenError::BadKey(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let code = e.code();
        let message = match e {
            TokenError::Missing => {
                "the admin API needs an access token: `Authorization: Bearer <token>`".to_owned()
            }
            other => other.to_string(),
        };
        ApiError::new(status, code, message)
    }
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> Self {
        let (status, code) = match e {
            AdminError::RoomNotFound(_)
            | AdminError::ParticipantNotFound(_)
            | AdminError::TrackNotFound(..) => (StatusCode::NOT_FOUND, ErrorCode::NotFound),
            AdminError::Invalid(_) => (StatusCode::BAD_REQUEST, ErrorCode::InvalidField),
            AdminError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable),
        };
        ApiError::new(status, code, e.to_string())
    }
}

type ApiResult = Result<Response, ApiError>;

/// `GET /api/nodes`: every live node of the cluster (the records in Redis); 404 without
/// `--redis`, 503 when Redis does not answer.
async fn list_nodes(State(state): State<AppState>, headers: HeaderMap) -> ApiResult {
    authorize(&state, &headers, None)?;
    let Some(cluster) = &state.cluster else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "this server is not part of a cluster (no --redis)",
        ));
    };
    match cluster.nodes().await {
        Ok(nodes) => ok(serde_json::json!({ "self": cluster.node_id(), "nodes": nodes })),
        Err(e) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            format!("Redis did not answer: {e}"),
        )),
    }
}

/// Checks the bearer token for `room` (`None`: listing rooms).
fn authorize(state: &AppState, headers: &HeaderMap, room: Option<&str>) -> Result<(), ApiError> {
    let token = super::bearer(headers);
    let result = state.settings.verifier.verify_admin(token, room);
    if result.is_err() {
        super::limits::HttpCounters::inc(&state.counters.token_refusals);
    }
    result.map(|_| ()).map_err(ApiError::from)
}

/// Runs `op` in the core (within [`ADMIN_TIMEOUT`]).
async fn run(state: &AppState, op: AdminOp) -> Result<AdminReply, ApiError> {
    tracing::info!(room = op.room().unwrap_or("*"), ?op, "admin call");
    match tokio::time::timeout(ADMIN_TIMEOUT, state.handle.admin(op)).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "the SFU core did not answer in time",
        )),
    }
}

/// A JSON body of type `B`; an empty body is `B::default()`.
fn body<B: serde::de::DeserializeOwned + Default>(bytes: &Bytes) -> Result<B, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(B::default());
    }
    serde_json::from_slice(bytes).map_err(|e| {
        let code = if e.is_syntax() || e.is_eof() {
            ErrorCode::MalformedMessage
        } else {
            ErrorCode::InvalidField
        };
        ApiError::new(
            StatusCode::BAD_REQUEST,
            code,
            format!("bad request body: {e}"),
        )
    })
}

fn ok(value: serde_json::Value) -> ApiResult {
    Ok((StatusCode::OK, Json(value)).into_response())
}

fn participant_json(reply: AdminReply) -> ApiResult {
    match reply {
        AdminReply::Participant(p) => ok(serde_json::json!({ "participant": p })),
        other => Err(unexpected(&other)),
    }
}

fn unexpected(reply: &AdminReply) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::Internal,
        format!("unexpected answer from the core: {reply:?}"),
    )
}

async fn list_rooms(State(state): State<AppState>, headers: HeaderMap) -> ApiResult {
    authorize(&state, &headers, None)?;
    let rooms = match run(&state, AdminOp::ListRooms).await? {
        AdminReply::Rooms(rooms) => rooms,
        other => return Err(unexpected(&other)),
    };
    match &state.cluster {
        Some(cluster) if !headers.contains_key(FORWARDED_HEADER) => {
            ok(cluster_rooms(cluster, &headers, rooms).await)
        }
        _ => ok(serde_json::json!({ "rooms": rooms })),
    }
}

/// Every node's rooms: this node's, and those the other live nodes list (asked at once, with
/// the caller's token); each room names its `node`. `complete` is false when Redis or a node
/// did not answer (those are listed in `unreachable`).
async fn cluster_rooms(
    cluster: &crate::cluster::ClusterView,
    headers: &HeaderMap,
    local: Vec<crate::sfu::admin::RoomSummary>,
) -> serde_json::Value {
    let me = cluster.node_id();
    let mut rooms: Vec<serde_json::Value> = local
        .into_iter()
        .map(|r| with_node(serde_json::to_value(r).unwrap_or_default(), me))
        .collect();
    let mut unreachable = Vec::new();
    let mut complete = true;
    match cluster.nodes().await {
        Ok(nodes) => {
            let calls = nodes.iter().filter(|n| n.id != me).map(|n| async move {
                let answer = cluster
                    .forward(
                        n,
                        axum::http::Method::GET,
                        "/api/rooms",
                        headers,
                        Bytes::new(),
                    )
                    .await;
                (n, answer)
            });
            for (node, answer) in futures_util::future::join_all(calls).await {
                let listed = answer.ok().filter(|a| a.status == 200).and_then(|a| {
                    serde_json::from_slice::<serde_json::Value>(&a.body)
                        .ok()
                        .and_then(|v| v["rooms"].as_array().cloned())
                });
                match listed {
                    Some(list) => rooms.extend(list.into_iter().map(|r| with_node(r, &node.id))),
                    None => {
                        complete = false;
                        unreachable.push(node.id.clone());
                    }
                }
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, "listing rooms: Redis did not answer, this node's only");
            complete = false;
        }
    }
    serde_json::json!({ "rooms": rooms, "complete": complete, "unreachable": unreachable })
}

fn with_node(mut room: serde_json::Value, node: &str) -> serde_json::Value {
    if let Some(o) = room.as_object_mut() {
        o.insert("node".into(), node.into());
    }
    room
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReasonBody {
    #[serde(default)]
    reason: Option<String>,
}

async fn close_room(
    State(state): State<AppState>,
    Path(room): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult {
    authorize(&state, &headers, Some(&room))?;
    let ReasonBody { reason } = body(&bytes)?;
    let reason = with_reason("room closed by an admin", reason.as_deref());
    match run(&state, AdminOp::CloseRoom { room, reason }).await? {
        AdminReply::Done { participants } => ok(serde_json::json!({ "removed": participants })),
        other => Err(unexpected(&other)),
    }
}

async fn list_participants(
    State(state): State<AppState>,
    Path(room): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    authorize(&state, &headers, Some(&room))?;
    match run(&state, AdminOp::ListParticipants { room }).await? {
        AdminReply::Participants(list) => ok(serde_json::json!({ "participants": list })),
        other => Err(unexpected(&other)),
    }
}

async fn get_participant(
    State(state): State<AppState>,
    Path((room, identity)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult {
    authorize(&state, &headers, Some(&room))?;
    match run(&state, AdminOp::ListParticipants { room }).await? {
        AdminReply::Participants(list) => {
            match list
                .into_iter()
                .find(|p| p.identity.as_deref() == Some(identity.as_str()))
            {
                Some(p) => ok(serde_json::json!({ "participant": p })),
                None => Err(AdminError::ParticipantNotFound(
                    Target::Identity(identity).to_string(),
                )
                .into()),
            }
        }
        other => Err(unexpected(&other)),
    }
}

async fn remove_participant(
    State(state): State<AppState>,
    Path((room, identity)): Path<(String, String)>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult {
    authorize(&state, &headers, Some(&room))?;
    let ReasonBody { reason } = body(&bytes)?;
    let reason = with_reason("removed by a room admin", reason.as_deref());
    let op = AdminOp::RemoveParticipant {
        room,
        target: Target::Identity(identity),
        reason,
    };
    match run(&state, op).await? {
        AdminReply::Done { participants } => ok(serde_json::json!({ "removed": participants })),
        other => Err(unexpected(&other)),
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateBody {
    #[serde(default)]
    permissions: Option<PermissionsUpdate>,
}

async fn update_participant(
    State(state): State<AppState>,
    Path((room, identity)): Path<(String, String)>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult {
    authorize(&state, &headers, Some(&room))?;
    let UpdateBody { permissions } = body(&bytes)?;
    let update = permissions.unwrap_or_default();
    if update.is_empty() {
        return Err(ApiError::bad_field(
            "nothing to change: give `permissions` with at least one of publish_audio, \
             publish_video, publish_data, subscribe, room_admin, chat_muted",
        ));
    }
    let op = AdminOp::UpdatePermissions {
        room,
        target: Target::Identity(identity),
        update,
    };
    participant_json(run(&state, op).await?)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MuteBody {
    #[serde(default)]
    muted: Option<bool>,
}

async fn mute_track(
    State(state): State<AppState>,
    Path((room, identity, track_id)): Path<(String, String, String)>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult {
    authorize(&state, &headers, Some(&room))?;
    let MuteBody { muted } = body(&bytes)?;
    let op = AdminOp::MuteTrack {
        room,
        target: Target::Identity(identity),
        track_id,
        muted: muted.unwrap_or(true),
    };
    participant_json(run(&state, op).await?)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DataBody {
    /// A text payload (sent as a text message).
    #[serde(default)]
    data: Option<String>,
    /// A binary payload, base64 (sent as a binary message).
    #[serde(default)]
    data_base64: Option<String>,
    #[serde(default)]
    lane: Lane,
    /// Recipients by identity; absent or empty: everyone in the room.
    #[serde(default)]
    identities: Vec<String>,
}

async fn send_data(
    State(state): State<AppState>,
    Path(room): Path<String>,
    headers: HeaderMap,
    bytes: Bytes,
) -> ApiResult {
    authorize(&state, &headers, Some(&room))?;
    let b: DataBody = body(&bytes)?;
    let (payload, is_text) = match (b.data, b.data_base64) {
        (Some(text), None) => (Bytes::from(text.into_bytes()), true),
        (None, Some(b64)) => (
            base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map(Bytes::from)
                .map_err(|e| ApiError::bad_field(format!("`data_base64` is not base64: {e}")))?,
            false,
        ),
        _ => {
            return Err(ApiError::bad_field(
                "give exactly one of `data` (text) and `data_base64` (binary)",
            ));
        }
    };
    let max = state.settings.max_data_message;
    if payload.len() > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::MessageTooLarge,
            format!("payload is {} bytes, the limit is {max}", payload.len()),
        ));
    }
    if b.identities.len() > crate::sfu::data::MAX_RECIPIENTS {
        return Err(ApiError::bad_field(format!(
            "at most {} identities",
            crate::sfu::data::MAX_RECIPIENTS
        )));
    }
    let op = AdminOp::SendData {
        room,
        lane: b.lane,
        is_text,
        payload,
        to: b.identities.into_iter().map(Target::Identity).collect(),
    };
    match run(&state, op).await? {
        AdminReply::Done { participants } => ok(serde_json::json!({ "delivered": participants })),
        other => Err(unexpected(&other)),
    }
}
