//! The whole core as one fuzz target: a fresh [`Sfu`] per input, driven by a program the
//! input's bytes spell (see [`Op`]): joins, client messages built field by field or decoded
//! from the input's text, STUN binding requests signed with the ICE credentials the server
//! sent (so they get past the demux and `rtc`'s ICE agent), DTLS/RTP/RTCP-looking and raw
//! datagrams from known and unknown addresses, virtual time and timeouts, turns, disconnects.
//! Answers to the server's subscribe offers come from a real `rtc` peer. No panic, ever; and
//! the core answers `Stats` after every program.

use super::engine::{self, Rng, Spec, Unstructured};
use super::seeds;
use bytes::BytesMut;
use plaza::sfu::admin::{AdminOp, Lane, PermissionsUpdate, Target};
use plaza::sfu::{Command, CoreStats, Grants, JoinRequest, Remote, Sfu, Transmit};
use plaza::signal::{ClientMessage, IceCandidate, PcTarget, Quality, ServerMessage};
use plaza::sim::MediaSpec;
use plaza::sim::peer::Peer;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Counts what the core sends.
#[derive(Default)]
struct Sink {
    sent: u64,
}

impl Transmit for Sink {
    fn send(&mut self, _data: BytesMut, _to: Remote, _origin: Option<Instant>) {
        self.sent += 1;
    }
}

/// The program's instructions (the first byte of each, modulo their count).
#[derive(Debug, Clone, Copy)]
#[repr(u8)]
enum Op {
    Join = 0,
    Client,
    ClientText,
    Stun,
    Raw,
    Template,
    Time,
    EndTurn,
    Disconnect,
    Events,
    Answer,
    Admin,
}
const OPS: u8 = 12;

struct Participant {
    id: String,
    events: mpsc::Receiver<ServerMessage>,
}

/// What the program has learned from the server's messages.
#[derive(Default)]
pub(crate) struct Learned {
    /// Server ICE credentials (ufrag, pwd) from its answers and offers.
    pub(crate) ice: Vec<(String, String)>,
    pub(crate) tracks: Vec<String>,
    /// Subscribe offers waiting for an answer: (participant index, SDP).
    pub(crate) offers: Vec<(usize, String)>,
    /// Participant ids of the joins that succeeded.
    pub(crate) participants: Vec<String>,
}

pub(crate) struct Ctx {
    pub(crate) offers: Vec<String>,
    pub(crate) answers: Vec<String>,
    pub(crate) templates: Vec<Vec<u8>>,
    pub(crate) addrs: Vec<SocketAddr>,
    pub(crate) server: SocketAddr,
}

pub(crate) fn string(u: &mut Unstructured, max: usize) -> String {
    String::from_utf8_lossy(u.bytes(max)).into_owned()
}

fn ice_of(sdp: &str) -> Option<(String, String)> {
    let find = |key: &str| {
        sdp.lines()
            .find_map(|l| l.trim().strip_prefix(key).map(str::to_owned))
    };
    Some((find("a=ice-ufrag:")?, find("a=ice-pwd:")?))
}

/// An SDP from `pool`, sometimes mutated (the mutation chosen by the input).
fn sdp(u: &mut Unstructured, pool: &[String]) -> String {
    let base = &pool[u.below(pool.len())];
    let edits = u.below(4);
    if edits == 0 {
        return base.clone();
    }
    let mut rng = Rng::new(u64::from(u.u32()) + 1);
    let dict = seeds::sdp_dict();
    let mut b = base.clone().into_bytes();
    for _ in 0..edits {
        engine::mutate_once(&mut rng, &mut b, &[], &dict, 16 * 1024);
    }
    String::from_utf8_lossy(&b).into_owned()
}

fn track_id(u: &mut Unstructured, learned: &Learned) -> String {
    if !learned.tracks.is_empty() && u.below(4) != 0 {
        learned.tracks[u.below(learned.tracks.len())].clone()
    } else {
        string(u, 16)
    }
}

fn participant_id(u: &mut Unstructured, learned: &Learned) -> String {
    if !learned.participants.is_empty() && u.below(4) != 0 {
        learned.participants[u.below(learned.participants.len())].clone()
    } else {
        string(u, 16)
    }
}

