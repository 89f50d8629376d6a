//! JWKS from a URL: background refresh, rotation, bounded refresh on
//! unknown `kid`s, and the last good key set kept when the IdP fails.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use portcullis::dev::DevJwtKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A tiny IdP: serves whatever `body` holds with status `status`, counting fetches.
struct Idp {
    addr: SocketAddr,
    fetches: Arc<AtomicUsize>,
    answer: Arc<Mutex<(u16, String)>>,
}

impl Idp {
    async fn start(body: String) -> Idp {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let idp = Idp {
            addr: listener.local_addr().unwrap(),
            fetches: Arc::default(),
            answer: Arc::new(Mutex::new((200, body))),
        };
        let (fetches, answer) = (idp.fetches.clone(), idp.answer.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let (fetches, answer) = (fetches.clone(), answer.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    fetches.fetch_add(1, Ordering::SeqCst);
                    let (status, body) = answer.lock().unwrap().clone();
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        idp
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }

    fn serve(&self, status: u16, body: String) {
        *self.answer.lock().unwrap() = (status, body);
    }
}

async fn status_of(gw: &Gateway, token: &str) -> u16 {
    gw.send(
        &post("/v1/chat/completions", &chat_body())
            .bearer(token)
            .build(),
    )
    .await
    .status
}

/// Retries until `token` is accepted, for at most `within`.
async fn accepted_within(gw: &Gateway, token: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if status_of(gw, token).await == 200 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_from_a_url_rotate_and_survive_idp_failure() {
    let keys = Keys::generate();
    let idp = Idp::start(keys.jwks.to_string()).await;
    let gw = Gateway::start_with(Options {
        keys: Some(keys),
        jwks_url: Some(format!("http://{}/jwks.json", idp.addr)),
        // This test fails authentication on purpose, many times.
        config: toml::toml! {
            [auth.jwt]
            jwks_refresh_seconds = 300
            jwks_unknown_kid_refresh_seconds = 1

            [limits]
            auth_failures_per_ip_per_minute = 100000
        },
        ..Options::default()
    })
    .await;
    let acme = gw.keys.token("acme");
    assert!(
        accepted_within(&gw, &acme, Duration::from_secs(5)).await,
        "initial fetch"
    );
    assert_eq!(idp.fetches(), 1);

    // A flood of unknown kids: every one refused, the IdP barely touched.
    let rotated = DevJwtKey::generate("rot-1").unwrap();
    let rot_token = encode(
        &{
            let mut h = Header::new(Algorithm::EdDSA);
            h.kid = Some("rot-1".into());
            h
        },
        &gw.keys.claims("acme"),
        &EncodingKey::from_ed_pem(rotated.private_pem.as_bytes()).unwrap(),
    )
    .unwrap();
    let flood_start = Instant::now();
    let routed = gw.router_count();
    for _ in 0..50 {
        let r = gw
            .send(
                &post("/v1/chat/completions", &chat_body())
                    .bearer(&rot_token)
                    .build(),
            )
            .await;
        assert_eq!((r.status, r.code()), (401, "invalid_token".to_string()));
    }
    assert_eq!(
        gw.router_count(),
        routed,
        "a refused request reached the router"
    );
    let flood_secs = flood_start.elapsed().as_secs() as usize;
    assert!(
        idp.fetches() <= 2 + flood_secs,
        "{} fetches for 50 unknown kids in {flood_secs}s",
        idp.fetches()
    );

    // Rotation: the IdP publishes the new key; it is picked up on demand.
    let mut rotated_set = gw.keys.jwks.clone();
    rotated_set["keys"]
        .as_array_mut()
        .unwrap()
        .push(rotated.jwks["keys"][0].clone());
    idp.serve(200, rotated_set.to_string());
    assert!(
        accepted_within(&gw, &rot_token, Duration::from_secs(5)).await,
        "rotated key"
    );

    // The IdP breaks: the last good key set stays in force.
    let before = idp.fetches();
    idp.serve(500, "oops".into());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let unknown = gw
        .keys
        .sign(Algorithm::RS256, Some("missing"), &gw.keys.claims("acme"));
    assert_eq!(status_of(&gw, &unknown).await, 401);
    let deadline = Instant::now() + Duration::from_secs(5);
    while idp.fetches() == before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(idp.fetches() > before, "the unknown kid prompted a refresh");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(status_of(&gw, &rot_token).await, 200);
    assert_eq!(status_of(&gw, &acme).await, 200);

    idp.serve(200, "{\"not\": \"a jwks\"}".into());
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let before = idp.fetches();
    assert_eq!(status_of(&gw, &unknown).await, 401);
    let deadline = Instant::now() + Duration::from_secs(5);
    while idp.fetches() == before && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        status_of(&gw, &rot_token).await,
        200,
        "an invalid JWKS replaced good keys"
    );
}

/// The JWKS refresh task starts with the process: a reload that points
/// `jwks_url` elsewhere keeps the running task and its keys (tokens go on
/// verifying) and reports a restart as needed, rather than swapping in an
/// empty key set that nothing would ever fill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_jwks_url_keeps_the_running_keys_and_asks_for_a_restart() {
    let keys = Keys::generate();
    let idp = Idp::start(keys.jwks.to_string()).await;
    let other = Idp::start(keys.jwks.to_string()).await;
    let gw = Gateway::start_with(Options {
        keys: Some(keys),
        jwks_url: Some(format!("http://{}/jwks.json", idp.addr)),
        ..Options::default()
    })
    .await;
    let acme = gw.keys.token("acme");
    assert!(accepted_within(&gw, &acme, Duration::from_secs(5)).await);
    let path = gw.dir.path().join("gateway.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    replace_file(
        &path,
        &text.replace(&idp.addr.to_string(), &other.addr.to_string()),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = send(gw.admin, &get("/readyz").build()).await.unwrap();
        let body = String::from_utf8_lossy(&r.body).to_string();
        if body.contains("restart needed: [auth.jwt] jwks_url") {
            break;
        }
        assert!(Instant::now() < deadline, "no restart flagged: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        status_of(&gw, &acme).await,
        200,
        "the reload dropped the keys"
    );
    assert_eq!(other.fetches(), 0);
}
