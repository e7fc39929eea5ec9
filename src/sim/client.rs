//! A Plaza client in the simulated network: two `rtc` peers (publisher and subscriber, as
//! the signaling protocol has it) and the signaling session, spoken straight to the server
//! node's command interface ([`Command::Join`] with an events channel, then
//! [`Command::Client`]) instead of over a WebSocket. The channels are polled with `try_recv`:
//! no runtime is involved.
//!
//! Data channels: the server opens `chat` and `input` on the client's subscriber connection
//! (as a browser gets them with `ondatachannel`); [`Client::send_data`] queues a message that
//! goes out at the virtual time the network next drains the client (recorded in
//! [`Client::data_sent`]), and [`Client::data_received`] splits what arrived into the
//! server's `{"from":…}` header and the payload.

use super::net::{Node, Output};
use super::peer::{MediaSpec, Peer, RxData};
use crate::sfu::{Command, EVENT_QUEUE, JoinAccepted, JoinRequest, SfuError};
use crate::signal::{ClientMessage, IceCandidate, PcTarget, ServerMessage, TrackInfo};
use bytes::BytesMut;
use rtc::data_channel::RTCDataChannelInit;
use rtc::peer_connection::transport::RTCIceCandidateInit;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// Port of a client's publisher connection (its subscriber uses the next one).
pub const PUBLISHER_PORT: u16 = 40000;
pub const SUBSCRIBER_PORT: u16 = 40001;

/// See the module docs.
pub struct Client {
    pub name: String,
    pub room: String,
    pub ip: IpAddr,
    /// Created when the join is accepted, if the client publishes anything.
    pub publisher: Option<Peer>,
    /// Answers the server's offers.
    pub subscriber: Peer,
    /// The participant id, once joined.
    pub participant_id: Option<String>,
    /// The `joined` message.
    pub joined: Option<ServerMessage>,
    /// Every server message, with the virtual time it was read.
    pub messages: Vec<(Instant, ServerMessage)>,
    /// Signaling or `rtc` errors (a test usually asserts there are none).
    pub errors: Vec<String>,
    /// Apply `publisher_layers` (pause/resume encodings) as a browser client does.
    pub obey_publisher_layers: bool,
    /// Keep subscriber offers in [`Client::held_offers`] instead of answering them (a slow
    /// client); [`Client::answer_held`] answers them.
    pub hold_offers: bool,
    pub held_offers: Vec<String>,
    /// Open `chat` and `input` channels of the client's own in its publish offer (which the
    /// protocol says not to do: the server does not relay them). See
    /// [`Client::with_publisher_channels`].
    pub publisher_channels: bool,
    /// A viewer (WHEP playback): joins with `view`, offers recvonly audio and video on its
    /// subscriber connection (`publish_offer`) and applies the `publish_answer` there. See
    /// [`Client::viewer`].
    pub viewer: bool,
    /// Data-channel messages sent: (virtual send time, label, text?, bytes as sent).
    pub data_sent: Vec<(Instant, String, bool, Vec<u8>)>,
    data_out: Vec<(String, bool, Vec<u8>)>,
    media: MediaSpec,
    seed: u64,
    join_cmd: Option<Command>,
    join_rx: Option<oneshot::Receiver<Result<JoinAccepted, SfuError>>>,
    events: mpsc::Receiver<ServerMessage>,
    outgoing: Vec<ClientMessage>,
    /// The signaling session has ended (the client left, or the server closed its event
    /// channel) and said so with [`Command::Disconnect`], once, as the WebSocket session does.
    pub session_ended: bool,
}

