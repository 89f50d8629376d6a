//! Request JSON Schemas, compiled once per policy snapshot.

use std::collections::HashMap;
use std::path::Path;

use jsonschema::error::ValidationErrorKind;
use jsonschema::Validator;
use serde_json::Value;

use crate::diag::Diagnostic;
use crate::reject::{Reject, RejectCode};
use crate::route::{RouteSpec, Routes};

/// The shipped schemas, used when `[policy] schemas` is not set.
const BUILT_IN: [(&str, &str); 7] = [
    (
        "chat_completions.json",
        include_str!("../../policies/schemas/chat_completions.json"),
    ),
    (
        "completions.json",
        include_str!("../../policies/schemas/completions.json"),
    ),
    (
        "embeddings.json",
        include_str!("../../policies/schemas/embeddings.json"),
    ),
    (
        "responses.json",
        include_str!("../../policies/schemas/responses.json"),
    ),
    (
        "messages.json",
        include_str!("../../policies/schemas/messages.json"),
    ),
    (
        "moderations.json",
        include_str!("../../policies/schemas/moderations.json"),
    ),
    (
        "rerank.json",
        include_str!("../../policies/schemas/rerank.json"),
    ),
];

/// One compiled validator per schema file a route names.
pub struct Schemas {
    by_name: HashMap<String, Validator>,
}

impl Schemas {
    /// Compiles every schema the routes name: a path as is (routes files
    /// name them so), a file name from `dir`, or the built-in one.
    pub fn load(dir: Option<&Path>, routes: &Routes) -> Result<Schemas, Vec<Diagnostic>> {
        let mut errs = Vec::new();
        let mut by_name = HashMap::new();
        for name in routes.iter().filter_map(|r| r.schema.as_deref()) {
            if by_name.contains_key(name) {
                continue;
            }
            let named = Path::new(name);
            let (file, text) = match dir {
                // A routes file names its schemas by path.
                _ if named.is_absolute() => match std::fs::read_to_string(named) {
                    Ok(t) => (named.to_path_buf(), t),
                    Err(e) => {
                        errs.push(Diagnostic::in_file(
                            named,
                            format!("cannot read schema: {e}"),
                        ));
                        continue;
                    }
                },
                Some(d) => {
                    let p = d.join(name);
                    match std::fs::read_to_string(&p) {
                        Ok(t) => (p, t),
                        Err(e) => {
                            errs.push(Diagnostic::in_file(&p, format!("cannot read schema: {e}")));
                            continue;
                        }
                    }
                }
                None => {
                    let file = Path::new("(built-in)").join(name);
                    match BUILT_IN.iter().find(|(n, _)| *n == name) {
                        Some((_, text)) => (file, text.to_string()),
                        None => {
                            errs.push(Diagnostic::in_file(&file, "no such built-in schema"));
                            continue;
                        }
                    }
                }
            };
            let schema: Value = match serde_json::from_str(&text) {
                Ok(v) => v,
                Err(e) => {
                    errs.push(Diagnostic {
                        file,
                        line: Some(e.line()),
                        message: format!("schema is not JSON: {e}"),
                    });
                    continue;
                }
            };
            match jsonschema::validator_for(&schema) {
                Ok(v) => {
                    by_name.insert(name.to_string(), v);
                }
                Err(e) => errs.push(Diagnostic::in_file(&file, format!("invalid schema: {e}"))),
            }
        }
        if errs.is_empty() {
            Ok(Schemas { by_name })
        } else {
            Err(errs)
        }
    }

    /// Validates `body` for `route`; the first violation names its field.
    pub fn check(&self, route: &RouteSpec, body: &Value) -> Result<(), Reject> {
        let Some(name) = route.schema.as_deref() else {
            return Ok(());
        };
        // `load` compiled every schema a route names.
        let Some(validator) = self.by_name.get(name) else {
            return Err(Reject::new(
                500,
                RejectCode::InternalError,
                "a route's schema is not loaded",
            ));
        };
        // The boolean check is the fast path; errors are built only on failure.
        if validator.is_valid(body) {
            return Ok(());
        }
        let Err(e) = validator.validate(body) else {
            return Ok(());
        };
        let mut pointer = e.instance_path().as_str().to_string();
        let detail = match e.kind() {
            ValidationErrorKind::AdditionalProperties { unexpected } => {
                if let Some(field) = unexpected.first() {
                    pointer.push('/');
                    pointer.push_str(&escape_pointer(field));
                }
                "unknown field".to_string()
            }
            ValidationErrorKind::Required { property } => {
                if let Some(field) = property.as_str() {
                    pointer.push('/');
                    pointer.push_str(&escape_pointer(field));
                }
                "required field is missing".to_string()
            }
            _ => e.to_string(),
        };
        let mut r = Reject::bad_request(
            RejectCode::SchemaViolation,
            format!(
                "{} at {}: {}",
                route.path,
                display(&pointer),
                truncate(&detail)
            ),
        );
        r.param = Some(pointer);
        Err(r)
    }
}

/// RFC 6901 escaping of one pointer segment.
fn escape_pointer(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

fn display(pointer: &str) -> &str {
    if pointer.is_empty() {
        "the document"
    } else {
        pointer
    }
}

/// Validator messages quote the offending value; keep them short so a
/// rejection never echoes a whole prompt back.
fn truncate(s: &str) -> String {
    const MAX: usize = 160;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn route(label: &str) -> std::sync::Arc<RouteSpec> {
        let routes = Routes::built_in();
        let found = routes.iter().find(|r| r.label == label).cloned();
        found.unwrap()
    }

    fn schemas() -> Schemas {
        Schemas::load(None, &Routes::built_in()).unwrap()
    }

    fn param(label: &str, body: Value) -> String {
        schemas()
            .check(&route(label), &body)
            .unwrap_err()
            .param
            .unwrap()
    }

    #[test]
    fn built_in_schemas_accept_ordinary_requests() {
        let s = schemas();
        let chat = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "stream": true, "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]});
        assert!(s.check(&route("chat_completions"), &chat).is_ok());
        assert!(s
            .check(
                &route("completions"),
                &json!({"model": "m", "prompt": ["a", "b"]})
            )
            .is_ok());
        assert!(s
            .check(
                &route("embeddings"),
                &json!({"model": "m", "input": [[1, 2], [3]]})
            )
            .is_ok());
    }

    #[test]
    fn violations_name_the_first_failing_field() {
        assert_eq!(
            param("chat_completions", json!({"model": "m"})),
            "/messages"
        );
        assert_eq!(
            param(
                "chat_completions",
                json!({"model": "m", "messages": [{"role": "user"}], "x": 1})
            ),
            "/x"
        );
        assert_eq!(
            param(
                "chat_completions",
                json!({"model": "m", "messages": [{"role": "user", "content": 5}]})
            ),
            "/messages/0/content"
        );
        assert_eq!(
            param(
                "chat_completions",
                json!({"model": "m", "messages": [{"role": "user"}], "temperature": 9})
            ),
            "/temperature"
        );
        assert_eq!(
            param("embeddings", json!({"model": "m", "input": ""})),
            "/input"
        );
    }
}
