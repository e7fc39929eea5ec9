//! TURN credentials for clients: the TURN REST API scheme that coturn verifies with
//! `use-auth-secret` / `static-auth-secret`.
//!
//! Plaza does not relay media itself. A TURN server (coturn) relays it for clients that cannot
//! reach Plaza's UDP ports directly (strict firewalls, UDP blocked, only TCP/TLS 443 open).
//! Plaza and coturn share one secret; for every join Plaza hands the client time-limited
//! credentials in `joined.ice_servers`:
//!
//! - username = `<expiry, unix seconds>:<participant id>`,
//! - credential = base64(HMAC-SHA1(shared secret, username)).
//!
//! coturn recomputes the HMAC from the username and its copy of the secret and refuses the
//! username once the expiry has passed, so nothing is stored or synchronised between the two.
//! The participant id in the username lets an operator match coturn's allocation log lines
//! with Plaza's (its log lines carry `participant=PA_…`). `docs/TURN.md` describes a
//! deployment.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha1::Sha1;

use crate::auth::Secret;
use crate::signal::{IceServer, ServerMessage};

/// Default lifetime of the TURN credentials handed out at join (a day: a call longer than
/// this keeps its relay until the allocation needs a refresh, then loses it; a rejoin gets
/// fresh credentials).
pub const DEFAULT_TURN_TTL: Duration = Duration::from_secs(86_400);
/// Shortest and longest accepted credential lifetime, in seconds.
pub const TURN_TTL_RANGE_S: (u64, u64) = (60, 30 * 86_400);
/// Shortest accepted shared secret, in bytes.
pub const MIN_TURN_SECRET: usize = 16;

/// The ICE servers Plaza hands to every joining client: STUN URLs and TURN URLs with
/// credentials derived from the shared secret. Empty (the default): `joined` carries none.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct IceConfig {
    /// `turn:` / `turns:` URLs of the TURN server (coturn), in the order clients should try.
    pub turn_urls: Vec<String>,
    /// The secret shared with coturn (`static-auth-secret`); required with `turn_urls`.
    pub turn_secret: Option<Secret>,
    /// How long the credentials stay valid from the join on.
    pub turn_ttl: Duration,
    /// `stun:` URLs handed out without credentials.
    pub stun_urls: Vec<String>,
}

impl IceConfig {
    /// No STUN, no TURN.
    pub fn none() -> Self {
        IceConfig {
            turn_ttl: DEFAULT_TURN_TTL,
            ..IceConfig::default()
        }
    }

    /// Whether any ICE server is configured.
    pub fn is_empty(&self) -> bool {
        self.turn_urls.is_empty() && self.stun_urls.is_empty()
    }

    /// The ICE servers for `user` (the participant id) joining at `now`: one entry with every
    /// TURN URL and its credentials, one with the STUN URLs. Empty when nothing is configured.
    pub fn ice_servers(&self, user: &str, now: SystemTime) -> Vec<IceServer> {
        let mut out = Vec::new();
        if let (false, Some(secret)) = (self.turn_urls.is_empty(), &self.turn_secret) {
            let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
            let expiry = since_epoch
                .as_secs()
                .saturating_add(self.turn_ttl.as_secs());
            let username = username(expiry, user);
            let credential = credential(secret.expose().as_bytes(), &username);
            out.push(IceServer {
                urls: self.turn_urls.clone(),
                username: Some(username),
                credential: Some(credential),
            });
        }
        if !self.stun_urls.is_empty() {
            out.push(IceServer {
                urls: self.stun_urls.clone(),
                username: None,
                credential: None,
            });
        }
        out
    }

    /// `joined` with this configuration's ICE servers for `user` joining at `now` added
    /// (anything else passes through unchanged).
    pub fn add_to_joined(
        &self,
        mut msg: ServerMessage,
        user: &str,
        now: SystemTime,
    ) -> ServerMessage {
        if self.is_empty() {
            return msg;
        }
        if let ServerMessage::Joined { ice_servers, .. } = &mut msg {
            ice_servers.extend(self.ice_servers(user, now));
        }
        msg
    }

    /// Check the URLs, the secret and the lifetime; the message names the setting.
    pub fn validate(&self) -> Result<(), String> {
        for url in &self.turn_urls {
            check_url(url, &["turn:", "turns:"]).map_err(|e| format!("--turn-url {e}"))?;
        }
        for url in &self.stun_urls {
            check_url(url, &["stun:", "stuns:"]).map_err(|e| format!("--stun-url {e}"))?;
        }
        match (&self.turn_secret, self.turn_urls.is_empty()) {
            (None, false) => {
                return Err(
                    "--turn-url (PLAZA_TURN_URLS) is set without --turn-secret (PLAZA_TURN_SECRET)"
                        .to_owned(),
                );
            }
            (Some(_), true) => {
                return Err(
                    "--turn-secret (PLAZA_TURN_SECRET) is set without --turn-url (PLAZA_TURN_URLS)"
                        .to_owned(),
                );
            }
            (Some(s), false) if s.expose().len() < MIN_TURN_SECRET => {
                return Err(format!(
                    "--turn-secret must be at least {MIN_TURN_SECRET} bytes, got {} \
                     (openssl rand -base64 32)",
                    s.expose().len()
                ));
            }
            _ => {}
        }
        let (lo, hi) = TURN_TTL_RANGE_S;
        let ttl = self.turn_ttl.as_secs();
        if !(lo..=hi).contains(&ttl) || self.turn_ttl.subsec_nanos() != 0 {
            return Err(format!(
                "--turn-ttl must be whole seconds between {lo} and {hi}, got {} s",
                self.turn_ttl.as_secs_f64()
            ));
        }
        Ok(())
    }
}

