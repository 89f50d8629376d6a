//! Sanity checks on the raw request head, before any identity work.
//!
//! The head must fit its limits (414, 431), name its Host, and carry a
//! canonical path: percent-encoding, `.`/`..` segments, empty segments,
//! backslashes and upper case are refused (400 `invalid_path`) rather
//! than normalised, so RBAC and routing decide on exactly the path that is
//! forwarded and no router can read it differently.
//!
//! Pingora accepts a request with both Content-Length and Transfer-Encoding;
//! behind it, a router that reads the other framing would see a second,
//! smuggled request. Such requests are refused here, as are header names
//! that would read as trusted headers once `_` is folded into `-`.

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, Version};
use pingora::http::RequestHeader;

use crate::forward::spoofs_trusted_header;
use crate::reject::{Reject, RejectCode};

/// Bounds on a request head, checked before anything else reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    /// The request target (path and query): 414 above it.
    pub max_request_target: usize,
    /// All header names and values together: 431 above it.
    pub max_header_bytes: usize,
    /// Header fields: 431 above it.
    pub max_headers: usize,
}

impl Default for HeadLimits {
    fn default() -> Self {
        HeadLimits {
            max_request_target: 8 * 1024,
            max_header_bytes: 32 * 1024,
            max_headers: 100,
        }
    }
}

/// Checks the head's size, Host and path; the first problem found is returned.
pub fn check_head(req: &RequestHeader, limits: &HeadLimits) -> Result<(), Reject> {
    if req.raw_path().len() > limits.max_request_target {
        return Err(Reject::new(
            414,
            RejectCode::UriTooLong,
            format!(
                "the request target exceeds {} bytes",
                limits.max_request_target
            ),
        ));
    }
    if req.headers.len() > limits.max_headers {
        return Err(Reject::new(
            431,
            RejectCode::HeadersTooLarge,
            format!("more than {} header fields", limits.max_headers),
        ));
    }
    let header_bytes: usize = req
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    if header_bytes > limits.max_header_bytes {
        return Err(Reject::new(
            431,
            RejectCode::HeadersTooLarge,
            format!("the headers exceed {} bytes", limits.max_header_bytes),
        ));
    }
    // HTTP/1.1 requires Host (RFC 9112 3.2); HTTP/2 carries :authority.
    if req.version == Version::HTTP_11 && req.headers.get_all(HOST).iter().count() != 1 {
        return Err(Reject::bad_request(
            RejectCode::InvalidRequest,
            "an HTTP/1.1 request needs exactly one Host header",
        ));
    }
    // userinfo has no place in a request (RFC 9110 4.2.4); the router's
    // Host is taken from an HTTP/2 request's authority.
    if req
        .uri
        .authority()
        .is_some_and(|a| a.as_str().contains('@'))
    {
        return Err(Reject::bad_request(
            RejectCode::InvalidRequest,
            "the request authority carries userinfo",
        ));
    }
    if !canonical_path(req.uri.path()) {
        return Err(Reject::bad_request(
            RejectCode::InvalidPath,
            "the path is not canonical: no percent-encoding, dot or empty segments, backslashes or upper case",
        ));
    }
    Ok(())
}

/// `/` alone (what load balancers and people try first), or `/` followed
/// by non-empty segments of `[a-z0-9._~-]`, none of them `.` or `..`.
pub fn canonical_path(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    if rest.is_empty() {
        return true;
    }
    rest.split('/').all(|seg| {
        !seg.is_empty()
            && seg != "."
            && seg != ".."
            && seg.bytes().all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'.' | b'_' | b'~' | b'-')
            })
    })
}

/// Checks framing and header names; the first problem found is returned.
///
/// Pingora drops Content-Length from the parsed headers when
/// Transfer-Encoding is present, so `raw_head` (the HTTP/1 request head as
/// received) is consulted in that case only.
pub fn check(headers: &HeaderMap, raw_head: impl FnOnce() -> Option<Bytes>) -> Result<(), Reject> {
    let mut lengths = headers.get_all(CONTENT_LENGTH).iter();
    let first_length = lengths.next();
    if lengths.next().is_some() {
        return Err(framing("repeated Content-Length"));
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        if first_length.is_some() || raw_head().is_some_and(|raw| raw_has_content_length(&raw)) {
            return Err(framing("both Content-Length and Transfer-Encoding"));
        }
        let mut te = headers.get_all(TRANSFER_ENCODING).iter();
        let only_chunked = te
            .next()
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"))
            && te.next().is_none();
        if !only_chunked {
            return Err(framing("Transfer-Encoding other than chunked"));
        }
    }
    if let Some(name) = headers.keys().find(|n| spoofs_trusted_header(n.as_str())) {
        return Err(Reject::bad_request(
            RejectCode::InvalidRequest,
            format!("header {name} spells a gateway-controlled header with underscores"),
        ));
    }
    Ok(())
}

