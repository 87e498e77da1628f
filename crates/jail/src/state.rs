//! Per-sandbox state on the host, and the reaper that removes what a dead supervisor left.
//!
//! Every sandbox owns its lock file `/run/cove/<id>` and a cgroup named by its id: `cove/<id>`
//! for a server's sandboxes, `cove-<id>` for `cove run`'s (see [`run_cgroup_name`]). The supervisor
//! holds an exclusive `flock` on the lock file for the sandbox's whole life, so "is anybody still
//! responsible for this sandbox?" is one non-blocking lock attempt, with no pid files that can be
//! recycled. A lock file is born locked: it is created under a dot-name, locked, then renamed
//! into place, so the reaper never sees an unlocked one that is still being set up.
//!
//! The state is one empty file, not a directory: where `/run` is not a tmpfs (a disk file
//! system mounted with `discard`), removing a directory frees its block, and that discard is
//! waited for when the last reference goes; measured here, a directory with its lock file cost
//! 249 µs to create and remove, a lone lock file 45 µs, and every `cove run` paid for it. A
//! detached sandbox's lock file says so in its content (see [`StateLock::mark_detached`]): no
//! second file, for the same reason (on a journal-less ext4, each inode freed is skipped by the
//! allocator for a minute or more, and every later allocation pays a look at each).
//!
//! Everything else a sandbox creates (namespaces, its mounts) lives only as long as its
//! processes, and those die with the sandbox's pid 1.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use cove_types::SandboxId;

use crate::cgroup::{CgroupError, Hierarchy};
use crate::sys;

/// Where per-sandbox state lives.
pub const STATE_ROOT: &str = "/run/cove";
/// The cgroup parent of a server's sandboxes (`cove/<id>` in each controller).
pub const CGROUP_PARENT: &str = "cove";
/// How old a half-built lock file (or an orphaned marker) must be before the reaper removes it.
const HALF_BUILT_GRACE: Duration = Duration::from_secs(60);

/// A failed state-directory operation, naming the path.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroup")]
    Cgroup(#[from] CgroupError),
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StateError {
    let path = path.to_path_buf();
    move |source| StateError::Io { op, path, source }
}

/// The cgroup name of a server's (detached) sandbox: `cove/<id>`. The shared parent weighs
/// all of a server's sandboxes together against the host's other work (one CPU share, where
/// each sandbox at the root would count as much as the whole server); it lives as long as its
/// sandboxes, which on a server is most of the time.
pub fn cgroup_name(id: &SandboxId) -> String {
    format!("{CGROUP_PARENT}/{id}")
}

/// The cgroup name of a `cove run` sandbox: `cove-<id>`, at the root of each hierarchy. A
/// one-off run has no parent to share: with one, the usual run (the only sandbox on the host)
/// made the parent and removed it again, four `mkdir`s and four `rmdir`s more, measured at
/// 0.5 ms of a 7.7 ms `cove run -- /bin/true` on this project's hosts.
pub fn run_cgroup_name(id: &SandboxId) -> String {
    format!("{CGROUP_PARENT}-{id}")
}

/// The pid (on the host) of the process that is pid 1 of its own namespace: a sandbox's init,
/// among the pids of its cgroup.
pub fn find_init(pids: &[i32]) -> Option<i32> {
    pids.iter().copied().find(|&pid| {
        ns_pids(pid).is_some_and(|ids| ids.len() > 1 && ids.last().is_some_and(|p| p == "1"))
    })
}

/// Process `pid`'s pid in each pid namespace it is in, outermost first (`NSpid` of its
/// status; readable for a zombie too).
fn ns_pids(pid: i32) -> Option<Vec<String>> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("NSpid:"))?;
    Some(line.split_whitespace().map(str::to_owned).collect())
}

/// A sandbox's lock file, locked for as long as this value lives.
pub struct StateLock {
    lock_path: PathBuf,
    lock: File,
}

impl StateLock {
    /// Creates the lock file `/run/cove/<id>`, locked.
    pub fn create(root: &Path, id: &SandboxId) -> Result<StateLock, StateError> {
        fs::create_dir_all(root).map_err(io_err("create", root))?;
        let tmp = root.join(format!(".new-{id}"));
        let built = (|| {
            let lock = File::create(&tmp).map_err(io_err("create", &tmp))?;
            if !sys::try_lock(lock.as_fd()).map_err(io_err("lock", &tmp))? {
                return Err(io_err("lock", &tmp)(io::ErrorKind::WouldBlock.into()));
            }
            let lock_path = root.join(id.as_str());
            fs::rename(&tmp, &lock_path).map_err(io_err("rename into place", &lock_path))?;
            Ok(StateLock { lock_path, lock })
        })();
        if built.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        built
    }

