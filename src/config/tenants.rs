//! `tenants.toml`: plans and tenants, resolved into each tenant's effective
//! limits (plan plus overrides) once per load, so the request path only
//! reads precomputed values.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use super::diag::{Diagnostic, SourceFile};
use crate::identity::api_key::parse_key_hash;
use crate::tenant::{Feature, FeatureSet, Limits, Tenant, Tenants};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    plans: BTreeMap<String, RawPlan>,
    #[serde(default)]
    tenants: Vec<RawTenant>,
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
}

/// Parses and validates `tenants.toml`, collecting every problem found.
/// Tenants whose limits are unchanged from `previous` keep their limiter.
pub fn load(path: &Path, previous: Option<&Tenants>) -> Result<Tenants, Vec<Diagnostic>> {
    let src = SourceFile::read(path).map_err(|d| vec![d])?;
    let raw: RawFile = src.parse_toml().map_err(|d| vec![d])?;
    let mut errs = Vec::new();

    // Plans are checked whether or not a tenant uses them.
    let mut plan_features = HashMap::new();
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
        let models = o.models.as_ref().unwrap_or(&plan.models);
        let features = match &o.features {
            Some(list) => parse_features(&src, list, &mut errs),
            None => plan_features
                .get(t.plan.get_ref().as_str())
                .copied()
                .unwrap_or_default(),
        };

        let index = out.list.len();
        for key in &t.api_keys {
            match parse_key_hash(key.get_ref()) {
                Some(digest) => {
                    if out.by_api_key.insert(digest, index).is_some() {
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

        let tenant = Tenant {
            suspended: t.suspended,
            models: models.iter().map(|m| m.get_ref().clone()).collect(),
            features,
            regions: o.regions.clone().or_else(|| plan.regions.clone()),
            forbidden_fields: o
                .forbidden_fields
                .clone()
                .unwrap_or_else(|| plan.forbidden_fields.clone()),
            jwt_subjects: t.jwt_subjects,
            mtls_identities: t
                .mtls_identities
                .into_iter()
                .map(Spanned::into_inner)
                .collect(),
            ..Tenant::new(
                &id,
                &t.org,
                t.plan.get_ref(),
                limits,
                previous.and_then(|p| p.by_id(&id)).map(|t| &**t),
            )
        };
        out.by_id.insert(id, index);
        out.list.push(Arc::new(tenant));
    }

    out.by_mtls = by_mtls;
    if errs.is_empty() {
        Ok(out)
    } else {
        Err(errs)
    }
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
}
