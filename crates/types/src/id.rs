//! Sandbox ids: 12 lowercase hex characters, short enough to sit in a DNS label
//! (`8080-<id>.example.com`), a process name (`cove-<id>` fits the kernel's 15-byte comm) and a
//! cgroup or network-namespace name, and random enough (48 bits) not to collide on one node.

use std::fmt;
use std::str::FromStr;

/// Length of a sandbox id in characters.
pub const ID_LEN: usize = 12;

/// A validated sandbox id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SandboxId([u8; ID_LEN]);

/// Why a string is not a sandbox id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a sandbox id: expected {ID_LEN} lowercase hex characters")]
pub struct IdError {
    input: String,
}

impl SandboxId {
    /// An id from 6 random bytes (the caller supplies the randomness; this crate does no I/O).
    pub fn from_random(bytes: [u8; 6]) -> SandboxId {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; ID_LEN];
        for (i, b) in bytes.iter().enumerate() {
            out[2 * i] = HEX[(b >> 4) as usize];
            out[2 * i + 1] = HEX[(b & 0xf) as usize];
        }
        SandboxId(out)
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        // The constructor only ever stores ASCII hex digits.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl FromStr for SandboxId {
    type Err = IdError;

    fn from_str(s: &str) -> Result<SandboxId, IdError> {
        let b = s.as_bytes();
        if b.len() != ID_LEN || !b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(IdError {
                input: s.to_string(),
            });
        }
        let mut out = [0u8; ID_LEN];
        out.copy_from_slice(b);
        Ok(SandboxId(out))
    }
}

impl fmt::Display for SandboxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

serde_via_str!(SandboxId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_hex_and_round_trip() {
        let id = SandboxId::from_random([0xde, 0xad, 0xbe, 0xef, 0x01, 0x23]);
        assert_eq!(id.as_str(), "deadbeef0123");
        assert_eq!(id.as_str().parse::<SandboxId>().unwrap(), id);
    }

    #[test]
    fn bad_ids_are_rejected() {
        for s in [
            "",
            "deadbeef012",
            "deadbeef01234",
            "DEADBEEF0123",
            "deadbeef012g",
            "../../etc/x",
        ] {
            assert!(s.parse::<SandboxId>().is_err(), "{s}");
        }
    }
}
