//! The REST API of `cove serve` (`/v1`, JSON): authentication, tenants, sandboxes.
//!
//! - **Auth**: `Authorization: Bearer <token>`. Tokens are stored only as their sha256
//!   (`/cove/tokens/<hex>` → tenant), so the store never holds a usable token. The admin token
//!   (created by `cove serve` on first start) may create tenants; every other request acts as
//!   the token's tenant, and **another tenant's sandbox does not exist** for it (404, never 403).
//! - **Writes** are compare-and-swap on the record's revision; the node agent does the work
//!   and records the result (see `cove-agent`).
//! - **Errors** are `{"error": {"code", "message"}}` with the matching status. Input is parsed by
//!   us, not by the framework, so every bad request (malformed or oversize JSON, unknown
//!   fields, bad ids, absurd limits) is a 4xx in that shape, and no message carries a host
//!   path, an errno or a node name.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use cove_store::{Embedded, Event, Expect, Kv, StoreError};
use cove_types::{
    Desired, EnvVar, Image, Limits, SandboxId, SandboxRecord, SandboxState, Spec,
    sandbox::{RECORD_SCHEMA, RECORDS_PREFIX as PREFIX, now_ms, record_key as key},
};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

mod events;
mod exec;
mod files;
pub mod lifecycle;
mod logs;
pub mod metrics;
pub mod openapi;
pub mod quota;
pub mod urls;
pub mod webhooks;

pub use exec::{
    ExecError, ExecOutput, ExecRequest, Executor, FileOp, Job, MAX_EXEC_OUTPUT, MAX_EXEC_TIMEOUT,
    Session,
};

/// Largest request body accepted.
pub const MAX_BODY: usize = 1 << 20;
/// Where token hashes live.
const TOKENS: &str = "/cove/tokens/";
/// Most labels or metadata entries on one sandbox, and their sizes.
const MAX_MAP_ENTRIES: usize = 64;
const MAX_MAP_KEY: usize = 128;
const MAX_MAP_VALUE: usize = 1024;
/// Default and largest page of a listing.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;
/// Longest a `wait` may block.
const MAX_WAIT: Duration = Duration::from_secs(600);

/// What a token grants.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRecord {
    /// The tenant the token acts as.
    pub tenant: String,
    /// Whether it may manage tenants.
    pub admin: bool,
}

/// The store key of a token.
pub fn token_key(token: &str) -> String {
    format!("{TOKENS}{}", hex(&sha2::Sha256::digest(token.as_bytes())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new random token (32 bytes from the kernel, hex).
pub fn new_token() -> std::io::Result<String> {
    let mut b = [0u8; 32];
    getrandom(&mut b)?;
    Ok(format!("cove_{}", hex(&b)))
}

/// A new random sandbox id.
pub fn new_id() -> std::io::Result<SandboxId> {
    let mut b = [0u8; 6];
    getrandom(&mut b)?;
    Ok(SandboxId::from_random(b))
}

/// The kernel's random bytes, by `getrandom(2)` (not a file opened and read for each: every
/// request draws a request id).
fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    use ring::rand::SecureRandom;
    ring::rand::SystemRandom::new()
        .fill(buf)
        .map_err(|_| std::io::Error::other("no random bytes"))
}

/// Registers `token` for `tenant` (the admin token at first start, tenants' tokens later).
pub async fn register_token(
    store: &Embedded,
    token: &str,
    record: &TokenRecord,
) -> Result<(), StoreError> {
    let value = serde_json::to_vec(record).expect("a token record serialises");
    store
        .put(&token_key(token), value, Expect::Any, None)
        .await
        .map(drop)
}

/// Every sandbox record (key, record), page by page, and the store's revision when the first
/// page was read: a watch from there misses no change made while the rest was read.
pub async fn all_records(
    store: &Embedded,
) -> Result<(u64, Vec<(String, SandboxRecord)>), StoreError> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    let mut revision = None;
    loop {
        let page = store.list(PREFIX, after.as_deref(), MAX_PAGE).await?;
        revision.get_or_insert(page.revision);
        out.extend(
            page.entries
                .iter()
                .filter_map(|e| parse(&e.value).ok().map(|r| (e.key.clone(), r))),
        );
        if !page.more {
            return Ok((revision.unwrap_or(0), out));
        }
        after = page.entries.last().map(|e| e.key.clone());
    }
}

/// A stored sandbox record.
fn parse(value: &[u8]) -> Result<SandboxRecord, serde_json::Error> {
    serde_json::from_slice(value)
}

/// Shared state of the handlers.
#[derive(Clone)]
pub struct Api {
    /// The state store.
    pub store: Embedded,
    /// Runs execs.
    pub executor: std::sync::Arc<dyn Executor>,
    /// Where each sandbox's directory (with `stdout.log` and `stderr.log`) is.
    pub sandboxes_dir: std::path::PathBuf,
    /// Quotas of tenants created without their own.
    pub default_quotas: Quotas,
    /// Limits of sandboxes created without their own (each field on its own).
    pub default_limits: Limits,
    /// The domain sandboxes' ports are reached under.
    pub domain: String,
    /// How the edge proxy is reached, and the key its credentials are signed with.
    pub proxy: urls::ProxyUrls,
    /// The metrics (`/metrics`); [`metrics::track`] keeps the lifecycle counters.
    pub metrics: std::sync::Arc<metrics::Metrics>,
    /// Reads a running sandbox's resource usage (its cgroup).
    pub usage: std::sync::Arc<dyn Usage>,
    /// Deliver webhooks to loopback and private addresses too (tests, trusted networks).
    pub webhooks_allow_private: bool,
    /// How long an ended sandbox's record and logs are kept (`None`: until deleted).
    pub retention: Option<std::time::Duration>,
    /// When each sandbox was last used (idle limits).
    pub activity: std::sync::Arc<lifecycle::Activity>,
    /// Serialises quota checks per tenant (count, then record), so that concurrent creates
    /// cannot together pass a quota each of them alone respects; each holds the revision of
    /// its tenant's last create.
    pub quota_locks: QuotaLocks,
    /// What each tenant holds, for quota checks ([`quota::Holdings::start`]).
    pub holdings: std::sync::Arc<quota::Holdings>,
    /// Set while the server stops every sandbox before it exits: no new ones, not ready.
    pub draining: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Sandboxes started ahead, which creates that fit them take (`None`: no pool).
    pub warm: Option<std::sync::Arc<dyn Warm>>,
}

/// A sandbox's resource usage now.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct SandboxUsage {
    /// CPU time used so far, all its processes together, in seconds.
    pub cpu_seconds: f64,
    /// Memory in use (its cgroup's count: processes, page cache, tmpfs files), in bytes.
    pub memory_bytes: u64,
    /// The most memory it has used, in bytes (0 where the kernel does not keep it).
    pub memory_peak_bytes: u64,
    /// Its processes and threads now.
    pub pids: u64,
    /// Processes the OOM killer has killed in it.
    pub oom_kills: u64,
    /// Forks refused because it was at its pids limit.
    pub pids_limit_hits: u64,
    /// With `net: egress`: its traffic through the host; `null` otherwise.
    pub network: Option<NetworkUsage>,
}