    /// Marks a detached sandbox for the reapers: the path of its owner's lock file, `owner`,
    /// becomes the lock file's content (`cove run`'s stay empty). Once the sandbox's init has
    /// exited and its lock is free, its owner finishes it (reads its cgroup's counters, then
    /// tears it down), so the reapers leave it alone while the owner lives. A sandbox without
    /// an owner is marked with a line break (a marked lock file is never empty).
    pub(crate) fn mark_detached(&self, owner: &str) -> Result<(), StateError> {
        use std::os::unix::fs::FileExt;
        let content = if owner.is_empty() { "\n" } else { owner };
        self.lock
            .write_all_at(content.as_bytes(), 0)
            .map_err(io_err("write", &self.lock_path))
    }

    /// Where the sandbox's root is assembled, inside the sandbox's own mount namespace only: the
    /// state root itself, which always exists. Mounting over it in the sandbox's namespace hides
    /// nothing on the host, and no per-sandbox directory has to be created and removed (removing
    /// a directory that was a mount point in a dying namespace cost about 0.5 ms).
    pub fn mount_point(&self) -> PathBuf {
        self.lock_path
            .parent()
            .map_or_else(|| PathBuf::from(STATE_ROOT), Path::to_path_buf)
    }

    /// The lock's descriptor (for a detached sandbox's init to hold).
    pub(crate) fn lock_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.lock.as_raw_fd()
    }

    /// Leaves the lock file in place: a detached sandbox's init holds its lock now, and its
    /// end removes it (`run::finish_detached`).
    pub(crate) fn keep(self) {}

    /// Removes the lock file; the lock is released when `self` drops.
    pub fn remove(self) -> Result<(), StateError> {
        fs::remove_file(&self.lock_path).map_err(io_err("remove", &self.lock_path))
    }
}

/// The mark of a detached sandbox's lock file (see [`StateLock::mark_detached`]): its content,
/// or, for a sandbox started by an earlier version of Cove and still running after an upgrade,
/// the content of the file `<id>.detached` beside it. `None` for an unmarked one.
fn detached_mark(lock_path: &Path) -> Option<String> {
    match fs::read_to_string(lock_path) {
        Ok(mark) if !mark.is_empty() => Some(mark),
        _ => fs::read_to_string(old_marker_path(lock_path)).ok(),
    }
}

/// Where an earlier version of Cove marked a detached sandbox: `<id>.detached`.
fn old_marker_path(lock_path: &Path) -> PathBuf {
    let mut name = lock_path.as_os_str().to_owned();
    name.push(OLD_MARKER_SUFFIX);
    PathBuf::from(name)
}

const OLD_MARKER_SUFFIX: &str = ".detached";

/// Removes what a sandbox keeps under the state root `root`: its lock file (a missing one is no
/// error), and an earlier version's mark.
pub fn remove_state(root: &Path, id: &SandboxId) {
    let lock_path = root.join(id.as_str());
    let _ = fs::remove_file(old_marker_path(&lock_path));
    let _ = fs::remove_file(&lock_path);
}

/// What one reaper pass removed.
#[derive(Debug, Default)]
pub struct GcReport {
    /// One human-readable line per object removed.
    pub removed: Vec<String>,
    /// Objects that could not be removed, with the reason.
    pub failed: Vec<String>,
    /// How many objects of each kind were removed: `process`, `cgroup`, `mount`,
    /// `state_file`, `veth`, `nftables` (for metrics; a bounded set of kinds).
    pub counts: std::collections::BTreeMap<&'static str, u64>,
}

impl GcReport {
    /// Records `n` objects of `kind` removed, described by `line` (when there is one).
    pub fn add(&mut self, kind: &'static str, n: u64, line: Option<String>) {
        if n > 0 {
            *self.counts.entry(kind).or_default() += n;
        }
        self.removed.extend(line);
    }
}

/// How thoroughly [`gc`] looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Unlocked lock files (and their cgroups) only: what a killed supervisor leaves.
    Abandoned,
    /// Also cgroups under `cove/` that no lock file accounts for (left by a crash of the
    /// host, or by hand): `cove gc`.
    Everything,
}

