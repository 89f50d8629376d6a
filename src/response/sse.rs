//! SSE answers, cut into events to read each dialect's usage:
//! - OpenAI chat and completions: the usage-only chunk (`"choices": []`),
//!   removed when the gateway asked for it on the client's behalf;
//! - Responses: the `response` object of `response.completed`,
//!   `response.incomplete` or `response.failed`, with `response.id` bound
//!   to the tenant in every event that carries one;
//! - Anthropic: `message_start` (input and cache tokens) plus the last
//!   `message_delta` (cumulative `output_tokens`).
//!
//! Complete events go out at once; the incomplete tail of an event is the
//! most ever held back, and an event beyond [`MAX_PENDING_EVENT`] turns the
//! tap into a plain pass-through.

use bytes::{Bytes, BytesMut};
use serde_json::Value;

use super::Usage;
use crate::ids::Binding;
use crate::route::Dialect;

/// The longest event held while waiting for its end; beyond it the stream
/// is passed through untouched rather than buffered without bound.
pub const MAX_PENDING_EVENT: usize = 64 * 1024;

/// Reads one SSE answer.
pub struct StreamTap {
    dialect: Dialect,
    /// Remove the usage chunk from what the client receives (OpenAI).
    pub hide_usage: bool,
    pub usage: Option<Usage>,
    /// The model the answer names, from the event that carries its usage.
    pub model: Option<String>,
    /// Whether the usage is charged (a stored response's replay is not).
    pub charge: bool,
    pending: BytesMut,
    /// Set when an event outgrew the bound: pass everything through.
    bypass: bool,
}

impl StreamTap {
    pub fn new(dialect: Dialect, hide_usage: bool) -> Self {
        StreamTap {
            dialect,
            hide_usage,
            usage: None,
            model: None,
            charge: true,
            pending: BytesMut::new(),
            bypass: false,
        }
    }

    /// Whether the events that leave can differ from those that came.
    pub fn rewrites(&self) -> bool {
        self.hide_usage || self.binds_ids()
    }

    pub fn binds_ids(&self) -> bool {
        self.dialect == Dialect::Responses
    }

    /// Feeds one body chunk and returns what may go to the client now.
    pub fn push(&mut self, chunk: &[u8], end_of_stream: bool, ids: &Binding) -> Bytes {
        if self.bypass {
            return Bytes::copy_from_slice(chunk);
        }
        self.pending.extend_from_slice(chunk);
        let mut out = BytesMut::with_capacity(self.pending.len());
        while let Some(end) = event_end(&self.pending) {
            let event = self.pending.split_to(end);
            self.read_event(&event, ids, &mut out);
        }
        if end_of_stream || self.pending.len() > MAX_PENDING_EVENT {
            self.bypass = !end_of_stream;
            out.extend_from_slice(&self.pending.split());
        }
        out.freeze()
    }

    /// Reads one complete event and writes what the client gets of it.
    fn read_event(&mut self, event: &[u8], ids: &Binding, out: &mut BytesMut) {
        let Some(data) = event_data(event) else {
            out.extend_from_slice(event);
            return;
        };
        match self.dialect {
            Dialect::OpenAi => {
                if let Some((u, model)) = openai_usage(&data) {
                    self.usage = Some(u);
                    self.model = model;
                    if self.hide_usage {
                        return;
                    }
                }
                out.extend_from_slice(event);
            }
            Dialect::Anthropic => {
                self.read_anthropic(&data);
                out.extend_from_slice(event);
            }
            Dialect::Responses => match self.read_responses(&data, ids) {
                Some(rewritten) => {
                    for line in split_lines(event).filter(|l| !is_data_line(l)) {
                        out.extend_from_slice(line);
                        out.extend_from_slice(b"\n");
                    }
                    out.extend_from_slice(b"data: ");
                    out.extend_from_slice(&rewritten);
                    out.extend_from_slice(b"\n\n");
                }
                None => out.extend_from_slice(event),
            },
        }
    }

