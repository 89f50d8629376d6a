//! The PROXY header parser on the first bytes of a connection: no panic,
//! a header never claims more bytes than it was given or than the bounds,
//! and the answer is stable as bytes arrive. Every prefix of the input is
//! `Partial` or already the final answer, and bytes after a final answer
//! (the TLS or HTTP that follows) never change it; reading as the gateway
//! does (`next_read`) stops exactly where a header ends.
#![no_main]
use libfuzzer_sys::fuzz_target;
use portcullis::connection::proxy_header::{next_read, parse, Parsed, V2_MAX};

fuzz_target!(|data: &[u8]| {
    let full = parse(data);
    if let Parsed::Header { len, .. } = full {
        assert!(len <= data.len() && len <= V2_MAX);
    }
    for cut in 0..data.len() {
        let early = parse(&data[..cut]);
        assert!(
            early == Parsed::Partial || early == full,
            "{cut}: {early:?} then {full:?}"
        );
    }
    // Read as the gateway reads: it stops exactly at a header's end.
    let mut at = 0;
    while at < data.len() && parse(&data[..at]) == Parsed::Partial {
        at = (at + next_read(&data[..at])).min(data.len());
    }
    if let Parsed::Header { len, .. } = full {
        assert_eq!(at, len, "read past the header");
    }
    if full != Parsed::Partial {
        let mut more = data.to_vec();
        more.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(parse(&more), full);
    }
});
