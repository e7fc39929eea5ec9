//! The same synthetic peers as [`super::peer`], driving Janus's videoroom plugin instead of
//! Plaza, so one load generator can measure both servers on the same machine at the same time.
//!
//! Transport: Janus's WebSocket API (subprotocol `janus-protocol`), one WebSocket and one Janus
//! session per participant, as a browser would have. Per participant:
//!
//! - **publisher**: `attach` `janus.plugin.videoroom` → `join` (`ptype: publisher`) → `publish`
//!   with our JSEP offer (Opus + VP8 from the same clips, same pacer) → Janus's answer;
//! - **subscriber**: another handle → `join` (`ptype: subscriber`, `streams: [{feed}, …]`, one
//!   multistream subscription for every wanted feed) → Janus's JSEP offer → our answer with
//!   `start`.
//!
//! Our ICE candidates are trickled (`janus: trickle`) once the SDP they belong to was sent;
//! Janus puts its own candidates in its SDP. Sessions are kept alive with `keepalive` every 25 s.
//! Janus answers keyframe requests for new subscribers with PLIs to the publishers, which the
//! synthetic publishers answer by jumping to the clip's next keyframe, as with Plaza.
//!
//! Janus has no forwarded-packet counter: what it forwarded is measured as what the subscribers
//! received (see `measure`). Its latency is measured with the same probe ([`super::probe`]):
//! remote tracks are keyed `"<participant>/<mid>"` and mapped to the publisher SSRCs through the
//! `streams` list Janus returns (`feed_id`, `type`).
//!
//! [`JanusServer`] writes a minimal configuration (videoroom + WebSockets only, no other plugin,
//! transport, logger or event handler) and runs `janus` with it. libnice ignores loopback
//! interfaces, so Janus must run where a non-loopback interface carries an address reachable
//! from the peers — see `bench/README.md` for the network-namespace recipe.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use plaza::signal::TrackKind;
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionEventHandler, RTCPeerConnectionIceEvent, RTCPeerConnectionState,
    RTCSessionDescription,
};
use webrtc::rtp_transceiver::RtpSender;

use super::keyframe::{KeyframeRequestTap, is_keyframe_request};
use super::media::{self, Clip, MediaPacketizer, PacerControl, PacketSink, SendCounters};
use super::peer::{
    HandlerFuture, add_track_with_encodings, bounded, done, local_codec, lock,
    negotiated_payload_type, new_peer_connection,
};
use super::probe;
use super::recv::RemoteTrackStats;

const KEEPALIVE: Duration = Duration::from_secs(25);

// ───────────────────────────── the Janus API connection ─────────────────────────────

/// One WebSocket to Janus: requests matched to replies by `transaction`.
struct Conn {
    out: mpsc::Sender<String>,
    pending: Mutex<HashMap<String, oneshot::Sender<Value>>>,
    /// Messages without a waiting transaction (webrtcup, media, hangup, slowlink, …).
    notes: Mutex<Vec<Value>>,
    next: AtomicU64,
    timeout: Duration,
    tasks: Mutex<Vec<AbortHandle>>,
}

impl Conn {
    async fn open(url: &str, timeout: Duration) -> Result<Arc<Conn>> {
        let mut req = url
            .into_client_request()
            .with_context(|| format!("bad Janus URL {url}"))?;
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            "janus-protocol".parse().expect("static header"),
        );
        let (ws, _) = bounded(
            timeout,
            "Janus websocket",
            tokio_tungstenite::connect_async(req),
        )
        .await
        .with_context(|| format!("connecting to {url}"))?;
        let (mut sink, mut stream) = ws.split();
        let (out, mut rx) = mpsc::channel::<String>(1024);
        let conn = Arc::new(Conn {
            out,
            pending: Mutex::new(HashMap::new()),
            notes: Mutex::new(Vec::new()),
            next: AtomicU64::new(1),
            timeout,
            tasks: Mutex::new(Vec::new()),
        });
        let writer = tokio::spawn(async move {
            while let Some(text) = rx.recv().await {
                if sink.send(Message::text(text)).await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        let weak = Arc::downgrade(&conn);
        let reader = tokio::spawn(async move {
            while let Some(Ok(msg)) = stream.next().await {
                let Message::Text(text) = msg else { continue };
                let Ok(v) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                let Some(conn) = weak.upgrade() else { break };
                let kind = v.get("janus").and_then(Value::as_str).unwrap_or("");
                if kind == "ack" {
                    continue;
                }
                let waiter = v
                    .get("transaction")
                    .and_then(Value::as_str)
                    .and_then(|t| lock(&conn.pending).remove(t));
                match waiter {
                    Some(w) => {
                        let _ = w.send(v);
                    }
                    None => lock(&conn.notes).push(v),
                }
            }
        });
        lock(&conn.tasks).extend([writer.abort_handle(), reader.abort_handle()]);
        Ok(conn)
    }

    fn transaction(&self) -> String {
        format!("t{}", self.next.fetch_add(1, Ordering::Relaxed))
    }

    /// Sends `msg` and waits for the first non-`ack` reply with its transaction.
    async fn request(&self, mut msg: Value) -> Result<Value> {
        let t = self.transaction();
        msg["transaction"] = Value::String(t.clone());
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(t.clone(), tx);
        let what = msg
            .get("body")
            .and_then(|b| b.get("request"))
            .or_else(|| msg.get("janus"))
            .and_then(Value::as_str)
            .unwrap_or("request")
            .to_owned();
        self.out
            .send(msg.to_string())
            .await
            .map_err(|_| anyhow!("Janus websocket closed"))?;
        let reply = match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(v)) => v,
            Ok(Err(_)) => bail!("Janus websocket closed during {what}"),
            Err(_) => {
                lock(&self.pending).remove(&t);
                bail!("Janus {what} timed out after {:?}", self.timeout)
            }
        };
        if reply.get("janus").and_then(Value::as_str) == Some("error") {
            bail!("Janus {what}: {}", reply["error"]);
        }
        if let Some(err) = reply
            .pointer("/plugindata/data/error")
            .and_then(Value::as_str)
        {
            bail!("Janus videoroom {what}: {err}");
        }
        Ok(reply)
    }

