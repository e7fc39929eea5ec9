//! Room placement's pure parts: which node a room goes to, given its lease in Redis and the
//! live nodes' records. No sockets, no clock: [`super::ClusterView::place`] reads Redis, asks
//! [`decide`], and writes what it says with a compare-and-set ([`CLAIM_SCRIPT`]).
//!
//! A room lives on one node. Its lease, `plaza:room:<room>`, holds that node's id with a TTL;
//! the node renews the leases of the rooms it hosts on every heartbeat ([`RENEW_SCRIPT`]) and
//! drops those of rooms it no longer hosts ([`RELEASE_SCRIPT`]). A lease whose node is not
//! live any more (its record expired) is taken over: the room is placed again.

use super::registry::{KEY_PREFIX, NodeRecord};
use std::time::Duration;

/// The key of a room's lease (a node id with a TTL).
pub fn room_key(room: &str) -> String {
    format!("{KEY_PREFIX}room:{room}")
}

/// The key that marks a room as extended to every node (set by the room's node while the
/// room has `--cluster-span-above` participants there, with the lease's TTL).
pub fn span_key(room: &str) -> String {
    format!("{KEY_PREFIX}span:{room}")
}

/// What to do with a room's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The lease's node is live: the room is there.
    Keep { node: String },
    /// Place the room on `node`: set the lease if it still holds `replacing` (`None`: if there
    /// is no lease).
    Claim {
        node: String,
        replacing: Option<String>,
    },
}

/// Decides where `room`'s lease should point. `holder`: the lease's node id, if any; `nodes`:
/// the live nodes' records; `me`: this node (always a candidate, listed or not — a node that
/// has not registered yet still serves).
pub fn decide(me: &NodeRecord, holder: Option<&str>, nodes: &[NodeRecord]) -> Decision {
    if let Some(h) = holder
        && (h == me.id || nodes.iter().any(|n| n.id == h))
    {
        return Decision::Keep { node: h.to_owned() };
    }
    Decision::Claim {
        node: least_loaded(me, nodes).id.clone(),
        replacing: holder.map(str::to_owned),
    }
}

/// The node a new room goes to: the fewest participants, then the fewest rooms, then the
/// least CPU; on a tie this node (no redirect), then the smallest id. `me`'s listed record
/// (if any) stands for it, so its load is the one the others see.
pub fn least_loaded<'a>(me: &'a NodeRecord, nodes: &'a [NodeRecord]) -> &'a NodeRecord {
    let mine = nodes.iter().find(|n| n.id == me.id).unwrap_or(me);
    let rank = |n: &NodeRecord| (load_key(n), n.id != me.id, n.id.clone());
    nodes
        .iter()
        .filter(|n| n.id != me.id)
        .fold(mine, |best, n| if rank(n) < rank(best) { n } else { best })
}

/// This node's own view of its load, live (the records are a heartbeat old).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LocalLoad {
    /// Participants (joined or joining) of the room being joined, here.
    pub room: usize,
    /// Participants (joined or joining) here, in every room.
    pub participants: usize,
}

/// Where a join of a room whose lease this node holds, and which is extended to every node,
/// goes instead of here: when the room has `span_above` participants here, to the live node
/// with a node link that serves the fewest participants (then rooms, then id), if it serves
/// fewer than this node does now. That node serves the join (the room extended there), so a
/// livestream whose viewers all come through one address still spreads over the nodes.
pub fn spill<'a>(
    me: &str,
    here: LocalLoad,
    span_above: usize,
    nodes: &'a [NodeRecord],
) -> Option<&'a NodeRecord> {
    if span_above == 0 || here.room < span_above {
        return None;
    }
    nodes
        .iter()
        .filter(|n| n.id != me && n.link.is_some())
        .min_by_key(|n| (n.load.participants, n.load.rooms, n.id.clone()))
        .filter(|n| n.load.participants < here.participants)
}

/// Lower is less loaded. CPU is compared in whole percent, so that its noise does not
/// outweigh the tie-break towards this node.
fn load_key(n: &NodeRecord) -> (usize, usize, u64) {
    let cpu = n.load.cpu_percent.unwrap_or(0.0).max(0.0).round() as u64;
    (n.load.participants, n.load.rooms, cpu)
}

