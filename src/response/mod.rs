//! The response side: what the gateway does to the router's answer on its
//! way back. Bodies pass through as they arrive; SSE streams are cut into
//! events only to find the usage-only final chunk, and the incomplete tail
//! of an event is the most ever held back.

use bytes::{Bytes, BytesMut};
use serde_json::Value;

/// The longest event held while waiting for its end; beyond it the stream
/// is passed through untouched rather than buffered without bound.
const MAX_PENDING_EVENT: usize = 64 * 1024;

/// Removes the usage-only chunk (`"choices": []` with `usage`) that the
/// gateway asked for on the client's behalf, when the client did not.
#[derive(Default)]
pub struct UsageChunkFilter {
    pending: BytesMut,
    /// Set when an event outgrew the bound: pass everything through.
    bypass: bool,
}

impl UsageChunkFilter {
    /// Feeds one body chunk and returns what may go to the client now.
    pub fn push(&mut self, chunk: &[u8], end_of_stream: bool) -> Bytes {
        if self.bypass {
            return Bytes::copy_from_slice(chunk);
        }
        self.pending.extend_from_slice(chunk);
        let mut out = BytesMut::with_capacity(self.pending.len());
        while let Some(end) = event_end(&self.pending) {
            let event = self.pending.split_to(end);
            if !is_usage_only(&event) {
                out.extend_from_slice(&event);
            }
        }
        if end_of_stream || self.pending.len() > MAX_PENDING_EVENT {
            self.bypass = !end_of_stream;
            out.extend_from_slice(&self.pending.split());
        }
        out.freeze()
    }
}

/// The length of the first complete event, its blank-line terminator included.
fn event_end(buf: &[u8]) -> Option<usize> {
    let lf = buf.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
    let crlf = buf.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Whether an SSE event is a `data:` chunk with usage and no choices.
fn is_usage_only(event: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(event) else {
        return false;
    };
    let mut data = String::new();
    for line in text.lines() {
        if let Some(d) = line.strip_prefix("data:") {
            data.push_str(d.trim_start());
        }
    }
    if !data.contains("\"usage\"") {
        return false;
    }
    match serde_json::from_str::<Value>(&data) {
        Ok(v) => {
            v.get("usage").is_some_and(|u| u.is_object())
                && v.get("choices")
                    .and_then(Value::as_array)
                    .is_some_and(|c| c.is_empty())
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNK: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n";
    const USAGE: &str =
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    #[test]
    fn drops_only_the_usage_chunk() {
        let mut f = UsageChunkFilter::default();
        let all = format!("{CHUNK}{USAGE}{DONE}");
        assert_eq!(
            f.push(all.as_bytes(), true),
            format!("{CHUNK}{DONE}").as_bytes()
        );
    }

    #[test]
    fn events_split_across_chunks_are_reassembled_without_holding_complete_ones() {
        let mut f = UsageChunkFilter::default();
        let all = format!("{CHUNK}{USAGE}{DONE}");
        let (a, b) = all.as_bytes().split_at(CHUNK.len() + 10);
        assert_eq!(
            f.push(a, false),
            CHUNK.as_bytes(),
            "the complete event goes out at once"
        );
        assert_eq!(f.push(b, true), DONE.as_bytes());
    }

    #[test]
    fn oversized_events_pass_through() {
        let mut f = UsageChunkFilter::default();
        let big = vec![b'x'; MAX_PENDING_EVENT + 1];
        assert_eq!(f.push(&big, false).len(), big.len());
        assert_eq!(f.push(USAGE.as_bytes(), true), USAGE.as_bytes());
    }
}
