//! An external authorizer with Envoy's HTTP `ext_authz` semantics: the
//! gateway sends the request's method and path (after the URL's path
//! prefix), the configured client headers and the tenant context, with no
//! body. A 2xx answer allows and may add the configured headers for the
//! router; any other answer denies with its status and body. Errors and
//! timeouts deny (`policy_error`) unless `failure_mode_allow` is set.
//!
//! Decisions are cached for `cache_ttl_ms`, keyed by tenant, route, model
//! and feature set; errors are never cached.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::tls::x509::X509;
use pingora::upstreams::peer::HttpPeer;
use quick_cache::sync::Cache;

use crate::forward;
use crate::forward::upstream::load_ca;
use crate::http_client;
use crate::observe::metrics::METRICS;
use crate::policy::{policy_error, PolicyHeaders, PolicyRequest};
use crate::reject::{Reject, RejectCode};

/// An Envoy-compatible HTTP external authorizer.
#[derive(Debug, Clone)]
pub struct ExtAuthzConfig {
    pub addr: SocketAddr,
    pub tls: bool,
    /// The URL's host: the `Host` header, and the name verified over TLS.
    pub host: String,
    /// The URL's path, prefixed to the request's path.
    pub path_prefix: String,
    pub ca: Option<PathBuf>,
    pub timeout: Duration,
    pub failure_mode_allow: bool,
    /// Client request headers passed to the authorizer (lower case).
    pub allowed_headers: Vec<String>,
    /// Authorizer response headers passed to the router on an allow.
    pub allowed_upstream_headers: Vec<String>,
    /// Zero disables the decision cache.
    pub cache_ttl: Duration,
    pub cache_entries: usize,
}

/// Headers the gateway owns: an authorizer may neither see the client's
/// (they are stripped first) nor set them for the router.
pub fn reserved_header(name: &str) -> bool {
    name == "host"
        || forward::is_hop_by_hop(name)
        || (forward::is_trusted_header(name) && !name.starts_with("x-tenant-policy-"))
}

/// The most of a denial's body the gateway relays.
const MAX_DENY_BODY: usize = 8 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    tenant: String,
    route: String,
    model: String,
    features: Vec<&'static str>,
}

/// What the authorizer said.
#[derive(Debug, Clone)]
enum Answer {
    Allow(PolicyHeaders),
    Deny {
        status: u16,
        content_type: Option<String>,
        body: Bytes,
    },
}

/// The authorizer client for one configuration snapshot.
pub struct ExtAuthz {
    cfg: ExtAuthzConfig,
    connector: Connector,
    ca: Option<Arc<Box<[X509]>>>,
    cache: Option<Cache<CacheKey, (Instant, Arc<Answer>)>>,
}

impl ExtAuthz {
    pub fn new(cfg: &ExtAuthzConfig) -> Result<Self, String> {
        Ok(ExtAuthz {
            cfg: cfg.clone(),
            connector: Connector::new(None),
            ca: cfg.ca.as_deref().map(load_ca).transpose()?,
            cache: (!cfg.cache_ttl.is_zero()).then(|| Cache::new(cfg.cache_entries)),
        })
    }

    /// Asks the authorizer (or the cache) about one request.
    pub async fn check(
        &self,
        req: &PolicyRequest<'_>,
        client: &HeaderMap,
        path_and_query: &str,
        request_id: &str,
    ) -> Result<PolicyHeaders, Reject> {
        let key = CacheKey {
            tenant: req.identity.tenant.id.clone(),
            route: req.route.label.clone(),
            model: req.model.to_string(),
            features: req.feature_names().collect(),
        };
        let cached = self.cache.as_ref().and_then(|c| {
            c.get(&key)
                .filter(|(expires, _)| *expires > Instant::now())
                .map(|(_, a)| a)
        });
        let answer = match cached {
            Some(a) => {
                METRICS
                    .ext_authz_calls
                    .with_label_values(&["cache_hit"])
                    .inc();
                a
            }
            None => {
                // Boxed: the HTTP exchange's state would otherwise sit inside
                // every request's future, cached or not.
                let call = Box::pin(self.call(req, client, path_and_query, request_id));
                match tokio::time::timeout(self.cfg.timeout, call).await {
                    Ok(Ok(answer)) => {
                        METRICS.ext_authz_calls.with_label_values(&["called"]).inc();
                        let answer = Arc::new(answer);
                        if let Some(c) = &self.cache {
                            c.insert(key, (Instant::now() + self.cfg.cache_ttl, answer.clone()));
                        }
                        answer
                    }
                    failed => {
                        let detail = match failed {
                            Ok(Err(e)) => e,
                            _ => format!("no answer within {:?}", self.cfg.timeout),
                        };
                        if self.cfg.failure_mode_allow {
                            METRICS
                                .ext_authz_calls
                                .with_label_values(&["failed_open"])
                                .inc();
                            tracing::warn!(
                                error = detail,
                                "external authorizer failed; allowing (failure_mode_allow)"
                            );
                            return Ok(PolicyHeaders::new());
                        }
                        METRICS
                            .ext_authz_calls
                            .with_label_values(&["failed_closed"])
                            .inc();
                        return Err(policy_error("ext_authz", &detail));
                    }
                }
            }
        };
        match &*answer {
            Answer::Allow(headers) => Ok(headers.clone()),
            Answer::Deny {
                status,
                content_type,
                body,
            } => {
                let r = Reject::new(
                    *status,
                    RejectCode::ExtAuthzDenied,
                    "denied by the external authorizer",
                );
                Err(if body.is_empty() {
                    r
                } else {
                    r.with_raw_body(content_type.clone(), body.clone())
                })
            }
        }
    }

