//! Real inputs to start the mutations from: offers and answers made by `rtc` peers, STUN
//! binding requests with integrity and fingerprint, RTCP compounds as the server's own feedback
//! generators and a browser write them, VP8 frames from the clips in `assets/`, signaling
//! messages as the JS client sends them, and the files under `tests/integration/fuzz/seeds/<target>/`
//! (browser SDP).

use super::engine::files;
use bytes::Bytes;
use plaza::sfu::ingress::{NackConfig, NackGenerator, ReceptionStats, TwccRecorder};
use plaza::sim::MediaSpec;
use plaza::sim::peer::Peer;
use rtc::rtcp;
use rtc::rtcp::goodbye::Goodbye;
use rtc::rtcp::payload_feedbacks::full_intra_request::{FirEntry, FullIntraRequest};
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtcp::source_description::{
    SdesType, SourceDescription, SourceDescriptionChunk, SourceDescriptionItem,
};
use rtc::rtp;
use rtc::shared::marshal::Marshal;
use rtc::stun::attributes::{
    ATTR_ICE_CONTROLLED, ATTR_ICE_CONTROLLING, ATTR_PRIORITY, ATTR_USE_CANDIDATE, ATTR_USERNAME,
};
use rtc::stun::fingerprint::FINGERPRINT;
use rtc::stun::integrity::MessageIntegrity;
use rtc::stun::message::{BINDING_REQUEST, BINDING_SUCCESS, Message, Setter, TransactionId};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Offers from `rtc` peers (audio + video, simulcast, receive-only with a data channel) and
/// the browser offers kept as files.
pub fn sdp_offers() -> Vec<String> {
    let now = Instant::now();
    let addr: SocketAddr = "10.0.0.1:5000".parse().expect("addr");
    let mut out = Vec::new();
    for (i, media) in [
        MediaSpec::audio_video(),
        MediaSpec::simulcast(),
        MediaSpec::none(),
    ]
    .iter()
    .enumerate()
    {
        let mut p = Peer::new("seed", now, addr, i as u64 + 1, media).expect("peer");
        if media.video.is_empty() {
            p.create_data_channel("chat", rtc::data_channel::RTCDataChannelInit::default())
                .expect("data channel");
        }
        out.push(p.create_offer(now).expect("offer"));
    }
    for f in files("seeds", "sdp") {
        out.push(String::from_utf8(f).expect("seed SDP is UTF-8"));
    }
    out
}

/// Answers of a receive-only `rtc` peer to the offers of [`sdp_offers`] made by `rtc` peers.
pub fn sdp_answers(offers: &[String]) -> Vec<String> {
    let now = Instant::now();
    let addr: SocketAddr = "10.0.0.2:5000".parse().expect("addr");
    offers
        .iter()
        .enumerate()
        .filter_map(|(i, o)| {
            let mut p =
                Peer::new("answerer", now, addr, 100 + i as u64, &MediaSpec::none()).expect("peer");
            p.answer(now, o).ok()
        })
        .collect()
}

