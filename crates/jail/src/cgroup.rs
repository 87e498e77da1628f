//! Cgroups: one cgroup per sandbox, holding its memory, CPU and pid limits, its accounting, and
//! the means to freeze it and kill everything in it.
//!
//! The host's layout is detected once ([`Hierarchy::detect`]): the pure v2 unified hierarchy
//! when it offers `memory`, `pids` and `cpu`, otherwise the v1 hierarchies (`memory`, `cpu`,
//! `cpuacct`, `pids`, and `freezer` when mounted). A [`Hierarchy`] holds the resolved mount
//! directories, so [`Hierarchy::create`] — on the hot path of every sandbox start — only makes
//! directories and writes a handful of files, each with a single `write()`.
//!
//! Cgroups are always made relative to each hierarchy's root mount point, never relative to our
//! own cgroup: the supervisor may live in a cgroup with its own limits (`memory:/process_api/…`
//! here), and on v2 a cgroup holding processes cannot have controller-enabled children.
//!
//! Rejected:
//! - `cgroups-rs` and youki's `libcgroups`: both model the whole OCI resource set, pull in large
//!   dependency trees (`oci-spec`, D-Bus for the systemd manager), and re-probe the host or go
//!   through generic setters on each create. We set three limits and read six counters; one
//!   file of our own keeps the hot path to one `mkdir` per mount plus one write per limit, and
//!   gives tests a seam: every path is joined under a root, so they run against a fake tree in
//!   a temp dir (and against the real hierarchy when run as root).
//! - systemd transient units over D-Bus: slow per sandbox, and needs systemd as PID 1.
//! - Signalling pids without freezing first: a fork bomb can outrun a kill loop.
//!   [`Cgroup::kill_all`] uses `cgroup.kill` where the kernel has it, else freezes first.
//!
//! Nothing here is `unsafe`: sending signals is left to a callback from the caller.

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io::{self, ErrorKind, Write as _};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

/// CFS period written on v1 and used in v2's `cpu.max`, in microseconds (the kernel default).
const CPU_PERIOD_US: u64 = 100_000;

/// How long [`Cgroup::kill_all`] and [`Cgroup::remove`] wait for processes to go away.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long [`Cgroup::kill_all`] waits for a freeze to complete before killing anyway.
const FREEZE_TIMEOUT: Duration = Duration::from_millis(100);

/// First sleep when polling; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(1);

/// Longest sleep between polls.
const MAX_BACKOFF: Duration = Duration::from_millis(64);

/// Controllers a v2 hierarchy must offer, in the order we enable them.
const V2_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// Where cgroup hierarchies are mounted on practically every distribution.
const STANDARD_ROOT: &str = "/sys/fs/cgroup";
const CGROUP_SUPER_MAGIC: i64 = 0x0027_e0eb;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Mountinfo lines describing the standard layout under `base`, built from `statfs` alone (a
/// pure v2 mount at `base`, or v1 hierarchies in `base/<controller>`, combined mounts such as
/// `cpu,cpuacct` recognised by their shared filesystem id), or `None` when `base` looks
/// otherwise.
fn standard_layout(base: &Path) -> Option<String> {
    let statfs = |p: &Path| crate::sys::statfs_type(p.to_str()?).ok();
    let line = |path: &Path, fstype: &str, opts: &str, id: u64| {
        let path = path.to_str()?;
        // Paths that mountinfo would escape are left to the full parser.
        (!path.contains([' ', '\t', '\n', '\\']))
            .then(|| format!("1 1 0:{id} / {path} rw - {fstype} {fstype} rw{opts}\n"))
    };
    let (magic, _) = statfs(base)?;
    match magic {
        CGROUP2_SUPER_MAGIC => line(base, "cgroup2", "", 0),
        TMPFS_MAGIC => {
            // One statfs per controller: the filesystem id tells combined mounts apart.
            let mut groups: Vec<(u64, PathBuf, Vec<&str>)> = Vec::new();
            for c in V1_CONTROLLERS {
                let p = base.join(c);
                let Some((CGROUP_SUPER_MAGIC, fsid)) = statfs(&p) else {
                    continue;
                };
                match groups.iter_mut().find(|g| g.0 == fsid) {
                    Some(g) => g.2.push(c),
                    None => groups.push((fsid, p, vec![c])),
                }
            }
            let mut text = String::new();
            for (i, (_, path, ctrls)) in groups.iter().enumerate() {
                text.push_str(&line(
                    path,
                    "cgroup",
                    &format!(",{}", ctrls.join(",")),
                    i as u64 + 1,
                )?);
            }
            let unified = base.join("unified");
            if statfs(&unified).is_some_and(|s| s.0 == CGROUP2_SUPER_MAGIC) {
                text.push_str(&line(&unified, "cgroup2", "", 0)?);
            }
            Some(text)
        }
        _ => None,
    }
}

/// v1 controllers we use, indexed like [`Slots`]' fields; the last (`freezer`) is optional.
const V1_CONTROLLERS: [&str; 5] = ["memory", "cpu", "cpuacct", "pids", "freezer"];

/// Which cgroup interface the host offers us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// Legacy: one hierarchy per controller (or per group of controllers).
    V1,
    /// Unified: one hierarchy, controllers enabled per subtree.
    V2,
}

/// Resource limits written when a cgroup is created; `None` leaves the kernel default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    /// Hard memory limit in bytes, swap included (v1 also sets `memory.memsw.limit_in_bytes`
    /// when swap accounting exists; v2 sets `memory.swap.max` to 0 and `memory.oom.group`).
    pub memory_bytes: Option<u64>,
    /// CPU bandwidth in thousandths of a CPU: 1000 is one full CPU. The kernel refuses
    /// quotas under 1 ms per 100 ms period, i.e. values below 10.
    pub cpu_millis: Option<u64>,
    /// Maximum number of tasks (processes and threads), `pids.max`.
    pub pids: Option<u64>,
}

/// Accounting read from a cgroup by [`Cgroup::stats`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Total CPU time consumed, in nanoseconds.
    pub cpu_usage_ns: u64,
    /// Highest memory usage seen, in bytes (0 on v2 kernels without `memory.peak`).
    pub memory_peak_bytes: u64,
    /// Current memory usage, in bytes.
    pub memory_current_bytes: u64,
    /// Processes killed by the OOM killer (0 on kernels that do not count them).
    pub oom_kills: u64,
    /// Times a fork or clone failed because `pids.max` was reached.
    pub pids_limit_hits: u64,
    /// Tasks currently in the cgroup.
    pub pids_current: u64,
}

/// Errors from detecting, creating, reading and removing cgroups. Each names the file or
/// directory involved; the underlying I/O error is the source.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// No usable cgroup hierarchy is mounted.
    #[error("no usable cgroup hierarchy: {what}")]
    NotFound {
        /// What is missing, per version.
        what: String,
    },
    /// A cgroup name that is not a plain relative path.
    #[error(
        "invalid cgroup name {name:?}: must be a relative path without empty, `.` or `..` components"
    )]
    InvalidName {
        /// The rejected name.
        name: String,
    },
    /// Reading a control file or listing a directory failed.
    #[error("cannot read {path}")]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Writing a control file failed.
    #[error("cannot write {value:?} to {path}")]
    Write {
        /// The control file.
        path: PathBuf,
        /// What we tried to write.
        value: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Creating a cgroup directory failed.
    #[error("cannot create cgroup directory {path}")]
    Mkdir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Removing a cgroup directory failed.
    #[error("cannot remove cgroup directory {path}")]
    Rmdir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// A control file held something we could not parse.
    #[error("unexpected content in {path}: {content:?}")]
    Parse {
        /// The control file.
        path: PathBuf,
        /// The offending content (a line or the whole file).
        content: String,
    },
    /// Processes (or, for removal, child cgroups) remained when we gave up waiting.
    #[error("cgroup {path} still busy after {SETTLE_TIMEOUT:?} ({remaining} processes left)")]
    Busy {
        /// The cgroup directory.
        path: PathBuf,
        /// How many processes remained.
        remaining: usize,
    },
    /// The host's hierarchy lacks an optional feature.
    #[error("{what} is not available in this cgroup hierarchy")]
    Unsupported {
        /// The missing feature.
        what: &'static str,
    },
}

type Result<T, E = CgroupError> = std::result::Result<T, E>;

/// Where each controller lives: an index into the list of distinct mount directories. On v2 all
/// are 0 and `freezer` is `None` (v2 freezes through `cgroup.freeze`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slots {
    memory: usize,
    cpu: usize,
    cpuacct: usize,
    pids: usize,
    freezer: Option<usize>,
}