/// A sandbox's egress traffic.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct NetworkUsage {
    /// Bytes it received.
    pub rx_bytes: u64,
    /// Bytes it sent.
    pub tx_bytes: u64,
    /// Packets it sent that the egress policy dropped (a count that expires an hour after
    /// the last drop).
    pub egress_denied_packets: u64,
}

/// Reads sandboxes' resource usage; the binary provides it (from the cgroups), the API only
/// knows the shape.
pub trait Usage: Send + Sync + 'static {
    /// The usage of the sandbox `id`, if it still has a cgroup.
    fn read(&self, id: SandboxId) -> Option<SandboxUsage>;

    /// The CPU time the sandbox `id` has used, in seconds, if it still has a cgroup (read
    /// twice a second for idle policies that count CPU use).
    fn cpu_seconds(&self, id: SandboxId) -> Option<f64> {
        self.read(id).map(|u| u.cpu_seconds)
    }
}

/// Sandboxes started ahead of creates (the node agent's warm pool); the binary provides it.
pub trait Warm: Send + Sync + 'static {
    /// The id of a started sandbox that can run `spec`, reserved for it, if one is ready: the
    /// create records the sandbox under that id, or gives it back.
    fn take(&self, spec: &cove_types::Spec) -> Option<SandboxId>;
    /// Returns an id taken for a create that did not record it.
    fn give_back(&self, id: SandboxId);
    /// How many are ready now, per pool: its image (`host`, or a stored image's reference).
    fn ready(&self) -> Vec<(String, usize)>;
}

/// An id taken from the warm pool for a create, given back unless the create records it.
struct Taken<'a>(Option<(&'a dyn Warm, SandboxId)>);

impl Taken<'_> {
    /// The create recorded it.
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        if let Some((warm, id)) = self.0.take() {
            warm.give_back(id);
        }
    }
}

/// One lock per tenant, made on first use.
pub type QuotaLocks =
    std::sync::Arc<tokio::sync::Mutex<BTreeMap<String, std::sync::Arc<tokio::sync::Mutex<u64>>>>>;

impl Api {
    /// Checks that `spec` fits in `tenant`'s quotas next to its sandboxes that have not
    /// ended; the admin tenant has none. `last_create` is the revision of the tenant's last
    /// create (see [`quota`]).
    async fn check_quota(
        &self,
        tenant: &str,
        spec: &Spec,
        last_create: u64,
    ) -> Result<(), ApiError> {
        let Some(quotas) = self.quotas(tenant).await? else {
            return Ok(());
        };
        check_timeout(tenant, &quotas, spec.limits.timeout)?;
        if let Some(held) = self.holdings.of(tenant, last_create).await
            && fits(tenant, &quotas, spec, held).is_ok()
        {
            return Ok(());
        }
        // Refused by the holdings (or they are unavailable): the store itself decides.
        let mut held = quota::Held::default();
        let (_, records) = all_records(&self.store).await?;
        for (_, r) in records.iter().filter(|(_, r)| r.tenant == tenant) {
            held.add(quota::Held::of(r));
        }
        fits(tenant, &quotas, spec, held)
    }

    /// The quotas of `tenant` (none for the admin, who has no tenant record).
    async fn quotas(&self, tenant: &str) -> Result<Option<Quotas>, ApiError> {
        let Some(entry) = self.store.get(&format!("{TENANTS}{tenant}")).await? else {
            return Ok(None);
        };
        serde_json::from_slice::<TenantRecord>(&entry.value)
            .map(|r| Some(r.quotas))
            .map_err(|_| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "tenant record damaged",
                )
            })
    }

    async fn quota_lock(&self, tenant: &str) -> std::sync::Arc<tokio::sync::Mutex<u64>> {
        self.quota_locks
            .lock()
            .await
            .entry(tenant.to_string())
            .or_default()
            .clone()
    }
}

/// Whether a sandbox of `spec` fits in `quotas` beside what `tenant` holds: 429 with the
/// numbers if not.
fn fits(tenant: &str, quotas: &Quotas, spec: &Spec, held: quota::Held) -> Result<(), ApiError> {
    let over = |what: String| {
        Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "quota_exceeded",
            format!("tenant {tenant}: {what}"),
        ))
    };
    if held.count + 1 > quotas.sandboxes {
        return over(format!(
            "{} sandboxes already, quota {}",
            held.count, quotas.sandboxes
        ));
    }
    let want_mem = held.memory + spec.limits.memory.as_bytes();
    if want_mem > quotas.memory.as_bytes() {
        return over(format!(
            "{} more memory would make {}, quota {}",
            spec.limits.memory,
            cove_types::Size::bytes(want_mem),
            quotas.memory
        ));
    }
    let want_cpus = held.cpus_millis + u64::from(spec.limits.cpus_millis);
    if want_cpus > quotas.cpus_millis {
        return over(format!(
            "{} more CPUs would make {}, quota {}",
            f64::from(spec.limits.cpus_millis) / 1000.0,
            want_cpus as f64 / 1000.0,
            quotas.cpus_millis as f64 / 1000.0
        ));
    }
    Ok(())
}

