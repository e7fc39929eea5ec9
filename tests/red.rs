//! Redundant audio (RFC 2198 `audio/red`) end to end: a real server and hand-built webrtc-rs
//! peers over loopback. A publisher offers Opus and RED in Chromium's order and sends RED
//! packets built here (two redundant blocks each, a malformed one now and then); a subscriber
//! with RED receives them as RED, byte for byte, and one without RED receives each packet's
//! primary block as plain Opus.

// A test, not the packet path: shares state between tasks and times deadlines with the clock;
// its hand-built webrtc-rs peers are awaited in place.
#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    clippy::large_futures
)]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use plaza::sfu::red;
use plaza::signal::{ClientMessage, IceCandidate, PcTarget, ServerMessage, TrackInfo, TrackKind};
use plaza_testkit::support::{self, RawWs, Received, T, TestServer};
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::configuration::media_engine::MIME_TYPE_OPUS;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodecParameters, RTCRtpCodingParameters, RTCRtpEncodingParameters,
    RtpCodecKind,
};
use tokio::sync::{mpsc, watch};
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceCandidateInit, RTCPeerConnectionIceEvent,
    RTCPeerConnectionState, RTCSessionDescription, Registry, SettingEngineBuilder,
    register_default_interceptors,
};

/// Samples per 20 ms Opus frame at 48 kHz: the timestamp step, and a redundant block's offset.
const FRAME: u32 = 960;
const RED_PT: u8 = 63;
const OPUS_PT: u8 = 111;
/// Every this many packets the publisher sends a malformed RED payload.
const MALFORMED_EVERY: u32 = 25;

/// One received packet.
#[derive(Debug, Clone)]
struct Got {
    track: String,
    pt: u8,
    seq: u16,
    ts: u32,
    payload: Bytes,
}

type HandlerFuture<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

struct Handler {
    candidates: mpsc::UnboundedSender<String>,
    state: watch::Sender<RTCPeerConnectionState>,
    packets: Arc<Mutex<Vec<Got>>>,
}

