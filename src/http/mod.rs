//! HTTP front: the axum router.
//!
//! - `GET /healthz`: `{"status":"ok", ...CoreStats, "http":{...}}` (503
//!   `{"status":"unavailable"}` when the core does not answer); `http` holds the HTTP front's
//!   counters ([`limits::HttpStats`]: connections open, refusals, timeouts, rate limiting);
//! - `GET /rtc`: the signaling WebSocket (see [`ws`]);
//! - `GET /dev/token?room=R[&name=N][&identity=I][&grants=G][&ttl=S]`: in development mode
//!   only (no API key configured), an access token signed with the public development key, for
//!   the demo page (404 whenever keys are configured);
//! - `/api/...`: the room admin API (see [`admin`]);
//! - `/whip/...`: WHIP ingest, RFC 9725 (see [`whip`]);
//! - `/whep/...`: WHEP playback (see [`whep`]);
//! - `GET /dashboard`, `GET /dashboard/events`: the operator dashboard and its Server-Sent
//!   Events stream (see [`dashboard`]);
//! - `GET /watch?room=R…`: the WHEP player page, `signaling/watch.html` (served like the
//!   static files below; the page reads its query itself);
//! - everything else (`GET`/`HEAD`): files from the `signaling/` directory (demo page and JS
//!   client), `/` being `signaling/index.html`.

// Not the packet path: connection tasks share counters and limiters, and timeouts and rate
// limits read the clock.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

pub mod admin;
pub mod dashboard;
#[cfg(test)]
pub(crate) mod fake_core;
pub mod limits;
pub mod metrics;
pub mod prom;
pub mod resume;
pub mod serve;
pub mod whep;
pub mod whip;
pub mod ws;

use crate::auth::{self, KeySet, Verifier};
use crate::config::{
    Config, DEFAULT_IDLE_TIMEOUT, DEFAULT_JOIN_TIMEOUT, DEFAULT_MESSAGE_TIMEOUT,
    DEFAULT_WS_MESSAGE_BURST, DEFAULT_WS_MESSAGE_RATE,
};
use crate::sfu::SfuHandle;
use axum::{
    Json, Router,
    extract::{Query, State},
    http::{HeaderValue, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::get,
};
use limits::{ConnLimiter, HttpCounters};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// How long `/healthz`, `/stats` and `/metrics` wait for the core's counters.
const STATS_TIMEOUT: Duration = Duration::from_secs(2);

/// What the HTTP layer needs besides the core handle.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Largest WebSocket text message accepted from a client, in bytes.
    pub max_ws_message: usize,
    /// Where the demo page and JS client live.
    pub static_dir: PathBuf,
    /// A WebSocket that has not joined within this time is closed.
    pub join_timeout: Duration,
    /// A joined WebSocket that sends no frame for this long is closed; the server pings it
    /// every third of this.
    pub idle_timeout: Duration,
    /// A WebSocket message must complete within this time of its first byte.
    pub message_timeout: Duration,
    /// Signaling messages per second one session may send, sustained.
    pub ws_message_rate: f64,
    /// Signaling messages one session may send in a burst.
    pub ws_message_burst: usize,
    /// A session that has been rate limited without a pause of [`ws::FLOOD_PAUSE`] for this
    /// long is closed.
    pub flood_close_after: Duration,
    /// Checks the access token of every join (development mode when no key is configured).
    pub verifier: Verifier,
    /// Largest data-channel payload relayed (the admin API's `send data` too), in bytes.
    pub max_data_message: usize,
    /// A participant whose connection dropped is kept this long for a `resume` (0: never).
    pub resume_grace: Duration,
    /// STUN/TURN servers added to every `joined` (TURN with fresh credentials).
    pub ice: crate::turn::IceConfig,
    /// `/metrics` exports per-room gauges for at most this many rooms, the largest (0: none).
    pub metrics_room_labels: usize,
}

impl HttpSettings {
    /// Default settings with the default static directory ([`default_static_dir`]).
    pub fn new(max_ws_message: usize) -> Self {
        HttpSettings {
            max_ws_message,
            static_dir: default_static_dir(),
            join_timeout: DEFAULT_JOIN_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            message_timeout: DEFAULT_MESSAGE_TIMEOUT,
            ws_message_rate: DEFAULT_WS_MESSAGE_RATE,
            ws_message_burst: DEFAULT_WS_MESSAGE_BURST,
            flood_close_after: ws::FLOOD_CLOSE_AFTER,
            verifier: Verifier::new(KeySet::new()),
            max_data_message: crate::config::DEFAULT_MAX_DATA_MESSAGE,
            resume_grace: resume::DEFAULT_RESUME_GRACE,
            ice: crate::turn::IceConfig::none(),
            metrics_room_labels: 0,
        }
    }

