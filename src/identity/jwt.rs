//! JWT verification: pinned keys, strict claims, and a cache of verified
//! tokens so a busy client does not pay for a signature check per request.
//!
//! The token header's `jku`, `x5u` and `jwk` members are never read: keys
//! come only from the configured JWKS.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use jsonwebtoken::{decode, decode_header, Algorithm, Validation};
use quick_cache::sync::Cache;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::jwks::KeySet;
use crate::reject::{Reject, RejectCode};

/// Where the JWT verification keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    File(PathBuf),
    Url(String),
}

#[derive(Debug, Clone)]
pub struct JwtConfig {
    pub issuer: String,
    pub audiences: Vec<String>,
    pub jwks: JwksSource,
    pub tenant_claim: String,
    pub leeway_seconds: u64,
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    pub jwks_refresh: Duration,
    /// The shortest gap between refreshes prompted by unknown `kid`s.
    pub jwks_unknown_kid_refresh: Duration,
    pub token_cache_entries: usize,
}

/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// What a verified token says, kept in the cache until `exp`.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    pub tenant: String,
    pub subject: Option<String>,
    pub exp: u64,
    /// The key set that verified it; a cache hit under other keys re-verifies.
    pub key_generation: u64,
    /// All claims, for policies that read scopes and the like.
    pub claims: Arc<Map<String, Value>>,
}

/// Verifies bearer JWTs against the configured issuer, audiences and keys.
pub struct JwtVerifier {
    keys: Arc<ArcSwap<KeySet>>,
    tenant_claim: String,
    leeway: u64,
    /// One prepared `Validation` per accepted algorithm.
    validations: Vec<(Algorithm, Validation)>,
    cache: Cache<[u8; 32], Arc<VerifiedToken>>,
}

/// Why a token was refused, kept apart from the client-facing message so a
/// caller can tell an unknown `kid` (which may prompt a JWKS refresh).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenError {
    Invalid(&'static str),
    UnknownKid,
}

impl TokenError {
    pub fn reject(self) -> Reject {
        let msg = match self {
            TokenError::Invalid(m) => m,
            TokenError::UnknownKid => "token kid is not a known key",
        };
        Reject::unauthorized(RejectCode::InvalidToken, msg)
    }
}

impl JwtVerifier {
    pub fn new(cfg: &JwtConfig, keys: Arc<ArcSwap<KeySet>>) -> Self {
        let validations = cfg
            .algorithms
            .iter()
            .map(|&alg| {
                let mut v = Validation::new(alg);
                v.leeway = cfg.leeway_seconds;
                v.validate_exp = true;
                v.validate_nbf = true;
                v.set_issuer(&[cfg.issuer.as_str()]);
                v.set_audience(&cfg.audiences);
                v.set_required_spec_claims(&["exp", "iss", "aud"]);
                (alg, v)
            })
            .collect();
        JwtVerifier {
            keys,
            tenant_claim: cfg.tenant_claim.clone(),
            leeway: cfg.leeway_seconds,
            validations,
            cache: Cache::new(cfg.token_cache_entries.max(1)),
        }
    }