// `PeerConnectionEventHandler` is an `#[async_trait]`; its expansion written out.
impl PeerConnectionEventHandler for Handler {
    fn on_ice_candidate<'l, 'a>(&'l self, e: RTCPeerConnectionIceEvent) -> HandlerFuture<'a>
    where
        'l: 'a,
        Self: 'a,
    {
        if let Ok(init) = e.candidate.to_json() {
            let _ = self.candidates.send(init.candidate);
        }
        Box::pin(std::future::ready(()))
    }

    fn on_connection_state_change<'l, 'a>(
        &'l self,
        state: RTCPeerConnectionState,
    ) -> HandlerFuture<'a>
    where
        'l: 'a,
        Self: 'a,
    {
        let _ = self.state.send(state);
        Box::pin(std::future::ready(()))
    }

    fn on_track<'l, 'a>(&'l self, track: Arc<dyn TrackRemote>) -> HandlerFuture<'a>
    where
        'l: 'a,
        Self: 'a,
    {
        let packets = self.packets.clone();
        tokio::spawn(async move {
            let id = track.track_id().await;
            while let Some(ev) = track.poll().await {
                match ev {
                    TrackRemoteEvent::OnRtpPacket(p) => packets.lock().unwrap().push(Got {
                        track: id.clone(),
                        pt: p.header.payload_type,
                        seq: p.header.sequence_number,
                        ts: p.header.timestamp,
                        payload: p.payload.clone(),
                    }),
                    TrackRemoteEvent::OnEnded => break,
                    _ => {}
                }
            }
        });
        Box::pin(std::future::ready(()))
    }
}

fn codec(pt: u8, mime: &str, fmtp: &str) -> RTCRtpCodecParameters {
    RTCRtpCodecParameters {
        rtp_codec: RTCRtpCodec {
            mime_type: mime.to_owned(),
            clock_rate: 48_000,
            channels: 2,
            sdp_fmtp_line: fmtp.to_owned(),
            rtcp_feedback: vec![],
        },
        payload_type: pt,
    }
}

/// Opus, then (with `red`) RED: the codecs and the order Chromium offers.
fn media_engine(red: bool) -> MediaEngine {
    let mut me = MediaEngine::default();
    me.register_codec(
        codec(OPUS_PT, MIME_TYPE_OPUS, "minptime=10;useinbandfec=1"),
        RtpCodecKind::Audio,
    )
    .unwrap();
    if red {
        me.register_codec(
            codec(RED_PT, red::MIME_TYPE_RED, "111/111"),
            RtpCodecKind::Audio,
        )
        .unwrap();
    }
    me
}

/// A participant with one peer connection: the publisher one or the subscriber one.
struct Client {
    ws: RawWs,
    pc: Arc<dyn PeerConnection>,
    target: PcTarget,
    candidates: mpsc::UnboundedReceiver<String>,
    state: watch::Receiver<RTCPeerConnectionState>,
    packets: Arc<Mutex<Vec<Got>>>,
    /// Server candidates trickled before the remote description was applied.
    held: Vec<IceCandidate>,
    has_remote: bool,
    sent_candidates: bool,
}

impl Client {
    async fn join(url: &str, room: &str, name: &str, red: bool, target: PcTarget) -> Client {
        let mut ws = RawWs::connect(url).await.unwrap();
        ws.send_msg(&ClientMessage::Join {
            room: room.into(),
            name: name.into(),
            token: Some(plaza_testkit::token::participant(room, name)),
            protocol: None,
            auto_subscribe: Some(false),
            timeline_events: None,
        })
        .await
        .unwrap();
        ws.recv_until("joined", |m| matches!(m, ServerMessage::Joined { .. }))
            .await
            .unwrap();
        let mut me = media_engine(red);
        let registry = register_default_interceptors(Registry::new(), &mut me).unwrap();
        let (ctx, candidates) = mpsc::unbounded_channel();
        let (stx, state) = watch::channel(RTCPeerConnectionState::New);
        let packets = Arc::new(Mutex::new(Vec::new()));
        let handler = Arc::new(Handler {
            candidates: ctx,
            state: stx,
            packets: packets.clone(),
        });
        let pc = PeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_media_engine(me)
            .with_setting_engine(
                SettingEngineBuilder::new()
                    .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
                    .build(),
            )
            .with_interceptor_registry(registry)
            .with_handler(handler)
            .with_udp_addrs(vec!["127.0.0.1:0".to_owned()])
            .build()
            .await
            .unwrap();
        Client {
            ws,
            pc: Arc::new(pc),
            target,
            candidates,
            state,
            packets,
            held: Vec::new(),
            has_remote: false,
            sent_candidates: false,
        }
    }

    /// Reads signaling until a message `pred` accepts, applying the server's candidates for
    /// this client's connection on the way.
    async fn recv(&mut self, what: &str, pred: impl Fn(&ServerMessage) -> bool) -> ServerMessage {
        loop {
            let m = match tokio::time::timeout(T, self.ws.recv()).await {
                Ok(Ok(Received::Msg(m))) => m,
                other => panic!("waiting for {what}: {other:?}"),
            };
            if let ServerMessage::Trickle { target, candidate } = &m {
                if *target == self.target {
                    self.held.push(candidate.clone());
                    self.add_held().await;
                }
            }
            if pred(&m) {
                return m;
            }
        }
    }

    async fn add_held(&mut self) {
        if !self.has_remote {
            return;
        }
        for c in self.held.drain(..) {
            if !c.candidate.is_empty() {
                let _ = self
                    .pc
                    .add_ice_candidate(RTCIceCandidateInit {
                        candidate: c.candidate,
                        sdp_mid: c.sdp_mid,
                        sdp_mline_index: c.sdp_mline_index,
                        username_fragment: c.username_fragment,
                        ..Default::default()
                    })
                    .await;
            }
        }
    }

    /// Sends this connection's candidates (the first time) and waits until it is connected.
    async fn connect(&mut self) {
        if !self.sent_candidates {
            self.sent_candidates = true;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
            while let Ok(Some(c)) = tokio::time::timeout_at(deadline, self.candidates.recv()).await
            {
                self.ws
                    .send_msg(&ClientMessage::Trickle {
                        target: self.target,
                        candidate: IceCandidate {
                            candidate: c,
                            sdp_mid: Some("0".into()),
                            sdp_mline_index: Some(0),
                            username_fragment: None,
                        },
                    })
                    .await
                    .unwrap();
                if *self.state.borrow() == RTCPeerConnectionState::Connected {
                    break;
                }
            }
        }
        tokio::time::timeout(
            T,
            self.state
                .wait_for(|s| *s == RTCPeerConnectionState::Connected),
        )
        .await
        .expect("connects")
        .unwrap();
    }

    /// Applies a subscriber offer and sends the answer.
    async fn answer(&mut self, offer: String) -> String {
        let offer = RTCSessionDescription::offer(offer).unwrap();
        self.pc.set_remote_description(offer).await.unwrap();
        self.has_remote = true;
        self.add_held().await;
        let answer = self.pc.create_answer(None).await.unwrap();
        self.pc.set_local_description(answer.clone()).await.unwrap();
        self.ws
            .send_msg(&ClientMessage::SubscribeAnswer {
                sdp: answer.sdp.clone(),
            })
            .await
            .unwrap();
        answer.sdp
    }

    async fn next_offer(&mut self) -> String {
        match self
            .recv("subscribe_offer", |m| {
                matches!(m, ServerMessage::SubscribeOffer { .. })
            })
            .await
        {
            ServerMessage::SubscribeOffer { sdp } => sdp,
            _ => unreachable!(),
        }
    }

    /// The subscriber connection: the first offer (data channels) answered, connected.
    async fn start_subscriber(&mut self) {
        let offer = self.next_offer().await;
        self.answer(offer).await;
        self.connect().await;
    }

    /// Subscribes to `track` and answers offers until one carries it: that offer.
    async fn subscribe(&mut self, track: &str) -> String {
        self.ws
            .send_msg(&ClientMessage::Subscribe {
                track_ids: vec![track.to_owned()],
                subscribe: true,
            })
            .await
            .unwrap();
        loop {
            let offer = self.next_offer().await;
            self.answer(offer.clone()).await;
            if offer.contains(track) {
                return offer;
            }
        }
    }

    /// Adds an audio track whose encoding names no codec, so its section offers every
    /// registered codec (Opus and RED, in that order, as Chromium does); publishes it; returns
    /// the track and the server's answer.
    async fn publish_audio(&mut self, ssrc: u32) -> (Arc<TrackLocalStaticRTP>, String) {
        let track = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
            "red-stream".to_owned(),
            "red-audio".to_owned(),
            "red audio".to_owned(),
            RtpCodecKind::Audio,
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(ssrc),
                    ..Default::default()
                },
                ..Default::default()
            }],
        )));
        self.pc
            .add_track(track.clone() as Arc<dyn TrackLocal>)
            .await
            .unwrap();
        let offer = self.pc.create_offer(None).await.unwrap();
        self.pc.set_local_description(offer.clone()).await.unwrap();
        self.ws
            .send_msg(&ClientMessage::PublishOffer { sdp: offer.sdp })
            .await
            .unwrap();
        let answer = match self
            .recv("publish_answer", |m| {
                matches!(m, ServerMessage::PublishAnswer { .. })
            })
            .await
        {
            ServerMessage::PublishAnswer { sdp } => sdp,
            _ => unreachable!(),
        };
        self.pc
            .set_remote_description(RTCSessionDescription::answer(answer.clone()).unwrap())
            .await
            .unwrap();
        self.has_remote = true;
        self.add_held().await;
        self.connect().await;
        (track, answer)
    }

    async fn track_published(&mut self) -> TrackInfo {
        match self
            .recv("track_published", |m| {
                matches!(m, ServerMessage::TrackPublished { .. })
            })
            .await
        {
            ServerMessage::TrackPublished { track } => track,
            _ => unreachable!(),
        }
    }

    fn packets_of(&self, track: &str) -> Vec<Got> {
        self.packets
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.track == track)
            .cloned()
            .collect()
    }

    /// Waits (polling: the recorder has no notification) until `n` packets of `track` arrived.
    async fn wait_packets(&self, track: &str, n: usize) -> Vec<Got> {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            let got = self.packets_of(track);
            if got.len() >= n {
                return got;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{n} packets of {track} (got {})",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.pc.close()).await;
        self.ws.close().await;
    }
}

