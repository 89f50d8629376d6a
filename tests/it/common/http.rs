//! Raw HTTP/1.1 over sockets: request builders and a response parser.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The `error.code` of an OpenAI-shaped error body.
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

/// Sends raw bytes and reads the response until the server closes.
pub async fn send(addr: SocketAddr, raw: &[u8]) -> std::io::Result<Response> {
    send_on(TcpStream::connect(addr).await?, raw).await
}

/// Sends raw bytes on an open stream (one that wrote a PROXY header, or
/// a TLS one) and reads the response until the server closes.
pub async fn send_on<S>(mut s: S, raw: &[u8]) -> std::io::Result<Response>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let io = async {
        s.write_all(raw).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(Duration::from_secs(15), io)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no response in 15 s"))??;
    parse_response(&buf)
}

/// Reads one request (its head, then its Content-Length body) from a
/// connection, for a test's hand-written router; what follows it stays in
/// `buf`. `false` once the connection ends or fails.
pub async fn read_request<S: tokio::io::AsyncRead + Unpin>(
    conn: &mut S,
    buf: &mut Vec<u8>,
) -> bool {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                buf.drain(..end + 4 + len);
                return true;
            }
        }
        let mut chunk = [0u8; 4096];
        match conn.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Parses one whole response (its body de-chunked or cut to its length).
pub fn parse_response(buf: &[u8]) -> std::io::Result<Response> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("bad response: {:?}", String::from_utf8_lossy(buf)),
            ))
        }
    };
    let headers: Vec<(String, String)> = resp
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_string(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let mut body = buf[head_len..].to_vec();
    let chunked = headers.iter().any(|(n, v)| {
        n.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    if chunked {
        body = dechunk(&body)?;
    } else if let Some(len) = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        body.truncate(len);
    }
    Ok(Response {
        status: resp.code.unwrap_or(0),
        headers,
        body,
    })
}

/// Reads one Content-Length response from a kept-alive connection;
/// returns its status and whether the server asked to close.
pub async fn read_keep_alive(s: &mut TcpStream) -> Option<(u16, bool)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        if let Ok(httparse::Status::Complete(head)) = resp.parse(&buf) {
            let get = |name: &str| {
                resp.headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case(name))
                    .map(|h| String::from_utf8_lossy(h.value).to_string())
            };
            let len: usize = get("content-length")?.trim().parse().ok()?;
            let close = get("connection").is_some_and(|c| c.eq_ignore_ascii_case("close"));
            let status = resp.code?;
            while buf.len() < head + len {
                let n = s.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            return Some((status, close));
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn dechunk(mut raw: &[u8]) -> std::io::Result<Vec<u8>> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad chunked body");
    let mut out = Vec::new();
    loop {
        let (used, size) = match httparse::parse_chunk_size(raw) {
            Ok(httparse::Status::Complete(c)) => c,
            _ => return Err(bad()),
        };
        let size = size as usize;
        raw = &raw[used..];
        if size == 0 {
            return Ok(out);
        }
        if raw.len() < size + 2 {
            return Err(bad());
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

/// A raw HTTP/1.1 request builder; headers go out exactly as given.
pub struct Req {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

pub fn get(path: &str) -> Req {
    Req {
        method: "GET".into(),
        path: path.into(),
        headers: vec![],
        body: vec![],
    }
}

pub fn post(path: &str, body: &Value) -> Req {
    post_raw(path, body.to_string().into_bytes())
}

/// A POST of exactly these bytes, as application/json.
pub fn post_raw(path: &str, body: Vec<u8>) -> Req {
    Req {
        method: "POST".into(),
        path: path.into(),
        headers: vec![("Content-Type".into(), "application/json".into())],
        body,
    }
}

/// A small valid chat request.
pub fn chat_body() -> Value {
    json!({"model": "m-small", "messages": [{"role": "user", "content": "Hello"}]})
}

impl Req {
    pub fn header(mut self, name: &str, value: &str) -> Req {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Replaces the default Content-Type (or drops it with `None`).
    pub fn content_type(mut self, value: Option<&str>) -> Req {
        self.headers
            .retain(|(n, _)| !n.eq_ignore_ascii_case("content-type"));
        if let Some(v) = value {
            self.headers.push(("Content-Type".into(), v.into()));
        }
        self
    }

    pub fn bearer(self, token: &str) -> Req {
        self.header("Authorization", &format!("Bearer {token}"))
    }

    pub fn build(&self) -> Vec<u8> {
        let mut out = format!(
            "{} {} HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n",
            self.method, self.path
        );
        for (n, v) in &self.headers {
            out.push_str(&format!("{n}: {v}\r\n"));
        }
        if self.method != "GET" {
            out.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
        }
        out.push_str("\r\n");
        let mut bytes = out.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }

    /// The request without the automatic Content-Length, for framing tests.
    pub fn build_raw_head(&self, extra_head: &str) -> Vec<u8> {
        let mut out = format!(
            "{} {} HTTP/1.1\r\nHost: gateway.test\r\nConnection: close\r\n",
            self.method, self.path
        );
        for (n, v) in &self.headers {
            out.push_str(&format!("{n}: {v}\r\n"));
        }
        out.push_str(extra_head);
        out.push_str("\r\n");
        out.into_bytes()
    }
}
