//! Image references as people type them (`busybox`, `busybox:1.36`, `host:5000/team/app:v1`,
//! `name@sha256:…`), parsed once into [`Reference`].
//!
//! The grammar and normalisation are Docker's (`github.com/distribution/reference`), because that
//! is what every tag in a `docker save` archive and every name users copy from a registry page
//! follows:
//!
//! - the first `/`-separated component is a registry host only if it contains `.` or `:`, is
//!   `localhost`, or has upper-case letters; otherwise the registry is `docker.io`;
//! - on `docker.io`, a one-component repository gets `library/` (`busybox` is
//!   `docker.io/library/busybox`), and the legacy `index.docker.io` is `docker.io`;
//! - with neither tag nor digest, the tag is `latest`.
//!
//! The fully qualified form ([`Reference::canonical`]) is the store's key; [`Display`] gives the
//! short form back (`busybox:latest`), as `docker images` shows it.
//!
//! Rejected: `oci-client`'s `Reference`, which normalises the same way, because nothing in this
//! crate talks to a registry yet; when pulls arrive, the two must agree (the tables in the tests
//! are Docker's own examples).
//!
//! [`Display`]: std::fmt::Display

use std::fmt;
use std::str::FromStr;

use crate::digest::{Digest, DigestError};

const DEFAULT_DOMAIN: &str = "docker.io";
const LEGACY_DEFAULT_DOMAIN: &str = "index.docker.io";
const OFFICIAL_PREFIX: &str = "library/";
const DEFAULT_TAG: &str = "latest";
/// Longest `domain/path` accepted (Docker's limit).
const MAX_NAME: usize = 255;
/// Longest tag accepted (Docker's limit).
const MAX_TAG: usize = 128;
/// How much of a rejected reference an error quotes.
const MAX_QUOTED: usize = 300;

/// A parsed, normalised image reference.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Reference {
    domain: String,
    path: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

/// Why a string is not an image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// The reference breaks the grammar.
    #[error("invalid image reference {reference:?}: {reason}")]
    Invalid {
        /// The rejected reference (at most 300 characters of it).
        reference: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The part after `@` is not a digest we accept.
    #[error("invalid image reference {reference:?}: bad digest")]
    Digest {
        /// The rejected reference (at most 300 characters of it).
        reference: String,
        /// Why the digest was rejected.
        #[source]
        source: DigestError,
    },
}

impl Reference {
    /// The registry host (and port): `docker.io`, `host:5000`.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The repository path within the registry: `library/busybox`, `team/app`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The tag, if any (`latest` when the reference named neither tag nor digest).
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The manifest digest, for `name@sha256:…` references.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// The fully qualified form, `docker.io/library/busybox:latest`: the key the store uses.
    pub fn canonical(&self) -> String {
        let mut out = format!("{}/{}", self.domain, self.path);
        self.push_tag_and_digest(&mut out);
        out
    }

    /// The canonical form as one safe file name: every byte outside `[A-Za-z0-9._-]` becomes
    /// `%XX`, so `/` cannot appear, and the name starts with a registry host's first character
    /// (a letter, a digit, or `[` escaped), so it is never `.`, `..` or hidden. Names that would
    /// come near the 255-byte file name limit are cut and completed with the digest of the whole
    /// canonical form.
    pub fn file_stem(&self) -> String {
        const MAX_STEM: usize = 200;
        let canonical = self.canonical();
        let mut out = String::with_capacity(canonical.len());
        for b in canonical.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
                out.push(char::from(b));
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        if out.len() > MAX_STEM {
            let hash = Digest::of(canonical.as_bytes()).hex();
            out.truncate(MAX_STEM - hash.len() - 1);
            out.push('~');
            out.push_str(&hash);
        }
        out
    }

