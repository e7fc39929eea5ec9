//! The data-channel envelope Plaza uses on `chat` and `input`.
//!
//! Client → server: a one-line JSON header, `\n`, then the payload. `{}` (or an empty header line)
//! broadcasts to the room; `{"to":["PA_x"]}` addresses named participants.
//! Server → client: `{"from":"PA_sender","seq":12,"ts":1796533329123456}\n` + payload, payload
//! bytes untouched, text/binary type preserved. The room timeline's header fields (`seq`, `ts`,
//! the sender's `sseq`, acknowledgements, input ticks) are read by [`Envelope::stamp`] /
//! [`Stamp::from_header`]; a client's `sseq` and `"ack":true` are written by
//! [`encode_timeline`] / [`encode_text_timeline`].

use bytes::Bytes;
use serde_json::{Map, Value};

/// Encodes a client → server envelope: header line, `\n`, payload.
pub fn encode(to: Option<&[String]>, payload: &[u8]) -> Vec<u8> {
    let header = header_line(to);
    let mut out = Vec::with_capacity(header.len() + 1 + payload.len());
    out.extend_from_slice(header.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(payload);
    out
}

/// Encodes a client → server envelope for a text message.
pub fn encode_text(to: Option<&[String]>, text: &str) -> String {
    let mut out = header_line(to);
    out.push('\n');
    out.push_str(text);
    out
}

/// Encodes a client → server envelope with the room timeline's header fields: the sender's
/// `sseq` for this message and, if `ack`, `"ack":true` (the server acknowledges it once
/// sequenced).
pub fn encode_timeline(to: Option<&[String]>, sseq: u64, ack: bool, payload: &[u8]) -> Vec<u8> {
    let header = timeline_header_line(to, sseq, ack);
    let mut out = Vec::with_capacity(header.len() + 1 + payload.len());
    out.extend_from_slice(header.as_bytes());
    out.push(b'\n');
    out.extend_from_slice(payload);
    out
}

/// [`encode_timeline`] for a text message.
pub fn encode_text_timeline(to: Option<&[String]>, sseq: u64, ack: bool, text: &str) -> String {
    let mut out = timeline_header_line(to, sseq, ack);
    out.push('\n');
    out.push_str(text);
    out
}

fn header_map(to: Option<&[String]>) -> Map<String, Value> {
    let mut header = Map::new();
    if let Some(to) = to {
        header.insert(
            "to".to_owned(),
            Value::Array(to.iter().cloned().map(Value::String).collect()),
        );
    }
    header
}

fn header_line(to: Option<&[String]>) -> String {
    Value::Object(header_map(to)).to_string()
}

fn timeline_header_line(to: Option<&[String]>, sseq: u64, ack: bool) -> String {
    let mut header = header_map(to);
    header.insert("sseq".to_owned(), Value::from(sseq));
    if ack {
        header.insert("ack".to_owned(), Value::Bool(true));
    }
    Value::Object(header).to_string()
}

/// The room timeline's fields of a server → client header (each `None` when absent or not a
/// non-negative integer).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stamp {
    /// The message's number on its channel's room timeline.
    pub seq: Option<u64>,
    /// The server's clock when it took the message, µs since the Unix epoch.
    pub ts: Option<u64>,
    /// The sender's own `sseq`, echoed.
    pub sseq: Option<u64>,
    /// An acknowledgement: the `sseq` it acknowledges.
    pub ack: Option<u64>,
    /// The acknowledged message was a duplicate (`"dup":true`).
    pub dup: bool,
    /// An input tick batch: its tick number.
    pub tick: Option<u64>,
    /// Replayed from history (`"replay":true`).
    pub replay: bool,
}

impl Stamp {
    pub fn from_header(header: &Map<String, Value>) -> Stamp {
        let num = |k: &str| header.get(k).and_then(Value::as_u64);
        let flag = |k: &str| header.get(k).and_then(Value::as_bool) == Some(true);
        Stamp {
            seq: num("seq"),
            ts: num("ts"),
            sseq: num("sseq"),
            ack: num("ack"),
            dup: flag("dup"),
            tick: num("tick"),
            replay: flag("replay"),
        }
    }
}

/// A decoded server → client envelope.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// The header object (`{"from": ...}` and whatever else the server adds).
    pub header: Map<String, Value>,
    /// The payload after the first `\n`.
    pub payload: Bytes,
}

impl Envelope {
    /// The sender's participant id, from the header's `from`.
    pub fn from(&self) -> Option<&str> {
        self.header.get("from").and_then(Value::as_str)
    }

    /// The room timeline's fields of the header (`seq`, `ts`, `sseq`, acks, ticks).
    pub fn stamp(&self) -> Stamp {
        Stamp::from_header(&self.header)
    }

    /// The message's `seq` on its channel's room timeline.
    pub fn seq(&self) -> Option<u64> {
        self.header.get("seq").and_then(Value::as_u64)
    }

