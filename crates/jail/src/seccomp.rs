//! The sandbox's seccomp filter: a deny-list of system calls that reach past the sandbox
//! (mounts, namespaces, kernel images and modules, the host clock, swap, keyrings) or open kernel
//! attack surface sandboxed programs don't need (bpf, io_uring, userfaultfd, perf), compiled to
//! classic BPF before the clone and installed in the child right before `execve`.
//!
//! The policy is data: [`DEFAULT_POLICY`] lists one [`Rule`] per denied call (or per argument
//! pattern), each with a one-line `why` and a comment naming who would need the call.
//! [`compile`] turns rules into a [`Program`]; [`Program::install`] sets `no_new_privs` and
//! attaches it. Requires Linux 4.14 (`SECCOMP_RET_KILL_PROCESS`); since 4.8 the filter is
//! re-run after a ptrace tracer rewrites a call, so tracing cannot bypass it.
//!
//! # The program
//!
//! 1. Load `arch`; anything but the native ABI is killed (`SECCOMP_RET_KILL_PROCESS`). On x86_64
//!    a 64-bit process can still enter the kernel through the i386 ABI (`int 0x80`) whose call
//!    numbers differ from the ones the rules name. So 32-bit binaries do not run in Cove.
//! 2. Load `nr`. On x86_64, numbers from `0x4000_0000` (the x32 bit) up to `0x7fff_ffff` get
//!    `ENOSYS`: x32 calls reach the same kernel functions, under the native `arch` value, so
//!    without this check every deny rule could be bypassed by setting one bit. `ENOSYS`, not
//!    `EPERM` or a kill: it is exactly what a kernel without x32 support answers (most
//!    distributions), so anything that probes for x32 already copes with it; `EPERM` would
//!    report a permission problem that isn't one, and killing would punish a probe. Negative
//!    numbers pass on to the search (and are allowed): the kernel runs nothing for them, and a
//!    ptrace tracer sets `-1` to skip a call, whose result a filter answer would overwrite.
//! 3. A binary search on `nr`. The 32-bit number space is cut into ranges with one answer each:
//!    every call a rule names, and the gaps between them, which are allowed; neighbours with the
//!    same answer merge into one range (io_uring and the new mount API are one). A balanced
//!    tree of `jge` compares finds the range in ⌈log2(ranges)⌉ steps, and a call no rule names
//!    gets `SECCOMP_RET_ALLOW` right there.
//! 4. A call with argument conditions has a block after the search: all its rules in policy
//!    order, each a test per 32-bit half of a condition (load the argument's half, mask,
//!    compare), then the rule's `ret`. A failed test goes on to the call's next rule, and past
//!    the last one the call is allowed. A load is left out when the test before it left that
//!    word in the accumulator, so `unshare`'s eight flag rules read `args[0]` once. A rule after
//!    one without conditions could never answer and is left out too.
//! 5. The final `SECCOMP_RET_ALLOW`.
//!
//! [`compile`] builds the program back to front, so a jump's targets are in place when the jump
//! is emitted. Jumps share one `ret` per value; a target past classic BPF's 8-bit jump offsets
//! is reached through a stepping stone next to the jump, a copy of the `ret` or a `ja` (which
//! has a 32-bit offset). [`compile`] refuses a rule over 254 instructions and a program longer
//! than `BPF_MAXINSNS`.
//!
//! The search is there for two costs. Attaching: since 5.11 the kernel runs the filter for every
//! call number as it attaches it, to find the calls it may allow without running the filter
//! again (its action cache), and it translates and compiles the program; both grow with the
//! paths to a verdict and the program's length, and both are paid on every sandbox start.
//! Running: a call the cache doesn't cover (one with argument conditions, or any call before
//! 5.11) runs its path each time. A call no rule names looks only at `arch` and `nr` on its
//! way, which is what lets the kernel cache it as allowed.
//!
//! # Decisions
//!
//! - **A deny-list, not an allow-list.** Cove is a general-purpose sandbox: tenants run
//!   arbitrary toolchains, runtimes and test suites, and an allow-list breaks them one new
//!   system call at a time (Docker's allow-list is about 350 calls, and images broke when glibc
//!   adopted `clone3` and `faccessat2` before the list did). The calls
//!   that matter for escaping or affecting the host are few and known; they are the list.
//! - **`ptrace` is allowed.** Debuggers, `strace` and sanitizers work inside. The pid namespace
//!   puts every process outside the sandbox out of reach, and the sandbox's init is
//!   non-dumpable, so the tenant can only trace its own processes. `process_vm_readv`/`writev`,
//!   `kcmp` and `pidfd_getfd` make the same ptrace-access check and are allowed for the same
//!   reason.
//! - **`personality` is not filtered.** It changes only the caller's execution domain
//!   (`ADDR_NO_RANDOMIZE` for gdb and `setarch`, `PER_LINUX32` for `uname`). The historic danger,
//!   `READ_IMPLIES_EXEC` or `MMAP_PAGE_ZERO` inherited by a setuid program, is cleared by the
//!   kernel on setuid exec, and under `no_new_privs` no exec gains privileges anyway; Docker's
//!   allow-list of values buys nothing here.
//! - **`clone3` gets `ENOSYS`.** Its flags live in a struct in memory, which seccomp cannot read,
//!   so namespace flags could not be told apart; on `ENOSYS` glibc falls back to `clone`, whose
//!   flags are filtered.
//! - **`adjtimex` and `clock_adjtime` are denied whole.** Their mode is in memory too, so the
//!   read-only use (`ntp_gettime`) goes with the write; only NTP daemons need either.
//!
//! # Rejected
//!
//! - **seccompiler** (Firecracker's compiler): a map from call number to argument rules after a
//!   fixed arch check, so it cannot express the x32 range check (`nr >= 0x4000_0000`).
//! - **libseccomp**: a C library to build and link against, for a compiler that fits in this
//!   file and runs in microseconds on every sandbox start.
//! - **A linear chain of `jeq nr`** (this compiler's first version): a call no rule named
//!   reached its verdict after every named call's compare. At the switch to the search, with
//!   the default policy: 157 instructions against 83, 55 on an unnamed call's path against 12,
//!   and about 200 µs against 85 µs to attach (median of 200 forked children on the development
//!   host). Listing the hot call, `ioctl`, first had kept its path short; in the search it is
//!   four instructions longer, and the order of calls in the policy no longer matters.

use std::collections::{BTreeMap, HashMap};

use libc::{
    CLONE_NEWCGROUP, CLONE_NEWIPC, CLONE_NEWNET, CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWTIME,
    CLONE_NEWUSER, CLONE_NEWUTS, ENOSYS, EPERM, TIOCLINUX, TIOCSTI, sock_filter,
};

use crate::sys;

/// What happens when a rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Fail the call with this errno (1..=4095) without running it.
    Errno(i32),
}

/// One condition on one system call argument: `(args[index] & mask) == value`, compared on all
/// 64 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArgCond {
    /// Argument number, 0..=5.
    pub index: u8,
    /// Bits of the argument that take part in the comparison.
    pub mask: u64,
    /// Required value of the masked bits; must have no bit outside `mask`.
    pub value: u64,
}

impl ArgCond {
    /// `args[index]` has every bit of `flags` set.
    pub const fn flags_set(index: u8, flags: u64) -> Self {
        Self {
            index,
            mask: flags,
            value: flags,
        }
    }

    /// The low 32 bits of `args[index]` equal `value`: for `unsigned int` arguments, whose upper
    /// half the kernel ignores (comparing 64 bits would let a caller set a high bit and slip by).
    pub const fn low32_eq(index: u8, value: u32) -> Self {
        Self {
            index,
            mask: 0xffff_ffff,
            value: value as u64,
        }
    }
}

/// One rule: this system call (only when all of `when` holds, if it is not empty) gets
/// `action`.
#[derive(Debug, Clone, Copy)]
pub struct Rule {
    /// The call's name, for people and error messages.
    pub name: &'static str,
    /// The call's number on this architecture.
    pub nr: i64,
    /// Conditions that must all hold; empty means always.
    pub when: &'static [ArgCond],
    /// What the call gets.
    pub action: Action,
    /// One line: why the call is denied.
    pub why: &'static str,
}

/// Errors compiling or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// A condition names an argument past the sixth.
    #[error("seccomp rule `{rule}`: argument index {index} is out of range (calls have 6)")]
    ArgIndex { rule: &'static str, index: u8 },
    /// A condition's value has bits its mask clears, so it can never hold.
    #[error(
        "seccomp rule `{rule}`: condition on argument {index} can never hold \
         (value {value:#x} has bits outside mask {mask:#x})"
    )]
    ImpossibleCondition {
        rule: &'static str,
        index: u8,
        mask: u64,
        value: u64,
    },
    /// An errno seccomp cannot return (0 would fake success without running the call).
    #[error("seccomp rule `{rule}`: errno {errno} is outside 1..=4095")]
    Errno { rule: &'static str, errno: i32 },
    /// A call number that does not fit the filter's 32-bit `nr` field.
    #[error("seccomp rule `{rule}`: call number {nr} is out of range")]
    CallNumber { rule: &'static str, nr: i64 },
    /// A rule with so many conditions that its jumps exceed classic BPF's 8-bit offsets.
    #[error(
        "seccomp rule `{rule}`: {conditions} conditions need {len} instructions, at most 254 fit"
    )]
    RuleTooLong {
        rule: &'static str,
        conditions: usize,
        len: usize,
    },
    /// The program exceeds what the kernel accepts.
    #[error("seccomp program has {len} instructions, the kernel accepts at most {max}")]
    TooLarge { len: usize, max: usize },
    /// `prctl(PR_SET_NO_NEW_PRIVS)` failed.
    #[error("failed to set no_new_privs before installing the seccomp filter")]
    NoNewPrivs {
        #[source]
        source: std::io::Error,
    },
    /// `seccomp(SECCOMP_SET_MODE_FILTER)` failed.
    #[error("failed to install the seccomp filter ({len} instructions)")]
    Install {
        len: usize,
        #[source]
        source: std::io::Error,
    },
}

/// A compiled filter, ready to install.
#[derive(Debug, Clone)]
pub struct Program {
    filter: Vec<sock_filter>,
}

impl Program {
    /// Number of BPF instructions.
    pub fn len(&self) -> usize {
        self.filter.len()
    }

    /// Always false for a compiled program (it has at least the arch check); here for clippy's
    /// `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.filter.is_empty()
    }

    /// Installs the filter on the calling thread, setting `no_new_privs` first (idempotent, and
    /// required to attach a filter without `CAP_SYS_ADMIN`).
    ///
    /// Async-signal-safe: it is called in a forked child right before `execve`, and makes two
    /// system calls without allocating.
    pub fn install(&self) -> Result<(), SeccompError> {
        sys::seccomp::set_no_new_privs().map_err(|source| SeccompError::NoNewPrivs { source })?;
        sys::seccomp::set_filter(&self.filter).map_err(|source| SeccompError::Install {
            len: self.filter.len(),
            source,
        })
    }
}

