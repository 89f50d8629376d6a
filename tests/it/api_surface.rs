//! The API surface beyond chat: Responses with tenant-bound ids, Anthropic
//! Messages, the JSON routes and multipart audio, each with its rejections
//! and "the router saw nothing".

use crate::common::*;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

const OMNI_MODELS: &str = "m-small";

fn responses_body() -> Value {
    json!({"model": OMNI_MODELS, "input": "Hello", "max_output_tokens": 5000})
}

/// The `data:` objects of an SSE body, with their event names.
fn events(body: &[u8]) -> Vec<(String, Value)> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let name = e
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap_or_default()
                .to_string();
            let data = e
                .lines()
                .find_map(|l| l.strip_prefix("data: "))
                .expect("a data line");
            (name, serde_json::from_str(data).expect("JSON data"))
        })
        .collect()
}

/// A Responses answer leaves with a bound id; the same tenant gets the
/// stored object by it (the router sees its own id), another tenant or an
/// altered id gets 404 with the router untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_ids_are_bound_to_the_tenant_that_created_them() {
    let gw = Gateway::start().await;
    let (omni, omni2) = (gw.keys.token("omni"), gw.keys.token("omni2"));
    let r = gw
        .send(
            &post("/v1/responses", &responses_body())
                .bearer(&omni)
                .build(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let created = r.json();
    let bound = created["id"].as_str().unwrap().to_string();
    let sent = &gw.router().requests()[0];
    let sent_body: Value = serde_json::from_slice(&sent.body).unwrap();
    assert_eq!(sent_body["max_output_tokens"], 1000, "clamped to the plan");
    assert!(bound.starts_with("resp_") && bound.len() <= 256, "{bound}");
    assert!(
        !bound.contains("mock"),
        "the router's id never leaves: {bound}"
    );
    let router_id = "resp_mock0000";

    // The same tenant: every object route reaches the router with its id.
    for (method, suffix, want) in [
        ("GET", "", "response"),
        ("GET", "/input_items", "list"),
        ("POST", "/cancel", "response"),
        ("DELETE", "", "response.deleted"),
    ] {
        let path = format!("/v1/responses/{bound}{suffix}");
        let req = match method {
            "POST" => post_raw(&path, vec![]).content_type(None),
            _ => get(&path),
        };
        let raw = String::from_utf8(req.bearer(&omni).build()).unwrap();
        // Only the request line's method: a token may contain "GET".
        let raw = match raw.strip_prefix("GET ") {
            Some(rest) => format!("{method} {rest}"),
            None => raw,
        };
        let before = gw.router_count();
        let r = gw.send(raw.as_bytes()).await;
        assert_eq!(
            r.status,
            200,
            "{method} {suffix}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert_eq!(r.json()["object"], want);
        let seen = &gw.router().requests()[before];
        assert_eq!(seen.method, method);
        assert_eq!(seen.path, format!("/v1/responses/{router_id}{suffix}"));
        if want != "list" {
            assert_eq!(
                r.json()["id"],
                bound.as_str(),
                "the same bound id comes back"
            );
        }
    }

    // Another tenant, an altered id, the router's own id: 404, untouched.
    let mut altered = bound.clone().into_bytes();
    let last = altered.len() - 1;
    altered[last] = if altered[last] == b'a' { b'b' } else { b'a' };
    let altered = String::from_utf8(altered).unwrap();
    let before = gw.router_count();
    for (who, id) in [
        (&omni2, bound.as_str()),
        (&omni, &altered),
        (&omni, router_id),
    ] {
        let r = gw
            .send(&get(&format!("/v1/responses/{id}")).bearer(who).build())
            .await;
        assert_eq!((r.status, r.code()), (404, "response_not_found".into()));
        assert_eq!(r.json()["error"]["param"], "response_id");
    }
    // previous_response_id: opened for its tenant, refused for another.
    let follow = json!({"model": OMNI_MODELS, "input": "and then?", "previous_response_id": bound});
    let r = gw
        .send(&post("/v1/responses", &follow).bearer(&omni2).build())
        .await;
    assert_eq!((r.status, r.code()), (404, "response_not_found".into()));
    assert_eq!(r.json()["error"]["param"], "previous_response_id");
    assert_eq!(
        gw.router_count(),
        before,
        "refused ids never reach the router"
    );
    // The same on a json route that can name a stored response.
    for (who, id) in [(&omni2, bound.as_str()), (&omni, router_id)] {
        let count = json!({"model": OMNI_MODELS, "input": "x", "previous_response_id": id});
        let r = gw
            .send(
                &post("/v1/responses/input_tokens", &count)
                    .bearer(who)
                    .build(),
            )
            .await;
        assert_eq!((r.status, r.code()), (404, "response_not_found".into()));
    }
    assert_eq!(
        gw.router_count(),
        before,
        "refused ids never reach the router"
    );
    let count = json!({"model": OMNI_MODELS, "input": "x", "previous_response_id": bound});
    let r = gw
        .send(
            &post("/v1/responses/input_tokens", &count)
                .bearer(&omni)
                .build(),
        )
        .await;
    assert_eq!(r.status, 200);
    let seen: Value = serde_json::from_slice(&gw.router().requests()[before].body).unwrap();
    assert_eq!(seen["previous_response_id"], router_id);
    let before = gw.router_count();
    let r = gw
        .send(&post("/v1/responses", &follow).bearer(&omni).build())
        .await;
    assert_eq!(r.status, 200);
    let seen: Value = serde_json::from_slice(&gw.router().requests()[before].body).unwrap();
    assert_eq!(seen["previous_response_id"], router_id);
    assert_eq!(r.json()["previous_response_id"], bound.as_str());
}

/// A streamed response: every event that carries the response carries its
/// bound id, and the usage of `response.completed` is charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_response_binds_its_ids_and_settles_its_usage() {
    let gw = Gateway::start().await;
    let omni = gw.keys.token("omni");
    let mut body = responses_body();
    body["stream"] = json!(true);
    let r = gw
        .send(&post("/v1/responses", &body).bearer(&omni).build())
        .await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let sent: Value = serde_json::from_slice(&gw.router().requests()[0].body).unwrap();
    assert!(
        sent.get("stream_options").is_none(),
        "no chat-only members added"
    );
    let evs = events(&r.body);
    let names: Vec<&str> = evs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.first(), Some(&"response.created"));
    assert_eq!(names.last(), Some(&"response.completed"));
    let ids: Vec<&str> = evs
        .iter()
        .filter_map(|(_, v)| v["response"]["id"].as_str())
        .collect();
    assert_eq!(ids.len(), 2);
    assert_eq!(ids[0], ids[1]);
    assert!(!ids[0].contains("mock"));
    // The bound id from the stream fetches the stored response.
    let r = gw
        .send(
            &get(&format!("/v1/responses/{}", ids[0]))
                .bearer(&omni)
                .build(),
        )
        .await;
    assert_eq!(r.status, 200);
    let usage = &evs.last().unwrap().1["response"]["usage"];
    let charged = metric(
        &gw,
        r#"portcullis_tokens_total{kind="completion",model="m-small",tenant="omni"} "#,
    )
    .await;
    assert_eq!(charged, usage["output_tokens"].as_u64().unwrap());
}

