//! The driver: the only async media code.
//!
//! The SFU core ([`crate::sfu::Sfu`]) is a state machine that never touches a socket, a
//! runtime or the clock. This module gives it the real world: it owns the media UDP socket
//! and the command channel from signaling, reads `Instant::now()` once per turn, sleeps until
//! the core's next deadline, reads datagrams in `recvmmsg` batches, each with the time the
//! kernel received it ([`recv`]), and hands the datagrams the core produces to the kernel in
//! `sendmmsg` batches ([`udp`]). With ICE-TCP on, each shard also accepts ICE over TCP on its
//! own port ([`tcp`]): frames from a connection reach the core as datagrams from the client's
//! address, and what the core sends to that address goes back over the connection. The
//! virtual-time tests drive the same core with a simulated network instead (`crate::sim`).

// The driver reads the clock, once per turn, and hands `now` to the core.
#![allow(clippy::disallowed_methods)]

pub mod recv;
pub mod tcp;
pub mod udp;

use crate::sfu::core::CoreConfig;
use crate::sfu::latency::LatencyHistogram;
use crate::sfu::pipe::{Lane, NodePipe, PipeBatch, PipeMsg, REMOTE_BASE, RemoteBatch, ShardId};
use crate::sfu::{Command, CoreStats, Flow, Remote, Sfu, SfuError, SfuHandle, Transmit};
use bytes::BytesMut;
use recv::{Clocks, RecvBatch};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};
use tcp::{TcpConns, TcpEvent};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};
use udp::OutQueue;

/// Default media socket buffer: a burst of a few thousand full-size datagrams (the kernel's
/// usual default, ~208 KB, loses datagrams of everyone during a flood).
pub const UDP_BUFFER_DEFAULT: usize = 8 << 20;

/// How many datagrams to take from the socket per wakeup before serving other work.
const RECV_BATCH: usize = 64;
/// Capacity of the command channel from signaling.
const COMMAND_QUEUE: usize = 4096;
/// Capacity of each shard's pipe queue, in batches (each other shard hands over at most one
/// per turn).
const PIPE_QUEUE: usize = 1024;
/// How many pipe batches to take per wakeup before serving other work.
const PIPE_BATCHES_PER_TURN: usize = 16;

/// Set a socket option that takes a `c_int` (`setsockopt(2)`).
#[allow(unsafe_code)] // setsockopt(2); see the SAFETY comment
pub fn set_int_option(
    socket: &impl std::os::fd::AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: the fd is a valid socket for the duration of the call (`socket` is borrowed);
    // the option value is a c_int of the length given.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Ask for `bytes` of receive and send buffer on `socket`: first past the system maximum
/// (`SO_RCVBUFFORCE`, which needs `CAP_NET_ADMIN`), else up to it. Returns what the kernel
/// granted (it reports twice the usable size).
#[allow(unsafe_code)] // getsockopt(2); see the SAFETY comment
pub fn set_socket_buffers(socket: &std::net::UdpSocket, bytes: usize) -> (usize, usize) {
    use std::os::fd::AsRawFd;
    let fd = socket.as_raw_fd();
    let want = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    let set = |force, plain| {
        // (What the kernel granted is read back below, whichever worked.)
        if set_int_option(socket, libc::SOL_SOCKET, force, want).is_err() {
            let _ = set_int_option(socket, libc::SOL_SOCKET, plain, want);
        }
    };
    set(libc::SO_RCVBUFFORCE, libc::SO_RCVBUF);
    set(libc::SO_SNDBUFFORCE, libc::SO_SNDBUF);
    let get = |opt| {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: `fd` is a valid socket for the duration of the call; `v` and `len` are
        // valid for writes, `len` the size of the c_int both options read back.
        unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                &mut v as *mut libc::c_int as *mut libc::c_void,
                &mut len,
            );
        }
        usize::try_from(v).unwrap_or(0)
    };
    (get(libc::SO_RCVBUF), get(libc::SO_SNDBUF))
}

