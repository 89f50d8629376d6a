//! Prompt-token estimation without a tokenizer.
//!
//! A real BPE pass costs far more than the rest of the body stage, so the
//! gateway estimates from character classes instead, erring high: the
//! estimate gates quota reservations and `max_prompt_tokens`, where
//! undercounting would let a tenant overspend. `tests/it/token_estimate.rs`
//! checks it against cl100k on English, code, CJK and emoji.

use serde_json::Value;

/// Tokens charged for one image part, whatever its size: OpenAI's cost of
/// a high-detail 1024x1024 image.
pub const IMAGE_TOKENS: u64 = 765;
/// Per-message framing tokens in the chat format.
const MESSAGE_OVERHEAD: u64 = 4;
/// Tokens that prime the assistant's reply.
const REPLY_PRIMING: u64 = 3;

/// Estimates the tokens of `text`, in quarter tokens internally.
pub fn estimate_text(text: &str) -> u64 {
    let mut est = Runs::default();
    let bytes = text.as_bytes();
    let mut i = 0;
    // ASCII, nearly all of most prompts, is classed by table, byte by byte;
    // only other characters are decoded.
    while let Some(&b) = bytes.get(i) {
        if b.is_ascii() {
            est.push(ASCII_CLASS[usize::from(b)], char::from(b));
            i += 1;
        } else {
            let Some(c) = text.get(i..).and_then(|rest| rest.chars().next()) else {
                break;
            };
            est.push(Class::Other, c);
            i += c.len_utf8();
        }
    }
    est.flush();
    est.quarters.div_ceil(4)
}

const ASCII_CLASS: [Class; 128] = {
    let mut t = [Class::Symbol; 128];
    let mut b = 0;
    while b < 128 {
        let c = b as u8;
        t[b] = if c.is_ascii_alphabetic() {
            Class::Letter
        } else if c.is_ascii_digit() {
            Class::Digit
        } else if c == b' ' || c == b'\t' {
            Class::Space
        } else if c == b'\n' || c == b'\r' {
            Class::Newline
        } else {
            Class::Symbol
        };
        b += 1;
    }
    t
};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    Letter,
    Digit,
    Space,
    Newline,
    Symbol,
    Other,
}

/// Accumulates runs of one character class and charges each run as BPE
/// vocabularies tend to split it.
#[derive(Default)]
struct Runs {
    quarters: u64,
    class: Option<Class>,
    len: u64,
    /// Upper-case letters in the run, and those after its first letter.
    uppers: u64,
    inner_uppers: u64,
}

impl Runs {
    fn push(&mut self, class: Class, c: char) {
        if class == Class::Other {
            self.flush();
            self.quarters += non_ascii_quarters(c);
            return;
        }
        if self.class != Some(class) {
            self.flush();
            self.class = Some(class);
        }
        if c.is_ascii_uppercase() {
            self.uppers += 1;
            if self.len > 0 {
                self.inner_uppers += 1;
            }
        }
        self.len += 1;
    }

    fn flush(&mut self) {
        let n = self.len;
        self.quarters += 4 * match self.class {
            _ if n == 0 => 0,
            // Common words (lower-case or Capitalised) are one token and
            // long ones split; acronyms split sooner; mixed case (camelCase,
            // base64) finds almost none.
            Some(Class::Letter) if self.inner_uppers == 0 => 1 + (n - 1) / 5,
            Some(Class::Letter) if self.uppers == n => 1 + (n - 1) / 3,
            Some(Class::Letter) => n,
            // Numbers split into groups of at most three digits.
            Some(Class::Digit) => n.div_ceil(3),
            // One space joins the next word; longer runs (indentation) are a token.
            Some(Class::Space) => u64::from(n > 1),
            Some(Class::Newline) => 1,
            // Punctuation merges in pairs at best: `()`, `->`, `::`.
            Some(Class::Symbol) => n.div_ceil(2),
            Some(Class::Other) | None => 0,
        };
        self.class = None;
        self.len = 0;
        self.uppers = 0;
        self.inner_uppers = 0;
    }
}

/// Quarter tokens for one non-ASCII character, by its UTF-8 length: BPE
/// vocabularies cover common two- and three-byte characters with about one
/// token each and fall back to bytes for rarer ones and for emoji.
fn non_ascii_quarters(c: char) -> u64 {
    match c.len_utf8() {
        2 => 4,
        3 => 6,
        _ => 12,
    }
}

