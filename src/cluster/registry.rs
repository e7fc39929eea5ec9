//! The node registry's pure parts: the record a node writes to Redis, the Redis keys, the
//! load sampler and the heartbeat state machine (fed `now`, it says when to beat next and
//! when an outage starts or ends). No sockets, no clock: [`super`] drives them.

use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// Prefix of every key Plaza writes to Redis.
pub const KEY_PREFIX: &str = "plaza:";
/// Sorted set of node ids, scored by their last heartbeat (Unix milliseconds).
pub const NODES_KEY: &str = "plaza:nodes";
/// Entries of [`NODES_KEY`] whose record has been gone this long are removed by the next
/// heartbeat of any node (their record's TTL already hides them from listings).
pub const STALE_AFTER: Duration = Duration::from_secs(60);

/// The key of one node's record (a JSON string with a TTL).
pub fn node_key(id: &str) -> String {
    format!("{KEY_PREFIX}node:{id}")
}

/// A fresh random node id: `ND_` and 12 base-62 characters.
pub fn random_node_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    let tail: String = (0..12)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("ND_{tail}")
}

/// A node's load, as of its last heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeLoad {
    /// Process CPU time over the last heartbeat interval, in % of one core (200 = two cores
    /// busy); `None` before the second sample or where `/proc` cannot be read.
    pub cpu_percent: Option<f64>,
    pub rooms: usize,
    pub participants: usize,
    /// RTP packets forwarded per second over the last heartbeat interval.
    pub forwarded_pps: Option<f64>,
}

/// What a node writes to Redis about itself on every heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: String,
    /// HTTP/WebSocket address other nodes and clients use (`host:port`).
    pub address: String,
    /// Media UDP addresses, one per shard, in shard order (announced IP, bound port).
    pub media: Vec<String>,
    pub version: String,
    /// Unix milliseconds.
    pub started_at: u64,
    /// Unix milliseconds of this heartbeat.
    pub heartbeat_at: u64,
    /// The record's time to live, in milliseconds (missed heartbeats for this long: gone).
    pub ttl_ms: u64,
    pub load: NodeLoad,
    /// Where and how other nodes reach this one over the node link ([`super::link`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<LinkInfo>,
}

/// A node's end of the node link, as its record publishes it: the UDP address, the number its
/// datagrams carry, and the key they are sealed with (standard base64). Redis is trusted with
/// it, as with the rest of the control plane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkInfo {
    pub address: String,
    pub num: u32,
    pub key: String,
}

impl NodeRecord {
    pub fn encode(&self) -> String {
        // A struct of strings and numbers always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }

    pub fn decode(s: &str) -> Result<NodeRecord, serde_json::Error> {
        serde_json::from_str(s)
    }
}

/// Turns cumulative counters (CPU clock ticks, packets forwarded) into rates between two
/// samples.
#[derive(Debug, Default)]
pub struct LoadSampler {
    last: Option<(Instant, Option<u64>, u64)>,
}

impl LoadSampler {
    /// `cpu_ticks`: the process's user + system time in clock ticks of `ticks_per_s`;
    /// `forwarded`: RTP packets forwarded so far. Returns (CPU %, packets/s), `None` for the
    /// first sample (no interval yet) or a zero-length interval.
    pub fn sample(
        &mut self,
        now: Instant,
        cpu_ticks: Option<u64>,
        ticks_per_s: u64,
        forwarded: u64,
    ) -> (Option<f64>, Option<f64>) {
        let prev = self.last.replace((now, cpu_ticks, forwarded));
        let Some((then, prev_ticks, prev_fwd)) = prev else {
            return (None, None);
        };
        let secs = now.saturating_duration_since(then).as_secs_f64();
        if secs <= 0.0 {
            return (None, None);
        }
        let cpu = match (prev_ticks, cpu_ticks) {
            (Some(a), Some(b)) if ticks_per_s > 0 => {
                Some(b.saturating_sub(a) as f64 / ticks_per_s as f64 / secs * 100.0)
            }
            _ => None,
        };
        let pps = forwarded.saturating_sub(prev_fwd) as f64 / secs;
        (cpu.map(round1), Some(round1(pps)))
    }
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// Heartbeat timing.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeartbeatTiming {
    /// Between two heartbeats while Redis answers.
    pub interval: Duration,
    /// The record's TTL: a node that misses heartbeats this long drops out.
    pub ttl: Duration,
    /// First retry after a failure; doubles per failure up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for HeartbeatTiming {
    fn default() -> Self {
        HeartbeatTiming {
            interval: Duration::from_secs(1),
            ttl: Duration::from_secs(3),
            min_backoff: Duration::from_millis(250),
            max_backoff: Duration::from_secs(1),
        }
    }
}

/// What a heartbeat's outcome changes, for the driver to log (once per outage).
#[derive(Debug, Clone, PartialEq)]
pub enum Transition {
    /// Nothing to report.
    None,
    /// The first failure after success (or since start): Redis is unreachable.
    Lost,
    /// The first success after an outage that lasted this long (the node is registered again).
    Restored { outage: Duration, failures: u64 },
}

/// The heartbeat's state: when to beat next and whether Redis is reachable.
#[derive(Debug)]
pub struct Heartbeat {
    timing: HeartbeatTiming,
    next: Instant,
    /// `Some(start, failures)` during an outage.
    outage: Option<(Instant, u64)>,
    /// At least one heartbeat has succeeded (the node has been registered).
    registered_once: bool,
}

impl Heartbeat {
    /// The first heartbeat is due at once.
    pub fn new(timing: HeartbeatTiming, now: Instant) -> Self {
        Heartbeat {
            timing,
            next: now,
            outage: None,
            registered_once: false,
        }
    }

