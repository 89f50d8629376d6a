//! One interface over where limits live. [`Limiter`] admits requests and
//! reserves tokens and money in this process, or in Redis for the fleet
//! (falling back as `on_backend_error` says), across every scope of the
//! request, and hands back one [`Held`] guard per request. The proxy keeps
//! the guard and never learns which backend ran.

use std::sync::Arc;

use super::quota::Standing;
use super::redis::{Decision, FleetCells, FleetHold, RedisLimits};
use super::spend::Price;
use super::{local_rate_state, take_local, too_many, Ask, RateState, ScopeLimiter, Taken};
use crate::observe::metrics::InflightMark;
use crate::reject::Reject;
use crate::response::Usage;
use crate::tenant::Tenant;

/// Where the scopes' limit state lives.
pub enum Limiter {
    /// In this process: each instance enforces its own limits.
    Local,
    /// In Redis, shared by every instance (`[limits] backend = "redis"`).
    Fleet(Arc<RedisLimits>),
}

impl Limiter {
    /// The header stage: one request against the rate of the caller's key
    /// and of its tenant, and a concurrency slot in each that counts them,
    /// held until the guard drops. A request the gateway answers itself
    /// (`slot = false`) ends at once, so it holds none.
    ///
    /// `read` names scopes whose standing (after the admission) the
    /// request wants, for the quota answer: Redis reads them in the same
    /// round trip.
    pub async fn admit(
        &self,
        tenant: &Tenant,
        scopes: Vec<Arc<ScopeLimiter>>,
        request_id: &str,
        slot: bool,
        read: &[Arc<ScopeLimiter>],
    ) -> Result<Held, Reject> {
        let tenant_id = tenant.id.as_str();
        let ask = Ask {
            request: true,
            slot,
            ..Ask::default()
        };
        let mut held = Held {
            _inflight: InflightMark::new(tenant.metric_label()),
            scopes,
            slots: Vec::new(),
            reservation: Vec::new(),
            fleet: None,
            fleet_cells: None,
            fleet_tokens_known: false,
            reserved: None,
            standings: Vec::new(),
        };
        let asks: Vec<_> = held.scopes.iter().map(|s| (s, ask)).collect();
        match self.decide(tenant_id, request_id, &asks, read).await {
            Decision::Shared(granted) => {
                held.fleet_cells = Some(granted.cells);
                held.fleet = Some(granted.hold);
                held.standings = granted.standings;
            }
            Decision::Refused(refusal, cells) => {
                held.fleet_cells = Some(cells);
                return Err(held.refuse(&refusal));
            }
            Decision::Closed(r) => return Err(r),
            Decision::Local => held.slots = take_local(&asks).map_err(|r| held.refuse(&r))?,
            Decision::Unlimited => {}
        }
        if held.fleet_cells.is_none() {
            held.standings = read.iter().map(Standing::local).collect();
        }
        Ok(held)
    }

    /// The body stage: the model scope's rate and slot, then `tokens` and
    /// their estimated cost from every scope (key, model, tenant), all or
    /// nothing, held until [`Held::settle`]. Money is reserved only where
    /// the model has a price; model scopes have no budgets.
    pub async fn reserve(
        &self,
        held: &mut Held,
        tenant_id: &str,
        request_id: &str,
        model: Option<&Arc<ScopeLimiter>>,
        reserve: Reserve,
    ) -> Result<(), Reject> {
        if let Some(m) = model {
            let at = held.scopes.len().saturating_sub(1);
            held.scopes.insert(at, m.clone());
        }
        let asks: Vec<_> = held
            .scopes
            .iter()
            .map(|s| {
                let is_model = model.is_some_and(|m| Arc::ptr_eq(m, s));
                let ask = Ask {
                    request: is_model,
                    slot: is_model,
                    reserves: true,
                    tokens: reserve.tokens,
                    cost: reserve.cost,
                };
                (s, ask)
            })
            .collect();
        match self.decide(tenant_id, request_id, &asks, &[]).await {
            Decision::Shared(granted) => {
                held.absorb_cells(granted.cells);
                match &mut held.fleet {
                    Some(f) => f.absorb(granted.hold),
                    None => held.fleet = Some(granted.hold),
                }
            }
            Decision::Refused(refusal, cells) => {
                held.absorb_cells(cells);
                return Err(held.refuse(&refusal));
            }
            Decision::Closed(r) => return Err(r),
            Decision::Local => {
                held.reservation = take_local(&asks).map_err(|r| held.refuse(&r))?;
            }
            Decision::Unlimited => return Ok(()),
        }
        held.reserved = Some(reserve);
        Ok(())
    }

    /// Redis's answer for the fleet; in this process, `Local`: take the
    /// cells here. Boxed: a Redis round trip's state (about 1 KiB) would
    /// otherwise sit inside every request's future, moved with it, fleet
    /// or local.
    async fn decide(
        &self,
        tenant_id: &str,
        request_id: &str,
        asks: &[(&Arc<ScopeLimiter>, Ask)],
        read: &[Arc<ScopeLimiter>],
    ) -> Decision {
        match self {
            Limiter::Fleet(redis) => Box::pin(redis.take(tenant_id, request_id, asks, read)).await,
            Limiter::Local => Decision::Local,
        }
    }
}

