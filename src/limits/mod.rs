//! The limits stage: request rate (GCRA with burst), in-flight
//! concurrency, token budgets per minute and per day, and money budgets
//! per calendar day and month, in three scopes (a key, a model pattern, a
//! tenant). Tokens and money are reserved before forwarding and settled
//! with the real usage afterwards.
//!
//! Each scope's state lives in a [`ScopeLimiter`] its config entry points
//! to, so the hot path does no lookup. A reload hands an unchanged scope
//! the same limiter, so its state carries over.

pub mod cell;
pub mod guard;
mod held;
pub mod quota;
pub mod redis;
pub mod scope;
pub mod spend;
pub mod state;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cell::{now_ns, Cell, Rate};
pub use held::{Held, Limiter, Reserve};
use http::HeaderName;
pub use scope::{Refusal, Refused, ScopeKind, ScopeLimiter, ScopeLimits, ScopeName};

use crate::reject::{Reject, RejectCode};

/// Where quota state lives: in this process, or shared through Redis.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitsBackend {
    #[default]
    Local,
    Redis,
}

/// What the limiter does when its backend cannot answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBackendError {
    #[default]
    Local,
    Open,
    Closed,
}

#[derive(Debug, Clone)]
pub struct LimitsConfig {
    pub backend: LimitsBackend,
    /// Where the local backend keeps its cells across restarts.
    pub state_file: std::path::PathBuf,
    pub redis_url: Option<String>,
    pub on_backend_error: OnBackendError,
    pub auth_failures_per_ip_per_minute: u32,
    /// Requests in flight across the gateway before 503 `gateway_overloaded`.
    pub max_inflight: usize,
    /// The most a Redis call may add to a request before the breaker opens.
    pub redis_timeout: Duration,
}

const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);

/// The GCRA cells a scope may have (one [`Budget`] each). Concurrency is a
/// count of held slots, money a [`spend::Spend`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    /// `requests_per_second` with `burst`.
    Requests,
    TokensPerMinute,
    TokensPerDay,
}

impl LimitKind {
    pub const ALL: [LimitKind; 3] = [
        LimitKind::Requests,
        LimitKind::TokensPerMinute,
        LimitKind::TokensPerDay,
    ];

    /// The kind a Redis key suffix (or a state file entry) names.
    pub fn from_key(key: &str) -> Option<LimitKind> {
        LimitKind::ALL.into_iter().find(|k| k.key() == key)
    }

    /// The key suffix of the kind's cell in Redis.
    pub fn key(self) -> &'static str {
        match self {
            LimitKind::Requests => "req",
            LimitKind::TokensPerMinute => "tpm",
            LimitKind::TokensPerDay => "tpd",
        }
    }
}

/// One GCRA limit on one cell: what it counts, its rate, its configured
/// figure (for headers and the quota answer), and its state.
#[derive(Debug)]
pub struct Budget {
    pub kind: LimitKind,
    pub rate: Rate,
    /// The burst, or the tokens per window.
    pub limit: u64,
    cell: Cell,
}

impl Budget {
    fn new(kind: LimitKind, rate: Rate, limit: u64) -> Budget {
        Budget {
            kind,
            rate,
            limit,
            cell: Cell::default(),
        }
    }

    /// The time (ns) until the cell is full again.
    pub fn backlog(&self, now: u64) -> u64 {
        self.cell.backlog(now)
    }

    /// Puts back a backlog saved by an earlier process, less the time
    /// that has passed since: what was used stays used.
    pub fn restore(&self, backlog: u64) {
        self.cell
            .charge(now_ns(), backlog.min(self.rate.capacity_ns));
    }

    /// The cell time taken so far, less what was given back.
    pub fn used(&self) -> u64 {
        self.cell.used()
    }

    /// Takes (or, below zero, gives back) cell time another process
    /// accounted: what an upgrade's old process did after handing over.
    pub fn add_used(&self, delta: i128) {
        let d = u64::try_from(delta.unsigned_abs()).unwrap_or(u64::MAX);
        if delta > 0 {
            self.cell.charge(now_ns(), d);
        } else {
            self.cell.refund(d);
        }
    }

    /// Where the cell stands, given its backlog (measured here or in Redis).
    pub fn state(&self, backlog: u64) -> CellState {
        CellState {
            limit: self.limit,
            remaining: self.rate.remaining(backlog),
            reset: Duration::from_nanos(backlog),
        }
    }
}

