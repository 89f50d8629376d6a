//! A mock of the internal router: an OpenAI-compatible HTTP/1.1 server that
//! records every request it receives, byte for byte.
//!
//! `portcullis demo` runs it so the gateway can be tried with nothing else
//! installed, the integration tests use its recording to prove what the
//! router saw (or that it saw nothing), and the benchmark uses it as a fast
//! upstream.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 32 * 1024 * 1024;

/// One request as the router received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    /// Header names as sent (case preserved), in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    /// Every value of a header, matched case-insensitively.
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The single value of a header; `None` when absent or repeated.
    pub fn header(&self, name: &str) -> Option<&str> {
        match self.header_values(name).as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }
}

/// How the mock behaves.
#[derive(Debug, Clone)]
pub struct MockOptions {
    /// Wait this long before answering each request (a slow router).
    pub delay: Duration,
    /// Keep every request for inspection. Tests want this; the demo and
    /// benchmarks turn it off so memory stays flat under load.
    pub record: bool,
    /// Pause between the events of a streamed answer.
    pub event_interval: Duration,
    /// Content events in a streamed answer (before usage and `[DONE]`).
    pub stream_chunks: usize,
    /// Close a kept-alive connection unanswered when its second request
    /// arrives, as a router that dropped an idle connection looks to the
    /// proxy that reused it.
    pub drop_reused: bool,
}

impl Default for MockOptions {
    fn default() -> Self {
        MockOptions {
            delay: Duration::ZERO,
            record: true,
            event_interval: Duration::ZERO,
            stream_chunks: 3,
            drop_reused: false,
        }
    }
}

#[derive(Default)]
struct State {
    requests: Mutex<Vec<Recorded>>,
    connections: AtomicUsize,
    /// Numbers the Responses objects it makes.
    responses: AtomicUsize,
}

/// A running mock router; it stops when its runtime does.
#[derive(Clone)]
pub struct MockRouter {
    addr: SocketAddr,
    state: Arc<State>,
}

impl MockRouter {
    /// Binds `addr` (use port 0 for an ephemeral one) and serves in the background.
    pub async fn start(addr: &str, opts: MockOptions) -> std::io::Result<MockRouter> {
        let listener = TcpListener::bind(addr).await?;
        let router = MockRouter {
            addr: listener.local_addr()?,
            state: Arc::default(),
        };
        let state = router.state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = state.clone();
                let opts = opts.clone();
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    // A broken connection only ends that connection.
                    let _ = serve_connection(stream, &state, &opts).await;
                });
            }
        });
        Ok(router)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Everything received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state
            .requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// Serves one already-accepted connection (a test's TLS listener uses
    /// this after its handshake), recording like any other.
    pub async fn serve(&self, stream: impl Conn, opts: &MockOptions) -> std::io::Result<()> {
        serve_connection(stream, &self.state, opts).await
    }

    /// Connections that carried at least one byte (health checks, which
    /// connect and close, do not count).
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }
}

/// Any byte stream the mock can serve HTTP/1.1 on (TCP, or TLS over it).
pub trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

