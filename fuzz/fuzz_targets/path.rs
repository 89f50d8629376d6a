//! Path canonicalisation and route lookup: neither panics, whatever the
//! first accepts is already canonical (`/` alone, or no dot or empty
//! segments, nothing a router could re-read), and a route found for a path
//! has that exact path or a pattern of as many segments.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::LazyLock;

use portcullis::inbound::canonical_path;
use portcullis::route::Routes;

static ROUTES: LazyLock<Routes> = LazyLock::new(Routes::built_in);

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
    if let Some(route) = ROUTES.lookup(path) {
        let pattern = &route.path;
        assert!(
            pattern == path
                || (pattern.contains('{') && pattern.split('/').count() == path.split('/').count()),
            "{path:?} matched {pattern:?}"
        );
    }
});
