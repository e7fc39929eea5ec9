//! One UDP port, many connections: which peer connection a datagram belongs to.
//!
//! Pure state, no socket: the core tells it what each connection sends ([`Demux::on_send`]) and
//! asks it where each incoming datagram goes ([`Demux::route`]), which answers with the
//! connection's key or the [`DropReason`].
//!
//! The rules (RFC 8445 §7.2–7.3, with what real clients do):
//!
//! - **STUN requests** (connectivity checks) go by the server's ufrag, the first half of their
//!   USERNAME (`server:client`), from whatever address they come: that is how a connection
//!   learns its client's addresses. The connection checks MESSAGE-INTEGRITY itself.
//! - **STUN responses** go to the connection whose check they answer: the server records the
//!   transaction id and destination of every check a connection sends, and a response is routed
//!   by that transaction id and only if it comes from the address the check went to. Never by
//!   USERNAME: Firefox puts none in its responses and libnice echoes the request's
//!   (`client:server`), whose first half names no server connection. (The server's connections
//!   are ICE-lite, but `rtc`'s agent still sends *triggered* checks when it receives one, and
//!   answers a nominating check only after its own check of that pair succeeded, so routing
//!   these responses is what lets Firefox and libnice connect.) A response to no recorded check
//!   falls back to the address's owner (the same rule as DTLS below).
//! - **Everything else** (DTLS, SRTP, SRTCP, and STUN without USERNAME) only from an address the
//!   connection itself has validated: one it sent a Binding success or a non-STUN datagram to.
//!   A stranger who learns a ufrag still cannot inject DTLS or SRTP.
//! - **Addresses are transport addresses** ([`Remote`]): a UDP client and an ICE-TCP
//!   connection from the same IP and port are two addresses (UDP and TCP ports are numbered
//!   apart), each owned, checked and answered on its own.
//! - **An address belongs to one connection.** A connection claiming an address another live
//!   connection owns gets it only if the owner has received nothing from it for
//!   [`REBIND_AFTER_SILENCE`] (the owner moved away, e.g. a NAT rebinding). Otherwise one forged
//!   check with the attacker's own credentials and a victim's address as source would re-bind
//!   the victim's media to the attacker's connection. Releasing a connection releases only the
//!   addresses it still owns.

use super::Remote;
use super::loglimit::LogLimiter;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// A connection may take over an address owned by another one only after the owner has
/// received nothing from it for this long.
pub const REBIND_AFTER_SILENCE: Duration = Duration::from_secs(5);
/// A check's response is routed by its transaction id for this long after the check was sent
/// (`rtc` gives up on a check well before).
pub const CHECK_TTL: Duration = Duration::from_secs(10);
/// Most checks remembered at once, over all connections (bounded state: a flood of incoming
/// checks makes `rtc` send triggered checks, each remembered here until it expires).
pub const MAX_CHECKS: usize = 16_384;

/// Why a datagram was not delivered to any connection. Counted per reason in `/stats` and `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// A zero-length datagram.
    Empty,
    /// A STUN request whose USERNAME names no connection of this server.
    UnknownUfrag,
    /// A STUN response that answers no check the server sent, from an address no connection
    /// owns.
    UnknownTransaction,
    /// A STUN response to a check the server sent, but from another address than the check
    /// went to.
    ResponseFromOtherAddress,
    /// DTLS, SRTP or other non-STUN traffic from an address no connection has validated.
    UnknownAddress,
}

impl DropReason {
    pub const ALL: [DropReason; 5] = [
        DropReason::Empty,
        DropReason::UnknownUfrag,
        DropReason::UnknownTransaction,
        DropReason::ResponseFromOtherAddress,
        DropReason::UnknownAddress,
    ];

    /// Name used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Empty => "empty",
            DropReason::UnknownUfrag => "unknown_ufrag",
            DropReason::UnknownTransaction => "unknown_transaction",
            DropReason::ResponseFromOtherAddress => "response_from_other_address",
            DropReason::UnknownAddress => "unknown_address",
        }
    }
}

/// Datagrams dropped by the demux, per reason, and connections refused an address another
/// live connection owns; the debug log line for each is rate-limited per reason.
#[derive(Debug, Default)]
pub struct DropCounters {
    counts: [u64; DropReason::ALL.len()],
    rebind_refused: u64,
    log: LogLimiter,
}