/// What a request asks of one scope at one stage.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ask {
    /// One unit of the request rate.
    pub request: bool,
    /// A concurrency slot, held until the request ends.
    pub slot: bool,
    /// Whether this is the reservation: tokens and money, settled later.
    pub reserves: bool,
    pub tokens: u64,
    /// Money, in nano-units.
    pub cost: u64,
}

/// What a stage took from one scope in this process: given back when a
/// later scope refuses, settled with the real usage otherwise.
#[derive(Debug)]
pub struct Taken {
    pub scope: Arc<ScopeLimiter>,
    ask: Ask,
    /// The window each budget's cost was taken from.
    windows: Vec<u64>,
}

/// Takes each scope's ask, in order, or nothing: the first scope that
/// refuses answers, and what the earlier ones gave is given back.
pub fn take_local(asks: &[(&Arc<ScopeLimiter>, Ask)]) -> Result<Vec<Taken>, Refusal> {
    let (now, unix) = (now_ns(), unix_now());
    let mut taken: Vec<Taken> = Vec::with_capacity(asks.len());
    for (scope, ask) in asks {
        match take_one(scope, *ask, now, unix) {
            Ok(t) => taken.push(t),
            Err(refusal) => {
                for t in taken {
                    t.undo();
                }
                return Err(refusal);
            }
        }
    }
    Ok(taken)
}

/// One scope, all or nothing: the rate, a slot, tokens, then money.
fn take_one(scope: &Arc<ScopeLimiter>, ask: Ask, now: u64, unix: u64) -> Result<Taken, Refusal> {
    let mut t = Taken {
        scope: scope.clone(),
        ask: Ask::default(),
        windows: Vec::new(),
    };
    let refused = |t: Taken, r: Refusal| {
        t.undo();
        Err(r)
    };
    if ask.request {
        if let Some(b) = &scope.rate {
            if let Err(e) = b.cell.take(now, b.rate.cost(1), b.rate.capacity_ns) {
                return refused(t, Refusal::cell(scope, b.kind, e));
            }
        }
        t.ask.request = true;
    }
    if ask.slot {
        if let Err(what) = scope.take_slot() {
            let r = Refusal {
                scope: scope.name.clone(),
                what,
                retry_after: Duration::from_secs(1),
            };
            return refused(t, r);
        }
        t.ask.slot = true;
    }
    if !ask.reserves {
        return Ok(t);
    }
    t.ask.reserves = true;
    if ask.tokens > 0 {
        for (i, b) in scope.tokens.iter().enumerate() {
            if let Err(e) = b
                .cell
                .take(now, b.rate.cost(ask.tokens), b.rate.capacity_ns)
            {
                for taken in &scope.tokens[..i] {
                    taken.cell.refund(taken.rate.cost(ask.tokens));
                }
                return refused(t, Refusal::cell(scope, b.kind, e));
            }
        }
        t.ask.tokens = ask.tokens;
    }
    for s in &scope.spend {
        match s.take(unix, ask.cost) {
            Ok(window) => t.windows.push(window),
            Err(e) => {
                for (s, w) in scope.spend.iter().zip(&t.windows) {
                    s.adjust(unix, *w, -i128::from(ask.cost));
                }
                t.windows.clear();
                let r = Refusal {
                    scope: scope.name.clone(),
                    what: Refused::Budget(s.window),
                    retry_after: e.retry_after,
                };
                return refused(t, r);
            }
        }
    }
    t.ask.cost = ask.cost;
    Ok(t)
}

impl Taken {
    /// Gives back everything taken; the slot too.
    fn undo(mut self) {
        let unix = unix_now();
        self.release();
        let s = &self.scope;
        if self.ask.request {
            if let Some(b) = &s.rate {
                b.cell.refund(b.rate.cost(1));
            }
        }
        for b in &s.tokens {
            b.cell.refund(b.rate.cost(self.ask.tokens));
        }
        for (spend, w) in s.spend.iter().zip(&self.windows) {
            spend.adjust(unix, *w, -i128::from(self.ask.cost));
        }
    }

