//! `GET /metrics` (admin token): Prometheus text (OpenMetrics) of the control plane.
//!
//! | series | labels | what |
//! |---|---|---|
//! | `cove_sandboxes` | `state` (4 values) | sandboxes by state, counted at scrape |
//! | `cove_sandbox_starts_total` | – | sandboxes whose command started |
//! | `cove_sandbox_start_seconds` | – | creation to running |
//! | `cove_sandbox_ends_total` | `reason` (8 values) | sandboxes that ended, by why |
//! | `cove_api_requests_total` | `route`, `method`, `status` (class: `2xx` …) | API requests |
//! | `cove_api_request_duration_seconds` | `route` | API request latency |
//! | `cove_proxy_requests_total` | `status` (class) | edge proxy requests, the proxy's own answers included |
//! | `cove_proxy_request_duration_seconds` | `status` (class) | time to the start of the answer |
//! | `cove_sandbox_cpu_seconds_total` | `id`, `user_id` | CPU time of a running or paused sandbox |
//! | `cove_sandbox_memory_bytes` | `id`, `user_id` | its memory in use |
//! | `cove_sandbox_pids` | `id`, `user_id` | its processes and threads |
//! | `cove_sandbox_network_receive_bytes_total`, `…_transmit_bytes_total` | `id`, `user_id` | its egress traffic (sandboxes with egress) |
//! | `cove_sandbox_egress_denied_packets` | `id`, `user_id` | packets its egress policy dropped |
//!
//! Per-sandbox series exist while the sandbox runs or is paused: they are made afresh at every
//! scrape from the sandboxes there are, so a removed sandbox's series are gone at the next
//! one. `user_id` is the sandbox's label of that name (empty without one); there is one
//! series per sandbox and metric, so their number is bounded by the sandboxes a node holds.
//!
//! Label values are bounded: `route` is the route's template (`/v1/sandboxes/{id}`, never an
//! id), or `unmatched`; `method` is one of the standard methods or `other`. Counters count
//! from the server's start; starts and ends are derived from the records' changes in the
//! store, so they are seen whoever made them.

use std::collections::BTreeMap;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use cove_store::Event;
use cove_types::{SandboxRecord, SandboxState};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::events::{Seen, changes};
use crate::{Api, ApiError, admin, all_records, parse};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    method: &'static str,
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SandboxLabels {
    id: String,
    user_id: String,
}

/// The per-sandbox series, rebuilt at every scrape.
#[derive(Default)]
struct PerSandbox {
    cpu: Family<SandboxLabels, Counter<f64, std::sync::atomic::AtomicU64>>,
    memory: Family<SandboxLabels, Gauge>,
    pids: Family<SandboxLabels, Gauge>,
    rx: Family<SandboxLabels, Counter>,
    tx: Family<SandboxLabels, Counter>,
    denied: Family<SandboxLabels, Gauge>,
}

impl PerSandbox {
    fn register(&self, registry: &mut Registry) {
        let r = registry;
        r.register(
            "cove_sandbox_cpu_seconds",
            "CPU time of a sandbox",
            self.cpu.clone(),
        );
        r.register(
            "cove_sandbox_memory_bytes",
            "Memory a sandbox uses",
            self.memory.clone(),
        );
        r.register(
            "cove_sandbox_pids",
            "Processes and threads of a sandbox",
            self.pids.clone(),
        );
        r.register(
            "cove_sandbox_network_receive_bytes",
            "Bytes a sandbox received over egress",
            self.rx.clone(),
        );
        r.register(
            "cove_sandbox_network_transmit_bytes",
            "Bytes a sandbox sent over egress",
            self.tx.clone(),
        );
        r.register(
            "cove_sandbox_egress_denied_packets",
            "Packets of a sandbox its egress policy dropped",
            self.denied.clone(),
        );
    }

