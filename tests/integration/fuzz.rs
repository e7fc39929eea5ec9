//! Fuzz targets for every parser that sees network input, run as ordinary tests on stable
//! Rust (see `tests/integration/fuzz/engine.rs` for the driver and `scripts/fuzz.sh` for long runs).
//!
//! Each target replays its regression inputs and seeds, then a bounded number of mutated
//! inputs (`PLAZA_FUZZ_INPUTS` overrides the count): no input may panic, and the properties
//! asserted below must hold for every input.

// Prints each target's count and rate; reads the wall clock for that.
#![allow(
    clippy::print_stdout,
    clippy::disallowed_methods,
    clippy::disallowed_types
)]

pub mod core;
pub mod engine;
pub mod seeds;
pub mod session;

use bytes::{Bytes, BytesMut};
use engine::{Spec, Unstructured, text};
use plaza::sfu::demux::{self, Demux};
use plaza::sfu::egress::{self, Egress, Outgoing, SrtpKeys};
use plaza::sfu::ingress::Ingress;
use plaza::sfu::rewrite::{Rewriter, SrcPacket, Vp8Munger};
use plaza::sfu::{Remote, data, red, sdpcheck, vp8};
use plaza::signal::{self, ClientMessage};
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::shared::marshal::Unmarshal;
use rtc::srtp::context::Context;
use rtc::srtp::protection_profile::ProtectionProfile;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Signaling JSON: the WebSocket session's handling of a text frame (size check, decode,
/// the error reply it would send) and `decode_client`; what decodes re-encodes and decodes to
/// the same message.
#[test]
fn fuzz_signal() {
    let offer = seeds::sdp_offers().remove(0);
    let spec = Spec {
        name: "signal",
        seeds: seeds::signal_messages(&offer)
            .into_iter()
            .map(String::into_bytes)
            .collect(),
        dict: seeds::json_dict(),
        default_inputs: 200_000,
        max_len: 8192,
    };
    let mut decoded = 0u64;
    let n = engine::run(spec, |data| {
        let t = text(data);
        let limit = 4096;
        match plaza::http::ws::check_text(&t, limit) {
            Ok(msg) => {
                decoded += 1;
                assert!(t.len() <= limit);
                let again = serde_json::to_string(&msg).expect("encode");
                let back = signal::decode_client(&again)
                    .unwrap_or_else(|e| panic!("{again} does not decode again: {e}"));
                // `ts` goes through an f64 text round trip: compare the rest exactly.
                if !matches!(msg, ClientMessage::Ping { .. }) {
                    assert_eq!(back, msg, "re-encoded as {again}");
                }
            }
            Err(reply) => {
                let _ = signal::encode_server(&reply);
            }
        }
        let _ = signal::decode_client(&t);
    });
    assert!(decoded > n / 100, "only {decoded} of {n} inputs decoded");
}

/// SDP handed to the server: the checks, the candidate count, the transport-cc extension id
/// and the RIDs the core reads itself, then `rtc`'s parse as the core calls it.
#[test]
fn fuzz_sdp() {
    let offers = seeds::sdp_offers();
    let answers = seeds::sdp_answers(&offers);
    assert!(answers.len() >= 3, "no answer seeds");
    // The seeds are what the server accepts: they get the mutations past its checks.
    for o in &offers {
        sdpcheck::check_offer(o).unwrap_or_else(|e| panic!("{e}: {o}"));
        RTCSessionDescription::offer(o.clone()).unwrap_or_else(|e| panic!("{e}: {o}"));
    }
    for a in &answers {
        sdpcheck::check_answer(a).unwrap_or_else(|e| panic!("{e}: {a}"));
        RTCSessionDescription::answer(a.clone()).unwrap_or_else(|e| panic!("{e}: {a}"));
    }
    let spec = Spec {
        name: "sdp",
        seeds: offers
            .into_iter()
            .chain(answers)
            .map(String::into_bytes)
            .collect(),
        dict: seeds::sdp_dict(),
        default_inputs: 40_000,
        max_len: 16 * 1024,
    };
    let mut parsed = 0u64;
    let n = engine::run(spec, |data| {
        let sdp = text(data).into_owned();
        let _ = sdpcheck::count_candidates(&sdp);
        let _ = plaza::sfu::ingress::twcc_ext_id(&sdp);
        for mid in ["0", "1", "2", ""] {
            let _ = plaza::sfu::core::offered_rids(&sdp, mid);
        }
        if sdpcheck::check_offer(&sdp).is_ok() {
            if let Ok(o) = RTCSessionDescription::offer(sdp.clone()) {
                parsed += 1;
                let _ = o.unmarshal();
            }
        }
        if sdpcheck::check_answer(&sdp).is_ok() {
            if let Ok(a) = RTCSessionDescription::answer(sdp.clone()) {
                let _ = a.unmarshal();
            }
        }
        // And `rtc`'s parser on what the checks refuse.
        let _ = RTCSessionDescription::offer(sdp);
    });
    assert!(
        parsed > n / 100,
        "only {parsed} of {n} offers passed the checks and parsed"
    );
}