/// The detected cgroup layout of this host (which version, where each controller is mounted).
#[derive(Debug, Clone)]
pub struct Hierarchy {
    version: Version,
    /// Distinct mount directories (combined mounts such as `cpu,cpuacct` appear once).
    mounts: Vec<PathBuf>,
    slots: Slots,
    /// v1 only: `memory.memsw.*` exists (swap accounting is on), probed at the memory root.
    memsw: bool,
}

impl Hierarchy {
    /// Detect from /proc/self/mountinfo: v2 when the unified mount's `cgroup.controllers` lists
    /// memory, pids and cpu; otherwise v1 when memory, pids, cpu and cpuacct hierarchies are
    /// mounted (freezer is used when present); else an error naming what is missing.
    ///
    /// The usual layout under `/sys/fs/cgroup` is recognised first from a few `statfs` calls;
    /// reading `/proc/self/mountinfo` (which the kernel renders in full on every read) cost
    /// about 0.25 ms of every sandbox start. Anything unusual falls back to mountinfo.
    pub fn detect() -> Result<Hierarchy> {
        if let Some(text) = standard_layout(Path::new(STANDARD_ROOT))
            && let Ok(h) = Self::from_mountinfo(&text, Path::new("/"))
        {
            return Ok(h);
        }
        let path = Path::new("/proc/self/mountinfo");
        let mountinfo = read(path)?;
        Self::from_mountinfo(&mountinfo, Path::new("/"))
    }

    /// [`Hierarchy::detect`], once per process: for long-lived processes (the server), whose
    /// hierarchy does not change under them. `None` if detection failed.
    pub fn detected() -> Option<&'static Hierarchy> {
        static DETECTED: std::sync::OnceLock<Option<Hierarchy>> = std::sync::OnceLock::new();
        DETECTED.get_or_init(|| Hierarchy::detect().ok()).as_ref()
    }

    /// Same as [`Hierarchy::detect`], from given mountinfo text; mount points are joined under
    /// `root` when probing files, so tests can point this at a fake tree.
    pub fn from_mountinfo(mountinfo: &str, root: &Path) -> Result<Hierarchy> {
        let lines: Vec<MountLine<'_>> = mountinfo.lines().filter_map(MountLine::parse).collect();
        // A mount of the hierarchy's own root beats a bind mount of one of its subtrees.
        let ordered = || {
            let roots = lines.iter().filter(|m| m.root == "/");
            roots.chain(lines.iter().filter(|m| m.root != "/"))
        };

        let v2_problem = match ordered().find(|m| m.fstype == "cgroup2") {
            None => "no cgroup2 mount".to_owned(),
            Some(m) => {
                let dir = under(root, &m.mount_point);
                let path = dir.join("cgroup.controllers");
                match fs::read_to_string(&path) {
                    Err(e) => format!("cannot read {}: {e}", path.display()),
                    Ok(have) => {
                        let missing: Vec<&str> = V2_CONTROLLERS
                            .into_iter()
                            .filter(|c| !have.split_whitespace().any(|h| h == *c))
                            .collect();
                        if missing.is_empty() {
                            return Ok(Hierarchy {
                                version: Version::V2,
                                mounts: vec![dir],
                                slots: Slots {
                                    memory: 0,
                                    cpu: 0,
                                    cpuacct: 0,
                                    pids: 0,
                                    freezer: None,
                                },
                                memsw: false,
                            });
                        }
                        format!("cgroup2 at {} lacks {}", dir.display(), missing.join(", "))
                    }
                }
            }
        };

        // v1: the first mount seen for each controller wins; mounts of the same hierarchy (same
        // device) share one directory, which dedupes combined `cpu,cpuacct` mounts.
        let mut devs: Vec<&str> = Vec::new();
        let mut mounts: Vec<PathBuf> = Vec::new();
        let mut slot: [Option<usize>; 5] = [None; 5];
        for m in ordered().filter(|m| m.fstype == "cgroup") {
            for opt in m.super_opts.split(',') {
                let Some(k) = V1_CONTROLLERS.iter().position(|c| *c == opt) else {
                    continue;
                };
                if slot[k].is_some() {
                    continue;
                }
                let index = match devs.iter().position(|d| *d == m.dev) {
                    Some(i) => i,
                    None => {
                        devs.push(m.dev);
                        mounts.push(under(root, &m.mount_point));
                        mounts.len() - 1
                    }
                };
                slot[k] = Some(index);
            }
        }
        let [Some(memory), Some(cpu), Some(cpuacct), Some(pids), freezer] = slot else {
            let missing: Vec<&str> = V1_CONTROLLERS[..4]
                .iter()
                .zip(slot)
                .filter(|(_, s)| s.is_none())
                .map(|(c, _)| *c)
                .collect();
            return Err(CgroupError::NotFound {
                what: format!("{v2_problem}; cgroup v1 lacks {}", missing.join(", ")),
            });
        };
        let memsw = mounts[memory].join("memory.memsw.limit_in_bytes").exists();
        Ok(Hierarchy {
            version: Version::V1,
            mounts,
            slots: Slots {
                memory,
                cpu,
                cpuacct,
                pids,
                freezer,
            },
            memsw,
        })
    }

    /// Which cgroup version is in use.
    pub fn version(&self) -> Version {
        self.version
    }

    /// Create the cgroup at relative path `name` (e.g. `cove/ab12cd34ef56`) in every controller
    /// we use, creating missing parents, and write `limits`. The leaf must not exist yet. On
    /// failure, the leaf directories made so far are removed; parents (shared by all sandboxes)
    /// are kept.
    pub fn create(&self, name: &str, limits: &Limits) -> Result<Cgroup> {
        check_name(name)?;
        let cgroup = self.open(name);
        let mut attempt = 0;
        loop {
            let mut made: Vec<&Path> = Vec::with_capacity(cgroup.dirs.len());
            let result = self
                .make_dirs(&cgroup, &mut made)
                .and_then(|()| cgroup.apply(limits, self.memsw));
            let Err(e) = result else {
                return Ok(cgroup);
            };
            // Undo. Fresh cgroups hold no processes, so rmdir succeeds; if it does not,
            // the original error is the one worth reporting, and GC removes the rest.
            for dir in made.iter().rev() {
                let _ = fs::remove_dir(dir);
            }
            // The last sandbox to end removes the shared parent (see `remove_if_empty`): if
            // that happened between two of our steps, the parent is made again.
            attempt += 1;
            if attempt < 5 && e.is_missing_directory() {
                continue;
            }
            return Err(e);
        }
    }

    /// Make the leaf directory in every mount, recording each one made in `made`.
    fn make_dirs<'c>(&self, cgroup: &'c Cgroup, made: &mut Vec<&'c Path>) -> Result<()> {
        if self.version == Version::V2 {
            // Walk down from the root: a level's controllers can only be enabled once its
            // parent has enabled them.
            let root = &self.mounts[0];
            let mut dir = root.clone();
            enable_controllers(&dir)?;
            let parents = Path::new(&cgroup.name)
                .parent()
                .into_iter()
                .flat_map(Path::components);
            for component in parents {
                dir.push(component);
                match fs::create_dir(&dir) {
                    Err(e) if e.kind() != ErrorKind::AlreadyExists => {
                        return Err(mkdir_error(&dir, e));
                    }
                    _ => {}
                }
                enable_controllers(&dir)?;
            }
        }
        for dir in &cgroup.dirs {
            // Optimistic: parents usually exist, so this is one mkdir per controller.
            match fs::create_dir(dir) {
                Err(e) if e.kind() == ErrorKind::NotFound && self.version == Version::V1 => {
                    let parent = dir.parent().unwrap_or(dir);
                    fs::create_dir_all(parent).map_err(|e| mkdir_error(parent, e))?;
                    fs::create_dir(dir).map_err(|e| mkdir_error(dir, e))?;
                }
                r => r.map_err(|e| mkdir_error(dir, e))?,
            }
            made.push(dir);
        }
        Ok(())
    }

    /// Writes `limits` into `cgroup`, made by [`Hierarchy::create`] without them (a warm
    /// sandbox's, limited when it is claimed).
    pub fn limit(&self, cgroup: &Cgroup, limits: &Limits) -> Result<()> {
        cgroup.apply(limits, self.memsw)
    }

    /// A handle on an existing cgroup (for garbage collection), whether or not its directories
    /// exist in every controller. Nothing is checked here; an invalid name makes every
    /// operation on the handle fail with [`CgroupError::InvalidName`].
    pub fn open(&self, name: &str) -> Cgroup {
        Cgroup {
            name: name.to_owned(),
            version: self.version,
            dirs: self.mounts.iter().map(|m| m.join(name)).collect(),
            slots: self.slots,
            valid: check_name(name).is_ok(),
        }
    }

    /// Removes `parent` from every controller where it is empty (it stays where it still has
    /// children, or where another process is creating one right now); returns how many
    /// directories went.
    pub fn remove_if_empty(&self, parent: &str) -> usize {
        if check_name(parent).is_err() {
            return 0;
        }
        self.mounts
            .iter()
            .filter(|m| fs::remove_dir(m.join(parent)).is_ok())
            .count()
    }

    /// The same layout without the v1 freezer hierarchy: one `mkdir`, one migration and one
    /// `rmdir` fewer per sandbox, for sandboxes nobody will pause (`cove run`). Killing does
    /// not need it: the sandbox's pid namespace dies with its init. Unchanged on v2.
    pub fn without_freezer(&self) -> Hierarchy {
        let mut h = self.clone();
        if let (Version::V1, Some(f)) = (h.version, h.slots.freezer) {
            let shared = [h.slots.memory, h.slots.cpu, h.slots.cpuacct, h.slots.pids].contains(&f);
            if !shared {
                h.mounts.remove(f);
                let shift = |i: &mut usize| {
                    if *i > f {
                        *i -= 1;
                    }
                };
                shift(&mut h.slots.memory);
                shift(&mut h.slots.cpu);
                shift(&mut h.slots.cpuacct);
                shift(&mut h.slots.pids);
            }
            h.slots.freezer = None;
        }
        h
    }

    /// Names (like `cove/<child>`) of the direct children of `parent` in any controller we
    /// use: union, sorted, deduplicated; empty if `parent` does not exist. `parent` may be
    /// empty for the hierarchy root.
    pub fn children(&self, parent: &str) -> Result<Vec<String>> {
        if !parent.is_empty() {
            check_name(parent)?;
        }
        let mut names = BTreeSet::new();
        for mount in &self.mounts {
            let dir = mount.join(parent);
            let entries = match fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(read_error(&dir, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| read_error(&dir, e))?;
                // cgroupfs fills in d_type, so this costs no extra stat.
                let is_dir = entry
                    .file_type()
                    .map_err(|e| read_error(&entry.path(), e))?
                    .is_dir();
                // Names that are not UTF-8 were not made by us.
                if let (true, Some(child)) = (is_dir, entry.file_name().to_str()) {
                    names.insert(if parent.is_empty() {
                        child.to_owned()
                    } else {
                        format!("{parent}/{child}")
                    });
                }
            }
        }
        Ok(names.into_iter().collect())
    }
}