/// [`DropCounters`] as `/stats` shows them.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct UdpDrops {
    pub empty: u64,
    pub unknown_ufrag: u64,
    pub unknown_transaction: u64,
    pub response_from_other_address: u64,
    pub unknown_address: u64,
    /// A connection was refused an address another live connection owns.
    pub rebind_refused: u64,
}

impl UdpDrops {
    pub fn merge(&mut self, o: &UdpDrops) {
        let UdpDrops {
            empty,
            unknown_ufrag,
            unknown_transaction,
            response_from_other_address,
            unknown_address,
            rebind_refused,
        } = o;
        self.empty += empty;
        self.unknown_ufrag += unknown_ufrag;
        self.unknown_transaction += unknown_transaction;
        self.response_from_other_address += response_from_other_address;
        self.unknown_address += unknown_address;
        self.rebind_refused += rebind_refused;
    }
}

impl DropCounters {
    pub fn count(&mut self, reason: DropReason, from: Remote, now: Instant) {
        if !from.tcp {
            self.counts[reason as usize] += 1;
        }
        if let Some(held) = self.log.allow(reason.as_str(), now) {
            tracing::debug!(%from, reason = reason.as_str(), similar_not_logged = held, "datagram dropped");
        }
    }

    pub fn rebind_refused(&mut self, to: Remote, now: Instant) {
        self.rebind_refused += 1;
        if let Some(held) = self.log.allow("rebind_refused", now) {
            tracing::debug!(addr = %to, similar_not_logged = held, "address owned by another live connection: not rebound");
        }
    }

    pub fn snapshot(&self) -> UdpDrops {
        let c = |r: DropReason| self.counts[r as usize];
        UdpDrops {
            empty: c(DropReason::Empty),
            unknown_ufrag: c(DropReason::UnknownUfrag),
            unknown_transaction: c(DropReason::UnknownTransaction),
            response_from_other_address: c(DropReason::ResponseFromOtherAddress),
            unknown_address: c(DropReason::UnknownAddress),
            rebind_refused: self.rebind_refused,
        }
    }
}

/// What [`Demux::on_send`] did with an outgoing datagram's destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Nothing to claim (a check, or an address the connection already owns or not validated
    /// by this datagram).
    None,
    /// The address now belongs to the sending connection.
    Claimed,
    /// The address belongs to another live connection: not taken.
    Refused,
}

#[derive(Debug)]
struct Owner<K> {
    key: K,
    /// When a datagram from this address was last routed to its owner.
    last_seen: Instant,
}

#[derive(Debug)]
struct Check<K> {
    key: K,
    to: Remote,
    sent: Instant,
}

#[derive(Debug)]
struct Conn {
    ufrag: String,
    addrs: Vec<Remote>,
}

/// The demultiplexer of one UDP port. `K` names a connection.
#[derive(Debug)]
pub struct Demux<K> {
    ufrags: HashMap<String, K>,
    conns: HashMap<K, Conn>,
    addrs: HashMap<Remote, Owner<K>>,
    checks: HashMap<[u8; 12], Check<K>>,
}

impl<K> Default for Demux<K> {
    fn default() -> Self {
        Demux {
            ufrags: HashMap::new(),
            conns: HashMap::new(),
            addrs: HashMap::new(),
            checks: HashMap::new(),
        }
    }
}

impl<K: Copy + Eq + Hash> Demux<K> {
    pub fn new() -> Self {
        Self::default()
    }

    /// A connection's (server-side) ICE ufrag: a new connection, or a new ufrag after an ICE
    /// restart. STUN requests with the old ufrag name no connection from then on (its agent
    /// would refuse them anyway); the addresses the connection owns stay its own until a check
    /// with the new ufrag moves it elsewhere.
    pub fn register(&mut self, key: K, ufrag: &str) {
        match self.conns.entry(key) {
            Entry::Occupied(mut e) => {
                let conn = e.get_mut();
                if conn.ufrag == ufrag {
                    return;
                }
                if self.ufrags.get(&conn.ufrag) == Some(&key) {
                    self.ufrags.remove(&conn.ufrag);
                }
                conn.ufrag = ufrag.to_owned();
            }
            Entry::Vacant(e) => {
                e.insert(Conn {
                    ufrag: ufrag.to_owned(),
                    addrs: Vec::new(),
                });
            }
        }
        self.ufrags.insert(ufrag.to_owned(), key);
    }

