//! The Redis limits backend with a real `redis-server`: quotas shared by
//! two gateway instances, and the configured behaviour when Redis dies.

use std::time::{Duration, Instant};

use crate::common::*;
use portcullis::mock_router::MockOptions;

const CHAT: &str = "/v1/chat/completions";

fn redis_limits(redis: &Redis, on_error: &str) -> toml::Table {
    limits_at(&redis.url(), on_error)
}

fn limits_at(url: &str, on_error: &str) -> toml::Table {
    let t = toml::toml! {
        [limits]
        backend = "redis"
        redis_timeout_ms = 100
    };
    let t = set(t, "limits.redis_url", url);
    set(t, "limits.on_backend_error", on_error)
}

/// Two gateways on one Redis, with the same tenants and keys.
async fn fleet(redis: &Redis, on_error: &str, router: MockOptions) -> (Gateway, Gateway) {
    fleet_at(&redis.url(), on_error, router).await
}

async fn fleet_at(url: &str, on_error: &str, router: MockOptions) -> (Gateway, Gateway) {
    let keys = Keys::generate();
    let opts = || Options {
        router: RouterMode::Up(router.clone()),
        config: limits_at(url, on_error),
        keys: Some(keys.clone()),
        ..Options::default()
    };
    (
        Gateway::start_with(opts()).await,
        Gateway::start_with(opts()).await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_one_request_rate() {
    let redis = Redis::start().await;
    let (a, b) = fleet(&redis, "closed", MockOptions::default()).await;
    // Warm both instances' connections to Redis without spending quota.
    for gw in [&a, &b] {
        let r = gw
            .send(&get("/v1/nothing").bearer("pcl_warmup").build())
            .await;
        assert_eq!(r.status, 401);
    }
    // swarm: 10 requests a second with a burst of 10, tokens to spare.
    let (ta, tb) = (a.keys.token("swarm"), b.keys.token("swarm"));
    let start = Instant::now();
    let mut handles = Vec::new();
    for i in 0..30 {
        let (addr, req) = if i % 2 == 0 {
            (a.addr, post(CHAT, &chat_body()).bearer(&ta).build())
        } else {
            (b.addr, post(CHAT, &chat_body()).bearer(&tb).build())
        };
        handles.push(tokio::spawn(async move { send(addr, &req).await.unwrap() }));
    }
    let mut ok = 0;
    let mut limited = 0;
    for h in handles {
        let r = h.await.unwrap();
        match r.status {
            200 => ok += 1,
            429 => {
                assert_eq!(r.code(), "rate_limit_exceeded");
                limited += 1;
            }
            other => panic!("unexpected {other}: {}", String::from_utf8_lossy(&r.body)),
        }
    }
    // burst 10, plus what 10/s refilled while the requests ran.
    let refill = (start.elapsed().as_secs_f64() * 10.0).floor() as i32;
    let expected = 10 + refill;
    assert!(
        (ok - expected).abs() <= 1,
        "{ok} admitted, expected {expected} (+-1)"
    );
    assert_eq!(ok + limited, 30);
    assert_eq!(a.router_count() + b.router_count(), ok as usize);
    println!(
        "30 requests over two gateways: {ok} admitted, {limited} limited (expected {expected})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_one_token_budget() {
    let redis = Redis::start().await;
    let slow = MockOptions {
        delay: Duration::from_millis(700),
        ..MockOptions::default()
    };
    let (a, b) = fleet(&redis, "closed", slow).await;
    // 1,500 tokens a minute; each request reserves its prompt plus 1,000.
    let req_a = post(CHAT, &chat_body())
        .bearer(&a.keys.token("fleet"))
        .build();
    let addr = a.addr;
    let first = tokio::spawn(async move { send(addr, &req_a).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = b
        .send(
            &post(CHAT, &chat_body())
                .bearer(&b.keys.token("fleet"))
                .build(),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (429, "tokens_quota_exceeded".to_string())
    );
    assert!(r.header("retry-after").is_some());
    assert_eq!(first.await.unwrap().status, 200);
    // Settled to the real usage: the budget is free again, on either side.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = b
        .send(
            &post(CHAT, &chat_body())
                .bearer(&b.keys.token("fleet"))
                .build(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_redis_fails_closed_fast_and_recovers() {
    let redis = Redis::start().await;
    let port = redis.port;
    let (a, _b) = fleet(&redis, "closed", MockOptions::default()).await;
    let token = a.keys.token("solo");
    assert_eq!(
        a.send(&post(CHAT, &chat_body()).bearer(&token).build())
            .await
            .status,
        200
    );
    drop(redis);
    for _ in 0..5 {
        let t = Instant::now();
        let r = a
            .send(&post(CHAT, &chat_body()).bearer(&token).build())
            .await;
        assert_eq!(
            (r.status, r.code()),
            (503, "gateway_overloaded".to_string())
        );
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "a dead Redis made a request wait {:?}",
            t.elapsed()
        );
    }
    let metrics = send(a.admin, &get("/metrics").build()).await.unwrap();
    let text = String::from_utf8_lossy(&metrics.body);
    let errors: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("portcullis_limiter_backend_errors_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(errors >= 1, "backend errors not counted");

    let _redis = Redis::start_on(port).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = a
            .send(&post(CHAT, &chat_body()).bearer(&token).build())
            .await;
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never recovered: {}", r.code());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_redis_falls_back_to_local_limits() {
    let redis = Redis::start().await;
    let (a, _b) = fleet(&redis, "local", MockOptions::default()).await;
    let token = a.keys.token("tiny"); // burst 3 locally
    drop(redis);
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        statuses.push(
            a.send(&post(CHAT, &chat_body()).bearer(&token).build())
                .await
                .status,
        );
        assert!(t.elapsed() < Duration::from_secs(1));
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 429, 429],
        "per-instance limits apply"
    );
}

fn chat(model: &str, max_tokens: u64) -> serde_json::Value {
    serde_json::json!({"model": model, "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": "Hello"}]})
}

fn keyed(model: &str, max_tokens: u64, key: &str) -> Vec<u8> {
    post(CHAT, &chat(model, max_tokens))
        .header("x-api-key", key)
        .build()
}

/// Every scope lives in Redis: a key's burst, a model's rate, a tenant's
/// money budget and the quota answer are one figure across the fleet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scope_is_shared_by_the_fleet() {
    let redis = Redis::start().await;
    let (a, b) = fleet(&redis, "closed", MockOptions::default()).await;
    shares_every_scope(&a, &b).await;
}

/// The same on a real 3-master Redis Cluster (`redis+cluster://`): every
/// key of a tenant sits on one node, under the tenant's hash tag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_shares_every_scope_with_each_tenant_on_one_node() {
    let cluster = RedisCluster::start().await;
    let (a, b) = fleet_at(&cluster.url(), "closed", MockOptions::default()).await;
    shares_every_scope(&a, &b).await;
    for tenant in ["metered", "budgeted"] {
        let keys = cluster.keys_by_node(&format!("portcullis:{{{tenant}}}:*"));
        let holding: Vec<usize> = (0..keys.len()).filter(|i| !keys[*i].is_empty()).collect();
        assert_eq!(
            holding.len(),
            1,
            "{tenant}'s keys on nodes {holding:?}: {keys:?}"
        );
        assert!(
            keys[holding[0]]
                .iter()
                .any(|k| k.contains(":key:capped:") || k.contains(":bpd:")),
            "{keys:?}"
        );
    }
}

/// A key's burst, a model's rate, a tenant's money budget and the quota
/// answer, spent through two gateways.
async fn shares_every_scope(a: &Gateway, b: &Gateway) {
    let k = &a.keys;
    // The key `capped`: a burst of 3, spent over both instances.
    assert_eq!(
        a.send(&keyed("m-small", 10, &k.capped_key)).await.status,
        200
    );
    assert_eq!(
        b.send(&keyed("m-small", 10, &k.capped_key)).await.status,
        200
    );
    let r = b
        .send(&get("/v1/quota").header("x-api-key", &k.capped_key).build())
        .await;
    assert_eq!(r.status, 200);
    let q = r.json();
    assert_eq!(q["scopes"][0]["name"], "capped");
    assert_eq!(q["scopes"][0]["limits"]["requests"]["remaining"], 0, "{q}");
    let used = 3_000
        - q["scopes"][0]["limits"]["tokens_per_day"]["remaining"]
            .as_u64()
            .unwrap();
    let real: u64 = [a, b]
        .iter()
        .map(|g| (g.router().requests()[0].body.len() / 4 + 6) as u64)
        .sum();
    assert_eq!(
        used, real,
        "reserved, then settled to the real usage in Redis: {q}"
    );
    let r = a.send(&keyed("m-small", 10, &k.capped_key)).await;
    assert_eq!(
        (r.status, r.code()),
        (429, "rate_limit_exceeded".to_string())
    );
    assert_eq!(
        r.json()["error"]["message"],
        "the per-key request rate limit for capped is reached"
    );
    // The model `big-70b`: a burst of 1 for the whole fleet.
    assert_eq!(
        a.send(&keyed("big-70b", 10, &k.metered_key)).await.status,
        200
    );
    let r = b.send(&keyed("big-70b", 10, &k.metered_key)).await;
    assert_eq!(
        (r.status, r.code()),
        (429, "rate_limit_exceeded".to_string())
    );
    // The tenant `budgeted`: 0.06 a day, most of it spent on one instance.
    assert_eq!(
        a.send(&keyed("m-small", 10, &k.budget_key)).await.status,
        200
    );
    let before = a.router_count() + b.router_count();
    let r = b.send(&keyed("m-small", 20, &k.budget_key)).await;
    assert_eq!((r.status, r.code()), (429, "budget_exceeded".to_string()));
    assert_eq!(
        a.router_count() + b.router_count(),
        before,
        "refused requests reached the router"
    );
}

/// The commands clients send while `during` runs, as Redis's `MONITOR`
/// sees them: one line per command, those a script runs marked `lua` and
/// left out. Each is one round trip.
async fn round_trips<F: std::future::Future<Output = ()>>(redis: &Redis, during: F) -> Vec<String> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", redis.port))
        .await
        .unwrap();
    s.write_all(b"MONITOR\r\n").await.unwrap();
    let mut lines = BufReader::new(s).lines();
    assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("+OK"));
    during.await;
    let mut seen = Vec::new();
    while let Ok(Ok(Some(l))) =
        tokio::time::timeout(Duration::from_millis(300), lines.next_line()).await
    {
        if !l.contains(" lua] ") {
            seen.push(l);
        }
    }
    seen
}

