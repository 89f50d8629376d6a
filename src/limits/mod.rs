//! The limits stage: per-tenant request rate (GCRA with burst), in-flight
//! concurrency, and token budgets per minute and per day, reserved before
//! forwarding and settled with the real usage afterwards.
//!
//! Each tenant's state lives in a [`TenantLimiter`] the tenant's config
//! entry points to, so the hot path does no lookup. A reload hands an
//! unchanged tenant the same limiter, so its state carries over.

pub mod cell;
pub mod guard;
mod held;
pub mod redis;
pub mod state;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cell::{now_ns, Cell, Exhausted, Rate};
pub use held::{Held, Limiter};

use crate::reject::{Reject, RejectCode};
use crate::tenant::Limits;

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

/// The kinds of limit a tenant has. Requests and tokens are GCRA cells
/// (one [`Budget`] each); concurrency is a count of held slots.
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

    /// The 429's code and message when the kind is exhausted.
    fn exhausted(self) -> (RejectCode, &'static str) {
        match self {
            LimitKind::Requests => (RejectCode::RateLimitExceeded, "request rate limit reached"),
            LimitKind::TokensPerMinute => (
                RejectCode::TokensQuotaExceeded,
                "token budget per minute reached",
            ),
            LimitKind::TokensPerDay => (
                RejectCode::TokensQuotaExceeded,
                "token budget per day reached",
            ),
        }
    }
}

/// One limit on one cell: what it counts, its rate, and its state.
#[derive(Debug)]
pub struct Budget {
    pub kind: LimitKind,
    pub rate: Rate,
    cell: Cell,
}

impl Budget {
    fn new(kind: LimitKind, rate: Rate) -> Budget {
        Budget {
            kind,
            rate,
            cell: Cell::default(),
        }
    }
}

/// One tenant's limit state, shared by every request of that tenant.
#[derive(Debug)]
pub struct TenantLimiter {
    limits: Limits,
    /// Checked per request: today, the request rate.
    requests: Vec<Budget>,
    /// Reserved per request and settled with the usage: tokens per minute,
    /// then per day. The first sets the `-tokens` headers.
    tokens: Vec<Budget>,
    inflight: AtomicU32,
}

impl TenantLimiter {
    pub fn new(limits: &Limits) -> TenantLimiter {
        TenantLimiter {
            limits: limits.clone(),
            requests: vec![Budget::new(
                LimitKind::Requests,
                Rate::requests(limits.requests_per_second, limits.burst),
            )],
            tokens: vec![
                Budget::new(
                    LimitKind::TokensPerMinute,
                    Rate::budget(limits.tokens_per_minute, MINUTE),
                ),
                Budget::new(
                    LimitKind::TokensPerDay,
                    Rate::budget(limits.tokens_per_day, DAY),
                ),
            ],
            inflight: AtomicU32::new(0),
        }
    }

    /// The limits this state enforces; a reload keeps the state only when
    /// they are unchanged.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Each cell's backlog now (ns until full again), for the state file.
    pub fn backlogs(&self) -> Vec<(LimitKind, u64)> {
        let now = now_ns();
        self.requests
            .iter()
            .chain(&self.tokens)
            .map(|b| (b.kind, b.cell.backlog(now)))
            .collect()
    }

    /// Puts back a cell's backlog saved by an earlier process, less the
    /// time that has passed since: what was used stays used.
    pub fn restore_backlog(&self, kind: LimitKind, backlog: u64) {
        let now = now_ns();
        if let Some(b) = self
            .requests
            .iter()
            .chain(&self.tokens)
            .find(|b| b.kind == kind)
        {
            b.cell.charge(now, backlog.min(b.rate.capacity_ns));
        }
    }

    /// The budgets a request is admitted against.
    pub fn request_budgets(&self) -> &[Budget] {
        &self.requests
    }

    /// The budgets a request's tokens are reserved from.
    pub fn token_budgets(&self) -> &[Budget] {
        &self.tokens
    }

    /// Admits one request against the rate and takes a concurrency slot,
    /// which the returned guard gives back however the request ends.
    pub fn admit(self: &Arc<Self>) -> Result<Slot, Reject> {
        let now = now_ns();
        take_all(&self.requests, now, 1).map_err(|(kind, e)| self.too_many(kind, e))?;
        let before = self.inflight.fetch_add(1, Ordering::AcqRel);
        if before >= self.limits.max_concurrency {
            self.inflight.fetch_sub(1, Ordering::AcqRel);
            return Err(self.too_many_with(
                RejectCode::ConcurrencyLimitExceeded,
                "too many requests in flight for this tenant",
                Duration::from_secs(1),
                self.request_backlog(now),
                self.token_backlog(now),
            ));
        }
        Ok(Slot {
            limiter: self.clone(),
        })
    }

