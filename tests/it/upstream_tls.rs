//! mTLS to the router with real handshakes: the router requires the
//! gateway's client certificate, and a router certificate for the wrong
//! name is refused before anything is sent.

use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use pingora::tls::ssl::{Ssl, SslAcceptor, SslFiletype, SslMethod, SslVerifyMode};
use portcullis::mock_router::{MockOptions, MockRouter};
use tokio_openssl::SslStream;

/// Handshakes the TLS router saw, by outcome.
#[derive(Default)]
struct Handshakes {
    ok: AtomicUsize,
    failed: AtomicUsize,
}

/// The mock router behind TLS that demands a client certificate from `ca`.
async fn tls_router(dir: &Path) -> (MockRouter, std::net::SocketAddr) {
    let (router, addr, _) = counting_tls_router(dir).await;
    (router, addr)
}

/// The same, counting its handshakes: a client that connects and leaves
/// without one (or fails it) is a failed handshake, as a router's log
/// would show it.
async fn counting_tls_router(dir: &Path) -> (MockRouter, std::net::SocketAddr, Arc<Handshakes>) {
    let router = MockRouter::start("127.0.0.1:0", MockOptions::default())
        .await
        .unwrap();
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).unwrap();
    b.set_certificate_chain_file(dir.join("router.crt"))
        .unwrap();
    b.set_private_key_file(dir.join("router.key"), SslFiletype::PEM)
        .unwrap();
    b.set_ca_file(dir.join("ca.crt")).unwrap();
    b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
    let acceptor = Arc::new(b.build());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let r = router.clone();
    let counts = Arc::new(Handshakes::default());
    let c = counts.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, r, c) = (acceptor.clone(), r.clone(), c.clone());
            tokio::spawn(async move {
                let Ok(ssl) = Ssl::new(acceptor.context()) else {
                    return;
                };
                let Ok(mut tls) = SslStream::new(ssl, tcp) else {
                    return;
                };
                if Pin::new(&mut tls).accept().await.is_ok() {
                    c.ok.fetch_add(1, Ordering::SeqCst);
                    let _ = r.serve(tls, &MockOptions::default()).await;
                } else {
                    c.failed.fetch_add(1, Ordering::SeqCst);
                }
            });
        }
    });
    (router, addr, counts)
}

