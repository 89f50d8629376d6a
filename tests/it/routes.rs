//! Routes as data: a routes file (`[policy] routes`) replaces the built-in
//! table, is hot-reloaded, and a broken one changes nothing.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::json;

/// A routes file: chat under its usual path and under `/v1/chat/alt`
/// (with a 300-byte body cap), and the model list.
fn routes_file(with_alt: bool) -> String {
    let schema = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("policies/schemas/chat_completions.json")
        .display()
        .to_string();
    let alt = if with_alt {
        format!(
            "[[routes]]\npath = \"/v1/chat/alt\"\nmethods = [\"POST\"]\napi = \"openai.chat\"\n\
             feature = \"chat\"\nschema = \"{schema}\"\nmax_body_bytes = 300\n"
        )
    } else {
        String::new()
    };
    format!(
        "[[routes]]\npath = \"/v1/chat/completions\"\nmethods = [\"POST\"]\napi = \"openai.chat\"\n\
         feature = \"chat\"\nschema = \"{schema}\"\n\
         [[routes]]\npath = \"/v1/models\"\nmethods = [\"GET\"]\napi = \"openai.models\"\n{alt}"
    )
}

/// A gateway whose `[policy] routes` is `file`, as `routes.toml`.
async fn with_routes(file: String) -> Gateway {
    Gateway::start_with(Options {
        files: vec![("routes.toml", file)],
        config: toml::toml! {
            [policy]
            routes = "routes.toml"
        },
        ..Options::default()
    })
    .await
}

/// A JSON route added by an edit (`api = "json"`): strict JSON, `model`
/// against the allowlist when the body has one, forwarded as judged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_json_route_is_an_edit_of_the_routes_file() {
    let file = format!(
        "{}[[routes]]\npath = \"/v1/tokenize\"\nmethods = [\"POST\"]\napi = \"json\"\n",
        routes_file(false)
    );
    let gw = with_routes(file).await;
    let acme = gw.keys.token("acme");
    let r = gw
        .send(
            &post("/v1/tokenize", &json!({"text": "hello", "stream": true}))
                .bearer(&acme)
                .build(),
        )
        .await;
    let rec = gw
        .router()
        .requests()
        .pop()
        .expect("the JSON route was forwarded");
    assert_eq!(rec.path, "/v1/tokenize");
    assert_eq!(rec.header("x-tenant-id"), Some("acme"));
    assert!(
        rec.header("x-tenant-model").is_none(),
        "no model, no model header"
    );
    let sent: serde_json::Value = serde_json::from_slice(&rec.body).unwrap();
    assert_eq!(
        sent,
        json!({"text": "hello", "stream": true}),
        "forwarded as judged"
    );
    assert_eq!(r.code(), "not_found", "the mock router's own answer");
    let r = gw
        .send(
            &post("/v1/tokenize", &json!({"model": "m-small", "text": "x"}))
                .bearer(&acme)
                .build(),
        )
        .await;
    assert_eq!(
        gw.router()
            .requests()
            .pop()
            .unwrap()
            .header("x-tenant-model"),
        Some("m-small")
    );
    assert_eq!(r.code(), "not_found");
    let routed = gw.router_count();
    let r = gw
        .send(
            &post("/v1/tokenize", &json!({"model": "m-large", "text": "x"}))
                .bearer(&acme)
                .build(),
        )
        .await;
    assert_eq!((r.status, r.code()), (403, "model_not_allowed".to_string()));
    let r = gw
        .send(
            &post_raw("/v1/tokenize", br#"{"a": 1, "a": 2}"#.to_vec())
                .bearer(&acme)
                .build(),
        )
        .await;
    assert_eq!((r.status, r.code()), (400, "invalid_json".to_string()));
    assert_eq!(
        gw.router_count(),
        routed,
        "a rejected request reached the router"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_routes_file_adds_a_route_with_an_edit_and_reloads() {
    let gw = with_routes(routes_file(true)).await;
    let acme = gw.keys.token("acme");
    let r = gw
        .send(&post("/v1/chat/alt", &chat_body()).bearer(&acme).build())
        .await;
    // Judged and forwarded under its own path: the mock router does not
    // know it, so its own 404 comes back.
    let rec = gw
        .router()
        .requests()
        .pop()
        .expect("the route was forwarded");
    assert_eq!(rec.path, "/v1/chat/alt");
    assert_eq!(rec.header("x-tenant-id"), Some("acme"));
    assert_eq!((r.status, r.code()), (404, "not_found".to_string()));
    assert_eq!(
        metric(
            &gw,
            r#"portcullis_requests_total{route="chat_alt",status="404",tenant="acme"} "#
        )
        .await,
        1
    );
    // The route's own body cap, and its schema; a route the file does not
    // list is gone. None of these reaches the router.
    let forwarded = gw.router_count();
    let big =
        json!({"model": "m-small", "messages": [{"role": "user", "content": "x".repeat(400)}]});
    let r = gw
        .send(&post("/v1/chat/alt", &big).bearer(&acme).build())
        .await;
    assert_eq!((r.status, r.code()), (413, "body_too_large".to_string()));
    let r = gw
        .send(
            &post("/v1/chat/alt", &json!({"model": "m-small"}))
                .bearer(&acme)
                .build(),
        )
        .await;
    assert_eq!((r.status, r.code()), (400, "schema_violation".to_string()));
    let r = gw
        .send(
            &post("/v1/embeddings", &json!({"model": "m-small", "input": "x"}))
                .bearer(&acme)
                .build(),
        )
        .await;
    assert_eq!((r.status, r.code()), (404, "route_not_found".to_string()));
    assert_eq!(
        gw.router_count(),
        forwarded,
        "a rejected request reached the router"
    );

    // Removing the route is an edit, applied within a second.
    let file = gw.dir.path().join("routes.toml");
    replace_file(&file, &routes_file(false));
    let changed = Instant::now();
    loop {
        let r = gw
            .send(&post("/v1/chat/alt", &chat_body()).bearer(&acme).build())
            .await;
        if r.code() == "route_not_found" {
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(1),
            "the edit took over 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // (Until then the route still forwarded.) A broken file changes nothing.
    let routed = gw.router_count();
    replace_file(
        &file,
        &routes_file(true).replace("openai.chat", "openai.nope"),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&gw, "portcullis_config_reloads_total{result=\"error\"} ").await == 0 {
        assert!(Instant::now() < deadline, "the broken file was not refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = gw
        .send(&post("/v1/chat/alt", &chat_body()).bearer(&acme).build())
        .await;
    assert_eq!(r.code(), "route_not_found", "the refused file was applied");
    let r = gw
        .send(
            &post("/v1/chat/completions", &chat_body())
                .bearer(&acme)
                .build(),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        gw.router_count(),
        routed + 1,
        "a refused request reached the router"
    );
}
