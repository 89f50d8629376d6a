//! A JSONTestSuite-style corpus of hostile and malformed bodies. Each has
//! its expected status and code, and none may reach the router.

use crate::common::*;

const CHAT: &str = "/v1/chat/completions";

/// A valid chat body with `tail` spliced in before the closing brace.
fn with(tail: &str) -> Vec<u8> {
    format!(r#"{{"model":"m-small","messages":[{{"role":"user","content":"hi"}}]{tail}}}"#)
        .into_bytes()
}

/// A chat body whose message content is these raw bytes between quotes.
fn content(raw: &[u8]) -> Vec<u8> {
    let mut v = br#"{"model":"m-small","messages":[{"role":"user","content":""#.to_vec();
    v.extend_from_slice(raw);
    v.extend_from_slice(br#""}]}"#);
    v
}

fn corpus() -> Vec<(&'static str, Vec<u8>, u16, &'static str)> {
    let bad = |name, body: Vec<u8>| (name, body, 400, "invalid_json");
    let schema = |name, body: Vec<u8>| (name, body, 400, "schema_violation");
    let deep_array = format!(
        r#"{{"model":"m-small","messages":[{{"role":"user","content":"hi"}}],"metadata":{}1{}}}"#,
        "[".repeat(70),
        "]".repeat(70)
    );
    let deep_object = format!("{}1{}", r#"{"a":"#.repeat(70), "}".repeat(70));
    vec![
        // Syntax: not JSON at all, or JSON5/JavaScript extensions.
        bad("empty body", vec![]),
        bad("whitespace only", b"   \n\t ".to_vec()),
        bad("bare word", b"hello".to_vec()),
        bad("single quotes", b"{'model':'m-small'}".to_vec()),
        bad("unquoted key", b"{model:\"m-small\"}".to_vec()),
        bad("trailing comma in object", with(",")),
        bad("trailing comma in array", br#"{"model":"m-small","messages":[{"role":"user","content":"hi"},]}"#.to_vec()),
        bad("missing colon", br#"{"model" "m-small"}"#.to_vec()),
        bad("missing comma", br#"{"model":"m-small" "messages":[]}"#.to_vec()),
        bad("line comment", with("// comment\n")),
        bad("block comment", with(r#",/* c */"n":1"#)),
        bad("unclosed object", br#"{"model":"m-small""#.to_vec()),
        bad("unclosed array", br#"{"model":"m-small","messages":[{"role":"user"}"#.to_vec()),
        bad("unclosed string", br#"{"model":"m-small"#.to_vec()),
        bad("extra closing brace", with("}")),
        bad("two documents", [with(""), with("")].concat()),
        bad("trailing garbage", [with(""), b"x".to_vec()].concat()),
        bad("trailing NUL", [with(""), vec![0]].concat()),
        // Numbers.
        bad("NaN", with(r#","temperature":NaN"#)),
        bad("Infinity", with(r#","temperature":Infinity"#)),
        bad("negative Infinity", with(r#","temperature":-Infinity"#)),
        bad("leading zero", with(r#","n":01"#)),
        bad("hex number", with(r#","n":0x1"#)),
        bad("plus sign", with(r#","n":+1"#)),
        bad("leading dot", with(r#","temperature":.5"#)),
        bad("trailing dot", with(r#","temperature":1."#)),
        bad("exponent without digits", with(r#","temperature":1e"#)),
        bad("overflowing float", with(r#","temperature":1e400"#)),
        bad("overflowing negative float", with(r#","seed":-1e400"#)),
        // Strings and encodings.
        bad("raw newline in string", content(b"a\nb")),
        bad("raw tab in string", content(b"a\tb")),
        bad("raw NUL in string", content(b"a\x00b")),
        bad("invalid escape", content(br"\x41")),
        bad("short unicode escape", content(br"\u12")),
        bad("lone high surrogate", content(br"\ud800")),
        bad("lone low surrogate", content(br"\udc00")),
        bad("reversed surrogate pair", content(br"\udc00\ud800")),
        bad("invalid UTF-8 byte", content(b"\xff")),
        bad("overlong UTF-8", content(b"\xc0\xaf")),
        bad("truncated UTF-8", content(b"\xe4\xb8")),
        bad("UTF-8 encoded surrogate", content(b"\xed\xa0\x80")),
        bad("byte order mark", [b"\xEF\xBB\xBF".to_vec(), with("")].concat()),
        bad("UTF-16 body", with("").iter().flat_map(|b| [*b, 0]).collect()),
        // Structure.
        bad("duplicate top-level key", with(r#","model":"m-large""#)),
        bad("duplicate key by escape", with(r#","mod\u0065l":"m-large""#)),
        bad("duplicate nested key", br#"{"model":"m-small","messages":[{"role":"user","role":"system","content":"hi"}]}"#.to_vec()),
        bad("duplicate key in stream options", with(r#","stream":true,"stream_options":{"include_usage":true,"include_usage":false}"#)),
        bad("nesting 70 arrays deep", deep_array.into_bytes()),
        bad("nesting 70 objects deep", deep_object.into_bytes()),
        // Valid JSON, wrong document.
        schema("top-level array", b"[]".to_vec()),
        schema("top-level string", br#""m-small""#.to_vec()),
        schema("top-level null", b"null".to_vec()),
        schema("missing model", br#"{"messages":[{"role":"user","content":"hi"}]}"#.to_vec()),
        schema("missing messages", br#"{"model":"m-small"}"#.to_vec()),
        schema("empty messages", br#"{"model":"m-small","messages":[]}"#.to_vec()),
        schema("model is a number", br#"{"model":5,"messages":[{"role":"user","content":"hi"}]}"#.to_vec()),
        schema("empty model", br#"{"model":"","messages":[{"role":"user","content":"hi"}]}"#.to_vec()),
        schema("unknown role", br#"{"model":"m-small","messages":[{"role":"root","content":"hi"}]}"#.to_vec()),
        schema("content is an object", br#"{"model":"m-small","messages":[{"role":"user","content":{"a":1}}]}"#.to_vec()),
        schema("unknown part type", br#"{"model":"m-small","messages":[{"role":"user","content":[{"type":"file","file":"x"}]}]}"#.to_vec()),
        schema("unknown top-level field", with(r#","x_tenant_id":"globex""#)),
        schema("unknown message field", br#"{"model":"m-small","messages":[{"role":"user","content":"hi","tenant":"acme"}]}"#.to_vec()),
        schema("temperature out of range", with(r#","temperature":3"#)),
        schema("n is zero", with(r#","n":0"#)),
        schema("negative max_tokens", with(r#","max_tokens":-1"#)),
        schema("max_tokens is a string", with(r#","max_tokens":"100""#)),
        schema("stream is a string", with(r#","stream":"true""#)),
        schema("five stop sequences", with(r#","stop":["a","b","c","d","e"]"#)),
        schema("tool without function", with(r#","tools":[{"type":"function"}]"#)),
        // Valid shape, refused by policy.
        ("model not allowed", br#"{"model":"m-forbidden","messages":[{"role":"user","content":"hi"}]}"#.to_vec(), 403, "model_not_allowed"),
        ("model with control character", br#"{"model":"m-small\u0000","messages":[{"role":"user","content":"hi"}]}"#.to_vec(), 403, "model_not_allowed"),
        ("model with path tricks", br#"{"model":"../m-small","messages":[{"role":"user","content":"hi"}]}"#.to_vec(), 403, "model_not_allowed"),
        ("tools without the feature", with(r#","tools":[{"type":"function","function":{"name":"f"}}]"#), 403, "feature_not_allowed"),
        ("json mode without the feature", with(r#","response_format":{"type":"json_object"}"#), 403, "feature_not_allowed"),
        ("logprobs without the feature", with(r#","logprobs":true"#), 403, "feature_not_allowed"),
        ("several choices without the feature", with(r#","n":4"#), 403, "feature_not_allowed"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bodies_get_their_codes_and_reach_nothing() {
    let gw = Gateway::start().await;
    let token = gw.keys.token("globex");
    let cases = corpus();
    assert!(cases.len() >= 60, "only {} cases", cases.len());
    let mut failures = Vec::new();
    for (name, body, status, code) in &cases {
        let r = gw
            .send(&post_raw(CHAT, body.clone()).bearer(&token).build())
            .await;
        let got = (r.status, r.code());
        if got != (*status, code.to_string()) {
            failures.push(format!(
                "{name}: got {got:?}, want ({status}, {code}): {}",
                String::from_utf8_lossy(&r.body)
            ));
        }
        if r.status == 400 && *code == "invalid_json" {
            let msg = r.json()["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if !msg.contains("at byte ") {
                failures.push(format!("{name}: message has no byte offset: {msg}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert_eq!(
        gw.router().connections(),
        0,
        "a hostile body reached the router"
    );
    println!(
        "{} hostile bodies refused, none reached the router",
        cases.len()
    );
}
