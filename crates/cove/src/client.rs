//! The client commands (`cove create`, `ls`, `inspect`, `stop`, `rm`, `wait`): the REST API
//! at `$COVE_URL` with `$COVE_TOKEN`, Docker's habits on the command line.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use cove_types::{Duration, Size};

/// How to reach the server.
#[derive(Args, Clone, Debug)]
pub struct Conn {
    /// The server's URL.
    #[arg(
        long,
        value_name = "URL",
        env = "COVE_URL",
        default_value = "http://127.0.0.1:7070",
        global = true
    )]
    url: String,
    /// The API token (on the server's own machine, root may leave it out: the admin token in
    /// /var/lib/cove/admin-token is used).
    #[arg(
        long,
        value_name = "TOKEN",
        env = "COVE_TOKEN",
        hide_env_values = true,
        global = true
    )]
    token: Option<String>,
}

#[derive(Subcommand)]
pub enum ClientCommand {
    /// Create a sandbox on the server and print its id (it starts right away).
    #[command(after_help = "Examples:\n  cove create -- sleep 300\n  \
        cove create --image localhost:5000/app:v1 --label user_id=42 --timeout 10m\n  \
        cove create --memory 1G --cpus 2 -e MODE=test -- python3 -m http.server")]
    Create(Box<CreateArgs>),
    /// List sandboxes (yours, newest last).
    Ls {
        /// Only sandboxes with this label (key=value; repeatable, all must match).
        #[arg(long, value_name = "KEY=VALUE")]
        label: Vec<String>,
        /// Only sandboxes in this state (pending, running, paused, exited).
        #[arg(long)]
        state: Option<String>,
        /// One JSON object per sandbox, one per line.
        #[arg(long)]
        json: bool,
    },
    /// Show a sandbox's record as JSON.
    Inspect {
        /// The sandbox id.
        id: String,
    },
    /// Stop sandboxes (SIGTERM, then SIGKILL after 10 s); their records stay.
    Stop {
        /// Sandbox ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Set how long a sandbox may still live, from now (longer or shorter than what was left).
    #[command(
        after_help = "Examples:\n  cove timeout 3f9a0c1b2d4e 30m\n  cove timeout 3f9a0c1b2d4e 2h"
    )]
    Timeout {
        /// The sandbox id.
        id: String,
        /// Its new time to live, from now (at most 30 days).
        duration: Duration,
    },
    /// Print the URL of a sandbox's port on the edge proxy (signed, for a private sandbox).
    #[command(after_help = "Examples:\n  cove url 3f9a0c1b2d4e 8080\n  \
        curl \"$(cove url 3f9a0c1b2d4e 8080)\"\n  \
        cove url --expires 10m 3f9a0c1b2d4e 3000\n  \
        curl -H \"Cove-Access-Token: $(cove url --access-token 3f9a0c1b2d4e 80)\" \"$(cove url --plain 3f9a0c1b2d4e 80)\"\n\n\
        A private sandbox's URL carries a signature that works until it expires; a browser \
        that opens it gets a cookie for the rest of the page. Clients that cannot use the \
        sandbox's host name send the headers Cove-Sandbox-Id and Cove-Sandbox-Port, or use \
        the path /proxy/ID/PORT/ on the proxy.")]
    Url {
        /// The sandbox id.
        id: String,
        /// The port inside the sandbox.
        port: u16,
        /// How long the signed URL works.
        #[arg(long, value_name = "DUR", default_value = "1h")]
        expires: Duration,
        /// The URL without a signature (for use with the access token, or a public sandbox).
        #[arg(long, conflicts_with = "access_token")]
        plain: bool,
        /// Print the sandbox's access token (for the Cove-Access-Token header) instead.
        #[arg(long)]
        access_token: bool,
    },
    /// Show a running sandbox's resource usage now (CPU, memory, processes) against its limits.
    Stats {
        /// The sandbox id.
        id: String,
        /// The API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Pause sandboxes: their processes frozen, their memory kept.
    Pause {
        /// Sandbox ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Resume paused sandboxes.
    Resume {
        /// Sandbox ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Remove sandboxes and their records.
    Rm {
        /// Stop running ones first (otherwise removing a running sandbox is refused).
        #[arg(short, long)]
        force: bool,
        /// Sandbox ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Run a command in a running sandbox, streaming its output; exit with its exit code.
    #[command(
        after_help = "Examples:\n  cove exec 3f9a0c1b2d4e -- python3 -c 'print(1)'\n  \
        cove exec -e MODE=test -w /tmp 3f9a0c1b2d4e -- sh -c 'ls; env'\n  \
        cove exec -it 3f9a0c1b2d4e -- sh\n  \
        tar c src | cove exec -i 3f9a0c1b2d4e -- tar x -C /tmp\n\n\
        Ctrl-C, SIGTERM and SIGHUP are passed to the command (with -t, Ctrl-C is a keystroke \
        in its terminal). Without -i the command's stdin is empty."
    )]
    Exec {
        /// Keep stdin open and send it to the command.
        #[arg(short, long)]
        interactive: bool,
        /// Give the command a terminal (with -i, this terminal in raw mode relays keystrokes).
        #[arg(short, long)]
        tty: bool,
        /// Environment variable KEY=VALUE (on top of the sandbox's).
        #[arg(short = 'e', long = "env", value_name = "KEY=VAL")]
        env: Vec<String>,
        /// Working directory inside the sandbox.
        #[arg(short = 'w', long = "workdir", value_name = "DIR")]
        workdir: Option<String>,
        /// Kill the command after this long (at most 1h; default: when the sandbox ends).
        #[arg(long, value_name = "DUR")]
        timeout: Option<Duration>,
        /// The sandbox id.
        id: String,
        /// The command and its arguments.
        #[arg(trailing_var_arg = true, required = true, value_name = "CMD")]
        cmd: Vec<String>,
    },
    /// Copy files or directories between this machine and a running sandbox.
    #[command(
        long_about = "Copy a file or a directory between this machine and a running sandbox; \
            one side is ID:/PATH. Inside the sandbox the copy runs as the sandbox's user, with \
            its permissions. As with docker cp: copying into an existing directory puts the \
            source inside it under its own name; otherwise the destination is created. `-` as \
            SRC reads a tar from stdin and extracts it into ID:/DIR; `-` as DST writes the file, \
            or a tar of the directory, to stdout.",
        after_help = "Examples:\n  cove cp app.py 3f9a0c1b2d4e:/work/\n  \
            cove cp ./project 3f9a0c1b2d4e:/work/project\n  \
            cove cp 3f9a0c1b2d4e:/work/out.log .\n  \
            tar c src | cove cp - 3f9a0c1b2d4e:/work"
    )]
    Cp {
        /// Source: a local path, `-`, or ID:/PATH.
        src: String,
        /// Destination: a local path, `-`, or ID:/PATH.
        dst: String,
    },
    /// Follow lifecycle events of your sandboxes (one JSON object per line) until interrupted.
    #[command(
        after_help = "Examples:\n  cove events\n  cove events --type exited --label user_id=42\n  \
        cove events --since 0    # replay from the start of the store's history"
    )]
    Events {
        /// Only this sandbox's events.
        #[arg(long, value_name = "ID")]
        id: Option<String>,
        /// Only these types (created, running, paused, resumed, stopping, idle_warning, exited,
        /// removed).
        #[arg(long = "type", value_name = "TYPE", value_delimiter = ',')]
        types: Vec<String>,
        /// Only sandboxes with this label (key=value; repeatable, all must match).
        #[arg(long, value_name = "KEY=VALUE")]
        label: Vec<String>,
        /// Replay the changes after this store revision (each event carries its revision).
        #[arg(long, value_name = "REVISION")]
        since: Option<u64>,
    },
    /// Print a sandbox's output (its main command's stdout and stderr).
    Logs {
        /// Keep printing new output until the sandbox ends.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines of each stream.
        #[arg(long, value_name = "N")]
        tail: Option<usize>,
        /// Only output since then: a duration ago (10m, 90s) or milliseconds since the epoch.
        #[arg(long, value_name = "WHEN")]
        since: Option<String>,
        /// `stdout`, `stderr` or `all`.
        #[arg(long, default_value = "all")]
        stream: String,
        /// The sandbox id.
        id: String,
    },
    /// Wait until a sandbox ends; print its exit code and exit with it.
    Wait {
        /// The sandbox id.
        id: String,
        /// Give up after this long (at most 10m).
        #[arg(long, value_name = "DUR", default_value = "10m")]
        timeout: Duration,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    /// `host` (the host's /usr, read-only) or an image reference (pulled on first use).
    #[arg(long, default_value = "host")]
    image: String,
    /// Memory limit, swap included.
    #[arg(long, value_name = "SIZE")]
    memory: Option<Size>,
    /// CPU quota in CPUs.
    #[arg(long, value_name = "N")]
    cpus: Option<String>,
    /// Maximum processes and threads.
    #[arg(long, value_name = "N")]
    pids: Option<u64>,
    /// Size of the private writable layer (/dev/shm included).
    #[arg(long, value_name = "SIZE")]
    disk: Option<Size>,
    #[command(flatten)]
    more_limits: crate::run::MoreLimits,
    /// Environment variable KEY=VALUE.
    #[arg(short = 'e', long = "env", value_name = "KEY=VAL")]
    env: Vec<String>,
    /// Working directory inside the sandbox.
    #[arg(short = 'w', long = "workdir", value_name = "DIR")]
    workdir: Option<String>,
    /// User inside the sandbox, UID[:GID] (default 0, the sandbox's root, which is an
    /// unprivileged id on the host); execs and file copies run as this user too.
    #[arg(short = 'u', long = "user", value_name = "UID[:GID]")]
    user: Option<cove_types::User>,
    /// Label KEY=VALUE (e.g. user_id=42); filterable with `cove ls --label`.
    #[arg(long, value_name = "KEY=VALUE")]
    label: Vec<String>,
    /// Metadata KEY=VALUE, kept with the sandbox.
    #[arg(long, value_name = "KEY=VALUE")]
    meta: Vec<String>,
    /// Let anyone reach its ports through the edge proxy, without its access token or a
    /// signed URL (`cove url`).
    #[arg(long)]
    public: bool,
    /// Network: `none` (its own loopback only) or `egress` (a route out through the host and
    /// DNS; never to cloud metadata, the host itself or private ranges).
    #[arg(long, value_name = "MODE", default_value = "none")]
    net: cove_types::NetMode,
    /// With --net egress: only these destinations, A.B.C.D[/N][:PORT[-PORT]] (repeatable).
    #[arg(long, value_name = "RULE")]
    allow: Vec<cove_types::egress::EgressRule>,
    /// With --net egress: never these destinations, A.B.C.D[/N][:PORT[-PORT]] (repeatable).
    #[arg(long, value_name = "RULE")]
    deny: Vec<cove_types::egress::EgressRule>,
    /// Unused for this long (no proxied request, exec or file operation), it is stopped
    /// (reason idle_limit), or paused with --idle-action pause.
    #[arg(long, value_name = "DUR", help_heading = "Idle limits")]
    idle: Option<Duration>,
    /// Unused for this long (shorter than --idle), an idle_warning event says when --idle
    /// acts.
    #[arg(
        long,
        value_name = "DUR",
        requires = "idle",
        help_heading = "Idle limits"
    )]
    idle_warn: Option<Duration>,
    /// What --idle does: stop or pause.
    #[arg(
        long,
        value_name = "ACTION",
        default_value = "stop",
        value_parser = ["stop", "pause"],
        help_heading = "Idle limits"
    )]
    idle_action: String,
    /// Its own CPU use counts as use while at least this share of one CPU (e.g. 5%; 200% is
    /// two CPUs): a long build is not idle. By default CPU use does not count.
    #[arg(
        long,
        value_name = "PERCENT",
        requires = "idle",
        value_parser = parse_percent,
        help_heading = "Idle limits"
    )]
    idle_cpu: Option<u32>,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, value_name = "CMD")]
    cmd: Vec<String>,
}

