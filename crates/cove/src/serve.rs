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
use cove_jail::run::RunOptions;
use cove_store::Embedded;
use cove_types::{Image, Reason, RunReport, SandboxId, Spec};

/// Where `cove serve` keeps its state by default.
pub const DATA_DIR: &str = "/var/lib/cove";
/// The admin token's file name in the data directory.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";
/// The lock a server holds on its data directory while it runs.
const SERVER_LOCK: &str = "server.lock";
/// How long requests under way may take to be answered once the server stops on a failure.
const FAILED_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// The configuration file read when `--config` is not given, if it exists.
pub const CONFIG_FILE: &str = "/etc/cove/config.toml";

#[derive(Args)]
#[command(
    about = "Run the Cove server: the REST API, the state store and the node agent",
    long_about = "Run the Cove server on this machine: the REST API (default 127.0.0.1:7070), an \
        embedded state store, the node agent that starts and supervises sandboxes, and the edge \
        proxy (default http://127.0.0.1:7080 and https://127.0.0.1:7443) that serves each \
        sandbox's ports at <port>-<id>.<domain>. On first \
        start it creates an admin token in a root-only file and prints its path. Sandboxes are \
        not children of the server: stopping or restarting it (even kill -9) leaves them running, \
        and the next start adopts them.\n\n\
        Settings come from, in order of precedence: flags, environment variables, the TOML \
        configuration file (--config, or /etc/cove/config.toml if it exists), built-in defaults. \
        `cove serve --print-config` shows the result.",
    after_help = "Examples:\n  cove serve\n  cove serve --listen 0.0.0.0:7070 --data-dir /srv/cove\n  \
        cove serve --config /etc/cove/config.toml --print-config\n  \
        COVE_TOKEN=$(cat /var/lib/cove/admin-token) cove create -- sleep 60\n\n\
        A configuration file (every key optional):\n  \
        listen = \"127.0.0.1:7070\"\n  data_dir = \"/var/lib/cove\"\n  domain = \"sandbox.example.com\"\n  \
        retention = \"24h\"   # ended sandboxes' records and logs; \"0s\": until deleted\n  \
        reap_interval = \"1m\"   # the background reaper of stale host objects; \"0s\": never\n  \
        on_shutdown = \"keep\"   # or \"stop\": SIGTERM stops every sandbox before the server exits\n  \
        shutdown_grace = \"30s\"   # with \"stop\": how long to wait for them\n  \
        [limits]     # sandboxes created without their own (the API's `limits` fields)\n  \
        memory = \"512M\"\n  cpus_millis = 1000\n  pids = 256\n  disk = \"256M\"\n  timeout = \"1h\"\n  \
        [quotas]     # tenants created without their own\n  \
        sandboxes = 100\n  memory = \"64G\"\n  cpus_millis = 32000\n  max_timeout = \"24h\"\n  \
        [proxy]      # the edge proxy: <port>-<id>.<domain> to a port inside a sandbox\n  \
        enabled = true\n  listen = \"127.0.0.1:7080\"\n  tls = true\n  tls_listen = \"127.0.0.1:7443\"\n  \
        tls_cert = \"/etc/cove/wildcard.pem\"   # with tls_key; default: self-signed for *.<domain>\n  \
        tls_key = \"/etc/cove/wildcard.key\"\n  upstream_timeout = \"60s\"\n  \
        url_scheme = \"https\"   # of the URLs `cove url` prints (behind a load balancer)\n  \
        url_port = 443"
)]
pub struct ServeArgs {
    /// TOML configuration file [default: /etc/cove/config.toml, if it exists].
    #[arg(long, value_name = "FILE", env = "COVE_CONFIG")]
    config: Option<PathBuf>,
    /// Print the settings in effect (as a configuration file) and exit.
    #[arg(long)]
    print_config: bool,
    /// Address and port the API listens on [default: 127.0.0.1:7070].
    #[arg(long, value_name = "ADDR:PORT", env = "COVE_LISTEN")]
    listen: Option<SocketAddr>,
    /// Where Cove keeps its state: the store, the sandboxes' directories, the admin token
    /// [default: /var/lib/cove].
    #[arg(long, value_name = "DIR", env = "COVE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The domain sandboxes' ports are reached under (`<port>-<id>.<domain>`)
    /// [default: cove.localhost].
    #[arg(long, value_name = "DOMAIN", env = "COVE_DOMAIN")]
    domain: Option<String>,
    /// Default quota of a tenant: sandboxes not yet ended [default: 100].
    #[arg(long, value_name = "N", help_heading = "Tenant quotas")]
    quota_sandboxes: Option<u32>,
    /// Default quota of a tenant: sum of its sandboxes' memory limits [default: 64G].
    #[arg(long, value_name = "SIZE", help_heading = "Tenant quotas")]
    quota_memory: Option<cove_types::Size>,
    /// Default quota of a tenant: sum of its sandboxes' CPUs [default: 32].
    #[arg(long, value_name = "N", help_heading = "Tenant quotas")]
    quota_cpus: Option<String>,
    /// Default quota of a tenant: longest a sandbox may live; also the timeout of one created
    /// without [default: none].
    #[arg(long, value_name = "DUR", help_heading = "Tenant quotas")]
    quota_max_timeout: Option<cove_types::Duration>,
    /// Address of the edge proxy's cleartext listener [default: 127.0.0.1:7080].
    #[arg(long, value_name = "ADDR:PORT", help_heading = "Edge proxy")]
    proxy_listen: Option<SocketAddr>,
    /// Address of the edge proxy's TLS listener [default: 127.0.0.1:7443].
    #[arg(long, value_name = "ADDR:PORT", help_heading = "Edge proxy")]
    proxy_tls_listen: Option<SocketAddr>,
    /// PEM certificate chain of the TLS listener [default: a self-signed one for *.DOMAIN,
    /// made on first start].
    #[arg(
        long,
        value_name = "FILE",
        requires = "proxy_tls_key",
        help_heading = "Edge proxy"
    )]
    proxy_tls_cert: Option<PathBuf>,
    /// PEM private key of --proxy-tls-cert.
    #[arg(
        long,
        value_name = "FILE",
        requires = "proxy_tls_cert",
        help_heading = "Edge proxy"
    )]
    proxy_tls_key: Option<PathBuf>,
    /// Longest a sandbox's port may take to start answering a proxied request (then 504)
    /// [default: 60s].
    #[arg(long, value_name = "DUR", help_heading = "Edge proxy")]
    proxy_upstream_timeout: Option<cove_types::Duration>,
    /// The resolver that sandboxes with egress have their DNS sent to [default: the host's
    /// first IPv4 nameserver].
    #[arg(
        long,
        value_name = "IPV4",
        env = "COVE_EGRESS_DNS",
        help_heading = "Egress"
    )]
    egress_dns: Option<std::net::Ipv4Addr>,
    /// How long an ended sandbox's record and logs are kept before they are deleted
    /// [default: 24h].
    #[arg(long, value_name = "DUR")]
    retention: Option<cove_types::Duration>,
    /// Deliver webhooks to loopback, private and link-local addresses too (refused by default:
    /// a tenant could otherwise make the server reach internal services).
    #[arg(long)]
    webhooks_allow_private: bool,
    /// How the server logs, on stderr: `text` (lines for a person) or `json` (one object per
    /// line: time, level, message and fields such as request_id, tenant, sandbox). `COVE_LOG`
    /// filters, e.g. `COVE_LOG=debug` or `COVE_LOG=cove_api=warn` [default: text].
    #[arg(long, value_name = "FORMAT", env = "COVE_LOG_FORMAT", value_parser = ["text", "json"])]
    log_format: Option<String>,
    /// Serve no edge proxy.
    #[arg(long, help_heading = "Edge proxy")]
    no_proxy: bool,
    /// How often the background reaper removes host objects no sandbox owns (cgroups,
    /// processes, mounts, veths, nftables chains, directories); `0s`: never [default: 1m].
    #[arg(long, value_name = "DUR")]
    reap_interval: Option<cove_types::Duration>,
    /// What SIGTERM does to running sandboxes: `keep` them running (the next start adopts
    /// them) or `stop` them all (reason server_shutdown) before exiting [default: keep].
    #[arg(long, value_name = "POLICY", value_parser = ["keep", "stop"])]
    on_shutdown: Option<String>,
    /// With --on-shutdown stop: how long to wait for the sandboxes to end [default: 30s].
    #[arg(long, value_name = "DUR")]
    shutdown_grace: Option<cove_types::Duration>,
    /// Sandboxes kept started ahead of creates (the warm pool). A create whose sandbox fits
    /// them (the `host` image, no binds, network `none`, the default disk, user root, no
    /// hostname or terminal of its own) takes one and only hands it its command, environment
    /// and limits, skipping the sandbox's start (namespaces, root filesystem, cgroup). Others
    /// start cold. Each costs about 0.8 MiB while it waits; `0`: no pool [default: 2].
    #[arg(long, value_name = "N")]
    warm_pool: Option<u32>,
    /// A warm pool of N sandboxes of the stored image REF, for creates that name it exactly so
    /// (and otherwise fit as above); repeatable. The image must be stored already (`cove image
    /// pull`): its members are built from it as it is [config: `[warm_images]`].
    #[arg(long, value_name = "REF=N")]
    warm_image: Vec<String>,
}

