//! The node-to-node link on two real UDP sockets on loopback: a few thousand RTP packets and
//! control messages between two `Link`s, each run by its tokio driver. Prints the throughput
//! and the CPU cost per message (both ends, sealing and opening, the system calls); asserts
//! only what the link promises (control complete and in order, media at most once).

// Reports its numbers on stdout; measures wall and CPU time.
#![allow(clippy::print_stdout, clippy::disallowed_methods)]

use bytes::Bytes;
use plaza::cluster::link::codec::LinkMsg;
use plaza::cluster::link::driver::{self, LinkHandle};
use plaza::cluster::link::{Link, LinkConfig, LinkEvent};
use plaza::sfu::pipe::{Lane, PipeMsg};
use rtc::rtp;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tokio::time::timeout;

/// CPU time of this thread (the test runs on a current-thread runtime: both links, both
/// sockets and the sender are on it).
fn thread_cpu() -> Duration {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    let ns = s
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Duration::from_nanos(ns)
}

async fn node(n: u32) -> (LinkHandle, [u8; 32]) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (key, salt) = driver::random_key_and_salt();
    let link = Link::new(LinkConfig::new(n, key, salt));
    (driver::spawn(link, socket).unwrap(), key)
}

async fn wait_up(h: &mut LinkHandle, peer: u32) {
    timeout(Duration::from_secs(5), async {
        loop {
            match h.events.recv().await {
                Some(LinkEvent::PeerUp(p)) if p == peer => return,
                Some(_) => {}
                None => panic!("link ended"),
            }
        }
    })
    .await
    .expect("peer up within 5 s");
}

fn rtp_msg(i: u32) -> LinkMsg {
    LinkMsg {
        origin: 1,
        from_shard: 0,
        to_shard: 1,
        msg: PipeMsg::Rtp {
            relay: i,
            layer: 0,
            packet: rtp::Packet {
                header: rtp::header::Header {
                    version: 2,
                    payload_type: 96,
                    sequence_number: i as u16,
                    timestamp: i * 3000,
                    ssrc: 0x1234,
                    ..Default::default()
                },
                payload: Bytes::from(vec![i as u8; 1000]),
            },
            origin: Instant::now(),
        },
    }
}

fn control_msg(i: u32) -> LinkMsg {
    LinkMsg {
        origin: 1,
        from_shard: 0,
        to_shard: 1,
        msg: PipeMsg::Needed {
            relay: i,
            subscribed: true,
            layers: 0b101,
        },
    }
}

#[tokio::test]
async fn rtp_and_control_over_loopback() {
    let (mut a, ka) = node(1).await;
    let (mut b, kb) = node(2).await;
    a.set_peer(2, b.local_addr, kb).await;
    b.set_peer(1, a.local_addr, ka).await;
    wait_up(&mut a, 2).await;
    wait_up(&mut b, 1).await;

    const MEDIA: u32 = 5000;
    const BATCH: u32 = 50;
    let (mut media_got, mut control_got) = (Vec::new(), Vec::new());
    let mut control_sent = 0;
    let cpu0 = thread_cpu();
    let t0 = Instant::now();
    for batch in 0..MEDIA / BATCH {
        for i in batch * BATCH..(batch + 1) * BATCH {
            a.send_nowait(2, Lane::Media, rtp_msg(i)).await;
            if i % 10 == 0 {
                a.send_nowait(2, Lane::Control, control_msg(control_sent))
                    .await;
                control_sent += 1;
            }
        }
        // Paced: the batch is received (or 100 ms pass) before the next goes.
        let _ = timeout(Duration::from_millis(100), async {
            while media_got.len() < ((batch + 1) * BATCH) as usize {
                match b.events.recv().await {
                    Some(LinkEvent::Message { msg, lane, .. }) => match (lane, msg.msg) {
                        (Lane::Media, PipeMsg::Rtp { relay, packet, .. }) => {
                            assert_eq!(packet.payload.len(), 1000);
                            media_got.push(relay);
                        }
                        (Lane::Control, PipeMsg::Needed { relay, .. }) => control_got.push(relay),
                        other => panic!("{other:?}"),
                    },
                    Some(_) => {}
                    None => panic!("link ended"),
                }
            }
        })
        .await;
    }
    // The rest of the control lane (reliable): bounded.
    timeout(Duration::from_secs(10), async {
        while control_got.len() < control_sent as usize {
            if let Some(LinkEvent::Message {
                msg:
                    LinkMsg {
                        msg: PipeMsg::Needed { relay, .. },
                        ..
                    },
                ..
            }) = b.events.recv().await
            {
                control_got.push(relay);
            }
        }
    })
    .await
    .expect("every control message within 10 s");
    let wall = t0.elapsed();
    let cpu = thread_cpu() - cpu0;

    assert_eq!(control_got, (0..control_sent).collect::<Vec<_>>());
    let mut unique = media_got.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(unique.len(), media_got.len(), "no media twice");
    let sa = a.stats().await.unwrap();
    let sb = b.stats().await.unwrap();
    assert_eq!(sa.media_sent, u64::from(MEDIA));
    assert_eq!(
        (sb.auth_failed, sb.replayed, sb.decode_errors),
        (0, 0, 0),
        "{sb:?}"
    );

    let msgs = media_got.len() + control_got.len();
    let bytes = sa.bytes_sent;
    println!(
        "node link on loopback: {} RTP packets (1000-byte payload) + {} control messages in {:.1} ms \
         ({} datagrams, {} bytes): {:.0} messages/s, {:.1} Mbit/s; media lost {}, control \
         retransmitted {}; CPU {:.1} ms = {:.2} µs per message (both ends, one thread)",
        media_got.len(),
        control_got.len(),
        wall.as_secs_f64() * 1e3,
        sa.datagrams_sent,
        bytes,
        msgs as f64 / wall.as_secs_f64(),
        bytes as f64 * 8.0 / wall.as_secs_f64() / 1e6,
        u64::from(MEDIA) - media_got.len() as u64,
        sa.control_retransmitted,
        cpu.as_secs_f64() * 1e3,
        cpu.as_secs_f64() * 1e6 / msgs as f64,
    );
    a.abort();
    b.abort();
}
