//! The operator dashboard: `GET /dashboard` (the page, `signaling/dashboard.html`) and
//! `GET /dashboard/events`, a Server-Sent Events stream of the server's rooms, participants,
//! tracks and subscriptions with their bitrates, layers, bandwidth estimates and loss, and
//! the server's CPU and forwarded packets per second. `signaling/DASHBOARD.md` documents it.
//!
//! **One sampler per server.** The first viewer starts a task that asks the core for a
//! [`DashboardSnapshot`] and its counters every [`INTERVAL`], turns them into a [`View`]
//! (numbers quantised, with hysteresis, so noise is no change: see [`settle_rate`]) and, when
//! the view changed, broadcasts the [`Delta`] from the previous one, serialised once for
//! every viewer. It stops at the first tick without viewers.
//!
//! **Per viewer.** A stream starts with a `snapshot` event (the whole view), then sends
//! `delta` events only (nothing while nothing changes but a comment every [`KEEP_ALIVE`]). A
//! viewer that falls behind (its connection does not take the events as fast as they come,
//! and the bounded broadcast overflows) skips to a fresh `snapshot` instead of buffering.
//!
//! **Access.** A token with the `roomList` grant (what lists every room in the admin API), as
//! the `access_token` query parameter (an `EventSource` cannot set headers) or as
//! `Authorization: Bearer`. No token or a bad one: 401 with a JSON error; a token without
//! the grant: 403.

use super::AppState;
use crate::auth::TokenError;
use crate::sfu::core::dashboard::DashboardSnapshot;
use axum::{
    Json, Router,
    extract::{Query, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::get,
};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, watch};

/// How often the sampler looks (at most this many updates per second: 2).
pub const INTERVAL: Duration = Duration::from_millis(500);
/// A comment is sent after this long without an event (proxies close idle connections).
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Updates a viewer may fall behind by before it skips to a fresh snapshot.
const BACKLOG: usize = 16;
/// How long the sampler waits for the core.
const SAMPLE_TIMEOUT: Duration = Duration::from_secs(2);
/// A rate (bitrate, packets/s) is a change when it moves by more than this fraction.
pub const RATE_HYSTERESIS: f64 = 0.10;
/// CPU is a change when it moves by at least this many percentage points.
pub const CPU_HYSTERESIS: u32 = 3;
/// Loss is a change when it moves by at least this many per mille.
pub const LOSS_HYSTERESIS: u32 = 5;
/// Rates are averaged over this many samples (3 s at [`INTERVAL`]) before they are
/// quantised: the core's one-second meters swing by ±20 % from one half-second to the next
/// with keyframes and with publishers that send in bursts.
pub const RATE_SAMPLES: usize = 6;
/// Loss is counted over this window (cumulative counters, differenced) …
pub const LOSS_WINDOW: Duration = Duration::from_secs(2);
/// … and only from this many packets in it.
pub const LOSS_MIN_PACKETS: u64 = 20;
/// The page the dashboard serves, under the static directory.
const PAGE: &str = "dashboard.html";

/// The dashboard's routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/dashboard", get(page))
        .route("/dashboard/events", get(events))
}

// ------------------------------------------------------------------------------ the model

/// What an entity is known by: its room and its id in the room (empty for the room itself).
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Key {
    pub room: String,
    pub id: String,
}

/// Something the view holds by [`Key`].
pub trait Entity: Clone + PartialEq {
    fn key(&self) -> Key;
}

/// Server-wide numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerView {
    /// CPU the server process used over the last interval, in percent of one core.
    pub cpu_percent: Option<u32>,
    /// RTP packets forwarded per second over the last interval (2 significant digits).
    pub forwarded_pps: Option<u64>,
    pub rooms: u64,
    pub participants: u64,
    pub shards: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomView {
    pub room: String,
    pub created_at: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParticipantView {
    pub room: String,
    pub id: String,
    pub identity: Option<String>,
    pub name: String,
    pub joined_at: u64,
    /// `connecting` or `connected`.
    pub state: String,
    pub hidden: bool,
    /// `excellent`, `good`, `poor`, `lost` (as the room was told), and the score behind it.
    pub quality: Option<String>,
    pub score: Option<u8>,
    /// The subscriber connection's bandwidth estimate (2 significant digits).
    pub available_bps: Option<u64>,
    /// Loss over the last [`LOSS_WINDOW`], per mille: of what the server sent it (its
    /// transport-wide feedback), and of what it published.
    pub downlink_loss_permille: Option<u32>,
    pub uplink_loss_permille: Option<u32>,
    /// Among the room's active speakers.
    #[serde(default)]
    pub speaking: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackView {
    pub room: String,
    pub id: String,
    pub participant_id: String,
    pub kind: String,
    pub mime_type: String,
    pub muted: bool,
    pub layers: Vec<LayerView>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerView {
    pub rid: String,
    /// Receive bitrate (2 significant digits).
    pub bitrate_bps: u64,
    pub active: bool,
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionView {
    pub room: String,
    /// `<subscriber>/<track>`.
    pub id: String,
    pub subscriber: String,
    pub track: String,
    pub layer: Option<String>,
    pub target: Option<String>,
    pub paused: bool,
}

impl Entity for RoomView {
    fn key(&self) -> Key {
        Key {
            room: self.room.clone(),
            id: String::new(),
        }
    }
}

macro_rules! entity {
    ($($t:ty),*) => {$(
        impl Entity for $t {
            fn key(&self) -> Key {
                Key { room: self.room.clone(), id: self.id.clone() }
            }
        }
    )*};
}
entity!(ParticipantView, TrackView, SubscriptionView);

/// Everything the dashboard shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    pub server: ServerView,
    pub rooms: BTreeMap<Key, RoomView>,
    pub participants: BTreeMap<Key, ParticipantView>,
    pub tracks: BTreeMap<Key, TrackView>,
    pub subscriptions: BTreeMap<Key, SubscriptionView>,
}

/// What changed in one kind of entity: added or changed ones (whole), removed ones (keys).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changes<T> {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<T>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<Key>,
}

impl<T> Default for Changes<T> {
    fn default() -> Self {
        Changes {
            set: Vec::new(),
            removed: Vec::new(),
        }
    }
}

impl<T> Changes<T> {
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.removed.is_empty()
    }
}

/// What changed from one view to the next (a `snapshot` is the delta from nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerView>,
    #[serde(default, skip_serializing_if = "Changes::is_empty")]
    pub rooms: Changes<RoomView>,
    #[serde(default, skip_serializing_if = "Changes::is_empty")]
    pub participants: Changes<ParticipantView>,
    #[serde(default, skip_serializing_if = "Changes::is_empty")]
    pub tracks: Changes<TrackView>,
    #[serde(default, skip_serializing_if = "Changes::is_empty")]
    pub subscriptions: Changes<SubscriptionView>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.server.is_none()
            && self.rooms.is_empty()
            && self.participants.is_empty()
            && self.tracks.is_empty()
            && self.subscriptions.is_empty()
    }
}

