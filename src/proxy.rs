//! The Pingora wiring: each hook hands its facts to a stage and acts on the
//! decision. No policy lives here.
//!
//! Everything decidable from the request head is decided in
//! `request_filter`, before an upstream connection exists, so a rejected
//! request never reaches the router.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use pingora::connectors::http::Connector;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::protocols::http::client::HttpSession as ClientSession;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, Result};
use rand::RngCore;

use crate::authz;
use crate::body::{self, intake, Judged};
use crate::config::tenants::Feature;
use crate::config::{SharedSnapshot, Snapshot};
use crate::forward::upstream::{self, Upstream};
use crate::forward::{self, TrustedContext};
use crate::identity::mtls::CertIdentity;
use crate::identity::{self, Identity};
use crate::inbound;
use crate::limits::guard::{Admission, AuthFailures, Overload};
use crate::limits::{Held, Limiter};
use crate::observe::access_log::{self, AccessRecord};
use crate::observe::metrics::METRICS;
use crate::policy::{self, PolicyHeaders, PolicyRequest};
use crate::reject::Reject;
use crate::response::UsageTap;
use crate::route::{Route, RouteSpec};

/// Attempts at sending one request when pooled connections turn out closed.
const SEND_ATTEMPTS: u32 = 3;
/// An answer's chunks already received are written together up to this size.
const COALESCE_BYTES: usize = 16 * 1024;
/// Interim answers (100, 103) skipped before the router's final one.
const MAX_INTERIM_ANSWERS: usize = 8;

/// The gateway's `ProxyHttp` implementation.
pub struct Gateway {
    pub snapshot: SharedSnapshot,
    pub upstream: Upstream,
    /// Pooled connections to the router.
    pub connector: Connector,
    pub auth_failures: AuthFailures,
    pub overload: Overload,
    /// Where limit state lives: this process, or Redis for the fleet.
    pub limiter: Limiter,
}

/// Per-request state. The snapshot is loaded once, so a request finishes on
/// the configuration it started with.
pub struct RequestCtx {
    snapshot: Arc<Snapshot>,
    request_id: String,
    started: Instant,
    identity: Option<Identity>,
    route: Option<Route>,
    reject_code: Option<&'static str>,
    upstream_started: Option<Instant>,
    upstream_elapsed: Option<Duration>,
    judged: Option<Judged>,
    /// Headers the policy stage adds for the router.
    policy_headers: PolicyHeaders,
    /// The judged body, as the router gets it.
    forward_body: Option<Bytes>,
    /// Reads the router's usage from the response (and hides the usage
    /// chunk of a stream the client did not ask it for).
    usage_tap: Option<UsageTap>,
    /// A place under the gateway-wide in-flight cap.
    admission: Option<Admission>,
    /// The tenant's concurrency slot and token reservation; dropping the
    /// context frees them.
    limits: Option<Held>,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn new_request_id() -> String {
    let mut raw = [0u8; 16];
    rand::rng().fill_bytes(&mut raw);
    hex::encode(raw)
}

/// What the head stages decided for a request that was not rejected.
enum Admitted {
    Proxy,
    /// The gateway answers itself with this JSON body.
    Respond(Vec<u8>),
}

impl Gateway {
    fn admit(&self, session: &Session, ctx: &mut RequestCtx) -> Result<Admitted, Reject> {
        ctx.admission = Some(self.overload.admit()?);
        let req = session.req_header();
        inbound::check_head(req, &ctx.snapshot.gateway.server.head_limits)?;
        inbound::check(&req.headers, || {
            let down = session.as_downstream();
            down.as_http1().map(|_| down.to_h1_raw())
        })?;
        let snap = &ctx.snapshot;
        let ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        if let Some(ip) = &ip {
            self.auth_failures.check(ip)?;
        }
        let cert = session
            .digest()
            .and_then(|d| d.ssl_digest.as_ref())
            .and_then(|s| s.extension.get::<CertIdentity>());
        let who = identity::resolve(&snap.auth, &snap.tenants, &req.headers, cert, unix_now())
            .inspect_err(|r| {
                if let (401, Some(ip)) = (r.status, &ip) {
                    self.auth_failures.record_failure(ip);
                }
            })?;
        let route = authz::admit(
            &who.tenant,
            &snap.routes,
            &req.method,
            req.uri.path(),
            &snap.gateway.server.region,
        );
        ctx.identity = Some(who);
        let route = route?;
        let admitted = match (&ctx.identity, route.api.answered_by_gateway()) {
            (Some(who), true) => Admitted::Respond(authz::models_body(&who.tenant)),
            _ => Admitted::Proxy,
        };
        ctx.route = Some(route);
        Ok(admitted)
    }

