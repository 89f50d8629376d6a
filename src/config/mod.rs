//! Configuration: files in, one validated, immutable [`Snapshot`] out.
//!
//! The request path only ever sees a snapshot. It is loaded whole and
//! checked whole, so a broken file can never be half-applied; the proxy
//! holds it in an `ArcSwap` and each request keeps the one it started with.

pub mod diag;
pub mod gateway;
pub mod process;
pub mod reload;
pub mod routes;
pub mod tenants;

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::body::schema::Schemas;
use crate::forward::context::{read_key, ContextSigner};
use crate::identity::jwks::KeySet;
use crate::identity::jwks_fetch::JwksRefresh;
use crate::identity::jwt::JwksSource;
use crate::identity::jwt::JwtVerifier;
use crate::identity::Authenticator;
use crate::ids::ResponseIds;
use crate::policy::ext_authz::ExtAuthz;
use crate::policy::rego::RegoPolicy;
use crate::policy::Policies;
use crate::route::Routes;
use crate::tenant::Tenants;
use diag::{ConfigErrors, Diagnostic};
use gateway::GatewayConfig;

/// Everything a request needs, fixed for the request's lifetime.
pub struct Snapshot {
    pub gateway: Arc<GatewayConfig>,
    pub tenants: Tenants,
    pub auth: Authenticator,
    pub signer: ContextSigner,
    /// Binds the router's Responses ids to tenants (same key as `signer`).
    pub response_ids: ResponseIds,
    /// The routes served, and how each is read.
    pub routes: Routes,
    pub schemas: Schemas,
    /// The prepared Rego policy and the external authorizer client (with
    /// its decision cache), when configured.
    pub policies: Policies,
}

/// The live snapshot, swapped atomically on reload.
pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

impl Snapshot {
    /// Loads `gateway.toml` and every file it names, reporting all problems.
    pub fn load(gateway_path: &Path) -> Result<Snapshot, ConfigErrors> {
        Self::load_after(gateway_path, None)
    }

    /// Loads a snapshot to replace `previous`: tenants with unchanged limits
    /// keep their limiter state, and a JWKS URL keeps its key set and
    /// refresh task.
    pub fn load_after(
        gateway_path: &Path,
        previous: Option<&Snapshot>,
    ) -> Result<Snapshot, ConfigErrors> {
        let gateway = gateway::load(gateway_path).map_err(ConfigErrors)?;
        let mut errs = Vec::new();

        let tenants = tenants::load(&gateway.policy.tenants, previous.map(|p| &p.tenants))
            .unwrap_or_else(|e| {
                errs.extend(e);
                Tenants::default()
            });

        let keys = read_key(&gateway.context_key_file)
            .and_then(|key| {
                Ok((
                    ContextSigner::from_bytes(&key)?,
                    ResponseIds::from_key(&key)?,
                ))
            })
            .map_err(|m| Diagnostic {
                file: gateway.context_key_file.clone(),
                line: None,
                message: m,
            });

        let auth = match &gateway.jwt {
            None => Authenticator {
                jwt: None,
                jwks_refresh: None,
            },
            Some(jwt) => {
                let (keys, refresh) = match &jwt.jwks {
                    JwksSource::File(path) => {
                        let keys = std::fs::read(path)
                            .map_err(|e| format!("cannot read file: {e}"))
                            .and_then(|b| KeySet::from_json(&b, &jwt.algorithms))
                            .unwrap_or_else(|m| {
                                errs.push(Diagnostic {
                                    file: path.clone(),
                                    line: None,
                                    message: m,
                                });
                                KeySet::default()
                            });
                        (Arc::new(ArcSwap::from_pointee(keys)), None)
                    }
                    // The refresh task the process started at boot is the
                    // only one that runs: a reload keeps it (and its keys),
                    // and a changed URL is reported as restart needed.
                    JwksSource::Url(url) => {
                        match previous.and_then(|p| p.auth.jwks_refresh.as_ref()) {
                            Some(r) => (r.keys(), Some(r.clone())),
                            None => {
                                let keys = Arc::new(ArcSwap::from_pointee(KeySet::default()));
                                let refresh = JwksRefresh::new(
                                    url,
                                    keys.clone(),
                                    jwt.algorithms.clone(),
                                    jwt.jwks_refresh,
                                    jwt.jwks_unknown_kid_refresh,
                                )
                                .map_err(|m| errs.push(gateway_diag(&gateway, m)))
                                .ok()
                                .map(Arc::new);
                                (keys, refresh)
                            }
                        }
                    }
                };
                Authenticator {
                    jwt: Some(JwtVerifier::new(jwt, keys)),
                    jwks_refresh: refresh,
                }
            }
        };

        let routes = match &gateway.policy.routes {
            Some(p) => routes::load(p).unwrap_or_else(|e| {
                errs.extend(e);
                Routes::built_in()
            }),
            None => Routes::built_in(),
        };
        let schemas =
            Schemas::load(gateway.policy.schemas.as_deref(), &routes).map_err(|e| errs.extend(e));
        let rego = gateway.policy.rego.as_deref().and_then(|p| {
            RegoPolicy::load(p, gateway.policy.rego_timeout)
                .map_err(|e| errs.extend(e))
                .ok()
        });
        let ext_authz = gateway.policy.ext_authz.as_ref().and_then(|cfg| {
            ExtAuthz::new(cfg)
                .map_err(|m| errs.push(gateway_diag(&gateway, m)))
                .ok()
        });

        match (keys, schemas) {
            (Ok((signer, response_ids)), Ok(schemas)) if errs.is_empty() => Ok(Snapshot {
                tenants,
                auth,
                signer,
                response_ids,
                routes,
                schemas,
                policies: Policies {
                    rego,
                    ext_authz,
                    jwt_claims: gateway.policy.jwt_claims.clone(),
                },
                gateway: Arc::new(gateway),
            }),
            (Err(d), _) => {
                errs.push(d);
                Err(ConfigErrors(errs))
            }
            _ => Err(ConfigErrors(errs)),
        }
    }
}

fn gateway_diag(g: &GatewayConfig, message: String) -> Diagnostic {
    Diagnostic::in_file(&g.path, message)
}