/// The data-channel envelope: what parses has its payload at the end of the message, at most
/// `MAX_RECIPIENTS` distinct recipients, and frames for a receiver.
#[test]
fn fuzz_data() {
    let spec = Spec {
        name: "data",
        seeds: seeds::data_messages(),
        dict: seeds::json_dict(),
        default_inputs: 500_000,
        max_len: 4096,
    };
    let mut parsed = 0u64;
    let n = engine::run(spec, |msg| {
        let max = 1024;
        if let Ok(inbound) = data::parse_client(msg, max) {
            parsed += 1;
            assert!(inbound.payload.len() <= max);
            assert!(msg.ends_with(inbound.payload));
            assert!(inbound.to.len() <= data::MAX_RECIPIENTS);
            for (i, a) in inbound.to.iter().enumerate() {
                assert!(!inbound.to[i + 1..].contains(a), "duplicate recipient {a}");
            }
            let from = inbound.to.first().map_or("PA_x", String::as_str);
            let framed = plaza::sfu::timeline::frame(
                &plaza::sfu::timeline::Header {
                    from,
                    stamp: plaza::sfu::timeline::Stamp { seq: 1, ts: 2 },
                    sseq: inbound.sseq,
                    event: None,
                    replay: false,
                    text: false,
                    tick: None,
                },
                inbound.payload,
            );
            assert!(framed.ends_with(inbound.payload));
            let back = data::parse_client(&framed, max.max(inbound.payload.len()))
                .expect("a framed message parses");
            assert_eq!(back.payload, inbound.payload);
        }
    });
    assert!(parsed > n / 10, "only {parsed} of {n} messages parsed");
}

/// Access tokens: the join's token as the server verifies it (header, issuer, signature,
/// claims, times, room). Seeds are real tokens: valid ones with every grant shape, expired and
/// not-yet-valid ones, one signed with another key, one for another room. Nothing panics; a
/// token verifies only as what it was minted for (its room, its identity).
#[test]
fn fuzz_token() {
    use plaza::auth::{ApiKey, Claims, KeySet, RoomGrants, Verifier, mint};
    let now = 1_767_225_600u64;
    let key = ApiKey::new("fuzzkey", "a-fuzzing-secret-of-at-least-32-bytes!!");
    let other = ApiKey::new("fuzzkey", "another-secret-of-at-least-32-bytes-long");
    let mut keys = KeySet::new();
    keys.insert(key.clone());
    let verifier = Verifier::new(keys);
    let ttl = Duration::from_secs(600);
    let claims = |id: &str, room: &str| {
        let mut c = Claims::new(id, room, ttl);
        c.iat = Some(now);
        c.nbf = None;
        c.exp = now + 600;
        c
    };
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    let mut add = |k: &ApiKey, c: &Claims| seeds.push(mint(k, c).expect("mint").into_bytes());
    add(&key, &claims("alice", "fuzz"));
    add(
        &key,
        &claims("bob", "fuzz")
            .with_name("Bob 🎉")
            .with_grants(RoomGrants {
                hidden: true,
                room_admin: true,
                ..RoomGrants::participant("fuzz")
            }),
    );
    let mut expired = claims("carol", "fuzz");
    expired.exp = now - 3600;
    add(&key, &expired);
    let mut early = claims("dan", "fuzz");
    early.nbf = Some(now + 3600);
    add(&key, &early);
    add(&other, &claims("eve", "fuzz"));
    add(&key, &claims("frank", "elsewhere"));
    let spec = Spec {
        name: "token",
        seeds,
        dict: [
            "eyJ",
            ".",
            "\"alg\":\"none\"",
            "\"iss\"",
            "\"sub\"",
            "\"exp\"",
            "\"nbf\"",
            "\"grants\"",
            "\"room\"",
            "null",
            "-1",
            "1e309",
            "=",
        ]
        .iter()
        .map(|d| d.as_bytes().to_vec())
        .collect(),
        default_inputs: 200_000,
        max_len: 4096,
    };
    let mut verified = 0u64;
    engine::run(spec, |data| {
        let t = text(data);
        for room in [None, Some("fuzz")] {
            if let Ok(v) = verifier.verify_at(Some(&t), room, now) {
                verified += 1;
                // Only what was minted with the key, unexpired, verifies: its own room and
                // identity, and the room asked for when one was.
                let minted = [("alice", "fuzz"), ("bob", "fuzz"), ("frank", "elsewhere")];
                assert!(
                    minted.contains(&(v.identity.as_str(), v.room.as_str())),
                    "something nobody minted verified: {t} → {v:?}"
                );
                assert!(room.is_none_or(|r| r == v.room), "{t} → {v:?}");
            }
        }
    });
    // The valid seeds verify (alice and bob for both rooms asked, frank for his own).
    assert!(verified >= 5, "only {verified} inputs verified");
}

