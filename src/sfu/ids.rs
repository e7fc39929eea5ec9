//! Typed ids inside the core. Outside it (signaling, `/stats`) they are the strings `PA_…`
//! and `TR_…`; inside, a participant is a number and a track id a shared string, so that
//! neither can be passed where the other is meant.

use std::borrow::Borrow;
use std::fmt;
use std::rc::Rc;

/// A room inside one core (outside it is known by its name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoomKey(pub u32);

/// A participant inside one core (outside it is known by its `PA_…` id). It names its room,
/// so that reaching a participant never needs a search, and nothing can reach a participant
/// without going through its room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartKey {
    pub room: RoomKey,
    pub n: u32,
}

impl PartKey {
    pub fn new(room: RoomKey, n: u32) -> Self {
        PartKey { room, n }
    }
}

impl fmt::Display for PartKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}.{}", self.room.0, self.n)
    }
}

/// A published track's server id (`TR_…`). Cloning shares the string (the packet path holds
/// it without allocating); a map keyed by it is looked up with a `&str`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrackId(Rc<str>);

impl TrackId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for TrackId {
    fn from(s: &str) -> Self {
        TrackId(Rc::from(s))
    }
}

impl From<String> for TrackId {
    fn from(s: String) -> Self {
        TrackId(Rc::from(s))
    }
}

impl Borrow<str> for TrackId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for TrackId {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrackId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn track_ids_are_looked_up_by_str_and_share_their_string() {
        let id = TrackId::from("TR_abc");
        let copy = id.clone();
        assert!(std::ptr::eq(id.as_str(), copy.as_str()));
        let mut m = HashMap::new();
        m.insert(id, 1);
        assert_eq!(m.get("TR_abc"), Some(&1));
        assert_eq!(copy.to_string(), "TR_abc");
        assert_eq!(PartKey::new(RoomKey(2), 7).to_string(), "#2.7");
    }
}
