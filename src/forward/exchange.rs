//! The exchange with the router: send the judged request, relay the answer.
//!
//! The gateway does this itself rather than through Pingora's proxy loop:
//! the whole judged body is already in hand, so nothing is left to stream
//! upstream, and the loop's per-request machinery costs more than it does
//! here (bench/RESULTS.md). The exchange takes a connection from the
//! worker's [`RouterPool`], writes one clean head and the body in one write,
//! reads the answer with Pingora's HTTP/1 client, skips interim answers,
//! passes the answer through the caller's [`Answer`], and gives the
//! connection back before the client's last write.

use std::io::IoSlice;

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use http::{HeaderMap, StatusCode, Version};
use pingora::http::ResponseHeader;
use pingora::prelude::HttpPeer;
use pingora::protocols::http::v1::client::HttpSession as RouterSession;
use pingora::protocols::Stream;
use pingora::proxy::Session;
use pingora::{Error, ErrorSource, ErrorType, Result, RetryType};
use tokio::io::AsyncWriteExt;

use super::pool::RouterPool;
use super::RouterHead;
use crate::reject::{Reject, RejectCode};

/// Attempts at sending one request when pooled connections turn out closed.
const SEND_ATTEMPTS: u32 = 3;
/// An answer's chunks already received are written together up to this size.
const COALESCE_BYTES: usize = 16 * 1024;
/// Interim answers (100, 103) skipped before the router's final one.
const MAX_INTERIM_ANSWERS: usize = 8;

/// What the request puts into the exchange, and does with the answer on
/// its way back.
pub trait Answer {
    /// The head the router gets, built for each attempt (a retry on a
    /// pooled connection the router closed needs a new one).
    fn request_head(&self, session: &Session) -> Result<RouterHead>;
    /// The request is with the router: the body it held can go (a long
    /// stream must not keep its prompt's bytes in the body budget).
    fn sent(&mut self);
    /// The gateway's part of the answer's head (request id, rate-limit
    /// headers, re-framing), put into the router's headers.
    fn head(&mut self, headers: &mut HeaderMap) -> Result<()>;
    /// Whether the answer is held whole until it ends (after `head`): its
    /// head then leaves with the exact length, together with the body.
    fn holds_body(&self) -> bool;
    /// One chunk of the body; returns what goes to the client now.
    fn chunk(&mut self, chunk: Bytes) -> Bytes;
    /// Whatever is still held when the body ends.
    fn end(&mut self) -> Option<Bytes>;
}

/// Sends the request's head and `body` to `peer` and relays the answer to
/// the client. An error's source says who failed: the router (`Upstream`)
/// or the client (`Downstream`).
pub async fn run(
    pool: &RouterPool,
    peer: &HttpPeer,
    session: &mut Session,
    body: Bytes,
    answer: &mut impl Answer,
) -> Result<()> {
    let mut up = send(pool, peer, session, body, answer).await?;
    answer.sent();
    let router = up
        .resp_header()
        .ok_or_else(|| Error::explain(ErrorType::InvalidHTTPHeader, "no response header"))
        .map_err(|e| e.into_up())?;
    let resp = client_head(router, answer)?;
    // A held answer's head waits for its body, and its length.
    let mut held_head = None;
    if answer.holds_body() {
        held_head = Some(resp);
    } else {
        write_head(session, resp).await?;
    }
    let mut done = false;
    while !done {
        let chunk = tokio::select! {
            biased;
            chunk = up.read_body_bytes() => chunk.map_err(|e| e.into_up())?,
            gone = session.read_body_or_idle(true) => return Err(client_gone(gone)),
        };
        let Some(chunk) = chunk else { break };
        let mut out = answer.chunk(chunk);
        // Whatever else the router has already sent leaves in the same
        // write: a stream's chunks are small, and a write per chunk is a
        // send (and a flush) per token. Pingora's body reads are
        // cancel-safe, so a read that would wait is simply dropped.
        let mut batch = BytesMut::new();
        while out.len() + batch.len() < COALESCE_BYTES {
            match up.read_body_bytes().now_or_never() {
                Some(Ok(Some(more))) => {
                    if batch.is_empty() {
                        batch.extend_from_slice(&out);
                    }
                    batch.extend_from_slice(&answer.chunk(more));
                }
                Some(Ok(None)) => {
                    done = true;
                    break;
                }
                Some(Err(e)) => return Err(e.into_up()),
                None => break,
            }
        }
        if !batch.is_empty() {
            out = batch.freeze();
        }
        if !out.is_empty() {
            if let Some(head) = held_head.take() {
                // The answer outgrew what is held: it streams after all.
                write_head(session, head).await?;
            }
            session
                .write_response_body(Some(out), false)
                .await
                .map_err(|e| e.into_down())?;
        }
    }
    // The router's part is done: its connection goes back to the pool
    // before the client's last write.
    up.respect_keepalive();
    if let Some(stream) = up.reuse().await {
        pool.put(peer, stream);
    }
    let tail = answer.end().filter(|t| !t.is_empty());
    if let Some(mut head) = held_head {
        let len = tail.as_ref().map_or(0, Bytes::len);
        head.insert_header(http::header::CONTENT_LENGTH, len.to_string())?;
        write_head(session, head).await?;
    }
    session
        .write_response_body(tail, true)
        .await
        .map_err(|e| e.into_down())
}

