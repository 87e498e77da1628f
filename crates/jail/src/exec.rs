//! Running another command inside a running sandbox (`exec`), contained exactly like its main
//! command.
//!
//! Called from a single-threaded process (joining a user namespace requires it), with the
//! stdio the command should have. The steps, in order:
//!
//! 1. **Find the sandbox's init**: among the pids of its cgroup, the one that is pid 1 of its
//!    own pid namespace (`NSpid: <host pid> 1`).
//! 2. **Join its cgroup** (still host root), so the command counts against the sandbox's
//!    memory, CPU and pids limits.
//! 3. **Join its namespaces** through `/proc/<init>/ns/*`: the network namespace first (it is
//!    owned by the host's user namespace, so joining it needs host privilege, which step 4
//!    gives up), then the user namespace, then IPC, UTS, cgroup and mount (which also moves the
//!    root to the sandbox's root), then pid (for the child about to be forked).
//! 4. **Become the sandbox's root** (uid 0 of its user namespace, an unprivileged id on the
//!    host) and non-dumpable.
//! 5. **Fork** the command's process, which takes **the same last steps as the main command**
//!    (the same code): new session, working directory, rlimits, empty bounding set, locked
//!    secure bits, the user's ids, no capabilities, descriptors above stderr closed,
//!    `no_new_privs`, the seccomp filter, `execve`. [`call`] takes the same steps and then runs
//!    Cove's own code instead of `execve` (the file API).
//! 6. The calling process waits for it and returns its exit code (128+N after signal N; 127 /
//!    126 when the command is missing or not executable, as a shell does).
//!
//! The exec'd process lives in the sandbox's pid namespace: if the caller dies, the sandbox's
//! init adopts and reaps it, and it dies with the sandbox.

use std::convert::Infallible as Never;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;

use cove_types::{EnvVar, SandboxId, Spec, User, frame};

use crate::cgroup::Hierarchy;
use crate::init::{self, ChildPlan, Filter};
use crate::run::{RunError, plan};
use crate::state;
use crate::sys;

/// What to run in a running sandbox.
#[derive(Debug, Clone, Default)]
pub struct ExecSpec {
    /// The command and its arguments.
    pub cmd: Vec<String>,
    /// Environment on top of the sandbox's own.
    pub env: Vec<EnvVar>,
    /// Working directory (default: the sandbox's).
    pub workdir: Option<PathBuf>,
    /// User (default: the sandbox's).
    pub user: Option<User>,
}

fn prep(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> RunError {
    let what = what.into();
    move |source| RunError::Prepare { what, source }
}

/// How an exec's command is wired to this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Io {
    /// The command takes this process's stdin, stdout and stderr.
    Inherit,
    /// This process's stdin carries frames ([`cove_types::frame`]) (input, end of input, window size, signals);
    /// the command's output goes to this process's stdout and stderr, or, with a terminal,
    /// all of it to stdout. The end of this process's stdin kills the command.
    Stream {
        /// Give the command a terminal of the sandbox's own devpts.
        tty: bool,
    },
}

/// Runs `exec` in the running sandbox `id`, started from `spec`, wired as `io` says. Returns
/// the command's exit code. This process must be single-threaded.
pub fn exec(spec: &Spec, id: &SandboxId, exec: &ExecSpec, io: Io) -> Result<i32, RunError> {
    let plan = enter(spec, id, exec)?;
    match io {
        Io::Inherit => run_child(&plan, Spawn::SharingMemory, |exec_w| {
            init::exec_command(&plan, None, exec_w, Filter::Install)
        }),
        Io::Stream { tty } => stream(&plan, tty),
    }
}

