//! `tenants.toml`: plans and tenants, resolved into each tenant's effective
//! limits (plan plus overrides) once per load, so the request path only
//! reads precomputed values.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use super::diag::{Diagnostic, SourceFile};
use crate::guardrails::detect::{Detectors, Kind, KindSet};
use crate::guardrails::{DenyAction, DenyRules, Guardrails, PiiMode};
use crate::identity::api_key::parse_key_hash;
use crate::limits::spend::Price;
use crate::limits::{ScopeLimiter, ScopeLimits, ScopeName};
use crate::tenant::{
    Feature, FeatureSet, KeyEntry, KeyObject, Limits, ModelPatterns, Tenant, Tenants,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    plans: BTreeMap<String, RawPlan>,
    #[serde(default)]
    tenants: Vec<RawTenant>,
    /// Per million tokens, by model pattern.
    #[serde(default)]
    prices: BTreeMap<String, RawPrice>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    input: f64,
    output: f64,
    cached_input: Option<f64>,
}

/// A `model_limits` entry: token and request limits only, never money.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModelLimits {
    requests_per_second: Option<f64>,
    burst: Option<u32>,
    tokens_per_minute: Option<u64>,
    tokens_per_day: Option<u64>,
    max_concurrency: Option<u32>,
}

impl RawModelLimits {
    /// `over`'s keys replace this entry's, one by one.
    fn merged(&self, over: &RawModelLimits) -> RawModelLimits {
        RawModelLimits {
            requests_per_second: over.requests_per_second.or(self.requests_per_second),
            burst: over.burst.or(self.burst),
            tokens_per_minute: over.tokens_per_minute.or(self.tokens_per_minute),
            tokens_per_day: over.tokens_per_day.or(self.tokens_per_day),
            max_concurrency: over.max_concurrency.or(self.max_concurrency),
        }
    }
}

/// `[plans.*.guardrails]`, and a tenant's `[tenants.overrides.guardrails]`,
/// whose keys replace the plan's one by one (a tenant's `deny` replaces
/// the plan's list, it does not add to it).
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGuardrails {
    pii: Option<PiiMode>,
    pii_kinds: Option<Vec<Spanned<String>>>,
    deny: Option<Vec<Spanned<String>>>,
    deny_action: Option<DenyAction>,
}

