//! The fleet backend: the same GCRA cells and concurrency slots, kept in
//! Redis so every gateway instance enforces one shared quota.
//!
//! Each check is one atomic Lua script using Redis's own clock: one round
//! trip for the header stage (rate plus concurrency slot), one to reserve
//! tokens, one to settle them. Keys are `portcullis:{tenant}:…`, hash-tagged
//! by tenant, and expire once their state would be back to idle.
//!
//! A call that errors or outlasts `redis_timeout_ms` opens a circuit
//! breaker: until a background probe sees Redis answer again, requests do
//! not wait on it and `on_backend_error` decides (per-instance limits,
//! allow, or 503).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use redis::aio::ConnectionManager;
use redis::Script;
use tokio::sync::OnceCell;

use super::TenantLimiter;
use crate::config::gateway::OnBackendError;
use crate::config::tenants::Tenant;
use crate::observe::metrics::METRICS;
use crate::reject::Reject;

/// Rate and concurrency in one round trip. Returns
/// `{status, retry_after_us, backlog_us}`: 1 admitted, 0 rate, 2 concurrency.
const ADMIT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local unit, cap = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new = tat + unit
if new - now > cap then
  return {0, math.ceil(new - now - cap), math.floor(tat - now)}
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then
  return {2, 1000000, math.floor(tat - now)}
end
redis.call('SET', KEYS[1], string.format('%.0f', new), 'PX', math.ceil((new - now) / 1000) + 1000)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]) * 1000, ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return {1, 0, math.floor(new - now)}
"#;

/// Reserves tokens from the minute and day cells together. Returns
/// `{status, retry_after_us, minute_backlog_us}`.
const RESERVE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[5])
local news = {}
for i = 1, 2 do
  local unit, cap = tonumber(ARGV[2 * i - 1]), tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  local new = tat + unit * n
  if new - now > cap then
    return {0, math.ceil(new - now - cap), 0}
  end
  news[i] = new
end
for i = 1, 2 do
  redis.call('SET', KEYS[i], string.format('%.0f', news[i]), 'PX', math.ceil((news[i] - now) / 1000) + 1000)
end
return {1, 0, math.floor(news[1] - now)}
"#;

/// Moves both token cells by a signed amount of cell time (refund < 0,
/// shortfall > 0; a charge may overdraw).
const SETTLE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i = 1, 2 do
  local delta = tonumber(ARGV[i])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if delta > 0 and tat < now then tat = now end
  local new = tat + delta
  if new > now then
    redis.call('SET', KEYS[i], string.format('%.0f', new), 'PX', math.ceil((new - now) / 1000) + 1000)
  else
    redis.call('DEL', KEYS[i])
  end
end
return 1
"#;

/// How long a concurrency slot lives in Redis if its gateway never frees
/// it (a crash); a normal request frees it when it ends.
const SLOT_TTL: Duration = Duration::from_secs(600);
const PROBE_EVERY: Duration = Duration::from_millis(250);

/// The shared limits backend.
pub struct RedisLimits {
    client: redis::Client,
    conn: OnceCell<ConnectionManager>,
    timeout: Duration,
    on_error: OnBackendError,
    /// Open: Redis failed and has not answered a probe since.
    open: AtomicBool,
    admit: Script,
    reserve: Script,
    settle: Script,
}

/// What the backend decided, when it did not refuse.
pub enum Decision<T> {
    /// Admitted by Redis, with the cell's backlog (ns) for the headers.
    Shared(T, u64),
    /// Redis is unavailable: use this instance's limiter.
    Local,
    /// Redis is unavailable and `on_backend_error = "open"`: allow.
    Unlimited,
}

/// A concurrency slot held in Redis, freed when dropped.
pub struct RemoteSlot {
    backend: Arc<RedisLimits>,
    key: String,
    id: String,
}

impl Drop for RemoteSlot {
    fn drop(&mut self) {
        let backend = self.backend.clone();
        let (key, id) = (std::mem::take(&mut self.key), std::mem::take(&mut self.id));
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let mut cmd = redis::cmd("ZREM");
                cmd.arg(&key).arg(&id);
                // A slot that cannot be freed expires with SLOT_TTL.
                let _ = backend
                    .call(|mut c| async move { cmd.query_async::<i64>(&mut c).await })
                    .await;
            });
        }
    }
}

/// Tokens reserved in Redis, settled with the real usage.
pub struct RemoteReservation {
    backend: Arc<RedisLimits>,
    tenant: Arc<TenantLimiter>,
    id: String,
    tokens: u64,
}

impl RemoteReservation {
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Settles in the background; the response is not held for it.
    pub fn settle(self, used: u64) {
        if used == self.tokens {
            return;
        }
        let (m, d) = (self.tenant.minute_rate, self.tenant.day_rate);
        let delta = |unit_ns: f64| (used as f64 - self.tokens as f64) * unit_ns / 1000.0;
        let (dm, dd) = (delta(m.unit_ns), delta(d.unit_ns));
        let keys = [key(&self.id, "tpm"), key(&self.id, "tpd")];
        let backend = self.backend;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let script = backend.settle.clone();
                let _ = backend
                    .call(|mut c| async move {
                        script
                            .key(&keys[0])
                            .key(&keys[1])
                            .arg(dm)
                            .arg(dd)
                            .invoke_async::<i64>(&mut c)
                            .await
                    })
                    .await;
            });
        }
    }
}

fn key(tenant: &str, what: &str) -> String {
    format!("portcullis:{{{tenant}}}:{what}")
}