/// What the Responses body can ask for is checked against the plan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_requests_are_judged_before_the_router() {
    let gw = Gateway::start().await;
    let (omni, acme) = (gw.keys.token("omni"), gw.keys.token("acme"));
    let cases = [
        (&acme, responses_body(), 403, "route_not_allowed", None),
        (
            &omni,
            json!({"model": "m-large", "input": "x"}),
            403,
            "model_not_allowed",
            Some("model"),
        ),
        (
            &omni,
            json!({"model": OMNI_MODELS, "input": "x", "text": {"format": {"type": "json_schema"}}}),
            403,
            "feature_not_allowed",
            Some("text"),
        ),
        (
            &omni,
            json!({"model": OMNI_MODELS, "input": [{"role": "user", "content": [
                {"type": "input_image", "image_url": "data:image/png;base64,AAAA"}]}]}),
            403,
            "feature_not_allowed",
            Some("input"),
        ),
        (
            &omni,
            json!({"model": OMNI_MODELS, "input": "x", "frobnicate": true}),
            400,
            "schema_violation",
            None,
        ),
        (
            &omni,
            json!({"model": OMNI_MODELS, "input": "word ".repeat(5000)}),
            400,
            "prompt_too_long",
            Some("input"),
        ),
    ];
    for (who, body, status, code, param) in cases {
        let r = gw
            .send(&post("/v1/responses", &body).bearer(who).build())
            .await;
        assert_rejected(&gw, &r, status, code);
        if let Some(p) = param {
            assert_eq!(r.json()["error"]["param"], p, "{code}");
        }
    }
    let r = gw
        .send(
            &post("/v1/responses", &responses_body())
                .bearer(&omni)
                .build(),
        )
        .await;
    assert_eq!(r.status, 200, "the same plan, an allowed request");
}