/// Compiles `rules` into a filter: kill foreign ABIs, `ENOSYS` for x32, then a binary search on
/// the call number that ends in the call's answer or its rules in order (see the module docs for
/// the layout).
pub fn compile(rules: &[Rule]) -> Result<Program, SeccompError> {
    let max = BPF_MAXINSNS;
    let calls = rules_by_call(rules)?;
    // Built back to front: the steps of the module docs, last first.
    let mut b = Builder::default();
    // 5. Allow.
    b.ret(libc::SECCOMP_RET_ALLOW);
    // 4. The blocks of calls with argument conditions, the last call's first.
    let mut verdicts: Vec<(u32, Verdict)> = (calls.iter().rev())
        .map(|(&nr, rules)| (nr, b.verdict(rules)))
        .collect();
    verdicts.reverse();
    // 3. The search.
    let search = b.search(&ranges(verdicts));
    // 1 and 2: arch, nr, x32.
    b.prelude(search);
    let filter = b.finish();
    if filter.len() > max {
        return Err(SeccompError::TooLarge {
            len: filter.len(),
            max,
        });
    }
    Ok(Program { filter })
}

/// `deny!(SYS_call, ERRNO, "why")` or `deny!(SYS_call if [conditions], ERRNO, "why")`: a rule
/// whose name is the call's, so the two cannot disagree.
macro_rules! deny {
    ($nr:ident $(if [$($cond:expr),+ $(,)?])?, $errno:ident, $why:literal) => {
        Rule {
            name: call_name(stringify!($nr)),
            nr: nr::$nr,
            when: &[$($($cond),+)?],
            action: Action::Errno($errno),
            why: $why,
        }
    };
}

/// Cove's default policy: everything is allowed except these calls, which fail with the
/// errno given. Who needs each call is in the comment above it. Order matters only between
/// rules for the same call: the first whose conditions hold answers.
#[rustfmt::skip] // A table: one rule per entry, the reason where it can be read.
pub static DEFAULT_POLICY: &[Rule] = &[
    // ---- Terminal input injection.
    // Who: nothing current; `writevt`-style tools. The kernel can refuse TIOCSTI itself since 6.2
    // (dev.tty.legacy_tiocsti), but the host's setting is not ours to rely on.
    deny!(SYS_ioctl if [ArgCond::low32_eq(1, TIOCSTI as u32)], EPERM,
        "TIOCSTI types into a terminal: a sandbox on the user's tty could queue commands for their shell"),
    // Who: gpm and console selection tools on a Linux virtual terminal.
    deny!(SYS_ioctl if [ArgCond::low32_eq(1, TIOCLINUX as u32)], EPERM,
        "TIOCLINUX selection paste injects terminal input, like TIOCSTI"),

    // ---- Nested namespaces: the runtime builds the sandbox's namespaces, the tenant doesn't.
    // Who: container runtimes and nested sandboxes (bwrap, runc, Chrome's and Firefox's
    // sandboxes, which fall back or need --no-sandbox). unshare(2) without these flags
    // (CLONE_FILES, CLONE_FS, CLONE_SYSVSEM) stays allowed. BPF compares for equality only, so
    // "any namespace flag set" is one rule per flag.
    deny!(SYS_unshare if [ns_flag(CLONE_NEWUSER)], EPERM,
        "a new user namespace grants a full capability set, unlocking most kernel attack surface"),
    deny!(SYS_unshare if [ns_flag(CLONE_NEWNS)], EPERM,
        "a new mount namespace is the first step of every mount-based escape"),
    deny!(SYS_unshare if [ns_flag(CLONE_NEWNET)], EPERM,
        "a new network namespace with CAP_NET_ADMIN exposes netfilter and other network config code"),
    deny!(SYS_unshare if [ns_flag(CLONE_NEWPID)], EPERM,
        "a new pid namespace starts a second init the runtime doesn't know about"),
    deny!(SYS_unshare if [ns_flag(CLONE_NEWCGROUP)], EPERM,
        "a new cgroup namespace re-roots the cgroup view the runtime set up"),
    deny!(SYS_unshare if [ns_flag(CLONE_NEWIPC)], EPERM,
        "harmless alone, but nesting namespaces is the runtime's job: one rule for all of them"),
    deny!(SYS_unshare if [ns_flag(CLONE_NEWUTS)], EPERM,
        "harmless alone, but nesting namespaces is the runtime's job: one rule for all of them"),
    deny!(SYS_unshare if [ns_flag(CLONE_NEWTIME)], EPERM,
        "a new time namespace shifts the monotonic and boot clocks for what runs in it"),
    // Who: the same, at fork time. Plain fork(), vfork() and threads use no namespace flag and
    // stay allowed. No CLONE_NEWTIME rule: clone(2) reads the low byte of its flags (0x80
    // included) as the exit signal, and only unshare and clone3 can create a time namespace.
    deny!(SYS_clone if [ns_flag(CLONE_NEWUSER)], EPERM, "as unshare(CLONE_NEWUSER), at fork time"),
    deny!(SYS_clone if [ns_flag(CLONE_NEWNS)], EPERM, "as unshare(CLONE_NEWNS), at fork time"),
    deny!(SYS_clone if [ns_flag(CLONE_NEWNET)], EPERM, "as unshare(CLONE_NEWNET), at fork time"),
    deny!(SYS_clone if [ns_flag(CLONE_NEWPID)], EPERM, "as unshare(CLONE_NEWPID), at fork time"),
    deny!(SYS_clone if [ns_flag(CLONE_NEWCGROUP)], EPERM, "as unshare(CLONE_NEWCGROUP), at fork time"),
    deny!(SYS_clone if [ns_flag(CLONE_NEWIPC)], EPERM, "as unshare(CLONE_NEWIPC), at fork time"),
    deny!(SYS_clone if [ns_flag(CLONE_NEWUTS)], EPERM, "as unshare(CLONE_NEWUTS), at fork time"),
    // Who: glibc >= 2.34 (pthread_create, posix_spawn) and systemd try it first and fall back
    // to clone(2) on ENOSYS; crun uses it for CLONE_INTO_CGROUP.
    deny!(SYS_clone3, ENOSYS,
        "its flags are in memory seccomp can't read; ENOSYS sends callers to clone(2), which is filtered"),
    // Who: container runtimes and namespace tools (nsenter, ip netns exec).
    deny!(SYS_setns, EPERM,
        "joins the namespace behind an fd, e.g. a /proc/<pid>/ns/* leaked from outside the sandbox"),

    // ---- Mounts. Who: container runtimes and image builders (runc, buildah, bwrap), FUSE and
    // loop-mount helpers, `mount` in setup scripts.
    deny!(SYS_mount, EPERM,
        "attaches filesystems: every filesystem driver becomes reachable, and mounts can cover Cove's"),
    deny!(SYS_umount2, EPERM, "detaches mounts, e.g. the ones Cove placed over /proc paths to mask them"),
    deny!(SYS_pivot_root, EPERM, "swaps the root mount: only a runtime building a root needs it"),
    deny!(SYS_move_mount, EPERM, "new mount API: attaches a detached mount anywhere, like mount(2)"),
    deny!(SYS_open_tree, EPERM, "new mount API: clones a mount tree that move_mount can attach"),
    deny!(SYS_open_tree_attr, EPERM, "new mount API: open_tree and mount_setattr in one call"),
    deny!(SYS_fsopen, EPERM, "new mount API: opens a filesystem driver, the same drivers as mount(2)"),
    deny!(SYS_fsconfig, EPERM,
        "new mount API: feeds options to a filesystem driver (CVE-2022-0185 was a heap overflow here)"),
    deny!(SYS_fsmount, EPERM, "new mount API: turns a configured filesystem into a mount"),
    deny!(SYS_fspick, EPERM, "new mount API: reopens a mounted filesystem to reconfigure it"),
    deny!(SYS_mount_setattr, EPERM, "changes mount attributes (read-only, nosuid, idmapping) of whole trees"),

    // ---- Kernel images and modules. Who: kdump tooling; modprobe and module installers.
    deny!(SYS_kexec_load, EPERM, "loads a kernel to boot into, replacing the host's"),
    deny!(SYS_kexec_file_load, EPERM, "loads a kernel to boot into, replacing the host's"),
    deny!(SYS_init_module, EPERM, "loads code into the host kernel"),
    deny!(SYS_finit_module, EPERM, "loads code into the host kernel, from a file"),
    deny!(SYS_delete_module, EPERM, "unloads host kernel modules other tenants rely on"),

    // ---- Kernel attack surface sandboxed programs don't need.
    // Who: bpftool, tracing and observability agents, systemd's cgroup firewalling.
    deny!(SYS_bpf, EPERM,
        "the eBPF verifier is a large, often-exploited kernel surface, open wherever unprivileged BPF is"),
    // Who: profilers (perf, rr) and JIT profiling support.
    deny!(SYS_perf_event_open, EPERM,
        "performance counters: side channels across tenants and a steady source of kernel bugs"),
    // Who: CRIU and QEMU post-copy migration. (/dev/userfaultfd is not in the sandbox's /dev.)
    deny!(SYS_userfaultfd, EPERM,
        "lets user space stall kernel page faults at will, the classic tool for winning kernel races"),
    // Who: file-access monitors (antivirus on-access scanners, fatrace).
    deny!(SYS_fanotify_init, EPERM, "filesystem-wide access monitoring and permission events: host agents' business"),
    // Who: high-throughput I/O users (databases, liburing); libuv and others fall back to epoll.
    deny!(SYS_io_uring_setup, EPERM, "io_uring has been the largest source of recent kernel privilege escalations"),
    deny!(SYS_io_uring_enter, EPERM, "io_uring: denied with io_uring_setup, in case an fd is passed in"),
    deny!(SYS_io_uring_register, EPERM, "io_uring: denied with io_uring_setup, in case an fd is passed in"),

    // ---- Kernel keyrings. Who: Kerberos, AFS, eCryptfs and fscrypt tooling, systemd.
    deny!(SYS_add_key, EPERM, "keyrings are not namespaced: keys are shared by sandboxes with the same uid"),
    deny!(SYS_request_key, EPERM, "keyrings are not namespaced: keys are shared by sandboxes with the same uid"),
    deny!(SYS_keyctl, EPERM, "keyrings are not namespaced: keys are shared by sandboxes with the same uid"),

    // ---- File handles. Who: user-space NFS servers (nfs-ganesha), fanotify consumers;
    // systemd and libmount fall back to other ways of reading mount ids.
    deny!(SYS_open_by_handle_at, EPERM,
        "opens any inode of a mounted filesystem, bypassing the mount tree (the 2014 'shocker' escape)"),
    deny!(SYS_name_to_handle_at, EPERM, "makes the handles open_by_handle_at takes, and leaks inode identities"),

    // ---- Host-wide state. Who: init systems, swap and quota administration, NTP daemons,
    // klogd and dmesg, process-accounting daemons, getty and login, oprofile.
    deny!(SYS_reboot, EPERM, "restarts or halts the machine (in a pid namespace: kills the sandbox's init)"),
    deny!(SYS_swapon, EPERM, "changes host-wide swap"),
    deny!(SYS_swapoff, EPERM, "changes host-wide swap"),
    deny!(SYS_settimeofday, EPERM, "sets the host clock: CLOCK_REALTIME is not namespaced"),
    deny!(SYS_clock_settime, EPERM, "sets the host clock: CLOCK_REALTIME is not namespaced"),
    deny!(SYS_clock_adjtime, EPERM, "tunes or steps the host clock; the mode is in memory, so its reads go with it"),
    deny!(SYS_adjtimex, EPERM,
        "tunes or steps the host clock; the mode is in memory, so its reads (ntp_gettime) go with it"),
    deny!(SYS_syslog, EPERM, "reads or clears the host kernel log: addresses that defeat KASLR, other tenants' events"),
    deny!(SYS_acct, EPERM, "switches BSD process accounting, a file write per exiting process"),
    deny!(SYS_quotactl, EPERM, "reads and changes disk quotas of host filesystems"),
    deny!(SYS_quotactl_fd, EPERM, "reads and changes disk quotas of host filesystems"),
    deny!(SYS_lookup_dcookie, EPERM, "turns kernel dentry cookies into host paths (oprofile; removed in Linux 6.9)"),
    deny!(SYS_vhangup, EPERM, "hangs up the controlling terminal, which may be the user's"),

    // ---- x86 hardware access. Who: legacy X servers, hardware diagnostics, DOS emulators.
    #[cfg(target_arch = "x86_64")]
    deny!(SYS_iopl, EPERM, "raises the I/O privilege level: every hardware port becomes reachable"),
    #[cfg(target_arch = "x86_64")]
    deny!(SYS_ioperm, EPERM, "grants direct access to hardware I/O ports"),
    // Who: a.out-era (libc5) dynamic loaders. (aarch64 never had it.)
    #[cfg(target_arch = "x86_64")]
    deny!(SYS_uselib, EPERM, "the a.out library loader: dead kernel code with a history of bugs"),
];