    /// The connection's current ufrag, if it is registered.
    pub fn ufrag_of(&self, key: K) -> Option<&str> {
        self.conns.get(&key).map(|c| c.ufrag.as_str())
    }

    /// The connection is gone: its ufrag, the addresses it still owns and its checks.
    pub fn release(&mut self, key: K) {
        let Some(conn) = self.conns.remove(&key) else {
            return;
        };
        if self.ufrags.get(&conn.ufrag) == Some(&key) {
            self.ufrags.remove(&conn.ufrag);
        }
        for a in conn.addrs {
            if let Entry::Occupied(e) = self.addrs.entry(a) {
                if e.get().key == key {
                    e.remove();
                }
            }
        }
        self.checks.retain(|_, c| c.key != key);
    }

    /// Where an incoming datagram goes.
    pub fn route(&mut self, data: &[u8], from: Remote, now: Instant) -> Result<K, DropReason> {
        let Some(&first) = data.first() else {
            return Err(DropReason::Empty);
        };
        if first < 4 {
            if let Some(stun) = Stun::parse(data) {
                match stun.class {
                    StunClass::Request | StunClass::Indication => {
                        if let Some(user) = stun.username {
                            let local = user.split(':').next().unwrap_or_default();
                            let key = *self.ufrags.get(local).ok_or(DropReason::UnknownUfrag)?;
                            // Consent checks keep the address alive for its owner.
                            if let Some(o) = self.addrs.get_mut(&from) {
                                if o.key == key {
                                    o.last_seen = now;
                                }
                            }
                            return Ok(key);
                        }
                    }
                    StunClass::Success | StunClass::Error => {
                        if let Some(check) = self.checks.get(&stun.transaction) {
                            if check.to != from {
                                return Err(DropReason::ResponseFromOtherAddress);
                            }
                            if now.duration_since(check.sent) <= CHECK_TTL {
                                // An answer to the server's keepalive is a sign of life too.
                                if let Some(o) = self.addrs.get_mut(&from) {
                                    if o.key == check.key {
                                        o.last_seen = now;
                                    }
                                }
                                return Ok(check.key);
                            }
                        }
                        return self.owner(from, now).ok_or(DropReason::UnknownTransaction);
                    }
                }
            }
        }
        self.owner(from, now).ok_or(DropReason::UnknownAddress)
    }

    fn owner(&mut self, from: Remote, now: Instant) -> Option<K> {
        let o = self.addrs.get_mut(&from)?;
        o.last_seen = now;
        Some(o.key)
    }

    /// A connection sends `data` to `to`: remember its checks; a Binding success (sent only
    /// for a check whose MESSAGE-INTEGRITY verified) or any non-STUN datagram (DTLS, SRTP: only
    /// sent on a validated pair) claims the address for it.
    pub fn on_send(&mut self, key: K, data: &[u8], to: Remote, now: Instant) -> Claim {
        let validated = match data {
            [b0, ..] if *b0 < 4 => {
                let Some(stun) = Stun::parse(data) else {
                    return Claim::None;
                };
                match stun.class {
                    StunClass::Request => {
                        self.remember_check(key, stun.transaction, to, now);
                        false
                    }
                    StunClass::Success => true,
                    _ => false,
                }
            }
            [] => false,
            _ => true,
        };
        if !validated {
            return Claim::None;
        }
        match self.addrs.entry(to) {
            Entry::Occupied(mut e) => {
                let o = e.get_mut();
                if o.key == key {
                    return Claim::None;
                }
                if now.saturating_duration_since(o.last_seen) < REBIND_AFTER_SILENCE
                    && self.conns.contains_key(&o.key)
                {
                    return Claim::Refused;
                }
                let old = std::mem::replace(&mut o.key, key);
                o.last_seen = now;
                if let Some(c) = self.conns.get_mut(&old) {
                    c.addrs.retain(|a| *a != to);
                }
            }
            Entry::Vacant(e) => {
                e.insert(Owner {
                    key,
                    last_seen: now,
                });
            }
        }
        if let Some(c) = self.conns.get_mut(&key) {
            c.addrs.push(to);
        }
        Claim::Claimed
    }

    fn remember_check(&mut self, key: K, transaction: [u8; 12], to: Remote, now: Instant) {
        if self.checks.len() >= MAX_CHECKS {
            self.expire(now);
            if self.checks.len() >= MAX_CHECKS {
                return;
            }
        }
        self.checks
            .insert(transaction, Check { key, to, sent: now });
    }

