//! The prompt-token estimator against a real BPE tokenizer (cl100k): it
//! may overcount, but never undercounts by more than 10%.

use std::time::Instant;

use portcullis::body::tokens::estimate_text;

fn corpus(name: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/tests/fixtures/tokens/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

#[test]
fn never_undercounts_by_more_than_ten_percent() {
    let bpe = tiktoken_rs::cl100k_base().unwrap();
    let mut report = Vec::new();
    for name in [
        "english.txt",
        "code.txt",
        "cjk.txt",
        "emoji.txt",
        "mixed.txt",
    ] {
        let text = corpus(name);
        // The whole file, then every line long enough to matter.
        let mut pieces = vec![text.as_str()];
        pieces.extend(text.lines().filter(|l| bpe.encode_ordinary(l).len() >= 10));
        for piece in pieces {
            let real = bpe.encode_ordinary(piece).len() as f64;
            let est = estimate_text(piece) as f64;
            assert!(
                est >= 0.9 * real,
                "{name}: estimate {est} < 90% of {real} for {piece:?}"
            );
        }
        let real = bpe.encode_ordinary(&text).len();
        let est = estimate_text(&text);
        report.push(format!(
            "{name}: cl100k {real}, estimate {est} ({:+.0}%)",
            (est as f64 / real as f64 - 1.0) * 100.0
        ));
    }
    println!("{}", report.join("\n"));
}

#[test]
fn costs_far_less_than_the_tokenizer() {
    let bpe = tiktoken_rs::cl100k_base().unwrap();
    let text: String = ["english.txt", "code.txt", "cjk.txt", "emoji.txt"]
        .map(corpus)
        .concat();
    let reps = 20;
    let t = Instant::now();
    let mut est = 0;
    for _ in 0..reps {
        est += estimate_text(std::hint::black_box(&text));
    }
    let ours = t.elapsed();
    let t = Instant::now();
    let mut real = 0;
    for _ in 0..reps {
        real += bpe.encode_ordinary(std::hint::black_box(&text)).len();
    }
    let theirs = t.elapsed();
    let per_kib =
        |d: std::time::Duration| d.as_nanos() as f64 / reps as f64 / (text.len() as f64 / 1024.0);
    println!(
        "estimator {:.0} ns/KiB, cl100k {:.0} ns/KiB ({est} vs {real} tokens)",
        per_kib(ours),
        per_kib(theirs)
    );
    // A relative check within one run, not a wall-clock threshold.
    assert!(ours < theirs, "the estimator should be cheaper than BPE");
}