/// A request the server answered with an error: its status and the API's
/// `{"error":{"code","message"}}` (a body of another shape, short enough, is the message).
#[derive(Debug)]
pub(crate) struct Refused {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl Refused {
    pub(crate) fn new(status: u16, body: &[u8]) -> Refused {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let text = String::from_utf8_lossy(body);
        let message = match v["error"]["message"].as_str() {
            Some(m) => m.to_string(),
            None if !text.trim().is_empty() && text.len() <= 200 => text.trim().to_string(),
            None => "request failed".to_string(),
        };
        Refused {
            status,
            code: v["error"]["code"].as_str().unwrap_or_default().to_string(),
            message,
        }
    }
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (HTTP {})", self.message, self.status)
    }
}

impl std::error::Error for Refused {}

/// A request to the server at `server` that failed before an answer came. When no connection
/// was made, what failed at the bottom (refused, no such host, no answer), once, and where to
/// point the client instead: the layers above it (HTTP client, connector, socket) each repeat
/// it in their own words. Anything else (a body that could not be read, say) keeps its chain.
pub(crate) fn request_failed(server: &str, e: reqwest::Error) -> anyhow::Error {
    if e.is_connect() {
        unreachable(server, &e)
    } else {
        anyhow::Error::new(e).context(format!("the request to the Cove server at {server} failed"))
    }
}