    /// This reference with `digest` instead of any tag or digest it had.
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference {
            tag: None,
            digest: Some(digest),
            ..self.clone()
        }
    }

    fn push_tag_and_digest(&self, out: &mut String) {
        if let Some(tag) = &self.tag {
            out.push(':');
            out.push_str(tag);
        }
        if let Some(digest) = &self.digest {
            out.push('@');
            out.push_str(&digest.to_string());
        }
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Reference, ReferenceError> {
        let invalid = |reason: String| ReferenceError::Invalid {
            reference: s.chars().take(MAX_QUOTED).collect(),
            reason,
        };
        if s.is_empty() {
            return Err(invalid("the reference is empty".into()));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((rest, digest)) => {
                let digest = digest.parse().map_err(|source| ReferenceError::Digest {
                    reference: s.chars().take(MAX_QUOTED).collect(),
                    source,
                })?;
                (rest, Some(digest))
            }
            None => (s, None),
        };
        // A `:` after the last `/` starts the tag; one before it belongs to a registry port.
        let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(tag) = tag {
            check_tag(tag).map_err(invalid)?;
        }
        if name.is_empty() {
            return Err(invalid("the repository name is empty".into()));
        }
        let (domain, path) = split_domain(name);
        check_domain(domain).map_err(invalid)?;
        check_path(path).map_err(invalid)?;
        let (domain, path) = normalise(domain, path);
        if domain.len() + 1 + path.len() > MAX_NAME {
            return Err(invalid(format!(
                "the name is longer than {MAX_NAME} characters"
            )));
        }
        let tag = match (tag, &digest) {
            (None, None) => Some(DEFAULT_TAG.to_string()),
            (tag, _) => tag.map(str::to_string),
        };
        Ok(Reference {
            domain,
            path,
            tag,
            digest,
        })
    }
}

/// Splits `name` into registry host and repository path, the way Docker does.
fn split_domain(name: &str) -> (&str, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.chars().any(|c| c.is_ascii_uppercase()) =>
        {
            (first, rest)
        }
        _ => (DEFAULT_DOMAIN, name),
    }
}

fn normalise(domain: &str, path: &str) -> (String, String) {
    let domain = if domain == LEGACY_DEFAULT_DOMAIN {
        DEFAULT_DOMAIN
    } else {
        domain
    };
    let path = if domain == DEFAULT_DOMAIN && !path.contains('/') {
        format!("{OFFICIAL_PREFIX}{path}")
    } else {
        path.to_string()
    };
    (domain.to_string(), path)
}

/// `host[:port]`, where host is dot-separated labels (letters, digits, inner `-`) or a bracketed
/// IPv6 address.
fn check_domain(domain: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("registry host {domain:?} {why}"));
    let (host, port) = if let Some(v6) = domain.strip_prefix('[') {
        let Some((addr, after)) = v6.split_once(']') else {
            return bad("has an unclosed `[`");
        };
        if addr.is_empty() || !addr.chars().all(|c| c.is_ascii_hexdigit() || c == ':') {
            return bad("is not a valid IPv6 address");
        }
        match after {
            "" => (None, None),
            p => match p.strip_prefix(':') {
                Some(port) => (None, Some(port)),
                None => return bad("has text after the IPv6 address"),
            },
        }
    } else {
        match domain.split_once(':') {
            Some((host, port)) => (Some(host), Some(port)),
            None => (Some(domain), None),
        }
    };
    if let Some(host) = host {
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if !host.split('.').all(label_ok) {
            return bad("is not a valid host name");
        }
    }
    if let Some(port) = port
        && (port.is_empty() || port.len() > 5 || !port.chars().all(|c| c.is_ascii_digit()))
    {
        return bad("has an invalid port");
    }
    Ok(())
}

