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

/// `[policy] rego = path` with a 20 ms evaluation limit.
fn rego_line(path: &Path) -> toml::Table {
    set(
        toml::toml! {
            [policy]
            rego_timeout_ms = 20
        },
        "policy.rego",
        path.display().to_string(),
    )
}

/// A gateway whose `[policy] rego` is `policy`, as `authz.rego` in its dir.
async fn with_policy(policy: &str) -> Gateway {
    Gateway::start_with(Options {
        config: rego_line(Path::new("authz.rego")),
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
        config: rego_line(&shipped),
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

/// A policy written to the contract in DESIGN.md: `decision` with
/// `{allow, code, message, headers}`, reading `input.time`'s `unix`,
/// `hour_utc` and `weekday`. Its `unused` rule is one regorus cannot
/// schedule, so its compiler prints a diagnostic.
const DECISION_POLICY: &str = r#"package portcullis.authz
import rego.v1

default decision := {"allow": false, "code": "model_not_in_contract", "message": "only m-small is in the contract"}

decision := {"allow": true, "headers": {
    "x-tenant-policy-day": input.time.weekday,
    "x-tenant-policy-hour": sprintf("%d", [input.time.hour_utc]),
}} if {
    input.request.model == "m-small"
    input.time.unix > 1700000000
}

decision := {"allow": false} if input.request.model == "m-large"

unused if {
    some a
    a == a
}
"#;

/// The UTC weekday name and hour now, as the policy should see them.
fn utc_day_and_hour() -> (String, String) {
    let unix = now();
    let days = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    (
        days[((unix / 86_400) % 7) as usize].to_string(),
        ((unix % 86_400) / 3600).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_written_to_the_documented_decision_contract_works() {
    let gw = Gateway::start_with(Options {
        config: rego_line(Path::new("authz.rego")),
        files: vec![("authz.rego", DECISION_POLICY.to_string())],
        capture_logs: true,
        ..Options::default()
    })
    .await;
    let token = gw.keys.token("globex");
    let before = utc_day_and_hour();
    let r = gw
        .send(&post(CHAT, &chat("m-small")).bearer(&token).build())
        .await;
    let after = utc_day_and_hour();
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let rec = gw.router().requests().pop().unwrap();
    let seen = (
        rec.header("x-tenant-policy-day")
            .unwrap_or_default()
            .to_string(),
        rec.header("x-tenant-policy-hour")
            .unwrap_or_default()
            .to_string(),
    );
    assert!(seen == before || seen == after, "{seen:?}, now {before:?}");
    let mut signed = CONTEXT_HEADERS.to_vec();
    signed.extend(["x-tenant-policy-day", "x-tenant-policy-hour"]);
    verify_signature(&gw.keys.context_key, "POST", CHAT, &rec, &signed);

    // A denial without a code is policy_denied; with one, it keeps its own.
    let r = gw
        .send(&post(CHAT, &chat("m-large")).bearer(&token).build())
        .await;
    assert_eq!((r.status, r.code()), (403, "policy_denied".to_string()));
    let r = gw
        .send(&post(CHAT, &chat("m-exp-1")).bearer(&token).build())
        .await;
    assert_eq!(
        (r.status, r.code()),
        (403, "model_not_in_contract".to_string())
    );
    assert_eq!(
        r.json()["error"]["message"],
        "only m-small is in the contract"
    );
    assert_eq!(gw.router_count(), 1, "a denied request reached the router");

    // The compiler's diagnostic is a log line naming the policy, not a bare
    // line on stderr.
    let log = std::fs::read_to_string(gw.dir.path().join("gateway.log")).unwrap();
    let note = log
        .lines()
        .find(|l| l.contains("rego compiler diagnostic"))
        .unwrap_or_else(|| panic!("no compiler diagnostic in the log:\n{log}"));
    assert!(
        note.contains("\"level\":\"WARN\"")
            && note.contains("authz.rego")
            && note.contains("could not schedule"),
        "{note}"
    );
    let stderr = std::fs::read_to_string(gw.dir.path().join("gateway.stderr")).unwrap();
    assert!(
        !stderr.contains("could not schedule"),
        "bare compiler output on stderr: {stderr}"
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

/// `[policy.ext_authz]` for an authorizer at `addr`, with `extra` merged in.
fn ext_authz_table(addr: SocketAddr, extra: toml::Table) -> toml::Table {
    let mut table = toml::toml! {
        timeout_ms = 200
        allowed_headers = ["user-agent"]
        allowed_upstream_headers = ["x-authz-user"]
    };
    table.insert("url".into(), format!("http://{addr}/check").into());
    table.extend(extra);
    set(toml::Table::new(), "policy.ext_authz", table)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_external_authorizer_allows_denies_and_its_decisions_are_cached() {
    let (addr, calls) = mock_authz().await;
    let gw = Gateway::start_with(Options {
        config: ext_authz_table(addr, toml::toml! { cache_ttl_ms = 60000 }),
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
        config: ext_authz_table(addr, toml::toml! { cache_ttl_ms = 0 }),
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
        config: ext_authz_table(down, toml::Table::new()),
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
        config: ext_authz_table(down, toml::toml! { failure_mode_allow = true }),
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
