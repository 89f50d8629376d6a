//! Sanity checks on the raw request head, before any identity work.
//!
//! Pingora accepts a request with both Content-Length and Transfer-Encoding;
//! behind it, a router that reads the other framing would see a second,
//! smuggled request. Such requests are refused here, as are header names
//! that would read as trusted headers once `_` is folded into `-`.

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::HeaderMap;

use crate::forward::spoofs_trusted_header;
use crate::reject::Reject;

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
            "invalid_request",
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
        "invalid_request",
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
    fn underscore_spellings_of_trusted_headers_are_refused() {
        let r = check(&h(&[("x_tenant_id", "evil")]), no_raw).unwrap_err();
        assert_eq!((r.status, r.code), (400, "invalid_request"));
        assert!(check(&h(&[("x_custom_thing", "ok")]), no_raw).is_ok());
    }
}