/// `[upstream]` over TLS to `addr` as `sni`, trusting the dev CA, with or
/// without the gateway's client certificate.
fn upstream(
    dir: &Path,
    addr: std::net::SocketAddr,
    sni: &str,
    with_client_cert: bool,
) -> toml::Table {
    let file = |name: &str| dir.join(name).display().to_string();
    let mut t = toml::toml! {
        [upstream]
        tls = true
    };
    t = set(t, "upstream.address", addr.to_string());
    t = set(t, "upstream.sni", sni);
    t = set(t, "upstream.ca", file("ca.crt"));
    if with_client_cert {
        t = set(t, "upstream.client_cert", file("gateway-client.crt"));
        t = set(t, "upstream.client_key", file("gateway-client.key"));
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_gets_the_gateways_client_certificate() {
    let pki_dir = tempfile::tempdir().unwrap();
    dev_pki(pki_dir.path(), &pki_dir.path().join("none.toml"));
    let (router, addr) = tls_router(pki_dir.path()).await;
    let gw = Gateway::start_with(Options {
        config: upstream(pki_dir.path(), addr, "router.internal", true),
        ..Options::default()
    })
    .await;
    let r = chat_as_acme(&gw).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let rec = router
        .requests()
        .pop()
        .expect("the router got the request over mTLS");
    assert_eq!(rec.header("x-tenant-id"), Some("acme"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_without_our_client_certificate_or_with_the_wrong_name_gets_nothing() {
    let pki_dir = tempfile::tempdir().unwrap();
    dev_pki(pki_dir.path(), &pki_dir.path().join("none.toml"));
    let (router, addr) = tls_router(pki_dir.path()).await;
    for (sni, client_cert) in [("wrong.internal", true), ("router.internal", false)] {
        let gw = Gateway::start_with(Options {
            config: upstream(pki_dir.path(), addr, sni, client_cert),
            ..Options::default()
        })
        .await;
        let r = chat_as_acme(&gw).await;
        assert_eq!(
            (r.status, r.code()),
            (502, "upstream_unavailable".to_string()),
            "sni {sni}, client cert {client_cert}"
        );
    }
    assert_eq!(router.connections(), 0, "bytes reached the router");
    assert!(router.requests().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_insecure_router_works_but_is_announced() {
    let pki_dir = tempfile::tempdir().unwrap();
    dev_pki(pki_dir.path(), &pki_dir.path().join("none.toml"));
    let (router, addr) = tls_router(pki_dir.path()).await;
    // A router name that would fail verification: with verification off
    // (and acknowledged), the request goes through.
    let lines = set(
        set(
            upstream(pki_dir.path(), addr, "wrong.internal", true),
            "upstream.verify",
            false,
        ),
        "upstream.insecure",
        true,
    );
    let gw = Gateway::start_with(Options {
        config: lines,
        capture_logs: true,
        ..Options::default()
    })
    .await;
    let r = chat_as_acme(&gw).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(router.requests().len(), 1);
    let metrics = send(gw.admin, &get("/metrics").build()).await.unwrap();
    assert!(String::from_utf8_lossy(&metrics.body).contains("portcullis_upstream_insecure 1"));
    let log = std::fs::read_to_string(gw.dir.path().join("gateway.log")).unwrap();
    let warning = log
        .lines()
        .find(|l| l.contains("\"insecure\":true"))
        .expect("no insecure warning in the log");
    assert!(
        warning.contains("\"level\":\"WARN\"") && warning.contains("NOT verified"),
        "{warning}"
    );
}

/// A chat request as tenant acme.
async fn chat_as_acme(gw: &Gateway) -> Response {
    gw.send(
        &post("/v1/chat/completions", &chat_body())
            .bearer(&gw.keys.token("acme"))
            .build(),
    )
    .await
}

/// Whether the gateway's admin listener reports a healthy router.
async fn ready(gw: &Gateway) -> bool {
    send(gw.admin, &get("/readyz").build())
        .await
        .unwrap()
        .status
        == 200
}

/// A gateway in front of a counting TLS router, health-checking it every
/// 100 ms, with or without the client certificate the router demands.
async fn checked_every_100ms(
    with_client_cert: bool,
) -> (tempfile::TempDir, MockRouter, Arc<Handshakes>, Gateway) {
    let pki_dir = tempfile::tempdir().unwrap();
    dev_pki(pki_dir.path(), &pki_dir.path().join("none.toml"));
    let (router, addr, handshakes) = counting_tls_router(pki_dir.path()).await;
    let lines = set(
        upstream(pki_dir.path(), addr, "router.internal", with_client_cert),
        "upstream.health_check_interval_ms",
        100,
    );
    let gw = Gateway::start_with(Options {
        config: lines,
        ..Options::default()
    })
    .await;
    (pki_dir, router, handshakes, gw)
}

/// Health checks reach a TLS router the way requests do: a whole mTLS
/// handshake every interval, never a bare TCP connect that the router logs
/// as a failed handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_of_a_tls_router_complete_their_handshakes() {
    let (_pki, router, handshakes, gw) = checked_every_100ms(true).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let ok = handshakes.ok.load(Ordering::SeqCst);
    assert_eq!(
        handshakes.failed.load(Ordering::SeqCst),
        0,
        "health checks left failed handshakes ({ok} succeeded)"
    );
    assert!(ok >= 4, "only {ok} health-check handshakes in 800 ms");
    assert!(ready(&gw).await);
    assert!(
        router.requests().is_empty(),
        "a health check sent a request"
    );
    let r = chat_as_acme(&gw).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
}

/// A replica whose handshake fails (here the gateway has no client
/// certificate for it) is marked down: not ready, and requests get 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_that_fails_the_handshake_is_marked_down() {
    let (_pki, router, handshakes, gw) = checked_every_100ms(false).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while ready(&gw).await {
        assert!(
            std::time::Instant::now() < deadline,
            "a router refusing our handshake is still reported healthy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(handshakes.failed.load(Ordering::SeqCst) >= 1);
    let r = chat_as_acme(&gw).await;
    assert_eq!(
        (r.status, r.code()),
        (502, "upstream_unavailable".to_string())
    );
    assert!(router.requests().is_empty());
    assert_eq!(handshakes.ok.load(Ordering::SeqCst), 0);
}

/// With `health_check_path`, each check is an HTTP GET over the same
/// mTLS connection setup, and only a 200 keeps the replica up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_health_check_gets_the_path_over_mtls_and_needs_a_200() {
    let pki_dir = tempfile::tempdir().unwrap();
    dev_pki(pki_dir.path(), &pki_dir.path().join("none.toml"));
    for (path, healthy) in [("/healthz", true), ("/missing", false)] {
        let (router, addr, handshakes) = counting_tls_router(pki_dir.path()).await;
        let lines = set(
            set(
                upstream(pki_dir.path(), addr, "router.internal", true),
                "upstream.health_check_interval_ms",
                100,
            ),
            "upstream.health_check_path",
            path,
        );
        let gw = Gateway::start_with(Options {
            config: lines,
            ..Options::default()
        })
        .await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(ready(&gw).await, healthy, "{path}");
        let checks = router.requests();
        assert!(checks.len() >= 3, "{} checks of {path}", checks.len());
        assert!(checks.iter().all(|r| r.method == "GET"
            && r.path == path
            && r.header("host") == Some("router.internal")
            && r.header("x-tenant-id").is_none()));
        // Read before the gateway stops: killing it mid-check is no
        // failure of the check.
        assert_eq!(handshakes.failed.load(Ordering::SeqCst), 0, "{path}");
    }
}