/// STUN demultiplexing: `route` with registered connections and remembered checks,
/// `binding_kind`, `stun_username`, and the demux's own bookkeeping (`on_send`, `expire`).
#[test]
fn fuzz_stun() {
    let mut seeds = vec![
        seeds::binding_request("srv1:cli1", "serverpassword0123456789", 1, true, true),
        seeds::binding_request("srv2:cli2", "serverpassword0123456789", 2, false, true),
        seeds::binding_request("cli1:srv1", "clientpassword0123456789", 3, false, false),
        seeds::binding_success("clientpassword0123456789", 4),
        seeds::dtls_client_hello(),
    ];
    seeds.extend(seeds::rtcp_compounds(7).into_iter().take(2));
    seeds.push(seeds::rtp_packet(7, 1, 2, 96, b"payload", Some((3, 9))));
    let spec = Spec {
        name: "stun",
        seeds,
        dict: vec![
            b"srv1:".to_vec(),
            b"srv2".to_vec(),
            vec![0x21, 0x12, 0xa4, 0x42],
            vec![0x00, 0x06],
            vec![0x00, 0x25, 0x00, 0x00],
            vec![0x80, 0x28, 0x00, 0x04],
            vec![0x00, 0x08, 0x00, 0x14],
        ],
        default_inputs: 1_000_000,
        max_len: 1500,
    };
    let t0 = Instant::now();
    let mut demux: Demux<u32> = Demux::new();
    demux.register(1, "srv1");
    demux.register(2, "srv2");
    // Two clients, each at one address over UDP and the same address over TCP.
    let addrs: Vec<Remote> = (0..4)
        .map(|i| Remote {
            addr: SocketAddr::from(([10, 0, 0, i / 2], 5000 + u16::from(i / 2))),
            tcp: i % 2 == 1,
        })
        .collect();
    let mut n = 0u64;
    let (mut bindings, mut routed) = (0u64, 0u64);
    engine::run(spec, |data| {
        n += 1;
        let now = t0 + Duration::from_millis(n);
        let from = addrs[(n % 4) as usize];
        bindings += u64::from(demux::binding_kind(data).is_some());
        if let Some(u) = demux::stun_username(data) {
            assert!(data.len() >= 20);
            assert!(u.len() < data.len());
        }
        routed += u64::from(demux.route(data, from, now).is_ok());
        // The same bytes as if the server sent them (a check of its own, a response).
        let key = 1 + (n % 2) as u32;
        let _ = demux.on_send(key, data, from, now);
        if n % 1024 == 0 {
            demux.expire(now);
            demux.release(2);
            demux.register(2, "srv2");
        }
        assert!(demux.pending_checks() <= 1 << 16);
    });
    assert!(
        bindings > n / 20 && routed > n / 20,
        "{bindings} bindings, {routed} routed of {n}"
    );
}

/// Keys of a connection and the peer's two contexts (it encrypts with our remote key and
/// decrypts with our local one).
fn keyed(profile: ProtectionProfile) -> (SrtpKeys, Context, Context) {
    let salt = if matches!(profile, ProtectionProfile::AeadAes128Gcm) {
        12
    } else {
        14
    };
    let keys = SrtpKeys {
        profile,
        local_key: (0..16).collect(),
        local_salt: (100..100 + salt).collect(),
        remote_key: (50..66).collect(),
        remote_salt: (200..200 + salt).collect(),
    };
    let crypto = rtc::crypto::default_provider().expect("provider");
    let ctx = |k: &[u8], s: &[u8]| {
        Context::new(k, s, profile, None, None, crypto.crypto()).expect("context")
    };
    let tx = ctx(&keys.remote_key, &keys.remote_salt);
    let rx = ctx(&keys.local_key, &keys.local_salt);
    (keys, tx, rx)
}

const PROFILES: [ProtectionProfile; 2] = [
    ProtectionProfile::AeadAes128Gcm,
    ProtectionProfile::Aes128CmHmacSha1_80,
];

