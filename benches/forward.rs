//! Micro-benchmarks of the per-packet path, without sockets:
//!
//! - `downtrack/*`: what `Core::forward_rtp` does per subscriber before handing the packet to
//!   `rtc` — layer selection, sequence/timestamp rewrite, the packet clone, and (VP8) the
//!   payload copy + picture-id munging — for 1, 10 and 50 subscribers;
//! - `rewrite/*`, `selector/*`: the pieces alone;
//! - `rtp/*`: marshalling the RTP packet (what `rtc` does before SRTP);
//! - `egress/*`: the whole per-subscriber fast path after the rewrite
//!   (`Egress::protect_rtp`: transport-wide sequence number, NACK history, sender-report
//!   counters, marshal, SRTP) for both profiles; `egress/on_rtcp_twcc/*`: one subscriber
//!   feedback (`Egress::on_rtcp`: receiver report + transport-cc for 10 sent packets, SRTCP
//!   decrypt, parse, TWCC log, bandwidth estimator);
//! - `udp/sendmmsg_64`: the kernel's part, per datagram: `OutQueue::send` of 64 datagrams of
//!   1100 bytes to 8 loopback sockets, each with a thread blocked on it (on loopback the
//!   delivery into the receiving socket, and waking its thread, run in the sender's system
//!   call, so they are included); `udp/sendmmsg_64_unwoken`: the same with no thread waiting
//!   on the sockets (they are emptied every millisecond), so no wake-up is paid;
//!   `udp/sendmmsg_64_unwoken_stamped`: the same with the receiving sockets asking for the
//!   kernel's receive stamps (`SO_TIMESTAMPNS`, which each shard's media socket sets): what
//!   stamping every received datagram adds;
//! - `srtp/*`: SRTP protect (server → subscriber) and unprotect (publisher → server) with both
//!   negotiated profiles, AEAD-AES-128-GCM (webrtc-rs peers) and AES-CM-128-HMAC-SHA1-80
//!   (Chromium unless offered GCM only), for a 1100-byte video and a 100-byte audio payload.
//!
//! `cargo bench --bench forward` (add `-- --quick` for a shorter run). Numbers are per packet
//! (`downtrack/…/N` is per packet to N subscribers: divide by N).
//!
//! Time is the benchmark thread's **CPU time** (`CLOCK_THREAD_CPUTIME_ID`, ns), not wall
//! time: on a shared, loaded machine wall time mostly measures the wait for a core. Cache and
//! SMT interference from other processes still show, so compare runs at similar load.

// A benchmark: it is the driver, so it reads the clock.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use plaza::io::udp::OutQueue;
use plaza::sfu::egress::{Egress, Outgoing, SrtpKeys};
use plaza::sfu::latency::LatencyHistogram;
use plaza::sfu::rewrite::{Rewriter, SrcPacket, Vp8Munger};
use plaza::sfu::selector::{LayerInfo, LayerSelector, PacketAction, Requested};
use rtc::rtp;
use rtc::shared::marshal::Marshal;
use rtc::srtp::context::Context;
use rtc::srtp::protection_profile::ProtectionProfile;

/// The calling thread's CPU time (`clock_gettime(CLOCK_THREAD_CPUTIME_ID)`, ns). Falls back
/// to wall time off Linux.
pub struct CpuTime {
    wall: WallTime,
}

