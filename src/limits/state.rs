//! The local backend's limit state across restarts and upgrades: every
//! scope's cells (request rate, tokens per minute and per day, money per
//! day and month) written to `[limits] state_file` every 10 s and at
//! shutdown, and read at start. Without it a restart, or the new process
//! of an upgrade, handed every tenant a fresh burst and a fresh budget.
//!
//! An upgrade hands over through two more files beside it. The old process
//! writes `<state_file>.handoff` the moment it is told to hand its sockets
//! over (SIGQUIT), and the new process reads it before serving, so what was
//! used just before the upgrade is still used just after it. The old
//! process still serves for Pingora's close window and drains; when it
//! stops it writes `<state_file>.handoff.tail`, and the new process charges
//! the difference: what the old one took (or gave back, settling earlier
//! reservations) after handing over. Each cell counts the cell time it has
//! taken, less refunds, for that difference.
//!
//! A GCRA cell is saved as its backlog (the time until it is full again)
//! with the wall-clock time of the save, so the next process charges what
//! is still owed: the refill in between is the only difference. A money
//! window is saved as its start and its spend, and restored only into the
//! same window. A scope whose limits changed starts fresh, as on a reload.
//! A missing or unreadable file is logged and the gateway starts with empty
//! cells; it never stops.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::{unix_now, ScopeLimiter, ScopeLimits};
use crate::tenant::{Tenant, Tenants};

/// How often the state is written while the gateway runs.
pub const SAVE_EVERY: Duration = Duration::from_secs(10);

/// Version 1 held the tenant scope alone; it is still read.
const VERSION: u32 = 2;

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    /// Unix milliseconds of the save.
    saved_at_ms: u64,
    /// By tenant id, then by scope (`tenant`, `key:<id>`, `model:<pattern>`).
    tenants: BTreeMap<String, BTreeMap<String, ScopeState>>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ScopeState {
    /// The limits the cells enforced: cells saved under other limits are
    /// not restored.
    limits: ScopeLimits,
    /// GCRA backlog in nanoseconds, by cell (`req`, `tpm`, `tpd`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    cells: BTreeMap<String, u64>,
    /// Money by window (`bpd`, `bpm`): its start (unix seconds) and the
    /// nano-units spent in it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    spend: BTreeMap<String, (u64, u64)>,
    /// The cell time each cell has taken in the writing process, less
    /// refunds: only an upgrade's handoff and tail are compared by it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    used: BTreeMap<String, u64>,
}

/// Version 1: `{limits: "<x-tenant-limits>", cells}` per tenant.
#[derive(Debug, Deserialize)]
struct StateFileV1 {
    saved_at_ms: u64,
    tenants: BTreeMap<String, TenantStateV1>,
}

#[derive(Debug, Deserialize)]
struct TenantStateV1 {
    limits: String,
    cells: BTreeMap<String, u64>,
}

/// The file an upgrade hands the state over in.
pub fn handoff_path(state_file: &Path) -> PathBuf {
    beside(state_file, ".handoff")
}

/// What the old process writes when it stops, after a handoff.
pub fn tail_path(state_file: &Path) -> PathBuf {
    beside(state_file, ".handoff.tail")
}