/// Whether a raw HTTP/1 head carries Content-Length; an unparseable head
/// counts as carrying it, so the request is refused rather than guessed at.
fn raw_has_content_length(raw: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(raw) {
        Ok(httparse::Status::Complete(_)) => req
            .headers
            .iter()
            .any(|h| h.name.eq_ignore_ascii_case("content-length")),
        _ => true,
    }
}

fn framing(what: &'static str) -> Reject {
    Reject::bad_request(
        RejectCode::InvalidRequest,
        format!("ambiguous request framing: {what}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(*k, v.parse().unwrap());
        }
        m
    }

    fn no_raw() -> Option<Bytes> {
        None
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        assert!(check(&h(&[("content-length", "3")]), no_raw).is_ok());
        assert!(check(&h(&[("transfer-encoding", "chunked")]), no_raw).is_ok());
        let both = h(&[("content-length", "3"), ("transfer-encoding", "chunked")]);
        assert!(check(&both, no_raw).is_err());
        let twice = h(&[("content-length", "3"), ("content-length", "3")]);
        assert!(check(&twice, no_raw).is_err());
        assert!(check(&h(&[("transfer-encoding", "gzip, chunked")]), no_raw).is_err());
    }

    #[test]
    fn content_length_hidden_by_the_parser_is_found_in_the_raw_head() {
        let te = h(&[("transfer-encoding", "chunked")]);
        let raw = || {
            Some(Bytes::from_static(
                b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            ))
        };
        assert!(check(&te, raw).is_err());
        let clean = || {
            Some(Bytes::from_static(
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            ))
        };
        assert!(check(&te, clean).is_ok());
    }

    #[test]
    fn only_canonical_paths_pass() {
        for ok in ["/", "/v1/chat/completions", "/v1/models", "/a.b/c_d~e-f"] {
            assert!(canonical_path(ok), "{ok}");
        }
        for bad in [
            "",
            "v1/models",
            "//",
            "/.",
            "/%2e",
            "/\\",
            "/v1//models",
            "/v1/models/",
            "/v1/./models",
            "/v1/models/../chat/completions",
            "/v1/chat%2Fcompletions",
            "/v1/%2e%2e/models",
            "/V1/chat/completions",
            "/v1\\models",
            "/v1/models;x",
            "/v1/mod\u{e9}ls",
        ] {
            assert!(!canonical_path(bad), "{bad}");
        }
    }

    #[test]
    fn head_limits_and_host_are_enforced() {
        let limits = HeadLimits {
            max_request_target: 32,
            max_header_bytes: 64,
            max_headers: 3,
        };
        let req = |path: &str, headers: &[(&'static str, &str)]| {
            let mut r = RequestHeader::build("GET", path.as_bytes(), None).unwrap();
            for (n, v) in headers {
                r.append_header(*n, *v).unwrap();
            }
            r
        };
        let host = [("host", "gw")];
        assert!(check_head(&req("/v1/models", &host), &limits).is_ok());
        let code =
            |r: RequestHeader| check_head(&r, &limits).map_err(|e| (e.status, e.code.as_str()));
        assert_eq!(
            code(req(&format!("/v1/models?{}", "a".repeat(32)), &host)),
            Err((414, "uri_too_long"))
        );
        assert_eq!(
            code(req(
                "/v1/models",
                &[("host", "gw"), ("a", "1"), ("b", "2"), ("c", "3")]
            )),
            Err((431, "headers_too_large"))
        );
        assert_eq!(
            code(req("/v1/models", &[("host", "gw"), ("x", &"v".repeat(64))])),
            Err((431, "headers_too_large"))
        );
        assert_eq!(code(req("/v1/models", &[])), Err((400, "invalid_request")));
        assert_eq!(
            code(req("/v1/models", &[("host", "a"), ("host", "b")])),
            Err((400, "invalid_request"))
        );
        assert_eq!(code(req("/v1/./models", &host)), Err((400, "invalid_path")));
        let mut userinfo = req("/v1/models", &host);
        userinfo.set_uri("http://u:p@gw/v1/models".parse().unwrap());
        assert_eq!(code(userinfo), Err((400, "invalid_request")));
    }

    #[test]
    fn underscore_spellings_of_trusted_headers_are_refused() {
        let r = check(&h(&[("x_tenant_id", "evil")]), no_raw).unwrap_err();
        assert_eq!((r.status, r.code.as_str()), (400, "invalid_request"));
        assert!(check(&h(&[("x_custom_thing", "ok")]), no_raw).is_ok());
    }
}
