//! Server configuration: command-line flags, `PLAZA_*` environment variables and an optional
//! TOML file.
//!
//! Precedence, per setting: **flag > environment > file > built-in default**. The file is named
//! with `--config FILE` (or `PLAZA_CONFIG`); its keys are the long flag names in snake_case:
//!
//! ```toml
//! bind = "0.0.0.0"
//! port = 7880
//! udp_bind = "0.0.0.0"
//! udp_port = 7882          # shard i listens on udp_port + i
//! tcp_port = 7882          # ICE-TCP, shard i on tcp_port + i; default: udp_port; "off"
//! workers = 4               # core shards; default: one per CPU
//! room_spread_above = 100   # a room this big spreads over the shards (0: never)
//! metrics_room_labels = 0  # per-room gauges on /metrics for the N largest rooms (0: off)
//! history_messages = 1024    # chat messages each room keeps for replay (0: none)
//! history_max_age = 600      # seconds a kept chat message stays replayable
//! input_tick_hz = 0          # rooms batch input per tick at this rate (0: off; at most 240)
//! red = true                 # negotiate redundant audio (RFC 2198) next to Opus
//! pin_shards = false         # pin shard i's thread to the i-th allowed CPU
//! announce_ip = ["203.0.113.7"]   # or a single string
//! log_level = "info,plaza=debug"
//! log_format = "json"
//! max_ws_message = 65536
//! max_data_message = 16384
//! join_timeout = 10          # seconds; fractions allowed
//! max_connections_per_ip = 64
//! max_rooms = 10000          # 0: unlimited
//! max_participants_per_room = 1000
//! max_joins_per_ip = 20      # per second, sustained; 0: unlimited
//! data_message_rate = 100    # data-channel messages per participant per second; 0: unlimited
//! join_burst_per_ip = 100
//! turn_urls = ["turn:turn.example.com:3478?transport=udp", "turns:turn.example.com:443?transport=tcp"]
//! turn_secret = "the coturn static-auth-secret"   # keep this file private
//! turn_ttl = 86400           # seconds the TURN credentials handed out at join stay valid
//!
//! [keys]                     # API key → secret (at least 32 bytes); none: development mode
//! APIkey1 = "a-secret-of-at-least-32-bytes-0123456789"
//! ```
//!
//! API keys: `--api-key`/`--api-secret` (or `PLAZA_API_KEY`/`PLAZA_API_SECRET`; each of the
//! two from the flag, else the environment) name one key; when neither is set the file's
//! `[keys]` table is used. Secrets are never printed (`Debug` redacts them). With no key at
//! all the server runs in development mode ([`crate::auth`]).
//!
//! TURN: `--turn-url` (repeatable or comma-separated; `PLAZA_TURN_URLS`) and `--turn-secret`
//! (`PLAZA_TURN_SECRET`) go together; every `joined` then carries time-limited credentials
//! ([`crate::turn`]). The TURN secret is never printed either.
//!
//! Webhooks: `--webhook-url` (repeatable or comma-separated; `PLAZA_WEBHOOK_URLS`; none: off)
//! and `--webhook-queue`, `--webhook-retry-for`, `--webhook-backoff-min`/`-max`,
//! `--webhook-timeout`, `--webhook-api-key` ([`crate::webhook`]). They are signed with the
//! secret of `--webhook-api-key`, else of the first configured API key (by name), else of the
//! development key.
//!
//! Cluster: `--redis URL` (`PLAZA_REDIS`; none: one node, no Redis code runs), `--node-id`,
//! `--node-address`, `--cluster-span-above`, `--cluster-link-port` ([`crate::cluster`]). The URL's password is redacted in `Debug` output.
//!
//! The loader takes the environment as a lookup function ([`Config::load_from`]), so tests
//! never depend on the process environment. Empty environment variables count as unset
//! (handy with compose files). `RUST_LOG` is honoured as a lower-priority alias of
//! `PLAZA_LOG_LEVEL`.

use clap::{Parser, ValueEnum};
use serde::Deserialize;
use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use crate::auth::{self, ApiKey, Claims, KeySet, RoomGrants, Secret};
use crate::http::limits::JoinRate;
use crate::sfu::CoreLimits;
use crate::sfu::placement::JoinCaps;
use crate::turn::{self, IceConfig};
use std::collections::BTreeMap;

/// Default HTTP/WebSocket port.
pub const DEFAULT_PORT: u16 = 7880;
/// Default media (UDP) port.
pub const DEFAULT_UDP_PORT: u16 = 7882;
/// Default largest WebSocket message accepted from a client, in bytes.
pub const DEFAULT_MAX_WS_MESSAGE: usize = 64 * 1024;
/// Default largest data-channel payload relayed, in bytes.
pub const DEFAULT_MAX_DATA_MESSAGE: usize = 16 * 1024;

/// Default time a WebSocket may take to `join`.
pub const DEFAULT_JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a joined WebSocket may stay without sending a frame (pongs count).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time a participant whose connection dropped is kept for a `resume`.
pub const DEFAULT_RESUME_GRACE: Duration = crate::http::resume::DEFAULT_RESUME_GRACE;
/// Default time a client may take to send its HTTP request headers (also the keep-alive idle
/// time between requests).
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a WebSocket message may take from its first byte to its last.
pub const DEFAULT_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default cap of open HTTP/WebSocket connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default cap of open connections from one client address (IPv6: one /64).
pub const DEFAULT_MAX_CONNECTIONS_PER_IP: usize = 64;
/// Default sustained rate of signaling messages one session may send, per second.
pub const DEFAULT_WS_MESSAGE_RATE: f64 = 50.0;
/// Default burst of signaling messages one session may send at once.
pub const DEFAULT_WS_MESSAGE_BURST: usize = 200;
/// Default cap of rooms open on the server at once.
pub const DEFAULT_MAX_ROOMS: usize = 10_000;
/// Default cap of participants in one room (over all its shards).
pub const DEFAULT_MAX_PARTICIPANTS_PER_ROOM: usize = 1000;
/// Default sustained rate of joins from one client address, per second.
pub const DEFAULT_MAX_JOINS_PER_IP: f64 = 20.0;
/// Default burst of joins from one client address.
pub const DEFAULT_JOIN_BURST_PER_IP: usize = 100;
/// Shortest and longest accepted timeout, in seconds.
pub const TIMEOUT_RANGE_S: (f64, f64) = (0.01, 86_400.0);
/// Largest accepted count for the caps and limits.
pub const MAX_COUNT: usize = 10_000_000;

/// Smallest accepted `max_ws_message` (an SDP offer needs a few KiB).
pub const MIN_WS_MESSAGE: usize = 1024;
/// Largest accepted `max_ws_message`.
pub const MAX_WS_MESSAGE: usize = 16 * 1024 * 1024;
/// Largest accepted `max_data_message`: the SCTP maximum message size `rtc` advertises
/// (`a=max-message-size:65536`) less room for the relay header (`{"from":"PA_…"}` + newline).
pub const MAX_DATA_MESSAGE: usize = 65_536 - 256;
/// Most core shards (`--workers`).
pub const MAX_WORKERS: usize = 256;
/// Participants from which a room spreads over the shards (`--room-spread-above`).
pub const DEFAULT_ROOM_SPREAD_ABOVE: usize = 100;

/// The ICE-TCP port setting (`--tcp-port`): where each shard accepts ICE over TCP (RFC 6544,
/// passive candidates), shard *i* on the port plus *i* like UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TcpPort {
    /// The UDP port's number (TCP and UDP ports are separate: shard *i* takes TCP and UDP
    /// `udp_port + i`; ephemeral when `udp_port` is 0).
    #[default]
    SameAsUdp,
    /// This port (0: each shard an ephemeral one).
    Port(u16),
    /// No ICE-TCP: no TCP listener, no TCP candidates.
    Off,
}

impl FromStr for TcpPort {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "off" | "false" | "no" | "none" => Ok(TcpPort::Off),
            "udp" => Ok(TcpPort::SameAsUdp),
            n => n
                .parse::<u16>()
                .map(TcpPort::Port)
                .map_err(|_| format!("expected a port (0 … 65535), `udp` or `off`, got `{n}`")),
        }
    }
}

impl<'de> Deserialize<'de> for TcpPort {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Port(u16),
            On(bool),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Port(p) => Ok(TcpPort::Port(p)),
            Raw::On(true) => Ok(TcpPort::SameAsUdp),
            Raw::On(false) => Ok(TcpPort::Off),
            Raw::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// One core shard per CPU the process may use.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_WORKERS))
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("expected `text` or `json`, got `{other}`")),
        }
    }
}

/// The effective server configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The TOML file the settings were read from, if any.
    pub config_file: Option<PathBuf>,
    /// HTTP/WebSocket bind address.
    pub bind: IpAddr,
    /// HTTP/WebSocket port (0 = ephemeral).
    pub port: u16,
    /// Media UDP bind address.
    pub udp_bind: IpAddr,
    /// Media UDP port (0 = ephemeral).
    pub udp_port: u16,
    /// ICE-TCP port (see [`Config::tcp_port`] for the effective one).
    pub tcp_port: TcpPort,
    /// IPs written into the server's ICE candidates. Empty means "the UDP bind address"
    /// (see [`Config::announce_ips`]); [`Config::load_from`] fills it in.
    pub announce_ips: Vec<IpAddr>,
    /// `tracing_subscriber::EnvFilter` directive, e.g. `info` or `info,plaza=debug`.
    pub log_level: String,
    pub log_format: LogFormat,
    /// Largest WebSocket text message accepted from a client, in bytes.
    pub max_ws_message: usize,
    /// Largest data-channel payload relayed, in bytes.
    pub max_data_message: usize,
    /// Receive and send buffer asked of the kernel for the media UDP socket, in bytes.
    pub udp_buffer: usize,
    /// Shards of the SFU core, each one thread (one core) with its own UDP socket on port
    /// `udp_port + i`.
    pub workers: usize,
    /// A room with this many participants spreads its later joins over the shards (the least
    /// loaded first); smaller rooms stay on one shard. 0: rooms never spread.
    pub room_spread_above: usize,
    /// Per-room gauges on `/metrics` for at most this many rooms, the largest (0: none).
    pub metrics_room_labels: usize,
    /// Bounds of each room's `chat` history (`--history-messages`, `--history-max-age`).
    pub history: crate::sfu::timeline::HistoryLimits,
    /// Input tick rate of rooms whose opening token sets none (`--input-tick-hz`; 0: off).
    pub input_tick_hz: u32,
    /// Negotiate RFC 2198 redundant audio (`audio/red`) next to Opus (`--no-red`: off).
    pub red: bool,
    /// Pin shard `i`'s thread to the `i`-th CPU this process may run on (`--pin-shards`).
    pub pin_shards: bool,
    /// A WebSocket that has not joined within this time is closed.
    pub join_timeout: Duration,
    /// A joined WebSocket that sends no frame for this long is closed (the server pings it).
    pub idle_timeout: Duration,
    /// A participant whose WebSocket dropped is kept this long for a `resume` (0: never).
    pub resume_grace: Duration,
    /// Time allowed for a request's HTTP headers (and between keep-alive requests).
    pub header_timeout: Duration,
    /// Time allowed for one WebSocket message, first byte to last.
    pub message_timeout: Duration,
    /// Open connections in total (a small reserve above it serves `/healthz`, `/stats` and `/metrics`).
    pub max_connections: usize,
    /// Open connections from one client address (IPv6: one /64).
    pub max_connections_per_ip: usize,
    /// Signaling messages per second one session may send, sustained.
    pub ws_message_rate: f64,
    /// Signaling messages one session may send in a burst.
    pub ws_message_burst: usize,
    /// Rooms open on the server at once (0: unlimited).
    pub max_rooms: usize,
    /// Participants in one room, over all its shards (0: unlimited).
    pub max_participants_per_room: usize,
    /// Joins per second from one client address (IPv6: one /64), sustained (0: unlimited).
    pub max_joins_per_ip: f64,
    /// Joins from one client address at once.
    pub join_burst_per_ip: usize,
    /// Per-participant and per-turn limits of the SFU core.
    pub core_limits: CoreLimits,
    /// API keys that sign access tokens. Empty: development mode (the public development key).
    pub keys: KeySet,
    /// STUN/TURN servers handed to every joining client (TURN with time-limited credentials).
    pub ice: IceConfig,
    /// Where and how events are POSTed (no URL: off).
    pub webhook: crate::webhook::WebhookConfig,
    /// The cluster control plane (`--redis`; none: one node, no Redis code runs).
    pub cluster: crate::cluster::ClusterConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            config_file: None,
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: DEFAULT_PORT,
            udp_bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            udp_port: DEFAULT_UDP_PORT,
            tcp_port: TcpPort::SameAsUdp,
            announce_ips: Vec::new(),
            log_level: "info".to_owned(),
            log_format: LogFormat::Text,
            max_ws_message: DEFAULT_MAX_WS_MESSAGE,
            max_data_message: DEFAULT_MAX_DATA_MESSAGE,
            udp_buffer: crate::io::UDP_BUFFER_DEFAULT,
            workers: default_workers(),
            room_spread_above: DEFAULT_ROOM_SPREAD_ABOVE,
            metrics_room_labels: 0,
            history: Default::default(),
            input_tick_hz: 0,
            red: true,
            pin_shards: false,
            join_timeout: DEFAULT_JOIN_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            resume_grace: DEFAULT_RESUME_GRACE,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            message_timeout: DEFAULT_MESSAGE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: DEFAULT_MAX_CONNECTIONS_PER_IP,
            ws_message_rate: DEFAULT_WS_MESSAGE_RATE,
            ws_message_burst: DEFAULT_WS_MESSAGE_BURST,
            max_rooms: DEFAULT_MAX_ROOMS,
            max_participants_per_room: DEFAULT_MAX_PARTICIPANTS_PER_ROOM,
            max_joins_per_ip: DEFAULT_MAX_JOINS_PER_IP,
            join_burst_per_ip: DEFAULT_JOIN_BURST_PER_IP,
            core_limits: CoreLimits::default(),
            keys: KeySet::new(),
            ice: IceConfig::none(),
            webhook: Default::default(),
            cluster: Default::default(),
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Bad command line, or `--help` / `--version` (call [`clap::Error::exit`]).
    #[error(transparent)]
    Cli(#[from] clap::Error),
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    ParseFile { path: PathBuf, message: String },
    #[error("invalid value {value:?} in environment variable {var}: {message}")]
    Env {
        var: &'static str,
        value: String,
        message: String,
    },
    #[error(
        "the UDP bind address is {udp_bind} (unspecified), so Plaza cannot know which IP to put \
         in its ICE candidates: set --announce-ip (or PLAZA_ANNOUNCE_IP) to the address clients \
         reach this host at"
    )]
    AnnounceIpRequired { udp_bind: IpAddr },
    #[error("--announce-ip {0} is not usable in an ICE candidate (unspecified or multicast)")]
    BadAnnounceIp(IpAddr),
    #[error("invalid --log-level {directive:?}: {message}")]
    LogLevel { directive: String, message: String },
    #[error("--{name} must be between {min} and {max} bytes, got {value}")]
    OutOfRange {
        name: &'static str,
        value: usize,
        min: usize,
        max: usize,
    },
    #[error("invalid API keys: {0}")]
    Keys(String),
    #[error("invalid TURN/STUN settings: {0}")]
    Turn(String),
    #[error("invalid webhook settings: {0}")]
    Webhook(String),
    #[error("--{name} must be {expected}, got {value}")]
    Invalid {
        name: &'static str,
        value: String,
        expected: String,
    },
}

