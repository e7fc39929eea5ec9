//! Data-channel relay through the real SFU core in virtual time: `chat` (reliable, ordered)
//! and `input` (unordered, no retransmissions) on the subscriber connection, the envelope,
//! room isolation, loss, the limits and the relay latency. Mirrors `tests/integration/data.rs`, which
//! tests the envelope over loopback sockets.

use super::common::{Sim, ms};
use plaza::signal::{ErrorCode, ServerMessage};
use plaza::sim::server::SfuNode;
use plaza::sim::{DataIn, LinkConfig, MediaSpec, NodeId, envelope};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Bound of every wait, in virtual time.
const T: Duration = Duration::from_secs(20);

/// The payloads `id` received on `label` from `from`, in arrival order.
fn payloads(s: &mut Sim, id: NodeId, label: &str, from: &str) -> Vec<Vec<u8>> {
    s.c(id)
        .data_received()
        .into_iter()
        .filter(|d| d.label == label && d.from.as_deref() == Some(from))
        .map(|d| d.payload)
        .collect()
}

/// The `error`s `id` got on the signaling channel for data sent on `label`.
fn data_errors(s: &mut Sim, id: NodeId, label: &str) -> Vec<(ErrorCode, String)> {
    s.c(id)
        .messages
        .iter()
        .filter_map(|(_, m)| match m {
            ServerMessage::Error {
                code,
                message,
                request,
            } if request.as_deref() == Some(label) => Some((*code, message.clone())),
            _ => None,
        })
        .collect()
}

/// Chat from one participant reaches every other participant of its room exactly once, in
/// send order, with its id in the envelope and the message type kept; never the sender,
/// never another room. A `to` list limits the recipients.
#[test]
fn chat_reaches_everyone_else_in_the_room_once_in_order() {
    let wall = Instant::now();
    let mut s = Sim::new(11);
    let alice = s.client(1, "alice", "a", MediaSpec::none());
    let bob = s.client(2, "bob", "a", MediaSpec::none());
    let carol = s.client(3, "carol", "a", MediaSpec::none());
    let dave = s.client(4, "dave", "b", MediaSpec::none());
    let erin = s.client(5, "erin", "b", MediaSpec::none());
    let all = [alice, bob, carol, dave, erin];
    let open = s.wait_channels(&all, T);
    let (pa, pb, pc, pd) = (s.pid(alice), s.pid(bob), s.pid(carol), s.pid(dave));

    // A burst of 30 at one instant, then 30 more 7 ms apart; a binary one in the middle;
    // dave talks in the other room at the same time.
    let text = |i: usize| format!("msg {i:03} héllo\nline two");
    let mut sent: Vec<(bool, Vec<u8>)> = Vec::new();
    for i in 0..30 {
        let p = text(i).into_bytes();
        s.c(alice).send_data("chat", true, envelope(&[], &p));
        sent.push((true, p));
    }
    let bin = vec![0x00, 0xff, 0x0a, 0x80];
    s.c(alice).send_data("chat", false, envelope(&[], &bin));
    sent.push((false, bin));
    s.c(dave)
        .send_data("chat", true, envelope(&[], b"room b only"));
    for i in 30..60 {
        s.net.run_for(Duration::from_millis(7));
        let p = text(i).into_bytes();
        s.c(alice).send_data("chat", true, format!("\n{}", text(i)));
        sent.push((true, p));
    }
    // One for carol only.
    s.c(alice)
        .send_data("chat", true, envelope(&[&pc], b"for carol"));
    s.net.run_for(Duration::from_secs(2));
    s.no_errors(&all);

    for (id, name) in [(bob, "bob"), (carol, "carol")] {
        let got: Vec<DataIn> = s
            .c(id)
            .data_received()
            .into_iter()
            .filter(|d| d.from.as_deref() == Some(pa.as_str()))
            .collect();
        let mut want = sent.clone();
        if id == carol {
            want.push((true, b"for carol".to_vec()));
        }
        let got_pairs: Vec<(bool, Vec<u8>)> =
            got.iter().map(|d| (d.is_text, d.payload.clone())).collect();
        assert_eq!(
            got_pairs, want,
            "{name}: every message once, in order, type kept"
        );
        assert!(got.iter().all(|d| d.label == "chat"), "{name}: all on chat");
        // Nothing else reached it: not dave's, and nothing without a sender.
        let others = s.c(id).data_received().len() - got.len();
        assert_eq!(others, 0, "{name} got messages from outside its room");
    }
    assert!(
        s.c(alice).data_received().is_empty(),
        "the sender gets nothing back"
    );
    assert_eq!(
        payloads(&mut s, erin, "chat", &pd),
        vec![b"room b only".to_vec()]
    );
    assert!(
        s.c(dave).data_received().is_empty(),
        "dave only hears room b"
    );
    assert_eq!(
        s.c(erin).data_received().len(),
        1,
        "nothing from room a reaches room b"
    );
    let _ = pb;
    let stats = s.stats();
    assert_eq!(stats.data_messages_relayed, 2 * 61 + 1 + 1);
    println!(
        "channels open after {:.0} ms; {} relayed; wall {:?}",
        ms(open),
        stats.data_messages_relayed,
        wall.elapsed()
    );
}

