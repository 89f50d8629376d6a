//! The limit state file (`[limits] state_file` and its upgrade handoff):
//! whatever bytes the file holds, restoring them never panics, and a
//! restored cell never holds more than its capacity.
#![no_main]
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use portcullis::limits::state::restore_bytes;
use portcullis::limits::{ScopeLimiter, ScopeLimits, ScopeName};
use portcullis::tenant::{Limits, ModelPatterns, Tenant, Tenants};

fn tenants() -> Tenants {
    let limits = Limits {
        requests_per_second: 1.0,
        burst: 2,
        tokens_per_minute: 1_000,
        tokens_per_day: 10_000,
        max_concurrency: 4,
        max_body_bytes: 1024,
        max_prompt_tokens: 100,
        max_output_tokens: 100,
    };
    let scope = |name, l: ScopeLimits| Arc::new(ScopeLimiter::new(name, &l));
    let mut t = Tenant::new("acme", "o", "p", limits, None);
    t.limiter = scope(
        ScopeName::tenant("acme"),
        ScopeLimits {
            budget_per_day: Some(1.0),
            budget_per_month: Some(10.0),
            ..ScopeLimits::tenant(&t.limits)
        },
    );
    let model = ScopeLimits {
        tokens_per_minute: Some(50),
        ..ScopeLimits::default()
    };
    t.model_scopes =
        ModelPatterns::new(vec![("m-*".into(), scope(ScopeName::model("m-*"), model))]);
    let key = ScopeLimits {
        rate: Some((0.5, 1)),
        budget_per_day: Some(0.5),
        ..ScopeLimits::default()
    };
    t.key_scopes = vec![scope(ScopeName::key("k"), key)];
    Tenants::with(vec![Arc::new(t)])
}

fuzz_target!(|data: &[u8]| {
    let t = tenants();
    if restore_bytes(data, &t).is_ok() {
        let acme = t.by_id("acme").expect("the tenant");
        let now = portcullis::limits::cell::now_ns();
        for s in std::iter::once(&acme.limiter).chain(&acme.key_scopes) {
            for b in s.cells() {
                assert!(b.backlog(now) <= b.rate.capacity_ns);
            }
        }
    }
});