/// Runs `f` in a process inside the running sandbox `id`, as `user` (default: the sandbox's),
/// contained exactly like a command there (ids, no capabilities, rlimits, seccomp) but without
/// an `execve`: work done on a tenant's behalf, with the tenant's permissions. `f` has this
/// process's stdio; its return value is the exit code. This process must be single-threaded.
pub fn call(
    spec: &Spec,
    id: &SandboxId,
    user: Option<User>,
    f: impl FnOnce() -> i32,
) -> Result<i32, RunError> {
    let exec = ExecSpec {
        // Never executed; a plan needs a command.
        cmd: vec!["cove-call".into()],
        user,
        ..Default::default()
    };
    let plan = enter(spec, id, &exec)?;
    // Forked: Cove's file code runs there, for as long as it takes.
    run_child(&plan, Spawn::Fork, |exec_w| {
        init::run_contained(&plan, exec_w, f)
    })
}

/// Joins the sandbox (steps 1 to 3) and returns the plan of the command's process.
fn enter(spec: &Spec, id: &SandboxId, exec: &ExecSpec) -> Result<ChildPlan, RunError> {
    let mut spec = spec.clone();
    spec.cmd = exec.cmd.clone();
    for e in &exec.env {
        spec.env.retain(|s| s.key != e.key);
        spec.env.push(e.clone());
    }
    if let Some(w) = &exec.workdir {
        spec.workdir = Some(w.clone());
    }
    if let Some(u) = exec.user {
        spec.user = u;
    }
    spec.tty = false;
    spec.validate()?;
    let hierarchy = Hierarchy::detect()?;
    let cg = hierarchy.open(&state::cgroup_name(id));
    let init_pid = state::find_init(&cg.pids().map_err(|_| not_running(id))?)
        .ok_or_else(|| not_running(id))?;
    // The root filesystem, image and mounts are the sandbox's already: only the command's part
    // of the plan is used.
    let opts = crate::run::RunOptions {
        id: Some(*id),
        ..Default::default()
    };
    let mut plan = plan(&spec, id, PathBuf::new(), &opts)?;
    plan.die_with_parent = true;

    // Namespaces are opened before any is joined: /proc is the host's until the mount
    // namespace changes.
    let ns = |name: &str| {
        let path = format!("/proc/{init_pid}/ns/{name}");
        File::open(&path).map_err(|_| not_running(id))
    };
    let order = [
        ("net", libc::CLONE_NEWNET),
        ("user", libc::CLONE_NEWUSER),
        ("ipc", libc::CLONE_NEWIPC),
        ("uts", libc::CLONE_NEWUTS),
        ("cgroup", libc::CLONE_NEWCGROUP),
        ("mnt", libc::CLONE_NEWNS),
        ("pid", libc::CLONE_NEWPID),
    ];
    let fds = order
        .iter()
        .map(|(name, flag)| ns(name).map(|f| (*name, *flag, f)))
        .collect::<Result<Vec<_>, _>>()?;
    // Every controller the sandbox has (a `cove run` sandbox has no freezer).
    for file in cg.self_join_files().into_iter().filter(|f| f.exists()) {
        std::fs::write(&file, "0").map_err(prep(format!(
            "join the sandbox's cgroup ({})",
            file.display()
        )))?;
    }
    for (name, flag, fd) in &fds {
        sys::setns(fd.as_raw_fd(), *flag)
            .map_err(prep(format!("enter the sandbox's {name} namespace")))?;
    }
    drop(fds);
    // Root of the sandbox's user namespace (the host's root is not mapped into it), so that
    // what this process creates there (a terminal) belongs to the sandbox, and not
    // inspectable by the sandbox's processes while it holds capabilities there.
    sys::set_ids(0, 0).map_err(prep("become the sandbox's root"))?;
    sys::set_dumpable(false).map_err(prep("become the sandbox's root"))?;
    Ok(plan)
}

fn not_running(id: &SandboxId) -> RunError {
    RunError::Prepare {
        what: format!("sandbox {id} is not running"),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    }
}