fn target(u: &mut Unstructured, learned: &Learned) -> Target {
    if u.bool() {
        Target::Participant(participant_id(u, learned))
    } else {
        Target::Identity(string(u, 8))
    }
}

/// A room admin operation, about the fuzzed rooms and what the program learned.
fn admin_op(u: &mut Unstructured, learned: &Learned) -> AdminOp {
    let room = ["r0", "r1", "r2"][u.below(3)].to_owned();
    match u.below(7) {
        0 => AdminOp::ListRooms,
        1 => AdminOp::ListParticipants { room },
        2 => AdminOp::RemoveParticipant {
            room,
            target: target(u, learned),
            reason: string(u, 8),
        },
        3 => AdminOp::MuteTrack {
            room,
            target: target(u, learned),
            track_id: track_id(u, learned),
            muted: u.bool(),
        },
        4 => AdminOp::UpdatePermissions {
            room,
            target: target(u, learned),
            update: PermissionsUpdate {
                publish_audio: u.bool().then(|| u.bool()),
                publish_video: u.bool().then(|| u.bool()),
                publish_data: u.bool().then(|| u.bool()),
                subscribe: u.bool().then(|| u.bool()),
                room_admin: u.bool().then(|| u.bool()),
                chat_muted: u.bool().then(|| u.bool()),
            },
        },
        5 => AdminOp::SendData {
            room,
            lane: if u.bool() { Lane::Chat } else { Lane::Input },
            is_text: u.bool(),
            payload: bytes::Bytes::copy_from_slice(u.bytes_long(256)),
            to: (0..u.below(3)).map(|_| target(u, learned)).collect(),
        },
        _ => AdminOp::CloseRoom {
            room,
            reason: string(u, 8),
        },
    }
}

pub(crate) fn client_message(u: &mut Unstructured, ctx: &Ctx, learned: &Learned) -> ClientMessage {
    match u.below(11) {
        0 => ClientMessage::Join {
            room: string(u, 8),
            name: string(u, 8),
            token: u.bool().then(|| string(u, 32)),
            protocol: u.bool().then(|| u.u32()),
            auto_subscribe: u.bool().then(|| u.bool()),
            timeline_events: u.bool().then(|| u.bool()),
        },
        1 => ClientMessage::PublishOffer {
            sdp: sdp(u, &ctx.offers),
        },
        2 => ClientMessage::SubscribeAnswer {
            sdp: sdp(u, &ctx.answers),
        },
        3 => {
            let candidate = match u.below(4) {
                0 => String::new(),
                1 => format!(
                    "candidate:{} 1 udp {} 10.0.0.{} {} typ host",
                    u.u8(),
                    u.u32(),
                    u.u8(),
                    u.u16()
                ),
                2 => format!(
                    "candidate:1 1 {} 1 ::{} 9 typ {} raddr 0.0.0.0 rport 0",
                    ["udp", "tcp", "UDP", ""][u.below(4)],
                    u.u8(),
                    ["srflx", "relay", "prflx", "host", "x"][u.below(5)]
                ),
                _ => string(u, 64),
            };
            ClientMessage::Trickle {
                target: if u.bool() {
                    PcTarget::Publisher
                } else {
                    PcTarget::Subscriber
                },
                candidate: IceCandidate {
                    candidate,
                    sdp_mid: u.bool().then(|| string(u, 4)),
                    sdp_mline_index: u.bool().then(|| u.u16()),
                    username_fragment: u.bool().then(|| string(u, 8)),
                },
            }
        }
        4 => {
            let n = u.below(6);
            ClientMessage::Subscribe {
                track_ids: (0..n).map(|_| track_id(u, learned)).collect(),
                subscribe: u.bool(),
            }
        }
        5 => ClientMessage::Mute {
            track_id: track_id(u, learned),
            muted: u.bool(),
        },
        6 => {
            let quality = match u.below(5) {
                0 => None,
                1 => Some(None),
                2 => Some(Some(Quality::Low)),
                3 => Some(Some(Quality::Medium)),
                _ => Some(Some(Quality::High)),
            };
            ClientMessage::TrackSettings {
                track_id: track_id(u, learned),
                quality,
                width: u.bool().then(|| u.u32()),
                height: u.bool().then(|| u.u32()),
            }
        }
        7 => ClientMessage::Ping {
            ts: u
                .bool()
                .then(|| f64::from_bits(u64::from(u.u32()) << 32 | u64::from(u.u32()))),
        },
        9 => ClientMessage::RemoveParticipant {
            participant_id: participant_id(u, learned),
            reason: u.bool().then(|| string(u, 16)),
        },
        10 => ClientMessage::MuteChat {
            participant_id: participant_id(u, learned),
            muted: u.bool(),
        },
        _ => ClientMessage::Leave,
    }
}

