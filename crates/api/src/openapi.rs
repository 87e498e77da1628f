//! The OpenAPI document of the API, generated from the handlers' annotations and the request
//! and response types, and the router built from the same annotations (so a route cannot
//! exist without its documentation). The committed `docs/openapi.json` is checked against it
//! by a test.
//!
//! Response shapes the handlers build as JSON values are described here by schema-only types;
//! a test checks that each describes exactly the fields the handlers produce.

#![allow(dead_code)]

use std::collections::BTreeMap;

use serde::Serialize;
use utoipa::ToSchema;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

/// Every error: `{"error": {"code", "message"}}`.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// An error's code and message.
#[derive(Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable: `bad_request`, `not_found`, `not_running`, `quota_exceeded`, …
    pub code: String,
    /// One sentence for a person; never a host path or an errno.
    pub message: String,
}

/// A sandbox, as the API shows it.
#[derive(Serialize, ToSchema)]
pub struct SandboxView {
    /// 12 lowercase hex characters.
    pub id: String,
    /// What it runs: image, cmd, env, workdir, user, limits, …
    #[schema(value_type = Object)]
    pub spec: serde_json::Value,
    /// Labels (`user_id`, …).
    pub labels: BTreeMap<String, String>,
    /// The owner's metadata.
    pub metadata: BTreeMap<String, String>,
    /// `running`, `stopped` or `paused`: what its owner wants.
    pub desired: String,
    /// `pending`, `running`, `paused` or `exited`.
    pub state: String,
    /// Why it ended: `exited`, `timeout`, `memory_limit`, `pids_limit`, `cpu_time_limit`,
    /// `killed`, `start_failure`, `lost`, `idle_limit`, `server_shutdown`.
    pub reason: Option<String>,
    /// A sentence about the end.
    pub message: Option<String>,
    /// The command's exit code (128+N after signal N).
    pub exit_code: Option<i32>,
    /// Milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// When its command started.
    pub started_at_ms: Option<u64>,
    /// When it ended.
    pub ended_at_ms: Option<u64>,
    /// When its timeout stops it.
    pub deadline_ms: Option<u64>,
    /// Whether its ports are reachable through the edge proxy without credentials.
    pub public: bool,
    /// Its idle policy: `{"soft"?, "hard", "action": "stop"|"pause"}`.
    #[schema(value_type = Option<Object>)]
    pub idle: Option<serde_json::Value>,
    /// When the idle warning was given (cleared when it is used again).
    pub idle_warned_at_ms: Option<u64>,
    /// The jail's report once it has ended: times, peak memory, signal.
    #[schema(value_type = Option<Object>)]
    pub report: Option<serde_json::Value>,
}

/// A page of sandboxes.
#[derive(Serialize, ToSchema)]
pub struct SandboxList {
    /// In id order.
    pub sandboxes: Vec<SandboxView>,
    /// Pass as `after` for the next page; `null` on the last.
    pub next: Option<String>,
}

/// A file or directory in a sandbox.
#[derive(Serialize, ToSchema)]
pub struct FileEntry {
    /// The last component of its path.
    pub name: String,
    /// Its absolute path in the sandbox.
    pub path: String,
    /// `file`, `dir`, `symlink` or `other`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Bytes.
    pub size: u64,
    /// Permission bits in octal, e.g. `0644`.
    pub mode: String,
    /// Owner, as the sandbox numbers it.
    pub uid: u32,
    /// Group, as the sandbox numbers it.
    pub gid: u32,
    /// Last modification, milliseconds since the Unix epoch.
    pub modified_ms: i64,
    /// Where a symbolic link points.
    pub link_target: Option<String>,
}

/// A directory's entries.
#[derive(Serialize, ToSchema)]
pub struct FileList {
    /// By name.
    pub entries: Vec<FileEntry>,
}

/// A lifecycle event.
#[derive(Serialize, ToSchema)]
pub struct LifecycleEvent {
    /// `created`, `running`, `paused`, `resumed`, `stopping`, `idle_warning`, `exited`,
    /// `removed`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The sandbox.
    pub id: String,
    /// Its state after the change (absent for `removed`).
    pub state: Option<String>,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// The store revision of the change (resume with `since`).
    pub revision: u64,
    /// When it happened, milliseconds since the Unix epoch: the record's creation, start or
    /// end time for `created`, `running` and `exited`; when the change was seen otherwise.
    pub at_ms: u64,
    /// `exited` only: why.
    pub reason: Option<String>,
    /// `exited` only: the exit code.
    pub exit_code: Option<i32>,
    /// `exited` only: a sentence about the end.
    pub message: Option<String>,
    /// `idle_warning` only: what the hard idle limit will do, `stop` or `pause`.
    pub idle_action: Option<String>,
    /// `idle_warning` only: when it will, unless the sandbox is used before (milliseconds
    /// since the Unix epoch).
    pub idle_action_at_ms: Option<u64>,
}