/// `input` over a lossy link: messages are lost (no retransmission), none arrives twice or
/// on `chat`. `chat` over lossy links both ways arrives complete and in order (SCTP
/// retransmits).
///
/// The loss for `input` is on the receiver's downlink, where the server sends: the server
/// opens the channel with `maxRetransmits: 0`. On the sender's uplink the sim client is the
/// side that *accepted* the channel, and `rtc` 0.21.1 does not apply the DCEP reliability
/// parameters to the accepting side's SCTP stream, so an `rtc` client's `input` sends are
/// retransmitted like `chat` (a browser applies them both ways). The uplink is lossy for
/// `chat` as well.
#[test]
fn input_loses_over_a_lossy_link_and_chat_does_not() {
    let wall = Instant::now();
    let mut s = Sim::new(12);
    let alice = s.client(1, "alice", "a", MediaSpec::none());
    let bob = s.client(2, "bob", "a", MediaSpec::none());
    s.wait_channels(&[alice, bob], T);
    let pa = s.pid(alice);
    let server = s.server;
    s.net.link_mut(server, bob).loss = 0.2;

    // 200 numbered binary messages on input, 20 ms apart (one SCTP packet each).
    const N: u32 = 200;
    for i in 0..N {
        s.c(alice)
            .send_data("input", false, envelope(&[], &i.to_be_bytes()));
        s.net.run_for(Duration::from_millis(20));
    }
    s.net.run_for(Duration::from_secs(2));
    let got: Vec<u32> = payloads(&mut s, bob, "input", &pa)
        .iter()
        .map(|p| u32::from_be_bytes(p[..].try_into().expect("4 bytes")))
        .collect();
    let distinct: BTreeSet<u32> = got.iter().copied().collect();
    assert_eq!(distinct.len(), got.len(), "no message twice: {got:?}");
    assert!(distinct.iter().all(|i| *i < N));
    let lost = N as usize - got.len();
    // 20 % of 200 is 40: a seeded draw, well inside these bounds.
    assert!((15..=70).contains(&lost), "lost {lost} of {N} at 20 % loss");
    assert!(
        s.c(bob).data_received().iter().all(|d| d.label == "input"),
        "input never arrives on chat"
    );
    let down = s.net.link_stats(server, bob);
    assert!(down.lost > 0, "{down:?}");

    // chat with 20 % loss on the sender's uplink too: everything, in order, each once.
    s.net.link_mut(alice, server).loss = 0.2;
    const M: u32 = 100;
    for i in 0..M {
        s.c(alice)
            .send_data("chat", true, envelope(&[], format!("c{i}").as_bytes()));
        s.net.run_for(Duration::from_millis(20));
    }
    let want: Vec<Vec<u8>> = (0..M).map(|i| format!("c{i}").into_bytes()).collect();
    let took = s.net.run_until_cond(T, |net| {
        net.node_ref::<plaza::sim::Client>(bob)
            .subscriber
            .data_on("chat")
            .count()
            >= M as usize
    });
    assert!(took.is_some(), "all chat messages arrive");
    s.net.run_for(Duration::from_secs(1));
    assert_eq!(
        payloads(&mut s, bob, "chat", &pa),
        want,
        "complete, in order, once"
    );
    let up = s.net.link_stats(alice, server);
    assert!(up.lost > 0, "{up:?}");
    s.no_errors(&[alice, bob]);
    println!(
        "input: {} of {N} arrived ({lost} lost); chat complete {:.0} ms after the last send; \
         uplink {up:?}; downlink {:?}; wall {:?}",
        got.len(),
        ms(took.unwrap()),
        s.net.link_stats(server, bob),
        wall.elapsed()
    );
}