/// Send the media socket's datagrams with "don't fragment" set, without the path-MTU cache
/// (`IP_PMTUDISC_PROBE`), so that the kernel skips choosing an IP identification for each one
/// (a hash and an atomic on a table shared by every socket: 4–6 % of the server's CPU in a
/// livestream fan-out). DTLS and SCTP leave in 1200-byte datagrams and browsers packetize RTP
/// below that; a larger RTP packet from a publisher (GStreamer's payloaders default to 1400
/// bytes) is forwarded as it came, and a path narrower than it drops it instead of fragmenting
/// it (NATs and firewalls often drop the fragments anyway). An IPv6 socket is left alone: IPv6
/// routers never fragment.
pub fn set_dont_fragment(socket: &std::net::UdpSocket) -> std::io::Result<()> {
    if !socket.local_addr()?.is_ipv4() {
        return Ok(());
    }
    set_int_option(
        socket,
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_PROBE,
    )
}

/// The CPUs this process may run on, in order (empty if the kernel does not say).
#[allow(unsafe_code)] // sched_getaffinity(2); see the SAFETY comment
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set; the kernel writes at most
    // `size_of::<cpu_set_t>()` bytes into it, and CPU_ISSET only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

/// The CPU shard `shard` is pinned to with `--pin-shards`: the shard-th of `allowed`,
/// wrapping around (none when `allowed` is empty).
pub fn shard_cpu(allowed: &[usize], shard: usize) -> Option<usize> {
    (!allowed.is_empty()).then(|| allowed[shard % allowed.len()])
}

/// Pin the calling thread to `cpu`.
#[allow(unsafe_code)] // sched_setaffinity(2); see the SAFETY comment
fn pin_current_thread(cpu: usize) -> std::io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    // SAFETY: an all-zero cpu_set_t is a valid empty set, `cpu` is below CPU_SETSIZE (checked
    // above), and the kernel only reads `size_of::<cpu_set_t>()` bytes of it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// One shard's media sockets (bound): its UDP socket and, with ICE-TCP on, its TCP listener.
#[derive(Debug)]
pub struct MediaSockets {
    pub udp: std::net::UdpSocket,
    pub tcp: Option<std::net::TcpListener>,
    /// Most ICE-TCP connections the shard keeps open at once (see [`tcp::connection_cap`]).
    pub tcp_max: usize,
    /// The CPU the shard's thread is pinned to (none: the scheduler places it).
    pub cpu: Option<usize>,
}

/// Start one core shard per socket pair (bound std sockets), each on its own thread. Call from
/// within a tokio runtime.
/// Returns the handle to all of them and a receiver that resolves when a shard has stopped
/// (after a graceful shutdown: when all have).
pub fn spawn(
    config: CoreConfig,
    sockets: Vec<MediaSockets>,
) -> Result<(SfuHandle, oneshot::Receiver<()>), SfuError> {
    if sockets.is_empty() {
        return Err(SfuError::Io(std::io::Error::other("no media socket")));
    }
    let mut senders = Vec::with_capacity(sockets.len());
    let mut stopped = Vec::with_capacity(sockets.len());
    // Two pipe lanes per shard (media: bounded, drops; control: never drops); every shard may
    // hand batches to every other.
    let n = sockets.len();
    let (media, media_rxs): (Vec<_>, Vec<_>) = (0..n)
        .map(|_| mpsc::channel::<PipeBatch>(PIPE_QUEUE))
        .unzip();
    let (control, control_rxs): (Vec<_>, Vec<_>) = (0..n)
        .map(|_| mpsc::unbounded_channel::<PipeBatch>())
        .unzip();
    // And to other nodes' shards, through the node link (when the server is in a cluster).
    let (remote_media, out_media) = mpsc::channel::<RemoteBatch>(PIPE_QUEUE * n);
    let (remote_control, out_control) = mpsc::unbounded_channel::<RemoteBatch>();
    let node_pipe = NodePipe {
        out_control,
        out_media,
        shard_media: media.clone(),
        shard_control: control.clone(),
    };
    let lanes = media_rxs.into_iter().zip(control_rxs);
    for (shard, (socket, rx)) in sockets.into_iter().zip(lanes).enumerate() {
        let pipes = Pipes {
            shard,
            media: media.clone(),
            control: control.clone(),
            remote_media: remote_media.clone(),
            remote_control: remote_control.clone(),
            dropped: Vec::new(),
        };
        let (tx, done) = spawn_shard(shard, config.clone(), socket, pipes, rx)?;
        senders.push(tx);
        stopped.push(done);
    }
    let spread_above = config.spread_above;
    let (done_tx, done_rx) = oneshot::channel();
    // Resolves when the first shard stops: on shutdown they all stop together; a shard that
    // stops by itself is a failure the server reports.
    tokio::spawn(async move {
        let _ = futures_util::future::select_all(stopped).await;
        let _ = done_tx.send(());
    });
    Ok((
        SfuHandle::sharded(senders, spread_above).with_node_pipe(node_pipe),
        done_rx,
    ))
}

