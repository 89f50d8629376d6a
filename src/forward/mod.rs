//! Forwarding: what leaves the gateway for the router.
//!
//! Every identity- or trust-bearing header the client sent is removed, then
//! the gateway's own context is set and signed. The router can then trust
//! `x-tenant-*` and `x-forwarded-*` without parsing a credential.

pub mod context;
pub mod exchange;
pub mod pool;
pub mod upstream;

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
    /// The W3C trace context the router continues, when the request is
    /// traced: it replaces the client's `traceparent` and `tracestate`.
    pub trace: Option<&'a [(String, String)]>,
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

/// The router's head as it goes on the wire, written straight from the
/// client's borrowed head and the gateway's context. Building it as a
/// Pingora `RequestHeader` meant cloning the client's header maps,
/// inserting into them (each insert parses the name and records its case
/// in a second map) and serialising the result (bench/RESULTS.md).
pub struct RouterHead(Vec<u8>);

impl RouterHead {
    /// The head's bytes, ending with the blank line.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Writes one header line. Every name and value goes through here, the
    /// gateway's own too (config, the policy stage and the body supply
    /// them): one that could end the line or forge another is refused.
    fn header(&mut self, name: &[u8], value: &[u8]) -> pingora::Result<()> {
        let token = !name.is_empty() && name.iter().all(|&b| is_token_byte(b));
        // The bytes `http::HeaderValue` accepts. A fold, not `all`: with no
        // early exit the check is vectorised, 4-5x faster on the context's
        // values (a bad value is rare, and refused all the same).
        let text = value.iter().fold(true, |ok, &b| {
            ok & ((b == b'\t') | ((b >= 0x20) & (b != 0x7f)))
        });
        if !token || !text {
            return pingora::Error::e_explain(
                pingora::ErrorType::InvalidHTTPHeader,
                format!(
                    "header {:?} cannot be sent to the router",
                    String::from_utf8_lossy(name)
                ),
            );
        }
        for part in [name, b": ", value, b"\r\n"] {
            self.0.extend_from_slice(part);
        }
        Ok(())
    }
}