    /// Reserves `tokens` against every token budget before forwarding:
    /// all of them, or none.
    pub fn reserve(self: &Arc<Self>, tokens: u64) -> Result<Reservation, Reject> {
        take_all(&self.tokens, now_ns(), tokens).map_err(|(kind, e)| self.too_many(kind, e))?;
        Ok(Reservation {
            limiter: self.clone(),
            tokens,
        })
    }

    /// Where the tenant stands: requests against `burst`, tokens against
    /// `tokens_per_minute`, resets as the time until full.
    pub fn rate_state(&self) -> RateState {
        let now = now_ns();
        self.rate_state_with(self.request_backlog(now), self.token_backlog(now))
    }

    fn request_backlog(&self, now: u64) -> u64 {
        self.requests.first().map_or(0, |b| b.cell.backlog(now))
    }

    fn token_backlog(&self, now: u64) -> u64 {
        self.tokens.first().map_or(0, |b| b.cell.backlog(now))
    }

    /// The same from backlogs measured elsewhere (the Redis cells).
    pub fn rate_state_with(&self, req_backlog: u64, tok_backlog: u64) -> RateState {
        let remaining =
            |budgets: &[Budget], backlog| budgets.first().map_or(0, |b| b.rate.remaining(backlog));
        RateState {
            requests_limit: u64::from(self.limits.burst),
            requests_remaining: remaining(&self.requests, req_backlog),
            requests_reset: Duration::from_nanos(req_backlog),
            tokens_limit: self.limits.tokens_per_minute,
            tokens_remaining: remaining(&self.tokens, tok_backlog),
            tokens_reset: Duration::from_nanos(tok_backlog),
        }
    }

    fn too_many(&self, kind: LimitKind, e: Exhausted) -> Reject {
        let now = now_ns();
        let (code, message) = kind.exhausted();
        self.too_many_with(
            code,
            message,
            e.retry_after,
            self.request_backlog(now),
            self.token_backlog(now),
        )
    }

    /// A 429 with `Retry-After` in whole seconds, rounded up, and the
    /// rate-limit headers for the given backlogs.
    pub(crate) fn too_many_with(
        &self,
        code: RejectCode,
        message: &'static str,
        retry_after: Duration,
        req_backlog: u64,
        tok_backlog: u64,
    ) -> Reject {
        let secs = retry_after.as_nanos().div_ceil(1_000_000_000).max(1);
        let mut r = Reject::new(429, code, message).with_header("retry-after", secs.to_string());
        r.headers.extend(
            self.rate_state_with(req_backlog, tok_backlog)
                .openai_headers(),
        );
        r
    }
}

/// Takes `units` from every budget, or from none: on the first that
/// refuses, those already taken are refunded.
fn take_all(budgets: &[Budget], now: u64, units: u64) -> Result<(), (LimitKind, Exhausted)> {
    for (i, b) in budgets.iter().enumerate() {
        if let Err(e) = b.cell.take(now, b.rate.cost(units), b.rate.capacity_ns) {
            for taken in &budgets[..i] {
                taken.cell.refund(taken.rate.cost(units));
            }
            return Err((b.kind, e));
        }
    }
    Ok(())
}