/// Signals that stop an exec (the server's timeout, or its caller going away): the command's
/// whole process group is killed and reaped before this process exits, so nothing is orphaned.
const STOP_SIGNALS: &[libc::c_int] = &[libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD];

/// Waits for the command; a stop signal kills its process group (it leads one: `setsid`).
fn wait_or_stop(signals: &sys::SigSet, pid: libc::pid_t) -> Result<i32, RunError> {
    loop {
        if let Some((_, status, _)) =
            sys::wait4(pid, libc::WNOHANG).map_err(prep("wait for the command"))?
        {
            return Ok(status);
        }
        let (sig, _, _) = signals.wait().map_err(prep("wait for signals"))?;
        if sig != libc::SIGCHLD {
            let _ = sys::kill(-pid, libc::SIGKILL);
            let _ = sys::kill(pid, libc::SIGKILL);
        }
    }
}

/// Forks the command's process in the joined namespaces, runs `child` there, and waits for
/// it. `child` reports a failure before `execve` on the pipe it is given.
fn run_child(
    plan: &ChildPlan,
    how: Spawn,
    child: impl FnOnce(OwnedFd) -> Never,
) -> Result<i32, RunError> {
    let (pid, exec_r, signals) = fork_child(plan, how, child)?;
    let msg = read_exec_status(exec_r);
    let status = if msg.is_empty() {
        wait_or_stop(&signals, pid)?
    } else {
        reap(pid)
    };
    finish(&msg, status)
}

/// The forked process's first step: the bounding set shrinks to what init keeps, then the
/// command's own steps empty it, exactly as for the main command.
fn lock_down(plan: &ChildPlan, exec_w: OwnedFd, child: impl FnOnce(OwnedFd) -> Never) -> ! {
    if let Err(e) = init::lock_down_init(plan) {
        init::report_failure(exec_w, &format!("limit the capability bounding set: {e}"));
    }
    match child(exec_w) {}
}

/// How the command's process is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spawn {
    /// `sys::spawn_sharing_memory`: for a process that ends in `execve` (no copy of this
    /// process's address space; this process waits for the `execve` anyway).
    SharingMemory,
    /// A fork, for one that runs Cove's code to its end.
    Fork,
}

/// Starts the command's process, which runs `child` after its first step; returns its pid,
/// the read end of its exec-status pipe, and the stop signals (blocked here: taken
/// synchronously; the command restores an empty mask before `execve`).
fn fork_child(
    plan: &ChildPlan,
    how: Spawn,
    child: impl FnOnce(OwnedFd) -> Never,
) -> Result<(libc::pid_t, OwnedFd, sys::SigSet), RunError> {
    let (exec_r, exec_w) = sys::pipe().map_err(prep("create a pipe"))?;
    let signals = sys::SigSet::of(STOP_SIGNALS);
    signals.block().map_err(prep("block signals"))?;
    let pid = match how {
        Spawn::SharingMemory => {
            init::spawn_command(&exec_r, &exec_w, |w| lock_down(plan, w, child))
                .map_err(prep("start the command"))?
        }
        Spawn::Fork => {
            let pid = sys::fork().map_err(prep("fork the command"))?;
            if pid == 0 {
                drop(exec_r);
                lock_down(plan, exec_w, child);
            }
            pid
        }
    };
    drop(exec_w);
    Ok((pid, exec_r, signals))
}

/// What the command's process reported before `execve` (empty: it is running).
fn read_exec_status(exec_r: OwnedFd) -> String {
    let mut msg = String::new();
    let _ = File::from(exec_r).read_to_string(&mut msg);
    msg
}

fn reap(pid: libc::pid_t) -> i32 {
    sys::wait4(pid, 0).ok().flatten().map_or(0, |(_, s, _)| s)
}

