//! Tenant-bound Responses ids.
//!
//! A router that keeps Responses objects in one store answers any id it is
//! given, whoever asks. So the router's ids never reach a client as they
//! are: the gateway hands out `resp_` + the original id sealed with
//! AES-256-GCM-SIV, with the tenant id as associated data. Only the same
//! tenant's bound id opens again; another tenant's, a forged or an altered
//! one does not, and the request stops with 404 `response_not_found`.
//!
//! The binding is stateless (any instance with the same context-signing key
//! opens it, after a restart too) and deterministic: the nonce is an HMAC
//! of the tenant and the id, so every event of one stream carries the same
//! bound id. GCM-SIV stays safe under a repeated nonce; equal ids seal
//! equally, which is the point. The text is lowercase base32, because
//! canonical paths have no upper case.

use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use data_encoding::BASE32_NOPAD;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

/// What every bound id starts with, as the router's ids do.
pub const PREFIX: &str = "resp_";

/// The longest bound id handed out.
pub const MAX_BOUND_LEN: usize = 256;

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// The longest router id that still binds within [`MAX_BOUND_LEN`].
pub const MAX_ROUTER_ID_LEN: usize = (MAX_BOUND_LEN - PREFIX.len()) * 5 / 8 - NONCE_LEN - TAG_LEN;

/// Seals and opens ids with keys derived from the context-signing key.
#[derive(Clone)]
pub struct ResponseIds {
    cipher: Aes256GcmSiv,
    nonce: Hmac<Sha256>,
}

impl std::fmt::Debug for ResponseIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResponseIds")
    }
}

fn derive(key: &[u8], label: &[u8]) -> Result<[u8; 32], String> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).map_err(|e| e.to_string())?;
    mac.update(label);
    Ok(mac.finalize().into_bytes().into())
}

impl ResponseIds {
    /// Keys for ids from the context-signing key: separate from the
    /// signature's, so neither use can stand in for the other.
    pub fn from_key(key: &[u8]) -> Result<ResponseIds, String> {
        let enc = derive(key, b"portcullis-response-id-v1 seal")?;
        let nonce = derive(key, b"portcullis-response-id-v1 nonce")?;
        Ok(ResponseIds {
            cipher: Aes256GcmSiv::new(&enc.into()),
            nonce: <Hmac<Sha256> as Mac>::new_from_slice(&nonce).map_err(|e| e.to_string())?,
        })
    }

    /// The bound form of the router's `id` for `tenant`; `None` for an id
    /// too long to bind.
    pub fn bind(&self, tenant: &str, id: &str) -> Option<String> {
        if id.len() > MAX_ROUTER_ID_LEN {
            return None;
        }
        let mut mac = self.nonce.clone();
        mac.update(&(tenant.len() as u64).to_be_bytes());
        mac.update(tenant.as_bytes());
        mac.update(id.as_bytes());
        let digest = mac.finalize().into_bytes();
        let nonce = Nonce::from_slice(&digest[..NONCE_LEN]);
        let sealed = self
            .cipher
            .encrypt(
                nonce,
                Payload {
                    msg: id.as_bytes(),
                    aad: tenant.as_bytes(),
                },
            )
            .ok()?;
        let mut raw = Vec::with_capacity(NONCE_LEN + sealed.len());
        raw.extend_from_slice(nonce);
        raw.extend_from_slice(&sealed);
        let mut out = String::with_capacity(MAX_BOUND_LEN);
        out.push_str(PREFIX);
        out.push_str(&BASE32_NOPAD.encode(&raw).to_ascii_lowercase());
        Some(out)
    }

