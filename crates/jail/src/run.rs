//! The supervisor side of one sandbox: prepare everything that can be prepared before the clone,
//! clone into the new namespaces, map ids and join the cgroup from outside, then relay signals
//! (and a terminal), enforce the limits the kernel does not end by itself, and clean up.
//!
//! The supervisor is single-threaded and blocks in `poll(2)`: the sandbox's status pipe, a
//! signalfd and, with a terminal, the pty master and stdin. Limits are checked when the sandbox
//! ends and on a coarse tick while it runs ([`TICK`]).

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cove_types::{Image, NetMode, Reason, RunReport, SandboxId, Spec, SpecError};

use crate::cgroup::{self, Cgroup, Hierarchy};
use crate::egress;
use crate::init::{self, ChildFds, ChildPlan};
use crate::netns;
use crate::rootfs::{RootImage, RootPlan};
use crate::seccomp;
use crate::state::{self, StateLock};
use crate::sys::{self, SigSet};

/// First host uid (and gid) of the range a sandbox's ids map to: root inside is this id
/// outside, which owns nothing on the host. Chosen far above the ranges `useradd` hands out in
/// `/etc/subuid` (from 100000 up, 65536 per user).
pub const HOST_ID_BASE: u32 = 1_500_000_000;
/// Where the `/dev` template lives (see `rootfs::dev_template`).
const DEV_TEMPLATE_DIR: &str = "/var/lib/cove";
/// Number of ids mapped (inner 0..=65535).
pub const ID_COUNT: u32 = 65_536;
/// How often the supervisor checks the limits that do not end a sandbox by themselves.
const TICK: Duration = Duration::from_millis(50);
/// How long a command may take to exit after Ctrl-C / SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Default `PATH` inside the sandbox.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why a sandbox could not be run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid spec")]
    Spec(#[from] SpecError),
    #[error("{what}")]
    Prepare {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("seccomp")]
    Seccomp(#[from] seccomp::SeccompError),
    #[error("state")]
    State(#[from] state::StateError),
    #[error("cgroup")]
    Cgroup(#[from] cgroup::CgroupError),
    #[error("{step}: {message}")]
    Setup { step: String, message: String },
}

fn prep(what: impl Into<String>) -> impl FnOnce(io::Error) -> RunError {
    let what = what.into();
    move |source| RunError::Prepare { what, source }
}

/// How the supervisor runs.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Print where the start time went (stderr).
    pub timing: bool,
    /// The unpacked layers (bottom first) of the spec's image when it is a reference: the
    /// caller resolves references through the image store; the jail knows nothing of images.
    pub layers: Option<Vec<PathBuf>>,
    /// Build each sandbox's `/dev` on a tmpfs instead of binding the host template.
    pub no_dev_template: bool,
    /// The sandbox id; random when not given.
    pub id: Option<SandboxId>,
    /// Where state lives (default [`state::STATE_ROOT`]).
    pub state_root: Option<PathBuf>,
    /// Give the sandbox a freezer cgroup, so that it can be paused (`cove serve`).
    pub freezer: bool,
    /// Print nothing of its own on stderr (under `cove serve`, stderr is the sandbox's log, which
    /// its tenant reads: it must not learn of other sandboxes).
    pub quiet: bool,
    /// Leave the sandbox running on its own once its command runs ([`start_detached`]).
    pub detach: Option<std::sync::Arc<Detach>>,
    /// The resident init as a file many sandboxes share (see
    /// [`crate::init::install_resident_init`]); each sandbox gets a memory file of its own
    /// without it.
    pub init_file: Option<PathBuf>,
    /// Start the sandbox *warm* ([`start_warm`]; detached only).
    pub warm: bool,
}

/// Whether a sandbox started warm from `template` can run `spec`: everything its root
/// filesystem and namespaces were built from agrees (the same image, `host` or a stored one
/// named alike; no binds; the same disk, user and hostname; network `none`; no terminal). The
/// command, its environment, working directory, resource limits and timeouts are the claim's
/// own.
pub fn fits_warm(template: &Spec, spec: &Spec) -> bool {
    matches!(template.image, Image::Host | Image::Ref(_))
        && spec.image == template.image
        && [template, spec].iter().all(|s| {
            s.mounts.is_empty() && s.net == NetMode::None && !s.tty && s.hostname.is_none()
        })
        && spec.user == template.user
        && spec.limits.disk == template.limits.disk
}

/// The cgroup limits of `spec`.
fn cgroup_limits(spec: &Spec) -> cgroup::Limits {
    cgroup::Limits {
        memory_bytes: Some(spec.limits.memory.as_bytes()),
        cpu_millis: Some(spec.limits.cpus_millis as u64),
        pids: Some(spec.limits.pids),
    }
}

/// What a detached sandbox keeps (see [`start_detached`]).
#[derive(Debug)]
pub struct Detach {
    /// Where init writes how the command ended (`W <wait status> <utime us> <stime us>
    /// <maxrss KiB>`), for [`finish_detached`].
    pub status: OwnedFd,
    /// Descriptors init holds open for the sandbox's whole life: locks that say it is alive
    /// (they are released when its init exits).
    pub keep: Vec<OwnedFd>,
    /// A lock file its owner holds while it lives (the server's): while it is held, the
    /// reapers leave an ended sandbox to the owner to finish.
    pub owner: Option<PathBuf>,
}

/// How a stop was asked for, for the report of a detached sandbox.
#[derive(Debug, Clone, Copy)]
pub struct StopInfo {
    /// The signal sent first.
    pub signal: libc::c_int,
    /// Killed after the grace period.
    pub escalated: bool,
}

/// What [`launch`] ended with.
enum Outcome {
    /// The sandbox ended; `uncgrouped`: its cgroup is already gone (removed while init exited).
    Ended { report: RunReport, uncgrouped: bool },
    /// The command runs, on its own; init's host pid.
    Detached(libc::pid_t),
    /// Built warm, waiting for its command ([`start_warm`]).
    Warm(WarmSandbox),
}

impl Outcome {
    /// The sandbox lives on without its supervisor.
    fn on_its_own(&self) -> bool {
        matches!(self, Outcome::Detached(_) | Outcome::Warm(_))
    }
}

/// A fresh random sandbox id.
pub fn new_id() -> io::Result<SandboxId> {
    let mut b = [0u8; 6];
    sys::getrandom(&mut b)?;
    Ok(SandboxId::from_random(b))
}

/// Runs `spec` to completion, with the command's stdio connected to ours (or to a new terminal
/// when `spec.tty`). Returns the report; the caller decides how to print it.
pub fn run(spec: &Spec, opts: &RunOptions) -> Result<RunReport, RunError> {
    assert!(opts.detach.is_none(), "run waits; start_detached detaches");
    match launch(spec, opts)? {
        Outcome::Ended { report, .. } => Ok(report),
        Outcome::Detached(_) | Outcome::Warm(_) => unreachable!("not detached"),
    }
}

/// Starts `spec` and returns once its command runs, leaving the sandbox with no host process
/// of its own: its init holds its lock file and `detach.keep` for as long as it
/// lives, and writes how the command ended to `detach.status`. No limit is watched and nothing
/// is torn down: the caller stops it (a signal to init, which it passes on), enforces its
/// timeout and CPU time, and calls [`finish_detached`] once its lock is free. Returns init's
/// pid. A terminal (`spec.tty`) is refused: nobody would relay it.
pub fn start_detached(spec: &Spec, opts: &RunOptions) -> Result<libc::pid_t, RunError> {
    assert!(
        opts.detach.is_some(),
        "start_detached needs RunOptions::detach"
    );
    if spec.tty {
        return Err(RunError::Setup {
            step: "start the sandbox".into(),
            message: "a detached sandbox cannot have a terminal".into(),
        });
    }
    assert!(!opts.warm, "start_warm starts warm");
    match launch(spec, opts)? {
        Outcome::Detached(pid) => Ok(pid),
        Outcome::Warm(_) => unreachable!("not warm"),
        // The command ended before it was found running (it could not be executed).
        Outcome::Ended { report, .. } => Err(RunError::Setup {
            step: "start the command".into(),
            message: report
                .message
                .unwrap_or_else(|| format!("it ended at once ({})", report.reason)),
        }),
    }
}

/// Builds a sandbox *warm* from `template` (its command is not run) and returns it, handed
/// over, once its child waits in its cgroup: detached as [`start_detached`] leaves a sandbox,
/// but the child waits for its command on a pipe first. The caller (or whoever it hands the
/// sandbox to, [`WarmSandbox::hand_over`]) claims it for a spec that [`fits_warm`] the
/// template ([`claim_warm`]), and reads from then on what [`claim_status`] reads. The cgroup
/// is made without limits; the claim writes the spec's. Dropped unclaimed, the sandbox ends:
/// its child reads the end of the pipe and exits, and [`finish_detached`] removes the rest.
/// Built at a lower priority ([`WARM_NICE`]) than anything someone waits for.
pub fn start_warm(template: &Spec, opts: &RunOptions) -> Result<WarmSandbox, RunError> {
    assert!(
        opts.detach.is_some() && opts.warm,
        "start_warm needs RunOptions::detach and RunOptions::warm"
    );
    match launch(template, opts)? {
        Outcome::Warm(sandbox) => Ok(sandbox),
        Outcome::Detached(_) | Outcome::Ended { .. } => unreachable!("warm"),
    }
}

/// A warm sandbox ([`start_warm`]): built, its child waiting in its cgroup for its command,
/// with no process of the supervisor's left beside it.
#[derive(Debug)]
pub struct WarmSandbox {
    /// The sandbox's init (its pid 1, seen from the host), waiting for its command.
    pub init: libc::pid_t,
    /// Where its command goes ([`claim_warm`]). Closed unclaimed, the sandbox ends.
    pub claim: OwnedFd,
    /// Its status pipe ([`claim_status`]); hung up once its init has exited.
    pub status: OwnedFd,
}

impl WarmSandbox {
    /// Sends the sandbox down `sock` (a `SOCK_SEQPACKET` socket), with `note` (at most
    /// [`HAND_OVER_NOTE_MAX`] bytes), to [`WarmSandbox::take_over`] on the other side: one
    /// message, the init's pid and the note, with the sandbox's descriptors.
    pub fn hand_over(self, sock: RawFd, note: &[u8]) -> io::Result<()> {
        if note.len() > HAND_OVER_NOTE_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the note is too long",
            ));
        }
        let mut message = format!("{}\n", self.init).into_bytes();
        message.extend_from_slice(note);
        sys::send_data_and_fds(
            sock,
            &message,
            &[self.claim.as_raw_fd(), self.status.as_raw_fd()],
        )
    }

    /// Receives a sandbox from [`WarmSandbox::hand_over`] on `sock`, with its note; `None` if
    /// the other side closed the socket instead (it failed before the sandbox was ready).
    /// Blocks until then, unless `sock` does not block (`WouldBlock` then, with nothing read).
    pub fn take_over(sock: RawFd) -> io::Result<Option<(WarmSandbox, Vec<u8>)>> {
        let malformed = || io::Error::other("a malformed warm sandbox was handed over");
        let mut message = vec![0u8; HAND_OVER_NOTE_MAX + 32];
        let (n, mut fds) = match sys::recv_data_and_fds(sock, &mut message) {
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        };
        message.truncate(n);
        let newline = message
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(malformed)?;
        let init: libc::pid_t = std::str::from_utf8(&message[..newline])
            .ok()
            .and_then(|p| p.parse().ok())
            .filter(|&p| p > 0)
            .ok_or_else(malformed)?;
        let note = message.split_off(newline + 1);
        if fds.len() != 2 {
            return Err(malformed());
        }
        let status = fds.pop().ok_or_else(malformed)?;
        let claim = fds.pop().ok_or_else(malformed)?;
        Ok(Some((
            WarmSandbox {
                init,
                claim,
                status,
            },
            note,
        )))
    }
}

