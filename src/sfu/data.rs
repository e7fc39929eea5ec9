//! Data-channel relay: the message envelope, its limits, and a per-participant rate limiter.
//!
//! # Channels
//!
//! The server creates two data channels on every participant's **subscriber** peer
//! connection (the one the server offers):
//!
//! | label   | delivery                                   |
//! |---------|--------------------------------------------|
//! | `chat`  | reliable, ordered                          |
//! | `input` | unordered, unreliable (`maxRetransmits: 0`) |
//!
//! A message a client sends on one of them is relayed to its recipients on the channel with
//! the same label.
//!
//! # Wire format
//!
//! **Client → server.** A message is `HEADER "\n" PAYLOAD`:
//!
//! * `HEADER` is a JSON object on one line (it cannot contain a newline), or nothing at all:
//!   a message that starts with `"\n"` has an empty header, which means the same as `{}`.
//!   Whitespace around the object is allowed.
//! * Recognised header field: `"to": ["PA_x", ...]`, the participant ids of the recipients.
//!   Absent, `null` or `[]` means everyone else in the room. At most 64 ids; repeated ids
//!   count once. Unknown fields are ignored (in particular a client cannot set `from`).
//! * `PAYLOAD` is everything after the first `"\n"`, passed through byte for byte (it may be
//!   empty and may contain further newlines).
//! * The same framing applies to text (string) and binary messages; the relayed message
//!   keeps the sender's type.
//!
//! * Optional room-timeline fields: `"sseq"` (the sender's own sequence number, an integer
//!   below 2^53, growing per channel; retries with an `sseq` already taken are dropped) and
//!   `"ack": true` (needs `sseq`: the server acknowledges the message on the same channel).
//!
//! **Server → client.** A one-line JSON header, a newline, and the payload exactly as the
//! sender sent it. The header carries the sender's participant id (`from`), the message's
//! place on the room's timeline (`seq`), the server's clock when it took it (`ts`, µs since
//! the Unix epoch) and the sender's `sseq` if it gave one; it is built by
//! [`super::timeline::frame`], which also frames acknowledgements and input tick batches.
//!
//! Examples (text messages):
//!
//! ```text
//! client sends:   \nhello everyone
//! others receive: {"from":"PA_a","seq":7,"ts":1796533329123456}\nhello everyone
//! ```
//!
//! A message the server itself sends (a room admin's, through the admin API) has
//! `{"from":"server",…}`.
//!
//! **Errors** (reported to the sender; the message is not relayed), see [`DataError::code`]:
//!
//! | code                  | cause                                                          |
//! |-----------------------|----------------------------------------------------------------|
//! | `missing_header`      | the message contains no `"\n"`                                 |
//! | `bad_header`          | the header is not a JSON object, or `to` is not a list of strings |
//! | `header_too_large`    | the header is longer than 8192 bytes                           |
//! | `too_many_recipients` | `to` lists more than 64 ids                                    |
//! | `too_large`           | the payload is larger than the server's limit                  |
//! | `rate_limited`        | the sender exceeded its message or byte rate                   |

use std::time::{Duration, Instant};

use serde::Deserialize;
use thiserror::Error;

/// The `from` of a message the server itself sends (the admin API's `send data`); no
/// participant id can be this (they all start with `PA_`).
pub const SERVER_SENDER: &str = "server";
/// Label of the reliable, ordered data channel.
pub const CHAT_LABEL: &str = "chat";
/// Label of the unordered, unreliable (`maxRetransmits: 0`) data channel.
pub const INPUT_LABEL: &str = "input";
/// Most recipients one message may name.
pub const MAX_RECIPIENTS: usize = 64;
/// Longest header accepted, in bytes (not counting the `"\n"`).
pub const MAX_HEADER_LEN: usize = 8192;
/// A sensible default payload limit (the server adds `{"from":"..."}\n` on top, so keep
/// room below the peers' SCTP max-message-size).
pub const DEFAULT_MAX_PAYLOAD: usize = 64 * 1024;