    /// Replaces every series with those of `now`.
    fn set(&self, now: &[(SandboxLabels, crate::SandboxUsage)]) {
        self.cpu.clear();
        self.memory.clear();
        self.pids.clear();
        self.rx.clear();
        self.tx.clear();
        self.denied.clear();
        let gauge = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        for (l, u) in now {
            self.cpu.get_or_create(l).inc_by(u.cpu_seconds);
            self.memory.get_or_create(l).set(gauge(u.memory_bytes));
            self.pids.get_or_create(l).set(gauge(u.pids));
            if let Some(n) = &u.network {
                self.rx.get_or_create(l).inc_by(n.rx_bytes);
                self.tx.get_or_create(l).inc_by(n.tx_bytes);
                self.denied
                    .get_or_create(l)
                    .set(gauge(n.egress_denied_packets));
            }
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabel {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabel {
    action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ObjectLabel {
    object: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ImageLabel {
    image: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabel {
    resource: &'static str,
}

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    sandboxes: Family<StateLabel, Gauge>,
    starts: Counter,
    start_seconds: Histogram,
    ends: Family<ReasonLabel, Counter>,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabel, Histogram>,
    proxy_requests: Family<StatusLabel, Counter>,
    proxy_latency: Family<StatusLabel, Histogram>,
    per_sandbox: PerSandbox,
    idle_warnings: Counter,
    idle_actions: Family<ActionLabel, Counter>,
    reaper_runs: Counter,
    reaper_removed: Family<ObjectLabel, Counter>,
    reaper_failures: Counter,
    node_capacity: Family<ResourceLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    node_allocated: Family<ResourceLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    warm_ready: Family<ImageLabel, Gauge>,
    warm_taken: Family<ImageLabel, Counter>,
    /// One scrape at a time rebuilds the per-sandbox series and encodes.
    scrape: tokio::sync::Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut registry = Registry::default();
        let sandboxes = Family::<StateLabel, Gauge>::default();
        let starts = Counter::default();
        let start_seconds = Histogram::new(exponential_buckets(0.002, 2.0, 14));
        let ends = Family::<ReasonLabel, Counter>::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<RouteLabel, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.0005, 2.0, 16))) as fn() -> Histogram,
        );
        let proxy_requests = Family::<StatusLabel, Counter>::default();
        let proxy_latency = Family::<StatusLabel, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.0001, 2.0, 18))) as fn() -> Histogram,
        );
        registry.register("cove_sandboxes", "Sandboxes by state", sandboxes.clone());
        registry.register(
            "cove_sandbox_starts",
            "Sandboxes whose command started",
            starts.clone(),
        );
        registry.register(
            "cove_sandbox_start_seconds",
            "Time from a sandbox's creation to its command running",
            start_seconds.clone(),
        );
        registry.register(
            "cove_sandbox_ends",
            "Sandboxes that ended, by reason",
            ends.clone(),
        );
        registry.register("cove_api_requests", "API requests", requests.clone());
        registry.register(
            "cove_api_request_duration_seconds",
            "API request latency",
            latency.clone(),
        );
        registry.register(
            "cove_proxy_requests",
            "Edge proxy requests, by status class",
            proxy_requests.clone(),
        );
        registry.register(
            "cove_proxy_request_duration_seconds",
            "Edge proxy time to the start of the answer",
            proxy_latency.clone(),
        );
        let per_sandbox = PerSandbox::default();
        per_sandbox.register(&mut registry);
        let idle_warnings = Counter::default();
        registry.register(
            "cove_idle_warnings",
            "Idle warnings (soft limits reached)",
            idle_warnings.clone(),
        );
        let idle_actions = Family::<ActionLabel, Counter>::default();
        registry.register(
            "cove_idle_actions",
            "Idle hard limits applied, by action (stop, pause)",
            idle_actions.clone(),
        );
        let reaper_runs = Counter::default();
        registry.register(
            "cove_reaper_runs",
            "Passes of the background reaper",
            reaper_runs.clone(),
        );
        let reaper_removed = Family::<ObjectLabel, Counter>::default();
        registry.register(
            "cove_reaper_removed",
            "Stale host objects the reaper removed, by kind",
            reaper_removed.clone(),
        );
        let reaper_failures = Counter::default();
        registry.register(
            "cove_reaper_failures",
            "Stale host objects the reaper could not remove",
            reaper_failures.clone(),
        );
        let node_capacity = Family::default();
        registry.register(
            "cove_node_capacity",
            "What this node has, by resource (memory_bytes, cpus)",
            node_capacity.clone(),
        );
        let node_allocated = Family::default();
        registry.register(
            "cove_node_allocated",
            "The limits of the sandboxes that have not ended, summed, by resource",
            node_allocated.clone(),
        );
        let warm_ready = Family::<ImageLabel, Gauge>::default();
        registry.register(
            "cove_warm_pool_ready",
            "Warm sandboxes ready for a create to take, by pool (its image)",
            warm_ready.clone(),
        );
        let warm_taken = Family::<ImageLabel, Counter>::default();
        registry.register(
            "cove_warm_pool_taken",
            "Sandboxes created from a warm pool, by pool (its image)",
            warm_taken.clone(),
        );
        Metrics {
            warm_ready,
            warm_taken,
            per_sandbox,
            idle_warnings,
            idle_actions,
            reaper_runs,
            reaper_removed,
            reaper_failures,
            node_capacity,
            node_allocated,
            scrape: tokio::sync::Mutex::new(()),
            registry,
            sandboxes,
            starts,
            start_seconds,
            ends,
            requests,
            latency,
            proxy_requests,
            proxy_latency,
        }
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// The class of a status: `2xx`, `4xx`, ….
fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

