//! `POST /v1/sandboxes/{id}/url`: the address of a sandbox's port on the edge proxy, signed
//! for a while when the sandbox is private, with its access token.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use cove_types::SandboxId;
use cove_types::sandbox::now_ms;
use serde::{Deserialize, Serialize};

use crate::{Api, ApiError, body, caller, load};

/// How the edge proxy is reached, for the URLs the API hands out.
#[derive(Debug, Clone)]
pub struct ProxyUrls {
    /// Signs access tokens and URLs (the proxy checks them with the same key).
    pub key: cove_proxy::access::Key,
    /// `http` or `https`.
    pub scheme: String,
    /// The port in URLs; left out when it is the scheme's own.
    pub port: u16,
}

impl ProxyUrls {
    /// `<scheme>://<port>-<id>.<domain>[:<proxy port>]/`.
    pub fn url(&self, domain: &str, id: &SandboxId, port: u16) -> String {
        let default = matches!(
            (self.scheme.as_str(), self.port),
            ("http", 80) | ("https", 443)
        );
        if default {
            format!("{}://{port}-{id}.{domain}/", self.scheme)
        } else {
            format!("{}://{port}-{id}.{domain}:{}/", self.scheme, self.port)
        }
    }
}

/// `POST /v1/sandboxes/{id}/url`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UrlRequest {
    /// The port inside the sandbox (1-65535).
    port: u16,
    /// How long a signed URL stays valid (default 1h, at most 30 days).
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "1h")]
    expires_in: Option<cove_types::Duration>,
}

/// A sandbox port's address.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct UrlResponse {
    /// The URL to open: signed (`cove_expires`, `cove_sig`) when the sandbox is private. The
    /// proxy turns the signature into a cookie, so a browser's later requests pass too.
    url: String,
    /// The URL without a signature: the one to use with the access token.
    plain_url: String,
    /// When the signed URL stops working (milliseconds since the Unix epoch); `null` for a
    /// public sandbox.
    expires_at_ms: Option<u64>,
    /// Whether anyone may reach the sandbox's ports without credentials.
    public: bool,
    /// The sandbox's access token, for the `Cove-Access-Token` header (valid as long as the
    /// sandbox exists).
    access_token: String,
}

const DEFAULT_EXPIRY: std::time::Duration = std::time::Duration::from_secs(3600);
const MAX_EXPIRY: std::time::Duration = std::time::Duration::from_secs(30 * 86400);

#[utoipa::path(post, path = "/v1/sandboxes/{id}/url", tag = "sandboxes", params(("id" = String, Path, description = "The sandbox id (12 lowercase hex characters)")), request_body = UrlRequest, responses((status = 200, description = "The port's URL and the sandbox's access token", body = UrlResponse), (status = "4XX", description = "Bad input, no token, no such sandbox", body = crate::openapi::ErrorBody)))]
pub(crate) async fn sandbox_url(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    raw: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let who = caller(&api.store, &headers).await?;
    let req: UrlRequest = body(raw)?;
    if req.port == 0 {
        return Err(ApiError::bad("port must be 1-65535"));
    }
    let expiry = req.expires_in.map_or(DEFAULT_EXPIRY, |d| d.as_std());
    if expiry.is_zero() || expiry > MAX_EXPIRY {
        return Err(ApiError::bad(
            "expires_in must be positive and at most 30 days",
        ));
    }
    let (record, _) = load(&api, &who, &id).await?;
    let urls = &api.proxy;
    let plain = urls.url(&api.domain, &record.id, req.port);
    let (url, expires_at_ms) = if record.public {
        (plain.clone(), None)
    } else {
        let expires = (now_ms() / 1000).saturating_add(expiry.as_secs().max(1));
        let sig = urls.key.sign_url(record.id.as_str(), req.port, expires);
        (
            format!(
                "{plain}?{}={expires}&{}={sig}",
                cove_proxy::EXPIRES_PARAM,
                cove_proxy::SIG_PARAM
            ),
            Some(expires * 1000),
        )
    };
    Ok(Json(UrlResponse {
        url,
        plain_url: plain,
        expires_at_ms,
        public: record.public,
        access_token: urls.key.access_token(record.id.as_str()),
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_leave_out_the_schemes_own_port() {
        let key = cove_proxy::access::Key::new(&[0; 32]);
        let id: SandboxId = "0123456789ab".parse().unwrap();
        let u = |scheme: &str, port| ProxyUrls {
            key: key.clone(),
            scheme: scheme.into(),
            port,
        };
        assert_eq!(
            u("https", 443).url("example.com", &id, 8080),
            "https://8080-0123456789ab.example.com/"
        );
        assert_eq!(
            u("https", 7443).url("cove.localhost", &id, 80),
            "https://80-0123456789ab.cove.localhost:7443/"
        );
        assert_eq!(u("http", 80).url("d", &id, 1), "http://1-0123456789ab.d/");
    }
}
