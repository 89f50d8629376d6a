//! The router replicas: load-balanced, health-checked, and reached over
//! (m)TLS when configured.

use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::Arc;

use pingora::lb::health_check::TcpHealthCheck;
use pingora::lb::selection::RoundRobin;
use pingora::lb::LoadBalancer;
use pingora::protocols::http::client::HttpSession as ClientSession;
use pingora::protocols::UniqueID;
use pingora::tls::pkey::PKey;
use pingora::tls::x509::X509;
use pingora::upstreams::peer::HttpPeer;
use pingora::utils::tls::CertKey;
use pingora::{Error, ErrorType, Result};
use socket2::SockRef;

use crate::config::gateway::UpstreamConfig;

/// How to reach the router: the balancer plus the TLS material loaded once.
pub struct Upstream {
    balancer: Arc<LoadBalancer<RoundRobin>>,
    cfg: UpstreamConfig,
    ca: Option<Arc<Box<[X509]>>>,
    client: Option<Arc<CertKey>>,
}

/// The replica set with TCP health checks; run it as a background service
/// (`background_service`) and hand its task to [`Upstream::new`].
pub fn balancer(cfg: &UpstreamConfig) -> std::result::Result<LoadBalancer<RoundRobin>, String> {
    let mut lb = LoadBalancer::try_from_iter(cfg.addresses.iter().copied())
        .map_err(|e| format!("upstream addresses: {e}"))?;
    lb.set_health_check(TcpHealthCheck::new());
    lb.health_check_frequency = Some(cfg.health_check_interval);
    lb.parallel_health_check = true;
    Ok(lb)
}

/// A PEM CA bundle in the form Pingora's peers take.
pub fn load_ca(path: &Path) -> std::result::Result<Arc<Box<[X509]>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs = X509::stack_from_pem(&pem).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Arc::new(certs.into_boxed_slice()))
}

impl Upstream {
    /// Loads the CA and client certificate once, for every connection.
    pub fn new(
        cfg: &UpstreamConfig,
        balancer: Arc<LoadBalancer<RoundRobin>>,
    ) -> std::result::Result<Self, String> {
        let ca = cfg.ca.as_deref().map(load_ca).transpose()?;
        let client = match (&cfg.client_cert, &cfg.client_key) {
            (Some(c), Some(k)) => {
                let cert_pem = std::fs::read(c).map_err(|e| format!("{}: {e}", c.display()))?;
                let certs =
                    X509::stack_from_pem(&cert_pem).map_err(|e| format!("{}: {e}", c.display()))?;
                if certs.is_empty() {
                    return Err(format!("{}: no certificate", c.display()));
                }
                let key_pem = std::fs::read(k).map_err(|e| format!("{}: {e}", k.display()))?;
                let key = PKey::private_key_from_pem(&key_pem)
                    .map_err(|e| format!("{}: {e}", k.display()))?;
                Some(Arc::new(CertKey::new(certs, key)))
            }
            (None, None) => None,
            _ => return Err("[upstream] client_cert and client_key go together".into()),
        };
        Ok(Upstream {
            balancer,
            cfg: cfg.clone(),
            ca,
            client,
        })
    }

    /// A peer for one request: a healthy replica with timeouts and TLS set.
    pub fn peer(&self) -> Result<Box<HttpPeer>> {
        let backend = self
            .balancer
            .select(b"", 256)
            .ok_or_else(|| Error::explain(ErrorType::ConnectNoRoute, "no healthy router"))?;
        let mut peer = HttpPeer::new(backend, self.cfg.tls, self.cfg.sni.clone());
        peer.options.connection_timeout = Some(self.cfg.connect_timeout);
        peer.options.read_timeout = Some(self.cfg.read_timeout);
        peer.options.write_timeout = Some(self.cfg.read_timeout);
        if self.cfg.tls {
            peer.options.verify_cert = self.cfg.verify;
            peer.options.verify_hostname = self.cfg.verify;
            peer.options.ca = self.ca.clone();
            peer.client_cert_key = self.client.clone();
        }
        Ok(Box::new(peer))
    }
}

/// Holds a router connection's writes in the kernel (`on`) until released
/// (`off`), so a request head and its body leave as one segment: one trip
/// through the network stack instead of two, 5 % of a 1 KiB request's CPU
/// (bench/RESULTS.md). Best effort: a socket that refuses the option just
/// sends as before.
pub fn cork(up: &ClientSession, on: bool) {
    let Some(fd) = up.as_http1().map(UniqueID::id).filter(|fd| *fd >= 0) else {
        return;
    };
    // SAFETY: `fd` is the socket `up` owns (Pingora's id of an HTTP/1 session
    // is its socket's descriptor) and `up` outlives this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    if let Err(e) = SockRef::from(&fd).set_tcp_cork(on) {
        tracing::debug!(error = %e, "TCP_CORK not applied");
    }
}
