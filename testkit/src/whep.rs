//! A WHEP viewer (draft-ietf-wish-whep) made with webrtc-rs, as a player that knows nothing of
//! Plaza's WebSocket protocol would be: it `POST`s a `recvonly` audio + video offer
//! (`application/sdp`, a bearer token) to `/whep/{room}[/{participant}]`, applies the answer,
//! and receives. The HTTP session (trickle `PATCH` with `If-Match`, ICE restart, `DELETE`) is
//! [`HttpSession`], shared with the WHIP publisher; [`WhepViewer`] reaches it through `Deref`.
//!
//! What it receives is measured like a WebSocket subscriber's tracks ([`RemoteTrackStats`]:
//! packets, SSRCs, sequence continuity, the frame size of every VP8 keyframe, the clip every
//! frame comes from, what a browser's decoder could decode); like a browser it sends NACKs,
//! TWCC feedback and receiver reports (webrtc-rs's default interceptors) and PLIs when its
//! modelled decoder is stuck ([`PliPolicy`]). It can sit behind a bandwidth bottleneck
//! ([`super::relay`]): the answer's candidate is pointed at the relay.
//!
//! The `201`'s `Link` headers are parsed ([`WhepLinks`]): the ICE servers and the URL of the
//! layer extension, which [`WhepViewer::set_layer`] posts to.

use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};
use plaza::signal::TrackKind;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use tokio::sync::{mpsc, watch};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};

use super::decoder::PliPolicy;
use super::keyframe::KeyframeRequestTap;
use super::peer::{bounded, lock, new_peer_connection};
use super::recv::RemoteTrackStats;
use super::relay::{self, Relay, RelayStats};
use super::whip::{Handler, HttpSession};

pub use super::support::{HttpReply, http};

/// What a [`WhepViewer`] asks for and how it connects.
#[derive(Debug, Clone)]
pub struct WhepOptions {
    /// A `recvonly` audio m-line.
    pub audio: bool,
    /// `recvonly` video m-lines (0, 1, or more: the host's second video track goes to the
    /// second one).
    pub video: usize,
    /// Trickle the local candidates with `PATCH`.
    pub trickle: bool,
    pub timeout: Duration,
    pub bind_ip: String,
    /// Receive through a bottleneck of this many bit/s ([`super::relay`]); `Some(0)` puts the
    /// relay in place without a limit (set one later with [`WhepViewer::set_bandwidth`]).
    pub bandwidth_bps: Option<u64>,
    /// When the modelled decoder asks for keyframes.
    pub pli_policy: PliPolicy,
    /// Packets kept per track for inspection ([`RemoteTrackStats::recent`]).
    pub keep_recent: usize,
}

impl Default for WhepOptions {
    fn default() -> Self {
        WhepOptions {
            audio: true,
            video: 1,
            trickle: true,
            timeout: Duration::from_secs(10),
            bind_ip: "127.0.0.1".to_owned(),
            bandwidth_bps: None,
            pli_policy: PliPolicy::Libwebrtc,
            keep_recent: 1000,
        }
    }
}

/// One `Link: <url>; rel="ice-server"; …` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IceServerLink {
    pub url: String,
    pub username: Option<String>,
    pub credential: Option<String>,
    pub credential_type: Option<String>,
}

/// The `Link` headers of a WHEP `201`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WhepLinks {
    pub ice_servers: Vec<IceServerLink>,
    /// `rel="urn:ietf:params:whep:ext:core:layer"`: the layer extension's URL.
    pub layer: Option<String>,
    /// Every link as (url, rel), in order.
    pub all: Vec<(String, String)>,
}

/// The `rel` of WHEP's layer extension.
pub const LAYER_REL: &str = "urn:ietf:params:whep:ext:core:layer";