/// Command-line flags. Every setting is optional here so the layers can be merged.
#[derive(Debug, Parser)]
#[command(
    name = "plaza",
    version,
    about = "Plaza: a WebRTC SFU for media and data channels",
    after_help = "Every flag can also be set with a PLAZA_* environment variable (e.g. \
                  PLAZA_UDP_PORT) or in the TOML file given with --config. Precedence: flag > \
                  environment > file > default."
)]
#[command(args_conflicts_with_subcommands = true)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML config file [env: PLAZA_CONFIG]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// API key that signs access tokens; with --api-secret. None (and no [keys] in the file):
    /// development mode [env: PLAZA_API_KEY]
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// Secret of --api-key, at least 32 bytes; prefer the environment variable (a flag shows
    /// in `ps`) [env: PLAZA_API_SECRET]
    #[arg(long, value_name = "SECRET")]
    api_secret: Option<Secret>,
    /// HTTP/WebSocket bind address [env: PLAZA_BIND] [default: 127.0.0.1]
    #[arg(long, value_name = "IP")]
    bind: Option<IpAddr>,
    /// HTTP/WebSocket port, 0 = ephemeral [env: PLAZA_PORT] [default: 7880]
    #[arg(long)]
    port: Option<u16>,
    /// Media UDP bind address [env: PLAZA_UDP_BIND] [default: 127.0.0.1]
    #[arg(long, value_name = "IP")]
    udp_bind: Option<IpAddr>,
    /// Media UDP port, 0 = ephemeral [env: PLAZA_UDP_PORT] [default: 7882]
    #[arg(long)]
    udp_port: Option<u16>,
    /// ICE-TCP port of the first shard (shard i: tcp-port + i), 0 = ephemeral, `off` = no
    /// ICE-TCP [env: PLAZA_TCP_PORT] [default: the UDP port]
    #[arg(long, value_name = "N|off")]
    tcp_port: Option<TcpPort>,
    /// IP(s) put in ICE candidates; repeatable or comma-separated [env: PLAZA_ANNOUNCE_IP]
    /// [default: the UDP bind address]
    #[arg(long = "announce-ip", value_name = "IP", value_delimiter = ',')]
    announce_ip: Vec<IpAddr>,
    /// Log filter directive (EnvFilter syntax) [env: PLAZA_LOG_LEVEL, RUST_LOG] [default: info]
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
    /// Log format [env: PLAZA_LOG_FORMAT] [default: text]
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Largest WebSocket message from a client, bytes [env: PLAZA_MAX_WS_MESSAGE]
    /// [default: 65536]
    #[arg(long, value_name = "BYTES")]
    max_ws_message: Option<usize>,
    /// Largest data-channel payload relayed, bytes [env: PLAZA_MAX_DATA_MESSAGE]
    /// [default: 16384]
    #[arg(long, value_name = "BYTES")]
    max_data_message: Option<usize>,
    /// Media UDP socket receive/send buffer, bytes [env: PLAZA_UDP_BUFFER]
    /// [default: 8388608]
    #[arg(long, value_name = "BYTES")]
    udp_buffer: Option<usize>,
    /// Core shards, one thread and one UDP port (udp-port + i) each [env: PLAZA_WORKERS]
    /// [default: the number of CPUs]
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// A room with this many participants spreads over the shards; 0: never
    /// [env: PLAZA_ROOM_SPREAD_ABOVE] [default: 100]
    #[arg(long, value_name = "N")]
    room_spread_above: Option<usize>,
    /// `/metrics` exports per-room gauges (room label) for at most this many rooms, the
    /// largest; 0: none [env: PLAZA_METRICS_ROOM_LABELS] [default: 0]
    #[arg(long, value_name = "N")]
    metrics_room_labels: Option<usize>,
    /// Chat messages (and room events) each room keeps for `history` replays; 0: none
    /// [env: PLAZA_HISTORY_MESSAGES] [default: 1024]
    #[arg(long, value_name = "N")]
    history_messages: Option<usize>,
    /// Seconds a kept chat message stays replayable [env: PLAZA_HISTORY_MAX_AGE] [default: 600]
    #[arg(long, value_name = "SECONDS")]
    history_max_age: Option<f64>,
    /// Rooms batch their input lane in ticks of this rate, unless the token that opens a
    /// room sets its own; 0: off, at most 240 [env: PLAZA_INPUT_TICK_HZ] [default: 0]
    #[arg(long, value_name = "HZ")]
    input_tick_hz: Option<u32>,
    /// Do not negotiate redundant audio (RFC 2198 `audio/red`): Opus alone
    /// [env: PLAZA_RED=false]
    #[arg(long)]
    no_red: bool,
    /// Pin each core shard's thread to its own CPU: shard i to the i-th CPU the process may
    /// run on (wrapping around), so the shards of a spread room fan out side by side
    /// [env: PLAZA_PIN_SHARDS=true] [default: off]
    #[arg(long)]
    pin_shards: bool,
    /// Seconds a WebSocket may take to join [env: PLAZA_JOIN_TIMEOUT] [default: 10]
    #[arg(long, value_name = "SECONDS")]
    join_timeout: Option<f64>,
    /// Seconds a joined WebSocket may send no frame (the server pings every third of it)
    /// [env: PLAZA_IDLE_TIMEOUT] [default: 30]
    #[arg(long, value_name = "SECONDS")]
    idle_timeout: Option<f64>,
    /// Seconds a participant whose WebSocket dropped is kept for a resume (0: no resume)
    /// [env: PLAZA_RESUME_GRACE] [default: 20]
    #[arg(long, value_name = "SECONDS")]
    resume_grace: Option<f64>,
    /// Seconds allowed for a request's HTTP headers and between keep-alive requests
    /// [env: PLAZA_HEADER_TIMEOUT] [default: 10]
    #[arg(long, value_name = "SECONDS")]
    header_timeout: Option<f64>,
    /// Seconds allowed for one WebSocket message, first byte to last
    /// [env: PLAZA_MESSAGE_TIMEOUT] [default: 10]
    #[arg(long, value_name = "SECONDS")]
    message_timeout: Option<f64>,
    /// Open HTTP/WebSocket connections in total [env: PLAZA_MAX_CONNECTIONS] [default: 4096]
    #[arg(long, value_name = "N")]
    max_connections: Option<usize>,
    /// Open connections per client address (IPv6: per /64) [env: PLAZA_MAX_CONNECTIONS_PER_IP]
    /// [default: 64]
    #[arg(long, value_name = "N")]
    max_connections_per_ip: Option<usize>,
    /// Signaling messages per second per session, sustained [env: PLAZA_WS_MESSAGE_RATE]
    /// [default: 50]
    #[arg(long, value_name = "PER_SECOND")]
    ws_message_rate: Option<f64>,
    /// Signaling messages per session in a burst [env: PLAZA_WS_MESSAGE_BURST] [default: 200]
    #[arg(long, value_name = "N")]
    ws_message_burst: Option<usize>,
    /// Rooms open at once; a join that would open one more gets too_many_rooms; 0: unlimited
    /// [env: PLAZA_MAX_ROOMS] [default: 10000]
    #[arg(long, value_name = "N")]
    max_rooms: Option<usize>,
    /// Participants per room (over all its shards); more get room_full; 0: unlimited
    /// [env: PLAZA_MAX_PARTICIPANTS_PER_ROOM] [default: 1000]
    #[arg(long, value_name = "N")]
    max_participants_per_room: Option<usize>,
    /// Joins per second per client address (IPv6: per /64), sustained; more get
    /// join_rate_limited; 0: unlimited [env: PLAZA_MAX_JOINS_PER_IP] [default: 20]
    #[arg(long, value_name = "PER_SECOND")]
    max_joins_per_ip: Option<f64>,
    /// Joins per client address at once [env: PLAZA_JOIN_BURST_PER_IP] [default: 100]
    #[arg(long, value_name = "N")]
    join_burst_per_ip: Option<usize>,
    /// Remote ICE candidates per peer connection [env: PLAZA_MAX_REMOTE_CANDIDATES]
    /// [default: 64]
    #[arg(long, value_name = "N")]
    max_remote_candidates: Option<usize>,
    /// Tracks one participant may publish [env: PLAZA_MAX_PUBLISHED_TRACKS] [default: 16]
    #[arg(long, value_name = "N")]
    max_published_tracks: Option<usize>,
    /// Tracks one participant may subscribe to [env: PLAZA_MAX_SUBSCRIPTIONS] [default: 512]
    #[arg(long, value_name = "N")]
    max_subscriptions: Option<usize>,
    /// Data-channel messages one participant may send per second, sustained (0: unlimited)
    /// [env: PLAZA_DATA_MESSAGE_RATE] [default: 100]
    #[arg(long, value_name = "N")]
    data_message_rate: Option<usize>,
    /// Data-channel messages one participant may send at once [env: PLAZA_DATA_MESSAGE_BURST]
    /// [default: 200]
    #[arg(long, value_name = "N")]
    data_message_burst: Option<usize>,
    /// Data-channel bytes one participant may send per second, sustained (0: unlimited; bursts
    /// of twice this) [env: PLAZA_DATA_BYTE_RATE] [default: 1048576]
    #[arg(long, value_name = "BYTES")]
    data_byte_rate: Option<usize>,
    /// Ids in one subscribe/unsubscribe message [env: PLAZA_MAX_IDS_PER_MESSAGE]
    /// [default: 512]
    #[arg(long, value_name = "N")]
    max_ids_per_message: Option<usize>,
    /// Client commands the core handles per turn before serving media again
    /// [env: PLAZA_COMMANDS_PER_TURN] [default: 64]
    #[arg(long, value_name = "N")]
    commands_per_turn: Option<usize>,
    /// TURN server URL(s) handed to clients with time-limited credentials, e.g.
    /// turn:turn.example.com:3478?transport=udp; repeatable or comma-separated; needs
    /// --turn-secret [env: PLAZA_TURN_URLS] [default: none]
    #[arg(long = "turn-url", value_name = "URL", value_delimiter = ',')]
    turn_url: Vec<String>,
    /// Secret shared with the TURN server (coturn static-auth-secret), at least 16 bytes;
    /// prefer the environment variable (a flag shows in `ps`) [env: PLAZA_TURN_SECRET]
    #[arg(long, value_name = "SECRET")]
    turn_secret: Option<Secret>,
    /// Seconds the TURN credentials handed out at join stay valid [env: PLAZA_TURN_TTL]
    /// [default: 86400]
    #[arg(long, value_name = "SECONDS")]
    turn_ttl: Option<u64>,
    /// STUN server URL(s) handed to clients, e.g. stun:stun.example.com:3478; repeatable or
    /// comma-separated [env: PLAZA_STUN_URLS] [default: none]
    #[arg(long = "stun-url", value_name = "URL", value_delimiter = ',')]
    stun_url: Vec<String>,
    /// URL(s) webhook events are POSTed to (http:// or https://); repeatable or
    /// comma-separated [env: PLAZA_WEBHOOK_URLS] [default: none: webhooks off]
    #[arg(long = "webhook-url", value_name = "URL", value_delimiter = ',')]
    webhook_url: Vec<String>,
    /// Redis URL of the cluster control plane, e.g. redis://10.0.0.5:6379/0; the node
    /// registers itself there [env: PLAZA_REDIS] [default: none: one node, no Redis]
    #[arg(long, value_name = "URL")]
    redis: Option<String>,
    /// This node's id in the cluster [env: PLAZA_NODE_ID] [default: a random ND_ id]
    #[arg(long, value_name = "ID")]
    node_id: Option<String>,
    /// HTTP address other nodes and clients use to reach this node, e.g. 10.0.0.6:7880
    /// [env: PLAZA_NODE_ADDRESS] [default: the announced IP and the HTTP port]
    #[arg(long, value_name = "HOST:PORT")]
    node_address: Option<String>,
    /// A room with this many participants on its node is extended to the other nodes: joins
    /// through another node are served there, which receives the room's media over the node
    /// link [env: PLAZA_CLUSTER_SPAN_ABOVE] [default: 0: never, joins go to the room's node]
    #[arg(long = "cluster-span-above", value_name = "N")]
    cluster_span_above: Option<usize>,
    /// UDP port of the encrypted node-to-node link (on the media bind address); other nodes
    /// must reach it [env: PLAZA_CLUSTER_LINK_PORT] [default: 0: an ephemeral port]
    #[arg(long = "cluster-link-port", value_name = "PORT")]
    cluster_link_port: Option<u16>,
    /// Webhook events that may wait (from the server, and per URL); more are dropped
    /// [env: PLAZA_WEBHOOK_QUEUE] [default: 10000]
    #[arg(long, value_name = "N")]
    webhook_queue: Option<usize>,
    /// Seconds a failing webhook event is retried before it is dropped
    /// [env: PLAZA_WEBHOOK_RETRY_FOR] [default: 300]
    #[arg(long, value_name = "SECONDS")]
    webhook_retry_for: Option<f64>,
    /// Seconds before the first webhook retry (doubling, jittered)
    /// [env: PLAZA_WEBHOOK_BACKOFF_MIN] [default: 0.5]
    #[arg(long, value_name = "SECONDS")]
    webhook_backoff_min: Option<f64>,
    /// Longest wait between webhook retries, in seconds [env: PLAZA_WEBHOOK_BACKOFF_MAX]
    /// [default: 30]
    #[arg(long, value_name = "SECONDS")]
    webhook_backoff_max: Option<f64>,
    /// Seconds a webhook request may take [env: PLAZA_WEBHOOK_TIMEOUT] [default: 10]
    #[arg(long, value_name = "SECONDS")]
    webhook_timeout: Option<f64>,
    /// The API key whose secret signs webhooks [env: PLAZA_WEBHOOK_API_KEY] [default: the
    /// first configured API key by name; the development key in development mode]
    #[arg(long, value_name = "KEY")]
    webhook_api_key: Option<String>,
}