impl Metrics {
    /// Counts one sandbox created from the warm pool of `image`.
    pub(crate) fn warm_taken(&self, image: &cove_types::Image) {
        let image = image.to_string();
        self.warm_taken.get_or_create(&ImageLabel { image }).inc();
    }

    /// Counts one idle hard-limit action (`stop` or `pause`).
    pub fn idle_action(&self, action: &'static str) {
        self.idle_actions
            .get_or_create(&ActionLabel { action })
            .inc();
    }

    /// Counts one reaper pass: objects removed by kind (a bounded set), and failures.
    pub fn reaper_pass(
        &self,
        removed: impl IntoIterator<Item = (&'static str, u64)>,
        failures: u64,
    ) {
        self.reaper_runs.inc();
        for (object, n) in removed {
            self.reaper_removed
                .get_or_create(&ObjectLabel { object })
                .inc_by(n);
        }
        self.reaper_failures.inc_by(failures);
    }

    /// Counts one edge proxy request.
    pub fn proxy_request(&self, status: u16, elapsed: std::time::Duration) {
        let label = StatusLabel {
            status: status_class(status),
        };
        self.proxy_requests.get_or_create(&label).inc();
        self.proxy_latency
            .get_or_create(&label)
            .observe(elapsed.as_secs_f64());
    }

    /// Counts (and logs) what took a sandbox from `before` to `r`.
    fn record(&self, before: Option<&Seen>, r: &SandboxRecord) {
        for kind in changes(before, r) {
            tracing::info!(
                sandbox = %r.id,
                tenant = %r.tenant,
                user_id = r.labels.get("user_id").map_or("", String::as_str),
                state = r.state.as_str(),
                reason = r
                    .reason
                    .and_then(|x| serde_json::to_value(x).ok())
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                exit_code = r.exit_code,
                "sandbox {kind}"
            );
            match kind {
                "running" if before.is_some() || r.started_at_ms.is_some() => {
                    self.starts.inc();
                    if let Some(started) = r.started_at_ms {
                        let secs = started.saturating_sub(r.created_at_ms) as f64 / 1000.0;
                        self.start_seconds.observe(secs);
                    }
                }
                "idle_warning" => {
                    self.idle_warnings.inc();
                }
                "exited" => {
                    let reason = r.reason.map_or_else(
                        || "unknown".to_string(),
                        |x| {
                            serde_json::to_value(x)
                                .ok()
                                .and_then(|v| v.as_str().map(str::to_string))
                                .unwrap_or_default()
                        },
                    );
                    self.ends.get_or_create(&ReasonLabel { reason }).inc();
                }
                _ => {}
            }
        }
    }
}

/// Follows the records' changes for the start and end counters, until the store fails.
pub async fn track(api: Api) {
    // What exists already is not counted: counters start with the server.
    let Ok((mut seen, mut watch)) = crate::events::now_and_after(&api.store).await else {
        return;
    };
    while let Ok(change) = watch.next().await {
        match change {
            Event::Put(entry) => {
                if let Ok(r) = parse(&entry.value) {
                    api.metrics.record(seen.get(&entry.key), &r);
                    seen.insert(entry.key.clone(), Seen::of(&r));
                }
            }
            Event::Delete { key, .. } => {
                seen.remove(&key);
            }
        }
    }
}

tokio::task_local! {
    /// The tenant of the request being served, once its token has been checked.
    pub(crate) static REQUEST_TENANT: std::cell::RefCell<Option<String>>;
}

/// A request id: the client's `X-Request-Id` if it is a short token, or a new one.
fn request_id(req: &Request) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        })
        .map(str::to_string)
        .or_else(|| crate::new_id().ok().map(|id| id.to_string()))
        .unwrap_or_default()
}

