//! Access tokens: JWTs signed with HS256 by an API key's secret, naming who joins which room and
//! what they may do there.
//!
//! A token's claims ([`Claims`]):
//!
//! ```json
//! {
//!   "iss": "APIkey1",                  // the API key whose secret signed it
//!   "sub": "alice-7f3a",               // the identity: unique in the room
//!   "name": "Alice",                   // display name (optional; default: the join's `name`)
//!   "iat": 1767225600, "nbf": 1767225600, "exp": 1767247200,
//!   "grants": {
//!     "room": "demo",                  // the one room it admits to
//!     "roomJoin": true,
//!     "canPublish": true,
//!     "canPublishKinds": ["audio", "video"],  // optional: absent = every kind
//!     "canPublishData": true,
//!     "canSubscribe": true,
//!     "hidden": false,
//!     "roomAdmin": false
//!   }
//! }
//! ```
//!
//! The grant names follow LiveKit's `video` grant, so they read familiar, but the claim is
//! Plaza's own (`grants`) and so is its meaning: `canPublish`, `canPublishData` and
//! `canSubscribe` default to `true` when absent, `roomJoin`, `hidden` and `roomAdmin` to
//! `false`. `signaling/README.md` documents the format for clients.
//!
//! The server ([`Verifier`]) knows a set of API keys ([`KeySet`]); with none configured it runs
//! in *development mode* and knows only [`DEV_API_KEY`] with [`DEV_API_SECRET`], which are
//! public. [`mint`] makes tokens (the `plaza token` command, the development token endpoint,
//! the test kit, the load tester and the benchmark); [`Verifier::verify`] checks them and says
//! what is wrong with a [`TokenError`].

// Not the packet path: verifying a token reads the wall clock (`exp`, `nbf`).
#![allow(clippy::disallowed_methods)]

use crate::sfu::Grants;
use crate::signal::ErrorCode;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The development API key: used when no key is configured. Public: never for production.
pub const DEV_API_KEY: &str = "devkey";
/// The development API secret (public, like [`DEV_API_KEY`]).
pub const DEV_API_SECRET: &str = "plaza-development-secret-do-not-use-in-production";
/// Shortest accepted API secret, in bytes (HS256 wants at least its 256-bit output size).
pub const MIN_SECRET_LEN: usize = 32;
/// Longest accepted token, in bytes.
pub const MAX_TOKEN_LEN: usize = 8192;
/// Longest accepted identity and API key, in characters.
pub const MAX_IDENTITY_CHARS: usize = 128;
/// How long a minted token is valid by default.
pub const DEFAULT_TTL: Duration = Duration::from_secs(6 * 3600);
/// Clock skew tolerated on `exp` and `nbf`, in seconds.
pub const LEEWAY_S: u64 = 30;

/// An API secret. Its `Debug` never shows it, so configuration dumps and logs cannot leak it.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret::new(s))
    }
}

impl Secret {
    pub fn new(secret: impl Into<String>) -> Self {
        Secret(secret.into())
    }

    /// The secret itself (to sign or verify with; never to print).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret(<{} bytes, redacted>)", self.0.len())
    }
}

/// An API key and its secret: what signs tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    pub key: String,
    pub secret: Secret,
}

impl ApiKey {
    pub fn new(key: impl Into<String>, secret: impl Into<String>) -> Self {
        ApiKey {
            key: key.into(),
            secret: Secret::new(secret),
        }
    }

    /// The public development key ([`DEV_API_KEY`], [`DEV_API_SECRET`]).
    pub fn dev() -> Self {
        ApiKey::new(DEV_API_KEY, DEV_API_SECRET)
    }

    /// Check the key and secret: a key of 1 … [`MAX_IDENTITY_CHARS`] printable characters, a
    /// secret of at least [`MIN_SECRET_LEN`] bytes. The message names the key, never the secret.
    pub fn validate(&self) -> Result<(), String> {
        let chars = self.key.chars().count();
        if chars == 0 || chars > MAX_IDENTITY_CHARS {
            return Err(format!(
                "API key {:?}: must be 1 to {MAX_IDENTITY_CHARS} characters",
                self.key
            ));
        }
        if self
            .key
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(format!(
                "API key {:?}: must not contain spaces or control characters",
                self.key
            ));
        }
        let len = self.secret.expose().len();
        if len < MIN_SECRET_LEN {
            return Err(format!(
                "the secret of API key {:?} is {len} bytes long; at least {MIN_SECRET_LEN} are \
                 required (e.g. `openssl rand -base64 32`)",
                self.key
            ));
        }
        Ok(())
    }
}

