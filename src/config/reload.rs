//! Hot reload: watch the policy files, rebuild the whole snapshot, and swap
//! it in only if every file is valid.
//!
//! Directories are watched rather than files, because editors and config
//! managers replace a file by renaming a new one over it, which a watch on
//! the old inode would miss. Events are debounced, so a burst of writes
//! makes one reload. In-flight requests keep the snapshot they started
//! with; tenants whose limits did not change keep their limiter state.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use notify::{RecursiveMode, Watcher};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use arc_swap::ArcSwap;

use super::diag::{ConfigErrors, Diagnostic};
use super::gateway::GatewayConfig;
use super::process;
use super::{SharedSnapshot, Snapshot};
use crate::identity::jwt::JwksSource;
use crate::identity::mtls::TlsMaterial;
use crate::observe::metrics::METRICS;

/// Quiet time after the last file event before reloading.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Rebuilds and swaps the snapshot.
pub struct Reloader {
    gateway_path: PathBuf,
    shared: SharedSnapshot,
    generation: AtomicU64,
    /// The configuration the process started with, for its process-only
    /// settings.
    started: Arc<GatewayConfig>,
    /// Process-only keys the snapshot in force has changed.
    restart_needed: ArcSwap<Vec<&'static str>>,
    /// The TLS listeners' certificates, reloaded with the snapshot.
    tls: Option<Arc<ArcSwap<TlsMaterial>>>,
}

impl Reloader {
    pub fn new(
        gateway_path: &Path,
        shared: SharedSnapshot,
        tls: Option<Arc<ArcSwap<TlsMaterial>>>,
    ) -> Self {
        METRICS.config_generation.set(1);
        // Export both series from the start, so "no errors yet" reads as 0.
        for result in ["ok", "error"] {
            METRICS.config_reloads.with_label_values(&[result]);
        }
        METRICS.config_restart_needed.set(0);
        Reloader {
            gateway_path: gateway_path.to_path_buf(),
            started: shared.load().gateway.clone(),
            shared,
            generation: AtomicU64::new(1),
            restart_needed: ArcSwap::from_pointee(Vec::new()),
            tls,
        }
    }

    /// The generation of the snapshot in force (1 at start).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Process-only keys that differ from the ones the process started
    /// with: in force only after a restart or an upgrade.
    pub fn restart_needed(&self) -> Arc<Vec<&'static str>> {
        self.restart_needed.load_full()
    }

    /// Loads a new snapshot and swaps it in; an invalid one changes nothing.
    pub fn reload(&self) -> Result<u64, ConfigErrors> {
        let previous = self.shared.load_full();
        let loaded = Snapshot::load_after(&self.gateway_path, Some(&previous)).and_then(|next| {
            // New certificates are part of the change: all valid, or none applied.
            let material = match (&self.tls, &next.gateway.server.tls) {
                (Some(_), Some(t)) => Some(TlsMaterial::load(t).map_err(|m| {
                    ConfigErrors(vec![Diagnostic {
                        file: t.cert.clone(),
                        line: None,
                        message: m,
                    }])
                })?),
                _ => None,
            };
            Ok((next, material))
        });
        match loaded {
            Ok((next, material)) => {
                if let (Some(slot), Some(m)) = (&self.tls, material) {
                    slot.store(Arc::new(m));
                }
                for note in next.policies.rego.iter().flat_map(|r| r.compiler_notes()) {
                    note.log();
                }
                let pending = process::restart_needed(&self.started, &next.gateway);
                for key in &pending {
                    tracing::warn!(
                        key,
                        "restart needed: {key} changed, and applies only at start"
                    );
                }
                METRICS.config_restart_needed.set(pending.len() as i64);
                self.restart_needed.store(Arc::new(pending));
                self.shared.store(Arc::new(next));
                let generation = self.generation.fetch_add(1, Ordering::AcqRel) + 1;
                METRICS.config_generation.set(generation as i64);
                METRICS.config_reloads.with_label_values(&["ok"]).inc();
                tracing::info!(generation, "configuration reloaded");
                Ok(generation)
            }
            Err(e) => {
                METRICS.config_reloads.with_label_values(&["error"]).inc();
                for d in &e.0 {
                    tracing::error!(error = %d, "configuration reload refused; the previous snapshot stays in force");
                }
                Err(e)
            }
        }
    }

    /// The files whose change means a reload, and the directories (schemas,
    /// a Rego folder) where any change does.
    fn watched(&self) -> (BTreeSet<PathBuf>, Vec<PathBuf>) {
        let snap = self.shared.load();
        let g = &snap.gateway;
        let mut files = BTreeSet::from([self.gateway_path.clone(), g.policy.tenants.clone()]);
        files.extend(g.policy.routes.clone());
        // Schemas a routes file names by path.
        files.extend(
            snap.routes
                .iter()
                .filter_map(|r| r.schema.as_deref().map(PathBuf::from))
                .filter(|p| p.is_absolute()),
        );
        let mut trees: Vec<PathBuf> = g.policy.schemas.iter().cloned().collect();
        match &g.policy.rego {
            Some(r) if r.is_dir() => trees.push(r.clone()),
            r => files.extend(r.clone()),
        }
        if let Some(t) = &g.server.tls {
            files.extend([t.cert.clone(), t.key.clone()]);
            files.extend(t.client_ca.clone());
            files.extend(t.crl.clone());
        }
        if let Some(JwksSource::File(p)) = g.jwt.as_ref().map(|j| &j.jwks) {
            files.insert(p.clone());
        }
        let files = files.into_iter().map(|f| absolute(&f)).collect();
        (files, trees.iter().map(|t| absolute(t)).collect())
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Watches the files for the life of the server and reloads on change.
pub struct ReloadService(pub Arc<Reloader>);

#[async_trait]
impl BackgroundService for ReloadService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let (files, trees) = self.0.watched();
        // One pending signal is enough: a burst collapses into one reload.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let relevant = {
            let (files, trees) = (files.clone(), trees.clone());
            move |p: &Path| files.contains(p) || trees.iter().any(|t| p.starts_with(t))
        };
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(event) = res {
                // Reading the files (as a reload does) must not trigger one.
                let changed = !matches!(event.kind, notify::EventKind::Access(_));
                if changed && event.paths.iter().any(|p| relevant(p)) {
                    let _ = tx.try_send(());
                }
            }
        });
        let mut watcher = match watcher {
            Ok(w) => w,
            Err(e) => {
                tracing::error!(error = %e, "cannot watch configuration files; hot reload is off");
                return;
            }
        };
        let dirs: BTreeSet<PathBuf> = files
            .iter()
            .filter_map(|f| f.parent().map(Path::to_path_buf))
            .collect();
        let watches = dirs
            .iter()
            .map(|d| (d, RecursiveMode::NonRecursive))
            .chain(trees.iter().map(|t| (t, RecursiveMode::Recursive)));
        for (dir, mode) in watches {
            if let Err(e) = watcher.watch(dir, mode) {
                tracing::error!(dir = %dir.display(), error = %e, "cannot watch directory");
            }
        }
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                got = rx.recv() => if got.is_none() { return },
            }
            // Wait for the writes to settle, then take whatever arrived.
            tokio::time::sleep(DEBOUNCE).await;
            while rx.try_recv().is_ok() {}
            // Errors are logged and counted inside.
            let _ = self.0.reload();
        }
    }
}
