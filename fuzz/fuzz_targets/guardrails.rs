//! The guardrail scanner and masker on any text, and the body stage with
//! every detector masking: no panic; findings are in order, apart and on
//! character boundaries; masking replaces exactly them; every finding is
//! masked in every field; and a masked body is JSON the body gate accepts
//! again.
#![no_main]
use std::sync::{Arc, LazyLock};

use libfuzzer_sys::fuzz_target;
use portcullis::body::schema::Schemas;
use portcullis::body::{judge, BodyConfig, Gate};
use portcullis::guardrails::detect::{mask, Detectors, KindSet};
use portcullis::guardrails::{Acted, DenyAction, DenyRules, Guardrails, PiiMode};
use portcullis::ids::{Binding, ResponseIds};
use portcullis::route::Routes;
use portcullis::tenant::{Feature, FeatureSet, Limits, Tenant};
use serde_json::json;

static DETECTORS: LazyLock<Arc<Detectors>> =
    LazyLock::new(|| Arc::new(Detectors::new().expect("the detectors compile")));
static TENANT: LazyLock<Tenant> = LazyLock::new(|| {
    let limits = Limits {
        requests_per_second: 1000.0,
        burst: 1000,
        tokens_per_minute: u64::MAX,
        tokens_per_day: u64::MAX,
        max_concurrency: 1000,
        max_body_bytes: 1 << 20,
        max_prompt_tokens: u64::MAX,
        max_output_tokens: 4096,
    };
    let mut features = FeatureSet::default();
    for f in [
        Feature::Chat,
        Feature::Completions,
        Feature::Embeddings,
        Feature::Responses,
        Feature::Messages,
    ] {
        features.insert(f);
    }
    let deny = DenyRules::compile(&["(?i)ignore previous instructions"]).expect("deny rules");
    Tenant {
        models: vec!["m-small".into()],
        features,
        guardrails: Arc::new(Guardrails::new(
            PiiMode::Mask,
            KindSet::all(),
            Some(DETECTORS.clone()),
            Some(Arc::new(deny)),
            DenyAction::Log,
        )),
        ..Tenant::new("fuzz", "fuzz-org", "fuzz", limits, None)
    }
});
static ROUTES: LazyLock<Routes> = LazyLock::new(Routes::built_in);
static SCHEMAS: LazyLock<Schemas> =
    LazyLock::new(|| Schemas::load(None, &ROUTES).expect("built-in schemas"));

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut found = Vec::new();
    DETECTORS.scan(&text, KindSet::all(), &mut found);
    let mut end = 0;
    for f in &found {
        assert!(
            f.span.start >= end && f.span.start < f.span.end,
            "{found:?}"
        );
        assert!(text.get(f.span.clone()).is_some(), "not on char boundaries");
        end = f.span.end;
    }
    let masked = mask(&text, &found);
    let cut: usize = found.iter().map(|f| f.span.len()).sum();
    let labels: usize = found.iter().map(|f| f.kind.label().len()).sum();
    assert_eq!(
        masked.len(),
        text.len() - cut + labels,
        "mask lost or kept text"
    );
    if text.is_empty() {
        return; // a schema refuses an empty prompt
    }

    let cfg = BodyConfig::default();
    let keys = ResponseIds::from_key(&[1; 32]).expect("id keys");
    let gate = Gate {
        cfg: &cfg,
        schemas: &SCHEMAS,
        ids: Binding::new(&keys, &TENANT.id),
    };
    let t = text.as_ref();
    let bodies = [
        (
            "/v1/chat/completions",
            json!({"model": "m-small", "messages": [
            {"role": "user", "content": t},
            {"role": "user", "content": [{"type": "text", "text": t}]}]}),
        ),
        (
            "/v1/completions",
            json!({"model": "m-small", "prompt": [t, t]}),
        ),
        (
            "/v1/embeddings",
            json!({"model": "m-small", "input": [t, t]}),
        ),
        (
            "/v1/responses",
            json!({"model": "m-small", "instructions": t, "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": t}]}]}),
        ),
        (
            "/v1/messages",
            json!({"model": "m-small", "max_tokens": 10, "system": t,
            "messages": [{"role": "user", "content": [{"type": "text", "text": t}]}]}),
        ),
    ];
    for (path, body) in bodies {
        let route = ROUTES.lookup(path).expect("a built-in route");
        let raw = body.to_string();
        let mut acted = Acted::default();
        let judged = judge(route, &TENANT, &gate, raw.as_bytes(), &mut acted);
        let judged = judged.unwrap_or_else(|r| panic!("{path}: refused: {r:?}"));
        // Each finding in each of the two fields, and any a finding hid.
        assert!(acted.masked as usize >= found.len() * 2, "{path}");
        let rejudged = judge(route, &TENANT, &gate, &judged.body, &mut Acted::default());
        assert!(
            rejudged.is_ok(),
            "{path}: masked body refused: {rejudged:?}"
        );
    }
    // The raw bytes as any route's body.
    for route in ROUTES.iter().filter(|r| r.schema.is_some()) {
        if let Ok(judged) = judge(route, &TENANT, &gate, data, &mut Acted::default()) {
            let again = judge(route, &TENANT, &gate, &judged.body, &mut Acted::default());
            assert!(again.is_ok(), "masked body refused: {:?}", again.err());
        }
    }
});
