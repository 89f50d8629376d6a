//! OpenTelemetry traces: one `portcullis.request` server span per request,
//! a child per stage that ran and an `upstream` client span, exported over
//! OTLP (HTTP/protobuf or gRPC).
//!
//! Export never touches the request path: a finished span goes into a
//! bounded queue with `try_send` (a full queue drops it and counts it in
//! `portcullis_telemetry_spans_dropped_total`), and a background service
//! batches the queue into the exporter, each export bounded by
//! `export_timeout_ms`. The SDK's own batch processor counts its drops
//! only in a log line, hence this small one.
//!
//! A span never holds a prompt, a completion, a credential or a token: the
//! attributes are set in one place, [`RequestTrace::finish`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use http::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    Sampler, SdkTracer, SdkTracerProvider, Span, SpanData, SpanExporter as _, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::Deserialize;
use tokio::sync::mpsc;

use super::metrics::METRICS;

/// How the exporter speaks to the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum Protocol {
    #[default]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    #[serde(rename = "grpc")]
    Grpc,
}

/// `[telemetry]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetryConfig {
    /// The collector's base address; HTTP posts to `<endpoint>/v1/traces`.
    pub otlp_endpoint: String,
    pub protocol: Protocol,
    pub service_name: String,
    pub sample_ratio: f64,
    pub export_timeout: Duration,
    pub queue_size: usize,
}

/// Spans per export: large enough that a busy gateway posts a few times a
/// second, small enough that one request body stays well under 1 MiB.
const MAX_BATCH: usize = 1024;
/// How long a span may wait for its batch to fill.
const BATCH_DELAY: Duration = Duration::from_millis(500);

/// The tracer, shared by every request.
pub struct Telemetry {
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
    /// Kept so its processor lives as long as the gateway.
    _provider: SdkTracerProvider,
}

/// The other end of the queue: the background service that exports.
pub struct Exporter {
    config: TelemetryConfig,
    queue: Mutex<Option<mpsc::Receiver<SpanData>>>,
}

impl Telemetry {
    /// The tracer and its export service (to run as a Pingora background
    /// service, so it starts after a daemon's fork).
    pub fn new(config: &TelemetryConfig) -> (Telemetry, Exporter) {
        let (tx, rx) = mpsc::channel(config.queue_size.max(1));
        let provider = SdkTracerProvider::builder()
            .with_span_processor(Queue(tx))
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sample_ratio,
            ))))
            .with_resource(resource(config))
            .build();
        let telemetry = Telemetry {
            tracer: provider.tracer("portcullis"),
            propagator: TraceContextPropagator::new(),
            _provider: provider,
        };
        let exporter = Exporter {
            config: config.clone(),
            queue: Mutex::new(Some(rx)),
        };
        (telemetry, exporter)
    }

    /// Starts a request's server span, under the client's `traceparent`
    /// when it sent a valid one (a malformed one starts a new trace).
    pub fn start_request(self: &Arc<Self>, headers: &HeaderMap, start: SystemTime) -> RequestTrace {
        let parent = self.propagator.extract(&Headers(headers));
        let span = self
            .tracer
            .span_builder("portcullis.request")
            .with_kind(SpanKind::Server)
            .with_start_time(start)
            .start_with_context(&self.tracer, &parent);
        RequestTrace {
            telemetry: self.clone(),
            cx: parent.with_span(span),
            upstream: None,
        }
    }
}

fn resource(config: &TelemetryConfig) -> Resource {
    Resource::builder()
        .with_service_name(config.service_name.clone())
        .build()
}

/// One request's spans.
pub struct RequestTrace {
    telemetry: Arc<Telemetry>,
    /// The context whose span is `portcullis.request`.
    cx: Context,
    /// The `upstream` span's context, from sending to the router on.
    upstream: Option<Context>,
}

/// The attributes of a finished request.
pub struct Finished<'a> {
    pub method: &'a str,
    pub route: Option<&'a str>,
    pub status: u16,
    pub tenant_id: Option<&'a str>,
    pub plan: Option<&'a str>,
    pub key_id: Option<&'a str>,
    pub request_id: &'a str,
    pub reject_code: Option<&'a str>,
    pub operation: Option<&'static str>,
    pub request_model: Option<&'a str>,
    pub max_tokens: Option<u64>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub response_model: Option<&'a str>,
}

