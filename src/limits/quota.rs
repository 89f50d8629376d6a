//! `GET /v1/quota`: where the caller stands in every scope that applies to
//! it (its key's, its tenant's model patterns', its tenant's), without
//! reading headers off a completion. It counts as a request, and shows the
//! standing after it. Another key's or tenant's figures are never in it.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use super::spend::NANO;
use super::{now_ns, unix_now, LimitKind, ScopeLimiter};

/// One scope's standing, read here or from Redis.
#[derive(Debug)]
pub struct Standing {
    pub scope: Arc<ScopeLimiter>,
    /// The backlog (ns) of each of [`ScopeLimiter::cells`], in order.
    pub backlogs: Vec<u64>,
    pub inflight: u32,
    /// The spend (nano-units) in the current window of each budget.
    pub spent: Vec<u64>,
}

impl Standing {
    /// This process's cells.
    pub fn local(scope: &Arc<ScopeLimiter>) -> Standing {
        let (now, unix) = (now_ns(), unix_now());
        Standing {
            backlogs: scope.cells().map(|b| b.backlog(now)).collect(),
            inflight: scope.inflight(),
            spent: scope.spend.iter().map(|s| s.spent(unix).1).collect(),
            scope: scope.clone(),
        }
    }
}

/// The JSON answer.
pub fn answer(tenant: &str, key_id: Option<&str>, standings: &[Standing]) -> Vec<u8> {
    let unix = unix_now();
    let scopes: Vec<Value> = standings.iter().map(|s| scope_json(s, unix)).collect();
    let body = json!({
        "object": "quota",
        "tenant": tenant,
        "key_id": key_id,
        "scopes": scopes,
    });
    // A Value always serialises.
    serde_json::to_vec(&body).unwrap_or_default()
}

fn scope_json(s: &Standing, unix: u64) -> Value {
    let scope = &s.scope;
    let mut limits = Map::new();
    for (b, backlog) in scope.cells().zip(&s.backlogs) {
        let state = b.state(*backlog);
        let mut entry = json!({
            "limit": state.limit,
            "remaining": state.remaining,
            "full_in_seconds": state.reset.as_secs_f64(),
            "full_at": at(state.reset),
        });
        let name = match b.kind {
            LimitKind::Requests => {
                if let Some((rps, _)) = scope.limits().rate {
                    entry["per_second"] = json!(rps);
                }
                "requests"
            }
            LimitKind::TokensPerMinute => "tokens_per_minute",
            LimitKind::TokensPerDay => "tokens_per_day",
        };
        limits.insert(name.into(), entry);
    }
    if let Some(max) = scope.max_concurrency {
        limits.insert(
            "concurrency".into(),
            json!({
                "limit": max,
                "in_flight": s.inflight,
                "remaining": max.saturating_sub(s.inflight),
            }),
        );
    }
    for (budget, spent) in scope.spend.iter().zip(&s.spent) {
        let (start, end) = budget.window.bounds(unix);
        let money = |n: u64| n as f64 / NANO;
        let name = match budget.window {
            super::spend::Window::Day => "budget_per_day",
            super::spend::Window::Month => "budget_per_month",
        };
        limits.insert(
            name.into(),
            json!({
                "limit": money(budget.limit),
                "spent": money(*spent),
                "remaining": money(budget.limit.saturating_sub(*spent)),
                "window_start": rfc3339(start),
                "full_at": rfc3339(end),
                "full_in_seconds": end.saturating_sub(unix),
            }),
        );
    }
    json!({
        "scope": scope.name.level(),
        "name": scope.name.name,
        "limits": limits,
    })
}

fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

/// Now plus `d`, rounded up to the second, so "full again" is never early.
fn at(d: Duration) -> String {
    let t = SystemTime::now() + d;
    let up = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |u| u.as_secs() + u64::from(u.subsec_nanos() > 0));
    rfc3339(up)
}
