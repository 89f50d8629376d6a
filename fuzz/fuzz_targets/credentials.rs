//! Credential parsing and verification: arbitrary bytes as a bearer token
//! and as an API key, against a real key set and tenants (dev credentials
//! generated once). Never panics; never authenticates a forgery.
#![no_main]
use std::sync::LazyLock;

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use portcullis::config::Snapshot;
use portcullis::identity;

struct World {
    snapshot: Snapshot,
    _dir: tempfile::TempDir,
}

static WORLD: LazyLock<World> = LazyLock::new(|| {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    portcullis::dev::write_dev_credentials(d, &d.join("jwks.json"), &[]).unwrap();
    std::fs::write(
        d.join("tenants.toml"),
        format!(
            "[plans.p]\nrequests_per_second = 1\nburst = 1\ntokens_per_minute = 1\ntokens_per_day = 1\n\
             max_concurrency = 1\nmax_body_bytes = 1\nmax_prompt_tokens = 1\nmax_output_tokens = 1\n\
             models = [\"m\"]\nfeatures = [\"chat\"]\n\n[[tenants]]\nid = \"acme\"\norg = \"o\"\nplan = \"p\"\n\
             api_keys = [\"{}\"]\n",
            portcullis::identity::api_key::hash_entry(&portcullis::identity::api_key::generate())
        ),
    )
    .unwrap();
    std::fs::write(
        d.join("gateway.toml"),
        "[server]\nlisten = [\"127.0.0.1:1\"]\nregion = \"r\"\n[upstream]\naddress = \"127.0.0.1:2\"\n\
         [auth.jwt]\nissuer = \"https://idp.example.com\"\naudiences = [\"portcullis\"]\njwks_file = \"jwks.json\"\n\
         [policy]\ntenants = \"tenants.toml\"\n[context]\nsigning_key_file = \"context.key\"\n",
    )
    .unwrap();
    let snapshot = Snapshot::load(&d.join("gateway.toml")).unwrap();
    World {
        snapshot,
        _dir: dir,
    }
});

fuzz_target!(|data: &[u8]| {
    let w = &*WORLD;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    for (name, value) in [
        ("authorization", format!("Bearer {text}")),
        ("x-api-key", text.to_string()),
    ] {
        let Ok(v) = HeaderValue::from_str(&value) else {
            continue;
        };
        let mut headers = HeaderMap::new();
        headers.insert(name, v);
        let r = identity::resolve(
            &w.snapshot.auth,
            &w.snapshot.tenants,
            &headers,
            None,
            1_800_000_000,
        );
        // The fuzzer holds no private key and no stored API key.
        assert!(r.is_err(), "authenticated from fuzz input {text:?}");
    }
});
