//! Identity: turn the credential a request presents into a configured tenant.
//!
//! Only `Authorization: Bearer` and `x-api-key` are read; a Bearer value with
//! exactly two dots is a JWT, anything else an API key. The tenant's plan, org
//! and limits always come from `tenants.toml`, never from the credential.

pub mod api_key;
pub mod jwks;
pub mod jwks_fetch;
pub mod jwt;
pub mod mtls;

use std::sync::Arc;

use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::limits::ScopeLimiter;
use crate::reject::{Reject, RejectCode};
use crate::tenant::{Tenant, Tenants};
use jwks_fetch::JwksRefresh;
use jwt::{JwtVerifier, TokenError, VerifiedToken};

/// How the caller proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityKind {
    Jwt,
    ApiKey,
    Mtls,
}

impl IdentityKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityKind::Jwt => "jwt",
            IdentityKind::ApiKey => "api_key",
            IdentityKind::Mtls => "mtls",
        }
    }
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Identity {
    pub kind: IdentityKind,
    /// JWT `sub`, or a short fingerprint of the API key; safe to log.
    pub subject: Option<String>,
    pub tenant: Arc<Tenant>,
    pub token: Option<Arc<VerifiedToken>>,
    /// The id of the key object the caller presented (`[[tenants.keys]]`).
    pub key_id: Option<String>,
    /// That key's own limits, when it has any.
    pub key_scope: Option<Arc<ScopeLimiter>>,
}

/// A credential as presented, borrowed from the request headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential<'a> {
    Jwt(&'a str),
    ApiKey(&'a str),
}

/// Finds the one credential in the headers. Two credentials, or a repeated
/// credential header, are refused: which one wins would be a guess.
pub fn credential(headers: &HeaderMap) -> Result<Credential<'_>, Reject> {
    let mut auth = headers.get_all(AUTHORIZATION).iter();
    let mut api = headers.get_all(X_API_KEY).iter();
    let (auth, auth_dup) = (auth.next(), auth.next().is_some());
    let (api, api_dup) = (api.next(), api.next().is_some());
    if auth_dup || api_dup {
        return Err(Reject::bad_request(
            RejectCode::InvalidRequest,
            "credential headers must not be repeated",
        ));
    }
    match (auth, api) {
        (Some(_), Some(_)) => Err(Reject::bad_request(
            RejectCode::InvalidRequest,
            "send one credential: Authorization or x-api-key, not both",
        )),
        (None, None) => Err(missing(
            "no credentials: send Authorization: Bearer <token or key>",
        )),
        (None, Some(v)) => {
            let key = text(v)
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .ok_or_else(|| {
                    Reject::unauthorized(RejectCode::InvalidApiKey, "API key is malformed")
                })?;
            Ok(Credential::ApiKey(key))
        }
        (Some(v), None) => {
            let v = text(v).ok_or_else(|| missing("Authorization header is malformed"))?;
            let value = match v.split_once(' ') {
                Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
                _ => return Err(missing("Authorization must use the Bearer scheme")),
            };
            if value.is_empty() {
                return Err(missing("empty Bearer credential"));
            }
            // Two dots make a JWT (counted with memchr: a token is long).
            if memchr::memchr_iter(b'.', value.as_bytes()).count() == 2 {
                Ok(Credential::Jwt(value))
            } else {
                Ok(Credential::ApiKey(value))
            }
        }
    }
}

const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// The value as text, if it is visible ASCII (or tabs), as
/// `HeaderValue::to_str` takes it. Checked with a fold that has no early
/// exit, so it is vectorised: a bearer JWT is most of a request's head,
/// and `to_str` looks at it one byte at a time.
fn text(v: &HeaderValue) -> Option<&str> {
    let b = v.as_bytes();
    let visible = b.iter().fold(true, |ok, &c| {
        ok & ((c == b'\t') | (0x20..0x7f).contains(&c))
    });
    visible.then(|| std::str::from_utf8(b).ok()).flatten()
}

fn missing(msg: &'static str) -> Reject {
    Reject::unauthorized(RejectCode::MissingCredentials, msg)
}

/// Resolves the request's identity from its credential and, on TLS, its
/// client certificate. A certificate naming a tenant authenticates on its
/// own; with a credential as well, both must name the same tenant.
pub fn resolve(
    auth: &Authenticator,
    tenants: &Tenants,
    headers: &HeaderMap,
    cert: Option<&mtls::CertIdentity>,
    now: u64,
) -> Result<Identity, Reject> {
    let Some(cert) = cert else {
        return auth.authenticate(tenants, credential(headers)?, now);
    };
    let by_cert = cert.names.iter().find_map(|n| tenants.by_mtls_identity(n));
    let has_credential = headers.contains_key(AUTHORIZATION) || headers.contains_key("x-api-key");
    match (by_cert, has_credential) {
        (Some(tenant), true) => {
            let who = auth.authenticate(tenants, credential(headers)?, now)?;
            if who.tenant.id != tenant.id {
                return Err(Reject::forbidden(
                    RejectCode::IdentityMismatch,
                    "the client certificate and the credential name different tenants",
                ));
            }
            Ok(who)
        }
        (Some(tenant), false) => Ok(Identity {
            kind: IdentityKind::Mtls,
            subject: cert.names.first().cloned(),
            tenant: tenant.clone(),
            token: None,
            key_id: None,
            key_scope: None,
        }),
        (None, _) if cert.required => Err(Reject::forbidden(
            RejectCode::UnknownTenant,
            "the client certificate names no configured tenant",
        )),
        (None, true) => auth.authenticate(tenants, credential(headers)?, now),
        (None, false) => Err(Reject::unauthorized(
            RejectCode::UnknownTenant,
            "the client certificate names no configured tenant",
        )),
    }
}