/// Room for the headers an answer gains on its way to the client: the
/// request id, a PII count, both dialects' rate-limit headers, the framing,
/// and Pingora's `Date` and `Connection`.
const GATEWAY_HEADERS: usize = 17;

/// The client's head for the router's answer: the router's status, reason
/// and headers, and then the gateway's own. It is built anew rather than
/// cloned, with room for what the gateway adds, so no map grows.
fn client_head(router: &ResponseHeader, answer: &mut impl Answer) -> Result<ResponseHeader> {
    let mut headers = HeaderMap::with_capacity(router.headers.len() + GATEWAY_HEADERS);
    for (name, value) in &router.headers {
        headers.append(name.clone(), value.clone());
    }
    answer.head(&mut headers)?;
    let mut head = response_head(router.status, router.version, headers);
    head.set_reason_phrase(router.get_reason_phrase())?;
    Ok(head)
}

/// A head for the client. It keeps no second map of the names' spellings,
/// as Pingora's case-preserving one does: every name leaves in lower case
/// (Pingora titles a few common ones, such as `Content-Type`), as Envoy and
/// hyper send them, and the gateway's headers go straight into the map,
/// where each insert into Pingora's head would parse its name again.
pub fn response_head(status: StatusCode, version: Version, headers: HeaderMap) -> ResponseHeader {
    let (mut parts, ()) = http::Response::new(()).into_parts();
    parts.status = status;
    parts.version = version;
    parts.headers = headers;
    ResponseHeader::from(parts)
}

/// Writes the answer's head, framed for the client.
async fn write_head(session: &mut Session, mut resp: ResponseHeader) -> Result<()> {
    frame_for_client(session, &mut resp)?;
    session
        .write_response_header(Box::new(resp), false)
        .await
        .map_err(|e| e.into_down())
}

/// An answer the gateway re-frames as it streams (its length changes on
/// the way back) has lost its Content-Length; an HTTP/1.1 client then gets
/// it chunked, not delimited by a close, so its connection stays reusable.
fn frame_for_client(session: &Session, resp: &mut ResponseHeader) -> Result<()> {
    let unframed = !resp.headers.contains_key(http::header::CONTENT_LENGTH)
        && !resp.headers.contains_key(http::header::TRANSFER_ENCODING);
    let status = resp.status.as_u16();
    let has_body = !matches!(status, 100..=199 | 204 | 304)
        && session.req_header().method != http::Method::HEAD;
    if unframed && has_body && session.as_downstream().as_http1().is_some() {
        resp.insert_header(http::header::TRANSFER_ENCODING, "chunked")?;
    }
    Ok(())
}