/// Counts and times every request, by route template, and logs it (with its request id,
/// which the response carries as `X-Request-Id`, its tenant and its sandbox).
pub(crate) async fn count_requests(State(api): State<Api>, req: Request, next: Next) -> Response {
    let rid = request_id(&req);
    let sandbox = req
        .uri()
        .path()
        .strip_prefix("/v1/sandboxes/")
        .and_then(|rest| rest.split('/').next())
        .filter(|s| s.parse::<cove_types::SandboxId>().is_ok())
        .map(str::to_string);
    let method_name = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = match req.method().as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    };
    let started = Instant::now();
    let (mut response, tenant) = REQUEST_TENANT
        .scope(std::cell::RefCell::new(None), async {
            let response = next.run(req).await;
            let tenant = REQUEST_TENANT.with(|t| t.borrow().clone());
            (response, tenant)
        })
        .await;
    if let Ok(v) = axum::http::HeaderValue::from_str(&rid) {
        response.headers_mut().insert("x-request-id", v);
    }
    tracing::info!(
        request_id = %rid,
        method = %method_name,
        route = %route,
        status = response.status().as_u16(),
        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
        tenant = tenant.as_deref().unwrap_or(""),
        sandbox = sandbox.as_deref().unwrap_or(""),
        "request"
    );
    let status = status_class(response.status().as_u16());
    api.metrics
        .requests
        .get_or_create(&RequestLabels {
            route: route.clone(),
            method,
            status,
        })
        .inc();
    api.metrics
        .latency
        .get_or_create(&RouteLabel { route })
        .observe(started.elapsed().as_secs_f64());
    response
}