impl RedisLimits {
    pub fn new(url: &str, timeout: Duration, on_error: OnBackendError) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| format!("redis_url: {e}"))?;
        Ok(RedisLimits {
            client,
            conn: OnceCell::new(),
            timeout,
            on_error,
            open: AtomicBool::new(false),
            admit: Script::new(ADMIT),
            reserve: Script::new(RESERVE),
            settle: Script::new(SETTLE),
        })
    }

    /// Runs one Redis call within the timeout; any failure opens the breaker.
    async fn call<T, F, Fut>(&self, f: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let attempt = async {
            let conn = self
                .conn
                .get_or_try_init(|| async {
                    let cfg = redis::aio::ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(self.timeout))
                        .set_response_timeout(Some(self.timeout))
                        .set_number_of_retries(1);
                    ConnectionManager::new_lazy_with_config(self.client.clone(), cfg)
                })
                .await?
                .clone();
            f(conn).await
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.trip(&e.to_string());
                None
            }
            Err(_) => {
                self.trip("timed out");
                None
            }
        }
    }

    fn trip(&self, why: &str) {
        METRICS.limiter_backend_errors.inc();
        if !self.open.swap(true, Ordering::AcqRel) {
            tracing::warn!(error = why, "limits backend unavailable; circuit open");
        }
    }

    fn unavailable<T>(&self) -> Result<Decision<T>, Reject> {
        match self.on_error {
            OnBackendError::Local => Ok(Decision::Local),
            OnBackendError::Open => Ok(Decision::Unlimited),
            OnBackendError::Closed => Err(Reject::new(
                503,
                "gateway_overloaded",
                "the limits backend is unavailable; retry shortly",
            )
            .with_header("retry-after", "1")),
        }
    }

    /// Header stage: the request rate and a concurrency slot, atomically.
    pub async fn admit(
        self: &Arc<Self>,
        tenant: &Tenant,
        request_id: &str,
    ) -> Result<Decision<RemoteSlot>, Reject> {
        if self.open.load(Ordering::Acquire) {
            return self.unavailable();
        }
        let l = &tenant.limiter;
        let r = l.request_rate;
        let inflight = key(&tenant.id, "inflight");
        let script = self.admit.clone();
        let reply: Option<(u8, u64, u64)> = self
            .call(|mut c| {
                let (req, inflight, id) = (
                    key(&tenant.id, "req"),
                    inflight.clone(),
                    request_id.to_string(),
                );
                async move {
                    script
                        .key(req)
                        .key(inflight)
                        .arg(r.unit_ns / 1000.0)
                        .arg(r.capacity_ns as f64 / 1000.0)
                        .arg(tenant.limits.max_concurrency)
                        .arg(id)
                        .arg(SLOT_TTL.as_millis() as u64)
                        .invoke_async(&mut c)
                        .await
                }
            })
            .await;
        let Some((status, retry_us, backlog_us)) = reply else {
            return self.unavailable();
        };
        let retry = Duration::from_micros(retry_us);
        match status {
            1 => Ok(Decision::Shared(
                RemoteSlot {
                    backend: self.clone(),
                    key: inflight,
                    id: request_id.to_string(),
                },
                backlog_us.saturating_mul(1000),
            )),
            0 => Err(l.too_many_with(
                "rate_limit_exceeded",
                "request rate limit reached",
                retry,
                backlog_us.saturating_mul(1000),
                0,
            )),
            _ => Err(l.too_many_with(
                "concurrency_limit_exceeded",
                "too many requests in flight for this tenant",
                retry,
                backlog_us.saturating_mul(1000),
                0,
            )),
        }
    }

    /// Reserves tokens in both budgets.
    pub async fn reserve(
        self: &Arc<Self>,
        tenant: &Tenant,
        tokens: u64,
    ) -> Result<Decision<RemoteReservation>, Reject> {
        if self.open.load(Ordering::Acquire) {
            return self.unavailable();
        }
        let l = &tenant.limiter;
        let (m, d) = (l.minute_rate, l.day_rate);
        let script = self.reserve.clone();
        let reply: Option<(u8, u64, u64)> = self
            .call(|mut c| {
                let keys = [key(&tenant.id, "tpm"), key(&tenant.id, "tpd")];
                async move {
                    script
                        .key(&keys[0])
                        .key(&keys[1])
                        .arg(m.unit_ns / 1000.0)
                        .arg(m.capacity_ns as f64 / 1000.0)
                        .arg(d.unit_ns / 1000.0)
                        .arg(d.capacity_ns as f64 / 1000.0)
                        .arg(tokens)
                        .invoke_async(&mut c)
                        .await
                }
            })
            .await;
        let Some((status, retry_us, backlog_us)) = reply else {
            return self.unavailable();
        };
        if status != 1 {
            return Err(l.too_many_with(
                "tokens_quota_exceeded",
                "token budget reached",
                Duration::from_micros(retry_us),
                0,
                m.capacity_ns,
            ));
        }
        Ok(Decision::Shared(
            RemoteReservation {
                backend: self.clone(),
                tenant: l.clone(),
                id: tenant.id.clone(),
                tokens,
            },
            backlog_us.saturating_mul(1000),
        ))
    }
}

/// Probes Redis while the breaker is open and closes it once Redis answers.
pub struct BreakerProbe(pub Arc<RedisLimits>);

#[async_trait]
impl BackgroundService for BreakerProbe {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(PROBE_EVERY) => {}
            }
            let b = &self.0;
            if !b.open.load(Ordering::Acquire) {
                continue;
            }
            let pong = tokio::time::timeout(b.timeout, async {
                let mut c = b.client.get_multiplexed_async_connection().await?;
                redis::cmd("PING").query_async::<String>(&mut c).await
            })
            .await;
            if matches!(pong, Ok(Ok(_))) {
                b.open.store(false, Ordering::Release);
                tracing::info!("limits backend answers again; circuit closed");
            }
        }
    }
}
