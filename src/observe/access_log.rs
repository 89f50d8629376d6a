//! One JSON line per request under the target `access`, the request's
//! usage record: time, request id, tenant, key, route, model, method,
//! status, reject code, latencies, tokens, cost, trace id and the
//! guardrails that acted; never a prompt, a completion, a key or a token.
//!
//! The line is serialised straight into the non-blocking log writer rather
//! than through `tracing`'s formatter, which costs several times more per
//! request. It is written when the `access` target is enabled at `info`
//! (`PORTCULLIS_LOG=warn` turns it off).

use std::io::Write;
use std::time::SystemTime;

use serde::Serialize;

use super::logging;

/// What one finished request looked like.
#[derive(Serialize)]
pub struct AccessRecord<'a> {
    pub request_id: &'a str,
    pub tenant: &'a str,
    /// The key object's id, when the credential was one. This and the
    /// usage-record fields below are always present (`null` when unknown),
    /// so a record's shape does not depend on the request.
    pub key_id: Option<&'a str>,
    pub route: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<&'a str>,
    pub method: &'a str,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reject_code: Option<&'a str>,
    pub gateway_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<u64>,
    /// Of the prompt tokens, those read from the provider's cache.
    pub cached_tokens: Option<u64>,
    /// Of the completion tokens, those spent reasoning.
    pub reasoning_tokens: Option<u64>,
    /// The settled cost at `[prices]`, when the model has a price.
    pub cost: Option<f64>,
    /// Streams: milliseconds from arrival to the first answer byte.
    pub ttft_ms: Option<f64>,
    /// The trace's id, when tracing is on.
    pub trace_id: Option<&'a str>,
    /// The guardrail kinds acted on (`email`, `deny`…), never what matched.
    pub guardrails: Vec<&'static str>,
}

#[derive(Serialize)]
struct Line<'a> {
    timestamp: String,
    level: &'static str,
    target: &'static str,
    #[serde(flatten)]
    record: &'a AccessRecord<'a>,
}

pub fn write(r: &AccessRecord<'_>) {
    // The writer first: it brings logging (and its filter) up if needed.
    let Some(mut out) = logging::writer() else {
        return;
    };
    if !tracing::enabled!(target: "access", tracing::Level::INFO) {
        return;
    }
    let line = Line {
        timestamp: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
        level: "INFO",
        target: "access",
        record: r,
    };
    let mut buf = Vec::with_capacity(320);
    if serde_json::to_writer(&mut buf, &line).is_ok() {
        buf.push(b'\n');
        // The writer drops lines rather than block when its queue is full.
        let _ = out.write_all(&buf);
    }
}
