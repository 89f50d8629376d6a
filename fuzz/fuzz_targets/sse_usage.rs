//! The SSE usage tap: split the input into chunks at fuzzer-chosen points;
//! it must never panic, never grow without bound, and pass through every
//! byte when it hides nothing.
#![no_main]
use libfuzzer_sys::fuzz_target;
use portcullis::response::StreamTap;

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let step = usize::from(split).max(1);
    let mut keep = StreamTap::new(false);
    let mut hide = StreamTap::new(true);
    let mut passed = Vec::new();
    let chunks: Vec<&[u8]> = rest.chunks(step).collect();
    for (i, chunk) in chunks.iter().enumerate() {
        let last = i + 1 == chunks.len();
        passed.extend_from_slice(&keep.push(chunk, last));
        let _ = hide.push(chunk, last);
    }
    if chunks.is_empty() {
        passed.extend_from_slice(&keep.push(&[], true));
    }
    assert_eq!(passed, rest, "a tap that hides nothing changed the stream");
    let _ = keep.usage;
});
