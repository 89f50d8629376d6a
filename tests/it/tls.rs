//! TLS on the tenant side with real handshakes (curl as the client) on a
//! dev PKI from `portcullis certs dev`: protocol floor, client-certificate
//! modes and checks (expiry, usage, revocation), HTTP/2 over TLS, rotation.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::*;
use rcgen::{
    CertificateParams, CertificateRevocationListParams, DnType, ExtendedKeyUsagePurpose, Issuer,
    KeyIdMethod, KeyPair, RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use time::OffsetDateTime;

const CHAT: &str = "/v1/chat/completions";

/// curl against the TLS listener, trusting the dev CA; prints the status
/// line's HTTP version and code. An empty `auth` sends no credential.
fn curl(gw: &Gateway, extra: &[&str], auth: &str) -> Output {
    let d = gw.dir.path();
    let url = format!("https://localhost:{}{CHAT}", gw.tls_addr.unwrap().port());
    // An empty `auth` sends no credential at all.
    let header = if auth.is_empty() {
        "X-No-Credential: 1".to_string()
    } else {
        format!("Authorization: Bearer {auth}")
    };
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
        .args(["-H", &header])
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

/// A request that must succeed: its `%{http_version} %{http_code}`. A
/// handshake error (curl exit 35) is retried once, as clients do; one was
/// seen once in ~35 runs (an OpenSSL "asn1 EVP lib" error on the client)
/// and is not understood yet, so it is retried rather than hidden: a second
/// failure still fails the test.
fn curl_ok(gw: &Gateway, extra: &[&str], auth: &str) -> String {
    let mut out = curl(gw, extra, auth);
    if out.status.code() == Some(35) {
        eprintln!(
            "retrying a TLS handshake error: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out = curl(gw, extra, auth);
    }
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
    assert!(curl_ok(&gw, &cert, &key).ends_with(" 200"));
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
    assert!(curl_ok(&gw, &[], &key).ends_with(" 200"));
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
    assert_eq!(curl_ok(&gw, &["--http2"], &token), "2 200");
    assert_eq!(curl_ok(&gw, &["--http1.1"], &token), "1.1 200");
    let rec = gw.router().requests().pop().unwrap();
    assert_eq!(rec.header("x-tenant-id"), Some("acme"));
    assert_eq!(rec.header("x-forwarded-proto"), Some("https"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_is_a_tenant_identity() {
    let gw = Gateway::start_with(Options {
        tls: Some("required"),
        ..Options::default()
    })
    .await;
    let acme = with_cert(&gw, "tenant-acme");
    let acme: Vec<&str> = acme.iter().map(String::as_str).collect();
    // The certificate alone authenticates acme (SAN URI spiffe://tenants/acme).
    let got = curl_ok(&gw, &acme, "");
    assert!(got.ends_with(" 200"), "{got}");
    let rec = gw.router().requests().pop().unwrap();
    assert_eq!(rec.header("x-tenant-id"), Some("acme"));
    // Certificate and credential agree: fine.
    assert!(curl_ok(&gw, &acme, &gw.keys.token("acme")).ends_with(" 200"));
    // They disagree: 403 identity_mismatch, nothing forwarded.
    let before = gw.router_count();
    assert!(curl_ok(&gw, &acme, &gw.keys.token("globex")).ends_with(" 403"));
    // A verified certificate that names no tenant, on a required listener.
    let unknown = with_cert(&gw, "gateway-client");
    let unknown: Vec<&str> = unknown.iter().map(String::as_str).collect();
    assert!(curl_ok(&gw, &unknown, "").ends_with(" 403"));
    assert!(curl_ok(&gw, &unknown, &gw.keys.token("acme")).ends_with(" 403"));
    assert_eq!(gw.router_count(), before, "a refused request was forwarded");
}

/// How long a test waits for a reload to take effect. A reload is quick
/// alone, but on a loaded two-core CI machine (every test's gateway at
/// once) it can take longer than the 3 s these tests once allowed, which
/// is the likeliest cause of the CRL test's occasional failures.
const RELOAD_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// A request with explicit trust and client files: `(http_code, curl ok)`.
fn curl_files(gw: &Gateway, ca: &Path, cert: &Path) -> (String, bool) {
    let key = cert.with_extension("key");
    let url = format!("https://localhost:{}{CHAT}", gw.tls_addr.unwrap().port());
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg("--cacert")
        .arg(ca)
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .args([
            "-H",
            "Content-Type: application/json",
            "--data",
            &chat_body().to_string(),
        ])
        .arg(url)
        .output()
        .expect("curl");
    (
        String::from_utf8_lossy(&out.stdout).to_string(),
        out.status.success(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_certificates_and_client_ca_apply_to_new_connections() {
    let gw = Gateway::start_with(Options {
        tls: Some("required"),
        ..Options::default()
    })
    .await;
    let d = gw.dir.path();
    // Keep the first PKI aside, and make a second one.
    let old = tempfile::tempdir().unwrap();
    for f in ["ca.crt", "tenant-acme.crt", "tenant-acme.key"] {
        std::fs::copy(d.join(f), old.path().join(f)).unwrap();
    }
    let new = tempfile::tempdir().unwrap();
    dev_pki(new.path(), &d.join("tenants.toml"));
    let (old_ca, old_acme) = (
        old.path().join("ca.crt"),
        old.path().join("tenant-acme.crt"),
    );
    let (new_ca, new_acme) = (
        new.path().join("ca.crt"),
        new.path().join("tenant-acme.crt"),
    );
    assert_eq!(curl_files(&gw, &old_ca, &old_acme), ("200".into(), true));

    // Rotate the server certificate, its key and the client CA, by rename.
    for f in ["gateway.key", "gateway.crt", "ca.crt"] {
        std::fs::copy(new.path().join(f), d.join(format!("{f}.new"))).unwrap();
        std::fs::rename(d.join(format!("{f}.new")), d.join(f)).unwrap();
    }
    let deadline = std::time::Instant::now() + RELOAD_WAIT;
    while curl_files(&gw, &new_ca, &new_acme) != ("200".into(), true) {
        assert!(
            std::time::Instant::now() < deadline,
            "the new certificates never took effect"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The old server certificate is gone, and the old client CA no longer trusted.
    assert!(
        !curl_files(&gw, &old_ca, &old_acme).1,
        "still serving the old certificate"
    );
    assert!(
        !curl_files(&gw, &new_ca, &old_acme).1,
        "a client certificate from the old CA was accepted"
    );
}

/// Issues a client certificate for acme (`spiffe://tenants/acme`) from the
/// gateway's dev CA into `<name>.crt` and `<name>.key` in `dir`.
fn issue(
    dir: &Path,
    name: &str,
    serial: u64,
    usage: ExtendedKeyUsagePurpose,
    valid: std::ops::Range<OffsetDateTime>,
) -> PathBuf {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, "acme");
    params
        .subject_alt_names
        .push(SanType::URI("spiffe://tenants/acme".try_into().unwrap()));
    params.extended_key_usages = vec![usage];
    params.serial_number = Some(SerialNumber::from(serial));
    params.not_before = valid.start;
    params.not_after = valid.end;
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &dev_ca(dir)).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    let crt = dir.join(format!("{name}.crt"));
    std::fs::write(&crt, cert.pem()).unwrap();
    crt
}

/// The dev CA that `portcullis certs dev` wrote into `dir`.
fn dev_ca(dir: &Path) -> Issuer<'static, KeyPair> {
    let pem = std::fs::read_to_string(dir.join("ca.crt")).unwrap();
    let key = KeyPair::from_pem(&std::fs::read_to_string(dir.join("ca.key")).unwrap()).unwrap();
    Issuer::from_ca_cert_pem(&pem, key).unwrap()
}

/// Replaces `ca.crl` in `dir`, by rename, with a CRL revoking `serials`.
fn publish_crl(dir: &Path, number: u64, serials: &[u64]) {
    let now = OffsetDateTime::now_utc();
    let crl = CertificateRevocationListParams {
        this_update: now,
        next_update: now + time::Duration::days(1),
        crl_number: SerialNumber::from(number),
        issuing_distribution_point: None,
        revoked_certs: serials
            .iter()
            .map(|s| RevokedCertParams {
                serial_number: SerialNumber::from(*s),
                revocation_time: now,
                reason_code: Some(RevocationReason::KeyCompromise),
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    }
    .signed_by(&dev_ca(dir))
    .unwrap();
    std::fs::write(dir.join("ca.crl.new"), crl.pem().unwrap()).unwrap();
    std::fs::rename(dir.join("ca.crl.new"), dir.join("ca.crl")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_server_only_and_revoked_client_certificates_fail_the_handshake() {
    let gw = Gateway::start_with(Options {
        tls: Some("required"),
        config: toml::toml! {
            [server.tls]
            crl = "ca.crl"
        },
        ..Options::default()
    })
    .await;
    let d = gw.dir.path();
    let ca = d.join("ca.crt");
    let now = OffsetDateTime::now_utc();
    let year = time::Duration::days(365);
    let client = ExtendedKeyUsagePurpose::ClientAuth;
    let good = issue(d, "good", 1001, client.clone(), now - year..now + year);
    let expired = issue(
        d,
        "expired",
        1002,
        client.clone(),
        now - 2 * year..now - year,
    );
    let server_only = issue(
        d,
        "server-only",
        1003,
        ExtendedKeyUsagePurpose::ServerAuth,
        now - year..now + year,
    );
    let doomed = issue(d, "doomed", 1004, client, now - year..now + year);

    // The dev CA's empty CRL: the valid certificates pass.
    assert_eq!(curl_files(&gw, &ca, &good), ("200".into(), true));
    assert_eq!(curl_files(&gw, &ca, &doomed), ("200".into(), true));
    for (what, cert) in [
        ("an expired", &expired),
        ("a serverAuth-only", &server_only),
    ] {
        assert_eq!(
            curl_files(&gw, &ca, cert),
            ("000".into(), false),
            "{what} certificate was accepted"
        );
    }
    assert_eq!(gw.router_count(), 2);

    // Revoke one: new connections with it fail once the new CRL is read.
    publish_crl(d, 2, &[1004]);
    let deadline = std::time::Instant::now() + RELOAD_WAIT;
    while curl_files(&gw, &ca, &doomed).1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the revoked certificate is still accepted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(curl_files(&gw, &ca, &doomed), ("000".into(), false));
    assert_eq!(curl_files(&gw, &ca, &good), ("200".into(), true));
}

/// A client certificate for acme from a CA the gateway never heard of.
fn foreign(dir: &Path) -> PathBuf {
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(DnType::CommonName, "Dev CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&ca_cert.pem(), ca_key).unwrap();
    let mut leaf = CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.distinguished_name.push(DnType::CommonName, "acme");
    leaf.subject_alt_names
        .push(SanType::URI("spiffe://tenants/acme".try_into().unwrap()));
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = KeyPair::generate().unwrap();
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("foreign.key"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("foreign.crt"), cert.pem()).unwrap();
    dir.join("foreign.crt")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tls_clients_are_refused_in_the_handshake_and_reach_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let gw = Gateway::start_with(Options {
        tls: Some("required"),
        ..Options::default()
    })
    .await;
    let d = gw.dir.path();
    let key = gw.keys.acme_key.clone();
    let now = OffsetDateTime::now_utc();
    let year = time::Duration::days(365);
    let client = ExtendedKeyUsagePurpose::ClientAuth;
    let files = |p: PathBuf| {
        vec![
            "--cert".to_string(),
            p.display().to_string(),
            "--key".to_string(),
            p.with_extension("key").display().to_string(),
        ]
    };
    let good = files(d.join("tenant-acme.crt"));
    let with = |extra: &[&str]| {
        let mut v = good.clone();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    // Each protocol and suite below is one the client can negotiate (old
    // ones at SECLEVEL=0), so only the gateway can refuse.
    let old = "DEFAULT@SECLEVEL=0";
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("no client certificate", vec![]),
        (
            "TLS 1.0",
            with(&["--tlsv1.0", "--tls-max", "1.0", "--ciphers", old]),
        ),
        (
            "TLS 1.1",
            with(&["--tlsv1.1", "--tls-max", "1.1", "--ciphers", old]),
        ),
        (
            "TLS 1.2 with a static-RSA CBC suite only",
            with(&["--tls-max", "1.2", "--ciphers", "AES128-SHA"]),
        ),
        (
            "TLS 1.2 with a static-RSA GCM suite only (no forward secrecy)",
            with(&["--tls-max", "1.2", "--ciphers", "AES128-GCM-SHA256"]),
        ),
        ("a certificate from a foreign CA", files(foreign(d))),
        (
            "an expired certificate",
            files(issue(
                d,
                "expired",
                2001,
                client.clone(),
                now - 2 * year..now - year,
            )),
        ),
        (
            "a certificate not yet valid",
            files(issue(
                d,
                "early",
                2002,
                client.clone(),
                now + year..now + 2 * year,
            )),
        ),
        (
            "a serverAuth-only certificate",
            files(issue(
                d,
                "server-only",
                2003,
                ExtendedKeyUsagePurpose::ServerAuth,
                now - year..now + year,
            )),
        ),
    ];
    let mut wrong = Vec::new();
    for (what, extra) in &cases {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let out = curl(&gw, &extra, &key);
        let printed = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() || printed != "0 000" {
            wrong.push(format!("{what}: accepted ({printed})"));
        }
    }

    // Not TLS at all on the TLS port: plaintext HTTP, an SSLv2 hello,
    // noise. The connection closes without an HTTP answer.
    let plaintext = format!("GET /v1/models HTTP/1.1\r\nHost: gw\r\nx-api-key: {key}\r\n\r\n");
    let sslv2_hello: &[u8] = &[
        0x80, 0x2e, 0x01, 0x00, 0x02, 0x00, 0x15, 0x00, 0x00, 0x00, 0x10, 0x07, 0x00, 0xc0, 0x05,
        0x00, 0x80, 0x03, 0x00, 0x80, 0x01, 0x00, 0x80, 0x06, 0x00, 0x40, 0x04, 0x00, 0x80, 0x02,
        0x00, 0x80, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16,
        0x17, 0x18, 0x19,
    ];
    let mut truncated_hello = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01];
    truncated_hello.extend(std::iter::repeat_n(0x41, 64));
    truncated_hello.extend(b"\r\n\r\n");
    for (what, raw) in [
        ("plaintext HTTP", plaintext.as_bytes()),
        ("an SSLv2 hello", sslv2_hello),
        (
            "a hello claiming 16 KiB then nonsense",
            &truncated_hello[..],
        ),
        ("noise", &[0u8; 300][..]),
    ] {
        let mut s = tokio::net::TcpStream::connect(gw.tls_addr.unwrap())
            .await
            .unwrap();
        let _ = s.write_all(raw).await;
        let _ = s.shutdown().await;
        let mut got = Vec::new();
        let read =
            tokio::time::timeout(std::time::Duration::from_secs(65), s.read_to_end(&mut got)).await;
        if read.is_err() || got.starts_with(b"HTTP/") {
            wrong.push(format!("{what}: {:?}", String::from_utf8_lossy(&got)));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(gw.router_count(), 0, "a refused client reached the router");

    // The control: the same client with its valid certificate gets through.
    let good: Vec<&str> = good.iter().map(String::as_str).collect();
    assert!(curl_ok(&gw, &good, &key).ends_with(" 200"));
    assert_eq!(gw.router_count(), 1);
}