    /// A Responses event that carries the `response` object: its usage when
    /// the response ended, and the event with the object's ids bound.
    fn read_responses(&mut self, data: &str, ids: &Binding) -> Option<Vec<u8>> {
        if !data.contains("\"response\"") {
            return None;
        }
        let mut v = serde_json::from_str::<Value>(data).ok()?;
        let ended = matches!(
            v.get("type").and_then(Value::as_str),
            Some("response.completed" | "response.incomplete" | "response.failed")
        );
        let response = v.get_mut("response").filter(|r| r.is_object())?;
        if ended {
            if let Some(u) = response.get("usage").and_then(Usage::from_member) {
                self.usage = Some(u);
                self.model = super::model_name(response.get("model"));
            }
        }
        if !ids.bind_members(response) {
            return None;
        }
        serde_json::to_vec(&v).ok()
    }

    /// `message_start` sets the input side, each `message_delta` the
    /// output so far (and the input, when a newer API version reports it).
    fn read_anthropic(&mut self, data: &str) {
        if !data.contains("\"usage\"") {
            return;
        }
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            return;
        };
        let usage = match v.get("type").and_then(Value::as_str) {
            Some("message_start") => {
                self.model = super::model_name(v.get("message").and_then(|m| m.get("model")));
                v.get("message").and_then(|m| m.get("usage"))
            }
            Some("message_delta") => v.get("usage"),
            _ => None,
        };
        let Some(seen) = usage.and_then(Usage::from_member) else {
            return;
        };
        let has_input = usage.is_some_and(|u| u.get("input_tokens").is_some());
        let so_far = self.usage.get_or_insert_with(Usage::default);
        if has_input {
            so_far.prompt_tokens = seen.prompt_tokens;
            so_far.cached_tokens = seen.cached_tokens;
        }
        so_far.completion_tokens = seen.completion_tokens;
    }
}