/// Why a client's data-channel message is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DataError {
    /// No `"\n"` in the message, so no header.
    #[error("message has no header line (expected HEADER \"\\n\" PAYLOAD)")]
    MissingHeader,
    /// The header is not a JSON object of the expected shape.
    #[error("header is not a valid JSON object: {0}")]
    BadHeader(String),
    /// The header line is too long.
    #[error("header is {size} bytes, the limit is {max}")]
    HeaderTooLarge {
        /// Header length in bytes.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// `to` names too many participants.
    #[error("{count} recipients, the limit is {max}")]
    TooManyRecipients {
        /// Number of distinct ids in `to`.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// The payload is over the configured limit.
    #[error("payload is {size} bytes, the limit is {max}")]
    TooLarge {
        /// Payload length in bytes.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The sender exceeded its rate limit.
    #[error("rate limit exceeded, retry in {} ms", retry_after.as_millis())]
    RateLimited {
        /// When the message would have been accepted.
        retry_after: Duration,
    },
}

impl DataError {
    /// A stable machine-readable code for the error (for signaling error messages).
    pub fn code(&self) -> &'static str {
        match self {
            DataError::MissingHeader => "missing_header",
            DataError::BadHeader(_) => "bad_header",
            DataError::HeaderTooLarge { .. } => "header_too_large",
            DataError::TooManyRecipients { .. } => "too_many_recipients",
            DataError::TooLarge { .. } => "too_large",
            DataError::RateLimited { .. } => "rate_limited",
        }
    }
}

/// A parsed client message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound<'a> {
    /// Recipients (distinct, in the order given); empty means everyone else in the room.
    pub to: Vec<String>,
    /// The payload, to relay byte for byte.
    pub payload: &'a [u8],
    /// The sender's own sequence number for the message (room timeline).
    pub sseq: Option<u64>,
    /// The sender asks for an acknowledgement.
    pub ack: bool,
}

impl Inbound<'_> {
    /// Whether the message goes to everyone else in the room.
    pub fn is_broadcast(&self) -> bool {
        self.to.is_empty()
    }
}

#[derive(Deserialize)]
struct Header {
    #[serde(default)]
    to: Option<Vec<String>>,
    #[serde(default)]
    sseq: Option<u64>,
    #[serde(default)]
    ack: Option<bool>,
}

/// Largest `sseq` accepted: what a JavaScript number holds exactly.
pub const MAX_SSEQ: u64 = (1 << 53) - 1;

/// Parse a message received from a client on `chat` or `input` (text or binary alike).
/// `max_payload` is the largest payload accepted, in bytes.
pub fn parse_client(msg: &[u8], max_payload: usize) -> Result<Inbound<'_>, DataError> {
    let nl = msg
        .iter()
        .position(|&b| b == b'\n')
        .ok_or(DataError::MissingHeader)?;
    let (header, rest) = msg.split_at(nl);
    let payload = rest.get(1..).unwrap_or_default();
    if header.len() > MAX_HEADER_LEN {
        return Err(DataError::HeaderTooLarge {
            size: header.len(),
            max: MAX_HEADER_LEN,
        });
    }
    if payload.len() > max_payload {
        return Err(DataError::TooLarge {
            size: payload.len(),
            max: max_payload,
        });
    }
    let header = header.trim_ascii();
    let mut to = Vec::new();
    let (mut sseq, mut ack) = (None, false);
    if !header.is_empty() {
        if header.first() != Some(&b'{') {
            return Err(DataError::BadHeader("expected a JSON object".into()));
        }
        let h: Header =
            serde_json::from_slice(header).map_err(|e| DataError::BadHeader(e.to_string()))?;
        if h.sseq.is_some_and(|s| s > MAX_SSEQ) {
            return Err(DataError::BadHeader(format!(
                "`sseq` must be an integer from 0 to {MAX_SSEQ}"
            )));
        }
        sseq = h.sseq;
        ack = h.ack.unwrap_or(false);
        if ack && sseq.is_none() {
            return Err(DataError::BadHeader("`ack` needs an `sseq`".into()));
        }
        for id in h.to.unwrap_or_default() {
            if !to.contains(&id) {
                if to.len() == MAX_RECIPIENTS {
                    return Err(DataError::TooManyRecipients {
                        count: to.len() + 1,
                        max: MAX_RECIPIENTS,
                    });
                }
                to.push(id);
            }
        }
    }
    Ok(Inbound {
        to,
        payload,
        sseq,
        ack,
    })
}