/// The server's settings, as the configuration file holds them.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address and port of the API.
    pub listen: SocketAddr,
    /// The data directory.
    pub data_dir: PathBuf,
    /// The domain of sandbox URLs.
    pub domain: String,
    /// Limits of sandboxes created without their own.
    pub limits: cove_types::Limits,
    /// Quotas of tenants created without their own.
    pub quotas: cove_api::Quotas,
    /// The edge proxy.
    pub proxy: crate::edge::ProxyConfig,
    /// Sandboxes with `net: egress`.
    pub egress: EgressConfig,
    /// How long an ended sandbox's record and logs are kept before they are deleted.
    pub retention: cove_types::Duration,
    /// Deliver webhooks to internal addresses too.
    pub webhooks_allow_private: bool,
    /// `text` or `json`.
    pub log_format: String,
    /// The background reaper's period (zero: no reaper).
    pub reap_interval: cove_types::Duration,
    /// What SIGTERM does to running sandboxes.
    pub on_shutdown: OnShutdown,
    /// With `on_shutdown = "stop"`: how long to wait for them to end.
    pub shutdown_grace: cove_types::Duration,
    /// Sandboxes kept started ahead of creates (0: none).
    pub warm_pool: u32,
    /// Warm pools of stored images: reference -> size.
    pub warm_images: std::collections::BTreeMap<String, u32>,
}

