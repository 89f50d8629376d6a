//! Hostile request heads over raw sockets: path tricks, oversized and
//! malformed heads, smuggling framings and spoofed identity headers. Each
//! has its expected status and code, and none may reach the router.
//! `docs/SECURITY.md` says what each group defends against.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

/// One hostile request: what it tries, the raw bytes, and the answer.
struct Case {
    what: String,
    raw: Vec<u8>,
    status: u16,
    /// `None` where Pingora's parser refuses the head before the gateway
    /// sees it (no JSON body then).
    code: Option<&'static str>,
}

fn head(method: &str, target: &str, headers: &str, body: &str) -> Vec<u8> {
    format!("{method} {target} HTTP/1.1\r\n{headers}Connection: close\r\n\r\n{body}").into_bytes()
}

fn cases(key: &str) -> Vec<Case> {
    let auth = format!("Host: gw\r\nx-api-key: {key}\r\n");
    let json = "Content-Type: application/json\r\n";
    let body = r#"{"model":"m-small","messages":[{"role":"user","content":"hi"}]}"#;
    let mut out = Vec::new();
    let mut add = |what: &str, raw: Vec<u8>, status: u16, code: Option<&'static str>| {
        out.push(Case {
            what: what.to_string(),
            raw,
            status,
            code,
        })
    };

    // Paths: every spelling that a router might normalise differently.
    for path in [
        "/v1/models/../chat/completions",
        "/v1/chat%2Fcompletions",
        "/v1/chat%2fcompletions",
        "/V1/chat/completions",
        "/v1/Chat/Completions",
        "/v1//chat/completions",
        "//v1/chat/completions",
        "/v1/./chat/completions",
        "/v1/chat/completions/",
        "/v1/chat/completions/.",
        "/v1/%2e%2e/v1/chat/completions",
        "/v1/%2E%2E/chat/completions",
        "/v1/chat/completions%00",
        "/v1/chat/completions%20",
        "/v1\\chat\\completions",
        "/v1/chat/completions;jsessionid=1",
        "/v1/chat/%63ompletions",
        "/v1/models/%2e%2e/chat/completions",
        "/./v1/chat/completions",
        "/v1/chat/completions/..",
        "/%76%31/chat/completions",
        "/v1/chat//completions",
        "/v1/embeddings/..",
        "/v1/%2e/chat/completions",
        "/v1/chat/completions%2f",
    ] {
        let len = body.len();
        add(
            &format!("path {path}"),
            head(
                "POST",
                path,
                &format!("{auth}{json}Content-Length: {len}\r\n"),
                body,
            ),
            400,
            Some("invalid_path"),
        );
    }
    // Absolute-form targets with tricks in the path.
    add(
        "absolute-form with dot segments",
        head("GET", "http://gw/v1/x/../models", &auth, ""),
        400,
        Some("invalid_path"),
    );

    // Oversized and malformed heads.
    add(
        "request target over 8 KiB",
        head(
            "GET",
            &format!("/v1/models?{}", "a".repeat(9000)),
            &auth,
            "",
        ),
        414,
        Some("uri_too_long"),
    );
    add(
        "one 40 KiB header",
        head(
            "GET",
            "/v1/models",
            &format!("{auth}X-Big: {}\r\n", "a".repeat(40_000)),
            "",
        ),
        431,
        Some("headers_too_large"),
    );
    add(
        "101 header fields",
        head(
            "GET",
            "/v1/models",
            &format!(
                "{auth}{}",
                (0..101)
                    .map(|i| format!("X-H{i}: v\r\n"))
                    .collect::<String>()
            ),
            "",
        ),
        431,
        Some("headers_too_large"),
    );
    add(
        "300 header fields (Pingora's parser limit)",
        head(
            "GET",
            "/v1/models",
            &format!(
                "{auth}{}",
                (0..300)
                    .map(|i| format!("X-H{i}: v\r\n"))
                    .collect::<String>()
            ),
            "",
        ),
        400,
        None,
    );
    add(
        "obs-fold continuation line",
        head("GET", "/v1/models", &format!("{auth}X-A: a\r\n b\r\n"), ""),
        400,
        None,
    );
    add(
        "no Host",
        head("GET", "/v1/models", &format!("x-api-key: {key}\r\n"), ""),
        400,
        Some("invalid_request"),
    );
    add(
        "HTTP/1.0 with Transfer-Encoding",
        format!(
            "POST /v1/chat/completions HTTP/1.0\r\n{auth}{json}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        .into_bytes(),
        400,
        None,
    );
    add(
        "a space inside a header name",
        head("GET", "/v1/models", &format!("{auth}X Bad: v\r\n"), ""),
        400,
        None,
    );
    add(
        "a request line without a version",
        format!("GET /v1/models\r\n{auth}\r\n").into_bytes(),
        400,
        None,
    );
    add(
        "two Host headers (Pingora refuses them)",
        head("GET", "/v1/models", &format!("{auth}Host: other\r\n"), ""),
        400,
        None,
    );

    // Request smuggling: framings a router behind us could read otherwise.
    let len = body.len();
    // Pingora's parser refuses some itself (no JSON body); the gateway
    // refuses the rest.
    for (what, framing, code) in [
        (
            "Content-Length with Transfer-Encoding",
            format!("Content-Length: {len}\r\nTransfer-Encoding: chunked\r\n"),
            Some("invalid_request"),
        ),
        (
            "Transfer-Encoding with Content-Length",
            format!("Transfer-Encoding: chunked\r\nContent-Length: {len}\r\n"),
            Some("invalid_request"),
        ),
        (
            "two different Content-Lengths",
            format!("Content-Length: {len}\r\nContent-Length: 5\r\n"),
            None,
        ),
        (
            "two equal Content-Lengths",
            format!("Content-Length: {len}\r\nContent-Length: {len}\r\n"),
            Some("invalid_request"),
        ),
        (
            "Transfer-Encoding gzip, chunked",
            "Transfer-Encoding: gzip, chunked\r\n".to_string(),
            Some("invalid_request"),
        ),
        (
            "Transfer-Encoding identity",
            "Transfer-Encoding: identity\r\n".to_string(),
            None,
        ),
        (
            "two Transfer-Encoding headers",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n".to_string(),
            Some("invalid_request"),
        ),
        (
            "Content-Length that is not a number",
            "Content-Length: 12a\r\n".to_string(),
            None,
        ),
        (
            "negative Content-Length",
            "Content-Length: -1\r\n".to_string(),
            None,
        ),
        (
            "Content-Length list of different values",
            format!("Content-Length: {len}, 5\r\n"),
            None,
        ),
    ] {
        let chunked = format!("{len:x}\r\n{body}\r\n0\r\n\r\n");
        add(
            what,
            head(
                "POST",
                "/v1/chat/completions",
                &format!("{auth}{json}{framing}"),
                &chunked,
            ),
            400,
            code,
        );
    }

    // Identity headers: spoofed context and credential confusion.
    for name in [
        "x_tenant_id",
        "X_Tenant_Plan",
        "x-tenant_org",
        "x_forwarded_for",
        "x_api_key",
        "x_request_id",
        "x_tenant_policy_tier",
    ] {
        add(
            &format!("underscore header {name}"),
            head("GET", "/v1/models", &format!("{auth}{name}: acme\r\n"), ""),
            400,
            Some("invalid_request"),
        );
    }
    add(
        "two Authorization headers",
        head(
            "GET",
            "/v1/models",
            "Host: gw\r\nAuthorization: Bearer a.b.c\r\nAuthorization: Bearer d.e.f\r\n",
            "",
        ),
        400,
        Some("invalid_request"),
    );
    add(
        "two x-api-key headers",
        head(
            "GET",
            "/v1/models",
            &format!("{auth}x-api-key: {key}\r\n"),
            "",
        ),
        400,
        Some("invalid_request"),
    );
    add(
        "API key and bearer token together",
        head(
            "GET",
            "/v1/models",
            &format!("{auth}Authorization: Bearer a.b.c\r\n"),
            "",
        ),
        400,
        Some("invalid_request"),
    );
    add(
        "token in the query string only",
        head("GET", "/v1/models?access_token=a.b.c", "Host: gw\r\n", ""),
        401,
        Some("missing_credentials"),
    );
    add(
        "Basic credentials",
        head(
            "GET",
            "/v1/models",
            "Host: gw\r\nAuthorization: Basic YWNtZTpwdw==\r\n",
            "",
        ),
        401,
        Some("missing_credentials"),
    );
    out
}