/// A concurrency slot; dropping it frees the slot, on every exit path.
#[derive(Debug)]
pub struct Slot {
    limiter: Arc<TenantLimiter>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.limiter.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Tokens held against a tenant's budgets until the response tells the
/// real usage.
#[derive(Debug)]
pub struct Reservation {
    limiter: Arc<TenantLimiter>,
    tokens: u64,
}

impl Reservation {
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Settles with the real usage: refunds what was not used, charges any
    /// shortfall (which may overdraw the budget).
    pub fn settle(self, used: u64) {
        let now = now_ns();
        for b in &self.limiter.tokens {
            if used < self.tokens {
                b.cell.refund(b.rate.cost(self.tokens - used));
            } else if used > self.tokens {
                b.cell.charge(now, b.rate.cost(used - self.tokens));
            }
        }
    }
}

/// Durations as OpenAI writes them: `120ms`, `1s`, `6m0s`, `1h2m3s`.
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
    /// OpenAI's `x-ratelimit-*`, resets as durations (`6m0s`).
    pub fn openai_headers(&self) -> [(&'static str, String); 6] {
        [
            (
                "x-ratelimit-limit-requests",
                self.requests_limit.to_string(),
            ),
            (
                "x-ratelimit-remaining-requests",
                self.requests_remaining.to_string(),
            ),
            (
                "x-ratelimit-reset-requests",
                openai_duration(self.requests_reset),
            ),
            ("x-ratelimit-limit-tokens", self.tokens_limit.to_string()),
            (
                "x-ratelimit-remaining-tokens",
                self.tokens_remaining.to_string(),
            ),
            (
                "x-ratelimit-reset-tokens",
                openai_duration(self.tokens_reset),
            ),
        ]
    }

    /// Anthropic's `anthropic-ratelimit-*`, resets as RFC 3339 times
    /// (rounded up to the second, so "full again" is never early).
    pub fn anthropic_headers(&self, now: SystemTime) -> [(&'static str, String); 6] {
        let at = |d: Duration| {
            let t = now + d;
            let up = t.duration_since(UNIX_EPOCH).map_or(Duration::ZERO, |u| {
                Duration::from_secs(u.as_secs() + u64::from(u.subsec_nanos() > 0))
            });
            humantime::format_rfc3339_seconds(UNIX_EPOCH + up).to_string()
        };
        [
            (
                "anthropic-ratelimit-requests-limit",
                self.requests_limit.to_string(),
            ),
            (
                "anthropic-ratelimit-requests-remaining",
                self.requests_remaining.to_string(),
            ),
            (
                "anthropic-ratelimit-requests-reset",
                at(self.requests_reset),
            ),
            (
                "anthropic-ratelimit-tokens-limit",
                self.tokens_limit.to_string(),
            ),
            (
                "anthropic-ratelimit-tokens-remaining",
                self.tokens_remaining.to_string(),
            ),
            ("anthropic-ratelimit-tokens-reset", at(self.tokens_reset)),
        ]
    }
}

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

    fn limits(rps: f64, burst: u32, tpm: u64, conc: u32) -> Limits {
        Limits {
            requests_per_second: rps,
            burst,
            tokens_per_minute: tpm,
            tokens_per_day: tpm * 100,
            max_concurrency: conc,
            max_body_bytes: 1,
            max_prompt_tokens: 1,
            max_output_tokens: 1,
        }
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
        let l = Arc::new(TenantLimiter::new(&limits(1000.0, 1000, 1000, 2)));
        let a = l.admit().unwrap();
        let _b = l.admit().unwrap();
        let r = l.admit().unwrap_err();
        assert_eq!(
            (r.status, r.code.as_str()),
            (429, "concurrency_limit_exceeded")
        );
        drop(a);
        let _c = l.admit().expect("the dropped slot came back");
        assert!(l.admit().is_err(), "only one slot came back");
    }

    #[test]
    fn rate_rejections_carry_retry_after_and_headers() {
        let l = Arc::new(TenantLimiter::new(&limits(1.0, 2, 1000, 100)));
        let _a = l.admit().unwrap();
        let _b = l.admit().unwrap();
        let r = l.admit().unwrap_err();
        assert_eq!(r.code, "rate_limit_exceeded");
        let h: std::collections::HashMap<_, _> = r.headers.iter().cloned().collect();
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
        let h: std::collections::HashMap<_, _> = state.anthropic_headers(now).into_iter().collect();
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
        let mut l = limits(1000.0, 1000, 1000, 100);
        l.tokens_per_day = 500;
        let l = Arc::new(TenantLimiter::new(&l));
        let r = l.reserve(600).unwrap_err();
        assert_eq!(r.message, "token budget per day reached");
        // The minute budget the refused reservation took was given back.
        let h: std::collections::HashMap<_, _> =
            l.rate_state().openai_headers().into_iter().collect();
        assert_eq!(h["x-ratelimit-remaining-tokens"], "1000");
        assert!(l.reserve(500).is_ok());
    }

    #[test]
    fn reservations_settle_to_real_usage() {
        let l = Arc::new(TenantLimiter::new(&limits(1000.0, 1000, 1000, 100)));
        let r = l.reserve(900).unwrap();
        assert_eq!(l.reserve(200).unwrap_err().code, "tokens_quota_exceeded");
        r.settle(100);
        let r = l.reserve(800).unwrap();
        r.settle(2000); // overdraw
        let e = l.reserve(1).unwrap_err();
        assert!(e
            .headers
            .iter()
            .any(|(k, v)| *k == "retry-after" && v.parse::<u64>().unwrap() >= 60));
    }
}
