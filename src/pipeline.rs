//! The request path, stage by stage, in the order of README's "The path of
//! a request" table. Each stage returns `Result<_, Reject>`; the first
//! refusal ends the request, and everything here runs before an upstream
//! connection exists, so a refused request never reaches the router.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use pingora::proxy::Session;

use crate::authz;
use crate::body::{self, intake, multipart, response_not_found, Gate, Judged};
use crate::config::Snapshot;
use crate::forward::{self, RouterHead, TrustedContext};
use crate::guardrails::Acted;
use crate::identity;
use crate::identity::mtls::CertIdentity;
use crate::ids::Binding;
use crate::inbound;
use crate::limits::guard::BodyLease;
use crate::limits::{quota, spend, Reserve, ScopeLimiter};
use crate::observe::telemetry::RequestTrace;
use crate::policy::PolicyRequest;
use crate::proxy::{Gateway, RequestCtx};
use crate::reject::{Reject, RejectCode};
use crate::route::{Api, Route, RouteSpec};
use crate::tenant::{Feature, Tenant};

/// What a request that passed every stage gets.
pub enum Outcome {
    /// Sent to the router: the judged body, under the head
    /// [`router_head`] writes.
    Forward(Bytes),
    /// Answered by the gateway itself with this JSON body.
    Respond(Vec<u8>),
}

/// Runs every stage for one request.
pub async fn run(
    gw: &Gateway,
    session: &mut Session,
    ctx: &mut RequestCtx,
) -> Result<Outcome, Reject> {
    // The gateway-wide cap is the cheapest check and guards all the others.
    ctx.admission = Some(gw.overload.admit()?);
    head_sanity(session, ctx)?;
    identify(gw, session, ctx)?;
    let (Some(who), Some(route)) = (&ctx.identity, &ctx.route) else {
        return Err(internal("no identity or route after the header stages"));
    };
    let (tenant, route) = (who.tenant.clone(), route.clone());
    let scopes = who
        .key_scope
        .iter()
        .chain([&tenant.limiter])
        .cloned()
        .collect();
    // A request the gateway answers ends at once: it holds no slot.
    let slot = !route.api.answered_by_gateway();
    let read = if route.api == Api::Quota {
        quota_scopes(&tenant, who.key_scope.as_ref())
    } else {
        Vec::new()
    };
    let t = stage_start(&ctx.trace);
    let held = gw
        .limiter
        .admit(&tenant, scopes, &ctx.request_id, slot, &read)
        .await;
    stage_end(&ctx.trace, "limits", t, &held);
    let held = ctx.limits.insert(held?);
    match route.api {
        Api::Quota => {
            let key_id = who.key_id.as_deref();
            return Ok(Outcome::Respond(quota::answer(
                &tenant.id,
                key_id,
                held.standings(),
            )));
        }
        Api::OpenAiModels => {
            let path = session.req_header().uri.path();
            return Ok(Outcome::Respond(authz::models_answer(
                &tenant, &route, path,
            )?));
        }
        _ => {}
    }

    let snap = ctx.snapshot.clone();
    if route.api.binds_path_id() {
        let ids = Binding::new(&snap.response_ids, &tenant.id);
        ctx.router_path = Some(open_path_id(&route, &session.req_header().uri, &ids)?);
    }

    let t = stage_start(&ctx.trace);
    let judged = judge_body(
        gw,
        session,
        &mut ctx.body_lease,
        &snap,
        &route,
        &tenant,
        &mut ctx.guardrails,
    )
    .await;
    stage_end(&ctx.trace, "body", t, &judged);
    let (judged, body_bytes) = judged?;

    // Policy: Rego, then the external authorizer.
    if !snap.policies.is_empty() {
        let req = session.req_header();
        // The route's own feature (chat, embeddings) with those the body uses.
        let mut features = judged.features;
        if let Some(f) = route.feature {
            features.insert(f);
        }
        let preq = PolicyRequest {
            identity: ctx
                .identity
                .as_ref()
                .ok_or_else(|| internal("no identity at the policy stage"))?,
            method: req.method.as_str(),
            route: &route,
            model: &judged.model,
            features,
            region: &snap.gateway.server.region,
            body_bytes,
            prompt_tokens: judged.prompt_tokens,
        };
        let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
        let t = stage_start(&ctx.trace);
        let headers = snap
            .policies
            .authorize(&preq, &req.headers, path, &ctx.request_id)
            .await;
        stage_end(&ctx.trace, "policy", t, &headers);
        ctx.policy_headers = headers?;
    }

    // Token and money budgets: the prompt estimate plus every output
    // token the request may use, at the model's prices, settled with the
    // real usage when the answer ends.
    let price = snap.tenants.prices.lookup(&judged.model).map(|(_, p)| *p);
    let reserve = Reserve {
        tokens: judged
            .prompt_tokens
            .saturating_add(judged.max_output_tokens),
        cost: price.map_or(0, |p| {
            p.estimate(judged.prompt_tokens, judged.max_output_tokens)
        }),
        price,
    };
    let budgeted = [Some(&tenant.limiter), who.key_scope.as_ref()]
        .into_iter()
        .flatten()
        .any(|s| !s.spend.is_empty());
    if price.is_none() && budgeted && !judged.model.is_empty() {
        spend::note_unpriced(&tenant.id, &judged.model);
    }
    let model_scope = tenant.model_scopes.lookup(&judged.model).map(|(_, s)| s);
    if let Some(held) = ctx.limits.as_mut() {
        let t = stage_start(&ctx.trace);
        let reserved = gw
            .limiter
            .reserve(held, &tenant.id, &ctx.request_id, model_scope, reserve)
            .await;
        stage_end(&ctx.trace, "limits", t, &reserved);
        reserved?;
    }
    ctx.usage_tap = route.api.usage_tap(
        judged.features.contains(Feature::Stream),
        !judged.usage_requested,
    );
    let body = judged.body.clone();
    ctx.judged = Some(judged);
    Ok(Outcome::Forward(body))
}

