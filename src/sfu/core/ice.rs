//! ICE restarts: new ICE credentials on a connection that keeps its DTLS session, SRTP keys,
//! tracks and subscriptions.
//!
//! - **Publisher connection** (the client offers): a `publish_offer` whose ICE credentials
//!   differ from the last one is a restart. `rtc` restarts its agent while it applies the offer,
//!   and the answer carries the server's new credentials.
//! - **Subscriber connection** (the server offers): the client asks with `ice_restart`; the next
//!   `subscribe_offer` is made with `ice_restart` and carries new credentials (after the one
//!   in flight, if any, is answered). (`ice_restart` for the publisher connection changes
//!   nothing here: the signaling session answers it with fresh TURN credentials.)
//!
//! The server is ICE-lite: it learns the client's new address from its checks with the new
//! ufrag, and the fast paths send to the pair the client nominates (`flush`). Media keeps going
//! to the old address until then, so a restart made while the old path still works costs no
//! gap.

use super::*;

impl<T: Transmit> Sfu<T> {
    /// `ice_restart`.
    pub(super) fn on_ice_restart(&mut self, part: PartKey, target: PcTarget) {
        match target {
            // The client offers on the publisher connection: its restart is its next
            // `publish_offer` (the signaling session has sent it fresh TURN credentials).
            PcTarget::Publisher => {}
            PcTarget::Subscriber => {
                let Some(p) = part_mut!(self, part) else {
                    return;
                };
                if p.sub.rtc.remote_description().is_none() && !p.sub_offer_pending {
                    // Nothing negotiated yet: the first offer has fresh credentials anyway.
                    return;
                }
                debug!(participant = %p.pid, "ICE restart of the subscriber connection asked");
                p.sub.restart_wanted = true;
                self.send_offer(part);
            }
        }
    }

    /// After a local description was set on `key`'s connection: route its (maybe new) ufrag
    /// to it. True when the ufrag changed, i.e. ICE restarted.
    pub(super) fn sync_ufrag(&mut self, key: PcKey, sdp: &str) -> bool {
        let Some(ufrag) = sdpcheck::ice_ufrag(sdp) else {
            warn!(pc = ?key.kind, "local description without an ICE ufrag");
            return false;
        };
        let restarted = self.demux.ufrag_of(key).is_some_and(|old| old != ufrag);
        self.demux.register(key, ufrag);
        if restarted {
            self.stats.ice_restarts += 1;
            let pid = self
                .part(key.part)
                .map(|p| p.pid.clone())
                .unwrap_or_default();
            info!(participant = %pid, pc = ?key.kind, "ICE restarted");
        }
        restarted
    }
}
