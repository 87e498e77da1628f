//! Which sandbox port a request is for. Three forms, tried in this order:
//! 1. the host: `<port>-<id>.<domain>` (the `Host` header, or the authority of an HTTP/2
//!    request);
//! 2. the headers `Cove-Sandbox-Id` and `Cove-Sandbox-Port`, for clients that cannot set a
//!    host name (no wildcard DNS);
//! 3. the path `/proxy/<id>/<port>/…`, whose prefix is removed before the request goes on.

use cove_types::SandboxId;

/// Header naming the sandbox (with [`PORT_HEADER`]).
pub const ID_HEADER: &str = "cove-sandbox-id";
/// Header naming the port (with [`ID_HEADER`]).
pub const PORT_HEADER: &str = "cove-sandbox-port";
/// The path form's prefix.
pub const PATH_PREFIX: &str = "/proxy/";

/// How a request named its sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Host,
    Headers,
    /// The path form; the upstream path is what follows the prefix.
    Path,
}

/// A request's destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub id: SandboxId,
    pub port: u16,
    pub form: Form,
    /// The path (and query) to send upstream.
    pub path_and_query: String,
}

/// Why a request has no destination; the message says what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoRoute {
    /// Nothing names a sandbox (404).
    Missing(String),
    /// Something names one, badly (400).
    Malformed(String),
    /// `/proxy/<id>/<port>` without its slash: redirect (308) to this location.
    AddSlash(String),
}

fn port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) || s.starts_with('0') {
        return None;
    }
    s.parse().ok().filter(|p| *p > 0)
}

/// `<port>-<id>` (one DNS label).
fn label(l: &str) -> Option<(u16, SandboxId)> {
    let (p, id) = l.split_once('-')?;
    Some((port(p)?, id.parse().ok()?))
}

