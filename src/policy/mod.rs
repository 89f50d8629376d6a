//! The policy stage: contractual rules a plan table cannot express.
//!
//! It runs after the body stage, so the model and features are known, and
//! before any quota is reserved: embedded Rego first, then the optional
//! external authorizer. Both fail closed unless configured otherwise.

pub mod ext_authz;
pub mod rego;

use std::collections::{BTreeMap, HashSet};
use std::sync::{LazyLock, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use http::HeaderMap;
use regorus::Value;

use crate::identity::Identity;
use crate::observe::metrics::METRICS;
use crate::reject::{Reject, RejectCode};
use crate::route::RouteSpec;
use crate::tenant::{Feature, FeatureSet};
use ext_authz::ExtAuthz;
use rego::RegoPolicy;

/// The policy stage's engines for one snapshot: embedded Rego, then the
/// optional external authorizer.
pub struct Policies {
    pub rego: Option<RegoPolicy>,
    pub ext_authz: Option<ExtAuthz>,
    /// The JWT claims a Rego policy sees (`[policy] jwt_claims`).
    pub jwt_claims: Vec<String>,
}

impl Policies {
    /// Whether there is nothing to evaluate.
    pub fn is_empty(&self) -> bool {
        self.rego.is_none() && self.ext_authz.is_none()
    }

    /// Runs Rego, then the external authorizer; returns the headers they add
    /// for the router. Either refusing, or failing, refuses the request.
    pub async fn authorize(
        &self,
        req: &PolicyRequest<'_>,
        client: &HeaderMap,
        path_and_query: &str,
        request_id: &str,
    ) -> Result<PolicyHeaders, Reject> {
        let mut headers = PolicyHeaders::new();
        if let Some(rego) = &self.rego {
            let started = Instant::now();
            let now_ns = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
            let verdict = rego
                .decide(req.rego_input(&self.jwt_claims, now_ns))
                .map_err(|e| policy_error("rego", &e));
            METRICS
                .policy_duration
                .with_label_values(&["rego"])
                .observe(started.elapsed().as_secs_f64());
            headers = verdict??;
        }
        if let Some(ext) = &self.ext_authz {
            let started = Instant::now();
            let verdict = ext.check(req, client, path_and_query, request_id).await;
            METRICS
                .policy_duration
                .with_label_values(&["ext_authz"])
                .observe(started.elapsed().as_secs_f64());
            headers.extend(verdict?);
        }
        Ok(headers)
    }
}

/// What the policy stage knows about a request.
pub struct PolicyRequest<'a> {
    pub identity: &'a Identity,
    pub method: &'a str,
    pub route: &'a RouteSpec,
    pub model: &'a str,
    pub features: FeatureSet,
    /// The gateway's own region (`[server] region`).
    pub region: &'a str,
    pub body_bytes: usize,
    pub prompt_tokens: u64,
}

impl PolicyRequest<'_> {
    pub fn feature_names(&self) -> impl Iterator<Item = &'static str> + '_ {
        Feature::ALL
            .into_iter()
            .filter(|f| self.features.contains(*f))
            .map(Feature::name)
    }

    /// The Rego input document (documented in README, "Policies"), built
    /// as regorus values directly: no JSON in between.
    pub fn rego_input(&self, jwt_claims: &[String], unix_ns: i64) -> Value {
        let t = &self.identity.tenant;
        let l = &t.limits;
        let claims: Vec<(&str, Value)> = match &self.identity.token {
            Some(tok) => jwt_claims
                .iter()
                .filter_map(|c| {
                    tok.claims
                        .get(c)
                        .map(|v| (c.as_str(), Value::from(v.clone())))
                })
                .collect(),
            None => Vec::new(),
        };
        object([
            (
                "tenant",
                object([
                    ("id", Value::from(t.id.as_str())),
                    ("org", Value::from(t.org.as_str())),
                    ("plan", Value::from(t.plan.as_str())),
                    (
                        "limits",
                        object([
                            ("requests_per_second", Value::from(l.requests_per_second)),
                            ("burst", Value::from(l.burst)),
                            ("tokens_per_minute", Value::from(l.tokens_per_minute)),
                            ("tokens_per_day", Value::from(l.tokens_per_day)),
                            ("max_concurrency", Value::from(l.max_concurrency)),
                            ("max_body_bytes", Value::from(l.max_body_bytes)),
                            ("max_prompt_tokens", Value::from(l.max_prompt_tokens)),
                            ("max_output_tokens", Value::from(l.max_output_tokens)),
                        ]),
                    ),
                ]),
            ),
            (
                "identity",
                object([
                    ("kind", Value::from(self.identity.kind.as_str())),
                    (
                        "subject",
                        self.identity
                            .subject
                            .as_deref()
                            .map_or(Value::Null, Value::from),
                    ),
                    ("claims", object(claims)),
                ]),
            ),
            (
                "request",
                object([
                    ("method", Value::from(self.method)),
                    ("route", Value::from(self.route.path.as_str())),
                    ("model", Value::from(self.model)),
                    (
                        "features",
                        Value::from(self.feature_names().map(Value::from).collect::<Vec<_>>()),
                    ),
                    ("region", Value::from(self.region)),
                    ("body_bytes", Value::from(self.body_bytes)),
                    ("prompt_tokens", Value::from(self.prompt_tokens)),
                ]),
            ),
            ("time", time_input(unix_ns)),
        ])
    }
}