/// Estimates the tokens in a JSON value: every string and key, one per
/// other scalar, and a fixed charge for image parts (their base64 data
/// would otherwise count as text).
pub fn estimate_value(v: &Value) -> u64 {
    match v {
        Value::String(s) => estimate_text(s),
        Value::Array(items) => items.iter().map(estimate_value).sum(),
        Value::Object(map) => {
            if is_image_part(map) {
                return IMAGE_TOKENS;
            }
            map.iter()
                .map(|(k, v)| estimate_text(k) + estimate_value(v))
                .sum()
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => 1,
    }
}

fn is_image_part(map: &serde_json::Map<String, Value>) -> bool {
    matches!(
        map.get("type").and_then(Value::as_str),
        Some("image_url" | "input_image" | "image")
    )
}

/// Estimates a chat request's prompt: messages with their framing, plus
/// tool and function definitions.
pub fn estimate_chat(body: &Value) -> u64 {
    let messages = body.get("messages").and_then(Value::as_array);
    let framing = messages.map_or(0, |m| m.len() as u64 * MESSAGE_OVERHEAD);
    framing
        + messages.map_or(0, |m| m.iter().map(estimate_value).sum())
        + tools(body)
        + body.get("functions").map_or(0, estimate_value)
        + REPLY_PRIMING
}

/// Estimates a Responses request's prompt: `instructions` plus `input` (a
/// string, or items whose content is a string or parts), with the framing
/// of each item, plus tool definitions.
pub fn estimate_responses(body: &Value) -> u64 {
    framed(body.get("input")) + framed(body.get("instructions")) + tools(body) + REPLY_PRIMING
}

/// Estimates an Anthropic Messages request's prompt: `system` (a string or
/// text blocks) plus `messages`, with their framing, plus tool definitions.
pub fn estimate_messages(body: &Value) -> u64 {
    framed(body.get("system")) + framed(body.get("messages")) + tools(body) + REPLY_PRIMING
}

/// A string, or a list of messages or items each with its framing.
fn framed(v: Option<&Value>) -> u64 {
    match v {
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| MESSAGE_OVERHEAD + estimate_value(i))
            .sum(),
        Some(other) => estimate_value(other),
        None => 0,
    }
}

fn tools(body: &Value) -> u64 {
    body.get("tools").map_or(0, estimate_value)
}

/// Estimates a prompt given as a string, strings, or token-id arrays
/// (`prompt` for completions, `input` for embeddings): token ids count one each.
pub fn estimate_prompt(prompt: Option<&Value>) -> u64 {
    match prompt {
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| match i {
                Value::Array(ids) => ids.len() as u64,
                Value::Number(_) => 1,
                other => estimate_value(other),
            })
            .sum(),
        Some(other) => estimate_value(other),
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn short_words_are_one_token_and_long_ones_split() {
        assert_eq!(estimate_text("the cat sat"), 3);
        assert_eq!(estimate_text("internationalization"), 4);
        assert_eq!(estimate_text("c2VjcmV0"), 8, "mixed case counts per letter");
        assert_eq!(estimate_text("1234567"), 3);
        assert_eq!(estimate_text(""), 0);
    }

    #[test]
    fn image_parts_cost_a_fixed_charge_not_their_base64() {
        let huge = "A".repeat(100_000);
        let part = json!({"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{huge}")}});
        assert_eq!(estimate_value(&part), IMAGE_TOKENS);
    }

    #[test]
    fn chat_estimate_counts_framing_and_tools() {
        let body = json!({"messages": [{"role": "user", "content": "hi"}],
                          "tools": [{"type": "function", "function": {"name": "f"}}]});
        let without = json!({"messages": [{"role": "user", "content": "hi"}]});
        assert!(estimate_chat(&body) > estimate_chat(&without));
        assert!(estimate_chat(&without) > MESSAGE_OVERHEAD + REPLY_PRIMING);
    }

    #[test]
    fn responses_and_messages_count_their_instructions_and_every_text() {
        let text = "the quick brown fox jumps over the lazy dog";
        let plain = estimate_text(text);
        let as_string = estimate_responses(&json!({"input": text}));
        let as_items = estimate_responses(&json!({"input": [{"role": "user",
            "content": [{"type": "input_text", "text": text}]}]}));
        assert!(as_string > plain && as_items > as_string);
        let with_instructions = estimate_responses(&json!({"input": text, "instructions": text}));
        assert!(with_instructions >= as_string + plain);
        let messages = json!({"messages": [{"role": "user", "content": text}]});
        let with_system = json!({"system": [{"type": "text", "text": text}],
            "messages": [{"role": "user", "content": text}]});
        assert!(estimate_messages(&messages) > plain);
        assert!(estimate_messages(&with_system) >= estimate_messages(&messages) + plain);
    }

    #[test]
    fn token_id_prompts_count_one_per_id() {
        assert_eq!(estimate_prompt(Some(&json!([1, 2, 3]))), 3);
        assert_eq!(estimate_prompt(Some(&json!([[1, 2], [3]]))), 3);
    }
}
