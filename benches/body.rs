//! The whole body stage (strict parse, schema, policy, token estimate,
//! re-serialise) against a plain `serde_json::from_slice::<Value>` of the
//! same bytes. Target: at most 3x the plain parse.
//!
//!   cargo bench --bench body

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use portcullis::body::schema::Schemas;
use portcullis::body::{judge, BodyConfig, Gate};
use portcullis::ids::{Binding, ResponseIds};
use portcullis::route::Routes;
use serde_json::{json, Value};

mod common;
use common::tenant;

/// A realistic chat body of about `size` bytes: a system prompt and a
/// conversation of user and assistant turns.
fn chat_body(size: usize) -> Vec<u8> {
    let turn =
        "Our deployment pipeline fails intermittently when the integration tests run in parallel; \
                the logs show connection resets from the staging database. ";
    let mut messages = vec![json!({"role": "system", "content": "You are a concise assistant."})];
    let mut body =
        json!({"model": "m-small", "max_tokens": 256, "temperature": 0.2, "messages": []});
    let mut i = 0;
    while body.to_string().len() < size {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        messages.push(json!({"role": role, "content": turn}));
        body["messages"] = Value::Array(messages.clone());
        i += 1;
    }
    body.to_string().into_bytes()
}

fn bench(c: &mut Criterion) {
    let routes = Routes::built_in();
    let chat = routes
        .lookup("/v1/chat/completions")
        .expect("the chat route");
    let schemas = Schemas::load(None, &routes).expect("built-in schemas");
    let tenant = tenant();
    let cfg = BodyConfig::default();
    let keys = ResponseIds::from_key(&[1; 32]).expect("id keys");
    let gate = Gate {
        cfg: &cfg,
        schemas: &schemas,
        ids: Binding::new(&keys, &tenant.id),
    };
    let mut group = c.benchmark_group("body_stage");
    for (label, size) in [("1KiB", 1024), ("32KiB", 32 * 1024), ("256KiB", 256 * 1024)] {
        let raw = chat_body(size);
        assert!(judge(chat, &tenant, &gate, &raw).is_ok());
        group.throughput(Throughput::Bytes(raw.len() as u64));
        group.bench_with_input(
            BenchmarkId::new("serde_json_value", label),
            &raw,
            |b, raw| b.iter(|| serde_json::from_slice::<Value>(black_box(raw)).unwrap()),
        );
        group.bench_with_input(BenchmarkId::new("judge", label), &raw, |b, raw| {
            b.iter(|| judge(chat, &tenant, &gate, black_box(raw)).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