/// How deep the programs got, over a run.
#[derive(Debug, Default)]
struct Reach {
    joins: u64,
    publish_answers: u64,
    subscribe_offers: u64,
    /// Signed STUN checks the server answered (sent something right after).
    stun_answered: u64,
    real_answers: u64,
    /// Admin operations the core carried out.
    admin_done: u64,
}

/// Runs one program on a fresh core.
fn program(data: &[u8], ctx: &Ctx, run: u64, reach: &mut Reach) {
    let t0 = Instant::now();
    let mut now = t0;
    let mut sfu = Sfu::new(
        plaza::sim::server::sim_config(ctx.server.ip()),
        ctx.server,
        run,
        now,
        Sink::default(),
    );
    let mut parts: Vec<Participant> = Vec::new();
    let mut learned = Learned::default();
    let mut u = Unstructured::new(data);
    let mut steps = 0;
    while !u.is_empty() && steps < 64 {
        steps += 1;
        let op = u.u8() % OPS;
        match op {
            x if x == Op::Join as u8 => {
                let (tx, rx) = mpsc::channel(plaza::sfu::EVENT_QUEUE);
                let (reply, mut answer) = oneshot::channel();
                let req = JoinRequest {
                    room: ["r0", "r1"][u.below(2)].to_owned(),
                    name: string(&mut u, 8),
                    auto_subscribe: u.bool(),
                    events: tx,
                    peers: Vec::new(),
                    identity: u.bool().then(|| string(&mut u, 8)),
                    grants: Grants {
                        publish_audio: u.below(8) != 0,
                        publish_video: u.below(8) != 0,
                        publish_data: u.below(8) != 0,
                        subscribe: u.below(8) != 0,
                        hidden: u.below(8) == 0,
                        room_admin: u.bool(),
                    },
                    publish_only: u.below(8) == 0,
                    view: None,
                    home: None,
                    timeline: Default::default(),
                    session: String::new(),
                };
                let _ = sfu.handle_command(now, Command::Join { req, reply });
                if let Ok(Ok(ok)) = answer.try_recv() {
                    reach.joins += 1;
                    learned.participants.push(ok.participant_id.clone());
                    parts.push(Participant {
                        id: ok.participant_id,
                        events: rx,
                    });
                }
            }
            x if x == Op::Client as u8 || x == Op::ClientText as u8 => {
                let who = u.below(parts.len() + 1);
                let participant = parts
                    .get(who)
                    .map_or_else(|| string(&mut u, 8), |p| p.id.clone());
                let msg = if x == Op::Client as u8 {
                    Some(client_message(&mut u, ctx, &learned))
                } else {
                    let t = String::from_utf8_lossy(u.bytes_long(4096)).into_owned();
                    plaza::signal::decode_client(&t).ok()
                };
                if let Some(msg) = msg {
                    let _ = sfu.handle_command(now, Command::Client { participant, msg });
                }
            }
            x if x == Op::Stun as u8 => {
                let from = ctx.addrs[u.below(ctx.addrs.len())];
                let signed = !learned.ice.is_empty() && u.below(8) != 0;
                let (ufrag, pwd) = if signed {
                    learned.ice[u.below(learned.ice.len())].clone()
                } else {
                    (string(&mut u, 8), "x".repeat(22))
                };
                let mut m = seeds::binding_request(
                    &format!("{ufrag}:cli{}", u.u8() % 4),
                    &pwd,
                    u.u8(),
                    u.bool(),
                    u.below(4) != 0,
                );
                // Sometimes damage it (integrity, fingerprint, lengths).
                for _ in 0..u.below(3) {
                    let i = u.below(m.len());
                    m[i] ^= u.u8();
                }
                let before = sfu.transmit().sent;
                sfu.handle_datagram(now, now, from, &m);
                sfu.end_turn(now);
                if signed && sfu.transmit().sent > before {
                    reach.stun_answered += 1;
                }
            }
            x if x == Op::Raw as u8 => {
                let from = if u.below(4) == 0 {
                    SocketAddr::from(([u.u8(), u.u8(), u.u8(), u.u8()], u.u16()))
                } else {
                    ctx.addrs[u.below(ctx.addrs.len())]
                };
                let d = u.bytes_long(1500);
                sfu.handle_datagram(now, now, from, d);
            }
            x if x == Op::Template as u8 => {
                let from = ctx.addrs[u.below(ctx.addrs.len())];
                let mut d = ctx.templates[u.below(ctx.templates.len())].clone();
                for _ in 0..u.below(4) {
                    let i = u.below(d.len());
                    d[i] ^= u.u8();
                }
                sfu.handle_datagram(now, now, from, &d);
            }
            x if x == Op::Time as u8 => {
                now = match (u.bool(), sfu.poll_timeout()) {
                    (true, Some(d)) if d.at > now => d.at,
                    _ => now + Duration::from_millis(u64::from(u.u16())),
                };
                sfu.handle_timeout(now);
            }
            x if x == Op::EndTurn as u8 => sfu.end_turn(now),
            x if x == Op::Disconnect as u8 => {
                if !parts.is_empty() {
                    let p = parts.remove(u.below(parts.len()));
                    let reason = string(&mut u, 8);
                    let _ = sfu.handle_command(
                        now,
                        Command::Disconnect {
                            participant: p.id,
                            why: plaza::signal::LeaveReason::Disconnected,
                            reason,
                        },
                    );
                }
            }
            x if x == Op::Events as u8 => {
                sfu.end_turn(now);
                for (i, p) in parts.iter_mut().enumerate() {
                    while let Ok(m) = p.events.try_recv() {
                        learn(&mut learned, i, m, reach);
                    }
                }
            }
            x if x == Op::Admin as u8 => {
                let op = admin_op(&mut u, &learned);
                let (reply, mut rx) = oneshot::channel();
                let _ = sfu.handle_command(now, Command::Admin { op, reply });
                if let Ok(Ok(_)) = rx.try_recv() {
                    reach.admin_done += 1;
                }
            }
            _ => {
                // Answer a subscribe offer with a real `rtc` peer's answer.
                if let Some((i, offer)) = learned.offers.pop() {
                    let addr = ctx.addrs[i % ctx.addrs.len()];
                    let answer = Peer::new("fuzz", now, addr, run, &MediaSpec::none())
                        .ok()
                        .and_then(|mut peer| peer.answer(now, &offer).ok());
                    if let (Some(sdp), Some(p)) = (answer, parts.get(i)) {
                        if let Some(ice) = ice_of(&sdp) {
                            learned.ice.push(ice);
                        }
                        reach.real_answers += 1;
                        let msg = ClientMessage::SubscribeAnswer { sdp };
                        let participant = p.id.clone();
                        let _ = sfu.handle_command(now, Command::Client { participant, msg });
                    }
                }
            }
        }
    }
    sfu.end_turn(now);
    let (reply, mut rx) = oneshot::channel::<CoreStats>();
    let _ = sfu.handle_command(now, Command::Stats { reply });
    sfu.end_turn(now);
    let stats = rx
        .try_recv()
        .expect("the core answers Stats within its turn");
    assert!(stats.participants <= parts.len() + 64);
}

