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

use crate::body::intake::Media;
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
    /// `GET /v1/quota`: answered by the gateway, the caller's standing in
    /// every scope ([`crate::limits::quota`]).
    Quota,
    /// `POST /v1/responses`: `instructions` + `input`, `max_output_tokens`,
    /// usage from the JSON or the final `response.*` event; the ids in the
    /// answer are bound to the tenant ([`crate::ids`]).
    OpenAiResponses,
    /// A stored response, by its bound `{id}`: no body to judge (or a JSON
    /// one), no reservation.
    OpenAiResponsesObject,
    /// `POST /v1/messages`: `system` + `messages`, `max_tokens` always set,
    /// usage from the JSON or `message_start` + `message_delta`.
    AnthropicMessages,
    /// `POST /v1/messages/count_tokens`: the model only, no reservation.
    AnthropicCountTokens,
    /// Any JSON endpoint (tokenize, moderations, rerank): strict JSON, the
    /// schema if the route names one, and `model` against the allowlist
    /// when the body has one. No estimate and no reservation: the usage
    /// the router reports is charged after the answer.
    Json,
    /// `multipart/form-data` (audio): strict framing, the `model` part
    /// against the allowlist, forwarded byte for byte.
    Multipart,
}

/// Where an answer's usage (and, for Responses, its ids) is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    OpenAi,
    Responses,
    Anthropic,
}

