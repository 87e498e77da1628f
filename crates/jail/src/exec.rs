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
//! 4. **Fork** the command's process, which becomes root of the sandbox's user namespace (the
//!    sandbox's uid 0, an unprivileged id on the host), turns non-dumpable until `execve`, and
//!    takes **the same last steps as the main command** (the same code): new session, working
//!    directory, rlimits, empty bounding set, locked secure bits, the user's ids, no
//!    capabilities, descriptors above stderr closed, `no_new_privs`, the seccomp filter, `execve`.
//! 5. The calling process waits for it and returns its exit code (128+N after signal N; 127 /
//!    126 when the command is missing or not executable, as a shell does).
//!
//! The exec'd process lives in the sandbox's pid namespace: if the caller dies, the sandbox's
//! init adopts and reaps it, and it dies with the sandbox.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use cove_types::{EnvVar, SandboxId, Spec, User};

use crate::cgroup::Hierarchy;
use crate::init::{self, ChildPlan};
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

/// Runs `exec` in the running sandbox `id`, started from `spec`, with this process's stdio.
/// Returns the command's exit code. This process must be single-threaded.
pub fn exec(spec: &Spec, id: &SandboxId, exec: &ExecSpec) -> Result<i32, RunError> {
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
    let init_pid =
        find_init(&cg.pids().map_err(|_| not_running(id))?).ok_or_else(|| not_running(id))?;
    // The root filesystem, image and mounts are the sandbox's already: only the command's part
    // of the plan is used.
    let opts = crate::run::RunOptions {
        id: Some(*id),
        ..Default::default()
    };
    let mut plan = plan(&spec, id, PathBuf::new(), Vec::new(), &opts)?;
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
    run_command(&plan)
}

fn not_running(id: &SandboxId) -> RunError {
    RunError::Prepare {
        what: format!("sandbox {id} is not running"),
        source: std::io::Error::from(std::io::ErrorKind::NotFound),
    }
}

/// The pid (on the host) of the process that is pid 1 of its own namespace.
fn find_init(pids: &[i32]) -> Option<i32> {
    pids.iter().copied().find(|pid| {
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("status"))
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| l.strip_prefix("NSpid:")).map(|v| {
                    v.split_whitespace().last() == Some("1") && v.split_whitespace().count() > 1
                })
            })
            .unwrap_or(false)
    })
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

/// Forks the command in the joined namespaces and waits for it.
fn run_command(plan: &ChildPlan) -> Result<i32, RunError> {
    let (exec_r, exec_w) = sys::pipe().map_err(prep("create a pipe"))?;
    // Taken synchronously below; the command restores an empty mask before execve.
    let signals = sys::SigSet::of(STOP_SIGNALS);
    signals.block().map_err(prep("block signals"))?;
    let pid = sys::fork().map_err(prep("fork the command"))?;
    if pid == 0 {
        drop(exec_r);
        // Root of the sandbox's user namespace (the host's root is not mapped into it), and
        // not inspectable by the sandbox's processes while it still holds capabilities there.
        // The bounding set shrinks to what init keeps, then the command's own steps empty it,
        // exactly as for the main command.
        let ready = sys::set_ids(0, 0)
            .and_then(|()| sys::set_dumpable(false))
            .and_then(|()| init::lock_down_init(plan));
        if let Err(e) = ready {
            let mut w = File::from(exec_w);
            let _ = std::io::Write::write_all(
                &mut w,
                format!("125\tbecome the sandbox's root: {e}").as_bytes(),
            );
            sys::exit(125);
        }
        init::exec_command(plan, None, exec_w);
    }
    drop(exec_w);
    let mut msg = String::new();
    let _ = File::from(exec_r).read_to_string(&mut msg);
    let status = if msg.is_empty() {
        wait_or_stop(&signals, pid)?
    } else {
        sys::wait4(pid, 0).ok().flatten().map_or(0, |(_, s, _)| s)
    };
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
