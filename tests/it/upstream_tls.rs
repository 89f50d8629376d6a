//! mTLS to the router with real handshakes: the router requires the
//! gateway's client certificate, and a router certificate for the wrong
//! name is refused before anything is sent.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use crate::common::*;
use pingora::tls::ssl::{Ssl, SslAcceptor, SslFiletype, SslMethod, SslVerifyMode};
use portcullis::mock_router::{MockOptions, MockRouter};
use tokio_openssl::SslStream;

/// The mock router behind TLS that demands a client certificate from `ca`.
async fn tls_router(dir: &Path) -> (MockRouter, std::net::SocketAddr) {
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
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, r) = (acceptor.clone(), r.clone());
            tokio::spawn(async move {
                let Ok(ssl) = Ssl::new(acceptor.context()) else {
                    return;
                };
                let Ok(mut tls) = SslStream::new(ssl, tcp) else {
                    return;
                };
                if Pin::new(&mut tls).accept().await.is_ok() {
                    let _ = r.serve(tls, &MockOptions::default()).await;
                }
            });
        }
    });
    (router, addr)
}

fn upstream(dir: &Path, addr: std::net::SocketAddr, sni: &str, with_client_cert: bool) -> String {
    let client = if with_client_cert {
        format!(
            "client_cert = \"{}\"\nclient_key = \"{}\"\n",
            dir.join("gateway-client.crt").display(),
            dir.join("gateway-client.key").display()
        )
    } else {
        String::new()
    };
    format!(
        "address = \"{addr}\"\ntls = true\nsni = \"{sni}\"\nca = \"{}\"\n{client}",
        dir.join("ca.crt").display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_gets_the_gateways_client_certificate() {
    let pki_dir = tempfile::tempdir().unwrap();
    dev_pki(pki_dir.path(), &pki_dir.path().join("none.toml"));
    let (router, addr) = tls_router(pki_dir.path()).await;
    let gw = Gateway::start_with(Options {
        upstream_lines: Some(upstream(pki_dir.path(), addr, "router.internal", true)),
        ..Options::default()
    })
    .await;
    let r = gw
        .send(
            &post("/v1/chat/completions", &chat_body())
                .bearer(&gw.keys.token("acme"))
                .build(),
        )
        .await;
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
            upstream_lines: Some(upstream(pki_dir.path(), addr, sni, client_cert)),
            ..Options::default()
        })
        .await;
        let r = gw
            .send(
                &post("/v1/chat/completions", &chat_body())
                    .bearer(&gw.keys.token("acme"))
                    .build(),
            )
            .await;
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
    let mut lines = upstream(pki_dir.path(), addr, "wrong.internal", true);
    lines.push_str("verify = false\ninsecure = true\n");
    let gw = Gateway::start_with(Options {
        upstream_lines: Some(lines),
        capture_logs: true,
        ..Options::default()
    })
    .await;
    let r = gw
        .send(
            &post("/v1/chat/completions", &chat_body())
                .bearer(&gw.keys.token("acme"))
                .build(),
        )
        .await;
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
