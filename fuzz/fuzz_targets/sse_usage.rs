//! The SSE usage taps of every dialect: split the input into chunks at
//! fuzzer-chosen points; they must never panic or grow without bound. A
//! tap that rewrites nothing (OpenAI keeping its usage chunk, Anthropic)
//! passes every byte, and a Responses tap lets no router id through in an
//! event it could read.
#![no_main]
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use portcullis::ids::{Binding, ResponseIds};
use portcullis::response::StreamTap;
use portcullis::route::Dialect;

static KEYS: LazyLock<ResponseIds> =
    LazyLock::new(|| ResponseIds::from_key(&[9; 32]).expect("id keys"));

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let ids = Binding::new(&KEYS, "fuzz");
    let step = usize::from(split >> 2).max(1);
    let chunks: Vec<&[u8]> = rest.chunks(step).collect();
    let run = |tap: &mut StreamTap| {
        let mut out = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            out.extend_from_slice(&tap.push(chunk, i + 1 == chunks.len(), &ids));
        }
        if chunks.is_empty() {
            out.extend_from_slice(&tap.push(&[], true, &ids));
        }
        out
    };
    for dialect in [Dialect::OpenAi, Dialect::Anthropic] {
        let mut keep = StreamTap::new(dialect, false);
        assert_eq!(
            run(&mut keep),
            rest,
            "a tap that rewrites nothing changed the stream"
        );
    }
    let _ = run(&mut StreamTap::new(Dialect::OpenAi, true));
    let mut responses = StreamTap::new(Dialect::Responses, false);
    let out = run(&mut responses);
    if !rest.windows(10).any(|w| w == b"\"response\"") {
        assert_eq!(out, rest, "an event without a response object was changed");
    }
});
