//! The node link's hop: one-way latency and CPU per message of RTP carried between two
//! [`Link`]s on loopback, each run by its tokio driver (as two nodes run them), release build.
//!
//! ```sh
//! cargo build --release --example link_hop
//! ./target/release/examples/link_hop [PACKETS] [PER_MS]   # default 20000 packets, 10 per ms
//! ```
//!
//! The sender hands `PER_MS` RTP packets (1000-byte payload) to link A every millisecond; link
//! B delivers them. Latency is from the hand-over to A's driver to B's delivery event (one
//! process, one clock): codec, sealing, `sendto`, loopback, `recvfrom`, opening, decoding and
//! both drivers' queues. CPU is the whole process's (both ends, the sender, the receiver).

// A measuring tool: it reads the clock and prints its results.
#![allow(clippy::disallowed_methods, clippy::print_stdout)]

use bytes::Bytes;
use plaza::cluster::link::codec::LinkMsg;
use plaza::cluster::link::driver::{self, LinkHandle};
use plaza::cluster::link::{Link, LinkConfig, LinkEvent};
use plaza::sfu::pipe::{Lane, PipeMsg};
use rtc::rtp;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;

fn process_cpu() -> Duration {
    let ticks = plaza::cluster::cpu_ticks().unwrap_or(0);
    Duration::from_secs_f64(ticks as f64 / plaza::http::metrics::CLOCK_TICKS_PER_S as f64)
}

async fn node(n: u32) -> (LinkHandle, [u8; 32]) {
    // Sized as the cluster sizes the link's socket (and the media sockets).
    let std_socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    std_socket.set_nonblocking(true).expect("nonblocking");
    plaza::io::set_socket_buffers(&std_socket, plaza::io::UDP_BUFFER_DEFAULT);
    let socket = UdpSocket::from_std(std_socket).expect("tokio socket");
    let (key, salt) = driver::random_key_and_salt();
    (
        driver::spawn(Link::new(LinkConfig::new(n, key, salt)), socket).expect("spawn"),
        key,
    )
}

fn rtp_msg(i: u32) -> LinkMsg {
    LinkMsg {
        origin: 1,
        from_shard: 0,
        to_shard: 0,
        msg: PipeMsg::Rtp {
            relay: i,
            layer: 0,
            packet: rtp::Packet {
                header: rtp::header::Header {
                    version: 2,
                    payload_type: 96,
                    sequence_number: i as u16,
                    timestamp: i.wrapping_mul(3000),
                    ssrc: 0x1234,
                    ..Default::default()
                },
                payload: Bytes::from(vec![0xAB; 1000]),
            },
            origin: Instant::now(),
        },
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let packets: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let per_ms: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let (a, key_a) = node(1).await;
    let (mut b, key_b) = node(2).await;
    a.set_peer(2, b.local_addr, key_b).await;
    b.set_peer(1, a.local_addr, key_a).await;
    // Both up before timing.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(LinkEvent::PeerUp(1))) =
            tokio::time::timeout(Duration::from_millis(100), b.events.recv()).await
        {
            break;
        }
    }

    let mut sent_at = vec![None; packets as usize];
    let mut latencies = Vec::with_capacity(packets as usize);
    let cpu0 = process_cpu();
    let t0 = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    let mut next = 0u32;
    while (latencies.len() as u32) < packets {
        tokio::select! {
            _ = ticker.tick(), if next < packets => {
                for _ in 0..per_ms.min(packets - next) {
                    sent_at[next as usize] = Some(Instant::now());
                    a.send_nowait(2, Lane::Media, rtp_msg(next)).await;
                    next += 1;
                }
            }
            ev = b.events.recv() => match ev {
                Some(LinkEvent::Message { msg: LinkMsg { msg: PipeMsg::Rtp { relay, .. }, .. }, .. }) => {
                    if let Some(Some(at)) = sent_at.get(relay as usize) {
                        latencies.push(at.elapsed());
                    }
                }
                Some(_) => {}
                None => break,
            },
            () = tokio::time::sleep(Duration::from_secs(2)), if next >= packets => break,
        }
    }
    let wall = t0.elapsed();
    let cpu = process_cpu().saturating_sub(cpu0);
    let stats = b.stats().await;
    latencies.sort();
    let q = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{} of {packets} RTP packets delivered ({} per ms) in {:.2} s",
        latencies.len(),
        per_ms,
        wall.as_secs_f64()
    );
    println!(
        "one-way latency: p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
        us(q(0.5)),
        us(q(0.99)),
        us(latencies[latencies.len() - 1])
    );
    println!(
        "process CPU {:.0} ms: {:.2} µs per packet (both ends, sender and receiver included)",
        cpu.as_secs_f64() * 1e3,
        us(cpu) / latencies.len().max(1) as f64
    );
    if let Some(s) = stats {
        println!("receiver link stats: {s:?}");
    }
}
