//! WHEP playback (draft-ietf-wish-whep): a player receives a room's host (or a named participant
//! or track) with one HTTP request, no WebSocket. `signaling/WHEP.md` documents every request
//! and response.
//!
//! | request | answer |
//! |---|---|
//! | `POST /whep/{room}[/{participant}][?track=…]`, `application/sdp` offer (recvonly), `Authorization: Bearer <token>` | `201` + answer, `Location`, `ETag`, `Link` (ICE servers, the layer extension) |
//! | `PATCH /whep/{room}/sessions/{id}` | as WHIP: trickle (`204`), ICE restart (`200` + fragment) |
//! | `DELETE /whep/{room}/sessions/{id}` | `200`: the viewer leaves |
//! | `POST /whep/{room}/sessions/{id}/layer`, JSON `{"quality", "maxWidth", "maxHeight"}` | `204`: the video layer the viewer wants |
//! | `OPTIONS` on any | `204` with the CORS headers |
//!
//! The viewer is a hidden participant of the core whose one connection (the subscriber one) is
//! offered by the player; each media section of the offer plays one track of the room, moved
//! to the next host's when the host changes, with the same per-viewer layer selection and
//! bandwidth estimation as any subscriber (`sfu::viewing`, `sfu::core::viewer`). A room with
//! nothing published yet is answered at once: the viewer waits, and media starts when the host
//! publishes. The server makes no counter-offers. Sessions, `PATCH`, `DELETE` and CORS are
//! WHIP's ([`super::whip`]).

use super::AppState;
use super::limits::ConnMeta;
use super::whip::{
    Kind, admit, content_type_is, cors, delete_session, find, not_found, open, options_endpoint,
    options_session, patch_session, refuse, session_join, session_post, with_header,
};
use crate::sfu::viewing::ViewTarget;
use crate::signal::{ClientMessage, Quality};
use axum::{
    Extension, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, OriginalUri, Path, Query, State},
    http::{HeaderMap, HeaderName, StatusCode, Uri, header},
    middleware::map_response,
    response::{IntoResponse, Response},
    routing::{patch, post},
};
use serde::Deserialize;
use std::collections::HashMap;

/// The `rel` of the layer extension's `Link`.
pub const LAYER_REL: &str = "urn:ietf:params:whep:ext:core:layer";

/// The WHEP routes; `max_body`: the largest request body accepted.
pub fn routes(max_body: usize) -> Router<AppState> {
    Router::new()
        .route("/whep/{room}", post(create).options(options_endpoint))
        .route(
            "/whep/{room}/{participant}",
            post(create_for).options(options_endpoint),
        )
        .route(
            "/whep/{room}/sessions/{id}",
            patch(update)
                .delete(delete)
                .options(options_session)
                .post(session_post),
        )
        .route(
            "/whep/{room}/sessions/{id}/layer",
            post(layer).options(options_layer),
        )
        .layer(DefaultBodyLimit::max(max_body))
        .layer(map_response(cors))
}

/// `POST /whep/{room}`.
async fn create(
    State(state): State<AppState>,
    Path(room): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    OriginalUri(uri): OriginalUri,
    conn: Option<Extension<ConnMeta>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let target = match query.get("track").map(|t| t.trim()) {
        Some(t) if !t.is_empty() => ViewTarget::Track(t.to_owned()),
        _ => ViewTarget::Host,
    };
    play(
        state,
        room,
        target,
        &uri,
        conn.map(|Extension(c)| c),
        headers,
        body,
    )
    .await
}

/// `POST /whep/{room}/{participant}`.
async fn create_for(
    State(state): State<AppState>,
    Path((room, participant)): Path<(String, String)>,
    OriginalUri(uri): OriginalUri,
    conn: Option<Extension<ConnMeta>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let target = ViewTarget::Participant(participant.trim().to_owned());
    play(
        state,
        room,
        target,
        &uri,
        conn.map(|Extension(c)| c),
        headers,
        body,
    )
    .await
}

