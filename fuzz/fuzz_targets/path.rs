//! Path canonicalisation: never panics, and whatever it accepts is already
//! canonical (`/` alone, or no dot or empty segments, nothing a router
//! could re-read).
#![no_main]
use libfuzzer_sys::fuzz_target;
use portcullis::inbound::canonical_path;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    if canonical_path(path) && path != "/" {
        assert!(path.starts_with('/'));
        for seg in path[1..].split('/') {
            assert!(!seg.is_empty() && seg != "." && seg != "..", "{path:?}");
            assert!(!seg.contains('%') && !seg.contains('\\'), "{path:?}");
        }
        assert_eq!(path, path.to_ascii_lowercase());
    }
});
