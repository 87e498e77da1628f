//! The `cove` binary: one program for every role: `cove run` (one sandbox, no server), `cove
//! serve` (the control plane) and its client commands, `cove image`, `cove gc`, and the helpers
//! the server starts (`supervise`, `exec-in`).

#![forbid(unsafe_code)]

mod attach;
mod client;
mod cp;
mod edge;
mod exec_in;
mod files;
mod image;
mod pull;
mod reaper;
mod run;
mod serve;

use std::process::ExitCode;

use clap::{Args, FromArgMatches, Parser, Subcommand};

/// Exit code when Cove itself fails (as `docker run` does).
pub const EXIT_COVE_FAILED: u8 = 125;

#[derive(Parser)]
#[command(
    name = "cove",
    version,
    about = "Run untrusted code in isolated Linux sandboxes",
    long_about = "Cove runs untrusted code in isolated Linux sandboxes: namespaces, a private root \
                  filesystem, cgroup limits, dropped capabilities and a seccomp filter, started in \
                  milliseconds.",
    after_help = "Examples:\n  cove run -- python3 -c 'print(1)'\n  cove run --memory 256M --timeout 10s -- sh -c 'make test'\n  cove run -it -- bash\n  cove image pull localhost:5000/busybox && cove run --image localhost:5000/busybox\n  cove gc"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    conn: client::Conn,
}

#[derive(Subcommand)]
enum Command {
    #[command(flatten_help = false)]
    Run(Box<run::RunArgs>),
    Serve(Box<serve::ServeArgs>),
    #[command(flatten)]
    Client(client::ClientCommand),
    /// Run a command or a file operation in a running sandbox of `cove serve` (started by the
    /// server for each exec and file request).
    #[command(hide = true)]
    ExecIn(exec_in::ExecInArgs),
    /// Supervise one sandbox of `cove serve` (started by its node agent, not by hand).
    #[command(hide = true)]
    Supervise {
        /// The sandbox's directory.
        dir: std::path::PathBuf,
        /// Start it warm for this spec (JSON); the spec to run comes on stdin when claimed.
        #[arg(long)]
        warm: Option<String>,
    },
    /// Fork the supervisors of `cove serve` (started by its node agent, not by hand).
    #[command(hide = true)]
    Spawner {
        /// The server's sandboxes directory (named so that `ps` says whose spawner this is).
        dir: std::path::PathBuf,
    },
    /// Manage stored images (pull, import, ls, inspect, rm, prune).
    #[command(
        subcommand,
        after_help = "Images are stored under /var/lib/cove/images ($COVE_IMAGE_STORE overrides it)."
    )]
    Image(image::ImageCommand),
    /// Remove what sandboxes whose `cove run` was killed left behind (cgroups, state, processes).
    Gc {
        /// Print what was removed as JSON.
        #[arg(long)]
        json: bool,
        /// Also remove Cove's stock: the pool of ready network namespaces, and the egress
        /// set-up (the nftables table `inet cove`, IPv4 forwarding as it was) when no sandbox
        /// has egress.
        #[arg(long)]
        pool: bool,
    },
}

/// The commands started once per sandbox or per exec (`run`, `supervise`, `exec-in`), parsed
/// by a parser of that command alone: building the whole command tree takes about half a
/// millisecond, a share of every sandbox's start. Anything that parser does not accept (help
/// included) goes to the full one, which answers as it always does.
fn parse_hot() -> Option<Command> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let sub = args.get(1)?.to_str()?;
    // The subcommand's name stands in for the program's.
    let rest = &args[1..];
    match sub {
        "run" => {
            let cmd = run::RunArgs::augment_args(clap::Command::new("run"));
            let m = cmd.try_get_matches_from(rest).ok()?;
            let a = run::RunArgs::from_arg_matches(&m).ok()?;
            Some(Command::Run(Box::new(a)))
        }
        "exec-in" => exec_in_args(rest),
        "supervise" => supervise_args(rest),
        "spawner" => match rest {
            [_, dir] => Some(Command::Spawner { dir: dir.into() }),
            _ => None,
        },
        _ => None,
    }
}

