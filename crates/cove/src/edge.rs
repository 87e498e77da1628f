//! The edge proxy inside `cove serve`: its settings, its key, and how it reaches sandboxes
//! (records in the store, sockets made in their network namespaces by the jail).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use cove_api::urls::ProxyUrls;
use cove_jail::netns::{self, NetNs};
use cove_proxy::{Backend, BoxFuture, Proxy, SandboxInfo, Settings, SocketMaker};
use std::collections::HashMap;

use cove_store::{Embedded, Event, Kv};
use cove_types::sandbox::{RECORDS_PREFIX, record_key};
use cove_types::{SandboxId, SandboxRecord, SandboxState};

/// The proxy key's file name in the data directory.
pub const KEY_FILE: &str = "proxy-key";
/// Where the self-signed certificates are kept in the data directory.
pub const TLS_DIR: &str = "proxy-tls";

/// The `[proxy]` section of the configuration.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Serve the edge proxy at all.
    pub enabled: bool,
    /// Address of its cleartext listener (HTTP/1.1, and HTTP/2 with prior knowledge).
    pub listen: SocketAddr,
    /// Serve TLS too.
    pub tls: bool,
    /// Address of its TLS listener (HTTP/2 and HTTP/1.1 by ALPN).
    pub tls_listen: SocketAddr,
    /// PEM certificate chain for the TLS listener; without it (and `tls_key`), a self-signed
    /// certificate for `*.<domain>` is made on first start.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Longest a sandbox's port may take to start answering a request (then 504).
    pub upstream_timeout: cove_types::Duration,
    /// Scheme of the URLs handed out [default: https with TLS, else http].
    pub url_scheme: Option<String>,
    /// Port of the URLs handed out [default: the listener's of that scheme].
    pub url_port: Option<u16>,
}

impl Default for ProxyConfig {
    fn default() -> ProxyConfig {
        ProxyConfig {
            enabled: true,
            listen: "127.0.0.1:7080".parse().expect("a valid address"),
            tls: true,
            tls_listen: "127.0.0.1:7443".parse().expect("a valid address"),
            tls_cert: None,
            tls_key: None,
            upstream_timeout: cove_types::Duration::from_millis(60_000),
            url_scheme: None,
            url_port: None,
        }
    }
}

impl ProxyConfig {
    /// Checks what the flags and the file cannot.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            bail!("proxy: give both tls_cert and tls_key, or neither (for a self-signed one)");
        }
        if let Some(s) = &self.url_scheme
            && s != "http"
            && s != "https"
        {
            bail!("proxy: url_scheme {s:?}: use http or https");
        }
        if self.upstream_timeout.as_std().is_zero() {
            bail!("proxy: upstream_timeout must be positive");
        }
        Ok(())
    }
}

/// Running sandboxes, kept from the records' changes.
type Running = Arc<std::sync::RwLock<HashMap<SandboxId, SandboxInfo>>>;

/// Sandboxes as the proxy sees them: their records. Those that run are kept in memory (a
/// request to a running sandbox reads no record); any other is read from the store, which
/// is the authority (a sandbox that has just started may not be in memory yet).
struct Records {
    store: Embedded,
    metrics: Arc<cove_api::metrics::Metrics>,
    activity: Arc<cove_api::lifecycle::Activity>,
    running: Running,
}

