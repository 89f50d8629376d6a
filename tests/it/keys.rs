//! API keys as objects (`[[tenants.keys]]`): a signed `x-tenant-key-id`
//! for the router, the id in the access log, expiry, the off switch and a
//! narrower allowlist, each refusal with the router untouched.

use std::time::Duration;

use crate::common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_object_names_itself_to_the_router_and_the_log() {
    let gw = Gateway::start_with(Options {
        capture_logs: true,
        ..Options::default()
    })
    .await;
    let r = gw
        .send(
            &post("/v1/chat/completions", &chat_body())
                .header("x-api-key", &gw.keys.ci_key)
                .build(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let seen = &gw.router().requests()[0];
    assert_eq!(seen.header("x-tenant-id"), Some("omni2"));
    assert_eq!(seen.header("x-tenant-key-id"), Some("ci-bot"));
    let names = [
        "x-request-id",
        "x-tenant-id",
        "x-tenant-key-id",
        "x-tenant-limits",
        "x-tenant-model",
        "x-tenant-org",
        "x-tenant-plan",
    ];
    verify_signature(
        &gw.keys.context_key,
        "POST",
        "/v1/chat/completions",
        seen,
        &names,
    );
    // A listed key (api_keys) still works and names no key, whatever
    // x-tenant-key-id the client sends.
    for spoof in [true, false] {
        let mut req =
            post("/v1/chat/completions", &chat_body()).header("x-api-key", &gw.keys.omni_key);
        if spoof {
            req = req.header("x-tenant-key-id", "ci-bot");
        }
        let before = gw.router_count();
        assert_eq!(gw.send(&req.build()).await.status, 200);
        let seen = &gw.router().requests()[before];
        assert!(seen.header_values("x-tenant-key-id").is_empty());
    }

    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let key_ids = loop {
        let log = std::fs::read_to_string(gw.dir.path().join("gateway.log")).unwrap();
        let ids: Vec<Value> = log
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "access")
            .map(|v| v["key_id"].clone())
            .collect();
        if ids.len() >= 3 || std::time::Instant::now() > deadline {
            break ids;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let log = std::fs::read_to_string(gw.dir.path().join("gateway.log")).unwrap();
    assert_eq!(
        key_ids,
        [json!("ci-bot"), Value::Null, Value::Null],
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_disabled_and_narrowed_keys_are_refused_before_the_router() {
    let gw = Gateway::start().await;
    let (ci, old, off) = (
        gw.keys.ci_key.clone(),
        gw.keys.expired_key.clone(),
        gw.keys.disabled_key.clone(),
    );
    for (key, word) in [(&old, "expired"), (&off, "disabled")] {
        let r = gw
            .send(
                &post("/v1/chat/completions", &chat_body())
                    .header("x-api-key", key)
                    .build(),
            )
            .await;
        assert_rejected(&gw, &r, 401, "invalid_api_key");
        let message = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains(word), "{message}");
    }
    // The tenant allows whisper-1; this key does not.
    let body = json!({"model": "whisper-1", "messages": [{"role": "user", "content": "x"}]});
    let r = gw
        .send(
            &post("/v1/chat/completions", &body)
                .header("x-api-key", &ci)
                .build(),
        )
        .await;
    assert_rejected(&gw, &r, 403, "model_not_allowed");
    let r = gw
        .send(&get("/v1/models").header("x-api-key", &ci).build())
        .await;
    let listed: Vec<Value> = r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].clone())
        .collect();
    assert_eq!(
        listed,
        [json!("m-small")],
        "the key's list, not the tenant's"
    );
    let r = gw
        .send(&get("/v1/models/whisper-1").header("x-api-key", &ci).build())
        .await;
    assert_eq!((r.status, r.code()), (404, "model_not_found".into()));
}