/// A timeout over the tenant's maximum is over quota.
fn check_timeout(
    tenant: &str,
    quotas: &Quotas,
    timeout: Option<cove_types::Duration>,
) -> Result<(), ApiError> {
    match (quotas.max_timeout, timeout) {
        (Some(max), Some(t)) if t > max => Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "quota_exceeded",
            format!("tenant {tenant}: timeout {t} is over its maximum {max}"),
        )),
        _ => Ok(()),
    }
}

/// The router: `/healthz`, `/readyz`, `/openapi.json` and `/v1`.
pub fn router(api: Api) -> Router {
    let (routes, _) = api_router().split_for_parts();
    routes
        .route(
            "/openapi.json",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    openapi::json(),
                )
            }),
        )
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this endpoint",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            api.clone(),
            metrics::count_requests,
        ))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(api)
}

/// Every documented route: the router and the OpenAPI document come from this one list.
/// (File uploads read their body as a stream, which the body limit does not apply to.)
pub(crate) fn api_router() -> utoipa_axum::router::OpenApiRouter<Api> {
    use utoipa_axum::routes;
    utoipa_axum::router::OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(info))
        .routes(routes!(create_tenant))
        .routes(routes!(create_sandbox, list_sandboxes))
        .routes(routes!(get_sandbox, delete_sandbox))
        .routes(routes!(stop_sandbox))
        .routes(routes!(sandbox_stats))
        .routes(routes!(set_timeout))
        .routes(routes!(urls::sandbox_url))
        .routes(routes!(webhooks::create_webhook, webhooks::list_webhooks))
        .routes(routes!(webhooks::delete_webhook))
        .routes(routes!(pause_sandbox))
        .routes(routes!(resume_sandbox))
        .routes(routes!(wait_sandbox))
        .routes(routes!(exec::exec_sandbox))
        .routes(routes!(exec::exec_stream))
        .routes(routes!(logs::logs_sandbox))
        .routes(routes!(files::download, files::upload, files::remove))
        .routes(routes!(files::list))
        .routes(routes!(files::stat))
        .routes(routes!(files::mkdir))
        .routes(routes!(events::events))
        .routes(routes!(metrics::metrics))
}

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    fn not_found(id: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no sandbox {id}"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Conflict { .. } => ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                "the sandbox changed meanwhile; try again",
            ),
            // The detail goes to the server's log, not to the tenant.
            other => {
                tracing::error!(error = %other, "state store");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "the state store failed; try again",
                )
            }
        }
    }
}

/// Who is calling.
struct Caller {
    tenant: String,
    admin: bool,
}

impl Caller {
    /// The owner of `r`, for the control plane's own changes to it.
    fn owner_of(r: &SandboxRecord) -> Caller {
        Caller {
            tenant: r.tenant.clone(),
            admin: false,
        }
    }
}

/// The subprotocol a WebSocket client selects; it carries no meaning beyond "Cove, version 1".
pub(crate) const WS_PROTOCOL: &str = "cove.v1";

/// The token of a `cove.bearer.<token>` WebSocket subprotocol.
fn websocket_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix("cove.bearer."))
}

/// The caller, who must hold the admin token to `what`.
async fn admin(store: &Embedded, headers: &HeaderMap, what: &str) -> Result<Caller, ApiError> {
    let who = caller(store, headers).await?;
    if !who.admin {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("only the admin token may {what}"),
        ));
    }
    Ok(who)
}

async fn caller(store: &Embedded, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
    let token = match headers.get(header::AUTHORIZATION) {
        Some(value) => value
            .to_str()
            .map_err(|_| unauthorized("malformed Authorization header"))?
            .strip_prefix("Bearer ")
            .map(str::trim)
            .ok_or_else(|| {
                unauthorized("malformed Authorization header: expected Bearer <token>")
            })?,
        // Browsers cannot set headers on a WebSocket: the token rides as a subprotocol.
        None => websocket_token(headers).ok_or_else(|| {
            unauthorized(
                "missing Authorization: Bearer <token> (on a WebSocket from a browser: \
                 subprotocols \"cove.v1\" and \"cove.bearer.<token>\")",
            )
        })?,
    };
    if token.is_empty() || token.len() > 256 {
        return Err(unauthorized("malformed token"));
    }
    let entry = store
        .get(&token_key(token))
        .await?
        .ok_or_else(|| unauthorized("unknown token"))?;
    let record: TokenRecord = serde_json::from_slice(&entry.value).map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "token store damaged",
        )
    })?;
    // For the request's log line.
    let _ = metrics::REQUEST_TENANT.try_with(|t| *t.borrow_mut() = Some(record.tenant.clone()));
    Ok(Caller {
        tenant: record.tenant,
        admin: record.admin,
    })
}

/// Parses a JSON body ourselves, so that every failure is a 4xx in our shape.
fn body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body is larger than {MAX_BODY} bytes"),
            )
        } else {
            ApiError::bad("cannot read the request body")
        }
    })?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))
}

#[utoipa::path(get, path = "/healthz", tag = "server", security(), responses((status = 200, description = "The process serves", body = String)))]
async fn healthz() -> &'static str {
    "ok\n"
}

/// `GET /v1/info`: what a client may want to know of this server.
#[utoipa::path(get, path = "/v1/info", tag = "server", responses((status = 200, description = "Success", body = crate::openapi::Info), (status = "4XX", description = "Bad input, no token, no such sandbox, conflict, over quota", body = crate::openapi::ErrorBody)))]
async fn info(State(api): State<Api>, headers: HeaderMap) -> Result<Response, ApiError> {
    caller(&api.store, &headers).await?;
    Ok(Json(serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "domain": api.domain,
        "sandbox_url": api.proxy.url(&api.domain, &"0123456789ab".parse().expect("an id"), 8080)
            .replace("8080-0123456789ab", "{port}-{id}"),
        "default_limits": api.default_limits,
    }))
    .into_response())
}

