//! The fleet backend: the same GCRA cells, concurrency slots and money
//! windows, kept in Redis (one server or a Redis Cluster) so every gateway
//! instance enforces one shared quota.
//!
//! Each stage is one atomic Lua script over every scope of the request
//! (key, model, tenant), using Redis's own clock: one round trip for the
//! header stage (rates and slots), one to reserve tokens and money, one to
//! settle them and free the slots together. Keys are
//! `portcullis:{tenant}:[key:<id>:|model:<pattern>:]<cell>`: the hash tag
//! `{tenant}` puts all of a tenant's keys in one cluster slot, so a script
//! never spans nodes. They expire once their state would be back to idle.
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
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{RedisFuture, Script};
use tokio::sync::OnceCell;

use super::quota::Standing;
use super::scope::{Refusal, Refused};
use super::{unix_now, Ask, Budget, CellState, LimitKind, OnBackendError, RateState, ScopeLimiter};
use crate::observe::metrics::METRICS;
use crate::reject::{Reject, RejectCode};

/// Every cell one stage asks of, across the request's scopes, checked in
/// the order given and applied only if all of them fit: a refusal takes
/// nothing from any scope. `ARGV` is `{slot_id, slot_ttl_ms}` and then four
/// values per key: a type and its arguments.
/// - `g` a GCRA cell: cost and capacity in µs;
/// - `s` a concurrency slot set: the most slots;
/// - `m` a money window: cost and budget in nano-units, and its expiry;
/// - `G`, `S`, `M` the same cells only read, after the others are applied
///   (the quota answer).
///
/// Returns `{refused, retry_after_us, value...}`: `refused` is the 1-based
/// index of the first key that refused (0 when all fit), then one value
/// per key, after the stage when it was admitted, as it stands when it was
/// refused: a cell's backlog in µs, a slot count, a spend.
const TAKE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local id, ttl = ARGV[1], tonumber(ARGV[2])
local refused, retry = 0, 0
local news, olds = {}, {}
local function gcra(key)
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  return tat
end
-- Slots still held; those of a gateway that died (past their expiry) are
-- purged only when they would make the difference.
local function slots(key, max)
  local n = redis.call('ZCOUNT', key, now, '+inf')
  if n >= max and redis.call('ZCARD', key) > n then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  end
  return n
end
local function spent(key)
  return tonumber(redis.call('GET', key)) or 0
end
for i = 1, #KEYS do
  local a = 3 + (i - 1) * 4
  local kind, x, y = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  if kind == 'g' then
    olds[i] = gcra(KEYS[i])
    news[i] = olds[i] + x
    if refused == 0 and news[i] - now > y then
      refused, retry = i, math.ceil(news[i] - now - y)
    end
  elseif kind == 's' then
    olds[i] = slots(KEYS[i], x)
    if refused == 0 and olds[i] >= x then
      refused, retry = i, 1000000
    end
  elseif kind == 'm' then
    olds[i] = spent(KEYS[i])
    if refused == 0 and olds[i] + x > y then
      refused = i
    end
  end
