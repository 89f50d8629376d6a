//! What the benches share: a tenant to act for.

use portcullis::tenant::{Feature, FeatureSet, Limits, Tenant};

/// A tenant that no limit stops, on a plan with chat and streaming.
pub fn tenant() -> Tenant {
    let limits = Limits {
        requests_per_second: 1000.0,
        burst: 1000,
        tokens_per_minute: u64::MAX,
        tokens_per_day: u64::MAX,
        max_concurrency: 1000,
        max_body_bytes: 1 << 30,
        max_prompt_tokens: 10_000_000,
        max_output_tokens: 4096,
    };
    let mut features = FeatureSet::default();
    for f in [Feature::Chat, Feature::Stream] {
        features.insert(f);
    }
    Tenant {
        models: vec!["m-small".into()],
        features,
        ..Tenant::new("bench", "bench-org", "bench", limits, None)
    }
}