/// One shard: a core on its own thread with a current-thread runtime, owning `socket`.
fn spawn_shard(
    shard: usize,
    config: CoreConfig,
    sockets: MediaSockets,
    pipes: Pipes,
    (media_rx, control_rx): (
        mpsc::Receiver<PipeBatch>,
        mpsc::UnboundedReceiver<PipeBatch>,
    ),
) -> Result<(mpsc::Sender<Command>, oneshot::Receiver<()>), SfuError> {
    let MediaSockets {
        udp: socket,
        tcp,
        tcp_max,
        cpu,
    } = sockets;
    socket.set_nonblocking(true)?;
    let local_addr = socket.local_addr()?;
    let tcp_port = match &tcp {
        Some(l) => {
            l.set_nonblocking(true)?;
            let addr = l.local_addr()?;
            info!(shard, tcp = %addr, "ICE-TCP listener");
            Some(addr.port())
        }
        None => None,
    };
    let (rcv, snd) = set_socket_buffers(&socket, config.udp_buffer);
    if let Err(e) = set_dont_fragment(&socket) {
        warn!(shard, "media socket: could not set IP_MTU_DISCOVER: {e}");
    }
    if let Err(e) = recv::enable_timestamps(&socket) {
        warn!(
            shard,
            "media socket: could not set SO_TIMESTAMPNS (packets count as received when read): {e}"
        );
    }
    if rcv < config.udp_buffer {
        warn!(
            shard,
            wanted = config.udp_buffer,
            granted = rcv,
            "media socket receive buffer is smaller than configured (raise net.core.rmem_max, or run with CAP_NET_ADMIN)"
        );
    } else {
        info!(shard, %local_addr, receive = rcv, send = snd, "media socket");
    }
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE);
    let (done_tx, done_rx) = oneshot::channel();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(format!("plaza-core-{shard}"))
        .spawn(move || {
            let span = tracing::info_span!("shard", shard);
            let _g = span.enter();
            if let Some(cpu) = cpu {
                match pin_current_thread(cpu) {
                    Ok(()) => info!(cpu, "shard pinned"),
                    Err(e) => warn!(cpu, "could not pin the shard: {e}"),
                }
            }
            rt.block_on(async move {
                let listener = match tcp.map(TcpListener::from_std).transpose() {
                    Ok(l) => l,
                    Err(e) => {
                        warn!("core could not adopt the TCP listener: {e}");
                        None
                    }
                };
                match UdpSocket::from_std(socket) {
                    Ok(socket) => {
                        let now = Instant::now();
                        let sink = UdpTransmit::new(socket, pipes, tcp_max);
                        let mut sfu = Sfu::new(config, local_addr, rand::random(), now, sink)
                            .with_wall_clock(now, SystemTime::now());
                        if let (Some(port), Some(_)) = (tcp_port, &listener) {
                            sfu = sfu.with_tcp_port(port);
                        }
                        let (tcp_tx, tcp_rx) = mpsc::channel(tcp::EVENT_QUEUE);
                        Driver {
                            sfu,
                            rx,
                            media_rx,
                            control_rx,
                            listener,
                            accept_after: None,
                            tcp_tx,
                            tcp_rx,
                            batch: RecvBatch::new(RECV_BATCH),
                        }
                        .run()
                        .await;
                    }
                    Err(e) => warn!("core could not adopt the UDP socket: {e}"),
                }
            });
            let _ = done_tx.send(());
        })?;
    Ok((tx, done_rx))
}