/// A new tenant.
#[derive(Serialize, ToSchema)]
pub struct TenantCreated {
    /// Its name.
    pub tenant: String,
    /// Its token: shown once, stored only as a hash.
    pub token: String,
    /// Its quotas.
    pub quotas: crate::Quotas,
}

/// What the server says of itself.
#[derive(Serialize, ToSchema)]
pub struct Info {
    /// Cove's version.
    pub version: String,
    /// The domain sandboxes' ports are reached under.
    pub domain: String,
    /// Limits of sandboxes created without their own.
    #[schema(value_type = Object)]
    pub default_limits: serde_json::Value,
    /// The form of sandbox URLs on the edge proxy, `{port}` and `{id}` to be filled in.
    pub sandbox_url: String,
}

/// The document, with the bearer-token scheme every `/v1` route requires.
pub fn document() -> utoipa::openapi::OpenApi {
    let (_, mut doc) = crate::api_router().split_for_parts();
    doc.info.title = "Cove".into();
    doc.info.version = env!("CARGO_PKG_VERSION").into();
    doc.info.description = Some(
        "Isolated Linux sandboxes on demand: create, exec (collected or streamed over a \
         WebSocket, with a terminal), files, logs, events. Every /v1 request carries \
         `Authorization: Bearer <token>` and acts as that token's tenant."
            .into(),
    );
    doc.info.license = None;
    doc.info.contact = None;
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
    );
    doc.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
        "bearer",
        Vec::<String>::new(),
    )]);
    doc
}

/// The document as committed in `docs/openapi.json`.
pub fn json() -> String {
    let mut s = document()
        .to_pretty_json()
        .expect("the document serialises");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    const COMMITTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");

    /// The committed document is the one the code generates. `COVE_UPDATE_OPENAPI=1` rewrites
    /// it after an API change.
    #[test]
    fn the_committed_document_matches_the_code() {
        let generated = json();
        if std::env::var_os("COVE_UPDATE_OPENAPI").is_some() {
            std::fs::write(COMMITTED, &generated).unwrap();
        }
        let committed = std::fs::read_to_string(COMMITTED).unwrap_or_default();
        assert!(
            committed == generated,
            "docs/openapi.json is stale: run COVE_UPDATE_OPENAPI=1 cargo test -p cove-api"
        );
    }

    /// The property names of schema `name`.
    fn properties(name: &str) -> BTreeSet<String> {
        let doc: serde_json::Value = serde_json::from_str(&json()).unwrap();
        doc["components"]["schemas"][name]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("no schema {name}"))
            .keys()
            .cloned()
            .collect()
    }

    fn keys(v: &serde_json::Value) -> BTreeSet<String> {
        v.as_object().unwrap().keys().cloned().collect()
    }

    #[test]
    fn the_sandbox_schema_is_what_the_api_shows() {
        let record = cove_types::SandboxRecord {
            schema: cove_types::sandbox::RECORD_SCHEMA,
            id: "0123456789ab".parse().unwrap(),
            tenant: "t".into(),
            spec: cove_types::Spec::new(vec!["true".into()]),
            labels: Default::default(),
            metadata: Default::default(),
            desired: cove_types::Desired::Running,
            remove: false,
            state: cove_types::SandboxState::Running,
            reason: None,
            message: None,
            exit_code: None,
            created_at_ms: 1,
            started_at_ms: None,
            ended_at_ms: None,
            report: None,
            deadline_ms: None,
            stop_reason: None,
            public: false,
            idle: None,
            idle_warned_at_ms: None,
        };
        assert_eq!(keys(&crate::view(&record)), properties("SandboxView"));
    }

    #[test]
    fn the_endpoints_are_all_there() {
        let doc: serde_json::Value = serde_json::from_str(&json()).unwrap();
        let paths: BTreeSet<&str> = doc["paths"]
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        for p in [
            "/v1/sandboxes",
            "/v1/sandboxes/{id}",
            "/v1/sandboxes/{id}/exec/stream",
            "/v1/sandboxes/{id}/files",
            "/v1/events",
            "/v1/tenants",
        ] {
            assert!(paths.contains(p), "{p} missing from {paths:?}");
        }
        assert_eq!(
            doc["paths"]["/healthz"]["get"]["security"],
            serde_json::json!([])
        );
        assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    }
}
