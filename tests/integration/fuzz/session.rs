//! Real sessions driven by the input: a server and three `rtc` clients on the simulated
//! network (`plaza::sim`, virtual time), connected with media and data channels flowing, then
//! the input's program: client messages built field by field (with the room's real track and
//! participant ids) or decoded from the input's text, data-channel messages (envelopes to real
//! and made-up recipients, or raw bytes), simulcast layers switched off and on, keyframe
//! requests, link loss, virtual time. The core must never panic, and must still answer.
//!
//! A fresh world per input (so a crashing input replays alone): about a hundred inputs a
//! second, so `PLAZA_FUZZ_INPUTS` counts thousands here (see `SCALE`).

use super::core::{Ctx, Learned, client_message, string};
use super::engine::{self, Spec, Unstructured};
use super::seeds;
use bytes::BytesMut;
use plaza::sim::server::SfuNode;
use plaza::sim::{Client, MediaSpec, Net, Node, NodeId, envelope};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// Inputs here per `PLAZA_FUZZ_INPUTS` given: this target runs 1/SCALE as many.
pub const SCALE: u64 = 1000;

struct World {
    net: Net,
    server: NodeId,
    clients: Vec<NodeId>,
}

fn ip(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
}

fn world(seed: u64) -> World {
    let mut net = Net::new(seed);
    let now = net.now();
    let sa = SocketAddr::new(ip(100), 7882);
    let server = net.add_node(SfuNode::new(sa, seed, now), &[sa]);
    net.set_signaling_server(server);
    let mut clients = Vec::new();
    for (n, name, media) in [
        (1, "alice", MediaSpec::simulcast()),
        (2, "bob", MediaSpec::audio_video()),
        (3, "carol", MediaSpec::none()),
    ] {
        let c = Client::new(name, "room", ip(n), now, u64::from(n) * 1000 + seed, media)
            .expect("client");
        let addrs = c.addrs();
        clients.push(net.add_node(c, &addrs));
    }
    let ids = clients.clone();
    net.run_until_cond(Duration::from_secs(10), |net| {
        ids.iter()
            .all(|&id| net.node_ref::<Client>(id).channels_open())
    })
    .expect("the clients connect");
    World {
        net,
        server,
        clients,
    }
}

/// What the programs did, summed over a run.
#[derive(Debug, Default)]
struct Reach {
    forwarded: u64,
    data_relayed: u64,
    keyframe_requests: u64,
    errors_to_clients: u64,
}

