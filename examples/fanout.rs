//! Micro-benchmark of the livestream fan-out's per-copy work, without sockets: one publisher
//! packet sent to N subscribers the way `Sfu::forward_rtp` does it (clone the packet, rewrite
//! its SSRC / sequence number / timestamp, `Egress::protect_rtp`: transport-wide sequence
//! number, NACK history, sender-report counters, marshal, SRTP), the datagrams queued and
//! dropped 64 at a time as the driver's `sendmmsg` batches are. Every subscriber has its own
//! keys and state, so with hundreds of them the per-subscriber state is out of the caches as
//! it is in the server (which `cargo bench --bench forward`, one subscriber, does not show).
//!
//! A counting global allocator reports the heap allocations per copy.
//!
//! ```text
//! cargo run --release --example fanout -- [SUBSCRIBERS] [PACKETS] [gcm|hmac]
//! cargo run --release --example fanout -- 300 2000 gcm
//! ```
//!
//! Prints CPU time (this thread's, `CLOCK_THREAD_CPUTIME_ID`) and allocations per copy.

// A benchmark: it reads the clock, and prints its result.
#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    clippy::print_stdout
)]

use bytes::{Bytes, BytesMut};
use plaza::sfu::egress::{Egress, Outgoing, SrtpKeys};
use rtc::rtp;
use rtc::srtp::protection_profile::ProtectionProfile;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// The system allocator, counting.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator; only counters are added.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        BYTES.fetch_add(layout.size() as u64, Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Relaxed);
        BYTES.fetch_add(new_size as u64, Relaxed);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// This thread's CPU time.
#[allow(unsafe_code)] // clock_gettime(2); see the SAFETY comment
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the call only writes into it.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// A VP8 payload as webrtc-rs's payloader makes it (picture id, keyframe header, filler).
fn vp8_payload(len: usize, picture_id: u16) -> Bytes {
    let mut p = vec![
        0x90,
        0x80,
        0x80 | ((picture_id >> 8) as u8 & 0x7f),
        picture_id as u8,
    ];
    p.extend_from_slice(&[0x10, 0x02, 0x00, 0x9d, 0x01, 0x2a]);
    while p.len() < len {
        p.push((p.len() * 7) as u8);
    }
    Bytes::from(p)
}

struct Sub {
    egress: Egress,
    ssrc: u32,
    seq_offset: u16,
    ts_offset: u32,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let subs: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(300);
    let packets: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(2_000);
    let (profile, salt_len) = match args.get(2).map(String::as_str) {
        Some("hmac") => (ProtectionProfile::Aes128CmHmacSha1_80, 14),
        _ => (ProtectionProfile::AeadAes128Gcm, 12),
    };
    let mut subscribers: Vec<Sub> = (0..subs)
        .map(|i| {
            let b = i as u8;
            let keys = SrtpKeys {
                profile,
                local_key: (0..16).map(|k| k ^ b).collect(),
                local_salt: (0..salt_len as u8).map(|k| k.wrapping_add(b)).collect(),
                remote_key: (16..32).map(|k| k ^ b).collect(),
                remote_salt: (0..salt_len as u8).map(|k| k.wrapping_mul(3) ^ b).collect(),
            };
            Sub {
                egress: Egress::new(&keys).expect("egress"),
                ssrc: 0x1000_0000 + i as u32,
                seq_offset: (i * 7919) as u16,
                ts_offset: (i as u32).wrapping_mul(104_729),
            }
        })
        .collect();
    let source: Vec<rtp::Packet> = (0..1024u16)
        .map(|i| rtp::Packet {
            header: rtp::header::Header {
                version: 2,
                payload_type: 96,
                sequence_number: i,
                timestamp: u32::from(i / 8) * 3000,
                ssrc: 0x1234_5678,
                marker: i % 8 == 7,
                ..Default::default()
            },
            payload: vp8_payload(1_100, i),
        })
        .collect();
    let t0 = Instant::now();
    let mut queue: Vec<BytesMut> = Vec::with_capacity(64);
    let mut wire_bytes = 0usize;
    let mut run = |n: usize, queue: &mut Vec<BytesMut>| {
        for k in 0..n {
            let packet = &source[k % source.len()];
            // One packet every ~5 ms of simulated time (≈ 200 packets/s).
            let now = t0 + Duration::from_micros(5_000 * k as u64);
            for s in subscribers.iter_mut() {
                let mut out = packet.clone();
                out.header.ssrc = s.ssrc;
                out.header.sequence_number =
                    packet.header.sequence_number.wrapping_add(s.seq_offset);
                out.header.timestamp = packet.header.timestamp.wrapping_add(s.ts_offset);
                let wire = s
                    .egress
                    .protect_rtp(
                        now,
                        &mut out,
                        Outgoing::video(Some(3), k % 256 == 0),
                        BytesMut::new(),
                    )
                    .expect("protect");
                wire_bytes += wire.len();
                queue.push(wire);
                if queue.len() == 64 {
                    queue.clear();
                }
            }
        }
        queue.clear();
    };
    // Warm-up: every subscriber's NACK history and TWCC log filled once.
    run(1_100, &mut queue);
    let (a0, b0, c0) = (ALLOCS.load(Relaxed), BYTES.load(Relaxed), thread_cpu());
    run(packets, &mut queue);
    let (a1, b1, c1) = (ALLOCS.load(Relaxed), BYTES.load(Relaxed), thread_cpu());
    let copies = (packets * subs) as f64;
    println!(
        "fanout {profile:?}: {subs} subscribers × {packets} packets of 1100 B: \
         {:.0} ns CPU per copy, {:.2} allocations ({:.0} bytes) per copy; {} B on the wire",
        (c1 - c0).as_nanos() as f64 / copies,
        (a1 - a0) as f64 / copies,
        (b1 - b0) as f64 / copies,
        wire_bytes / (packets + 1_100) / subs.max(1),
    );
}
