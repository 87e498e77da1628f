//! The sandbox side of the containment pipeline: everything the cloned child does, in order,
//! until the command is executing. The child becomes the sandbox's pid 1 ("init"): it reaps
//! zombies, forwards the supervisor's signals to the command, and reports how the command ended.
//!
//! The order of [`contain`] and [`exec_command`] is the order of `docs/jail.md`; each step is one
//! line so that the code reads as the recipe.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use crate::rootfs::{self, RootPlan};
use crate::seccomp::Program;
use crate::sys::{self, SigSet};

/// Capability number of CAP_KILL: the only capability init keeps (to forward signals to a
/// command running under another uid).
const CAP_KILL: u32 = 5;

/// Everything the child needs, prepared by the supervisor before the clone so that the child
/// does no parsing and no policy decisions.
#[derive(Clone)]
pub(crate) struct ChildPlan {
    pub id: String,
    pub root: RootPlan,
    pub uid: u32,
    pub gid: u32,
    /// What it runs (all a warm sandbox's claim decides).
    pub command: Command,
    pub seccomp: Program,
    pub cap_last: u32,
    /// Give the command a terminal.
    pub tty: bool,
    pub timing: bool,
    /// Tell the supervisor (`R`) once the command runs: only for a detached sandbox, which is
    /// on its own from then on (its caller says it runs once it has recorded it), so a plain
    /// `cove run` pays nothing for it.
    pub report_started: bool,
    /// The command dies with the process that forked it: for exec, whose parent is a helper
    /// outside the sandbox (the main command's parent is init, which outlives it anyway).
    pub die_with_parent: bool,
    /// Init leaves the sandbox's cgroup once the command has been reaped, before it exits:
    /// the supervisor then removes the cgroup while init's namespaces are torn down (see
    /// [`join_cgroup`]). The supervisor sends the files for that after the joining ones.
    pub leave_cgroup: bool,
}

/// The descriptors the child keeps.
pub(crate) struct ChildFds {
    /// Read end of the supervisor's "go" pipe; it reads EOF if the supervisor dies.
    pub go: OwnedFd,
    /// Write end of the status pipe to the supervisor.
    pub status: OwnedFd,
    /// The resident init program ([`resident_init`]), if this target has one.
    pub init_exe: Option<OwnedFd>,
    /// The child's end of a socket on which the supervisor sends the sandbox's cgroup, as
    /// open files to write `0` to (see [`join_cgroup`]).
    pub cgroup: OwnedFd,
    /// Set for a detached sandbox (`run::start_detached`).
    pub detached: Option<Detached>,
    /// Set for a warm sandbox (`RunOptions::warm`): once in its cgroup, the child says `C` on
    /// the status pipe and waits here for its command ([`encode_claim`]), which the plan it
    /// was cloned with does not have yet.
    pub claim: Option<OwnedFd>,
}

/// A detached sandbox's descriptors (numbers valid in the child: the clone copied them).
pub(crate) struct Detached {
    /// Where the command's end is reported, instead of the status pipe.
    pub status: RawFd,
    /// Held open (across the resident init's exec) for the sandbox's life.
    pub keep: Vec<RawFd>,
}

/// The resident init (`init/main.rs`, built by the build script; empty where it does not
/// exist for the target).
pub(crate) static RESIDENT_INIT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/cove-init"));

/// The resident init, for [`ChildFds::init_exe`]: the file `shared` if given (a copy of
/// [`RESIDENT_INIT`] that many sandboxes map, so that its pages are in memory once), else a
/// sealed memory file of its own (a few microseconds); `None` where the target has none.
pub(crate) fn resident_init(shared: Option<&std::path::Path>) -> std::io::Result<Option<OwnedFd>> {
    if RESIDENT_INIT.is_empty() {
        return Ok(None);
    }
    if let Some(path) = shared {
        return File::open(path)
            .map(|f| Some(f.into()))
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())));
    }
    sys::sealed_memfd(c"cove-init", RESIDENT_INIT).map(Some)
}

