//! Helpers shared by the virtual-time tests.
#![allow(dead_code)]

use plaza::sim::{RxPacket, RxTrack};
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
