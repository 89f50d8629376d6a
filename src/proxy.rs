//! The Pingora wiring: the hooks, the per-request context, writing the
//! gateway's own answers, and the log of each request. The stages run in
//! [`crate::pipeline`]; the exchange with the router in
//! [`crate::forward::exchange`].

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Version};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, OrErr, Result};
use rand::RngCore;

use crate::body::Judged;
use crate::config::{SharedSnapshot, Snapshot};
use crate::forward::exchange::{self, Answer};
use crate::forward::pool::RouterPool;
use crate::forward::upstream::Upstream;
use crate::forward::RouterHead;
use crate::guardrails::Acted;
use crate::identity::Identity;
use crate::ids::Binding;
use crate::limits::guard::{Admission, AuthFailures, BodyBudget, BodyLease, Overload};
use crate::limits::{local_rate_state, spend, Held, Limiter};
use crate::observe::access_log::{self, AccessRecord};
use crate::observe::metrics::{status_label, METRICS};
use crate::observe::telemetry::{Finished, RequestTrace, Telemetry};
use crate::pipeline::{self, Outcome};
use crate::policy::PolicyHeaders;
use crate::reject::{ErrorShape, Reject, RejectCode};
use crate::response::UsageTap;
use crate::route::Route;

/// The gateway's `ProxyHttp` implementation.
pub struct Gateway {
    pub snapshot: SharedSnapshot,
    pub upstream: Upstream,
    /// Idle connections to the router, per worker thread.
    pub pool: RouterPool,
    pub auth_failures: AuthFailures,
    pub overload: Overload,
    pub bodies: BodyBudget,
    /// Where limit state lives: this process, or Redis for the fleet.
    pub limiter: Limiter,
    /// The tracer, when `[telemetry]` is configured.
    pub telemetry: Option<Arc<Telemetry>>,
}

/// Per-request state. The snapshot is loaded once, so a request finishes on
/// the configuration it started with.
pub struct RequestCtx {
    pub(crate) snapshot: Arc<Snapshot>,
    pub(crate) request_id: String,
    started: Instant,
    pub(crate) identity: Option<Identity>,
    pub(crate) route: Option<Route>,
    /// The router's path when it differs from the client's (a bound
    /// Responses id opened).
    pub(crate) router_path: Option<String>,
    reject_code: Option<&'static str>,
    upstream_started: Option<Instant>,
    upstream_elapsed: Option<Duration>,
    pub(crate) judged: Option<Judged>,
    /// What the guardrails masked, refused or logged.
    pub(crate) guardrails: Acted,
    /// Headers the policy stage adds for the router.
    pub(crate) policy_headers: PolicyHeaders,
    /// Reads the router's usage from the response (and hides the usage
    /// chunk of a stream the client did not ask it for).
    pub(crate) usage_tap: Option<UsageTap>,
    /// A place under the gateway-wide in-flight cap.
    pub(crate) admission: Option<Admission>,
    /// The tenant's concurrency slot and token reservation; dropping the
    /// context frees them.
    pub(crate) limits: Option<Held>,
    /// The request body's share of the gateway's body budget, until the
    /// body has gone to the router.
    pub(crate) body_lease: Option<BodyLease>,
    /// The request's spans, when tracing is on.
    pub(crate) trace: Option<RequestTrace>,
    /// Whether the answer is an event stream.
    stream: bool,
    /// When the answer's first body byte arrived, and its last.
    first_byte: Option<Instant>,
    answer_end: Option<Instant>,
}

fn new_request_id() -> String {
    let mut raw = [0u8; 16];
    rand::rng().fill_bytes(&mut raw);
    hex::encode(raw)
}

