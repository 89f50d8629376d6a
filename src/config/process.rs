//! Settings the process reads once, when it starts: its listeners and
//! threads, how it reaches the router, where limits live, how it treats
//! connections. Everything else in the snapshot is reloaded. A reload that
//! changes one of these applies the rest and reports the key as
//! `restart needed: <key>` (in the log, `/readyz` and
//! `portcullis_config_restart_needed`) instead of pretending it took effect;
//! `deploy/upgrade.sh` applies it without dropping a connection.

use super::gateway::GatewayConfig;

/// A process-only key, as gateway.toml spells it, and its value in a
/// config. Values are compared through their `Debug` form: every config
/// type has one, and it shows every field.
type Setting = (&'static str, fn(&GatewayConfig) -> String);

/// Every key the process reads only at start.
const PROCESS_ONLY: &[Setting] = &[
    ("[server] listen", |g| format!("{:?}", g.server.listen)),
    ("[server] threads", |g| g.server.threads.to_string()),
    ("[server] pid_file", |g| g.server.pid_file.clone()),
    ("[server] upgrade_sock", |g| g.server.upgrade_sock.clone()),
    ("[server] grace_period_seconds", |g| {
        g.server.grace_period_seconds.to_string()
    }),
    ("[server] graceful_shutdown_timeout_seconds", |g| {
        g.server.graceful_shutdown_timeout_seconds.to_string()
    }),
    // HTTP/2's idle timeout and header-list bound are set on the listener.
    ("[server] idle_timeout_seconds", |g| {
        format!("{:?}", g.server.idle_timeout)
    }),
    ("[server] max_header_bytes", |g| {
        g.server.head_limits.max_header_bytes.to_string()
    }),
    ("[server] max_requests_per_connection", |g| {
        g.server.max_requests_per_connection.to_string()
    }),
    ("[server] request_header_timeout_ms", |g| {
        format!("{:?}", g.server.request_header_timeout)
    }),
    ("[server] max_connections_per_ip", |g| {
        g.server.max_connections_per_ip.to_string()
    }),
    ("[server] proxy_protocol", |g| {
        format!("{:?}", g.server.proxy_protocol)
    }),
    ("[server] trusted_proxies", |g| {
        format!("{:?}", g.server.trusted_proxies)
    }),
    // The certificate, key, client CA and CRL reload; the sockets, the
    // verification mode and the handshake's framing do not.
    ("[server.tls] listen", |g| {
        format!("{:?}", g.server.tls.as_ref().map(|t| &t.listen))
    }),
    ("[server.tls] client_cert", |g| {
        format!("{:?}", g.server.tls.as_ref().map(|t| t.client_cert))
    }),
    ("[server.tls] proxy_protocol", |g| {
        format!("{:?}", g.server.tls.as_ref().map(|t| t.proxy_protocol))
    }),
    ("[server.tls] handshake_timeout_ms", |g| {
        format!("{:?}", g.server.tls.as_ref().map(|t| t.handshake_timeout))
    }),
    ("[admin] listen", |g| format!("{:?}", g.admin)),
    // The JWKS refresh task starts with the process (a JWKS file reloads).
    ("[auth.jwt] jwks_url", |g| {
        format!(
            "{:?}",
            g.jwt.as_ref().and_then(|j| match &j.jwks {
                crate::identity::jwt::JwksSource::Url(u) => Some(u),
                crate::identity::jwt::JwksSource::File(_) => None,
            })
        )
    }),
    ("[upstream]", |g| format!("{:?}", g.upstream)),
    ("[limits] backend", |g| format!("{:?}", g.limits.backend)),
    ("[limits] redis_url", |g| {
        format!("{:?}", g.limits.redis_url)
    }),
    ("[limits] redis_timeout_ms", |g| {
        format!("{:?}", g.limits.redis_timeout)
    }),
    ("[limits] on_backend_error", |g| {
        format!("{:?}", g.limits.on_backend_error)
    }),
    ("[limits] max_inflight", |g| {
        g.limits.max_inflight.to_string()
    }),
    ("[limits] auth_failures_per_ip_per_minute", |g| {
        g.limits.auth_failures_per_ip_per_minute.to_string()
    }),
    ("[limits] state_file", |g| {
        g.limits.state_file.display().to_string()
    }),
    // The tracer and its exporter start with the process.
    ("[telemetry]", |g| format!("{:?}", g.telemetry)),
    // A series once exported keeps its label for the process's life.
    ("[observe]", |g| format!("{:?}", g.observe)),
];

/// The process-only keys whose value in `loaded` differs from the one the
/// process started with.
pub fn restart_needed(started: &GatewayConfig, loaded: &GatewayConfig) -> Vec<&'static str> {
    PROCESS_ONLY
        .iter()
        .filter(|(_, value)| value(started) != value(loaded))
        .map(|(key, _)| *key)
        .collect()
}