/// Writes [`RESIDENT_INIT`] as `dir/cove-init-<size>-<checksum>` (read-only, executable; made
/// once, atomically) and returns its path, for [`crate::run::RunOptions::init_file`]; `None`
/// where the target has none.
pub fn install_resident_init(dir: &std::path::Path) -> std::io::Result<Option<PathBuf>> {
    use std::os::unix::fs::PermissionsExt;
    if RESIDENT_INIT.is_empty() {
        return Ok(None);
    }
    // FNV-1a: a name that changes with the content, not a security check (the directory is
    // root's).
    let sum = RESIDENT_INIT
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
    let path = dir.join(format!("cove-init-{}-{sum:016x}", RESIDENT_INIT.len()));
    if std::fs::read(&path).is_ok_and(|b| b == RESIDENT_INIT) {
        return Ok(Some(path));
    }
    let tmp = dir.join(format!(".cove-init-{}", std::process::id()));
    std::fs::write(&tmp, RESIDENT_INIT)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o555))?;
    std::fs::rename(&tmp, &path)?;
    Ok(Some(path))
}

/// A failed step: which one, and why.
struct Failure {
    step: &'static str,
    message: String,
}

trait Step<T> {
    fn step(self, step: &'static str) -> Result<T, Failure>;
}

impl<T, E: std::error::Error> Step<T> for Result<T, E> {
    fn step(self, step: &'static str) -> Result<T, Failure> {
        self.map_err(|e| {
            let mut message = e.to_string();
            let mut src = e.source();
            while let Some(s) = src {
                message.push_str(": ");
                message.push_str(&s.to_string());
                src = s.source();
            }
            Failure { step, message }
        })
    }
}

/// Entry point of the cloned child. Never returns.
pub(crate) fn child_main(plan: &ChildPlan, fds: ChildFds) -> ! {
    let status = fds.status.as_raw_fd();
    match contain(plan, &fds) {
        Ok(never) => match never {},
        Err(f) => {
            let msg = format!("E {}\t{}\n", f.step, f.message.replace('\n', " "));
            let _ = sys::write_all(status, msg.as_bytes());
            sys::exit(125)
        }
    }
}

enum Never {}

struct Clock {
    on: bool,
    marks: Vec<(&'static str, u64)>,
}

impl Clock {
    fn mark(&mut self, name: &'static str) {
        if self.on {
            self.marks.push((name, sys::monotonic_ns()));
        }
    }
}

/// The containment pipeline, sandbox side, in the order of `docs/jail.md`.
fn contain(plan: &ChildPlan, fds: &ChildFds) -> Result<Never, Failure> {
    let mut clock = Clock {
        on: plan.timing,
        marks: Vec::new(),
    };
    clock.mark("child_start");
    wait_for_supervisor(&fds.go).step("wait for the supervisor")?;
    sys::set_ids(0, 0).step("become root of the user namespace")?;
    die_with_supervisor(&fds.go).step("tie the sandbox's life to the supervisor")?;
    sys::sethostname(&plan.root.hostname).step("set the hostname")?;
    clock.mark("namespaces");
    // The supervisor writes the network namespace's settings through this directory of the
    // sandbox's own procfs (see `netns::write_sysctls`), then sends the cgroup.
    rootfs::enter(&plan.root, |ipv4| {
        sys::send_fds(fds.cgroup.as_raw_fd(), &[ipv4.as_raw_fd()])
    })
    .step("build the root filesystem")?;
    clock.mark("rootfs");
    let leave = join_cgroup(&fds.cgroup, plan.leave_cgroup).step("join the sandbox's cgroup")?;
    sys::unshare(libc::CLONE_NEWCGROUP).step("enter a new cgroup namespace")?;
    clock.mark("cgroup");
    // Named before a warm sandbox waits: its waiting child is found by its id as init is.
    sys::set_name(&format!("cove-{}", plan.id)).step("name the init process")?;
    let claimed;
    let plan = match &fds.claim {
        Some(claim) => {
            // What does not depend on the claim is done before it, off a create's way: init's
            // bounding set and the seccomp filter (which the kernel checks and compiles).
            lock_down(plan)?;
            // The supervisor hands the sandbox over and exits (see `run::start_warm`): from
            // here on the end of the claim pipe is what ends an unclaimed sandbox.
            sys::set_parent_death_signal(0).step("untie the sandbox from the supervisor")?;
            sys::write_all(fds.status.as_raw_fd(), b"C\n").step("say the sandbox is warm")?;
            claimed = wait_for_claim(claim, plan).step("wait for the sandbox's command")?;
            &claimed
        }
        None => plan,
    };
    let tty = if plan.tty {
        Some(terminal(fds).step("open the sandbox's terminal")?)
    } else {
        None
    };
    sys::set_dumpable(false).step("make init non-dumpable")?;
    let keep = [fds.status.as_raw_fd()]
        .into_iter()
        .chain(tty.as_ref().map(|t| t.as_raw_fd()))
        .chain(fds.init_exe.as_ref().map(|f| f.as_raw_fd()))
        .chain(leave.iter().map(|f| f.as_raw_fd()))
        .chain(
            fds.detached
                .iter()
                .flat_map(|d| d.keep.iter().copied().chain([d.status])),
        )
        .collect::<Vec<_>>();
    sys::close_fds_except(&keep).step("close inherited descriptors")?;
    let locked_down = fds.claim.is_some();
    init(plan, fds, tty.as_ref(), &leave, locked_down, clock)
}

/// Opens a terminal on the sandbox's own devpts (so that `tty` and `/dev/pts/0` mean something
/// inside) and lets the supervisor take a copy of the master side: "P <fd>" on the status pipe,
/// then wait for its acknowledgement on the "go" pipe. Returns the slave side, for the command.
fn terminal(fds: &ChildFds) -> std::io::Result<OwnedFd> {
    let (master, slave) = sys::openpty_at("/dev/ptmx")?;
    let line = format!("P {}\n", master.as_raw_fd());
    sys::write_all(fds.status.as_raw_fd(), line.as_bytes())?;
    wait_for_supervisor(&fds.go)?;
    drop(master);
    Ok(slave)
}

/// The child moves itself into the sandbox's cgroup, which the supervisor made while the
/// child built its root filesystem (so that the two overlap). The supervisor sends the files
/// to write `0` to (`Cgroup::self_join_files`), opened by it: the kernel checks a cgroup
/// migration against the credentials the file was opened with (host root), not the child's,
/// which are root of the sandbox's user namespace by now. Before this, the child is Cove's own
/// code only: the command is forked after.
///
/// With `leave_after` ([`ChildPlan::leave_cgroup`]) the supervisor sends as many files again,
/// its parent's: returned, for init to move itself out once the command has been reaped (the
/// same self-move, cheap on v1). The cgroup is then empty while init's exit tears down its
/// namespaces, and the supervisor removes it meanwhile, not after.
fn join_cgroup(sock: &OwnedFd, leave_after: bool) -> std::io::Result<Vec<OwnedFd>> {
    let mut files = sys::recv_fds(sock.as_raw_fd()).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            std::io::Error::other("the supervisor went away")
        } else {
            e
        }
    })?;
    if files.is_empty() || (leave_after && files.len() % 2 != 0) {
        return Err(std::io::Error::other(format!(
            "the supervisor sent {} cgroup files",
            files.len()
        )));
    }
    let leave = if leave_after {
        files.split_off(files.len() / 2)
    } else {
        Vec::new()
    };
    for f in &files {
        sys::write_all(f.as_raw_fd(), b"0")?;
    }
    Ok(leave)
}

