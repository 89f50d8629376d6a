//! The response side: what the gateway does to the router's answer on its
//! way back. Bodies pass through as they arrive, and the gateway reads the
//! real token `usage` from them to settle the tenant's reservation: from the
//! JSON body, or from the SSE events of the route's dialect
//! ([`sse`]). On Responses routes the router's ids are bound to the tenant
//! on the way out ([`crate::ids`]); only then is a JSON body held whole.

pub mod sse;
mod usage;

use bytes::Bytes;
use serde_json::Value;

use crate::ids::Binding;
use crate::route::Dialect;
pub use sse::StreamTap;
pub use usage::Usage;
use usage::UsageMember;

/// The largest JSON response copied aside to read its usage (or held to
/// bind its ids); a larger one settles at its reservation and passes
/// unchanged.
const MAX_JSON_COPY: usize = 4 * 1024 * 1024;

/// The members of a JSON answer the gateway reads, parsed once when the
/// body is complete: the others (the choices, the output, often most of
/// the body) are skipped, never built.
#[derive(serde::Deserialize)]
struct AnswerMembers {
    #[serde(default)]
    usage: UsageMember,
    model: Option<Value>,
    id: Option<Value>,
    previous_response_id: Option<Value>,
}

/// The same for an answer whose ids are not bound: its usage alone.
#[derive(serde::Deserialize)]
struct UsageMembers {
    #[serde(default)]
    usage: UsageMember,
    model: Option<Value>,
}

/// The longest model name kept from an answer (for the trace).
const MAX_MODEL_NAME: usize = 256;

/// The model an answer names in its `model` member, if it is a short
/// string.
fn model_name(model: Option<&Value>) -> Option<String> {
    model
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty() && m.len() <= MAX_MODEL_NAME)
        .map(str::to_owned)
}

/// Watches one response body for its usage.
pub enum UsageTap {
    /// An SSE stream, read event by event in the route's dialect.
    Stream(StreamTap),
    /// A JSON body, copied aside (bounded) and read at the end.
    Json(JsonTap),
}

/// A JSON answer. Usually copied aside while it passes; on a Responses
/// route held whole instead, so its ids can be bound before it leaves.
pub struct JsonTap {
    copy: Vec<u8>,
    overflow: bool,
    bind_ids: bool,
    /// Whether its usage is charged (a stored response's is not).
    charge: bool,
    /// Read when the body is complete.
    usage: Option<Usage>,
    model: Option<String>,
}

impl JsonTap {
    fn new(bind_ids: bool, charge: bool) -> JsonTap {
        JsonTap {
            copy: Vec::new(),
            overflow: false,
            bind_ids,
            charge,
            usage: None,
            model: None,
        }
    }
}

impl UsageTap {
    /// A JSON answer's tap; `bind_ids` for a Responses object.
    pub fn json(bind_ids: bool) -> Self {
        UsageTap::Json(JsonTap::new(bind_ids, true))
    }

    /// A stored response: its ids are bound, its usage is not charged.
    pub fn ids_only() -> Self {
        UsageTap::Json(JsonTap::new(true, false))
    }

    /// The tap for what the answer turned out to be, when the request
    /// expected the other: a stream that came back as JSON (an error), or
    /// a stored response replayed as SSE (`?stream=true`).
    pub fn for_answer(&self, is_sse: bool) -> Option<UsageTap> {
        match self {
            UsageTap::Stream(s) if !is_sse => {
                Some(UsageTap::Json(JsonTap::new(s.binds_ids(), s.charge)))
            }
            UsageTap::Json(j) if is_sse && j.bind_ids => {
                let mut s = StreamTap::new(Dialect::Responses, false);
                s.charge = j.charge;
                Some(UsageTap::Stream(s))
            }
            _ => None,
        }
    }

    /// Whether what reaches the client may differ in length from what the
    /// router sent, so its `content-length` must go.
    pub fn rewrites(&self) -> bool {
        match self {
            UsageTap::Stream(s) => s.rewrites(),
            UsageTap::Json(j) => j.bind_ids,
        }
    }

    /// Whether the whole answer is held until it ends (to bind its ids),
    /// so its length is known before its head leaves.
    pub fn holds_body(&self) -> bool {
        matches!(self, UsageTap::Json(j) if j.bind_ids && !j.overflow)
    }

    /// Feeds one chunk; returns what goes to the client now.
    pub fn push(&mut self, chunk: Bytes, end_of_stream: bool, ids: &Binding) -> Bytes {
        match self {
            UsageTap::Stream(s) => s.push(&chunk, end_of_stream, ids),
            UsageTap::Json(j) => j.push(chunk, end_of_stream, ids),
        }
    }