#[cfg(target_os = "linux")]
#[allow(unsafe_code)] // clock_gettime(2); see the SAFETY comment
fn thread_cpu_ns() -> Option<u64> {
    #[repr(C)]
    struct Timespec {
        tv_sec: i64,
        tv_nsec: i64,
    }
    unsafe extern "C" {
        fn clock_gettime(clock: i32, tp: *mut Timespec) -> i32;
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut ts = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec (64-bit time_t on every 64-bit Linux target
    // this benchmark runs on); the call only writes into it.
    let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (rc == 0).then(|| ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

#[cfg(not(target_os = "linux"))]
fn thread_cpu_ns() -> Option<u64> {
    None
}

impl Measurement for CpuTime {
    type Intermediate = (Option<u64>, Instant);
    type Value = f64;

    fn start(&self) -> Self::Intermediate {
        (thread_cpu_ns(), Instant::now())
    }

    fn end(&self, (cpu, wall): Self::Intermediate) -> f64 {
        match (cpu, thread_cpu_ns()) {
            (Some(a), Some(b)) => b.saturating_sub(a) as f64,
            _ => wall.elapsed().as_nanos() as f64,
        }
    }

    fn add(&self, a: &f64, b: &f64) -> f64 {
        a + b
    }

    fn zero(&self) -> f64 {
        0.0
    }

    fn to_f64(&self, v: &f64) -> f64 {
        *v
    }

    fn formatter(&self) -> &dyn ValueFormatter {
        self.wall.formatter()
    }
}

type C = Criterion<CpuTime>;

/// A VP8 payload as webrtc-rs's payloader makes it: X=1, S=1, I=1 with a 15-bit picture id,
/// then the (keyframe) VP8 payload header and filler.
fn vp8_payload(len: usize, picture_id: u16) -> Vec<u8> {
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
    p
}

fn packet(payload: Vec<u8>, seq: u16, ts: u32) -> rtp::Packet {
    rtp::Packet {
        header: rtp::header::Header {
            version: 2,
            payload_type: 96,
            sequence_number: seq,
            timestamp: ts,
            ssrc: 0x1234_5678,
            marker: false,
            ..Default::default()
        },
        payload: Bytes::from(payload),
    }
}

fn layer(id: usize, w: u32, h: u32, bps: u64) -> LayerInfo {
    LayerInfo {
        id,
        width: w,
        height: h,
        bitrate_bps: bps,
        active: true,
    }
}

/// A selector forwarding layer 0 (plain video: one layer), as the core has it.
fn selector(now: Instant) -> LayerSelector {
    let mut sel = LayerSelector::new(Requested::default());
    sel.update(&[layer(0, 320, 240, 300_000)], None, now);
    let first = sel.on_packet(0, true, now);
    assert!(first.is_forward(), "selector does not forward layer 0");
    sel
}

struct DownTrack {
    selector: LayerSelector,
    rewriter: Rewriter,
    munger: Vp8Munger,
    ssrc: u32,
}

/// The per-subscriber loop of `Core::forward_rtp`, minus `rtc`'s `write_rtp`.
fn forward_to(downs: &mut [DownTrack], packet: &rtp::Packet, now: Instant) -> usize {
    let mut sent = 0;
    for dt in downs.iter_mut() {
        match dt.selector.on_packet(0, false, now) {
            PacketAction::Drop => continue,
            PacketAction::Forward { .. } => {}
        }
        let src = SrcPacket {
            ssrc: packet.header.ssrc,
            seq: packet.header.sequence_number,
            timestamp: packet.header.timestamp,
            clock_rate: 90_000,
            arrival: now,
        };
        let Some(h) = dt.rewriter.rewrite(&src) else {
            continue;
        };
        let mut out = packet.clone();
        out.header.ssrc = dt.ssrc;
        out.header.payload_type = 96;
        out.header.sequence_number = h.seq;
        out.header.timestamp = h.timestamp;
        let mut payload = BytesMut::from(&packet.payload[..]);
        if dt.munger.munge(&mut payload, h.switched).is_ok() {
            out.payload = payload.freeze();
        }
        black_box(&out);
        sent += 1;
    }
    sent
}

fn bench_downtrack(c: &mut C) {
    let mut g = c.benchmark_group("downtrack");
    g.measurement_time(Duration::from_secs(3));
    let now = Instant::now();
    for n in [1usize, 10, 50] {
        let mut downs: Vec<DownTrack> = (0..n)
            .map(|i| DownTrack {
                selector: selector(now),
                rewriter: Rewriter::new(0x1000 + i as u32),
                munger: Vp8Munger::new(),
                ssrc: 0x1000 + i as u32,
            })
            .collect();
        // Consecutive packets of one stream (the payload is shared, as the core's is).
        let mut p = packet(vp8_payload(1100, 1), 0, 0);
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::new("vp8_1100B", n), &n, |b, _| {
            b.iter(|| {
                p.header.sequence_number = p.header.sequence_number.wrapping_add(1);
                p.header.timestamp = p.header.timestamp.wrapping_add(3000);
                black_box(forward_to(&mut downs, &p, now))
            })
        });
    }
    g.finish();
}

fn bench_pieces(c: &mut C) {
    let now = Instant::now();
    let mut g = c.benchmark_group("rewrite");
    let mut rw = Rewriter::new(42);
    let mut seq = 0u16;
    g.bench_function("rewriter", |b| {
        b.iter(|| {
            seq = seq.wrapping_add(1);
            black_box(rw.rewrite(&SrcPacket {
                ssrc: 7,
                seq,
                timestamp: u32::from(seq) * 3000,
                clock_rate: 90_000,
                arrival: now,
            }))
        })
    });
    let mut m = Vp8Munger::new();
    let mut buf = vp8_payload(1100, 1);
    let mut pid = 0u16;
    g.bench_function("vp8_munger_in_place", |b| {
        b.iter(|| {
            pid = (pid + 1) & 0x7fff;
            buf[2] = 0x80 | (pid >> 8) as u8;
            buf[3] = pid as u8;
            black_box(m.munge(&mut buf, false).ok())
        })
    });
    let src = Bytes::from(vp8_payload(1100, 1));
    g.bench_function("payload_copy_1100B", |b| {
        b.iter(|| black_box(BytesMut::from(&src[..]).freeze()))
    });
    let p = packet(vp8_payload(1100, 1), 1, 1);
    g.bench_function("packet_clone", |b| b.iter(|| black_box(p.clone())));
    g.finish();

    let mut g = c.benchmark_group("selector");
    let mut sel = selector(now);
    g.bench_function("on_packet", |b| {
        b.iter(|| black_box(sel.on_packet(0, false, now)))
    });
    let layers = [
        layer(0, 320, 180, 150_000),
        layer(1, 640, 360, 500_000),
        layer(2, 1280, 720, 1_500_000),
    ];
    let mut sel = LayerSelector::new(Requested::default());
    g.bench_function("update_3_layers", |b| {
        b.iter(|| black_box(sel.update(&layers, Some(2_000_000), now)))
    });
    g.finish();

    let mut g = c.benchmark_group("rtp");
    let p = packet(vp8_payload(1100, 1), 1, 1);
    g.bench_function("marshal_1100B", |b| b.iter(|| black_box(p.marshal().ok())));
    g.finish();
}

fn context(profile: ProtectionProfile) -> Context {
    let provider = rtc::srtp::crypto::default_provider().expect("a crypto provider");
    let key = vec![0x11u8; profile.key_len()];
    let salt = vec![0x22u8; profile.salt_len()];
    Context::new(&key, &salt, profile, None, None, provider.crypto()).expect("SRTP context")
}

fn bench_srtp(c: &mut C) {
    let mut g = c.benchmark_group("srtp");
    g.measurement_time(Duration::from_secs(3));
    for (name, profile) in [
        ("aead_aes128_gcm", ProtectionProfile::AeadAes128Gcm),
        (
            "aes128_cm_hmac_sha1_80",
            ProtectionProfile::Aes128CmHmacSha1_80,
        ),
    ] {
        for (what, len) in [("video_1100B", 1100usize), ("audio_100B", 100)] {
            let plain: Vec<BytesMut> = (0..1024u16)
                .map(|i| {
                    packet(vp8_payload(len, i), i, u32::from(i) * 3000)
                        .marshal()
                        .expect("marshal")
                })
                .collect();
            let mut enc = context(profile);
            let mut i = 0usize;
            g.throughput(Throughput::Bytes(len as u64));
            g.bench_function(BenchmarkId::new(format!("protect/{name}"), what), |b| {
                b.iter(|| {
                    i = (i + 1) % plain.len();
                    black_box(enc.encrypt_rtp(&plain[i]).ok())
                })
            });
            let mut enc = context(profile);
            let cipher: Vec<BytesMut> = plain
                .iter()
                .map(|p| enc.encrypt_rtp(p).expect("encrypt"))
                .collect();
            let mut dec = context(profile);
            let mut i = 0usize;
            g.bench_function(BenchmarkId::new(format!("unprotect/{name}"), what), |b| {
                b.iter(|| {
                    i = (i + 1) % cipher.len();
                    black_box(dec.decrypt_rtp(&cipher[i]).ok())
                })
            });
        }
    }
    g.finish();
}

fn keys(profile: ProtectionProfile, salt_len: usize) -> SrtpKeys {
    SrtpKeys {
        profile,
        local_key: vec![0x11; 16],
        local_salt: vec![0x22; salt_len],
        remote_key: vec![0x33; 16],
        remote_salt: vec![0x44; salt_len],
    }
}

fn bench_egress(c: &mut C) {
    let mut g = c.benchmark_group("egress");
    g.measurement_time(Duration::from_secs(3));
    for (name, profile, salt_len) in [
        ("aead_aes128_gcm", ProtectionProfile::AeadAes128Gcm, 12),
        (
            "aes128_cm_hmac_sha1_80",
            ProtectionProfile::Aes128CmHmacSha1_80,
            14,
        ),
    ] {
        let mut e = Egress::new(&keys(profile, salt_len)).expect("egress");
        let packets: Vec<rtp::Packet> = (0..1024u16)
            .map(|i| packet(vp8_payload(1100, i), i, u32::from(i) * 3000))
            .collect();
        let mut i = 0usize;
        let now = Instant::now();
        g.bench_function(BenchmarkId::new("protect_rtp", name), |b| {
            b.iter(|| {
                i = (i + 1) % packets.len();
                let mut p = packets[i].clone();
                black_box(
                    e.protect_rtp(
                        now,
                        &mut p,
                        Outgoing::video(Some(3), false),
                        BytesMut::new(),
                    )
                    .ok(),
                )
            })
        });
    }
    g.finish();
}

/// One subscriber's feedback every ~100 ms: a compound SRTCP packet (receiver report +
/// transport-cc feedback for the 10 packets the egress sent since the last one, 10 ms apart,
/// all arrived), encrypted with the subscriber's context. Measured in batches of 64 feedbacks
/// (640 packets sent before them, untimed: fewer than the TWCC log holds), only the
/// `Egress::on_rtcp` calls are timed.
fn bench_egress_rtcp(c: &mut C) {
    use rtc::rtcp::receiver_report::ReceiverReport;
    use rtc::rtcp::reception_report::ReceptionReport;
    use rtc::rtcp::transport_feedbacks::transport_layer_cc::{
        PacketStatusChunk, RecvDelta, RunLengthChunk, StatusChunkTypeTcc, SymbolTypeTcc,
        TransportLayerCc,
    };
    const PER_FEEDBACK: u16 = 10;
    const BATCH: usize = 64;
    let mut g = c.benchmark_group("egress");
    g.measurement_time(Duration::from_secs(3));
    for (name, profile, salt_len) in [
        ("aead_aes128_gcm", ProtectionProfile::AeadAes128Gcm, 12),
        (
            "aes128_cm_hmac_sha1_80",
            ProtectionProfile::Aes128CmHmacSha1_80,
            14,
        ),
    ] {
        let k = keys(profile, salt_len);
        let mut e = Egress::new(&k).expect("egress");
        let provider = rtc::srtp::crypto::default_provider().expect("a crypto provider");
        // The subscriber encrypts with our remote key.
        let mut tx = Context::new(
            &k.remote_key,
            &k.remote_salt,
            profile,
            None,
            None,
            provider.crypto(),
        )
        .expect("SRTP context");
        let t0 = Instant::now();
        // Simulated time: one packet every 10 ms (~100 packets/s, a 320x240 video stream).
        let mut sent = 0u64;
        let mut fb_count = 0u8;
        g.bench_function(BenchmarkId::new("on_rtcp_twcc", name), |b| {
            b.iter_custom(|iters| {
                let mut total = 0.0;
                let mut left = iters;
                while left > 0 {
                    let n = (left as usize).min(BATCH);
                    left -= n as u64;
                    let mut wires = Vec::with_capacity(n);
                    for _ in 0..n {
                        let base = sent;
                        for _ in 0..PER_FEEDBACK {
                            let mut p = packet(vp8_payload(1100, sent as u16), sent as u16, 0);
                            e.protect_rtp(
                                t0 + Duration::from_millis(sent * 10),
                                &mut p,
                                Outgoing::video(Some(3), false),
                                BytesMut::new(),
                            )
                            .expect("protect");
                            sent += 1;
                        }
                        // Arrivals 20 ms after departure, on the receiver's clock.
                        let first_arrival_us = (base * 10 + 20) * 1_000;
                        let reference_time = (first_arrival_us / 64_000) as u32;
                        let first_delta = first_arrival_us - u64::from(reference_time) * 64_000;
                        let cc = TransportLayerCc {
                            sender_ssrc: 0xabcd,
                            media_ssrc: 0x1234_5678,
                            base_sequence_number: base as u16,
                            packet_status_count: PER_FEEDBACK,
                            reference_time,
                            fb_pkt_count: fb_count,
                            packet_chunks: vec![PacketStatusChunk::RunLengthChunk(
                                RunLengthChunk {
                                    type_tcc: StatusChunkTypeTcc::RunLengthChunk,
                                    packet_status_symbol: SymbolTypeTcc::PacketReceivedSmallDelta,
                                    run_length: PER_FEEDBACK,
                                },
                            )],
                            recv_deltas: (0..PER_FEEDBACK)
                                .map(|i| RecvDelta {
                                    type_tcc_packet: SymbolTypeTcc::PacketReceivedSmallDelta,
                                    delta: if i == 0 { first_delta as i64 } else { 10_000 },
                                })
                                .collect(),
                        };
                        fb_count = fb_count.wrapping_add(1);
                        let rr = ReceiverReport {
                            ssrc: 0xabcd,
                            reports: vec![ReceptionReport {
                                ssrc: 0x1234_5678,
                                last_sequence_number: sent as u32,
                                jitter: 10,
                                ..Default::default()
                            }],
                            ..Default::default()
                        };
                        let compound: Vec<Box<dyn rtc::rtcp::Packet>> =
                            vec![Box::new(rr), Box::new(cc)];
                        let plain = rtc::rtcp::packet::marshal(&compound).expect("marshal");
                        wires.push((
                            t0 + Duration::from_millis(sent * 10 + 25),
                            tx.encrypt_rtcp(&plain).expect("encrypt"),
                        ));
                    }
                    let start = thread_cpu_ns();
                    let wall = Instant::now();
                    for (now, wire) in &wires {
                        black_box(e.on_rtcp(*now, wire).expect("feedback"));
                    }
                    total += match (start, thread_cpu_ns()) {
                        (Some(a), Some(b)) => b.saturating_sub(a) as f64,
                        _ => wall.elapsed().as_nanos() as f64,
                    };
                }
                total
            })
        });
    }
    g.finish();
}

fn bench_udp(c: &mut C) {
    let mut g = c.benchmark_group("udp");
    g.measurement_time(Duration::from_secs(3));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let tx = rt
        .block_on(tokio::net::UdpSocket::bind("127.0.0.1:0"))
        .expect("bind");
    let rxs: Vec<std::net::UdpSocket> = (0..8)
        .map(|_| std::net::UdpSocket::bind("127.0.0.1:0").expect("bind"))
        .collect();
    let addrs: Vec<_> = rxs.iter().map(|r| r.local_addr().expect("addr")).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drains: Vec<_> = rxs
        .into_iter()
        .map(|r| {
            let stop = stop.clone();
            r.set_read_timeout(Some(Duration::from_millis(50))).ok();
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _ = r.recv(&mut buf);
                }
            })
        })
        .collect();
    let data = BytesMut::from(&vec![0x5au8; 1100][..]);
    let latency: [LatencyHistogram; 2] = Default::default();
    let mut latency = latency;
    g.throughput(Throughput::Elements(64));
    g.bench_function("sendmmsg_64", |b| {
        b.iter(|| {
            let mut q = OutQueue::new();
            for i in 0..64 {
                q.push(data.clone(), addrs[i % addrs.len()], None);
            }
            black_box(q.send(&tx, &mut latency))
        })
    });
    g.finish();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for d in drains {
        let _ = d.join();
    }

    // The same sends when no thread waits on the receiving sockets: one thread empties them
    // every millisecond without blocking, so the kernel queues each datagram but wakes nobody.
    // That is closer to a real network, where the receiving side runs on another machine.
    // `_stamped`: the receiving sockets ask for the kernel's receive stamps, as each shard's
    // media socket does (`SO_TIMESTAMPNS`), which has the kernel stamp every datagram the
    // host receives, here on loopback inside the sender's system call.
    for (name, stamped) in [
        ("sendmmsg_64_unwoken", false),
        ("sendmmsg_64_unwoken_stamped", true),
    ] {
        bench_udp_unwoken(c, &tx, &data, &mut latency, name, stamped);
    }
}