end
local out = {refused, retry}
for i = 1, #KEYS do
  local a = 3 + (i - 1) * 4
  local kind = ARGV[a]
  local v
  if kind == 'g' then
    v = olds[i]
    if refused == 0 then
      v = news[i]
      redis.call('SET', KEYS[i], string.format('%.0f', v), 'PX', math.ceil((v - now) / 1000) + 1000)
    end
    v = v - now
  elseif kind == 's' then
    v = olds[i]
    if refused == 0 then
      redis.call('ZADD', KEYS[i], now + ttl * 1000, id)
      redis.call('PEXPIRE', KEYS[i], ttl)
      v = v + 1
    end
  elseif kind == 'm' then
    v = olds[i]
    if refused == 0 then
      v = redis.call('INCRBY', KEYS[i], ARGV[a + 1])
      if v == tonumber(ARGV[a + 1]) then
        redis.call('EXPIREAT', KEYS[i], ARGV[a + 3])
      end
    end
  elseif kind == 'G' then
    v = gcra(KEYS[i]) - now
  elseif kind == 'S' then
    v = redis.call('ZCOUNT', KEYS[i], now, '+inf')
  else
    v = spent(KEYS[i])
  end
  out[#out + 1] = math.floor(v)
end
return out
"#;

/// Settles a reservation and frees the request's slots together. `ARGV`
/// holds two values per key:
/// - `g` a GCRA cell and its signed move in µs (a refund below zero, a
///   shortfall above, which may overdraw);
/// - `m` a money window and its signed move in nano-units;
/// - `s` a slot set and the slot to free.
const SETTLE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i = 1, #KEYS do
  local kind, v = ARGV[2 * i - 1], ARGV[2 * i]
  if kind == 's' then
    redis.call('ZREM', KEYS[i], v)
  elseif kind == 'm' then
    if redis.call('EXISTS', KEYS[i]) == 1 then
      redis.call('INCRBY', KEYS[i], v)
    end
  else
    local delta = tonumber(v)
    local tat = tonumber(redis.call('GET', KEYS[i])) or now
    if delta > 0 and tat < now then tat = now end
    local new = tat + delta
    if new > now then
      redis.call('SET', KEYS[i], string.format('%.0f', new), 'PX', math.ceil((new - now) / 1000) + 1000)
    else
      redis.call('DEL', KEYS[i])
    end
  end
end
return 1
"#;

/// How long a concurrency slot lives in Redis if its gateway never frees
/// it (a crash); a normal request frees it when it ends.
const SLOT_TTL: Duration = Duration::from_secs(600);
const PROBE_EVERY: Duration = Duration::from_millis(250);

/// Where Redis is: one server, or a Redis Cluster's seed nodes.
pub enum Nodes {
    One(redis::Client),
    /// Boxed: it is over twice a client's size, and built once.
    Cluster(Box<ClusterClient>),
}

impl Nodes {
    /// `redis://…` (or `rediss://`, `unix://`) for one server;
    /// `redis+cluster://host:port,host:port` for a cluster, whose nodes are
    /// found from the seeds. Every key of a tenant shares the hash tag
    /// `{tenant}`, so each script runs on one node.
    pub fn parse(url: &str, timeout: Duration) -> Result<Nodes, String> {
        match url.strip_prefix("redis+cluster://") {
            None => redis::Client::open(url)
                .map(Nodes::One)
                .map_err(|e| format!("redis_url: {e}")),
            Some(seeds) => {
                let seeds: Vec<String> = seeds
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| format!("redis://{s}"))
                    .collect();
                if seeds.is_empty() {
                    return Err("redis_url: redis+cluster:// names no node".into());
                }
                ClusterClient::builder(seeds)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    .retries(1)
                    .build()
                    .map(|c| Nodes::Cluster(Box::new(c)))
                    .map_err(|e| format!("redis_url: {e}"))
            }
        }
    }
}