/// The primary block of packet `i`: its number, then filler of a length that varies.
fn frame(i: u32) -> Vec<u8> {
    let mut f = vec![b'P'];
    f.extend_from_slice(&i.to_be_bytes());
    f.extend(std::iter::repeat_n((i % 251) as u8, 20 + (i % 40) as usize));
    f
}

/// The number of the frame `data` is (None: not a frame).
fn frame_number(data: &[u8]) -> Option<u32> {
    let i = u32::from_be_bytes(data.get(1..5)?.try_into().ok()?);
    (data == frame(i).as_slice()).then_some(i)
}

/// Packet `i` as Chromium's RED encoder would write it: the two previous frames as redundant
/// blocks (oldest first), then frame `i`; every `MALFORMED_EVERY`th a truncated header.
fn red_payload(i: u32) -> Vec<u8> {
    if i % MALFORMED_EVERY == MALFORMED_EVERY - 1 {
        return vec![0x80 | OPUS_PT, 0, 0];
    }
    let older: Vec<(u8, u16, Vec<u8>)> = (1..=2u32)
        .rev()
        .filter(|&k| i >= k)
        .map(|k| (OPUS_PT, (k * FRAME) as u16, frame(i - k)))
        .collect();
    let refs: Vec<(u8, u16, &[u8])> = older
        .iter()
        .map(|(pt, off, d)| (*pt, *off, d.as_slice()))
        .collect();
    red::build(&refs, OPUS_PT, &frame(i))
}

