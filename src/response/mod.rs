//! The response side: what the gateway does to the router's answer on its
//! way back. Bodies pass through as they arrive, and the gateway reads the
//! real token `usage` from them to settle the tenant's reservation: from the
//! JSON body, or from the final SSE chunk. SSE streams are cut into events
//! only to find that chunk; the incomplete tail of an event is the most
//! ever held back.

use bytes::{Bytes, BytesMut};
use serde_json::Value;

/// The longest event held while waiting for its end; beyond it the stream
/// is passed through untouched rather than buffered without bound.
const MAX_PENDING_EVENT: usize = 64 * 1024;

/// The largest JSON response copied aside to read its usage; a larger one
/// settles at its reservation.
const MAX_JSON_COPY: usize = 4 * 1024 * 1024;

/// Token usage as the router reported it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }

    fn from_json(v: &Value) -> Option<Usage> {
        Usage::from_member(v.get("usage")?)
    }

    /// OpenAI's `prompt_tokens` and `completion_tokens`; an answer that
    /// reports only `total_tokens` (rerank, a tokenizer) has it counted as
    /// prompt tokens.
    fn from_member(u: &Value) -> Option<Usage> {
        let field = |k: &str| u.get(k).and_then(Value::as_u64);
        let (prompt, completion) = (field("prompt_tokens"), field("completion_tokens"));
        Some(Usage {
            prompt_tokens: prompt
                .or(completion.map(|_| 0))
                .or(field("total_tokens"))
                .unwrap_or(0),
            completion_tokens: completion.unwrap_or(0),
        })
    }
}

/// A response body read for its `usage` alone: the other members (the
/// choices, often most of the body) are skipped, never built.
#[derive(serde::Deserialize)]
struct UsageMember {
    usage: Option<Value>,
}

/// Watches one response body for its usage.
pub enum UsageTap {
    /// An SSE stream: usage arrives in the final chunk, which is hidden
    /// from clients that did not ask for it.
    Stream(StreamTap),
    /// A JSON body, copied aside (bounded) and read at the end.
    Json { copy: Vec<u8>, overflow: bool },
}

impl UsageTap {
    pub fn json() -> Self {
        UsageTap::Json {
            copy: Vec::new(),
            overflow: false,
        }
    }

    /// Feeds one chunk; returns what goes to the client now.
    pub fn push(&mut self, chunk: Bytes, end_of_stream: bool) -> Bytes {
        match self {
            UsageTap::Stream(s) => s.push(&chunk, end_of_stream),
            UsageTap::Json { copy, overflow } => {
                if !*overflow {
                    if copy.len() + chunk.len() > MAX_JSON_COPY {
                        *overflow = true;
                        *copy = Vec::new();
                    } else {
                        copy.extend_from_slice(&chunk);
                    }
                }
                chunk
            }
        }
    }

    /// The usage seen, once the body is complete.
    pub fn usage(&self) -> Option<Usage> {
        match self {
            UsageTap::Stream(s) => s.usage,
            UsageTap::Json { copy, overflow } if !*overflow => {
                serde_json::from_slice::<UsageMember>(copy)
                    .ok()
                    .and_then(|v| Usage::from_member(&v.usage?))
            }
            UsageTap::Json { .. } => None,
        }
    }
}

/// Reads the usage-only chunk (`"choices": []` with `usage`) of an SSE
/// stream, and removes it when the gateway asked for it on the client's
/// behalf.
#[derive(Default)]
pub struct StreamTap {
    /// Remove the usage chunk from what the client receives.
    pub hide_usage: bool,
    pub usage: Option<Usage>,
    pending: BytesMut,
    /// Set when an event outgrew the bound: pass everything through.
    bypass: bool,
}

impl StreamTap {
    pub fn new(hide_usage: bool) -> Self {
        StreamTap {
            hide_usage,
            ..StreamTap::default()
        }
    }

    /// Feeds one body chunk and returns what may go to the client now.
    pub fn push(&mut self, chunk: &[u8], end_of_stream: bool) -> Bytes {
        if self.bypass {
            return Bytes::copy_from_slice(chunk);
        }
        self.pending.extend_from_slice(chunk);
        let mut out = BytesMut::with_capacity(self.pending.len());
        while let Some(end) = event_end(&self.pending) {
            let event = self.pending.split_to(end);
            match usage_only(&event) {
                Some(u) => {
                    self.usage = Some(u);
                    if !self.hide_usage {
                        out.extend_from_slice(&event);
                    }
                }
                None => out.extend_from_slice(&event),
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

/// The usage of an SSE event that is a `data:` chunk with usage and no choices.
fn usage_only(event: &[u8]) -> Option<Usage> {
    let text = std::str::from_utf8(event).ok()?;
    let mut data = String::new();
    for line in text.lines() {
        if let Some(d) = line.strip_prefix("data:") {
            data.push_str(d.trim_start());
        }
    }
    if !data.contains("\"usage\"") {
        return None;
    }
    let v = serde_json::from_str::<Value>(&data).ok()?;
    let no_choices = v
        .get("choices")
        .and_then(Value::as_array)
        .is_some_and(|c| c.is_empty());
    if no_choices && v.get("usage").is_some_and(Value::is_object) {
        Usage::from_json(&v)
    } else {
        None
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
    fn drops_only_the_usage_chunk_and_reads_it() {
        let mut f = StreamTap::new(true);
        let all = format!("{CHUNK}{USAGE}{DONE}");
        assert_eq!(
            f.push(all.as_bytes(), true),
            format!("{CHUNK}{DONE}").as_bytes()
        );
        assert_eq!(f.usage.map(|u| u.total()), Some(7));
        let mut keep = StreamTap::new(false);
        assert_eq!(keep.push(all.as_bytes(), true), all.as_bytes());
        assert_eq!(keep.usage.map(|u| u.completion_tokens), Some(2));
    }

    #[test]
    fn json_bodies_yield_their_usage() {
        let mut t = UsageTap::json();
        let body = br#"{"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":4}}"#;
        let (a, b) = body.split_at(20);
        t.push(Bytes::copy_from_slice(a), false);
        t.push(Bytes::copy_from_slice(b), true);
        assert_eq!(t.usage().map(|u| u.total()), Some(15));
        let mut broken = UsageTap::json();
        broken.push(Bytes::from_static(b"{\"usage\":"), true);
        assert_eq!(broken.usage(), None);
        // A rerank or tokenizer answer reports only a total.
        let mut total = UsageTap::json();
        total.push(
            Bytes::from_static(br#"{"results":[],"usage":{"total_tokens":9}}"#),
            true,
        );
        assert_eq!(
            total.usage(),
            Some(Usage {
                prompt_tokens: 9,
                completion_tokens: 0
            })
        );
    }

    #[test]
    fn events_split_across_chunks_are_reassembled_without_holding_complete_ones() {
        let mut f = StreamTap::new(true);
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
        let mut f = StreamTap::new(true);
        let big = vec![b'x'; MAX_PENDING_EVENT + 1];
        assert_eq!(f.push(&big, false).len(), big.len());
        assert_eq!(f.push(USAGE.as_bytes(), true), USAGE.as_bytes());
    }
}
