//! One scope's limit state. A request passes every scope that applies to
//! it, in this order: the key it presented, the model pattern its model
//! falls under, then its tenant. Each scope has the cells its limits name
//! and nothing else, so a scope with one limit costs one cell.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::cell::{Exhausted, Rate};
use super::spend::{Spend, Window};
use super::{Budget, LimitKind, DAY, MINUTE};
use crate::tenant::Limits;

/// Which level of the hierarchy a scope is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScopeKind {
    Key,
    Model,
    Tenant,
}

/// A scope's identity: its level and the key id, model pattern or tenant id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeName {
    pub kind: ScopeKind,
    pub name: String,
}

impl ScopeName {
    pub fn tenant(id: &str) -> ScopeName {
        ScopeName {
            kind: ScopeKind::Tenant,
            name: id.into(),
        }
    }

    pub fn key(id: &str) -> ScopeName {
        ScopeName {
            kind: ScopeKind::Key,
            name: id.into(),
        }
    }

    pub fn model(pattern: &str) -> ScopeName {
        ScopeName {
            kind: ScopeKind::Model,
            name: pattern.into(),
        }
    }

    /// `key`, `model` or `tenant`, as the quota answer names the level.
    pub fn level(&self) -> &'static str {
        match self.kind {
            ScopeKind::Key => "key",
            ScopeKind::Model => "model",
            ScopeKind::Tenant => "tenant",
        }
    }

    /// The scope's part of its cells' names in Redis and in the state
    /// file: empty for the tenant, so the tenant's cells keep their names.
    pub fn cell_prefix(&self) -> String {
        match self.kind {
            ScopeKind::Tenant => String::new(),
            ScopeKind::Key => format!("key:{}:", self.name),
            ScopeKind::Model => format!("model:{}:", self.name),
        }
    }

    /// A refusal's message: it names the scope, never its figures.
    pub fn refusal(&self, what: Refused) -> String {
        let limit = match what {
            Refused::Cell(LimitKind::Requests) => "request rate limit",
            Refused::Cell(LimitKind::TokensPerMinute) => "token quota per minute",
            Refused::Cell(LimitKind::TokensPerDay) => "token quota per day",
            Refused::Concurrency => "concurrency limit",
            Refused::Budget(Window::Day) => "budget per day",
            Refused::Budget(Window::Month) => "budget per month",
        };
        match self.kind {
            ScopeKind::Tenant => format!("the tenant's {limit} is reached"),
            ScopeKind::Key => format!("the per-key {limit} for {} is reached", self.name),
            ScopeKind::Model => format!("the per-model {limit} for {} is reached", self.name),
        }
    }
}

/// What refused a request within a scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Cell(LimitKind),
    Concurrency,
    Budget(Window),
}

/// A scope's limits as configured; every one is optional below the
/// tenant. Two equal values mean the state may carry over a reload.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ScopeLimits {
    /// `requests_per_second` with its `burst`.
    pub rate: Option<(f64, u32)>,
    pub tokens_per_minute: Option<u64>,
    pub tokens_per_day: Option<u64>,
    pub max_concurrency: Option<u32>,
    pub budget_per_day: Option<f64>,
    pub budget_per_month: Option<f64>,
}

impl ScopeLimits {
    /// A tenant's: every limit but the budgets is set.
    pub fn tenant(l: &Limits) -> ScopeLimits {
        ScopeLimits {
            rate: Some((l.requests_per_second, l.burst)),
            tokens_per_minute: Some(l.tokens_per_minute),
            tokens_per_day: Some(l.tokens_per_day),
            max_concurrency: Some(l.max_concurrency),
            budget_per_day: None,
            budget_per_month: None,
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == ScopeLimits::default()
    }
}

/// The live state of one scope, shared by every request it applies to.
#[derive(Debug)]
pub struct ScopeLimiter {
    pub name: ScopeName,
    limits: ScopeLimits,
    /// The request rate, when the scope has one.
    pub(crate) rate: Option<Budget>,
    /// Token budgets: per minute, then per day, those configured.
    pub(crate) tokens: Vec<Budget>,
    /// Money budgets: per day, then per month, those configured.
    pub(crate) spend: Vec<Spend>,
    pub(crate) max_concurrency: Option<u32>,
    inflight: AtomicU32,
}

impl ScopeLimiter {
    pub fn new(name: ScopeName, limits: &ScopeLimits) -> ScopeLimiter {
        let tokens = [
            (LimitKind::TokensPerMinute, limits.tokens_per_minute, MINUTE),
            (LimitKind::TokensPerDay, limits.tokens_per_day, DAY),
        ]
        .into_iter()
        .filter_map(|(kind, limit, window)| {
            limit.map(|l| Budget::new(kind, Rate::budget(l, window), l))
        })
        .collect();
        let spend = [
            (Window::Day, limits.budget_per_day),
            (Window::Month, limits.budget_per_month),
        ]
        .into_iter()
        .filter_map(|(w, b)| b.map(|b| Spend::new(w, b)))
        .collect();
        ScopeLimiter {
            name,
            rate: limits.rate.map(|(rps, burst)| {
                Budget::new(
                    LimitKind::Requests,
                    Rate::requests(rps, burst),
                    u64::from(burst),
                )
            }),
            tokens,
            spend,
            max_concurrency: limits.max_concurrency,
            limits: limits.clone(),
            inflight: AtomicU32::new(0),
        }
    }

    /// The one place that decides whether state carries over a reload:
    /// `previous`'s, when it enforced the same limits, else fresh cells.
    pub fn carry(
        previous: Option<&Arc<ScopeLimiter>>,
        name: ScopeName,
        limits: &ScopeLimits,
    ) -> Arc<ScopeLimiter> {
        previous
            .filter(|p| p.limits == *limits && p.name == name)
            .cloned()
            .unwrap_or_else(|| Arc::new(ScopeLimiter::new(name, limits)))
    }

    pub fn limits(&self) -> &ScopeLimits {
        &self.limits
    }

    /// Every GCRA cell: the rate, then the token budgets.
    pub fn cells(&self) -> impl Iterator<Item = &Budget> {
        self.rate.iter().chain(&self.tokens)
    }

    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Acquire)
    }

    /// Takes a concurrency slot, if the scope counts them.
    pub(crate) fn take_slot(&self) -> Result<(), Refused> {
        let Some(max) = self.max_concurrency else {
            return Ok(());
        };
        if self.inflight.fetch_add(1, Ordering::AcqRel) >= max {
            self.inflight.fetch_sub(1, Ordering::AcqRel);
            return Err(Refused::Concurrency);
        }
        Ok(())
    }

    pub(crate) fn release_slot(&self) {
        if self.max_concurrency.is_some() {
            self.inflight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// A refusal within one scope, before it becomes a 429.
#[derive(Debug, Clone)]
pub struct Refusal {
    pub scope: ScopeName,
    pub what: Refused,
    pub retry_after: Duration,
}

impl Refusal {
    pub(crate) fn cell(scope: &ScopeLimiter, kind: LimitKind, e: Exhausted) -> Refusal {
        Refusal {
            scope: scope.name.clone(),
            what: Refused::Cell(kind),
            retry_after: e.retry_after,
        }
    }
}