    /// The model the answer names, when it names one.
    pub fn model(&self) -> Option<&str> {
        match self {
            UsageTap::Stream(s) => s.model.as_deref(),
            UsageTap::Json(j) => j.model.as_deref(),
        }
    }

    /// The usage seen, once the body is complete.
    pub fn usage(&self) -> Option<Usage> {
        match self {
            UsageTap::Stream(s) if s.charge => s.usage,
            UsageTap::Stream(_) => None,
            UsageTap::Json(j) if j.charge => j.usage,
            UsageTap::Json(_) => None,
        }
    }
}

impl JsonTap {
    fn push(&mut self, chunk: Bytes, end_of_stream: bool, ids: &Binding) -> Bytes {
        if self.overflow {
            return chunk;
        }
        if self.copy.len() + chunk.len() > MAX_JSON_COPY {
            self.overflow = true;
            if self.bind_ids {
                tracing::warn!("a Responses answer too large to bind its ids passed unchanged");
                let mut held = std::mem::take(&mut self.copy);
                held.extend_from_slice(&chunk);
                return held.into();
            }
            self.copy = Vec::new();
            return chunk;
        }
        self.copy.extend_from_slice(&chunk);
        let out = if self.bind_ids { Bytes::new() } else { chunk };
        if !end_of_stream {
            return out;
        }
        if !self.bind_ids {
            if let Ok(m) = serde_json::from_slice::<UsageMembers>(&self.copy) {
                self.usage = m.usage.usage();
                self.model = model_name(m.model.as_ref());
            }
            return out;
        }
        let Ok(members) = serde_json::from_slice::<AnswerMembers>(&self.copy) else {
            // Not JSON (an error page): nothing to read, nothing to bind.
            return std::mem::take(&mut self.copy).into();
        };
        self.usage = members.usage.usage();
        self.model = model_name(members.model.as_ref());
        bind_in_place(&self.copy, &members, ids)
            .unwrap_or_else(|| rebuild_bound(&self.copy, ids))
            .into()
    }
}

/// The held answer with its router ids replaced by their bound form where
/// they stand, which keeps the rest byte for byte. `None` when an id is
/// written with escapes, so its raw bytes are not where a search finds
/// them: the document is then rebuilt ([`rebuild_bound`]).
fn bind_in_place(raw: &[u8], members: &AnswerMembers, ids: &Binding) -> Option<Vec<u8>> {
    let mut out = raw.to_vec();
    let router_ids = [&members.id, &members.previous_response_id];
    for id in router_ids.into_iter().flatten().filter_map(Value::as_str) {
        let Some(bound) = ids.bind(id) else {
            tracing::warn!("a router id too long to bind passed unbound");
            continue;
        };
        let needle = format!("\"{id}\"");
        let found: Vec<usize> = memchr::memmem::find_iter(&out, needle.as_bytes()).collect();
        if found.is_empty() {
            return None;
        }
        let mut next = Vec::with_capacity(out.len() + found.len() * bound.len());
        let mut at = 0;
        for start in found {
            next.extend_from_slice(&out[at..start]);
            next.push(b'"');
            next.extend_from_slice(bound.as_bytes());
            next.push(b'"');
            at = start + needle.len();
        }
        next.extend_from_slice(&out[at..]);
        out = next;
    }
    Some(out)
}

