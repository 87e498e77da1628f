//! `cove serve` (the API, the state store and the node agent in one process) and
//! `cove supervise` (the per-sandbox supervisor the agent starts).

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, anyhow, bail};
use clap::Args;
use cove_api::{Api, TokenRecord, register_token, router};
use cove_jail::run::{RunOptions, run as run_sandbox};
use cove_store::Embedded;
use cove_types::{Image, Reason, RunReport, SandboxId, Spec};

/// Where `cove serve` keeps its state by default.
pub const DATA_DIR: &str = "/var/lib/cove";
/// The admin token's file name in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

#[derive(Args)]
#[command(
    about = "Run the Cove server: the REST API, the state store and the node agent",
    long_about = "Run the Cove server on this machine: the REST API (default 127.0.0.1:7070), an \
        embedded state store and the node agent that starts and supervises sandboxes. On first \
        start it creates an admin token in a root-only file and prints its path. Sandboxes are \
        not children of the server: stopping or restarting it (even kill -9) leaves them running, \
        and the next start adopts them.",
    after_help = "Examples:\n  cove serve\n  cove serve --listen 0.0.0.0:7070 --data-dir /srv/cove\n  \
        COVE_TOKEN=$(cat /var/lib/cove/admin-token) cove create -- sleep 60"
)]
pub struct ServeArgs {
    /// Address and port the API listens on.
    #[arg(
        long,
        value_name = "ADDR:PORT",
        default_value = "127.0.0.1:7070",
        env = "COVE_LISTEN"
    )]
    listen: SocketAddr,
    /// Where Cove keeps its state: the store, the sandboxes' directories, the admin token.
    #[arg(long, value_name = "DIR", default_value = DATA_DIR, env = "COVE_DATA_DIR")]
    data_dir: PathBuf,
    /// Default quota of a tenant: sandboxes not yet ended.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 100,
        help_heading = "Tenant quotas"
    )]
    quota_sandboxes: u32,
    /// Default quota of a tenant: sum of its sandboxes' memory limits.
    #[arg(
        long,
        value_name = "SIZE",
        default_value = "64G",
        help_heading = "Tenant quotas"
    )]
    quota_memory: cove_types::Size,
    /// Default quota of a tenant: sum of its sandboxes' CPUs.
    #[arg(
        long,
        value_name = "N",
        default_value = "32",
        help_heading = "Tenant quotas"
    )]
    quota_cpus: String,
}

/// `cove serve`.
pub fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the server's runtime")?;
    runtime.block_on(serve_async(args))
}

