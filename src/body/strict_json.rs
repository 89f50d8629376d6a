//! A strict JSON parser: one document, UTF-8 without a BOM, no duplicate
//! keys at any depth, bounded nesting.
//!
//! Duplicate keys are the classic parser-differential attack: the gateway
//! would check `{"model":"a","model":"b"}` as one model while the router
//! runs the other. Here a duplicate is an error, so the document the gateway
//! checks is the only reading there is. Built on `serde_json`, which already
//! refuses invalid UTF-8, lone surrogate escapes, NaN and Infinity, numbers
//! out of range and trailing content.

use std::fmt;

use serde::de::{DeserializeSeed, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::map::Entry;
use serde_json::{Map, Value};

/// Why a body is not acceptable JSON, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonError {
    /// Byte offset into the body where the parser stopped.
    pub offset: usize,
    pub reason: String,
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid JSON at byte {}: {}", self.offset, self.reason)
    }
}

/// Parses exactly one JSON document from `bytes`.
pub fn parse(bytes: &[u8], max_depth: usize) -> Result<Value, JsonError> {
    if bytes.starts_with(&[0xEF, 0xBB, 0xBF]) {
        return Err(JsonError {
            offset: 0,
            reason: "byte order mark".into(),
        });
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = Strict {
        depth: 0,
        max_depth,
    }
    .deserialize(&mut de)
    .map_err(|e| located(bytes, &e))?;
    de.end().map_err(|e| located(bytes, &e))?;
    Ok(value)
}

/// Converts serde_json's line and column into a byte offset, and drops the
/// "at line L column C" suffix from its message.
fn located(bytes: &[u8], e: &serde_json::Error) -> JsonError {
    let line_start = if e.line() <= 1 {
        0
    } else {
        bytes
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .nth(e.line() - 2)
            .map_or(bytes.len(), |(i, _)| i + 1)
    };
    let offset = (line_start + e.column().saturating_sub(1)).min(bytes.len());
    let text = e.to_string();
    let reason = text
        .rfind(" at line ")
        .map_or(text.as_str(), |i| &text[..i])
        .to_string();
    JsonError { offset, reason }
}

/// Builds a `Value` while refusing duplicate keys and deep nesting.
#[derive(Clone, Copy)]
struct Strict {
    depth: usize,
    max_depth: usize,
}

impl Strict {
    fn child<E: serde::de::Error>(&self) -> Result<Strict, E> {
        if self.depth >= self.max_depth {
            return Err(E::custom(format_args!(
                "nesting deeper than {} levels",
                self.max_depth
            )));
        }
        Ok(Strict {
            depth: self.depth + 1,
            max_depth: self.max_depth,
        })
    }
}

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let child = self.child()?;
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
        while let Some(v) = seq.next_element_seed(child)? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let child = self.child()?;
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(child)?;
            match out.entry(key) {
                Entry::Occupied(e) => {
                    return Err(A::Error::custom(format_args!(
                        "duplicate key {:?}",
                        e.key()
                    )))
                }
                Entry::Vacant(e) => {
                    e.insert(value);
                }
            }
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(input: &[u8]) -> JsonError {
        parse(input, 64).unwrap_err()
    }

    #[test]
    fn accepts_ordinary_documents() {
        let v = parse(br#"{"a":[1,-2,3.5,"\u00e9\ud83d\ude00",true,null,{}]}"#, 64).unwrap();
        assert_eq!(v["a"][3], "é😀");
    }

    #[test]
    fn refuses_duplicate_keys_at_any_depth() {
        assert!(err(br#"{"model":"a","model":"b"}"#)
            .reason
            .contains("duplicate key \"model\""));
        assert!(err(br#"{"x":{"k":1,"k":2}}"#).reason.contains("duplicate"));
        assert!(err(br#"{"model":"a","mod\u0065l":"b"}"#)
            .reason
            .contains("duplicate"));
    }

    #[test]
    fn refuses_what_strict_json_forbids_with_an_offset() {
        let e = err(b"\xEF\xBB\xBF{}");
        assert_eq!((e.offset, e.reason.as_str()), (0, "byte order mark"));
        let e = err(br#"{"a":1} x"#);
        assert_eq!(e.offset, 8);
        assert!(err(br#"{"a":NaN}"#).offset >= 5);
        assert!(!err(br#"{"a":Infinity}"#).reason.is_empty());
        assert!(err(br#"{"a":1e400}"#).reason.contains("out of range"));
        assert!(!err(b"{\"a\":\"\xff\"}").reason.is_empty());
        assert!(!err(br#"{"a":"\ud800"}"#).reason.is_empty());
        assert!(!err(br#"{"a":1,}"#).reason.is_empty());
        assert!(!err(b"").reason.is_empty());
    }

    #[test]
    fn offsets_count_bytes_across_lines() {
        let e = err(b"{\n  \"a\": 1,\n  \"a\": 2\n}");
        assert!(e.offset > 12 && e.offset <= 21, "{e:?}");
    }

    #[test]
    fn bounds_nesting() {
        let deep = "[".repeat(65) + &"]".repeat(65);
        assert!(err(deep.as_bytes())
            .reason
            .contains("nesting deeper than 64"));
        let ok = "[".repeat(64) + &"]".repeat(64);
        assert!(parse(ok.as_bytes(), 64).is_ok());
    }
}