impl Default for ApiKey {
    fn default() -> Self {
        ApiKey::dev()
    }
}

/// The API keys a server accepts (key → secret). Empty: development mode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeySet(BTreeMap<String, Secret>);

impl KeySet {
    pub fn new() -> Self {
        KeySet::default()
    }

    /// Add (or replace) a key.
    pub fn insert(&mut self, key: ApiKey) {
        self.0.insert(key.key, key.secret);
    }

    /// The key `name` with its secret.
    pub fn get(&self, name: &str) -> Option<ApiKey> {
        self.0.get(name).map(|secret| ApiKey {
            key: name.to_owned(),
            secret: secret.clone(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The configured key names (never the secrets).
    pub fn key_names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// Validate every key ([`ApiKey::validate`]).
    pub fn validate(&self) -> Result<(), String> {
        for (key, secret) in &self.0 {
            ApiKey {
                key: key.clone(),
                secret: secret.clone(),
            }
            .validate()?;
        }
        Ok(())
    }
}

impl FromIterator<ApiKey> for KeySet {
    fn from_iter<I: IntoIterator<Item = ApiKey>>(iter: I) -> Self {
        let mut set = KeySet::new();
        for key in iter {
            set.insert(key);
        }
        set
    }
}

/// What a token allows, in the room it names (the `grants` claim).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoomGrants {
    /// The room the token admits to.
    #[serde(default)]
    pub room: String,
    /// May join `room`.
    #[serde(default)]
    pub room_join: bool,
    /// May publish media (absent: yes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub can_publish: Option<bool>,
    /// Which kinds it may publish (`audio`, `video`); absent: every kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub can_publish_kinds: Option<Vec<PublishKind>>,
    /// May send data-channel messages (absent: yes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub can_publish_data: Option<bool>,
    /// May subscribe to others' tracks (absent: yes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub can_subscribe: Option<bool>,
    /// Others do not see it (a recorder or a bot).
    #[serde(default)]
    pub hidden: bool,
    /// May moderate the room: over the WebSocket, and through the admin API for `room`.
    #[serde(default)]
    pub room_admin: bool,
    /// May list every room through the admin API (`GET /api/rooms`).
    #[serde(default)]
    pub room_list: bool,
}

impl RoomGrants {
    /// A join to `room` with every participant permission (publish audio and video, send data,
    /// subscribe), not hidden, not admin: what every participant could do before tokens.
    pub fn participant(room: impl Into<String>) -> Self {
        RoomGrants {
            room: room.into(),
            room_join: true,
            can_publish: Some(true),
            can_publish_kinds: None,
            can_publish_data: Some(true),
            can_subscribe: Some(true),
            hidden: false,
            room_admin: false,
            room_list: false,
        }
    }

    /// Set the permissions from a list of grant names (see [`GRANT_NAMES`]); everything not
    /// named is refused (`roomJoin` stays as it is). Errors name the unknown grant.
    pub fn with_names<'a>(
        mut self,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, String> {
        let (mut audio, mut video) = (false, false);
        self.can_publish_data = Some(false);
        self.can_subscribe = Some(false);
        self.hidden = false;
        self.room_admin = false;
        self.room_list = false;
        for name in names.into_iter().map(str::trim).filter(|n| !n.is_empty()) {
            match name {
                "publish" => (audio, video) = (true, true),
                "publish-audio" => audio = true,
                "publish-video" => video = true,
                "data" => self.can_publish_data = Some(true),
                "subscribe" => self.can_subscribe = Some(true),
                "hidden" => self.hidden = true,
                "admin" => self.room_admin = true,
                "list" => self.room_list = true,
                other => {
                    return Err(format!(
                        "unknown grant `{other}` (known: {})",
                        GRANT_NAMES.join(", ")
                    ));
                }
            }
        }
        self.can_publish = Some(audio || video);
        self.can_publish_kinds = match (audio, video) {
            (true, true) | (false, false) => None,
            (true, false) => Some(vec![PublishKind::Audio]),
            (false, true) => Some(vec![PublishKind::Video]),
        };
        Ok(self)
    }

    fn may_publish(&self, kind: PublishKind) -> bool {
        self.can_publish.unwrap_or(true)
            && self
                .can_publish_kinds
                .as_ref()
                .is_none_or(|kinds| kinds.contains(&kind))
    }

    /// What the SFU core enforces for a participant holding these grants.
    pub fn to_core(&self) -> Grants {
        Grants {
            publish_audio: self.may_publish(PublishKind::Audio),
            publish_video: self.may_publish(PublishKind::Video),
            publish_data: self.can_publish_data.unwrap_or(true),
            subscribe: self.can_subscribe.unwrap_or(true),
            hidden: self.hidden,
            room_admin: self.room_admin,
        }
    }
}

/// The grant names `plaza token --grants`, the development endpoint and
/// [`RoomGrants::with_names`] accept.
pub const GRANT_NAMES: &[&str] = &[
    "publish",
    "publish-audio",
    "publish-video",
    "data",
    "subscribe",
    "hidden",
    "admin",
    "list",
];

/// The grants a token gets when none are named: publish, data, subscribe.
pub const DEFAULT_GRANT_NAMES: &[&str] = &["publish", "data", "subscribe"];

/// A media kind a token may publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PublishKind {
    Audio,
    Video,
}

/// A token's claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The API key that signed the token.
    pub iss: String,
    /// The participant's identity (unique in the room).
    pub sub: String,
    /// Display name; empty: the join's `name` is used.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Issued at (seconds since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// Not valid before (seconds since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Expiry (seconds since the Unix epoch).
    pub exp: u64,
    /// What the bearer may do, and where.
    pub grants: RoomGrants,
    /// Settings of the room, applied if this token's join opens it.
    #[serde(
        default,
        rename = "roomConfig",
        skip_serializing_if = "RoomConfig::is_empty"
    )]
    pub room_config: RoomConfig,
}

