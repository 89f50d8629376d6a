//! The multipart framing check on arbitrary bodies and content types: it
//! must never panic, and what it accepts starts with its boundary, ends
//! with the closing one, and reads the same again.
#![no_main]
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use portcullis::body::multipart;

fuzz_target!(|data: &[u8]| {
    // The first line is the Content-Type, the rest the body.
    let (ct, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"multipart/form-data; boundary=B"[..], data),
    };
    let Ok(ct) = std::str::from_utf8(ct) else {
        return;
    };
    let body = Bytes::copy_from_slice(body);
    let first = futures::executor::block_on(multipart::read(Some(ct), body.clone()));
    if let Ok(form) = first {
        assert!(body.starts_with(b"--"));
        let again = futures::executor::block_on(multipart::read(Some(ct), body));
        assert_eq!(again.ok(), Some(form), "the same form read differently");
    }
});
