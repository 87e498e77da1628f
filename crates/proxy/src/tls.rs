//! The proxy's TLS: a given certificate chain and key, or a self-signed wildcard certificate
//! for `*.<domain>` made on first start (for development) and kept beside the state.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why TLS could not be set up; says which file and what is wrong with it.
#[derive(Debug)]
pub struct TlsError(pub String);

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

/// Where the self-signed certificate of `domain` and its key are kept under `dir`.
pub fn self_signed_paths(dir: &Path, domain: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{domain}.crt")),
        dir.join(format!("{domain}.key")),
    )
}

/// The self-signed certificate and key of `domain` under `dir`, made now if they do not exist
/// (the key root-only). Returns their paths.
pub fn ensure_self_signed(dir: &Path, domain: &str) -> Result<(PathBuf, PathBuf), TlsError> {
    let (cert_path, key_path) = self_signed_paths(dir, domain);
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    let err = |what: &str, e: &dyn std::fmt::Display| TlsError(format!("{what}: {e}"));
    let names = vec![format!("*.{domain}"), domain.to_string()];
    let made = rcgen::generate_simple_self_signed(names)
        .map_err(|e| err("make a self-signed certificate", &e))?;
    fs::create_dir_all(dir).map_err(|e| err(&format!("create {}", dir.display()), &e))?;
    let write = |path: &Path, text: &str, mode: u32| {
        let tmp = path.with_extension("tmp");
        let _ = fs::remove_file(&tmp);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| err(&format!("create {}", tmp.display()), &e))?;
        f.write_all(text.as_bytes())
            .and_then(|()| f.sync_all())
            .map_err(|e| err(&format!("write {}", tmp.display()), &e))?;
        fs::rename(&tmp, path).map_err(|e| err(&format!("rename {}", tmp.display()), &e))
    };
    write(&key_path, &made.signing_key.serialize_pem(), 0o600)?;
    write(&cert_path, &made.cert.pem(), 0o644)?;
    Ok((cert_path, key_path))
}

/// A server configuration from a PEM certificate chain and key, offering HTTP/2 and HTTP/1.1.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            TlsError(format!(
                "{}: not a PEM certificate chain: {e}",
                cert.display()
            ))
        })?;
    if chain.is_empty() {
        return Err(TlsError(format!(
            "{}: no certificate in it",
            cert.display()
        )));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| TlsError(format!("{}: not a PEM private key: {e}", key.display())))?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(format!("TLS versions: {e}")))?
            .with_no_client_auth()
            .with_single_cert(chain, key_der)
            .map_err(|e| {
                TlsError(format!(
                    "{} and {} do not make a usable certificate: {e}",
                    cert.display(),
                    key.display()
                ))
            })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_is_made_once_and_loads() {
        let dir = std::env::temp_dir().join(format!("cove-proxy-tls-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let (c, k) = ensure_self_signed(&dir, "cove.localhost").unwrap();
        let first = fs::read(&c).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&k).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let again = ensure_self_signed(&dir, "cove.localhost").unwrap();
        assert_eq!(again, (c.clone(), k.clone()));
        assert_eq!(fs::read(&c).unwrap(), first, "kept, not remade");
        let config = server_config(&c, &k).unwrap();
        assert_eq!(config.alpn_protocols[0], b"h2");
        // A key that is not one: a clear error naming the file.
        fs::write(dir.join("bad.key"), "nope").unwrap();
        let e = server_config(&c, &dir.join("bad.key")).unwrap_err();
        assert!(e.0.contains("bad.key"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