/// The `roomConfig` claim: settings of a room, taken from the token whose join opens it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomConfig {
    /// Input tick rate in Hz (0: off; at most [`crate::sfu::timeline::MAX_TICK_HZ`]);
    /// absent: the server's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tick_hz: Option<u32>,
}

impl RoomConfig {
    pub fn is_empty(&self) -> bool {
        *self == RoomConfig::default()
    }
}

impl Claims {
    /// Claims for `identity` in `room` with the participant grants
    /// ([`RoomGrants::participant`]), valid from `now` for `ttl`; `iss` is filled in by [`mint`].
    pub fn new(identity: impl Into<String>, room: impl Into<String>, ttl: Duration) -> Self {
        let now = unix_now();
        Claims {
            iss: String::new(),
            sub: identity.into(),
            name: String::new(),
            iat: Some(now),
            nbf: Some(now),
            exp: now.saturating_add(ttl.as_secs()),
            grants: RoomGrants::participant(room),
            room_config: RoomConfig::default(),
        }
    }

    /// With a display name.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// With other grants (the room stays).
    pub fn with_grants(mut self, grants: RoomGrants) -> Self {
        self.grants = grants;
        self
    }
}

/// Sign `claims` with `key` (its name goes into `iss`). Fails only on an invalid key.
pub fn mint(key: &ApiKey, claims: &Claims) -> Result<String, TokenError> {
    key.validate().map_err(TokenError::BadKey)?;
    let mut claims = claims.clone();
    claims.iss.clone_from(&key.key);
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(key.secret.expose().as_bytes()),
    )
    .map_err(|e| TokenError::BadKey(e.to_string()))
}

/// A participant token for `identity` in `room` with the default grants, valid for
/// [`DEFAULT_TTL`], signed with the development key: what the test tools use by default.
pub fn dev_token(room: &str, identity: &str) -> String {
    // The development key is valid and the claims serialise: minting cannot fail.
    mint(&ApiKey::dev(), &Claims::new(identity, room, DEFAULT_TTL)).unwrap_or_default()
}

