//! One JSON line per request, written through `tracing` under the target
//! `access`. It names the tenant, route, model, status, reject code,
//! latencies and tokens: never a prompt, key or token.

/// What one finished request looked like.
pub struct AccessRecord<'a> {
    pub request_id: &'a str,
    pub tenant: &'a str,
    pub route: &'a str,
    pub model: Option<&'a str>,
    pub method: &'a str,
    pub status: u16,
    pub reject_code: Option<&'a str>,
    pub gateway_ms: f64,
    pub upstream_ms: Option<f64>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
}

pub fn write(r: &AccessRecord<'_>) {
    tracing::info!(
        target: "access",
        request_id = r.request_id,
        tenant = r.tenant,
        route = r.route,
        model = r.model,
        method = r.method,
        status = r.status,
        reject_code = r.reject_code,
        gateway_ms = r.gateway_ms,
        upstream_ms = r.upstream_ms,
        prompt_tokens = r.prompt_tokens,
        completion_tokens = r.completion_tokens,
    );
}