#[utoipa::path(get, path = "/readyz", tag = "server", security(), responses((status = 200, description = "The store answers", body = String), (status = 503, description = "The store failed", body = crate::openapi::ErrorBody)))]
async fn readyz(State(api): State<Api>) -> Response {
    if api.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    match api.store.revision().await {
        Ok(_) => (StatusCode::OK, "ready\n").into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "state store unavailable\n").into_response(),
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct TenantRequest {
    name: String,
    /// Limits for this tenant (default: the server's).
    #[serde(default)]
    quotas: Option<Quotas>,
}

/// What one tenant may hold at once. Sandboxes that have ended count for nothing.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Quotas {
    /// Sandboxes not yet ended.
    pub sandboxes: u32,
    /// Sum of their memory limits.
    #[schema(value_type = String, example = "64G")]
    pub memory: cove_types::Size,
    /// Sum of their CPU quotas, in thousandths of a CPU.
    pub cpus_millis: u64,
    /// Longest a sandbox may live (its timeout, from creation or from a later "set
    /// timeout"); a sandbox created without a timeout gets this one. None: no maximum.
    #[schema(value_type = Option<String>, example = "24h")]
    pub max_timeout: Option<cove_types::Duration>,
}

impl Default for Quotas {
    fn default() -> Quotas {
        Quotas {
            sandboxes: 100,
            memory: cove_types::Size::bytes(64 << 30),
            cpus_millis: 32_000,
            max_timeout: None,
        }
    }
}

/// A tenant, as stored under `/cove/tenants/<name>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantRecord {
    /// The tenant's name.
    pub name: String,
    /// Its quotas.
    pub quotas: Quotas,
}

const TENANTS: &str = "/cove/tenants/";

#[utoipa::path(post, path = "/v1/tenants", tag = "tenants", request_body = TenantRequest, responses((status = 201, description = "Admin token only", body = crate::openapi::TenantCreated), (status = "4XX", description = "Bad input, no token, no such sandbox, conflict, over quota", body = crate::openapi::ErrorBody)))]
async fn create_tenant(
    State(api): State<Api>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    admin(&api.store, &headers, "create tenants").await?;
    let req: TenantRequest = body(raw)?;
    let ok = !req.name.is_empty()
        && req.name.len() <= 64
        && req
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok || req.name == "admin" {
        return Err(ApiError::bad(
            "tenant names are 1-64 letters, digits, '-' and '_' (not \"admin\")",
        ));
    }
    let token = new_token().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "no randomness",
        )
    })?;
    let tenant = TenantRecord {
        name: req.name.clone(),
        quotas: req.quotas.unwrap_or(api.default_quotas),
    };
    let value = serde_json::to_vec(&tenant).expect("a tenant serialises");
    match api
        .store
        .put(
            &format!("{TENANTS}{}", req.name),
            value,
            Expect::Absent,
            None,
        )
        .await
    {
        Ok(_) => {}
        Err(StoreError::Conflict { .. }) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("tenant {} exists", req.name),
            ));
        }
        Err(e) => return Err(e.into()),
    }
    register_token(
        &api.store,
        &token,
        &TokenRecord {
            tenant: req.name.clone(),
            admin: false,
        },
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"tenant": req.name, "token": token, "quotas": tenant.quotas})),
    )
        .into_response())
}

/// `POST /v1/sandboxes`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    /// `host` (default), or an image reference (pulled on first use).
    #[serde(default)]
    pub image: Option<String>,
    /// The command; optional for an image with an Entrypoint or Cmd.
    #[serde(default)]
    pub cmd: Vec<String>,
    /// Environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory.
    #[serde(default)]
    pub workdir: Option<String>,
    /// The user (`UID[:GID]`) the command, execs and file operations run as (default 0, the
    /// sandbox's root, an unprivileged id on the host).
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "1000:1000")]
    pub user: Option<cove_types::User>,
    /// Resource limits (the same fields and units as `cove run`'s flags); a field left out
    /// takes the server's default.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub limits: Option<serde_json::Map<String, serde_json::Value>>,
    /// Labels (`user_id`, …).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Free-form metadata.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Anyone may reach its ports through the edge proxy, without its access token or a
    /// signed URL (default: private).
    #[serde(default)]
    pub public: bool,
    /// `none` (default: loopback only) or `egress` (a route out through the host, never to
    /// cloud metadata, the host or private ranges).
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "egress")]
    pub net: Option<cove_types::NetMode>,
    /// With `net: egress`: `allow` (only these destinations) and `deny` lists of
    /// `A.B.C.D[/N][:PORT[-PORT]]`.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub egress: Option<cove_types::egress::EgressPolicy>,
    /// What happens when nothing uses it: `{"soft": "10m", "hard": "30m", "action": "stop"}`
    /// (`soft` optional: an `idle_warning` event then; `action` `stop`, the default, or
    /// `pause`). Use is proxied requests, execs and their I/O, file operations, resuming.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub idle: Option<cove_types::sandbox::IdlePolicy>,
}

type Labels = BTreeMap<String, String>;

fn check_map(what: &str, map: &Labels) -> Result<(), ApiError> {
    if map.len() > MAX_MAP_ENTRIES {
        return Err(ApiError::bad(format!("at most {MAX_MAP_ENTRIES} {what}")));
    }
    for (k, v) in map {
        let key_ok = !k.is_empty()
            && k.len() <= MAX_MAP_KEY
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
        if !key_ok {
            return Err(ApiError::bad(format!(
                "{what} key {k:?}: use 1-{MAX_MAP_KEY} letters, digits, '-', '_', '.', '/'"
            )));
        }
        if v.len() > MAX_MAP_VALUE {
            return Err(ApiError::bad(format!(
                "{what} {k:?}: values are at most {MAX_MAP_VALUE} bytes"
            )));
        }
    }
    Ok(())
}