/// SRTP/SRTCP unprotect with arbitrary bytes (mutations of real protected packets): every
/// path returns an error, never panics, and nothing that was not sealed with the key passes.
#[test]
fn fuzz_srtp() {
    let mut seeds = Vec::new();
    let mut sides = Vec::new();
    for profile in PROFILES {
        let (keys, mut tx, _) = keyed(profile);
        for (i, p) in seeds::vp8_payloads().iter().take(3).enumerate() {
            let plain = seeds::rtp_packet(0xabc, 10 + i as u16, 3000, 96, p, Some((3, 1)));
            seeds.push(tx.encrypt_rtp(&plain).expect("encrypt").to_vec());
        }
        for c in seeds::rtcp_compounds(0xabc).iter().take(3) {
            seeds.push(tx.encrypt_rtcp(c).expect("encrypt").to_vec());
        }
        sides.push((
            Egress::new(&keys).expect("egress"),
            Ingress::new(&keys, Some(3), 0x5eed).expect("ingress"),
        ));
    }
    let n_seeds = seeds.len();
    let spec = Spec {
        name: "srtp",
        seeds: seeds.clone(),
        dict: Vec::new(),
        default_inputs: 100_000,
        max_len: 1500,
    };
    let t0 = Instant::now();
    let mut accepted = 0u64;
    engine::run(spec, |data| {
        let pristine = seeds.iter().any(|s| s == data);
        for (e, i) in &mut sides {
            let ok = [
                e.on_rtcp(t0, data).is_ok(),
                i.on_rtp(t0, data).is_ok(),
                i.on_rtcp(t0, data).is_ok(),
            ];
            if ok.iter().any(|&o| o) {
                assert!(pristine, "forged or altered packet accepted: {ok:?}");
                accepted += 1;
            }
        }
    });
    // The seeds themselves go through once each (in their own profile; replays refused).
    assert!(accepted >= n_seeds as u64 / 2, "seeds accepted: {accepted}");
}

/// Most inputs get a fresh sequence number (the `n`th), so that replay protection lets them
/// through to the parsing behind it; every 8th keeps its own.
fn fresh_seq(data: &[u8], n: u64) -> Vec<u8> {
    let mut d = data.to_vec();
    if n % 8 != 0 && d.len() >= 4 {
        d[2..4].copy_from_slice(&(n as u16).to_be_bytes());
    }
    d
}

/// Protects `data` as the publisher would, if it is an RTP packet `rtc` can protect: its
/// encrypt panics when the header it re-measures is longer than the bytes given (a sender-side
/// limit: the server only protects packets it marshalled itself).
fn seal_rtp(tx: &mut Context, data: &[u8]) -> Option<Vec<u8>> {
    let header = rtc::rtp::Header::unmarshal(&mut &data[..]).ok()?;
    if rtc::shared::marshal::MarshalSize::marshal_size(&header) > data.len() {
        return None;
    }
    tx.encrypt_rtp(data).ok().map(|b| b.to_vec())
}

/// Reads a protected packet as the peer would: `Some(plain)` if it decrypts.
fn open_rtp(rx: &mut Context, wire: &[u8]) -> Option<Vec<u8>> {
    rx.decrypt_rtp(wire).ok().map(|b| b.to_vec())
}