    /// Writes a JSON response that ends the request at the gateway.
    async fn respond(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        status: u16,
        content_type: &str,
        body: Bytes,
        extra: &[(&'static str, String)],
    ) -> Result<()> {
        let mut resp = ResponseHeader::build(status, Some(10 + extra.len()))?;
        resp.insert_header("content-type", content_type)?;
        resp.insert_header("content-length", body.len().to_string())?;
        resp.insert_header("x-request-id", ctx.request_id.as_str())?;
        rate_limit_headers(ctx, &mut resp)?;
        if status == 401 {
            resp.insert_header("www-authenticate", "Bearer error=\"invalid_token\"")?;
        }
        for (name, value) in extra {
            resp.insert_header(*name, value.as_str())?;
        }
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body), true).await
    }

    async fn reject(&self, session: &mut Session, ctx: &mut RequestCtx, r: &Reject) -> Result<()> {
        ctx.reject_code = Some(r.code);
        if r.status == 400 {
            // After a framing or header error the connection's state is suspect.
            session.set_keepalive(None);
        } else if !session.is_body_done() {
            keep_alive_past_unread_body(session, r.status).await;
        }
        let (content_type, body) = r.content();
        self.respond(session, ctx, r.status, content_type, body, &r.headers)
            .await
    }

    /// Reads the whole body within its size and time bounds, then judges
    /// it. Runs before any upstream connection exists.
    async fn read_and_judge(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Admitted, Reject> {
        let snap = ctx.snapshot.clone();
        let (Some(who), Some(route)) = (&ctx.identity, ctx.route.clone()) else {
            return Err(Reject::new(
                500,
                "internal_error",
                "no identity at the body stage",
            ));
        };
        let tenant = who.tenant.clone();
        let cfg = &snap.gateway.body;
        let limit = tenant.limits.max_body_bytes.min(cfg.max_body_bytes);
        intake::check_head(&session.req_header().headers, limit)?;
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);

        let started = Instant::now();
        let mut raw = BytesMut::new();
        loop {
            let (deadline, by_rate) = cfg.next_read_deadline(started, raw.len());
            let left = deadline.saturating_duration_since(Instant::now());
            let chunk = match tokio::time::timeout(left, session.read_request_body()).await {
                Err(_) => {
                    session.set_keepalive(None);
                    return Err(Reject::new(
                        408,
                        "request_timeout",
                        if by_rate {
                            "the request body arrived too slowly"
                        } else {
                            "the request body did not arrive in time"
                        },
                    ));
                }
                Ok(Err(_)) => {
                    session.set_keepalive(None);
                    return Err(Reject::bad_request(
                        "invalid_request",
                        "the request body could not be read",
                    ));
                }
                Ok(Ok(None)) => break,
                Ok(Ok(Some(chunk))) => chunk,
            };
            if raw.len() + chunk.len() > limit {
                session.set_keepalive(None);
                return Err(intake::too_large(limit as u64));
            }
            raw.extend_from_slice(&chunk);
        }

        let judged = body::judge(&route, &tenant, cfg, &snap.schemas, &raw)?;
        ctx.policy_headers = self
            .authorize(session, ctx, &route, &judged, raw.len())
            .await?;
        // The prompt estimate plus every output token the request may use.
        let reserve = judged
            .prompt_tokens
            .saturating_add(judged.max_output_tokens);
        if let Some(held) = ctx.limits.as_mut() {
            self.limiter.reserve(held, &tenant, reserve).await?;
        }
        ctx.forward_body = Some(judged.body.clone());
        ctx.usage_tap = Some(route.api.usage_tap(
            judged.features.contains(Feature::Stream),
            !judged.usage_requested,
        ));
        ctx.judged = Some(judged);
        Ok(Admitted::Proxy)
    }

