//! OTLP collectors for the tests, decoding with `opentelemetry-proto` and
//! keeping every span: over HTTP, `POST /v1/traces` (told to stall, it
//! reads requests and never answers, a hung collector), and over gRPC,
//! the `TraceService` served by tonic.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::wrappers::TcpListenerStream;

/// A span as exported, with its resource's `service.name`.
#[derive(Clone, Debug)]
pub struct Exported {
    pub service: String,
    pub span: Span,
}

impl Exported {
    pub fn name(&self) -> &str {
        &self.span.name
    }
    pub fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }
    pub fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }
    pub fn parent_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }
    /// Every attribute, its value as text.
    pub fn attrs(&self) -> HashMap<String, String> {
        self.span
            .attributes
            .iter()
            .map(|kv| {
                let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                    Some(AnyValue::StringValue(s)) => s.clone(),
                    Some(AnyValue::IntValue(i)) => i.to_string(),
                    Some(AnyValue::BoolValue(b)) => b.to_string(),
                    Some(AnyValue::DoubleValue(d)) => d.to_string(),
                    other => format!("{other:?}"),
                };
                (kv.key.clone(), v)
            })
            .collect()
    }
    pub fn attr(&self, key: &str) -> Option<String> {
        self.attrs().remove(key)
    }
    /// The status code: 0 unset, 1 ok, 2 error.
    pub fn status(&self) -> i32 {
        self.span.status.as_ref().map_or(0, |s| s.code)
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub struct Collector {
    pub addr: SocketAddr,
    spans: Arc<Mutex<Vec<Exported>>>,
    posts: Arc<Mutex<usize>>,
}

impl Collector {
    pub async fn start() -> Collector {
        Collector::spawn(false).await
    }

    /// Reads every request and never answers.
    pub async fn stalled() -> Collector {
        Collector::spawn(true).await
    }

    /// The gRPC `TraceService` on an ephemeral port.
    pub async fn grpc() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let posts = Arc::new(Mutex::new(0));
        let service = TraceServiceServer::new(Grpc {
            spans: spans.clone(),
            posts: posts.clone(),
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .serve_with_incoming(service, TcpListenerStream::new(listener)),
        );
        Collector { addr, spans, posts }
    }

    async fn spawn(stall: bool) -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let spans = Arc::new(Mutex::new(Vec::new()));
        let posts = Arc::new(Mutex::new(0));
        let (s, p) = (spans.clone(), posts.clone());
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (s, p) = (s.clone(), p.clone());
                tokio::spawn(async move {
                    let _ = serve(conn, &s, &p, stall).await;
                });
            }
        });
        Collector { addr, spans, posts }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<Exported> {
        self.spans.lock().unwrap().clone()
    }

    /// How many export requests arrived.
    pub fn posts(&self) -> usize {
        *self.posts.lock().unwrap()
    }

    /// Waits (up to 10 s) until `done` holds for the spans received.
    pub async fn wait_for(&self, what: &str, done: impl Fn(&[Exported]) -> bool) -> Vec<Exported> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "collector: {what} never arrived; got {:?}",
                spans
                    .iter()
                    .map(|s| s.name().to_owned())
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn serve(
    mut conn: TcpStream,
    spans: &Mutex<Vec<Exported>>,
    posts: &Mutex<usize>,
    stall: bool,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let (head_len, body_len, path) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut req = httparse::Request::new(&mut headers);
            if let Ok(httparse::Status::Complete(n)) = req.parse(&buf) {
                let len = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                    .unwrap_or(0usize);
                break (n, len, req.path.unwrap_or_default().to_owned());
            }
            let mut chunk = [0u8; 16384];
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        while buf.len() < head_len + body_len {
            let mut chunk = [0u8; 65536];
            let n = conn.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let body: Vec<u8> = buf.drain(..head_len + body_len).skip(head_len).collect();
        *posts.lock().unwrap() += 1;
        if stall {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        let status = match (
            path.as_str(),
            ExportTraceServiceRequest::decode(body.as_slice()),
        ) {
            ("/v1/traces", Ok(req)) => {
                keep(spans, req);
                "200 OK"
            }
            _ => "400 Bad Request",
        };
        let answer = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n"
        );
        conn.write_all(answer.as_bytes()).await?;
    }
}

/// Every span of one export, with its resource's service name.
fn keep(spans: &Mutex<Vec<Exported>>, req: ExportTraceServiceRequest) {
    let mut kept = spans.lock().unwrap();
    for rs in req.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                AnyValue::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for span in ss.spans {
                kept.push(Exported {
                    service: service.clone(),
                    span,
                });
            }
        }
    }
}

struct Grpc {
    spans: Arc<Mutex<Vec<Exported>>>,
    posts: Arc<Mutex<usize>>,
}

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        *self.posts.lock().unwrap() += 1;
        keep(&self.spans, request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}