/// One line of /proc/self/mountinfo, the fields we use.
struct MountLine<'a> {
    /// `major:minor`, the same for every mount of one hierarchy.
    dev: &'a str,
    /// The mount's root within its filesystem.
    root: &'a str,
    mount_point: PathBuf,
    fstype: &'a str,
    super_opts: &'a str,
}

impl<'a> MountLine<'a> {
    /// `ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTS`;
    /// `None` for lines that do not have that shape.
    fn parse(line: &'a str) -> Option<MountLine<'a>> {
        let (left, right) = line.split_once(" - ")?;
        let mut left = left.split(' ');
        let dev = left.nth(2)?;
        let root = left.next()?;
        let mount_point = PathBuf::from(unescape(left.next()?));
        let mut right = right.split(' ');
        let fstype = right.next()?;
        let super_opts = right.nth(1)?;
        Some(MountLine {
            dev,
            root,
            mount_point,
            fstype,
            super_opts,
        })
    }
}

/// Undo mountinfo's octal escapes (`\040` for space, `\011`, `\012`, `\134`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `root` joined with an absolute `path` from mountinfo.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// Reject names that are absolute or could climb out of the hierarchy.
fn check_name(name: &str) -> Result<()> {
    let bad = name.is_empty()
        || name.contains('\0')
        || name
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        Err(CgroupError::InvalidName {
            name: name.to_owned(),
        })
    } else {
        Ok(())
    }
}

/// v2: make sure `dir`'s children get the memory, pids and cpu controllers.
///
/// Only controllers missing from `cgroup.subtree_control` are written, one per write, so the
/// common case is a single read. No error is ignored: enabling an already enabled controller
/// succeeds, and the errors that remain are real — `EBUSY` means `dir` holds processes (the
/// no-internal-process rule), `ENOENT` means `dir`'s parent does not offer the controller.
/// Either way the sandbox would run without that limit, which we refuse.
fn enable_controllers(dir: &Path) -> Result<()> {
    let path = dir.join("cgroup.subtree_control");
    // The kernel always provides this file; it is only absent in a fake tree, where the
    // writes below create it.
    let enabled = read_if_exists(&path)?.unwrap_or_default();
    for controller in V2_CONTROLLERS {
        if !enabled.split_whitespace().any(|c| c == controller) {
            write(&path, &format!("+{controller}"))?;
        }
    }
    Ok(())
}

/// A cgroup: its name and one directory per distinct controller mount.
#[derive(Debug, Clone)]
pub struct Cgroup {
    name: String,
    version: Version,
    dirs: Vec<PathBuf>,
    slots: Slots,
    /// False when made by [`Hierarchy::open`] from an invalid name.
    valid: bool,
}

impl Cgroup {
    /// The cgroup's path relative to each hierarchy root.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Move `pid` into this cgroup in every controller.
    pub fn add_pid(&self, pid: i32) -> Result<()> {
        self.check()?;
        let pid = pid.to_string();
        for dir in &self.dirs {
            write(&dir.join("cgroup.procs"), &pid)?;
        }
        Ok(())
    }

    /// Files a process writes `0` to in order to move *itself* into this cgroup.
    ///
    /// On v1 these are the `tasks` files: moving the calling thread by writing `0` there is the
    /// one migration the kernel performs without taking the global `cgroup_threadgroup_rwsem`
    /// for writing, whose RCU grace period costs 7-15 ms per sandbox on this kind of host (a
    /// `cgroup.procs` write by the parent measured that). A single-threaded process moved this
    /// way is moved whole. On v2 (`cgroup.procs`) the lock is taken either way.
    pub fn self_join_files(&self) -> Vec<PathBuf> {
        let file = match self.version {
            Version::V1 => "tasks",
            Version::V2 => "cgroup.procs",
        };
        self.dirs.iter().map(|d| d.join(file)).collect()
    }

    /// On v1, the parent's [`Cgroup::self_join_files`]: a process of this cgroup moves itself
    /// out by writing `0` to them. Empty on v2, where that move takes the global lock.
    pub fn self_leave_files(&self) -> Vec<PathBuf> {
        match self.version {
            Version::V1 => self
                .dirs
                .iter()
                .filter_map(|d| Some(d.parent()?.join("tasks")))
                .collect(),
            Version::V2 => Vec::new(),
        }
    }

    /// The directory to pass to `clone3(CLONE_INTO_CGROUP)` on v2; `None` on v1.
    pub fn v2_dir(&self) -> Option<&Path> {
        match self.version {
            Version::V2 => Some(&self.dirs[0]),
            Version::V1 => None,
        }
    }

    /// The CPU time used by the cgroup's processes, in nanoseconds (one file read).
    pub fn cpu_usage_ns(&self) -> Result<u64> {
        self.check()?;
        match self.version {
            Version::V1 => read_u64(&self.dirs[self.slots.cpuacct].join("cpuacct.usage")),
            Version::V2 => Ok(
                read_key(&self.dirs[self.slots.cpu].join("cpu.stat"), "usage_usec")?
                    .saturating_mul(1000),
            ),
        }
    }

    /// How often the limits bit: (processes the OOM killer killed, forks the pids limit
    /// refused). Two file reads.
    pub fn limit_events(&self) -> Result<(u64, u64)> {
        self.check()?;
        let memory = &self.dirs[self.slots.memory];
        let oom_kills = match self.version {
            Version::V1 => read_key(&memory.join("memory.oom_control"), "oom_kill")?,
            Version::V2 => read_key(&memory.join("memory.events"), "oom_kill")?,
        };
        let pids = &self.dirs[self.slots.pids];
        Ok((oom_kills, read_key(&pids.join("pids.events"), "max")?))
    }

