//! Taking a body in: what can be decided from the request head alone
//! (media type, content coding, declared length), before any byte of the
//! body is read, and then the bounded read itself.

use std::time::Instant;

use bytes::BytesMut;
use http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
use http::HeaderMap;
use pingora::proxy::Session;

use super::BodyConfig;
use crate::limits::guard::BodyLease;
use crate::reject::{Reject, RejectCode};

/// The body a route takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Media {
    Json,
    /// No body at all, or a JSON one (a stored response's routes).
    JsonOrNone,
    /// `multipart/form-data` (its framing is checked by `body::multipart`).
    Multipart,
}

/// Checks the head of a request for a route that takes `media`, against
/// the effective size `limit`; returns the declared length, if any.
pub fn check_head(headers: &HeaderMap, limit: u64, media: Media) -> Result<Option<u64>, Reject> {
    let ctype = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let no_body = !headers.contains_key(TRANSFER_ENCODING)
        && headers
            .get(CONTENT_LENGTH)
            .is_none_or(|v| v.as_bytes() == b"0");
    let (fits, wanted) = match media {
        Media::Json => (
            ctype.is_some_and(is_json),
            "application/json (charset utf-8)",
        ),
        Media::JsonOrNone => (
            ctype.map_or(no_body, is_json),
            "application/json (charset utf-8), or send no body",
        ),
        Media::Multipart => (ctype.is_some_and(is_multipart), "multipart/form-data"),
    };
    if !fits {
        return Err(Reject::new(
            415,
            RejectCode::UnsupportedMediaType,
            format!("send the body as Content-Type: {wanted}"),
        ));
    }
    for coding in headers.get_all(CONTENT_ENCODING) {
        if !coding.as_bytes().eq_ignore_ascii_case(b"identity") {
            return Err(Reject::new(
                415,
                RejectCode::UnsupportedMediaType,
                "compressed request bodies are not accepted (Content-Encoding must be identity)",
            ));
        }
    }
    let Some(len) = headers.get(CONTENT_LENGTH) else {
        return Ok(None);
    };
    let declared: u64 = len
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| {
            Reject::bad_request(RejectCode::InvalidRequest, "malformed Content-Length")
        })?;
    if declared > limit {
        return Err(too_large(limit));
    }
    Ok(Some(declared))
}

/// Reads the whole body, at most `limit` bytes, within the whole-body
/// timeout and above the minimum rate, holding what it reads in `lease`
/// (a declared length is held before the read starts). Any failure closes
/// the connection, whose framing state is then unknown.
pub async fn read(
    session: &mut Session,
    cfg: &BodyConfig,
    limit: u64,
    declared: Option<u64>,
    lease: &mut BodyLease,
) -> Result<BytesMut, Reject> {
    lease.hold(declared.unwrap_or(0), cfg.max_buffered_bytes)?;
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let started = Instant::now();
    // A declared length is the buffer's size: no regrowth, no slack.
    let mut raw = BytesMut::with_capacity(
        declared.map_or(0, |n| usize::try_from(n).unwrap_or(limit).min(limit)),
    );
    loop {
        let (deadline, by_rate) = cfg.next_read_deadline(started, raw.len());
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk = match tokio::time::timeout(left, session.read_request_body()).await {
            Err(_) => {
                session.set_keepalive(None);
                return Err(Reject::new(
                    408,
                    RejectCode::RequestTimeout,
                    if by_rate {
                        "the request body arrived too slowly"
                    } else {
                        "the request body did not arrive in time"
                    },
                ));
            }
            Ok(Err(_)) => {
                session.set_keepalive(None);
                return Err(Reject::bad_request(
                    RejectCode::InvalidRequest,
                    "the request body could not be read",
                ));
            }
            Ok(Ok(None)) => return Ok(raw),
            Ok(Ok(Some(chunk))) => chunk,
        };
        let total = raw.len() + chunk.len();
        if total > limit {
            session.set_keepalive(None);
            return Err(too_large(limit as u64));
        }
        if let Err(full) = lease.hold(total as u64, cfg.max_buffered_bytes) {
            session.set_keepalive(None);
            return Err(full);
        }
        raw.extend_from_slice(&chunk);
    }
}

pub fn too_large(limit: u64) -> Reject {
    Reject::new(
        413,
        RejectCode::BodyTooLarge,
        format!("the request body exceeds {limit} bytes"),
    )
}

/// `multipart/form-data`, whatever its parameters (the boundary is
/// checked with the framing).
fn is_multipart(value: &str) -> bool {
    value
        .split(';')
        .next()
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("multipart/form-data"))
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
        check_head(&head(pairs), 100, Media::Json)
            .err()
            .map(|r| (r.status, r.code.as_str()))
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
    fn object_routes_take_no_body_and_audio_routes_a_form() {
        let check = |pairs: &[(&'static str, &'static str)], media| {
            check_head(&head(pairs), 100, media).err().map(|r| r.status)
        };
        assert_eq!(check(&[], Media::JsonOrNone), None);
        assert_eq!(check(&[("content-length", "0")], Media::JsonOrNone), None);
        assert_eq!(
            check(&[("content-length", "5")], Media::JsonOrNone),
            Some(415)
        );
        assert_eq!(
            check(&[("transfer-encoding", "chunked")], Media::JsonOrNone),
            Some(415)
        );
        assert_eq!(
            check(
                &[
                    ("content-type", "application/json"),
                    ("content-length", "5")
                ],
                Media::JsonOrNone
            ),
            None
        );
        assert_eq!(
            check(
                &[("content-type", "multipart/form-data; boundary=x")],
                Media::Multipart
            ),
            None
        );
        assert_eq!(
            check(&[("content-type", "application/json")], Media::Multipart),
            Some(415)
        );
        assert_eq!(check(&[], Media::Multipart), Some(415));
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