impl Client {
    /// A client that joins `room` as `name` as soon as the network runs, publishes `media`
    /// (if any) and subscribes to everything (auto-subscribe).
    pub fn new(
        name: &str,
        room: &str,
        ip: IpAddr,
        now: Instant,
        seed: u64,
        media: MediaSpec,
    ) -> Result<Self, super::peer::PeerError> {
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
        let (reply, join_rx) = oneshot::channel();
        let subscriber = Peer::new(
            &format!("{name}-sub"),
            now,
            SocketAddr::new(ip, SUBSCRIBER_PORT),
            seed ^ 0x5eed_0002,
            &MediaSpec {
                rtx: media.rtx,
                ..MediaSpec::none()
            },
        )?;
        Ok(Client {
            name: name.to_owned(),
            room: room.to_owned(),
            ip,
            publisher: None,
            subscriber,
            participant_id: None,
            joined: None,
            messages: Vec::new(),
            errors: Vec::new(),
            obey_publisher_layers: true,
            hold_offers: false,
            held_offers: Vec::new(),
            publisher_channels: false,
            viewer: false,
            data_sent: Vec::new(),
            data_out: Vec::new(),
            media,
            seed,
            join_cmd: Some(Command::Join {
                req: JoinRequest {
                    room: room.to_owned(),
                    name: name.to_owned(),
                    auto_subscribe: true,
                    events: events_tx,
                    peers: Vec::new(),
                    identity: None,
                    grants: Default::default(),
                    publish_only: false,
                    view: None,
                    home: None,
                    timeline: Default::default(),
                    session: String::new(),
                },
                reply,
            }),
            join_rx: Some(join_rx),
            events,
            outgoing: Vec::new(),
            session_ended: false,
        })
    }

    /// Join without subscribing to everything (subscribe with `ClientMessage::Subscribe`).
    pub fn without_auto_subscribe(mut self) -> Self {
        if let Some(Command::Join { req, .. }) = self.join_cmd.as_mut() {
            req.auto_subscribe = false;
        }
        self
    }

    /// Change the join before it is sent (identity, grants): call before the network runs.
    pub fn join_with(&mut self, f: impl FnOnce(&mut JoinRequest)) {
        if let Some(Command::Join { req, .. }) = self.join_cmd.as_mut() {
            f(req);
        }
    }

    /// A viewer of `target` (as a WHEP session joins): hidden, subscribing only, no
    /// auto-subscribe; one recvonly audio and one recvonly video section, offered by the
    /// client. The media it gets is in `subscriber.tracks`, by the server's section track ids.
    pub fn viewer(mut self, target: crate::sfu::viewing::ViewTarget) -> Self {
        self.viewer = true;
        self.join_with(|req| {
            req.view = Some(target);
            req.auto_subscribe = false;
            req.grants.hidden = true;
            req.grants.publish_audio = false;
            req.grants.publish_video = false;
            req.grants.publish_data = false;
        });
        self
    }

    /// Ask for the room's events on the `chat` channel (`join.timeline_events`).
    pub fn timeline_events(mut self) -> Self {
        self.join_with(|req| req.timeline.events = true);
        self
    }

    /// Open the room (if this join does) with input ticks of `hz` (a token's
    /// `roomConfig.input_tick_hz`).
    pub fn input_tick_hz(mut self, hz: u32) -> Self {
        self.join_with(|req| req.timeline.input_tick_hz = Some(hz));
        self
    }

    /// Also create `chat` (ordered) and `input` (unordered, no retransmissions) on the
    /// publisher connection, in its first offer; a publisher connection is made even without
    /// media. Send on them with `publisher.send_data`.
    pub fn with_publisher_channels(mut self) -> Self {
        self.publisher_channels = true;
        self
    }

    /// Answer the first held subscriber offer (see [`Client::hold_offers`]).
    pub fn answer_held(&mut self, now: Instant) {
        if self.held_offers.is_empty() {
            return;
        }
        let sdp = self.held_offers.remove(0);
        match self.subscriber.answer(now, &sdp) {
            Ok(sdp) => self.outgoing.push(ClientMessage::SubscribeAnswer { sdp }),
            Err(e) => self.errors.push(format!("subscribe answer: {e}")),
        }
    }

    /// The client's addresses (publisher, subscriber), for [`super::Net::add_node`].
    pub fn addrs(&self) -> [SocketAddr; 2] {
        [
            SocketAddr::new(self.ip, PUBLISHER_PORT),
            SocketAddr::new(self.ip, SUBSCRIBER_PORT),
        ]
    }

    /// Send a signaling message (after the join).
    pub fn send(&mut self, msg: ClientMessage) {
        self.outgoing.push(msg);
    }

    /// Queue a data-channel message on the channel `label` (`chat` or `input`): `data` is
    /// the whole client envelope (`HEADER "\n" PAYLOAD`, see [`envelope`]), sent as text
    /// (then it must be UTF-8) or binary. It leaves when the network next drains the client;
    /// a channel that is not open then makes it an entry of [`Client::errors`].
    pub fn send_data(&mut self, label: &str, is_text: bool, data: impl Into<Vec<u8>>) {
        self.data_out.push((label.to_owned(), is_text, data.into()));
    }

