//! ICE over TCP (RFC 6544 passive candidates, RFC 4571 framing): the server's offers carry a
//! `tcptype passive` candidate after each UDP one; a webrtc-rs peer that has no UDP at all
//! connects over TCP and receives media; the TCP port refuses what is not ICE.

// A test, not the packet path: shares state between tasks and times deadlines with the clock;
// its hand-built webrtc-rs peer is awaited in place; it prints what it measured.
#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    clippy::large_futures,
    clippy::print_stdout
)]

use plaza_testkit::{self as common, support};

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use common::peer::{HandlerFuture, done};
use plaza::config::TcpPort;
use plaza::signal::{ClientMessage, IceCandidate, PcTarget, ServerMessage, TrackKind};
use serde_json::Value;
use support::{RawWs, Received, T, TestServer, publisher, test_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceCandidateInit, RTCPeerConnectionState, RTCSessionDescription,
    Registry, SettingEngineBuilder, register_default_interceptors,
};

/// A candidate line of an SDP, parsed: (transport, priority, address, type, tcptype).
#[derive(Debug, Clone, PartialEq)]
struct Cand {
    line: String,
    transport: String,
    priority: u32,
    addr: SocketAddr,
    typ: String,
    tcptype: Option<String>,
}

fn candidates(sdp: &str) -> Vec<Cand> {
    sdp.lines()
        .filter_map(|l| l.trim().strip_prefix("a=candidate:"))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let at = |k: &str| {
                f.iter()
                    .position(|x| *x == k)
                    .and_then(|i| f.get(i + 1))
                    .map(|s| s.to_string())
            };
            Cand {
                line: format!("candidate:{l}"),
                transport: f[2].to_ascii_lowercase(),
                priority: f[3].parse().unwrap(),
                addr: SocketAddr::new(f[4].parse().unwrap(), f[5].parse().unwrap()),
                typ: at("typ").unwrap_or_default(),
                tcptype: at("tcptype"),
            }
        })
        .collect()
}

/// The first subscriber offer after joining `room` as `name` on a raw signaling connection.
async fn first_offer(server: &TestServer, room: &str, name: &str) -> Result<(RawWs, String)> {
    let mut ws = RawWs::connect(&server.ws_url()).await?;
    ws.join(room, name).await?;
    let offer = ws
        .recv_until("subscribe_offer", |m| {
            matches!(m, ServerMessage::SubscribeOffer { .. })
        })
        .await?;
    let ServerMessage::SubscribeOffer { sdp } = offer else {
        unreachable!()
    };
    Ok((ws, sdp))
}

/// The server's ICE-TCP candidate of an offer (asserting the layout: one UDP host candidate,
/// then a TCP passive one on the same IP with a lower priority).
fn tcp_candidate(sdp: &str) -> Cand {
    let c = candidates(sdp);
    // `rtc` writes each candidate for components 1 and 2 (RTP, RTCP; both muxed).
    let mut in_first_section: Vec<Cand> = c
        .iter()
        .filter(|c| c.line.split_whitespace().nth(1) == Some("1"))
        .cloned()
        .collect();
    in_first_section.truncate(2);
    assert_eq!(
        in_first_section.len(),
        2,
        "a UDP and a TCP candidate: {c:?}"
    );
    let (udp, tcp) = (&in_first_section[0], &in_first_section[1]);
    assert_eq!((udp.transport.as_str(), udp.typ.as_str()), ("udp", "host"));
    assert_eq!(
        (
            tcp.transport.as_str(),
            tcp.typ.as_str(),
            tcp.tcptype.as_deref()
        ),
        ("tcp", "host", Some("passive")),
        "{c:#?}"
    );
    assert_eq!(udp.addr.ip(), tcp.addr.ip());
    assert_ne!(tcp.addr.port(), 0);
    assert!(
        tcp.priority < udp.priority,
        "TCP must rank below UDP: {} vs {}",
        tcp.priority,
        udp.priority
    );
    tcp.clone()
}

async fn ice_tcp_stats(server: &TestServer) -> Value {
    let (status, body) = server.healthz().await.expect("healthz");
    assert_eq!(status, 200, "{body}");
    body["ice_tcp"].clone()
}

struct TcpPeerHandler {
    state: watch::Sender<RTCPeerConnectionState>,
    packets: watch::Sender<u64>,
}

// `PeerConnectionEventHandler` is declared with `#[async_trait]`; this is its expansion.
impl PeerConnectionEventHandler for TcpPeerHandler {
    fn on_connection_state_change<'life0, 'async_trait>(
        &'life0 self,
        state: RTCPeerConnectionState,
    ) -> HandlerFuture<'async_trait>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let _ = self.state.send(state);
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
        let packets = self.packets.clone();
        tokio::spawn(async move {
            while let Some(ev) = track.poll().await {
                match ev {
                    TrackRemoteEvent::OnRtpPacket(_) => packets.send_modify(|n| *n += 1),
                    TrackRemoteEvent::OnEnded => break,
                    _ => {}
                }
            }
        });
        done()
    }
}

