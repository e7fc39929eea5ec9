//! A light benchmark viewer: a real Plaza subscriber that costs the load generator as little as
//! possible per received packet, so a benchmark measures the server's limit rather than its own.
//!
//! It joins over the real WebSocket signaling like any client, answers every `subscribe_offer`
//! (the first and every renegotiation) with the sans-I/O `rtc` core, and completes ICE and
//! DTLS with it on its own UDP socket. From then on it only **receives, counts and timestamps**
//! media: a datagram that is SRTP (first byte 128..=191 and an RTP payload type, i.e. not RTCP
//! 192..=223) is never decrypted, depacketized or buffered; its clear RTP header gives the
//! SSRC and sequence number, which feed per-SSRC counters: received, expected (from the highest
//! extended sequence number), lost (sequence gaps), reordered, bytes, first and last arrival.
//! Everything else (STUN consent and the server's checks, DTLS, SRTCP, SCTP for the data
//! channels) still goes to `rtc`, so the connection stays alive and the data channels open.
//! Datagrams are read by one receive thread per process for every viewer's socket: one
//! `epoll_wait(2)` reports every socket with data, and each is drained with `recvmmsg(2)` in
//! batches of up to [`BATCH`], so a burst to many viewers costs one wake-up and one system call
//! per socket, and no async task runs per packet. The few other datagrams are handed to the
//! viewer's tokio task (which owns the `rtc` connection and the WebSocket) over a channel.
//!
//! **It never sends RTCP feedback**: no PLI, no NACK, no receiver reports, no TWCC, no REMB (the
//! `rtc` connection is built without interceptors). The server's bandwidth estimator therefore
//! sees no feedback at all; Plaza then selects layers without a bandwidth constraint (the
//! requested layer, by default the highest; see `signaling/README.md`, "Bandwidth"). To make
//! what is forwarded explicit rather than a consequence of that default, the viewer sends
//! `track_settings` with [`LightOptions::quality`] for every video track it learns of, and
//! records the `layer_changed` messages it gets. Lost packets are never retransmitted (nothing
//! asks), so the loss it reports is what the server (or the kernel's socket buffers) dropped.
//!
//! Many viewers in one process: one UDP socket and one tokio task each (signaling, `rtc`
//! timers, the non-media datagrams), and the shared receive thread for the media.
//!
//! **WHEP mode** ([`LightViewer::connect_whep`]): no WebSocket; the viewer `POST`s a `recvonly`
//! audio + video offer made by `rtc` to `/whep/{room}` (a bearer token), applies the answer,
//! and asks for [`LightOptions::quality`] through the layer extension (`POST
//! {session}/layer`); leaving is a `DELETE` of the session. Everything after the answer (ICE,
//! DTLS, counting) is the same, so the two modes cost the load generator the same per packet
//! and the server's cost per viewer can be compared.

// The system calls of the receive thread (setsockopt, epoll, recvmmsg, gettid, sysconf) are
// `unsafe`; each block says why it is sound in its SAFETY comment.
#![allow(unsafe_code)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::recv::SeqTracker;
use anyhow::{Context, Result, anyhow, bail};
use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use plaza::sfu::egress::is_rtp;
use plaza::signal::{ClientMessage, PcTarget, Quality, ServerMessage, TrackKind};
use rtc::interceptor::Registry;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::configuration::media_engine::MediaEngine;
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::event::RTCPeerConnectionEvent;
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::peer_connection::transport::{
    CandidateConfig, CandidateHostConfig, RTCIceCandidate, RTCIceCandidateInit,
};
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
use rtc::rtp_transceiver::{RTCRtpTransceiverDirection, RTCRtpTransceiverInit};
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Message;

/// Datagrams read per `recvmmsg(2)` call, at most.
pub const BATCH: usize = 32;
/// Receive buffer size per message: a whole run of segments the kernel kept together
/// (`UDP_GRO`, see [`Batch`]), at most one IP datagram.
const MESSAGE: usize = 65_536;
/// Pause of the receive thread after each round of reads, so one `epoll_wait` finds many
/// sockets with data. Arrival times are therefore exact only to about this much.
const COALESCE: Duration = Duration::from_micros(1000);
/// Receive buffer asked of the kernel per viewer socket.
const SOCKET_BUFFER: usize = 1 << 20;

/// How a light viewer joins.
#[derive(Debug, Clone)]
pub struct LightOptions {
    /// Bound of the join (WebSocket → `joined` → connected).
    pub timeout: Duration,
    /// Join with the server's auto-subscribe (every track in the room). When false, the viewer
    /// subscribes itself to every track it learns of except those of `skip_participant`.
    pub auto_subscribe: bool,
    /// With `auto_subscribe: false`: the participant whose tracks are not subscribed to (a
    /// meeting participant's own publisher).
    pub skip_participant: Option<String>,
    /// Sent as `track_settings.quality` for every video track (None: no settings sent).
    pub quality: Option<Quality>,
    /// Local address the UDP socket binds to.
    pub bind_ip: IpAddr,
}

