//! The per-request cost of the shipped Rego policy as the gateway pays it:
//! building the input document, evaluating `data.portcullis.authz.result`
//! on a clone of the prepared engine, and reading the verdict.
//!
//!   cargo bench --bench policy

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use portcullis::identity::jwt::VerifiedToken;
use portcullis::identity::{Identity, IdentityKind};
use portcullis::policy::rego::RegoPolicy;
use portcullis::policy::PolicyRequest;
use portcullis::route::Routes;
use portcullis::tenant::{Feature, FeatureSet};
use serde_json::json;

mod common;
use common::tenant;

fn shipped_policy(c: &mut Criterion) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/authz.rego");
    let policy = RegoPolicy::load(&path, Duration::from_millis(5)).expect("shipped policy");
    let claims = json!({"scope": "inference:read inference:write", "sub": "u", "tenant": "bench"});
    let identity = Identity {
        kind: IdentityKind::Jwt,
        subject: Some("u".into()),
        tenant: Arc::new(tenant()),
        token: Some(Arc::new(VerifiedToken {
            tenant: "bench".into(),
            subject: Some("u".into()),
            exp: u64::MAX,
            key_generation: 1,
            claims: Arc::new(claims.as_object().cloned().unwrap_or_default()),
        })),
        key_id: None,
        key_scope: None,
    };
    let mut features = FeatureSet::default();
    features.insert(Feature::Chat);
    let routes = Routes::built_in();
    let chat = routes
        .lookup("/v1/chat/completions")
        .expect("the chat route");
    let req = PolicyRequest {
        identity: &identity,
        method: "POST",
        route: chat,
        model: "m-small",
        features,
        region: "us-east-1",
        body_bytes: 1024,
        prompt_tokens: 300,
    };
    let claims = ["scope".to_string(), "scp".to_string()];
    let now_ns = 1_795_996_800_000_000_000;
    // Allowed, as the benchmark's traffic is; a denial must not be what is timed.
    let verdict = policy.decide(req.rego_input(&claims, now_ns));
    assert!(matches!(verdict, Ok(Ok(_))), "{verdict:?}");

    let mut g = c.benchmark_group("shipped_policy");
    g.bench_function("input", |b| {
        b.iter(|| black_box(req.rego_input(&claims, now_ns)))
    });
    g.bench_function("input_eval_verdict", |b| {
        b.iter(|| {
            let out = policy.decide(req.rego_input(&claims, black_box(now_ns)));
            black_box(out.is_ok_and(|v| v.is_ok()))
        })
    });
    g.finish();
}

criterion_group!(benches, shipped_policy);
criterion_main!(benches);