/// Round trips, counted by Redis itself: a completion is 3 (admit with
/// every scope's rate and slot; reserve tokens and money in every scope;
/// settle and free the slots together), a request the gateway answers 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_costs_three_round_trips_and_a_lookup_one() {
    let redis = Redis::start().await;
    let (a, _b) = fleet(&redis, "closed", MockOptions::default()).await;
    // `other-bot` has a day's tokens and a month's money of its own.
    let key = a.keys.other_key.clone();
    // Loads the scripts (EVALSHA, NOSCRIPT, SCRIPT LOAD) once.
    assert_eq!(a.send(&keyed("big-8b", 10, &key)).await.status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut counts = Vec::new();
    for req in [
        keyed("big-8b", 10, &key),
        get("/v1/models").header("x-api-key", &key).build(),
        get("/v1/quota").header("x-api-key", &key).build(),
    ] {
        let seen = round_trips(&redis, async {
            assert_eq!(a.send(&req).await.status, 200);
        })
        .await;
        assert!(seen.iter().all(|l| l.contains("\"EVALSHA\"")), "{seen:#?}");
        counts.push(seen.len());
    }
    // The key, the model `big-*` and the tenant: three scopes, 3 trips.
    assert_eq!(counts, [3, 1, 1], "round trips: completion, models, quota");
}

