//! Webhooks: a tenant's lifecycle events POSTed to its own URLs.
//!
//! `POST /v1/webhooks {"url", "types"?, "secret"?}` registers one (at most [`MAX_PER_TENANT`]
//! per tenant; `types` as for `/v1/events`, all by default; a secret is made when none is
//! given and shown once). `GET /v1/webhooks` lists them, `DELETE /v1/webhooks/{id}` removes
//! one.
//!
//! Each event is one POST of the same JSON as the events stream, with
//! `Cove-Event: <type>`, `Cove-Delivery: <revision>-<type>` (the same on every retry) and
//! `Cove-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`. A delivery
//! that does not get a 2xx within 5 s is retried after 1, 2, 4, 8 and 16 s, then dropped
//! (and said so on the server's stderr). Each webhook has its own queue, delivered in order,
//! by tasks of their own: a slow or failing receiver never holds up a sandbox, another
//! tenant, or another webhook.
//!
//! The server refuses to deliver to loopback, private, link-local (cloud metadata) and other
//! internal addresses, whether the URL names one or its host name resolves to one, unless it
//! runs with `--webhooks-allow-private`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use cove_store::{Expect, Kv};
use cove_types::sandbox::now_ms;
use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::events::{TYPES, events_of};
use crate::{Api, ApiError, body, caller};

/// Where webhooks are stored: `<prefix><tenant>/<id>`.
const PREFIX: &str = "/cove/webhooks/";
/// Most webhooks a tenant may have.
pub const MAX_PER_TENANT: usize = 10;
/// Waits before each retry.
const BACKOFF: [u64; 5] = [1, 2, 4, 8, 16];
/// Deliveries a webhook's queue holds; beyond, the oldest are dropped.
const QUEUE: usize = 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Webhook {
    id: String,
    tenant: String,
    url: String,
    secret: String,
    types: Vec<String>,
    created_at_ms: u64,
}

/// `POST /v1/webhooks`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct WebhookRequest {
    /// `http://` or `https://`.
    url: String,
    /// Event types to send (default: all).
    #[serde(default)]
    types: Vec<String>,
    /// The signing secret (at least 16 characters); made when not given.
    #[serde(default)]
    secret: Option<String>,
}

fn view(w: &Webhook, with_secret: bool) -> serde_json::Value {
    let mut v = serde_json::json!({
        "id": w.id, "url": w.url, "types": w.types, "created_at_ms": w.created_at_ms,
    });
    if with_secret {
        v["secret"] = serde_json::json!(w.secret);
    }
    v
}

/// Whether deliveries to `ip` are refused (without `--webhooks-allow-private`).
fn internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let r = cove_types::egress::EgressRule {
                addr: v4,
                prefix: 32,
                ports: None,
            };
            r.always_blocked().is_some()
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || (v6.segments()[0] & 0xfe00) == 0xfc00
                || (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6
                    .to_ipv4_mapped()
                    .is_some_and(|v4| internal(IpAddr::V4(v4)))
        }
    }
}