impl Default for LightOptions {
    fn default() -> Self {
        LightOptions {
            timeout: Duration::from_secs(15),
            auto_subscribe: true,
            skip_participant: None,
            quality: Some(Quality::High),
            bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }
}

/// Counters of one viewer, readable from other tasks at any time.
#[derive(Debug, Default)]
pub struct LightStats {
    /// RTP (SRTP) packets received.
    pub received: AtomicU64,
    /// Packets expected from the sequence numbers (per SSRC: highest − first + 1, summed).
    pub expected: AtomicU64,
    /// Packets that arrived with a sequence number below the highest seen on their SSRC.
    pub reordered: AtomicU64,
    /// RTP bytes received (SRTP datagram sizes).
    pub bytes: AtomicU64,
    /// Other datagrams (STUN, DTLS, SRTCP, SCTP) handed to `rtc`.
    pub control_datagrams: AtomicU64,
    /// `recvmmsg` calls that returned at least one datagram.
    pub batches: AtomicU64,
    /// SSRCs that delivered at least one packet.
    pub ssrcs: AtomicU64,
    /// Largest gap between two consecutive arrivals on one SSRC, µs.
    pub max_gap_us: AtomicU64,
    /// Set once DTLS is connected: media is counted from then on.
    connected: AtomicBool,
}

impl LightStats {
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    pub fn expected(&self) -> u64 {
        self.expected.load(Ordering::Relaxed)
    }
}

/// Per-SSRC receive state (the task's own; published to [`LightStats`] after each batch).
#[derive(Debug, Clone)]
struct SsrcState {
    seq: SeqTracker,
    last_arrival: Instant,
}

/// What one datagram is (RFC 7983 demultiplexing, with RTP told apart from RTCP by the
/// payload type byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datagram {
    /// SRTP with a clear RTP header: (SSRC, sequence number).
    Rtp { ssrc: u32, seq: u16 },
    /// Anything else: STUN, DTLS, SRTCP (goes to `rtc`).
    Other,
}

pub fn classify(d: &[u8]) -> Datagram {
    if is_rtp(d) {
        let seq = u16::from_be_bytes([d[2], d[3]]);
        let ssrc = u32::from_be_bytes([d[8], d[9], d[10], d[11]]);
        Datagram::Rtp { ssrc, seq }
    } else {
        Datagram::Other
    }
}

/// Times of one viewer's join, from opening the WebSocket (WHEP: from sending the `POST`).
#[derive(Debug, Clone, Copy, Default)]
pub struct LightJoin {
    /// `joined` received (WHEP: the `201`).
    pub joined: Option<Duration>,
    pub connected: Option<Duration>,
    pub first_media: Option<Duration>,
}

#[derive(Default)]
struct Shared {
    join: LightJoin,
    /// Video track id → (quality, rid) of the last `layer_changed`.
    layers: HashMap<String, (Quality, String)>,
    /// Why the task ended, if it did.
    ended: Option<String>,
    subscribe_offers: u64,
    /// WHEP: the status of the layer request (0: no response).
    layer_status: Option<u16>,
}

/// One light viewer (see the module docs). Dropping it stops its task.
pub struct LightViewer {
    /// Registration with the receive thread.
    token: u64,
    name: String,
    participant_id: String,
    /// The UDP socket's address (where the server sends).
    local_addr: SocketAddr,
    pub stats: Arc<LightStats>,
    shared: Arc<Mutex<Shared>>,
    streams: watch::Receiver<u64>,
    stop: Mutex<Option<oneshot::Sender<()>>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for LightViewer {
    fn drop(&mut self) {
        if let Ok(r) = receiver() {
            r.remove(self.token);
        }
        if let Some(t) = lock(&self.task).take() {
            t.abort();
        }
    }
}

impl LightViewer {
    /// Joins `room` as `name` and returns once the subscriber connection is connected (ICE +
    /// DTLS), within `opts.timeout`.
    pub async fn connect(url: &str, room: &str, name: &str, opts: LightOptions) -> Result<Self> {
        let started = Instant::now();
        let (ws, _) = tokio::time::timeout(
            opts.timeout,
            tokio_tungstenite::connect_async_with_config(url, None, true),
        )
        .await
        .map_err(|_| anyhow!("{name}: WebSocket connect timed out"))?
        .with_context(|| format!("{name}: WebSocket connect"))?;
        Self::start(Signaling::Ws(Box::new(ws)), room, name, opts, started).await
    }

    /// Plays `room`'s host over WHEP (`POST http://{http}/whep/{room}`, see the module docs)
    /// and returns once connected (ICE + DTLS), within `opts.timeout`. Its
    /// [`participant_id`](Self::participant_id) is the session's URL.
    pub async fn connect_whep(
        http: SocketAddr,
        room: &str,
        name: &str,
        opts: LightOptions,
    ) -> Result<Self> {
        let started = Instant::now();
        Self::start(Signaling::Whep(http), room, name, opts, started).await
    }