    /// Read CPU, memory and pid accounting.
    pub fn stats(&self) -> Result<Stats> {
        let cpu_usage_ns = self.cpu_usage_ns()?;
        let (oom_kills, pids_limit_hits) = self.limit_events()?;
        let s = &self.slots;
        let memory = &self.dirs[s.memory];
        let pids = &self.dirs[s.pids];
        let (memory_peak_bytes, memory_current_bytes) = match self.version {
            Version::V1 => (
                read_u64(&memory.join("memory.max_usage_in_bytes"))?,
                read_u64(&memory.join("memory.usage_in_bytes"))?,
            ),
            Version::V2 => (
                read_u64_if_exists(&memory.join("memory.peak"))?.unwrap_or(0),
                read_u64(&memory.join("memory.current"))?,
            ),
        };
        Ok(Stats {
            cpu_usage_ns,
            memory_peak_bytes,
            memory_current_bytes,
            oom_kills,
            pids_limit_hits,
            pids_current: read_u64(&pids.join("pids.current"))?,
        })
    }

    /// Whether the cgroup's directory exists in any controller.
    pub fn exists(&self) -> bool {
        self.valid && self.dirs.iter().any(|d| d.is_dir())
    }

    /// Every pid in the cgroup (union over controllers, sorted, deduplicated). Controllers
    /// whose directory is missing are skipped.
    pub fn pids(&self) -> Result<Vec<i32>> {
        self.check()?;
        let mut pids = Vec::new();
        for dir in &self.dirs {
            let path = dir.join("cgroup.procs");
            let Some(content) = read_if_exists(&path)? else {
                continue;
            };
            for line in content.lines().filter(|l| !l.is_empty()) {
                let pid = line.parse().map_err(|_| parse_error(&path, line))?;
                pids.push(pid);
            }
        }
        pids.sort_unstable();
        pids.dedup();
        Ok(pids)
    }

    /// Kill every process in the cgroup and wait until it is empty.
    ///
    /// v2 writes `cgroup.kill` when the kernel has it. Otherwise: freeze (when a freezer is
    /// available) so nothing forks, call `kill` (which must send SIGKILL) for each pid, thaw
    /// (v1 frozen tasks only die once thawed), then call `kill` on whatever remains until the
    /// cgroup is empty. Gives up after about 2 s with [`CgroupError::Busy`].
    pub fn kill_all(&self, kill: &mut dyn FnMut(i32)) -> Result<()> {
        self.kill_all_within(kill, SETTLE_TIMEOUT)
    }

    fn kill_all_within(&self, kill: &mut dyn FnMut(i32), timeout: Duration) -> Result<()> {
        self.check()?;
        let deadline = Instant::now() + timeout;
        if self.version == Version::V2 && write_if_exists(&self.dirs[0].join("cgroup.kill"), "1")? {
            return self.wait_empty(None, deadline);
        }
        // Freezing is an optimisation against forks racing the kills: the loop below
        // converges without it (pids.max bounds any fork bomb), so a failure is not fatal.
        let frozen = self.freeze().is_ok();
        if frozen {
            self.wait_frozen(deadline.min(Instant::now() + FREEZE_TIMEOUT));
        }
        let killed = self
            .pids()
            .map(|pids| pids.into_iter().for_each(&mut *kill));
        let thawed = if frozen { self.thaw() } else { Ok(()) };
        killed?;
        thawed?;
        self.wait_empty(Some(kill), deadline)
    }

