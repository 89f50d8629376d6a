//! The router's head, written from any client head Pingora's parser
//! accepts and the head check passes: no panic; when written, it parses
//! whole as one HTTP/1.1 request with the client's method, one
//! `Content-Length` (the judged body's), and no header a router trusts
//! carrying a client's value.
#![no_main]
use libfuzzer_sys::fuzz_target;

use pingora_http::RequestHeader;
use portcullis::forward::context::ContextSigner;
use portcullis::forward::{is_trusted_header, router_head, TrustedContext};
use portcullis::tenant::{Limits, Tenant};

fuzz_target!(|data: &[u8]| {
    let mut slots = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Request::new(&mut slots);
    let Ok(httparse::Status::Complete(_)) = parsed.parse(data) else {
        return;
    };
    let (Some(method), Some(path)) = (parsed.method, parsed.path) else {
        return;
    };
    let Ok(mut client) = RequestHeader::build(method, path.as_bytes(), None) else {
        return;
    };
    for h in parsed.headers.iter() {
        if client.append_header(h.name.to_owned(), h.value).is_err() {
            return;
        }
    }
    if portcullis::inbound::check(&client.headers, || Some(data.to_vec().into())).is_err() {
        return;
    }
    let limits = Limits {
        requests_per_second: 1.0,
        burst: 1,
        tokens_per_minute: 1,
        tokens_per_day: 1,
        max_concurrency: 1,
        max_body_bytes: 1,
        max_prompt_tokens: 1,
        max_output_tokens: 1,
    };
    let tenant = Tenant::new("acme", "acme-corp", "free", limits, None);
    let ctx = TrustedContext {
        tenant: &tenant,
        request_id: "rid",
        model: Some("m"),
        key_id: None,
        client_ip: "192.0.2.1",
        proto: "https",
        policy: &[],
        strip: &[],
        trace: None,
    };
    let signer = ContextSigner::from_bytes(&[7u8; 32]).expect("a 32-byte key");
    let Ok(head) = router_head(&client, None, &ctx, &signer, 1, 7) else {
        return;
    };
    let wire = head.as_bytes();
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut sent = httparse::Request::new(&mut slots);
    assert_eq!(
        sent.parse(wire).ok(),
        Some(httparse::Status::Complete(wire.len())),
        "{wire:?}"
    );
    assert_eq!(sent.method, Some(method));
    assert_eq!(sent.version, Some(1));
    let ours = [
        ("x-request-id", "rid"),
        ("x-tenant-id", "acme"),
        ("x-tenant-limits", tenant.limits_header.as_str()),
        ("x-tenant-model", "m"),
        ("x-tenant-org", "acme-corp"),
        ("x-tenant-plan", "free"),
        ("x-forwarded-for", "192.0.2.1"),
        ("x-forwarded-proto", "https"),
    ];
    let mut lengths = 0;
    let mut trusted = Vec::new();
    for h in sent.headers.iter() {
        let name = h.name.to_ascii_lowercase();
        if name == "content-length" {
            lengths += 1;
            assert_eq!(h.value, b"7");
        }
        if is_trusted_header(&name.replace('_', "-")) {
            trusted.push(h.name);
            if let Some((_, value)) = ours.iter().find(|(n, _)| *n == h.name) {
                assert_eq!(h.value, value.as_bytes(), "{name}");
            } else {
                assert_eq!(
                    h.name, "x-tenant-signature",
                    "the client's {name} reached the router"
                );
            }
        }
    }
    assert_eq!(lengths, 1);
    assert_eq!(
        trusted.len(),
        ours.len() + 1,
        "each trusted header once: {trusted:?}"
    );
});