/// See [`request_failed`]: `e` made no connection to `server`.
pub(crate) fn unreachable(server: &str, e: &(dyn std::error::Error + 'static)) -> anyhow::Error {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    anyhow::anyhow!(
        "cannot reach the Cove server at {server}: {cause} (is `cove serve` running there? \
         --url or COVE_URL names another)"
    )
}

fn pairs(what: &str, items: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    items
        .iter()
        .map(|s| match s.split_once('=') {
            Some((k, v)) => Ok((k.to_string(), v.to_string())),
            None => bail!("{what} {s:?}: use KEY=VALUE"),
        })
        .collect()
}

pub(crate) struct Client {
    pub(crate) http: reqwest::Client,
    pub(crate) base: String,
    pub(crate) token: String,
    pub(crate) runtime: tokio::runtime::Runtime,
}

impl Client {
    fn new(conn: &Conn) -> anyhow::Result<Client> {
        let token = match &conn.token {
            Some(t) => t.clone(),
            None => std::fs::read_to_string(
                std::path::Path::new(crate::serve::DATA_DIR).join(crate::serve::ADMIN_TOKEN_FILE),
            )
            .map(|t| t.trim().to_string())
            .map_err(|_| anyhow::anyhow!("no token: set COVE_TOKEN (or pass --token)"))?,
        };
        cove_image::tls::install_default_provider();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("start the client's runtime")?;
        let mut builder =
            reqwest::Client::builder().connect_timeout(std::time::Duration::from_secs(10));
        if conn.url.starts_with("http://") {
            // No TLS to verify: the system's trust store (~150 files) is not read. Measured
            // with hyperfine, `cove ls` went from 11.1 to 2.8 ms.
            builder = builder.tls_certs_only(std::iter::empty());
        }
        let http = builder.build().context("set up the HTTP client")?;
        Ok(Client {
            http,
            base: conn.url.trim_end_matches('/').to_string(),
            token,
            runtime,
        })
    }

