//! `cove exec-in`: the helper process through which the server reaches inside a running
//! sandbox (a command, a streaming command with or without a terminal, a file operation), and
//! [`HelperExec`], the server's side that starts it. Joining a sandbox's namespaces needs a
//! single-threaded process, which the server is not: each job gets a fresh helper.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

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

/// `cove exec-in`: exits with the command's exit code (or the file operation's).
pub fn exec_in(args: ExecInArgs) -> anyhow::Result<ExitCode> {
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
        Ok(code) => Ok(ExitCode::from(code.clamp(0, 255) as u8)),
        // Cove's own failure goes where the server reads it, not into the command's stderr.
        Err(e) => match error_file {
            Some(mut f) => {
                f.write_all(crate::chain(&e).as_bytes())
                    .context("write the error file")?;
                Ok(ExitCode::from(crate::EXIT_COVE_FAILED))
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

/// Starts a `cove exec-in` helper for each job of the API.
pub struct HelperExec {
    /// The sandboxes' directories.
    pub root: PathBuf,
    /// This binary.
    pub cove: PathBuf,
}

impl cove_api::Executor for HelperExec {
    fn start(&self, id: SandboxId, job: Job) -> Result<Session, ExecError> {
        start(&self.cove, &self.root.join(id.as_str()), job)
    }
}

fn internal(what: &str, e: &dyn std::fmt::Display) -> ExecError {
    ExecError::Internal(format!("{what}: {e}"))
}

fn start(cove: &Path, dir: &Path, job: Job) -> Result<Session, ExecError> {
    let err_file = dir.join(format!(
        "exec-{}.err",
        cove_api::new_token().map_err(|e| internal("randomness", &e))?
    ));
    let mut cmd = tokio::process::Command::new(cove);
    cmd.arg("exec-in")
        .arg(dir)
        .arg("--error-file")
        .arg(&err_file);
    let mut stdin = std::process::Stdio::null();
    match job {
        Job::Exec { req, stream } => {
            for (k, v) in &req.env {
                cmd.arg("-e").arg(format!("{k}={v}"));
            }
            if let Some(w) = &req.workdir {
                cmd.arg("-w").arg(w);
            }
            if let Some(tty) = stream {
                cmd.arg("--stream");
                if tty {
                    cmd.arg("--tty");
                }
                stdin = std::process::Stdio::piped();
            }
            cmd.arg("--").args(&req.cmd);
        }
        Job::Files { op, path, mode } => {
            cmd.arg("--files").arg(op.as_str()).arg("--path").arg(path);
            if let Some(m) = mode {
                cmd.arg("--mode").arg(format!("{m:o}"));
            }
            if op.takes_input() {
                stdin = std::process::Stdio::piped();
            }
        }
    }
    cmd.env_clear()
        .stdin(stdin)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| internal("start cove exec-in", &e))?;
    let pid = child
        .id()
        .and_then(|p| rustix::process::Pid::from_raw(p as i32));
    let ended = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = {
        let ended = ended.clone();
        Box::new(move || terminate(pid, &ended))
    };
    let stdin: Box<dyn tokio::io::AsyncWrite + Send + Unpin> = match child.stdin.take() {
        Some(s) => Box::new(s),
        None => Box::new(tokio::io::sink()),
    };
    let stdout = Box::new(child.stdout.take().expect("piped"));
    let stderr = Box::new(child.stderr.take().expect("piped"));
    // Dropped with the session: a helper still running is asked to end (SIGTERM), never
    // killed. Killing it would orphan its child inside the sandbox, whose new parent is then
    // this server's reaper outside the sandbox; until that reaper collects it, the sandbox's
    // pid namespace cannot end. Tokio reaps a dropped helper once it exits.
    let guard = TermOnDrop {
        pid,
        ended: ended.clone(),
    };
    let done = Box::pin(async move {
        let _guard = guard;
        let status = child.wait().await;
        ended.store(true, std::sync::atomic::Ordering::SeqCst);
        let status = status.map_err(|e| internal("wait for cove exec-in", &e))?;
        let helper_error = fs::read_to_string(&err_file).unwrap_or_default();
        let _ = fs::remove_file(&err_file);
        if !helper_error.is_empty() {
            return Err(if helper_error.contains("is not running") {
                ExecError::NotRunning
            } else {
                ExecError::Internal(helper_error)
            });
        }
        Ok(status.code().unwrap_or(125))
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
fn terminate(pid: Option<rustix::process::Pid>, ended: &std::sync::atomic::AtomicBool) {
    if let Some(pid) = pid
        && !ended.load(std::sync::atomic::Ordering::SeqCst)
    {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    }
}

struct TermOnDrop {
    pid: Option<rustix::process::Pid>,
    ended: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Drop for TermOnDrop {
    fn drop(&mut self) {
        terminate(self.pid, &self.ended);
    }
}