/// The error code in a body, or what the body was when it has none.
fn code_of(r: &Response) -> String {
    serde_json::from_slice::<serde_json::Value>(&r.body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
        .unwrap_or_else(|| format!("(no code: {:?})", String::from_utf8_lossy(&r.body)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_heads_get_their_code_and_reach_nothing() {
    let gw = Gateway::start().await;
    let cases = cases(&gw.keys.acme_key);
    assert!(cases.len() >= 50, "{} cases", cases.len());
    let mut wrong = Vec::new();
    for c in &cases {
        let r = match send(gw.addr, &c.raw).await {
            Ok(r) => r,
            Err(e) => {
                wrong.push(format!("{}: no answer ({e})", c.what));
                continue;
            }
        };
        let got = (r.status, c.code.map(|_| code_of(&r)));
        let want = (c.status, c.code.map(str::to_string));
        if got != want {
            wrong.push(format!("{}: got {got:?}, want {want:?}", c.what));
        }
        // README ("Errors") lists the refusals Pingora's parser answers
        // itself: a bare 400 with no body, and the connection closed.
        if c.code.is_none() && (!r.body.is_empty() || r.header("content-type").is_some()) {
            wrong.push(format!(
                "{}: the parser's 400 has a body now: update README: {:?}",
                c.what,
                String::from_utf8_lossy(&r.body)
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert_eq!(gw.router_count(), 0, "a hostile request reached the router");
    assert_eq!(gw.router().connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_and_long_lived_ones_are_closed() {
    let gw = Gateway::start_with(Options {
        config: toml::toml! {
            [server]
            idle_timeout_seconds = 1
            max_requests_per_connection = 2
        },
        ..Options::default()
    })
    .await;
    let models = format!(
        "GET /v1/models HTTP/1.1\r\nHost: gw\r\nx-api-key: {}\r\n\r\n",
        gw.keys.acme_key
    );
    // Idle: kept alive after a request, closed a second later.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(models.as_bytes()).await.unwrap();
    assert_eq!(read_keep_alive(&mut s).await, Some((200, false)));
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(
        matches!(closed, Ok(Ok(0))),
        "an idle connection stayed open: {closed:?}"
    );

    // A connection serves at most two requests, then closes.
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let mut served = 0;
    for _ in 0..5 {
        if s.write_all(models.as_bytes()).await.is_err() {
            break;
        }
        match read_keep_alive(&mut s).await {
            Some((200, close)) => {
                served += 1;
                if close {
                    break;
                }
            }
            _ => break,
        }
    }
    assert_eq!(served, 2, "requests served on one connection");
}

/// An h2c (prior knowledge) connection to the gateway.
async fn h2c(
    gw: &Gateway,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    (client, tokio::spawn(conn))
}

fn h2_chat(key: &str, extra: Option<(&str, String)>) -> http::Request<()> {
    let mut b = http::Request::builder()
        .method("POST")
        .uri("http://gw/v1/chat/completions")
        .header("x-api-key", key)
        .header("content-type", "application/json");
    if let Some((name, value)) = extra {
        b = b.header(name, value);
    }
    b.body(()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_rapid_reset_and_oversized_header_blocks_are_contained() {
    let gw = Gateway::start().await;
    let key = gw.keys.acme_key.clone();

    // An oversized header block (64 KiB against the 32 KiB limit): 431.
    let (client, _conn) = h2c(&gw).await;
    let mut client = client.ready().await.unwrap();
    let (resp, _) = client
        .send_request(h2_chat(&key, Some(("x-big", "a".repeat(64 * 1024)))), true)
        .unwrap();
    let status = resp.await.map(|r| r.status().as_u16());
    assert!(
        matches!(status, Ok(431)),
        "oversized header block: {status:?}"
    );

    // Rapid reset: open streams and cancel each at once, 1000 times.
    let (client, conn) = h2c(&gw).await;
    let mut client = Some(client);
    let mut opened = 0;
    for _ in 0..1000 {
        let Some(Ok(mut ready)) = (match client.take() {
            Some(c) => Some(c.ready().await),
            None => None,
        }) else {
            break;
        };
        match ready.send_request(h2_chat(&key, None), false) {
            Ok((_resp, mut body)) => {
                body.send_reset(h2::Reason::CANCEL);
                opened += 1;
            }
            Err(_) => break,
        }
        client = Some(ready);
    }
    // The connection either ends (GOAWAY) or stays bounded; either way the
    // gateway answers others and nothing half-sent reached the router.
    drop(client);
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    println!("rapid reset: {opened} streams opened and reset; connection: {ended:?}");
    let r = gw
        .send(
            &post("/v1/chat/completions", &chat_body())
                .header("x-api-key", &key)
                .build(),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(gw.router_count(), 1, "a reset stream reached the router");
}