    /// The policy stage: Rego, then the external authorizer. Returns the
    /// headers they add for the router.
    async fn authorize(
        &self,
        session: &Session,
        ctx: &RequestCtx,
        route: &RouteSpec,
        judged: &Judged,
        body_bytes: usize,
    ) -> Result<PolicyHeaders, Reject> {
        let snap = &ctx.snapshot;
        let (Some(who), true) = (
            &ctx.identity,
            snap.rego.is_some() || snap.ext_authz.is_some(),
        ) else {
            return Ok(PolicyHeaders::new());
        };
        let req = session.req_header();
        // The route's own feature (chat, embeddings) with those the body uses.
        let mut features = judged.features;
        if let Some(f) = route.feature {
            features.insert(f);
        }
        let preq = PolicyRequest {
            identity: who,
            method: req.method.as_str(),
            route,
            model: &judged.model,
            features,
            region: &snap.gateway.server.region,
            body_bytes,
            prompt_tokens: judged.prompt_tokens,
        };
        let mut headers = PolicyHeaders::new();
        if let Some(rego) = &snap.rego {
            let started = Instant::now();
            let now_ns = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
            let input = preq.rego_input(&snap.gateway.policy.jwt_claims, now_ns);
            let verdict = rego
                .decide(input)
                .map_err(|e| policy::policy_error("rego", &e));
            METRICS
                .policy_duration
                .with_label_values(&["rego"])
                .observe(started.elapsed().as_secs_f64());
            headers = verdict??;
        }
        if let Some(ext) = &snap.ext_authz {
            let started = Instant::now();
            let path = req.uri.path_and_query().map_or("/", |p| p.as_str());
            let verdict = ext.check(&preq, &req.headers, path, &ctx.request_id).await;
            METRICS
                .policy_duration
                .with_label_values(&["ext_authz"])
                .observe(started.elapsed().as_secs_f64());
            headers.extend(verdict?);
        }
        Ok(headers)
    }

    /// Sends the judged request to the router and relays its answer. The
    /// gateway does this exchange itself rather than through Pingora's proxy
    /// loop: the whole judged body is already in hand, so nothing is left to
    /// stream upstream, and the loop's per-request machinery (body channel,
    /// retry buffer, hook dispatch) cost 8 % of the CPU of a 1 KiB request
    /// (bench/RESULTS.md).
    async fn forward(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        ctx.upstream_started = Some(Instant::now());
        let Err(e) = self.exchange(session, ctx).await else {
            return Ok(());
        };
        if e.esource() == &ErrorSource::Downstream {
            // The client left or broke the connection: nobody to answer.
            tracing::debug!(error = %e, "client gone during the exchange");
        } else if session.response_written().is_none() {
            let r = upstream_reject(&e);
            self.reject(session, ctx, &r).await?;
        } else {
            // Too late for a clean error: the client sees the answer cut.
            ctx.reject_code = Some(upstream_reject(&e).code);
        }
        Ok(())
    }