/// What happens to running sandboxes when the server is asked to stop.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnShutdown {
    /// They keep running; the next start of the server adopts them.
    #[default]
    Keep,
    /// Every sandbox is stopped (reason `server_shutdown`) before the server exits.
    Stop,
}

/// The `[egress]` section of the configuration.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
    /// The resolver sandboxes' DNS is sent to [default: the host's first IPv4 nameserver].
    pub dns: Option<std::net::Ipv4Addr>,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            listen: "127.0.0.1:7070".parse().expect("a valid address"),
            data_dir: PathBuf::from(DATA_DIR),
            domain: "cove.localhost".into(),
            limits: cove_types::Limits::default(),
            quotas: cove_api::Quotas::default(),
            proxy: crate::edge::ProxyConfig::default(),
            egress: EgressConfig::default(),
            retention: cove_types::Duration::from_millis(86_400_000),
            webhooks_allow_private: false,
            log_format: "text".into(),
            reap_interval: cove_types::Duration::from_millis(60_000),
            on_shutdown: OnShutdown::Keep,
            shutdown_grace: cove_types::Duration::from_millis(30_000),
            warm_pool: 2,
            warm_images: Default::default(),
        }
    }
}

impl ServeArgs {
    /// The file's settings (if any) under the flags'.
    fn config(&self) -> anyhow::Result<Config> {
        let (path, required) = match &self.config {
            Some(p) => (p.clone(), true),
            None => (PathBuf::from(CONFIG_FILE), false),
        };
        let mut config = match fs::read_to_string(&path) {
            Ok(text) => toml::from_str::<Config>(&text)
                .map_err(|e| anyhow!("{}: {}", path.display(), e.to_string().trim_end()))?,
            Err(e) if !required && e.kind() == io::ErrorKind::NotFound => Config::default(),
            Err(e) => return Err(anyhow!("read {}: {e}", path.display())),
        };
        if let Some(l) = self.listen {
            config.listen = l;
        }
        if let Some(d) = &self.data_dir {
            config.data_dir = d.clone();
        }
        if let Some(d) = &self.domain {
            config.domain = d.clone();
        }
        if let Some(n) = self.quota_sandboxes {
            config.quotas.sandboxes = n;
        }
        if let Some(m) = self.quota_memory {
            config.quotas.memory = m;
        }
        if let Some(c) = &self.quota_cpus {
            config.quotas.cpus_millis = u64::from(cove_types::parse_cpus(c)?);
        }
        if let Some(d) = self.quota_max_timeout {
            config.quotas.max_timeout = Some(d);
        }
        if let Some(l) = self.proxy_listen {
            config.proxy.listen = l;
        }
        if let Some(l) = self.proxy_tls_listen {
            config.proxy.tls_listen = l;
        }
        if let Some(c) = &self.proxy_tls_cert {
            config.proxy.tls_cert = Some(c.clone());
        }
        if let Some(k) = &self.proxy_tls_key {
            config.proxy.tls_key = Some(k.clone());
        }
        if let Some(d) = self.proxy_upstream_timeout {
            config.proxy.upstream_timeout = d;
        }
        if let Some(d) = self.egress_dns {
            config.egress.dns = Some(d);
        }
        if let Some(r) = self.retention {
            config.retention = r;
        }
        if self.webhooks_allow_private {
            config.webhooks_allow_private = true;
        }
        if let Some(f) = &self.log_format {
            config.log_format = f.clone();
        }
        if config.log_format != "text" && config.log_format != "json" {
            bail!("log_format {:?}: use text or json", config.log_format);
        }
        if self.no_proxy {
            config.proxy.enabled = false;
        }
        if let Some(r) = self.reap_interval {
            config.reap_interval = r;
        }
        match self.on_shutdown.as_deref() {
            Some("stop") => config.on_shutdown = OnShutdown::Stop,
            Some(_) => config.on_shutdown = OnShutdown::Keep,
            None => {}
        }
        if let Some(g) = self.shutdown_grace {
            config.shutdown_grace = g;
        }
        if let Some(n) = self.warm_pool {
            config.warm_pool = n;
        }
        for w in &self.warm_image {
            let (reference, n) = w
                .rsplit_once('=')
                .and_then(|(r, n)| Some((r, n.parse::<u32>().ok()?)))
                .ok_or_else(|| anyhow!("--warm-image {w:?}: give REF=N, e.g. python:3.12=4"))?;
            config.warm_images.insert(reference.to_string(), n);
        }
        for reference in config.warm_images.keys() {
            crate::image::parse_ref(reference)
                .map_err(|e| anyhow!("warm image {reference:?}: {e}"))?;
        }
        let pooled = [config.warm_pool]
            .iter()
            .chain(config.warm_images.values())
            .map(|&n| u64::from(n))
            .sum::<u64>();
        if pooled > u64::from(MAX_WARM_POOL) {
            bail!(
                "warm pools of {pooled} sandboxes: at most {MAX_WARM_POOL} in all (each one is a \
                 started sandbox)"
            );
        }
        config.proxy.check()?;
        if config.domain.is_empty()
            || !config
                .domain
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        {
            bail!(
                "domain {:?}: letters, digits, '-' and '.' only",
                config.domain
            );
        }
        let mut probe = cove_types::Spec::new(vec!["probe".into()]);
        probe.limits = config.limits.clone();
        probe
            .validate()
            .map_err(|e| anyhow!("limits in the configuration: {e}"))?;
        Ok(config)
    }
}