    async fn start(
        signaling: Signaling,
        room: &str,
        name: &str,
        opts: LightOptions,
        started: Instant,
    ) -> Result<Self> {
        let sock = StdUdpSocket::bind(SocketAddr::new(opts.bind_ip, 0))?;
        let local_addr = sock.local_addr()?;
        sock.set_nonblocking(true)?;
        set_rcvbuf(&sock, SOCKET_BUFFER);
        take_runs_whole(&sock);
        let sock = Arc::new(sock);
        let stats = Arc::new(LightStats::default());
        let shared = Arc::new(Mutex::new(Shared::default()));
        let (streams_tx, streams) = watch::channel(0u64);
        let (ready_tx, ready_rx) = oneshot::channel::<Result<String>>();
        let (stop, stop_rx) = oneshot::channel();
        let (control_tx, control_rx) = mpsc::unbounded_channel();
        let token = receiver()?.add(Entry {
            sock: sock.clone(),
            stats: stats.clone(),
            shared: shared.clone(),
            started,
            ssrcs: HashMap::new(),
            streams: streams_tx,
            control: control_tx,
        })?;
        let run = Run {
            name: name.to_owned(),
            room: room.to_owned(),
            opts: opts.clone(),
            started,
            stats: stats.clone(),
            shared: shared.clone(),
        };
        let task_shared = shared.clone();
        let task = tokio::spawn(async move {
            let why = match run
                .run(signaling, sock, control_rx, ready_tx, stop_rx)
                .await
            {
                Ok(()) => "left".to_owned(),
                Err(e) => format!("{e:#}"),
            };
            lock(&task_shared).ended = Some(why);
        });
        let mut viewer = LightViewer {
            token,
            name: name.to_owned(),
            participant_id: String::new(),
            local_addr,
            stats,
            shared,
            streams,
            stop: Mutex::new(Some(stop)),
            task: Mutex::new(Some(task)),
        };
        match tokio::time::timeout(opts.timeout, ready_rx).await {
            Ok(Ok(Ok(pid))) => {
                viewer.participant_id = pid;
                Ok(viewer)
            }
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(anyhow!(
                "{name}: viewer ended before connecting: {}",
                viewer.ended().unwrap_or_default()
            )),
            Err(_) => Err(anyhow!("{name}: not connected within {:?}", opts.timeout)),
        }
    }

    /// The address of the viewer's UDP socket.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn participant_id(&self) -> &str {
        &self.participant_id
    }

    /// Why the viewer's task ended (None while it runs).
    pub fn ended(&self) -> Option<String> {
        lock(&self.shared).ended.clone()
    }

    pub fn join_times(&self) -> LightJoin {
        lock(&self.shared).join
    }

    /// The last `layer_changed` per video track: (quality, rid).
    pub fn layers(&self) -> HashMap<String, (Quality, String)> {
        lock(&self.shared).layers.clone()
    }

    pub fn subscribe_offers(&self) -> u64 {
        lock(&self.shared).subscribe_offers
    }

    /// WHEP: the status of the layer request (`None`: none sent or not answered yet).
    pub fn layer_status(&self) -> Option<u16> {
        lock(&self.shared).layer_status
    }

    /// Waits until `n` SSRCs delivered packets, within `timeout`.
    pub async fn wait_for_streams(&self, n: u64, timeout: Duration) -> Result<()> {
        let mut rx = self.streams.clone();
        match tokio::time::timeout(timeout, rx.wait_for(|v| *v >= n)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => bail!(
                "{}: ended before {n} streams arrived ({})",
                self.name,
                self.ended().unwrap_or_default()
            ),
            Err(_) => bail!(
                "{}: {} of {n} streams within {timeout:?}",
                self.name,
                *self.streams.borrow()
            ),
        }
    }