/// The held answer parsed, its ids bound, and serialised again.
fn rebuild_bound(raw: &[u8], ids: &Binding) -> Vec<u8> {
    serde_json::from_slice::<Value>(raw)
        .ok()
        .and_then(|mut doc| ids.bind_members(&mut doc).then_some(doc))
        .and_then(|doc| serde_json::to_vec(&doc).ok())
        .unwrap_or_else(|| raw.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_names_its_model_only_when_short_and_a_string() {
        let name = |v: serde_json::Value| model_name(v.get("model"));
        assert_eq!(
            name(serde_json::json!({"model": "m-1"})).as_deref(),
            Some("m-1")
        );
        assert_eq!(name(serde_json::json!({"model": 7})), None);
        assert_eq!(name(serde_json::json!({"model": ""})), None);
        assert_eq!(name(serde_json::json!({"model": "x".repeat(257)})), None);
    }
    use crate::ids::ResponseIds;

    #[test]
    fn json_bodies_yield_their_usage_in_every_dialect() {
        let ids = ResponseIds::from_key(&[1; 32]).unwrap();
        let ids = Binding::new(&ids, "t");
        let usage = |body: &'static [u8]| {
            let mut t = UsageTap::json(false);
            let (a, b) = body.split_at(body.len() / 2);
            t.push(Bytes::from_static(a), false, &ids);
            t.push(Bytes::from_static(b), true, &ids);
            t.usage().map(|u| (u.prompt_tokens, u.completion_tokens))
        };
        assert_eq!(
            usage(br#"{"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":4}}"#),
            Some((11, 4))
        );
        assert_eq!(usage(br#"{"usage":"#), None);
        // A rerank or tokenizer answer reports only a total.
        assert_eq!(
            usage(br#"{"results":[],"usage":{"total_tokens":9}}"#),
            Some((9, 0))
        );
        assert_eq!(
            usage(br#"{"object":"response","usage":{"input_tokens":7,"output_tokens":3,"total_tokens":10}}"#),
            Some((7, 3))
        );
        assert_eq!(
            usage(br#"{"type":"message","usage":{"input_tokens":5,"cache_creation_input_tokens":2,"cache_read_input_tokens":1,"output_tokens":4}}"#),
            Some((8, 4))
        );
    }

    #[test]
    fn a_usage_of_another_type_costs_nothing_else_in_the_answer() {
        let keys = ResponseIds::from_key(&[1; 32]).unwrap();
        let ids = Binding::new(&keys, "acme");
        let body = br#"{"id":"resp_1","model":"m-1","usage":[{"input_tokens":2}]}"#;
        let mut tap = UsageTap::json(true);
        let out = tap.push(Bytes::from_static(body), true, &ids);
        assert_eq!(tap.usage(), None);
        assert_eq!(tap.model(), Some("m-1"));
        let out: Value = serde_json::from_slice(&out).unwrap();
        let bound = out["id"].as_str().unwrap();
        assert_ne!(bound, "resp_1", "the id is still bound");
        assert_eq!(ids.open(bound).as_deref(), Some("resp_1"));
    }

    #[test]
    fn a_responses_answer_leaves_with_bound_ids_and_a_stored_one_is_not_charged() {
        let keys = ResponseIds::from_key(&[1; 32]).unwrap();
        let ids = Binding::new(&keys, "acme");
        let body = br#"{"id":"resp_1","object":"response","previous_response_id":"resp_0","usage":{"input_tokens":2,"output_tokens":1}}"#;
        for (mut tap, charged) in [
            (UsageTap::json(true), Some(3)),
            (UsageTap::ids_only(), None),
        ] {
            assert!(tap.rewrites());
            let (a, b) = body.split_at(10);
            assert!(
                tap.push(Bytes::from_static(a), false, &ids).is_empty(),
                "held"
            );
            let out: Value =
                serde_json::from_slice(&tap.push(Bytes::from_static(b), true, &ids)).unwrap();
            let bound = out["id"].as_str().unwrap();
            assert_eq!(keys.open("acme", bound).as_deref(), Some("resp_1"));
            let prev = out["previous_response_id"].as_str().unwrap();
            assert_eq!(keys.open("acme", prev).as_deref(), Some("resp_0"));
            assert_eq!(tap.usage().map(|u| u.total()), charged);
        }
        // A stored response replayed as a stream: ids bound, nothing charged.
        let mut replay = UsageTap::ids_only().for_answer(true).unwrap();
        let event = "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"id\":\"resp_1\",\"usage\":{\"input_tokens\":2,\"output_tokens\":1}}}\n\n";
        let out = replay.push(Bytes::from_static(event.as_bytes()), true, &ids);
        assert!(!String::from_utf8_lossy(&out).contains("\"resp_1\""));
        assert_eq!(replay.usage(), None);
        assert!(
            UsageTap::json(false).for_answer(true).is_none(),
            "plain JSON taps stay"
        );
    }

    #[test]
    fn an_id_written_with_escapes_is_bound_too() {
        let keys = ResponseIds::from_key(&[1; 32]).unwrap();
        let ids = Binding::new(&keys, "acme");
        let body = br#"{"id":"resp\u005f1","note":"resp_1 in text","usage":{"input_tokens":3}}"#;
        let mut tap = UsageTap::json(true);
        assert!(tap.holds_body());
        let out = tap.push(Bytes::from_static(body), true, &ids);
        let out: Value = serde_json::from_slice(&out).unwrap();
        let bound = out["id"].as_str().unwrap();
        assert_eq!(keys.open("acme", bound).as_deref(), Some("resp_1"));
        assert_eq!(out["note"], "resp_1 in text", "only the members are bound");
        assert_eq!(tap.usage().map(|u| u.prompt_tokens), Some(3));
        // Not JSON at all: passed as it came, nothing charged.
        let mut tap = UsageTap::json(true);
        let out = tap.push(Bytes::from_static(b"<html>busy</html>"), true, &ids);
        assert_eq!(&out[..], b"<html>busy</html>");
        assert_eq!(tap.usage(), None);
    }
}