/// A webrtc-rs peer connection with no UDP at all: ICE on TCP only (an active candidate).
async fn tcp_only_pc(handler: Arc<TcpPeerHandler>) -> Result<Arc<dyn PeerConnection>> {
    let mut media = MediaEngine::default();
    media
        .register_default_codecs()
        .map_err(|e| anyhow!("codecs: {e}"))?;
    let registry = register_default_interceptors(Registry::new(), &mut media)
        .map_err(|e| anyhow!("interceptors: {e}"))?;
    let settings = SettingEngineBuilder::new()
        .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
        .with_network_types(vec![rtc::ice::network_type::NetworkType::Tcp4])
        .build();
    let pc = PeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(media)
        .with_setting_engine(settings)
        .with_interceptor_registry(registry)
        .with_handler(handler)
        .with_tcp_addrs(vec!["127.0.0.1:0".to_owned()])
        .with_udp_addrs(Vec::<String>::new())
        .build();
    let pc = tokio::time::timeout(T, Box::pin(pc))
        .await
        .map_err(|_| anyhow!("build timed out"))?
        .map_err(|e| anyhow!("build: {e}"))?;
    Ok(Arc::new(pc))
}

/// Answer a subscriber offer; the first time, also dial the server's TCP candidates (webrtc-rs
/// connects to a passive candidate when it is added as a remote candidate).
async fn answer(pc: &Arc<dyn PeerConnection>, ws: &mut RawWs, sdp: &str, dial: bool) -> Result<()> {
    let offer = RTCSessionDescription::offer(sdp.to_owned()).map_err(|e| anyhow!("{e}"))?;
    pc.set_remote_description(offer)
        .await
        .map_err(|e| anyhow!("set_remote_description: {e}"))?;
    if dial {
        // One connection per address (`rtc` writes each candidate for components 1 and 2).
        let mut dialled = Vec::new();
        for c in candidates(sdp).into_iter().filter(|c| c.transport == "tcp") {
            if dialled.contains(&c.addr) {
                continue;
            }
            dialled.push(c.addr);
            pc.add_ice_candidate(RTCIceCandidateInit {
                candidate: c.line,
                sdp_mid: Some("0".to_owned()),
                sdp_mline_index: Some(0),
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow!("add_ice_candidate: {e}"))?;
        }
    }
    let answer = pc
        .create_answer(None)
        .await
        .map_err(|e| anyhow!("create_answer: {e}"))?;
    pc.set_local_description(answer.clone())
        .await
        .map_err(|e| anyhow!("set_local_description: {e}"))?;
    ws.send_msg(&ClientMessage::SubscribeAnswer { sdp: answer.sdp })
        .await
}

/// A subscriber whose UDP does not exist connects over ICE-TCP and receives a publisher's
/// media; the server counts the TCP frames both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webrtc_rs_subscriber_over_tcp_only() -> Result<()> {
    tcp_only_subscriber("bound to 127.0.0.1", test_config()).await
}

/// The same with the media sockets bound to 0.0.0.0 and 127.0.0.1 announced (as in Docker):
/// datagrams on the UDP socket (the publisher's) and on the TCP connection (the subscriber's)
/// reach `rtc`'s ICE agent with the announced candidate's address, or it discards them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webrtc_rs_subscriber_over_tcp_with_unspecified_bind() -> Result<()> {
    let config = plaza::config::Config {
        udp_bind: "0.0.0.0".parse().unwrap(),
        announce_ips: vec!["127.0.0.1".parse().unwrap()],
        ..test_config()
    };
    tcp_only_subscriber("bound to 0.0.0.0", config).await
}

