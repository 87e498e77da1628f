//! The edge proxy: HTTP requests and WebSockets for `<port>-<id>.<domain>` (or the header and
//! path forms, see [`route`]) go to that port on the sandbox's own loopback, reached from
//! inside its network namespace ([`dial`]): a sandbox never needs an address on the host.
//!
//! Clients speak HTTP/1.1 or HTTP/2 (over TLS by ALPN, or cleartext with prior knowledge);
//! sandboxes are spoken to in HTTP/1.1 over kept-alive connections. A private sandbox (the
//! default) answers only requests that carry its access token or a signed URL ([`access`]).
//! Every answer the proxy gives itself is a JSON error `{"error":{"code","message"}}`, with
//! the status a client can act on: 400 a malformed address, 401 no or wrong credentials, 404
//! no such sandbox (or no sandbox named), 410 it has ended, 503 it is starting or paused, 502
//! nothing listens on the port (or the connection failed), 504 the port did not answer in
//! time.

pub mod access;
pub mod dial;
pub mod route;
pub mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use cove_types::{SandboxId, SandboxState};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;

pub use dial::{DialError, Dialer, SocketMaker};
pub use route::{Form, Target};

/// What the proxy needs to know of a sandbox.
#[derive(Debug, Clone, Copy)]
pub struct SandboxInfo {
    pub state: SandboxState,
    /// Reachable without credentials.
    pub public: bool,
}

/// A boxed future, for the object-safe [`Backend`].
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The rest of Cove, as the proxy sees it.
pub trait Backend: Send + Sync + 'static {
    /// The sandbox `id`, or `None` if there is none.
    fn lookup(&self, id: SandboxId) -> BoxFuture<'_, Option<SandboxInfo>>;
    /// Called once per request when its answer starts: the sandbox it was forwarded to (`None`
    /// when the proxy answered itself: no route, no credentials, not running), the status,
    /// and how long the answer took to start. A forwarded request is use of the sandbox.
    fn observe(&self, id: Option<SandboxId>, status: StatusCode, elapsed: Duration);
}

/// The proxy's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Sandboxes are `<port>-<id>.<domain>`.
    pub domain: String,
    /// Signs access tokens and URLs.
    pub key: access::Key,
    /// Longest a sandbox's port may take to start answering a request.
    pub upstream_timeout: Duration,
    /// Longest a connection to a sandbox's port may take to be made.
    pub connect_timeout: Duration,
}

/// The response body: a sandbox's, or the proxy's own.
pub type Body = BoxBody<Bytes, hyper::Error>;

/// The request header carrying a private sandbox's access token.
pub const TOKEN_HEADER: &str = "cove-access-token";
/// The cookie a signed URL leaves behind.
pub const COOKIE: &str = "cove_access";
/// Query parameters of a signed URL.
pub const EXPIRES_PARAM: &str = "cove_expires";
pub const SIG_PARAM: &str = "cove_sig";

