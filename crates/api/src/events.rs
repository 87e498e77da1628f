//! `GET /v1/events`: the lifecycle of the caller's sandboxes as a stream of events, over a
//! WebSocket (one JSON text message per event) or, without an upgrade, as chunked
//! newline-delimited JSON.
//!
//! Events are derived from the changes of the sandboxes' records in the store, so they are
//! never lost to a slow consumer: each carries the store `revision` of its change, and
//! `since=REVISION` replays everything after it (as far as the store keeps history).
//!
//! | type | when |
//! |---|---|
//! | `created` | the record was made (state `pending`) |
//! | `running` | the main command started |
//! | `paused` / `resumed` | the freezer froze or thawed it |
//! | `stopping` | a stop (or a delete) was asked for while it runs |
//! | `idle_warning` | unused past its soft idle limit; with `idle_action` and `idle_action_at_ms` |
//! | `exited` | it ended; with `reason`, `exit_code`, `message` |
//! | `removed` | its record was deleted |

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{Message, WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use cove_store::{Event, Kv};
use cove_types::sandbox::RECORDS_PREFIX as PREFIX;
use cove_types::{Desired, SandboxRecord, SandboxState};
use serde::Deserialize;

use crate::{Api, ApiError, all_records, caller, label_filter, parse};

/// Every event type.
pub(crate) const TYPES: &[&str] = &[
    "created",
    "running",
    "paused",
    "resumed",
    "stopping",
    "idle_warning",
    "exited",
    "removed",
];

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct EventsQuery {
    /// Only this sandbox's events.
    id: Option<String>,
    /// Only these types (comma-separated).
    #[serde(rename = "type")]
    types: Option<String>,
    /// Only sandboxes with these labels (`key=value`, comma-separated, all must match).
    label: Option<String>,
    /// Replay the changes after this store revision first.
    since: Option<u64>,
}

struct Filter {
    tenant: String,
    id: Option<String>,
    types: Vec<String>,
    labels: Vec<(String, String)>,
}

impl Filter {
    fn wants(&self, kind: &str, r: &Seen) -> bool {
        r.tenant == self.tenant
            && self.id.as_ref().is_none_or(|id| *id == r.id)
            && (self.types.is_empty() || self.types.iter().any(|t| t == kind))
            && self.labels.iter().all(|(k, v)| r.labels.get(k) == Some(v))
    }
}

/// What the stream knows of a sandbox: enough to tell what changed.
#[derive(Clone)]
pub(crate) struct Seen {
    id: String,
    pub(crate) tenant: String,
    labels: BTreeMap<String, String>,
    state: SandboxState,
    stopping: bool,
    idle_warned: bool,
}

impl Seen {
    pub(crate) fn of(r: &SandboxRecord) -> Seen {
        Seen {
            id: r.id.to_string(),
            tenant: r.tenant.clone(),
            labels: r.labels.clone(),
            state: r.state,
            stopping: r.desired == Desired::Stopped && !r.state.is_final(),
            idle_warned: r.idle_warned_at_ms.is_some(),
        }
    }
}

/// The events that take a sandbox from `before` (unknown: `None`) to `r`.
pub(crate) fn changes(before: Option<&Seen>, r: &SandboxRecord) -> Vec<&'static str> {
    let now = Seen::of(r);
    let mut out = Vec::new();
    let Some(before) = before else {
        // First sight (a new record, or a replay's first change of one): its state says it.
        out.push(match r.state {
            SandboxState::Pending => "created",
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
            SandboxState::Exited => "exited",
        });
        return out;
    };
    if now.stopping && !before.stopping {
        out.push("stopping");
    }
    if now.idle_warned && !before.idle_warned {
        out.push("idle_warning");
    }
    if now.state != before.state {
        out.push(match (before.state, now.state) {
            (SandboxState::Paused, SandboxState::Running) => "resumed",
            (_, SandboxState::Running) => "running",
            (_, SandboxState::Paused) => "paused",
            (_, SandboxState::Exited) => "exited",
            (_, SandboxState::Pending) => "created",
        });
    }
    out
}

fn event(kind: &str, r: &SandboxRecord, revision: u64) -> serde_json::Value {
    // When it happened, where the record says (a replay reports the past as it was).
    let at = match kind {
        "created" => Some(r.created_at_ms),
        "running" => r.started_at_ms,
        "exited" => r.ended_at_ms,
        "idle_warning" => r.idle_warned_at_ms,
        _ => None,
    };
    let mut v = serde_json::json!({
        "type": kind,
        "id": r.id.as_str(),
        "state": r.state.as_str(),
        "labels": r.labels,
        "revision": revision,
        "at_ms": at.unwrap_or_else(cove_types::sandbox::now_ms),
    });
    if let ("idle_warning", Some(p), Some(warned)) = (kind, r.idle, r.idle_warned_at_ms) {
        // Warned at the soft limit: the hard one is the difference later.
        let soft = p.soft.map_or(0, |s| s.as_std().as_millis() as u64);
        let hard = p.hard.as_std().as_millis() as u64;
        v["idle_action"] = serde_json::json!(p.action);
        v["idle_action_at_ms"] = serde_json::json!(warned + hard.saturating_sub(soft));
    }
    if kind == "exited" {
        v["reason"] = serde_json::json!(r.reason);
        v["exit_code"] = serde_json::json!(r.exit_code);
        v["message"] = serde_json::json!(r.message);
    }
    v
}

/// How often a quiet stream sends a keep-alive (an empty line, or a WebSocket ping).
const KEEPALIVE: Duration = Duration::from_secs(20);