    /// Forget checks older than [`CHECK_TTL`] (call now and then).
    pub fn expire(&mut self, now: Instant) {
        self.checks
            .retain(|_, c| now.saturating_duration_since(c.sent) <= CHECK_TTL);
    }

    /// The addresses a connection owns.
    pub fn addrs_of(&self, key: K) -> &[Remote] {
        self.conns.get(&key).map_or(&[], |c| c.addrs.as_slice())
    }

    /// When a datagram from one of the connection's addresses was last routed to it.
    pub fn last_seen(&self, key: K) -> Option<Instant> {
        self.addrs_of(key)
            .iter()
            .filter_map(|a| self.addrs.get(a))
            .filter(|o| o.key == key)
            .map(|o| o.last_seen)
            .max()
    }

    /// Checks remembered right now.
    pub fn pending_checks(&self) -> usize {
        self.checks.len()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StunClass {
    Request,
    Indication,
    Success,
    Error,
}

/// The parts of a STUN message (RFC 8489) the demux reads.
struct Stun<'a> {
    class: StunClass,
    transaction: [u8; 12],
    username: Option<&'a str>,
}

impl<'a> Stun<'a> {
    fn parse(data: &'a [u8]) -> Option<Self> {
        if data.len() < 20 || data[0] & 0xc0 != 0 || data[4..8] != [0x21, 0x12, 0xa4, 0x42] {
            return None;
        }
        let typ = u16::from_be_bytes([data[0], data[1]]);
        let class = match ((typ >> 7) & 0x2) | ((typ >> 4) & 0x1) {
            0 => StunClass::Request,
            1 => StunClass::Indication,
            2 => StunClass::Success,
            _ => StunClass::Error,
        };
        let mut transaction = [0u8; 12];
        transaction.copy_from_slice(&data[8..20]);
        Some(Stun {
            class,
            transaction,
            username: stun_username(data),
        })
    }
}

/// What a STUN Binding message is, for the ICE-lite handling in the core.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindingKind {
    /// A connectivity check with USE-CANDIDATE (the client nominates the pair).
    Nominating,
    /// Another connectivity check.
    Check,
    /// A Binding success response.
    Success,
}

/// `Some` for a STUN Binding request or success response.
pub fn binding_kind(data: &[u8]) -> Option<BindingKind> {
    let stun = Stun::parse(data)?;
    if u16::from_be_bytes([data[0], data[1]]) & 0x3eef != 0x0001 {
        return None; // not the Binding method
    }
    match stun.class {
        StunClass::Request if has_attribute(data, 0x0025) => Some(BindingKind::Nominating),
        StunClass::Request => Some(BindingKind::Check),
        StunClass::Success => Some(BindingKind::Success),
        _ => None,
    }
}

/// Does the STUN message carry an attribute of type `typ`?
fn has_attribute(data: &[u8], typ: u16) -> bool {
    let len = u16::from_be_bytes([data[2], data[3]]) as usize;
    let Some(body) = data.get(20..20 + len) else {
        return false;
    };
    let mut i = 0;
    while i + 4 <= body.len() {
        let t = u16::from_be_bytes([body[i], body[i + 1]]);
        let alen = u16::from_be_bytes([body[i + 2], body[i + 3]]) as usize;
        if t == typ {
            return true;
        }
        i += 4 + alen.div_ceil(4) * 4;
    }
    false
}

/// The USERNAME attribute of a STUN message, if `data` is one (RFC 8489).
pub fn stun_username(data: &[u8]) -> Option<&str> {
    if data.len() < 20 || data[0] & 0xc0 != 0 {
        return None;
    }
    if data[4..8] != [0x21, 0x12, 0xa4, 0x42] {
        return None;
    }
    let len = u16::from_be_bytes([data[2], data[3]]) as usize;
    let body = data.get(20..20 + len)?;
    let mut i = 0;
    while i + 4 <= body.len() {
        let typ = u16::from_be_bytes([body[i], body[i + 1]]);
        let alen = u16::from_be_bytes([body[i + 2], body[i + 3]]) as usize;
        let value = body.get(i + 4..i + 4 + alen)?;
        if typ == 0x0006 {
            return std::str::from_utf8(value).ok();
        }
        i += 4 + alen.div_ceil(4) * 4;
    }
    None
}