/// Anthropic's dialect: `x-api-key`, its version headers passed on,
/// `max_tokens` always set, its error shape and rate-limit headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_messages_speak_the_anthropic_dialect() {
    let gw = Gateway::start().await;
    let body = json!({"model": OMNI_MODELS, "messages": [{"role": "user", "content": "Hello"}]});
    let r = gw
        .send(
            &post("/v1/messages", &body)
                .header("x-api-key", &gw.keys.omni_key)
                .header("anthropic-version", "2023-06-01")
                .header("anthropic-beta", "prompt-caching-2024-07-31")
                .build(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["type"], "message");
    let first_input = r.json()["usage"]["input_tokens"].as_u64().unwrap();
    for h in [
        "anthropic-ratelimit-requests-limit",
        "anthropic-ratelimit-requests-remaining",
        "anthropic-ratelimit-tokens-limit",
        "anthropic-ratelimit-tokens-remaining",
        "x-ratelimit-limit-requests",
    ] {
        assert!(r.header(h).is_some(), "{h} missing");
    }
    let reset = r.header("anthropic-ratelimit-tokens-reset").unwrap();
    assert!(humantime::parse_rfc3339(reset).is_ok(), "{reset}");
    let seen = &gw.router().requests()[0];
    assert_eq!(seen.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(
        seen.header("anthropic-beta"),
        Some("prompt-caching-2024-07-31")
    );
    assert!(
        seen.header_values("x-api-key").is_empty(),
        "the credential stays here"
    );
    assert_eq!(seen.header("x-tenant-id"), Some("omni"));
    let sent: Value = serde_json::from_slice(&seen.body).unwrap();
    assert_eq!(sent["max_tokens"], 1000, "set to the plan's cap");

    // A stream: usage from message_start plus the last message_delta.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["max_tokens"] = json!(50);
    let r = gw
        .send(
            &post("/v1/messages", &streamed)
                .header("x-api-key", &gw.keys.omni_key)
                .build(),
        )
        .await;
    assert_eq!(r.status, 200);
    let evs = events(&r.body);
    assert_eq!(evs.first().unwrap().0, "message_start");
    assert_eq!(evs.last().unwrap().0, "message_stop");
    let input = evs[0].1["message"]["usage"]["input_tokens"]
        .as_u64()
        .unwrap();
    let prompt = metric(
        &gw,
        r#"portcullis_tokens_total{kind="prompt",model="m-small",tenant="omni"} "#,
    )
    .await;
    assert_eq!(
        prompt,
        input + first_input,
        "the stream's input tokens are charged"
    );

    // Errors: Anthropic's shape, the Portcullis code, the same status.
    let before = gw.router_count();
    let cases = [
        (
            post("/v1/messages", &body),
            401,
            "authentication_error",
            "missing_credentials",
        ),
        (
            post("/v1/messages", &body).header("x-api-key", &gw.keys.acme_key),
            403,
            "permission_error",
            "route_not_allowed",
        ),
        (
            post("/v1/messages", &json!({"model": "m-large", "messages": []}))
                .header("x-api-key", &gw.keys.omni_key),
            403,
            "permission_error",
            "model_not_allowed",
        ),
        (
            post_raw("/v1/messages", b"{\"model\":".to_vec())
                .header("x-api-key", &gw.keys.omni_key),
            400,
            "invalid_request_error",
            "invalid_json",
        ),
        (
            post(
                "/v1/messages/count_tokens",
                &json!({"model": "m-large", "messages": []}),
            )
            .header("x-api-key", &gw.keys.omni_key),
            403,
            "permission_error",
            "model_not_allowed",
        ),
    ];
    for (req, status, kind, code) in cases {
        let r = gw.send(&req.build()).await;
        assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], kind);
        assert_eq!(v["error"]["code"], code);
        assert_eq!(v["request_id"], r.header("x-request-id").unwrap());
    }
    assert_eq!(
        gw.router_count(),
        before,
        "no refused request reached the router"
    );
    let r = gw
        .send(
            &post("/v1/messages/count_tokens", &body)
                .header("x-api-key", &gw.keys.omni_key)
                .build(),
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(r.json()["input_tokens"].as_u64().is_some());
}

