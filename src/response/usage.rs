//! The `usage` member of an answer, in every dialect.
//!
//! A JSON answer's usage is read straight from its bytes into
//! [`UsageMember`], with no `serde_json::Value` built for it: the map and
//! strings of a `Value` cost more than the rest of reading the answer. It
//! is read leniently, as `Value::as_u64` reads: a member of another type
//! (a string, a float, a negative number, an object) counts as absent
//! rather than failing the answer's other members.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

/// Token usage as the router reported it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Of the prompt tokens, those read from a cache (priced apart).
    pub cached_tokens: u64,
    /// Of the completion tokens, those spent reasoning.
    pub reasoning_tokens: u64,
}

impl Usage {
    pub fn total(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }

    /// A `usage` object in any dialect (see [`Counts::usage`]); `None`
    /// when it is not an object.
    pub fn from_member(u: &Value) -> Option<Usage> {
        UsageMember::deserialize(u).ok()?.usage()
    }
}

/// A `usage` member: its counts when it is an object, `None` for any other
/// JSON value.
#[derive(Debug, Default)]
pub struct UsageMember(Option<Counts>);

impl UsageMember {
    pub fn usage(&self) -> Option<Usage> {
        self.0.as_ref().map(Counts::usage)
    }
}

/// The counts a `usage` object carries, whichever dialect named them.
#[derive(Debug, Default)]
struct Counts {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    total_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    /// `cached_tokens` of `prompt_tokens_details` and of `input_tokens_details`.
    prompt_cached: Option<u64>,
    input_cached: Option<u64>,
    /// `reasoning_tokens` of `completion_tokens_details` and of `output_tokens_details`.
    completion_reasoning: Option<u64>,
    output_reasoning: Option<u64>,
}

impl Counts {
    /// The usage, from:
    /// - OpenAI's `prompt_tokens` and `completion_tokens`;
    /// - Responses' and Anthropic's `input_tokens` and `output_tokens`,
    ///   plus Anthropic's cache tokens, which its `input_tokens` leaves out
    ///   (Responses counts cached tokens inside `input_tokens`);
    /// - only `total_tokens` (rerank, a tokenizer), counted as prompt;
    /// - cached prompt tokens from OpenAI's `prompt_tokens_details`,
    ///   Responses' `input_tokens_details` or Anthropic's cache reads;
    /// - reasoning tokens from OpenAI's `completion_tokens_details` or
    ///   Responses' `output_tokens_details`.
    fn usage(&self) -> Usage {
        let input = self.input_tokens.map(|n| {
            n.saturating_add(self.cache_creation_input_tokens.unwrap_or(0))
                .saturating_add(self.cache_read_input_tokens.unwrap_or(0))
        });
        let completion = self.completion_tokens.or(self.output_tokens);
        Usage {
            prompt_tokens: self
                .prompt_tokens
                .or(input)
                .or(completion.map(|_| 0))
                .or(self.total_tokens)
                .unwrap_or(0),
            completion_tokens: completion.unwrap_or(0),
            cached_tokens: self
                .prompt_cached
                .or(self.input_cached)
                .or(self.cache_read_input_tokens)
                .unwrap_or(0),
            reasoning_tokens: self
                .completion_reasoning
                .or(self.output_reasoning)
                .unwrap_or(0),
        }
    }
}

/// The members of `usage` the gateway reads; any other is skipped unread.
#[derive(serde::Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum Member {
    PromptTokens,
    CompletionTokens,
    TotalTokens,
    InputTokens,
    OutputTokens,
    CacheCreationInputTokens,
    CacheReadInputTokens,
    PromptTokensDetails,
    InputTokensDetails,
    CompletionTokensDetails,
    OutputTokensDetails,
    #[serde(other)]
    Other,
}

/// The members read from a `*_details` object.
#[derive(serde::Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum Detail {
    CachedTokens,
    ReasoningTokens,
    #[serde(other)]
    Other,
}

