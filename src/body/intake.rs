//! What can be decided about a body from the request head alone: media
//! type, content coding and declared length. These run before any byte of
//! the body is read and before any upstream connection exists.

use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use http::HeaderMap;

use crate::reject::Reject;

/// Checks the head of a request that carries a JSON body, against the
/// effective size `limit`.
pub fn check_head(headers: &HeaderMap, limit: u64) -> Result<(), Reject> {
    let ctype = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
    if !ctype.is_some_and(is_json) {
        return Err(Reject::new(
            415,
            "unsupported_media_type",
            "send the body as Content-Type: application/json (charset utf-8)",
        ));
    }
    for coding in headers.get_all(CONTENT_ENCODING) {
        if !coding.as_bytes().eq_ignore_ascii_case(b"identity") {
            return Err(Reject::new(
                415,
                "unsupported_media_type",
                "compressed request bodies are not accepted (Content-Encoding must be identity)",
            ));
        }
    }
    if let Some(len) = headers.get(CONTENT_LENGTH) {
        let declared: u64 = len
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .ok_or_else(|| Reject::bad_request("invalid_request", "malformed Content-Length"))?;
        if declared > limit {
            return Err(too_large(limit));
        }
    }
    Ok(())
}

pub fn too_large(limit: u64) -> Reject {
    Reject::new(
        413,
        "body_too_large",
        format!("the request body exceeds {limit} bytes"),
    )
}

/// `application/json`, optionally with `charset=utf-8`, nothing else.
fn is_json(value: &str) -> bool {
    let mut parts = value.split(';');
    let media = parts.next().unwrap_or_default().trim();
    if !media.eq_ignore_ascii_case("application/json") {
        return false;
    }
    parts.all(|p| match p.trim().split_once('=') {
        Some((k, v)) => {
            k.trim().eq_ignore_ascii_case("charset")
                && v.trim().trim_matches('"').eq_ignore_ascii_case("utf-8")
        }
        None => p.trim().is_empty(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    fn code(pairs: &[(&'static str, &'static str)]) -> Option<(u16, &'static str)> {
        check_head(&head(pairs), 100)
            .err()
            .map(|r| (r.status, r.code))
    }

    #[test]
    fn only_json_in_utf8_is_accepted() {
        assert_eq!(code(&[("content-type", "application/json")]), None);
        assert_eq!(
            code(&[("content-type", "Application/JSON; charset=UTF-8")]),
            None
        );
        assert_eq!(
            code(&[("content-type", "application/json; charset=\"utf-8\"")]),
            None
        );
        let bad = Some((415, "unsupported_media_type"));
        assert_eq!(code(&[]), bad);
        assert_eq!(code(&[("content-type", "text/plain")]), bad);
        assert_eq!(
            code(&[("content-type", "application/json; charset=latin1")]),
            bad
        );
        assert_eq!(code(&[("content-type", "application/jsonx")]), bad);
        assert_eq!(
            code(&[("content-type", "application/json; boundary=x")]),
            bad
        );
        let gz = [
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
        ];
        assert_eq!(code(&gz), bad);
        let id = [
            ("content-type", "application/json"),
            ("content-encoding", "identity"),
        ];
        assert_eq!(code(&id), None);
    }

    #[test]
    fn declared_length_is_checked_before_reading() {
        let over = [
            ("content-type", "application/json"),
            ("content-length", "101"),
        ];
        assert_eq!(code(&over), Some((413, "body_too_large")));
        let at = [
            ("content-type", "application/json"),
            ("content-length", "100"),
        ];
        assert_eq!(code(&at), None);
    }
}