/// `cove serve`.
pub fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let config = args.config()?;
    if args.print_config {
        print!(
            "{}",
            toml::to_string(&config).context("print the configuration")?
        );
        return Ok(ExitCode::SUCCESS);
    }
    init_logs(config.log_format == "json");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the server's runtime")?;
    runtime.block_on(serve_async(config))
}

async fn serve_async(config: Config) -> anyhow::Result<ExitCode> {
    cove_image::tls::install_default_provider();
    // Sandboxes outlive their supervisors: their inits become the server's children, which
    // the agent reaps when they end (with no server, the host's init does).
    rustix::process::set_child_subreaper(Some(rustix::process::getpid()))
        .context("become the reaper of sandboxes' inits")?;
    let data = &config.data_dir;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(data)
        .with_context(|| format!("create {}", data.display()))?;
    // One server per data directory; while it runs, the reapers leave its ended sandboxes for
    // it to finish (see `cove_jail::state::gc`).
    let lock_path = data.join(SERVER_LOCK);
    let _server_lock = locked(&lock_path, || {
        format!(
            "another cove serve uses {} (it holds {})",
            data.display(),
            lock_path.display()
        )
    })?;
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
    let mut agent = cove_agent::Agent::new(store.clone(), data.join("sandboxes"), cove)?;
    if let Some(dns) = config.egress.dns {
        agent = agent.with_env("COVE_EGRESS_DNS", &dns.to_string());
    }
    // One copy of the sandboxes' resident init for all of them: its pages are in memory once.
    if let Some(init) = cove_jail::install_resident_init(data)
        .with_context(|| format!("write the sandboxes' init in {}", data.display()))?
    {
        agent = agent.with_env("COVE_INIT_FILE", &init.to_string_lossy());
    }
    // The pools' sandboxes are built for the default limits' disk and the default user.
    let images = config
        .warm_images
        .iter()
        .map(|(r, n)| (Image::Ref(r.clone()), *n));
    let warm: Vec<_> = [(Image::Host, config.warm_pool)]
        .into_iter()
        .chain(images)
        .filter(|(_, n)| *n > 0)
        .map(|(image, n)| {
            let mut template = cove_types::Spec::new(vec!["true".into()]);
            template.image = image;
            template.limits = config.limits.clone();
            cove_agent::WarmPool::new(n as usize, template)
        })
        .collect();
    for pool in &warm {
        agent = agent.with_pool(pool.clone());
    }
    // A claim applies a stored image's configuration as a cold start's supervisor does (the
    // layers' pins are dropped at once: the sandbox's init holds its own). Never a pull: the
    // agent's loop waits for it (a name no longer stored starts cold, and that pulls).
    agent = agent.with_resolver(std::sync::Arc::new(|spec: &mut Spec| {
        resolve_image(spec, crate::image::PullPolicy::Never)
            .map(|pinned| pinned.map(|p| p.dirs.clone()))
            .map_err(|e| crate::chain(&e))
    }));
    if !warm.is_empty() {
        let pools: Vec<String> = warm
            .iter()
            .map(|p| format!("{} sandboxes of {}", p.size(), p.template().image))
            .collect();
        announce(&format!("warm pools: {}", pools.join(", ")));
    }
    let holdings = cove_api::quota::Holdings::start(store.clone())
        .await
        .context("read the sandboxes' records")?;
    let proxy = crate::edge::bind(&config.proxy, data, &config.domain).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listen on {}", config.listen))?;
    announce(&format!("listening on http://{}", listener.local_addr()?));
    announce(&format!("admin token in {}", token_path.display()));
    let executor = std::sync::Arc::new(crate::exec_in::HelperExec {
        root: data.join("sandboxes"),
        spawning: agent.spawning(),
    });
    let api = Api {
        store,
        executor,
        sandboxes_dir: data.join("sandboxes"),
        default_quotas: config.quotas,
        default_limits: config.limits.clone(),
        domain: config.domain.clone(),
        proxy: proxy.urls.clone(),
        metrics: Default::default(),
        usage: std::sync::Arc::new(CgroupUsage),
        quota_locks: Default::default(),
        holdings,
        activity: Default::default(),
        retention: Some(config.retention.as_std()).filter(|r| !r.is_zero()),
        webhooks_allow_private: config.webhooks_allow_private,
        draining: Default::default(),
        warm: (!warm.is_empty())
            .then(|| std::sync::Arc::new(Pools(warm)) as std::sync::Arc<dyn cove_api::Warm>),
    };
    // Told when the server must stop on a failure (the agent's, or the state store's, whose
    // file's first I/O error leaves it refusing everything until it is reopened): the API then
    // answers what it is answering and stops too.
    let (stopping, mut failing) = tokio::sync::oneshot::channel::<()>();
    let store_failed = {
        let store = api.store.clone();
        async move { store.failed().await }
    };
    let shutdown = {
        let api = api.clone();
        let (policy, grace) = (config.on_shutdown, config.shutdown_grace);
        async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("a SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
                // Nothing can stop sandboxes now: the on_shutdown policy cannot apply.
                _ = &mut failing => return,
            }
            if policy == OnShutdown::Stop {
                // The agent keeps converging meanwhile: it is what stops them.
                api.draining
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                announce("stopping every sandbox (on_shutdown = stop)");
                let left = cove_api::lifecycle::stop_all(&api, grace.as_std()).await;
                if left > 0 {
                    announce(&format!(
                        "{left} sandboxes had not ended after {grace}; their records say so at the next start"
                    ));
                }
            }
        }
    };
    if !config.reap_interval.as_std().is_zero() {
        tokio::spawn(crate::reaper::run(
            api.clone(),
            data.join("sandboxes"),
            config.reap_interval.as_std(),
        ));
    }
    tokio::spawn(cove_api::metrics::track(api.clone()));
    proxy.spawn(api.store.clone(), api.metrics.clone(), api.activity.clone())?;
    tokio::spawn(cove_api::lifecycle::watch(api.clone()));
    tokio::spawn(cove_api::webhooks::deliver(api.clone()));
    let server = std::future::IntoFuture::into_future(
        axum::serve(listener, router(api)).with_graceful_shutdown(shutdown),
    );
    tokio::pin!(server);
    let failure = tokio::select! {
        served = &mut server => {
            served.context("serve the API")?;
            None
        }
        // It ends only on an error.
        ended = agent.run() => Some(match ended {
            Err(e) => anyhow::Error::new(e).context("the node agent failed"),
            Ok(()) => anyhow::anyhow!("the node agent stopped"),
        }),
        why = store_failed => Some(anyhow::anyhow!(
            "the state store failed: {why}; restart the server (systemd does) to reopen it"
        )),
    };
    if let Some(failure) = failure {
        // Requests under way get their answers (a 503 where they needed the store), for a few
        // seconds at most; then the server exits with the error, for its supervisor to start
        // it again (the next start reopens the store and adopts the sandboxes).
        let _ = stopping.send(());
        let _ = tokio::time::timeout(FAILED_DRAIN, &mut server).await;
        return Err(failure);
    }
    if config.on_shutdown == OnShutdown::Keep {
        announce("stopped; running sandboxes keep running and are adopted at the next start");
    } else {
        announce("stopped");
    }
    Ok(ExitCode::SUCCESS)
}