    /// Verifies `token` at unix time `now`.
    pub fn verify(&self, token: &str, now: u64) -> Result<Arc<VerifiedToken>, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Invalid("token exceeds 8 KiB"));
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let keys = self.keys.load();
        if let Some(hit) = self.cache.get(&digest) {
            if hit.key_generation == keys.generation() {
                if now <= hit.exp.saturating_add(self.leeway) {
                    return Ok(hit);
                }
                self.cache.remove(&digest);
                return Err(TokenError::Invalid("token has expired"));
            }
        }

        let header = decode_header(token).map_err(|_| TokenError::Invalid("malformed token"))?;
        if header.crit.is_some() {
            return Err(TokenError::Invalid(
                "token uses unsupported critical headers",
            ));
        }
        let validation = self
            .validations
            .iter()
            .find(|(alg, _)| *alg == header.alg)
            .map(|(_, v)| v)
            .ok_or(TokenError::Invalid("token algorithm is not accepted"))?;
        let key = keys
            .select(header.kid.as_deref(), header.alg)
            .map_err(|e| {
                if header.kid.is_some() && e == "token kid is not a known key" {
                    TokenError::UnknownKid
                } else {
                    TokenError::Invalid(e)
                }
            })?;
        let data = decode::<Map<String, Value>>(token, &key.key, validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind::*;
            TokenError::Invalid(match e.kind() {
                ExpiredSignature => "token has expired",
                ImmatureSignature => "token is not valid yet (nbf)",
                InvalidIssuer => "token issuer is not accepted",
                InvalidAudience => "token audience is not accepted",
                MissingRequiredClaim(_) => "token lacks a required claim (exp, iss, aud)",
                InvalidSignature => "token signature is invalid",
                _ => "token could not be verified",
            })
        })?;
        let claims = data.claims;
        let tenant = match claims.get(&self.tenant_claim) {
            Some(Value::String(t)) if !t.is_empty() => t.clone(),
            _ => return Err(TokenError::Invalid("token has no tenant claim")),
        };
        // `exp` is required and was validated; JSON allows it as a float.
        let exp = claims
            .get("exp")
            .and_then(|v| v.as_u64().or_else(|| v.as_f64().map(|f| f as u64)))
            .unwrap_or(0);
        let subject = claims.get("sub").and_then(Value::as_str).map(str::to_owned);
        let verified = Arc::new(VerifiedToken {
            tenant,
            subject,
            exp,
            key_generation: keys.generation(),
            claims: Arc::new(claims),
        });
        self.cache.insert(digest, verified.clone());
        Ok(verified)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev::{mint, DevJwtKey, MintRequest};
    use std::time::Duration;

    fn setup() -> (JwtVerifier, Arc<ArcSwap<KeySet>>, DevJwtKey) {
        let dev = DevJwtKey::generate("k").unwrap();
        let set = KeySet::from_json(dev.jwks.to_string().as_bytes(), &[Algorithm::EdDSA]).unwrap();
        let keys = Arc::new(ArcSwap::from_pointee(set));
        let cfg = JwtConfig {
            issuer: "iss".into(),
            audiences: vec!["aud".into()],
            jwks: JwksSource::File("unused".into()),
            tenant_claim: "tenant".into(),
            leeway_seconds: 0,
            algorithms: vec![Algorithm::EdDSA],
            jwks_refresh: Duration::from_secs(60),
            jwks_unknown_kid_refresh: Duration::from_secs(10),
            token_cache_entries: 16,
        };
        (JwtVerifier::new(&cfg, keys.clone()), keys, dev)
    }

    fn token(dev: &DevJwtKey, ttl: u64) -> String {
        let req = MintRequest {
            tenant: "acme",
            subject: "s",
            issuer: "iss",
            audience: "aud",
            kid: "k",
            ttl_seconds: ttl,
            scope: "",
        };
        mint(dev.private_pem.as_bytes(), &req).unwrap()
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    #[test]
    fn a_second_verification_is_a_cache_hit() {
        let (v, _, dev) = setup();
        let t = token(&dev, 60);
        let first = v.verify(&t, now()).unwrap();
        let second = v.verify(&t, now()).unwrap();
        assert!(Arc::ptr_eq(&first, &second), "second call re-verified");
    }

    #[test]
    fn cached_tokens_still_expire() {
        let (v, _, dev) = setup();
        let t = token(&dev, 60);
        v.verify(&t, now()).unwrap();
        assert_eq!(
            v.verify(&t, now() + 61).unwrap_err(),
            TokenError::Invalid("token has expired")
        );
    }

    #[test]
    fn replacing_the_keys_invalidates_cached_tokens() {
        let (v, keys, dev) = setup();
        let t = token(&dev, 60);
        v.verify(&t, now()).unwrap();
        // The key is revoked: a new key set without it.
        let other = DevJwtKey::generate("other").unwrap();
        keys.store(Arc::new(
            KeySet::from_json(other.jwks.to_string().as_bytes(), &[Algorithm::EdDSA]).unwrap(),
        ));
        assert_eq!(v.verify(&t, now()).unwrap_err(), TokenError::UnknownKid);
    }

    #[test]
    fn oversized_tokens_are_refused_before_parsing() {
        let (v, _, _) = setup();
        let t = "a".repeat(MAX_TOKEN_BYTES + 1);
        assert_eq!(
            v.verify(&t, now()).unwrap_err(),
            TokenError::Invalid("token exceeds 8 KiB")
        );
    }
}
