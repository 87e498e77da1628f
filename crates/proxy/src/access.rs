//! Who may reach a private sandbox's ports: the holder of its access token, or of a signed URL
//! that has not expired.
//!
//! Both are HMAC-SHA256 values under the server's proxy key (32 random bytes made on first
//! start, kept in a root-only file), so nothing per sandbox is stored and a sandbox's token
//! cannot be derived from another's:
//! - the access token of sandbox `id` is `HMAC(key, "cove-access-v1\0" id)`, sent in the
//!   `Cove-Access-Token` header;
//! - a signed URL carries `cove_expires=<unix seconds>` and
//!   `cove_sig=HMAC(key, "cove-url-v1\0" id "\0" port "\0" expires)`, which grants that port of
//!   that sandbox until then; the proxy turns it into a cookie holding `<expires>.<sig>` so
//!   that the page's own requests pass too.

use ring::hmac;

/// Bytes of a proxy key.
pub const KEY_LEN: usize = 32;

/// The proxy's signing key.
#[derive(Clone)]
pub struct Key(hmac::Key);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

fn url_message(id: &str, port: u16, expires: u64) -> String {
    format!("cove-url-v1\0{id}\0{port}\0{expires}")
}

impl Key {
    /// A key from its bytes.
    pub fn new(bytes: &[u8; KEY_LEN]) -> Key {
        Key(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    /// A key from its file form (64 hex characters).
    pub fn from_hex(text: &str) -> Option<Key> {
        let bytes: [u8; KEY_LEN] = unhex(text.trim())?.try_into().ok()?;
        Some(Key::new(&bytes))
    }

    /// The access token of a sandbox.
    pub fn access_token(&self, id: &str) -> String {
        hex(hmac::sign(&self.0, format!("cove-access-v1\0{id}").as_bytes()).as_ref())
    }

    /// Whether `token` is the access token of sandbox `id` (compared in constant time).
    pub fn check_access_token(&self, id: &str, token: &str) -> bool {
        unhex(token).is_some_and(|tag| {
            hmac::verify(&self.0, format!("cove-access-v1\0{id}").as_bytes(), &tag).is_ok()
        })
    }

    /// The signature of a URL to `port` of sandbox `id`, valid until `expires` (Unix seconds).
    pub fn sign_url(&self, id: &str, port: u16, expires: u64) -> String {
        hex(hmac::sign(&self.0, url_message(id, port, expires).as_bytes()).as_ref())
    }

    /// Whether `sig` signs `port` of sandbox `id` until `expires`, and `now` (Unix seconds) is
    /// before then.
    pub fn check_url(&self, id: &str, port: u16, expires: u64, sig: &str, now: u64) -> bool {
        now < expires
            && unhex(sig).is_some_and(|tag| {
                hmac::verify(&self.0, url_message(id, port, expires).as_bytes(), &tag).is_ok()
            })
    }
}

/// A new key's file form (64 hex characters) from 32 random bytes.
pub fn new_key_hex() -> Result<String, ring::error::Unspecified> {
    let mut bytes = [0u8; KEY_LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)?;
    Ok(hex(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> Key {
        Key::new(&[b; KEY_LEN])
    }

    #[test]
    fn access_tokens_are_per_sandbox_and_per_key() {
        let k = key(1);
        let t = k.access_token("0123456789ab");
        assert_eq!(t.len(), 64);
        assert!(k.check_access_token("0123456789ab", &t));
        assert!(!k.check_access_token("0123456789ac", &t));
        assert!(!key(2).check_access_token("0123456789ab", &t));
        assert!(!k.check_access_token("0123456789ab", &t[..62]));
        assert!(!k.check_access_token("0123456789ab", "zz"));
        assert!(!k.check_access_token("0123456789ab", ""));
    }

    #[test]
    fn signed_urls_bind_sandbox_port_and_expiry() {
        let k = key(3);
        let sig = k.sign_url("0123456789ab", 8080, 1000);
        assert!(k.check_url("0123456789ab", 8080, 1000, &sig, 999));
        assert!(
            !k.check_url("0123456789ab", 8080, 1000, &sig, 1000),
            "expired"
        );
        assert!(
            !k.check_url("0123456789ab", 8081, 1000, &sig, 10),
            "other port"
        );
        assert!(
            !k.check_url("0123456789ac", 8080, 1000, &sig, 10),
            "other sandbox"
        );
        assert!(
            !k.check_url("0123456789ab", 8080, 2000, &sig, 10),
            "moved expiry"
        );
        assert!(
            !key(4).check_url("0123456789ab", 8080, 1000, &sig, 10),
            "other key"
        );
    }

    #[test]
    fn keys_round_trip_through_their_file_form() {
        let text = new_key_hex().unwrap();
        assert_eq!(text.len(), 64);
        let k = Key::from_hex(&format!("{text}\n")).unwrap();
        let again = Key::from_hex(&text).unwrap();
        assert_eq!(k.access_token("a"), again.access_token("a"));
        assert!(Key::from_hex("abc").is_none());
        assert!(Key::from_hex(&"g".repeat(64)).is_none());
    }
}