#[utoipa::path(get, path = "/metrics", tag = "server", description = "Prometheus text (OpenMetrics) of the control plane; admin token only.", responses((status = 200, description = "The metrics", body = String, content_type = "application/openmetrics-text"), (status = "4XX", description = "No token, or not the admin's", body = crate::openapi::ErrorBody)))]
pub(crate) async fn metrics(
    State(api): State<Api>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    admin(&api.store, &headers, "read the metrics").await?;
    let mut counts: BTreeMap<&'static str, i64> = [
        SandboxState::Pending,
        SandboxState::Running,
        SandboxState::Paused,
        SandboxState::Exited,
    ]
    .into_iter()
    .map(|s| (s.as_str(), 0))
    .collect();
    let records = all_records(&api.store).await?.1;
    let mut live = Vec::new();
    let (mut memory, mut cpus) = (0u64, 0u64);
    for (_, r) in &records {
        *counts.entry(r.state.as_str()).or_default() += 1;
        if !r.state.is_final() {
            memory += r.spec.limits.memory.as_bytes();
            cpus += u64::from(r.spec.limits.cpus_millis);
        }
        if matches!(r.state, SandboxState::Running | SandboxState::Paused) {
            let labels = SandboxLabels {
                id: r.id.to_string(),
                user_id: r.labels.get("user_id").cloned().unwrap_or_default(),
            };
            live.push((labels, r.id));
        }
    }
    // Cgroup files to read for every sandbox: off the async threads.
    let usage = api.usage.clone();
    let now: Vec<_> = tokio::task::spawn_blocking(move || {
        live.into_iter()
            .filter_map(|(l, id)| usage.read(id).map(|u| (l, u)))
            .collect()
    })
    .await
    .unwrap_or_default();
    let _one_at_a_time = api.metrics.scrape.lock().await;
    api.metrics.per_sandbox.set(&now);
    for (state, n) in counts {
        api.metrics
            .sandboxes
            .get_or_create(&StateLabel { state })
            .set(n);
    }
    api.metrics
        .set_node(node_capacity(), (memory, cpus as f64 / 1000.0));
    for (image, ready) in api.warm.as_ref().map(|w| w.ready()).unwrap_or_default() {
        api.metrics
            .warm_ready
            .get_or_create(&ImageLabel { image })
            .set(ready as i64);
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &api.metrics.registry).map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "encoding failed",
        )
    })?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

impl Metrics {
    /// Sets the node's capacity and allocation: (memory bytes, CPUs) each.
    fn set_node(&self, capacity: (u64, f64), allocated: (u64, f64)) {
        for (family, (memory, cpus)) in [
            (&self.node_capacity, capacity),
            (&self.node_allocated, allocated),
        ] {
            family
                .get_or_create(&ResourceLabel {
                    resource: "memory_bytes",
                })
                .set(memory as f64);
            family
                .get_or_create(&ResourceLabel { resource: "cpus" })
                .set(cpus);
        }
    }
}

/// This machine's memory (bytes, `MemTotal`) and CPUs (those this process may run on).
fn node_capacity() -> (u64, f64) {
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024);
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    (memory, cpus as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every family, with one series each, as OpenMetrics text.
    fn everything() -> String {
        let m = Metrics::default();
        m.sandboxes
            .get_or_create(&StateLabel { state: "running" })
            .set(1);
        m.starts.inc();
        m.start_seconds.observe(0.01);
        m.ends
            .get_or_create(&ReasonLabel {
                reason: "exited".into(),
            })
            .inc();
        let route = RouteLabel {
            route: "/v1/sandboxes".into(),
        };
        m.requests
            .get_or_create(&RequestLabels {
                route: route.route.clone(),
                method: "GET",
                status: "2xx",
            })
            .inc();
        m.latency.get_or_create(&route).observe(0.001);
        m.proxy_request(200, std::time::Duration::from_millis(1));
        let usage = crate::SandboxUsage {
            network: Some(crate::NetworkUsage::default()),
            ..Default::default()
        };
        let labels = SandboxLabels {
            id: "0123456789ab".into(),
            user_id: "42".into(),
        };
        m.per_sandbox.set(&[(labels, usage)]);
        m.idle_warnings.inc();
        m.idle_action("stop");
        m.reaper_pass([("cgroup", 1)], 0);
        m.set_node(node_capacity(), (1 << 30, 1.5));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &m.registry).unwrap();
        text
    }

    #[test]
    fn the_grafana_dashboard_asks_only_for_series_that_exist() {
        let text = everything();
        let samples: std::collections::HashSet<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        let dashboard = include_str!("../../../deploy/grafana/cove.json");
        let mut names: Vec<&str> = dashboard
            .match_indices("cove_")
            .map(|(i, _)| {
                let rest = &dashboard[i..];
                let end = rest
                    .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                    .unwrap_or(rest.len());
                &rest[..end]
            })
            .collect();
        names.sort();
        names.dedup();
        assert!(names.len() >= 12, "{names:?}");
        for name in names {
            assert!(samples.contains(name), "{name} is not served: {samples:?}");
        }
    }
}
