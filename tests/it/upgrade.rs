//! Zero-downtime binary upgrade with Pingora's socket handoff: a daemonised
//! gateway under continuous load (new connections and keep-alive) is
//! replaced by a new process with `-u`; no request may fail.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use portcullis::limits::state;
use portcullis::mock_router::{MockOptions, MockRouter};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CHAT: &str = "/v1/chat/completions";

fn pid(dir: &Path) -> Option<i32> {
    std::fs::read_to_string(dir.join("portcullis.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn alive(pid: i32) -> bool {
    Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn signal(pid: i32, sig: &str) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

/// Stops the daemons the pid files name when the test ends.
struct Daemons<'a>(&'a Path);

impl Drop for Daemons<'_> {
    fn drop(&mut self) {
        for file in ["portcullis.pid", "portcullis.pid.old"] {
            let p = std::fs::read_to_string(self.0.join(file))
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok());
            if let Some(p) = p {
                signal(p, "-KILL");
            }
        }
    }
}

fn serve_daemon(conf: &Path, upgrade: bool) {
    let mut args = vec!["serve", "-d"];
    if upgrade {
        args.push("-u");
    }
    // The daemon must not inherit the test's output: a pipe held open by a
    // surviving daemon would keep the test runner's reader waiting.
    let status = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(&args)
        .arg("-c")
        .arg(conf)
        .env("PORTCULLIS_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run portcullis");
    assert!(status.success(), "portcullis {args:?} failed to start");
}

/// A daemon's config: `threads = 2`, a short grace period, `extra` last.
fn gateway_toml(addr: &str, router: std::net::SocketAddr, extra: &str) -> String {
    format!(
        r#"[server]
listen = ["{addr}"]
threads = 2
region = "us-east-1"
grace_period_seconds = 1
graceful_shutdown_timeout_seconds = 2
pid_file = "portcullis.pid"
upgrade_sock = "upgrade.sock"

[upstream]
address = "{router}"

[auth.jwt]
issuer = "{ISSUER}"
audiences = ["{AUDIENCE}"]
jwks_file = "jwks.json"

[policy]
tenants = "tenants.toml"

[context]
signing_key_file = "context.key"
{extra}
"#
    )
}

/// A daemon's files in `d`: the JWKS, context key, tenants and config.
fn write_daemon_dir(d: &Path, keys: &Keys, tenants: &str, config: &str) {
    std::fs::write(d.join("jwks.json"), keys.jwks.to_string()).unwrap();
    std::fs::write(d.join("tenants.toml"), tenants).unwrap();
    std::fs::write(d.join("context.key"), hex::encode(&keys.context_key)).unwrap();
    std::fs::write(d.join("gateway.toml"), config).unwrap();
}

