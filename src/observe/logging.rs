//! Logging: JSON lines on stdout through a non-blocking writer, so a slow
//! log consumer never stalls the request path (under pressure, lines are
//! dropped instead). `PORTCULLIS_LOG` sets the filter (default `info`).

use std::sync::{Once, OnceLock};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tracing_appender::non_blocking::{NonBlocking, WorkerGuard};

use crate::policy::rego::CompilerNote;

/// Keeps the writer's thread alive for the life of the process.
static GUARD: OnceLock<WorkerGuard> = OnceLock::new();
/// The writer itself, for lines serialised outside `tracing` (the access log).
static WRITER: OnceLock<NonBlocking> = OnceLock::new();

static INIT: Once = Once::new();

/// The shared non-blocking writer. Logging comes up on first use if the
/// service below has not started it yet: a request served in the moment
/// before it does (a loaded machine, a first request at once) still gets
/// its access line.
pub fn writer() -> Option<NonBlocking> {
    INIT.call_once(init);
    WRITER.get().cloned()
}

/// Installs the subscriber once the server runs: Pingora daemonises in
/// `run_forever`, and the writer's thread must start after the fork.
pub struct LoggingService {
    /// Configuration that weakens security, logged at WARN on every start
    /// (found before logging is up, so held until then).
    pub warnings: Vec<String>,
    /// What the Rego compiler printed while the first snapshot loaded.
    pub rego_notes: Vec<CompilerNote>,
}

#[async_trait]
impl BackgroundService for LoggingService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        INIT.call_once(init);
        tracing::info!(pid = std::process::id(), "portcullis serving");
        for w in &self.warnings {
            tracing::warn!(insecure = true, "{w}");
        }
        for note in &self.rego_notes {
            note.log();
        }
        let _ = shutdown.changed().await;
    }
}

fn init() {
    // The writer thread drains everything queued, then flushes: a buffer
    // turns a burst of lines into one write instead of one per line.
    let out = std::io::BufWriter::with_capacity(64 * 1024, std::io::stdout());
    let (writer, guard) = tracing_appender::non_blocking(out);
    if GUARD.set(guard).is_err() {
        return;
    }
    let _ = WRITER.set(writer.clone());
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
