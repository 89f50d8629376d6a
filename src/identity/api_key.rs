//! API keys: issued as `pcl_` plus 40 hex digits, stored only as SHA-256.
//!
//! A key has 160 random bits, so a fast unsalted hash is safe to store and
//! lets the request path find the tenant with one hash-map lookup.

use rand::RngCore;
use sha2::{Digest, Sha256};

/// Keys longer than this are refused without hashing.
pub const MAX_KEY_BYTES: usize = 256;

/// A fresh key, to be shown once to the operator.
pub fn generate() -> String {
    let mut raw = [0u8; 20];
    rand::rng().fill_bytes(&mut raw);
    format!("pcl_{}", hex::encode(raw))
}

pub fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The `tenants.toml` form of a key: `sha256:<hex>`.
pub fn hash_entry(key: &str) -> String {
    format!("sha256:{}", hex::encode(digest(key)))
}

/// Parses `sha256:<64 hex>` into the digest bytes.
pub fn parse_key_hash(s: &str) -> Option<[u8; 32]> {
    let hex_part = s.strip_prefix("sha256:")?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_the_documented_shape() {
        let k = generate();
        assert_eq!(k.len(), 44);
        assert!(k.starts_with("pcl_"));
        assert!(k[4..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(k, generate());
    }

    #[test]
    fn hash_entries_parse_back_to_the_digest() {
        let k = generate();
        assert_eq!(parse_key_hash(&hash_entry(&k)), Some(digest(&k)));
    }
}
