//! Shared helpers for the integration tests: the real server started in-process on
//! 127.0.0.1 with ephemeral ports, a minimal HTTP/1.1 GET for `/healthz`, a raw WebSocket
//! client for protocol-error tests, and media-flow waits on top of the synthetic [`Peer`].
//!
//! Every test file imports the kit and this module:
//!
//! ```ignore
//! use plaza_testkit::{self as common, support};
//! ```

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use plaza::config::Config;
use plaza::server::Server;
use plaza::signal::{ClientMessage, ErrorCode, ServerMessage, TrackInfo, TrackKind};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{Peer, PeerOptions, RemoteTrackStats};

/// Bound of every wait. Generous: the CI machine is slow and shared; tests normally finish
/// their waits in well under a second.
pub const T: Duration = Duration::from_secs(30);

/// Logs for the tests: `RUST_LOG=plaza=debug cargo test --test integration media:: -- --nocapture`.
/// Silent unless `RUST_LOG` is set.
pub fn init_tracing() {
    if let Ok(filter) = std::env::var("RUST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// The test configuration: everything on 127.0.0.1, ephemeral HTTP and UDP ports.
pub fn test_config() -> Config {
    Config {
        bind: "127.0.0.1".parse().unwrap(),
        port: 0,
        udp_bind: "127.0.0.1".parse().unwrap(),
        udp_port: 0,
        ..Config::default()
    }
}

/// A real Plaza server running in this process.
pub struct TestServer {
    server: Option<Server>,
    pub http_addr: SocketAddr,
    pub udp_addr: SocketAddr,
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::start_with(test_config()).await
    }

    pub async fn start_with(config: Config) -> TestServer {
        init_tracing();
        let server = plaza::server::start(config)
            .await
            .expect("the server starts on ephemeral ports");
        let http_addr = server.http_addr();
        let udp_addr = server.udp_addr();
        assert_ne!(http_addr.port(), 0);
        assert_ne!(udp_addr.port(), 0);
        TestServer {
            server: Some(server),
            http_addr,
            udp_addr,
        }
    }

    /// The signaling WebSocket URL.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/rtc", self.http_addr)
    }

    /// Graceful shutdown; returns how long it took.
    pub async fn shutdown(mut self) -> Duration {
        let server = self.server.take().expect("not shut down yet");
        let started = Instant::now();
        // `Server::shutdown` bounds itself (5 s); this outer bound only catches a hang.
        tokio::time::timeout(Duration::from_secs(20), server.shutdown())
            .await
            .expect("Server::shutdown returned");
        started.elapsed()
    }

    pub async fn healthz(&self) -> Result<(u16, Value)> {
        healthz(self.http_addr).await
    }

    /// Polls `/healthz` until `pred` holds (there is no event for the core's counters).
    /// Bounded by `timeout`; returns the last body.
    pub async fn wait_healthz(
        &self,
        what: &str,
        mut pred: impl FnMut(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, body) = self.healthz().await?;
            if status == 200 && pred(&body) {
                return Ok(body);
            }
            if Instant::now() >= deadline {
                bail!("healthz: {what} not reached in {timeout:?}; last: {status} {body}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A minimal HTTP/1.1 GET (no new dependencies): status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    http_request(addr, "GET", path, &[], "").await
}

/// An HTTP response: status, headers (names lowercase, in order), body.
#[derive(Debug, Clone)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpReply {
    /// The first header `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.all(name).into_iter().next()
    }

    /// Every header `name` (any case), in order.
    pub fn all(&self, name: &str) -> Vec<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// One HTTP/1.1 request with exactly these headers (plus `Host`, `Connection: close` and the
/// body's `Content-Length`) and body; the response with its headers. Bounded by 10 s.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<HttpReply> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || matches!(method, "POST" | "PATCH" | "PUT") {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(head.as_bytes()).await?;
        // The server may answer (413) before reading the whole body, and close.
        let _ = s.write_all(body).await;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        anyhow::Ok(out)
    };
    let out = tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| anyhow!("{method} {path}: no complete response in 10 s"))??;
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("{method} {path}: no header end in {text:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("{method} {path}: bad status line in {head:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Ok(HttpReply {
        status,
        headers,
        body,
    })
}

/// A request with a JSON body (`Content-Type: application/json` whenever there is a body or
/// the method may take one) and these extra headers: status and body.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<(u16, String)> {
    let mut all = headers.to_vec();
    if !body.is_empty() || !matches!(method, "GET" | "HEAD") {
        all.push(("Content-Type", "application/json"));
    }
    let reply = http(addr, method, path, &all, body.as_bytes()).await?;
    Ok((reply.status, reply.body))
}