    /// The router's id behind `bound`, when `tenant` is the one it was
    /// bound to and it is unaltered.
    pub fn open(&self, tenant: &str, bound: &str) -> Option<String> {
        let text = bound.strip_prefix(PREFIX)?;
        if bound.len() > MAX_BOUND_LEN
            || !text.bytes().all(|b| matches!(b, b'a'..=b'z' | b'2'..=b'7'))
        {
            return None;
        }
        let raw = BASE32_NOPAD
            .decode(text.to_ascii_uppercase().as_bytes())
            .ok()?;
        if raw.len() < NONCE_LEN + TAG_LEN {
            return None;
        }
        let (nonce, sealed) = raw.split_at(NONCE_LEN);
        let id = self
            .cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: tenant.as_bytes(),
                },
            )
            .ok()?;
        String::from_utf8(id).ok()
    }
}

/// The keys and the tenant of one request: what its answer's ids are
/// bound to, and what its bound ids must open for.
#[derive(Clone, Copy)]
pub struct Binding<'a> {
    ids: &'a ResponseIds,
    tenant: &'a str,
}

impl<'a> Binding<'a> {
    pub fn new(ids: &'a ResponseIds, tenant: &'a str) -> Self {
        Binding { ids, tenant }
    }

    /// The bound form of a router id for this tenant.
    pub fn bind(&self, id: &str) -> Option<String> {
        self.ids.bind(self.tenant, id)
    }

    /// The router's id behind a bound id the client sent.
    pub fn open(&self, bound: &str) -> Option<String> {
        self.ids.open(self.tenant, bound)
    }

    /// Binds a Responses object's `id` and `previous_response_id` in
    /// place; returns whether anything changed. An id too long to bind is
    /// left as it is: the client cannot use it, and nobody else can either.
    pub fn bind_members(&self, object: &mut Value) -> bool {
        let mut changed = false;
        for member in ["id", "previous_response_id"] {
            let Some(slot) = object.get_mut(member) else {
                continue;
            };
            let Some(id) = slot.as_str() else { continue };
            match self.bind(id) {
                Some(bound) => {
                    *slot = Value::String(bound);
                    changed = true;
                }
                None => tracing::warn!(member, "a router id too long to bind passed unbound"),
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bound_id_opens_only_for_its_tenant_and_only_unaltered() {
        let ids = ResponseIds::from_key(&[7u8; 32]).unwrap();
        let router_id = "resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452e3a6a0";
        let bound = ids.bind("acme", router_id).unwrap();
        assert!(bound.starts_with(PREFIX) && bound.len() <= MAX_BOUND_LEN);
        assert!(crate::inbound::canonical_path(&format!(
            "/v1/responses/{bound}"
        )));
        assert_eq!(ids.bind("acme", router_id).as_deref(), Some(bound.as_str()));
        assert_eq!(ids.open("acme", &bound).as_deref(), Some(router_id));
        assert_eq!(ids.open("globex", &bound), None);
        assert_eq!(ids.open("acme", router_id), None, "an unbound id");
        assert_ne!(ids.bind("globex", router_id), Some(bound.clone()));
        // Every single-character change is refused.
        for i in PREFIX.len()..bound.len() {
            let mut b = bound.clone().into_bytes();
            b[i] = if b[i] == b'a' { b'b' } else { b'a' };
            let altered = String::from_utf8(b).unwrap();
            assert_eq!(ids.open("acme", &altered), None, "{altered}");
        }
        let other_key = ResponseIds::from_key(&[8u8; 32]).unwrap();
        assert_eq!(other_key.open("acme", &bound), None);
    }

    #[test]
    fn the_longest_router_id_binds_within_the_bound() {
        let ids = ResponseIds::from_key(&[7u8; 32]).unwrap();
        let longest = "x".repeat(MAX_ROUTER_ID_LEN);
        let bound = ids.bind("t", &longest).unwrap();
        assert!(bound.len() <= MAX_BOUND_LEN, "{}", bound.len());
        assert_eq!(ids.open("t", &bound).as_deref(), Some(longest.as_str()));
        assert_eq!(ids.bind("t", &format!("{longest}x")), None);
    }
}