impl Gateway {
    /// Writes a JSON response that ends the request at the gateway.
    async fn respond(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        status: u16,
        content_type: &str,
        body: Bytes,
        extra: &[(HeaderName, String)],
    ) -> Result<()> {
        // These three, the rate-limit headers, `WWW-Authenticate`, the
        // extras, and Pingora's `Date` and `Connection`: no map growth.
        let mut headers = HeaderMap::with_capacity(18 + extra.len());
        headers.insert(CONTENT_TYPE, header_value(content_type.to_owned())?);
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        headers.insert(X_REQUEST_ID, header_value(ctx.request_id.clone())?);
        rate_limit_headers(ctx, &mut headers)?;
        if status == 401 {
            headers.insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
        }
        for (name, value) in extra {
            headers.insert(name, header_value(value.clone())?);
        }
        let status = StatusCode::from_u16(status)
            .or_err(ErrorType::InternalError, "gateway answer status")?;
        let resp = exchange::response_head(status, Version::HTTP_11, headers);
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body), true).await
    }

    async fn reject(&self, session: &mut Session, ctx: &mut RequestCtx, r: &Reject) -> Result<()> {
        ctx.reject_code = Some(r.code.as_str());
        if r.status == 400 {
            // After a framing or header error the connection's state is suspect.
            session.set_keepalive(None);
        } else if !session.is_body_done() {
            keep_alive_past_unread_body(session, r.status).await;
        }
        let (content_type, body) = r.content(error_shape(session, ctx), &ctx.request_id);
        self.respond(session, ctx, r.status, content_type, body, &r.headers)
            .await
    }

    /// Sends the judged request to the router and relays its answer; a
    /// failure before the answer began gets its JSON error.
    async fn forward(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        body: Bytes,
    ) -> Result<()> {
        ctx.upstream_started = Some(Instant::now());
        if let Some(t) = &mut ctx.trace {
            t.start_upstream();
        }
        let sent = match self.upstream.peer() {
            Ok(peer) => exchange::run(&self.pool, &peer, session, body, ctx).await,
            Err(e) => Err(e),
        };
        let Err(e) = sent else {
            return Ok(());
        };
        if e.esource() == &ErrorSource::Downstream {
            // The client left or broke the connection: nobody to answer.
            tracing::debug!(error = %e, "client gone during the exchange");
        } else if session.response_written().is_none() {
            let r = exchange::upstream_reject(&e);
            self.reject(session, ctx, &r).await?;
        } else {
            // Too late for a clean error: the client sees the answer cut.
            ctx.reject_code = Some(exchange::upstream_reject(&e).code.as_str());
        }
        Ok(())
    }

    /// The request's `tenant` metric label (`[observe] tenant_label`).
    fn tenant_label(ctx: &RequestCtx) -> &str {
        ctx.identity
            .as_ref()
            .map_or("-", |i| i.tenant.metric_label())
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
            router_path: None,
            reject_code: None,
            upstream_started: None,
            upstream_elapsed: None,
            judged: None,
            guardrails: Acted::default(),
            policy_headers: PolicyHeaders::new(),
            usage_tap: None,
            admission: None,
            limits: None,
            body_lease: None,
            trace: None,
            stream: false,
            first_byte: None,
            answer_end: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // Pingora keeps an HTTP/1.1 connection alive with no idle limit.
        if session.get_keepalive().is_some() {
            let idle = ctx.snapshot.gateway.server.idle_timeout.as_secs();
            session.set_keepalive(Some(idle));
        }
        if let Some(t) = &self.telemetry {
            let now = SystemTime::now();
            let start = now.checked_sub(ctx.started.elapsed()).unwrap_or(now);
            ctx.trace = Some(t.start_request(&session.req_header().headers, start));
        }
        match pipeline::run(self, session, ctx).await {
            Ok(Outcome::Forward(body)) => self.forward(session, ctx, body).await?,
            Ok(Outcome::Respond(body)) => {
                self.respond(session, ctx, 200, "application/json", body.into(), &[])
                    .await?
            }
            Err(r) => self.reject(session, ctx, &r).await?,
        }
        Ok(true)
    }

    /// Never reached: `request_filter` answers every request itself (see
    /// [`crate::forward::exchange`]), so Pingora's proxy phases do not run.
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
            let r = Reject::new(500, RejectCode::InternalError, "internal gateway error");
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
        let cost = ctx
            .limits
            .take()
            .and_then(|mut held| held.settle(usage.as_ref()))
            .map(|c| c as f64 / spend::NANO);
        ctx.admission = None;
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let tenant = Self::tenant_label(ctx);
        let route = ctx.route.as_ref().map_or("-", |r| r.label.as_str());
        let total = ctx.started.elapsed();
        let gateway = total.saturating_sub(ctx.upstream_elapsed.unwrap_or_default());
        let streamed = Streamed::of(ctx, usage.as_ref());
        let m = &*METRICS;
        if let (Some(c), Some(j)) = (cost, &ctx.judged) {
            m.cost
                .with_label_values(&[tenant, j.model_label.as_str()])
                .inc_by(c);
        }
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
        for (kind, action) in ctx.guardrails.actions() {
            m.guardrail_actions
                .with_label_values(&[tenant, kind, action])
                .inc();
        }
        if let Some((rule, at)) = &ctx.guardrails.logged {
            tracing::warn!(
                target: "guardrails",
                request_id = %ctx.request_id,
                tenant = ctx.identity.as_ref().map_or("-", |i| i.tenant.id.as_str()),
                rule,
                field = %at,
                "a deny rule matched; forwarded (deny_action = log)"
            );
        }
        m.gateway_duration
            .with_label_values(&[route])
            .observe(gateway.as_secs_f64());
        if let Some(up) = ctx.upstream_elapsed {
            m.upstream_duration
                .with_label_values(&[route])
                .observe(up.as_secs_f64());
        }
        if let Some(ttft) = streamed.ttft {
            m.time_to_first_token
                .with_label_values(&[route])
                .observe(ttft.as_secs_f64());
        }
        if let Some(per_token) = streamed.per_token {
            m.time_per_output_token
                .with_label_values(&[route])
                .observe(per_token.as_secs_f64());
        }
        let who = ctx.identity.as_ref();
        let key_id = who.and_then(|i| i.key_id.as_deref());
        let method = session.req_header().method.as_str();
        let trace_id = ctx.trace.as_ref().map(RequestTrace::trace_id);
        if let Some(trace) = ctx.trace.take() {
            trace.finish(&Finished {
                method,
                route: ctx.route.as_ref().map(|r| r.path.as_str()),
                status,
                tenant_id: who.map(|i| i.tenant.id.as_str()),
                plan: who.map(|i| i.tenant.plan.as_str()),
                key_id,
                request_id: &ctx.request_id,
                reject_code: ctx.reject_code,
                operation: ctx.route.as_ref().and_then(|r| r.api.operation()),
                request_model: ctx.judged.as_ref().map(|j| j.model.as_str()),
                max_tokens: ctx
                    .judged
                    .as_ref()
                    .map(|j| j.max_output_tokens)
                    .filter(|n| *n > 0),
                input_tokens: usage.map(|u| u.prompt_tokens),
                output_tokens: usage.map(|u| u.completion_tokens),
                response_model: ctx.usage_tap.as_ref().and_then(UsageTap::model),
            });
        }
        access_log::write(&AccessRecord {
            request_id: &ctx.request_id,
            tenant: who.map_or("-", |i| i.tenant.id.as_str()),
            key_id,
            route,
            model: ctx.judged.as_ref().map(|j| j.model.as_str()),
            method,
            status,
            reject_code: ctx.reject_code,
            gateway_ms: gateway.as_secs_f64() * 1e3,
            upstream_ms: ctx.upstream_elapsed.map(|d| d.as_secs_f64() * 1e3),
            prompt_tokens: usage.map(|u| u.prompt_tokens),
            completion_tokens: usage.map(|u| u.completion_tokens),
            cached_tokens: usage.map(|u| u.cached_tokens),
            reasoning_tokens: usage.map(|u| u.reasoning_tokens),
            cost,
            ttft_ms: streamed.ttft.map(|d| d.as_secs_f64() * 1e3),
            trace_id: trace_id.as_deref(),
            guardrails: ctx.guardrails.kinds(),
        });
    }
}

