//! Starting and stopping the server: the media UDP socket, the SFU core and the HTTP server.
//!
//! [`start`] binds both sockets (ports may be 0 for ephemeral ones), hands the UDP socket to
//! the core ([`crate::io::spawn`]) and serves the axum router. [`Server::shutdown`]
//! stops accepting connections, asks the core to shut down (it tells every participant
//! `leave` and closes their event channels, which ends their WebSocket sessions), waits for
//! the HTTP server and the sessions, and returns — within [`SHUTDOWN_TIMEOUT`] whatever
//! happens.
//!
//! The HTTP server is Plaza's own accept loop ([`http::serve`]): `TCP_NODELAY`, a header-read
//! timeout and connection caps. The total cap is lowered to what the process's open-file limit
//! allows ([`fd_budget`]), so running out of file descriptors cannot lock out new clients and
//! `/healthz`; [`raise_nofile_limit`] (called by the binary) raises that limit first.

// Not the packet path: setup and shutdown share handles between the HTTP server and the core,
// and the shutdown deadline reads the clock.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use crate::config::{Config, ConfigError};
use crate::http::limits::{ConnLimiter, HttpCounters, RESERVE};
use crate::http::serve::{REFUSALS_IN_FLIGHT, ServeOptions};
use crate::http::{self, AppState, HttpSettings};
use crate::io::MediaSockets;
use crate::sfu::core::CoreConfig;
use crate::sfu::{SfuError, SfuHandle};
use crate::webhook::Webhooks;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout_at};
use tracing::{info, warn};

/// Upper bound for [`Server::shutdown`].
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// File descriptors kept for everything but client connections: the UDP socket, the
/// listener, epoll, static files, logs, the runtime.
pub const FD_MARGIN: u64 = 64;

/// The process's open-file limit (soft, hard); `None` where it cannot be read.
#[allow(clippy::unnecessary_cast)] // `rlim_t` is not `u64` everywhere
#[allow(unsafe_code)] // getrlimit(2); see the SAFETY comment
pub fn nofile_limit() -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `getrlimit` writes into the struct we pass.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
            return Some((lim.rlim_cur as u64, lim.rlim_max as u64));
        }
        None
    }
    #[cfg(not(unix))]
    None
}

/// Raises the soft open-file limit (`RLIMIT_NOFILE`) to the hard limit: every connection is a
/// file descriptor, and the common soft limit of 1024 is reached by ~1000 idle sockets.
/// Returns the (soft, hard) limit in force afterwards.
#[allow(clippy::unnecessary_cast)] // `rlim_t` is not `u64` everywhere
#[allow(unsafe_code)] // setrlimit(2); see the SAFETY comment
pub fn raise_nofile_limit() -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        let (soft, hard) = nofile_limit()?;
        if soft < hard {
            let lim = libc::rlimit {
                rlim_cur: hard as libc::rlim_t,
                rlim_max: hard as libc::rlim_t,
            };
            // SAFETY: plain syscall with a valid struct.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
                warn!(
                    soft,
                    hard,
                    error = %std::io::Error::last_os_error(),
                    "cannot raise the open-file limit"
                );
            }
        }
        nofile_limit()
    }
    #[cfg(not(unix))]
    None
}

/// The total connection cap the open-file limit allows: `max_connections`, lowered when the
/// limit could not hold it plus the reserve, the refusals in flight and [`FD_MARGIN`].
pub fn fd_budget(max_connections: usize, nofile_soft: Option<u64>) -> usize {
    let Some(soft) = nofile_soft else {
        return max_connections;
    };
    let overhead = (RESERVE + REFUSALS_IN_FLIGHT) as u64 + FD_MARGIN;
    let room = soft.saturating_sub(overhead).max(1);
    max_connections.min(usize::try_from(room).unwrap_or(usize::MAX))
}