    /// The HTTP layer's part of the server configuration.
    pub fn from_config(config: &Config) -> Self {
        HttpSettings {
            join_timeout: config.join_timeout,
            idle_timeout: config.idle_timeout,
            message_timeout: config.message_timeout,
            ws_message_rate: config.ws_message_rate,
            ws_message_burst: config.ws_message_burst,
            verifier: Verifier::new(config.keys.clone()),
            max_data_message: config.max_data_message,
            resume_grace: config.resume_grace,
            ice: config.ice.clone(),
            metrics_room_labels: config.metrics_room_labels,
            ..HttpSettings::new(config.max_ws_message)
        }
    }
}

/// `./signaling` if it exists (a deployment), else the source tree's `signaling/`.
pub fn default_static_dir() -> PathBuf {
    let local = PathBuf::from("signaling");
    if local.is_dir() {
        local
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("signaling")
    }
}

/// Shared state of every handler.
#[derive(Debug, Clone)]
pub struct AppState {
    pub(crate) handle: SfuHandle,
    pub(crate) settings: Arc<HttpSettings>,
    /// Flips to `true` when the server shuts down (ends sessions that have not joined yet).
    pub(crate) shutdown: watch::Receiver<bool>,
    /// Every WebSocket session holds a clone; the server waits until all are dropped.
    pub(crate) sessions: mpsc::Sender<()>,
    /// What the limits did (served under `"http"` in `/healthz` and `/stats`, and in `/metrics`).
    pub(crate) counters: Arc<HttpCounters>,
    /// The connection caps, when the server's own accept loop is used.
    pub(crate) limiter: Option<Arc<ConnLimiter>>,
    /// Sessions that may be resumed, by participant.
    pub(crate) resumable: resume::Registry,
    /// Open WHIP sessions, by id.
    pub(crate) whip: whip::session::Sessions,
    /// The dashboard's sampler and latest view, shared by its viewers.
    pub(crate) dashboard: dashboard::Hub,
    /// WebSocket join times (`join` received → `joined` sent), for `/metrics`.
    pub(crate) join_time: Arc<prom::JoinTimes>,
    /// The cluster registry's view, with `--redis`.
    pub(crate) cluster: Option<crate::cluster::ClusterView>,
}

impl AppState {
    pub fn new(
        handle: SfuHandle,
        settings: HttpSettings,
        shutdown: watch::Receiver<bool>,
        sessions: mpsc::Sender<()>,
    ) -> Self {
        AppState {
            handle,
            settings: Arc::new(settings),
            shutdown,
            sessions,
            counters: Arc::default(),
            limiter: None,
            resumable: resume::Registry::default(),
            whip: whip::session::Sessions::default(),
            dashboard: dashboard::Hub::default(),
            join_time: Arc::default(),
            cluster: None,
        }
    }

    /// The same state with the cluster registry's view (`None`: one node).
    pub fn with_cluster(mut self, cluster: Option<crate::cluster::ClusterView>) -> Self {
        self.cluster = cluster;
        self
    }

    /// The cluster counters, as served under `"cluster"` (`enabled: false` without `--redis`).
    pub fn cluster_stats(&self) -> crate::cluster::ClusterStats {
        self.cluster
            .as_ref()
            .map(crate::cluster::ClusterView::stats)
            .unwrap_or_default()
    }

    /// The same state with these counters and connection caps (shared with the accept loop).
    pub fn with_limits(mut self, counters: Arc<HttpCounters>, limiter: Arc<ConnLimiter>) -> Self {
        self.counters = counters;
        self.limiter = Some(limiter);
        self
    }

    /// The HTTP counters, as served under `"http"`.
    pub fn http_stats(&self) -> limits::HttpStats {
        self.counters.snapshot(self.limiter.as_deref())
    }
}

/// The router. Serve it with [`serve::serve`] (or, without the connection limits, with
/// `into_make_service_with_connect_info::<SocketAddr>()`).
pub fn router(state: AppState) -> Router {
    let max_body = state.settings.max_ws_message;
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics::metrics))
        .route("/stats", get(metrics::stats))
        .route("/rtc", get(ws::upgrade))
        .route("/dev/token", get(dev_token))
        .route("/watch", get(watch_page))
        .merge(admin::routes(state.clone()))
        .merge(dashboard::routes())
        .merge(whip::routes(max_body))
        .merge(whep::routes(max_body))
        .fallback(static_file)
        .with_state(state)
}