/// The real network as the core's output: datagrams are queued and handed to the kernel in
/// batches, a full batch at once (so the first subscribers of a keyframe fan-out do not wait
/// for the last ones' encryption), the rest at the end of the turn.
pub struct UdpTransmit {
    socket: UdpSocket,
    /// ICE-TCP clients: datagrams for them go over their connection.
    tcp: TcpConns,
    pipes: Pipes,
    out: OutQueue,
    /// Media and data-channel latency (see `udp::latency_kind`).
    latency: [LatencyHistogram; 2],
    sent: u64,
    dropped: u64,
    calls: u64,
    segmented: u64,
}

impl UdpTransmit {
    fn new(socket: UdpSocket, pipes: Pipes, tcp_max: usize) -> Self {
        UdpTransmit {
            socket,
            tcp: TcpConns::new(tcp_max),
            pipes,
            out: OutQueue::new(),
            latency: Default::default(),
            sent: 0,
            dropped: 0,
            calls: 0,
            segmented: 0,
        }
    }

    /// Hand everything queued to the kernel (drop, never block).
    fn flush(&mut self) {
        if self.out.is_empty() {
            return;
        }
        let o = self.out.send(&self.socket, &mut self.latency);
        self.sent += o.sent;
        self.dropped += o.dropped;
        self.calls += o.calls;
        self.segmented += o.segmented;
    }
}

impl Transmit for UdpTransmit {
    fn send(&mut self, data: BytesMut, to: Remote, origin: Option<Instant>) {
        if to.tcp {
            let data_kind = [data.first().copied().unwrap_or(0)];
            match self.tcp.send(to.addr, data) {
                Ok(()) => {
                    if let Some(origin) = origin {
                        self.latency[udp::latency_kind(&data_kind)]
                            .record(Instant::now().saturating_duration_since(origin), 1);
                    }
                }
                // Its connection has closed since.
                Err(_) => self.dropped += 1,
            }
            return;
        }
        self.out.push(data, to.addr, origin);
        if self.out.len() >= udp::BATCH {
            self.flush();
        }
    }

    fn buffer(&mut self) -> BytesMut {
        self.out.buffer()
    }

    fn report(&self, stats: &mut CoreStats) {
        stats.udp_datagrams_out = self.sent;
        stats.udp_datagrams_out_dropped = self.dropped;
        stats.udp_send_calls = self.calls;
        stats.udp_datagrams_segmented = self.segmented;
        stats.forward_latency = self.latency[0].snapshot();
        stats.data_relay_latency = self.latency[1].snapshot();
        stats.ice_tcp = self.tcp.stats();
    }

    fn pipe(&mut self, to: ShardId, lane: Lane, msgs: Vec<PipeMsg>) {
        self.pipes.send(to, lane, msgs);
    }
}

/// This shard's ends of the pipe to every shard (by index), and what could not be handed over.
struct Pipes {
    shard: ShardId,
    media: Vec<mpsc::Sender<PipeBatch>>,
    control: Vec<mpsc::UnboundedSender<PipeBatch>>,
    /// To other nodes' shards (the node link).
    remote_media: mpsc::Sender<RemoteBatch>,
    remote_control: mpsc::UnboundedSender<RemoteBatch>,
    /// Messages dropped since the core was last told.
    dropped: Vec<(ShardId, Vec<PipeMsg>)>,
}

