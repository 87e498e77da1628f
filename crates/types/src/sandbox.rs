//! The sandbox record: what the control plane stores for each sandbox (desired state, spec,
//! recorded status), and the shapes of the API around it.

use std::collections::BTreeMap;

use crate::{Reason, RunReport, SandboxId, Spec};

/// Version of the stored record layout; a record of another version is refused, not guessed.
pub const RECORD_SCHEMA: u32 = 1;

/// What the owner wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Desired {
    /// Running until its command ends (or a limit ends it).
    Running,
    /// Stopped: end it if it runs.
    Stopped,
    /// Paused: its processes frozen, their memory kept.
    Paused,
}

/// Where a sandbox is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    /// Recorded; its command does not run yet (it is being started, or waits to be).
    Pending,
    /// Its command runs.
    Running,
    /// Frozen (cgroup freezer) until resumed.
    Paused,
    /// It ended; `reason` says why.
    Exited,
}

impl SandboxState {
    /// The snake_case name (as in JSON and filters).
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Pending => "pending",
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
            SandboxState::Exited => "exited",
        }
    }

    /// Whether the sandbox has ended for good.
    pub fn is_final(self) -> bool {
        self == SandboxState::Exited
    }
}

impl std::str::FromStr for SandboxState {
    type Err = String;
    fn from_str(s: &str) -> Result<SandboxState, String> {
        Ok(match s {
            "pending" => SandboxState::Pending,
            "running" => SandboxState::Running,
            "paused" => SandboxState::Paused,
            "exited" => SandboxState::Exited,
            _ => {
                return Err(format!(
                    "unknown state {s:?}: use pending, running, paused or exited"
                ));
            }
        })
    }
}

/// Why a sandbox ended, as the control plane records it: the jail's reasons plus those only
/// the control plane knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The command ended on its own (see `exit_code`).
    Exited,
    /// Its timeout ran out.
    Timeout,
    /// The memory limit was exceeded.
    MemoryLimit,
    /// The pids limit was hit.
    PidsLimit,
    /// The CPU-time budget ran out.
    CpuTimeLimit,
    /// Stopped or deleted by its owner.
    Killed,
    /// It could not be started (see `message`).
    StartFailure,
    /// Its supervisor vanished without a report (host crash, `kill -9`).
    Lost,
    /// Its idle policy's hard limit stopped it.
    IdleLimit,
    /// The server shut down with the policy `on_shutdown = "stop"`.
    ServerShutdown,
}

impl From<Reason> for EndReason {
    fn from(r: Reason) -> EndReason {
        match r {
            Reason::Exited => EndReason::Exited,
            Reason::Timeout => EndReason::Timeout,
            Reason::MemoryLimit => EndReason::MemoryLimit,
            Reason::PidsLimit => EndReason::PidsLimit,
            Reason::CpuTimeLimit => EndReason::CpuTimeLimit,
            Reason::Killed => EndReason::Killed,
            Reason::Error => EndReason::StartFailure,
        }
    }
}

/// One sandbox, as stored under `/cove/sandboxes/<id>`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxRecord {
    /// [`RECORD_SCHEMA`].
    pub schema: u32,
    /// The sandbox id.
    pub id: SandboxId,
    /// The tenant that owns it.
    pub tenant: String,
    /// What to run.
    pub spec: Spec,
    /// Labels (`user_id`, …): filterable, shown everywhere.
    pub labels: BTreeMap<String, String>,
    /// Free-form metadata of the owner.
    pub metadata: BTreeMap<String, String>,
    /// What the owner wants.
    pub desired: Desired,
    /// Delete the record (and the sandbox's files) once it has ended.
    #[serde(default)]
    pub remove: bool,
    /// Where it is.
    pub state: SandboxState,
    /// Why it ended, once it has.
    pub reason: Option<EndReason>,
    /// A sentence about the end (the limit hit, the start error), when there is one.
    pub message: Option<String>,
    /// The command's exit code (128+N after signal N), once it has ended.
    pub exit_code: Option<i32>,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// When its command started.
    pub started_at_ms: Option<u64>,
    /// When it ended.
    pub ended_at_ms: Option<u64>,
    /// The jail's report (times, peak memory), once it has ended.
    pub report: Option<RunReport>,
    /// When its timeout stops it (milliseconds since the Unix epoch): creation time plus the
    /// spec's timeout, moved by a later "set timeout". The control plane enforces it.
    #[serde(default)]
    pub deadline_ms: Option<u64>,
    /// Why the control plane stopped it (its timeout), recorded as its end reason instead of
    /// `killed`.
    #[serde(default)]
    pub stop_reason: Option<EndReason>,
    /// Its ports are reachable through the edge proxy without credentials.
    #[serde(default)]
    pub public: bool,
    /// What happens when nothing uses it for a while.
    #[serde(default)]
    pub idle: Option<IdlePolicy>,
    /// When the control plane warned that it is idle (the soft limit); cleared when it is used
    /// again.
    #[serde(default)]
    pub idle_warned_at_ms: Option<u64>,
}

/// What the hard idle limit does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdleAction {
    /// End it (reason `idle_limit`).
    #[default]
    Stop,
    /// Freeze it (cgroup freezer), memory kept; resuming it counts as use.
    Pause,
}

/// A sandbox's idle policy. Use is: requests through the edge proxy, execs and their
/// streams' input and output, file operations, resuming it, and — with `cpu_percent` — its
/// own CPU use above that share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdlePolicy {
    /// After this long unused, an `idle_warning` event says when `hard` acts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soft: Option<crate::Duration>,
    /// After this long unused, `action` is taken.
    pub hard: crate::Duration,
    /// What the hard limit does.
    #[serde(default)]
    pub action: IdleAction,
    /// The sandbox's own CPU use counts as use while it is at least this many percent of one
    /// CPU (averaged over half a second): a build or a training run is not idle even when
    /// nobody talks to it. Unset, CPU use does not count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<u32>,
}

/// The highest `cpu_percent` accepted: 64 CPUs.
pub const MAX_IDLE_CPU_PERCENT: u32 = 6400;

impl IdlePolicy {
    /// Checks that the limits make sense: a positive hard limit, a soft one below it.
    pub fn check(&self) -> Result<(), String> {
        if self.hard.as_std().is_zero() {
            return Err("idle: hard must be positive".into());
        }
        if let Some(s) = self.soft
            && (s.as_std().is_zero() || s.as_std() >= self.hard.as_std())
        {
            return Err(format!(
                "idle: soft ({s}) must be positive and shorter than hard ({})",
                self.hard
            ));
        }
        if let Some(p) = self.cpu_percent
            && !(1..=MAX_IDLE_CPU_PERCENT).contains(&p)
        {
            return Err(format!(
                "idle: cpu_percent {p} must be between 1 and {MAX_IDLE_CPU_PERCENT} (percent of one CPU)"
            ));
        }
        Ok(())
    }
}

/// Where sandbox records live in the state store.
pub const RECORDS_PREFIX: &str = "/cove/sandboxes/";

/// The state-store key of a sandbox's record.
pub fn record_key(id: &SandboxId) -> String {
    format!("{RECORDS_PREFIX}{id}")
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
