//! The room timeline through the real core in virtual time: every relayed message stamped
//! with the room's `seq` and the server's `ts`, one order for every receiver, acknowledgements
//! and duplicates by the sender's `sseq`, messages waiting for a channel to open, history
//! replay, room events on the timeline, and input ticks. (Rooms spanning shards:
//! `shards.rs`.)

use super::common::Sim;
use plaza::signal::{ClientMessage, ServerMessage};
use plaza::sim::{DataIn, LinkConfig, MediaSpec, NodeId, envelope, envelope_seq};
use std::collections::BTreeMap;
use std::time::Duration;

/// Bound of every wait, in virtual time.
const T: Duration = Duration::from_secs(20);

/// What `id` received on `label` (acks and tick batches excluded).
fn relayed(s: &mut Sim, id: NodeId, label: &str) -> Vec<DataIn> {
    s.c(id)
        .data_received()
        .into_iter()
        .filter(|d| d.label == label && d.ack.is_none() && d.tick.is_none())
        .collect()
}

/// Acks `id` received on `label`.
fn acks(s: &mut Sim, id: NodeId, label: &str) -> Vec<DataIn> {
    s.c(id)
        .data_received()
        .into_iter()
        .filter(|d| d.label == label && d.ack.is_some())
        .collect()
}

/// Four participants send bursts at the same instants; every receiver gets every message
/// once, in strictly increasing `seq`; every `seq` from 1 up is used once (no gaps); the same
/// `seq` is the same message for everyone; `ts` never decreases along `seq`; acks give the
/// sender the `seq` its receivers saw.
#[test]
fn concurrent_senders_get_one_order_that_every_receiver_agrees_on() {
    let mut s = Sim::new(41);
    let ids: Vec<NodeId> = (0..4)
        .map(|i| s.client(1 + i, &format!("p{i}"), "a", MediaSpec::none()))
        .collect();
    s.wait_channels(&ids, T);
    let pids: Vec<String> = ids.iter().map(|&id| s.pid(id)).collect();
    const N: u64 = 25;
    for round in 0..N {
        for (k, &id) in ids.iter().enumerate() {
            let body = format!("{k}:{round}");
            s.c(id).send_data(
                "chat",
                true,
                envelope_seq(&[], round + 1, true, body.as_bytes()),
            );
        }
        s.net.run_for(Duration::from_millis(3));
    }
    s.net.run_for(Duration::from_secs(2));
    let total = N * ids.len() as u64;
    // seq → (from, sseq, payload, ts), the same for everyone who saw it.
    let mut agreed: BTreeMap<u64, (String, u64, Vec<u8>, u64)> = BTreeMap::new();
    for (k, &id) in ids.iter().enumerate() {
        let got = relayed(&mut s, id, "chat");
        assert_eq!(
            got.len() as u64,
            total - N,
            "p{k} gets every other message once"
        );
        let seqs: Vec<u64> = got.iter().map(|d| d.seq.expect("seq")).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "p{k} receives in seq order: {seqs:?}"
        );
        for d in &got {
            let v = (
                d.from.clone().unwrap(),
                d.sseq.expect("sseq echoed"),
                d.payload.clone(),
                d.ts.expect("ts"),
            );
            assert_ne!(v.0, pids[k], "never its own");
            let first = agreed.entry(d.seq.unwrap()).or_insert_with(|| v.clone());
            assert_eq!(*first, v, "p{k} agrees on seq {}", d.seq.unwrap());
        }
    }
    for (k, &id) in ids.iter().enumerate() {
        // Its own messages: acknowledged with the seq the others saw.
        let a = acks(&mut s, id, "chat");
        assert_eq!(a.len() as u64, N, "p{k}: one ack per message");
        for ack in a {
            let seq = ack.seq.expect("ack seq");
            let (from, sseq, _, ts) = &agreed_or(&agreed, seq);
            assert_eq!((from.as_str(), *sseq), (pids[k].as_str(), ack.ack.unwrap()));
            assert_eq!(Some(*ts), ack.ts);
        }
    }
    // Seq 1..=4 are the four joins (room events, which nobody here asked for).
    assert_eq!(
        agreed.keys().copied().collect::<Vec<_>>(),
        (5..=total + 4).collect::<Vec<_>>(),
        "every seq used once, no gaps"
    );
    let ts: Vec<u64> = agreed.values().map(|v| v.3).collect();
    assert!(ts.windows(2).all(|w| w[0] <= w[1]), "ts never goes back");
    assert_eq!(s.stats().data_messages_sequenced, total + 4);
}

