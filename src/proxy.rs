//! The Pingora wiring: each hook hands its facts to a stage and acts on the
//! decision. No policy lives here.
//!
//! Everything decidable from the request head is decided in
//! `request_filter`, before an upstream connection exists, so a rejected
//! request never reaches the router.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, Result};
use rand::RngCore;

use crate::authz::{self, Route};
use crate::config::{SharedSnapshot, Snapshot};
use crate::forward::upstream::Upstream;
use crate::forward::{self, TrustedContext};
use crate::identity::{self, Identity};
use crate::inbound;
use crate::observe::access_log::{self, AccessRecord};
use crate::observe::metrics::METRICS;
use crate::reject::Reject;

/// The gateway's `ProxyHttp` implementation.
pub struct Gateway {
    pub snapshot: SharedSnapshot,
    pub upstream: Upstream,
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
        let req = session.req_header();
        inbound::check(&req.headers, || {
            let down = session.as_downstream();
            down.as_http1().map(|_| down.to_h1_raw())
        })?;
        let snap = &ctx.snapshot;
        let cred = identity::credential(&req.headers)?;
        let who = snap.auth.authenticate(&snap.tenants, cred, unix_now())?;
        let route = authz::admit(
            &who.tenant,
            &req.method,
            req.uri.path(),
            &snap.gateway.server.region,
        );
        ctx.identity = Some(who);
        let route = route?;
        ctx.route = Some(route);
        match (route, &ctx.identity) {
            (Route::Models, Some(who)) => Ok(Admitted::Respond(authz::models_body(&who.tenant))),
            _ => Ok(Admitted::Proxy),
        }
    }

    /// Writes a JSON response that ends the request at the gateway.
    async fn respond(
        &self,
        session: &mut Session,
        ctx: &RequestCtx,
        status: u16,
        body: Vec<u8>,
        extra: &[(&'static str, String)],
    ) -> Result<()> {
        let mut resp = ResponseHeader::build(status, Some(4 + extra.len()))?;
        resp.insert_header("content-type", "application/json")?;
        resp.insert_header("content-length", body.len().to_string())?;
        resp.insert_header("x-request-id", ctx.request_id.as_str())?;
        if status == 401 {
            resp.insert_header("www-authenticate", "Bearer error=\"invalid_token\"")?;
        }
        for (name, value) in extra {
            resp.insert_header(*name, value.as_str())?;
        }
        session.write_response_header(Box::new(resp), false).await?;
        session
            .write_response_body(Some(Bytes::from(body)), true)
            .await
    }

    async fn reject(&self, session: &mut Session, ctx: &mut RequestCtx, r: &Reject) -> Result<()> {
        ctx.reject_code = Some(r.code);
        if r.status == 400 {
            // After a framing or header error the connection's state is suspect.
            session.set_keepalive(None);
        }
        self.respond(session, ctx, r.status, r.body(), &r.headers)
            .await
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
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        match self.admit(session, ctx) {
            Ok(Admitted::Proxy) => Ok(false),
            Ok(Admitted::Respond(body)) => {
                self.respond(session, ctx, 200, body, &[]).await?;
                Ok(true)
            }
            Err(r) => {
                self.reject(session, ctx, &r).await?;
                Ok(true)
            }
        }
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        ctx.upstream_started = Some(Instant::now());
        self.upstream.peer()
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
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
            client_ip: &client_ip,
            proto,
        };
        forward::apply(upstream_request, &trusted, &ctx.snapshot.signer, unix_now())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.upstream_elapsed = ctx.upstream_started.map(|t| t.elapsed());
        upstream_response.insert_header("x-request-id", ctx.request_id.as_str())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy
    where
        Self::CTX: Send + Sync,
    {
        let reject = match (e.esource(), e.etype()) {
            (
                _,
                ErrorType::ConnectNoRoute
                | ErrorType::ConnectRefused
                | ErrorType::ConnectTimedout
                | ErrorType::ConnectError
                | ErrorType::TLSHandshakeFailure,
            ) => Some(Reject::new(
                502,
                "upstream_unavailable",
                "the router is unavailable",
            )),
            (_, ErrorType::HTTPStatus(400))
            | (ErrorSource::Downstream, ErrorType::InvalidHTTPHeader) => {
                Some(Reject::bad_request("invalid_request", "malformed request"))
            }
            (_, ErrorType::ReadTimedout | ErrorType::WriteTimedout)
                if e.esource() == &ErrorSource::Upstream =>
            {
                Some(Reject::new(
                    504,
                    "upstream_timeout",
                    "the router did not answer in time",
                ))
            }
            (ErrorSource::Upstream, _) => Some(Reject::new(
                502,
                "upstream_unavailable",
                "the router is unavailable",
            )),
            (ErrorSource::Downstream, _) => None,
            _ => Some(Reject::new(500, "internal_error", "internal gateway error")),
        };
        let code = match reject {
            Some(r) if session.response_written().is_none() => {
                let status = r.status;
                if let Err(err) = self.reject(session, ctx, &r).await {
                    tracing::debug!(error = %err, "could not send the error response");
                }
                status
            }
            // Too late for a clean error: the client sees the stream cut.
            Some(r) => {
                ctx.reject_code = Some(r.code);
                r.status
            }
            None => 0,
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let tenant = Self::tenant_label(ctx);
        let route = ctx.route.map_or("-", Route::label);
        let total = ctx.started.elapsed();
        let gateway = total.saturating_sub(ctx.upstream_elapsed.unwrap_or_default());
        let m = &*METRICS;
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
            method: session.req_header().method.as_str(),
            status,
            reject_code: ctx.reject_code,
            gateway_ms: gateway.as_secs_f64() * 1e3,
            upstream_ms: ctx.upstream_elapsed.map(|d| d.as_secs_f64() * 1e3),
        });
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
