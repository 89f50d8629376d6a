//! The gateway's own small HTTP/1 calls (the external authorizer, a JWKS
//! endpoint): a request without a body, its answer's head and a bounded
//! body, on a connection from Pingora's pool.

use bytes::BytesMut;
use pingora::connectors::http::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::upstreams::peer::HttpPeer;

/// Why a call failed, for the caller's log or denial.
#[derive(Debug)]
pub enum CallError {
    /// Connecting, sending or reading failed.
    Io(String),
    /// The body was larger than the caller allows.
    TooLarge(usize),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Io(e) => f.write_str(e),
            CallError::TooLarge(max) => write!(f, "the answer's body exceeds {max} bytes"),
        }
    }
}

/// Sends `head` (no body) to `peer` and reads the answer, its body at most
/// `max_body` bytes; the connection goes back to the pool afterwards.
pub async fn call(
    connector: &Connector,
    peer: &HttpPeer,
    head: RequestHeader,
    max_body: usize,
) -> Result<(ResponseHeader, BytesMut), CallError> {
    let io = |what: &str, e: Box<pingora::Error>| CallError::Io(format!("{what}: {e}"));
    let (mut session, _reused) = connector
        .get_http_session(peer)
        .await
        .map_err(|e| io("connect", e))?;
    session
        .write_request_header(Box::new(head))
        .await
        .map_err(|e| io("send", e))?;
    session
        .finish_request_body()
        .await
        .map_err(|e| io("send", e))?;
    session
        .read_response_header()
        .await
        .map_err(|e| io("read", e))?;
    let resp = session
        .response_header()
        .cloned()
        .ok_or_else(|| CallError::Io("read: no response head".into()))?;
    let mut body = BytesMut::new();
    while let Some(chunk) = session
        .read_response_body()
        .await
        .map_err(|e| io("read", e))?
    {
        if body.len() + chunk.len() > max_body {
            return Err(CallError::TooLarge(max_body));
        }
        body.extend_from_slice(&chunk);
    }
    connector
        .release_http_session(session, peer, peer.options.idle_timeout)
        .await;
    Ok((resp, body))
}