    pub fn timing(&self) -> HeartbeatTiming {
        self.timing
    }

    /// When the next heartbeat is due.
    pub fn next_at(&self) -> Instant {
        self.next
    }

    /// Whether Redis answered the last heartbeat.
    pub fn is_up(&self) -> bool {
        self.outage.is_none() && self.registered_once
    }

    /// Records a heartbeat's outcome at `now`: schedules the next one (the interval after a
    /// success, a doubling backoff after failures) and says whether an outage began or ended.
    pub fn on_result(&mut self, now: Instant, ok: bool) -> Transition {
        if ok {
            self.next = now + self.timing.interval;
            let was = self.outage.take();
            self.registered_once = true;
            match was {
                Some((since, failures)) => Transition::Restored {
                    outage: now.saturating_duration_since(since),
                    failures,
                },
                None => Transition::None,
            }
        } else {
            let (transition, failures) = match self.outage {
                Some((since, n)) => {
                    self.outage = Some((since, n + 1));
                    (Transition::None, n + 1)
                }
                None => {
                    self.outage = Some((now, 1));
                    (Transition::Lost, 1)
                }
            };
            let shift = (failures - 1).min(16) as u32;
            let backoff = self
                .timing
                .min_backoff
                .saturating_mul(1 << shift)
                .min(self.timing.max_backoff);
            self.next = now + backoff;
            transition
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> NodeRecord {
        NodeRecord {
            id: "ND_abc".into(),
            address: "10.0.0.1:7880".into(),
            media: vec!["10.0.0.1:7882".into(), "10.0.0.1:7883".into()],
            version: "0.1.0".into(),
            started_at: 1_700_000_000_000,
            heartbeat_at: 1_700_000_001_000,
            ttl_ms: 3000,
            link: None,
            load: NodeLoad {
                cpu_percent: Some(12.5),
                rooms: 2,
                participants: 5,
                forwarded_pps: Some(1000.0),
            },
        }
    }

    #[test]
    fn record_round_trips() {
        let r = record();
        let s = r.encode();
        assert!(s.contains(r#""id":"ND_abc""#), "{s}");
        assert!(s.contains(r#""participants":5"#), "{s}");
        assert_eq!(NodeRecord::decode(&s).unwrap(), r);
        assert!(NodeRecord::decode("{\"id\":1}").is_err());
    }

    #[test]
    fn keys_and_ids() {
        assert_eq!(node_key("ND_x"), "plaza:node:ND_x");
        let a = random_node_id();
        assert!(a.starts_with("ND_") && a.len() == 15, "{a}");
        assert_ne!(a, random_node_id());
    }

    #[test]
    fn sampler_gives_rates_from_the_second_sample() {
        let t0 = Instant::now();
        let mut s = LoadSampler::default();
        assert_eq!(s.sample(t0, Some(100), 100, 0), (None, None));
        // 50 ticks (0.5 s CPU) and 2000 packets over 2 s: 25 %, 1000 pps.
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(
            s.sample(t1, Some(150), 100, 2000),
            (Some(25.0), Some(1000.0))
        );
        // No CPU reading: rate of packets only; a zero-length interval gives nothing.
        let t2 = t1 + Duration::from_secs(1);
        assert_eq!(s.sample(t2, None, 100, 2500), (None, Some(500.0)));
        assert_eq!(s.sample(t2, None, 100, 2500), (None, None));
    }

    #[test]
    fn heartbeat_schedules_and_reports_one_outage() {
        let t = HeartbeatTiming::default();
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(t, t0);
        assert_eq!(hb.next_at(), t0, "the first beat is due at once");
        assert!(!hb.is_up());
        assert_eq!(hb.on_result(t0, true), Transition::None);
        assert!(hb.is_up());
        assert_eq!(hb.next_at(), t0 + t.interval);

        // Failures: one `Lost`, then silence; the backoff doubles up to its cap.
        let t1 = t0 + t.interval;
        assert_eq!(hb.on_result(t1, false), Transition::Lost);
        assert!(!hb.is_up());
        assert_eq!(hb.next_at(), t1 + t.min_backoff);
        let mut now = hb.next_at();
        let mut gaps = Vec::new();
        for _ in 0..6 {
            assert_eq!(hb.on_result(now, false), Transition::None);
            gaps.push(hb.next_at() - now);
            now = hb.next_at();
        }
        assert_eq!(gaps[0], t.min_backoff * 2);
        assert_eq!(gaps[1], t.min_backoff * 4);
        assert!(gaps.iter().all(|g| *g <= t.max_backoff));
        assert_eq!(*gaps.last().unwrap(), t.max_backoff);

        // Back: one `Restored` with the outage's length and failures, then normal beats.
        assert_eq!(
            hb.on_result(now, true),
            Transition::Restored {
                outage: now - t1,
                failures: 7
            }
        );
        assert!(hb.is_up());
        assert_eq!(hb.next_at(), now + t.interval);
        assert_eq!(hb.on_result(now + t.interval, true), Transition::None);
    }

    #[test]
    fn failing_from_the_start_is_one_outage() {
        let t0 = Instant::now();
        let mut hb = Heartbeat::new(HeartbeatTiming::default(), t0);
        assert_eq!(hb.on_result(t0, false), Transition::Lost);
        assert!(matches!(
            hb.on_result(t0 + Duration::from_secs(1), true),
            Transition::Restored { failures: 1, .. }
        ));
    }
}