    /// Sends `leave` and waits (bounded) for the task to end.
    pub async fn leave(&self) {
        if let Some(s) = lock(&self.stop).take() {
            let _ = s.send(());
        }
        let task = lock(&self.task).take();
        if let Some(t) = task {
            let _ = tokio::time::timeout(Duration::from_secs(3), t).await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn set_rcvbuf(sock: &StdUdpSocket, bytes: usize) {
    set_int_option(
        sock,
        libc::SOL_SOCKET,
        libc::SO_RCVBUF,
        bytes as libc::c_int,
    );
}

/// Take segmented runs whole (see [`Batch`]). A kernel without `UDP_GRO` refuses it, and then
/// splits runs itself: the counts are the same.
fn take_runs_whole(sock: &StdUdpSocket) {
    set_int_option(sock, libc::SOL_UDP, libc::UDP_GRO, 1);
}

/// Best effort: a refused option leaves the kernel's default (the counts stay right).
fn set_int_option(sock: &StdUdpSocket, level: libc::c_int, name: libc::c_int, v: libc::c_int) {
    let _ = plaza::io::set_int_option(sock, level, name, v);
}

/// Room for one control message carrying an int (`CMSG_SPACE(4)`: 24 bytes on 64-bit
/// Linux), aligned as a `cmsghdr`.
type Cmsg = [u64; 4];

/// Receive buffers for `recvmmsg(2)`. The viewer sockets take segmented runs whole
/// (`UDP_GRO`): where the server sends a run of datagrams to one viewer as one segmented
/// message, the kernel delivers it as one message of several datagrams of one size (the last
/// may be shorter), with that size in a control message, instead of splitting it again on the
/// way in. Each message is cut back into its datagrams here. On loopback the receive path runs
/// on the sender's core, so splitting there would charge the server for work that, with the
/// viewers on other machines, is theirs.
struct Batch {
    bufs: Vec<u8>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    msgs: Vec<libc::mmsghdr>,
    controls: Vec<Cmsg>,
}

// SAFETY: the raw pointers in `iovs` and `msgs` only ever point into the same `Batch`'s own
// buffers (set right before each `recvmmsg` call); nothing is shared between threads.
unsafe impl Send for Batch {}

impl Batch {
    fn new() -> Box<Batch> {
        // SAFETY: all-zero is a valid value of these plain C structs.
        let zero_addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        // SAFETY: as above, all-zero is a valid `mmsghdr` (null pointers, zero lengths).
        let zero_msg: libc::mmsghdr = unsafe { std::mem::zeroed() };
        Box::new(Batch {
            bufs: vec![0u8; MESSAGE * BATCH],
            addrs: vec![zero_addr; BATCH],
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                BATCH
            ],
            msgs: vec![zero_msg; BATCH],
            controls: vec![[0; 4]; BATCH],
        })
    }

    /// One `recvmmsg` call on `fd`: the number of datagrams read (0..=BATCH), or the error
    /// (`WouldBlock` when none is waiting).
    fn recv(&mut self, fd: libc::c_int) -> std::io::Result<usize> {
        for i in 0..BATCH {
            self.iovs[i] = libc::iovec {
                iov_base: self.bufs[i * MESSAGE..].as_mut_ptr().cast(),
                iov_len: MESSAGE,
            };
            let h = &mut self.msgs[i].msg_hdr;
            h.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut self.iovs[i];
            h.msg_iovlen = 1;
            self.controls[i] = [0; 4];
            h.msg_control = self.controls[i].as_mut_ptr().cast();
            h.msg_controllen = std::mem::size_of::<Cmsg>() as _;
            h.msg_flags = 0;
            self.msgs[i].msg_len = 0;
        }
        // SAFETY: every header points into buffers owned by `self`, alive for the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// The datagrams of message `i`: one, or the segments of a run (see [`Batch`]).
    fn datagrams(&self, i: usize) -> std::slice::Chunks<'_, u8> {
        let len = (self.msgs[i].msg_len as usize).min(MESSAGE);
        let data = &self.bufs[i * MESSAGE..i * MESSAGE + len];
        data.chunks(self.segment_size(i).unwrap_or(len).max(1))
    }

    /// The segment size of message `i`, if the kernel delivered a run of segments.
    fn segment_size(&self, i: usize) -> Option<usize> {
        let h = &self.msgs[i].msg_hdr;
        // SAFETY: `h` is the header `recvmmsg` filled in, its control pointer and length
        // within `self.controls[i]`; CMSG_FIRSTHDR/CMSG_NXTHDR stay within them, and the int
        // is read unaligned.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(h);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                    let size = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                    return usize::try_from(size).ok().filter(|&s| s > 0);
                }
                c = libc::CMSG_NXTHDR(h, c);
            }
        }
        None
    }

    fn addr(&self, i: usize) -> Option<SocketAddr> {
        plaza::io::recv::socket_addr(&self.addrs[i], self.msgs[i].msg_hdr.msg_namelen)
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How a viewer signals: Plaza's WebSocket, or WHEP on the server's HTTP address.
enum Signaling {
    Ws(Box<Ws>),
    Whep(SocketAddr),
}

struct Run {
    name: String,
    room: String,
    opts: LightOptions,
    started: Instant,
    stats: Arc<LightStats>,
    shared: Arc<Mutex<Shared>>,
}

/// A non-media datagram for the viewer's `rtc` connection: (bytes, source, arrival).
type Control = (BytesMut, SocketAddr, Instant);

/// The connection state the task owns.
struct State {
    pc: Option<RTCPeerConnection>,
    local: SocketAddr,
    /// Video tracks known: id → publisher.
    video_tracks: HashMap<String, String>,
    settings_sent: std::collections::HashSet<String>,
    subscribed: std::collections::HashSet<String>,
    participant_id: String,
    connected: bool,
    ready: Option<oneshot::Sender<Result<String>>>,
    /// WHEP: the session's URL path (`Location`).
    whep_session: Option<String>,
}

/// The next WebSocket message; never, without a WebSocket (WHEP).
async fn next_ws(
    ws: &mut Option<Box<Ws>>,
) -> Option<Result<Message, tokio_tungstenite::tungstenite::Error>> {
    match ws.as_mut() {
        Some(ws) => ws.next().await,
        None => std::future::pending().await,
    }
}

impl Run {
    async fn run(
        self,
        signaling: Signaling,
        sock: Arc<StdUdpSocket>,
        mut control: mpsc::UnboundedReceiver<Control>,
        ready: oneshot::Sender<Result<String>>,
        mut stop: oneshot::Receiver<()>,
    ) -> Result<()> {
        let (mut ws, whep) = match signaling {
            Signaling::Ws(ws) => (Some(ws), None),
            Signaling::Whep(addr) => (None, Some(addr)),
        };
        if let Some(ws) = ws.as_mut() {
            let join = ClientMessage::Join {
                room: self.room.clone(),
                name: self.name.clone(),
                token: Some(crate::token::participant(&self.room, &self.name)),
                protocol: None,
                auto_subscribe: Some(self.opts.auto_subscribe),
                timeline_events: None,
            };
            ws.send(Message::text(serde_json::to_string(&join)?))
                .await?;
        }
        let mut st = State {
            pc: None,
            local: sock.local_addr()?,
            video_tracks: HashMap::new(),
            settings_sent: Default::default(),
            subscribed: Default::default(),
            participant_id: String::new(),
            connected: false,
            ready: Some(ready),
            whep_session: None,
        };
        let far = Duration::from_secs(3600);
        let result: Result<()> = async {
            if let Some(addr) = whep {
                // Boxed: the HTTP exchanges would make every viewer task's future large.
                Box::pin(self.whep_play(&mut st, addr)).await?;
            }
            loop {
                self.drain_rtc(&mut st, &sock)?;
                let deadline = st
                    .pc
                    .as_mut()
                    .and_then(|pc| pc.poll_timeout())
                    .unwrap_or_else(|| Instant::now() + far);
                tokio::select! {
                    biased;
                    _ = &mut stop => {
                        if let Some(ws) = ws.as_mut() {
                            let _ = ws
                                .send(Message::text(serde_json::to_string(&ClientMessage::Leave)?))
                                .await;
                            let _ = (**ws).close(None).await;
                        }
                        if let (Some(addr), Some(location)) = (whep, st.whep_session.as_deref()) {
                            let _ = crate::support::http(addr, "DELETE", location, &[], b"").await;
                        }
                        return Ok(());
                    }
                    d = control.recv() => {
                        let Some((message, peer, now)) = d else {
                            bail!("receive thread gone")
                        };
                        if let Some(pc) = st.pc.as_mut() {
                            let _ = pc.handle_read(TaggedBytesMut {
                                now,
                                transport: TransportContext {
                                    local_addr: st.local,
                                    peer_addr: peer,
                                    ecn: None,
                                    transport_protocol: TransportProtocol::UDP,
                                },
                                message,
                            });
                        }
                    }
                    msg = next_ws(&mut ws) => {
                        let Some(msg) = msg else { bail!("WebSocket closed by the server") };
                        let out = self.on_ws(&mut st, msg?)?;
                        if let Some(ws) = ws.as_mut() {
                            for m in out {
                                ws.send(Message::text(serde_json::to_string(&m)?)).await?;
                            }
                        }
                    }
                    _ = tokio::time::sleep_until(deadline.into()) => {
                        if let Some(pc) = st.pc.as_mut() {
                            pc.handle_timeout(Instant::now())
                                .map_err(|e| anyhow!("rtc timeout: {e}"))?;
                        }
                    }
                }
            }
        }
        .await;
        if let Err(e) = &result
            && let Some(r) = st.ready.take()
        {
            let _ = r.send(Err(anyhow!("{}: {e:#}", self.name)));
        }
        result
    }

    /// Sends what `rtc` wants to send and handles its events (the rest is dropped: no media or
    /// data-channel message is read by the application).
    fn drain_rtc(&self, st: &mut State, sock: &StdUdpSocket) -> Result<()> {
        let Some(pc) = st.pc.as_mut() else {
            return Ok(());
        };
        while let Some(out) = pc.poll_write() {
            // A full send buffer drops the datagram (rtc retransmits what matters).
            let _ = sock.send_to(&out.message, out.transport.peer_addr);
        }
        while let Some(ev) = pc.poll_event() {
            if let RTCPeerConnectionEvent::OnConnectionStateChangeEvent(s) = ev {
                match s {
                    RTCPeerConnectionState::Connected if !st.connected => {
                        st.connected = true;
                        self.stats.connected.store(true, Ordering::Release);
                        lock(&self.shared).join.connected = Some(self.started.elapsed());
                        if let Some(r) = st.ready.take() {
                            let _ = r.send(Ok(st.participant_id.clone()));
                        }
                    }
                    RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed => {
                        bail!("subscriber connection {s}")
                    }
                    _ => {}
                }
            }
        }
        while pc.poll_read().is_some() {}
        Ok(())
    }

    /// Handles one signaling message; returns the messages to send.
    fn on_ws(&self, st: &mut State, msg: Message) -> Result<Vec<ClientMessage>> {
        let text = match msg {
            Message::Text(t) => t,
            Message::Close(c) => bail!("WebSocket closed: {c:?}"),
            _ => return Ok(Vec::new()),
        };
        let Ok(msg) = serde_json::from_str::<ServerMessage>(&text) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        match msg {
            ServerMessage::Joined {
                participant_id,
                participants,
                ..
            } => {
                st.participant_id = participant_id;
                lock(&self.shared).join.joined = Some(self.started.elapsed());
                for p in participants {
                    for t in p.tracks {
                        self.learn_track(st, &t.id, &t.participant_id, t.kind, &mut out);
                    }
                }
            }
            ServerMessage::TrackPublished { track } => {
                self.learn_track(st, &track.id, &track.participant_id, track.kind, &mut out);
            }
            ServerMessage::TrackUnpublished { track_id, .. } => {
                st.video_tracks.remove(&track_id);
                st.subscribed.remove(&track_id);
            }
            ServerMessage::SubscribeOffer { sdp } => {
                lock(&self.shared).subscribe_offers += 1;
                let answer = self.answer(st, sdp)?;
                out.push(ClientMessage::SubscribeAnswer { sdp: answer });
            }
            ServerMessage::Trickle {
                target: PcTarget::Subscriber,
                candidate,
            } => {
                if let Some(pc) = st.pc.as_mut()
                    && !candidate.candidate.trim().is_empty()
                {
                    let _ = pc.add_remote_candidate(RTCIceCandidateInit {
                        candidate: candidate.candidate,
                        sdp_mid: candidate.sdp_mid,
                        sdp_mline_index: candidate.sdp_mline_index,
                        username_fragment: candidate.username_fragment,
                        ..Default::default()
                    });
                }
            }
            ServerMessage::LayerChanged {
                track_id,
                quality,
                rid,
                ..
            } => {
                lock(&self.shared).layers.insert(track_id, (quality, rid));
            }
            ServerMessage::Leave { reason } => bail!("removed by the server: {reason}"),
            _ => {}
        }
        Ok(out)
    }

    fn learn_track(
        &self,
        st: &mut State,
        id: &str,
        publisher: &str,
        kind: TrackKind,
        out: &mut Vec<ClientMessage>,
    ) {
        if publisher == st.participant_id
            || self.opts.skip_participant.as_deref() == Some(publisher)
        {
            return;
        }
        if !self.opts.auto_subscribe && st.subscribed.insert(id.to_owned()) {
            out.push(ClientMessage::Subscribe {
                track_ids: vec![id.to_owned()],
                subscribe: true,
            });
        }
        if kind == TrackKind::Video {
            st.video_tracks.insert(id.to_owned(), publisher.to_owned());
            if let Some(q) = self.opts.quality
                && st.settings_sent.insert(id.to_owned())
            {
                out.push(ClientMessage::TrackSettings {
                    track_id: id.to_owned(),
                    quality: Some(Some(q)),
                    width: None,
                    height: None,
                });
            }
        }
    }

    /// WHEP: a `recvonly` audio + video offer `POST`ed to `/whep/{room}`, its answer applied,
    /// the layer asked for.
    async fn whep_play(&self, st: &mut State, addr: SocketAddr) -> Result<()> {
        let now = Instant::now();
        let mut pc = new_pc(now)?;
        for kind in [RtpCodecKind::Audio, RtpCodecKind::Video] {
            let init = RTCRtpTransceiverInit {
                direction: RTCRtpTransceiverDirection::Recvonly,
                ..Default::default()
            };
            pc.add_transceiver_from_kind(kind, Some(init))
                .map_err(|e| anyhow!("add_transceiver_from_kind: {e}"))?;
        }
        let offer = pc
            .create_offer(None)
            .map_err(|e| anyhow!("create_offer: {e}"))?;
        pc.set_local_description(now, offer)
            .map_err(|e| anyhow!("set_local_description: {e}"))?;
        add_host_candidate(&mut pc, st.local)?;
        let sdp = pc
            .local_description()
            .map(|d| d.sdp)
            .ok_or_else(|| anyhow!("no local description"))?;
        let token = format!(
            "Bearer {}",
            crate::token::participant(&self.room, &self.name)
        );
        let path = format!("/whep/{}", self.room);
        let r = crate::support::http(
            addr,
            "POST",
            &path,
            &[
                ("Content-Type", "application/sdp"),
                ("Authorization", token.as_str()),
            ],
            sdp.as_bytes(),
        )
        .await?;
        if r.status != 201 {
            bail!("POST {path}: {} {}", r.status, r.body.trim());
        }
        lock(&self.shared).join.joined = Some(self.started.elapsed());
        let location = r
            .header("location")
            .ok_or_else(|| anyhow!("201 without Location"))?
            .to_owned();
        let answer = RTCSessionDescription::answer(r.body.clone())
            .map_err(|e| anyhow!("bad answer: {e}"))?;
        pc.set_remote_description(Instant::now(), answer)
            .map_err(|e| anyhow!("set_remote_description: {e}"))?;
        for c in r.body.lines().filter_map(|l| l.trim().strip_prefix("a=")) {
            if c.starts_with("candidate:") {
                let _ = pc.add_remote_candidate(RTCIceCandidateInit {
                    candidate: c.to_owned(),
                    sdp_mid: Some("0".to_owned()),
                    sdp_mline_index: Some(0),
                    ..Default::default()
                });
            }
        }
        // The layer request goes beside ICE and DTLS (a player would not wait for it either);
        // its status is kept (`LightViewer::layer_status`).
        if let Some(q) = self.opts.quality {
            let body = serde_json::json!({ "quality": q }).to_string();
            let layer = format!("{location}/layer");
            let shared = self.shared.clone();
            tokio::spawn(async move {
                let status = crate::support::http(
                    addr,
                    "POST",
                    &layer,
                    &[
                        ("Content-Type", "application/json"),
                        ("Authorization", token.as_str()),
                    ],
                    body.as_bytes(),
                )
                .await
                .map_or(0, |r| r.status);
                lock(&shared).layer_status = Some(status);
            });
        }
        st.participant_id = location.clone();
        st.whep_session = Some(location);
        st.pc = Some(pc);
        Ok(())
    }

    /// Applies an offer (creating the connection on the first) and returns the answer's SDP.
    fn answer(&self, st: &mut State, sdp: String) -> Result<String> {
        let now = Instant::now();
        let first = st.pc.is_none();
        if first {
            st.pc = Some(new_pc(now)?);
        }
        let pc = st.pc.as_mut().expect("created above");
        let offer = RTCSessionDescription::offer(sdp).map_err(|e| anyhow!("bad offer: {e}"))?;
        pc.set_remote_description(now, offer)
            .map_err(|e| anyhow!("set_remote_description: {e}"))?;
        if first {
            add_host_candidate(pc, st.local)?;
        }
        let answer = pc
            .create_answer(None)
            .map_err(|e| anyhow!("create_answer: {e}"))?;
        pc.set_local_description(now, answer)
            .map_err(|e| anyhow!("set_local_description: {e}"))?;
        pc.local_description()
            .map(|d| d.sdp)
            .ok_or_else(|| anyhow!("no local description"))
    }
}

/// The viewer socket's address as `pc`'s one local candidate, then the end of candidates.
fn add_host_candidate(pc: &mut RTCPeerConnection, local: SocketAddr) -> Result<()> {
    let c = CandidateHostConfig {
        base_config: CandidateConfig {
            network: "udp".to_owned(),
            address: local.ip().to_string(),
            port: local.port(),
            component: 1,
            ..Default::default()
        },
        ..Default::default()
    }
    .new_candidate_host()
    .map_err(|e| anyhow!("local candidate: {e}"))?;
    let init = RTCIceCandidate::from(&c)
        .to_json()
        .map_err(|e| anyhow!("local candidate: {e}"))?;
    pc.add_local_candidate(init)
        .map_err(|e| anyhow!("add_local_candidate: {e}"))?;
    pc.add_local_candidate(RTCIceCandidateInit::default())
        .map_err(|e| anyhow!("end of candidates: {e}"))?;
    Ok(())
}

// ───────────────────────────── the receive thread ─────────────────────────────

/// One viewer's socket as the receive thread sees it.
struct Entry {
    sock: Arc<StdUdpSocket>,
    stats: Arc<LightStats>,
    shared: Arc<Mutex<Shared>>,
    started: Instant,
    ssrcs: HashMap<u32, SsrcState>,
    /// SSRCs with packets, for [`LightViewer::wait_for_streams`].
    streams: watch::Sender<u64>,
    control: mpsc::UnboundedSender<Control>,
}

/// The process's receive thread: an epoll set over every viewer socket.
struct Receiver {
    epoll: libc::c_int,
    entries: Arc<Mutex<HashMap<u64, Entry>>>,
    next: AtomicU64,
}

/// Thread id of the receive thread (0 until it runs).
static RECEIVE_TID: AtomicU64 = AtomicU64::new(0);

/// CPU time (user + system) the receive thread used so far, seconds (`/proc/self/task/<tid>`):
/// the viewers' cost of the media itself, without their tasks' signaling and `rtc` timers.
pub fn receive_thread_cpu_s() -> Option<f64> {
    let tid = RECEIVE_TID.load(Ordering::Relaxed);
    if tid == 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
    let ticks = crate::measure::parse_stat_ticks(&stat)?;
    // SAFETY: plain system call.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 })
}

/// The receive thread, started on first use.
fn receiver() -> Result<&'static Receiver> {
    static RECEIVER: OnceLock<std::result::Result<Receiver, String>> = OnceLock::new();
    RECEIVER
        .get_or_init(|| Receiver::start().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("light viewer receive thread: {e}"))
}

