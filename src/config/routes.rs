//! The routes file (`[policy] routes`): the route table as data, checked
//! like the other policy files (an unknown key, `api`, feature or method,
//! or a path that is not canonical, is `file:line: message`, and a bad
//! file changes nothing). Without it the built-in table applies, which is
//! the shipped `policies/routes.toml`.

use std::collections::HashSet;
use std::path::Path;

use http::Method;
use serde::Deserialize;
use toml::Spanned;

use super::diag::{Diagnostic, SourceFile};
use crate::route::{Api, RouteSpec, Routes};
use crate::tenant::Feature;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    routes: Vec<RawRoute>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    path: Spanned<String>,
    methods: Spanned<Vec<String>>,
    api: Spanned<String>,
    feature: Option<Spanned<String>>,
    /// Relative to the routes file.
    schema: Option<String>,
    label: Option<Spanned<String>>,
    max_body_bytes: Option<u64>,
}

/// Parses and checks a routes file, reporting every problem found.
pub fn load(path: &Path) -> Result<Routes, Vec<Diagnostic>> {
    let src = SourceFile::read(path).map_err(|d| vec![d])?;
    let raw: RawFile = src.parse_toml().map_err(|d| vec![d])?;
    let mut errs = Vec::new();
    let mut seen_paths = HashSet::new();
    let mut seen_labels = HashSet::new();
    let mut specs = Vec::new();
    if raw.routes.is_empty() {
        errs.push(src.at(None, "the routes file defines no [[routes]]"));
    }
    for r in raw.routes {
        let at = |span: std::ops::Range<usize>, m: String| src.at(Some(span), m);
        let route_path = r.path.get_ref().clone();
        if !valid_pattern(&route_path) {
            errs.push(at(
                r.path.span(),
                format!(
                    "path {route_path:?} must be canonical: `/` and segments of [a-z0-9._~-] or {{name}}"
                ),
            ));
        }
        if !seen_paths.insert(route_path.clone()) {
            errs.push(at(
                r.path.span(),
                format!("path {route_path:?} is defined twice"),
            ));
        }
        let api = Api::from_name(r.api.get_ref());
        if api.is_none() {
            errs.push(at(
                r.api.span(),
                format!("unknown api {:?}", r.api.get_ref()),
            ));
        }
        let mut methods = Vec::new();
        for m in r.methods.get_ref() {
            match m.parse::<Method>() {
                Ok(method) if matches!(m.as_str(), "GET" | "POST" | "PUT" | "PATCH" | "DELETE") => {
                    methods.push(method)
                }
                _ => errs.push(at(
                    r.methods.span(),
                    format!("method {m:?} must be one of GET, POST, PUT, PATCH, DELETE"),
                )),
            }
        }
        if r.methods.get_ref().is_empty() {
            errs.push(at(
                r.methods.span(),
                "a route needs at least one method".into(),
            ));
        }
        let feature = r.feature.as_ref().and_then(|f| {
            let parsed = Feature::parse(f.get_ref());
            if parsed.is_none() {
                errs.push(at(f.span(), format!("unknown feature {:?}", f.get_ref())));
            }
            parsed
        });
        let label = match &r.label {
            Some(l) if !valid_label(l.get_ref()) => {
                errs.push(at(
                    l.span(),
                    format!(
                        "label {:?} must be 1-64 characters of a-z 0-9 _",
                        l.get_ref()
                    ),
                ));
                l.get_ref().clone()
            }
            Some(l) => l.get_ref().clone(),
            None => default_label(&route_path),
        };
        if !seen_labels.insert(label.clone()) {
            errs.push(at(r.path.span(), format!("label {label:?} is used twice")));
        }
        // Absolute, so the schema stage reads it as a path of its own
        // rather than a name in `[policy] schemas`.
        let schema = r.schema.as_deref().map(|s| {
            let p = src.resolve(s);
            std::path::absolute(&p).unwrap_or(p).display().to_string()
        });
        if let Some(api) = api {
            specs.push(RouteSpec {
                path: route_path,
                methods,
                api,
                feature,
                schema,
                label,
                max_body_bytes: r.max_body_bytes,
            });
        }
    }
    if errs.is_empty() {
        Ok(Routes::new(specs))
    } else {
        Err(errs)
    }
}

/// `/`-separated segments, each canonical (as `inbound::canonical_path`
/// requires of request paths) or a `{name}` placeholder.
fn valid_pattern(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    !rest.is_empty()
        && rest.split('/').all(|seg| {
            let placeholder = seg
                .strip_prefix('{')
                .and_then(|s| s.strip_suffix('}'))
                .is_some_and(|name| {
                    !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                });
            placeholder || crate::inbound::canonical_path(&format!("/{seg}"))
        })
}