impl Pipes {
    /// One turn's messages of one lane for shard `to`: media through its bounded queue (a full
    /// queue drops them: the sender never waits), the rest through the lane that never drops.
    fn send(&mut self, to: ShardId, lane: Lane, msgs: Vec<PipeMsg>) {
        if to >= REMOTE_BASE {
            let batch = RemoteBatch {
                from: self.shard,
                to,
                lane,
                msgs,
            };
            // Refused only without a node link (not in a cluster), or when it stopped.
            let refused = match lane {
                Lane::Control => self.remote_control.send(batch).err().map(|e| e.0),
                Lane::Media => self.remote_media.try_send(batch).err().map(|e| match e {
                    mpsc::error::TrySendError::Full(b) | mpsc::error::TrySendError::Closed(b) => b,
                }),
            };
            if let Some(b) = refused {
                self.dropped.push((to, b.msgs));
            }
            return;
        }
        if to == self.shard || to >= self.media.len() {
            self.dropped.push((to, msgs));
            return;
        }
        let batch = PipeBatch {
            from: self.shard,
            msgs,
        };
        let refused = match lane {
            // Refused only once the other shard has stopped (shutdown).
            Lane::Control => self.control[to].send(batch).err().map(|e| e.0),
            Lane::Media => self.media[to].try_send(batch).err().map(|e| match e {
                mpsc::error::TrySendError::Full(b) | mpsc::error::TrySendError::Closed(b) => b,
            }),
        };
        if let Some(b) = refused {
            self.dropped.push((to, b.msgs));
        }
    }
}

struct Driver {
    sfu: Sfu<UdpTransmit>,
    rx: mpsc::Receiver<Command>,
    /// Batches from the shards hosting the same rooms: media, and everything else.
    media_rx: mpsc::Receiver<PipeBatch>,
    control_rx: mpsc::UnboundedReceiver<PipeBatch>,
    /// The ICE-TCP listener (none: ICE-TCP is off), and what the connections' readers say.
    listener: Option<TcpListener>,
    /// No accept before this (after an error).
    accept_after: Option<tokio::time::Instant>,
    tcp_tx: mpsc::Sender<TcpEvent>,
    tcp_rx: mpsc::Receiver<TcpEvent>,
    /// The buffers datagrams are read into, a batch at a time.
    batch: RecvBatch,
}

/// The next connection on `listener`, not before `after`; never, without a listener.
async fn accept(
    listener: Option<&TcpListener>,
    after: Option<tokio::time::Instant>,
) -> std::io::Result<(TcpStream, SocketAddr)> {
    let Some(l) = listener else {
        return std::future::pending().await;
    };
    if let Some(at) = after {
        tokio::time::sleep_until(at).await;
    }
    l.accept().await
}

/// After a failed `accept` (out of file descriptors: the error repeats at once), the listener
/// rests this long.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

