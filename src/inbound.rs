//! Sanity checks on the raw request head, before any identity work.
//!
//! Pingora accepts a request with both Content-Length and Transfer-Encoding;
//! behind it, a router that reads the other framing would see a second,
//! smuggled request. Such requests are refused here, as are header names
//! that would read as trusted headers once `_` is folded into `-`.

use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::HeaderMap;

use crate::forward::spoofs_trusted_header;
use crate::reject::Reject;

/// Checks framing and header names; the first problem found is returned.
pub fn check(headers: &HeaderMap) -> Result<(), Reject> {
    let mut lengths = headers.get_all(CONTENT_LENGTH).iter();
    let first_length = lengths.next();
    if lengths.next().is_some() {
        return Err(framing("repeated Content-Length"));
    }
    if headers.contains_key(TRANSFER_ENCODING) {
        if first_length.is_some() {
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

    #[test]
    fn ambiguous_framing_is_refused() {
        assert!(check(&h(&[("content-length", "3")])).is_ok());
        assert!(check(&h(&[("transfer-encoding", "chunked")])).is_ok());
        assert!(check(&h(&[
            ("content-length", "3"),
            ("transfer-encoding", "chunked")
        ]))
        .is_err());
        assert!(check(&h(&[("content-length", "3"), ("content-length", "3")])).is_err());
        assert!(check(&h(&[("transfer-encoding", "gzip, chunked")])).is_err());
    }

    #[test]
    fn underscore_spellings_of_trusted_headers_are_refused() {
        let r = check(&h(&[("x_tenant_id", "evil")])).unwrap_err();
        assert_eq!((r.status, r.code), (400, "invalid_request"));
        assert!(check(&h(&[("x_custom_thing", "ok")])).is_ok());
    }
}
