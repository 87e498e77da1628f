//! The server's background reaper: every `reap_interval` it removes the host objects that no
//! sandbox owns any more, and says what it removed in the logs and the metrics.
//!
//! One pass removes:
//! - what `cove gc` removes (see [`cove_jail::state::gc`]): cgroups under `cove/` with no
//!   live lock file (their processes killed first), unlocked lock files, egress veths and nftables chains of sandboxes that have neither;
//! - sandbox directories in the server's data directory whose record is gone and whose
//!   supervisor no longer runs (a crash between deleting a record and its files).
//!
//! Live sandboxes are never touched: a running sandbox's lock file is locked by its
//! supervisor (then its init), and its directory is only created after its record is written
//! (a live one without a record, whose record a crash lost before it reached the disk, is the
//! agent's to remove at start: see `Agent::run`). Records whose sandbox
//! vanished (supervisor gone without a report) are the agent's: it ends them with reason
//! `lost` on its next pass, which the `cove_sandbox_ends_total{reason="lost"}` series counts.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cove_api::Api;
use cove_jail::state::{GcReport, STATE_ROOT, Scope};
use cove_types::SandboxId;

/// Runs a pass every `interval`, forever.
pub async fn run(api: Api, sandboxes: PathBuf, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is immediate: what a crash left is removed at start.
    loop {
        tick.tick().await;
        let report = pass(&api, &sandboxes).await;
        for line in &report.removed {
            tracing::info!(object = %line, "reaper removed a stale object");
        }
        for line in &report.failed {
            tracing::warn!(object = %line, "reaper could not remove a stale object");
        }
        api.metrics
            .reaper_pass(report.counts, report.failed.len() as u64);
    }
}

/// One pass.
async fn pass(api: &Api, sandboxes: &Path) -> GcReport {
    // Directories first, records second: a directory is made only once its record exists, so
    // one listed before the records without a record among them has really lost it.
    let listed = {
        let sandboxes = sandboxes.to_path_buf();
        tokio::task::spawn_blocking(move || sandbox_dirs(&sandboxes))
            .await
            .unwrap_or_default()
    };
    let records = cove_api::all_records(&api.store).await.ok();
    let owned: Option<HashSet<SandboxId>> = records
        .as_ref()
        .map(|(_, records)| records.iter().map(|(_, r)| r.id).collect());
    // Ended detached sandboxes whose record has not ended yet: the agent finishes them.
    let unfinished: HashSet<String> = records
        .iter()
        .flat_map(|(_, records)| records.iter())
        .filter(|(_, r)| !r.state.is_final())
        .map(|(_, r)| r.id.to_string())
        .collect();
    let sandboxes = sandboxes.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let agents = |id: &str| unfinished.contains(id);
        let mut report = match cove_jail::cgroup::Hierarchy::detect() {
            Ok(h) => cove_jail::state::gc(Path::new(STATE_ROOT), &h, Scope::Everything, &agents),
            Err(e) => GcReport {
                failed: vec![format!("cgroups: {e}")],
                ..GcReport::default()
            },
        };
        // Without the records (the store failed), nothing can be said to be orphaned.
        for id in listed
            .into_iter()
            .filter(|id| owned.as_ref().is_some_and(|o| !o.contains(id)))
        {
            let dir = sandboxes.join(id.as_str());
            if cove_agent::supervisor_alive(&dir) {
                continue;
            }
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => report.add(
                    "sandbox_dir",
                    1,
                    Some(format!("sandbox directory {} (no record)", dir.display())),
                ),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => report.failed.push(format!("{}: {e}", dir.display())),
            }
        }
        report
    })
    .await
    .unwrap_or_default()
}

/// The sandbox ids that have a directory under `sandboxes`.
fn sandbox_dirs(sandboxes: &Path) -> Vec<SandboxId> {
    std::fs::read_dir(sandboxes)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}