impl Receiver {
    fn start() -> Result<Receiver> {
        // SAFETY: plain system call.
        let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epoll < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        let entries: Arc<Mutex<HashMap<u64, Entry>>> = Arc::default();
        let e = entries.clone();
        std::thread::Builder::new()
            .name("light-viewers".into())
            .spawn(move || {
                // SAFETY: plain system call.
                RECEIVE_TID.store(unsafe { libc::gettid() } as u64, Ordering::Relaxed);
                receive_loop(epoll, &e)
            })?;
        Ok(Receiver {
            epoll,
            entries,
            next: AtomicU64::new(1),
        })
    }

    fn add(&self, entry: Entry) -> Result<u64> {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        let fd = entry.sock.as_raw_fd();
        lock(&self.entries).insert(token, entry);
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: valid epoll and socket descriptors, a valid event.
        if unsafe { libc::epoll_ctl(self.epoll, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            lock(&self.entries).remove(&token);
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(token)
    }

    fn remove(&self, token: u64) {
        let entry = lock(&self.entries).remove(&token);
        if let Some(e) = entry {
            // SAFETY: valid descriptors; the socket is still open (the entry holds it).
            unsafe {
                libc::epoll_ctl(
                    self.epoll,
                    libc::EPOLL_CTL_DEL,
                    e.sock.as_raw_fd(),
                    std::ptr::null_mut(),
                );
            }
        }
    }
}

fn receive_loop(epoll: libc::c_int, entries: &Mutex<HashMap<u64, Entry>>) {
    const EVENTS: usize = 256;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS];
    let mut batch = Batch::new();
    loop {
        // SAFETY: `events` has room for EVENTS entries.
        let n = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), EVENTS as i32, -1) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            eprintln!(
                "light viewers: epoll_wait: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        let mut map = lock(entries);
        for ev in &events[..n as usize] {
            let token = ev.u64;
            if let Some(entry) = map.get_mut(&token) {
                entry.read(&mut batch);
            }
        }
        drop(map);
        // Let the next burst gather in the socket buffers: one wake-up then serves many
        // sockets (and several datagrams per socket) instead of one or two.
        std::thread::sleep(COALESCE);
    }
}

