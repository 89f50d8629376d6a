//! The limits stage: per-tenant request rate (GCRA with burst), in-flight
//! concurrency, and token budgets per minute and per day, reserved before
//! forwarding and settled with the real usage afterwards.
//!
//! Each tenant's state lives in a [`TenantLimiter`] the tenant's config
//! entry points to, so the hot path does no lookup. A reload hands an
//! unchanged tenant the same limiter, so its state carries over.

pub mod cell;
pub mod guard;
pub mod redis;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cell::{now_ns, Cell, Exhausted, Rate};

use crate::config::tenants::Limits;
use crate::reject::Reject;

const MINUTE: Duration = Duration::from_secs(60);
const DAY: Duration = Duration::from_secs(86_400);

/// One tenant's limit state, shared by every request of that tenant.
#[derive(Debug)]
pub struct TenantLimiter {
    limits: Limits,
    pub(crate) request_rate: Rate,
    pub(crate) minute_rate: Rate,
    pub(crate) day_rate: Rate,
    requests: Cell,
    minute: Cell,
    day: Cell,
    inflight: AtomicU32,
}

impl TenantLimiter {
    pub fn new(limits: &Limits) -> TenantLimiter {
        TenantLimiter {
            limits: limits.clone(),
            request_rate: Rate::requests(limits.requests_per_second, limits.burst),
            minute_rate: Rate::budget(limits.tokens_per_minute, MINUTE),
            day_rate: Rate::budget(limits.tokens_per_day, DAY),
            requests: Cell::default(),
            minute: Cell::default(),
            day: Cell::default(),
            inflight: AtomicU32::new(0),
        }
    }

    /// The limits this state enforces; a reload keeps the state only when
    /// they are unchanged.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Admits one request against the rate and takes a concurrency slot,
    /// which the returned guard gives back however the request ends.
    pub fn admit(self: &Arc<Self>) -> Result<Slot, Reject> {
        let now = now_ns();
        let r = self.request_rate;
        self.requests
            .take(now, r.cost(1), r.capacity_ns)
            .map_err(|e| self.too_many("rate_limit_exceeded", "request rate limit reached", e))?;
        let before = self.inflight.fetch_add(1, Ordering::AcqRel);
        if before >= self.limits.max_concurrency {
            self.inflight.fetch_sub(1, Ordering::AcqRel);
            return Err(self.too_many(
                "concurrency_limit_exceeded",
                "too many requests in flight for this tenant",
                Exhausted {
                    retry_after: Duration::from_secs(1),
                },
            ));
        }
        Ok(Slot {
            limiter: self.clone(),
        })
    }

    /// Reserves `tokens` against both budgets before forwarding.
    pub fn reserve(self: &Arc<Self>, tokens: u64) -> Result<Reservation, Reject> {
        let now = now_ns();
        let (m, d) = (self.minute_rate, self.day_rate);
        self.minute
            .take(now, m.cost(tokens), m.capacity_ns)
            .map_err(|e| {
                self.too_many(
                    "tokens_quota_exceeded",
                    "token budget per minute reached",
                    e,
                )
            })?;
        if let Err(e) = self.day.take(now, d.cost(tokens), d.capacity_ns) {
            self.minute.refund(m.cost(tokens));
            return Err(self.too_many("tokens_quota_exceeded", "token budget per day reached", e));
        }
        Ok(Reservation {
            limiter: self.clone(),
            tokens,
        })
    }

    /// OpenAI's rate-limit headers: requests against `burst`, tokens against
    /// `tokens_per_minute`, resets as the time until full.
    pub fn headers(&self) -> [(&'static str, String); 6] {
        let now = now_ns();
        self.headers_with(self.requests.backlog(now), self.minute.backlog(now))
    }

    /// The same headers from backlogs measured elsewhere (the Redis cells).
    pub fn headers_with(&self, req_backlog: u64, tok_backlog: u64) -> [(&'static str, String); 6] {
        [
            ("x-ratelimit-limit-requests", self.limits.burst.to_string()),
            (
                "x-ratelimit-remaining-requests",
                self.request_rate.remaining(req_backlog).to_string(),
            ),
            (
                "x-ratelimit-reset-requests",
                openai_duration(Duration::from_nanos(req_backlog)),
            ),
            (
                "x-ratelimit-limit-tokens",
                self.limits.tokens_per_minute.to_string(),
            ),
            (
                "x-ratelimit-remaining-tokens",
                self.minute_rate.remaining(tok_backlog).to_string(),
            ),
            (
                "x-ratelimit-reset-tokens",
                openai_duration(Duration::from_nanos(tok_backlog)),
            ),
        ]
    }

    fn too_many(&self, code: &'static str, message: &'static str, e: Exhausted) -> Reject {
        let now = now_ns();
        let (req, tok) = (self.requests.backlog(now), self.minute.backlog(now));
        self.too_many_with(code, message, e.retry_after, req, tok)
    }

    /// A 429 with `Retry-After` in whole seconds, rounded up, and the
    /// rate-limit headers for the given backlogs.
    pub(crate) fn too_many_with(
        &self,
        code: &'static str,
        message: &'static str,
        retry_after: Duration,
        req_backlog: u64,
        tok_backlog: u64,
    ) -> Reject {
        let secs = retry_after.as_nanos().div_ceil(1_000_000_000).max(1);
        let mut r = Reject::new(429, code, message).with_header("retry-after", secs.to_string());
        r.headers
            .extend(self.headers_with(req_backlog, tok_backlog));
        r
    }
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
        let l = &self.limiter;
        let now = now_ns();
        let (m, d) = (l.minute_rate, l.day_rate);
        if used < self.tokens {
            let unused = self.tokens - used;
            l.minute.refund(m.cost(unused));
            l.day.refund(d.cost(unused));
        } else if used > self.tokens {
            let extra = used - self.tokens;
            l.minute.charge(now, m.cost(extra));
            l.day.charge(now, d.cost(extra));
        }
    }
}

/// Durations as OpenAI writes them: `120ms`, `1s`, `6m0s`, `1h2m3s`.
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
        assert_eq!((r.status, r.code), (429, "concurrency_limit_exceeded"));
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
