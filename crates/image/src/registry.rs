//! A client for the OCI distribution API (`/v2/…`), just what pulling needs: manifests and blobs
//! by reference, authentication, TLS settings.
//!
//! - **Where**: `docker.io` is served at `registry-1.docker.io`; every other registry at its
//!   own `host[:port]`. HTTPS always, except with `--insecure` (plain HTTP for every registry)
//!   and for loopback registries (`localhost`, `127.0.0.0/8`, `::1`), which are tried over
//!   HTTPS first and over plain HTTP if no TLS connection can be made, as Docker does.
//! - **Trust**: the system's CA certificates, plus those of `--ca FILE` (PEM).
//! - **Authentication** follows the registry's `WWW-Authenticate` challenge on a 401: `Bearer`
//!   (a token from the realm it names, for the scope it names or `repository:NAME:pull`, asked
//!   for with the credentials if there are any, anonymously otherwise) or `Basic` (the
//!   credentials on every request). Credentials come from `--creds USER:PASSWORD`, else from
//!   Docker's `config.json` (`$DOCKER_CONFIG/config.json` or `~/.docker/config.json`, the
//!   `auths.<registry>.auth` entries `docker login` writes; credential helpers are not run).
//!   A token is reused for the whole pull and fetched again if the registry rejects it.
//! - **Errors** quote the registry's own error code and message (`MANIFEST_UNKNOWN: manifest
//!   unknown`), never a body larger than a line.

use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Response, StatusCode, Url};
use tokio::sync::Mutex;

use crate::reference::Reference;

/// Registry host `docker.io` references are served from.
const DOCKER_HUB_REGISTRY: &str = "registry-1.docker.io";
/// Key of Docker Hub in Docker's `config.json`.
const DOCKER_HUB_CONFIG_KEY: &str = "https://index.docker.io/v1/";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest silence from a registry in the middle of a response.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest token response, registry error body or docker config read.
const MAX_SMALL_BODY: usize = 1 << 20;

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// Use plain HTTP for every registry.
    pub insecure: bool,
    /// A PEM file of CA certificates trusted besides the system's.
    pub ca_file: Option<PathBuf>,
    /// Credentials; when `None`, Docker's `config.json` is consulted.
    pub credentials: Option<Credentials>,
}

/// A user name and password (or token) for a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The user name.
    pub username: String,
    /// The password or access token.
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .finish()
    }
}

impl std::str::FromStr for Credentials {
    type Err = String;

    /// `USER:PASSWORD`.
    fn from_str(s: &str) -> Result<Credentials, String> {
        match s.split_once(':') {
            Some((user, password)) if !user.is_empty() => Ok(Credentials {
                username: user.to_string(),
                password: password.to_string(),
            }),
            _ => Err("credentials must be USER:PASSWORD".into()),
        }
    }
}

/// Why talking to a registry failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The CA file could not be used.
    #[error("cannot use CA file {}: {reason}", path.display())]
    CaFile {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Docker's config.json could not be read.
    #[error("cannot read registry credentials from {}: {reason}", path.display())]
    DockerConfig {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The HTTP client could not be set up.
    #[error("cannot set up the HTTP client")]
    Client(#[source] reqwest::Error),
    /// A request failed below HTTP: connection, TLS, timeout, broken body.
    #[error("cannot fetch {what} from {registry}")]
    Transport {
        /// What was being fetched.
        what: String,
        /// The registry.
        registry: String,
        /// The transport error.
        #[source]
        source: reqwest::Error,
    },
    /// The registry does not have what was asked for.
    #[error("{what} not found in {registry}{detail}")]
    NotFound {
        /// What was being fetched.
        what: String,
        /// The registry.
        registry: String,
        /// The registry's error, as `": CODE: message"`, or empty.
        detail: String,
    },
    /// The registry answered with an unexpected status.
    #[error("{registry} answered HTTP {status} for {what}{detail}")]
    Status {
        /// What was being fetched.
        what: String,
        /// The registry.
        registry: String,
        /// The HTTP status.
        status: u16,
        /// The registry's error, as `": CODE: message"`, or empty.
        detail: String,
    },
    /// The registry wants credentials we do not have, or refused the ones we have.
    #[error("{registry} refused access to {repository}{detail}; {hint}")]
    Unauthorized {
        /// The registry.
        registry: String,
        /// The repository.
        repository: String,
        /// The registry's error, as `": CODE: message"`, or empty.
        detail: String,
        /// What to do about it.
        hint: &'static str,
    },
    /// A `WWW-Authenticate` challenge we cannot follow.
    #[error("{registry} asks for authentication we cannot follow: {challenge:?}")]
    Challenge {
        /// The registry.
        registry: String,
        /// The challenge, as sent.
        challenge: String,
    },
    /// A token response without a token.
    #[error("the token service {realm} answered without a token")]
    Token {
        /// The realm URL.
        realm: String,
    },
}

impl RegistryError {
    /// Whether trying again (resuming) may help: connection trouble, timeouts, server errors.
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            RegistryError::Transport { source, .. } => !source.is_builder(),
            RegistryError::Status { status, .. } => {
                *status >= 500 || *status == StatusCode::TOO_MANY_REQUESTS.as_u16()
            }
            _ => false,
        }
    }
}