/// `component ("/" component)*`, each component lowercase letters and digits, separated inside by
/// `.`, `_`, `__` or one or more `-`.
fn check_path(path: &str) -> Result<(), String> {
    for component in path.split('/') {
        if component.is_empty() {
            return Err("the repository path has an empty component".into());
        }
        if component.chars().any(|c| c.is_ascii_uppercase()) {
            return Err(format!(
                "repository component {component:?} must be lowercase"
            ));
        }
        if !component_ok(component.as_bytes()) {
            return Err(format!(
                "repository component {component:?} may only contain lowercase letters, digits \
                 and single `.`, `_`, `__` or `-` runs between them"
            ));
        }
    }
    Ok(())
}

fn component_ok(c: &[u8]) -> bool {
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let mut i = 0;
    loop {
        let start = i;
        while i < c.len() && alnum(&c[i]) {
            i += 1;
        }
        if i == start {
            return false; // empty run of letters and digits: leading, trailing or doubled separator
        }
        if i == c.len() {
            return true;
        }
        let sep_start = i;
        while i < c.len() && !alnum(&c[i]) {
            i += 1;
        }
        let sep = &c[sep_start..i];
        if !(matches!(sep, b"." | b"_" | b"__") || sep.iter().all(|&b| b == b'-')) {
            return false;
        }
    }
}

/// `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
fn check_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() {
        return Err("the tag after `:` is empty".into());
    }
    if tag.len() > MAX_TAG {
        return Err(format!("the tag is longer than {MAX_TAG} characters"));
    }
    let ok = |c: char| c.is_ascii_alphanumeric() || c == '_';
    if !tag.starts_with(ok) || !tag.chars().all(|c| ok(c) || c == '.' || c == '-') {
        return Err(format!(
            "tag {tag:?} may only contain letters, digits, `_`, `.` and `-`, and may not start \
             with `.` or `-`"
        ));
    }
    Ok(())
}

/// The short form: `busybox:latest`, `team/app:v1`, `host:5000/app@sha256:…`.
impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = if self.domain == DEFAULT_DOMAIN {
            match self.path.strip_prefix(OFFICIAL_PREFIX) {
                Some(official) if !official.contains('/') => official.to_string(),
                _ => self.path.clone(),
            }
        } else {
            format!("{}/{}", self.domain, self.path)
        };
        self.push_tag_and_digest(&mut out);
        f.write_str(&out)
    }
}

impl fmt::Debug for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reference({})", self.canonical())
    }
}

impl serde::Serialize for Reference {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.canonical())
    }
}

impl<'de> serde::Deserialize<'de> for Reference {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Reference, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    #[test]
    fn parses_and_normalises() {
        // input, canonical, short; `@D` stands for `@sha256:<HEX>`.
        #[rustfmt::skip]
        let table = [
            ("busybox", "docker.io/library/busybox:latest", "busybox:latest"),
            ("busybox:1.36", "docker.io/library/busybox:1.36", "busybox:1.36"),
            ("library/busybox:latest", "docker.io/library/busybox:latest", "busybox:latest"),
            ("docker.io/busybox", "docker.io/library/busybox:latest", "busybox:latest"),
            ("index.docker.io/library/busybox", "docker.io/library/busybox:latest", "busybox:latest"),
            ("team/app", "docker.io/team/app:latest", "team/app:latest"),
            ("host:5000/team/app:v1", "host:5000/team/app:v1", "host:5000/team/app:v1"),
            ("localhost/app", "localhost/app:latest", "localhost/app:latest"),
            ("Registry/app", "Registry/app:latest", "Registry/app:latest"),
            ("[::1]:5000/app:x", "[::1]:5000/app:x", "[::1]:5000/app:x"),
            ("quay.io/a/b/c", "quay.io/a/b/c:latest", "quay.io/a/b/c:latest"),
            ("a.b__c-d--e_f:V1.0_x-y", "docker.io/library/a.b__c-d--e_f:V1.0_x-y", "a.b__c-d--e_f:V1.0_x-y"),
            ("name@D", "docker.io/library/name@D", "name@D"),
            ("ghcr.io/o/app:1@D", "ghcr.io/o/app:1@D", "ghcr.io/o/app:1@D"),
        ];
        let with_digest = |s: &str| s.replace("@D", &format!("@sha256:{HEX}"));
        for (input, canonical, short) in table {
            let (input, canonical, short) = (
                with_digest(input),
                with_digest(canonical),
                with_digest(short),
            );
            let r: Reference = input.parse().unwrap_or_else(|e| panic!("{input:?}: {e}"));
            assert_eq!(r.canonical(), canonical, "{input:?}");
            assert_eq!(r.to_string(), short, "{input:?}");
            // Both forms parse back to the same reference.
            assert_eq!(canonical.parse::<Reference>().unwrap(), r, "{input:?}");
            assert_eq!(short.parse::<Reference>().unwrap(), r, "{input:?}");
        }
        let r: Reference = "host:5000/team/app:v1".parse().unwrap();
        assert_eq!(
            (r.domain(), r.path(), r.tag(), r.digest()),
            ("host:5000", "team/app", Some("v1"), None)
        );
    }