/// Moves init out of the sandbox's cgroup (see [`join_cgroup`]); false if there is nothing to
/// leave by or a move failed (the supervisor then removes the cgroup after init's exit).
fn leave_cgroup(files: &[OwnedFd]) -> bool {
    !files.is_empty()
        && files
            .iter()
            .all(|f| sys::write_all(f.as_raw_fd(), b"0").is_ok())
}

/// The parts of a plan a warm sandbox's claim decides, in the order [`decode_claim`] reads
/// them: each a string ended by a NUL (none of them can hold one), lists after their length.
/// Everything the root filesystem depends on (image, disk, binds, user, hostname) was fixed
/// when the sandbox was started warm; a claim comes only for a spec that agrees
/// (`run::fits_warm`).
pub(crate) fn encode_claim(command: &Command) -> Vec<u8> {
    let mut out = Vec::new();
    let mut field = |bytes: &[u8]| {
        out.extend_from_slice(bytes);
        out.push(0);
    };
    for list in [&command.argv, &command.envp] {
        field(list.len().to_string().as_bytes());
        for s in list {
            field(s.as_bytes());
        }
    }
    field(command.search_path.len().to_string().as_bytes());
    for d in &command.search_path {
        field(d.as_os_str().as_encoded_bytes());
    }
    field(command.workdir.as_os_str().as_encoded_bytes());
    field(command.rlimits.len().to_string().as_bytes());
    for (res, soft, hard) in &command.rlimits {
        for n in [u64::from(*res), *soft, *hard] {
            field(n.to_string().as_bytes());
        }
    }
    out
}