/// Whether the server logs JSON.
static JSON_LOGS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

/// Sets up the server's logs on stderr: text or JSON, filtered by `COVE_LOG` (default `info`).
fn init_logs(json: bool) {
    let _ = JSON_LOGS.set(json);
    let filter = tracing_subscriber::EnvFilter::try_from_env("COVE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        logs.json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init();
    } else {
        logs.with_target(false).init();
    }
}

/// A line for whoever started the server (where it listens, where the token is): `cove: …`
/// in text, an `info` event in JSON.
pub(crate) fn announce(message: &str) {
    if JSON_LOGS.get().copied().unwrap_or(false) {
        tracing::info!("{message}");
    } else {
        eprintln!("cove: {message}");
    }
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
    root_only_secret(path, || {
        cove_api::new_token().context("generate the admin token")
    })
}

/// The secret kept in `path`, made by `make` and written (root-only) if it does not exist.
pub(crate) fn root_only_secret(
    path: &Path,
    make: impl FnOnce() -> anyhow::Result<String>,
) -> anyhow::Result<String> {
    match fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => bail!("{} is empty; remove it to get a new one", path.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
    }
    let token = make()?;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    writeln!(file, "{token}").with_context(|| format!("write {}", path.display()))?;
    Ok(token)
}

/// Room for a spec read at once: with none, `read_to_end` reads a pipe 32 bytes first, then in
/// growing pieces (five reads for a plain spec, on a claim's way).
const SPEC_READ: usize = 64 << 10;

