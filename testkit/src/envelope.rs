//! The data-channel envelope Plaza uses on `chat` and `input`.
//!
//! Client → server: a one-line JSON header, `\n`, then the payload. `{}` (or an empty header line)
//! broadcasts to the room; `{"to":["PA_x"]}` addresses named participants.
//! Server → client: `{"from":"PA_sender"}\n` + payload, payload bytes untouched, text/binary type
//! preserved.

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

fn header_line(to: Option<&[String]>) -> String {
    let mut header = Map::new();
    if let Some(to) = to {
        header.insert(
            "to".to_owned(),
            Value::Array(to.iter().cloned().map(Value::String).collect()),
        );
    }
    Value::Object(header).to_string()
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
    fn rejects_malformed() {
        assert!(decode(Bytes::from_static(b"no newline")).is_err());
        assert!(decode(Bytes::from_static(b"[1]\nx")).is_err());
        assert!(decode(Bytes::from_static(b"{bad\nx")).is_err());
    }
}
