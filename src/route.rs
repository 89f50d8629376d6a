//! Routes as data: which paths the gateway serves, and how it reads each.
//!
//! A [`RouteSpec`] names a path pattern, its methods, its [`Api`] kind (the
//! dialect), the plan feature it needs, its schema and its metric label.
//! Everything that differs between dialects (where the prompt is, which
//! field caps the output, what the body can ask for, how usage comes back)
//! hangs off [`Api`], in this one place. Adding a route to an existing
//! dialect is one table entry.

use std::sync::Arc;

use http::Method;
use serde_json::{Map, Value};

use crate::body::tokens;
use crate::response::{StreamTap, UsageTap};
use crate::tenant::{Feature, FeatureSet};

/// How a route's body and usage are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    OpenAiChat,
    OpenAiCompletions,
    OpenAiEmbeddings,
    /// Answered by the gateway itself from the tenant's allowlist.
    OpenAiModels,
    /// Any JSON endpoint (tokenize, moderations, rerank): strict JSON, the
    /// schema if the route names one, and `model` against the allowlist
    /// when the body has one. No estimate and no reservation: the usage
    /// the router reports is charged after the answer.
    Json,
}

impl Api {
    pub const ALL: [Api; 5] = [
        Api::OpenAiChat,
        Api::OpenAiCompletions,
        Api::OpenAiEmbeddings,
        Api::OpenAiModels,
        Api::Json,
    ];

    /// The kind a routes file names.
    pub fn from_name(name: &str) -> Option<Api> {
        Api::ALL.into_iter().find(|a| a.name() == name)
    }

    /// The name routes files use for the kind.
    pub fn name(self) -> &'static str {
        match self {
            Api::OpenAiChat => "openai.chat",
            Api::OpenAiCompletions => "openai.completions",
            Api::OpenAiEmbeddings => "openai.embeddings",
            Api::OpenAiModels => "openai.models",
            Api::Json => "json",
        }
    }

    /// Whether a body without `model` is accepted (it is then checked
    /// against no allowlist).
    pub fn model_optional(self) -> bool {
        self == Api::Json
    }

    /// Whether the body speaks OpenAI's request members (`stream`, `tools`,
    /// `n`, `stream_options`...), so the features and the stream-usage
    /// opt-in apply to it.
    pub fn openai_members(self) -> bool {
        self != Api::Json
    }

    /// Whether the gateway answers the route itself, without the router.
    pub fn answered_by_gateway(self) -> bool {
        self == Api::OpenAiModels
    }

    /// The body member that holds the prompt: what a `prompt_too_long`
    /// names as its `param`.
    pub fn prompt_field(self) -> &'static str {
        match self {
            Api::OpenAiChat | Api::OpenAiModels => "messages",
            Api::OpenAiCompletions => "prompt",
            Api::OpenAiEmbeddings | Api::Json => "input",
        }
    }

    /// The prompt's size in estimated tokens.
    pub fn prompt_tokens(self, doc: &Value) -> u64 {
        match self {
            Api::OpenAiChat => tokens::estimate_chat(doc),
            Api::OpenAiCompletions | Api::OpenAiEmbeddings => {
                tokens::estimate_prompt(doc.get(self.prompt_field()))
            }
            Api::OpenAiModels | Api::Json => 0,
        }
    }

    /// The field that caps the output, when the dialect has one: chat's
    /// newer `max_completion_tokens` when the client uses it, else
    /// `max_tokens`.
    pub fn output_cap_field(self, body: &Map<String, Value>) -> Option<&'static str> {
        match self {
            Api::OpenAiChat
                if body
                    .get("max_completion_tokens")
                    .is_some_and(|v| !v.is_null()) =>
            {
                Some("max_completion_tokens")
            }
            Api::OpenAiChat | Api::OpenAiCompletions => Some("max_tokens"),
            Api::OpenAiEmbeddings | Api::OpenAiModels | Api::Json => None,
        }
    }

    /// The features the body asks for that only this dialect can express
    /// (the common ones are read for every dialect by the body stage).
    pub fn dialect_features(self, body: &Map<String, Value>, set: &mut FeatureSet) {
        if self == Api::OpenAiChat && has_image_part(body) {
            set.insert(Feature::Vision);
        }
    }

    /// Reads the router's usage from the answer: the final chunk of an
    /// OpenAI stream (hidden when the client did not ask for usage), or the
    /// JSON body's `usage`.
    pub fn usage_tap(self, streaming: bool, hide_usage: bool) -> UsageTap {
        match self {
            Api::OpenAiChat | Api::OpenAiCompletions if streaming => {
                UsageTap::Stream(StreamTap::new(hide_usage))
            }
            _ => UsageTap::json(),
        }
    }
}

fn has_image_part(body: &Map<String, Value>) -> bool {
    body.get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|m| m.get("content").and_then(Value::as_array))
        .flatten()
        .any(|part| part.get("type").and_then(Value::as_str) == Some("image_url"))
}

/// One route the gateway serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    /// Exact segments, or `{name}` for one segment of `[A-Za-z0-9_.-]+`.
    pub path: String,
    pub methods: Vec<Method>,
    pub api: Api,
    /// The plan feature the route needs; `None` for every plan.
    pub feature: Option<Feature>,
    /// The JSON Schema file (in `[policy] schemas`) the body must satisfy.
    pub schema: Option<String>,
    /// A bounded label for metrics and logs.
    pub label: String,
    /// This route's body cap instead of the plan's (still within
    /// `[body] max_body_bytes`).
    pub max_body_bytes: Option<u64>,
}

