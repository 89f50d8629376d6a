//! The official `openai` and `anthropic` Python SDKs against the real
//! gateway (tests/sdk/conformance.py). Their versions are pinned in
//! tests/sdk/requirements.txt; the venv is made on first use (PyPI) unless
//! `PORTCULLIS_SDK_PYTHON` names a Python that has them. Without Python the
//! test fails: it never skips.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

fn manifest() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A Python with the pinned SDKs.
fn sdk_python() -> PathBuf {
    if let Some(p) = std::env::var_os("PORTCULLIS_SDK_PYTHON") {
        return p.into();
    }
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sdk-venv");
    let python = venv.join("bin/python");
    let requirements = manifest().join("tests/sdk/requirements.txt");
    let stamp = venv.join("requirements.txt");
    let current = std::fs::read(&stamp).ok() == std::fs::read(&requirements).ok();
    if !python.exists() || !current {
        let made = Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&venv)
            .status()
            .expect("python3 is required for the SDK conformance test (apt-get install -y python3-venv)");
        assert!(
            made.success(),
            "python3 -m venv failed (apt-get install -y python3-venv)"
        );
        let pip = Command::new(&python)
            .args(["-m", "pip", "install", "-q", "-r"])
            .arg(&requirements)
            .status()
            .expect("pip runs");
        assert!(
            pip.success(),
            "pip could not install tests/sdk/requirements.txt"
        );
        std::fs::copy(&requirements, &stamp).unwrap();
    }
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_sdks_work_against_the_gateway() {
    let python = tokio::task::spawn_blocking(sdk_python).await.unwrap();
    let gw = Gateway::start().await;
    let mut script = Command::new(&python);
    script
        .arg(manifest().join("tests/sdk/conformance.py"))
        .env("PORTCULLIS_URL", format!("http://{}", gw.addr))
        .env("OMNI_KEY", &gw.keys.omni_key)
        .env("ACME_KEY", &gw.keys.acme_key)
        .env("THROTTLED_KEY", &gw.keys.throttled_key);
    // The mock router runs on this runtime: wait off its threads.
    let out = tokio::task::spawn_blocking(move || script.output())
        .await
        .unwrap()
        .expect("the SDK script runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let checks: u32 = stdout
        .lines()
        .last()
        .and_then(|l| l.strip_prefix("ok "))
        .and_then(|n| n.parse().ok())
        .expect("the script reports its checks");
    assert!(checks >= 30, "{checks} checks ran");
}
