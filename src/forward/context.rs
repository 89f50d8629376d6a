//! The trusted context the router receives, and its signature.
//!
//! The router trusts `x-tenant-*` only because the gateway strips whatever
//! the client sent and signs what it sets. The signature is HMAC-SHA256 with
//! the `[context] signing_key_file` key over a canonical string:
//!
//! ```text
//! portcullis-context-v1\n<t>\n<METHOD>\n<path?query>\n<name>:<value>\n...
//! ```
//!
//! with one `name:value` line for each header named in `h`, in that order.
//! The header is `x-tenant-signature: t=<unix>,h=<name;name;...>,v1=<hex>`.
//! `docs/context.md` shows a verifier in a few lines.

use std::fmt::Write;
use std::path::Path;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The signing key must carry at least this much entropy.
pub const MIN_KEY_BYTES: usize = 32;

const DOMAIN: &str = "portcullis-context-v1";

/// An HMAC key prepared once per snapshot; cloning the keyed state per
/// request skips re-hashing the key.
#[derive(Clone)]
pub struct ContextSigner {
    mac: Hmac<Sha256>,
}

/// Reads a key file holding at least 32 bytes written as hex. The key
/// signs the context and, through keys derived from it, binds Responses ids
/// ([`crate::ids`]).
pub fn read_key(path: &Path) -> Result<Vec<u8>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read file: {e}"))?;
    hex::decode(text.trim())
        .map_err(|_| "signing key must be hex (at least 64 hex digits)".to_string())
}

impl ContextSigner {
    pub fn from_bytes(key: &[u8]) -> Result<Self, String> {
        if key.len() < MIN_KEY_BYTES {
            return Err(format!(
                "signing key has {} bytes; at least {MIN_KEY_BYTES} are required",
                key.len()
            ));
        }
        let mac = Hmac::<Sha256>::new_from_slice(key).map_err(|e| e.to_string())?;
        Ok(ContextSigner { mac })
    }

    /// The `x-tenant-signature` value over `headers` (already in the order
    /// they are to be listed) for a request at unix time `t`.
    pub fn sign(&self, t: u64, method: &str, path: &str, headers: &[(&str, &str)]) -> String {
        // The value is written as the MAC is fed, into one string (writing
        // to a `String` cannot fail).
        let mut value = String::with_capacity(96 + 24 * headers.len());
        let _ = write!(value, "t={t}");
        let mut mac = self.mac.clone();
        for part in [DOMAIN, &value[2..], method, path] {
            mac.update(part.as_bytes());
            mac.update(b"\n");
        }
        value.push_str(",h=");
        for (i, (name, header)) in headers.iter().enumerate() {
            mac.update(name.as_bytes());
            mac.update(b":");
            mac.update(header.as_bytes());
            mac.update(b"\n");
            if i > 0 {
                value.push(';');
            }
            value.push_str(name);
        }
        let _ = write!(value, ",v1={:x}", mac.finalize().into_bytes());
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_keys_are_refused() {
        assert!(ContextSigner::from_bytes(&[7u8; 31]).is_err());
        assert!(ContextSigner::from_bytes(&[7u8; 32]).is_ok());
    }

    #[test]
    fn signature_matches_an_independent_hmac_of_the_canonical_string() {
        let key = [9u8; 32];
        let s = ContextSigner::from_bytes(&key).unwrap();
        let v = s.sign(
            1700000000,
            "POST",
            "/v1/x",
            &[("x-request-id", "r1"), ("x-tenant-id", "acme")],
        );
        let canonical =
            "portcullis-context-v1\n1700000000\nPOST\n/v1/x\nx-request-id:r1\nx-tenant-id:acme\n";
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
        mac.update(canonical.as_bytes());
        let want = hex::encode(mac.finalize().into_bytes());
        assert_eq!(
            v,
            format!("t=1700000000,h=x-request-id;x-tenant-id,v1={want}")
        );
        let other = s.sign(
            1700000000,
            "POST",
            "/v1/x",
            &[("x-request-id", "r1"), ("x-tenant-id", "evil")],
        );
        assert_ne!(v, other);
    }
}
