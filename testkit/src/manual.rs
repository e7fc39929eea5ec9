//! A hand-driven webrtc-rs client for tests that need what [`crate::Peer`] does for them to be
//! done step by step: raw WebSocket signaling, one peer connection (the publisher one or the
//! subscriber one) over a media engine the test chooses, answers sent when the test says, and
//! every received RTP packet captured with its arrival time.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use plaza::signal::{ClientMessage, IceCandidate, PcTarget, ServerMessage, TrackInfo};
use tokio::sync::{mpsc, watch};
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    MediaEngine, PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler,
    RTCConfigurationBuilder, RTCIceCandidateInit, RTCPeerConnectionIceEvent,
    RTCPeerConnectionState, RTCSessionDescription, Registry, SettingEngineBuilder,
    register_default_interceptors,
};

use crate::recv::parse_vp8_descriptor;
use crate::support::{RawWs, Received, T};

/// One received RTP packet.
#[derive(Debug, Clone)]
pub struct Got {
    /// The id of the remote track it arrived on.
    pub track: String,
    /// When it arrived.
    pub at: Instant,
    pub pt: u8,
    pub seq: u16,
    pub ts: u32,
    pub payload: Bytes,
}

impl Got {
    /// Whether the payload starts a VP8 keyframe.
    pub fn vp8_keyframe_start(&self) -> bool {
        parse_vp8_descriptor(&self.payload).is_some_and(|d| d.keyframe_start)
    }
}

/// webrtc-rs's default codecs.
pub fn default_media_engine() -> MediaEngine {
    let mut me = MediaEngine::default();
    me.register_default_codecs().unwrap();
    me
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
                        at: Instant::now(),
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

/// A participant with one peer connection: the publisher one or the subscriber one.
pub struct Client {
    pub ws: RawWs,
    pub pc: Arc<dyn PeerConnection>,
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
    /// Joins `room` with `auto_subscribe: false`; `target` is the connection this client
    /// negotiates, over `media_engine`'s codecs.
    pub async fn join(
        url: &str,
        room: &str,
        name: &str,
        mut media_engine: MediaEngine,
        target: PcTarget,
    ) -> Client {
        let mut ws = RawWs::connect(url).await.unwrap();
        ws.send_msg(&ClientMessage::Join {
            room: room.into(),
            name: name.into(),
            token: Some(crate::token::participant(room, name)),
            protocol: None,
            auto_subscribe: Some(false),
            timeline_events: None,
        })
        .await
        .unwrap();
        ws.recv_until("joined", |m| matches!(m, ServerMessage::Joined { .. }))
            .await
            .unwrap();
        let registry = register_default_interceptors(Registry::new(), &mut media_engine).unwrap();
        let (ctx, candidates) = mpsc::unbounded_channel();
        let (stx, state) = watch::channel(RTCPeerConnectionState::New);
        let packets = Arc::new(Mutex::new(Vec::new()));
        let handler = Arc::new(Handler {
            candidates: ctx,
            state: stx,
            packets: packets.clone(),
        });
        // Boxed: the builder's future is large.
        let pc = Box::pin(
            PeerConnectionBuilder::new()
                .with_configuration(RTCConfigurationBuilder::new().build())
                .with_media_engine(media_engine)
                .with_setting_engine(
                    SettingEngineBuilder::new()
                        .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
                        .build(),
                )
                .with_interceptor_registry(registry)
                .with_handler(handler)
                .with_udp_addrs(vec!["127.0.0.1:0".to_owned()])
                .build(),
        )
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
    pub async fn recv(
        &mut self,
        what: &str,
        pred: impl Fn(&ServerMessage) -> bool,
    ) -> ServerMessage {
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

    /// Sends this connection's candidates (the first time: those gathered within 2 s, or
    /// until connected) and waits until it is connected.
    pub async fn connect(&mut self) {
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

    /// Applies a subscriber offer and sends the answer; returns the answer.
    pub async fn answer(&mut self, offer: String) -> String {
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

    /// Reads signaling until the next `subscribe_offer`.
    pub async fn next_offer(&mut self) -> String {
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
    pub async fn start_subscriber(&mut self) {
        let offer = self.next_offer().await;
        self.answer(offer).await;
        self.connect().await;
    }

    /// Asks to subscribe to `track` (or to stop).
    pub async fn send_subscribe(&mut self, track: &str, subscribe: bool) {
        self.ws
            .send_msg(&ClientMessage::Subscribe {
                track_ids: vec![track.to_owned()],
                subscribe,
            })
            .await
            .unwrap();
    }

    /// Subscribes to `track` and answers offers until one carries it: that offer.
    pub async fn subscribe(&mut self, track: &str) -> String {
        self.send_subscribe(track, true).await;
        loop {
            let offer = self.next_offer().await;
            self.answer(offer.clone()).await;
            if offer.contains(track) {
                return offer;
            }
        }
    }

    /// Adds `track` to the publisher connection, publishes it and waits until connected;
    /// returns the server's answer.
    pub async fn publish(&mut self, track: Arc<dyn TrackLocal>) -> String {
        self.pc.add_track(track).await.unwrap();
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
        answer
    }

    /// Reads signaling until the next `track_published`.
    pub async fn track_published(&mut self) -> TrackInfo {
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

    /// The packets of `track` received so far.
    pub fn packets_of(&self, track: &str) -> Vec<Got> {
        self.packets
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.track == track)
            .cloned()
            .collect()
    }

    /// Waits (polling: the recorder has no notification) until `n` packets of `track` arrived.
    pub async fn wait_packets(&self, track: &str, n: usize) -> Vec<Got> {
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

    pub async fn close(self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.pc.close()).await;
        self.ws.close().await;
    }
}
