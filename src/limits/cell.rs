//! A GCRA cell: one atomic "theoretical arrival time", the core of both the
//! request-rate limit and the token budgets.
//!
//! Every admission costs some nanoseconds of the cell's time (one emission
//! interval for a request, `n` token intervals for `n` tokens). A cost is
//! admitted while the backlog it leaves is within the cell's capacity.
//! Updates are a compare-and-swap loop: lock-free and exact, unlike a
//! count-min sketch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Nanoseconds since the process's limiter epoch.
pub fn now_ns() -> u64 {
    u64::try_from(EPOCH.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// The theoretical arrival time of the next unit, in epoch nanoseconds,
/// and the cell time taken so far less what was given back: an upgrade's
/// new process charges what the old one took after handing over.
#[derive(Debug, Default)]
pub struct Cell {
    tat: AtomicU64,
    used: AtomicU64,
}

/// A refused admission: how long until it would fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exhausted {
    pub retry_after: Duration,
}

impl Cell {
    /// Admits `cost` if the resulting backlog stays within `capacity`.
    pub fn take(&self, now: u64, cost: u64, capacity: u64) -> Result<(), Exhausted> {
        let mut current = self.tat.load(Ordering::Acquire);
        loop {
            let next = current.max(now).saturating_add(cost);
            let backlog = next - now;
            if backlog > capacity {
                return Err(Exhausted {
                    retry_after: Duration::from_nanos(backlog - capacity),
                });
            }
            match self
                .tat
                .compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    self.used.fetch_add(cost, Ordering::Relaxed);
                    return Ok(());
                }
                Err(actual) => current = actual,
            }
        }
    }

    /// Gives `cost` back (an unused reservation).
    pub fn refund(&self, cost: u64) {
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some(t.saturating_sub(cost))
            });
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                Some(u.saturating_sub(cost))
            });
    }

    /// Charges `cost` unconditionally: settlement may overdraw, and later
    /// admissions wait until the backlog drains.
    pub fn charge(&self, now: u64, cost: u64) {
        let _ = self
            .tat
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                Some(t.max(now).saturating_add(cost))
            });
        self.used.fetch_add(cost, Ordering::Relaxed);
    }

    /// The cell time taken so far, less what was given back.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// The time until the cell is back to full capacity.
    pub fn backlog(&self, now: u64) -> u64 {
        self.tat.load(Ordering::Acquire).saturating_sub(now)
    }
}

/// A limit expressed on a cell: `limit` units per `window`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Nanoseconds of cell time one unit costs (may be fractional).
    pub unit_ns: f64,
    /// The backlog the cell may hold, in nanoseconds.
    pub capacity_ns: u64,
}

impl Rate {
    /// `burst` units at once, refilling at `per_second`.
    pub fn requests(per_second: f64, burst: u32) -> Rate {
        let unit_ns = 1e9 / per_second;
        Rate {
            unit_ns,
            capacity_ns: (unit_ns * f64::from(burst)).min(u64::MAX as f64) as u64,
        }
    }

    /// `limit` units per `window`, all of which may be spent at once.
    pub fn budget(limit: u64, window: Duration) -> Rate {
        let window_ns = window.as_nanos() as f64;
        Rate {
            unit_ns: if limit == 0 {
                f64::INFINITY
            } else {
                window_ns / limit as f64
            },
            capacity_ns: window.as_nanos().min(u128::from(u64::MAX)) as u64,
        }
    }

    /// The cell time `units` cost, rounded up.
    pub fn cost(&self, units: u64) -> u64 {
        if units == 0 {
            return 0;
        }
        let c = (units as f64 * self.unit_ns).ceil();
        if c.is_nan() || c >= u64::MAX as f64 {
            u64::MAX
        } else {
            c as u64
        }
    }

    /// Whole units that could be admitted now, given a backlog.
    pub fn remaining(&self, backlog: u64) -> u64 {
        let free = self.capacity_ns.saturating_sub(backlog) as f64;
        if self.unit_ns.is_finite() && self.unit_ns > 0.0 {
            (free / self.unit_ns).floor() as u64
        } else {
            0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_is_admitted_at_once_from_idle_then_the_rate_applies() {
        let c = Cell::default();
        let r = Rate::requests(10.0, 5);
        let now = 1_000_000_000;
        for _ in 0..5 {
            c.take(now, r.cost(1), r.capacity_ns).unwrap();
        }
        let e = c.take(now, r.cost(1), r.capacity_ns).unwrap_err();
        assert_eq!(e.retry_after, Duration::from_millis(100));
        assert_eq!(r.remaining(c.backlog(now)), 0);
        // 100 ms later one more fits.
        c.take(now + 100_000_000, r.cost(1), r.capacity_ns).unwrap();
        // Idle for a second: full again.
        assert_eq!(r.remaining(c.backlog(now + 2_000_000_000)), 5);
    }

    #[test]
    fn budgets_refund_and_overdraw() {
        let c = Cell::default();
        let r = Rate::budget(1000, Duration::from_secs(60));
        let now = 5_000_000_000;
        c.take(now, r.cost(800), r.capacity_ns).unwrap();
        assert_eq!(r.remaining(c.backlog(now)), 200);
        assert!(c.take(now, r.cost(300), r.capacity_ns).is_err());
        c.refund(r.cost(500));
        assert_eq!(r.remaining(c.backlog(now)), 700);
        c.charge(now, r.cost(2000));
        assert_eq!(r.remaining(c.backlog(now)), 0);
        assert!(c.take(now, r.cost(1), r.capacity_ns).is_err());
    }

    #[test]
    fn a_zero_budget_admits_nothing() {
        let c = Cell::default();
        let r = Rate::budget(0, Duration::from_secs(60));
        assert!(c.take(1, r.cost(1), r.capacity_ns).is_err());
        assert!(c.take(1, r.cost(0), r.capacity_ns).is_ok());
    }

    #[test]
    fn concurrent_takes_are_exact() {
        let c = std::sync::Arc::new(Cell::default());
        let r = Rate::requests(1.0, 1000);
        let now = 10;
        let admitted: u32 = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| {
                    let c = c.clone();
                    s.spawn(move || {
                        (0..500)
                            .filter(|_| c.take(now, r.cost(1), r.capacity_ns).is_ok())
                            .count() as u32
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(admitted, 1000);
    }

    proptest::proptest! {
        /// In any interval between two admitted requests, GCRA admits at
        /// most the burst plus the rate times the interval (plus one for
        /// the rounding of a unit's cost), whatever the arrival pattern.
        #[test]
        fn never_admits_more_than_rate_plus_burst_in_any_window(
            per_second in 0.5f64..1000.0,
            burst in 1u32..100,
            gaps in proptest::collection::vec(0u64..50_000_000, 1..300),
        ) {
            let c = Cell::default();
            let r = Rate::requests(per_second, burst);
            let mut now = 1_000_000_000u64;
            let mut admitted = Vec::new();
            for gap in gaps {
                now += gap;
                if c.take(now, r.cost(1), r.capacity_ns).is_ok() {
                    admitted.push(now);
                }
            }
            for (i, start) in admitted.iter().enumerate() {
                for (j, end) in admitted.iter().enumerate().skip(i) {
                    let window_s = (end - start) as f64 / 1e9;
                    let allowed = f64::from(burst) + per_second * window_s + 1.0;
                    proptest::prop_assert!(
                        (j - i + 1) as f64 <= allowed,
                        "{} admitted in {window_s} s (allowed {allowed})", j - i + 1
                    );
                }
            }
        }
    }
}
