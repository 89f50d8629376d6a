//! One JSON line per request under the target `access`: time, request id,
//! tenant, route, model, method, status, reject code, latencies and tokens;
//! never a prompt, key or token.
//!
//! The line is serialised straight into a shared batch rather than through
//! `tracing`'s formatter, which costs several times more per request. The
//! batch goes to the non-blocking log writer (one writer thread, so access
//! lines never interleave with other logs) once it holds [`BATCH`] bytes or
//! when [`flush`] runs, every [`FLUSH_EVERY`]: one hand-off and one writer
//! wake-up per batch instead of per request. It is written when the `access`
//! target is enabled at `info` (`PORTCULLIS_LOG=warn` turns it off).

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use super::logging;

/// What one finished request looked like.
#[derive(Serialize)]
pub struct AccessRecord<'a> {
    pub request_id: &'a str,
    pub tenant: &'a str,
    pub route: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<&'a str>,
    pub method: &'a str,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reject_code: Option<&'a str>,
    pub gateway_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<u64>,
}

/// Lines not yet handed to the writer.
static PENDING: Mutex<Vec<u8>> = Mutex::new(Vec::new());
/// A batch this large goes to the writer at once.
const BATCH: usize = 32 * 1024;
/// The most a batch may hold if the writer's queue stays full; beyond it
/// lines are dropped, as the writer itself does.
const MAX_PENDING: usize = 4 * 1024 * 1024;
/// How often a partial batch is handed over, so a quiet gateway's lines are
/// late by at most this.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

#[derive(Serialize)]
struct Line<'a> {
    #[serde(serialize_with = "serialize_display")]
    timestamp: humantime::Rfc3339Timestamp,
    level: &'static str,
    target: &'static str,
    #[serde(flatten)]
    record: &'a AccessRecord<'a>,
}

/// Writes a `Display` value as a JSON string without an intermediate `String`.
fn serialize_display<S: serde::Serializer>(
    v: &humantime::Rfc3339Timestamp,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

pub fn write(r: &AccessRecord<'_>) {
    if !tracing::enabled!(target: "access", tracing::Level::INFO) {
        return;
    }
    let line = Line {
        timestamp: humantime::format_rfc3339_micros(SystemTime::now()),
        level: "INFO",
        target: "access",
        record: r,
    };
    let mut pending = PENDING.lock().unwrap_or_else(|e| e.into_inner());
    if pending.len() >= MAX_PENDING {
        return;
    }
    let start = pending.len();
    if serde_json::to_writer(&mut *pending, &line).is_err() {
        pending.truncate(start);
        return;
    }
    pending.push(b'\n');
    if pending.len() >= BATCH {
        let batch = std::mem::take(&mut *pending);
        drop(pending);
        hand_over(batch);
    }
}

/// Hands whatever is pending to the writer.
pub fn flush() {
    let batch = std::mem::take(&mut *PENDING.lock().unwrap_or_else(|e| e.into_inner()));
    if !batch.is_empty() {
        hand_over(batch);
    }
}

fn hand_over(batch: Vec<u8>) {
    if let Some(mut out) = logging::writer() {
        // The writer drops a batch rather than block when its queue is full.
        let _ = out.write_all(&batch);
    }
}