impl CreateRequest {
    /// The spec, labels and metadata, all checked.
    fn spec(self, defaults: &Limits) -> Result<(Spec, Labels, Labels), ApiError> {
        let mut spec = Spec::new(self.cmd);
        spec.image = match self.image.as_deref() {
            None | Some("host") => Image::Host,
            Some(r) if r.starts_with('/') || r.starts_with('.') => {
                return Err(ApiError::bad(
                    "image must be \"host\" or an image reference, not a host path",
                ));
            }
            Some(r) => Image::Ref(
                r.parse::<cove_image_ref::Checked>()
                    .map_err(|e| ApiError::bad(format!("image: {e}")))?
                    .0,
            ),
        };
        spec.env = self
            .env
            .into_iter()
            .map(|(key, value)| EnvVar { key, value })
            .collect();
        spec.workdir = self.workdir.map(Into::into);
        spec.net = self.net.unwrap_or_default();
        spec.egress = self.egress.unwrap_or_default();
        if let Some(user) = self.user {
            spec.user = user;
        }
        spec.limits = defaults.clone();
        if let Some(given) = self.limits {
            let mut merged = serde_json::to_value(defaults).expect("limits serialise");
            let obj = merged.as_object_mut().expect("limits are an object");
            for (k, v) in given {
                obj.insert(k, v);
            }
            spec.limits = serde_json::from_value(merged)
                .map_err(|e| ApiError::bad(format!("limits: {e}")))?;
        }
        // An image may supply the command; everything else must hold now.
        if matches!(spec.image, Image::Ref(_)) && spec.cmd.is_empty() {
            let mut probe = spec.clone();
            probe.cmd = vec!["image-default".into()];
            probe.validate().map_err(|e| ApiError::bad(e.to_string()))?;
        } else {
            spec.validate().map_err(|e| ApiError::bad(e.to_string()))?;
        }
        check_map("labels", &self.labels)?;
        check_map("metadata", &self.metadata)?;
        Ok((spec, self.labels, self.metadata))
    }
}

/// Image references are checked by shape here (the API does not depend on the image crate):
/// what the agent cannot resolve ends the sandbox with `start_failure` and says why.
mod cove_image_ref {
    pub struct Checked(pub String);

    impl std::str::FromStr for Checked {
        type Err = String;
        fn from_str(s: &str) -> Result<Checked, String> {
            let ok = !s.is_empty()
                && s.len() <= 512
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./:@".contains(&b))
                && !s.starts_with(['-', ':', '@']);
            if ok {
                Ok(Checked(s.to_string()))
            } else {
                Err(format!("{s:?} is not an image reference"))
            }
        }
    }
}

fn view(record: &SandboxRecord) -> serde_json::Value {
    let mut v = serde_json::to_value(record).expect("a record serialises");
    if let Some(obj) = v.as_object_mut() {
        obj.remove("schema");
        obj.remove("tenant");
        obj.remove("remove");
        obj.remove("stop_reason");
    }
    v
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct CreateQuery {
    /// Answer once the sandbox runs (or has failed to start): the default. `false` answers
    /// as soon as the sandbox is recorded.
    wait: Option<bool>,
}

/// Longest `create` waits for the sandbox to run before answering with it still starting.
const CREATE_WAIT: Duration = Duration::from_secs(60);

#[utoipa::path(post, path = "/v1/sandboxes", tag = "sandboxes", params(CreateQuery), request_body = CreateRequest, responses((status = 201, description = "Created; running, or failed to start (`reason: start_failure`), unless `wait=false`", body = crate::openapi::SandboxView), (status = "4XX", description = "Bad input, no token, no such sandbox, conflict, over quota", body = crate::openapi::ErrorBody)))]
async fn create_sandbox(
    State(api): State<Api>,
    headers: HeaderMap,
    query: Result<Query<CreateQuery>, axum::extract::rejection::QueryRejection>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let who = caller(&api.store, &headers).await?;
    if api.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down and stopping its sandboxes: create it elsewhere, or after the restart",
        ));
    }
    let Query(q) = query.map_err(|e| ApiError::bad(format!("bad query: {}", e.body_text())))?;
    let req: CreateRequest = body(raw)?;
    let public = req.public;
    let idle = req.idle;
    if let Some(i) = &idle {
        i.check().map_err(ApiError::bad)?;
    }
    let (mut spec, labels, metadata) = req.spec(&api.default_limits)?;
    // A tenant with a maximum lifetime gets it as the timeout of a sandbox that names none.
    if spec.limits.timeout.is_none()
        && let Some(max) = api.quotas(&who.tenant).await?.and_then(|q| q.max_timeout)
    {
        spec.limits.timeout = Some(max);
    }
    // A warm sandbox if one fits: the agent hands it this spec instead of starting one.
    let taken = Taken(
        api.warm
            .as_deref()
            .and_then(|w| w.take(&spec).map(|id| (w, id))),
    );
    let id = match taken.0 {
        Some((_, id)) => id,
        None => new_id().map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "no randomness",
            )
        })?,
    };
    let now = now_ms();
    let spec_timeout = spec.limits.timeout;
    let record = SandboxRecord {
        schema: RECORD_SCHEMA,
        id,
        tenant: who.tenant,
        spec,
        labels,
        metadata,
        desired: Desired::Running,
        remove: false,
        state: SandboxState::Pending,
        reason: None,
        message: None,
        exit_code: None,
        created_at_ms: now,
        started_at_ms: None,
        ended_at_ms: None,
        report: None,
        deadline_ms: spec_timeout.map(|t| now.saturating_add(t.as_std().as_millis() as u64)),
        stop_reason: None,
        public,
        idle,
        idle_warned_at_ms: None,
    };
    let value = serde_json::to_vec(&record).expect("a record serialises");
    let lock = api.quota_lock(&record.tenant).await;
    let rev = {
        let mut last_create = lock.lock().await;
        api.check_quota(&record.tenant, &record.spec, *last_create)
            .await?;
        // Volatile: the agent starts the sandbox while the record reaches the disk (`sync`
        // below), not after. Nobody hears of the sandbox before its record is durable, and a
        // crash in between leaves a sandbox without a record, which the next start removes.
        let rev = api
            .store
            .put_volatile(&key(&id), value, Expect::Absent)
            .await?;
        *last_create = rev;
        rev
    };
    if taken.0.is_some() {
        api.metrics.warm_taken(&record.spec.image);
    }
    taken.keep();
    // The sandbox starts while its record is volatile: if the store fails now, the client is
    // told so at once, and which sandbox may exist (the next start of the server adopts it if
    // its record reached the disk, and removes it if not).
    let not_durable = |e: ApiError| match e.status {
        StatusCode::SERVICE_UNAVAILABLE => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!(
                "the state store failed before sandbox {id}'s record was safe on disk: once the \
                 server is back, GET /v1/sandboxes/{id} says whether it exists"
            ),
        ),
        _ => e,
    };
    let synced = async { api.store.sync().await.map_err(ApiError::from) };
    if q.wait == Some(false) {
        synced.await.map_err(not_durable)?;
        return Ok((StatusCode::CREATED, Json(view(&record))).into_response());
    }
    let started =
        |r: &SandboxRecord| matches!(r.state, SandboxState::Running | SandboxState::Exited);
    let ((), waited) = tokio::try_join!(synced, wait_for(&api, &id, rev, CREATE_WAIT, started))
        .map_err(not_durable)?;
    let latest = match waited {
        Waited::Reached(r) => *r,
        Waited::Deleted | Waited::TimedOut => record,
    };
    Ok((StatusCode::CREATED, Json(view(&latest))).into_response())
}

