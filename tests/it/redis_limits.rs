//! The Redis limits backend with a real `redis-server`: quotas shared by
//! two gateway instances, and the configured behaviour when Redis dies.

use std::time::{Duration, Instant};

use crate::common::*;
use portcullis::mock_router::MockOptions;

const CHAT: &str = "/v1/chat/completions";

fn redis_limits(redis: &Redis, on_error: &str) -> toml::Table {
    let t = toml::toml! {
        [limits]
        backend = "redis"
        redis_timeout_ms = 100
    };
    let t = set(t, "limits.redis_url", redis.url());
    set(t, "limits.on_backend_error", on_error)
}

async fn fleet(redis: &Redis, on_error: &str, router: MockOptions) -> (Gateway, Gateway) {
    let opts = || Options {
        router: RouterMode::Up(router.clone()),
        config: redis_limits(redis, on_error),
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