/// The URL's scheme, host and port, checked.
fn target(url: &str) -> Result<(String, u16), String> {
    let uri: Uri = url.parse().map_err(|_| format!("{url:?} is not a URL"))?;
    let port = match uri.scheme_str() {
        Some("http") => uri.port_u16().unwrap_or(80),
        Some("https") => uri.port_u16().unwrap_or(443),
        _ => return Err(format!("{url:?}: only http:// and https:// URLs")),
    };
    let host = uri
        .host()
        .ok_or_else(|| format!("{url:?} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    Ok((host, port))
}

#[utoipa::path(post, path = "/v1/webhooks", tag = "webhooks", request_body = WebhookRequest, responses((status = 201, description = "Registered; its secret is shown this once", body = Object), (status = "4XX", description = "Bad input, no token, too many", body = crate::openapi::ErrorBody)))]
pub(crate) async fn create_webhook(
    State(api): State<Api>,
    headers: HeaderMap,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let who = caller(&api.store, &headers).await?;
    let req: WebhookRequest = body(raw)?;
    let (host, _) = target(&req.url).map_err(ApiError::bad)?;
    if let Ok(ip) = host.parse::<IpAddr>()
        && internal(ip)
        && !api.webhooks_allow_private
    {
        return Err(ApiError::bad(format!(
            "{}: webhooks to loopback, private or link-local addresses are refused",
            req.url
        )));
    }
    if let Some(bad) = req.types.iter().find(|t| !TYPES.contains(&t.as_str())) {
        return Err(ApiError::bad(format!(
            "event type {bad:?}: use {}",
            TYPES.join(", ")
        )));
    }
    let secret = match req.secret {
        Some(s) if s.len() < 16 || s.len() > 256 => {
            return Err(ApiError::bad("secret: 16 to 256 characters"));
        }
        Some(s) => s,
        None => crate::new_token().map_err(|_| ApiError::bad("no randomness"))?,
    };
    let prefix = format!("{PREFIX}{}/", who.tenant);
    if api
        .store
        .list(&prefix, None, MAX_PER_TENANT + 1)
        .await?
        .entries
        .len()
        >= MAX_PER_TENANT
    {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "quota_exceeded",
            format!("at most {MAX_PER_TENANT} webhooks per tenant"),
        ));
    }
    let id = crate::new_id()
        .map_err(|_| ApiError::bad("no randomness"))?
        .to_string();
    let hook = Webhook {
        id: id.clone(),
        tenant: who.tenant,
        url: req.url,
        secret,
        types: req.types,
        created_at_ms: now_ms(),
    };
    let value = serde_json::to_vec(&hook).expect("a webhook serialises");
    api.store
        .put(&format!("{prefix}{id}"), value, Expect::Absent, None)
        .await?;
    Ok((StatusCode::CREATED, Json(view(&hook, true))).into_response())
}

async fn hooks_of(api: &Api, tenant: &str) -> Result<Vec<Webhook>, ApiError> {
    let page = api
        .store
        .list(&format!("{PREFIX}{tenant}/"), None, MAX_PER_TENANT + 1)
        .await?;
    Ok(page
        .entries
        .iter()
        .filter_map(|e| serde_json::from_slice(&e.value).ok())
        .collect())
}

#[utoipa::path(get, path = "/v1/webhooks", tag = "webhooks", responses((status = 200, description = "`{\"webhooks\": [{\"id\",\"url\",\"types\",\"created_at_ms\"}]}`", body = Object), (status = "4XX", description = "No token", body = crate::openapi::ErrorBody)))]
pub(crate) async fn list_webhooks(
    State(api): State<Api>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let who = caller(&api.store, &headers).await?;
    let hooks: Vec<_> = hooks_of(&api, &who.tenant)
        .await?
        .iter()
        .map(|w| view(w, false))
        .collect();
    Ok(Json(serde_json::json!({ "webhooks": hooks })).into_response())
}

#[utoipa::path(delete, path = "/v1/webhooks/{id}", tag = "webhooks", params(("id" = String, Path, description = "The webhook id")), responses((status = 204, description = "Removed"), (status = "4XX", description = "No token, no such webhook", body = crate::openapi::ErrorBody)))]
pub(crate) async fn delete_webhook(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let who = caller(&api.store, &headers).await?;
    if id.parse::<cove_types::SandboxId>().is_err() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no webhook {id}"),
        ));
    }
    let key = format!("{PREFIX}{}/{id}", who.tenant);
    match api.store.delete(&key, Expect::Any).await? {
        Some(_) => Ok(StatusCode::NO_CONTENT.into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no webhook {id}"),
        )),
    }
}

/// One event for one webhook.
struct Delivery {
    hook: Webhook,
    kind: &'static str,
    revision: u64,
    body: Vec<u8>,
}

/// `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
fn signature(secret: &str, t: u64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(format!("{t}.").as_bytes());
    ctx.update(body);
    let tag: String = ctx
        .sign()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("t={t},v1={tag}")
}

