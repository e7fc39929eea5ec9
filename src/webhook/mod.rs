//! Webhooks: room, participant, track and WHIP/WHEP session events POSTed as JSON to the
//! configured URLs (`--webhook-url`), signed ([`sign`]), delivered at least once and, per URL
//! and room, in order (signaling/WEBHOOKS.md describes every event).
//!
//! The core never waits for them: where an event happens it hands it to an [`Emitter`], a
//! non-blocking `try_send` into a bounded channel (a full channel drops the event, counted).
//! One dispatcher task ([`dispatch`]) owns all delivery state: it numbers each room's events
//! (`seq`, from 1, without gaps), derives `room_started`/`room_finished` from the room's
//! participant count, and keeps one [`queue::UrlQueue`] per URL (retries with jittered
//! exponential backoff, one event in flight per room).

// Outside the core: the dispatcher reads the clock and shares its counters with `/stats`.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

mod dispatch;
pub mod queue;
pub mod sign;

use crate::auth::ApiKey;
use crate::signal::{LeaveReason, TrackInfo};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

pub use queue::Backoff;

/// Events waiting between the server and the dispatcher, by default.
pub const DEFAULT_QUEUE: usize = 10_000;
/// A webhook request that has not answered in this long failed.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests in flight at once per URL (one per room).
pub const MAX_IN_FLIGHT: usize = 16;

/// Webhook settings (`--webhook-*`).
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookConfig {
    /// Where events are POSTed (`http://` or `https://`); empty: webhooks off.
    pub urls: Vec<String>,
    /// Events that may wait, in the channel from the server and per URL.
    pub queue: usize,
    /// Retry timing.
    pub backoff: Backoff,
    /// Per request.
    pub timeout: Duration,
    /// The API key that signs them (`None`: the server's first API key, or the development
    /// key in development mode).
    pub api_key: Option<String>,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            urls: Vec::new(),
            queue: DEFAULT_QUEUE,
            backoff: Backoff::default(),
            timeout: DEFAULT_TIMEOUT,
            api_key: None,
        }
    }
}

impl WebhookConfig {
    /// Every URL is an absolute `http://` or `https://` URL; the timings are not zero.
    pub fn validate(&self) -> Result<(), String> {
        for url in &self.urls {
            parse_url(url)?;
        }
        if self.queue == 0 {
            return Err("--webhook-queue must be at least 1".into());
        }
        if self.backoff.min.is_zero() || self.backoff.max < self.backoff.min {
            return Err(
                "--webhook-backoff-max must be at least --webhook-backoff-min (> 0)".into(),
            );
        }
        if self.timeout.is_zero() {
            return Err("--webhook-timeout must be more than 0".into());
        }
        Ok(())
    }
}

fn parse_url(url: &str) -> Result<hyper::Uri, String> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| format!("webhook URL {url:?}: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.host().is_some() => Ok(uri),
        _ => Err(format!(
            "webhook URL {url:?}: must be an absolute http:// or https:// URL"
        )),
    }
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    RoomStarted,
    RoomFinished,
    ParticipantJoined,
    ParticipantLeft,
    TrackPublished,
    TrackUnpublished,
    WhipSessionStarted,
    WhipSessionEnded,
    WhepSessionStarted,
    WhepSessionEnded,
}

/// The participant an event is about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParticipantRef {
    /// `PA_…`.
    pub id: String,
    /// From its access token (absent for WHIP/WHEP sessions without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    pub name: String,
    /// The signaling session's id (`SE_…`), as in the server's logs and `joined`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub session_id: String,
    /// Other participants do not see it (the `hidden` grant, WHEP viewers); webhooks do.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hidden: bool,
}

/// One webhook event: the body of one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Unique (`EV_…`); a retried event keeps it, so a receiver can drop duplicates.
    pub id: String,
    pub event: EventKind,
    pub room: String,
    /// The room's event number, from 1 (`room_started`) without gaps.
    pub seq: u64,
    /// Microseconds since the Unix epoch when it happened.
    pub created_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub participant: Option<ParticipantRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track: Option<TrackInfo>,
    /// `participant_left` only: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<LeaveReason>,
    /// WHIP/WHEP session events: the session's resource id (in its URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
}

impl Event {
    /// An event as it happens (the dispatcher gives it its `id` and `seq`).
    pub fn new(event: EventKind, room: &str, at: SystemTime) -> Self {
        Event {
            id: String::new(),
            event,
            room: room.to_owned(),
            seq: 0,
            created_at: at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
            participant: None,
            track: None,
            reason: None,
            resource: None,
        }
    }

    pub fn with_participant(mut self, p: ParticipantRef) -> Self {
        self.participant = Some(p);
        self
    }

    pub fn with_track(mut self, t: TrackInfo) -> Self {
        self.track = Some(t);
        self
    }