/// Collects the exit of every child of this process that has exited and belongs to a
/// sandbox's pid namespace: the inits of detached sandboxes (their server is their supervisors'
/// subreaper), and processes of a sandbox whose parent outside it died first — an exec's
/// command when the sandbox's cgroup was killed with its `cove exec-in` helper in it. Until
/// such a process is collected, its sandbox's pid namespace cannot end (its init waits for it
/// in its exit). And supervisors and helpers whose spawner died before them, named
/// [`crate::spawner::SPAWNED_NAME`]. Stops at the first exited child that is something else
/// (a helper, which its own owner collects). Returns how many were collected.
pub fn collect_sandbox_orphans() -> usize {
    let mut n = 0;
    while let Some(pid) = sys::peek_exited_child() {
        let orphan = in_nested_pid_ns(pid) || is_spawned(pid);
        if !orphan || !matches!(sys::wait4(pid, libc::WNOHANG), Ok(Some(_))) {
            break;
        }
        n += 1;
    }
    n
}

/// Whether process `pid` (a zombie too) was forked by a spawner.
fn is_spawned(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|c| c.trim_end() == crate::spawner::SPAWNED_NAME)
}

/// Whether process `pid` (a zombie too) has a pid in a namespace below this one's.
fn in_nested_pid_ns(pid: i32) -> bool {
    ns_pids(pid).is_some_and(|ids| ids.len() > 1)
}

/// Whether the lock file at `lock_path` is an ended detached sandbox's that its owner will
/// finish: its owner's lock is held.
fn owner_alive(lock_path: &Path) -> bool {
    detached_mark(lock_path)
        .map(|owner| owner.trim().to_string())
        .filter(|owner| !owner.is_empty())
        .is_some_and(|owner| is_locked(Path::new(&owner)).unwrap_or(false))
}

/// Removes every sandbox object whose supervisor is gone: processes (through the cgroup), the
/// cgroups, and the lock file. Live sandboxes (locked lock files) are never
/// touched, nor ended detached
/// sandboxes whose owner lives or that `owned` says their owner will finish (and none with
/// [`Scope::Abandoned`]).
pub fn gc(
    root: &Path,
    cgroups: &Hierarchy,
    scope: Scope,
    owned: &dyn Fn(&str) -> bool,
) -> GcReport {
    gc_some(root, cgroups, scope, owned, usize::MAX)
}

/// What every `cove run` reaps while its own sandbox starts: [`Scope::Abandoned`], among at
/// most [`NEARBY`] entries of the state root (all of them when there are no more; otherwise a
/// run of them from a point that changes at every call), so that a start costs about the same
/// beside ten thousand running sandboxes as beside none (a lock test each). The rest is left to
/// later runs, `cove gc` and the server's reaper.
pub fn gc_nearby(root: &Path, cgroups: &Hierarchy) -> GcReport {
    gc_some(root, cgroups, Scope::Abandoned, &|_| false, NEARBY)
}

/// How many state-root entries [`gc_nearby`] looks at.
pub const NEARBY: usize = 64;

