//! The limits stage end to end (local backend): request rate with burst,
//! concurrency slots freed on every exit path, token budgets reserved and
//! settled, rate-limit headers, and the limits that apply before a tenant
//! is known.

use std::time::Duration;

use crate::common::*;
use portcullis::mock_router::MockOptions;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHAT: &str = "/v1/chat/completions";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_then_rate_with_openai_headers() {
    let gw = Gateway::start().await;
    let token = gw.keys.token("tiny"); // 1 rps, burst 3
    let mut remaining = Vec::new();
    for _ in 0..3 {
        let r = gw
            .send(&post(CHAT, &chat_body()).bearer(&token).build())
            .await;
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("3"));
        assert_eq!(r.header("x-ratelimit-limit-tokens"), Some("1500"));
        assert!(r
            .header("x-ratelimit-reset-requests")
            .is_some_and(|v| v.ends_with('s')));
        assert!(r.header("x-ratelimit-remaining-tokens").is_some());
        assert!(r.header("x-ratelimit-reset-tokens").is_some());
        remaining.push(
            r.header("x-ratelimit-remaining-requests")
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(remaining, ["2", "1", "0"]);
    let r = gw
        .send(&post(CHAT, &chat_body()).bearer(&token).build())
        .await;
    assert_eq!(
        (r.status, r.code()),
        (429, "rate_limit_exceeded".to_string())
    );
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
    assert_eq!(
        gw.router_count(),
        3,
        "the refused request reached the router"
    );
    // The rate refills: one more after a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = gw.send(&get("/v1/models").bearer(&token).build()).await;
    assert_eq!(r.status, 200, "/v1/models counts as a request");
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
}

/// Sends a request and returns at once, leaving it in flight.
async fn in_flight(gw: &Gateway, req: Vec<u8>) -> tokio::task::JoinHandle<Response> {
    let addr = gw.addr;
    let h = tokio::spawn(async move { send(addr, &req).await.unwrap() });
    tokio::time::sleep(Duration::from_millis(150)).await;
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_slots_are_held_while_in_flight_and_freed_after() {
    let gw = Gateway::start_with(Options {
        router: RouterMode::Up(MockOptions {
            delay: Duration::from_millis(600),
            ..MockOptions::default()
        }),
        ..Options::default()
    })
    .await;
    let token = gw.keys.token("solo"); // max_concurrency 1
    let first = in_flight(&gw, post(CHAT, &chat_body()).bearer(&token).build()).await;
    let r = gw
        .send(&post(CHAT, &chat_body()).bearer(&token).build())
        .await;
    assert_eq!(
        (r.status, r.code()),
        (429, "concurrency_limit_exceeded".to_string())
    );
    assert!(r.header("retry-after").is_some());
    assert_eq!(first.await.unwrap().status, 200);
    // Success freed the slot.
    let r = gw
        .send(&post(CHAT, &chat_body()).bearer(&token).build())
        .await;
    assert_eq!(r.status, 200);
    // A later rejection (at the body stage) frees it too.
    let r = gw
        .send(&post_raw(CHAT, b"{bad".to_vec()).bearer(&token).build())
        .await;
    assert_eq!(r.code(), "invalid_json");
    let r = gw
        .send(&post(CHAT, &chat_body()).bearer(&token).build())
        .await;
    assert_eq!(r.status, 200, "slot leaked by a rejection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_errors_and_timeouts_free_the_slot() {
    let down = Gateway::start_with(Options {
        router: RouterMode::Down,
        ..Options::default()
    })
    .await;
    let token = down.keys.token("solo");
    for _ in 0..3 {
        let r = down
            .send(&post(CHAT, &chat_body()).bearer(&token).build())
            .await;
        assert_eq!(
            r.code(),
            "upstream_unavailable",
            "slot leaked by a router error"
        );
    }
    let slow = Gateway::start_with(Options {
        router: RouterMode::Up(MockOptions {
            delay: Duration::from_secs(3),
            ..MockOptions::default()
        }),
        read_timeout_ms: 200,
        ..Options::default()
    })
    .await;
    let token = slow.keys.token("solo");
    for _ in 0..3 {
        let r = slow
            .send(&post(CHAT, &chat_body()).bearer(&token).build())
            .await;
        assert_eq!(
            r.code(),
            "upstream_timeout",
            "slot leaked by a router timeout"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_leaving_mid_stream_frees_the_slot() {
    let gw = Gateway::start_with(Options {
        router: RouterMode::Up(MockOptions {
            event_interval: Duration::from_millis(300),
            ..MockOptions::default()
        }),
        ..Options::default()
    })
    .await;
    let token = gw.keys.token("solo");
    let mut body = chat_body();
    body["stream"] = json!(true);
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(&post(CHAT, &body).bearer(&token).build())
        .await
        .unwrap();
    let mut first = [0u8; 64];
    let n = s.read(&mut first).await.unwrap();
    assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
    let r = gw.send(&post(CHAT, &body).bearer(&token).build()).await;
    assert_eq!(
        r.code(),
        "concurrency_limit_exceeded",
        "the live stream holds its slot"
    );
    drop(s); // gone mid-stream
             // Once the gateway notices the disconnect, the slot is free again.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = gw
            .send(&post(CHAT, &chat_body()).bearer(&token).build())
            .await;
        if r.status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "slot never freed: {}",
            r.code()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_budgets_refund_real_usage_and_charge_lost_usage() {
    let slow = Gateway::start_with(Options {
        router: RouterMode::Up(MockOptions {
            delay: Duration::from_millis(400),
            ..MockOptions::default()
        }),
        read_timeout_ms: 200,
        ..Options::default()
    })
    .await;
    // tiny: 1,500 tokens a minute; each request reserves its prompt plus
    // 1,000 output tokens, so two reservations never fit together.
    let tiny = slow.keys.token("tiny");
    let r = slow
        .send(&post(CHAT, &chat_body()).bearer(&tiny).build())
        .await;
    assert_eq!(r.code(), "upstream_timeout");
    // No usage arrived: the whole reservation was charged.
    let r = slow
        .send(&post(CHAT, &chat_body()).bearer(&tiny).build())
        .await;
    assert_eq!(
        (r.status, r.code()),
        (429, "tokens_quota_exceeded".to_string())
    );
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "retry-after {retry}");
    assert!(r.header("x-ratelimit-remaining-tokens").is_some());

    let gw = Gateway::start().await;
    let tiny = gw.keys.token("tiny");
    // The mock reports a few dozen tokens per request; settling refunds the
    // rest, so requests keep fitting even though each reserves over 1,000.
    for i in 0..3 {
        let r = gw
            .send(&post(CHAT, &chat_body()).bearer(&tiny).build())
            .await;
        assert_eq!(
            r.status,
            200,
            "request {i}: {}",
            String::from_utf8_lossy(&r.body)
        );
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    let metrics = send(gw.admin, &get("/metrics").build()).await.unwrap();
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(
        text.contains(
            r#"portcullis_tokens_total{kind="completion",model="m-small",tenant="tiny"} 18"#
        ),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentications_are_limited_per_address() {
    let gw = Gateway::start_with(Options {
        config: toml::toml! {
            [limits]
            auth_failures_per_ip_per_minute = 5
        },
        ..Options::default()
    })
    .await;
    for _ in 0..5 {
        let r = gw
            .send(&post(CHAT, &chat_body()).bearer("pcl_guess").build())
            .await;
        assert_eq!(r.code(), "invalid_api_key");
    }
    let r = gw
        .send(&post(CHAT, &chat_body()).bearer("pcl_guess").build())
        .await;
    assert_eq!((r.status, r.code()), (429, "auth_rate_limited".to_string()));
    assert!(r.header("retry-after").is_some());
    // Even a valid credential waits: the address is locked out, not the key.
    let r = gw
        .send(
            &post(CHAT, &chat_body())
                .bearer(&gw.keys.token("acme"))
                .build(),
        )
        .await;
    assert_eq!(r.code(), "auth_rate_limited");
    assert_eq!(gw.router_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_gateway_sheds_load_while_health_answers() {
    let gw = Gateway::start_with(Options {
        router: RouterMode::Up(MockOptions {
            delay: Duration::from_millis(800),
            ..MockOptions::default()
        }),
        config: toml::toml! {
            [limits]
            max_inflight = 1
        },
        ..Options::default()
    })
    .await;
    let token = gw.keys.token("globex");
    let first = in_flight(&gw, post(CHAT, &chat_body()).bearer(&token).build()).await;
    let r = gw
        .send(&post(CHAT, &chat_body()).bearer(&token).build())
        .await;
    assert_eq!(
        (r.status, r.code()),
        (503, "gateway_overloaded".to_string())
    );
    let health = send(gw.admin, &get("/healthz").build()).await.unwrap();
    assert_eq!(health.status, 200);
    assert_eq!(first.await.unwrap().status, 200);
    let r = gw
        .send(&post(CHAT, &chat_body()).bearer(&token).build())
        .await;
    assert_eq!(r.status, 200, "capacity came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_client_keeps_its_connection() {
    use tokio::net::TcpStream;
    let gw = Gateway::start().await;
    let token = gw.keys.token("tiny"); // burst 3
    let body = chat_body().to_string();
    let req = format!(
        "POST {CHAT} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut statuses = Vec::new();
    for _ in 0..5 {
        s.write_all(req.as_bytes()).await.unwrap();
        let (status, close) = read_keep_alive(&mut s)
            .await
            .expect("the connection was closed");
        assert!(!close, "the gateway asked to close the connection");
        statuses.push(status);
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
}

/// `portcullis_inflight_requests{tenant}` is live: it counts a request from
/// the moment it takes its slot until the slot is freed, whether the
/// request succeeds, is rejected later, meets a router error or loses its
/// client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_flight_gauge_follows_every_request_while_it_runs() {
    const SOLO: &str = r#"portcullis_inflight_requests{tenant="solo"} "#;
    let gw = Gateway::start_with(Options {
        router: RouterMode::Up(MockOptions {
            event_interval: Duration::from_millis(400),
            ..MockOptions::default()
        }),
        ..Options::default()
    })
    .await;
    let token = gw.keys.token("solo");
    let mut stream = chat_body();
    stream["stream"] = json!(true);
    let open_stream = || async {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(&post(CHAT, &stream).bearer(&token).build())
            .await
            .unwrap();
        let mut first = [0u8; 64];
        let n = s.read(&mut first).await.unwrap();
        assert!(String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"));
        s
    };
    let gw_ref = &gw;
    let settles_at = |want: u64| async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let got = metric(gw_ref, SOLO).await;
            if got == want {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "gauge stuck at {got}, want {want}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };

    // A stream held open counts while it runs, and a refused second
    // request (no slot taken) does not move it.
    let mut s = open_stream().await;
    assert_eq!(metric(&gw, SOLO).await, 1, "the open stream is not counted");
    let r = gw.send(&post(CHAT, &stream).bearer(&token).build()).await;
    assert_eq!(r.code(), "concurrency_limit_exceeded");
    assert_eq!(metric(&gw, SOLO).await, 1);
    // Read the stream to its end: the gauge returns to 0.
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .expect("the stream ended")
        .unwrap();
    assert!(String::from_utf8_lossy(&rest).contains("[DONE]"));
    settles_at(0).await;

    // A client gone mid-stream.
    let s = open_stream().await;
    assert_eq!(metric(&gw, SOLO).await, 1);
    drop(s);
    settles_at(0).await;

    // A rejection after the slot was taken (the body stage).
    let r = gw
        .send(&post_raw(CHAT, b"{bad".to_vec()).bearer(&token).build())
        .await;
    assert_eq!(r.code(), "invalid_json");
    assert_eq!(metric(&gw, SOLO).await, 0);

    // A router error.
    let down = Gateway::start_with(Options {
        router: RouterMode::Down,
        ..Options::default()
    })
    .await;
    let r = down
        .send(
            &post(CHAT, &chat_body())
                .bearer(&down.keys.token("solo"))
                .build(),
        )
        .await;
    assert_eq!(r.code(), "upstream_unavailable");
    let m = send(down.admin, &get("/metrics").build()).await.unwrap();
    let text = String::from_utf8_lossy(&m.body).to_string();
    assert!(
        text.contains(&format!("{SOLO}0")),
        "the router error left the gauge up: {}",
        text.lines()
            .filter(|l| l.contains("inflight"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The local backend's cells outlive the process: a tenant that used its
/// burst before a restart has still used it after (`[limits] state_file`,
/// written at shutdown).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_a_used_burst_used() {
    let state_dir = tempfile::tempdir().unwrap();
    let path = state_dir.path().join("limits.json");
    let opts = || Options {
        config: set(
            toml::Table::new(),
            "limits.state_file",
            path.display().to_string(),
        ),
        ..Options::default()
    };
    let mut gw = Gateway::start_with(opts()).await;
    let token = gw.keys.token("throttled");
    let chat = || {
        post("/v1/chat/completions", &chat_body())
            .bearer(&token)
            .build()
    };
    for _ in 0..2 {
        assert_eq!(gw.send(&chat()).await.status, 200);
    }
    assert_eq!(gw.send(&chat()).await.code(), "rate_limit_exceeded");
    gw.terminate().await;
    assert!(path.exists(), "the state is written at shutdown");

    let gw = Gateway::start_with(opts()).await;
    let token = gw.keys.token("throttled");
    let r = gw
        .send(
            &post("/v1/chat/completions", &chat_body())
                .bearer(&token)
                .build(),
        )
        .await;
    assert_rejected(&gw, &r, 429, "rate_limit_exceeded");
    // Another tenant's cells were not carried into it.
    let acme = gw.keys.token("acme");
    let r = gw
        .send(
            &post("/v1/chat/completions", &chat_body())
                .bearer(&acme)
                .build(),
        )
        .await;
    assert_eq!(r.status, 200);
}