/// `cove supervise DIR`: starts the sandbox whose spec (JSON) comes on stdin (DIR is named by
/// the sandbox id) and leaves it running on its own: once its command runs, the supervisor
/// exits. The sandbox's init then holds `DIR/lock` (taken here first) for the sandbox's whole
/// life, the last line of `DIR/lock` is its pid, and it writes how the command ended to
/// `DIR/status`, from which the agent makes `DIR/report.json`
/// (`cove_jail::run::finish_detached`). A start that fails writes `DIR/report.json` here. Its
/// stdout and stderr are the sandbox's logs (the agent opens them).
///
/// As few files as that: where the data directory is on an ext4 without a journal (this
/// project's hosts), the inode allocator skips every inode freed in the last minute or more,
/// looking at each one, so with sandboxes coming and going every file made per sandbox costs
/// every later one. Measured here with twelve files per sandbox, rounds of 200 creates and 200
/// removals at 50 clients went from 148 to 82 sandboxes a second in four rounds, 38 % of the
/// server's CPU time in that search.
///
/// With `warm` (a spec, as JSON: the node agent's template), the sandbox is started warm for
/// it (`cove_jail::run::start_warm`) and handed over, once its child waits, down stdin, which
/// is then a `SOCK_SEQPACKET` socket to the agent (`cove_jail::run::WarmSandbox::hand_over`,
/// its note `cove_agent::warm::note`); the supervisor exits and the agent claims the sandbox
/// itself. Its init's pid is on the lock's last line before the hand-over, its status file stays
/// `status.new` until the agent hears the command run. Should the hand-over fail (the agent is
/// gone), the supervisor removes the sandbox and its directory.
pub fn supervise(dir: PathBuf, warm: Option<String>) -> anyhow::Result<ExitCode> {
    let lock = locked(&dir.join("lock"), || {
        format!("another supervisor runs {}", dir.display())
    })?;
    // Whoever holds the lock says who it is, one line each, the last one current (the agent
    // signals it by this pid, after checking the lock is still held, so a recycled pid is
    // never signalled). Appended whole, a line is never seen half-written as a pid.
    let mut said = 0;
    let mut say_pid = |pid: u32| -> anyhow::Result<()> {
        use std::os::unix::fs::FileExt;
        let line = format!("{pid}\n");
        lock.write_all_at(line.as_bytes(), said)
            .with_context(|| format!("write {}", dir.join("lock").display()))?;
        said += line.len() as u64;
        Ok(())
    };
    say_pid(std::process::id())?;
    let id = dir_id(&dir)?;
    let notify = take_notify_pipe(&dir)?;
    let report = match supervised_run(&dir, id, &lock, warm.as_deref()) {
        Ok(Started::Warm(sandbox, to_agent, note)) => {
            say_pid(sandbox.init as u32)?;
            let init = sandbox.init;
            if sandbox
                .hand_over(std::os::fd::AsRawFd::as_raw_fd(&to_agent), &note)
                .is_ok()
            {
                return Ok(ExitCode::SUCCESS);
            }
            // Nobody to take it (the descriptors closed here end it): removed as any ended
            // sandbox, then its directory.
            if let Some(pid) = rustix::process::Pid::from_raw(init) {
                let _ = rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::empty());
            }
            let template = Spec::new(Vec::new());
            cove_jail::run::finish_detached(
                &id,
                &template,
                &dir.join("status.new"),
                0.0,
                None,
                None,
            );
            drop(lock);
            fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
            return Ok(ExitCode::SUCCESS);
        }
        Ok(Started::Running(init)) => {
            // The sandbox is on its own: the agent signals its init from now on, and finds
            // how it ended in `status` (named so only now: a supervisor that died before this
            // left no `status`, and its sandbox is `lost`). Both are in place before the
            // agent hears `started`: it watches init's exit by that pid at once.
            say_pid(init as u32)?;
            fs::rename(dir.join("status.new"), dir.join("status"))
                .context("put the status file in place")?;
            // Nobody listening any more is fine: the agent finds the sandbox by its lock.
            let _ = (&notify).write_all(b"started\n");
            return Ok(ExitCode::SUCCESS);
        }
        Err(e) => RunReport {
            id: id.to_string(),
            exit_code: i32::from(crate::EXIT_COVE_FAILED),
            signal: None,
            reason: Reason::Error,
            message: Some(crate::chain(&e)),
            wall_time_ms: 0.0,
            cpu_time_ms: 0.0,
            peak_memory_bytes: 0,
            egress_denied_packets: None,
        },
    };
    let tmp = dir.join("report.json.tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("write {}", tmp.display()))?;
    fs::rename(&tmp, dir.join("report.json")).context("put the report in place")?;
    drop(lock);
    Ok(ExitCode::SUCCESS)
}

