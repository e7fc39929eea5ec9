//! Webhook signatures, as LiveKit's: every request carries `Authorization: <JWT>`, an HS256
//! token signed with the API secret, whose `iss` is the API key and whose `sha256` claim is
//! the base64 (standard, padded) SHA-256 of the exact request body. A receiver checks the
//! token with the secret of the key named in `iss` (and `exp`), then hashes the body it got
//! and compares. Retries sign again (a fresh `iat`/`exp`); the body stays the same.

use crate::auth::ApiKey;
use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A signature is valid this long after it was made (seconds).
pub const SIGNATURE_TTL_S: u64 = 300;

/// The claims of a webhook signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookClaims {
    /// The API key whose secret signed it.
    pub iss: String,
    /// Unix seconds when it was signed.
    pub iat: u64,
    /// Unix seconds after which it is refused.
    pub exp: u64,
    /// base64(SHA-256(body)).
    pub sha256: String,
}

/// base64(SHA-256(`body`)).
pub fn body_hash(body: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(body))
}

/// The `Authorization` value for `body`, signed with `key` at `now_s` (Unix seconds).
pub fn sign(key: &ApiKey, body: &[u8], now_s: u64) -> Result<String, String> {
    let claims = WebhookClaims {
        iss: key.key.clone(),
        iat: now_s,
        exp: now_s + SIGNATURE_TTL_S,
        sha256: body_hash(body),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(key.secret.expose().as_bytes()),
    )
    .map_err(|e| e.to_string())
}

/// What a receiver does: check `authorization` against `secret` (HS256, not expired at
/// `now_s`) and `body` against its `sha256` claim. Returns the claims (`iss` names the key).
pub fn verify(
    authorization: &str,
    body: &[u8],
    secret: &str,
    now_s: u64,
) -> Result<WebhookClaims, String> {
    let token = authorization
        .strip_prefix("Bearer ")
        .unwrap_or(authorization);
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_required_spec_claims(&["exp", "iss"]);
    validation.validate_exp = false;
    let data = jsonwebtoken::decode::<WebhookClaims>(
        token,
        &DecodingKey::from_secret(secret.as_bytes()),
        &validation,
    )
    .map_err(|e| format!("bad signature: {e}"))?;
    if data.claims.exp < now_s {
        return Err("expired signature".into());
    }
    if data.claims.sha256 != body_hash(body) {
        return Err("the body does not match the signature's sha256".into());
    }
    Ok(data.claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_and_binds_the_body_key_and_time() {
        let key = ApiKey::new("APIhooks", "0123456789abcdef0123456789abcdef");
        let body = br#"{"event":"room_started"}"#;
        let auth = sign(&key, body, 1_000).unwrap();
        let claims = verify(&auth, body, key.secret.expose(), 1_000).unwrap();
        assert_eq!(claims.iss, "APIhooks");
        assert_eq!(claims.sha256, body_hash(body));
        assert_eq!(claims.exp, 1_000 + SIGNATURE_TTL_S);
        // Bearer-prefixed too.
        assert!(verify(&format!("Bearer {auth}"), body, key.secret.expose(), 1_000).is_ok());
        // Another body, another secret, too late: refused.
        assert!(
            verify(
                &auth,
                br#"{"event":"room_finished"}"#,
                key.secret.expose(),
                1_000
            )
            .is_err()
        );
        assert!(verify(&auth, body, "another-secret-another-secret-xx", 1_000).is_err());
        assert!(
            verify(
                &auth,
                body,
                key.secret.expose(),
                1_000 + SIGNATURE_TTL_S + 1
            )
            .is_err()
        );
    }
}
