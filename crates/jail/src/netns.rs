//! Network namespaces for sandboxes, created ahead of time.
//!
//! Creating a network namespace is the single most expensive step of a sandbox start here
//! (`copy_net_ns`, about 1 ms of the clone, and as much again in the kernel's asynchronous
//! teardown). Namespaces can therefore be made ahead of time and kept in a small pool: each is
//! a bind mount of its `nsfs` file at `/run/cove/netns/pool-<hex>`. A supervisor claims one by
//! unmounting it (exactly one claimer's `umount` succeeds) and enters it with `setns` before the
//! clone. An empty pool is not an error: the namespace is then created on the spot, configured
//! identically.
//!
//! Who fills the pool matters: only a long-lived process should, while idle (none does yet:
//! `cove serve`'s sandboxes create their namespace on the spot too). `cove run` must not:
//! measured back to back on two cores, refilling while its own sandbox started made starts
//! slower (median 9.7 ms against 8.1 ms), because the refill's namespace creation and mount
//! competed with the sandbox's own setup for the CPUs and the kernel's mount lock. Making the
//! sandbox's own namespace on a second thread while the supervisor prepared the rest did not
//! help either (`bench/start-latency.sh`: the preparation grew by the 0.8 ms the namespace
//! took; median unchanged), so it is made in line.
//!
//! The namespaces belong to the host's user namespace, not the sandbox's: root inside the
//! sandbox holds no capability over its network (it cannot add interfaces, change routes,
//! firewall rules or sysctls), and each namespace is configured once by Cove: loopback up here,
//! and, by the supervisor through the sandbox's own procfs (`write_sysctls`), unprivileged
//! ports from 0 (so a sandboxed web server can listen on :80) and unprivileged ICMP echo
//! sockets. Every namespace serves exactly one sandbox and dies with it.

use std::fs;
use std::io;
use std::io::Write;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::sys;

/// How many ready namespaces a supervisor leaves in the pool.
pub const POOL_TARGET: usize = 2;
/// Pool entries are named `pool-<12 hex>`.
const POOL_PREFIX: &str = "pool-";

/// The pool's directory under a state root.
pub fn pool_dir(state_root: &Path) -> PathBuf {
    state_root.join("netns")
}

/// A configured network namespace, held open.
pub struct NetNs(OwnedFd);

impl std::os::fd::AsRawFd for NetNs {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

impl NetNs {
    /// Makes it the calling thread's network namespace (children created afterwards share it).
    pub fn enter(&self) -> io::Result<()> {
        sys::setns(self.0.as_raw_fd(), libc::CLONE_NEWNET)
    }
}

impl NetNs {
    /// A new TCP socket (non-blocking, close-on-exec) of this namespace, made by the calling
    /// thread, which enters the namespace and goes back to `home` (its own). A socket belongs
    /// to the namespace it was made in for its whole life: connecting it later, from any
    /// thread, reaches that namespace's addresses. Only a thread that does nothing else should
    /// call this (if the way back fails, the thread is left in the sandbox's namespace and
    /// this panics rather than let it do anything more).
    pub fn tcp_socket(&self, home: &NetNs, family: libc::c_int) -> io::Result<OwnedFd> {
        self.enter()?;
        let made = sys::tcp_socket(family);
        if let Err(e) = home.enter() {
            panic!("cannot return to the home network namespace: {e}");
        }
        made
    }
}

/// The network namespace of the running sandbox `id` (its init's), or `None` when it does not
/// run. The init is found in the sandbox's cgroup and held by a pidfd while its namespace is
/// opened, so a recycled pid never yields another process's namespace.
pub fn of_sandbox(id: &cove_types::SandboxId) -> Option<NetNs> {
    let cg = crate::cgroup::Hierarchy::detected()?.open(&crate::state::cgroup_name(id));
    let pid = crate::state::find_init(&cg.pids().ok()?)?;
    let pidfd = sys::pidfd_open(pid).ok()?;
    // The pid was the init's when found; held by the pidfd from here on, it is still the
    // sandbox's if it is still in the cgroup.
    if !cg.pids().ok()?.contains(&pid) {
        return None;
    }
    let file = fs::File::open(format!("/proc/{pid}/ns/net")).ok()?;
    sys::pidfd_alive(&pidfd).then(|| NetNs(file.into()))
}

/// The calling thread's current network namespace.
pub fn current() -> io::Result<NetNs> {
    Ok(NetNs(fs::File::open("/proc/thread-self/ns/net")?.into()))
}

/// Claims a pooled namespace, or creates and configures one now. Either way the calling thread
/// is left in the returned namespace.
pub fn take_or_create(state_root: &Path) -> io::Result<NetNs> {
    if let Some(ns) = take_pooled(&pool_dir(state_root)) {
        ns.enter()?;
        return Ok(ns);
    }
    create_here()
}

fn take_pooled(dir: &Path) -> Option<NetNs> {
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with(POOL_PREFIX) {
            continue;
        }
        let path = entry.path();
        let Ok(file) = fs::File::open(&path) else {
            continue;
        };
        // The claim: only one unmount of the entry can succeed. A file opened before it was
        // mounted (still being created) or after it was claimed is not a namespace, and its
        // unmount fails too.
        let Some(p) = path.to_str() else { continue };
        if sys::umount2(p, libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW).is_err() {
            continue;
        }
        let _ = fs::remove_file(&path);
        let ns = NetNs(file.into());
        if sys::is_net_namespace(&ns.0) {
            return Some(ns);
        }
    }
    None
}