/// Limits for one participant's data-channel traffic. A rate of 0 disables that limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Sustained messages per second.
    pub messages_per_sec: u32,
    /// Messages that may be sent at once after a quiet period (bucket size, at least 1).
    pub message_burst: u32,
    /// Sustained bytes per second.
    pub bytes_per_sec: u64,
    /// Bytes that may be sent at once after a quiet period (bucket size, at least 1).
    pub byte_burst: u64,
}

impl Default for RateLimit {
    /// 100 messages/s (bursts of 200) and 1 MiB/s (bursts of 2 MiB).
    fn default() -> Self {
        RateLimit {
            messages_per_sec: 100,
            message_burst: 200,
            bytes_per_sec: 1 << 20,
            byte_burst: 2 << 20,
        }
    }
}

/// Token buckets for messages and bytes; time is passed in, never read.
///
/// A message is accepted when a message token is available and the byte bucket holds at
/// least `min(size, byte_burst)` bytes; its full size is then taken, which may leave the byte
/// bucket negative: a message larger than the burst is not refused forever, it just has to
/// wait for a full bucket and then pays off its excess before the next one.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    limit: RateLimit,
    messages: f64,
    bytes: f64,
    /// `None` until the first message: the buckets start full.
    last: Option<Instant>,
}

impl Default for RateLimiter {
    /// A limiter with [`RateLimit::default`] limits and full buckets.
    fn default() -> Self {
        Self::new(RateLimit::default())
    }
}

impl RateLimiter {
    /// A limiter with full buckets.
    pub fn new(limit: RateLimit) -> Self {
        RateLimiter {
            limit,
            messages: f64::from(limit.message_burst.max(1)),
            bytes: limit.byte_burst.max(1) as f64,
            last: None,
        }
    }

    /// The configured limits.
    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    fn refill(&mut self, now: Instant) {
        let last = *self.last.get_or_insert(now);
        let elapsed = now.saturating_duration_since(last).as_secs_f64();
        if now > last {
            self.last = Some(now);
        }
        let mcap = f64::from(self.limit.message_burst.max(1));
        let bcap = self.limit.byte_burst.max(1) as f64;
        self.messages =
            (self.messages + elapsed * f64::from(self.limit.messages_per_sec)).min(mcap);
        self.bytes = (self.bytes + elapsed * self.limit.bytes_per_sec as f64).min(bcap);
    }

    /// Account for a message of `size` bytes at `now`: `Ok` if it may be relayed (and the
    /// tokens are taken), [`DataError::RateLimited`] otherwise (nothing is taken).
    pub fn check(&mut self, now: Instant, size: usize) -> Result<(), DataError> {
        self.refill(now);
        let mrate = f64::from(self.limit.messages_per_sec);
        let brate = self.limit.bytes_per_sec as f64;
        let need_bytes = (size as f64).min(self.limit.byte_burst.max(1) as f64);
        let msg_wait = if mrate > 0.0 && self.messages < 1.0 {
            (1.0 - self.messages) / mrate
        } else {
            0.0
        };
        let byte_wait = if brate > 0.0 && self.bytes < need_bytes {
            (need_bytes - self.bytes) / brate
        } else {
            0.0
        };
        let wait = msg_wait.max(byte_wait);
        if wait > 0.0 {
            let retry_after = if wait.is_finite() {
                Duration::from_secs_f64(wait.min(86_400.0))
            } else {
                Duration::from_secs(86_400)
            };
            return Err(DataError::RateLimited { retry_after });
        }
        if mrate > 0.0 {
            self.messages -= 1.0;
        }
        if brate > 0.0 {
            self.bytes -= size as f64;
        }
        Ok(())
    }