/// How following a sandbox's record ended.
enum Waited {
    /// The record came to satisfy the condition.
    Reached(Box<SandboxRecord>),
    /// The record was deleted.
    Deleted,
    /// Time ran out first.
    TimedOut,
}

/// Follows the record of `id` after revision `rev` until `done` holds for it, it is deleted,
/// or `limit` has passed.
async fn wait_for(
    api: &Api,
    id: &SandboxId,
    rev: u64,
    limit: Duration,
    done: impl Fn(&SandboxRecord) -> bool,
) -> Result<Waited, ApiError> {
    let mut watch = api.store.watch(&key(id), rev).await?;
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, watch.next()).await {
            Ok(Ok(Event::Put(entry))) => {
                if let Ok(r) = parse(&entry.value)
                    && done(&r)
                {
                    return Ok(Waited::Reached(Box::new(r)));
                }
            }
            Ok(Ok(Event::Delete { .. })) => return Ok(Waited::Deleted),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Ok(Waited::TimedOut),
        }
    }
}

/// A sandbox of the caller's tenant, with its revision; 404 for any other.
async fn load(api: &Api, who: &Caller, id: &str) -> Result<(SandboxRecord, u64), ApiError> {
    let sid: SandboxId = id.parse().map_err(|_| {
        ApiError::bad(format!(
            "{id:?} is not a sandbox id (12 lowercase hex characters)"
        ))
    })?;
    let entry = api
        .store
        .get(&key(&sid))
        .await?
        .ok_or_else(|| ApiError::not_found(id))?;
    let record = parse(&entry.value).map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the record is damaged",
        )
    })?;
    if record.tenant != who.tenant {
        return Err(ApiError::not_found(id));
    }
    Ok((record, entry.mod_revision))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}", tag = "sandboxes", params(("id" = String, Path, description = "The sandbox id (12 lowercase hex characters)")), responses((status = 200, description = "Success", body = crate::openapi::SandboxView), (status = "4XX", description = "Bad input, no token, no such sandbox, conflict, over quota", body = crate::openapi::ErrorBody)))]
async fn get_sandbox(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let who = caller(&api.store, &headers).await?;
    let (record, _) = load(&api, &who, &id).await?;
    Ok(Json(view(&record)).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    state: Option<String>,
    /// `key=value`; several separated by commas, all must match.
    label: Option<String>,
    limit: Option<usize>,
    after: Option<String>,
}

/// A `label` filter: `key=value` pairs separated by commas, all of which must match.
fn label_filter(spec: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    let mut labels = Vec::new();
    for pair in spec.unwrap_or("").split(',').filter(|p| !p.is_empty()) {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| ApiError::bad(format!("label filter {pair:?}: use key=value")))?;
        labels.push((k.to_string(), v.to_string()));
    }
    Ok(labels)
}

#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes", params(ListQuery), responses((status = 200, description = "Success", body = crate::openapi::SandboxList), (status = "4XX", description = "Bad input, no token, no such sandbox, conflict, over quota", body = crate::openapi::ErrorBody)))]
async fn list_sandboxes(
    State(api): State<Api>,
    headers: HeaderMap,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let who = caller(&api.store, &headers).await?;
    let Query(q) = query.map_err(|e| ApiError::bad(format!("bad query: {}", e.body_text())))?;
    let state: Option<SandboxState> = q
        .state
        .as_deref()
        .map(str::parse)
        .transpose()
        .map_err(ApiError::bad)?;
    let labels = label_filter(q.label.as_deref())?;
    let limit = q.limit.unwrap_or(DEFAULT_PAGE);
    if limit == 0 || limit > MAX_PAGE {
        return Err(ApiError::bad(format!("limit must be 1 to {MAX_PAGE}")));
    }
    let mut after = match q.after.as_deref() {
        Some(a) => Some(key(&a
            .parse::<SandboxId>()
            .map_err(|_| ApiError::bad("after: not a sandbox id"))?)),
        None => None,
    };
    // Filters apply after reading; keep reading pages until this one is full.
    let mut out = Vec::new();
    let mut next = None;
    loop {
        let page = api.store.list(PREFIX, after.as_deref(), MAX_PAGE).await?;
        for entry in &page.entries {
            let Ok(r) = parse(&entry.value) else {
                continue;
            };
            let matches = r.tenant == who.tenant
                && state.is_none_or(|s| r.state == s)
                && labels.iter().all(|(k, v)| r.labels.get(k) == Some(v));
            if matches {
                if out.len() == limit {
                    next = out.last().map(|r: &SandboxRecord| r.id.to_string());
                    break;
                }
                out.push(r);
            }
        }
        if next.is_some() || !page.more {
            break;
        }
        after = page.entries.last().map(|e| e.key.clone());
    }
    let sandboxes: Vec<serde_json::Value> = out.iter().map(view).collect();
    Ok(Json(serde_json::json!({"sandboxes": sandboxes, "next": next})).into_response())
}