/// A new network namespace for the calling thread, configured for a sandbox.
fn create_here() -> io::Result<NetNs> {
    sys::unshare(libc::CLONE_NEWNET)?;
    // Loopback up; the sysctls come later, from `write_sysctls`.
    sys::loopback_up()?;
    let fd: OwnedFd = fs::File::open("/proc/thread-self/ns/net")?.into();
    Ok(NetNs(fd))
}

/// Ports from 0 and ICMP echo sockets usable without capabilities, written by host root
/// through `ipv4`, a namespace's `/proc/sys/net/ipv4` directory opened on the sandbox's own
/// procfs (the child sends it; the files it holds are that namespace's whoever writes them).
///
/// Not through the host's `/proc`: every network namespace whose settings were ever looked up
/// there leaves its own `net` and `ipv4` entries under the one `/proc/sys` in that procfs's
/// dentry cache, and every later lookup compares against all of them. With 1500 sandboxes
/// alive that took 3-5 ms of every start (`perf`: `proc_sys_compare`), and grew with each
/// sandbox. The sandbox's procfs is new, so its cache holds one entry each.
pub(crate) fn write_sysctls(ipv4: BorrowedFd<'_>) -> io::Result<()> {
    // The child that sent it runs only Cove's code, but the path it opened ran through the
    // image's tree: write nowhere but into a procfs, and follow no link there.
    if !sys::is_procfs(ipv4)? {
        return Err(io::Error::other("not a /proc/sys directory"));
    }
    for (name, value) in [
        ("ip_unprivileged_port_start", "0"),
        ("ping_group_range", "0 2147483647"),
    ] {
        let f = fs::File::from(sys::open_at(ipv4, name, libc::O_WRONLY | libc::O_NOFOLLOW)?);
        (&f).write_all(value.as_bytes())?;
    }
    Ok(())
}

/// Tops the pool up to [`POOL_TARGET`]. Leaves the calling thread in the last namespace it made
/// (callers are supervisors that no longer need the network); returns how many it added.
pub fn refill(state_root: &Path) -> io::Result<usize> {
    let dir = pool_dir(state_root);
    fs::create_dir_all(&dir)?;
    let have = fs::read_dir(&dir)?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(POOL_PREFIX))
        .count();
    let mut added = 0;
    for _ in have..POOL_TARGET {
        let mut b = [0u8; 6];
        sys::getrandom(&mut b)?;
        let name: String = b.iter().map(|x| format!("{x:02x}")).collect();
        let path = dir.join(format!("{POOL_PREFIX}{name}"));
        create_here()?;
        fs::File::create(&path)?;
        let target = path.to_str().unwrap_or_default();
        if let Err(e) = sys::mount(
            Some("/proc/thread-self/ns/net"),
            target,
            None,
            libc::MS_BIND,
            None,
        ) {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        added += 1;
    }
    Ok(added)
}

/// Unmounts and removes every pooled namespace (for `cove gc --pool` and tests); returns how
/// many were removed. Half-made entries (files nothing is mounted on) go too.
pub fn drain(state_root: &Path) -> usize {
    let dir = pool_dir(state_root);
    let mut n = 0;
    while take_pooled(&dir).is_some() {
        n += 1;
    }
    if let Ok(entries) = fs::read_dir(&dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(POOL_PREFIX) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
    let _ = fs::remove_dir(&dir);
    n
}
