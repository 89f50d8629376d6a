//! Assembles the Pingora server from a validated configuration: the proxy
//! listeners, the admin listener and the background services.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::apps::HttpServerOptions;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::protocols::http::v2::server::H2Options;
use pingora::proxy::http_proxy;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::server::ShutdownWatch;
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use pingora::tls::ssl::{
    select_next_proto, AlpnError, SslAcceptor, SslFiletype, SslMethod, SslVerifyMode, SslVersion,
};
use pingora::tls::x509::X509Name;

use crate::admin::Admin;
use crate::config::reload::{ReloadService, Reloader};
use crate::config::{SharedSnapshot, Snapshot};
use crate::connection::{Edge, Guarded, Handshake};
use crate::forward::pool::RouterPool;
use crate::forward::upstream::{self, RouterPeers, Upstream, UpstreamConfig};
use crate::identity::jwks_fetch::JwksRefreshService;
use crate::identity::mtls::{
    client_verify_store, CertCallbacks, ClientCertMode, TlsListenerConfig, TlsMaterial,
};
use crate::inbound::HeadLimits;
use crate::limits::guard::{AuthFailures, BodyBudget, Overload};
use crate::limits::redis::{BreakerProbe, RedisLimits};
use crate::limits::{state, Limiter, LimitsBackend};
use crate::observe::logging::LoggingService;
use crate::observe::metrics::METRICS;
use crate::observe::telemetry::Telemetry;
use crate::proxy::Gateway;

/// Pingora's process-level flags, as `portcullis serve` accepts them.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessFlags {
    /// `-d`: daemonise.
    pub daemon: bool,
    /// `-u`: take the listening sockets over from a running instance.
    pub upgrade: bool,
}