async fn tcp_only_subscriber(what: &str, config: plaza::config::Config) -> Result<()> {
    let server = TestServer::start_with(config).await;
    let room = "ice-tcp";
    let publisher = publisher(&server, room, "pub").await;
    publisher
        .wait_for_sent_packets(TrackKind::Video, 10, T)
        .await
        .context("the publisher sends")?;

    let started = Instant::now();
    let (mut ws, sdp) = first_offer(&server, room, "tcp-viewer").await?;
    let tcp = tcp_candidate(&sdp);
    let (state_tx, mut state) = watch::channel(RTCPeerConnectionState::New);
    let (packets_tx, mut packets) = watch::channel(0u64);
    let pc = tcp_only_pc(Arc::new(TcpPeerHandler {
        state: state_tx,
        packets: packets_tx,
    }))
    .await?;
    answer(&pc, &mut ws, &sdp, true).await?;

    // Serve the signaling (renegotiations, trickled candidates) until media has arrived.
    let mut connected_after = None;
    let deadline = tokio::time::Instant::now() + T;
    loop {
        tokio::select! {
            msg = ws.recv() => match msg? {
                Received::Msg(ServerMessage::SubscribeOffer { sdp }) => {
                    answer(&pc, &mut ws, &sdp, false).await?;
                }
                Received::Msg(ServerMessage::Trickle { target: PcTarget::Subscriber, candidate }) => {
                    let IceCandidate { candidate, sdp_mid, sdp_mline_index, username_fragment } =
                        candidate;
                    if !candidate.is_empty() {
                        pc.add_ice_candidate(RTCIceCandidateInit {
                            candidate, sdp_mid, sdp_mline_index, username_fragment,
                            ..Default::default()
                        })
                        .await
                        .map_err(|e| anyhow!("add_ice_candidate: {e}"))?;
                    }
                }
                Received::Msg(_) => {}
                Received::Closed(c) => bail!("signaling closed: {c:?}"),
            },
            Ok(_) = state.changed() => {
                let s = *state.borrow();
                if s == RTCPeerConnectionState::Connected && connected_after.is_none() {
                    connected_after = Some(started.elapsed());
                }
                if s == RTCPeerConnectionState::Failed {
                    bail!("the TCP-only peer connection failed");
                }
            }
            Ok(_) = packets.changed() => {
                if *packets.borrow() >= 50 {
                    break;
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                bail!(
                    "no media over TCP in {T:?}: state {:?}, {} packets, server {}",
                    *state.borrow(),
                    *packets.borrow(),
                    ice_tcp_stats(&server).await
                );
            }
        }
    }
    let media_after = started.elapsed();
    eprintln!(
        "ICE-TCP ({what}): join → connected {:?}, → 50 RTP packets {media_after:?}",
        connected_after.unwrap_or(media_after)
    );

    let stats = ice_tcp_stats(&server).await;
    assert_eq!(stats["open"], 1, "{stats}");
    assert_eq!(stats["accepted"], 1, "{stats}");
    assert!(stats["frames_in"].as_u64().unwrap() > 5, "{stats}");
    assert!(stats["frames_out"].as_u64().unwrap() > 50, "{stats}");
    assert_eq!(stats["closed_no_stun"], 0, "{stats}");
    assert!(tcp.addr.ip().is_loopback(), "{tcp:?}");

    // The peer leaves: its TCP connection closes and the server forgets it.
    pc.close().await.map_err(|e| anyhow!("close: {e}"))?;
    ws.close().await;
    server
        .wait_healthz(
            "the TCP connection closed",
            |b| b["ice_tcp"]["open"] == 0,
            T,
        )
        .await?;
    publisher.leave().await?;
    server.shutdown().await;
    Ok(())
}

/// A UDP client and an ICE-TCP connection from the same address (the kernel, and NATs,
/// number UDP and TCP ports apart, so they can coincide): each is answered over its own
/// transport. While a TCP connection from a UDP viewer's very address is open, the viewer's
/// media goes on over UDP and nothing of it goes down the connection, which the server closes
/// once the STUN timeout is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_connection_from_a_udp_viewers_address_takes_none_of_its_media() -> Result<()> {
    use plaza_testkit::lightviewer::{LightOptions, LightViewer};
    let server = TestServer::start().await;
    let room = "ice-tcp-same-address";
    let host = publisher(&server, room, "host").await;
    let viewer = LightViewer::connect(
        &server.ws_url(),
        room,
        "viewer",
        LightOptions {
            timeout: T,
            ..Default::default()
        },
    )
    .await?;
    viewer.wait_for_streams(2, T).await?;
    // The room's shard's TCP port, from an offer to a participant of the same room.
    let (probe, sdp) = first_offer(&server, room, "probe").await?;
    let tcp = tcp_candidate(&sdp).addr;
    let accepted = ice_tcp_stats(&server).await["accepted"].as_u64().unwrap();
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(viewer.local_addr())?;
    let mut conn = socket.connect(tcp).await?;
    let opened = Instant::now();
    server
        .wait_healthz(
            "the TCP connection accepted",
            |b| b["ice_tcp"]["accepted"].as_u64() > Some(accepted),
            T,
        )
        .await?;
    let from = viewer.stats.received();
    let deadline = Instant::now() + T;
    while viewer.stats.received() < from + 200 {
        assert!(
            Instant::now() < deadline,
            "the viewer's media stopped when a TCP connection from its address opened: {} packets in {T:?}",
            viewer.stats.received() - from
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    closed_within(&mut conn, Duration::from_secs(15)).await?;
    println!(
        "200 more packets over UDP; the TCP connection from the same address got nothing and was closed {} ms after it opened",
        opened.elapsed().as_millis()
    );
    probe.close().await;
    viewer.leave().await;
    host.leave().await?;
    server.shutdown().await;
    Ok(())
}

/// Reads until EOF or reset; how long it took. Bounded by `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> Result<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 256];
    match tokio::time::timeout_at((started + within).into(), stream.read(&mut buf)).await {
        Err(_) => bail!("the connection stayed open for {within:?}"),
        Ok(Ok(0) | Err(_)) => Ok(started.elapsed()),
        Ok(Ok(_)) => bail!("the server sent something to a client that is not ICE"),
    }
}

/// A framed STUN Binding request without valid credentials (an unknown USERNAME).
fn bogus_binding_request() -> Vec<u8> {
    let username = b"nobody:nothing!!"; // 16 bytes: no padding needed
    let mut msg = vec![0x00, 0x01];
    msg.extend_from_slice(&(4 + username.len() as u16).to_be_bytes());
    msg.extend_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
    msg.extend_from_slice(&[7u8; 12]);
    msg.extend_from_slice(&[0x00, 0x06]);
    msg.extend_from_slice(&(username.len() as u16).to_be_bytes());
    msg.extend_from_slice(username);
    let mut framed = (msg.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&msg);
    framed
}

/// What is not ICE is closed: a length prefix over the limit at once, a first frame that is
/// not STUN at once, silence or STUN nobody answers after the STUN timeout; garbage never
/// hurts the server (a real client still joins afterwards).
#[tokio::test]
async fn tcp_port_closes_what_is_not_ice() -> Result<()> {
    let server = TestServer::start().await;
    let (ws, sdp) = first_offer(&server, "ice-tcp-bad", "probe").await?;
    let addr = tcp_candidate(&sdp).addr;

    // An oversize length prefix.
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(&[0xff, 0xff, 1, 2, 3]).await?;
    closed_within(&mut s, Duration::from_secs(2)).await?;

    // A first frame that is not STUN (a DTLS-looking record).
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(&[0, 4, 22, 254, 253, 0]).await?;
    closed_within(&mut s, Duration::from_secs(2)).await?;

    // Silence, and a well-formed STUN request with credentials nobody has: closed once the
    // STUN timeout (5 s) is over, not before.
    let mut silent = TcpStream::connect(addr).await?;
    let mut bogus = TcpStream::connect(addr).await?;
    bogus.write_all(&bogus_binding_request()).await?;
    let (a, b) = tokio::join!(
        closed_within(&mut silent, Duration::from_secs(15)),
        closed_within(&mut bogus, Duration::from_secs(15)),
    );
    for took in [a?, b?] {
        assert!(
            (Duration::from_secs(4)..Duration::from_secs(12)).contains(&took),
            "closed after {took:?}"
        );
    }
    let stats = ice_tcp_stats(&server).await;
    assert_eq!(stats["accepted"], 4, "{stats}");
    assert_eq!(stats["closed_oversize"], 1, "{stats}");
    assert_eq!(stats["closed_no_stun"], 3, "{stats}");
    assert_eq!(stats["open"], 0, "{stats}");
    assert_eq!(stats["frames_out"], 0, "{stats}");

    // Random bytes on many connections at once: no panic, the server still serves.
    let mut x: u32 = 0x9e37_79b9;
    let mut conns = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(addr).await?;
        let junk: Vec<u8> = (0..3000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let _ = s.write_all(&junk).await;
        conns.push(s);
    }
    for mut s in conns {
        closed_within(&mut s, Duration::from_secs(15)).await?;
    }
    ws.close().await;
    let (_ws2, sdp2) = first_offer(&server, "ice-tcp-bad", "after").await?;
    tcp_candidate(&sdp2);
    server.shutdown().await;
    Ok(())
}

/// `--tcp-port off`: no TCP candidate in the offers, nothing listening.
#[tokio::test]
async fn tcp_off_announces_nothing() -> Result<()> {
    let server = TestServer::start_with(plaza::config::Config {
        tcp_port: TcpPort::Off,
        ..test_config()
    })
    .await;
    let (ws, sdp) = first_offer(&server, "no-tcp", "udp-only").await?;
    let c = candidates(&sdp);
    assert!(!c.is_empty());
    assert!(c.iter().all(|c| c.transport == "udp"), "{c:?}");
    assert_eq!(ice_tcp_stats(&server).await["accepted"], 0);
    ws.close().await;
    server.shutdown().await;
    Ok(())
}