/// Whether a node whose record has `pttl` left of its `ttl` has missed a heartbeat it should
/// have made by now (one `interval` late, with half an interval of grace): it may be dead, and
/// a join for its room probes it before sending a client there. `pttl < 0`: no record (or no
/// TTL) — already gone, not merely suspect.
pub fn suspect(pttl: i64, ttl: Duration, interval: Duration) -> bool {
    let ttl = ttl.as_millis() as i64;
    let late = (interval.as_millis() * 3 / 2) as i64;
    pttl >= 0 && pttl < ttl - late
}

/// `KEYS[1]` the lease, `ARGV[1]` the holder expected (`""`: none), `ARGV[2]` the new holder,
/// `ARGV[3]` the TTL in ms. Sets the lease if it still holds what was read. Returns the lease's
/// holder after the call (the new one, or whoever won a race; `""`: none) and 1 if this call
/// wrote it, else 0.
pub const CLAIM_SCRIPT: &str = r"
local v = redis.call('GET', KEYS[1])
if (v == false and ARGV[1] == '') or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return {ARGV[2], 1}
end
if v == false then return {'', 0} end
return {v, 0}
";

/// `KEYS[1]` the lease, `ARGV[1]` this node, `ARGV[2]` the TTL in ms. Renews the lease if it is
/// this node's or has none; returns the holder after the call (another node's id: the room is
/// hosted on two nodes, see [`super`]).
pub const RENEW_SCRIPT: &str = r"
local v = redis.call('GET', KEYS[1])
if v == false or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
return v
";