    /// Settles the tokens and money with what was really used: refunds
    /// the unused part, charges a shortfall (which may overdraw).
    pub fn settle(&self, tokens: u64, cost: u64) {
        let (now, unix) = (now_ns(), unix_now());
        let reserved = self.ask.tokens;
        for b in &self.scope.tokens {
            if tokens < reserved {
                b.cell.refund(b.rate.cost(reserved - tokens));
            } else if tokens > reserved {
                b.cell.charge(now, b.rate.cost(tokens - reserved));
            }
        }
        let delta = i128::from(cost) - i128::from(self.ask.cost);
        for (spend, w) in self.scope.spend.iter().zip(&self.windows) {
            spend.adjust(unix, *w, delta);
        }
    }

    /// Frees the slot, if this holds one.
    pub fn release(&mut self) {
        if std::mem::take(&mut self.ask.slot) {
            self.scope.release_slot();
        }
    }
}

impl Drop for Taken {
    /// A slot is freed however the request ends.
    fn drop(&mut self) {
        self.release();
    }
}

/// Unix seconds now, for the money windows.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One GCRA cell's standing: what the headers and the quota answer say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CellState {
    pub limit: u64,
    pub remaining: u64,
    pub reset: Duration,
}

impl CellState {
    /// The most constrained of some cells: the fewest units left.
    pub fn tightest(cells: impl Iterator<Item = CellState>) -> Option<CellState> {
        cells.min_by_key(|c| (c.remaining, std::cmp::Reverse(c.reset)))
    }
}

/// The live standing of the scopes a request passes, in this process.
pub fn local_rate_state<'a>(scopes: impl Iterator<Item = &'a ScopeLimiter> + Clone) -> RateState {
    let now = now_ns();
    let requests = scopes
        .clone()
        .filter_map(|s| s.rate.as_ref())
        .map(|b| b.state(b.backlog(now)));
    let tokens = scopes
        .flat_map(|s| s.tokens.iter())
        .map(|b| b.state(b.backlog(now)));
    RateState::of(requests, tokens)
}

/// The 429 for a refusal, with `Retry-After` in whole seconds (rounded up)
/// and the headers of the request's standing.
pub fn too_many(refusal: &Refusal, state: RateState) -> Reject {
    let code = match refusal.what {
        Refused::Cell(LimitKind::Requests) => RejectCode::RateLimitExceeded,
        Refused::Cell(_) => RejectCode::TokensQuotaExceeded,
        Refused::Concurrency => RejectCode::ConcurrencyLimitExceeded,
        Refused::Budget(_) => RejectCode::BudgetExceeded,
    };
    let secs = refusal
        .retry_after
        .as_nanos()
        .div_ceil(1_000_000_000)
        .max(1);
    let mut r = Reject::new(429, code, refusal.scope.refusal(refusal.what))
        .with_header(http::header::RETRY_AFTER, secs.to_string());
    r.headers.extend(state.openai_headers());
    r
}

/// A tenant's rate-limit standing, rendered as each dialect's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateState {
    pub requests_limit: u64,
    pub requests_remaining: u64,
    pub requests_reset: Duration,
    pub tokens_limit: u64,
    pub tokens_remaining: u64,
    pub tokens_reset: Duration,
}

impl RateState {
    /// The standing of the most constrained request cell and token cell
    /// among those a request passed; a kind with no cell reads as zero.
    pub fn of(
        requests: impl Iterator<Item = CellState>,
        tokens: impl Iterator<Item = CellState>,
    ) -> RateState {
        let none = CellState {
            limit: 0,
            remaining: 0,
            reset: Duration::ZERO,
        };
        let r = CellState::tightest(requests).unwrap_or(none);
        let t = CellState::tightest(tokens).unwrap_or(none);
        RateState {
            requests_limit: r.limit,
            requests_remaining: r.remaining,
            requests_reset: r.reset,
            tokens_limit: t.limit,
            tokens_remaining: t.remaining,
            tokens_reset: t.reset,
        }
    }

    /// OpenAI's `x-ratelimit-*`, resets as durations (`6m0s`).
    pub fn openai_headers(&self) -> [(HeaderName, String); 6] {
        let [limit_r, remaining_r, reset_r, limit_t, remaining_t, reset_t] = OPENAI_HEADERS;
        [
            (limit_r, self.requests_limit.to_string()),
            (remaining_r, self.requests_remaining.to_string()),
            (reset_r, openai_duration(self.requests_reset)),
            (limit_t, self.tokens_limit.to_string()),
            (remaining_t, self.tokens_remaining.to_string()),
            (reset_t, openai_duration(self.tokens_reset)),
        ]
    }

