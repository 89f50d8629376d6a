//! Prometheus metrics, registered once in the default registry.
//!
//! Label values are bounded: tenant ids come from `tenants.toml` (or `-`
//! before authentication), capped by `[observe] max_tenant_series` or
//! replaced by the plan ([`tenant_series`]); routes and codes come from
//! fixed tables.

use std::collections::HashSet;
use std::sync::{Arc, LazyLock, Mutex, OnceLock};

use prometheus::{
    register_counter_vec, register_histogram_vec, register_int_counter, register_int_counter_vec,
    register_int_gauge, register_int_gauge_vec, CounterVec, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec,
};

/// Buckets from 50 µs to 60 s: gateway overhead sits at the bottom,
/// long generations at the top.
const BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0, 60.0,
];

pub struct Metrics {
    pub requests: IntCounterVec,
    pub tokens: IntCounterVec,
    pub cost: CounterVec,
    pub inflight: IntGaugeVec,
    pub rejections: IntCounterVec,
    pub gateway_duration: HistogramVec,
    pub upstream_duration: HistogramVec,
    pub config_generation: IntGauge,
    pub config_restart_needed: IntGauge,
    pub config_reloads: IntCounterVec,
    pub limiter_backend_errors: IntCounter,
    pub upstream_insecure: IntGauge,
    pub policy_errors: IntCounterVec,
    pub policy_duration: HistogramVec,
    pub ext_authz_calls: IntCounterVec,
    pub connection_rejections: IntCounterVec,
    pub body_buffered: IntGauge,
    pub time_to_first_token: HistogramVec,
    pub time_per_output_token: HistogramVec,
    pub spans_dropped: IntCounter,
    pub guardrail_actions: IntCounterVec,
}

/// Registration fails only on a duplicate name, which is a programming error
/// caught by the first test that touches metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    Metrics {
    requests: register_int_counter_vec!(
        "portcullis_requests_total",
        "Requests by tenant, route and final status",
        &["tenant", "route", "status"]
    )
    .expect("register portcullis_requests_total"),
    tokens: register_int_counter_vec!(
        "portcullis_tokens_total",
        "Tokens the router reported, by tenant, model (as allowed in config) and kind",
        &["tenant", "model", "kind"]
    )
    .expect("register portcullis_tokens_total"),
    cost: register_counter_vec!(
        "portcullis_cost_total",
        "What the router's reported usage cost at [prices], in the platform's currency, by tenant and model",
        &["tenant", "model"]
    )
    .expect("register portcullis_cost_total"),
    inflight: register_int_gauge_vec!(
        "portcullis_inflight_requests",
        "Requests in flight per tenant",
        &["tenant"]
    )
    .expect("register portcullis_inflight_requests"),
    rejections: register_int_counter_vec!(
        "portcullis_rejections_total",
        "Requests refused by the gateway, by tenant and reason code",
        &["tenant", "code"]
    )
    .expect("register portcullis_rejections_total"),
    gateway_duration: register_histogram_vec!(
        "portcullis_gateway_duration_seconds",
        "Time spent in the gateway itself, excluding the router",
        &["route"],
        BUCKETS.to_vec()
    )
    .expect("register portcullis_gateway_duration_seconds"),
    upstream_duration: register_histogram_vec!(
        "portcullis_upstream_duration_seconds",
        "Time from sending the request to the router until its response header",
        &["route"],
        BUCKETS.to_vec()
    )
    .expect("register portcullis_upstream_duration_seconds"),
    config_restart_needed: register_int_gauge!(
        "portcullis_config_restart_needed",
        "Process-only settings the configuration in force changed; they apply at the next restart or upgrade"
    )
    .expect("register portcullis_config_restart_needed"),
    config_generation: register_int_gauge!(
        "portcullis_config_generation",
        "Generation of the configuration snapshot in force"
    )
    .expect("register portcullis_config_generation"),
    config_reloads: register_int_counter_vec!(
        "portcullis_config_reloads_total",
        "Configuration reloads by result: ok, or error (the previous snapshot stayed)",
        &["result"]
    )
    .expect("register portcullis_config_reloads_total"),
    limiter_backend_errors: register_int_counter!(
        "portcullis_limiter_backend_errors_total",
        "Calls to the shared limits backend (Redis) that failed or timed out"
    )
    .expect("register portcullis_limiter_backend_errors_total"),
    upstream_insecure: register_int_gauge!(
        "portcullis_upstream_insecure",
        "1 when the router's certificate is not verified ([upstream] insecure = true)"
    )
    .expect("register portcullis_upstream_insecure"),
    policy_errors: register_int_counter_vec!(
        "portcullis_policy_errors_total",
        "Policy evaluations that failed (error, timeout, malformed result) and so denied, by engine",
        &["engine"]
    )
    .expect("register portcullis_policy_errors_total"),
    policy_duration: register_histogram_vec!(
        "portcullis_policy_duration_seconds",
        "Time spent in the policy stage, by engine (rego, ext_authz)",
        &["engine"],
        BUCKETS.to_vec()
    )
    .expect("register portcullis_policy_duration_seconds"),
    ext_authz_calls: register_int_counter_vec!(
        "portcullis_ext_authz_total",
        "External authorizer decisions by source: called, cache_hit, failed_closed, failed_open",
        &["result"]
    )
    .expect("register portcullis_ext_authz_total"),
    connection_rejections: register_int_counter_vec!(
        "portcullis_connection_rejections_total",
        "Connections closed by the connection stage: per_ip_limit, header_timeout, \
         untrusted_proxy, missing_proxy_header, invalid_proxy_header, tls_handshake_timeout",
        &["reason"]
    )
    .expect("register portcullis_connection_rejections_total"),
    body_buffered: register_int_gauge!(
        "portcullis_body_buffered_bytes",
        "Request-body bytes held across in-flight requests, against [body] max_buffered_bytes"
    )
    .expect("register portcullis_body_buffered_bytes"),
    time_to_first_token: register_histogram_vec!(
        "portcullis_time_to_first_token_seconds",
        "Streams: from the request reaching the gateway to the first answer byte",
        &["route"],
        BUCKETS.to_vec()
    )
    .expect("register portcullis_time_to_first_token_seconds"),
    time_per_output_token: register_histogram_vec!(
        "portcullis_time_per_output_token_seconds",
        "Streams with usage: (end - first token) / (output tokens - 1)",
        &["route"],
        TOKEN_BUCKETS.to_vec()
    )
    .expect("register portcullis_time_per_output_token_seconds"),
    spans_dropped: register_int_counter!(
        "portcullis_telemetry_spans_dropped_total",
        "Trace spans dropped on a full export queue or a failed export"
    )
    .expect("register portcullis_telemetry_spans_dropped_total"),
    guardrail_actions: register_int_counter_vec!(
        "portcullis_guardrail_actions_total",
        "Requests a guardrail acted on, by tenant, kind (a detector, or deny) and action \
         (masked, rejected, logged); one per request, kind and action",
        &["tenant", "kind", "action"]
    )
    .expect("register portcullis_guardrail_actions_total"),
}
});