/// A string or a list of strings (for `announce_ip` in the file).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(IpAddr),
    Many(Vec<IpAddr>),
}

/// A string or a list of strings (for `turn_urls` and `stun_urls` in the file).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StringOrList {
    One(String),
    Many(Vec<String>),
}

impl StringOrList {
    fn into_vec(self) -> Vec<String> {
        match self {
            StringOrList::One(s) => vec![s],
            StringOrList::Many(v) => v,
        }
    }
}

/// Subcommands of the `plaza` binary (none: run the server).
#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Print an access token (JWT) for a participant, signed with an API key (the development
    /// key by default)
    Token(TokenArgs),
}

/// `plaza token`: mint an access token.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// Room the token admits to
    #[arg(long)]
    pub room: String,
    /// Identity of the participant (unique in the room)
    #[arg(long)]
    pub identity: String,
    /// Display name (default: the join's `name`)
    #[arg(long)]
    pub name: Option<String>,
    /// Validity, in seconds from now
    #[arg(long, value_name = "SECONDS", default_value_t = auth::DEFAULT_TTL.as_secs())]
    pub ttl: u64,
    /// Comma-separated grants: publish (audio and video), publish-audio, publish-video, data,
    /// subscribe, hidden, admin. A viewer: `--grants subscribe`
    #[arg(long, value_delimiter = ',', default_value = "publish,data,subscribe")]
    pub grants: Vec<String>,
    /// API key to sign with (default: the development key `devkey`)
    #[arg(long, env = "PLAZA_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Secret of --api-key (default: the development secret)
    #[arg(long, env = "PLAZA_API_SECRET", hide_env_values = true)]
    pub api_secret: Option<Secret>,
}

impl TokenArgs {
    /// The token these arguments describe, or why it cannot be made.
    pub fn mint(&self) -> Result<String, String> {
        let key = match (&self.api_key, &self.api_secret) {
            (None, None) => ApiKey::dev(),
            (Some(k), Some(s)) => ApiKey {
                key: k.trim().to_owned(),
                secret: s.clone(),
            },
            (Some(_), None) => return Err("--api-key needs --api-secret".into()),
            (None, Some(_)) => return Err("--api-secret needs --api-key".into()),
        };
        for (what, value) in [("room", &self.room), ("identity", &self.identity)] {
            if value.trim().is_empty() {
                return Err(format!("--{what} must not be empty"));
            }
        }
        if self.ttl == 0 {
            return Err("--ttl must be at least 1 second".into());
        }
        let grants = RoomGrants::participant(self.room.trim())
            .with_names(self.grants.iter().map(String::as_str))?;
        let mut claims = Claims::new(
            self.identity.trim(),
            self.room.trim(),
            Duration::from_secs(self.ttl),
        )
        .with_grants(grants);
        if let Some(name) = &self.name {
            claims = claims.with_name(name.trim());
        }
        auth::mint(&key, &claims).map_err(|e| e.to_string())
    }
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Invocation {
    /// Run the server with this configuration.
    Serve(Box<Config>),
    /// `plaza token`: print a token.
    Token(TokenArgs),
}

/// The TOML file's shape.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    bind: Option<IpAddr>,
    port: Option<u16>,
    udp_bind: Option<IpAddr>,
    udp_port: Option<u16>,
    tcp_port: Option<TcpPort>,
    #[serde(alias = "announce_ips")]
    announce_ip: Option<OneOrMany>,
    log_level: Option<String>,
    log_format: Option<LogFormat>,
    max_ws_message: Option<usize>,
    max_data_message: Option<usize>,
    udp_buffer: Option<usize>,
    workers: Option<usize>,
    room_spread_above: Option<usize>,
    metrics_room_labels: Option<usize>,
    history_messages: Option<usize>,
    history_max_age: Option<f64>,
    input_tick_hz: Option<u32>,
    red: Option<bool>,
    pin_shards: Option<bool>,
    join_timeout: Option<f64>,
    idle_timeout: Option<f64>,
    resume_grace: Option<f64>,
    header_timeout: Option<f64>,
    message_timeout: Option<f64>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    ws_message_rate: Option<f64>,
    ws_message_burst: Option<usize>,
    max_rooms: Option<usize>,
    max_participants_per_room: Option<usize>,
    max_joins_per_ip: Option<f64>,
    join_burst_per_ip: Option<usize>,
    max_remote_candidates: Option<usize>,
    max_published_tracks: Option<usize>,
    max_subscriptions: Option<usize>,
    data_message_rate: Option<usize>,
    data_message_burst: Option<usize>,
    data_byte_rate: Option<usize>,
    max_ids_per_message: Option<usize>,
    commands_per_turn: Option<usize>,
    #[serde(alias = "webhook_url")]
    webhook_urls: Option<StringOrList>,
    webhook_queue: Option<usize>,
    webhook_retry_for: Option<f64>,
    webhook_backoff_min: Option<f64>,
    webhook_backoff_max: Option<f64>,
    webhook_timeout: Option<f64>,
    webhook_api_key: Option<String>,
    #[serde(alias = "turn_url")]
    turn_urls: Option<StringOrList>,
    turn_secret: Option<Secret>,
    turn_ttl: Option<u64>,
    #[serde(alias = "stun_url")]
    stun_urls: Option<StringOrList>,
    /// API key → secret.
    keys: Option<BTreeMap<String, Secret>>,
    redis: Option<String>,
    node_id: Option<String>,
    node_address: Option<String>,
    cluster_span_above: Option<usize>,
    cluster_link_port: Option<u16>,
}

/// One layer of optional settings (flags, env or file).
#[derive(Debug, Default)]
struct Layer {
    bind: Option<IpAddr>,
    port: Option<u16>,
    udp_bind: Option<IpAddr>,
    udp_port: Option<u16>,
    tcp_port: Option<TcpPort>,
    announce_ips: Option<Vec<IpAddr>>,
    log_level: Option<String>,
    log_format: Option<LogFormat>,
    max_ws_message: Option<usize>,
    max_data_message: Option<usize>,
    udp_buffer: Option<usize>,
    workers: Option<usize>,
    room_spread_above: Option<usize>,
    metrics_room_labels: Option<usize>,
    history_messages: Option<usize>,
    history_max_age: Option<f64>,
    input_tick_hz: Option<u32>,
    red: Option<bool>,
    pin_shards: Option<bool>,
    join_timeout: Option<f64>,
    idle_timeout: Option<f64>,
    resume_grace: Option<f64>,
    header_timeout: Option<f64>,
    message_timeout: Option<f64>,
    max_connections: Option<usize>,
    max_connections_per_ip: Option<usize>,
    ws_message_rate: Option<f64>,
    ws_message_burst: Option<usize>,
    max_rooms: Option<usize>,
    max_participants_per_room: Option<usize>,
    max_joins_per_ip: Option<f64>,
    join_burst_per_ip: Option<usize>,
    max_remote_candidates: Option<usize>,
    max_published_tracks: Option<usize>,
    max_subscriptions: Option<usize>,
    data_message_rate: Option<usize>,
    data_message_burst: Option<usize>,
    data_byte_rate: Option<usize>,
    max_ids_per_message: Option<usize>,
    commands_per_turn: Option<usize>,
    api_key: Option<String>,
    api_secret: Option<Secret>,
    keys: Option<KeySet>,
    webhook_urls: Option<Vec<String>>,
    redis: Option<String>,
    node_id: Option<String>,
    node_address: Option<String>,
    cluster_span_above: Option<usize>,
    cluster_link_port: Option<u16>,
    webhook_queue: Option<usize>,
    webhook_retry_for: Option<f64>,
    webhook_backoff_min: Option<f64>,
    webhook_backoff_max: Option<f64>,
    webhook_timeout: Option<f64>,
    webhook_api_key: Option<String>,
    turn_urls: Option<Vec<String>>,
    turn_secret: Option<Secret>,
    turn_ttl: Option<u64>,
    stun_urls: Option<Vec<String>>,
}

impl Layer {
    /// `self` wins over `lower` for every setting it has.
    fn over(self, lower: Layer) -> Layer {
        Layer {
            bind: self.bind.or(lower.bind),
            port: self.port.or(lower.port),
            udp_bind: self.udp_bind.or(lower.udp_bind),
            udp_port: self.udp_port.or(lower.udp_port),
            tcp_port: self.tcp_port.or(lower.tcp_port),
            announce_ips: self.announce_ips.or(lower.announce_ips),
            log_level: self.log_level.or(lower.log_level),
            log_format: self.log_format.or(lower.log_format),
            max_ws_message: self.max_ws_message.or(lower.max_ws_message),
            max_data_message: self.max_data_message.or(lower.max_data_message),
            udp_buffer: self.udp_buffer.or(lower.udp_buffer),
            workers: self.workers.or(lower.workers),
            room_spread_above: self.room_spread_above.or(lower.room_spread_above),
            metrics_room_labels: self.metrics_room_labels.or(lower.metrics_room_labels),
            history_messages: self.history_messages.or(lower.history_messages),
            history_max_age: self.history_max_age.or(lower.history_max_age),
            input_tick_hz: self.input_tick_hz.or(lower.input_tick_hz),
            red: self.red.or(lower.red),
            pin_shards: self.pin_shards.or(lower.pin_shards),
            join_timeout: self.join_timeout.or(lower.join_timeout),
            idle_timeout: self.idle_timeout.or(lower.idle_timeout),
            resume_grace: self.resume_grace.or(lower.resume_grace),
            header_timeout: self.header_timeout.or(lower.header_timeout),
            message_timeout: self.message_timeout.or(lower.message_timeout),
            max_connections: self.max_connections.or(lower.max_connections),
            max_connections_per_ip: self.max_connections_per_ip.or(lower.max_connections_per_ip),
            ws_message_rate: self.ws_message_rate.or(lower.ws_message_rate),
            ws_message_burst: self.ws_message_burst.or(lower.ws_message_burst),
            max_rooms: self.max_rooms.or(lower.max_rooms),
            max_participants_per_room: self
                .max_participants_per_room
                .or(lower.max_participants_per_room),
            max_joins_per_ip: self.max_joins_per_ip.or(lower.max_joins_per_ip),
            join_burst_per_ip: self.join_burst_per_ip.or(lower.join_burst_per_ip),
            max_remote_candidates: self.max_remote_candidates.or(lower.max_remote_candidates),
            max_published_tracks: self.max_published_tracks.or(lower.max_published_tracks),
            max_subscriptions: self.max_subscriptions.or(lower.max_subscriptions),
            data_message_rate: self.data_message_rate.or(lower.data_message_rate),
            data_message_burst: self.data_message_burst.or(lower.data_message_burst),
            data_byte_rate: self.data_byte_rate.or(lower.data_byte_rate),
            max_ids_per_message: self.max_ids_per_message.or(lower.max_ids_per_message),
            commands_per_turn: self.commands_per_turn.or(lower.commands_per_turn),
            api_key: self.api_key.or(lower.api_key),
            api_secret: self.api_secret.or(lower.api_secret),
            keys: self.keys.or(lower.keys),
            webhook_urls: self.webhook_urls.or(lower.webhook_urls),
            redis: self.redis.or(lower.redis),
            node_id: self.node_id.or(lower.node_id),
            node_address: self.node_address.or(lower.node_address),
            cluster_span_above: self.cluster_span_above.or(lower.cluster_span_above),
            cluster_link_port: self.cluster_link_port.or(lower.cluster_link_port),
            webhook_queue: self.webhook_queue.or(lower.webhook_queue),
            webhook_retry_for: self.webhook_retry_for.or(lower.webhook_retry_for),
            webhook_backoff_min: self.webhook_backoff_min.or(lower.webhook_backoff_min),
            webhook_backoff_max: self.webhook_backoff_max.or(lower.webhook_backoff_max),
            webhook_timeout: self.webhook_timeout.or(lower.webhook_timeout),
            webhook_api_key: self.webhook_api_key.or(lower.webhook_api_key),
            turn_urls: self.turn_urls.or(lower.turn_urls),
            turn_secret: self.turn_secret.or(lower.turn_secret),
            turn_ttl: self.turn_ttl.or(lower.turn_ttl),
            stun_urls: self.stun_urls.or(lower.stun_urls),
        }
    }
}