    /// Fire and forget (keepalives, trickles): the `ack` is not waited for.
    fn send(&self, mut msg: Value) -> bool {
        msg["transaction"] = Value::String(self.transaction());
        self.out.try_send(msg.to_string()).is_ok()
    }

    async fn create_session(self: &Arc<Self>) -> Result<u64> {
        let r = self.request(json!({"janus": "create"})).await?;
        let id = r
            .pointer("/data/id")
            .and_then(Value::as_u64)
            .ok_or_else(|| anyhow!("Janus create: no session id in {r}"))?;
        let weak = Arc::downgrade(self);
        let keepalive = tokio::spawn(async move {
            let mut tick = tokio::time::interval(KEEPALIVE);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(conn) = weak.upgrade() else { break };
                conn.send(json!({"janus": "keepalive", "session_id": id}));
            }
        });
        lock(&self.tasks).push(keepalive.abort_handle());
        Ok(id)
    }

    async fn attach(&self, session: u64) -> Result<u64> {
        let r = self
            .request(json!({"janus": "attach", "session_id": session,
                            "plugin": "janus.plugin.videoroom"}))
            .await?;
        r.pointer("/data/id")
            .and_then(Value::as_u64)
            .ok_or_else(|| anyhow!("Janus attach: no handle id in {r}"))
    }

    async fn message(
        &self,
        session: u64,
        handle: u64,
        body: Value,
        jsep: Option<Value>,
    ) -> Result<Value> {
        let mut msg = json!({"janus": "message", "session_id": session, "handle_id": handle,
                             "body": body});
        if let Some(j) = jsep {
            msg["jsep"] = j;
        }
        self.request(msg).await
    }

    fn hangups(&self) -> usize {
        lock(&self.notes)
            .iter()
            .filter(|n| n.get("janus").and_then(Value::as_str) == Some("hangup"))
            .count()
    }

    fn close(&self) {
        for t in lock(&self.tasks).drain(..) {
            t.abort();
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.close();
    }
}

/// Creates videoroom `room` (Opus + VP8, up to `max_publishers`), on a short-lived session.
pub async fn create_room(url: &str, room: u64, max_publishers: usize, t: Duration) -> Result<()> {
    let conn = Conn::open(url, t).await?;
    let session = conn.create_session().await?;
    let handle = conn.attach(session).await?;
    conn.message(
        session,
        handle,
        json!({
            "request": "create", "room": room, "permanent": false,
            "description": format!("plaza-bench-{room}"),
            "publishers": max_publishers, "bitrate": 0, "fir_freq": 0,
            "audiocodec": "opus", "videocodec": "vp8",
            "notify_joining": false, "audiolevel_event": false,
        }),
        None,
    )
    .await
    .context("creating the videoroom")?;
    let _ = conn
        .request(json!({"janus": "destroy", "session_id": session}))
        .await;
    Ok(())
}

// ───────────────────────────── peer connections ─────────────────────────────

/// Candidates of one handle are held until its SDP went out.
#[derive(Default)]
struct Gate {
    open: bool,
    held: Vec<Value>,
}

struct Handler {
    conn: Arc<Conn>,
    session: u64,
    handle: u64,
    gate: Arc<Mutex<Gate>>,
    shared: Arc<Shared>,
    publisher: bool,
}

