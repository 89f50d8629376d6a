//! Tenant-bound Responses ids: a bound id opens for its tenant and no
//! other, any change to it is refused, and arbitrary text never panics.
#![no_main]
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use portcullis::ids::ResponseIds;

static KEYS: LazyLock<ResponseIds> =
    LazyLock::new(|| ResponseIds::from_key(&[5; 32]).expect("id keys"));

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // "tenant a|tenant b|router id|position to alter"
    let mut parts = text.splitn(4, '|');
    let (Some(a), Some(b), Some(id)) = (parts.next(), parts.next(), parts.next()) else {
        let _ = KEYS.open("t", text);
        return;
    };
    let _ = KEYS.open(a, id);
    let Some(bound) = KEYS.bind(a, id) else {
        assert!(id.len() > portcullis::ids::MAX_ROUTER_ID_LEN);
        return;
    };
    assert!(bound.len() <= portcullis::ids::MAX_BOUND_LEN);
    assert!(bound
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || c == b'_'));
    assert_eq!(KEYS.open(a, &bound).as_deref(), Some(id));
    if a != b {
        assert_eq!(
            KEYS.open(b, &bound),
            None,
            "a bound id opened for another tenant"
        );
    }
    let at = parts.next().map_or(0, str::len) % bound.len();
    let mut altered = bound.clone().into_bytes();
    altered[at] = if altered[at] == b'a' { b'b' } else { b'a' };
    let altered = String::from_utf8(altered).expect("ASCII");
    assert_eq!(KEYS.open(a, &altered), None, "an altered id opened");
});
