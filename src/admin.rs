//! The admin listener: `/healthz` (the process answers), `/readyz` (it has
//! a healthy router to send to; it reports the config generation) and
//! `/metrics` (Prometheus text).
//!
//! It runs as its own Pingora service, so it keeps answering while the
//! proxy listeners are saturated.

use std::sync::Arc;

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::ServeHttp;
use pingora::lb::selection::RoundRobin;
use pingora::lb::LoadBalancer;
use pingora::protocols::http::ServerSession;

use crate::config::reload::Reloader;
use crate::observe::metrics;

pub struct Admin {
    pub balancer: Arc<LoadBalancer<RoundRobin>>,
    pub reloader: Arc<Reloader>,
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let (status, ctype, body) = match session.req_header().uri.path() {
            "/healthz" => (200, "text/plain", b"ok\n".to_vec()),
            "/readyz" => {
                let generation = self.reloader.generation();
                let (status, mut text) = if self.balancer.select(b"", 256).is_some() {
                    (200, format!("ready generation={generation}\n"))
                } else {
                    (503, format!("no healthy router generation={generation}\n"))
                };
                let pending = self.reloader.restart_needed();
                if !pending.is_empty() {
                    text.push_str(&format!("restart needed: {}\n", pending.join(", ")));
                }
                (status, "text/plain", text.into_bytes())
            }
            "/metrics" => (200, "text/plain; version=0.0.4", metrics::render()),
            _ => (404, "text/plain", b"not found\n".to_vec()),
        };
        Response::builder()
            .status(status)
            .header("content-type", ctype)
            .header("content-length", body.len())
            .body(body)
            .unwrap_or_default()
    }
}