impl Api {
    pub const ALL: [Api; 11] = [
        Api::OpenAiChat,
        Api::OpenAiCompletions,
        Api::OpenAiEmbeddings,
        Api::OpenAiModels,
        Api::Quota,
        Api::OpenAiResponses,
        Api::OpenAiResponsesObject,
        Api::AnthropicMessages,
        Api::AnthropicCountTokens,
        Api::Json,
        Api::Multipart,
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
            Api::Quota => "portcullis.quota",
            Api::OpenAiResponses => "openai.responses",
            Api::OpenAiResponsesObject => "openai.responses.object",
            Api::AnthropicMessages => "anthropic.messages",
            Api::AnthropicCountTokens => "anthropic.count_tokens",
            Api::Json => "json",
            Api::Multipart => "multipart",
        }
    }

    /// The GenAI semantic conventions' `gen_ai.operation.name`; messages
    /// are chat.
    pub fn operation(self) -> Option<&'static str> {
        match self {
            Api::OpenAiChat | Api::AnthropicMessages => Some("chat"),
            Api::OpenAiCompletions => Some("text_completion"),
            Api::OpenAiEmbeddings => Some("embeddings"),
            Api::OpenAiResponses => Some("responses"),
            _ => None,
        }
    }

    /// Whether errors on the route take Anthropic's shape.
    pub fn anthropic(self) -> bool {
        matches!(self, Api::AnthropicMessages | Api::AnthropicCountTokens)
    }

    /// Whether a body without `model` is accepted (it is then checked
    /// against no allowlist).
    pub fn model_optional(self) -> bool {
        matches!(self, Api::Json | Api::OpenAiResponsesObject)
    }

    /// Whether the body can ask for plan features (`stream`, `tools`,
    /// `n`...), so they are read and checked.
    pub fn reads_features(self) -> bool {
        matches!(
            self,
            Api::OpenAiChat
                | Api::OpenAiCompletions
                | Api::OpenAiEmbeddings
                | Api::OpenAiResponses
                | Api::AnthropicMessages
        )
    }

    /// Whether a stream reports usage only when asked
    /// (`stream_options.include_usage`), so the gateway asks for it.
    pub fn asks_for_stream_usage(self) -> bool {
        matches!(self, Api::OpenAiChat | Api::OpenAiCompletions)
    }

    /// Whether the gateway answers the route itself, without the router.
    pub fn answered_by_gateway(self) -> bool {
        matches!(self, Api::OpenAiModels | Api::Quota)
    }

    /// The body the route takes.
    pub fn media(self) -> Media {
        match self {
            Api::OpenAiResponsesObject => Media::JsonOrNone,
            Api::Multipart => Media::Multipart,
            _ => Media::Json,
        }
    }

    /// Whether the route's `{id}` is a bound Responses id.
    pub fn binds_path_id(self) -> bool {
        self == Api::OpenAiResponsesObject
    }

    /// The body member that holds the prompt: what a `prompt_too_long`
    /// names as its `param`.
    pub fn prompt_field(self) -> &'static str {
        match self {
            Api::OpenAiChat
            | Api::OpenAiModels
            | Api::Quota
            | Api::AnthropicMessages
            | Api::AnthropicCountTokens => "messages",
            Api::OpenAiCompletions => "prompt",
            Api::Multipart => "file",
            Api::OpenAiEmbeddings
            | Api::OpenAiResponses
            | Api::OpenAiResponsesObject
            | Api::Json => "input",
        }
    }

    /// The body members whose text the guardrails scan
    /// ([`crate::guardrails::prompt`]). A `json` route's fields are the
    /// operator's, unknown here; a multipart upload's are audio.
    pub fn prompt_text_fields(self) -> &'static [&'static str] {
        match self {
            Api::OpenAiChat => &["messages"],
            Api::OpenAiCompletions => &["prompt"],
            Api::OpenAiEmbeddings => &["input"],
            Api::OpenAiResponses => &["instructions", "input"],
            Api::AnthropicMessages | Api::AnthropicCountTokens => &["system", "messages"],
            Api::OpenAiModels
            | Api::Quota
            | Api::OpenAiResponsesObject
            | Api::Json
            | Api::Multipart => &[],
        }
    }

    /// The prompt's size in estimated tokens; 0 for a route that reserves
    /// none.
    pub fn prompt_tokens(self, doc: &Value) -> u64 {
        match self {
            Api::OpenAiChat => tokens::estimate_chat(doc),
            Api::OpenAiCompletions | Api::OpenAiEmbeddings => {
                tokens::estimate_prompt(doc.get(self.prompt_field()))
            }
            Api::OpenAiResponses => tokens::estimate_responses(doc),
            Api::AnthropicMessages => tokens::estimate_messages(doc),
            Api::OpenAiModels
            | Api::Quota
            | Api::OpenAiResponsesObject
            | Api::AnthropicCountTokens
            | Api::Json
            | Api::Multipart => 0,
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
            Api::OpenAiChat | Api::OpenAiCompletions | Api::AnthropicMessages => Some("max_tokens"),
            Api::OpenAiResponses => Some("max_output_tokens"),
            _ => None,
        }
    }

    /// The field that asks for `json_mode`.
    pub fn json_mode_field(self) -> &'static str {
        match self {
            Api::OpenAiResponses => "text",
            _ => "response_format",
        }
    }

    /// The features the body asks for that only this dialect can express
    /// (the common ones are read for every dialect by the body stage).
    pub fn dialect_features(self, body: &Map<String, Value>, set: &mut FeatureSet) {
        let vision = match self {
            Api::OpenAiChat => has_part(body.get("messages"), "image_url"),
            Api::AnthropicMessages => has_part(body.get("messages"), "image"),
            Api::OpenAiResponses => {
                let format = body
                    .get("text")
                    .and_then(|t| t.get("format"))
                    .and_then(|f| f.get("type"))
                    .and_then(Value::as_str);
                if matches!(format, Some("json_object" | "json_schema")) {
                    set.insert(Feature::JsonMode);
                }
                has_part(body.get("input"), "input_image")
            }
            _ => false,
        };
        if vision {
            set.insert(Feature::Vision);
        }
    }

    /// Reads the router's usage (and binds the Responses ids) in the
    /// answer: from an SSE stream in the route's dialect, where an OpenAI
    /// stream's usage chunk is hidden when the client did not ask for it,
    /// or from the JSON body's `usage`. `None`: nothing to read.
    pub fn usage_tap(self, streaming: bool, hide_usage: bool) -> Option<UsageTap> {
        let tap = match self {
            Api::OpenAiChat | Api::OpenAiCompletions if streaming => {
                UsageTap::Stream(StreamTap::new(Dialect::OpenAi, hide_usage))
            }
            Api::OpenAiResponses if streaming => {
                UsageTap::Stream(StreamTap::new(Dialect::Responses, false))
            }
            Api::AnthropicMessages if streaming => {
                UsageTap::Stream(StreamTap::new(Dialect::Anthropic, false))
            }
            Api::OpenAiResponses => UsageTap::json(true),
            // A stored response's usage was charged when it was made.
            Api::OpenAiResponsesObject => UsageTap::ids_only(),
            Api::AnthropicCountTokens | Api::OpenAiModels | Api::Quota => return None,
            _ => UsageTap::json(false),
        };
        Some(tap)
    }
}

/// Whether any item of `list` (messages or Responses input items) has a
/// content part of type `kind`, or is one.
fn has_part(list: Option<&Value>, kind: &str) -> bool {
    let is = |v: &Value| v.get("type").and_then(Value::as_str) == Some(kind);
    list.and_then(Value::as_array)
        .into_iter()
        .flatten()
        .any(|item| {
            is(item)
                || item
                    .get("content")
                    .and_then(Value::as_array)
                    .is_some_and(|parts| parts.iter().any(is))
        })
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
    /// This route's body cap, instead of the plan's and `[body]
    /// max_body_bytes` (an upload route needs more than any JSON body).
    pub max_body_bytes: Option<u64>,
}