/// Asks the core for its counters (waiting at most [`STATS_TIMEOUT`]) and flattens them into
/// `{"status":"ok", ...CoreStats, "http":{...HttpStats}}`; `None` when the core does not answer
/// in time. Shared by `/healthz` and `/stats`.
pub(crate) async fn ok_stats_body(
    state: &AppState,
) -> Option<serde_json::Map<String, serde_json::Value>> {
    let stats = tokio::time::timeout(STATS_TIMEOUT, state.handle.stats())
        .await
        .ok()?
        .ok()?;
    let mut body = serde_json::Map::new();
    body.insert("status".into(), "ok".into());
    if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(&stats) {
        body.extend(fields);
    }
    body.insert("http".into(), http_json(state));
    body.insert(
        "cluster".into(),
        serde_json::to_value(state.cluster_stats()).unwrap_or_default(),
    );
    if let Some(w) = state.handle.webhooks() {
        body.insert(
            "webhooks".into(),
            serde_json::to_value(w.stats()).unwrap_or_default(),
        );
    }
    Some(body)
}

/// The bearer token of `Authorization`, if any (the admin API, WHIP/WHEP, the dashboard).
pub(crate) fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

pub(crate) fn http_json(state: &AppState) -> serde_json::Value {
    serde_json::to_value(state.http_stats()).unwrap_or_default()
}

async fn healthz(State(state): State<AppState>) -> Response {
    match ok_stats_body(&state).await {
        Some(body) => (StatusCode::OK, Json(serde_json::Value::Object(body))).into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "unavailable", "http": http_json(&state)})),
        )
            .into_response(),
    }
}

/// `GET /dev/token`: a token signed with the development key, in development mode only (404
/// otherwise, like any path that does not exist). Query: `room` (required), `name` (display
/// name), `identity` (default: a random `guest-…`), `grants` (comma-separated, as
/// `plaza token --grants`; default `publish,data,subscribe`), `ttl` (seconds, default 6 h).
/// Answers `{"token", "identity", "room", "api_key", "expires_at"}`, `400 {"error"}` for bad
/// parameters.
async fn dev_token(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if !state.settings.verifier.dev_mode() {
        return StatusCode::NOT_FOUND.into_response();
    }
    match dev_token_body(&query) {
        Ok(body) => (
            [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
            Json(body),
        )
            .into_response(),
        Err(error) => (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": error })),
        )
            .into_response(),
    }
}

fn dev_token_body(query: &HashMap<String, String>) -> Result<serde_json::Value, String> {
    let field = |name: &str| query.get(name).map(|v| v.trim()).filter(|v| !v.is_empty());
    let room = ws::validate_field("room", field("room").unwrap_or_default())?;
    let identity = match field("identity") {
        Some(identity) => ws::validate_field("identity", identity)?,
        None => format!("guest-{:08x}", rand::random::<u32>()),
    };
    let ttl = match field("ttl") {
        None => auth::DEFAULT_TTL,
        Some(s) => match s.parse::<u64>() {
            Ok(secs) if secs > 0 => Duration::from_secs(secs),
            _ => {
                return Err(format!(
                    "`ttl` must be a positive number of seconds, got {s:?}"
                ));
            }
        },
    };
    let grants = match field("grants") {
        None => auth::RoomGrants::participant(&room),
        Some(names) => auth::RoomGrants::participant(&room).with_names(names.split(','))?,
    };
    let mut claims = auth::Claims::new(&identity, &room, ttl).with_grants(grants);
    if let Some(name) = field("name") {
        claims = claims.with_name(ws::validate_field("name", name)?);
    }
    let token = auth::mint(&auth::ApiKey::dev(), &claims).map_err(|e| e.to_string())?;
    Ok(serde_json::json!({
        "token": token,
        "identity": identity,
        "room": room,
        "api_key": auth::DEV_API_KEY,
        "expires_at": claims.exp,
    }))
}

/// Map a request path to a file under the static directory, refusing anything that could
/// leave it (`..`, `.`, hidden files, backslashes, empty segments). `/` is `index.html`.
pub(crate) fn static_path(uri_path: &str) -> Option<PathBuf> {
    let rel = uri_path.strip_prefix('/')?;
    let rel = if rel.is_empty() { "index.html" } else { rel };
    let rel = if rel.ends_with('/') {
        format!("{rel}index.html")
    } else {
        rel.to_owned()
    };
    let mut out = PathBuf::new();
    for seg in rel.split('/') {
        if seg.is_empty()
            || seg.starts_with('.')
            || seg.contains('\\')
            || seg.contains('\0')
            || seg.contains(':')
        {
            return None;
        }
        out.push(seg);
    }
    Some(out)
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" | "htm" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "md" => "text/markdown; charset=utf-8",
        "txt" => "text/plain; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "ico" => "image/x-icon",
        "wasm" => "application/wasm",
        _ => "application/octet-stream",
    }
}