fn program(data: &[u8], ctx: &Ctx, seed: u64, reach: &mut Reach) {
    let mut w = world(seed);
    let mut u = Unstructured::new(data);
    let mut steps = 0;
    while !u.is_empty() && steps < 32 {
        steps += 1;
        let c = w.clients[u.below(w.clients.len())];
        let op = u.below(10);
        match op {
            0 | 1 => {
                let client = w.net.node::<Client>(c);
                let learned = Learned {
                    tracks: client
                        .announced_tracks()
                        .into_iter()
                        .map(|t| t.id)
                        .collect(),
                    ..Default::default()
                };
                let msg = client_message(&mut u, ctx, &learned);
                client.send(msg);
            }
            2 => {
                let t = String::from_utf8_lossy(u.bytes_long(4096)).into_owned();
                if let Ok(msg) = plaza::signal::decode_client(&t) {
                    w.net.node::<Client>(c).send(msg);
                }
            }
            3 => {
                let pids: Vec<String> = w
                    .clients
                    .clone()
                    .iter()
                    .filter_map(|&id| w.net.node::<Client>(id).participant_id.clone())
                    .collect();
                let label = if u.bool() { "chat" } else { "input" };
                let msg = if u.bool() {
                    let to: Vec<String> = (0..u.below(4))
                        .map(|_| {
                            if u.bool() && !pids.is_empty() {
                                pids[u.below(pids.len())].clone()
                            } else {
                                string(&mut u, 8)
                            }
                        })
                        .collect();
                    let to: Vec<&str> = to.iter().map(String::as_str).collect();
                    let size = usize::from(u.u16());
                    envelope(&to, &vec![b'x'; size])
                } else {
                    u.bytes_long(2048).to_vec()
                };
                w.net.node::<Client>(c).send_data(label, u.bool(), msg);
            }
            4 => {
                let rid = ["q", "h", "f"][u.below(3)];
                let active = u.bool();
                if let Some(p) = w.net.node::<Client>(c).publisher.as_mut() {
                    p.set_layer_active(rid, active);
                }
            }
            5 => {
                let now = w.net.now();
                let client = w.net.node::<Client>(c);
                let tracks = client.announced_tracks();
                if !tracks.is_empty() {
                    let t = &tracks[u.below(tracks.len())];
                    let _ = client.subscriber.send_pli(now, &t.id);
                }
            }
            6 => {
                let loss = [0.0, 0.05, 0.3, 1.0][u.below(4)];
                let server = w.server;
                w.net.link_mut(c, server).loss = loss;
                w.net.link_mut(server, c).loss = loss;
            }
            8 => {
                // A datagram from the client's own (validated) address: DTLS records on the
                // established association, SRTP/SRTCP that fails authentication, STUN, junk.
                let from = w.net.node::<Client>(c).addrs()[u.below(2)];
                let mut d = match u.below(4) {
                    0 => vec![0x17, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 9, 0, 32],
                    1 => vec![0x15, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 9, 0, 2],
                    2 => vec![0x16, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 9, 0, 48, 1],
                    _ => Vec::new(),
                };
                d.extend_from_slice(u.bytes_long(1500));
                let now = w.net.now();
                let server = w.server;
                let node = w.net.node::<SfuNode>(server);
                let to = node.addr;
                Node::handle_datagram(node, now, from, to, BytesMut::from(&d[..]));
            }
            _ => {
                let ms = u64::from(u.u16() % 3000);
                w.net.run_for(Duration::from_millis(ms));
            }
        }
        w.net.run_for(Duration::from_millis(20));
    }
    w.net.run_for(Duration::from_millis(500));
    let now = w.net.now();
    let stats = w.net.node::<SfuNode>(w.server).stats(now);
    assert!(stats.participants <= 3, "{stats:?}");
    reach.forwarded += stats.rtp_packets_forwarded;
    reach.data_relayed += stats.data_messages_relayed;
    reach.keyframe_requests += stats.keyframe_requests;
    for &c in &w.clients {
        reach.errors_to_clients += w
            .net
            .node::<Client>(c)
            .count_messages(|m| matches!(m, plaza::signal::ServerMessage::Error { .. }))
            as u64;
    }
}

/// Programs that use every action once, with the room's real ids.
fn seed_programs() -> Vec<Vec<u8>> {
    vec![
        // carol unsubscribes from a real track, sets a quality, bob mutes, alice's layer off.
        vec![
            2, 0, 4, 1, 0, 0, 0, 0, 0, 7, 0, 200, 0, 0, 6, 0, 1, 2, 1, 0, 0, 1, 5, 0, 1, 1, 0, 5,
            0, 0, 1, 0, 4, 1, 0, 7, 0, 250,
        ],
        // data to real and made-up recipients, a PLI, loss, time.
        vec![
            0, 3, 1, 1, 2, 1, 0, 0, 3, b'P', b'A', b'_', 0, 64, 1, 2, 5, 0, 6, 3, 0, 7, 3, 232, 0,
            6, 0, 2, 3, 0, 0, 4, 0,
        ],
        // renegotiation with a real offer; leave.
        vec![0, 0, 1, 0, 0, 0, 7, 1, 0, 1, 1, 8],
    ]
}

pub fn run() {
    let offers = seeds::sdp_offers();
    let answers = seeds::sdp_answers(&offers);
    let ctx = Ctx {
        offers,
        answers,
        templates: Vec::new(),
        addrs: Vec::new(),
        server: SocketAddr::new(ip(100), 7882),
    };
    let spec = Spec {
        name: "session",
        seeds: seed_programs(),
        dict: Vec::new(),
        default_inputs: 100,
        max_len: 1024,
    };
    let mut n = 0u64;
    let mut reach = Reach::default();
    engine::run_scaled(spec, SCALE, |data| {
        n += 1;
        program(data, &ctx, n % 16, &mut reach);
    });
    println!("fuzz session reached: {reach:?}");
    assert!(
        reach.forwarded > 0
            && reach.data_relayed > 0
            && reach.keyframe_requests > 0
            && reach.errors_to_clients > 0,
        "{reach:?}"
    );
}
