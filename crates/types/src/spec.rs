//! The sandbox spec: one type for CLI flags, config files and API bodies.
//!
//! [`Spec::validate`] is the single gate: a spec that passed it can be handed to any driver.
//! Unknown fields are rejected when a spec is read from JSON or TOML so that a typo in a limit
//! never silently falls back to a default.

use std::path::PathBuf;

use crate::{Duration, Size};

/// Default memory limit (swap included).
pub const DEFAULT_MEMORY: Size = Size::mib(512);
/// Default size of the sandbox's private writable layer.
pub const DEFAULT_DISK: Size = Size::mib(256);
/// Default CPU quota, in thousandths of a CPU.
pub const DEFAULT_CPUS_MILLIS: u32 = 1000;
/// Default maximum number of tasks (processes and threads).
pub const DEFAULT_PIDS: u64 = 256;

/// Smallest memory limit accepted: below this even the sandbox's init cannot start.
const MIN_MEMORY: Size = Size::mib(4);
/// Smallest writable layer accepted.
const MIN_DISK: Size = Size::mib(1);
/// Largest CPU quota accepted (1024 CPUs).
const MAX_CPUS_MILLIS: u32 = 1_024_000;
/// The sandbox's init and the command itself.
const MIN_PIDS: u64 = 2;
/// Longest hostname the kernel accepts.
const MAX_HOSTNAME: usize = 64;

/// The root filesystem a sandbox starts from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Image {
    /// The host's `/usr`, `/bin`, `/sbin` and `/lib*`, read-only, with a private everything else.
    Host,
    /// A root filesystem directory on the host, used read-only as the lower layer.
    Path(PathBuf),
    /// An OCI image from Cove's image store (`busybox`, `registry:5000/app:v1`, `name@sha256:…`).
    Ref(String),
}

impl std::str::FromStr for Image {
    type Err = SpecError;
    /// `host`; a path (starting with `/` or `.`); otherwise an image reference.
    fn from_str(s: &str) -> Result<Image, SpecError> {
        match s {
            "" => Err(SpecError::Image {
                reason: "empty image".into(),
            }),
            "host" => Ok(Image::Host),
            p if p.starts_with('/') || p.starts_with('.') => Ok(Image::Path(PathBuf::from(p))),
            r => Ok(Image::Ref(r.to_string())),
        }
    }
}

impl std::fmt::Display for Image {
    /// As [`Image::from_str`](std::str::FromStr) reads it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Image::Host => f.write_str("host"),
            Image::Path(p) => write!(f, "{}", p.display()),
            Image::Ref(r) => f.write_str(r),
        }
    }
}

/// Network mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetMode {
    /// A private network namespace with only `lo`, up.
    #[default]
    None,
    /// `lo`, and `eth0` with a route out through the host (NAT), under the egress policy.
    Egress,
}

impl std::str::FromStr for NetMode {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<NetMode, SpecError> {
        match s {
            "none" => Ok(NetMode::None),
            "egress" => Ok(NetMode::Egress),
            other => Err(SpecError::Net {
                value: other.to_string(),
            }),
        }
    }
}

/// A `KEY=VALUE` environment entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvVar {
    /// The name (non-empty, no `=`, no NUL).
    pub key: String,
    /// The value (no NUL).
    pub value: String,
}

impl std::str::FromStr for EnvVar {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<EnvVar, SpecError> {
        let bad = |why: &str| SpecError::Env {
            entry: s.to_string(),
            reason: why.to_string(),
        };
        let (key, value) = s.split_once('=').ok_or_else(|| bad("expected KEY=VALUE"))?;
        if key.is_empty() {
            return Err(bad("the name is empty"));
        }
        if s.contains('\0') {
            return Err(bad("contains a NUL byte"));
        }
        Ok(EnvVar {
            key: key.to_string(),
            value: value.to_string(),
        })
    }
}

impl std::fmt::Display for EnvVar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.key, self.value)
    }
}

serde_via_str!(EnvVar);

/// The user the command runs as, inside the sandbox's user namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct User {
    /// User id inside the sandbox.
    pub uid: u32,
    /// Group id inside the sandbox.
    pub gid: u32,
}

