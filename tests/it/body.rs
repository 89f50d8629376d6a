//! The body gate end to end: bounded reads, media types, strict JSON,
//! schema and policy, normalisation, and the invariant that a rejected body
//! never reaches the router, below and above Pingora's 64 KiB replay buffer.

use std::time::Duration;

use crate::common::*;
use portcullis::mock_router::MockOptions;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHAT: &str = "/v1/chat/completions";

/// A chat body whose compact serialisation is exactly `size` bytes.
fn chat_of_size(size: usize) -> Value {
    let mut v = json!({"model": "m-small", "messages": [{"role": "user", "content": ""}]});
    let base = v.to_string().len();
    assert!(size >= base);
    let words = "the quick brown fox jumps over the lazy dog ";
    let content: String = words.chars().cycle().take(size - base).collect();
    v["messages"][0]["content"] = json!(content);
    assert_eq!(v.to_string().len(), size);
    v
}

/// What the router must receive for `body` under a plan capping output at `cap`.
fn normalised(body: &Value, cap: u64) -> Vec<u8> {
    let mut v = body.clone();
    if v.get("max_tokens").is_none() {
        v["max_tokens"] = json!(cap);
    }
    serde_json::to_vec(&v).unwrap()
}

async fn assert_untouched_router(gw: &Gateway) {
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(gw.router().connections(), 0, "the router saw a connection");
    assert_eq!(gw.router_count(), 0, "the router saw a request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_bodies_of_every_size_reach_the_router_complete() {
    let gw = Gateway::start().await;
    let token = gw.keys.token("bigco");
    // 64 KiB and one byte more straddle Pingora's replay buffer.
    for size in [1024, 65_536, 65_537, 100 * 1024, 1024 * 1024] {
        let body = chat_of_size(size);
        let r = gw.send(&post(CHAT, &body).bearer(&token).build()).await;
        assert_eq!(
            r.status,
            200,
            "{size}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json()["object"], "chat.completion");
        assert!(r.header("x-request-id").is_some());
        let rec = gw.router().requests().pop().unwrap();
        assert_eq!(rec.body.len(), normalised(&body, 4096).len(), "{size}");
        assert!(rec.body == normalised(&body, 4096), "{size}: body differs");
        assert_eq!(
            rec.header("content-length"),
            Some(rec.body.len().to_string().as_str())
        );
        assert_eq!(rec.header("x-tenant-id"), Some("bigco"));
        assert_eq!(rec.header("x-tenant-model"), Some("m-small"));
        assert!(rec.header_values("authorization").is_empty());
    }
    assert_eq!(gw.router_count(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_decidable_rejections_open_no_connection() {
    let gw = Gateway::start().await;
    let token = gw.keys.token("acme");
    let body = chat_body();
    let cases = [
        (
            post(CHAT, &body)
                .bearer(&token)
                .content_type(Some("text/plain")),
            415,
            "unsupported_media_type",
        ),
        (
            post(CHAT, &body).bearer(&token).content_type(None),
            415,
            "unsupported_media_type",
        ),
        (
            post(CHAT, &body)
                .bearer(&token)
                .content_type(Some("application/json; charset=iso-8859-1")),
            415,
            "unsupported_media_type",
        ),
        (
            post(CHAT, &body)
                .bearer(&token)
                .header("Content-Encoding", "gzip"),
            415,
            "unsupported_media_type",
        ),
    ];
    for (req, status, code) in cases {
        let r = gw.send(&req.build()).await;
        assert_eq!((r.status, r.code()), (status, code.to_string()));
    }
    // A declared length over the plan's 64 KiB: refused before a byte is read.
    let head = post(CHAT, &body)
        .bearer(&token)
        .build_raw_head("Content-Length: 70000\r\n");
    let r = gw.send(&head).await;
    assert_eq!((r.status, r.code()), (413, "body_too_large".to_string()));
    assert_untouched_router(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_bodies_send_nothing_below_and_above_64k() {
    let gw = Gateway::start().await;
    let token = gw.keys.token("bigco");
    for size in [2_000, 200_000] {
        let good = chat_of_size(size).to_string();
        let dup = format!("{},\"model\":\"m-small\"}}", &good[..good.len() - 1]);
        let r = gw
            .send(&post_raw(CHAT, dup.into_bytes()).bearer(&token).build())
            .await;
        assert_eq!(
            (r.status, r.code()),
            (400, "invalid_json".to_string()),
            "{size}"
        );
        assert!(r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("duplicate key"));

        let mut v = chat_of_size(size);
        v["model"] = json!("m-large");
        let r = gw.send(&post(CHAT, &v).bearer(&token).build()).await;
        assert_eq!(
            (r.status, r.code()),
            (403, "model_not_allowed".to_string()),
            "{size}"
        );

        let mut v = chat_of_size(size);
        v["surprise"] = json!(1);
        let r = gw.send(&post(CHAT, &v).bearer(&token).build()).await;
        assert_eq!(
            (r.status, r.code()),
            (400, "schema_violation".to_string()),
            "{size}"
        );
        assert_eq!(r.json()["error"]["param"], "/surprise");
    }
    assert_untouched_router(&gw).await;
}

/// Sends a chunked request whose chunks total `total` bytes of a valid body.
fn chunked(token: &str, body: &[u8], chunk: usize) -> Vec<u8> {
    let mut raw = post_raw(CHAT, vec![])
        .bearer(token)
        .build_raw_head("Transfer-Encoding: chunked\r\n");
    for piece in body.chunks(chunk) {
        raw.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        raw.extend_from_slice(piece);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    raw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_are_counted_and_cut_off() {
    let gw = Gateway::start().await;
    let token = gw.keys.token("acme");
    let too_big = chat_of_size(70_000).to_string();
    let r = gw.send(&chunked(&token, too_big.as_bytes(), 8192)).await;
    assert_eq!((r.status, r.code()), (413, "body_too_large".to_string()));
    assert_untouched_router(&gw).await;

    let ok = chat_of_size(3_000);
    let r = gw
        .send(&chunked(&token, ok.to_string().as_bytes(), 1000))
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let rec = gw.router().requests().pop().unwrap();
    assert_eq!(rec.body, normalised(&ok, 1024));
    assert!(
        rec.header_values("transfer-encoding").is_empty(),
        "re-framed with a length"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_body_gets_408() {
    let gw = Gateway::start_with(Options {
        config: toml::toml! {
            [body]
            read_timeout_ms = 300
        },
        ..Options::default()
    })
    .await;
    let token = gw.keys.token("acme");
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = post_raw(CHAT, vec![])
        .bearer(&token)
        .build_raw_head("Content-Length: 100\r\n");
    s.write_all(&head).await.unwrap();
    s.write_all(b"{\"model\":").await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("the gateway gave up on the stalled body")
        .unwrap();
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"code\":\"request_timeout\""), "{text}");
    assert_untouched_router(&gw).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_and_feature_policy_carry_their_codes() {
    let gw = Gateway::start().await;
    let acme = gw.keys.token("acme");
    let globex = gw.keys.token("globex");
    let bigco = gw.keys.token("bigco");
    let chat = |extra: Value| {
        let mut v = chat_body();
        for (k, val) in extra.as_object().unwrap() {
            v[k] = val.clone();
        }
        v
    };
    let image = json!([{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]);
    let long_prompt = "word ".repeat(6000);
    let cases: Vec<(&str, Value, u16, &str, Option<&str>)> = vec![
        (
            &acme,
            chat(json!({"model": "m-large"})),
            403,
            "model_not_allowed",
            Some("model"),
        ),
        (
            &acme,
            chat(json!({"model": "m-small\n"})),
            403,
            "model_not_allowed",
            Some("model"),
        ),
        (
            &acme,
            chat(json!({"stream": true})),
            403,
            "feature_not_allowed",
            Some("stream"),
        ),
        (
            &globex,
            chat(json!({"tools": [{"type": "function", "function": {"name": "f"}}]})),
            403,
            "feature_not_allowed",
            Some("tools"),
        ),
        (
            &globex,
            chat(json!({"response_format": {"type": "json_object"}})),
            403,
            "feature_not_allowed",
            Some("response_format"),
        ),
        (
            &globex,
            chat(json!({"logprobs": true})),
            403,
            "feature_not_allowed",
            Some("logprobs"),
        ),
        (
            &globex,
            chat(json!({"n": 2})),
            403,
            "feature_not_allowed",
            Some("n"),
        ),
        (
            &globex,
            chat(json!({"messages": image})),
            403,
            "feature_not_allowed",
            Some("messages"),
        ),
        (
            &acme,
            chat(json!({"messages": [{"role": "user", "content": long_prompt}]})),
            400,
            "prompt_too_long",
            Some("messages"),
        ),
        (
            &bigco,
            chat(json!({"logit_bias": {"50256": -100}})),
            400,
            "schema_violation",
            Some("/logit_bias"),
        ),
        (
            &acme,
            chat(json!({"temperature": 7})),
            400,
            "schema_violation",
            Some("/temperature"),
        ),
        (
            &acme,
            json!({"model": "m-small"}),
            400,
            "schema_violation",
            Some("/messages"),
        ),
    ];
    for (token, body, status, code, param) in cases {
        let r = gw.send(&post(CHAT, &body).bearer(token).build()).await;
        assert_eq!((r.status, r.code()), (status, code.to_string()), "{body}");
        assert_eq!(r.json()["error"]["param"].as_str(), param, "{body}");
    }
    assert_untouched_router(&gw).await;

    // Allowed: a wildcard model, features in the plan, n=1 and logprobs=false.
    let ok = chat(json!({"model": "m-exp-7", "n": 1, "logprobs": false, "stream": false}));
    let r = gw.send(&post(CHAT, &ok).bearer(&globex).build()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        gw.router().requests()[0].header("x-tenant-model"),
        Some("m-exp-7")
    );
    // Above the output cap: clamped by default.
    let r = gw
        .send(
            &post(CHAT, &chat(json!({"max_tokens": 5000})))
                .bearer(&acme)
                .build(),
        )
        .await;
    assert_eq!(r.status, 200);
    let sent: Value = serde_json::from_slice(&gw.router().requests()[1].body).unwrap();
    assert_eq!(sent["max_tokens"], 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_cap_output_can_be_refused_instead() {
    let gw = Gateway::start_with(Options {
        config: toml::toml! {
            [body]
            max_tokens_over_cap = "reject"
        },
        ..Options::default()
    })
    .await;
    let mut body = chat_body();
    body["max_tokens"] = json!(5000);
    let r = gw
        .send(&post(CHAT, &body).bearer(&gw.keys.token("acme")).build())
        .await;
    assert_eq!((r.status, r.code()), (400, "invalid_request".to_string()));
    assert_eq!(r.json()["error"]["param"], "max_tokens");
    assert_untouched_router(&gw).await;
}

/// The `data:` payloads of an SSE body.
fn events(body: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: ").map(str::to_string))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_report_usage_to_the_gateway_and_only_to_clients_that_asked() {
    let gw = Gateway::start().await;
    for (tenant, size) in [("globex", 500), ("bigco", 100_000)] {
        let token = gw.keys.token(tenant);
        let mut body = chat_of_size(size);
        body["stream"] = json!(true);
        let r = gw.send(&post(CHAT, &body).bearer(&token).build()).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let sent: Value =
            serde_json::from_slice(&gw.router().requests().pop().unwrap().body).unwrap();
        assert_eq!(
            sent["stream_options"]["include_usage"], true,
            "forced on for {tenant}"
        );
        let got = events(&r.body);
        assert_eq!(
            got.len(),
            4,
            "three chunks and [DONE], no usage chunk: {got:?}"
        );
        assert_eq!(got.last().map(String::as_str), Some("[DONE]"));
        assert!(got.iter().all(|e| !e.contains("\"usage\":{")), "{got:?}");

        body["stream_options"] = json!({"include_usage": true});
        let r = gw.send(&post(CHAT, &body).bearer(&token).build()).await;
        let got = events(&r.body);
        assert_eq!(got.len(), 5, "the client asked for usage: {got:?}");
        assert!(got[3].contains("\"usage\":{"));
    }
}

/// Each event must reach the client when the router sends it, whichever way
/// the body went up (Pingora's proxy below 64 KiB, the gateway's own
/// exchange above): a chat UI shows tokens as they come, not in batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_events_reach_the_client_as_the_router_sends_them() {
    let interval = Duration::from_millis(700);
    let gw = Gateway::start_with(Options {
        router: RouterMode::Up(MockOptions {
            event_interval: interval,
            ..MockOptions::default()
        }),
        ..Options::default()
    })
    .await;
    for (tenant, size) in [("globex", 500), ("bigco", 100_000)] {
        let mut body = chat_of_size(size);
        body["stream"] = json!(true);
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(&post(CHAT, &body).bearer(&gw.keys.token(tenant)).build())
            .await
            .unwrap();
        // Read until the first event is whole; the router sends the next
        // one `interval` later, so the first must not wait for it.
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let started = std::time::Instant::now();
        let first_event_whole = |got: &[u8]| {
            let text = String::from_utf8_lossy(got);
            text.split_once("data: {")
                .is_some_and(|(_, rest)| rest.contains("\n\n"))
        };
        while !first_event_whole(&got) {
            let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
                .await
                .expect("no event within 10 s")
                .unwrap();
            assert!(
                n > 0,
                "closed before the first event ({tenant}): {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert_eq!(
            text.matches("data: ").count(),
            1,
            "{tenant}: events arrived batched: {text}"
        );
        assert!(
            started.elapsed() < interval * 2,
            "{tenant}: the first event waited {:?}",
            started.elapsed()
        );
    }
}
