//! The real SFU core ([`crate::sfu::Sfu`]) as a node of the simulated network.
//!
//! The node feeds the core what the network delivers (`handle_datagram`, `handle_timeout`,
//! signaling commands through `handle_command`), closes each batch with `end_turn`, and hands
//! the datagrams the core sent (collected by [`SimTransmit`]) back to the network.

use super::net::{Node, Output};
use crate::sfu::{Command, CoreConfig, CoreStats, Sfu, Transmit};
use bytes::BytesMut;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

/// Collects what the core sends until the node drains it.
#[derive(Debug, Default)]
pub struct SimTransmit {
    queue: Vec<(BytesMut, SocketAddr)>,
    /// Datagrams the core has sent.
    pub sent: u64,
    /// Forwarded packets (those with an `origin`).
    pub forwarded: u64,
}

impl Transmit for SimTransmit {
    fn send(&mut self, data: BytesMut, to: SocketAddr, origin: Option<Instant>) {
        self.sent += 1;
        if origin.is_some() {
            self.forwarded += 1;
        }
        self.queue.push((data, to));
    }
}

/// See the module docs.
pub struct SfuNode {
    pub sfu: Sfu<SimTransmit>,
    pub addr: SocketAddr,
    /// How often each timeout reason fired (by its `Debug` text).
    pub timeouts: BTreeMap<String, u64>,
    dirty: bool,
}

/// The core configuration the sim uses: the node's IP announced, default limits.
pub fn sim_config(ip: IpAddr) -> CoreConfig {
    CoreConfig {
        announce_ips: vec![ip],
        max_data_message: 16 * 1024,
        limits: Default::default(),
        udp_buffer: crate::io::UDP_BUFFER_DEFAULT,
        spread_above: 0,
    }
}

impl SfuNode {
    /// A core at `addr` started at `now`, its randomness seeded by `seed`.
    pub fn new(addr: SocketAddr, seed: u64, now: Instant) -> Self {
        let sfu = Sfu::new(
            sim_config(addr.ip()),
            addr,
            seed,
            now,
            SimTransmit::default(),
        );
        SfuNode {
            sfu,
            addr,
            timeouts: BTreeMap::new(),
            dirty: true,
        }
    }
}

impl SfuNode {
    /// The core's counters now (a `Command::Stats` answered within the call).
    pub fn stats(&mut self, now: Instant) -> CoreStats {
        let (reply, mut rx) = tokio::sync::oneshot::channel();
        let _ = self.sfu.handle_command(now, Command::Stats { reply });
        self.sfu.end_turn(now);
        rx.try_recv()
            .expect("the core answers Stats within its turn")
    }
}

impl Node for SfuNode {
    fn name(&self) -> String {
        format!("sfu {}", self.addr)
    }

    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, _to: SocketAddr, data: BytesMut) {
        self.sfu.handle_datagram(now, from, &data);
        self.dirty = true;
    }

    fn handle_timeout(&mut self, now: Instant) {
        if let Some(d) = self.sfu.poll_timeout() {
            *self.timeouts.entry(format!("{:?}", d.reason)).or_default() += 1;
        }
        self.sfu.handle_timeout(now);
        self.dirty = true;
    }

    fn poll_timeout(&mut self) -> Option<Instant> {
        self.sfu.poll_timeout().map(|d| d.at)
    }

    fn handle_command(&mut self, now: Instant, cmd: Command) {
        // `Flow::Stop` (after a shutdown) needs no action here: the node keeps draining.
        let _ = self.sfu.handle_command(now, cmd);
        self.dirty = true;
    }

    fn poll_output(&mut self, now: Instant, out: &mut Output) {
        if self.dirty {
            self.sfu.end_turn(now);
            self.dirty = false;
        }
        for (data, to) in self.sfu.transmit().queue.drain(..) {
            out.datagrams.push((self.addr, to, data));
        }
    }
}