    /// Anthropic's `anthropic-ratelimit-*`, resets as RFC 3339 times
    /// (rounded up to the second, so "full again" is never early).
    pub fn anthropic_headers(&self, now: SystemTime) -> [(HeaderName, String); 6] {
        let at = |d: Duration| {
            let t = now + d;
            let up = t.duration_since(UNIX_EPOCH).map_or(Duration::ZERO, |u| {
                Duration::from_secs(u.as_secs() + u64::from(u.subsec_nanos() > 0))
            });
            humantime::format_rfc3339_seconds(UNIX_EPOCH + up).to_string()
        };
        let [limit_r, remaining_r, reset_r, limit_t, remaining_t, reset_t] = ANTHROPIC_HEADERS;
        [
            (limit_r, self.requests_limit.to_string()),
            (remaining_r, self.requests_remaining.to_string()),
            (reset_r, at(self.requests_reset)),
            (limit_t, self.tokens_limit.to_string()),
            (remaining_t, self.tokens_remaining.to_string()),
            (reset_t, at(self.tokens_reset)),
        ]
    }
}

/// The dialects' header names, built at compile time: an answer carries
/// them all, and a name parsed per insert was a measurable cost.
const OPENAI_HEADERS: [HeaderName; 6] = [
    HeaderName::from_static("x-ratelimit-limit-requests"),
    HeaderName::from_static("x-ratelimit-remaining-requests"),
    HeaderName::from_static("x-ratelimit-reset-requests"),
    HeaderName::from_static("x-ratelimit-limit-tokens"),
    HeaderName::from_static("x-ratelimit-remaining-tokens"),
    HeaderName::from_static("x-ratelimit-reset-tokens"),
];
const ANTHROPIC_HEADERS: [HeaderName; 6] = [
    HeaderName::from_static("anthropic-ratelimit-requests-limit"),
    HeaderName::from_static("anthropic-ratelimit-requests-remaining"),
    HeaderName::from_static("anthropic-ratelimit-requests-reset"),
    HeaderName::from_static("anthropic-ratelimit-tokens-limit"),
    HeaderName::from_static("anthropic-ratelimit-tokens-remaining"),
    HeaderName::from_static("anthropic-ratelimit-tokens-reset"),
];

