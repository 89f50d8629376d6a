//! Forwarding: what leaves the gateway for the router.
//!
//! Every identity- or trust-bearing header the client sent is removed, then
//! the gateway's own context is set and signed. The router can then trust
//! `x-tenant-*` and `x-forwarded-*` without parsing a credential.

pub mod context;
pub mod exchange;
pub mod pool;
pub mod upstream;

use http::HeaderName;
use pingora::http::RequestHeader;

use crate::tenant::Tenant;
use context::ContextSigner;

/// True for a (lower-case) header name that only the gateway may set.
pub fn is_trusted_header(name: &str) -> bool {
    matches!(
        name,
        "authorization"
            | "proxy-authorization"
            | "x-api-key"
            | "forwarded"
            | "x-real-ip"
            | "x-request-id"
    ) || name.starts_with("x-tenant-")
        || name.starts_with("x-forwarded-")
}

/// True when a header name with underscores would read as a trusted header
/// to a server that folds `_` into `-` (nginx, CGI and WSGI stacks do).
pub fn spoofs_trusted_header(name: &str) -> bool {
    name.contains('_') && is_trusted_header(&name.replace('_', "-"))
}

/// Whether `name` is one of the authorizer-owned `strip` names, also when
/// spelled with `_` (which nginx and CGI stacks fold into `-`).
fn strips(strip: &[String], name: &str) -> bool {
    !strip.is_empty()
        && strip.iter().any(|s| {
            s.len() == name.len()
                && s.bytes()
                    .zip(name.bytes())
                    .all(|(a, b)| a == b || (a == b'-' && b == b'_'))
        })
}

/// The facts the router is told about a request, all from gateway state.
pub struct TrustedContext<'a> {
    pub tenant: &'a Tenant,
    pub request_id: &'a str,
    /// The model the body stage accepted, when the route has a body.
    pub model: Option<&'a str>,
    /// The key object the caller presented, if it was one.
    pub key_id: Option<&'a str>,
    pub client_ip: &'a str,
    pub proto: &'static str,
    /// Headers from the policy stage, signed with the rest.
    pub policy: &'a [(String, String)],
    /// Header names only the external authorizer may set: the client's
    /// are removed even when the authorizer sets none.
    pub strip: &'a [String],
}

/// Headers that describe one hop, never the request: the gateway's own
/// connection to the router has its own (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 11] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "http2-settings",
    "expect",
    "content-length",
];

/// Whether a (lower-case) header name describes one hop only.
pub fn is_hop_by_hop(name: &str) -> bool {
    HOP_BY_HOP.contains(&name)
}

/// Makes the client's head an HTTP/1.1 head for the router, whatever the
/// client spoke: hop-by-hop headers go, also spelled with `_` (which
/// nginx and CGI stacks fold into `-`, so `transfer_encoding` could frame
/// the body there), with any header `Connection` nominates (except
/// `Host`), and an HTTP/2 request's `:authority` becomes `Host`. The body
/// is the gateway's, so its framing is set afterwards; `Expect` goes too,
/// because the body is already in hand.
pub fn for_h1_router(req: &mut RequestHeader) -> pingora::Result<()> {
    let nominated = req
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok())
        .filter(|n| n != http::header::HOST);
    let folded = req
        .headers
        .keys()
        .filter(|n| n.as_str().contains('_') && is_hop_by_hop(&n.as_str().replace('_', "-")))
        .cloned();
    let doomed: Vec<HeaderName> = nominated.chain(folded).collect();
    for name in doomed.iter().map(HeaderName::as_str).chain(HOP_BY_HOP) {
        req.remove_header(name);
    }
    if req.version == http::Version::HTTP_2 && !req.headers.contains_key(http::header::HOST) {
        // The head stage refused an authority with userinfo.
        let authority = req
            .uri
            .authority()
            .map_or_else(String::new, |a| a.to_string());
        req.insert_header(http::header::HOST, authority)?;
    }
    req.set_version(http::Version::HTTP_11);
    Ok(())
}