    #[test]
    fn rejects_with_a_reason() {
        let long_tag = format!("busybox:{}", "t".repeat(129));
        let long_name = "a/".repeat(128) + "a";
        // input, a fragment of the reason
        let table: &[(&str, &str)] = &[
            ("", "empty"),
            ("Busybox", "must be lowercase"),
            ("busybox:", "tag after `:` is empty"),
            (":latest", "repository name is empty"),
            ("busybox:-x", "may not start with"),
            ("busybox:a/b", "invalid port"),
            (&long_tag, "longer than 128"),
            (&long_name, "longer than 255"),
            ("a//b", "empty component"),
            ("team/", "empty component"),
            ("/busybox", "empty component"),
            ("-busybox", "lowercase letters, digits"),
            ("busybox-", "lowercase letters, digits"),
            ("a..b", "lowercase letters, digits"),
            ("a___b", "lowercase letters, digits"),
            ("../x", "not a valid host name"),
            ("a/../x", "lowercase letters, digits"),
            ("bu sybox", "lowercase letters, digits"),
            ("a:b:c", "lowercase letters, digits"),
            ("host:port/app", "invalid port"),
            ("host:/app", "invalid port"),
            ("-host.io/app", "not a valid host name"),
            ("host..io/app", "not a valid host name"),
            ("[::1/app", "unclosed"),
            ("[zz]:5000/app", "IPv6"),
        ];
        for (input, fragment) in table {
            match input.parse::<Reference>() {
                Err(e @ ReferenceError::Invalid { .. }) => {
                    assert!(e.to_string().contains(fragment), "{input:?}: {e}")
                }
                other => panic!("{input:?}: expected a rejection, got {other:?}"),
            }
        }
        for input in [
            "busybox@sha256:abc".to_string(),
            format!("busybox@md5:{HEX}"),
            format!("busybox@{HEX}"),
            format!("busybox@sha256:{HEX}@sha256:{HEX}"),
        ] {
            assert!(
                matches!(
                    input.parse::<Reference>(),
                    Err(ReferenceError::Digest { .. })
                ),
                "{input:?}"
            );
        }
    }

    #[test]
    fn file_stems_are_single_safe_names() {
        for input in [
            "busybox",
            "host:5000/team/app:v1",
            "[::1]:5000/app",
            &format!("a/b@sha256:{HEX}"),
            &("x/".repeat(100) + "y:" + &"t".repeat(128)),
        ] {
            let r: Reference = input.parse().unwrap();
            let stem = r.file_stem();
            assert!(!stem.contains('/'), "{stem}");
            assert!(stem.len() <= 200, "{}", stem.len());
            assert!(!stem.starts_with('.'), "{stem}");
        }
        let stem = |s: &str| s.parse::<Reference>().unwrap().file_stem();
        assert_eq!(stem("busybox"), "docker.io%2Flibrary%2Fbusybox%3Alatest");
        assert_ne!(stem("a/b:c"), stem("a/b-c"));
    }
}