/// A stream's latencies as LLM users feel them: the time to its first
/// byte from the request's arrival, and the time per output token after
/// it (for streams whose usage counts more than one token).
struct Streamed {
    ttft: Option<Duration>,
    per_token: Option<Duration>,
}

impl Streamed {
    fn of(ctx: &RequestCtx, usage: Option<&crate::response::Usage>) -> Streamed {
        let first = ctx.first_byte.filter(|_| ctx.stream);
        let per_token = match (first, ctx.answer_end, usage) {
            (Some(first), Some(end), Some(u)) if u.completion_tokens > 1 => {
                let gaps = u32::try_from(u.completion_tokens - 1).unwrap_or(u32::MAX);
                Some(end.saturating_duration_since(first) / gaps)
            }
            _ => None,
        };
        Streamed {
            ttft: first.map(|t| t.saturating_duration_since(ctx.started)),
            per_token,
        }
    }
}

/// What the request does to the router's answer on its way back.
impl Answer for RequestCtx {
    fn request_head(&self, session: &Session) -> Result<RouterHead> {
        pipeline::router_head(session, self)
    }

    fn sent(&mut self) {
        if let Some(j) = &mut self.judged {
            j.body = Bytes::new();
        }
        self.body_lease = None;
    }

    fn head(&mut self, headers: &mut HeaderMap) -> Result<()> {
        self.upstream_elapsed = self.upstream_started.map(|t| t.elapsed());
        let is_sse = headers
            .get(CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        self.stream = is_sse;
        if let Some(other) = self.usage_tap.as_ref().and_then(|t| t.for_answer(is_sse)) {
            self.usage_tap = Some(other);
        }
        if self.usage_tap.as_ref().is_some_and(UsageTap::rewrites) {
            // The body may change length: let it be re-framed.
            headers.remove(CONTENT_LENGTH);
        }
        headers.insert(X_REQUEST_ID, header_value(self.request_id.clone())?);
        if self.guardrails.masked > 0 {
            headers.insert(PII_MASKED, HeaderValue::from(self.guardrails.masked));
        }
        rate_limit_headers(self, headers)
    }

    fn holds_body(&self) -> bool {
        self.usage_tap.as_ref().is_some_and(UsageTap::holds_body)
    }

    fn chunk(&mut self, chunk: Bytes) -> Bytes {
        if self.first_byte.is_none() && !chunk.is_empty() {
            self.first_byte = Some(Instant::now());
        }
        let (Some(tap), Some(who)) = (self.usage_tap.as_mut(), &self.identity) else {
            return chunk;
        };
        tap.push(
            chunk,
            false,
            &Binding::new(&self.snapshot.response_ids, &who.tenant.id),
        )
    }

    fn end(&mut self) -> Option<Bytes> {
        self.answer_end = Some(Instant::now());
        let (tap, who) = (self.usage_tap.as_mut()?, self.identity.as_ref()?);
        Some(tap.push(
            Bytes::new(),
            true,
            &Binding::new(&self.snapshot.response_ids, &who.tenant.id),
        ))
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

/// OpenAI's `x-ratelimit-*` headers on every authenticated response, and
/// Anthropic's `anthropic-ratelimit-*` beside them on its routes.
fn rate_limit_headers(ctx: &RequestCtx, headers: &mut HeaderMap) -> Result<()> {
    let state = match (&ctx.limits, &ctx.identity) {
        (Some(held), _) => held.rate_state(),
        (None, Some(who)) => local_rate_state(
            who.key_scope
                .iter()
                .chain([&who.tenant.limiter])
                .map(|s| &**s),
        ),
        (None, None) => return Ok(()),
    };
    for (name, value) in state.openai_headers() {
        headers.insert(name, header_value(value)?);
    }
    if ctx.route.as_ref().is_some_and(|r| r.api.anthropic()) {
        for (name, value) in state.anthropic_headers(SystemTime::now()) {
            headers.insert(name, header_value(value)?);
        }
    }
    Ok(())
}

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const PII_MASKED: HeaderName = HeaderName::from_static("x-portcullis-pii-masked");

/// A header value the gateway made; it takes the string's bytes as they
/// are, so one that could break the head is an error, never sent.
fn header_value(value: String) -> Result<HeaderValue> {
    HeaderValue::try_from(value).or_err(ErrorType::InvalidHTTPHeader, "gateway header value")
}

/// The error shape of the request's route: known once identity has run,
/// else looked up by path, so a 401 on `/v1/messages` is Anthropic's too.
fn error_shape(session: &Session, ctx: &RequestCtx) -> ErrorShape {
    let anthropic = match &ctx.route {
        Some(route) => route.api.anthropic(),
        None => ctx
            .snapshot
            .routes
            .lookup(session.req_header().uri.path())
            .is_some_and(|r| r.api.anthropic()),
    };
    if anthropic {
        ErrorShape::Anthropic
    } else {
        ErrorShape::OpenAi
    }
}