/// Sends RED packets every 10 ms until `stop`.
fn spawn_sender(track: Arc<TrackLocalStaticRTP>, ssrc: u32, stop: Arc<AtomicBool>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let mut i: u32 = 0;
        while !stop.load(Ordering::Relaxed) && i < 6000 {
            tick.tick().await;
            let packet = rtc::rtp::Packet {
                header: rtc::rtp::header::Header {
                    version: 2,
                    payload_type: RED_PT,
                    sequence_number: (1000 + i) as u16,
                    timestamp: 50_000 + i * FRAME,
                    ssrc,
                    ..Default::default()
                },
                payload: Bytes::from(red_payload(i)),
            };
            if track.write_rtp(packet).await.is_err() {
                // Not bound yet: try the same packet number again.
                continue;
            }
            i += 1;
        }
    });
}

/// The payload types of the `m=audio` line of `sdp`, in order.
fn audio_pts(sdp: &str) -> Vec<u8> {
    sdp.lines()
        .find(|l| l.starts_with("m=audio"))
        .map(|l| {
            l.split_whitespace()
                .skip(3)
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn red_reaches_red_subscribers_as_red_and_others_as_opus() {
    let server = TestServer::start().await;
    red_to_both(&server).await;
    server.shutdown().await;
}

/// The same across shards: the room spreads from its second participant on, so the
/// subscribers are on different shards and one of them gets the RED track over the pipe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn red_crosses_shards() {
    let server = TestServer::start_with(plaza::config::Config {
        workers: 2,
        room_spread_above: 1,
        ..support::test_config()
    })
    .await;
    red_to_both(&server).await;
    let h = server.healthz().await.unwrap().1;
    let per_shard: Vec<u64> = h["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["rtp_packets_forwarded"].as_u64().unwrap())
        .collect();
    assert!(
        per_shard.iter().all(|&n| n > 0),
        "both shards forwarded: {h}"
    );
    assert!(h["rtp_packets_piped"].as_u64() > Some(0), "{h}");
    server.shutdown().await;
}

/// A RED publisher and two subscribers, one with RED and one without, in one room of `server`.
async fn red_to_both(server: &TestServer) {
    let url = server.ws_url();
    let room = "red";
    let mut with_red = Client::join(&url, room, "with-red", true, PcTarget::Subscriber).await;
    with_red.start_subscriber().await;
    let mut opus_only = Client::join(&url, room, "opus-only", false, PcTarget::Subscriber).await;
    opus_only.start_subscriber().await;

    let mut publ = Client::join(&url, room, "pub", true, PcTarget::Publisher).await;
    let ssrc = 0x5eed_0001;
    let (track, answer) = publ.publish_audio(ssrc).await;
    // Chromium sends RED only where the answer lists it ahead of Opus.
    assert_eq!(
        audio_pts(&answer),
        [RED_PT, OPUS_PT],
        "the publisher's answer lists RED first:\n{answer}"
    );
    let stop = Arc::new(AtomicBool::new(false));
    spawn_sender(track, ssrc, stop.clone());

    let info = with_red.track_published().await;
    assert_eq!(info.kind, TrackKind::Audio);
    assert!(
        info.mime_type.eq_ignore_ascii_case(red::MIME_TYPE_RED),
        "the track is announced as RED: {info:?}"
    );
    let offer = with_red.subscribe(&info.id).await;
    assert!(
        offer.contains("a=rtpmap:63 red/48000/2") && offer.contains("a=fmtp:63 111/111"),
        "the subscriber offer carries RED:\n{offer}"
    );
    assert!(
        offer.contains("a=fmtp:111 minptime=10;useinbandfec=1"),
        "subscribers' decoders are told of Opus in-band FEC:\n{offer}"
    );
    let _ = opus_only.track_published().await;
    opus_only.subscribe(&info.id).await;

    let red_got = with_red.wait_packets(&info.id, 100).await;
    let opus_got = opus_only.wait_packets(&info.id, 100).await;
    stop.store(true, Ordering::Relaxed);

    // The RED subscriber: RED on its RED payload type, the payload byte for byte as sent
    // (malformed ones too: it reads them itself), timestamps one frame apart.
    let mut frames = 0;
    for w in red_got.windows(2) {
        assert_eq!(
            w[1].seq,
            w[0].seq.wrapping_add(1),
            "consecutive sequence numbers"
        );
        assert_eq!(w[1].ts.wrapping_sub(w[0].ts), FRAME, "one frame apart");
    }
    for g in &red_got {
        assert_eq!(g.pt, RED_PT, "{g:?}");
        let Ok(r) = red::parse(&g.payload) else {
            assert_eq!(
                &g.payload[..],
                &[0x80 | OPUS_PT, 0, 0],
                "only the malformed ones"
            );
            continue;
        };
        let i = frame_number(&g.payload[r.primary.data.clone()]).expect("a frame");
        assert_eq!(
            &g.payload[..],
            red_payload(i).as_slice(),
            "forwarded untouched"
        );
        frames += 1;
    }
    assert!(frames >= 90, "{frames} RED frames");

    // The subscriber without RED: plain Opus on its Opus payload type, each payload exactly
    // one primary block, in order, the malformed packets left out.
    let numbers: Vec<u32> = opus_got
        .iter()
        .map(|g| {
            assert_eq!(g.pt, OPUS_PT, "{g:?}");
            frame_number(&g.payload)
                .unwrap_or_else(|| panic!("not a primary block: {:?}", &g.payload[..]))
        })
        .collect();
    for w in numbers.windows(2) {
        let step = w[1] - w[0];
        let skipped_malformed = step == 2 && w[0] % MALFORMED_EVERY == MALFORMED_EVERY - 2;
        assert!(
            step == 1 || skipped_malformed,
            "frames {} then {}",
            w[0],
            w[1]
        );
    }
    for (g, &i) in opus_got.iter().zip(&numbers) {
        // The timestamp is the packet's (the primary block's), on the rewritten clock.
        let first = (&opus_got[0], numbers[0]);
        assert_eq!(g.ts.wrapping_sub(first.0.ts), (i - first.1) * FRAME);
    }

    let (_, stats) = support::stats(server.http_addr).await.unwrap();
    let malformed = stats["forward_dropped"]["malformed_red"].as_u64().unwrap();
    assert!(malformed >= 1, "malformed RED is counted: {stats}");

    for c in [with_red, opus_only, publ] {
        c.close().await;
    }
}

/// A publisher without RED: its Opus goes to a RED-capable subscriber as plain Opus on the
/// Opus payload type (a RED wrapper with only a primary block would add nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opus_reaches_red_subscribers_as_opus() {
    let server = TestServer::start().await;
    let url = server.ws_url();
    let room = "opus";
    let mut with_red = Client::join(&url, room, "with-red", true, PcTarget::Subscriber).await;
    with_red.start_subscriber().await;
    let bob = support::publisher(&server, room, "bob").await;
    let info = loop {
        let t = with_red.track_published().await;
        if t.kind == TrackKind::Audio {
            break t;
        }
    };
    assert!(
        info.mime_type.eq_ignore_ascii_case(MIME_TYPE_OPUS),
        "{info:?}"
    );
    let offer = with_red.subscribe(&info.id).await;
    assert!(offer.contains("red/48000/2"), "RED is offered:\n{offer}");
    let got = with_red.wait_packets(&info.id, 50).await;
    assert!(
        got.iter().all(|g| g.pt == OPUS_PT),
        "plain Opus: {:?}",
        got[0]
    );
    with_red.close().await;
    bob.leave().await.unwrap();
    server.shutdown().await;
}