/// Parses `Link` header values (each may hold several comma-separated links).
pub fn parse_links<'a>(values: impl IntoIterator<Item = &'a str>) -> WhepLinks {
    let mut out = WhepLinks::default();
    for value in values {
        for link in split_links(value) {
            let Some(rest) = link.trim().strip_prefix('<') else {
                continue;
            };
            let Some((url, params)) = rest.split_once('>') else {
                continue;
            };
            let mut rel = String::new();
            let mut server = IceServerLink {
                url: url.to_owned(),
                username: None,
                credential: None,
                credential_type: None,
            };
            for p in params.split(';').map(str::trim).filter(|p| !p.is_empty()) {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                let v = v.trim().trim_matches('"').to_owned();
                match k.trim().to_ascii_lowercase().as_str() {
                    "rel" => rel = v,
                    "username" => server.username = Some(v),
                    "credential" => server.credential = Some(v),
                    "credential-type" => server.credential_type = Some(v),
                    _ => {}
                }
            }
            if rel == "ice-server" {
                out.ice_servers.push(server);
            } else if rel == LAYER_REL {
                out.layer = Some(url.to_owned());
            }
            out.all.push((url.to_owned(), rel));
        }
    }
    out
}

/// Splits a `Link` value at the commas between links (not those inside `<…>` or quotes).
fn split_links(value: &str) -> Vec<&str> {
    let (mut parts, mut start, mut in_url, mut in_quote) = (Vec::new(), 0, false, false);
    for (i, c) in value.char_indices() {
        match c {
            '<' if !in_quote => in_url = true,
            '>' if !in_quote => in_url = false,
            '"' if !in_url => in_quote = !in_quote,
            ',' if !in_url && !in_quote => {
                parts.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&value[start..]);
    parts
}

/// What the viewer's track tasks record.
#[derive(Default)]
struct Received {
    /// Remote tracks in the order they started.
    tracks: Vec<RemoteTrackStats>,
}

/// A WHEP session that receives (see the module docs).
pub struct WhepViewer {
    session: HttpSession,
    /// The `201`'s `Link` headers.
    pub links: WhepLinks,
    received: Arc<Mutex<Received>>,
    version: watch::Receiver<u64>,
    relay: Option<Arc<Relay>>,
}

impl Deref for WhepViewer {
    type Target = HttpSession;
    fn deref(&self) -> &HttpSession {
        &self.session
    }
}

impl DerefMut for WhepViewer {
    fn deref_mut(&mut self) -> &mut HttpSession {
        &mut self.session
    }
}

impl WhepViewer {
    /// `POST`s a `recvonly` offer to `path` (`/whep/{room}[/{participant}][?track=…]`) with
    /// `token`, applies the answer and waits (within `opts.timeout`) for the connection. `Err`
    /// for any status but 201 (its status and body in the message).
    pub async fn play(
        addr: SocketAddr,
        path: &str,
        token: Option<&str>,
        opts: WhepOptions,
    ) -> Result<WhepViewer> {
        let t = opts.timeout;
        let (tracks_tx, tracks_rx) = mpsc::unbounded_channel();
        let (handler, events) = Handler::new(Some(tracks_tx));
        // The keyframe tap makes the media engine offer what the synthetic publishers send
        // (Opus/111, VP8/96), as a browser's offer would include them.
        let pc = new_peer_connection(
            Some(KeyframeRequestTap::default()),
            handler,
            &opts.bind_ip,
            t,
        )
        .await?;
        let kinds = opts
            .audio
            .then_some(RtpCodecKind::Audio)
            .into_iter()
            .chain(std::iter::repeat_n(RtpCodecKind::Video, opts.video));
        for kind in kinds {
            let init = RTCRtpTransceiverInit {
                direction: RTCRtpTransceiverDirection::Recvonly,
                ..Default::default()
            };
            bounded(
                t,
                "add_transceiver_from_kind",
                pc.add_transceiver_from_kind(kind, Some(init)),
            )
            .await?;
        }
        let (relay, relay_tasks) = match opts.bandwidth_bps {
            Some(rate) => {
                let (r, tasks) = Relay::bind(&opts.bind_ip, rate, relay::DEFAULT_MAX_DELAY).await?;
                (Some(Arc::new(r)), tasks)
            }
            None => (None, Vec::new()),
        };
        let relay_handles: Vec<_> = relay_tasks
            .into_iter()
            .map(|f| tokio::spawn(f).abort_handle())
            .collect();
        let received = Arc::new(Mutex::new(Received::default()));
        let (version_tx, version) = watch::channel(0u64);
        let collector = tokio::spawn(collect_tracks(
            tracks_rx,
            received.clone(),
            Arc::new(version_tx),
            opts.clone(),
        ));
        let created = HttpSession::create(
            addr,
            path,
            token,
            pc.clone(),
            events,
            opts.trickle,
            relay.clone(),
            t,
        )
        .await;
        let mut session = match created {
            Ok(s) => s,
            Err(e) => {
                collector.abort();
                for h in relay_handles {
                    h.abort();
                }
                let _ = pc.close().await;
                return Err(e);
            }
        };
        session.tasks.push(collector.abort_handle());
        session.tasks.extend(relay_handles);
        let links = parse_links(session.created.all("link"));
        let mut viewer = WhepViewer {
            session,
            links,
            received,
            version,
            relay,
        };
        viewer.session.wait_connected(t).await?;
        Ok(viewer)
    }

    /// Every remote track so far, in the order they started.
    pub fn tracks(&self) -> Vec<RemoteTrackStats> {
        lock(&self.received).tracks.clone()
    }

    /// The first remote track of `kind`.
    pub fn track(&self, kind: TrackKind) -> Option<RemoteTrackStats> {
        lock(&self.received)
            .tracks
            .iter()
            .find(|t| t.kind == kind)
            .cloned()
    }

    /// RTP packets received on the first track of `kind`.
    pub fn packets(&self, kind: TrackKind) -> u64 {
        lock(&self.received)
            .tracks
            .iter()
            .find(|t| t.kind == kind)
            .map_or(0, |t| t.packets)
    }

    /// The first packet's arrival over every track.
    pub fn first_packet_at(&self) -> Option<Instant> {
        lock(&self.received)
            .tracks
            .iter()
            .filter_map(|t| t.first_packet_at)
            .min()
    }

    /// The frame sizes of the VP8 keyframes received on the first video track, from `since`
    /// on (the one in force at `since`, then each change).
    pub fn frame_sizes_since(&self, since: Instant) -> Vec<(u16, u16)> {
        self.track(TrackKind::Video)
            .map(|t| t.resolutions_since(since))
            .unwrap_or_default()
    }

    /// The sizes of the keyframes the modelled decoder could decode, with when.
    pub fn decoded_keyframes(&self) -> Vec<(Instant, Option<(u16, u16)>)> {
        self.track(TrackKind::Video)
            .and_then(|t| t.decoder)
            .map(|d| {
                d.decoded_keyframes()
                    .iter()
                    .map(|k| (k.at, k.size))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until the first track of `kind` satisfies `pred`; returns it.
    pub async fn wait_for(
        &self,
        kind: TrackKind,
        what: &str,
        mut pred: impl FnMut(&RemoteTrackStats) -> bool,
        timeout: Duration,
    ) -> Result<RemoteTrackStats> {
        let mut rx = self.version.clone();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(t) = self.track(kind)
                && pred(&t)
            {
                return Ok(t);
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => bail!("WHEP viewer: stopped before {what}"),
                Err(_) => bail!(
                    "WHEP viewer: {what} not reached in {timeout:?}; {kind:?} track: {:?}",
                    self.track(kind).map(|t| (t.packets, t.ssrcs, t.resolution))
                ),
            }
        }
    }

    /// Waits until the first track of `kind` has received `n` packets in all.
    pub async fn wait_for_packets(
        &self,
        kind: TrackKind,
        n: u64,
        timeout: Duration,
    ) -> Result<RemoteTrackStats> {
        self.wait_for(
            kind,
            &format!("{n} {kind:?} packets"),
            |t| t.packets >= n,
            timeout,
        )
        .await
    }

    /// `POST`s `body` (JSON) to the layer extension's URL (from the `Link` header).
    pub async fn set_layer(&self, body: &str) -> Result<HttpReply> {
        let url = self
            .links
            .layer
            .clone()
            .ok_or_else(|| anyhow!("no layer Link in the 201: {:?}", self.links.all))?;
        self.request_to(
            &url,
            "POST",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        )
        .await
    }

    /// A trickle `PATCH` of `frag` with the session's `ETag`.
    pub async fn trickle(&self, frag: &str) -> Result<HttpReply> {
        let etag = self.etag.clone();
        self.request(
            "PATCH",
            &[
                ("Content-Type", "application/trickle-ice-sdpfrag"),
                ("If-Match", etag.as_str()),
            ],
            frag.as_bytes(),
        )
        .await
    }

    /// Changes the bottleneck's rate (bit/s, 0 = unlimited); `Err` without a relay.
    pub fn set_bandwidth(&self, bps: u64) -> Result<()> {
        let r = self
            .relay
            .as_ref()
            .ok_or_else(|| anyhow!("no relay: play with bandwidth_bps"))?;
        r.set_rate(bps);
        Ok(())
    }

    pub fn relay_stats(&self) -> Option<RelayStats> {
        self.relay.as_ref().map(|r| r.stats())
    }

    /// Closes the peer connection (without telling the server).
    pub async fn close(mut self) {
        self.session.close().await;
    }
}

/// Starts a task per remote track.
async fn collect_tracks(
    mut rx: mpsc::UnboundedReceiver<Arc<dyn TrackRemote>>,
    received: Arc<Mutex<Received>>,
    version: Arc<watch::Sender<u64>>,
    opts: WhepOptions,
) {
    let mut tasks = Vec::new();
    while let Some(track) = rx.recv().await {
        tasks.push(AbortOnDrop(tokio::spawn(track_task(
            track,
            received.clone(),
            version.clone(),
            opts.clone(),
        ))));
    }
}

/// Aborts its task when dropped (the collector's track tasks end with it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn track_task(
    track: Arc<dyn TrackRemote>,
    received: Arc<Mutex<Received>>,
    version: Arc<watch::Sender<u64>>,
    opts: WhepOptions,
) {
    let track_id = track.track_id().await;
    let stream_id = track.stream_id().await;
    let kind = match track.kind().await {
        RtpCodecKind::Audio => TrackKind::Audio,
        _ => TrackKind::Video,
    };
    let index = {
        let mut r = lock(&received);
        r.tracks.push(
            RemoteTrackStats::new(track_id, stream_id, kind, opts.keep_recent)
                .with_pli_policy(opts.pli_policy),
        );
        r.tracks.len() - 1
    };
    version.send_modify(|v| *v += 1);
    while let Some(event) = track.poll().await {
        match event {
            TrackRemoteEvent::OnOpen(init) => {
                let mime = track.codec(init.ssrc).await.map(|c| c.mime_type);
                lock(&received).tracks[index].mime_type = mime;
            }
            TrackRemoteEvent::OnRtpPacket(pkt) => {
                let now = Instant::now();
                let pli = {
                    let mut r = lock(&received);
                    let t = &mut r.tracks[index];
                    t.on_packet(&pkt, now);
                    t.poll_pli(now)
                };
                version.send_modify(|v| *v += 1);
                if pli {
                    let pli = PictureLossIndication {
                        sender_ssrc: 0,
                        media_ssrc: pkt.header.ssrc,
                    };
                    let _ = track.write_rtcp(vec![Box::new(pli)]).await;
                }
            }
            TrackRemoteEvent::OnEnded => break,
            _ => {}
        }
    }
    lock(&received).tracks[index].ended = true;
    version.send_modify(|v| *v += 1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_are_parsed() {
        let l = parse_links([
            "<turn:t.example:3478?transport=udp>; rel=\"ice-server\"; username=\"1:PA_x\"; \
             credential=\"c2VjcmV0\"; credential-type=\"password\"",
            "<stun:s.example:3478>; rel=\"ice-server\", \
             </whep/r/sessions/abc/layer>; rel=\"urn:ietf:params:whep:ext:core:layer\"",
        ]);
        assert_eq!(l.ice_servers.len(), 2, "{l:?}");
        assert_eq!(l.ice_servers[0].url, "turn:t.example:3478?transport=udp");
        assert_eq!(l.ice_servers[0].username.as_deref(), Some("1:PA_x"));
        assert_eq!(l.ice_servers[0].credential.as_deref(), Some("c2VjcmV0"));
        assert_eq!(
            l.ice_servers[0].credential_type.as_deref(),
            Some("password")
        );
        assert_eq!(l.ice_servers[1].url, "stun:s.example:3478");
        assert_eq!(l.ice_servers[1].username, None);
        assert_eq!(l.layer.as_deref(), Some("/whep/r/sessions/abc/layer"));
        assert_eq!(l.all.len(), 3);
    }
}
