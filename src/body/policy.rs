//! The tenant's model and feature policy, applied to a parsed body, and the
//! normalisations that follow from it (output cap, stream usage).

use serde_json::{Map, Value};

use crate::reject::{Reject, RejectCode};
use crate::route::Api;
use crate::tenant::{Feature, FeatureSet, Tenant};

/// What to do with a `max_tokens` above the plan's `max_output_tokens`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OverCap {
    /// Lower it to the cap (the default).
    #[default]
    Clamp,
    /// Refuse with 400 `invalid_request`.
    Reject,
}

/// The features a body uses. `n: 1`, `logprobs: false` and `stream: false`
/// use none.
pub fn features_used(api: Api, body: &Map<String, Value>) -> FeatureSet {
    let mut set = FeatureSet::default();
    let truthy = |k: &str| body.get(k).and_then(Value::as_bool) == Some(true);
    let present = |k: &str| body.get(k).is_some_and(|v| !v.is_null());
    if truthy("stream") {
        set.insert(Feature::Stream);
    }
    if present("tools") || present("functions") {
        set.insert(Feature::Tools);
    }
    let format = body
        .get("response_format")
        .and_then(|f| f.get("type"))
        .and_then(Value::as_str);
    if matches!(format, Some(t) if t != "text") {
        set.insert(Feature::JsonMode);
    }
    // Chat asks with a boolean, completions with a count.
    let logprobs = match body.get("logprobs") {
        Some(Value::Bool(b)) => *b,
        Some(Value::Number(n)) => n.as_u64().is_some_and(|n| n > 0),
        _ => false,
    };
    if logprobs
        || body
            .get("top_logprobs")
            .and_then(Value::as_u64)
            .is_some_and(|n| n > 0)
    {
        set.insert(Feature::Logprobs);
    }
    let many = |k: &str| body.get(k).and_then(Value::as_u64).is_some_and(|n| n > 1);
    if many("n") || many("best_of") {
        set.insert(Feature::MultiChoice);
    }
    api.dialect_features(body, &mut set);
    set
}

/// The body field that asks for `f`, for the rejection's `param`.
fn feature_field(api: Api, f: Feature) -> &'static str {
    match f {
        Feature::Stream => "stream",
        Feature::Tools => "tools",
        Feature::JsonMode => api.json_mode_field(),
        Feature::Logprobs => "logprobs",
        Feature::MultiChoice => "n",
        Feature::Vision => api.prompt_field(),
        Feature::Chat
        | Feature::Completions
        | Feature::Embeddings
        | Feature::Responses
        | Feature::Messages
        | Feature::Moderations
        | Feature::Rerank
        | Feature::Audio => "model",
    }
}

/// Checks the model and the features against the tenant's plan; returns
/// the allowlist entry the model matched.
pub fn check<'t>(
    api: Api,
    tenant: &'t Tenant,
    model: &str,
    used: FeatureSet,
) -> Result<&'t str, Reject> {
    // The model travels in `x-tenant-model`: only visible ASCII can match.
    let header_safe = model.bytes().all(|b| b.is_ascii_graphic());
    let Some(entry) = tenant.model_entry(model).filter(|_| header_safe) else {
        let mut r = Reject::forbidden(
            RejectCode::ModelNotAllowed,
            "the model is not available to this tenant",
        );
        r.param = Some("model".into());
        return Err(r);
    };
    if let Some(f) = Feature::ALL
        .into_iter()
        .find(|f| used.contains(*f) && !tenant.features.contains(*f))
    {
        let mut r = Reject::forbidden(
            RejectCode::FeatureNotAllowed,
            format!("the plan does not include {}", f.name()),
        );
        r.param = Some(feature_field(api, f).into());
        return Err(r);
    }
    Ok(entry)
}

/// Applies the output cap: an absent limit is set to the cap, one above it
/// is clamped or refused. Returns the effective output limit.
pub fn cap_output(
    api: Api,
    body: &mut Map<String, Value>,
    cap: u64,
    over: OverCap,
) -> Result<u64, Reject> {
    let Some(field) = api.output_cap_field(body) else {
        return Ok(0);
    };
    match body.get(field).and_then(Value::as_u64) {
        Some(asked) if asked <= cap => Ok(asked),
        Some(_) if over == OverCap::Reject => {
            let mut r = Reject::bad_request(
                RejectCode::InvalidRequest,
                format!("{field} is above the plan's limit of {cap}"),
            );
            r.param = Some(field.into());
            Err(r)
        }
        _ => {
            body.insert(field.into(), Value::from(cap));
            Ok(cap)
        }
    }
}

