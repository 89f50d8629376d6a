//! Money: prices per model, and budgets that count spend in calendar
//! windows (a UTC day, a UTC month) rather than GCRA cells, because finance
//! reads "50 a day" as "since midnight", not "over the last 24 hours".
//!
//! Amounts are integer nano-units of the platform's currency, so sums are
//! exact and a price per million tokens is a cost per token in milli-units:
//! `tokens × price × 1000` nano-units.

use std::sync::{Mutex, RwLock};
use std::time::Duration;

use time::{Date, Month, OffsetDateTime};

use crate::response::Usage;

/// Nano-units per unit of currency.
pub const NANO: f64 = 1e9;

/// One model's prices, per million tokens (`[prices."model"]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input: f64,
    pub output: f64,
    /// Cache reads (Anthropic) and cached prompt tokens (OpenAI); the input
    /// price when not given.
    pub cached_input: Option<f64>,
}

impl Price {
    /// What a reservation holds: the prompt estimate at the input price
    /// plus the output cap at the output price.
    pub fn estimate(&self, prompt_tokens: u64, output_tokens: u64) -> u64 {
        nano(prompt_tokens, self.input).saturating_add(nano(output_tokens, self.output))
    }

    /// What the router's reported usage really cost.
    pub fn cost(&self, usage: &Usage) -> u64 {
        let cached = usage.cached_tokens.min(usage.prompt_tokens);
        nano(usage.prompt_tokens - cached, self.input)
            .saturating_add(nano(cached, self.cached_input.unwrap_or(self.input)))
            .saturating_add(nano(usage.completion_tokens, self.output))
    }
}

fn nano(tokens: u64, per_million: f64) -> u64 {
    let v = (tokens as f64 * per_million * 1000.0).ceil();
    if v.is_finite() && v > 0.0 {
        v.min(u64::MAX as f64) as u64
    } else {
        0
    }
}

/// Logs, once per model, that a tenant with a budget calls a model with
/// no price: its tokens cost nothing against the budget. The set is
/// bounded, since a prefix allowlist admits any number of model names.
pub fn note_unpriced(tenant: &str, model: &str) {
    static SEEN: std::sync::LazyLock<RwLock<std::collections::HashSet<String>>> =
        std::sync::LazyLock::new(RwLock::default);
    // Every such request asks; a shared read answers all but the first.
    let known = |s: &std::collections::HashSet<String>| s.contains(model) || s.len() >= 1024;
    if known(&SEEN.read().unwrap_or_else(|p| p.into_inner())) {
        return;
    }
    let mut seen = SEEN.write().unwrap_or_else(|p| p.into_inner());
    if !known(&seen) && seen.insert(model.to_string()) {
        tracing::warn!(
            tenant,
            model,
            "a model with no [prices] entry costs nothing against budgets"
        );
    }
}

/// A budget's window: a calendar day or month, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Day,
    Month,
}

impl Window {
    /// The key suffix of the window's cells (Redis, the state file).
    pub fn key(self) -> &'static str {
        match self {
            Window::Day => "bpd",
            Window::Month => "bpm",
        }
    }

    /// The start and end (unix seconds) of the window holding `now`.
    pub fn bounds(self, now: u64) -> (u64, u64) {
        match self {
            Window::Day => {
                let start = now - now % 86_400;
                (start, start + 86_400)
            }
            Window::Month => {
                let t = OffsetDateTime::from_unix_timestamp(now.min(i64::MAX as u64) as i64)
                    .unwrap_or(OffsetDateTime::UNIX_EPOCH);
                let first = |y: i32, m: Month| {
                    Date::from_calendar_date(y, m, 1)
                        .map(|d| d.midnight().assume_utc().unix_timestamp().max(0) as u64)
                        .unwrap_or(0)
                };
                let (y, m) = (t.year(), t.month());
                let next_year = if m == Month::December { y + 1 } else { y };
                (first(y, m), first(next_year, m.next()))
            }
        }
    }
}

/// One money budget: the spend so far in the current window.
#[derive(Debug)]
pub struct Spend {
    pub window: Window,
    /// The budget, in nano-units.
    pub limit: u64,
    /// `(window start, spent)`; a new window starts at zero. A mutex, not
    /// atomics: the window and the sum must move together, and only
    /// scopes with a budget pay for it.
    state: Mutex<(u64, u64)>,
}

/// A budget that cannot hold a reservation: when its window ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Empty {
    pub retry_after: Duration,
}