    /// Whether both of the server's channels (`chat`, `input`) are open.
    pub fn channels_open(&self) -> bool {
        self.subscriber.channel_open("chat") && self.subscriber.channel_open("input")
    }

    /// Every data-channel message received, the server's header parsed.
    pub fn data_received(&self) -> Vec<DataIn> {
        self.subscriber.data.iter().map(DataIn::parse).collect()
    }

    /// Every track announced to this client (in `joined` and `track_published`), by
    /// publisher and client track id order of arrival.
    pub fn announced_tracks(&self) -> Vec<TrackInfo> {
        let mut v = Vec::new();
        if let Some(ServerMessage::Joined { participants, .. }) = &self.joined {
            for p in participants {
                v.extend(p.tracks.iter().cloned());
            }
        }
        for (_, m) in &self.messages {
            if let ServerMessage::TrackPublished { track } = m {
                v.push(track.clone());
            }
        }
        v
    }

    /// Messages matching `f`.
    pub fn count_messages(&self, f: impl Fn(&ServerMessage) -> bool) -> usize {
        self.messages.iter().filter(|(_, m)| f(m)).count()
    }

    fn handle_message(&mut self, now: Instant, msg: &ServerMessage) {
        match msg {
            ServerMessage::SubscribeOffer { sdp } if self.hold_offers => {
                self.held_offers.push(sdp.clone());
            }
            ServerMessage::SubscribeOffer { sdp } => match self.subscriber.answer(now, sdp) {
                Ok(sdp) => self.outgoing.push(ClientMessage::SubscribeAnswer { sdp }),
                Err(e) => self.errors.push(format!("subscribe answer: {e}")),
            },
            ServerMessage::PublishAnswer { sdp } if self.viewer => {
                if let Err(e) = self.subscriber.accept_answer(now, sdp) {
                    self.errors.push(format!("viewer answer: {e}"));
                }
            }
            ServerMessage::PublishAnswer { sdp } => {
                if let Some(p) = self.publisher.as_mut() {
                    if let Err(e) = p.accept_answer(now, sdp) {
                        self.errors.push(format!("publish answer: {e}"));
                    }
                }
            }
            ServerMessage::Trickle { target, candidate } => {
                let peer = match target {
                    PcTarget::Publisher => self.publisher.as_mut(),
                    PcTarget::Subscriber => Some(&mut self.subscriber),
                };
                if let Some(p) = peer {
                    let c = RTCIceCandidateInit {
                        candidate: candidate.candidate.clone(),
                        sdp_mid: candidate.sdp_mid.clone(),
                        sdp_mline_index: candidate.sdp_mline_index,
                        username_fragment: candidate.username_fragment.clone(),
                        ..Default::default()
                    };
                    if !c.candidate.is_empty() {
                        if let Err(e) = p.add_remote_candidate(c) {
                            self.errors.push(format!("remote candidate: {e}"));
                        }
                    }
                }
            }
            ServerMessage::PublisherLayers { active, paused, .. } if self.obey_publisher_layers => {
                if let Some(p) = self.publisher.as_mut() {
                    for rid in paused {
                        p.set_layer_active(rid, false);
                    }
                    for rid in active {
                        p.set_layer_active(rid, true);
                    }
                }
            }
            ServerMessage::Error { code, message, .. } => {
                self.errors
                    .push(format!("server error {code:?}: {message}"));
            }
            _ => {}
        }
    }

    fn joined(&mut self, now: Instant, acc: JoinAccepted) {
        self.participant_id = Some(acc.participant_id);
        self.joined = Some(acc.joined);
        if self.viewer {
            use rtc::rtp_transceiver::rtp_sender::RtpCodecKind;
            let offer = self
                .subscriber
                .add_recvonly(RtpCodecKind::Audio)
                .and_then(|()| self.subscriber.add_recvonly(RtpCodecKind::Video))
                .and_then(|()| self.subscriber.create_offer(now));
            match offer {
                Ok(sdp) => self.outgoing.push(ClientMessage::PublishOffer { sdp }),
                Err(e) => self.errors.push(format!("viewer offer: {e}")),
            }
            return;
        }
        let publishes = self.media.audio || !self.media.video.is_empty();
        if !publishes && !self.publisher_channels {
            return;
        }
        let channels = self.publisher_channels;
        let publisher = Peer::new(
            &format!("{}-pub", self.name),
            now,
            SocketAddr::new(self.ip, PUBLISHER_PORT),
            self.seed ^ 0x5eed_0001,
            &self.media,
        )
        .and_then(|mut p| {
            if channels {
                p.create_data_channel(
                    "chat",
                    RTCDataChannelInit {
                        ordered: true,
                        ..Default::default()
                    },
                )?;
                p.create_data_channel(
                    "input",
                    RTCDataChannelInit {
                        ordered: false,
                        max_retransmits: Some(0),
                        ..Default::default()
                    },
                )?;
            }
            p.create_offer(now).map(|sdp| (p, sdp))
        });
        match publisher {
            Ok((p, sdp)) => {
                self.publisher = Some(p);
                self.outgoing.push(ClientMessage::PublishOffer { sdp });
            }
            Err(e) => self.errors.push(format!("publisher: {e}")),
        }
    }
}