/// How requests to one repository are authorised, once the registry has told us.
#[derive(Debug, Clone)]
enum Auth {
    /// No challenge seen yet (or none needed).
    None,
    /// `Authorization` header value to send.
    Header(HeaderValue),
}

/// A connection to one repository of one registry.
#[derive(Debug)]
pub(crate) struct Client {
    http: reqwest::Client,
    /// `https://host:port` (or `http://`), decided on first contact.
    base: Mutex<Option<Url>>,
    /// The registry as the reference names it (`docker.io`, `host:5000`).
    registry: String,
    /// The host requests go to.
    host: String,
    insecure: bool,
    repository: String,
    credentials: Option<Credentials>,
    auth: Mutex<Auth>,
}

/// What a request asks for, for messages: "manifest busybox:latest", "layer 2 (sha256:…)".
pub(crate) type What<'a> = &'a str;

impl Client {
    /// A client for the repository of `reference`.
    pub(crate) fn new(
        reference: &Reference,
        options: &RegistryOptions,
    ) -> Result<Client, RegistryError> {
        crate::tls::install_default_provider();
        let mut builder = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .user_agent(concat!("cove/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &options.ca_file {
            builder = builder.tls_certs_merge(read_ca_file(path)?);
        }
        let http = builder.build().map_err(RegistryError::Client)?;
        let registry = reference.domain().to_string();
        let host = if registry == "docker.io" {
            DOCKER_HUB_REGISTRY.to_string()
        } else {
            registry.clone()
        };
        let credentials = match &options.credentials {
            Some(c) => Some(c.clone()),
            None => docker_config_credentials(&registry)?,
        };
        Ok(Client {
            http,
            base: Mutex::new(None),
            registry,
            host,
            insecure: options.insecure,
            repository: reference.path().to_string(),
            credentials,
            auth: Mutex::new(Auth::None),
        })
    }

    /// `GET /v2/<repository>/<kind>/<name>` with `headers`, authenticating as the registry
    /// asks. The response may have any status; [`Client::error`] turns a bad one into an error.
    pub(crate) async fn get(
        &self,
        kind: &str,
        name: &str,
        headers: HeaderMap,
        what: What<'_>,
    ) -> Result<Response, RegistryError> {
        let mut url = self.base().await?;
        url.set_path(&format!("/v2/{}/{kind}/{name}", self.repository));
        let mut retried_auth = false;
        loop {
            let mut request = self.http.get(url.clone()).headers(headers.clone());
            let sent_auth = self.auth.lock().await.clone();
            if let Auth::Header(value) = &sent_auth {
                request = request.header(header::AUTHORIZATION, value.clone());
            }
            let response = request
                .send()
                .await
                .map_err(|source| self.transport(what, source))?;
            if response.status() != StatusCode::UNAUTHORIZED || retried_auth {
                return Ok(response);
            }
            retried_auth = true;
            let challenge = response
                .headers()
                .get(header::WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let Some(challenge) = challenge else {
                return Ok(response);
            };
            let value = self.authenticate(&challenge, what).await?;
            *self.auth.lock().await = Auth::Header(value);
        }
    }

    /// The base URL, deciding the scheme on first use.
    async fn base(&self) -> Result<Url, RegistryError> {
        // Held while deciding, so that parallel first requests decide once.
        let mut base = self.base.lock().await;
        if let Some(url) = &*base {
            return Ok(url.clone());
        }
        let parse = |scheme: &str| {
            Url::parse(&format!("{scheme}://{}/", self.host))
                .expect("a valid reference host is a valid URL host")
        };
        let url = if self.insecure {
            parse("http")
        } else if is_loopback(&self.host) {
            // Docker's rule for local registries: HTTPS if it answers, plain HTTP if not. A
            // TLS server refusing plain HTTP (400) means the HTTPS failure is the one to report.
            let ping = |scheme| {
                let mut url = parse(scheme);
                url.set_path("/v2/");
                self.http.get(url).send()
            };
            match ping("https").await {
                Ok(_) => parse("https"),
                Err(https_error) => match ping("http").await {
                    Ok(r) if r.status() != StatusCode::BAD_REQUEST => parse("http"),
                    _ => return Err(self.transport("the API root", https_error)),
                },
            }
        } else {
            parse("https")
        };
        *base = Some(url.clone());
        Ok(url)
    }

    /// Answers a `WWW-Authenticate` challenge: the `Authorization` value to send from now on.
    async fn authenticate(
        &self,
        challenge: &str,
        what: What<'_>,
    ) -> Result<HeaderValue, RegistryError> {
        let bad = || RegistryError::Challenge {
            registry: self.registry.clone(),
            challenge: challenge.chars().take(200).collect(),
        };
        let (scheme, params) = parse_challenge(challenge).ok_or_else(bad)?;
        if scheme.eq_ignore_ascii_case("basic") {
            let Some(c) = &self.credentials else {
                return Err(self.unauthorized(
                    "",
                    "pass --creds USER:PASSWORD or log in with `docker login`",
                ));
            };
            return Ok(basic_header(c));
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(bad());
        }
        let realm = params
            .iter()
            .find(|(k, _)| k == "realm")
            .map(|(_, v)| v.as_str())
            .ok_or_else(bad)?;
        let mut url = Url::parse(realm).map_err(|_| bad())?;
        if !matches!(url.scheme(), "https" | "http") {
            return Err(bad());
        }
        {
            let mut query = url.query_pairs_mut();
            if let Some((_, service)) = params.iter().find(|(k, _)| k == "service") {
                query.append_pair("service", service);
            }
            match params.iter().find(|(k, _)| k == "scope") {
                Some((_, scope)) => query.append_pair("scope", scope),
                None => query.append_pair("scope", &format!("repository:{}:pull", self.repository)),
            };
        }
        let mut request = self.http.get(url);
        if let Some(c) = &self.credentials {
            request = request.header(header::AUTHORIZATION, basic_header(c));
        }
        let token_what = format!("a token for {what}");
        let response = request
            .send()
            .await
            .map_err(|source| self.transport(&token_what, source))?;
        let status = response.status();
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            let detail = error_detail(response).await;
            return Err(self.unauthorized(&detail, self.credentials_hint()));
        }
        if !status.is_success() {
            return Err(self.status(&token_what, response).await);
        }
        let body = read_small(response)
            .await
            .map_err(|source| self.transport(&token_what, source))?;
        #[derive(serde::Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
        }
        let token = serde_json::from_slice::<TokenResponse>(&body)
            .ok()
            .and_then(|t| t.token.or(t.access_token))
            .filter(|t| !t.is_empty())
            .ok_or_else(|| RegistryError::Token {
                realm: realm.to_string(),
            })?;
        HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| RegistryError::Token {
            realm: realm.to_string(),
        })
    }

    fn credentials_hint(&self) -> &'static str {
        if self.credentials.is_some() {
            "check the credentials"
        } else {
            "pass --creds USER:PASSWORD or log in with `docker login`"
        }
    }

    fn unauthorized(&self, detail: &str, hint: &'static str) -> RegistryError {
        RegistryError::Unauthorized {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            detail: detail.to_string(),
            hint,
        }
    }

    pub(crate) fn transport(&self, what: What<'_>, source: reqwest::Error) -> RegistryError {
        RegistryError::Transport {
            what: what.to_string(),
            registry: self.registry.clone(),
            source: source.without_url(),
        }
    }

    /// The error for a response with an unexpected status.
    pub(crate) async fn status(&self, what: What<'_>, response: Response) -> RegistryError {
        let status = response.status();
        let detail = error_detail(response).await;
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return self.unauthorized(&detail, self.credentials_hint());
        }
        if status == StatusCode::NOT_FOUND {
            return RegistryError::NotFound {
                what: what.to_string(),
                registry: self.registry.clone(),
                detail,
            };
        }
        RegistryError::Status {
            what: what.to_string(),
            registry: self.registry.clone(),
            status: status.as_u16(),
            detail,
        }
    }
}

