//! The body stage on arbitrary bytes, for each route: it must never panic,
//! and what it accepts must be JSON it would accept again.
#![no_main]
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use portcullis::body::schema::Schemas;
use portcullis::body::{judge, BodyConfig, Gate};
use portcullis::guardrails::Acted;
use portcullis::ids::{Binding, ResponseIds};
use portcullis::route::Routes;
use portcullis::tenant::{Feature, FeatureSet, Limits, Tenant};

static TENANT: LazyLock<Tenant> = LazyLock::new(|| {
    let limits = Limits {
        requests_per_second: 1000.0,
        burst: 1000,
        tokens_per_minute: u64::MAX,
        tokens_per_day: u64::MAX,
        max_concurrency: 1000,
        max_body_bytes: 1 << 20,
        max_prompt_tokens: 100_000,
        max_output_tokens: 4096,
    };
    let mut features = FeatureSet::default();
    for f in [
        Feature::Chat,
        Feature::Completions,
        Feature::Embeddings,
        Feature::Stream,
        Feature::Responses,
        Feature::Messages,
        Feature::Moderations,
        Feature::Rerank,
    ] {
        features.insert(f);
    }
    Tenant {
        models: vec!["m-small".into(), "m-exp-*".into()],
        features,
        forbidden_fields: vec!["logit_bias".into()],
        ..Tenant::new("fuzz", "fuzz-org", "fuzz", limits, None)
    }
});
static ROUTES: LazyLock<Routes> = LazyLock::new(Routes::built_in);
static SCHEMAS: LazyLock<Schemas> =
    LazyLock::new(|| Schemas::load(None, &ROUTES).expect("built-in schemas"));

fuzz_target!(|data: &[u8]| {
    let cfg = BodyConfig::default();
    let keys = ResponseIds::from_key(&[1; 32]).expect("id keys");
    let gate = Gate {
        cfg: &cfg,
        schemas: &SCHEMAS,
        ids: Binding::new(&keys, &TENANT.id),
    };
    for route in ROUTES.iter().filter(|r| r.schema.is_some()) {
        if let Ok(judged) = judge(route, &TENANT, &gate, data, &mut Acted::default()) {
            // The normalised body is what the router gets: it must pass again.
            let again = judge(route, &TENANT, &gate, &judged.body, &mut Acted::default());
            assert!(again.is_ok(), "normalised body refused: {:?}", again.err());
        }
    }
});