fn agreed_or(
    agreed: &BTreeMap<u64, (String, u64, Vec<u8>, u64)>,
    seq: u64,
) -> (String, u64, Vec<u8>, u64) {
    agreed
        .get(&seq)
        .cloned()
        .unwrap_or_else(|| panic!("seq {seq} was acked but nobody received it"))
}

/// A retry (the same `sseq` again) is dropped and acknowledged as a duplicate with the first
/// one's stamp; an `sseq` far below the highest is a duplicate too. Input and chat count
/// separately.
#[test]
fn retries_are_dropped_by_sender_sequence() {
    let mut s = Sim::new(42);
    let a = s.client(1, "a", "r", MediaSpec::none());
    let b = s.client(2, "b", "r", MediaSpec::none());
    s.wait_channels(&[a, b], T);
    for (sseq, body) in [(5, "one"), (5, "one again"), (6, "two"), (5, "late retry")] {
        s.c(a)
            .send_data("chat", true, envelope_seq(&[], sseq, true, body.as_bytes()));
        s.net.run_for(Duration::from_millis(50));
    }
    // The same sseq on input is another lane: not a duplicate.
    s.c(a)
        .send_data("input", true, envelope_seq(&[], 5, false, b"input five"));
    s.c(a)
        .send_data("chat", true, envelope_seq(&[], 5000, false, b"jump"));
    s.c(a)
        .send_data("chat", true, envelope_seq(&[], 7, true, b"too old"));
    s.net.run_for(Duration::from_secs(1));
    let chat: Vec<Vec<u8>> = relayed(&mut s, b, "chat")
        .into_iter()
        .map(|d| d.payload)
        .collect();
    assert_eq!(chat, [b"one".to_vec(), b"two".to_vec(), b"jump".to_vec()]);
    assert_eq!(relayed(&mut s, b, "input").len(), 1);
    let a_acks = acks(&mut s, a, "chat");
    let summary: Vec<(u64, Option<u64>, bool)> = a_acks
        .iter()
        .map(|d| (d.ack.unwrap(), d.seq, d.dup))
        .collect();
    assert_eq!(
        summary,
        [
            // (Seq 1 and 2: the joins.)
            (5, Some(3), false),
            (5, Some(3), true),
            (6, Some(4), false),
            (5, Some(3), true),
            (7, None, true)
        ]
    );
    assert_eq!(s.stats().data_duplicates_dropped, 3);
}

/// A message to a participant whose channels are not open yet waits and arrives once they
/// open (before, it was dropped); then live messages follow in order.
#[test]
fn a_message_waits_for_the_channel_to_open() {
    let mut s = Sim::new(43);
    let a = s.client(1, "a", "r", MediaSpec::none());
    s.wait_channels(&[a], T);
    // b's link is slow: its channels open long after its join is known to a.
    let b = s.client(2, "b", "r", MediaSpec::none());
    let server = s.server;
    s.net.link_mut(server, b).delay = Duration::from_millis(300);
    s.net.link_mut(b, server).delay = Duration::from_millis(300);
    let seen = s.net.run_until_cond(T, |net| {
        net.node_ref::<plaza::sim::Client>(a)
            .count_messages(|m| matches!(m, ServerMessage::ParticipantJoined { .. }))
            == 1
    });
    assert!(seen.is_some());
    assert!(!s.c(b).channels_open(), "b's channels are not open yet");
    let pb = s.pid(b);
    s.c(a)
        .send_data("chat", true, envelope(&[&pb], b"early bird"));
    s.c(a).send_data("chat", true, envelope(&[], b"to all"));
    s.wait_channels(&[b], T);
    s.c(a).send_data("chat", true, envelope(&[], b"live"));
    s.net.run_for(Duration::from_secs(2));
    let got: Vec<(u64, Vec<u8>)> = relayed(&mut s, b, "chat")
        .into_iter()
        .map(|d| (d.seq.unwrap(), d.payload))
        .collect();
    // (Seq 1 and 2 are the joins: room events are always on the chat lane.)
    assert_eq!(
        got,
        [
            (3, b"early bird".to_vec()),
            (4, b"to all".to_vec()),
            (5, b"live".to_vec())
        ]
    );
}

