//! The shipped Grafana dashboard and Prometheus alerts reference only
//! metrics the gateway exports.

use std::collections::BTreeSet;

use crate::common::*;

/// Every `portcullis_*` metric name in `text`, histogram suffixes removed.
fn referenced(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("portcullis_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        out.insert(base.to_string());
        rest = &tail[end..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_and_alerts_reference_exported_metrics() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dashboard =
        std::fs::read_to_string(format!("{root}/deploy/grafana/portcullis.json")).unwrap();
    let parsed: serde_json::Value =
        serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    assert!(parsed["panels"].as_array().is_some_and(|p| p.len() >= 6));
    let alerts = std::fs::read_to_string(format!("{root}/deploy/prometheus/alerts.yml")).unwrap();

    // Traffic that makes every labelled family appear: a success with
    // tokens, a rejection, a stream, and a request in flight measured.
    let gw = Gateway::start().await;
    let ok = gw
        .send(
            &post("/v1/chat/completions", &chat_body())
                .bearer(&gw.keys.token("acme"))
                .build(),
        )
        .await;
    assert_eq!(ok.status, 200);
    gw.send(&post("/v1/chat/completions", &chat_body()).build())
        .await;
    // A stream with usage: the first-token and per-token histograms.
    let mut stream = chat_body();
    stream["stream"] = serde_json::json!(true);
    let streamed = gw
        .send(
            &post("/v1/chat/completions", &stream)
                .bearer(&gw.keys.token("globex"))
                .build(),
        )
        .await;
    assert_eq!(streamed.status, 200);
    let metrics = send(gw.admin, &get("/metrics").build()).await.unwrap();
    let exposition = String::from_utf8_lossy(&metrics.body);
    let exported: BTreeSet<String> = exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();

    for (file, text) in [
        ("grafana/portcullis.json", &dashboard),
        ("prometheus/alerts.yml", &alerts),
    ] {
        let names = referenced(text);
        assert!(!names.is_empty(), "{file} references no metric");
        let missing: Vec<_> = names.difference(&exported).collect();
        assert!(
            missing.is_empty(),
            "{file} references metrics the gateway does not export: {missing:?}"
        );
    }
    // The contract's metric families, all exported.
    for family in [
        "portcullis_requests_total",
        "portcullis_rejections_total",
        "portcullis_tokens_total",
        "portcullis_config_reloads_total",
        "portcullis_limiter_backend_errors_total",
        "portcullis_gateway_duration_seconds",
        "portcullis_upstream_duration_seconds",
        "portcullis_inflight_requests",
        "portcullis_config_generation",
        "portcullis_time_to_first_token_seconds",
        "portcullis_time_per_output_token_seconds",
        "portcullis_telemetry_spans_dropped_total",
    ] {
        assert!(exported.contains(family), "{family} is not exported");
    }
}
