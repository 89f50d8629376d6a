//! Tenants as the request path sees them: who a tenant is, its effective
//! limits (plan plus overrides), what its plan enables, and the table that
//! finds it by credential. `config::tenants` builds these from
//! `tenants.toml`; every stage reads them.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};

use crate::guardrails::Guardrails;
use crate::limits::spend::Price;
use crate::limits::{ScopeLimiter, ScopeLimits, ScopeName};

/// What a plan may enable. Routes need one (`chat`, `completions`,
/// `embeddings`, `responses`, `messages`, `moderations`, `rerank`,
/// `audio`); the rest are body features checked by the body stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Feature {
    Chat = 1 << 0,
    Completions = 1 << 1,
    Embeddings = 1 << 2,
    Stream = 1 << 3,
    Tools = 1 << 4,
    JsonMode = 1 << 5,
    Logprobs = 1 << 6,
    Vision = 1 << 7,
    MultiChoice = 1 << 8,
    Responses = 1 << 9,
    Messages = 1 << 10,
    Moderations = 1 << 11,
    Rerank = 1 << 12,
    Audio = 1 << 13,
}

impl Feature {
    pub const ALL: [Feature; 14] = [
        Feature::Chat,
        Feature::Completions,
        Feature::Embeddings,
        Feature::Stream,
        Feature::Tools,
        Feature::JsonMode,
        Feature::Logprobs,
        Feature::Vision,
        Feature::MultiChoice,
        Feature::Responses,
        Feature::Messages,
        Feature::Moderations,
        Feature::Rerank,
        Feature::Audio,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Feature::Chat => "chat",
            Feature::Completions => "completions",
            Feature::Embeddings => "embeddings",
            Feature::Stream => "stream",
            Feature::Tools => "tools",
            Feature::JsonMode => "json_mode",
            Feature::Logprobs => "logprobs",
            Feature::Vision => "vision",
            Feature::MultiChoice => "multi_choice",
            Feature::Responses => "responses",
            Feature::Messages => "messages",
            Feature::Moderations => "moderations",
            Feature::Rerank => "rerank",
            Feature::Audio => "audio",
        }
    }

    pub(crate) fn parse(name: &str) -> Option<Feature> {
        Feature::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// A set of features as a bit mask: membership tests cost one AND.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FeatureSet(u16);

impl FeatureSet {
    pub fn contains(self, f: Feature) -> bool {
        self.0 & f as u16 != 0
    }
    pub fn insert(&mut self, f: Feature) {
        self.0 |= f as u16;
    }
}

/// A tenant's effective numeric limits.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub requests_per_second: f64,
    pub burst: u32,
    pub tokens_per_minute: u64,
    pub tokens_per_day: u64,
    pub max_concurrency: u32,
    pub max_body_bytes: u64,
    pub max_prompt_tokens: u64,
    pub max_output_tokens: u64,
}

impl Limits {
    /// Every limit `n` (the rate `n` per second): a fixture for tests that
    /// need a tenant but not its numbers.
    #[cfg(test)]
    pub fn each(n: u32) -> Limits {
        Limits {
            requests_per_second: f64::from(n),
            burst: n,
            tokens_per_minute: n.into(),
            tokens_per_day: n.into(),
            max_concurrency: n,
            max_body_bytes: n.into(),
            max_prompt_tokens: n.into(),
            max_output_tokens: n.into(),
        }
    }

    /// The `x-tenant-limits` encoding: `key=value` pairs joined by `;`, in
    /// this fixed order, numbers in decimal (`rps` may carry a fraction).
    pub fn header_value(&self) -> String {
        let mut s = String::with_capacity(96);
        // Writing to a String cannot fail.
        let _ = write!(
            s,
            "rps={};burst={};tpm={};tpd={};conc={};body={};prompt={};output={}",
            self.requests_per_second,
            self.burst,
            self.tokens_per_minute,
            self.tokens_per_day,
            self.max_concurrency,
            self.max_body_bytes,
            self.max_prompt_tokens,
            self.max_output_tokens
        );
        s
    }
}

