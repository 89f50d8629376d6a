//! Telemetry: OTLP traces decoded by a real collector, trace context to
//! the router, a dead or hung collector costing nothing but counted drops,
//! the tenant label's cardinality control, stream latency histograms and
//! the usage record in the access log.

use std::collections::HashSet;
use std::time::Duration;

use crate::common::*;
use portcullis::mock_router::MockOptions;
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";
/// OTLP's span kinds.
const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const ERROR: i32 = 2;

fn telemetry(endpoint: &str) -> toml::Table {
    let t = set(toml::Table::new(), "telemetry.otlp_endpoint", endpoint);
    set(t, "telemetry.service_name", "edge-test")
}

fn chat(model: &str, prompt: &str) -> Value {
    json!({"model": model, "max_tokens": 10, "messages": [{"role": "user", "content": prompt}]})
}

/// A small chat request as `tenant`, with its JWT.
async fn chat_as(gw: &Gateway, tenant: &str) -> Response {
    gw.send(
        &post(CHAT, &chat("m-small", "hi"))
            .bearer(&gw.keys.token(tenant))
            .build(),
    )
    .await
}

fn request_spans(spans: &[Exported]) -> Vec<&Exported> {
    spans
        .iter()
        .filter(|s| s.name() == "portcullis.request")
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_follows_the_request_through_every_stage_to_the_router() {
    let collector = Collector::start().await;
    let gw = Gateway::start_with(Options {
        config: telemetry(&collector.endpoint()),
        capture_logs: true,
        ..Options::default()
    })
    .await;
    let token = gw.keys.token("acme");
    let marker = "PROMPT-MARKER-51c2";
    let (client_trace, client_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let traced = gw
        .send(
            &post(CHAT, &chat("m-small", marker))
                .bearer(&token)
                .header(
                    "traceparent",
                    &format!("00-{client_trace}-{client_span}-01"),
                )
                .header("tracestate", "vendor=opaque")
                .build(),
        )
        .await;
    assert_eq!(
        traced.status,
        200,
        "{}",
        String::from_utf8_lossy(&traced.body)
    );
    let garbled = gw
        .send(
            &post(CHAT, &chat("m-small", marker))
                .bearer(&token)
                .header("traceparent", "00-not-a-trace-zz")
                .build(),
        )
        .await;
    assert_eq!(garbled.status, 200, "a malformed traceparent is ignored");
    let refused = gw
        .send(
            &post(CHAT, &chat("gpt-forbidden", marker))
                .bearer(&token)
                .build(),
        )
        .await;
    assert_eq!(
        (refused.status, refused.code()),
        (403, "model_not_allowed".to_owned())
    );
    assert_eq!(
        gw.router_count(),
        2,
        "the refused request never reached the router"
    );

    let spans = collector
        .wait_for("three requests' spans", |s| {
            request_spans(s).len() == 3 && s.iter().filter(|s| s.name() == "upstream").count() == 2
        })
        .await;
    let by_request = |r: &Response| {
        let id = r.header("x-request-id").unwrap().to_owned();
        *request_spans(&spans)
            .iter()
            .find(|s| s.attr("portcullis.request.id").as_deref() == Some(id.as_str()))
            .unwrap_or_else(|| panic!("no span for request {id}"))
    };
    let children = |parent: &Exported| -> Vec<&Exported> {
        spans
            .iter()
            .filter(|s| s.parent_id() == parent.span_id() && s.trace_id() == parent.trace_id())
            .collect()
    };

    // The client's trace continues: its span is the parent.
    let root = by_request(&traced);
    assert_eq!(root.service, "edge-test");
    assert_eq!(root.span.kind, SERVER);
    assert_eq!(
        (root.trace_id(), root.parent_id()),
        (client_trace.into(), client_span.into())
    );
    let names: HashSet<&str> = children(root).iter().map(|s| s.name()).collect();
    assert_eq!(
        names,
        HashSet::from(["identity", "authz", "limits", "body", "upstream"]),
        "a child per stage that ran, and the upstream exchange"
    );
    for child in children(root) {
        assert!(
            child.span.start_time_unix_nano >= root.span.start_time_unix_nano
                && child.span.end_time_unix_nano <= root.span.end_time_unix_nano,
            "{} lies inside the request",
            child.name()
        );
    }
    let upstream = children(root)
        .into_iter()
        .find(|s| s.name() == "upstream")
        .unwrap();
    assert_eq!(upstream.span.kind, CLIENT);
    let attrs = root.attrs();
    let expected = [
        ("http.request.method", "POST"),
        ("http.route", CHAT),
        ("http.response.status_code", "200"),
        ("portcullis.tenant.id", "acme"),
        ("portcullis.tenant.plan", "basic"),
        ("gen_ai.operation.name", "chat"),
        ("gen_ai.request.model", "m-small"),
        ("gen_ai.request.max_tokens", "10"),
        ("gen_ai.usage.output_tokens", "6"),
        ("gen_ai.response.model", "m-small"),
    ];
    for (key, value) in expected {
        assert_eq!(
            attrs.get(key).map(String::as_str),
            Some(value),
            "{key}: {attrs:?}"
        );
    }
    let recorded = gw.router().requests();
    let input = (recorded[0].body.len() / 4).to_string();
    assert_eq!(attrs.get("gen_ai.usage.input_tokens"), Some(&input));
    assert!(
        !attrs.contains_key("portcullis.key.id"),
        "a JWT has no key object"
    );
    assert_eq!(root.status(), 0);

    // The router joins the trace under the upstream span, never under the
    // client's own span.
    assert_eq!(
        recorded[0].header("traceparent"),
        Some(format!("00-{client_trace}-{}-01", upstream.span_id()).as_str())
    );
    assert_eq!(recorded[0].header("tracestate"), Some("vendor=opaque"));
    assert_eq!(recorded[0].header_values("traceparent").len(), 1);

    // A malformed traceparent starts a new trace of the gateway's own.
    let fresh = by_request(&garbled);
    assert!(
        fresh.parent_id().is_empty(),
        "no parent: {}",
        fresh.parent_id()
    );
    assert_ne!(fresh.trace_id(), client_trace);
    let fresh_up = children(fresh)
        .into_iter()
        .find(|s| s.name() == "upstream")
        .unwrap();
    assert_eq!(
        recorded[1].header("traceparent"),
        Some(format!("00-{}-{}-01", fresh.trace_id(), fresh_up.span_id()).as_str())
    );

    // A refusal is an error span naming its code; the stage that refused
    // is an error too, and nothing after it ran.
    let failed = by_request(&refused);
    assert_eq!(failed.status(), ERROR);
    assert_eq!(
        failed.attr("portcullis.reject.code").as_deref(),
        Some("model_not_allowed")
    );
    assert_eq!(
        failed.attr("http.response.status_code").as_deref(),
        Some("403")
    );
    let stages = children(failed);
    let body = stages
        .iter()
        .find(|s| s.name() == "body")
        .expect("a body span");
    assert_eq!(body.status(), ERROR);
    assert!(stages.iter().all(|s| s.name() != "upstream"));

    // No prompt and no credential in any span.
    let everything = format!("{spans:?}");
    assert!(
        !everything.contains(marker),
        "the prompt leaked into a span"
    );
    assert!(!everything.contains(&token), "the token leaked into a span");

    // The usage record names the trace.
    let lines = log_lines(&gw, "access", 3).await;
    for (r, span) in [(&traced, root), (&garbled, fresh), (&refused, failed)] {
        let line = lines
            .iter()
            .find(|l| l["request_id"] == r.header("x-request-id").unwrap())
            .expect("an access line");
        assert_eq!(line["trace_id"], span.trace_id(), "{line}");
    }
    assert_eq!(
        metric(&gw, "portcullis_telemetry_spans_dropped_total").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_keeps_a_sampled_parent_and_the_key_id_is_an_attribute() {
    let collector = Collector::start().await;
    let gw = Gateway::start_with(Options {
        config: set(
            telemetry(&collector.endpoint()),
            "telemetry.sample_ratio",
            0.0,
        ),
        ..Options::default()
    })
    .await;
    let key = gw.keys.ci_key.clone();
    let unsampled = gw
        .send(
            &post(CHAT, &chat("m-small", "hi"))
                .header("x-api-key", &key)
                .build(),
        )
        .await;
    assert_eq!(unsampled.status, 200);
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let sampled = gw
        .send(
            &post(CHAT, &chat("m-small", "hi"))
                .header("x-api-key", &key)
                .header("traceparent", &format!("00-{trace}-b7ad6b7169203331-01"))
                .build(),
        )
        .await;
    assert_eq!(sampled.status, 200);
    let spans = collector
        .wait_for("the sampled request", |s| !request_spans(s).is_empty())
        .await;
    // Anything else would have come in the same batch or the next.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let spans = collector
        .spans()
        .into_iter()
        .chain(spans)
        .collect::<Vec<_>>();
    let roots = request_spans(&spans);
    assert!(
        roots.iter().all(|s| s.trace_id() == trace),
        "only the sampled trace is kept"
    );
    assert_eq!(
        roots[0].attr("portcullis.key.id").as_deref(),
        Some("ci-bot")
    );
    assert_eq!(
        roots[0].attr("portcullis.tenant.id").as_deref(),
        Some("omni2")
    );
    // The unsampled request still carried context, marked not sampled.
    let recorded = gw.router().requests();
    let tp = recorded[0].header("traceparent").expect("a traceparent");
    assert!(tp.starts_with("00-") && tp.ends_with("-00"), "{tp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_hung_collector_drops_and_counts_every_span_and_fails_no_request() {
    let hung = Collector::stalled().await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    for (endpoint, what) in [(dead, "dead"), (hung.endpoint(), "hung")] {
        let mut config = telemetry(&endpoint);
        config = set(config, "telemetry.queue_size", 8);
        config = set(config, "telemetry.export_timeout_ms", 300);
        let gw = Gateway::start_with(Options {
            config,
            ..Options::default()
        })
        .await;
        let token = gw.keys.token("acme");
        for _ in 0..20 {
            let r = gw
                .send(&post(CHAT, &chat("m-small", "hi")).bearer(&token).build())
                .await;
            assert_eq!(r.status, 200, "{what} collector");
        }
        // Seven spans a request (the request, identity, authz, the two
        // limits steps, body, upstream): every one is dropped, by a full
        // queue or a failed export, and counted once.
        let mut dropped = 0;
        for _ in 0..100 {
            dropped = metric(&gw, "portcullis_telemetry_spans_dropped_total").await;
            if dropped >= 140 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(
            metric(&gw, "portcullis_telemetry_spans_dropped_total").await,
            140,
            "{what} collector: dropped {dropped}"
        );
        assert_eq!(gw.router_count(), 20);
    }
    assert!(hung.posts() >= 1, "the hung collector was tried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tenant_label_is_capped_or_replaced_and_logs_keep_the_real_id() {
    let lines = |gw: &Gateway| {
        let gw_admin = gw.admin;
        async move {
            let r = send(gw_admin, &get("/metrics").build()).await.unwrap();
            String::from_utf8_lossy(&r.body).into_owned()
        }
    };
    let series = |tenant: &str| {
        format!("portcullis_requests_total{{route=\"chat_completions\",status=\"200\",tenant=\"{tenant}\"}} ")
    };
    let tenants = ["acme", "globex", "bigco"];
    // A cap of 2: the third tenant reports as `other`.
    let gw = Gateway::start_with(Options {
        config: set(toml::Table::new(), "observe.max_tenant_series", 2),
        capture_logs: true,
        ..Options::default()
    })
    .await;
    for t in tenants {
        let r = chat_as(&gw, t).await;
        assert_eq!(r.status, 200, "{t}");
    }
    let again = chat_as(&gw, "acme").await;
    assert_eq!(again.status, 200);
    let text = lines(&gw).await;
    assert!(text.contains(&format!("{}2", series("acme"))), "{text}");
    assert!(text.contains(&format!("{}1", series("globex"))), "{text}");
    assert!(text.contains(&format!("{}1", series("other"))), "{text}");
    assert!(
        !text.contains("tenant=\"bigco\""),
        "the capped tenant has no series:\n{text}"
    );
    assert!(
        text.contains("portcullis_inflight_requests{tenant=\"other\"} 0"),
        "{text}"
    );
    let logged: Vec<String> = log_lines(&gw, "access", 4)
        .await
        .iter()
        .map(|l| l["tenant"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert!(
        logged.contains(&"bigco".to_owned()),
        "the log keeps the real id: {logged:?}"
    );
    drop(gw);

    // `plan`: the plan stands in for the tenant; `none`: `-`.
    for (mode, labels) in [
        ("plan", ["basic", "gold", "big"]),
        ("none", ["-", "-", "-"]),
    ] {
        let gw = Gateway::start_with(Options {
            config: set(toml::Table::new(), "observe.tenant_label", mode),
            ..Options::default()
        })
        .await;
        for t in tenants {
            let r = chat_as(&gw, t).await;
            assert_eq!(r.status, 200, "{t}");
        }
        let text = lines(&gw).await;
        for label in labels {
            assert!(
                text.contains(&series(label)),
                "{mode}: no {label} series:\n{text}"
            );
        }
        for t in tenants {
            assert!(
                !text.contains(&format!("tenant=\"{t}\"")),
                "{mode}: {t} has a series:\n{text}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_report_first_token_and_per_token_times_and_the_usage_record_adds_up() {
    let delay = Duration::from_millis(150);
    let interval = Duration::from_millis(40);
    let gw = Gateway::start_with(Options {
        router: RouterMode::Up(MockOptions {
            delay,
            event_interval: interval,
            ..MockOptions::default()
        }),
        capture_logs: true,
        ..Options::default()
    })
    .await;
    let token = gw.keys.token("globex");
    let mut stream = chat("m-small", "hi");
    stream["stream"] = json!(true);
    let streamed = gw.send(&post(CHAT, &stream).bearer(&token).build()).await;
    assert_eq!(streamed.status, 200);
    let plain = gw
        .send(&post(CHAT, &chat("m-small", "hello")).bearer(&token).build())
        .await;
    assert_eq!(plain.status, 200);
    let keyed = gw
        .send(
            &post(CHAT, &chat("m-small", "hi"))
                .header("x-api-key", &gw.keys.ci_key)
                .build(),
        )
        .await;
    assert_eq!(keyed.status, 200);
    let anonymous = gw.send(&post(CHAT, &chat("m-small", "hi")).build()).await;
    assert_eq!(anonymous.status, 401);

    let route = "{route=\"chat_completions\"}";
    let m = |name: &str| format!("portcullis_{name}{route}");
    assert_eq!(
        metric(&gw, &m("time_to_first_token_seconds_count")).await,
        1,
        "streams only"
    );
    let ttft = metric_f64(&gw, &m("time_to_first_token_seconds_sum")).await;
    assert!(
        ttft >= delay.as_secs_f64(),
        "ttft {ttft} counts the router's wait"
    );
    assert_eq!(
        metric(&gw, &m("time_per_output_token_seconds_count")).await,
        1
    );
    // 3 tokens: the usage and [DONE] events come 2 and 3 intervals after
    // the last content event, so the gaps average at least one interval.
    let per_token = metric_f64(&gw, &m("time_per_output_token_seconds_sum")).await;
    assert!(per_token >= interval.as_secs_f64(), "per token {per_token}");

    let lines = log_lines(&gw, "access", 4).await;
    let line = |r: &Response| {
        lines
            .iter()
            .find(|l| l["request_id"] == r.header("x-request-id").unwrap())
            .cloned()
            .expect("an access line")
    };
    // Every record has every usage field, null when the request had none.
    for l in &lines {
        for field in [
            "key_id",
            "cached_tokens",
            "reasoning_tokens",
            "cost",
            "ttft_ms",
            "trace_id",
        ] {
            assert!(
                l.as_object().unwrap().contains_key(field),
                "{field} missing: {l}"
            );
        }
        assert!(l["trace_id"].is_null(), "tracing is off: {l}");
    }
    let s = line(&streamed);
    assert!(
        s["ttft_ms"].as_f64().unwrap() >= delay.as_millis() as f64,
        "{s}"
    );
    assert_eq!(s["completion_tokens"], 3, "{s}");
    let p = line(&plain);
    assert!(p["ttft_ms"].is_null(), "not a stream: {p}");
    let recorded = gw.router().requests();
    let prompt = recorded[1].body.len() as u64 / 4;
    assert_eq!(
        (p["cached_tokens"].as_u64(), p["reasoning_tokens"].as_u64()),
        (Some(prompt / 2), Some(2)),
        "{p}"
    );
    // `[prices."m-small"]`: 1000 in, 2000 out, 500 cached, per million.
    let cost =
        ((prompt - prompt / 2) as f64 * 1000.0 + (prompt / 2) as f64 * 500.0 + 6.0 * 2000.0) / 1e6;
    assert!(
        (p["cost"].as_f64().unwrap() - cost).abs() < 1e-9,
        "cost {cost}: {p}"
    );
    assert!(p["key_id"].is_null(), "{p}");
    assert_eq!(line(&keyed)["key_id"], "ci-bot");
    let a = line(&anonymous);
    assert!(
        a["cost"].is_null() && a["cached_tokens"].is_null() && a["key_id"].is_null(),
        "{a}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_exports_the_same_trace() {
    let collector = Collector::grpc().await;
    let config = set(
        telemetry(&collector.endpoint()),
        "telemetry.protocol",
        "grpc",
    );
    let gw = Gateway::start_with(Options {
        config,
        ..Options::default()
    })
    .await;
    let r = chat_as(&gw, "acme").await;
    assert_eq!(r.status, 200);
    let spans = collector
        .wait_for("the request's spans", |s| {
            s.iter().any(|s| s.name() == "portcullis.request")
                && s.iter().any(|s| s.name() == "upstream")
        })
        .await;
    let root = request_spans(&spans)[0];
    assert_eq!(
        (root.service.as_str(), root.span.kind),
        ("edge-test", SERVER)
    );
    let upstream = spans.iter().find(|s| s.name() == "upstream").unwrap();
    assert_eq!(upstream.parent_id(), root.span_id());
    assert_eq!(
        gw.router().requests()[0].header("traceparent"),
        Some(format!("00-{}-{}-01", root.trace_id(), upstream.span_id()).as_str())
    );
    assert!(collector.posts() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_finished_before_a_sigterm_are_exported() {
    let collector = Collector::start().await;
    let mut gw = Gateway::start_with(Options {
        config: telemetry(&collector.endpoint()),
        ..Options::default()
    })
    .await;
    let r = chat_as(&gw, "acme").await;
    assert_eq!(r.status, 200);
    gw.terminate().await;
    let spans = collector.spans();
    assert_eq!(request_spans(&spans).len(), 1, "{spans:?}");
    assert_eq!(spans.len(), 7, "every span of the request");
}
