//! `cove exec-in`: the helper process through which the server reaches inside a running
//! sandbox (a command, a streaming command with or without a terminal, a file operation), and
//! [`HelperExec`], the server's side that starts it. Joining a sandbox's namespaces needs a
//! single-threaded process, which the server is not: each job gets a fresh helper.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow};
use cove_api::{ExecError, FileOp, Job, Session};
use cove_types::{SandboxId, Spec};

use crate::files;

/// The helper's arguments (`cove exec-in --help`, hidden).
#[derive(clap::Args, Debug)]
pub struct ExecInArgs {
    /// The sandbox's directory.
    dir: PathBuf,
    /// Environment variable KEY=VALUE.
    #[arg(short = 'e', long = "env")]
    env: Vec<String>,
    /// Working directory.
    #[arg(short = 'w', long = "workdir")]
    workdir: Option<PathBuf>,
    /// Write Cove's own failure here instead of to stderr.
    #[arg(long)]
    error_file: Option<PathBuf>,
    /// Stdin carries control frames (input, end of input, window size, signals).
    #[arg(long)]
    stream: bool,
    /// With --stream: give the command a terminal.
    #[arg(long, requires = "stream")]
    tty: bool,
    /// A file operation on --path instead of a command.
    #[arg(long, value_parser = str::parse::<FileOp>, requires = "path", conflicts_with_all = ["stream", "cmd"])]
    files: Option<FileOp>,
    /// The file operation's path (absolute, in the sandbox).
    #[arg(long)]
    path: Option<PathBuf>,
    /// Permission bits (octal) of a file written or a directory made.
    #[arg(long, value_parser = parse_mode)]
    mode: Option<u32>,
    /// The command.
    #[arg(trailing_var_arg = true, required_unless_present = "files")]
    cmd: Vec<String>,
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("{s:?} is not an octal mode"))
}

/// `cove exec-in`: exits with the command's exit code (or the file operation's), which this
/// returns.
pub fn exec_in(args: ExecInArgs) -> anyhow::Result<u8> {
    // Opened before the helper enters the sandbox: from then on, paths are the sandbox's.
    let error_file = args
        .error_file
        .as_ref()
        .map(|f| {
            fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(f)
                .with_context(|| format!("open {}", f.display()))
        })
        .transpose()?;
    match exec_in_sandbox(args) {
        Ok(code) => Ok(code.clamp(0, 255) as u8),
        // Cove's own failure goes where the server reads it, not into the command's stderr.
        Err(e) => match error_file {
            Some(mut f) => {
                f.write_all(crate::chain(&e).as_bytes())
                    .context("write the error file")?;
                Ok(crate::EXIT_COVE_FAILED)
            }
            None => Err(e),
        },
    }
}

fn exec_in_sandbox(args: ExecInArgs) -> anyhow::Result<i32> {
    let id = crate::serve::dir_id(&args.dir)?;
    let path = args.dir.join("resolved.json");
    let bytes = fs::read(&path).map_err(|_| anyhow!("sandbox {id} is not running"))?;
    let spec: Spec = serde_json::from_slice(&bytes).context("the sandbox spec is invalid")?;
    if let Some(op) = args.files {
        let path = args.path.expect("clap requires --path");
        let mode = args.mode;
        return Ok(cove_jail::exec::call(&spec, &id, None, || {
            files::run(op, &path, mode)
        })?);
    }
    let env = args
        .env
        .iter()
        .map(|e| e.parse::<cove_types::EnvVar>())
        .collect::<Result<Vec<_>, _>>()?;
    let exec = cove_jail::exec::ExecSpec {
        cmd: args.cmd,
        env,
        workdir: args.workdir,
        user: None,
    };
    let io = if args.stream {
        cove_jail::exec::Io::Stream { tty: args.tty }
    } else {
        cove_jail::exec::Io::Inherit
    };
    Ok(cove_jail::exec::exec(&spec, &id, &exec, io)?)
}

/// Starts a `cove exec-in` helper for each job of the API, forked by the server's spawner
/// (see `cove_agent::Spawning`): a start of the binary anew would cost more than the helper's
/// own work.
pub struct HelperExec {
    /// The sandboxes' directories.
    pub root: PathBuf,
    /// The server's spawner.
    pub spawning: std::sync::Arc<cove_agent::Spawning>,
}

impl cove_api::Executor for HelperExec {
    fn start(&self, id: SandboxId, job: Job) -> Result<Session, ExecError> {
        start(&self.spawning, &self.root.join(id.as_str()), job)
    }
}

fn internal(what: &str, e: &dyn std::fmt::Display) -> ExecError {
    ExecError::Internal(format!("{what}: {e}"))
}