/// One configured tenant, with everything the request path needs precomputed.
#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: String,
    pub org: String,
    pub plan: String,
    pub suspended: bool,
    pub limits: Limits,
    /// Allowed model names; an entry ending in `*` matches by prefix.
    pub models: Vec<String>,
    pub features: FeatureSet,
    /// `None` allows every region.
    pub regions: Option<Vec<String>>,
    /// Top-level body fields this tenant may not send.
    pub forbidden_fields: Vec<String>,
    /// What the body stage masks or refuses in the prompt; shared by
    /// every tenant with the same rules.
    pub guardrails: Arc<Guardrails>,
    /// When not empty, a JWT for this tenant must carry one of these `sub` values.
    pub jwt_subjects: Vec<String>,
    pub mtls_identities: Vec<String>,
    /// Precomputed `x-tenant-limits` value.
    pub limits_header: String,
    /// The tenant scope's live limit state; carried across reloads while
    /// its limits do not change.
    pub limiter: Arc<ScopeLimiter>,
    /// The per-model scopes (`model_limits`), most specific first.
    pub model_scopes: ModelPatterns<Arc<ScopeLimiter>>,
    /// The scopes of the tenant's key objects that have limits of their
    /// own, for the state file and the next reload.
    pub key_scopes: Vec<Arc<ScopeLimiter>>,
    /// The tenant's `tenant` metric label, chosen on first use.
    pub series: OnceLock<Arc<str>>,
}

impl Tenant {
    /// A tenant with `limits` and nothing else allowed yet (no models,
    /// features, bindings). The derived fields are computed here, in one
    /// place: the `x-tenant-limits` value, and the limiter, which is
    /// `previous`'s when its limits are the same, so a reload keeps the
    /// tenant's limit state.
    pub fn new(
        id: &str,
        org: &str,
        plan: &str,
        limits: Limits,
        previous: Option<&Tenant>,
    ) -> Tenant {
        let limiter = ScopeLimiter::carry(
            previous.map(|t| &t.limiter),
            ScopeName::tenant(id),
            &ScopeLimits::tenant(&limits),
        );
        Tenant {
            id: id.into(),
            org: org.into(),
            plan: plan.into(),
            suspended: false,
            limits_header: limits.header_value(),
            limits,
            models: Vec::new(),
            features: FeatureSet::default(),
            regions: None,
            forbidden_fields: Vec::new(),
            guardrails: Arc::default(),
            jwt_subjects: Vec::new(),
            mtls_identities: Vec::new(),
            limiter,
            model_scopes: ModelPatterns::default(),
            key_scopes: Vec::new(),
            series: OnceLock::new(),
        }
    }

    /// What the tenant is called in metrics (`[observe] tenant_label`).
    pub fn metric_label(&self) -> &str {
        self.series
            .get_or_init(|| crate::observe::metrics::tenant_series(&self.id, &self.plan))
    }

    /// The allowlist entry `model` matches: an exact name, or a prefix
    /// for entries ending in `*`.
    pub fn model_entry(&self, model: &str) -> Option<&str> {
        self.models
            .iter()
            .find(|m| pattern_matches(m, model))
            .map(String::as_str)
    }

    pub fn allows_region(&self, region: &str) -> bool {
        self.regions
            .as_ref()
            .is_none_or(|r| r.iter().any(|x| x == region))
    }
}

/// Whether a model pattern (an exact name, or a prefix ending in `*`)
/// matches `model`.
pub fn pattern_matches(pattern: &str, model: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => model.starts_with(prefix),
        None => pattern == model,
    }
}

/// Values keyed by model pattern, most specific first: exact names, then
/// prefixes, longest first. The first match is the most specific.
#[derive(Debug, Clone)]
pub struct ModelPatterns<T> {
    entries: Vec<(String, T)>,
}