/// A client envelope: the header `{"to":[…]}` (or `{}` when `to` is empty), a newline and
/// `payload`.
pub fn envelope(to: &[&str], payload: &[u8]) -> Vec<u8> {
    let header = if to.is_empty() {
        "{}".to_owned()
    } else {
        serde_json::json!({ "to": to }).to_string()
    };
    let mut v = header.into_bytes();
    v.push(b'\n');
    v.extend_from_slice(payload);
    v
}

/// A client envelope with the timeline's header fields: `sseq` and, if `ack`, `"ack":true`.
pub fn envelope_seq(to: &[&str], sseq: u64, ack: bool, payload: &[u8]) -> Vec<u8> {
    let mut h = serde_json::json!({ "sseq": sseq });
    if !to.is_empty() {
        h["to"] = serde_json::json!(to);
    }
    if ack {
        h["ack"] = serde_json::json!(true);
    }
    let mut v = h.to_string().into_bytes();
    v.push(b'\n');
    v.extend_from_slice(payload);
    v
}

/// A relayed data-channel message as a receiver sees it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DataIn {
    /// Virtual arrival time.
    pub at: std::time::Instant,
    /// The channel it arrived on.
    pub label: String,
    pub is_text: bool,
    /// `from` of the server's header; `None` if the header is missing or malformed.
    pub from: Option<String>,
    /// The room timeline's `seq`, `ts` (µs, Unix epoch) and the sender's `sseq`.
    pub seq: Option<u64>,
    pub ts: Option<u64>,
    pub sseq: Option<u64>,
    /// A room event on the timeline: its name (`participant_joined`, …).
    pub event: Option<String>,
    /// Replayed from history.
    pub replay: bool,
    /// An input tick batch: its tick number.
    pub tick: Option<u64>,
    /// An acknowledgement: the `sseq` it acknowledges (and `dup` for a duplicate).
    pub ack: Option<u64>,
    pub dup: bool,
    /// Everything after the first `\n` (the whole message if there is none).
    pub payload: Vec<u8>,
}

impl DataIn {
    /// A relayed message received (binary) at `at`: the header parsed.
    pub fn from_bytes(at: std::time::Instant, data: bytes::Bytes) -> Self {
        Self::parse(&RxData {
            at,
            label: String::new(),
            is_text: false,
            data,
        })
    }

    fn parse(d: &RxData) -> Self {
        let (header, payload) = match d.data.iter().position(|&b| b == b'\n') {
            Some(nl) => (
                serde_json::from_slice::<serde_json::Value>(&d.data[..nl]).ok(),
                d.data[nl + 1..].to_vec(),
            ),
            None => (None, d.data.to_vec()),
        };
        let h = header.unwrap_or_default();
        let num = |k: &str| h.get(k).and_then(serde_json::Value::as_u64);
        DataIn {
            at: d.at,
            label: d.label.clone(),
            is_text: d.is_text,
            from: h.get("from").and_then(|v| v.as_str()).map(str::to_owned),
            seq: num("seq"),
            ts: num("ts"),
            sseq: num("sseq"),
            event: h.get("event").and_then(|v| v.as_str()).map(str::to_owned),
            replay: h.get("replay").and_then(serde_json::Value::as_bool) == Some(true),
            tick: num("tick"),
            ack: num("ack"),
            dup: h.get("dup").and_then(serde_json::Value::as_bool) == Some(true),
            payload,
        }
    }