/// `exec-in`'s arguments (the subcommand's name first).
fn exec_in_args(args: &[std::ffi::OsString]) -> Option<Command> {
    let cmd = exec_in::ExecInArgs::augment_args(clap::Command::new("exec-in"));
    let m = cmd.try_get_matches_from(args).ok()?;
    exec_in::ExecInArgs::from_arg_matches(&m)
        .ok()
        .map(Command::ExecIn)
}

/// `supervise DIR` or `supervise --warm TEMPLATE DIR` (the subcommand's name first).
fn supervise_args(args: &[std::ffi::OsString]) -> Option<Command> {
    match args {
        [_, dir] if !dir.to_str().is_some_and(|d| d.starts_with('-')) => Some(Command::Supervise {
            dir: dir.into(),
            warm: None,
        }),
        [_, flag, template, dir]
            if flag == "--warm" && !dir.to_str().is_some_and(|d| d.starts_with('-')) =>
        {
            Some(Command::Supervise {
                dir: dir.into(),
                warm: Some(template.to_str()?.to_owned()),
            })
        }
        _ => None,
    }
}

/// What the spawner's children run (see `cove_jail::spawner`): a supervisor or an exec
/// helper, as `cove supervise` or `cove exec-in` would; its exit code.
fn spawned(args: Vec<String>) -> i32 {
    let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
    let ran = match args.first().and_then(|a| a.to_str()) {
        Some("supervise") => supervise_args(&args),
        Some("exec-in") => exec_in_args(&args),
        _ => None,
    };
    let result = match ran {
        Some(Command::Supervise { dir, warm }) => serve::supervise(dir, warm).map(|_| 0),
        Some(Command::ExecIn(a)) => exec_in::exec_in(a),
        _ => Err(anyhow::anyhow!(
            "the spawner starts supervisors and exec helpers only, not {args:?}"
        )),
    };
    match result {
        Ok(code) => i32::from(code),
        Err(e) => {
            eprintln!("cove: {}", chain(&e));
            i32::from(EXIT_COVE_FAILED)
        }
    }
}

fn main() -> ExitCode {
    let (command, conn) = match parse_hot() {
        Some(command) => (command, None),
        None => {
            let cli = parse_or_exit();
            (cli.command, Some(cli.conn))
        }
    };
    let result = match command {
        Command::Run(args) => run::run(*args),
        Command::Gc { json, pool } => run::gc(json, pool),
        Command::Image(cmd) => image::image(cmd),
        Command::Serve(args) => serve::serve(*args),
        Command::Supervise { dir, warm } => serve::supervise(dir, warm),
        Command::Spawner { dir: _ } => serve::spawner(&spawned),
        Command::ExecIn(args) => exec_in::exec_in(args).map(ExitCode::from),
        Command::Client(cmd) => client::client(
            conn.as_ref()
                .expect("client commands come from the full parser"),
            cmd,
        ),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cove: {}", chain(&e));
            ExitCode::from(EXIT_COVE_FAILED)
        }
    }
}

/// The whole command line, or an exit: 0 after `--help` or `--version`, and
/// [`EXIT_COVE_FAILED`] after an error in it (clap's own is 2). `cove run` and `cove exec`
/// exit with their command's code, and a command may well exit 2: a mistyped option must not
/// look like one (`docker` does the same).
fn parse_or_exit() -> Cli {
    Cli::try_parse().unwrap_or_else(|e| {
        let _ = e.print();
        let code = if e.use_stderr() {
            i32::from(EXIT_COVE_FAILED)
        } else {
            0
        };
        std::process::exit(code)
    })
}

/// "outer: inner: innermost" on one line.
pub(crate) fn chain(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = e
        .chain()
        .map(|c| c.to_string())
        .filter(|s| !s.is_empty())
        .collect();
    // A wrapper that displays its source as its own message would say it twice.
    parts.dedup();
    parts.join(": ")
}
