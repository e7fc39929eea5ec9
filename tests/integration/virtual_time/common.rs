//! Helpers shared by the virtual-time tests.
#![allow(dead_code)]

use plaza::sfu::CoreConfig;
use plaza::sfu::CoreStats;
use plaza::signal::ServerMessage;
use plaza::sim::server::SfuNode;
use plaza::sim::{Client, MediaSpec, Net, NodeId, RxPacket, RxTrack};
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

/// `10.0.0.n:port`.
pub fn addr(n: u8, port: u16) -> SocketAddr {
    SocketAddr::new(ip(n), port)
}

pub fn ip(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, n))
}

/// A stable digest of what a receiver saw: per packet, its arrival relative to `t0`, its
/// sequence number and timestamp relative to the first packet, its size and VP8 fields.
/// Packets that arrive at the same virtual instant are hashed in a canonical order: their
/// order carries no meaning, and `rtc` emits some of them (NACK retransmissions of several
/// streams) in `HashMap` order, which differs from run to run.
pub fn digest(t0: Instant, tracks: &[&RxTrack]) -> u64 {
    let mut h = DefaultHasher::new();
    for t in tracks {
        let Some(first) = t.packets.first() else {
            0u8.hash(&mut h);
            continue;
        };
        let mut rows: Vec<_> = t
            .packets
            .iter()
            .map(|p| {
                (
                    p.at - t0,
                    p.seq.wrapping_sub(first.seq),
                    p.ts.wrapping_sub(first.ts),
                    p.len,
                    p.marker,
                    p.vp8.map(|v| (v.keyframe, v.layer, v.frame, v.size)),
                )
            })
            .collect();
        rows.sort();
        rows.hash(&mut h);
    }
    h.finish()
}

/// Sequence numbers of `packets` unwrapped to u64 (first one = its own value).
pub fn unwrap_seqs<'a>(packets: impl Iterator<Item = &'a RxPacket>) -> Vec<u64> {
    let mut out = Vec::new();
    let mut last: Option<u64> = None;
    for p in packets {
        let v = match last {
            None => u64::from(p.seq),
            Some(l) => {
                let delta = p.seq.wrapping_sub(l as u16) as i16;
                (l as i64 + i64::from(delta)) as u64
            }
        };
        out.push(v);
        last = Some(v);
    }
    out
}

/// Milliseconds, for printing.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What `viewer` has received of `track` (nothing yet: empty).
pub fn rx(net: &Net, viewer: NodeId, track: &str) -> RxTrack {
    net.node_ref::<Client>(viewer)
        .subscriber
        .tracks
        .get(track)
        .cloned()
        .unwrap_or_default()
}

/// Runs until `viewer` receives video of layer `layer` on `track`, for at most `max`; returns
/// the time taken.
pub fn wait_layer(
    net: &mut Net,
    viewer: NodeId,
    track: &str,
    layer: u8,
    max: Duration,
) -> Option<Duration> {
    net.run_until_cond(max, |net| {
        net.node_ref::<Client>(viewer)
            .subscriber
            .tracks
            .get(track)
            .and_then(|t| t.current_layer())
            == Some(layer)
    })
}

/// A server at `10.0.0.100:7882` and clients in rooms of their choosing, on one network.
pub struct Sim {
    pub net: Net,
    pub server: NodeId,
}

impl Sim {
    pub fn new(seed: u64) -> Self {
        let mut net = Net::new(seed);
        let now = net.now();
        let sa = addr(100, 7882);
        // The server first: see `Net::settle`.
        let server = net.add_node(SfuNode::new(sa, seed, now), &[sa]);
        net.set_signaling_server(server);
        Sim { net, server }
    }

    /// A server with its own core configuration (the sim's default otherwise).
    pub fn with_config(seed: u64, f: impl FnOnce(&mut CoreConfig)) -> Self {
        let mut net = Net::new(seed);
        let now = net.now();
        let sa = addr(100, 7882);
        let mut cfg = plaza::sim::server::sim_config(sa.ip());
        f(&mut cfg);
        let server = net.add_node(SfuNode::with_config(cfg, sa, seed, now), &[sa]);
        net.set_signaling_server(server);
        Sim { net, server }
    }