impl RawGuardrails {
    fn merged(&self, over: &RawGuardrails) -> RawGuardrails {
        RawGuardrails {
            pii: over.pii.or(self.pii),
            pii_kinds: over.pii_kinds.clone().or_else(|| self.pii_kinds.clone()),
            deny: over.deny.clone().or_else(|| self.deny.clone()),
            deny_action: over.deny_action.or(self.deny_action),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    requests_per_second: f64,
    burst: u32,
    tokens_per_minute: u64,
    tokens_per_day: u64,
    max_concurrency: u32,
    max_body_bytes: u64,
    max_prompt_tokens: u64,
    max_output_tokens: u64,
    models: Vec<Spanned<String>>,
    features: Vec<Spanned<String>>,
    regions: Option<Vec<String>>,
    #[serde(default)]
    forbidden_fields: Vec<String>,
    budget_per_day: Option<f64>,
    budget_per_month: Option<f64>,
    #[serde(default)]
    model_limits: BTreeMap<String, RawModelLimits>,
    #[serde(default)]
    guardrails: RawGuardrails,
}

/// Per-tenant overrides: any plan key, each optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOverrides {
    requests_per_second: Option<f64>,
    burst: Option<u32>,
    tokens_per_minute: Option<u64>,
    tokens_per_day: Option<u64>,
    max_concurrency: Option<u32>,
    max_body_bytes: Option<u64>,
    max_prompt_tokens: Option<u64>,
    max_output_tokens: Option<u64>,
    models: Option<Vec<Spanned<String>>>,
    features: Option<Vec<Spanned<String>>>,
    regions: Option<Vec<String>>,
    forbidden_fields: Option<Vec<String>>,
    budget_per_day: Option<f64>,
    budget_per_month: Option<f64>,
    /// Merged key by key into the plan's entry for the same pattern.
    #[serde(default)]
    model_limits: BTreeMap<String, RawModelLimits>,
    /// Merged key by key into the plan's.
    guardrails: Option<RawGuardrails>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    id: Spanned<String>,
    org: String,
    plan: Spanned<String>,
    #[serde(default)]
    suspended: bool,
    #[serde(default)]
    api_keys: Vec<Spanned<String>>,
    #[serde(default)]
    mtls_identities: Vec<Spanned<String>>,
    #[serde(default)]
    jwt_subjects: Vec<String>,
    #[serde(default)]
    overrides: RawOverrides,
    /// API keys as objects, beside (or instead of) `api_keys`.
    #[serde(default)]
    keys: Vec<RawKey>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    id: Spanned<String>,
    hash: Spanned<String>,
    expires_at: Option<Spanned<toml::value::Datetime>>,
    #[serde(default)]
    disabled: bool,
    /// Narrows the tenant's allowlist; never widens it.
    models: Option<Vec<Spanned<String>>>,
    // The key's own limits, nested inside the tenant's.
    requests_per_second: Option<f64>,
    burst: Option<u32>,
    tokens_per_minute: Option<u64>,
    tokens_per_day: Option<u64>,
    max_concurrency: Option<u32>,
    budget_per_day: Option<f64>,
    budget_per_month: Option<f64>,
}

/// Parses and validates `tenants.toml`, collecting every problem found.
/// Tenants whose limits are unchanged from `previous` keep their limiter.
pub fn load(path: &Path, previous: Option<&Tenants>) -> Result<Tenants, Vec<Diagnostic>> {
    let src = SourceFile::read(path).map_err(|d| vec![d])?;
    let raw: RawFile = src.parse_toml().map_err(|d| vec![d])?;
    let mut errs = Vec::new();

    // Plans are checked whether or not a tenant uses them.
    let mut plan_features = HashMap::new();
    let mut rails = GuardrailBuilder::default();
    let mut plan_rails = HashMap::new();
    for (name, plan) in &raw.plans {
        if !valid_id(name) {
            errs.push(src.at(
                None,
                format!("plan name {name:?} must be 1-64 characters of A-Z a-z 0-9 . _ -"),
            ));
        }
        check_limits(
            &src,
            &format!("plan {name:?}"),
            plan.requests_per_second,
            plan.burst,
            &mut errs,
        );
        plan_features.insert(
            name.as_str(),
            parse_features(&src, &plan.features, &mut errs),
        );
        let what = format!("plan {name:?}");
        check_budgets(
            &src,
            &what,
            plan.budget_per_day,
            plan.budget_per_month,
            &mut errs,
        );
        for (pattern, l) in &plan.model_limits {
            model_scope_limits(&src, &what, pattern, l, &mut errs);
        }
        plan_rails.insert(
            name.as_str(),
            rails.build(&src, &what, &plan.guardrails, &mut errs),
        );
    }
    let mut prices = Vec::new();
    for (pattern, p) in &raw.prices {
        check_pattern(&src, "prices", pattern, &mut errs);
        let ok = |x: f64| x.is_finite() && x >= 0.0;
        if !(ok(p.input) && ok(p.output) && p.cached_input.is_none_or(ok)) {
            errs.push(src.at(
                None,
                format!("prices {pattern:?}: prices must be numbers of at least 0"),
            ));
        }
        let price = Price {
            input: p.input,
            output: p.output,
            cached_input: p.cached_input,
        };
        prices.push((pattern.clone(), price));
    }

    let mut out = Tenants::default();
    let mut seen_mtls: HashMap<String, String> = HashMap::new();
    let mut by_mtls = HashMap::new();
    for t in raw.tenants {
        let id = t.id.get_ref().clone();
        if !valid_id(&id) {
            errs.push(src.at(
                Some(t.id.span()),
                format!("tenant id {id:?} must be 1-64 characters of A-Z a-z 0-9 . _ -"),
            ));
        }
        if !valid_header_text(&t.org) {
            errs.push(src.at(
                Some(t.id.span()),
                format!("tenant {id:?}: org must be 1-128 printable ASCII characters"),
            ));
        }
        if out.by_id.contains_key(&id) {
            errs.push(src.at(Some(t.id.span()), format!("duplicate tenant id {id:?}")));
            continue;
        }
        let Some(plan) = raw.plans.get(t.plan.get_ref()) else {
            errs.push(src.at(
                Some(t.plan.span()),
                format!("tenant {id:?} names undefined plan {:?}", t.plan.get_ref()),
            ));
            continue;
        };
        let o = &t.overrides;
        let limits = Limits {
            requests_per_second: o.requests_per_second.unwrap_or(plan.requests_per_second),
            burst: o.burst.unwrap_or(plan.burst),
            tokens_per_minute: o.tokens_per_minute.unwrap_or(plan.tokens_per_minute),
            tokens_per_day: o.tokens_per_day.unwrap_or(plan.tokens_per_day),
            max_concurrency: o.max_concurrency.unwrap_or(plan.max_concurrency),
            max_body_bytes: o.max_body_bytes.unwrap_or(plan.max_body_bytes),
            max_prompt_tokens: o.max_prompt_tokens.unwrap_or(plan.max_prompt_tokens),
            max_output_tokens: o.max_output_tokens.unwrap_or(plan.max_output_tokens),
        };
        check_limits(
            &src,
            &format!("tenant {id:?}"),
            limits.requests_per_second,
            limits.burst,
            &mut errs,
        );
        let what = format!("tenant {id:?}");
        let budget_per_day = o.budget_per_day.or(plan.budget_per_day);
        let budget_per_month = o.budget_per_month.or(plan.budget_per_month);
        check_budgets(&src, &what, o.budget_per_day, o.budget_per_month, &mut errs);
        let scope = ScopeLimits {
            budget_per_day,
            budget_per_month,
            ..ScopeLimits::tenant(&limits)
        };
        let prev = previous.and_then(|p| p.by_id(&id));
        let model_scopes = model_scopes(&src, &what, plan, o, prev.map(|t| &**t), &mut errs);
        let models = o.models.as_ref().unwrap_or(&plan.models);
        let features = match &o.features {
            Some(list) => parse_features(&src, list, &mut errs),
            None => plan_features
                .get(t.plan.get_ref().as_str())
                .copied()
                .unwrap_or_default(),
        };

        let guardrails = match &o.guardrails {
            Some(over) => rails.build(&src, &what, &plan.guardrails.merged(over), &mut errs),
            None => plan_rails
                .get(t.plan.get_ref().as_str())
                .cloned()
                .unwrap_or_default(),
        };

        let index = out.list.len();
        for key in &t.api_keys {
            match parse_key_hash(key.get_ref()) {
                Some(digest) => {
                    if out
                        .by_api_key
                        .insert(digest, KeyEntry::Listed(index))
                        .is_some()
                    {
                        errs.push(src.at(Some(key.span()), "API key hash is listed twice"));
                    }
                }
                None => errs.push(src.at(
                    Some(key.span()),
                    "api_keys entries must be \"sha256:\" followed by 64 hex digits \
                     (hashes only, never plaintext keys)",
                )),
            }
        }
        for ident in &t.mtls_identities {
            by_mtls.insert(ident.get_ref().clone(), index);
            if let Some(other) = seen_mtls.insert(ident.get_ref().clone(), id.clone()) {
                errs.push(src.at(
                    Some(ident.span()),
                    format!(
                        "mTLS identity {:?} already belongs to tenant {other:?}",
                        ident.get_ref()
                    ),
                ));
            }
        }

        // The keys' own scopes first: the tenant holds them, and every key
        // object's view of the tenant is a clone of it.
        let mut key_limits = Vec::new();
        for key in &t.keys {
            let l = key_scope_limits(&src, key, &mut errs);
            key_limits.push((!l.is_empty()).then(|| {
                let previous = prev.and_then(|p| {
                    p.key_scopes
                        .iter()
                        .find(|s| s.name == ScopeName::key(key.id.get_ref()))
                });
                ScopeLimiter::carry(previous, ScopeName::key(key.id.get_ref()), &l)
            }));
        }
        let tenant = Tenant {
            suspended: t.suspended,
            models: models.iter().map(|m| m.get_ref().clone()).collect(),
            features,
            regions: o.regions.clone().or_else(|| plan.regions.clone()),
            forbidden_fields: o
                .forbidden_fields
                .clone()
                .unwrap_or_else(|| plan.forbidden_fields.clone()),
            guardrails,
            jwt_subjects: t.jwt_subjects,
            mtls_identities: t
                .mtls_identities
                .into_iter()
                .map(Spanned::into_inner)
                .collect(),
            limiter: ScopeLimiter::carry(prev.map(|t| &t.limiter), ScopeName::tenant(&id), &scope),
            model_scopes,
            key_scopes: key_limits.iter().flatten().cloned().collect(),
            ..Tenant::new(&id, &t.org, t.plan.get_ref(), limits, None)
        };
        let tenant = Arc::new(tenant);
        let mut key_ids = HashMap::new();
        for (key, limiter) in t.keys.into_iter().zip(key_limits) {
            let Some(object) = key_object(&src, &tenant, &key, limiter, &mut errs) else {
                continue;
            };
            if key_ids.insert(object.id.clone(), ()).is_some() {
                errs.push(src.at(
                    Some(key.id.span()),
                    format!("tenant {id:?}: key id {:?} is used twice", object.id),
                ));
            }
            match parse_key_hash(key.hash.get_ref()) {
                Some(digest) => {
                    let entry = KeyEntry::Object(Arc::new(object));
                    if out.by_api_key.insert(digest, entry).is_some() {
                        errs.push(src.at(Some(key.hash.span()), "API key hash is listed twice"));
                    }
                }
                None => errs.push(src.at(
                    Some(key.hash.span()),
                    "a key's hash must be \"sha256:\" followed by 64 hex digits \
                     (hashes only, never plaintext keys)",
                )),
            }
        }
        out.by_id.insert(id, index);
        out.list.push(tenant);
    }

    out.by_mtls = by_mtls;
    out.prices = ModelPatterns::new(prices);
    if errs.is_empty() {
        Ok(out)
    } else {
        Err(errs)
    }
}

/// Compiles guardrails during one load: the detectors once, and each
/// distinct deny list once, however many plans and tenants share it.
#[derive(Default)]
struct GuardrailBuilder {
    detectors: Option<Arc<Detectors>>,
    /// `None`: the list did not compile, and that was reported.
    deny: HashMap<Vec<String>, Option<Arc<DenyRules>>>,
}

impl GuardrailBuilder {
    fn build(
        &mut self,
        src: &SourceFile,
        what: &str,
        raw: &RawGuardrails,
        errs: &mut Vec<Diagnostic>,
    ) -> Arc<Guardrails> {
        let what = format!("{what}: guardrails");
        let pii = raw.pii.unwrap_or_default();
        let kinds = match &raw.pii_kinds {
            None => KindSet::all(),
            Some(list) => {
                let mut kinds = KindSet::default();
                for name in list {
                    match Kind::parse(name.get_ref()) {
                        Some(k) => kinds.insert(k),
                        None => errs.push(src.at(
                            Some(name.span()),
                            format!(
                                "{what}: unknown pii_kinds entry {:?} (one of {})",
                                name.get_ref(),
                                Kind::ALL.map(Kind::name).join(", ")
                            ),
                        )),
                    }
                }
                if list.is_empty() && pii != PiiMode::Off {
                    errs.push(src.at(
                        None,
                        format!("{what}: pii_kinds is empty; set pii = \"off\" instead"),
                    ));
                }
                kinds
            }
        };
        let detectors = if pii == PiiMode::Off {
            None
        } else {
            self.detectors(src, errs)
        };
        let deny = match &raw.deny {
            Some(list) if !list.is_empty() => self.deny(src, &what, list, errs),
            _ => None,
        };
        Arc::new(Guardrails::new(
            pii,
            kinds,
            detectors,
            deny,
            raw.deny_action.unwrap_or_default(),
        ))
    }