#[utoipa::path(get, path = "/v1/events", tag = "events", description = "Lifecycle events of the caller's sandboxes: a WebSocket (one JSON message each) or, without an upgrade, newline-delimited JSON.", params(EventsQuery), responses((status = 200, description = "Newline-delimited events", body = crate::openapi::LifecycleEvent, content_type = "application/x-ndjson"), (status = 101, description = "Switching to the WebSocket protocol"), (status = "4XX", description = "Bad input, no token, no such sandbox, conflict, over quota", body = crate::openapi::ErrorBody)))]
pub(crate) async fn events(
    State(api): State<Api>,
    headers: HeaderMap,
    query: Result<Query<EventsQuery>, QueryRejection>,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let who = caller(&api.store, &headers).await?;
    let Query(q) = query.map_err(|e| ApiError::bad(format!("bad query: {}", e.body_text())))?;
    let types: Vec<String> = q
        .types
        .as_deref()
        .unwrap_or("")
        .split(',')
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect();
    if let Some(bad) = types.iter().find(|t| !TYPES.contains(&t.as_str())) {
        return Err(ApiError::bad(format!(
            "event type {bad:?}: use {}",
            TYPES.join(", ")
        )));
    }
    if let Some(id) = &q.id
        && id.parse::<cove_types::SandboxId>().is_err()
    {
        return Err(ApiError::bad(format!(
            "{id:?} is not a sandbox id (12 lowercase hex characters)"
        )));
    }
    let filter = Filter {
        tenant: who.tenant,
        id: q.id,
        types,
        labels: label_filter(q.label.as_deref())?,
    };
    // What is there now, unless replaying from a revision.
    let (seen, watch) = match q.since {
        Some(rev) => (BTreeMap::new(), api.store.watch(PREFIX, rev).await?),
        None => now_and_after(&api.store).await?,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<serde_json::Value>(64);
    tokio::spawn(follow(watch, seen, filter, tx));
    Ok(match ws {
        Ok(ws) => ws
            .protocols([crate::WS_PROTOCOL])
            .on_upgrade(move |socket| to_socket(socket, rx)),
        Err(_) => {
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                let line = match tokio::time::timeout(KEEPALIVE, rx.recv()).await {
                    Ok(Some(v)) => format!("{v}\n"),
                    Ok(None) => return None,
                    Err(_) => "\n".to_string(),
                };
                Some((Ok::<_, std::io::Error>(Bytes::from(line)), rx))
            });
            (
                [(header::CONTENT_TYPE, "application/x-ndjson")],
                Body::from_stream(stream),
            )
                .into_response()
        }
    })
}

/// Turns the watch's changes into the events the filter wants, until the consumer goes.
/// What the records are now, as the streams know them, and a watch of every change after
/// that (missing none made meanwhile).
pub(crate) async fn now_and_after(
    store: &cove_store::Embedded,
) -> Result<(BTreeMap<String, Seen>, cove_store::Watch), cove_store::StoreError> {
    let (revision, records) = all_records(store).await?;
    let seen = records
        .iter()
        .map(|(k, r)| (k.clone(), Seen::of(r)))
        .collect();
    Ok((seen, store.watch(PREFIX, revision).await?))
}

/// The events of one change of the records, with the sandbox they are about (its tenant and
/// labels); `seen` follows along.
pub(crate) fn events_of(
    seen: &mut BTreeMap<String, Seen>,
    change: &Event,
) -> Vec<(&'static str, Seen, serde_json::Value)> {
    match change {
        Event::Put(entry) => {
            let Ok(r) = parse(&entry.value) else {
                return Vec::new();
            };
            let now = Seen::of(&r);
            let out = changes(seen.get(&entry.key), &r)
                .into_iter()
                .map(|k| (k, now.clone(), event(k, &r, entry.mod_revision)))
                .collect();
            seen.insert(entry.key.clone(), now);
            out
        }
        Event::Delete { key, revision } => match seen.remove(key) {
            Some(before) => {
                let e = serde_json::json!({
                    "type": "removed",
                    "id": before.id,
                    "labels": before.labels,
                    "revision": revision,
                    "at_ms": cove_types::sandbox::now_ms(),
                });
                vec![("removed", before, e)]
            }
            None => Vec::new(),
        },
    }
}

async fn follow(
    mut watch: cove_store::Watch,
    mut seen: BTreeMap<String, Seen>,
    filter: Filter,
    tx: tokio::sync::mpsc::Sender<serde_json::Value>,
) {
    loop {
        let change = tokio::select! {
            c = watch.next() => c,
            () = tx.closed() => return,
        };
        let Ok(change) = change else {
            // A watch that fails (compacted history) ends the stream; the client resumes.
            return;
        };
        for (kind, who, e) in events_of(&mut seen, &change) {
            if filter.wants(kind, &who) && tx.send(e).await.is_err() {
                return;
            }
        }
    }
}

async fn to_socket(
    mut socket: axum::extract::ws::WebSocket,
    mut rx: tokio::sync::mpsc::Receiver<serde_json::Value>,
) {
    loop {
        tokio::select! {
            e = tokio::time::timeout(KEEPALIVE, rx.recv()) => match e {
                Ok(Some(v)) => {
                    if socket.send(Message::Text(v.to_string().into())).await.is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(_) => {
                    if socket.send(Message::Ping(Bytes::new())).await.is_err() {
                        return;
                    }
                }
            },
            m = socket.recv() => match m {
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}
