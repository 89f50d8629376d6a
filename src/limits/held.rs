//! One interface over where limits live. [`Limiter`] admits requests and
//! reserves tokens in this process, or in Redis for the fleet (falling back
//! as `on_backend_error` says), and hands back one [`Held`] guard per
//! request. The proxy keeps the guard and never learns which backend ran.

use std::sync::Arc;

use super::redis::{Decision, RedisLimits, RemoteReservation, RemoteSlot};
use super::{RateState, Reservation, Slot, TenantLimiter};
use crate::observe::metrics::InflightMark;
use crate::reject::Reject;
use crate::tenant::Tenant;

/// Where the tenants' limit state lives.
pub enum Limiter {
    /// In this process: each instance enforces its own limits.
    Local,
    /// In Redis, shared by every instance (`[limits] backend = "redis"`).
    Fleet(Arc<RedisLimits>),
}

impl Limiter {
    /// The header stage: the request rate and a concurrency slot. The
    /// guard frees the slot when dropped, however the request ends.
    pub async fn admit(&self, tenant: &Tenant, request_id: &str) -> Result<Held, Reject> {
        let slot = match self {
            Limiter::Fleet(redis) => match redis.admit(tenant, request_id).await? {
                Decision::Shared(slot, backlog) => HeldSlot::Fleet {
                    _slot: slot,
                    backlog,
                },
                Decision::Local => HeldSlot::Local {
                    _slot: tenant.limiter.admit()?,
                },
                Decision::Unlimited => HeldSlot::Unlimited,
            },
            Limiter::Local => HeldSlot::Local {
                _slot: tenant.limiter.admit()?,
            },
        };
        Ok(Held {
            limiter: tenant.limiter.clone(),
            _inflight: InflightMark::new(&tenant.id),
            slot,
            tokens: None,
        })
    }

    /// Reserves `tokens` against the tenant's token budgets, held by
    /// `held` until [`Held::settle`].
    pub async fn reserve(
        &self,
        held: &mut Held,
        tenant: &Tenant,
        tokens: u64,
    ) -> Result<(), Reject> {
        let reserved = match self {
            Limiter::Fleet(redis) => match redis.reserve(tenant, tokens).await? {
                Decision::Shared(r, backlog) => HeldTokens::Fleet(r, backlog),
                Decision::Local => HeldTokens::Local(tenant.limiter.reserve(tokens)?),
                Decision::Unlimited => return Ok(()),
            },
            Limiter::Local => HeldTokens::Local(tenant.limiter.reserve(tokens)?),
        };
        held.tokens = Some(reserved);
        Ok(())
    }
}

/// What one request holds against its tenant's limits: a concurrency slot
/// (counted in `portcullis_inflight_requests` while held) and, once the
/// body is judged, a token reservation.
pub struct Held {
    limiter: Arc<TenantLimiter>,
    _inflight: InflightMark,
    slot: HeldSlot,
    tokens: Option<HeldTokens>,
}

/// Redis's backlogs (ns) ride with its guards, for the headers.
/// The slots are held for their `Drop`, which frees them.
enum HeldSlot {
    Local {
        _slot: Slot,
    },
    Fleet {
        _slot: RemoteSlot,
        backlog: u64,
    },
    /// Redis is down and `on_backend_error = "open"`: nothing is held.
    Unlimited,
}

enum HeldTokens {
    Local(Reservation),
    Fleet(RemoteReservation, u64),
}

impl Held {
    /// The tenant's rate-limit standing, from wherever the state lives.
    pub fn rate_state(&self) -> RateState {
        let req = match &self.slot {
            HeldSlot::Fleet { backlog, .. } => Some(*backlog),
            _ => None,
        };
        let tok = match &self.tokens {
            Some(HeldTokens::Fleet(_, backlog)) => Some(*backlog),
            _ => None,
        };
        match (req, tok) {
            (None, None) => self.limiter.rate_state(),
            (req, tok) => self
                .limiter
                .rate_state_with(req.unwrap_or(0), tok.unwrap_or(0)),
        }
    }

    /// Settles the reservation with the tokens the router reported. When
    /// none arrived (an error, a disconnect), the whole reservation is
    /// charged: the gateway cannot know what the router spent.
    pub fn settle(&mut self, used: Option<u64>) {
        match self.tokens.take() {
            Some(HeldTokens::Local(r)) => {
                let used = used.unwrap_or(r.tokens());
                r.settle(used);
            }
            Some(HeldTokens::Fleet(r, _)) => {
                let used = used.unwrap_or(r.tokens());
                r.settle(used);
            }
            None => {}
        }
    }
}
