//! `cove run` and `cove gc`: flags to a [`Spec`], the jail, and the exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use cove_jail::cgroup::Hierarchy;
use cove_jail::run::{RunOptions, run as run_sandbox};
use cove_jail::state::{STATE_ROOT, gc as reap};
use cove_types::{
    BindMount, Duration, EnvVar, Image, NetMode, Reason, SandboxId, Size, Spec, User, parse_cpus,
};

/// The limits with no default, the same for `cove run` and `cove create`.
#[derive(clap::Args, Debug)]
pub struct MoreLimits {
    /// Wall-clock limit; the sandbox is killed when it runs out.
    #[arg(long, value_name = "DUR")]
    pub timeout: Option<Duration>,
    /// CPU-time limit for the whole sandbox (all processes together; reason cpu_time_limit).
    #[arg(long, value_name = "DUR")]
    pub cpu_time: Option<Duration>,
    /// Maximum open files per process.
    #[arg(long, value_name = "N")]
    pub nofile: Option<u64>,
    /// Largest file a process may write.
    #[arg(long, value_name = "SIZE")]
    pub fsize: Option<Size>,
}

#[derive(Args)]
#[command(
    about = "Run a command in a new sandbox and exit with its exit code",
    long_about = "Run CMD in a new sandbox: its own user, pid, mount, network, uts, ipc and cgroup \
        namespaces, a private root filesystem, cgroup limits, no capabilities and a seccomp filter. \
        stdio is the command's; the exit code is the command's (128+N after signal N, 125 when Cove \
        itself fails, 127 when CMD is not found). Nothing of the sandbox outlives the command.",
    after_help = "Sizes take K, M, G or T (binary: 1K = 1024); durations take ms, s, m, h (1m30s).\n\n\
        Examples:\n  cove run -- python3 -c 'print(1)'\n  \
        cove run --memory 1G --cpus 0.5 --timeout 30s -- ./build.sh\n  \
        cove run --image /srv/rootfs -v /data:/data -w /data -- ls\n  \
        cove run -it --user 1000 -- bash\n  \
        cove run --json -- false"
)]
pub struct RunArgs {
    /// Root filesystem: `host` (the host's /usr, /bin, /lib* read-only), a rootfs directory
    /// (absolute path) used read-only under a private writable layer, or a stored image
    /// (`busybox`, `app:v1`; see `cove image`), whose Entrypoint, Cmd, Env, WorkingDir and User
    /// apply unless flags override them.
    #[arg(long, value_name = "host|PATH", default_value = "host")]
    image: String,
    /// Memory limit, swap included.
    #[arg(long, value_name = "SIZE", default_value = "512M")]
    memory: Size,
    /// CPU quota in CPUs (fractions allowed: 0.5).
    #[arg(long, value_name = "N", default_value = "1")]
    cpus: String,
    /// Maximum number of processes and threads.
    #[arg(long, value_name = "N", default_value_t = cove_types::DEFAULT_PIDS)]
    pids: u64,
    /// Size of the private writable layer (/, /tmp, /home, /dev/shm…), discarded at exit.
    #[arg(long, value_name = "SIZE", default_value = "256M")]
    disk: Size,
    #[command(flatten)]
    more_limits: MoreLimits,
    /// Set an environment variable (KEY=VAL), or pass the host's value of KEY explicitly. The host
    /// environment is never inherited otherwise.
    #[arg(short = 'e', long = "env", value_name = "KEY=VAL")]
    env: Vec<String>,
    /// Read environment variables from a file (KEY=VAL per line; # comments).
    #[arg(long, value_name = "FILE")]
    env_file: Vec<PathBuf>,
    /// Working directory inside the sandbox.
    #[arg(short = 'w', long, value_name = "DIR")]
    workdir: Option<PathBuf>,
    /// Hostname inside the sandbox (default: the sandbox id).
    #[arg(long, value_name = "NAME")]
    hostname: Option<String>,
    /// User to run as inside the sandbox (root inside is unprivileged on the host).
    #[arg(short = 'u', long, value_name = "UID[:GID]")]
    user: Option<User>,
    /// Bind a host path into the sandbox, read-only unless `:rw`. Root inside the sandbox is
    /// uid 1500000000 on the host (uid N inside is 1500000000+N), so a `:rw` volume must be
    /// writable by that uid, e.g. `chown 1500000000 DIR`.
    #[arg(short = 'v', long = "volume", value_name = "SRC:DST[:ro|rw]")]
    volume: Vec<BindMount>,
    /// Allocate a pseudo-terminal (window size and Ctrl-C pass through).
    #[arg(short = 't', long)]
    tty: bool,
    /// Keep stdin attached (it always is; accepted for `docker run -i` habits).
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Network: `none` gives the sandbox only its own loopback; `egress` adds eth0 with a
    /// route out through the host (NAT) and DNS, never to cloud metadata, the host itself or
    /// private ranges.
    #[arg(long, value_name = "MODE", default_value = "none")]
    net: String,
    /// With --net egress: only these destinations, A.B.C.D[/N][:PORT[-PORT]] (repeatable).
    #[arg(long, value_name = "RULE")]
    allow: Vec<cove_types::egress::EgressRule>,
    /// With --net egress: never these destinations, A.B.C.D[/N][:PORT[-PORT]] (repeatable).
    #[arg(long, value_name = "RULE")]
    deny: Vec<cove_types::egress::EgressRule>,
    /// After exit, print one JSON object (exit code, signal, reason, times, peak memory) as the
    /// last line of stdout.
    #[arg(long)]
    json: bool,
    /// Use this sandbox id (12 lowercase hex characters) instead of a random one; it names every
    /// host object of the sandbox (cgroup cove-ID, lock file /run/cove/ID).
    #[arg(long, value_name = "ID")]
    id: Option<SandboxId>,
    /// Build /dev on a tmpfs with binds of the host's nodes instead of binding Cove's /dev
    /// template (what happens anyway where /var/lib is mounted nodev).
    #[arg(long, hide = true)]
    dev_tmpfs: bool,
    /// Print where the start-up time went, on stderr.
    #[arg(long, hide = true)]
    timing: bool,
    /// When to pull an image REF from its registry: `missing` (not stored yet), `always`
    /// (refresh the tag first), `never` (fail if it is not stored).
    #[arg(
        long,
        value_name = "WHEN",
        default_value = "missing",
        help_heading = "Registry"
    )]
    pull: crate::image::PullPolicy,
    #[command(flatten)]
    registry: crate::pull::RegistryArgs,
    /// The command and its arguments (optional with an image that has a Cmd or Entrypoint).
    #[arg(trailing_var_arg = true, value_name = "CMD")]
    cmd: Vec<String>,
}