/// A connection to either kind, cheap to clone (both multiplex).
#[derive(Clone)]
enum Conn {
    One(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> RedisFuture<'a, redis::Value> {
        match self {
            Conn::One(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::One(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::One(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// The shared limits backend.
pub struct RedisLimits {
    nodes: Nodes,
    conn: OnceCell<Conn>,
    timeout: Duration,
    on_error: OnBackendError,
    /// Open: Redis failed and has not answered a probe since.
    open: AtomicBool,
    take: Script,
    settle: Script,
}

/// What the backend decided.
pub enum Decision {
    /// Admitted by Redis: what it now holds, and the cells' standing.
    Shared(Granted),
    /// Refused by Redis, with the standing for the headers.
    Refused(Refusal, FleetCells),
    /// Redis is unavailable: use this instance's limiter.
    Local,
    /// Redis is unavailable and `on_backend_error = "open"`: allow.
    Unlimited,
    /// Redis is unavailable and `on_backend_error = "closed"`: 503.
    Closed(Reject),
}

pub struct Granted {
    pub hold: FleetHold,
    pub cells: FleetCells,
    /// The scopes asked to be read, after the stage.
    pub standings: Vec<Standing>,
}

/// The standing of the GCRA cells one answer reported.
#[derive(Debug, Clone, Default)]
pub struct FleetCells {
    pub requests: Vec<CellState>,
    pub tokens: Vec<CellState>,
}

impl FleetCells {
    /// The headers' figures: the tightest cells Redis reported, with the
    /// token cells read as full when this request has not reserved yet.
    pub fn rate_state<'a>(
        &self,
        tokens_known: bool,
        scopes: impl Iterator<Item = &'a ScopeLimiter>,
    ) -> RateState {
        let idle: Vec<CellState> = if tokens_known {
            Vec::new()
        } else {
            scopes.flat_map(|s| &s.tokens).map(|b| b.state(0)).collect()
        };
        let tokens = if tokens_known { &self.tokens } else { &idle };
        RateState::of(self.requests.iter().copied(), tokens.iter().copied())
    }
}

/// What Redis holds for one request: its slots, and the cells of its
/// reservation, to settle and free together when the request ends.
pub struct FleetHold {
    backend: Arc<RedisLimits>,
    slot_id: String,
    slots: Vec<String>,
    /// Token cells with their cost per token (µs).
    tokens: Vec<(String, f64)>,
    money: Vec<String>,
}

impl FleetHold {
    /// Adds what a later stage took.
    pub fn absorb(&mut self, other: FleetHold) {
        self.slots.extend(other.slots);
        self.tokens.extend(other.tokens);
        self.money.extend(other.money);
    }

    /// One script, in the background (the response is not held for it):
    /// the reservation moved from `reserved` to `used` (tokens, cost), and
    /// every slot freed. With nothing reserved, only the slots.
    pub fn settle_and_release(self, reserved: Option<(u64, u64)>, used: (u64, u64)) {
        let mut keys: Vec<(String, &'static str, String)> = Vec::new();
        if let Some((tokens, cost)) = reserved {
            let delta = used.0 as f64 - tokens as f64;
            if delta != 0.0 {
                for (k, unit_us) in &self.tokens {
                    keys.push((k.clone(), "g", format!("{}", delta * unit_us)));
                }
            }
            let delta = i128::from(used.1) - i128::from(cost);
            if delta != 0 {
                for k in &self.money {
                    keys.push((k.clone(), "m", delta.to_string()));
                }
            }
        }
        for k in &self.slots {
            keys.push((k.clone(), "s", self.slot_id.clone()));
        }
        if keys.is_empty() {
            return;
        }
        let backend = self.backend;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let mut script = backend.settle.prepare_invoke();
                for (k, kind, v) in &keys {
                    script.key(k).arg(*kind).arg(v);
                }
                // A slot that cannot be freed expires with SLOT_TTL.
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

/// What each key of a `TAKE` call is, to read its answer.
enum Meta<'a> {
    Cell(&'a ScopeLimiter, &'a Budget),
    Slot(&'a ScopeLimiter),
    Money(&'a ScopeLimiter, super::spend::Window, u64),
    /// Read for the quota answer: the standing at this index.
    ReadCell(usize),
    ReadSlots(usize),
    ReadMoney(usize),
}

impl RedisLimits {
    pub fn new(url: &str, timeout: Duration, on_error: OnBackendError) -> Result<Self, String> {
        Ok(RedisLimits {
            nodes: Nodes::parse(url, timeout)?,
            conn: OnceCell::new(),
            timeout,
            on_error,
            open: AtomicBool::new(false),
            take: Script::new(TAKE),
            settle: Script::new(SETTLE),
        })
    }

    /// Runs one Redis call within the timeout; any failure opens the breaker.
    async fn call<T, F, Fut>(&self, f: F) -> Option<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let attempt = async {
            let conn = self
                .conn
                .get_or_try_init(|| async {
                    match &self.nodes {
                        Nodes::One(client) => {
                            let cfg = redis::aio::ConnectionManagerConfig::new()
                                .set_connection_timeout(Some(self.timeout))
                                .set_response_timeout(Some(self.timeout))
                                .set_number_of_retries(1);
                            ConnectionManager::new_lazy_with_config(client.clone(), cfg)
                                .map(Conn::One)
                        }
                        Nodes::Cluster(client) => {
                            client.get_async_connection().await.map(Conn::Cluster)
                        }
                    }
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

    fn unavailable(&self) -> Decision {
        match self.on_error {
            OnBackendError::Local => Decision::Local,
            OnBackendError::Open => Decision::Unlimited,
            OnBackendError::Closed => Decision::Closed(
                Reject::new(
                    503,
                    RejectCode::GatewayOverloaded,
                    "the limits backend is unavailable; retry shortly",
                )
                .with_header(http::header::RETRY_AFTER, "1"),
            ),
        }
    }

    /// One stage (the header stage, or the reservation) across every
    /// scope of the request, in one round trip.
    pub async fn take(
        self: &Arc<Self>,
        tenant_id: &str,
        request_id: &str,
        asks: &[(&Arc<ScopeLimiter>, Ask)],
        read: &[Arc<ScopeLimiter>],
    ) -> Decision {
        if self.open.load(Ordering::Acquire) {
            return self.unavailable();
        }
        let unix = unix_now();
        let mut script = self.take.prepare_invoke();
        script.arg(request_id).arg(SLOT_TTL.as_millis() as u64);
        let mut meta = Vec::new();
        let mut hold = FleetHold {
            backend: self.clone(),
            slot_id: request_id.to_string(),
            slots: Vec::new(),
            tokens: Vec::new(),
            money: Vec::new(),
        };
        let mut reserves = false;
        for (scope, ask) in asks {
            let p = scope.name.cell_prefix();
            let cells = scope.rate.iter().filter(|_| ask.request);
            let tokens = scope.tokens.iter().filter(|_| ask.reserves);
            for b in cells.chain(tokens) {
                let units = if b.kind == LimitKind::Requests {
                    1
                } else {
                    ask.tokens
                };
                let k = key(tenant_id, &format!("{p}{}", b.kind.key()));
                script
                    .key(&k)
                    .arg("g")
                    .arg(b.rate.cost(units) as f64 / 1000.0)
                    .arg(b.rate.capacity_ns as f64 / 1000.0)
                    .arg(0);
                if b.kind != LimitKind::Requests {
                    hold.tokens.push((k, b.rate.unit_ns / 1000.0));
                }
                meta.push(Meta::Cell(scope, b));
            }
            if let Some(max) = scope.max_concurrency.filter(|_| ask.slot) {
                let k = key(tenant_id, &format!("{p}inflight"));
                script.key(&k).arg("s").arg(max).arg(0).arg(0);
                hold.slots.push(k);
                meta.push(Meta::Slot(scope));
            }
            reserves |= ask.reserves;
            for s in scope.spend.iter().filter(|_| ask.reserves) {
                let (start, end) = s.window.bounds(unix);
                let k = key(tenant_id, &format!("{p}{}:{start}", s.window.key()));
                script
                    .key(&k)
                    .arg("m")
                    .arg(ask.cost)
                    .arg(s.limit)
                    .arg(end + 86_400);
                hold.money.push(k);
                meta.push(Meta::Money(scope, s.window, end.saturating_sub(unix)));
            }
        }
        let mut standings = Vec::new();
        for (i, scope) in read.iter().enumerate() {
            let p = scope.name.cell_prefix();
            for b in scope.cells() {
                let k = key(tenant_id, &format!("{p}{}", b.kind.key()));
                script.key(k).arg("G").arg(0).arg(0).arg(0);
                meta.push(Meta::ReadCell(i));
            }
            if scope.max_concurrency.is_some() {
                let k = key(tenant_id, &format!("{p}inflight"));
                script.key(k).arg("S").arg(0).arg(0).arg(0);
                meta.push(Meta::ReadSlots(i));
            }
            for s in &scope.spend {
                let (start, _) = s.window.bounds(unix);
                let k = key(tenant_id, &format!("{p}{}:{start}", s.window.key()));
                script.key(k).arg("M").arg(0).arg(0).arg(0);
                meta.push(Meta::ReadMoney(i));
            }
            standings.push(Standing {
                scope: scope.clone(),
                backlogs: Vec::new(),
                inflight: 0,
                spent: Vec::new(),
            });
        }
        if meta.is_empty() {
            return Decision::Shared(Granted {
                hold,
                cells: FleetCells::default(),
                standings,
            });
        }
        let reply: Option<Vec<i64>> = self
            .call(|mut c| async move { script.invoke_async(&mut c).await })
            .await;
        let Some(reply) = reply.filter(|r| r.len() >= 2) else {
            return self.unavailable();
        };
        let mut cells = FleetCells::default();
        for (m, v) in meta.iter().zip(&reply[2..]) {
            let v = (*v).max(0) as u64;
            match m {
                Meta::Cell(_, b) => {
                    let state = b.state(v.saturating_mul(1000));
                    if b.kind == LimitKind::Requests {
                        cells.requests.push(state);
                    } else {
                        cells.tokens.push(state);
                    }
                }
                Meta::ReadCell(i) => standings[*i].backlogs.push(v.saturating_mul(1000)),
                Meta::ReadSlots(i) => standings[*i].inflight = u32::try_from(v).unwrap_or(u32::MAX),
                Meta::ReadMoney(i) => standings[*i].spent.push(v),
                Meta::Slot(_) | Meta::Money(..) => {}
            }
        }
        if !reserves {
            cells.tokens.clear();
        }
        let refused = usize::try_from(reply[0]).unwrap_or(0);
        let retry_us = reply[1].max(0) as u64;
        let Some(at) = refused.checked_sub(1).and_then(|i| meta.get(i)) else {
            return Decision::Shared(Granted {
                hold,
                cells,
                standings,
            });
        };
        let (scope, what, retry_after) = match at {
            Meta::Cell(s, b) => (s, Refused::Cell(b.kind), Duration::from_micros(retry_us)),
            Meta::Slot(s) => (s, Refused::Concurrency, Duration::from_micros(retry_us)),
            Meta::Money(s, w, left) => (s, Refused::Budget(*w), Duration::from_secs(*left)),
            Meta::ReadCell(_) | Meta::ReadSlots(_) | Meta::ReadMoney(_) => {
                return self.unavailable();
            }
        };
        let refusal = Refusal {
            scope: scope.name.clone(),
            what,
            retry_after,
        };
        // Nothing was taken: the hold frees nothing.
        hold.slots.clear();
        Decision::Refused(refusal, cells)
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
                let ping = redis::cmd("PING");
                match &b.nodes {
                    Nodes::One(client) => {
                        let mut c = client.get_multiplexed_async_connection().await?;
                        ping.query_async::<String>(&mut c).await
                    }
                    Nodes::Cluster(client) => {
                        let mut c = client.get_async_connection().await?;
                        ping.query_async::<String>(&mut c).await
                    }
                }
            })
            .await;
            if matches!(pong, Ok(Ok(_))) {
                b.open.store(false, Ordering::Release);
                tracing::info!("limits backend answers again; circuit closed");
            }
        }
    }
}