/// A late joiner asks for history: the room's chat (and, as it asked for them, its events)
/// is replayed in seq order, marked `replay`, without the messages addressed to others; a
/// second request from a seq it has gets only what followed. With a small history the reply
/// says what fell out.
#[test]
fn a_late_joiner_replays_history() {
    let mut s = Sim::with_config(44, |c| c.history.messages = 8);
    let a = s.client(1, "a", "r", MediaSpec::none());
    let b = s.client(2, "b", "r", MediaSpec::none());
    s.wait_channels(&[a, b], T);
    let pb = s.pid(b);
    for i in 0..5 {
        s.c(a)
            .send_data("chat", true, envelope(&[], format!("m{i}").as_bytes()));
    }
    s.c(a)
        .send_data("chat", true, envelope(&[&pb], b"for b only"));
    s.c(a).send_data("input", true, envelope(&[], b"not kept"));
    s.net.run_for(Duration::from_secs(1));

    let c = s.client_with(3, "c", "r", MediaSpec::none(), |c| c.timeline_events());
    s.wait_channels(&[c], T);
    s.c(c).send(ClientMessage::History { since: 0 });
    s.net.run_for(Duration::from_secs(1));
    let got = relayed(&mut s, c, "chat");
    let replayed: Vec<(u64, Vec<u8>, Option<String>)> = got
        .iter()
        .filter(|d| d.replay)
        .map(|d| (d.seq.unwrap(), d.payload.clone(), d.event.clone()))
        .collect();
    // Events and chat share the chat lane: seq 1, 2 are the two joins (a and b; the room
    // keeps events for everyone and replays them to whoever asked for events), 3..=7 the
    // broadcasts, 8 the message to b (not replayed to c), 9 c's own join. Only 8 are kept:
    // seq 1 fell out.
    let seqs: Vec<u64> = replayed.iter().map(|r| r.0).collect();
    assert_eq!(seqs, [2, 3, 4, 5, 6, 7, 9], "what c may see, in order");
    assert_eq!(replayed[0].2.as_deref(), Some("participant_joined"));
    assert_eq!(replayed[1].1, b"m0");
    assert_eq!(replayed[6].2.as_deref(), Some("participant_joined"));
    let reply = s.c(c).messages.iter().find_map(|(_, m)| match m {
        ServerMessage::History {
            since,
            oldest,
            latest,
            replayed,
            complete,
        } => Some((*since, *oldest, *latest, *replayed, *complete)),
        _ => None,
    });
    assert_eq!(reply, Some((0, 2, 9, 7, false)));
    // c's own join was live too (it asked for events), before the replay.
    assert!(
        got.iter()
            .any(|d| !d.replay && d.event.as_deref() == Some("participant_joined"))
    );

    // From a seq it has: only what followed, complete.
    s.c(c).send(ClientMessage::History { since: 6 });
    s.net.run_for(Duration::from_secs(1));
    let n = relayed(&mut s, c, "chat")
        .iter()
        .filter(|d| d.replay)
        .count();
    assert_eq!(n, 7 + 2, "7 and 9 again");
    let last = s.c(c).messages.iter().rev().find_map(|(_, m)| match m {
        ServerMessage::History { complete, .. } => Some(*complete),
        _ => None,
    });
    assert_eq!(last, Some(true));
}