/// The longest note [`WarmSandbox::hand_over`] carries.
pub const HAND_OVER_NOTE_MAX: usize = 16 << 10;

/// Claims warm sandbox `id` (its init `init`, its claim pipe `claim`: see [`WarmSandbox`]),
/// built from `template`, for `spec`: puts the sandbox back at the ordinary priority, writes
/// the spec's limits into its cgroup and sends its child the command, environment, working
/// directory and rlimits. Everything else stays what the sandbox was built with. Its status
/// pipe then says whether the command runs ([`claim_status`]). An error leaves the sandbox
/// unclaimed: closing `claim` (dropped here) ends it.
pub fn claim_warm(
    id: &SandboxId,
    template: &Spec,
    spec: &Spec,
    init: libc::pid_t,
    claim: OwnedFd,
) -> Result<(), RunError> {
    if !fits_warm(template, spec) {
        return Err(RunError::Setup {
            step: "claim the warm sandbox".into(),
            message: "the spec needs what the warm sandbox was not built with (image, binds, \
                      disk, user, hostname, network or terminal)"
                .into(),
        });
    }
    spec.validate()?;
    let hostname = template.hostname.clone().unwrap_or_else(|| id.to_string());
    let command = command(spec, &hostname)?;
    // Someone waits for it now (the command inherits init's priority).
    sys::set_nice(init, 0).map_err(prep("restore the sandbox's priority"))?;
    let hierarchy = Hierarchy::detected().ok_or_else(|| RunError::Setup {
        step: "claim the warm sandbox".into(),
        message: "no cgroup hierarchy found".into(),
    })?;
    hierarchy.limit(
        &hierarchy.open(&state::cgroup_name(id)),
        &cgroup_limits(spec),
    )?;
    sys::write_all(claim.as_raw_fd(), &init::encode_claim(&command))
        .map_err(prep("send the sandbox its command"))
}