/// Call numbers: libc's, plus the ones libc doesn't have yet.
mod nr {
    pub(super) use libc::*;

    /// open_tree_attr(2), Linux 6.15; calls numbered from 424 on share one number on every
    /// architecture.
    #[allow(non_upper_case_globals)]
    pub(super) const SYS_open_tree_attr: libc::c_long = 467;
}

/// `SYS_mount` -> `mount`.
const fn call_name(constant: &'static str) -> &'static str {
    match constant.as_bytes() {
        [b'S', b'Y', b'S', b'_', ..] => constant.split_at(4).1,
        _ => constant,
    }
}

/// `args[0]` of clone(2) and unshare(2) has this `CLONE_NEW*` flag set.
const fn ns_flag(flag: libc::c_int) -> ArgCond {
    ArgCond::flags_set(0, flag as u64)
}

// ---- The compiler.

/// The native ABI as `seccomp_data.arch` reports it (`AUDIT_ARCH_*` from linux/audit.h).
#[cfg(target_arch = "x86_64")]
const NATIVE_ARCH: u32 = 0xC000_003E; // AUDIT_ARCH_X86_64
#[cfg(target_arch = "aarch64")]
const NATIVE_ARCH: u32 = 0xC000_00B7; // AUDIT_ARCH_AARCH64

#[cfg(not(all(
    any(target_arch = "x86_64", target_arch = "aarch64"),
    target_endian = "little"
)))]
compile_error!("cove-jail's seccomp filter supports little-endian x86_64 and aarch64 only");

/// x32 call numbers are the native ones with this bit set.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// From here on, `nr` is negative as the kernel's `int`.
#[cfg(target_arch = "x86_64")]
const NEGATIVE_NR: u32 = 0x8000_0000;

/// Offsets into `struct seccomp_data { int nr; u32 arch; u64 ip; u64 args[6]; }`.
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;
/// Offset of the low half of `args[index]` (little endian; the high half is 4 bytes on).
const fn arg_offset(index: u8) -> u32 {
    16 + 8 * index as u32
}

const BPF_MAXINSNS: usize = libc::BPF_MAXINSNS as usize;
/// Longest jump classic BPF can encode (`jt`/`jf` are u8).
const MAX_JUMP: usize = u8::MAX as usize;

// Opcodes, as u16 (`sock_filter::code`).
const LD_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const AND_K: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
const JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

const fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

const fn load(offset: u32) -> sock_filter {
    stmt(LD_ABS, offset)
}

const fn ret(value: u32) -> sock_filter {
    stmt(RET_K, value)
}

impl Action {
    fn ret_value(self) -> u32 {
        match self {
            // Validated to 1..=4095 before emission.
            Action::Errno(errno) => {
                libc::SECCOMP_RET_ERRNO | (errno as u32 & libc::SECCOMP_RET_DATA)
            }
        }
    }
}

impl Rule {
    /// The 32-bit tests the rule's conditions come down to, in order.
    fn halves(&self) -> impl Iterator<Item = HalfCheck> + '_ {
        self.when.iter().flat_map(HalfCheck::of)
    }

    /// Whether the rule tests anything (conditions with a zero mask always hold).
    fn has_conditions(&self) -> bool {
        self.halves().next().is_some()
    }
}

/// One 32-bit half of a condition: `(word at offset & mask) == value`.
#[derive(Clone, Copy)]
struct HalfCheck {
    offset: u32,
    mask: u32,
    value: u32,
}

impl HalfCheck {
    /// The halves of `cond` that test anything (a zero mask always holds).
    fn of(cond: &ArgCond) -> impl Iterator<Item = HalfCheck> {
        let lo = HalfCheck {
            offset: arg_offset(cond.index),
            mask: cond.mask as u32,
            value: cond.value as u32,
        };
        let hi = HalfCheck {
            offset: arg_offset(cond.index) + 4,
            mask: (cond.mask >> 32) as u32,
            value: (cond.value >> 32) as u32,
        };
        [lo, hi].into_iter().filter(|half| half.mask != 0)
    }

    /// "This one bit set": one `jset`.
    fn is_one_bit(self) -> bool {
        self.mask == self.value && self.mask.is_power_of_two()
    }

    /// One `jset` does when the test is "no bit of mask set", or "this one bit set", and one
    /// `jeq` when the mask covers the whole word; otherwise `and` then `jeq`.
    fn needs_and(self) -> bool {
        !(self.value == 0 || self.is_one_bit() || self.mask == u32::MAX)
    }

    /// Instructions, the load included.
    fn len(self) -> usize {
        if self.needs_and() { 3 } else { 2 }
    }

    /// The word left in the accumulator after the test, if it is left unmasked.
    fn leaves(self) -> Option<u32> {
        (!self.needs_and()).then_some(self.offset)
    }
}

/// Checks a rule and returns its length in instructions: the condition tests plus `ret`.
fn rule_len(rule: &Rule) -> Result<usize, SeccompError> {
    let Action::Errno(errno) = rule.action;
    if !(1..=4095).contains(&errno) {
        return Err(SeccompError::Errno {
            rule: rule.name,
            errno,
        });
    }
    let mut len = 1;
    for cond in rule.when {
        if cond.index > 5 {
            return Err(SeccompError::ArgIndex {
                rule: rule.name,
                index: cond.index,
            });
        }
        if cond.value & !cond.mask != 0 {
            return Err(SeccompError::ImpossibleCondition {
                rule: rule.name,
                index: cond.index,
                mask: cond.mask,
                value: cond.value,
            });
        }
        len += HalfCheck::of(cond).map(HalfCheck::len).sum::<usize>();
    }
    // A failed test jumps past the rest of its rule: within 8-bit reach, no rule needs a long
    // jump inside it. No real rule comes near the limit.
    if len + 1 > MAX_JUMP {
        return Err(SeccompError::RuleTooLong {
            rule: rule.name,
            conditions: rule.when.len(),
            len,
        });
    }
    Ok(len)
}

/// Checks every rule in policy order (the first bad one is the error) and groups the rules by
/// call number, keeping policy order within a call. Rules after one that tests nothing are
/// dropped: they could never answer.
fn rules_by_call(rules: &[Rule]) -> Result<BTreeMap<u32, Vec<&Rule>>, SeccompError> {
    let mut calls: BTreeMap<u32, Vec<&Rule>> = BTreeMap::new();
    for rule in rules {
        let nr = u32::try_from(rule.nr).map_err(|_| SeccompError::CallNumber {
            rule: rule.name,
            nr: rule.nr,
        })?;
        rule_len(rule)?;
        let call = calls.entry(nr).or_default();
        if call.last().is_none_or(|last| last.has_conditions()) {
            call.push(rule);
        }
    }
    Ok(calls)
}

/// What the filter answers for a call number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// This `ret` value, whatever the arguments.
    Return(u32),
    /// The call's block of argument checks, emitted here.
    Checks(Label),
}

/// The call numbers from `start` up to the next range's start, which all get `verdict`.
struct Range {
    start: u32,
    verdict: Verdict,
}

/// Cuts the 32-bit `nr` space into ranges: one per call in `verdicts` (in ascending order) and
/// one per gap between them, which is allowed. Neighbours with the same verdict merge, so a run
/// of calls denied with one errno (io_uring and the new mount API, 425 to 433) is one range.
fn ranges(verdicts: impl IntoIterator<Item = (u32, Verdict)>) -> Vec<Range> {
    let allow = Verdict::Return(libc::SECCOMP_RET_ALLOW);
    let mut ranges = vec![Range {
        start: 0,
        verdict: allow,
    }];
    let mut add = |start, verdict| {
        // A call right after the one before takes the place of the gap opened after that one.
        if ranges.last().is_some_and(|range| range.start == start) {
            ranges.pop();
        }
        if ranges.last().is_none_or(|range| range.verdict != verdict) {
            ranges.push(Range { start, verdict });
        }
    };
    for (nr, verdict) in verdicts {
        add(nr, verdict);
        if let Some(next) = nr.checked_add(1) {
            add(next, allow);
        }
    }
    ranges
}

/// One half check of a call's block, and whether it loads its word first.
#[derive(Clone, Copy)]
struct Check {
    half: HalfCheck,
    load: bool,
}

/// The checks of a call's rules, rule by rule, each loading its word only when the accumulator
/// may hold something else. A check is entered from the one before it in its rule; a rule's
/// first check from every check of the rule before, failed (or from the search, with `nr` in
/// the accumulator). So `unshare`'s eight flag rules load `args[0]` once.
fn plan_checks(rules: &[&Rule]) -> Vec<Vec<Check>> {
    // The word in the accumulator on every way into the next rule, if there is one.
    let mut entry = None;
    let mut plan = Vec::with_capacity(rules.len());
    for rule in rules {
        let halves: Vec<HalfCheck> = rule.halves().collect();
        let mut acc = entry;
        let checks = halves.iter().map(|&half| {
            let load = acc != Some(half.offset);
            acc = half.leaves();
            Check { half, load }
        });
        plan.push(checks.collect());
        let first = halves.first().and_then(|half| half.leaves());
        entry = first.filter(|&word| halves.iter().all(|half| half.leaves() == Some(word)));
    }
    plan
}