/// SDP lines and fragments the mutations insert.
pub fn sdp_dict() -> Vec<Vec<u8>> {
    [
        "\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n",
        "\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n",
        "\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n",
        "\r\na=mid:",
        "\r\na=rid:f send\r\n",
        "\r\na=rid:h send\r\n",
        "\r\na=simulcast:send f;h;q\r\n",
        "\r\na=ssrc:1 cname:x\r\n",
        "\r\na=ssrc-group:FID 1 2\r\n",
        "\r\na=sendonly\r\n",
        "\r\na=recvonly\r\n",
        "\r\na=inactive\r\n",
        "\r\na=bundle-only\r\n",
        "\r\na=group:BUNDLE 0 1 2\r\n",
        "\r\na=fingerprint:sha-256 AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89:AB:CD:EF:01:23:45:67:89\r\n",
        "\r\na=fingerprint:sha-1 00\r\n",
        "\r\na=setup:active\r\n",
        "\r\na=setup:actpass\r\n",
        "\r\na=ice-ufrag:abcd\r\n",
        "\r\na=ice-pwd:0123456789012345678901\r\n",
        "\r\na=candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host\r\n",
        "\r\na=candidate:2 1 udp 1 ::1 9 typ srflx raddr 0.0.0.0 rport 0\r\n",
        "\r\na=extmap:3 http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01\r\n",
        "\r\na=extmap:4 urn:ietf:params:rtp-hdrext:sdes:rtp-stream-id\r\n",
        "\r\na=extmap:15/sendonly urn:ietf:params:rtp-hdrext:sdes:mid\r\n",
        "\r\na=rtpmap:96 VP8/90000\r\n",
        "\r\na=rtpmap:102 H264/90000\r\n",
        "\r\na=rtpmap:111 opus/48000/2\r\n",
        "\r\na=fmtp:102 profile-level-id=42e01f;packetization-mode=1\r\n",
        "\r\na=rtcp-fb:96 nack pli\r\n",
        "\r\na=sctp-port:5000\r\n",
        "\r\na=max-message-size:262144\r\n",
        "\r\na=msid:stream track\r\n",
        "\r\nc=IN IP4 0.0.0.0\r\n",
        "\r\nc=IN IP6 ::\r\n",
        "\r\nb=AS:30\r\n",
        " 0 ",
        " 4294967296 ",
        " 65536 ",
        ":",
        "/",
        "\r\n",
        "\n",
        "\r",
        "=",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

/// Signaling messages as the JS client and the load tester send them.
pub fn signal_messages(offer: &str) -> Vec<String> {
    let sdp = serde_json::to_string(offer).expect("json");
    vec![
        r#"{"type":"join","room":"demo","name":"alice"}"#.to_owned(),
        r#"{"type":"join","room":"demo","name":"bob","token":"eyJhbGciOiJIUzI1NiJ9.e30.sig","protocol":1,"auto_subscribe":false}"#.to_owned(),
        format!(r#"{{"type":"publish_offer","sdp":{sdp}}}"#),
        format!(r#"{{"type":"subscribe_answer","sdp":{sdp}}}"#),
        r#"{"type":"trickle","target":"publisher","candidate":{"candidate":"candidate:1 1 udp 2130706431 127.0.0.1 5000 typ host","sdpMid":"0","sdpMLineIndex":0,"usernameFragment":"abcd"}}"#.to_owned(),
        r#"{"type":"trickle","target":"subscriber","candidate":{"candidate":""}}"#.to_owned(),
        r#"{"type":"subscribe","track_ids":["TR_abc","TR_def"],"subscribe":true}"#.to_owned(),
        r#"{"type":"subscribe","track_ids":[],"subscribe":false}"#.to_owned(),
        r#"{"type":"mute","track_id":"TR_abc","muted":true}"#.to_owned(),
        r#"{"type":"track_settings","track_id":"TR_abc","quality":"low","width":640,"height":360}"#.to_owned(),
        r#"{"type":"track_settings","track_id":"TR_abc","quality":null}"#.to_owned(),
        r#"{"type":"remove_participant","participant_id":"PA_abc","reason":"spam"}"#.to_owned(),
        r#"{"type":"mute_chat","participant_id":"PA_abc","muted":true}"#.to_owned(),
        r#"{"type":"ping","ts":1712345678901.25}"#.to_owned(),
        r#"{"type":"ping"}"#.to_owned(),
        r#"{"type":"leave"}"#.to_owned(),
    ]
}

/// JSON tokens the mutations insert.
pub fn json_dict() -> Vec<Vec<u8>> {
    [
        "{",
        "}",
        "[",
        "]",
        ",",
        ":",
        "\"",
        "null",
        "true",
        "false",
        "0",
        "-1",
        "1e308",
        "-1e309",
        "18446744073709551616",
        "4294967296",
        "65536",
        "1.5",
        "\"\"",
        "\"\\u0000\"",
        "\"\\ud800\"",
        "\\",
        "\"type\"",
        "\"join\"",
        "\"publish_offer\"",
        "\"subscribe_answer\"",
        "\"trickle\"",
        "\"subscribe\"",
        "\"mute\"",
        "\"track_settings\"",
        "\"remove_participant\"",
        "\"mute_chat\"",
        "\"participant_id\"",
        "\"reason\"",
        "\"ping\"",
        "\"leave\"",
        "\"room\"",
        "\"name\"",
        "\"token\"",
        "\"protocol\"",
        "\"auto_subscribe\"",
        "\"sdp\"",
        "\"target\"",
        "\"publisher\"",
        "\"subscriber\"",
        "\"candidate\"",
        "\"sdpMid\"",
        "\"sdpMLineIndex\"",
        "\"usernameFragment\"",
        "\"track_ids\"",
        "\"track_id\"",
        "\"muted\"",
        "\"quality\"",
        "\"low\"",
        "\"medium\"",
        "\"high\"",
        "\"width\"",
        "\"height\"",
        "\"ts\"",
        "\"to\"",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

/// Data-channel messages as clients send them on `chat` / `input`.
pub fn data_messages() -> Vec<Vec<u8>> {
    [
        &b"\nhello everyone"[..],
        b"{}\nbroadcast",
        b"{\"to\":null}\nbroadcast",
        b"{\"to\":[]}\n",
        b"{\"to\":[\"PA_abc\"]}\nfor one",
        b"{\"to\":[\"PA_abc\",\"PA_def\",\"PA_abc\"]}\n{\"x\":1,\"y\":2}",
        b"  {\"to\":[\"PA_abc\"], \"extra\": {\"nested\": [1,2,3]}}  \n\x00\x01\x02binary",
    ]
    .iter()
    .map(|s| s.to_vec())
    .collect()
}

/// A STUN Binding request as an ICE agent sends it: USERNAME, PRIORITY, ICE-CONTROLLING or
/// -CONTROLLED, USE-CANDIDATE when nominating, MESSAGE-INTEGRITY under `pwd`, FINGERPRINT.
pub fn binding_request(
    user: &str,
    pwd: &str,
    txid: u8,
    nominate: bool,
    controlling: bool,
) -> Vec<u8> {
    let crypto = rtc::crypto::default_provider().expect("provider");
    let mut m = Message::new();
    m.set_type(BINDING_REQUEST);
    m.transaction_id = TransactionId([txid; 12]);
    m.write_header();
    m.add(ATTR_USERNAME, user.as_bytes());
    m.add(ATTR_PRIORITY, &0x6e7f_1eff_u32.to_be_bytes());
    let tie = 0x0102_0304_0506_0708_u64.to_be_bytes();
    m.add(
        if controlling {
            ATTR_ICE_CONTROLLING
        } else {
            ATTR_ICE_CONTROLLED
        },
        &tie,
    );
    if nominate {
        m.add(ATTR_USE_CANDIDATE, &[]);
    }
    MessageIntegrity::new_short_term_integrity_with_provider(pwd.to_owned(), crypto.crypto())
        .add_to(&mut m)
        .expect("integrity");
    FINGERPRINT.add_to(&mut m).expect("fingerprint");
    m.raw.clone()
}

/// A STUN Binding success response with XOR-MAPPED-ADDRESS, integrity and fingerprint.
pub fn binding_success(pwd: &str, txid: u8) -> Vec<u8> {
    let crypto = rtc::crypto::default_provider().expect("provider");
    let mut m = Message::new();
    m.set_type(BINDING_SUCCESS);
    m.transaction_id = TransactionId([txid; 12]);
    m.write_header();
    // XOR-MAPPED-ADDRESS 10.0.0.1:5000
    m.add(
        rtc::stun::attributes::ATTR_XORMAPPED_ADDRESS,
        &[
            0,
            1,
            0x13 ^ 0x21,
            0x88 ^ 0x12,
            10 ^ 0x21,
            0x12,
            0xa4,
            0x42 ^ 1,
        ],
    );
    MessageIntegrity::new_short_term_integrity_with_provider(pwd.to_owned(), crypto.crypto())
        .add_to(&mut m)
        .expect("integrity");
    FINGERPRINT.add_to(&mut m).expect("fingerprint");
    m.raw.clone()
}

/// The first bytes of a DTLS 1.2 ClientHello record (content type 22, version 1.2).
pub fn dtls_client_hello() -> Vec<u8> {
    let mut v = vec![0x16, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x40];
    v.extend_from_slice(&[0x01, 0, 0, 0x34, 0, 0, 0, 0, 0, 0, 0, 0x34, 0xfe, 0xfd]);
    v.extend((0..40u8).map(|i| i.wrapping_mul(37)));
    v
}

/// One RTP packet, marshalled (`twcc`: the transport-wide sequence number extension).
pub fn rtp_packet(
    ssrc: u32,
    seq: u16,
    ts: u32,
    pt: u8,
    payload: &[u8],
    twcc: Option<(u8, u16)>,
) -> Vec<u8> {
    let mut h = rtp::Header {
        version: 2,
        payload_type: pt,
        ssrc,
        sequence_number: seq,
        timestamp: ts,
        marker: seq % 3 == 0,
        ..Default::default()
    };
    if let Some((id, n)) = twcc {
        h.set_extension(id, Bytes::copy_from_slice(&n.to_be_bytes()))
            .expect("extension");
    }
    rtp::Packet {
        header: h,
        payload: Bytes::copy_from_slice(payload),
    }
    .marshal()
    .expect("marshal")
    .to_vec()
}

/// The frames of an IVF clip of `assets/`.
fn ivf_frames(name: &str, max: usize) -> Vec<Vec<u8>> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets")
        .join(name);
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut at = usize::from(u16::from_le_bytes([data[6], data[7]]));
    let mut out = Vec::new();
    while at + 12 <= data.len() && out.len() < max {
        let size =
            u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize;
        let Some(frame) = data.get(at + 12..at + 12 + size) else {
            break;
        };
        out.push(frame.to_vec());
        at += 12 + size;
    }
    out
}

/// VP8 RTP payloads: real frames (a keyframe and delta frames) behind every shape of payload
/// descriptor (none of the optional fields, 7- and 15-bit PictureID, TL0PICIDX, TID/Y/KEYIDX,
/// continuation packets).
pub fn vp8_payloads() -> Vec<Vec<u8>> {
    let frames = ivf_frames("video_320x240_vp8.ivf", 4);
    assert!(!frames.is_empty(), "no frames in the VP8 clip");
    let descriptors: [&[u8]; 6] = [
        &[0x10],
        &[0x90, 0x80, 0x05],
        &[0x90, 0x80, 0x81, 0x23],
        &[0x90, 0xe0, 0x81, 0x23, 0x07, 0x60],
        &[0x90, 0xf0, 0x81, 0x23, 0x07, 0xa5],
        &[0x80, 0x20, 0x40],
    ];
    let mut out = Vec::new();
    for (i, d) in descriptors.iter().enumerate() {
        let f = &frames[i % frames.len()];
        let mut p = d.to_vec();
        p.extend_from_slice(&f[..f.len().min(96)]);
        out.push(p);
    }
    out
}

/// H.264 RTP payloads: single NALs (IDR, SPS, non-IDR), STAP-A, FU-A start and middle.
pub fn h264_payloads() -> Vec<Vec<u8>> {
    vec![
        vec![0x65, 0x88, 0x84, 0x00, 0x33],
        vec![0x67, 0x42, 0xc0, 0x1f, 0xda, 0x01, 0x40],
        vec![0x41, 0x9a, 0x02, 0x04],
        vec![
            0x78, 0x00, 0x07, 0x67, 0x42, 0xc0, 0x1f, 0xda, 0x01, 0x40, 0x00, 0x04, 0x68, 0xce,
            0x3c, 0x80,
        ],
        vec![0x7c, 0x85, 0x88, 0x84, 0x00],
        vec![0x7c, 0x05, 0x11, 0x22],
    ]
}

/// RTCP compounds as receivers send them: receiver report + SDES + NACK (from the server's
/// own NACK generator), PLI, FIR, REMB, transport-cc feedback (from the server's own TWCC
/// recorder: runs, vectors, large deltas), sender report, BYE.
pub fn rtcp_compounds(media_ssrc: u32) -> Vec<Vec<u8>> {
    let t0 = Instant::now();
    let sender = 0x1111_2222;
    let mut reception = ReceptionStats::new(90_000);
    let mut nack = NackGenerator::new(NackConfig::default());
    nack.track(media_ssrc);
    let mut twcc = TwccRecorder::new();
    for (i, seq) in (100u16..160).filter(|s| s % 7 != 3).enumerate() {
        let at = t0
            + Duration::from_micros(
                i as u64 * 2_500 + u64::from(seq % 5) * 300_000 * u64::from(seq == 150),
            );
        reception.on_packet(at, seq, u32::from(seq) * 3000);
        nack.on_packet(media_ssrc, seq);
        twcc.record(seq, at);
    }
    let later = t0 + Duration::from_millis(500);
    let rr = ReceiverReport {
        ssrc: sender,
        reports: vec![reception.report(later, media_ssrc)],
        profile_extensions: Bytes::new(),
    };
    let sdes = SourceDescription {
        chunks: vec![SourceDescriptionChunk {
            source: sender,
            items: vec![SourceDescriptionItem {
                sdes_type: SdesType::SdesCname,
                text: Bytes::from_static(b"{9c00-cname}"),
            }],
        }],
    };
    let pli = PictureLossIndication {
        sender_ssrc: sender,
        media_ssrc,
    };
    let fir = FullIntraRequest {
        sender_ssrc: sender,
        media_ssrc: 0,
        fir: vec![FirEntry {
            ssrc: media_ssrc,
            sequence_number: 3,
        }],
    };
    let remb = ReceiverEstimatedMaximumBitrate {
        sender_ssrc: sender,
        bitrate: 1_500_000.0,
        ssrcs: vec![media_ssrc],
    };
    let sr = SenderReport {
        ssrc: media_ssrc,
        ntp_time: 0xe8f0_0000_8000_0000,
        rtp_time: 123_456,
        packet_count: 60,
        octet_count: 60_000,
        ..Default::default()
    };
    let bye = Goodbye {
        sources: vec![media_ssrc],
        reason: Bytes::from_static(b"bye"),
    };
    let mut compounds: Vec<Vec<Box<dyn rtcp::Packet>>> = vec![
        vec![Box::new(rr.clone()), Box::new(sdes.clone())],
        vec![Box::new(rr.clone()), Box::new(pli), Box::new(fir)],
        vec![Box::new(rr.clone()), Box::new(remb)],
        vec![Box::new(sr), Box::new(sdes)],
        vec![Box::new(rr.clone()), Box::new(bye)],
    ];
    let nacks: Vec<Box<dyn rtcp::Packet>> = nack
        .generate(later, sender)
        .into_iter()
        .map(|n| Box::new(n) as Box<dyn rtcp::Packet>)
        .collect();
    assert!(!nacks.is_empty(), "the NACK generator asked for nothing");
    compounds.push(
        std::iter::once(Box::new(rr.clone()) as Box<dyn rtcp::Packet>)
            .chain(nacks)
            .collect(),
    );
    let ccs: Vec<Box<dyn rtcp::Packet>> = twcc
        .feedback(sender, media_ssrc)
        .into_iter()
        .map(|c| Box::new(c) as Box<dyn rtcp::Packet>)
        .collect();
    assert!(!ccs.is_empty(), "the TWCC recorder reported nothing");
    compounds.push(ccs);
    let mut out: Vec<Vec<u8>> = compounds
        .iter()
        .map(|c| rtcp::packet::marshal(c).expect("marshal").to_vec())
        .collect();
    // The NACKs alone too (a receiver may send feedback without a report).
    let rr_len = rtc::shared::marshal::MarshalSize::marshal_size(&rr);
    let lone = out[5][rr_len..].to_vec();
    out.push(lone);
    out
}