    /// A client at `10.0.0.n` that joins `room` as `name` and publishes `media`.
    pub fn client(&mut self, n: u8, name: &str, room: &str, media: MediaSpec) -> NodeId {
        self.client_with(n, name, room, media, |c| c)
    }

    /// A client as [`Sim::client`], set up by `f` before it joins.
    pub fn client_with(
        &mut self,
        n: u8,
        name: &str,
        room: &str,
        media: MediaSpec,
        f: impl FnOnce(Client) -> Client,
    ) -> NodeId {
        let now = self.net.now();
        let c = Client::new(name, room, ip(n), now, u64::from(n) * 1000, media).expect(name);
        let c = f(c);
        let addrs = c.addrs();
        self.net.add_node(c, &addrs)
    }

    pub fn c(&mut self, id: NodeId) -> &mut Client {
        self.net.node::<Client>(id)
    }

    /// What `viewer` has received of `track` (nothing yet: empty).
    pub fn rx(&mut self, viewer: NodeId, track: &str) -> RxTrack {
        rx(&self.net, viewer, track)
    }

    /// Runs until `viewer` receives video of layer `layer` on `track`; returns the time taken.
    pub fn wait_layer(
        &mut self,
        viewer: NodeId,
        track: &str,
        layer: u8,
        max: Duration,
    ) -> Option<Duration> {
        wait_layer(&mut self.net, viewer, track, layer, max)
    }

    /// The participant id of a client that has joined.
    pub fn pid(&mut self, id: NodeId) -> String {
        let c = self.c(id);
        c.participant_id
            .clone()
            .unwrap_or_else(|| panic!("{} has not joined", c.name))
    }

    /// Run until every client in `ids` has both data channels open (at most `max`); returns
    /// the virtual time it took.
    pub fn wait_channels(&mut self, ids: &[NodeId], max: Duration) -> Duration {
        let took = self.net.run_until_cond(max, |net| {
            ids.iter()
                .all(|&id| net.node_ref::<Client>(id).channels_open())
        });
        took.unwrap_or_else(|| {
            let open: Vec<_> = ids
                .iter()
                .map(|&id| {
                    let c = self.net.node_ref::<Client>(id);
                    (c.name.clone(), c.channels_open())
                })
                .collect();
            panic!("data channels not open within {max:?}: {open:?}")
        })
    }

    /// The core's counters now.
    pub fn stats(&mut self) -> CoreStats {
        let now = self.net.now();
        self.net.node::<SfuNode>(self.server).stats(now)
    }

    /// Set the loss of both directions between client `id` and the server (1.0 cuts it).
    pub fn set_loss(&mut self, id: NodeId, loss: f64) {
        let server = self.server;
        self.net.link_mut(id, server).loss = loss;
        self.net.link_mut(server, id).loss = loss;
    }

    /// Messages of the kind `f` picks that client `id` got, with their virtual arrival.
    pub fn messages(&mut self, id: NodeId, f: impl Fn(&ServerMessage) -> bool) -> Vec<Instant> {
        self.c(id)
            .messages
            .iter()
            .filter(|(_, m)| f(m))
            .map(|(t, _)| *t)
            .collect()
    }

    /// Assert no client in `ids` (nor its peers) recorded an error.
    pub fn no_errors(&mut self, ids: &[NodeId]) {
        for &id in ids {
            let c = self.c(id);
            assert!(c.errors.is_empty(), "{}: {:?}", c.name, c.errors);
            let sub = &c.subscriber.errors;
            assert!(sub.is_empty(), "{} subscriber: {sub:?}", c.name);
            if let Some(p) = c.publisher.as_ref() {
                assert!(p.errors.is_empty(), "{} publisher: {:?}", c.name, p.errors);
            }
        }
    }
}