/// The edge proxy.
pub struct Proxy {
    settings: Settings,
    backend: Arc<dyn Backend>,
    client: Client<dial::Connector, Incoming>,
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One of the proxy's own answers.
fn answer(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({"error": {"code": code, "message": message}}).to_string();
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// Headers that belong to one connection, never forwarded (RFC 9110 7.6.1).
const HOP_BY_HOP: &[HeaderName] = &[
    header::CONNECTION,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes the hop-by-hop headers, and those the `Connection` header names.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named.iter().chain(HOP_BY_HOP) {
        headers.remove(n);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// Whether a request asks to switch protocols (a WebSocket), which HTTP/1.1 alone can.
fn is_upgrade(req: &Request<Incoming>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The query without the signed URL's parameters; and those parameters, if both are there.
fn split_signature(query: &str) -> (String, Option<(String, String)>) {
    let (mut expires, mut sig) = (None, None);
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            if let Some(v) = pair
                .strip_prefix(EXPIRES_PARAM)
                .and_then(|r| r.strip_prefix('='))
            {
                expires = Some(v.to_string());
                false
            } else if let Some(v) = pair
                .strip_prefix(SIG_PARAM)
                .and_then(|r| r.strip_prefix('='))
            {
                sig = Some(v.to_string());
                false
            } else {
                !pair.is_empty()
            }
        })
        .collect();
    (kept.join("&"), expires.zip(sig))
}

/// The values of the cookie named [`COOKIE`] in the `Cookie` headers.
fn access_cookies(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
        .map(str::to_string)
        .collect()
}

/// The `Cookie` headers without [`COOKIE`] (the sandbox never sees a credential to itself).
fn strip_access_cookie(headers: &mut HeaderMap) {
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|c| !c.is_empty() && !c.starts_with(&format!("{COOKIE}=")))
        .map(str::to_string)
        .collect();
    headers.remove(header::COOKIE);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_str(&kept.join("; "))
    {
        headers.insert(header::COOKIE, v);
    }
}

impl Proxy {
    /// A proxy; starts its dialer thread.
    pub fn new(
        settings: Settings,
        backend: Arc<dyn Backend>,
        sockets: Arc<dyn SocketMaker>,
    ) -> std::io::Result<Arc<Proxy>> {
        let dialer = Dialer::start(sockets, settings.connect_timeout)?;
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .pool_timer(TokioTimer::new())
            .set_host(false)
            .build(dial::Connector(dialer));
        Ok(Arc::new(Proxy {
            settings,
            backend,
            client,
        }))
    }

    /// Serves connections from `listener` until the future is dropped; with `tls`, each
    /// connection is a TLS one (HTTP/2 or HTTP/1.1 by ALPN), otherwise cleartext HTTP/1.1 or
    /// HTTP/2 with prior knowledge.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<()> {
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                // Out of descriptors or a connection reset before it was taken: keep serving.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let proxy = self.clone();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                match acceptor {
                    Some(a) => {
                        let handshake =
                            tokio::time::timeout(Duration::from_secs(10), a.accept(tcp)).await;
                        if let Ok(Ok(stream)) = handshake {
                            proxy.serve_connection(stream, peer, true).await;
                        }
                    }
                    None => proxy.serve_connection(tcp, peer, false).await,
                }
            });
        }
    }

    async fn serve_connection<S>(self: Arc<Self>, io: S, peer: SocketAddr, tls: bool)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let service = hyper::service::service_fn(move |req| {
            let proxy = self.clone();
            async move { Ok::<_, Infallible>(proxy.handle(req, peer, tls).await) }
        });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(30));
        builder.http2().timer(TokioTimer::new());
        let _ = builder
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .await;
    }

    /// Answers one request.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        tls: bool,
    ) -> Response<Body> {
        let started = Instant::now();
        let (response, id) = self.dispatch(req, peer, tls).await;
        self.backend
            .observe(id, response.status(), started.elapsed());
        response
    }

    async fn dispatch(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        tls: bool,
    ) -> (Response<Body>, Option<SandboxId>) {
        let host = req.uri().host().map(str::to_string).or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(|h| match h.rsplit_once(':') {
                    Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => {
                        name.to_string()
                    }
                    _ => h.to_string(),
                })
        });
        let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
        let path_and_query = req
            .uri()
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let target = match route::route(
            host.as_deref(),
            &self.settings.domain,
            header(route::ID_HEADER),
            header(route::PORT_HEADER),
            &path_and_query,
        ) {
            Ok(t) => t,
            Err(route::NoRoute::Missing(m)) => {
                return (answer(StatusCode::NOT_FOUND, "no_route", &m), None);
            }
            Err(route::NoRoute::Malformed(m)) => {
                return (answer(StatusCode::BAD_REQUEST, "bad_route", &m), None);
            }
            Err(route::NoRoute::AddSlash(location)) => {
                let mut r = answer(
                    StatusCode::PERMANENT_REDIRECT,
                    "redirect",
                    &format!("see {location}"),
                );
                if let Ok(v) = HeaderValue::from_str(&location) {
                    r.headers_mut().insert(header::LOCATION, v);
                }
                return (r, None);
            }
        };
        let id = target.id;
        let Some(info) = self.backend.lookup(id).await else {
            let m = format!("no sandbox {id}");
            return (answer(StatusCode::NOT_FOUND, "sandbox_not_found", &m), None);
        };
        let cookie = match self.authorize(&req, &target, info.public, tls) {
            Ok(c) => c,
            Err(m) => {
                let mut r = answer(StatusCode::UNAUTHORIZED, "access_denied", &m);
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Cove-Access-Token"),
                );
                return (r, None);
            }
        };
        let unavailable = |code: &str, m: String| {
            let mut r = answer(StatusCode::SERVICE_UNAVAILABLE, code, &m);
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        };
        match info.state {
            SandboxState::Running => {}
            SandboxState::Pending => {
                let m = format!("sandbox {id} is starting; try again in a moment");
                return (unavailable("starting", m), None);
            }
            SandboxState::Paused => {
                let m = format!("sandbox {id} is paused; resume it to reach its ports");
                return (unavailable("paused", m), None);
            }
            SandboxState::Exited => {
                let m = format!("sandbox {id} has ended");
                return (answer(StatusCode::GONE, "sandbox_ended", &m), None);
            }
        }
        let mut response = self.forward(req, &target, peer, tls).await;
        if let Some(c) = cookie {
            response.headers_mut().append(header::SET_COOKIE, c);
        }
        (response, Some(id))
    }

    /// Whether the request may reach the target: a cookie to set when a signed URL was used,
    /// or why it may not.
    fn authorize(
        &self,
        req: &Request<Incoming>,
        target: &Target,
        public: bool,
        tls: bool,
    ) -> Result<Option<HeaderValue>, String> {
        if public {
            return Ok(None);
        }
        let id = target.id.as_str();
        let key = &self.settings.key;
        if let Some(token) = req.headers().get(TOKEN_HEADER) {
            return if key.check_access_token(id, token.to_str().unwrap_or("")) {
                Ok(None)
            } else {
                Err(format!(
                    "the Cove-Access-Token header does not hold sandbox {id}'s access token"
                ))
            };
        }
        let now = now_s();
        if let Some((expires, sig)) = req.uri().query().and_then(|q| split_signature(q).1) {
            let expires: u64 = expires.parse().unwrap_or(0);
            if !key.check_url(id, target.port, expires, &sig, now) {
                return Err(
                    "this signed URL is not valid (it has expired, or was not made for this \
                     sandbox and port); ask for a new one (`cove url`)"
                        .into(),
                );
            }
            let path = match target.form {
                Form::Path => format!("{}{id}/{}/", route::PATH_PREFIX, target.port),
                Form::Host | Form::Headers => "/".into(),
            };
            let cookie = format!(
                "{COOKIE}={expires}.{sig}; Path={path}; Max-Age={}; HttpOnly; SameSite=Lax{}",
                expires - now,
                if tls { "; Secure" } else { "" }
            );
            return Ok(HeaderValue::from_str(&cookie).ok());
        }
        let cookies = access_cookies(req.headers());
        let valid = cookies.iter().any(|c| {
            c.split_once('.').is_some_and(|(e, s)| {
                key.check_url(id, target.port, e.parse().unwrap_or(0), s, now)
            })
        });
        if valid {
            return Ok(None);
        }
        Err(if cookies.is_empty() {
            format!(
                "sandbox {id} is private: send its access token in the Cove-Access-Token \
                 header, or open a signed URL (`cove url {id} {}`)",
                target.port
            )
        } else {
            format!(
                "the access cookie for sandbox {id} has expired; open a new signed URL \
                 (`cove url {id} {}`)",
                target.port
            )
        })
    }

    /// Sends the request to the sandbox's port and returns its answer (or the proxy's, when
    /// it could not be reached).
    async fn forward(
        &self,
        mut req: Request<Incoming>,
        target: &Target,
        peer: SocketAddr,
        tls: bool,
    ) -> Response<Body> {
        let (id, port) = (target.id, target.port);
        let upgrade = is_upgrade(&req);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let original_host = req.headers().get(header::HOST).cloned().or_else(|| {
            req.uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });

        // The path and query, without a signed URL's parameters.
        let pq = &target.path_and_query;
        let pq = match pq.split_once('?') {
            Some((path, query)) => match split_signature(query) {
                (q, _) if q.is_empty() => path.to_string(),
                (q, _) => format!("{path}?{q}"),
            },
            None => pq.clone(),
        };
        let uri: Uri = match format!("http://{id}:{port}{pq}").parse() {
            Ok(u) => u,
            Err(_) => {
                return answer(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    "the request's path cannot be forwarded",
                );
            }
        };
        *req.uri_mut() = uri;
        *req.version_mut() = Version::HTTP_11;
        let headers = req.headers_mut();
        let upgrade_to = headers.get(header::UPGRADE).cloned();
        strip_hop_by_hop(headers);
        if let (true, Some(u)) = (upgrade, upgrade_to) {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, u);
        }
        for h in [TOKEN_HEADER, route::ID_HEADER, route::PORT_HEADER] {
            headers.remove(h);
        }
        strip_access_cookie(headers);
        if let Some(h) = &original_host {
            headers.insert(header::HOST, h.clone());
            headers.insert("x-forwarded-host", h.clone());
        }
        let forwarded_for = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
            Some(before) => format!("{before}, {}", peer.ip()),
            None => peer.ip().to_string(),
        };
        if let Ok(v) = HeaderValue::from_str(&forwarded_for) {
            headers.insert("x-forwarded-for", v);
        }
        headers.insert(
            "x-forwarded-proto",
            HeaderValue::from_static(if tls { "https" } else { "http" }),
        );

        let sent = tokio::time::timeout(self.settings.upstream_timeout, self.client.request(req));
        let mut response = match sent.await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return self.upstream_error(&e, id, port),
            Err(_) => {
                return answer(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream_timeout",
                    &format!(
                        "port {port} of sandbox {id} did not answer within {} s",
                        self.settings.upstream_timeout.as_secs_f64()
                    ),
                );
            }
        };
        if response.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_side) = client_upgrade
        {
            let upstream_side = hyper::upgrade::on(&mut response);
            tokio::spawn(async move {
                if let (Ok(c), Ok(u)) = (client_side.await, upstream_side.await) {
                    let _ =
                        tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(u))
                            .await;
                }
            });
            return response.map(|b| b.boxed());
        }
        strip_hop_by_hop(response.headers_mut());
        response.map(|b| b.boxed())
    }

    fn upstream_error(
        &self,
        e: &hyper_util::client::legacy::Error,
        id: SandboxId,
        port: u16,
    ) -> Response<Body> {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(s) = source {
            if let Some(d) = s.downcast_ref::<DialError>() {
                return match d {
                    DialError::NotRunning => answer(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "not_running",
                        &format!("sandbox {id} is not running"),
                    ),
                    DialError::Refused => answer(
                        StatusCode::BAD_GATEWAY,
                        "nothing_listening",
                        &format!(
                            "nothing listens on port {port} in sandbox {id} (a server there must \
                             listen on 127.0.0.1, ::1 or all addresses)"
                        ),
                    ),
                    DialError::TimedOut => answer(
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream_timeout",
                        &format!("connecting to port {port} of sandbox {id} timed out"),
                    ),
                    DialError::Io(_) => answer(
                        StatusCode::BAD_GATEWAY,
                        "upstream_error",
                        &format!("could not connect to port {port} of sandbox {id}"),
                    ),
                };
            }
            source = s.source();
        }
        answer(
            StatusCode::BAD_GATEWAY,
            "upstream_error",
            &format!("port {port} of sandbox {id} closed the connection without a valid answer"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_url_parameters_are_taken_out_of_the_query() {
        assert_eq!(
            split_signature("a=1&cove_expires=10&b=2&cove_sig=ff"),
            ("a=1&b=2".into(), Some(("10".into(), "ff".into())))
        );
        assert_eq!(split_signature("a=1"), ("a=1".into(), None));
        assert_eq!(split_signature("cove_sig=ff").1, None, "both are needed");
        assert_eq!(split_signature("cove_expires_x=1").0, "cove_expires_x=1");
    }

    #[test]
    fn the_access_cookie_is_read_and_never_forwarded() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; cove_access=5.ab"),
        );
        h.append(
            header::COOKIE,
            HeaderValue::from_static("cove_access=6.cd; b=2"),
        );
        assert_eq!(access_cookies(&h), vec!["5.ab", "6.cd"]);
        strip_access_cookie(&mut h);
        assert_eq!(h.get_all(header::COOKIE).iter().count(), 1);
        assert_eq!(h.get(header::COOKIE).unwrap(), "a=1; b=2");
        let mut only = HeaderMap::new();
        only.insert(header::COOKIE, HeaderValue::from_static("cove_access=1.2"));
        strip_access_cookie(&mut only);
        assert!(only.get(header::COOKIE).is_none());
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }
}