/// What one request reserves at the body stage.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reserve {
    /// The prompt estimate plus every output token the request may use.
    pub tokens: u64,
    /// Those tokens at the model's prices, in nano-units.
    pub cost: u64,
    /// The model's prices, to settle the real cost; none costs nothing.
    pub price: Option<Price>,
}

/// What one request holds against its scopes' limits: concurrency slots
/// (counted in `portcullis_inflight_requests` while held) and, once the
/// body is judged, a reservation of tokens and money. Dropping it frees
/// the slots, however the request ends.
pub struct Held {
    _inflight: InflightMark,
    /// The scopes the request passes, in check order: key, model, tenant.
    scopes: Vec<Arc<ScopeLimiter>>,
    /// What this process holds from the header stage, and from the body
    /// stage (settled with the usage).
    slots: Vec<Taken>,
    reservation: Vec<Taken>,
    /// What Redis holds, settled and released in one script.
    fleet: Option<FleetHold>,
    /// Redis's figures for the headers: the request cells of both stages,
    /// the token cells once reserved.
    fleet_cells: Option<FleetCells>,
    fleet_tokens_known: bool,
    reserved: Option<Reserve>,
    /// The standings the admission was asked to read.
    standings: Vec<Standing>,
}

impl Held {
    /// The scopes' standing read at admission (`read`).
    pub fn standings(&self) -> &[Standing] {
        &self.standings
    }

    /// The standing of the request's most constrained scope, from wherever
    /// the state lives.
    pub fn rate_state(&self) -> RateState {
        let scopes = self.scopes.iter().map(|s| &**s);
        match &self.fleet_cells {
            Some(cells) => cells.rate_state(self.fleet_tokens_known, scopes),
            None => local_rate_state(scopes),
        }
    }

    /// Adds the reservation's answer to the header stage's.
    fn absorb_cells(&mut self, cells: FleetCells) {
        let all = self.fleet_cells.get_or_insert_with(FleetCells::default);
        all.requests.extend(cells.requests);
        all.tokens = cells.tokens;
        self.fleet_tokens_known = true;
    }

    fn refuse(&self, r: &super::Refusal) -> Reject {
        too_many(r, self.rate_state())
    }

    /// Settles the reservation with the usage the router reported, and
    /// returns what it really cost (nano-units) when the model has a
    /// price. When no usage arrived (an error, a disconnect), the whole
    /// reservation is charged: the gateway cannot know what the router
    /// spent. Redis settles and frees the slots in one script.
    pub fn settle(&mut self, usage: Option<&Usage>) -> Option<u64> {
        let reserved = self.reserved.take();
        let (tokens, cost) = match (reserved, usage) {
            (Some(r), Some(u)) => (u.total(), r.price.map(|p| p.cost(u))),
            (Some(r), None) => (r.tokens, r.price.map(|_| r.cost)),
            (None, _) => (0, None),
        };
        for t in &self.reservation {
            t.settle(tokens, cost.unwrap_or(0));
        }
        if let Some(fleet) = self.fleet.take() {
            fleet.settle_and_release(
                reserved.map(|r| (r.tokens, r.cost)),
                (tokens, cost.unwrap_or(0)),
            );
        }
        cost
    }
}

impl Drop for Held {
    /// A request that ends before settling (refused after admission, or
    /// answered by the gateway) still frees its Redis slots.
    fn drop(&mut self) {
        if let Some(fleet) = self.fleet.take() {
            fleet.settle_and_release(None, (0, 0));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::mem::size_of_val;

    use super::*;
    use crate::tenant::Limits;

    /// A request's future holds these stages' futures and is copied whole
    /// when Pingora boxes it, so a Redis round trip's state (about 1 KiB)
    /// stays boxed out of them. Sizes are the compiler's, not timings.
    #[test]
    fn the_limit_stages_keep_redis_state_out_of_the_requests_future() {
        let tenant = Tenant::new("acme", "acme-corp", "pro", Limits::each(100), None);
        let scopes = vec![tenant.limiter.clone()];
        let admit = Limiter::Local.admit(&tenant, scopes, "req-1", true, &[]);
        assert!(
            size_of_val(&admit) <= 768,
            "admit: {} bytes",
            size_of_val(&admit)
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let mut held = rt.block_on(admit).expect("admitted");
        let reserve = Reserve {
            tokens: 10,
            cost: 0,
            price: None,
        };
        let reserving = Limiter::Local.reserve(&mut held, "acme", "req-1", None, reserve);
        assert!(
            size_of_val(&reserving) <= 512,
            "reserve: {} bytes",
            size_of_val(&reserving)
        );
        rt.block_on(reserving).expect("reserved");
    }
}
