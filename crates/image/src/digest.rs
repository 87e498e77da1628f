//! Content digests: the names of everything in the image store.
//!
//! Only `sha256` is accepted. OCI also registers `sha512`, but no registry or tool we import from
//! writes it, and one algorithm means one directory (`blobs/sha256/`) and one way to name a
//! layer. The encoded part must be exactly 64 lowercase hex digits, as the OCI image spec
//! requires for sha256: upper case would give the same content two names.
//!
//! [`Hasher`] digests bytes as they stream through a reader or writer, so a blob is verified
//! while it is copied, never by reading it a second time.

use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

const PREFIX: &str = "sha256:";
const HEX_LEN: usize = 64;
/// How much of a rejected value an error quotes; digests come from untrusted manifests.
const MAX_QUOTED: usize = 100;

/// A `sha256:<64 hex digits>` content digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

/// Why a string is not a digest we accept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// Some algorithm other than sha256, or none at all.
    #[error("digest {value:?} does not start with \"sha256:\" (the only algorithm supported)")]
    Algorithm {
        /// The rejected value (at most 100 characters of it).
        value: String,
    },
    /// The part after `sha256:` is not 64 lowercase hex digits.
    #[error("digest {value:?} is malformed: expected \"sha256:\" and 64 lowercase hex digits")]
    Encoded {
        /// The rejected value (at most 100 characters of it).
        value: String,
    },
}

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Digest {
        Digest(Sha256::digest(bytes).into())
    }

    /// The 64 lowercase hex digits, without the algorithm: the blob's file name in the store.
    pub fn hex(&self) -> String {
        let mut out = String::with_capacity(HEX_LEN);
        for b in self.0 {
            out.push(char::from(HEX_DIGITS[usize::from(b >> 4)]));
            out.push(char::from(HEX_DIGITS[usize::from(b & 0xf)]));
        }
        out
    }

    /// Parses the 64 hex digits alone (a file name in the store or in an OCI layout).
    pub fn from_hex(hex: &str) -> Result<Digest, DigestError> {
        parse_hex(hex).ok_or_else(|| DigestError::Encoded { value: quoted(hex) })
    }
}

const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

fn parse_hex(hex: &str) -> Option<Digest> {
    let hex = hex.as_bytes();
    if hex.len() != HEX_LEN {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(Digest(out))
}

fn quoted(value: &str) -> String {
    value.chars().take(MAX_QUOTED).collect()
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Digest, DigestError> {
        let hex = s
            .strip_prefix(PREFIX)
            .ok_or_else(|| DigestError::Algorithm { value: quoted(s) })?;
        parse_hex(hex).ok_or_else(|| DigestError::Encoded { value: quoted(s) })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Digests everything read from or written to the wrapped reader or writer.
pub struct Hasher<T> {
    inner: T,
    sha: Sha256,
    size: u64,
}

impl<T> Hasher<T> {
    /// Starts digesting the bytes that pass through `inner`.
    pub fn new(inner: T) -> Hasher<T> {
        Hasher {
            inner,
            sha: Sha256::new(),
            size: 0,
        }
    }

    /// The digest of the bytes seen so far.
    pub fn digest(&self) -> Digest {
        Digest(self.sha.clone().finalize().into())
    }

    /// How many bytes have been seen.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The wrapped reader or writer.
    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<R: Read> Read for Hasher<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.sha.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
}

impl<W: Write> Write for Hasher<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `printf '' | sha256sum` and `printf 'hello' | sha256sum`.
    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    const HELLO: &str = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

    #[test]
    fn digests_and_round_trips() {
        assert_eq!(Digest::of(b"").to_string(), EMPTY);
        assert_eq!(Digest::of(b"hello").to_string(), HELLO);
        let d: Digest = HELLO.parse().unwrap();
        assert_eq!(d, Digest::of(b"hello"));
        assert_eq!(Digest::from_hex(&d.hex()).unwrap(), d);
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{HELLO}\""));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
    }

    #[test]
    fn rejects_everything_else() {
        let hex = &HELLO[PREFIX.len()..];
        for (input, algorithm) in [
            (hex.to_string(), true),
            (format!("sha512:{hex}"), true),
            (format!("SHA256:{hex}"), true),
            (String::new(), true),
            (format!("sha256:{}", hex.to_uppercase()), false),
            (format!("sha256:{}", &hex[1..]), false),
            (format!("sha256:{hex}0"), false),
            (format!("sha256:{}g", &hex[1..]), false),
            (format!("sha256:{hex}\n"), false),
        ] {
            let err = input.parse::<Digest>().unwrap_err();
            assert_eq!(
                matches!(err, DigestError::Algorithm { .. }),
                algorithm,
                "{input:?}: {err}"
            );
        }
        assert!(serde_json::from_str::<Digest>("\"md5:00\"").is_err());
        let long = "x".repeat(10_000);
        assert!(long.parse::<Digest>().unwrap_err().to_string().len() < 200);
    }

    #[test]
    fn hasher_sees_what_passes_through() {
        let mut reader = Hasher::new(&b"hello"[..]);
        let mut out = Vec::new();
        reader.read_to_end(&mut out).unwrap();
        assert_eq!((reader.digest(), reader.size()), (Digest::of(b"hello"), 5));

        let mut writer = Hasher::new(Vec::new());
        writer.write_all(b"hel").unwrap();
        writer.write_all(b"lo").unwrap();
        assert_eq!(writer.digest().to_string(), HELLO);
        assert_eq!(writer.into_inner(), b"hello");
    }
}