/// A route as a request holds it: cheap to clone, and it outlives a reload.
pub type Route = Arc<RouteSpec>;

impl RouteSpec {
    fn new(
        path: &str,
        methods: &[Method],
        api: Api,
        feature: Option<Feature>,
        schema: Option<&str>,
        label: &str,
    ) -> RouteSpec {
        RouteSpec {
            path: path.into(),
            methods: methods.to_vec(),
            api,
            feature,
            schema: schema.map(Into::into),
            label: label.into(),
            max_body_bytes: None,
        }
    }

    pub fn allows(&self, method: &Method) -> bool {
        self.methods.contains(method)
    }

    /// The `Allow` header of a 405.
    pub fn allow_header(&self) -> String {
        self.methods
            .iter()
            .map(Method::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn is_pattern(&self) -> bool {
        self.path.contains('{')
    }

    /// Whether `path` (canonical, without its query) is this route's.
    fn matches(&self, path: &str) -> bool {
        if !self.is_pattern() {
            return self.path == path;
        }
        let mut want = self.path.split('/');
        let mut got = path.split('/');
        loop {
            match (want.next(), got.next()) {
                (None, None) => return true,
                (Some(w), Some(g)) if w.starts_with('{') && w.ends_with('}') => {
                    let one_segment = !g.is_empty()
                        && g.bytes()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
                    if !one_segment {
                        return false;
                    }
                }
                (Some(w), Some(g)) if w == g => {}
                _ => return false,
            }
        }
    }
}

/// The route table of a snapshot.
#[derive(Debug, Clone)]
pub struct Routes {
    specs: Vec<Route>,
}

impl Routes {
    /// The routes the gateway serves when no routes file is configured.
    pub fn built_in() -> Routes {
        use Api::*;
        let post = [Method::POST];
        let specs = [
            RouteSpec::new(
                "/v1/chat/completions",
                &post,
                OpenAiChat,
                Some(Feature::Chat),
                Some("chat_completions.json"),
                "chat_completions",
            ),
            RouteSpec::new(
                "/v1/completions",
                &post,
                OpenAiCompletions,
                Some(Feature::Completions),
                Some("completions.json"),
                "completions",
            ),
            RouteSpec::new(
                "/v1/embeddings",
                &post,
                OpenAiEmbeddings,
                Some(Feature::Embeddings),
                Some("embeddings.json"),
                "embeddings",
            ),
            RouteSpec::new(
                "/v1/models",
                &[Method::GET],
                OpenAiModels,
                None,
                None,
                "models",
            ),
            RouteSpec::new(
                "/v1/models/{id}",
                &[Method::GET],
                OpenAiModels,
                None,
                None,
                "model",
            ),
        ];
        Routes {
            specs: specs.into_iter().map(Arc::new).collect(),
        }
    }

    pub fn new(specs: Vec<RouteSpec>) -> Routes {
        Routes {
            specs: specs.into_iter().map(Arc::new).collect(),
        }
    }

    /// The route for `path`: an exact path beats a pattern.
    pub fn lookup(&self, path: &str) -> Option<&Route> {
        self.specs
            .iter()
            .find(|r| !r.is_pattern() && r.path == path)
            .or_else(|| {
                self.specs
                    .iter()
                    .find(|r| r.is_pattern() && r.matches(path))
            })
    }

    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.specs.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_paths_beat_patterns_and_a_pattern_takes_one_segment() {
        let mut routes = Routes::built_in();
        let spec = |path: &str, label: &str| {
            Arc::new(RouteSpec::new(
                path,
                &[Method::GET],
                Api::OpenAiModels,
                None,
                None,
                label,
            ))
        };
        routes.specs.push(spec("/v1/things/{id}", "thing"));
        routes.specs.push(spec("/v1/things/count", "count"));
        let label = |p: &str| routes.lookup(p).map(|r| r.label.as_str());
        assert_eq!(label("/v1/chat/completions"), Some("chat_completions"));
        assert_eq!(label("/v1/things/count"), Some("count"));
        assert_eq!(label("/v1/things/abc_1.2-x"), Some("thing"));
        for none in [
            "/v1/things",
            "/v1/things/",
            "/v1/things/a/b",
            "/v1/things/a b",
            "/v1/chat/completions/x",
            "/",
        ] {
            assert_eq!(label(none), None, "{none}");
        }
    }

    #[test]
    fn each_dialect_reads_its_own_fields() {
        let body = |v: Value| v.as_object().cloned().unwrap();
        assert_eq!(
            Api::OpenAiChat
                .output_cap_field(&body(serde_json::json!({"max_completion_tokens": 5}))),
            Some("max_completion_tokens")
        );
        assert_eq!(
            Api::OpenAiChat.output_cap_field(&body(serde_json::json!({"max_tokens": 5}))),
            Some("max_tokens")
        );
        assert_eq!(Api::OpenAiEmbeddings.output_cap_field(&Map::new()), None);
        let image = body(serde_json::json!({"messages": [{"role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}));
        let mut set = FeatureSet::default();
        Api::OpenAiCompletions.dialect_features(&image, &mut set);
        assert!(!set.contains(Feature::Vision));
        Api::OpenAiChat.dialect_features(&image, &mut set);
        assert!(set.contains(Feature::Vision));
        assert_eq!(Api::OpenAiEmbeddings.prompt_field(), "input");
        assert!(matches!(
            Api::OpenAiChat.usage_tap(true, false),
            UsageTap::Stream(_)
        ));
        assert!(matches!(
            Api::OpenAiEmbeddings.usage_tap(true, false),
            UsageTap::Json { .. }
        ));
    }
}
