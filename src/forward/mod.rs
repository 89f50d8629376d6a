//! Forwarding: what leaves the gateway for the router.
//!
//! Every identity- or trust-bearing header the client sent is removed, then
//! the gateway's own context is set and signed. The router can then trust
//! `x-tenant-*` and `x-forwarded-*` without parsing a credential.

pub mod context;
pub mod upstream;

use http::HeaderName;
use pingora::http::RequestHeader;

use crate::config::tenants::Tenant;
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

/// The facts the router is told about a request, all from gateway state.
pub struct TrustedContext<'a> {
    pub tenant: &'a Tenant,
    pub request_id: &'a str,
    /// The model the body stage accepted, when the route has a body.
    pub model: Option<&'a str>,
    pub client_ip: &'a str,
    pub proto: &'static str,
    /// Headers from the policy stage, signed with the rest.
    pub policy: &'a [(String, String)],
    /// Header names only the external authorizer may set: the client's
    /// are removed even when the authorizer sets none.
    pub strip: &'a [String],
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
        .filter(|n| is_trusted_header(n.as_str()) || ctx.strip.iter().any(|s| s == n.as_str()))
        .cloned()
        .collect();
    for name in &doomed {
        req.remove_header(name);
    }

    let t = ctx.tenant;
    let fixed: [Option<(&'static str, &str)>; 6] = [
        Some(("x-request-id", ctx.request_id)),
        Some(("x-tenant-id", &t.id)),
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
}