/// What a plan runs: the parts of it a warm sandbox's claim decides ([`encode_claim`]).
#[derive(Debug, Clone)]
pub(crate) struct Command {
    pub argv: Vec<CString>,
    pub envp: Vec<CString>,
    /// Directories searched for a command without a slash (from the spec's `PATH`).
    pub search_path: Vec<PathBuf>,
    pub workdir: PathBuf,
    /// (resource, soft, hard).
    pub rlimits: Vec<(libc::__rlimit_resource_t, u64, u64)>,
}

/// `warm` with the parts [`encode_claim`] wrote in `bytes` in place of its own.
pub(crate) fn decode_claim(bytes: &[u8], warm: &ChildPlan) -> std::io::Result<ChildPlan> {
    use std::os::unix::ffi::OsStrExt;
    fn bad() -> std::io::Error {
        std::io::Error::other("the claim sent a malformed command")
    }
    fn number(field: &[u8]) -> Option<u64> {
        std::str::from_utf8(field).ok()?.parse().ok()
    }
    fn strings<'a>(
        take: &mut impl FnMut() -> std::io::Result<&'a [u8]>,
    ) -> std::io::Result<Vec<CString>> {
        let n = number(take()?).ok_or_else(bad)?;
        (0..n)
            .map(|_| CString::new(take()?).map_err(|_| bad()))
            .collect()
    }
    let body = bytes.strip_suffix(&[0]).ok_or_else(bad)?;
    let mut fields = body.split(|&b| b == 0);
    let mut take = || fields.next().ok_or_else(bad);
    let argv = strings(&mut take)?;
    let envp = strings(&mut take)?;
    let path = |b: &[u8]| PathBuf::from(std::ffi::OsStr::from_bytes(b));
    let search_path = strings(&mut take)?
        .iter()
        .map(|s| path(s.as_bytes()))
        .collect();
    let workdir = path(take()?);
    let n = number(take()?).ok_or_else(bad)?;
    let rlimits = (0..n)
        .map(|_| {
            let mut n = || take().ok().and_then(number).ok_or_else(bad);
            let res = libc::__rlimit_resource_t::try_from(n()?).map_err(|_| bad())?;
            Ok((res, n()?, n()?))
        })
        .collect::<std::io::Result<_>>()?;
    if argv.is_empty() || take().is_ok() {
        return Err(bad());
    }
    let mut plan = warm.clone();
    plan.command = Command {
        argv,
        envp,
        search_path,
        workdir,
        rlimits,
    };
    Ok(plan)
}

/// Waits for a warm sandbox's command (the whole of what its claimer writes before it
/// closes its end); `plan` with it.
fn wait_for_claim(claim: &OwnedFd, plan: &ChildPlan) -> std::io::Result<ChildPlan> {
    let mut bytes = Vec::new();
    File::from(claim.try_clone()?).read_to_end(&mut bytes)?;
    if bytes.is_empty() {
        return Err(std::io::Error::other("no command came"));
    }
    decode_claim(&bytes, plan)
}

fn wait_for_supervisor(go: &OwnedFd) -> std::io::Result<()> {
    let mut b = [0u8; 1];
    let n = sys::read(go.as_raw_fd(), &mut b)?;
    if n == 1 {
        Ok(())
    } else {
        Err(std::io::Error::other("the supervisor went away"))
    }
}

/// The parent-death signal is reset by the credential change above, so it is set afterwards;
/// the "go" pipe then tells whether the supervisor died before it took effect.
fn die_with_supervisor(go: &OwnedFd) -> std::io::Result<()> {
    sys::set_parent_death_signal(libc::SIGKILL)?;
    let revents = sys::poll(&[(go.as_raw_fd(), libc::POLLIN)], 0)?;
    if revents[0] & (libc::POLLHUP | libc::POLLERR) != 0 {
        return Err(std::io::Error::other("the supervisor went away"));
    }
    Ok(())
}

/// Signals init passes on to the command when they come from outside the sandbox.
const FORWARDED: &[libc::c_int] = &[
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGCONT,
    libc::SIGTSTP,
];

