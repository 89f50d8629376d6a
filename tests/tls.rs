//! TLS on the tenant side with real handshakes (curl as the client) on a
//! dev PKI from `portcullis certs dev`: protocol floor, client-certificate
//! modes, and HTTP/2 over TLS.

mod common;

use std::process::{Command, Output};

use common::*;

const CHAT: &str = "/v1/chat/completions";

/// curl against the TLS listener, trusting the dev CA; prints the status
/// line's HTTP version and code.
fn curl(gw: &Gateway, extra: &[&str], auth: &str) -> Output {
    let d = gw.dir.path();
    let url = format!("https://localhost:{}{CHAT}", gw.tls_addr.unwrap().port());
    Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
        ])
        .arg("--cacert")
        .arg(d.join("ca.crt"))
        .args(["-H", &format!("Authorization: Bearer {auth}")])
        .args(["-H", "Content-Type: application/json"])
        .args(["--data", &chat_body().to_string()])
        .args(extra)
        .arg(url)
        .output()
        .expect("curl is required (apt-get install -y curl)")
}

fn with_cert(gw: &Gateway, name: &str) -> Vec<String> {
    let d = gw.dir.path();
    vec![
        "--cert".into(),
        d.join(format!("{name}.crt")).display().to_string(),
        "--key".into(),
        d.join(format!("{name}.key")).display().to_string(),
    ]
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_client_certificates_are_enforced_in_the_handshake() {
    let gw = Gateway::start_with(Options {
        tls: Some("required"),
        ..Options::default()
    })
    .await;
    let key = gw.keys.acme_key.clone();
    // No certificate: the handshake fails, no HTTP status at all.
    let out = curl(&gw, &[], &key);
    assert!(
        !out.status.success(),
        "a required listener accepted no certificate"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "0 000");
    // A certificate from the dev CA: the request goes through.
    let cert = with_cert(&gw, "tenant-acme");
    let cert: Vec<&str> = cert.iter().map(String::as_str).collect();
    assert!(ok(&curl(&gw, &cert, &key)).ends_with(" 200"));
    // TLS below 1.2 is refused.
    let mut old = cert.clone();
    old.extend(["--tlsv1.1", "--tls-max", "1.1"]);
    assert!(
        !curl(&gw, &old, &key).status.success(),
        "TLS 1.1 was accepted"
    );
    assert_eq!(gw.router_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn optional_mode_accepts_no_certificate_but_refuses_a_bad_one() {
    let gw = Gateway::start_with(Options {
        tls: Some("optional"),
        ..Options::default()
    })
    .await;
    let key = gw.keys.acme_key.clone();
    assert!(ok(&curl(&gw, &[], &key)).ends_with(" 200"));
    // A certificate from another CA fails the handshake, even on optional.
    let other = Gateway::start_with(Options {
        tls: Some("none"),
        ..Options::default()
    })
    .await;
    let foreign = with_cert(&other, "tenant-acme");
    let foreign: Vec<&str> = foreign.iter().map(String::as_str).collect();
    let out = curl(&gw, &foreign, &key);
    assert!(
        !out.status.success(),
        "an untrusted certificate was accepted"
    );
    assert_eq!(gw.router_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_works_end_to_end_over_tls() {
    let gw = Gateway::start_with(Options {
        tls: Some("none"),
        ..Options::default()
    })
    .await;
    let token = gw.keys.token("acme");
    assert_eq!(ok(&curl(&gw, &["--http2"], &token)), "2 200");
    assert_eq!(ok(&curl(&gw, &["--http1.1"], &token)), "1.1 200");
    let rec = gw.router().requests().pop().unwrap();
    assert_eq!(rec.header("x-tenant-id"), Some("acme"));
    assert_eq!(rec.header("x-forwarded-proto"), Some("https"));
}
