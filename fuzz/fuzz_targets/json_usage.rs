//! The usage read from a JSON answer: split the input at a fuzzer-chosen
//! point and feed it to the JSON taps. They must never panic; a tap that
//! binds no ids passes every byte; and the usage read straight from the
//! bytes must be what the same answer's parsed `Value` holds.
#![no_main]
use std::sync::LazyLock;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use portcullis::ids::{Binding, ResponseIds};
use portcullis::response::{Usage, UsageTap};
use serde_json::Value;

static KEYS: LazyLock<ResponseIds> =
    LazyLock::new(|| ResponseIds::from_key(&[7; 32]).expect("id keys"));

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let ids = Binding::new(&KEYS, "fuzz");
    let (a, b) = rest.split_at(usize::from(split).min(rest.len()));
    let mut tap = UsageTap::json(false);
    let mut out = tap.push(Bytes::copy_from_slice(a), false, &ids).to_vec();
    out.extend_from_slice(&tap.push(Bytes::copy_from_slice(b), true, &ids));
    assert_eq!(out, rest, "a tap that binds no ids changed the answer");

    let mut bound = UsageTap::json(true);
    let _ = bound.push(Bytes::copy_from_slice(a), false, &ids);
    let _ = bound.push(Bytes::copy_from_slice(b), true, &ids);

    let Ok(doc) = serde_json::from_slice::<Value>(rest) else {
        // serde_json skips a member it does not read without checking its
        // strings' UTF-8 or escapes, so only a clean text must yield nothing.
        if std::str::from_utf8(rest).is_ok() && !rest.contains(&b'\\') {
            assert_eq!(
                tap.usage(),
                None,
                "usage read from an answer that is not JSON"
            );
        }
        return;
    };
    let expected = doc.get("usage").and_then(Usage::from_member);
    match tap.usage() {
        Some(seen) => {
            assert_eq!(Some(seen), expected, "the bytes and the Value disagree");
            let model = doc.get("model").and_then(Value::as_str);
            if let Some(m) = tap.model() {
                assert_eq!(Some(m), model);
            }
        }
        // A repeated member fails the answer's parse (serde refuses it),
        // and a `Value` keeps the last; keys may be spelled with escapes.
        None if expected.is_some() => {
            let count = |needle: &[u8]| rest.windows(needle.len()).filter(|w| w == &needle).count();
            assert!(
                count(b"usage") > 1 || count(b"model") > 1 || rest.contains(&b'\\'),
                "the usage the Value holds was missed"
            );
        }
        None => {}
    }
});
