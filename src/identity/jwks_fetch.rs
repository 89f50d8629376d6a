//! JWKS from a URL, refreshed in the background.
//!
//! One task does every fetch, so fetches are single-flight by construction.
//! A failed or invalid fetch keeps the last good key set. An unknown `kid`
//! asks for an early refresh, but at most once per `min_gap`, so a
//! flood of forged `kid`s cannot turn the gateway against the IdP.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::BytesMut;
use jsonwebtoken::Algorithm;
use pingora::connectors::http::Connector;
use pingora::http::RequestHeader;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::upstreams::peer::HttpPeer;

use super::jwks::KeySet;
use crate::http_client;

const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Keeps a key set fresh from a JWKS URL.
pub struct JwksRefresh {
    source: String,
    url: http::Uri,
    keys: Arc<ArcSwap<KeySet>>,
    algorithms: Vec<Algorithm>,
    interval: Duration,
    /// The shortest time between two fetches triggered by unknown `kid`s.
    min_gap: Duration,
    wake: tokio::sync::Notify,
}

impl JwksRefresh {
    pub fn new(
        url: &str,
        keys: Arc<ArcSwap<KeySet>>,
        algorithms: Vec<Algorithm>,
        interval: Duration,
        min_gap: Duration,
    ) -> Result<Self, String> {
        let source = url.to_string();
        let url: http::Uri = url.parse().map_err(|e| format!("jwks_url: {e}"))?;
        if url.host().is_none() {
            return Err("jwks_url has no host".into());
        }
        Ok(JwksRefresh {
            source,
            url,
            keys,
            algorithms,
            interval,
            min_gap,
            wake: tokio::sync::Notify::new(),
        })
    }

    /// The URL as configured.
    pub fn url(&self) -> &str {
        &self.source
    }

    /// The key set this task keeps fresh.
    pub fn keys(&self) -> Arc<ArcSwap<KeySet>> {
        self.keys.clone()
    }

    /// Asks for an early refresh; cheap, and rate-limited by the fetch loop.
    pub fn request(&self) {
        self.wake.notify_one();
    }

    /// Fetches once and installs the result if it parses.
    pub async fn refresh(&self) -> Result<usize, String> {
        let body = tokio::time::timeout(FETCH_TIMEOUT, self.fetch())
            .await
            .map_err(|_| "timed out".to_string())??;
        let set = KeySet::from_json(&body, &self.algorithms)?;
        let n = set.len();
        self.keys.store(Arc::new(set));
        Ok(n)
    }

    async fn fetch(&self) -> Result<BytesMut, String> {
        let tls = self.url.scheme_str() == Some("https");
        let host = self.url.host().unwrap_or_default();
        let port = self.url.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let addr = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("resolving {host}: {e}"))?
            .next()
            .ok_or_else(|| format!("{host} has no address"))?;
        let peer = HttpPeer::new(addr, tls, host.to_string());
        let path = self.url.path_and_query().map_or("/", |p| p.as_str());
        let mut req = RequestHeader::build("GET", path.as_bytes(), None)
            .map_err(|e| format!("request: {e}"))?;
        let host_header = match self.url.port_u16() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        req.insert_header("host", host_header)
            .and_then(|_| req.insert_header("accept", "application/json"))
            .map_err(|e| format!("request: {e}"))?;
        let (resp, body) = http_client::call(&Connector::new(None), &peer, req, MAX_JWKS_BYTES)
            .await
            .map_err(|e| match e {
                http_client::CallError::TooLarge(_) => "JWKS larger than 1 MiB".to_string(),
                e => e.to_string(),
            })?;
        let status = resp.status.as_u16();
        if status != 200 {
            return Err(format!("status {status}"));
        }
        Ok(body)
    }
}

/// The background task that runs the refresh loop for the server's life.
pub struct JwksRefreshService(pub Arc<JwksRefresh>);

#[async_trait]
impl BackgroundService for JwksRefreshService {
    /// Fetches at once, then every `interval`, or earlier when an unknown
    /// `kid` asks and the last fetch is at least `min_gap` old.
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let r = &self.0;
        loop {
            let last = Instant::now();
            match r.refresh().await {
                Ok(n) => tracing::info!(keys = n, "JWKS refreshed"),
                Err(e) => {
                    tracing::warn!(error = %e, "JWKS refresh failed; keeping the last good key set")
                }
            }
            let next = tokio::time::Instant::from_std(last + r.interval);
            loop {
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep_until(next) => break,
                    _ = r.wake.notified() => {
                        if last.elapsed() >= r.min_gap {
                            break;
                        }
                    }
                }
            }
        }
    }
}