impl Handler {
    fn trickle(&self, candidate: Value) {
        let msg = json!({"janus": "trickle", "session_id": self.session,
                         "handle_id": self.handle, "candidate": candidate});
        let mut g = lock(&self.gate);
        if g.open {
            self.conn.send(msg);
        } else {
            g.held.push(msg);
        }
    }
}

fn open_gate(conn: &Conn, gate: &Mutex<Gate>) {
    let mut g = lock(gate);
    g.open = true;
    for msg in g.held.drain(..) {
        conn.send(msg);
    }
}

// `PeerConnectionEventHandler` is an `#[async_trait]`; this is its expansion (as in `peer`).
impl PeerConnectionEventHandler for Handler {
    fn on_ice_candidate<'life0, 'async_trait>(
        &'life0 self,
        event: RTCPeerConnectionIceEvent,
    ) -> HandlerFuture<'async_trait>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        if let Ok(init) = event.candidate.to_json()
            && !init.candidate.trim().is_empty()
        {
            self.trickle(json!({"candidate": init.candidate, "sdpMid": "0",
                                "sdpMLineIndex": 0}));
        }
        done()
    }

    fn on_connection_state_change<'life0, 'async_trait>(
        &'life0 self,
        state: RTCPeerConnectionState,
    ) -> HandlerFuture<'async_trait>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let mut s = lock(&self.shared.state);
        if self.publisher {
            s.publisher_state = Some(state);
        } else {
            s.subscriber_state = Some(state);
        }
        if state == RTCPeerConnectionState::Connected {
            let at = Instant::now();
            if self.publisher {
                s.publisher_connected_at.get_or_insert(at);
            } else {
                s.subscriber_connected_at.get_or_insert(at);
            }
        }
        done()
    }

    fn on_track<'life0, 'async_trait>(
        &'life0 self,
        track: Arc<dyn TrackRemote>,
    ) -> HandlerFuture<'async_trait>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let shared = self.shared.clone();
        let task = tokio::spawn(remote_track_task(shared, track));
        lock(&self.shared.tasks).push(task.abort_handle());
        done()
    }
}

async fn build_pc(
    publisher: bool,
    conn: &Arc<Conn>,
    session: u64,
    handle: u64,
    shared: &Arc<Shared>,
    bind_ip: &str,
    t: Duration,
) -> Result<(Arc<dyn PeerConnection>, Arc<Mutex<Gate>>)> {
    let gate = Arc::new(Mutex::new(Gate::default()));
    let handler = Arc::new(Handler {
        conn: conn.clone(),
        session,
        handle,
        gate: gate.clone(),
        shared: shared.clone(),
        publisher,
    });
    let keyframe_tap = publisher.then(KeyframeRequestTap::default);
    let pc = new_peer_connection(keyframe_tap, handler, bind_ip, t).await?;
    Ok((pc, gate))
}

/// Janus puts its candidates in its SDP; webrtc-rs 0.21 only uses candidates given to
/// `add_ice_candidate`, so they are fed in from the SDP (BUNDLE: the first m-section's).
async fn add_sdp_candidates(pc: &Arc<dyn PeerConnection>, sdp: &str, t: Duration) -> Result<()> {
    let mut seen = Vec::new();
    for line in sdp.lines().map(str::trim) {
        let Some(c) = line.strip_prefix("a=") else {
            continue;
        };
        if !c.starts_with("candidate:") || seen.iter().any(|s: &String| s == c) {
            continue;
        }
        seen.push(c.to_owned());
        let init = webrtc::peer_connection::RTCIceCandidateInit {
            candidate: c.to_owned(),
            sdp_mid: Some("0".to_owned()),
            sdp_mline_index: Some(0),
            ..Default::default()
        };
        bounded(t, "add_ice_candidate", pc.add_ice_candidate(init)).await?;
    }
    Ok(())
}

/// One m-section of an SDP: what identifies the track it carries.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SdpSection {
    pub kind: String,
    pub mid: Option<String>,
    pub msid_track: Option<String>,
    pub ssrcs: Vec<u32>,
}

/// The m-sections of `sdp` (mid, msid track id, SSRCs).
pub fn sdp_sections(sdp: &str) -> Vec<SdpSection> {
    let mut out: Vec<SdpSection> = Vec::new();
    for line in sdp.lines().map(str::trim) {
        if let Some(m) = line.strip_prefix("m=") {
            out.push(SdpSection {
                kind: m.split_whitespace().next().unwrap_or("").to_owned(),
                ..Default::default()
            });
            continue;
        }
        let Some(s) = out.last_mut() else { continue };
        if let Some(mid) = line.strip_prefix("a=mid:") {
            s.mid = Some(mid.to_owned());
        } else if let Some(msid) = line.strip_prefix("a=msid:") {
            s.msid_track = msid.split_whitespace().nth(1).map(str::to_owned);
        } else if let Some(rest) = line.strip_prefix("a=ssrc:") {
            let mut parts = rest.split_whitespace();
            if let Some(ssrc) = parts.next().and_then(|v| v.parse::<u32>().ok()) {
                if !s.ssrcs.contains(&ssrc) {
                    s.ssrcs.push(ssrc);
                }
                if s.msid_track.is_none()
                    && let Some(msid) = parts.next().and_then(|a| a.strip_prefix("msid:"))
                {
                    s.msid_track = parts.next().map(str::to_owned).or(Some(msid.to_owned()));
                }
            }
        }
    }
    out
}

