//! Observability: Prometheus metrics, the JSON access log and OTLP traces.

pub mod access_log;
pub mod logging;
pub mod metrics;
pub mod telemetry;
