//! Limits that apply before a tenant is known: failed authentications per
//! client IP, and a gateway-wide in-flight cap.
//!
//! Client IPs are an unbounded key space, so failures are counted in
//! `pingora-limits`' fixed-memory estimator: it may over-count under heavy
//! collision, which only makes brute force harder.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pingora_limits::rate::Rate;

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
            .with_header("retry-after", "60"));
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
            return Err(Reject::new(
                503,
                RejectCode::GatewayOverloaded,
                "the gateway is at capacity; retry shortly",
            )
            .with_header("retry-after", "1"));
        }
        Ok(Admission(self.inflight.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