fn diff_map<T: Entity>(prev: &BTreeMap<Key, T>, next: &BTreeMap<Key, T>) -> Changes<T> {
    Changes {
        set: next
            .iter()
            .filter(|(k, v)| prev.get(*k) != Some(*v))
            .map(|(_, v)| v.clone())
            .collect(),
        removed: prev
            .keys()
            .filter(|k| !next.contains_key(*k))
            .cloned()
            .collect(),
    }
}

fn apply_map<T: Entity>(map: &mut BTreeMap<Key, T>, c: &Changes<T>) {
    for k in &c.removed {
        map.remove(k);
    }
    for v in &c.set {
        map.insert(v.key(), v.clone());
    }
}

/// What changed from `prev` to `next`: `apply(prev, diff(prev, next)) == next`.
pub fn diff(prev: &View, next: &View) -> Delta {
    Delta {
        server: (prev.server != next.server).then(|| next.server.clone()),
        rooms: diff_map(&prev.rooms, &next.rooms),
        participants: diff_map(&prev.participants, &next.participants),
        tracks: diff_map(&prev.tracks, &next.tracks),
        subscriptions: diff_map(&prev.subscriptions, &next.subscriptions),
    }
}

/// Applies a delta (what the page does).
pub fn apply(view: &mut View, d: &Delta) {
    if let Some(s) = &d.server {
        view.server = s.clone();
    }
    apply_map(&mut view.rooms, &d.rooms);
    apply_map(&mut view.participants, &d.participants);
    apply_map(&mut view.tracks, &d.tracks);
    apply_map(&mut view.subscriptions, &d.subscriptions);
}

/// The whole view as a delta from nothing (the `snapshot` event).
pub fn snapshot(view: &View) -> Delta {
    Delta {
        server: Some(view.server.clone()),
        ..diff(&View::default(), view)
    }
}

// ------------------------------------------------------------------------- quantisation

/// `x` rounded to two significant digits (1234 → 1200, 98 → 98).
pub fn two_digits(x: u64) -> u64 {
    let mut p = 1u64;
    while x / p >= 100 {
        p *= 10;
    }
    (x / p + u64::from(x % p >= p / 2 && p > 1)) * p
}

/// A rate as the view shows it: the previous value while `raw` stays within
/// [`RATE_HYSTERESIS`] of it, else `raw` to two significant digits.
pub fn settle_rate(prev: Option<u64>, raw: u64) -> u64 {
    match prev {
        Some(p) if p > 0 && raw.abs_diff(p) as f64 <= RATE_HYSTERESIS * p as f64 => p,
        _ => two_digits(raw),
    }
}

/// A value with an absolute dead band: the previous value while `raw` is within `band` of it.
pub fn settle_abs(prev: Option<u32>, raw: u32, band: u32) -> u32 {
    match prev {
        Some(p) if raw.abs_diff(p) < band => p,
        _ => raw,
    }
}

/// A loss: like [`settle_abs`], but loss appearing (or clearing) is always a change.
pub fn settle_loss(prev: Option<u32>, raw: u32) -> u32 {
    match prev {
        Some(p) if (p == 0) != (raw == 0) => raw,
        _ => settle_abs(prev, raw, LOSS_HYSTERESIS),
    }
}

// ------------------------------------------------------------------------------ sampling