/// RTCP from a subscriber as the egress fast path reads it: the compound walker, the NACK,
/// FIR, REMB and transport-cc parsers (also called directly on every packet the walker
/// yields, and checked against `rtc`'s parse of the same bytes where they both succeed), and
/// `Egress::on_rtcp` on the same compound sealed with the subscriber's key, after media went
/// out so that NACKs find packets to resend.
#[test]
fn fuzz_rtcp() {
    let media_ssrc = 0xabc;
    let spec = Spec {
        name: "rtcp",
        seeds: seeds::rtcp_compounds(media_ssrc),
        dict: vec![
            vec![0x80, 205],
            vec![0x81, 205],
            vec![0x8f, 205],
            vec![0x81, 206],
            vec![0x84, 206],
            vec![0x8f, 206],
            vec![0xa0, 200],
            b"REMB".to_vec(),
            0xabc_u32.to_be_bytes().to_vec(),
        ],
        default_inputs: 200_000,
        max_len: 1500,
    };
    let t0 = Instant::now();
    let mut sides: Vec<_> = PROFILES
        .iter()
        .map(|&profile| {
            let (keys, tx, rx) = keyed(profile);
            let mut e = Egress::new(&keys).expect("egress");
            for seq in 0..64u16 {
                let mut p = rtc::rtp::Packet::unmarshal(&mut Bytes::from(seeds::rtp_packet(
                    media_ssrc,
                    seq,
                    u32::from(seq) * 3000,
                    96,
                    &[seq as u8; 100],
                    None,
                )))
                .expect("rtp");
                e.protect_rtp(
                    t0,
                    &mut p,
                    Outgoing::video(Some(3), seq == 0),
                    BytesMut::new(),
                )
                .expect("protect");
            }
            (e, tx, rx)
        })
        .collect();
    let mut n = 0u64;
    let (mut nacks, mut twcc, mut fed) = (Vec::new(), Vec::new(), Vec::new());
    let (mut resent, mut acks, mut keyframes, mut estimates, mut compared) = (0, 0, 0, 0, 0);
    engine::run(spec, |data| {
        n += 1;
        let now = t0 + Duration::from_millis(n % 5000);
        let _ = (egress::is_rtp(data), egress::is_rtcp(data));
        for p in egress::rtcp_packets(data).flatten() {
            assert!(p.body.len() + 4 <= data.len());
            nacks.clear();
            if egress::parse_nack(p.body, &mut nacks).is_ok() {
                // Each 4-byte pair reports its own sequence number and up to 16 more.
                let pairs = (p.body.len() - 8) / 4;
                assert!((pairs..=17 * pairs).contains(&nacks.len()));
            }
            fed.clear();
            let _ = egress::parse_fir(p.body, &mut fed);
            let _ = egress::parse_remb(p.body);
            let _ = egress::feedback_media_ssrc(p.body);
            if egress::parse_twcc(p.body, &mut twcc).is_err() {
                assert!(
                    twcc.is_empty(),
                    "a failed transport-cc parse leaves no acks"
                );
            }
            acks += twcc.len() as u64;
        }
        let _ = rtc::rtcp::packet::unmarshal(&mut Bytes::copy_from_slice(data));
        // Differential: a lone generic NACK reads the same here as in `rtc`.
        if let (Some(Ok(p)), Ok(theirs)) = (
            egress::rtcp_packets(data).next(),
            TransportLayerNack::unmarshal(&mut &data[..]),
        ) {
            nacks.clear();
            if (p.pt, p.fmt) == (egress::PT_RTPFB, egress::FMT_NACK)
                && p.body.len() + 4 == data.len()
                && egress::parse_nack(p.body, &mut nacks) == Ok(theirs.media_ssrc)
            {
                let their_seqs: Vec<u16> = plaza::sfu::nack::nack_seqs(&theirs).collect();
                assert_eq!(nacks, their_seqs, "NACK read unlike rtc");
                compared += 1;
            }
        }
        let (e, tx, rx) = &mut sides[(n % 2) as usize];
        if let Ok(sealed) = tx.encrypt_rtcp(data) {
            let fb = e.on_rtcp(now, &sealed).expect("a sealed compound decrypts");
            keyframes += fb.keyframes.len() as u64;
            estimates += u64::from(fb.estimate_updated);
            for r in &fb.retransmissions {
                assert!(
                    open_rtp(rx, r).is_some(),
                    "a retransmission the subscriber cannot read"
                );
                resent += 1;
            }
        }
    });
    assert!(
        resent > 0,
        "no NACK was ever answered: the seeds do not reach the NACK path"
    );
    assert!(
        acks > 0 && keyframes > 0 && estimates > 0 && compared > 0,
        "{acks} transport-cc acks, {keyframes} keyframe asks, {estimates} estimates, \
         {compared} NACKs compared with rtc's"
    );
}

/// A publisher's media as the ingress fast path reads it: RTP (header, extensions, the
/// transport-wide sequence number) and SRTCP sender reports, sealed with the publisher's key,
/// with feedback timers run in between; the feedback it writes decrypts at the publisher.
#[test]
fn fuzz_ingress() {
    let mut seeds: Vec<Vec<u8>> = seeds::vp8_payloads()
        .iter()
        .enumerate()
        .map(|(i, p)| {
            seeds::rtp_packet(
                0xabc + (i % 2) as u32,
                i as u16,
                3000 * i as u32,
                96,
                p,
                Some((3, i as u16)),
            )
        })
        .collect();
    seeds.extend(seeds::rtcp_compounds(0xabc));
    let spec = Spec {
        name: "ingress",
        seeds,
        dict: vec![
            vec![0x90, 96],
            vec![0xbe, 0xde],
            vec![0x10, 0x00],
            vec![0x80, 200],
        ],
        default_inputs: 300_000,
        max_len: 1500,
    };
    let t0 = Instant::now();
    // A publisher's connection; a new one every 1024 packets, since the sequence numbers the
    // inputs keep may leave the two sides' rollover counters apart.
    let connect = || {
        let (keys, tx, rx) = keyed(ProtectionProfile::AeadAes128Gcm);
        let mut ing = Ingress::new(&keys, Some(3), 0x5eed).expect("ingress");
        ing.set_audio_level_ext(Some(1));
        ing.bind(0xabc, "TR_a".into(), 90_000, true);
        ing.bind(0xabd, "TR_b".into(), 48_000, false);
        (ing, tx, rx)
    };
    let (mut ing, mut tx, mut rx) = connect();
    let mut n = 0u64;
    let (mut feedback, mut fast) = (0u64, 0u64);
    let total = engine::run(spec, |data| {
        n += 1;
        if n % 1024 == 0 {
            (ing, tx, rx) = connect();
        }
        let now = t0 + Duration::from_millis(n);
        if egress::is_rtcp(data) {
            if let Ok(s) = tx.encrypt_rtcp(data) {
                let _ = ing.on_rtcp(now, &s);
            }
        } else if let Some(s) = seal_rtp(&mut tx, &fresh_seq(data, n)) {
            if let Ok(inc) = ing.on_rtp(now, &s) {
                fast += u64::from(inc.track.is_some());
                let _ = plaza::sfu::core::is_keyframe("video/VP8", &inc.packet.payload);
            }
        }
        if ing.deadline().is_some_and(|d| d <= now) {
            ing.on_timeout(now);
        }
        for out in ing.take_output() {
            rx.decrypt_rtcp(&out)
                .expect("feedback the publisher can read");
            feedback += 1;
        }
        if n % 4096 == 0 {
            let _ = ing.pli(0xabc);
        }
    });
    assert!(feedback > 0, "the ingress never sent feedback");
    assert!(
        fast > total / 10,
        "only {fast} of {total} packets took the fast path"
    );
}