    async fn exchange(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<()> {
        let peer = self.upstream.peer()?;
        let mut up = self.send(session, ctx, &peer).await?;
        let mut resp = up
            .response_header()
            .cloned()
            .ok_or_else(|| Error::explain(ErrorType::InvalidHTTPHeader, "no response header"))
            .map_err(|e| e.into_up())?;
        on_response_head(ctx, &mut resp)?;
        session
            .write_response_header(Box::new(resp), false)
            .await
            .map_err(|e| e.into_down())?;
        let mut done = false;
        while !done {
            let chunk = tokio::select! {
                biased;
                chunk = up.read_response_body() => chunk.map_err(|e| e.into_up())?,
                gone = session.read_body_or_idle(true) => return Err(client_gone(gone)),
            };
            let Some(chunk) = chunk else { break };
            let mut out = tap(ctx, chunk);
            // Whatever else the router has already sent leaves in the same
            // write: a stream's chunks are small, and a write per chunk is a
            // send (and a flush) per token. Pingora's body reads are
            // cancel-safe, so a read that would wait is simply dropped.
            let mut batch = BytesMut::new();
            while out.len() + batch.len() < COALESCE_BYTES {
                match up.read_response_body().now_or_never() {
                    Some(Ok(Some(more))) => {
                        if batch.is_empty() {
                            batch.extend_from_slice(&out);
                        }
                        batch.extend_from_slice(&tap(ctx, more));
                    }
                    Some(Ok(None)) => {
                        done = true;
                        break;
                    }
                    Some(Err(e)) => return Err(e.into_up()),
                    None => break,
                }
            }
            if !batch.is_empty() {
                out = batch.freeze();
            }
            if !out.is_empty() {
                session
                    .write_response_body(Some(out), false)
                    .await
                    .map_err(|e| e.into_down())?;
            }
        }
        // The router's part is done: its connection goes back to the pool
        // before the client's last write.
        self.connector
            .release_http_session(up, &*peer, peer.options.idle_timeout)
            .await;
        let tail = ctx
            .usage_tap
            .as_mut()
            .map(|t| t.push(Bytes::new(), true))
            .filter(|t| !t.is_empty());
        session
            .write_response_body(tail, true)
            .await
            .map_err(|e| e.into_down())
    }

    /// Sends the request and reads the head of the router's answer. A pooled
    /// connection the router closed while it sat idle fails before any
    /// answer; as in Pingora's own proxy, the request then goes again on
    /// another connection, while a new connection's failure is final. A
    /// client that leaves meanwhile ends the exchange.
    async fn send(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        peer: &HttpPeer,
    ) -> Result<ClientSession> {
        let Some(body) = ctx.forward_body.clone() else {
            return Error::e_explain(ErrorType::InternalError, "no judged body");
        };
        let mut attempt = 1;
        loop {
            let mut head = session.req_header().clone();
            forward_head(session, ctx, &mut head)?;
            let (mut up, reused) = self
                .connector
                .get_http_session(peer)
                .await
                .map_err(|e| e.into_up())?;
            up.set_read_timeout(peer.options.read_timeout);
            up.set_write_timeout(peer.options.write_timeout);
            let sent = tokio::select! {
                biased;
                sent = send_on(&mut up, head, body.clone()) => sent,
                gone = session.read_body_or_idle(true) => return Err(client_gone(gone)),
            };
            match sent {
                Ok(()) => return Ok(up),
                Err(mut e) => {
                    e.retry.decide_reuse(reused);
                    if !e.retry() || attempt == SEND_ATTEMPTS {
                        return Err(e.into_up());
                    }
                    tracing::debug!(error = %e, attempt, "pooled router connection failed; sending again");
                    attempt += 1;
                }
            }
        }
    }

    /// The header-stage limits: request rate and a concurrency slot.
    async fn limit_request(&self, ctx: &mut RequestCtx) -> Result<(), Reject> {
        if let Some(who) = &ctx.identity {
            ctx.limits = Some(self.limiter.admit(&who.tenant, &ctx.request_id).await?);
        }
        Ok(())
    }

    fn tenant_label(ctx: &RequestCtx) -> &str {
        ctx.identity.as_ref().map_or("-", |i| i.tenant.id.as_str())
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            snapshot: self.snapshot.load_full(),
            request_id: new_request_id(),
            started: Instant::now(),
            identity: None,
            route: None,
            reject_code: None,
            upstream_started: None,
            upstream_elapsed: None,
            judged: None,
            policy_headers: PolicyHeaders::new(),
            forward_body: None,
            usage_tap: None,
            admission: None,
            limits: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // Pingora keeps an HTTP/1.1 connection alive with no idle limit.
        if session.get_keepalive().is_some() {
            let idle = ctx.snapshot.gateway.server.idle_timeout.as_secs();
            session.set_keepalive(Some(idle));
        }
        let mut admitted = self.admit(session, ctx);
        if admitted.is_ok() {
            if let Err(r) = self.limit_request(ctx).await {
                admitted = Err(r);
            }
        }
        let admitted = match admitted {
            Ok(Admitted::Proxy) => self.read_and_judge(session, ctx).await,
            other => other,
        };
        match admitted {
            Ok(Admitted::Proxy) => {
                self.forward(session, ctx).await?;
                Ok(true)
            }
            Ok(Admitted::Respond(body)) => {
                self.respond(session, ctx, 200, "application/json", body.into(), &[])
                    .await?;
                Ok(true)
            }
            Err(r) => {
                self.reject(session, ctx, &r).await?;
                Ok(true)
            }
        }
    }

    /// Never reached: `request_filter` answers every request itself (see
    /// [`Gateway::forward`]), so Pingora's proxy phases do not run.
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        Error::e_explain(
            ErrorType::InternalError,
            "request_filter answers every request",
        )
    }

