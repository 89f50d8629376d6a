//! The body stage: read with a hard bound, parse strictly, validate, apply
//! the tenant's model and feature policy and its guardrails, estimate
//! tokens, normalise.
//!
//! [`judge`] is the pure core: raw bytes in, the exact bytes to forward (or
//! a rejection) out. The proxy does the reading; nothing of a body reaches
//! the router before `judge` has accepted it.

pub mod intake;
pub mod multipart;
pub mod policy;
pub mod schema;
pub mod strict_json;
pub mod tokens;

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::Value;

use crate::guardrails::Acted;
use crate::ids::Binding;
use crate::reject::{Reject, RejectCode};
use crate::route::{Api, RouteSpec};
use crate::tenant::{FeatureSet, Tenant};
use policy::OverCap;
use schema::Schemas;

/// Gateway-wide body settings (`[body]` in gateway.toml).
#[derive(Debug, Clone)]
pub struct BodyConfig {
    /// A cap on every body, whatever the plan allows.
    pub max_body_bytes: u64,
    /// A cap on the body bytes held across every in-flight request.
    pub max_buffered_bytes: u64,
    /// The whole body must arrive within this time of the request head.
    pub read_timeout: Duration,
    /// After the first second, the body must keep arriving at least this
    /// fast (bytes per second, averaged from the head); 0 turns it off.
    pub min_bytes_per_second: u64,
    /// The deepest nesting accepted in a JSON body.
    pub max_depth: usize,
    pub max_tokens_over_cap: OverCap,
}

impl Default for BodyConfig {
    fn default() -> Self {
        BodyConfig {
            max_body_bytes: 8 * 1024 * 1024,
            max_buffered_bytes: 1 << 30,
            read_timeout: Duration::from_secs(30),
            min_bytes_per_second: 1024,
            max_depth: 64,
            max_tokens_over_cap: OverCap::Clamp,
        }
    }
}

impl BodyConfig {
    /// When the next body bytes must have arrived, having received
    /// `received` since `started`, and whether the minimum rate (rather than
    /// the whole-body timeout) sets that moment.
    pub fn next_read_deadline(&self, started: Instant, received: usize) -> (Instant, bool) {
        let whole = started + self.read_timeout;
        if self.min_bytes_per_second == 0 {
            return (whole, false);
        }
        let earned = Duration::from_secs_f64(received as f64 / self.min_bytes_per_second as f64);
        let by_rate = started + RATE_GRACE + earned;
        if by_rate < whole {
            (by_rate, true)
        } else {
            (whole, false)
        }
    }
}

/// How long a body may take before the minimum rate applies.
const RATE_GRACE: Duration = Duration::from_secs(1);

/// An accepted body and what the later stages need to know about it.
#[derive(Debug, Clone)]
pub struct Judged {
    /// The validated document, serialised once: what the router receives.
    pub body: Bytes,
    pub model: String,
    /// The allowlist entry the model matched: a bounded metric label.
    pub model_label: String,
    pub features: FeatureSet,
    pub prompt_tokens: u64,
    /// The effective output limit (0 for routes without one).
    pub max_output_tokens: u64,
    /// Whether the client asked for streamed usage itself; when it did not,
    /// the usage-only final chunk is not passed on.
    pub usage_requested: bool,
}

/// What a JSON body is judged with: the snapshot's body settings and
/// schemas, and the request's id binding (for `previous_response_id`).
#[derive(Clone, Copy)]
pub struct Gate<'a> {
    pub cfg: &'a BodyConfig,
    pub schemas: &'a Schemas,
    pub ids: Binding<'a>,
}

/// Judges a complete JSON body for `route` on behalf of `tenant`; what
/// the guardrails did, refused or not, is left in `acted`.
pub fn judge(
    route: &RouteSpec,
    tenant: &Tenant,
    gate: &Gate,
    raw: &[u8],
    acted: &mut Acted,
) -> Result<Judged, Reject> {
    let Gate { cfg, schemas, ids } = *gate;
    if raw.is_empty() && route.api == Api::OpenAiResponsesObject {
        return Ok(Judged::empty());
    }
    let mut doc = strict_json::parse(raw, cfg.max_depth)
        .map_err(|e| Reject::bad_request(RejectCode::InvalidJson, e.to_string()))?;
    schemas.check(route, &doc)?;
    let Value::Object(body) = &mut doc else {
        return Err(Reject::bad_request(
            RejectCode::InvalidJson,
            "the body must be a JSON object",
        ));
    };
    if let Some(field) = tenant
        .forbidden_fields
        .iter()
        .find(|f| body.contains_key(*f))
    {
        let mut r = Reject::bad_request(
            RejectCode::SchemaViolation,
            format!("field {field} is not allowed for this plan"),
        );
        r.param = Some(format!("/{field}"));
        return Err(r);
    }
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let api = route.api;
    let features = if api.reads_features() {
        policy::features_used(api, body)
    } else {
        FeatureSet::default()
    };
    // Only an absent `model` skips the allowlist: one that is not a string
    // (`["m-large"]`, `null`) is refused, since a router might still read it.
    let model_label = if !body.contains_key("model") && api.model_optional() {
        "-".to_string()
    } else {
        policy::check(api, tenant, &model, features)?.to_string()
    };
    let max_output_tokens = policy::cap_output(
        api,
        body,
        tenant.limits.max_output_tokens,
        cfg.max_tokens_over_cap,
    )?;
    // Before the estimate: what is forwarded, masked, is what is charged.
    tenant.guardrails.apply(api, body, acted)?;
    let prompt_tokens = api.prompt_tokens(&doc);
    if prompt_tokens > tenant.limits.max_prompt_tokens {
        let mut r = Reject::bad_request(
            RejectCode::PromptTooLong,
            format!(
                "the prompt is about {prompt_tokens} tokens; this plan allows {}",
                tenant.limits.max_prompt_tokens
            ),
        );
        r.param = Some(api.prompt_field().into());
        return Err(r);
    }
    let usage_requested = match &mut doc {
        Value::Object(body) if api.asks_for_stream_usage() => policy::force_stream_usage(body),
        _ => true,
    };
    // Every JSON route, not only `/v1/responses`: `input_tokens` (and any
    // `json` route an operator adds) can name a stored response too, and a
    // raw router id must not reach the router from any of them.
    if let Value::Object(body) = &mut doc {
        open_previous_response(body, &ids)?;
    }
    let mut body = Vec::with_capacity(raw.len() + 32);
    serde_json::to_writer(&mut body, &doc).map_err(|_| {
        Reject::new(
            500,
            RejectCode::InternalError,
            "could not serialise the body",
        )
    })?;
    Ok(Judged {
        body: Bytes::from(body),
        model,
        model_label,
        features,
        prompt_tokens,
        max_output_tokens,
        usage_requested,
    })
}