/// VP8 payload descriptors and keyframe headers, H.264 keyframe detection, in-place
/// descriptor rewriting, and the munger and header rewriter on arbitrary payloads and
/// packet sequences.
#[test]
fn fuzz_media() {
    let mut seeds = seeds::vp8_payloads();
    seeds.extend(seeds::h264_payloads());
    let spec = Spec {
        name: "media",
        seeds,
        dict: vec![vec![0x9d, 0x01, 0x2a], vec![0x80, 0x80], vec![0xff, 0xff]],
        default_inputs: 500_000,
        max_len: 1200,
    };
    let t0 = Instant::now();
    let mut munger = Vp8Munger::new();
    let mut rewriter = Rewriter::new(0x1234);
    let mut h264_layer = plaza::sfu::h264::LayerState::new();
    let mut n = 0u64;
    let (mut descriptors, mut keyframes) = (0u64, 0u64);
    engine::run(spec, |data| {
        n += 1;
        let _ = vp8::payload_header(data);
        let _ = vp8::keyframe_size(data);
        let kf = vp8::is_keyframe(data);
        keyframes += u64::from(kf);
        assert_eq!(plaza::sfu::core::is_keyframe("video/vp8", data), kf);
        let h = plaza::sfu::h264::inspect(data);
        assert_eq!(plaza::sfu::h264::is_keyframe(data), h.keyframe_content());
        assert_eq!(
            plaza::sfu::core::is_keyframe("video/h264", data),
            h.keyframe_content()
        );
        for unit in plaza::sfu::h264::nal_units(data) {
            assert!(unit.len() <= data.len());
            let _ = plaza::sfu::h264::sps_size(unit);
        }
        let seen = h264_layer.observe(&Bytes::copy_from_slice(data), (n / 3) as u32);
        if let Some(prefix) = h264_layer.prefix_for(&seen.info) {
            assert!(plaza::sfu::h264::inspect(&prefix).sps);
        }
        assert!(plaza::sfu::core::is_keyframe("audio/opus", data));
        let mut buf = data.to_vec();
        if let Ok(d) = vp8::parse_descriptor(data) {
            descriptors += 1;
            assert!(d.len <= data.len());
            let _ = d.set_picture_id(&mut buf, n as u16);
            let _ = d.set_tl0_pic_idx(&mut buf, n as u8);
            let _ = d.set_key_idx(&mut buf, (n >> 8) as u8);
            assert_eq!(buf.len(), data.len());
            let again = vp8::parse_descriptor(&buf).expect("a rewritten descriptor parses");
            assert_eq!(again.len, d.len);
            let cut = (n as usize) % (buf.len() + 1);
            let _ = d.set_picture_id(&mut buf[..cut], 1);
        }
        let switched = n % 97 == 0;
        let shared = munger.munge_shared(&Bytes::copy_from_slice(data), switched);
        assert_eq!(shared.len(), data.len());
        let mut buf = data.to_vec();
        let _ = munger.munge(&mut buf, switched);
        assert_eq!(buf.len(), data.len());
        // The payload's bytes as a packet sequence for the header rewriter.
        let mut u = Unstructured::new(data);
        while !u.is_empty() {
            let p = SrcPacket {
                ssrc: u32::from(u.u8() % 3),
                seq: u.u16(),
                timestamp: u.u32(),
                clock_rate: if u.bool() { 90_000 } else { 48_000 },
                arrival: t0 + Duration::from_millis(n * 10 + u64::from(u.u8())),
            };
            match u.below(4) {
                0 => {
                    let _ = rewriter.skip(&p);
                }
                1 => rewriter.force_switch(),
                _ => {
                    if let Some(h) = rewriter.rewrite(&p) {
                        assert_eq!(h.ssrc, 0x1234);
                        let _ = rewriter.source_seq(h.seq);
                    }
                }
            }
            let _ = rewriter.map_timestamp(p.ssrc, p.timestamp);
        }
    });
    assert!(
        descriptors > n / 10 && keyframes > 0,
        "{descriptors} descriptors, {keyframes} keyframes of {n}"
    );
}

