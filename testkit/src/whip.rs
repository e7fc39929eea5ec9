//! A WHIP publisher (RFC 9725) made with webrtc-rs, as an ingest client that knows nothing of
//! Plaza's WebSocket protocol would be: it `POST`s its offer (`application/sdp`, a bearer
//! token), applies the answer (and adds its candidates with `add_ice_candidate` as well; a
//! viewer behind a relay points both at the relay), trickles its own candidates with `PATCH`
//! (`application/trickle-ice-sdpfrag`, `If-Match` with the session's ETag), sends the
//! pre-encoded clips once connected (plain, or VP8 simulcast with three RIDs) and ends with
//! `DELETE`. Also: [`http`], a raw HTTP/1.1 exchange that keeps the response's headers.
//!
//! The HTTP side of a session is WHIP's and WHEP's alike ([`HttpSession`]: the `POST` of the
//! offer, the answer applied, trickle, ICE restart, `DELETE`); the WHEP viewer
//! ([`super::whep`]) uses it too.

use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use plaza::signal::TrackKind;
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::media_stream::track_remote::TrackRemote;
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionEventHandler, RTCIceCandidateInit, RTCIceConnectionState,
    RTCPeerConnectionIceEvent, RTCPeerConnectionState, RTCSessionDescription,
};

use super::keyframe::{KeyframeRequestTap, keyframe_request_ssrcs};
use super::media::{self, Clip, MediaPacketizer, PacerControl, run_pacer};
use super::peer::{
    HandlerFuture, TrackSink, add_track_with_encodings, bounded, done, extension_id, local_codec,
    lock, mid_of, negotiated_payload_type, new_peer_connection,
};
use super::relay::{self, CandidateRewrite, Relay};

pub use super::support::{HttpReply, http};

/// What a [`WhipPublisher`] sends.
#[derive(Debug, Clone)]
pub struct WhipOptions {
    pub audio: bool,
    pub video: bool,
    /// Video as three simulcast encodings (`q`, `h`, `f`: the clips of
    /// [`media::simulcast_files`]) instead of one.
    pub simulcast: bool,
    /// Trickle the local candidates with `PATCH` (else the server learns the address from
    /// the connectivity checks alone: it is ICE-lite).
    pub trickle: bool,
    pub timeout: Duration,
    pub bind_ip: String,
}

impl Default for WhipOptions {
    fn default() -> Self {
        WhipOptions {
            audio: true,
            video: true,
            simulcast: false,
            trickle: true,
            timeout: Duration::from_secs(10),
            bind_ip: "127.0.0.1".to_owned(),
        }
    }
}

/// The peer connection's event handler of an HTTP (WHIP or WHEP) session: connection and
/// ICE states, local candidates to trickle, and (a viewer) the remote tracks.
pub(crate) struct Handler {
    state: watch::Sender<Option<RTCPeerConnectionState>>,
    /// Times ICE reached `connected` (or `completed`): one more after each restart.
    ice_connected: watch::Sender<u64>,
    candidates: mpsc::UnboundedSender<String>,
    tracks: Option<mpsc::UnboundedSender<Arc<dyn TrackRemote>>>,
}

/// What a session learns from its [`Handler`].
pub(crate) struct SessionEvents {
    state: watch::Receiver<Option<RTCPeerConnectionState>>,
    ice_connected: watch::Receiver<u64>,
    candidates: mpsc::UnboundedReceiver<String>,
}

impl Handler {
    /// A handler and its receiving ends; `tracks`: where remote tracks go (a viewer).
    pub(crate) fn new(
        tracks: Option<mpsc::UnboundedSender<Arc<dyn TrackRemote>>>,
    ) -> (Arc<Handler>, SessionEvents) {
        let (state_tx, state) = watch::channel(None);
        let (ice_tx, ice_connected) = watch::channel(0);
        let (cand_tx, candidates) = mpsc::unbounded_channel();
        let handler = Arc::new(Handler {
            state: state_tx,
            ice_connected: ice_tx,
            candidates: cand_tx,
            tracks,
        });
        (
            handler,
            SessionEvents {
                state,
                ice_connected,
                candidates,
            },
        )
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
            let _ = self.candidates.send(init.candidate);
        }
        done()
    }

    fn on_ice_connection_state_change<'life0, 'async_trait>(
        &'life0 self,
        state: RTCIceConnectionState,
    ) -> HandlerFuture<'async_trait>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        if matches!(
            state,
            RTCIceConnectionState::Connected | RTCIceConnectionState::Completed
        ) {
            self.ice_connected.send_modify(|n| *n += 1);
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
        self.state.send_replace(Some(state));
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
        if let Some(tx) = &self.tracks {
            let _ = tx.send(track);
        }
        done()
    }
}