/// Loads the caller's sandbox `id`, lets `change` edit it, and writes it back with a
/// compare-and-swap, loading again after a conflict. `change` returns whether there is
/// anything to write (or an error, which ends the update). Returns the record and, if it was
/// written, its new revision.
async fn update_record(
    api: &Api,
    who: &Caller,
    id: &str,
    mut change: impl FnMut(&mut SandboxRecord) -> Result<bool, ApiError>,
) -> Result<(SandboxRecord, Option<u64>), ApiError> {
    for _ in 0..10 {
        let (mut record, rev) = load(api, who, id).await?;
        if !change(&mut record)? {
            return Ok((record, None));
        }
        let value = serde_json::to_vec(&record).expect("a record serialises");
        match api
            .store
            .put(&key(&record.id), value, Expect::Revision(rev), None)
            .await
        {
            Ok(new) => return Ok((record, Some(new))),
            Err(StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(StoreError::Conflict {
        key: id.to_string(),
        expected: Expect::Any,
        current: None,
    }
    .into())
}

/// Sets `desired: stopped` (and `remove`, for delete) on the caller's sandbox.
async fn request_stop(
    api: &Api,
    who: &Caller,
    id: &str,
    remove: bool,
) -> Result<SandboxRecord, ApiError> {
    let (record, _) = update_record(api, who, id, |r| {
        let unchanged = r.desired == Desired::Stopped && r.remove == remove;
        r.desired = Desired::Stopped;
        r.remove |= remove;
        Ok(!unchanged)
    })
    .await?;
    Ok(record)
}

/// `pause` and `resume`: the wanted state, set if the sandbox is in a state it applies to;
/// answers once the agent has done it (or after 10 s, with the record as it is then).
async fn pause_or_resume(
    api: &Api,
    who: &Caller,
    id: &str,
    pause: bool,
) -> Result<Response, ApiError> {
    let (want, from, to) = if pause {
        (Desired::Paused, SandboxState::Running, SandboxState::Paused)
    } else {
        (
            Desired::Running,
            SandboxState::Paused,
            SandboxState::Running,
        )
    };
    let (record, rev) = update_record(api, who, id, |r| {
        if r.state == to {
            return Ok(false);
        }
        if r.state != from || r.desired == Desired::Stopped {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                if pause { "not_running" } else { "not_paused" },
                format!("sandbox {id} is {}", r.state.as_str()),
            ));
        }
        r.desired = want;
        Ok(true)
    })
    .await?;
    if !pause {
        // Resuming is use: the idle time counts from now.
        api.activity.touch(record.id);
    }
    let Some(rev) = rev else {
        return Ok(Json(view(&record)).into_response());
    };
    let settled = |r: &SandboxRecord| r.state == to || r.state.is_final();
    match wait_for(api, &record.id, rev, Duration::from_secs(10), settled).await? {
        Waited::Reached(r) => Ok(Json(view(&r)).into_response()),
        Waited::Deleted => Err(ApiError::not_found(id)),
        Waited::TimedOut => {
            let (r, _) = load(api, who, id).await?;
            Ok((StatusCode::ACCEPTED, Json(view(&r))).into_response())
        }
    }
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/pause", tag = "sandboxes", params(("id" = String, Path, description = "The sandbox id (12 lowercase hex characters)")), responses((status = 200, description = "Frozen (cgroup freezer), memory kept", body = crate::openapi::SandboxView), (status = "4XX", description = "Bad input, no token, no such sandbox, conflict, over quota", body = crate::openapi::ErrorBody)))]
async fn pause_sandbox(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let who = caller(&api.store, &headers).await?;
    pause_or_resume(&api, &who, &id, true).await
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/resume", tag = "sandboxes", params(("id" = String, Path, description = "The sandbox id (12 lowercase hex characters)")), responses((status = 200, description = "Thawed", body = crate::openapi::SandboxView), (status = "4XX", description = "Bad input, no token, no such sandbox, conflict, over quota", body = crate::openapi::ErrorBody)))]
async fn resume_sandbox(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let who = caller(&api.store, &headers).await?;
    pause_or_resume(&api, &who, &id, false).await
}

/// `POST /v1/sandboxes/{id}/timeout`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct TimeoutRequest {
    /// How long the sandbox may still live, from now.
    #[schema(value_type = String, example = "30m")]
    timeout: cove_types::Duration,
}

/// Longest a sandbox's timeout may reach from now.
const MAX_TIMEOUT: Duration = Duration::from_secs(30 * 86400);

/// Sets when the sandbox's timeout stops it: `timeout` from now (shorter or longer than what
/// was left), as E2B's `setTimeout` does.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/timeout", tag = "sandboxes", params(("id" = String, Path, description = "The sandbox id (12 lowercase hex characters)")), request_body = TimeoutRequest, responses((status = 200, description = "`deadline_ms` moved", body = crate::openapi::SandboxView), (status = "4XX", description = "Bad input, no token, no such sandbox, conflict, over quota", body = crate::openapi::ErrorBody)))]
async fn set_timeout(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let who = caller(&api.store, &headers).await?;
    let req: TimeoutRequest = body(raw)?;
    if req.timeout.as_std() > MAX_TIMEOUT {
        return Err(ApiError::bad("timeout is at most 30 days"));
    }
    if let Some(quotas) = api.quotas(&who.tenant).await? {
        check_timeout(&who.tenant, &quotas, Some(req.timeout))?;
    }
    if req.timeout.as_std().is_zero() {
        return Err(ApiError::bad(
            "timeout must be positive (to stop it now, use stop)",
        ));
    }
    let (record, _) = update_record(&api, &who, &id, |r| {
        if r.state.is_final() || r.desired == Desired::Stopped {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "not_running",
                format!(
                    "sandbox {id} is {}",
                    if r.state.is_final() {
                        "exited"
                    } else {
                        "stopping"
                    }
                ),
            ));
        }
        r.deadline_ms = Some(now_ms().saturating_add(req.timeout.as_std().as_millis() as u64));
        r.spec.limits.timeout = Some(req.timeout);
        Ok(true)
    })
    .await?;
    Ok(Json(view(&record)).into_response())
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/stats", tag = "sandboxes", params(("id" = String, Path, description = "The sandbox id (12 lowercase hex characters)")), responses((status = 200, description = "Its usage now, and its limits", body = SandboxUsage), (status = "4XX", description = "No such sandbox, or not running (409)", body = crate::openapi::ErrorBody)))]
async fn sandbox_stats(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let who = caller(&api.store, &headers).await?;
    let (record, _) = load(&api, &who, &id).await?;
    let not_running = || exec::not_running(&id, Some(record.state));
    if !matches!(record.state, SandboxState::Running | SandboxState::Paused) {
        return Err(not_running());
    }
    let usage = api.usage.read(record.id).ok_or_else(not_running)?;
    let mut v = serde_json::to_value(&usage).expect("usage serialises");
    v["state"] = serde_json::json!(record.state.as_str());
    v["limits"] = serde_json::json!({
        "memory_bytes": record.spec.limits.memory.as_bytes(),
        "pids": record.spec.limits.pids,
        "cpus_millis": record.spec.limits.cpus_millis,
    });
    Ok(Json(v).into_response())
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/stop", tag = "sandboxes", params(("id" = String, Path, description = "The sandbox id (12 lowercase hex characters)")), responses((status = 202, description = "SIGTERM, then SIGKILL after 10 s; the record stays", body = crate::openapi::SandboxView), (status = "4XX", description = "Bad input, no token, no such sandbox, conflict, over quota", body = crate::openapi::ErrorBody)))]
async fn stop_sandbox(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let who = caller(&api.store, &headers).await?;
    let record = request_stop(&api, &who, &id, false).await?;
    Ok((StatusCode::ACCEPTED, Json(view(&record))).into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct DeleteQuery {
    /// Stop it first if it runs (otherwise deleting a running sandbox is a conflict).
    #[serde(default)]
    force: bool,
}

#[utoipa::path(delete, path = "/v1/sandboxes/{id}", tag = "sandboxes", params(("id" = String, Path, description = "The sandbox id (12 lowercase hex characters)"), DeleteQuery), responses((status = 204, description = "Removed with its files"), (status = 202, description = "Still stopping; removed when it ends", body = crate::openapi::SandboxView), (status = "4XX", description = "Bad input, no token, no such sandbox, conflict, over quota", body = crate::openapi::ErrorBody)))]
async fn delete_sandbox(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    query: Result<Query<DeleteQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let who = caller(&api.store, &headers).await?;
    let Query(q) = query.map_err(|e| ApiError::bad(format!("bad query: {}", e.body_text())))?;
    let (record, _) = load(&api, &who, &id).await?;
    if !record.state.is_final() && !q.force {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "running",
            format!(
                "sandbox {id} is {}; stop it first or delete with force=true",
                record.state.as_str()
            ),
        ));
    }
    // Followed from before the request, so the agent's removal cannot be missed.
    let watch_from = api.store.revision().await?;
    request_stop(&api, &who, &id, true).await?;
    match wait_for(
        &api,
        &record.id,
        watch_from,
        Duration::from_secs(30),
        |_| false,
    )
    .await?
    {
        Waited::Deleted => Ok(StatusCode::NO_CONTENT.into_response()),
        Waited::Reached(_) | Waited::TimedOut => Ok(StatusCode::ACCEPTED.into_response()),
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct WaitQuery {
    /// Longest to wait (`30s`, `5m`; at most 10m; default 60s).
    #[param(value_type = Option<String>)]
    timeout: Option<cove_types::Duration>,
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/wait", tag = "sandboxes", params(("id" = String, Path, description = "The sandbox id (12 lowercase hex characters)"), WaitQuery), responses((status = 200, description = "It has ended", body = crate::openapi::SandboxView), (status = "4XX", description = "Bad input, no token, no such sandbox, conflict, over quota", body = crate::openapi::ErrorBody)))]
async fn wait_sandbox(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    query: Result<Query<WaitQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let who = caller(&api.store, &headers).await?;
    let Query(q) = query.map_err(|e| ApiError::bad(format!("bad query: {}", e.body_text())))?;
    let limit = q.timeout.map_or(Duration::from_secs(60), |d| d.as_std());
    if limit > MAX_WAIT {
        return Err(ApiError::bad("timeout is at most 10m"));
    }
    let (record, rev) = load(&api, &who, &id).await?;
    if record.state.is_final() {
        return Ok(Json(view(&record)).into_response());
    }
    match wait_for(&api, &record.id, rev, limit, |r| r.state.is_final()).await? {
        Waited::Reached(r) => Ok(Json(view(&r)).into_response()),
        Waited::Deleted => Err(ApiError::not_found(&id)),
        Waited::TimedOut => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "wait_timeout",
            format!(
                "sandbox {id} is still {} after {}",
                record.state.as_str(),
                cove_types::Duration::from_millis(limit.as_millis() as u64)
            ),
        )),
    }
}