    /// [`check`](Self::check) as a boolean.
    pub fn allow(&mut self, now: Instant, size: usize) -> bool {
        self.check(now, size).is_ok()
    }
}

#[cfg(test)]
// Tests pick an arbitrary origin for their virtual time (and may share test state).
#[allow(clippy::disallowed_methods, clippy::disallowed_types)]
mod tests {
    use super::*;

    const MAX: usize = 1000;

    fn ok(msg: &[u8]) -> Inbound<'_> {
        parse_client(msg, MAX).unwrap()
    }

    #[test]
    fn broadcast_forms() {
        for msg in [
            &b"\nhello"[..],
            b"{}\nhello",
            b"  { }  \nhello",
            b"{}\r\nhello",
            b"{\"to\":null}\nhello",
            b"{\"to\":[]}\nhello",
            b"{\"x\":1,\"nested\":{\"a\":[1,2]}}\nhello",
        ] {
            let m = ok(msg);
            assert!(m.is_broadcast(), "{:?}", String::from_utf8_lossy(msg));
            assert_eq!(m.payload, b"hello");
        }
    }

    #[test]
    fn targeted() {
        let m = ok(b"{\"to\":[\"PA_a\",\"PA_b\",\"PA_a\"],\"ttl\":3}\nhi");
        assert_eq!(m.to, vec!["PA_a".to_owned(), "PA_b".to_owned()]);
        assert!(!m.is_broadcast());
        assert_eq!(m.payload, b"hi");
    }

    #[test]
    fn payload_is_passed_through() {
        assert_eq!(ok(b"\n").payload, b"");
        assert_eq!(ok(b"{}\n").payload, b"");
        assert_eq!(ok(b"\n\n\nx\n").payload, b"\n\nx\n");
        let bin = [b'\n', 0, 0xff, 0xfe, b'\n', 0x80];
        assert_eq!(ok(&bin).payload, &bin[1..]);
        // The header ends at the first newline, even if the payload looks like a header.
        let m = ok(b"{}\n{\"to\":[\"PA_x\"]}\nrest");
        assert!(m.is_broadcast());
        assert_eq!(m.payload, b"{\"to\":[\"PA_x\"]}\nrest");
    }

    #[test]
    fn sender_cannot_spoof_from() {
        let m = ok(b"{\"from\":\"PA_evil\"}\nx");
        assert!(m.is_broadcast());
        let framed = frame_for_receiver("PA_real", m.payload);
        assert_eq!(&framed[..], b"{\"from\":\"PA_real\",\"seq\":1,\"ts\":2}\nx");
    }

    #[test]
    fn errors() {
        assert_eq!(parse_client(b"", MAX), Err(DataError::MissingHeader));
        assert_eq!(parse_client(b"hello", MAX), Err(DataError::MissingHeader));
        assert_eq!(parse_client(b"{}", MAX), Err(DataError::MissingHeader));
        for bad in [
            &b"hello\nx"[..],
            b"[]\nx",
            b"\"s\"\nx",
            b"1\nx",
            b"null\nx",
            b"{\nx",
            b"{} {}\nx",
            b"{}x\nx",
            b"{\"to\":\"PA_a\"}\nx",
            b"{\"to\":[1]}\nx",
            b"{\"to\":[\"a\"],\"to\":[\"b\"]}\nx",
            b"{\"to\":[\"\xff\"]}\nx",
        ] {
            let e = parse_client(bad, MAX).unwrap_err();
            assert_eq!(e.code(), "bad_header", "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn size_limits() {
        let mut msg = b"\n".to_vec();
        msg.extend(std::iter::repeat_n(b'x', MAX));
        assert_eq!(ok(&msg).payload.len(), MAX);
        msg.push(b'x');
        let e = parse_client(&msg, MAX).unwrap_err();
        assert_eq!(
            e,
            DataError::TooLarge {
                size: MAX + 1,
                max: MAX
            }
        );
        assert_eq!(e.code(), "too_large");
        assert_eq!(e.to_string(), "payload is 1001 bytes, the limit is 1000");

        let mut big = b"{\"pad\":\"".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEADER_LEN));
        big.extend_from_slice(b"\"}\nx");
        let e = parse_client(&big, MAX).unwrap_err();
        assert_eq!(e.code(), "header_too_large");
    }

    fn to_header(n: usize, dup: bool) -> Vec<u8> {
        let ids: Vec<String> = (0..n)
            .map(|i| format!("PA_{}", if dup { i % 2 } else { i }))
            .collect();
        let mut h = serde_json::to_vec(&serde_json::json!({ "to": ids })).unwrap();
        h.extend_from_slice(b"\npayload");
        h
    }

    #[test]
    fn recipient_limit() {
        assert_eq!(ok(&to_header(64, false)).to.len(), 64);
        let e = parse_client(&to_header(65, false), MAX).unwrap_err();
        assert_eq!(e, DataError::TooManyRecipients { count: 65, max: 64 });
        assert_eq!(e.code(), "too_many_recipients");
        // Repeats count once.
        assert_eq!(ok(&to_header(500, true)).to.len(), 2);
    }

    /// A relayed message's framing (seq 1, ts 2).
    fn frame_for_receiver(from: &str, payload: &[u8]) -> bytes::Bytes {
        use crate::sfu::timeline::{Header, Stamp, frame};
        frame(
            &Header {
                from,
                stamp: Stamp { seq: 1, ts: 2 },
                sseq: None,
                event: None,
                replay: false,
                text: false,
                tick: None,
            },
            payload,
        )
    }

    #[test]
    fn timeline_fields() {
        let m = ok(b"{\"sseq\":7,\"ack\":true}\nx");
        assert_eq!((m.sseq, m.ack), (Some(7), true));
        let m = ok(b"{\"sseq\":9007199254740991}\nx");
        assert_eq!((m.sseq, m.ack), (Some(MAX_SSEQ), false));
        for bad in [
            &b"{\"sseq\":9007199254740992}\nx"[..],
            b"{\"sseq\":-1}\nx",
            b"{\"sseq\":1.5}\nx",
            b"{\"sseq\":\"1\"}\nx",
            b"{\"ack\":true}\nx",
            b"{\"ack\":1,\"sseq\":1}\nx",
        ] {
            let e = parse_client(bad, MAX).unwrap_err();
            assert_eq!(e.code(), "bad_header", "{:?}", std::str::from_utf8(bad));
        }
    }

    #[test]
    fn framing_for_receivers() {
        let f = frame_for_receiver("PA_abc", b"hello\nworld");
        assert_eq!(
            &f[..],
            b"{\"from\":\"PA_abc\",\"seq\":1,\"ts\":2}\nhello\nworld"
        );
        // Escaping keeps the header one valid JSON line.
        let f = frame_for_receiver("we\"ird\nid", &[0xff]);
        let nl = f.iter().position(|&b| b == b'\n').unwrap();
        let v: serde_json::Value = serde_json::from_slice(&f[..nl]).unwrap();
        assert_eq!(
            v,
            serde_json::json!({ "from": "we\"ird\nid", "seq": 1, "ts": 2 })
        );
        assert_eq!(&f[nl + 1..], &[0xff]);
        // A relayed message is itself a valid client message (broadcast).
        let again = ok(&f);
        assert!(again.is_broadcast());
        assert_eq!(again.payload, &[0xff]);
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let alphabet = b"{}[]\":,\n tonul\\PA_x1";
        for _ in 0..100_000 {
            let len = (next() % 40) as usize;
            let msg: Vec<u8> = (0..len)
                .map(|_| {
                    let r = next();
                    if r % 3 == 0 {
                        r as u8
                    } else {
                        alphabet[(r >> 8) as usize % alphabet.len()]
                    }
                })
                .collect();
            if let Ok(m) = parse_client(&msg, 16) {
                assert!(m.payload.len() <= 16);
                assert!(m.to.len() <= MAX_RECIPIENTS);
            }
        }
    }

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn message_rate() {
        let t0 = Instant::now();
        let limit = RateLimit {
            messages_per_sec: 10,
            message_burst: 5,
            bytes_per_sec: 0,
            byte_burst: 0,
        };
        let mut r = RateLimiter::new(limit);
        for _ in 0..5 {
            r.check(t0, 10).unwrap();
        }
        let e = r.check(t0, 10).unwrap_err();
        assert_eq!(e.code(), "rate_limited");
        assert_eq!(
            e,
            DataError::RateLimited {
                retry_after: Duration::from_millis(100)
            }
        );
        assert!(r.check(at(t0, 99), 10).is_err());
        r.check(at(t0, 100), 10).unwrap();
        assert!(r.check(at(t0, 150), 10).is_err());
        // After a long pause, only a burst's worth.
        let accepted = (0..100)
            .filter(|_| r.check(at(t0, 60_000), 1).is_ok())
            .count();
        assert_eq!(accepted, 5);
        assert_eq!(r.limit(), limit);
    }

    #[test]
    fn byte_rate() {
        let t0 = Instant::now();
        let limit = RateLimit {
            messages_per_sec: 0,
            message_burst: 0,
            bytes_per_sec: 1000,
            byte_burst: 2000,
        };
        let mut r = RateLimiter::new(limit);
        r.check(t0, 1500).unwrap();
        // 500 left: 600 does not fit, 500 does.
        let e = r.check(t0, 600).unwrap_err();
        assert_eq!(
            e,
            DataError::RateLimited {
                retry_after: Duration::from_millis(100)
            }
        );
        r.check(t0, 500).unwrap();
        assert!(r.check(t0, 1).is_err());
        r.check(at(t0, 101), 100).unwrap();
        // A message larger than the burst waits for a full bucket, then goes into debt.
        assert!(r.check(at(t0, 1000), 5000).is_err());
        r.check(at(t0, 2100), 5000).unwrap();
        // Debt of 3000 bytes: nothing for 3 s.
        assert!(r.check(at(t0, 5000), 1).is_err());
        r.check(at(t0, 5200), 1).unwrap();
    }

    #[test]
    fn both_limits_and_defaults() {
        let t0 = Instant::now();
        let mut r = RateLimiter::default();
        let accepted = (0..1000).filter(|_| r.check(t0, 100).is_ok()).count();
        assert_eq!(accepted, 200);
        let mut r = RateLimiter::default();
        // 2 MiB burst of 64 KiB messages: 32 of them.
        let accepted = (0..100).filter(|_| r.check(t0, 64 << 10).is_ok()).count();
        assert_eq!(accepted, 32);
        // Sustained over 10 s: about 100 msg/s.
        let mut r = RateLimiter::default();
        let accepted = (0..10_000u64)
            .filter(|&i| r.check(at(t0, i), 10).is_ok())
            .count();
        assert!((1190..=1201).contains(&accepted), "{accepted}");
        // Time going backwards neither panics nor refills.
        let mut r = RateLimiter::new(RateLimit::default());
        for _ in 0..200 {
            r.check(at(t0, 10_000), 1).unwrap();
        }
        assert!(r.check(t0, 1).is_err());
        // Disabled limits.
        let mut r = RateLimiter::new(RateLimit {
            messages_per_sec: 0,
            message_burst: 0,
            bytes_per_sec: 0,
            byte_burst: 0,
        });
        for _ in 0..10_000 {
            assert!(r.allow(t0, 1 << 20));
        }
        // The boolean form.
        let mut r = RateLimiter::default();
        assert_eq!((0..300).filter(|_| r.allow(t0, 1)).count(), 200);
    }
}