fn dechunk(mut body: &str) -> Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body
            .split_once("\r\n")
            .ok_or_else(|| anyhow!("bad chunk"))?;
        let size = usize::from_str_radix(size.trim(), 16).context("chunk size")?;
        if size == 0 {
            return Ok(out);
        }
        out.push_str(rest.get(..size).ok_or_else(|| anyhow!("short chunk"))?);
        body = rest.get(size + 2..).unwrap_or("");
    }
}

/// `GET /healthz` as JSON.
pub async fn healthz(addr: SocketAddr) -> Result<(u16, Value)> {
    let (status, body) = http_get(addr, "/healthz").await?;
    let v = serde_json::from_str(&body).with_context(|| format!("healthz body {body:?}"))?;
    Ok((status, v))
}

/// `GET /stats` (the JSON counters) as JSON.
pub async fn stats(addr: SocketAddr) -> Result<(u16, Value)> {
    let (status, body) = http_get(addr, "/stats").await?;
    let v = serde_json::from_str(&body).with_context(|| format!("stats body {body:?}"))?;
    Ok((status, v))
}

/// The `forward_latency` buckets (`[upper bound µs, count]`) of a `/stats` body.
pub fn latency_buckets(stats: &Value) -> Vec<(u64, u64)> {
    stats
        .pointer("/forward_latency/buckets")
        .and_then(|b| serde_json::from_value(b.clone()).ok())
        .unwrap_or_default()
}

/// Quantile `q` of the in-core forwarding latency between two `/stats` snapshots, in µs
/// (`None`: nothing was forwarded in between).
pub fn window_latency_us(earlier: &Value, later: &Value, q: f64) -> Option<u64> {
    plaza::sfu::latency::window_quantile_us(&latency_buckets(earlier), &latency_buckets(later), q)
}

/// Packets forwarded in the core between two `/stats` snapshots.
pub fn window_latency_count(earlier: &Value, later: &Value) -> u64 {
    let total = |v: &Value| latency_buckets(v).iter().map(|(_, c)| c).sum::<u64>();
    total(later).saturating_sub(total(earlier))
}

// ───────────────────────────── peers ─────────────────────────────

/// Options with the tests' bound on every connect step.
pub fn opts(publish: bool) -> PeerOptions {
    let base = if publish {
        PeerOptions::publisher()
    } else {
        PeerOptions::subscriber()
    };
    PeerOptions {
        timeout: T,
        keep_recent_packets: 1000,
        ..base
    }
}

pub async fn publisher(server: &TestServer, room: &str, name: &str) -> Peer {
    Peer::connect(&server.ws_url(), room, name, opts(true))
        .await
        .unwrap_or_else(|e| panic!("{name} connects and publishes: {e:#}"))
}

pub async fn subscriber(server: &TestServer, room: &str, name: &str) -> Peer {
    Peer::connect(&server.ws_url(), room, name, opts(false))
        .await
        .unwrap_or_else(|e| panic!("{name} connects: {e:#}"))
}

/// The server's announcement of `publisher`'s track of `kind`, as `viewer` saw it.
pub async fn announced_track(viewer: &Peer, publisher: &Peer, kind: TrackKind) -> TrackInfo {
    let pid = publisher.participant_id().to_owned();
    viewer
        .wait_for_room_track(|t| t.participant_id == pid && t.kind == kind, T)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{} learns about {}'s {kind:?} track: {e:#}",
                viewer.name(),
                publisher.name()
            )
        })
}