/// Reads a small response body whole (at most [`MAX_SMALL_BODY`] bytes are kept).
async fn read_small(mut response: Response) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = MAX_SMALL_BODY.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if room == 0 {
            break;
        }
    }
    Ok(body)
}

/// `": CODE: message"` from a registry's error body (`{"errors":[{"code","message"}]}`), or
/// empty when there is none.
async fn error_detail(response: Response) -> String {
    #[derive(serde::Deserialize)]
    struct Errors {
        errors: Vec<ErrorEntry>,
    }
    #[derive(serde::Deserialize)]
    struct ErrorEntry {
        code: Option<String>,
        message: Option<String>,
    }
    let Ok(body) = read_small(response).await else {
        return String::new();
    };
    let Ok(errors) = serde_json::from_slice::<Errors>(&body) else {
        return String::new();
    };
    let text: Vec<String> = errors
        .errors
        .into_iter()
        .map(|e| match (e.code, e.message) {
            (Some(c), Some(m)) => format!("{c}: {m}"),
            (Some(s), None) | (None, Some(s)) => s,
            (None, None) => String::new(),
        })
        .filter(|s| !s.is_empty())
        .collect();
    if text.is_empty() {
        String::new()
    } else {
        let joined = text.join("; ");
        format!(": {}", joined.chars().take(300).collect::<String>())
    }
}