/// RFC 2198 RED payloads (what a publisher sends as `audio/red`): reading the blocks, taking
/// out the primary block and retagging the blocks. What parses lies inside the payload, in
/// order, the primary last; stripping gives the primary's bytes; retagging keeps the layout.
#[test]
fn fuzz_red() {
    let frame = |n: u8| vec![n; 20 + usize::from(n % 60)];
    let seeds = vec![
        red::build(&[], 111, &frame(1)),
        red::build(&[(111, 960, &frame(2))], 111, &frame(3)),
        red::build(
            &[(111, 1920, &frame(4)), (111, 960, &frame(5))],
            111,
            &frame(6),
        ),
        red::build(&[(109, 0x3fff, &[7; 1023])], 109, &[]),
    ];
    let spec = Spec {
        name: "red",
        seeds,
        dict: vec![
            vec![0x80 | 111],
            vec![111],
            vec![0x03, 0xff],
            vec![0xff, 0xff],
        ],
        default_inputs: 200_000,
        max_len: 1500,
    };
    let (mut n, mut parsed) = (0u64, 0u64);
    engine::run(spec, |data| {
        n += 1;
        let bytes = Bytes::copy_from_slice(data);
        let Ok(r) = red::parse(data) else {
            assert!(red::primary(data).is_err());
            assert!(red::strip(&bytes, None).is_err());
            assert!(red::retag(&bytes, 111, 109).is_err());
            return;
        };
        parsed += 1;
        let mut end = 0;
        for b in r.redundant.iter().chain(std::iter::once(&r.primary)) {
            assert!(b.data.start >= end && b.data.end <= data.len());
            end = b.data.end;
        }
        assert_eq!(r.primary.data.end, data.len());
        assert_eq!(red::primary(data).as_ref(), Ok(&r.primary));
        let stripped = red::strip(&bytes, Some(r.primary.payload_type)).expect("strips");
        assert_eq!(&stripped[..], &data[r.primary.data.clone()]);
        let retagged = red::retag(&bytes, r.primary.payload_type, 5).expect("retags");
        assert_eq!(retagged.len(), data.len());
        let again = red::parse(&retagged).expect("a retagged payload parses");
        assert_eq!(again.primary.payload_type, 5);
        assert_eq!(again.primary.data, r.primary.data);
        assert_eq!(again.redundant.len(), r.redundant.len());
    });
    assert!(parsed > n / 10, "{parsed} of {n} parsed");
}

/// The node-to-node link: the input as one message (`link::codec::decode`: what decodes
/// re-encodes and decodes again), and as the plaintext of a datagram sealed by a known peer
/// (so it authenticates) handed to a `Link`: frames, acknowledgements, fragments,
/// reassembly, delivery.
#[test]
fn fuzz_link() {
    use plaza::cluster::link::codec::{self, LinkMsg};
    use plaza::cluster::link::seal::Sealer;
    use plaza::cluster::link::{Link, LinkConfig, LinkEvent};
    use plaza::sfu::pipe::PipeMsg;

    let now = Instant::now();
    let encode = |msg: PipeMsg| {
        let mut b = Vec::new();
        let m = LinkMsg {
            origin: 7,
            from_shard: 1,
            to_shard: 2,
            msg,
        };
        codec::encode(&m, &mut b).expect("encodes");
        b
    };
    let msgs = [
        encode(PipeMsg::Hello {
            room: "room".into(),
            to_home: true,
            reply: false,
        }),
        encode(PipeMsg::Rtp {
            relay: 3,
            layer: 1,
            packet: rtc::rtp::Packet {
                header: rtc::rtp::header::Header {
                    version: 2,
                    payload_type: 96,
                    sequence_number: 9,
                    ssrc: 5,
                    ..Default::default()
                },
                payload: Bytes::from_static(&[0x90, 0x80, 0x01, 0x02, 0x03]),
            },
            origin: now,
        }),
        encode(PipeMsg::Data {
            room: "room".into(),
            from: "PA_1".into(),
            channel: "chat",
            is_text: true,
            framed: Bytes::from_static(b"{\"from\":\"PA_1\"}\nhi"),
            to: plaza::sfu::timeline::Audience::Only(vec!["PA_2".into()]),
            origin: now,
        }),
        encode(PipeMsg::Needed {
            relay: 3,
            subscribed: true,
            layers: 5,
        }),
    ];
    // Frames (see `src/cluster/link.rs`): ACK, CONTROL, MEDIA, PING.
    let control = |seq: u64, more: bool, m: &[u8]| {
        let mut f = vec![2];
        f.extend_from_slice(&seq.to_be_bytes());
        f.push(u8::from(more));
        f.extend_from_slice(&(m.len() as u16).to_be_bytes());
        f.extend_from_slice(m);
        f
    };
    let media = |seq: u64, m: &[u8]| {
        let mut f = vec![3];
        f.extend_from_slice(&seq.to_be_bytes());
        f.extend_from_slice(&(m.len() as u16).to_be_bytes());
        f.extend_from_slice(m);
        f
    };
    let mut seeds: Vec<Vec<u8>> = msgs.to_vec();
    seeds.push([vec![1], 5u64.to_be_bytes().to_vec(), vec![4]].concat());
    for (i, m) in msgs.iter().enumerate() {
        seeds.push(control(i as u64, false, m));
        seeds.push(media(i as u64, m));
        let half = m.len() / 2;
        seeds.push([control(0, true, &m[..half]), control(1, false, &m[half..])].concat());
    }
    let spec = Spec {
        name: "link",
        seeds,
        dict: vec![
            b"\"Hello\"".to_vec(),
            b"\"Tick\"".to_vec(),
            b"\"event\":\"track_muted\"".to_vec(),
            b"\"channel\":\"input\"".to_vec(),
            vec![0xff; 8],
            vec![0, 0, 0, 0, 0, 0, 0, 0],
            vec![2, 0, 0, 0, 0, 0, 0, 0, 0, 1],
        ],
        default_inputs: 30_000,
        max_len: 1400,
    };
    let key = [7; 32];
    let mut sealer = Sealer::new(1, &key, 42);
    let mut link = Link::new(LinkConfig::new(2, [8; 32], 43));
    let from = SocketAddr::from(([127, 0, 0, 1], 9));
    link.set_peer(1, from, key);
    let (mut n, mut decoded, mut delivered) = (0u64, 0u64, 0u64);
    let mut t = now;
    engine::run(spec, |data| {
        n += 1;
        if let Ok(m) = codec::decode(data, now) {
            decoded += 1;
            let mut again = Vec::new();
            codec::encode(&m, &mut again).expect("what decodes encodes");
            codec::decode(&again, now).expect("and decodes again");
        }
        let mut d = Vec::new();
        sealer.seal(data, &mut d).expect("seals");
        t += Duration::from_millis(1);
        link.handle_datagram(from, &d, t);
        link.handle_timeout(t);
        while link.poll_transmit(t).is_some() {}
        while let Some(e) = link.poll_event() {
            delivered += u64::from(matches!(e, LinkEvent::Message { .. }));
        }
    });
    let s = link.stats();
    assert_eq!(s.auth_failed + s.replayed + s.unknown_sender, 0);
    assert!(decoded > n / 50, "{decoded} of {n} decoded");
    assert!(delivered > n / 50, "{delivered} of {n} delivered");
}

