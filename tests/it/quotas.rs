//! Quota scopes end to end (local backend), on tenant `metered`: per-model
//! limits where the most specific pattern wins, key objects with limits of
//! their own nested inside the tenant's, a money budget reserved at the
//! model's prices and settled at the real usage, and `GET /v1/quota`.
//! Every refusal names its scope and leaves the router untouched.

use crate::common::*;
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";

fn chat(model: &str, max_tokens: u64) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "Hello"}],
           "max_tokens": max_tokens})
}

/// A 429 with `code`, with the router still at `router_count` requests.
fn refused(gw: &Gateway, r: &Response, router_count: usize, code: &str) {
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.code(), code, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.header("retry-after").is_some());
    assert_eq!(
        gw.router_count(),
        router_count,
        "a refused request reached the router"
    );
}

async fn quota(gw: &Gateway, key: &str) -> Value {
    let r = gw
        .send(&get("/v1/quota").header("x-api-key", key).build())
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    r.json()
}

/// The scope of `level` and `name` in a quota answer.
fn scope<'a>(q: &'a Value, level: &str, name: &str) -> &'a Value {
    q["scopes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["scope"] == level && s["name"] == name)
        .unwrap_or_else(|| panic!("no {level} scope {name} in {q}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_model_scopes_apply_to_their_models_and_the_most_specific_wins() {
    let gw = Gateway::start().await;
    let key = gw.keys.metered_key.clone();
    let send = |body: Value| {
        let req = post(CHAT, &body).header("x-api-key", &key).build();
        let gw = &gw;
        async move { gw.send(&req).await }
    };

    // `big-*` holds 1,000 tokens a minute: a reservation of 1,200 does not
    // fit, while the same request for a model without a scope passes.
    let r = send(chat("big-8b", 1_200)).await;
    refused(&gw, &r, 0, "tokens_quota_exceeded");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("the per-model token quota per minute for big-*"),
        "{}",
        r.json()
    );
    assert_eq!(send(chat("m-small", 1_200)).await.status, 200);

    // Under it, the headers name the tightest scope: the model's minute.
    let r = send(chat("big-8b", 100)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("1000"));
    let left: u64 = r
        .header("x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!(left < 1000 - 100, "the reservation is taken: {left}");

    // `big-70b` has an exact entry, which wins over `big-*`: its 1,200
    // tokens pass (no token scope), and its own rate (a burst of 1) refuses
    // the second request.
    let before = gw.router_count();
    assert_eq!(send(chat("big-70b", 1_200)).await.status, 200);
    let r = send(chat("big-70b", 10)).await;
    refused(&gw, &r, before + 1, "rate_limit_exceeded");
    assert_eq!(
        r.json()["error"]["message"],
        "the per-model request rate limit for big-70b is reached"
    );
    // The model's refusal took nothing from the tenant's other models.
    assert_eq!(send(chat("big-8b", 10)).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_own_limits_nest_inside_its_tenants() {
    let gw = Gateway::start().await;
    let capped = gw.keys.capped_key.clone();
    let req = |key: &str, max_tokens| {
        post(CHAT, &chat("m-small", max_tokens))
            .header("x-api-key", key)
            .build()
    };
    // `capped` has a burst of 3: its headers show its own, tighter limit.
    for left in ["2", "1", "0"] {
        let r = gw.send(&req(&capped, 10)).await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("3"));
        assert_eq!(r.header("x-ratelimit-remaining-requests"), Some(left));
    }
    let r = gw.send(&req(&capped, 10)).await;
    refused(&gw, &r, 3, "rate_limit_exceeded");
    assert_eq!(
        r.json()["error"]["message"],
        "the per-key request rate limit for capped is reached"
    );
    // The tenant's other credentials are not held to the key's limit.
    let r = gw.send(&req(&gw.keys.metered_key, 10)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("1000"));
    let r = gw.send(&req(&gw.keys.other_key, 10)).await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_token_quota_refuses_what_the_tenant_would_allow() {
    let gw = Gateway::start().await;
    let started = std::time::Instant::now();
    let req = |key: &str, max_tokens| {
        post(CHAT, &chat("m-small", max_tokens))
            .header("x-api-key", key)
            .build()
    };
    // `capped` may use 3,000 tokens a day; the tenant 10 million.
    let r = gw.send(&req(&gw.keys.capped_key, 3_990)).await;
    refused(&gw, &r, 0, "tokens_quota_exceeded");
    assert_eq!(
        r.json()["error"]["message"],
        "the per-key token quota per day for capped is reached"
    );
    assert_eq!(gw.send(&req(&gw.keys.metered_key, 3_990)).await.status, 200);
    assert_eq!(gw.send(&req(&gw.keys.capped_key, 100)).await.status, 200);
    // The refused reservation took nothing: the key was charged only the
    // request it passed, settled to its real usage, and the tenant both.
    let q = quota(&gw, &gw.keys.capped_key).await;
    let key = scope(&q, "key", "capped");
    let key_used = 3_000
        - key["limits"]["tokens_per_day"]["remaining"]
            .as_u64()
            .unwrap();
    let real = |n: usize| (gw.router().requests()[n].body.len() / 4 + 6) as u64;
    assert_eq!(key_used, real(1), "{q}");
    let tenant = scope(&q, "tenant", "metered");
    let tenant_used = 10_000_000
        - tenant["limits"]["tokens_per_day"]["remaining"]
            .as_u64()
            .unwrap();
    // The tenant's day (10 million) refills a token every 8.6 ms while the
    // test runs; the key's (3,000) one every 29 s.
    let refill = (started.elapsed().as_secs_f64() * 10e6 / 86_400.0).ceil() as u64;
    let charged = real(0) + real(1);
    assert!(
        tenant_used <= charged && tenant_used + refill >= charged,
        "{tenant_used} of {charged} (refill {refill}): {q}"
    );
    // A request admitted at the header stage has arrived: the rate counts
    // it even when its reservation is refused (the burst of 3 is spent by
    // the refused request, the passing one and the lookup).
    assert_eq!(key["limits"]["requests"]["remaining"], 0, "{q}");
}

/// What the router's usage of the `n`th recorded request cost at
/// `[prices."m-small"]` (1000 in, 2000 out, 500 cached, per million): the
/// mock reports a quarter of the body's bytes as prompt tokens, half of
/// them cached, and 6 completion tokens.
fn cost_of(gw: &Gateway, n: usize) -> f64 {
    let prompt = (gw.router().requests()[n].body.len() / 4) as f64;
    let cached = (prompt / 2.0).floor();
    ((prompt - cached) * 1000.0 + cached * 500.0 + 6.0 * 2000.0) / 1e6
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_money_budget_reserves_settles_and_refuses_until_the_next_day() {
    let gw = Gateway::start().await;
    let key = gw.keys.budget_key.clone();
    let req = |max_tokens| {
        post(CHAT, &chat("m-small", max_tokens))
            .header("x-api-key", &key)
            .build()
    };
    // Reserved: the prompt estimate at 0.001 plus 10 output tokens at
    // 0.002, about 0.03 of the 0.06 a day; settled at the real usage.
    let r = gw.send(&req(10)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let spent = cost_of(&gw, 0);
    let q = quota(&gw, &key).await;
    let budget = &scope(&q, "tenant", "budgeted")["limits"]["budget_per_day"];
    assert_eq!(budget["limit"], 0.06);
    assert!(
        (budget["spent"].as_f64().unwrap() - spent).abs() < 1e-9,
        "spent {} of {budget}",
        spent
    );
    let m = metric_f64(
        &gw,
        "portcullis_cost_total{model=\"m-small\",tenant=\"budgeted\"}",
    )
    .await;
    assert!(
        (m - spent).abs() < 1e-9,
        "portcullis_cost_total {m}, spent {spent}"
    );

    // What is left (0.06 - spent) cannot hold a reservation of 20 output
    // tokens at 0.002 plus the prompt: 429 until midnight UTC.
    assert!(0.06 - spent < 20.0 * 0.002, "the test's figures");
    let r = gw.send(&req(20)).await;
    refused(&gw, &r, 1, "budget_exceeded");
    assert_eq!(
        r.json()["error"]["message"],
        "the tenant's budget per day is reached"
    );
    let now = now();
    let to_midnight = 86_400 - now % 86_400;
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!(
        retry.abs_diff(to_midnight) <= 2,
        "retry-after {retry}, midnight in {to_midnight}"
    );
    // A model with no price costs nothing against the budget.
    let r = gw
        .send(
            &post(CHAT, &chat("big-8b", 20))
                .header("x-api-key", &key)
                .build(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quota_answer_shows_the_callers_scopes_and_no_one_elses() {
    let gw = Gateway::start().await;
    let q = quota(&gw, &gw.keys.capped_key).await;
    assert_eq!(
        (q["object"].as_str(), q["tenant"].as_str()),
        (Some("quota"), Some("metered"))
    );
    assert_eq!(q["key_id"], "capped");
    let order: Vec<(String, String)> = q["scopes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["scope"].as_str().unwrap().into(),
                s["name"].as_str().unwrap().into(),
            )
        })
        .collect();
    let expect = [
        ("key", "capped"),
        ("model", "big-70b"),
        ("model", "big-*"),
        ("tenant", "metered"),
    ];
    assert_eq!(
        order,
        expect.map(|(a, b)| (a.to_string(), b.to_string())),
        "{q}"
    );
    // The lookup counts as a request against the key.
    let key = &scope(&q, "key", "capped")["limits"];
    assert_eq!(key["requests"]["limit"], 3);
    assert_eq!(key["requests"]["remaining"], 2);
    assert_eq!(key["tokens_per_day"]["limit"], 3000);
    assert_eq!(key["tokens_per_day"]["remaining"], 3000);
    let tenant = &scope(&q, "tenant", "metered")["limits"];
    assert_eq!(tenant["concurrency"]["limit"], 100);
    assert_eq!(tenant["budget_per_day"]["spent"], 0.0);
    assert!(tenant["budget_per_day"]["full_at"]
        .as_str()
        .unwrap()
        .ends_with("T00:00:00Z"));
    // Another key's figures never show: not its id, not its limits.
    let body = q.to_string();
    assert!(
        !body.contains("other-bot") && !body.contains("777777"),
        "{body}"
    );
    assert!(gw.router_count() == 0, "the gateway answers it");
    // A listed key sees the tenant's scopes without a key scope.
    let q = quota(&gw, &gw.keys.metered_key).await;
    assert_eq!(q["key_id"], Value::Null);
    assert_eq!(q["scopes"].as_array().unwrap().len(), 3);
}