impl<T> Default for ModelPatterns<T> {
    fn default() -> Self {
        ModelPatterns {
            entries: Vec::new(),
        }
    }
}

impl<T> ModelPatterns<T> {
    pub fn new(mut entries: Vec<(String, T)>) -> Self {
        entries.sort_by_key(|(p, _)| match p.strip_suffix('*') {
            None => (0, 0),
            Some(prefix) => (1, usize::MAX - prefix.len()),
        });
        ModelPatterns { entries }
    }

    /// The most specific entry `model` matches, with its pattern.
    pub fn lookup(&self, model: &str) -> Option<(&str, &T)> {
        self.entries
            .iter()
            .find(|(p, _)| pattern_matches(p, model))
            .map(|(p, v)| (p.as_str(), v))
    }

    pub fn get(&self, pattern: &str) -> Option<&T> {
        self.entries
            .iter()
            .find(|(p, _)| p == pattern)
            .map(|(_, v)| v)
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.entries.iter().map(|(_, v)| v)
    }
}

/// An API key given as an object (`[[tenants.keys]]`): a name the router
/// and the log see, an expiry, a switch, and an allowlist of its own.
#[derive(Debug)]
pub struct KeyObject {
    /// `[a-z0-9_-]{1,64}`, unique within the tenant.
    pub id: String,
    /// Unix seconds from which the key is refused.
    pub expires_at: Option<u64>,
    pub disabled: bool,
    /// The tenant as this key sees it: the same limit state (one shared
    /// limiter), with `models` narrowed to the key's.
    pub tenant: Arc<Tenant>,
    /// The key's own limits and budgets, nested inside the tenant's.
    pub limiter: Option<Arc<ScopeLimiter>>,
}

impl KeyObject {
    /// A key id: 1-64 characters of `a-z 0-9 _ -`, as the router and the
    /// access log see it.
    pub fn valid_id(id: &str) -> bool {
        (1..=64).contains(&id.len())
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'))
    }
}

/// What an API key's hash finds.
#[derive(Debug, Clone)]
pub enum KeyEntry {
    /// A hash in the tenant's `api_keys` list.
    Listed(usize),
    Object(Arc<KeyObject>),
}

/// The tenant table with O(1) indexes for each kind of credential.
#[derive(Debug, Default)]
pub struct Tenants {
    pub list: Vec<Arc<Tenant>>,
    pub(crate) by_id: HashMap<String, usize>,
    pub(crate) by_api_key: HashMap<[u8; 32], KeyEntry>,
    pub(crate) by_mtls: HashMap<String, usize>,
    /// `[prices]`: what a model's tokens cost, per million.
    pub prices: ModelPatterns<Price>,
}

impl Tenants {
    /// A table of `list`, found by id (tests and fuzzing; the loader
    /// builds the full indexes).
    pub fn with(list: Vec<Arc<Tenant>>) -> Tenants {
        let by_id = list
            .iter()
            .enumerate()
            .map(|(i, t)| (t.id.clone(), i))
            .collect();
        Tenants {
            list,
            by_id,
            ..Tenants::default()
        }
    }

    pub fn by_id(&self, id: &str) -> Option<&Arc<Tenant>> {
        self.by_id.get(id).map(|&i| &self.list[i])
    }

    /// Looks a tenant up by a name from a verified client certificate.
    pub fn by_mtls_identity(&self, name: &str) -> Option<&Arc<Tenant>> {
        self.by_mtls.get(name).map(|&i| &self.list[i])
    }

    /// Looks a key up by the SHA-256 digest of a presented API key: its
    /// tenant, and the key object when it is one.
    pub fn by_api_key_hash(
        &self,
        digest: &[u8; 32],
    ) -> Option<(&Arc<Tenant>, Option<&Arc<KeyObject>>)> {
        match self.by_api_key.get(digest)? {
            KeyEntry::Listed(i) => self.list.get(*i).map(|t| (t, None)),
            KeyEntry::Object(key) => Some((&key.tenant, Some(key))),
        }
    }
}