pub fn packets(peer: &Peer, track_id: &str) -> u64 {
    peer.remote_track(track_id).map_or(0, |t| t.packets)
}

/// Waits until `peer` has received `n` more packets on `track_id` than it had when called.
pub async fn wait_growth(peer: &Peer, track_id: &str, n: u64) -> RemoteTrackStats {
    let from = packets(peer, track_id);
    peer.wait_for_packets(track_id, from + n, T)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{}: {n} more packets on {track_id} (had {from}; now {}): {e:#}",
                peer.name(),
                packets(peer, track_id)
            )
        })
}

/// Asserts that every listed (receiver, track) keeps receiving media: `n` more packets each,
/// counted from when this is called (the flows are watched together, not one after another).
pub async fn assert_media_flows(what: &str, flows: &[(&Peer, &str)], n: u64) {
    let from: Vec<u64> = flows.iter().map(|(p, t)| packets(p, t)).collect();
    for ((peer, track), from) in flows.iter().zip(from) {
        if let Err(e) = peer.wait_for_packets(track, from + n, T).await {
            panic!(
                "{what}: {} stopped receiving {track} (had {from}, now {}): {e:#}",
                peer.name(),
                packets(peer, track)
            );
        }
    }
}

/// The `error` messages `peer` got at event index `from` or later.
pub fn errors_after(peer: &Peer, from: usize) -> Vec<(ErrorCode, String, Option<String>)> {
    peer.events()
        .into_iter()
        .skip(from)
        .filter_map(|e| match e.event {
            crate::PeerEvent::Server(ServerMessage::Error {
                code,
                message,
                request,
            }) => Some((code, message, request)),
            _ => None,
        })
        .collect()
}

// ───────────────────────────── raw WebSocket ─────────────────────────────

/// A bare signaling connection, for sending what a well-behaved client never would.
pub struct RawWs {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

/// What a raw read yielded.
#[derive(Debug)]
pub enum Received {
    Msg(ServerMessage),
    /// The server closed the connection (close code and reason, if a close frame came).
    Closed(Option<(u16, String)>),
}

impl RawWs {
    pub async fn connect(url: &str) -> Result<RawWs> {
        let (ws, _) = tokio::time::timeout(T, tokio_tungstenite::connect_async(url))
            .await
            .map_err(|_| anyhow!("websocket connect timed out"))??;
        Ok(RawWs { ws })
    }

    pub async fn send_text(&mut self, text: impl Into<String>) -> Result<()> {
        let text: String = text.into();
        tokio::time::timeout(T, self.ws.send(Message::text(text)))
            .await
            .map_err(|_| anyhow!("websocket send timed out"))??;
        Ok(())
    }

    pub async fn send_binary(&mut self, data: Vec<u8>) -> Result<()> {
        tokio::time::timeout(T, self.ws.send(Message::binary(data)))
            .await
            .map_err(|_| anyhow!("websocket send timed out"))??;
        Ok(())
    }

    /// Sends every message of `texts` as fast as the connection takes them (flushing every
    /// 256 messages rather than after each).
    pub async fn send_burst(&mut self, texts: impl IntoIterator<Item = String>) -> Result<()> {
        let burst = async {
            for (i, text) in texts.into_iter().enumerate() {
                self.ws.feed(Message::text(text)).await?;
                if i % 256 == 255 {
                    self.ws.flush().await?;
                }
            }
            self.ws.flush().await
        };
        tokio::time::timeout(T, burst)
            .await
            .map_err(|_| anyhow!("websocket burst timed out"))??;
        Ok(())
    }

    pub async fn send_msg(&mut self, msg: &ClientMessage) -> Result<()> {
        self.send_text(serde_json::to_string(msg)?).await
    }

    /// The next server message or the close; skips WebSocket pings/pongs.
    pub async fn recv(&mut self) -> Result<Received> {
        next_received(&mut self.ws).await
    }