/// `path` (made root-only if missing), locked for as long as the file stays open; `busy` says
/// who holds it when someone does.
fn locked(path: &Path, busy: impl FnOnce() -> String) -> anyhow::Result<fs::File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    file.try_lock().map_err(|_| anyhow!(busy()))?;
    // What an earlier holder wrote is not ours. Emptied only if it is not empty: on ext4, a
    // truncation to zero marks the file to be flushed when it is next closed (the
    // `auto_da_alloc` heuristic for files rewritten in place), by whoever closes it, which
    // put a disk write on the agent's next look at the lock.
    let len = file
        .metadata()
        .with_context(|| format!("stat {}", path.display()))?
        .len();
    if len > 0 {
        file.set_len(0)
            .with_context(|| format!("empty {}", path.display()))?;
    }
    Ok(file)
}

/// The supervisor's stdout is a pipe to the agent, told `started` when the command runs; the
/// sandbox's stdout is `stdout.log`, put in its place here.
fn take_notify_pipe(dir: &Path) -> anyhow::Result<fs::File> {
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
    Ok(fs::File::from(notify))
}

/// `cove spawner`: forks the server's supervisors, each running `spawned` with its arguments
/// (see `cove_jail::spawner`), until the server's end of stdin (a socket) closes.
pub fn spawner(spawned: &dyn Fn(Vec<String>) -> i32) -> anyhow::Result<ExitCode> {
    let sock = rustix::io::fcntl_dupfd_cloexec(io::stdin(), 3).context("keep the socket")?;
    let null = fs::File::open("/dev/null").context("open /dev/null")?;
    rustix::stdio::dup2_stdin(&null).context("replace stdin")?;
    drop(null);
    cove_jail::spawner::serve(sock, spawned).context("serve the server's requests")?;
    Ok(ExitCode::SUCCESS)
}

/// How [`supervised_run`] left its sandbox.
enum Started {
    /// Running on its own: its init's pid.
    Running(i32),
    /// Warm, to be handed over down the socket with the note.
    Warm(cove_jail::run::WarmSandbox, std::os::fd::OwnedFd, Vec<u8>),
}