/// `KEYS[1]` the lease, `ARGV[1]` this node. Deletes the lease if it is this node's.
pub const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Replaces the host and port of a WebSocket or HTTP URL with `address` (`host:port`),
/// keeping its scheme, path and query: where a client that was told to go to `address`
/// connects. `None` when `url` has no `scheme://`.
pub fn redirect_url(url: &str, address: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let path = rest.find(['/', '?']).map_or("", |i| &rest[i..]);
    Some(format!("{scheme}://{address}{path}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::registry::NodeLoad;

    fn node(id: &str, participants: usize, rooms: usize, cpu: Option<f64>) -> NodeRecord {
        NodeRecord {
            id: id.to_owned(),
            address: format!("{id}:7880"),
            media: Vec::new(),
            version: "0".to_owned(),
            started_at: 0,
            heartbeat_at: 0,
            ttl_ms: 3000,
            link: None,
            load: NodeLoad {
                cpu_percent: cpu,
                rooms,
                participants,
                forwarded_pps: None,
            },
        }
    }

    #[test]
    fn a_big_extended_room_spills_its_joins_to_a_less_loaded_node() {
        let linked = |id, participants| {
            let mut n = node(id, participants, 1, None);
            n.link = Some(crate::cluster::registry::LinkInfo {
                address: "127.0.0.1:1".into(),
                num: 1,
                key: String::new(),
            });
            n
        };
        let nodes = [
            linked("a", 40),
            linked("b", 12),
            linked("c", 9),
            node("d", 0, 0, None),
        ];
        let here = LocalLoad {
            room: 30,
            participants: 41,
        };
        // Past the threshold: to the least-loaded node with a link (d has none).
        assert_eq!(
            spill("a", here, 30, &nodes).map(|n| n.id.as_str()),
            Some("c")
        );
        // Below it, or spilling off: here.
        assert_eq!(spill("a", LocalLoad { room: 29, ..here }, 30, &nodes), None);
        assert_eq!(spill("a", here, 0, &nodes), None);
        // Nobody serves fewer than this node does now: here.
        let light = LocalLoad {
            room: 30,
            participants: 9,
        };
        assert_eq!(spill("a", light, 30, &nodes), None);
        assert_eq!(spill("a", here, 30, &nodes[..1]), None);
    }

    #[test]
    fn a_live_holder_keeps_its_room() {
        let me = node("a", 0, 0, None);
        let nodes = [node("a", 0, 0, None), node("b", 9, 3, None)];
        assert_eq!(
            decide(&me, Some("b"), &nodes),
            Decision::Keep { node: "b".into() }
        );
        // This node holds it even before it is listed.
        assert_eq!(
            decide(&me, Some("a"), &[]),
            Decision::Keep { node: "a".into() }
        );
    }

    #[test]
    fn a_new_room_goes_to_the_least_loaded_node() {
        let me = node("a", 5, 1, Some(10.0));
        let nodes = [node("a", 5, 1, Some(10.0)), node("b", 2, 1, Some(50.0))];
        assert_eq!(
            decide(&me, None, &nodes),
            Decision::Claim {
                node: "b".into(),
                replacing: None
            }
        );
        // Participants first, then rooms, then CPU.
        let nodes = [node("a", 2, 2, Some(1.0)), node("b", 2, 1, Some(90.0))];
        assert_eq!(least_loaded(&nodes[0], &nodes).id, "b");
        let nodes = [node("a", 2, 1, Some(30.0)), node("b", 2, 1, Some(20.0))];
        assert_eq!(least_loaded(&nodes[0], &nodes).id, "b");
    }

    #[test]
    fn a_tie_stays_here_then_goes_to_the_smallest_id() {
        let nodes = [
            node("a", 1, 1, Some(5.2)),
            node("b", 1, 1, Some(4.9)),
            node("c", 1, 1, Some(5.0)),
        ];
        // 5.2 % and 4.9 % round to 5: a tie, this node wins.
        assert_eq!(least_loaded(&nodes[2], &nodes).id, "c");
        assert_eq!(least_loaded(&nodes[1], &nodes).id, "b");
        // A node not among the tied ones picks the smallest id of them.
        let me = node("z", 7, 1, None);
        assert_eq!(least_loaded(&me, &nodes).id, "a");
    }

    #[test]
    fn the_listed_record_stands_for_this_node() {
        // The caller's own record may be stale; the listed one is what the others see.
        let me = node("a", 0, 0, None);
        let nodes = [node("a", 8, 2, None), node("b", 3, 1, None)];
        assert_eq!(least_loaded(&me, &nodes).id, "b");
        // Unlisted (not registered yet): its own record counts.
        assert_eq!(least_loaded(&me, &nodes[1..]).id, "a");
    }

    #[test]
    fn a_dead_holders_room_is_placed_again() {
        let me = node("a", 4, 1, None);
        let nodes = [node("a", 4, 1, None), node("c", 1, 1, None)];
        assert_eq!(
            decide(&me, Some("b"), &nodes),
            Decision::Claim {
                node: "c".into(),
                replacing: Some("b".into())
            }
        );
    }

    #[test]
    fn a_node_late_with_its_heartbeat_is_suspect() {
        let (ttl, interval) = (Duration::from_secs(3), Duration::from_secs(1));
        // Fresh (just beat), and up to 1.5 intervals since the last heartbeat: fine.
        assert!(!suspect(3000, ttl, interval));
        assert!(!suspect(1500, ttl, interval));
        // A heartbeat missed by half an interval: suspect, until the record is gone.
        assert!(suspect(1499, ttl, interval));
        assert!(suspect(0, ttl, interval));
        assert!(!suspect(-2, ttl, interval));
        assert!(!suspect(-1, ttl, interval));
    }

    #[test]
    fn redirect_urls_keep_scheme_path_and_query() {
        assert_eq!(
            redirect_url("ws://127.0.0.1:7880/rtc", "10.0.0.2:7881").as_deref(),
            Some("ws://10.0.0.2:7881/rtc")
        );
        assert_eq!(
            redirect_url("https://a.example/whip/r1?x=1", "b:80").as_deref(),
            Some("https://b:80/whip/r1?x=1")
        );
        assert_eq!(
            redirect_url("wss://host:443", "n2:8443").as_deref(),
            Some("wss://n2:8443")
        );
        assert_eq!(redirect_url("nohost", "b:1"), None);
    }
}