/// An encoding's RID (empty for a plain track) and the clip it sends.
type RidClip = (String, Arc<Clip>);

/// One local track: its encodings (RID, SSRC, clip) and what the pacers counted.
struct Local {
    kind: TrackKind,
    layers: Vec<(String, u32, Arc<Clip>, Arc<PacerControl>)>,
    track: Arc<webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP>,
    sender: Arc<dyn webrtc::rtp_transceiver::RtpSender>,
}

/// What the trickle task names in its `PATCH`es.
struct TrickleAs {
    etag: String,
    ufrag: String,
    pwd: String,
    mid: String,
}

/// The HTTP side of a WHIP or WHEP session (RFC 9725 and the WHEP draft share it): the `201`
/// with its `Location` and `ETag`, trickle `PATCH`es, ICE restart, `DELETE`. Tasks spawned for
/// the session (trickle, media) are stopped with it.
pub struct HttpSession {
    addr: SocketAddr,
    pc: Arc<dyn PeerConnection>,
    /// The session's URL path (`Location` of the 201).
    pub location: String,
    /// The session's `ETag`.
    pub etag: String,
    /// The 201 response.
    pub created: HttpReply,
    /// When the `POST` was sent.
    pub posted_at: Instant,
    token: Option<String>,
    timeout: Duration,
    /// The answer as last applied (an ICE restart applies it again with new credentials).
    answer: String,
    /// What the trickle task sends with: the ETag, and the ICE credentials of the offer.
    trickle: Arc<Mutex<TrickleAs>>,
    state: watch::Receiver<Option<RTCPeerConnectionState>>,
    ice_connected: watch::Receiver<u64>,
    /// The server's candidates go through this relay (a viewer behind a bottleneck).
    relay: Option<Arc<Relay>>,
    /// Statuses of the trickle `PATCH`es.
    patches: Arc<Mutex<Vec<u16>>>,
    pub(crate) tasks: Vec<AbortHandle>,
}

/// `http://ip:port/path?query` → (`ip:port`, `/path?query`).
fn split_http_url(url: &str) -> Result<(SocketAddr, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow!("not an http:// URL: {url}"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_owned()),
        None => (rest, "/".to_owned()),
    };
    let addr = host
        .parse()
        .with_context(|| format!("{url}: the host is not ip:port"))?;
    Ok((addr, path))
}