    /// Sends a request; returns the status and the parsed JSON body (`null` when empty). API
    /// errors become this command's error, with the server's message.
    pub(crate) fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<(u16, serde_json::Value)> {
        let url = format!("{}{path}", self.base);
        self.runtime.block_on(async {
            let mut req = self
                .http
                .request(method, &url)
                .header("authorization", format!("Bearer {}", self.token));
            if let Some(b) = body {
                req = req
                    .header("content-type", "application/json")
                    .body(serde_json::to_vec(&b)?);
            }
            let resp = req
                .send()
                .await
                .map_err(|e| request_failed(&self.base, e))?;
            let status = resp.status().as_u16();
            let bytes = resp.bytes().await.context("read the server's answer")?;
            if status >= 400 {
                return Err(Refused::new(status, &bytes).into());
            }
            let json: serde_json::Value = if bytes.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap_or_else(|_| {
                    serde_json::Value::String(String::from_utf8_lossy(&bytes).into_owned())
                })
            };
            Ok((status, json))
        })
    }
}

impl Client {
    /// A WebSocket request for `path` (ws:// for an http:// server), with the token.
    fn ws_request(
        &self,
        path: &str,
    ) -> anyhow::Result<tokio_tungstenite::tungstenite::handshake::client::Request> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let url = match self.base.strip_prefix("http://") {
            Some(rest) => format!("ws://{rest}{path}"),
            None => bail!(
                "{}: streaming needs an http:// server URL (TLS comes with the edge proxy)",
                self.base
            ),
        };
        let mut req = url
            .into_client_request()
            .with_context(|| format!("bad server URL {}", self.base))?;
        req.headers_mut().insert(
            "authorization",
            format!("Bearer {}", self.token)
                .parse()
                .context("the token is not a valid header value")?,
        );
        Ok(req)
    }

    /// GETs `path` and copies the body to stdout as it arrives.
    fn stream(&self, path: &str) -> anyhow::Result<()> {
        use std::io::Write;
        let url = format!("{}{path}", self.base);
        self.runtime.block_on(async {
            let mut resp = self
                .http
                .get(&url)
                .header("authorization", format!("Bearer {}", self.token))
                .send()
                .await
                .map_err(|e| request_failed(&self.base, e))?;
            let status = resp.status().as_u16();
            if status >= 400 {
                let bytes = resp.bytes().await.unwrap_or_default();
                return Err(Refused::new(status, &bytes).into());
            }
            let mut out = std::io::stdout().lock();
            while let Some(chunk) = resp.chunk().await.context("read the server's answer")? {
                out.write_all(&chunk)?;
                out.flush()?;
            }
            Ok(())
        })
    }
}

