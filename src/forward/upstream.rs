//! The router replicas: load-balanced, health-checked, and reached over
//! (m)TLS when configured.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::connectors::TransportConnector;
use pingora::lb::health_check::{HealthCheck, HttpHealthCheck};
use pingora::lb::selection::RoundRobin;
use pingora::lb::{Backend, LoadBalancer};
use pingora::protocols::l4::socket::SocketAddr;
use pingora::tls::pkey::PKey;
use pingora::tls::x509::X509;
use pingora::upstreams::peer::HttpPeer;
use pingora::utils::tls::CertKey;
use pingora::{Error, ErrorType, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use std::path::PathBuf;
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub addresses: Vec<std::net::SocketAddr>,
    pub tls: bool,
    pub sni: String,
    pub ca: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Whether the router's certificate chain and name are checked. Off
    /// only with the explicit `insecure = true`, logged at every start.
    pub verify: bool,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// How long a router connection may sit idle in a worker's pool.
    pub idle_timeout: Duration,
    /// Idle router connections each worker keeps (0: none).
    pub max_idle: usize,
    pub health_check_interval: Duration,
    /// `GET` this path as the health check (200 passes) instead of
    /// connecting (and, for TLS, handshaking).
    pub health_check_path: Option<String>,
}

/// How every connection to a replica is made, request or health check:
/// the address aside, the same TLS, SNI, CA, client certificate and
/// timeouts. The TLS material is loaded once.
#[derive(Clone)]
pub struct RouterPeers {
    cfg: UpstreamConfig,
    ca: Option<Arc<Box<[X509]>>>,
    client: Option<Arc<CertKey>>,
}

impl RouterPeers {
    pub fn load(cfg: &UpstreamConfig) -> std::result::Result<Self, String> {
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
        Ok(RouterPeers {
            cfg: cfg.clone(),
            ca,
            client,
        })
    }

    /// A peer for `addr` with timeouts and TLS set.
    fn peer(&self, addr: std::net::SocketAddr) -> HttpPeer {
        let mut peer = HttpPeer::new(addr, self.cfg.tls, self.cfg.sni.clone());
        peer.options.connection_timeout = Some(self.cfg.connect_timeout);
        peer.options.read_timeout = Some(self.cfg.read_timeout);
        peer.options.write_timeout = Some(self.cfg.read_timeout);
        if self.cfg.tls {
            peer.options.verify_cert = self.cfg.verify;
            peer.options.verify_hostname = self.cfg.verify;
            peer.options.ca = self.ca.clone();
            peer.client_cert_key = self.client.clone();
        }
        peer
    }

    /// The peer a health check starts from (it sets each replica's
    /// address): a check that has not finished within one interval has
    /// failed.
    fn check_template(&self) -> HttpPeer {
        let mut peer = self.peer(std::net::SocketAddr::from(([0, 0, 0, 0], 1)));
        let limit = self.cfg.health_check_interval.max(self.cfg.connect_timeout);
        peer.options.read_timeout = Some(limit);
        peer.options.write_timeout = Some(limit);
        peer
    }
}

/// The replica set with its health checks; run it as a background service
/// (`background_service`) and hand its task to [`Upstream::new`].
///
/// A replica is checked the way requests reach it: a TLS router gets a
/// whole handshake with the configured SNI, CA and client certificate (a
/// bare TCP connect would leave it a failed handshake per interval from
/// every gateway), a plaintext one a TCP connect; with
/// `health_check_path`, a `GET` of that path that must answer 200. A
/// replica that fails is marked down until a check passes again.
pub fn balancer(peers: &RouterPeers) -> std::result::Result<LoadBalancer<RoundRobin>, String> {
    let cfg = &peers.cfg;
    let mut lb = LoadBalancer::try_from_iter(cfg.addresses.iter().copied())
        .map_err(|e| format!("upstream addresses: {e}"))?;
    let template = peers.check_template();
    match &cfg.health_check_path {
        Some(path) => {
            let host = match (cfg.sni.as_str(), cfg.addresses.first()) {
                ("", Some(first)) => first.to_string(),
                (sni, _) => sni.to_string(),
            };
            let mut check = HttpHealthCheck::new(&host, cfg.tls);
            check.peer_template = template;
            check.req.set_uri(
                path.parse()
                    .map_err(|e| format!("health_check_path: {e}"))?,
            );
            lb.set_health_check(Box::new(check));
        }
        None => lb.set_health_check(Box::new(ConnectCheck {
            template,
            connector: TransportConnector::new(None),
        })),
    }
    lb.health_check_frequency = Some(cfg.health_check_interval);
    lb.parallel_health_check = true;
    Ok(lb)
}

/// Passes when a connection (with its TLS handshake, for a TLS router) is
/// made and, for TLS, not refused right after; then closes it cleanly, so a
/// TLS router gets a close_notify rather than a dropped connection.
struct ConnectCheck {
    template: HttpPeer,
    connector: TransportConnector,
}

/// How long a TLS check waits after its handshake for a refusal. In TLS
/// 1.3 the client's side of the handshake is done before the server has
/// checked the client certificate; a router that refuses it says so with an
/// alert, which arrives on the first read.
const TLS_REFUSAL_WAIT: Duration = Duration::from_millis(100);

#[async_trait]
impl HealthCheck for ConnectCheck {
    fn health_threshold(&self, _success: bool) -> usize {
        1
    }

    async fn check(&self, target: &Backend) -> Result<()> {
        let mut peer = self.template.clone();
        peer._address = target.addr.clone();
        let (mut stream, _) = self.connector.get_stream(&peer).await?;
        if peer.is_tls() {
            let mut byte = [0u8; 1];
            match tokio::time::timeout(TLS_REFUSAL_WAIT, stream.read(&mut byte)).await {
                // Silent: it waits for a request, as a router should.
                Err(_) | Ok(Ok(1..)) => {}
                Ok(Ok(0)) => {
                    return Error::e_explain(
                        ErrorType::ConnectionClosed,
                        "the router closed the connection after the handshake",
                    )
                }
                Ok(Err(e)) => {
                    return Error::e_because(
                        ErrorType::TLSHandshakeFailure,
                        "the router refused the handshake",
                        e,
                    )
                }
            }
        }
        if let Err(e) = stream.shutdown().await {
            tracing::debug!(error = %e, "router health check connection did not close cleanly");
        }
        Ok(())
    }
}

/// A PEM CA bundle in the form Pingora's peers take.
pub fn load_ca(path: &Path) -> std::result::Result<Arc<Box<[X509]>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let certs = X509::stack_from_pem(&pem).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Arc::new(certs.into_boxed_slice()))
}

/// How to reach the router: the healthy replicas, and how to connect.
pub struct Upstream {
    balancer: Arc<LoadBalancer<RoundRobin>>,
    peers: RouterPeers,
}

impl Upstream {
    pub fn new(peers: RouterPeers, balancer: Arc<LoadBalancer<RoundRobin>>) -> Self {
        Upstream { balancer, peers }
    }

    /// A peer for one request: a healthy replica with timeouts and TLS set.
    pub fn peer(&self) -> Result<Box<HttpPeer>> {
        let backend = self
            .balancer
            .select(b"", 256)
            .ok_or_else(|| Error::explain(ErrorType::ConnectNoRoute, "no healthy router"))?;
        match backend.addr {
            SocketAddr::Inet(addr) => Ok(Box::new(self.peers.peer(addr))),
            // Replicas are configured as IP addresses only.
            SocketAddr::Unix(_) => Error::e_explain(ErrorType::ConnectNoRoute, "no IP router"),
        }
    }
}
