//! The policy stage end to end: embedded Rego (the shipped policy, custom
//! ones, errors and timeouts failing closed, hot reload) and an external
//! authorizer with Envoy's HTTP ext_authz semantics (allow, deny, timeout,
//! down, cache). Every denial also proves the router received nothing.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHAT: &str = "/v1/chat/completions";

fn rego_line(path: &Path) -> String {
    format!("rego = \"{}\"\nrego_timeout_ms = 20", path.display())
}

/// A gateway whose `[policy] rego` is `policy`, as `authz.rego` in its dir.
async fn with_policy(policy: &str) -> Gateway {
    Gateway::start_with(Options {
        policy_extra: rego_line(Path::new("authz.rego")),
        files: vec![("authz.rego", policy.to_string())],
        ..Options::default()
    })
    .await
}

fn chat(model: &str) -> serde_json::Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Hello"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_policy_denies_tokens_without_the_write_scope() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/authz.rego");
    let gw = Gateway::start_with(Options {
        policy_extra: rego_line(&shipped),
        ..Options::default()
    })
    .await;
    // The harness's standard token has no scope.
    let r = gw
        .send(
            &post(CHAT, &chat_body())
                .bearer(&gw.keys.token("acme"))
                .build(),
        )
        .await;
    assert_eq!((r.status, r.code()), (403, "missing_scope".to_string()));
    assert_eq!(
        r.json()["error"]["message"],
        "the token lacks the inference:write scope"
    );
    assert_eq!(gw.router_count(), 0);

    let mut claims = gw.keys.claims("acme");
    claims["scope"] = json!("inference:read inference:write");
    let scoped = gw
        .keys
        .sign(jsonwebtoken::Algorithm::RS256, Some("rsa-1"), &claims);
    let r = gw
        .send(&post(CHAT, &chat_body()).bearer(&scoped).build())
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    // An API key is not a token: the scope rule does not apply.
    let r = gw
        .send(
            &post(CHAT, &chat_body())
                .header("x-api-key", &gw.keys.acme_key)
                .build(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(gw.router_count(), 2);
}

const HEADERS_POLICY: &str = r#"package portcullis.authz
import rego.v1

result := {"deny": deny, "headers": headers}

deny contains {"code": "large_model_denied", "message": "m-large is reserved"} if {
    input.request.model == "m-large"
}

headers["x-tenant-policy-tier"] := input.tenant.plan
headers["x-tenant-policy-features"] := concat(",", input.request.features)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_headers_are_signed_and_a_denial_keeps_its_code() {
    let gw = with_policy(HEADERS_POLICY).await;
    let token = gw.keys.token("globex");
    let r = gw
        .send(
            &post(CHAT, &chat("m-small"))
                .bearer(&token)
                .header("X-Tenant-Policy-Tier", "forged")
                .build(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let recs = gw.router().requests();
    let rec = &recs[0];
    assert_eq!(rec.header("x-tenant-policy-tier"), Some("gold"));
    assert_eq!(rec.header("x-tenant-policy-features"), Some("chat"));
    assert_eq!(
        rec.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("x-tenant-policy-tier"))
            .count(),
        1,
        "the client's copy was not stripped"
    );
    let mut signed = CONTEXT_HEADERS.to_vec();
    signed.extend(["x-tenant-policy-features", "x-tenant-policy-tier"]);
    verify_signature(&gw.keys.context_key, "POST", CHAT, rec, &signed);

    let r = gw
        .send(&post(CHAT, &chat("m-large")).bearer(&token).build())
        .await;
    assert_eq!(
        (r.status, r.code()),
        (403, "large_model_denied".to_string())
    );
    assert_eq!(r.json()["error"]["message"], "m-large is reserved");
    assert_eq!(gw.router_count(), 1);
    assert_eq!(
        metric(
            &gw,
            "portcullis_rejections_total{code=\"large_model_denied\",tenant=\"globex\"} "
        )
        .await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_and_timeouts_in_a_policy_fail_closed() {
    let gw = with_policy(
        r#"package portcullis.authz
import rego.v1

r := numbers.range(1, 1000)

# A malformed result for m-large, a runaway evaluation for m-exp-slow.
result := {"deny": set(), "headers": {"x-tenant-policy-n": 1}} if input.request.model == "m-large"
result := {"deny": {x | some a in r; some b in r; some c in r; x := a + b + c; x < 0}, "headers": {}} if {
    input.request.model == "m-exp-slow"
}
result := {"deny": set(), "headers": {}} if not input.request.model in {"m-large", "m-exp-slow"}
"#,
    )
    .await;
    let token = gw.keys.token("globex");
    for model in ["m-large", "m-exp-slow"] {
        let r = gw
            .send(&post(CHAT, &chat(model)).bearer(&token).build())
            .await;
        assert_eq!(
            (r.status, r.code()),
            (403, "policy_error".to_string()),
            "{model}"
        );
    }
    let r = gw
        .send(&post(CHAT, &chat("m-small")).bearer(&token).build())
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(gw.router_count(), 1);
    assert_eq!(
        metric(&gw, "portcullis_policy_errors_total{engine=\"rego\"} ").await,
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_applies_by_hot_reload_and_a_broken_one_changes_nothing() {
    let allow_all =
        "package portcullis.authz\nimport rego.v1\nresult := {\"deny\": set(), \"headers\": {}}\n";
    let gw = with_policy(allow_all).await;
    let rego = gw.dir.path().join("authz.rego");
    let token = gw.keys.token("acme");
    let ok = |r: &Response| r.status == 200;
    assert!(ok(&gw
        .send(&post(CHAT, &chat_body()).bearer(&token).build())
        .await));

    let deny_acme = "package portcullis.authz\nimport rego.v1\nresult := {\"deny\": {{\"code\": \"acme_paused\", \"message\": \"paused\"}}, \"headers\": {}} if input.tenant.id == \"acme\"\nresult := {\"deny\": set(), \"headers\": {}} if input.tenant.id != \"acme\"\n";
    replace_file(&rego, deny_acme);
    let started = Instant::now();
    loop {
        let r = gw
            .send(&post(CHAT, &chat_body()).bearer(&token).build())
            .await;
        if r.status == 403 {
            assert_eq!(r.code(), "acme_paused");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the new policy never applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let forwarded = gw.router_count();
    let errors_before = metric(&gw, "portcullis_config_reloads_total{result=\"error\"} ").await;
    replace_file(&rego, "package portcullis.authz\nresult := {\n");
    let started = Instant::now();
    while metric(&gw, "portcullis_config_reloads_total{result=\"error\"} ").await == errors_before {
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the broken policy was never read"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = gw
        .send(&post(CHAT, &chat_body()).bearer(&token).build())
        .await;
    assert_eq!((r.status, r.code()), (403, "acme_paused".to_string()));
    assert_eq!(gw.router_count(), forwarded);
}

/// What the mock authorizer saw of one call.
#[derive(Debug, Clone)]
struct AuthzCall {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl AuthzCall {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A mock ext_authz service deciding by `x-tenant-model`: `m-small` is
/// allowed with `x-authz-user`, `m-large` is denied 451 with a JSON body,
/// `m-exp-slow` gets no answer within a second.
async fn mock_authz() -> (SocketAddr, Arc<Mutex<Vec<AuthzCall>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(Mutex::new(Vec::new()));
    let seen = calls.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                let head_len = loop {
                    let Ok(n) = sock.read(&mut chunk).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_len]).to_string();
                let mut lines = head.split("\r\n");
                let mut first = lines.next().unwrap_or_default().split(' ');
                let call = AuthzCall {
                    method: first.next().unwrap_or_default().into(),
                    path: first.next().unwrap_or_default().into(),
                    headers: lines
                        .filter_map(|l| l.split_once(':'))
                        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
                        .collect(),
                };
                let model = call
                    .header("x-tenant-model")
                    .unwrap_or_default()
                    .to_string();
                seen.lock().unwrap().push(call);
                let answer = match model.as_str() {
                    "m-small" => "HTTP/1.1 200 OK\r\nx-authz-user: alice\r\nx-authz-secret: no\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_string(),
                    "m-exp-slow" => {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        "HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".to_string()
                    }
                    _ => {
                        let body = r#"{"denied":"by policy service"}"#;
                        format!("HTTP/1.1 451 Unavailable For Legal Reasons\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len())
                    }
                };
                let _ = sock.write_all(answer.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (addr, calls)
}

fn ext_authz_table(addr: SocketAddr, extra: &str) -> String {
    format!(
        "[policy.ext_authz]\nurl = \"http://{addr}/check\"\ntimeout_ms = 200\n\
         allowed_headers = [\"user-agent\"]\nallowed_upstream_headers = [\"x-authz-user\"]\n{extra}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_authorizer_allows_denies_and_its_decisions_are_cached() {
    let (addr, calls) = mock_authz().await;
    let gw = Gateway::start_with(Options {
        gateway_extra: ext_authz_table(addr, "cache_ttl_ms = 60000"),
        ..Options::default()
    })
    .await;
    let token = gw.keys.token("globex");
    let ask = |model: &str| {
        post(CHAT, &chat(model))
            .bearer(&token)
            .header("User-Agent", "policy-test")
            .header("x-authz-user", "mallory")
            .header("x_authz_user", "mallory")
            .build()
    };
    let r = gw.send(&ask("m-small")).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let recs = gw.router().requests();
    assert_eq!(
        recs[0].header("x-authz-user"),
        Some("alice"),
        "the client's value must not survive"
    );
    assert_eq!(
        recs[0].header("x_authz_user"),
        None,
        "an underscore spelling must not survive"
    );
    assert_eq!(
        recs[0].header("x-authz-secret"),
        None,
        "only allowed_upstream_headers pass"
    );
    {
        let calls = calls.lock().unwrap();
        let c = &calls[0];
        assert_eq!(
            (c.method.as_str(), c.path.as_str()),
            ("POST", "/check/v1/chat/completions")
        );
        assert_eq!(c.header("x-tenant-id"), Some("globex"));
        assert_eq!(c.header("x-tenant-plan"), Some("gold"));
        assert_eq!(c.header("x-tenant-features"), Some("chat"));
        assert_eq!(c.header("user-agent"), Some("policy-test"));
        assert_eq!(
            c.header("authorization"),
            None,
            "credentials never reach the authorizer"
        );
    }

    // A denial relays the authorizer's status and body.
    let r = gw.send(&ask("m-large")).await;
    assert_eq!(r.status, 451);
    assert_eq!(r.json(), json!({"denied": "by policy service"}));
    assert_eq!(gw.router_count(), 1);

    // Both decisions are cached: the same requests call nobody.
    assert_eq!(gw.send(&ask("m-small")).await.status, 200);
    assert_eq!(gw.send(&ask("m-large")).await.status, 451);
    assert_eq!(calls.lock().unwrap().len(), 2);
    assert_eq!(
        metric(&gw, "portcullis_ext_authz_total{result=\"cache_hit\"} ").await,
        2
    );
    assert_eq!(gw.router_count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authorizer_that_times_out_or_is_down_fails_closed_unless_configured_open() {
    let (addr, calls) = mock_authz().await;
    let gw = Gateway::start_with(Options {
        gateway_extra: ext_authz_table(addr, "cache_ttl_ms = 0"),
        ..Options::default()
    })
    .await;
    let token = gw.keys.token("globex");
    let slow = post(CHAT, &chat("m-exp-slow")).bearer(&token).build();
    let started = Instant::now();
    let r = gw.send(&slow).await;
    assert_eq!((r.status, r.code()), (403, "policy_error".to_string()));
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "the call timeout did not apply"
    );
    assert_eq!(gw.router_count(), 0);
    // With caching off, every request asks again.
    let small = post(CHAT, &chat("m-small")).bearer(&token).build();
    assert_eq!(gw.send(&small).await.status, 200);
    assert_eq!(gw.send(&small).await.status, 200);
    assert_eq!(calls.lock().unwrap().len(), 3);

    // Down: nothing listens there.
    let down: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let closed = Gateway::start_with(Options {
        gateway_extra: ext_authz_table(down, ""),
        ..Options::default()
    })
    .await;
    let small = post(CHAT, &chat("m-small"))
        .bearer(&closed.keys.token("globex"))
        .build();
    let r = closed.send(&small).await;
    assert_eq!((r.status, r.code()), (403, "policy_error".to_string()));
    assert_eq!(closed.router_count(), 0);
    assert_eq!(
        metric(
            &closed,
            "portcullis_ext_authz_total{result=\"failed_closed\"} "
        )
        .await,
        1
    );

    let open = Gateway::start_with(Options {
        gateway_extra: ext_authz_table(down, "failure_mode_allow = true"),
        ..Options::default()
    })
    .await;
    let token = open.keys.token("globex");
    let r = open
        .send(&post(CHAT, &chat("m-small")).bearer(&token).build())
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        metric(&open, "portcullis_ext_authz_total{result=\"failed_open\"} ").await,
        1
    );
}
