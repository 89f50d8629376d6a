//! Reading the usage of a JSON answer as the gateway does on every
//! non-streamed request: the answer's bytes pass through a `UsageTap`,
//! which reads `usage` and `model` when the body ends. A short chat
//! completion (the shape the bench's mock router answers with) and a long
//! one, whose choices are skipped unread.
//!
//!   cargo bench --bench response

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use portcullis::ids::{Binding, ResponseIds};
use portcullis::response::UsageTap;
use serde_json::json;

fn answer(content_len: usize) -> Bytes {
    let doc = json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 0,
        "model": "m-small",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "word ".repeat(content_len / 5)}}],
        "usage": {"prompt_tokens": 260, "completion_tokens": 6, "total_tokens": 266,
                  "prompt_tokens_details": {"cached_tokens": 130},
                  "completion_tokens_details": {"reasoning_tokens": 2}}});
    Bytes::from(doc.to_string())
}

fn json_usage(c: &mut Criterion) {
    let keys = ResponseIds::from_key(&[1; 32]).expect("id keys");
    let ids = Binding::new(&keys, "bench");
    let mut group = c.benchmark_group("json_usage");
    for (label, len) in [("short", 30), ("32KiB", 32 * 1024)] {
        let body = answer(len);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(label), &body, |b, body| {
            b.iter(|| {
                let mut tap = UsageTap::json(false);
                black_box(tap.push(body.clone(), true, &ids));
                black_box(tap.usage())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, json_usage);
criterion_main!(benches);