/// See `bench_udp`.
fn bench_udp_unwoken(
    c: &mut C,
    tx: &tokio::net::UdpSocket,
    data: &BytesMut,
    latency: &mut [LatencyHistogram; 2],
    name: &str,
    stamped: bool,
) {
    let mut g = c.benchmark_group("udp");
    g.measurement_time(Duration::from_secs(3));
    let rxs: Vec<std::net::UdpSocket> = (0..8)
        .map(|_| {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
            s.set_nonblocking(true).expect("nonblocking");
            set_recv_buffer(&s, 4 << 20);
            if stamped {
                plaza::io::recv::enable_timestamps(&s).expect("SO_TIMESTAMPNS");
            }
            s
        })
        .collect();
    let addrs: Vec<_> = rxs.iter().map(|r| r.local_addr().expect("addr")).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drain = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for r in &rxs {
                    while r.recv(&mut buf).is_ok() {}
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    g.throughput(Throughput::Elements(64));
    g.bench_function(name, |b| {
        b.iter(|| {
            let mut q = OutQueue::new();
            for i in 0..64 {
                q.push(data.clone(), addrs[i % addrs.len()], None);
            }
            black_box(q.send(tx, latency))
        })
    });
    g.finish();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = drain.join();
}

/// A larger receive buffer (the drain above empties the sockets only every millisecond).
#[allow(unsafe_code)] // setsockopt(2); see the SAFETY comment
fn set_recv_buffer(s: &std::net::UdpSocket, bytes: i32) {
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt with a valid fd and a pointer to an i32 of the stated size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&bytes as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        );
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().with_measurement(CpuTime { wall: WallTime });
    targets = bench_downtrack, bench_pieces, bench_srtp, bench_egress, bench_egress_rtcp, bench_udp
}
criterion_main!(benches);