pub fn openai_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    if d < Duration::from_secs(1) {
        return format!("{}ms", d.as_millis().max(1));
    }
    let total = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    let (h, m, s) = (total / 3600, total % 3600 / 60, total % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn scope(
        name: ScopeName,
        rate: Option<(f64, u32)>,
        tpm: Option<u64>,
        conc: Option<u32>,
    ) -> Arc<ScopeLimiter> {
        Arc::new(ScopeLimiter::new(
            name,
            &ScopeLimits {
                rate,
                tokens_per_minute: tpm,
                tokens_per_day: tpm.map(|t| t * 100),
                max_concurrency: conc,
                ..ScopeLimits::default()
            },
        ))
    }

    fn tenant(rps: f64, burst: u32, tpm: u64, conc: u32) -> Arc<ScopeLimiter> {
        scope(
            ScopeName::tenant("t"),
            Some((rps, burst)),
            Some(tpm),
            Some(conc),
        )
    }

    fn admit(s: &Arc<ScopeLimiter>) -> Result<Vec<Taken>, Refusal> {
        take_local(&[(
            s,
            Ask {
                request: true,
                slot: true,
                ..Ask::default()
            },
        )])
    }

    fn reserve(s: &Arc<ScopeLimiter>, tokens: u64) -> Result<Vec<Taken>, Refusal> {
        take_local(&[(
            s,
            Ask {
                reserves: true,
                tokens,
                ..Ask::default()
            },
        )])
    }

    /// Header pairs keyed by name, as a client reads them.
    fn by_name(pairs: impl IntoIterator<Item = (HeaderName, String)>) -> HashMap<String, String> {
        pairs
            .into_iter()
            .map(|(n, v)| (n.as_str().to_owned(), v))
            .collect()
    }

    fn headers(s: &Arc<ScopeLimiter>) -> HashMap<String, String> {
        by_name(local_rate_state([&**s].into_iter()).openai_headers())
    }

    #[test]
    fn durations_read_like_openai() {
        assert_eq!(openai_duration(Duration::from_millis(120)), "120ms");
        assert_eq!(openai_duration(Duration::from_secs(1)), "1s");
        assert_eq!(openai_duration(Duration::from_millis(1500)), "2s");
        assert_eq!(openai_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(openai_duration(Duration::from_secs(3723)), "1h2m3s");
        assert_eq!(openai_duration(Duration::ZERO), "0s");
    }

    #[test]
    fn slots_come_back_when_dropped() {
        let l = tenant(1000.0, 1000, 1000, 2);
        let a = admit(&l).unwrap();
        let _b = admit(&l).unwrap();
        let r = admit(&l).unwrap_err();
        assert_eq!(r.what, Refused::Concurrency);
        assert_eq!(
            too_many(&r, local_rate_state([&*l].into_iter())).code,
            "concurrency_limit_exceeded"
        );
        drop(a);
        let _c = admit(&l).expect("the dropped slot came back");
        assert!(admit(&l).is_err(), "only one slot came back");
    }

    #[test]
    fn rate_rejections_carry_retry_after_and_headers() {
        let l = tenant(1.0, 2, 1000, 100);
        let _a = admit(&l).unwrap();
        let _b = admit(&l).unwrap();
        let refusal = admit(&l).unwrap_err();
        let r = too_many(&refusal, local_rate_state([&*l].into_iter()));
        assert_eq!(r.code, "rate_limit_exceeded");
        assert_eq!(r.message, "the tenant's request rate limit is reached");
        let h = by_name(r.headers.iter().cloned());
        assert_eq!(h["retry-after"], "1");
        assert_eq!(h["x-ratelimit-limit-requests"], "2");
        assert_eq!(h["x-ratelimit-remaining-requests"], "0");
        assert_eq!(h["x-ratelimit-limit-tokens"], "1000");
    }

    #[test]
    fn anthropic_headers_give_resets_as_times() {
        let state = RateState {
            requests_limit: 5,
            requests_remaining: 2,
            requests_reset: Duration::from_millis(1500),
            tokens_limit: 1000,
            tokens_remaining: 1000,
            tokens_reset: Duration::ZERO,
        };
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let h = by_name(state.anthropic_headers(now));
        assert_eq!(h["anthropic-ratelimit-requests-limit"], "5");
        assert_eq!(h["anthropic-ratelimit-requests-remaining"], "2");
        assert_eq!(
            h["anthropic-ratelimit-requests-reset"],
            "2027-01-15T08:00:02Z"
        );
        assert_eq!(
            h["anthropic-ratelimit-tokens-reset"],
            "2027-01-15T08:00:00Z"
        );
        assert_eq!(h["anthropic-ratelimit-tokens-limit"], "1000");
    }

    #[test]
    fn a_reservation_takes_every_token_budget_or_none() {
        let l = Arc::new(ScopeLimiter::new(
            ScopeName::tenant("t"),
            &ScopeLimits {
                tokens_per_minute: Some(1000),
                tokens_per_day: Some(500),
                ..ScopeLimits::default()
            },
        ));
        let r = reserve(&l, 600).unwrap_err();
        assert_eq!(r.what, Refused::Cell(LimitKind::TokensPerDay));
        // The minute budget the refused reservation took was given back.
        assert_eq!(
            l.tokens[0].rate.remaining(l.tokens[0].backlog(now_ns())),
            1000
        );
        assert!(reserve(&l, 500).is_ok());
    }

    #[test]
    fn reservations_settle_to_real_usage() {
        let l = tenant(1000.0, 1000, 1000, 100);
        let r = reserve(&l, 900).unwrap();
        assert!(reserve(&l, 200).is_err());
        r[0].settle(100, 0);
        let r = reserve(&l, 800).unwrap();
        r[0].settle(2000, 0); // overdraw
        let e = reserve(&l, 1).unwrap_err();
        assert!(e.retry_after >= Duration::from_secs(60));
    }

    #[test]
    fn a_refusal_in_one_scope_takes_nothing_from_the_others() {
        let key = scope(
            ScopeName::key("ci-bot"),
            Some((1000.0, 1000)),
            Some(100),
            Some(10),
        );
        let model = scope(ScopeName::model("big-*"), None, Some(50), None);
        let t = tenant(1000.0, 1000, 10_000, 10);
        let asks = |n| {
            let a = Ask {
                reserves: true,
                tokens: n,
                ..Ask::default()
            };
            [(&key, a), (&model, a), (&t, a)]
        };
        let r = take_local(&asks(60)).unwrap_err();
        assert_eq!(r.scope, ScopeName::model("big-*"));
        assert_eq!(
            too_many(&r, local_rate_state([&*key, &*model, &*t].into_iter())).message,
            "the per-model token quota per minute for big-* is reached"
        );
        assert_eq!(
            headers(&key)["x-ratelimit-remaining-tokens"],
            "100",
            "the key gave its tokens back"
        );
        assert_eq!(headers(&t)["x-ratelimit-remaining-tokens"], "10000");
        let taken = take_local(&asks(50)).unwrap();
        // The headers name the tightest cell: the model's, now empty.
        let state = local_rate_state([&*key, &*model, &*t].into_iter());
        assert_eq!((state.tokens_limit, state.tokens_remaining), (50, 0));
        drop(taken);
    }

    #[test]
    fn money_is_reserved_and_settled_in_every_budget_or_none() {
        let budgets = |day, month| ScopeLimits {
            budget_per_day: day,
            budget_per_month: month,
            ..ScopeLimits::default()
        };
        let key = Arc::new(ScopeLimiter::new(
            ScopeName::key("k"),
            &budgets(Some(1.0), None),
        ));
        let t = Arc::new(ScopeLimiter::new(
            ScopeName::tenant("t"),
            &budgets(Some(10.0), Some(1.5)),
        ));
        let ask = |cost| Ask {
            reserves: true,
            cost,
            ..Ask::default()
        };
        let nano = |x: f64| (x * spend::NANO) as u64;
        let taken = take_local(&[(&key, ask(nano(0.8))), (&t, ask(nano(0.8)))]).unwrap();
        for t in &taken {
            t.settle(0, nano(0.5));
        }
        let r = take_local(&[(&key, ask(nano(0.6))), (&t, ask(nano(0.6)))]).unwrap_err();
        assert_eq!(
            (r.scope.kind, r.what),
            (ScopeKind::Key, Refused::Budget(spend::Window::Day))
        );
        assert_eq!(
            too_many(&r, RateState::of(std::iter::empty(), std::iter::empty())).code,
            "budget_exceeded"
        );
        assert_eq!(
            t.spend[0].spent(unix_now()).1,
            nano(0.5),
            "the tenant gave its share back"
        );
        // The tenant's month budget refuses what the key would allow.
        let r = take_local(&[(&key, ask(nano(0.4))), (&t, ask(nano(1.1)))]).unwrap_err();
        assert_eq!(
            (r.scope.kind, r.what),
            (ScopeKind::Tenant, Refused::Budget(spend::Window::Month))
        );
        assert_eq!(key.spend[0].spent(unix_now()).1, nano(0.5));
    }

    proptest::proptest! {
        /// However reservations and settlements interleave across two
        /// nested scopes, a reservation is admitted only when it fits in
        /// both, so what a scope has been charged exceeds its limit only
        /// by what settlements used beyond their reservations: never, when
        /// usage stays within the reservation (the output cap's promise).
        /// The slack of 2 covers the refill while the case runs.
        #[test]
        fn no_interleaving_lets_a_scope_exceed_its_limit(
            ops in proptest::collection::vec((1u64..400, 0u64..=100, proptest::bool::ANY), 1..200),
            overdraw in proptest::bool::ANY,
        ) {
            let key = scope(ScopeName::key("k"), None, Some(1000), None);
            let t = scope(ScopeName::tenant("t"), None, Some(1500), None);
            let limits = [1000u64, 1500];
            let mut open: Vec<(u64, Vec<Taken>)> = Vec::new();
            let mut charged = [0u64; 2];
            for (reserve, pct, settle_now) in ops {
                let a = Ask { reserves: true, tokens: reserve, ..Ask::default() };
                if let Ok(taken) = take_local(&[(&key, a), (&t, a)]) {
                    for (c, limit) in charged.iter_mut().zip(limits) {
                        *c += reserve;
                        proptest::prop_assert!(*c <= limit + 2, "admitted up to {c} of {limit}");
                    }
                    open.push((reserve, taken));
                }
                if settle_now {
                    if let Some((reserve, taken)) = open.pop() {
                        let used = reserve * pct / 100 * if overdraw { 2 } else { 1 };
                        for x in &taken {
                            x.settle(used, 0);
                        }
                        for c in &mut charged {
                            *c = *c + used - reserve;
                        }
                    }
                }
                if !overdraw {
                    for (c, limit) in charged.iter().zip(limits) {
                        proptest::prop_assert!(*c <= limit + 2, "charged {c} of {limit}");
                    }
                }
            }
        }
    }
}