    /// The entries of an input tick batch, each parsed like a relayed message (empty for
    /// anything else).
    pub fn tick_entries(&self) -> Vec<DataIn> {
        let mut out = Vec::new();
        if self.tick.is_none() {
            return out;
        }
        let mut rest = &self.payload[..];
        while rest.len() >= 4 {
            let len = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let Some(entry) = rest.get(4..4 + len) else {
                break;
            };
            // (An entry's header says whether its sender sent text.)
            let is_text = entry
                .split(|&b| b == b'\n')
                .next()
                .and_then(|h| serde_json::from_slice::<serde_json::Value>(h).ok())
                .and_then(|v| v.get("text")?.as_bool())
                == Some(true);
            let rx = RxData {
                at: self.at,
                label: self.label.clone(),
                is_text,
                data: bytes::Bytes::copy_from_slice(entry),
            };
            out.push(DataIn::parse(&rx));
            rest = &rest[4 + len..];
        }
        out
    }
}

/// The candidate JSON shape the signaling protocol uses, from `rtc`'s.
pub fn to_signal_candidate(c: &RTCIceCandidateInit) -> IceCandidate {
    IceCandidate {
        candidate: c.candidate.clone(),
        sdp_mid: c.sdp_mid.clone(),
        sdp_mline_index: c.sdp_mline_index,
        username_fragment: c.username_fragment.clone(),
    }
}

impl Node for Client {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, to: SocketAddr, data: BytesMut) {
        if to.port() == PUBLISHER_PORT {
            if let Some(p) = self.publisher.as_mut() {
                p.handle_datagram(now, from, data);
            }
        } else {
            self.subscriber.handle_datagram(now, from, data);
        }
    }

    fn handle_timeout(&mut self, now: Instant) {
        if let Some(p) = self.publisher.as_mut() {
            if p.poll_timeout().is_some_and(|t| t <= now) {
                p.handle_timeout(now);
            }
        }
        if self.subscriber.poll_timeout().is_some_and(|t| t <= now) {
            self.subscriber.handle_timeout(now);
        }
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        let a = self.publisher.as_mut().and_then(|p| p.poll_timeout());
        let b = self.subscriber.poll_timeout();
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn poll_output(&mut self, now: Instant, out: &mut Output) {
        if let Some(cmd) = self.join_cmd.take() {
            out.commands.push(cmd);
        }
        if let Some(rx) = self.join_rx.as_mut() {
            match rx.try_recv() {
                Ok(Ok(acc)) => {
                    self.join_rx = None;
                    self.joined(now, acc);
                }
                Ok(Err(e)) => {
                    self.join_rx = None;
                    self.errors.push(format!("join refused: {e}"));
                }
                Err(oneshot::error::TryRecvError::Empty) => {}
                Err(oneshot::error::TryRecvError::Closed) => {
                    self.join_rx = None;
                    self.errors.push("join: no reply".into());
                }
            }
        }
        let mut closed = false;
        loop {
            match self.events.try_recv() {
                Ok(msg) => {
                    self.handle_message(now, &msg);
                    self.messages.push((now, msg));
                }
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if let Some(pid) = self.participant_id.clone() {
            // Like the WebSocket session: `leave` goes to the core and ends the session; a
            // session that ends (so, or because the core closed the event channel) says
            // `disconnect` once.
            let mut ended = closed;
            for msg in self.outgoing.drain(..) {
                if self.session_ended {
                    break;
                }
                let leave = matches!(msg, ClientMessage::Leave);
                out.commands.push(Command::Client {
                    participant: pid.clone(),
                    msg,
                });
                if leave {
                    ended = true;
                    break;
                }
            }
            if ended && !self.session_ended {
                self.session_ended = true;
                out.commands.push(Command::Disconnect {
                    participant: pid,
                    why: crate::signal::LeaveReason::Left,
                    reason: if closed {
                        "the server closed the session".into()
                    } else {
                        "client left".into()
                    },
                });
            }
        }
        for (label, is_text, data) in std::mem::take(&mut self.data_out) {
            match self.subscriber.send_data(now, &label, is_text, &data) {
                Ok(()) => self.data_sent.push((now, label, is_text, data)),
                Err(e) => self.errors.push(format!("send on {label}: {e}")),
            }
        }
        if let Some(p) = self.publisher.as_mut() {
            p.poll_output(now, out);
        }
        self.subscriber.poll_output(now, out);
    }
}