/// Does `act` to every sandbox of `ids`, as `docker stop a b c` does: each id done is printed,
/// each failure said on stderr, and one does not keep the others from being tried. Exits
/// [`crate::EXIT_COVE_FAILED`] if any failed.
fn each(
    ids: &[String],
    mut act: impl FnMut(&str) -> anyhow::Result<()>,
) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    for id in ids {
        match act(id) {
            Ok(()) => println!("{id}"),
            Err(e) => {
                eprintln!("cove: {}", crate::chain(&e));
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::from(crate::EXIT_COVE_FAILED)
    } else {
        ExitCode::SUCCESS
    })
}

/// POST `/v1/sandboxes/{id}/{verb}` for every sandbox of `ids` (see [`each`]).
fn post_each(c: &Client, verb: &str, ids: &[String]) -> anyhow::Result<ExitCode> {
    each(ids, |id| {
        c.call(
            reqwest::Method::POST,
            &format!("/v1/sandboxes/{id}/{verb}"),
            None,
        )
        .map(drop)
    })
}

/// Runs a client command.
pub fn client(conn: &Conn, cmd: ClientCommand) -> anyhow::Result<ExitCode> {
    let c = Client::new(conn)?;

    match cmd {
        ClientCommand::Create(a) => {
            // Only what was given: the server's defaults fill in the rest.
            let mut limits = serde_json::Map::new();
            if let Some(m) = a.memory {
                limits.insert("memory".into(), serde_json::json!(m));
            }
            if let Some(cpus) = &a.cpus {
                limits.insert("cpus_millis".into(), cove_types::parse_cpus(cpus)?.into());
            }
            if let Some(p) = a.pids {
                limits.insert("pids".into(), p.into());
            }
            if let Some(d) = a.disk {
                limits.insert("disk".into(), serde_json::json!(d));
            }
            let more = &a.more_limits;
            if let Some(t) = more.timeout {
                limits.insert("timeout".into(), serde_json::json!(t));
            }
            if let Some(t) = more.cpu_time {
                limits.insert("cpu_time".into(), serde_json::json!(t));
            }
            if let Some(n) = more.nofile {
                limits.insert("nofile".into(), n.into());
            }
            if let Some(s) = more.fsize {
                limits.insert("fsize".into(), serde_json::json!(s));
            }
            let body = serde_json::json!({
                "image": a.image,
                "cmd": a.cmd,
                "env": pairs("-e", &a.env)?,
                "workdir": a.workdir,
                "user": a.user,
                "limits": limits,
                "labels": pairs("--label", &a.label)?,
                "metadata": pairs("--meta", &a.meta)?,
                "public": a.public,
                "net": a.net,
                "egress": {"allow": a.allow, "deny": a.deny},
                "idle": a.idle.map(|hard| serde_json::json!({
                    "hard": hard, "soft": a.idle_warn, "action": a.idle_action,
                    "cpu_percent": a.idle_cpu,
                })),
            });
            let (_, v) = c.call(reqwest::Method::POST, "/v1/sandboxes", Some(body))?;
            let id = v["id"].as_str().unwrap_or("");
            if v["reason"] == "start_failure" {
                bail!(
                    "sandbox {id} failed to start: {}",
                    v["message"].as_str().unwrap_or("no reason given")
                );
            }
            println!("{id}");
        }
        ClientCommand::Ls { label, state, json } => {
            let mut query = vec!["limit=1000".to_string()];
            if !label.is_empty() {
                query.push(format!("label={}", label.join(",")));
            }
            if let Some(s) = state {
                query.push(format!("state={s}"));
            }
            let mut rows = Vec::new();
            let mut next: Option<String> = None;
            loop {
                let mut q = query.clone();
                if let Some(n) = &next {
                    q.push(format!("after={n}"));
                }
                let (_, v) = c.call(
                    reqwest::Method::GET,
                    &format!("/v1/sandboxes?{}", q.join("&")),
                    None,
                )?;
                rows.extend(v["sandboxes"].as_array().cloned().unwrap_or_default());
                next = v["next"].as_str().map(str::to_string);
                if next.is_none() {
                    break;
                }
            }
            if json {
                for r in &rows {
                    println!("{r}");
                }
            } else {
                println!(
                    "{:<13} {:<9} {:<24} {:<30} END",
                    "ID", "STATE", "IMAGE", "COMMAND"
                );
                for r in &rows {
                    let image = match &r["spec"]["image"] {
                        serde_json::Value::String(s) => s.clone(),
                        serde_json::Value::Object(o) => o
                            .values()
                            .next()
                            .and_then(|v| v.as_str())
                            .unwrap_or("")
                            .to_string(),
                        _ => String::new(),
                    };
                    let cmd: Vec<&str> = r["spec"]["cmd"]
                        .as_array()
                        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
                        .unwrap_or_default();
                    let mut cmd = cmd.join(" ");
                    if cmd.len() > 30 {
                        cmd.truncate(27);
                        cmd.push_str("...");
                    }
                    let end = match (r["reason"].as_str(), r["exit_code"].as_i64()) {
                        (Some(reason), Some(code)) => format!("{reason} ({code})"),
                        (Some(reason), None) => reason.to_string(),
                        _ => String::new(),
                    };
                    println!(
                        "{:<13} {:<9} {:<24} {:<30} {}",
                        r["id"].as_str().unwrap_or(""),
                        r["state"].as_str().unwrap_or(""),
                        image,
                        cmd,
                        end
                    );
                }
            }
        }
        ClientCommand::Inspect { id } => {
            let (_, v) = c.call(reqwest::Method::GET, &format!("/v1/sandboxes/{id}"), None)?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        ClientCommand::Stop { ids } => return post_each(&c, "stop", &ids),
        ClientCommand::Pause { ids } => return post_each(&c, "pause", &ids),
        ClientCommand::Resume { ids } => return post_each(&c, "resume", &ids),
        ClientCommand::Rm { force, ids } => {
            return each(&ids, |id| {
                let removed = c.call(
                    reqwest::Method::DELETE,
                    &format!("/v1/sandboxes/{id}?force={force}"),
                    None,
                );
                if let Err(e) = &removed
                    && e.downcast_ref::<Refused>()
                        .is_some_and(|r| r.code == "running")
                {
                    bail!(
                        "sandbox {id} is running: stop it first (cove stop {id}) or remove it \
                         anyway (cove rm -f {id})"
                    );
                }
                if removed?.0 == 202 {
                    eprintln!("cove: {id} is still stopping; it is removed when it ends");
                }
                Ok(())
            });
        }
        ClientCommand::Exec {
            interactive,
            tty,
            env,
            workdir,
            timeout,
            id,
            cmd,
        } => {
            let mut start = serde_json::json!({
                "cmd": cmd,
                "env": pairs("-e", &env)?,
                "workdir": workdir,
                "tty": tty,
            });
            if let Some(t) = timeout {
                start["timeout"] = serde_json::json!(t);
            }
            let code = crate::attach::exec(
                &c.ws_request(&format!("/v1/sandboxes/{id}/exec/stream"))?,
                &c.runtime,
                start,
                interactive,
                tty,
            )?;
            return Ok(ExitCode::from(code.clamp(0, 255) as u8));
        }
        ClientCommand::Cp { src, dst } => crate::cp::cp(&c, &src, &dst)?,
        ClientCommand::Stats { id, json } => {
            let (_, v) = c.call(
                reqwest::Method::GET,
                &format!("/v1/sandboxes/{id}/stats"),
                None,
            )?;
            if json {
                println!("{v}");
            } else {
                let mib = |b: &serde_json::Value| b.as_f64().unwrap_or(0.0) / (1024.0 * 1024.0);
                println!(
                    "STATE     CPU TIME   MEMORY / LIMIT          PEAK       PIDS / LIMIT  OOM KILLS"
                );
                println!(
                    "{:<9} {:>8.2}s  {:>8.1} / {:<8.1} MiB {:>7.1} MiB  {:>4} / {:<5}  {}",
                    v["state"].as_str().unwrap_or("?"),
                    v["cpu_seconds"].as_f64().unwrap_or(0.0),
                    mib(&v["memory_bytes"]),
                    mib(&v["limits"]["memory_bytes"]),
                    mib(&v["memory_peak_bytes"]),
                    v["pids"],
                    v["limits"]["pids"],
                    v["oom_kills"],
                );
                if v["network"].is_object() {
                    let kib = |b: &serde_json::Value| b.as_f64().unwrap_or(0.0) / 1024.0;
                    println!(
                        "egress: received {:.1} KiB, sent {:.1} KiB, {} packets dropped by the policy",
                        kib(&v["network"]["rx_bytes"]),
                        kib(&v["network"]["tx_bytes"]),
                        v["network"]["egress_denied_packets"],
                    );
                }
            }
        }
        ClientCommand::Url {
            id,
            port,
            expires,
            plain,
            access_token,
        } => {
            let (_, v) = c.call(
                reqwest::Method::POST,
                &format!("/v1/sandboxes/{id}/url"),
                Some(serde_json::json!({ "port": port, "expires_in": expires })),
            )?;
            let field = match (plain, access_token) {
                (_, true) => "access_token",
                (true, _) => "plain_url",
                _ => "url",
            };
            println!("{}", v[field].as_str().unwrap_or(""));
        }
        ClientCommand::Timeout { id, duration } => {
            c.call(
                reqwest::Method::POST,
                &format!("/v1/sandboxes/{id}/timeout"),
                Some(serde_json::json!({ "timeout": duration })),
            )?;
            println!("{id}");
        }
        ClientCommand::Events {
            id,
            types,
            label,
            since,
        } => {
            let mut q = Vec::new();
            if let Some(id) = id {
                q.push(format!("id={id}"));
            }
            if !types.is_empty() {
                q.push(format!("type={}", types.join(",")));
            }
            if !label.is_empty() {
                q.push(format!("label={}", label.join(",")));
            }
            if let Some(s) = since {
                q.push(format!("since={s}"));
            }
            c.stream(&format!("/v1/events?{}", q.join("&")))?;
        }
        ClientCommand::Logs {
            follow,
            tail,
            since,
            stream,
            id,
        } => {
            let mut path = format!("/v1/sandboxes/{id}/logs?stream={stream}&follow={follow}");
            if let Some(n) = tail {
                path.push_str(&format!("&tail={n}"));
            }
            if let Some(s) = since {
                path.push_str(&format!("&since={s}"));
            }
            c.stream(&path)?;
        }
        ClientCommand::Wait { id, timeout } => {
            let (_, v) = c.call(
                reqwest::Method::GET,
                &format!("/v1/sandboxes/{id}/wait?timeout={timeout}"),
                None,
            )?;
            let code = v["exit_code"]
                .as_i64()
                .unwrap_or(i64::from(crate::EXIT_COVE_FAILED));
            println!("{code}");
            return Ok(ExitCode::from(code.clamp(0, 255) as u8));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `5`, `5%` or `250%`: a whole percentage of one CPU.
fn parse_percent(s: &str) -> Result<u32, String> {
    let n = s.strip_suffix('%').unwrap_or(s);
    match n.parse::<u32>() {
        Ok(p) if (1..=cove_types::sandbox::MAX_IDLE_CPU_PERCENT).contains(&p) => Ok(p),
        _ => Err(format!(
            "{s:?}: a whole percentage of one CPU between 1% and {}%",
            cove_types::sandbox::MAX_IDLE_CPU_PERCENT
        )),
    }
}
