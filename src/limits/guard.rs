//! Limits that apply before a tenant is known: failed authentications per
//! client IP, and the gateway-wide caps on requests in flight and on the
//! request bodies they hold.
//!
//! Client IPs are an unbounded key space, so failures are counted in
//! `pingora-limits`' fixed-memory estimator: it may over-count under heavy
//! collision, which only makes brute force harder.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pingora_limits::rate::Rate;

use crate::observe::metrics::METRICS;
use crate::reject::{Reject, RejectCode};

/// Failed authentications per client IP over a sliding minute.
pub struct AuthFailures {
    per_minute: u32,
    rate: Rate,
}

impl AuthFailures {
    pub fn new(per_minute: u32) -> Self {
        AuthFailures {
            per_minute,
            rate: Rate::new(Duration::from_secs(60)),
        }
    }

    /// Refuses an IP that failed too often in the last minute.
    pub fn check(&self, ip: &IpAddr) -> Result<(), Reject> {
        let recent = self.rate.rate_with(ip, |r| {
            r.prev_samples as f64 * (1.0 - r.current_interval_fraction) + r.curr_samples as f64
        });
        if recent >= f64::from(self.per_minute) {
            return Err(Reject::new(
                429,
                RejectCode::AuthRateLimited,
                "too many failed authentications from this address",
            )
            .with_header(http::header::RETRY_AFTER, "60"));
        }
        Ok(())
    }

    pub fn record_failure(&self, ip: &IpAddr) {
        self.rate.observe(ip, 1);
    }
}

/// Requests in flight across the whole gateway.
pub struct Overload {
    max: usize,
    inflight: Arc<AtomicUsize>,
}

/// A place under the gateway-wide cap, freed on drop.
pub struct Admission(Arc<AtomicUsize>);

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Overload {
    pub fn new(max: usize) -> Self {
        Overload {
            max,
            inflight: Arc::default(),
        }
    }

    pub fn admit(&self) -> Result<Admission, Reject> {
        if self.inflight.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.inflight.fetch_sub(1, Ordering::AcqRel);
            return Err(overloaded("the gateway is at capacity; retry shortly"));
        }
        Ok(Admission(self.inflight.clone()))
    }
}

/// 503 `gateway_overloaded`: the gateway as a whole is full, whoever asks.
fn overloaded(message: &'static str) -> Reject {
    Reject::new(503, RejectCode::GatewayOverloaded, message)
        .with_header(http::header::RETRY_AFTER, "1")
}

/// Request-body bytes held in memory across every in-flight request,
/// against `[body] max_buffered_bytes`. Each judged body is held whole
/// (the invariant); this bounds their sum, which the in-flight cap alone
/// does not (10 000 requests of 8 MiB).
#[derive(Default)]
pub struct BodyBudget {
    held: Arc<AtomicU64>,
}

impl BodyBudget {
    /// An empty lease for one request's body.
    pub fn lease(&self) -> BodyLease {
        BodyLease {
            held: self.held.clone(),
            bytes: 0,
        }
    }
}

/// One request's share of the budget, given back on drop: on every path
/// the request's context ends by (answered, refused, abandoned, timed out).
pub struct BodyLease {
    held: Arc<AtomicU64>,
    bytes: u64,
}

impl BodyLease {
    /// Grows the lease to `total` bytes, if the gateway's sum stays within
    /// `cap`; a lease never shrinks until it is dropped.
    pub fn hold(&mut self, total: u64, cap: u64) -> Result<(), Reject> {
        let more = total.saturating_sub(self.bytes);
        if more == 0 {
            return Ok(());
        }
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(more).filter(|sum| *sum <= cap)
            })
            .map_err(|_| overloaded("the gateway holds too many request bodies; retry shortly"))?;
        self.bytes = total;
        METRICS
            .body_buffered
            .add(more.try_into().unwrap_or(i64::MAX));
        Ok(())
    }
}

impl Drop for BodyLease {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.held.fetch_sub(self.bytes, Ordering::AcqRel);
            METRICS
                .body_buffered
                .sub(self.bytes.try_into().unwrap_or(i64::MAX));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_leases_share_the_budget_and_give_it_back() {
        let budget = BodyBudget::default();
        let mut a = budget.lease();
        let mut b = budget.lease();
        assert!(a.hold(600, 1000).is_ok());
        assert!(a.hold(500, 1000).is_ok(), "a smaller total keeps the lease");
        let refused = b.hold(401, 1000).unwrap_err();
        assert_eq!(
            (refused.status, refused.code.as_str()),
            (503, "gateway_overloaded")
        );
        assert!(b.hold(400, 1000).is_ok());
        assert!(
            a.hold(601, 1000).is_err(),
            "growing past the sum is refused"
        );
        drop(a);
        assert_eq!(budget.held.load(Ordering::Acquire), 400);
        assert!(b.hold(1000, 1000).is_ok());
        drop(b);
        assert_eq!(budget.held.load(Ordering::Acquire), 0);
    }

    #[test]
    fn failures_lock_an_address_out() {
        let f = AuthFailures::new(3);
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let other: IpAddr = "192.0.2.8".parse().unwrap();
        for _ in 0..3 {
            assert!(f.check(&ip).is_ok());
            f.record_failure(&ip);
        }
        assert_eq!(f.check(&ip).unwrap_err().code, "auth_rate_limited");
        assert!(f.check(&other).is_ok());
    }

    #[test]
    fn the_cap_is_released_on_drop() {
        let o = Overload::new(1);
        let a = o.admit().unwrap();
        assert_eq!(
            o.admit().err().map(|r| r.code.as_str()),
            Some("gateway_overloaded")
        );
        drop(a);
        assert!(o.admit().is_ok());
    }
}
