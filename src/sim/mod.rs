//! Virtual-time simulation: the real SFU core and in-memory `rtc` client peers on a
//! simulated network, driven by one virtual clock.
//!
//! - [`net`]: [`Net`], the network. Nodes are sans-I/O state machines with addresses;
//!   directed links have a delay, a loss probability (seeded) and an optional rate limit with
//!   a tail-drop queue. [`Net::step`] jumps the clock to the earliest event (a datagram
//!   arriving or a node's deadline) and handles it; [`Net::run_for`],
//!   [`Net::run_until`] and [`Net::run_until_cond`] run many steps. The clock starts at
//!   one real `Instant` and is only ever advanced by the network, so minutes of media take
//!   milliseconds and the same seed gives the same run.
//! - [`peer`]: [`Peer`], an `rtc` 0.21 peer connection with a synthetic media source (Opus,
//!   VP8 with real payload descriptors, simulcast `q`/`h`/`f` with RID header extensions,
//!   keyframes on PLI/FIR) and a recorder of what it receives (per track: SSRC, sequence
//!   numbers, timestamps, VP8 picture ids, keyframes, arrival times; inbound RTCP).
//! - [`client`]: [`Client`], a Plaza participant: a publisher and a subscriber peer and the
//!   signaling session, spoken directly to the server node's command interface.
//! - Data channels: a [`Peer`] records every channel that opens ([`Peer::channels`], with
//!   the virtual time) and every message it receives ([`RxData`]: channel label, text or
//!   binary, bytes, virtual arrival time), and sends on an open channel with
//!   [`Peer::send_data`] or opens its own with [`Peer::create_data_channel`]. A [`Client`]
//!   gets the server's `chat` and `input` channels on its subscriber connection, queues
//!   messages with [`Client::send_data`] (the envelope built by [`envelope`]; each is recorded
//!   with its virtual send time in [`Client::data_sent`]) and reads what was relayed, the
//!   server's `from` header parsed, with [`Client::data_received`].
//! - Lifecycle: a link's loss set to 1.0 both ways ([`Net::link_mut`]) is a dead network; a
//!   client whose link is dead from the start never connects, and the timeouts that remove
//!   participants (connect timeout, ICE failure) run on the virtual clock.
//! - Shards: [`server::add_shards`] adds several [`server::SfuNode`]s as the shards of one
//!   server, as `--workers N` runs them: shard `i` at the server's IP and port `+ i`, with its
//!   own seed ([`server::shard_seed`]; shard 0 keeps the server's), rooms spreading over them
//!   past `spread_above` participants. [`Net::set_shards`] then routes signaling as the real
//!   `SfuHandle` does: a join goes to the shard the real
//!   [`Placement`](crate::sfu::placement::Placement) reserves, its `peers` filled in from it,
//!   and the placement learns the participant's shard when the join is accepted; every other
//!   command goes to the participant's shard, and a [`Client`]'s `disconnect` (sent once when
//!   it leaves or the core closes its event channel, as the WebSocket session does) frees its
//!   place. The batches a core hands to `Transmit::pipe` at the end of its turn travel as
//!   events of the network to the destination shard's `Sfu::handle_pipe`, after
//!   [`PipeConfig::delay`] (default 5 µs), FIFO per pair of shards like the real mpsc; with
//!   [`PipeConfig::capacity`] a shard's queue holds that many batches in flight and a batch
//!   that finds it full is dropped whole, counted per pair ([`Net::pipe_stats`]) and in the
//!   sender's `CoreStats::pipe_msgs_dropped`, never waited for. [`Net::set_pipe`] changes
//!   both mid-run. A network without [`Net::set_shards`] has one server node
//!   ([`Net::set_signaling_server`]) and nothing is piped.
//! - [`PeerNode`]: one bare peer as a node, for tests of the network and the peers
//!   themselves (two peers talking to each other without a server).
//!
//! A test builds a [`Net`], adds nodes, runs the clock and asserts on what the nodes
//! recorded; see `tests/integration/virtual_time.rs` and "Virtual-time tests" in `docs/ARCHITECTURE.md`.

pub mod client;
pub mod net;
pub mod peer;
pub mod server;

pub use client::{Client, DataIn, envelope, envelope_seq};
pub use net::{LinkConfig, LinkStats, Net, Node, NodeId, Output, PipeConfig, PipeStats};
pub use peer::{
    ChannelInfo, LayerSpec, MediaSpec, Peer, RtcpIn, RxData, RxPacket, RxTrack, Vp8Info,
};

use bytes::BytesMut;
use std::net::SocketAddr;
use std::time::Instant;

/// A single [`Peer`] as a network node (its address is the peer's local address).
pub struct PeerNode(pub Peer);

impl Node for PeerNode {
    fn name(&self) -> String {
        self.0.name.clone()
    }
    fn handle_datagram(&mut self, now: Instant, from: SocketAddr, _to: SocketAddr, data: BytesMut) {
        self.0.handle_datagram(now, from, data);
    }
    fn handle_timeout(&mut self, now: Instant) {
        self.0.handle_timeout(now);
    }
    fn poll_timeout(&mut self) -> Option<Instant> {
        self.0.poll_timeout()
    }
    fn poll_output(&mut self, now: Instant, out: &mut Output) {
        self.0.poll_output(now, out);
    }
}