/// Forces `stream_options.include_usage` on streams so usage can be
/// settled; returns whether the client had asked for it itself.
pub fn force_stream_usage(body: &mut Map<String, Value>) -> bool {
    if body.get("stream").and_then(Value::as_bool) != Some(true) {
        return true;
    }
    let asked = body
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        == Some(true);
    let opts = body
        .entry("stream_options")
        .or_insert_with(|| Value::Object(Map::new()));
    if !opts.is_object() {
        *opts = Value::Object(Map::new());
    }
    if let Some(o) = opts.as_object_mut() {
        o.insert("include_usage".into(), Value::Bool(true));
    }
    asked
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn used(api: Api, v: Value) -> Vec<&'static str> {
        let set = features_used(api, v.as_object().unwrap());
        Feature::ALL
            .into_iter()
            .filter(|f| set.contains(*f))
            .map(Feature::name)
            .collect()
    }

    #[test]
    fn features_come_from_the_body() {
        let chat = Api::OpenAiChat;
        assert!(used(chat, json!({"n": 1, "logprobs": false, "stream": false})).is_empty());
        assert_eq!(used(chat, json!({"stream": true})), ["stream"]);
        assert_eq!(used(chat, json!({"functions": []})), ["tools"]);
        assert_eq!(
            used(chat, json!({"response_format": {"type": "json_object"}})),
            ["json_mode"]
        );
        assert!(used(chat, json!({"response_format": {"type": "text"}})).is_empty());
        assert_eq!(used(chat, json!({"logprobs": true})), ["logprobs"]);
        assert_eq!(
            used(Api::OpenAiCompletions, json!({"logprobs": 2})),
            ["logprobs"]
        );
        assert_eq!(used(chat, json!({"n": 3})), ["multi_choice"]);
        let vision = json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]});
        assert_eq!(used(chat, vision), ["vision"]);
    }

    #[test]
    fn output_cap_clamps_sets_or_refuses() {
        let chat = Api::OpenAiChat;
        let mut b = json!({"max_tokens": 5000}).as_object().unwrap().clone();
        assert_eq!(
            cap_output(chat, &mut b, 1024, OverCap::Clamp).unwrap(),
            1024
        );
        assert_eq!(b["max_tokens"], 1024);
        let mut b = json!({"max_tokens": 5000}).as_object().unwrap().clone();
        let r = cap_output(chat, &mut b, 1024, OverCap::Reject).unwrap_err();
        assert_eq!((r.status, r.param.as_deref()), (400, Some("max_tokens")));
        let mut b = Map::new();
        assert_eq!(
            cap_output(chat, &mut b, 1024, OverCap::Clamp).unwrap(),
            1024
        );
        assert_eq!(b["max_tokens"], 1024);
        let mut b = json!({"max_completion_tokens": 10})
            .as_object()
            .unwrap()
            .clone();
        assert_eq!(cap_output(chat, &mut b, 1024, OverCap::Clamp).unwrap(), 10);
        assert!(!b.contains_key("max_tokens"));
        let mut b = Map::new();
        assert_eq!(
            cap_output(Api::OpenAiEmbeddings, &mut b, 1024, OverCap::Clamp).unwrap(),
            0
        );
        assert!(b.is_empty());
    }

    #[test]
    fn streams_always_report_usage() {
        let mut b = json!({"stream": true}).as_object().unwrap().clone();
        assert!(!force_stream_usage(&mut b));
        assert_eq!(b["stream_options"]["include_usage"], true);
        let mut b = json!({"stream": true, "stream_options": {"include_usage": true}})
            .as_object()
            .unwrap()
            .clone();
        assert!(force_stream_usage(&mut b));
        let mut b = json!({"stream": false}).as_object().unwrap().clone();
        assert!(force_stream_usage(&mut b));
        assert!(!b.contains_key("stream_options"));
    }
}