impl Lenient for UsageMember {
    fn from_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut c = Counts::default();
        while let Some(member) = map.next_key::<Member>()? {
            let count = |map: &mut A| Ok::<_, A::Error>(map.next_value::<Count>()?.0);
            let details = |map: &mut A| map.next_value::<Details>();
            match member {
                Member::PromptTokens => c.prompt_tokens = count(&mut map)?,
                Member::CompletionTokens => c.completion_tokens = count(&mut map)?,
                Member::TotalTokens => c.total_tokens = count(&mut map)?,
                Member::InputTokens => c.input_tokens = count(&mut map)?,
                Member::OutputTokens => c.output_tokens = count(&mut map)?,
                Member::CacheCreationInputTokens => {
                    c.cache_creation_input_tokens = count(&mut map)?
                }
                Member::CacheReadInputTokens => c.cache_read_input_tokens = count(&mut map)?,
                Member::PromptTokensDetails => c.prompt_cached = details(&mut map)?.cached_tokens,
                Member::InputTokensDetails => c.input_cached = details(&mut map)?.cached_tokens,
                Member::CompletionTokensDetails => {
                    c.completion_reasoning = details(&mut map)?.reasoning_tokens
                }
                Member::OutputTokensDetails => {
                    c.output_reasoning = details(&mut map)?.reasoning_tokens
                }
                Member::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(UsageMember(Some(c)))
    }
}

/// A `*_details` object's counts; empty for any other JSON value.
#[derive(Default)]
struct Details {
    cached_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
}

impl Lenient for Details {
    fn from_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<Self, A::Error> {
        let mut d = Details::default();
        while let Some(detail) = map.next_key::<Detail>()? {
            match detail {
                Detail::CachedTokens => d.cached_tokens = map.next_value::<Count>()?.0,
                Detail::ReasoningTokens => d.reasoning_tokens = map.next_value::<Count>()?.0,
                Detail::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(d)
    }
}

/// A count: a non-negative integer, or `None` for any other JSON value.
#[derive(Default)]
struct Count(Option<u64>);

impl Lenient for Count {
    fn from_count(n: u64) -> Self {
        Count(Some(n))
    }
}

/// A value read leniently: any JSON value it does not expect reads as its
/// default (skipped whole, when it is an array or an object).
trait Lenient: Default {
    fn from_count(_: u64) -> Self {
        Self::default()
    }
    fn from_map<'de, A: MapAccess<'de>>(map: A) -> Result<Self, A::Error> {
        IgnoredAny.visit_map(map)?;
        Ok(Self::default())
    }
}

struct LenientVisitor<T>(PhantomData<T>);

impl<'de, T: Lenient> Visitor<'de> for LenientVisitor<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_u64<E>(self, n: u64) -> Result<T, E> {
        Ok(T::from_count(n))
    }
    fn visit_i64<E>(self, n: i64) -> Result<T, E> {
        Ok(u64::try_from(n).map_or_else(|_| T::default(), T::from_count))
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        T::from_map(map)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<T, A::Error> {
        IgnoredAny.visit_seq(seq)?;
        Ok(T::default())
    }
    fn visit_bool<E>(self, _: bool) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_f64<E>(self, _: f64) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_str<E>(self, _: &str) -> Result<T, E> {
        Ok(T::default())
    }
    fn visit_unit<E>(self) -> Result<T, E> {
        Ok(T::default())
    }
}

impl<'de> Deserialize<'de> for UsageMember {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LenientVisitor(PhantomData))
    }
}

impl<'de> Deserialize<'de> for Details {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LenientVisitor(PhantomData))
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(LenientVisitor(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cached_and_reasoning_tokens_come_from_every_dialects_details() {
        let of = |v: serde_json::Value| {
            Usage::from_member(&v).map(|u| (u.cached_tokens, u.reasoning_tokens))
        };
        let openai = json!({"prompt_tokens": 10, "completion_tokens": 7,
            "prompt_tokens_details": {"cached_tokens": 4},
            "completion_tokens_details": {"reasoning_tokens": 5}});
        assert_eq!(of(openai), Some((4, 5)));
        let responses = json!({"input_tokens": 10, "output_tokens": 7,
            "input_tokens_details": {"cached_tokens": 3},
            "output_tokens_details": {"reasoning_tokens": 2}});
        assert_eq!(of(responses), Some((3, 2)));
        let anthropic = json!({"input_tokens": 10, "output_tokens": 7,
            "cache_read_input_tokens": 6});
        assert_eq!(of(anthropic), Some((6, 0)));
    }

    #[test]
    fn a_member_of_another_type_reads_as_absent_and_hides_no_other() {
        let doc = json!({"prompt_tokens": "12", "completion_tokens": 7, "total_tokens": -1,
            "input_tokens": 3.0, "prompt_tokens_details": [1, 2],
            "completion_tokens_details": {"reasoning_tokens": 2.5, "x": {"y": [{}]}},
            "output_tokens_details": {"reasoning_tokens": 2},
            "unknown": {"nested": [null, true]}});
        let expected = Usage {
            prompt_tokens: 0,
            completion_tokens: 7,
            cached_tokens: 0,
            reasoning_tokens: 2,
        };
        assert_eq!(Usage::from_member(&doc), Some(expected));
        let from_bytes: UsageMember = serde_json::from_str(&doc.to_string()).unwrap();
        assert_eq!(from_bytes.usage(), Some(expected));
    }

    #[test]
    fn a_usage_that_is_not_an_object_is_none() {
        for doc in [
            json!(null),
            json!(5),
            json!(-5),
            json!(1.5),
            json!("x"),
            json!([{}]),
            json!(true),
        ] {
            assert_eq!(Usage::from_member(&doc), None, "{doc}");
            let from_bytes: UsageMember = serde_json::from_str(&doc.to_string()).unwrap();
            assert_eq!(from_bytes.usage(), None, "{doc}");
        }
    }
}