/// One attempt: whether the receiver answered 2xx. `Err` when it must not be retried.
async fn attempt(d: &Delivery, allow_private: bool) -> Result<bool, String> {
    let (host, port) = target(&d.hook.url)?;
    let addrs: Vec<SocketAddr> = match tokio::net::lookup_host((host.as_str(), port)).await {
        Ok(a) => a.collect(),
        Err(_) => return Ok(false),
    };
    let addrs: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|a| allow_private || !internal(a.ip()))
        .collect();
    let Some(addr) = addrs.first() else {
        return Err(format!(
            "{} resolves only to internal addresses",
            d.hook.url
        ));
    };
    // The address checked is the one connected to (no second resolution).
    let client = reqwest::Client::builder()
        .resolve(&host, *addr)
        .timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| e.to_string())?;
    let t = now_ms() / 1000;
    let sent = client
        .post(&d.hook.url)
        .header("content-type", "application/json")
        .header("cove-event", d.kind)
        .header("cove-delivery", format!("{}-{}", d.revision, d.kind))
        .header("cove-signature", signature(&d.hook.secret, t, &d.body))
        .body(d.body.clone())
        .send()
        .await;
    Ok(sent.is_ok_and(|r| r.status().is_success()))
}

/// Delivers one webhook's queue, in order, with retries.
async fn worker(mut rx: tokio::sync::mpsc::Receiver<Delivery>, allow_private: bool) {
    while let Some(d) = rx.recv().await {
        let mut delivered = false;
        for wait in std::iter::once(0).chain(BACKOFF) {
            tokio::time::sleep(Duration::from_secs(wait)).await;
            match attempt(&d, allow_private).await {
                Ok(true) => {
                    delivered = true;
                    break;
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(webhook = %d.hook.id, tenant = %d.hook.tenant, error = %e, "webhook not sent");
                    break;
                }
            }
        }
        if !delivered {
            tracing::warn!(
                webhook = %d.hook.id,
                tenant = %d.hook.tenant,
                url = %d.hook.url,
                event = d.kind,
                revision = d.revision,
                "webhook delivery given up after its retries"
            );
        }
    }
}

/// Sends every lifecycle event to the webhooks that want it, until the store fails.
pub async fn deliver(api: Api) {
    let Ok((mut seen, mut watch)) = crate::events::now_and_after(&api.store).await else {
        return;
    };
    let mut queues: HashMap<String, tokio::sync::mpsc::Sender<Delivery>> = HashMap::new();
    while let Ok(change) = watch.next().await {
        for (kind, who, event) in events_of(&mut seen, &change) {
            let Ok(hooks) = hooks_of(&api, &who.tenant).await else {
                continue;
            };
            let body = serde_json::to_vec(&event).expect("an event serialises");
            let revision = event["revision"].as_u64().unwrap_or(0);
            for hook in hooks {
                if !hook.types.is_empty() && !hook.types.iter().any(|t| t == kind) {
                    continue;
                }
                let tx = queues.entry(hook.id.clone()).or_insert_with(|| {
                    let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
                    tokio::spawn(worker(rx, api.webhooks_allow_private));
                    tx
                });
                let id = hook.id.clone();
                let d = Delivery {
                    hook,
                    kind,
                    revision,
                    body: body.clone(),
                };
                if tx.try_send(d).is_err() {
                    tracing::warn!(webhook = %id, event = kind, "webhook queue full; event dropped");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_recognised() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "169.254.169.254",
            "::1",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:192.168.1.1",
        ] {
            assert!(internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["203.0.113.5", "2001:db8::1"] {
            assert!(!internal(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn urls_are_checked() {
        assert_eq!(
            target("http://example.com/x").unwrap(),
            ("example.com".into(), 80)
        );
        assert_eq!(target("https://[::1]:8443/").unwrap(), ("::1".into(), 8443));
        assert!(target("ftp://example.com/").is_err());
        assert!(target("example.com").is_err());
    }

    #[test]
    fn the_signature_covers_time_and_body() {
        let s = signature("secret-secret-secret", 1700000000, b"{}");
        assert!(s.starts_with("t=1700000000,v1="));
        assert_eq!(s.len(), "t=1700000000,v1=".len() + 64);
        assert_ne!(s, signature("secret-secret-secret", 1700000001, b"{}"));
        assert_ne!(s, signature("secret-secret-secret", 1700000000, b"{ }"));
    }
}