async fn serve_connection(
    mut stream: impl Conn,
    state: &State,
    opts: &MockOptions,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(8192);
    if read_more(&mut stream, &mut buf).await? == 0 {
        return Ok(());
    }
    state.connections.fetch_add(1, Ordering::SeqCst);
    for served in 0usize.. {
        let Some((req, keep_alive)) = read_request(&mut stream, &mut buf).await? else {
            return Ok(());
        };
        let serial = state.responses.fetch_add(1, Ordering::Relaxed);
        let answer = answer(&req, opts.stream_chunks, serial);
        // What the router saw of identity, so a benchmark can check each
        // proxy's first answer without a recording.
        let echo = format!(
            "x-echo-tenant-id: {}\r\nx-echo-authorization: {}\r\n",
            req.header("x-tenant-id").unwrap_or_default(),
            if req.header_values("authorization").is_empty() {
                "absent"
            } else {
                "present"
            }
        );
        if opts.record {
            if let Ok(mut r) = state.requests.lock() {
                r.push(req);
            }
        }
        if opts.drop_reused && served == 1 {
            return Ok(());
        }
        if !opts.delay.is_zero() {
            tokio::time::sleep(opts.delay).await;
        }
        // One write per response: a split head and body would meet Nagle
        // and delayed ACKs and add 40 ms to every keep-alive request.
        let close = if keep_alive {
            ""
        } else {
            "connection: close\r\n"
        };
        let mut out = match &answer {
            Answer::Json(status, body) => {
                let mut out = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{echo}{close}\r\n",
                    body.len()
                )
                .into_bytes();
                out.extend_from_slice(body);
                out
            }
            Answer::Stream(_) => format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n{echo}{close}\r\n"
            )
            .into_bytes(),
        };
        if let Answer::Stream(events) = &answer {
            // Each event its own chunk, as a streaming router sends them.
            for e in events {
                out.extend_from_slice(format!("{:x}\r\n", e.len()).as_bytes());
                out.extend_from_slice(e.as_bytes());
                out.extend_from_slice(b"\r\n");
                if !opts.event_interval.is_zero() {
                    stream.write_all(&out).await?;
                    out.clear();
                    tokio::time::sleep(opts.event_interval).await;
                }
            }
            out.extend_from_slice(b"0\r\n\r\n");
        }
        stream.write_all(&out).await?;
        if !keep_alive {
            return Ok(());
        }
    }
    Ok(())
}

/// Reads one request; `None` on a clean close before a new request.
async fn read_request(
    stream: &mut impl Conn,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<(Recorded, bool)>> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        if let httparse::Status::Complete(head_len) =
            req.parse(buf).map_err(|e| bad(&e.to_string()))?
        {
            let headers: Vec<(String, String)> = req
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_string(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            let mut rec = Recorded {
                method: req.method.unwrap_or_default().to_string(),
                path: req.path.unwrap_or_default().to_string(),
                headers,
                body: Vec::new(),
            };
            let keep_alive = !rec
                .header_values("connection")
                .iter()
                .any(|v| v.eq_ignore_ascii_case("close"));
            buf.drain(..head_len);
            let chunked = rec
                .header_values("transfer-encoding")
                .iter()
                .any(|v| v.eq_ignore_ascii_case("chunked"));
            if chunked {
                rec.body = read_chunked(stream, buf).await?;
            } else {
                let len: usize = rec
                    .header("content-length")
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if len > MAX_BODY {
                    return Err(bad("body too large"));
                }
                fill(stream, buf, len).await?;
                rec.body = buf.drain(..len).collect();
            }
            return Ok(Some((rec, keep_alive)));
        }
        if buf.len() > MAX_HEAD {
            return Err(bad("head too large"));
        }
        if read_more(stream, buf).await? == 0 {
            return if buf.is_empty() {
                Ok(None)
            } else {
                Err(bad("closed mid-request"))
            };
        }
    }
}