/// Keeps `running` up to date with the records, from a full read then their changes; starts
/// again (emptied, so nothing stale is trusted) if the store's watch fails.
async fn follow(store: Embedded, running: Running) {
    let info = |r: &SandboxRecord| SandboxInfo {
        state: r.state,
        public: r.public,
    };
    let set = |id: SandboxId, r: Option<SandboxInfo>| {
        let mut map = running.write().unwrap_or_else(|p| p.into_inner());
        match r {
            Some(i) if i.state == SandboxState::Running => map.insert(id, i),
            _ => map.remove(&id),
        };
    };
    loop {
        if let Ok((revision, records)) = cove_api::all_records(&store).await
            && let Ok(mut watch) = store.watch(RECORDS_PREFIX, revision).await
        {
            for (_, r) in &records {
                set(r.id, Some(info(r)));
            }
            while let Ok(change) = watch.next().await {
                match change {
                    Event::Put(entry) => {
                        if let Ok(r) = serde_json::from_slice::<SandboxRecord>(&entry.value) {
                            set(r.id, Some(info(&r)));
                        }
                    }
                    Event::Delete { key, .. } => {
                        if let Some(id) = key
                            .strip_prefix(RECORDS_PREFIX)
                            .and_then(|s| s.parse().ok())
                        {
                            set(id, None);
                        }
                    }
                }
            }
        }
        running.write().unwrap_or_else(|p| p.into_inner()).clear();
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

impl Backend for Records {
    fn lookup(&self, id: SandboxId) -> BoxFuture<'_, Option<SandboxInfo>> {
        let known = self
            .running
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .copied();
        Box::pin(async move {
            if known.is_some() {
                return known;
            }
            let entry = self.store.get(&record_key(&id)).await.ok()??;
            let r: SandboxRecord = serde_json::from_slice(&entry.value).ok()?;
            Some(SandboxInfo {
                state: r.state,
                public: r.public,
            })
        })
    }

    fn observe(&self, id: Option<SandboxId>, status: hyper::StatusCode, elapsed: Duration) {
        self.metrics.proxy_request(status.as_u16(), elapsed);
        if let Some(id) = id {
            self.activity.touch(id);
        }
    }
}

/// Sockets made in sandboxes' network namespaces, by the jail.
struct JailSockets {
    /// The server's own namespace, to come back to.
    home: NetNs,
}

impl SocketMaker for JailSockets {
    fn tcp_socket(
        &self,
        id: &SandboxId,
        family: libc::c_int,
    ) -> std::io::Result<Option<std::os::fd::OwnedFd>> {
        match netns::of_sandbox(id) {
            Some(ns) => ns.tcp_socket(&self.home, family).map(Some),
            None => Ok(None),
        }
    }
}

/// The proxy's listeners, bound; the URLs the API hands out.
pub struct Bound {
    pub urls: ProxyUrls,
    listeners: Vec<(tokio::net::TcpListener, Option<Arc<rustls::ServerConfig>>)>,
    settings: Settings,
}

/// Binds the proxy's listeners (before anything else starts, so that a taken port is a clear
/// failure) and prints where they are.
pub async fn bind(config: &ProxyConfig, data: &Path, domain: &str) -> anyhow::Result<Bound> {
    config.check()?;
    let key_text = crate::serve::root_only_secret(&data.join(KEY_FILE), || {
        cove_proxy::access::new_key_hex().map_err(|_| anyhow::anyhow!("no randomness"))
    })?;
    let key = cove_proxy::access::Key::from_hex(&key_text).with_context(|| {
        format!(
            "{} is not a proxy key (64 hex characters); remove it to get a new one",
            data.join(KEY_FILE).display()
        )
    })?;
    let mut listeners = Vec::new();
    let (mut http_port, mut https_port) = (config.listen.port(), None);
    if config.enabled {
        let l = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("listen on {} (the edge proxy)", config.listen))?;
        let addr = l.local_addr()?;
        http_port = addr.port();
        crate::serve::announce(&format!("proxy on http://{addr}"));
        listeners.push((l, None));
        if config.tls {
            let (cert, key_path) = match (&config.tls_cert, &config.tls_key) {
                (Some(c), Some(k)) => (c.clone(), k.clone()),
                _ => {
                    let made = cove_proxy::tls::ensure_self_signed(&data.join(TLS_DIR), domain)?;
                    crate::serve::announce(&format!(
                        "proxy TLS certificate (self-signed, *.{domain}) in {}",
                        made.0.display()
                    ));
                    made
                }
            };
            let tls = cove_proxy::tls::server_config(&cert, &key_path)?;
            let l = tokio::net::TcpListener::bind(config.tls_listen)
                .await
                .with_context(|| {
                    format!("listen on {} (the edge proxy, TLS)", config.tls_listen)
                })?;
            let addr = l.local_addr()?;
            https_port = Some(addr.port());
            crate::serve::announce(&format!("proxy on https://{addr}"));
            listeners.push((l, Some(tls)));
        }
    }
    let scheme = config.url_scheme.clone().unwrap_or_else(|| {
        if https_port.is_some() {
            "https"
        } else {
            "http"
        }
        .to_string()
    });
    let port = config
        .url_port
        .unwrap_or(match (scheme.as_str(), https_port) {
            ("https", Some(p)) => p,
            ("https", None) => 443,
            _ => http_port,
        });
    Ok(Bound {
        urls: ProxyUrls {
            key: key.clone(),
            scheme,
            port,
        },
        listeners,
        settings: Settings {
            domain: domain.to_string(),
            key,
            upstream_timeout: config.upstream_timeout.as_std(),
            connect_timeout: Duration::from_secs(5),
        },
    })
}

impl Bound {
    /// Serves the listeners until the process ends.
    pub fn spawn(
        self,
        store: Embedded,
        metrics: Arc<cove_api::metrics::Metrics>,
        activity: Arc<cove_api::lifecycle::Activity>,
    ) -> anyhow::Result<()> {
        if self.listeners.is_empty() {
            return Ok(());
        }
        let home = netns::current().context("open the server's network namespace")?;
        let running = Running::default();
        tokio::spawn(follow(store.clone(), running.clone()));
        let backend: Arc<dyn Backend> = Arc::new(Records {
            store,
            metrics,
            activity,
            running,
        });
        let sockets: Arc<dyn SocketMaker> = Arc::new(JailSockets { home });
        let listeners = self
            .listeners
            .into_iter()
            .map(|(l, tls)| l.into_std().map(|l| (l, tls)))
            .collect::<std::io::Result<Vec<_>>>()
            .context("hand the proxy's listeners over")?;
        // One worker thread per CPU, each with its own single-threaded runtime accepting on
        // every listener, and its own connections to sandboxes: a request and the upstream
        // connection it uses are served by one thread, with no wake-up crossing threads.
        // Measured with bench/proxy.sh against the API's shared two-thread runtime: see the
        // commit that made this change.
        let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
        for w in 0..workers {
            let proxy = Proxy::new(self.settings.clone(), backend.clone(), sockets.clone())
                .context("start the edge proxy")?;
            let mine = listeners
                .iter()
                .map(|(l, tls)| l.try_clone().map(|l| (l, tls.clone())))
                .collect::<std::io::Result<Vec<_>>>()
                .context("share the proxy's listeners")?;
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("start a proxy worker's runtime")?;
            std::thread::Builder::new()
                .name(format!("cove-proxy-{w}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        let mut serving = tokio::task::JoinSet::new();
                        for (l, tls) in mine {
                            match tokio::net::TcpListener::from_std(l) {
                                Ok(l) => {
                                    serving.spawn(proxy.clone().serve(l, tls));
                                }
                                Err(e) => {
                                    tracing::error!(error = %e, "a proxy worker cannot listen")
                                }
                            }
                        }
                        while serving.join_next().await.is_some() {}
                    });
                })
                .context("start a proxy worker")?;
        }
        Ok(())
    }
}