/// The exit code, from the pre-`execve` report or the wait status.
fn finish(msg: &str, status: i32) -> Result<i32, RunError> {
    if let Some((code, text)) = msg.split_once('\t') {
        let code: i32 = code.parse().unwrap_or(125);
        if code == 125 {
            return Err(RunError::Setup {
                step: "exec".into(),
                message: text.to_string(),
            });
        }
        eprintln!("cove: {text}");
        return Ok(code);
    }
    Ok(if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        125
    })
}

/// [`Io::Stream`]: the command's stdin (a pipe, or a terminal) fed from the frames on this
/// process's stdin, and a terminal's output copied to stdout, in one `poll` loop that also
/// waits for the command.
fn stream(plan: &ChildPlan, tty: bool) -> Result<i32, RunError> {
    let (input, child_side) = if tty {
        let (master, slave) = sys::openpty_at("/dev/ptmx").map_err(prep("open a terminal"))?;
        (master, slave)
    } else {
        let (r, w) = sys::pipe().map_err(prep("create a pipe"))?;
        (w, r)
    };
    // The parent's side (`input`) is close-on-exec, and closed in the command by its last
    // steps anyway.
    let (pid, exec_r, signals) = fork_child(plan, Spawn::SharingMemory, |exec_w| {
        if tty {
            init::exec_command(plan, Some(&child_side), exec_w, Filter::Install)
        } else {
            if let Err(e) = sys::dup2(child_side.as_raw_fd(), 0) {
                init::report_failure(exec_w, &format!("connect stdin: {e}"));
            }
            init::exec_command(plan, None, exec_w, Filter::Install)
        }
    })?;
    drop(child_side);
    let msg = read_exec_status(exec_r);
    if !msg.is_empty() {
        return finish(&msg, reap(pid));
    }
    let sigfd = signals.signalfd().map_err(prep("watch signals"))?;
    sys::set_nonblocking(input.as_raw_fd()).map_err(prep("set up the command's input"))?;
    let mut relay = Relay {
        input: Some(input),
        tty,
        pid,
        frames: Vec::new(),
        pending: Vec::new(),
        stdin_open: true,
        close_pending: false,
        output_open: tty,
    };
    let mut status = None;
    let mut drain_until = None;
    loop {
        if let Some(s) = status {
            // Output still buffered in the terminal is copied; a background process that
            // keeps the terminal open does not hold the exec's end.
            let past = drain_until.is_some_and(|d| sys::monotonic_ns() >= d);
            if !relay.output_open || past {
                return finish("", s);
            }
        }
        let input_fd = relay.input.as_ref().map_or(-1, |f| f.as_raw_fd());
        let read_stdin = relay.stdin_open && relay.pending.len() < frame::MAX;
        let fds = [
            (if read_stdin { 0 } else { -1 }, libc::POLLIN),
            (
                if relay.pending.is_empty() {
                    -1
                } else {
                    input_fd
                },
                libc::POLLOUT,
            ),
            (if relay.output_open { input_fd } else { -1 }, libc::POLLIN),
            (sigfd.as_raw_fd(), libc::POLLIN),
        ];
        let timeout = if status.is_some() { 20 } else { -1 };
        let rev = sys::poll(&fds, timeout).map_err(prep("wait for input"))?;
        if rev[3] != 0 {
            while let Some(sig) = sys::read_signalfd(&sigfd).map_err(prep("read signals"))? {
                if sig as libc::c_int == libc::SIGCHLD {
                    if let Some((_, s, _)) =
                        sys::wait4(pid, libc::WNOHANG).map_err(prep("wait for the command"))?
                    {
                        status = Some(s);
                        drain_until = Some(sys::monotonic_ns() + 200_000_000);
                    }
                } else {
                    relay.kill();
                }
            }
        }
        if rev[0] != 0 {
            relay.read_frames();
        }
        if rev[1] != 0 {
            relay.write_pending();
        }
        if rev[2] != 0 {
            relay.copy_output();
        }
    }
}

