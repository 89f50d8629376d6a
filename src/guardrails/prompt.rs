//! Which strings of a body are prompt text, and where each one is.
//!
//! The route's dialect names the top-level members ([`Api::prompt_text_fields`]);
//! below them every dialect uses the same few shapes: a string, a list of
//! strings (completions, embeddings), messages or items whose `content` is
//! a string or a list of parts, and text parts (`text`, `input_text`,
//! `output_text`). Tool results are prompt text too (chat's `tool`
//! messages, Anthropic's `tool_result`, Responses' `function_call_output`).
//! Tool definitions, tool calls, images, files and audio are not.

use std::fmt::Write as _;
use std::ops::ControlFlow;

use serde_json::{Map, Value};

use crate::route::Api;

/// One step of a JSON pointer.
#[derive(Debug, Clone, Copy)]
enum Step {
    Key(&'static str),
    Index(usize),
}

/// Where a text is in the body, as a JSON pointer once asked for.
pub struct At<'a>(&'a [Step]);

impl At<'_> {
    /// The RFC 6901 pointer (`/messages/0/content/1/text`). The keys are
    /// the walker's own names, none of which needs escaping.
    pub fn pointer(&self) -> String {
        let mut s = String::new();
        for step in self.0 {
            let _ = match step {
                Step::Key(k) => write!(s, "/{k}"),
                Step::Index(i) => write!(s, "/{i}"),
            };
        }
        s
    }
}

/// Calls `f` with every prompt text of `body` in document order, until it
/// breaks. `f` may rewrite the text in place.
pub fn each_text(
    api: Api,
    body: &mut Map<String, Value>,
    f: &mut impl FnMut(&At, &mut String) -> ControlFlow<()>,
) -> ControlFlow<()> {
    let mut path = Vec::with_capacity(8);
    for field in api.prompt_text_fields() {
        if let Some(v) = body.get_mut(*field) {
            path.push(Step::Key(field));
            content(v, &mut path, f)?;
            path.pop();
        }
    }
    ControlFlow::Continue(())
}

/// A string, a list of strings or items, or one item.
fn content(
    v: &mut Value,
    path: &mut Vec<Step>,
    f: &mut impl FnMut(&At, &mut String) -> ControlFlow<()>,
) -> ControlFlow<()> {
    match v {
        Value::String(s) => f(&At(path), s)?,
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                path.push(Step::Index(i));
                match item {
                    Value::String(s) => f(&At(path), s)?,
                    Value::Object(o) => self::item(o, path, f)?,
                    // Token ids, and anything a schema let through.
                    _ => {}
                }
                path.pop();
            }
        }
        Value::Object(o) => item(o, path, f)?,
        _ => {}
    }
    ControlFlow::Continue(())
}

/// A message, an input item or a content part.
fn item(
    o: &mut Map<String, Value>,
    path: &mut Vec<Step>,
    f: &mut impl FnMut(&At, &mut String) -> ControlFlow<()>,
) -> ControlFlow<()> {
    let members: &[&'static str] = match o.get("type").and_then(Value::as_str) {
        Some("text" | "input_text" | "output_text") => &["text"],
        Some("tool_result") => &["content"],
        Some("function_call_output") => &["output"],
        Some("message") => &["content"],
        // A chat or Anthropic message, or a part without a type that a
        // lenient router might still read as text (Responses' schema does
        // not require one): both, so leaving `type` out hides nothing.
        None => &["content", "text"],
        // Images, files, audio, tool calls, reasoning.
        Some(_) => return ControlFlow::Continue(()),
    };
    for member in members {
        if let Some(v) = o.get_mut(*member) {
            path.push(Step::Key(member));
            content(v, path, f)?;
            path.pop();
        }
    }
    ControlFlow::Continue(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Every text's pointer and value, in order.
    fn texts(api: Api, body: Value) -> Vec<(String, String)> {
        let mut body = body.as_object().unwrap().clone();
        let mut out = Vec::new();
        let _ = each_text(api, &mut body, &mut |at, s| {
            out.push((at.pointer(), s.clone()));
            ControlFlow::Continue(())
        });
        out
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(p, t)| (p.to_string(), t.to_string()))
            .collect()
    }

    #[test]
    fn every_dialect_s_prompt_text_and_nothing_else() {
        let chat = json!({"model": "m", "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "name": "not-text", "content": [
                {"type": "text", "text": "part"},
                {"type": "image_url", "image_url": {"url": "data:,x"}}]},
            {"role": "assistant", "content": null,
             "tool_calls": [{"function": {"arguments": "{\"a\":1}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "tool out"}],
            "tools": [{"type": "function", "function": {"description": "not text"}}]});
        assert_eq!(
            texts(Api::OpenAiChat, chat),
            pairs(&[
                ("/messages/0/content", "sys"),
                ("/messages/1/content/0/text", "part"),
                ("/messages/3/content", "tool out"),
            ])
        );
        assert_eq!(
            texts(
                Api::OpenAiCompletions,
                json!({"prompt": ["a", [1, 2], "b"]})
            ),
            pairs(&[("/prompt/0", "a"), ("/prompt/2", "b")])
        );
        assert_eq!(
            texts(Api::OpenAiEmbeddings, json!({"input": "e"})),
            pairs(&[("/input", "e")])
        );
        let responses = json!({"instructions": "be brief", "input": [
            {"role": "user", "content": "plain"},
            {"type": "message", "role": "user", "content": [
                {"type": "input_text", "text": "it"},
                {"type": "input_image", "image_url": "data:,x"}]},
            {"type": "message", "role": "assistant", "content": [
                {"type": "output_text", "text": "ot"}]},
            {"type": "function_call", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c", "output": "fo"},
            {"role": "user", "content": [{"text": "untyped"}]}]});
        assert_eq!(
            texts(Api::OpenAiResponses, responses),
            pairs(&[
                ("/instructions", "be brief"),
                ("/input/0/content", "plain"),
                ("/input/1/content/0/text", "it"),
                ("/input/2/content/0/text", "ot"),
                ("/input/4/output", "fo"),
                ("/input/5/content/0/text", "untyped"),
            ])
        );
        let messages = json!({"system": [{"type": "text", "text": "s"}], "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "t"},
                {"type": "image", "source": {"data": "AAAA"}},
                {"type": "tool_result", "tool_use_id": "x", "content": [
                    {"type": "text", "text": "tr"}]}]},
            {"role": "assistant", "content": [{"type": "tool_use", "input": {"q": "no"}}]}]});
        for api in [Api::AnthropicMessages, Api::AnthropicCountTokens] {
            assert_eq!(
                texts(api, messages.clone()),
                pairs(&[
                    ("/system/0/text", "s"),
                    ("/messages/0/content/0/text", "t"),
                    ("/messages/0/content/2/content/0/text", "tr"),
                ])
            );
        }
        assert!(texts(Api::Json, json!({"input": "x"})).is_empty());
    }

    #[test]
    fn a_break_stops_the_walk_and_rewrites_stay() {
        let mut body = json!({"prompt": ["a", "b", "c"]})
            .as_object()
            .unwrap()
            .clone();
        let mut seen = 0;
        let flow = each_text(Api::OpenAiCompletions, &mut body, &mut |_, s| {
            seen += 1;
            *s = s.to_uppercase();
            if seen == 2 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        assert!(flow.is_break());
        assert_eq!(Value::Object(body), json!({"prompt": ["A", "B", "c"]}));
    }
}
