//! The whole body stage (strict parse, schema, policy, token estimate,
//! re-serialise) against a plain `serde_json::from_slice::<Value>` of the
//! same bytes (target: at most 3x the plain parse), and the same stage with
//! every guardrail detector masking and two deny rules, from 1 KiB to
//! 1 MiB (its cost per KiB shows whether it stays linear); and the token
//! estimate alone on 1 KiB of English, code, CJK with emoji, and base64.
//!
//!   cargo bench --bench body

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use portcullis::body::schema::Schemas;
use portcullis::body::tokens::estimate_text;
use portcullis::body::{judge, BodyConfig, Gate};
use portcullis::guardrails::detect::{Detectors, KindSet};
use portcullis::guardrails::{Acted, DenyAction, DenyRules, Guardrails, PiiMode};
use portcullis::ids::{Binding, ResponseIds};
use portcullis::route::Routes;
use portcullis::tenant::Tenant;
use serde_json::{json, Value};

mod common;
use common::tenant;

/// A realistic chat body of about `size` bytes: a system prompt and a
/// conversation of user and assistant turns (longer turns above 512 KiB,
/// to stay under the schema's 4096 messages).
fn chat_body(size: usize) -> Vec<u8> {
    let turn =
        "Our deployment pipeline fails intermittently when the integration tests run in parallel; \
                the logs show connection resets from the staging database. "
            .repeat(size.div_ceil(512 * 1024).max(1));
    let mut body = json!({"model": "m-small", "max_tokens": 256, "temperature": 0.2,
        "messages": [{"role": "system", "content": "You are a concise assistant."}]});
    let mut len = body.to_string().len();
    let mut messages = Vec::new();
    while len < size {
        let role = if messages.len() % 2 == 0 {
            "user"
        } else {
            "assistant"
        };
        let m = json!({"role": role, "content": turn});
        len += m.to_string().len() + 1;
        messages.push(m);
    }
    if let Some(list) = body["messages"].as_array_mut() {
        list.extend(messages);
    }
    body.to_string().into_bytes()
}

/// `tenant` with every detector masking and two deny rules.
fn guarded(tenant: &Tenant) -> Tenant {
    let deny = DenyRules::compile(&[
        "(?i)ignore (all )?previous instructions",
        "BEGIN RSA PRIVATE KEY",
    ])
    .expect("deny rules");
    Tenant {
        guardrails: Arc::new(Guardrails::new(
            PiiMode::Mask,
            KindSet::all(),
            Some(Arc::new(Detectors::new().expect("detectors"))),
            Some(Arc::new(deny)),
            DenyAction::Reject,
        )),
        ..tenant.clone()
    }
}

fn bench(c: &mut Criterion) {
    let routes = Routes::built_in();
    let chat = routes
        .lookup("/v1/chat/completions")
        .expect("the chat route");
    let schemas = Schemas::load(None, &routes).expect("built-in schemas");
    let tenant = tenant();
    let guarded = guarded(&tenant);
    let cfg = BodyConfig::default();
    let keys = ResponseIds::from_key(&[1; 32]).expect("id keys");
    let gate = Gate {
        cfg: &cfg,
        schemas: &schemas,
        ids: Binding::new(&keys, &tenant.id),
    };
    let mut group = c.benchmark_group("body_stage");
    let sizes = [
        ("1KiB", 1024),
        ("32KiB", 32 * 1024),
        ("256KiB", 256 * 1024),
        ("1MiB", 1024 * 1024),
    ];
    for (label, size) in sizes {
        let raw = chat_body(size);
        if let Err(e) = judge(chat, &tenant, &gate, &raw, &mut Acted::default()) {
            panic!("{label}: {e:?}");
        }
        let mut acted = Acted::default();
        assert!(judge(chat, &guarded, &gate, &raw, &mut acted).is_ok());
        assert_eq!(acted.masked, 0, "the bench prompt is clean");
        group.throughput(Throughput::Bytes(raw.len() as u64));
        group.bench_with_input(
            BenchmarkId::new("serde_json_value", label),
            &raw,
            |b, raw| b.iter(|| serde_json::from_slice::<Value>(black_box(raw)).unwrap()),
        );
        group.bench_with_input(BenchmarkId::new("judge", label), &raw, |b, raw| {
            b.iter(|| judge(chat, &tenant, &gate, black_box(raw), &mut Acted::default()).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("judge_guarded", label), &raw, |b, raw| {
            b.iter(|| judge(chat, &guarded, &gate, black_box(raw), &mut Acted::default()).unwrap())
        });
    }
    group.finish();
}

fn token_estimate(c: &mut Criterion) {
    let texts = [
        (
            "english",
            "Why does the pipeline fail on Tuesdays? ".repeat(26),
        ),
        (
            "code",
            "fn main() {\n    let x = vec![1, 2, 3];\n    println!(\"{:?}\", x.len());\n}\n"
                .repeat(14),
        ),
        (
            "cjk_emoji",
            "日本語のテキストと emoji 🎉 mixed with café ".repeat(20),
        ),
        (
            "base64",
            "c2VjcmV0IGtleSBBQkNERUZHSElKS0xNTk9QUVJTVFVWV1hZWjAx".repeat(20),
        ),
    ];
    let mut group = c.benchmark_group("token_estimate");
    for (label, text) in &texts {
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_with_input(BenchmarkId::from_parameter(label), text, |b, text| {
            b.iter(|| estimate_text(black_box(text)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench, token_estimate);
criterion_main!(benches);
