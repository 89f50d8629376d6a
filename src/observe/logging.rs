//! Logging: JSON lines on stdout through a non-blocking writer, so a slow
//! log consumer never stalls the request path (under pressure, lines are
//! dropped instead). `PORTCULLIS_LOG` sets the filter (default `info`).

use std::sync::OnceLock;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tracing_appender::non_blocking::WorkerGuard;

/// Keeps the writer's thread alive for the life of the process.
static GUARD: OnceLock<WorkerGuard> = OnceLock::new();

/// Installs the subscriber once the server runs: Pingora daemonises in
/// `run_forever`, and the writer's thread must start after the fork.
pub struct LoggingService;

#[async_trait]
impl BackgroundService for LoggingService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        init();
        tracing::info!(pid = std::process::id(), "portcullis serving");
        let _ = shutdown.changed().await;
    }
}

fn init() {
    let (writer, guard) = tracing_appender::non_blocking(std::io::stdout());
    if GUARD.set(guard).is_err() {
        return;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("PORTCULLIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_env_filter(filter)
        .with_writer(writer)
        .try_init();
}