/// Why a token was refused. The messages never contain a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No token came with the join.
    #[error("a join needs an access token (`token`)")]
    Missing,
    /// Not a JWT, not HS256, or claims of the wrong shape.
    #[error("the access token is malformed: {0}")]
    Malformed(String),
    /// The signature does not match the key's secret.
    #[error("the access token's signature does not verify")]
    BadSignature,
    /// `iss` names a key this server does not know.
    #[error("the access token is signed with an unknown API key {0:?}")]
    UnknownKey(String),
    /// `exp` has passed.
    #[error("the access token expired {0} s ago")]
    Expired(u64),
    /// `nbf` is in the future.
    #[error("the access token is not valid for another {0} s")]
    NotYetValid(u64),
    /// The token is for another room (or names none).
    #[error("the access token is for room {token_room:?}, not {join_room:?}")]
    WrongRoom {
        token_room: String,
        join_room: String,
    },
    /// `roomJoin` is not granted.
    #[error("the access token does not grant joining room {0:?} (`roomJoin`)")]
    JoinNotGranted(String),
    /// The admin API: the token does not grant what the request needs (`roomAdmin` for the
    /// request's room, `roomList` to list rooms).
    #[error("the access token does not grant {0}")]
    AdminNotGranted(String),
    /// Minting only: the key or secret is unusable.
    #[error("cannot sign with this API key: {0}")]
    BadKey(String),
}

impl TokenError {
    /// The signaling error code a join refused for this reason gets.
    pub fn code(&self) -> ErrorCode {
        match self {
            TokenError::Missing => ErrorCode::TokenMissing,
            TokenError::Malformed(_) | TokenError::BadSignature | TokenError::UnknownKey(_) => {
                ErrorCode::TokenInvalid
            }
            TokenError::Expired(_) => ErrorCode::TokenExpired,
            TokenError::NotYetValid(_) => ErrorCode::TokenNotYetValid,
            TokenError::WrongRoom { .. } => ErrorCode::TokenWrongRoom,
            TokenError::JoinNotGranted(_) | TokenError::AdminNotGranted(_) => {
                ErrorCode::PermissionDenied
            }
            TokenError::BadKey(_) => ErrorCode::Internal,
        }
    }
}

/// A verified token: who joins which room, as whom, with what grants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub identity: String,
    /// The token's display name (empty when it names none).
    pub name: String,
    pub room: String,
    pub grants: RoomGrants,
    pub api_key: String,
    pub room_config: RoomConfig,
}

/// Checks tokens against the configured keys (or the development key).
#[derive(Debug, Clone)]
pub struct Verifier {
    keys: KeySet,
    dev_mode: bool,
}

impl Verifier {
    /// A verifier for `keys`; with none, development mode (only the development key).
    pub fn new(keys: KeySet) -> Self {
        if keys.is_empty() {
            Verifier {
                keys: std::iter::once(ApiKey::dev()).collect(),
                dev_mode: true,
            }
        } else {
            Verifier {
                keys,
                dev_mode: false,
            }
        }
    }

    /// No keys were configured: the development key signs tokens and the development token
    /// endpoint is on.
    pub fn dev_mode(&self) -> bool {
        self.dev_mode
    }

    /// Verify a join's token against the wall clock. `room`: the join's room (`None`: the
    /// token's room is taken).
    pub fn verify(&self, token: Option<&str>, room: Option<&str>) -> Result<Verified, TokenError> {
        self.verify_at(token, room, unix_now())
    }

    /// [`Verifier::verify`] at `now` (seconds since the Unix epoch).
    pub fn verify_at(
        &self,
        token: Option<&str>,
        room: Option<&str>,
        now: u64,
    ) -> Result<Verified, TokenError> {
        let claims = self.decode_at(token, now)?;
        let token_room = claims.grants.room.trim();
        let join_room = room.map(str::trim).filter(|r| !r.is_empty());
        if token_room.is_empty() || join_room.is_some_and(|r| r != token_room) {
            return Err(TokenError::WrongRoom {
                token_room: token_room.to_owned(),
                join_room: join_room.unwrap_or_default().to_owned(),
            });
        }
        if !claims.grants.room_join {
            return Err(TokenError::JoinNotGranted(token_room.to_owned()));
        }
        Ok(Verified::from(claims))
    }

    /// Verify a token for the admin API against the wall clock: `Some(room)` needs
    /// `roomAdmin` for that room, `None` (listing every room) needs `roomList`. `roomJoin`
    /// is not needed.
    pub fn verify_admin(
        &self,
        token: Option<&str>,
        room: Option<&str>,
    ) -> Result<Verified, TokenError> {
        self.verify_admin_at(token, room, unix_now())
    }