/// Why the server could not start (or stopped by itself).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen for HTTP on {addr}: {source}{}", in_use_hint(.source, "--port"))]
    BindHttp {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot bind the media UDP socket to {addr}: {source}{}", in_use_hint(.source, "--udp-port"))]
    BindUdp {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen for ICE-TCP on {addr}: {source}{}", in_use_hint(.source, "--tcp-port (or --tcp-port off)"))]
    BindTcp {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the media UDP socket: {0}")]
    UdpSetup(#[source] std::io::Error),
    #[error("cannot start the SFU core: {0}")]
    Core(#[from] SfuError),
    #[error("the server stopped unexpectedly: {0}")]
    Stopped(String),
    #[error("cannot start webhooks: {0}")]
    Webhooks(String),
    #[error("cannot start the cluster registry: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
}

fn in_use_hint(e: &std::io::Error, flag: &str) -> String {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => format!(
            " (another process, maybe another Plaza, uses this port: stop it or choose another \
             with {flag})"
        ),
        std::io::ErrorKind::AddrNotAvailable => {
            " (this host has no such address: check the bind address)".to_owned()
        }
        std::io::ErrorKind::PermissionDenied => {
            " (ports below 1024 need privileges: choose a higher one)".to_owned()
        }
        _ => String::new(),
    }
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    http_addr: SocketAddr,
    udp_addr: SocketAddr,
    udp_addrs: Vec<SocketAddr>,
    /// Every shard's ICE-TCP listen address (empty: ICE-TCP off).
    tcp_addrs: Vec<SocketAddr>,
    handle: SfuHandle,
    /// The webhook dispatcher, when webhook URLs are configured.
    webhooks: Option<Webhooks>,
    /// The node registry's heartbeat, with `--redis`.
    cluster: Option<crate::cluster::Registry>,
    /// `true` = stop: ends the HTTP server's accept loop and sessions that have not joined.
    stop: watch::Sender<bool>,
    http_task: Option<JoinHandle<std::io::Result<()>>>,
    core_stopped: Option<oneshot::Receiver<()>>,
    /// Yields `None` once every WebSocket session (and the router) is gone.
    sessions: mpsc::Receiver<()>,
}

/// Bind the sockets, start the core and the HTTP server.
pub async fn start(config: Config) -> Result<Server, ServerError> {
    start_with_core(config, crate::io::spawn).await
}

/// [`start`] with the core's `spawn` passed in (tests use a fake core).
pub(crate) async fn start_with_core<F>(config: Config, spawn_core: F) -> Result<Server, ServerError>
where
    F: FnOnce(
        CoreConfig,
        Vec<MediaSockets>,
    ) -> Result<(SfuHandle, oneshot::Receiver<()>), SfuError>,
{
    config.validate()?;
    let announce_ips = config.announce_ips()?;

    // One socket per shard: port udp_port + i (each ephemeral when udp_port is 0).
    let soft = nofile_limit().map(|(soft, _)| soft);
    let tcp_cap = crate::io::tcp::connection_cap(config.workers, soft);
    let mut sockets = Vec::with_capacity(config.workers);
    let mut udp_addrs = Vec::with_capacity(config.workers);
    let mut tcp_addrs = Vec::new();
    let cpus = if config.pin_shards {
        crate::io::allowed_cpus()
    } else {
        Vec::new()
    };
    for shard in 0..config.workers {
        let mut udp_want = config.udp_addr();
        if udp_want.port() != 0 {
            udp_want.set_port(udp_want.port() + shard as u16);
        }
        let socket =
            std::net::UdpSocket::bind(udp_want).map_err(|source| ServerError::BindUdp {
                addr: udp_want,
                source,
            })?;
        socket
            .set_nonblocking(true)
            .map_err(ServerError::UdpSetup)?;
        udp_addrs.push(socket.local_addr().map_err(ServerError::UdpSetup)?);
        // ICE-TCP: a listener per shard on the UDP bind address, port tcp_port + i.
        let tcp = match config.tcp_port() {
            None => None,
            Some(port) => {
                let port = if port == 0 { 0 } else { port + shard as u16 };
                let addr = SocketAddr::new(config.udp_bind, port);
                let listener = std::net::TcpListener::bind(addr)
                    .map_err(|source| ServerError::BindTcp { addr, source })?;
                tcp_addrs.push(listener.local_addr().map_err(ServerError::UdpSetup)?);
                Some(listener)
            }
        };
        sockets.push(MediaSockets {
            udp: socket,
            tcp,
            tcp_max: tcp_cap,
            cpu: crate::io::shard_cpu(&cpus, shard),
        });
    }
    let udp_addr = udp_addrs[0];

    let http_want = config.http_addr();
    let bind_http = |source| ServerError::BindHttp {
        addr: http_want,
        source,
    };
    let listener = TcpListener::bind(http_want).await.map_err(bind_http)?;
    let http_addr = listener.local_addr().map_err(bind_http)?;

    let webhooks = Webhooks::start(
        &config.webhook,
        config.webhook_key().map_err(ServerError::Webhooks)?,
    )
    .map_err(ServerError::Webhooks)?;
    let emitter = webhooks.as_ref().map(Webhooks::emitter);
    // In a cluster the core's room events are also published in Redis (`cluster::events`).
    let (room_events, core_emitter) = if config.cluster.redis.is_some() {
        let (tx, rx) = mpsc::channel(crate::cluster::events::QUEUE);
        let e = match emitter.clone() {
            Some(e) => e.with_tee(tx),
            None => crate::webhook::Emitter::tee_only(tx),
        };
        (Some(rx), Some(e))
    } else {
        (None, emitter.clone())
    };
    let (handle, core_stopped) = spawn_core(
        CoreConfig {
            announce_ips: announce_ips.clone(),
            max_data_message: config.max_data_message,
            limits: config.core_limits.clone(),
            udp_buffer: config.udp_buffer,
            spread_above: config.room_spread_above,
            history: config.history,
            input_tick_hz: config.input_tick_hz,
            webhooks: core_emitter,
            red: config.red,
        },
        sockets,
    )?;
    let handle = handle.with_webhooks(emitter);

    // ICE-TCP connections take descriptors too: HTTP gets what they leave.
    let tcp_fds = if tcp_addrs.is_empty() {
        0
    } else {
        (tcp_cap * tcp_addrs.len()) as u64
    };
    let max_connections = fd_budget(
        config.max_connections,
        soft.map(|s| s.saturating_sub(tcp_fds)),
    );
    if max_connections < config.max_connections {
        warn!(
            configured = config.max_connections,
            effective = max_connections,
            open_file_limit = soft,
            "the open-file limit cannot hold --max-connections: the cap is lowered (raise \
             `ulimit -n` / LimitNOFILE / compose `ulimits: nofile`)"
        );
    }
    handle.set_join_caps(config.join_caps());
    let counters = Arc::new(HttpCounters::default());
    let limiter = ConnLimiter::with_join_rate(
        max_connections,
        config.max_connections_per_ip,
        config.join_rate(),
        Arc::clone(&counters),
    );
    let (stop, stop_rx) = watch::channel(false);
    let (sessions_tx, sessions) = mpsc::channel(1);
    // With `--redis`: the heartbeat task (it never holds up the start: Redis may be down).
    let mut cluster = crate::cluster::Registry::start(
        &config.cluster,
        crate::cluster::NodeInfo {
            http_addr,
            udp_addrs: udp_addrs.clone(),
            announce_ips: announce_ips.clone(),
        },
        handle.clone(),
        Default::default(),
    )?;
    if let (Some(c), Some(rx)) = (cluster.as_mut(), room_events) {
        c.publish_room_events(rx);
    }
    let state = AppState::new(
        handle.clone(),
        HttpSettings::from_config(&config),
        stop_rx.clone(),
        sessions_tx,
    )
    .with_limits(Arc::clone(&counters), Arc::clone(&limiter))
    .with_cluster(cluster.as_ref().map(crate::cluster::Registry::view));
    let app = http::router(state);
    let opts = ServeOptions {
        header_timeout: config.header_timeout,
        limiter,
        counters,
    };
    let http_task = tokio::spawn(http::serve::serve(listener, app, opts, stop_rx));
    info!(
        %http_addr,
        udp = ?udp_addrs,
        tcp = ?tcp_addrs,
        workers = config.workers,
        ?announce_ips,
        max_connections,
        max_connections_per_ip = config.max_connections_per_ip,
        max_rooms = config.max_rooms,
        max_participants_per_room = config.max_participants_per_room,
        max_joins_per_ip = config.max_joins_per_ip,
        join_burst_per_ip = config.join_burst_per_ip,
        "plaza started"
    );
    if config.keys.is_empty() {
        warn!(
            api_key = crate::auth::DEV_API_KEY,
            "DEVELOPMENT MODE: no API key configured, so joins need tokens signed with the \
             public development key (`plaza token` makes them) and GET /dev/token hands them to \
             anyone; set --api-key/--api-secret (PLAZA_API_KEY/PLAZA_API_SECRET) or [keys] in \
             the config file before exposing this server"
        );
    } else {
        let keys: Vec<&str> = config.keys.key_names().collect();
        info!(
            ?keys,
            "access tokens: API keys configured, development token endpoint off"
        );
    }
    Ok(Server {
        http_addr,
        udp_addr,
        udp_addrs,
        tcp_addrs,
        handle,
        webhooks,
        cluster,
        stop,
        http_task: Some(http_task),
        core_stopped: Some(core_stopped),
        sessions,
    })
}

impl Server {
    /// The bound HTTP/WebSocket address (with the real port when 0 was asked for).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The first shard's bound media UDP address (with the real port when 0 was asked for).
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_addr
    }

    /// Every shard's bound media UDP address, in shard order.
    pub fn udp_addrs(&self) -> &[SocketAddr] {
        &self.udp_addrs
    }

    /// Every shard's ICE-TCP listen address, in shard order (empty: ICE-TCP off).
    pub fn tcp_addrs(&self) -> &[SocketAddr] {
        &self.tcp_addrs
    }

    /// The core's command handle.
    pub fn handle(&self) -> &SfuHandle {
        &self.handle
    }

    /// Graceful shutdown, bounded by [`SHUTDOWN_TIMEOUT`].
    pub async fn shutdown(mut self) {
        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
        // Leave the cluster first, so no one is sent here any more (bounded by the registry).
        if let Some(cluster) = self.cluster.take() {
            cluster.deregister().await;
        }
        // Stop accepting connections; sessions that have not joined close themselves.
        let _ = self.stop.send(true);
        // The core says `leave` to everyone and closes their event channels.
        if timeout_at(deadline, self.handle.shutdown()).await.is_err() {
            warn!("the SFU core did not shut down in time");
        }
        if let Some(mut task) = self.http_task.take() {
            match timeout_at(deadline, &mut task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => warn!(error = %e, "HTTP server failed"),
                Ok(Err(e)) => warn!(error = %e, "HTTP server task failed"),
                Err(_) => {
                    warn!("HTTP server did not stop in time");
                    task.abort();
                }
            }
        }
        // Let the sessions send their last frames and close.
        if timeout_at(deadline, self.sessions.recv()).await.is_err() {
            warn!("some WebSocket sessions did not close in time");
        }
        if let Some(core) = self.core_stopped.take() {
            if timeout_at(deadline, core).await.is_err() {
                warn!("the SFU core did not stop in time");
            }
        }
        // Deliver the last events (the participants' `participant_left`) while time is left.
        if let Some(w) = self.webhooks.take() {
            w.finish(deadline.into_std()).await;
        }
        info!("plaza stopped");
    }

    /// Resolves if the HTTP server or the core stops on its own.
    async fn stopped_by_itself(&mut self) -> String {
        enum Which {
            Http(String),
            Core,
        }
        let which = match (self.http_task.as_mut(), self.core_stopped.as_mut()) {
            (Some(http), Some(core)) => tokio::select! {
                r = http => Which::Http(match r {
                    Ok(Ok(())) => "the HTTP server ended".to_owned(),
                    Ok(Err(e)) => format!("the HTTP server failed: {e}"),
                    Err(e) => format!("the HTTP server task failed: {e}"),
                }),
                _ = core => Which::Core,
            },
            _ => std::future::pending().await,
        };
        match which {
            Which::Http(reason) => {
                self.http_task = None;
                reason
            }
            Which::Core => {
                self.core_stopped = None;
                "the SFU core stopped".to_owned()
            }
        }
    }
}

/// Start, log the addresses, run until `shutdown` resolves, then shut down gracefully.
/// Returns an error if startup fails or a component stops by itself.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    let announce = config.announce_ips()?;
    let mut server = start(config).await?;
    let http = server.http_addr();
    let demo = if http.ip().is_unspecified() {
        SocketAddr::new(announce[0], http.port())
    } else {
        http
    };
    let udp = server.udp_addrs();
    let media = match udp {
        [one] => format!("udp {one}"),
        [first, .., last] => format!("udp {first} … port {} ({} shards)", last.port(), udp.len()),
        [] => String::new(),
    };
    info!("signaling on ws://{demo}/rtc, media on {media}, demo page at http://{demo}/");
    let failure = tokio::select! {
        () = shutdown => None,
        reason = server.stopped_by_itself() => Some(reason),
    };
    match &failure {
        None => info!("shutting down"),
        Some(reason) => warn!(%reason, "shutting down"),
    }
    server.shutdown().await;
    match failure {
        None => Ok(()),
        Some(reason) => Err(ServerError::Stopped(reason)),
    }
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            warn!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => info!("received Ctrl-C"),
        () = term => info!("received SIGTERM"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::fake_core::{self, Seen};
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::Message as WsMessage;

    fn test_config() -> Config {
        Config {
            port: 0,
            udp_port: 0,
            ..Config::default()
        }
    }

    async fn start_fake(config: Config) -> (Server, mpsc::UnboundedReceiver<Seen>) {
        let (handle, seen, stopped) = fake_core::spawn();
        let server = start_with_core(config, move |cfg, socket| {
            assert_eq!(
                cfg.announce_ips,
                vec!["127.0.0.1".parse::<std::net::IpAddr>().unwrap()]
            );
            assert_eq!(
                cfg.max_data_message,
                crate::config::DEFAULT_MAX_DATA_MESSAGE
            );
            assert!(!socket.is_empty());
            assert!(
                socket
                    .iter()
                    .all(|s| s.udp.local_addr().unwrap().port() != 0)
            );
            assert!(socket.iter().all(|s| s.tcp.is_some()));
            Ok((handle, stopped))
        })
        .await
        .unwrap();
        (server, seen)
    }

    async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out[9..12].parse().unwrap();
        let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
        (status, body)
    }

    #[tokio::test]
    async fn ephemeral_ports_health_and_graceful_shutdown() {
        let (server, mut seen) = start_fake(test_config()).await;
        let http = server.http_addr();
        assert_ne!(http.port(), 0);
        assert_ne!(server.udp_addr().port(), 0);
        assert_eq!(server.udp_addr().ip(), http.ip());

        let (status, body) = http_get(http, "/healthz").await;
        assert_eq!(status, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "ok");
        assert_eq!(v["participants"], 0);
        let (status, _) = http_get(http, "/../Cargo.toml").await;
        assert_eq!(status, 404);

        // One joined session and one that never joins.
        let (mut joined, _) = tokio_tungstenite::connect_async(format!("ws://{http}/rtc"))
            .await
            .unwrap();
        joined
            .send(WsMessage::text(
                serde_json::json!({"type":"join","room":"r","name":"a",
                                   "token": crate::auth::dev_token("r", "a")})
                .to_string(),
            ))
            .await
            .unwrap();
        let m = joined.next().await.unwrap().unwrap();
        assert!(m.to_text().unwrap().contains(r#""type":"joined""#), "{m:?}");
        let (mut idle, _) = tokio_tungstenite::connect_async(format!("ws://{http}/rtc"))
            .await
            .unwrap();
        assert_eq!(server.handle().stats().await.unwrap().participants, 1);

        // Clients read concurrently, as real ones do, so close handshakes complete at once.
        let joined = tokio::spawn(async move {
            let mut got = Vec::new();
            while let Some(Ok(m)) = joined.next().await {
                got.push(m);
            }
            got
        });
        let idle = tokio::spawn(async move { idle.next().await });

        let started = std::time::Instant::now();
        server.shutdown().await;
        assert!(
            started.elapsed() < SHUTDOWN_TIMEOUT,
            "{:?}",
            started.elapsed()
        );

        let got = joined.await.unwrap();
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(
            got[0].to_text().unwrap(),
            r#"{"type":"leave","reason":"shutdown"}"#
        );
        match &got[1] {
            WsMessage::Close(Some(frame)) => {
                assert_eq!(u16::from(frame.code), 1000);
                assert_eq!(frame.reason.as_str(), "shutdown");
            }
            other => panic!("expected close, got {other:?}"),
        }
        match idle.await.unwrap() {
            Some(Ok(WsMessage::Close(Some(frame)))) => assert_eq!(u16::from(frame.code), 1001),
            other => panic!("expected close, got {other:?}"),
        }
        let mut log = Vec::new();
        while let Ok(s) = seen.try_recv() {
            log.push(s);
        }
        // The session's `disconnect` comes after the core stopped: nobody hears it.
        assert_eq!(
            log,
            vec![
                Seen::Join {
                    room: "r".into(),
                    name: "a".into()
                },
                Seen::Shutdown
            ]
        );
        // The listener is closed.
        assert!(tokio::net::TcpStream::connect(http).await.is_err());
    }

    #[tokio::test]
    async fn port_in_use_is_a_clear_error() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let config = Config {
            port,
            ..test_config()
        };
        let err = start_with_core(config, |_, _| -> Result<_, SfuError> {
            panic!("the core must not start when binding fails")
        })
        .await
        .unwrap_err();
        assert!(matches!(err, ServerError::BindHttp { .. }), "{err}");
        let text = err.to_string();
        assert!(
            text.contains(&port.to_string()) && text.contains("--port"),
            "{text}"
        );

        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let config = Config {
            udp_port: udp.local_addr().unwrap().port(),
            ..test_config()
        };
        let err = start_with_core(config, |_, _| -> Result<_, SfuError> { panic!() })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("--udp-port"), "{err}");
    }

    #[tokio::test]
    async fn invalid_config_is_refused() {
        let config = Config {
            udp_bind: "0.0.0.0".parse().unwrap(),
            ..test_config()
        };
        let err = start_with_core(config, |_, _| -> Result<_, SfuError> { panic!() })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("--announce-ip"), "{err}");
    }
}
