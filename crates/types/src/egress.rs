//! Egress policy: what a sandbox with `--net egress` may reach.
//!
//! Whatever the policy says, a sandbox never reaches the cloud metadata service, the host's
//! own addresses, or private, shared, loopback, link-local, multicast and reserved ranges
//! ([`ALWAYS_BLOCKED`]); IPv6 egress is not offered. The spec's lists come after that: a
//! destination on the deny list is dropped; with an allow list, only its destinations pass.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// Ranges no sandbox may ever reach, with why.
pub const ALWAYS_BLOCKED: &[(Ipv4Addr, u8, &str)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8, "\"this\" network"),
    (Ipv4Addr::new(10, 0, 0, 0), 8, "private (RFC 1918)"),
    (
        Ipv4Addr::new(100, 64, 0, 0),
        10,
        "shared address space (CGNAT)",
    ),
    (Ipv4Addr::new(127, 0, 0, 0), 8, "loopback"),
    (
        Ipv4Addr::new(169, 254, 0, 0),
        16,
        "link-local (cloud metadata)",
    ),
    (Ipv4Addr::new(172, 16, 0, 0), 12, "private (RFC 1918)"),
    (Ipv4Addr::new(192, 0, 0, 0), 24, "IETF protocol assignments"),
    (Ipv4Addr::new(192, 168, 0, 0), 16, "private (RFC 1918)"),
    (Ipv4Addr::new(198, 18, 0, 0), 15, "benchmarking"),
    (Ipv4Addr::new(224, 0, 0, 0), 3, "multicast and reserved"),
];

/// One entry of an allow or deny list: an IPv4 network, and optionally a port or port range
/// (TCP and UDP). Written `A.B.C.D[/N][:PORT[-PORT]]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EgressRule {
    /// The network's address (host bits zero).
    pub addr: Ipv4Addr,
    /// Its prefix length (0-32).
    pub prefix: u8,
    /// The destination ports, first to last; `None` is every port (and every protocol).
    pub ports: Option<(u16, u16)>,
}

/// A malformed list entry; says what is expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "bad egress rule {input:?}: {reason} (expected A.B.C.D[/N][:PORT[-PORT]], e.g. 203.0.113.0/24:443)"
)]
pub struct RuleError {
    pub input: String,
    pub reason: String,
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    }
}

impl EgressRule {
    /// Whether every address of `self` is in `addr/prefix`.
    pub fn within(&self, addr: Ipv4Addr, prefix: u8) -> bool {
        self.prefix >= prefix
            && u32::from(self.addr) & mask(prefix) == u32::from(addr) & mask(prefix)
    }

    /// The always-blocked range this rule lies wholly in, if any.
    pub fn always_blocked(&self) -> Option<&'static str> {
        ALWAYS_BLOCKED
            .iter()
            .find(|(a, p, _)| self.within(*a, *p))
            .map(|(_, _, why)| *why)
    }
}

impl FromStr for EgressRule {
    type Err = RuleError;
    fn from_str(s: &str) -> Result<EgressRule, RuleError> {
        let bad = |reason: &str| RuleError {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let (net, ports) = match s.split_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (s, None),
        };
        let (addr, prefix) = match net.split_once('/') {
            Some((a, p)) => (
                a,
                p.parse::<u8>()
                    .ok()
                    .filter(|p| *p <= 32)
                    .ok_or_else(|| bad("the prefix length must be 0-32"))?,
            ),
            None => (net, 32),
        };
        let addr: Ipv4Addr = addr.parse().map_err(|_| bad("not an IPv4 address"))?;
        let port = |p: &str| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| bad("ports are 1-65535"))
        };
        let ports = match ports {
            None => None,
            Some(p) => Some(match p.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (port(a)?, port(b)?);
                    if a > b {
                        return Err(bad("a port range goes from low to high"));
                    }
                    (a, b)
                }
                None => (port(p)?, port(p)?),
            }),
        };
        if u32::from(addr) & !mask(prefix) != 0 {
            return Err(bad(&format!(
                "host bits are set; the network is {}/{prefix}",
                Ipv4Addr::from(u32::from(addr) & mask(prefix))
            )));
        }
        Ok(EgressRule {
            addr,
            prefix,
            ports,
        })
    }
}

impl fmt::Display for EgressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.addr)?;
        if self.prefix != 32 {
            write!(f, "/{}", self.prefix)?;
        }
        match self.ports {
            Some((a, b)) if a == b => write!(f, ":{a}"),
            Some((a, b)) => write!(f, ":{a}-{b}"),
            None => Ok(()),
        }
    }
}

impl serde::Serialize for EgressRule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for EgressRule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<EgressRule, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A sandbox's allow and deny lists.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressPolicy {
    /// When not empty, only these destinations pass.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<EgressRule>,
    /// These destinations are dropped (before the allow list is looked at).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<EgressRule>,
}

impl EgressPolicy {
    /// Whether the lists are both empty (everything not always blocked passes).
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }
}

/// Most entries a list may hold.
pub const MAX_RULES: usize = 256;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_print() {
        for (text, canon) in [
            ("203.0.113.7", "203.0.113.7"),
            ("203.0.113.0/24", "203.0.113.0/24"),
            ("203.0.113.0/24:443", "203.0.113.0/24:443"),
            ("0.0.0.0/0:8000-8100", "0.0.0.0/0:8000-8100"),
            ("203.0.113.7/32:80-80", "203.0.113.7:80"),
        ] {
            let r: EgressRule = text.parse().unwrap();
            assert_eq!(r.to_string(), canon);
            assert_eq!(canon.parse::<EgressRule>().unwrap(), r);
        }
        for bad in [
            "",
            "example.com",
            "203.0.113.0/33",
            "203.0.113.1/24",
            "1.2.3.4:0",
            "1.2.3.4:70000",
            "1.2.3.4:90-80",
            "1.2.3.4:http",
            "::1",
        ] {
            assert!(bad.parse::<EgressRule>().is_err(), "{bad}");
        }
        let e = "203.0.113.1/24".parse::<EgressRule>().unwrap_err();
        assert!(e.to_string().contains("203.0.113.0/24"), "{e}");
    }

    #[test]
    fn always_blocked_ranges_are_recognised() {
        let r = |s: &str| s.parse::<EgressRule>().unwrap();
        assert!(
            r("169.254.169.254")
                .always_blocked()
                .unwrap()
                .contains("metadata")
        );
        assert!(r("10.1.0.0/16:443").always_blocked().is_some());
        assert!(r("192.168.1.1").always_blocked().is_some());
        assert!(r("172.31.255.255").always_blocked().is_some());
        assert!(r("172.32.0.1").always_blocked().is_none());
        assert!(r("203.0.113.0/24").always_blocked().is_none());
        // A wider network is not wholly blocked: the blocked part stays blocked anyway.
        assert!(r("0.0.0.0/0").always_blocked().is_none());
    }

    #[test]
    fn policies_are_strings_in_json() {
        let p: EgressPolicy =
            serde_json::from_str(r#"{"allow":["203.0.113.0/24:443"],"deny":["203.0.113.9"]}"#)
                .unwrap();
        assert_eq!(p.allow[0].ports, Some((443, 443)));
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"allow":["203.0.113.0/24:443"],"deny":["203.0.113.9"]}"#
        );
        assert!(serde_json::from_str::<EgressPolicy>(r#"{"allow":["x"]}"#).is_err());
        assert!(serde_json::from_str::<EgressPolicy>(r#"{"alow":[]}"#).is_err());
    }
}