/// The body gate: bounded read, then the pure judgement. A route's own
/// cap (an audio route's) replaces the plan's and the gateway's. Returns
/// the judged body and how many bytes the client sent.
async fn judge_body(
    gw: &Gateway,
    session: &mut Session,
    lease: &mut Option<BodyLease>,
    snap: &Snapshot,
    route: &Route,
    tenant: &Tenant,
    acted: &mut Acted,
) -> Result<(Judged, usize), Reject> {
    let cfg = &snap.gateway.body;
    let limit = route
        .max_body_bytes
        .unwrap_or(tenant.limits.max_body_bytes.min(cfg.max_body_bytes));
    let headers = &session.req_header().headers;
    let declared = intake::check_head(headers, limit, route.api.media())?;
    let content_type = (route.api == Api::Multipart)
        .then(|| headers.get(http::header::CONTENT_TYPE))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let lease = lease.insert(gw.bodies.lease());
    let raw = intake::read(session, cfg, limit, declared, lease).await?;
    let body_bytes = raw.len();
    let judged = if route.api == Api::Multipart {
        // Boxed: the form reader's state would otherwise live inside every
        // request's future, moved with it, multipart or not.
        Box::pin(multipart::judge(
            route,
            tenant,
            content_type.as_deref(),
            raw.freeze(),
        ))
        .await?
    } else {
        let gate = Gate {
            cfg,
            schemas: &snap.schemas,
            ids: Binding::new(&snap.response_ids, &tenant.id),
        };
        body::judge(route, tenant, &gate, &raw, acted)?
    };
    Ok((judged, body_bytes))
}

/// The scopes `GET /v1/quota` reports, in check order: the caller's key,
/// the tenant's model patterns, the tenant.
fn quota_scopes(tenant: &Tenant, key: Option<&Arc<ScopeLimiter>>) -> Vec<Arc<ScopeLimiter>> {
    key.into_iter()
        .chain(tenant.model_scopes.values())
        .chain([&tenant.limiter])
        .cloned()
        .collect()
}

/// Head sanity: size limits, Host, a canonical path, unambiguous framing.
fn head_sanity(session: &Session, ctx: &RequestCtx) -> Result<(), Reject> {
    let req = session.req_header();
    inbound::check_head(req, &ctx.snapshot.gateway.server.head_limits)?;
    inbound::check(&req.headers, || {
        let down = session.as_downstream();
        down.as_http1().map(|_| down.to_h1_raw())
    })
}