impl RequestTrace {
    /// A finished stage as a child span: `start` until now, ERROR when the
    /// stage refused the request.
    pub fn stage(&self, name: &'static str, start: SystemTime, ok: bool) {
        let telemetry = &self.telemetry;
        let mut span = telemetry
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Internal)
            .with_start_time(start)
            .start_with_context(&telemetry.tracer, &self.cx);
        if !ok {
            span.set_status(Status::error("refused"));
        }
        span.end();
    }

    /// Starts the `upstream` client span.
    pub fn start_upstream(&mut self) {
        let telemetry = &self.telemetry;
        let span = telemetry
            .tracer
            .span_builder("upstream")
            .with_kind(SpanKind::Client)
            .start_with_context(&telemetry.tracer, &self.cx);
        self.upstream = Some(self.cx.with_span(span));
    }

    /// The router's `traceparent` (and `tracestate`), whose parent is the
    /// `upstream` span: nothing before that span starts.
    pub fn propagation(&self) -> Vec<(String, String)> {
        let mut headers = Propagated(Vec::with_capacity(2));
        if let Some(up) = &self.upstream {
            self.telemetry.propagator.inject_context(up, &mut headers);
        }
        headers.0
    }

    /// The trace's id, for the access log.
    pub fn trace_id(&self) -> String {
        self.cx.span().span_context().trace_id().to_string()
    }

    /// Ends the upstream span and the request span with what the request
    /// turned out to be.
    pub fn finish(self, f: &Finished<'_>) {
        if let Some(up) = &self.upstream {
            up.span().end();
        }
        let span = self.cx.span();
        if !span.is_recording() {
            return;
        }
        let mut attrs = Vec::with_capacity(16);
        attrs.push(KeyValue::new("http.request.method", f.method.to_owned()));
        attrs.push(KeyValue::new(
            "http.response.status_code",
            i64::from(f.status),
        ));
        attrs.push(KeyValue::new(
            "portcullis.request.id",
            f.request_id.to_owned(),
        ));
        let strings = [
            ("http.route", f.route),
            ("portcullis.tenant.id", f.tenant_id),
            ("portcullis.tenant.plan", f.plan),
            ("portcullis.key.id", f.key_id),
            ("portcullis.reject.code", f.reject_code),
            ("gen_ai.operation.name", f.operation),
            (
                "gen_ai.request.model",
                f.request_model.filter(|m| !m.is_empty()),
            ),
            ("gen_ai.response.model", f.response_model),
        ];
        for (key, value) in strings {
            if let Some(v) = value {
                attrs.push(KeyValue::new(key, v.to_owned()));
            }
        }
        let numbers = [
            ("gen_ai.request.max_tokens", f.max_tokens),
            ("gen_ai.usage.input_tokens", f.input_tokens),
            ("gen_ai.usage.output_tokens", f.output_tokens),
        ];
        for (key, value) in numbers {
            if let Some(n) = value {
                attrs.push(KeyValue::new(key, i64::try_from(n).unwrap_or(i64::MAX)));
            }
        }
        span.set_attributes(attrs);
        if let Some(code) = f.reject_code {
            span.set_status(Status::error(code.to_owned()));
        }
        span.end();
    }
}

/// The processor: a finished span is queued without waiting, or dropped
/// and counted.
#[derive(Debug)]
struct Queue(mpsc::Sender<SpanData>);

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.0.try_send(span).is_err() {
            METRICS.spans_dropped.inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

impl Exporter {
    fn build(&self) -> Result<opentelemetry_otlp::SpanExporter, String> {
        let c = &self.config;
        let built = match c.protocol {
            Protocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(format!(
                    "{}/v1/traces",
                    c.otlp_endpoint.trim_end_matches('/')
                ))
                .with_timeout(c.export_timeout)
                .build(),
            Protocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(c.otlp_endpoint.clone())
                .with_timeout(c.export_timeout)
                .build(),
        };
        let mut exporter = built.map_err(|e| e.to_string())?;
        exporter.set_resource(&resource(c));
        Ok(exporter)
    }
}

#[async_trait]
impl BackgroundService for Exporter {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(mut queue) = self.queue.lock().ok().and_then(|mut q| q.take()) else {
            return;
        };
        let exporter = match self.build() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "the OTLP exporter could not start; spans are dropped");
                return;
            }
        };
        let timeout = self.config.export_timeout;
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut stopping = false;
        loop {
            if !stopping {
                tokio::select! {
                    n = queue.recv_many(&mut batch, MAX_BATCH) => if n == 0 { break },
                    _ = shutdown.changed() => stopping = true,
                }
                if batch.len() < MAX_BATCH && !stopping {
                    // Let the batch fill, unless the gateway is stopping.
                    tokio::select! {
                        _ = tokio::time::sleep(BATCH_DELAY) => {}
                        _ = shutdown.changed() => stopping = true,
                    }
                }
            }
            let room = MAX_BATCH - batch.len();
            if room > 0 {
                while let Ok(span) = queue.try_recv() {
                    batch.push(span);
                    if batch.len() == MAX_BATCH {
                        break;
                    }
                }
            }
            if batch.is_empty() {
                if stopping {
                    break;
                }
                continue;
            }
            let spans = std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH));
            let n = spans.len() as u64;
            match tokio::time::timeout(timeout, exporter.export(spans)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    METRICS.spans_dropped.inc_by(n);
                    tracing::debug!(error = %e, spans = n, "OTLP export failed");
                }
                Err(_) => {
                    METRICS.spans_dropped.inc_by(n);
                    tracing::debug!(spans = n, "OTLP export timed out");
                }
            }
        }
    }
}

/// Request headers as the propagator reads them.
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The router's trace headers as the propagator writes them.
struct Propagated(Vec<(String, String)>);

impl Injector for Propagated {
    fn set(&mut self, key: &str, value: String) {
        self.0.push((key.to_owned(), value));
    }
}