/// The state of [`Io::Stream`]'s relay.
struct Relay {
    /// The command's input: the pipe's write end, or the terminal's master (which also
    /// carries the output). `None` once the input is closed (without a terminal).
    input: Option<OwnedFd>,
    tty: bool,
    pid: libc::pid_t,
    /// Bytes of stdin not yet forming a whole frame.
    frames: Vec<u8>,
    /// Input for the command not yet written.
    pending: Vec<u8>,
    stdin_open: bool,
    /// The input closes once `pending` is written.
    close_pending: bool,
    output_open: bool,
}

impl Relay {
    /// Kills the command's process group.
    fn kill(&self) {
        let _ = sys::kill(-self.pid, libc::SIGKILL);
        let _ = sys::kill(self.pid, libc::SIGKILL);
    }

    /// Reads stdin and applies the whole frames; its end (the caller is gone or done) kills
    /// the command.
    fn read_frames(&mut self) {
        let mut buf = vec![0u8; 64 * 1024];
        match sys::read(0, &mut buf) {
            Ok(0) | Err(_) => {
                self.stdin_open = false;
                self.kill();
                return;
            }
            Ok(n) => self.frames.extend_from_slice(&buf[..n]),
        }
        while self.frames.len() >= 5 {
            let (kind, len) = frame::header(self.frames[..5].try_into().expect("5 bytes"));
            if len > frame::MAX {
                self.stdin_open = false;
                self.kill();
                return;
            }
            if self.frames.len() < 5 + len {
                break;
            }
            let payload: Vec<u8> = self.frames.drain(..5 + len).skip(5).collect();
            self.apply(kind, &payload);
        }
    }

    fn apply(&mut self, kind: u8, payload: &[u8]) {
        match kind {
            frame::DATA if self.input.is_some() => self.pending.extend_from_slice(payload),
            frame::CLOSE => {
                if self.tty {
                    // The terminal stays (it carries the output): an end-of-file character
                    // ends a reading program's input, as Ctrl-D would.
                    self.pending.push(0x04);
                } else if self.pending.is_empty() {
                    self.input = None;
                } else {
                    // Closed once what is pending is written.
                    self.close_pending = true;
                }
            }
            frame::RESIZE if payload.len() == 4 => {
                if let Some(fd) = self.input.as_ref().filter(|_| self.tty) {
                    let ws = libc::winsize {
                        ws_row: u16::from_be_bytes([payload[0], payload[1]]),
                        ws_col: u16::from_be_bytes([payload[2], payload[3]]),
                        ws_xpixel: 0,
                        ws_ypixel: 0,
                    };
                    let _ = sys::set_winsize(fd.as_raw_fd(), &ws);
                }
            }
            frame::SIGNAL
                if payload.len() == 1 && frame::SIGNALS.iter().any(|(_, n)| *n == payload[0]) =>
            {
                let _ = sys::kill(-self.pid, libc::c_int::from(payload[0]));
            }
            _ => {}
        }
    }

    /// Writes what the command's input takes now.
    fn write_pending(&mut self) {
        let Some(fd) = &self.input else {
            self.pending.clear();
            return;
        };
        match sys::write(fd.as_raw_fd(), &self.pending) {
            Ok(n) => {
                self.pending.drain(..n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            // The command closed its input: what it did not read is dropped.
            Err(_) => {
                self.pending.clear();
                if !self.tty {
                    self.input = None;
                }
            }
        }
        if self.pending.is_empty() && self.close_pending {
            self.input = None;
        }
    }

    /// Copies the terminal's output to stdout; EIO: every slave descriptor is closed.
    fn copy_output(&mut self) {
        let Some(fd) = &self.input else { return };
        let mut buf = vec![0u8; 64 * 1024];
        match sys::read(fd.as_raw_fd(), &mut buf) {
            Ok(0) => self.output_open = false,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => self.output_open = false,
            Ok(n) => {
                if sys::write_all(1, &buf[..n]).is_err() {
                    self.output_open = false;
                }
            }
        }
    }
}