    /// [`Verifier::verify_admin`] at `now` (seconds since the Unix epoch).
    pub fn verify_admin_at(
        &self,
        token: Option<&str>,
        room: Option<&str>,
        now: u64,
    ) -> Result<Verified, TokenError> {
        let claims = self.decode_at(token, now)?;
        let g = &claims.grants;
        match room.map(str::trim) {
            Some(room) => {
                if !g.room_admin {
                    return Err(TokenError::AdminNotGranted(format!(
                        "administering room {room:?} (`roomAdmin`)"
                    )));
                }
                if g.room.trim() != room {
                    return Err(TokenError::WrongRoom {
                        token_room: g.room.trim().to_owned(),
                        join_room: room.to_owned(),
                    });
                }
            }
            None if !g.room_list => {
                return Err(TokenError::AdminNotGranted(
                    "listing rooms (`roomList`)".to_owned(),
                ));
            }
            None => {}
        }
        Ok(Verified::from(claims))
    }

    /// The claims of a token whose signature, key, expiry and identity check out.
    fn decode_at(&self, token: Option<&str>, now: u64) -> Result<Claims, TokenError> {
        let token = token.map(str::trim).unwrap_or_default();
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed(format!(
                "{} bytes long; at most {MAX_TOKEN_LEN} are accepted",
                token.len()
            )));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| TokenError::Malformed(format!("bad header: {e}")))?;
        if header.alg != Algorithm::HS256 {
            return Err(TokenError::Malformed(format!(
                "algorithm {:?}; only HS256 is accepted",
                header.alg
            )));
        }
        // The issuer picks the secret: read it before the signature is checked (and trust
        // nothing else from the unverified claims).
        #[derive(Deserialize)]
        struct Issuer {
            iss: String,
        }
        let iss = jsonwebtoken::dangerous::insecure_decode::<Issuer>(token)
            .map_err(|e| TokenError::Malformed(format!("no usable `iss`: {e}")))?
            .claims
            .iss;
        let secret = self
            .keys
            .0
            .get(&iss)
            .ok_or_else(|| TokenError::UnknownKey(iss.clone()))?;
        let mut validation = Validation::new(Algorithm::HS256);
        // `exp` and `nbf` are checked below against `now`; the typed claims refuse a
        // timestamp of the wrong JSON type (it is malformed, never absent).
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(
            token,
            &DecodingKey::from_secret(secret.expose().as_bytes()),
            &validation,
        )
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidSignature => TokenError::BadSignature,
            _ => TokenError::Malformed(e.to_string()),
        })?;
        let claims = data.claims;
        if claims.exp.saturating_add(LEEWAY_S) <= now {
            return Err(TokenError::Expired(now - claims.exp));
        }
        if let Some(nbf) = claims.nbf
            && nbf > now.saturating_add(LEEWAY_S)
        {
            return Err(TokenError::NotYetValid(nbf - now));
        }
        check_text("sub", &claims.sub)?;
        if !claims.name.is_empty() {
            check_text("name", &claims.name)?;
        }
        if let Some(hz) = claims.room_config.input_tick_hz
            && hz > crate::sfu::timeline::MAX_TICK_HZ
        {
            return Err(TokenError::Malformed(format!(
                "roomConfig.input_tick_hz is {hz}; at most {} is accepted",
                crate::sfu::timeline::MAX_TICK_HZ
            )));
        }
        Ok(claims)
    }
}

impl From<Claims> for Verified {
    fn from(claims: Claims) -> Self {
        Verified {
            identity: claims.sub.trim().to_owned(),
            name: claims.name.trim().to_owned(),
            room: claims.grants.room.trim().to_owned(),
            api_key: claims.iss,
            grants: claims.grants,
            room_config: claims.room_config,
        }
    }
}