/// Splits `Scheme k="v", k2=v2` into the scheme and its parameters.
fn parse_challenge(challenge: &str) -> Option<(String, Vec<(String, String)>)> {
    let challenge = challenge.trim();
    let (scheme, mut rest) = match challenge.split_once(char::is_whitespace) {
        Some((s, r)) => (s, r.trim_start()),
        None => (challenge, ""),
    };
    if scheme.is_empty() {
        return None;
    }
    let mut params = Vec::new();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let key = key.trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (value, remaining) = if let Some(quoted) = after.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => value.push(chars.next()?.1),
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => value.push(c),
                }
            }
            (value, &quoted[end?..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        params.push((key, value));
        rest = remaining
            .trim_start()
            .strip_prefix(',')
            .unwrap_or(remaining)
            .trim_start();
    }
    Some((scheme.to_string(), params))
}

fn basic_header(c: &Credentials) -> HeaderValue {
    let encoded =
        base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", c.username, c.password));
    let mut value =
        HeaderValue::from_str(&format!("Basic {encoded}")).expect("base64 is a valid header value");
    value.set_sensitive(true);
    value
}

/// Whether `host` (`name[:port]`, `[v6]:port`) is this machine.
fn is_loopback(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name == "localhost" || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn read_ca_file(path: &Path) -> Result<Vec<reqwest::Certificate>, RegistryError> {
    let err = |reason: String| RegistryError::CaFile {
        path: path.to_path_buf(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("it holds no PEM certificate".into()));
    }
    Ok(certs)
}

/// The credentials `docker login` stored for `registry`, if any.
fn docker_config_credentials(registry: &str) -> Result<Option<Credentials>, RegistryError> {
    let path = match std::env::var_os("DOCKER_CONFIG") {
        Some(dir) => PathBuf::from(dir).join("config.json"),
        None => match std::env::var_os("HOME") {
            Some(home) => PathBuf::from(home).join(".docker").join("config.json"),
            None => return Ok(None),
        },
    };
    let err = |reason: String| RegistryError::DockerConfig {
        path: path.clone(),
        reason,
    };
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e.to_string())),
    };
    if bytes.len() > MAX_SMALL_BODY {
        return Err(err("it is larger than 1 MiB".into()));
    }
    docker_config_lookup(&bytes, registry).map_err(err)
}