    /// The server's time when it took the message (µs since the Unix epoch).
    pub fn ts(&self) -> Option<u64> {
        self.header.get("ts").and_then(Value::as_u64)
    }

    /// The sender's `sseq`, echoed by the server.
    pub fn sseq(&self) -> Option<u64> {
        self.header.get("sseq").and_then(Value::as_u64)
    }
}

/// Splits `data` at the first `\n` and parses the header. An empty header line is an empty
/// object. Errors describe what was wrong; they never panic.
pub fn decode(data: Bytes) -> Result<Envelope, String> {
    let Some(nl) = data.iter().position(|&b| b == b'\n') else {
        return Err("no header line (no \\n in message)".to_owned());
    };
    let header_bytes = &data[..nl];
    let header = if header_bytes.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        match serde_json::from_slice::<Value>(header_bytes) {
            Ok(Value::Object(map)) => map,
            Ok(other) => return Err(format!("header is not a JSON object: {other}")),
            Err(e) => return Err(format!("header is not JSON: {e}")),
        }
    };
    Ok(Envelope {
        header,
        payload: data.slice(nl + 1..),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_broadcast_and_addressed() {
        assert_eq!(encode(None, b"hi"), b"{}\nhi".to_vec());
        let to = vec!["PA_a".to_owned(), "PA_b".to_owned()];
        assert_eq!(
            encode_text(Some(&to), "x"),
            "{\"to\":[\"PA_a\",\"PA_b\"]}\nx"
        );
    }

    #[test]
    fn decodes_from_and_keeps_payload_bytes() {
        let raw = Bytes::from_static(b"{\"from\":\"PA_1\"}\n\x00\n\xffrest");
        let env = decode(raw).unwrap();
        assert_eq!(env.from(), Some("PA_1"));
        assert_eq!(&env.payload[..], b"\x00\n\xffrest");
        let env = decode(Bytes::from_static(b"\npayload")).unwrap();
        assert!(env.header.is_empty());
        assert_eq!(&env.payload[..], b"payload");
    }

    #[test]
    fn encodes_timeline_fields() {
        assert_eq!(
            encode_timeline(None, 7, false, b"x"),
            b"{\"sseq\":7}\nx".to_vec()
        );
        let to = vec!["PA_b".to_owned()];
        let text = encode_text_timeline(Some(&to), 1 << 40, true, "hi");
        let env = decode(Bytes::from(text)).unwrap();
        assert_eq!(env.header["to"], serde_json::json!(["PA_b"]));
        assert_eq!(env.header["sseq"], 1u64 << 40);
        assert_eq!(env.header["ack"], true);
        assert_eq!(&env.payload[..], b"hi");
    }

    #[test]
    fn decodes_timeline_stamp() {
        let raw = Bytes::from_static(
            b"{\"from\":\"PA_1\",\"seq\":12,\"ts\":1796533329123456,\"sseq\":3}\npayload",
        );
        let env = decode(raw).unwrap();
        assert_eq!(
            (env.from(), env.seq(), env.ts(), env.sseq()),
            (Some("PA_1"), Some(12), Some(1_796_533_329_123_456), Some(3))
        );
        let s = env.stamp();
        assert_eq!(
            (s.seq, s.ts, s.sseq),
            (Some(12), Some(1_796_533_329_123_456), Some(3))
        );
        assert_eq!((s.ack, s.dup, s.tick, s.replay), (None, false, None, false));
        // An acknowledgement of a duplicate, a replayed message, a tick batch.
        let ack = decode(Bytes::from_static(
            b"{\"ack\":5,\"dup\":true,\"seq\":9,\"ts\":1}\n",
        ))
        .unwrap()
        .stamp();
        assert_eq!(
            (ack.ack, ack.dup, ack.seq, ack.sseq),
            (Some(5), true, Some(9), None)
        );
        let replay = decode(Bytes::from_static(
            b"{\"from\":\"PA_1\",\"seq\":2,\"replay\":true}\n",
        ))
        .unwrap()
        .stamp();
        assert!(replay.replay);
        let tick = decode(Bytes::from_static(
            b"{\"from\":\"server\",\"tick\":40,\"ts\":2,\"count\":0}\n",
        ))
        .unwrap()
        .stamp();
        assert_eq!((tick.tick, tick.seq), (Some(40), None));
        // The old header (no timeline fields), and fields of the wrong type, read as absent.
        let old = decode(Bytes::from_static(b"{\"from\":\"PA_1\"}\nx")).unwrap();
        assert_eq!(old.stamp(), Stamp::default());
        let bad = decode(Bytes::from_static(
            b"{\"seq\":\"1\",\"ts\":-5,\"sseq\":1.5}\nx",
        ))
        .unwrap();
        assert_eq!(bad.stamp(), Stamp::default());
    }

    #[test]
    fn rejects_malformed() {
        assert!(decode(Bytes::from_static(b"no newline")).is_err());
        assert!(decode(Bytes::from_static(b"[1]\nx")).is_err());
        assert!(decode(Bytes::from_static(b"{bad\nx")).is_err());
    }
}