fn learn(learned: &mut Learned, i: usize, m: ServerMessage, reach: &mut Reach) {
    match m {
        ServerMessage::PublishAnswer { sdp } => {
            reach.publish_answers += 1;
            learned.ice.extend(ice_of(&sdp));
        }
        ServerMessage::SubscribeOffer { sdp } => {
            reach.subscribe_offers += 1;
            learned.ice.extend(ice_of(&sdp));
            learned.offers.push((i, sdp));
        }
        ServerMessage::TrackPublished { track } => learned.tracks.push(track.id),
        ServerMessage::Joined { participants, .. } => {
            for p in participants {
                learned.tracks.extend(p.tracks.into_iter().map(|t| t.id));
            }
        }
        ServerMessage::ParticipantJoined { participant } => {
            learned
                .tracks
                .extend(participant.tracks.into_iter().map(|t| t.id));
        }
        _ => {}
    }
}

/// Programs that walk the usual paths: two joins, a publish offer, the events, signed STUN
/// checks for the server's credentials, DTLS, time; a subscriber answering; signaling
/// mistakes; a leave.
fn seed_programs() -> Vec<Vec<u8>> {
    let join = |name: u8| vec![Op::Join as u8, 0, 1, name, 1, 0, 1, 1, 1, 1, 1, 0];
    let publish = |who: u8, offer: u8| vec![Op::Client as u8, who, 1, offer, 0];
    let events = vec![Op::Events as u8];
    let stun = |nominate: u8| vec![Op::Stun as u8, 0, 1, 0, 7, nominate, 1, 0];
    let time = |ms: u8| vec![Op::Time as u8, 0, 0, ms];
    let dtls = vec![Op::Template as u8, 0, 0, 0];
    let mut programs = Vec::new();
    let mut p = Vec::new();
    for part in [
        join(b'a'),
        join(b'b'),
        publish(0, 0),
        events.clone(),
        stun(1),
        dtls.clone(),
        time(50),
        stun(0),
        events.clone(),
        vec![Op::Answer as u8],
        time(200),
        events.clone(),
        vec![Op::Client as u8, 1, 4, 2, 0, 0, 1],
        vec![
            Op::Client as u8,
            0,
            6,
            0,
            1,
            2,
            1,
            0,
            0,
            2,
            128,
            1,
            0,
            0,
            1,
            104,
        ],
        vec![Op::Client as u8, 0, 5, 0, 1],
        time(255),
        vec![Op::Client as u8, 0, 8],
        vec![Op::Disconnect as u8, 0, 0],
        time(255),
    ] {
        p.extend(part);
    }
    programs.push(p);
    // Simulcast publisher, then trickle and a renegotiation.
    let mut p = Vec::new();
    for part in [
        join(b'c'),
        publish(0, 1),
        events.clone(),
        vec![
            Op::Client as u8,
            0,
            3,
            1,
            1,
            9,
            0,
            0,
            0,
            1,
            5,
            1,
            0x13,
            0x88,
            0,
        ],
        stun(1),
        time(100),
        publish(0, 0),
        events.clone(),
        vec![Op::Raw as u8, 1, 0, 0, 4, 0x80, 200, 0, 1],
    ] {
        p.extend(part);
    }
    programs.push(p);
    // Signaling in text.
    for msg in seeds::signal_messages("v=0") {
        let mut p = join(b'd');
        p.push(Op::ClientText as u8);
        p.push(0);
        p.extend((msg.len() as u16).to_be_bytes());
        p.extend(msg.as_bytes());
        programs.push(p);
    }
    programs
}

