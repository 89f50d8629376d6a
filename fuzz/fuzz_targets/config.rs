//! gateway.toml, tenants.toml and routes-file parsing on arbitrary text: errors, never
//! panics (each input is written to a file, as the loader reads files).
#![no_main]
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;

static DIR: LazyLock<tempfile::TempDir> = LazyLock::new(|| tempfile::tempdir().unwrap());

fuzz_target!(|data: &[u8]| {
    let d = DIR.path();
    for name in ["gateway.toml", "tenants.toml", "routes.toml"] {
        std::fs::write(d.join(name), data).unwrap();
    }
    let _ = portcullis::config::gateway::load(&d.join("gateway.toml"));
    let _ = portcullis::config::tenants::load(&d.join("tenants.toml"), None);
    let _ = portcullis::config::routes::load(&d.join("routes.toml"));
});
