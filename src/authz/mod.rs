//! Header-level authorisation: which route a request is for, and whether the
//! authenticated tenant may use it from this gateway's region.
//!
//! Order matters and is part of the contract: suspension first (a suspended
//! tenant learns nothing else), then 404/405 for the path, then region, then
//! the plan feature the route needs.

use http::Method;

use crate::reject::{Reject, RejectCode};
use crate::route::{Route, RouteSpec, Routes};
use crate::tenant::Tenant;

/// Decides whether `tenant` may call `method path` through a gateway in `region`.
pub fn admit(
    tenant: &Tenant,
    routes: &Routes,
    method: &Method,
    path: &str,
    region: &str,
) -> Result<Route, Reject> {
    if tenant.suspended {
        return Err(Reject::forbidden(
            RejectCode::TenantSuspended,
            "this tenant is suspended",
        ));
    }
    let route = routes
        .lookup(path)
        .ok_or_else(|| Reject::new(404, RejectCode::RouteNotFound, "no such route"))?;
    if !route.allows(method) {
        return Err(Reject::new(
            405,
            RejectCode::MethodNotAllowed,
            format!("{} requires {}", route.path, route.allow_header()),
        )
        .with_header(http::header::ALLOW, route.allow_header()));
    }
    if !tenant.allows_region(region) {
        return Err(Reject::forbidden(
            RejectCode::RegionNotAllowed,
            "this tenant may not use this region",
        ));
    }
    if let Some(f) = route.feature {
        if !tenant.features.contains(f) {
            return Err(Reject::forbidden(
                RejectCode::RouteNotAllowed,
                format!("the plan does not include {}", f.name()),
            ));
        }
    }
    Ok(route.clone())
}

/// The gateway's own answer on an `openai.models` route: the list, or on a
/// route ending `/{id}`, the one model named, which must be one the tenant
/// may use (an allowlist wildcard counts), else 404 `model_not_found`.
pub fn models_answer(tenant: &Tenant, route: &RouteSpec, path: &str) -> Result<Vec<u8>, Reject> {
    if !route.path.ends_with("/{id}") {
        return Ok(models_body(tenant));
    }
    let id = path.rsplit('/').next().unwrap_or_default();
    if tenant.model_entry(id).is_none() {
        let mut r = Reject::new(
            404,
            RejectCode::ModelNotFound,
            format!("the model {id} does not exist or is not available to this tenant"),
        );
        r.param = Some("model".into());
        return Err(r);
    }
    serde_json::to_vec(&model_object(id)).map_err(|_| {
        Reject::new(
            500,
            RejectCode::InternalError,
            "could not serialise the model",
        )
    })
}

/// OpenAI's model object.
fn model_object(id: &str) -> serde_json::Value {
    serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": "portcullis"})
}

/// The OpenAI list body for `GET /v1/models`: the tenant's literal model
/// names (wildcard patterns are policy, not models, and are not listed).
fn models_body(tenant: &Tenant) -> Vec<u8> {
    let data: Vec<_> = tenant
        .models
        .iter()
        .filter(|m| !m.contains('*'))
        .map(|m| model_object(m))
        .collect();
    serde_json::to_vec(&serde_json::json!({"object": "list", "data": data})).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenant::{Feature, FeatureSet, Limits};

    fn tenant(features: &[Feature], regions: Option<Vec<String>>, suspended: bool) -> Tenant {
        let mut set = FeatureSet::default();
        features.iter().for_each(|f| set.insert(*f));
        Tenant {
            suspended,
            models: vec!["m-1".into(), "m-*".into()],
            features: set,
            regions,
            ..Tenant::new("t", "o", "p", Limits::each(1), None)
        }
    }

    fn code(r: Result<Route, Reject>) -> (u16, &'static str) {
        let r = r.unwrap_err();
        (r.status, r.code.as_str())
    }

    #[test]
    fn checks_run_in_contract_order() {
        let routes = Routes::built_in();
        let admit =
            |t: &Tenant, m: &Method, path: &str, region: &str| admit(t, &routes, m, path, region);
        let t = tenant(&[Feature::Chat], Some(vec!["eu".into()]), false);
        assert_eq!(
            admit(&t, &Method::POST, "/v1/chat/completions", "eu")
                .unwrap()
                .label,
            "chat_completions"
        );
        assert_eq!(
            code(admit(&t, &Method::POST, "/v2/x", "eu")),
            (404, "route_not_found")
        );
        assert_eq!(
            code(admit(&t, &Method::GET, "/v1/chat/completions", "eu")),
            (405, "method_not_allowed")
        );
        assert_eq!(
            code(admit(&t, &Method::POST, "/v1/chat/completions", "us")),
            (403, "region_not_allowed")
        );
        assert_eq!(
            code(admit(&t, &Method::POST, "/v1/embeddings", "eu")),
            (403, "route_not_allowed")
        );
        assert_eq!(
            admit(&t, &Method::GET, "/v1/models", "eu").unwrap().label,
            "models"
        );
        let s = tenant(&[Feature::Chat], None, true);
        assert_eq!(
            code(admit(&s, &Method::POST, "/nope", "eu")),
            (403, "tenant_suspended")
        );
    }

    #[test]
    fn model_list_skips_wildcards() {
        let t = tenant(&[], None, false);
        let v: serde_json::Value = serde_json::from_slice(&models_body(&t)).unwrap();
        assert_eq!(v["object"], "list");
        assert_eq!(v["data"].as_array().unwrap().len(), 1);
        assert_eq!(v["data"][0]["id"], "m-1");
    }

    #[test]
    fn one_model_is_answered_when_the_tenant_may_use_it() {
        let t = tenant(&[], None, false);
        let routes = Routes::built_in();
        let one = routes.lookup("/v1/models/m-1").unwrap();
        assert_eq!(one.label, "model");
        let v: serde_json::Value =
            serde_json::from_slice(&models_answer(&t, one, "/v1/models/m-1").unwrap()).unwrap();
        assert_eq!(
            (v["id"].as_str(), v["object"].as_str()),
            (Some("m-1"), Some("model"))
        );
        // A wildcard entry allows the model without listing it.
        assert!(models_answer(&t, one, "/v1/models/m-anything").is_ok());
        let r = models_answer(&t, one, "/v1/models/other").unwrap_err();
        assert_eq!((r.status, r.code.as_str()), (404, "model_not_found"));
        let list = routes.lookup("/v1/models").unwrap();
        assert!(models_answer(&t, list, "/v1/models").is_ok());
    }
}