/// Loads the configuration at `path` and serves until shut down.
pub fn serve(path: &Path, flags: ProcessFlags) -> Result<(), String> {
    // Daemonising changes the working directory: every path must be absolute.
    let path = &std::path::absolute(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let snapshot = Snapshot::load(path).map_err(|e| e.to_string())?;
    let gw = snapshot.gateway.clone();

    let conf = ServerConf {
        threads: gw.server.threads,
        pid_file: gw.server.pid_file.clone(),
        upgrade_sock: gw.server.upgrade_sock.clone(),
        grace_period_seconds: Some(gw.server.grace_period_seconds),
        graceful_shutdown_timeout_seconds: Some(gw.server.graceful_shutdown_timeout_seconds),
        daemon: flags.daemon,
        // One single-threaded runtime per worker thread: a proxy's tasks are
        // short, and a work-stealing scheduler's cross-thread bookkeeping
        // costs more per request than it balances.
        work_stealing: false,
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade: flags.upgrade,
        daemon: flags.daemon,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();
    // Exported at zero from the start, so an alert on them has a series.
    for engine in ["rego", "ext_authz"] {
        METRICS.policy_errors.with_label_values(&[engine]);
    }
    let warnings = insecure_settings(&gw.upstream);
    for w in &warnings {
        eprintln!("WARNING: {w}");
    }
    let rego_notes = snapshot
        .policies
        .rego
        .iter()
        .flat_map(|r| r.compiler_notes().iter().cloned())
        .collect();
    server.add_service(background_service(
        "logging",
        LoggingService {
            warnings,
            rego_notes,
        },
    ));

    let peers = RouterPeers::load(&gw.upstream)?;
    let health = background_service("router health checks", upstream::balancer(&peers)?);
    let balancer = health.task();
    let upstream = Upstream::new(peers, balancer.clone());

    if let Some(refresh) = snapshot.auth.jwks_refresh.clone() {
        server.add_service(background_service(
            "jwks refresh",
            JwksRefreshService(refresh),
        ));
    }
    let mut handoff = None;
    let limiter = match gw.limits.backend {
        LimitsBackend::Local => {
            // After bootstrap: an upgrade's sockets have arrived, so the old
            // process has been told to hand over and has written its state.
            if flags.upgrade {
                handoff =
                    state::take_handoff(&gw.limits.state_file, &snapshot.tenants, HANDOFF_WAIT);
            } else {
                state::restore_logged(&gw.limits.state_file, &snapshot.tenants);
            }
            Limiter::Local
        }
        LimitsBackend::Redis => {
            let url = gw.limits.redis_url.as_deref().unwrap_or_default();
            let backend = Arc::new(RedisLimits::new(
                url,
                gw.limits.redis_timeout,
                gw.limits.on_backend_error,
            )?);
            server.add_service(background_service(
                "limits backend probe",
                BreakerProbe(backend.clone()),
            ));
            Limiter::Fleet(backend)
        }
    };

    // Listener certificates live outside the snapshot: the reloader swaps
    // them in for new connections when their files change.
    let tls_material = match &gw.server.tls {
        Some(t) => Some(Arc::new(ArcSwap::from_pointee(TlsMaterial::load(t)?))),
        None => None,
    };
    let shared = Arc::new(ArcSwap::from_pointee(snapshot));
    if gw.limits.backend == LimitsBackend::Local {
        server.add_service(background_service(
            "limit state",
            StateSaver {
                path: gw.limits.state_file.clone(),
                snapshot: shared.clone(),
                handoff,
            },
        ));
    }
    let reloader = Arc::new(Reloader::new(path, shared.clone(), tls_material.clone()));
    server.add_service(background_service(
        "config reload",
        ReloadService(reloader.clone()),
    ));
    let mut options = HttpServerOptions::default();
    options.h2c = true;
    // Pingora counts reuses after the first request.
    options.keepalive_request_limit = Some(gw.server.max_requests_per_connection - 1);
    options.h2_idle_timeout = Some(gw.server.idle_timeout);
    crate::observe::metrics::configure_tenant_label(
        gw.observe.tenant_label,
        gw.observe.max_tenant_series,
    );
    let telemetry = gw.telemetry.as_ref().map(|t| {
        let (telemetry, exporter) = Telemetry::new(t);
        server.add_service(background_service("otlp export", exporter));
        Arc::new(telemetry)
    });
    let mut app = http_proxy(
        &server.configuration,
        Gateway {
            telemetry,
            snapshot: shared,
            upstream,
            pool: RouterPool::new(gw.upstream.idle_timeout, gw.upstream.max_idle),
            auth_failures: AuthFailures::new(gw.limits.auth_failures_per_ip_per_minute),
            overload: Overload::new(gw.limits.max_inflight),
            bodies: BodyBudget::default(),
            limiter,
        },
    );
    app.server_options = Some(options);
    app.h2_options = Some(h2_options(&gw.server.head_limits));
    // One application behind two listener groups, each with its own
    // connection stage (the PROXY mode, and the handshake on TLS ones).
    let app = Arc::new(app);
    let edge = Edge::new(
        gw.server.max_connections_per_ip,
        gw.server.trusted_proxies.clone(),
        gw.server.request_header_timeout,
        gw.server.idle_timeout,
    );
    let mut proxy = Service::new(
        "portcullis proxy".into(),
        Guarded::new(app.clone(), edge.clone(), gw.server.proxy_protocol, None),
    );
    for addr in &gw.server.listen {
        proxy.add_listener(ListenerConfig::tcp(addr.to_string()).l4_buffer(l4_buffers()));
    }
    server.add_service(proxy);
    if let (Some(tls), Some(material)) = (&gw.server.tls, &tls_material) {
        let handshake = Handshake {
            acceptor: tls_acceptor(tls)?,
            callbacks: Arc::new(CertCallbacks {
                required: tls.client_cert == ClientCertMode::Required,
                material: material.clone(),
            }),
            timeout: tls.handshake_timeout,
        };
        let mut proxy = Service::new(
            "portcullis tls proxy".into(),
            Guarded::new(app, edge, tls.proxy_protocol, Some(handshake)),
        );
        // Pingora's default buffers: TLS reads whole records.
        for addr in &tls.listen {
            proxy.add_listener(ListenerConfig::tcp(addr.to_string()));
        }
        server.add_service(proxy);
    }
    server.add_service(health);

    if let Some(addr) = gw.admin {
        let mut admin = Service::new("portcullis admin".into(), Admin { balancer, reloader });
        admin.add_tcp(&addr.to_string());
        server.add_service(admin);
    }
    server.run_forever()
}

/// How long an upgrade's new process waits for the old one's handoff.
const HANDOFF_WAIT: Duration = Duration::from_secs(3);
/// How long it watches for the old one's tail: beyond Pingora's close
/// window and any graceful shutdown an operator would configure.
const TAIL_WAIT: Duration = Duration::from_secs(600);

/// Writes the local limit state every [`state::SAVE_EVERY`] and once more
/// at shutdown, so a restart goes on from it. Told to upgrade (SIGQUIT,
/// the signal Pingora hands its sockets over on), it writes the handoff
/// file at once for the new process and stops writing the state file: from
/// then on the new process owns it. At shutdown after a handoff it writes
/// the tail instead (what this process did since), and a new process that
/// took a handoff watches for that tail and charges it.
struct StateSaver {
    path: PathBuf,
    snapshot: SharedSnapshot,
    /// The handoff this process started from, while its tail is awaited.
    handoff: Option<state::Saved>,
}

impl StateSaver {
    fn save_to(&self, path: &Path) {
        if let Err(e) = state::save(path, &self.snapshot.load().tenants) {
            tracing::warn!(error = %e, path = %path.display(), "could not write the limit state");
        }
    }
}

#[async_trait]
impl BackgroundService for StateSaver {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut every = tokio::time::interval(state::SAVE_EVERY);
        every.tick().await;
        let mut upgrade = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::quit()).ok();
        let mut handed_over = false;
        let mut tail = self
            .handoff
            .as_ref()
            .map(|h| (h, tokio::time::interval(Duration::from_millis(100))));
        let tail_deadline = tokio::time::Instant::now() + TAIL_WAIT;
        loop {
            tokio::select! {
                _ = every.tick(), if !handed_over => self.save_to(&self.path),
                _ = shutdown.changed() => break,
                Some(()) = async { upgrade.as_mut()?.recv().await }, if !handed_over => {
                    self.save_to(&state::handoff_path(&self.path));
                    tracing::info!("limit state handed over to the upgrade");
                    handed_over = true;
                }
                Some(handoff) = async {
                    let (h, poll) = tail.as_mut()?;
                    poll.tick().await;
                    Some(*h)
                } => {
                    let tenants = &self.snapshot.load().tenants;
                    if state::take_tail(&self.path, handoff, tenants) {
                        tail = None;
                    } else if tokio::time::Instant::now() > tail_deadline {
                        tracing::warn!("limit state: the old process left no tail");
                        tail = None;
                    }
                }
            }
        }
        let at = if handed_over {
            state::tail_path(&self.path)
        } else {
            self.path.clone()
        };
        self.save_to(&at);
    }
}