/// A STUN/TURN URL (RFC 7064 / RFC 7065): one of `schemes`, a host, an optional port and
/// optionally `?transport=udp|tcp`.
fn check_url(url: &str, schemes: &[&str]) -> Result<(), String> {
    let Some(rest) = schemes.iter().find_map(|s| url.strip_prefix(s)) else {
        return Err(format!("{url:?} must start with {}", schemes.join(" or ")));
    };
    let (hostport, query) = match rest.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (rest, None),
    };
    let host = if let Some(v6) = hostport.strip_prefix('[') {
        let Some((addr, after)) = v6.split_once(']') else {
            return Err(format!("{url:?}: unclosed `[` in the host"));
        };
        check_port(url, after)?;
        addr
    } else {
        match hostport.rsplit_once(':') {
            Some((h, port)) => {
                check_port(url, &format!(":{port}"))?;
                h
            }
            None => hostport,
        }
    };
    if host.is_empty()
        || host
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '/' | '@' | ',' | '?' | '#'))
    {
        return Err(format!("{url:?}: missing or invalid host"));
    }
    if let Some(q) = query {
        if !schemes[0].starts_with("turn") {
            return Err(format!("{url:?}: a STUN URL takes no `?` parameters"));
        }
        if !matches!(q, "transport=udp" | "transport=tcp") {
            return Err(format!(
                "{url:?}: the only parameter is `?transport=udp` or `?transport=tcp`"
            ));
        }
    }
    Ok(())
}

/// `after` is empty or `:port` with port 1 … 65535.
fn check_port(url: &str, after: &str) -> Result<(), String> {
    if after.is_empty() {
        return Ok(());
    }
    match after.strip_prefix(':').map(str::parse::<u16>) {
        Some(Ok(p)) if p != 0 => Ok(()),
        _ => Err(format!("{url:?}: invalid port")),
    }
}

/// The TURN REST API username: `<expiry unix seconds>:<user>`.
pub fn username(expiry_unix: u64, user: &str) -> String {
    format!("{expiry_unix}:{user}")
}