impl From<Args> for Layer {
    fn from(a: Args) -> Layer {
        Layer {
            bind: a.bind,
            port: a.port,
            udp_bind: a.udp_bind,
            udp_port: a.udp_port,
            tcp_port: a.tcp_port,
            announce_ips: (!a.announce_ip.is_empty()).then_some(a.announce_ip),
            log_level: a.log_level,
            log_format: a.log_format,
            max_ws_message: a.max_ws_message,
            max_data_message: a.max_data_message,
            udp_buffer: a.udp_buffer,
            workers: a.workers,
            room_spread_above: a.room_spread_above,
            metrics_room_labels: a.metrics_room_labels,
            history_messages: a.history_messages,
            history_max_age: a.history_max_age,
            input_tick_hz: a.input_tick_hz,
            red: a.no_red.then_some(false),
            pin_shards: a.pin_shards.then_some(true),
            join_timeout: a.join_timeout,
            idle_timeout: a.idle_timeout,
            resume_grace: a.resume_grace,
            header_timeout: a.header_timeout,
            message_timeout: a.message_timeout,
            max_connections: a.max_connections,
            max_connections_per_ip: a.max_connections_per_ip,
            ws_message_rate: a.ws_message_rate,
            ws_message_burst: a.ws_message_burst,
            max_rooms: a.max_rooms,
            max_participants_per_room: a.max_participants_per_room,
            max_joins_per_ip: a.max_joins_per_ip,
            join_burst_per_ip: a.join_burst_per_ip,
            max_remote_candidates: a.max_remote_candidates,
            max_published_tracks: a.max_published_tracks,
            max_subscriptions: a.max_subscriptions,
            data_message_rate: a.data_message_rate,
            data_message_burst: a.data_message_burst,
            data_byte_rate: a.data_byte_rate,
            max_ids_per_message: a.max_ids_per_message,
            commands_per_turn: a.commands_per_turn,
            api_key: a.api_key.map(|k| k.trim().to_owned()),
            api_secret: a.api_secret,
            keys: None,
            webhook_urls: url_list(a.webhook_url),
            redis: non_empty(a.redis),
            node_id: non_empty(a.node_id),
            node_address: non_empty(a.node_address),
            cluster_span_above: a.cluster_span_above,
            cluster_link_port: a.cluster_link_port,
            webhook_queue: a.webhook_queue,
            webhook_retry_for: a.webhook_retry_for,
            webhook_backoff_min: a.webhook_backoff_min,
            webhook_backoff_max: a.webhook_backoff_max,
            webhook_timeout: a.webhook_timeout,
            webhook_api_key: a.webhook_api_key,
            turn_urls: url_list(a.turn_url),
            turn_secret: a.turn_secret,
            turn_ttl: a.turn_ttl,
            stun_urls: url_list(a.stun_url),
        }
    }
}

impl From<FileConfig> for Layer {
    fn from(f: FileConfig) -> Layer {
        Layer {
            bind: f.bind,
            port: f.port,
            udp_bind: f.udp_bind,
            udp_port: f.udp_port,
            tcp_port: f.tcp_port,
            announce_ips: f.announce_ip.map(|a| match a {
                OneOrMany::One(ip) => vec![ip],
                OneOrMany::Many(ips) => ips,
            }),
            log_level: f.log_level,
            log_format: f.log_format,
            max_ws_message: f.max_ws_message,
            max_data_message: f.max_data_message,
            udp_buffer: f.udp_buffer,
            workers: f.workers,
            room_spread_above: f.room_spread_above,
            metrics_room_labels: f.metrics_room_labels,
            history_messages: f.history_messages,
            history_max_age: f.history_max_age,
            input_tick_hz: f.input_tick_hz,
            red: f.red,
            pin_shards: f.pin_shards,
            join_timeout: f.join_timeout,
            idle_timeout: f.idle_timeout,
            resume_grace: f.resume_grace,
            header_timeout: f.header_timeout,
            message_timeout: f.message_timeout,
            max_connections: f.max_connections,
            max_connections_per_ip: f.max_connections_per_ip,
            ws_message_rate: f.ws_message_rate,
            ws_message_burst: f.ws_message_burst,
            max_rooms: f.max_rooms,
            max_participants_per_room: f.max_participants_per_room,
            max_joins_per_ip: f.max_joins_per_ip,
            join_burst_per_ip: f.join_burst_per_ip,
            max_remote_candidates: f.max_remote_candidates,
            max_published_tracks: f.max_published_tracks,
            max_subscriptions: f.max_subscriptions,
            data_message_rate: f.data_message_rate,
            data_message_burst: f.data_message_burst,
            data_byte_rate: f.data_byte_rate,
            max_ids_per_message: f.max_ids_per_message,
            commands_per_turn: f.commands_per_turn,
            api_key: None,
            api_secret: None,
            keys: f.keys.map(|keys| {
                keys.into_iter()
                    .map(|(key, secret)| ApiKey { key, secret })
                    .collect()
            }),
            webhook_urls: f.webhook_urls.and_then(|u| url_list(u.into_vec())),
            redis: non_empty(f.redis),
            node_id: non_empty(f.node_id),
            node_address: non_empty(f.node_address),
            cluster_span_above: f.cluster_span_above,
            cluster_link_port: f.cluster_link_port,
            webhook_queue: f.webhook_queue,
            webhook_retry_for: f.webhook_retry_for,
            webhook_backoff_min: f.webhook_backoff_min,
            webhook_backoff_max: f.webhook_backoff_max,
            webhook_timeout: f.webhook_timeout,
            webhook_api_key: f.webhook_api_key,
            turn_urls: f.turn_urls.and_then(|u| url_list(u.into_vec())),
            turn_secret: f.turn_secret,
            turn_ttl: f.turn_ttl,
            stun_urls: f.stun_urls.and_then(|u| url_list(u.into_vec())),
        }
    }
}

/// Reads `PLAZA_*` variables through `lookup`; empty values count as unset.
struct EnvReader<F>(F);

impl<F: Fn(&str) -> Option<String>> EnvReader<F> {
    fn raw(&self, var: &str) -> Option<String> {
        (self.0)(var).filter(|v| !v.trim().is_empty())
    }

    fn parse<T: FromStr>(&self, var: &'static str) -> Result<Option<T>, ConfigError>
    where
        T::Err: std::fmt::Display,
    {
        match self.raw(var) {
            None => Ok(None),
            Some(value) => value
                .trim()
                .parse::<T>()
                .map(Some)
                .map_err(|e| ConfigError::Env {
                    var,
                    message: e.to_string(),
                    value,
                }),
        }
    }

    fn ip_list(&self, var: &'static str) -> Result<Option<Vec<IpAddr>>, ConfigError> {
        let Some(value) = self.raw(var) else {
            return Ok(None);
        };
        let mut ips = Vec::new();
        for part in value.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            ips.push(part.parse::<IpAddr>().map_err(|e| ConfigError::Env {
                var,
                value: value.clone(),
                message: format!("`{part}`: {e}"),
            })?);
        }
        Ok(Some(ips))
    }

    fn layer(&self) -> Result<Layer, ConfigError> {
        Ok(Layer {
            bind: self.parse("PLAZA_BIND")?,
            port: self.parse("PLAZA_PORT")?,
            udp_bind: self.parse("PLAZA_UDP_BIND")?,
            udp_port: self.parse("PLAZA_UDP_PORT")?,
            tcp_port: self.parse("PLAZA_TCP_PORT")?,
            announce_ips: self.ip_list("PLAZA_ANNOUNCE_IP")?,
            log_level: self.raw("PLAZA_LOG_LEVEL").or_else(|| self.raw("RUST_LOG")),
            log_format: self.parse("PLAZA_LOG_FORMAT")?,
            max_ws_message: self.parse("PLAZA_MAX_WS_MESSAGE")?,
            max_data_message: self.parse("PLAZA_MAX_DATA_MESSAGE")?,
            udp_buffer: self.parse("PLAZA_UDP_BUFFER")?,
            workers: self.parse("PLAZA_WORKERS")?,
            room_spread_above: self.parse("PLAZA_ROOM_SPREAD_ABOVE")?,
            metrics_room_labels: self.parse("PLAZA_METRICS_ROOM_LABELS")?,
            history_messages: self.parse("PLAZA_HISTORY_MESSAGES")?,
            history_max_age: self.parse("PLAZA_HISTORY_MAX_AGE")?,
            input_tick_hz: self.parse("PLAZA_INPUT_TICK_HZ")?,
            red: self.parse("PLAZA_RED")?,
            pin_shards: self.parse("PLAZA_PIN_SHARDS")?,
            join_timeout: self.parse("PLAZA_JOIN_TIMEOUT")?,
            idle_timeout: self.parse("PLAZA_IDLE_TIMEOUT")?,
            resume_grace: self.parse("PLAZA_RESUME_GRACE")?,
            header_timeout: self.parse("PLAZA_HEADER_TIMEOUT")?,
            message_timeout: self.parse("PLAZA_MESSAGE_TIMEOUT")?,
            max_connections: self.parse("PLAZA_MAX_CONNECTIONS")?,
            max_connections_per_ip: self.parse("PLAZA_MAX_CONNECTIONS_PER_IP")?,
            ws_message_rate: self.parse("PLAZA_WS_MESSAGE_RATE")?,
            ws_message_burst: self.parse("PLAZA_WS_MESSAGE_BURST")?,
            max_rooms: self.parse("PLAZA_MAX_ROOMS")?,
            max_participants_per_room: self.parse("PLAZA_MAX_PARTICIPANTS_PER_ROOM")?,
            max_joins_per_ip: self.parse("PLAZA_MAX_JOINS_PER_IP")?,
            join_burst_per_ip: self.parse("PLAZA_JOIN_BURST_PER_IP")?,
            max_remote_candidates: self.parse("PLAZA_MAX_REMOTE_CANDIDATES")?,
            max_published_tracks: self.parse("PLAZA_MAX_PUBLISHED_TRACKS")?,
            max_subscriptions: self.parse("PLAZA_MAX_SUBSCRIPTIONS")?,
            data_message_rate: self.parse("PLAZA_DATA_MESSAGE_RATE")?,
            data_message_burst: self.parse("PLAZA_DATA_MESSAGE_BURST")?,
            data_byte_rate: self.parse("PLAZA_DATA_BYTE_RATE")?,
            max_ids_per_message: self.parse("PLAZA_MAX_IDS_PER_MESSAGE")?,
            commands_per_turn: self.parse("PLAZA_COMMANDS_PER_TURN")?,
            api_key: self.raw("PLAZA_API_KEY").map(|k| k.trim().to_owned()),
            api_secret: self.raw("PLAZA_API_SECRET").map(Secret::new),
            keys: None,
            redis: self.raw("PLAZA_REDIS"),
            node_id: self.raw("PLAZA_NODE_ID"),
            node_address: self.raw("PLAZA_NODE_ADDRESS"),
            cluster_span_above: self.parse("PLAZA_CLUSTER_SPAN_ABOVE")?,
            cluster_link_port: self.parse("PLAZA_CLUSTER_LINK_PORT")?,
            webhook_urls: self
                .raw("PLAZA_WEBHOOK_URLS")
                .and_then(|v| url_list(v.split(',').map(str::to_owned).collect())),
            webhook_queue: self.parse("PLAZA_WEBHOOK_QUEUE")?,
            webhook_retry_for: self.parse("PLAZA_WEBHOOK_RETRY_FOR")?,
            webhook_backoff_min: self.parse("PLAZA_WEBHOOK_BACKOFF_MIN")?,
            webhook_backoff_max: self.parse("PLAZA_WEBHOOK_BACKOFF_MAX")?,
            webhook_timeout: self.parse("PLAZA_WEBHOOK_TIMEOUT")?,
            webhook_api_key: self
                .raw("PLAZA_WEBHOOK_API_KEY")
                .map(|k| k.trim().to_owned()),
            turn_urls: self
                .raw("PLAZA_TURN_URLS")
                .and_then(|v| url_list(v.split(',').map(str::to_owned).collect())),
            turn_secret: self.raw("PLAZA_TURN_SECRET").map(Secret::new),
            turn_ttl: self.parse("PLAZA_TURN_TTL")?,
            stun_urls: self
                .raw("PLAZA_STUN_URLS")
                .and_then(|v| url_list(v.split(',').map(str::to_owned).collect())),
        })
    }
}