/// Moderations and rerank: strict JSON, their schemas, the allowlist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_routes_check_their_schema_and_model() {
    let gw = Gateway::start().await;
    let omni = gw.keys.token("omni");
    let ok = [
        ("/v1/moderations", json!({"input": "is this fine?"})),
        (
            "/v1/moderations",
            json!({"model": OMNI_MODELS, "input": ["a", "b"]}),
        ),
        (
            "/v1/rerank",
            json!({"model": OMNI_MODELS, "query": "q", "documents": ["a", "b"]}),
        ),
        (
            "/v1/responses/input_tokens",
            json!({"model": OMNI_MODELS, "input": "x"}),
        ),
    ];
    for (path, body) in &ok {
        let r = gw.send(&post(path, body).bearer(&omni).build()).await;
        assert_eq!(
            r.status,
            200,
            "{path}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    let gw = Gateway::start().await;
    let omni = gw.keys.token("omni");
    let acme = gw.keys.token("acme");
    let refused = [
        (
            &omni,
            "/v1/moderations",
            json!({"input": "x", "extra": 1}),
            400,
            "schema_violation",
        ),
        (
            &omni,
            "/v1/rerank",
            json!({"model": OMNI_MODELS, "query": "q"}),
            400,
            "schema_violation",
        ),
        (
            &omni,
            "/v1/rerank",
            json!({"model": "m-large", "query": "q", "documents": ["a"]}),
            403,
            "model_not_allowed",
        ),
        (
            &acme,
            "/v1/moderations",
            json!({"input": "x"}),
            403,
            "route_not_allowed",
        ),
    ];
    for (who, path, body, status, code) in refused {
        let r = gw.send(&post(path, &body).bearer(who).build()).await;
        assert_rejected(&gw, &r, status, code);
    }
}

const BOUNDARY: &str = "PortcullisTestBoundary";

fn form(model: Option<&str>, audio: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(
        format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\
             Content-Type: audio/wav\r\n\r\n"
        )
        .as_bytes(),
    );
    out.extend_from_slice(audio);
    out.extend_from_slice(b"\r\n");
    if let Some(m) = model {
        out.extend_from_slice(
            format!(
                "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n{m}\r\n"
            )
            .as_bytes(),
        );
    }
    out.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    out
}

fn upload(token: &str, body: Vec<u8>) -> Req {
    post_raw("/v1/audio/transcriptions", body)
        .content_type(Some(&format!("multipart/form-data; boundary={BOUNDARY}")))
        .bearer(token)
}