impl HttpSession {
    /// Creates the offer on `pc` (already holding its transceivers), `POST`s it to `path` with
    /// `token`, applies the answer and adds its candidates (pointed at `relay` if given), and
    /// trickles the local candidates if `trickle`. Does not wait for the connection. `Err`
    /// for any status but 201 (its status and body in the message).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn create(
        addr: SocketAddr,
        path: &str,
        token: Option<&str>,
        pc: Arc<dyn PeerConnection>,
        events: SessionEvents,
        trickle: bool,
        relay: Option<Arc<Relay>>,
        t: Duration,
    ) -> Result<HttpSession> {
        let SessionEvents {
            state,
            ice_connected,
            candidates: mut cand_rx,
        } = events;
        let offer = bounded(t, "create_offer", pc.create_offer(None)).await?;
        bounded(
            t,
            "set_local_description",
            pc.set_local_description(offer.clone()),
        )
        .await?;
        let auth = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("Content-Type", "application/sdp")];
        if let Some(a) = &auth {
            headers.push(("Authorization", a));
        }
        let posted_at = Instant::now();
        // A cluster node that does not host the room answers 307 to the node that does: the
        // `POST` is repeated there (at most three times), and the session lives there.
        let (mut addr, mut path) = (addr, path.to_owned());
        let mut created = http(addr, "POST", &path, &headers, offer.sdp.as_bytes()).await?;
        for _ in 0..3 {
            if created.status != 307 {
                break;
            }
            let location = created
                .header("location")
                .ok_or_else(|| anyhow!("307 without Location"))?;
            (addr, path) = split_http_url(location)?;
            created = http(addr, "POST", &path, &headers, offer.sdp.as_bytes()).await?;
        }
        let path = path.as_str();
        if created.status != 201 {
            bail!("POST {path}: {} {}", created.status, created.body.trim());
        }
        let location = created
            .header("location")
            .ok_or_else(|| anyhow!("201 without Location"))?
            .to_owned();
        let etag = created
            .header("etag")
            .ok_or_else(|| anyhow!("201 without ETag"))?
            .to_owned();
        // Behind a relay, the answer's own candidates point at it too.
        let answer_sdp = match &relay {
            Some(r) => relay::rewrite_candidates(&created.body, r.client_facing_addr()).0,
            None => created.body.clone(),
        };
        let answer = RTCSessionDescription::answer(answer_sdp)
            .map_err(|e| anyhow!("bad answer SDP: {e}"))?;
        bounded(
            t,
            "set_remote_description",
            pc.set_remote_description(answer),
        )
        .await?;
        if add_candidates(&pc, &created.body, relay.as_deref(), t).await? == 0 {
            bail!("the answer has no candidates (the server should not need to trickle)");
        }
        let patches = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        let trickle_as = Arc::new(Mutex::new(TrickleAs {
            etag: etag.clone(),
            ufrag: sdp_attr(&offer.sdp, "a=ice-ufrag:").unwrap_or_default(),
            pwd: sdp_attr(&offer.sdp, "a=ice-pwd:").unwrap_or_default(),
            mid: sdp_attr(&offer.sdp, "a=mid:").unwrap_or_else(|| "0".to_owned()),
        }));
        if trickle {
            let (location, trickle, patches, auth) = (
                location.clone(),
                trickle_as.clone(),
                patches.clone(),
                auth.clone(),
            );
            let task = tokio::spawn(async move {
                while let Some(candidate) = cand_rx.recv().await {
                    let (frag, etag) = {
                        let a = lock(&trickle);
                        let frag = format!(
                            "a=ice-ufrag:{}\r\na=ice-pwd:{}\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\n\
                             a=mid:{}\r\na={candidate}\r\n",
                            a.ufrag, a.pwd, a.mid
                        );
                        (frag, a.etag.clone())
                    };
                    let mut headers = vec![
                        ("Content-Type", "application/trickle-ice-sdpfrag"),
                        ("If-Match", etag.as_str()),
                    ];
                    if let Some(a) = &auth {
                        headers.push(("Authorization", a));
                    }
                    let status = http(addr, "PATCH", &location, &headers, frag.as_bytes())
                        .await
                        .map_or(0, |r| r.status);
                    lock(&patches).push(status);
                }
            });
            tasks.push(task.abort_handle());
        }
        let answer = created.body.clone();
        Ok(HttpSession {
            addr,
            pc,
            location,
            etag,
            created,
            posted_at,
            token: token.map(str::to_owned),
            timeout: t,
            answer,
            trickle: trickle_as,
            state,
            ice_connected,
            relay,
            patches,
            tasks,
        })
    }

    /// The peer connection.
    pub fn pc(&self) -> &Arc<dyn PeerConnection> {
        &self.pc
    }

    /// Waits for the peer connection to be connected.
    pub async fn wait_connected(&mut self, t: Duration) -> Result<()> {
        let state = &mut self.state;
        let reached = bounded(t, "HTTP session connected", async {
            state
                .wait_for(|s| {
                    matches!(
                        s,
                        Some(
                            RTCPeerConnectionState::Connected
                                | RTCPeerConnectionState::Failed
                                | RTCPeerConnectionState::Closed
                        )
                    )
                })
                .await
                .map(|s| *s)
                .map_err(|e| anyhow!("{e}"))
        })
        .await
        .map_err(|e| {
            anyhow!(
                "{e:#} (the connection's last state: {:?})",
                *self.state.borrow()
            )
        })?;
        match reached {
            Some(RTCPeerConnectionState::Connected) => Ok(()),
            other => bail!("the HTTP session's connection went {other:?} before it connected"),
        }
    }

    /// The connection's state (as the handler last saw it).
    pub fn connection_state(&self) -> Option<RTCPeerConnectionState> {
        *self.state.borrow()
    }

    /// Restarts ICE as RFC 9725 has it: new credentials (webrtc-rs gathers again on new
    /// sockets) in a `PATCH` with `If-Match: *`; the server's `200` fragment is applied as the
    /// answer with its new credentials. Returns that response once ICE has connected again.
    pub async fn restart_ice(&mut self) -> Result<HttpReply> {
        let t = self.timeout;
        let before = *self.ice_connected.borrow();
        bounded(t, "restart_ice", self.pc.restart_ice()).await?;
        let offer = bounded(t, "create_offer(restart)", self.pc.create_offer(None)).await?;
        bounded(
            t,
            "set_local_description(restart)",
            self.pc.set_local_description(offer.clone()),
        )
        .await?;
        let ufrag = sdp_attr(&offer.sdp, "a=ice-ufrag:").unwrap_or_default();
        let pwd = sdp_attr(&offer.sdp, "a=ice-pwd:").unwrap_or_default();
        let mid = lock(&self.trickle).mid.clone();
        let frag = format!(
            "a=ice-ufrag:{ufrag}\r\na=ice-pwd:{pwd}\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:{mid}\r\n"
        );
        let r = self
            .request(
                "PATCH",
                &[
                    ("Content-Type", "application/trickle-ice-sdpfrag"),
                    ("If-Match", "*"),
                ],
                frag.as_bytes(),
            )
            .await?;
        if r.status != 200 {
            bail!("ICE restart PATCH: {} {}", r.status, r.body.trim());
        }
        let new_ufrag = sdp_attr(&r.body, "a=ice-ufrag:")
            .ok_or_else(|| anyhow!("restart answer without a=ice-ufrag: {}", r.body))?;
        let new_pwd = sdp_attr(&r.body, "a=ice-pwd:")
            .ok_or_else(|| anyhow!("restart answer without a=ice-pwd: {}", r.body))?;
        let mut answer = String::new();
        for line in self.answer.lines().map(str::trim_end) {
            let line = if line.starts_with("a=ice-ufrag:") {
                format!("a=ice-ufrag:{new_ufrag}")
            } else if line.starts_with("a=ice-pwd:") {
                format!("a=ice-pwd:{new_pwd}")
            } else if line.starts_with("a=candidate:") {
                continue;
            } else {
                line.to_owned()
            };
            answer.push_str(&line);
            answer.push_str("\r\n");
        }
        let desc = RTCSessionDescription::answer(answer.clone())
            .map_err(|e| anyhow!("restart answer SDP: {e}"))?;
        bounded(
            t,
            "set_remote_description(restart)",
            self.pc.set_remote_description(desc),
        )
        .await?;
        add_candidates(&self.pc, &r.body, self.relay.as_deref(), t).await?;
        let etag = r
            .header("etag")
            .ok_or_else(|| anyhow!("restart answer without ETag"))?
            .to_owned();
        {
            let mut a = lock(&self.trickle);
            a.etag = etag.clone();
            a.ufrag = ufrag;
            a.pwd = pwd;
        }
        self.etag = etag;
        self.answer = answer;
        let ice = &mut self.ice_connected;
        bounded(t, "ICE connected after the restart", async {
            ice.wait_for(|n| *n > before)
                .await
                .map(|_| ())
                .map_err(|e| anyhow!("{e}"))
        })
        .await?;
        Ok(r)
    }

    /// Statuses of the trickle `PATCH`es sent so far.
    pub fn patch_statuses(&self) -> Vec<u16> {
        lock(&self.patches).clone()
    }

    /// A request to the session's URL with the token (if any) and these headers.
    pub async fn request(
        &self,
        method: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<HttpReply> {
        self.request_to(&self.location, method, headers, body).await
    }

    /// A request to `path` (e.g. a URL a `Link` header named) with the session's token.
    pub async fn request_to(
        &self,
        path: &str,
        method: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<HttpReply> {
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut all: Vec<(&str, &str)> = headers.to_vec();
        if let Some(a) = &auth {
            all.push(("Authorization", a));
        }
        http(self.addr, method, path, &all, body).await
    }

    /// `DELETE` the session; its status. Its tasks (media, trickle) stop.
    pub async fn delete(&mut self) -> Result<u16> {
        self.stop();
        Ok(self.request("DELETE", &[], b"").await?.status)
    }

    pub(crate) fn stop(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }

    /// Closes the peer connection (without telling the server).
    pub async fn close(&mut self) {
        self.stop();
        let _ = self.pc.close().await;
    }
}

impl Drop for HttpSession {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A connected WHIP session; its [`HttpSession`] (`location`, `etag`, `restart_ice`,
/// `request`, `delete`, …) through `Deref`.
pub struct WhipPublisher {
    session: HttpSession,
    local: Vec<Local>,
    sent: Arc<AtomicU64>,
}

impl Deref for WhipPublisher {
    type Target = HttpSession;
    fn deref(&self) -> &HttpSession {
        &self.session
    }
}

impl DerefMut for WhipPublisher {
    fn deref_mut(&mut self) -> &mut HttpSession {
        &mut self.session
    }
}

impl WhipPublisher {
    /// `POST`s an offer to `path` (`/whip/{room}[/{name}]`) with `token`, applies the answer
    /// and waits (within `opts.timeout`) for the connection; media starts then. `Err` for any
    /// status but 201 (its status and body in the message).
    pub async fn publish(
        addr: SocketAddr,
        path: &str,
        token: Option<&str>,
        opts: WhipOptions,
    ) -> Result<WhipPublisher> {
        let t = opts.timeout;
        let (handler, events) = Handler::new(None);
        let pc = new_peer_connection(
            Some(KeyframeRequestTap::default()),
            handler,
            &opts.bind_ip,
            t,
        )
        .await?;
        let mut local = Vec::new();
        let mut wanted: Vec<(TrackKind, Vec<RidClip>)> = Vec::new();
        if opts.audio {
            let clip = Clip::load(&media::default_audio_file())?;
            wanted.push((TrackKind::Audio, vec![(String::new(), clip)]));
        }
        if opts.video {
            let clips = if opts.simulcast {
                media::simulcast_files()
                    .into_iter()
                    .map(|(rid, path)| Ok((rid, Clip::load(&path)?)))
                    .collect::<Result<Vec<_>>>()?
            } else {
                vec![(String::new(), Clip::load(&media::default_video_file())?)]
            };
            wanted.push((TrackKind::Video, clips));
        }
        for (kind, clips) in wanted {
            let layers: Vec<_> = clips
                .into_iter()
                .map(|(rid, clip)| {
                    let ssrc = rand::random::<u32>() | 1;
                    (rid, ssrc, clip, Arc::new(PacerControl::default()))
                })
                .collect();
            let encodings: Vec<(String, u32)> =
                layers.iter().map(|(r, s, _, _)| (r.clone(), *s)).collect();
            let (track, sender) =
                add_track_with_encodings(&pc, "whip", kind, &encodings, t).await?;
            local.push(Local {
                kind,
                layers,
                track,
                sender,
            });
        }
        let session =
            HttpSession::create(addr, path, token, pc, events, opts.trickle, None, t).await?;
        let mut publisher = WhipPublisher {
            session,
            local,
            sent: Arc::new(AtomicU64::new(0)),
        };
        publisher.session.wait_connected(t).await?;
        publisher.start_media().await?;
        Ok(publisher)
    }

    async fn start_media(&mut self) -> Result<()> {
        for lt in &self.local {
            let (_, _, mime, _) = local_codec(lt.kind);
            let pt = negotiated_payload_type(&lt.sender, mime).await?;
            let simulcast = lt.layers.iter().any(|(rid, ..)| !rid.is_empty());
            let ids = if simulcast {
                let mid_id = extension_id(&lt.sender, rtc::sdp::extmap::SDES_MID_URI).await?;
                let rid_id =
                    extension_id(&lt.sender, rtc::sdp::extmap::SDES_RTP_STREAM_ID_URI).await?;
                let mid = mid_of(&self.session.pc, &lt.sender).await?;
                Some((mid_id, rid_id, mid))
            } else {
                None
            };
            for (rid, ssrc, clip, control) in &lt.layers {
                let packetizer = MediaPacketizer::new(clip.clone(), *ssrc, pt)
                    .with_context(|| format!("{:?} {rid}", lt.kind))?;
                let extensions = match &ids {
                    Some((mid_id, rid_id, mid)) => vec![
                        (*mid_id, Bytes::from(mid.clone())),
                        (*rid_id, Bytes::from(rid.clone())),
                    ],
                    None => Vec::new(),
                };
                let sink = TrackSink {
                    track: lt.track.clone(),
                    extensions,
                    skip: None,
                    written: AtomicU64::new(0),
                };
                let sent = self.sent.clone();
                let task = tokio::spawn(run_pacer(
                    packetizer,
                    clip.frame_interval,
                    media::Pacing::Burst,
                    sink,
                    control.clone(),
                    move || {
                        sent.fetch_add(1, Ordering::Relaxed);
                    },
                ));
                self.session.tasks.push(task.abort_handle());
            }
            let track = lt.track.clone();
            let controls: Vec<(u32, Arc<PacerControl>)> = lt
                .layers
                .iter()
                .map(|(_, ssrc, _, c)| (*ssrc, c.clone()))
                .collect();
            let task = tokio::spawn(async move {
                while let Some(event) = track.poll().await {
                    let TrackLocalEvent::OnRtcpPacket(packets) = event else {
                        continue;
                    };
                    for ssrc in packets
                        .iter()
                        .flat_map(|p| keyframe_request_ssrcs(p.as_ref()))
                    {
                        let known = controls.iter().any(|(s, _)| *s == ssrc);
                        for (_, c) in controls.iter().filter(|(s, _)| !known || *s == ssrc) {
                            c.request_keyframe();
                        }
                    }
                }
            });
            self.session.tasks.push(task.abort_handle());
        }
        Ok(())
    }

    /// Pacer ticks so far (frames sent, over every encoding).
    pub fn frames_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Closes the peer connection (without telling the server).
    pub async fn close(mut self) {
        self.session.close().await;
    }
}

/// Adds the candidates of `sdp` (or of a fragment) to `pc`, pointed at `relay` if given (the
/// first UDP one becomes the relay's target; those it cannot carry are left out); how many.
pub(crate) async fn add_candidates(
    pc: &Arc<dyn PeerConnection>,
    sdp: &str,
    relay: Option<&Relay>,
    t: Duration,
) -> Result<usize> {
    let mut seen = Vec::new();
    for c in sdp.lines().filter_map(|l| l.trim().strip_prefix("a=")) {
        if c.starts_with("candidate:") && !seen.iter().any(|s: &String| s == c) {
            seen.push(c.to_owned());
            let candidate = match relay {
                None => c.to_owned(),
                Some(r) => match relay::rewrite_candidate(c, r.client_facing_addr()) {
                    CandidateRewrite::Rewritten(text, server) => {
                        if r.upstream().is_none() {
                            r.set_upstream(server);
                        }
                        if r.upstream() != Some(server) {
                            continue;
                        }
                        text
                    }
                    _ => continue,
                },
            };
            let init = RTCIceCandidateInit {
                candidate,
                sdp_mid: Some("0".to_owned()),
                sdp_mline_index: Some(0),
                ..Default::default()
            };
            bounded(t, "add_ice_candidate", pc.add_ice_candidate(init)).await?;
        }
    }
    Ok(seen.len())
}

/// The value of the first line of `sdp` starting with `prefix`.
pub(crate) fn sdp_attr(sdp: &str, prefix: &str) -> Option<String> {
    sdp.lines()
        .find_map(|l| l.trim().strip_prefix(prefix))
        .map(|v| v.trim().to_owned())
}