/// The verifiers built for one configuration snapshot.
pub struct Authenticator {
    pub jwt: Option<JwtVerifier>,
    /// Present when keys come from a URL: an unknown `kid` asks it to refresh.
    pub jwks_refresh: Option<Arc<JwksRefresh>>,
}

impl Authenticator {
    /// Resolves a credential to a tenant at unix time `now`.
    pub fn authenticate(
        &self,
        tenants: &Tenants,
        cred: Credential<'_>,
        now: u64,
    ) -> Result<Identity, Reject> {
        match cred {
            Credential::Jwt(token) => {
                let verifier = self.jwt.as_ref().ok_or_else(|| {
                    Reject::unauthorized(
                        RejectCode::InvalidToken,
                        "JWT authentication is not enabled",
                    )
                })?;
                let verified = verifier.verify(token, now).inspect_err(|e| {
                    if *e == TokenError::UnknownKid {
                        if let Some(r) = &self.jwks_refresh {
                            r.request();
                        }
                    }
                });
                let verified = verified.map_err(TokenError::reject)?;
                let tenant = tenants.by_id(&verified.tenant).ok_or_else(|| {
                    Reject::unauthorized(
                        RejectCode::UnknownTenant,
                        "token names no configured tenant",
                    )
                })?;
                if !tenant.jwt_subjects.is_empty()
                    && !verified
                        .subject
                        .as_ref()
                        .is_some_and(|s| tenant.jwt_subjects.contains(s))
                {
                    return Err(Reject::unauthorized(
                        RejectCode::InvalidToken,
                        "token subject is not bound to its tenant",
                    ));
                }
                Ok(Identity {
                    kind: IdentityKind::Jwt,
                    subject: verified.subject.clone(),
                    tenant: tenant.clone(),
                    token: Some(verified),
                    key_id: None,
                    key_scope: None,
                })
            }
            Credential::ApiKey(key) => {
                if key.len() > api_key::MAX_KEY_BYTES {
                    return Err(Reject::unauthorized(
                        RejectCode::InvalidApiKey,
                        "API key is malformed",
                    ));
                }
                let digest = api_key::digest(key);
                let (tenant, object) = tenants.by_api_key_hash(&digest).ok_or_else(|| {
                    Reject::unauthorized(RejectCode::InvalidApiKey, "API key is not valid")
                })?;
                if let Some(k) = object {
                    if k.disabled {
                        return Err(Reject::unauthorized(
                            RejectCode::InvalidApiKey,
                            "API key is disabled",
                        ));
                    }
                    if k.expires_at.is_some_and(|t| now >= t) {
                        return Err(Reject::unauthorized(
                            RejectCode::InvalidApiKey,
                            "API key has expired",
                        ));
                    }
                }
                Ok(Identity {
                    kind: IdentityKind::ApiKey,
                    subject: Some(format!("key:{}", hex::encode(&digest[..4]))),
                    tenant: tenant.clone(),
                    token: None,
                    key_id: object.map(|k| k.id.clone()),
                    key_scope: object.and_then(|k| k.limiter.clone()),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn credential_text_is_taken_exactly_as_to_str_takes_it() {
        // Every byte, alone and inside a token-like value.
        for b in 0..=255u8 {
            for bytes in [vec![b], [b"Bearer a.b".as_slice(), &[b], b".c"].concat()] {
                let Ok(v) = HeaderValue::from_bytes(&bytes) else {
                    continue;
                };
                assert_eq!(text(&v), v.to_str().ok(), "byte {b:#04x}");
            }
        }
        // Valid UTF-8 is still not visible ASCII.
        let v = HeaderValue::from_str("Bearer \u{e9}.b.c").unwrap();
        assert_eq!((text(&v), v.to_str().ok()), (None, None));
    }

    #[test]
    fn two_dots_make_a_jwt() {
        let h = headers(&[("authorization", "Bearer a.b.c")]);
        assert_eq!(credential(&h).unwrap(), Credential::Jwt("a.b.c"));
        let h = headers(&[("authorization", "bearer pcl_abc")]);
        assert_eq!(credential(&h).unwrap(), Credential::ApiKey("pcl_abc"));
        let h = headers(&[("authorization", "Bearer a.b.c.d")]);
        assert_eq!(credential(&h).unwrap(), Credential::ApiKey("a.b.c.d"));
        let h = headers(&[("x-api-key", "a.b.c")]);
        assert_eq!(credential(&h).unwrap(), Credential::ApiKey("a.b.c"));
    }

    #[test]
    fn ambiguous_or_missing_credentials_are_refused() {
        let r = credential(&headers(&[])).unwrap_err();
        assert_eq!((r.status, r.code.as_str()), (401, "missing_credentials"));
        let r = credential(&headers(&[("authorization", "Basic dXNlcjpwYXNz")])).unwrap_err();
        assert_eq!((r.status, r.code.as_str()), (401, "missing_credentials"));
        let r = credential(&headers(&[
            ("authorization", "Bearer a"),
            ("authorization", "Bearer b"),
        ]))
        .unwrap_err();
        assert_eq!((r.status, r.code.as_str()), (400, "invalid_request"));
        let r = credential(&headers(&[
            ("authorization", "Bearer a"),
            ("x-api-key", "b"),
        ]))
        .unwrap_err();
        assert_eq!((r.status, r.code.as_str()), (400, "invalid_request"));
    }
}