    /// Send a message the server will refuse before it has read it all (beyond its hard size
    /// limit) while reading what the server says: the server answers (and closes) while the
    /// client is still sending, so the send may fail half-way; that is not an error here.
    pub async fn send_unreadable_and_recv(self, text: String) -> Result<Received> {
        let (mut sink, mut stream) = self.ws.split();
        let send = async move {
            let _ = sink.send(Message::text(text)).await;
            std::future::pending::<()>().await
        };
        tokio::select! {
            r = next_received(&mut stream) => r,
            () = send => unreachable!("the send future never completes"),
        }
    }

    /// Reads until a message matching `pred` (others are skipped; a close is an error).
    pub async fn recv_until(
        &mut self,
        what: &str,
        mut pred: impl FnMut(&ServerMessage) -> bool,
    ) -> Result<ServerMessage> {
        loop {
            match self
                .recv()
                .await
                .with_context(|| format!("waiting for {what}"))?
            {
                Received::Msg(m) if pred(&m) => return Ok(m),
                Received::Msg(_) => continue,
                Received::Closed(c) => bail!("closed while waiting for {what}: {c:?}"),
            }
        }
    }

    /// Reads until an `error` (other messages, e.g. offers, are skipped).
    pub async fn expect_error(&mut self) -> Result<(ErrorCode, String, Option<String>)> {
        match self
            .recv_until("an error", |m| matches!(m, ServerMessage::Error { .. }))
            .await?
        {
            ServerMessage::Error {
                code,
                message,
                request,
            } => Ok((code, message, request)),
            _ => unreachable!(),
        }
    }

    /// `ping` → `pong` with the same `ts`: the session is alive and in step.
    pub async fn ping(&mut self, ts: f64) -> Result<()> {
        self.send_msg(&ClientMessage::Ping { ts: Some(ts) }).await?;
        self.recv_until(
            "pong",
            |m| matches!(m, ServerMessage::Pong { ts: Some(x), .. } if *x == ts),
        )
        .await?;
        Ok(())
    }

    /// Join `room` as `name` with a participant token ([`crate::token::participant`]);
    /// the participant id.
    pub async fn join(&mut self, room: &str, name: &str) -> Result<String> {
        let token = crate::token::participant(room, name);
        self.join_with(room, name, Some(&token)).await
    }

    /// Join with this token (or none); the participant id, or the refusal as an error.
    pub async fn join_with(
        &mut self,
        room: &str,
        name: &str,
        token: Option<&str>,
    ) -> Result<String> {
        self.send_msg(&ClientMessage::Join {
            room: room.to_owned(),
            name: name.to_owned(),
            token: token.map(str::to_owned),
            protocol: None,
            auto_subscribe: None,
            timeline_events: None,
        })
        .await?;
        match self
            .recv_until("joined or error", |m| {
                matches!(
                    m,
                    ServerMessage::Joined { .. } | ServerMessage::Error { .. }
                )
            })
            .await?
        {
            ServerMessage::Joined { participant_id, .. } => Ok(participant_id),
            other => bail!("join refused: {other:?}"),
        }
    }

    pub async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.ws.close(None)).await;
    }
}

/// The next server message or the close from a raw WebSocket stream; skips pings/pongs.
async fn next_received<S>(ws: &mut S) -> Result<Received>
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let item = tokio::time::timeout_at(deadline, ws.next())
            .await
            .map_err(|_| anyhow!("nothing from the server in {T:?}"))?;
        match item {
            None => return Ok(Received::Closed(None)),
            Some(Err(e)) => bail!("websocket error: {e}"),
            Some(Ok(Message::Text(t))) => {
                let msg = serde_json::from_str(&t)
                    .with_context(|| format!("not a server message: {t}"))?;
                return Ok(Received::Msg(msg));
            }
            Some(Ok(Message::Close(frame))) => {
                return Ok(Received::Closed(
                    frame.map(|f| (u16::from(f.code), f.reason.to_string())),
                ));
            }
            Some(Ok(Message::Binary(b))) => bail!("unexpected binary frame {b:?}"),
            Some(Ok(_)) => continue,
        }
    }
}