// ───────────────────────────── the participant ─────────────────────────────

/// A stream of a subscription, as Janus described it (`attached` event).
#[derive(Debug, Clone, PartialEq)]
pub struct SubStream {
    pub mid: String,
    pub kind: TrackKind,
    pub feed_id: u64,
}

#[derive(Default)]
struct State {
    publisher_state: Option<RTCPeerConnectionState>,
    subscriber_state: Option<RTCPeerConnectionState>,
    publisher_connected_at: Option<Instant>,
    subscriber_connected_at: Option<Instant>,
    /// Subscriber offer's m-sections, to find the mid of a remote track.
    sections: Vec<SdpSection>,
    /// Received tracks, by mid.
    remote: BTreeMap<String, RemoteTrackStats>,
    warnings: Vec<String>,
}

struct Shared {
    name: String,
    state: Mutex<State>,
    tasks: Mutex<Vec<AbortHandle>>,
}

impl Shared {
    fn warn(&self, w: String) {
        lock(&self.state).warnings.push(w);
    }
}

async fn remote_track_task(shared: Arc<Shared>, track: Arc<dyn TrackRemote>) {
    let track_id = track.track_id().await;
    let ssrcs = track.ssrcs().await;
    let kind = match track.kind().await {
        RtpCodecKind::Audio => TrackKind::Audio,
        _ => TrackKind::Video,
    };
    let mid = {
        let s = lock(&shared.state);
        s.sections
            .iter()
            .find(|sec| sec.ssrcs.iter().any(|x| ssrcs.contains(x)))
            .or_else(|| {
                s.sections
                    .iter()
                    .find(|sec| sec.msid_track.as_deref() == Some(track_id.as_str()))
            })
            .and_then(|sec| sec.mid.clone())
    };
    let mid = mid.unwrap_or_else(|| format!("track:{track_id}"));
    let key = probe::track_key(&format!("{}/{mid}", shared.name));
    lock(&shared.state).remote.insert(
        mid.clone(),
        RemoteTrackStats::new(mid.clone(), track_id.clone(), kind, 0),
    );
    while let Some(event) = track.poll().await {
        match event {
            TrackRemoteEvent::OnOpen(init) => {
                let mime = track.codec(init.ssrc).await.map(|c| c.mime_type);
                if let Some(t) = lock(&shared.state).remote.get_mut(&mid) {
                    t.mime_type = mime;
                }
            }
            TrackRemoteEvent::OnRtpPacket(pkt) => {
                let now = Instant::now();
                probe::received(key, &pkt.payload, now);
                if let Some(t) = lock(&shared.state).remote.get_mut(&mid) {
                    t.on_packet(&pkt, now);
                }
            }
            TrackRemoteEvent::OnEnded => break,
            _ => {}
        }
    }
    if let Some(t) = lock(&shared.state).remote.get_mut(&mid) {
        t.ended = true;
    }
}

struct LocalTrack {
    kind: TrackKind,
    ssrc: u32,
    mime: &'static str,
    clip: Arc<Clip>,
    track: Arc<TrackLocalStaticRTP>,
    sender: Arc<dyn RtpSender>,
    control: Arc<PacerControl>,
}

struct Sink(Arc<TrackLocalStaticRTP>);

impl PacketSink for Sink {
    fn write(
        &self,
        packet: rtc::rtp::Packet,
    ) -> impl Future<Output = std::result::Result<(), String>> + Send {
        let track = self.0.clone();
        probe::sent(packet.header.ssrc, &packet.payload);
        async move { track.write_rtp(packet).await.map_err(|e| e.to_string()) }
    }
}

/// How a Janus participant joins.
#[derive(Debug, Clone)]
pub struct JanusOptions {
    /// `ws://host:8188/`.
    pub url: String,
    pub room: u64,
    pub publish_audio: bool,
    pub publish_video: bool,
    pub audio_file: PathBuf,
    pub video_file: PathBuf,
    pub timeout: Duration,
    /// Local address of the peers' sockets. Use the address Janus gathers on: in our namespace
    /// setup, ICE between a 127.0.0.1 socket and Janus's 127.0.10.1 never completes, while
    /// both ends on 127.0.10.1 work (see bench/README.md).
    pub bind_ip: String,
    /// How a published frame's packets leave (see [`media::Pacing`]).
    pub pacing: media::Pacing,
}