/// A new WHEP session: the common checks, the subscribe grant, then the offer.
async fn play(
    state: AppState,
    room: String,
    target: ViewTarget,
    uri: &Uri,
    conn: Option<ConnMeta>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let verified = match admit(&state, Kind::Whep, &room, conn.as_ref(), &headers) {
        Ok(v) => v,
        Err(res) => return res,
    };
    let mut grants = verified.grants.to_core();
    if !grants.subscribe {
        return refuse(
            StatusCode::FORBIDDEN,
            "your token does not grant subscribing",
        );
    }
    let home = match super::whip::redirect_to_room_node(&state, &verified.room, uri, &headers).await
    {
        Ok(home) => home,
        Err(res) => return res,
    };
    let names = [verified.name.as_str(), verified.identity.as_str(), "viewer"];
    let (mut req, offer) = match session_join(&verified.room, &names, &body) {
        Ok(j) => j,
        Err(res) => return res,
    };
    // A viewer only receives, and nobody sees it. Its identity is not made unique: one
    // token may play the room in several players, and a viewer never replaces its holder's
    // WebSocket participant.
    grants.publish_audio = false;
    grants.publish_video = false;
    grants.publish_data = false;
    grants.room_admin = false;
    grants.hidden = true;
    req.grants = grants;
    req.home = home;
    req.view = Some(target);
    open(state, Kind::Whep, req, offer, |at| {
        vec![format!("<{at}/layer>; rel=\"{LAYER_REL}\"")]
    })
    .await
}

/// `PATCH /whep/{room}/sessions/{id}`: as WHIP's.
async fn update(
    State(state): State<AppState>,
    Path((room, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    patch_session(state, Kind::Whep, room, id, headers, body).await
}

/// `DELETE /whep/{room}/sessions/{id}`: the viewer leaves.
async fn delete(
    State(state): State<AppState>,
    Path((room, id)): Path<(String, String)>,
) -> Response {
    delete_session(&state, Kind::Whep, &room, &id)
}

/// The layer extension's request: what `track_settings` says for a WebSocket subscriber.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LayerRequest {
    /// Highest quality wanted; `null`: automatic. Absent: unchanged.
    #[serde(default, deserialize_with = "present")]
    quality: Option<Option<Quality>>,
    /// The draft's layer extension's way: 0 = the lowest layer (`low`), 1 = `medium`, 2 and
    /// up = `high`; `null`: automatic.
    #[serde(default, rename = "spatialLayerId", deserialize_with = "present")]
    spatial_layer_id: Option<Option<u8>>,
    #[serde(default, rename = "maxWidth")]
    max_width: Option<u32>,
    #[serde(default, rename = "maxHeight")]
    max_height: Option<u32>,
}

/// A field that is present (`Some`), maybe `null` (`Some(None)`).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// `POST /whep/{room}/sessions/{id}/layer`: the video layer the viewer wants.
async fn layer(
    State(state): State<AppState>,
    Path((room, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(session) = find(&state, Kind::Whep, &room, &id) else {
        return not_found(Kind::Whep);
    };
    if !content_type_is(&headers, "application/json") {
        return refuse(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "a layer request is `Content-Type: application/json`",
        );
    }
    let req: LayerRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!(
                    "bad layer request: {e} (expected {{\"quality\": \"low\"|\"medium\"|\"high\"|null, \"spatialLayerId\": N|null, \"maxWidth\": N, \"maxHeight\": N}})"
                ),
            );
        }
    };
    let by_layer = req.spatial_layer_id.map(|l| {
        l.map(|l| match l {
            0 => Quality::Low,
            1 => Quality::Medium,
            _ => Quality::High,
        })
    });
    let msg = ClientMessage::TrackSettings {
        track_id: String::new(),
        quality: req.quality.or(by_layer),
        width: req.max_width,
        height: req.max_height,
    };
    match state.handle.client(&session.participant_id, msg).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(_) => not_found(Kind::Whep),
    }
}

/// `OPTIONS` on the layer extension.
async fn options_layer() -> Response {
    let mut res = StatusCode::NO_CONTENT.into_response();
    res = with_header(res, header::ALLOW, "POST, OPTIONS");
    res = with_header(
        res,
        HeaderName::from_static("accept-post"),
        "application/json",
    );
    with_header(res, header::ACCESS_CONTROL_MAX_AGE, "86400")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_requests() {
        let r: LayerRequest = serde_json::from_str(r#"{"quality":"low"}"#).unwrap();
        assert_eq!(r.quality, Some(Some(Quality::Low)));
        let r: LayerRequest = serde_json::from_str(r#"{"quality":null}"#).unwrap();
        assert_eq!(r.quality, Some(None));
        let r: LayerRequest = serde_json::from_str(r#"{"maxWidth":640}"#).unwrap();
        assert_eq!((r.quality, r.max_width), (None, Some(640)));
        assert!(serde_json::from_str::<LayerRequest>(r#"{"quality":"huge"}"#).is_err());
        let r: LayerRequest = serde_json::from_str(r#"{"spatialLayerId":1}"#).unwrap();
        assert_eq!(r.spatial_layer_id, Some(Some(1)));
        assert!(serde_json::from_str::<LayerRequest>(r#"{"encodingId":"h"}"#).is_err());
    }
}