/// Sends the request and reads the head of the router's answer. A pooled
/// connection the router closed while it sat idle fails before any answer;
/// as in Pingora's own proxy, the request then goes again on another
/// connection, while a new connection's failure is final. A client that
/// leaves meanwhile ends the exchange.
async fn send(
    pool: &RouterPool,
    peer: &HttpPeer,
    session: &mut Session,
    body: Bytes,
    answer: &impl Answer,
) -> Result<RouterSession> {
    let mut attempt = 1;
    loop {
        let head = answer.request_head(session)?;
        let (stream, reused) = pool.get(peer).await.map_err(|e| e.into_up())?;
        let sent = tokio::select! {
            biased;
            sent = send_on(stream, peer, &head, &body) => sent,
            gone = session.read_body_or_idle(true) => return Err(client_gone(gone)),
        };
        match sent {
            Ok(up) => return Ok(up),
            Err(mut e) => {
                e.retry.decide_reuse(reused);
                if !e.retry() || attempt == SEND_ATTEMPTS {
                    return Err(e.into_up());
                }
                tracing::debug!(error = %e, attempt, "pooled router connection failed; sending again");
                attempt += 1;
            }
        }
    }
}

/// Writes the request, head and body together, and reads the head of the
/// final answer (an interim 100 or 103 is not the answer).
///
/// Pingora's client would write (and flush) the head on its own, then the
/// body: two sends per request, or a `TCP_CORK` pair around them. The
/// session that reads the answer never saw the request, so it frames the
/// answer by its own head alone: right for every routed method (a `HEAD`,
/// whose answer has no body whatever its length says, is never routed).
async fn send_on(
    mut stream: Stream,
    peer: &HttpPeer,
    head: &RouterHead,
    body: &[u8],
) -> Result<RouterSession> {
    let write = write_all(&mut stream, head.as_bytes(), body);
    let written = match peer.options.write_timeout {
        Some(t) => tokio::time::timeout(t, write)
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into())),
        None => write.await,
    };
    if let Err(e) = written {
        let etype = match e.kind() {
            std::io::ErrorKind::TimedOut => ErrorType::WriteTimedout,
            _ => ErrorType::WriteError,
        };
        let os_error = e.raw_os_error().is_some();
        let mut e = Error::because(etype, "while writing the request", e);
        // A reused connection the router had closed (a reset or a broken
        // pipe), not a TLS failure: worth another connection.
        if os_error {
            e.retry = RetryType::ReusedOnly;
        }
        return Err(e);
    }
    let mut up = RouterSession::new_with_options(stream, peer);
    up.read_timeout = peer.options.read_timeout;
    up.write_timeout = peer.options.write_timeout;
    for _ in 0..MAX_INTERIM_ANSWERS {
        up.read_response().await?;
        if !up
            .resp_header()
            .is_some_and(|r| r.status.is_informational())
        {
            return Ok(up);
        }
    }
    Error::e_explain(ErrorType::InvalidHTTPHeader, "too many interim answers")
}

/// Writes `head` then `body` in as few writes as the stream takes: one
/// `writev` on TCP.
async fn write_all(stream: &mut Stream, mut head: &[u8], mut body: &[u8]) -> std::io::Result<()> {
    while !head.is_empty() || !body.is_empty() {
        let n = stream
            .write_vectored(&[IoSlice::new(head), IoSlice::new(body)])
            .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_head = n.min(head.len());
        head = &head[from_head..];
        body = &body[n - from_head..];
    }
    stream.flush().await
}

/// The downstream ended (or broke its framing) while the router worked.
fn client_gone(ended: Result<Option<Bytes>>) -> Box<Error> {
    match ended {
        Err(e) => e.into_down(),
        Ok(_) => Error::explain(
            ErrorType::ConnectionClosed,
            "client sent data after its request",
        )
        .into_down(),
    }
}

/// How a failure to reach or hear from the router looks to the client.
pub fn upstream_reject(e: &Error) -> Reject {
    match e.etype() {
        ErrorType::ConnectNoRoute
        | ErrorType::ConnectRefused
        | ErrorType::ConnectTimedout
        | ErrorType::ConnectError
        | ErrorType::TLSHandshakeFailure => Reject::new(
            502,
            RejectCode::UpstreamUnavailable,
            "the router is unavailable",
        ),
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => Reject::new(
            504,
            RejectCode::UpstreamTimeout,
            "the router did not answer in time",
        ),
        _ if e.esource() == &ErrorSource::Upstream => Reject::new(
            502,
            RejectCode::UpstreamUnavailable,
            "the router is unavailable",
        ),
        _ => Reject::new(500, RejectCode::InternalError, "internal gateway error"),
    }
}