/// Room events go on the chat timeline for those that asked: a join, a publication and a
/// leave come in seq order with the chat around them, and someone that did not ask gets none.
#[test]
fn room_events_share_the_chat_timeline() {
    let mut s = Sim::new(45);
    let a = s.client_with(1, "a", "r", MediaSpec::none(), |c| c.timeline_events());
    let b = s.client(2, "b", "r", MediaSpec::none());
    s.wait_channels(&[a, b], T);
    s.c(b).send_data("chat", true, envelope(&[], b"before"));
    s.net.run_for(Duration::from_millis(200));
    let c = s.client(3, "c", "r", MediaSpec::audio_video());
    s.wait_channels(&[c], T);
    s.net.run_for(Duration::from_secs(1));
    s.c(b).send_data("chat", true, envelope(&[], b"after"));
    s.net.run_for(Duration::from_millis(200));
    s.c(c).send(ClientMessage::Leave);
    s.net.run_for(Duration::from_secs(1));
    let got = relayed(&mut s, a, "chat");
    let seqs: Vec<u64> = got.iter().map(|d| d.seq.unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] + 1 == w[1]), "{seqs:?}");
    let kinds: Vec<String> = got
        .iter()
        .map(|d| match &d.event {
            Some(e) => e.clone(),
            None => String::from_utf8_lossy(&d.payload).into_owned(),
        })
        .collect();
    // a's own join came before its channels opened: it waited for them.
    assert_eq!(
        kinds,
        [
            "participant_joined",
            "participant_joined",
            "before",
            "participant_joined",
            "track_published",
            "track_published",
            "after",
            "track_unpublished",
            "track_unpublished",
            "participant_left",
        ],
        "{kinds:?}"
    );
    let ev = got.iter().find(|d| d.event.is_some()).unwrap();
    assert_eq!(ev.from.as_deref(), Some("server"));
    let v: serde_json::Value = serde_json::from_slice(&ev.payload).unwrap();
    assert_eq!(v["type"], "participant_joined");
    // b did not ask for events.
    assert!(relayed(&mut s, b, "chat").iter().all(|d| d.event.is_none()));
}

/// With input ticks, a tick's inputs reach each receiver as one batch with the tick number,
/// the receiver's own inputs included, in seq order; the ack names the tick.
#[test]
fn input_ticks_batch_a_ticks_inputs() {
    let mut s = Sim::new(46);
    let a = s.client_with(1, "a", "g", MediaSpec::none(), |c| c.input_tick_hz(20));
    let b = s.client(2, "b", "g", MediaSpec::none());
    let c = s.client(3, "c", "g", MediaSpec::none());
    s.wait_channels(&[a, b, c], T);
    let joined = match &s.c(b).joined {
        Some(ServerMessage::Joined { input_tick_hz, .. }) => Some(*input_tick_hz),
        _ => None,
    };
    assert_eq!(joined, Some(20));
    // Three inputs within a few ms: one tick (the tick is 50 ms; start right after a tick
    // boundary would be ideal, but the batch may be split in two at most).
    s.c(a)
        .send_data("input", true, envelope_seq(&[], 1, true, b"a1"));
    s.c(b).send_data("input", false, envelope(&[], &[0, 1, 2]));
    s.c(a)
        .send_data("input", true, envelope_seq(&[], 2, false, b"a2"));
    s.net.run_for(Duration::from_millis(300));
    for (name, id) in [("a", a), ("b", b), ("c", c)] {
        let batches: Vec<DataIn> = s
            .c(id)
            .data_received()
            .into_iter()
            .filter(|d| d.label == "input" && d.tick.is_some())
            .collect();
        assert!(
            (1..=2).contains(&batches.len()),
            "{name}: {} batches",
            batches.len()
        );
        assert!(
            relayed(&mut s, id, "input").is_empty(),
            "{name}: nothing unbatched"
        );
        let entries: Vec<DataIn> = batches.iter().flat_map(|b| b.tick_entries()).collect();
        let seqs: Vec<u64> = entries.iter().map(|e| e.seq.unwrap()).collect();
        assert_eq!(seqs, [1, 2, 3], "{name} sees every input, its own included");
        let payloads: Vec<&[u8]> = entries.iter().map(|e| &e.payload[..]).collect();
        assert_eq!(
            payloads,
            [&b"a1"[..], b"a2", &[0, 1, 2]],
            "{name}: in seq order"
        );
        assert!(entries[0].is_text && !entries[2].is_text);
    }
    let ack = acks(&mut s, a, "input");
    assert_eq!(ack.len(), 1);
    assert!(ack[0].tick.is_some(), "the ack names the tick");
}