/// The length of the first complete event, its blank-line terminator included.
fn event_end(buf: &[u8]) -> Option<usize> {
    let lf = memchr::memmem::find(buf, b"\n\n").map(|i| i + 2);
    let crlf = memchr::memmem::find(buf, b"\r\n\r\n").map(|i| i + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn split_lines(event: &[u8]) -> impl Iterator<Item = &[u8]> {
    event
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| !l.is_empty())
}

fn is_data_line(line: &[u8]) -> bool {
    line.starts_with(b"data:")
}

/// The joined `data:` lines of an event, if it has any and is UTF-8.
fn event_data(event: &[u8]) -> Option<String> {
    let mut data = String::new();
    let mut any = false;
    for line in split_lines(event).filter(|l| is_data_line(l)) {
        let d = std::str::from_utf8(&line[5..]).ok()?;
        if any {
            data.push('\n');
        }
        data.push_str(d.strip_prefix(' ').unwrap_or(d));
        any = true;
    }
    any.then_some(data)
}

/// The usage of an OpenAI chunk with usage and no choices, and the model
/// it names.
fn openai_usage(data: &str) -> Option<(Usage, Option<String>)> {
    if !data.contains("\"usage\"") {
        return None;
    }
    let v = serde_json::from_str::<Value>(data).ok()?;
    let no_choices = v
        .get("choices")
        .and_then(Value::as_array)
        .is_some_and(|c| c.is_empty());
    if no_choices {
        Some((
            Usage::from_member(v.get("usage")?)?,
            super::model_name(v.get("model")),
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ResponseIds;

    const CHUNK: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n";
    const USAGE: &str =
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":2}}\n\n";
    const DONE: &str = "data: [DONE]\n\n";

    fn keys() -> ResponseIds {
        ResponseIds::from_key(&[3; 32]).unwrap()
    }

    fn run(tap: &mut StreamTap, input: &str, ids: &Binding) -> String {
        String::from_utf8(tap.push(input.as_bytes(), true, ids).to_vec()).unwrap()
    }

    #[test]
    fn drops_only_the_usage_chunk_and_reads_it() {
        let keys = keys();
        let ids = Binding::new(&keys, "t");
        let mut f = StreamTap::new(Dialect::OpenAi, true);
        let all = format!("{CHUNK}{USAGE}{DONE}");
        assert_eq!(run(&mut f, &all, &ids), format!("{CHUNK}{DONE}"));
        assert_eq!(f.usage.map(|u| u.total()), Some(7));
        let mut keep = StreamTap::new(Dialect::OpenAi, false);
        assert_eq!(run(&mut keep, &all, &ids), all);
        assert_eq!(keep.usage.map(|u| u.completion_tokens), Some(2));
    }

    #[test]
    fn events_split_across_chunks_are_reassembled_without_holding_complete_ones() {
        let keys = keys();
        let ids = Binding::new(&keys, "t");
        let mut f = StreamTap::new(Dialect::OpenAi, true);
        let all = format!("{CHUNK}{USAGE}{DONE}");
        let (a, b) = all.as_bytes().split_at(CHUNK.len() + 10);
        assert_eq!(
            f.push(a, false, &ids),
            CHUNK.as_bytes(),
            "the complete event goes out at once"
        );
        assert_eq!(f.push(b, true, &ids), DONE.as_bytes());
    }

    #[test]
    fn oversized_events_pass_through() {
        let keys = keys();
        let ids = Binding::new(&keys, "t");
        let mut f = StreamTap::new(Dialect::OpenAi, true);
        let big = vec![b'x'; MAX_PENDING_EVENT + 1];
        assert_eq!(f.push(&big, false, &ids).len(), big.len());
        assert_eq!(f.push(USAGE.as_bytes(), true, &ids), USAGE.as_bytes());
    }

    #[test]
    fn responses_usage_comes_from_the_final_event_and_every_response_id_is_bound() {
        let keys = keys();
        let ids = Binding::new(&keys, "acme");
        for last in [
            "response.completed",
            "response.incomplete",
            "response.failed",
        ] {
            let stream = format!(
                "event: response.created\ndata: {{\"type\":\"response.created\",\"response\":{{\"id\":\"resp_9\",\"usage\":null}}}}\n\n\
                 event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"item_id\":\"msg_1\",\"delta\":\"Hi\"}}\n\n\
                 event: {last}\ndata: {{\"type\":\"{last}\",\"response\":{{\"id\":\"resp_9\",\"usage\":{{\"input_tokens\":12,\"output_tokens\":5}}}}}}\n\n"
            );
            let mut tap = StreamTap::new(Dialect::Responses, false);
            let out = run(&mut tap, &stream, &ids);
            assert_eq!(
                tap.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
                Some((12, 5)),
                "{last}"
            );
            assert!(!out.contains("\"resp_9\""), "no router id leaves: {out}");
            let events: Vec<&str> = out.split("\n\n").filter(|e| !e.is_empty()).collect();
            assert_eq!(events.len(), 3);
            assert!(events[0].starts_with("event: response.created\ndata: "));
            assert!(
                events[1].contains("\"item_id\":\"msg_1\""),
                "other events unchanged"
            );
            let bound: Vec<String> = [events[0], events[2]]
                .iter()
                .map(|e| {
                    let data = e.split_once("data: ").unwrap().1;
                    let v: Value = serde_json::from_str(data).unwrap();
                    v["response"]["id"].as_str().unwrap().to_string()
                })
                .collect();
            assert_eq!(bound[0], bound[1], "one response, one bound id");
            assert_eq!(keys.open("acme", &bound[0]).as_deref(), Some("resp_9"));
        }
    }

    #[test]
    fn anthropic_usage_is_message_start_plus_the_last_message_delta() {
        let keys = keys();
        let ids = Binding::new(&keys, "t");
        let stream = "event: message_start\r\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"usage\":{\"input_tokens\":10,\"cache_creation_input_tokens\":4,\"cache_read_input_tokens\":6,\"output_tokens\":1}}}\r\n\r\n\
            event: content_block_delta\r\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"usage\"}}\r\n\r\n\
            event: message_delta\r\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":7}}\r\n\r\n\
            event: message_delta\r\ndata: {\"type\":\"message_delta\",\"delta\":{},\"usage\":{\"output_tokens\":9}}\r\n\r\n\
            event: message_stop\r\ndata: {\"type\":\"message_stop\"}\r\n\r\n";
        let mut tap = StreamTap::new(Dialect::Anthropic, false);
        assert_eq!(run(&mut tap, stream, &ids), stream, "passed unchanged");
        assert_eq!(
            tap.usage.map(|u| (u.prompt_tokens, u.completion_tokens)),
            Some((20, 9))
        );
    }
}
