//! The access log: one JSON line per request with the documented fields,
//! and never a prompt, a key or a token.

use std::time::Duration;

use crate::common::*;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_line_per_request_and_no_secrets() {
    let gw = Gateway::start_with(Options {
        capture_logs: true,
        ..Options::default()
    })
    .await;
    let token = gw.keys.token("acme");
    let key = gw.keys.acme_key.clone();
    let marker = "PROMPT-MARKER-7f3a9c";
    let body = json!({"model": "m-small", "messages": [{"role": "user", "content": marker}]});
    let forged = forge_hs256(&json!({"alg": "HS256"}), &gw.keys.claims("acme"), b"guess");
    let sent = [
        gw.send(&post("/v1/chat/completions", &body).bearer(&token).build())
            .await,
        gw.send(
            &post("/v1/chat/completions", &body)
                .header("x-api-key", &key)
                .build(),
        )
        .await,
        gw.send(&post("/v1/chat/completions", &body).bearer(&forged).build())
            .await,
        gw.send(
            &post("/v1/chat/completions", &body)
                .bearer("pcl_wrong_key_9d2e")
                .build(),
        )
        .await,
    ];
    assert_eq!(
        sent.iter().map(|r| r.status).collect::<Vec<_>>(),
        [200, 200, 401, 401]
    );
    // Lines reach the file through a non-blocking writer: wait for them
    // (a loaded machine can take longer than a fixed pause).
    let read = || {
        let log = std::fs::read_to_string(gw.dir.path().join("gateway.log")).unwrap();
        let access: Vec<Value> = log
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "access")
            .collect();
        (log, access)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (mut log, mut access) = read();
    while access.len() < 4 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        (log, access) = read();
    }
    // Anything more would have arrived by now.
    tokio::time::sleep(Duration::from_millis(200)).await;
    if access.len() == 4 {
        (log, access) = read();
    }
    assert_eq!(access.len(), 4, "one access line per request:\n{log}");
    let ok = &access[0];
    assert_eq!(ok["request_id"], sent[0].header("x-request-id").unwrap());
    assert_eq!(
        (ok["tenant"].as_str(), ok["route"].as_str()),
        (Some("acme"), Some("chat_completions"))
    );
    assert_eq!(
        (ok["model"].as_str(), ok["status"].as_u64()),
        (Some("m-small"), Some(200))
    );
    assert!(ok["gateway_ms"].is_number() && ok["upstream_ms"].is_number());
    assert_eq!(
        ok["completion_tokens"], 6,
        "usage reported by the mock router"
    );
    assert!(ok["prompt_tokens"].as_u64().is_some_and(|t| t > 0));
    assert!(ok["timestamp"].is_string());
    assert_eq!(access[2]["reject_code"], "invalid_token");
    assert_eq!(access[2]["tenant"], "-");

    let context_key = hex::encode(&gw.keys.context_key);
    for secret in [
        token.as_str(),
        &token[token.len() - 20..],
        &key,
        &forged,
        "pcl_wrong_key_9d2e",
        marker,
        &context_key,
    ] {
        assert!(!log.contains(secret), "the log contains a secret: {secret}");
    }
}