/// Starts a daemon in `d` and waits until it answers on `addr`.
async fn start_daemon(d: &Path, addr: &str) {
    serve_daemon(&d.join("gateway.toml"), false);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid(d).is_none() || TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "the daemon did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What deploy/upgrade.sh does; returns the old and the new pid once the
/// new process has the sockets (the old one still drains).
async fn begin_upgrade(d: &Path) -> (i32, i32) {
    let old = pid(d).expect("a running daemon");
    signal(old, "-QUIT");
    serve_daemon(&d.join("gateway.toml"), true);
    let started = Instant::now();
    loop {
        match pid(d) {
            Some(p) if p != old => return (old, p),
            _ => {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "the new process did not take over"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

async fn wait_gone(pid: i32) {
    let started = Instant::now();
    while alive(pid) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the old process lingered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One request on a kept-alive connection; its status.
async fn on_connection(c: &mut TcpStream, req: &[u8]) -> u16 {
    let req = String::from_utf8_lossy(req).replace("Connection: close", "Connection: keep-alive");
    c.write_all(req.as_bytes()).await.unwrap();
    read_keep_alive(c).await.expect("an answer").0
}

/// Every limit cell crosses a zero-downtime upgrade: what remained just
/// before it is what remains just after, up to the refill in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_hands_every_limit_cell_to_the_new_process() {
    let keys = Keys::generate();
    let router = MockRouter::start("127.0.0.1:0", MockOptions::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let addr = format!("127.0.0.1:{}", free_port());
    let state = d.join("limits.json");
    let extra = format!("[limits]\nstate_file = \"{}\"\n", state.display());
    let config = gateway_toml(&addr, router.addr(), &extra);
    write_daemon_dir(d, &keys, &tenants_toml(&keys), &config);
    let _cleanup = Daemons(d);
    start_daemon(d, &addr).await;
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let call = |req: Vec<u8>| async move { send(addr, &req).await.unwrap() };
    let chat = |key: &str| {
        post(
            CHAT,
            &json!({"model": "m-small", "max_tokens": 10,
                           "messages": [{"role": "user", "content": "Hello"}]}),
        )
        .header("x-api-key", key)
        .build()
    };
    let quota = |key: &str| get("/v1/quota").header("x-api-key", key).build();
    let figures = |q: &Response| {
        let q = q.json();
        let key = &q["scopes"][0]["limits"];
        let tenant = &q["scopes"].as_array().unwrap().last().unwrap()["limits"];
        (
            key["requests"]["remaining"].as_u64().unwrap(),
            key["tokens_per_day"]["remaining"].as_u64().unwrap(),
            tenant["tokens_per_day"]["remaining"].as_u64().unwrap(),
        )
    };
    // Before: one of `throttled`'s burst of 2, a completion each for the
    // key `capped` (a day's tokens of its own) and for `budgeted` (money).
    assert_eq!(call(chat(&keys.throttled_key)).await.status, 200);
    assert_eq!(call(chat(&keys.capped_key)).await.status, 200);
    assert_eq!(call(chat(&keys.budget_key)).await.status, 200);
    let before = figures(&call(quota(&keys.capped_key)).await);
    let spent = |q: Response| {
        q.json()["scopes"][2]["limits"]["budget_per_day"]["spent"]
            .as_f64()
            .unwrap()
    };
    let spent_before = spent(call(quota(&keys.budget_key)).await);
    assert!(spent_before > 0.0);
    // A kept-alive connection the old process will still serve after the
    // handoff, in Pingora's close window.
    let mut held = TcpStream::connect(addr).await.unwrap();
    let models = get("/v1/models")
        .header("x-api-key", &keys.omni_key)
        .build();
    assert_eq!(on_connection(&mut held, &models).await, 200);

    let (old, new) = begin_upgrade(d).await;
    // The old process admits `throttled`'s second request after it handed
    // over; its tail carries it to the new process when it stops.
    assert_eq!(
        on_connection(&mut held, &chat(&keys.throttled_key)).await,
        200
    );
    drop(held);
    wait_gone(old).await;
    assert!(alive(new));
    tokio::time::sleep(Duration::from_millis(300)).await;

    // After: the same standing. The lookup is one more request of the
    // key's burst; a day's tokens refill by one every 29 s (key) and 9 ms
    // (tenant), which the test's seconds allow for.
    let after = figures(&call(quota(&keys.capped_key)).await);
    assert_eq!(
        after.0,
        before.0 - 1,
        "the key's burst: {before:?} -> {after:?}"
    );
    assert!(
        after.1 >= before.1 && after.1 <= before.1 + 1,
        "the key's day: {before:?} -> {after:?}"
    );
    assert!(
        after.2 >= before.2 && after.2 <= before.2 + 4_000,
        "the tenant's day: {before:?} -> {after:?}"
    );
    assert!(
        before.2 < 10_000_000 - 10,
        "the tenant had used tokens: {before:?}"
    );
    let spent_after = spent(call(quota(&keys.budget_key)).await);
    assert!(
        (spent_after - spent_before).abs() < 1e-12,
        "{spent_before} -> {spent_after}"
    );
    // `throttled` used its burst of 2: one before the upgrade, one on the
    // old process after it; not a fresh burst, nor one request left.
    let r = call(chat(&keys.throttled_key)).await;
    assert_eq!(
        (r.status, r.code()),
        (429, "rate_limit_exceeded".to_string())
    );
    assert!(
        !state::handoff_path(&state).exists(),
        "the handoff was taken"
    );
}

#[derive(Default)]
struct Counts {
    ok: AtomicUsize,
    failed: AtomicUsize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upgrade_under_load_fails_no_request() {
    let keys = Keys::generate();
    let router = MockRouter::start(
        "127.0.0.1:0",
        MockOptions {
            record: false,
            ..MockOptions::default()
        },
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let addr = format!("127.0.0.1:{}", free_port());
    // Limits far above what the load reaches: only the upgrade may fail a request.
    let unlimited = tenants_toml(&keys).replace(
        "requests_per_second = 1000\nburst = 1000",
        "requests_per_second = 1000000\nburst = 1000000",
    );
    // The listener reads a PROXY header from 127.0.0.1 when one comes: the
    // handoff passes such a listener over like any other.
    let config = gateway_toml(&addr, router.addr(), "").replace(
        "upgrade_sock = \"upgrade.sock\"\n",
        "upgrade_sock = \"upgrade.sock\"\nproxy_protocol = \"optional\"\n\
         trusted_proxies = [\"127.0.0.1\"]\n",
    );
    write_daemon_dir(d, &keys, &unlimited, &config);
    let _cleanup = Daemons(d);
    start_daemon(d, &addr).await;
    let old = pid(d).unwrap();

    let token = keys.token("globex");
    // Four clients, each at most one request per PACE: 800 requests/s, below
    // globex's 1000, so a failure can only be the upgrade's.
    const PACE: Duration = Duration::from_millis(5);
    let stop = Arc::new(AtomicBool::new(false));
    let fresh = Arc::new(Counts::default());
    let kept = Arc::new(Counts::default());
    let mut load = Vec::new();
    for proxied in [false, true] {
        // A new connection for every request, one client behind a balancer
        // that writes a PROXY header first.
        let (stop, c, addr) = (stop.clone(), fresh.clone(), addr.clone());
        let mut req = post(CHAT, &chat_body()).bearer(&token).build();
        if proxied {
            req.splice(
                0..0,
                b"PROXY TCP4 198.51.100.7 10.0.0.1 40000 443\r\n".to_vec(),
            );
        }
        load.push(tokio::spawn(async move {
            let mut pace = tokio::time::interval(PACE);
            while !stop.load(Ordering::Relaxed) {
                pace.tick().await;
                match send(addr.parse().unwrap(), &req).await {
                    Ok(r) if r.status == 200 => c.ok.fetch_add(1, Ordering::Relaxed),
                    _ => c.failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for _ in 0..2 {
        // Keep-alive: reuse a connection until the server says close.
        let (stop, c, addr) = (stop.clone(), kept.clone(), addr.clone());
        let body = json!({"model": "m-small", "messages": [{"role": "user", "content": "hi"}]})
            .to_string();
        let req = format!(
            "POST {CHAT} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        load.push(tokio::spawn(async move {
            let mut conn: Option<TcpStream> = None;
            let mut pace = tokio::time::interval(PACE);
            while !stop.load(Ordering::Relaxed) {
                pace.tick().await;
                if conn.is_none() {
                    conn = TcpStream::connect(&addr).await.ok();
                }
                let Some(s) = conn.as_mut() else {
                    c.failed.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let answer = match s.write_all(req.as_bytes()).await {
                    Ok(()) => read_keep_alive(s).await,
                    Err(_) => None,
                };
                match answer {
                    Some((200, close)) => {
                        c.ok.fetch_add(1, Ordering::Relaxed);
                        if close {
                            conn = None;
                        }
                    }
                    _ => {
                        c.failed.fetch_add(1, Ordering::Relaxed);
                        conn = None;
                    }
                }
            }
        }));
    }

    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut stream_body = chat_body();
    stream_body["stream"] = json!(true);
    let stream_req = post(CHAT, &stream_body).bearer(&token).build();
    let stream_addr = addr.clone();
    let in_flight =
        tokio::spawn(async move { send(stream_addr.parse().unwrap(), &stream_req).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = fresh.ok.load(Ordering::Relaxed) + kept.ok.load(Ordering::Relaxed);
    // What ExecReload (and deploy/upgrade.sh) does: the new process waits
    // for the sockets, then the old one is told to hand them over.
    signal(old, "-QUIT");
    serve_daemon(&d.join("gateway.toml"), true);
    let upgraded = Instant::now();
    // The pid file is renamed aside before the new process writes its own.
    let new = loop {
        match pid(d) {
            Some(p) if p != old => break p,
            _ => {
                assert!(
                    upgraded.elapsed() < Duration::from_secs(10),
                    "the new process did not take over"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let streamed = in_flight
        .await
        .unwrap()
        .expect("the stream in flight was cut");
    assert_eq!(streamed.status, 200);
    let text = String::from_utf8_lossy(&streamed.body);
    assert!(
        text.contains(" mock router.") && text.ends_with("data: [DONE]\n\n"),
        "the stream in flight did not complete: {text}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    // The old process hands over, drains and exits within the grace period + 10 s.
    while alive(old) {
        assert!(
            upgraded.elapsed() < Duration::from_secs(1 + 2 + 10),
            "the old process lingered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (fo, ff) = (
        fresh.ok.load(Ordering::Relaxed),
        fresh.failed.load(Ordering::Relaxed),
    );
    let (ko, kf) = (
        kept.ok.load(Ordering::Relaxed),
        kept.failed.load(Ordering::Relaxed),
    );
    println!(
        "upgrade {old} -> {new}: new connections {fo} ok / {ff} failed, keep-alive {ko} ok / {kf} failed ({} before the upgrade)",
        before
    );
    assert!(alive(new));
    assert_eq!(ff + kf, 0, "requests failed during the upgrade");
    assert!(
        fo + ko > before + 100,
        "load kept flowing after the upgrade"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_requests_in_flight() {
    let mut gw = Gateway::start_with(Options {
        router: RouterMode::Up(MockOptions {
            delay: Duration::from_millis(800),
            ..MockOptions::default()
        }),
        ..Options::default()
    })
    .await;
    let req = post(CHAT, &chat_body())
        .bearer(&gw.keys.token("acme"))
        .build();
    let addr = gw.addr;
    let in_flight = tokio::spawn(async move { send(addr, &req).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    signal(gw.pid() as i32, "-TERM");
    let r = in_flight
        .await
        .unwrap()
        .expect("the request in flight was cut");
    assert_eq!(r.status, 200, "the request in flight did not complete");
    // grace_period_seconds (1) + graceful_shutdown_timeout_seconds (1) + margin.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !gw.exited() {
        assert!(
            Instant::now() < deadline,
            "the gateway did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An idle kept-alive connection does not hold a terminating gateway for
/// its grace period: it is closed as soon as SIGTERM arrives, while a
/// request in flight would still be served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_idle_keep_alive_connections_at_once() {
    let mut gw = Gateway::start_with(Options {
        config: toml::toml! {
            [server]
            grace_period_seconds = 10
        },
        ..Options::default()
    })
    .await;
    let models = format!(
        "GET /v1/models HTTP/1.1\r\nHost: gw\r\nx-api-key: {}\r\n\r\n",
        gw.keys.acme_key
    );
    let mut idle = TcpStream::connect(gw.addr).await.unwrap();
    idle.write_all(models.as_bytes()).await.unwrap();
    assert_eq!(read_keep_alive(&mut idle).await, Some((200, false)));
    signal(gw.pid() as i32, "-TERM");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "the idle connection outlived SIGTERM: {closed:?}"
    );
    assert!(!gw.exited(), "closed by the gateway, not by its exit");
}