/// A trimmed, non-empty string; `None` for an empty one (the setting is unset).
fn non_empty(s: Option<String>) -> Option<String> {
    s.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty())
}

/// Trimmed, non-empty URLs; `None` when there are none (the setting is unset).
fn url_list(urls: Vec<String>) -> Option<Vec<String>> {
    let urls: Vec<String> = urls
        .iter()
        .map(|u| u.trim())
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect();
    (!urls.is_empty()).then_some(urls)
}

fn read_file(path: &Path) -> Result<Layer, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        path: path.to_owned(),
        source,
    })?;
    let file: FileConfig = toml::from_str(&text).map_err(|e| ConfigError::ParseFile {
        path: path.to_owned(),
        message: e.to_string(),
    })?;
    Ok(file.into())
}

impl Config {
    /// Load from the process's command line and environment.
    pub fn load() -> Result<Config, ConfigError> {
        Config::load_from(std::env::args_os(), |var| std::env::var(var).ok())
    }

    /// Load from explicit arguments (the first is the program name) and an environment
    /// lookup, then validate. Flag > env > file > default.
    pub fn load_from<I, T, F>(args: I, env: F) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
        F: Fn(&str) -> Option<String>,
    {
        match Config::invocation_from(args, env)? {
            Invocation::Serve(config) => Ok(*config),
            Invocation::Token(_) => Err(ConfigError::Invalid {
                name: "token",
                value: "a subcommand".to_owned(),
                expected: "no subcommand when loading the server configuration".to_owned(),
            }),
        }
    }

    /// What the process's command line asks for: run the server, or a subcommand.
    pub fn load_invocation() -> Result<Invocation, ConfigError> {
        Config::invocation_from(std::env::args_os(), |var| std::env::var(var).ok())
    }

    /// [`Config::load_invocation`] from explicit arguments and an environment lookup.
    pub fn invocation_from<I, T, F>(args: I, env: F) -> Result<Invocation, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
        F: Fn(&str) -> Option<String>,
    {
        let mut args = Args::try_parse_from(args)?;
        if let Some(Command::Token(token)) = args.command.take() {
            return Ok(Invocation::Token(token));
        }
        let env = EnvReader(env);
        let config_file = args
            .config
            .take()
            .or_else(|| env.raw("PLAZA_CONFIG").map(PathBuf::from));
        let file = match &config_file {
            Some(path) => read_file(path)?,
            None => Layer::default(),
        };
        let merged = Layer::from(args).over(env.layer()?).over(file);
        let keys = match (merged.api_key, merged.api_secret) {
            (None, None) => merged.keys.unwrap_or_default(),
            (Some(key), Some(secret)) => std::iter::once(ApiKey { key, secret }).collect(),
            (Some(_), None) => {
                return Err(ConfigError::Keys(
                    "--api-key (PLAZA_API_KEY) is set without --api-secret (PLAZA_API_SECRET)"
                        .to_owned(),
                ));
            }
            (None, Some(_)) => {
                return Err(ConfigError::Keys(
                    "--api-secret (PLAZA_API_SECRET) is set without --api-key (PLAZA_API_KEY)"
                        .to_owned(),
                ));
            }
        };

        let d = Config::default();
        let mut config = Config {
            config_file,
            bind: merged.bind.unwrap_or(d.bind),
            port: merged.port.unwrap_or(d.port),
            udp_bind: merged.udp_bind.unwrap_or(d.udp_bind),
            udp_port: merged.udp_port.unwrap_or(d.udp_port),
            tcp_port: merged.tcp_port.unwrap_or(d.tcp_port),
            announce_ips: merged.announce_ips.unwrap_or_default(),
            log_level: merged.log_level.unwrap_or(d.log_level),
            log_format: merged.log_format.unwrap_or(d.log_format),
            max_ws_message: merged.max_ws_message.unwrap_or(d.max_ws_message),
            max_data_message: merged.max_data_message.unwrap_or(d.max_data_message),
            udp_buffer: merged.udp_buffer.unwrap_or(d.udp_buffer),
            workers: merged.workers.unwrap_or(d.workers),
            room_spread_above: merged.room_spread_above.unwrap_or(d.room_spread_above),
            metrics_room_labels: merged.metrics_room_labels.unwrap_or(d.metrics_room_labels),
            history: crate::sfu::timeline::HistoryLimits {
                messages: merged.history_messages.unwrap_or(d.history.messages),
                max_age: seconds("history-max-age", merged.history_max_age, d.history.max_age)?,
                bytes: d.history.bytes,
            },
            input_tick_hz: merged.input_tick_hz.unwrap_or(d.input_tick_hz),
            red: merged.red.unwrap_or(d.red),
            pin_shards: merged.pin_shards.unwrap_or(d.pin_shards),
            join_timeout: seconds("join-timeout", merged.join_timeout, d.join_timeout)?,
            idle_timeout: seconds("idle-timeout", merged.idle_timeout, d.idle_timeout)?,
            resume_grace: match merged.resume_grace {
                Some(0.0) => Duration::ZERO,
                other => seconds("resume-grace", other, d.resume_grace)?,
            },
            header_timeout: seconds("header-timeout", merged.header_timeout, d.header_timeout)?,
            message_timeout: seconds("message-timeout", merged.message_timeout, d.message_timeout)?,
            max_connections: merged.max_connections.unwrap_or(d.max_connections),
            max_connections_per_ip: merged
                .max_connections_per_ip
                .unwrap_or(d.max_connections_per_ip),
            ws_message_rate: merged.ws_message_rate.unwrap_or(d.ws_message_rate),
            ws_message_burst: merged.ws_message_burst.unwrap_or(d.ws_message_burst),
            max_rooms: merged.max_rooms.unwrap_or(d.max_rooms),
            max_participants_per_room: merged
                .max_participants_per_room
                .unwrap_or(d.max_participants_per_room),
            max_joins_per_ip: merged.max_joins_per_ip.unwrap_or(d.max_joins_per_ip),
            join_burst_per_ip: merged.join_burst_per_ip.unwrap_or(d.join_burst_per_ip),
            core_limits: CoreLimits {
                max_remote_candidates: merged
                    .max_remote_candidates
                    .unwrap_or(d.core_limits.max_remote_candidates),
                max_published_tracks: merged
                    .max_published_tracks
                    .unwrap_or(d.core_limits.max_published_tracks),
                max_subscriptions: merged
                    .max_subscriptions
                    .unwrap_or(d.core_limits.max_subscriptions),
                data_message_rate: merged
                    .data_message_rate
                    .unwrap_or(d.core_limits.data_message_rate),
                data_message_burst: merged
                    .data_message_burst
                    .unwrap_or(d.core_limits.data_message_burst),
                data_byte_rate: merged
                    .data_byte_rate
                    .unwrap_or(d.core_limits.data_byte_rate),
                max_ids_per_message: merged
                    .max_ids_per_message
                    .unwrap_or(d.core_limits.max_ids_per_message),
                commands_per_turn: merged
                    .commands_per_turn
                    .unwrap_or(d.core_limits.commands_per_turn),
            },
            keys,
            ice: IceConfig {
                turn_urls: merged.turn_urls.unwrap_or_default(),
                turn_secret: merged.turn_secret,
                turn_ttl: merged
                    .turn_ttl
                    .map_or(turn::DEFAULT_TURN_TTL, Duration::from_secs),
                stun_urls: merged.stun_urls.unwrap_or_default(),
            },
            webhook: {
                let w = crate::webhook::WebhookConfig::default();
                crate::webhook::WebhookConfig {
                    urls: merged.webhook_urls.unwrap_or_default(),
                    queue: merged.webhook_queue.unwrap_or(w.queue),
                    backoff: crate::webhook::Backoff {
                        min: seconds(
                            "webhook-backoff-min",
                            merged.webhook_backoff_min,
                            w.backoff.min,
                        )?,
                        max: seconds(
                            "webhook-backoff-max",
                            merged.webhook_backoff_max,
                            w.backoff.max,
                        )?,
                        retry_for: seconds(
                            "webhook-retry-for",
                            merged.webhook_retry_for,
                            w.backoff.retry_for,
                        )?,
                    },
                    timeout: seconds("webhook-timeout", merged.webhook_timeout, w.timeout)?,
                    api_key: merged.webhook_api_key,
                }
            },
            cluster: crate::cluster::ClusterConfig {
                redis: merged.redis,
                node_id: merged.node_id,
                node_address: merged.node_address,
                span_above: merged.cluster_span_above.unwrap_or(0),
                link_port: merged.cluster_link_port.unwrap_or(0),
            },
        };
        config.announce_ips = config.announce_ips()?;
        config.validate()?;
        Ok(Invocation::Serve(Box::new(config)))
    }

    /// The IPs to announce: the configured ones (deduplicated), or the UDP bind address when
    /// none is configured. Fails when that would be an unspecified address.
    pub fn announce_ips(&self) -> Result<Vec<IpAddr>, ConfigError> {
        if self.announce_ips.is_empty() {
            if self.udp_bind.is_unspecified() {
                return Err(ConfigError::AnnounceIpRequired {
                    udp_bind: self.udp_bind,
                });
            }
            return Ok(vec![self.udp_bind]);
        }
        let mut ips: Vec<IpAddr> = Vec::with_capacity(self.announce_ips.len());
        for &ip in &self.announce_ips {
            if ip.is_unspecified() || ip.is_multicast() {
                return Err(ConfigError::BadAnnounceIp(ip));
            }
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        Ok(ips)
    }

    /// The key that signs webhooks: `--webhook-api-key`, else the first API key by name, else
    /// the development key (development mode).
    pub fn webhook_key(&self) -> Result<ApiKey, String> {
        if self.keys.is_empty() {
            return match &self.webhook.api_key {
                None => Ok(ApiKey::dev()),
                Some(k) if k == auth::DEV_API_KEY => Ok(ApiKey::dev()),
                Some(k) => Err(format!(
                    "--webhook-api-key {k:?} is not a configured API key"
                )),
            };
        }
        let name = match &self.webhook.api_key {
            Some(k) => k.as_str(),
            None => self.keys.key_names().next().unwrap_or_default(),
        };
        self.keys
            .get(name)
            .ok_or_else(|| format!("--webhook-api-key {name:?} is not a configured API key"))
    }

    /// Check every setting (also called by [`crate::server::start`]).
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.announce_ips()?;
        self.keys.validate().map_err(ConfigError::Keys)?;
        self.ice.validate().map_err(ConfigError::Turn)?;
        self.webhook.validate().map_err(ConfigError::Webhook)?;
        self.webhook_key().map_err(ConfigError::Webhook)?;
        tracing_subscriber::EnvFilter::try_new(&self.log_level).map_err(|e| {
            ConfigError::LogLevel {
                directive: self.log_level.clone(),
                message: e.to_string(),
            }
        })?;
        check_range(
            "max-ws-message",
            self.max_ws_message,
            MIN_WS_MESSAGE,
            MAX_WS_MESSAGE,
        )?;
        check_range(
            "max-data-message",
            self.max_data_message,
            1,
            MAX_DATA_MESSAGE,
        )?;
        check_range("udp-buffer", self.udp_buffer, 65_536, 1 << 30)?;
        check_range(
            "input-tick-hz",
            self.input_tick_hz as usize,
            0,
            crate::sfu::timeline::MAX_TICK_HZ as usize,
        )?;
        check_range("history-messages", self.history.messages, 0, 1 << 20)?;
        if !(1..=MAX_WORKERS).contains(&self.workers) {
            return Err(ConfigError::Invalid {
                name: "workers",
                value: self.workers.to_string(),
                expected: format!("between 1 and {MAX_WORKERS}"),
            });
        }
        if self.udp_port != 0 && usize::from(self.udp_port) + self.workers - 1 > 65_535 {
            return Err(ConfigError::Invalid {
                name: "workers",
                value: self.workers.to_string(),
                expected: format!(
                    "at most {} with udp-port {} (one port per worker, up to 65535)",
                    65_536 - usize::from(self.udp_port),
                    self.udp_port
                ),
            });
        }
        if let Some(port) = self.tcp_port().filter(|&p| p != 0) {
            if usize::from(port) + self.workers - 1 > 65_535 {
                return Err(ConfigError::Invalid {
                    name: "tcp-port",
                    value: port.to_string(),
                    expected: format!(
                        "at most {} with {} workers (one port per worker, up to 65535)",
                        65_536 - self.workers,
                        self.workers
                    ),
                });
            }
        }
        let (lo, hi) = TIMEOUT_RANGE_S;
        for (name, d) in [
            ("join-timeout", self.join_timeout),
            ("idle-timeout", self.idle_timeout),
            ("header-timeout", self.header_timeout),
            ("message-timeout", self.message_timeout),
        ] {
            if !(lo..=hi).contains(&d.as_secs_f64()) {
                return Err(ConfigError::Invalid {
                    name,
                    value: format!("{} s", d.as_secs_f64()),
                    expected: format!("between {lo} and {hi} seconds"),
                });
            }
        }
        let l = &self.core_limits;
        for (name, n) in [
            ("max-connections", self.max_connections),
            ("max-connections-per-ip", self.max_connections_per_ip),
            ("ws-message-burst", self.ws_message_burst),
            ("join-burst-per-ip", self.join_burst_per_ip),
            ("max-remote-candidates", l.max_remote_candidates),
            ("max-published-tracks", l.max_published_tracks),
            ("max-subscriptions", l.max_subscriptions),
            ("max-ids-per-message", l.max_ids_per_message),
            ("data-message-burst", l.data_message_burst),
            ("commands-per-turn", l.commands_per_turn),
        ] {
            count_range(name, n)?;
        }
        for (name, n) in [
            ("max-rooms", self.max_rooms),
            ("max-participants-per-room", self.max_participants_per_room),
            ("data-message-rate", l.data_message_rate),
            ("data-byte-rate", l.data_byte_rate),
        ] {
            if n > MAX_COUNT {
                return Err(ConfigError::Invalid {
                    name,
                    value: n.to_string(),
                    expected: format!("between 0 (unlimited) and {MAX_COUNT}"),
                });
            }
        }
        if !(self.max_joins_per_ip == 0.0 || (0.01..=1e6).contains(&self.max_joins_per_ip)) {
            return Err(ConfigError::Invalid {
                name: "max-joins-per-ip",
                value: self.max_joins_per_ip.to_string(),
                expected: "0 (unlimited) or between 0.01 and 1000000 joins per second".to_owned(),
            });
        }
        if !(0.01..=1e6).contains(&self.ws_message_rate) {
            return Err(ConfigError::Invalid {
                name: "ws-message-rate",
                value: self.ws_message_rate.to_string(),
                expected: "between 0.01 and 1000000 messages per second".to_owned(),
            });
        }
        Ok(())
    }