impl Spend {
    pub fn new(window: Window, budget: f64) -> Spend {
        Spend {
            window,
            limit: (budget * NANO).clamp(0.0, u64::MAX as f64) as u64,
            state: Mutex::new((0, 0)),
        }
    }

    /// Runs `f` on the spend of the window holding `now` (a new window
    /// starts at zero), with that window's start.
    fn with<T>(&self, now: u64, f: impl FnOnce(u64, &mut u64) -> T) -> (u64, T) {
        let (start, _) = self.window.bounds(now);
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if s.0 != start {
            *s = (start, 0);
        }
        (start, f(start, &mut s.1))
    }

    /// Reserves `cost` if the window's spend stays within the budget;
    /// returns the window it was taken from.
    pub fn take(&self, now: u64, cost: u64) -> Result<u64, Empty> {
        let (start, fits) = self.with(now, |_, spent| {
            let after = spent.saturating_add(cost);
            let fits = after <= self.limit;
            if fits {
                *spent = after;
            }
            fits
        });
        if fits {
            Ok(start)
        } else {
            let (_, end) = self.window.bounds(now);
            Err(Empty {
                retry_after: Duration::from_secs(end.saturating_sub(now).max(1)),
            })
        }
    }

    /// Moves the spend of window `start` by `delta` (a refund below zero,
    /// a shortfall above, which may overdraw). A window that has ended
    /// keeps what it was charged.
    pub fn adjust(&self, now: u64, start: u64, delta: i128) {
        self.with(now, |current, spent| {
            if current == start {
                *spent = (i128::from(*spent) + delta).clamp(0, i128::from(u64::MAX)) as u64;
            }
        });
    }

    /// `(window start, spent)` now.
    pub fn spent(&self, now: u64) -> (u64, u64) {
        self.with(now, |_, spent| *spent)
    }

    /// Puts back what an earlier process spent in window `start`.
    pub fn restore(&self, now: u64, start: u64, spent: u64) {
        self.adjust(now, start, i128::from(spent));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEC_1_2026: u64 = 1_796_083_200; // 2026-12-01T00:00:00Z

    #[test]
    fn windows_are_calendar_days_and_months_in_utc() {
        let noon = DEC_1_2026 + 12 * 3600;
        assert_eq!(Window::Day.bounds(noon), (DEC_1_2026, DEC_1_2026 + 86_400));
        let (start, end) = Window::Month.bounds(noon);
        assert_eq!(start, DEC_1_2026);
        assert_eq!(end, DEC_1_2026 + 31 * 86_400, "January 1st, 2027");
        let feb = Window::Month.bounds(1_801_483_200); // 2027-02-01T12:00Z
        assert_eq!(feb.1 - feb.0, 28 * 86_400);
    }

    #[test]
    fn a_budget_reserves_settles_and_refuses_until_the_next_window() {
        let s = Spend::new(Window::Day, 1.0);
        let now = DEC_1_2026 + 3600;
        let w = s.take(now, 600_000_000).unwrap();
        assert!(s.take(now, 500_000_000).is_err());
        s.adjust(now, w, -200_000_000);
        assert_eq!(s.spent(now).1, 400_000_000);
        s.take(now, 600_000_000).unwrap();
        let e = s.take(now, 1).unwrap_err();
        assert_eq!(e.retry_after, Duration::from_secs(23 * 3600));
        // The next day starts empty, and yesterday's settlement lands nowhere.
        let tomorrow = DEC_1_2026 + 86_400;
        s.adjust(tomorrow, w, 500_000_000);
        assert_eq!(s.spent(tomorrow).1, 0);
        assert!(s.take(tomorrow, 1_000_000_000).is_ok());
    }

    #[test]
    fn costs_use_the_cached_price_for_cached_prompt_tokens() {
        let p = Price {
            input: 0.9,
            output: 2.0,
            cached_input: Some(0.45),
        };
        let u = Usage {
            prompt_tokens: 1_000_000,
            completion_tokens: 500_000,
            cached_tokens: 400_000,
            reasoning_tokens: 0,
        };
        // 600k × 0.9 + 400k × 0.45 + 500k × 2.0 = 0.54 + 0.18 + 1.0
        assert_eq!(p.cost(&u), 1_720_000_000);
        assert_eq!(p.estimate(1_000_000, 1_000_000), 2_900_000_000);
        let no_cache = Price {
            cached_input: None,
            ..p
        };
        assert_eq!(no_cache.cost(&u), 1_900_000_000);
    }
}
