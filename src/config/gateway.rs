//! `gateway.toml`: the process-level settings (listeners, router, JWT, limits
//! backend, policy paths, context key), parsed strictly and resolved once.
//!
//! Every table denies unknown keys: a misspelt limit must fail the load,
//! never silently switch a check off.

use crate::forward::upstream::UpstreamConfig;
use crate::identity::jwt::{JwksSource, JwtConfig};
use crate::identity::mtls::{ClientCertMode, TlsListenerConfig};
use crate::inbound::HeadLimits;
use crate::limits::{LimitsBackend, LimitsConfig, OnBackendError};
use crate::policy::ext_authz::ExtAuthzConfig;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::diag::{Diagnostic, SourceFile};
use crate::body::policy::OverCap;
use crate::body::BodyConfig;
use crate::connection::proxy_header::{ProxyProtocol, TrustedProxies};
use crate::observe::metrics::TenantLabel;
use crate::observe::telemetry::{Protocol, TelemetryConfig};

/// The largest clock-skew allowance accepted for JWT `exp`/`nbf`.
pub const MAX_JWT_LEEWAY_SECONDS: u64 = 30;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGateway {
    server: RawServer,
    admin: Option<RawAdmin>,
    upstream: RawUpstream,
    auth: Option<RawAuth>,
    limits: Option<RawLimits>,
    policy: RawPolicy,
    context: RawContext,
    body: Option<RawBody>,
    telemetry: Option<RawTelemetry>,
    observe: Option<RawObserve>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTelemetry {
    otlp_endpoint: Spanned<String>,
    #[serde(default)]
    protocol: Protocol,
    #[serde(default = "default_service_name")]
    service_name: String,
    #[serde(default = "default_sample_ratio")]
    sample_ratio: Spanned<f64>,
    #[serde(default = "default_export_timeout")]
    export_timeout_ms: u64,
    #[serde(default = "default_queue_size")]
    queue_size: usize,
}

fn default_service_name() -> String {
    "portcullis".into()
}
fn default_sample_ratio() -> Spanned<f64> {
    Spanned::new(0..0, 1.0)
}
fn default_export_timeout() -> u64 {
    2000
}
fn default_queue_size() -> usize {
    8192
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawObserve {
    #[serde(default)]
    tenant_label: TenantLabel,
    #[serde(default = "default_max_tenant_series")]
    max_tenant_series: usize,
}

fn default_max_tenant_series() -> usize {
    10_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBody {
    max_body_bytes: Option<u64>,
    max_buffered_bytes: Option<u64>,
    read_timeout_ms: Option<u64>,
    min_bytes_per_second: Option<u64>,
    max_depth: Option<usize>,
    max_tokens_over_cap: Option<OverCap>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    #[serde(default)]
    listen: Vec<Spanned<String>>,
    #[serde(default = "default_threads")]
    threads: usize,
    region: String,
    #[serde(default = "default_grace")]
    grace_period_seconds: u64,
    #[serde(default = "default_shutdown_timeout")]
    graceful_shutdown_timeout_seconds: u64,
    #[serde(default = "default_pid_file")]
    pid_file: String,
    #[serde(default = "default_upgrade_sock")]
    upgrade_sock: String,
    max_request_target_bytes: Option<usize>,
    max_header_bytes: Option<usize>,
    max_headers: Option<usize>,
    #[serde(default = "default_idle_timeout")]
    idle_timeout_seconds: u64,
    #[serde(default = "default_requests_per_connection")]
    max_requests_per_connection: u32,
    #[serde(default = "default_header_timeout")]
    request_header_timeout_ms: u64,
    #[serde(default = "default_connections_per_ip")]
    max_connections_per_ip: u32,
    #[serde(default)]
    proxy_protocol: ProxyProtocol,
    #[serde(default)]
    trusted_proxies: Vec<String>,
    tls: Option<RawTls>,
}

fn default_header_timeout() -> u64 {
    10_000
}
fn default_connections_per_ip() -> u32 {
    256
}

fn default_idle_timeout() -> u64 {
    60
}
fn default_requests_per_connection() -> u32 {
    1000
}
fn default_threads() -> usize {
    1
}
fn default_grace() -> u64 {
    30
}
fn default_shutdown_timeout() -> u64 {
    2
}
fn default_pid_file() -> String {
    "/run/portcullis/portcullis.pid".into()
}
fn default_upgrade_sock() -> String {
    "/run/portcullis/upgrade.sock".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    listen: Vec<Spanned<String>>,
    cert: Spanned<String>,
    key: Spanned<String>,
    client_ca: Option<Spanned<String>>,
    /// PEM certificate revocation lists for the client CA(s).
    crl: Option<Spanned<String>>,
    #[serde(default)]
    client_cert: ClientCertMode,
    /// Defaults to `[server] proxy_protocol`.
    proxy_protocol: Option<ProxyProtocol>,
    #[serde(default = "default_handshake_timeout")]
    handshake_timeout_ms: u64,
}

fn default_handshake_timeout() -> u64 {
    10_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    address: Spanned<OneOrMany>,
    #[serde(default)]
    tls: bool,
    sni: Option<String>,
    ca: Option<Spanned<String>>,
    client_cert: Option<Spanned<String>>,
    client_key: Option<Spanned<String>>,
    verify: Option<Spanned<bool>>,
    insecure: Option<Spanned<bool>>,
    #[serde(default = "default_connect_timeout")]
    connect_timeout_ms: u64,
    #[serde(default = "default_read_timeout")]
    read_timeout_ms: u64,
    #[serde(default = "default_pool_idle_timeout")]
    idle_timeout_ms: u64,
    #[serde(default = "default_max_idle")]
    max_idle_connections: usize,
    #[serde(default = "default_health_check_ms")]
    health_check_interval_ms: u64,
    health_check_path: Option<Spanned<String>>,
}

fn default_connect_timeout() -> u64 {
    1000
}
fn default_read_timeout() -> u64 {
    300_000
}
/// nginx's upstream `keepalive_timeout`.
fn default_pool_idle_timeout() -> u64 {
    60_000
}
/// Per worker thread, like nginx's `keepalive 128` per worker process.
fn default_max_idle() -> usize {
    128
}
fn default_health_check_ms() -> u64 {
    1000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    jwt: Option<RawJwt>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwt {
    issuer: String,
    audiences: Vec<String>,
    jwks_file: Option<Spanned<String>>,
    jwks_url: Option<Spanned<String>>,
    #[serde(default = "default_tenant_claim")]
    tenant_claim: String,
    #[serde(default = "default_leeway")]
    leeway_seconds: Spanned<u64>,
    #[serde(default = "default_algorithms")]
    algorithms: Vec<Spanned<String>>,
    #[serde(default = "default_jwks_refresh")]
    jwks_refresh_seconds: u64,
    #[serde(default = "default_unknown_kid_refresh")]
    jwks_unknown_kid_refresh_seconds: u64,
    #[serde(default = "default_token_cache")]
    token_cache_entries: usize,
}

fn default_leeway() -> Spanned<u64> {
    Spanned::new(0..0, 0)
}
fn default_tenant_claim() -> String {
    "tenant".into()
}
fn default_algorithms() -> Vec<Spanned<String>> {
    ["RS256", "ES256", "EdDSA", "HS256"]
        .iter()
        .map(|a| Spanned::new(0..0, a.to_string()))
        .collect()
}
fn default_jwks_refresh() -> u64 {
    300
}
fn default_unknown_kid_refresh() -> u64 {
    10
}
fn default_token_cache() -> usize {
    100_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default)]
    backend: LimitsBackend,
    redis_url: Option<RedisUrl>,
    #[serde(default)]
    on_backend_error: OnBackendError,
    #[serde(default = "default_auth_failures")]
    auth_failures_per_ip_per_minute: u32,
    #[serde(default = "default_max_inflight")]
    max_inflight: usize,
    #[serde(default = "default_redis_timeout")]
    redis_timeout_ms: u64,
    /// Default: `portcullis-limits.json` beside the pid file.
    state_file: Option<String>,
}

/// One Redis URL, or a Redis Cluster's nodes as a list.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RedisUrl {
    One(String),
    Cluster(Vec<String>),
}

impl RedisUrl {
    /// The one-string form: a list is `redis+cluster://` and its nodes.
    fn joined(self) -> String {
        match self {
            RedisUrl::One(url) => url,
            RedisUrl::Cluster(nodes) => {
                let nodes: Vec<&str> = nodes
                    .iter()
                    .map(|n| {
                        n.trim_start_matches("redis+cluster://")
                            .trim_start_matches("redis://")
                    })
                    .collect();
                format!("redis+cluster://{}", nodes.join(","))
            }
        }
    }
}

fn default_redis_timeout() -> u64 {
    50
}

fn default_max_inflight() -> usize {
    10_000
}

fn default_auth_failures() -> u32 {
    60
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    tenants: Spanned<String>,
    routes: Option<Spanned<String>>,
    schemas: Option<Spanned<String>>,
    rego: Option<Spanned<String>>,
    rego_timeout_ms: Option<u64>,
    jwt_claims: Option<Vec<String>>,
    ext_authz: Option<RawExtAuthz>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExtAuthz {
    url: Spanned<String>,
    ca: Option<Spanned<String>>,
    timeout_ms: Option<u64>,
    #[serde(default)]
    failure_mode_allow: bool,
    #[serde(default)]
    allowed_headers: Vec<Spanned<String>>,
    #[serde(default)]
    allowed_upstream_headers: Vec<Spanned<String>>,
    cache_ttl_ms: Option<u64>,
    cache_entries: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawContext {
    signing_key_file: Spanned<String>,
}

/// The validated `gateway.toml`, with every path resolved.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub path: PathBuf,
    pub server: ServerConfig,
    pub admin: Option<SocketAddr>,
    pub upstream: UpstreamConfig,
    pub jwt: Option<JwtConfig>,
    pub limits: LimitsConfig,
    pub policy: PolicyConfig,
    pub context_key_file: PathBuf,
    pub body: BodyConfig,
    /// `[telemetry]`: traces are exported only when it is present.
    pub telemetry: Option<TelemetryConfig>,
    pub observe: ObserveConfig,
}

/// `[observe]`: what the metrics' `tenant` label holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObserveConfig {
    pub tenant_label: TenantLabel,
    pub max_tenant_series: usize,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: Vec<SocketAddr>,
    pub threads: usize,
    pub region: String,
    pub grace_period_seconds: u64,
    pub graceful_shutdown_timeout_seconds: u64,
    pub pid_file: String,
    pub upgrade_sock: String,
    pub head_limits: HeadLimits,
    /// An idle keep-alive connection (HTTP/1.1 or HTTP/2) closes after this.
    pub idle_timeout: Duration,
    /// A connection closes after serving this many requests.
    pub max_requests_per_connection: u32,
    /// A request head must arrive whole within this of its first byte
    /// (of the connection, for the first request): slowloris.
    pub request_header_timeout: Duration,
    /// Open connections from one client address (an IPv6 /64); 0 is no limit.
    pub max_connections_per_ip: u32,
    /// Whether the plain listeners read a PROXY header first.
    pub proxy_protocol: ProxyProtocol,
    pub trusted_proxies: TrustedProxies,
    pub tls: Option<TlsListenerConfig>,
}

#[derive(Debug, Clone)]
pub struct PolicyConfig {
    pub tenants: PathBuf,
    /// The routes file; without it, the built-in table.
    pub routes: Option<PathBuf>,
    pub schemas: Option<PathBuf>,
    /// A `.rego` file, or a folder of them.
    pub rego: Option<PathBuf>,
    /// The most one Rego evaluation may take; beyond it, `policy_error`.
    pub rego_timeout: Duration,
    /// JWT claims a policy may read (`input.identity.claims`); others stay hidden.
    pub jwt_claims: Vec<String>,
    pub ext_authz: Option<ExtAuthzConfig>,
}

/// Parses and validates `gateway.toml`, collecting every problem found.
pub fn load(path: &Path) -> Result<GatewayConfig, Vec<Diagnostic>> {
    let src = SourceFile::read(path).map_err(|d| vec![d])?;
    let raw: RawGateway = src.parse_toml().map_err(|d| vec![d])?;
    let mut errs = Vec::new();

    let listen = socket_addrs(&src, &raw.server.listen, &mut errs);
    if raw.server.threads == 0 {
        errs.push(src.at(None, "[server] threads must be at least 1"));
    }
    if raw.server.region.trim().is_empty() {
        errs.push(src.at(None, "[server] region must not be empty"));
    }
    let tls = raw.server.tls.map(|t| {
        let client_ca = t
            .client_ca
            .as_ref()
            .map(|p| existing_file(&src, p, &mut errs));
        if t.client_cert != ClientCertMode::None && client_ca.is_none() {
            errs.push(src.at(
                None,
                "[server.tls] client_cert = \"optional\" or \"required\" needs client_ca",
            ));
        }
        let crl = t.crl.as_ref().map(|p| existing_file(&src, p, &mut errs));
        if crl.is_some() && client_ca.is_none() {
            errs.push(src.at(
                t.crl.as_ref().map(Spanned::span),
                "[server.tls] crl needs client_ca: it revokes client certificates",
            ));
        }
        TlsListenerConfig {
            listen: socket_addrs(&src, &t.listen, &mut errs),
            cert: existing_file(&src, &t.cert, &mut errs),
            key: existing_file(&src, &t.key, &mut errs),
            client_ca,
            crl,
            client_cert: t.client_cert,
            proxy_protocol: t.proxy_protocol.unwrap_or(raw.server.proxy_protocol),
            handshake_timeout: Duration::from_millis(t.handshake_timeout_ms.max(100)),
        }
    });
    let trusted_proxies = TrustedProxies::parse(&raw.server.trusted_proxies).unwrap_or_else(|e| {
        errs.push(src.at(None, format!("[server] trusted_proxies: {e}")));
        TrustedProxies::default()
    });
    let proxied = raw.server.proxy_protocol != ProxyProtocol::Off
        || tls
            .as_ref()
            .is_some_and(|t| t.proxy_protocol != ProxyProtocol::Off);
    if proxied && trusted_proxies.is_empty() {
        errs.push(src.at(
            None,
            "proxy_protocol needs [server] trusted_proxies, the balancers' addresses \
             (to trust every address, say so: [\"0.0.0.0/0\", \"::/0\"])",
        ));
    }
    if listen.is_empty() && tls.as_ref().is_none_or(|t| t.listen.is_empty()) {
        errs.push(src.at(
            None,
            "[server] needs at least one listener (listen or tls.listen)",
        ));
    }

    let admin = raw
        .admin
        .as_ref()
        .and_then(|a| socket_addr(&src, &a.listen, &mut errs));

    let up = raw.upstream;
    let span = up.address.span();
    let named: Vec<Spanned<String>> = match up.address.get_ref() {
        OneOrMany::One(a) => vec![Spanned::new(span.clone(), a.clone())],
        OneOrMany::Many(list) => list
            .iter()
            .map(|a| Spanned::new(span.clone(), a.clone()))
            .collect(),
    };
    let addresses = socket_addrs(&src, &named, &mut errs);
    if addresses.is_empty() {
        errs.push(src.at(None, "[upstream] address must name at least one router"));
    }
    let opt_file = |p: &Option<Spanned<String>>, errs: &mut Vec<Diagnostic>| {
        p.as_ref().map(|p| existing_file(&src, p, errs))
    };
    let upstream = UpstreamConfig {
        addresses,
        tls: up.tls,
        sni: up.sni.unwrap_or_default(),
        ca: if up.tls {
            opt_file(&up.ca, &mut errs)
        } else {
            None
        },
        client_cert: if up.tls {
            opt_file(&up.client_cert, &mut errs)
        } else {
            None
        },
        client_key: if up.tls {
            opt_file(&up.client_key, &mut errs)
        } else {
            None
        },
        verify: up.verify.as_ref().is_none_or(|v| *v.get_ref()),
        connect_timeout: Duration::from_millis(up.connect_timeout_ms.max(1)),
        read_timeout: Duration::from_millis(up.read_timeout_ms.max(1)),
        idle_timeout: Duration::from_millis(up.idle_timeout_ms),
        max_idle: up.max_idle_connections,
        health_check_interval: Duration::from_millis(up.health_check_interval_ms.max(100)),
        health_check_path: up.health_check_path.as_ref().and_then(|p| {
            let path = p.get_ref();
            let valid = path.starts_with('/') && path.parse::<http::uri::PathAndQuery>().is_ok();
            if !valid {
                errs.push(src.at(
                    Some(p.span()),
                    "[upstream] health_check_path must be a path that starts with /",
                ));
            }
            valid.then(|| path.clone())
        }),
    };
    let insecure = up.insecure.as_ref().is_some_and(|v| *v.get_ref());
    let span = |v: &Option<Spanned<bool>>| v.as_ref().map(Spanned::span);
    match (upstream.verify, insecure) {
        (false, false) => errs.push(src.at(
            span(&up.verify),
            "[upstream] verify = false sends prompts to a router nobody authenticated; \
             add insecure = true to accept that (it is logged at every start)",
        )),
        (true, true) => errs.push(src.at(
            span(&up.insecure),
            "[upstream] insecure = true only acknowledges verify = false; remove it",
        )),
        _ => {}
    }
    if !upstream.tls && !upstream.verify {
        errs.push(src.at(
            span(&up.verify),
            "[upstream] verify applies only with tls = true",
        ));
    }
    if upstream.tls && upstream.verify && upstream.sni.is_empty() {
        errs.push(src.at(
            None,
            "[upstream] tls = true needs sni: an empty SNI disables certificate verification",
        ));
    }

    let jwt = raw
        .auth
        .and_then(|a| a.jwt)
        .map(|j| jwt_config(&src, j, &mut errs));

    let pid_file = src.resolve(&raw.server.pid_file);
    let beside_pid = pid_file.with_file_name("portcullis-limits.json");
    let limits = raw.limits.map_or(
        LimitsConfig {
            state_file: beside_pid.clone(),
            backend: LimitsBackend::Local,
            redis_url: None,
            on_backend_error: OnBackendError::Local,
            auth_failures_per_ip_per_minute: default_auth_failures(),
            max_inflight: default_max_inflight(),
            redis_timeout: Duration::from_millis(default_redis_timeout()),
        },
        |l| LimitsConfig {
            state_file: l
                .state_file
                .as_deref()
                .map_or(beside_pid.clone(), |f| src.resolve(f)),
            backend: l.backend,
            redis_url: l.redis_url.map(RedisUrl::joined),
            on_backend_error: l.on_backend_error,
            auth_failures_per_ip_per_minute: l.auth_failures_per_ip_per_minute,
            max_inflight: l.max_inflight.max(1),
            redis_timeout: Duration::from_millis(l.redis_timeout_ms.max(1)),
        },
    );
    match (&limits.backend, &limits.redis_url) {
        (LimitsBackend::Redis, None) => {
            errs.push(src.at(None, "[limits] backend = \"redis\" needs redis_url"));
        }
        (LimitsBackend::Redis, Some(url)) => {
            if let Err(e) = crate::limits::redis::Nodes::parse(url, limits.redis_timeout) {
                errs.push(src.at(None, format!("[limits] {e}")));
            }
        }
        _ => {}
    }

    let ext_authz = raw
        .policy
        .ext_authz
        .as_ref()
        .and_then(|e| ext_authz(&src, e, &mut errs));
    let policy = PolicyConfig {
        tenants: existing_file(&src, &raw.policy.tenants, &mut errs),
        routes: raw
            .policy
            .routes
            .as_ref()
            .map(|p| existing_file(&src, p, &mut errs)),
        schemas: raw.policy.schemas.as_ref().map(|p| {
            let path = src.resolve(p.get_ref());
            if !path.is_dir() {
                errs.push(src.at(
                    Some(p.span()),
                    format!("schemas directory {} does not exist", path.display()),
                ));
            }
            path
        }),
        rego: raw.policy.rego.as_ref().map(|p| {
            let path = src.resolve(p.get_ref());
            if !path.exists() {
                errs.push(src.at(
                    Some(p.span()),
                    format!("rego file or folder {} does not exist", path.display()),
                ));
            }
            path
        }),
        rego_timeout: Duration::from_millis(raw.policy.rego_timeout_ms.unwrap_or(5).max(1)),
        jwt_claims: raw
            .policy
            .jwt_claims
            .clone()
            .unwrap_or_else(|| vec!["scope".into(), "scp".into()]),
        ext_authz,
    };
    let context_key_file = existing_file(&src, &raw.context.signing_key_file, &mut errs);
    let telemetry = raw.telemetry.map(|t| {
        let endpoint = t.otlp_endpoint.get_ref();
        let valid = endpoint
            .parse::<http::Uri>()
            .is_ok_and(|u| matches!(u.scheme_str(), Some("http" | "https")) && u.host().is_some());
        if !valid {
            errs.push(src.at(
                Some(t.otlp_endpoint.span()),
                "[telemetry] otlp_endpoint must be an http:// or https:// address",
            ));
        }
        let ratio = *t.sample_ratio.get_ref();
        if !(0.0..=1.0).contains(&ratio) {
            errs.push(src.at(
                Some(t.sample_ratio.span()),
                "[telemetry] sample_ratio must be between 0.0 and 1.0",
            ));
        }
        TelemetryConfig {
            otlp_endpoint: endpoint.clone(),
            protocol: t.protocol,
            service_name: t.service_name,
            sample_ratio: ratio.clamp(0.0, 1.0),
            export_timeout: Duration::from_millis(t.export_timeout_ms.max(1)),
            queue_size: t.queue_size.max(1),
        }
    });
    let observe = raw.observe.map_or(
        ObserveConfig {
            tenant_label: TenantLabel::Id,
            max_tenant_series: default_max_tenant_series(),
        },
        |o| ObserveConfig {
            tenant_label: o.tenant_label,
            max_tenant_series: o.max_tenant_series,
        },
    );
    let defaults = BodyConfig::default();
    let body = match raw.body {
        None => defaults,
        Some(b) => BodyConfig {
            max_body_bytes: b.max_body_bytes.unwrap_or(defaults.max_body_bytes),
            max_buffered_bytes: b.max_buffered_bytes.unwrap_or(defaults.max_buffered_bytes),
            read_timeout: b
                .read_timeout_ms
                .map_or(defaults.read_timeout, |ms| Duration::from_millis(ms.max(1))),
            min_bytes_per_second: b
                .min_bytes_per_second
                .unwrap_or(defaults.min_bytes_per_second),
            max_depth: b.max_depth.unwrap_or(defaults.max_depth).clamp(1, 128),
            max_tokens_over_cap: b.max_tokens_over_cap.unwrap_or_default(),
        },
    };

    if !errs.is_empty() {
        return Err(errs);
    }
    Ok(GatewayConfig {
        path: path.to_path_buf(),
        server: ServerConfig {
            listen,
            threads: raw.server.threads,
            region: raw.server.region,
            grace_period_seconds: raw.server.grace_period_seconds,
            graceful_shutdown_timeout_seconds: raw.server.graceful_shutdown_timeout_seconds,
            pid_file: pid_file.display().to_string(),
            upgrade_sock: src.resolve(&raw.server.upgrade_sock).display().to_string(),
            head_limits: {
                let d = HeadLimits::default();
                HeadLimits {
                    max_request_target: raw
                        .server
                        .max_request_target_bytes
                        .unwrap_or(d.max_request_target),
                    max_header_bytes: raw.server.max_header_bytes.unwrap_or(d.max_header_bytes),
                    max_headers: raw.server.max_headers.unwrap_or(d.max_headers),
                }
            },
            idle_timeout: Duration::from_secs(raw.server.idle_timeout_seconds.max(1)),
            max_requests_per_connection: raw.server.max_requests_per_connection.max(1),
            request_header_timeout: Duration::from_millis(
                raw.server.request_header_timeout_ms.max(100),
            ),
            max_connections_per_ip: raw.server.max_connections_per_ip,
            proxy_protocol: raw.server.proxy_protocol,
            trusted_proxies,
            tls,
        },
        admin,
        upstream,
        jwt,
        limits,
        policy,
        context_key_file,
        body,
        telemetry,
        observe,
    })
}

fn jwt_config(src: &SourceFile, j: RawJwt, errs: &mut Vec<Diagnostic>) -> JwtConfig {
    let jwks = match (&j.jwks_file, &j.jwks_url) {
        (Some(f), None) => JwksSource::File(existing_file(src, f, errs)),
        (None, Some(u)) => {
            if !u.get_ref().starts_with("https://") && !u.get_ref().starts_with("http://") {
                errs.push(src.at(Some(u.span()), "jwks_url must be an http(s) URL"));
            }
            JwksSource::Url(u.get_ref().clone())
        }
        _ => {
            errs.push(src.at(
                None,
                "[auth.jwt] needs exactly one of jwks_file or jwks_url",
            ));
            JwksSource::File(PathBuf::new())
        }
    };
    if *j.leeway_seconds.get_ref() > MAX_JWT_LEEWAY_SECONDS {
        errs.push(src.at(
            Some(j.leeway_seconds.span()),
            format!("leeway_seconds must be at most {MAX_JWT_LEEWAY_SECONDS}"),
        ));
    }
    if j.audiences.is_empty() {
        errs.push(src.at(None, "[auth.jwt] audiences must not be empty"));
    }
    let mut algorithms = Vec::new();
    for a in &j.algorithms {
        match parse_algorithm(a.get_ref()) {
            Some(alg) => algorithms.push(alg),
            None => errs.push(src.at(
                Some(a.span()),
                format!(
                    "unsupported JWT algorithm {:?} (use RS256, ES256, EdDSA or HS256)",
                    a.get_ref()
                ),
            )),
        }
    }
    JwtConfig {
        issuer: j.issuer,
        audiences: j.audiences,
        jwks,
        tenant_claim: j.tenant_claim,
        leeway_seconds: *j.leeway_seconds.get_ref(),
        algorithms,
        jwks_refresh: Duration::from_secs(j.jwks_refresh_seconds.max(10)),
        jwks_unknown_kid_refresh: Duration::from_secs(j.jwks_unknown_kid_refresh_seconds.max(1)),
        token_cache_entries: j.token_cache_entries,
    }
}

/// The algorithms Portcullis accepts; anything else (notably `none`) is refused.
pub fn parse_algorithm(name: &str) -> Option<jsonwebtoken::Algorithm> {
    use jsonwebtoken::Algorithm::*;
    match name {
        "RS256" => Some(RS256),
        "ES256" => Some(ES256),
        "EdDSA" => Some(EdDSA),
        "HS256" => Some(HS256),
        _ => None,
    }
}

fn socket_addr(
    src: &SourceFile,
    s: &Spanned<String>,
    errs: &mut Vec<Diagnostic>,
) -> Option<SocketAddr> {
    match s.get_ref().parse() {
        Ok(a) => Some(a),
        Err(_) => {
            errs.push(src.at(
                Some(s.span()),
                format!("{:?} is not an IP:port address", s.get_ref()),
            ));
            None
        }
    }
}

fn socket_addrs(
    src: &SourceFile,
    list: &[Spanned<String>],
    errs: &mut Vec<Diagnostic>,
) -> Vec<SocketAddr> {
    list.iter()
        .filter_map(|s| socket_addr(src, s, errs))
        .collect()
}

fn ext_authz(
    src: &SourceFile,
    raw: &RawExtAuthz,
    errs: &mut Vec<Diagnostic>,
) -> Option<ExtAuthzConfig> {
    let at = |span: std::ops::Range<usize>, m: String| src.at(Some(span), m);
    let uri: http::Uri = match raw.url.get_ref().parse() {
        Ok(u) => u,
        Err(e) => {
            errs.push(at(raw.url.span(), format!("[policy.ext_authz] url: {e}")));
            return None;
        }
    };
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => {
            errs.push(at(
                raw.url.span(),
                "[policy.ext_authz] url must be http:// or https://".into(),
            ));
            return None;
        }
    };
    let host = uri.host().unwrap_or_default().to_string();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    // Resolved once, at load: the request path never waits on DNS.
    let addr = match std::net::ToSocketAddrs::to_socket_addrs(&(host.as_str(), port))
        .ok()
        .and_then(|mut a| a.next())
    {
        Some(a) => a,
        None => {
            errs.push(at(
                raw.url.span(),
                format!("[policy.ext_authz] url: cannot resolve {host}:{port}"),
            ));
            return None;
        }
    };
    if uri.query().is_some() {
        errs.push(at(
            raw.url.span(),
            "[policy.ext_authz] url must not have a query".into(),
        ));
    }
    let header_list = |list: &[Spanned<String>], errs: &mut Vec<Diagnostic>| {
        list.iter()
            .filter_map(|h| {
                let name = h.get_ref().to_ascii_lowercase();
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() || crate::policy::ext_authz::reserved_header(&name)
                {
                    errs.push(at(
                        h.span(),
                        format!("[policy.ext_authz] {name} cannot be passed: the gateway owns it or it is not a header name"),
                    ));
                    return None;
                }
                Some(name)
            })
            .collect::<Vec<_>>()
    };
    let allowed_headers = header_list(&raw.allowed_headers, errs);
    let allowed_upstream_headers = header_list(&raw.allowed_upstream_headers, errs);
    Some(ExtAuthzConfig {
        addr,
        tls,
        host,
        path_prefix: uri.path().trim_end_matches('/').to_string(),
        ca: raw.ca.as_ref().map(|p| existing_file(src, p, errs)),
        timeout: Duration::from_millis(raw.timeout_ms.unwrap_or(200).max(1)),
        failure_mode_allow: raw.failure_mode_allow,
        allowed_headers,
        allowed_upstream_headers,
        cache_ttl: Duration::from_millis(raw.cache_ttl_ms.unwrap_or(5000)),
        cache_entries: raw.cache_entries.unwrap_or(10_000).max(1),
    })
}

fn existing_file(src: &SourceFile, p: &Spanned<String>, errs: &mut Vec<Diagnostic>) -> PathBuf {
    let path = src.resolve(p.get_ref());
    if !path.is_file() {
        errs.push(src.at(
            Some(p.span()),
            format!("file {} does not exist", path.display()),
        ));
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_of_redis_nodes_is_a_cluster() {
        let list: RedisUrl =
            toml::from_str::<toml::Table>(r#"u = ["127.0.0.1:7000", "redis://127.0.0.1:7001"]"#)
                .unwrap()["u"]
                .clone()
                .try_into()
                .unwrap();
        assert_eq!(
            list.joined(),
            "redis+cluster://127.0.0.1:7000,127.0.0.1:7001"
        );
        let one = RedisUrl::One("redis://127.0.0.1:6379".into());
        assert_eq!(one.joined(), "redis://127.0.0.1:6379");
        let t = Duration::from_millis(50);
        assert!(crate::limits::redis::Nodes::parse("redis+cluster://", t).is_err());
        assert!(crate::limits::redis::Nodes::parse("redis+cluster://127.0.0.1:7000", t).is_ok());
        assert!(crate::limits::redis::Nodes::parse("nonsense://x", t).is_err());
    }
}