pub fn run() {
    let offers = seeds::sdp_offers();
    let answers = seeds::sdp_answers(&offers);
    let mut templates = vec![seeds::dtls_client_hello()];
    templates.extend(seeds::rtcp_compounds(0xabc).into_iter().take(3));
    templates.extend(
        seeds::vp8_payloads()
            .iter()
            .take(2)
            .map(|p| seeds::rtp_packet(0xabc, 1, 2, 96, p, Some((3, 1)))),
    );
    let ctx = Ctx {
        offers,
        answers,
        templates,
        addrs: (1..=4)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 5000)))
            .collect(),
        server: SocketAddr::from(([10, 0, 0, 100], 7882)),
    };
    let spec = Spec {
        name: "core",
        seeds: seed_programs(),
        dict: (0..OPS).map(|o| vec![o]).collect(),
        default_inputs: 20_000,
        max_len: 4096,
    };
    let mut run = 0u64;
    let mut reach = Reach::default();
    engine::run(spec, |data| {
        run += 1;
        program(data, &ctx, run, &mut reach);
    });
    println!("fuzz core reached: {reach:?}");
    // The programs get past the first doors: joins, offers answered, signed checks answered,
    // a real subscriber's answer.
    assert!(reach.joins > run / 4, "{reach:?}");
    assert!(
        reach.publish_answers > 0 && reach.subscribe_offers > 0,
        "{reach:?}"
    );
    assert!(
        reach.stun_answered > 0 && reach.real_answers > 0,
        "{reach:?}"
    );
    assert!(reach.admin_done > 0, "{reach:?}");
}