impl Entry {
    /// Reads every waiting datagram: SRTP is counted, the rest goes to the viewer's task.
    fn read(&mut self, batch: &mut Batch) {
        let fd = self.sock.as_raw_fd();
        let connected = self.stats.connected.load(Ordering::Acquire);
        loop {
            let n = match batch.recv(fd) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if n == 0 {
                return;
            }
            let now = Instant::now();
            self.stats.batches.fetch_add(1, Ordering::Relaxed);
            let (mut got, mut bytes, mut reordered, mut control) = (0u64, 0u64, 0u64, 0u64);
            let mut new_ssrcs = false;
            let mut max_gap = 0u64;
            for (i, d) in (0..n).flat_map(|i| batch.datagrams(i).map(move |d| (i, d))) {
                match classify(d) {
                    Datagram::Rtp { ssrc, seq } if connected => {
                        got += 1;
                        bytes += d.len() as u64;
                        match self.ssrcs.get_mut(&ssrc) {
                            Some(s) => {
                                let before = s.seq.out_of_order;
                                s.seq.on_seq(seq);
                                reordered += s.seq.out_of_order - before;
                                let gap = now.duration_since(s.last_arrival).as_micros() as u64;
                                max_gap = max_gap.max(gap);
                                s.last_arrival = now;
                            }
                            None => {
                                let mut tracker = SeqTracker::default();
                                tracker.on_seq(seq);
                                self.ssrcs.insert(
                                    ssrc,
                                    SsrcState {
                                        seq: tracker,
                                        last_arrival: now,
                                    },
                                );
                                new_ssrcs = true;
                            }
                        }
                    }
                    Datagram::Rtp { .. } => {}
                    Datagram::Other => {
                        control += 1;
                        if let Some(peer) = batch.addr(i) {
                            let _ = self.control.send((BytesMut::from(d), peer, now));
                        }
                    }
                }
            }
            let s = &self.stats;
            if got > 0 {
                s.received.fetch_add(got, Ordering::Relaxed);
                s.bytes.fetch_add(bytes, Ordering::Relaxed);
                if reordered > 0 {
                    s.reordered.fetch_add(reordered, Ordering::Relaxed);
                }
                let expected: u64 = self.ssrcs.values().map(|v| v.seq.expected()).sum();
                s.expected.store(expected, Ordering::Relaxed);
                s.max_gap_us.fetch_max(max_gap, Ordering::Relaxed);
                if new_ssrcs {
                    let mut sh = lock(&self.shared);
                    if sh.join.first_media.is_none() {
                        sh.join.first_media = Some(self.started.elapsed());
                    }
                    drop(sh);
                    s.ssrcs.store(self.ssrcs.len() as u64, Ordering::Relaxed);
                    let _ = self.streams.send(self.ssrcs.len() as u64);
                }
            }
            if control > 0 {
                s.control_datagrams.fetch_add(control, Ordering::Relaxed);
            }
            if n < BATCH {
                return;
            }
        }
    }
}

