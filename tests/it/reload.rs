//! Hot reload of tenants.toml: a change by atomic rename reaches new
//! requests within a second, a broken file changes nothing, and reloading
//! under load loses no request.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;

const CHAT: &str = "/v1/chat/completions";
const GLOBEX: &str = "id = \"globex\"\norg = \"globex-inc\"\nplan = \"gold\"\n";

/// Replaces tenants.toml the way config managers do: write aside, rename.
fn replace(gw: &Gateway, text: &str) {
    replace_file(&gw.dir.path().join("tenants.toml"), text);
}

fn current(gw: &Gateway) -> String {
    std::fs::read_to_string(gw.dir.path().join("tenants.toml")).unwrap()
}

async fn generation(gw: &Gateway) -> u64 {
    let r = send(gw.admin, &get("/readyz").build()).await.unwrap();
    let body = String::from_utf8_lossy(&r.body);
    body.split("generation=")
        .nth(1)
        .and_then(|g| g.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no generation in {body:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspending_a_tenant_by_rename_takes_effect_within_a_second() {
    let gw = Gateway::start().await;
    let token = gw.keys.token("globex");
    assert_eq!(
        gw.send(&post(CHAT, &chat_body()).bearer(&token).build())
            .await
            .status,
        200
    );
    assert_eq!(generation(&gw).await, 1);

    let suspended = current(&gw).replace(GLOBEX, &format!("{GLOBEX}suspended = true\n"));
    let changed = Instant::now();
    replace(&gw, &suspended);
    loop {
        let r = gw
            .send(&post(CHAT, &chat_body()).bearer(&token).build())
            .await;
        if r.status == 403 {
            assert_eq!(r.code(), "tenant_suspended");
            break;
        }
        assert!(
            changed.elapsed() < Duration::from_secs(1),
            "the suspension took over 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!("suspension applied after {:?}", changed.elapsed());
    assert_eq!(generation(&gw).await, 2);
    assert_eq!(
        metric(&gw, "portcullis_config_reloads_total{result=\"ok\"} ").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_file_changes_nothing() {
    let gw = Gateway::start().await;
    let token = gw.keys.token("globex");
    let good = current(&gw);
    for broken in [
        good.replace("[plans.gold]", "[plans.gold"),  // not TOML
        good.replace("burst = 1000", "burts = 1000"), // unknown key
        good.replace(GLOBEX, &GLOBEX.replace("gold", "platinum")), // undefined plan
    ] {
        std::fs::write(gw.dir.path().join("tenants.toml"), broken).unwrap(); // in place
        tokio::time::sleep(Duration::from_millis(400)).await;
        let r = gw
            .send(&post(CHAT, &chat_body()).bearer(&token).build())
            .await;
        assert_eq!(r.status, 200, "a broken file was applied");
        assert_eq!(generation(&gw).await, 1);
    }
    assert!(metric(&gw, "portcullis_config_reloads_total{result=\"error\"} ").await >= 3);
    // The good file comes back: it applies again.
    let suspended = good.replace(GLOBEX, &format!("{GLOBEX}suspended = true\n"));
    replace(&gw, &suspended);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = gw
        .send(&post(CHAT, &chat_body()).bearer(&token).build())
        .await;
    assert_eq!(r.code(), "tenant_suspended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_reloads_under_load_lose_no_request() {
    let gw = Arc::new(Gateway::start().await);
    let token = gw.keys.token("globex");
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut clients = Vec::new();
    for _ in 0..2 {
        let (gw, token, stop, ok, failed) = (
            gw.clone(),
            token.clone(),
            stop.clone(),
            ok.clone(),
            failed.clone(),
        );
        clients.push(tokio::spawn(async move {
            // Paced below globex's 1000 requests/s (two clients at most 333/s
            // each), so a refusal can only come from a lost configuration.
            let mut pace = tokio::time::interval(Duration::from_millis(3));
            while !stop.load(Ordering::Relaxed) {
                pace.tick().await;
                let r = gw
                    .send(&post(CHAT, &chat_body()).bearer(&token).build())
                    .await;
                if r.status != 200 {
                    eprintln!("failed: {} {}", r.status, String::from_utf8_lossy(&r.body));
                }
                if r.status == 200 { &ok } else { &failed }.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let base = current(&gw);
    for i in 0..20 {
        // Each version changes another tenant's limits, so each is a real change.
        let text = base.replace(
            "suspended = true\n",
            &format!(
                "suspended = true\n[tenants.overrides]\nburst = {}\n",
                10 + i
            ),
        );
        replace(&gw, &text);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let reloads = metric(&gw, "portcullis_config_reloads_total{result=\"ok\"} ").await;
    println!("{ok} requests succeeded and {failed} failed across {reloads} reloads");
    assert_eq!(failed, 0);
    assert!(ok > 20);
    assert_eq!(reloads, 20, "every change was applied");
    assert_eq!(generation(&gw).await, 21);
}

/// A reload that changes a setting the process reads only at start applies
/// the rest and says the key needs a restart (log, /readyz, metric),
/// instead of reporting `ok` and silently changing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_only_change_is_reported_as_restart_needed() {
    let gw = Gateway::start_with(Options {
        config: toml::toml! {
            [limits]
            max_inflight = 1000
        },
        capture_logs: true,
        ..Options::default()
    })
    .await;
    let path = gw.dir.path().join("gateway.toml");
    let original = std::fs::read_to_string(&path).unwrap();
    let readyz = || async {
        let r = send(gw.admin, &get("/readyz").build()).await.unwrap();
        (r.status, String::from_utf8_lossy(&r.body).to_string())
    };
    let gw_ref = &gw;
    let reloaded_to = |n: u64| async move {
        let deadline = Instant::now() + Duration::from_secs(5);
        while generation(gw_ref).await < n {
            assert!(Instant::now() < deadline, "no reload to generation {n}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    assert!(!readyz().await.1.contains("restart needed"));

    // A process-only key and a reloaded one change together.
    let changed = original
        .replace("max_inflight = 1000", "max_inflight = 5")
        .replace("region = \"us-east-1\"", "region = \"eu-west-1\"");
    replace_file(&path, &changed);
    reloaded_to(2).await;
    let (status, body) = readyz().await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("restart needed: [limits] max_inflight"),
        "{body}"
    );
    assert_eq!(metric(&gw, "portcullis_config_restart_needed ").await, 1);
    assert_eq!(
        metric(&gw, "portcullis_config_reloads_total{result=\"ok\"} ").await,
        1
    );
    // The reloaded key did apply: acme's plan is us-east-1 only.
    let r = gw
        .send(
            &post(CHAT, &chat_body())
                .bearer(&gw.keys.token("acme"))
                .build(),
        )
        .await;
    assert_rejected(&gw, &r, 403, "region_not_allowed");
    let log = std::fs::read_to_string(gw.dir.path().join("gateway.log")).unwrap();
    assert!(
        log.lines().any(|l| l.contains("\"level\":\"WARN\"")
            && l.contains("restart needed: [limits] max_inflight")),
        "{log}"
    );

    // Back to what the process runs with: nothing is pending.
    replace_file(&path, &original);
    reloaded_to(3).await;
    assert!(!readyz().await.1.contains("restart needed"));
    assert_eq!(metric(&gw, "portcullis_config_restart_needed ").await, 0);
}
