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

use super::OnBackendError;
use super::TenantLimiter;
use crate::observe::metrics::METRICS;
use crate::reject::{Reject, RejectCode};
use crate::tenant::Tenant;

/// Every request cell and a concurrency slot in one round trip.
/// `KEYS[1..n-1]` are GCRA cells, `KEYS[n]` the slot set; `ARGV` is
/// `{max_concurrency, slot_id, slot_ttl_ms, unit_us, cap_us, ...}`.
/// Returns `{status, retry_after_us, backlog_us}` (of the first cell):
/// 1 admitted, 0 rate, 2 concurrency.
const ADMIT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cells = #KEYS - 1
local news, first = {}, 0
for i = 1, cells do
  local unit, cap = tonumber(ARGV[2 + 2 * i]), tonumber(ARGV[3 + 2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  if i == 1 then first = tat end
  local new = tat + unit
  if new - now > cap then
    return {0, math.ceil(new - now - cap), math.floor(first - now)}
  end
  news[i] = new
end
local slots = KEYS[#KEYS]
redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
if redis.call('ZCARD', slots) >= tonumber(ARGV[1]) then
  return {2, 1000000, math.floor(first - now)}
end
for i = 1, cells do
  redis.call('SET', KEYS[i], string.format('%.0f', news[i]), 'PX', math.ceil((news[i] - now) / 1000) + 1000)
end
redis.call('ZADD', slots, now + tonumber(ARGV[3]) * 1000, ARGV[2])
redis.call('PEXPIRE', slots, ARGV[3])
return {1, 0, math.floor(news[1] - now)}
"#;

/// Reserves `ARGV[1]` tokens from every cell in `KEYS`, or from none;
/// `ARGV` goes on with `{unit_us, cap_us}` per cell. Returns
/// `{status, retry_after_us, backlog_us}` (of the first cell).
const RESERVE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n = tonumber(ARGV[1])
local news = {}
for i = 1, #KEYS do
  local unit, cap = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  local new = tat + unit * n
  if new - now > cap then
    return {0, math.ceil(new - now - cap), 0}
  end
  news[i] = new
end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], string.format('%.0f', news[i]), 'PX', math.ceil((news[i] - now) / 1000) + 1000)
end
return {1, 0, math.floor(news[1] - now)}
"#;

/// Moves every cell in `KEYS` by its signed amount of cell time in `ARGV`
/// (refund < 0, shortfall > 0; a charge may overdraw).
const SETTLE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i = 1, #KEYS do
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
        let moves: Vec<(String, f64)> = self
            .tenant
            .token_budgets()
            .iter()
            .map(|b| {
                let delta = (used as f64 - self.tokens as f64) * b.rate.unit_ns / 1000.0;
                (key(&self.id, b.kind.key()), delta)
            })
            .collect();
        let backend = self.backend;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let mut script = backend.settle.prepare_invoke();
                for (k, delta) in &moves {
                    script.key(k).arg(delta);
                }
                let _ = backend
                    .call(|mut c| async move { script.invoke_async::<i64>(&mut c).await })
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
                RejectCode::GatewayOverloaded,
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
        let inflight = key(&tenant.id, "inflight");
        let mut script = self.admit.prepare_invoke();
        script
            .arg(tenant.limits.max_concurrency)
            .arg(request_id)
            .arg(SLOT_TTL.as_millis() as u64);
        for b in l.request_budgets() {
            script
                .key(key(&tenant.id, b.kind.key()))
                .arg(b.rate.unit_ns / 1000.0)
                .arg(b.rate.capacity_ns as f64 / 1000.0);
        }
        script.key(&inflight);
        let reply: Option<(u8, u64, u64)> = self
            .call(|mut c| async move { script.invoke_async(&mut c).await })
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
                RejectCode::RateLimitExceeded,
                "request rate limit reached",
                retry,
                backlog_us.saturating_mul(1000),
                0,
            )),
            _ => Err(l.too_many_with(
                RejectCode::ConcurrencyLimitExceeded,
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
        let mut script = self.reserve.prepare_invoke();
        script.arg(tokens);
        for b in l.token_budgets() {
            script
                .key(key(&tenant.id, b.kind.key()))
                .arg(b.rate.unit_ns / 1000.0)
                .arg(b.rate.capacity_ns as f64 / 1000.0);
        }
        let reply: Option<(u8, u64, u64)> = self
            .call(|mut c| async move { script.invoke_async(&mut c).await })
            .await;
        let Some((status, retry_us, backlog_us)) = reply else {
            return self.unavailable();
        };
        if status != 1 {
            return Err(l.too_many_with(
                RejectCode::TokensQuotaExceeded,
                "token budget reached",
                Duration::from_micros(retry_us),
                0,
                l.token_budgets().first().map_or(0, |b| b.rate.capacity_ns),
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