#[cfg(test)]
// Tests pick an arbitrary origin for their virtual time (and may share test state).
#[allow(clippy::disallowed_methods, clippy::disallowed_types)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    const REQUEST: u16 = 0x0001;
    const SUCCESS: u16 = 0x0101;
    const ERROR: u16 = 0x0111;
    const INDICATION: u16 = 0x0011;

    pub(crate) fn stun(typ: u16, txid: u8, user: Option<&str>) -> Vec<u8> {
        let mut attrs = Vec::new();
        if let Some(user) = user {
            attrs.extend_from_slice(&[0x00, 0x06]);
            attrs.extend_from_slice(&(user.len() as u16).to_be_bytes());
            attrs.extend_from_slice(user.as_bytes());
            while attrs.len() % 4 != 0 {
                attrs.push(0);
            }
        }
        let mut m = typ.to_be_bytes().to_vec();
        m.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        m.extend_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
        m.extend_from_slice(&[txid; 12]);
        m.extend_from_slice(&attrs);
        m
    }

    fn addr(port: u16) -> Remote {
        Remote::udp(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    const DTLS: &[u8] = &[22, 254, 253, 0, 0];
    const SRTP: &[u8] = &[0x80, 96, 0, 1];

    fn setup() -> (Demux<u32>, Instant) {
        let mut d = Demux::new();
        d.register(1, "srv1");
        d.register(2, "srv2");
        (d, Instant::now())
    }

    #[test]
    fn a_udp_and_a_tcp_address_with_the_same_ip_and_port_are_two_addresses() {
        let (mut d, now) = setup();
        let udp = addr(9000);
        let tcp = Remote::tcp(udp.addr);
        // Connection 1's client over UDP, connection 2's over TCP, from the same IP and port:
        // each claims its own, neither is refused.
        assert_eq!(d.on_send(1, DTLS, udp, now), Claim::Claimed);
        assert_eq!(d.on_send(2, DTLS, tcp, now), Claim::Claimed);
        assert_eq!(d.route(SRTP, udp, now), Ok(1));
        assert_eq!(d.route(SRTP, tcp, now), Ok(2));
        // A check sent over TCP is answered over TCP, not from the UDP address.
        d.on_send(2, &stun(REQUEST, 5, Some("client:srv2")), tcp, now);
        assert_eq!(
            d.route(&stun(SUCCESS, 5, None), udp, now),
            Err(DropReason::ResponseFromOtherAddress)
        );
        assert_eq!(d.route(&stun(SUCCESS, 5, None), tcp, now), Ok(2));
        d.release(2);
        assert_eq!(d.route(SRTP, udp, now), Ok(1));
        assert_eq!(d.route(SRTP, tcp, now), Err(DropReason::UnknownAddress));
    }

    #[test]
    fn requests_go_by_the_server_ufrag_from_any_address() {
        let (mut d, now) = setup();
        let m = stun(REQUEST, 1, Some("srv2:client"));
        assert_eq!(d.route(&m, addr(9000), now), Ok(2));
        assert_eq!(d.route(&m, addr(9001), now), Ok(2));
        let m = stun(REQUEST, 1, Some("nobody:client"));
        assert_eq!(d.route(&m, addr(9000), now), Err(DropReason::UnknownUfrag));
    }

    #[test]
    fn an_ice_restart_moves_requests_to_the_new_ufrag_and_keeps_the_addresses() {
        let (mut d, now) = setup();
        assert_eq!(d.on_send(1, DTLS, addr(9000), now), Claim::Claimed);
        d.register(1, "srv1-restarted");
        assert_eq!(d.ufrag_of(1), Some("srv1-restarted"));
        let old = stun(REQUEST, 1, Some("srv1:client"));
        assert_eq!(
            d.route(&old, addr(9000), now),
            Err(DropReason::UnknownUfrag)
        );
        let new = stun(REQUEST, 2, Some("srv1-restarted:client2"));
        assert_eq!(d.route(&new, addr(9100), now), Ok(1));
        // Media from the address it had keeps flowing until the client moves.
        assert_eq!(d.route(SRTP, addr(9000), now), Ok(1));
        // The new address is the connection's once it answers a check from there.
        assert_eq!(
            d.on_send(1, &stun(SUCCESS, 2, None), addr(9100), now),
            Claim::Claimed
        );
        assert_eq!(d.route(SRTP, addr(9100), now), Ok(1));
        d.release(1);
        assert_eq!(
            d.route(&new, addr(9100), now),
            Err(DropReason::UnknownUfrag)
        );
        assert_eq!(
            d.route(SRTP, addr(9100), now),
            Err(DropReason::UnknownAddress)
        );
    }

    #[test]
    fn firefox_response_without_username_reaches_the_connection_that_checked() {
        let (mut d, now) = setup();
        // The server's connection 1 answers nothing yet but sends a triggered check.
        assert_eq!(
            d.on_send(1, &stun(REQUEST, 7, Some("client:srv1")), addr(9000), now),
            Claim::None
        );
        // Firefox answers from the checked address, with no USERNAME.
        let resp = stun(SUCCESS, 7, None);
        assert_eq!(d.route(&resp, addr(9000), now), Ok(1));
        // DTLS from there is still refused until the connection has validated the address.
        assert_eq!(
            d.route(DTLS, addr(9000), now),
            Err(DropReason::UnknownAddress)
        );
        assert_eq!(d.on_send(1, DTLS, addr(9000), now), Claim::Claimed);
        assert_eq!(d.route(DTLS, addr(9000), now), Ok(1));
    }

    #[test]
    fn libnice_response_echoing_the_request_username_is_routed_by_transaction() {
        let (mut d, now) = setup();
        d.on_send(2, &stun(REQUEST, 9, Some("nice:srv2")), addr(9100), now);
        // libnice echoes `client:server`: its first half names no server connection.
        let resp = stun(SUCCESS, 9, Some("nice:srv2"));
        assert_eq!(d.route(&resp, addr(9100), now), Ok(2));
        // An error response to the check goes there too.
        d.on_send(2, &stun(REQUEST, 10, Some("nice:srv2")), addr(9100), now);
        assert_eq!(d.route(&stun(ERROR, 10, None), addr(9100), now), Ok(2));
    }

    #[test]
    fn response_from_another_address_or_to_no_check_is_dropped() {
        let (mut d, now) = setup();
        d.on_send(1, &stun(REQUEST, 3, Some("c:srv1")), addr(9000), now);
        assert_eq!(
            d.route(&stun(SUCCESS, 3, None), addr(9999), now),
            Err(DropReason::ResponseFromOtherAddress)
        );
        assert_eq!(
            d.route(&stun(SUCCESS, 4, None), addr(9000), now),
            Err(DropReason::UnknownTransaction)
        );
        // ... unless the address is validated: then its owner gets it (rtc drops what it did
        // not ask for).
        d.on_send(1, &stun(SUCCESS, 5, None), addr(9000), now);
        assert_eq!(d.route(&stun(SUCCESS, 4, None), addr(9000), now), Ok(1));
    }

    #[test]
    fn checks_expire() {
        let (mut d, now) = setup();
        d.on_send(1, &stun(REQUEST, 3, Some("c:srv1")), addr(9000), now);
        let later = now + CHECK_TTL + Duration::from_secs(1);
        assert_eq!(
            d.route(&stun(SUCCESS, 3, None), addr(9000), later),
            Err(DropReason::UnknownTransaction)
        );
        d.expire(later);
        assert_eq!(d.pending_checks(), 0);
    }

    #[test]
    fn remembered_checks_are_bounded() {
        let (mut d, now) = setup();
        for i in 0..(MAX_CHECKS as u32 + 100) {
            let mut m = stun(REQUEST, 0, Some("c:srv1"));
            m[8..12].copy_from_slice(&i.to_be_bytes());
            d.on_send(1, &m, addr(9000), now);
        }
        assert_eq!(d.pending_checks(), MAX_CHECKS);
    }

    #[test]
    fn media_only_from_validated_addresses() {
        let (mut d, now) = setup();
        assert_eq!(
            d.route(SRTP, addr(9000), now),
            Err(DropReason::UnknownAddress)
        );
        // A Binding success sent there validates the address for its sender.
        assert_eq!(
            d.on_send(2, &stun(SUCCESS, 1, None), addr(9000), now),
            Claim::Claimed
        );
        assert_eq!(d.route(SRTP, addr(9000), now), Ok(2));
        assert_eq!(d.route(&stun(INDICATION, 1, None), addr(9000), now), Ok(2));
        // An error response or a check validates nothing.
        assert_eq!(
            d.on_send(2, &stun(ERROR, 1, None), addr(9001), now),
            Claim::None
        );
        assert_eq!(
            d.route(SRTP, addr(9001), now),
            Err(DropReason::UnknownAddress)
        );
        assert_eq!(d.route(&[], addr(9001), now), Err(DropReason::Empty));
    }

    #[test]
    fn a_live_connections_address_is_never_rebound() {
        // The spoofed-check attack: connection 2 (the attacker's) answers a check that carried
        // its own valid credentials but the victim's address as source.
        let (mut d, now) = setup();
        d.on_send(1, DTLS, addr(9000), now);
        let t = now + Duration::from_secs(1);
        assert_eq!(d.route(SRTP, addr(9000), t), Ok(1));
        assert_eq!(
            d.on_send(2, &stun(SUCCESS, 1, None), addr(9000), t),
            Claim::Refused
        );
        assert_eq!(d.on_send(2, SRTP, addr(9000), t), Claim::Refused);
        // The victim keeps its media.
        let t2 = t + REBIND_AFTER_SILENCE * 3;
        for s in 0..30u64 {
            let at = t + Duration::from_millis(s * 500);
            assert_eq!(d.route(SRTP, addr(9000), at), Ok(1));
            assert_eq!(d.on_send(2, SRTP, addr(9000), at), Claim::Refused);
        }
        assert_eq!(d.route(SRTP, addr(9000), t2), Ok(1));
    }

    #[test]
    fn a_silent_owners_address_can_move_and_release_keeps_the_new_owner() {
        let (mut d, now) = setup();
        d.on_send(1, DTLS, addr(9000), now);
        let later = now + REBIND_AFTER_SILENCE + Duration::from_millis(1);
        assert_eq!(d.on_send(2, DTLS, addr(9000), later), Claim::Claimed);
        assert_eq!(d.route(SRTP, addr(9000), later), Ok(2));
        assert!(d.addrs_of(1).is_empty());
        // Connection 1 leaves: the address stays with 2.
        d.release(1);
        assert_eq!(d.route(SRTP, addr(9000), later), Ok(2));
        d.release(2);
        assert_eq!(
            d.route(SRTP, addr(9000), later),
            Err(DropReason::UnknownAddress)
        );
        assert_eq!(
            d.route(&stun(REQUEST, 1, Some("srv2:c")), addr(9000), later),
            Err(DropReason::UnknownUfrag)
        );
    }

    #[test]
    fn an_address_of_a_departed_connection_is_free() {
        let (mut d, now) = setup();
        d.on_send(1, DTLS, addr(9000), now);
        d.release(1);
        assert_eq!(d.on_send(2, DTLS, addr(9000), now), Claim::Claimed);
    }

    #[test]
    fn binding_kinds() {
        let mut nominating = stun(REQUEST, 1, Some("s:c"));
        // USE-CANDIDATE: type 0x0025, length 0.
        nominating.extend_from_slice(&[0x00, 0x25, 0, 0]);
        let len = (nominating.len() - 20) as u16;
        nominating[2..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(binding_kind(&nominating), Some(BindingKind::Nominating));
        assert_eq!(
            binding_kind(&stun(REQUEST, 1, Some("s:c"))),
            Some(BindingKind::Check)
        );
        assert_eq!(
            binding_kind(&stun(SUCCESS, 1, None)),
            Some(BindingKind::Success)
        );
        assert_eq!(binding_kind(&stun(ERROR, 1, None)), None);
        assert_eq!(binding_kind(&stun(INDICATION, 1, None)), None);
        // Another method (Allocate, 0x0003) is not a binding.
        assert_eq!(binding_kind(&stun(0x0003, 1, None)), None);
        assert_eq!(binding_kind(DTLS), None);
    }

    #[test]
    fn stun_username_is_found() {
        let m = stun(REQUEST, 1, Some("server:client"));
        assert_eq!(stun_username(&m), Some("server:client"));
    }

    #[test]
    fn parsers_survive_garbage() {
        let (mut d, now) = setup();
        let mut x: u32 = 0x1234_5678;
        for len in 0..300 {
            let mut v = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                v.push(x as u8);
            }
            if len >= 8 {
                v[0] &= 0x03;
                v[4..8].copy_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
            }
            let _ = stun_username(&v);
            let _ = d.route(&v, addr(9000), now);
            let _ = d.on_send(1, &v, addr(9001), now);
        }
        let mut m = stun(REQUEST, 1, Some("a:b"));
        m.truncate(m.len() - 2);
        assert_eq!(stun_username(&m), None);
    }
}