/// Init: forks the command, drops its own privileges, then reaps and forwards signals until
/// the command ends. Its descriptors stay owned by [`child_main`] (so that a failure can still
/// be reported); the "go" descriptor was closed by the caller, the value is never used again.
fn init(
    plan: &ChildPlan,
    fds: &ChildFds,
    tty: Option<&OwnedFd>,
    leave: &[OwnedFd],
    locked_down: bool,
    mut clock: Clock,
) -> Result<Never, Failure> {
    let pipe_fd = fds.status.as_raw_fd();
    let send = |line: String| {
        let _ = sys::write_all(pipe_fd, line.as_bytes());
    };
    let all = SigSet::full();
    all.block().step("block signals in init")?;
    let (exec_r, exec_w) = sys::pipe().step("create the exec-status pipe")?;
    if !locked_down {
        lock_down(plan)?;
    }
    clock.mark("init_ready");
    // The command borrows init's memory until its `execve` (no copy of init's address space,
    // which is the supervisor's).
    let pid = spawn_command(&exec_r, &exec_w, |w| {
        exec_command(plan, tty, w, Filter::Inherited)
    })
    .step("start the command")?;
    drop(exec_w);
    let mut msg = String::new();
    let _ = File::from(exec_r).read_to_string(&mut msg);
    clock.mark("exec");
    drop_effective_caps().step("drop init's capabilities")?;
    if clock.on {
        let t0 = clock.marks.first().map_or(0, |m| m.1);
        let line: Vec<String> = clock
            .marks
            .iter()
            .map(|(n, t)| format!("{n}={}", (t - t0) / 1000))
            .collect();
        send(format!("T {}\n", line.join(" ")));
    }
    if let Some((code, text)) = msg.split_once('\t') {
        let _ = sys::wait4(pid, 0);
        send(format!("X {code}\t{text}\n"));
        sys::exit(0);
    }
    // Detached, the sandbox outlives the supervisor once it has heard `R`, and the command's
    // end goes to a file.
    let mut status_fd = pipe_fd;
    if let Some(d) = &fds.detached {
        sys::set_parent_death_signal(0).step("untie the sandbox from the supervisor")?;
        for &fd in d.keep.iter().chain([&d.status]) {
            sys::keep_on_exec(fd).step("keep the sandbox's locks")?;
        }
        status_fd = d.status;
    }
    if plan.report_started {
        send("R\n".to_string());
    }
    let send = |line: String| {
        let _ = sys::write_all(status_fd, line.as_bytes());
    };
    // From here on init only waits. A command that is still running after a short while gets
    // the resident init, which does that in a few pages; one that ends sooner (a short job) is
    // reported at once, without that exec on its way. Should the exec fail, this process goes
    // on waiting itself.
    let resident_at = std::time::Instant::now() + RESIDENT_AFTER;
    let mut exe = fds.init_exe.as_ref();
    if exe.is_none() {
        sys::release_free_memory();
    }
    loop {
        let left = resident_at.saturating_duration_since(std::time::Instant::now());
        let Some((sig, sender, _)) = (match exe {
            Some(_) if left.is_zero() => None,
            Some(_) => all.wait_for(Some(left)).step("wait for signals")?,
            None => Some(all.wait().step("wait for signals")?),
        }) else {
            if let Some(exe) = exe.take() {
                let tied = fds.detached.is_none();
                let _ = become_resident(exe, status_fd, pid, &plan.id, tied, leave);
                sys::release_free_memory();
            }
            continue;
        };
        if sig == libc::SIGCHLD {
            while let Ok(Some((reaped, wstatus, usage))) = sys::wait4(-1, libc::WNOHANG) {
                if reaped == pid {
                    send(format!(
                        "W {wstatus} {} {} {}\n",
                        usage.utime_us, usage.stime_us, usage.maxrss_kib
                    ));
                    // "L": the cgroup no longer holds init (orphans of the command may still
                    // be in it; this exit kills them).
                    if leave_cgroup(leave) {
                        send("L\n".to_string());
                    }
                    sys::exit(0);
                }
            }
        } else if sender == 0 && FORWARDED.contains(&sig) {
            // Sender pid 0: the signal came from outside this pid namespace, i.e. from the
            // supervisor. Signals the sandbox sends to its own init are not passed on.
            let _ = sys::kill(pid, sig);
        }
    }
}

/// Init's bounding set, then the seccomp filter: once, for init and the command, which inherits
/// both (its last steps are calls the filter allows).
fn lock_down(plan: &ChildPlan) -> Result<(), Failure> {
    lock_down_init(plan).step("drop init's privileges")?;
    plan.seccomp.install().step("install the seccomp filter")
}

