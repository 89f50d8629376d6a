//! The gateway core end to end: identity, header policy, forwarding, errors.
//! Every rejection also proves that the router received nothing.

use std::time::Duration;

use crate::common::*;
use jsonwebtoken::Algorithm;
use portcullis::mock_router::MockOptions;
use serde_json::json;
use tokio::io::AsyncWriteExt;

const CHAT: &str = "/v1/chat/completions";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_jwt_forwards_exactly_the_trusted_context() {
    let gw = Gateway::start().await;
    let token = gw.keys.token("acme");
    let body = chat_body();
    let r = gw.send(&post(CHAT, &body).bearer(&token).build()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["object"], "chat.completion");

    let seen = gw.router().requests();
    assert_eq!(seen.len(), 1);
    let rec = &seen[0];
    assert_eq!((rec.method.as_str(), rec.path.as_str()), ("POST", CHAT));
    // The validated document, serialised once, with the plan's output cap.
    let mut expected = body.clone();
    expected["max_tokens"] = json!(1024);
    assert_eq!(rec.body, serde_json::to_vec(&expected).unwrap());
    assert_eq!(
        rec.header("content-length"),
        Some(rec.body.len().to_string().as_str())
    );
    assert_eq!(rec.header("x-tenant-model"), Some("m-small"));
    assert_eq!(rec.header("x-tenant-id"), Some("acme"));
    assert_eq!(rec.header("x-tenant-org"), Some("acme-corp"));
    assert_eq!(rec.header("x-tenant-plan"), Some("basic"));
    assert_eq!(
        rec.header("x-tenant-limits"),
        Some("rps=1000;burst=1000;tpm=500000;tpd=10000000;conc=100;body=65536;prompt=4096;output=1024")
    );
    assert_eq!(rec.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(rec.header("x-forwarded-proto"), Some("http"));
    let rid = rec.header("x-request-id").expect("request id");
    assert_eq!(
        r.header("x-request-id"),
        Some(rid),
        "client sees the same request id"
    );
    assert!(
        rec.header_values("authorization").is_empty(),
        "credential never forwarded"
    );
    verify_signature(&gw.keys.context_key, "POST", CHAT, rec, &CONTEXT_HEADERS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_algorithm_verifies_with_its_pinned_key() {
    let gw = Gateway::start().await;
    let claims = gw.keys.claims("globex");
    for (alg, kid) in [
        (Algorithm::RS256, "rsa-1"),
        (Algorithm::ES256, "ec-1"),
        (Algorithm::EdDSA, "ed-1"),
        (Algorithm::HS256, "hs-1"),
    ] {
        let token = gw.keys.sign(alg, Some(kid), &claims);
        let r = gw
            .send(&post(CHAT, &chat_body()).bearer(&token).build())
            .await;
        assert_eq!(
            r.status,
            200,
            "{alg:?}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    assert_eq!(gw.router_count(), 4);
    assert!(gw
        .router()
        .requests()
        .iter()
        .all(|r| r.header("x-tenant-id") == Some("globex")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_work_as_bearer_and_as_x_api_key_and_are_stripped() {
    let gw = Gateway::start().await;
    let key = gw.keys.acme_key.clone();
    let r = gw
        .send(&post(CHAT, &chat_body()).bearer(&key).build())
        .await;
    assert_eq!(r.status, 200);
    let r = gw
        .send(&post(CHAT, &chat_body()).header("x-api-key", &key).build())
        .await;
    assert_eq!(r.status, 200);
    let seen = gw.router().requests();
    assert_eq!(seen.len(), 2);
    for rec in &seen {
        assert_eq!(rec.header("x-tenant-id"), Some("acme"));
        assert!(rec.header_values("x-api-key").is_empty());
        assert!(rec.header_values("authorization").is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_invalid_tokens_are_refused() {
    let gw = Gateway::start().await;
    let k = &gw.keys;
    let claims = k.claims("acme");
    let b64 = |v: serde_json::Value| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let valid = k.token("acme");
    let (h, rest) = valid.split_once('.').unwrap();
    let payload = rest.split_once('.').unwrap().0;

    let mut expired = claims.clone();
    expired["exp"] = json!(now() - 120);
    let mut future = claims.clone();
    future["nbf"] = json!(now() + 600);
    let mut wrong_iss = claims.clone();
    wrong_iss["iss"] = json!("https://evil.test");
    let mut wrong_aud = claims.clone();
    wrong_aud["aud"] = json!("someone-else");
    let mut no_exp = claims.clone();
    no_exp.as_object_mut().unwrap().remove("exp");
    let mut no_tenant = claims.clone();
    no_tenant.as_object_mut().unwrap().remove("tenant");
    let mut huge = claims.clone();
    huge["pad"] = json!("x".repeat(9000));

    let cases: Vec<(&str, String)> = vec![
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(json!({"alg": "none", "typ": "JWT"})),
                b64(claims.clone())
            ),
        ),
        (
            "HS256 keyed with the RSA public key, kid of the RSA key",
            forge_hs256(
                &json!({"alg": "HS256", "kid": "rsa-1"}),
                &claims,
                &k.rsa_public_pem,
            ),
        ),
        (
            "HS256 keyed with the RSA public key, no kid",
            forge_hs256(&json!({"alg": "HS256"}), &claims, &k.rsa_public_pem),
        ),
        (
            "unknown kid",
            k.sign(Algorithm::RS256, Some("nope"), &claims),
        ),
        (
            "kid with a path",
            k.sign(Algorithm::RS256, Some("../../../dev/null"), &claims),
        ),
        ("expired", k.sign(Algorithm::RS256, Some("rsa-1"), &expired)),
        (
            "nbf in the future",
            k.sign(Algorithm::RS256, Some("rsa-1"), &future),
        ),
        (
            "wrong iss",
            k.sign(Algorithm::RS256, Some("rsa-1"), &wrong_iss),
        ),
        (
            "wrong aud",
            k.sign(Algorithm::RS256, Some("rsa-1"), &wrong_aud),
        ),
        ("no exp", k.sign(Algorithm::RS256, Some("rsa-1"), &no_exp)),
        (
            "no tenant claim",
            k.sign(Algorithm::RS256, Some("rsa-1"), &no_tenant),
        ),
        ("stripped signature", format!("{h}.{payload}.")),
        (
            "oversized token",
            k.sign(Algorithm::RS256, Some("rsa-1"), &huge),
        ),
        (
            "ES256 token under the RSA kid",
            k.sign(Algorithm::ES256, Some("rsa-1"), &claims),
        ),
    ];
    for (name, token) in cases {
        let r = gw
            .send(&post(CHAT, &chat_body()).bearer(&token).build())
            .await;
        assert_rejected(&gw, &r, 401, "invalid_token");
        let body = String::from_utf8_lossy(&r.body);
        assert!(
            !body.contains(&token[..20]),
            "{name}: the error echoes the token"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jku_and_embedded_jwk_headers_are_never_used() {
    let gw = Gateway::start().await;
    let claims = gw.keys.claims("acme");
    // A listener the token points at: the gateway must never connect to it.
    let trap = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    trap.set_nonblocking(true).unwrap();
    let jku = format!("http://{}/jwks.json", trap.local_addr().unwrap());
    let attacker_secret = b"attacker-chosen-secret-0123456789";
    use base64::Engine;
    let k = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(attacker_secret);
    let tokens = [
        forge_hs256(
            &json!({"alg": "HS256", "kid": "evil", "jku": jku}),
            &claims,
            attacker_secret,
        ),
        forge_hs256(
            &json!({"alg": "HS256", "jku": jku}),
            &claims,
            attacker_secret,
        ),
        forge_hs256(
            &json!({"alg": "HS256", "jwk": {"kty": "oct", "k": k}}),
            &claims,
            attacker_secret,
        ),
        forge_hs256(
            &json!({"alg": "HS256", "kid": "hs-1", "jwk": {"kty": "oct", "k": k, "kid": "hs-1"}}),
            &claims,
            attacker_secret,
        ),
    ];
    for token in tokens {
        let r = gw
            .send(&post(CHAT, &chat_body()).bearer(&token).build())
            .await;
        assert_rejected(&gw, &r, 401, "invalid_token");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        trap.accept().is_err(),
        "the gateway connected to the jku URL"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_status_and_bindings_come_from_config() {
    let gw = Gateway::start().await;
    let k = &gw.keys;
    let r = gw
        .send(&post(CHAT, &chat_body()).bearer(&k.token("nobody")).build())
        .await;
    assert_rejected(&gw, &r, 401, "unknown_tenant");
    let r = gw
        .send(&post(CHAT, &chat_body()).bearer(&k.token("initech")).build())
        .await;
    assert_rejected(&gw, &r, 403, "tenant_suspended");
    let r = gw
        .send(
            &post(CHAT, &chat_body())
                .bearer("pcl_0000000000000000000000000000000000000000")
                .build(),
        )
        .await;
    assert_rejected(&gw, &r, 401, "invalid_api_key");
    // `bound` accepts only JWTs whose sub is svc-1.
    let r = gw
        .send(&post(CHAT, &chat_body()).bearer(&k.token("bound")).build())
        .await;
    assert_rejected(&gw, &r, 401, "invalid_token");
    let mut claims = k.claims("bound");
    claims["sub"] = json!("svc-1");
    let ok = k.sign(Algorithm::RS256, Some("rsa-1"), &claims);
    let r = gw.send(&post(CHAT, &chat_body()).bearer(&ok).build()).await;
    assert_eq!(r.status, 200);
    // Claims cannot raise a plan: plan, org and limits come from tenants.toml.
    let mut claims = k.claims("acme");
    claims["plan"] = json!("gold");
    claims["org"] = json!("evil-org");
    let t = k.sign(Algorithm::RS256, Some("rsa-1"), &claims);
    let r = gw
        .send(&post("/v1/completions", &chat_body()).bearer(&t).build())
        .await;
    assert_eq!((r.status, r.code()), (403, "route_not_allowed".to_string()));
    let r = gw.send(&post(CHAT, &chat_body()).bearer(&t).build()).await;
    assert_eq!(r.status, 200);
    let last = gw.router().requests().pop().unwrap();
    assert_eq!(last.header("x-tenant-plan"), Some("basic"));
    assert_eq!(last.header("x-tenant-org"), Some("acme-corp"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_identity_headers_never_reach_the_router() {
    let gw = Gateway::start().await;
    let token = gw.keys.token("acme");
    let r = gw
        .send(
            &post(CHAT, &chat_body())
                .bearer(&token)
                .header("x-tenant-id", "globex")
                .header("X-Tenant-Plan", "gold")
                .header("X-TENANT-ORG", "globex-inc")
                .header("x-tenant-admin", "true")
                .header("x-tenant-signature", "t=1,h=x,v1=00")
                .header("X-Forwarded-For", "10.9.8.7")
                .header("x-forwarded-proto", "https")
                .header("x-forwarded-host", "evil.test")
                .header("Forwarded", "for=10.9.8.7")
                .header("x-request-id", "client-chosen")
                // Nominating a header as hop-by-hop must not strip the gateway's own.
                .header("Connection", "x-tenant-id, x-tenant-signature")
                .build(),
        )
        .await;
    assert_eq!(r.status, 200);
    let rec = &gw.router().requests()[0];
    assert_eq!(rec.header_values("x-tenant-id"), ["acme"]);
    assert_eq!(rec.header_values("x-tenant-plan"), ["basic"]);
    assert_eq!(rec.header_values("x-tenant-org"), ["acme-corp"]);
    assert!(rec.header_values("x-tenant-admin").is_empty());
    assert_eq!(rec.header_values("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(rec.header_values("x-forwarded-proto"), ["http"]);
    assert!(rec.header_values("x-forwarded-host").is_empty());
    assert!(rec.header_values("forwarded").is_empty());
    assert_ne!(rec.header("x-request-id"), Some("client-chosen"));
    verify_signature(&gw.keys.context_key, "POST", CHAT, rec, &CONTEXT_HEADERS);

    for name in [
        "x_tenant_id",
        "X_Tenant_Plan",
        "x-tenant_org",
        "x_forwarded_for",
        "x_api_key",
    ] {
        let r = gw
            .send(
                &post(CHAT, &chat_body())
                    .bearer(&token)
                    .header(name, "spoof")
                    .build(),
            )
            .await;
        assert_eq!(r.status, 400, "{name}");
        assert_eq!(r.code(), "invalid_request", "{name}");
    }
    assert_eq!(gw.router_count(), 1, "underscore spoofs reached the router");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_listed_by_the_gateway() {
    let gw = Gateway::start().await;
    let r = gw
        .send(&get("/v1/models").bearer(&gw.keys.token("globex")).build())
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["m-small", "m-large"],
        "wildcard patterns are not models"
    );
    let r = gw
        .send(
            &get("/v1/models")
                .header("x-api-key", &gw.keys.acme_key.clone())
                .build(),
        )
        .await;
    let ids: Vec<String> = r.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["m-small"]);
    assert_eq!(gw.router_count(), 0, "the router is never asked for models");
}

/// `GET /v1/models/{id}` (the OpenAI SDK's `models.retrieve`) is answered
/// by the gateway: a model the tenant may use, wildcard entries included,
/// is 200 with OpenAI's model object; any other is 404 `model_not_found`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_model_is_looked_up_by_the_gateway() {
    let gw = Gateway::start().await;
    let globex = gw.keys.token("globex"); // m-small, m-large, m-exp-*
    for id in ["m-small", "m-exp-7"] {
        let r = gw
            .send(&get(&format!("/v1/models/{id}")).bearer(&globex).build())
            .await;
        assert_eq!(r.status, 200, "{id}: {}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        assert_eq!(
            (v["id"].as_str(), v["object"].as_str()),
            (Some(id), Some("model"))
        );
        assert!(r.header("x-ratelimit-remaining-requests").is_some());
    }
    let acme = gw.keys.token("acme"); // m-small only
    let r = gw
        .send(&get("/v1/models/m-large").bearer(&acme).build())
        .await;
    assert_rejected(&gw, &r, 404, "model_not_found");
    assert_eq!(r.json()["error"]["param"], "model");
    let r = gw.send(&get("/v1/models/m-small").build()).await;
    assert_rejected(&gw, &r, 401, "missing_credentials");
    let r = gw
        .send(
            &post("/v1/models/m-small", &chat_body())
                .bearer(&acme)
                .build(),
        )
        .await;
    assert_rejected(&gw, &r, 405, "method_not_allowed");
    assert_eq!(r.header("allow"), Some("GET"));
    let r = gw
        .send(&get("/v1/models/m-small/x").bearer(&acme).build())
        .await;
    assert_rejected(&gw, &r, 404, "route_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_methods_regions_and_features_are_enforced_in_order() {
    let gw = Gateway::start().await;
    let acme = gw.keys.token("acme");
    // Unauthenticated: 401 whatever the path, `/` included.
    for path in [CHAT, "/admin", "/v2/anything", "/"] {
        let r = gw.send(&post(path, &chat_body()).build()).await;
        assert_rejected(&gw, &r, 401, "missing_credentials");
    }
    let r = gw.send(&get("/").build()).await;
    assert_rejected(&gw, &r, 401, "missing_credentials");
    // Authenticated on an unknown path (`/` is one): 404.
    for path in ["/v1/nothing", "/"] {
        let r = gw
            .send(&post(path, &chat_body()).bearer(&acme).build())
            .await;
        assert_rejected(&gw, &r, 404, "route_not_found");
    }
    let r = gw.send(&get("/").bearer(&acme).build()).await;
    assert_rejected(&gw, &r, 404, "route_not_found");
    let r = gw.send(&get(CHAT).bearer(&acme).build()).await;
    assert_rejected(&gw, &r, 405, "method_not_allowed");
    assert_eq!(r.header("allow"), Some("POST"));
    let r = gw
        .send(&post("/v1/completions", &chat_body()).bearer(&acme).build())
        .await;
    assert_rejected(&gw, &r, 403, "route_not_allowed");
    let r = gw
        .send(
            &post(CHAT, &chat_body())
                .bearer(&gw.keys.token("euro"))
                .build(),
        )
        .await;
    assert_rejected(&gw, &r, 403, "region_not_allowed");
    // Ambiguous credentials.
    let r = gw
        .send(
            &post(CHAT, &chat_body())
                .bearer(&acme)
                .header("x-api-key", "pcl_x")
                .build(),
        )
        .await;
    assert_rejected(&gw, &r, 400, "invalid_request");
    let r = gw
        .send(
            &post(CHAT, &chat_body())
                .bearer(&acme)
                .header("Authorization", "Bearer other")
                .build(),
        )
        .await;
    assert_rejected(&gw, &r, 400, "invalid_request");
    // Token only from the Authorization header, never the query string.
    let r = gw
        .send(&post(&format!("{CHAT}?access_token={acme}"), &chat_body()).build())
        .await;
    assert_rejected(&gw, &r, 401, "missing_credentials");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_is_refused_before_the_router() {
    let gw = Gateway::start().await;
    let acme = gw.keys.token("acme");
    let body = chat_body().to_string();
    let head = post(CHAT, &chat_body())
        .bearer(&acme)
        .build_raw_head(&format!(
            "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
            body.len()
        ));
    let mut raw = head;
    raw.extend_from_slice(format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len()).as_bytes());
    let r = gw.send(&raw).await;
    assert_eq!(r.status, 400);
    let head = post(CHAT, &chat_body())
        .bearer(&acme)
        .build_raw_head(&format!(
            "Content-Length: {0}\r\nContent-Length: {0}\r\n",
            body.len()
        ));
    let mut raw = head;
    raw.extend_from_slice(body.as_bytes());
    let r = gw.send(&raw).await;
    assert_eq!(r.status, 400);
    assert_eq!(gw.router_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_down_is_502_upstream_unavailable() {
    let gw = Gateway::start_with(Options {
        router: RouterMode::Down,
        ..Options::default()
    })
    .await;
    let r = gw
        .send(
            &post(CHAT, &chat_body())
                .bearer(&gw.keys.token("acme"))
                .build(),
        )
        .await;
    assert_eq!(r.status, 502);
    assert_eq!(r.code(), "upstream_unavailable");
    let body = String::from_utf8_lossy(&r.body);
    assert!(
        !body.contains(&gw.router_addr.to_string()),
        "error leaks the router address"
    );
    assert!(
        !body.contains("127.0.0.1"),
        "error leaks an internal address"
    );
}

/// A pooled connection the router dropped fails before any answer; the
/// request goes again on a new connection, as in Pingora's own proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_router_dropped_is_retried_on_a_new_one() {
    let gw = Gateway::start_with(Options {
        router: RouterMode::Up(MockOptions {
            drop_reused: true,
            ..MockOptions::default()
        }),
        ..Options::default()
    })
    .await;
    let token = gw.keys.token("acme");
    for i in 0..3 {
        let r = gw
            .send(&post(CHAT, &chat_body()).bearer(&token).build())
            .await;
        assert_eq!(
            r.status,
            200,
            "request {i}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    // Requests 2 and 3 each met a reused connection that the router closed
    // unanswered, then succeeded on a new one: 3 connections, 5 requests seen.
    assert_eq!(gw.router().connections(), 3);
    assert_eq!(gw.router_count(), 5);
}

/// A router that writes on a connection after its answer ended (a late
/// duplicate, a desynchronised backend) must not have those bytes read as
/// the next request's answer, which could be another tenant's: the idle
/// connection is closed and the next request goes on a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_a_router_sends_on_an_idle_connection_are_never_an_answer() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let router = listener.local_addr().unwrap();
    let requests = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = requests.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while read_request(&mut conn, &mut buf).await {
                    let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let body = format!(
                        r#"{{"id":"answer-{n}","object":"chat.completion","choices":[],"usage":{{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}}}"#
                    );
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if conn.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                    if n == 0 {
                        // After the first answer, a second nobody asked for.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        let stray = r#"{"id":"smuggled","object":"chat.completion","choices":[]}"#;
                        let stray = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{stray}",
                            stray.len()
                        );
                        let _ = conn.write_all(stray.as_bytes()).await;
                    }
                }
            });
        }
    });
    let gw = Gateway::start_with(Options {
        router: RouterMode::Down,
        config: set(toml::Table::new(), "upstream.address", router.to_string()),
        ..Options::default()
    })
    .await;
    let token = gw.keys.token("acme");
    let first = gw
        .send(&post(CHAT, &chat_body()).bearer(&token).build())
        .await;
    assert_eq!(
        first.status,
        200,
        "{}",
        String::from_utf8_lossy(&first.body)
    );
    assert_eq!(first.json()["id"], "answer-0");
    // The stray answer has arrived while the connection sat in the pool.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = gw
        .send(&post(CHAT, &chat_body()).bearer(&token).build())
        .await;
    assert_eq!(
        second.status,
        200,
        "{}",
        String::from_utf8_lossy(&second.body)
    );
    assert_eq!(
        second.json()["id"],
        "answer-1",
        "the second request got the router's stray bytes as its answer"
    );
    assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 2);
}

/// Router connections are kept per worker and reused, but not past
/// `[upstream] idle_timeout_ms`, and not at all with
/// `max_idle_connections = 0`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_connections_are_reused_until_their_idle_timeout() {
    let gw = Gateway::start_with(Options {
        config: set(toml::Table::new(), "upstream.idle_timeout_ms", 400),
        ..Options::default()
    })
    .await;
    let token = gw.keys.token("acme");
    let chat = || post(CHAT, &chat_body()).bearer(&token).build();
    for _ in 0..3 {
        assert_eq!(gw.send(&chat()).await.status, 200);
    }
    assert_eq!(gw.router().connections(), 1, "back to back: one connection");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(gw.send(&chat()).await.status, 200);
    assert_eq!(
        gw.router().connections(),
        2,
        "idle past the timeout: a new connection"
    );

    let unpooled = Gateway::start_with(Options {
        config: set(toml::Table::new(), "upstream.max_idle_connections", 0),
        ..Options::default()
    })
    .await;
    let token = unpooled.keys.token("acme");
    for _ in 0..3 {
        let r = unpooled
            .send(&post(CHAT, &chat_body()).bearer(&token).build())
            .await;
        assert_eq!(r.status, 200);
    }
    assert_eq!(unpooled.router().connections(), 3);
}

/// A client that leaves while the router works frees its place at once:
/// the gateway stops waiting for an answer nobody will read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_before_the_answer_frees_its_slot_at_once() {
    let gw = Gateway::start_with(Options {
        router: RouterMode::Up(MockOptions {
            delay: Duration::from_secs(3),
            ..MockOptions::default()
        }),
        ..Options::default()
    })
    .await;
    // solo: one request at a time.
    let token = gw.keys.token("solo");
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(&post(CHAT, &chat_body()).bearer(&token).build())
        .await
        .unwrap();
    while gw.router_count() == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Had the first request kept its slot until the router answered (3 s),
    // this one would be refused with concurrency_limit_exceeded.
    let r = gw
        .send(&post(CHAT, &chat_body()).bearer(&token).build())
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

/// Hop-by-hop headers describe the client's connection, not the request:
/// none reaches the router, nor does a header `Connection` nominates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_and_nominated_headers_stop_at_the_gateway() {
    let gw = Gateway::start().await;
    let r = gw
        .send(
            &post(CHAT, &chat_body())
                .bearer(&gw.keys.token("acme"))
                .header("connection", "x-debug-trace")
                .header("x-debug-trace", "1")
                .header("keep-alive", "timeout=5")
                .header("te", "trailers")
                .header("transfer_encoding", "chunked")
                .header("x-kept", "yes")
                .build(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let rec = gw.router().requests().pop().unwrap();
    for gone in [
        "x-debug-trace",
        "keep-alive",
        "te",
        "connection",
        "transfer_encoding",
    ] {
        assert!(
            rec.header_values(gone).is_empty(),
            "{gone} reached the router"
        );
    }
    assert_eq!(rec.header("x-kept"), Some("yes"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_slow_is_504_upstream_timeout() {
    let gw = Gateway::start_with(Options {
        router: RouterMode::Up(MockOptions {
            delay: Duration::from_secs(3),
            ..MockOptions::default()
        }),
        read_timeout_ms: 300,
        ..Options::default()
    })
    .await;
    let r = gw
        .send(
            &post(CHAT, &chat_body())
                .bearer(&gw.keys.token("acme"))
                .build(),
        )
        .await;
    assert_eq!(r.status, 504);
    assert_eq!(r.code(), "upstream_timeout");
    assert_eq!(r.header("content-type"), Some("application/json"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_and_rejections_by_reason() {
    let gw = Gateway::start().await;
    let scrape = || async {
        let m = send(gw.admin, &get("/metrics").build()).await.unwrap();
        String::from_utf8_lossy(&m.body).to_string()
    };
    let value = |text: &str, series: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let ok = r#"portcullis_requests_total{route="chat_completions",status="200",tenant="acme"} "#;
    let suspended = r#"portcullis_rejections_total{code="tenant_suspended",tenant="initech"} "#;
    let anonymous = r#"portcullis_rejections_total{code="missing_credentials",tenant="-"} "#;
    let overhead = r#"portcullis_gateway_duration_seconds_count{route="chat_completions"} "#;
    let upstream = r#"portcullis_upstream_duration_seconds_count{route="chat_completions"} "#;
    let before = scrape().await;
    for series in [ok, suspended, anonymous, overhead, upstream] {
        assert_eq!(value(&before, series), 0, "{series} before any traffic");
    }
    gw.send(
        &post(CHAT, &chat_body())
            .bearer(&gw.keys.token("acme"))
            .build(),
    )
    .await;
    gw.send(
        &post(CHAT, &chat_body())
            .bearer(&gw.keys.token("acme"))
            .build(),
    )
    .await;
    gw.send(
        &post(CHAT, &chat_body())
            .bearer(&gw.keys.token("initech"))
            .build(),
    )
    .await;
    gw.send(&post(CHAT, &chat_body()).build()).await;
    let after = scrape().await;
    assert_eq!(value(&after, ok), 2);
    assert_eq!(value(&after, suspended), 1);
    assert_eq!(value(&after, anonymous), 1);
    assert_eq!(value(&after, overhead), 2);
    assert_eq!(value(&after, upstream), 2);
    assert!(after.contains(
        r#"portcullis_tokens_total{kind="completion",model="m-small",tenant="acme"} 12"#
    ));
    assert!(after.contains("portcullis_config_generation 1"));
    let ready = send(gw.admin, &get("/readyz").build()).await.unwrap();
    assert_eq!(ready.status, 200);
}

/// The router's answer reaches the client whole: its reason phrase, every
/// value of a repeated header in order, and its own headers beside the
/// gateway's, whose rate-limit headers replace any the router set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_routers_answer_head_reaches_the_client_whole() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let router = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                // One request, then close.
                if !read_request(&mut conn, &mut Vec::new()).await {
                    return;
                }
                let body = r#"{"id":"a","object":"chat.completion","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
                let answer = format!(
                    "HTTP/1.1 200 Fine Thanks\r\nContent-Type: application/json\r\n\
                     Set-Cookie: a=1\r\nX-Router-Trace: t-1\r\nSet-Cookie: b=2\r\n\
                     X-RateLimit-Limit-Requests: 999999\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
            });
        }
    });
    let gw = Gateway::start_with(Options {
        router: RouterMode::Down,
        config: set(toml::Table::new(), "upstream.address", router.to_string()),
        ..Options::default()
    })
    .await;
    let token = gw.keys.token("acme");
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    conn.write_all(&post(CHAT, &chat_body()).bearer(&token).build())
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(15), async {
        use tokio::io::AsyncReadExt;
        conn.read_to_end(&mut raw).await
    })
    .await
    .expect("an answer in 15 s")
    .unwrap();
    assert!(
        raw.starts_with(b"HTTP/1.1 200 Fine Thanks\r\n"),
        "{}",
        String::from_utf8_lossy(&raw)
    );
    let r = parse_response(&raw).unwrap();
    assert_eq!(r.json()["id"], "a");
    let values = |name: &str| -> Vec<&str> {
        r.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    };
    assert_eq!(values("set-cookie"), ["a=1", "b=2"]);
    assert_eq!(values("x-router-trace"), ["t-1"]);
    assert_eq!(values("x-request-id").len(), 1);
    let limit = values("x-ratelimit-limit-requests");
    assert_eq!(limit.len(), 1, "one rate-limit header, the gateway's");
    assert_ne!(
        limit[0], "999999",
        "the router's rate-limit header went through"
    );
    assert!(limit[0].parse::<u64>().is_ok());
    assert_eq!(values("x-ratelimit-remaining-tokens").len(), 1);
}