impl JanusOptions {
    pub fn new(url: &str, room: u64) -> Self {
        JanusOptions {
            url: url.to_owned(),
            room,
            publish_audio: false,
            publish_video: false,
            audio_file: media::default_audio_file(),
            video_file: media::default_video_file(),
            timeout: Duration::from_secs(10),
            bind_ip: "127.0.0.1".to_owned(),
            pacing: media::Pacing::Burst,
        }
    }
}

/// The subscriber connection and the streams Janus described for it.
type Subscription = (Arc<dyn PeerConnection>, Vec<SubStream>);

/// A synthetic participant of a Janus videoroom.
pub struct JanusPeer {
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    session: u64,
    opts: JanusOptions,
    opened_at: Instant,
    /// Our publisher feed id, when publishing.
    pub feed_id: Option<u64>,
    publisher: Option<Arc<dyn PeerConnection>>,
    local: Vec<LocalTrack>,
    subscriber: Mutex<Option<Subscription>>,
    subscribe_started: Mutex<Option<Instant>>,
}

impl JanusPeer {
    /// Opens the WebSocket and a session; when publishing, joins as a publisher and publishes
    /// (returns once the publisher connection is up and media started).
    pub async fn connect(name: &str, opts: JanusOptions) -> Result<JanusPeer> {
        let t = opts.timeout;
        let conn = Conn::open(&opts.url, t).await?;
        let opened_at = Instant::now();
        let session = conn.create_session().await?;
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            state: Mutex::new(State::default()),
            tasks: Mutex::new(Vec::new()),
        });
        let mut peer = JanusPeer {
            shared,
            conn,
            session,
            opened_at,
            feed_id: None,
            publisher: None,
            local: Vec::new(),
            subscriber: Mutex::new(None),
            subscribe_started: Mutex::new(None),
            opts,
        };
        if peer.opts.publish_audio || peer.opts.publish_video {
            peer.publish(name).await?;
        }
        Ok(peer)
    }

    async fn publish(&mut self, name: &str) -> Result<()> {
        let (t, conn, session) = (self.opts.timeout, self.conn.clone(), self.session);
        let handle = conn.attach(session).await?;
        let joined = conn
            .message(
                session,
                handle,
                json!({"request": "join", "ptype": "publisher", "room": self.opts.room,
                       "display": name}),
                None,
            )
            .await
            .context("videoroom join (publisher)")?;
        let feed = joined
            .pointer("/plugindata/data/id")
            .and_then(Value::as_u64)
            .ok_or_else(|| anyhow!("publisher join: no feed id in {joined}"))?;
        let (pc, gate) = build_pc(
            true,
            &conn,
            session,
            handle,
            &self.shared,
            &self.opts.bind_ip,
            t,
        )
        .await?;
        let mut wanted = Vec::new();
        if self.opts.publish_audio {
            wanted.push((TrackKind::Audio, self.opts.audio_file.clone()));
        }
        if self.opts.publish_video {
            wanted.push((TrackKind::Video, self.opts.video_file.clone()));
        }
        for (kind, file) in wanted {
            let clip = Clip::load(&file)?;
            self.local
                .push(add_local_track(&pc, name, kind, clip, t).await?);
        }
        let offer = bounded(t, "create_offer", pc.create_offer(None)).await?;
        let sdp = offer.sdp.clone();
        bounded(t, "set_local_description", pc.set_local_description(offer)).await?;
        let reply = conn
            .message(
                session,
                handle,
                json!({"request": "publish", "audiocodec": "opus", "videocodec": "vp8"}),
                Some(json!({"type": "offer", "sdp": sdp})),
            )
            .await
            .context("videoroom publish")?;
        open_gate(&conn, &gate);
        let answer = reply
            .pointer("/jsep/sdp")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("publish: no JSEP answer in {reply}"))?;
        let answer = RTCSessionDescription::answer(answer.to_owned())
            .map_err(|e| anyhow!("bad answer SDP: {e}"))?;
        let sdp_text = answer.sdp.clone();
        bounded(
            t,
            "set_remote_description",
            pc.set_remote_description(answer),
        )
        .await?;
        add_sdp_candidates(&pc, &sdp_text, t).await?;
        self.feed_id = Some(feed);
        self.publisher = Some(pc);
        self.wait_state(true, t).await?;
        self.start_media().await;
        Ok(())
    }

    async fn start_media(&self) {
        for lt in &self.local {
            let pt = match negotiated_payload_type(&lt.sender, lt.mime).await {
                Ok(pt) => pt,
                Err(e) => {
                    self.shared.warn(format!("{:?}: {e}", lt.kind));
                    continue;
                }
            };
            let packetizer = match MediaPacketizer::new(lt.clip.clone(), lt.ssrc, pt) {
                Ok(p) => p,
                Err(e) => {
                    self.shared.warn(format!("{:?}: {e}", lt.kind));
                    continue;
                }
            };
            let pacer = tokio::spawn(media::run_pacer(
                packetizer,
                lt.clip.frame_interval,
                self.opts.pacing,
                Sink(lt.track.clone()),
                lt.control.clone(),
                || {},
            ));
            let (track, control) = (lt.track.clone(), lt.control.clone());
            let rtcp = tokio::spawn(async move {
                while let Some(event) = track.poll().await {
                    if let TrackLocalEvent::OnRtcpPacket(packets) = event
                        && packets.iter().any(|p| is_keyframe_request(p.as_ref()))
                    {
                        control.request_keyframe();
                    }
                }
            });
            lock(&self.shared.tasks).extend([pacer.abort_handle(), rtcp.abort_handle()]);
        }
    }

    async fn wait_state(&self, publisher: bool, t: Duration) -> Result<()> {
        let deadline = Instant::now() + t;
        loop {
            {
                let s = lock(&self.shared.state);
                let st = if publisher {
                    s.publisher_state
                } else {
                    s.subscriber_state
                };
                match st {
                    Some(RTCPeerConnectionState::Connected) => return Ok(()),
                    Some(RTCPeerConnectionState::Failed) => {
                        bail!("{}: connection failed", self.shared.name)
                    }
                    _ => {}
                }
            }
            if self.conn.hangups() > 0 {
                bail!("{}: Janus hung up", self.shared.name);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{}: {} connection not up after {t:?}",
                    self.shared.name,
                    if publisher { "publisher" } else { "subscriber" }
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Subscribes to `feeds` (one multistream subscription) and waits until the subscriber
    /// connection is up.
    pub async fn subscribe(&self, feeds: &[u64]) -> Result<Vec<SubStream>> {
        if feeds.is_empty() {
            return Ok(Vec::new());
        }
        *lock(&self.subscribe_started) = Some(Instant::now());
        let (t, conn, session) = (self.opts.timeout, self.conn.clone(), self.session);
        let handle = conn.attach(session).await?;
        let streams: Vec<Value> = feeds.iter().map(|f| json!({"feed": f})).collect();
        let attached = conn
            .message(
                session,
                handle,
                json!({"request": "join", "ptype": "subscriber", "room": self.opts.room,
                       "streams": streams}),
                None,
            )
            .await
            .context("videoroom join (subscriber)")?;
        let offer = attached
            .pointer("/jsep/sdp")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("subscriber join: no JSEP offer in {attached}"))?
            .to_owned();
        let list: Vec<SubStream> = attached
            .pointer("/plugindata/data/streams")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| {
                        let kind = match s.get("type")?.as_str()? {
                            "audio" => TrackKind::Audio,
                            "video" => TrackKind::Video,
                            _ => return None,
                        };
                        Some(SubStream {
                            mid: s.get("mid")?.as_str()?.to_owned(),
                            kind,
                            feed_id: s.get("feed_id")?.as_u64()?,
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        lock(&self.shared.state).sections = sdp_sections(&offer);
        let (pc, gate) = build_pc(
            false,
            &conn,
            session,
            handle,
            &self.shared,
            &self.opts.bind_ip,
            t,
        )
        .await?;
        let offer =
            RTCSessionDescription::offer(offer).map_err(|e| anyhow!("bad offer SDP: {e}"))?;
        let sdp_text = offer.sdp.clone();
        bounded(
            t,
            "set_remote_description",
            pc.set_remote_description(offer),
        )
        .await?;
        add_sdp_candidates(&pc, &sdp_text, t).await?;
        let answer = bounded(t, "create_answer", pc.create_answer(None)).await?;
        let sdp = answer.sdp.clone();
        bounded(t, "set_local_description", pc.set_local_description(answer)).await?;
        conn.message(
            session,
            handle,
            json!({"request": "start"}),
            Some(json!({"type": "answer", "sdp": sdp})),
        )
        .await
        .context("videoroom start")?;
        open_gate(&conn, &gate);
        *lock(&self.subscriber) = Some((pc, list.clone()));
        self.wait_state(false, t).await?;
        Ok(list)
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// WebSocket open → publisher connection up (publishers).
    pub fn publish_ready(&self) -> Option<Duration> {
        lock(&self.shared.state)
            .publisher_connected_at
            .map(|t| t.saturating_duration_since(self.opened_at))
    }

    /// `subscribe` called → subscriber connection up.
    pub fn subscribe_ready(&self) -> Option<Duration> {
        let start = (*lock(&self.subscribe_started))?;
        lock(&self.shared.state)
            .subscriber_connected_at
            .map(|t| t.saturating_duration_since(start))
    }

    /// WebSocket open → subscriber connection up.
    pub fn subscriber_ready_since_open(&self) -> Option<Duration> {
        lock(&self.shared.state)
            .subscriber_connected_at
            .map(|t| t.saturating_duration_since(self.opened_at))
    }

    /// Our published tracks: kind, SSRC, send counters.
    pub fn local_tracks(&self) -> Vec<(TrackKind, u32, SendCounters)> {
        self.local
            .iter()
            .map(|l| (l.kind, l.ssrc, l.control.counters()))
            .collect()
    }

    /// The subscription's streams (empty before `subscribe`).
    pub fn streams(&self) -> Vec<SubStream> {
        lock(&self.subscriber)
            .as_ref()
            .map(|(_, s)| s.clone())
            .unwrap_or_default()
    }

    /// Received tracks' statistics (track_id = mid, stream_id = msid track id).
    pub fn remote_tracks(&self) -> Vec<RemoteTrackStats> {
        lock(&self.shared.state).remote.values().cloned().collect()
    }

    /// Tells the probe which publisher SSRCs each of our subscribed streams carries.
    /// `feeds`: feed id → that publisher's (kind, SSRC) tracks.
    pub fn map_probe(&self, feeds: &HashMap<u64, Vec<(TrackKind, u32)>>) {
        for s in self.streams() {
            let ssrcs: Vec<u32> = feeds
                .get(&s.feed_id)
                .map(|v| {
                    v.iter()
                        .filter(|(k, _)| *k == s.kind)
                        .map(|(_, ssrc)| *ssrc)
                        .collect()
                })
                .unwrap_or_default();
            probe::map_track(
                probe::track_key(&format!("{}/{}", self.shared.name, s.mid)),
                &ssrcs,
            );
        }
    }

    pub fn warnings(&self) -> Vec<String> {
        lock(&self.shared.state).warnings.clone()
    }

    /// Detaches politely (destroys the session) and closes the connections.
    pub async fn leave(&self) {
        for t in lock(&self.shared.tasks).drain(..) {
            t.abort();
        }
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.conn
                .request(json!({"janus": "destroy", "session_id": self.session})),
        )
        .await;
        let mut pcs: Vec<Arc<dyn PeerConnection>> = self.publisher.iter().cloned().collect();
        if let Some((pc, _)) = lock(&self.subscriber).take() {
            pcs.push(pc);
        }
        for pc in pcs {
            let _ = tokio::time::timeout(Duration::from_secs(2), pc.close()).await;
        }
        self.conn.close();
    }
}

impl Drop for JanusPeer {
    fn drop(&mut self) {
        for t in lock(&self.shared.tasks).drain(..) {
            t.abort();
        }
    }
}

async fn add_local_track(
    pc: &Arc<dyn PeerConnection>,
    name: &str,
    kind: TrackKind,
    clip: Arc<Clip>,
    t: Duration,
) -> Result<LocalTrack> {
    let (_, _, mime, _) = local_codec(kind);
    if clip.kind != kind {
        bail!("clip is not {kind:?}");
    }
    let ssrc = rand::random::<u32>() | 1;
    let (track, sender) =
        add_track_with_encodings(pc, name, kind, &[(String::new(), ssrc)], t).await?;
    Ok(LocalTrack {
        kind,
        ssrc,
        mime,
        clip,
        track,
        sender,
        control: Arc::new(PacerControl::default()),
    })
}

// ───────────────────────────── running Janus ─────────────────────────────

/// Where Debian installs Janus's modules.
pub const JANUS_LIB_DIR: &str = "/usr/lib/x86_64-linux-gnu/janus";

/// A `janus` process with a minimal configuration: videoroom + WebSockets only.
pub struct JanusServer {
    pub child: Child,
    pub ws_url: String,
    pub config_dir: PathBuf,
}

fn disable_all_but(dir: &Path, keep: &[&str]) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.ends_with(".so") && !keep.contains(&n.as_str()))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.join(",")
}

/// The configuration files (name, text) for a Janus listening for WebSockets on `ws_port`,
/// gathering ICE candidates only on `ice_interface` (an interface name or IP prefix).
pub fn janus_config(
    config_dir: &Path,
    lib_dir: &Path,
    ws_port: u16,
    ice_interface: &str,
    debug_level: u8,
) -> Vec<(&'static str, String)> {
    let lib = lib_dir.display();
    let main = format!(
        r#"general: {{
	configs_folder = "{cfg}"
	plugins_folder = "{lib}/plugins"
	transports_folder = "{lib}/transports"
	events_folder = "{lib}/events"
	loggers_folder = "{lib}/loggers"
	debug_level = {debug_level}
	debug_timestamps = true
	session_timeout = 120
	hide_dependencies = true
}}
certificates: {{
}}
media: {{
}}
nat: {{
	nice_debug = false
	ignore_mdns = true
	ice_enforce_list = "{ice_interface}"
}}
plugins: {{
	disable = "{plugins}"
}}
transports: {{
	disable = "{transports}"
}}
loggers: {{
	disable = "{loggers}"
}}
events: {{
	disable = "{events}"
}}
"#,
        cfg = config_dir.display(),
        plugins = disable_all_but(&lib_dir.join("plugins"), &["libjanus_videoroom.so"]),
        transports = disable_all_but(&lib_dir.join("transports"), &["libjanus_websockets.so"]),
        loggers = disable_all_but(&lib_dir.join("loggers"), &[]),
        events = disable_all_but(&lib_dir.join("events"), &[]),
    );
    let ws = format!(
        "general: {{\n\tjson = \"compact\"\n\tws = true\n\tws_port = {ws_port}\n\twss = false\n}}\n\
         admin: {{\n\tadmin_ws = false\n\tadmin_wss = false\n}}\n"
    );
    let videoroom = "general: {\n\tevents = false\n}\n".to_owned();
    vec![
        ("janus.jcfg", main),
        ("janus.transport.websockets.jcfg", ws),
        ("janus.plugin.videoroom.jcfg", videoroom),
    ]
}

