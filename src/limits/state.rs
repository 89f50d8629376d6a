//! The local backend's limit state across restarts: every tenant's cells
//! (request rate, tokens per minute, tokens per day) written to
//! `[limits] state_file` every 10 s and at shutdown, and read at start.
//! Without it a restart, or the new process of an upgrade, handed every
//! tenant a fresh burst and a fresh daily budget.
//!
//! A cell is saved as its backlog (the time until it is full again) with
//! the wall-clock time of the save, so the next process charges what is
//! still owed: the refill in between is the only difference. A tenant whose
//! limits changed starts fresh, as on a reload. A missing or unreadable
//! file is logged and the gateway starts with empty cells; it never stops.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::LimitKind;
use crate::tenant::Tenants;

/// How often the state is written while the gateway runs.
pub const SAVE_EVERY: Duration = Duration::from_secs(10);

const VERSION: u32 = 1;

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    version: u32,
    /// Unix milliseconds of the save.
    saved_at_ms: u64,
    tenants: BTreeMap<String, TenantState>,
}

#[derive(Debug, Serialize, Deserialize)]
struct TenantState {
    /// The limits the cells enforced (`x-tenant-limits`): cells saved
    /// under other limits are not restored.
    limits: String,
    /// Backlog in nanoseconds, by cell (`req`, `tpm`, `tpd`).
    cells: BTreeMap<String, u64>,
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Writes every tenant's cells to `path`, atomically (a temporary file,
/// then a rename), so a crash mid-write leaves the previous state.
pub fn save(path: &Path, tenants: &Tenants) -> std::io::Result<()> {
    let state = StateFile {
        version: VERSION,
        saved_at_ms: unix_ms(SystemTime::now()),
        tenants: tenants
            .list
            .iter()
            .map(|t| {
                let cells = t
                    .limiter
                    .backlogs()
                    .into_iter()
                    .filter(|(_, backlog)| *backlog > 0)
                    .map(|(kind, backlog)| (kind.key().to_string(), backlog))
                    .collect();
                (
                    t.id.clone(),
                    TenantState {
                        limits: t.limits_header.clone(),
                        cells,
                    },
                )
            })
            .filter(|(_, s)| !s.cells.is_empty())
            .collect(),
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&state)?)?;
    std::fs::rename(&tmp, path)
}

/// Charges each tenant the backlog an earlier process saved, less the time
/// since; returns how many tenants had state restored.
pub fn restore(path: &Path, tenants: &Tenants) -> Result<usize, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let state: StateFile = serde_json::from_slice(&bytes)
        .map_err(|e| format!("{} is not a limit state file: {e}", path.display()))?;
    if state.version != VERSION {
        return Err(format!(
            "{} has version {}, not {VERSION}",
            path.display(),
            state.version
        ));
    }
    let elapsed_ns = unix_ms(SystemTime::now())
        .saturating_sub(state.saved_at_ms)
        .saturating_mul(1_000_000);
    let mut restored = 0;
    for (id, saved) in &state.tenants {
        let Some(tenant) = tenants
            .by_id(id)
            .filter(|t| t.limits_header == saved.limits)
        else {
            continue;
        };
        for (key, backlog) in &saved.cells {
            if let Some(kind) = LimitKind::from_key(key) {
                tenant
                    .limiter
                    .restore_backlog(kind, backlog.saturating_sub(elapsed_ns));
            }
        }
        restored += 1;
    }
    Ok(restored)
}

/// Restores the state at start, logging what happened; never fails.
pub fn restore_logged(path: &Path, tenants: &Tenants) {
    match restore(path, tenants) {
        Ok(n) => eprintln!("limit state: restored {n} tenants from {}", path.display()),
        Err(e) if !path.exists() => eprintln!("limit state: none yet ({e}); starting empty"),
        Err(e) => eprintln!("WARNING: limit state: {e}; starting empty"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenant::{Limits, Tenant};
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
        let mut t = Tenants::default();
        t.by_id.insert("acme".into(), 0);
        t.list
            .push(Arc::new(Tenant::new("acme", "o", "p", limits, None)));
        t
    }

    #[test]
    fn a_restart_keeps_what_was_used_and_changed_limits_start_fresh() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("limits.json");
        let before = tenants(0.001);
        let acme = before.by_id("acme").unwrap();
        acme.limiter.admit().unwrap();
        acme.limiter.admit().unwrap();
        acme.limiter.reserve(9_000).unwrap().settle(9_000);
        assert!(acme.limiter.admit().is_err(), "the burst is used");
        save(&path, &before).unwrap();

        let after = tenants(0.001);
        assert_eq!(restore(&path, &after), Ok(1));
        let acme = after.by_id("acme").unwrap();
        let r = acme.limiter.admit().unwrap_err();
        assert_eq!(
            r.code, "rate_limit_exceeded",
            "still used after the restart"
        );
        assert!(
            acme.limiter.reserve(2_000).is_err(),
            "9,000 of 10,000 tokens today are gone"
        );

        let changed = tenants(5.0);
        assert_eq!(restore(&path, &changed), Ok(0));
        assert!(changed.by_id("acme").unwrap().limiter.admit().is_ok());
    }

    #[test]
    fn a_missing_or_corrupt_file_is_an_error_to_log_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("limits.json");
        assert!(restore(&path, &tenants(1.0)).is_err());
        std::fs::write(&path, b"{\"version\": 1, \"tenants\": ").unwrap();
        assert!(restore(&path, &tenants(1.0))
            .unwrap_err()
            .contains("not a limit state file"));
        restore_logged(&path, &tenants(1.0));
    }
}