/// Turns the core's snapshots into views, one after the other (it keeps what the quantisation
/// and the loss windows need).
#[derive(Debug, Default)]
pub struct Sampler {
    prev: View,
    cpu_at: Option<(Instant, f64)>,
    forwarded_at: Option<(Instant, u64)>,
    /// Cumulative loss counters per (participant, uplink?) over the last [`LOSS_WINDOW`].
    loss: HashMap<(Key, bool), LossHistory>,
    /// Smoothed rates by what they measure; those not seen in a sample are forgotten.
    smooth: HashMap<String, VecDeque<u64>>,
    smooth_seen: Vec<String>,
}

/// Cumulative (expected, lost) packet counters of one link, by sample time.
type LossHistory = VecDeque<(Instant, (u64, u64))>;

/// The server-wide inputs of one sample.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerSample {
    /// CPU seconds the process used so far.
    pub cpu_s: Option<f64>,
    /// RTP packets forwarded so far.
    pub forwarded: Option<u64>,
    pub shards: u64,
}

impl Sampler {
    /// `raw` averaged with the last samples of `what` ([`RATE_SAMPLES`]); a rate that drops
    /// to zero (a layer stops) is zero at once.
    fn smoothed(&mut self, what: String, raw: u64) -> u64 {
        let samples = self.smooth.entry(what.clone()).or_default();
        if raw == 0 {
            samples.clear();
        }
        samples.push_back(raw);
        while samples.len() > RATE_SAMPLES {
            samples.pop_front();
        }
        let mean = samples.iter().sum::<u64>() / samples.len() as u64;
        self.smooth_seen.push(what);
        mean
    }

    /// The view of `snap` and `server` sampled at `now`.
    pub fn sample(&mut self, snap: &DashboardSnapshot, server: ServerSample, now: Instant) -> View {
        let mut view = View::default();
        let prev = std::mem::take(&mut self.prev);
        let rate = |at: Option<(Instant, f64)>, value: f64| {
            let (t0, v0) = at?;
            let dt = now.saturating_duration_since(t0).as_secs_f64();
            (dt > 0.0).then(|| ((value - v0) / dt).max(0.0))
        };
        let cpu = server.cpu_s.and_then(|c| rate(self.cpu_at, c)).map(|r| {
            settle_abs(
                prev.server.cpu_percent,
                (r * 100.0).round() as u32,
                CPU_HYSTERESIS,
            )
        });
        let pps = server
            .forwarded
            .and_then(|f| rate(self.forwarded_at.map(|(t, v)| (t, v as f64)), f as f64))
            .map(|r| {
                let r = self.smoothed("pps".into(), r.round() as u64);
                settle_rate(prev.server.forwarded_pps, r)
            });
        self.cpu_at = server.cpu_s.map(|c| (now, c));
        self.forwarded_at = server.forwarded.map(|f| (now, f));
        view.server = ServerView {
            cpu_percent: cpu,
            forwarded_pps: pps,
            rooms: snap.rooms.len() as u64,
            participants: snap.rooms.iter().map(|r| r.participants.len() as u64).sum(),
            shards: server.shards,
        };
        let mut seen_loss = std::collections::HashSet::new();
        for r in &snap.rooms {
            let room = RoomView {
                room: r.name.clone(),
                created_at: r.created_at,
            };
            view.rooms.insert(room.key(), room);
            for p in &r.participants {
                let key = Key {
                    room: r.name.clone(),
                    id: p.id.clone(),
                };
                let before = prev.participants.get(&key);
                let mut loss = |uplink: bool, counts: Option<(u64, u64)>| {
                    let counts = counts?;
                    seen_loss.insert((key.clone(), uplink));
                    let was = before.and_then(|b| {
                        if uplink {
                            b.uplink_loss_permille
                        } else {
                            b.downlink_loss_permille
                        }
                    });
                    let history = self.loss.entry((key.clone(), uplink)).or_default();
                    history.push_back((now, counts));
                    while history.len() > 1
                        && history
                            .get(1)
                            .is_some_and(|(t, _)| now.saturating_duration_since(*t) >= LOSS_WINDOW)
                    {
                        history.pop_front();
                    }
                    let (_, base) = history.front().copied()?;
                    let expected = counts.0.saturating_sub(base.0);
                    let lost = counts.1.saturating_sub(base.1).min(expected);
                    if expected < LOSS_MIN_PACKETS {
                        return was;
                    }
                    let permille = (lost * 1000 / expected) as u32;
                    Some(settle_loss(was, permille))
                };
                let downlink_loss_permille = loss(false, p.downlink);
                let uplink_loss_permille = loss(true, p.uplink);
                let available_bps = p.available_bps.map(|b| {
                    let b = self.smoothed(format!("bwe/{}/{}", r.name, p.id), b);
                    settle_rate(before.and_then(|b| b.available_bps), b)
                });
                view.participants.insert(
                    key.clone(),
                    ParticipantView {
                        room: key.room,
                        id: key.id,
                        identity: p.identity.clone(),
                        name: p.name.clone(),
                        joined_at: p.joined_at,
                        state: p.state.to_owned(),
                        hidden: p.hidden,
                        quality: p.quality.map(|q| q.as_str().to_owned()),
                        score: p.score,
                        available_bps,
                        downlink_loss_permille,
                        uplink_loss_permille,
                        speaking: p.speaking,
                    },
                );
            }
            for t in &r.tracks {
                let key = Key {
                    room: r.name.clone(),
                    id: t.id.clone(),
                };
                let before = prev.tracks.get(&key);
                let mut layers = Vec::with_capacity(t.layers.len());
                for (i, l) in t.layers.iter().enumerate() {
                    let bps =
                        self.smoothed(format!("layer/{}/{}/{i}", r.name, t.id), l.bitrate_bps);
                    layers.push(LayerView {
                        rid: l.rid.clone(),
                        bitrate_bps: settle_rate(
                            before.and_then(|b| b.layers.get(i)).map(|b| b.bitrate_bps),
                            bps,
                        ),
                        active: l.active,
                        width: l.width,
                        height: l.height,
                    });
                }
                view.tracks.insert(
                    key.clone(),
                    TrackView {
                        room: key.room,
                        id: key.id,
                        participant_id: t.participant_id.clone(),
                        kind: t.kind.to_owned(),
                        mime_type: t.mime_type.clone(),
                        muted: t.muted,
                        layers,
                    },
                );
            }
            for s in &r.subscriptions {
                let sub = SubscriptionView {
                    room: r.name.clone(),
                    id: format!("{}/{}", s.subscriber, s.track),
                    subscriber: s.subscriber.clone(),
                    track: s.track.clone(),
                    layer: s.layer.clone(),
                    target: s.target.clone(),
                    paused: s.paused,
                };
                view.subscriptions.insert(sub.key(), sub);
            }
        }
        self.loss.retain(|k, _| seen_loss.contains(k));
        let seen: std::collections::HashSet<String> = self.smooth_seen.drain(..).collect();
        self.smooth.retain(|k, _| seen.contains(k));
        self.prev = view.clone();
        view
    }
}