impl JanusServer {
    /// Writes the configuration to `config_dir` and starts `janus_bin`; returns once the
    /// WebSocket port accepts connections. Janus's output goes to `log`.
    pub async fn start(
        janus_bin: &Path,
        config_dir: &Path,
        ws_port: u16,
        ice_interface: &str,
        log: &Path,
        cpus: Option<&[usize]>,
    ) -> Result<JanusServer> {
        std::fs::create_dir_all(config_dir)?;
        for (name, text) in janus_config(
            config_dir,
            Path::new(JANUS_LIB_DIR),
            ws_port,
            ice_interface,
            std::env::var("PLAZA_BENCH_JANUS_DEBUG")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(3),
        ) {
            std::fs::write(config_dir.join(name), text)?;
        }
        let log_file = std::fs::File::create(log)?;
        let mut cmd = Command::new(janus_bin);
        if let Some(cpus) = cpus {
            super::affinity::pin_command(&mut cmd, cpus);
        }
        let child = cmd
            .arg("-C")
            .arg(config_dir.join("janus.jcfg"))
            .arg("-F")
            .arg(config_dir)
            .arg("--disable-colors")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", janus_bin.display()))?;
        let server = JanusServer {
            child,
            ws_url: format!("ws://127.0.0.1:{ws_port}/"),
            config_dir: config_dir.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", ws_port))
                .await
                .is_ok()
            {
                return Ok(server);
            }
            if Instant::now() >= deadline {
                bail!(
                    "janus did not open port {ws_port} within 15 s (log: {})",
                    log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for JanusServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdp_sections_find_mids_msids_and_ssrcs() {
        let sdp = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n\
                   m=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=msid:janus janus0\r\n\
                   a=ssrc:111 cname:janus\r\na=ssrc:111 msid:janus janus0\r\n\
                   m=video 9 UDP/TLS/RTP/SAVPF 96 97\r\na=mid:1\r\n\
                   a=ssrc-group:FID 222 223\r\na=ssrc:222 msid:janus janus1\r\na=ssrc:223 cname:x\r\n";
        let s = sdp_sections(sdp);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].kind, "audio");
        assert_eq!(s[0].mid.as_deref(), Some("0"));
        assert_eq!(s[0].msid_track.as_deref(), Some("janus0"));
        assert_eq!(s[0].ssrcs, vec![111]);
        assert_eq!(s[1].mid.as_deref(), Some("1"));
        assert_eq!(s[1].msid_track.as_deref(), Some("janus1"));
        assert_eq!(s[1].ssrcs, vec![222, 223]);
    }

    #[test]
    fn config_keeps_only_videoroom_and_websockets() {
        let dir = std::env::temp_dir().join(format!("janus-cfg-test-{}", std::process::id()));
        for kind in ["plugins", "transports", "loggers", "events"] {
            std::fs::create_dir_all(dir.join("lib").join(kind)).unwrap();
        }
        for f in [
            "plugins/libjanus_videoroom.so",
            "plugins/libjanus_echotest.so",
            "transports/libjanus_websockets.so",
            "transports/libjanus_http.so",
        ] {
            std::fs::write(dir.join("lib").join(f), b"").unwrap();
        }
        let cfg = janus_config(&dir, &dir.join("lib"), 8188, "v0", 3);
        let main = &cfg[0].1;
        assert!(
            main.contains("disable = \"libjanus_echotest.so\""),
            "{main}"
        );
        assert!(main.contains("disable = \"libjanus_http.so\""), "{main}");
        assert!(main.contains("ice_enforce_list = \"v0\""));
        assert!(cfg[1].1.contains("ws_port = 8188"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
