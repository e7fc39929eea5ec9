//! The accept loop: serves the router over HTTP/1.1 (with WebSocket upgrades) on every
//! accepted TCP connection, with the protections `axum::serve` does not have:
//!
//! - `TCP_NODELAY` on every connection (`joined` and `subscribe_offer` are two small writes;
//!   with Nagle the second waits for the client's delayed ACK, ≈ 40 ms per join);
//! - a header-read timeout (slowloris): a connection that has not sent a complete request
//!   head within `header_timeout` — including one that sends nothing, and a keep-alive
//!   connection idle between requests — is closed;
//! - connection caps ([`ConnLimiter`]): past the per-address cap, or past the total cap and
//!   its reserve, the connection gets a canned `503 Service Unavailable` with `Retry-After`
//!   and is closed; connections in the reserve serve everything but `/rtc`, without
//!   keep-alive. Measured on the 2-core development machine, a refusal with the 503 costs the
//!   server ≈ 54 µs of CPU, closing at once ≈ 30 µs (the accept itself is most of both), so
//!   under a flood of refused connections the 503 is sent to at most [`REFUSAL_RATE`] per
//!   second ([`REFUSALS_IN_FLIGHT`] at once) and the rest are closed at once;
//! - bytes read are counted per connection ([`CountingIo`]) for the WebSocket message timeout.
//!
//! Graceful shutdown: when the stop flag flips, the listener is closed, idle connections are
//! closed at once and busy ones get [`GRACE`] to finish their response; upgraded WebSockets
//! are no longer connections of this loop (their sessions end through the core's shutdown).

use super::limits::{Admission, ConnLimiter, ConnMeta, CountingIo, HttpCounters, TokenBucket};
use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tower_service::Service;
use tracing::{debug, warn};

/// Refusals (canned 503s) being written at once; beyond this, refused connections are
/// closed without a word.
pub const REFUSALS_IN_FLIGHT: usize = 64;
/// Refusals answered with a 503 per second (and in a burst); beyond this, closed at once.
pub const REFUSAL_RATE: usize = 200;
/// How long a refusal may take to write its 503 and see the client close.
const REFUSAL_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a busy connection may take to finish after shutdown begins.
pub const GRACE: Duration = Duration::from_secs(2);
/// Pause after an accept error (e.g. out of file descriptors) before accepting again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// At most one warning per this interval for accept errors.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// What a client told to wait should wait, in seconds.
pub const RETRY_AFTER_S: u32 = 5;

/// The refusal sent to a connection over a cap.
fn refusal(reason: &str) -> Vec<u8> {
    let body = format!("{reason}: try again later\n");
    format!(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: {RETRY_AFTER_S}\r\n\
         Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// What [`serve`] needs besides the listener and the router.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub header_timeout: Duration,
    pub limiter: Arc<ConnLimiter>,
    pub counters: Arc<HttpCounters>,
}

/// Accept and serve connections until `stop` flips to `true`; then stop accepting and return
/// once every connection task has ended (each is bounded by [`GRACE`] after the stop).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    opts: ServeOptions,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let (conn_tx, mut conn_rx) = mpsc::channel::<()>(1);
    let refusals = Arc::new(Semaphore::new(REFUSALS_IN_FLIGHT));
    let mut polite = TokenBucket::new(REFUSAL_RATE as f64, REFUSAL_RATE, Instant::now());
    let mut last_warn: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = wait_stop(&mut stop) => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                HttpCounters::inc(&opts.counters.accept_errors);
                if last_warn.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                    warn!(error = %e, "accept failed (out of file descriptors?); backing off");
                    last_warn = Some(Instant::now());
                }
                tokio::select! {
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => continue,
                    () = wait_stop(&mut stop) => break,
                }
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            debug!(%peer, error = %e, "cannot set TCP_NODELAY");
        }
        match opts.limiter.admit(peer.ip()) {
            Ok(meta) => {
                tokio::spawn(serve_connection(
                    stream,
                    peer,
                    meta,
                    router.clone(),
                    opts.clone(),
                    stop.clone(),
                    conn_tx.clone(),
                ));
            }
            Err(why) if polite.take(Instant::now()) => refuse(stream, peer, why, &refusals),
            Err(why) => debug!(%peer, ?why, "connection refused (closed at once)"),
        }
    }
    drop(listener);
    drop(conn_tx);
    // Every connection task holds a sender; `None` once all have ended.
    let _ = conn_rx.recv().await;
    Ok(())
}

/// Resolves when the stop flag is set (or its sender is gone).
async fn wait_stop(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Answer a refused connection with a 503 (bounded), or close it at once.
fn refuse(stream: TcpStream, peer: SocketAddr, why: Admission, refusals: &Arc<Semaphore>) {
    debug!(%peer, ?why, "connection refused");
    let Ok(permit) = Arc::clone(refusals).try_acquire_owned() else {
        return; // dropped: closed at once
    };
    let reason = match why {
        Admission::RefusedPerIp => "too many connections from your address",
        _ => "too many connections",
    };
    tokio::spawn(async move {
        let _permit = permit;
        let mut stream = stream;
        let _ = tokio::time::timeout(REFUSAL_TIMEOUT, async {
            stream.write_all(&refusal(reason)).await?;
            stream.shutdown().await?;
            // Read until the client closes: closing with unread data would send a reset,
            // which can destroy the response before the client reads it.
            let mut sink = [0u8; 1024];
            while stream.read(&mut sink).await? > 0 {}
            std::io::Result::Ok(())
        })
        .await;
    });
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    meta: ConnMeta,
    router: Router,
    opts: ServeOptions,
    mut stop: watch::Receiver<bool>,
    _done: mpsc::Sender<()>,
) {
    let reserve = meta.is_reserve();
    let io = TokioIo::new(CountingIo::new(stream, meta.byte_counter()));
    let service = service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        req.extensions_mut().insert(meta.clone());
        let mut router = router.clone();
        async move { router.call(req).await }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(opts.header_timeout)
        .keep_alive(!reserve);
    let conn = builder.serve_connection(io, service).with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = wait_stop(&mut stop) => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(GRACE, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => {
                    debug!(%peer, "connection did not finish in time after shutdown");
                    return;
                }
            }
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            HttpCounters::inc(&opts.counters.header_timeouts);
            debug!(%peer, "request headers not received in time: connection closed");
        } else {
            debug!(%peer, error = %e, "connection ended with an error");
        }
    }
}