/// Removes the client's trusted headers and sets the gateway's, signed.
pub fn apply(
    req: &mut RequestHeader,
    ctx: &TrustedContext<'_>,
    signer: &ContextSigner,
    now: u64,
) -> pingora::Result<()> {
    let doomed: Vec<HeaderName> = req
        .headers
        .keys()
        .filter(|n| is_trusted_header(n.as_str()) || strips(ctx.strip, n.as_str()))
        .cloned()
        .collect();
    for name in &doomed {
        req.remove_header(name);
    }

    let t = ctx.tenant;
    let fixed: [Option<(&'static str, &str)>; 7] = [
        Some(("x-request-id", ctx.request_id)),
        Some(("x-tenant-id", &t.id)),
        ctx.key_id.map(|k| ("x-tenant-key-id", k)),
        Some(("x-tenant-limits", &t.limits_header)),
        ctx.model.map(|m| ("x-tenant-model", m)),
        Some(("x-tenant-org", &t.org)),
        Some(("x-tenant-plan", &t.plan)),
    ];
    let fixed: Vec<(&'static str, &str)> = fixed.into_iter().flatten().collect();
    let mut signed: Vec<(&str, &str)> = fixed.clone();
    signed.extend(ctx.policy.iter().map(|(n, v)| (n.as_str(), v.as_str())));
    // Sorted by name: this order is the signed order.
    signed.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let path = req
        .uri
        .path_and_query()
        .map_or_else(|| req.uri.path(), |p| p.as_str());
    let signature = signer.sign(now, req.method.as_str(), path, &signed);
    for (name, value) in fixed {
        req.insert_header(name, value)?;
    }
    for (name, value) in ctx.policy {
        req.insert_header(name.clone(), value.as_str())?;
    }
    req.insert_header("x-tenant-signature", signature)?;
    req.insert_header("x-forwarded-for", ctx.client_ip)?;
    req.insert_header("x-forwarded-proto", ctx.proto)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_router_gets_an_http1_head_without_the_clients_hop_headers() {
        let mut req = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        for (n, v) in [
            ("host", "gw"),
            ("connection", "keep-alive, X-Debug, host"),
            ("x-debug", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("expect", "100-continue"),
            ("transfer-encoding", "chunked"),
            ("transfer_encoding", "chunked"),
            ("content_length", "5"),
            ("x_custom", "kept"),
            ("content-type", "application/json"),
        ] {
            req.append_header(n, v).unwrap();
        }
        for_h1_router(&mut req).unwrap();
        let mut left: Vec<&str> = req.headers.keys().map(|n| n.as_str()).collect();
        left.sort_unstable();
        assert_eq!(
            left,
            ["content-type", "host", "x_custom"],
            "nominated and hop headers go (also with `_`), Host stays"
        );
        assert_eq!(req.version, http::Version::HTTP_11);

        // HTTP/2 carries the authority as a pseudo-header, not Host.
        let mut h2 = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        h2.set_uri(
            "https://gw.example:8443/v1/chat/completions"
                .parse()
                .unwrap(),
        );
        h2.set_version(http::Version::HTTP_2);
        for_h1_router(&mut h2).unwrap();
        assert_eq!(h2.headers.get("host").unwrap(), "gw.example:8443");
        assert_eq!(h2.version, http::Version::HTTP_11);
    }

    #[test]
    fn trusted_headers_cover_every_spelling_a_client_can_send() {
        for n in [
            "authorization",
            "x-api-key",
            "x-tenant-id",
            "x-tenant-admin",
            "x-forwarded-for",
            "forwarded",
        ] {
            assert!(is_trusted_header(n), "{n}");
        }
        for n in ["content-type", "x-tenantid", "accept"] {
            assert!(!is_trusted_header(n), "{n}");
        }
        assert!(spoofs_trusted_header("x_tenant_id"));
        assert!(spoofs_trusted_header("x-tenant_plan"));
        assert!(spoofs_trusted_header("x_forwarded_for"));
        assert!(!spoofs_trusted_header("x_custom"));
    }

    use crate::reject::Reject;
    use crate::tenant::{Limits, Tenant};
    use proptest::prelude::*;

    fn tenant() -> Tenant {
        let limits = Limits {
            requests_per_second: 1.0,
            burst: 1,
            tokens_per_minute: 1,
            tokens_per_day: 1,
            max_concurrency: 1,
            max_body_bytes: 1,
            max_prompt_tokens: 1,
            max_output_tokens: 1,
        };
        Tenant::new("acme", "acme-corp", "free", limits, None)
    }

    /// Header names a client might try: trusted ones in any case and with
    /// `_` for `-`, near misses, and arbitrary tokens.
    fn client_name() -> impl Strategy<Value = String> {
        let trusted = prop::sample::select(vec![
            "x-tenant-id",
            "x-tenant-plan",
            "x-tenant-org",
            "x-tenant-limits",
            "x-tenant-model",
            "x-tenant-signature",
            "x-tenant-policy-tier",
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-request-id",
            "x-real-ip",
            "forwarded",
            "authorization",
            "x-api-key",
        ]);
        // Underscores are rare: a head with one is refused outright, and
        // the property is about the heads that pass.
        let spelled =
            (trusted, prop::collection::vec(any::<(bool, u8)>(), 24)).prop_map(|(name, flips)| {
                name.chars()
                    .zip(flips.iter().cycle())
                    .map(|(c, (upper, roll))| match c {
                        '-' if *roll < 8 => '_',
                        c if *upper => c.to_ascii_uppercase(),
                        c => c,
                    })
                    .collect::<String>()
            });
        prop_oneof![spelled, "[a-zA-Z][a-zA-Z0-9_-]{0,20}"]
    }

    /// What a router behind the gateway trusts, written out independently
    /// of `is_trusted_header` so the property checks it.
    fn router_trusts(name: &str) -> bool {
        name.starts_with("x-tenant-")
            || name.starts_with("x-forwarded-")
            || matches!(
                name,
                "x-real-ip"
                    | "forwarded"
                    | "x-request-id"
                    | "authorization"
                    | "proxy-authorization"
                    | "x-api-key"
            )
    }

    proptest! {
        /// Whatever headers a client sends, either the head check refuses
        /// them, or no client value survives in a header the router trusts.
        #[test]
        fn no_client_header_reaches_the_router_as_trusted(
            headers in prop::collection::vec((client_name(), 0u32..1000), 0..12),
        ) {
            let mut req = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
            let mut map = http::HeaderMap::new();
            for (name, n) in &headers {
                let value = format!("EVIL{n}");
                req.append_header(name.clone(), value.as_str()).unwrap();
                map.append(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
            }
            let refused: Result<(), Reject> = crate::inbound::check(&map, || None);
            prop_assume!(refused.is_ok());
            let t = tenant();
            let signer = ContextSigner::from_bytes(&[7u8; 32]).unwrap();
            let ctx = TrustedContext {
                key_id: None,
                tenant: &t,
                request_id: "rid",
                model: Some("m"),
                client_ip: "192.0.2.1",
                proto: "https",
                policy: &[],
                strip: &[],
            };
            apply(&mut req, &ctx, &signer, 1).unwrap();
            for (name, value) in req.headers.iter() {
                let folded = name.as_str().replace('_', "-");
                if router_trusts(&folded) {
                    prop_assert!(
                        !value.to_str().unwrap_or("").contains("EVIL"),
                        "{name}: {value:?} survived"
                    );
                }
            }
            prop_assert_eq!(req.headers.get("x-tenant-id").unwrap(), "acme");
        }
    }
}