/// RFC 9110's `tchar`: the bytes a header name is made of.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Writes the head the router gets: HTTP/1.1 whatever the client spoke,
/// the client's headers in their order and spelling, less those that
/// describe its hop or claim trust, then the gateway's context, signed,
/// and the judged body's length.
///
/// Dropped from the client's: hop-by-hop headers, also spelled with `_`
/// (which nginx and CGI stacks fold into `-`, so `transfer_encoding` could
/// frame the body there), any header `Connection` nominates (except
/// `Host`), `Expect` (the body is already in hand), every trusted header
/// and the authorizer's `strip` names. An HTTP/2 request's `:authority`
/// becomes `Host`. `path` replaces the client's target (an opened id).
pub fn router_head(
    client: &RequestHeader,
    path: Option<&str>,
    ctx: &TrustedContext<'_>,
    signer: &ContextSigner,
    now: u64,
    body_len: usize,
) -> pingora::Result<RouterHead> {
    let target = path.map_or_else(|| client.raw_path(), str::as_bytes);
    // Origin-form only: a space or control byte would split the line.
    if target.is_empty() || target.iter().any(|&b| b <= 0x20 || b == 0x7f) {
        return pingora::Error::e_explain(
            pingora::ErrorType::InvalidHTTPHeader,
            "the request target cannot be sent to the router",
        );
    }
    // The context alone (the signature, the limits) is several hundred
    // bytes: room for a typical head, so it is not grown as it is written.
    let mut head = RouterHead(Vec::with_capacity(1024 + target.len()));
    for part in [
        client.method.as_str().as_bytes(),
        b" ",
        target,
        b" HTTP/1.1\r\n",
    ] {
        head.0.extend_from_slice(part);
    }

    let nominated: Vec<&[u8]> = client
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.eq_ignore_ascii_case(b"host"))
        .collect();
    let dropped = |name: &str| {
        is_hop_by_hop(name)
            || (name.contains('_') && is_hop_by_hop(&name.replace('_', "-")))
            || nominated
                .iter()
                .any(|t| t.eq_ignore_ascii_case(name.as_bytes()))
            || is_trusted_header(name)
            || strips(ctx.strip, name)
            || (ctx.trace.is_some() && matches!(name, "traceparent" | "tracestate"))
    };
    // Pingora keeps the client's spelling of each name, in the map's order.
    let mut spellings = client.case_header_iter();
    for (name, value) in &client.headers {
        let lower = name.as_str();
        let spelled = spellings
            .next()
            .map(|(case, _)| case.as_slice())
            .filter(|case| case.eq_ignore_ascii_case(lower.as_bytes()))
            .unwrap_or(lower.as_bytes());
        if !dropped(lower) {
            head.header(spelled, value.as_bytes())?;
        }
    }
    if client.version == http::Version::HTTP_2 && !client.headers.contains_key(http::header::HOST) {
        // The head stage refused an authority with userinfo.
        let authority = client.uri.authority().map_or("", |a| a.as_str());
        head.header(b"host", authority.as_bytes())?;
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
    let mut signed: Vec<(&str, &str)> = fixed.into_iter().flatten().collect();
    signed.extend(ctx.policy.iter().map(|(n, v)| (n.as_str(), v.as_str())));
    for (name, value) in &signed {
        head.header(name.as_bytes(), value.as_bytes())?;
    }
    // Sorted by name: this order is the signed order.
    signed.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let signed_path = match path {
        Some(p) => p,
        None => client
            .uri
            .path_and_query()
            .map_or_else(|| client.uri.path(), |p| p.as_str()),
    };
    let signature = signer.sign(now, client.method.as_str(), signed_path, &signed);
    head.header(b"x-tenant-signature", signature.as_bytes())?;
    head.header(b"x-forwarded-for", ctx.client_ip.as_bytes())?;
    head.header(b"x-forwarded-proto", ctx.proto.as_bytes())?;
    for (name, value) in ctx.trace.unwrap_or_default() {
        head.header(name.as_bytes(), value.as_bytes())?;
    }
    head.header(b"content-length", body_len.to_string().as_bytes())?;
    head.0.extend_from_slice(b"\r\n");
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The head as the router parses it: method, target, headers in order.
    fn parsed(head: &RouterHead) -> (String, String, Vec<(String, String)>) {
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut slots);
        let n = req.parse(head.as_bytes()).unwrap();
        assert_eq!(n, httparse::Status::Complete(head.as_bytes().len()));
        assert_eq!(req.version, Some(1), "HTTP/1.1");
        let headers = req
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_owned(),
                    String::from_utf8(h.value.to_vec()).unwrap(),
                )
            })
            .collect();
        (
            req.method.unwrap().into(),
            req.path.unwrap().into(),
            headers,
        )
    }

    fn context<'a>(t: &'a Tenant, trace: Option<&'a [(String, String)]>) -> TrustedContext<'a> {
        TrustedContext {
            key_id: None,
            tenant: t,
            request_id: "rid",
            model: Some("m"),
            client_ip: "192.0.2.1",
            proto: "https",
            policy: &[],
            strip: &[],
            trace,
        }
    }

    fn head_for(req: &RequestHeader, ctx: &TrustedContext<'_>) -> pingora::Result<RouterHead> {
        let signer = ContextSigner::from_bytes(&[7u8; 32]).unwrap();
        router_head(req, None, ctx, &signer, 1, 5)
    }

    /// The client's headers that reach the router (not the gateway's own).
    fn clients(headers: &[(String, String)]) -> Vec<&str> {
        headers
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| !n.starts_with("x-tenant-") && !n.starts_with("x-forwarded-"))
            .filter(|n| !matches!(*n, "x-request-id" | "content-length"))
            .collect()
    }

    #[test]
    fn the_router_gets_an_http1_head_without_the_clients_hop_headers() {
        let mut req = RequestHeader::build("POST", b"/v1/chat/completions?x=1", None).unwrap();
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
            ("content-length", "999"),
            ("content_length", "5"),
            ("x_custom", "kept"),
            ("Content-Type", "application/json"),
        ] {
            req.append_header(n, v).unwrap();
        }
        let t = tenant();
        let (method, path, headers) = parsed(&head_for(&req, &context(&t, None)).unwrap());
        assert_eq!(
            (method.as_str(), path.as_str()),
            ("POST", "/v1/chat/completions?x=1")
        );
        assert_eq!(
            clients(&headers),
            ["host", "x_custom", "Content-Type"],
            "nominated and hop headers go (also with `_`), Host stays, spelling kept"
        );
        let lengths: Vec<_> = headers
            .iter()
            .filter(|(n, _)| n == "content-length")
            .collect();
        assert_eq!(
            lengths,
            [&("content-length".to_owned(), "5".to_owned())],
            "the judged body's"
        );

        // HTTP/2 carries the authority as a pseudo-header, not Host.
        let mut h2 = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        h2.set_uri(
            "https://gw.example:8443/v1/chat/completions"
                .parse()
                .unwrap(),
        );
        h2.set_version(http::Version::HTTP_2);
        let (_, path, headers) = parsed(&head_for(&h2, &context(&t, None)).unwrap());
        assert_eq!(path, "/v1/chat/completions");
        assert!(headers.contains(&("host".into(), "gw.example:8443".into())));
    }

    #[test]
    fn the_routers_trace_context_replaces_the_clients_only_when_traced() {
        let mut req = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        req.append_header("traceparent", "00-client-01").unwrap();
        req.append_header("tracestate", "client=1").unwrap();
        let t = tenant();
        let (_, _, untraced) = parsed(&head_for(&req, &context(&t, None)).unwrap());
        assert_eq!(clients(&untraced), ["traceparent", "tracestate"]);
        let ours = [("traceparent".to_owned(), "00-gateway-01".to_owned())];
        let (_, _, traced) = parsed(&head_for(&req, &context(&t, Some(&ours))).unwrap());
        let trace: Vec<_> = traced
            .iter()
            .filter(|(n, _)| n.starts_with("trace"))
            .collect();
        assert_eq!(trace, [&ours[0]]);
    }

    #[test]
    fn a_value_or_target_that_could_split_the_head_is_refused() {
        let req = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        let t = tenant();
        let mut ctx = context(&t, None);
        ctx.model = Some("m\r\nx-tenant-plan: enterprise");
        assert!(head_for(&req, &ctx).is_err());
        let policy = [("x-tenant-policy-a b".to_owned(), "1".to_owned())];
        let mut ctx = context(&t, None);
        ctx.policy = &policy;
        assert!(head_for(&req, &ctx).is_err());
        let signer = ContextSigner::from_bytes(&[7u8; 32]).unwrap();
        let ctx = context(&t, None);
        for path in ["/v1/x HTTP/1.1\r\nx-tenant-id: evil", "/a b", ""] {
            assert!(
                router_head(&req, Some(path), &ctx, &signer, 1, 0).is_err(),
                "{path:?}"
            );
        }
        let opened = router_head(&req, Some("/v1/files/f-1"), &ctx, &signer, 1, 0).unwrap();
        assert_eq!(parsed(&opened).1, "/v1/files/f-1");
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
        Tenant::new("acme", "acme-corp", "free", Limits::each(1), None)
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
            let (_, _, sent) = parsed(&head_for(&req, &context(&t, None)).unwrap());
            for (name, value) in &sent {
                let folded = name.to_ascii_lowercase().replace('_', "-");
                if router_trusts(&folded) {
                    prop_assert!(!value.contains("EVIL"), "{name}: {value:?} survived");
                }
            }
            let ids: Vec<_> = sent.iter().filter(|(n, _)| n == "x-tenant-id").collect();
            prop_assert_eq!(ids, [&("x-tenant-id".to_owned(), "acme".to_owned())]);
        }
    }
}