/// The documented limits: a payload over `max_data_message` (16384 in the sim) and a message
/// without a header line are refused with `message_too_large` / `invalid_field` on the
/// signaling channel and not relayed, one at the limit is; an unknown id in `to` is
/// `not_found` while the known ones still get it; more than the burst of 200 messages at once
/// is `rate_limited` and the rest is relayed; the channel stays usable.
#[test]
fn size_and_rate_limits_give_the_documented_errors() {
    let wall = Instant::now();
    let mut s = Sim::new(13);
    let alice = s.client(1, "alice", "a", MediaSpec::none());
    let bob = s.client(2, "bob", "a", MediaSpec::none());
    s.wait_channels(&[alice, bob], T);
    let (pa, pb) = (s.pid(alice), s.pid(bob));
    let max = match s.c(alice).joined.clone() {
        Some(ServerMessage::Joined {
            max_data_message, ..
        }) => max_data_message,
        other => panic!("joined: {other:?}"),
    };
    assert_eq!(max, 16384);

    let big = vec![b'x'; max + 1];
    let fits = vec![b'y'; max];
    s.c(alice).send_data("chat", true, envelope(&[], &big));
    s.c(alice).send_data("input", false, b"no header".to_vec());
    s.c(alice).send_data("chat", true, envelope(&[], &fits));
    s.c(alice)
        .send_data("chat", true, envelope(&[&pb, "PA_nobody"], b"known only"));
    s.net.run_for(Duration::from_secs(1));
    let errs = data_errors(&mut s, alice, "chat");
    assert_eq!(
        errs,
        vec![
            (
                ErrorCode::MessageTooLarge,
                format!(
                    "chat data-channel message not relayed: payload is {} bytes, the limit is {max}",
                    max + 1
                )
            ),
            (
                ErrorCode::NotFound,
                "chat data-channel message not delivered to unknown participant(s): PA_nobody"
                    .to_owned()
            ),
        ]
    );
    let input_errs = data_errors(&mut s, alice, "input");
    assert_eq!(input_errs.len(), 1, "{input_errs:?}");
    assert_eq!(input_errs[0].0, ErrorCode::InvalidField);
    assert!(
        input_errs[0]
            .1
            .starts_with("input data-channel message not relayed: "),
        "{input_errs:?}"
    );
    assert_eq!(
        payloads(&mut s, bob, "chat", &pa),
        vec![fits.clone(), b"known only".to_vec()],
        "only the one at the limit and the targeted one are relayed"
    );
    assert!(s.c(bob).subscriber.data_on("input").next().is_none());

    // Rate: the buckets hold 200 messages (they refilled during the second above). 300 at
    // one instant: the first 200, plus what refills (100/s) while SCTP delivers the burst,
    // are relayed; every other one is refused with rate_limited.
    s.net.run_for(Duration::from_secs(3));
    let before = s.c(bob).data_received().len();
    let errs_before = s.c(alice).messages.len();
    const BURST: usize = 300;
    let t0 = s.net.now();
    for i in 0..BURST {
        s.c(alice)
            .send_data("chat", true, envelope(&[], format!("r{i}").as_bytes()));
    }
    s.net.run_for(Duration::from_secs(2));
    let relayed: Vec<Vec<u8>> = payloads(&mut s, bob, "chat", &pa)[2..].to_vec();
    assert_eq!(s.c(bob).data_received().len() - before, relayed.len());
    let limited: Vec<String> = s.c(alice).messages[errs_before..]
        .iter()
        .filter_map(|(_, m)| match m {
            ServerMessage::Error {
                code: ErrorCode::RateLimited,
                message,
                request,
            } => {
                assert_eq!(request.as_deref(), Some("chat"));
                Some(message.clone())
            }
            _ => None,
        })
        .collect();
    // The server saw the burst over this span (SCTP's congestion window spreads it).
    let arrivals: Vec<Instant> = s
        .c(bob)
        .data_received()
        .iter()
        .skip(before)
        .map(|d| d.at)
        .collect();
    let spread = *arrivals.last().unwrap() - t0;
    let refill = (spread.as_secs_f64() * 100.0).ceil() as usize;
    assert!(
        relayed.len() >= 200 && relayed.len() <= 200 + refill,
        "relayed {} of {BURST} over {spread:?}",
        relayed.len()
    );
    assert_eq!(
        relayed.len() + limited.len(),
        BURST,
        "each one relayed or refused"
    );
    assert!(
        limited
            .iter()
            .all(|m| m.starts_with("chat data-channel message not relayed: rate limit exceeded")),
        "{:?}",
        limited.first()
    );
    // The relayed ones are the first 200 in order, and the rest a subsequence.
    let want: Vec<Vec<u8>> = (0..200).map(|i| format!("r{i}").into_bytes()).collect();
    assert_eq!(relayed[..200], want[..]);

    // The channel still works afterwards.
    s.net.run_for(Duration::from_secs(3));
    s.c(alice).send_data("chat", true, envelope(&[], b"after"));
    s.net.run_for(Duration::from_secs(1));
    assert_eq!(
        payloads(&mut s, bob, "chat", &pa).last().map(|p| &p[..]),
        Some(&b"after"[..])
    );
    println!(
        "rate: {} relayed, {} rate_limited (burst spread {:.0} ms); wall {:?}",
        relayed.len(),
        limited.len(),
        ms(spread),
        wall.elapsed()
    );
}