async fn static_file(State(state): State<AppState>, method: Method, uri: Uri) -> Response {
    if method != Method::GET && method != Method::HEAD {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET, HEAD")],
        )
            .into_response();
    }
    let Some(rel) = static_path(uri.path()) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    serve_static(&state, &method, &rel).await
}

/// `GET /watch`: the WHEP player page, `watch.html` from the static directory, served as the
/// fallback serves files (the query string is the page's business).
async fn watch_page(State(state): State<AppState>, method: Method) -> Response {
    serve_static(&state, &method, Path::new(WATCH_PAGE)).await
}

/// The player page `/watch` serves, under the static directory.
const WATCH_PAGE: &str = "watch.html";

/// The file `rel` (already checked by [`static_path`]) under the static directory, with its
/// content type; an empty body for `HEAD`; 404 when it cannot be read.
async fn serve_static(state: &AppState, method: &Method, rel: &Path) -> Response {
    let path = state.settings.static_dir.join(rel);
    match tokio::fs::read(&path).await {
        Ok(bytes) => {
            let body = if method == Method::HEAD {
                Vec::new()
            } else {
                bytes
            };
            (
                [
                    (
                        header::CONTENT_TYPE,
                        HeaderValue::from_static(content_type(&path)),
                    ),
                    (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
                ],
                body,
            )
                .into_response()
        }
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "static file not served");
            StatusCode::NOT_FOUND.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_paths_stay_inside() {
        assert_eq!(static_path("/"), Some(PathBuf::from("index.html")));
        assert_eq!(static_path("/plaza.js"), Some(PathBuf::from("plaza.js")));
        assert_eq!(
            static_path("/lib/a.js"),
            Some(PathBuf::from("lib").join("a.js"))
        );
        assert_eq!(
            static_path("/lib/"),
            Some(PathBuf::from("lib").join("index.html"))
        );
        for bad in [
            "/../Cargo.toml",
            "/a/../../x",
            "/./x",
            "/.git/config",
            "//etc/passwd",
            "/a\\..\\b",
            "/c:/x",
            "relative",
        ] {
            assert_eq!(static_path(bad), None, "{bad}");
        }
    }

    #[test]
    fn content_types() {
        assert_eq!(
            content_type(Path::new("index.html")),
            "text/html; charset=utf-8"
        );
        assert_eq!(
            content_type(Path::new("plaza.js")),
            "text/javascript; charset=utf-8"
        );
        assert_eq!(content_type(Path::new("x.bin")), "application/octet-stream");
    }

    /// `/watch` serves `watch.html` from the static directory, whatever the query; `HEAD` has
    /// no body; other methods are refused; without the file it is a 404.
    #[tokio::test]
    async fn watch_serves_the_player_page() {
        use axum::body::Body;
        use axum::http::Request;
        use tower_service::Service;

        let dir = std::env::temp_dir().join(format!("plaza-watch-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(WATCH_PAGE), "<!doctype html><title>watch</title>").unwrap();
        let (handle, _seen, _stopped) = fake_core::spawn();
        let (_stop, stop_rx) = watch::channel(false);
        let (sessions_tx, _sessions) = mpsc::channel(1);
        let settings = HttpSettings {
            static_dir: dir.clone(),
            ..HttpSettings::new(1024)
        };
        let mut app = router(AppState::new(handle, settings, stop_rx, sessions_tx));
        let mut send = async |method: Method, uri: &str| {
            let req = Request::builder()
                .method(method)
                .uri(uri)
                .body(Body::empty())
                .unwrap();
            let res = app.call(req).await.unwrap();
            let status = res.status();
            let ctype = res
                .headers()
                .get(header::CONTENT_TYPE)
                .map(|v| v.to_str().unwrap().to_owned());
            let body = axum::body::to_bytes(res.into_body(), 1 << 16)
                .await
                .unwrap();
            (status, ctype, String::from_utf8(body.to_vec()).unwrap())
        };

        for uri in ["/watch", "/watch?room=demo&quality=low&token=x.y.z"] {
            let (status, ctype, body) = send(Method::GET, uri).await;
            assert_eq!(status, StatusCode::OK, "{uri}");
            assert_eq!(ctype.as_deref(), Some("text/html; charset=utf-8"), "{uri}");
            assert_eq!(body, "<!doctype html><title>watch</title>", "{uri}");
        }
        let (status, ctype, body) = send(Method::HEAD, "/watch?room=demo").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(ctype.as_deref(), Some("text/html; charset=utf-8"));
        assert!(body.is_empty());
        let (status, _, _) = send(Method::POST, "/watch").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        // The file itself is still served by the fallback.
        let (status, _, body) = send(Method::GET, "/watch.html").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "<!doctype html><title>watch</title>");

        std::fs::remove_file(dir.join(WATCH_PAGE)).unwrap();
        let (status, _, _) = send(Method::GET, "/watch?room=demo").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