/// The destination of a request with this host (without any `:port`, any case), headers and
/// path (with its query).
pub fn route(
    host: Option<&str>,
    domain: &str,
    header_id: Option<&str>,
    header_port: Option<&str>,
    path_and_query: &str,
) -> Result<Target, NoRoute> {
    if let Some(h) = host {
        let h = h.to_ascii_lowercase();
        let h = h.strip_suffix('.').unwrap_or(&h);
        if let Some(l) = h
            .strip_suffix(domain)
            .and_then(|rest| rest.strip_suffix('.'))
        {
            return match label(l) {
                Some((port, id)) => Ok(Target {
                    id,
                    port,
                    form: Form::Host,
                    path_and_query: path_and_query.to_string(),
                }),
                None => Err(NoRoute::Malformed(format!(
                    "{h:?} is not a sandbox address: use <port>-<sandbox id>.{domain}, \
                     for example 8080-0123456789ab.{domain}"
                ))),
            };
        }
    }
    match (header_id, header_port) {
        (Some(id), Some(p)) => {
            let id = id.trim().parse().map_err(|_| {
                NoRoute::Malformed(format!(
                    "Cove-Sandbox-Id {id:?} is not a sandbox id (12 lowercase hex characters)"
                ))
            })?;
            let port = port(p.trim()).ok_or_else(|| {
                NoRoute::Malformed(format!("Cove-Sandbox-Port {p:?} is not a port (1-65535)"))
            })?;
            return Ok(Target {
                id,
                port,
                form: Form::Headers,
                path_and_query: path_and_query.to_string(),
            });
        }
        (Some(_), None) | (None, Some(_)) => {
            return Err(NoRoute::Malformed(
                "send both Cove-Sandbox-Id and Cove-Sandbox-Port".into(),
            ));
        }
        (None, None) => {}
    }
    if let Some(rest) = path_and_query.strip_prefix(PATH_PREFIX) {
        let (path, query) = match rest.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (rest, None),
        };
        let mut parts = path.splitn(3, '/');
        let (id, p) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let bad = || {
            NoRoute::Malformed(format!(
                "{PATH_PREFIX}{id}/{p}: use {PATH_PREFIX}<sandbox id>/<port>/<path>"
            ))
        };
        let id: SandboxId = id.parse().map_err(|_| bad())?;
        let port = port(p).ok_or_else(bad)?;
        return match parts.next() {
            Some(tail) => Ok(Target {
                id,
                port,
                form: Form::Path,
                path_and_query: match query {
                    Some(q) => format!("/{tail}?{q}"),
                    None => format!("/{tail}"),
                },
            }),
            None => Err(NoRoute::AddSlash(match query {
                Some(q) => format!("{PATH_PREFIX}{id}/{port}/?{q}"),
                None => format!("{PATH_PREFIX}{id}/{port}/"),
            })),
        };
    }
    Err(NoRoute::Missing(format!(
        "no sandbox named: use the host <port>-<sandbox id>.{domain}, the headers \
         Cove-Sandbox-Id and Cove-Sandbox-Port, or the path {PATH_PREFIX}<sandbox id>/<port>/"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "0123456789ab";

    fn ok(r: Result<Target, NoRoute>) -> (String, u16, Form, String) {
        let t = r.unwrap();
        (t.id.to_string(), t.port, t.form, t.path_and_query)
    }

    #[test]
    fn host_form() {
        let h = format!("8080-{ID}.cove.localhost");
        assert_eq!(
            ok(route(Some(&h), "cove.localhost", None, None, "/a?b=c")),
            (ID.into(), 8080, Form::Host, "/a?b=c".into())
        );
        // Any case, a trailing dot.
        let h = format!("80-{}.COVE.localhost.", ID.to_uppercase());
        assert_eq!(ok(route(Some(&h), "cove.localhost", None, None, "/")).1, 80);
        // Under the domain but not a sandbox address: an error, not another form.
        for bad in [
            format!("{ID}.cove.localhost"),
            format!("0-{ID}.cove.localhost"),
            format!("65536-{ID}.cove.localhost"),
            format!("080-{ID}.cove.localhost"),
            format!("80-{ID}x.cove.localhost"),
            format!("a.80-{ID}.cove.localhost"),
        ] {
            assert!(
                matches!(
                    route(Some(&bad), "cove.localhost", None, None, "/"),
                    Err(NoRoute::Malformed(_))
                ),
                "{bad}"
            );
        }
        // Another domain falls through to the other forms.
        let h = format!("8080-{ID}.evil.example");
        assert!(matches!(
            route(Some(&h), "cove.localhost", None, None, "/"),
            Err(NoRoute::Missing(_))
        ));
        // A suffix match must be a whole label.
        let h = format!("8080-{ID}.xcove.localhost");
        assert!(matches!(
            route(Some(&h), "cove.localhost", None, None, "/"),
            Err(NoRoute::Missing(_))
        ));
    }

    #[test]
    fn header_form() {
        assert_eq!(
            ok(route(Some("localhost"), "d", Some(ID), Some("3000"), "/x")),
            (ID.into(), 3000, Form::Headers, "/x".into())
        );
        assert!(matches!(
            route(None, "d", Some(ID), None, "/"),
            Err(NoRoute::Malformed(_))
        ));
        assert!(matches!(
            route(None, "d", Some("nope"), Some("1"), "/"),
            Err(NoRoute::Malformed(_))
        ));
        assert!(matches!(
            route(None, "d", Some(ID), Some("99999"), "/"),
            Err(NoRoute::Malformed(_))
        ));
    }

    #[test]
    fn path_form() {
        assert_eq!(
            ok(route(
                None,
                "d",
                None,
                None,
                &format!("/proxy/{ID}/8080/a/b?q=1")
            )),
            (ID.into(), 8080, Form::Path, "/a/b?q=1".into())
        );
        assert_eq!(
            ok(route(None, "d", None, None, &format!("/proxy/{ID}/8080/"))).3,
            "/"
        );
        assert_eq!(
            route(None, "d", None, None, &format!("/proxy/{ID}/8080?q=1")),
            Err(NoRoute::AddSlash(format!("/proxy/{ID}/8080/?q=1")))
        );
        assert!(matches!(
            route(None, "d", None, None, "/proxy/x/8080/"),
            Err(NoRoute::Malformed(_))
        ));
        assert!(matches!(
            route(None, "d", None, None, &format!("/proxy/{ID}/http/")),
            Err(NoRoute::Malformed(_))
        ));
        assert!(matches!(
            route(None, "d", None, None, "/"),
            Err(NoRoute::Missing(_))
        ));
    }
}