/// What one line of a claimed warm sandbox's status pipe says: `Some(Ok(()))` once its command
/// runs (the sandbox is then a detached one, as [`start_detached`] leaves it), `Some(Err(why))`
/// if it could not start (its init exits), `None` for anything else.
pub fn claim_status(line: &str) -> Option<Result<(), String>> {
    if line == "R" {
        return Some(Ok(()));
    }
    let mut report = InitReport::default();
    parse_status_line(line, &mut report);
    let (step, message) = match (report.exec_error, report.setup_error) {
        (Some((_, message)), _) => ("start the command".to_string(), message),
        (None, Some(failed)) => failed,
        (None, None) => return None,
    };
    Some(Err(RunError::Setup { step, message }.to_string()))
}

fn launch(spec: &Spec, opts: &RunOptions) -> Result<Outcome, RunError> {
    let t_start = Instant::now();
    if opts.warm {
        // Built ahead of need, a warm sandbox yields the CPU to the starts and claims someone
        // waits for (its child inherits this until the claim puts both back).
        sys::set_nice(0, WARM_NICE).map_err(prep("lower the warm sandbox's priority"))?;
    }
    spec.validate()?;
    check_host_paths(spec, opts)?;
    let id = match opts.id {
        Some(id) => id,
        None => new_id().map_err(prep("generate a sandbox id"))?,
    };
    let hierarchy = Hierarchy::detect()?;
    let state_root = opts
        .state_root
        .clone()
        .unwrap_or_else(|| PathBuf::from(state::STATE_ROOT));
    let t_detected = t_start.elapsed();
    let state = StateLock::create(&state_root, &id)?;
    let t_locked = t_start.elapsed();
    let state_lock = state.lock_fd();
    let result = (|| -> Result<Outcome, RunError> {
        // A warm sandbox's limits are its claim's, written then.
        let limits = if opts.warm {
            cgroup::Limits::default()
        } else {
            cgroup_limits(spec)
        };
        // Nothing pauses a `cove run` sandbox: no freezer cgroup for it unless asked.
        let layout = if opts.freezer {
            hierarchy.clone()
        } else {
            hierarchy.without_freezer()
        };
        let (cg_name, shared_parent) = if opts.detach.is_some() {
            (state::cgroup_name(&id), Some(&layout))
        } else {
            (state::run_cgroup_name(&id), None)
        };
        // Made by `supervise` once the child runs (see `init::join_cgroup`); removed below
        // whatever happened (a directory that was never made is no error).
        let cg = layout.open(&cg_name);
        let mut plan = plan(spec, &id, state.mount_point(), opts)?;
        // `cove run` returns only once the cgroup is gone: init leaves it before its exit, so
        // that its removal overlaps the teardown of init's namespaces. Not on v2 (one
        // directory to remove, and the move would take the global lock), nor for a detached
        // sandbox (nobody waits for its removal).
        plan.leave_cgroup = opts.detach.is_none() && layout.version() == cgroup::Version::V1;
        if opts.timing {
            eprintln!(
                "cove: timing: detected={}us locked={}us planned={}us",
                t_detected.as_micros(),
                t_locked.as_micros(),
                t_start.elapsed().as_micros()
            );
        }
        let outcome = supervise(
            spec,
            &plan,
            (&layout, &cg, &limits),
            t_start,
            opts,
            (&state_root, state_lock),
            &hierarchy,
        );
        if outcome.as_ref().is_ok_and(Outcome::on_its_own) {
            return outcome;
        }
        // Not once more where the supervisor removed it already (four `rmdir`s of nothing, on
        // the way to `cove run`'s exit; only `cove run`'s own cgroups are removed that way,
        // never one under a server's shared parent).
        let cleaned = match &outcome {
            Ok(Outcome::Ended {
                uncgrouped: true, ..
            }) => Ok(()),
            _ => remove_cgroup(&cg, shared_parent),
        };
        let report = outcome?;
        cleaned?;
        Ok(report)
    })();
    if result.as_ref().is_ok_and(Outcome::on_its_own) {
        // Init holds the lock now (the same open file), and the lock file stays, marked for
        // the reapers: its end is its owner's to finish.
        let owner = opts
            .detach
            .as_ref()
            .and_then(|d| d.owner.as_ref())
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let _ = state.mark_detached(&owner);
        state.keep();
        return result;
    }
    let removed = state.remove();
    if opts.timing {
        eprintln!("cove: timing: cleaned={}us", t_start.elapsed().as_micros());
    }
    let report = result?;
    removed?;
    Ok(report)
}

/// The host paths the spec names must exist before anything is created for the sandbox.
fn check_host_paths(spec: &Spec, opts: &RunOptions) -> Result<(), RunError> {
    let layers: Vec<&PathBuf> = match (&spec.image, &opts.layers) {
        (Image::Host, _) => Vec::new(),
        (Image::Path(p), _) => vec![p],
        (Image::Ref(_), Some(layers)) if !layers.is_empty() => layers.iter().collect(),
        (Image::Ref(r), _) => {
            return Err(RunError::Spec(SpecError::Image {
                reason: format!("image {r} has not been resolved to layers"),
            }));
        }
    };
    for p in layers {
        let meta = fs::metadata(p).map_err(prep(format!("image {}", p.display())))?;
        if !meta.is_dir() {
            return Err(RunError::Spec(SpecError::Image {
                reason: format!("{} is not a directory", p.display()),
            }));
        }
        // overlayfs options separate layers with ':' and options with ','.
        if p.to_string_lossy().contains([':', ',']) {
            return Err(RunError::Spec(SpecError::Image {
                reason: format!("{}: an image path may not contain ':' or ','", p.display()),
            }));
        }
    }
    for b in &spec.mounts {
        fs::metadata(&b.source).map_err(prep(format!("bind source {}", b.source.display())))?;
    }
    Ok(())
}

pub(crate) fn plan(
    spec: &Spec,
    id: &SandboxId,
    staging: PathBuf,
    opts: &RunOptions,
) -> Result<ChildPlan, RunError> {
    let hostname = spec.hostname.clone().unwrap_or_else(|| id.to_string());
    let l = &spec.limits;
    // The bounding-set loop stops at the first capability this kernel does not know (EINVAL),
    // so the highest possible number serves without reading /proc/sys/kernel/cap_last_cap.
    let cap_last = 63;
    Ok(ChildPlan {
        id: id.to_string(),
        root: RootPlan {
            staging,
            image: match &spec.image {
                Image::Host => RootImage::Host,
                Image::Path(p) => RootImage::Layers(vec![p.clone()]),
                Image::Ref(_) => RootImage::Layers(opts.layers.clone().unwrap_or_default()),
            },
            disk_bytes: l.disk.as_bytes(),
            binds: spec.mounts.clone(),
            resolv_conf: (spec.net == NetMode::Egress)
                .then(|| format!("nameserver {}\n", egress::GATEWAY)),
            hostname: hostname.clone(),
            dev_template: if opts.no_dev_template {
                None
            } else {
                crate::rootfs::dev_template(Path::new(DEV_TEMPLATE_DIR))
            },
            uid: spec.user.uid,
            gid: spec.user.gid,
        },
        uid: spec.user.uid,
        gid: spec.user.gid,
        command: command(spec, &hostname)?,
        seccomp: seccomp::compile(seccomp::DEFAULT_POLICY)?,
        cap_last,
        tty: spec.tty,
        timing: opts.timing,
        report_started: opts.detach.is_some(),
        die_with_parent: false,
        leave_cgroup: false,
    })
}