/// Highest id mapped inside a sandbox (the map covers 0..=65535).
pub const MAX_INNER_ID: u32 = 65_535;

impl std::str::FromStr for User {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<User, SpecError> {
        let bad = || SpecError::User {
            value: s.to_string(),
        };
        let parse = |t: &str| -> Result<u32, SpecError> {
            let n: u32 = t.parse().map_err(|_| bad())?;
            if n > MAX_INNER_ID { Err(bad()) } else { Ok(n) }
        };
        match s.split_once(':') {
            None => {
                let uid = parse(s)?;
                Ok(User { uid, gid: uid })
            }
            Some((u, g)) => Ok(User {
                uid: parse(u)?,
                gid: parse(g)?,
            }),
        }
    }
}

impl std::fmt::Display for User {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.uid, self.gid)
    }
}

serde_via_str!(User);

/// A host path bound into the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    /// Host path (must exist).
    pub source: PathBuf,
    /// Absolute path inside the sandbox.
    pub target: PathBuf,
    /// Writable only when asked for (`:rw`); read-only by default.
    pub writable: bool,
}

impl std::str::FromStr for BindMount {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<BindMount, SpecError> {
        let bad = |why: &str| SpecError::Mount {
            value: s.to_string(),
            reason: why.to_string(),
        };
        let parts: Vec<&str> = s.split(':').collect();
        let (src, dst, mode) = match parts.as_slice() {
            [src, dst] => (*src, *dst, "ro"),
            [src, dst, mode] => (*src, *dst, *mode),
            _ => return Err(bad("expected SRC:DST[:ro|rw]")),
        };
        let writable = match mode {
            "ro" => false,
            "rw" => true,
            _ => return Err(bad("the mode must be ro or rw")),
        };
        if src.is_empty() || dst.is_empty() {
            return Err(bad("expected SRC:DST[:ro|rw]"));
        }
        Ok(BindMount {
            source: PathBuf::from(src),
            target: PathBuf::from(dst),
            writable,
        })
    }
}

impl std::fmt::Display for BindMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = if self.writable { "rw" } else { "ro" };
        write!(
            f,
            "{}:{}:{mode}",
            self.source.display(),
            self.target.display()
        )
    }
}

serde_via_str!(BindMount);

/// Resource limits. Every field has a safe default; none is unlimited by default except
/// the optional wall-clock and CPU-time budgets.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Memory, swap included.
    pub memory: Size,
    /// CPU quota in thousandths of a CPU (`1500` = one and a half CPUs).
    pub cpus_millis: u32,
    /// Maximum tasks (processes and threads) at once.
    pub pids: u64,
    /// Size of the private writable layer (`/`, `/tmp`, `/home`, …).
    pub disk: Size,
    /// Wall-clock budget; the sandbox is killed when it runs out.
    pub timeout: Option<Duration>,
    /// CPU-time budget for the whole sandbox (all its processes).
    pub cpu_time: Option<Duration>,
    /// Maximum open files per process (`RLIMIT_NOFILE`).
    pub nofile: Option<u64>,
    /// Largest file a process may write (`RLIMIT_FSIZE`).
    pub fsize: Option<Size>,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            memory: DEFAULT_MEMORY,
            cpus_millis: DEFAULT_CPUS_MILLIS,
            pids: DEFAULT_PIDS,
            disk: DEFAULT_DISK,
            timeout: None,
            cpu_time: None,
            nofile: None,
            fsize: None,
        }
    }
}