/// `input.time`: `unix` (seconds), `hour_utc` (0-23), `weekday` (the
/// English day name, as OPA's `time.weekday` returns it) and `unix_ns`.
fn time_input(unix_ns: i64) -> Value {
    const WEEKDAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let unix = unix_ns.div_euclid(1_000_000_000);
    let days = unix.div_euclid(86_400);
    let hour = unix.rem_euclid(86_400) / 3600;
    // 1970-01-01 was a Thursday.
    let weekday = WEEKDAYS[usize::try_from(days.rem_euclid(7)).unwrap_or(0)];
    object([
        ("unix", Value::from(unix)),
        ("hour_utc", Value::from(hour)),
        ("weekday", Value::from(weekday)),
        ("unix_ns", Value::from(unix_ns)),
    ])
}

fn object<'k>(pairs: impl IntoIterator<Item = (&'k str, Value)>) -> Value {
    Value::from(
        pairs
            .into_iter()
            .map(|(k, v)| (Value::from(k), v))
            .collect::<BTreeMap<_, _>>(),
    )
}

/// Headers a policy adds for the router; names start `x-tenant-policy-`.
pub type PolicyHeaders = Vec<(String, String)>;

/// At most this many policy headers, each value at most `MAX_MESSAGE` bytes.
pub(crate) const MAX_HEADERS: usize = 16;
pub(crate) const MAX_MESSAGE: usize = 256;

/// Checks one policy header: its name in the `x-tenant-policy-` namespace
/// (stripped from clients, signed for the router), a short visible value.
pub fn policy_header(name: &str, value: &str) -> Result<(String, String), String> {
    let name = name.to_ascii_lowercase();
    let suffix = name.strip_prefix("x-tenant-policy-").unwrap_or_default();
    let name_ok = !suffix.is_empty()
        && name.len() <= 64
        && suffix
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !name_ok {
        return Err(format!(
            "policy header {name:?} must be x-tenant-policy-<a-z0-9->"
        ));
    }
    let value_ok =
        value.len() <= MAX_MESSAGE && value.bytes().all(|b| b == b' ' || b.is_ascii_graphic());
    if !value_ok {
        return Err(format!(
            "policy header {name} has a value that cannot be sent"
        ));
    }
    Ok((name, value.to_string()))
}

/// Policy codes become metric labels and `reject_code`s, which must stay a
/// small set: the first 64 distinct valid codes are kept for the life of
/// the process, later ones report as `policy_denied`.
pub(crate) fn intern_code(code: &str) -> Result<&'static str, String> {
    static CODES: LazyLock<Mutex<HashSet<&'static str>>> =
        LazyLock::new(|| Mutex::new(HashSet::new()));
    let valid = (1..=64).contains(&code.len())
        && code.starts_with(|c: char| c.is_ascii_lowercase())
        && code
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !valid {
        return Err(format!(
            "denial code {code:?} must match [a-z][a-z0-9_]{{0,63}}"
        ));
    }
    let mut codes = CODES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = codes.get(code) {
        return Ok(c);
    }
    if codes.len() >= 64 {
        return Ok("policy_denied");
    }
    let leaked: &'static str = Box::leak(code.to_string().into_boxed_str());
    codes.insert(leaked);
    Ok(leaked)
}

/// The answer for a policy that could not be evaluated: deny, counted.
pub fn policy_error(engine: &'static str, detail: &str) -> Reject {
    METRICS.policy_errors.with_label_values(&[engine]).inc();
    tracing::error!(engine, error = detail, "policy evaluation failed; denying");
    Reject::forbidden(
        RejectCode::PolicyError,
        "the request could not be authorized by policy",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_input_names_the_hour_and_the_day_in_utc() {
        // 2026-11-30 was a Monday; 14:30:00 UTC that day.
        let t = time_input((1_795_996_800 + 14 * 3600 + 1800) * 1_000_000_000 + 7);
        assert_eq!(t["unix"], Value::from(1_795_996_800i64 + 14 * 3600 + 1800));
        assert_eq!(t["hour_utc"], Value::from(14i64));
        assert_eq!(t["weekday"], Value::from("Monday"));
        assert_eq!(
            t["unix_ns"],
            Value::from((1_795_996_800i64 + 14 * 3600 + 1800) * 1_000_000_000 + 7)
        );
        assert_eq!(time_input(0)["weekday"], Value::from("Thursday"));
        // 1969-12-31 23:00 UTC, a Wednesday: floor division, not truncation.
        let before = time_input(-3600 * 1_000_000_000);
        assert_eq!(before["hour_utc"], Value::from(23i64));
        assert_eq!(before["weekday"], Value::from("Wednesday"));
    }
}