fn valid_label(label: &str) -> bool {
    (1..=64).contains(&label.len())
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// `/v1/chat/completions` -> `chat_completions`, `/v1/things/{id}` ->
/// `things_id`: the path's segments after the version, joined.
fn default_label(path: &str) -> String {
    let label: Vec<String> = path
        .split('/')
        .filter(|s| !s.is_empty())
        .skip_while(|s| {
            s.len() <= 3 && s.starts_with('v') && s[1..].bytes().all(|b| b.is_ascii_digit())
        })
        .map(|s| {
            s.trim_matches(|c| c == '{' || c == '}')
                .replace(['-', '.', '~'], "_")
        })
        .collect();
    label.join("_")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str) -> Result<Routes, Vec<Diagnostic>> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("routes.toml");
        std::fs::write(&p, text).unwrap();
        load(&p)
    }

    #[test]
    fn the_shipped_routes_file_is_the_built_in_table() {
        let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/routes.toml");
        let from_file = load(&shipped).unwrap_or_else(|e| panic!("{e:?}"));
        let built_in = Routes::built_in();
        let file_name = |s: &Option<String>| {
            s.as_deref()
                .and_then(|s| Path::new(s).file_name())
                .map(|f| f.to_string_lossy().to_string())
        };
        let a: Vec<_> = from_file.iter().collect();
        let b: Vec<_> = built_in.iter().collect();
        assert_eq!(
            a.len(),
            b.len(),
            "the shipped file and the built-in table differ in size"
        );
        for (f, b) in a.iter().zip(b) {
            assert_eq!(
                (
                    &f.path,
                    &f.methods,
                    f.api,
                    f.feature,
                    &f.label,
                    f.max_body_bytes
                ),
                (
                    &b.path,
                    &b.methods,
                    b.api,
                    b.feature,
                    &b.label,
                    b.max_body_bytes
                )
            );
            assert_eq!(file_name(&f.schema), file_name(&b.schema), "{}", f.path);
        }
    }

    #[test]
    fn a_route_names_its_schema_relative_to_the_file_and_gets_a_default_label() {
        let routes = load_str(
            "[[routes]]\npath = \"/v1/chat/alt\"\nmethods = [\"POST\"]\napi = \"openai.chat\"\n\
             feature = \"chat\"\nschema = \"schemas/chat.json\"\nmax_body_bytes = 1024\n",
        )
        .unwrap();
        let r = routes.lookup("/v1/chat/alt").unwrap();
        assert_eq!(r.label, "chat_alt");
        assert_eq!(r.max_body_bytes, Some(1024));
        assert!(r.schema.as_deref().unwrap().ends_with("schemas/chat.json"));
        assert_eq!(default_label("/v1/things/{id}/cancel"), "things_id_cancel");
    }

    #[test]
    fn every_mistake_is_reported_with_its_line() {
        let errs = load_str(
            "[[routes]]\npath = \"/v1/Bad\"\nmethods = [\"GET\"]\napi = \"openai.chat\"\n\
             [[routes]]\npath = \"/v1/x\"\nmethods = [\"BREW\"]\napi = \"nope\"\nfeature = \"magic\"\n",
        )
        .unwrap_err();
        let text: Vec<String> = errs.iter().map(|d| d.to_string()).collect();
        for want in [
            "routes.toml:2: path \"/v1/Bad\" must be canonical",
            "routes.toml:7: method \"BREW\"",
            "routes.toml:8: unknown api \"nope\"",
            "routes.toml:9: unknown feature \"magic\"",
        ] {
            assert!(
                text.iter().any(|t| t.contains(want)),
                "{want} not in {text:?}"
            );
        }
        let errs = load_str("[[routes]]\npath = \"/v1/x\"\nmethods = [\"GET\"]\napi = \"openai.models\"\nextra = 1\n")
            .unwrap_err();
        assert!(errs[0].to_string().contains("routes.toml:5"), "{errs:?}");
        let errs = load_str(
            "[[routes]]\npath = \"/v1/x\"\nmethods = [\"GET\"]\napi = \"openai.models\"\n\
             [[routes]]\npath = \"/v1/x\"\nmethods = [\"GET\"]\napi = \"openai.models\"\n",
        )
        .unwrap_err();
        assert!(
            errs.iter().any(|d| d.to_string().contains("defined twice")),
            "{errs:?}"
        );
    }
}