/// What `spec` runs in a sandbox named `hostname`: the command, its environment (over the
/// defaults, the hostname among them), the `PATH` it is looked up in, the working directory
/// and the rlimits. All the claim of a warm sandbox brings (see `init::encode_claim`).
fn command(spec: &Spec, hostname: &str) -> Result<init::Command, RunError> {
    let mut env: Vec<(String, String)> = vec![
        ("PATH".into(), DEFAULT_PATH.into()),
        ("HOSTNAME".into(), hostname.to_string()),
        (
            "HOME".into(),
            match (spec.user.uid, &spec.image) {
                (0, _) => "/root".into(),
                (_, Image::Host) => "/home/user".into(),
                _ => "/".into(),
            },
        ),
    ];
    if spec.tty {
        env.push(("TERM".into(), "xterm".into()));
    }
    for e in &spec.env {
        env.retain(|(k, _)| k != &e.key);
        env.push((e.key.clone(), e.value.clone()));
    }
    let search_path = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| {
            v.split(':')
                .filter(|d| !d.is_empty())
                .map(PathBuf::from)
                .collect()
        })
        .unwrap_or_default();
    let cstring = |s: String| CString::new(s).map_err(|_| SpecError::NoCommand);
    let envp = env
        .into_iter()
        .map(|(k, v)| cstring(format!("{k}={v}")))
        .collect::<Result<Vec<_>, _>>()?;
    let argv = spec
        .cmd
        .iter()
        .map(|a| cstring(a.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let l = &spec.limits;
    let mut rlimits = vec![(libc::RLIMIT_CORE, 0, 0)];
    if let Some(n) = l.nofile {
        rlimits.push((libc::RLIMIT_NOFILE, n, n));
    }
    if let Some(s) = l.fsize {
        rlimits.push((libc::RLIMIT_FSIZE, s.as_bytes(), s.as_bytes()));
    }
    if let Some(t) = l.cpu_time {
        // Per process, in whole seconds; the supervisor enforces the sandbox-wide total.
        let secs = t.as_std().as_secs_f64().ceil() as u64;
        rlimits.push((libc::RLIMIT_CPU, secs, secs + 1));
    }
    Ok(init::Command {
        argv,
        envp,
        search_path,
        workdir: spec.workdir.clone().unwrap_or_else(|| PathBuf::from("/")),
        rlimits,
    })
}

/// Signals the supervisor handles itself.
const SUPERVISOR_SIGNALS: &[libc::c_int] = &[
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGCHLD,
    libc::SIGWINCH,
];

/// What the sandbox's init reported.
#[derive(Debug, Default)]
struct InitReport {
    wait_status: Option<i32>,
    setup_error: Option<(String, String)>,
    exec_error: Option<(i32, String)>,
    timings: Option<String>,
}

fn supervise(
    spec: &Spec,
    plan: &ChildPlan,
    (layout, cg, limits): (&Hierarchy, &Cgroup, &cgroup::Limits),
    t_start: Instant,
    opts: &RunOptions,
    (state_root, state_lock): (&Path, RawFd),
    hierarchy: &Hierarchy,
) -> Result<Outcome, RunError> {
    let (go_r, go_w) = sys::pipe().map_err(prep("create a pipe"))?;
    let (cgroup_tx, cgroup_rx) = sys::socketpair().map_err(prep("create a socket pair"))?;
    let (status_r, status_w) = sys::pipe().map_err(prep("create a pipe"))?;
    let (claim_r, claim_w) = if opts.warm {
        let (r, w) = sys::pipe().map_err(prep("create a pipe"))?;
        (Some(r), Some(w))
    } else {
        (None, None)
    };
    let init_exe =
        init::resident_init(opts.init_file.as_deref()).map_err(prep("load the resident init"))?;
    let sigs = SigSet::of(SUPERVISOR_SIGNALS);
    let old_mask = sigs.block().map_err(prep("block signals"))?;
    let sigfd = sigs.signalfd().map_err(prep("create a signalfd"))?;
    let t_prep = t_start.elapsed();

    // The network namespace is entered before the clone (see `netns`); the child inherits it.
    // The supervisor goes back to its own right after, so that the sandbox's namespace dies
    // with the sandbox (its teardown then overlaps the supervisor's cleanup).
    let home_net = netns::current().map_err(prep("open the network namespace"))?;
    let net = netns::take_or_create(state_root).map_err(prep("prepare a network namespace"))?;
    // Removed when dropped, on every way out of here.
    let mut egress = match spec.net {
        NetMode::None => None,
        NetMode::Egress => {
            let id: SandboxId = plan.id.parse().map_err(|_| RunError::Setup {
                step: "set up egress networking".into(),
                message: format!("{:?} is not a sandbox id", plan.id),
            })?;
            let set_up = egress::setup(&id, &spec.egress, &net, &home_net);
            // The sandbox is created in its own namespace, whatever happened.
            let back = net.enter();
            let e = set_up.map_err(|e| RunError::Setup {
                step: "set up egress networking".into(),
                message: e.to_string(),
            })?;
            back.map_err(prep("enter the sandbox's network namespace"))?;
            Some(e)
        }
    };
    let flags = libc::CLONE_NEWUSER
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC;
    let pid = sys::clone_fork(flags).map_err(prep("clone the sandbox"))?;
    if pid == 0 {
        drop(go_w);
        drop(status_r);
        drop(sigfd);
        drop(cgroup_tx);
        drop(claim_w);
        init::child_main(
            plan,
            ChildFds {
                go: go_r,
                status: status_w,
                cgroup: cgroup_rx,
                init_exe,
                detached: opts.detach.as_ref().map(|d| init::Detached {
                    status: d.status.as_raw_fd(),
                    keep: d
                        .keep
                        .iter()
                        .map(|f| f.as_raw_fd())
                        .chain([state_lock])
                        .collect(),
                }),
                claim: claim_r,
            },
        );
    }
    drop(go_r);
    drop(status_w);
    drop(cgroup_rx);
    drop(claim_r);
    let left = home_net.enter();
    drop(net);
    if let Err(e) = left {
        let _ = sys::kill(pid, libc::SIGKILL);
        let _ = sys::wait4(pid, 0);
        let _ = old_mask.set_mask();
        return Err(prep("return to the host's network namespace")(e));
    }
    let t_clone = t_start.elapsed();

    // From here on the child exists: any failure must kill and reap it. The cgroup is made
    // while the child builds its root filesystem (when the scheduler puts the child on
    // another CPU: traced, it mostly queued it on this one, 33 of 40 runs, until this thread
    // blocked). Made on a thread while this one makes the network namespace instead, the
    // start was slower: 5.94 against 5.59 ms, bench/interleave.py 250 beside bwrap and crun.
    let started = setup_from_outside(pid, &go_w)
        .and_then(|()| make_cgroup(layout, cg, limits, plan.leave_cgroup, &cgroup_tx));
    drop(cgroup_tx);
    let t_joined = t_start.elapsed();
    if let Err(e) = started {
        let _ = sys::kill(pid, libc::SIGKILL);
        let _ = sys::wait4(pid, 0);
        let _ = old_mask.set_mask();
        return Err(e);
    }
    // Warm: handed over once the child waits for its command.
    if let Some(claim) = claim_w {
        let _ = old_mask.set_mask();
        return match wait_warm(&status_r) {
            Ok(()) => Ok(Outcome::Warm(WarmSandbox {
                init: pid,
                claim,
                status: status_r,
            })),
            Err(e) => {
                let _ = sys::kill(pid, libc::SIGKILL);
                let _ = sys::wait4(pid, 0);
                Err(e)
            }
        };
    }

    // Opportunistic reaping of sandboxes whose supervisor was killed, while ours starts (not
    // for a server's sandbox: the server's reaper does it).
    if opts.detach.is_none() {
        let reaped = state::gc_nearby(state_root, hierarchy);
        if !opts.quiet {
            for line in &reaped.removed {
                eprintln!("cove: reaped stale {line}");
            }
        }
    }

    let mut sup = Supervisor {
        id: plan.id.clone(),
        spec,
        cg,
        pid,
        started: t_start,
        deadline: spec.limits.timeout.map(|t| t_start + t.as_std()),
        killed_for: None,
        stop_requested: None,
        message: None,
        final_stats: None,
        reported: None,
        reaped: None,
        uncgrouped: None,
        detach: opts.detach.is_some(),
        leaves: plan.leave_cgroup,
    };
    let result = sup.wait(status_r, sigfd, &go_w);
    let _ = old_mask.set_mask();
    let (init_report, init_status) = match result? {
        Waited::Detached => {
            // Its lists stay in place until `finish_detached`.
            if let Some(e) = egress.take() {
                e.forget();
            }
            return Ok(Outcome::Detached(pid));
        }
        Waited::Ended(report, status) => (report, status),
    };

    if opts.timing {
        eprintln!(
            "cove: timing: prepare={}us clone={}us joined={}us child[{}] reported={}us{} reaped={}us",
            t_prep.as_micros(),
            t_clone.as_micros(),
            t_joined.as_micros(),
            init_report.timings.as_deref().unwrap_or("-"),
            sup.reported.unwrap_or_default().as_micros(),
            sup.uncgrouped
                .map(|t| format!(" uncgrouped={}us", t.as_micros()))
                .unwrap_or_default(),
            sup.reaped.unwrap_or_default().as_micros(),
        );
    }
    if let Some((step, message)) = init_report.setup_error {
        return Err(RunError::Setup { step, message });
    }
    let mut report = sup.report(&init_report, init_status);
    report.egress_denied_packets = egress.as_mut().and_then(egress::Egress::finish);
    Ok(Outcome::Ended {
        report,
        uncgrouped: sup.uncgrouped.is_some(),
    })
}

/// The nice value a warm sandbox is built at, until it is claimed.
const WARM_NICE: i32 = 10;

/// Waits for a warm sandbox's child to be in place (`C` on the status pipe).
fn wait_warm(status: &OwnedFd) -> Result<(), RunError> {
    let line = read_line(status).map_err(prep("wait for the warm sandbox"))?;
    if line == "C" {
        return Ok(());
    }
    let mut report = InitReport::default();
    parse_status_line(&line, &mut report);
    let (step, message) = report.setup_error.unwrap_or_else(|| {
        (
            "start the sandbox warm".into(),
            "it ended before it was ready".into(),
        )
    });
    Err(RunError::Setup { step, message })
}

/// One line from `fd`, read a byte at a time (what follows it stays in the pipe), without
/// its newline.
fn read_line(fd: &OwnedFd) -> io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 4096 {
        if sys::read(fd.as_raw_fd(), &mut b)? == 0 {
            break;
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Removes a sandbox's cgroup, and a server's sandboxes' shared parent (in `shared_parent`)
/// with the last of them (an rmdir that fails while others remain, a few microseconds; a start
/// racing with it makes it again). Normally empty already: init's exit took the whole pid
/// namespace with it. Only when the removal finds it busy (a failed start, a killed init) are
/// stragglers hunted down.
fn remove_cgroup(
    cg: &Cgroup,
    shared_parent: Option<&Hierarchy>,
) -> Result<(), cgroup::CgroupError> {
    let mut kill = |pid: i32| {
        let _ = sys::kill(pid, libc::SIGKILL);
    };
    cg.remove()
        .or_else(|_| cg.kill_all(&mut kill).and_then(|()| cg.remove()))?;
    if let Some(layout) = shared_parent {
        layout.remove_if_empty(state::CGROUP_PARENT);
    }
    Ok(())
}

/// What the supervisor's wait ended with.
enum Waited {
    Ended(InitReport, i32),
    /// The command runs and the sandbox is on its own.
    Detached,
}

/// Makes the sandbox's cgroup with its limits and sends the child the files that move it in
/// (opened here, as host root: see `init::join_cgroup`), and with `leave` those that move it
/// out again.
fn make_cgroup(
    layout: &Hierarchy,
    cg: &Cgroup,
    limits: &cgroup::Limits,
    leave: bool,
    to_child: &OwnedFd,
) -> Result<(), RunError> {
    layout.create(cg.name(), limits)?;
    let leave_files = if leave {
        cg.self_leave_files()
    } else {
        Vec::new()
    };
    let files = cg
        .self_join_files()
        .iter()
        .chain(&leave_files)
        .map(|f| {
            fs::OpenOptions::new()
                .write(true)
                .open(f)
                .map(OwnedFd::from)
                .map_err(prep(format!("open {}", f.display())))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // The child's `/proc/sys/net/ipv4`, sent once its procfs is mounted: the namespace's
    // settings must be in place before the child joins the cgroup and starts the command.
    match sys::recv_fds(to_child.as_raw_fd()) {
        Ok(dirs) => match dirs.first() {
            Some(dir) => netns::write_sysctls(dir.as_fd())
                .map_err(prep("configure the sandbox's network namespace"))?,
            None => {
                return Err(prep("configure the sandbox's network namespace")(
                    io::Error::other("the sandbox sent no /proc/sys/net/ipv4"),
                ));
            }
        },
        // The child has already failed (its status pipe says why) or died.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
        Err(e) => return Err(prep("receive the sandbox's network settings")(e)),
    }
    let raw: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
    match sys::send_fds(to_child.as_raw_fd(), &raw) {
        // The child has already failed (and said why on the status pipe, which is the
        // message worth reporting) or died.
        Err(e) if e.raw_os_error() == Some(libc::EPIPE) => Ok(()),
        r => r.map_err(prep("send the sandbox its cgroup")),
    }
}

/// Writes the id maps and lets the child go (it joins its cgroup itself).
fn setup_from_outside(pid: libc::pid_t, go: &OwnedFd) -> Result<(), RunError> {
    let map = format!("0 {HOST_ID_BASE} {ID_COUNT}\n");
    for file in ["uid_map", "gid_map"] {
        let path = format!("/proc/{pid}/{file}");
        fs::write(&path, &map).map_err(prep(format!("write {path}")))?;
    }
    sys::write_all(go.as_raw_fd(), b"g").map_err(prep("start the sandbox"))
}

struct Supervisor<'a> {
    id: String,
    spec: &'a Spec,
    cg: &'a Cgroup,
    pid: libc::pid_t,
    started: Instant,
    deadline: Option<Instant>,
    /// Set when the supervisor itself ended the sandbox for a limit.
    killed_for: Option<Reason>,
    /// Set when the user asked to stop (first signal); the grace period ends at this instant.
    stop_requested: Option<(Instant, libc::c_int)>,
    message: Option<String>,
    /// The cgroup's counters, read as soon as init reports the command's end (while init and
    /// its namespaces are still being torn down).
    final_stats: Option<cgroup::Stats>,
    /// When init reported the command's end, and when init was reaped (for `--timing`).
    reported: Option<Duration>,
    reaped: Option<Duration>,
    /// When the cgroup was removed while init exited (`L`), if it was.
    uncgrouped: Option<Duration>,
    /// Return once the command runs ([`start_detached`]).
    detach: bool,
    /// Init leaves the cgroup before it exits ([`ChildPlan::leave_cgroup`]).
    leaves: bool,
}

impl Supervisor<'_> {
    fn wait(
        &mut self,
        status_r: OwnedFd,
        sigfd: OwnedFd,
        go: &OwnedFd,
    ) -> Result<Waited, RunError> {
        let mut reader = BufReader::new(File::from(status_r));
        let mut report = InitReport::default();
        let status_fd = reader.get_ref().as_raw_fd();
        let mut relay: Option<crate::pty::Relay> = None;
        let mut status_open = true;
        let mut last_check = Instant::now();
        while status_open {
            let timeout = self.next_timeout();
            let mut fds = vec![(status_fd, libc::POLLIN), (sigfd.as_raw_fd(), libc::POLLIN)];
            if let Some(r) = &relay {
                fds.extend(r.poll_fds());
            }
            let revents = sys::poll(&fds, timeout).map_err(prep("wait for the sandbox"))?;
            // Every line already read in, not only the one that woke the poll.
            let mut readable = revents[0] != 0;
            while readable && status_open {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => status_open = false,
                    Ok(_) => {
                        if let Some(fd) = line.strip_prefix("P ") {
                            relay = Some(self.take_terminal(fd.trim(), go)?);
                        } else if line == "R\n" {
                            if self.detach {
                                return Ok(Waited::Detached);
                            }
                            sys::release_free_memory();
                        } else if line == "L\n" {
                            // Init left the cgroup (`init::join_cgroup`): remove it while
                            // init exits. Orphans of the command may keep it a little longer.
                            if self.cg.try_remove() {
                                self.uncgrouped = Some(self.started.elapsed());
                            }
                            if relay.is_none() {
                                status_open = false;
                            }
                        } else {
                            parse_status_line(line.trim_end(), &mut report);
                            if report.wait_status.is_some() && self.final_stats.is_none() {
                                self.reported = Some(self.started.elapsed());
                                self.final_stats = self.cg.stats().ok();
                                // Init only exits after this: wait for that at once (with
                                // a terminal, its last output is drained first), or first
                                // for init to leave the cgroup ("L", or the end of the pipe).
                                if relay.is_none() && !self.leaves {
                                    status_open = false;
                                }
                            }
                        }
                    }
                }
                readable = !reader.buffer().is_empty();
            }
            if revents[1] != 0 {
                while let Some(sig) = sys::read_signalfd(&sigfd).map_err(prep("read signals"))? {
                    self.on_signal(sig as libc::c_int, relay.as_ref());
                }
            }
            if let Some(r) = &mut relay {
                r.pump(&revents[2..]);
            }
            // Limits are checked on the tick, not on every wake-up; the end report reads the
            // counters once more anyway.
            if last_check.elapsed() >= TICK || self.deadline_passed() {
                last_check = Instant::now();
                self.check_limits();
            }
        }
        // Drain any output still buffered in the terminal.
        if let Some(r) = &mut relay {
            r.drain();
        }
        let (_, status, _) = sys::wait4(self.pid, 0)
            .map_err(prep("reap the sandbox"))?
            .unwrap_or((self.pid, 0, sys::Usage::default()));
        self.reaped = Some(self.started.elapsed());
        Ok(Waited::Ended(report, status))
    }

    /// The sandbox opened its terminal: take a copy of the master side and let it go on.
    fn take_terminal(&self, fd: &str, go: &OwnedFd) -> Result<crate::pty::Relay, RunError> {
        let fd: i32 = fd.parse().map_err(|_| {
            prep("read the terminal's descriptor")(io::ErrorKind::InvalidData.into())
        })?;
        let master = sys::take_fd_of(self.pid, fd).map_err(prep("take the sandbox's terminal"))?;
        let relay = crate::pty::Relay::new(master).map_err(prep("set up the terminal"))?;
        sys::write_all(go.as_raw_fd(), b"t").map_err(prep("start the sandbox"))?;
        Ok(relay)
    }

    fn deadline_passed(&self) -> bool {
        let now = Instant::now();
        self.deadline.is_some_and(|d| now >= d) || self.stop_requested.is_some_and(|s| now >= s.0)
    }

    fn next_timeout(&self) -> i32 {
        let mut t = TICK;
        let now = Instant::now();
        for d in [self.deadline, self.stop_requested.map(|s| s.0)]
            .into_iter()
            .flatten()
        {
            t = t.min(d.saturating_duration_since(now));
        }
        t.as_millis() as i32
    }

    fn on_signal(&mut self, sig: libc::c_int, relay: Option<&crate::pty::Relay>) {
        match sig {
            libc::SIGCHLD => {}
            libc::SIGWINCH => {
                if let Some(r) = relay {
                    r.resize();
                }
            }
            _ => {
                if self.stop_requested.is_some() {
                    // A second request: stop now.
                    self.kill(
                        Reason::Killed,
                        format!("killed: stopped by {} (twice)", signame(sig)),
                    );
                } else {
                    self.stop_requested = Some((Instant::now() + STOP_GRACE, sig));
                    let _ = sys::kill(self.pid, sig);
                }
            }
        }
    }

    fn kill(&mut self, reason: Reason, message: String) {
        if self.killed_for.is_none() {
            self.killed_for = Some(reason);
            self.message = Some(message);
        }
        let _ = sys::kill(self.pid, libc::SIGKILL);
    }

    fn check_limits(&mut self) {
        if self.killed_for.is_some() {
            return;
        }
        let now = Instant::now();
        let l = &self.spec.limits;
        if let (Some(d), Some(t)) = (self.deadline, l.timeout)
            && now >= d
        {
            self.kill(Reason::Timeout, format!("killed: timeout {t} reached"));
            return;
        }
        if let Some((d, sig)) = self.stop_requested
            && now >= d
        {
            self.kill(
                Reason::Killed,
                format!(
                    "killed: still running {STOP_GRACE:?} after {}",
                    signame(sig)
                ),
            );
            return;
        }
        let Ok(st) = self.cg.stats() else { return };
        let hit = if st.oom_kills > 0 {
            Reason::MemoryLimit
        } else if st.pids_limit_hits > 0 {
            Reason::PidsLimit
        } else if cpu_budget_spent(l, &st) {
            Reason::CpuTimeLimit
        } else {
            return;
        };
        let text = limit_text(l, hit);
        self.kill(hit, format!("killed: {text}"));
    }

    /// Builds the final report from what init said, how init ended, and the cgroup's counters.
    fn report(&mut self, init: &InitReport, init_status: i32) -> RunReport {
        let stats = self
            .final_stats
            .take()
            .or_else(|| self.cg.stats().ok())
            .unwrap_or_default();
        let ended = Ended {
            killed_for: self.killed_for.zip(self.message.clone()),
            stop_signal: self.stop_requested.map(|s| s.1),
            wall_time_ms: self.started.elapsed().as_secs_f64() * 1000.0,
        };
        compose_report(&self.id, self.spec, init, init_status, &stats, ended)
    }
}

/// What the supervisor (or whoever finishes a detached sandbox) knows of how it ended.
struct Ended {
    /// It was killed for this reason, said so.
    killed_for: Option<(Reason, String)>,
    /// A stop was asked for with this signal.
    stop_signal: Option<libc::c_int>,
    wall_time_ms: f64,
}

/// The end report: from what init said (or its own status when it said nothing), the cgroup's
/// counters and what the supervisor did.
fn compose_report(
    id: &str,
    spec: &Spec,
    init: &InitReport,
    init_status: i32,
    stats: &cgroup::Stats,
    ended: Ended,
) -> RunReport {
    let l = &spec.limits;
    let mut message = ended.killed_for.as_ref().map(|k| k.1.clone());
    // The command's status if init reported it; otherwise init's own (killed by us).
    let status = init.wait_status.unwrap_or(init_status);
    let (mut exit_code, mut signal) = decode_status(status);
    if let Some((code, msg)) = &init.exec_error {
        exit_code = *code;
        signal = None;
        message.get_or_insert_with(|| msg.clone());
    }
    let reason = if let Some((r, _)) = ended.killed_for {
        r
    } else if stats.oom_kills > 0 {
        message = Some(format!("killed: {}", limit_text(l, Reason::MemoryLimit)));
        Reason::MemoryLimit
    } else if stats.pids_limit_hits > 0 && (exit_code != 0 || signal.is_some()) {
        // The command ended on its own after a refused fork: not killed by us.
        message = Some(limit_text(l, Reason::PidsLimit));
        Reason::PidsLimit
    } else if signal == Some(libc::SIGXCPU)
        || (cpu_budget_spent(l, stats) && signal == Some(libc::SIGKILL))
    {
        message = Some(format!("killed: {}", limit_text(l, Reason::CpuTimeLimit)));
        Reason::CpuTimeLimit
    } else if let Some(sig) = ended.stop_signal {
        message = Some(format!("stopped by {}", signame(sig)));
        Reason::Killed
    } else {
        Reason::Exited
    };
    RunReport {
        id: id.to_string(),
        exit_code,
        signal,
        reason,
        message,
        wall_time_ms: ended.wall_time_ms,
        cpu_time_ms: stats.cpu_usage_ns as f64 / 1e6,
        peak_memory_bytes: stats.memory_peak_bytes,
        egress_denied_packets: None,
    }
}

/// Ends a detached sandbox whose init has exited (its lock is free): reads how the command
/// ended from `status` (the file given as [`Detach::status`]) and the cgroup's counters, kills
/// whatever is left in its cgroup, removes the cgroup, its egress lists and its state
/// directory. `wall_time_ms` is the caller's (it knows when the sandbox started); `stop`
/// says whether the caller stopped it. Errors of the teardown are ignored: what is left, the
/// reaper finds.
pub fn finish_detached(
    id: &SandboxId,
    spec: &Spec,
    status: &Path,
    wall_time_ms: f64,
    stop: Option<StopInfo>,
    state_root: Option<&Path>,
) -> RunReport {
    let mut init = InitReport::default();
    for line in fs::read_to_string(status).unwrap_or_default().lines() {
        parse_status_line(line, &mut init);
    }
    let hierarchy = Hierarchy::detected();
    let cg = hierarchy.map(|h| h.open(&state::cgroup_name(id)));
    let stats = cg.as_ref().and_then(|c| c.stats().ok()).unwrap_or_default();
    if let (Some(cg), Some(h)) = (&cg, hierarchy) {
        let _ = remove_cgroup(cg, Some(h));
    }
    let denied = (spec.net == cove_types::NetMode::Egress)
        .then(|| egress::finish_of(id, !spec.egress.is_empty()))
        .flatten();
    let root = state_root.unwrap_or(Path::new(state::STATE_ROOT));
    state::remove_state(root, id);
    let ended = Ended {
        killed_for: stop.filter(|s| s.escalated).map(|s| {
            (
                Reason::Killed,
                format!(
                    "killed: still running {STOP_GRACE:?} after {}",
                    signame(s.signal)
                ),
            )
        }),
        stop_signal: stop.map(|s| s.signal),
        wall_time_ms,
    };
    // Without a word from init, it was killed (by the caller, or with its whole cgroup).
    let mut report = compose_report(id.as_str(), spec, &init, libc::SIGKILL, &stats, ended);
    report.egress_denied_packets = denied;
    report
}

/// How long a detached sandbox's command may take to exit after a stop signal before the
/// caller kills it (the same grace as `cove run`'s).
pub const DETACHED_STOP_GRACE: Duration = STOP_GRACE;

/// Whether the sandbox has used up its CPU-time budget.
fn cpu_budget_spent(l: &cove_types::Limits, st: &cgroup::Stats) -> bool {
    l.cpu_time
        .is_some_and(|t| st.cpu_usage_ns >= t.as_std().as_nanos() as u64)
}

/// The plain words for a limit that ended a sandbox ("memory limit 512M exceeded").
fn limit_text(l: &cove_types::Limits, reason: Reason) -> String {
    match reason {
        Reason::MemoryLimit => format!("memory limit {} exceeded", l.memory),
        Reason::PidsLimit => format!("pids limit {} reached", l.pids),
        Reason::CpuTimeLimit => format!(
            "CPU-time limit {} exceeded",
            l.cpu_time.map(|t| t.to_string()).unwrap_or_default()
        ),
        other => other.to_string(),
    }
}

fn parse_status_line(line: &str, report: &mut InitReport) {
    let (tag, rest) = line.split_once(' ').unwrap_or((line, ""));
    match tag {
        "W" => report.wait_status = rest.split(' ').next().and_then(|s| s.parse().ok()),
        "E" => {
            let (step, msg) = rest.split_once('\t').unwrap_or((rest, ""));
            report.setup_error = Some((step.to_string(), msg.to_string()));
        }
        "X" => {
            let (code, msg) = rest.split_once('\t').unwrap_or(("127", rest));
            report.exec_error = Some((code.parse().unwrap_or(127), msg.to_string()));
        }
        "T" => report.timings = Some(rest.to_string()),
        _ => {}
    }
}

/// (exit code as a shell reports it, signal).
fn decode_status(status: i32) -> (i32, Option<i32>) {
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        (128 + sig, Some(sig))
    } else {
        (libc::WEXITSTATUS(status), None)
    }
}

/// The conventional name of a signal.
pub fn signame(sig: libc::c_int) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGABRT => "SIGABRT",
        libc::SIGPIPE => "SIGPIPE",
        _ => return format!("signal {sig}"),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(cmd: &[&str]) -> Spec {
        Spec::new(cmd.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn a_claim_carries_the_command_environment_directory_and_rlimits() {
        let id: SandboxId = "0123456789ab".parse().unwrap();
        let opts = RunOptions::default();
        let warm = plan(&spec(&["true"]), &id, PathBuf::from("/x"), &opts).unwrap();
        let mut claimed = spec(&["sh", "-c", "echo \"$A\"", ""]);
        claimed.env = vec!["A=b=c".parse().unwrap(), "EMPTY=".parse().unwrap()];
        claimed.workdir = Some(PathBuf::from("/srv/app"));
        claimed.limits.nofile = Some(77);
        claimed.limits.fsize = Some("1M".parse().unwrap());
        let want = plan(&claimed, &id, PathBuf::from("/x"), &opts).unwrap();
        // What `claim_warm` sends, from the spec and the sandbox's name alone.
        let sent = command(&claimed, id.as_str()).unwrap();
        let got = init::decode_claim(&init::encode_claim(&sent), &warm).unwrap();
        assert_eq!(got.command.argv, want.command.argv);
        assert_eq!(got.command.envp, want.command.envp);
        assert_eq!(got.command.search_path, want.command.search_path);
        assert_eq!(got.command.workdir, want.command.workdir);
        assert_eq!(got.command.rlimits, want.command.rlimits);
        // What the root filesystem was built from stays the warm sandbox's.
        assert_eq!(got.root.staging, warm.root.staging);
        // Anything cut short or with more after it is refused, not half-applied.
        let bytes = init::encode_claim(&sent);
        for cut in [0, 1, bytes.len() / 2, bytes.len() - 1] {
            assert!(init::decode_claim(&bytes[..cut], &warm).is_err(), "{cut}");
        }
        let mut more = bytes.clone();
        more.extend_from_slice(b"x\0");
        assert!(init::decode_claim(&more, &warm).is_err());
        let mut no_command = sent.clone();
        no_command.argv.clear();
        assert!(init::decode_claim(&init::encode_claim(&no_command), &warm).is_err());
    }

    #[test]
    fn a_warm_sandbox_is_handed_over_whole_or_not_at_all() {
        let (ours, theirs) = sys::socketpair().unwrap();
        let (claim_r, claim_w) = sys::pipe().unwrap();
        let (status_r, status_w) = sys::pipe().unwrap();
        let sandbox = WarmSandbox {
            init: 4242,
            claim: claim_w,
            status: status_r,
        };
        sandbox
            .hand_over(theirs.as_raw_fd(), b"[\"/layers/a\"]")
            .unwrap();
        let (got, note) = WarmSandbox::take_over(ours.as_raw_fd()).unwrap().unwrap();
        assert_eq!((got.init, note.as_slice()), (4242, &b"[\"/layers/a\"]"[..]));
        // The descriptors are the pipes' other ends: what goes in one comes out of the other.
        sys::write_all(got.claim.as_raw_fd(), b"cmd").unwrap();
        let mut b = [0u8; 3];
        assert_eq!(sys::read(claim_r.as_raw_fd(), &mut b).unwrap(), 3);
        assert_eq!(&b, b"cmd");
        sys::write_all(status_w.as_raw_fd(), b"R\n").unwrap();
        let mut b = [0u8; 2];
        assert_eq!(sys::read(got.status.as_raw_fd(), &mut b).unwrap(), 2);
        // A note too long is refused before anything is sent.
        let (c, _) = sys::pipe().unwrap();
        let (s, _) = sys::pipe().unwrap();
        let big = WarmSandbox {
            init: 1,
            claim: c,
            status: s,
        };
        let long = vec![b'x'; HAND_OVER_NOTE_MAX + 1];
        assert!(big.hand_over(theirs.as_raw_fd(), &long).is_err());
        // The other side gone without a sandbox: none, not an error.
        drop(theirs);
        assert!(WarmSandbox::take_over(ours.as_raw_fd()).unwrap().is_none());
    }

    #[test]
    fn a_claims_status_says_started_or_why_not() {
        assert_eq!(claim_status("R"), Some(Ok(())));
        assert_eq!(
            claim_status("X 127\tnope: command not found"),
            Some(Err("start the command: nope: command not found".into()))
        );
        assert_eq!(
            claim_status("E wait for the sandbox's command\tno command came"),
            Some(Err("wait for the sandbox's command: no command came".into()))
        );
        assert_eq!(claim_status("T child_start=0"), None);
    }

    #[test]
    fn only_specs_that_need_nothing_the_warm_sandbox_lacks_fit_it() {
        let template = spec(&["true"]);
        let mut fits = spec(&["python3", "-m", "http.server"]);
        fits.env = vec!["K=v".parse().unwrap()];
        fits.workdir = Some(PathBuf::from("/tmp"));
        fits.limits.memory = "64M".parse().unwrap();
        fits.limits.cpus_millis = 250;
        fits.limits.pids = 10;
        fits.limits.timeout = Some("1m".parse().unwrap());
        assert!(fits_warm(&template, &fits));
        type Change = Box<dyn Fn(&mut Spec)>;
        let unfit: Vec<(&str, Change)> = vec![
            (
                "image",
                Box::new(|s| s.image = Image::Path("/srv/root".into())),
            ),
            (
                "stored image",
                Box::new(|s| s.image = Image::Ref("app:v1".into())),
            ),
            ("user", Box::new(|s| s.user = "1000".parse().unwrap())),
            ("hostname", Box::new(|s| s.hostname = Some("web".into()))),
            ("disk", Box::new(|s| s.limits.disk = "1G".parse().unwrap())),
            ("network", Box::new(|s| s.net = NetMode::Egress)),
            ("terminal", Box::new(|s| s.tty = true)),
            (
                "binds",
                Box::new(|s| s.mounts = vec!["/srv:/srv".parse().unwrap()]),
            ),
        ];
        for (what, change) in unfit {
            let mut s = fits.clone();
            change(&mut s);
            assert!(!fits_warm(&template, &s), "{what}");
        }
        // A stored image's pool takes creates of that image only, named alike.
        let mut image = template.clone();
        image.image = Image::Ref("app:v1".into());
        let mut same = fits.clone();
        same.image = image.image.clone();
        assert!(fits_warm(&image, &same));
        same.image = Image::Ref("app:v2".into());
        assert!(!fits_warm(&image, &same));
        assert!(!fits_warm(&image, &fits));
        // A directory image is not pooled: its tree can change under the same name.
        let mut dir = template.clone();
        dir.image = Image::Path("/srv/root".into());
        let mut s = fits.clone();
        s.image = dir.image.clone();
        assert!(!fits_warm(&dir, &s));
    }
}