    fn detectors(
        &mut self,
        src: &SourceFile,
        errs: &mut Vec<Diagnostic>,
    ) -> Option<Arc<Detectors>> {
        if self.detectors.is_none() {
            match Detectors::new() {
                Ok(d) => self.detectors = Some(Arc::new(d)),
                Err(e) => errs.push(src.at(None, format!("the built-in detectors: {e}"))),
            }
        }
        self.detectors.clone()
    }

    fn deny(
        &mut self,
        src: &SourceFile,
        what: &str,
        list: &[Spanned<String>],
        errs: &mut Vec<Diagnostic>,
    ) -> Option<Arc<DenyRules>> {
        let patterns: Vec<String> = list.iter().map(|p| p.get_ref().clone()).collect();
        if let Some(done) = self.deny.get(&patterns) {
            return done.clone();
        }
        let refs: Vec<&str> = patterns.iter().map(String::as_str).collect();
        let compiled = match DenyRules::compile(&refs) {
            Ok(rules) => Some(Arc::new(rules)),
            Err((rule, why)) => {
                let span = list.get(rule.unwrap_or(0)).map(Spanned::span);
                let which = rule.map_or("the deny list".to_string(), |i| format!("deny rule {i}"));
                errs.push(src.at(span, format!("{what}: {which} {why}")));
                None
            }
        };
        self.deny.insert(patterns, compiled.clone());
        compiled
    }
}

/// A `[[tenants.keys]]` entry checked against its tenant: a valid id, an
/// expiry with its UTC offset, and models the tenant already allows.
fn key_object(
    src: &SourceFile,
    tenant: &Arc<Tenant>,
    key: &RawKey,
    limiter: Option<Arc<ScopeLimiter>>,
    errs: &mut Vec<Diagnostic>,
) -> Option<KeyObject> {
    let id = key.id.get_ref();
    if !KeyObject::valid_id(id) {
        errs.push(src.at(
            Some(key.id.span()),
            format!("key id {id:?} must be 1-64 characters of a-z 0-9 _ -"),
        ));
        return None;
    }
    let expires_at = match &key.expires_at {
        None => None,
        Some(at) => match unix_seconds(at.get_ref()) {
            Some(t) => Some(t),
            None => {
                errs.push(src.at(
                    Some(at.span()),
                    format!("key {id:?}: expires_at must be a date and time with an offset, such as 2027-06-30T00:00:00Z"),
                ));
                return None;
            }
        },
    };
    let tenant = match &key.models {
        None => tenant.clone(),
        Some(models) => {
            for m in models.iter().filter(|m| !covered_by(tenant, m.get_ref())) {
                errs.push(src.at(
                    Some(m.span()),
                    format!(
                        "key {id:?}: model {:?} is not in tenant {:?}'s allowlist (a key narrows it, never widens it)",
                        m.get_ref(),
                        tenant.id
                    ),
                ));
            }
            Arc::new(Tenant {
                models: models.iter().map(|m| m.get_ref().clone()).collect(),
                ..(**tenant).clone()
            })
        }
    };
    Some(KeyObject {
        id: id.clone(),
        expires_at,
        disabled: key.disabled,
        tenant,
        limiter,
    })
}

/// A key's own limits, checked like any scope's.
fn key_scope_limits(src: &SourceFile, key: &RawKey, errs: &mut Vec<Diagnostic>) -> ScopeLimits {
    let what = format!("key {:?}", key.id.get_ref());
    check_budgets(src, &what, key.budget_per_day, key.budget_per_month, errs);
    ScopeLimits {
        rate: rate(src, &what, key.requests_per_second, key.burst, errs),
        tokens_per_minute: key.tokens_per_minute,
        tokens_per_day: key.tokens_per_day,
        max_concurrency: key.max_concurrency,
        budget_per_day: key.budget_per_day,
        budget_per_month: key.budget_per_month,
    }
}

/// A tenant's model scopes: the plan's `model_limits` with the tenant's
/// overrides merged in, key by key. Each keeps its state over a reload
/// while its limits stay the same.
fn model_scopes(
    src: &SourceFile,
    what: &str,
    plan: &RawPlan,
    o: &RawOverrides,
    previous: Option<&Tenant>,
    errs: &mut Vec<Diagnostic>,
) -> ModelPatterns<Arc<ScopeLimiter>> {
    let mut merged = plan.model_limits.clone();
    for (pattern, over) in &o.model_limits {
        let entry = merged.entry(pattern.clone()).or_default();
        *entry = entry.merged(over);
    }
    let entries = merged
        .iter()
        .map(|(pattern, l)| {
            let limits = model_scope_limits(src, what, pattern, l, errs);
            let prev = previous.and_then(|t| t.model_scopes.get(pattern));
            let limiter = ScopeLimiter::carry(prev, ScopeName::model(pattern), &limits);
            (pattern.clone(), limiter)
        })
        .collect();
    ModelPatterns::new(entries)
}

fn model_scope_limits(
    src: &SourceFile,
    what: &str,
    pattern: &str,
    l: &RawModelLimits,
    errs: &mut Vec<Diagnostic>,
) -> ScopeLimits {
    check_pattern(src, &format!("{what}: model_limits"), pattern, errs);
    let what = format!("{what}: model_limits {pattern:?}");
    ScopeLimits {
        rate: rate(src, &what, l.requests_per_second, l.burst, errs),
        tokens_per_minute: l.tokens_per_minute,
        tokens_per_day: l.tokens_per_day,
        max_concurrency: l.max_concurrency,
        budget_per_day: None,
        budget_per_month: None,
    }
}

/// An optional request rate: `burst` defaults to the rate rounded up (at
/// least 1), and means nothing without a rate.
fn rate(
    src: &SourceFile,
    what: &str,
    rps: Option<f64>,
    burst: Option<u32>,
    errs: &mut Vec<Diagnostic>,
) -> Option<(f64, u32)> {
    match (rps, burst) {
        (None, None) => None,
        (None, Some(_)) => {
            errs.push(src.at(None, format!("{what}: burst needs requests_per_second")));
            None
        }
        (Some(rps), burst) => {
            let burst = burst.unwrap_or_else(|| rps.ceil().clamp(1.0, f64::from(u32::MAX)) as u32);
            check_limits(src, what, rps, burst, errs);
            Some((rps, burst))
        }
    }
}

fn check_budgets(
    src: &SourceFile,
    what: &str,
    per_day: Option<f64>,
    per_month: Option<f64>,
    errs: &mut Vec<Diagnostic>,
) {
    for (key, v) in [("budget_per_day", per_day), ("budget_per_month", per_month)] {
        if v.is_some_and(|v| !(v.is_finite() && v >= 0.0)) {
            errs.push(src.at(
                None,
                format!("{what}: {key} must be a number of at least 0"),
            ));
        }
    }
}

/// A model pattern: printable ASCII without spaces, `*` only at the end.
fn check_pattern(src: &SourceFile, what: &str, pattern: &str, errs: &mut Vec<Diagnostic>) {
    let body = pattern.strip_suffix('*').unwrap_or(pattern);
    if !(1..=128).contains(&pattern.len())
        || !body.bytes().all(|b| b.is_ascii_graphic() && b != b'*')
    {
        errs.push(src.at(
            None,
            format!("{what}: {pattern:?} must be a model name, or a prefix ending in *, of 1-128 printable characters"),
        ));
    }
}

/// Whether every model `entry` matches, the tenant allows: an exact name
/// it allows, or a prefix inside one of its own prefixes.
fn covered_by(tenant: &Tenant, entry: &str) -> bool {
    match entry.strip_suffix('*') {
        None => tenant.model_entry(entry).is_some(),
        Some(prefix) => tenant
            .models
            .iter()
            .filter_map(|m| m.strip_suffix('*'))
            .any(|p| prefix.starts_with(p)),
    }
}

/// A TOML offset date-time as unix seconds.
fn unix_seconds(at: &toml::value::Datetime) -> Option<u64> {
    let (date, hms, offset) = (at.date?, at.time?, at.offset?);
    let month = time::Month::try_from(date.month).ok()?;
    let day = time::Date::from_calendar_date(i32::from(date.year), month, date.day).ok()?;
    let clock = time::Time::from_hms_nano(hms.hour, hms.minute, hms.second, hms.nanosecond).ok()?;
    let minutes = match offset {
        toml::value::Offset::Z => 0,
        toml::value::Offset::Custom { minutes } => minutes,
    };
    let offset = time::UtcOffset::from_whole_seconds(i32::from(minutes) * 60).ok()?;
    let t = time::PrimitiveDateTime::new(day, clock).assume_offset(offset);
    u64::try_from(t.unix_timestamp()).ok()
}

fn check_limits(src: &SourceFile, what: &str, rps: f64, burst: u32, errs: &mut Vec<Diagnostic>) {
    if !(rps.is_finite() && rps > 0.0) {
        errs.push(src.at(
            None,
            format!("{what}: requests_per_second must be a positive number"),
        ));
    }
    if burst == 0 {
        errs.push(src.at(None, format!("{what}: burst must be at least 1")));
    }
}

fn parse_features(
    src: &SourceFile,
    names: &[Spanned<String>],
    errs: &mut Vec<Diagnostic>,
) -> FeatureSet {
    let mut set = FeatureSet::default();
    for n in names {
        match Feature::parse(n.get_ref()) {
            Some(f) => set.insert(f),
            None => errs.push(src.at(
                Some(n.span()),
                format!(
                    "unknown feature {:?} (known: {})",
                    n.get_ref(),
                    Feature::ALL.map(Feature::name).join(" ")
                ),
            )),
        }
    }
    set
}

/// Org names travel in `x-tenant-org`, so they must be valid header text.
fn valid_header_text(s: &str) -> bool {
    (1..=128).contains(&s.len()) && s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str) -> Result<Tenants, Vec<Diagnostic>> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tenants.toml");
        std::fs::write(&p, text).unwrap();
        load(&p, None)
    }

    const PLAN: &str = r#"