/// Audio uploads: the form is checked and forwarded byte for byte; a 25 MiB
/// file passes the route's own cap, one byte more does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_uploads_are_framed_checked_and_forwarded_as_sent() {
    let gw = Gateway::start().await;
    let omni = gw.keys.token("omni");
    // Binary audio, with CRLFs and dashes inside, above the 64 KiB plan cap.
    let audio: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let body = form(Some("whisper-1"), &audio);
    let r = gw.send(&upload(&omni, body.clone()).build()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.json()["text"].is_string());
    let seen = &gw.router().requests()[0];
    assert_eq!(seen.body, body, "forwarded byte for byte");
    assert_eq!(seen.header("x-tenant-model"), Some("whisper-1"));

    let cap = 26_214_400;
    let gw = Gateway::start().await;
    let omni = gw.keys.token("omni");
    let fits = form(Some("whisper-1"), &vec![b'a'; 25 * 1024 * 1024 - 400]);
    assert!(fits.len() <= cap);
    let r = gw.send(&upload(&omni, fits.clone()).build()).await;
    assert_eq!(r.status, 200, "a 25 MiB upload passes");
    assert_eq!(gw.router().requests()[0].body.len(), fits.len());

    let gw = Gateway::start().await;
    let omni = gw.keys.token("omni");
    // Declared over the cap: refused on the head, before a byte is read.
    let over = upload(&omni, vec![]).build_raw_head(&format!("Content-Length: {}\r\n", cap + 1));
    let r = gw.send(&over).await;
    assert_rejected(&gw, &r, 413, "body_too_large");
    let mut truncated = form(Some("whisper-1"), &audio);
    truncated.truncate(truncated.len() - 10);
    let mut preamble = b"hello\r\n".to_vec();
    preamble.extend(form(Some("whisper-1"), &audio));
    let no_disposition =
        format!("--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nwhisper-1\r\n--{BOUNDARY}--\r\n")
            .into_bytes();
    let cases: Vec<(Req, u16, &str, Option<&str>)> = vec![
        (
            upload(&omni, form(None, &audio)),
            400,
            "invalid_request",
            Some("model"),
        ),
        (upload(&omni, truncated), 400, "invalid_request", None),
        (upload(&omni, preamble), 400, "invalid_request", None),
        (upload(&omni, no_disposition), 400, "invalid_request", None),
        (
            upload(&omni, form(Some("m-large"), &audio)),
            403,
            "model_not_allowed",
            None,
        ),
        (
            upload(&omni, form(Some("whisper-1"), &audio))
                .content_type(Some("multipart/form-data")),
            400,
            "invalid_request",
            None,
        ),
        (
            upload(&omni, form(Some("whisper-1"), &audio)).content_type(Some("application/json")),
            415,
            "unsupported_media_type",
            None,
        ),
    ];
    for (req, status, code, param) in cases {
        let r = gw.send(&req.build()).await;
        assert_rejected(&gw, &r, status, code);
        if let Some(p) = param {
            assert_eq!(r.json()["error"]["param"], p);
        }
    }
    // A malformed chunked upload above 64 KiB: refused, the router untouched.
    let mut bad = form(Some("whisper-1"), &audio);
    bad.truncate(bad.len() - 4);
    let mut raw = upload(&omni, vec![]).build_raw_head("Transfer-Encoding: chunked\r\n");
    for piece in bad.chunks(16 * 1024) {
        raw.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        raw.extend_from_slice(piece);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let r = gw.send(&raw).await;
    assert_rejected(&gw, &r, 400, "invalid_request");
}

/// A Responses answer changes length on its way (its ids are bound): it is
/// held whole and leaves with its exact new length, and the client's
/// connection stays reusable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewritten_answer_keeps_its_framing_and_the_connection() {
    let gw = Gateway::start().await;
    let omni = gw.keys.token("omni");
    let req = String::from_utf8(
        post("/v1/responses", &responses_body())
            .bearer(&omni)
            .build(),
    )
    .unwrap()
    .replace("Connection: close\r\n", "");
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    for round in 0..2 {
        s.write_all(req.as_bytes()).await.unwrap();
        let (status, close) = read_keep_alive(&mut s)
            .await
            .unwrap_or_else(|| panic!("round {round}: no Content-Length answer, or a close"));
        assert_eq!((status, close), (200, false), "round {round}");
    }
    assert_eq!(gw.router_count(), 2);
}