    /// The per-server join caps (rooms, participants per room).
    pub fn join_caps(&self) -> JoinCaps {
        JoinCaps {
            max_rooms: self.max_rooms,
            max_participants_per_room: self.max_participants_per_room,
        }
    }

    /// The per-address join rate.
    pub fn join_rate(&self) -> JoinRate {
        JoinRate {
            rate: self.max_joins_per_ip,
            burst: self.join_burst_per_ip,
        }
    }

    /// The HTTP listen address.
    pub fn http_addr(&self) -> SocketAddr {
        SocketAddr::new(self.bind, self.port)
    }

    /// The media UDP bind address.
    pub fn udp_addr(&self) -> SocketAddr {
        SocketAddr::new(self.udp_bind, self.udp_port)
    }

    /// The first shard's ICE-TCP port (bound on the UDP bind address), `None` when ICE-TCP is
    /// off.
    pub fn tcp_port(&self) -> Option<u16> {
        match self.tcp_port {
            TcpPort::SameAsUdp => Some(self.udp_port),
            TcpPort::Port(p) => Some(p),
            TcpPort::Off => None,
        }
    }
}

fn count_range(name: &'static str, value: usize) -> Result<(), ConfigError> {
    if (1..=MAX_COUNT).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            name,
            value: value.to_string(),
            expected: format!("between 1 and {MAX_COUNT}"),
        })
    }
}

/// A timeout given in seconds (flag, env or file), or the default.
fn seconds(
    name: &'static str,
    value: Option<f64>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let Some(s) = value else {
        return Ok(default);
    };
    let (lo, hi) = TIMEOUT_RANGE_S;
    if !(lo..=hi).contains(&s) {
        return Err(ConfigError::Invalid {
            name,
            value: format!("{s} s"),
            expected: format!("between {lo} and {hi} seconds"),
        });
    }
    Ok(Duration::from_secs_f64(s))
}