impl RunArgs {
    fn spec(&self) -> anyhow::Result<Spec> {
        let mut spec = Spec::new(self.cmd.clone());
        spec.image = self.image.parse::<Image>()?;
        spec.net = self.net.parse::<NetMode>()?;
        spec.egress.allow = self.allow.clone();
        spec.egress.deny = self.deny.clone();
        spec.limits.memory = self.memory;
        spec.limits.cpus_millis = parse_cpus(&self.cpus)?;
        spec.limits.pids = self.pids;
        spec.limits.disk = self.disk;
        let more = &self.more_limits;
        spec.limits.timeout = more.timeout;
        spec.limits.cpu_time = more.cpu_time;
        spec.limits.nofile = more.nofile;
        spec.limits.fsize = more.fsize;
        for file in &self.env_file {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("--env-file {}", file.display()))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                spec.env.push(
                    env_entry(line).with_context(|| format!("{}:{}", file.display(), n + 1))?,
                );
            }
        }
        for e in &self.env {
            spec.env.push(env_entry(e)?);
        }
        spec.workdir = self.workdir.clone();
        spec.hostname = self.hostname.clone();
        spec.user = self.user.unwrap_or_default();
        spec.mounts = self.volume.clone();
        spec.tty = self.tty;
        Ok(spec)
    }
}

/// `KEY=VAL`, or `KEY` alone to pass the host's value explicitly (as `docker run -e KEY`).
fn env_entry(s: &str) -> anyhow::Result<EnvVar> {
    if s.contains('=') {
        return Ok(s.parse()?);
    }
    match std::env::var(s) {
        Ok(value) => Ok(EnvVar {
            key: s.to_string(),
            value,
        }),
        Err(_) => bail!("-e {s}: no '=' and no such variable on the host"),
    }
}

/// `cove run`.
pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let mut spec = args.spec()?;
    // Pinned until the sandbox is gone, so that `cove image prune` leaves its layers alone.
    let pinned = match spec.image.clone() {
        Image::Ref(reference) => {
            let given = crate::image::Overrides {
                cmd_given: !args.cmd.is_empty(),
                workdir_given: args.workdir.is_some(),
                user_given: args.user.is_some(),
            };
            Some(crate::image::resolve(
                &reference,
                &mut spec,
                &given,
                args.pull,
                &args.registry,
            )?)
        }
        Image::Host | Image::Path(_) => None,
    };
    spec.validate()?;
    let opts = RunOptions {
        timing: args.timing,
        id: args.id,
        no_dev_template: args.dev_tmpfs,
        layers: pinned.as_ref().map(|p| p.dirs.clone()),
        state_root: None,
        detach: None,
        init_file: None,
        quiet: false,
        freezer: false,
        warm: false,
    };
    let report = run_sandbox(&spec, &opts)?;
    drop(pinned);
    if let Some(msg) = &report.message {
        eprintln!("cove: {msg}");
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    let code = if report.reason == Reason::Error {
        crate::EXIT_COVE_FAILED
    } else {
        report.exit_code.clamp(0, 255) as u8
    };
    Ok(ExitCode::from(code))
}

/// `cove gc`.
pub fn gc(json: bool, pool: bool) -> anyhow::Result<ExitCode> {
    let hierarchy = Hierarchy::detect()?;
    let root = std::path::Path::new(STATE_ROOT);
    let mut report = reap(
        root,
        &hierarchy,
        cove_jail::state::Scope::Everything,
        &|_| false,
    );
    if pool {
        let n = cove_jail::netns::drain(root);
        if n > 0 {
            report
                .removed
                .push(format!("{n} pooled network namespaces"));
        }
        report
            .removed
            .extend(cove_jail::egress::remove_host_setup());
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"removed": report.removed, "failed": report.failed})
        );
    } else {
        for line in &report.removed {
            println!("removed {line}");
        }
        for line in &report.failed {
            eprintln!("cove: could not remove {line}");
        }
        if report.removed.is_empty() && report.failed.is_empty() {
            println!("nothing to remove");
        }
    }
    Ok(if report.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