[plans.free]
requests_per_second = 2
burst = 4
tokens_per_minute = 20_000
tokens_per_day = 200_000
max_concurrency = 2
max_body_bytes = 65_536
max_prompt_tokens = 4_096
max_output_tokens = 1_024
models = ["llama-3.1-8b-instruct"]
features = ["chat", "embeddings"]
"#;

    #[test]
    fn overrides_replace_only_what_they_name() {
        let t = load_str(&format!(
            "{PLAN}\n[[tenants]]\nid = \"acme\"\norg = \"acme-corp\"\nplan = \"free\"\n\
             [tenants.overrides]\ntokens_per_minute = 500_000\n"
        ))
        .unwrap();
        let acme = t.by_id("acme").unwrap();
        assert_eq!(acme.limits.tokens_per_minute, 500_000);
        assert_eq!(acme.limits.burst, 4);
        assert!(acme.features.contains(Feature::Chat));
        assert!(!acme.features.contains(Feature::Completions));
        assert!(
            acme.allows_region("anywhere"),
            "no regions allows every region"
        );
        assert_eq!(
            acme.limits_header,
            "rps=2;burst=4;tpm=500000;tpd=200000;conc=2;body=65536;prompt=4096;output=1024"
        );
    }

    const HASH: &str = "sha256:00000000000000000000000000000000000000000000000000000000000000aa";

    #[test]
    fn key_objects_narrow_the_tenant_and_carry_their_expiry() {
        let t = load_str(&format!(
            "{PLAN}\n[[tenants]]\nid = \"acme\"\norg = \"o\"\nplan = \"free\"\n\
             [[tenants.keys]]\nid = \"ci-bot\"\nhash = \"{HASH}\"\n\
             expires_at = 2027-06-30T02:00:00+02:00\nmodels = [\"llama-3.1-8b-instruct\"]\n"
        ))
        .unwrap();
        let digest = parse_key_hash(HASH).unwrap();
        let (tenant, key) = t.by_api_key_hash(&digest).unwrap();
        let key = key.unwrap();
        assert_eq!(
            (key.id.as_str(), key.expires_at),
            ("ci-bot", Some(1_814_313_600))
        );
        assert_eq!(tenant.id, "acme");
        assert!(
            Arc::ptr_eq(&tenant.limiter, &t.by_id("acme").unwrap().limiter),
            "the key shares its tenant's limit state"
        );
    }

    #[test]
    fn a_key_object_that_widens_or_is_malformed_names_its_line() {
        let bad = [
            ("models = [\"llama-3.1-70b\"]", "not in tenant"),
            ("models = [\"llama-*\"]", "not in tenant"),
            ("expires_at = 2027-06-30T00:00:00", "with an offset"),
            ("expires_at = 2027-06-30", "with an offset"),
            ("colour = \"red\"", "unknown field"),
        ];
        for (line, want) in bad {
            let text = format!(
                "{PLAN}\n[[tenants]]\nid = \"acme\"\norg = \"o\"\nplan = \"free\"\n\
                 [[tenants.keys]]\nid = \"k\"\nhash = \"{HASH}\"\n{line}\n"
            );
            let errs = load_str(&text).unwrap_err();
            assert!(
                errs.iter()
                    .any(|d| d.message.contains(want) && d.line.is_some()),
                "{line}: {errs:?}"
            );
        }
        let text = format!(
            "{PLAN}\n[[tenants]]\nid = \"acme\"\norg = \"o\"\nplan = \"free\"\napi_keys = [\"{HASH}\"]\n\
             [[tenants.keys]]\nid = \"Bad Id\"\nhash = \"{HASH}\"\n\
             [[tenants.keys]]\nid = \"k\"\nhash = \"{HASH}\"\n"
        );
        let errs = load_str(&text).unwrap_err();
        let messages: Vec<&str> = errs.iter().map(|d| d.message.as_str()).collect();
        assert!(
            messages
                .iter()
                .any(|m| m.contains("must be 1-64 characters of a-z")),
            "{messages:?}"
        );
        assert!(
            messages.iter().any(|m| m.contains("listed twice")),
            "{messages:?}"
        );
    }

    #[test]
    fn errors_name_their_line() {
        let text = format!(
            "{PLAN}\n[[tenants]]\nid = \"a\"\norg = \"o\"\nplan = \"gold\"\n\
             [[tenants]]\nid = \"b\"\norg = \"o\"\nplan = \"free\"\napi_keys = [\"abc\"]\n"
        );
        let errs = load_str(&text).unwrap_err();
        let lines: Vec<_> = errs.iter().map(|d| (d.line, d.message.clone())).collect();
        let gold_line = text.lines().position(|l| l.contains("gold")).unwrap() + 1;
        let key_line = text.lines().position(|l| l.contains("abc")).unwrap() + 1;
        assert!(lines
            .iter()
            .any(|(l, m)| *l == Some(gold_line) && m.contains("undefined plan")));
        assert!(lines
            .iter()
            .any(|(l, m)| *l == Some(key_line) && m.contains("sha256")));
    }

    #[test]
    fn unknown_keys_and_duplicates_are_errors() {
        let errs = load_str(&format!("{PLAN}\nburts = 3\n")).unwrap_err();
        assert!(errs[0].message.contains("burts"), "{errs:?}");
        let errs = load_str(&format!(
            "{PLAN}\n[[tenants]]\nid = \"a\"\norg = \"o\"\nplan = \"free\"\n\
             [[tenants]]\nid = \"a\"\norg = \"o\"\nplan = \"free\"\n"
        ))
        .unwrap_err();
        assert!(errs[0].message.contains("duplicate tenant id"), "{errs:?}");
        let errs = load_str(&PLAN.replace("\"embeddings\"", "\"embedings\"")).unwrap_err();
        assert!(errs[0].message.contains("unknown feature"), "{errs:?}");
    }

    #[test]
    fn a_reload_keeps_the_state_of_unchanged_tenants() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tenants.toml");
        let two = format!(
            "{PLAN}\n[[tenants]]\nid = \"a\"\norg = \"o\"\nplan = \"free\"\n\
             [[tenants]]\nid = \"b\"\norg = \"o\"\nplan = \"free\"\n"
        );
        std::fs::write(&p, &two).unwrap();
        let first = load(&p, None).unwrap();
        let changed = format!("{two}[tenants.overrides]\nburst = 9\n");
        std::fs::write(&p, changed).unwrap();
        let second = load(&p, Some(&first)).unwrap();
        let same = |id: &str| {
            Arc::ptr_eq(
                &first.by_id(id).unwrap().limiter,
                &second.by_id(id).unwrap().limiter,
            )
        };
        assert!(same("a"), "unchanged tenant lost its limiter state");
        assert!(!same("b"), "changed limits must start fresh");
    }

    #[test]
    fn key_hashes_must_be_well_formed() {
        assert!(parse_key_hash(&format!("sha256:{}", "ab".repeat(32))).is_some());
        assert!(parse_key_hash(&format!("sha256:{}", "ab".repeat(31))).is_none());
        assert!(parse_key_hash(&format!("sha256:{}", "zz".repeat(32))).is_none());
        assert!(parse_key_hash(&format!("md5:{}", "ab".repeat(32))).is_none());
    }

    const SCOPED: &str = r#"
