//! Why a sandbox ended, and the report `cove run --json` prints.

use std::fmt;

/// The reason a sandbox ended. Every end has exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The command ended on its own (with an exit code, or by a signal it caused itself).
    Exited,
    /// The wall-clock timeout ran out.
    Timeout,
    /// The memory limit was exceeded and the kernel's OOM killer acted.
    MemoryLimit,
    /// The command tried to create more tasks than the pids limit allows.
    PidsLimit,
    /// The CPU-time budget ran out.
    CpuTimeLimit,
    /// Stopped on request (Ctrl-C, SIGTERM to `cove run`, or an API call).
    Killed,
    /// Cove failed to start or supervise the sandbox.
    Error,
}

impl Reason {
    /// The stable snake_case name used in JSON and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Exited => "exited",
            Reason::Timeout => "timeout",
            Reason::MemoryLimit => "memory_limit",
            Reason::PidsLimit => "pids_limit",
            Reason::CpuTimeLimit => "cpu_time_limit",
            Reason::Killed => "killed",
            Reason::Error => "error",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened to one sandbox, as `cove run --json` prints it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunReport {
    /// The sandbox id.
    pub id: String,
    /// The exit code `cove run` exits with: the command's, or 128+N after signal N, or 125.
    pub exit_code: i32,
    /// The signal that ended the command, if one did.
    pub signal: Option<i32>,
    /// Why the sandbox ended.
    pub reason: Reason,
    /// Human explanation when the reason is not `exited` (e.g. "memory limit 512M exceeded").
    pub message: Option<String>,
    /// Wall-clock time from start to end, in milliseconds.
    pub wall_time_ms: f64,
    /// CPU time used by every process of the sandbox, in milliseconds.
    pub cpu_time_ms: f64,
    /// Peak memory use of the sandbox (its cgroup), in bytes.
    pub peak_memory_bytes: u64,
    /// With `--net egress`: packets the egress policy dropped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_denied_packets: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_serialize_as_snake_case() {
        for r in [
            Reason::Exited,
            Reason::Timeout,
            Reason::MemoryLimit,
            Reason::PidsLimit,
            Reason::CpuTimeLimit,
            Reason::Killed,
            Reason::Error,
        ] {
            assert_eq!(
                serde_json::to_string(&r).unwrap(),
                format!("\"{}\"", r.as_str())
            );
        }
    }
}