fn supervised_run(
    dir: &Path,
    id: SandboxId,
    lock: &fs::File,
    warm: Option<&str>,
) -> anyhow::Result<Started> {
    // Warm, the sandbox is built for the template, and stdin is the socket it is handed over
    // on.
    let (to_agent, bytes) = match warm {
        Some(template) => {
            let sock = rustix::io::fcntl_dupfd_cloexec(io::stdin(), 3)
                .context("keep the agent's socket")?;
            (Some(sock), template.as_bytes().to_vec())
        }
        None => {
            let mut bytes = Vec::with_capacity(SPEC_READ);
            io::Read::read_to_end(&mut io::stdin().lock(), &mut bytes).context("read the spec")?;
            (None, bytes)
        }
    };
    // The sandbox's stdin is nothing, as it was before the spec came this way.
    let null = fs::File::open("/dev/null").context("open /dev/null")?;
    rustix::stdio::dup2_stdin(&null).context("give the sandbox an empty stdin")?;
    let mut spec: Spec = serde_json::from_slice(&bytes).context("the sandbox spec is invalid")?;
    let pinned = resolve_image(&mut spec, crate::image::PullPolicy::Missing)?;
    spec.validate()?;
    // What `exec` needs to run commands the way the main one runs (the image's environment,
    // working directory and user applied): the claimed spec, which the agent writes, for a
    // warm sandbox (made now: no file is made on a claim's way).
    let resolved = dir.join("resolved.json");
    let resolved_now = if to_agent.is_some() {
        Vec::new()
    } else {
        serde_json::to_vec_pretty(&spec)?
    };
    fs::write(&resolved, resolved_now).with_context(|| format!("write {}", resolved.display()))?;
    let status_path = dir.join("status.new");
    let status = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&status_path)
        .with_context(|| format!("create {}", status_path.display()))?;
    // The sandbox's init holds these for its life: the directory's lock (it is alive), and
    // its image layers' pins (`cove image prune` leaves them).
    let mut keep = vec![lock.try_clone().context("share the lock")?.into()];
    for l in pinned.iter().flat_map(|p| p.locks()) {
        keep.push(l.try_clone().context("share the image pins")?.into());
    }
    let opts = RunOptions {
        timing: false,
        id: Some(id),
        no_dev_template: false,
        layers: pinned.as_ref().map(|p| p.dirs.clone()),
        state_root: None,
        detach: Some(std::sync::Arc::new(cove_jail::run::Detach {
            status: status.into(),
            keep,
            owner: dir
                .parent()
                .and_then(Path::parent)
                .map(|data| data.join(SERVER_LOCK)),
        })),
        quiet: true,
        freezer: true,
        init_file: std::env::var_os("COVE_INIT_FILE").map(PathBuf::from),
        warm: to_agent.is_some(),
    };
    if let Some(sock) = to_agent {
        let sandbox = cove_jail::run::start_warm(&spec, &opts)?;
        let note = cove_agent::warm::note(pinned.as_ref().map(|p| &p.dirs));
        return Ok(Started::Warm(sandbox, sock, note));
    }
    let init = cove_jail::run::start_detached(&spec, &opts)?;
    drop(pinned);
    Ok(Started::Running(init))
}

/// Applies the configuration of `spec`'s image, if it names a stored one (pulled if missing,
/// by `pull`'s policy), and pins its layers for as long as the result is kept.
fn resolve_image(
    spec: &mut Spec,
    pull: crate::image::PullPolicy,
) -> anyhow::Result<Option<cove_image::store::PinnedLayers>> {
    let Image::Ref(reference) = spec.image.clone() else {
        return Ok(None);
    };
    let given = crate::image::Overrides {
        cmd_given: !spec.cmd.is_empty(),
        workdir_given: spec.workdir.is_some(),
        user_given: false,
    };
    crate::image::resolve(
        &reference,
        spec,
        &given,
        pull,
        &crate::pull::RegistryArgs::default(),
    )
    .map(Some)
}

/// The largest warm pool a configuration may ask for.
const MAX_WARM_POOL: u32 = 1024;

/// The agent's warm pools, as the API takes from them.
struct Pools(Vec<std::sync::Arc<cove_agent::WarmPool>>);

impl cove_api::Warm for Pools {
    fn take(&self, spec: &Spec) -> Option<SandboxId> {
        self.0.iter().find_map(|p| p.take(spec))
    }
    fn give_back(&self, id: SandboxId) {
        for p in &self.0 {
            p.give_back(id);
        }
    }
    fn ready(&self) -> Vec<(String, usize)> {
        self.0
            .iter()
            .map(|p| (p.template().image.to_string(), p.ready()))
            .collect()
    }
}

/// Sandboxes' usage, from their cgroups.
struct CgroupUsage;

impl cove_api::Usage for CgroupUsage {
    fn read(&self, id: SandboxId) -> Option<cove_api::SandboxUsage> {
        let s = cgroup_of(id)?.stats().ok()?;
        Some(cove_api::SandboxUsage {
            cpu_seconds: s.cpu_usage_ns as f64 / 1e9,
            memory_bytes: s.memory_current_bytes,
            memory_peak_bytes: s.memory_peak_bytes,
            pids: s.pids_current,
            oom_kills: s.oom_kills,
            pids_limit_hits: s.pids_limit_hits,
            network: cove_jail::egress::usage(&id).map(|(rx, tx, denied)| cove_api::NetworkUsage {
                rx_bytes: rx,
                tx_bytes: tx,
                egress_denied_packets: denied,
            }),
        })
    }

    fn cpu_seconds(&self, id: SandboxId) -> Option<f64> {
        Some(cgroup_of(id)?.cpu_usage_ns().ok()? as f64 / 1e9)
    }
}

/// The cgroup of sandbox `id` (the hierarchy is detected once).
fn cgroup_of(id: SandboxId) -> Option<cove_jail::cgroup::Cgroup> {
    Some(cove_jail::cgroup::Hierarchy::detected()?.open(&cove_jail::state::cgroup_name(&id)))
}