/// An `rtc` connection with the default codecs, no interceptors (so no RTCP feedback of any
/// kind) and mDNS off.
fn new_pc(now: Instant) -> Result<RTCPeerConnection> {
    let mut media_engine = MediaEngine::default();
    media_engine
        .register_default_codecs()
        .map_err(|e| anyhow!("codecs: {e}"))?;
    let setting_engine = SettingEngineBuilder::new()
        .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
        .build();
    RTCPeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(media_engine)
        .with_setting_engine(setting_engine)
        .with_interceptor_registry(Registry::new())
        .build(now)
        .map_err(|e| anyhow!("peer connection: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Send `data` to `to` from `from` as one message segmented into `segment`-byte datagrams.
    fn send_segmented(from: &StdUdpSocket, to: SocketAddr, data: &[u8], segment: u16) {
        let SocketAddr::V4(to) = to else {
            panic!("IPv4 only")
        };
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: to.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*to.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let mut iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        };
        let mut control: Cmsg = [0; 4];
        // SAFETY: the header points at `addr`, `iov` and `control`, alive for the call;
        // `control` holds CMSG_SPACE(2) bytes, aligned as a cmsghdr.
        let sent = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_name = (&addr as *const libc::sockaddr_in as *mut libc::sockaddr_in).cast();
            msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(2) as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_UDP;
            (*c).cmsg_type = libc::UDP_SEGMENT;
            (*c).cmsg_len = libc::CMSG_LEN(2) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), segment);
            libc::sendmsg(from.as_raw_fd(), &msg, 0)
        };
        assert_eq!(
            sent,
            data.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }

    #[test]
    fn a_segmented_run_is_read_back_as_its_datagrams() {
        let rx = StdUdpSocket::bind("127.0.0.1:0").expect("bind");
        take_runs_whole(&rx);
        let tx = StdUdpSocket::bind("127.0.0.1:0").expect("bind");
        let to = rx.local_addr().expect("address");
        // Three datagrams of 100 bytes and a shorter last one, then a datagram on its own.
        let run: Vec<u8> = (0..340u32).map(|i| (i / 100 + 1) as u8).collect();
        send_segmented(&tx, to, &run, 100);
        tx.send_to(&[9u8; 7], to).expect("send");
        let mut batch = Batch::new();
        let mut got: Vec<Vec<u8>> = Vec::new();
        let mut runs_whole = 0;
        while got.len() < 5 {
            let mut pfd = libc::pollfd {
                fd: rx.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&mut pfd, 1, 5_000) };
            assert_eq!(ready, 1, "nothing more arrived within 5 s: {got:?}");
            let n = batch.recv(rx.as_raw_fd()).expect("recvmmsg");
            for i in 0..n {
                runs_whole += usize::from(batch.segment_size(i).is_some());
                got.extend(batch.datagrams(i).map(<[u8]>::to_vec));
            }
        }
        let expected = vec![
            vec![1u8; 100],
            vec![2; 100],
            vec![3; 100],
            vec![4; 40],
            vec![9; 7],
        ];
        assert_eq!(got, expected);
        // The kernel kept the run together, and it was cut here.
        assert_eq!(runs_whole, 1);
    }

    #[test]
    fn classify_tells_rtp_from_rtcp_and_the_rest() {
        let mut rtp = [0u8; 20];
        rtp[0] = 0x80;
        rtp[1] = 96;
        rtp[2..4].copy_from_slice(&4660u16.to_be_bytes());
        rtp[8..12].copy_from_slice(&0xdead_beefu32.to_be_bytes());
        assert_eq!(
            classify(&rtp),
            Datagram::Rtp {
                ssrc: 0xdead_beef,
                seq: 4660
            }
        );
        rtp[1] = 96 | 0x80; // marker bit
        assert!(matches!(classify(&rtp), Datagram::Rtp { .. }));
        let mut rtcp = rtp;
        rtcp[1] = 200; // sender report
        assert_eq!(classify(&rtcp), Datagram::Other);
        let mut dtls = rtp;
        dtls[0] = 22;
        assert_eq!(classify(&dtls), Datagram::Other);
        let stun = [0u8; 20];
        assert_eq!(classify(&stun), Datagram::Other);
    }
}