    /// Poll until no process is left, calling `kill` on stragglers; [`CgroupError::Busy`] at
    /// `deadline`.
    fn wait_empty(&self, mut kill: Option<&mut dyn FnMut(i32)>, deadline: Instant) -> Result<()> {
        let mut backoff = FIRST_BACKOFF;
        loop {
            let pids = self.pids()?;
            if pids.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::Busy {
                    path: self.dirs[0].clone(),
                    remaining: pids.len(),
                });
            }
            if let Some(kill) = kill.as_mut() {
                pids.into_iter().for_each(&mut **kill);
            }
            thread::sleep(backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Best effort: poll until the freeze has taken hold or `deadline` passes.
    fn wait_frozen(&self, deadline: Instant) {
        let (path, done): (PathBuf, fn(&str) -> bool) = match (self.version, self.slots.freezer) {
            (Version::V1, Some(i)) => {
                (self.dirs[i].join("freezer.state"), |s| s.trim() == "FROZEN")
            }
            (Version::V2, _) => (self.dirs[0].join("cgroup.events"), |s| {
                s.lines().any(|l| l == "frozen 1")
            }),
            (Version::V1, None) => return,
        };
        let mut backoff = FIRST_BACKOFF;
        while let Ok(state) = fs::read_to_string(&path) {
            if done(&state) || Instant::now() >= deadline {
                return;
            }
            thread::sleep(backoff);
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Freeze every process in the cgroup (v1 `freezer.state`, v2 `cgroup.freeze`). Returns
    /// once the freeze is requested; the kernel completes it asynchronously.
    pub fn freeze(&self) -> Result<()> {
        self.set_frozen(true)
    }

    /// Undo [`Cgroup::freeze`].
    pub fn thaw(&self) -> Result<()> {
        self.set_frozen(false)
    }

    fn set_frozen(&self, frozen: bool) -> Result<()> {
        self.check()?;
        match (self.version, self.slots.freezer) {
            (Version::V1, Some(i)) => write(
                &self.dirs[i].join("freezer.state"),
                if frozen { "FROZEN" } else { "THAWED" },
            ),
            (Version::V1, None) => Err(CgroupError::Unsupported {
                what: "the v1 freezer controller",
            }),
            (Version::V2, _) => {
                let path = self.dirs[0].join("cgroup.freeze");
                if write_if_exists(&path, if frozen { "1" } else { "0" })? {
                    Ok(())
                } else {
                    Err(CgroupError::Unsupported {
                        what: "cgroup.freeze",
                    })
                }
            }
        }
    }

    /// Remove the cgroup's directory in every controller; missing ones are fine. While the
    /// kernel reports `EBUSY` (tasks still exiting), retry with short, growing sleeps for
    /// about 2 s, then fail with [`CgroupError::Busy`].
    pub fn remove(&self) -> Result<()> {
        self.check()?;
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        for dir in &self.dirs {
            let mut backoff = FIRST_BACKOFF;
            loop {
                match fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == ErrorKind::NotFound => break,
                    Err(e) if e.kind() == ErrorKind::ResourceBusy && Instant::now() < deadline => {
                        thread::sleep(backoff);
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                    Err(e) if e.kind() == ErrorKind::ResourceBusy => {
                        let remaining = read_if_exists(&dir.join("cgroup.procs"))
                            .ok()
                            .flatten()
                            .map_or(0, |procs| procs.lines().count());
                        return Err(CgroupError::Busy {
                            path: dir.clone(),
                            remaining,
                        });
                    }
                    Err(source) => {
                        return Err(CgroupError::Rmdir {
                            path: dir.clone(),
                            source,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// One attempt at [`Cgroup::remove`], without waiting: false at the first directory that
    /// cannot go yet (its processes are still exiting), which `remove` then finishes.
    pub fn try_remove(&self) -> bool {
        self.valid
            && self.dirs.iter().all(|dir| match fs::remove_dir(dir) {
                Ok(()) => true,
                Err(e) => e.kind() == ErrorKind::NotFound,
            })
    }

    /// Write `limits` into the freshly made directories. `memsw`: v1 swap accounting exists.
    fn apply(&self, limits: &Limits, memsw: bool) -> Result<()> {
        let s = &self.slots;
        let memory = &self.dirs[s.memory];
        match self.version {
            Version::V1 => {
                if let Some(bytes) = limits.memory_bytes {
                    // The memory limit first: memsw must never be below it.
                    let bytes = bytes.to_string();
                    write(&memory.join("memory.limit_in_bytes"), &bytes)?;
                    if memsw {
                        write(&memory.join("memory.memsw.limit_in_bytes"), &bytes)?;
                    }
                }
                if let Some(millis) = limits.cpu_millis {
                    // A new cgroup's `cpu.cfs_period_us` is always the kernel default,
                    // CPU_PERIOD_US (not inherited), so only the quota is written.
                    let quota = quota_us(millis).to_string();
                    write(&self.dirs[s.cpu].join("cpu.cfs_quota_us"), &quota)?;
                }
            }
            Version::V2 => {
                if let Some(bytes) = limits.memory_bytes {
                    write(&memory.join("memory.max"), &bytes.to_string())?;
                    // Absent without swap accounting, where swap is not charged anyway.
                    write_if_exists(&memory.join("memory.swap.max"), "0")?;
                    // Absent before Linux 4.19: then the OOM killer picks single tasks.
                    write_if_exists(&memory.join("memory.oom.group"), "1")?;
                }
                if let Some(millis) = limits.cpu_millis {
                    write(
                        &self.dirs[s.cpu].join("cpu.max"),
                        &format!("{} {CPU_PERIOD_US}", quota_us(millis)),
                    )?;
                }
            }
        }
        if let Some(pids) = limits.pids {
            write(&self.dirs[s.pids].join("pids.max"), &pids.to_string())?;
        }
        Ok(())
    }

    fn check(&self) -> Result<()> {
        if self.valid {
            Ok(())
        } else {
            Err(CgroupError::InvalidName {
                name: self.name.clone(),
            })
        }
    }
}

/// CFS quota per [`CPU_PERIOD_US`] for `millis` thousandths of a CPU.
fn quota_us(millis: u64) -> u64 {
    millis.saturating_mul(CPU_PERIOD_US / 1000)
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|e| read_error(path, e))
}

/// `None` when the file does not exist.
fn read_if_exists(path: &Path) -> Result<Option<String>> {
    match fs::read_to_string(path) {
        Ok(content) => Ok(Some(content)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(read_error(path, e)),
    }
}

fn read_u64(path: &Path) -> Result<u64> {
    parse_u64(path, &read(path)?)
}

/// `None` when the file does not exist.
fn read_u64_if_exists(path: &Path) -> Result<Option<u64>> {
    read_if_exists(path)?
        .map(|content| parse_u64(path, &content))
        .transpose()
}

fn parse_u64(path: &Path, content: &str) -> Result<u64> {
    content
        .trim()
        .parse()
        .map_err(|_| parse_error(path, content))
}

/// The value of `key` in a flat-keyed file (`key value` per line); 0 when the key is absent
/// (older kernels lack some counters).
fn read_key(path: &Path, key: &str) -> Result<u64> {
    let content = read(path)?;
    for line in content.lines() {
        if let Some((k, v)) = line.split_once(' ')
            && k == key
        {
            return v.trim().parse().map_err(|_| parse_error(path, line));
        }
    }
    Ok(0)
}

/// Write `value` with a single `write()`, creating the file if needed (only a fake tree needs
/// that; cgroupfs files always exist).
fn write(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).map_err(|e| write_error(path, value, e))
}

/// Write `value` if the file exists; `Ok(false)` when it does not (an optional feature).
fn write_if_exists(path: &Path, value: &str) -> Result<bool> {
    let file = OpenOptions::new().write(true).truncate(true).open(path);
    match file {
        Ok(mut file) => file
            .write_all(value.as_bytes())
            .map(|()| true)
            .map_err(|e| write_error(path, value, e)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(write_error(path, value, e)),
    }
}

fn read_error(path: &Path, source: io::Error) -> CgroupError {
    CgroupError::Read {
        path: path.to_owned(),
        source,
    }
}

fn write_error(path: &Path, value: &str, source: io::Error) -> CgroupError {
    CgroupError::Write {
        path: path.to_owned(),
        value: value.to_owned(),
        source,
    }
}

impl CgroupError {
    /// Whether a directory was missing (`ENOENT` creating or writing in it).
    fn is_missing_directory(&self) -> bool {
        matches!(
            self,
            CgroupError::Mkdir { source, .. } | CgroupError::Write { source, .. }
                if source.kind() == ErrorKind::NotFound
        )
    }
}

fn mkdir_error(path: &Path, source: io::Error) -> CgroupError {
    CgroupError::Mkdir {
        path: path.to_owned(),
        source,
    }
}

fn parse_error(path: &Path, content: &str) -> CgroupError {
    CgroupError::Parse {
        path: path.to_owned(),
        content: content.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};
    use std::sync::atomic::{AtomicUsize, Ordering};

    static NEXT: AtomicUsize = AtomicUsize::new(0);

    fn unique() -> usize {
        NEXT.fetch_add(1, Ordering::Relaxed)
    }

    /// A temp dir standing in for `/`, removed on drop. Unlike cgroupfs, mkdir does not
    /// populate control files, so tests write the ones the kernel would provide.
    struct Fake {
        root: PathBuf,
    }

    impl Fake {
        fn new() -> Fake {
            let name = format!("cove-cgroup-test-{}-{}", std::process::id(), unique());
            let root = std::env::temp_dir().join(name);
            fs::create_dir_all(&root).unwrap();
            Fake { root }
        }

        fn path(&self, rel: &str) -> PathBuf {
            self.root.join(rel)
        }

        fn write(&self, rel: &str, content: &str) {
            let path = self.path(rel);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(path, content).unwrap();
        }

        fn read(&self, rel: &str) -> String {
            fs::read_to_string(self.path(rel)).unwrap()
        }

        fn exists(&self, rel: &str) -> bool {
            self.path(rel).exists()
        }

        /// Delete the regular files in `rel`, as the kernel does when a cgroup goes away.
        fn strip_files(&self, rel: &str) {
            for entry in fs::read_dir(self.path(rel)).unwrap() {
                let entry = entry.unwrap();
                if entry.file_type().unwrap().is_file() {
                    fs::remove_file(entry.path()).unwrap();
                }
            }
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.root);
        }
    }

    /// Like this host: one v1 hierarchy per controller, cgroup2 with only hugetlb.
    const V1_HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    /// systemd-style v1: `cpu,cpuacct` combined, a mount point with a space, a bind mount of
    /// a subtree of the cpu hierarchy, no freezer, no cgroup2.
    const V1_COMBINED: &str = "\
25 19 0:22 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
26 25 0:23 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid shared:10 - cgroup cgroup rw,cpu,cpuacct
27 25 0:24 / /sys/fs/cgroup/my\\040memory rw,nosuid shared:11 - cgroup cgroup rw,memory
28 25 0:25 / /sys/fs/cgroup/pids rw,nosuid shared:12 - cgroup cgroup rw,pids
29 25 0:26 / /sys/fs/cgroup/systemd rw,nosuid shared:13 - cgroup cgroup rw,xattr,name=systemd
30 19 0:23 /sub /mnt/cpu rw - cgroup cgroup rw,cpu,cpuacct
";

    const V2_PURE: &str = "\
30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    const MIB_64: u64 = 64 << 20;

    fn limits() -> Limits {
        Limits {
            memory_bytes: Some(MIB_64),
            cpu_millis: Some(500),
            pids: Some(32),
        }
    }

    fn v1_hybrid(memsw: bool) -> (Fake, Hierarchy) {
        let fake = Fake::new();
        for c in [
            "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids",
        ] {
            fs::create_dir_all(fake.path(&format!("sys/fs/cgroup/{c}"))).unwrap();
        }
        fake.write("sys/fs/cgroup/unified/cgroup.controllers", "hugetlb\n");
        if memsw {
            fake.write(
                "sys/fs/cgroup/memory/memory.memsw.limit_in_bytes",
                "9223372036854771712\n",
            );
        }
        let hierarchy = Hierarchy::from_mountinfo(V1_HYBRID, &fake.root).unwrap();
        (fake, hierarchy)
    }

    fn v1_combined() -> (Fake, Hierarchy) {
        let fake = Fake::new();
        for c in ["cpu,cpuacct", "my memory", "pids"] {
            fs::create_dir_all(fake.path(&format!("sys/fs/cgroup/{c}"))).unwrap();
        }
        let hierarchy = Hierarchy::from_mountinfo(V1_COMBINED, &fake.root).unwrap();
        (fake, hierarchy)
    }

    fn v2_pure() -> (Fake, Hierarchy) {
        let fake = Fake::new();
        fake.write(
            "sys/fs/cgroup/cgroup.controllers",
            "cpuset cpu io memory hugetlb pids rdma misc\n",
        );
        fake.write("sys/fs/cgroup/cgroup.subtree_control", "memory pids\n");
        let hierarchy = Hierarchy::from_mountinfo(V2_PURE, &fake.root).unwrap();
        (fake, hierarchy)
    }

    #[test]
    fn detects_v1_hybrid() {
        let (fake, h) = v1_hybrid(true);
        assert_eq!(h.version(), Version::V1);
        let dirs: Vec<PathBuf> = ["cpu", "cpuacct", "memory", "freezer", "pids"]
            .iter()
            .map(|c| fake.path(&format!("sys/fs/cgroup/{c}")))
            .collect();
        assert_eq!(h.mounts, dirs);
        assert_eq!(
            h.slots,
            Slots {
                memory: 2,
                cpu: 0,
                cpuacct: 1,
                pids: 4,
                freezer: Some(3)
            }
        );
        assert!(h.memsw);
        assert!(!v1_hybrid(false).1.memsw);
    }

    #[test]
    fn detects_v1_combined_and_dedupes() {
        let (fake, h) = v1_combined();
        assert_eq!(h.version(), Version::V1);
        let dirs: Vec<PathBuf> = ["cpu,cpuacct", "my memory", "pids"]
            .iter()
            .map(|c| fake.path(&format!("sys/fs/cgroup/{c}")))
            .collect();
        assert_eq!(h.mounts, dirs);
        assert_eq!(
            h.slots,
            Slots {
                memory: 1,
                cpu: 0,
                cpuacct: 0,
                pids: 2,
                freezer: None
            }
        );
    }

    #[test]
    fn detects_v2() {
        let (fake, h) = v2_pure();
        assert_eq!(h.version(), Version::V2);
        assert_eq!(h.mounts, vec![fake.path("sys/fs/cgroup")]);
    }

    #[test]
    fn prefers_v2_when_it_has_the_controllers() {
        let (fake, _) = v1_hybrid(false);
        fake.write(
            "sys/fs/cgroup/unified/cgroup.controllers",
            "cpu memory pids hugetlb\n",
        );
        let h = Hierarchy::from_mountinfo(V1_HYBRID, &fake.root).unwrap();
        assert_eq!(h.version(), Version::V2);
        assert_eq!(h.mounts, vec![fake.path("sys/fs/cgroup/unified")]);
    }

    #[test]
    fn detection_error_names_what_is_missing() {
        let (fake, _) = v1_hybrid(false);
        let no_pids: String = V1_HYBRID
            .lines()
            .filter(|l| !l.ends_with("rw,pids"))
            .map(|l| format!("{l}\n"))
            .collect();
        let err = Hierarchy::from_mountinfo(&no_pids, &fake.root).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, CgroupError::NotFound { .. }));
        assert!(
            message.contains("unified lacks memory, pids, cpu"),
            "{message}"
        );
        assert!(message.contains("cgroup v1 lacks pids"), "{message}");

        let err = Hierarchy::from_mountinfo("", &fake.root)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no cgroup2 mount; cgroup v1 lacks memory, cpu, cpuacct, pids"),
            "{err}"
        );
    }

    #[test]
    fn unescapes_mount_points() {
        assert_eq!(unescape(r"/a\040b\011c\134d"), "/a b\tc\\d");
        assert_eq!(unescape(r"/x\09y\"), r"/x\09y\");
    }

    #[test]
    fn creates_v1_hybrid_with_limits() {
        let (fake, h) = v1_hybrid(true);
        let cg = h.create("cove/x", &limits()).unwrap();
        assert_eq!(cg.name(), "cove/x");
        assert_eq!(cg.v2_dir(), None);
        assert_eq!(cg.dirs.len(), 5);
        assert!(cg.dirs.iter().all(|d| d.is_dir()));
        let m = "sys/fs/cgroup/memory/cove/x";
        assert_eq!(fake.read(&format!("{m}/memory.limit_in_bytes")), "67108864");
        assert_eq!(
            fake.read(&format!("{m}/memory.memsw.limit_in_bytes")),
            "67108864"
        );
        assert!(!fake.exists("sys/fs/cgroup/cpu/cove/x/cpu.cfs_period_us"));
        assert_eq!(
            fake.read("sys/fs/cgroup/cpu/cove/x/cpu.cfs_quota_us"),
            "50000"
        );
        assert_eq!(fake.read("sys/fs/cgroup/pids/cove/x/pids.max"), "32");
    }

    #[test]
    fn skips_memsw_without_swap_accounting_and_unset_limits() {
        let (fake, h) = v1_hybrid(false);
        h.create(
            "cove/x",
            &Limits {
                memory_bytes: Some(MIB_64),
                ..Limits::default()
            },
        )
        .unwrap();
        assert_eq!(
            fake.read("sys/fs/cgroup/memory/cove/x/memory.limit_in_bytes"),
            "67108864"
        );
        assert!(!fake.exists("sys/fs/cgroup/memory/cove/x/memory.memsw.limit_in_bytes"));
        assert!(!fake.exists("sys/fs/cgroup/cpu/cove/x/cpu.cfs_quota_us"));
        assert!(!fake.exists("sys/fs/cgroup/pids/cove/x/pids.max"));

        h.create("cove/y", &Limits::default()).unwrap();
        assert!(!fake.exists("sys/fs/cgroup/memory/cove/y/memory.limit_in_bytes"));
    }

    #[test]
    fn creates_v1_combined_once_per_mount() {
        let (fake, h) = v1_combined();
        let cg = h.create("cove/x", &limits()).unwrap();
        assert_eq!(cg.dirs.len(), 3);
        assert_eq!(
            fake.read("sys/fs/cgroup/cpu,cpuacct/cove/x/cpu.cfs_quota_us"),
            "50000"
        );
        assert_eq!(
            fake.read("sys/fs/cgroup/my memory/cove/x/memory.limit_in_bytes"),
            "67108864"
        );
        assert_eq!(fake.read("sys/fs/cgroup/pids/cove/x/pids.max"), "32");
    }

    #[test]
    fn creates_v2_and_enables_controllers() {
        let (fake, h) = v2_pure();
        let cg = h.create("cove/x", &limits()).unwrap();
        assert_eq!(
            cg.v2_dir(),
            Some(fake.path("sys/fs/cgroup/cove/x").as_path())
        );
        // Only the missing controller is written at the root (the fake keeps the last write).
        assert_eq!(fake.read("sys/fs/cgroup/cgroup.subtree_control"), "+cpu");
        assert_eq!(
            fake.read("sys/fs/cgroup/cove/cgroup.subtree_control"),
            "+cpu"
        );
        let x = "sys/fs/cgroup/cove/x";
        assert_eq!(fake.read(&format!("{x}/memory.max")), "67108864");
        assert_eq!(fake.read(&format!("{x}/cpu.max")), "50000 100000");
        assert_eq!(fake.read(&format!("{x}/pids.max")), "32");
        // Optional files are not created where the kernel does not provide them.
        assert!(!fake.exists(&format!("{x}/memory.swap.max")));
        assert!(!fake.exists(&format!("{x}/memory.oom.group")));

        // A parent that already enables everything is only read.
        fake.write("sys/fs/cgroup/cgroup.subtree_control", "cpu memory pids\n");
        h.create("cove/y", &Limits::default()).unwrap();
        assert_eq!(
            fake.read("sys/fs/cgroup/cgroup.subtree_control"),
            "cpu memory pids\n"
        );
    }

    #[test]
    fn v2_writes_optional_files_when_present() {
        let (fake, h) = v2_pure();
        let x = "sys/fs/cgroup/cove/x";
        fake.write(&format!("{x}/memory.swap.max"), "max\n");
        fake.write(&format!("{x}/memory.oom.group"), "0\n");
        h.open("cove/x").apply(&limits(), false).unwrap();
        assert_eq!(fake.read(&format!("{x}/memory.swap.max")), "0");
        assert_eq!(fake.read(&format!("{x}/memory.oom.group")), "1");
    }

    #[test]
    fn create_undoes_on_failure() {
        let (fake, h) = v1_hybrid(true);
        // The pids leaf (made last) already exists: not ours, so it must survive the undo.
        fs::create_dir_all(fake.path("sys/fs/cgroup/pids/cove/x")).unwrap();
        let err = h.create("cove/x", &limits()).unwrap_err();
        assert!(
            matches!(&err, CgroupError::Mkdir { source, .. } if source.kind() == ErrorKind::AlreadyExists)
        );
        let path = fake.path("sys/fs/cgroup/pids/cove/x");
        assert_eq!(
            err.to_string(),
            format!("cannot create cgroup directory {}", path.display())
        );
        for c in ["cpu", "cpuacct", "memory", "freezer"] {
            assert!(
                !fake.exists(&format!("sys/fs/cgroup/{c}/cove/x")),
                "{c} leaf left behind"
            );
            assert!(
                fake.exists(&format!("sys/fs/cgroup/{c}/cove")),
                "shared parent removed"
            );
        }
        assert!(path.is_dir());
    }

    #[test]
    fn v2_create_fails_when_a_controller_cannot_be_enabled() {
        let (fake, h) = v2_pure();
        // A dangling symlink reads as absent but cannot be written.
        let path = fake.path("sys/fs/cgroup/cgroup.subtree_control");
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("missing/file", &path).unwrap();
        let err = h.create("cove/x", &limits()).unwrap_err();
        assert!(
            matches!(&err, CgroupError::Write { value, .. } if value == "+memory"),
            "{err:?}"
        );
        assert!(
            err.to_string()
                .contains("sys/fs/cgroup/cgroup.subtree_control"),
            "{err}"
        );
        assert!(!fake.exists("sys/fs/cgroup/cove"));
    }

    #[test]
    fn rejects_invalid_names() {
        let (fake, h) = v1_hybrid(false);
        for name in [
            "",
            "/abs",
            "../x",
            "cove/../../x",
            "a//b",
            "a/./b",
            "a/",
            "nul\0",
        ] {
            let err = h.create(name, &Limits::default()).unwrap_err();
            assert!(
                matches!(err, CgroupError::InvalidName { .. }),
                "{name:?}: {err:?}"
            );
            assert!(matches!(
                h.open(name).remove(),
                Err(CgroupError::InvalidName { .. })
            ));
            assert!(matches!(
                h.open(name).pids(),
                Err(CgroupError::InvalidName { .. })
            ));
        }
        assert!(matches!(
            h.children(".."),
            Err(CgroupError::InvalidName { .. })
        ));
        assert!(fake.exists("sys/fs/cgroup/memory"));
    }

    #[test]
    fn reads_v1_stats() {
        let (fake, h) = v1_hybrid(true);
        let cg = h.create("cove/s", &Limits::default()).unwrap();
        fake.write("sys/fs/cgroup/cpuacct/cove/s/cpuacct.usage", "123456789\n");
        fake.write(
            "sys/fs/cgroup/memory/cove/s/memory.max_usage_in_bytes",
            "2000\n",
        );
        fake.write(
            "sys/fs/cgroup/memory/cove/s/memory.usage_in_bytes",
            "1000\n",
        );
        fake.write(
            "sys/fs/cgroup/memory/cove/s/memory.oom_control",
            "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n",
        );
        fake.write("sys/fs/cgroup/pids/cove/s/pids.events", "max 7\n");
        fake.write("sys/fs/cgroup/pids/cove/s/pids.current", "4\n");
        let expected = Stats {
            cpu_usage_ns: 123_456_789,
            memory_peak_bytes: 2000,
            memory_current_bytes: 1000,
            oom_kills: 3,
            pids_limit_hits: 7,
            pids_current: 4,
        };
        assert_eq!(cg.stats().unwrap(), expected);

        fake.write("sys/fs/cgroup/pids/cove/s/pids.current", "lots\n");
        let err = cg.stats().unwrap_err();
        assert!(matches!(&err, CgroupError::Parse { content, .. } if content == "lots\n"));
        assert!(
            err.to_string()
                .contains("sys/fs/cgroup/pids/cove/s/pids.current"),
            "{err}"
        );

        fs::remove_file(fake.path("sys/fs/cgroup/pids/cove/s/pids.current")).unwrap();
        let err = cg.stats().unwrap_err();
        assert!(matches!(err, CgroupError::Read { .. }));
        assert!(
            err.to_string().ends_with("pids/cove/s/pids.current"),
            "{err}"
        );
    }

    #[test]
    fn reads_v2_stats() {
        let (fake, h) = v2_pure();
        let cg = h.create("cove/s", &Limits::default()).unwrap();
        let s = "sys/fs/cgroup/cove/s";
        fake.write(
            &format!("{s}/cpu.stat"),
            "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n",
        );
        fake.write(&format!("{s}/memory.current"), "4096\n");
        fake.write(
            &format!("{s}/memory.events"),
            "low 0\nhigh 0\nmax 2\noom 1\noom_kill 1\noom_group_kill 0\n",
        );
        fake.write(&format!("{s}/pids.events"), "max 2\n");
        fake.write(&format!("{s}/pids.current"), "1\n");
        let mut expected = Stats {
            cpu_usage_ns: 1_500_000,
            memory_peak_bytes: 0,
            memory_current_bytes: 4096,
            oom_kills: 1,
            pids_limit_hits: 2,
            pids_current: 1,
        };
        assert_eq!(cg.stats().unwrap(), expected);
        fake.write(&format!("{s}/memory.peak"), "8192\n");
        expected.memory_peak_bytes = 8192;
        assert_eq!(cg.stats().unwrap(), expected);
    }

    #[test]
    fn lists_children_across_controllers() {
        let (fake, h) = v1_hybrid(false);
        h.create("cove/b", &Limits::default()).unwrap();
        h.create("cove/a", &Limits::default()).unwrap();
        fs::create_dir_all(fake.path("sys/fs/cgroup/pids/cove/c")).unwrap();
        fake.write("sys/fs/cgroup/memory/cove/not-a-cgroup", "");
        assert_eq!(h.children("cove").unwrap(), ["cove/a", "cove/b", "cove/c"]);
        assert_eq!(h.children("").unwrap(), ["cove"]);
        assert!(h.children("elsewhere").unwrap().is_empty());
    }

    #[test]
    fn removes_every_controller_dir() {
        let (fake, h) = v1_hybrid(true);
        let cg = h.create("cove/r", &limits()).unwrap();

        // A directory that does not empty itself (only a fake does that) is an error.
        let err = cg.remove().unwrap_err();
        assert!(matches!(err, CgroupError::Rmdir { .. }), "{err:?}");
        assert!(err.to_string().contains("/cove/r"), "{err}");

        for c in ["cpu", "cpuacct", "memory", "freezer", "pids"] {
            fake.strip_files(&format!("sys/fs/cgroup/{c}/cove/r"));
        }
        cg.remove().unwrap();
        assert!(cg.dirs.iter().all(|d| !d.exists()));
        // Already gone is fine, as is a handle opened on a partial cgroup.
        cg.remove().unwrap();
        fs::create_dir(fake.path("sys/fs/cgroup/pids/cove/r")).unwrap();
        h.open("cove/r").remove().unwrap();
        assert!(!fake.exists("sys/fs/cgroup/pids/cove/r"));
    }

    #[test]
    fn adds_pids_and_lists_their_union() {
        let (fake, h) = v1_hybrid(false);
        let cg = h.create("cove/p", &Limits::default()).unwrap();
        cg.add_pid(42).unwrap();
        for c in ["cpu", "cpuacct", "memory", "freezer", "pids"] {
            assert_eq!(
                fake.read(&format!("sys/fs/cgroup/{c}/cove/p/cgroup.procs")),
                "42"
            );
        }
        fake.write("sys/fs/cgroup/memory/cove/p/cgroup.procs", "3\n1\n");
        fake.write("sys/fs/cgroup/pids/cove/p/cgroup.procs", "1\n2\n");
        fs::remove_file(fake.path("sys/fs/cgroup/cpu/cove/p/cgroup.procs")).unwrap();
        fake.write("sys/fs/cgroup/cpuacct/cove/p/cgroup.procs", "");
        fake.write("sys/fs/cgroup/freezer/cove/p/cgroup.procs", "");
        assert_eq!(cg.pids().unwrap(), [1, 2, 3]);

        fake.write("sys/fs/cgroup/pids/cove/p/cgroup.procs", "1\nx\n");
        assert!(matches!(cg.pids(), Err(CgroupError::Parse { content, .. }) if content == "x"));
    }

    /// Fill `cgroup.procs` in each of `cg`'s dirs with `pids`.
    fn set_procs(cg: &Cgroup, pids: &[i32]) {
        let content: String = pids.iter().map(|p| format!("{p}\n")).collect();
        for dir in &cg.dirs {
            fs::write(dir.join("cgroup.procs"), &content).unwrap();
        }
    }

    /// Remove `pid` from `cgroup.procs` in each of `cg`'s dirs, as its death would.
    fn reap(cg: &Cgroup, pid: i32) {
        for dir in &cg.dirs {
            let path = dir.join("cgroup.procs");
            let left: String = fs::read_to_string(&path)
                .unwrap()
                .lines()
                .filter(|l| *l != pid.to_string())
                .map(|l| format!("{l}\n"))
                .collect();
            fs::write(path, left).unwrap();
        }
    }

    #[test]
    fn kill_all_v1_freezes_kills_and_thaws() {
        let (fake, h) = v1_hybrid(false);
        let cg = h.create("cove/k", &Limits::default()).unwrap();
        set_procs(&cg, &[10, 11, 12]);
        let mut killed = Vec::new();
        cg.kill_all(&mut |pid| {
            assert_eq!(
                fake.read("sys/fs/cgroup/freezer/cove/k/freezer.state"),
                "FROZEN"
            );
            killed.push(pid);
            reap(&cg, pid);
        })
        .unwrap();
        assert_eq!(killed, [10, 11, 12]);
        assert_eq!(
            fake.read("sys/fs/cgroup/freezer/cove/k/freezer.state"),
            "THAWED"
        );
    }

    #[test]
    fn kill_all_gives_up_with_a_count() {
        let (_fake, h) = v1_combined();
        let cg = h.create("cove/k", &Limits::default()).unwrap();
        set_procs(&cg, &[7, 8]);
        let mut calls = 0;
        let err = cg
            .kill_all_within(&mut |_| calls += 1, Duration::from_millis(20))
            .unwrap_err();
        assert!(
            matches!(err, CgroupError::Busy { remaining: 2, .. }),
            "{err:?}"
        );
        assert!(calls > 2, "stragglers are killed again");
        assert!(err.to_string().contains("(2 processes left)"), "{err}");
    }

    #[test]
    fn kill_all_v2_prefers_cgroup_kill() {
        let (fake, h) = v2_pure();
        let cg = h.create("cove/k", &Limits::default()).unwrap();
        fake.write("sys/fs/cgroup/cove/k/cgroup.kill", "");
        cg.kill_all(&mut |pid| panic!("kill({pid}) called despite cgroup.kill"))
            .unwrap();
        assert_eq!(fake.read("sys/fs/cgroup/cove/k/cgroup.kill"), "1");

        // Without cgroup.kill or cgroup.freeze: plain kill loop.
        let cg = h.create("cove/old", &Limits::default()).unwrap();
        set_procs(&cg, &[5]);
        let mut killed = Vec::new();
        cg.kill_all(&mut |pid| {
            killed.push(pid);
            reap(&cg, pid);
        })
        .unwrap();
        assert_eq!(killed, [5]);
    }

    #[test]
    fn freeze_and_thaw() {
        let (fake, h) = v2_pure();
        let cg = h.create("cove/f", &Limits::default()).unwrap();
        assert!(matches!(
            cg.freeze(),
            Err(CgroupError::Unsupported {
                what: "cgroup.freeze"
            })
        ));
        fake.write("sys/fs/cgroup/cove/f/cgroup.freeze", "0\n");
        cg.freeze().unwrap();
        assert_eq!(fake.read("sys/fs/cgroup/cove/f/cgroup.freeze"), "1");
        cg.thaw().unwrap();
        assert_eq!(fake.read("sys/fs/cgroup/cove/f/cgroup.freeze"), "0");

        let (_fake, h) = v1_combined();
        let cg = h.create("cove/f", &Limits::default()).unwrap();
        assert!(matches!(cg.freeze(), Err(CgroupError::Unsupported { .. })));
    }

    /// True when running as root (effective uid 0), from /proc so no `unsafe` is needed.
    fn is_root() -> bool {
        let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
        let uid = status.lines().find_map(|l| l.strip_prefix("Uid:"));
        uid.and_then(|u| u.split_whitespace().nth(1)) == Some("0")
    }

    /// Removes a real test cgroup (and kills its child) even when the test fails.
    struct RealGuard {
        cgroup: Cgroup,
        parent: Vec<PathBuf>,
        child: Option<Child>,
    }

    impl Drop for RealGuard {
        fn drop(&mut self) {
            if let Some(child) = self.child.as_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
            let _ = self.cgroup.remove();
            // Shared with other tests in this process: whoever is last removes it.
            for dir in &self.parent {
                let _ = fs::remove_dir(dir);
            }
        }
    }

    /// A host with the v1 memory controller, detected for real; `None` (with a message) if
    /// the test cannot run here.
    fn real_v1() -> Option<Hierarchy> {
        if !is_root() || !Path::new("/sys/fs/cgroup/memory/cgroup.procs").exists() {
            eprintln!("skipping: needs root and the cgroup v1 memory controller");
            return None;
        }
        let h = Hierarchy::detect().unwrap();
        if h.version() != Version::V1 {
            eprintln!("skipping: this host uses cgroup v2");
            return None;
        }
        Some(h)
    }

    fn real_guard(h: &Hierarchy) -> RealGuard {
        let parent = format!("cove-unittest-{}", std::process::id());
        let name = format!("{parent}/{}", unique());
        RealGuard {
            cgroup: h.open(&name),
            parent: h.open(&parent).dirs,
            child: None,
        }
    }

    #[test]
    fn real_host_v1() {
        let Some(h) = real_v1() else { return };
        let mut guard = real_guard(&h);
        let name = guard.cgroup.name().to_owned();

        let start = Instant::now();
        let cg = h.create(&name, &limits()).unwrap();
        eprintln!("create took {:?}", start.elapsed());
        let read = |slot: usize, file: &str| {
            let content = fs::read_to_string(cg.dirs[slot].join(file)).unwrap();
            content.trim().to_owned()
        };
        let memory_limit = read(cg.slots.memory, "memory.limit_in_bytes");
        assert_eq!(memory_limit, MIB_64.to_string());
        assert_eq!(read(cg.slots.pids, "pids.max"), "32");
        assert_eq!(read(cg.slots.cpu, "cpu.cfs_quota_us"), "50000");
        assert_eq!(read(cg.slots.cpu, "cpu.cfs_period_us"), "100000");

        let child = guard
            .child
            .insert(Command::new("sleep").arg("60").spawn().unwrap());
        let pid = i32::try_from(child.id()).unwrap();
        cg.add_pid(pid).unwrap();
        assert_eq!(cg.pids().unwrap(), [pid]);
        let stats = cg.stats().unwrap();
        assert_eq!(stats.pids_current, 1);
        assert_eq!(stats.oom_kills, 0);

        let start = Instant::now();
        cg.kill_all(&mut |p| {
            assert_eq!(p, pid);
            child.kill().unwrap();
        })
        .unwrap();
        eprintln!("kill_all took {:?}", start.elapsed());
        assert!(cg.pids().unwrap().is_empty());
        let _ = child.wait();
        assert_eq!(read(cg.slots.freezer.unwrap(), "freezer.state"), "THAWED");

        let start = Instant::now();
        cg.remove().unwrap();
        eprintln!("remove took {:?}", start.elapsed());
        assert!(cg.dirs.iter().all(|d| !d.exists()));
    }

    #[test]
    fn real_host_v1_undo() {
        let Some(h) = real_v1() else { return };
        let guard = real_guard(&h);
        // The kernel refuses a quota under 1 ms: the last write fails, after every mkdir.
        let limits = Limits {
            cpu_millis: Some(1),
            ..limits()
        };
        let err = h.create(guard.cgroup.name(), &limits).unwrap_err();
        assert!(
            matches!(&err, CgroupError::Write { path, .. } if path.ends_with("cpu.cfs_quota_us")),
            "{err:?}"
        );
        assert!(guard.cgroup.dirs.iter().all(|d| !d.exists()));
    }

    #[test]
    fn the_fast_standard_layout_matches_mountinfo_on_this_host() {
        let Some(text) = standard_layout(Path::new(STANDARD_ROOT)) else {
            eprintln!("skipped: /sys/fs/cgroup is not a standard layout here");
            return;
        };
        let fast = Hierarchy::from_mountinfo(&text, Path::new("/"));
        let full = Hierarchy::from_mountinfo(
            &fs::read_to_string("/proc/self/mountinfo").unwrap(),
            Path::new("/"),
        );
        match (fast, full) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a.version(), b.version());
                let name = "cove/layout-check";
                let sorted = |h: &Hierarchy| {
                    let mut f = h.open(name).self_join_files();
                    f.sort();
                    f
                };
                assert_eq!(sorted(&a), sorted(&b));
            }
            (Err(_), Err(_)) => {}
            (a, b) => panic!("fast {a:?} vs mountinfo {b:?}"),
        }
    }

    #[test]
    fn without_freezer_drops_only_the_freezer_directory() {
        let (_fake, h) = v1_hybrid(true);
        let full = h.open("cove/x").self_join_files();
        let lean = h.without_freezer().open("cove/x").self_join_files();
        assert_eq!(full.len(), 5);
        assert_eq!(lean.len(), 4);
        assert!(
            lean.iter()
                .all(|p| !p.to_string_lossy().contains("freezer"))
        );
        assert!(lean.iter().all(|p| full.contains(p)));
        let cg = h.without_freezer().create("cove/y", &limits()).unwrap();
        assert!(cg.freeze().is_err(), "no freezer: pausing must say so");
    }
}