/// Looks `registry` up in the `auths` of a Docker `config.json`.
fn docker_config_lookup(config: &[u8], registry: &str) -> Result<Option<Credentials>, String> {
    #[derive(serde::Deserialize)]
    struct Config {
        #[serde(default)]
        auths: std::collections::BTreeMap<String, Entry>,
    }
    #[derive(serde::Deserialize)]
    struct Entry {
        auth: Option<String>,
    }
    let config: Config = serde_json::from_slice(config).map_err(|e| e.to_string())?;
    let wanted = if registry == "docker.io" {
        DOCKER_HUB_CONFIG_KEY
    } else {
        registry
    };
    // Keys may be URLs (`https://host/v1/`) as older docker versions wrote them.
    let host_of = |key: &str| -> String {
        let key = key
            .strip_prefix("https://")
            .or_else(|| key.strip_prefix("http://"))
            .unwrap_or(key);
        key.split('/').next().unwrap_or("").to_string()
    };
    let entry = config
        .auths
        .iter()
        .find(|(k, _)| k.as_str() == wanted)
        .or_else(|| {
            config
                .auths
                .iter()
                .find(|(k, _)| host_of(k) == host_of(wanted))
        });
    let Some((key, Entry { auth: Some(auth) })) = entry else {
        return Ok(None);
    };
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth.trim())
        .map_err(|_| format!("the auth of {key:?} is not base64"))?;
    let text =
        String::from_utf8(decoded).map_err(|_| format!("the auth of {key:?} is not UTF-8"))?;
    text.parse()
        .map(Some)
        .map_err(|_| format!("the auth of {key:?} is not USER:PASSWORD"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let (scheme, params) = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        )
        .unwrap();
        assert_eq!(scheme, "Bearer");
        assert_eq!(
            params,
            vec![
                ("realm".into(), "https://auth.docker.io/token".into()),
                ("service".into(), "registry.docker.io".into()),
                ("scope".into(), "repository:library/busybox:pull".into()),
            ]
        );
        let (scheme, params) =
            parse_challenge(r#"Basic realm="a \"quoted\", realm", Charset=UTF-8"#).unwrap();
        assert_eq!(scheme, "Basic");
        assert_eq!(
            params,
            vec![
                ("realm".into(), "a \"quoted\", realm".into()),
                ("charset".into(), "UTF-8".into())
            ]
        );
        assert_eq!(parse_challenge("Basic").unwrap(), ("Basic".into(), vec![]));
        assert!(parse_challenge(r#"Bearer realm="unterminated"#).is_none());
        assert!(parse_challenge("Bearer novalue").is_none());
    }

    #[test]
    fn docker_hub_names_go_to_its_registry_host() {
        let options = RegistryOptions {
            credentials: Some("u:p".parse().unwrap()),
            ..Default::default()
        };
        let c = Client::new(&"busybox".parse().unwrap(), &options).unwrap();
        assert_eq!(
            (c.host.as_str(), c.repository.as_str()),
            ("registry-1.docker.io", "library/busybox")
        );
        assert_eq!(c.registry, "docker.io");
        let c = Client::new(&"localhost:5000/team/app:v1".parse().unwrap(), &options).unwrap();
        assert_eq!(
            (c.host.as_str(), c.repository.as_str()),
            ("localhost:5000", "team/app")
        );
    }

    #[test]
    fn loopback_hosts() {
        for h in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.1.2.3",
            "[::1]:5000",
        ] {
            assert!(is_loopback(h), "{h}");
        }
        for h in [
            "docker.io",
            "10.0.0.1:5000",
            "[fe80::1]:5000",
            "localhost.example.com",
        ] {
            assert!(!is_loopback(h), "{h}");
        }
    }

    #[test]
    fn docker_config() {
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cr:et");
        let config = format!(
            r#"{{"auths": {{"https://index.docker.io/v1/": {{"auth": "{auth}"}},
                 "http://reg.example:5000/v1/": {{"auth": "{auth}"}},
                 "noauth.example": {{}}}}, "credsStore": "desktop"}}"#
        );
        let alice = Credentials {
            username: "alice".into(),
            password: "s3cr:et".into(),
        };
        assert_eq!(
            docker_config_lookup(config.as_bytes(), "docker.io").unwrap(),
            Some(alice.clone())
        );
        assert_eq!(
            docker_config_lookup(config.as_bytes(), "reg.example:5000").unwrap(),
            Some(alice)
        );
        assert_eq!(
            docker_config_lookup(config.as_bytes(), "noauth.example").unwrap(),
            None
        );
        assert_eq!(
            docker_config_lookup(config.as_bytes(), "other.example").unwrap(),
            None
        );
        assert!(
            docker_config_lookup(br#"{"auths": {"x.example": {"auth": "!!"}}}"#, "x.example")
                .is_err()
        );
        assert!("nocolon".parse::<Credentials>().is_err());
        assert!(":pw".parse::<Credentials>().is_err());
        assert!(!format!("{:?}", "u:pw".parse::<Credentials>().unwrap()).contains("pw"));
    }
}
