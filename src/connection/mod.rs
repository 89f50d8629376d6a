//! The connection stage, before Pingora parses a byte: the PROXY header
//! from a balancer, the cap on open connections per client address, the
//! TLS handshake under its own deadline, the deadline for each HTTP/1
//! request head, and the wait between keep-alive requests.
//!
//! Each listener group (plain, TLS) is its own service wrapped in this
//! stage; Pingora accepts plain TCP on both, and the handshake is done
//! here so that the PROXY header can come first and the connection is
//! counted and timed from its accept.

mod head_deadline;
mod per_ip;
pub mod proxy_header;

use std::future::poll_fn;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
use pingora::listeners::TlsAccept;
use pingora::protocols::http::ServerSession;
use pingora::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::tls::server::handshake_with_callback;
use pingora::protocols::{GetSocketDigest, SocketDigest, Stream, ALPN};
use pingora::server::ShutdownWatch;
use pingora::tls::ssl::SslAcceptor;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use tokio::time::Instant;

use crate::observe::metrics::METRICS;
use head_deadline::HeadDeadline;
use per_ip::PerIp;
use proxy_header::{Parsed, ProxyProtocol, Source, TrustedProxies};

/// Why the stage closed a connection: the `reason` label of
/// `portcullis_connection_rejections_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    PerIpLimit,
    HeaderTimeout,
    UntrustedProxy,
    MissingProxyHeader,
    InvalidProxyHeader,
    TlsHandshakeTimeout,
}

impl Rejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::PerIpLimit => "per_ip_limit",
            Rejection::HeaderTimeout => "header_timeout",
            Rejection::UntrustedProxy => "untrusted_proxy",
            Rejection::MissingProxyHeader => "missing_proxy_header",
            Rejection::InvalidProxyHeader => "invalid_proxy_header",
            Rejection::TlsHandshakeTimeout => "tls_handshake_timeout",
        }
    }

    fn count(self) {
        METRICS
            .connection_rejections
            .with_label_values(&[self.as_str()])
            .inc();
    }
}

/// What every listener group shares: one count of connections per
/// client address, whichever listener they came in on.
pub struct Edge {
    per_ip: PerIp,
    trusted: TrustedProxies,
    header_timeout: Duration,
    /// How long a plaintext HTTP/1 connection may wait for its next request.
    idle_timeout: Duration,
}

impl Edge {
    pub fn new(
        max_per_ip: u32,
        trusted: TrustedProxies,
        header_timeout: Duration,
        idle_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(Edge {
            per_ip: PerIp::new(max_per_ip),
            trusted,
            header_timeout,
            idle_timeout,
        })
    }
}

/// A TLS listener group's handshake.
pub struct Handshake {
    pub acceptor: SslAcceptor,
    pub callbacks: Arc<dyn TlsAccept + Send + Sync>,
    /// From accept to the end of the handshake, PROXY header included.
    pub timeout: Duration,
}

/// Wraps the proxy application with the connection stage, for one
/// listener group.
pub struct Guarded<A> {
    inner: Arc<A>,
    edge: Arc<Edge>,
    proxy: ProxyProtocol,
    tls: Option<Handshake>,
}

impl<A> Guarded<A> {
    pub fn new(
        inner: Arc<A>,
        edge: Arc<Edge>,
        proxy: ProxyProtocol,
        tls: Option<Handshake>,
    ) -> Self {
        Guarded {
            inner,
            edge,
            proxy,
            tls,
        }
    }

    /// The client address: the TCP peer, or the source of the PROXY
    /// header a trusted peer sent first. `None` closes the connection.
    async fn client(&self, l4: &mut L4Stream, peer: IpAddr, deadline: Instant) -> Option<IpAddr> {
        let trusted = self.edge.trusted.contains(peer);
        let outcome = match (self.proxy, trusted) {
            (ProxyProtocol::Off, _) | (ProxyProtocol::Optional, false) => return Some(peer),
            (ProxyProtocol::Required, false) => Err(Some(Rejection::UntrustedProxy)),
            (mode, true) => tokio::time::timeout_at(deadline, read_proxy_header(l4, mode))
                .await
                .unwrap_or(Err(Some(Rejection::HeaderTimeout))),
        };
        match outcome {
            Ok(Source::Client(addr)) => {
                let digest = SocketDigest::from_raw_fd(l4.as_raw_fd());
                let _ = digest.peer_addr.set(Some(PeerAddr::Inet(addr)));
                l4.set_socket_digest(digest);
                Some(addr.ip())
            }
            Ok(Source::Peer) => Some(peer),
            Err(why) => {
                if let Some(why) = why {
                    tracing::debug!(%peer, reason = why.as_str(), "connection closed");
                    why.count();
                }
                None
            }
        }
    }
}