/// The shipped audio routes' body cap: OpenAI's 25 MB upload limit, in MiB
/// so a 25 MiB file passes.
pub const AUDIO_MAX_BODY_BYTES: u64 = 26_214_400;

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
    /// The routes the gateway serves when no routes file is configured:
    /// the same table as the shipped `policies/routes.toml`.
    pub fn built_in() -> Routes {
        use Api::*;
        use Feature::{Audio, Chat, Completions, Embeddings, Messages, Moderations, Rerank};
        let (get, post) = ([Method::GET], [Method::POST]);
        let responses = Some(Feature::Responses);
        let audio_cap = Some(AUDIO_MAX_BODY_BYTES);
        let r = RouteSpec::new;
        let specs = [
            r(
                "/v1/chat/completions",
                &post,
                OpenAiChat,
                Some(Chat),
                Some("chat_completions.json"),
                "chat_completions",
            ),
            r(
                "/v1/completions",
                &post,
                OpenAiCompletions,
                Some(Completions),
                Some("completions.json"),
                "completions",
            ),
            r(
                "/v1/embeddings",
                &post,
                OpenAiEmbeddings,
                Some(Embeddings),
                Some("embeddings.json"),
                "embeddings",
            ),
            r("/v1/models", &get, OpenAiModels, None, None, "models"),
            r("/v1/models/{id}", &get, OpenAiModels, None, None, "model"),
            r("/v1/quota", &get, Quota, None, None, "quota"),
            r(
                "/v1/responses",
                &post,
                OpenAiResponses,
                responses,
                Some("responses.json"),
                "responses",
            ),
            r(
                "/v1/responses/{id}",
                &[Method::GET, Method::DELETE],
                OpenAiResponsesObject,
                responses,
                None,
                "responses_get",
            ),
            r(
                "/v1/responses/{id}/cancel",
                &post,
                OpenAiResponsesObject,
                responses,
                None,
                "responses_cancel",
            ),
            r(
                "/v1/responses/{id}/input_items",
                &get,
                OpenAiResponsesObject,
                responses,
                None,
                "responses_input_items",
            ),
            r(
                "/v1/responses/input_tokens",
                &post,
                Json,
                responses,
                None,
                "responses_input_tokens",
            ),
            r(
                "/v1/messages",
                &post,
                AnthropicMessages,
                Some(Messages),
                Some("messages.json"),
                "messages",
            ),
            r(
                "/v1/messages/count_tokens",
                &post,
                AnthropicCountTokens,
                Some(Messages),
                None,
                "messages_count_tokens",
            ),
            r(
                "/v1/moderations",
                &post,
                Json,
                Some(Moderations),
                Some("moderations.json"),
                "moderations",
            ),
            r(
                "/v1/rerank",
                &post,
                Json,
                Some(Rerank),
                Some("rerank.json"),
                "rerank",
            ),
            RouteSpec {
                max_body_bytes: audio_cap,
                ..r(
                    "/v1/audio/transcriptions",
                    &post,
                    Multipart,
                    Some(Audio),
                    None,
                    "audio_transcriptions",
                )
            },
            RouteSpec {
                max_body_bytes: audio_cap,
                ..r(
                    "/v1/audio/translations",
                    &post,
                    Multipart,
                    Some(Audio),
                    None,
                    "audio_translations",
                )
            },
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
            Some(UsageTap::Stream(_))
        ));
        assert!(matches!(
            Api::OpenAiEmbeddings.usage_tap(true, false),
            Some(UsageTap::Json(_))
        ));
        assert!(Api::AnthropicCountTokens.usage_tap(false, false).is_none());
        assert!(Api::OpenAiResponses
            .usage_tap(false, false)
            .is_some_and(|t| t.rewrites()));
        // Responses: max_output_tokens, json_mode from text.format, vision
        // from input_image; Anthropic: max_tokens, vision from image blocks.
        let r = body(
            serde_json::json!({"text": {"format": {"type": "json_schema"}},
            "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}),
        );
        let mut set = FeatureSet::default();
        Api::OpenAiResponses.dialect_features(&r, &mut set);
        assert!(set.contains(Feature::JsonMode) && set.contains(Feature::Vision));
        assert_eq!(
            Api::OpenAiResponses.output_cap_field(&r),
            Some("max_output_tokens")
        );
        let m = body(
            serde_json::json!({"messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "data": "x"}}]}]}),
        );
        let mut set = FeatureSet::default();
        Api::AnthropicMessages.dialect_features(&m, &mut set);
        assert!(set.contains(Feature::Vision) && !set.contains(Feature::JsonMode));
        assert_eq!(
            Api::AnthropicMessages.output_cap_field(&m),
            Some("max_tokens")
        );
    }
}