/// Everything needed to start one sandbox.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Root filesystem.
    #[serde(default = "default_image")]
    pub image: Image,
    /// Command and arguments; the first is looked up in `PATH` inside the sandbox.
    pub cmd: Vec<String>,
    /// Environment (the host's is never inherited).
    #[serde(default)]
    pub env: Vec<EnvVar>,
    /// Working directory inside the sandbox (default `/`).
    #[serde(default)]
    pub workdir: Option<PathBuf>,
    /// Hostname (default: the sandbox id).
    #[serde(default)]
    pub hostname: Option<String>,
    /// User and group inside the sandbox (default root, which is unprivileged on the host).
    #[serde(default)]
    pub user: User,
    /// Host paths bound into the sandbox.
    #[serde(default)]
    pub mounts: Vec<BindMount>,
    /// Resource limits.
    #[serde(default)]
    pub limits: Limits,
    /// Network mode.
    #[serde(default)]
    pub net: NetMode,
    /// With `net: egress`, the allow and deny lists.
    #[serde(default, skip_serializing_if = "crate::egress::EgressPolicy::is_empty")]
    pub egress: crate::egress::EgressPolicy,
    /// Allocate a pseudo-terminal for the command.
    #[serde(default)]
    pub tty: bool,
}

fn default_image() -> Image {
    Image::Host
}

/// Why a spec is invalid. Messages name the offending value and say what would be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("no command given")]
    NoCommand,
    #[error("command argument {index} contains a NUL byte")]
    NulInCommand { index: usize },
    #[error("bad environment entry {entry:?}: {reason}")]
    Env { entry: String, reason: String },
    #[error("bad image: {reason}")]
    Image { reason: String },
    #[error("bad --net {value:?}: use \"none\" (loopback only) or \"egress\" (a route out)")]
    Net { value: String },
    #[error("{0}")]
    Egress(String),
    #[error("bad user {value:?}: expected UID or UID:GID, each 0..=65535")]
    User { value: String },
    #[error("bad mount {value:?}: {reason}")]
    Mount { value: String, reason: String },
    #[error("bad hostname {value:?}: use 1-64 letters, digits, '-' and '.'")]
    Hostname { value: String },
    #[error("bad working directory {value:?}: it must be an absolute path")]
    Workdir { value: String },
    #[error("{what} {value} is out of range: {range}")]
    Limit {
        what: &'static str,
        value: String,
        range: &'static str,
    },
    #[error("bad CPU count {value:?}: use a positive number such as 0.5, 1 or 2")]
    Cpus { value: String },
}

/// Parses a fractional CPU count (`0.5`, `2`) into thousandths of a CPU.
pub fn parse_cpus(s: &str) -> Result<u32, SpecError> {
    let bad = || SpecError::Cpus {
        value: s.to_string(),
    };
    let v: f64 = s.trim().parse().map_err(|_| bad())?;
    if !v.is_finite() || v <= 0.0 {
        return Err(bad());
    }
    let millis = (v * 1000.0).round();
    if millis < 1.0 || millis > MAX_CPUS_MILLIS as f64 {
        return Err(SpecError::Limit {
            what: "--cpus",
            value: s.to_string(),
            range: "0.001 to 1024",
        });
    }
    Ok(millis as u32)
}

impl Spec {
    /// A spec running `cmd` on the host image with default limits.
    pub fn new(cmd: Vec<String>) -> Spec {
        Spec {
            image: Image::Host,
            cmd,
            env: Vec::new(),
            workdir: None,
            hostname: None,
            user: User::default(),
            mounts: Vec::new(),
            limits: Limits::default(),
            net: NetMode::None,
            egress: Default::default(),
            tty: false,
        }
    }

    /// The egress lists: only with `net: egress`, bounded, never opening an always-blocked
    /// range.
    fn validate_egress(&self) -> Result<(), SpecError> {
        let lists = &self.egress;
        if !lists.is_empty() && self.net != NetMode::Egress {
            return Err(SpecError::Egress(
                "allow and deny lists need --net egress".into(),
            ));
        }
        if lists.allow.len() > crate::egress::MAX_RULES
            || lists.deny.len() > crate::egress::MAX_RULES
        {
            return Err(SpecError::Egress(format!(
                "at most {} allow and {} deny rules",
                crate::egress::MAX_RULES,
                crate::egress::MAX_RULES
            )));
        }
        if let Some((r, why)) = lists
            .allow
            .iter()
            .find_map(|r| r.always_blocked().map(|why| (r, why)))
        {
            return Err(SpecError::Egress(format!(
                "--allow {r}: {why} addresses are always blocked and cannot be allowed"
            )));
        }
        Ok(())
    }