// ---------------------------------------------------------------------- the shared stream

/// One update of the view, shared by every viewer.
#[derive(Debug)]
pub struct Update {
    seq: u64,
    view: View,
    /// The `delta` event's data (from update `seq - 1`); `None` for the first update.
    delta: Option<String>,
    /// The `snapshot` event's data, made when a viewer first needs it.
    snapshot: OnceLock<String>,
}

impl Update {
    fn snapshot_json(&self) -> &str {
        self.snapshot
            .get_or_init(|| event_json(self.seq, &snapshot(&self.view)))
    }
}

/// An event's data: `{"seq": …, …delta}`.
fn event_json(seq: u64, delta: &Delta) -> String {
    #[derive(Serialize)]
    struct Wire<'a> {
        seq: u64,
        #[serde(flatten)]
        delta: &'a Delta,
    }
    serde_json::to_string(&Wire { seq, delta }).unwrap_or_default()
}

/// The server's dashboard: its sampler (while anyone watches) and the latest update.
#[derive(Debug, Clone, Default)]
pub struct Hub {
    inner: Arc<Mutex<HubInner>>,
}

#[derive(Debug, Default)]
struct HubInner {
    /// The running sampler's channel (`None`: no sampler runs).
    tx: Option<broadcast::Sender<Arc<Update>>>,
    latest: Option<Arc<Update>>,
    /// Samplers started so far (for tests and the docs' claim of one per server).
    started: u64,
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HubInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new viewer: the latest update (if the sampler has made one) and the channel of the
    /// next ones; starts the sampler if none runs.
    fn subscribe(
        &self,
        state: &AppState,
    ) -> (Option<Arc<Update>>, broadcast::Receiver<Arc<Update>>) {
        let mut inner = self.lock();
        if let Some(tx) = &inner.tx {
            return (inner.latest.clone(), tx.subscribe());
        }
        let (tx, rx) = broadcast::channel(BACKLOG);
        inner.tx = Some(tx.clone());
        inner.latest = None;
        inner.started += 1;
        tokio::spawn(run_sampler(self.clone(), state.clone(), tx));
        (None, rx)
    }

    /// Whether a sampler runs, and how many have been started.
    pub fn sampler_status(&self) -> (bool, u64) {
        let inner = self.lock();
        (inner.tx.is_some(), inner.started)
    }
}