fn beside(state_file: &Path, suffix: &str) -> PathBuf {
    let mut name = state_file.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Every scope a tenant has, with its name in the state file.
fn scopes(t: &Tenant) -> impl Iterator<Item = (String, &ScopeLimiter)> {
    let tenant = std::iter::once(&t.limiter);
    tenant
        .chain(t.model_scopes.values())
        .chain(&t.key_scopes)
        .map(|s| {
            let name = s.name.cell_prefix();
            let name = name.strip_suffix(':').unwrap_or("tenant").to_string();
            (name, &**s)
        })
}

fn scope_state(s: &ScopeLimiter, now: u64, unix: u64) -> Option<ScopeState> {
    let cells: BTreeMap<_, _> = s
        .cells()
        .map(|b| (b.kind.key().to_string(), b.backlog(now)))
        .filter(|(_, backlog)| *backlog > 0)
        .collect();
    let spend: BTreeMap<_, _> = s
        .spend
        .iter()
        .map(|m| (m.window.key().to_string(), m.spent(unix)))
        .filter(|(_, (_, spent))| *spent > 0)
        .collect();
    let used: BTreeMap<_, _> = s
        .cells()
        .map(|b| (b.kind.key().to_string(), b.used()))
        .filter(|(_, used)| *used > 0)
        .collect();
    (!cells.is_empty() || !spend.is_empty() || !used.is_empty()).then(|| ScopeState {
        limits: s.limits().clone(),
        cells,
        spend,
        used,
    })
}

/// Writes every scope's cells to `path`, atomically (a temporary file,
/// then a rename), so a crash mid-write leaves the previous state.
pub fn save(path: &Path, tenants: &Tenants) -> std::io::Result<()> {
    let (now, unix) = (super::now_ns(), unix_now());
    let state = StateFile {
        version: VERSION,
        saved_at_ms: unix_ms(SystemTime::now()),
        tenants: tenants
            .list
            .iter()
            .map(|t| {
                let saved = scopes(t)
                    .filter_map(|(name, s)| Some((name, scope_state(s, now, unix)?)))
                    .collect::<BTreeMap<_, _>>();
                (t.id.clone(), saved)
            })
            .filter(|(_, s)| !s.is_empty())
            .collect(),
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, serde_json::to_vec(&state)?)?;
    std::fs::rename(&tmp, path)
}

/// Charges each scope what an earlier process saved, less the refill
/// since; returns how many tenants had state restored.
pub fn restore(path: &Path, tenants: &Tenants) -> Result<usize, String> {
    Ok(Saved::read(path, tenants)?.restore_into(tenants))
}

/// [`restore`] from the file's bytes.
pub fn restore_bytes(bytes: &[u8], tenants: &Tenants) -> Result<usize, String> {
    Ok(Saved::parse(bytes, tenants)?.restore_into(tenants))
}

/// A state file as read.
#[derive(Debug)]
pub struct Saved(StateFile);

impl Saved {
    pub fn read(path: &Path, tenants: &Tenants) -> Result<Saved, String> {
        let bytes =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Saved::parse(&bytes, tenants).map_err(|e| format!("{}{e}", path.display()))
    }

    /// Errors read after the file's name.
    pub fn parse(bytes: &[u8], tenants: &Tenants) -> Result<Saved, String> {
        let not_state = |e: serde_json::Error| format!(" is not a limit state file: {e}");
        let version = serde_json::from_slice::<serde_json::Value>(bytes)
            .map_err(not_state)?
            .get("version")
            .and_then(serde_json::Value::as_u64);
        match version {
            Some(2) => serde_json::from_slice(bytes).map(Saved).map_err(not_state),
            Some(1) => Ok(Saved(upgrade_v1(
                serde_json::from_slice(bytes).map_err(not_state)?,
                tenants,
            ))),
            v => Err(format!(" has version {v:?}, not {VERSION}")),
        }
    }

    /// Every scope saved under the limits it has now, with its state.
    fn matching<'a>(
        &'a self,
        tenants: &'a Tenants,
    ) -> impl Iterator<Item = (&'a str, &'a ScopeLimiter, &'a ScopeState)> + 'a {
        self.0.tenants.iter().flat_map(move |(id, saved)| {
            tenants.by_id(id).into_iter().flat_map(move |tenant| {
                scopes(tenant).filter_map(move |(name, s)| {
                    let state = saved.get(&name).filter(|v| v.limits == *s.limits())?;
                    Some((id.as_str(), s, state))
                })
            })
        })
    }

    /// Charges each scope what was saved, less the refill since; returns
    /// how many tenants had state restored.
    pub fn restore_into(&self, tenants: &Tenants) -> usize {
        let elapsed_ns = unix_ms(SystemTime::now())
            .saturating_sub(self.0.saved_at_ms)
            .saturating_mul(1_000_000);
        let unix = unix_now();
        let mut restored = std::collections::BTreeSet::new();
        for (id, s, saved) in self.matching(tenants) {
            for b in s.cells() {
                if let Some(backlog) = saved.cells.get(b.kind.key()) {
                    b.restore(backlog.saturating_sub(elapsed_ns));
                }
            }
            for m in &s.spend {
                if let Some((start, spent)) = saved.spend.get(m.window.key()) {
                    m.restore(unix, *start, *spent);
                }
            }
            restored.insert(id);
        }
        restored.len()
    }

    /// Charges what the process that wrote this handoff did after writing
    /// it, as its `tail` tells: the difference of each cell's use, and of
    /// each money window's spend. Returns how many scopes moved.
    pub fn tail_into(&self, tail: &Saved, tenants: &Tenants) -> usize {
        let unix = unix_now();
        let mut moved = 0;
        for (id, s, after) in tail.matching(tenants) {
            let name = s.name.cell_prefix();
            let name = name.strip_suffix(':').unwrap_or("tenant");
            let before = self.0.tenants.get(id).and_then(|t| t.get(name));
            for b in s.cells() {
                let key = b.kind.key();
                let was = before.and_then(|v| v.used.get(key)).copied().unwrap_or(0);
                let is = after.used.get(key).copied().unwrap_or(0);
                b.add_used(i128::from(is) - i128::from(was));
            }
            for m in &s.spend {
                let key = m.window.key();
                let Some((start, is)) = after.spend.get(key) else {
                    continue;
                };
                let was = before
                    .and_then(|v| v.spend.get(key))
                    .filter(|(w, _)| w == start)
                    .map_or(0, |(_, spent)| *spent);
                m.adjust(unix, *start, i128::from(*is) - i128::from(was));
            }
            moved += 1;
        }
        moved
    }
}

/// A version 1 file as version 2: its cells were the tenant scope's.
fn upgrade_v1(v1: StateFileV1, tenants: &Tenants) -> StateFile {
    let tenants = v1
        .tenants
        .into_iter()
        .filter_map(|(id, saved)| {
            let t = tenants
                .by_id(&id)
                .filter(|t| t.limits_header == saved.limits)?;
            let scope = ScopeState {
                limits: t.limiter.limits().clone(),
                cells: saved.cells,
                spend: BTreeMap::new(),
                used: BTreeMap::new(),
            };
            Some((id, BTreeMap::from([("tenant".to_string(), scope)])))
        })
        .collect();
    StateFile {
        version: VERSION,
        saved_at_ms: v1.saved_at_ms,
        tenants,
    }
}

/// Restores the state at start, logging what happened; never fails.
pub fn restore_logged(path: &Path, tenants: &Tenants) {
    match restore(path, tenants) {
        Ok(n) => eprintln!("limit state: restored {n} tenants from {}", path.display()),
        Err(e) if !path.exists() => eprintln!("limit state: none yet ({e}); starting empty"),
        Err(e) => eprintln!("WARNING: limit state: {e}; starting empty"),
    }
}

/// The new process of an upgrade: the state the old one handed over, once
/// it is there (it is written when the old process is told to hand over,
/// which is before the sockets arrive), else the regular state file.
/// Returns the handoff, to charge the old process's tail against later.
pub fn take_handoff(state_file: &Path, tenants: &Tenants, wait: Duration) -> Option<Saved> {
    let handoff = handoff_path(state_file);
    let deadline = std::time::Instant::now() + wait;
    while !handoff.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    if !handoff.exists() {
        eprintln!("WARNING: limit state: no handoff from the old process; reading the state file");
        restore_logged(state_file, tenants);
        return None;
    }
    let saved = Saved::read(&handoff, tenants);
    if let Err(e) = std::fs::remove_file(&handoff) {
        eprintln!(
            "WARNING: limit state: cannot remove {}: {e}",
            handoff.display()
        );
    }
    match saved {
        Ok(saved) => {
            let n = saved.restore_into(tenants);
            eprintln!(
                "limit state: restored {n} tenants from {}",
                handoff.display()
            );
            Some(saved)
        }
        Err(e) => {
            eprintln!("WARNING: limit state: {e}; starting empty");
            None
        }
    }
}

/// Charges the old process's tail against its `handoff`, if it has been
/// written; true once done (the file is then removed).
pub fn take_tail(state_file: &Path, handoff: &Saved, tenants: &Tenants) -> bool {
    let path = tail_path(state_file);
    if !path.exists() {
        return false;
    }
    match Saved::read(&path, tenants) {
        Ok(tail) => {
            let n = handoff.tail_into(&tail, tenants);
            tracing::info!(scopes = n, "limit state: the old process's tail charged");
        }
        Err(e) => tracing::warn!(error = %e, "limit state: the old process's tail is unreadable"),
    }
    if let Err(e) = std::fs::remove_file(&path) {
        tracing::warn!(error = %e, path = %path.display(), "cannot remove the tail");
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{take_local, Ask};
    use crate::tenant::Limits;
    use std::sync::Arc;

    fn tenants(rps: f64) -> Tenants {
        let limits = Limits {
            requests_per_second: rps,
            burst: 2,
            tokens_per_minute: 100_000,
            tokens_per_day: 10_000,
            max_concurrency: 10,
            max_body_bytes: 1024,
            max_prompt_tokens: 100,
            max_output_tokens: 100,
        };
        let mut tenant = Tenant::new("acme", "o", "p", limits, None);
        tenant.limiter = Arc::new(ScopeLimiter::new(
            crate::limits::ScopeName::tenant("acme"),
            &ScopeLimits {
                budget_per_day: Some(1.0),
                ..ScopeLimits::tenant(&tenant.limits)
            },
        ));
        Tenants::with(vec![Arc::new(tenant)])
    }

    fn admit(t: &Tenant) -> bool {
        let ask = Ask {
            request: true,
            ..Ask::default()
        };
        take_local(&[(&t.limiter, ask)]).is_ok()
    }

    fn reserve(t: &Tenant, tokens: u64, cost: u64) -> bool {
        let ask = Ask {
            reserves: true,
            tokens,
            cost,
            ..Ask::default()
        };
        take_local(&[(&t.limiter, ask)]).is_ok()
    }

    #[test]
    fn a_restart_keeps_what_was_used_and_changed_limits_start_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("limits.json");
        let before = tenants(0.001);
        let acme = before.by_id("acme").unwrap();
        assert!(admit(acme) && admit(acme));
        assert!(reserve(acme, 9_000, 700_000_000));
        assert!(!admit(acme), "the burst is used");
        save(&path, &before).unwrap();

        let after = tenants(0.001);
        assert_eq!(restore(&path, &after), Ok(1));
        let acme = after.by_id("acme").unwrap();
        assert!(!admit(acme), "still used after the restart");
        assert!(
            !reserve(acme, 2_000, 0),
            "9,000 of 10,000 tokens today are gone"
        );
        assert!(
            !reserve(acme, 0, 400_000_000),
            "0.7 of today's 1.0 is spent"
        );
        assert!(reserve(acme, 1_000, 300_000_000), "what is left is left");

        let changed = tenants(5.0);
        assert_eq!(restore(&path, &changed), Ok(0));
        assert!(admit(changed.by_id("acme").unwrap()));
    }

    #[test]
    fn a_tail_charges_what_the_old_process_did_after_handing_over() {
        let dir = tempfile::tempdir().unwrap();
        let (handoff, tail) = (dir.path().join("h"), dir.path().join("t"));
        let old = tenants(0.001);
        let acme = old.by_id("acme").unwrap();
        let ask = Ask {
            reserves: true,
            tokens: 4_000,
            cost: 300_000_000,
            ..Ask::default()
        };
        let before = take_local(&[(&acme.limiter, ask)]).unwrap();
        save(&handoff, &old).unwrap();
        // After the handoff the old process admits a request and settles
        // the reservation it held to 1,000 tokens and 0.1.
        assert!(admit(acme));
        before[0].settle(1_000, 100_000_000);
        save(&tail, &old).unwrap();

        let new = tenants(0.001);
        let h = Saved::read(&handoff, &new).unwrap();
        assert_eq!(h.restore_into(&new), 1);
        let t = Saved::read(&tail, &new).unwrap();
        assert_eq!(h.tail_into(&t, &new), 1);
        let acme = new.by_id("acme").unwrap();
        // Tokens: 1,000 of 10,000 used; money: 0.1 of 1.0; requests: one
        // of the burst of 2.
        assert!(reserve(acme, 9_000, 0) && !reserve(acme, 1, 0));
        assert_eq!(acme.limiter.spend[0].spent(unix_now()).1, 100_000_000);
        assert!(admit(acme) && !admit(acme));
    }

    #[test]
    fn a_version_1_file_still_restores_the_tenant_scope() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("limits.json");
        let t = tenants(0.001);
        let header = &t.by_id("acme").unwrap().limits_header;
        let v1 = serde_json::json!({
            "version": 1,
            "saved_at_ms": unix_ms(SystemTime::now()),
            "tenants": {"acme": {"limits": header, "cells": {"req": 1_000_000_000_000u64 * 2}}},
        });
        std::fs::write(&path, v1.to_string()).unwrap();
        assert_eq!(restore(&path, &t), Ok(1));
        assert!(
            !admit(t.by_id("acme").unwrap()),
            "the saved burst stays used"
        );
    }

    #[test]
    fn a_missing_or_corrupt_file_is_an_error_to_log_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("limits.json");
        assert!(restore(&path, &tenants(1.0)).is_err());
        std::fs::write(&path, b"{\"version\": 2, \"tenants\": ").unwrap();
        assert!(restore(&path, &tenants(1.0))
            .unwrap_err()
            .contains("not a limit state file"));
        std::fs::write(&path, b"{\"version\": 7}").unwrap();
        assert!(restore(&path, &tenants(1.0))
            .unwrap_err()
            .contains("version"));
        restore_logged(&path, &tenants(1.0));
    }
}