    /// Checks everything that can be checked without touching the host.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.cmd.is_empty() || self.cmd[0].is_empty() {
            return Err(SpecError::NoCommand);
        }
        if let Some(index) = self.cmd.iter().position(|a| a.contains('\0')) {
            return Err(SpecError::NulInCommand { index });
        }
        for e in &self.env {
            if e.key.is_empty()
                || e.key.contains('=')
                || e.key.contains('\0')
                || e.value.contains('\0')
            {
                return Err(SpecError::Env {
                    entry: format!("{}={}", e.key, e.value),
                    reason: "names must be non-empty and contain no '=' or NUL".into(),
                });
            }
        }
        self.validate_egress()?;
        if let Image::Path(p) = &self.image
            && !p.is_absolute()
        {
            return Err(SpecError::Image {
                reason: format!("{} must be an absolute path (or \"host\")", p.display()),
            });
        }
        if let Some(h) = &self.hostname {
            let ok = !h.is_empty()
                && h.len() <= MAX_HOSTNAME
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            if !ok {
                return Err(SpecError::Hostname { value: h.clone() });
            }
        }
        if let Some(w) = &self.workdir
            && !w.is_absolute()
        {
            return Err(SpecError::Workdir {
                value: w.display().to_string(),
            });
        }
        for m in &self.mounts {
            let bad = |why: &str| SpecError::Mount {
                value: format!("{}:{}", m.source.display(), m.target.display()),
                reason: why.to_string(),
            };
            if !m.source.is_absolute() {
                return Err(bad("the source must be an absolute host path"));
            }
            if !m.target.is_absolute() {
                return Err(bad(
                    "the target must be an absolute path inside the sandbox",
                ));
            }
            if m.target
                .components()
                .any(|c| c == std::path::Component::ParentDir)
            {
                return Err(bad("the target must not contain '..'"));
            }
            let t = m.target.as_path();
            if t == std::path::Path::new("/") || t.starts_with("/proc") || t.starts_with("/dev") {
                return Err(bad("the target must not be /, or under /proc or /dev"));
            }
        }
        let l = &self.limits;
        if l.memory < MIN_MEMORY {
            return Err(SpecError::Limit {
                what: "memory limit",
                value: l.memory.to_string(),
                range: "at least 4M",
            });
        }
        if l.disk < MIN_DISK {
            return Err(SpecError::Limit {
                what: "disk limit",
                value: l.disk.to_string(),
                range: "at least 1M",
            });
        }
        if l.cpus_millis == 0 || l.cpus_millis > MAX_CPUS_MILLIS {
            return Err(SpecError::Limit {
                what: "CPU quota",
                value: format!("{}m", l.cpus_millis),
                range: "0.001 to 1024 CPUs",
            });
        }
        if l.pids < MIN_PIDS {
            return Err(SpecError::Limit {
                what: "pids limit",
                value: l.pids.to_string(),
                range: "at least 2 (the sandbox's init and the command)",
            });
        }
        if l.timeout.is_some_and(|t| t.as_std().is_zero()) {
            return Err(SpecError::Limit {
                what: "timeout",
                value: "0s".into(),
                range: "greater than zero",
            });
        }
        if l.cpu_time.is_some_and(|t| t.as_std().as_millis() < 1000) {
            return Err(SpecError::Limit {
                what: "CPU-time limit",
                value: l.cpu_time.map(|t| t.to_string()).unwrap_or_default(),
                range: "at least 1s (the kernel counts CPU time in whole seconds)",
            });
        }
        if l.nofile.is_some_and(|n| !(3..=1 << 20).contains(&n)) {
            return Err(SpecError::Limit {
                what: "open-files limit",
                value: l.nofile.unwrap_or_default().to_string(),
                range: "3 to 1048576",
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_image_prints_as_it_is_written() {
        for s in [
            "host",
            "/srv/root",
            "./root",
            "registry:5000/app:v1",
            "busybox",
        ] {
            assert_eq!(s.parse::<Image>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let s = Spec::new(vec!["true".into()]);
        assert_eq!(s.limits.memory.to_string(), "512M");
        assert_eq!(s.limits.disk.to_string(), "256M");
        assert_eq!(s.limits.cpus_millis, 1000);
        assert_eq!(s.limits.pids, 256);
        assert_eq!(s.image, Image::Host);
        s.validate().unwrap();
    }

    #[test]
    fn mounts_parse_read_only_by_default() {
        let m: BindMount = "/data:/mnt/data".parse().unwrap();
        assert!(!m.writable);
        let m: BindMount = "/data:/mnt/data:rw".parse().unwrap();
        assert!(m.writable);
        for bad in ["/data", "/a:/b:rx", ":/b", "/a:/b:ro:x"] {
            assert!(bad.parse::<BindMount>().is_err(), "{bad}");
        }
    }

    #[test]
    fn mount_targets_are_checked() {
        for target in ["relative", "/", "/proc/sys", "/dev/x", "/a/../etc"] {
            let mut s = Spec::new(vec!["true".into()]);
            s.mounts.push(BindMount {
                source: "/tmp".into(),
                target: target.into(),
                writable: false,
            });
            assert!(
                matches!(s.validate(), Err(SpecError::Mount { .. })),
                "{target}"
            );
        }
    }

    #[test]
    fn users_parse() {
        assert_eq!(
            "1000".parse::<User>().unwrap(),
            User {
                uid: 1000,
                gid: 1000
            }
        );
        assert_eq!(
            "1000:50".parse::<User>().unwrap(),
            User { uid: 1000, gid: 50 }
        );
        for bad in ["", "x", "70000", "1:", "-1"] {
            assert!(bad.parse::<User>().is_err(), "{bad}");
        }
    }

    #[test]
    fn env_entries_parse() {
        let e: EnvVar = "A=b=c".parse().unwrap();
        assert_eq!((e.key.as_str(), e.value.as_str()), ("A", "b=c"));
        assert!("NOEQUALS".parse::<EnvVar>().is_err());
        assert!("=x".parse::<EnvVar>().is_err());
    }

    #[test]
    fn cpus_parse_fractions() {
        assert_eq!(parse_cpus("0.5").unwrap(), 500);
        assert_eq!(parse_cpus("2").unwrap(), 2000);
        for bad in ["0", "-1", "x", "NaN", "inf", "5000"] {
            assert!(parse_cpus(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn absurd_limits_are_rejected() {
        let mut s = Spec::new(vec!["true".into()]);
        s.limits.memory = Size::mib(1);
        assert!(
            s.validate()
                .unwrap_err()
                .to_string()
                .contains("at least 4M")
        );
        let mut s = Spec::new(vec!["true".into()]);
        s.limits.pids = 1;
        assert!(s.validate().is_err());
        let mut s = Spec::new(vec![]);
        assert_eq!(s.validate(), Err(SpecError::NoCommand));
        s.cmd = vec!["a\0b".into()];
        assert_eq!(s.validate(), Err(SpecError::NulInCommand { index: 0 }));
    }

    #[test]
    fn hostnames_and_workdirs_are_checked() {
        let mut s = Spec::new(vec!["true".into()]);
        s.hostname = Some("bad host".into());
        assert!(s.validate().is_err());
        s.hostname = Some("ok-host.local".into());
        s.workdir = Some("rel".into());
        assert!(s.validate().is_err());
        s.workdir = Some("/srv".into());
        s.validate().unwrap();
    }

    #[test]
    fn specs_reject_unknown_fields() {
        let err = serde_json::from_str::<Spec>(r#"{"cmd":["true"],"memroy":"1G"}"#).unwrap_err();
        assert!(err.to_string().contains("memroy"), "{err}");
        let err = serde_json::from_str::<Spec>(r#"{"cmd":["true"],"limits":{"memroy":"1G"}}"#)
            .unwrap_err();
        assert!(err.to_string().contains("memroy"), "{err}");
        let s: Spec =
            serde_json::from_str(r#"{"cmd":["true"],"limits":{"memory":"1G","timeout":"5s"}}"#)
                .unwrap();
        assert_eq!(s.limits.memory.to_string(), "1G");
        assert_eq!(s.limits.pids, DEFAULT_PIDS);
    }
}