/// The sampler: every [`INTERVAL`] a view, broadcast as a delta when it changed; ends at the
/// first tick without viewers.
async fn run_sampler(hub: Hub, state: AppState, tx: broadcast::Sender<Arc<Update>>) {
    let mut sampler = Sampler::default();
    let mut ticker = tokio::time::interval(INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let shards = state.handle.shards() as u64;
    tracing::debug!("dashboard sampler started");
    loop {
        ticker.tick().await;
        let sample = async {
            let snap = state.handle.dashboard().await.ok()?;
            let forwarded = state
                .handle
                .stats()
                .await
                .ok()
                .map(|s| s.rtp_packets_forwarded);
            Some((snap, forwarded))
        };
        let sampled = tokio::time::timeout(SAMPLE_TIMEOUT, sample)
            .await
            .ok()
            .flatten();
        let usage = super::metrics::process_usage();
        let cpu_s = usage
            .cpu_runtime_ns
            .map(|ns| ns as f64 / 1e9)
            .or(usage.cpu_total_s);
        let mut inner = hub.lock();
        if tx.receiver_count() == 0 {
            inner.tx = None;
            inner.latest = None;
            tracing::debug!("dashboard sampler stopped: no viewer left");
            return;
        }
        // (The core did not answer: nothing new to tell this time.)
        let Some((snap, forwarded)) = sampled else {
            continue;
        };
        let now = Instant::now();
        let view = sampler.sample(
            &snap,
            ServerSample {
                cpu_s,
                forwarded,
                shards,
            },
            now,
        );
        let (seq, delta) = match &inner.latest {
            Some(prev) => {
                let d = diff(&prev.view, &view);
                if d.is_empty() {
                    continue;
                }
                (prev.seq + 1, Some(event_json(prev.seq + 1, &d)))
            }
            None => (1, None),
        };
        let update = Arc::new(Update {
            seq,
            view,
            delta,
            snapshot: OnceLock::new(),
        });
        inner.latest = Some(update.clone());
        let _ = tx.send(update);
    }
}

/// One viewer's place in the stream.
struct Viewer {
    hub: Hub,
    rx: broadcast::Receiver<Arc<Update>>,
    /// The update this viewer is at (`None`: nothing sent yet).
    at: Option<u64>,
    first: Option<Arc<Update>>,
    shutdown: watch::Receiver<bool>,
}

impl Viewer {
    fn snapshot_event(&mut self, u: &Update) -> Event {
        self.at = Some(u.seq);
        Event::default()
            .event("snapshot")
            .id(u.seq.to_string())
            .data(u.snapshot_json())
    }

    /// The next event for this viewer; `None`: the stream ends (the server shuts down).
    async fn next(&mut self) -> Option<Event> {
        if let Some(u) = self.first.take() {
            return Some(self.snapshot_event(&u));
        }
        loop {
            let received = tokio::select! {
                _ = self.shutdown.wait_for(|stop| *stop) => return None,
                r = self.rx.recv() => r,
            };
            match received {
                Ok(u) => match (self.at, &u.delta) {
                    (Some(at), _) if u.seq <= at => continue,
                    (Some(at), Some(delta)) if u.seq == at + 1 => {
                        self.at = Some(u.seq);
                        return Some(
                            Event::default()
                                .event("delta")
                                .id(u.seq.to_string())
                                .data(delta.as_str()),
                        );
                    }
                    _ => return Some(self.snapshot_event(&u)),
                },
                // Fell behind: drop the backlog and skip to the newest view (taken with the
                // new place in the channel under the lock the sampler sends under, so no
                // update falls between them).
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let latest = {
                        let inner = self.hub.lock();
                        self.rx = self.rx.resubscribe();
                        inner.latest.clone()
                    };
                    if let Some(u) = latest {
                        return Some(self.snapshot_event(&u));
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

// ------------------------------------------------------------------------------ handlers

/// `GET /dashboard`: the page (served like the static files).
async fn page(State(state): State<AppState>, method: Method) -> Response {
    super::serve_static(&state, &method, Path::new(PAGE)).await
}

#[derive(Debug, Default, Deserialize)]
struct EventsQuery {
    access_token: Option<String>,
    /// In a cluster: the node whose view to stream (absent or this node's id: this node's).
    node: Option<String>,
}

/// A refused request: `{"code", "message"}`.
fn refusal(state: &AppState, e: TokenError) -> Response {
    super::limits::HttpCounters::inc(&state.counters.token_refusals);
    let code = e.code();
    let (status, message) = match e {
        TokenError::Missing => (
            StatusCode::UNAUTHORIZED,
            "the dashboard needs an access token with the `roomList` grant: \
             `?access_token=<token>` or `Authorization: Bearer <token>`"
                .to_owned(),
        ),
        TokenError::WrongRoom { .. }
        | TokenError::JoinNotGranted(_)
        | TokenError::AdminNotGranted(_) => (StatusCode::FORBIDDEN, e.to_string()),
        TokenError::BadKey(_) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        other => (StatusCode::UNAUTHORIZED, other.to_string()),
    };
    let body = Json(serde_json::json!({ "code": code, "message": message }));
    let mut res = (status, body).into_response();
    if status == StatusCode::UNAUTHORIZED {
        res.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    res
}

/// `GET /dashboard/events`: the Server-Sent Events stream.
async fn events(
    State(state): State<AppState>,
    Query(query): Query<EventsQuery>,
    headers: HeaderMap,
) -> Response {
    let bearer = super::bearer(&headers).map(str::to_owned);
    let token = query
        .access_token
        .filter(|t| !t.trim().is_empty())
        .or(bearer);
    if let Err(e) = state.settings.verifier.verify_admin(token.as_deref(), None) {
        return refusal(&state, e);
    }
    if let Some(node) = query.node.as_deref().filter(|n| !n.is_empty())
        && let Some(cluster) = &state.cluster
        && node != cluster.node_id()
        && !headers.contains_key(crate::cluster::FORWARDED_HEADER)
    {
        return other_node(cluster, node, token.as_deref().unwrap_or_default()).await;
    }
    let hub = state.dashboard.clone();
    let (first, rx) = hub.subscribe(&state);
    let viewer = Viewer {
        hub,
        rx,
        at: None,
        first,
        shutdown: state.shutdown.clone(),
    };
    let stream = futures_util::stream::unfold(viewer, |mut v| async move {
        let event = v.next().await?;
        Some((Ok::<_, Infallible>(event), v))
    });
    (
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE).text("keep-alive")),
    )
        .into_response()
}

/// Another node's stream, relayed as it comes (the token was checked here; that node checks
/// it again). 404 for a node that is not live, 502 when it does not answer.
async fn other_node(cluster: &crate::cluster::ClusterView, node: &str, token: &str) -> Response {
    let fail = |status: StatusCode, code: &str, message: String| {
        (
            status,
            Json(serde_json::json!({ "code": code, "message": message })),
        )
            .into_response()
    };
    let record = match cluster.nodes().await {
        Ok(nodes) => nodes.into_iter().find(|n| n.id == node),
        Err(e) => {
            return fail(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("Redis did not answer: {e}"),
            );
        }
    };
    let Some(record) = record else {
        return fail(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no live node {node} in the cluster"),
        );
    };
    match cluster
        .open_stream(&record, "/dashboard/events", token)
        .await
    {
        Ok(res) => {
            let (parts, body) = res.into_parts();
            let mut out = Response::new(axum::body::Body::new(body));
            *out.status_mut() = parts.status;
            for name in [
                header::CONTENT_TYPE,
                header::CACHE_CONTROL,
                header::WWW_AUTHENTICATE,
            ] {
                if let Some(v) = parts.headers.get(&name) {
                    out.headers_mut().insert(name, v.clone());
                }
            }
            if let Ok(v) = HeaderValue::from_str(node) {
                out.headers_mut().insert(crate::cluster::NODE_HEADER, v);
            }
            out
        }
        Err(e) => fail(StatusCode::BAD_GATEWAY, "unavailable", e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sfu::core::dashboard::{
        LayerSnapshot, ParticipantSnapshot, RoomSnapshot, SubscriptionSnapshot, TrackSnapshot,
    };
    use proptest::prelude::*;

    #[test]
    fn two_significant_digits() {
        assert_eq!(two_digits(0), 0);
        assert_eq!(two_digits(7), 7);
        assert_eq!(two_digits(98), 98);
        assert_eq!(two_digits(1_234), 1_200);
        assert_eq!(two_digits(1_250), 1_300);
        assert_eq!(two_digits(2_549_999), 2_500_000);
        assert_eq!(two_digits(995), 1_000);
    }

    #[test]
    fn rates_settle_within_the_band() {
        assert_eq!(settle_rate(None, 1_234_567), 1_200_000);
        // Within 10 %: the previous value stands.
        assert_eq!(settle_rate(Some(1_200_000), 1_300_000), 1_200_000);
        assert_eq!(settle_rate(Some(1_200_000), 1_090_000), 1_200_000);
        // Beyond: the new value, rounded.
        assert_eq!(settle_rate(Some(1_200_000), 1_340_000), 1_300_000);
        assert_eq!(settle_rate(Some(1_200_000), 0), 0);
        assert_eq!(settle_rate(Some(0), 5), 5);
        assert_eq!(settle_abs(Some(10), 12, 3), 10);
        assert_eq!(settle_abs(Some(10), 13, 3), 13);
        assert_eq!(settle_abs(Some(0), 1, 3), 0);
        // Loss appearing, or clearing, is a change at once.
        assert_eq!(settle_loss(Some(0), 2), 2);
        assert_eq!(settle_loss(Some(2), 0), 0);
        assert_eq!(settle_loss(Some(20), 23), 20);
        assert_eq!(settle_loss(Some(20), 25), 25);
    }

    fn snap(participants: &[&str], bitrate: u64, loss: (u64, u64)) -> DashboardSnapshot {
        DashboardSnapshot {
            rooms: vec![RoomSnapshot {
                name: "r".into(),
                created_at: 5,
                participants: participants
                    .iter()
                    .map(|id| ParticipantSnapshot {
                        id: (*id).into(),
                        name: id.to_uppercase(),
                        state: "connected",
                        available_bps: Some(2_000_000),
                        downlink: Some(loss),
                        ..Default::default()
                    })
                    .collect(),
                tracks: vec![TrackSnapshot {
                    id: "TR_1".into(),
                    participant_id: "PA_a".into(),
                    kind: "video",
                    mime_type: "video/VP8".into(),
                    muted: false,
                    layers: vec![LayerSnapshot {
                        rid: "f".into(),
                        bitrate_bps: bitrate,
                        active: true,
                        width: 1280,
                        height: 720,
                    }],
                }],
                subscriptions: vec![SubscriptionSnapshot {
                    subscriber: "PA_b".into(),
                    track: "TR_1".into(),
                    layer: Some("f".into()),
                    target: Some("f".into()),
                    paused: false,
                }],
            }],
        }
    }

    /// Noise is no change; a join is a small delta; loss is counted over the window.
    #[test]
    fn the_sampler_quantises_and_counts_loss() {
        let t0 = Instant::now();
        let mut s = Sampler::default();
        let server = |cpu: f64, fwd: u64| ServerSample {
            cpu_s: Some(cpu),
            forwarded: Some(fwd),
            shards: 1,
        };
        let v1 = s.sample(
            &snap(&["PA_a", "PA_b"], 1_000_000, (0, 0)),
            server(1.0, 0),
            t0,
        );
        assert_eq!(v1.server.cpu_percent, None, "no rate from one sample");
        assert_eq!(v1.participants.len(), 2);
        let at = |ms| t0 + Duration::from_millis(ms);
        // 5 % more bitrate, the same CPU and packet rate: nothing changed.
        let v2 = s.sample(
            &snap(&["PA_a", "PA_b"], 1_050_000, (10, 0)),
            server(1.1, 500),
            at(500),
        );
        assert_eq!(v2.server.cpu_percent, Some(20));
        assert_eq!(v2.server.forwarded_pps, Some(1_000));
        let v3 = s.sample(
            &snap(&["PA_a", "PA_b"], 960_000, (15, 0)),
            server(1.201, 1_010),
            at(1000),
        );
        let d = diff(&v2, &v3);
        assert!(d.is_empty(), "{d:?}");
        // A join: one participant set, nothing else.
        let v4 = s.sample(
            &snap(&["PA_a", "PA_b", "PA_c"], 1_000_000, (40, 4)),
            server(1.3, 1_500),
            at(1500),
        );
        let d = diff(&v3, &v4);
        assert_eq!(
            d.participants.set.len(),
            3,
            "PA_c, and loss on a and b: {d:?}"
        );
        assert_eq!(
            v4.participants[&Key {
                room: "r".into(),
                id: "PA_a".into()
            }]
                .downlink_loss_permille,
            Some(100)
        );
        assert!(d.tracks.is_empty() && d.subscriptions.is_empty() && d.rooms.is_empty());
        // Bytes per update stay small.
        assert!(event_json(2, &d).len() < 1024, "{}", event_json(2, &d));
        // A leave: a removal.
        let v5 = s.sample(
            &snap(&["PA_a", "PA_b"], 1_000_000, (40, 4)),
            server(1.4, 2_000),
            at(2000),
        );
        let d = diff(&v4, &v5);
        assert_eq!(
            d.participants.removed,
            vec![Key {
                room: "r".into(),
                id: "PA_c".into()
            }]
        );
    }

    /// A meter that swings ±40 % from one sample to the next (keyframes, bursts) is one
    /// steady rate once averaged.
    #[test]
    fn swinging_rates_are_averaged() {
        let t0 = Instant::now();
        let mut s = Sampler::default();
        let mut prev: Option<View> = None;
        let mut changes = 0;
        for i in 0..40u64 {
            let raw = if i % 2 == 0 { 600_000 } else { 1_400_000 };
            let v = s.sample(
                &snap(&["PA_a", "PA_b"], raw, (0, 0)),
                ServerSample::default(),
                t0 + Duration::from_millis(500 * i),
            );
            if i >= RATE_SAMPLES as u64 && prev.as_ref().is_some_and(|p| !diff(p, &v).is_empty()) {
                changes += 1;
            }
            prev = Some(v);
        }
        assert_eq!(changes, 0);
        let v = prev.unwrap();
        let t = &v.tracks[&Key {
            room: "r".into(),
            id: "TR_1".into(),
        }];
        assert_eq!(t.layers[0].bitrate_bps, 1_000_000);
    }

    fn update(seq: u64, delta: bool) -> Arc<Update> {
        let view = View {
            server: ServerView {
                rooms: seq,
                ..ServerView::default()
            },
            ..View::default()
        };
        Arc::new(Update {
            seq,
            delta: delta.then(|| format!("{{\"seq\":{seq}}}")),
            view,
            snapshot: OnceLock::new(),
        })
    }

    async fn event_text(e: Event) -> String {
        // An event's wire form is what a one-event stream's body holds.
        let stream = futures_util::stream::iter([Ok::<_, Infallible>(e)]);
        let body = Sse::new(stream).into_response().into_body();
        let bytes = axum::body::to_bytes(body, 1 << 20).await.unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    /// A viewer gets deltas in order; one that fell behind the bounded channel skips to a
    /// snapshot of the newest view (never the backlog), then follows with deltas again.
    #[tokio::test]
    async fn a_slow_viewer_skips_to_a_fresh_snapshot() {
        let hub = Hub::default();
        let (tx, rx) = broadcast::channel(BACKLOG);
        let (_stop, shutdown) = watch::channel(false);
        let mut v = Viewer {
            hub: hub.clone(),
            rx,
            at: None,
            first: Some(update(1, false)),
            shutdown,
        };
        let first = event_text(v.next().await.unwrap()).await;
        assert!(first.starts_with("event: snapshot\n"), "{first}");
        tx.send(update(2, true)).unwrap();
        let second = event_text(v.next().await.unwrap()).await;
        assert!(second.starts_with("event: delta\n"), "{second}");
        assert!(second.contains("data: {\"seq\":2}"), "{second}");
        // 40 updates while the viewer does not read: more than the channel keeps.
        for seq in 3..43 {
            let u = update(seq, true);
            hub.lock().latest = Some(u.clone());
            tx.send(u).unwrap();
        }
        let skipped = event_text(v.next().await.unwrap()).await;
        assert!(skipped.starts_with("event: snapshot\n"), "{skipped}");
        assert!(skipped.contains("id: 42\n"), "{skipped}");
        assert_eq!(v.at, Some(42));
        // The backlog is gone: the next update is a delta again.
        tx.send(update(43, true)).unwrap();
        let next = event_text(v.next().await.unwrap()).await;
        assert!(
            next.starts_with("event: delta\n") && next.contains("id: 43\n"),
            "{next}"
        );
    }

    /// The sampler starts with the first viewer, is shared by the next, and stops once the
    /// last one is gone; a stream without a token is refused with a JSON 401.
    #[tokio::test]
    async fn one_sampler_while_anyone_watches() {
        use axum::body::Body;
        use axum::http::Request;
        use futures_util::StreamExt;
        use tower_service::Service;

        let (handle, _seen, _stopped) = crate::http::fake_core::spawn();
        let (_stop, stop_rx) = watch::channel(false);
        let (sessions_tx, _sessions) = tokio::sync::mpsc::channel(1);
        let state = AppState::new(
            handle,
            super::super::HttpSettings::new(1024),
            stop_rx,
            sessions_tx,
        );
        let hub = state.dashboard.clone();
        let mut app = super::super::router(state);
        let token = crate::auth::mint(
            &crate::auth::ApiKey::dev(),
            &crate::auth::Claims::new("ops", "any", Duration::from_secs(60)).with_grants(
                crate::auth::RoomGrants::participant("any")
                    .with_names(["list"])
                    .unwrap(),
            ),
        )
        .unwrap();
        let mut open = async |uri: String| {
            let req = Request::builder().uri(uri).body(Body::empty()).unwrap();
            app.call(req).await.unwrap()
        };
        let refused = open("/dashboard/events".into()).await;
        assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
        let body = axum::body::to_bytes(refused.into_body(), 1 << 16)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["code"], "token_missing");
        assert_eq!(
            hub.sampler_status(),
            (false, 0),
            "a refused viewer starts nothing"
        );

        let uri = format!("/dashboard/events?access_token={token}");
        let first = open(uri.clone()).await;
        assert_eq!(first.status(), StatusCode::OK);
        let mut first = first.into_body().into_data_stream();
        let chunk = tokio::time::timeout(Duration::from_secs(5), first.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(chunk.starts_with(b"event: snapshot\n"), "{chunk:?}");
        let second = open(uri).await.into_body().into_data_stream();
        assert_eq!(
            hub.sampler_status(),
            (true, 1),
            "one sampler for both viewers"
        );
        drop(first);
        drop(second);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while hub.sampler_status().0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the sampler did not stop"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(hub.sampler_status(), (false, 1));
    }

    fn key() -> impl Strategy<Value = (String, String)> {
        (
            prop::sample::select(vec!["a", "b", "c"]),
            prop::sample::select(vec!["1", "2", "3", "4"]),
        )
            .prop_map(|(r, i)| (r.to_owned(), i.to_owned()))
    }

    prop_compose! {
        fn arb_view()(
            cpu in prop::option::of(0u32..400),
            pps in prop::option::of(0u64..10_000),
            rooms in prop::collection::vec((prop::sample::select(vec!["a", "b", "c"]), 0u64..3), 0..4),
            parts in prop::collection::vec((key(), prop::option::of(0u64..3), prop::bool::ANY, prop::option::of(0u32..3)), 0..8),
            tracks in prop::collection::vec((key(), prop::collection::vec(0u64..4, 0..3), prop::bool::ANY), 0..6),
            subs in prop::collection::vec((key(), prop::option::of(prop::sample::select(vec!["q", "h", "f"]))), 0..6),
        ) -> View {
            let mut v = View {
                server: ServerView { cpu_percent: cpu, forwarded_pps: pps, ..ServerView::default() },
                ..View::default()
            };
            for (room, created_at) in rooms {
                let r = RoomView { room: room.into(), created_at };
                v.rooms.insert(r.key(), r);
            }
            for ((room, id), bps, hidden, loss) in parts {
                let p = ParticipantView { room, id, available_bps: bps, hidden, downlink_loss_permille: loss, ..Default::default() };
                v.participants.insert(p.key(), p);
            }
            for ((room, id), rates, muted) in tracks {
                let t = TrackView {
                    room, id, muted,
                    layers: rates.into_iter().map(|b| LayerView { bitrate_bps: b, ..Default::default() }).collect(),
                    ..Default::default()
                };
                v.tracks.insert(t.key(), t);
            }
            for ((room, id), layer) in subs {
                let s = SubscriptionView { room, id, layer: layer.map(str::to_owned), ..Default::default() };
                v.subscriptions.insert(s.key(), s);
            }
            v
        }
    }

    proptest! {
        /// Applying the diff of two views to the first gives the second, also after a round
        /// trip through JSON (what the page receives); a view's diff with itself is empty.
        #[test]
        fn apply_of_diff_is_the_next_view(prev in arb_view(), next in arb_view()) {
            let d = diff(&prev, &next);
            let mut got = prev.clone();
            apply(&mut got, &d);
            prop_assert_eq!(&got, &next);
            let wire: Delta = serde_json::from_str(&serde_json::to_string(&d).unwrap()).unwrap();
            let mut got = prev.clone();
            apply(&mut got, &wire);
            prop_assert_eq!(&got, &next);
            prop_assert!(diff(&next, &next).is_empty());
            let mut from_nothing = View::default();
            apply(&mut from_nothing, &snapshot(&next));
            prop_assert_eq!(from_nothing, next);
        }
    }
}
