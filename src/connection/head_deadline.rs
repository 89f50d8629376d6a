//! The deadline for each HTTP/1 request head, whatever the pace of single
//! reads.
//!
//! Pingora's own header timeout restarts on every read, so a client that
//! sends one byte a minute (slowloris) holds its connection forever. The
//! deadline here runs from the connection's accept (first request) or the
//! head's first byte (later requests) to the blank line that ends the head.
//! HTTP/2 is left to its own limits (see `server::h2_options`).

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::Rejection;

/// Where the stream is in the HTTP/1 exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the end of a request head; `armed` once the clock runs.
    Head { armed: bool, line: Line },
    /// Past the head: the body and the response, until the next response
    /// head is written.
    Rest,
    /// HTTP/2 prior knowledge (h2c): not ours to time.
    Off,
}

/// Where the scanner is within a head's lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// Nothing but empty lines so far: the parser skips those before the
    /// request line, so they must not end the head (else a client could
    /// send `\r\n\r\n` first and then trickle the head with no clock).
    Start,
    /// Inside a line with content.
    Text,
    /// A line with content just ended: an empty line now ends the head.
    Ended,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// A stream that fails its reads once a request head is overdue.
pub struct HeadDeadline {
    inner: Stream,
    limit: Duration,
    phase: Phase,
    first_read: bool,
    sleep: Pin<Box<Sleep>>,
}

impl HeadDeadline {
    /// The first head is due `limit` after `since`: the accept, so that a
    /// PROXY header read before it takes from the same time.
    pub fn new(inner: Stream, limit: Duration, since: Instant) -> Self {
        HeadDeadline {
            inner,
            limit,
            phase: Phase::Head {
                armed: true,
                line: Line::Start,
            },
            first_read: true,
            sleep: Box::pin(tokio::time::sleep_until(since + limit)),
        }
    }

    fn overdue() -> io::Error {
        Rejection::HeaderTimeout.count();
        io::Error::new(io::ErrorKind::TimedOut, "request head not received in time")
    }

    /// Follows the bytes just read: arms the clock on a head's first byte
    /// and stops it at the blank line that ends the head (CRLF or bare LF,
    /// as the parser accepts both).
    fn observe_read(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if std::mem::take(&mut self.first_read) && bytes.starts_with(H2_PREFACE) {
            self.phase = Phase::Off;
            return;
        }
        let Phase::Head { armed, mut line } = self.phase else {
            return;
        };
        if !armed {
            self.sleep.as_mut().reset(Instant::now() + self.limit);
        }
        // Line by line (memchr), not byte by byte: the head is read through
        // this on every request. `\r` alone is not content.
        let has_content = |part: &[u8]| part.iter().any(|&b| b != b'\r');
        let mut rest = bytes;
        while let Some(end) = memchr::memchr(b'\n', rest) {
            line = match (has_content(&rest[..end]), line) {
                (true, _) | (false, Line::Text) => Line::Ended,
                (false, Line::Ended) => {
                    self.phase = Phase::Rest;
                    return;
                }
                (false, Line::Start) => Line::Start,
            };
            rest = &rest[end + 1..];
        }
        if has_content(rest) {
            line = Line::Text;
        }
        self.phase = Phase::Head { armed: true, line };
    }

    /// A final response head written means the next bytes read start a new
    /// request head; its clock starts with its first byte.
    fn observe_write(&mut self, bytes: &[u8]) {
        if self.phase == Phase::Rest
            && bytes.starts_with(b"HTTP/1.")
            && bytes.get(9).is_some_and(|&c| c != b'1')
        {
            self.phase = Phase::Head {
                armed: false,
                line: Line::Start,
            };
        }
    }
}

impl AsyncRead for HeadDeadline {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Phase::Head { armed: true, .. } = this.phase {
            if this.sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(Self::overdue()));
            }
        }
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if this.phase != Phase::Off {
            this.observe_read(&buf.filled()[before..]);
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for HeadDeadline {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.observe_write(buf);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        if let Some(first) = bufs.iter().find(|b| !b.is_empty()) {
            this.observe_write(first);
        }
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for HeadDeadline {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for HeadDeadline {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for HeadDeadline {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for HeadDeadline {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for HeadDeadline {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for HeadDeadline {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for HeadDeadline {
    /// Pingora peeks for the h2c preface before reading; that wait is part
    /// of the first head's time.
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        let deadline = self.sleep.deadline();
        match tokio::time::timeout_at(deadline, self.inner.try_peek(buf)).await {
            Ok(peeked) => peeked,
            Err(_) => Err(Self::overdue()),
        }
    }
}

impl fmt::Debug for HeadDeadline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeadDeadline")
            .field("inner", &self.inner)
            .field("phase", &self.phase)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deadline() -> HeadDeadline {
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        a.set_nonblocking(true).expect("nonblocking");
        let s = tokio::net::UnixStream::from_std(a).expect("tokio stream");
        let l4: pingora::protocols::l4::stream::Stream = s.into();
        HeadDeadline::new(Box::new(l4), Duration::from_secs(1), Instant::now())
    }

    #[tokio::test]
    async fn head_ends_at_blank_line_in_any_split() {
        for split in 1..30 {
            let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody";
            let mut d = deadline();
            for part in head.chunks(split) {
                d.observe_read(part);
            }
            assert_eq!(d.phase, Phase::Rest, "split {split}");
        }
        let mut d = deadline();
        d.observe_read(b"GET / HTTP/1.1\nHost: a\n\n");
        assert_eq!(d.phase, Phase::Rest, "bare LF heads end too");
        let mut d = deadline();
        d.observe_read(b"GET / HTTP/1.1\r\nHost: a\r\n");
        assert!(matches!(d.phase, Phase::Head { armed: true, .. }));
    }

    #[tokio::test]
    async fn empty_lines_before_the_request_line_do_not_end_the_head() {
        let mut d = deadline();
        d.observe_read(b"\r\n\r\n\n\n");
        assert!(matches!(d.phase, Phase::Head { armed: true, .. }));
        d.observe_read(b"GET / HTTP/1.1\r\nHost: a\r\n");
        assert!(matches!(d.phase, Phase::Head { armed: true, .. }));
        d.observe_read(b"\r\n");
        assert_eq!(d.phase, Phase::Rest);
    }

    #[tokio::test]
    async fn final_response_rearms_on_next_head_but_interim_does_not() {
        let mut d = deadline();
        d.observe_read(b"POST / HTTP/1.1\r\n\r\n");
        d.observe_write(b"HTTP/1.1 100 Continue\r\n\r\n");
        assert_eq!(d.phase, Phase::Rest);
        d.observe_write(b"HTTP/1.1 200 OK\r\n");
        assert_eq!(
            d.phase,
            Phase::Head {
                armed: false,
                line: Line::Start
            }
        );
        d.observe_read(b"G");
        assert!(matches!(d.phase, Phase::Head { armed: true, .. }));
    }

    #[tokio::test]
    async fn h2c_preface_turns_it_off() {
        let mut d = deadline();
        d.observe_read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        assert_eq!(d.phase, Phase::Off);
    }
}