/// An emitted instruction, by its place counted from the end of the program (its index in
/// `Builder::rev`), which stays put as more is emitted in front of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Label(usize);

/// Emits a program back to front, so a jump's targets are in place when the jump is emitted and
/// its offsets are known. A target past an 8-bit offset gets a stepping stone right after the
/// jump: a copy of the `ret` it jumps to, or a `ja`, whose offset has 32 bits.
#[derive(Default)]
struct Builder {
    /// The program so far, last instruction first.
    rev: Vec<sock_filter>,
    /// The latest `ret` of each value, which jumps share while it is in reach.
    rets: HashMap<u32, Label>,
}

impl Builder {
    /// Puts `insn` in front of everything emitted so far.
    fn push(&mut self, insn: sock_filter) -> Label {
        self.rev.push(insn);
        Label(self.rev.len() - 1)
    }

    /// The jump offset from the instruction emitted `gap` instructions from now to `target`.
    fn offset(&self, target: Label, gap: usize) -> usize {
        self.rev.len() + gap - target.0 - 1
    }

    /// `ret value`: the latest one emitted, if any (a jump that cannot reach it gets a copy).
    fn ret(&mut self, value: u32) -> Label {
        match self.rets.get(&value) {
            Some(&at) => at,
            None => {
                let at = self.push(ret(value));
                self.rets.insert(value, at);
                at
            }
        }
    }

    /// An instruction that goes on to `target`: a copy of the `ret` there, or a `ja`.
    fn stepping_stone(&mut self, target: Label) -> Label {
        let insn = self.rev[target.0];
        if insn.code == RET_K {
            let at = self.push(insn);
            self.rets.insert(insn.k, at);
            at
        } else {
            // Programs are limited to BPF_MAXINSNS, far below 2^32.
            let offset = self.offset(target, 0) as u32;
            self.push(stmt(JA, offset))
        }
    }

    /// `target` if the instruction emitted `gap` instructions from now reaches it, else a
    /// stepping stone.
    fn within_reach(&mut self, target: Label, gap: usize) -> Label {
        if self.offset(target, gap) <= MAX_JUMP {
            target
        } else {
            self.stepping_stone(target)
        }
    }

    /// A conditional jump: to `jt` if the test holds, else to `jf`.
    fn jump(&mut self, code: u16, k: u32, jt: Label, jf: Label) -> Label {
        // A stone for `jf` would come between the jump and one for `jt`.
        let jt = self.within_reach(jt, 1);
        let jf = self.within_reach(jf, 0);
        let offset = |target| u8::try_from(self.offset(target, 0)).expect("targets are in reach");
        let insn = sock_filter {
            code,
            jt: offset(jt),
            jf: offset(jf),
            k,
        };
        self.push(insn)
    }

    /// An instruction that does not jump, followed by `next`.
    fn then(&mut self, insn: sock_filter, next: Label) -> Label {
        if self.offset(next, 0) != 0 {
            self.stepping_stone(next);
        }
        self.push(insn)
    }

    /// The arch check, then `nr` into the accumulator (and on x86_64 the x32 check), then `rest`.
    fn prelude(&mut self, rest: Label) -> Label {
        #[cfg(target_arch = "x86_64")]
        let rest = {
            // Negative: on to the rest. Else x32: ENOSYS.
            let enosys = self.ret(libc::SECCOMP_RET_ERRNO | ENOSYS as u32);
            let x32 = self.jump(JGE_K, X32_SYSCALL_BIT, enosys, rest);
            self.jump(JGE_K, NEGATIVE_NR, rest, x32)
        };
        let nr = self.then(load(NR_OFFSET), rest);
        let kill = self.ret(libc::SECCOMP_RET_KILL_PROCESS);
        let arch = self.jump(JEQ_K, NATIVE_ARCH, nr, kill);
        self.then(load(ARCH_OFFSET), arch)
    }

    /// A balanced binary search over `ranges` (sorted, the first starting at 0) with `nr` in
    /// the accumulator: one `jge` per level, then the range's verdict.
    fn search(&mut self, ranges: &[Range]) -> Label {
        if let [range] = ranges {
            return match range.verdict {
                Verdict::Return(value) => self.ret(value),
                Verdict::Checks(block) => block,
            };
        }
        let mid = ranges.len() / 2;
        // The upper half first: emitted back to front, it lands after the lower one.
        let upper = self.search(&ranges[mid..]);
        let lower = self.search(&ranges[..mid]);
        self.jump(JGE_K, ranges[mid].start, upper, lower)
    }

    /// What a call gets: its first rule's `ret` if that rule tests nothing, else a block.
    fn verdict(&mut self, rules: &[&Rule]) -> Verdict {
        match rules {
            [first, ..] if !first.has_conditions() => Verdict::Return(first.action.ret_value()),
            _ => Verdict::Checks(self.block(rules)),
        }
    }

    /// One call's rules in policy order: each rule's checks, then its `ret`. A failed check goes
    /// on to the next rule; past the last one, the call is allowed.
    fn block(&mut self, rules: &[&Rule]) -> Label {
        let plan = plan_checks(rules);
        let mut next = None;
        for (rule, checks) in rules.iter().zip(plan).rev() {
            let mut at = self.ret(rule.action.ret_value());
            if !checks.is_empty() {
                let fail = match next {
                    Some(next) => next,
                    None => self.ret(libc::SECCOMP_RET_ALLOW),
                };
                for check in checks.into_iter().rev() {
                    at = self.check(check, at, fail);
                }
            }
            next = Some(at);
        }
        next.expect("every call has a rule")
    }

    /// One half check: `(word & mask) == value` goes on to `pass`, anything else to `fail`.
    fn check(&mut self, check: Check, pass: Label, fail: Label) -> Label {
        let half = check.half;
        let test = if half.value == 0 {
            // Any masked bit set: fail.
            self.jump(JSET_K, half.mask, fail, pass)
        } else if half.is_one_bit() {
            // The one bit set: pass.
            self.jump(JSET_K, half.mask, pass, fail)
        } else {
            let test = self.jump(JEQ_K, half.value, pass, fail);
            if half.needs_and() {
                self.then(stmt(AND_K, half.mask), test)
            } else {
                test
            }
        };
        if check.load {
            self.then(load(half.offset), test)
        } else {
            test
        }
    }

    /// The program, first instruction first.
    fn finish(self) -> Vec<sock_filter> {
        let mut filter = self.rev;
        filter.reverse();
        filter
    }
}

#[cfg(test)]
#[allow(unsafe_code)] // Forked children and raw system calls, through sys::seccomp::testing.
mod tests {
    use std::collections::BTreeSet;
    use std::io::{self, Read, Write};
    use std::os::fd::{AsRawFd, RawFd};
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    use libc::c_int;

    use super::*;
    use crate::sys::seccomp::testing::{self, Exit};

    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    const KILL: u32 = libc::SECCOMP_RET_KILL_PROCESS;
    const AUDIT_ARCH_I386: u32 = 0x4000_0003;

    // ---- The compiler, checked against an interpreter.

    /// `struct seccomp_data`, as the filter sees it.
    #[derive(Debug, Clone, Copy)]
    struct Data {
        arch: u32,
        nr: u32,
        args: [u64; 6],
    }

    impl Data {
        fn native(nr: i64, args: [u64; 6]) -> Self {
            Data {
                arch: NATIVE_ARCH,
                nr: nr as u32,
                args,
            }
        }

        fn word(&self, offset: u32) -> u32 {
            match offset {
                NR_OFFSET => self.nr,
                ARCH_OFFSET => self.arch,
                16..=60 if offset.is_multiple_of(4) => {
                    let arg = self.args[(offset as usize - 16) / 8];
                    if offset.is_multiple_of(8) {
                        arg as u32
                    } else {
                        (arg >> 32) as u32
                    }
                }
                _ => panic!("load from seccomp_data offset {offset}"),
            }
        }
    }

    /// What a run of the program did.
    #[derive(Debug, Clone, Copy)]
    struct Outcome {
        /// The `ret` value.
        ret: u32,
        /// Loads of an argument (the kernel's action cache needs paths without any).
        arg_loads: usize,
        /// Instructions executed, the `ret` included.
        steps: usize,
    }

    /// Runs `program` on `data` like the kernel would. Panics on a jump out of the program or an
    /// opcode compile() never emits.
    fn run(program: &Program, data: &Data) -> Outcome {
        let (mut acc, mut pc, mut arg_loads, mut steps) = (0u32, 0usize, 0, 0);
        loop {
            let insn = program.filter[pc];
            pc += 1;
            steps += 1;
            match insn.code {
                LD_ABS => {
                    arg_loads += usize::from(insn.k >= arg_offset(0));
                    acc = data.word(insn.k);
                }
                AND_K => acc &= insn.k,
                JA => pc += insn.k as usize,
                JEQ_K | JGE_K | JSET_K => {
                    let taken = match insn.code {
                        JEQ_K => acc == insn.k,
                        JGE_K => acc >= insn.k,
                        _ => acc & insn.k != 0,
                    };
                    pc += usize::from(if taken { insn.jt } else { insn.jf });
                }
                RET_K => {
                    return Outcome {
                        ret: insn.k,
                        arg_loads,
                        steps,
                    };
                }
                code => panic!("opcode {code:#x} at {}", pc - 1),
            }
        }
    }