[prices."llama-3.1-8b-instruct"]
input = 0.2
output = 0.4

[plans.free.model_limits."llama-*"]
tokens_per_minute = 1_000
max_concurrency = 3

[plans.free.model_limits."llama-3.1-8b-instruct"]
requests_per_second = 2.5

[[tenants]]
id = "acme"
org = "o"
plan = "free"
[tenants.overrides]
budget_per_month = 100.0
[tenants.overrides.model_limits."llama-*"]
tokens_per_minute = 4_000

[[tenants.keys]]
id = "ci"
hash = "sha256:abababababababababababababababababababababababababababababababab"
tokens_per_day = 50
budget_per_day = 1.5
"#;

    #[test]
    fn model_limits_merge_key_by_key_and_keys_get_scopes_of_their_own() {
        let t = load_str(&format!("{PLAN}{SCOPED}")).unwrap();
        let acme = t.by_id("acme").unwrap();
        let (pattern, llama) = acme.model_scopes.lookup("llama-3.2-1b").unwrap();
        assert_eq!(pattern, "llama-*");
        assert_eq!(
            llama.limits().tokens_per_minute,
            Some(4_000),
            "the override"
        );
        assert_eq!(
            llama.limits().max_concurrency,
            Some(3),
            "kept from the plan"
        );
        let (pattern, exact) = acme.model_scopes.lookup("llama-3.1-8b-instruct").unwrap();
        assert_eq!(
            pattern, "llama-3.1-8b-instruct",
            "an exact name beats a prefix"
        );
        assert_eq!(
            exact.limits().rate,
            Some((2.5, 3)),
            "burst defaults to the rate, rounded up"
        );
        assert!(acme.model_scopes.lookup("mistral").is_none());
        assert_eq!(acme.limiter.limits().budget_per_month, Some(100.0));
        assert_eq!(acme.key_scopes.len(), 1);
        let key = &acme.key_scopes[0];
        assert_eq!(key.name, ScopeName::key("ci"));
        assert_eq!(
            (key.limits().tokens_per_day, key.limits().budget_per_day),
            (Some(50), Some(1.5))
        );
        assert_eq!(
            key.limits().rate,
            None,
            "a key has only the limits it names"
        );
        let price = t.prices.lookup("llama-3.1-8b-instruct").unwrap().1;
        assert_eq!(
            (price.input, price.output, price.cached_input),
            (0.2, 0.4, None)
        );
    }

    #[test]
    fn a_reload_keeps_each_unchanged_scope_and_refreshes_changed_ones() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tenants.toml");
        std::fs::write(&p, format!("{PLAN}{SCOPED}")).unwrap();
        let first = load(&p, None).unwrap();
        std::fs::write(
            &p,
            format!("{PLAN}{SCOPED}").replace("tokens_per_day = 50", "tokens_per_day = 60"),
        )
        .unwrap();
        let second = load(&p, Some(&first)).unwrap();
        let (a, b) = (first.by_id("acme").unwrap(), second.by_id("acme").unwrap());
        assert!(Arc::ptr_eq(&a.limiter, &b.limiter));
        let model = |t: &Tenant| t.model_scopes.get("llama-*").unwrap().clone();
        assert!(Arc::ptr_eq(&model(a), &model(b)));
        assert!(
            !Arc::ptr_eq(&a.key_scopes[0], &b.key_scopes[0]),
            "the key's limits changed"
        );
    }

    #[test]
    fn bad_scopes_prices_and_budgets_are_refused_with_their_place() {
        let bad = [
            (
                "[plans.free.model_limits.\"m\"]\nbudget_per_day = 1.0\n",
                "unknown field",
            ),
            (
                "[plans.free.model_limits.\"m*x\"]\nburst = 2\n",
                "prefix ending in *",
            ),
            (
                "[plans.free.model_limits.\"m\"]\nburst = 2\n",
                "burst needs requests_per_second",
            ),
            ("[prices.\"m\"]\ninput = -1.0\noutput = 1.0\n", "at least 0"),
            ("[prices.\"m\"]\ninput = 1.0\n", "missing field"),
        ];
        for (text, want) in bad {
            let errs = load_str(&format!("{PLAN}{text}")).unwrap_err();
            assert!(
                errs.iter().any(|d| d.message.contains(want)),
                "{text}: {errs:?}"
            );
        }
        let errs = load_str(&format!("{PLAN}budget_per_day = nan\n")).unwrap_err();
        assert!(
            errs.iter().any(|d| d.message.contains("budget_per_day")),
            "{errs:?}"
        );
    }

    #[test]
    fn guardrails_come_from_the_plan_and_overrides_replace_key_by_key() {
        let t = load_str(&format!(
            "{PLAN}[plans.free.guardrails]\npii = \"mask\"\ndeny = [\"(?i)forbidden\"]\n\
             [[tenants]]\nid = \"a\"\norg = \"o\"\nplan = \"free\"\n\
             [[tenants]]\nid = \"b\"\norg = \"o\"\nplan = \"free\"\n\
             [[tenants]]\nid = \"c\"\norg = \"o\"\nplan = \"free\"\n\
             [tenants.overrides.guardrails]\npii_kinds = [\"email\"]\ndeny_action = \"log\"\n"
        ))
        .unwrap();
        let (a, b, c) = (
            t.by_id("a").unwrap(),
            t.by_id("b").unwrap(),
            t.by_id("c").unwrap(),
        );
        assert!(
            Arc::ptr_eq(&a.guardrails, &b.guardrails),
            "one compiled copy per plan"
        );
        let run = |tenant: &Tenant, text: &str| {
            let mut body = serde_json::json!({"messages": [{"role": "user", "content": text}]})
                .as_object()
                .cloned()
                .unwrap();
            let mut acted = crate::guardrails::Acted::default();
            let r = tenant
                .guardrails
                .apply(crate::route::Api::OpenAiChat, &mut body, &mut acted);
            r.map(|()| body["messages"][0]["content"].clone())
                .map_err(|r| r.code.as_str())
        };
        let text = "bob@example.com 4111111111111111";
        assert_eq!(run(a, text).unwrap(), "[EMAIL] [CREDIT_CARD]");
        // c keeps the plan's mode and rules, with its own kinds and action.
        assert_eq!(run(c, text).unwrap(), "[EMAIL] 4111111111111111");
        assert_eq!(run(a, "FORBIDDEN").unwrap_err(), "prompt_blocked");
        assert_eq!(run(c, "FORBIDDEN").unwrap(), "FORBIDDEN");

        let errs = load_str(&format!(
            "{PLAN}[plans.free.guardrails]\npii = \"reject\"\npii_kinds = []\n"
        ))
        .unwrap_err();
        assert!(
            errs.iter()
                .any(|d| d.message.contains("pii_kinds is empty")),
            "{errs:?}"
        );
    }
}
