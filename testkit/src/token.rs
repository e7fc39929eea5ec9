//! Access tokens for the synthetic peers and the raw WebSocket helpers.
//!
//! Every join needs a token. The test kit mints its own, signed with the process's signing key:
//! the public development key unless a tool installed another ([`set_signing_key`]: the load
//! tester's and the benchmark's `--api-key`/`--api-secret`, see [`crate::cli::PeerArgs`]).
//! A peer given a token of its own (`PeerOptions::token`) sends that one instead.

use plaza::auth::{self, ApiKey, Claims};
use std::sync::OnceLock;

static SIGNING_KEY: OnceLock<ApiKey> = OnceLock::new();

/// Sign every token this process mints from now on with `key` (once per process, before the
/// first peer joins). Fails when the key is invalid or another key was installed.
pub fn set_signing_key(key: ApiKey) -> anyhow::Result<()> {
    key.validate().map_err(anyhow::Error::msg)?;
    let name = key.key.clone();
    SIGNING_KEY
        .set(key)
        .map_err(|_| anyhow::anyhow!("a signing key is already installed (not {name:?})"))
}

/// The key tokens are signed with: the installed one, else the development key.
pub fn signing_key() -> ApiKey {
    SIGNING_KEY.get().cloned().unwrap_or_else(ApiKey::dev)
}

/// A participant token for `name` in `room` (every participant grant, valid for
/// [`auth::DEFAULT_TTL`]): display name `name`, identity `name` plus a random suffix, so two
/// peers of the same name never share an identity.
pub fn participant(room: &str, name: &str) -> String {
    let identity = format!("{}-{:08x}", name.trim(), rand::random::<u32>());
    sign(&Claims::new(identity, room.trim(), auth::DEFAULT_TTL).with_name(name.trim()))
}

/// A token for `identity` (also its display name) in `room` with the participant grants as
/// `f` leaves them (an admin, a hidden viewer, a publisher of one kind, …).
pub fn with_grants(room: &str, identity: &str, f: impl FnOnce(&mut auth::RoomGrants)) -> String {
    let mut grants = auth::RoomGrants::participant(room);
    f(&mut grants);
    sign(
        &Claims::new(identity, room, auth::DEFAULT_TTL)
            .with_name(identity)
            .with_grants(grants),
    )
}

/// Sign `claims` with [`signing_key`].
pub fn sign(claims: &Claims) -> String {
    auth::mint(&signing_key(), claims).unwrap_or_else(|e| panic!("cannot mint a token: {e}"))
}