fn check_range(
    name: &'static str,
    value: usize,
    min: usize,
    max: usize,
) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::OutOfRange {
            name,
            value,
            min,
            max,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> + use<> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn load(args: &[&str], pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let mut argv = vec!["plaza"];
        argv.extend_from_slice(args);
        Config::load_from(argv, env(pairs))
    }

    struct TempFile(PathBuf);
    impl TempFile {
        fn new(contents: &str) -> TempFile {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "plaza-config-test-{}-{}.toml",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&path, contents).unwrap();
            TempFile(path)
        }
        fn path(&self) -> &str {
            self.0.to_str().unwrap()
        }
    }
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn defaults_without_anything() {
        let c = load(&[], &[]).unwrap();
        let d = Config {
            announce_ips: vec![ip("127.0.0.1")],
            ..Config::default()
        };
        assert_eq!(c, d);
        assert_eq!(
            c.http_addr(),
            "127.0.0.1:7880".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(
            c.udp_addr(),
            "127.0.0.1:7882".parse::<SocketAddr>().unwrap()
        );
        assert_eq!(c.max_ws_message, 65536);
        assert_eq!(c.max_data_message, 16384);
        assert_eq!(c.log_level, "info");
        assert_eq!(c.log_format, LogFormat::Text);
        Config::default().validate().unwrap();
        assert_eq!(
            Config::default().announce_ips().unwrap(),
            vec![ip("127.0.0.1")]
        );
    }

    #[test]
    fn flag_beats_env_beats_file_beats_default() {
        let file = TempFile::new(
            r#"
            port = 1000
            udp_port = 1001
            bind = "127.0.0.2"
            log_format = "json"
            max_data_message = 1000
            "#,
        );
        // File only (via PLAZA_CONFIG).
        let c = load(&[], &[("PLAZA_CONFIG", file.path())]).unwrap();
        assert_eq!(c.port, 1000);
        assert_eq!(c.udp_port, 1001);
        assert_eq!(c.bind, ip("127.0.0.2"));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.max_data_message, 1000);
        assert_eq!(c.max_ws_message, DEFAULT_MAX_WS_MESSAGE); // default
        assert_eq!(c.config_file.as_deref(), Some(file.0.as_path()));

        // Env over file.
        let c = load(
            &["--config", file.path()],
            &[("PLAZA_PORT", "2000"), ("PLAZA_LOG_FORMAT", "text")],
        )
        .unwrap();
        assert_eq!(c.port, 2000);
        assert_eq!(c.udp_port, 1001);
        assert_eq!(c.log_format, LogFormat::Text);

        // Flag over env over file.
        let c = load(
            &[
                "--config",
                file.path(),
                "--port",
                "3000",
                "--log-format",
                "json",
            ],
            &[("PLAZA_PORT", "2000"), ("PLAZA_UDP_PORT", "2001")],
        )
        .unwrap();
        assert_eq!(c.port, 3000);
        assert_eq!(c.udp_port, 2001);
        assert_eq!(c.bind, ip("127.0.0.2"));
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn config_flag_beats_config_env() {
        let a = TempFile::new("port = 1");
        let b = TempFile::new("port = 2");
        let c = load(&["--config", a.path()], &[("PLAZA_CONFIG", b.path())]).unwrap();
        assert_eq!(c.port, 1);
    }

    #[test]
    fn announce_ips_from_every_layer() {
        let c = load(
            &[
                "--announce-ip",
                "10.0.0.1,10.0.0.2",
                "--announce-ip",
                "10.0.0.3",
            ],
            &[("PLAZA_ANNOUNCE_IP", "10.9.9.9")],
        )
        .unwrap();
        assert_eq!(
            c.announce_ips,
            vec![ip("10.0.0.1"), ip("10.0.0.2"), ip("10.0.0.3")]
        );

        let c = load(&[], &[("PLAZA_ANNOUNCE_IP", " 10.0.0.1 , ::1 ,10.0.0.1")]).unwrap();
        assert_eq!(c.announce_ips, vec![ip("10.0.0.1"), ip("::1")]);

        let one = TempFile::new(r#"announce_ip = "192.0.2.1""#);
        let c = load(&["--config", one.path()], &[]).unwrap();
        assert_eq!(c.announce_ips, vec![ip("192.0.2.1")]);
        let many = TempFile::new(r#"announce_ips = ["192.0.2.1", "192.0.2.2"]"#);
        let c = load(&["--config", many.path()], &[]).unwrap();
        assert_eq!(c.announce_ips, vec![ip("192.0.2.1"), ip("192.0.2.2")]);

        // Default: the UDP bind address.
        let c = load(&["--udp-bind", "127.0.0.5"], &[]).unwrap();
        assert_eq!(c.announce_ips, vec![ip("127.0.0.5")]);
    }

    #[test]
    fn unspecified_udp_bind_needs_announce_ip() {
        let e = load(&["--udp-bind", "0.0.0.0"], &[]).unwrap_err();
        assert!(matches!(e, ConfigError::AnnounceIpRequired { .. }), "{e}");
        assert!(e.to_string().contains("--announce-ip"), "{e}");
        let c = load(
            &["--udp-bind", "0.0.0.0"],
            &[("PLAZA_ANNOUNCE_IP", "198.51.100.4")],
        )
        .unwrap();
        assert_eq!(c.announce_ips, vec![ip("198.51.100.4")]);
        let e = load(&["--announce-ip", "0.0.0.0"], &[]).unwrap_err();
        assert!(matches!(e, ConfigError::BadAnnounceIp(_)), "{e}");
        let bad = Config {
            udp_bind: ip("::"),
            ..Config::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn empty_env_is_unset() {
        let c = load(&[], &[("PLAZA_PORT", ""), ("PLAZA_ANNOUNCE_IP", " ")]).unwrap();
        assert_eq!(c.port, DEFAULT_PORT);
        assert_eq!(c.announce_ips, vec![ip("127.0.0.1")]);
    }

    #[test]
    fn bad_values_are_reported() {
        let e = load(&[], &[("PLAZA_PORT", "seventy")]).unwrap_err();
        match &e {
            ConfigError::Env { var, value, .. } => {
                assert_eq!(*var, "PLAZA_PORT");
                assert_eq!(value, "seventy");
            }
            other => panic!("unexpected {other:?}"),
        }
        let e = load(&[], &[("PLAZA_ANNOUNCE_IP", "1.2.3.4,nope")]).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        let e = load(&[], &[("PLAZA_LOG_FORMAT", "xml")]).unwrap_err();
        assert!(matches!(e, ConfigError::Env { .. }), "{e}");
        assert!(matches!(
            load(&["--port", "99999"], &[]).unwrap_err(),
            ConfigError::Cli(_)
        ));
        assert!(matches!(
            load(&["--frobnicate"], &[]).unwrap_err(),
            ConfigError::Cli(_)
        ));
        let e = load(&["--max-ws-message", "10"], &[]).unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::OutOfRange {
                    name: "max-ws-message",
                    ..
                }
            ),
            "{e}"
        );
        let e = load(&["--max-data-message", "0"], &[]).unwrap_err();
        assert!(matches!(e, ConfigError::OutOfRange { .. }), "{e}");
        let e = load(&["--log-level", "info,[[["], &[]).unwrap_err();
        assert!(matches!(e, ConfigError::LogLevel { .. }), "{e}");
    }

    #[test]
    fn file_errors_are_reported() {
        let e = load(&["--config", "/nonexistent/plaza.toml"], &[]).unwrap_err();
        assert!(matches!(e, ConfigError::ReadFile { .. }), "{e}");
        assert!(e.to_string().contains("/nonexistent/plaza.toml"));
        let typo = TempFile::new("prot = 1");
        let e = load(&["--config", typo.path()], &[]).unwrap_err();
        assert!(matches!(e, ConfigError::ParseFile { .. }), "{e}");
        assert!(e.to_string().contains("prot"), "{e}");
        let wrong_type = TempFile::new(r#"port = "x""#);
        assert!(matches!(
            load(&["--config", wrong_type.path()], &[]).unwrap_err(),
            ConfigError::ParseFile { .. }
        ));
    }

    #[test]
    fn log_level_sources() {
        assert_eq!(
            load(&[], &[("RUST_LOG", "debug")]).unwrap().log_level,
            "debug"
        );
        assert_eq!(
            load(&[], &[("RUST_LOG", "debug"), ("PLAZA_LOG_LEVEL", "warn")])
                .unwrap()
                .log_level,
            "warn"
        );
        assert_eq!(
            load(
                &["--log-level", "plaza=trace"],
                &[("PLAZA_LOG_LEVEL", "warn")]
            )
            .unwrap()
            .log_level,
            "plaza=trace"
        );
    }

    #[test]
    fn resume_grace_from_every_layer() {
        assert_eq!(load(&[], &[]).unwrap().resume_grace, DEFAULT_RESUME_GRACE);
        assert_eq!(
            load(&["--resume-grace", "2.5"], &[]).unwrap().resume_grace,
            Duration::from_millis(2500)
        );
        assert_eq!(
            load(&[], &[("PLAZA_RESUME_GRACE", "0")])
                .unwrap()
                .resume_grace,
            Duration::ZERO,
            "0 turns resume off"
        );
        assert!(load(&["--resume-grace", "-1"], &[]).is_err());
    }

    #[test]
    fn metrics_room_labels_from_every_layer() {
        assert_eq!(
            load(&[], &[]).unwrap().metrics_room_labels,
            0,
            "off by default"
        );
        let file = TempFile::new("metrics_room_labels = 5\n");
        let env = [("PLAZA_CONFIG", file.path())];
        assert_eq!(load(&[], &env).unwrap().metrics_room_labels, 5);
        let env = [
            ("PLAZA_CONFIG", file.path()),
            ("PLAZA_METRICS_ROOM_LABELS", "7"),
        ];
        assert_eq!(load(&[], &env).unwrap().metrics_room_labels, 7);
        let c = load(&["--metrics-room-labels", "9"], &env).unwrap();
        assert_eq!(c.metrics_room_labels, 9);
        assert!(load(&["--metrics-room-labels", "-1"], &[]).is_err());
    }

    #[test]
    fn red_from_every_layer() {
        assert!(load(&[], &[]).unwrap().red, "on by default");
        let file = TempFile::new("red = false\n");
        let env = [("PLAZA_CONFIG", file.path())];
        assert!(!load(&[], &env).unwrap().red);
        let env = [("PLAZA_CONFIG", file.path()), ("PLAZA_RED", "true")];
        assert!(load(&[], &env).unwrap().red);
        assert!(!load(&["--no-red"], &env).unwrap().red);
        assert!(load(&[], &[("PLAZA_RED", "maybe")]).is_err());
    }

    #[test]
    fn pin_shards_from_every_layer() {
        assert!(!load(&[], &[]).unwrap().pin_shards, "off by default");
        let file = TempFile::new("pin_shards = true\n");
        let env = [("PLAZA_CONFIG", file.path())];
        assert!(load(&[], &env).unwrap().pin_shards);
        let env = [("PLAZA_CONFIG", file.path()), ("PLAZA_PIN_SHARDS", "false")];
        assert!(!load(&[], &env).unwrap().pin_shards);
        assert!(load(&["--pin-shards"], &env).unwrap().pin_shards);
        assert!(load(&[], &[("PLAZA_PIN_SHARDS", "sometimes")]).is_err());
    }

    #[test]
    fn cluster_settings_from_every_layer() {
        let c = load(&[], &[]).unwrap().cluster;
        assert_eq!(
            c,
            crate::cluster::ClusterConfig::default(),
            "no Redis by default"
        );
        let file = TempFile::new(
            "redis = \"redis://file:6379\"\nnode_id = \"ND_file\"\nnode_address = \"f:1\"\ncluster_span_above = 40\ncluster_link_port = 7001\n",
        );
        let env = [("PLAZA_CONFIG", file.path())];
        let c = load(&[], &env).unwrap().cluster;
        assert_eq!((c.span_above, c.link_port), (40, 7001));
        assert_eq!(c.redis.as_deref(), Some("redis://file:6379"));
        assert_eq!(c.node_id.as_deref(), Some("ND_file"));
        assert_eq!(c.node_address.as_deref(), Some("f:1"));
        let env = [
            ("PLAZA_CONFIG", file.path()),
            ("PLAZA_REDIS", "redis://env:6379"),
            ("PLAZA_NODE_ID", "ND_env"),
        ];
        let c = load(&[], &env).unwrap().cluster;
        assert_eq!(c.redis.as_deref(), Some("redis://env:6379"));
        assert_eq!(c.node_id.as_deref(), Some("ND_env"));
        let env2 = [
            ("PLAZA_CONFIG", file.path()),
            ("PLAZA_CLUSTER_SPAN_ABOVE", "30"),
            ("PLAZA_CLUSTER_LINK_PORT", "7002"),
        ];
        let c = load(&[], &env2).unwrap().cluster;
        assert_eq!((c.span_above, c.link_port), (30, 7002));
        let c = load(
            &["--cluster-span-above", "20", "--cluster-link-port", "7003"],
            &env2,
        )
        .unwrap()
        .cluster;
        assert_eq!((c.span_above, c.link_port), (20, 7003));
        let c = load(
            &["--redis", "redis://:pw@flag:6379", "--node-address", "x:2"],
            &env,
        )
        .unwrap()
        .cluster;
        assert_eq!(c.redis.as_deref(), Some("redis://:pw@flag:6379"));
        assert_eq!(c.node_address.as_deref(), Some("x:2"));
        assert!(
            !format!("{c:?}").contains("pw"),
            "the password stays out of logs"
        );
        assert_eq!(load(&["--redis", " "], &[]).unwrap().cluster.redis, None);
    }

    #[test]
    fn data_rate_limits_from_every_layer() {
        let d = load(&[], &[]).unwrap().core_limits;
        assert_eq!(
            (d.data_message_rate, d.data_message_burst, d.data_byte_rate),
            (100, 200, 1 << 20)
        );
        assert_eq!(d.data_rate(), crate::sfu::data::RateLimit::default());
        let file = TempFile::new("data_message_rate = 3\ndata_message_burst = 4\n");
        let c = load(
            &["--config", file.path(), "--data-byte-rate", "0"],
            &[("PLAZA_DATA_MESSAGE_BURST", "6")],
        )
        .unwrap()
        .core_limits;
        assert_eq!(
            (c.data_message_rate, c.data_message_burst, c.data_byte_rate),
            (3, 6, 0)
        );
        let r = c.data_rate();
        assert_eq!(
            (r.messages_per_sec, r.message_burst, r.bytes_per_sec),
            (3, 6, 0)
        );
        assert!(load(&["--data-message-burst", "0"], &[]).is_err());
    }

    #[test]
    fn limits_from_every_layer() {
        let c = load(&[], &[]).unwrap();
        assert_eq!(c.join_timeout, DEFAULT_JOIN_TIMEOUT);
        assert_eq!(c.max_connections_per_ip, DEFAULT_MAX_CONNECTIONS_PER_IP);
        assert_eq!(c.core_limits, CoreLimits::default());

        let file = TempFile::new(
            r#"
            join_timeout = 3
            idle_timeout = 4.5
            max_connections = 100
            ws_message_rate = 7.5
            max_subscriptions = 9
            commands_per_turn = 8
            "#,
        );
        let c = load(
            &[
                "--config",
                file.path(),
                "--header-timeout",
                "0.25",
                "--max-remote-candidates",
                "5",
            ],
            &[
                ("PLAZA_MAX_CONNECTIONS", "200"),
                ("PLAZA_MESSAGE_TIMEOUT", "2"),
                ("PLAZA_WS_MESSAGE_BURST", "11"),
                ("PLAZA_MAX_CONNECTIONS_PER_IP", "3"),
                ("PLAZA_MAX_PUBLISHED_TRACKS", "4"),
                ("PLAZA_MAX_IDS_PER_MESSAGE", "6"),
            ],
        )
        .unwrap();
        assert_eq!(c.join_timeout, Duration::from_secs(3));
        assert_eq!(c.idle_timeout, Duration::from_millis(4500));
        assert_eq!(c.header_timeout, Duration::from_millis(250));
        assert_eq!(c.message_timeout, Duration::from_secs(2));
        assert_eq!(c.max_connections, 200); // env over file
        assert_eq!(c.max_connections_per_ip, 3);
        assert_eq!(c.ws_message_rate, 7.5);
        assert_eq!(c.ws_message_burst, 11);
        assert_eq!(
            c.core_limits,
            CoreLimits {
                max_remote_candidates: 5,
                max_published_tracks: 4,
                max_subscriptions: 9,
                max_ids_per_message: 6,
                commands_per_turn: 8,
                ..CoreLimits::default()
            }
        );
    }

    #[test]
    fn join_limits_from_every_layer() {
        let c = load(&[], &[]).unwrap();
        assert_eq!(
            c.join_caps(),
            JoinCaps {
                max_rooms: DEFAULT_MAX_ROOMS,
                max_participants_per_room: DEFAULT_MAX_PARTICIPANTS_PER_ROOM,
            }
        );
        assert_eq!((c.max_rooms, c.max_participants_per_room), (10_000, 1000));
        assert_eq!(
            c.join_rate(),
            JoinRate {
                rate: 20.0,
                burst: 100
            }
        );

        let file = TempFile::new(
            r#"
            max_rooms = 5
            max_participants_per_room = 6
            max_joins_per_ip = 7
            join_burst_per_ip = 8
            "#,
        );
        let c = load(&["--config", file.path()], &[]).unwrap();
        assert_eq!((c.max_rooms, c.max_participants_per_room), (5, 6));
        assert_eq!((c.max_joins_per_ip, c.join_burst_per_ip), (7.0, 8));
        // Env over file.
        let env_vars = [
            ("PLAZA_MAX_ROOMS", "15"),
            ("PLAZA_MAX_PARTICIPANTS_PER_ROOM", "16"),
            ("PLAZA_MAX_JOINS_PER_IP", "0.5"),
            ("PLAZA_JOIN_BURST_PER_IP", "18"),
        ];
        let c = load(&["--config", file.path()], &env_vars).unwrap();
        assert_eq!((c.max_rooms, c.max_participants_per_room), (15, 16));
        assert_eq!((c.max_joins_per_ip, c.join_burst_per_ip), (0.5, 18));
        // Flag over env; 0 is unlimited.
        let c = load(
            &[
                "--config",
                file.path(),
                "--max-rooms",
                "0",
                "--max-participants-per-room",
                "0",
                "--max-joins-per-ip",
                "0",
                "--join-burst-per-ip",
                "28",
            ],
            &env_vars,
        )
        .unwrap();
        assert_eq!(
            c.join_caps(),
            JoinCaps {
                max_rooms: 0,
                max_participants_per_room: 0
            }
        );
        assert!(c.join_rate().is_unlimited());
        assert_eq!(c.join_burst_per_ip, 28);
        // One layer each.
        let c = load(
            &["--config", file.path(), "--max-rooms", "25"],
            &[("PLAZA_MAX_JOINS_PER_IP", "3")],
        )
        .unwrap();
        assert_eq!((c.max_rooms, c.max_participants_per_room), (25, 6));
        assert_eq!((c.max_joins_per_ip, c.join_burst_per_ip), (3.0, 8));
    }

    #[test]
    fn bad_join_limits_are_reported() {
        for (args, name) in [
            (&["--join-burst-per-ip", "0"][..], "join-burst-per-ip"),
            (&["--max-joins-per-ip=-1"][..], "max-joins-per-ip"),
            (&["--max-joins-per-ip", "0.001"][..], "max-joins-per-ip"),
            (&["--max-joins-per-ip", "NaN"][..], "max-joins-per-ip"),
            (&["--max-rooms", "10000001"][..], "max-rooms"),
            (
                &["--max-participants-per-room", "99999999"][..],
                "max-participants-per-room",
            ),
        ] {
            let e = load(args, &[]).unwrap_err();
            assert!(
                matches!(&e, ConfigError::Invalid { name: n, .. } if *n == name),
                "{args:?}: {e}"
            );
        }
        let e = load(&[], &[("PLAZA_MAX_ROOMS", "-1")]).unwrap_err();
        assert!(matches!(e, ConfigError::Env { .. }), "{e}");
        let typo = TempFile::new("max_room = 1");
        let e = load(&["--config", typo.path()], &[]).unwrap_err();
        assert!(matches!(e, ConfigError::ParseFile { .. }), "{e}");
    }

    #[test]
    fn bad_limits_are_reported() {
        for (args, name) in [
            (&["--join-timeout", "0"][..], "join-timeout"),
            (&["--idle-timeout=-1"][..], "idle-timeout"),
            (&["--message-timeout", "1e9"][..], "message-timeout"),
            (&["--max-connections", "0"][..], "max-connections"),
            (
                &["--max-connections-per-ip", "0"][..],
                "max-connections-per-ip",
            ),
            (&["--ws-message-rate", "0"][..], "ws-message-rate"),
            (&["--ws-message-burst", "0"][..], "ws-message-burst"),
            (&["--commands-per-turn", "0"][..], "commands-per-turn"),
            (&["--max-subscriptions", "0"][..], "max-subscriptions"),
        ] {
            let e = load(args, &[]).unwrap_err();
            assert!(
                matches!(&e, ConfigError::Invalid { name: n, .. } if *n == name),
                "{args:?}: {e}"
            );
            assert!(e.to_string().contains(name), "{e}");
        }
        let e = load(&[], &[("PLAZA_JOIN_TIMEOUT", "soon")]).unwrap_err();
        assert!(matches!(e, ConfigError::Env { .. }), "{e}");
        let nan = TempFile::new("idle_timeout = nan");
        let e = load(&["--config", nan.path()], &[]).unwrap_err();
        assert!(matches!(e, ConfigError::Invalid { .. }), "{e}");
    }

    #[test]
    fn help_is_a_cli_error() {
        match load(&["--help"], &[]).unwrap_err() {
            ConfigError::Cli(e) => assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp),
            other => panic!("unexpected {other:?}"),
        }
    }

    const S1: &str = "file-secret-0123456789abcdefghijklmnop";
    const S2: &str = "env-secret-0123456789abcdefghijklmnopq";
    const S3: &str = "flag-secret-0123456789abcdefghijklmnop";

    fn names(c: &Config) -> Vec<String> {
        c.keys.key_names().map(str::to_owned).collect()
    }

    #[test]
    fn api_keys_flag_beats_env_beats_file() {
        let file = TempFile::new(&format!("[keys]\nfk1 = \"{S1}\"\nfk2 = \"{S1}\"\n"));
        let c = load(&["--config", file.path()], &[]).unwrap();
        assert_eq!(names(&c), ["fk1", "fk2"]);
        let e = [("PLAZA_API_KEY", "ek"), ("PLAZA_API_SECRET", S2)];
        let c = load(&["--config", file.path()], &e).unwrap();
        assert_eq!(names(&c), ["ek"]);
        let c = load(
            &[
                "--config",
                file.path(),
                "--api-key",
                "xk",
                "--api-secret",
                S3,
            ],
            &e,
        )
        .unwrap();
        assert_eq!(names(&c), ["xk"]);
        // The key from the flag, its secret from the environment.
        let c = load(&["--api-key", "xk"], &e).unwrap();
        assert_eq!(names(&c), ["xk"]);
        assert!(
            auth::Verifier::new(c.keys.clone())
                .verify(
                    Some(
                        &auth::mint(
                            &ApiKey::new("xk", S2),
                            &Claims::new("i", "r", auth::DEFAULT_TTL)
                        )
                        .unwrap()
                    ),
                    Some("r")
                )
                .is_ok()
        );
        // None: development mode.
        assert!(load(&[], &[]).unwrap().keys.is_empty());
    }

    #[test]
    fn api_keys_are_validated() {
        let short = load(&["--api-key", "k", "--api-secret", "tooshort"], &[]).unwrap_err();
        assert!(matches!(short, ConfigError::Keys(_)), "{short}");
        assert!(short.to_string().contains("at least 32"), "{short}");
        assert!(
            !short.to_string().contains("tooshort"),
            "the secret is not shown: {short}"
        );
        let e = load(&["--api-key", "k"], &[]).unwrap_err();
        assert!(e.to_string().contains("without --api-secret"), "{e}");
        let e = load(&[], &[("PLAZA_API_SECRET", S2)]).unwrap_err();
        assert!(e.to_string().contains("without --api-key"), "{e}");
        let file = TempFile::new("[keys]\nk = \"short\"\n");
        let e = load(&["--config", file.path()], &[]).unwrap_err();
        assert!(e.to_string().contains("\"k\""), "{e}");
        let file = TempFile::new("[keys]\nk = 5\n");
        assert!(matches!(
            load(&["--config", file.path()], &[]).unwrap_err(),
            ConfigError::ParseFile { .. }
        ));
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let file = TempFile::new(&format!("[keys]\nfk = \"{S1}\"\n"));
        let c = load(&["--config", file.path()], &[]).unwrap();
        let c2 = load(&["--api-key", "k", "--api-secret", S3], &[]).unwrap();
        let shown = format!("{c:?} {c:#?} {c2:?}");
        assert!(
            shown.contains("fk") && shown.contains("redacted"),
            "{shown}"
        );
        assert!(!shown.contains(S1) && !shown.contains(S3), "{shown}");
    }

    #[test]
    fn webhook_settings_from_every_layer() {
        let c = load(&[], &[]).unwrap();
        assert!(c.webhook.urls.is_empty(), "off by default");
        assert_eq!(c.webhook, crate::webhook::WebhookConfig::default());
        assert_eq!(c.webhook_key().unwrap().key, auth::DEV_API_KEY);

        let file = TempFile::new(
            r#"
            webhook_urls = ["https://file.example/hook"]
            webhook_queue = 50
            webhook_timeout = 3
            "#,
        );
        let c = load(
            &[
                "--config",
                file.path(),
                "--webhook-url",
                "http://a.example/h,https://b.example/h",
                "--webhook-url",
                "http://c.example/h",
                "--webhook-backoff-min",
                "0.25",
            ],
            &[
                ("PLAZA_WEBHOOK_RETRY_FOR", "60"),
                ("PLAZA_WEBHOOK_QUEUE", "70"),
            ],
        )
        .unwrap();
        assert_eq!(
            c.webhook.urls,
            [
                "http://a.example/h",
                "https://b.example/h",
                "http://c.example/h"
            ]
        );
        assert_eq!(c.webhook.queue, 70, "env beats file");
        assert_eq!(c.webhook.timeout, Duration::from_secs(3));
        assert_eq!(c.webhook.backoff.min, Duration::from_millis(250));
        assert_eq!(c.webhook.backoff.max, Duration::from_secs(30));
        assert_eq!(c.webhook.backoff.retry_for, Duration::from_secs(60));
        let c = load(&["--config", file.path()], &[]).unwrap();
        assert_eq!(c.webhook.urls, ["https://file.example/hook"]);

        assert!(load(&["--webhook-url", "ftp://x.example/"], &[]).is_err());
        assert!(load(&["--webhook-url", "/relative"], &[]).is_err());
        assert!(load(&["--webhook-url", "http://x/", "--webhook-queue", "0"], &[]).is_err());
        // Signed with the first API key by name, or the one named.
        let keys = [
            ("PLAZA_API_KEY", "kb"),
            ("PLAZA_API_SECRET", "0123456789abcdef0123456789abcdef"),
        ];
        assert_eq!(load(&[], &keys).unwrap().webhook_key().unwrap().key, "kb");
        assert!(load(&["--webhook-api-key", "nope"], &keys).is_err());
    }

    const TURN_SECRET: &str = "coturn-shared-secret-0123456789";

    #[test]
    fn turn_settings_from_every_layer() {
        // Nothing configured: no ICE servers.
        let c = load(&[], &[]).unwrap();
        assert!(c.ice.is_empty());
        assert_eq!(c.ice.turn_ttl, Duration::from_secs(86_400));

        let file = TempFile::new(&format!(
            r#"
            turn_urls = ["turn:file.example:3478?transport=udp", "turns:file.example:443?transport=tcp"]
            turn_secret = "{TURN_SECRET}-file"
            turn_ttl = 3600
            stun_url = "stun:file.example:3478"
            "#
        ));
        let c = load(&["--config", file.path()], &[]).unwrap();
        assert_eq!(
            c.ice.turn_urls,
            [
                "turn:file.example:3478?transport=udp",
                "turns:file.example:443?transport=tcp"
            ]
        );
        assert_eq!(
            c.ice.turn_secret.as_ref().map(Secret::expose),
            Some(format!("{TURN_SECRET}-file").as_str())
        );
        assert_eq!(c.ice.turn_ttl, Duration::from_secs(3600));
        assert_eq!(c.ice.stun_urls, ["stun:file.example:3478"]);

        // The environment beats the file (comma-separated lists).
        let envs = [
            (
                "PLAZA_TURN_URLS",
                " turn:env.example:3478?transport=udp , turn:env.example:3478?transport=tcp ",
            ),
            ("PLAZA_TURN_SECRET", TURN_SECRET),
            ("PLAZA_TURN_TTL", "600"),
            ("PLAZA_STUN_URLS", "stun:env.example"),
        ];
        let c = load(&["--config", file.path()], &envs).unwrap();
        assert_eq!(
            c.ice.turn_urls,
            [
                "turn:env.example:3478?transport=udp",
                "turn:env.example:3478?transport=tcp"
            ]
        );
        assert_eq!(
            c.ice.turn_secret.as_ref().map(Secret::expose),
            Some(TURN_SECRET)
        );
        assert_eq!(c.ice.turn_ttl, Duration::from_secs(600));
        assert_eq!(c.ice.stun_urls, ["stun:env.example"]);

        // Flags beat both; --turn-url repeats or takes a comma-separated list.
        let c = load(
            &[
                "--config",
                file.path(),
                "--turn-url",
                "turn:flag.example:3478?transport=udp,turn:flag.example:3478?transport=tcp",
                "--turn-url",
                "turns:flag.example:443?transport=tcp",
                "--turn-ttl",
                "120",
                "--turn-secret",
                "another-secret-of-enough-bytes",
            ],
            &envs,
        )
        .unwrap();
        assert_eq!(c.ice.turn_urls.len(), 3);
        assert_eq!(c.ice.turn_urls[2], "turns:flag.example:443?transport=tcp");
        assert_eq!(c.ice.turn_ttl, Duration::from_secs(120));
        assert_eq!(
            c.ice.turn_secret.as_ref().map(Secret::expose),
            Some("another-secret-of-enough-bytes")
        );
        assert_eq!(c.ice.stun_urls, ["stun:env.example"]);
        // The secret is never shown.
        let shown = format!("{c:?} {c:#?}");
        assert!(!shown.contains("another-secret-of-enough-bytes"), "{shown}");
        assert!(!shown.contains(TURN_SECRET), "{shown}");
    }

    #[test]
    fn bad_turn_settings_are_reported() {
        let turn = |e: ConfigError| match e {
            ConfigError::Turn(m) => m,
            other => panic!("not a TURN error: {other}"),
        };
        let e = turn(load(&["--turn-url", "turn:h:3478"], &[]).unwrap_err());
        assert!(e.contains("without --turn-secret"), "{e}");
        let e = turn(load(&[], &[("PLAZA_TURN_SECRET", TURN_SECRET)]).unwrap_err());
        assert!(e.contains("without --turn-url"), "{e}");
        let e = turn(
            load(
                &["--turn-url", "http://h:3478"],
                &[("PLAZA_TURN_SECRET", TURN_SECRET)],
            )
            .unwrap_err(),
        );
        assert!(
            e.contains("--turn-url") && e.contains("turn: or turns:"),
            "{e}"
        );
        let e = turn(
            load(
                &["--turn-url", "turn:h:3478", "--turn-secret", "short"],
                &[],
            )
            .unwrap_err(),
        );
        assert!(
            e.contains("at least 16 bytes") && !e.contains("short\""),
            "{e}"
        );
        let e = turn(
            load(
                &["--turn-url", "turn:h", "--turn-ttl", "10"],
                &[("PLAZA_TURN_SECRET", TURN_SECRET)],
            )
            .unwrap_err(),
        );
        assert!(e.contains("--turn-ttl"), "{e}");
        let e = turn(load(&["--stun-url", "turn:h"], &[]).unwrap_err());
        assert!(e.contains("--stun-url"), "{e}");
        assert!(matches!(
            load(&[], &[("PLAZA_TURN_TTL", "soon")]).unwrap_err(),
            ConfigError::Env {
                var: "PLAZA_TURN_TTL",
                ..
            }
        ));
        let file = TempFile::new("turn_urls = 5\n");
        assert!(matches!(
            load(&["--config", file.path()], &[]).unwrap_err(),
            ConfigError::ParseFile { .. }
        ));
    }

    #[test]
    fn token_subcommand_mints_a_verifiable_token() {
        let argv = [
            "plaza",
            "token",
            "--room",
            "r",
            "--identity",
            "bob",
            "--name",
            "Bob",
            "--grants",
            "subscribe",
            "--api-key",
            "k",
            "--api-secret",
            S3,
        ];
        let Invocation::Token(t) = Config::invocation_from(argv, env(&[])).unwrap() else {
            panic!("not the token subcommand");
        };
        assert!(!format!("{t:?}").contains(S3));
        let token = t.mint().unwrap();
        let v = auth::Verifier::new(std::iter::once(ApiKey::new("k", S3)).collect())
            .verify(Some(&token), Some("r"))
            .unwrap();
        assert_eq!((v.identity.as_str(), v.name.as_str()), ("bob", "Bob"));
        let g = v.grants.to_core();
        assert!(g.subscribe && !g.publish_audio && !g.publish_video && !g.publish_data);
        // Server flags do not mix with the subcommand.
        assert!(Config::invocation_from(["plaza", "--port", "1", "token"], env(&[])).is_err());
        // The server configuration is not a token.
        assert!(load(&["token", "--room", "r", "--identity", "i"], &[]).is_err());
    }

    /// ICE-TCP: the UDP port by default, a port or `off` from each layer (flag > env > file),
    /// and the range check with the workers.
    #[test]
    fn tcp_port_layers_and_off() {
        let c = load(&[], &[]).unwrap();
        assert_eq!(c.tcp_port, TcpPort::SameAsUdp);
        assert_eq!(c.tcp_port(), Some(DEFAULT_UDP_PORT));
        let c = load(&["--udp-port", "0"], &[]).unwrap();
        assert_eq!(c.tcp_port(), Some(0));
        let file = TempFile::new("tcp_port = 7000\n");
        let c = load(&[], &[("PLAZA_CONFIG", file.path())]).unwrap();
        assert_eq!(c.tcp_port(), Some(7000));
        let c = load(
            &[],
            &[("PLAZA_CONFIG", file.path()), ("PLAZA_TCP_PORT", "7100")],
        )
        .unwrap();
        assert_eq!(c.tcp_port(), Some(7100));
        let c = load(
            &["--tcp-port", "off"],
            &[("PLAZA_CONFIG", file.path()), ("PLAZA_TCP_PORT", "7100")],
        )
        .unwrap();
        assert_eq!(c.tcp_port, TcpPort::Off);
        assert_eq!(c.tcp_port(), None);
        for text in ["tcp_port = \"off\"\n", "tcp_port = false\n"] {
            let file = TempFile::new(text);
            let c = load(&[], &[("PLAZA_CONFIG", file.path())]).unwrap();
            assert_eq!(c.tcp_port(), None, "{text}");
        }
        assert!(load(&["--tcp-port", "nope"], &[]).is_err());
        assert!(load(&[], &[("PLAZA_TCP_PORT", "70000")]).is_err());
        let err = load(&["--tcp-port", "65535", "--workers", "2"], &[]).unwrap_err();
        assert!(err.to_string().contains("tcp-port"), "{err}");
    }
}