/// `ts` is the server's clock when it took the message: two messages sent 500 ms apart over
/// a fixed-delay link are stamped 500 ms apart, and the receiver gets each one link delay
/// after its stamp.
#[test]
fn ts_is_the_servers_receive_time() {
    let mut s = Sim::new(47);
    let a = s.client(1, "a", "r", MediaSpec::none());
    let b = s.client(2, "b", "r", MediaSpec::none());
    s.wait_channels(&[a, b], T);
    let server = s.server;
    *s.net.link_mut(a, server) = LinkConfig {
        delay: Duration::from_millis(40),
        ..LinkConfig::default()
    };
    *s.net.link_mut(server, b) = LinkConfig {
        delay: Duration::from_millis(60),
        ..LinkConfig::default()
    };
    s.c(a).send_data("chat", true, envelope(&[], b"x"));
    s.net.run_for(Duration::from_millis(500));
    s.c(a).send_data("chat", true, envelope(&[], b"y"));
    s.net.run_for(Duration::from_secs(1));
    let got = relayed(&mut s, b, "chat");
    assert_eq!(got.len(), 2);
    let sent: Vec<_> = s.c(a).data_sent.iter().map(|d| d.0).collect();
    let (ts0, ts1) = (got[0].ts.unwrap(), got[1].ts.unwrap());
    let sent_gap = (sent[1] - sent[0]).as_micros() as u64;
    assert_eq!(
        ts1 - ts0,
        sent_gap,
        "stamped as far apart as they were sent"
    );
    let recv_gap = (got[1].at - got[0].at).as_micros() as u64;
    assert_eq!(recv_gap, sent_gap);
}

/// A room admin's moderation is on the timeline too: muting a participant's chat comes as a
/// `permissions_changed` event (with whose permissions) between the chat before and after.
#[test]
fn moderation_is_on_the_timeline() {
    let mut s = Sim::new(48);
    let admin = s.client_with(1, "admin", "r", MediaSpec::none(), |mut c| {
        c.join_with(|req| req.grants.room_admin = true);
        c.timeline_events()
    });
    let b = s.client(2, "b", "r", MediaSpec::none());
    s.wait_channels(&[admin, b], T);
    let pb = s.pid(b);
    s.c(b).send_data("chat", true, envelope(&[], b"first"));
    s.net.run_for(Duration::from_millis(200));
    s.c(admin).send(ClientMessage::MuteChat {
        participant_id: pb.clone(),
        muted: true,
    });
    s.net.run_for(Duration::from_millis(200));
    s.c(b)
        .send_data("chat", true, envelope(&[], b"muted: refused"));
    s.c(b)
        .send_data("input", true, envelope(&[], b"input still goes"));
    s.net.run_for(Duration::from_millis(500));
    let got = relayed(&mut s, admin, "chat");
    let tail: Vec<(Option<String>, Vec<u8>)> = got
        .iter()
        .skip_while(|d| d.payload != b"first")
        .map(|d| (d.event.clone(), d.payload.clone()))
        .collect();
    assert_eq!(tail.len(), 2, "{tail:?}");
    assert_eq!(tail[1].0.as_deref(), Some("permissions_changed"));
    let v: serde_json::Value = serde_json::from_slice(&tail[1].1).unwrap();
    assert_eq!(v["participant_id"], pb.as_str());
    assert_eq!(v["permissions"]["chat_muted"], true);
    assert_eq!(relayed(&mut s, admin, "input").len(), 1);
}
