//! JWKS parsing into a key set where every key is pinned to one algorithm.
//!
//! The algorithm comes from the key (its `alg`, or its type and curve), never
//! from a token: that closes the classic RS256→HS256 confusion, where an
//! attacker signs with HMAC using the RSA public key as the secret.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};

/// One verification key and the only algorithm it may verify.
pub struct PinnedKey {
    pub kid: Option<String>,
    pub alg: Algorithm,
    pub key: DecodingKey,
}

/// Hands every parsed key set a distinct generation.
static GENERATIONS: AtomicU64 = AtomicU64::new(1);

/// The loaded verification keys.
#[derive(Default)]
pub struct KeySet {
    keys: Vec<PinnedKey>,
    by_kid: HashMap<String, usize>,
    /// Distinct per parsed document, so verified-token caches can tell when
    /// the keys behind an entry were replaced (a key may have been revoked).
    generation: u64,
}

impl KeySet {
    /// Parses a JWKS document. Keys for encryption (`use: enc`) and keys
    /// whose algorithm is not in `allowed` are skipped; a malformed key or a
    /// duplicate `kid` fails the whole document, so a broken file is never
    /// half-applied.
    pub fn from_json(text: &[u8], allowed: &[Algorithm]) -> Result<KeySet, String> {
        let doc: serde_json::Value =
            serde_json::from_slice(text).map_err(|e| format!("JWKS is not valid JSON: {e}"))?;
        let keys = doc
            .get("keys")
            .and_then(|k| k.as_array())
            .ok_or("JWKS must be an object with a \"keys\" array")?;
        let mut set = KeySet {
            generation: GENERATIONS.fetch_add(1, Ordering::Relaxed),
            ..KeySet::default()
        };
        for (i, raw) in keys.iter().enumerate() {
            if raw.get("use").and_then(|u| u.as_str()) == Some("enc") {
                continue;
            }
            let jwk: Jwk =
                serde_json::from_value(raw.clone()).map_err(|e| format!("JWKS key #{i}: {e}"))?;
            let alg = pinned_algorithm(&jwk).map_err(|e| format!("JWKS key #{i}: {e}"))?;
            if !allowed.contains(&alg) {
                continue;
            }
            let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("JWKS key #{i}: {e}"))?;
            let kid = jwk.common.key_id.clone();
            if let Some(k) = &kid {
                if set.by_kid.insert(k.clone(), set.keys.len()).is_some() {
                    return Err(format!("JWKS key #{i}: duplicate kid {k:?}"));
                }
            }
            set.keys.push(PinnedKey { kid, alg, key });
        }
        Ok(set)
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Chooses the key for a token. A `kid` is looked up only among loaded
    /// keys, with no fallback; without a `kid`, exactly one key may fit the
    /// token's algorithm. The key's pinned algorithm must equal the token's.
    pub fn select(&self, kid: Option<&str>, alg: Algorithm) -> Result<&PinnedKey, &'static str> {
        let key = match kid {
            Some(kid) => {
                let i = self.by_kid.get(kid).ok_or("token kid is not a known key")?;
                &self.keys[*i]
            }
            None => {
                let mut fitting = self.keys.iter().filter(|k| k.alg == alg);
                match (fitting.next(), fitting.next()) {
                    (Some(k), None) => k,
                    (None, _) => return Err("no key for the token's algorithm"),
                    (Some(_), Some(_)) => return Err("token has no kid and several keys fit"),
                }
            }
        };
        if key.alg != alg {
            return Err("token algorithm does not match its key");
        }
        Ok(key)
    }
}

/// The one algorithm a JWK may verify: its declared `alg`, which must agree
/// with the key type, or else the type's only supported algorithm.
fn pinned_algorithm(jwk: &Jwk) -> Result<Algorithm, String> {
    let by_type = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            Algorithm::ES256
        }
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
            Algorithm::EdDSA
        }
        AlgorithmParameters::OctetKey(_) => Algorithm::HS256,
        _ => return Err("unsupported key type or curve".into()),
    };
    match jwk.common.key_algorithm {
        None => Ok(by_type),
        Some(declared) => {
            let declared = match declared {
                KeyAlgorithm::RS256 => Algorithm::RS256,
                KeyAlgorithm::ES256 => Algorithm::ES256,
                KeyAlgorithm::EdDSA => Algorithm::EdDSA,
                KeyAlgorithm::HS256 => Algorithm::HS256,
                other => return Err(format!("unsupported alg {other:?}")),
            };
            if declared == by_type {
                Ok(declared)
            } else {
                Err(format!("alg {declared:?} does not fit the key type"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [Algorithm; 4] = [
        Algorithm::RS256,
        Algorithm::ES256,
        Algorithm::EdDSA,
        Algorithm::HS256,
    ];

    fn oct(kid: &str) -> serde_json::Value {
        serde_json::json!({"kty": "oct", "kid": kid, "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTMyYg"})
    }

    #[test]
    fn kid_lookup_has_no_fallback() {
        let doc = serde_json::json!({"keys": [oct("a")]});
        let set = KeySet::from_json(doc.to_string().as_bytes(), &ALL).unwrap();
        assert!(set.select(Some("a"), Algorithm::HS256).is_ok());
        assert!(set.select(Some("b"), Algorithm::HS256).is_err());
        assert!(set
            .select(Some("../../etc/passwd"), Algorithm::HS256)
            .is_err());
        assert!(set.select(None, Algorithm::HS256).is_ok(), "one key fits");
        assert!(
            set.select(Some("a"), Algorithm::RS256).is_err(),
            "alg is pinned"
        );
    }

    #[test]
    fn no_kid_needs_exactly_one_fitting_key() {
        let doc = serde_json::json!({"keys": [oct("a"), oct("b")]});
        let set = KeySet::from_json(doc.to_string().as_bytes(), &ALL).unwrap();
        assert!(set.select(None, Algorithm::HS256).is_err());
    }

    #[test]
    fn declared_alg_must_fit_the_key_type() {
        let mut k = oct("a");
        k["alg"] = "RS256".into();
        let doc = serde_json::json!({"keys": [k]});
        assert!(KeySet::from_json(doc.to_string().as_bytes(), &ALL).is_err());
    }

    #[test]
    fn disallowed_algorithms_and_enc_keys_are_skipped() {
        let mut enc = oct("e");
        enc["use"] = "enc".into();
        let doc = serde_json::json!({"keys": [oct("a"), enc]});
        let set = KeySet::from_json(doc.to_string().as_bytes(), &[Algorithm::RS256]).unwrap();
        assert!(set.is_empty());
        let set = KeySet::from_json(doc.to_string().as_bytes(), &ALL).unwrap();
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn duplicate_kids_fail_the_document() {
        let doc = serde_json::json!({"keys": [oct("a"), oct("a")]});
        assert!(KeySet::from_json(doc.to_string().as_bytes(), &ALL).is_err());
    }
}
