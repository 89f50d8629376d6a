//! The client's trace context: any `traceparent` and `tracestate` bytes.
//! No panic; a well-formed sampled or unsampled `traceparent` is continued
//! (its trace id kept), anything else starts a fresh trace; the router's
//! `traceparent` is always well formed and in the same trace.
#![no_main]
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use portcullis::observe::telemetry::{Protocol, Telemetry, TelemetryConfig};

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fuzz_target!(|data: &[u8]| {
    thread_local! {
        static TELEMETRY: Arc<Telemetry> = Arc::new(Telemetry::new(&TelemetryConfig {
            otlp_endpoint: "http://127.0.0.1:9".into(),
            protocol: Protocol::HttpProtobuf,
            service_name: "fuzz".into(),
            sample_ratio: 1.0,
            export_timeout: Duration::from_millis(1),
            queue_size: 1,
        }).0);
    }
    let cut = data.iter().position(|&b| b == 0).unwrap_or(data.len());
    let (parent, state) = (&data[..cut], data.get(cut + 1..).unwrap_or_default());
    let mut headers = http::HeaderMap::new();
    for (name, value) in [("traceparent", parent), ("tracestate", state)] {
        if let Ok(v) = http::HeaderValue::from_bytes(value) {
            headers.insert(name, v);
        }
    }
    TELEMETRY.with(|t| {
        let mut trace = t.start_request(&headers, SystemTime::now());
        let id = trace.trace_id();
        assert!(is_hex(&id, 32) && id != "0".repeat(32), "trace id {id}");
        trace.start_upstream();
        let sent = trace.propagation();
        let (_, sent) = sent
            .iter()
            .find(|(name, _)| name == "traceparent")
            .expect("a traceparent for the router");
        let parts: Vec<&str> = sent.split('-').collect();
        assert_eq!(parts.len(), 4, "{sent:?}");
        assert!(parts[0] == "00" && parts[1] == id && is_hex(parts[2], 16) && is_hex(parts[3], 2));
    });
});