/// Up to `max` names of the state root's entries: all of them, or a run of `max` from a point
/// that changes at every call. Reading every name of a large directory is not cheap (1.1 ms
/// for 1500 on this host's ext4, whose hashed directories sort every name they list), so a
/// bounded call reads from a random position (a point in hash order on ext4) and wraps around
/// to the start if the end comes first.
fn entry_names(root: &Path, max: usize) -> io::Result<Vec<String>> {
    if max == usize::MAX {
        return fs::read_dir(root)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect();
    }
    let path = root
        .to_str()
        .ok_or_else(|| io::Error::other("state root is not UTF-8"))?;
    let mut random = [0u8; 8];
    sys::getrandom(&mut random)?;
    // Non-negative: a directory position.
    let from = (u64::from_ne_bytes(random) >> 1) as i64;
    let (mut names, ended) = sys::dir_names_from(path, from, max)?;
    if ended && names.len() < max {
        let (more, _) = sys::dir_names_from(path, 0, max)?;
        for name in more {
            if names.len() == max {
                break;
            }
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    Ok(names)
}

fn gc_some(
    root: &Path,
    cgroups: &Hierarchy,
    scope: Scope,
    owned: &dyn Fn(&str) -> bool,
    max_entries: usize,
) -> GcReport {
    let mut report = GcReport::default();
    let mut live = Vec::new();
    if let Ok(names) = entry_names(root, max_entries) {
        for name in names {
            let path = root.join(&name);
            if let Some(id) = name.strip_prefix(".new-") {
                if is_old(&path) {
                    reap_file(&path, &format!("half-built lock file of {id}"), &mut report);
                }
                continue;
            }
            // An earlier version's mark goes with its lock file (below); one whose lock file
            // is gone is what a teardown interrupted between the two removals left.
            if let Some(id) = name.strip_suffix(OLD_MARKER_SUFFIX) {
                if id.parse::<SandboxId>().is_ok() && !root.join(id).exists() && is_old(&path) {
                    reap_file(&path, &format!("detached marker of {id}"), &mut report);
                }
                continue;
            }
            let Ok(id) = name.parse::<SandboxId>() else {
                continue;
            };
            match is_locked(&path) {
                Ok(true) => live.push(name),
                Ok(false)
                    if detached_mark(&path).is_some()
                        && (scope == Scope::Abandoned || owned(&name) || owner_alive(&path)) =>
                {
                    live.push(name);
                }
                Ok(false) => {
                    // A server's sandbox, or a `cove run` one.
                    reap_cgroup(cgroups, &cgroup_name(&id), &mut report);
                    reap_cgroup(cgroups, &run_cgroup_name(&id), &mut report);
                    let _ = fs::remove_file(old_marker_path(&path));
                    reap_file(&path, &format!("lock file of {name}"), &mut report);
                }
                Err(e) => report.failed.push(format!("{}: {e}", path.display())),
            }
        }
    }
    if scope == Scope::Abandoned {
        return report;
    }
    let run_prefix = format!("{CGROUP_PARENT}-");
    let children = cgroups.children(CGROUP_PARENT).and_then(|mut server| {
        let runs = cgroups.children("")?.into_iter().filter(|c| {
            c.strip_prefix(&run_prefix)
                .is_some_and(|id| id.parse::<SandboxId>().is_ok())
        });
        server.extend(runs);
        Ok(server)
    });
    match children {
        Ok(children) => {
            for cg in children {
                let name = cg.rsplit(['/', '-']).next().unwrap_or_default();
                if !live.iter().any(|l| l == name) && !root.join(name).exists() {
                    reap_cgroup(cgroups, &cg, &mut report);
                }
            }
        }
        Err(e) => report.failed.push(format!("list cgroups: {e}")),
    }
    // Egress objects (veths, nftables chains and counters) of sandboxes that have neither a
    // lock file nor a process in their cgroup: after a crash, or a supervisor killed
    // before its teardown. The lock file counts because a starting sandbox's veth
    // exists before its first process does (the lock file comes first and goes last; a stale
    // one was removed above).
    let (removed, failed) = crate::egress::reap(|id| {
        root.join(id.as_str()).exists()
            || [cgroup_name(id), run_cgroup_name(id)]
                .iter()
                .any(|cg| cgroups.open(cg).pids().is_ok_and(|p| !p.is_empty()))
    });
    for line in removed {
        let kind = if line.starts_with("veth") {
            "veth"
        } else {
            "nftables"
        };
        report.add(kind, 1, Some(line));
    }
    report.failed.extend(failed);
    // The parent directories themselves, once nothing is left in them.
    let parents = cgroups.remove_if_empty(CGROUP_PARENT);
    if parents > 0 {
        report.add(
            "cgroup",
            parents as u64,
            Some(format!("empty cgroup parent {CGROUP_PARENT}/")),
        );
    }
    report
}

fn is_old(path: &Path) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age > HALF_BUILT_GRACE)
}

/// Whether someone holds the lock. A missing lock file counts as unlocked.
fn is_locked(lock: &Path) -> io::Result<bool> {
    let f = match OpenOptions::new().read(true).open(lock) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    Ok(!sys::try_lock(f.as_fd())?)
}

fn reap_cgroup(cgroups: &Hierarchy, name: &str, report: &mut GcReport) {
    let cg = cgroups.open(name);
    if !cg.exists() {
        return;
    }
    let procs = cg.pids().map(|p| p.len()).unwrap_or(0);
    let mut kill = |pid: i32| {
        let _ = sys::kill(pid, libc::SIGKILL);
    };
    match cg.kill_all(&mut kill).and_then(|()| cg.remove()) {
        Ok(()) => {
            report.add("process", procs as u64, None);
            let line = if procs > 0 {
                format!("cgroup {name} (killed {procs} processes)")
            } else {
                format!("cgroup {name}")
            };
            report.add("cgroup", 1, Some(line));
        }
        Err(e) => report.failed.push(format!("cgroup {name}: {e}")),
    }
}