/// `from` sends messages `0`, `1`, … `n - 1` (text, to everyone), on `chat` and `input` in
/// turn, 50 ms apart; then the network runs one more second.
fn send_numbered(s: &mut Sim, from: NodeId, n: usize) {
    for i in 0..n {
        let label = if i % 2 == 0 { "chat" } else { "input" };
        s.c(from)
            .send_data(label, true, envelope(&[], format!("{i}").as_bytes()));
        s.net.run_for(Duration::from_millis(50));
    }
    s.net.run_for(Duration::from_secs(1));
}

/// On 20 ms sender→server and 20 ms server→receiver links, chat arrives 40 ms after it was
/// sent in virtual time (the server relays in the turn it receives), and `input` too.
#[test]
fn relay_latency_is_the_path_delay() {
    let mut s = Sim::new(14);
    s.net.set_default_link(LinkConfig {
        delay: Duration::from_millis(20),
        ..LinkConfig::default()
    });
    let alice = s.client(1, "alice", "a", MediaSpec::none());
    let bob = s.client(2, "bob", "a", MediaSpec::none());
    s.wait_channels(&[alice, bob], T);
    let pa = s.pid(alice);
    const N: usize = 20;
    send_numbered(&mut s, alice, N);
    let sent = s.c(alice).data_sent.clone();
    let got = s.c(bob).data_received();
    assert_eq!(sent.len(), N);
    assert_eq!(got.len(), N, "all arrive on a clean link");
    let mut worst = Duration::ZERO;
    for (i, ((at, label, _, _), d)) in sent.iter().zip(&got).enumerate() {
        assert_eq!(d.payload, format!("{i}").into_bytes());
        assert_eq!(&d.label, label);
        assert_eq!(d.from.as_deref(), Some(pa.as_str()));
        let latency = d.at - *at;
        assert!(
            latency >= Duration::from_millis(40) && latency <= Duration::from_millis(45),
            "message {i} on {label}: {latency:?}"
        );
        worst = worst.max(latency);
    }
    println!(
        "relay latency on 20 + 20 ms links: worst {:.1} ms",
        ms(worst)
    );
}

/// A relayed message's latency in the core counts from when its datagrams reached the
/// server (the kernel's receive stamp in the real driver), not from when the core read them:
/// with each datagram waiting 3 ms in the server's socket, every relayed message counts 3 ms
/// (to the histogram's bucket), and none without the wait. Messages still arrive whole.
#[test]
fn relay_latency_counts_the_wait_in_the_socket() {
    for wait in [Duration::ZERO, Duration::from_millis(3)] {
        let mut s = Sim::new(15);
        let server = s.server;
        s.net.node::<SfuNode>(server).socket_wait = wait;
        let alice = s.client(1, "alice", "a", MediaSpec::none());
        let bob = s.client(2, "bob", "a", MediaSpec::none());
        s.wait_channels(&[alice, bob], T);
        const N: usize = 20;
        send_numbered(&mut s, alice, N);
        assert_eq!(s.c(bob).data_received().len(), N, "all arrive");
        let h = &s.net.node::<SfuNode>(server).sfu.transmit().data_relay;
        assert!(h.count() >= N as u64, "relayed records: {}", h.count());
        let (low, high) = (h.quantile_us(0.0).unwrap(), h.quantile_us(1.0).unwrap());
        let want = wait.as_micros() as u64;
        // The histogram's buckets are 1/8 of a power of two wide.
        assert!(
            low >= want && high <= want + want / 8,
            "socket wait {wait:?}: relay latency {low}..{high} µs"
        );
    }
}