/// The TURN REST API password for `username`: base64(HMAC-SHA1(secret, username)).
pub fn credential(secret: &[u8], username: &str) -> String {
    // HMAC takes a key of any length.
    let mut mac = <Hmac<Sha1> as Mac>::new_from_slice(secret).expect("HMAC accepts any key");
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // the tests read the clock
mod tests {
    use super::*;

    const SECRET: &str = "north-wind-turn-secret";

    fn config() -> IceConfig {
        IceConfig {
            turn_urls: vec![
                "turn:turn.example.com:3478?transport=udp".into(),
                "turn:turn.example.com:3478?transport=tcp".into(),
                "turns:turn.example.com:443?transport=tcp".into(),
            ],
            turn_secret: Some(Secret::new(SECRET)),
            turn_ttl: Duration::from_secs(3600),
            stun_urls: Vec::new(),
        }
    }

    /// Expected values computed independently:
    /// `echo -n '1767225600:PA_alice' | openssl dgst -sha1 -hmac north-wind-turn-secret -binary | base64`
    /// and Python's `base64.b64encode(hmac.new(b'Jefe', b'1700000000:bob', hashlib.sha1).digest())`.
    #[test]
    fn credential_known_answers() {
        assert_eq!(
            credential(SECRET.as_bytes(), "1767225600:PA_alice"),
            "+kn9i5UfGTz5OVbwN0+Dg67qmQ4="
        );
        assert_eq!(
            credential(b"Jefe", "1700000000:bob"),
            "8YbMhw9YsrcPDXyaiqL7p4Y9bEM="
        );
        // Another username, another credential.
        assert_ne!(
            credential(SECRET.as_bytes(), "1767225601:PA_alice"),
            "+kn9i5UfGTz5OVbwN0+Dg67qmQ4="
        );
    }

    #[test]
    fn ice_servers_carry_expiry_and_credential() {
        let now = UNIX_EPOCH + Duration::from_secs(1_767_222_000);
        let servers = config().ice_servers("PA_alice", now);
        assert_eq!(servers.len(), 1);
        let s = &servers[0];
        assert_eq!(s.urls.len(), 3);
        assert_eq!(s.username.as_deref(), Some("1767225600:PA_alice"));
        assert_eq!(
            s.credential.as_deref(),
            Some("+kn9i5UfGTz5OVbwN0+Dg67qmQ4=")
        );

        let with_stun = IceConfig {
            stun_urls: vec!["stun:stun.example.com:3478".into()],
            ..config()
        };
        let servers = with_stun.ice_servers("PA_alice", now);
        assert_eq!(servers.len(), 2);
        assert_eq!(servers[1].urls, ["stun:stun.example.com:3478"]);
        assert_eq!(
            (&servers[1].username, &servers[1].credential),
            (&None, &None)
        );
        // The browser's RTCIceServer shape.
        let json = serde_json::to_value(&servers).unwrap();
        assert_eq!(
            json,
            serde_json::json!([
                {
                    "urls": [
                        "turn:turn.example.com:3478?transport=udp",
                        "turn:turn.example.com:3478?transport=tcp",
                        "turns:turn.example.com:443?transport=tcp"
                    ],
                    "username": "1767225600:PA_alice",
                    "credential": "+kn9i5UfGTz5OVbwN0+Dg67qmQ4="
                },
                { "urls": ["stun:stun.example.com:3478"] }
            ])
        );
    }

    #[test]
    fn nothing_configured_adds_nothing() {
        let none = IceConfig::none();
        assert!(none.is_empty());
        none.validate().unwrap();
        assert!(none.ice_servers("PA_x", SystemTime::now()).is_empty());
        let joined = ServerMessage::Joined {
            protocol: 1,
            server_version: "t".into(),
            room: "r".into(),
            participant_id: "PA_x".into(),
            participants: Vec::new(),
            max_data_message: 1,
            resume_token: None,
            resume_grace_ms: None,
            ice_servers: Vec::new(),
            input_tick_hz: 0,
            session_id: None,
            node_id: None,
        };
        let text =
            serde_json::to_string(&none.add_to_joined(joined.clone(), "PA_x", SystemTime::now()))
                .unwrap();
        assert!(!text.contains("ice_servers"), "{text}");
        // Configured: `joined` gets them, and only `joined` does.
        let added = config().add_to_joined(joined, "PA_x", SystemTime::now());
        let ServerMessage::Joined { ice_servers, .. } = &added else {
            panic!("{added:?}")
        };
        assert_eq!(ice_servers.len(), 1);
        let user = ice_servers[0].username.as_deref().unwrap();
        let (expiry, who) = user.split_once(':').unwrap();
        assert_eq!(who, "PA_x");
        let expiry: u64 = expiry.parse().unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(
            (now + 3599..=now + 3601).contains(&expiry),
            "{expiry} vs {now}"
        );
        assert_eq!(
            ice_servers[0].credential.as_deref().unwrap(),
            credential(SECRET.as_bytes(), user)
        );
        let pong = ServerMessage::pong(None, std::time::SystemTime::UNIX_EPOCH);
        assert_eq!(
            config().add_to_joined(pong.clone(), "PA_x", SystemTime::now()),
            pong
        );
    }

    #[test]
    fn urls_are_checked() {
        for good in [
            "turn:turn.example.com",
            "turn:203.0.113.7:3478?transport=udp",
            "turn:[2001:db8::1]:3478?transport=tcp",
            "turns:turn.example.com:443?transport=tcp",
        ] {
            check_url(good, &["turn:", "turns:"]).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        check_url("stun:stun.example.com:3478", &["stun:", "stuns:"]).unwrap();
        for bad in [
            "http://turn.example.com",
            "turn:",
            "turn:host:0",
            "turn:host:99999",
            "turn:host:3478?transport=sctp",
            "turn:[2001:db8::1:3478",
            "turn:user@host",
            "stun:host",
        ] {
            assert!(check_url(bad, &["turn:", "turns:"]).is_err(), "{bad}");
        }
        assert!(check_url("stun:host?transport=udp", &["stun:", "stuns:"]).is_err());
    }

    #[test]
    fn settings_are_validated() {
        config().validate().unwrap();
        let no_secret = IceConfig {
            turn_secret: None,
            ..config()
        };
        assert!(
            no_secret
                .validate()
                .unwrap_err()
                .contains("without --turn-secret")
        );
        let no_url = IceConfig {
            turn_urls: Vec::new(),
            ..config()
        };
        assert!(
            no_url
                .validate()
                .unwrap_err()
                .contains("without --turn-url")
        );
        let short = IceConfig {
            turn_secret: Some(Secret::new("tooshort")),
            ..config()
        };
        let e = short.validate().unwrap_err();
        assert!(
            e.contains("at least 16 bytes") && !e.contains("tooshort"),
            "{e}"
        );
        for ttl in [0, 59, 30 * 86_400 + 1] {
            let c = IceConfig {
                turn_ttl: Duration::from_secs(ttl),
                ..config()
            };
            assert!(c.validate().unwrap_err().contains("--turn-ttl"), "{ttl}");
        }
        let stun_only = IceConfig {
            stun_urls: vec!["stun:stun.example.com".into()],
            ..IceConfig::none()
        };
        stun_only.validate().unwrap();
        assert!(!stun_only.is_empty());
        assert!(!format!("{:?}", config()).contains(SECRET));
    }
}