/// Reads a PROXY header whole, never past it (so nothing is put back but
/// the first bytes of an optional listener's connection without one).
/// `Err(None)` is a client that closed first.
async fn read_proxy_header(
    l4: &mut L4Stream,
    mode: ProxyProtocol,
) -> Result<Source, Option<Rejection>> {
    // The largest v2 address block is 216 bytes; TLVs may grow it.
    let mut buf = Vec::with_capacity(proxy_header::V1_MAX.max(232));
    loop {
        match proxy_header::parse(&buf) {
            Parsed::Header { source, .. } => return Ok(source),
            Parsed::Absent if mode == ProxyProtocol::Required => {
                return Err(Some(Rejection::MissingProxyHeader))
            }
            Parsed::Absent => {
                l4.rewind(&buf);
                return Ok(Source::Peer);
            }
            Parsed::Invalid => return Err(Some(Rejection::InvalidProxyHeader)),
            Parsed::Partial => {}
        }
        // `parse` refuses a header over its bound before it is read.
        let at = buf.len();
        buf.resize(at + proxy_header::next_read(&buf), 0);
        match l4.read(&mut buf[at..]).await {
            Ok(0) | Err(_) => return Err(None),
            Ok(n) => buf.truncate(at + n),
        }
    }
}

impl<A: HttpServerApp + Send + Sync + 'static> Guarded<A> {
    /// HTTP/1 on a plaintext connection, request after request, as
    /// Pingora's own loop does, except for the wait between requests.
    /// Pingora waits for the next request inside the proxy's future, with
    /// its session and a 4 KiB head buffer allocated; here an idle
    /// connection holds only its stream until a byte arrives.
    async fn keep_alive(&self, mut stream: Stream, shutdown: &ShutdownWatch) -> Option<Stream> {
        let options = self.inner.server_options();
        if options.is_some_and(|o| o.h2c) {
            let mut preface = [0u8; H2_PREFACE.len()];
            if stream.try_peek(&mut preface).await.ok()? && preface == H2_PREFACE {
                return self.inner.process_new(stream, shutdown).await;
            }
        }
        let mut settings: Option<HttpPersistentSettings> = None;
        loop {
            let mut session = ServerSession::new_http1(stream);
            match settings {
                Some(settings) => settings.apply_to_session(&mut session),
                None => {
                    // The proxy sets the configured idle timeout per request.
                    let keepalive = (!*shutdown.borrow()).then_some(60);
                    session.set_keepalive(keepalive);
                    session.set_keepalive_reuses_remaining(
                        options.and_then(|o| o.keepalive_request_limit),
                    );
                }
            }
            (stream, settings) = self
                .inner
                .process_new_http(session, shutdown)
                .await?
                .consume();
            if !next_request(&mut stream, self.edge.idle_timeout, shutdown).await {
                return None;
            }
        }
    }
}

/// The HTTP/2 connection preface's first line, as Pingora peeks for it.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Waits until a kept-alive plaintext connection has something to read (a
/// request, or its close), and says whether to serve it: not once the
/// idle timeout passes or the server begins to shut down.
///
/// The wait is a read into an empty buffer: tokio waits for the socket's
/// readiness and then reads nothing, so no byte is taken from Pingora's
/// parser and no buffer is held. (A TLS stream would answer such a read at
/// once, which is why TLS connections keep Pingora's loop.)
async fn next_request(stream: &mut Stream, idle: Duration, shutdown: &ShutdownWatch) -> bool {
    let mut shutdown = shutdown.clone();
    let readable = poll_fn(|cx| Pin::new(&mut *stream).poll_read(cx, &mut ReadBuf::new(&mut [])));
    tokio::select! {
        biased;
        ready = readable => ready.is_ok(),
        _ = shutdown.wait_for(|closing| *closing) => false,
        _ = tokio::time::sleep(idle) => false,
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for Guarded<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let accepted = Instant::now();
        // Every listener is plain TCP to Pingora, which hands the socket
        // over as it accepted it.
        let mut l4 = *stream.into_any().downcast::<L4Stream>().ok()?;
        let peer = l4
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let first = accepted
            + self
                .tls
                .as_ref()
                .map_or(self.edge.header_timeout, |t| t.timeout);
        let client = match peer {
            Some(peer) => Some(self.client(&mut l4, peer, first).await?),
            None => None,
        };
        let _slot = match client {
            Some(ip) => match self.edge.per_ip.acquire(ip) {
                Some(slot) => slot,
                None => {
                    Rejection::PerIpLimit.count();
                    return None;
                }
            },
            None => None,
        };
        let (stream, head_since): (Stream, Instant) = match &self.tls {
            None => (Box::new(l4), accepted),
            Some(t) => {
                let shake = handshake_with_callback(&t.acceptor, l4, t.callbacks.as_ref());
                match tokio::time::timeout_at(first, shake).await {
                    Ok(Ok(tls)) => (Box::new(tls), Instant::now()),
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "TLS handshake failed");
                        return None;
                    }
                    Err(_) => {
                        Rejection::TlsHandshakeTimeout.count();
                        return None;
                    }
                }
            }
        };
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            return self.inner.process_new(stream, shutdown).await;
        }
        let stream = Box::new(HeadDeadline::new(
            stream,
            self.edge.header_timeout,
            head_since,
        ));
        match self.tls {
            None => self.keep_alive(stream, shutdown).await,
            Some(_) => self.inner.process_new(stream, shutdown).await,
        }
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}