/// Identity, then the header policy (suspension, route, method, region,
/// the route's plan feature). Failed authentications count against the
/// client's address.
fn identify(gw: &Gateway, session: &Session, ctx: &mut RequestCtx) -> Result<(), Reject> {
    let req = session.req_header();
    let snap = &ctx.snapshot;
    let ip = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip());
    if let Some(ip) = &ip {
        gw.auth_failures.check(ip)?;
    }
    let cert = session
        .digest()
        .and_then(|d| d.ssl_digest.as_ref())
        .and_then(|s| s.extension.get::<CertIdentity>());
    let t = stage_start(&ctx.trace);
    let who = identity::resolve(&snap.auth, &snap.tenants, &req.headers, cert, unix_now())
        .inspect_err(|r| {
            if let (401, Some(ip)) = (r.status, &ip) {
                gw.auth_failures.record_failure(ip);
            }
        });
    stage_end(&ctx.trace, "identity", t, &who);
    let who = who?;
    let t = stage_start(&ctx.trace);
    let route = authz::admit(
        &who.tenant,
        &snap.routes,
        &req.method,
        req.uri.path(),
        &snap.gateway.server.region,
    );
    stage_end(&ctx.trace, "authz", t, &route);
    // Known even when the route is refused: the rejection is counted
    // against the tenant and carries its rate-limit headers.
    ctx.identity = Some(who);
    ctx.route = Some(route?);
    Ok(())
}

/// The router's path for a stored response: the bound `{id}` of the
/// client's path opened, the query kept. Another tenant's, an unbound or
/// an altered id is 404 before the router is asked.
fn open_path_id(route: &RouteSpec, uri: &http::Uri, ids: &Binding) -> Result<String, Reject> {
    let at = route
        .path
        .split('/')
        .position(|seg| seg.starts_with('{'))
        .ok_or_else(|| internal("an id route without an {id} segment"))?;
    let mut segments: Vec<String> = uri.path().split('/').map(str::to_owned).collect();
    let slot = segments
        .get_mut(at)
        .ok_or_else(|| internal("a path that does not match its route"))?;
    *slot = ids
        .open(slot)
        .filter(|id| {
            id.bytes()
                .all(|b| b.is_ascii_graphic() && !b"/?#%".contains(&b))
        })
        .ok_or_else(|| response_not_found("response_id"))?;
    let mut path = segments.join("/");
    if let Some(q) = uri.query() {
        path.push('?');
        path.push_str(q);
    }
    Ok(path)
}

/// The head the router gets: HTTP/1.1 without the client's hop-by-hop and
/// trusted headers, with the signed context, framing the judged body.
pub fn router_head(session: &Session, ctx: &RequestCtx) -> pingora::Result<RouterHead> {
    let Some(who) = &ctx.identity else {
        return pingora::Error::e_explain(pingora::ErrorType::InternalError, "no identity");
    };
    let client_ip = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    let tls = session
        .digest()
        .and_then(|d| d.ssl_digest.as_ref())
        .is_some();
    let trace = ctx.trace.as_ref().map(RequestTrace::propagation);
    let trusted = TrustedContext {
        tenant: &who.tenant,
        request_id: &ctx.request_id,
        model: ctx
            .judged
            .as_ref()
            .map(|j| j.model.as_str())
            .filter(|m| !m.is_empty()),
        key_id: who.key_id.as_deref(),
        client_ip: &client_ip,
        proto: if tls { "https" } else { "http" },
        policy: &ctx.policy_headers,
        strip: ctx
            .snapshot
            .gateway
            .policy
            .ext_authz
            .as_ref()
            .map_or(&[], |e| e.allowed_upstream_headers.as_slice()),
        trace: trace.as_deref(),
    };
    let body_len = ctx.judged.as_ref().map_or(0, |j| j.body.len());
    forward::router_head(
        session.req_header(),
        ctx.router_path.as_deref(),
        &trusted,
        &ctx.snapshot.signer,
        unix_now(),
        body_len,
    )
}

/// When a stage began, read only when the request is traced.
fn stage_start(trace: &Option<RequestTrace>) -> Option<SystemTime> {
    trace.as_ref().map(|_| SystemTime::now())
}

/// The stage's span, when the request is traced.
fn stage_end<T>(
    trace: &Option<RequestTrace>,
    name: &'static str,
    start: Option<SystemTime>,
    result: &Result<T, Reject>,
) {
    if let (Some(trace), Some(start)) = (trace, start) {
        trace.stage(name, start, result.is_ok());
    }
}

fn internal(what: &'static str) -> Reject {
    tracing::error!(what, "request path invariant broken");
    Reject::new(500, RejectCode::InternalError, "internal gateway error")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