    async fn call(
        &self,
        req: &PolicyRequest<'_>,
        client: &HeaderMap,
        path_and_query: &str,
        request_id: &str,
    ) -> Result<Answer, String> {
        let e = |e: Box<pingora::Error>| e.to_string();
        let path = format!("{}{path_and_query}", self.cfg.path_prefix);
        let mut head = RequestHeader::build(req.method, path.as_bytes(), None).map_err(e)?;
        head.insert_header("host", &self.cfg.host).map_err(e)?;
        head.insert_header("content-length", "0").map_err(e)?;
        for name in &self.cfg.allowed_headers {
            for value in client.get_all(name.as_str()) {
                head.append_header(name.clone(), value).map_err(e)?;
            }
        }
        let t = &req.identity.tenant;
        let features = req.feature_names().collect::<Vec<_>>().join(",");
        for (name, value) in [
            ("x-request-id", request_id),
            ("x-tenant-id", &t.id),
            ("x-tenant-org", &t.org),
            ("x-tenant-plan", &t.plan),
            ("x-tenant-model", req.model),
            ("x-tenant-features", &features),
            ("x-tenant-identity", req.identity.kind.as_str()),
        ] {
            head.insert_header(name, value).map_err(e)?;
        }

        let mut peer = HttpPeer::new(self.cfg.addr, self.cfg.tls, self.cfg.host.clone());
        peer.options.connection_timeout = Some(self.cfg.timeout);
        if self.cfg.tls {
            peer.options.verify_cert = true;
            peer.options.verify_hostname = true;
            peer.options.ca = self.ca.clone();
        }
        let (resp, body) = http_client::call(&self.connector, &peer, head, MAX_DENY_BODY)
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status.as_u16();
        match status {
            200..=299 => {
                let mut headers = PolicyHeaders::new();
                for name in &self.cfg.allowed_upstream_headers {
                    if let Some(v) = resp.headers.get(name.as_str()) {
                        let v = v
                            .to_str()
                            .map_err(|_| format!("the authorizer's {name} is not text"))?;
                        headers.push((name.clone(), v.to_string()));
                    }
                }
                Ok(Answer::Allow(headers))
            }
            300..=599 => Ok(Answer::Deny {
                status,
                content_type: resp
                    .headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string),
                body: body.freeze(),
            }),
            other => Err(format!("the authorizer answered status {other}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{Identity, IdentityKind};
    use crate::route::{Api, RouteSpec};
    use crate::tenant::{FeatureSet, Limits, Tenant};

    /// Every policed request's future holds this one and is moved whole,
    /// so the HTTP exchange's state (Pingora's connector, about 5 KiB)
    /// stays boxed out of it. The size is the compiler's, not a timing.
    #[test]
    fn a_check_keeps_the_http_exchange_out_of_the_requests_future() {
        let ext = ExtAuthz::new(&ExtAuthzConfig {
            addr: "127.0.0.1:9".parse().expect("address"),
            tls: false,
            host: "authz".into(),
            path_prefix: String::new(),
            ca: None,
            timeout: Duration::from_secs(1),
            failure_mode_allow: false,
            allowed_headers: Vec::new(),
            allowed_upstream_headers: Vec::new(),
            cache_ttl: Duration::ZERO,
            cache_entries: 0,
        })
        .expect("authorizer");
        let identity = Identity {
            kind: IdentityKind::ApiKey,
            subject: None,
            tenant: Arc::new(Tenant::new("t", "o", "p", Limits::each(1), None)),
            token: None,
            key_id: None,
            key_scope: None,
        };
        let route = RouteSpec {
            path: "/v1/chat/completions".into(),
            methods: vec![http::Method::POST],
            api: Api::Json,
            feature: None,
            schema: None,
            label: "chat".into(),
            max_body_bytes: None,
        };
        let req = PolicyRequest {
            identity: &identity,
            method: "POST",
            route: &route,
            model: "m",
            features: FeatureSet::default(),
            region: "eu",
            body_bytes: 0,
            prompt_tokens: 0,
        };
        let headers = HeaderMap::new();
        let check = ext.check(&req, &headers, "/v1/chat/completions", "req-1");
        let size = std::mem::size_of_val(&check);
        assert!(size <= 1024, "check: {size} bytes");
    }
}
