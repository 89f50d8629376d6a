//! Router replicas: round-robin across healthy ones, dead ones skipped by
//! health checks, readiness that follows the routers.

use std::time::Duration;

use crate::common::*;
use portcullis::mock_router::{MockOptions, MockRouter};

/// `[upstream]` with these replicas, health-checked every 100 ms.
fn replicas(addresses: &[String]) -> toml::Table {
    let t = toml::toml! {
        [upstream]
        health_check_interval_ms = 100
    };
    set(t, "upstream.address", addresses.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_spread_over_healthy_replicas_only() {
    let a = MockRouter::start("127.0.0.1:0", MockOptions::default())
        .await
        .unwrap();
    let b = MockRouter::start("127.0.0.1:0", MockOptions::default())
        .await
        .unwrap();
    let dead = format!("127.0.0.1:{}", free_port());
    let gw = Gateway::start_with(Options {
        config: replicas(&[a.addr().to_string(), b.addr().to_string(), dead]),
        ..Options::default()
    })
    .await;
    // Let the first health checks mark the dead replica down.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let token = gw.keys.token("acme");
    for i in 0..20 {
        let r = gw
            .send(
                &post("/v1/chat/completions", &chat_body())
                    .bearer(&token)
                    .build(),
            )
            .await;
        assert_eq!(
            r.status,
            200,
            "request {i}: {}",
            String::from_utf8_lossy(&r.body)
        );
    }
    let (na, nb) = (a.requests().len(), b.requests().len());
    assert_eq!(na + nb, 20);
    assert!(na >= 5 && nb >= 5, "unbalanced: {na} vs {nb}");
    let ready = send(gw.admin, &get("/readyz").build()).await.unwrap();
    assert_eq!(ready.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_healthy_router_means_not_ready_and_502() {
    let gw = Gateway::start_with(Options {
        config: replicas(&[
            format!("127.0.0.1:{}", free_port()),
            format!("127.0.0.1:{}", free_port()),
        ]),
        ..Options::default()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let ready = send(gw.admin, &get("/readyz").build()).await.unwrap();
    assert_eq!(ready.status, 503);
    let r = gw
        .send(
            &post("/v1/chat/completions", &chat_body())
                .bearer(&gw.keys.token("acme"))
                .build(),
        )
        .await;
    assert_eq!(
        (r.status, r.code()),
        (502, "upstream_unavailable".to_string())
    );
    let health = send(gw.admin, &get("/healthz").build()).await.unwrap();
    assert_eq!(
        health.status, 200,
        "liveness does not depend on the routers"
    );
}
