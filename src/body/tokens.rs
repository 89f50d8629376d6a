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
///
/// The text is taken a run of one character class at a time: the loop
/// finds where each run ends and charges it whole, which costs a table
/// lookup per byte rather than per-byte bookkeeping.
pub fn estimate_text(text: &str) -> u64 {
    let bytes = text.as_bytes();
    let mut quarters = 0;
    let mut i = 0;
    while let Some(&lead) = bytes.get(i) {
        let class = CLASS[usize::from(lead)];
        if class == Class::Other {
            // A non-ASCII character: in a `str`, its lead byte gives its length.
            let len = utf8_len(lead);
            quarters += non_ascii_quarters(len);
            i += len;
            continue;
        }
        let rest = bytes.get(i..).unwrap_or_default();
        let n = rest
            .iter()
            .position(|&b| CLASS[usize::from(b)] != class)
            .unwrap_or(rest.len());
        quarters += 4 * run_tokens(class, rest.get(..n).unwrap_or_default());
        i += n;
    }
    quarters.div_ceil(4)
}

/// Each byte's class; every byte of a non-ASCII character is `Other`.
const CLASS: [Class; 256] = {
    let mut t = [Class::Other; 256];
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

/// Tokens for one run of ASCII bytes of one class, as BPE vocabularies
/// tend to split it.
fn run_tokens(class: Class, run: &[u8]) -> u64 {
    let n = run.len() as u64;
    match class {
        // Common words (lower-case or Capitalised) are one token and long
        // ones split; acronyms split sooner; mixed case (camelCase, base64)
        // finds almost none.
        Class::Letter => {
            let uppers = run.iter().filter(|b| b.is_ascii_uppercase()).count() as u64;
            let first_upper = run.first().is_some_and(u8::is_ascii_uppercase);
            if uppers == u64::from(first_upper) {
                1 + n.saturating_sub(1) / 5
            } else if uppers == n {
                1 + n.saturating_sub(1) / 3
            } else {
                n
            }
        }
        // Numbers split into groups of at most three digits.
        Class::Digit => n.div_ceil(3),
        // One space joins the next word; longer runs (indentation) are a token.
        Class::Space => u64::from(n > 1),
        Class::Newline => 1,
        // Punctuation merges in pairs at best: `()`, `->`, `::`.
        Class::Symbol => n.div_ceil(2),
        Class::Other => 0,
    }
}

/// The length of the UTF-8 character that `lead` starts.
fn utf8_len(lead: u8) -> usize {
    match lead {
        0xF0.. => 4,
        0xE0.. => 3,
        _ => 2,
    }
}

/// Quarter tokens for one non-ASCII character, by its UTF-8 length: BPE
/// vocabularies cover common two- and three-byte characters with about one
/// token each and fall back to bytes for rarer ones and for emoji.
fn non_ascii_quarters(len: usize) -> u64 {
    match len {
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
    fn non_ascii_characters_are_charged_by_their_utf8_length_and_end_runs() {
        // 2-, 3- and 4-byte characters: 4 + 6 + 12 quarters.
        assert_eq!(estimate_text("é日🎉"), 6);
        // "caf" is one word, the `é` ends it, and "ABCDEF" after it is an
        // acronym run of its own (two tokens): 4 + 4 + 8 quarters.
        assert_eq!(estimate_text("caféABCDEF"), 4);
        assert_eq!(
            estimate_text("  \n\n  x"),
            4,
            "indent, newlines, indent, word"
        );
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