/// Three gateways on one Redis, hammered at once through all three: the
/// fleet admits what one gateway would, ±1, and a token budget holds no
/// more than one reservation beyond its limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_gateways_admit_what_one_would() {
    let redis = Redis::start().await;
    let slow = MockOptions {
        delay: Duration::from_millis(1500),
        ..MockOptions::default()
    };
    let keys = Keys::generate();
    let opts = || Options {
        router: RouterMode::Up(slow.clone()),
        config: redis_limits(&redis, "closed"),
        keys: Some(keys.clone()),
        ..Options::default()
    };
    let gws = [
        Gateway::start_with(opts()).await,
        Gateway::start_with(opts()).await,
        Gateway::start_with(opts()).await,
    ];
    let key = gws[0].keys.metered_key.clone();
    // One request alone tells the reservation: the model scope `big-*`
    // (1,000 tokens a minute) is the tightest, so its header counts down.
    let r = gws[0].send(&keyed("big-8b", 100, &key)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("1000"));
    let left: u64 = r
        .header("x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    let reservation = 1_000 - left;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    let mut handles = Vec::new();
    for i in 0..30 {
        let (addr, req) = (gws[i % 3].addr, keyed("big-8b", 100, &key));
        handles.push(tokio::spawn(async move { send(addr, &req).await.unwrap() }));
    }
    let mut admitted = 0u64;
    for h in handles {
        let r = h.await.unwrap();
        match (r.status, r.code().as_str()) {
            (200, _) => admitted += 1,
            (429, "tokens_quota_exceeded") => {}
            (s, c) => panic!("unexpected {s} {c}"),
        }
    }
    let used_before = (gws[0].router().requests()[0].body.len() / 4 + 6) as u64;
    let refill = (start.elapsed().as_secs_f64() * 1000.0 / 60.0).ceil() as u64;
    let room = 1_000 - used_before + refill;
    println!("30 requests over three gateways: {admitted} admitted of {room} tokens free, {reservation} each");
    assert!(
        admitted * reservation <= room + reservation,
        "{admitted} × {reservation} > {room} + one reservation"
    );
    assert!(
        (admitted + 1) * reservation > room.saturating_sub(reservation),
        "{admitted} admitted: under-admitted"
    );
    assert!(admitted >= 2, "the budget was shared, not split");
    let total: usize = gws.iter().map(Gateway::router_count).sum();
    assert_eq!(total as u64, admitted + 1);

    // Requests: `swarm` has a burst of 10 and 10 a second. A refusal comes
    // back at once, so the last one bounds the time the admissions took.
    let token = gws[0].keys.token("swarm");
    let answers = hammer(&gws, 30, || post(CHAT, &chat_body()).bearer(&token).build()).await;
    let ok = answers.iter().filter(|(s, _)| *s == 200).count() as f64;
    let decided = answers
        .iter()
        .filter(|(s, _)| *s == 429)
        .map(|(_, t)| t.as_secs_f64())
        .fold(0.0, f64::max);
    let expected = 10.0 + (decided * 10.0).floor();
    assert!(
        (ok - expected).abs() <= 1.0,
        "{ok} admitted, expected {expected} (±1)"
    );
    assert!(
        answers.iter().all(|(s, _)| matches!(s, 200 | 429)),
        "{answers:?}"
    );

    // Money: `budgeted` has 0.06 a day; each request reserves its prompt
    // estimate at 0.001 and 10 output tokens at 0.002.
    let body = chat("m-small", 10);
    let reservation =
        (portcullis::body::tokens::estimate_chat(&body) as f64 * 1000.0 + 10.0 * 2000.0) / 1e6;
    let key = gws[0].keys.budget_key.clone();
    let answers = hammer(&gws, 12, || {
        post(CHAT, &body).header("x-api-key", &key).build()
    })
    .await;
    let ok = answers.iter().filter(|(s, _)| *s == 200).count() as f64;
    println!("12 requests over three gateways: {ok} admitted at {reservation} each of 0.06");
    assert!(
        ok * reservation <= 0.06 + 1e-9,
        "{ok} × {reservation} > 0.06"
    );
    assert!(
        (ok + 1.0) * reservation > 0.06,
        "{ok} admitted: under-admitted"
    );
}

/// Sends `n` requests at once, spread over the gateways in turn: each
/// answer's status and when it came.
async fn hammer(gws: &[Gateway], n: usize, req: impl Fn() -> Vec<u8>) -> Vec<(u16, Duration)> {
    let start = Instant::now();
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (addr, req) = (gws[i % gws.len()].addr, req());
            tokio::spawn(async move { (send(addr, &req).await.unwrap().status, start.elapsed()) })
        })
        .collect();
    let mut statuses = Vec::new();
    for h in handles {
        statuses.push(h.await.unwrap());
    }
    statuses
}