/// Replaces this process with the resident init (see `init/main.rs`), which goes on waiting
/// for `command` and reporting on `status_fd`, and leaves the cgroup by `leave` as this one
/// would. Its signal mask, pending signals (a SIGCHLD of a command that already ended) and
/// credentials carry over the exec. Returns only on failure.
fn become_resident(
    exe: &OwnedFd,
    status_fd: RawFd,
    command: libc::pid_t,
    id: &str,
    die_with_supervisor: bool,
    leave: &[OwnedFd],
) -> std::io::Result<Never> {
    sys::keep_on_exec(status_fd)?;
    // More than it takes would end it at once (125): then it does not leave, and the supervisor
    // removes the cgroup after its exit.
    let leave = if leave.is_empty() || leave.len() > RESIDENT_MAX_LEAVE {
        "-".to_string()
    } else {
        for f in leave {
            sys::keep_on_exec(f.as_raw_fd())?;
        }
        leave
            .iter()
            .map(|f| f.as_raw_fd().to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let argv = [
        format!("cove-{id}"),
        status_fd.to_string(),
        command.to_string(),
        if die_with_supervisor { "9" } else { "0" }.to_string(),
        leave,
    ]
    .map(|a| CString::new(a).expect("no NUL in numbers and ids"));
    Err(sys::execve_fd(exe.as_raw_fd(), &argv, &[]))
}

/// The most files the resident init leaves a cgroup by (`MAX_LEAVE` in `init/main.rs`).
const RESIDENT_MAX_LEAVE: usize = 8;

/// How long after the command's start init becomes the resident init.
const RESIDENT_AFTER: std::time::Duration = std::time::Duration::from_millis(20);

/// Before forking the command, init shrinks the bounding set to CAP_KILL: the command
/// inherits that, and init keeps its effective capabilities until the command has taken its own
/// last steps (ids, secure bits).
pub(crate) fn lock_down_init(plan: &ChildPlan) -> std::io::Result<()> {
    sys::drop_bounding_set(plan.cap_last, 1u64 << CAP_KILL)
}

/// Once the command runs, init keeps only CAP_KILL (to signal a command running as another
/// uid). It runs under the same seccomp filter as the command, installed before the fork.
fn drop_effective_caps() -> std::io::Result<()> {
    sys::capset(1u64 << CAP_KILL)?;
    sys::clear_ambient()
}

/// Starts a process that runs `child` with the write end of an exec-status pipe (`exec_r`,
/// `exec_w`), borrowing this process's memory until its `execve` or exit
/// (`sys::spawn_sharing_memory`). Nothing is moved out of memory this process reads afterwards:
/// the child closes its copy of the read end (its descriptor table is its own) and gets a
/// duplicate of the write end; this process still closes its own ends. `child`'s last steps
/// may allocate only what they leave behind.
pub(crate) fn spawn_command(
    exec_r: &OwnedFd,
    exec_w: &OwnedFd,
    child: impl FnOnce(OwnedFd) -> std::convert::Infallible,
) -> std::io::Result<libc::pid_t> {
    let exec_r_fd = exec_r.as_raw_fd();
    sys::spawn_sharing_memory(|| {
        let _ = sys::close(exec_r_fd);
        match exec_w.try_clone() {
            Ok(w) => match child(w) {},
            Err(_) => sys::exit(125),
        }
    })
}

/// Whether the command's process installs the seccomp filter itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Filter {
    /// Its parent, the sandbox's init, installed it before the fork: it is inherited. One
    /// installation (the kernel checks and compiles the program) fewer on the way to `execve`.
    Inherited,
    /// As its last step before `execve`: an exec's command, forked by a helper outside.
    Install,
}

/// The command's side, after init forked it: the last containment steps, then execve.
pub(crate) fn exec_command(
    plan: &ChildPlan,
    tty: Option<&OwnedFd>,
    exec_w: OwnedFd,
    filter: Filter,
) -> ! {
    let err = match prepare_command(plan, tty, filter) {
        Ok(path) => {
            let e = sys::execve(&path, &plan.command.argv, &plan.command.envp);
            let code = if e.raw_os_error() == Some(libc::ENOENT) {
                127
            } else {
                126
            };
            (
                code,
                format!(
                    "cannot execute {}: {e}",
                    plan.command.argv[0].to_string_lossy()
                ),
            )
        }
        // A command that is not there exits 127, as in a shell.
        Err(f) if f.step == STEP_FIND => (127, f.message),
        Err(f) => (125, format!("{}: {}", f.step, f.message)),
    };
    let mut w = File::from(exec_w);
    let _ = w.write_all(format!("{}\t{}", err.0, err.1.replace('\n', " ")).as_bytes());
    sys::exit(err.0)
}

fn prepare_command(
    plan: &ChildPlan,
    tty: Option<&OwnedFd>,
    filter: Filter,
) -> Result<CString, Failure> {
    contain_process(plan, tty)?;
    let path = resolve_command(plan)?;
    if filter == Filter::Install {
        plan.seccomp.install().step("install the seccomp filter")?;
    }
    Ok(path)
}

/// Runs `f` in this (forked) process contained exactly like a command, minus the `execve`:
/// for work Cove does inside a sandbox with the sandbox's own permissions (its file API).
/// A failed step is reported on `exec_w` as for a command; `exec_w` is closed before `f`.
pub(crate) fn run_contained(plan: &ChildPlan, exec_w: OwnedFd, f: impl FnOnce() -> i32) -> ! {
    let ready = contain_process(plan, None)
        .and_then(|()| plan.seccomp.install().step("install the seccomp filter"));
    if let Err(e) = ready {
        report_failure(exec_w, &format!("{}: {}", e.step, e.message));
    }
    drop(exec_w);
    sys::exit(f())
}

/// Cove's own failure before the command ran, on the exec-status pipe; exits 125.
pub(crate) fn report_failure(exec_w: OwnedFd, message: &str) -> ! {
    let mut w = File::from(exec_w);
    let _ = w.write_all(format!("125\t{}", message.replace('\n', " ")).as_bytes());
    sys::exit(125)
}

/// Every last step of a command but the lookup and the filter.
fn contain_process(plan: &ChildPlan, tty: Option<&OwnedFd>) -> Result<(), Failure> {
    SigSet::empty().set_mask().step("restore the signal mask")?;
    sys::reset_signal_dispositions();
    sys::setsid().step("start a new session")?;
    if let Some(t) = tty {
        attach_tty(t.as_raw_fd()).step("attach the terminal")?;
    }
    std::env::set_current_dir(&plan.command.workdir).map_err(|e| Failure {
        step: "enter the working directory",
        message: format!("{}: {e}", plan.command.workdir.display()),
    })?;
    for &(res, soft, hard) in &plan.command.rlimits {
        sys::setrlimit(res, soft, hard).step("set resource limits")?;
    }
    sys::drop_bounding_set(CAP_KILL, 0).step("drop the capability bounding set")?;
    sys::lock_securebits().step("lock the secure bits")?;
    sys::setgroups(&[plan.gid]).step("set supplementary groups")?;
    sys::set_ids(plan.uid, plan.gid).step("switch to the sandbox user")?;
    if plan.die_with_parent {
        // After the id change, which clears a parent-death signal.
        sys::set_parent_death_signal(libc::SIGKILL).step("tie the command to its parent")?;
    }
    sys::capset(0).step("drop all capabilities")?;
    sys::clear_ambient().step("clear ambient capabilities")?;
    sys::close_range(3, true).step("close inherited descriptors")?;
    sys::set_no_new_privs().step("set no_new_privs")
}

fn attach_tty(fd: RawFd) -> std::io::Result<()> {
    sys::set_controlling_tty(fd)?;
    for target in 0..3 {
        sys::dup2(fd, target)?;
    }
    Ok(())
}

const STEP_FIND: &str = "find the command";

/// `execvp`-style lookup in the sandbox's own filesystem and `PATH`.
fn resolve_command(plan: &ChildPlan) -> Result<CString, Failure> {
    let name = plan.command.argv[0].to_string_lossy().into_owned();
    let not_found = || Failure {
        step: STEP_FIND,
        message: format!("{name}: not found in PATH"),
    };
    if name.contains('/') {
        return Ok(plan.command.argv[0].clone());
    }
    for dir in &plan.command.search_path {
        let candidate = dir.join(&name);
        if let Ok(meta) = std::fs::metadata(&candidate)
            && meta.is_file()
        {
            return CString::new(candidate.into_os_string().into_encoded_bytes())
                .map_err(|_| not_found());
        }
    }
    Err(not_found())
}