impl Driver {
    async fn run(mut self) {
        loop {
            let next = self.sfu.poll_timeout().map(|d| d.at);
            let tcp_next = self.sfu.transmit().tcp.next_deadline();
            let next = match (next, tcp_next) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let sleep = tokio::time::sleep_until(
                next.map(tokio::time::Instant::from_std)
                    .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600)),
            );
            // Commands and datagrams take turns: each branch serves a bounded batch of its own
            // kind and then a batch of the other, so a flood of either (a client sending cheap
            // messages as fast as TCP allows, or garbage UDP) delays the other by at most one
            // batch.
            let stop = tokio::select! {
                biased;
                cmd = self.rx.recv() => {
                    match cmd {
                        None => Some(None),
                        Some(cmd) => {
                            let stop = self.serve_commands(cmd);
                            if stop.is_none() {
                                self.serve_datagrams();
                            }
                            stop
                        }
                    }
                }
                Some(batch) = self.control_rx.recv() => {
                    self.sfu.handle_pipe(Instant::now(), batch.from, batch.msgs);
                    self.serve_pipes();
                    None
                }
                Some(batch) = self.media_rx.recv() => {
                    // What the other shard said before this media (a track's announcement)
                    // comes first.
                    while let Ok(b) = self.control_rx.try_recv() {
                        self.sfu.handle_pipe(Instant::now(), b.from, b.msgs);
                    }
                    self.sfu.handle_pipe(Instant::now(), batch.from, batch.msgs);
                    self.serve_pipes();
                    None
                }
                res = self.sfu.transmit().socket.readable() => {
                    match res {
                        // What is queued, bounded.
                        Ok(()) => self.serve_datagrams(),
                        Err(e) => debug!("udp recv error: {e}"),
                    }
                    match self.rx.try_recv() {
                        Ok(cmd) => self.serve_commands(cmd),
                        Err(mpsc::error::TryRecvError::Empty) => None,
                        Err(mpsc::error::TryRecvError::Disconnected) => Some(None),
                    }
                }
                Some(ev) = self.tcp_rx.recv() => {
                    self.serve_tcp(ev);
                    match self.rx.try_recv() {
                        Ok(cmd) => self.serve_commands(cmd),
                        Err(mpsc::error::TryRecvError::Empty) => None,
                        Err(mpsc::error::TryRecvError::Disconnected) => Some(None),
                    }
                }
                res = accept(self.listener.as_ref(), self.accept_after) => {
                    self.accept_after = None;
                    match res {
                        Ok((stream, peer)) => self.accept_tcp(stream, peer),
                        Err(e) => {
                            debug!("tcp accept error: {e}");
                            self.accept_after = Some(tokio::time::Instant::now() + ACCEPT_BACKOFF);
                        }
                    }
                    None
                }
                _ = sleep => {
                    let now = Instant::now();
                    self.sfu.handle_timeout(now);
                    for peer in self.sfu.transmit().tcp.expire(now) {
                        debug!(%peer, "ICE-TCP connection closed: no valid STUN in time");
                        self.sfu.tcp_closed(peer);
                    }
                    None
                }
            };
            if let Some(done) = stop {
                self.sfu.shutdown(Instant::now());
                self.sfu.end_turn(Instant::now());
                self.sfu.transmit().flush();
                self.sfu.transmit().tcp.close_all();
                if let Some(done) = done {
                    let _ = done.send(());
                }
                return;
            }
            self.end_turn();
        }
    }

    /// End the core's turn; tell it what the pipe dropped (it asks for keyframes: another,
    /// short turn) and hand the datagrams to the kernel.
    fn end_turn(&mut self) {
        let now = Instant::now();
        self.sfu.end_turn(now);
        let dropped = std::mem::take(&mut self.sfu.transmit().pipes.dropped);
        if !dropped.is_empty() {
            for (to, msgs) in dropped {
                self.sfu.pipe_dropped(now, to, msgs);
            }
            self.sfu.end_turn(now);
        }
        self.sfu.transmit().flush();
    }

    /// Pipe batches already queued (what the other shards said first), up to a bound.
    fn serve_pipes(&mut self) {
        for _ in 1..PIPE_BATCHES_PER_TURN {
            let b = match self.control_rx.try_recv() {
                Ok(b) => b,
                Err(_) => match self.media_rx.try_recv() {
                    Ok(b) => b,
                    Err(_) => break,
                },
            };
            self.sfu.handle_pipe(Instant::now(), b.from, b.msgs);
        }
    }

    /// Handle `first` and up to `commands_per_turn - 1` more commands that are already
    /// queued. `Some(done)`: a shutdown was asked for (`done` is `None` when every sender is
    /// gone).
    fn serve_commands(&mut self, first: Command) -> Option<Option<oneshot::Sender<()>>> {
        let now = Instant::now();
        let mut cmd = first;
        for _ in 1..self.sfu.limits().commands_per_turn.max(1) {
            if let Flow::Stop(done) = self.sfu.handle_command(now, cmd) {
                return Some(done);
            }
            cmd = match self.rx.try_recv() {
                Ok(c) => c,
                Err(mpsc::error::TryRecvError::Empty) => return None,
                Err(mpsc::error::TryRecvError::Disconnected) => return Some(None),
            };
        }
        if let Flow::Stop(done) = self.sfu.handle_command(now, cmd) {
            return Some(done);
        }
        if !self.rx.is_empty() {
            // More are waiting: they wait until the media socket has been served.
            self.sfu.note_commands_deferred();
        }
        None
    }

    /// A new ICE-TCP connection: the core learns that what comes from `peer` is TCP.
    fn accept_tcp(&mut self, stream: TcpStream, peer: SocketAddr) {
        let local = match stream.local_addr() {
            Ok(a) => a,
            Err(_) => return,
        };
        let now = Instant::now();
        if self
            .sfu
            .transmit()
            .tcp
            .accept(stream, peer, &self.tcp_tx, now)
        {
            self.sfu.tcp_opened(peer, local);
        } else {
            debug!(%peer, "ICE-TCP connection refused");
        }
    }

    /// `first` and up to one batch more of the frames and closes already queued.
    fn serve_tcp(&mut self, first: TcpEvent) {
        self.serve_tcp_event(first);
        for _ in 1..RECV_BATCH {
            match self.tcp_rx.try_recv() {
                Ok(ev) => self.serve_tcp_event(ev),
                Err(_) => break,
            }
        }
    }

    fn serve_tcp_event(&mut self, ev: TcpEvent) {
        match ev {
            TcpEvent::Frame { peer, data, read } => {
                // Frames still queued from a connection closed since are dropped.
                if !self.sfu.transmit().tcp.count_frame_in(peer) {
                    return;
                }
                self.sfu.handle_tcp_frame(Instant::now(), read, peer, &data);
            }
            TcpEvent::Closed { peer, id, why } => {
                if self.sfu.transmit().tcp.closed(peer, id, why) {
                    debug!(%peer, ?why, "ICE-TCP connection closed");
                    self.sfu.tcp_closed(peer);
                }
            }
        }
    }

    /// Datagrams already queued on the socket, up to one batch, each handed to the core with
    /// the time the kernel received it.
    fn serve_datagrams(&mut self) {
        match self.batch.recv(&self.sfu.transmit().socket, RECV_BATCH) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
            Err(e) => {
                debug!("udp recv error: {e}");
                return;
            }
        }
        let clocks = Clocks {
            now: Instant::now(),
            wall: SystemTime::now(),
        };
        for d in self.batch.datagrams() {
            let received = clocks.received(d.stamp);
            self.sfu
                .handle_datagram(clocks.now, received, d.from, d.data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The media socket sends with DF set and without the path-MTU cache; an IPv6 socket is
    /// left alone.
    #[test]
    #[allow(unsafe_code)] // getsockopt(2) to read the option back
    fn media_datagrams_are_sent_unfragmented() {
        use std::os::fd::AsRawFd;
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        set_dont_fragment(&s).unwrap();
        let mut v: libc::c_int = -1;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: valid socket; `v` and `len` are valid for writes of a c_int.
        let rc = unsafe {
            libc::getsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_MTU_DISCOVER,
                &mut v as *mut libc::c_int as *mut libc::c_void,
                &mut len,
            )
        };
        assert_eq!((rc, v), (0, libc::IP_PMTUDISC_PROBE));
        // Datagrams still leave (no EMSGSIZE below the interface MTU).
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(
            s.send_to(&[7u8; 1400], rx.local_addr().unwrap()).unwrap(),
            1400
        );
        let v6 = std::net::UdpSocket::bind("[::1]:0").unwrap();
        set_dont_fragment(&v6).unwrap();
    }

    /// `--pin-shards`: shard i gets the i-th allowed CPU, wrapping around, and a pinned
    /// thread runs on that CPU only.
    #[test]
    fn shards_are_pinned_to_the_allowed_cpus_in_turn() {
        assert_eq!(shard_cpu(&[], 0), None);
        let allowed = [2, 5, 7];
        let placed: Vec<_> = (0..5).map(|i| shard_cpu(&allowed, i)).collect();
        assert_eq!(placed, [Some(2), Some(5), Some(7), Some(2), Some(5)]);

        let mine = allowed_cpus();
        assert!(!mine.is_empty(), "the kernel reports this process's CPUs");
        let last = *mine.last().unwrap();
        let seen = std::thread::spawn(move || {
            pin_current_thread(last).unwrap();
            allowed_cpus()
        })
        .join()
        .unwrap();
        assert_eq!(seen, [last]);
        assert!(pin_current_thread(libc::CPU_SETSIZE as usize).is_err());
    }
}