fn reap_file(path: &Path, what: &str, report: &mut GcReport) {
    match fs::remove_file(path) {
        Ok(()) => report.add("state_file", 1, Some(what.to_string())),
        Err(e) => report.failed.push(format!("{what}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cgroup v2 hierarchy under `base/fake` with no sandbox in it.
    fn fake_hierarchy(base: &Path) -> Hierarchy {
        let cgroups = base.join("fake");
        fs::create_dir_all(cgroups.join("sys/fs/cgroup")).unwrap();
        fs::write(
            cgroups.join("sys/fs/cgroup/cgroup.controllers"),
            "cpu memory pids\n",
        )
        .unwrap();
        let mountinfo = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        Hierarchy::from_mountinfo(mountinfo, &cgroups).unwrap()
    }

    #[test]
    fn a_starts_reaping_looks_at_a_bounded_number_of_lock_files() {
        let base = std::env::temp_dir().join(format!("cove-state-test-{}", std::process::id()));
        let hierarchy = fake_hierarchy(&base);
        // 100 abandoned lock files (nobody holds them).
        let root = base.join("state");
        fs::create_dir_all(&root).unwrap();
        for i in 0..100u64 {
            fs::write(root.join(format!("{i:012x}")), "").unwrap();
        }
        let reaped = |r: &GcReport| r.counts.get("state_file").copied().unwrap_or(0);
        assert_eq!(reaped(&gc_nearby(&root, &hierarchy)), NEARBY as u64);
        // The rest, now few enough to be looked at all at once.
        assert_eq!(reaped(&gc_nearby(&root, &hierarchy)), 100 - NEARBY as u64);
        assert_eq!(fs::read_dir(&root).unwrap().count(), 0);
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_bounded_read_of_the_state_root_reads_few_names_and_moves_around() {
        let base = std::env::temp_dir().join(format!("cove-state-names-{}", std::process::id()));
        fs::create_dir_all(&base).unwrap();
        let all: std::collections::BTreeSet<String> =
            (0..400u64).map(|i| format!("{:012x}", i * 7919)).collect();
        for name in &all {
            fs::write(base.join(name), "").unwrap();
        }
        let everything = entry_names(&base, usize::MAX).unwrap();
        assert_eq!(
            everything
                .iter()
                .cloned()
                .collect::<std::collections::BTreeSet<_>>(),
            all
        );
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..40 {
            let names = entry_names(&base, NEARBY).unwrap();
            assert_eq!(names.len(), NEARBY);
            let distinct: std::collections::BTreeSet<_> = names.iter().cloned().collect();
            assert_eq!(distinct.len(), NEARBY, "a name read twice");
            assert!(distinct.is_subset(&all));
            seen.extend(distinct);
        }
        // On ext4 (hashed directories) the start is a random point in hash order, so repeated
        // calls look at different entries; elsewhere they may all start at the beginning.
        let ext4 = sys::statfs_type(base.to_str().unwrap()).unwrap().0 == 0xef53;
        assert!(
            !ext4 || seen.len() > 2 * NEARBY,
            "saw only {} names",
            seen.len()
        );
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn an_ended_detached_sandbox_is_left_to_its_living_owner_however_it_was_marked() {
        let base = std::env::temp_dir().join(format!("cove-state-mark-{}", std::process::id()));
        let root = base.join("state");
        fs::create_dir_all(&root).unwrap();
        let hierarchy = fake_hierarchy(&base);
        let owner = base.join("server.lock");
        let owner_lock = File::create(&owner).unwrap();
        assert!(sys::try_lock(owner_lock.as_fd()).unwrap());
        let owner_path = owner.to_str().unwrap();
        // Marked in its content (this version), beside it (an earlier one), not at all.
        let new = root.join("000000000001");
        fs::write(&new, owner_path).unwrap();
        let old = root.join("000000000002");
        fs::write(&old, "").unwrap();
        fs::write(old_marker_path(&old), owner_path).unwrap();
        let plain = root.join("000000000003");
        fs::write(&plain, "").unwrap();
        assert!(owner_alive(&new) && owner_alive(&old) && !owner_alive(&plain));
        assert_eq!(detached_mark(&plain), None);
        // What every `cove run` reaps: the unmarked one only.
        gc_nearby(&root, &hierarchy);
        assert!(new.exists() && old.exists() && old_marker_path(&old).exists());
        assert!(!plain.exists());
        // Once the owner is gone, nobody will finish them.
        drop(owner_lock);
        assert!(!owner_alive(&new) && !owner_alive(&old));
        remove_state(&root, &"000000000002".parse().unwrap());
        assert!(!old.exists() && !old_marker_path(&old).exists());
        fs::remove_dir_all(&base).unwrap();
    }
}