fn start(spawning: &cove_agent::Spawning, dir: &Path, job: Job) -> Result<Session, ExecError> {
    use std::os::fd::AsFd;
    let err_file = dir.join(format!(
        "exec-{}.err",
        cove_api::new_token().map_err(|e| internal("randomness", &e))?
    ));
    let mut args: Vec<String> = vec![
        "exec-in".into(),
        dir.to_string_lossy().into_owned(),
        "--error-file".into(),
        err_file.to_string_lossy().into_owned(),
    ];
    let mut input = false;
    match job {
        Job::Exec { req, stream } => {
            for (k, v) in &req.env {
                args.extend(["-e".into(), format!("{k}={v}")]);
            }
            if let Some(w) = &req.workdir {
                args.extend(["-w".into(), w.clone()]);
            }
            if let Some(tty) = stream {
                args.push("--stream".into());
                if tty {
                    args.push("--tty".into());
                }
                input = true;
            }
            args.push("--".into());
            args.extend(req.cmd.iter().cloned());
        }
        Job::Files { op, path, mode } => {
            args.extend([
                "--files".into(),
                op.as_str().into(),
                "--path".into(),
                path.clone(),
            ]);
            if let Some(m) = mode {
                args.extend(["--mode".into(), format!("{m:o}")]);
            }
            input = op.takes_input();
        }
    }
    let pipe = || {
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(|e| internal("create a pipe", &e))
    };
    let (stdin_r, stdin_w) = if input {
        let (r, w) = pipe()?;
        (r, Some(w))
    } else {
        let null = fs::File::open("/dev/null").map_err(|e| internal("open /dev/null", &e))?;
        (std::os::fd::OwnedFd::from(null), None)
    };
    let (stdout_r, stdout_w) = pipe()?;
    let (stderr_r, stderr_w) = pipe()?;
    // Where the spawner writes the helper's wait status once it has collected it.
    let (exit_r, exit_w) = pipe()?;
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let pidfd = spawning
        .spawn(
            &argv,
            [stdin_r.as_fd(), stdout_w.as_fd(), stderr_w.as_fd()],
            Some(exit_w.as_fd()),
        )
        .map_err(|e| internal("start cove exec-in", &e))?;
    drop((stdin_r, stdout_w, stderr_w, exit_w));
    let pidfd = std::sync::Arc::new(pidfd);
    let ended = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = {
        let (pidfd, ended) = (pidfd.clone(), ended.clone());
        Box::new(move || terminate(&pidfd, &ended))
    };
    let reader = |fd| {
        tokio::net::unix::pipe::Receiver::from_owned_fd(fd)
            .map_err(|e| internal("read cove exec-in", &e))
    };
    let stdin: Box<dyn tokio::io::AsyncWrite + Send + Unpin> = match stdin_w {
        Some(w) => Box::new(
            tokio::net::unix::pipe::Sender::from_owned_fd(w)
                .map_err(|e| internal("write to cove exec-in", &e))?,
        ),
        None => Box::new(tokio::io::sink()),
    };
    let stdout = Box::new(reader(stdout_r)?);
    let stderr = Box::new(reader(stderr_r)?);
    let exit = reader(exit_r)?;
    // Dropped with the session: a helper still running is asked to end (SIGTERM), never
    // killed. Killing it would orphan its child inside the sandbox, whose new parent is then
    // this server's reaper outside the sandbox; until that reaper collects it, the sandbox's
    // pid namespace cannot end. The spawner collects the helper once it exits.
    let guard = TermOnDrop {
        pidfd,
        ended: ended.clone(),
    };
    let done = Box::pin(async move {
        use std::os::unix::process::ExitStatusExt;
        use tokio::io::AsyncReadExt;
        let _guard = guard;
        let mut said = String::new();
        let read = tokio::io::BufReader::new(exit)
            .read_to_string(&mut said)
            .await;
        ended.store(true, std::sync::atomic::Ordering::SeqCst);
        read.map_err(|e| internal("wait for cove exec-in", &e))?;
        let status: i32 = said
            .trim()
            .parse()
            .map_err(|_| internal("wait for cove exec-in", &"its exit went unreported"))?;
        let helper_error = fs::read_to_string(&err_file).unwrap_or_default();
        let _ = fs::remove_file(&err_file);
        if !helper_error.is_empty() {
            return Err(if helper_error.contains("is not running") {
                ExecError::NotRunning
            } else {
                ExecError::Internal(helper_error)
            });
        }
        Ok(std::process::ExitStatus::from_raw(status)
            .code()
            .unwrap_or(125))
    });
    Ok(Session {
        stdin,
        stdout,
        stderr,
        stop,
        done,
    })
}

/// SIGTERM to a helper that has not ended: it kills its command's process group, reaps it, and
/// exits.
fn terminate(pidfd: &std::os::fd::OwnedFd, ended: &std::sync::atomic::AtomicBool) {
    if !ended.load(std::sync::atomic::Ordering::SeqCst) {
        let _ = rustix::process::pidfd_send_signal(pidfd, rustix::process::Signal::TERM);
    }
}

struct TermOnDrop {
    pidfd: std::sync::Arc<std::os::fd::OwnedFd>,
    ended: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for TermOnDrop {
    fn drop(&mut self) {
        terminate(&self.pidfd, &self.ended);
    }
}