async fn serve_async(args: ServeArgs) -> anyhow::Result<ExitCode> {
    cove_image::tls::install_default_provider();
    let data = &args.data_dir;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(data)
        .with_context(|| format!("create {}", data.display()))?;
    let db = data.join("state.redb");
    let store = Embedded::open(&db)
        .await
        .with_context(|| format!("open the state store in {}", data.display()))?;
    // Specs hold environment values, which may be secrets: root only.
    fs::set_permissions(&db, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .with_context(|| format!("restrict {}", db.display()))?;
    let token_path = data.join(ADMIN_TOKEN_FILE);
    let token = admin_token(&token_path)?;
    register_token(
        &store,
        &token,
        &TokenRecord {
            tenant: "admin".into(),
            admin: true,
        },
    )
    .await
    .context("record the admin token")?;
    let cove = std::env::current_exe().context("find the cove binary")?;
    let agent = cove_agent::Agent::new(store.clone(), data.join("sandboxes"), cove)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listen on {}", args.listen))?;
    eprintln!("cove: listening on http://{}", listener.local_addr()?);
    eprintln!("cove: admin token in {}", token_path.display());
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    let executor = std::sync::Arc::new(crate::exec_in::HelperExec {
        root: data.join("sandboxes"),
        cove: std::env::current_exe().context("find the cove binary")?,
    });
    let api = Api {
        store,
        executor,
        sandboxes_dir: data.join("sandboxes"),
        default_quotas: cove_api::Quotas {
            sandboxes: args.quota_sandboxes,
            memory: args.quota_memory,
            cpus_millis: u64::from(cove_types::parse_cpus(&args.quota_cpus)?),
        },
        quota_locks: Default::default(),
    };
    let server = axum::serve(listener, router(api)).with_graceful_shutdown(shutdown);
    tokio::select! {
        served = server => served.context("serve the API")?,
        ended = agent.run() => {
            ended.context("the node agent failed")?;
        }
    }
    eprintln!("cove: stopped; running sandboxes keep running and are adopted at the next start");
    Ok(ExitCode::SUCCESS)
}

/// The sandbox id a sandbox directory is named by.
pub(crate) fn dir_id(dir: &Path) -> anyhow::Result<SandboxId> {
    dir.file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("")
        .parse()
        .context("the directory is not named by a sandbox id")
}

/// The admin token, created (root-only) on first start.
fn admin_token(path: &Path) -> anyhow::Result<String> {
    match fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => bail!(
            "{} is empty; remove it to get a new admin token",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    }
    let token = cove_api::new_token().context("generate the admin token")?;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    writeln!(file, "{token}").with_context(|| format!("write {}", path.display()))?;
    Ok(token)
}

/// `cove supervise DIR`: runs the sandbox described by `DIR/spec.json` (DIR is named by the
/// sandbox id), with `DIR/lock` held for its whole life, and writes `DIR/report.json` at the end.
/// Its stdout and stderr are the sandbox's logs (the agent opens them).
pub fn supervise(dir: PathBuf) -> anyhow::Result<ExitCode> {
    let lock_path = dir.join("lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .with_context(|| format!("open {}", lock_path.display()))?;
    lock.try_lock()
        .map_err(|_| anyhow!("another supervisor runs {}", dir.display()))?;
    // Whoever holds the lock says who it is (the agent signals it by this pid, after checking
    // the lock is still held, so a recycled pid is never signalled).
    let pid_path = dir.join("pid");
    fs::write(&pid_path, std::process::id().to_string())
        .with_context(|| format!("write {}", pid_path.display()))?;
    let id = dir_id(&dir)?;
    let report = match supervised_run(&dir, id) {
        Ok(r) => r,
        Err(e) => RunReport {
            id: id.to_string(),
            exit_code: i32::from(crate::EXIT_COVE_FAILED),
            signal: None,
            reason: Reason::Error,
            message: Some(crate::chain(&e)),
            wall_time_ms: 0.0,
            cpu_time_ms: 0.0,
            peak_memory_bytes: 0,
        },
    };
    let tmp = dir.join("report.json.tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("write {}", tmp.display()))?;
    fs::rename(&tmp, dir.join("report.json")).context("put the report in place")?;
    drop(lock);
    Ok(ExitCode::SUCCESS)
}

/// The supervisor's stdout is a pipe to the agent, told `started` when the command runs; the
/// sandbox's stdout is `stdout.log`, put in its place here.
fn take_notify_pipe(dir: &Path) -> anyhow::Result<std::sync::Arc<fs::File>> {
    let notify = rustix::io::fcntl_dupfd_cloexec(std::io::stdout(), 3)
        .context("keep the notification pipe")?;
    let log_path = dir.join("stdout.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&log_path)
        .with_context(|| format!("open {}", log_path.display()))?;
    rustix::stdio::dup2_stdout(&log).context("send stdout to the log")?;
    Ok(std::sync::Arc::new(fs::File::from(notify)))
}

fn supervised_run(dir: &Path, id: SandboxId) -> anyhow::Result<RunReport> {
    let notify = take_notify_pipe(dir)?;
    let spec_path = dir.join("spec.json");
    let bytes = fs::read(&spec_path).with_context(|| format!("read {}", spec_path.display()))?;
    let mut spec: Spec = serde_json::from_slice(&bytes).context("the sandbox spec is invalid")?;
    let pinned = match spec.image.clone() {
        Image::Ref(reference) => {
            let given = crate::image::Overrides {
                cmd_given: !spec.cmd.is_empty(),
                workdir_given: spec.workdir.is_some(),
                user_given: false,
            };
            Some(crate::image::resolve(
                &reference,
                &mut spec,
                &given,
                crate::image::PullPolicy::Missing,
                &crate::pull::RegistryArgs::default(),
            )?)
        }
        Image::Host | Image::Path(_) => None,
    };
    spec.validate()?;
    // What `exec` needs to run commands the way the main one runs (the image's environment,
    // working directory and user applied).
    let resolved = dir.join("resolved.json");
    fs::write(&resolved, serde_json::to_vec_pretty(&spec)?)
        .with_context(|| format!("write {}", resolved.display()))?;
    let opts = RunOptions {
        timing: false,
        id: Some(id),
        no_dev_template: false,
        layers: pinned.as_ref().map(|p| p.dirs.clone()),
        state_root: None,
        on_start: Some(notify),
        quiet: true,
        freezer: true,
    };
    let report = run_sandbox(&spec, &opts)?;
    drop(pinned);
    Ok(report)
}