impl Judged {
    /// A request without a body (a stored response's GET or DELETE).
    pub fn empty() -> Judged {
        Judged {
            body: Bytes::new(),
            model: String::new(),
            model_label: "-".into(),
            features: FeatureSet::default(),
            prompt_tokens: 0,
            max_output_tokens: 0,
            usage_requested: true,
        }
    }
}

/// Gives the router the original id behind a bound `previous_response_id`;
/// another tenant's, an unbound or an altered one is 404.
fn open_previous_response(
    body: &mut serde_json::Map<String, Value>,
    ids: &Binding,
) -> Result<(), Reject> {
    const FIELD: &str = "previous_response_id";
    let Some(slot) = body.get_mut(FIELD).filter(|v| !v.is_null()) else {
        return Ok(());
    };
    let original = slot.as_str().and_then(|bound| ids.open(bound));
    match original {
        Some(id) => {
            *slot = Value::String(id);
            Ok(())
        }
        None => Err(response_not_found(FIELD)),
    }
}

/// 404 `response_not_found`, naming the field that held the id.
pub fn response_not_found(param: &str) -> Reject {
    let mut r = Reject::new(
        404,
        RejectCode::ResponseNotFound,
        "no response with this id exists for this tenant",
    );
    r.param = Some(param.into());
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::{Api, RouteSpec, Routes};
    use crate::tenant::Limits;

    fn json_route() -> RouteSpec {
        RouteSpec {
            path: "/v1/tokenize".into(),
            methods: vec![http::Method::POST],
            api: Api::Json,
            feature: None,
            schema: None,
            label: "tokenize".into(),
            max_body_bytes: None,
        }
    }

    #[test]
    fn a_json_route_checks_only_json_and_a_model_when_there_is_one() {
        let limits = Limits {
            max_body_bytes: 1 << 20,
            ..Limits::each(1)
        };
        let tenant = Tenant {
            models: vec!["m-small".into()],
            ..Tenant::new("t", "o", "p", limits, None)
        };
        let schemas = Schemas::load(None, &Routes::built_in()).unwrap();
        let cfg = BodyConfig::default();
        let keys = crate::ids::ResponseIds::from_key(&[1; 32]).unwrap();
        let gate = Gate {
            cfg: &cfg,
            schemas: &schemas,
            ids: Binding::new(&keys, "t"),
        };
        let route = json_route();
        let judge = |raw: &[u8]| judge(&route, &tenant, &gate, raw, &mut Acted::default());
        // No model, OpenAI-looking members left alone, nothing estimated.
        let j = judge(br#"{"text": "a long prompt", "stream": true, "n": 4}"#).unwrap();
        assert_eq!(
            (j.model_label.as_str(), j.prompt_tokens, j.max_output_tokens),
            ("-", 0, 0)
        );
        assert_eq!(j.features, FeatureSet::default());
        let sent: Value = serde_json::from_slice(&j.body).unwrap();
        assert_eq!(
            sent,
            serde_json::json!({"text": "a long prompt", "stream": true, "n": 4}),
            "no stream_options or max_tokens added"
        );
        assert!(judge(br#"{"model": "m-small", "text": "x"}"#).is_ok());
        for refused in [
            &br#"{"model": "m-large", "text": "x"}"#[..],
            br#"{"model": ["m-large"], "text": "x"}"#,
            br#"{"model": null, "text": "x"}"#,
            br#"{"model": "", "text": "x"}"#,
        ] {
            let r = judge(refused).unwrap_err();
            assert_eq!((r.status, r.code.as_str()), (403, "model_not_allowed"));
        }
        let r = judge(br#"{"text": "x", "text": "y"}"#).unwrap_err();
        assert_eq!(r.code.as_str(), "invalid_json");
    }

    #[test]
    fn the_rate_floor_tightens_the_deadline_until_the_whole_body_timeout_binds() {
        let cfg = BodyConfig {
            min_bytes_per_second: 1000,
            read_timeout: Duration::from_secs(10),
            ..BodyConfig::default()
        };
        let t = Instant::now();
        assert_eq!(cfg.next_read_deadline(t, 0), (t + RATE_GRACE, true));
        assert_eq!(
            cfg.next_read_deadline(t, 2500),
            (t + Duration::from_millis(3500), true)
        );
        assert_eq!(
            cfg.next_read_deadline(t, 1_000_000),
            (t + Duration::from_secs(10), false)
        );
        let off = BodyConfig {
            min_bytes_per_second: 0,
            ..cfg
        };
        assert_eq!(
            off.next_read_deadline(t, 0),
            (t + Duration::from_secs(10), false)
        );
    }
}