/// Per-connection socket buffers. Pingora's default read buffer is 64 KiB,
/// allocated for every connection and held while it idles. Plaintext needs
/// none: Pingora's HTTP/1 session reads the head into its own buffer and a
/// body into the body's, so a second buffer in front only copies (measured
/// per idle connection: 92 KiB with 64, 44.6 with 16, 28.7 with none).
fn l4_buffers() -> L4BufferSettings {
    L4BufferSettings::default().read(0)
}

/// HTTP/2 limits, explicit rather than inherited: streams per connection,
/// the decoded header block (the same bound as HTTP/1's header bytes),
/// and the streams a client may reset before the gateway accepted them
/// (beyond it the connection gets GOAWAY: the rapid-reset defence of
/// CVE-2023-44487). CONTINUATION floods are bounded by the header-list
/// limit in h2 >= 0.4.4, which Cargo.toml requires.
fn h2_options(limits: &HeadLimits) -> H2Options {
    let mut o = H2Options::default();
    o.max_concurrent_streams(100)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(Some(1024));
    o
}

/// Settings that weaken security: each is printed on stderr at start, logged
/// at WARN once logging is up, and visible as a metric for alerting.
fn insecure_settings(upstream: &UpstreamConfig) -> Vec<String> {
    let insecure = upstream.tls && !upstream.verify;
    METRICS.upstream_insecure.set(i64::from(insecure));
    if insecure {
        let routers: Vec<String> = upstream.addresses.iter().map(|a| a.to_string()).collect();
        vec![format!(
            "[upstream] insecure = true: the router's certificate is NOT verified; anyone \
             who can intercept the connection to {} receives every prompt",
            routers.join(", ")
        )]
    } else {
        Vec::new()
    }
}

/// TLS 1.2+ with Mozilla's intermediate suites, ALPN h2 then http/1.1,
/// and client-certificate verification per `client_cert`. The listener's
/// files at start are the fallback; [`CertCallbacks`] swaps in the current
/// ones for each handshake.
fn tls_acceptor(tls: &TlsListenerConfig) -> Result<SslAcceptor, String> {
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls())
        .map_err(|e| format!("[server.tls]: {e}"))?;
    b.set_certificate_chain_file(&tls.cert)
        .map_err(|e| format!("[server.tls] cert: {e}"))?;
    b.set_private_key_file(&tls.key, SslFiletype::PEM)
        .map_err(|e| format!("[server.tls] key: {e}"))?;
    b.check_private_key()
        .map_err(|e| format!("[server.tls] key does not match cert: {e}"))?;
    b.set_alpn_select_callback(|_, offered| {
        select_next_proto(b"\x02h2\x08http/1.1", offered).ok_or(AlpnError::NOACK)
    });
    b.set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(|e| format!("[server.tls]: {e}"))?;
    if let Some(ca) = &tls.client_ca {
        b.set_verify_cert_store(client_verify_store(ca, tls.crl.as_deref())?)
            .map_err(|e| format!("[server.tls] client_ca: {e}"))?;
        // Tell clients which CA their certificate must chain to.
        let names = X509Name::load_client_ca_file(ca)
            .map_err(|e| format!("[server.tls] client_ca: {e}"))?;
        b.set_client_ca_list(names);
    }
    match tls.client_cert {
        ClientCertMode::None => {}
        ClientCertMode::Optional => b.set_verify(SslVerifyMode::PEER),
        ClientCertMode::Required => {
            b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT)
        }
    }
    Ok(b.build())
}