/// Time per output token: 1 ms (a fast small model) to 1 s (a stalled one).
const TOKEN_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0,
];

/// What stands in a metric's `tenant` label: `[observe] tenant_label`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TenantLabel {
    /// The tenant id, for the first `max_tenant_series` tenants seen;
    /// `other` for the rest.
    #[default]
    Id,
    /// The tenant's plan name.
    Plan,
    /// `-` for every tenant.
    None,
}

/// The label for tenants beyond `max_tenant_series`.
pub const OTHER_TENANTS: &str = "other";

/// The tenant label rule and the tenants that have a label of their own,
/// for as long as the process lives: a series once exported keeps its name.
struct TenantSeries {
    mode: TenantLabel,
    max: usize,
    named: Mutex<HashSet<Arc<str>>>,
}

impl TenantSeries {
    fn new(mode: TenantLabel, max: usize) -> TenantSeries {
        TenantSeries {
            mode,
            max,
            named: Mutex::new(HashSet::new()),
        }
    }

    fn label(&self, id: &str, plan: &str) -> Arc<str> {
        match self.mode {
            TenantLabel::Plan => plan.into(),
            TenantLabel::None => "-".into(),
            TenantLabel::Id => {
                let mut named = self.named.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(known) = named.get(id) {
                    return known.clone();
                }
                if named.len() >= self.max {
                    return OTHER_TENANTS.into();
                }
                let label: Arc<str> = id.into();
                named.insert(label.clone());
                label
            }
        }
    }
}

static TENANT_SERIES: OnceLock<TenantSeries> = OnceLock::new();

/// Sets the tenant label rule; the first call wins (it is process-only).
pub fn configure_tenant_label(mode: TenantLabel, max_tenant_series: usize) {
    let _ = TENANT_SERIES.set(TenantSeries::new(mode, max_tenant_series));
}

/// The `tenant` label for a tenant (its id until a rule is configured).
/// Computed once per tenant and snapshot (the tenant caches it), so the
/// lock is off the hot path.
pub fn tenant_series(id: &str, plan: &str) -> Arc<str> {
    match TENANT_SERIES.get() {
        Some(rule) => rule.label(id, plan),
        None => id.into(),
    }
}

/// The text exposition of every registered metric.
pub fn render() -> Vec<u8> {
    use prometheus::Encoder;
    let mut out = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    // Encoding into a Vec only fails on invalid metric families, which the
    // registry never holds.
    let _ = encoder.encode(&prometheus::gather(), &mut out);
    out
}

/// One request counted in `portcullis_inflight_requests{tenant}` from the
/// moment it takes its concurrency place until that place is freed, on
/// every path: the gauge moves with the request, not when its log is written.
pub struct InflightMark(IntGauge);

impl InflightMark {
    pub fn new(tenant: &str) -> InflightMark {
        let gauge = METRICS.inflight.with_label_values(&[tenant]);
        gauge.inc();
        InflightMark(gauge)
    }
}

impl Drop for InflightMark {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Status codes as static label values, so metrics never format per request.
pub fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        408 => "408",
        413 => "413",
        415 => "415",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        0 => "0",
        s if s < 200 => "1xx",
        s if s < 300 => "2xx",
        s if s < 400 => "3xx",
        s if s < 500 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tenant_label_is_capped_first_come_and_kept() {
        let rule = TenantSeries::new(TenantLabel::Id, 2);
        let labels: Vec<Arc<str>> = ["a", "b", "c", "a", "d", "b"]
            .iter()
            .map(|id| rule.label(id, "basic"))
            .collect();
        let labels: Vec<&str> = labels.iter().map(|l| &**l).collect();
        assert_eq!(labels, ["a", "b", "other", "a", "other", "b"]);
        assert_eq!(
            &*TenantSeries::new(TenantLabel::Plan, 0).label("a", "gold"),
            "gold"
        );
        assert_eq!(
            &*TenantSeries::new(TenantLabel::None, 9).label("a", "gold"),
            "-"
        );
        // A cap of 0 names no tenant.
        assert_eq!(
            &*TenantSeries::new(TenantLabel::Id, 0).label("a", "gold"),
            "other"
        );
    }
}