/// Channels a client opens itself (here in its publish offer) are not relayed, as the
/// protocol says: what is sent on them reaches nobody, while the server's channels on the
/// subscriber connection keep working.
#[test]
fn channels_the_client_opens_itself_are_not_relayed() {
    let mut s = Sim::new(15);
    let now = s.net.now();
    let c = plaza::sim::Client::new(
        "alice",
        "a",
        super::common::ip(1),
        now,
        1000,
        MediaSpec::none(),
    )
    .expect("alice")
    .with_publisher_channels();
    let addrs = c.addrs();
    let alice = s.net.add_node(c, &addrs);
    let bob = s.client(2, "bob", "a", MediaSpec::none());
    s.wait_channels(&[alice, bob], T);
    let pa = s.pid(alice);
    let own = s.net.run_until_cond(T, |net| {
        let c = net.node_ref::<plaza::sim::Client>(alice);
        c.publisher
            .as_ref()
            .is_some_and(|p| p.channel_open("chat") && p.channel_open("input"))
    });
    // The server accepts the SCTP section of the publish offer, so they do open.
    assert!(own.is_some(), "alice's own channels open");
    let now = s.net.now();
    let p = s.c(alice).publisher.as_mut().expect("publisher");
    p.send_data(now, "chat", true, &envelope(&[], b"on my own chat"))
        .expect("send on own chat");
    p.send_data(now, "input", false, &envelope(&[], b"on my own input"))
        .expect("send on own input");
    s.c(alice)
        .send_data("chat", true, envelope(&[], b"on the server's chat"));
    s.net.run_for(Duration::from_secs(1));
    assert_eq!(
        payloads(&mut s, bob, "chat", &pa),
        vec![b"on the server's chat".to_vec()]
    );
    assert_eq!(
        s.c(bob).data_received().len(),
        1,
        "nothing else reaches bob"
    );
    assert_eq!(s.stats().data_messages_relayed, 1);
}

/// The same seed gives the same data run: over lossy links with jitter, which messages
/// arrive, on which channel and when, are identical; another seed gives another run.
#[test]
fn same_seed_same_data_run() {
    fn run(seed: u64) -> Vec<(String, Vec<u8>, Duration)> {
        let mut s = Sim::new(seed);
        s.net.set_default_link(LinkConfig {
            delay: Duration::from_millis(15),
            jitter: Duration::from_millis(5),
            loss: 0.1,
            ..LinkConfig::default()
        });
        let alice = s.client(1, "alice", "a", MediaSpec::none());
        let bob = s.client(2, "bob", "a", MediaSpec::none());
        s.wait_channels(&[alice, bob], T);
        for i in 0..100u32 {
            let label = if i % 2 == 0 { "chat" } else { "input" };
            s.c(alice)
                .send_data(label, false, envelope(&[], &i.to_be_bytes()));
            s.net.run_for(Duration::from_millis(10));
        }
        let done = s.net.run_until_cond(T, |net| {
            net.node_ref::<plaza::sim::Client>(bob)
                .subscriber
                .data_on("chat")
                .count()
                == 50
        });
        assert!(done.is_some(), "seed {seed}: chat complete");
        s.net.run_for(Duration::from_secs(1));
        let t0 = s.net.start();
        s.c(bob)
            .data_received()
            .into_iter()
            .map(|d| (d.label, d.payload, d.at - t0))
            .collect()
    }
    let a = run(18);
    let input = a.iter().filter(|d| d.0 == "input").count();
    assert!(
        input < 50,
        "seed 18 loses some input: {input} of 50 arrived"
    );
    assert_eq!(run(18), a, "same seed, same run");
    assert_ne!(run(19), a, "another seed, another run");
}