    /// The first rule that applies to `data`, read straight off the rules.
    fn first_match<'a>(rules: &'a [Rule], data: &Data) -> Option<&'a Rule> {
        rules.iter().find(|rule| {
            rule.nr == i64::from(data.nr)
                && rule
                    .when
                    .iter()
                    .all(|c| data.args[usize::from(c.index)] & c.mask == c.value)
        })
    }

    /// What the filter must answer, written the obvious way.
    fn reference(rules: &[Rule], data: &Data) -> u32 {
        if data.arch != NATIVE_ARCH {
            return KILL;
        }
        #[cfg(target_arch = "x86_64")]
        if (X32_SYSCALL_BIT..NEGATIVE_NR).contains(&data.nr) {
            return libc::SECCOMP_RET_ERRNO | ENOSYS as u32;
        }
        first_match(rules, data).map_or(ALLOW, |rule| rule.action.ret_value())
    }

    /// Inputs around every rule: no arguments, noise, noise with the conditions met, and the
    /// conditions met but one masked bit flipped; plus every small call number, foreign ABIs.
    fn inputs(rules: &[Rule]) -> Vec<Data> {
        let mut state = 0x9E37_79B9_7F4A_7C15_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut out: Vec<Data> = (0..600).map(|nr| Data::native(nr, [0; 6])).collect();
        for rule in rules {
            for _ in 0..16 {
                let noise = [next(), next(), next(), next(), next(), next()];
                let mut met = noise;
                for c in rule.when {
                    let arg = &mut met[usize::from(c.index)];
                    *arg = (*arg & !c.mask) | c.value;
                }
                out.extend([Data::native(rule.nr, noise), Data::native(rule.nr, met)]);
                for c in rule.when.iter().filter(|c| c.mask != 0) {
                    let bits: Vec<u32> = (0..64).filter(|b| c.mask >> b & 1 == 1).collect();
                    let mut broken = met;
                    broken[usize::from(c.index)] ^= 1 << bits[next() as usize % bits.len()];
                    out.push(Data::native(rule.nr, broken));
                }
            }
        }
        out.push(Data {
            arch: AUDIT_ARCH_I386,
            nr: 20,
            args: [0; 6],
        });
        // x32 calls and the edges of the x32 range; negative numbers.
        let x32_and_edges = [
            0x4000_0000 | 39,
            0x4000_0000 | 165,
            0x4000_0000,
            0x7fff_ffff,
        ];
        for nr in x32_and_edges.into_iter().chain([0x8000_0000, u32::MAX]) {
            out.push(Data {
                arch: NATIVE_ARCH,
                nr,
                args: [0; 6],
            });
        }
        out
    }

    fn assert_matches_reference(rules: &[Rule]) {
        let program = compile(rules).unwrap();
        for data in inputs(rules) {
            assert_eq!(
                run(&program, &data).ret,
                reference(rules, &data),
                "{data:x?}"
            );
        }
    }

    fn insn(i: &sock_filter) -> (u16, u8, u8, u32) {
        (i.code, i.jt, i.jf, i.k)
    }

    #[test]
    fn default_policy_compiles_to_arch_check_rules_allow() {
        let program = compile(DEFAULT_POLICY).unwrap();
        let f = &program.filter;
        assert_eq!(insn(&f[0]), (LD_ABS, 0, 0, ARCH_OFFSET));
        assert_eq!(insn(&f[1]), (JEQ_K, 1, 0, NATIVE_ARCH));
        assert_eq!(insn(&f[2]), (RET_K, 0, 0, KILL));
        assert_eq!(insn(&f[3]), (LD_ABS, 0, 0, NR_OFFSET));
        assert_eq!(insn(f.last().unwrap()), (RET_K, 0, 0, ALLOW));
        assert!(
            program.len() < BPF_MAXINSNS,
            "{} instructions",
            program.len()
        );
        assert!(!program.is_empty());
        eprintln!(
            "DEFAULT_POLICY: {} rules, {} instructions",
            DEFAULT_POLICY.len(),
            program.len()
        );
    }

    #[test]
    fn default_policy_program_does_what_the_rules_say() {
        assert_matches_reference(DEFAULT_POLICY);
    }

    #[test]
    fn compiler_handles_high_words_repeated_calls_and_odd_masks() {
        let rule = |nr, when, errno| Rule {
            name: "synthetic",
            nr,
            when,
            action: Action::Errno(errno),
            why: "test",
        };
        let rules = [
            // Both halves, partial masks: ld/and/jeq twice.
            rule(
                1,
                &[ArgCond {
                    index: 2,
                    mask: 0xffff_0000_0000_ff00,
                    value: 0x1234_0000_0000_5600,
                }],
                1,
            ),
            // Two conditions, one only in the high word.
            rule(
                1,
                const { &[ArgCond::low32_eq(0, 7), ArgCond::flags_set(5, 1 << 63)] },
                2,
            ),
            // "None of these bits set" (jset to fail).
            rule(
                2,
                &[ArgCond {
                    index: 1,
                    mask: 0xf0,
                    value: 0,
                }],
                3,
            ),
            rule(3, &[], 4),
            // Call 1 again, not adjacent: it joins call 1's block, after the rules above.
            rule(1, const { &[ArgCond::low32_eq(3, 9)] }, 5),
            // A zero mask always holds: an unconditional rule.
            rule(
                4,
                &[ArgCond {
                    index: 0,
                    mask: 0,
                    value: 0,
                }],
                6,
            ),
            // Several flags at once: and/jeq.
            rule(2, const { &[ArgCond::flags_set(4, 0x3)] }, 7),
            // Shadowed by rule 6: never answers.
            rule(4, const { &[ArgCond::low32_eq(0, 1)] }, 8),
        ];
        assert_matches_reference(&rules);
    }

    #[test]
    fn many_rules_for_one_call_form_one_block() {
        let conds: &'static [ArgCond] =
            Vec::leak((0..200).map(|i| ArgCond::low32_eq(1, 3 * i + 1)).collect());
        let rules: Vec<Rule> = conds
            .chunks(1)
            .enumerate()
            .map(|(i, when)| Rule {
                name: "many",
                nr: 16,
                when,
                action: Action::Errno(1 + i as i32),
                why: "test",
            })
            .collect();
        assert_matches_reference(&rules);
        let program = compile(&rules).unwrap();
        for (i, c) in conds.iter().enumerate() {
            let data = Data::native(16, [0, c.value, 0, 0, 0, 0]);
            assert_eq!(
                run(&program, &data).ret,
                Action::Errno(1 + i as i32).ret_value()
            );
        }
    }

    /// The kernel (5.11+) skips the filter for calls it can prove always allowed, which needs
    /// paths that read nothing but arch and nr.
    #[test]
    fn only_argument_checked_calls_read_arguments() {
        let program = compile(DEFAULT_POLICY).unwrap();
        for nr in 0..600 {
            let checks_args = DEFAULT_POLICY
                .iter()
                .any(|rule| rule.nr == nr && !rule.when.is_empty());
            let read_args = run(&program, &Data::native(nr, [u64::MAX; 6])).arg_loads > 0;
            assert_eq!(read_args, checks_args, "call {nr}");
        }
    }

    /// A call whose rules all test one word unmasked (the flags of unshare and clone, the
    /// request of ioctl) loads it once, however many rules it tries.
    #[test]
    fn rules_on_one_word_load_it_once() {
        let program = compile(DEFAULT_POLICY).unwrap();
        for nr in [libc::SYS_ioctl, libc::SYS_unshare, libc::SYS_clone] {
            let outcome = run(&program, &Data::native(nr, [0; 6]));
            assert_eq!((outcome.ret, outcome.arg_loads), (ALLOW, 1), "call {nr}");
        }
    }

    /// The builder on its own: a jump to a `ret` out of 8-bit reach gets a copy of it, to
    /// anything else a `ja`, and so does an instruction that does not jump when what follows it
    /// is elsewhere.
    #[test]
    fn far_targets_get_stepping_stones() {
        let mut b = Builder::default();
        let allow = b.ret(ALLOW);
        let kill = b.ret(KILL);
        let seven = b.jump(JEQ_K, 7, allow, kill);
        let filler = MAX_JUMP as u32;
        for value in 0..filler {
            b.push(ret(value));
        }
        let five = b.jump(JGE_K, 5, seven, kill);
        b.push(ret(filler));
        b.then(load(NR_OFFSET), five);
        let program = Program { filter: b.finish() };
        assert_well_formed(&program);
        let codes: Vec<u16> = program.filter.iter().map(|insn| insn.code).collect();
        // ld nr; ja over the filler ret; jge 5 with a copy of `ret KILL` and a ja to `jeq 7`.
        assert_eq!(codes[..6], [LD_ABS, JA, RET_K, JGE_K, RET_K, JA]);
        assert_eq!((program.filter[2].k, program.filter[4].k), (filler, KILL));
        for (nr, want) in [(4, KILL), (5, KILL), (7, ALLOW)] {
            assert_eq!(
                run(&program, &Data::native(nr, [0; 6])).ret,
                want,
                "nr {nr}"
            );
        }
    }

    // ---- The search on the call number.

    /// Call numbers past 0..=500 worth a look: x32 calls, the edges of the x32 range, negative
    /// numbers.
    const ODD_NRS: [u32; 8] = [
        0x4000_0000 | 16,
        0x4000_0000 | 165,
        0x3fff_ffff,
        0x4000_0000,
        0x7fff_ffff,
        0x8000_0000,
        0xffff_fffe,
        u32::MAX,
    ];

    /// Arguments to try call `nr` with: none, every bit, a pattern; and for each rule for the
    /// call, its conditions met on each of those, and met but for one masked bit (the lowest or
    /// the highest) flipped.
    fn arguments(rules: &[Rule], nr: u32) -> Vec<[u64; 6]> {
        let pattern = [
            0x0123_4567_89ab_cdef,
            0xfedc_ba98_7654_3210,
            0x5555_5555_5555_5555,
            0xaaaa_aaaa_aaaa_aaaa,
            0x8000_0000_0000_0001,
            0x7fff_ffff_ffff_fffe,
        ];
        let bases = [[0; 6], [u64::MAX; 6], pattern];
        let mut out = bases.to_vec();
        for rule in rules.iter().filter(|rule| rule.nr == i64::from(nr)) {
            for base in bases {
                let mut met = base;
                for c in rule.when {
                    let arg = &mut met[usize::from(c.index)];
                    *arg = (*arg & !c.mask) | c.value;
                }
                out.push(met);
                for c in rule.when.iter().filter(|c| c.mask != 0) {
                    for bit in [c.mask.trailing_zeros(), 63 - c.mask.leading_zeros()] {
                        let mut broken = met;
                        broken[usize::from(c.index)] ^= 1 << bit;
                        out.push(broken);
                    }
                }
            }
        }
        out
    }

    /// For every call number in `nrs`, with the arguments above, native or i386, the program
    /// answers what the rules say.
    fn assert_every_call_matches(rules: &[Rule], nrs: impl IntoIterator<Item = u32>) {
        let program = compile(rules).unwrap();
        for nr in nrs {
            for args in arguments(rules, nr) {
                for arch in [NATIVE_ARCH, AUDIT_ARCH_I386] {
                    let data = Data { arch, nr, args };
                    assert_eq!(
                        run(&program, &data).ret,
                        reference(rules, &data),
                        "{data:x?}"
                    );
                }
            }
        }
    }

    /// The longest path to a verdict that a call no rule names may take: the arch and x32 checks,
    /// then about log2(calls) compares, with room for long jumps.
    fn unruled_path_bound(rules: &[Rule]) -> usize {
        let calls: BTreeSet<i64> = rules.iter().map(|rule| rule.nr).collect();
        let log2_ceil = (calls.len() + 1).next_power_of_two().trailing_zeros() as usize;
        4 + 2 * log2_ceil
    }

    /// Calls in `nrs` no rule names reach their verdict within [`unruled_path_bound`] steps,
    /// and the others within it plus their rules' length. Returns the longest unruled path.
    fn assert_short_paths(rules: &[Rule], nrs: impl IntoIterator<Item = u32>) -> usize {
        let program = compile(rules).unwrap();
        let bound = unruled_path_bound(rules);
        let mut longest = 0;
        for nr in nrs {
            let own: Vec<&Rule> = rules.iter().filter(|r| r.nr == i64::from(nr)).collect();
            let block_len: usize = own.iter().map(|rule| rule_len(rule).unwrap()).sum();
            for args in arguments(rules, nr) {
                let steps = run(&program, &Data::native(nr.into(), args)).steps;
                assert!(steps <= bound + block_len, "call {nr}: {steps} steps");
                if own.is_empty() {
                    longest = longest.max(steps);
                }
            }
        }
        longest
    }

    /// What the kernel's classic BPF checker demands, and compile() promises: known opcodes,
    /// loads inside `seccomp_data`, every jump inside the program, a `ret` at the end.
    fn assert_well_formed(program: &Program) {
        let f = &program.filter;
        assert!(f.len() <= BPF_MAXINSNS);
        for (pc, insn) in f.iter().enumerate() {
            let inside = |offset: usize| pc + 1 + offset < f.len();
            match insn.code {
                LD_ABS => assert!(insn.k < 64 && insn.k.is_multiple_of(4), "load at {pc}"),
                AND_K | RET_K => {}
                JA => assert!(inside(insn.k as usize), "ja at {pc}"),
                JEQ_K | JGE_K | JSET_K => assert!(
                    inside(insn.jt.into()) && inside(insn.jf.into()),
                    "jump at {pc}"
                ),
                code => panic!("opcode {code:#x} at {pc}"),
            }
        }
        assert_eq!(f.last().map(|insn| insn.code), Some(RET_K));
    }

    #[test]
    fn every_call_number_gets_the_rules_verdict() {
        assert_every_call_matches(DEFAULT_POLICY, (0..=500).chain(ODD_NRS));
    }

    #[test]
    fn every_call_reaches_its_verdict_in_logarithmic_steps() {
        let longest = assert_short_paths(DEFAULT_POLICY, (0..=500).chain(ODD_NRS));
        let program = compile(DEFAULT_POLICY).unwrap();
        assert_well_formed(&program);
        eprintln!(
            "DEFAULT_POLICY: {} instructions, unruled calls answered within {longest} (bound {})",
            program.len(),
            unruled_path_bound(DEFAULT_POLICY),
        );
    }

    /// First call number of the synthetic policy: above every real call, so a child can install
    /// the policy and still exit.
    const SYNTHETIC_BASE: u32 = 1000;
    /// Calls in the synthetic policy.
    const SYNTHETIC_CALLS: u32 = 300;

    /// 300 calls, four neighbours then a gap: runs denied with one errno (which merge into one
    /// range), calls with many flag rules on one word, masked and unmasked tests of one word,
    /// high halves, and every 50th call with two rules of 36 conditions (over 150 instructions
    /// each), so the search needs long jumps to reach the blocks and over them.
    fn synthetic_policy() -> Vec<Rule> {
        let leak = |conds: Vec<ArgCond>| -> &'static [ArgCond] { Vec::leak(conds) };
        let mut rules = Vec::new();
        for i in 0..SYNTHETIC_CALLS {
            let nr = i64::from(SYNTHETIC_BASE + i + i / 4);
            let rule = |when, errno| Rule {
                name: "synthetic",
                nr,
                when,
                action: Action::Errno(errno),
                why: "test",
            };
            match i % 10 {
                _ if i % 50 == 7 => {
                    for r in 0..2u32 {
                        // Two bits per condition in a low half, one in the high half.
                        let long = (0..36u32).map(|c| {
                            let shift = 2 * (c / 6);
                            let v = u64::from((c + r) % 4);
                            ArgCond {
                                index: (c % 6) as u8,
                                mask: (0b11 << shift) | (1 << (32 + shift)),
                                value: (v << shift) | ((v & 1) << (32 + shift)),
                            }
                        });
                        rules.push(rule(leak(long.collect()), 10 + r as i32));
                    }
                }
                0..=3 => rules.push(rule(&[], 1 + (i / 20 % 3) as i32)),
                4 => {
                    for bit in 0..6 {
                        let flag = leak(vec![ArgCond::flags_set(0, 1 << (3 * bit))]);
                        rules.push(rule(flag, 20 + bit));
                    }
                }
                5 => {
                    let masked = ArgCond {
                        index: 2,
                        mask: 0xff00,
                        value: 0x1200,
                    };
                    rules.extend([
                        rule(leak(vec![masked]), 30),
                        rule(leak(vec![ArgCond::low32_eq(2, 7)]), 31),
                        rule(leak(vec![ArgCond::flags_set(2, 1 << 40)]), 32),
                        rule(leak(vec![ArgCond::low32_eq(2, 9)]), 33),
                        rule(&[], 34),
                    ]);
                }
                6 => rules.push(rule(leak(vec![ArgCond::low32_eq(1, i)]), 40)),
                _ => rules.push(rule(&[], 50 + (i % 3) as i32)),
            }
        }
        rules
    }

    fn synthetic_nrs() -> std::ops::RangeInclusive<u32> {
        SYNTHETIC_BASE..=SYNTHETIC_BASE + SYNTHETIC_CALLS + SYNTHETIC_CALLS / 4 + 2
    }

    #[test]
    fn large_policies_keep_every_jump_in_range() {
        let rules = synthetic_policy();
        let program = compile(&rules).unwrap();
        assert_well_formed(&program);
        let long_jumps = program.filter.iter().filter(|i| i.code == JA).count();
        assert!(long_jumps > 0, "the policy is meant to need long jumps");
        assert_every_call_matches(&rules, (0..SYNTHETIC_BASE).chain(synthetic_nrs()));
        let longest = assert_short_paths(&rules, (0..SYNTHETIC_BASE).chain(synthetic_nrs()));
        eprintln!(
            "synthetic: {} rules, {} instructions, {long_jumps} long jumps, \
             unruled calls answered within {longest} (bound {})",
            rules.len(),
            program.len(),
            unruled_path_bound(&rules),
        );
    }

    /// Policies drawn at random: few or many calls, close together or apart, short and long
    /// rules, every kind of mask. Jumps of every length come up, those that just fit in 8 bits
    /// and those that just don't among them.
    #[test]
    fn random_policies_compile_to_what_the_rules_say() {
        let mut state = 0x2545_F491_4F6C_DD1D_u64;
        let mut next = move |below: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % below
        };
        for _ in 0..150 {
            let calls = 1 + next(80);
            let spread = 1 + next(4);
            let mut rules = Vec::new();
            let mut nr = next(3);
            for _ in 0..calls {
                nr += 1 + next(spread);
                for _ in 0..1 + next(3) {
                    let conditions = match next(8) {
                        0 => next(40),
                        _ => next(4),
                    };
                    let when = (0..conditions).map(|_| {
                        let mask = match next(6) {
                            0 => 1 << next(64),
                            1 => 0xffff_ffff,
                            2 => u64::MAX,
                            3 => 0b11 << next(62),
                            4 => 0,
                            _ => next(u64::MAX) | 1,
                        };
                        let value = match next(3) {
                            0 => 0,
                            1 => mask,
                            _ => next(u64::MAX) & mask,
                        };
                        ArgCond {
                            index: next(6) as u8,
                            mask,
                            value,
                        }
                    });
                    rules.push(Rule {
                        name: "random",
                        nr: nr as i64,
                        when: Vec::leak(when.collect()),
                        action: Action::Errno(1 + next(4) as i32),
                        why: "test",
                    });
                }
            }
            assert_well_formed(&compile(&rules).unwrap());
            assert_every_call_matches(&rules, 0..nr as u32 + 2);
        }
    }

    /// The kernel accepts the long jumps and takes them as the interpreter does: each synthetic
    /// call, made without arguments in a child under the synthetic policy, fails with the
    /// rules' errno or, allowed, with the kernel's ENOSYS for a call that does not exist.
    #[test]
    fn kernel_runs_large_policies_like_the_interpreter() {
        let rules = synthetic_policy();
        let program = compile(&rules).unwrap();
        let nrs: Vec<u32> = synthetic_nrs().collect();
        let want: Vec<i32> = nrs
            .iter()
            .map(
                |&nr| match reference(&rules, &Data::native(nr.into(), [0; 6])) {
                    ALLOW => ENOSYS,
                    errno => (errno & libc::SECCOMP_RET_DATA) as i32,
                },
            )
            .collect();
        assert!(want.iter().any(|&errno| errno != ENOSYS));
        let (mut results, results_out) = io::pipe().unwrap();
        assert!(nrs.len() * 4 < libc::PIPE_BUF, "results must fit the pipe");
        let child = || {
            if program.install().is_err() {
                return INSTALL_FAILED;
            }
            let mut out = &results_out;
            for &nr in &nrs {
                // SAFETY: no such call exists: the filter or the kernel refuses it, and no
                // argument is read.
                let errno = unsafe { testing::syscall6(nr.into(), [0; 6]) }
                    .err()
                    .unwrap_or(0);
                if out.write_all(&errno.to_ne_bytes()).is_err() {
                    return WRITE_FAILED;
                }
            }
            0
        };
        // SAFETY: the child installs the precompiled program, makes raw system calls and writes
        // to a pipe: no allocation, no locks, no panics.
        let exit = unsafe { testing::fork_and_wait(child) }.unwrap();
        drop(results_out);
        assert_eq!(exit, Exit::Code(0));
        let mut bytes = Vec::new();
        results.read_to_end(&mut bytes).unwrap();
        let seen: Vec<i32> = bytes
            .chunks_exact(4)
            .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn compile_rejects_rules_it_cannot_honour() {
        fn one(nr: i64, when: &'static [ArgCond], errno: i32) -> Result<Program, SeccompError> {
            compile(&[Rule {
                name: "bad",
                nr,
                when,
                action: Action::Errno(errno),
                why: "test",
            }])
        }
        const fn cond(index: u8, mask: u64, value: u64) -> ArgCond {
            ArgCond { index, mask, value }
        }
        assert!(matches!(
            one(1, const { &[cond(6, 1, 1)] }, 1),
            Err(SeccompError::ArgIndex { index: 6, .. })
        ));
        assert!(matches!(
            one(1, const { &[cond(0, 1, 3)] }, 1),
            Err(SeccompError::ImpossibleCondition { .. })
        ));
        assert!(matches!(
            one(1, &[], 0),
            Err(SeccompError::Errno { errno: 0, .. })
        ));
        assert!(matches!(
            one(1, &[], 4096),
            Err(SeccompError::Errno { errno: 4096, .. })
        ));
        assert!(matches!(
            one(-1, &[], 1),
            Err(SeccompError::CallNumber { nr: -1, .. })
        ));
        static MANY: [ArgCond; 100] = [ArgCond {
            index: 0,
            mask: 3,
            value: 1,
        }; 100];
        assert!(matches!(
            one(1, &MANY, 1),
            Err(SeccompError::RuleTooLong {
                conditions: 100,
                ..
            })
        ));
        // Every other call number, so no two calls merge into one range of the search.
        let huge: Vec<Rule> = (0..3000)
            .map(|i| Rule {
                name: "huge",
                nr: 2 * i,
                when: &[],
                action: Action::Errno(1),
                why: "test",
            })
            .collect();
        assert!(matches!(
            compile(&huge),
            Err(SeccompError::TooLarge { max: 4096, .. })
        ));
    }

    #[test]
    fn compile_takes_microseconds() {
        let start = std::time::Instant::now();
        for _ in 0..1000 {
            compile(DEFAULT_POLICY).unwrap();
        }
        // Microseconds each even unoptimised; the bound only catches accidental blow-ups.
        assert!(
            start.elapsed() < std::time::Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
    }

    // ---- The policy as data.

    #[test]
    fn every_rule_says_why() {
        for rule in DEFAULT_POLICY {
            assert!(
                !rule.name.is_empty() && !rule.name.starts_with("SYS_"),
                "{rule:?}"
            );
            assert!(
                !rule.why.trim().is_empty() && !rule.why.contains('\n'),
                "{rule:?}"
            );
        }
    }

    #[test]
    fn no_rule_is_shadowed() {
        for (i, rule) in DEFAULT_POLICY.iter().enumerate() {
            for later in &DEFAULT_POLICY[i + 1..] {
                let same = later.nr == rule.nr && later.when == rule.when;
                assert!(!same, "{} is listed twice", rule.name);
                assert!(
                    rule.nr != later.nr || !rule.when.is_empty(),
                    "{} is shadowed",
                    later.name
                );
            }
        }
    }

    #[test]
    fn every_rule_has_a_probe() {
        let probes = probes(-1);
        for (i, rule) in DEFAULT_POLICY.iter().enumerate() {
            let probed = probes.iter().any(|p| {
                let hit = first_match(DEFAULT_POLICY, &Data::native(p.nr, p.args));
                hit.is_some_and(|hit| std::ptr::eq(hit, &DEFAULT_POLICY[i]))
            });
            assert!(
                probed,
                "no probe reaches rule {i} ({}: {})",
                rule.name, rule.why
            );
        }
    }

    // ---- The policy, installed in forked children.

    /// Exit code of a child whose `install` failed.
    const INSTALL_FAILED: u8 = 100;
    /// Exit code of a probe child that could not report a result.
    const WRITE_FAILED: u8 = 101;

    /// Offset added to every rule's errno in the marked run.
    const MARK: i32 = 1000;

    #[derive(Debug, Clone, Copy)]
    enum Expect {
        /// A policy rule answers with this errno (plus MARK in the marked run).
        Rule(i32),
        /// The filter's prelude answers (x32): rules, and marks, don't apply.
        #[cfg(target_arch = "x86_64")]
        Prelude(i32),
        /// The call reaches the kernel and succeeds.
        Success,
        /// The call reaches the kernel, which fails it with this errno.
        Kernel(i32),
    }

    impl Expect {
        /// The errno the probe must see (0: success).
        fn errno(self, mark: i32) -> i32 {
            match self {
                Expect::Rule(errno) => errno + mark,
                #[cfg(target_arch = "x86_64")]
                Expect::Prelude(errno) => errno,
                Expect::Kernel(errno) => errno,
                Expect::Success => 0,
            }
        }
    }

    struct Probe {
        name: &'static str,
        nr: i64,
        args: [u64; 6],
        expect: Expect,
    }

    fn probe(name: &'static str, nr: i64, args: &[u64], expect: Expect) -> Probe {
        let mut all = [0; 6];
        all[..args.len()].copy_from_slice(args);
        Probe {
            name,
            nr,
            args: all,
            expect,
        }
    }

    const NULL: u64 = 0;
    const BAD_FD: u64 = u64::MAX; // -1
    const HIGH_BIT: u64 = 1 << 32;

    /// The namespace flags, with probe names for unshare and clone (None: clone can't create it).
    const NAMESPACES: [(&str, Option<&str>, c_int); 8] = [
        (
            "unshare(CLONE_NEWUSER)",
            Some("clone(CLONE_NEWUSER)"),
            CLONE_NEWUSER,
        ),
        (
            "unshare(CLONE_NEWNS)",
            Some("clone(CLONE_NEWNS)"),
            CLONE_NEWNS,
        ),
        (
            "unshare(CLONE_NEWNET)",
            Some("clone(CLONE_NEWNET)"),
            CLONE_NEWNET,
        ),
        (
            "unshare(CLONE_NEWPID)",
            Some("clone(CLONE_NEWPID)"),
            CLONE_NEWPID,
        ),
        (
            "unshare(CLONE_NEWCGROUP)",
            Some("clone(CLONE_NEWCGROUP)"),
            CLONE_NEWCGROUP,
        ),
        (
            "unshare(CLONE_NEWIPC)",
            Some("clone(CLONE_NEWIPC)"),
            CLONE_NEWIPC,
        ),
        (
            "unshare(CLONE_NEWUTS)",
            Some("clone(CLONE_NEWUTS)"),
            CLONE_NEWUTS,
        ),
        ("unshare(CLONE_NEWTIME)", None, CLONE_NEWTIME),
    ];

    /// One table of calls and what they must get. `pipe_fd` is a writable pipe end.
    ///
    /// Denied calls get arguments the kernel would refuse harmlessly (EFAULT, EBADF, EINVAL)
    /// were the filter missing: a broken filter must not unmount, reboot, set the clock or
    /// unload anything on the test host. Unfiltered effects stay inside the throwaway child.
    fn probes(pipe_fd: RawFd) -> Vec<Probe> {
        #[cfg(target_arch = "x86_64")]
        use Expect::Prelude;
        use Expect::{Kernel, Rule, Success};
        use libc::{
            AT_FDCWD, CLOCK_REALTIME, CLONE_FILES, CLONE_SIGHAND, EBADF, O_CLOEXEC, O_RDONLY,
            PR_GET_NO_NEW_PRIVS, SYS_acct, SYS_add_key, SYS_adjtimex, SYS_bpf, SYS_clock_adjtime,
            SYS_clock_settime, SYS_clone, SYS_clone3, SYS_delete_module, SYS_fanotify_init,
            SYS_finit_module, SYS_fsconfig, SYS_fsmount, SYS_fsopen, SYS_fspick, SYS_getpid,
            SYS_init_module, SYS_io_uring_enter, SYS_io_uring_register, SYS_io_uring_setup,
            SYS_ioctl, SYS_kexec_file_load, SYS_kexec_load, SYS_keyctl, SYS_lookup_dcookie,
            SYS_mount, SYS_mount_setattr, SYS_move_mount, SYS_name_to_handle_at,
            SYS_open_by_handle_at, SYS_open_tree, SYS_openat, SYS_perf_event_open, SYS_personality,
            SYS_pivot_root, SYS_prctl, SYS_quotactl, SYS_quotactl_fd, SYS_reboot, SYS_request_key,
            SYS_setns, SYS_settimeofday, SYS_swapoff, SYS_swapon, SYS_syslog, SYS_umount2,
            SYS_unshare, SYS_userfaultfd, SYS_vhangup, SYS_write, TCGETS,
        };
        #[cfg(target_arch = "x86_64")]
        use libc::{SYS_ioperm, SYS_iopl, SYS_uselib};

        let dev_null = c"/dev/null".as_ptr() as u64;
        let empty = c"".as_ptr() as u64;
        let byte = b"x".as_ptr() as u64;
        let pipe = pipe_fd as u64;
        // CLONE_SIGHAND without CLONE_VM: EINVAL from the kernel, so no child is ever created.
        let no_fork = CLONE_SIGHAND as u64;
        #[rustfmt::skip] // A table: one probe per line.
        let mut table = vec![
            // Still allowed.
            probe("getpid", SYS_getpid, &[], Success),
            probe("write(pipe)", SYS_write, &[pipe, byte, 1], Success),
            probe("openat(/dev/null)", SYS_openat, &[AT_FDCWD as u64, dev_null, (O_RDONLY | O_CLOEXEC) as u64], Success),
            probe("unshare(CLONE_FILES)", SYS_unshare, &[CLONE_FILES as u64], Success),
            probe("ioctl(-1, TCGETS)", SYS_ioctl, &[BAD_FD, TCGETS, NULL], Kernel(EBADF)),
            probe("personality(query)", SYS_personality, &[0xffff_ffff], Success),
            probe("prctl(PR_GET_NO_NEW_PRIVS)", SYS_prctl, &[PR_GET_NO_NEW_PRIVS as u64], Success),
            // Terminal injection, also with a high bit the kernel ignores.
            probe("ioctl(TIOCSTI)", SYS_ioctl, &[BAD_FD, TIOCSTI, NULL], Rule(EPERM)),
            probe("ioctl(TIOCSTI | 1<<32)", SYS_ioctl, &[BAD_FD, HIGH_BIT | TIOCSTI, NULL], Rule(EPERM)),
            probe("ioctl(TIOCLINUX)", SYS_ioctl, &[BAD_FD, TIOCLINUX, NULL], Rule(EPERM)),
            // Namespaces (one probe per flag is added below).
            probe("unshare(CLONE_NEWUSER | 1<<32)", SYS_unshare, &[HIGH_BIT | CLONE_NEWUSER as u64], Rule(EPERM)),
            probe("clone3", SYS_clone3, &[NULL, 0], Rule(ENOSYS)),
            probe("setns", SYS_setns, &[BAD_FD, 0], Rule(EPERM)),
            // Mounts.
            probe("mount", SYS_mount, &[NULL; 5], Rule(EPERM)),
            probe("umount2", SYS_umount2, &[NULL, 0], Rule(EPERM)),
            probe("pivot_root", SYS_pivot_root, &[NULL, NULL], Rule(EPERM)),
            probe("move_mount", SYS_move_mount, &[BAD_FD, NULL, BAD_FD, NULL, 0], Rule(EPERM)),
            probe("open_tree", SYS_open_tree, &[BAD_FD, NULL, 0], Rule(EPERM)),
            probe("open_tree_attr", nr::SYS_open_tree_attr, &[BAD_FD, NULL, 0, NULL, 0], Rule(EPERM)),
            probe("fsopen", SYS_fsopen, &[NULL, 0], Rule(EPERM)),
            probe("fsconfig", SYS_fsconfig, &[BAD_FD, 0, NULL, NULL, 0], Rule(EPERM)),
            probe("fsmount", SYS_fsmount, &[BAD_FD, 0, 0], Rule(EPERM)),
            probe("fspick", SYS_fspick, &[BAD_FD, NULL, 0], Rule(EPERM)),
            probe("mount_setattr", SYS_mount_setattr, &[BAD_FD, NULL, 0, NULL, 0], Rule(EPERM)),
            // Kernel images and modules: invalid flags and segment counts, null names.
            probe("kexec_load", SYS_kexec_load, &[0, u64::MAX, NULL, 0x8000], Rule(EPERM)),
            probe("kexec_file_load", SYS_kexec_file_load, &[BAD_FD, BAD_FD, 0, NULL, 0x4000_0000], Rule(EPERM)),
            probe("init_module", SYS_init_module, &[NULL, 0, NULL], Rule(EPERM)),
            probe("finit_module", SYS_finit_module, &[BAD_FD, NULL, 0], Rule(EPERM)),
            probe("delete_module", SYS_delete_module, &[NULL, 0], Rule(EPERM)),
            // Attack surface: invalid commands and flags, null pointers, bad fds.
            probe("bpf", SYS_bpf, &[0xffff_ffff, NULL, 0], Rule(EPERM)),
            probe("perf_event_open", SYS_perf_event_open, &[NULL, 0, BAD_FD, BAD_FD, 0], Rule(EPERM)),
            probe("userfaultfd", SYS_userfaultfd, &[0xffff_ffff], Rule(EPERM)),
            probe("fanotify_init", SYS_fanotify_init, &[0xffff_ffff, 0], Rule(EPERM)),
            probe("io_uring_setup", SYS_io_uring_setup, &[0, NULL], Rule(EPERM)),
            probe("io_uring_enter", SYS_io_uring_enter, &[BAD_FD, 0, 0, 0, NULL, 0], Rule(EPERM)),
            probe("io_uring_register", SYS_io_uring_register, &[BAD_FD, 0, NULL, 0], Rule(EPERM)),
            probe("add_key", SYS_add_key, &[NULL, NULL, NULL, 0, 0], Rule(EPERM)),
            probe("request_key", SYS_request_key, &[NULL, NULL, NULL, 0], Rule(EPERM)),
            probe("keyctl", SYS_keyctl, &[0xffff_ffff], Rule(EPERM)),
            probe("open_by_handle_at", SYS_open_by_handle_at, &[BAD_FD, NULL, 0], Rule(EPERM)),
            probe("name_to_handle_at", SYS_name_to_handle_at, &[BAD_FD, NULL, NULL, NULL, 0], Rule(EPERM)),
            // Host-wide state: wrong magic, null pointers, read-only or no-op forms.
            probe("reboot", SYS_reboot, &[0, 0, 0, NULL], Rule(EPERM)),
            probe("swapon", SYS_swapon, &[NULL, 0], Rule(EPERM)),
            probe("swapoff", SYS_swapoff, &[NULL], Rule(EPERM)),
            probe("settimeofday(NULL, NULL)", SYS_settimeofday, &[NULL, NULL], Rule(EPERM)),
            probe("clock_settime", SYS_clock_settime, &[CLOCK_REALTIME as u64, NULL], Rule(EPERM)),
            probe("clock_adjtime", SYS_clock_adjtime, &[CLOCK_REALTIME as u64, NULL], Rule(EPERM)),
            probe("adjtimex", SYS_adjtimex, &[NULL], Rule(EPERM)),
            probe("syslog(SIZE_BUFFER)", SYS_syslog, &[10, NULL, 0], Rule(EPERM)),
            probe("acct(\"\")", SYS_acct, &[empty], Rule(EPERM)),
            probe("quotactl", SYS_quotactl, &[0, NULL, 0, NULL], Rule(EPERM)),
            probe("quotactl_fd", SYS_quotactl_fd, &[BAD_FD, 0, 0, NULL], Rule(EPERM)),
            probe("lookup_dcookie", SYS_lookup_dcookie, &[0, NULL, 0], Rule(EPERM)),
            // The child has no controlling terminal (setsid): a no-op even unfiltered.
            probe("vhangup", SYS_vhangup, &[], Rule(EPERM)),
        ];
        for (unshare, clone, flag) in NAMESPACES {
            table.push(probe(unshare, SYS_unshare, &[flag as u64], Rule(EPERM)));
            if let Some(clone) = clone {
                table.push(probe(
                    clone,
                    SYS_clone,
                    &[no_fork | flag as u64],
                    Rule(EPERM),
                ));
            }
        }
        #[cfg(target_arch = "x86_64")]
        #[rustfmt::skip]
        table.extend([
            // Level 0 and no ports: no-ops were the filter missing.
            probe("iopl(0)", SYS_iopl, &[0], Rule(EPERM)),
            probe("ioperm(0, 0, 0)", SYS_ioperm, &[0, 0, 0], Rule(EPERM)),
            probe("uselib", SYS_uselib, &[NULL], Rule(EPERM)),
            probe("x32 getpid", 0x4000_0000 | SYS_getpid, &[], Prelude(ENOSYS)),
            probe("x32 mount", 0x4000_0000 | SYS_mount, &[NULL; 5], Prelude(ENOSYS)),
        ]);
        table
    }

    /// Installs `rules` in a forked child, runs every probe there and checks the errnos.
    fn check_probes(rules: &[Rule], mark: i32) {
        let program = compile(rules).unwrap();
        let (_keep_pipe_open, pipe) = io::pipe().unwrap();
        let probes = probes(pipe.as_raw_fd());
        let (mut results, results_out) = io::pipe().unwrap();
        assert!(
            probes.len() * 4 < libc::PIPE_BUF,
            "results must fit the pipe without a reader"
        );
        let child = || {
            if program.install().is_err() {
                return INSTALL_FAILED;
            }
            let mut out = &results_out;
            for probe in &probes {
                // SAFETY: probes pass null or invalid pointers, or pointers to static data of
                // the right shape (see probes()), and this is a throwaway child.
                let errno = unsafe { testing::syscall6(probe.nr, probe.args) }
                    .err()
                    .unwrap_or(0);
                if out.write_all(&errno.to_ne_bytes()).is_err() {
                    return WRITE_FAILED;
                }
            }
            0
        };
        // SAFETY: the child installs the precompiled program, makes raw system calls and writes
        // to a pipe: no allocation, no locks, no panics.
        let exit = unsafe { testing::fork_and_wait(child) }.unwrap();
        drop(results_out);
        let mut bytes = Vec::new();
        results.read_to_end(&mut bytes).unwrap();
        let seen: Vec<i32> = bytes
            .chunks_exact(4)
            .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
            .collect();
        let describe = |errno: i32| match errno {
            0 => "success".to_owned(),
            errno => format!("errno {errno} ({})", io::Error::from_raw_os_error(errno)),
        };
        let failures: Vec<String> = probes
            .iter()
            .enumerate()
            .filter_map(|(i, probe)| {
                let want = probe.expect.errno(mark);
                match seen.get(i) {
                    Some(&got) if got == want => None,
                    Some(&got) => Some(format!(
                        "{}: want {}, got {}",
                        probe.name,
                        describe(want),
                        describe(got)
                    )),
                    None => Some(format!("{}: no result", probe.name)),
                }
            })
            .collect();
        assert_eq!(exit, Exit::Code(0), "probe child failed; {failures:#?}");
        assert!(
            failures.is_empty(),
            "{} probes failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }

    #[test]
    fn calls_get_the_policy_errno() {
        check_probes(DEFAULT_POLICY, 0);
    }

    /// The same probes against the policy with every errno shifted by MARK: proves each denial
    /// comes from the filter, not from the kernel's own checks (kexec disabled, no capability).
    #[test]
    fn denials_come_from_the_filter_not_the_kernel() {
        let marked: Vec<Rule> = DEFAULT_POLICY
            .iter()
            .map(|rule| Rule {
                action: match rule.action {
                    Action::Errno(errno) => Action::Errno(errno + MARK),
                },
                ..*rule
            })
            .collect();
        check_probes(&marked, MARK);
    }

    #[test]
    fn fork_still_works_under_the_filter() {
        let program = compile(DEFAULT_POLICY).unwrap();
        let child = || {
            if program.install().is_err() {
                return INSTALL_FAILED;
            }
            // SAFETY: the grandchild only returns a constant.
            match unsafe { testing::fork_and_wait(|| 7) } {
                Ok(Exit::Code(7)) => 0,
                Ok(_) => 1,
                Err(_) => 2,
            }
        };
        // SAFETY: the child installs the precompiled program, forks (glibc's fork: clone(2) with
        // SIGCHLD) and waits: all async-signal-safe.
        let exit = unsafe { testing::fork_and_wait(child) }.unwrap();
        assert_eq!(exit, Exit::Code(0));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn i386_calls_kill_the_process() {
        // SAFETY: the child makes one i386 getpid and exits.
        let control = unsafe { testing::fork_and_wait(|| u8::from(testing::i386_getpid() <= 0)) };
        let control = control.unwrap();
        if control != Exit::Code(0) {
            eprintln!("skipped: this kernel runs no i386 system calls ({control:?})");
            return;
        }
        let program = compile(DEFAULT_POLICY).unwrap();
        let child = || {
            if program.install().is_err() {
                return INSTALL_FAILED;
            }
            // SAFETY: a throwaway child; the filter is expected to kill it here.
            unsafe { testing::i386_getpid() };
            0
        };
        // SAFETY: the child installs the precompiled program and makes one i386 call.
        let exit = unsafe { testing::fork_and_wait(child) }.unwrap();
        assert_eq!(exit, Exit::Signal(libc::SIGSYS));
    }

    /// Set in the re-executed test binary's environment.
    const PROBE_ENV: &str = "COVE_SECCOMP_PROBE";
    /// Exit code of a probe that passed (0 would also mean "no test matched").
    const PROBE_OK: i32 = 42;

    /// Threads need clone3's fallback to clone(2), and spawning uses clone or vfork: runs this
    /// test binary under the filter (installed before execve, like the jail does) with
    /// `filtered_process_probe` as its only test.
    #[test]
    fn threads_and_spawn_work_under_the_filter() {
        let program = compile(DEFAULT_POLICY).unwrap();
        let module = module_path!().split_once("::").unwrap().1;
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", &format!("{module}::filtered_process_probe")])
            .args(["--ignored", "--nocapture"])
            .env(PROBE_ENV, "1");
        // SAFETY: the closure runs between fork and execve: install makes two system calls on
        // the precompiled program and errno_of builds an io::Error without allocating.
        unsafe { cmd.pre_exec(move || program.install().map_err(|e| errno_of(&e))) };
        let out = cmd.output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(PROBE_OK),
            "{}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    #[ignore = "run under the filter by threads_and_spawn_work_under_the_filter"]
    fn filtered_process_probe() {
        if std::env::var_os(PROBE_ENV).is_none() {
            return;
        }
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(
            status.lines().any(|l| l == "Seccomp:\t2"),
            "not filtered:\n{status}"
        );
        assert!(status.lines().any(|l| l == "NoNewPrivs:\t1"), "{status}");
        assert_eq!(std::thread::spawn(|| 7).join().unwrap(), 7);
        assert!(Command::new("/bin/true").status().unwrap().success());
        std::process::exit(PROBE_OK);
    }

    /// The errno inside an install error, as an io::Error that needs no allocation.
    fn errno_of(err: &SeccompError) -> io::Error {
        let errno = match err {
            SeccompError::NoNewPrivs { source } | SeccompError::Install { source, .. } => {
                source.raw_os_error()
            }
            _ => None,
        };
        io::Error::from_raw_os_error(errno.unwrap_or(libc::EINVAL))
    }
}