    pub fn with_reason(mut self, r: LeaveReason) -> Self {
        self.reason = Some(r);
        self
    }

    pub fn with_resource(mut self, r: &str) -> Self {
        self.resource = Some(r.to_owned());
        self
    }
}

/// What the webhooks did, counted per URL (an event sent to two URLs counts twice).
#[derive(Debug, Default)]
pub struct Counters {
    queued: AtomicU64,
    delivered: AtomicU64,
    retried: AtomicU64,
    dropped: AtomicU64,
    pending: AtomicU64,
}

/// [`Counters`] as served in the stats JSON (`"webhooks"`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookStats {
    /// Events accepted for delivery (once per URL).
    pub webhook_events_queued: u64,
    /// Events a URL answered with 2xx.
    pub webhook_events_delivered: u64,
    /// Failed tries that were tried again.
    pub webhook_events_retried: u64,
    /// Events lost: the server's channel or a URL's queue was full, or a URL failed for
    /// longer than the retry period.
    pub webhook_events_dropped: u64,
    /// Events waiting now (queued or in flight, all URLs).
    pub webhook_events_pending: u64,
}

impl Counters {
    pub fn snapshot(&self) -> WebhookStats {
        WebhookStats {
            webhook_events_queued: self.queued.load(Relaxed),
            webhook_events_delivered: self.delivered.load(Relaxed),
            webhook_events_retried: self.retried.load(Relaxed),
            webhook_events_dropped: self.dropped.load(Relaxed),
            webhook_events_pending: self.pending.load(Relaxed),
        }
    }
}

/// Where events are handed to the dispatcher (and, in a cluster, to the room events published
/// in Redis: the tee): cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub struct Emitter {
    /// The dispatcher (none: webhooks are off, only the tee gets events).
    tx: Option<mpsc::Sender<Event>>,
    counters: Arc<Counters>,
    tee: Option<mpsc::Sender<Event>>,
}

impl Emitter {
    /// An emitter whose events go to `tee` only (no webhooks).
    pub fn tee_only(tee: mpsc::Sender<Event>) -> Emitter {
        Emitter {
            tx: None,
            counters: Arc::default(),
            tee: Some(tee),
        }
    }

    /// This emitter, its events also going to `tee` (dropped there when it is full).
    pub fn with_tee(mut self, tee: mpsc::Sender<Event>) -> Emitter {
        self.tee = Some(tee);
        self
    }

    /// Hand `event` over; when the channel is full it is dropped (and counted).
    pub fn emit(&self, event: Event) {
        if let Some(tee) = &self.tee {
            let _ = tee.try_send(event.clone());
        }
        if let Some(tx) = &self.tx
            && tx.try_send(event).is_err()
        {
            self.counters.dropped.fetch_add(1, Relaxed);
        }
    }

    /// The counters so far.
    pub fn stats(&self) -> WebhookStats {
        self.counters.snapshot()
    }
}

/// The running webhook dispatcher.
#[derive(Debug)]
pub struct Webhooks {
    emitter: Emitter,
    finish: oneshot::Sender<Instant>,
    task: JoinHandle<()>,
}

impl Webhooks {
    /// Start the dispatcher for `cfg` (`None` when no URL is configured: nothing runs),
    /// signing with `key`.
    pub fn start(cfg: &WebhookConfig, key: ApiKey) -> Result<Option<Webhooks>, String> {
        if cfg.urls.is_empty() {
            return Ok(None);
        }
        cfg.validate()?;
        key.validate()?;
        let urls = cfg
            .urls
            .iter()
            .map(|u| parse_url(u))
            .collect::<Result<Vec<_>, _>>()?;
        let (tx, rx) = mpsc::channel(cfg.queue);
        let counters = Arc::new(Counters::default());
        let (finish, finish_rx) = oneshot::channel();
        let d = dispatch::Dispatcher::new(cfg, urls, key, Arc::clone(&counters))?;
        let task = tokio::spawn(d.run(rx, finish_rx));
        Ok(Some(Webhooks {
            emitter: Emitter {
                tx: Some(tx),
                counters,
                tee: None,
            },
            finish,
            task,
        }))
    }

    pub fn emitter(&self) -> Emitter {
        self.emitter.clone()
    }

    /// Deliver what is queued until `deadline` (retrying as usual), then stop; what is left
    /// is dropped (counted).
    pub async fn finish(self, deadline: Instant) {
        let Webhooks {
            emitter,
            finish,
            mut task,
        } = self;
        drop(emitter);
        let _ = finish.send(deadline);
        let grace = tokio::time::Instant::from_std(deadline) + Duration::from_millis(200);
        if tokio::time::timeout_at(grace, &mut task).await.is_err() {
            task.abort();
        }
    }
}