async fn read_more(stream: &mut impl Conn, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut chunk = [0u8; 16 * 1024];
    let n = stream.read(&mut chunk).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

async fn fill(stream: &mut impl Conn, buf: &mut Vec<u8>, len: usize) -> std::io::Result<()> {
    while buf.len() < len {
        if read_more(stream, buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(())
}

async fn read_chunked(stream: &mut impl Conn, buf: &mut Vec<u8>) -> std::io::Result<Vec<u8>> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad chunk");
    let mut body = Vec::new();
    loop {
        let (consumed, size) = loop {
            match httparse::parse_chunk_size(buf) {
                Ok(httparse::Status::Complete((c, s))) => break (c, s as usize),
                Ok(httparse::Status::Partial) => {
                    if read_more(stream, buf).await? == 0 {
                        return Err(bad());
                    }
                }
                Err(_) => return Err(bad()),
            }
        };
        buf.drain(..consumed);
        if body.len() + size > MAX_BODY {
            return Err(bad());
        }
        fill(stream, buf, size + 2).await?;
        body.extend(buf.drain(..size));
        buf.drain(..2);
        if size == 0 {
            return Ok(body);
        }
    }
}

/// What the mock sends back.
enum Answer {
    Json(&'static str, Vec<u8>),
    /// Server-sent events, each a complete `data:` event.
    Stream(Vec<String>),
}

/// An answer in each shipped route's dialect; unknown routes get 404. A
/// streamed chat has `stream_chunks` content chunks, the usage-only chunk
/// when `stream_options.include_usage` asks for it, and `[DONE]`; a
/// streamed response or message has its dialect's events, usage included.
fn answer(req: &Recorded, stream_chunks: usize, serial: usize) -> Answer {
    let parsed: Value = serde_json::from_slice(&req.body).unwrap_or_default();
    let model = parsed
        .get("model")
        .and_then(|m| m.as_str())
        .unwrap_or("mock-model");
    let prompt_tokens = req.body.len() / 4;
    let path = req.path.split('?').next().unwrap_or_default();
    let streaming = parsed.get("stream").and_then(|s| s.as_bool()) == Some(true);
    let pieces = || {
        ["Hello", " from the", " mock router."]
            .into_iter()
            .cycle()
            .take(stream_chunks)
    };
    let segments: Vec<&str> = path.split('/').collect();
    let body = match (req.method.as_str(), segments.as_slice()) {
        ("POST", ["", "v1", "chat", "completions"]) if streaming => {
            let mut events: Vec<String> = pieces()
                .map(|piece| {
                    let chunk = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk",
                        "model": model, "choices": [{"index": 0, "delta": {"content": piece}}]});
                    format!("data: {chunk}\n\n")
                })
                .collect();
            let usage = parsed
                .get("stream_options")
                .and_then(|o| o.get("include_usage"))
                .and_then(|u| u.as_bool())
                == Some(true);
            if usage {
                let chunk = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk",
                    "model": model, "choices": [],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 3,
                              "total_tokens": prompt_tokens + 3}});
                events.push(format!("data: {chunk}\n\n"));
            }
            events.push("data: [DONE]\n\n".into());
            return Answer::Stream(events);
        }
        ("POST", ["", "v1", "chat", "completions"]) => json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "Hello from the mock router."}}],
            // Half the prompt "from the cache", as OpenAI reports it.
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 6,
                      "total_tokens": prompt_tokens + 6,
                      "prompt_tokens_details": {"cached_tokens": prompt_tokens / 2},
                      "completion_tokens_details": {"reasoning_tokens": 2}}
        }),
        ("POST", ["", "v1", "completions"]) => json!({
            "id": "cmpl-mock",
            "object": "text_completion",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "text": "Hello from the mock router.", "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 6,
                      "total_tokens": prompt_tokens + 6}
        }),
        // What a router's load balancer (or the gateway's
        // `health_check_path`) polls.
        ("GET", ["", "healthz"]) => json!({"status": "ok"}),
        // An OTLP/HTTP sink, so a benchmark can trace into something that
        // accepts: an empty body is an empty ExportTraceServiceResponse.
        ("POST", ["", "v1", "traces"]) => return Answer::Json("200 OK", Vec::new()),
        ("POST", ["", "v1", "embeddings"]) => json!({
            "object": "list",
            "model": model,
            "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 0.1, 0.2]}],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
        }),
        ("POST", ["", "v1", "responses"]) => {
            let id = format!("resp_mock{serial:04x}");
            let previous = parsed.get("previous_response_id").cloned().unwrap_or(Value::Null);
            let done = response_object(&id, model, "completed", prompt_tokens, previous.clone());
            if !streaming {
                done
            } else {
                let mut started = response_object(&id, model, "in_progress", 0, previous);
                started["usage"] = Value::Null;
                let mut events = vec![
                    sse("response.created", json!({"type": "response.created", "sequence_number": 0, "response": started})),
                ];
                for (i, piece) in pieces().enumerate() {
                    events.push(sse("response.output_text.delta", json!({"type": "response.output_text.delta",
                        "sequence_number": i + 1, "item_id": "msg_mock", "output_index": 0,
                        "content_index": 0, "delta": piece, "logprobs": []})));
                }
                events.push(sse("response.completed", json!({"type": "response.completed",
                    "sequence_number": stream_chunks + 1, "response": done})));
                return Answer::Stream(events);
            }
        }
        ("POST", ["", "v1", "responses", "input_tokens"]) => {
            json!({"object": "response.input_tokens", "input_tokens": prompt_tokens})
        }
        ("GET", ["", "v1", "responses", id]) => {
            response_object(id, "mock-model", "completed", 8, Value::Null)
        }
        ("DELETE", ["", "v1", "responses", id]) => {
            json!({"id": id, "object": "response.deleted", "deleted": true})
        }
        ("POST", ["", "v1", "responses", id, "cancel"]) => {
            response_object(id, "mock-model", "cancelled", 8, Value::Null)
        }
        ("GET", ["", "v1", "responses", _, "input_items"]) => json!({
            "object": "list",
            "data": [{"id": "msg_input", "type": "message", "role": "user", "status": "completed",
                      "content": [{"type": "input_text", "text": "Hello"}]}],
            "first_id": "msg_input", "last_id": "msg_input", "has_more": false
        }),
        ("POST", ["", "v1", "messages"]) => {
            let usage = json!({"input_tokens": prompt_tokens, "output_tokens": 6,
                "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0});
            if !streaming {
                json!({"id": "msg_mock", "type": "message", "role": "assistant", "model": model,
                    "content": [{"type": "text", "text": "Hello from the mock router."}],
                    "stop_reason": "end_turn", "stop_sequence": null, "usage": usage})
            } else {
                let mut start_usage = usage.clone();
                start_usage["output_tokens"] = json!(1);
                let mut events = vec![
                    sse("message_start", json!({"type": "message_start", "message": {"id": "msg_mock",
                        "type": "message", "role": "assistant", "model": model, "content": [],
                        "stop_reason": null, "stop_sequence": null, "usage": start_usage}})),
                    sse("content_block_start", json!({"type": "content_block_start", "index": 0,
                        "content_block": {"type": "text", "text": ""}})),
                ];
                for piece in pieces() {
                    events.push(sse("content_block_delta", json!({"type": "content_block_delta",
                        "index": 0, "delta": {"type": "text_delta", "text": piece}})));
                }
                events.push(sse("content_block_stop", json!({"type": "content_block_stop", "index": 0})));
                events.push(sse("message_delta", json!({"type": "message_delta",
                    "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                    "usage": {"output_tokens": 6}})));
                events.push(sse("message_stop", json!({"type": "message_stop"})));
                return Answer::Stream(events);
            }
        }
        ("POST", ["", "v1", "messages", "count_tokens"]) => json!({"input_tokens": prompt_tokens}),
        ("POST", ["", "v1", "moderations"]) => json!({
            "id": "modr-mock", "model": model,
            "results": [{"flagged": false, "categories": {}, "category_scores": {}}]
        }),
        ("POST", ["", "v1", "rerank"]) => json!({
            "id": "rerank-mock", "model": model,
            "results": [{"index": 0, "relevance_score": 0.9}],
            "usage": {"total_tokens": prompt_tokens}
        }),
        ("POST", ["", "v1", "audio", "transcriptions" | "translations"]) => json!({
            "text": "Hello from the mock router.",
            "usage": {"type": "tokens", "input_tokens": prompt_tokens, "output_tokens": 6,
                      "total_tokens": prompt_tokens + 6}
        }),
        _ => {
            return Answer::Json(
                "404 Not Found",
                br#"{"error":{"message":"unknown route","type":"invalid_request_error","param":null,"code":"not_found"}}"#.to_vec(),
            )
        }
    };
    Answer::Json("200 OK", serde_json::to_vec(&body).unwrap_or_default())
}

/// A named SSE event.
fn sse(name: &str, data: Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

/// A Responses object as the API returns it.
fn response_object(id: &str, model: &str, status: &str, input: usize, previous: Value) -> Value {
    json!({
        "id": id, "object": "response", "created_at": 0, "status": status, "model": model,
        "output": [{"type": "message", "id": "msg_mock", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": "Hello from the mock router.", "annotations": []}]}],
        "previous_response_id": previous,
        "parallel_tool_calls": true, "tool_choice": "auto", "tools": [], "metadata": {},
        "error": null, "incomplete_details": null, "instructions": null,
        "usage": {"input_tokens": input, "output_tokens": 6, "total_tokens": input + 6,
                  "input_tokens_details": {"cached_tokens": 0},
                  "output_tokens_details": {"reasoning_tokens": 1}}
    })
}
