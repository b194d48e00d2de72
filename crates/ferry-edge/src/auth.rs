//! User authentication: an HS256 JWT names the user (`sub`), the tenant and the shared
//! channels the user may read (`channels`, subject filters). A user's own channel is
//! `user.<sub>` (and anything under it); no claim can open another user's channel.

use ferry_proto::{Subject, SubjectFilter};
use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

/// The claims of a user token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The user id.
    pub sub: String,
    /// The tenant the user belongs to.
    #[serde(default)]
    pub tenant: String,
    /// Shared channels (subject filters) the user may subscribe to.
    #[serde(default)]
    pub channels: Vec<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// The user's locale for templates (e.g. "fr").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locale: Option<String>,
    /// Attributes templates may read as `user` (e.g. {"name": "Ana"}).
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub attrs: serde_json::Value,
}

/// Why a token or a subscription was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    /// No token in the request.
    #[error("no token: send ?token=… or an Authorization: Bearer header")]
    Missing,
    /// The token did not verify or has expired.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The channel is not a valid subject.
    #[error("{0}")]
    BadChannel(String),
    /// The user may not read this channel.
    #[error("channel {channel} is not allowed for user {user}")]
    Forbidden {
        /// The channel asked for.
        channel: String,
        /// The user asking.
        user: String,
    },
}

/// Verifies tokens with one shared secret.
#[derive(Clone)]
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authenticator(HS256)")
    }
}

/// A verified user.
#[derive(Debug, Clone)]
pub struct User {
    /// The claims.
    pub claims: Claims,
    shared: Vec<SubjectFilter>,
}

impl Authenticator {
    /// Verifies HS256 tokens signed with `secret`.
    pub fn new(secret: &[u8]) -> Self {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.leeway = 5;
        Self {
            key: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// Verifies a token.
    pub fn verify(&self, token: Option<&str>) -> Result<User, AuthError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(AuthError::Missing)?;
        let data = decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        User::from_claims(data.claims)
    }
}

impl User {
    /// A user from claims already verified (a token's, or a webhook registration's).
    pub fn from_claims(claims: Claims) -> Result<Self, AuthError> {
        if claims.sub.is_empty() || claims.sub.contains(['.', '*', '>']) {
            return Err(AuthError::Invalid(format!(
                "sub {:?} is not a usable user id (empty, or has '.', '*' or '>')",
                claims.sub
            )));
        }
        let shared = claims
            .channels
            .iter()
            .map(|c| SubjectFilter::new(c.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| AuthError::Invalid(format!("channels claim: {e}")))?;
        Ok(User { claims, shared })
    }

    /// The user id.
    pub fn id(&self) -> &str {
        &self.claims.sub
    }

    /// Checks that this user may subscribe to `channel`.
    pub fn may_read(&self, channel: &str) -> Result<(), AuthError> {
        Subject::new(channel).map_err(|e| AuthError::BadChannel(e.to_string()))?;
        let forbidden = || AuthError::Forbidden {
            channel: channel.to_string(),
            user: self.claims.sub.clone(),
        };
        let mut tokens = channel.split('.');
        if tokens.next() == Some("user") {
            // Per-user channels belong to their user only, whatever the claims say.
            return if tokens.next() == Some(self.claims.sub.as_str()) {
                Ok(())
            } else {
                Err(forbidden())
            };
        }
        if self.shared.iter().any(|f| f.matches(channel)) {
            Ok(())
        } else {
            Err(forbidden())
        }
    }
}

/// Signs a token (for `ferry edge token`, tests and benchmarks).
pub fn sign(secret: &[u8], claims: &Claims) -> Result<String, AuthError> {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .map_err(|e| AuthError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(sub: &str, channels: &[&str], exp: u64) -> Claims {
        Claims {
            sub: sub.into(),
            tenant: "acme".into(),
            channels: channels.iter().map(|c| c.to_string()).collect(),
            exp,
            locale: None,
            attrs: serde_json::Value::Null,
        }
    }

    fn far() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600
    }

    #[test]
    fn a_user_reads_their_own_channel_and_listed_shared_ones_only() {
        let auth = Authenticator::new(b"secret");
        let token = sign(b"secret", &claims("42", &["news.*", "user.7"], far())).unwrap();
        let user = auth.verify(Some(&token)).unwrap();
        assert_eq!(user.id(), "42");
        assert!(user.may_read("user.42").is_ok());
        assert!(user.may_read("user.42.orders").is_ok());
        assert!(user.may_read("news.sport").is_ok());
        // Listing another user's channel in the claims does not open it.
        assert!(matches!(
            user.may_read("user.7"),
            Err(AuthError::Forbidden { .. })
        ));
        assert!(user.may_read("user.420").is_err());
        assert!(user.may_read("billing").is_err());
        assert!(matches!(
            user.may_read("bad..subject"),
            Err(AuthError::BadChannel(_))
        ));
    }

    #[test]
    fn missing_forged_and_expired_tokens_are_refused() {
        let auth = Authenticator::new(b"secret");
        assert_eq!(auth.verify(None).unwrap_err(), AuthError::Missing);
        let forged = sign(b"other", &claims("1", &[], far())).unwrap();
        assert!(matches!(
            auth.verify(Some(&forged)),
            Err(AuthError::Invalid(_))
        ));
        let expired = sign(b"secret", &claims("1", &[], 1_000)).unwrap();
        assert!(matches!(
            auth.verify(Some(&expired)),
            Err(AuthError::Invalid(_))
        ));
        let dotted = sign(b"secret", &claims("1.2", &[], far())).unwrap();
        assert!(auth.verify(Some(&dotted)).is_err());
        assert!(auth.verify(Some("not-a-jwt")).is_err());
    }
}