    /// Pingora calls this only when `request_filter` fails, which happens
    /// only when an answer cannot be written: the client went away (nothing
    /// to say) or a response head could not be built (a 500, if nothing has
    /// been sent yet). Router failures never get here: [`Gateway::forward`]
    /// answers them itself.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy
    where
        Self::CTX: Send + Sync,
    {
        let mut code = 0;
        if e.esource() != &ErrorSource::Downstream && session.response_written().is_none() {
            let r = Reject::new(500, "internal_error", "internal gateway error");
            code = r.status;
            if let Err(err) = self.reject(session, ctx, &r).await {
                tracing::debug!(error = %err, "could not send the error response");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        let usage = ctx.usage_tap.as_ref().and_then(UsageTap::usage);
        if let Some(mut held) = ctx.limits.take() {
            held.settle(usage.map(|u| u.total()));
        }
        ctx.admission = None;
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let tenant = Self::tenant_label(ctx);
        let route = ctx.route.as_ref().map_or("-", |r| r.label.as_str());
        let total = ctx.started.elapsed();
        let gateway = total.saturating_sub(ctx.upstream_elapsed.unwrap_or_default());
        let m = &*METRICS;
        if let (Some(u), Some(j)) = (usage, &ctx.judged) {
            let model = j.model_label.as_str();
            m.tokens
                .with_label_values(&[tenant, model, "prompt"])
                .inc_by(u.prompt_tokens);
            m.tokens
                .with_label_values(&[tenant, model, "completion"])
                .inc_by(u.completion_tokens);
        }
        m.requests
            .with_label_values(&[tenant, route, status_label(status)])
            .inc();
        if let Some(code) = ctx.reject_code {
            m.rejections.with_label_values(&[tenant, code]).inc();
        }
        m.gateway_duration
            .with_label_values(&[route])
            .observe(gateway.as_secs_f64());
        if let Some(up) = ctx.upstream_elapsed {
            m.upstream_duration
                .with_label_values(&[route])
                .observe(up.as_secs_f64());
        }
        access_log::write(&AccessRecord {
            request_id: &ctx.request_id,
            tenant,
            route,
            model: ctx.judged.as_ref().map(|j| j.model.as_str()),
            method: session.req_header().method.as_str(),
            status,
            reject_code: ctx.reject_code,
            gateway_ms: gateway.as_secs_f64() * 1e3,
            upstream_ms: ctx.upstream_elapsed.map(|d| d.as_secs_f64() * 1e3),
            prompt_tokens: usage.map(|u| u.prompt_tokens),
            completion_tokens: usage.map(|u| u.completion_tokens),
        });
    }
}

/// Bodies up to this size are read and discarded after an early refusal, so
/// a throttled client keeps its connection instead of reconnecting per 429.
const DRAIN_LIMIT: u64 = 64 * 1024;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

/// Drains a small unread body so the connection stays reusable; anything
/// larger, chunked, too slow or itself refused closes the connection.
async fn keep_alive_past_unread_body(session: &mut Session, status: u16) {
    let declared = session
        .req_header()
        .headers
        .get("content-length")
        .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    let drainable = !matches!(status, 408 | 413) && declared.is_some_and(|n| n <= DRAIN_LIMIT);
    let drained = drainable
        && matches!(
            tokio::time::timeout(DRAIN_TIMEOUT, session.drain_request_body()).await,
            Ok(Ok(()))
        );
    if !drained {
        session.set_keepalive(None);
    }
}

/// The head the router gets: HTTP/1.1 without the client's hop-by-hop and
/// trusted headers, with the signed context, framing the judged body.
fn forward_head(session: &Session, ctx: &RequestCtx, head: &mut RequestHeader) -> Result<()> {
    let Some(who) = &ctx.identity else {
        // request_filter admits nothing without an identity.
        return Error::e_explain(ErrorType::InternalError, "no identity at forward");
    };
    let client_ip = session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    let proto = if session
        .digest()
        .and_then(|d| d.ssl_digest.as_ref())
        .is_some()
    {
        "https"
    } else {
        "http"
    };
    let trusted = TrustedContext {
        tenant: &who.tenant,
        request_id: &ctx.request_id,
        model: ctx.judged.as_ref().map(|j| j.model.as_str()),
        client_ip: &client_ip,
        proto,
        policy: &ctx.policy_headers,
        strip: ctx
            .snapshot
            .gateway
            .policy
            .ext_authz
            .as_ref()
            .map_or(&[], |e| e.allowed_upstream_headers.as_slice()),
    };
    forward::for_h1_router(head)?;
    forward::apply(head, &trusted, &ctx.snapshot.signer, unix_now())?;
    if let Some(body) = &ctx.forward_body {
        head.insert_header("content-length", body.len().to_string())?;
    }
    Ok(())
}

/// The gateway's part of every upstream response head.
fn on_response_head(ctx: &mut RequestCtx, resp: &mut ResponseHeader) -> Result<()> {
    ctx.upstream_elapsed = ctx.upstream_started.map(|t| t.elapsed());
    let is_sse = resp
        .headers
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if let Some(UsageTap::Stream(tap)) = &ctx.usage_tap {
        if !is_sse {
            ctx.usage_tap = Some(UsageTap::json());
        } else if tap.hide_usage {
            // The body will shrink: let it be re-framed.
            resp.remove_header("content-length");
        }
    }
    resp.insert_header("x-request-id", ctx.request_id.as_str())?;
    rate_limit_headers(ctx, resp)
}

/// OpenAI's `x-ratelimit-*` headers, on every authenticated response.
fn rate_limit_headers(ctx: &RequestCtx, resp: &mut ResponseHeader) -> Result<()> {
    let headers = match (&ctx.limits, &ctx.identity) {
        (Some(held), _) => held.headers(),
        (None, Some(who)) => who.tenant.limiter.headers(),
        (None, None) => return Ok(()),
    };
    for (name, value) in headers {
        resp.insert_header(name, value)?;
    }
    Ok(())
}

/// Passes an answer chunk through the usage tap, when there is one.
fn tap(ctx: &mut RequestCtx, chunk: Bytes) -> Bytes {
    match ctx.usage_tap.as_mut() {
        Some(t) => t.push(chunk, false),
        None => chunk,
    }
}

/// Writes the request and reads the head of the final answer (an interim
/// 100 or 103 is not the answer).
async fn send_on(up: &mut ClientSession, head: RequestHeader, body: Bytes) -> Result<()> {
    // Pingora flushes the head on its own; corked, it leaves with the body.
    upstream::cork(up, true);
    up.write_request_header(Box::new(head)).await?;
    up.write_request_body(body, true).await?;
    up.finish_request_body().await?;
    upstream::cork(up, false);
    for _ in 0..MAX_INTERIM_ANSWERS {
        up.read_response_header().await?;
        if !up
            .response_header()
            .is_some_and(|r| r.status.is_informational())
        {
            return Ok(());
        }
    }
    Error::e_explain(ErrorType::InvalidHTTPHeader, "too many interim answers")
}

/// The downstream ended (or broke its framing) while the router worked.
fn client_gone(ended: Result<Option<Bytes>>) -> Box<Error> {
    match ended {
        Err(e) => e.into_down(),
        Ok(_) => Error::explain(
            ErrorType::ConnectionClosed,
            "client sent data after its request",
        )
        .into_down(),
    }
}

/// How a failure to reach or hear from the router looks to the client.
fn upstream_reject(e: &Error) -> Reject {
    match e.etype() {
        ErrorType::ConnectNoRoute
        | ErrorType::ConnectRefused
        | ErrorType::ConnectTimedout
        | ErrorType::ConnectError
        | ErrorType::TLSHandshakeFailure => {
            Reject::new(502, "upstream_unavailable", "the router is unavailable")
        }
        ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
            Reject::new(504, "upstream_timeout", "the router did not answer in time")
        }
        _ if e.esource() == &ErrorSource::Upstream => {
            Reject::new(502, "upstream_unavailable", "the router is unavailable")
        }
        _ => Reject::new(500, "internal_error", "internal gateway error"),
    }
}

/// Status codes as static label values, so metrics never format per request.
fn status_label(status: u16) -> &'static str {
    match status {
        200 => "200",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        408 => "408",
        413 => "413",
        415 => "415",
        429 => "429",
        500 => "500",
        502 => "502",
        503 => "503",
        504 => "504",
        0 => "0",
        s if s < 200 => "1xx",
        s if s < 300 => "2xx",
        s if s < 400 => "3xx",
        s if s < 500 => "4xx",
        _ => "5xx",
    }
}
