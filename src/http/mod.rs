//! HTTP front: the axum router.
//!
//! - `GET /healthz`: `{"status":"ok", ...CoreStats}` (503 `{"status":"unavailable"}` when the
//!   core does not answer);
//! - `GET /rtc`: the signaling WebSocket (see [`ws`]);
//! - everything else (`GET`/`HEAD`): files from the `signaling/` directory (demo page and JS
//!   client), `/` being `signaling/index.html`.

#[cfg(test)]
pub(crate) mod fake_core;
pub mod metrics;
pub mod ws;

use crate::sfu::SfuHandle;
use axum::{
    Json, Router,
    extract::State,
    http::{HeaderValue, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
    routing::get,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// How long `/healthz` and `/metrics` wait for the core's counters.
const STATS_TIMEOUT: Duration = Duration::from_secs(2);

/// What the HTTP layer needs besides the core handle.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Largest WebSocket text message accepted from a client, in bytes.
    pub max_ws_message: usize,
    /// Where the demo page and JS client live.
    pub static_dir: PathBuf,
}

impl HttpSettings {
    /// Settings with the default static directory ([`default_static_dir`]).
    pub fn new(max_ws_message: usize) -> Self {
        HttpSettings {
            max_ws_message,
            static_dir: default_static_dir(),
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
        }
    }
}

/// The router. Serve it with `into_make_service_with_connect_info::<SocketAddr>()`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics::metrics))
        .route("/rtc", get(ws::upgrade))
        .fallback(static_file)
        .with_state(state)
}

/// Asks the core for its counters (waiting at most [`STATS_TIMEOUT`]) and flattens them into
/// `{"status":"ok", ...CoreStats}`; `None` when the core does not answer in time. Shared by
/// `/healthz` and `/metrics`.
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
    Some(body)
}

async fn healthz(State(state): State<AppState>) -> Response {
    match ok_stats_body(&state).await {
        Some(body) => (StatusCode::OK, Json(serde_json::Value::Object(body))).into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({"status": "unavailable"})),
        )
            .into_response(),
    }
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
}