/// The whole core, sans-I/O: joins, arbitrary client messages, datagrams from arbitrary
/// addresses, timeouts and turns (see `tests/integration/fuzz/core.rs`).
#[test]
fn fuzz_core() {
    self::core::run();
}

/// Real connected sessions (three `rtc` clients, media and data flowing) driven by the input
/// (see `tests/integration/fuzz/session.rs`).
#[test]
fn fuzz_session() {
    session::run();
}

/// Found by `fuzz_srtp`: `rtc`'s AES-CM/HMAC-SHA1 SRTCP unprotect returns a packet whose E
/// flag is clear without checking its authentication tag, so anyone who can send from a
/// peer's address could forge its RTCP (NACK storms, REMB, PLI). Both fast paths refuse such
/// packets, in both profiles, while the same packet with the flag set is accepted.
#[test]
fn srtcp_without_the_e_flag_is_refused() {
    let t0 = Instant::now();
    for profile in PROFILES {
        let (keys, mut tx, _) = keyed(profile);
        let mut e = Egress::new(&keys).expect("egress");
        let mut i = Ingress::new(&keys, None, 1).expect("ingress");
        let trailer = 4 + profile.rtcp_auth_tag_len();
        for compound in seeds::rtcp_compounds(0xabc) {
            let sealed = tx.encrypt_rtcp(&compound).expect("encrypt").to_vec();
            let flag = sealed.len() - trailer;
            assert!(egress::srtcp_encrypted(&sealed, profile));
            let mut forged = sealed.clone();
            forged[flag] &= 0x7f;
            assert!(!egress::srtcp_encrypted(&forged, profile));
            assert!(
                e.on_rtcp(t0, &forged).is_err(),
                "{profile:?}: egress took it"
            );
            assert!(
                i.on_rtcp(t0, &forged).is_err(),
                "{profile:?}: ingress took it"
            );
            // And a forgery from scratch: any bytes, the flag clear, a made-up tag.
            let mut made_up = compound.clone();
            made_up.extend_from_slice(&[0, 0, 0, 9]);
            made_up.extend(std::iter::repeat_n(0x5a, trailer - 4));
            if trailer > 4 {
                assert!(
                    e.on_rtcp(t0, &made_up).is_err(),
                    "{profile:?}: egress took it"
                );
                assert!(
                    i.on_rtcp(t0, &made_up).is_err(),
                    "{profile:?}: ingress took it"
                );
            }
            assert!(
                e.on_rtcp(t0, &sealed).is_ok(),
                "{profile:?}: the real one is refused"
            );
        }
        assert!(i.stats().rtcp_rejected > 0);
    }
}