/// An identity or name claim: non-empty after trimming, at most [`MAX_IDENTITY_CHARS`]
/// characters, no control characters.
fn check_text(claim: &str, value: &str) -> Result<(), TokenError> {
    let value = value.trim();
    let chars = value.chars().count();
    if chars == 0 || chars > MAX_IDENTITY_CHARS || value.chars().any(char::is_control) {
        return Err(TokenError::Malformed(format!(
            "`{claim}` must be 1 to {MAX_IDENTITY_CHARS} characters without control characters"
        )));
    }
    Ok(())
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ApiKey {
        ApiKey::new(name, format!("{name}-secret-0123456789abcdefghijklmnop"))
    }

    fn claims(room: &str) -> Claims {
        Claims::new("alice-1", room, Duration::from_secs(600)).with_name("Alice")
    }

    fn verifier() -> Verifier {
        Verifier::new([key("k1"), key("k2")].into_iter().collect())
    }

    #[test]
    fn minted_token_verifies_with_its_claims() {
        let token = mint(&key("k2"), &claims("demo")).unwrap();
        let v = verifier().verify(Some(&token), Some("demo")).unwrap();
        assert_eq!(v.identity, "alice-1");
        assert_eq!(v.name, "Alice");
        assert_eq!(v.room, "demo");
        assert_eq!(v.api_key, "k2");
        assert_eq!(v.grants.to_core(), Grants::default());
        // The join may leave the room to the token.
        assert_eq!(verifier().verify(Some(&token), None).unwrap().room, "demo");
    }

    #[test]
    fn each_failure_has_its_own_error() {
        let v = verifier();
        let now = unix_now();
        let good = mint(&key("k1"), &claims("demo")).unwrap();
        assert_eq!(v.verify(None, Some("demo")), Err(TokenError::Missing));
        assert_eq!(v.verify(Some("  "), Some("demo")), Err(TokenError::Missing));
        assert!(matches!(
            v.verify(Some("not.a.jwt"), Some("demo")),
            Err(TokenError::Malformed(_))
        ));
        // Signed by a key the server knows under another secret.
        let forged = mint(
            &ApiKey::new("k1", "some-other-secret-0123456789abcdefghij"),
            &claims("demo"),
        )
        .unwrap();
        assert_eq!(
            v.verify(Some(&forged), Some("demo")),
            Err(TokenError::BadSignature)
        );
        // A tampered payload breaks the signature too.
        let mut parts: Vec<&str> = good.split('.').collect();
        let other = mint(&key("k1"), &claims("other")).unwrap();
        parts[1] = other.split('.').nth(1).unwrap();
        assert_eq!(
            v.verify(Some(&parts.join(".")), Some("other")),
            Err(TokenError::BadSignature)
        );
        let unknown = mint(&key("k9"), &claims("demo")).unwrap();
        assert_eq!(
            v.verify(Some(&unknown), Some("demo")),
            Err(TokenError::UnknownKey("k9".into()))
        );
        let mut expired = claims("demo");
        expired.exp = now - 3600;
        let expired = mint(&key("k1"), &expired).unwrap();
        assert!(matches!(
            v.verify_at(Some(&expired), Some("demo"), now),
            Err(TokenError::Expired(s)) if s >= 3600
        ));
        let mut early = claims("demo");
        early.nbf = Some(now + 3600);
        let early = mint(&key("k1"), &early).unwrap();
        assert!(matches!(
            v.verify_at(Some(&early), Some("demo"), now),
            Err(TokenError::NotYetValid(s)) if s >= 3590
        ));
        assert_eq!(
            v.verify(Some(&good), Some("elsewhere")),
            Err(TokenError::WrongRoom {
                token_room: "demo".into(),
                join_room: "elsewhere".into()
            })
        );
        let mut no_join = claims("demo");
        no_join.grants.room_join = false;
        let no_join = mint(&key("k1"), &no_join).unwrap();
        assert_eq!(
            v.verify(Some(&no_join), Some("demo")),
            Err(TokenError::JoinNotGranted("demo".into()))
        );
    }

    /// Within the leeway a token is still (or already) valid; past it, not.
    #[test]
    fn expiry_and_not_before_allow_clock_skew() {
        let v = verifier();
        let mut c = claims("demo");
        c.exp = 1_000_000;
        c.nbf = Some(999_000);
        let t = mint(&key("k1"), &c).unwrap();
        assert!(
            v.verify_at(Some(&t), None, 1_000_000 + LEEWAY_S - 1)
                .is_ok()
        );
        assert!(v.verify_at(Some(&t), None, 1_000_000 + LEEWAY_S).is_err());
        assert!(v.verify_at(Some(&t), None, 999_000 - LEEWAY_S).is_ok());
        assert!(matches!(
            v.verify_at(Some(&t), None, 999_000 - LEEWAY_S - 1),
            Err(TokenError::NotYetValid(_))
        ));
    }

    /// Timestamps of the wrong JSON type are malformed, never "absent" (the type-confusion
    /// bypass of `nbf`/`exp` checks).
    #[test]
    fn timestamps_of_the_wrong_type_are_malformed() {
        let k = key("k1");
        let enc = EncodingKey::from_secret(k.secret.expose().as_bytes());
        let header = Header::new(Algorithm::HS256);
        let grants = serde_json::json!({"room": "demo", "roomJoin": true});
        for body in [
            serde_json::json!({"iss": "k1", "sub": "a", "exp": "99999999999", "grants": grants}),
            serde_json::json!({"iss": "k1", "sub": "a", "exp": 99_999_999_999u64,
                               "nbf": "99999999999", "grants": grants}),
            serde_json::json!({"iss": "k1", "sub": "a", "grants": grants}),
            serde_json::json!({"iss": "k1", "exp": 99_999_999_999u64, "grants": grants}),
            serde_json::json!({"iss": "k1", "sub": "a", "exp": 99_999_999_999u64}),
            serde_json::json!({"iss": "k1", "sub": "", "exp": 99_999_999_999u64,
                               "grants": grants}),
        ] {
            let t = jsonwebtoken::encode(&header, &body, &enc).unwrap();
            assert!(
                matches!(
                    verifier().verify(Some(&t), None),
                    Err(TokenError::Malformed(_))
                ),
                "{body}"
            );
        }
    }

    #[test]
    fn only_hs256_is_accepted() {
        // `alg: none` with an empty signature.
        let token = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.\
                     eyJpc3MiOiJrMSIsInN1YiI6ImEiLCJleHAiOjk5OTk5OTk5OTk5fQ.";
        assert!(matches!(
            verifier().verify(Some(token), None),
            Err(TokenError::Malformed(_))
        ));
        let c = claims("demo");
        let k = key("k1");
        let t = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &Claims {
                iss: "k1".into(),
                ..c
            },
            &EncodingKey::from_secret(k.secret.expose().as_bytes()),
        )
        .unwrap();
        assert!(matches!(
            verifier().verify(Some(&t), None),
            Err(TokenError::Malformed(m)) if m.contains("HS256")
        ));
    }

    #[test]
    fn development_mode_knows_only_the_development_key() {
        let dev = Verifier::new(KeySet::new());
        assert!(dev.dev_mode());
        let t = dev_token("demo", "bob");
        assert_eq!(dev.verify(Some(&t), Some("demo")).unwrap().identity, "bob");
        assert!(!verifier().dev_mode());
        assert_eq!(
            verifier().verify(Some(&t), Some("demo")),
            Err(TokenError::UnknownKey(DEV_API_KEY.into()))
        );
    }

    #[test]
    fn grant_names_map_to_core_grants() {
        let g = |names: &str| {
            RoomGrants::participant("r")
                .with_names(names.split(','))
                .map(|g| g.to_core())
        };
        assert_eq!(
            g("publish,data,subscribe").unwrap(),
            Grants::default(),
            "the default grants are the core's default"
        );
        let viewer = g("subscribe").unwrap();
        assert!(viewer.subscribe && !viewer.publish_audio && !viewer.publish_video);
        assert!(!viewer.publish_data);
        let audio = g("publish-audio").unwrap();
        assert!(audio.publish_audio && !audio.publish_video && !audio.subscribe);
        let bot = g("hidden,admin,data").unwrap();
        assert!(bot.hidden && bot.room_admin && bot.publish_data && !bot.publish_audio);
        assert!(g("publish,fly").unwrap_err().contains("`fly`"));
        // Absent grants: LiveKit's defaults.
        let absent: RoomGrants =
            serde_json::from_value(serde_json::json!({"room": "r", "roomJoin": true})).unwrap();
        assert_eq!(absent.to_core(), Grants::default());
    }

    #[test]
    fn secrets_are_validated_and_never_shown() {
        assert!(
            ApiKey::new("k", "short")
                .validate()
                .unwrap_err()
                .contains("32")
        );
        assert!(ApiKey::new("", DEV_API_SECRET).validate().is_err());
        assert!(ApiKey::new("a b", DEV_API_SECRET).validate().is_err());
        assert!(mint(&ApiKey::new("k", "short"), &claims("r")).is_err());
        let k = key("k1");
        let shown = format!(
            "{k:?} {:?}",
            Verifier::new([k.clone()].into_iter().collect())
        );
        assert!(!shown.contains(k.secret.expose()), "{shown}");
        assert!(!format!("{:?}", Verifier::new(KeySet::new())).contains(DEV_API_SECRET));
    }
}
